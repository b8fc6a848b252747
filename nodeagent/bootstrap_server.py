"""The bootstrap service on port 9443: workstations run the password exchange and enrol here.

The protocol (SPAKE2, key confirmation, sealed delivery) is in ``tlsroll.bootstrap_protocol``;
this module is the https service the agent runs once its node is switched (on
``nodeagent.json_https``: asyncio streams, ``ssl`` and h11, with its limits on sizes, time and
connections), and the limits that make each password guess cost one counted exchange:

    service = BootstrapService(
        address="192.168.1.5", cert_file=..., key_file=..., ca_bundle_pem=...,
        server_url="https://192.168.1.5:8443/praxis_live/", node_name="node-a",
        verifier=verifier, sign=forward_to_leader, crypto=worker,
    )
    await service.start()            # refuses a key file others can read, a bundle of non-CAs
    service.set_verifier(new)        # the password changed (at the managed server's restart)
    await service.stop()

``sign(csr_pem) -> certificate_pem`` is injected: in production the agent forwards the CSR to
the leader's CA, which issues a client certificate (EKU clientAuth only) for ``ws-<name>``.
``withdraw(certificate_pem) -> bool`` too: the leader withdraws (revokes) a certificate it
signed that the node could not deliver, which would otherwise hold the name against the
workstation's next try (it makes a new key each run); True if the leader withdrew it now.

``renew(csr_pem) -> Signed`` too (None: no renewals): a workstation's renewal without the
password (``tlsroll client renew``, ``proto.RENEW_PATH``): its CSR, sent in the clear over this
service's TLS, carries the proof that it holds its current certificate (that certificate, and
its key's signature over the new key and the name: ``bootstrap_csr.Reenrolment``), checked here
(by the worker) and passed on; the leader signs only if that certificate is on its record for
the name, unrevoked and unexpired (``Leader.RenewWorkstationCertificate``). A renewal refused
(no proof, the leader's no) counts against its source's own backoff (``PER_RENEWAL``), never
against the password's limits.

``crypto`` runs the exchange's cryptography (``nodeagent.bootstrap_crypto``'s ops: SPAKE2,
AES-GCM, the CSR's and the certificates' checks): in production the agent's crypto worker, a
child process (``nodeagent.cryptoworker``), so that the agent never holds ``cryptography`` or
``spake2`` (issue 15). The exchange's state, its limits, the key derivation and the key
confirmation (HMAC) stay here: a wrong password is found and counted without the worker. A
worker that fails (killed, hung, not startable) is a 503 ``busy`` with Retry-After for the
workstation ("try later"), never a counted failure, and the exchange is used up; once the
leader has signed, the worker's work (the certificate's facts, the seal) is tried a second time
first (a new child), since the leader holds the name for that certificate's key by then; if
both fail, or do not end within ``FINISH_DEADLINE`` of the request (well within the
workstation's wait: a hung worker), the leader is asked to withdraw that certificate before the
503 is answered, so that the workstation's next try is signed (session 43); and so it is if the
service stops meanwhile (the agent's stop, new settings), or while the leader signs (the stop
waits for that work: ``STOP_WITHDRAW``). If it could not be withdrawn (an older leader, the
leader unreachable, a certificate revoked already), the 503 says what frees the name.

Limits (``Limits``; pure classes, time passed in, so tests move a fake clock):

- ``Guard``: a wrong confirmation is a failure, counted against the source address (an IPv6
  /64), the claimed workstation name and the whole node, each with exponential backoff, and
  under a ceiling for the node (``ceiling`` failures a ``ceiling_window``). A start while any of
  them must wait gets 429 with Retry-After before any work is done, and so does a finish
  (checked again before its confirmation is, not counted, the exchange used up): exchanges
  opened in advance buy no extra guesses, each allowance takes at most one confirmation. A
  success clears the source's and the name's count, not the node's.
- ``ExchangeTable``: an exchange is single use (``finish`` takes it, whatever happens next) and
  lives ``exchange_ttl`` seconds. At most ``open_per_source`` are open per source (429 busy)
  and ``open_total`` in all (503 busy): a flood of starts is refused, it never evicts an
  exchange in progress. An exchange that expires was never confirmed and gave nothing away,
  so it is dropped without counting; ``finish`` on it answers 410 ``exchange_expired``.
- ``FailureLog`` (``nodeagent.failure_log``): the failures not yet reported to the leader, per
  source, which the agent sends with its heartbeat (the schema shows them to the practice IT).

Log events name the reason, the remote address and the claimed name, never the password,
verifier, keys, confirmations or the exchange id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Self

from nodeagent import bootstrap_crypto
from nodeagent.failure_log import FailureLog
from nodeagent.json_https import HttpLimits, JsonHttpsListener, Reply, Request
from tlsroll import bootstrap_protocol as proto
from tlsroll import logs, peertext
from tlsroll.backoff import Backoff, Ceiling, Policy, retry_after, source_key
from tlsroll.defaults import BOOTSTRAP_PORT
from tlsroll.errors import TerminalError, TlsrollError, os_error_text
from tlsroll.fsutil import check_private_file
from tlsroll.logsample import SampledLog
from tlsroll.tls import server_context


class Withdrawal(StrEnum):
    """What came of asking the leader to withdraw a certificate it signed (``WithdrawFn``)."""

    WITHDRAWN = "withdrawn"  # revoked now: the name is free, the workstation's next try signed
    HELD = "held"  # not withdrawn (an older leader, the leader unreachable, or superseded by a
    # newer enrolment of the name, which holds it): what frees the name is the admin's, or
    # --replace
    REVOKED = "revoked"  # an admin had revoked it (``tlsroll workstations revoke``): the name
    # is free, but the admin may have meant this PC


class Signed(NamedTuple):
    """What the leader answered a signing with: the certificate, and the CA certificate it was
    issued under (PEM; empty from an older leader). A ``sign`` may answer the certificate
    alone (bytes): as with an empty CA certificate."""

    certificate_pem: bytes
    ca_certificate_pem: bytes = b""


SignFn = Callable[[bytes], Awaitable[bytes | Signed]]


def _as_signed(answer: bytes | Signed) -> Signed:
    return answer if isinstance(answer, Signed) else Signed(answer)


WithdrawFn = Callable[[bytes], Awaitable[Withdrawal]]
Clock = Callable[[], float]
WallClock = Callable[[], dt.datetime]

SHUTDOWN_TIMEOUT = 5.0
PAKE_CONCURRENCY = 2  # SPAKE2 is pure Python: at most this many asked of the worker at once
WORKER_RETRY = 5.0  # the Retry-After of a "try later" when the crypto worker failed
FINISH_DEADLINE = proto.FINISH_DEADLINE  # (CLIENT_WAIT / 2)
"""Seconds from a finish request's arrival by which the work after the leader signed (the
certificate's check and the seal, each tried twice) must be done; past it, the certificate is
withdrawn and the answer is 503 "try later". Half the workstation's default wait
(``proto.CLIENT_WAIT``): a sealed answer must reach the workstation while it still waits, and
the other half is for a slow signing before it (which counts against the same wait), the
withdrawal before the 503, the way back and a loaded machine. The work itself takes
milliseconds, a retry in a new child under a second (review s43rev2, M1: a hung worker's retry
sealed the answer after the workstation had gone, and the name stayed held)."""
STOP_WITHDRAW = 2.0
"""Seconds, from the cancellation of the requests the agent's stop cuts (after their grace,
``SHUTDOWN_TIMEOUT``), that the work they leave gets in all: a signing's answer awaited and
what it signed withdrawn, or a withdrawal under way (``BootstrapService._stop_work``). The
service's ``stop`` waits for that work (review s45rev4 M1: it ran in the cut request's task,
which the listener's stop left after 1 s and the loop's end cancelled), then cancels what is
left (``STOP_CUT`` for it to end). The leader answers in milliseconds. The agent's whole stop,
at worst: its gRPC grace 10 s, a switch's 60 s, this service's 5 + 2 + 0.5 s (the listener's
1 s for its connections runs within the 2), the crypto worker's 5 s and the leader link's
2 + 2 s: 86.5 s, inside the unit's TimeoutStopSec=90s."""
STOP_CUT = 0.5
"""Seconds the stop-time work cancelled at ``STOP_WITHDRAW`` gets to end (a gRPC call ends at
once)."""
NODE_KEY = "node"

log = logs.get_logger(__name__)


class Crypto(Protocol):
    """What runs ``nodeagent.bootstrap_crypto``'s ops (op ``"bootstrap.NAME"``): the agent's
    crypto worker (``nodeagent.cryptoworker.CryptoWorker``)."""

    async def call(self, op: str, request: dict[str, Any]) -> Any: ...


class WorkerFailed(TerminalError):
    """The crypto worker gave no (usable) answer: killed, hung, not startable, or its bug
    (``BootstrapService._crypto``). The workstation is told to try later; nothing is counted."""


def _busy() -> Refused:
    return Refused(
        503,
        proto.ErrorCode.BUSY,
        "the node cannot run the exchange now; try later",
        retry=WORKER_RETRY,
    )


async def _asked_at_stop(asking: Awaitable[Withdrawal], request: Request) -> None:
    """(Stop-time work.) A withdrawal awaited; cancelled by the stop's bound, said in the log:
    the certificate then holds its name."""
    try:
        await asking
    except asyncio.CancelledError:
        log.error(
            "bootstrap.withdraw_failed",
            remote=request.remote,
            error="stopping",
            hint="the name stays held by an undelivered certificate: tlsroll workstations revoke"
            " NAME frees it",
        )
        raise


def _worker_bytes(answer: Mapping[str, Any], name: str) -> bytes:
    """A base64 field of the worker's answer; WorkerFailed if it has none."""
    try:
        return proto.unb64(answer.get(name), name)
    except proto.BootstrapError:
        raise WorkerFailed(f"the crypto worker's answer has no {name}") from None


PER_SOURCE = Policy(free=5, base=2.0, cap=900.0, forget=3600.0)
PER_NAME = Policy(free=5, base=2.0, cap=900.0, forget=3600.0)
PER_NODE = Policy(free=20, base=1.0, cap=60.0, forget=3600.0)
PER_RENEWAL = Policy(free=5, base=2.0, cap=900.0, forget=3600.0)  # refused renewals, a source


@dataclass(frozen=True)
class Limits:
    """The numbers behind the limits (see the module docstring)."""

    per_source: Policy = PER_SOURCE
    per_name: Policy = PER_NAME
    per_node: Policy = PER_NODE
    ceiling: int = 200  # failures a day, for the whole node; then every start waits
    ceiling_window: float = 86_400.0
    open_per_source: int = 4
    open_total: int = 256
    exchange_ttl: float = proto.EXCHANGE_TTL


class Guard:
    """Failed passwords per source, per claimed name and per node (pure; see ``Limits``)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.sources = Backoff(limits.per_source)
        self.names = Backoff(limits.per_name)
        self.node = Backoff(limits.per_node, max_keys=1)
        self.ceiling = Ceiling(limits.ceiling, limits.ceiling_window)

    def wait(self, source: str, name: str, now: float) -> float:
        """Seconds until ``source`` may try ``name`` (0: now)."""
        return max(
            self.sources.wait(source, now),
            self.names.wait(name, now),
            self.node.wait(NODE_KEY, now),
            self.ceiling.wait(now),
        )

    def failed(self, source: str, name: str, now: float) -> int:
        """Count a wrong password; returns the source's failures so far."""
        self.names.failed(name, now)
        self.node.failed(NODE_KEY, now)
        self.ceiling.failed(now)
        return self.sources.failed(source, now)

    def succeeded(self, source: str, name: str) -> None:
        self.sources.reset(source)
        self.names.reset(name)

    def restore(self, times: list[float]) -> None:
        """Count again, for the whole node, the failures an earlier run of the agent counted
        (``times``: on this guard's clock, oldest first): its ceiling and its backoff. Those of
        a source or a name start over (a success would have cleared them, and is not kept)."""
        for at in sorted(times):
            self.node.failed(NODE_KEY, at)
            self.ceiling.failed(at)


@dataclass
class Exchange:
    """One open exchange; ``keys`` is None while the node still computes its answer."""

    id: str
    source: str
    workstation: str
    expires: float
    keys: proto.SessionKeys | None = field(default=None, repr=False)


class Busy(TerminalError):
    """No room for another exchange; ``status`` 429 (this source) or 503 (the node)."""

    def __init__(self, status: int, message: str, retry: float) -> None:
        super().__init__(message)
        self.status = status
        self.retry = retry


class ExchangeTable:
    """Open exchanges: single use, short-lived, bounded per source and in all; never evicts."""

    def __init__(self, ttl: float, per_source: int, total: int) -> None:
        self.ttl = ttl
        self.per_source = per_source
        self.total = total
        self._open: OrderedDict[str, Exchange] = OrderedDict()  # oldest first
        self._by_source: dict[str, int] = {}

    def _remove(self, exchange_id: str) -> Exchange | None:
        ex = self._open.pop(exchange_id, None)
        if ex is not None:
            left = self._by_source[ex.source] - 1
            if left:
                self._by_source[ex.source] = left
            else:
                del self._by_source[ex.source]
        return ex

    def purge(self, now: float) -> int:
        """Drop the expired exchanges (never confirmed: not counted as failures)."""
        dropped = 0
        while self._open:
            oldest = next(iter(self._open.values()))
            if oldest.expires > now:
                break
            self._remove(oldest.id)
            dropped += 1
        return dropped

    def reserve(self, source: str, workstation: str, now: float) -> Exchange:
        """A new exchange for ``source``; Busy if it has too many open, or the node has."""
        self.purge(now)
        if self._by_source.get(source, 0) >= self.per_source:
            first = next(e for e in self._open.values() if e.source == source)
            raise Busy(429, "too many open exchanges from this address", first.expires - now)
        if len(self._open) >= self.total:
            first = next(iter(self._open.values()))
            raise Busy(503, "the node has too many open exchanges", first.expires - now)
        ex = Exchange(secrets.token_urlsafe(32), source, workstation, now + self.ttl)
        self._open[ex.id] = ex
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return ex

    def drop(self, exchange_id: str) -> None:
        self._remove(exchange_id)

    def take(self, exchange_id: str, source: str, now: float) -> Exchange | None:
        """The exchange, removed (single use); None if unknown, unready, expired, or started
        from another source (which does not use it up)."""
        ex = self._open.get(exchange_id)
        if ex is None or ex.source != source or ex.keys is None:
            return None
        self._remove(exchange_id)
        return ex if now < ex.expires else None

    def __len__(self) -> int:
        return len(self._open)


class NotStarted(TerminalError):
    """The service could not start; the message names the cause (the port, or a file) as the
    node's problem shows it (``BootstrapHost.problem``)."""


class Refused(TerminalError):
    """A request refused: HTTP status, error code, one-line message for the client."""

    def __init__(
        self, status: int, code: proto.ErrorCode, message: str, *, retry: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry = retry


def _answer(data: Mapping[str, Any], status: int = 200, retry: float | None = None) -> Reply:
    headers = {"Cache-Control": "no-store"}
    if retry is not None:
        headers["Retry-After"] = str(retry_after(retry))
    return Reply(dict(data), status, headers)


def _refusal(exc: Refused) -> Reply:
    return _answer({"error": exc.code.value, "message": exc.message}, exc.status, exc.retry)


class BootstrapService:
    """The https bootstrap listener of one node (see the module docstring)."""

    def __init__(
        self,
        *,
        address: str,
        cert_file: Path,
        key_file: Path,
        ca_bundle_pem: bytes,
        server_url: str,
        node_name: str,
        verifier: Mapping[str, Any],
        sign: SignFn,
        withdraw: WithdrawFn | None = None,
        renew: SignFn | None = None,
        port: int = BOOTSTRAP_PORT,
        clock: Clock = time.monotonic,
        wall: WallClock = lambda: dt.datetime.now(dt.UTC),
        limits: Limits | None = None,
        guard: Guard | None = None,
        failures: FailureLog | None = None,
        counted: Callable[[dt.datetime], Awaitable[None]] | None = None,
        key_shared_with: tuple[int, int] | None = None,
        crypto: Crypto,
        finish_deadline: float = FINISH_DEADLINE,
        ca_pin: str = "",
    ) -> None:
        if not server_url.startswith("https://") or not server_url.endswith("/"):
            raise ValueError(f"server_url must be https://HOST:PORT/APP/, got {server_url!r}")
        self.address = address
        self.port = port
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        # The managed server's user (uid, gid) the key may belong to and its group be read by
        # (``nodeagent.plans.Sharing``); None: the agent's alone.
        self.key_shared_with = key_shared_with
        self.server_url = server_url
        self.node_name = node_name
        self.sign = sign
        # The CA key the agent pinned (its agent.toml's ``ca_pin``): a renewed CA certificate
        # the leader signs with (``Signed``) is added to the bundle a workstation is handed
        # only if it is a renewal of this key's certificate in the bundle (``_checked``); ""
        # adds none.
        self.ca_pin = ca_pin
        self.withdraw = withdraw  # None: nothing is withdrawn (as with an older leader)
        self.renew = renew  # None: no renewals (404, as from an older agent)
        self.renewals = Backoff(PER_RENEWAL)  # refused renewals per source
        self.crypto = crypto
        self.finish_deadline = finish_deadline
        self.clock = clock
        self.wall = wall
        self.limits = limits or (guard.limits if guard is not None else Limits())
        self.guard = guard or Guard(self.limits)
        self.failures = failures if failures is not None else FailureLog()
        # The refused starts' log lines: a source's first, then a summary a minute. So are
        # the old clients' requests and the finishes refused before the password is confirmed
        # (anybody on the network can send them too: review s66 logs M2, session 67).
        self.refusals = SampledLog(clock=clock)
        self.old_clients = SampledLog(clock=clock)
        self.finish_refusals = SampledLog(clock=clock)
        # Awaited after a failure is counted, before it is answered: the agent keeps it in its
        # journal, so that its restart gives no guesser a fresh ceiling (BootstrapHost).
        self.counted = counted
        self.exchanges = ExchangeTable(
            self.limits.exchange_ttl, self.limits.open_per_source, self.limits.open_total
        )
        self._pake_slots = asyncio.Semaphore(PAKE_CONCURRENCY)
        self.ca_bundle_pem = b""
        self.set_ca_bundle(ca_bundle_pem)
        self.set_verifier(verifier)
        self._listener: JsonHttpsListener | None = None
        self._ssl: ssl.SSLContext | None = None
        # Why the leader refuses this node (removed, or its certificate revoked), None while
        # it does not: ``set_removed``.
        self.removed: str | None = None
        # The work the requests the stop cut left (``_at_stop``), which ``stop`` waits for
        # until ``_stop_by`` (the loop's clock: ``STOP_WITHDRAW`` after the first was left).
        self._stop_work: set[asyncio.Task[None]] = set()
        self._stop_by: float | None = None

    # --- state the agent may swap while running ---------------------------------------------

    def set_removed(self, why: str | None) -> None:
        """The leader refuses this node as no longer in the cluster (``why``), or accepts it
        again (None). Meanwhile every start and finish is a 503 ``node_removed`` before any
        password is looked at: a removed node is no guess oracle (its guesses would reach no
        schema: the leader refuses its heartbeats) and tells no PC to try later a signature
        that never comes (audit s45rt3 M3)."""
        self.removed = why

    def _check_removed(self) -> None:
        if self.removed is not None:
            raise Refused(
                503,
                proto.ErrorCode.NODE_REMOVED,
                "the cluster's leader no longer accepts this node (removed from the cluster,"
                " or its certificate revoked); enrol at another node of the practice, or ask"
                " the practice IT",
            )

    def set_verifier(self, verifier: Mapping[str, Any]) -> None:
        """Use a new password verifier from now on (ValueError if it is malformed).

        Exchanges already started keep the keys they have; new ones use the new password.
        """
        self._secret = proto.NodePassword.of_verifier(verifier)
        self._blinds: dict[str, str] | None = None  # its SPAKE2 blinding points (``_blinds_of``)

    def set_ca_bundle(self, ca_bundle_pem: bytes) -> None:
        """Hand out this CA bundle from now on (ValueError if it holds no PEM certificate; that
        each one is a CA is checked by ``check_ca_bundle``, in the worker, at ``start``)."""
        if b"-----BEGIN CERTIFICATE-----" not in ca_bundle_pem:
            raise ValueError("ca_bundle_pem must hold one or more CA certificates")
        self.ca_bundle_pem = ca_bundle_pem

    async def check_ca_bundle(self) -> None:
        """ValueError unless every certificate of the bundle is a CA (checked by the worker).

        A worker that fails here does not keep the service closed: the bundle is the node's own
        CA file, which the agent checked when it staged it; a warning, and the service starts."""
        try:
            await self._crypto("check_ca_bundle", {"pem": proto.b64(self.ca_bundle_pem)})
        except proto.BootstrapError as exc:
            raise ValueError(f"ca_bundle_pem must hold only CA certificates: {exc}") from None
        except WorkerFailed:
            log.warning(
                "bootstrap.ca_bundle_unchecked",
                node=self.node_name,
                detail="the crypto worker could not check the CA bundle now; it is checked at "
                "its use",
            )

    @property
    def hello(self) -> proto.Hello:
        return proto.Hello(
            node=self.node_name,
            server_url=self.server_url,
            ca_bundle_pem=self.ca_bundle_pem,
            kdf=self._secret.kdf,
            exchange_ttl=int(self.limits.exchange_ttl),
        )

    def reload_certificate(self) -> None:
        """Serve the (renewed) certificate and key files to new connections."""
        check_private_file(self.key_file, shared=self.key_shared_with)
        if self._ssl is not None:
            self._ssl.load_cert_chain(self.cert_file, self.key_file)

    # --- lifecycle ----------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        check_private_file(self.key_file, shared=self.key_shared_with)
        return server_context(self.cert_file, self.key_file)

    def listener(self) -> JsonHttpsListener:
        routes = {
            ("GET", proto.HELLO_PATH): self.get_hello,
            ("POST", proto.START_PATH): self.post_start,
            ("POST", proto.FINISH_PATH): self.post_finish,
            ("GET", proto.V1_BOOTSTRAP_PATH): self.old_client,
            ("POST", proto.V1_ENROL_PATH): self.old_client,
        }
        if self.renew is not None:
            routes[("POST", proto.RENEW_PATH)] = self.post_renew
        limits = HttpLimits(max_body=proto.MAX_REQUEST_BYTES)
        return JsonHttpsListener(
            routes, limits, shutdown_timeout=SHUTDOWN_TIMEOUT, clock=self.clock
        )

    async def start(self) -> None:
        """Listen on https://address:port. ``NotStarted`` naming the cause if the port is held
        or the certificate or key file cannot be used; UnsafePermissions (its words name the
        file) if others may read the key file (the managed server's user may own it, its group
        read it: ``plans.Sharing``); ValueError if the CA bundle holds a certificate that is no CA.

        The port is taken first, the files read next, and the crypto worker asked last: a
        port another program holds costs the agent's retries (``BootstrapHost``) a bind a
        try, not a start of the worker's child (review s44rev2 M1: one a minute)."""
        if self._listener is not None:
            raise RuntimeError("bootstrap service already started")
        listener = self.listener()
        try:
            self.port = await listener.bind(self.address, self.port)
        except OSError as exc:
            raise NotStarted(f"port {self.port}: {os_error_text(exc)}") from None
        try:
            try:  # reads the key and certificate (UnsafePermissions: its words name the file)
                self._ssl = await asyncio.to_thread(self._tls_context)
            except (OSError, ValueError) as exc:  # (ssl.SSLError: an OSError without a path)
                raise NotStarted(
                    f"certificate {self.cert_file} or key {self.key_file}: {exc}"
                ) from None
            await self.check_ca_bundle()
            try:  # the password's blinding points now, not at a stranger's request
                await self._blinds_of(self._secret)
            except WorkerFailed:
                log.warning(
                    "bootstrap.blinds_deferred",
                    node=self.node_name,
                    detail="the crypto worker could not prepare the password ahead; it is done "
                    "at the first PC's request",
                )
            try:
                await listener.start(self.address, self.port, self._ssl)
            except OSError as exc:  # (another program took the port since the bind, binding
                # with SO_REUSEADDR while it was not listening yet: review s44rev5 L3)
                raise NotStarted(f"port {self.port}: {os_error_text(exc)}") from None
        except BaseException:
            await listener.stop()  # the port given up
            raise
        self._listener = listener
        log.info("bootstrap.started", address=self.address, port=self.port, node=self.node_name)

    async def stop(self) -> None:
        """Stop listening: requests being answered get ``SHUTDOWN_TIMEOUT`` seconds, then they
        are cancelled; the work they leave (a signing's answer, a withdrawal: ``_at_stop``) is
        waited for until ``STOP_WITHDRAW`` after that, then cancelled (each says what it cut)."""
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.stop()
            log.info("bootstrap.stopped", address=self.address, port=self.port)
        work, by = set(self._stop_work), self._stop_by
        self._stop_by = None
        if not work or by is None:
            return
        try:
            await asyncio.wait(work, timeout=max(0.0, by - asyncio.get_running_loop().time()))
        finally:
            for task in work:
                task.cancel()
            await asyncio.wait(work, timeout=STOP_CUT)

    def _at_stop(self, work: Coroutine[Any, Any, None]) -> None:
        """A request the agent's stop cancels leaves ``work`` that must not be cut with it (a
        certificate the leader signed for no one is withdrawn): run apart from the request, and
        waited for by ``stop`` (``STOP_WITHDRAW`` from the first such work, in all)."""
        loop = asyncio.get_running_loop()
        if self._stop_by is None:
            self._stop_by = loop.time() + STOP_WITHDRAW
        task = loop.create_task(work, name="bootstrap-stop-work")
        self._stop_work.add(task)
        task.add_done_callback(self._stop_work.discard)

    @property
    def bound_port(self) -> int:
        """The port listened on (after ``start``, the one bound when ``port`` was 0)."""
        return self.port

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- handlers -----------------------------------------------------------------------------

    async def get_hello(self, request: Request) -> Reply:
        return _answer(self.hello.to_json())

    async def old_client(self, request: Request) -> Reply:
        # Sampled per source, by path (two fixed ones): anybody may ask (session 67).
        if self.old_clients.first(source_key(request.remote), request.path):
            log.info("bootstrap.old_client", remote=request.remote, path=request.path)
        if (summary := self.old_clients.summary()) is not None:
            log.info("bootstrap.old_clients_summary", **summary.fields())
        answer = proto.upgrade_answer()
        if request.method in ("GET", "HEAD"):  # what a v1 client reads: its version check
            return _answer(answer)
        return _answer({k: answer[k] for k in ("error", "message")}, 410)

    async def post_start(self, request: Request) -> Reply:
        source = source_key(request.remote)
        try:
            self._check_removed()
            try:
                start = proto.parse_start_request(request.body)
            except proto.BootstrapError as exc:
                raise Refused(400, proto.ErrorCode.BAD_REQUEST, str(exc)) from None
            try:
                answer = await self._start(source, start, request.remote)
            except WorkerFailed:
                raise _busy() from None
        except Refused as exc:
            # Sampled per source: anybody on the network can send these, as fast as the node
            # answers (review s66 logs M2; ``tlsroll.logsample``).
            if self.refusals.first(source, exc.code.value):
                log.warning(
                    "bootstrap.start_refused",
                    remote=request.remote,
                    reason=exc.code.value,
                    retry_after=None if exc.retry is None else retry_after(exc.retry),
                    detail="a PC's Test connection was refused at its start; the reason says why"
                    " (sampled per source)",
                )
            if (summary := self.refusals.summary()) is not None:
                log.warning(
                    "bootstrap.starts_refused_summary",
                    **summary.fields(),
                    detail="starts refused in that time, not logged one by one",
                )
            return _refusal(exc)
        log.info("bootstrap.exchange_started", remote=request.remote, workstation=start.workstation)
        return _answer(answer.to_json())

    def _check_guard(self, source: str, workstation: str, now: float) -> None:
        """Refused(429) while the source, the name, the node or the ceiling must wait."""
        wait = self.guard.wait(source, workstation, now)
        if wait > 0:
            raise Refused(
                429,
                proto.ErrorCode.RATE_LIMITED,
                f"too many failed attempts; try again in {retry_after(wait)} s",
                retry=wait,
            )

    async def _start(
        self, source: str, start: proto.StartRequest, remote: str | None = None
    ) -> proto.StartAnswer:
        now = self.clock()
        self._check_guard(source, start.workstation, now)
        try:
            ex = self.exchanges.reserve(source, start.workstation, now)
        except Busy as exc:
            raise Refused(exc.status, proto.ErrorCode.BUSY, str(exc), retry=exc.retry) from None
        secret, hello = self._secret, self.hello
        try:
            # Its shape here: a malformed message costs no worker round trip (review s41 Low 6).
            proto.check_message(start.msg_a, b"A")
            async with self._pake_slots:
                request = {
                    "pake_pw": proto.b64(secret.pake_pw),
                    **await self._blinds_of(secret),
                    "msg_a": proto.b64(start.msg_a),
                }
                answer = await self._crypto("respond", request)
            msg_b = _worker_bytes(answer, "msg_b")
            shared = _worker_bytes(answer, "key")
        except proto.BootstrapError as exc:
            self.exchanges.drop(ex.id)
            # Counted as a wrong password is (its source's, its name's and the node's backoff,
            # the failures the leader hears of): dropped at once, such a start held no open
            # exchange, and one source could keep the crypto worker busy with invalid points
            # (only PAKE_CONCURRENCY bounded it: session 70). No workstation sends one.
            when, count = self._count_failure(source, start.workstation)
            log.warning(
                "bootstrap.start_malformed",
                remote=remote,
                workstation=start.workstation,
                failures=count,
                detail=str(exc)[:200],
                hint="a client that is no tlsroll workstation, or a broken one, sent it: "
                "counted as a wrong password for its address (the usual backoff)",
            )
            if self.counted is not None:
                await self.counted(when)
            raise Refused(400, proto.ErrorCode.BAD_REQUEST, str(exc)) from None
        except BaseException:
            self.exchanges.drop(ex.id)
            raise
        t = proto.transcript(hello, ex.id, start.workstation, start.msg_a, msg_b)
        ex.keys = proto.SessionKeys.derive(shared, t)
        expires_in = max(1, int(ex.expires - self.clock()))
        return proto.StartAnswer(exchange=ex.id, msg_b=msg_b, expires_in=expires_in)

    async def post_finish(self, request: Request) -> Reply:
        source = source_key(request.remote)
        # (the loop's clock, not ``clock``: it times the worker's calls, as the client's does)
        deadline = asyncio.get_running_loop().time() + self.finish_deadline
        confirmed = False  # the password: until then anybody may have sent it
        try:
            self._check_removed()
            try:
                finish = proto.parse_finish_request(request.body)
            except proto.BootstrapError as exc:
                raise Refused(400, proto.ErrorCode.BAD_REQUEST, str(exc)) from None
            now = self.clock()
            ex = self.exchanges.take(finish.exchange, source, now)
            if ex is None:
                raise Refused(
                    410,
                    proto.ErrorCode.EXCHANGE_EXPIRED,
                    "exchange unknown, used or expired; start again",
                )
            assert ex.keys is not None
            # The limits again (no await from here until a failure is counted): exchanges
            # opened in advance must not spend several confirmations in one allowance.
            self._check_guard(ex.source, ex.workstation, now)
            if not ex.keys.check_confirmation(proto.Side.WORKSTATION, finish.confirm):
                when = self._failed(request, ex)
                if self.counted is not None:
                    await self.counted(when)
                raise Refused(
                    401,
                    proto.ErrorCode.WRONG_PASSWORD,
                    "wrong password (a changed password takes effect when the server restarts)",
                )
            confirmed = True
            self.guard.succeeded(ex.source, ex.workstation)
            try:
                enrolled, cn, key_pin = await self._enrol(request, ex, finish)
            except WorkerFailed:  # the password was right: nothing counted, try again later
                raise _busy() from None
            signed, ca_pem = enrolled
            sealed = await self._signed_delivery(
                request, ex, signed, cn, key_pin, deadline, ca_pem=ca_pem
            )
        except Refused as exc:
            # A wrong password has its own line (``_failed``). A refusal before the password is
            # confirmed (a bad body, an exchange unknown or expired, a source told to wait, the
            # node removed) anybody may send as fast as the node answers: sampled per source as
            # the starts are (session 67). One after it is a workstation's that knew it: each.
            if exc.code is not proto.ErrorCode.WRONG_PASSWORD and (
                confirmed or self.finish_refusals.first(source, exc.code.value)
            ):
                log.warning(
                    "bootstrap.finish_refused",
                    remote=request.remote,
                    reason=exc.code.value,
                    status=exc.status,
                    retry_after=None if exc.retry is None else retry_after(exc.retry),
                    detail="a PC's enrolment was refused at its finish; the reason says why "
                    "(sampled per source)",
                )
            if not confirmed and (summary := self.finish_refusals.summary()) is not None:
                log.warning(
                    "bootstrap.finishes_refused_summary",
                    **summary.fields(),
                    detail="finishes refused in that time, not logged one by one",
                )
            return _refusal(exc)
        answer = proto.FinishAnswer(confirm=ex.keys.confirmation(proto.Side.NODE), payload=sealed)
        return _answer(answer.to_json())

    async def post_renew(self, request: Request) -> Reply:
        """A workstation's renewal (``tlsroll client renew``; see the module docstring): the
        renewed certificate, checked to be for the CSR's key, and the CA bundle to hand out
        with it (``_checked``), or a refusal in one line. What the leader signed and this
        service could not check is withdrawn; a renewal whose answer was lost is asked again
        by the PC with the certificate it still holds (the leader allows that for minutes)."""
        source = source_key(request.remote)
        try:
            self._check_removed()
            assert self.renew is not None
            wait = self.renewals.wait(source, self.clock())
            if wait > 0:
                raise Refused(
                    429,
                    proto.ErrorCode.RATE_LIMITED,
                    f"too many refused renewals; try again in {retry_after(wait)} s",
                    retry=wait,
                )
            try:
                renewal = proto.parse_renew_request(request.body)
                csr = await self._crypto(
                    "renewal_csr",
                    {
                        "csr_pem": proto.b64(renewal.csr_pem),
                        "bundle": proto.b64(self.ca_bundle_pem),
                    },
                )
            except proto.BootstrapError as exc:
                self.renewals.failed(source, self.clock())
                raise Refused(422, proto.ErrorCode.BAD_CSR, str(exc)) from None
            except WorkerFailed:
                raise _busy() from None
            cn, key_pin = csr.get("cn"), csr.get("key_pin")
            if not isinstance(cn, str) or not isinstance(key_pin, str):
                raise _busy()
            signed = await self._renewed(source, renewal.csr_pem)
            try:
                pem, bundle = await self._checked(
                    request,
                    signed.certificate_pem,
                    cn,
                    key_pin,
                    signed.ca_certificate_pem,
                    renewal=True,
                )
            except (Refused, WorkerFailed, proto.BootstrapError) as exc:
                await self._withdraw(request, cn, signed.certificate_pem)
                raise exc if isinstance(exc, Refused) else _busy() from None
        except Refused as exc:
            # Sampled per source: anybody on the network can send these (as the starts).
            if self.refusals.first(source, f"renew:{exc.code.value}"):
                log.warning(
                    "bootstrap.renew_refused",
                    remote=request.remote,
                    reason=exc.code.value,
                    message=exc.message[:300],
                    detail="a PC's renewal (tlsroll client renew) was refused; the message says "
                    "why (sampled per source)",
                )
            return _refusal(exc)
        return _answer(proto.RenewAnswer(pem, bundle).to_json())

    async def _renewed(self, source: str, csr_pem: bytes) -> Signed:
        """The leader's renewal of ``csr_pem`` (``renew``); Refused in one line if it said no
        (403, counted against ``source``; 429 with when: a forced renewal before its name's
        budget allows, or an older leader's hourly cap), or could not be asked
        (502, not counted)."""
        assert self.renew is not None
        try:
            return _as_signed(await self.renew(csr_pem))
        except TerminalError as exc:
            self._check_removed()
            if not getattr(exc, "refused", False):
                raise Refused(
                    502, proto.ErrorCode.SIGN_FAILED, "the CA did not sign; try later"
                ) from None
            retry = getattr(exc, "retry", None)
            if retry is not None:
                raise Refused(429, proto.ErrorCode.SIGN_FAILED, str(exc), retry=retry) from None
            self.renewals.failed(source, self.clock())
            raise Refused(403, proto.ErrorCode.RENEW_REFUSED, str(exc)) from None
        except Exception as exc:  # whatever the CA path raises, the client gets one answer
            log.error(
                "bootstrap.sign_failed",
                error=type(exc).__name__,
                detail="the leader did not renew the PC's certificate; the PC is told to try later",
            )
            raise Refused(
                502, proto.ErrorCode.SIGN_FAILED, "the CA did not sign; try later"
            ) from None

    async def _signed_delivery(
        self,
        request: Request,
        ex: Exchange,
        signed: bytes,
        cn: str,
        key_pin: str,
        deadline: float,
        *,
        ca_pem: bytes = b"",
    ) -> str:
        """The payload for the workstation with the certificate the leader ``signed`` (and the
        CA certificate it was issued under, ``ca_pem``: see ``_checked``), checked
        and sealed (by the worker; each op tried twice: ``_signed_crypto``) by ``deadline``
        (the loop's clock: ``FINISH_DEADLINE`` after the request came, while the workstation
        still waits). If that fails, or takes longer, the leader has recorded a certificate
        that holds the name ``cn`` and that the workstation never gets: it is withdrawn
        (``withdraw``) before the refusal is answered, so that the workstation's next try, with
        a new key, is signed (session 43). So it is if the service stops meanwhile (this
        request cancelled): withdrawn by the service's stop (``_at_stop``), and the
        cancellation goes on. Only the certificate this exchange was given is named: a leaked
        password's enrolment cannot make the node withdraw a working certificate."""
        try:
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError  # signed that late: a sound child is not killed for nothing
            async with asyncio.timeout_at(deadline):
                checked, bundle = await self._checked(request, signed, cn, key_pin, ca_pem)
                return await self._deliver(ex, checked, bundle)
        except asyncio.CancelledError:  # the service stops: the workstation gets nothing
            log.warning(
                "bootstrap.undelivered_stopping",
                remote=request.remote,
                cn=cn,
                detail="the service stopped before the PC got its certificate; the PC enrols again",
            )
            self._at_stop(self._withdrawn_at_stop(request, cn, signed))
            raise
        except (WorkerFailed, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):  # (the worker's call cancelled: its child killed)
                log.error(
                    "bootstrap.delivery_late",
                    remote=request.remote,
                    cn=cn,
                    deadline=self.finish_deadline,
                    hint="the node was too slow to seal the signed certificate in time (a loaded "
                    "machine or a hung crypto worker): it was withdrawn and the PC told to try "
                    "again; if this repeats, check the node's load and restart tlsroll-agent",
                )
            withdrawn = await self._withdraw(request, cn, signed)
            if withdrawn is Withdrawal.WITHDRAWN:  # the name is free again: the next try is signed
                raise _busy() from None
            if withdrawn is Withdrawal.REVOKED:  # not busy, nor the name held (s44)
                # (The code stays SIGN_FAILED, which PCs of every release handle; the words say
                # that the signing went through and the delivery did not: review s44rev3 L4.)
                raise Refused(
                    502,
                    proto.ErrorCode.SIGN_FAILED,
                    f"the CA signed a certificate for {cn}, but the node could not deliver it, "
                    "and an admin has revoked it since (tlsroll workstations revoke, or ca "
                    "revoke): ask the admin whether this PC is to be enrolled; if so, run again",
                ) from None
            raise Refused(
                503,
                proto.ErrorCode.BUSY,
                f"the node could not deliver the certificate the CA signed for {cn}, nor "
                "withdraw it: a new try is refused as the name taken until the admin frees it "
                f"(tlsroll workstations revoke {cn}), or run again at this node with --replace",
                retry=WORKER_RETRY,
            ) from None
        except Refused:  # not the certificate asked for: withdrawn all the same
            await self._withdraw(request, cn, signed)
            raise
        except proto.BootstrapError:  # the worker would not seal it (not seen so far)
            await self._withdraw(request, cn, signed)
            log.error(
                "bootstrap.seal_refused",
                remote=request.remote,
                detail="the crypto worker would not seal the signed certificate; it was "
                "withdrawn and the PC told to try later",
            )
            raise Refused(
                502, proto.ErrorCode.SIGN_FAILED, "the node could not seal the answer"
            ) from None

    async def _withdraw(self, request: Request, cn: str, signed: bytes) -> Withdrawal:
        """``withdraw`` the certificate ``signed`` for ``cn``: what the leader did (HELD
        without ``withdraw``, or if it failed: logged). The call is not cut short by a
        cancellation (the service stopping while it runs): the service's stop waits for it
        (``_at_stop``), and the cancellation goes on."""
        if self.withdraw is None:
            return Withdrawal.HELD
        asking = asyncio.ensure_future(self._ask_withdraw(request, cn, signed))
        try:
            return await asyncio.shield(asking)
        except asyncio.CancelledError:
            self._at_stop(_asked_at_stop(asking, request))
            raise

    async def _withdrawn_at_stop(self, request: Request, cn: str, signed: bytes) -> None:
        """(Stop-time work: ``_at_stop``.) ``_withdraw`` the certificate ``signed`` for ``cn``,
        which no one will receive; cancelled by the stop's bound, said in the log."""
        if self.withdraw is not None:
            await _asked_at_stop(self._ask_withdraw(request, cn, signed), request)

    async def _ask_withdraw(self, request: Request, cn: str, signed: bytes) -> Withdrawal:
        try:
            withdrawn = await self.withdraw(signed) if self.withdraw is not None else None
        except Exception as exc:  # whatever the leader path raises: the name stays held
            log.error(
                "bootstrap.withdraw_failed",
                remote=request.remote,
                error=type(exc).__name__,
                hint="the name stays held by an undelivered certificate: tlsroll workstations "
                "revoke NAME frees it",
            )
            return Withdrawal.HELD
        if withdrawn is Withdrawal.WITHDRAWN:
            log.warning(
                "bootstrap.undelivered_withdrawn",
                remote=request.remote,
                cn=cn,
                detail="the PC's certificate could not be delivered and was withdrawn; the PC "
                "enrols again",
            )
        return withdrawn or Withdrawal.HELD

    async def _deliver(self, ex: Exchange, cert_pem: bytes, bundle: bytes) -> str:
        """The payload for the workstation, sealed to it (by the worker): ``bundle`` is the CA
        bundle it is handed (``_checked``). The seal (AES-256-GCM under the exchange's key,
        over its transcript) covers the whole payload, so the workstation takes that bundle,
        a renewed CA certificate added to it included, as confirmed by the password; the
        hello's (unsealed, in the transcript) stays the staged file."""
        assert ex.keys is not None
        payload = proto.Payload(
            ca_bundle_pem=bundle,
            certificate_pem=cert_pem,
            node=self.node_name,
            server_url=self.server_url,
        )
        request = {
            "key": proto.b64(ex.keys.seal_to[proto.Side.WORKSTATION]),
            "transcript": proto.b64(ex.keys.transcript),
            "plaintext": proto.b64(payload.to_bytes()),
        }
        sealed = (await self._signed_crypto("seal", request)).get("sealed")
        if not isinstance(sealed, str):
            raise WorkerFailed("the crypto worker's answer has no sealed payload")
        return sealed

    def _failed(self, request: Request, ex: Exchange) -> dt.datetime:
        """Count a wrong password (in memory, at once); returns when."""
        when, count = self._count_failure(ex.source, ex.workstation)
        log.warning(
            "bootstrap.password_refused",
            remote=request.remote,
            workstation=ex.workstation,
            failures=count,
            hint="a PC gave a wrong bootstrap password: check it uses the current one; many from"
            " one address may be a guesser",
        )
        return when

    def _count_failure(self, source: str, workstation: str) -> tuple[dt.datetime, int]:
        """Count a failure of ``source`` claiming ``workstation`` (the guard's backoffs and
        ceiling, the failures the leader hears of: ``FailureLog``); when, and the source's
        failures so far."""
        count = self.guard.failed(source, workstation, self.clock())
        when = self.wall()
        self.failures.record(source, workstation, when)
        return when, count

    async def _enrol(
        self, request: Request, ex: Exchange, finish: proto.FinishRequest
    ) -> tuple[Signed, str, str]:
        """The workstation's CSR opened and checked, and signed by the leader: the certificate
        and the CA certificate it was issued under (PEM, not yet checked), the name and the
        CSR key's pin."""
        assert ex.keys is not None
        opened = {
            "key": proto.b64(ex.keys.seal_to[proto.Side.NODE]),
            "transcript": proto.b64(ex.keys.transcript),
            "sealed": finish.csr,
        }
        try:
            csr = await self._crypto("open_csr", opened)
        except proto.BootstrapError as exc:
            raise Refused(422, proto.ErrorCode.BAD_CSR, str(exc)) from None
        csr_pem, cn, key_pin = _worker_bytes(csr, "csr_pem"), csr.get("cn"), csr.get("key_pin")
        if not isinstance(cn, str) or not isinstance(key_pin, str):
            raise WorkerFailed("the crypto worker's answer has no cn or key pin")
        if cn != ex.workstation:
            raise Refused(
                422, proto.ErrorCode.BAD_CSR, f"the CSR names {cn}, the exchange {ex.workstation}"
            )
        signing = asyncio.ensure_future(self.sign(csr_pem))
        try:
            signed = await asyncio.shield(signing)
        except asyncio.CancelledError:  # the service stops while the leader signs
            log.warning(
                "bootstrap.signing_stopping",
                remote=request.remote,
                cn=cn,
                detail="the service stopped while the leader signed; the PC gets nothing and "
                "enrols again",
            )
            self._at_stop(self._signing_stopped(request, cn, signing))
            raise
        except TerminalError as exc:
            # Refused as no longer in the cluster (the host's ``set_removed``, as it raised):
            # the 503 "removed" every start and finish gets now, not a 502 "try later".
            self._check_removed()
            if not getattr(exc, "refused", False):
                raise Refused(
                    502, proto.ErrorCode.SIGN_FAILED, "the CA did not sign; try later"
                ) from None
            # The cluster said no for a reason the workstation's admin can act on (the name is
            # another workstation's): say it, rather than "try later".
            log.warning(
                "bootstrap.sign_refused",
                remote=request.remote,
                cn=cn,
                hint="the PC's name is another workstation's: tlsroll workstations list shows it"
                " (workstations revoke frees it)",
            )
            retry = getattr(exc, "retry", None)
            if retry is not None:  # this node's hour's cap: 429, and when (review s64 M3)
                raise Refused(429, proto.ErrorCode.SIGN_FAILED, str(exc), retry=retry) from None
            raise Refused(409, proto.ErrorCode.SIGN_FAILED, str(exc)) from None
        except Exception as exc:  # whatever the CA path raises, the client gets one answer
            log.error(
                "bootstrap.sign_failed",
                remote=request.remote,
                error=type(exc).__name__,
                detail="the leader did not sign the PC's certificate; the PC is told to try later",
            )
            raise Refused(
                502, proto.ErrorCode.SIGN_FAILED, "the CA did not sign; try later"
            ) from None
        return _as_signed(signed), cn, key_pin

    async def _signing_stopped(
        self, request: Request, cn: str, signing: asyncio.Future[bytes | Signed]
    ) -> None:
        """(Stop-time work: ``_at_stop``.) The service stops (its request cancelled) while the
        leader signs: the leader may record a certificate for ``cn`` that no one will receive,
        which held the name (the workstation's next try refused as a name taken until the
        admin freed it) with nothing said (session 43's "agent stopping during signing"). The
        signing's answer is awaited, and what it signed withdrawn, within the stop's bound
        (``STOP_WITHDRAW``); a signing still unanswered then is cancelled, said in the log with
        the name it may hold."""
        try:
            signed = await signing
        except asyncio.CancelledError:
            log.error(
                "bootstrap.signing_cut",
                remote=request.remote,
                cn=cn,
                why="the service stopped before the leader answered: a certificate it signed "
                f"may hold the name (tlsroll workstations revoke {cn} frees it)",
                hint="run the command in why if the PC's next enrolment is refused for its name",
            )
            raise
        except Exception:  # not signed (the leader said no, or could not be asked)
            return
        await self._withdrawn_at_stop(request, cn, _as_signed(signed).certificate_pem)

    async def _checked(
        self,
        request: Request,
        signed: bytes,
        cn: str,
        key_pin: str,
        ca_pem: bytes = b"",
        *,
        renewal: bool = False,
    ) -> tuple[bytes, bytes]:
        """The certificate the leader ``signed``, checked (by the worker) to be for the CSR's
        key: its PEM, and the CA bundle to hand the workstation with it; logged (info) once it is,
        as enrolled or (``renewal``) renewed.

        That bundle is the staged one, with ``ca_pem`` (the CA certificate the leader issued
        under) added if it is not in it and the worker finds it a renewal with the same key
        of the pinned key's certificate in it (``pki.renewed_ca_problem``, the agent's own
        check of a renewed CA: review s48rev1 H1). So a workstation set up between ``tlsroll
        ca renew`` and its node's rotate-cert rollout trusts CA1' as well as CA1, and works
        past CA1's end with its 397-day certificate. One that is refused is said in the log
        (``bootstrap.ca_refused``) and the staged bundle handed out, as before."""
        facts: dict[str, str] = {"pem": proto.b64(signed)}
        if ca_pem and self.ca_pin:
            facts |= {
                "ca_pem": proto.b64(ca_pem),
                "bundle": proto.b64(self.ca_bundle_pem),
                "ca_pin": self.ca_pin,
            }
        try:
            cert = await self._signed_crypto("cert_facts", facts)
        except proto.BootstrapError:  # what the leader returned does not parse
            log.error(
                "bootstrap.sign_failed",
                remote=request.remote,
                error="PKIError",
                detail="the leader did not sign the PC's certificate; the PC is told to try later",
            )
            raise Refused(
                502, proto.ErrorCode.SIGN_FAILED, "the CA did not sign; try later"
            ) from None
        if cert.get("spki_pin") != key_pin:
            log.error(
                "bootstrap.sign_failed",
                remote=request.remote,
                error="key mismatch",
                detail="the leader did not sign the PC's certificate; the PC is told to try later",
            )
            raise Refused(502, proto.ErrorCode.SIGN_FAILED, "the CA returned a wrong certificate")
        fingerprint = str(cert.get("fingerprint"))
        if renewal:
            log.info("bootstrap.renewed", remote=request.remote, cn=cn, fingerprint=fingerprint)
        else:
            log.info("bootstrap.enrolled", remote=request.remote, cn=cn, fingerprint=fingerprint)
        if isinstance(refused := cert.get("ca_refused"), str):
            log.warning(
                "bootstrap.ca_refused",
                remote=request.remote,
                reason=refused[:300],
                detail="the CA certificate the leader signed with was not added to the bundle "
                "the PC gets (the reason says why); the bundle staged before is handed "
                "out",
            )
        bundle = _worker_bytes(cert, "bundle") if cert.get("bundle") else self.ca_bundle_pem
        return _worker_bytes(cert, "pem"), bundle

    async def _blinds_of(self, secret: proto.NodePassword) -> dict[str, str]:
        """The SPAKE2 blinding points of ``secret`` ({"blind", "unblind"}, base64), asked of the
        worker once per verifier (``bootstrap_crypto.blinds``): at ``start``, or at the first
        exchange if the worker failed then. Their making takes a time that depends on the
        password; an exchange then only decodes them (``tlsroll.bootstrap_pake.node_respond``)."""
        if self._blinds is not None and self._secret is secret:
            return self._blinds
        answer = await self._crypto("blinds", {"pake_pw": proto.b64(secret.pake_pw)})
        made = {k: proto.b64(_worker_bytes(answer, k)) for k in ("blind", "unblind")}
        if self._secret is secret:  # (not replaced meanwhile)
            self._blinds = made
        return made

    async def _signed_crypto(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """``_crypto`` for the work after the leader signed (``cert_facts``, ``seal``), tried a
        second time if the worker failed (the next call starts a new child; the exchange is
        still held). The leader has recorded the certificate for the workstation's name by
        then, and the client makes a new key each run: a 503 here sends it back to be refused
        as a name taken (review s41 M2). WorkerFailed only if both fail."""
        try:
            return await self._crypto(op, request)
        except WorkerFailed:
            log.warning(
                "bootstrap.worker_retry",
                op=op,
                detail="the crypto worker failed once; the operation is tried again with a new "
                "worker",
            )
        return await self._crypto(op, request)

    async def _crypto(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """``bootstrap_crypto.OPS[op](request)`` in the worker: its answer; the peer's refusal
        it carries as ``BootstrapError``; WorkerFailed if the worker failed. The request and
        the answer hold secrets: neither is ever logged, nor put in an error."""
        try:
            answer = await self.crypto.call(f"bootstrap.{op}", request)
        except Exception as exc:  # killed, hung, not startable, or its bug: one answer
            # (the worker's own errors name what failed, never a request's values)
            detail = peertext.clean(str(exc), 200) if isinstance(exc, TlsrollError) else None
            log.error("bootstrap.worker_failed", op=op, error=type(exc).__name__, detail=detail)
            raise WorkerFailed(f"the crypto worker failed ({op})") from None
        refused = bootstrap_crypto.refusal(answer)
        if refused is not None:
            raise refused
        if not isinstance(answer, dict):
            log.error(
                "bootstrap.worker_failed",
                op=op,
                error="not an object",
                hint="a bug in tlsroll: report it with the lines before this one",
            )
            raise WorkerFailed(f"the crypto worker's answer to {op} is not an object")
        return answer
