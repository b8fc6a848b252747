"""The reference server's durable state: the entries, the freeze flag and the count of wrong
passwords at its login, in one SQLite file.

``entries.sqlite3`` is in WAL mode with ``synchronous=FULL``: a commit returns only after the
WAL is fsync'ed, so an acknowledged entry, and a freeze or unfreeze answered, survive a crash or
power loss. ``seq`` is an AUTOINCREMENT key, so it only grows and is never reused: the
*watermark* (the last committed seq, 0 for none) tells whether anything was written between two
points in time. The freeze flag is one row of table ``freeze``: saving it is one commit (one
WAL fsync). It used to be ``state.json`` (written atomically: two fsyncs and a rename, twice per
switch); a ``state.json`` left by an older release is taken over at start-up, then removed.

The wrong passwords at the server's ``/login`` (the client password) are one row of table
``login_failures``: how many, when the first and the latest were. The count goes on across
restarts (every switch and every change-password rollout restarts the server: the moment
someone guessing it matters most); it starts at 0 with a new data dir, or with the first
start of this release on an older one (migration 3 adds the table and no row: an older
release may run on the file, counting nothing, ``IGNORABLE``). The server saves it at most
once a second (``refserver.server.LOGIN_FAILURES_SAVE_SECONDS``), not one commit per guess.
A file of schema 2 that cannot be written at start (a read-only file system) is used as it is,
as the older release did: without the table, the count is kept in memory only
(``keeps_login_failures``; a save fails with ``LoginFailuresNotKept``), until a start that can
write the file migrates it.

The times of the wrong passwords that still count against the server's daily ceiling
(``login_ceiling``) are the rows of table ``login_ceiling`` (Unix seconds; at most the ceiling's
number, none older than a day), saved with the count: the ceiling went on from where it was
across a restart (review s66 M1: every switch, change-password rollout and reboot gave a guesser
a fresh day's allowance), as the agent's journal keeps its bootstrap service's. Migration 4
adds the table and no row; an older release ignores it (``IGNORABLE``), and a file opened as it
is at schema 3 keeps them in memory only.

All methods are blocking and thread-safe: the server calls them from worker threads, except
``watermark`` (one indexed read, which WAL lets no writer block: on its event loop). Writes are
serialised by one lock on one connection; reads use a small pool of read-only connections, so
they are served while a write commits. A write that fails reopens the writing connection before
the next one: a file SQLite had to open read-only (say, its file system was read-only at
start-up) is written again once it can be.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlsroll.errors import TerminalError
from tlsroll.fsutil import PRIVATE, fsync_dir
from tlsroll.sqlite import Migration, make_private, migrate

DB_NAME = "entries.sqlite3"
STATE_NAME = "state.json"

# Migration 1: the table of tlsroll 0.1.0 (which left user_version at 0).
_V1 = """
CREATE TABLE IF NOT EXISTS entries (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL UNIQUE,
    body       TEXT    NOT NULL,
    created_at TEXT    NOT NULL
)
"""

# Migration 2: the freeze flag (it was state.json before).
_V2 = """
CREATE TABLE freeze (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    frozen INTEGER NOT NULL CHECK (frozen IN (0, 1)),
    since  TEXT
)
"""

# Migration 3: the wrong passwords at the login, kept across restarts (s50). No row until the
# first one: a file without it counts none.
_V3 = """
CREATE TABLE login_failures (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    count    INTEGER NOT NULL CHECK (count >= 0),
    first_at TEXT,
    last_at  TEXT
)
"""

# Migration 4: the times of the wrong passwords that count against the daily ceiling (s66). No
# row until the first one: a file without them has a ceiling with nothing used.
_V4 = """
CREATE TABLE login_ceiling (at REAL NOT NULL)
"""

# The schema of entries.sqlite3: append a migration to change it (see tlsroll.sqlite).
MIGRATIONS: tuple[Migration, ...] = (
    _V1,  # 0.1.0
    _V2,  # issue 15
    _V3,  # s50: login failures survive restarts
    _V4,  # s66: and the ceiling they count against
)
# Migrations an older release may ignore (``tlsroll.sqlite.migrate``): 3 and 4 only add tables
# this code copes without rows of (an older server counts its failures in memory only).
IGNORABLE: frozenset[int] = frozenset({3, 4})
# The schema that has table login_failures, and the one that has table login_ceiling.
LOGIN_FAILURES_SCHEMA = 3
LOGIN_CEILING_SCHEMA = 4
# The lowest schema of entries.sqlite3 that only builds reading ``readable_by`` wrote
# (``tlsroll.sqlite.migrate``'s ``reads_floor_from``): schema 2 (the freeze row, 2026-11-30)
# was written by builds before that code (commit 096a57d, 2026-12-03) too, so the upgrade from
# 2 to 3 still keeps its copy; a later migration ignorable by a file of schema 3 or above will
# not need one.
READS_FLOOR_FROM = 3
# What the server does on a file it could not migrate (read-only at start): the warning's words.
WITHOUT_LOGIN_FAILURES = (
    "the wrong passwords at the login are counted in memory only (not kept across restarts)"
)


class LoginFailuresNotKept(TerminalError, sqlite3.OperationalError):
    """A save of the count of wrong passwords on a file without its table (not migrated: it
    could not be written at start). Terminal (asking again finds the same file) and a
    ``sqlite3.OperationalError``, as the save's other failures are (the server's save task
    logs them alike)."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / DB_NAME
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._reopen = False  # the last write failed: reopen the writer before the next one
        # Set when the file system is read-only at start: SQLite then opens the file read-only,
        # reads are served and every write fails (until the file can be written: see above).
        self.read_only = False
        try:
            make_private(self.path)  # 0600, and so its -wal and -shm
        except OSError as exc:
            if exc.errno != errno.EROFS or stat.S_IMODE(self.path.stat().st_mode) != PRIVATE:
                raise
            self.read_only = True
        self._writer = self._connect_writer()
        try:
            # before WAL: a refused file stays. One that cannot be written is used as it is
            # if what it lacks is the login_failures table only.
            self.version = migrate(
                self._writer,
                self.path,
                MIGRATIONS,
                ignorable=IGNORABLE,
                reads_floor_from=READS_FLOOR_FROM,
                read_only_as_is=WITHOUT_LOGIN_FAILURES,
            )
            # False on a file of schema 2 used as it is: the count is kept in memory only.
            self.keeps_login_failures = self.version >= LOGIN_FAILURES_SCHEMA
            mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
        except BaseException:
            self._writer.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """One ``BEGIN IMMEDIATE`` … ``COMMIT`` on the writer, under the write lock."""
        with self._write_lock:
            if self._reopen:
                self._writer.close()
                self._writer = self._connect_writer()
                self._reopen = False
            cur = self._writer.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                # A full disk may have rolled it back already: a ROLLBACK then fails with "no
                # transaction is active" and hides the error that matters.
                if self._writer.in_transaction:
                    cur.execute("ROLLBACK")
                self._reopen = True
                raise

    def insert(self, body: dict[str, Any]) -> tuple[str, int]:
        """Commit one entry durably; return its ``(id, seq)``."""
        entry_id = uuid.uuid4().hex
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO entries (id, body, created_at) VALUES (?, ?, ?)",
                (entry_id, text, now_iso()),
            )
            seq = cur.lastrowid
        assert seq is not None
        return entry_id, seq

    def save_freeze(
        self, frozen: bool, since: str | None = None, *, read_watermark: bool = False
    ) -> tuple[FreezeState, int | None]:
        """Persist the freeze flag in one commit; ``since`` keeps the start of an ongoing freeze
        (default: now). With ``read_watermark``, the watermark is read in the same transaction
        (no write can commit between the two)."""
        state = FreezeState(frozen=frozen, since=(since or now_iso()) if frozen else None)
        mark = None
        with self._transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO freeze (id, frozen, since) VALUES (1, ?, ?)",
                (int(state.frozen), state.since),
            )
            if read_watermark:
                mark = int(cur.execute("SELECT COALESCE(MAX(seq), 0) FROM entries").fetchone()[0])
        return state, mark

    def load_freeze(self) -> FreezeState:
        """The persisted flag (not frozen if none was ever saved). A ``state.json`` of an older
        release is taken over first: saved here, then removed; if that fails, its flag is the
        one used (and ``problem`` says why)."""
        legacy = self.path.parent / STATE_NAME
        old = _read_state_json(legacy)
        if old is not None:
            try:
                self.save_freeze(old.frozen, old.since)
                legacy.unlink()
                fsync_dir(legacy.parent)
            except (sqlite3.Error, OSError) as exc:
                why = f"cannot take over {legacy}: {' '.join(str(exc).split())}"
                problem = "; ".join(p for p in (old.problem, why) if p)
                return FreezeState(old.frozen, old.since, problem)
        with self._reader() as conn:
            row = conn.execute("SELECT frozen, since FROM freeze WHERE id = 1").fetchone()
        frozen, since = (False, None) if row is None else (bool(row[0]), row[1])
        return FreezeState(frozen, since, old.problem if old is not None else None)

    def save_login_failures(self, failures: LoginFailures) -> None:
        """Persist the count of wrong passwords at the login, and the ceiling's times with it
        (on a file of schema 3, opened as it is, not those) (one commit; the server calls it
        at most once a second: ``refserver.server.LOGIN_FAILURES_SAVE_SECONDS``). On a file
        without the table (``keeps_login_failures``): ``LoginFailuresNotKept``, nothing tried."""
        if not self.keeps_login_failures:
            raise LoginFailuresNotKept(
                f"{self.path.name} is at schema {self.version}, without table login_failures"
                " (it could not be written at start, so it was not migrated): the count is kept"
                " in memory only until a start that can write it"
            )
        with self._transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO login_failures (id, count, first_at, last_at) "
                "VALUES (1, ?, ?, ?)",
                (failures.count, failures.first_at, failures.last_at),
            )
            if self.version >= LOGIN_CEILING_SCHEMA:
                # All of them: at most the ceiling's number (200 by default), once a second.
                cur.execute("DELETE FROM login_ceiling")
                cur.executemany(
                    "INSERT INTO login_ceiling (at) VALUES (?)", [(at,) for at in failures.ceiling]
                )

    def load_login_failures(self) -> LoginFailures:
        """The persisted count (0 if none was ever saved, or the file has no table for it:
        ``keeps_login_failures``) and the ceiling's times (none on a file of schema 3)."""
        if not self.keeps_login_failures:
            return LoginFailures()
        with self._reader() as conn:
            row = conn.execute(
                "SELECT count, first_at, last_at FROM login_failures WHERE id = 1"
            ).fetchone()
            ceiling: tuple[float, ...] = ()
            if self.version >= LOGIN_CEILING_SCHEMA:
                ceiling = tuple(
                    float(r[0]) for r in conn.execute("SELECT at FROM login_ceiling ORDER BY at")
                )
        if row is None:
            return LoginFailures(ceiling=ceiling)
        return LoginFailures(int(row[0]), _text(row[1]), _text(row[2]), ceiling)

    def get(self, entry_id: str) -> dict[str, Any] | None:
        with self._reader() as conn:
            row = conn.execute(
                "SELECT id, seq, body, created_at FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
        if row is None:
            return None
        return {"id": row[0], "seq": row[1], "body": json.loads(row[2]), "created_at": row[3]}

    def watermark(self) -> int:
        """The last committed seq, 0 if there is none."""
        with self._reader() as conn:
            row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM entries").fetchone()
        return int(row[0])

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=1")
        try:
            yield conn
        finally:
            with self._pool_lock:
                self._readers.append(conn)

    def close(self) -> None:
        with self._pool_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        with self._write_lock:
            self._writer.close()


@dataclass(frozen=True)
class FreezeState:
    frozen: bool
    since: str | None = None
    problem: str | None = None  # set when a legacy state.json was unreadable (then frozen)


@dataclass(frozen=True)
class LoginFailures:
    """Wrong passwords at the server's login (the client password) since the count began (a new
    data dir, or this release's first start on an older one): how many, when the first and the
    latest were (ISO 8601, UTC; None before the first); and when those that still count against
    the daily ceiling were (Unix seconds, oldest first)."""

    count: int = 0
    first_at: str | None = None
    last_at: str | None = None
    ceiling: tuple[float, ...] = ()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _read_state_json(path: Path) -> FreezeState | None:
    """The flag in an older release's ``state.json``; None if there is none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return FreezeState(frozen=True, problem=f"cannot read {path}: {exc.strerror}")
    try:
        data = json.loads(raw)
        frozen = data["frozen"]
        since = data.get("since")
        if not isinstance(frozen, bool) or not (since is None or isinstance(since, str)):
            raise TypeError("bad field types")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Unreadable: err on the side of the data and stay frozen until told otherwise.
        return FreezeState(frozen=True, problem=f"{path} is malformed ({exc})")
    return FreezeState(frozen=frozen, since=since)
