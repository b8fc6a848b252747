"""A store's checkpoint off the path of its commits (``tlsroll.sqlite.Database``,
``CHECKPOINT_EVERY``, session 72): SQLite's automatic checkpoint ran inside the commit that took
the ``-wal`` past 1000 pages, writing the pages into the file and syncing both (4–5 ms on that
commit: a switch's outcome at the leader, a journal record inside an agent's freeze window).

In process, real SQLite files, the real store thread; no time measured (the figures are
docs/performance.md's).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from nodeagent.drivers import ServerFacts
from nodeagent.journal import Journal, Txn
from nodeagent.transaction import Phase, Plan
from tlsroll import dbthread
from tlsroll import sqlite as tsqlite
from tlsroll.enums import TxnKind
from tlsroll.sqlite import Database

SCHEMA = ["CREATE TABLE rec (id INTEGER PRIMARY KEY, body BLOB NOT NULL)"]


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
    ``CHECKPOINT_EVERY`` commits), before SQLite's own is due."""
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


async def test_a_crash_between_a_commit_and_its_checkpoint_loses_nothing(tmp_path: Path) -> None:
    """The files as a power cut leaves them after the commit that made a checkpoint due and
    before the checkpoint ran (it waits on the thread): every committed row is there, the file
    whole; opened again, it writes on."""
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    cut = tmp_path / "cut"
    cut.mkdir()
    rows = [os.urandom(50 + i) for i in range(tsqlite.CHECKPOINT_EVERY)]

    def commits_then_cut() -> None:
        for body in rows:
            with db.tx() as conn:
                conn.execute("INSERT INTO rec (body) VALUES (?)", (body,))
        assert db.checkpoints == 0  # due, queued behind this call
        for suffix in ("", "-wal"):  # (no -shm: SQLite rebuilds it from the -wal)
            src = Path(f"{db.path}{suffix}")
            (cut / f"s.sqlite3{suffix}").write_bytes(src.read_bytes())

    try:
        await dbthread.run(commits_then_cut)
    finally:
        await dbthread.barrier()
        db.close()
    again = Database(cut / "s.sqlite3", SCHEMA)
    try:
        with again.read() as conn:
            assert [r[0] for r in conn.execute("SELECT body FROM rec ORDER BY id")] == rows
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with again.tx() as conn:
            conn.execute("INSERT INTO rec (body) VALUES (x'01')")
    finally:
        again.close()


async def test_the_checkpoint_lets_a_call_handed_to_the_thread_directly_go_first(
    tmp_path: Path,
) -> None:
    """A call handed to the store thread without ``dbthread.run`` (the agent's ``stage_next``,
    handed off by the create on the thread, right after the commit that may make a checkpoint
    due; the staged configs' discards) goes before the checkpoint as a ``run`` call does: the
    freeze call waits for that staging (review s72 revlate: ``pending`` did not count it, so
    the checkpoint went first). One such call cancelled before its turn is no longer
    counted."""
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    order: list[tuple[str, int]] = []
    go = threading.Event()

    def commit() -> None:
        with db.tx() as conn:
            conn.execute("INSERT INTO rec (body) VALUES (x'00')")

    def commit_then_stage() -> None:
        commit()  # the checkpoint due: queued behind this call
        dbthread.executor().submit(lambda: order.append(("staged", db.checkpoints)))

    try:
        for _ in range(tsqlite.CHECKPOINT_EVERY - 1):
            await dbthread.run(commit)
        await dbthread.run(commit_then_stage)
        await _checkpointed(db, 1)
        assert order == [("staged", 0)]
        held = asyncio.ensure_future(dbthread.run(go.wait, 30))
        await asyncio.sleep(0)
        dropped = dbthread.executor().submit(order.append, ("dropped", -1))
        assert dropped.cancel()
        go.set()
        await held
        await dbthread.barrier()
        # The barrier's own call is uncounted by its future's done-callback, on the store
        # thread, just after ``run`` handed its result to this loop: a moment later, at most
        # (the checkpoint reads ``pending`` on that thread, after it).
        for _ in range(500):
            if dbthread.pending() == 0:
                break
            await asyncio.sleep(0.01)
        assert dbthread.pending() == 0
        assert order == [("staged", 0)]
    finally:
        go.set()
        await dbthread.barrier()
        db.close()


async def test_the_agents_checkpoint_waits_for_the_end_of_a_freeze_window(tmp_path: Path) -> None:
    """The agent's journal: a checkpoint that falls due while a switch is between its freeze
    and the freeze's end (the managed server frozen, its config written, restarting) does not
    run there, where it would compete with the config's and the records' syncs; it runs after
    the record that ends the freeze (review s72 leaderwrite). Counted: none inside, one after.
    An agent started again mid-window reads the window from its journal."""
    journal = Journal(tmp_path / "journal.sqlite3")
    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, ("https",))
    plan = Plan(facts, ("https",), ("http",), Path("/n"), Path("/b"), Path("/ca"), "").to_json()
    at = dt.datetime.now(dt.UTC)
    db = journal._db  # (its counts)

    def switch_with_records_in_its_window() -> int:
        txn = journal.create(Txn("r1", TxnKind.SWITCH, 1, Phase.STARTED, plan, at), begin="freeze")
        assert journal.in_freeze_window()
        txn = journal.update(txn, phase=Phase.FROZEN, freeze_started_at=at, begin="write_config")
        for _ in range(tsqlite.CHECKPOINT_EVERY):  # (a record each: the checkpoint falls due)
            journal.event(txn, "restart", "again")
        return db.commits

    try:
        commits = await dbthread.run(switch_with_records_in_its_window)
        assert commits > tsqlite.CHECKPOINT_EVERY
        await dbthread.barrier()
        for _ in range(500):  # (the held checkpoint's own turn on the thread, then none)
            if journal.checkpoints_held >= 1 and dbthread.pending() == 0:
                break
            await asyncio.sleep(0.01)
        assert (db.checkpoints, journal.checkpoints_held) == (0, 1)
        again = Journal(journal.path)  # (an agent started again mid-switch: from its journal)
        assert again.in_freeze_window()
        again.close()
        txn = journal.get("r1", TxnKind.SWITCH)
        assert txn is not None
        await dbthread.run(journal.update, txn, phase=Phase.VERIFIED, freeze_ended_at=at)
        assert not journal.in_freeze_window()
        await _checkpointed(db, 1)  # the unfreeze's record queued it
        assert (db.checkpoints, journal.checkpoints_held) == (1, 1)
    finally:
        await dbthread.barrier()
        journal.close()


def test_a_journal_reopened_before_the_freeze_answered_holds_the_window(tmp_path: Path) -> None:
    """Session 73 (leftovers): in memory the freeze window begins at the ``freeze`` step's
    ``begin`` (or ``again``), journalled before the freeze call; a journal opened again read
    it from ``freeze_started_at``, written only once the freeze answered: an agent that
    stopped in between did not hold its idle checkpoint for that transaction, not even once
    it resumed (its resumed freeze journals no ``begin`` again). Read back as memory holds
    it: a pending transaction with a freeze begun (or begun again) whose end is not
    journalled; not one that has not begun its freeze, nor one whose freeze ended."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, ("https",))
    plan = Plan(facts, ("https",), ("http",), Path("/n"), Path("/b"), Path("/ca"), "").to_json()
    at = dt.datetime.now(dt.UTC)
    try:
        journal.create(Txn("r0", TxnKind.SWITCH, 1, Phase.STARTED, plan, at))  # (no freeze)
        txn = journal.create(Txn("r1", TxnKind.SWITCH, 1, Phase.STARTED, plan, at))
        assert not journal.in_freeze_window()
        journal.event(txn, "freeze", "begin")
        assert journal.in_freeze_window()
    finally:
        journal.close()
    for step, expected in [("begun", True), ("frozen", True), ("ended", False)]:
        again = Journal(path)  # (the agent started again)
        try:
            assert again.in_freeze_window() is expected, step
            kept = again.get("r1", TxnKind.SWITCH)
            assert kept is not None
            if step == "begun":  # resumed: the freeze answered
                again.update(kept, phase=Phase.FROZEN, freeze_started_at=at)
            elif step == "frozen":
                again.update(kept, phase=Phase.VERIFIED, freeze_ended_at=at)
            assert again.in_freeze_window() is (step == "begun"), step
        finally:
            again.close()


async def test_a_failed_checkpoint_is_kept_told_and_tried_again_after_a_wait_not_per_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose error says the disk does not take the pages (SQLITE_FULL here) is
    kept (``checkpoint_trouble``), told once to ``on_checkpoint``, and tried again after a
    wait, not at each commit (review s72 revlate: a failed one queued a try per commit, logged
    at debug only); the next that copies every page clears it and is told too."""
    monkeypatch.setattr(tsqlite, "RETRY_FIRST", 3600.0)  # (its timer fired by hand below)
    monkeypatch.setattr(tsqlite, "RETRY_MOST", 3600.0)
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    heard: list[str | None] = []
    db.on_checkpoint.append(lambda exc: heard.append(None if exc is None else str(exc)))
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    full.sqlite_errorname = "SQLITE_FULL"
    failing = [True]
    tries: list[str] = []
    real = db._db

    class Failing:  # the connection, whose checkpoint fails while ``failing``
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def execute(self, sql: str, *args: Any) -> Any:
            if failing[0] and sql.startswith("PRAGMA wal_checkpoint"):
                tries.append(sql)
                raise full
            return real.execute(sql, *args)

    db._db = cast(Any, Failing())

    def commit() -> None:
        with db.tx() as conn:
            conn.execute("INSERT INTO rec (body) VALUES (x'00')")

    try:
        for _ in range(tsqlite.CHECKPOINT_EVERY):
            await dbthread.run(commit)
        for _ in range(500):
            if heard:
                break
            await asyncio.sleep(0.01)
        assert heard == ["database or disk is full"]
        assert db.checkpoint_trouble == "SQLITE_FULL: database or disk is full"
        for _ in range(3 * tsqlite.CHECKPOINT_EVERY):  # due again at every commit before
            await dbthread.run(commit)
        await dbthread.barrier()
        assert len(tries) == 1 and db.checkpoint_failures == 1 and db.checkpoints == 0
        retry = db._retry
        assert retry is not None and retry.interval == 3600.0
        failing[0] = False
        retry.cancel()
        retry.function()  # (its time come)
        await _checkpointed(db, 1)  # the retry, without a commit
        assert heard == ["database or disk is full", None]
        assert db.checkpoint_trouble is None
    finally:
        await dbthread.barrier()
        db.close()


def test_a_retry_the_store_thread_runs_at_once_leaves_the_next_checkpoint_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry's timer hands the checkpoint to the store thread from a thread of its own,
    without the lock: the store thread may run it before the timer's thread has its next
    line. Here a stand-in for the store thread runs each call handed to it at once. The
    checkpoint then ran, and one due at a later commit is queued and runs. Before (review s73
    revdisk): the timer's thread marked it queued after it had run, and no commit queued one
    again, nor a retry: the leader's store said "cannot write" until it was restarted."""

    later: list[tuple[Any, tuple[Any, ...]]] = []

    class AtOnce:  # (the store thread: runs what it is handed before the caller goes on,
        # unless the caller holds the lock, as a commit does: then once it is released)
        def submit_uncounted(self, fn: Any, /, *args: Any) -> None:
            if db._lock.locked():
                later.append((fn, args))
            else:
                fn(*args)

    monkeypatch.setattr(dbthread, "started", AtOnce)
    monkeypatch.setattr(dbthread, "pending", lambda: 0)
    db = Database(tmp_path / "s.sqlite3", SCHEMA)
    db.checkpoint_every = 2
    try:
        db._try_again()  # (a retry's time come)
        assert db.checkpoints == 1
        for _ in range(2):
            with db.tx() as conn:
                conn.execute("INSERT INTO rec (body) VALUES (x'00')")
        for fn, args in later:
            fn(*args)
        assert len(later) == 1 and db.checkpoints == 2
    finally:
        db.close()
