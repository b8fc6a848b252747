"""The reference server's durable state: the entries (SQLite) and the freeze flag (state.json).

Entries live in ``entries.sqlite3`` in WAL mode with ``synchronous=FULL``: a commit returns only
after the WAL is fsync'ed, so an acknowledged entry survives a crash or power loss. ``seq`` is an
AUTOINCREMENT key, so it only grows and is never reused: the *watermark* (the last committed
seq, 0 for none) tells whether anything was written between two points in time.

All methods are blocking and thread-safe: the server calls them from worker threads. Writes are
serialised by one lock on one connection; reads use a small pool of read-only connections, so
they are served while a write commits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlsroll.fsutil import PRIVATE, write_atomic
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

# The schema of entries.sqlite3: append a migration to change it (see tlsroll.sqlite).
MIGRATIONS: tuple[Migration, ...] = (
    _V1,  # 0.1.0
)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / DB_NAME
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        make_private(self.path)  # 0600, and so its -wal and -shm
        self._writer = self._connect()
        try:
            self._writer.execute("PRAGMA synchronous=FULL")
            migrate(self._writer, self.path, MIGRATIONS)  # before WAL: a refused file stays
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

    def insert(self, body: dict[str, Any]) -> tuple[str, int]:
        """Commit one entry durably; return its ``(id, seq)``."""
        entry_id = uuid.uuid4().hex
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        with self._write_lock:
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute(
                    "INSERT INTO entries (id, body, created_at) VALUES (?, ?, ?)",
                    (entry_id, text, now_iso()),
                )
                seq = cur.lastrowid
                cur.execute("COMMIT")
            except BaseException:
                # A full disk may have rolled it back already: a ROLLBACK then fails with "no
                # transaction is active" and hides the error that matters.
                if self._writer.in_transaction:
                    cur.execute("ROLLBACK")
                raise
        assert seq is not None
        return entry_id, seq

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
    problem: str | None = None  # set when state.json was unreadable (then frozen, to be safe)


class StateFile:
    """``state.json``: the freeze flag, written atomically so that it survives a restart."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / STATE_NAME

    def load(self) -> FreezeState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return FreezeState(frozen=False)
        except OSError as exc:
            return FreezeState(frozen=True, problem=f"cannot read {self.path}: {exc.strerror}")
        try:
            data = json.loads(raw)
            frozen = data["frozen"]
            since = data.get("since")
            if not isinstance(frozen, bool) or not (since is None or isinstance(since, str)):
                raise TypeError("bad field types")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Unreadable: err on the side of the data and stay frozen until told otherwise.
            return FreezeState(frozen=True, problem=f"{self.path} is malformed ({exc})")
        return FreezeState(frozen=frozen, since=since)

    def save(self, frozen: bool, since: str | None = None) -> FreezeState:
        """Persist the flag; ``since`` keeps the start of an ongoing freeze (default: now)."""
        state = FreezeState(frozen=frozen, since=(since or now_iso()) if frozen else None)
        data = {"frozen": state.frozen, "since": state.since}
        write_atomic(self.path, (json.dumps(data) + "\n").encode(), PRIVATE)
        return state
