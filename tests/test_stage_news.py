"""Stages left behind by a rollout that ended (session 32): a rollout stopped on a node between
its Stage and its Switch (aborted, failed, superseded, its leader gone) left
``tlsroll-tls/<rollout>/`` (its staged private key) on the node until some later rollout made a
key there, and for good on a node that no later rollout staged: the agent cannot tell that a
rollout is over. The agent now says in its heartbeats which stages it keeps with no
transaction begun (``unswitched_stages``), and the leader answers, or sends as news when a
rollout ends, which of them are for rollouts that have ended (``ended_stages``: a terminal
state, which is for good); the agent forgets those and removes their directories.

In process (the real ``LeaderService`` and the agent's real ``LeaderLink`` and journal): what
the leader says and when it reads its store. With the real daemons (leader, agents, reference
servers): the directory goes; a live rollout's stays; a stage of a rollout the leader does
not know stays."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from leader import planner
from leader import service as leader_service
from leader.rollout_core import Change, RolloutEvent, Scope
from leader.schema_store import RolloutMeta, SchemaStore
from tests.cluster import LEADER_POLL, wait_until
from tests.leader_rig import leader_with_a_node
from tests.nodeside import cluster_of
from tests.test_heartbeat_stream import agent_link, until
from tlsroll.v1 import leader_pb2

NOW = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)


def running(schema: SchemaStore, rollout_id: str) -> None:
    """A rollout ``rollout_id`` started (running) in the leader's store."""
    rollout, nodes = planner.plan_rollout(
        rollout_id=rollout_id,
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"hb1": True},
        leader="hb1",
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="hb1")
    schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW, '{"v": 1}')


def aborted(schema: SchemaStore, rollout_id: str) -> None:
    """``rollout_id`` aborted and ended (its nodes as they were: none was begun)."""
    row = schema.get(rollout_id)
    assert row is not None
    aborting = row.rollout.with_event(RolloutEvent.ABORT)
    schema.save_states(row, aborting, row.records, NOW, "admin:test")
    row = schema.get(rollout_id)
    assert row is not None
    ended = row.rollout.with_event(RolloutEvent.NODES_SETTLED)
    schema.save_states(row, ended, row.records, NOW, "engine")


def stage_rows(journal_path: Path) -> list[str]:
    with sqlite3.connect(journal_path) as db:
        return [r[0] for r in db.execute("SELECT rollout_id FROM staged ORDER BY rollout_id")]


async def test_the_leader_tells_an_agent_which_of_its_stages_are_for_rollouts_that_ended(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A stage of a live rollout is kept, and its rollout is not looked up in the store
    however many messages name it; once the rollout ends, the leader sends that as news at
    once (one store read) and the agent forgets the stage. A stage of a rollout the leader
    does not know is never said to have ended (its store may have been begun again)."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    schema = rig.service.schema
    reads: list[frozenset[str]] = []
    real = schema.ended_among

    def counted(ids: Iterable[str]) -> dict[str, bool]:
        reads.append(frozenset(ids))
        return real(ids)

    schema.ended_among = counted  # type: ignore[method-assign,assignment]
    await rig.server.start()
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    told: list[list[str]] = []

    async def forget(ids: Sequence[str]) -> None:
        told.append(list(ids))
        await asyncio.to_thread(journal.forget_stages, ids)

    link.stages_ended = forget
    key = tmp_path / "key"
    try:
        running(schema, "r-live")
        journal.record_csr("r-live", key, b"csr")
        for _ in range(3):
            await link.beat()  # each answered (not quiet): the list goes with it
        assert [b.held for b in rig.service._open] == [frozenset({"r-live"})]
        assert reads == [] and told == []  # live: no read, nothing said
        aborted(schema, "r-live")
        await until(lambda: told == [["r-live"]], "the news that r-live ended")
        assert reads == [frozenset({"r-live"})]
        await until(lambda: stage_rows(journal.path) == [], "the stage forgotten")
        await link.beat()
        assert [b.held for b in rig.service._open] == [frozenset()]

        # A rollout the store does not know: looked up once on this stream, never said ended.
        journal.record_csr("r-unknown", key, b"csr")
        for _ in range(3):
            await link.beat()
        rig.store.advance_epoch(9, now=rig.clock[0], actor="test")  # a change: the watch looks
        await link.beat()
        await asyncio.sleep(0.5)
        assert reads == [frozenset({"r-live"}), frozenset({"r-unknown"})]
        assert told == [["r-live"]] and stage_rows(journal.path) == ["r-unknown"]

        # An agent that still says it keeps a stage of an ended rollout (its removal failed)
        # is told again in the next answer, without another read (ended is for good).
        async def failing(ids: Sequence[str]) -> None:
            told.append(list(ids))
            raise OSError("disk on fire")

        link.stages_ended = failing
        running(schema, "r-again")
        journal.record_csr("r-again", key, b"csr")
        await link.beat()
        aborted(schema, "r-again")
        await until(lambda: told[-1:] == [["r-again"]], "the news that r-again ended")
        link._sent = None  # its next message is due (the bound): one that asks nothing
        await link.beat(quiet=True)
        await until(lambda: told[-2:] == [["r-again"], ["r-again"]], "told again")
        assert reads.count(frozenset({"r-again"})) == 1
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_an_agent_keeps_its_stages_when_the_leader_s_answers_have_no_ended_stages(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader of an earlier release sends ``HeartbeatResponse`` without field 8
    (``ended_stages``): the agent must keep every stage, even of a rollout that ended, and
    infer nothing from what the answers leave out. The leader here is this release's (it
    hears the stages, looks them up and means to say r-old ended), but every message it sends
    leaves with field 8 cleared, so what the agent gets is what an old leader sends; the
    agent's real ``LeaderLink`` reads it over the wire. The leader is checked to have meant to
    say it, so without the clearing the stage would go (the test above)."""
    meant: list[list[str]] = []
    real_response = leader_service.LeaderService._response

    def without_field_8(
        self: leader_service.LeaderService, *args: Any, **kwargs: Any
    ) -> leader_pb2.HeartbeatResponse:
        reply = real_response(self, *args, **kwargs)
        if reply.ended_stages:
            meant.append(list(reply.ended_stages))
        reply.ClearField("ended_stages")
        return reply

    monkeypatch.setattr(leader_service.LeaderService, "_response", without_field_8)
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    schema = rig.service.schema
    await rig.server.start()
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    told: list[Sequence[str]] = []

    async def forget(ids: Sequence[str]) -> None:
        told.append(ids)
        await asyncio.to_thread(journal.forget_stages, ids)

    link.stages_ended = forget
    try:
        running(schema, "r-old")
        journal.record_csr("r-old", tmp_path / "key", b"csr")
        await link.beat()
        aborted(schema, "r-old")
        await until(lambda: meant != [], "the leader meaning to say r-old ended")
        for _ in range(3):
            await link.beat()  # each answered: the leader means to say it again each time
        assert told == [] and stage_rows(journal.path) == ["r-old"], "the stage was removed"
        assert len(meant) >= 4 and all(ids == ["r-old"] for ids in meant), meant
    finally:
        await link.close()
        journal.close()
        await rig.close()


def test_a_stage_of_a_rollout_that_ended_leaves_its_node_within_heartbeats(
    tmp_path: Path,
) -> None:
    """Real daemons. Rollout R runs on node2 and node3; node3's agent is stopped (SIGSTOP), so
    R waits on node3's preflight while node2 is done. node1 holds a stage of R (made as the
    leader's engine makes one, by CreateCSR and Stage; its switch would come in R's turn):
    while R runs, the stage stays. R is aborted: it ends at once, and no later rollout
    stages node1; node1's stage directory (its private key) and its journal row go within a
    few heartbeats (the old agent kept them for good). The leader runs at the debug level: it
    says each message of an agent's that carries stages (``heartbeat.stages_heard``), which the
    test waits for, not a time."""
    with cluster_of(tmp_path, 3, step_deadline=60, prepare_ahead=0, log_level="debug") as (
        cluster,
        nodes,
    ):
        node1, _, node3 = nodes
        assert node3.agent is not None
        pw = tmp_path / "pw"
        pw.touch(0o600)
        pw.write_text("stage-news-password-for-practice\n")
        start = cluster.cli(
            *("rollout", "start", "--scope", "nodes", "--nodes", "node2,node3"),
            *("--password-file", str(pw), "--yes"),
        )
        assert start.returncode == 0, start.stderr
        node3.agent.send_signal(signal.SIGSTOP)
        try:

            def states() -> dict[str, str]:
                return {n["name"]: n["state"] for n in cluster.poll_newest_rollout()["nodes"]}

            wait_until(
                lambda: states() == {"node2": "done", "node3": "preflight"},
                60,
                "node2 done, node3 waiting in its preflight",
            )
            rollout = cluster.newest_rollout()
            assert rollout["state"] == "running"
            rid = rollout["id"]
            (epoch,) = [r["epoch"] for r in cluster.store_table("rollouts") if r["id"] == rid]
            node1.send_stage(rid, node1.sign(node1.create_csr(rid, epoch)))
            staged = node1.stage_dir(rid)
            assert (staged / "server.key").exists()
            # The list goes to the leader at the renewal bound (4 s here) at the latest, and
            # the leader keeps quiet: two of node1's messages with the stage heard and looked
            # at, neither finding R ended (the first one's answer went before the second).

            def heard() -> list[dict[str, Any]]:
                return [
                    e
                    for e in cluster.leader.log_events()
                    if e["event"] == "heartbeat.stages_heard"
                    and e["node"] == "node1"
                    and rid in e["stages"]
                ]

            wait_until(lambda: len(heard()) >= 2, 60, "node1's stage heard twice by the leader")
            assert all(e["ended"] == [] for e in heard()), heard()
            assert (staged / "server.key").exists()
            assert stage_rows(node1.journal_path) == [rid]

            abort = cluster.cli("rollout", "abort")
            assert abort.returncode == 0, abort.stderr
            wait_until(
                lambda: cluster.poll_newest_rollout()["state"] == "aborted",
                30,
                "the abort",
                interval=LEADER_POLL,
            )
            wait_until(lambda: not staged.exists(), 30, "the aborted rollout's stage removed")
            assert stage_rows(node1.journal_path) == []
            assert not (node1.config_dir / "tlsroll-tls" / rid).exists()
        finally:
            node3.agent.send_signal(signal.SIGCONT)
        assert node1.agent is not None
        removed = [ln for ln in node1.agent.log_text().splitlines() if "stage.removed" in ln]
        assert len(removed) == 1 and "its rollout ended" in removed[0], removed
