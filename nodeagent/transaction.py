"""The switch transaction: how the agent carries one node from one config to another, safely.

Theory of operation
-------------------
A transaction moves the managed server from its *source* config (say http on 8080) to a
*target* config (https on 8443 with the staged certificate), or back. Once the leader has
handed it over, the agent alone carries it to one of three outcomes:

    completed     the target is live, verified, writes accepted again
    rolled_back   something failed; the source is live again, verified, writes accepted
    failed        even the way back failed; the reason says what the node needs

The steps are a table: each phase names the action that comes next and the phase it leads
to. The journal records the phase *after* each action, so after a crash the agent repeats at
most the one action it was in the middle of; every action is idempotent (freeze twice returns
the same watermark, the config write is atomic, a restart is a restart, unfreeze twice is
unfreeze), so repeating it is safe. A failed action's error and the phase it leads to are one
journal write, and so are the last phase and what is then live, so that a crash cannot come
between them. A switch's ``restarted`` is journalled in the write of its verify's outcome
(``Runner._defers``): killed before that write, the agent repeats the restart, as when killed
during it::

    FORWARD   started ─freeze→ frozen ─write_config→ config_written ─restart→ restarted
              ─verify→ verified ─unfreeze→ completed
    BACKWARD  rolling_back ─restore_config→ restored ─restart→ rb_restarted
              ─verify_source→ rb_verified ─unfreeze→ rolled_back

Any failure on the forward path enters ``rolling_back`` with the reason and the phase it
left (``failed_phase``); ``restore_config`` records whether the source needs a restart
(``restart_needed``: also when the server is down, so that the way back starts it). Both are
fields of the transaction of their own: the ``Plan`` is fixed when the transaction starts and
never rewritten. The backward path retries each action a few times (tenacity), and waits
for room on a full file system (``SPACE_WAIT``); if it still fails the outcome is ``failed``.
It needs no new disk block to put the source config back: the source is staged beside the
live config with the target, before the freeze, and kept until the transaction ends, so the
way back is a rename (``Staged.source``; a transaction resumed on its way there stages it
again, one resumed on its way back writes it whole).

A node never stays frozen because of tlsroll:

- ``unfreeze`` is retried with capped exponential backoff (``UNFREEZE_BACKOFF``) until it
  succeeds or the agent stops (the journal resumes it at the next start); a full disk under
  the server's state, say, only delays it. The attempts are logged at a bounded rate.
- A ``failed`` transaction lifts the freeze too; if the server does not take the unfreeze yet,
  the journal records that one is owed (in the same write as the outcome) and the runner keeps
  trying in the background, across restarts, until it succeeds or a new transaction or a scope
  freeze takes the freeze over.
- A freeze that fails because the server is *down* is no failure: a server that is down takes
  no writes. The transaction goes on (no watermark to compare), so a rollback that finds the
  server dead still writes the old config and starts the server, and verify decides.

Supervision: each transaction runs in a task that is restarted from the journal when it dies
(a journal write that fails, say on a full disk), at most ``TASK_RESTARTS`` times with backoff.
If it still dies, the runner lifts the freeze (unless a scope freeze holds it, or the journal's
last phase says the server may run a config no verify passed and the server does not prove from
outside that it runs the one that phase leads to: then the freeze is kept, ``_unproved``) and
sets ``dead``: the daemon then exits non-zero so that the service manager restarts it, and the next
start resumes the transaction from the journal. Never a live agent with a dead transaction.
But where the journal still cannot be written then (a full disk under the data dir: a restart
changes nothing), the agent does not exit: the transaction is held (``held``, after the same
lift or kept freeze), the agent's view of its server says the node needs the admin and why
(``Runner.needs_admin``), and the task asks the journal again with backoff (``HOLD_BACKOFF``)
and carries the transaction on once a write takes (session 70). A transaction resumed or
restarted first makes a write to its journal (``_probe``): a journal that cannot be written
makes no action on the server (the restart of a server left at ``config_written``
came again at each start of the agent, four times, while the disk stayed full). One resumed
before its restart, on the way there or back, freezes the server again first if its freeze
was lifted meanwhile (``_refreeze``, ``_refreeze_back``).

The runner does no blocking work on the event loop: journal writes, config files and the
outside checks run in threads. Time (``clock``, ``sleep``) and the outside checks
(``Checks``) are injected, so tests/test_runner.py drives it against a fake server.

Test hook: if the environment variable ``TLSROLL_AGENT_TEST_CRASH_AFTER`` names a phase, the
agent SIGKILLs itself right after journalling that phase, ``started`` included (fault tests
use it to kill the agent at an exact point; it is never set in production). And
``TLSROLL_AGENT_TEST_TERM_AFTER``: the agent sends itself SIGTERM there instead (what
``systemctl restart tlsroll-agent`` does mid-switch: the agent stops as it does on any SIGTERM,
``nodeagent.runtime``); with ``TLSROLL_AGENT_TEST_TERM_HOLD`` set as well, the transaction then
waits, before its next action, for the stop to cancel it (a switch slower than the grace, made
certain: review s41rev1 M4).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import errno
import functools
import os
import signal
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    wait_incrementing,
)

from nodeagent.drivers import Driver, DriverError, ServerFacts, StagedConfig, read_file
from nodeagent.lease import Leases
from tlsroll import clocks, dbthread, logs, probe
from tlsroll.backoff import Policy
from tlsroll.defaults import MAX_FREEZE_LEASE
from tlsroll.enums import JOURNAL_PUT_BACK, TxnKind, TxnOutcome, of_server
from tlsroll.errors import (
    LocalResourceError,
    NotRegularFile,
    TerminalError,
    TransientError,
    is_local_shortage,
    is_out_of_space,
    os_error_text,
)
from tlsroll.fsutil import PRIVATE, read_regular, write_atomic

if TYPE_CHECKING:  # the journal stores Phase values: it imports this module
    from nodeagent.journal import Journal, Txn

log = logs.get_logger(__name__)
_T = TypeVar("_T")

CRASH_ENV = "TLSROLL_AGENT_TEST_CRASH_AFTER"
TERM_ENV = "TLSROLL_AGENT_TEST_TERM_AFTER"
TERM_HOLD_ENV = "TLSROLL_AGENT_TEST_TERM_HOLD"
DRAIN_TIMEOUT = 10.0
BACKWARD_ATTEMPTS = 3  # each action of the way back, before the outcome is ``failed``
BACKWARD_WAIT = 0.5  # seconds before the 2nd attempt, 2 × that before the 3rd, ...
VERIFY_ATTEMPTS = 3  # a server that has just restarted may need a moment to answer
VERIFY_WAIT = 0.3
# unfreeze: 0.5 s, 1 s, 2 s ... at most 30 s between attempts, for as long as it takes
UNFREEZE_BACKOFF = Policy(free=1, base=0.5, cap=30.0, forget=3600.0)
# A scope switch that cannot read its lease (``_unfreeze``) in an agent process that has never
# read it (so a lease an earlier process granted is unknown) unfreezes after this long: any
# lease journalled before has run out by then (the agent's Freeze grants at most this). Once the
# process has read it, the leases it knows of bound the wait (``Leases.known_end``).
LEASE_UNREAD_LIMIT = dt.timedelta(seconds=MAX_FREEZE_LEASE)
UNFREEZE_LOG_EVERY = 600.0  # seconds: past the first attempts, at most one line this often
# The agent itself short of descriptors or kernel memory (EMFILE, ENFILE, ENOMEM, ENOBUFS:
# ``is_local_shortage``) says nothing about the server: the action is tried again
# after 0.5 s, 1 s, 2 s, 4 s, then every 5 s, about two minutes in all (the node stays frozen
# meanwhile), before it counts as the action failing. Rolling back would need descriptors too.
SHORTAGE_ATTEMPTS = 30
SHORTAGE_BACKOFF = Policy(free=0, base=0.5, cap=5.0, forget=3600.0)
# The way back on a file system with no room left (ENOSPC, EDQUOT: the server's config dir on a
# full disk, a runaway log taking each block as it is freed) waits for room: each action of the
# way back is tried again after 0.5 s, 1 s, 2 s, 4 s, 8 s, then every 10 s, for at most
# ``SPACE_WAIT`` seconds of waits in all (the server stays as it is meanwhile, frozen if it
# runs), before it counts as the action failing. Giving up sooner left the target config live
# and the server down (s38 audit H3). The way back's config is staged with the target, so it
# needs no new block (``Staged.source``); this is for what still does (a transaction resumed
# by a new agent process, a driver that writes its config its own way). On the way forward a
# full disk is a failure as any other: the way back is taken.
SPACE_WAIT = 600.0
SPACE_BACKOFF = Policy(free=0, base=0.5, cap=10.0, forget=3600.0)
# a transaction task that dies is started again from the journal after 1 s, 2 s, 4 s; if it
# dies once more, the agent exits (see the module docstring)
TASK_RESTARTS = 3
TASK_BACKOFF = Policy(free=1, base=1.0, cap=8.0, forget=3600.0)
# a transaction held on a journal that cannot be written asks it again after 2 s, 4 s, 8 s ...
# then every minute (``Runner._hold``), and logs that it still waits at a bounded rate
HOLD_BACKOFF = Policy(free=0, base=2.0, cap=60.0, forget=3600.0)
EXIT_UNFREEZE_ATTEMPTS = 3  # before the agent exits: a few quick tries, the next start resumes
LATEST_KEPT = 8  # transactions whose last record ``TxnChanges`` keeps for the watch
# How much later than its time stamp a file may have been written (``_not_loaded``): the
# kernel stamps a file from its coarse clock, updated at each tick (4 ms at HZ=250): up to
# 6.1 ms behind the write here (a rename loop, session 55), more on a machine whose timekeeping
# stalls (a VM). A margin, not a bound; a reference server's restart starts it about 180 ms
# after its config's write. A file system that keeps whole seconds (ext4 with 128-byte inodes)
# adds a second to it, one that keeps even seconds (FAT) two (``_file_time_grain``).
FILE_TIME_SLACK = dt.timedelta(milliseconds=50)


class Phase(StrEnum):
    """Where a transaction is: the last step the journal recorded (see the tables below)."""

    STARTED = "started"
    FROZEN = "frozen"
    CONFIG_WRITTEN = "config_written"
    RESTARTED = "restarted"
    VERIFIED = "verified"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    RESTORED = "restored"
    RB_RESTARTED = "rb_restarted"
    RB_VERIFIED = "rb_verified"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


def next_action(phase: Phase) -> Action | None:
    """The action a transaction in ``phase`` takes next (None once it has ended)."""
    step = FORWARD.get(phase) or BACKWARD.get(phase)
    return step[0] if step is not None else None


class Action(StrEnum):
    """What the agent does to the server between two phases (the journal's event steps)."""

    FREEZE = "freeze"
    WRITE_CONFIG = "write_config"
    RESTART = "restart"
    VERIFY = "verify"
    UNFREEZE = "unfreeze"
    RESTORE_CONFIG = "restore_config"
    VERIFY_SOURCE = "verify_source"


# phase -> (action, phase after it)
FORWARD: dict[Phase, tuple[Action, Phase]] = {
    Phase.STARTED: (Action.FREEZE, Phase.FROZEN),
    Phase.FROZEN: (Action.WRITE_CONFIG, Phase.CONFIG_WRITTEN),
    Phase.CONFIG_WRITTEN: (Action.RESTART, Phase.RESTARTED),
    Phase.RESTARTED: (Action.VERIFY, Phase.VERIFIED),
    Phase.VERIFIED: (Action.UNFREEZE, Phase.COMPLETED),
}
# A freeze that finds the server down asks again after these waits (3 s in all) before it goes
# on without: a server someone else restarts answers again within them.
DOWN_RECHECK = (0.5, 1.0, 1.5)
# Forward phases past the freeze whose next action needs it: resumed there, the runner checks
# that the server is still frozen first (``_refreeze``). From ``verified`` on only the unfreeze
# is left.
REFREEZE = frozenset({Phase.FROZEN, Phase.CONFIG_WRITTEN, Phase.RESTARTED})
BACKWARD: dict[Phase, tuple[Action, Phase]] = {
    Phase.ROLLING_BACK: (Action.RESTORE_CONFIG, Phase.RESTORED),
    Phase.RESTORED: (Action.RESTART, Phase.RB_RESTARTED),
    Phase.RB_RESTARTED: (Action.VERIFY_SOURCE, Phase.RB_VERIFIED),
    Phase.RB_VERIFIED: (Action.UNFREEZE, Phase.ROLLED_BACK),
}
# Backward phases before the way back's restart: resumed there, the runner checks that the
# server is still frozen right before that restart, if one is needed (``_refreeze_back``).
REFREEZE_BACK = frozenset({Phase.ROLLING_BACK, Phase.RESTORED})
# terminal phase -> the transaction's outcome
TERMINAL: dict[Phase, TxnOutcome] = {
    Phase.COMPLETED: TxnOutcome.COMPLETED,
    Phase.ROLLED_BACK: TxnOutcome.ROLLED_BACK,
    Phase.FAILED: TxnOutcome.FAILED,
}
# A failure in these phases left the target config live on a restarted server (or one about
# to be): the way back restarts the server even if the source config is already in place.
TARGET_MAY_BE_RUNNING = frozenset({Phase.CONFIG_WRITTEN, Phase.RESTARTED, Phase.VERIFIED})


class StepFailed(TerminalError):
    pass


class LeaseUnread(TransientError):
    """A scope switch at its end could not read whether a lease holds its freeze: the server
    stays frozen and the unfreeze step asks again (``Runner._unfreeze``)."""


class TransactionDied(TerminalError):
    """A transaction task died more often than it is restarted: the agent must exit (its
    message is the daemon's one line)."""


def _started_before(status: dict[str, Any] | None, began: dt.datetime) -> bool:
    """Whether the server's status (``started_at``, as ``_not_loaded`` reads it) says it
    started before ``began`` (a transaction's start, after its plan took the certificate
    served: ``plans.source_pin``), so that nothing restarted it since; False where it does
    not say. Both times are the node's one wall clock (as ``_not_loaded`` takes them): a clock
    stepped back between the two can pass a restarted server as not, the rule as before
    session 73, accepted (the admin's to notice, as there).

    A ``started_at`` is its start cut down to the stamp's grain (the reference server's to
    the millisecond; an exec command's may say whole seconds, as README's example does): the
    server may have started up to a grain after it says, so it must say so a grain before
    ``began`` (``_stamp_grain``). A server restarted by the transaction within the second it
    began (a switch's restart comes milliseconds after) passed as unrestarted (review s73
    revhttps)."""
    try:
        started = dt.datetime.fromisoformat(str((status or {}).get("started_at")))
    except ValueError:
        return False
    if started.tzinfo is None or began.tzinfo is None:
        return False
    return started + _stamp_grain(started) <= began


def _stamp_grain(stamp: dt.datetime) -> dt.timedelta:
    """The coarsest grain ``stamp`` may have been cut to, by its digits (a safe bound, not
    its text's: ``…:07.250`` may be a stamp in tenths, ``…:00`` one in minutes)."""
    if stamp.microsecond:
        grain = 1
        while stamp.microsecond % (grain * 10) == 0:
            grain *= 10
        return dt.timedelta(microseconds=grain)
    if stamp.second:
        return dt.timedelta(seconds=1)
    if stamp.minute:
        return dt.timedelta(minutes=1)
    return dt.timedelta(hours=1) if stamp.hour else dt.timedelta(days=1)


def _not_loaded(config_file: Path, status: dict[str, Any] | None) -> str:
    """Why nothing shows that the server loaded ``config_file`` as it is now ("" if it
    did): the server's status must say when it started (``started_at``, ISO 8601, as the
    reference server's), after the file was last written (blocking: reads the file's time).

    "Last written" is the later of its mtime and ctime: the way back puts the source in place
    by renaming a file staged before the forward restart (``commit_config``), and a rename
    keeps that file's older mtime but sets its ctime (review s41rev3 N1: the source, staged
    before the server restarted onto the target, read as loaded). Nothing sets a ctime back
    (``touch -d``, ``cp -p`` set only the mtime). A clock stepped back between the server's
    start and the write can make a config written after the start look older: accepted (the
    agent's and the server's clock are the node's one clock; a step back across a switch is
    the admin's to notice).

    A file's time is its write's time rounded down, by up to a tick of the kernel's coarse
    clock (measured here: 6 ms) and to the file system's grain (whole seconds on some): a
    rename a few milliseconds after the start read as before it, and the source was
    "loaded" (CI of session 54). So the server must have started ``FILE_TIME_SLACK`` after
    the time stamp, and a second (two) more after a stamp in whole (even) seconds
    (``_file_time_grain``). A doubt needs the admin, never a verdict: a reference server's
    restart starts it about 180 ms after its config's write, within that on a file system
    of whole seconds, where such a settle thus needs the admin."""
    if status is None:
        return "the server's status cannot be read"
    text = status.get("started_at")
    try:
        started = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return "the server's status does not say when it started"
    if started.tzinfo is None:
        return "the server's status does not say when it started"
    try:
        stat = config_file.stat()
    except OSError as exc:
        return f"its config file's time cannot be read ({exc.strerror})"
    stamp = max(stat.st_mtime_ns, stat.st_ctime_ns)
    written = dt.datetime.fromtimestamp(stamp / 1e9, dt.UTC)
    slack = FILE_TIME_SLACK + _file_time_grain(stamp)
    if started > written + slack:
        return ""
    when = f"({started.isoformat(timespec='milliseconds')})"
    last = f"its config was last written ({written.isoformat(timespec='milliseconds')})"
    if started <= written:
        return f"the server started {when} before {last}"
    return (
        f"the server started {when} too soon after {last} to tell which it loaded (a file's"
        f" time may be up to {slack.total_seconds() * 1000:.0f} ms early)"
    )


def _file_time_grain(stamp_ns: int) -> dt.timedelta:
    """How much a file system that keeps no fraction may have rounded the time stamp
    ``stamp_ns`` down: 2 s for one in even seconds (FAT keeps a file's mtime so), 1 s for one in
    whole seconds, nothing for one with a fraction (one in a billion of a nanosecond file
    system's stamps is taken for whole seconds: the settle then needs the admin)."""
    if stamp_ns % 2_000_000_000 == 0:
        return dt.timedelta(seconds=2)
    if stamp_ns % 1_000_000_000 == 0:
        return dt.timedelta(seconds=1)
    return dt.timedelta(0)


def _read_or_none(path: Path) -> bytes | None:
    """A file of a transaction of an earlier release (its plan's target or backup), if it is
    still there (a regular file: never a FIFO's endless read, review rev50a L2)."""
    try:
        return read_regular(path)
    except (OSError, NotRegularFile):
        return None


HTTP_WRITTEN = "http-written"
"""``Plan.change`` of a way back that writes the server's http config anew (its https one kept
beside it): no switch in the agent's journal to put back (``plans.unjournalled_way_back``)."""


def kept_note(path: Path, *, written: bool = False) -> str:
    """Where a way back kept the live config, edited since tlsroll wrote it
    (``Runner._keep_edited``); ``written`` (``HTTP_WRITTEN``): the https config it replaced."""
    if written:
        return f"the https config it replaced is kept as {path}"
    return f"the config as edited since the switch is kept as {path}"


def kept_reason(path: Path, *, written: bool = False) -> str:
    """What a way back that kept the live config, edited since tlsroll wrote it, says of it
    (its transaction's reason, shown beside the node by the leader). ``written``
    (``HTTP_WRITTEN``): no config from before a switch was put back, the http one was written
    anew; it said "the config from before the switch is back" (session 71, reenrol)."""
    if written:
        return (
            f"{kept_note(path, written=True)}; the server's config was set to http, every other"
            " setting kept (this agent's journal holds no switch to put back)"
        )
    return (
        f"{kept_note(path)}; the config from before the switch is back (make those edits again"
        " if they are still wanted)"
    )


def _still_kept(txn: Txn, plan: Plan, reason: str) -> str:
    """A way back that kept the edited config and then failed (its verify, say): its reason
    still says where that copy is (the failure's reason replaced the one that said it, review
    of s59-wayback L3), which tlsroll never removes."""
    if not plan.keep_edited:
        return reason
    note = kept_note(Path(plan.keep_edited), written=plan.change == HTTP_WRITTEN)
    return f"{reason} ({note})" if txn.reason.startswith(note) else reason


async def _all_or_none(*checks: Awaitable[_T]) -> list[_T]:
    """``asyncio.gather``'s results of ``checks``, run at once; once one raises (the verify's
    https check of a CA that cannot be used, ``_unusable_ca``; the checking side short of
    descriptors), the others are cancelled and awaited before it is raised: ``gather`` left
    them running, and the http and watermark checks begun beside a failed https check looked
    at the server while the way back began to change it (review s72 L)."""
    tasks = [asyncio.ensure_future(check) for check in checks]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _unusable_ca(ca_file: Path, exc: ssl.SSLError | ValueError) -> OSError:
    """The verify's CA (read from ``ca_file``) that the TLS library takes no context from,
    as one line naming the file: ``ssl``'s words alone (``no start line: cadata does not
    contain a certificate (_ssl.c:4020) (errno 0, ?)``, ``ValueError: Empty certificate
    data``) named neither the file nor that it is the CA (review of session 72)."""
    if isinstance(exc, UnicodeError):
        why = "it holds bytes that are not ASCII (no PEM)"
    else:
        why = " ".join(str(exc).split()) or type(exc).__name__
    return OSError(
        errno.EINVAL, f"not a CA certificate the TLS library takes ({why})", str(ca_file)
    )


def describe(exc: BaseException) -> str:
    """Our own errors say what happened; an OSError its path and errno; anything else (an
    admin's command printing JSON without a field, a journal write, say) also names its type."""
    if isinstance(exc, OSError):
        return os_error_text(exc)
    if isinstance(exc, StepFailed | DriverError | LocalResourceError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def worth_logging(attempt: int, since_logged: float) -> bool:
    """Retries are logged at a bounded rate: the first three, then the 4th, 8th, 16th ...,
    and at least one every ``UNFREEZE_LOG_EVERY`` seconds."""
    return attempt <= 3 or attempt & (attempt - 1) == 0 or since_logged >= UNFREEZE_LOG_EVERY


# Why a journal takes no write, when the agent holds a transaction on it rather than exit
# (``Runner._probe``): its disk full, read-only or failing, or its file locked by another
# process. A new agent process would find the same; what the admin does differs (the hint).
# Any other failure (a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB) exits as before: the next
# start refuses the file and says how to recover (``nodeagent.journal.open_journal``).
_UNWRITABLE_CODES = (
    ("SQLITE_FULL", "disk full"),
    ("SQLITE_READONLY", "read-only"),
    ("SQLITE_IOERR", "I/O error"),
    ("SQLITE_CANTOPEN", "cannot open"),
    ("SQLITE_BUSY", "locked"),
    ("SQLITE_LOCKED", "locked"),
)
_UNWRITABLE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk full",
    errno.EROFS: "read-only",
    errno.EIO: "I/O error",
}


@dataclass(frozen=True)
class Unwritable:
    """Why the journal took no write (``Runner._probe``): ``cause`` in a few words and its
    code (``disk full: SQLITE_FULL``), ``error`` the whole error (for the log), and whether
    the agent holds a transaction on it (``held``: one of the causes above) or exits."""

    cause: str
    error: str
    held: bool

    def hint(self, directory: Path) -> str:
        """What the admin does, for the agent's view of its server."""
        words = self.cause.split(":")[0]
        if words == "disk full":
            return f"free space in {directory}"
        if words == "read-only":
            return f"make {directory} writable again"
        if words == "locked":
            return f"end what else holds the journal in {directory}"
        return f"check the disk and the journal in {directory}"


def unwritable(exc: BaseException) -> Unwritable:
    """``exc``, a write of the journal's that failed, as ``Unwritable``: SQLite's result code
    or the errno found in its cause chain decides."""
    error = (str(exc) or type(exc).__name__)[:300]
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.Error):
            code = getattr(seen, "sqlite_errorname", None) or ""
            for prefix, words in _UNWRITABLE_CODES:
                if code.startswith(prefix):
                    return Unwritable(f"{words}: {code}", error, True)
            return Unwritable(code or type(seen).__name__, error, False)
        if isinstance(seen, OSError) and seen.errno in _UNWRITABLE_ERRNOS:
            name = errno.errorcode.get(seen.errno, "?")
            return Unwritable(f"{_UNWRITABLE_ERRNOS[seen.errno]}: {name}", error, True)
        seen = seen.__cause__ or seen.__context__
    return Unwritable(type(exc).__name__, error, False)


class JournalUnwritable(TransientError):
    """A transaction resumed or restarted found that its journal takes no write
    (``Runner._probe``): nothing was done to the server; counted as a death of its task."""


class TxnDied(TransientError):
    """A transaction task's end after its last restart: ``txn.died`` has said why (the agent
    exits; started again, it resumes the transaction from its journal)."""


def _log_crash(task: asyncio.Task[Txn]) -> None:
    """A transaction task must never die silently: the journal resumes it at the next start,
    but the log has to say why it stopped now (unless ``txn.died`` said it: its death was
    logged twice, the second time by the task's name only, review s69 revlogs L2)."""
    exc = None if task.cancelled() else task.exception()
    if isinstance(exc, Exception) and not isinstance(exc, TxnDied):
        log.error(
            "txn.crashed",
            task=task.get_name(),
            error=describe(exc),
            hint="a bug in tlsroll: report it with the lines before this one",
        )


def _write_then(
    write: Callable[..., Txn],
    then: Ahead,
    kept: list[Txn],
    txn: Txn,
    *args: Any,
    **changes: Any,
) -> tuple[Txn, Txn | None, Exception | None]:
    """``write`` (a journal write: its failure is raised); then the action ``then.act`` with
    the new record (its failure is returned, for the runner to treat as the action's); then,
    if it succeeded, ``then.record`` (the journal write of the phase it leads to: its failure
    is raised, as any journal write's, the record ``write`` made in ``kept``). The journal
    still comes before each act."""
    new = write(txn, *args, **changes)
    kept.append(new)
    try:
        then.act(new)
    except Exception as exc:
        return new, None, exc
    return new, then.record(new), None


@dataclass(frozen=True)
class Ahead:
    """A blocking action run in the same hand-off to the store's thread as the record of the
    phase before it, and the record of the phase it leads to (``Runner._ahead_of``)."""

    act: Callable[[Txn], object]
    record: Callable[[Txn], Txn]


@dataclass(frozen=True)
class Passed:
    """A step that ended and is journalled with the next one's record, in its write
    (``Runner._defers``: a switch's restart, recorded with its verify): what it changed (its
    ``phase`` included), when it ended (its ``end`` event's time) and the step it began."""

    changes: dict[str, Any]
    at: dt.datetime
    begin: str | None


@dataclass(frozen=True)
class Plan:
    """Everything a transaction needs to run, fixed when it starts (journalled as JSON)."""

    facts: ServerFacts
    source_schemes: tuple[str, ...]
    target_schemes: tuple[str, ...]
    # Where an earlier release kept the target config and the source's backup as files; a
    # transaction that carries its configs in the journal (``Txn.target_config``,
    # ``source_config``) writes neither file.
    new_config_file: Path
    backup_file: Path
    ca_file: Path
    target_fingerprint: str  # the certificate https must present after the switch ("" = any)
    # What is live once the transaction completes: https files and address for the bootstrap
    # service (cert_file, key_file, ca_file, verifier_file, server_url), or None for http.
    live_tls: dict[str, str] | None = None
    live_before: dict[str, str] | None = None  # what was live when it started (for rollback)
    keep_frozen: bool = False  # scope freeze: stays frozen while its lease is journalled
    # What the switch does ("enable-tls", "enable-tls+http" for a dual target, "finalize", ...;
    # "" for a rollback and for plans journalled before it was recorded): a replay of a
    # different change under the same rollout id is refused, never answered with this one.
    change: str = ""
    # A way back (rollback) whose live config was edited since tlsroll wrote it
    # (``plans.edited_since``): where that file is kept before the write replaces it
    # (``Runner._keep_edited``); "" keeps nothing (a release before it ignores the key).
    keep_edited: str = ""
    # The certificate the source serves on https (``sha256:<hex>``), where tlsroll may not
    # know its issuer (files the server's config names: ``plans.served_live``, the way back
    # no switch in the journal made): the restore check pins it (``Checks.check_pinned``)
    # instead of trusting ``ca_file``, which is the target's CA or the config's client CA,
    # not the source certificate's issuer (review s70 L1: "restore failed" of a server that
    # was fine). "" trusts ``ca_file``, as before (a release before it ignores the key).
    # Two, comma-separated, where the server served another than its file held (any passes:
    # ``plans.source_pin``).
    source_fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        f = self.facts
        return {
            "facts": [f.address, f.app_path, f.http_port, f.https_port, list(f.schemes)],
            "source_schemes": list(self.source_schemes),
            "target_schemes": list(self.target_schemes),
            "new_config_file": str(self.new_config_file),
            "backup_file": str(self.backup_file),
            "ca_file": str(self.ca_file),
            "target_fingerprint": self.target_fingerprint,
            "live_tls": self.live_tls,
            "live_before": self.live_before,
            "keep_frozen": self.keep_frozen,
            "change": self.change,
            **({"keep_edited": self.keep_edited} if self.keep_edited else {}),
            **({"source_fingerprint": self.source_fingerprint} if self.source_fingerprint else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        a, p, hp, sp, schemes = data["facts"]
        return cls(
            facts=ServerFacts(a, p, hp, sp, tuple(schemes)),
            source_schemes=tuple(data["source_schemes"]),
            target_schemes=tuple(data["target_schemes"]),
            new_config_file=Path(data["new_config_file"]),
            backup_file=Path(data["backup_file"]),
            ca_file=Path(data["ca_file"]),
            target_fingerprint=data["target_fingerprint"],
            live_tls=data.get("live_tls"),
            live_before=data.get("live_before"),
            keep_frozen=bool(data.get("keep_frozen", False)),
            change=str(data.get("change", "")),
            keep_edited=str(data.get("keep_edited", "")),
            source_fingerprint=str(data.get("source_fingerprint", "")),
        )


def restore_pin(pins: str, *, restarted: bool) -> str:
    """``Plan.source_fingerprint`` as a restore check takes it: all its pins where the server
    was not restarted since the plan was made (it serves what it served then, which
    ``plans.source_pin`` pinned as well as its file's); the first alone (the certificate its
    config's file held) where it was: a server restarted loads what its config names, and one
    still serving another certificate did not (a restart that changed nothing, another program
    on its port: review s72 revhttps, "restored" of a server that was not)."""
    return pins.split(",", 1)[0] if restarted else pins


@dataclass(frozen=True)
class Checks:
    """How verify looks at the server from outside: coroutines with ``tlsroll.probe``'s
    signatures, run on the event loop (issue 15: no worker thread inside the freeze window);
    tests answer them from a fake server."""

    port_open: Callable[[str, int], Awaitable[bool]] = probe.port_open
    check_http: Callable[[str, int, str], Awaitable[str | None]] = probe.check_http
    check_https: Callable[[str, int, str, bytes, str | None], Awaitable[str | None]] = (
        probe.check_https
    )
    check_pinned: Callable[[str, int, str, str], Awaitable[str | None]] = probe.check_pinned
    # Blocking, before the freeze: check_https's context for a CA made ready (the staging's)
    prepare_https: Callable[[bytes, str], None] = probe.prepare_https


Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Staged:
    """What a switch's staging (``Runner.stage``) made ready before its freeze: the target
    config written beside the live one (None: nothing staged; the write step writes it
    whole), the staged CA its https verify trusts (None: the verify reads it itself), and the
    source config written beside the live one too (``source``), kept until the transaction
    ends: the way back is then a rename, which needs no new block on a full disk (s38 audit
    H3; None: the way back writes it whole)."""

    config: StagedConfig | None = None
    ca_pem: bytes | None = None
    source: StagedConfig | None = None

    def files(self) -> list[StagedConfig]:
        """The staged configs (to remove those no write took)."""
        return [c for c in (self.config, self.source) if c is not None]


# A switch's staging (``Runner.stage``), or the store thread's future of it
# (``Runner.stage_next``: staged in the hand-off after the create's, done before any later
# one; the freeze waits for it, ``Runner._freeze``).
Staging = Staged | Future[Staged | None]


def _staged_now(staging: Staging | None) -> StagedConfig | None:
    """The config ``staging`` staged; on the store's thread only, where a future
    ``stage_next`` made has always completed (one thread, in order). Never waits for it: the
    store's only thread waiting for a call queued behind its own would hang the journal, so
    a staging not done yet is a mistake, and fails loudly (``TimeoutError``) instead."""
    if isinstance(staging, Future):
        staging = staging.result(timeout=0)
    return staging.config if staging is not None else None


def _source_now(staging: Staging | None) -> StagedConfig | None:
    """The source config ``staging`` staged, if its staging is done (on the store's thread:
    never waits; a staging that is not done, or failed, has none to give)."""
    if isinstance(staging, Future):
        if not staging.done() or staging.cancelled() or staging.exception() is not None:
            return None
        staging = staging.result()
    return staging.source if staging is not None else None


class TxnChanges:
    """Tells whoever waits that a transaction's journal record changed (``WatchTransaction``
    streams each state to the leader as it is journalled, instead of the leader polling).

    Take ``next()`` *before* reading the journal, then wait on it: a change journalled between
    the read and the wait has set that very event, so none is missed.

    ``latest(rollout_id, kind)``: the record this process last journalled for a transaction
    (the create, then each write of the runner, which is the only writer of a running
    transaction's row): the watch sends it without reading it back from the journal (a
    worker-thread hop per phase, issue 15). None for a transaction this process has not
    written (one resumed from the journal is read there first)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._latest: dict[tuple[str, str], Txn] = {}

    def next(self) -> asyncio.Event:
        return self._event

    def latest(self, rollout_id: str, kind: str) -> Txn | None:
        return self._latest.get((rollout_id, str(kind)))

    def note(self, txn: Txn) -> None:
        """``txn`` is what the journal now holds for it (kept for the last few transactions)."""
        key = (txn.rollout_id, txn.kind.value)
        self._latest.pop(key, None)
        self._latest[key] = txn
        while len(self._latest) > LATEST_KEPT:
            del self._latest[next(iter(self._latest))]

    def changed(self, txn: Txn) -> None:
        """``txn`` was journalled: note it and wake whoever waits."""
        self.note(txn)
        event, self._event = self._event, asyncio.Event()
        event.set()


class Runner:
    """Runs transactions as asyncio tasks, one at a time per node."""

    def __init__(
        self,
        journal: Journal,
        driver: Driver,
        clock: Callable[[], dt.datetime],
        on_complete: Callable[[], Awaitable[None]] | None = None,
        *,
        on_switch: Callable[[], object] | None = None,
        checks: Checks | None = None,
        sleep: Sleep = asyncio.sleep,
        freeze_lock: asyncio.Lock | None = None,
        leases: Leases | None = None,
        monotonic: Callable[[], float] = clocks.elapsed,
    ) -> None:
        self.journal = journal
        self.driver = driver
        self.clock = clock
        self.monotonic = monotonic  # elapsed time (a suspend counts): the scope freeze's leases
        self.on_complete = on_complete  # told when what is live has changed
        self.on_switch = on_switch  # told when a switch begins (to get ready for its end)
        # Told when a transaction's task has ended, whatever its outcome (completed, taken
        # back on the node, failed): the agent's next heartbeat then comes at once
        # (``LeaderLink.beat_soon``), with what the server runs now, and the stage
        # directories no longer needed go (``NodeAgentService.sweep_stages``).
        self.on_end: Callable[[], object] | None = None
        self.checks = checks or Checks()
        self.sleep = sleep  # between attempts (tenacity); tests move a fake clock instead
        # The agent's freeze lock, shared with the servicer's Freeze, Unfreeze and lease watch
        # (``NodeAgentService``): a lift of a freeze that reads the scope freeze's lease first
        # (``_lift_owed``, ``_give_up``, ``_die``) takes it around the read and the unfreeze, so
        # that a Freeze crossing them is never undone (review s32 F3, as audit H4 for the watch).
        self.freeze_lock = freeze_lock if freeze_lock is not None else asyncio.Lock()
        # The scope freeze's leases in elapsed time, shared with the servicer the same way: a
        # scope switch that cannot read the lease waits for those this process knows of.
        self.leases = leases if leases is not None else Leases()
        self.tasks: dict[tuple[str, str], asyncio.Task[Txn]] = {}
        # The transactions (rollout id, kind) whose end left the freeze to the scope freeze's
        # lease (``_unfreeze``, ``_give_up``): looked at again once their outcome is journalled
        # (``_lift_left_freeze``).
        self._left_to_lease: set[tuple[str, str]] = set()
        self.crash_after = os.environ.get(CRASH_ENV, "")
        self.term_after = os.environ.get(TERM_ENV, "")
        self.term_hold = bool(os.environ.get(TERM_HOLD_ENV))
        self._term_sent = False
        # Set when a transaction task died for good (``fatal`` says why): the daemon exits.
        self.dead = asyncio.Event()
        self.fatal = ""
        # The transactions held because their journal cannot be written (``_hold``): why, in
        # one line, which the agent's view of its server says after "needs the admin: ".
        self.held: dict[tuple[str, str], str] = {}
        self.held_said = ""  # the last hold's whole line (``txn.held``: what ``_die`` did too)
        self.on_held: Callable[[], object] | None = None  # told when a hold begins or ends
        self._owed: asyncio.Task[None] | None = None  # lifts a freeze a failed transaction owes
        self.changes = TxnChanges()  # set after every journalled phase (WatchTransaction)
        # A switch's target config, staged before its freeze (``stage``), and
        # what an action run in the same hand-off as the record before it did (``_ahead_of``):
        # its error, for ``_act`` to raise, or the record of the phase it led to.
        self._staged: dict[tuple[str, str], Staging] = {}
        self._ahead: dict[tuple[str, str], Exception] = {}
        self._followed: dict[tuple[str, str], Txn] = {}
        # The same staging, for its source config (``Staged.source``): kept until the way
        # back takes it (``_put_source``, on the store's thread) or the transaction ends.
        self._sources: dict[tuple[str, str], Staging] = {}
        # The staged CA a switch's https verify trusts, read with its staging (``stage``) and
        # taken from it by the freeze (``_freeze``), so that the verify, on the event loop,
        # reads no file inside the freeze window. Set and removed by the transaction's own
        # task only (``run``).
        self._cas: dict[tuple[str, str], bytes] = {}
        # A switch just begun: set once its freeze call is out (``under_way``).
        self._under_way: dict[tuple[str, str], asyncio.Future[None]] = {}

    def start(self, txn: Txn, begun: str | None = None, staged: Staging | None = None) -> None:
        """Run ``txn`` in a task of its own (``begun`` and ``staged`` as for ``run``); nothing
        if it runs."""
        key = (txn.rollout_id, txn.kind.value)
        if key in self.tasks and not self.tasks[key].done():
            if staged is not None:
                self._discard(staged)
            return
        if self._owed is not None:  # the new transaction owns the freeze from now on
            self._owed.cancel()
            self._owed = None
        if txn.kind is TxnKind.SWITCH and self.on_switch is not None:
            self.on_switch()
        self.changes.note(txn)
        task = asyncio.create_task(self._supervised(txn, begun, staged), name=f"txn-{key}")
        task.add_done_callback(_log_crash)
        task.add_done_callback(self._ended)
        self.tasks[key] = task
        if begun == Action.FREEZE:
            out = self._under_way[key] = asyncio.get_running_loop().create_future()

            def ended(_task: asyncio.Task[Txn]) -> None:
                if self._under_way.get(key) is out:
                    del self._under_way[key]
                if not out.done():
                    out.set_result(None)

            task.add_done_callback(ended)

    def _ended(self, _task: asyncio.Task[Txn]) -> None:
        if self.on_end is not None:
            try:
                self.on_end()
            except Exception as exc:  # the transaction is over; a listener's trouble is not it
                log.error(
                    "txn.on_end_failed",
                    error=describe(exc),
                    hint="the switch itself is over; a bug in tlsroll: report it with the lines "
                    "before this one",
                )

    async def under_way(self, txn: Txn) -> None:
        """Return once the freeze call of ``txn``, just begun (``start`` with ``begun``
        freeze), is out, or its task has ended; at once for any other. The servicer's work
        after a begin (its log line, the first WatchTransaction message) waits for it: that
        work used to come first on the loop, and the freeze call after it (issue 15)."""
        out = self._under_way.get((txn.rollout_id, txn.kind.value))
        if out is not None:  # removed by the task's end (``start``)
            await asyncio.shield(out)

    def _freeze_out(self, txn: Txn) -> None:
        out = self._under_way.get((txn.rollout_id, txn.kind.value))
        if out is not None and not out.done():
            out.set_result(None)

    async def resume_all(self) -> list[Txn]:
        """Carry on every unfinished transaction the journal holds (returned), except those of
        a journal put back from a copy (``Journal.restored_unfinished``), which are settled
        from what the server runs instead (``_settle_restored``: see ``nodeagent.journal``)."""
        await dbthread.run(self.driver.end_stale_commands)
        await dbthread.run(self.driver.discard_stale_staged)
        pending = await dbthread.run(self.journal.unfinished)
        held = await dbthread.run(self.journal.restored_unfinished)
        resumed = []
        for txn in pending:
            if (txn.rollout_id, txn.kind.value) in held:
                await self._settle_restored(txn)
                continue
            log.info("txn.resuming", rollout_id=txn.rollout_id, kind=txn.kind, phase=txn.phase)
            self.start(txn)
            resumed.append(txn)
        if not resumed and await dbthread.run(self.journal.unfreeze_owed) is not None:
            self._lift_owed_freeze()
        return resumed

    async def _settle_restored(self, txn: Txn) -> Txn:
        """A transaction that was unfinished in a journal put back from a copy: the agent ran
        on after the copy was made, so its phase is not where the node is. Settled by what
        the server runs now, level-based, doing nothing to the server (no freeze, write,
        restart or unfreeze): its live config is the transaction's target and the server
        answers as the target: ``completed``; its source, answering as the source:
        ``rolled_back`` (by the certificate its file holds, or the one served when it was
        planned only if the server started before the transaction: ``_started_before``);
        where the two answer alike, only if the server started after its
        config was written (``_not_loaded``); anything else, a server frozen with no lease
        in the journal, or one whose status cannot be read (``_restored_status``):
        ``failed``, and the node needs the admin (``Journal.needs_admin``; see
        ``nodeagent.journal``)."""
        plan = Plan.from_json(txn.plan)
        copy = await dbthread.run(self.journal.restored_copy_at)
        made = copy.isoformat(timespec="seconds") if copy is not None else "?"
        where = (
            f"the journal was put back from the copy kept before an upgrade ({made}), made while"
            f" this {txn.kind} of rollout {txn.rollout_id} was at phase {txn.phase};"
            " it was not resumed: the agent ran on after the copy"
        )
        try:
            live: bytes | None = await dbthread.run(self.driver.read_config)
        except Exception as exc:  # OSError, DriverError: the start goes on, the node says so
            live, looked = None, f"its live config cannot be read ({describe(exc)})"
        target = txn.target_config or await dbthread.run(_read_or_none, plan.new_config_file)
        source = txn.source_config or await dbthread.run(_read_or_none, plan.backup_file)
        outcome, fingerprint, pin = TxnOutcome.FAILED, "", ""
        schemes: tuple[str, ...] = ()
        if live is not None:
            if target is None or source is None or target == source:
                looked = "the transaction's configs do not tell its target from its source"
            elif live == target:
                outcome, schemes = TxnOutcome.COMPLETED, plan.target_schemes
                fingerprint, looked = plan.target_fingerprint, "the server runs its target"
            elif live == source:
                outcome, schemes = TxnOutcome.ROLLED_BACK, plan.source_schemes
                pin, looked = plan.source_fingerprint, "the server runs its source"
            else:
                looked = "the server's live config is neither its target nor its source"
        status, unread = await self._restored_status()
        # The way back's rule (``restore_pin``): the certificate served at plan time counts
        # only where nothing restarted the server since; the copy's phase cannot say whether
        # anything did (the agent ran on after it), so only the server's start before the
        # transaction's proves it (review s72 L: either pin passed, and a server restarted
        # onto another certificate than its file's was "rolled_back").
        pin = restore_pin(pin, restarted=not _started_before(status, txn.started_at))
        if outcome is not TxnOutcome.FAILED:
            try:
                problems = await self._problems(
                    plan, schemes, pin or fingerprint, None, pinned=bool(pin)
                )
            except Exception as exc:  # the CA file gone, the server's status unreadable
                problems = [describe(exc)]
            if problems:
                looked += f" on disk, but does not answer as it: {'; '.join(problems)}"
                outcome = TxnOutcome.FAILED
        if status is None:
            # Whether the server is frozen, and since when it runs, is unknown: nothing proves
            # the verdict (review s41rev3 N2: where the schemes tell target from source the
            # ports alone passed it, and a freeze no transaction holds went unseen, as in H1).
            looked += f"; the server's status cannot be read ({unread}): whether it is frozen"
            looked += " is unknown"
            outcome = TxnOutcome.FAILED
        alike = plan.source_schemes == plan.target_schemes and not fingerprint
        if outcome is not TxnOutcome.FAILED and alike:
            # Target and source answer alike from outside (a change-password, a rollback, the
            # source of a rotate-cert: same schemes, no certificate to tell them by): what is on
            # disk is what the server runs only if the server started after it was written
            # (review s41rev1 H2: a config written, the server not restarted, was "completed").
            unproved = await dbthread.run(_not_loaded, self.driver.config_file, status)
            if unproved:
                looked += (
                    f" on disk, but its target and source answer alike and {unproved}: it may"
                    " still run the other"
                )
                outcome = TxnOutcome.FAILED
        frozen = bool(status is not None and status.get("frozen"))
        if frozen and await dbthread.run(self.journal.freeze_lease) is None:
            # No transaction of this journal holds the freeze and no scope freeze's lease
            # bounds it: nothing will ever lift it (review s41rev1 H1: the newer agent broke
            # before it carried the switch on; the node stayed frozen, shown healthy).
            looked += "; the server is frozen, by no transaction this journal knows of"
            outcome = TxnOutcome.FAILED
        if outcome is TxnOutcome.FAILED:
            reason = (
                f"{where}; {looked}: nothing was done to the server; check its config and"
                " whether it takes writes by hand, then run the agent once with"
                " --journal-checked (it exits) and start it again"
            )
            # What the heartbeat says (the leader cuts its detail at 200 characters, with
            # NEEDS_ADMIN before it: 195 at most in all): the log says more.
            needs_admin = (
                f"{JOURNAL_PUT_BACK}{txn.kind} of rollout {txn.rollout_id[:40]}: not settled"
                " by what the server runs; check it, then run the agent once with"
                " --journal-checked"
            )
        else:
            reason = f"{where}; {looked}: recorded as {outcome.value}, nothing done to the server"
            if frozen:
                reason += " (its freeze is the scope freeze's, which its lease bounds)"
            needs_admin = ""
        settled = await dbthread.run(
            functools.partial(
                self.journal.settle_restored,
                txn,
                outcome,
                reason,
                self.clock(),
                live_tls=plan.live_tls,
                needs_admin=needs_admin,
            )
        )
        self.changes.changed(settled)
        (log.error if needs_admin else log.warning)(
            "journal.restored_settled",
            rollout_id=txn.rollout_id,
            kind=txn.kind,
            phase_in_copy=txn.phase,
            outcome=outcome.value,
            detail=reason,
        )
        if outcome is TxnOutcome.COMPLETED and self.on_complete is not None:
            try:
                await self.on_complete()
            except Exception as exc:
                log.error(
                    "txn.on_complete_failed",
                    error=describe(exc),
                    hint="the switch itself is done; a bug in tlsroll: report it with the lines "
                    "before this one",
                )
        return settled

    async def _restored_status(self) -> tuple[dict[str, Any] | None, str]:
        """The server's status for ``_settle_restored``, asked again after the
        ``DOWN_RECHECK`` waits if it cannot be read (a server read at a bad moment); (None,
        why) if it still cannot."""
        why = ""
        for wait in (*DOWN_RECHECK, None):
            try:
                return await self.driver.status(), ""
            except (DriverError, OSError, LocalResourceError) as exc:
                why = describe(exc)
            if wait is not None:
                await self.sleep(wait)
        return None, why

    async def close(self, grace: float) -> None:
        """Give running transactions ``grace`` seconds to end, then stop them (the journal lets
        the next start resume them)."""
        if self._owed is not None:
            self._owed.cancel()  # the journal keeps what is owed for the next start
        for key in list(self.held):  # waiting for the journal: nothing to let end
            self.tasks[key].cancel()
        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=grace)
        for task in running:
            task.cancel()
        await asyncio.gather(
            *self.tasks.values(), *([self._owed] if self._owed else []), return_exceptions=True
        )

    # --- supervision --------------------------------------------------------------------------

    async def _supervised(
        self, txn: Txn, begun: str | None = None, staged: Staging | None = None
    ) -> Txn:
        """Run ``txn``; if its task dies, start it again from what the journal holds, at most
        ``TASK_RESTARTS`` times; then lift the freeze and tell the daemon (``dead``)."""
        deaths = 0
        while True:
            try:
                if begun is None and (refused := await self._probe(txn)) is not None:
                    raise JournalUnwritable(refused.error)
                return await self.run(txn, begun, staged)
            except Exception as exc:
                deaths += 1
                error = describe(exc)
                if deaths > TASK_RESTARTS:
                    if not await self._die(txn, deaths, error):
                        raise TxnDied(error) from exc
                    deaths, wait = 0, 0.0  # held until the journal took a write (``_die``)
                else:
                    wait = TASK_BACKOFF.delay(deaths)
                    log.error(
                        "txn.crashed",
                        rollout_id=txn.rollout_id,
                        kind=txn.kind,
                        error=error,
                        restart_in=wait,
                        restarts_left=TASK_RESTARTS - deaths + 1,
                        detail="the switch's task died and is started again from its journal; "
                        "restarts_left says how often",
                    )
            if wait:
                await self.sleep(wait)
            begun, staged = None, None  # restarted: what was last journalled is read again
            try:
                latest = await dbthread.run(self.journal.get, txn.rollout_id, txn.kind)
            except Exception as exc:  # counted at the next death: run() needs the journal too
                log.error(
                    "txn.journal_unreadable",
                    rollout_id=txn.rollout_id,
                    error=describe(exc),
                    hint="check the agent's data dir (df -h, its mode); the switch is tried again",
                )
                latest = None
            if latest is not None:
                self.changes.note(latest)  # what the journal holds, whatever the last write did
            if latest is not None and latest.finished:
                return latest
            # Unread (a journal in doubt reads only once a write takes: ``JOURNAL_IN_DOUBT``),
            # the record this process last journalled, which the journal keeps (its only
            # writer): not the transaction as this task began, by which ``_die`` judged the
            # freeze (review s74 revdoubt: "started", it lifted a freeze over a target
            # restarted and never verified).
            txn = latest or self.changes.latest(txn.rollout_id, txn.kind) or txn
            log.info("txn.restarting", rollout_id=txn.rollout_id, kind=txn.kind, phase=txn.phase)

    async def _die(self, txn: Txn, deaths: int, error: str) -> bool:
        """The task died for good: lift the freeze unless a scope freeze holds it (its lease
        bounds it) or the server does not prove it runs a verified config (``_unproved``: the
        freeze is then kept, and the line says why), and tell the daemon to exit; or, where
        the journal still cannot be written (``_probe``), hold the transaction until it can
        (``_hold``, returning True): a new agent process would find the same disk. Each attempt
        looks at the lease and lifts under ``freeze_lock``; the backoff between attempts is
        outside it."""
        lifted, frozen = "", True  # (frozen: the freeze is on when it ends, as far as known)
        unproved = await self._unproved(txn)
        for attempt in range(1, EXIT_UNFREEZE_ATTEMPTS + 1):
            if unproved:
                lifted = (
                    f"the freeze is kept: {unproved} (writes stay refused until the agent"
                    " carries the transaction on: see the last error; a full disk under the"
                    " journal must be freed first)"
                )
                log.error(
                    "txn.freeze_kept", rollout_id=txn.rollout_id, kind=txn.kind, detail=unproved
                )
                break
            async with self.freeze_lock:
                if await self._scope_frozen(txn):
                    lifted = "the freeze is left to the scope freeze's lease"
                    break
                try:
                    await self.driver.unfreeze()
                    lifted, frozen = "writes are accepted again", False
                    break
                except (DriverError, OSError, LocalResourceError) as exc:
                    lifted = f"could not lift the freeze: {describe(exc)}"
            if attempt < EXIT_UNFREEZE_ATTEMPTS:
                await self.sleep(UNFREEZE_BACKOFF.delay(attempt))
        put_back = await self._source_back(txn)
        if (refused := await self._probe(txn)) is not None and refused.held:
            # Left frozen (kept, left to the scope freeze's lease, a lift that failed): the
            # hold tries the lift again as this did (``_lift_held``), as each start did.
            await self._hold(txn, refused, frozen=frozen, lift=frozen, said=f"{lifted}{put_back}")
            return True
        self.fatal = (
            f"the {txn.kind} transaction of rollout {txn.rollout_id} died {deaths} times"
            f" (last: {error}); {lifted}{put_back}; exiting so that the service manager restarts"
            f" the agent, which resumes it from {self.journal.path}"
        )
        log.error("txn.died", rollout_id=txn.rollout_id, kind=txn.kind, detail=self.fatal)
        self.dead.set()
        return False

    async def _probe(self, txn: Txn) -> Unwritable | None:
        """Before a transaction resumed or restarted acts, and before the agent exits on a dead
        one: whether the journal takes a write now (``Journal.probe``). None if it did (or the
        transaction has ended), else why not (``unwritable``: whether the agent holds the
        transaction on it, or exits). A read that fails says nothing (``run`` meets it)."""
        try:
            latest = await dbthread.run(self.journal.get, txn.rollout_id, txn.kind)
        except Exception:
            latest = None
        if (latest or txn).finished:
            return None
        try:
            await dbthread.run(self.journal.probe)
        except Exception as exc:
            return unwritable(exc)
        return None

    def needs_admin(self) -> str | None:
        """Why the node needs the admin now (a transaction held: ``_hold``), else None."""
        return next(iter(self.held.values()), None)

    def _held_line(self, txn: Txn, refused: Unwritable, *, frozen: bool) -> str:
        """What the agent's view of its server says after "needs the admin: " while ``txn`` is
        held: the cause and what to do first (the leader keeps 200 characters of it, its
        prefix included), then what waits."""
        return (
            f"its journal cannot be written ({refused.cause}):"
            f" {refused.hint(self.journal.path.parent)}; the {txn.kind} of rollout"
            f" {txn.rollout_id[:40]} waits mid-way{', writes refused' if frozen else ''},"
            " and then goes on by itself"
        )

    async def _hold(
        self, txn: Txn, refused: Unwritable, *, frozen: bool, lift: bool, said: str
    ) -> None:
        """The task died for good and the journal still cannot be written (``refused``):
        say so (``held``: the agent's view of its server, hence the leader's `tlsroll nodes`,
        schema and rollout status) and ask the journal again with backoff (``HOLD_BACKOFF``)
        until a write takes; the task then carries the transaction on from the journal. The
        server is left as ``_die`` left it (``frozen``: the freeze is on; ``said``: what was
        done), but for a freeze it left (``lift``): the lift is tried again at each look as
        ``_die`` tried it (``_lift_held``), as each start of the agent did when it exited."""
        key = (txn.rollout_id, txn.kind.value)
        self.held[key] = self._held_line(txn, refused, frozen=frozen)
        self.held_said = f"{self.held[key]}; {said.removeprefix('; ')}; {refused.error}"
        where = self.journal.path.parent
        hint = f"{refused.hint(where)}: the agent then carries it on"
        log.error(
            "txn.held", rollout_id=txn.rollout_id, kind=txn.kind, detail=self.held_said, hint=hint
        )
        self._tell_held()
        try:
            attempt, logged = 0, time.monotonic()
            while True:
                attempt += 1
                await self.sleep(HOLD_BACKOFF.delay(attempt))
                if lift and await self._lift_held(txn):
                    lift = False
                    self.held[key] = self._held_line(txn, refused, frozen=False)
                    self._tell_held()
                if (again := await self._probe(txn)) is None:
                    break
                refused = again
                if worth_logging(attempt, time.monotonic() - logged):
                    logged = time.monotonic()
                    log.warning(
                        "txn.still_held",
                        rollout_id=txn.rollout_id,
                        kind=txn.kind,
                        error=again.error,
                        hint=f"{again.hint(where)}: the agent then carries it on",
                    )
        finally:
            del self.held[key]
            self._tell_held()
        log.warning(
            "txn.carried_on",
            rollout_id=txn.rollout_id,
            kind=txn.kind,
            detail="the journal takes writes again: the transaction goes on",
        )

    async def _lift_held(self, txn: Txn) -> bool:
        """While ``txn`` is held: lift the freeze ``_die`` left (kept, the server refused the
        unfreeze, or the scope freeze's lease held it then), as ``_die`` would now: unless the
        server does not prove it runs a verified config (``_unproved``, asked again: a verify
        may pass now, the server may have changed) or a scope freeze's lease still holds (in
        elapsed time: its renewal cannot be journalled either, so it runs out, as the leader
        counts it). True once lifted; never raises."""
        try:
            if await self._unproved(txn):
                return False
            async with self.freeze_lock:
                lease = await dbthread.run(self.journal.freeze_lease)
                scope = bool(txn.plan.get("keep_frozen", False))
                if (
                    scope
                    and lease is not None
                    and not self.leases.lapsed(lease, self.clock(), self.monotonic())
                ):
                    return False
                await self.driver.unfreeze()
        except Exception as exc:
            log.warning(
                "txn.held_unfreeze_failed",
                rollout_id=txn.rollout_id,
                kind=txn.kind,
                error=describe(exc),
                detail="the server stays frozen (writes refused); the agent tries again at its"
                " next look while the switch is held",
            )
            return False
        log.warning(
            "txn.held_unfrozen",
            rollout_id=txn.rollout_id,
            kind=txn.kind,
            detail="writes are accepted again while the transaction waits for its journal",
        )
        return True

    def _tell_held(self) -> None:
        if self.on_held is not None:
            try:
                self.on_held()
            except Exception as exc:  # a listener's trouble is not the transaction's
                log.error(
                    "txn.on_held_failed",
                    error=describe(exc),
                    detail="the held switch goes on; the agent's report of it may come late",
                )

    async def _unproved(self, txn: Txn) -> str:
        """Before the agent exits on a dead task: why the freeze must not be lifted ("" if it
        may). Where the journal's last phase says the server may run a config no verify has
        passed (``config_written``, ``restarted``: the target restarted; the way back before
        ``rb_verified``), the freeze is lifted only if the server proves, from outside as the
        verify step would, that it runs the config that phase leads to (the target with its
        certificate and the freeze's watermark; or the source), and its config file is that
        config. Else the outcome is unknown: a journal that cannot be written from there on
        (a full disk under the data dir, the server's config elsewhere) left the target
        restarted and unverified, and lifting the freeze let it take writes, for as long as
        nothing could record taking it back (session 69, journalm M). The journal is read
        again (the task's last record); unreadable, the phase the task knew decides. Nothing is
        journalled here, and nothing done to the server but its checks."""
        with contextlib.suppress(Exception):
            latest: Txn | None = await dbthread.run(self.journal.get, txn.rollout_id, txn.kind)
            txn = latest or txn
        plan = Plan.from_json(txn.plan)
        stayed = False  # the server never restarted since the source ran: it runs the source
        pin = ""  # the source's certificate, as the restore check pins it (``_verify_source``)
        if txn.phase in (Phase.CONFIG_WRITTEN, Phase.RESTARTED):
            which, schemes, config = "target", plan.target_schemes, txn.target_config
            fingerprint, watermark = plan.target_fingerprint, txn.watermark
        elif txn.phase in (Phase.ROLLING_BACK, Phase.RESTORED, Phase.RB_RESTARTED):
            which, schemes, config = "source", plan.source_schemes, txn.source_config
            stayed = (txn.failed_phase or Phase.STARTED) not in TARGET_MAY_BE_RUNNING
            back = txn.phase is Phase.RB_RESTARTED and txn.restart_needed is not False
            fingerprint, watermark = "", None
            pin = restore_pin(plan.source_fingerprint, restarted=back or not stayed)
            if txn.phase is Phase.ROLLING_BACK and stayed:
                config = None  # the target never restarted: the file alone tells nothing
        else:
            return ""  # the source still loaded (the target not restarted), or verified
        where = f"the journal says {txn.phase} and the server does not prove it runs the {which}"
        with contextlib.suppress(Exception):
            if not (await self.driver.status()).get("frozen"):
                return ""  # no freeze to keep (lifted before: writes are taken as it is)
        try:
            if config is not None and await dbthread.run(self.driver.read_config) != config:
                return f"{where}: its config file is not the {which}"
            await self._verify(txn, plan, schemes, pin or fingerprint, watermark, pinned=bool(pin))
            # The two answer alike (the source's check names no certificate: on the way back
            # a rotation's target passes it too, review 1 of s69; or its pin, which a change
            # keeping the certificate serves on both): the server must have started after the
            # write.
            alike = plan.source_schemes == plan.target_schemes and not fingerprint
            if alike and not stayed:
                status = await self.driver.status()
                unloaded = await dbthread.run(_not_loaded, self.driver.config_file, status)
                if unloaded:
                    return f"{where}: {unloaded}"
        except Exception as exc:
            return f"{where} ({describe(exc)})"
        return ""

    async def _source_back(self, txn: Txn) -> str:
        """Before the agent exits on a dead task: the source config put back on disk if the
        journal says ``frozen`` and the live config file is the target (the write of the target
        took, its record did not: a full disk under the journal, session 68). The server still
        runs the source there (its restart comes only after ``config_written`` is journalled),
        and the freeze is lifted: left on disk, the target, never loaded nor verified, was what
        any other restart of the server (a reboot, an admin's) loaded, with no agent to take it
        back. The journal still says ``frozen``: resumed, the switch writes the target again.
        What it says (", the source config was put back"), or "" where nothing was done; a
        put-back that fails is said and logged, never raised (the agent exits either way)."""
        try:
            latest = await dbthread.run(self.journal.get, txn.rollout_id, txn.kind)
        except Exception:  # unreadable (in doubt, say): the record this process last journalled
            latest = self.changes.latest(txn.rollout_id, txn.kind)
        if (
            latest is None
            or latest.phase is not Phase.FROZEN
            or latest.target_config is None
            or latest.source_config is None
            or latest.target_config == latest.source_config
        ):
            return ""
        target, source = latest.target_config, latest.source_config

        def put_back() -> bool:
            if self.driver.read_config() != target:
                return False
            self.driver.write_config(source)
            return True

        try:
            done = await dbthread.run(put_back)
        except Exception as exc:
            problem = describe(exc)
            log.error(
                "txn.source_not_put_back",
                rollout_id=txn.rollout_id,
                kind=txn.kind,
                config=str(self.driver.config_file),
                error=problem,
                detail="the config file named holds the switch's new config, never verified, "
                "while the server still runs the old one: the agent's next start carries "
                "the switch on; a restart of the server before that loads the new one",
            )
            return (
                "; the target config stays on disk, never loaded (putting the source back"
                f" failed: {problem})"
            )
        if not done:
            return ""
        log.warning(
            "txn.source_put_back",
            rollout_id=txn.rollout_id,
            kind=txn.kind,
            config=str(self.driver.config_file),
            detail="the target config written was never loaded: the source is back on disk",
        )
        return "; the source config was put back (the target was never loaded)"

    async def _scope_frozen(self, txn: Txn) -> bool:
        """True if the freeze belongs to a rollout's scope freeze whose lease still holds
        (read under ``freeze_lock``, with the unfreeze it decides)."""
        try:
            keep = bool(txn.plan.get("keep_frozen", False))
            return keep and await dbthread.run(self.journal.freeze_lease) is not None
        except Exception:  # an unreadable journal holds no lease we could honour
            return False

    async def _lift_left_freeze(self, txn: Txn) -> None:
        """A scope switch whose end left the freeze to the scope freeze's lease (``_unfreeze``,
        ``_give_up``: the lease read under ``freeze_lock``), its outcome now journalled: lift
        the freeze if the lease has gone meanwhile and no transaction runs. The leader's
        Unfreeze between that read and the outcome's write saw the switch under way, left the
        freeze to it and cleared the lease (``NodeAgentService.Unfreeze``): nothing else would
        ever have lifted it (review3 of s69). A lift that fails is owed, as a failed
        transaction's is."""
        error = ""  # (the lift's failure: owed)
        async with self.freeze_lock:
            try:
                lease = await dbthread.run(self.journal.freeze_lease)
                running = await dbthread.run(self.journal.unfinished)
            except Exception as exc:  # unreadable: a lease may hold, the freeze is left to it
                log.error(
                    "txn.lease_unread",
                    rollout_id=txn.rollout_id,
                    error=describe(exc),
                    detail="the agent could not read its freeze lease; the freeze is left to the"
                    " lease watch to lift",
                )
                return
            if lease is not None or running:
                return  # the lease bounds it (the lease watch), or a transaction owns it
            try:
                await self.driver.unfreeze()
            except (DriverError, OSError, LocalResourceError) as exc:
                error = describe(exc)
                await dbthread.run(self.journal.set_unfreeze_owed, txn.rollout_id)
        log.warning(
            "txn.scope_freeze_gone",
            rollout_id=txn.rollout_id,
            kind=txn.kind,
            detail="the scope freeze ended as the transaction ended: "
            + (
                f"could not lift the freeze yet: {error} (the agent keeps trying)"
                if error
                else "writes are accepted again"
            ),
        )
        if error:
            self._lift_owed_freeze()

    def _lift_owed_freeze(self) -> None:
        if self._owed is None or self._owed.done():
            self._owed = asyncio.create_task(self._lift_owed(), name="txn-owed-unfreeze")

    async def _lift_owed(self) -> None:
        """Keep trying to lift the freeze a failed transaction left, until it is lifted or a
        transaction or a scope freeze takes the freeze over (then what is owed is dropped).
        Each try reads what is owed, the running transactions and the lease, and unfreezes,
        under ``freeze_lock``: a Freeze is either seen here or lands after the unfreeze (review
        s32 F3: one between the read and the unfreeze was undone, and the node took writes
        while the leader counted it frozen). The backoff is outside the lock."""
        attempt, logged = 0, time.monotonic()
        while True:
            async with self.freeze_lock:
                owed = await dbthread.run(self.journal.unfreeze_owed)
                if owed is None:
                    return
                running = await dbthread.run(self.journal.unfinished)
                lease = await dbthread.run(self.journal.freeze_lease)
                if running or lease is not None:
                    await dbthread.run(self.journal.set_unfreeze_owed, None)
                    return
                try:
                    await self.driver.unfreeze()
                except (DriverError, OSError, LocalResourceError) as exc:
                    error: Exception | None = exc
                else:
                    error = None
                    await dbthread.run(self.journal.set_unfreeze_owed, None)
            if error is None:
                log.warning(
                    "txn.owed_unfreeze_done",
                    rollout_id=owed,
                    attempts=attempt + 1,
                    detail="the freeze the agent owed was lifted at last: the server takes "
                    "writes again",
                )
                return
            attempt += 1
            wait = UNFREEZE_BACKOFF.delay(attempt)
            if worth_logging(attempt, time.monotonic() - logged):
                logged = time.monotonic()
                log.error(
                    "txn.owed_unfreeze_failed",
                    rollout_id=owed,
                    attempt=attempt,
                    retry_in=wait,
                    error=describe(error),
                    hint="the managed server stays frozen (refusing writes) until this works: "
                    "check it runs (systemctl status of its unit); the agent keeps trying",
                )
            await self.sleep(wait)

    # --- the loop -----------------------------------------------------------------------------

    async def run(self, txn: Txn, begun: str | None = None, staged: Staging | None = None) -> Txn:
        """Carry ``txn`` to its outcome. ``begun``: the step whose ``begin`` the caller has
        just journalled (the servicer's create carries the first one); None: read it.
        ``staged``: its target config as ``stage`` staged it (the runner owns it now)."""
        plan = Plan.from_json(txn.plan)  # fixed: nothing below changes it
        if txn.phase is Phase.STARTED:
            self._journalled(txn.phase)  # the servicer journalled it; the crash hook is here
        # Each step's record carries the next step's "begin" (one write per step, not two);
        # resumed, the runner does not journal again a "begin" that was the last thing written.
        resumed = begun is None
        if begun is None:
            begun = await dbthread.run(self.journal.last_begun, txn)
        key = (txn.rollout_id, txn.kind.value)
        if staged is not None:
            self._staged[key] = staged
            self._sources[key] = staged  # kept for the way back until the transaction ends
        elif txn.phase in FORWARD and txn.source_config is not None:
            # Resumed: the staged source, if any, was removed with the agent process that
            # staged it (``discard_stale_staged``) or at the end of the task that died; staged
            # again now, while there may still be room for it.
            source = txn.source_config
            back = await dbthread.run(self._stage_config, txn.rollout_id, source, "source")
            if back is not None:
                self._sources[key] = Staged(source=back)
        try:
            ended = await self._steps(txn, plan, begun, resumed=resumed)
            if key in self._left_to_lease:
                await self._lift_left_freeze(ended)
            return ended
        finally:
            self._left_to_lease.discard(key)
            self._ahead.pop(key, None)
            self._followed.pop(key, None)
            self._cas.pop(key, None)
            self._discard_staged(key)

    async def _steps(
        self, txn: Txn, plan: Plan, begun: str | None, *, resumed: bool = False
    ) -> Txn:
        looking: asyncio.Task[dict[str, Any]] | None = None  # a verify begun with its record
        passed: Passed | None = None  # a step ended, journalled with the next record
        # A way back resumed before its restart: frozen again for it (``_refreeze_back``).
        back = resumed and txn.phase in REFREEZE_BACK
        while txn.phase not in TERMINAL:
            forward = txn.phase in FORWARD
            action, after = FORWARD[txn.phase] if forward else BACKWARD[txn.phase]
            if begun != action:
                await dbthread.run(self.journal.event, txn, action, "begin")
            begun = None
            if back and txn.phase is Phase.RESTORED:
                back = False
                if txn.restart_needed is not False:
                    txn = await self._refreeze_back(txn)
            try:
                skipped = txn.phase is Phase.CONFIG_WRITTEN and txn.watermark is None
                # (that one: the freeze found the server down; back by now, someone else's
                # restart ended, it is frozen before the agent's own restart: s33 audit L3)
                if (resumed and txn.phase in REFREEZE) or skipped:
                    # (the agent's own shortage waited out as for the action: s34 review L1)
                    txn = await self._through_shortage(
                        action, txn, functools.partial(self._refreeze, txn)
                    )
                resumed = False
                if looking is not None:
                    task, looking = looking, None
                    changes = await task
                else:
                    changes = await self._attempt(
                        action, txn, plan, 1 if forward else BACKWARD_ATTEMPTS
                    )
            except Exception as exc:  # any failure rolls back: a node must never stay frozen
                detail = describe(exc)
                reason = detail if detail.startswith(f"{action}:") else f"{action}: {detail}"
                if forward:
                    reason = _still_kept(txn, plan, reason)
                    log.warning(
                        "txn.rolling_back",
                        rollout_id=txn.rollout_id,
                        kind=txn.kind,
                        failed_step=action,
                        reason=reason,
                        detail="the switch failed at failed_step and goes back to the config "
                        "before it; the reason says why",
                    )
                    begun = next_action(Phase.ROLLING_BACK)
                    txn = await self._record(
                        self.journal.fail,
                        txn,
                        action,
                        reason,
                        phase=Phase.ROLLING_BACK,
                        reason=reason,
                        failed_phase=txn.phase,
                        begin=begun,
                        passed=passed,
                    )
                    passed = None
                else:
                    txn = await self._give_up(txn, action, reason, plan)
                continue
            if after in TERMINAL:
                changes |= {"outcome": TERMINAL[after], "ended_at": self.clock()}
            if after is Phase.COMPLETED:  # what is live changes with the phase, in one write
                txn = await self._record(
                    self.journal.complete, txn, plan.live_tls, phase=after, **changes
                )
            else:
                begun = next_action(after)
                looking = self._look_ahead(txn, plan, after)
                if looking is not None and self._defers(after):
                    # Journalled with the verify's outcome, in its write (``_defers``).
                    passed = Passed({"phase": after, **changes}, dt.datetime.now(dt.UTC), begun)
                    txn = replace(txn, phase=after, **changes)
                    log.info(
                        "txn.step",
                        rollout_id=txn.rollout_id,
                        kind=txn.kind,
                        step=action,
                        phase=after,
                    )
                    continue
                try:
                    txn = await self._record(
                        self.journal.update,
                        txn,
                        phase=after,
                        begin=begun,
                        then=self._ahead_of(txn, plan, after),
                        passed=passed,
                        **changes,
                    )
                except BaseException:
                    if looking is not None:
                        looking.cancel()
                        with contextlib.suppress(BaseException):
                            await looking
                    raise
                passed = None
            log.info("txn.step", rollout_id=txn.rollout_id, kind=txn.kind, step=action, phase=after)
            followed = self._followed.pop((txn.rollout_id, txn.kind.value), None)
            if followed is not None:  # the next action and its record came with this one
                txn, begun = followed, next_action(followed.phase)
                log.info(
                    "txn.step",
                    rollout_id=txn.rollout_id,
                    kind=txn.kind,
                    step=FORWARD[after][0],
                    phase=txn.phase,
                )
            if after is Phase.COMPLETED and self.on_complete is not None:
                try:
                    await self.on_complete()
                except Exception as exc:  # the transaction is done; a listener's trouble is not
                    log.error(
                        "txn.on_complete_failed",
                        error=describe(exc),
                        hint="the switch itself is done; a bug in tlsroll: report it with the "
                        "lines before this one",
                    )
        return txn

    async def _record(
        self,
        write: Callable[..., Txn],
        txn: Txn,
        *args: Any,
        then: Ahead | None = None,
        passed: Passed | None = None,
        **changes: Any,
    ) -> Txn:
        """Journal the transaction's new phase (and what the action found) with one of the
        journal's writes (``update``, ``fail``, ``complete``), on the store's thread
        (``tlsroll.dbthread``: one thread, woken alone, not the default executor's). ``then``:
        the next action, when it is blocking work (``_ahead_of``), and its own record, run right
        after the write has committed, in the same hand-off; its error waits in ``_ahead`` for
        ``_act``, the record it led to in ``_followed`` for the loop. ``passed``: the step
        before, not journalled yet (``_defers``), recorded first in the same write."""
        if passed is not None:
            changes["passed"] = passed
        if then is None:
            txn = await dbthread.run(write, txn, *args, **changes)
            self._journalled(txn.phase)
            self.changes.changed(txn)
            if txn.finished:
                # Its watches (``WatchTransaction``, woken above) send this last record first:
                # the runner's work after it (its log line, ``on_complete``'s bootstrap sync
                # and its thread, ``on_end``) follows the message (issue 15, session 72).
                await asyncio.sleep(0)
            await self._held()
            return txn
        kept: list[Txn] = []
        try:
            txn, followed, error = await dbthread.run(
                _write_then, write, then, kept, txn, *args, **changes
            )
        except BaseException:
            if kept:  # the first write took, the record after the act did not: it is the last
                self.changes.changed(kept[0])  # (``_supervised``'s, if the journal is unread)
            raise
        key = (txn.rollout_id, txn.kind.value)
        self._journalled(txn.phase)
        self.changes.changed(txn)
        if error is not None:
            self._ahead[key] = error
        if followed is not None:
            self._journalled(followed.phase)
            self.changes.changed(followed)
            self._followed[key] = followed
        await self._held()
        return txn

    def _journalled(self, phase: Phase) -> None:
        if self.crash_after == phase:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook, see module docstring
        if self.term_after == phase:
            self._term_sent = True
            os.kill(os.getpid(), signal.SIGTERM)  # test hook, see module docstring

    async def _held(self) -> None:
        """Test hook (``TERM_HOLD_ENV``, see the module docstring): once the agent sent itself
        SIGTERM, the transaction waits here until the stop cancels it."""
        if self._term_sent and self.term_hold:
            await asyncio.Event().wait()

    async def _attempt(self, action: Action, txn: Txn, plan: Plan, attempts: int) -> dict[str, Any]:
        """Run ``action`` (``attempts`` times on a failure of the server's); while the agent
        itself is short of descriptors, wait and try again (``SHORTAGE_ATTEMPTS``): its own
        shortage must not roll back, or skip the freeze of, a healthy server. On the way back,
        a file system with no room left is waited for too (``SPACE_WAIT``)."""
        call: Callable[[], Awaitable[dict[str, Any]]]
        call = functools.partial(self._attempts, action, txn, plan, attempts)
        if txn.phase in BACKWARD:
            call = functools.partial(self._through_full_disk, action, txn, call)
        return await self._through_shortage(action, txn, call)

    async def _through_full_disk(
        self, action: Action, txn: Txn, call: Callable[[], Awaitable[_T]]
    ) -> _T:
        """``call()`` (an action of the way back), made again while a file system it writes
        to has no room left (``is_out_of_space``), after ``SPACE_BACKOFF``, for at most
        ``SPACE_WAIT`` seconds of waits in all; each wait is journalled as ``action``'s
        ``no_space`` event. The server stays as it is meanwhile (frozen, if it runs)."""
        waits, waited = 0, 0.0
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_out_of_space(exc) or waited >= SPACE_WAIT:
                    raise
                wait = SPACE_BACKOFF.delay(waits)
                waits += 1
                detail = {"error": describe(exc), "retry_in": wait, "waited": waited}
                await dbthread.run(self.journal.event, txn, action, "no_space", detail)
                if worth_logging(waits, 0.0):
                    log.error(
                        "txn.no_space",
                        rollout_id=txn.rollout_id,
                        kind=txn.kind,
                        step=action,
                        attempt=waits,
                        waited=waited,
                        retry_in=wait,
                        error=describe(exc),
                        hint="free space under the agent's data dir (df -h): the switch carries "
                        "on by itself once its journal takes a write",
                    )
                waited += wait
                await self.sleep(wait)

    async def _through_shortage(
        self, action: Action, txn: Txn, call: Callable[[], Awaitable[_T]]
    ) -> _T:
        """``call()``, made again while the agent itself is short of descriptors or memory
        (``is_local_shortage``), after ``SHORTAGE_BACKOFF``, at most ``SHORTAGE_ATTEMPTS``
        times; each wait is journalled as ``action``'s ``short`` event."""
        shortages = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_local_shortage(exc) or shortages >= SHORTAGE_ATTEMPTS:
                    raise
                shortages += 1
                wait = SHORTAGE_BACKOFF.delay(shortages - 1)
                detail = {"error": describe(exc), "retry_in": wait}
                await dbthread.run(self.journal.event, txn, action, "short", detail)
                if shortages == 1 or shortages % 6 == 0:
                    log.error(
                        "txn.agent_short",
                        rollout_id=txn.rollout_id,
                        kind=txn.kind,
                        step=action,
                        attempt=shortages,
                        retry_in=wait,
                        error=describe(exc),
                        hint="the agent itself is short of file descriptors or memory: it tries "
                        "again in retry_in seconds; if it repeats, check the host's memory "
                        "and the unit's LimitNOFILE",
                    )
                await self.sleep(wait)

    async def _attempts(
        self, action: Action, txn: Txn, plan: Plan, attempts: int
    ) -> dict[str, Any]:
        def retrying(state: RetryCallState) -> None:
            outcome = state.outcome
            exc = outcome.exception() if outcome is not None else None
            log.warning(
                "txn.retrying",
                rollout_id=txn.rollout_id,
                kind=txn.kind,
                step=action,
                attempt=state.attempt_number,
                error=describe(exc) if isinstance(exc, Exception) else "",
                detail="a switch step failed and is tried again; the error says why",
            )

        way_back = txn.phase in BACKWARD

        def worth_retrying(exc: BaseException) -> bool:
            return not (way_back and is_out_of_space(exc))  # waited for (``_through_full_disk``)

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_incrementing(start=BACKWARD_WAIT, increment=BACKWARD_WAIT),
            retry=retry_if_exception(worth_retrying),
            sleep=self.sleep,
            before_sleep=retrying,
            reraise=True,
        ):
            with attempt:
                return await self._act(action, txn, plan)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _give_up(self, txn: Txn, action: Action, reason: str, plan: Plan) -> Txn:
        """The way back failed: say so, and do not leave the server frozen because of this
        transaction. Under a scope freeze (``keep_frozen``) whose lease the journal still
        holds, the freeze is the rollout's, not ours: it stays, bounded by that lease (the
        leader's unfreeze or, once it runs out, the agent's lease watch lifts it). Without a
        lease nothing would ever lift it, so it is lifted here."""
        log.error(
            "txn.failed",
            rollout_id=txn.rollout_id,
            kind=txn.kind,
            reason=reason,
            detail="the switch failed; the reason says why, and tlsroll rollout status on the "
            "leader shows where the node is",
        )
        why = reason
        owed = False
        async with self.freeze_lock:  # the lease read and the unfreeze, never across a Freeze
            scope_frozen = plan.keep_frozen and (
                await dbthread.run(self.journal.freeze_lease) is not None
            )
            if scope_frozen:  # (looked at again once the outcome is journalled)
                self._left_to_lease.add((txn.rollout_id, txn.kind.value))
            else:
                try:
                    await self.driver.unfreeze()
                except (DriverError, OSError, LocalResourceError) as exc:
                    owed = True
                    why += (
                        f"; and could not lift the freeze yet: {describe(exc)}"
                        " (the agent keeps trying)"
                    )
        txn = await self._record(
            self.journal.fail,
            txn,
            action,
            reason,
            unfreeze_owed=owed,
            phase=Phase.FAILED,
            outcome=TxnOutcome.FAILED,
            reason=f"{txn.reason}; then {why}",
            ended_at=self.clock(),
        )
        if owed:
            self._lift_owed_freeze()
        return txn

    # --- the actions --------------------------------------------------------------------------

    async def _act(self, action: Action, txn: Txn, plan: Plan) -> dict[str, Any]:
        acts: dict[Action, Callable[[Txn, Plan], Awaitable[dict[str, Any]]]] = {
            Action.FREEZE: self._freeze,
            Action.WRITE_CONFIG: self._write_config,
            Action.RESTART: self._restart,
            Action.VERIFY: self._verify_target,
            Action.UNFREEZE: self._unfreeze,
            Action.RESTORE_CONFIG: self._restore_config,
            Action.VERIFY_SOURCE: self._verify_source,
        }
        return await acts[action](txn, plan)

    async def _freeze(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        if isinstance(self._staged.get((txn.rollout_id, txn.kind.value)), Future):
            self._freeze_out(txn)  # the servicer goes on while the staging is done
        await self._staging_done(txn)
        started = self._freeze_begins(txn)
        try:
            # Told before the call: the servicer, woken by it, runs once this task waits
            # inside the call, which sends its request before its first wait (the reference
            # driver's: ``AdminSocketClient``).
            self._freeze_out(txn)
            watermark = await self.driver.freeze(DRAIN_TIMEOUT)
        except DriverError as exc:
            down = await self.driver.health()
            if down is None:
                raise  # it answers and refused: a failure (writes still in flight, say)
            # Down, or only being restarted by someone else (s33 audit L3): asked again for a
            # few seconds; once it answers, it is frozen (a refusal then is a failure).
            for wait in DOWN_RECHECK:
                await self.sleep(wait)
                if await self.driver.health() is None:
                    log.info("txn.server_back", rollout_id=txn.rollout_id, kind=txn.kind)
                    watermark = await self.driver.freeze(DRAIN_TIMEOUT)
                    return {"watermark": watermark, **started}
            # Down: it takes no writes, so there is nothing to freeze and no watermark to keep.
            # Going on writes the new config and starts the server; verify decides. (Back before
            # that start, it is frozen first: ``_refreeze`` at ``config_written``.)
            log.warning(
                "txn.freeze_skipped",
                rollout_id=txn.rollout_id,
                kind=txn.kind,
                reason=f"the managed server is down: {of_server(down)}",
                freeze_error=str(exc),
                detail="the managed server was down, so there was nothing to freeze; the switch "
                "goes on and its verify decides",
            )
            return {"watermark": None, **started}
        return {"watermark": watermark, **started}

    def _freeze_begins(self, txn: Txn) -> dict[str, Any]:
        """When the freeze began: on the wall clock (what the schema shows) and on the boot-time
        clock (``Leases.boot``), from which ``_freeze_ends`` measures its length whatever the
        wall clock does meanwhile (clock audit s35 J). A freeze journalled before (this freeze
        repeated after a restart) keeps its start."""
        if txn.freeze_started_at is not None:
            return {
                "freeze_started_at": txn.freeze_started_at,
                "freeze_boot_id": txn.freeze_boot_id,
                "freeze_boot_at": txn.freeze_boot_at,
            }
        boot = self.leases.boot()
        return {
            "freeze_started_at": self.clock(),
            "freeze_boot_id": boot.boot_id if boot is not None else None,
            "freeze_boot_at": boot.seconds if boot is not None else None,
        }

    def _freeze_ends(self, txn: Txn) -> dict[str, Any]:
        """The freeze's end on the wall clock, and its length in elapsed time: the boot-time
        clock's seconds since its start, across restarts of the agent. Not measured (no
        ``freeze_seconds``: the leader takes the wall-clock times' difference) if it began in
        another boot (only the wall clock spans a reboot) or where there is no such clock."""
        ended: dict[str, Any] = {"freeze_ended_at": self.clock()}
        if txn.freeze_boot_id is None or txn.freeze_boot_at is None:
            return ended
        boot = self.leases.boot()
        if boot is not None and boot.boot_id == txn.freeze_boot_id:
            ended["freeze_seconds"] = round(max(boot.seconds - txn.freeze_boot_at, 0.0), 3)
        return ended

    async def _refreeze(self, txn: Txn) -> Txn:
        """Freeze the server again if it is not frozen, and journal the new watermark before
        the next action, which the verify then compares: for a transaction resumed past its
        freeze (``REFREEZE``: the agent's exit after a dying task lifts the freeze, ``_die``;
        a server whose freeze does not outlive a restart loses it to someone else's restart),
        and for one whose freeze found the server down, before its own restart. Writes taken
        while it was not frozen were acknowledged and are kept; none is lost. A server that
        is down takes no writes: the steps go on as before (the restart starts it).

        Persist before act (s34 review M2): that it freezes again is journalled first (the
        event ``freeze again``), so a journal that cannot be written (a full disk) makes no
        freeze at each start of the agent, which only ``_die`` would lift again. Found frozen
        with that event the last word (killed between the freeze and its record), the freeze
        is asked again, which returns its watermark once drained, and that is journalled."""
        try:
            status = await self.driver.status()
        except DriverError:
            return txn
        if not status.get("frozen"):
            await dbthread.run(self.journal.event, txn, Action.FREEZE, "again")
        elif not await dbthread.run(self.journal.refreeze_pending, txn):
            return txn  # the freeze the journal knows, with its watermark
        try:
            watermark = await self.driver.freeze(DRAIN_TIMEOUT)
        except DriverError as exc:
            raise StepFailed(f"the freeze was lifted and could not be made again: {exc}") from None
        log.warning(
            "txn.refrozen",
            rollout_id=txn.rollout_id,
            kind=txn.kind,
            phase=txn.phase,
            watermark_was=txn.watermark,
            watermark=watermark,
            detail="the server's freeze had been lifted mid-switch (a restart) and was made "
            "again; watermark says where writes stood",
        )
        # Not ``_record``: the phase stays, and its test hook has fired for it already.
        txn = await dbthread.run(self.journal.update, txn, phase=txn.phase, watermark=watermark)
        self.changes.changed(txn)
        return txn

    async def _refreeze_back(self, txn: Txn) -> Txn:
        """A way back resumed before its restart (``REFREEZE_BACK``): the server frozen again
        for that restart if it is not, as ``_refreeze`` freezes a switch resumed past its
        freeze (journalled before the freeze, its new watermark after it). The freeze may have
        been lifted meanwhile: by a hold once the server proved it ran the source
        (``_lift_held``), or by the exit of a dying task (``_die``); the way back then
        restarted the server while it took writes (session 71, held2). The way back's verify
        compares no watermark: the one journalled here says where writes stood. A server
        that refuses the freeze does not stop the way back: it is restarted unfrozen, as it
        was before, and that is logged. A journal that cannot be written stops it (the task
        dies: nothing is frozen that is not journalled first)."""
        try:
            return await self._through_shortage(
                Action.RESTART, txn, functools.partial(self._refreeze, txn)
            )
        except (StepFailed, DriverError, OSError, LocalResourceError) as exc:
            log.warning(
                "txn.way_back_unfrozen",
                rollout_id=txn.rollout_id,
                kind=txn.kind,
                error=describe(exc),
                detail="the way back restarts the server without its freeze (writes in flight"
                " during the restart may fail); the error says why it could not be frozen",
            )
            return txn

    async def _write_config(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        key = (txn.rollout_id, txn.kind.value)
        if key in self._ahead:  # run with the record of the phase before (``_ahead_of``)
            raise self._ahead.pop(key)
        staged = self._staged.pop(key, None)
        kept = await dbthread.run(lambda: self._put_target(txn, plan, _staged_now(staged)))
        # The node's outcome says where the edited config is (the leader shows the reason of a
        # completed way back beside the node: ``leader.changes.DisableTls``).
        if kept is None:
            return {}
        return {"reason": kept_reason(kept, written=plan.change == HTTP_WRITTEN)}

    def stage(self, txn: Txn) -> Staged | None:
        """Blocking: ``txn``'s target config written and fsynced beside the live one
        (``Driver.stage_config``), which it does not replace yet, and the staged CA the verify
        trusts, read. The servicer stages it in the store thread's hand-off right after the
        create's (``stage_next``); the runner's freeze waits for it before its call goes out
        (``_freeze``), so that the freeze window holds none of it, only the config's rename
        and the directory's fsync (issue 15; the live config changes only at
        ``write_config``, after the journal says ``frozen``). None when there is nothing to
        stage; a config that cannot be staged is not (the write step then writes it whole,
        and says what is wrong)."""
        if txn.phase is not Phase.STARTED or txn.target_config is None:
            return None
        return self.stage_target(
            txn.rollout_id, txn.target_config, Plan.from_json(txn.plan), txn.source_config
        )

    def stage_target(
        self, rollout_id: str, config: bytes, plan: Plan, source: bytes | None = None
    ) -> Staged:
        """Blocking: ``config`` staged beside the live one and the CA ``plan``'s https verify
        trusts, read, with the context its check connects with (``probe.prepare_https``;
        ``stage``; the servicer also stages a switch this way when its node is
        staged, before the switch is asked for: ``NodeAgentService._prepare``); and ``source``
        (the live config, which the way back puts back) staged too, so that the way back is a
        rename (``Staged.source``)."""
        ca_pem = None
        if "https" in plan.target_schemes:
            # Read now, before the freeze; missing or unreadable, the verify reads it (and
            # says what is wrong) itself. Never a FIFO's endless read, which held the store's
            # thread, and so the whole agent, for ever (session 51's review): ``read_file``.
            with contextlib.suppress(OSError):
                ca_pem = read_file(plan.ca_file)
            if ca_pem is not None:
                # And the verify's https check made ready for it (its context, OpenSSL's first
                # handshake: ``probe.prepare_https``), not inside the freeze window; a CA it
                # cannot take, the check takes neither, and says why.
                with contextlib.suppress(OSError, ValueError):
                    self.checks.prepare_https(ca_pem, plan.facts.address)
        staged = self._stage_config(rollout_id, config, "target")
        back = None if source is None else self._stage_config(rollout_id, source, "source")
        return Staged(staged, ca_pem, back)

    def _stage_config(self, rollout_id: str, config: bytes, which: str) -> StagedConfig | None:
        """``config`` staged (blocking); None if it cannot be (its write, later, writes it
        whole, and says what is wrong)."""
        try:
            return self.driver.stage_config(config)
        except Exception as exc:
            log.warning(
                "txn.stage_config_failed",
                rollout_id=rollout_id,
                config=which,
                error=describe(exc),
                detail="writing the staged config failed; the switch writes its own and says "
                "what is wrong",
            )
            return None

    def stage_next(self, txn: Txn) -> Future[Staged | None]:
        """``stage`` in the store thread's next hand-off, not in the caller's (with the
        caller's context variables, as ``dbthread.run``): the servicer's create, on the
        store's thread, returns as soon as the create is journalled, and the runner's work
        before its freeze call (the transaction's task, its log, the first WatchTransaction
        message, the socket directory's look) overlaps the config's write and fsync. The
        freeze call waits for it (``_freeze``): the staging is never inside the freeze window.
        Any later hand-off, the record of the freeze among them, finds it done."""
        return dbthread.executor().submit(contextvars.copy_context().run, self.stage, txn)

    async def _staging_done(self, txn: Txn) -> None:
        """Wait for the switch's staging (``stage_next``) before its freeze call goes out, and
        keep the CA it read for the verify. Shielded: a cancelled switch leaves the staging to
        finish on the store's thread (its config is then discarded, ``run``)."""
        key = (txn.rollout_id, txn.kind.value)
        staging = self._staged.get(key)
        if isinstance(staging, Future):
            staging = await asyncio.shield(asyncio.wrap_future(staging))
            if staging is None:
                self._staged.pop(key, None)
            else:
                self._staged[key] = staging
        if staging is not None and staging.ca_pem is not None:
            self._cas[key] = staging.ca_pem

    def _discard(self, staged: Staging, *, target: bool = True, source: bool = True) -> None:
        """Staged configs no write took (the target's, the source's, or both): removed, on
        the store's thread (with the caller's context variables, as ``dbthread.run``)."""

        def discard() -> None:
            done = staged.result(timeout=0) if isinstance(staged, Future) else staged
            if done is None:
                return
            for part in (done.config if target else None, done.source if source else None):
                if part is not None:
                    self.driver.discard_staged(part)

        dbthread.executor().submit(contextvars.copy_context().run, discard)

    def _discard_staged(self, key: tuple[str, str]) -> None:
        """At a transaction's end: its staged target config if no write took it, and its
        staged source if the way back did not."""
        staged = self._staged.pop(key, None)
        if staged is not None:
            self._discard(staged, source=False)
        back = self._sources.pop(key, None)
        if back is not None:
            self._discard(back, target=False)

    def _ahead_of(self, txn: Txn, plan: Plan, phase: Phase) -> Ahead | None:
        """The action after ``phase`` and its record, if they may run in the same hand-off as
        ``phase``'s record: the target config's write (blocking work only), after the record of
        the freeze has committed, and the record of ``config_written`` after it (the journal
        still comes before each act; nothing else comes between them). Not when the test hook
        stops the agent at ``phase``, which must come between the record and the write."""
        if phase is not Phase.FROZEN or self.crash_after == phase or plan.keep_edited:
            # (a way back keeping an edited config: its write records why, ``_write_config``)
            return None
        staged = self._staged.pop((txn.rollout_id, txn.kind.value), None)
        after = FORWARD[phase][1]

        def record(new: Txn) -> Txn:
            return self.journal.update(new, phase=after, begin=next_action(after))

        return Ahead(lambda new: self._put_target(new, plan, _staged_now(staged)), record)

    def _look_ahead(
        self, txn: Txn, plan: Plan, phase: Phase
    ) -> asyncio.Task[dict[str, Any]] | None:
        """The verify after ``phase`` (``restarted``, ``rb_restarted``), begun while the
        record of ``phase`` (which carries the verify's "begin") is written, not after it: a
        verify only looks at the server (its ports, its certificate, the watermark) and changes
        nothing, so nothing it does needs the record first; its outcome is taken, and
        journalled, only after that record has committed (the record of the restart, a journal
        write inside every freeze window, is off the window's path: issue 15). Not when the
        test hook stops the agent at ``phase``."""
        action = next_action(phase)
        if action not in (Action.VERIFY, Action.VERIFY_SOURCE) or self.crash_after == phase:
            return None
        attempts = 1 if phase in FORWARD else BACKWARD_ATTEMPTS
        return asyncio.create_task(
            self._attempt(action, txn, plan, attempts), name=f"txn-{txn.rollout_id}-{action}"
        )

    def _defers(self, phase: Phase) -> bool:
        """Whether the record of ``phase`` waits for the verify begun with it (``_look_ahead``)
        and goes in that verify's record (``Passed``, one write): a switch's ``restarted``.
        Its own write (a commit and its fsync, inside every freeze window; under a busy disk
        it outlasted the verify: issue 15) held the verify's outcome back until it committed,
        and changed nothing a crash could need: killed after the restart and before that one
        write, the agent resumes at ``config_written`` with the restart begun, as when killed
        during the restart, and freezes again (``_refreeze``), restarts and verifies; the
        unfreeze's ``begin`` is still journalled before the unfreeze. The verify only looks
        (``_look_ahead``). Not on the way back (its attempts), nor when a test hook stops the
        agent at ``phase``, which needs its record."""
        return phase is Phase.RESTARTED and phase not in (self.crash_after, self.term_after)

    def _put_target(self, txn: Txn, plan: Plan, staged: StagedConfig | None = None) -> Path | None:
        """The target config live (blocking); first, for a way back whose live config was
        edited since tlsroll wrote it, that file kept: where (``_keep_edited``), else None."""
        kept = self._keep_edited(txn, plan)
        self._replace_config(txn, plan, staged)
        return kept

    def _keep_edited(self, txn: Txn, plan: Plan) -> Path | None:
        """A way back whose live config was edited since tlsroll wrote it (``plan.keep_edited``,
        decided when it began: ``plans.edited_since``): the live file as it is now kept beside
        it (``Driver.keep_copy``: the config's mode and owner, atomic, on disk before the write
        that replaces the config; audit rev58a H2: the edits were undone without a trace). A
        copy that cannot be made fails the write step: the node stays as it was, edits and all.
        On a repeat after a crash that the write had taken already (the live config is the
        target), the copy the first attempt made stands. None: nothing to keep."""
        if not plan.keep_edited:
            return None
        path = Path(plan.keep_edited)
        live = self.driver.read_config()
        if live == txn.target_config:
            return path if path.exists() else None
        self.driver.keep_copy(path, live)
        log.info("rollback.kept_edited_config", rollout_id=txn.rollout_id, path=str(path))
        return path

    def _replace_config(self, txn: Txn, plan: Plan, staged: StagedConfig | None) -> None:
        if txn.target_config is not None:  # the journal holds both configs since the create
            if staged is not None and staged.data == txn.target_config:
                self.driver.commit_config(staged)
                return
            if staged is not None:
                self.driver.discard_staged(staged)
            self.driver.write_config(txn.target_config)
            return
        # A transaction of an earlier release: its configs are files. Save the source once:
        # on a repeat after a crash the live file may already be new.
        if not plan.backup_file.exists():
            write_atomic(plan.backup_file, self.driver.read_config(), PRIVATE)
        self.driver.write_config(read_file(plan.new_config_file))

    async def _restart(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        if txn.phase is Phase.RESTORED and txn.restart_needed is False:
            return {}
        t0 = time.monotonic()
        ended = self.driver.restarting = asyncio.Event()
        self.driver.restarts_begun += 1
        self.driver.restart_began = time.monotonic()
        try:
            await self.driver.restart()
        finally:
            ended.set()
            if self.driver.restarting is ended:
                self.driver.restarting = None
        return {"restart_seconds": round(txn.restart_seconds + time.monotonic() - t0, 3)}

    async def _verify(
        self,
        txn: Txn,
        plan: Plan,
        schemes: tuple[str, ...],
        fingerprint: str,
        watermark: int | None,
        *,
        pinned: bool = False,
    ) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(VERIFY_ATTEMPTS),
            wait=wait_incrementing(start=VERIFY_WAIT, increment=VERIFY_WAIT),
            retry=retry_if_exception_type(StepFailed),
            sleep=self.sleep,
            reraise=True,
        ):
            with attempt:
                ca_pem = self._cas.get((txn.rollout_id, txn.kind.value))
                problems = await self._problems(
                    plan, schemes, fingerprint, watermark, ca_pem, pinned=pinned
                )
                if problems:
                    raise StepFailed("; ".join(problems))

    async def _problems(
        self,
        plan: Plan,
        schemes: tuple[str, ...],
        fingerprint: str,
        watermark_was: int | None,
        staged_ca: bytes | None = None,
        *,
        pinned: bool = False,
    ) -> list[str]:
        """What is wrong with the server as ``schemes`` want it: each scheme's port and the
        watermark, asked at once on the event loop (they are independent; the freeze window
        waits for them), reported in this order. ``staged_ca``: the CA as the switch's staging
        read it. ``pinned``: https must present ``fingerprint``, whoever issued it (no CA)."""
        f, checks = plan.facts, self.checks

        async def https() -> str | None:
            if "https" in schemes and pinned:
                return await checks.check_pinned(f.address, f.https_port, f.app_path, fingerprint)
            if "https" in schemes:
                # The CA as the switch's staging read it (``stage``); else (a transaction
                # resumed after a restart) read here. Only for https: the way back to http
                # must not depend on the staged files.
                ca_pem = staged_ca
                if ca_pem is None:
                    ca_pem = await asyncio.to_thread(read_file, plan.ca_file)
                try:
                    return await checks.check_https(
                        f.address, f.https_port, f.app_path, ca_pem, fingerprint
                    )
                except (ssl.SSLError, ValueError) as exc:
                    # The CA itself (the check makes its context before it connects; the
                    # staging's ``prepare_https`` let it pass): no attempt again can help.
                    # Said with the file's name, as an unreadable one is (``read_file``).
                    raise _unusable_ca(plan.ca_file, exc) from None
            if await checks.port_open(f.address, f.https_port):
                return f"port {f.https_port} still open"
            return None

        async def http() -> str | None:
            if "http" in schemes:
                return await checks.check_http(f.address, f.http_port, f.app_path)
            if await checks.port_open(f.address, f.http_port):
                return f"port {f.http_port} still open (plain http must be closed)"
            return None

        async def watermark() -> str | None:
            if watermark_was is None:
                return None
            now = await self.driver.watermark()
            if now != watermark_was:
                return f"write watermark moved from {watermark_was} to {now} while frozen"
            return None

        problems = await _all_or_none(https(), http(), watermark())
        return [p for p in problems if p]

    async def _verify_target(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        await self._verify(txn, plan, plan.target_schemes, plan.target_fingerprint, txn.watermark)
        return {}

    async def _verify_source(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        """The restore check: the source back as it was (``Plan.source_fingerprint``: by the
        certificate it served, else trusting ``ca_file``)."""
        pin = restore_pin(plan.source_fingerprint, restarted=txn.restart_needed is not False)
        await self._verify(txn, plan, plan.source_schemes, pin, None, pinned=bool(pin))
        return {}

    async def _unfreeze(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        """Lift the freeze, trying until it works (see the module docstring): the server is
        already on the config this transaction ends with; only the freeze is left.

        A switch of a scope freeze (``keep_frozen``) leaves the server frozen only while the
        journal holds a lease, which bounds it (the leader's Unfreeze when the rollout ends,
        or the lease watch once it runs out). Without one (the leader lifted the scope freeze
        while the switch ran, or the lease watch did), nothing else would ever lift it: it is
        lifted here (s34 review M3). Each such attempt reads the lease and unfreezes under
        ``freeze_lock``, so that a Freeze crossing it is never undone (review s32 F3); a lease
        that cannot be read is tried again like an unfreeze that failed, frozen meanwhile, but
        not for longer than the leases could hold: then it unfreezes (review 1 of s34, L3; as
        ``_scope_frozen`` does, an unreadable journal holds no lease we could honour). That is
        safe: a Freeze notes its lease in ``leases`` before it journals it, and journals it
        before it freezes, so once every lease this process granted or took over from the
        journal has run out (in elapsed time; review 2 of s34, F4: it waited a whole day,
        whatever the lease), none the journal can hold is left. A process that has never read
        the lease (restarted with a journal it cannot read) cannot know one an earlier process
        granted: it waits the longest lease an agent grants, ``LEASE_UNREAD_LIMIT``, from the
        first failed read (a lease granted before this process started has run out by then)."""
        attempt, logged = 0, time.monotonic()
        unread_since: float | None = None  # when the lease reads began to fail (monotonic)
        while True:
            try:
                if plan.keep_frozen:
                    async with self.freeze_lock:
                        try:
                            lease = await dbthread.run(self.journal.freeze_lease)
                        except Exception as exc:  # a lease may hold: frozen still, asked again
                            now = self.monotonic()
                            unread_since = now if unread_since is None else unread_since
                            known = self.leases.known_end()
                            ends = (
                                unread_since + LEASE_UNREAD_LIMIT.total_seconds()
                                if known is None
                                else known
                            )
                            if now < ends:
                                raise LeaseUnread(
                                    f"the scope freeze's lease: {describe(exc)}"
                                ) from exc
                            log.warning(
                                "txn.lease_unread_unfreeze",
                                rollout_id=txn.rollout_id,
                                kind=txn.kind,
                                unread_seconds=int(now - unread_since),
                                error=describe(exc),
                                detail="the lease cannot be read and "
                                + (
                                    "none was read for longer than the longest lease"
                                    if known is None
                                    else "every lease this agent knows of has run out"
                                )
                                + ": unfreezing",
                            )
                            lease = None
                        else:
                            self.leases.seen(lease, self.clock(), self.monotonic())
                            unread_since = None
                        if lease is not None:
                            # The rollout's scope freeze goes on, bounded by its lease; looked
                            # at again once the outcome is journalled (``_lift_left_freeze``).
                            self._left_to_lease.add((txn.rollout_id, txn.kind.value))
                            return {}
                        await self.driver.unfreeze()
                else:
                    await self.driver.unfreeze()
            except (DriverError, OSError, LocalResourceError, LeaseUnread) as exc:
                attempt += 1
                wait = UNFREEZE_BACKOFF.delay(attempt)
                if worth_logging(attempt, time.monotonic() - logged):
                    logged = time.monotonic()
                    log.error(
                        "txn.unfreeze_failed",
                        rollout_id=txn.rollout_id,
                        kind=txn.kind,
                        attempt=attempt,
                        retry_in=wait,
                        error=describe(exc),
                        hint="the managed server stays frozen (refusing writes) until this "
                        "works: check it runs (systemctl status of its unit); the agent "
                        "keeps trying",
                    )
                await self.sleep(wait)
                continue
            if attempt:
                log.warning(
                    "txn.unfreeze_done",
                    rollout_id=txn.rollout_id,
                    kind=txn.kind,
                    attempts=attempt + 1,
                    detail="the freeze was lifted at last: the server takes writes again",
                )
            return self._freeze_ends(txn)

    async def _restore_config(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        """Put the source config back if the live one is not it; say if a restart is needed."""
        rewritten = await dbthread.run(self._put_source, txn, plan)
        target_loaded = (txn.failed_phase or Phase.STARTED) in TARGET_MAY_BE_RUNNING
        down = not rewritten and not target_loaded and await self.driver.health() is not None
        return {"restart_needed": rewritten or target_loaded or down}

    def _put_source(self, txn: Txn, plan: Plan) -> bool:
        """True if the live config was not the source and has been replaced by it: by the
        source staged with the target (a rename, no new block: s38 audit H3), else written
        whole (a transaction resumed by another agent process, or of an earlier release)."""
        if txn.source_config is not None:
            source = txn.source_config
        elif not plan.backup_file.exists():
            return False  # an earlier release's transaction: the target was never written
        else:
            source = read_file(plan.backup_file)
        if self.driver.read_config() == source:
            return False
        key = (txn.rollout_id, txn.kind.value)
        staged = _source_now(self._sources.get(key))
        if staged is not None and staged.data == source:
            # Taken whatever the rename does: one that fails removes the staged file, and the
            # next attempt writes the config whole.
            del self._sources[key]
            self.driver.commit_config(staged)
        else:
            self.driver.write_config(source)
        return True
