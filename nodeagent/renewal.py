"""The agent renews its own (mTLS) certificate, like the kubelet: a new key made on the node and
a CSR, sent over the existing mutual-TLS channel with the current certificate as proof, at a
random point between 30 % and 40 % of the certificate's life, so a fleet never renews at once
and a node that is switched off (a holiday, a repair, the leader host off) has at least 60 % of
the life (18 days of the default 30) to come back and renew in. The kubelet renews at 70-90 %,
which left 3-9 days (review s46rt1 M1: a two-week closure sent about a third of the nodes into
enrolling again); a renewal costs a CSR and a signature, so renewing three times as often costs
nothing that counts, and the life that bounds a stolen key is the same.

    renewer = Renewer(cfg, identity, link, on_renewed=[...])
    await renewer.run()          # until cancelled

**Schedule** (pure: ``renewal_time``, ``next_step``). The life is counted from the moment the
CA issued the certificate (its NotBefore is backdated by ``pki.BACKDATE`` for clock skew, so
that is added back), not from NotBefore: a one-minute certificate (tests) is then renewed at
18-24 s, not at once. The jitter is drawn anew at every start; a certificate already past its
point is renewed at start. A failed renewal is tried again after a backoff
(``tlsroll.backoff.Policy``: 2 s, doubling, at most 5 minutes and never past the end); the
heartbeat reports since when it fails and why (``tlsroll nodes``, the schema). So it does,
after a renewal, while the CA certificate the leader's answers carry (a ``tlsroll ca renew``'s)
is refused (``CA_REFUSED``): the node trusts the one it had alone, until that one's end.

**A clock ahead.** After a renewal, the next is not tried before ``RENEW_AGAIN_AFTER`` (a
tenth) of the new certificate's life has passed in elapsed time (``elapsed``: not moved by the
wall clock's steps, counting time suspended), whatever the node's clock says. A clock that is
right never meets this (the next renewal is at 30-40 % of the life). A clock ahead of the
leader's by more than the renewal point but less than the life found each new certificate
due at once, and renewed in a tight loop (hundreds a second; the leader signs 30 an hour per
node, then refuses); now it renews once every tenth of the life, keeping the certificate
valid, and logs ``renewal.clock_ahead``. A clock ahead by more than 90 % of the life reaches
the new certificate's end first: that is reported as below.

**Files.** A renewal writes the new key to ``DATA/node.key.new`` (0600) before it asks, and
the certificate to ``DATA/node.pem.new`` once it has it; then renames the key, then the
certificate, into place. ``finish_pending`` (called before the identity is loaded) completes a
renewal cut short by a crash: a new certificate matching a new key is moved into place; a new
key without its certificate is kept and used by the next renewal, which then runs at once (the
leader may already dial the node by that key).

**Switch-over.** Right after the answer the agent serves the new certificate to new
connections (``ServerCredentials``: gRPC asks for the certificate at every handshake; existing
connections, and a command in flight on them, go on) and reconnects its leader link with it.
The leader dials the node by the new key from then on, and accepts the old certificate only
until the agent's first heartbeat with the new one (``leader.store.renew_node_certificate``).

**Expired.** A certificate past its end cannot renew (the leader's TLS refuses it): the node
must enrol again with a fresh token, unless only its clock is ahead. At start that is a
one-line error (``expired_message``: the clock to check first, then how to enrol again);
while running, one log line, and the heartbeat reports the renewal failing ("certificate
expired by the node's clock", ``EXPIRED``). The renewer still looks again every
``EXPIRED_RECHECK`` seconds: a node clock that was only ahead for a while (an RTC wrong at boot,
a VM resumed, ``date -s``) ended renewals for good, though the certificate was still valid;
once the clock reads before the end again, the report is taken back and renewal goes on as
scheduled.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from nodeagent import nodefiles
from nodeagent.certwork import names_request
from nodeagent.config import AgentConfig
from nodeagent.cryptoworker import InProcess, Worker
from nodeagent.identity import Identity, expired_message, paths, pending_paths
from tlsroll import clocks, logs
from tlsroll.backoff import Policy
from tlsroll.errors import TerminalError, TlsrollError
from tlsroll.names import BACKDATE, utcnow

log = logs.get_logger(__name__)

RENEW_FROM = 0.3
RENEW_TO = 0.4
RETRY = Policy(free=0, base=2.0, cap=300.0, forget=86400.0)
MAX_ERROR = 200
# What the heartbeat reports (``tlsroll nodes``, the schema) while the node's clock says so.
EXPIRED = (
    "certificate expired by the node's clock: check that clock first (if it is ahead, correct "
    "it: the agent goes on by itself); if it is right, enrol the node again (a new join token, "
    "no nodes remove)"
)
# What the heartbeat reports after a renewal whose CA certificate (a `tlsroll ca renew`'s) the
# node refused (``pki.renewed_ca_problem``), until one takes it: its certificate renewed, the
# node still trusts the CA certificate it had alone, and stops trusting the cluster at its end.
CA_REFUSED = (
    "the renewed CA certificate was refused (this node keeps the one it had, until its end): "
)
EXPIRED_RECHECK = 60.0  # seconds between looks at a certificate the node's clock says has ended
# After a renewal, elapsed time before the next is tried, as a fraction of the new life.
RENEW_AGAIN_AFTER = 0.1
elapsed = clocks.elapsed
"""Seconds that no wall-clock step moves and that count a suspend (``tlsroll.clocks``)."""


# --- the schedule (pure) ----------------------------------------------------------------------


def issued_at(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When the CA issued a certificate: NotBefore is backdated by ``pki.BACKDATE``."""
    return min(not_before + BACKDATE, not_after)


def renewal_time(not_before: dt.datetime, not_after: dt.datetime, draw: float) -> dt.datetime:
    """The point to renew at: ``draw`` (uniform in [0, 1)) picks it in 30-40 % of the life."""
    start = issued_at(not_before, not_after)
    fraction = RENEW_FROM + (RENEW_TO - RENEW_FROM) * min(max(draw, 0.0), 1.0)
    return start + (not_after - start) * fraction


@dataclass(frozen=True)
class Step:
    """What the renewer does next: ``renew`` now, give up (``expired``), or wait ``seconds``."""

    renew: bool = False
    expired: bool = False
    seconds: float = 0.0


def next_step(
    now: dt.datetime,
    due: dt.datetime,
    not_after: dt.datetime,
    failures: int = 0,
    last_failure: dt.datetime | None = None,
    policy: Policy = RETRY,
    hold: float = 0.0,
) -> Step:
    """The renewer's decision for a certificate due at ``due`` that ends at ``not_after``,
    after ``failures`` failed attempts, the last at ``last_failure``; ``hold``: the elapsed
    seconds still to pass before another renewal (``RENEW_AGAIN_AFTER``)."""
    if now >= not_after:
        return Step(expired=True)
    at = due
    if failures and last_failure is not None:
        at = max(at, last_failure + dt.timedelta(seconds=policy.delay(failures - 1)))
    if now >= at and hold <= 0:
        return Step(renew=True)
    # Wake up in time to try once more before the end, however long the backoff.
    left = max((at - now).total_seconds(), hold)
    wait = min(left, max((not_after - now).total_seconds() / 2, 0.5))
    return Step(seconds=max(wait, 0.05))


# --- the agent's serving credentials ----------------------------------------------------------


class ServerCredentials:
    """The agent's NodeAgent server credentials, hot-reloaded: gRPC asks each listener's
    fetcher for the certificate at every new handshake, and gets the new one once after a
    renewal; connections already open keep theirs."""

    def __init__(self, identity: Identity) -> None:
        self._current = (0, _config(identity))

    def update(self, identity: Identity) -> None:
        """Serve ``identity`` to new connections from now on."""
        version, _ = self._current
        self._current = (version + 1, _config(identity))  # one assignment: atomic for readers

    def for_listener(self) -> grpc.ServerCredentials:
        """Credentials for one listener: each has a fetcher (and a version seen) of its own."""
        seen, initial = self._current

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Runs on gRPC's threads at every handshake: no I/O, one read of ``_current``.
            nonlocal seen
            version, config = self._current
            if version == seen:
                return None
            seen = version
            return config

        # grpc's stubs say the fetcher returns a configuration; None ("unchanged") is allowed.
        return grpc.dynamic_ssl_server_credentials(
            initial,
            fetch,  # type: ignore[arg-type]
            require_client_authentication=True,
        )


def _config(identity: Identity) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem
    )


# --- the renewer --------------------------------------------------------------------------------


@dataclass
class Status:
    """What the heartbeat reports: when the agent means to renew, and whether renewing fails."""

    due_at: dt.datetime | None = None
    failing_since: dt.datetime | None = None
    error: str = ""


class RenewalRefused(TerminalError):
    """The renewed certificate is not what this node asked for."""


class Link(Protocol):
    """What the renewer needs of the agent's link to the leader (``nodeagent.leader_link``)."""

    async def renew(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        """The new certificate and the leader's CA certificate (PEM; empty: none sent)."""
        ...


Renewed = Callable[[Identity], Awaitable[None] | None]


class Renewer:
    def __init__(
        self,
        cfg: AgentConfig,
        identity: Identity,
        link: Link,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        draw: Callable[[], float] = random.random,
        on_renewed: Sequence[Renewed] = (),
        elapsed: Callable[[], float] = elapsed,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        crypto: Worker | None = None,
    ) -> None:
        self.cfg = cfg
        # The X.509 work (the key, the CSR, the answer checked and installed): the agent's
        # crypto worker (``nodeagent.cryptoworker``); in-process where no agent runs.
        self.crypto: Worker = crypto if crypto is not None else InProcess()
        self.identity = identity
        self.link = link
        self.clock = clock
        self.elapsed = elapsed
        self.sleep = sleep
        self.draw = draw
        # No renewal before this (``elapsed``): set by each renewal (``RENEW_AGAIN_AFTER``).
        self.not_again_before: float | None = None
        self.on_renewed = list(on_renewed)
        self.status = Status()
        self.failures = 0
        self.last_failure: dt.datetime | None = None
        self.expired = False
        self._before_expired: tuple[dt.datetime | None, str] = (None, "")
        # Since when the renewals' CA certificate is refused (``CA_REFUSED``); None: it is not.
        # Kept in ``DATA/ca.refused`` (``nodefiles.refused_ca``): reported again after a
        # restart, when nothing else would say it until the next renewal (review s49 M).
        self.ca_refused_since: dt.datetime | None = None
        if (refused := nodefiles.refused_ca(cfg.data_dir)) is not None:
            self.ca_refused_since, reason = refused
            self.status.failing_since = self.ca_refused_since
            self.status.error = (CA_REFUSED + reason)[:MAX_ERROR]
        self._schedule()

    def _schedule(self) -> None:
        due = renewal_time(self.identity.not_before, self.identity.not_after, self.draw())
        if pending_paths(self.cfg.data_dir)[0].exists():
            due = min(due, self.clock())  # a renewal cut short: the leader may dial the new key
        self.status.due_at = due

    async def run(self) -> None:
        """Renew whenever due, until cancelled. A certificate the node's clock says has ended
        is reported, and looked at again every ``EXPIRED_RECHECK`` seconds (the clock may have
        been ahead for a while only)."""
        log.info("renewal.scheduled", due_at=_iso(self.status.due_at))
        while True:
            now = self.clock()
            assert self.status.due_at is not None
            hold = 0.0
            if self.not_again_before is not None:
                hold = self.not_again_before - self.elapsed()
            step = next_step(
                now,
                self.status.due_at,
                self.identity.not_after,
                self.failures,
                self.last_failure,
                hold=hold,
            )
            if step.expired:
                self._expired(now)
                await self.sleep(EXPIRED_RECHECK)
                continue
            if self.expired:
                self._valid_again(now)
            if not step.renew:
                await self.sleep(step.seconds)
                continue
            try:
                await self.renew()
            except (TlsrollError, OSError, ValueError) as exc:
                self._failed(now, exc)

    def _expired(self, now: dt.datetime) -> None:
        """Report the end (once: the first look that finds it)."""
        if self.expired:
            return
        self.expired = True
        self._before_expired = (self.status.failing_since, self.status.error)
        self.status.failing_since = self.status.failing_since or now
        self.status.error = EXPIRED
        log.error(
            "agent.certificate_expired",
            message=expired_message(self.cfg, self.identity.not_after, now, running=True),
            hint="the message says what to do: a new token (tlsroll token create on the leader),"
            " then the join script again on this node",
        )

    def _valid_again(self, now: dt.datetime) -> None:
        """The clock reads before the end again: take the report back (a failing renewal
        before it is reported as it was), and go on."""
        self.expired = False
        self.status.failing_since, self.status.error = self._before_expired
        log.warning(
            "agent.certificate_valid_again",
            now=_iso(now),
            not_after=_iso(self.identity.not_after),
            detail="the node's clock was ahead; renewal goes on",
        )

    def _hold_after_renewal(self) -> None:
        """No renewal again before ``RENEW_AGAIN_AFTER`` of the new life has passed (elapsed
        time); say so if the node's clock already finds the new certificate due: it is ahead
        of the leader's (which signed it just now) by most of the life."""
        signed = issued_at(self.identity.not_before, self.identity.not_after)
        life = (self.identity.not_after - signed).total_seconds()
        gap = life * RENEW_AGAIN_AFTER
        self.not_again_before = self.elapsed() + gap
        now = self.clock()
        assert self.status.due_at is not None
        if now >= self.status.due_at:
            log.warning(
                "renewal.clock_ahead",
                now=_iso(now),
                signed_at=_iso(signed),
                ahead_seconds=round((now - signed).total_seconds()),
                next_renewal_in_seconds=round(gap),
                detail="the node's clock is ahead of the leader's: the certificate just signed "
                "is already due by it; correct the node's clock (renewals wait a tenth of the "
                "certificate's life meanwhile)",
            )

    def _failed(self, now: dt.datetime, exc: BaseException) -> None:
        self.failures += 1
        self.last_failure = now
        reason = str(exc) if not isinstance(exc, OSError) else f"{exc.strerror}: {exc.filename}"
        self.status.failing_since = self.status.failing_since or now
        self.status.error = reason[:MAX_ERROR]
        retry = now + dt.timedelta(seconds=RETRY.delay(self.failures - 1))
        log.warning(
            "renewal.failed",
            attempt=self.failures,
            error=self.status.error,
            retry_at=_iso(min(retry, self.identity.not_after)),
            not_after=_iso(self.identity.not_after),
            hint="the agent tries again at retry_at; if it keeps failing before not_after, check"
            " the leader is reachable (tlsroll nodes)",
        )

    async def renew(self) -> Identity:
        """One renewal: a new key (or the one a renewal cut short left), a CSR with exactly the
        node's names, the leader's answer checked, the files moved into place, then everyone
        told (``on_renewed``). Raises on failure; nothing changes then.

        The X.509 work is the crypto worker's (``certwork_ops.renew_csr``: the key a renewal
        cut short left, else a new one written 0600 before the CSR leaves the node;
        ``certwork_ops.renew_install``: the answer checked, the files moved into place), so
        that the agent holds no ``cryptography`` after it (issue 15)."""
        cfg = self.cfg
        names = names_request(cfg.names)
        new_key = pending_paths(cfg.data_dir)[0]
        csr_pem = await self.crypto.call(
            "cert.renew_csr", {"key_file": str(new_key), "names": names}
        )
        cert_pem, ca_pem = await self.link.renew(str(csr_pem).encode("ascii"))
        renewed = await self.crypto.call(
            "cert.renew_install",
            {
                "certificate_pem": cert_pem.decode("ascii", "surrogateescape"),
                "data_dir": str(cfg.data_dir),
                "names": names,
                "node_name": cfg.node_name,
                "ca_certificate_pem": ca_pem.decode("ascii", "surrogateescape"),
                "ca_pin": cfg.ca_pin,
            },
        )
        if "refused" in renewed:
            raise RenewalRefused(renewed["refused"])
        if renewed.get("ca_refused"):
            log.warning(
                "renewal.ca_refused",
                reason=renewed["ca_refused"],
                detail="the agent did not take the CA certificate the leader signed its renewal "
                "with (the reason says why); compare with tlsroll ca show on the leader",
            )
        if renewed.get("ca_not_after"):
            log.info("agent.ca_renewed", ca_not_after=renewed["ca_not_after"])
        key_file, cert_file, ca_file = paths(cfg.data_dir)
        self.identity = Identity(
            key_file,
            cert_file,
            ca_file,
            dt.datetime.fromisoformat(renewed["not_before"]),
            dt.datetime.fromisoformat(renewed["not_after"]),
            renewed["trust_domain"],
            str(renewed["certificate"]).encode("ascii"),
        )
        self.failures = 0
        self.last_failure = None
        self.status = Status()
        if renewed.get("ca_refused"):
            # Reported as a renewal failing (``tlsroll nodes``, the schema) until a renewal's
            # CA certificate is taken: else only this node's log said it (review s48rev5 L4).
            self.ca_refused_since = self.ca_refused_since or self.clock()
            self.status.failing_since = self.ca_refused_since
            self.status.error = (CA_REFUSED + str(renewed["ca_refused"]))[:MAX_ERROR]
            try:
                nodefiles.write_refused_ca(
                    cfg.data_dir, self.ca_refused_since, str(renewed["ca_refused"])
                )
            except OSError as exc:  # reported while running still; not after a restart
                log.warning(
                    "renewal.ca_refused_not_kept",
                    error=f"{exc.strerror}: {exc.filename}",
                    detail="the refusal could not be written to the agent's data dir: it is "
                    "reported while the agent runs, not after a restart",
                )
        else:
            self.ca_refused_since = None
            nodefiles.forget_refused_ca(cfg.data_dir)
        self._schedule()
        self._hold_after_renewal()
        log.info(
            "agent.certificate_renewed",
            serial=renewed["serial"],
            key_pin=renewed["key_pin"],
            not_after=_iso(self.identity.not_after),
            next_due_at=_iso(self.status.due_at),
        )
        for callback in self.on_renewed:
            result = callback(self.identity)
            if result is not None:
                await result
        return self.identity


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when else None
