"""A journal moved or deleted under the running agent (session 75, journalgone).

In WAL mode (the journal's own) SQLite does not notice that the file it holds is no longer at
its path: reads, writes, their fsyncs and checkpoints go on into the file (or ``-wal``) it holds,
and what the agent journals is lost at its next start (``JournalLost``). The agent now looks
itself (``Journal.look_gone``: its store watch every heartbeat interval, its checks, a new
transaction's create): found gone, it begins nothing new (a switch, stage, CSR or rollback),
says so (its store trouble on the heartbeat, its checks' problems, ``journal.gone`` with a
hint), and lets a transaction already running finish. Real SQLite files, in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import structlog.testing

from nodeagent import service
from nodeagent.journal import JOURNAL_GONE, Journal, JournalError, JournalUnavailable
from nodeagent.transaction import Phase
from nodeagent.trust import LeaderTrust
from nodeagent.wire import CHANGE, TXN_PHASE
from tests.test_agent_command import Ctx, StillDriver, still_service
from tests.test_runner import SCENARIOS, Aborted, CrashingJournal, FakeContext, World
from tlsroll.enums import NEEDS_ADMIN, Change, TxnKind, TxnOutcome
from tlsroll.rpc import RpcStatusError
from tlsroll.v1 import agent_pb2

WAYS = [
    "file moved",
    "file deleted",
    "file replaced",
    "directory moved",
    "directory deleted",
    "-wal deleted",
    "-wal replaced",
]


@pytest.fixture(autouse=True)
def any_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "require_leader", lambda _context, _trust: None)
    monkeypatch.setattr(service, "served_certificate", lambda *_: b"")


def take_away(path: Path, how: str) -> None:
    """The journal at ``path`` (or its directory, or its ``-wal``) moved, deleted or
    replaced under the connection that holds it."""
    where = path.parent
    wal = Path(f"{path}-wal")
    if how == "file moved":
        path.rename(where / "elsewhere.sqlite3")
    elif how == "file deleted":
        path.unlink()
    elif how == "file replaced":  # (a copy put back over it while the agent runs)
        shutil.copyfile(path, where / "copy.sqlite3")
        os.replace(where / "copy.sqlite3", path)
    elif how == "directory moved":
        where.rename(where.with_name("elsewhere"))
    elif how == "directory deleted":
        shutil.rmtree(where)
    elif how == "-wal deleted":
        wal.unlink()
    else:
        shutil.copyfile(wal, where / "copy-wal")
        os.replace(where / "copy-wal", wal)


def txn_of(w: World, rollout_id: str) -> Any:
    return dataclasses.replace(w.txn, rollout_id=rollout_id)


@pytest.mark.parametrize("how", WAYS)
def test_a_journal_gone_under_the_agent_is_found_and_begins_no_new_transaction(
    tmp_path: Path, how: str
) -> None:
    """WAL: the writes go on without an error (the premise), so nothing but a look at the
    path tells. Before: a new transaction was created, journalled into a file no longer at
    the journal's path. Now the create looks first and refuses it (a plain ``JournalError``,
    a refusal, never "ask again"), nothing written; a replay of one created before is
    answered; it is said once (``journal.gone``, with a hint) and kept."""
    w = World(tmp_path / "w", SCENARIOS["completes"])
    w.journal_path.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(w.journal_path)
    try:
        before = journal.create(txn_of(w, "r0"))
        take_away(w.journal_path, how)
        journal.set_removed_from_cluster("still written")  # (WAL: no error comes)
        assert journal.removed_from_cluster() == "still written"
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(JournalError) as caught:
                journal.create(txn_of(w, "r1"))
            journal.look_gone()  # (said once)
        assert not isinstance(caught.value, JournalUnavailable), caught.value
        said = str(caught.value)
        assert said.startswith(f"journal {w.journal_path}: its "), said
        assert said.endswith(JOURNAL_GONE), said
        assert journal.get("r1", TxnKind.SWITCH) is None  # nothing begun
        assert journal.gone() == said
        gone = [e for e in logs if e["event"] == "journal.gone"]
        assert len(gone) == 1 and "restart the agent" in gone[0]["hint"], logs
        assert journal.create(txn_of(w, "r0")) == before  # a replay: answered
    finally:
        journal.close()


def test_a_journal_where_it_was_opened_is_not_gone(tmp_path: Path) -> None:
    """What the agent does to its own journal, and a journal merely read or checkpointed by
    another connection, leave it where it was: no look finds it gone (also after a
    checkpoint that empties the ``-wal``, and another connection's close)."""
    import sqlite3

    w = World(tmp_path / "w", SCENARIOS["completes"])
    w.journal_path.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(w.journal_path)
    try:
        journal.create(txn_of(w, "r1"))
        journal._db._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with contextlib.closing(sqlite3.connect(w.journal_path)) as other:
            other.execute("SELECT count(*) FROM txns").fetchone()
        journal.probe()
        assert journal.look_gone() is None
        journal.create(txn_of(w, "r2"))
    finally:
        journal.close()
    again = Journal(w.journal_path)  # a start on it: what it opened
    try:
        assert again.look_gone() is None
        assert again.get("r2", TxnKind.SWITCH) is not None
    finally:
        again.close()


async def test_a_node_whose_journal_is_gone_says_so_and_refuses_what_would_begin(
    tmp_path: Path,
) -> None:
    """The real servicer: its store trouble (the heartbeat's, read by its store watch every
    interval) and its checks (a preflight's, `tlsroll plan`'s) say it, first; a Stage and a
    CreateCSR are refused (FAILED_PRECONDITION, "needs the admin: "). Before: the checks
    passed and the heartbeat said nothing."""
    (tmp_path / "data").mkdir()
    (tmp_path / "cfg").mkdir()
    journal = Journal(tmp_path / "data" / "journal.sqlite3")
    agent = still_service(tmp_path, journal, StillDriver(tmp_path / "cfg"), announced=5)
    try:
        reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
        assert reply.ok, reply.problems
        assert await asyncio.to_thread(agent.store_trouble) == []
        take_away(journal.path, "file moved")
        trouble = await asyncio.to_thread(agent.store_trouble)
        assert len(trouble) == 1 and trouble[0].endswith(JOURNAL_GONE), trouble
        reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
        assert not reply.ok
        assert reply.problems[0] == f"{NEEDS_ADMIN}{journal.gone()}", reply.problems
        command = agent_pb2.Command(rollout_id="r1", epoch=3)
        for call in (
            agent.Stage(agent_pb2.StageRequest(command=command), cast(Any, Ctx())),
            agent.CreateCSR(agent_pb2.CreateCSRRequest(command=command), cast(Any, Ctx())),
        ):
            with pytest.raises(RpcStatusError) as caught:
                await call
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION, caught.value
            assert str(caught.value) == f"{NEEDS_ADMIN}{journal.gone()}"
        assert journal.staged("r1") is None
    finally:
        journal.close()


async def test_a_switch_running_when_its_journal_goes_finishes_and_no_new_one_begins(
    tmp_path: Path,
) -> None:
    """Found gone mid-switch (here right after its first write: the server about to be
    frozen), the switch runs to its end: its records still go into the file the connection
    holds, and stopping there would leave the server frozen or half-switched. The server ends
    unfrozen on the target; the servicer answers a repeat of its Switch with it (never "nothing
    began" for a switch that ran) and refuses another rollout's, which the journal's create
    refuses too, nothing written."""
    sc = SCENARIOS["completes"]
    w = World(tmp_path / "w", sc)
    with contextlib.closing(Journal(w.journal_path)) as first:
        first.admit_epoch(1)  # the rollout's epoch, journalled by its first command
    journal = CrashingJournal(w.journal_path)
    found: list[str | None] = []

    def after_write() -> None:
        if len(journal.writes) == 1:
            take_away(w.journal_path, "file moved")
            found.append(journal.look_gone())  # (as the store watch would, meanwhile)

    journal.after_write = after_write
    try:
        done = await w.run(journal)
        assert found and found[0] is not None and found[0].endswith(JOURNAL_GONE), found
        assert done.outcome is TxnOutcome.COMPLETED and done.phase is Phase.COMPLETED, done
        s = w.server
        assert (s.running, s.config, s.frozen) == (sc.target, sc.target, False), s.ops
        assert journal.writes == list(w.writes), journal.writes
        trust = LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem")
        trust.announce(2)
        agent = service.NodeAgentService(
            cast(Any, None),
            cast(Any, None),
            journal,
            w.driver,
            w.runner(journal),
            w.time.clock,
            trust=trust,
        )
        tls = CHANGE.wire(Change.ENABLE_TLS)

        def switch(rollout_id: str, epoch: int) -> agent_pb2.SwitchRequest:
            command = agent_pb2.Command(rollout_id=rollout_id, epoch=epoch)
            return agent_pb2.SwitchRequest(command=command, change=tls)

        answer = await agent.Switch(switch("r1", 1), cast(Any, FakeContext()))
        assert (answer.rollout_id, answer.phase) == ("r1", TXN_PHASE.wire(Phase.COMPLETED))
        with pytest.raises(Aborted) as refused:
            await agent.Switch(switch("r2", 2), cast(Any, FakeContext()))
        code, details = refused.value.args
        assert code is grpc.StatusCode.FAILED_PRECONDITION, (code, details)
        assert details == f"{NEEDS_ADMIN}{journal.gone()}", details
        assert journal.get("r2", TxnKind.SWITCH) is None
        with pytest.raises(JournalError, match="is no longer there"):
            journal.create(txn_of(w, "r2"))
        assert journal.get("r2", TxnKind.SWITCH) is None
        assert [t.rollout_id for t in journal.unfinished()] == []
    finally:
        journal.close()
