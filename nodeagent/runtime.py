"""The node agent daemon's work (``tlsroll-agent``; its entry point is ``nodeagent.daemon``,
which keeps what a daemon never uses out of the process before this module is imported).

Start-up: load the config, enrol if this node has no certificate yet (see ``identity``), serve
NodeAgent over mutual TLS on every node address, and send heartbeats to the leader (with the
bootstrap service's failed passwords since the last one). SIGTERM or SIGINT stops it gracefully.

A transaction task that dies for good (see ``nodeagent.transaction``, supervision) stops the
agent too, with exit code 1 and one line saying why: never a live agent with a dead transaction;
the service manager starts it again and the journal resumes the transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import errno
import fcntl
import math
import os
import random
import sqlite3
import stat
import time
from collections.abc import Awaitable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from nodeagent import certwork, cryptoworker, front, plans
from nodeagent.bootstrap_supervisor import BootstrapHost
from nodeagent.config import AgentConfig
from nodeagent.cryptoworker import CryptoWorker
from nodeagent.drivers import Driver, make_driver
from nodeagent.identity import (
    PIN_PATIENCE,
    CertificateExpired,
    EnrolmentDeferred,
    EnrolmentRefused,
    Identity,
    LeaderFailed,
    PinNotShown,
    next_enrol_wait,
    next_pin_wait,
    no_token_in,
    paths,
)
from nodeagent.journal import Journal, open_journal
from nodeagent.leader_link import LeaderLink
from nodeagent.nodefiles import pin_unseen_path, read_pin_unseen, write_pin_unseen
from nodeagent.renewal import Renewer, ServerCredentials
from nodeagent.service import NodeAgentService
from nodeagent.store_watch import StoreWatch
from nodeagent.transaction import CRASH_ENV, TERM_ENV, TERM_HOLD_ENV, Runner, TransactionDied
from nodeagent.trust import LeaderTrust
from tlsroll import (
    __version__,
    daemon,
    dbthread,
    defaults,
    features,
    fsutil,
    kdfhook,
    logs,
    password,
    testhooks,
)
from tlsroll.daemon import sd_notify, stop_event, watchdog
from tlsroll.errors import (
    ConfigError,
    NotRegularFile,
    TerminalError,
    TlsrollError,
    TransientError,
    UnsafePermissions,
    os_error_text,
)
from tlsroll.fsutil import make_private_dir
from tlsroll.rpc import (
    AGENT_SERVER_OPTIONS,
    HANDSHAKE_SECONDS,
    TEST_HANDSHAKE_ENV,
    add_standard_services,
    bind,
    handshake_seconds,
    hostport,
)
from tlsroll.sqlite import NotDamaged, SchemaTooNew, needs_a_person
from tlsroll.v1 import agent_pb2, agent_pb2_grpc

# Exit codes a restart cannot change, only a person (the unit's RestartPreventExitStatus=):
# a config or usage error (argparse's, a --reinitialise refused; the node's files the admin must
# put right: a key or join_token_file others can read, a key, certificate or CA file damaged or
# not going together or with the config, ``identity.damaged_file``, ``not_this_nodes``,
# ``not_the_pinned_ca``; at enrolment, a leader whose chain or answer does not hold the CA of
# ``ca_pin``, ``identity.pin_mismatch``: a wrong pin or a man in the middle, a chain with no
# certificate of the pinned key only after ``identity.PIN_PATIENCE``; a data dir, journal
# or agent.lock this agent may not use by its permissions or kind, ``check_data_dir``; a data
# dir or config on a mount point fstab marks noauto, not mounted), a journal written by a newer
# tlsroll (3: a package rolled back), a journal that is lost, damaged or unreadable (4:
# restore it from a backup, or --reinitialise: tlsroll.sqlite.StoreDamaged), the certificate
# ended (5) and an enrolment the leader refused (6). 1: the rest, among them a leader not
# reached at enrolment or failing to answer it, a data dir or config on a disk not mounted yet
# (``fsutil.not_mounted``) and a journal that cannot be opened now (a full disk, a read-only
# file system, a lock another process holds: StoreUnavailable), which systemd starts again
# until it can.
EXIT_CONFIG = front.EXIT_CONFIG
EXIT_STORE_TOO_NEW = 3
EXIT_STORE_DAMAGED = 4
EXIT_CERT_EXPIRED = 5
"""The node's certificate has ended by this node's clock (``CertificateExpired``): a clock to
correct, or an enrolment again, both a person's; its line says which and says to start the
agent again. Restarted every few seconds it logged that line some 30,000 times a day (review
s46rt1 L3)."""
EXIT_ENROLMENT_REFUSED = 6
"""The leader refused the node's enrolment (``EnrolmentRefused``: a join token unknown, wrong,
used up, expired or superseded, or for other names; the node's key refused for good; its
names taken; the agent older than the leader; a request too large): the same request is
refused again, so a new token, key, config or release is a person's to give; its line says
which. Restarted every two seconds (``Restart=always``) the agent asked again for ever, each
attempt a child process, and each refusal counted against its source by the join port (review
s66). A leader not reached, or one that failed to answer (``identity.LEADER_FAILED``), is no
refusal: exit 1, started again."""

GRACE_SECONDS = 10.0
# A switch running when the agent is told to stop is given this long to end (well inside the
# unit's TimeoutStopSec=90s); then it is cancelled, and the next start resumes it.
TXN_GRACE_SECONDS = 60.0
# Test hook: seconds in place of TXN_GRACE_SECONDS (a switch slower than the grace: the tests
# of a stop mid-switch cancel it at once with 0). Never set in production.
TXN_GRACE_ENV = "TLSROLL_AGENT_TEST_TXN_GRACE"
log = logs.get_logger(__name__)


class JournalContradicted(TerminalError):
    """``--journal-checked`` on a node whose live config the journal contradicts (``serve``):
    refused, nothing cleared; exit 2 (the command line is for a person to change)."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# What an enrolment attempt after a wait may take on top of the wait: the certificate-work
# child's own bound, and half a minute for the process to start and the answer to arrive.
ATTEMPT_MARGIN = certwork.TIMEOUT + 30.0


def start_extension(wait: float, told: bool, why: str = "") -> str:
    """The service-manager message sent before an enrolment wait: the agent is ``READY=1`` only
    once enrolled, and its unit is ``Type=notify`` with systemd's default 90 s start timeout,
    while a wait the join port tells it to take can be 300 s (900 s in all). Without this
    ``EXTEND_TIMEOUT_USEC`` systemd kills the waiting agent, and ``Restart=always`` starts one
    that enrols at once, ignoring the wait. The extension covers the wait and the next attempt
    (it is measured from when systemd receives it, and never shortens the unit's own timeout);
    ``STATUS=`` says why in ``systemctl status`` (``why``, else by ``told``)."""
    why = why or ("told by the leader's join port to wait" if told else "leader not reachable yet")
    return (
        f"EXTEND_TIMEOUT_USEC={int((wait + ATTEMPT_MARGIN) * 1_000_000)}\n"
        f"STATUS=Enrolment: {why}; retrying in {wait:.0f} s"
    )


class StoppedWhileEnrolling(TerminalError):
    """SIGTERM or SIGINT while the agent waited to try its enrolment again: it stops (exit 0)
    at once, not after the wait (up to 375 s; systemd's stop timeout is 90 s). Terminal (no
    try follows it), and never a refusal of the enrolment (``obtain_identity`` passes it on
    as it is)."""


async def _pause(wait: float, stop: asyncio.Event | None) -> None:
    """Sleep ``wait`` seconds; ``StoppedWhileEnrolling`` as soon as ``stop`` is set."""
    if stop is None:
        await asyncio.sleep(wait)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), wait)
        raise StoppedWhileEnrolling


async def obtain_identity(cfg: AgentConfig, stop: asyncio.Event | None = None) -> Identity:
    """The node's identity, checked (or enrolled) in a child process (``certwork``), so that the
    agent itself never holds X.509 code while it serves.

    A certificate that has ended (``CertificateExpired``) with a join token in the config is
    enrolled again, with the node's own key (``identity.enrol`` keeps ``DATA/node.key`` and the
    ended certificate as ``DATA/node.pem.ended``): the way back for a node that was offline
    past its certificate's end, with no ``nodes remove`` (review s46rt1 H1). The leader takes
    it with a token made for the node after its enrolment; a token it refuses (the one the node
    enrolled with, superseded by that enrolment) or no token at all ends the agent with the
    certificate's one line (exit 5, which its unit does not restart on) and, after it, what the
    token got (or "no token in FILE" for a join_token_file missing or empty: nothing is tried;
    for a key whose certificate was revoked, the way to a new key); a leader not reached
    within the enrolment's patience, or one that failed to answer (``LeaderFailed``), ends it
    with exit 1, which the unit restarts on."""
    ended: CertificateExpired | None = None
    try:
        identity = await asyncio.to_thread(certwork.load_identity, cfg)
    except CertificateExpired as exc:
        if cfg.join_token is None and cfg.join_token_file is None:
            raise
        if (
            cfg.join_token is None
            and cfg.join_token_file is not None
            and no_token_in(cfg.join_token_file)
        ):
            # Nothing to try: the file the join script named is gone or empty (its example
            # says "needed on the first start only"; review s47rev1 L4).
            raise CertificateExpired(
                f"{exc} (no token in {cfg.join_token_file}: no enrolment tried)"
            ) from None
        ended = exc
        log.warning(
            "agent.enrolling_again",
            reason="node certificate ended",
            node_cert=str(paths(cfg.data_dir)[1]),
            detail="the node's certificate ended: the agent enrols again with its join token",
        )
    else:
        if identity is not None:
            return identity
    try:
        return await _enrol(cfg, stop)
    except StoppedWhileEnrolling:
        raise
    except TlsrollError as exc:
        if ended is None or isinstance(exc, CertificateExpired):
            raise
        # (A refusal of the key itself carries the way to a new key: ``identity.enrol``.)
        said = f"{ended} (this agent tried to enrol again with the join token it has: {exc})"
        if isinstance(exc, TransientError):
            # The leader not reached (its host off, as the node was): exit 1, which the unit
            # restarts on, so the node comes back once the leader does, as a first enrolment
            # would (review s47rev1 L2: exit 5 stopped it for good).
            raise TransientError(f"{said}; it tries again at its next start") from None
        if isinstance(exc, LeaderFailed):
            # The leader failed to answer (INTERNAL, a call cut off): no verdict on the token,
            # so exit 1 as well, not 5: once the leader is mended the restarted agent enrols
            # (review s66 rva M1: only a TransientError was, and this ended it for good).
            raise LeaderFailed(f"{said}; it tries again at its next start") from None
        raise CertificateExpired(said) from None


PIN_PATIENCE_ENV = "TLSROLL_TEST_PIN_PATIENCE_SECONDS"
"""Tests only: seconds in place of ``identity.PIN_PATIENCE`` (how long a join port showing no
certificate of the pinned key is tried again), every wait shortened in proportion, so that a
test can show the retries and the exit 2 past them in seconds. Never longer than
``PIN_PATIENCE``. Not a setting: a wrong pin is a person's to fix, and a default certificate
for longer than a quarter of an hour is no fail-over."""

PIN_STATUS = "the leader's join port shows no certificate of [leader].ca_pin (a fail-over?)"


def pin_patience() -> float:
    """``PIN_PATIENCE``, or the test hook's (``PIN_PATIENCE_ENV``), a number brought into
    (0, ``PIN_PATIENCE``]."""
    try:
        patience = float(os.environ[PIN_PATIENCE_ENV])
    except (KeyError, ValueError):
        return PIN_PATIENCE
    if math.isnan(patience) or patience <= 0:
        return PIN_PATIENCE
    return min(patience, PIN_PATIENCE)


class PinUnseen:
    """How long the join port has shown no certificate of the pinned key (``PinNotShown``),
    for ``next_pin_wait``: the patience used, kept across the agent's restarts in
    ``DATA/pin.unseen.json`` (``nodefiles.read_pin_unseen``) with the pin and join port it is
    about (review rev51e L1: counted per process, a wrong pin behind a join port that failed
    otherwise now and then, each time an exit 1 and a restart, was tried for ever). Written at
    each such answer, as the seconds waited on the agent's own clock (the loop's, monotonic),
    never as a start on the wall clock: a clock set forward at boot (an agent started before
    NTP set it, on a machine whose battery-backed clock runs late) would otherwise take hours
    for the patience used and stop the agent for good at its next start; the time between two
    processes does not count (a few seconds' restart). Gone once a join port shows the pinned
    key (the enrolment's child removes it: ``identity.enrol``), and then the patience starts
    afresh at the next such answer, in this process too. A record of another pin or join port,
    or one that cannot be read (one warning), starts it afresh; one that cannot be written
    (one warning) leaves this process's own count."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.data_dir = cfg.data_dir
        self.pin, self.join = cfg.ca_pin, hostport(cfg.leader_address, cfg.join_port)
        self.began: float | None = None  # the loop's time, less what earlier processes waited
        self.first = 0.0  # the wall clock's time of the first such answer (the log's "since")
        self.kept = False  # our record is on disk (written or read): its going means "shown"
        self.tries = 0

    def met(self, now: float, wall: float) -> tuple[int, float]:
        """One more answer without the pinned key, at ``now`` (the loop's clock) and ``wall``
        (``time.time()``, for the log): the tries and the seconds of patience used."""
        path = pin_unseen_path(self.data_dir)
        if self.began is None or (self.kept and not os.path.lexists(path)):
            self.began, self.tries = now - self._carried(wall), 0
        self.tries += 1
        waited = now - self.began
        if self.kept:
            self._keep(waited)
        return self.tries, waited

    def since(self) -> str:
        """When the patience began, by the wall clock (for the log)."""
        return dt.datetime.fromtimestamp(self.first, dt.UTC).isoformat(timespec="seconds")

    def _carried(self, wall: float) -> float:
        """Seconds of patience used before this process met it (the record's), or 0 with the
        record written afresh."""
        path = pin_unseen_path(self.data_dir)
        if self.began is None:  # this process's first: a record of an earlier one's?
            try:
                record = read_pin_unseen(self.data_dir)
            except (OSError, NotRegularFile, ValueError) as exc:
                record = None
                log.warning(
                    "agent.pin_unseen_unreadable",
                    path=str(path),
                    error=os_error_text(exc) if isinstance(exc, OSError) else str(exc),
                    detail="the patience for a join port showing no certificate of "
                    "[leader].ca_pin starts afresh",
                )
            if record is not None:
                since, waited, pin, join = record
                if (pin, join) == (self.pin, self.join):
                    self.kept, self.first = True, since
                    return waited
        self.first, self.kept = wall, True
        self._keep(0.0)
        return 0.0

    def _keep(self, waited: float) -> None:
        """Write the record: the patience used so far. One that cannot be written: one
        warning, and this process's own count from then on."""
        try:
            write_pin_unseen(self.data_dir, self.first, waited, self.pin, self.join)
        except OSError as exc:
            self.kept = False
            log.warning(
                "agent.pin_unseen_not_written",
                path=str(pin_unseen_path(self.data_dir)),
                error=os_error_text(exc),
                detail="this agent's restart starts the patience afresh",
            )


def _duration(seconds: float) -> str:
    """``seconds`` as a person says it: whole minutes as minutes, else seconds."""
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} s"


def patience_used(refusal: ConfigError, record: Path | None, patience: float) -> ConfigError:
    """The pin's refusal once its ``patience`` is used up, with where it is counted: a
    right pin behind a join port that still shows another certificate (a fail-over not over)
    would be refused again at the agent's next start, at its first try (review rev52b L2).
    ``record`` None: this process could not write it (its own count), and none is named
    (review rev52d L4)."""
    return ConfigError(
        refusal.path,
        refusal.key,
        f"{refusal.problem} (the join port showed no certificate of this pin for "
        + (
            f"{_duration(patience)}, counted in {record}: if the pin is right, remove that "
            "file to give the port that long again)"
            if record is not None
            else f"{_duration(patience)} of this agent's run, its record not written)"
        ),
    )


async def _enrol(cfg: AgentConfig, stop: asyncio.Event | None = None) -> Identity:
    """Enrol (``certwork.enrol``), trying again while it is worth it (``next_enrol_wait``; a
    join port showing no certificate of the pinned key: ``next_pin_wait``, one warning with
    both pins for each try tried again, and past the patience the pin's refusal, exit 2).
    ``stop`` set during a wait: ``StoppedWhileEnrolling``."""
    loop = asyncio.get_running_loop()
    began = since = loop.time()
    failures = 0
    unseen = PinUnseen(cfg)
    waited = False
    while True:
        try:
            identity = await asyncio.to_thread(certwork.enrol, cfg)
            if waited:  # the wait's STATUS= line would otherwise stay in `systemctl status`
                sd_notify("STATUS=Enrolled; starting")
            return identity
        except PinNotShown as exc:
            now, wall = loop.time(), time.time()
            pin_failures, elapsed = unseen.met(now, wall)
            jitter = random.random()  # noqa: S311 - spreads retries, guards nothing
            wait = next_pin_wait(pin_failures, elapsed, jitter, pin_patience())
            said = {"hint": exc.hint} if exc.hint else {}
            if wait is None:
                if pin_failures == 1:  # a patience used up before this start: say since when
                    log.warning(
                        "agent.enrol_pin_patience_over",
                        leader=unseen.join,
                        since=unseen.since(),
                        record=str(pin_unseen_path(cfg.data_dir)),
                        detail="the join port has shown no certificate of [leader].ca_pin's key "
                        "since then, through this agent's restarts: no more tries",
                    )
                record = pin_unseen_path(cfg.data_dir) if unseen.kept else None
                raise patience_used(exc.refusal, record, pin_patience()) from None
            log.warning(
                "agent.enrol_pin_not_shown",
                leader=unseen.join,
                pins_sent=list(exc.pins),
                configured_pin=cfg.ca_pin,
                retry_in=round(wait, 1),
                tries=pin_failures,
                since=unseen.since(),
                **said,
                detail="no certificate of [leader].ca_pin's key in the join port's chain (a load "
                "balancer's default certificate while it fails over, or a wrong pin); the join "
                "token was not sent",
            )
            sd_notify(start_extension(wait, False, PIN_STATUS))
            waited = True
            failures = 0
            await _pause(wait, stop)
            # Something answered: a minute's patience again from here, and the told waits'
            # own patience too (the pin's waits are bounded by theirs; review rev51e M1: they
            # used up the told waits' 15 minutes, and a join port that said "wait" once the
            # balancer was back made the agent exit 1 and enrol at once after its restart).
            since = began = loop.time()
        except TransientError as exc:
            now = loop.time()
            told = isinstance(exc, EnrolmentDeferred)
            failures = 0 if told else failures + 1
            jitter = random.random()  # noqa: S311 - spreads retries, guards nothing
            wait = next_enrol_wait(exc, failures, now - since, now - began, jitter)
            if wait is None:
                raise
            if isinstance(exc, EnrolmentDeferred):
                log.info(
                    "agent.enrol_told_to_wait", retry_after=exc.retry_after, wait=round(wait, 1)
                )
            sd_notify(start_extension(wait, told))
            waited = True
            await _pause(wait, stop)
            if told:  # the leader answered: a minute's patience again from here
                since = loop.time()


def recovery_command(config: Path, flag: str) -> str:
    """The one-shot ``flag`` (``--reinitialise``, ``--journal-checked``) as the admin types
    it: the agent runs as root (its unit's User=root), so root runs it as it is."""
    return f"{fsutil.this_program('tlsroll-agent')} --config {os.path.abspath(config)} {flag}"


LOCK_NAME = "agent.lock"


@contextlib.contextmanager
def agent_lock(cfg: AgentConfig) -> Iterator[None]:
    """Held by the agent for as long as it runs, and by its one-shots: a one-shot run while an
    agent runs on the same data dir is refused, nothing changed (review s45rev6 M1: it
    replaced the journal under the running agent). A lock (``flock`` on ``agent.lock`` in the
    data dir), not a probe of the agent's port: the agent holds it from its start, before it
    resumes a transaction or enrols (its port answers only after both), on whatever address
    its config names, and the kernel drops it when the agent ends however it ends; a port
    another process answers on is no agent."""
    lock = cfg.data_dir / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise TerminalError(
                f"a tlsroll-agent is running on {cfg.data_dir} (it holds {lock}): stop it first"
                " (systemctl stop tlsroll-agent)"
            ) from None
        yield
    finally:
        os.close(fd)


def _open_journal(
    cfg: AgentConfig, config: Path | None, held: contextlib.ExitStack, *, reinitialise: bool = False
) -> tuple[Journal, Driver | None]:
    # The driver first: it finishes reading [server], so a bad key there stops the agent
    # before it creates anything.
    driver = (
        make_driver(cfg.server, cfg.addresses[0], cfg.data_dir, not_clients=(cfg.leader_address,))
        if cfg.server is not None
        else None
    )
    check_data_dir(cfg)
    held.enter_context(agent_lock(cfg))  # until ``held`` closes: the agent's or one-shot's end
    # Enrolled (the journal is made before the enrolment): a missing journal is lost, not new.
    enrolled = any(p.exists() for p in paths(cfg.data_dir))
    recover = recovery_command(config, "--reinitialise") if config is not None else ""
    journal = open_journal(
        journal_path(cfg), expected=enrolled, reinitialise=reinitialise, recover=recover
    )
    return journal, driver


def check_data_dir(cfg: AgentConfig) -> None:
    """The data dir made or taken over (``make_private_dir``), and it and the files the
    journal's start opens (``agent.lock``, the journal and its -wal and -shm) judged first: one
    this agent may not use by its permissions or kind (a data dir of another user's, one on a
    way it may not enter, a file where it or the journal should be; a journal of another
    user's, mode 000, a directory in its place) is a config error (exit 2) naming the file and
    the ``chown``/``chmod`` that fixes it (``fsutil.open_problem``, ``dir_write_problem``, as the
    leader's start: review s50; they exited 1, the journal's "cannot be opened now", and were
    started again every few seconds for ever), or the ``chattr -i`` of an immutable one (an
    attribute, ``fsutil.attribute_problem``: review rev50e). What can clear by itself stays
    exit 1: a read-only file system, a lock another process holds, a full disk
    (``StoreUnavailable``). Nothing is changed before a refusal but a missing data dir's
    making.

    A data dir below a mount point not mounted now (``not_mounted``) is a disk not mounted
    yet, exit 1, as the leader's: asked before any of those config errors (the empty mount
    point below, often root's 0700, was told a chown, exit 2: stopped for good), and before a
    data dir holding no identity is taken for a node not enrolled (it was made or taken over
    on the file system below the mount point, and the node enrolled there, its identity lost
    once the disk came). A ``noauto`` one, which nothing but a person mounts: exit 2."""
    where = cfg.data_dir
    enrolled = any(os.path.lexists(p) for p in paths(where))  # (False: not seen either)
    if not enrolled and (unmounted := not_mounted("data dir", where)) is not None:
        raise unmounted
    try:
        _check_data_dir(cfg)
    except ConfigError:
        if (unmounted := not_mounted("data dir", where)) is not None:
            raise unmounted from None
        raise


def not_mounted(what: str, path: Path) -> TerminalError | None:
    """``fsutil.not_mounted`` of the agent's ``path`` (its data dir, its config: ``what``): a
    disk not mounted yet, exit 1, or a ``noauto`` one only a person mounts, exit 2."""
    return fsutil.not_mounted(what, path, "tlsroll-agent")


def _check_data_dir(cfg: AgentConfig) -> None:
    """``check_data_dir``'s checks of the data dir and the journal's files."""
    where = cfg.data_dir
    try:
        mode = os.stat(where).st_mode
    except FileNotFoundError:
        mode = None  # made below, with its parents
    except OSError as exc:  # a directory on its way we may not enter, or a file on it
        if (problem := fsutil.open_problem(where)) is None:
            raise
        raise ConfigError(cfg.path, "[agent].data_dir", problem) from exc
    if mode is not None and not stat.S_ISDIR(mode):
        kind = "a file" if stat.S_ISREG(mode) else fsutil.file_kind(mode)
        raise ConfigError(cfg.path, "[agent].data_dir", f"{where} is not a directory ({kind})")
    try:
        make_private_dir(where)
    except UnsafePermissions as exc:  # another user's directory, or a link of theirs
        raise ConfigError(cfg.path, "[agent].data_dir", str(exc)) from None
    except PermissionError as exc:  # a missing one, in a directory we may not write
        # or an immutable one (its chmod: EPERM, for root too): the attribute said, not the
        # chmod's bare EPERM (review rev50e)
        problem = fsutil.dir_write_problem(_nearest_there(where))
        raise ConfigError(cfg.path, "[agent].data_dir", problem or os_error_text(exc)) from None
    if (problem := fsutil.dir_write_problem(where)) is not None:
        raise ConfigError(
            cfg.path, "[agent].data_dir", f"{problem} (the agent keeps its journal in it)"
        )
    journal = journal_path(cfg)
    for what, path in (
        ("agent lock", where / LOCK_NAME),
        ("journal", journal),
        ("journal", Path(f"{journal}-wal")),
        ("journal", Path(f"{journal}-shm")),
    ):
        if (problem := fsutil.open_problem(path, write=True, missing=None)) is not None:
            raise ConfigError(what, None, problem)


def _nearest_there(path: Path) -> Path:
    """``path``, or the nearest directory above it that is there (where a missing one would
    be made)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


async def _journal_checked(journal: Journal, driver: Driver | None) -> str:
    """The admin checked the server that a journal put back could not settle (``journal``);
    never a state the journal contradicts (review s41rev1 M2): its live files stay what the
    agent's view, its bootstrap service and its next plans use."""
    problem = None
    if journal.needs_admin() is not None and driver is not None:
        problem = await asyncio.to_thread(plans.live_contradiction, journal, driver)
    if problem:
        raise JournalContradicted(
            f"--journal-checked refused: {problem}; the journal cannot describe this node:"
            " go forward (put the journal kept as NAME.after-vN back and install the newer"
            " version again), or make the config name what the journal holds live"
        )
    was = journal.clear_needs_admin()
    log.warning(
        "journal.checked",
        detail="the admin checked the node: it is planned and switched again"
        if was is not None
        else "nothing needed the admin",
        was=was,
    )
    return "the admin's check recorded" if was is not None else "nothing needed the admin"


async def recover(
    cfg: AgentConfig, config: Path, *, reinitialise: bool, journal_checked: bool
) -> str:
    """``--reinitialise`` and ``--journal-checked``: one-shots that change the journal and
    exit, run with the agent stopped; the agent is then started as before (by its unit:
    review s45rt2 H1, a flag that started the agent in the foreground left the admin a daemon
    to stop by hand before the unit could start it). Returns the line saying what comes next."""
    with contextlib.ExitStack() as held:
        journal, driver = _open_journal(cfg, config, held, reinitialise=reinitialise)
        done = [f"journal {journal.path} begun again, empty"] if reinitialise else []
        try:
            if journal_checked:
                done.append(await _journal_checked(journal, driver))
        finally:
            journal.close()
    # "start", as the lost journal's line says: the one-shot ran with no agent running.
    then = (
        f"{'; '.join(done)}: start the agent now as before (installed: systemctl start"
        " tlsroll-agent)"
    )
    if reinitialise:
        # An empty journal holds no live https settings: a node whose server runs https then
        # serves no workstation port (9443) until its next switch, and an enable-tls finds it
        # done; a rotate-cert is that switch (session 75 opswalk: "run the rollout again" led
        # to "nothing to do", the port closed with no node problem).
        then += f"; {https_again(cfg.node_name)}"
    return then


def https_again(node: str) -> str:
    """What an agent whose journal was begun again (``--reinitialise``) needs where its server
    runs https: the node's next switch, a rotate-cert, which stages the https files and brings
    its workstation port (9443) back."""
    return (
        f"if {node}'s server runs https, run `tlsroll rollout start --change rotate-cert --nodes"
        f" {node}` on the leader then: until a switch the agent serves no workstation port"
        " (9443) there, and an enable-tls finds the node done"
    )


def _kdf_hook(cfg: AgentConfig) -> None:
    """The tests' scrypt hook (``kdfhook.TEST_KDF_N_ENV``), said at every start while it is set:
    the agent takes password verifiers down to its N, not ``password.MIN_N``. Set wrong, or for
    the installed agent's data dir, the start is refused (exit 2), never as unset."""
    if (n := kdfhook.start_hook(cfg.data_dir, defaults.AGENT_DATA_DIR, "agent's")) is not None:
        log.warning(
            "agent.test_hook",
            hook=kdfhook.TEST_KDF_N_ENV,
            value=n,
            detail=f"password verifiers down to scrypt N={n} are taken, not only from"
            f" N={password.MIN_N}: a guess at such a password costs {password.MIN_N // n}"
            " times less",
            hint=f"{kdfhook.TEST_KDF_N_ENV} is for tests only: remove it from the agent's"
            " environment; without it a verifier made under it is refused",
        )


async def serve(cfg: AgentConfig, config: Path | None = None) -> None:
    with contextlib.ExitStack() as held:
        await _serve(cfg, config, held)


async def _serve(cfg: AgentConfig, config: Path | None, held: contextlib.ExitStack) -> None:
    _kdf_hook(cfg)
    stop = stop_event()
    journal, driver = _open_journal(cfg, config, held)
    # One freeze lock for the servicer's Freeze, Unfreeze and lease watch and the runner's
    # lifts of a freeze: each reads the scope freeze's lease and changes the freeze under it.
    # (The servicer shares the runner's ``leases`` too, the leases' deadlines in elapsed time.)
    freeze_lock = asyncio.Lock()
    runner = Runner(journal, driver, now, freeze_lock=freeze_lock) if driver is not None else None
    if runner is not None:
        # First thing: a transaction cut short by a crash is carried on, so that no node
        # stays frozen or half-switched for longer than it takes the agent to restart.
        await runner.resume_all()
    if driver is not None:
        # Then stage directories nothing can use any more: they hold private keys (and after
        # every transaction's end: ``NodeAgentService.sweep_stages``). Each directory that is
        # none of tlsroll's is said once more (an agent started again in the same process).
        # One that fails is not tried again by itself: the next transaction's end sweeps the
        # rollouts the journal knows, the next start everything (README, "Staged keys on a node").
        plans.forget_said()
        await dbthread.run(plans.sweep_stage_dirs, journal, driver)
    try:
        identity = await obtain_identity(cfg, stop)
    except StoppedWhileEnrolling:
        sd_notify("STOPPING=1")
        log.info("agent.stopping", detail="told to stop while waiting to enrol")
        if runner is not None:
            await runner.close(txn_grace())
        await dbthread.barrier()
        journal.close()
        log.info("agent.stopped")
        return
    # The agent's certificate work (and the bootstrap service's PAKE): one child of its own,
    # started at need and stopped when idle, so that the agent never holds ``cryptography``
    # (``nodeagent.cryptoworker``).
    # Until READY (systemd's start timeout, 90 s), a worker call that hangs is given up after
    # ``STARTUP_TIMEOUT`` (the revocation list's check: its list is sent again by the leader on
    # the first heartbeat stream), not ``TIMEOUT`` (review s41, Low 3).
    crypto = CryptoWorker(log_level=cfg.log_level, timeout=cryptoworker.STARTUP_TIMEOUT)
    key_reader = (lambda: plans.sharing(driver).reader) if driver is not None else None
    bootstrap = BootstrapHost(cfg, identity, journal, key_reader, crypto=crypto)
    if runner is not None:
        runner.on_complete = bootstrap.sync
        runner.on_switch = bootstrap.warm
    # Hot-reloaded: a renewed certificate is served to new connections at once.
    creds = ServerCredentials(identity)
    # gRPC sets SO_REUSEPORT by default: a second agent would then share the port silently.
    server = grpc.aio.server(options=AGENT_SERVER_OPTIONS)
    if (handshake := handshake_seconds()) != HANDSHAKE_SECONDS:  # (its options' deadline)
        log.warning(
            "agent.test_hook",
            hook=TEST_HANDSHAKE_ENV,
            value=handshake,
            detail=f"{TEST_HANDSHAKE_ENV} is for tests only: remove it from the agent's"
            " environment",
        )
    trust = await asyncio.to_thread(
        LeaderTrust.load, identity.ca_file, identity.trust_domain, cfg.data_dir, crypto
    )
    link = LeaderLink(cfg, identity, trust, journal, bootstrap.failures)
    link.clock = now  # its messages' ``sent_at``: the leader compares its clock with it
    trust.refresh = link.beat  # an epoch the agent has not heard of: ask the leader now
    service = NodeAgentService(
        cfg, identity, journal, driver, runner, now, trust, freeze_lock=freeze_lock, crypto=crypto
    )
    link.server_view = service.server_view
    if runner is not None:

        def ended() -> None:
            """A transaction ended: the leader sees what the server runs now, not an interval
            later; and the stage directories it left unneeded go (a superseded key)."""
            link.beat_soon()
            service.sweep_stages()

        runner.on_end = ended
        runner.on_held = link.beat_soon  # "needs the admin" said at once, and its end
    service.on_freeze_change = link.beat_soon  # "frozen" shown as it is now, not an interval on
    link.bootstrap_problem = lambda: bootstrap.problem
    # A server on https with a password and a journal with no settings (begun again, an older
    # copy put back) is said too, not while a transaction runs (its settings come at its end).
    link.bootstrap_lacking = bootstrap.lacking
    if runner is not None:
        tasks = runner.tasks
        bootstrap.busy = lambda: any(not task.done() for task in tasks.values())
    # Its journal's checkpoint, its disks' room: read off the beat's path (a hung mount there
    # stalls no heartbeat), news sent at once (``nodeagent.store_watch``).
    store_watch = StoreWatch(service.store_trouble, cfg.heartbeat_interval, link.beat_soon)
    journal.on_checkpoint(store_watch.checkpoint)
    link.store_trouble = store_watch.current
    link.on_removed = bootstrap.set_removed  # a removed node takes no workstation password
    link.removed_at_start(bootstrap.removed)  # as an earlier run was last told (its journal)
    # A signing refused as removed (``BootstrapHost.sign``): the link's next answered
    # heartbeat says "accepted again", as after a refused heartbeat.
    bootstrap.on_signing_removed = link.removed_at_start
    link.answer_check = service.answer_check
    link.stages_ended = service.forget_ended  # stages of rollouts the leader says are over
    service.on_prepare = bootstrap.warm

    def renewed(new: Identity) -> Awaitable[None]:
        creds.update(new)
        service.identity = new
        bootstrap.identity = new
        return link.use(new)

    renewer = Renewer(cfg, identity, link, clock=now, on_renewed=[renewed], crypto=crypto)
    link.renewal = lambda: renewer.status
    agent_pb2_grpc.add_NodeAgentServicer_to_server(service, server)
    await add_standard_services(
        server, [agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name]
    )
    for address in cfg.addresses:
        bind(server, hostport(address, cfg.port), creds.for_listener())
    await server.start()
    watching = asyncio.create_task(store_watch.run(), name="store-watch")
    # (its first message says the store's trouble as read, not none before the first read)
    beats = asyncio.create_task(store_watch.beats_once_read(link.run), name="heartbeats")
    renewals = asyncio.create_task(renewer.run(), name="renewal")
    lease_watch = asyncio.create_task(service.watch_freeze_lease(), name="freeze-lease")
    stale_watch = asyncio.create_task(trust.watch_stale(now), name="crl-stale")
    log.info(
        "agent.started",
        node=cfg.node_name,
        version=__version__,
        listen=[hostport(a, cfg.port) for a in cfg.addresses],
    )
    sd_notify("READY=1")
    pinger = asyncio.create_task(watchdog(), name="watchdog")
    crypto.timeout = cryptoworker.TIMEOUT
    # The bootstrap service after READY: its start asks the crypto worker twice (the CA
    # bundle's check, the password's blinding points), which must not hold back the agent's
    # own service nor systemd's start (review s41, Low 3); nor the agent's stop (a task).
    starting = asyncio.create_task(bootstrap.sync(), name="bootstrap-start")
    waits = [asyncio.create_task(stop.wait(), name="stop")]
    if runner is not None:
        waits.append(asyncio.create_task(runner.dead.wait(), name="txn-died"))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiting in waits:
        waiting.cancel()
    sd_notify("STOPPING=1")
    pinger.cancel()
    log.info("agent.stopping", grace_seconds=GRACE_SECONDS)
    for task in (beats, watching, lease_watch, stale_watch, renewals, starting):
        await stop_task(task)
    await server.stop(GRACE_SECONDS)
    if runner is not None:
        # Let a running transaction reach its end; the journal resumes it if we are cut short.
        await runner.close(txn_grace())
    # No sweep of the stage directories from now on (a transaction's end above may have
    # started one, a retry may be waiting): none may run once the journal closes.
    await service.close()
    await bootstrap.close()
    await crypto.close()
    await link.close()
    # What a cancelled transaction had handed to the store's thread (its journal writes, a
    # staged config's rename or removal) runs before the journal closes (``dbthread.run``).
    await dbthread.barrier()
    journal.close()
    log.info("agent.stopped")
    if runner is not None and runner.dead.is_set():
        raise TransactionDied(runner.fatal)


async def stop_task(task: asyncio.Task[Any], patience: float = 10.0) -> None:
    """Cancel ``task`` and wait for its end, cancelling again while it goes on: a cancellation
    can be swallowed on the way (3.11's ``asyncio.wait_for`` when it meets the inner result),
    and one wait on the task then kept the agent's stop hanging (a CI run saw it). After
    ``patience`` seconds the task is left behind and the stop goes on."""
    deadline = asyncio.get_running_loop().time() + patience
    while not task.done() and asyncio.get_running_loop().time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.done():
        log.error(
            "agent.task_would_not_stop",
            task=task.get_name(),
            detail="a task did not stop in time at the agent's stop; the process ends anyway",
        )
    elif not task.cancelled() and task.exception() is not None:
        log.error(
            "agent.task_failed",
            task=task.get_name(),
            error=str(task.exception()),
            hint="a task of the agent ended with an error at its stop; a bug in tlsroll: report "
            "it with the lines before this one",
        )


def txn_grace() -> float:
    """``TXN_GRACE_SECONDS``, or the test hook's (``TXN_GRACE_ENV``), a number, brought into
    [0, ``TXN_GRACE_SECONDS``]: never longer than the unit's stop timeout allows."""
    try:
        grace = float(os.environ[TXN_GRACE_ENV])
    except (KeyError, ValueError):
        return TXN_GRACE_SECONDS
    if math.isnan(grace):
        return TXN_GRACE_SECONDS
    return min(max(0.0, grace), TXN_GRACE_SECONDS)


def journal_path(cfg: AgentConfig) -> Path:
    return cfg.data_dir / "journal.sqlite3"


def main(argv: list[str] | None = None) -> int:
    """The daemon: its command line and config read first (``nodeagent.front``, which
    ``tlsroll-agent`` runs before it imports this module), then a recovery or the agent."""
    started = front.start(argv)
    if isinstance(started, int):
        return started
    return run(*started)


def run(ns: argparse.Namespace, cfg: AgentConfig) -> int:
    """The agent of ``front.start``'s command line and config, to its exit code."""
    try:
        logs.configure(level=logs.level_of(ns.log_level or cfg.log_level))
        log.debug(
            "agent.config_loaded", config=str(ns.config), log_level=ns.log_level or cfg.log_level
        )
        if ns.reinitialise or ns.journal_checked:
            said = asyncio.run(
                recover(
                    cfg,
                    ns.config,
                    reinitialise=ns.reinitialise,
                    journal_checked=ns.journal_checked,
                )
            )
            print(f"tlsroll-agent: {said}")
            return 0
        say_test_hooks()
        asyncio.run(serve(cfg, ns.config))
    except Exception as exc:
        return refused(exc, ns, cfg)
    return 0


AGENT_HOOKS = (
    CRASH_ENV,
    TERM_ENV,
    TERM_HOLD_ENV,
    TXN_GRACE_ENV,
    PIN_PATIENCE_ENV,
    features.TEST_ENV,
    fsutil.TEST_MOUNT_ROOT_ENV,
)
"""The agent's test-only knobs said at its start (``say_test_hooks``); ``TEST_HANDSHAKE_ENV``
is said where the agent's servers take it, with the deadline in effect."""


def say_test_hooks(environ: Mapping[str, str] = os.environ) -> None:
    """Each of the agent's test-only knobs set (``AGENT_HOOKS``) said at its start, as the
    leader says its own (``leader.test_hook``): one that kills the agent mid-switch, cancels a
    switch at a stop at once, or hides an unmounted disk, left in a developer's or a test
    machine's environment, is seen in the log (audit s75 knobaudit; an installed agent
    refuses to start with one: ``testhooks.refused``)."""
    for hook, value in testhooks.set_hooks(environ, AGENT_HOOKS).items():
        log.warning(
            "agent.test_hook",
            hook=hook,
            value=value,
            detail=f"{hook} is for tests only: it changes what the agent does (README Development)",
            hint=testhooks.HINT,
        )


def refused(failure: Exception, ns: argparse.Namespace, cfg: AgentConfig | None) -> int:
    """The exit code of a start or a run that failed with ``failure``, its line said (``cfg``:
    None while it was being loaded)."""
    try:
        raise failure
    except (ConfigError, NotDamaged, JournalContradicted, NotRegularFile) as exc:
        # NotRegularFile: a file to read (join_token_file, a key) is a directory or a FIFO,
        # for a person to fix (review s47rtin L4)
        daemon.say("tlsroll-agent", exc)
        return EXIT_CONFIG
    except SchemaTooNew as exc:
        daemon.say("tlsroll-agent", exc)
        return EXIT_STORE_TOO_NEW
    except CertificateExpired as exc:
        daemon.say("tlsroll-agent", exc)
        return EXIT_CERT_EXPIRED
    except EnrolmentRefused as exc:
        daemon.say("tlsroll-agent", exc)
        return EXIT_ENROLMENT_REFUSED
    except TlsrollError as exc:
        daemon.say("tlsroll-agent", exc)
        return EXIT_STORE_DAMAGED if needs_a_person(exc) else 1
    except OSError as exc:
        daemon.say("tlsroll-agent", f"{os_error_text(exc)}")
        return 1
    except sqlite3.Error as exc:  # a damaged journal: say which file, never a traceback
        where = journal_path(cfg) if cfg is not None else ns.config
        daemon.say("tlsroll-agent", f"journal {where}: {exc}")
        return EXIT_STORE_DAMAGED if needs_a_person(exc) else 1
    except Exception as exc:  # one line, never a traceback (review s48rev3 M1)
        return daemon.internal_error("tlsroll-agent", exc, debug=ns.log_level == "debug")
