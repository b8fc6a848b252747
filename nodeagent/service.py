"""The agent's gRPC servicer (NodeAgent), served over mutual TLS to the leader only.

Every command is checked in the same order: the caller is the leader, the epoch is not stale,
then the step runs; each step is keyed by (rollout id, step) in the journal so a replay
returns what was recorded and does nothing twice. The servicer checks and converts; plans are
made in ``nodeagent.plans`` and carried out by ``nodeagent.transaction``. Blocking work (the
journal, files, keys) runs in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import datetime as dt
import os
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from nodeagent import fsbound, plans, ports, transaction
from nodeagent.certwork import names_request
from nodeagent.config import AgentConfig
from nodeagent.cryptoworker import InProcess, Worker
from nodeagent.drivers import Driver, DriverError, ServerFacts, config_stat
from nodeagent.identity import Identity
from nodeagent.journal import Journal, JournalError, JournalUnavailable, Outlook, Staged, Txn
from nodeagent.leader_link import RESTART_VIEW_WAIT
from nodeagent.lease import Lease, Leases
from nodeagent.plans import Built, PlanRefused
from nodeagent.transaction import (
    DRAIN_TIMEOUT,
    UNFREEZE_BACKOFF,
    Phase,
    Runner,
    Staging,
    describe,
    next_action,
    worth_logging,
)
from nodeagent.trust import EpochNotAnnounced, LeaderTrust, NotTheLeader, Revoked
from nodeagent.wire import CHANGE, TXN_KIND, TXN_OUTCOME, TXN_PHASE
from tlsroll import (
    __version__,
    clocks,
    dbthread,
    features,
    httpcheck,
    logs,
    password,
    probe,
    room,
    tls,
)
from tlsroll.clients import ClientsView, quiet_refusal
from tlsroll.defaults import MAX_FREEZE_LEASE
from tlsroll.enums import (
    CONFIG_UNREADABLE,
    NEEDS_ADMIN,
    SERVER_NOT_HEALTHY,
    SERVER_RESTARTING,
    Change,
    TxnKind,
    another_switch,
    of_server,
)
from tlsroll.errors import ConfigError, NotRegularFile, PKIError, PKIReason
from tlsroll.fsutil import config_dir_problem, config_link_problem, read_regular
from tlsroll.rpc import (
    BEING_RECEIVED,
    RpcStatusError,
    error_status,
    failed_precondition,
    invalid,
    map_errors,
    map_stream_errors,
    not_found,
    peer,
    timestamp,
    unauthenticated,
)
from tlsroll.v1 import agent_pb2, agent_pb2_grpc, leader_pb2, types_pb2
from tlsroll.wire import WireError, clients_message

Ctx = grpc.aio.ServicerContext[Any, Any]
ERRORS: dict[type[BaseException], grpc.StatusCode] = {
    PKIError: grpc.StatusCode.INVALID_ARGUMENT,
    DriverError: grpc.StatusCode.FAILED_PRECONDITION,
    PlanRefused: grpc.StatusCode.FAILED_PRECONDITION,
    NotTheLeader: grpc.StatusCode.PERMISSION_DENIED,
    Revoked: grpc.StatusCode.UNAUTHENTICATED,
    EpochNotAnnounced: grpc.StatusCode.PERMISSION_DENIED,
    # A journal read that failed for a moment (locked, an I/O error): no refusal, asked again
    # (a damaged journal, any other ``JournalError``, stays FAILED_PRECONDITION).
    JournalUnavailable: grpc.StatusCode.UNAVAILABLE,
}
# A full disk on the node (ENOSPC, EDQUOT, SQLITE_FULL): RESOURCE_EXHAUSTED "disk full: CAUSE"
# (``tlsroll.rpc.DISK_FULL``), which the leader tells from an agent it cannot reach (UNAVAILABLE,
# as any other disk trouble still is) and retries all the same (``leader.agent_client``).
FULL_DISK = grpc.StatusCode.RESOURCE_EXHAUSTED
# What a Preflight, CreateCSR or Stage begins (``_command``'s ``begins``): no transaction, so
# never the one a node holds (``_refuse_if_held``).
PREPARES = "prepare"
ROLLOUT_ID = plans.ROLLOUT_ID
DEFAULT_MAX_CLOCK_OFFSET = 120
DEFAULT_FREEZE_LEASE = 300
LEASE_CHECK_SECONDS = 1.0
WATCH_RECHECK_SECONDS = 5.0  # WatchTransaction reads the journal again at least this often
# A restart of the agent's own is said as "restarting" (not "down") in heartbeats for this long
# from its beginning (``server_view``); past it, or once it failed, the server as it is.
RESTARTING_SAID = 30.0
# A sweep of the stage directories that did not do all it meant to is tried again after this
# many seconds, twice as long after each failure, at most this many times (``_swept``: 2 s
# to 256 s, eight and a half minutes in all), then left to the next transaction's end.
SWEEP_RETRY_FIRST = 2.0
SWEEP_RETRIES = 8
# How long the agent's stop waits for a sweep's task to end once cancelled (``close``).
SWEEP_STOP_SECONDS = 10.0

log = logs.get_logger(__name__)

T = TypeVar("T")


def _leader_time(
    request: agent_pb2.PreflightRequest | agent_pb2.CheckRequest,
) -> dt.datetime | None:
    """The leader's time in a Preflight or Check, if it gave one; INVALID_ARGUMENT for one out
    of protobuf's range (years 1-9999, nanos 0-999999999), before any check: it ended as
    INTERNAL after them (session 67, bad-input sweep of the agent's port)."""
    if not request.HasField("leader_time"):
        return None
    try:
        return request.leader_time.ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise invalid("leader_time: not a time (years 1 to 9999)") from None


def _rollout_id(text: str, field: str = "rollout_id") -> None:
    """INVALID_ARGUMENT for a rollout id no leader makes, never repeated (a command's, a
    transaction's looked up, a rollback's ``undoes``: GetTransaction answered NOT_FOUND with
    whatever it was given, up to 1000 characters, newlines and all: session 67, bad-input
    sweep of the agent's port)."""
    if not ROLLOUT_ID.fullmatch(text):
        raise invalid(f"{field}: 1-64 letters, digits, '.', '_' or '-'")


RECEIVING_WAIT = 10.0  # seconds
"""How long GetTransaction waits at most for a request of the same transaction that is being
received (``Receipts``) before it answers UNAVAILABLE, "ask again"."""


class Receipts:
    """The Switch and Rollback requests received whose transaction is not yet handed to the
    journal (its write queued on the store's thread), by key (rollout id, kind): from the
    handler's first line (before its epoch's check, its command lock, its plan) to the hand-off,
    or to the handler's end. GetTransaction waits for those of its key (``settled``): it
    answered "none" of a transaction that a handler waiting for the command lock journalled a
    moment later (session 73; s72 refused's L: only the leader's sending again covered it)."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, TxnKind], int] = {}
        self._changed = asyncio.Event()

    @contextlib.contextmanager
    def receiving(self, rollout_id: str, kind: TxnKind) -> Iterator[Callable[[], None]]:
        """Note a request of (``rollout_id``, ``kind``) received; the callable it gives ends
        the note (once: its transaction's write is handed to the store's thread), as the
        block's end does."""
        key = (rollout_id, kind)
        self._open[key] = self._open.get(key, 0) + 1
        ended = False

        def end() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            if (left := self._open[key] - 1) > 0:
                self._open[key] = left
            else:
                del self._open[key]
            self._changed.set()
            self._changed = asyncio.Event()

        try:
            yield end
        finally:
            end()

    async def settled(self, rollout_id: str, kind: TxnKind, timeout: float) -> bool:
        """Wait until no request of (``rollout_id``, ``kind``) is being received, ``timeout``
        seconds at most; False if one still is."""
        key = (rollout_id, kind)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while key in self._open:
                    await self._changed.wait()
        return key not in self._open


def being_received(rollout_id: str, kind: TxnKind) -> RpcStatusError:
    """GetTransaction's UNAVAILABLE while a request of (``rollout_id``, ``kind``) is still
    received after ``RECEIVING_WAIT`` (its details end ``tlsroll.rpc.BEING_RECEIVED``, which
    the leader tells from an agent it cannot reach: it does not ask again at once)."""
    return RpcStatusError(
        grpc.StatusCode.UNAVAILABLE,
        f"a request of the {kind.value} transaction of rollout {rollout_id!r} {BEING_RECEIVED}",
    )


def stale_epoch(epoch: int, seen: int) -> RpcStatusError:
    """The refusal of a command from an older leader state (``NodeAgentService._command``)."""
    return failed_precondition(
        f"stale epoch {epoch}: this node has seen epoch {seen}; "
        "refusing commands from an older leader state"
    )


async def _to_its_end(work: Awaitable[T]) -> T:
    """``work`` (a blocking call handed to a thread) awaited under the caller's lock until it
    has ended, even if the caller is cancelled meanwhile (the agent's stop, ``close``): the
    thread runs it to its end whatever happens, and the command lock, let go at the cancel,
    let another command's removals run beside it (review of s60 L1)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


def _sweep_failed(exc: Exception) -> None:
    log.warning(
        "stage.sweep_failed",
        error=f"{type(exc).__name__}: {exc}"[:200],
        detail="removing ended rollouts' staged files failed; the next sweep tries again",
    )


def login_failures(status: dict[str, Any]) -> tuple[int, dt.datetime | None]:
    """Wrong passwords at the managed server's own login (the client password), and when the
    latest was (UTC), as its status says: the reference server's ``login_failures`` (kept
    across its restarts) and ``last_login_failure``. (0, None) from a server that does not say,
    or says something else than a count (a time it gives that is not one is left out)."""
    count = status.get("login_failures")
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return 0, None
    last = None
    raw = status.get("last_login_failure")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError, OverflowError):
            when = dt.datetime.fromisoformat(raw)
            if when.tzinfo is not None:
                last = when.astimezone(dt.UTC)
    return min(count, 2**32 - 1), last


def first_certificate(pem: bytes) -> bytes:
    """The first certificate of a PEM file (a served chain), in the canonical PEM layout;
    ValueError if there is none. Plain text work (the ``ssl`` module's PEM helpers): every
    heartbeat reports it, and the agent does not parse X.509 for that (see ``Identity``)."""
    text = pem.decode("ascii")
    start = text.index(ssl.PEM_HEADER)
    end = text.index(ssl.PEM_FOOTER, start) + len(ssl.PEM_FOOTER)
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(text[start:end])).encode("ascii")


SERVED_RECHECK = 30.0
"""Seconds a certificate found served (``NodeAgentService._served``) speaks for the server
while nothing the agent can see changed (a driver that names no pid, certificate files
replaced in place by hand)."""

SERVED_TIMEOUT = 2.0


def served_certificate(address: str, port: int, timeout: float = SERVED_TIMEOUT) -> bytes:
    """The certificate ``address:port`` presents in a TLS handshake, as PEM; b"" if none (no
    answer, no TLS). Nothing is verified: this is what the server runs, not whom to trust.
    ``timeout`` bounds the whole call, connect and handshake together (``tls.connect``'s
    ``within``: each had all of it, twice the bound for the heartbeat's view; session 73)."""
    try:
        context = tls.unverified_client_context()
        with tls.connect(context, address, port, timeout=timeout, within=timeout) as sock:
            der = sock.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return b""
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii") if der else b""


def _seen_since_started(
    driver: Driver, facts: ServerFacts, status: dict[str, Any], config: tuple[int, int, int]
) -> tuple[float, bytes] | None:
    """The certificate a check of this agent's (a switch's verify: ``probe.presented``) was
    presented at the server's https port, as PEM, and when (before that handshake): where
    that was the server running now, so that the heartbeat after a switch makes no handshake
    of its own (session 72, servedcache). Known only where the driver's own start of the
    server said its pid (``Driver.started``: the reference driver's) and the check connected
    after it: the same pid answering the status now (``status``, read after that handshake)
    and the config file as it was before that start (``config``: read now) say that this
    server ran, on that config, from before the handshake until now (a restart outside
    tlsroll changes the pid; an edit, the config's stat). None otherwise, or while a
    restart of this agent's own runs."""
    started = getattr(driver, "started", None)
    seen = probe.presented(facts.address, facts.https_port)
    if started is None or seen is None or getattr(driver, "restarting", None) is not None:
        return None
    at, der = seen
    if at < started.at or status.get("pid") != started.pid or config != started.config:
        return None
    return at, ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def _restarts(driver: Driver) -> int:
    return int(getattr(driver, "restarts_begun", 0))


def require_leader(context: Ctx, trust: LeaderTrust) -> None:
    """Only the leader may command an agent (by the identity in its certificate, see
    ``nodeagent.trust``); other nodes and workstations hold certificates of the same CA."""
    caller = peer(context)
    if caller is None:
        raise unauthenticated("no client certificate")
    trust.check_leader(caller)


def txn_message(txn: Txn, driver: Driver | None = None) -> agent_pb2.Transaction:
    """The wire message of ``txn``; ``driver``: the node's, which says whether its unfreeze
    changes no answer (``Transaction.unfreeze_keeps_answers``)."""
    return agent_pb2.Transaction(
        unfreeze_keeps_answers=driver is not None and driver.unfreeze_keeps_answers,
        rollout_id=txn.rollout_id,
        kind=TXN_KIND.wire(txn.kind),
        epoch=txn.epoch,
        phase=TXN_PHASE.wire(txn.phase),
        outcome=TXN_OUTCOME.wire(txn.outcome),
        reason=txn.reason,
        watermark=txn.watermark or 0,
        started_at=timestamp(txn.started_at),
        ended_at=timestamp(txn.ended_at),
        freeze_started_at=timestamp(txn.freeze_started_at),
        freeze_ended_at=timestamp(txn.freeze_ended_at),
        restart_seconds=txn.restart_seconds,
        freeze_seconds=txn.freeze_seconds,
        old_url=txn.old_url,
        new_url=txn.new_url,
        cert_fingerprint=txn.cert_fingerprint,
        change=str(txn.plan.get("change") or "") if txn.kind is TxnKind.SWITCH else "",
    )


def busy_with(running: Txn) -> RpcStatusError:
    """The refusal of a transaction begun while ``running`` has not ended (one at a time)."""
    return failed_precondition(
        f"this node is busy with {running.kind} of rollout {running.rollout_id}"
    )


@dataclass(frozen=True)
class Prepared:
    """A switch made ready when its node was staged (``NodeAgentService._prepare``): its
    plan and target config, and that config staged beside the live one with the CA its
    verify trusts (``Runner.stage_target``), with what they were made from. A switch of that
    rollout and change, with the same password verifier (or a rotation, which keeps the live
    one), takes it if those are unchanged."""

    rollout_id: str
    built: Built
    source: bytes  # the live config it was made from
    live_tls: dict[str, str] | None  # the journal's, when it was made
    staged: Staged  # the journal's record of the staged certificate
    # the target config staged, and the source for the way back (``Runner.stage_target``)
    staging: transaction.Staged
    # The live config's permission bits and owner when it was made (``_owner_and_mode``): the
    # staged files have that mode and owner, which the switch's rename gives the live config.
    owner_and_mode: tuple[int, int, int]
    verifier: dict[str, Any] | None = None  # the verifier it was made with (``SwitchToCome``)


@dataclass(frozen=True)
class Coming:
    """The switch a Stage says follows it (``StageRequest.switch_to_come``): its password
    verifier (None: none) and ``keep_http``. The default is what a leader of an earlier
    release, which does not say, gets made ready."""

    verifier: dict[str, Any] | None = None
    keep_http: bool = False


def _coming(request: agent_pb2.StageRequest) -> Coming | None:
    """The switch ``request`` says follows it; the default if it says nothing, None if its
    verifier cannot be read (the switch that carries it is refused; nothing is made)."""
    if not request.HasField("switch_to_come"):
        return Coming()
    coming = request.switch_to_come
    verifier = None
    if coming.auth_verifier_json:
        try:
            verifier = dict(password.verifier_from_json(coming.auth_verifier_json))
        except ValueError:
            return None
    return Coming(verifier, coming.keep_http)


def _verifier_kept(built: Built, verifier: dict[str, Any] | None) -> bool:
    """The verifier file a prepared switch wrote at its stage still holds its verifier
    (blocking; True when it wrote none)."""
    live = built.plan.live_tls or {}
    name = live.get("verifier_file", "")
    if verifier is None or not name:
        return True
    return _holds(Path(name), password.verifier_to_json(verifier).encode())


def _owner_and_mode(path: Path) -> tuple[int, int, int]:
    """``path``'s permission bits, owner and group (blocking)."""
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _discarded(done: concurrent.futures.Future[None]) -> None:
    """A prepared switch's staged file removed later (``_drop_prepared``): a failure is said
    (the agent's next start removes what is left, ``Driver.discard_stale_staged``)."""
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.warning(
            "stage.discard_failed",
            error=describe(exc),
            detail="a staged file could not be removed; the agent's next start removes what is "
            "left",
        )


def _pem_text(data: bytes) -> str:
    """PEM bytes of a request as text for the crypto worker (JSON): any bytes that are not
    ASCII cross as lone surrogates (``surrogateescape``) and are given back as they came
    (``certwork_ops._pem``), for ``pki`` to judge exactly as it judged them here."""
    return data.decode("ascii", "surrogateescape")


def _when(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso)


def _tls_trusts(ca_pem: bytes) -> None:
    """A stage's CA (``ca_pem``: as written beside the staged certificate) as the TLS library
    takes it, for the switch's verify (``httpcheck.trusting``: the context made once and kept;
    blocking), or ``PKIError`` with the library's reason (the verify would refuse it inside
    the freeze)."""
    try:
        httpcheck.trusting(ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise PKIError(
            PKIReason.BAD_PEM, f"the TLS library refuses the CA certificate: {exc}"
        ) from None


def _holds(path: Path, data: bytes) -> bool:
    """True if ``path`` holds ``data`` (blocking); False if it is no regular file (a FIFO put
    there is never read: ``read_regular``)."""
    try:
        return read_regular(path) == data
    except NotRegularFile:
        return False


async def _restart_ended(driver: Driver, deadline: float) -> bool:
    """False if a restart the agent's own transaction makes (``Driver.restarting``) is still
    under way at ``deadline`` (time.monotonic()); True at once if none is."""
    restarting: asyncio.Event | None = getattr(driver, "restarting", None)
    if restarting is None:
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            await restarting.wait()
    return restarting.is_set()


def _restarting_view(driver: Driver) -> agent_pb2.ServerView | None:
    """A restart of the agent's own under way, said as such while it is younger than
    ``RESTARTING_SAID`` seconds (None past that: a restart that hangs shows as the server is)."""
    ran = time.monotonic() - getattr(driver, "restart_began", 0.0)
    if ran > RESTARTING_SAID:
        return None
    return agent_pb2.ServerView(
        driver=driver.name,
        healthy=False,
        detail=f"{SERVER_RESTARTING}by this node's agent for {ran:.0f} s (a switch, its way back)",
    )


def _planned_change(number: int) -> Change | None:
    """The change a Check or Preflight is for (``CheckRequest.change``): None if not said (a
    leader of an earlier release) or one this agent does not know (a newer leader's)."""
    try:
        return CHANGE.read_optional(number, "change")
    except WireError:
        return None


def _plan_problem(
    journal: Journal, driver: Driver, facts: ServerFacts, change: Change | None, way_back: bool
) -> str | None:
    """``plans.plan_problem`` for the checks (blocking): a config it cannot read is the checks'
    problem already (``cannot read the server's config``), not this."""
    if change is None and not way_back:
        return None
    try:
        return plans.plan_problem(journal, driver, facts, change, way_back=way_back)
    except (DriverError, ConfigError, OSError):
        return None


class NodeAgentService(agent_pb2_grpc.NodeAgentServicer):
    # Its one caller past ``require_leader`` is the leader, which shows the admin an agent's
    # failure: it reads an OSError's path (``tlsroll.rpc.SHOWS_PATHS``).
    shows_paths = True

    def __init__(
        self,
        cfg: AgentConfig,
        identity: Identity,
        journal: Journal,
        driver: Driver | None,
        runner: Runner | None,
        clock: Callable[[], dt.datetime],
        trust: LeaderTrust | None = None,
        freeze_lock: asyncio.Lock | None = None,
        leases: Leases | None = None,
        monotonic: Callable[[], float] = clocks.elapsed,
        crypto: Worker | None = None,
    ) -> None:
        self.cfg = cfg
        # The certificate work (a key and its CSR, the leader's certificate checked, a
        # practice's own): the agent's crypto worker, so that the agent never holds
        # ``cryptography`` (``nodeagent.cryptoworker``); in-process where no agent runs.
        self.crypto: Worker = crypto if crypto is not None else InProcess()
        self.identity = identity
        self.trust = trust or LeaderTrust.load(
            identity.ca_file, identity.trust_domain, cfg.data_dir
        )
        self.journal = journal
        self.driver = driver
        self.runner = runner
        self.clock = clock
        self.monotonic = monotonic  # elapsed time (a suspend counts): the scope freeze's leases
        self._lock = asyncio.Lock()  # one command at a time changes the journal
        self._receipts = Receipts()  # Switch and Rollback requests not yet journalled
        self._csr_work: set[asyncio.Future[bytes]] = set()  # ``_csr``'s, its caller gone or not
        self._sweeps: set[asyncio.Future[None]] = set()  # ``sweep_stages``' tasks
        # A sweep that did not do all it meant to, tried again later (``_swept``): the
        # retries so far, and the timer of the next.
        self._sweep_retries = 0
        self._sweep_retry: asyncio.TimerHandle | None = None
        # Stages the journal forgot whose directory could not be removed (``_remove_stages``:
        # with why), tried again with each sweep while the agent runs; under the command lock.
        self._unremoved: list[tuple[Staged, str]] = []
        self._closing = False  # the agent stops: no sweep begins (``close``)
        # Freeze, Unfreeze and the lease watch's lift of a lapsed freeze, one at a time: the
        # lease in the journal and the server's freeze change together (``watch_freeze_lease``).
        # The runner's lifts that read the lease first take the same lock (``Runner.freeze_lock``;
        # the daemon makes one and gives it to both).
        if freeze_lock is None:
            freeze_lock = runner.freeze_lock if runner is not None else asyncio.Lock()
        self._freeze_lock = freeze_lock
        # The leases' deadlines in elapsed time (``nodeagent.lease``), shared with the runner
        # the same way: a scope switch that cannot read the lease waits for them.
        if leases is None:
            leases = runner.leases if runner is not None else Leases()
        self.leases = leases
        # The journal's highest epoch as this process last read or wrote it (None: not yet).
        # Only ``_command`` writes it, so a command at exactly this epoch needs neither a read
        # nor a write of the journal (two worker-thread hops per command, issue 15), unless
        # another command's epoch is being checked meanwhile (``_admitting``).
        self._epoch: int | None = None
        self._admitting = 0
        # The certificate the server was last found serving (``_served``): (what it was asked
        # under, when, the PEM).
        self._served_seen: tuple[tuple[object, ...], float, bytes] | None = None
        # Told when a node is staged for a switch (the agent imports what the switch's end
        # needs then, while the node's server is not restarting: ``BootstrapHost.warm``).
        self.on_prepare: Callable[[], object] | None = None
        # Told when the server's freeze has changed by a Freeze, an Unfreeze or the lease
        # watch's lift (``LeaderLink.beat_soon``: the leader shows "frozen" as it is now).
        self.on_freeze_change: Callable[[], object] | None = None
        # The switch made ready at the last Stage (``_prepare``); read and written on the
        # store's thread only, under ``_lock``.
        self._prepared: Prepared | None = None
        # The file systems the heartbeat said short of room (``store_trouble``): said until
        # they are back above the floor and a margin (``room.room_problems``' ``held``).
        self._room_held: set[int] = set()
        # The checks' reads of the data dir and the config directory (the preflight's, the
        # Stage's room): on a thread of their own, bounded (a hung network mount there holds
        # neither the default executor nor the agent's stop: ``nodeagent.fsbound``).
        self.fs_checks = fsbound.BoundedWorker(
            "fs-checks", "the agent's checks of its data dir and the server's config directory"
        )
        # The view's read of the server's config and files (the heartbeat's, the checks'):
        # its own (the preflight reads the view beside its checks, as before).
        self.fs_view = fsbound.BoundedWorker("fs-view", "reading the server's config and its files")

    # --- guards -------------------------------------------------------------------------------

    async def _command(
        self, context: Ctx, command: agent_pb2.Command, *, begins: str | None = None
    ) -> str:
        """The command's rollout id once the leader's command is admitted (its epoch).
        ``begins``: what a Preflight, CreateCSR, Stage, Switch or Rollback begins (a
        transaction's kind, or ``PREPARES``): refused while another transaction is held
        (``_refuse_if_held``), before the epoch's write, which a held node's journal would
        refuse; a stale epoch is refused first all the same (a read: session 73, a stale
        leader was told the hold's reason, not that its epoch is stale; a read that fails
        leaves the hold's reason, as before)."""
        require_leader(context, self.trust)
        _rollout_id(command.rollout_id)
        if command.epoch == 0:
            raise invalid("epoch must be set")
        if begins is not None:
            if self.runner is not None and self.runner.held:
                try:
                    journalled = await asyncio.to_thread(self.journal.highest_epoch)
                except JournalError:  # a look only: the hold's reason below says what is wrong
                    journalled = 0
                seen = max(self._epoch or 0, journalled)
                if command.epoch < seen:
                    raise stale_epoch(command.epoch, seen)
            self._refuse_if_held(command.rollout_id, begins)
        if (
            not self._admitting
            and command.epoch == self._epoch
            and command.epoch <= self.trust.announced_epoch
        ):
            return command.rollout_id  # the highest seen, journalled and announced: admitted
        self._admitting += 1
        try:
            # Not older than any seen (the journal), and not above what the leader announced
            # (``nodeagent.trust``), before the journal records it as the highest.
            seen = await asyncio.to_thread(self.journal.highest_epoch)
            if command.epoch >= seen:
                await self.trust.admit_epoch(command.epoch)
            higher = await asyncio.to_thread(self.journal.admit_epoch, command.epoch)
            highest = higher if higher is not None else command.epoch
            self._epoch = max(self._epoch or 0, highest)
        finally:
            self._admitting -= 1
        if higher is not None:
            raise stale_epoch(command.epoch, higher)
        return command.rollout_id

    def _driver(self) -> Driver:
        if self.driver is None:
            raise failed_precondition("no managed server configured on this node ([server])")
        return self.driver

    def _refuse_if_needs_admin(self) -> None:
        """A node whose journal, put back from a copy, left a transaction that what the server
        runs does not settle (``nodeagent.journal``) is not staged, switched or rolled back
        until the admin checked it (review s41rev1 M1: a rollout already running did both)."""
        if (why := self.journal.needs_admin()) is not None:
            raise failed_precondition(f"{NEEDS_ADMIN}{why}")
        self._refuse_if_gone()

    def _refuse_if_gone(self) -> None:
        """A node whose journal is no longer where the agent opened it (``Journal.gone``: found
        by the store's watch, the checks, or a transaction's create) begins nothing new: no
        CSR, stage, switch or rollback (its records would be lost at the next start) until the
        admin put it back and restarted the agent. Called once a replay is told apart (a
        Switch's ``created``): a transaction running is reported, and finishes (session 75,
        journalgone)."""
        if (why := self.journal.gone()) is not None:
            raise failed_precondition(f"{NEEDS_ADMIN}{why}")

    def _refuse_if_held(self, rollout_id: str, begins: str) -> None:
        """A node that holds a transaction on a journal it cannot write (``Runner.held``: a
        full disk under its data dir, say) refuses at once every Preflight, CreateCSR, Stage,
        Switch and Rollback but a repeat of the held transaction's own command (``rollout_id``
        and kind ``begins``), with the hold's reason (FAILED_PRECONDITION: nothing began; the
        leader records the node failed, unchanged). It answered them with the disk's error
        (the epoch's or the begin's write: RESOURCE_EXHAUSTED), which the leader tries again
        for as long as the disk stays full (a preflight and a stage until their deadline), or
        with "busy". The repeat is answered as ever (the transaction as it stands: the leader
        follows it, and it goes on by itself once the journal takes writes): refused, the
        leader would have recorded "nothing began" of a transaction that then ends on its own
        (session 71, held2)."""
        held = self.runner.held if self.runner is not None else {}
        for key, why in held.items():
            if key != (rollout_id, begins):
                raise failed_precondition(f"{NEEDS_ADMIN}{why}")

    def _needs_admin(self) -> str | None:
        """Why the node needs the admin now: its journal put back from a copy (above), or a
        transaction held on a journal that cannot be written (``Runner.needs_admin``)."""
        if (why := self.journal.needs_admin()) is not None:
            return why
        return self.runner.needs_admin() if self.runner is not None else None

    async def server_view(self) -> agent_pb2.ServerView:
        """What the managed server runs now (for the heartbeats), once a restart this agent's
        own transaction makes has ended (waited for at most ``RESTART_VIEW_WAIT`` in all): a
        beat that looked while a switch restarted the server reported it down, and the leader
        logged ``node.server_down`` and showed it so until the next beat (an interval, 5 s by
        default), after a switch that went well (CI of session 54). A restart still under way
        then is said as such (``SERVER_RESTARTING``, with no client list: the leader keeps
        the one it has) for its first ``RESTARTING_SAID`` seconds, not as "down"; past them,
        or once it failed, the server is shown as it is. A view that found the server down
        while such a restart began (and perhaps ended) is made again once it ended (reviews
        rev55a L4, rev55b L3). ``GetStatus`` and the checks say what is, at once."""
        driver = self.driver
        if driver is None:
            return await self._view()
        deadline = time.monotonic() + RESTART_VIEW_WAIT
        begun = getattr(driver, "restarts_begun", 0)  # (before the wait: review rev55c L3)
        if not await _restart_ended(driver, deadline) and (said := _restarting_view(driver)):
            return said
        view = await self._view()
        if not view.healthy and getattr(driver, "restarts_begun", 0) != begun:
            if not await _restart_ended(driver, deadline) and (said := _restarting_view(driver)):
                return said
            view = await self._view()
        return view

    async def _view(self) -> agent_pb2.ServerView:
        if self.driver is None:
            return agent_pb2.ServerView(driver="none", detail="no managed server configured")
        driver = self.driver
        # A journal put back from a copy whose transaction what the server runs did not settle
        # (``nodeagent.journal``): not planned or switched until the admin checked the node.
        if (why := self._needs_admin()) is not None:
            detail = f"{NEEDS_ADMIN}{why}"
            return agent_pb2.ServerView(
                driver=driver.name,
                healthy=False,
                detail=detail,
                clients=await self._clients(driver),
            )
        read: list[ServerFacts] = []  # (the facts, read before the files: one hop for both)
        try:
            cert_pem, digest, config = await self.fs_view.run(self._facts_and_files, driver, read)
            facts = read[0]
            status = await driver.status()
        except (DriverError, OSError, ConfigError, fsbound.Hung) as exc:
            # A config file that cannot be read (edited by hand: not valid TOML) is said as
            # such: it failed every heartbeat, and the node, agent and server up, looked
            # offline, the plan saying to bring its agent up (review rev58a H1).
            detail = str(exc)
            if isinstance(exc, ConfigError):
                # What is wrong before the file's path, and the aside last: a leader keeps
                # 120 characters of a server down, and a long path cut the error off (review
                # rev58c L6).
                where = f"{exc.path}: {exc.key}" if exc.key else f"{exc.path}"
                detail = (
                    f"{CONFIG_UNREADABLE}, fix the file: {exc.problem} (in {where}; the server "
                    "may still run on what it loaded before)"
                )
            return agent_pb2.ServerView(
                driver=driver.name,
                healthy=False,
                detail=detail,
                clients=await self._clients(driver),
                # The server down, its config read: the way back can still take it to http.
                configured_schemes=list(read[0].schemes) if read else [],
            )
        if "https" in facts.schemes:
            cert_pem = await self._served(driver, facts, status, config) or cert_pem
        failures, last_failure = login_failures(status)
        view = agent_pb2.ServerView(
            driver=driver.name,
            healthy=True,
            frozen=bool(status.get("frozen")),
            schemes=list(facts.schemes),
            urls=[facts.url(s) for s in facts.schemes],
            cert_pem=cert_pem,
            verifier_digest=digest,
            clients=await self._clients(driver),
            login_failures=failures,
        )
        if last_failure is not None:
            view.last_login_failure_at.FromDatetime(last_failure)
        return view

    @staticmethod
    async def _clients(driver: Driver) -> types_pb2.ClientsView:
        """Who the server has seen lately (the driver caches it); a driver's trouble here is a
        ``problem`` in the view, never a failed status."""
        try:
            return clients_message(await driver.clients())
        except Exception as exc:  # a driver's or a report's trouble: never a failed status
            view = ClientsView(problem=f"cannot read the clients: {describe(exc)}"[:200])
        return clients_message(view)

    async def _served(
        self,
        driver: Driver,
        facts: ServerFacts,
        status: dict[str, Any],
        config: tuple[int, int, int],
    ) -> bytes:
        """The certificate the server serves on https now, as a client gets it (a handshake,
        nothing verified), b"" if none came. What the journal says this agent installed
        (``_live_files``) is a record: the admin may have put another certificate in since, by
        hand, or this agent's data dir was begun again; the leader plans from what is served
        (review s70 drift, H1). Asked again at once after the config file, the server's pid or
        a restart of this agent's own changed, else at most every ``SERVED_RECHECK`` seconds.
        ``config``: the config file's (inode, size, mtime), ``_live_files``'s. The certificate
        a switch's verify was presented stands for a handshake of its own where that was this
        very server (``_seen_since_started``)."""
        begun = _restarts(driver)
        key = (facts.address, facts.https_port, config, status.get("pid"), begun)
        now = time.monotonic()
        kept = self._served_seen
        if kept is not None and kept[0] == key and now - kept[1] < SERVED_RECHECK:
            return kept[2]
        seen = _seen_since_started(driver, facts, status, config)
        if seen is not None and now - seen[0] < SERVED_RECHECK:
            self._served_seen = (key, seen[0], seen[1])
            return seen[1]
        quiet = getattr(driver, "restarting", None) is None
        pem = await asyncio.to_thread(served_certificate, facts.address, facts.https_port)
        # Not kept if a restart of this agent's own was under way before or after, or began
        # meanwhile: the old server may have answered, and a driver naming no pid changes
        # nothing else in the key (the old certificate said up to 30 s after a rotation).
        quiet = quiet and getattr(driver, "restarting", None) is None
        self._served_seen = (key, now, pem) if quiet and _restarts(driver) == begun else None
        return pem

    def _facts_and_files(
        self, driver: Driver, read: list[ServerFacts]
    ) -> tuple[bytes, str, tuple[int, int, int]]:
        """Blocking: the server's facts (put in ``read``; what ``Driver.facts`` raises, raised)
        and then ``_live_files``, in one worker-thread hop: the heartbeat's view took two
        (session 72, agentcpu L)."""
        facts = driver.facts()
        read.append(facts)
        return self._live_files(driver, "https" in facts.schemes)

    def _live_files(
        self, driver: Driver, https: bool = False
    ) -> tuple[bytes, str, tuple[int, int, int]]:
        """The certificate served on https and the digest of the live verifier (journal's
        ``live_tls``); empty where there is none or a file cannot be read. And the server's
        config file's (inode, size, mtime), zeros if none (``_served``'s), in the same worker
        thread hop (a Check's view took one hop more for it). ``https``: the server serves
        https; a journal that holds no live verifier there (the agent's data dir begun again)
        gives the one the server's config names, where the driver reads it back
        (``Driver.named_files``: the reference server's), as the plans do
        (``plans.served_live``): the digest was empty until the node's first change (session
        71, reenrol)."""
        config = config_stat(driver.config_file)
        live = self.journal.live_tls() or {}
        if https and not live.get("verifier_file"):
            with contextlib.suppress(DriverError, ConfigError, OSError):
                live = {**live, **(driver.named_files() or {})}
        cert_pem, digest = b"", ""
        with contextlib.suppress(OSError, ValueError, NotRegularFile):
            if live.get("cert_file"):
                cert_pem = first_certificate(read_regular(Path(live["cert_file"])))
        with contextlib.suppress(OSError, ValueError, NotRegularFile):
            if live.get("verifier_file"):
                digest = password.verifier_digest(read_regular(Path(live["verifier_file"])))
        return cert_pem, digest, config

    async def watch_freeze_lease(self) -> None:
        """Lift a scope freeze whose lease ran out: the leader is gone or cut off, and a node
        must not stay frozen because of that. Never while a transaction runs (it owns the
        freeze until it ends). A failure (the server refuses the unfreeze, the journal cannot be
        read) is retried with the transactions' backoff and logged at their bounded rate; it
        never ends the watch."""
        failures, logged = 0, time.monotonic()
        while True:
            wait = UNFREEZE_BACKOFF.delay(failures) if failures else LEASE_CHECK_SECONDS
            await asyncio.sleep(wait)
            try:
                lifted = await self._lift_lapsed_freeze()
            except Exception as exc:
                failures += 1
                if worth_logging(failures, time.monotonic() - logged):
                    logged = time.monotonic()
                    log.error(
                        "scope_freeze.lease_unfreeze_failed",
                        attempt=failures,
                        retry_in=UNFREEZE_BACKOFF.delay(failures),
                        error=describe(exc),
                        hint="the managed server stays frozen (refusing writes) until this "
                        "works: check it runs (systemctl status of its unit); the agent "
                        "keeps trying",
                    )
                continue
            failures = 0
            if lifted is None:
                continue
            log.warning(
                "scope_freeze.lease_expired",
                rollout_id=lifted,
                detail="the leader did not renew the freeze; writes are accepted again",
            )

    def _lapsed(self, lease: Lease | None) -> bool:
        """True if ``lease`` ran out, in elapsed time (clock audit s35 A: a step of the wall
        clock neither stretches nor cuts it; ``nodeagent.lease``)."""
        if self.driver is None:
            return False
        if lease is None:  # known: no lease is left that a scope switch must wait for
            self.leases.seen(None, self.clock(), self.monotonic())
            return False
        return self.leases.lapsed(lease, self.clock(), self.monotonic())

    async def _lift_lapsed_freeze(self) -> str | None:
        """One look of the lease watch: lift the freeze if its lease ran out and no transaction
        runs; the rollout whose freeze it lifted, or None. Under ``_freeze_lock``, and the
        lease read again there: a Freeze (a leader back after the lease ran out sends one at
        once) that renewed the lease since the first read must not be undone (audit s32 H4:
        the node took writes while the leader counted it frozen), nor its new lease cleared
        (a freeze with no lease). The first read stays outside the lock: most looks find
        nothing to do, and a Freeze draining writes holds the lock."""
        if not self._lapsed(await asyncio.to_thread(self.journal.freeze_lease)):
            return None
        async with self._freeze_lock:
            lease = await asyncio.to_thread(self.journal.freeze_lease)
            if lease is None or self.driver is None or not self._lapsed(lease):
                return None
            if await asyncio.to_thread(self.journal.unfinished):
                return None
            try:
                await self.driver.unfreeze()
                await asyncio.to_thread(self.journal.set_freeze_lease, None)
            finally:
                self._freeze_changed()
        return lease[0]

    def _freeze_changed(self) -> None:
        """Tell ``on_freeze_change``: after a Freeze, an Unfreeze or a lift, also one that
        failed part way (a freeze whose drain timed out leaves the server refusing writes: the
        leader shows what the next beat sees; an unchanged report is not sent). A listener's
        trouble is logged, never the call's."""
        if self.on_freeze_change is not None:
            try:
                self.on_freeze_change()
            except Exception as exc:
                log.error(
                    "scope_freeze.on_change_failed",
                    error=describe(exc),
                    hint="the freeze itself stands; a bug in tlsroll: report it with the lines "
                    "before this one",
                )

    # --- status -------------------------------------------------------------------------------

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def GetStatus(
        self, request: agent_pb2.GetStatusRequest, context: Ctx
    ) -> agent_pb2.NodeStatus:
        require_leader(context, self.trust)
        return agent_pb2.NodeStatus(
            node_name=self.cfg.node_name,
            agent_version=__version__,
            cert_not_after=timestamp(self.identity.not_after),
            agent_time=timestamp(self.clock()),
            server=await self._view(),
            highest_epoch=await asyncio.to_thread(self.journal.highest_epoch),
            features=features.this_agent(),
        )

    # --- preflight ----------------------------------------------------------------------------

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def Preflight(
        self, request: agent_pb2.PreflightRequest, context: Ctx
    ) -> agent_pb2.PreflightResponse:
        received = self.clock()  # the clock's check: before our own work (clock audit I, s35)
        rollout_id = await self._command(context, request.command, begins=PREPARES)
        leader_time = _leader_time(request)
        if request.make_csr:
            self._warm_certificates()
        reply = await self._checks(request, received, leader_time)
        if request.make_csr and reply.ok:  # the stage then needs no CreateCSR call
            driver = self._driver()
            if self.on_prepare is not None:
                # A switch follows: what the Stage gets ready for it (the bootstrap service's
                # import, at a low priority) begins now, while the CSR waits for the crypto
                # worker (mostly its cold start, at a rollout's first node): begun by the
                # Stage, it shared the GIL with the Stage's own work, which the first
                # switch waits for (issue 15). (The Stage asks again: nothing if begun.)
                self.on_prepare()
            reply.csr_pem = await self._csr(driver, rollout_id)
        return reply

    def _warm_certificates(self) -> None:
        """A preflight that asks for the CSR (``make_csr``: a rollout that stages a
        certificate): the new key and its CSR, made once the checks pass, are the crypto
        worker's, which an idle agent does not run. It starts now (``CryptoWorker.warm``:
        its start and its import of the certificate code, at a low priority), while the
        checks run, instead of after them (about 40 ms of the first node's preparation, which
        the rollout's first switch waits for). A preflight that stages nothing
        (change-password, disable-tls) and ``Check`` (``tlsroll plan``) start nothing. A
        rollout's start asks its first nodes' agents to start it with their planning
        ``Check`` (``warm_certificates``), so that it runs when their preflight comes; it
        stops by itself when idle (``cryptoworker.IDLE_SECONDS``)."""
        if self.driver is None:
            return
        self.crypto.warm()

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def Check(
        self, request: agent_pb2.CheckRequest, context: Ctx
    ) -> agent_pb2.PreflightResponse:
        """Preflight's checks for `tlsroll plan` and a rollout's start: read-only, no epoch,
        nothing recorded (``warm_certificates``: the crypto worker is started ahead, as the
        checks begin; ``check``)."""
        received = self.clock()
        require_leader(context, self.trust)
        return await self.check(request, received)

    async def check(
        self, request: agent_pb2.CheckRequest, received: dt.datetime | None = None
    ) -> agent_pb2.PreflightResponse:
        """``Check``'s work once its caller is known to be the leader: the RPC's, and the
        answer to the same question asked on the agent's heartbeat stream (``answer_check``).
        ``received``: when the question came (now if not given)."""
        leader_time = _leader_time(request)
        if request.warm_certificates:
            # Started as the checks begin, not once they end (issue 15, session 71): its cold
            # start, which this node's preflight waits for, gains their time (12-21 ms on the
            # loaded bench). The review of session 28 (M1) had it after them while it was an
            # import in this process, which shared the GIL with them; a child of its own
            # costs them its spawn (the rest is another process's, at a low priority).
            self._warm_certificates()
        return await self._checks(request, received or self.clock(), leader_time)

    async def answer_check(self, question: leader_pb2.CheckQuestion) -> leader_pb2.CheckAnswer:
        """The leader's planning question asked on the agent's heartbeat stream
        (``nodeagent.leader_link``): ``check``'s answer, or the status ``Check`` would have
        ended with (as ``map_errors`` gives it) and the managed server's view, as ``GetStatus``
        gives it, so that the leader needs no second call for a node that refuses its checks.

        Who asks is checked less than for ``Check``: the stream's TLS handshake, when it opened,
        checked the server's certificate against the CA and the leader's internal name
        (``spiffe.leader_host``), but not against the revocation list (``Check``'s
        ``require_leader`` does, on every call), and not again while the stream lasts, even
        once a list arrives on it that revokes it. The holder of a revoked leader key who can
        redirect the agent's connection may ask this read-only question (the server's view,
        the node's problems, the certificate code loaded ahead); gRPC's Python client shows
        the agent neither the server's certificate nor a revocation check to close it with."""
        try:
            checked = await self.check(question.request)
            return leader_pb2.CheckAnswer(id=question.id, checked=checked)
        except Exception as exc:
            code, details = error_status(exc, ERRORS, "Check", FULL_DISK, self.shows_paths)
        return leader_pb2.CheckAnswer(
            id=question.id, refused_code=code.value[0], refused=details, server=await self._view()
        )

    async def _checks(
        self,
        request: agent_pb2.PreflightRequest | agent_pb2.CheckRequest,
        received: dt.datetime,
        leader_time: dt.datetime | None,
    ) -> agent_pb2.PreflightResponse:
        """The checks; ``received``: the node's clock when the question came, which the
        leader's time in it (``leader_time``, read by ``_leader_time``) is compared with. Read
        after the checks, as before, the offset counted their time (the server's health and
        view: seconds when it is slow) as clock difference, and a node legitimately near the
        limit failed with "fix NTP" (clock audit I of session 35)."""
        driver = self._driver()
        # The checks on this machine (one worker thread) while the server is asked for its
        # health and its view (one after the other, as ever: a driver's status may be a
        # command): a preflight waited for each check in turn, in three worker threads.
        # The way back's question (``plans.edited_config``) only when the leader plans one
        # (``CheckRequest.want_edited_config``): it reads the journal and the config, and every
        # other planning question and preflight paid for it (review of s59-wayback L1).
        edits = isinstance(request, agent_pb2.CheckRequest) and request.want_edited_config
        # The way back restores the kept http config and renders nothing: a template moved or
        # broken since the switch must not halt it (review s66 closing M1).
        change = _planned_change(request.change)
        local_checks = asyncio.ensure_future(
            self.fs_checks.run(
                self._local_checks,
                driver,
                edits=edits,
                renders=not request.way_back,
                change=change,
                way_back=request.way_back,
            )
        )
        try:
            health = await driver.status_problem()  # (none answered: not healthy)
            view = await self._view()
        except BaseException:
            # The checks' own trouble must not hide the server's (review of session 26).
            await asyncio.gather(local_checks, return_exceptions=True)
            raise
        try:
            facts, unread, local, edited = await local_checks
        except fsbound.Hung as hung:  # (a refusal for now: why, as any other check's)
            facts, unread, local, edited = None, "", [str(hung)], ""
        problems = [unread] if unread else []  # in the order they were always found
        if (gone := self.journal.gone()) is not None:  # (looked at by ``_local_checks``)
            problems.insert(0, f"{NEEDS_ADMIN}{gone}")
        if (why := self._needs_admin()) is not None:  # first: what to do first
            problems.insert(0, f"{NEEDS_ADMIN}{why}")
        if health is not None:
            problems.append(f"{SERVER_NOT_HEALTHY}{of_server(health)}")
        problems += local
        if leader_time is not None:
            offset = (received - leader_time).total_seconds()
            limit = request.max_clock_offset_seconds or DEFAULT_MAX_CLOCK_OFFSET
            if abs(offset) > limit:
                problems.append(
                    f"clock differs from the leader's by {offset:+.0f}s (limit {limit}s); fix NTP"
                )
        names = self.cfg.names
        return agent_pb2.PreflightResponse(
            ok=not problems,
            problems=problems,
            common_name=names.common_name,
            ip_addresses=names.ips,
            dns_names=names.dns,
            server=view,
            old_url=facts.url("http") if facts else "",
            new_url=facts.url("https") if facts else "",
            bootstrap_port=self.cfg.bootstrap_port,
            edited_config=edited,
        )

    def _local_checks(
        self,
        driver: Driver,
        *,
        edits: bool = False,
        renders: bool = True,
        change: Change | None = None,
        way_back: bool = False,
    ) -> tuple[ServerFacts | None, str, list[str], str]:
        """The checks on this machine (blocking): the server's facts from its config, or why
        the config could not be read, the ports taken and the config directory not writable,
        and (``edits``: asked) the config's path if it was edited since tlsroll wrote it
        (``plans.edited_config``: the way back would undo that; the leader's plan of it says
        so, review rev58a H2). ``renders``: the change renders a config (all but the way back,
        which puts back the kept one), so a template that does not render is a problem.
        ``change`` (``way_back``: the way back), the change planned: why its plan would be
        refused on this node as its server runs now (``plans.plan_problem``), first: it says
        what to do by hand."""
        facts: ServerFacts | None = None
        unread, edited = "", ""
        self.journal.look_gone()  # (said by ``_checks``: ``Journal.gone``)
        try:
            facts = driver.facts()
        except (DriverError, OSError) as exc:
            unread = f"cannot read the server's config: {exc}"
        if edits and facts is not None:  # (on https only: a node on http has no way back)
            edited = plans.edited_config(self.journal, driver, facts.schemes)
        problems = self._port_problems(facts) if facts is not None else []
        if facts is not None and (
            refused := _plan_problem(self.journal, driver, facts, change, way_back)
        ):
            problems.insert(0, refused)
        unrendered = driver.render_problem() if renders else None
        if unrendered:  # a switch would refuse it (``plans.switch_plan``: ``driver.render``)
            problems.append(unrendered)
        problems += self._writable_problems(driver.config_file.parent)
        unsafe = config_dir_problem(driver.config_file.parent)
        if unsafe:  # a switch would refuse to stage or write there (``plans.refuse_unsafe_dir``)
            problems.append(unsafe)
        linked = config_link_problem(driver.config_file)
        if linked:  # a switch would refuse it too (``plans.refuse_linked_config``)
            problems.append(linked)
        if not way_back:  # (the way back, the emergency path, is not refused for it)
            problems += self._room_problems(driver)
        return facts, unread, problems, edited

    def store_trouble(self) -> list[str]:
        """(Blocking: a thread's.) What the agent's heartbeat says of its own store
        (``HeartbeatRequest.store_trouble``): what its checks refuse a switch for want of room
        (``_room_problems``), the server's config directory left out on a node without a
        [server]. The leader shows it as the node's problem (session 74: between rollouts it
        showed such a node healthy, and a start's preflight was the first to say it). A file
        system said short stays said until its free space is back above the floor and a
        margin (``room.said_until``: free space hovering at the floor made every beat news).
        First, a journal no longer where the agent opened it (``Journal.look_gone``: looked at
        here, every heartbeat interval; session 75)."""
        problems = self._room_problems(self.driver, self._room_held)
        if (gone := self.journal.look_gone()) is not None:
            problems.insert(0, gone)
        return problems

    def _room_problems(self, driver: Driver | None, held: set[int] | None = None) -> list[str]:
        """Why no switch should begin for want of room (blocking; ``tlsroll.room``): too
        little free space for its writes on the file system of the agent's data dir (its
        journal) or of the server's config directory, or a journal whose checkpoint fails
        (its disk full: its records go on into the ``-wal`` until that must grow). A switch
        begun there froze the server, then failed a journal write mid-way and was held until
        the admin came (session 73, diskroom). The checks' and the Stage's."""
        needs = [("the agent's data dir", self.journal.path.parent, room.JOURNAL_ROOM)]
        if driver is not None:
            try:
                size = driver.config_file.stat().st_size
            except OSError:  # (the checks say a config that cannot be read)
                size = 0
            config_room = room.CONFIG_ROOM + room.CONFIG_COPIES * size
            needs.append(("the server's config directory", driver.config_file.parent, config_room))
        problems = room.room_problems(needs, held=held)
        if (why := self.journal.checkpoint_trouble) is not None:
            problems.append(
                f"the journal {self.journal.path} cannot grow: its checkpoint fails ({why});"
                " free space on its file system (df -h)"
            )
        return problems

    def _port_problems(self, facts: ServerFacts) -> list[str]:
        problems = []
        own = {os.getpid()}
        server_pid = getattr(self.driver, "_pid", lambda: None)()
        if server_pid:
            own.add(server_pid)
        checks = [(facts.https_port, "https"), (self.cfg.bootstrap_port, "bootstrap")]
        for port, what in checks:
            if what == "https" and "https" in facts.schemes:
                continue  # held by the managed server itself
            problem = ports.port_problem(facts.address, port, what, own)
            if problem is None:
                continue
            problems.append(
                problem
                + ("; set [agent].bootstrap_port to a free port" if what == "bootstrap" else "")
            )
        return problems

    @staticmethod
    def _writable_problems(directory: Path) -> list[str]:
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".tlsroll-probe-"):
                pass
        except OSError as exc:
            return [f"config directory {directory} is not writable: {exc.strerror}"]
        return []

    # --- stage --------------------------------------------------------------------------------

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def CreateCSR(
        self, request: agent_pb2.CreateCSRRequest, context: Ctx
    ) -> agent_pb2.CreateCSRResponse:
        rollout_id = await self._command(context, request.command, begins=PREPARES)
        return agent_pb2.CreateCSRResponse(csr_pem=await self._csr(self._driver(), rollout_id))

    async def _csr(self, driver: Driver, rollout_id: str) -> bytes:
        """The CSR of the rollout's key, made (with the key) on first asking and journalled:
        every later asking, by CreateCSR or by Preflight's ``make_csr``, gets the same one.

        A call cancelled meanwhile (the leader's deadline) does not cut the work short: it goes
        on to its journal record, as when it ran in a thread (review s41 M4). Cut short, the
        crypto worker's child was killed, which may have written the key already, and nothing
        recorded it (a key file no rollout's end removes); the lock is held until the record,
        so the leader's next CreateCSR gets that CSR."""
        work = asyncio.ensure_future(self._csr_locked(driver, rollout_id))
        waited = asyncio.shield(work)
        self._csr_work.add(work)  # (kept: a task nothing refers to may be collected)

        def done(_: asyncio.Future[bytes]) -> None:
            self._csr_work.discard(work)
            if waited.cancelled() and not work.cancelled() and work.exception() is not None:
                log.warning(
                    "stage.csr_failed",
                    rollout_id=rollout_id,
                    error=str(work.exception()),
                    detail="preparing the key for the next switch failed; the switch makes its own",
                )

        work.add_done_callback(done)
        return await waited

    async def _csr_locked(self, driver: Driver, rollout_id: str) -> bytes:
        async with self._lock:
            staged = await asyncio.to_thread(self.journal.staged, rollout_id)
            if staged is None:
                self._refuse_if_gone()  # (a CSR made before is given again)
                csr_pem, over = await self._new_key(driver, rollout_id)
                self._retry_removals()
                log.info("stage.csr_created", rollout_id=rollout_id)
                prepared = self._prepared
                if prepared is not None and prepared.rollout_id in over:
                    # The switch made ready for a stage this one ended: its file too.
                    await dbthread.run(self._drop_prepared)
                return csr_pem
        return staged.csr_pem

    async def _new_key(self, driver: Driver, rollout_id: str) -> tuple[bytes, set[str]]:
        """The node's new key (it never leaves the node: the crypto worker makes it and writes
        it in the stage directory, as the live config is shared) and its CSR, journalled, and
        the rollouts whose stages that ended, their directories removed."""
        share = await asyncio.to_thread(plans.sharing, driver)
        stage = await asyncio.to_thread(plans.make_stage_dir, driver, rollout_id, share)
        key_file = stage / "server.key"
        request = {
            "key_file": str(key_file),
            "share": dataclasses.asdict(share),
            "names": names_request(self.cfg.names),
        }
        csr_pem = str(await self.crypto.call("cert.new_key", request)).encode("ascii")
        return await asyncio.to_thread(self._record_csr, rollout_id, key_file, csr_pem)

    def _record_csr(
        self, rollout_id: str, key_file: Path, csr_pem: bytes
    ) -> tuple[bytes, set[str]]:
        """``_new_key``'s journal write and removals (blocking)."""
        over = self.journal.record_csr(rollout_id, key_file, csr_pem)
        self._remove_stages(over)
        return csr_pem, {s.rollout_id for s in over}

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def Stage(self, request: agent_pb2.StageRequest, context: Ctx) -> agent_pb2.StageResponse:
        rollout_id = await self._command(context, request.command, begins=PREPARES)
        self._refuse_if_needs_admin()
        # Checked again (the preflight's may be minutes old): no key staged for a switch the
        # disk would hold mid-way (``_room_problems``).
        try:
            no_room = await self.fs_checks.run(self._room_problems, self._driver())
        except fsbound.Hung as hung:  # (as the preflight says it: ``_checks``)
            raise failed_precondition(str(hung)) from None
        if no_room:
            raise failed_precondition("; ".join(no_room))
        if self.on_prepare is not None:  # a switch follows: get ready while nothing restarts
            self.on_prepare()
        if request.own_certificate:
            return await self._stage_own(rollout_id, request)
        async with self._lock:
            staged = await asyncio.to_thread(self.journal.staged, rollout_id)
            if staged is None:
                raise failed_precondition(f"no CSR for rollout {rollout_id}; call CreateCSR first")
            if await asyncio.to_thread(self.journal.get, rollout_id, TxnKind.SWITCH) is not None:
                raise failed_precondition(f"rollout {rollout_id} is already switching this node")
            # The checks are the crypto worker's, in the order they always were. Every one
            # that needs no key read comes before the key is given any access
            # (``certwork_ops.stage_issuer``: the pinned CA issued it, for the staged key by the
            # journalled CSR's public key, with the node's names, valid now; then the TLS
            # library's check of the CA), so that a certificate refused changes nothing
            # (review s41 rev2, Low 1; review s42 of the lean child, Low 1). Then the key is
            # given the access the live config gives now (``plans.share_named``: the config
            # may have changed since) and read as the managed server's user may share it
            # (``plans.Sharing.reader``): only its read and match can refuse after that
            # (``certwork_ops.stage``).
            certificates = {
                "certificate_pem": _pem_text(request.certificate_pem),
                "ca_certificate_pem": _pem_text(request.ca_certificate_pem),
                "ca_pin": self.cfg.ca_pin,
                "names": names_request(self.cfg.names),
                "now": self.clock().isoformat(),
            }
            issuer = await self.crypto.call(
                "cert.stage_issuer", {**certificates, "csr_pem": _pem_text(staged.csr_pem)}
            )
            if "refused" in issuer:
                raise invalid(issuer["refused"])
            await asyncio.to_thread(_tls_trusts, str(issuer["ca_pem"]).encode("ascii"))
            reader = await asyncio.to_thread(self._staged_key_reader, staged.key_file)
            checked = await self.crypto.call(
                "cert.stage",
                {**certificates, "key_file": str(staged.key_file), "reader": reader},
            )
            if "refused" in checked:
                raise invalid(checked["refused"])
            fingerprint = await asyncio.to_thread(self._store_cert, staged, checked)
            await self._pin_ahead()
            await dbthread.run(self._prepare, rollout_id, _coming(request))
        log.info("stage.done", rollout_id=rollout_id, cert_fingerprint=fingerprint)
        return agent_pb2.StageResponse(
            fingerprint=fingerprint, not_after=timestamp(_when(checked["not_after"]))
        )

    def _staged_key_reader(self, key_file: Path) -> tuple[int, int] | None:
        """The key CreateCSR staged given the access the live config gives now (blocking):
        whom it is shared with (``plans.Sharing.reader``), for the check that reads it."""
        driver = self._driver()
        plans.share_named(driver, [key_file])
        return plans.sharing(driver).reader

    def _store_cert(self, staged: Staged, checked: dict[str, Any]) -> str:
        """Write the certificate (``chain_pem``: with the intermediates served with it) and the
        CA(s) (``ca_pem``) beside the staged key, journalled with ``fingerprint`` and
        ``not_after`` (a check's answer, ``certwork_ops``; blocking). The TLS client context
        that trusts the staged CA is made here too, for the switch's verify
        (``httpcheck.trusting`` keeps it): made there, its CPU (about a millisecond, more on a
        busy machine) was inside the freeze window."""
        cert_file = staged.key_file.with_name("server.pem")
        ca_file = staged.key_file.with_name("ca.pem")
        ca_pem = str(checked["ca_pem"]).encode("ascii")
        # Before anything is written or journalled (Stage checked it earlier still, before the
        # key's share; this is the context the verify uses, kept).
        _tls_trusts(ca_pem)  # the bytes verify reads back from ca_file
        share = plans.sharing(self._driver())  # the managed server reads them as its config
        plans.write_staged(ca_file, ca_pem, share)
        plans.write_staged(cert_file, str(checked["chain_pem"]).encode("ascii"), share)
        fingerprint = str(checked["fingerprint"])
        self.journal.record_stage(
            staged.rollout_id, cert_file, ca_file, fingerprint, _when(checked["not_after"])
        )
        return fingerprint

    async def _stage_own(
        self, rollout_id: str, request: agent_pb2.StageRequest
    ) -> agent_pb2.StageResponse:
        """``--cert-dir``: the practice's certificate and key, made off the node. Checked here
        again (key matches, chain to the CA sent, SAN covers this node's names, valid now)
        before anything is written; the key is written 0600 (or as the config: ``plans.Sharing``)
        and never logged. A replay (the
        answer was lost) writes the same files again. The checks are the crypto worker's
        (``certwork_ops.own``); the key crosses its pipe, never a log."""
        driver = self._driver()
        checked = await self.crypto.call(
            "cert.own",
            {
                "certificate_pem": _pem_text(request.certificate_pem),
                "ca_certificate_pem": _pem_text(request.ca_certificate_pem),
                "private_key_pem": _pem_text(request.private_key_pem),
                "names": names_request(self.cfg.names),
                "now": self.clock().isoformat(),
            },
        )
        if "refused" in checked:
            raise invalid(checked["refused"])
        # Before the key is written and other stages end: a CA the TLS library refuses
        # changes nothing (``_store_cert`` checks it again, the context kept).
        await asyncio.to_thread(_tls_trusts, str(checked["ca_pem"]).encode("ascii"))
        key_pem = str(checked.pop("key_pem")).encode("ascii")
        async with self._lock:
            if await asyncio.to_thread(self.journal.get, rollout_id, TxnKind.SWITCH) is not None:
                raise failed_precondition(f"rollout {rollout_id} is already switching this node")
            staged, over = await asyncio.to_thread(self._own_key, driver, rollout_id, key_pem)
            self._retry_removals()
            prepared = self._prepared
            if prepared is not None and prepared.rollout_id in over:
                # The switch made ready for a stage this one ended: dropped now, as ``_csr``
                # does, not only by the ``_prepare`` below (a refused CA never reaches it).
                await dbthread.run(self._drop_prepared)
            # (The intermediates are in the CA file too: workstations build the server's
            # chain with the bundle the bootstrap service hands them; ``certwork_ops.own``.)
            fingerprint = await asyncio.to_thread(self._store_cert, staged, checked)
            await self._pin_ahead()
            await dbthread.run(self._prepare, rollout_id, _coming(request))
        log.info("stage.done", rollout_id=rollout_id, cert_fingerprint=fingerprint, own=True)
        return agent_pb2.StageResponse(
            fingerprint=fingerprint, not_after=timestamp(_when(checked["not_after"]))
        )

    async def forget_ended(self, rollout_ids: Sequence[str]) -> None:
        """The leader says these rollouts have ended (``HeartbeatResponse.ended_stages``: it
        answers about the stages the heartbeat said no transaction began,
        ``Journal.heartbeat_facts``): their stages are forgotten and their directories
        removed (key, certificate, verifier file), with the switch made ready for one of them.
        One command at a time: a Stage or Switch of the rollout is never cut in half; a
        transaction begun meanwhile keeps its stage (``Journal.forget_stages``), and a switch
        that came after is refused ("nothing staged"), never run on missing files. An ended
        rollout is ended for good: no later command of the leader names it."""
        ids = [r for r in rollout_ids if ROLLOUT_ID.fullmatch(r)]
        if not ids:
            return
        async with self._lock:
            if self._closing:  # the agent stops: the next start sweeps (review of s60 L1)
                return
            over, swept = await _to_its_end(asyncio.to_thread(self._forget_ended, ids))
            prepared = self._prepared
            if prepared is not None and prepared.rollout_id in over:
                await dbthread.run(self._drop_prepared)
        if swept is not None:
            self._swept(swept)

    def _forget_ended(self, rollout_ids: Sequence[str]) -> tuple[set[str], bool | None]:
        """``forget_ended``'s journal writes and removals (blocking): the rollouts forgotten,
        and whether a sweep ran and did all it meant to (None: none ran). One of them may be
        the rollout of the newest switch, whose way back the agent kept (the heartbeat names
        it with the stages: ``Journal.heartbeat_facts``): ended, the leader rolls it back no
        more, and what its rollback would restore goes (``Journal.end_way_back``,
        ``plans.sweep_stage_dirs``). The journal says it once: the heartbeat names that
        rollout no more, so the leader never says it again, and a sweep, or a removal of a
        forgotten stage's directory, that failed here is tried again by the agent itself
        (``_swept``; review of s59 L5, of s60a M2)."""
        over = self.journal.forget_stages(rollout_ids)
        removed = self._remove_stages(over, "its rollout ended")
        swept = None
        if self.journal.end_way_back(rollout_ids) is not None and self.driver is not None:
            swept = self._sweep(self.driver, again=False)
        if not removed:
            swept = False
        return {s.rollout_id for s in over}, swept

    def _remove_stages(self, over: Sequence[Staged], why: str = "a later rollout staged") -> bool:
        """``plans.remove_stages`` (blocking, under the command lock): whether every directory
        went. The journal has forgotten these stages, so no sweep while the agent runs would
        find them again (it sweeps the rollouts the journal knows): one whose removal failed
        is kept here and tried again with each sweep (``_sweep``, after a failure
        ``_swept``'s retries; review of s60a M2)."""
        failed = plans.remove_stages(over, why)
        self._unremoved.extend((staged, why) for staged in failed)
        return not failed

    def _retry_removals(self) -> None:
        """A command's removals of stages it ended (``_remove_stages``, CreateCSR's) that
        failed are tried again after a while (``_swept``), unless a sweep is coming anyway."""
        if self._unremoved and self._sweep_retry is None and all(t.done() for t in self._sweeps):
            self._swept(False)

    def sweep_stages(self) -> None:
        """A transaction ended on the node (``Runner.on_end``): the stage directories it left
        unneeded (a superseded certificate's, with its key) removed soon, in a task of its
        own (``plans.sweep_stage_dirs``), under the command lock, so that no Stage, CreateCSR
        or switch's plan writes in a directory meanwhile. A failure is logged and tried again
        (``_swept``). None once the agent stops (``close``)."""
        if self.driver is None or self._closing:
            return
        task = asyncio.ensure_future(self._sweep_stages(self.driver))
        self._sweeps.add(task)  # (kept: a task nothing refers to may be collected)
        task.add_done_callback(self._sweeps.discard)

    async def _sweep_stages(self, driver: Driver) -> None:
        try:
            async with self._lock:
                done = await _to_its_end(dbthread.run(self._sweep, driver))
        except Exception as exc:  # (the store thread's hand-off itself)
            _sweep_failed(exc)
            done = False
        self._swept(done)

    def _sweep(self, driver: Driver, *, again: bool = True) -> bool:
        """One sweep while the agent runs (blocking, under the command lock): whether it did
        all it meant to. First (``again``) the directories of forgotten stages whose removal
        failed (``_remove_stages``), unless the journal knows their rollout again (its stage
        made again: its files are not superseded). Nothing once the agent stops (``close``):
        a sweep handed to the store's thread before then may run after the journal closed."""
        if self._closing:
            return True
        try:
            if again and self._unremoved:
                known = self.journal.stage_needs().known
                left = [(s, why) for s, why in self._unremoved if s.rollout_id not in known]
                self._unremoved = [(s, why) for s, why in left if plans.remove_stages([s], why)]
            done = plans.sweep_stage_dirs(self.journal, driver, at_start=False)
        except Exception as exc:
            _sweep_failed(exc)
            return False
        return done and not self._unremoved

    def _swept(self, done: bool) -> None:
        """A sweep ended (``done``: it did all it meant to). One that did not (a removal that
        failed, a config it could not read) is tried again after ``SWEEP_RETRY_FIRST``
        seconds, twice as long after each failure, up to ``SWEEP_RETRIES`` times: the
        files it did not remove may hold a superseded key, and no other sweep may come for a
        long time (the next transaction's end, the agent's next start; after the leader said
        the way back's rollout ended, it never says it again: review of s59 L5). A retry is
        a sweep as at a transaction's end, in a task of its own under the command lock
        (``sweep_stages``), never on a command's path. Whatever ended, a retry already
        waiting is replaced; none once the agent stops (``close``)."""
        if self._sweep_retry is not None:
            self._sweep_retry.cancel()
            self._sweep_retry = None
        if self._closing:
            return
        if done:
            self._sweep_retries = 0
            return
        if self._sweep_retries >= SWEEP_RETRIES:
            log.warning(
                "stage.sweep_given_up",
                retries=self._sweep_retries,
                detail="the next transaction's end, or the agent's next start, tries again",
            )
            self._sweep_retries = 0
            return
        delay = SWEEP_RETRY_FIRST * 2**self._sweep_retries
        self._sweep_retries += 1
        log.info("stage.sweep_again", retry=self._sweep_retries, again_in=delay)
        self._sweep_retry = asyncio.get_running_loop().call_later(delay, self.sweep_stages)

    async def close(self) -> None:
        """The agent stops (``runtime._serve``: after the runner closed, whose transactions'
        ends start sweeps, and before the journal closes): no sweep of the stage directories
        begins from now on, a retry waiting is cancelled and a sweep's task is stopped
        (review of s60a M1: a retry fired while the agent stopped, or after the journal
        closed, and failed there, and was tried again). A sweep the store's thread was
        already running ends there first (``dbthread.run`` runs what it was handed): waited
        for, so that nothing of the sweeps writes or logs once this returns. The next start
        sweeps everything (``plans.sweep_stage_dirs``)."""
        self._closing = True
        if self._sweep_retry is not None:
            self._sweep_retry.cancel()
            self._sweep_retry = None
        sweeps = set(self._sweeps)
        for task in sweeps:
            task.cancel()
        if sweeps:
            _, left = await asyncio.wait(sweeps, timeout=SWEEP_STOP_SECONDS)
            if left:
                log.error(
                    "agent.task_would_not_stop",
                    task="stage-sweep",
                    detail="a task did not stop in time at the agent's stop; the process ends "
                    "anyway",
                )
        await dbthread.barrier()

    def _own_key(self, driver: Driver, rollout_id: str, key_pem: bytes) -> tuple[Staged, set[str]]:
        """Write the practice's key where CreateCSR would have made one (as CreateCSR's), journalled
        with no CSR, and the rollouts whose stages that ended, their directories removed
        (blocking)."""
        share = plans.sharing(driver)
        key_file = plans.make_stage_dir(driver, rollout_id, share) / "server.key"
        plans.write_staged(key_file, key_pem, share)
        over: list[Staged] = []
        if self.journal.staged(rollout_id) is None:
            over = self.journal.record_csr(rollout_id, key_file, b"")
            self._remove_stages(over)
        staged = self.journal.staged(rollout_id)
        assert staged is not None
        return staged, {s.rollout_id for s in over}

    async def _pin_ahead(
        self,
        change: Change = Change.ROTATE_CERT,
        rollout_id: str = "",
        *,
        known: bool | None = None,
    ) -> None:
        """The served certificate's pin of the plan made next taken off the store's thread
        (``plans.take_served_pin``): ``_prepare``'s rotate-cert plan (no ``rollout_id``), for a
        driver it makes one for; a switch's, but enable-tls's (no https yet) and a switch the
        Stage prepared (``_take_prepared``: its pin taken then; read here as a hint only, a
        plan made after all makes its own handshake), nor a switch this agent holds already
        (``_switch_known``; ``known``: asked already)."""
        driver, prepared = self.driver, self._prepared
        if driver is None or self.runner is None or change is Change.ENABLE_TLS:
            return
        if not rollout_id and not driver.config_decides:  # (as ``_prepare`` looks)
            return
        if rollout_id and prepared is not None and prepared.rollout_id == rollout_id:
            return
        if rollout_id and (known if known is not None else await self._switch_known(rollout_id)):
            return  # a replay (a Switch sent again, a watch reopened): no plan is made
        await plans.take_served_pin(driver)

    async def _switch_outlook(self, rollout_id: str) -> tuple[bool, Txn | None]:
        """``_switch_known``, and if it is not known the transaction this node is busy with
        (not ended), if any, from the same read (``Journal.outlook``)."""
        runner = self.runner
        if runner is not None and (rollout_id, TxnKind.SWITCH.value) in runner.tasks:
            return True, None
        seen = await dbthread.run(self.journal.outlook, rollout_id, TxnKind.SWITCH)
        return seen.existing is not None, seen.running if seen.existing is None else None

    async def _switch_known(self, rollout_id: str) -> bool:
        """Whether this agent holds the switch of ``rollout_id`` already (its runner runs or
        ran it, or the journal has it): a replay, which ``_begin`` reports, so no handshake is
        made for a plan it never makes (review s72 L: a Switch repeated through a reopened
        watch made one before finding its transaction). The journal is read only where the
        runner does not know it (an agent restarted since it ended)."""
        runner = self.runner
        if runner is not None and (rollout_id, TxnKind.SWITCH.value) in runner.tasks:
            return True
        return await dbthread.run(self.journal.get, rollout_id, TxnKind.SWITCH) is not None

    def _prepare(self, rollout_id: str, coming: Coming | None = Coming()) -> None:
        """Blocking, on the store's thread: the switch that follows this stage made ready now
        (``Prepared``), while another node switches, instead of in the switch: its plan and
        target config (the live config read and parsed, the new one rendered) and that
        config written and fsynced beside the live one (issue 15: a switch began with that
        work, and its freeze call waited for it). Made for the change the node's state
        implies (rotate-cert on https, else enable-tls), with the password verifier and
        keep_http the Stage says the switch will carry (``coming``; a leader of an earlier
        release says nothing: none, and http closes; None: the Stage's were unreadable, and
        nothing is made), for drivers whose facts and render come from the config file alone;
        a switch it does not fit is made as before. Kept in memory only: an agent that
        restarts removes the staged file at its start (``Driver.discard_stale_staged``)."""
        self._drop_prepared()
        driver, runner = self.driver, self.runner
        if driver is None or runner is None or not driver.config_decides or coming is None:
            return
        try:
            # Before the staging, which copies the mode: a chmod after this is seen at the take.
            owner_and_mode = _owner_and_mode(driver.config_file)
            with driver.reading_once():
                source = driver.read_config()
                live = self.journal.live_tls()
                # What the server serves decides, not the journal (``plans.served_live``).
                https = "https" in driver.facts().schemes
                txn_dir = self._txn_dir()
                if https:  # a rotation keeps the live verifier and http as they are
                    built = plans.rotate_plan(self.journal, driver, txn_dir, rollout_id, None)
                else:
                    built = plans.switch_plan(
                        self.journal,
                        driver,
                        txn_dir,
                        rollout_id,
                        coming.verifier,
                        keep_http=coming.keep_http,
                    )
            staged = self.journal.staged(rollout_id)
            if staged is None or driver.read_config() != source:
                return  # changed meanwhile: the switch makes its own
            staging = runner.stage_target(rollout_id, built.config, built.plan, source)
        except Exception as exc:  # the switch makes its own, and says what is wrong
            log.warning(
                "stage.prepare_failed",
                rollout_id=rollout_id,
                error=describe(exc),
                detail="preparing the switch ahead failed; the switch makes its own and says "
                "what is wrong",
            )
            return
        # A rotation keeps the live verifier (its file is the live one): made with none.
        verifier = None if https else coming.verifier
        self._prepared = Prepared(
            rollout_id, built, source, live, staged, staging, owner_and_mode, verifier
        )

    def _drop_prepared(self, *, later: bool = False) -> None:
        """Blocking, on the store's thread: the prepared switch dropped, its staged files too
        (the target's and the source's; ``later``: in the store thread's next hand-off, not in
        this one, which a freeze call waits for: review of session 28, L6)."""
        prepared, self._prepared = self._prepared, None
        driver = self.driver
        if prepared is None or driver is None or not prepared.staging.files():
            return
        files = prepared.staging.files()

        def discard() -> None:
            for staged in files:
                driver.discard_staged(staged)

        if later:
            try:
                done = dbthread.executor().submit(contextvars.copy_context().run, discard)
            except RuntimeError:  # the agent is stopping: its thread takes no more work
                pass
            else:
                done.add_done_callback(_discarded)
                return
        discard()

    def _take_prepared(
        self,
        rollout_id: str,
        wanted: str,
        verifier: dict[str, Any] | None,
        keep_frozen: bool,
        seen: Outlook,
    ) -> tuple[Built, bytes, transaction.Staged] | None:
        """Blocking, on the store's thread: the switch ``_prepare`` made for this one (its
        plan with ``keep_frozen``, the live config it replaces, its staging), if it is for this
        rollout and change (keep_http included), with the password verifier it was made with
        (a rotation ignores it), and what it was made from is unchanged (the verifier file
        written at the stage included):
        the live config (read, not parsed), what the journal says is live, the staged
        certificate, the live config's mode and owner (an admin's chmod since: review of
        session 28, L4), the config's directory still safe (``config_dir_problem``), the
        config no symbolic link (``config_link_problem``) and the staged file's content. Else
        None (the switch makes its own;
        the create drops the prepared one, after its own hand-off). ``seen``: the journal as
        the create read it, in the same hand-off (``Journal.outlook``)."""
        prepared = self._prepared
        driver = self.driver
        if prepared is None or driver is None:
            return None
        built = prepared.built
        config, back = prepared.staging.config, prepared.staging.source
        try:
            fits = (
                prepared.rollout_id == rollout_id
                and built.plan.change == wanted
                and (wanted == Change.ROTATE_CERT.value or verifier == prepared.verifier)
                and _verifier_kept(built, prepared.verifier)
                and driver.read_config() == prepared.source
                and _owner_and_mode(driver.config_file) == prepared.owner_and_mode
                # a directory another user may swap since: the switch's own plan refuses it
                and config_dir_problem(driver.config_file.parent) is None
                and config_link_problem(driver.config_file) is None
                and seen.live_tls == prepared.live_tls
                and seen.staged == prepared.staged
                and all(
                    c is None or c.file is None or _holds(c.file, c.data) for c in (config, back)
                )
            )
        except OSError:
            fits = False
        if not fits:
            return None
        self._prepared = None  # the switch owns its staging now
        plan = dataclasses.replace(built.plan, keep_frozen=keep_frozen)
        return Built(built.config, plan, built.fingerprint), prepared.source, prepared.staging

    # --- transactions -------------------------------------------------------------------------

    async def _begin(
        self,
        rollout_id: str,
        kind: TxnKind,
        epoch: int,
        make: Callable[[], Built],
        *,
        change: str = "",
        ready: Callable[[Outlook], tuple[Built, bytes, transaction.Staged] | None] | None = None,
        handed: Callable[[], None] = lambda: None,
    ) -> Txn:
        """Create (or find, on a replay) the transaction and hand it to the runner. A switch
        journalled under this id for another ``change`` is no replay: refused, never answered
        with that other switch's outcome (a finalize needs a rollout id of its own).
        ``handed``: called once the journal's write is queued on the store's thread (its
        ``Receipts`` note ends)."""
        assert self.runner is not None
        runner = self.runner
        first = next_action(Phase.STARTED)
        prepared = False  # the switch made ready at its Stage was taken (logged with txn.started)

        def create() -> tuple[Txn, bool, Staging | None]:
            """``created``; a switch prepared at a Stage that this one did not take (another
            transaction, a Rollback among them, or a switch it does not fit) is dropped, its
            file removed after the staging ``created`` queued (review of session 28, L5, L6:
            a prepared file lingered after an abort; its removal came before the freeze)."""
            try:
                return created()
            finally:
                self._drop_prepared(later=True)

        def created() -> tuple[Txn, bool, Staging | None]:
            """The existing transaction (a replay) or a new one, journalled with its plan, both
            configs and its first step's "begin" in one write: one hand-off to the store's
            thread for the whole begin (issue 15), in the order the checks always had. Its
            target config is staged for the runner in the store thread's next hand-off
            (``Runner.stage_next``), while the runner begins; its freeze call waits for it.
            What it looks at in the journal before its write is read at once (one read,
            ``Journal.outlook``; the store's thread is its only writer)."""
            nonlocal prepared
            seen = self.journal.outlook(rollout_id, kind)
            existing = seen.existing
            done = str(existing.plan.get("change", "")) if existing is not None else ""
            if existing is not None and change and done and done != change:
                raise failed_precondition(another_switch(rollout_id, done, change))
            if existing is not None:  # a replay: report, never run twice
                return existing, False, None
            # Refused once it is no replay: a transaction that ran before the node came to need
            # the admin is reported, not refused as never begun (review s71 revplans, H1).
            self._refuse_if_needs_admin()
            if seen.running is not None:
                raise busy_with(seen.running)
            made = ready(seen) if ready is not None else None
            if made is not None:  # made when the node was staged (``_prepare``)
                (config, plan, fingerprint), live_config, staging = made
                prepared = True
            else:
                driver = self._driver()
                try:
                    with driver.reading_once():  # the plan and the source: one read of the file
                        config, plan, fingerprint = make()
                        # Nothing is frozen or written yet: the live config is the source.
                        live_config, staging = plans.read_source(driver), None
                except BaseException:
                    self._drop_verifier(rollout_id)
                    raise
            source, target = plan.source_schemes, plan.target_schemes
            facts = plan.facts
            txn = Txn(
                rollout_id=rollout_id,
                kind=kind,
                epoch=epoch,
                phase=Phase.STARTED,
                plan=plan.to_json(),
                started_at=self.clock(),
                old_url=" ".join(facts.url(s) for s in source),
                new_url=" ".join(facts.url(s) for s in target),
                cert_fingerprint=fingerprint,
                target_config=config,
                source_config=live_config,
            )
            try:
                created = self.journal.create(txn, begin=first)
            except BaseException:
                for staged in staging.files() if staging is not None else ():
                    self._driver().discard_staged(staged)
                if made is None:
                    self._drop_verifier(rollout_id)
                raise
            return created, True, staging if staging is not None else runner.stage_next(created)

        async with self._lock:
            try:
                txn, new, staged = await dbthread.run(create)
            finally:
                handed()  # its write (or replay's read) queued: GetTransaction is behind it
            if not new:
                if not txn.finished:
                    runner.start(txn)
                return txn
            runner.start(txn, begun=first, staged=staged)
        await runner.under_way(txn)  # its freeze call first, then the log and the first message
        log.info("txn.started", rollout_id=rollout_id, kind=kind, prepared=prepared)
        return txn

    def _txn_dir(self) -> Path:
        return self.cfg.data_dir / "txn"

    def _drop_verifier(self, rollout_id: str) -> None:
        """(Blocking.) A switch made here was not journalled: the verifier file its plan may
        have written goes now, not at the agent's next start
        (``plans.drop_unjournalled_verifier``). Never the switch's trouble: it is logged."""
        try:
            plans.drop_unjournalled_verifier(self.journal, self._driver(), rollout_id)
        except Exception as exc:
            log.warning(
                "stage.remove_failed",
                rollout_id=rollout_id,
                error=type(exc).__name__,
                hint="the error says why it could not be removed: remove the path named by hand "
                "if it is still there",
            )

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def Switch(self, request: agent_pb2.SwitchRequest, context: Ctx) -> agent_pb2.Transaction:
        return txn_message(await self._switch(request, context), self.driver)

    async def _switch(self, request: agent_pb2.SwitchRequest, context: Ctx) -> Txn:
        """Begin the switch (or find it, on a replay): Switch, and WatchTransaction with
        ``switch`` set. Noted received (``Receipts``) until its journal write is queued."""
        with self._receipts.receiving(request.command.rollout_id, TxnKind.SWITCH) as handed:
            return await self._switch_received(request, context, handed)

    async def _switch_received(
        self, request: agent_pb2.SwitchRequest, context: Ctx, handed: Callable[[], None]
    ) -> Txn:
        rollout_id = await self._command(context, request.command, begins=TxnKind.SWITCH)
        change = CHANGE.read(request.change, "change")
        builders = {
            Change.ENABLE_TLS: plans.switch_plan,
            Change.CHANGE_PASSWORD: plans.password_plan,
            Change.ROTATE_CERT: plans.rotate_plan,
            Change.FINALIZE: plans.finalize_plan,
        }
        if change not in builders:
            raise invalid(f"change {change.value} is not a switch this agent makes")
        if request.keep_http and change is not Change.ENABLE_TLS:
            raise invalid("keep_http is for enable-tls only (transitional phase 1)")
        if request.quiet_seconds and change is not Change.FINALIZE:
            raise invalid("quiet_seconds is for finalize only (rollout finalize --when-quiet)")
        verifier = self._verifier(
            request.auth_verifier_json, required=change is Change.CHANGE_PASSWORD
        )
        driver = self._driver()
        build = builders[change]
        extra = {"keep_http": True} if request.keep_http else {}
        wanted = plans.ENABLE_DUAL if request.keep_http else change.value

        def make() -> Built:
            return build(
                self.journal,
                driver,
                self._txn_dir(),
                rollout_id,
                verifier,
                keep_frozen=request.keep_frozen,
                **extra,
            )

        def ready(seen: Outlook) -> tuple[Built, bytes, transaction.Staged] | None:
            return self._take_prepared(rollout_id, wanted, verifier, request.keep_frozen, seen)

        known = None  # whether the switch is a replay, once asked (``_switch_known``)
        if change in plans.KEEPS_CERTIFICATE:
            known, busy = await self._switch_outlook(rollout_id)
            if not known:
                # Refused as ``_begin`` would, first, in its order: a journal put back says so,
                # not the certificate's words, which the leader took for "nothing began"
                # (review s73 revhttps; ``rollout_core.after_refusal``); so does a node busy
                # with another transaction (session 73's L), whose server that one may be
                # restarting under the handshake below.
                self._refuse_if_needs_admin()
                if busy is not None:
                    raise busy_with(busy)
                if request.quiet_seconds:  # (a finalize's: ``KEEPS_CERTIFICATE``)
                    await self._refuse_unless_quiet(rollout_id, request.quiet_seconds)
            # The start's check (``plans.plan_problem``) asked again, nothing changed yet: a
            # certificate changed since would freeze, restart and roll back (review s72 L).
            untrusted = plans.untrusted_now
            if not known and (
                refused := await asyncio.to_thread(untrusted, self.journal, driver, change)
            ):
                raise PlanRefused(refused)
        await self._pin_ahead(change, rollout_id, known=known)
        return await self._begin(
            rollout_id,
            TxnKind.SWITCH,
            request.command.epoch,
            make,
            change=wanted,
            ready=ready,
            handed=handed,
        )

    async def _refuse_unless_quiet(self, rollout_id: str, quiet_seconds: int) -> None:
        """``finalize --when-quiet``: refuse the switch (FAILED_PRECONDITION, nothing begun)
        if the server, asked afresh just before the switch's freeze, saw a client on http
        within ``quiet_seconds`` or cannot tell (``clients.quiet_refusal``). The leader's gate
        judged from the view the agent reported, which it reuses for ``clients_refresh``
        seconds: a workstation that wrote on http in those seconds was not in it, and the
        switch's restart wiped the reference server's memory of it before any report (review
        s64 M). The view read here is the driver's cached one from now on, which GetStatus and
        the heartbeats send: the leader stores the sighting. Asked only for a switch not begun
        (a replay, the leader asking again, is under way: not judged again), on a node that
        neither needs the admin nor is busy with another transaction (``_switch``: those
        refusals first, in ``_begin``'s order; session 74's L4: a busy node answered with the
        quiet check's words, the server read under that other transaction's restart)."""
        view = await self._driver().clients_now()
        why = quiet_refusal(view, dt.datetime.now(dt.UTC), quiet_seconds)
        if why is not None:
            log.info("switch.not_quiet", rollout_id=rollout_id, reason=why)
            raise failed_precondition(why)

    @staticmethod
    def _verifier(text: str, *, required: bool) -> dict[str, Any] | None:
        if not text:
            if required:
                raise invalid("change-password needs the new password's verifier")
            return None
        try:
            return dict(password.verifier_from_json(text))
        except ValueError as exc:
            raise invalid(f"bad password verifier: {exc}") from None

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def Rollback(
        self, request: agent_pb2.RollbackRequest, context: Ctx
    ) -> agent_pb2.Transaction:
        """Noted received (``Receipts``) until its journal write is queued."""
        with self._receipts.receiving(request.command.rollout_id, TxnKind.ROLLBACK) as handed:
            return await self._rollback(request, context, handed)

    async def _rollback(
        self, request: agent_pb2.RollbackRequest, context: Ctx, handed: Callable[[], None]
    ) -> agent_pb2.Transaction:
        rollout_id = await self._command(context, request.command, begins=TxnKind.ROLLBACK)
        if request.undoes:  # (empty: the newest switch from http)
            _rollout_id(request.undoes, "undoes")
        driver = self._driver()

        def make() -> Built:
            return plans.rollback_plan(
                self.journal,
                driver,
                self._txn_dir(),
                rollout_id,
                keep_frozen=request.keep_frozen,
                # An old leader sends the undone rollout's id as the command's: undo that.
                undoes=request.undoes if request.HasField("undoes") else None,
            )

        await plans.take_served_pin(driver)  # (the plan's pin: off the store's thread)
        txn = await self._begin(
            rollout_id, TxnKind.ROLLBACK, request.command.epoch, make, handed=handed
        )
        return txn_message(txn, self.driver)

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def Freeze(
        self, request: agent_pb2.FreezeRequest, context: Ctx
    ) -> agent_pb2.FreezeResponse:
        rollout_id = await self._command(context, request.command)
        # Never longer than MAX_FREEZE_LEASE: a switch of a restarted agent that cannot read
        # the lease unfreezes after that long (``Runner._unfreeze``); the leader asks no more
        # (its config's bound).
        seconds = min(request.lease_seconds or DEFAULT_FREEZE_LEASE, MAX_FREEZE_LEASE)
        async with self._freeze_lock:  # not across the lease watch's lift (``_lift_lapsed_freeze``)
            # The lease first: a freeze must never be without a deadline, even for an instant.
            # Its deadline runs in elapsed time from here (``nodeagent.lease``), noted before
            # the journal write: a lease the journal may hold is always known to this process.
            lease = self.leases.grant(rollout_id, seconds, self.clock(), self.monotonic())
            await asyncio.to_thread(self.journal.set_freeze_lease, lease)
            try:
                watermark = await self._driver().freeze(DRAIN_TIMEOUT)
            finally:
                self._freeze_changed()
        log.info(
            "scope_freeze.on",
            rollout_id=rollout_id,
            watermark=watermark,
            lease_seconds=seconds,
        )
        return agent_pb2.FreezeResponse(frozen=True, watermark=watermark)

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def Unfreeze(
        self, request: agent_pb2.FreezeRequest, context: Ctx
    ) -> agent_pb2.FreezeResponse:
        rollout_id = await self._command(context, request.command)
        driver = self._driver()
        async with self._freeze_lock:  # not across a Freeze or the lease watch's lift
            try:
                # A transaction under way owns the server's freeze (its config may be being
                # written, its server restarting): the scope freeze ends (its lease), and the
                # transaction's end lifts the freeze, no lease being left (review s69
                # revfreeze L1: unfrozen here, entries were taken while the config changed).
                # The lease watch and the runner's lifts look the same way.
                running = await asyncio.to_thread(self.journal.unfinished)
                if not running:
                    await driver.unfreeze()
                await asyncio.to_thread(self.journal.set_freeze_lease, None)
            finally:
                self._freeze_changed()
        if running:
            log.warning(
                "scope_freeze.off_left_to_switch",
                rollout_id=rollout_id,
                detail="a transaction is under way on this node: its end lifts the freeze",
            )
            return agent_pb2.FreezeResponse(frozen=False, watermark=await driver.watermark())
        log.info("scope_freeze.off", rollout_id=rollout_id)
        return agent_pb2.FreezeResponse(frozen=False, watermark=await driver.watermark())

    @map_stream_errors(ERRORS, full_disk=FULL_DISK)
    async def WatchTransaction(
        self, request: agent_pb2.GetTransactionRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.Transaction]:
        """The transaction now, then again each time the runner journals a change to it (its
        ``changes`` event: no polling); the stream ends once it has an outcome. A leader whose
        stream broke opens a new one and gets the current state first, so it misses nothing.
        With ``switch`` set the switch is begun first, as Switch would (its refusals end the
        stream before any state; a replay begins nothing)."""
        require_leader(context, self.trust)
        _rollout_id(request.rollout_id)
        kind = TXN_KIND.read(request.kind, "kind")
        begun: Txn | None = None
        if request.HasField("switch"):  # begin it first: one call, not Switch + this
            if (request.rollout_id, kind) != (request.switch.command.rollout_id, TxnKind.SWITCH):
                raise invalid("switch: rollout_id must be the command's and kind switch")
            begun = await self._switch(request.switch, context)
        wanted = frozenset(request.phases)  # (empty: every state)
        try:
            async for message in self._follow(request.rollout_id, kind, begun, wanted):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if begun is None:
                raise
            # Begun: nothing from here on is a refusal (the leader records a refusal as "the
            # node as it was"). UNAVAILABLE: it asks again, and a replay reports the state.
            raise RpcStatusError(
                grpc.StatusCode.UNAVAILABLE,
                f"the switch began; its state could not be sent: {describe(exc)}",
            ) from exc

    async def _follow(
        self, rollout_id: str, kind: TxnKind, begun: Txn | None, wanted: frozenset[int]
    ) -> AsyncIterator[agent_pb2.Transaction]:
        """WatchTransaction's messages: ``begun`` (the switch just begun) at once, with no
        read in between, then the journal's record each time the runner changes it. With
        ``wanted`` (the request's ``phases``) a pending state of another phase is passed over,
        unless it is the stream's first: each state holds the record so far, so the next one
        sent says what it said (a switch's restarted state, which the leader does not use, is
        one message fewer inside the freeze window)."""
        sent: Txn | None = None
        if begun is not None:
            yield txn_message(begun, self.driver)
            sent = begun
            if begun.finished:
                return
        while True:
            changed = self.runner.changes.next() if self.runner is not None else None
            # The runner's last record of it, as journalled (``TxnChanges.latest``); else
            # (not written by this process, or long ago) the journal's.
            txn = self.runner.changes.latest(rollout_id, kind) if self.runner else None
            if txn is None:
                txn = await asyncio.to_thread(self.journal.get, rollout_id, kind)
            if txn is None:
                raise not_found(f"no {kind.value} transaction for rollout {rollout_id!r}")
            if txn != sent:
                if (
                    sent is None
                    or not wanted
                    or txn.finished
                    or TXN_PHASE.wire(txn.phase) in wanted
                ):
                    yield txn_message(txn, self.driver)
                sent = txn
            if txn.finished or changed is None:
                return
            # The timeout only guards against a change journalled outside the runner (a
            # replay after a restart is another process, so another stream); it sends nothing
            # unless the record changed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_RECHECK_SECONDS):  # not wait_for (3.11)
                    await changed.wait()

    @map_errors(ERRORS, full_disk=FULL_DISK)
    async def GetTransaction(
        self, request: agent_pb2.GetTransactionRequest, context: Ctx
    ) -> agent_pb2.Transaction:
        """The transaction as the journal holds it, read on the store's thread behind every
        journal write handed to it before (``dbthread.run``): a handler whose call was cut off
        (a stream reset reaches the leader first) may have handed its transaction's begin to
        that thread, and a read beside it (``asyncio.to_thread``) answered "none" of a
        transaction journalled and begun a moment later; the leader, asking after such an
        answer, recorded "nothing on the node was changed" (review s72 refused, L6). What
        that thread runs is short: journal and config writes, a stage's prepare, a switch's
        begin (its plan; a template driver's look at the server's ports, 1 s at most a port
        not answering); never a freeze, restart or verify, which wait on the server.

        A Switch or Rollback of the same key received and not yet journalled (waiting for
        the command lock, its epoch's check, its plan: ``Receipts``) is waited for first,
        ``RECEIVING_WAIT`` at most, so that the answer is what it leaves (session 73: "none"
        was answered of a transaction such a handler journalled a moment later); still not
        journalled, the answer is UNAVAILABLE, which a leader of any release takes as no
        answer: it asks again, or sends its request again (a replay begins nothing)."""
        require_leader(context, self.trust)
        _rollout_id(request.rollout_id)
        kind = TXN_KIND.read(request.kind, "kind")
        remaining = context.time_remaining() if context is not None else None
        wait = RECEIVING_WAIT if remaining is None else max(0.0, min(RECEIVING_WAIT, remaining - 1))
        if not await self._receipts.settled(request.rollout_id, kind, wait):
            raise being_received(request.rollout_id, kind)
        txn = await dbthread.run(self.journal.get, request.rollout_id, kind)
        if txn is None:
            raise not_found(f"no {kind.value} transaction for rollout {request.rollout_id!r}")
        return txn_message(txn, self.driver)
