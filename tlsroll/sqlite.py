"""One SQLite file, shared by threads: the durability settings and transactions all stores use.

WAL journal with ``synchronous=FULL`` (a committed transaction survives a power cut), one
connection guarded by a lock (async callers go through ``asyncio.to_thread``), and writes in
``BEGIN IMMEDIATE`` transactions so that a read-check-write is atomic against every other
writer, in this process or another.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def to_text(t: dt.datetime | None) -> str | None:
    """How every store keeps a time: ISO 8601 in UTC."""
    return t.astimezone(dt.UTC).isoformat() if t else None


def from_text(s: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(s) if s else None


class Database:
    def __init__(self, path: Path, schema: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(schema)  # CREATE … IF NOT EXISTS: safe on every start

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all or nothing, serialised with every other writer."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
