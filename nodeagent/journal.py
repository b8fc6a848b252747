"""The agent's local journal (SQLite, WAL, synchronous=FULL) of every step it takes.

A step is written *before* it acts (``begin``) and *after* (``end`` or ``error``); a
transaction's ``phase`` is the last step that finished. After a crash the agent reads the
journal and carries every unfinished transaction on from its phase; each step is safe to run
again, so a crash between "act" and "record" repeats an action that is idempotent, never one
that is not. The journal also remembers the highest rollout epoch seen, to refuse stale
leaders, and the staged certificate of each rollout.

Lost state is loud: ``open_journal`` refuses a journal that is missing although the agent is
enrolled (it had one), empty (0 bytes) or damaged, with one line naming the file and the two
ways on (restore it from a backup, or the one-shot ``tlsroll-agent --reinitialise``, which
moves the lost file aside, begins an empty journal, logged as ``journal.reinitialised``, and
exits). A journal that
cannot be read now for a reason outside it (a full disk, a read-only file system) is not lost:
``tlsroll.sqlite.StoreUnavailable``, whose line says so and never advises ``--reinitialise``,
which refuses it (``tlsroll.sqlite.NotDamaged``, exit 2) and moves nothing aside.

A journal put back from the copy kept before an upgrade (``mark_copy``, ``Journal._put_back``;
README "Downgrading tlsroll") is older than the node: the agent ran on after the
copy was made. A transaction it shows unfinished was unfinished *when the copy was made* (an
upgrade restarts the agent mid-switch; the newer agent carried it on, or broke before it did,
which is the usual reason to go back); it is never resumed from its old phase, which would
freeze the server again and rewrite, restart and verify towards a config the cluster may have
left since (a switch rolled back by the newer agent would be switched again; a way back resumed
would take a switched node to http). At the first start on the copy such transactions are
remembered (``restored_unfinished``, in the write that says the journal is a copy put back;
an agent that stops before it settled them settles them at its next start) and settled
level-based instead (``nodeagent.transaction.Runner.resume_all``): the server's live config and
what the server answers from outside are compared with the transaction's two configs. A
verdict is recorded only where the server proves it: the target live and answering as the
target, ``completed`` (and what is live with it); the source, ``rolled_back``. Where the two
answer alike from outside (the same schemes, and no certificate to tell them by: a
change-password, a rollback), the server must also say it started after its config was last
written (its status's ``started_at``; "last written": the later of the file's mtime and ctime,
since the way back renames a source staged before the restart into place, review s41rev3 N1;
"after": by the file time's grain and more, ``transaction._not_loaded``):
a config written and not restarted proves nothing (review s41rev1 H2). A server left frozen,
with no scope freeze's lease in the journal to bound it, proves nothing either: no transaction
this journal knows of will lift it (H1); nor does a server whose status cannot be read (asked
again after short waits): whether it is frozen is unknown (s41rev3 N2). Anything else
(neither config, a server that answers as neither, a row of an earlier release without its
configs) is recorded ``failed``, and the node needs the admin (``needs_admin``). Such a node is
taken on by nothing: the agent's heartbeats report its server as not healthy with that text
(`tlsroll nodes`, the schema's and the viewer's node problems), its preflight fails with it,
the leader's planning refuses a plan with it, naming it, and the agent refuses Stage, Switch
and Rollback (FAILED_PRECONDITION), until the admin, having checked the server, runs the
one-shot ``tlsroll-agent --journal-checked`` (``nodeagent.runtime.recover``; refused, exit
2, while the server's config contradicts the files the journal holds live:
``plans.live_contradiction``). A plain restart keeps it. Nothing is done to the server in
any case: no freeze, no write, no restart, no unfreeze (a freeze the copy says is owed,
``unfreeze_owed``, is forgotten too: the newer agent lifted it, the server's freeze is
another's now, or a freeze left makes the node need the admin). The copy's time
(``restored_copy_at``), which a refusal to roll back mentions, is forgotten with the first
transaction the agent completes on the copy: from then on the journal explains itself.

A transaction's ``plan`` is fixed when it starts (``update`` refuses to change it); what the
runner learns on the way (``failed_phase``, ``restart_needed``) has columns of its own. Kind,
phase and outcome are the enums' values as text (a pending outcome is ``''``, as in 0.1.0).
Transactions are ordered as the journal wrote them (``rowid``: the table is never deleted
from), never by their ``started_at``: that is the node's wall clock, and after it was stepped
back (NTP at boot, a VM restored, an admin's ``date``) a newer transaction has the earlier time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from nodeagent.failure_log import FailureCount
from nodeagent.lease import Boot, Lease
from nodeagent.transaction import Passed, Phase
from tlsroll import logs
from tlsroll.backoff import FUTURE_SLACK
from tlsroll.enums import TxnKind, TxnOutcome
from tlsroll.errors import TerminalError
from tlsroll.sqlite import (
    Database,
    Migration,
    NotDamaged,
    StoreDamaged,
    StoreUnavailable,
    damage,
    move_aside,
    unreadable,
)

log = logs.get_logger(__name__)

# Migration 1: the tables of tlsroll 0.1.0 (which left user_version at 0).
_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS staged (
    rollout_id  TEXT PRIMARY KEY,
    key_file    TEXT NOT NULL,
    csr_pem     TEXT NOT NULL,
    cert_file   TEXT,
    ca_file     TEXT,
    fingerprint TEXT,
    not_after   TEXT
);
CREATE TABLE IF NOT EXISTS txns (
    rollout_id        TEXT NOT NULL,
    kind              TEXT NOT NULL,
    epoch             INTEGER NOT NULL,
    phase             TEXT NOT NULL,
    outcome           TEXT NOT NULL DEFAULT '',
    reason            TEXT NOT NULL DEFAULT '',
    watermark         INTEGER,
    started_at        TEXT NOT NULL,
    ended_at          TEXT,
    freeze_started_at TEXT,
    freeze_ended_at   TEXT,
    restart_seconds   REAL NOT NULL DEFAULT 0,
    old_url           TEXT NOT NULL DEFAULT '',
    new_url           TEXT NOT NULL DEFAULT '',
    cert_fingerprint  TEXT NOT NULL DEFAULT '',
    plan              TEXT NOT NULL,
    PRIMARY KEY (rollout_id, kind)
);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL,
    rollout_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    step       TEXT NOT NULL,
    what       TEXT NOT NULL,
    detail     TEXT NOT NULL
);
"""

# Migration 2: the runner's flags leave the plan (which 0.1.0 rewrote on the way) for columns
# of their own; rows of 0.1.0 have them moved out of the plan's JSON.
_V2 = """
ALTER TABLE txns ADD COLUMN failed_phase TEXT;
ALTER TABLE txns ADD COLUMN restart_needed INTEGER;
UPDATE txns SET
    failed_phase = json_extract(plan, '$.failed_phase'),
    restart_needed = json_extract(plan, '$.restart_needed'),
    plan = json_remove(plan, '$.failed_phase', '$.restart_needed')
WHERE json_type(plan, '$.failed_phase') IS NOT NULL
   OR json_type(plan, '$.restart_needed') IS NOT NULL;
"""

# Migration 3: a transaction's two configs in its own row (issue 15). The target config and
# the source it replaces used to be files of their own beside the journal (``*.new``,
# ``*.old``), each an fsync'd atomic write (two fsyncs and a new inode), the backup one inside
# the freeze window; now they are written with the transaction's first record, in the same
# commit. Rows of earlier releases leave them NULL and keep using their files.
_V3 = """
ALTER TABLE txns ADD COLUMN target_config BLOB;
ALTER TABLE txns ADD COLUMN source_config BLOB;
"""

# Migration 4: the bootstrap service's failed passwords outlive the agent (session 33, M4): the
# times that decide the node's daily ceiling, and the failures not yet reported to the leader.
# Only what the leader's schema shows of a failure (source, claimed name, time), never a guess.
_V4 = """
CREATE TABLE bootstrap_failures (at REAL NOT NULL);
CREATE TABLE bootstrap_unreported (
    source      TEXT PRIMARY KEY,
    workstation TEXT NOT NULL,
    count       INTEGER NOT NULL,
    last_at     TEXT NOT NULL
);
"""

# Migration 5: the scope freeze's lease keeps its length beside its wall-clock end (clock audit
# s35 A: after a restart, a journalled lease lasts at most its own length, whatever the clock
# did; ``nodeagent.lease``). The meta value ``[rollout_id, until]`` becomes
# ``[rollout_id, until, seconds]``; a lease journalled before has no length (null), and is
# bounded by the longest lease an agent grants. An earlier release, which could not read the new
# value, refuses the journal (``SchemaTooNew``) instead of misreading it.
# The value has since (before any release) grown the lease's end on the boot-time clock and that
# boot's id, ``[rollout_id, until, seconds, boot_id, boot_until]`` (null, null where the node
# has no such clock; review 1 of s35, finding 3): ``freeze_lease`` reads both forms, so a
# journal the build before wrote needs no migration.
_V5 = """
UPDATE meta SET value = json_array(json_extract(value, '$[0]'), json_extract(value, '$[1]'), NULL)
WHERE key = 'freeze_lease' AND value <> '' AND json_valid(value);
"""

# Migration 6: a freeze's length in elapsed time (clock audit s35 J): where the freeze began on
# the boot-time clock (``nodeagent.lease.Boot``: that boot's id and its seconds), and the length
# measured on it when the freeze was lifted. Rows of earlier releases have neither: their
# length is not known (the leader takes the difference of the wall-clock times).
_V6 = """
ALTER TABLE txns ADD COLUMN freeze_boot_id TEXT;
ALTER TABLE txns ADD COLUMN freeze_boot_at REAL;
ALTER TABLE txns ADD COLUMN freeze_seconds REAL;
"""

# The journal's schema: append a migration to change it (see tlsroll.sqlite).
MIGRATIONS: tuple[Migration, ...] = (
    _V1,  # 0.1.0
    _V2,  # failed_phase and restart_needed out of the plan
    _V3,  # the target and source configs in the transaction's row
    _V4,  # the bootstrap service's failed passwords
    _V5,  # the scope freeze's lease keeps its length
    _V6,  # a freeze's length in elapsed time
)

IGNORABLE: frozenset[int] = frozenset()
"""The migrations (numbered from 1) an agent without them may ignore as it reads and writes the
journal (``tlsroll.sqlite.migrate``; as ``leader.db.IGNORABLE``). Empty so far: only builds
from session 40 on read the floor it makes."""

READS_FLOOR_FROM = 7
"""The lowest journal schema that only builds reading ``readable_by`` wrote
(``tlsroll.sqlite.migrate``'s ``reads_floor_from``; as ``leader.db.READS_FLOOR_FROM``): that
code came in at schema 6 (commit 096a57d, session 40), which builds before it wrote too."""

LOSING = (
    "a switch made since loses its way back to http, which only the journal holds: never put"
    " the copy back once a rollout touched this node since the upgrade"
)
"""What putting back the journal's copy kept before an upgrade loses (audit s40, H2)."""


def mark_copy(conn: sqlite3.Connection, made_at: dt.datetime) -> None:
    """Into the copy kept before a migration (``tlsroll.sqlite.keep_copy``): ``copy_made_at``.
    An agent started on the copy put back says so (``journal.restored``), and a way back to
    http it then cannot find says why (``Journal.restored_copy_at``). The copy's own time, even
    if the file is itself a copy put back not yet opened (review s40 L-d: its earlier time was
    carried over); a journal without ``meta`` is left as it is (L-f)."""
    if conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone():
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('copy_made_at', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (made_at.isoformat(timespec="microseconds"),),
        )


@dataclass(frozen=True)
class Txn:
    rollout_id: str
    kind: TxnKind
    epoch: int
    phase: Phase
    plan: dict[str, Any]  # transaction.Plan as JSON: fixed when the transaction starts
    started_at: dt.datetime  # the node's clock then: shown and reported, never an order
    outcome: TxnOutcome = TxnOutcome.PENDING
    reason: str = ""
    watermark: int | None = None
    ended_at: dt.datetime | None = None
    freeze_started_at: dt.datetime | None = None
    freeze_ended_at: dt.datetime | None = None
    restart_seconds: float = 0.0
    old_url: str = ""
    new_url: str = ""
    cert_fingerprint: str = ""
    failed_phase: Phase | None = None  # the forward phase a failure left (for the way back)
    restart_needed: bool | None = None  # the way back must restart (set by restore_config)
    # The config the transaction writes, and the one it replaces (read when it was created,
    # before anything was frozen or written): the way back and a later rollback restore it.
    # None in rows of earlier releases, whose plan names files for both.
    target_config: bytes | None = None
    source_config: bytes | None = None
    # Where the freeze began on the boot-time clock (``Boot``: its boot id and seconds), and the
    # freeze's length measured on that clock when it was lifted (``Runner._unfreeze``). None:
    # not frozen yet, no such clock, or a row of an earlier release.
    freeze_boot_id: str | None = None
    freeze_boot_at: float | None = None
    freeze_seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not TxnOutcome.PENDING


@dataclass(frozen=True)
class Staged:
    rollout_id: str
    key_file: Path
    csr_pem: bytes
    cert_file: Path | None
    ca_file: Path | None
    fingerprint: str | None
    not_after: dt.datetime | None


@dataclass(frozen=True)
class StageNeeds:
    """What the stage directories beside the live config (``tlsroll-tls/<rollout>/``) are
    still needed for, read at once (``Journal.stage_needs``; ``plans.needed_stage_files``
    turns it into directories and files). Everything else there is keys, certificates and
    verifier files nothing will read again: a superseded certificate's key among them (review
    rev58a L11: ten rollouts left five directories per node, each with such a key)."""

    # Stages no transaction began yet: their switch may still come (a rollout the leader
    # says has ended is forgotten: ``forget_stages``).
    staged: frozenset[str]
    # Files the server may read now or after a transaction or way back still possible: what
    # is live; what an unfinished transaction writes or goes back to; what the rollback of
    # the newest switch restores while its way back is open (``way_back``); both sides of a
    # transaction that failed (the server may run either, and the admin decides).
    files: frozenset[str]
    # The configs such a transaction or way back may still write (what one of them names is
    # kept too: rows of earlier releases, whose plans may not name every file).
    configs: tuple[bytes, ...]
    # The rollout whose switch is the journal's newest transaction and may still be rolled
    # back by the leader (its confirm's outside check failed), until the leader says the
    # rollout has ended (``end_way_back``); None if there is none.
    way_back: str | None
    # Every rollout with a stage or a transaction: only their directories are swept while
    # the agent runs (``plans.sweep_stage_dirs``).
    known: frozenset[str]


@dataclass(frozen=True)
class Outlook:
    """What a transaction's create looks at before its write, read at once
    (``Journal.outlook``): the transaction under its key (a replay), the first unfinished one
    (the node is busy), what is live and the rollout's staged certificate."""

    existing: Txn | None
    running: Txn | None
    live_tls: dict[str, str] | None
    staged: Staged | None


_TXN_FIELDS = tuple(f.name for f in fields(Txn))
# A new transaction's row; nothing where one has its key (``Journal.create``: a replay). Column
# names come from the dataclass, never from input.
_INSERT_TXN = (
    f"INSERT INTO txns ({', '.join(_TXN_FIELDS)}) VALUES ({', '.join('?' * len(_TXN_FIELDS))})"  # noqa: S608
    " ON CONFLICT (rollout_id, kind) DO NOTHING"
)
_DATETIME_FIELDS = {"started_at", "ended_at", "freeze_started_at", "freeze_ended_at"}
_ENUM_FIELDS: dict[str, type[Phase | TxnKind]] = {
    "kind": TxnKind,
    "phase": Phase,
    "failed_phase": Phase,
}
_PENDING = ""  # how the outcome column says "pending" (as 0.1.0 did)
_INSERT_EVENT = (
    "INSERT INTO events (at, rollout_id, kind, step, what, detail) VALUES (?, ?, ?, ?, ?, ?)"
)
_NO_DETAIL = json.dumps({})  # an event's empty detail, as ``json.dumps`` wrote it
# The stages a new one ends (``Journal.record_csr``): another rollout's, never in a transaction.
_STAGES_OVER = (
    "SELECT * FROM staged WHERE rollout_id != ? AND rollout_id NOT IN (SELECT rollout_id FROM txns)"
)


# The stages no transaction began (``Journal.heartbeat_facts``), sorted, at most ``?``.
_UNSWITCHED = (
    "SELECT rollout_id FROM staged WHERE rollout_id NOT IN (SELECT rollout_id FROM txns)"
    " ORDER BY rollout_id LIMIT ?"
)
# The journal's newest transaction, in the order the journal wrote them (a table of rowids
# never deleted from: ``rowid`` grows with each insert), not by ``started_at``, which a clock
# set back would reorder. Every query that orders transactions orders them so (reviews s59 L8,
# s60, s61: the way back to http and the sweep took the newest switch from http by
# ``started_at``, and after a clock stepped back undid an older one). The copy kept before an
# upgrade is a ``VACUUM INTO``, which SQLite says may renumber the rowids of a table without an
# INTEGER PRIMARY KEY, as this one is; it copies the rows in rowid order (3.40 keeps the very
# rowids), and the order is all the journal reads of them.
_NEWEST_TXN = "SELECT * FROM txns ORDER BY rowid DESC LIMIT 1"
# The newest completed switch that took the node from http (its source served no https): the
# one the way back to http (disable-tls) undoes (``Journal.newest_switch_from_http``), whose
# files the sweep keeps (``Journal.stage_needs``). Read newest first, in the journal's order,
# and the first that matches ends the read (the rows are the table's, read backwards, no
# sort): the journal is never pruned, and no more of it is read than the transactions since
# that switch (a row each: a rotation's, a way back's).
# A plan without ``source_schemes`` (none is written so) counts as from http, as
# ``plan.get("source_schemes", ())`` did.
_NEWEST_FROM_HTTP = (
    "SELECT {columns} FROM txns WHERE kind = ? AND outcome = ? AND NOT EXISTS"
    " (SELECT 1 FROM json_each(plan, '$.source_schemes') WHERE value = 'https')"
    " ORDER BY rowid DESC LIMIT 1"
)
_SWITCH_DONE = (TxnKind.SWITCH.value, TxnOutcome.COMPLETED.value)
_PLAN_FILES = ("cert_file", "key_file", "ca_file", "verifier_file")


def _plan_files(plan: dict[str, Any], *which: str) -> set[str]:
    """The files the settings ``which`` (``live_tls``, ``live_before``) of a transaction's
    plan (its JSON) name, and with ``ca_file`` the CA its verify trusts."""
    files: set[str] = set()
    for key in which:
        value = plan.get(key)
        if key == "ca_file" and isinstance(value, str) and value:
            files.add(value)
        elif isinstance(value, dict):
            files |= {str(value[k]) for k in _PLAN_FILES if value.get(k)}
    return files


def _open_way_back(db: sqlite3.Connection) -> sqlite3.Row | None:
    """The newest transaction if it is a completed switch whose way back is still open: the
    leader may still roll it back (``Rollback`` of its rollout, after its confirm's outside
    check failed), which restores what was live before it. Closed by any later transaction
    (one rollout at a time per cluster: a later one on this node means this one has ended),
    by its rollback (journalled under its rollout: a Rollback sent again is a replay), and by
    the leader saying its rollout has ended (``Journal.end_way_back``)."""
    row: sqlite3.Row | None = db.execute(_NEWEST_TXN).fetchone()
    if (
        row is None
        or row["kind"] != TxnKind.SWITCH.value
        or row["outcome"] != TxnOutcome.COMPLETED.value
    ):
        return None
    ended = db.execute("SELECT value FROM meta WHERE key = 'way_back_ended'").fetchone()
    if ended is not None and ended["value"] == row["rollout_id"]:
        return None
    return row


def _enc(name: str, value: Any) -> Any:
    if name == "outcome":
        return _PENDING if value is TxnOutcome.PENDING else TxnOutcome(value).value
    if value is None:
        return None
    if name in _DATETIME_FIELDS:
        return value.isoformat()
    if name == "plan":
        return json.dumps(value, sort_keys=True)
    if name in _ENUM_FIELDS:
        return _ENUM_FIELDS[name](value).value
    if name == "restart_needed":
        return int(value)
    return value


def _dec(name: str, value: Any) -> Any:
    if name == "outcome":
        return TxnOutcome(value) if value != _PENDING else TxnOutcome.PENDING
    if value is None:
        return None
    if name in _DATETIME_FIELDS:
        return dt.datetime.fromisoformat(value)
    if name == "plan":
        return json.loads(value)
    if name in _ENUM_FIELDS:
        return _ENUM_FIELDS[name](value)
    if name == "restart_needed":
        return bool(value)
    return value


# A failed bootstrap password's time more than ``FUTURE_SLACK`` (``tlsroll.backoff``'s, the
# reference server's ceiling's too) ahead of the agent's clock cannot be right (it was counted
# while the clock was ahead): it no longer counts (``record_bootstrap_failure``,
# ``nodeagent.bootstrap_supervisor.guard_times``).


class JournalError(TerminalError):
    """A read or write of the journal failed (a full disk, a damaged file): the message names
    the file and SQLite's words and code, e.g. ``journal /var/lib/tlsroll/journal.sqlite3:
    database or disk is full (SQLITE_FULL)``."""


class JournalUnavailable(JournalError):
    """A read or write of the journal that failed for a moment (its file locked or busy, an I/O
    error of a lock, of the WAL's shared memory, of a write or its fsync, a file it could not
    open, a WAL to recover: ``READ_TRANSIENT``; not a disk that could not read the file back,
    nor a journal no longer at its path: ``JOURNAL_GONE``): the agent answers its caller
    UNAVAILABLE, which asks again, not as a refusal (session 73's L: GetTransaction answered
    FAILED_PRECONDITION, which the leader takes for "refused the question", needing the admin at
    once; session 74's L3: a write so failed was a refusal, which the leader records as "nothing
    changed", though a failed COMMIT may be kept: ``JOURNAL_IN_DOUBT``). Still a
    ``JournalError`` within the agent (what catches one catches it), as one over a full disk is,
    answered RESOURCE_EXHAUSTED. A damaged journal (SQLITE_CORRUPT, SQLITE_NOTADB), or one the
    disk could not read back (``tlsroll.sqlite.unreadable``), stays a plain ``JournalError``:
    asking again does not mend it."""


JOURNAL_IN_DOUBT = "whether that write was kept is not known until the journal is written again"
"""What the error of a write whose COMMIT failed says (``Journal._tx``; session 74's L3). In
WAL mode a transaction is committed once its commit frame is in the ``-wal`` file (SQLite's
wal.c: "Transactions commit when a frame is written that contains a commit marker"); the
connection's view (the WAL index in ``-shm``) takes it only after the fsync that
``synchronous=FULL`` asks for. A COMMIT whose frames were written but whose fsync failed
(SQLITE_IOERR_FSYNC), or that failed after them, is rolled back in the agent's view (a read
does not find it) while its frames stay in the ``-wal``: the next open that rebuilds the index
(the agent restarted, a crash) replays it, a transaction the agent then resumes while the
leader, told "refused" and then "none held", recorded that nothing changed. So a failed COMMIT
leaves the journal in doubt: every read first writes again (``probe``), and only once such a
write is kept (it takes the frames' place: a later frame's checksum no longer follows from the
one before, so the next recovery stops there) does the read answer; until then it answers
UNAVAILABLE, asked again, and a restarted agent reads what the recovery kept. Not a failed
COMMIT that wrote no commit frame: a lock (SQLITE_BUSY, SQLITE_LOCKED: its transaction stays
open and is rolled back) or a full disk (SQLITE_FULL: the commit frame, the last one written,
did not fit; a torn frame fails its checksum)."""

PROBE_BUSY_SECONDS = 0.1
"""The longest a read's probe in doubt (``Journal._read``) waits for another process's lock on
the journal (SQLite's busy timeout; every other write waits the connection's 10 s), then
answers as the lock does (SQLITE_BUSY: UNAVAILABLE, asked again): while in doubt every read
probes, and each waited the 10 s on the store's thread, ahead of a switch's records (session
74's note, Open)."""

# A COMMIT that failed with these wrote no commit frame (``JOURNAL_IN_DOUBT``).
COMMIT_NOT_WRITTEN = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL")


# SQLite's codes (extended ones too) of a read that may work if tried again
# (``JournalUnavailable``): those ``tlsroll.rpc.storage_trouble`` answers UNAVAILABLE for a
# store of its own (SQLITE_READONLY_RECOVERY: a WAL another connection must recover first),
# and a lock; a full disk has its own answer (``tlsroll.rpc.is_disk_full``).
READ_TRANSIENT = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
)


JOURNAL_GONE = (
    "the journal is not where the agent opened it (its file, its -wal or its directory moved or"
    " deleted): put it back, then restart the agent (its start says how to recover a journal"
    " that is gone)"
)
"""What the error of a journal read or write says when the journal's file is no longer at its
path (``Journal._gone``): SQLite's SQLITE_READONLY_DBMOVED (the file moved or deleted under a
connection), or any other ``READ_TRANSIENT`` code (SQLITE_CANTOPEN of a directory that
vanished) while the path names no file, or another file. Lasting: a plain ``JournalError`` (a
refusal: FAILED_PRECONDITION), never ``JournalUnavailable``, which the leader asked again
without end (session 74's note, Open). And what the agent says once it found so itself
(``Journal.look_gone``): in WAL mode no error ever comes (session 75, journalgone)."""


class JournalLost(StoreDamaged):
    """The journal is missing, empty or damaged: the agent does not start on it (the message
    says how to recover; exit 4, not restarted)."""


def recovery(command: str = "") -> str:
    """What the line of a lost journal says to do; ``command``: the ``--reinitialise`` one-shot
    as the admin types it (``nodeagent.runtime.recovery_command``)."""
    begin = command or "tlsroll-agent --config CONFIG --reinitialise"
    return (
        "restore it from a backup with the agent stopped, or begin an empty journal: run"
        f" `{begin}` (it only replaces the journal), then start the agent as before (installed:"
        " systemctl start tlsroll-agent); this node then forgets its transactions and staged"
        " certificates: check the managed server's config by hand; on a node whose server runs"
        " https, its workstation port (9443) stays closed until a rotate-cert of the node"
        " (`tlsroll rollout start --change rotate-cert --nodes NODE` on the leader; an"
        " enable-tls finds it done)"
    )


def open_journal(
    path: Path, *, expected: bool, reinitialise: bool = False, recover: str = ""
) -> Journal:
    """The journal at ``path``, refusing lost state (see the module docstring).

    ``expected``: the agent had a journal (it is enrolled; the journal is made before the
    enrolment). ``reinitialise``: the admin's explicit choice to start an empty journal in
    place of a lost one; refused (``NotDamaged``) for a journal that is intact or only
    unavailable now (``StoreUnavailable``: a full disk), which it would throw away. ``recover``:
    the ``--reinitialise`` command line a lost journal's message gives."""
    path = Path(path)
    try:
        problem = damage(path, expected=expected, what="journal")
    except StoreUnavailable as exc:
        if reinitialise:
            raise NotDamaged(
                f"{exc}; --reinitialise is only for a missing, empty or damaged journal:"
                " nothing was moved aside"
            ) from None
        raise
    if problem is None and reinitialise and path.exists():
        problem = _row_problem(path)  # what the agent's start met: the file itself is sound
    if problem is None:
        if reinitialise and path.exists():
            raise NotDamaged(
                f"journal {path}: intact; --reinitialise is only for a missing, empty or"
                " damaged journal: start the agent without it"
            )
        return Journal(path)
    if not reinitialise:
        raise JournalLost(f"journal {path}: {problem}; {recovery(recover)}")
    kept = _move_aside(path)
    log.warning(
        "journal.reinitialised",
        path=str(path),
        problem=problem,
        kept_as=[str(k) for k in kept],
        detail="started with an empty journal on the admin's --reinitialise",
    )
    return Journal(path)


def _row_problem(path: Path) -> str | None:
    """A transaction row of the journal at ``path`` the agent cannot read (``_txn``), said as
    ``damage`` says a problem; None if every row reads (or the rows cannot be looked at here:
    a journal of an earlier schema, whose missing columns its opening adds). Read-only."""
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return None
    try:
        conn.row_factory = sqlite3.Row
        for row in conn.execute("SELECT * FROM txns ORDER BY rowid"):
            try:
                Txn(**{f.name: _dec(f.name, row[f.name]) for f in fields(Txn)})
            except (ValueError, TypeError) as exc:
                return _damaged_row(row, exc)
    except (sqlite3.Error, IndexError):
        return None
    finally:
        conn.close()
    return None


def _move_aside(path: Path) -> list[Path]:
    """Rename the journal and its -wal/-shm to ``NAME.lost-TIME…`` (kept for a post-mortem;
    never over a copy kept before: ``tlsroll.sqlite.move_aside``)."""
    return move_aside(path, ("", "-wal", "-shm", "-journal"))


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # The events of the write under way (``_event``), inserted at its end (``_tx``).
        self._queued: list[tuple[str, ...]] = []
        # The thread of the write under way (``_tx``), None between writes: ``_event`` outside
        # one is a bug, said loudly (its event would be dropped, or go into another's write).
        self._writing: int | None = None
        # A write's COMMIT failed and no write was kept since (``JOURNAL_IN_DOUBT``): a read
        # writes first (``_read``).
        self._in_doubt = False
        self._db = Database(
            self.path,
            MIGRATIONS,
            what="journal",
            ignorable=IGNORABLE,
            mark=mark_copy,
            losing=LOSING,
            reads_floor_from=READS_FLOOR_FROM,
            cached=False,  # (the journal keeps nothing in the store's cache)
        )
        # The file the connection opened (device, inode): ``_gone`` tells a path that no
        # longer names it.
        self._opened = _file_id(self.path)
        # Why the journal is no longer where it was opened, once found (``look_gone``).
        self._gone_why: str | None = None
        self._gone_lock = threading.Lock()
        # The connection's -wal, as the file (WAL: made by its first read, kept open, never
        # made again until the last connection closes): recorded once the reads below made it.
        self._wal = Path(f"{self.path}-wal")
        self._wal_opened: tuple[int, int] | None = None
        self._frozen: set[tuple[str, str]] = set()  # (``in_freeze_window``; filled below)
        self._put_back()
        # ``needs_admin``, kept in memory (the agent's view of its server asks at every
        # heartbeat; one Journal per process writes it): read once here.
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'needs_admin'").fetchone()
        self._needs_admin: str | None = str(row["value"]) if row and row["value"] else None
        # The transactions between their freeze and its end (``in_freeze_window``), as the
        # journal says once each record has committed: no idle checkpoint runs meanwhile. As
        # in memory, from the ``freeze`` step's begin (or ``again``) on, before the freeze
        # answered (``freeze_started_at``: a crash in between left the window unheld until the
        # transaction ended; session 73, leftovers).
        with self._read() as db:
            rows = db.execute(
                "SELECT rollout_id, kind FROM txns AS t WHERE outcome = ?"
                " AND freeze_ended_at IS NULL AND (freeze_started_at IS NOT NULL OR EXISTS ("
                "SELECT 1 FROM events AS e WHERE e.rollout_id = t.rollout_id"
                " AND e.kind = t.kind AND e.step = 'freeze' AND e.what IN ('begin', 'again')))",
                (_PENDING,),
            ).fetchall()
        self._frozen = {(str(r["rollout_id"]), str(r["kind"])) for r in rows}
        self._db.hold_checkpoint = self.in_freeze_window
        # (None if there is no -wal, not expected: only the file is looked at then.)
        with contextlib.suppress(OSError):
            self._wal_opened = _file_id(self._wal)

    def in_freeze_window(self) -> bool:
        """True while a transaction is between its freeze (its ``freeze`` step begun) and the
        freeze's end (``freeze_ended_at``) or its own: the managed server is frozen or
        restarting, and the journal's idle checkpoint (``tlsroll.sqlite.Database``: the
        ``-wal`` written into the file, both synced) waits for the record after it, not to
        compete with the config's and the records' syncs in the window (review s72
        leaderwrite). SQLite's own automatic checkpoint stays the bound of the ``-wal``."""
        return bool(self._frozen)

    @property
    def checkpoint_trouble(self) -> str | None:
        """Why the journal's last checkpoint failed (its disk full: ``Database``), until one
        succeeds; None while they work."""
        return self._db.checkpoint_trouble

    def on_checkpoint(self, listener: Callable[[BaseException | None], None]) -> None:
        """Tell ``listener`` (on the store's thread) of each checkpoint that ran: None, or
        the failure the disk caused (``Database.on_checkpoint``; the agent's ``StoreWatch``)."""
        self._db.on_checkpoint.append(listener)

    @property
    def checkpoints_held(self) -> int:
        """How many idle checkpoints waited for a freeze window's end (``in_freeze_window``)."""
        return self._db.checkpoints_held

    def _put_back(self) -> None:
        """A journal that is the copy kept before an upgrade (``mark_copy``), opened for the
        first time: said once (``journal.restored``), and remembered (``restored_copy_at``),
        with the transactions it shows unfinished, which are settled, never resumed
        (``restored_unfinished``; see the module docstring), in the same write. A freeze the
        copy says is owed is forgotten in it too."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'copy_made_at'").fetchone()
            if row is None:
                return
            self._set_meta(db, "restored_copy_at", row["value"])
            db.execute("DELETE FROM meta WHERE key = 'copy_made_at'")
            held = [
                [str(r["rollout_id"]), str(r["kind"]), str(r["phase"])]
                for r in db.execute(
                    "SELECT rollout_id, kind, phase FROM txns WHERE outcome = ? ORDER BY rowid",
                    (_PENDING,),
                )
            ]
            self._set_meta(db, "restored_unfinished", json.dumps(held))
            owed = db.execute("SELECT value FROM meta WHERE key = 'unfreeze_owed'").fetchone()
            self._set_meta(db, "unfreeze_owed", "")
        log.warning(
            "journal.restored",
            path=str(self.path),
            copy_made_at=row["value"],
            unfinished=[f"{k} of {r} at {p}" for r, k, p in held],
            unfreeze_owed_forgotten=(owed["value"] or None) if owed is not None else None,
            detail="this journal is the copy kept before an upgrade, put back: what the agent"
            " journalled since is not in it; a node switched since cannot be taken back to http"
            " by a rollback"
            + (
                "; the transactions it shows unfinished are not resumed: each is settled from"
                " what the server runs now"
                if held
                else ""
            ),
        )

    def restored_copy_at(self) -> dt.datetime | None:
        """When the copy this journal was put back from was made (``_put_back``), or None
        (also once the agent completed a transaction on it: ``complete``)."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'restored_copy_at'").fetchone()
        return None if row is None else dt.datetime.fromisoformat(row["value"])

    def restored_unfinished(self) -> set[tuple[str, str]]:
        """The transactions (rollout id, kind) that were unfinished in the copy put back and
        are not settled yet (``_put_back``, ``settle_restored``): never resumed."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'restored_unfinished'").fetchone()
        held = json.loads(row["value"]) if row is not None and row["value"] else []
        return {(str(r[0]), str(r[1])) for r in held}

    def settle_restored(
        self,
        txn: Txn,
        outcome: TxnOutcome,
        reason: str,
        ended_at: dt.datetime,
        *,
        live_tls: dict[str, str] | None = None,
        needs_admin: str = "",
    ) -> Txn:
        """One write: a transaction of a copy put back (``restored_unfinished``) settled as
        ``outcome`` (its terminal phase, ``reason``), no longer held; ``completed`` sets what
        is live to the transaction's (``live_tls``); ``needs_admin``: why the node needs the
        admin now (``needs_admin``)."""
        phase = {
            TxnOutcome.COMPLETED: Phase.COMPLETED,
            TxnOutcome.ROLLED_BACK: Phase.ROLLED_BACK,
            TxnOutcome.FAILED: Phase.FAILED,
        }[outcome]
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'restored_unfinished'").fetchone()
            held = json.loads(row["value"]) if row is not None and row["value"] else []
            rest = [r for r in held if (r[0], r[1]) != (txn.rollout_id, txn.kind.value)]
            self._set_meta(db, "restored_unfinished", json.dumps(rest))
            if outcome is TxnOutcome.COMPLETED:
                self._set_live_tls(db, live_tls)
            if needs_admin:
                self._set_meta(db, "needs_admin", needs_admin)
            self._event(db, txn, "settle", "restored", {"reason": reason})
            changes = {"phase": phase, "outcome": outcome, "reason": reason, "ended_at": ended_at}
            settled = self._update(db, txn, changes)
        if needs_admin:
            self._needs_admin = needs_admin
        return settled

    def needs_admin(self) -> str | None:
        """Why the node needs the admin (a transaction of a journal put back that what the
        server runs does not settle: ``settle_restored``), or None. From memory (any thread:
        no read of the file)."""
        return self._needs_admin

    def probe(self, *, busy: float | None = None) -> None:
        """A write that takes only where the journal can be written now (a full disk under it
        refuses it): the runner's look before a transaction resumed or restarted acts, and
        while one is held (``Runner._probe``); a read's while in doubt (``_read``). It records
        when, in ``meta``. ``busy``: the longest it waits for another process's lock on the
        file (``Database.tx``)."""
        with self._tx(busy=busy) as db:
            self._set_meta(db, "probed_at", dt.datetime.now(dt.UTC).isoformat())

    def clear_needs_admin(self) -> str | None:
        """The admin checked the node (``tlsroll-agent --journal-checked``): ``needs_admin``
        forgotten; returns what it was."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'needs_admin'").fetchone()
            db.execute("DELETE FROM meta WHERE key = 'needs_admin'")
        self._needs_admin = None
        return str(row["value"]) if row is not None and row["value"] else None

    def close(self) -> None:
        self._db.close()

    def _error(self, exc: sqlite3.Error, *, doubt: bool = False) -> JournalError:
        """``exc`` as the journal's error; one that may pass is ``JournalUnavailable``
        (``READ_TRANSIENT``, of a read or a write: session 74's L3), not a disk that could not
        read the file back (``tlsroll.sqlite.unreadable``: SQLITE_IOERR_READ, _SHORT_READ,
        ...), which the agent's start takes for damage (exit 4) and asking again does not mend
        (review s74 revsmall: the leader asked again without end, the node "unknown — agent
        unreachable"). ``doubt``: a failed COMMIT, whose message says that it may be kept
        (``JOURNAL_IN_DOUBT``)."""
        code = getattr(exc, "sqlite_errorname", None)
        error = JournalError
        told = f"journal {self.path}: {exc}" + (f" ({code})" if code else "")
        if (code or "").startswith(READ_TRANSIENT) and unreadable(exc) is None:
            if self._gone(code or ""):
                told = f"{told}; {JOURNAL_GONE}"
            else:
                error = JournalUnavailable
        return error(f"{told}; {JOURNAL_IN_DOUBT}" if doubt else told)

    def _gone(self, code: str) -> bool:
        """Whether the journal is no longer at its path (``JOURNAL_GONE``): SQLite said so
        (SQLITE_READONLY_DBMOVED), or the path names no file, or not the one opened. A look
        that fails otherwise (EACCES, EIO) says nothing: False. Found so, it is kept
        (``gone``)."""
        if code.startswith("SQLITE_READONLY_DBMOVED"):
            self._went("SQLite says its file moved or was deleted (SQLITE_READONLY_DBMOVED)")
            return True
        return self.look_gone() is not None

    def gone(self) -> str | None:
        """Why the journal is no longer where the agent opened it (``look_gone``, or an error
        that said so: ``_gone``), or None. From memory (any thread: no look at the file)."""
        return self._gone_why

    def look_gone(self) -> str | None:
        """(Blocking: up to two ``stat`` calls.) Why the journal is no longer where the agent
        opened it, or None: its path names no file, or another file than the one its
        connection holds; or so does the path of its ``-wal``. In WAL mode (the journal's)
        SQLite notices neither: reads, writes, their fsyncs and checkpoints go on into the
        files it holds, unlinked or moved, and what they wrote is lost at the next start
        (``JournalLost``), or, for a ``-wal`` deleted, at a crash (a clean stop still writes
        it into the file). Found once, it is kept (``gone``): lasting until the agent is
        restarted (the admin puts the journal back first; one moved back is the file held,
        but a restart is what the agent's words ask for, and no look is needed to trust it).
        The agent then begins nothing new (``create``, and the service's refusals and checks),
        says so (``journal.gone``, and its store trouble on the heartbeat), and lets a
        transaction already running finish: its records still go into the file held, which is
        what the server's safety needs now (never left frozen or half-switched). A look that
        fails otherwise (EACCES, EIO) says nothing. Looked at by the store's watch every
        heartbeat interval, by the checks, and by ``create`` before a new transaction."""
        if self._gone_why is not None:
            return self._gone_why
        looks = ((self.path, self._opened, "its file"), (self._wal, self._wal_opened, "its -wal"))
        for path, opened, what in looks:
            if opened is None:
                continue
            named = what if path == self.path else f"{what} {path}"
            try:
                now = _file_id(path)
            except (FileNotFoundError, NotADirectoryError):
                return self._went(f"{named} is no longer there")
            except OSError:
                continue
            if now != opened:
                return self._went(f"{named} is another file than the one opened")
        return None

    def _went(self, how: str) -> str:
        """Keep (once) and say why the journal is gone (``look_gone``); return it."""
        with self._gone_lock:
            if self._gone_why is not None:
                return self._gone_why
            self._gone_why = f"journal {self.path}: {how}; {JOURNAL_GONE}"
        log.warning(
            "journal.gone",
            path=str(self.path),
            found=how,
            hint="put the journal back where the agent opened it (the same file, moved back),"
            " then restart the agent; until then it begins no new switch, stage or rollback (one"
            " already running finishes); what it journals meanwhile may be lost at its restart"
            " (not once the same file is back: a -wal deleted is written into it by a clean stop)",
        )
        return self._gone_why

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read (``Database.read``); in doubt (``JOURNAL_IN_DOUBT``), a write first
        (``probe``), whose error is the read's (asked again). The doubt is looked at again
        under the store's lock, where a failed COMMIT sets it (``_commit_failed``): one that
        failed while this read waited for the lock is probed for too, not read past (it was
        looked at only before the lock, and set after the writer released it: session 75)."""
        mine = threading.get_ident()
        try:
            while True:
                if self._in_doubt and self._writing != mine:
                    self.probe(busy=PROBE_BUSY_SECONDS)
                with self._db.read() as db:
                    if not self._in_doubt or self._writing == mine:
                        yield db
                        return
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    @contextmanager
    def _tx(self, *, busy: float | None = None) -> Iterator[sqlite3.Connection]:
        """One write (``Database.tx``; ``busy``: its wait for another process's lock). The
        events it records (``_event``) are inserted at its end, in the order they were made,
        in one statement (``executemany``), before its commit: a switch's record inside the
        freeze window made one INSERT per event, two to four a record (session 73,
        journalcpu). A COMMIT that fails puts the journal in doubt (``_commit_failed``)."""
        committing = False
        try:
            with self._db.tx(busy=busy) as db:
                self._queued = []  # (under the store's lock: one write at a time)
                self._writing = threading.get_ident()
                changes = db.total_changes
                try:
                    yield db
                    if self._queued:
                        db.executemany(_INSERT_EVENT, self._queued)
                    if self._in_doubt and db.total_changes != changes:
                        self._db.after_commit(self._settled)
                    self._db.if_failed(self._commit_failed)  # (last: only the COMMIT is left)
                finally:
                    self._writing = None
                committing = True  # (what fails from here on is the COMMIT)
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorname", None) or ""
            doubt = committing and not code.startswith(COMMIT_NOT_WRITTEN)
            raise self._error(exc, doubt=doubt) from exc

    def _commit_failed(self, exc: BaseException) -> None:
        """(A COMMIT failed, under the store's lock.) In doubt (``JOURNAL_IN_DOUBT``) unless
        it wrote no commit frame (``COMMIT_NOT_WRITTEN``); set before the lock is released, so
        that no read (``_read``) answers from before the failed write in between."""
        code = getattr(exc, "sqlite_errorname", None) or ""
        if isinstance(exc, sqlite3.Error) and not code.startswith(COMMIT_NOT_WRITTEN):
            self._in_doubt = True

    def _settled(self) -> None:
        """(After a COMMIT, under the store's lock.) A write that changed a row was kept: its
        frames took the place of a failed COMMIT's, no longer replayed (``JOURNAL_IN_DOUBT``).
        Not one that changed none (``admit_epoch`` of the epoch held, ``end_way_back`` with no
        way back open): its COMMIT writes no frame (review s74 revdoubt)."""
        self._in_doubt = False

    # --- epochs -------------------------------------------------------------------------------

    def highest_epoch(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        return int(row["value"]) if row else 0

    def admit_epoch(self, epoch: int) -> int | None:
        """Record ``epoch`` if it is not older than any seen; return the higher one if it is."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            highest = int(row["value"]) if row else 0
            if epoch < highest:
                return highest
            if epoch == highest:  # every command of a rollout carries it: no write, no fsync
                return None
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(epoch),),
            )
        return None

    # --- what is live -------------------------------------------------------------------------

    def live_tls(self) -> dict[str, str] | None:
        """The https files and address live on the server (from the last completed
        transaction), or None while it serves http."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'live_tls'").fetchone()
        return _live_tls(row)

    @staticmethod
    def _set_live_tls(db: sqlite3.Connection, live: dict[str, str] | None) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('live_tls', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (json.dumps(live, sort_keys=True),),
        )

    # --- the scope freeze lease ----------------------------------------------------------------

    def freeze_lease(self) -> Lease | None:
        """The lease of the leader's scope freeze, if one holds (its wall-clock end decides
        nothing alone: ``nodeagent.lease``)."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'freeze_lease'").fetchone()
        if row is None or not row["value"]:
            return None
        value = json.loads(row["value"])
        if len(value) == 3:  # written by the build before the boot-time end (``_V5``)
            value += [None, None]
        rollout_id, until, seconds, boot_id, boot_until = value
        return Lease(
            str(rollout_id),
            dt.datetime.fromisoformat(until),
            None if seconds is None else float(seconds),
            None if boot_id is None else Boot(str(boot_id), float(boot_until)),
        )

    def set_freeze_lease(self, lease: Lease | None) -> None:
        value = ""
        if lease is not None:
            boot_id, boot_until = lease.boot if lease.boot is not None else (None, None)
            value = json.dumps(
                [lease.rollout_id, lease.until.isoformat(), lease.seconds, boot_id, boot_until]
            )
        with self._tx() as db:
            self._set_meta(db, "freeze_lease", value)

    # --- a freeze a failed transaction could not lift yet ----------------------------------------

    def unfreeze_owed(self) -> str | None:
        """The rollout whose failed transaction left the server frozen, if one did: the runner
        keeps trying to lift it (see ``nodeagent.transaction``)."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'unfreeze_owed'").fetchone()
        return str(row["value"]) if row and row["value"] else None

    def set_unfreeze_owed(self, rollout_id: str | None) -> None:
        with self._tx() as db:
            self._set_meta(db, "unfreeze_owed", rollout_id or "")

    def removed_from_cluster(self) -> str | None:
        """Why the leader last refused this node as no longer in the cluster (removed, or its
        certificate revoked), None if it has answered it since, or never refused it
        (``set_removed_from_cluster``)."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'removed_from_cluster'").fetchone()
        return str(row["value"]) if row and row["value"] else None

    def set_removed_from_cluster(self, why: str | None) -> None:
        """Kept across the agent's restarts (``nodeagent.bootstrap_supervisor.BootstrapHost``):
        an agent started again while the leader cannot be reached still takes no workstation
        password until the leader answers it (review s45rev8 L1). A meta key, which a journal
        of an older agent keeps and ignores."""
        with self._tx() as db:
            self._set_meta(db, "removed_from_cluster", why or "")

    @staticmethod
    def _set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- failed bootstrap passwords -------------------------------------------------------------

    def bootstrap_failures(self) -> tuple[list[float], list[FailureCount]]:
        """The failed passwords an earlier run of the agent counted: the times (Unix seconds,
        oldest first) that still count against the node's ceiling, and those not yet reported
        to the leader (``nodeagent.bootstrap_supervisor``)."""
        with self._read() as db:
            times = [float(r["at"]) for r in db.execute("SELECT at FROM bootstrap_failures")]
            rows = db.execute(
                "SELECT source, workstation, count, last_at FROM bootstrap_unreported"
                " ORDER BY last_at"
            ).fetchall()
        unreported = [
            FailureCount(
                r["source"],
                r["workstation"],
                int(r["count"]),
                dt.datetime.fromisoformat(r["last_at"]),
            )
            for r in rows
        ]
        return sorted(times), unreported

    def record_bootstrap_failure(
        self, at: float | None, unreported: Sequence[FailureCount], *, keep: int, window: float
    ) -> None:
        """One write: a failure counted at ``at`` (Unix seconds; None: only ``unreported``
        changed, the leader took some), the ``keep`` newest of the last ``window`` seconds
        kept, and the failures not yet reported replaced by ``unreported``. Times more than
        ``FUTURE_SLACK`` after ``at`` (the agent's now) are dropped: counted while the clock was
        ahead, they would push out the real ones and count for a day after each restart (s34
        review L3)."""
        with self._tx() as db:
            if at is not None:
                db.execute("DELETE FROM bootstrap_failures WHERE at > ?", (at + FUTURE_SLACK,))
                db.execute("INSERT INTO bootstrap_failures (at) VALUES (?)", (at,))
                db.execute("DELETE FROM bootstrap_failures WHERE at <= ?", (at - window,))
                db.execute(
                    "DELETE FROM bootstrap_failures WHERE rowid NOT IN"
                    " (SELECT rowid FROM bootstrap_failures ORDER BY at DESC LIMIT ?)",
                    (keep,),
                )
            db.execute("DELETE FROM bootstrap_unreported")
            db.executemany(
                "INSERT INTO bootstrap_unreported (source, workstation, count, last_at)"
                " VALUES (?, ?, ?, ?)",
                [(f.source, f.workstation, f.count, f.last_at.isoformat()) for f in unreported],
            )

    # --- staged certificates ------------------------------------------------------------------

    def staged(self, rollout_id: str) -> Staged | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM staged WHERE rollout_id = ?", (rollout_id,)).fetchone()
        return _staged(row)

    def record_csr(self, rollout_id: str, key_file: Path, csr_pem: bytes) -> list[Staged]:
        """The rollout's new key, journalled. In the same write, the stages this one ends are
        forgotten and returned (the caller removes their files: ``plans.remove_stages``). One
        rollout runs at a time per cluster (the leader's store refuses a second), so a
        rollout whose key is made here has ended every earlier one: a stage of an earlier
        rollout that never began a transaction on this node (stopped between Stage and
        Switch: aborted, failed, superseded, its leader gone) will never be switched, and its
        key, certificate and verifier file would otherwise stay for good. A rollout with any
        transaction here keeps its stage: its files may be live, or what a rollback
        restores."""
        with self._tx() as db:
            over = db.execute(_STAGES_OVER, (rollout_id,)).fetchall()
            if over:
                db.execute(
                    "DELETE FROM staged WHERE rollout_id != ?"
                    " AND rollout_id NOT IN (SELECT rollout_id FROM txns)",
                    (rollout_id,),
                )
            db.execute(
                "INSERT INTO staged (rollout_id, key_file, csr_pem) VALUES (?, ?, ?)",
                (rollout_id, str(key_file), csr_pem.decode()),
            )
        return [s for s in map(_staged, over) if s is not None]

    def heartbeat_facts(self, limit: int = 64) -> tuple[int, list[str]]:
        """What a heartbeat reports from the journal, in one read: the highest epoch seen, and
        the rollouts (at most ``limit``) whose stage it keeps with no transaction of theirs
        begun here, sorted, after the rollout whose switch's way back is open
        (``stage_needs``' ``way_back``), if one is: ``HeartbeatRequest.unswitched_stages``,
        the leader says which of them have ended (``forget_stages``, ``end_way_back``)."""
        with self._read() as db:
            db.execute("BEGIN")
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
                rows = db.execute(_UNSWITCHED, (limit,)).fetchall()
                open_back = _open_way_back(db)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        ids = [str(r["rollout_id"]) for r in rows]
        if open_back is not None and limit > 0:
            ids = [str(open_back["rollout_id"]), *ids[: limit - 1]]
        return (int(row["value"]) if row else 0), ids

    def stage_needs(self) -> StageNeeds:
        """What the stage directories are still needed for (``StageNeeds``), in one read
        (``plans.sweep_stage_dirs``)."""
        with self._read() as db:
            db.execute("BEGIN")
            try:
                staged = db.execute(
                    "SELECT rollout_id FROM staged"
                    " WHERE rollout_id NOT IN (SELECT rollout_id FROM txns)"
                ).fetchall()
                known = db.execute(
                    "SELECT rollout_id FROM staged UNION SELECT rollout_id FROM txns"
                ).fetchall()
                live = db.execute("SELECT value FROM meta WHERE key = 'live_tls'").fetchone()
                unfinished = db.execute(
                    "SELECT plan, target_config, source_config FROM txns WHERE outcome = ?",
                    (_PENDING,),
                ).fetchall()
                newest = db.execute(_NEWEST_TXN).fetchone()
                open_back = _open_way_back(db)
                # What `tlsroll rollout rollback` (disable-tls) restores: the source of the
                # newest switch from http (``plans.switch_to_undo``), an http config as a rule.
                from_http = db.execute(
                    _NEWEST_FROM_HTTP.format(columns="plan, source_config"), _SWITCH_DONE
                ).fetchone()
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        files = _plan_files({"live_tls": _live_tls(live)}, "live_tls")
        configs: list[bytes] = []
        for row in unfinished:
            files |= _plan_files(json.loads(row["plan"]), "live_tls", "live_before", "ca_file")
            configs += [row["target_config"], row["source_config"]]
        if newest is not None and newest["outcome"] == TxnOutcome.FAILED.value:
            files |= _plan_files(json.loads(newest["plan"]), "live_tls", "live_before", "ca_file")
            configs += [newest["target_config"], newest["source_config"]]
        # With what each way back restores, the CA it checks that with: a way back that fails
        # restores its switch's target and verifies it against the plan's ``ca_file`` (the way
        # back to http's first switch's CA: review s59 H1, the sweep removed it after a
        # rotation, and a way back to http that had to go back ended failed, not rolled back).
        # A CA certificate is public: keeping it costs nothing.
        if open_back is not None:
            files |= _plan_files(json.loads(open_back["plan"]), "live_before", "ca_file")
            configs.append(open_back["source_config"])
        serving_tls = bool(_live_tls(live))  # (on http, no way back to http is to come)
        if from_http is not None:
            plan = json.loads(from_http["plan"])
            files |= _plan_files(plan, "live_before", *(("ca_file",) if serving_tls else ()))
            configs.append(from_http["source_config"])
        return StageNeeds(
            staged=frozenset(str(r["rollout_id"]) for r in staged),
            files=frozenset(files),
            configs=tuple(bytes(c) for c in configs if c is not None),
            way_back=str(open_back["rollout_id"]) if open_back is not None else None,
            known=frozenset(str(r["rollout_id"]) for r in known),
        )

    def end_way_back(self, rollout_ids: Sequence[str]) -> str | None:
        """The leader says ``rollout_ids`` have ended (``HeartbeatResponse.ended_stages``):
        if the newest switch's way back is open (``_open_way_back``) and its rollout is among
        them, it is closed, for good (an ended rollout sends no more commands), and its
        rollout returned; else None, and nothing is written."""
        with self._tx() as db:
            row = _open_way_back(db)
            if row is None or row["rollout_id"] not in rollout_ids:
                return None
            self._set_meta(db, "way_back_ended", str(row["rollout_id"]))
        return str(row["rollout_id"])

    def forget_stages(self, rollout_ids: Sequence[str]) -> list[Staged]:
        """The stages of ``rollout_ids`` (rollouts the leader says have ended) forgotten and
        returned, in one write (the caller removes their files: ``plans.remove_stages``); a
        rollout with a transaction here keeps its stage (it began a switch after the leader
        looked, or its files are what a rollback restores), as in ``record_csr``."""
        ids = list(dict.fromkeys(rollout_ids))
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))  # placeholders only: the ids are parameters
        where = f"rollout_id IN ({marks}) AND rollout_id NOT IN (SELECT rollout_id FROM txns)"  # noqa: S608
        with self._tx() as db:
            over = db.execute(f"SELECT * FROM staged WHERE {where}", ids).fetchall()  # noqa: S608
            if over:
                db.execute(f"DELETE FROM staged WHERE {where}", ids)  # noqa: S608
        return [s for s in map(_staged, over) if s is not None]

    def known_rollouts(self) -> set[str]:
        """Every rollout the journal has a stage or a transaction of
        (``plans.drop_unjournalled_verifier``: a directory of one is never a switch's that
        was not journalled)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT rollout_id FROM staged UNION SELECT rollout_id FROM txns"
            ).fetchall()
        return {str(r["rollout_id"]) for r in rows}

    def record_stage(
        self,
        rollout_id: str,
        cert_file: Path,
        ca_file: Path,
        fingerprint: str,
        not_after: dt.datetime,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE staged SET cert_file = ?, ca_file = ?, fingerprint = ?, not_after = ?"
                " WHERE rollout_id = ?",
                (str(cert_file), str(ca_file), fingerprint, not_after.isoformat(), rollout_id),
            )

    # --- transactions -------------------------------------------------------------------------

    def get(self, rollout_id: str, kind: str) -> Txn | None:
        """The transaction of ``kind`` (a ``TxnKind``) for ``rollout_id``, if there is one."""
        with self._read() as db:
            row = db.execute(
                "SELECT * FROM txns WHERE rollout_id = ? AND kind = ?",
                (rollout_id, TxnKind(kind).value),
            ).fetchone()
        return _txn(row, self.path) if row else None

    def newest_switch_from_http(self) -> Txn | None:
        """The newest completed switch that took this node from http to https, in the order
        the journal wrote them (never by ``started_at``: after a clock stepped back, a newer
        switch has the earlier time), or None. Reads the switches newest first and stops at
        that one (``_NEWEST_FROM_HTTP``): the way back to http asks on its path, and every
        completed switch, configs and all, was read and sorted for it."""
        with self._read() as db:
            row = db.execute(_NEWEST_FROM_HTTP.format(columns="*"), _SWITCH_DONE).fetchone()
        return _txn(row, self.path) if row is not None else None

    def configs_after(self, txn: Txn) -> list[tuple[TxnOutcome, bytes | None, bytes | None]]:
        """Each transaction begun after ``txn`` (one runs at a time: each found the config the
        one before it left, ``plans.edited_since``): its outcome, the config it found and the
        one it wrote, in the order the journal wrote them (by ``rowid``, never deleted from:
        not by ``started_at``, which a clock stepped back puts before ``txn``; review of
        s59-wayback L4). Those three columns only: the way back's plan reads them, and the
        journal is never pruned (L1)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT outcome, source_config, target_config FROM txns WHERE rowid >"
                " (SELECT rowid FROM txns WHERE rollout_id = ? AND kind = ?) ORDER BY rowid",
                (txn.rollout_id, TxnKind(txn.kind).value),
            ).fetchall()
        return [
            (_dec("outcome", r["outcome"]), r["source_config"], r["target_config"]) for r in rows
        ]

    def unfinished(self) -> list[Txn]:
        """The transactions not ended, in the order they began (the journal's: the runner
        resumes them in it; one runs at a time, so more than one is a journal of an earlier
        release, or a copy put back)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM txns WHERE outcome = ? ORDER BY rowid", (_PENDING,)
            ).fetchall()
        return [_txn(r, self.path) for r in rows]

    def outlook(self, rollout_id: str, kind: str) -> Outlook:
        """``get``, the first of ``unfinished``, ``live_tls`` and ``staged`` in one read
        transaction (three statements): a switch's create read them one by one, four reads
        on the store's thread before its freeze call could go out (issue 15)."""
        key = (rollout_id, TxnKind(kind).value)
        with self._read() as db:
            db.execute("BEGIN")
            try:
                rows = db.execute(
                    "SELECT * FROM txns WHERE outcome = ? OR (rollout_id = ? AND kind = ?)"
                    " ORDER BY rowid",
                    (_PENDING, *key),
                ).fetchall()
                live = db.execute("SELECT value FROM meta WHERE key = 'live_tls'").fetchone()
                staged = db.execute(
                    "SELECT * FROM staged WHERE rollout_id = ?", (rollout_id,)
                ).fetchone()
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        existing = next((r for r in rows if (r["rollout_id"], r["kind"]) == key), None)
        running = next((r for r in rows if r["outcome"] == _PENDING), None)
        return Outlook(
            existing=_txn(existing, self.path) if existing is not None else None,
            running=_txn(running, self.path) if running is not None else None,
            live_tls=_live_tls(live),
            staged=_staged(staged),
        )

    def create(self, txn: Txn, *, begin: str | None = None) -> Txn:
        """Insert a new transaction, or return the existing one with the same key (a replay).
        ``begin``: the first step, whose ``begin`` event goes in the same write. A new one is
        refused (``JournalError``, nothing written) while the journal is not where the agent
        opened it (``look_gone``, looked at first); a replay is answered all the same."""
        gone = self.look_gone()
        with self._tx() as db:
            # The row is inserted unless one has its key, then read only if it had (a
            # replay): no read of the row before every insert (session 73, journalcpu).
            inserted = db.execute(_INSERT_TXN, [_enc(n, getattr(txn, n)) for n in _TXN_FIELDS])
            if inserted.rowcount == 0:
                row = db.execute(
                    "SELECT * FROM txns WHERE rollout_id = ? AND kind = ?",
                    (txn.rollout_id, txn.kind.value),
                ).fetchone()
                return _txn(row, self.path)
            if gone is not None:  # (rolled back: nothing begun)
                raise JournalError(gone)
            self._event(db, txn, "create", "end", {})
            self._begin(db, txn, begin)
        return txn

    def update(
        self,
        txn: Txn,
        *,
        begin: str | None = None,
        passed: Passed | None = None,
        **changes: Any,
    ) -> Txn:
        """Record what a step changed (``phase`` and what it found; never the plan). ``begin``:
        the next step, whose ``begin`` event goes in the same write (one write per step).
        ``passed``: the step before, not journalled yet, recorded first in the same write (its
        changes and this step's in one UPDATE of the row: ``_passed``)."""
        with self._tx() as db:
            txn, carried = self._passed(db, txn, passed)
            new = self._update(db, txn, changes, carried=carried)
            self._begin(db, new, begin)
            return new

    def fail(
        self,
        txn: Txn,
        step: str,
        error: str,
        *,
        unfreeze_owed: bool = False,
        begin: str | None = None,
        passed: Passed | None = None,
        **changes: Any,
    ) -> Txn:
        """Record, in one write, that ``step`` failed (its ``error`` event) and where that leaves
        the transaction: a crash cannot separate the two. ``unfreeze_owed``: the transaction
        ends with the server still frozen (see ``unfreeze_owed``). ``begin`` and ``passed`` as
        for ``update``."""
        with self._tx() as db:
            txn, carried = self._passed(db, txn, passed)
            self._event(db, txn, step, "error", {"reason": error})
            if unfreeze_owed:
                self._set_meta(db, "unfreeze_owed", txn.rollout_id)
            new = self._update(db, txn, changes, carried=carried)
            self._begin(db, new, begin)
            return new

    def complete(self, txn: Txn, live_tls: dict[str, str] | None, **changes: Any) -> Txn:
        """Record, in one write, the transaction's last step and what is now live on the server
        (see ``live_tls``)."""
        with self._tx() as db:
            self._set_live_tls(db, live_tls)
            # A journal put back: from its first transaction completed on, a switch missing
            # from it is no longer explained by the copy (review s40 L-e).
            db.execute("DELETE FROM meta WHERE key = 'restored_copy_at'")
            return self._update(db, txn, changes)

    def _begin(
        self, db: sqlite3.Connection, txn: Txn, step: str | None, at: dt.datetime | None = None
    ) -> None:
        if step is not None:
            self._event(db, txn, step, "begin", {}, at)

    def _passed(
        self, db: sqlite3.Connection, txn: Txn, passed: Passed | None
    ) -> tuple[Txn, dict[str, Any]]:
        """The record of a step that ended before the one being written (``Passed``: a
        switch's restart, ``Runner._defers``): its phase's ``end`` and the ``begin`` of the step
        after it, stamped when it ended, in the same write; returned: the transaction as it
        left it, and its changes, which the write's own UPDATE of the row carries (``_update``'s
        ``carried``: one UPDATE, not two, inside the freeze window; session 73)."""
        if passed is None:
            return txn, {}
        changes = dict(passed.changes)
        new = self._changed(txn, changes)
        self._ended(db, new, changes, passed.at)
        self._begin(db, new, passed.begin, passed.at)
        return new, changes

    def last_begun(self, txn: Txn) -> str | None:
        """The step whose ``begin`` is this transaction's last event, if it is one: begun (or
        about to be) and not finished when the agent stopped. A runner that resumes does not
        journal that ``begin`` again. (A ``freeze again`` of ``Runner._refreeze`` comes after
        that ``begin`` and does not count: the step is still the one begun.)"""
        with self._read() as db:
            row = db.execute(
                "SELECT step, what FROM events WHERE rollout_id = ? AND kind = ?"
                " AND what != 'again' ORDER BY seq DESC LIMIT 1",
                (txn.rollout_id, txn.kind.value),
            ).fetchone()
        return str(row["step"]) if row is not None and row["what"] == "begin" else None

    def refreeze_pending(self, txn: Txn) -> bool:
        """True if the runner journalled that it freezes the server again (``Runner._refreeze``:
        the event ``freeze again``, written before the freeze call) and no record of a phase
        came after: the freeze may have been made, its watermark is not journalled."""
        with self._read() as db:
            row = db.execute(
                "SELECT what FROM events WHERE rollout_id = ? AND kind = ?"
                " AND (what = 'end' OR (step = 'freeze' AND what = 'again'))"
                " ORDER BY seq DESC LIMIT 1",
                (txn.rollout_id, txn.kind.value),
            ).fetchone()
        return row is not None and row["what"] == "again"

    def _update(
        self,
        db: sqlite3.Connection,
        txn: Txn,
        changes: dict[str, Any],
        at: dt.datetime | None = None,
        *,
        carried: dict[str, Any] | None = None,
    ) -> Txn:
        """The row updated with ``changes`` (its phase's ``end`` event if the phase or the
        outcome changed); ``carried``: the changes of a step recorded before in this write
        (``_passed``), written in the same UPDATE (``changes`` win where both name a field)."""
        new = self._changed(txn, changes)
        written = {**carried, **changes} if carried else changes
        sets = ", ".join(f"{k} = ?" for k in written)
        db.execute(
            f"UPDATE txns SET {sets} WHERE rollout_id = ? AND kind = ?",  # noqa: S608 - names are dataclass fields
            [*(_enc(k, v) for k, v in written.items()), txn.rollout_id, txn.kind.value],
        )
        self._ended(db, new, changes, at)
        key = (txn.rollout_id, txn.kind.value)
        if new.freeze_ended_at is not None or new.finished:
            self._db.after_commit(lambda: self._frozen.discard(key))
        elif new.freeze_started_at is not None:
            # In the window as the row says it (as ``__init__`` reads it): also for a freeze
            # whose ``begin`` was journalled by the agent before a crash, resumed without it
            # (``last_begun``), which opened no window in this one (review s73 revjournal).
            self._db.after_commit(lambda: self._frozen.add(key))
        return new

    @staticmethod
    def _changed(txn: Txn, changes: dict[str, Any]) -> Txn:
        if "plan" in changes:
            raise ValueError("a transaction's plan is fixed when it starts")
        return replace(txn, **changes)  # TypeError for a name that is not a field

    def _ended(
        self, db: sqlite3.Connection, new: Txn, changes: dict[str, Any], at: dt.datetime | None
    ) -> None:
        """The ``end`` event of ``new``'s phase, if ``changes`` moved the phase or outcome."""
        if "phase" in changes or "outcome" in changes:
            detail = {"outcome": new.outcome.value} if new.finished else {}
            self._event(db, new, new.phase, "end", detail, at)

    def event(self, txn: Txn, step: str, what: str, detail: dict[str, Any] | None = None) -> None:
        with self._tx() as db:
            self._event(db, txn, step, what, detail or {})

    def _event(
        self,
        _db: sqlite3.Connection,
        txn: Txn,
        step: str,
        what: str,
        detail: dict[str, Any],
        at: dt.datetime | None = None,
    ) -> None:
        """Queue the event for the write under way (``_tx`` inserts them before its commit),
        stamped now (or ``at``). Outside such a write (in this thread): RuntimeError, a bug;
        the event would have been dropped silently by the next write's start, or gone into
        another thread's write (session 73's L)."""
        if self._writing != threading.get_ident():
            raise RuntimeError("Journal._event is only for inside a write (Journal._tx)")
        if str(step) == "freeze" and what in ("begin", "again"):  # (before the freeze call)
            key = (txn.rollout_id, txn.kind.value)
            self._db.after_commit(lambda: self._frozen.add(key))
        self._queued.append(
            (
                (at or dt.datetime.now(dt.UTC)).isoformat(),
                txn.rollout_id,
                txn.kind.value,
                str(step),
                what,
                json.dumps(detail, sort_keys=True) if detail else _NO_DETAIL,
            )
        )

    def events(self, rollout_id: str) -> list[dict[str, Any]]:
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM events WHERE rollout_id = ? ORDER BY seq", (rollout_id,)
            ).fetchall()
        return [dict(r) for r in rows]


def _file_id(path: Path) -> tuple[int, int]:
    """The file at ``path``: its device and inode (OSError if none is there)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _txn(row: sqlite3.Row, path: Path) -> Txn:
    """The transaction of ``row`` of the journal at ``path``. A row the agent cannot read (a
    phase, kind or outcome it does not know, a plan that is not JSON, a time that is not one:
    an edit by hand, a bit flipped that ``quick_check`` does not see) is a damaged journal
    (``JournalLost``: one line naming the file, the row and what is wrong, exit 4), never an
    "internal error" with no file named, started again for ever (session 68)."""
    try:
        return Txn(**{f.name: _dec(f.name, row[f.name]) for f in fields(Txn)})
    except (ValueError, TypeError) as exc:  # (json.JSONDecodeError is a ValueError)
        raise JournalLost(f"journal {path}: {_damaged_row(row, exc)}; {recovery()}") from None


def _damaged_row(row: sqlite3.Row, exc: Exception) -> str:
    """How a row ``_txn`` cannot read is said (as ``damage`` says a problem)."""
    what = f"{row['kind']!s:.20} of rollout {row['rollout_id']!s:.64}"
    return f"damaged (the transaction {what}: {exc!s:.200})"


def _live_tls(row: sqlite3.Row | None) -> dict[str, str] | None:
    value = json.loads(row["value"]) if row else None
    return value if isinstance(value, dict) else None


def _staged(row: sqlite3.Row | None) -> Staged | None:
    if row is None:
        return None
    return Staged(
        rollout_id=row["rollout_id"],
        key_file=Path(row["key_file"]),
        csr_pem=row["csr_pem"].encode(),
        cert_file=Path(row["cert_file"]) if row["cert_file"] else None,
        ca_file=Path(row["ca_file"]) if row["ca_file"] else None,
        fingerprint=row["fingerprint"],
        not_after=_dec("started_at", row["not_after"]),
    )
