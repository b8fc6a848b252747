"""Keeps the node's bootstrap service (port 9443) in step with what the server has live.

While the managed server is on https with an auth password, workstations can fetch the CA
and enrol there; on http (before the switch, or after a rollback) the service is closed. The
service uses the server's own certificate and key and the live verifier; a workstation's CSR
is signed by the leader's CA over the agent's mutual-TLS channel. Its cryptography (SPAKE2,
AES-GCM, the CSR's and certificates' checks) runs in the agent's crypto worker (``crypto``, a
``nodeagent.cryptoworker.CryptoWorker``; ``nodeagent.bootstrap_crypto``'s ops), so that the
agent never holds ``cryptography`` or ``spake2`` for it.

The failure counts (``Guard``) and the failures not yet reported (``FailureLog``) belong to the
host, not to one service: a restart of the service (a new password, a rollback and a new
switch) neither clears an address's backoff nor loses failures the leader has not seen.

Nor does a restart of the agent (kill, OOM, an upgrade) give a guesser a fresh daily ceiling or
lose what the leader has not seen: each counted failure is written to the journal (its time,
and the unreported log; one write, before the 401 is answered), and the next run counts those
times against the node again and reports the rest. A source's and a name's backoff start over
(minutes at most; the ceiling is what bounds the guesses a day). The journal holds what the
schema shows of a failure (address, claimed name, time), never a guess.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import urllib.parse
from collections.abc import Callable, Collection
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import grpc

from nodeagent import plans, warmup
from nodeagent.config import AgentConfig
from nodeagent.cryptoworker import InProcess
from nodeagent.failure_log import FailureLog
from nodeagent.identity import Identity
from nodeagent.journal import Journal
from tlsroll import backoff, logs, password, peertext, spiffe
from tlsroll.enums import NO_SETTINGS, RETRY_AFTER_KEY, SERVES_PREVIOUS
from tlsroll.errors import TerminalError, TlsrollError, os_error_text
from tlsroll.fsutil import check_private_file, read_regular
from tlsroll.rpc import hostport, node_removed
from tlsroll.v1 import leader_pb2, leader_pb2_grpc

if TYPE_CHECKING:
    from nodeagent.bootstrap_server import BootstrapService, Guard, Signed, Withdrawal
    from tlsroll.v1 import agent_pb2

log = logs.get_logger(__name__)

# A service that should run and did not start is tried again after RETRY_FIRST seconds, the
# wait doubling to RETRY_MOST: a port held for a moment (a program restarting) is taken within
# seconds, and a PC waits at most a minute once the port is free; an attempt a minute (the
# journal read, the files read, a bind) costs nothing worth saving. The crypto worker is asked
# only once the port is taken (``BootstrapService.start``): a try that asked it first started
# its child (idle after IDLE_SECONDS, a minute too) at every try of a long outage, 1,440 a day
# (review s44rev2 M1).
RETRY_FIRST = 2.0
RETRY_MOST = 60.0
# What the node's problem says of a journal unread while the service serves on (``_unread``),
# the cause cut to fit the heartbeat's 200 characters.
UNREAD = "journal unread ({}): a new password or a rollback is not in effect; check the node's disk"
UNREAD_CAUSE = 200 - len(SERVES_PREVIOUS) - len(UNREAD.format(""))


class Crypto(Protocol):
    """The agent's crypto worker as the host uses it (``nodeagent.cryptoworker``)."""

    async def call(self, op: str, request: dict[str, Any]) -> Any: ...

    def warm(self) -> None: ...


class SignRefused(TerminalError):
    """The leader did not sign a workstation's certificate; ``refused`` when it said no (a
    name another workstation holds, too many for this node), not merely could not be asked;
    ``retry``: the seconds until it signs again, where it said (this node's hourly cap)."""

    def __init__(self, message: str, *, refused: bool = False, retry: float | None = None) -> None:
        super().__init__(message)
        self.refused = refused
        self.retry = retry


def retry_of(exc: grpc.aio.AioRpcError) -> float | None:
    """The seconds a leader's refusal says to wait (``RETRY_AFTER_KEY``), None if it says
    none (another refusal, an older leader) or nothing readable: at most a day."""
    if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailing = exc.trailing_metadata()
    said: list[object] = []
    if isinstance(trailing, grpc.aio.Metadata):
        said = list(trailing.get_all(RETRY_AFTER_KEY))
    for value in said:
        if isinstance(value, str) and value.isdigit():
            return float(min(int(value), 86400))
    return None


# What the leader answers when it will not sign for a reason the workstation can act on.
REFUSALS = frozenset({grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED})
# And a renewal's (``BootstrapHost.renew``): its certificate revoked, ended or not on
# record, no proof of it (FAILED_PRECONDITION), a CSR or proof refused (INVALID_ARGUMENT).
RENEW_REFUSALS = REFUSALS | {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def guard_times(earlier: list[float], wall: float, mono: float) -> list[float]:
    """An earlier run's failure times (Unix seconds, oldest first) on the service's clock
    (monotonic: ``mono`` is its now, ``wall`` the wall clock's), from their age by the wall
    clock. A time up to ``FUTURE_SLACK`` ahead counts as now; one further ahead was counted
    while the clock was ahead and is dropped: it would impose the day's ceiling again at every
    restart until the clock passes it (s34 review L3)."""
    return backoff.on_clock(earlier, wall, mono)


def _read_verifier(name: str, shared: tuple[int, int] | None) -> bytes:
    """The live verifier file's bytes (blocking), refused as a key file is
    (``check_private_file``, ``UnsafePermissions`` naming it) if others may read it: the
    verifier is as good as the password to a guesser. The agent writes it 0600, or 0640 with
    the config's group for a server running as its own user (``plans.write_verifier``): a
    mode beyond that was set by hand (s69)."""
    path = Path(name)
    check_private_file(path, shared=shared)
    return read_regular(path)


def _ca_bundle(ca_file: str) -> bytes:
    """(Blocking: in a worker thread, review s45rev4 L3: a large file took seconds of the event
    loop.) The CA bundle ``ca_file`` read, and refused (ValueError naming the file) if a
    certificate of it says it is no CA (``plans.ca_bundle_problem``): refused here, not by the
    worker's check at ``start``, since each try of the outage started the worker's child for it
    (one a minute)."""
    pem = read_regular(Path(ca_file))  # never a FIFO's endless wait (review rev50a L2)
    if why := plans.ca_bundle_problem(pem):
        raise ValueError(f"{ca_file}: {why}")
    return pem


class BootstrapHost:
    def __init__(
        self,
        cfg: AgentConfig,
        identity: Identity,
        journal: Journal,
        key_reader: Callable[[], tuple[int, int] | None] | None = None,
        *,
        crypto: Crypto | None = None,
    ) -> None:
        self.cfg = cfg
        # The agent's crypto worker (``runtime.serve`` sets it): the service's SPAKE2, sealing
        # and checks run there. ``InProcess`` (tests, tools): in this process.
        self.crypto: Crypto = crypto if crypto is not None else InProcess()
        self.identity = identity
        self.journal = journal
        # (blocking) whom the server's key is shared with (the managed server's user, uid and
        # gid, ``nodeagent.plans.Sharing.reader``), None if no one: the service reads it too.
        self.key_reader = key_reader
        self.service: BootstrapService | None = None
        self.current: dict[str, str] | None = None
        # Why the service that should run (``current``: https with an auth password) did not
        # start; "" when it runs or need not; None until the first ``sync`` has found out.
        # Heartbeats carry it (``LiveServer``), so that the leader shows it as the node's
        # problem (audit s39ws M8: only logged); None as ``bootstrap_pending``.
        self.problem: str | None = None
        # Failed starts in this outage (0: none), the cause last logged in it (``_failed``),
        # and the task that tries again (``_retry``).
        self._tries = 0
        self._said = ""
        # Why the journal could not be read while the service ran and serves on (``_unread``):
        # logged, "" when it was read since; since when (``time.monotonic``), None then.
        self._unread_said = ""
        self._unread_since: float | None = None
        # Whether a transaction runs now (the runtime sets it: the runner's), during which the
        # journal's live settings lag what the server serves (``lacking``); and whether the
        # lack of them was logged (once, and again after it ended).
        self.busy: Callable[[], bool] = lambda: False
        self._lacking_said = False
        self._retrying: asyncio.Task[None] | None = None
        self.guard: Guard | None = None  # made with the first service (see sync)
        self.failures = FailureLog()
        # Why the leader refuses this node as no longer in the cluster, None while it does not
        # (``set_removed``: the link's heartbeats tell it). Kept in the journal: an agent
        # started again while the leader cannot be reached would otherwise check passwords
        # (a guess oracle) until its first refused heartbeat (review s45rev8 L1).
        self.removed: str | None = journal.removed_from_cluster()
        self._removed_saved = self.removed is not None
        # Told the leader's refusal of this node met in a signing (``sign``), which the
        # heartbeats have not seen: the link (``LeaderLink.removed_at_start``), whose next
        # answered heartbeat then says "accepted again" (``set_removed(None)``), and whose
        # next refused one says it as its own.
        self.on_signing_removed: Callable[[str], None] | None = None
        if self.removed is not None:
            log.warning(
                "bootstrap.removed_earlier",
                detail=self.removed[:200],
                then="no workstation password is taken until the leader accepts this node",
            )
        # What an earlier run counted (journal.bootstrap_failures): the times go to the guard
        # when it is made; the unreported failures go with the next heartbeat.
        self._earlier, unreported = journal.bootstrap_failures()
        self.failures.restore(unreported)
        self.failures.on_reported = self._reported
        self._lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()
        self._saving: set[asyncio.Task[None]] = set()
        self._warming: asyncio.Future[ModuleType] | None = None

    def _channel(self) -> grpc.aio.Channel:
        """A mutual-TLS channel to the leader, as this node."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.identity.ca_pem,
            private_key=self.identity.key_pem,
            certificate_chain=self.identity.cert_pem,
        )
        target = hostport(self.cfg.leader_address, self.cfg.control_port)
        # The leader by its identity, not by its address (tlsroll.spiffe).
        host = spiffe.leader_host(self.identity.trust_domain)
        options = [("grpc.ssl_target_name_override", host)]
        return grpc.aio.secure_channel(target, creds, options=options)

    async def sign(self, csr_pem: bytes) -> Signed:
        """The leader signs the workstation's CSR (the service has checked its key confirmation):
        the certificate, and the CA certificate it was issued under (empty from an older
        leader), which the service hands the workstation too if it is a renewal of the staged
        one (``BootstrapService._checked``)."""
        return await self._ask("sign", csr_pem, REFUSALS)

    async def renew(self, csr_pem: bytes) -> Signed:
        """The leader renews a workstation's certificate without the password
        (``Leader.RenewWorkstationCertificate``: the CSR's proof of the current certificate
        is checked against its records). SignRefused (``refused``) if it said no, or is older
        than that call (UNIMPLEMENTED: no renewal through it)."""
        return await self._ask("renew", csr_pem, RENEW_REFUSALS)

    async def _ask(
        self, verb: Literal["sign", "renew"], csr_pem: bytes, refusals: Collection[grpc.StatusCode]
    ) -> Signed:
        """The leader's ``sign`` (``SignWorkstationCertificate``) or ``renew``
        (``RenewWorkstationCertificate``) of ``csr_pem``; SignRefused (``refused`` for the
        codes in ``refusals``) if it said no or could not be asked."""
        from nodeagent.bootstrap_server import Signed  # noqa: PLC0415 (imported by now)

        async with self._channel() as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            call = (
                stub.SignWorkstationCertificate
                if verb == "sign"
                else stub.RenewWorkstationCertificate
            )
            try:
                reply = await call(leader_pb2.SignWorkstationRequest(csr_pem=csr_pem), timeout=15)
            except grpc.aio.AioRpcError as exc:
                if node_removed(exc.code(), exc.details()):
                    # Refused as no longer in the cluster (``tlsroll nodes remove``, or its
                    # certificate revoked): taken as a refused heartbeat's, at once, so that
                    # the next start is a 503 "removed", not a password checked and a 502
                    # (bootstrap review s68 L5: only the next refused heartbeat said it).
                    self._signing_refused(str(exc.details()))
                if verb == "renew" and exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    raise SignRefused(
                        "the cluster's leader is too old to renew without the password: "
                        "upgrade it, or enrol this PC again with the password (tlsroll client "
                        "test-connection URL)",
                        refused=True,
                    ) from None
                raise SignRefused(
                    f"the leader did not {verb}: {exc.details()}",
                    refused=exc.code() in refusals,
                    retry=retry_of(exc),
                ) from None
        return Signed(bytes(reply.certificate_pem), bytes(reply.ca_certificate_pem))

    def _signing_refused(self, why: str) -> None:
        """The leader refused to sign as this node is no longer in the cluster (``why``)."""
        if self.removed is None:
            log.error("bootstrap.removed_by_signing", detail=peertext.clean(why, 200))
        self.set_removed(why)
        if self.on_signing_removed is not None:
            self.on_signing_removed(why)

    async def withdraw(self, cert_pem: bytes) -> Withdrawal:
        """The leader withdraws the workstation certificate ``cert_pem`` it just signed, which
        the service could not deliver (``Leader.WithdrawWorkstationCertificate``), so that it
        does not hold the name: WITHDRAWN if it withdrew it now. HELD, with one log line, if
        the leader could not be asked or refused (an older leader, UNIMPLEMENTED, keeps the
        name held, as before that call existed), or answered that it was revoked already by a
        newer enrolment of the name with --replace, which then holds the name (review s43rev2
        Low, it was taken as withdrawn), or by a withdrawal before; REVOKED if an admin had
        revoked it (``revoke_reason``; the service's answer says so, s44)."""
        from nodeagent.bootstrap_server import Withdrawal  # noqa: PLC0415 (imported by now)

        try:
            async with self._channel() as channel:
                reply = await leader_pb2_grpc.LeaderStub(channel).WithdrawWorkstationCertificate(
                    leader_pb2.WithdrawWorkstationRequest(certificate_pem=cert_pem), timeout=15
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                log.warning(
                    "bootstrap.withdraw_unsupported",
                    why="the leader is older",
                    hint="the leader is older than this agent: upgrade the leader; until then an"
                    " undelivered certificate holds its name",
                )
            else:
                log.error(
                    "bootstrap.withdraw_failed",
                    code=exc.code().name,
                    detail=peertext.clean(str(exc.details()), 200),
                )
            return Withdrawal.HELD
        if reply.withdrawn:
            return Withdrawal.WITHDRAWN
        log.warning(
            "bootstrap.withdraw_revoked_already",
            why="the leader had revoked it",
            reason=peertext.clean(reply.revoke_reason, 100),
            detail="the certificate to withdraw was revoked on the leader already; nothing more "
            "to do",
        )
        if reply.revoke_reason in ("", "never delivered", "superseded"):
            return Withdrawal.HELD
        return Withdrawal.REVOKED

    def warm(self) -> asyncio.Future[ModuleType]:
        """Import the bootstrap service in a worker thread, once: when the node is staged for a
        switch (and, for a switch without a stage, when it begins), so that the import is done,
        and its CPU spent while the node's server is not restarting, by the time the switch
        completes; await the result to wait for it. The crypto worker, which runs the service's
        cryptography, is started too (if it is not running), for the first exchanges."""
        self.crypto.warm()
        return self._import()

    def _import(self) -> asyncio.Future[ModuleType]:
        """The service's module imported in a worker thread, once (``warm``)."""
        warming = self._warming
        if warming is None or (warming.done() and (warming.cancelled() or warming.exception())):
            # (a failed or cancelled import is tried again, not kept for the agent's life)
            warming = self._warming = warmup.warm("nodeagent.bootstrap_server")
        return warming

    async def sync(self) -> None:
        """Start, restart or stop the service to match the journal's live settings. A service
        that should run and did not start is tried again (``_retry``) until it runs, the node
        no longer should serve it (a later sync: the retries end at once) or the agent stops
        (``close``)."""
        async with self._lock:
            again = await self._step()
            retrying = self._retrying
            if not again:
                if retrying is not None:
                    self._retrying = None
                    retrying.cancel()  # sleeping or waiting for the lock: nothing half done
            elif retrying is None or retrying.done():
                self._retrying = asyncio.get_running_loop().create_task(
                    self._retry(), name="bootstrap-retry"
                )

    async def _retry(self) -> None:
        """Try the start again, after ``RETRY_FIRST`` seconds doubling to ``RETRY_MOST``,
        until it runs or need not (the port another program held is free again: without this
        a PC could not fetch the CA until someone restarted the agent, s43's Left 1)."""
        delay = RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MOST)
            async with self._lock:
                if not await self._step():
                    if self._retrying is asyncio.current_task():
                        self._retrying = None
                    return

    async def _step(self) -> bool:
        """(Under the lock.) ``_sync``, whatever it raises tried again: the node's problem
        (``_failed``) if no service runs (a journal that cannot be read at the first sync left
        the problem unknown for ever and nothing tried again, review s44rev2 L1; anything but
        a TlsrollError ended the retries silently, L2), and not if the service runs on
        (``_unread``)."""
        unexpected = False
        try:
            return await self._sync()
        except TlsrollError as exc:  # (the journal unread)
            why = str(exc)
        except Exception as exc:  # a bug, or damaged settings: said, and tried again all the same
            why, unexpected = f"{type(exc).__name__}: {exc}", True
        if self.service is not None:
            self._unread(why, unexpected=unexpected)
        else:
            self._failed(why)
        return True

    def _failed(
        self, problem: str, hint: str = "the error says why; the agent tries again"
    ) -> None:
        """A try failed: ``problem`` is the node's until one succeeds. One log line at the
        outage's start, and one each time its cause changes (``bootstrap.still_not_started``:
        the port held, then a file at fault), not a line a try: a port held for a day writes
        one line, not one a minute."""
        retry = f"after {RETRY_FIRST:g} s doubling to {RETRY_MOST:g} s"
        if self._tries == 0:
            log.error(
                "bootstrap.not_started",
                port=self.cfg.bootstrap_port,
                error=problem,
                retry=retry,
                hint=hint,
            )
        elif problem != self._said:
            log.error(
                "bootstrap.still_not_started",
                port=self.cfg.bootstrap_port,
                error=problem,
                was=self._said,
                tries=self._tries,
                hint=hint,
            )
        self._said = problem
        self._tries += 1
        self.problem = problem

    def lacking(self, view: agent_pb2.ServerView) -> str | None:
        """What the heartbeat says of a service that need not run by the journal, its server's
        status ``view`` at hand: the server serves https with an auth password (so the service
        should run) while the journal holds no live https settings (begun again with
        ``--reinitialise``, or put back from a copy older than the node's switch): no service
        runs, and only a switch stages the settings again. Then ``NO_SETTINGS`` and the port,
        which the leader shows as the node's problem with the rotate-cert (session 75
        https9443: no problem was shown, the node looked fine, and workstations could not enrol
        there). "" if not so; None if not known now: the server is not healthy, or a
        transaction runs (its switch serves https before its completion records the settings),
        when the leader keeps what it showed (``bootstrap_pending``). Only where the service
        itself is known to need not run (``problem`` "", no settings read)."""
        if self.current is not None:
            self._lacking_said = False  # (a switch staged them: said again if lost again)
            return ""  # (the settings live: ``problem`` says the rest)
        if self.problem != "":
            return ""  # (its own problem, or not tried yet: ``problem`` says it)
        if self.removed is not None or self.journal.needs_admin() is not None:
            return ""  # (a node removed, or held for the admin: their problems say what to do)
        if not view.healthy or self.busy():
            return None
        if "https" not in view.schemes or not view.verifier_digest:
            self._lacking_said = False
            return ""
        port = self.cfg.bootstrap_port
        if not self._lacking_said:
            self._lacking_said = True
            node = self.cfg.node_name
            log.error(
                "bootstrap.no_settings",
                port=port,
                detail="the server serves https with an auth password, but the journal holds no"
                " live https settings (begun again, or put back from an older copy): no"
                " bootstrap service runs, and workstations cannot enrol here",
                hint="a switch stages them again: run `tlsroll rollout start --change rotate-cert"
                f" --nodes {node}` on the leader",
            )
        return f"{NO_SETTINGS}workstations cannot enrol at port {port}"

    def _hint(self, problem: str) -> str:
        """What the line of a start that failed (``problem``, ``_start``'s) says to do: the port
        held (the service's own "port N: …"), or else a file the journal's live https settings
        name, which only a switch stages anew. Session 75 opswalk: an agent journal put back
        from a copy older than the node's last rotate-cert named files that rotation had
        removed, and the line said to check the port."""
        if problem.startswith(f"port {self.cfg.bootstrap_port}: "):
            return (
                "the error says why; check the port is free (ss -ltnp) and the bootstrap_port"
                " in agent.toml; the agent tries again"
            )
        node = self.cfg.node_name
        return (
            "the error names the file at fault: the journal's live https settings name it (a"
            " switch staged it); put it back, or have it staged anew by a rotate-cert of this"
            f" node (`tlsroll rollout start --change rotate-cert --nodes {node}` on the leader;"
            " the password's verifier by a change-password); the agent tries again"
        )

    def _unread(self, why: str, *, unexpected: bool = False) -> None:
        """The journal's live settings could not be read (``why``) while the service runs: it
        serves on with the settings it last read, and a change of them (a rollback, a new
        password, perhaps for one that leaked) is not followed until the journal is read again,
        which is tried as a failed start is. Said in the log at once (once, and again if the
        cause changes). For a moment (a read tried again within seconds) it is no node problem
        (session 44: the leader showed "did not start" though the service served). Unread for
        ``RETRY_MOST`` seconds (the first try a minute after the last), it is the node's
        problem, worded as what it is (``SERVES_PREVIOUS``, review s45rev4 M2: only the log
        said it, and the leader took the rollout as done) until the journal is read again.
        ``unexpected``: not the journal's own error (damaged settings, or a bug: L6), said so."""
        if why != self._unread_said:
            log.error(
                "bootstrap.settings_unread",
                port=self.cfg.bootstrap_port,
                error=why,
                unexpected=unexpected or None,
                serves="the settings last read, until the journal is read again",
                retry=f"after {RETRY_FIRST:g} s doubling to {RETRY_MOST:g} s",
                hint="check the agent's data dir (df -h, its mode); the service keeps the "
                "settings it last read",
            )
            self._unread_said = why
        now = time.monotonic()
        if self._unread_since is None:
            self._unread_since = now
        elif now - self._unread_since >= RETRY_MOST:
            cause = peertext.clean(why, UNREAD_CAUSE)
            self.problem = f"{SERVES_PREVIOUS}{UNREAD.format(cause)}"

    async def _sync(self) -> bool:
        """(Under the lock.) One step of ``sync``: whether the service should run and does not
        (to be tried again). ``problem`` says the outcome; it is "" only once the service runs
        or need not, never before the first attempt (None: the heartbeat then says nothing of
        it, and the leader keeps what it had: s43's Left 2)."""
        live = await asyncio.to_thread(self.journal.live_tls)
        self._unread_since = None  # (the problem, if it was one, is set below)
        if self._unread_said:
            log.warning(
                "bootstrap.settings_read_again",
                port=self.cfg.bootstrap_port,
                detail="the bootstrap settings read again: the failure said before is over",
            )
            self._unread_said = ""
        if live == self.current and (live is None or self.service is not None):
            self._up(running=live is not None)  # (known now, also at an agent's start on http)
            return False
        await self._stop()
        self.current = live
        if live is None or not live.get("verifier_file"):
            self._up(running=False)
            return False
        try:
            service = await self._start(live)
        except (OSError, ValueError, TlsrollError) as exc:
            # The switch itself succeeded; workstations can still use the CA pin. The problem
            # names the cause: the port, or the file at fault (review s44rev2 L4).
            problem = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            self._failed(problem, self._hint(problem))
            return True
        self.service = service
        # Again, as it is now: a refusal taken back (``set_removed(None)``, the leader's first
        # answered heartbeat after a start with the journal's mark) while the service started
        # found no service to tell, and the new one kept the mark: every PC was refused
        # "node_removed" at a node the leader accepts, until the agent restarted (seen once in
        # CI: tests/test_password_rollout.py).
        service.set_removed(self.removed)
        self._up(running=True)
        return False

    def _up(self, *, running: bool) -> None:
        """The service runs, or need not: no problem, and the outage (if any) said over."""
        if self._tries and running:
            log.warning(
                "bootstrap.up_again",
                port=self.cfg.bootstrap_port,
                tries=self._tries,
                detail="the bootstrap service runs again: the failure said before is over",
            )
        elif self._tries:
            log.info("bootstrap.retry_ended", why="the node no longer serves it")
        self._tries = 0
        self._said = ""
        self.problem = ""

    async def _start(self, live: dict[str, str]) -> BootstrapService:
        # The service (its protocol and h11) is imported when a node first serves https
        # with an auth password, not at the agent's start: an agent that never runs the
        # service does not hold it. (It served on aiohttp.web until issue 15, whose 10 MiB
        # every switched agent then kept; and it held SPAKE2 and ``cryptography`` until
        # session 41: the crypto worker runs those now.) Imported in a worker thread
        # (``_import``), not on the event loop: this runs as a switch completes, and a quarter
        # of a second of importing there held back the outcome the leader waits for. The
        # module only, not the crypto worker's child (``warm``): the service asks the worker
        # once it holds the port, not at every try while another program holds it.
        await asyncio.shield(self._import())
        from nodeagent.bootstrap_server import BootstrapService, Guard, Limits  # noqa: PLC0415

        if self.guard is None:
            self.guard = Guard(Limits())
            self.guard.restore(guard_times(self._earlier, time.time(), time.monotonic()))
            self._earlier = []
        verifier_file = live["verifier_file"]
        reader = self.key_reader
        shared = await asyncio.to_thread(reader) if reader is not None else None
        verifier_text = (await asyncio.to_thread(_read_verifier, verifier_file, shared)).decode()
        ca_pem = await asyncio.to_thread(_ca_bundle, live["ca_file"])
        try:
            verifier = password.verifier_from_json(verifier_text)
        except ValueError as exc:
            raise ValueError(f"{verifier_file}: {exc}") from None
        try:
            service = BootstrapService(
                address=urllib.parse.urlsplit(live["server_url"]).hostname or "",
                cert_file=Path(live["cert_file"]),
                key_file=Path(live["key_file"]),
                ca_bundle_pem=ca_pem,
                server_url=live["server_url"],
                node_name=self.cfg.node_name,
                verifier=verifier,
                sign=self.sign,
                withdraw=self.withdraw,
                renew=self.renew,
                port=self.cfg.bootstrap_port,
                guard=self.guard,
                failures=self.failures,
                counted=self._counted,
                key_shared_with=shared,
                crypto=self.crypto,
                ca_pin=self.cfg.ca_pin,
            )
        except ValueError as exc:  # (a CA file without a certificate, say)
            raise ValueError(f"{exc} ({live['ca_file']}, {verifier_file})") from None
        service.set_removed(self.removed)
        try:
            await service.start()  # (NotStarted, UnsafePermissions: they name the cause)
        except ValueError as exc:  # (the CA bundle: a certificate that is no CA)
            raise ValueError(f"{live['ca_file']}: {exc}") from None
        return service

    def set_removed(self, why: str | None) -> None:
        """The leader refused this node's heartbeat as no longer in the cluster (``why``), or
        answered it again (None): the service, if it runs, takes no password meanwhile
        (``BootstrapService.set_removed``)."""
        self.removed = why
        if self.service is not None:
            self.service.set_removed(why)
        if (why is not None) != self._removed_saved:
            self._removed_saved = why is not None
            task = asyncio.get_running_loop().create_task(self._save_removed())
            self._saving.add(task)
            task.add_done_callback(self._saving.discard)

    async def _save_removed(self) -> None:
        """Into the journal: the refusal as it is when the write begins (one at a time, so that
        the last write holds the latest). Lost (a full disk): it holds in memory still."""
        async with self._save_lock:
            removed = self.removed
            try:
                await asyncio.to_thread(self.journal.set_removed_from_cluster, removed)
            except TlsrollError as exc:
                log.error(
                    "bootstrap.removed_not_saved",
                    error=str(exc),
                    hint="check the agent's data dir (df -h): the node's removal holds in memory"
                    " until the next write",
                )
                # Not saved: the next refused heartbeat (one an interval) writes it again. A
                # refusal not cleared is cleared at the next start's first answered heartbeat.
                if (removed is not None) == (self.removed is not None):
                    self._removed_saved = removed is None

    async def _counted(self, when: dt.datetime) -> None:
        """The service counted a failure at ``when``: into the journal before it is answered."""
        await self._save(when.timestamp())

    def _reported(self) -> None:
        """The leader took failures (called by FailureLog.reported, on the event loop): written
        after, not awaited (lost in a crash, they are only reported again)."""
        task = asyncio.get_running_loop().create_task(self._save(None))
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    async def _save(self, at: float | None) -> None:
        """One journal write: a failure counted at ``at`` (if any) and the unreported log as it
        is when the write begins (one at a time, so that the last write holds the latest)."""
        # (the ceiling's numbers matter only with a failure, which only a service counts)
        limits = self.guard.limits if self.guard is not None else None
        keep, window = (limits.ceiling, limits.ceiling_window) if limits else (0, 0.0)
        async with self._save_lock:
            unreported = self.failures.pending()
            try:
                await asyncio.to_thread(
                    self.journal.record_bootstrap_failure,
                    at if limits else None,
                    unreported,
                    keep=keep,
                    window=window,
                )
            except TlsrollError as exc:
                # The limits hold in memory still; the next write brings the journal up.
                log.error(
                    "bootstrap.failures_not_saved",
                    error=str(exc),
                    hint="check the agent's data dir (df -h): the failure counts hold in memory "
                    "until the next write",
                )

    async def _stop(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            await service.stop()

    async def close(self) -> None:
        retrying, self._retrying = self._retrying, None
        if retrying is not None:
            retrying.cancel()
            await asyncio.gather(retrying, return_exceptions=True)
        async with self._lock:
            await self._stop()
        if self._saving:
            await asyncio.gather(*self._saving)
