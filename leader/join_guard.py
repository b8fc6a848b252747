"""The join port under a flood of token guesses: per-source backoff and sampled logging.

The audit made 550–830 failed enrolments a second, each logged. ``JoinGuard`` (pure: the clock
is a function passed in, monotonic seconds) decides per *source*, the caller's IPv4 address or
IPv6 /64 (``tlsroll.backoff.source_key``):

* **Backoff.** A source may fail ``free`` times at once; after that each failure makes it wait
  ``base * 2**(n - free)`` seconds (at most ``cap``) before its next attempt is even looked at,
  and at most ``max_in_flight`` of its attempts may be open at a time (so a burst of parallel
  calls cannot all slip in before the first failure is counted). A refused attempt costs no
  parsing, no CSR check and no store access, and it does not count as a failure (the wait
  does not grow while the caller is only being told to wait). A success forgets the source; a
  source quiet for ``forget`` seconds starts over. At most ``max_sources`` sources are kept,
  the longest quiet dropped first.
* **Log sampling.** The first failure of a source is logged with its reason; later ones and
  the refusals are counted, and ``summary()`` hands out one summary of them at most every
  ``summary_every`` seconds (the busiest sources named), so a flood writes a bounded number of
  lines. That is ``tlsroll.logsample.SampledLog``'s rule, which keeps the count here too
  (its reasons: ``failure``, and ``refused`` for a wait, which is never logged on its own).

``guarded`` wraps the ``Enrol`` servicer method with all of that (its service has a ``guard``
attribute). Every refused enrolment counts as a failure, not only a wrong token: a request
with a bad CSR must not reset its source's count (an agent that is set up right fails rarely).
But one the store refused after the token's secret was right (the token used up, expired,
superseded or for other names; the node on record with another key) is no guess: it is logged
as a failure is, and neither counts nor resets. An agent whose certificate ended offers two
keys at each start with the token in its file (``node.key``, then a renewal's
``node.key.new``): counted, two starts with a spent token put its source past the free
failures, and the second offer of every later try was told to wait, for good (s48rev4 M1).
Nor is an agent of an earlier release (``OlderAgent``): it is refused before its token is
looked at, so it learns nothing of the token and costs no more than a refusal to wait. Counted,
an old agent retrying as it does put its source past the free failures, and the agent the admin
then upgraded, as told, was itself told to wait (review L9).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from leader.store import NameTaken, TokenRejected, TooMany, WrongSecret
from leader.tokens import JoinToken, MalformedToken
from tlsroll import logs, peertext
from tlsroll.backoff import Backoff, Policy, source_key
from tlsroll.errors import TlsrollError
from tlsroll.logsample import SampledLog
from tlsroll.rpc import RpcStatusError

log = logs.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
# The reasons the sampled log counts: a failed attempt, and one refused (told to wait).
FAILURE = "failure"
REFUSED = "refused"


@dataclass(frozen=True)
class GuardPolicy:
    free: int = 5  # failures a source may make without waiting
    base: float = 1.0  # then it waits this long after a failure, doubling each time
    cap: float = 300.0  # the longest wait
    forget: float = 3600.0  # a source quiet this long starts over
    max_in_flight: int = 4  # attempts of one source open at once
    max_sources: int = 10_000  # sources remembered (least recently active dropped first)
    summary_every: float = 60.0  # at most one summary of unlogged failures this often


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0  # seconds, when refused


@dataclass(frozen=True)
class Summary:
    """Failures and refusals since the last summary that were not logged one by one."""

    seconds: float  # the time the summary covers
    failures: int
    refused: int
    sources: int  # distinct sources among them (at most max_sources are told apart)
    top: tuple[tuple[str, int], ...]  # the busiest sources and their counts


class OlderAgent(RpcStatusError):
    """An enrolment refused because the agent is of an earlier release, decided from the
    request alone before its token is looked at: no guess (the module's docstring)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)


def peer_source(peer: str) -> str:
    """The source to count a gRPC peer (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, also
    percent-encoded) against: its IPv4 address or IPv6 /64; the peer text itself, bounded and
    cleaned, for anything else (a Unix socket)."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    host = rest
    if kind == "ipv6" and rest.startswith("["):
        host = rest[1:].partition("]")[0]
    elif kind == "ipv4":
        host = rest.rpartition(":")[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return peertext.clean(peer, 64) or "unknown"
    return source_key(host)


class JoinGuard:
    def __init__(
        self, policy: GuardPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or GuardPolicy()
        self.clock = clock
        p = self.policy
        self._backoff = Backoff(
            Policy(free=p.free, base=p.base, cap=p.cap, forget=p.forget), max_keys=p.max_sources
        )
        self._in_flight: Counter[str] = Counter()
        self._log = SampledLog(
            every=p.summary_every, forget=p.forget, max_sources=p.max_sources, clock=clock
        )

    # --- one attempt --------------------------------------------------------------------------

    def admit(self, source: str) -> Verdict:
        """May ``source`` make an attempt now? If so it is open until ``done``."""
        now = self.clock()
        wait = self._backoff.wait(source, now)
        if wait <= 0 and self._in_flight[source] >= self.policy.max_in_flight:
            wait = self.policy.base
        if wait > 0:
            self._log.count(source, REFUSED)
            return Verdict(False, wait)
        self._in_flight[source] += 1
        return Verdict(True)

    def done(self, source: str, *, failed: bool | None, counted: bool = True) -> bool:
        """End an admitted attempt: ``failed`` True counts a failure (unless not ``counted``: a
        refusal of a right secret, logged as a failure is but adding no wait), False (a
        success) forgets the source, None (cancelled) neither. True if this failure should be
        logged on its own (the source's first), False if it goes into the next summary."""
        if self._in_flight[source] <= 1:
            self._in_flight.pop(source, None)
        else:
            self._in_flight[source] -= 1
        if failed is None:
            return False
        if not failed:
            self._backoff.reset(source)
            return False
        if counted:
            self._backoff.failed(source, self.clock())
        return self._log.first(source, FAILURE)

    # --- the summary --------------------------------------------------------------------------

    def summary(self) -> Summary | None:
        """The summary that is due (something unlogged, the last one ``summary_every`` ago),
        or None; a returned summary is not handed out again."""
        made = self._log.summary()
        if made is None:
            return None
        reasons = dict(made.reasons)
        return Summary(
            seconds=made.seconds,
            failures=reasons.get(FAILURE, 0),
            refused=reasons.get(REFUSED, 0),
            sources=made.sources,
            top=made.top,
        )


def _token_id(text: str) -> str | None:
    try:
        return JoinToken.parse(text).id
    except MalformedToken:
        return None


def _log_summary(guard: JoinGuard) -> None:
    if (s := guard.summary()) is not None:
        log.warning(
            "enrol.failures_summary",
            seconds=round(s.seconds),
            failures_not_logged=s.failures,
            refused=s.refused,
            sources=s.sources,
            top=[f"{source}: {count}" for source, count in s.top],
            detail="enrolments refused in that time and not logged one by one; the top sources "
            "tried most",
        )


def _not_a_guess(exc: BaseException) -> bool:
    """Whether the enrolment was refused for something other than its token's secret: the
    store refused it after the secret was right, or the agent is of an earlier release and
    the token was never looked at (the module's docstring)."""
    if isinstance(exc, OlderAgent):
        return True
    return isinstance(exc, (TokenRejected, NameTaken, TooMany)) and not isinstance(exc, WrongSecret)


def _reason(exc: BaseException) -> str:
    """What to log about a refused enrolment: the project's own message (it never holds the
    secret), else only the error's type."""
    return str(exc) if isinstance(exc, TlsrollError) else type(exc).__name__


def guarded(method: F) -> F:
    """Wrap ``Enrol``: a source in backoff is refused (RESOURCE_EXHAUSTED, ``retry-after`` in
    the trailing metadata and the message) before anything else; every refused enrolment (a
    wrong token, a bad CSR...) counts as a failure of its source, but one that is no guess
    (``_not_a_guess``), and each is logged sampled (``enrol.refused`` for a source's first,
    then ``enrol.failures_summary``); a success forgets the source."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        guard: JoinGuard = self.guard
        source = peer_source(context.peer())
        verdict = guard.admit(source)
        if not verdict.allowed:
            _log_summary(guard)
            seconds = max(1, math.ceil(verdict.retry_after))
            context.set_trailing_metadata((("retry-after", str(seconds)),))
            raise RpcStatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many failed join attempts from {source}; retry in {seconds} s",
            )
        try:
            result = await method(self, request, context)
        except Exception as exc:
            if guard.done(source, failed=True, counted=not _not_a_guess(exc)):
                log.warning(
                    "enrol.refused",
                    source=source,
                    node=peertext.clean(request.node_name, 63),
                    token_id=_token_id(request.token),
                    reason=_reason(exc),
                    hint="the reason says why; a new token: tlsroll token create, then the join "
                    "script run again on the node",
                )
            _log_summary(guard)
            raise
        except BaseException:  # cancelled: neither a success nor a failure
            guard.done(source, failed=None)
            raise
        guard.done(source, failed=False)
        _log_summary(guard)  # what a flood that has stopped left unsaid
        return result

    return wrapper  # type: ignore[return-value]
