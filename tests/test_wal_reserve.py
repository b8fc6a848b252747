"""The ``-wal`` reserved at the open (``tlsroll.sqlite.reserve_wal``, session 72): a commit on a
switch's path overwrites the file, never grows it, so its fdatasync flushes data, not the file
system's metadata too; and the zeros reserved never hide, nor pass for, a committed write.

In process, real SQLite files; no time measured (the figures are docs/performance.md's).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from leader.backup import _copy_store
from leader.db import foreign_wal, open_db
from nodeagent.journal import Journal
from tlsroll import dbthread
from tlsroll import sqlite as tsqlite
from tlsroll.sqlite import Database, wal_bytes, wal_has_header

SCHEMA = ["CREATE TABLE rec (id INTEGER PRIMARY KEY, body BLOB NOT NULL)"]


def wal_of(path: Path) -> Path:
    return Path(f"{path}-wal")


def fdatasyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the files ``os.fdatasync`` is called on (Python's; SQLite's are its own)."""
    seen: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        seen.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return seen


def test_a_store_s_commits_overwrite_its_wal_and_never_grow_it(tmp_path: Path) -> None:
    """The size the -wal reaches between two checkpoints is there, on disk, at the open; the
    commits after it, through a checkpoint and the file's reuse from its start, leave its
    size as it was (each growth was a metadata commit of the file system in the fdatasync)."""
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    wal = wal_of(db.path)
    with db.read() as conn:
        want = wal_bytes(conn)
    assert db.wal_reserved == want == wal.stat().st_size
    assert wal.stat().st_blocks * 512 >= want  # written, not a hole
    assert not wal_has_header(wal)  # nothing committed yet: zeros, no header
    sizes = set()
    for _ in range(300):  # 5 pages a commit: past the autocheckpoint (1000 pages), and reused
        with db.tx() as conn:
            conn.execute("INSERT INTO rec (body) VALUES (?)", (os.urandom(5 * 4000),))
        sizes.add(wal.stat().st_size)
    assert sizes == {want}
    with db.read() as conn:
        assert conn.execute("SELECT count(*) FROM rec").fetchone()[0] == 300
    db.close()


@pytest.mark.parametrize("kind", ["leader", "journal"])
def test_the_leader_s_store_and_an_agent_s_journal_reserve_their_wal(
    tmp_path: Path, kind: str
) -> None:
    """Both stores on a switch's path: the leader's (the outcome and the next switch's record)
    and the agent's journal (every record of a switch). An agent's journal grows by a few pages
    a switch: without the reserve, every record of every switch grew its -wal."""
    if kind == "leader":
        store = open_db(tmp_path / "leader.sqlite3")
        path, reserved = store.path, store.wal_reserved
        store.close()
        reopened = open_db(path)  # a clean close removed the -wal: made and reserved again
        assert reopened.wal_reserved == reserved > 0
        reopened.close()
    else:
        journal = Journal(tmp_path / "journal.sqlite3")
        try:
            assert journal._db.wal_reserved > 0
            wal = wal_of(journal.path)
            size = wal.stat().st_size
            for epoch in range(1, 6):  # each a committed record
                journal.admit_epoch(epoch)
            assert wal_has_header(wal)
            assert wal.stat().st_size == size
        finally:
            journal.close()


def test_what_was_committed_survives_a_crash_and_the_zeros_pass_for_nothing(
    tmp_path: Path,
) -> None:
    """A power cut: the files as they are after the commits (no close, no checkpoint), the
    -wal with its reserved zeros past the last frame. Opened again, every committed row is
    there and nothing else; a crash right after the reserve (zeros only, no header) opens
    empty, nothing lost, and is writable."""
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    cut = tmp_path / "cut"
    cut.mkdir()
    # Right after the open: the -wal is zeros only.
    for suffix in ("", "-wal"):
        shutil.copy(f"{db.path}{suffix}", cut / f"early.sqlite3{suffix}")
    rows = [os.urandom(100 + i) for i in range(20)]
    for body in rows:
        with db.tx() as conn:
            conn.execute("INSERT INTO rec (body) VALUES (?)", (body,))
    assert wal_has_header(wal_of(db.path))
    for suffix in ("", "-wal"):  # (no -shm: SQLite rebuilds it from the -wal)
        shutil.copy(f"{db.path}{suffix}", cut / f"late.sqlite3{suffix}")
    db.close()

    late = sqlite3.connect(cut / "late.sqlite3")
    assert [r[0] for r in late.execute("SELECT body FROM rec ORDER BY id")] == rows
    assert late.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    late.close()
    early = Database(cut / "early.sqlite3", SCHEMA)
    with early.read() as conn:
        assert conn.execute("SELECT count(*) FROM rec").fetchone()[0] == 0
    with early.tx() as conn:
        conn.execute("INSERT INTO rec (body) VALUES (x'01')")
    early.close()
    again = sqlite3.connect(cut / "early.sqlite3")
    assert again.execute("SELECT count(*) FROM rec").fetchone()[0] == 1
    again.close()


def test_a_full_disk_at_the_reserve_leaves_the_wal_as_it_was_and_the_store_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reserve is an optimisation: a disk that cannot take it (ENOSPC) leaves the -wal at
    its size (the zeros written before the error taken back) and the store opens and writes."""
    real = os.pwrite
    calls: list[int] = []

    def full(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    monkeypatch.undo()
    assert len(calls) == 2
    assert db.wal_reserved == 0
    assert wal_of(db.path).stat().st_size == 0
    with db.tx() as conn:
        conn.execute("INSERT INTO rec (body) VALUES (x'01')")
    db.close()


def test_the_reserve_is_synced_at_the_open_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One fdatasync of the reserved -wal at the open (not left to the first commit's), none
    at a second open of a file already reserved (another process's: the leader's CLI)."""
    seen = fdatasyncs(monkeypatch)
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    assert seen == [db.wal_reserved]
    other = Database(tmp_path / "s.sqlite3", SCHEMA)
    assert other.wal_reserved == 0
    assert seen == [db.wal_reserved]
    other.close()
    db.close()


def test_a_backup_s_copy_beside_a_wal_of_zeros_only_is_not_taken_for_another_store_s(
    tmp_path: Path,
) -> None:
    """A leader killed right after its start (its -wal the reserve's zeros, no frame), then a
    backup's copy put in its place: that -wal holds nothing of another store, and the start is
    not refused for it (``foreign_wal``); one that holds frames still is."""
    store = open_db(tmp_path / "leader.sqlite3")
    wal = wal_of(store.path)
    zeros = wal.read_bytes()
    assert zeros and not wal_has_header(wal)
    with store.tx() as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
    frames = wal.read_bytes()
    store.close()
    copy = tmp_path / "copy.sqlite3"
    _copy_store(tmp_path / "leader.sqlite3", copy, dt.datetime.now(dt.UTC))
    target = tmp_path / "restored" / "leader.sqlite3"
    target.parent.mkdir()
    shutil.copy(copy, target)
    wal_of(target).write_bytes(zeros)
    assert foreign_wal(target) is None
    wal_of(target).write_bytes(frames)
    assert foreign_wal(target) is not None


def _file_size(path: Path) -> int:
    """The store file's size: each commit here adds pages, which a checkpoint appends to it."""
    return path.stat().st_size


async def _checkpointed(db: Database, at_least: int) -> None:
    """Wait (bounded, on state) until the store thread ran ``at_least`` checkpoints."""
    for _ in range(500):
        if db.checkpoints >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{db.checkpoints} checkpoints, not {at_least}")


async def test_no_commit_on_the_store_thread_checkpoints_the_wal_into_the_file(
    tmp_path: Path,
) -> None:
    """A daemon's commits (on the store thread, ``tlsroll.dbthread``) never write the store's
    file: SQLite's automatic checkpoint ran inside the commit that took the ``-wal`` past 1000
    pages (4–5 ms on that commit: a switch's outcome, or a journal record in the freeze
    window). The checkpoint runs on the same thread after the commits queued (every
    ``CHECKPOINT_EVERY`` commits), so the -wal stays short of SQLite's own and its reserve."""
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    inside: list[bool] = []

    def commit(body: bytes) -> None:
        before = _file_size(db.path)
        with db.tx() as conn:
            conn.execute("INSERT INTO rec (body) VALUES (?)", (body,))
        inside.append(_file_size(db.path) != before)

    try:
        start = _file_size(db.path)
        for _ in range(2 * tsqlite.CHECKPOINT_EVERY + 20):  # 5 pages each: 1100 pages and more
            await dbthread.run(commit, os.urandom(5 * 4000))
        assert not any(inside), f"commits {[i for i, x in enumerate(inside) if x]} checkpointed"
        await _checkpointed(db, 2)
        assert _file_size(db.path) != start  # (the checkpoints wrote it, off the commits)
        assert wal_of(db.path).stat().st_size == db.wal_reserved
    finally:
        await dbthread.barrier()
        db.close()


async def test_the_checkpoint_lets_the_calls_queued_behind_its_commit_go_first(
    tmp_path: Path,
) -> None:
    """The commit that makes a checkpoint due, then five calls queued behind it (the next
    switch's record, a stage's write): each of them runs before the checkpoint; it runs once
    the thread has nothing else to do. The store closed meanwhile, it does nothing."""
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    seen: list[int] = []
    go = threading.Event()

    def commit() -> None:
        with db.tx() as conn:
            conn.execute("INSERT INTO rec (body) VALUES (x'00')")
        seen.append(db.checkpoints)

    def commits_then_close() -> None:
        for _ in range(tsqlite.CHECKPOINT_EVERY):
            commit()
        db.close()

    try:
        for _ in range(tsqlite.CHECKPOINT_EVERY - 1):
            await dbthread.run(commit)
        assert db.checkpoints == 0
        held = asyncio.ensure_future(dbthread.run(go.wait, 30))  # the thread held meanwhile
        queued = [asyncio.ensure_future(dbthread.run(commit)) for _ in range(6)]
        await asyncio.sleep(0)  # (each handed to the thread, behind the one held)
        assert dbthread.pending() >= 7
        go.set()
        await asyncio.gather(held, *queued)
        assert seen[-6:] == [0] * 6
        await _checkpointed(db, 1)
        assert db.checkpoints == 1
        await dbthread.run(commits_then_close)  # due again inside, closed before its turn
        for _ in range(tsqlite.IDLE_WAITS + 5):
            await dbthread.barrier()
        assert db.checkpoints == 1
    finally:
        go.set()
        await dbthread.barrier()
        db.close()
