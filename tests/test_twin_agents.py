"""Audit s33 M5: two live agents with one node's identity (its key on a cloned machine, a second
agent started by hand) coexisted silently: the leader took two streams per node (one for an old
stream not yet noticed dead), asked planning questions on the newest, and took live servers,
renewal and client reports from both in turn. Now the leader notices when two streams of one
node, from agents with different ids (``HeartbeatRequest.agent_instance``), send interleaved
messages (a restarted agent's old stream sends nothing more), logs it, shows it as the node's
problem (``schema show``, the viewer), and neither plans (plan and start say why) nor switches
the node while it lasts.

The in-process tests run the real Leader service and the real agent code (``LeaderLink``) on
real gRPC ports, as tests/test_plan_over_stream.py does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import threading
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing

from leader import planner
from leader import service as service_module
from leader.cli.draw import render_node_problems
from leader.observe import NodeProblem, observe
from leader.rollout_core import FreezeMode, NodeState, RolloutState
from leader.schema_store import SchemaStore
from leader.schema_view import SchemaViewService
from leader.service import renewal_deadline, twins_problem
from leader.states import NodeProblemRow
from leader.store import Store
from leader.viewer import pages
from leader.viewer.i18n import Words
from leader.viewer.snapshot import Reader
from nodeagent.leader_link import LeaderLink
from tests.conftest import none_fresh
from tests.leader_rig import InProcessLeader, leader_with_a_node
from tests.test_engine import ALL_DONE, make_world, states
from tests.test_heartbeat_stream import agent_link, until
from tests.test_plan_over_stream import ENABLE_TLS, Node, commands_of, world
from tlsroll.v1 import agent_pb2, leader_pb2, schema_pb2


@contextlib.asynccontextmanager
async def second_agent(
    tmp_path: Path, rig: InProcessLeader, node: Node, name: str = "second"
) -> AsyncIterator[LeaderLink]:
    """Another agent with hb1's key and certificate (``LeaderLink``, its own journal and id),
    answering planning questions as hb1's does; closed as an agent that stops."""
    (tmp_path / name).mkdir()
    cfg = node.link.cfg
    link, _, journal = agent_link(
        tmp_path / name,
        rig.node_files,
        cfg.leader_address,
        cfg.addresses[0],
        rig.state.heartbeat_interval,  # (see ``tests.test_plan_over_stream.agent``)
    )
    link.answer_check = node.service.answer_check
    try:
        yield link
    finally:
        await link.close()
        journal.close()


def stream_ended(link: LeaderLink) -> bool:
    """``link``'s stream ended, as its agent knows (its reader saw the leader's end)."""
    stream = link._stream
    return stream is not None and stream.ended is not None


def duplicates(events: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in events if e["event"] == "heartbeat.duplicate_agent"]


async def test_two_live_agents_of_one_node_are_its_problem_and_it_is_neither_planned_nor_asked(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """hb1's agent and a second one with its identity both send on their streams: the leader
    logs ``heartbeat.duplicate_agent`` once, with both connections, and shows the node's
    problem (``schema show``), which says what to do; a plan and a start refuse hb1 with it,
    and no question goes to either agent. Once one agent stops, the problem holds
    ``TWINS_HOLD_BOUNDS`` renewal deadlines after it was last seen (on the state's clock,
    which the test moves past it), then hb1 is planned again. On ecdc160 nothing was logged
    and the plan asked the second agent."""
    async with world(tmp_path, loopback) as (rig, pool, node):
        with structlog.testing.capture_logs() as events:
            async with second_agent(tmp_path, rig, node) as twin:
                await twin.beat()  # its first message: a restart looks the same so far
                assert rig.state.node_problem("hb1") is None
                await node.link.beat()  # the first agent is alive: the two interleave
                await twin.beat()
                (seen,) = duplicates(events)
                assert seen["node"] == "hb1" and len(seen["peers"]) == 2
                problem = rig.state.node_problem("hb1")
                assert problem == twins_problem("hb1")
                assert "tlsroll nodes remove hb1" in problem

                # schema show lists it
                view = SchemaViewService(
                    SchemaStore(rig.store.db),
                    lambda: rig.clock[0],
                    node_problems=rig.state.node_problems,
                    fresh=rig.state.fresh_reports,
                    reported=rig.store.report_since_start,
                )
                shown = view._answer(schema_pb2.GetSchemaRequest(), None)
                # (The rig's leader clock stands at its own time, the agents' run: their clock
                # differs from the leader's, a problem of its own.)
                twins = schema_pb2.NODE_PROBLEM_KIND_TWIN_AGENTS
                (listed,) = [p for p in shown.node_problems if p.kind == twins]
                assert (listed.node, listed.problem) == ("hb1", problem)

                # neither plan nor start takes hb1, and neither agent is asked
                asked: list[int] = []

                async def noting(question: leader_pb2.CheckQuestion) -> leader_pb2.CheckAnswer:
                    asked.append(question.id)
                    return await node.service.answer_check(question)

                for link in (node.link, twin):
                    link.answer_check = noting
                commands = commands_of(rig, pool)
                for command in ("plan", "start"):
                    with pytest.raises(planner.Unreachable) as refused:
                        if command == "plan":
                            await commands.plan(ENABLE_TLS)
                        else:
                            await commands.start(ENABLE_TLS, "admin")
                    assert refused.value.errors["hb1"] == problem
                with pytest.raises(NodeProblem):
                    await rig.service.ask_check("hb1", agent_pb2.CheckRequest(), 5)
                assert asked == []
                for link in (node.link, twin):
                    link.answer_check = node.service.answer_check
                await node.link.beat()
                await twin.beat()
                assert len(duplicates(events)) == 1  # logged as it began, not each time
            # The second agent stopped: hb1 is free once the hold ran out.
            assert rig.state.node_problem("hb1") == problem
            ran = rig.state.monotonic
            hold = service_module.TWINS_HOLD_BOUNDS * renewal_deadline(rig.state.heartbeat_interval)
            rig.state.monotonic = lambda: ran() + hold
            assert rig.state.node_problem("hb1") is None
            seen_now = await observe(pool, ["hb1"], rig.state.ca.cert, ask=rig.service.ask_check)
            assert seen_now["hb1"].reachable


@pytest.mark.parametrize("how", ["closed", "killed"])
async def test_an_agent_restart_is_no_second_agent(
    tmp_path: Path, loopback: Callable[[], str], how: str
) -> None:
    """A restarted agent has a new id and a new stream while the leader may still hold the
    old one (``killed``: a connection not yet noticed dead; ``closed``: it said so, and its
    ``closing`` message may be read after the new stream's first): the old one sends nothing
    more, so nothing interleaves. (``closed`` sends the closing message after the new
    stream's first: sent before it, no order of reads could make a closing message that
    counted look like an interleave, and the case was not tested.)"""
    async with world(tmp_path, loopback) as (rig, _, node):
        with structlog.testing.capture_logs() as events:
            if how == "killed":
                stream = node.link._stream
                assert stream is not None
                stream.dropped = True  # the old stream stays open at the leader: no cancel
                node.link._stream = None
            async with second_agent(tmp_path, rig, node) as restarted:
                await restarted.beat()
                if how == "closed":
                    await node.link._finish_stream()  # read after the new stream's first
                for _ in range(2):
                    await restarted.beat()
                if how == "killed":
                    assert len(rig.service._streams["hb1"]) == 2
                assert rig.state.node_problem("hb1") is None
        assert duplicates(events) == []


async def test_a_killed_agent_s_last_message_ending_late_is_no_second_agent(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review 2 of session 34: a killed agent's last message that the leader finishes late (its
    store busy for a moment) ended after the restarted agent's first message: the streams were
    ordered by when their messages ended, so the old one looked interleaved with the new, a
    false twin (the node held about two minutes, the admin told to remove and re-enrol it).
    Messages are ordered by when they were read, and only one read between two of a stream's
    own counts.

    The order is made, not waited for (fixed sleeps before): the old message is read, the
    restarted agent's first message is read and answered while the old one's store write is
    held, then the write ends, then the restarted agent sends again."""
    async with world(tmp_path, loopback) as (rig, _, node):
        schema = rig.service.schema
        real = schema.record_bootstrap_failures
        busy, free = threading.Event(), threading.Event()

        def slow(*args: Any, **kwargs: Any) -> Any:  # the store busy until the test frees it
            busy.set()
            free.wait(30)
            return real(*args, **kwargs)

        schema.record_bootstrap_failures = slow  # type: ignore[method-assign]
        old = node.link._stream
        assert old is not None and old.last is not None
        (counted,) = rig.service._streams["hb1"]  # the leader's end of the old stream
        try:
            with structlog.testing.capture_logs() as events:
                late = leader_pb2.HeartbeatRequest()
                late.CopyFrom(old.last)
                failure = late.bootstrap_failures.add(
                    source="10.0.0.9", workstation="ws-a", count=3
                )
                failure.last_at.GetCurrentTime()
                await old.send(late, 5, answer=False)  # its last message; then it is killed
                old.dropped = True  # the connection not yet noticed dead at the leader
                node.link._stream = None
                await until(busy.is_set, "the leader read the old message")
                heard = counted.heard
                async with second_agent(tmp_path, rig, node) as restarted:
                    await restarted.beat()  # read after the old message, done before it
                    assert counted.heard == heard  # (the old one's write is still held)
                    free.set()
                    await until(lambda: counted.heard != heard, "the old message's write ended")
                    await restarted.beat()
                    await restarted.beat()
                    assert rig.state.node_problem("hb1") is None
        finally:
            free.set()
        assert duplicates(events) == []


async def test_an_agent_s_own_late_message_on_its_old_stream_is_no_second_agent(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """One agent's old stream (it reconnected before the leader noticed the old one dead) may
    have a message read after the new stream's: both carry the agent's id, so nothing is
    seen."""
    async with world(tmp_path, loopback) as (rig, _, node):
        old = node.link._stream
        assert old is not None and old.last is not None
        old.dropped = True
        node.link._stream = None  # the agent's reconnect: its old stream stays open
        with structlog.testing.capture_logs() as events:
            await node.link.beat()
            await node.link.beat()
            late = leader_pb2.HeartbeatRequest()
            late.CopyFrom(old.last)
            await old.send(late, 5, answer=True)  # read after the new stream's messages
            await node.link.beat()
        assert len(rig.service._streams["hb1"]) == 2
        assert duplicates(events) == [] and rig.state.node_problem("hb1") is None


async def test_three_agents_with_one_identity_are_its_problem(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review 2 of s34, F3: three agents with one key. Each new stream ends the node's oldest
    of two before that one sends a second message, so no two streams interleave: the ended
    agent's id coming back (while another agent's stream lives) is what shows it.

    Each agent beats again once it has seen its stream ended, as its run loop does (a beat
    at once, after ``reconnect_pause``), not after a fixed time (0.2 s sleeps before: an
    agent that had not yet seen its end sent nothing, a quiet beat)."""
    async with (
        world(tmp_path, loopback) as (rig, _, node),
        second_agent(tmp_path, rig, node, "b") as b,
        second_agent(tmp_path, rig, node, "c") as c,
    ):
        with structlog.testing.capture_logs() as events:
            await b.beat()
            await c.beat()  # ends the oldest of hb1's two streams: its first agent's
            # Each new stream ends the oldest again: b's, then c's, then the first agent's.
            for link in (node.link, b, c, node.link):
                await until(functools.partial(stream_ended, link), "the agent saw its stream end")
                await link.beat(quiet=True)  # a new stream: its first message is sent
        assert [e for e in events if e["event"] == "heartbeat.stream_replaced"]
        assert rig.state.node_problem("hb1") == twins_problem("hb1")
        assert len(duplicates(events)) == 1


async def test_an_agent_reconnecting_after_its_restart_evicted_its_old_stream_is_no_twin(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A killed agent's old stream (not yet noticed dead) is ended by its restarted agent's
    second stream (a reconnect): the old id never comes back, so nothing is held."""
    async with world(tmp_path, loopback) as (rig, _, node):
        with structlog.testing.capture_logs() as events:
            stream = node.link._stream
            assert stream is not None
            stream.dropped = True  # the old stream stays open at the leader: no cancel
            node.link._stream = None
            async with second_agent(tmp_path, rig, node) as restarted:
                await restarted.beat()
                assert len(rig.service._streams["hb1"]) == 2
                mine = restarted._stream
                assert mine is not None
                mine.dropped = True  # its own reconnect, the old one not yet noticed dead
                restarted._stream = None
                await restarted.beat()  # ends the killed agent's stream
                await restarted.beat()
                assert rig.state.node_problem("hb1") is None
        assert [e for e in events if e["event"] == "heartbeat.stream_replaced"]
        assert duplicates(events) == []


async def test_a_node_s_switch_waits_while_two_agents_use_its_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running rollout begins no switch of a node the leader sees a problem with (two
    agents: the Switch could reach either host, and its outcome would say nothing of the
    other), logs that once, and switches the node at the first pass after the problem ends."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    problems: dict[str, str] = {"charlie": twins_problem("charlie")}
    leader.engine.node_problem = problems.get
    await leader.start()
    with structlog.testing.capture_logs() as events:
        row = await leader.run(lambda r: states(r)["charlie"] is NodeState.SWITCHING)
        for _ in range(10):
            row = await leader.one_pass()
    assert states(row) == {
        "bravo": NodeState.DONE,
        "charlie": NodeState.SWITCHING,
        "alpha": NodeState.PENDING,  # (one node at a time)
    }
    assert world.agents.calls_to("charlie", "switch") == []
    (held,) = [e for e in events if e["event"] == "step.held"]
    assert held["node"] == "charlie" and held["reason"] == problems["charlie"]
    del problems["charlie"]
    row = await leader.run()
    assert states(row) == ALL_DONE
    assert len(world.agents.calls_to("charlie", "switch")) == 1
    await leader.stop()


async def test_a_scope_rollout_s_switch_held_for_a_lease_fails_and_unfreezes_the_scope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of s34, F1: under ``--freeze scope`` a held switch kept every node of the scope
    frozen (the engine renews their leases) for as long as the twins lasted, and ``nodes
    remove`` is refused while the rollout holds the node. Held for a freeze lease, the node
    needs attention with the problem as its reason: the rollout halts and unfreezes."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot(freeze_lease=6)
    problems: dict[str, str] = {}
    leader.engine.node_problem = problems.get
    await leader.start(freeze=FreezeMode.SCOPE)
    row = await leader.run(lambda r: states(r)["bravo"] is NodeState.DONE)
    problems["charlie"] = twins_problem("charlie")  # a cloned machine boots mid-rollout
    t0 = world.clock.monotonic()
    with structlog.testing.capture_logs() as events:
        row = await leader.run(lambda r: r.rollout.state is not RolloutState.RUNNING)
        while any(world.agents[n].frozen for n in states(row)):
            assert world.clock.monotonic() - t0 < 60
            row = await leader.one_pass()
    assert world.clock.monotonic() - t0 < 60  # a lease (6 s) and the steps after it
    assert states(row)["charlie"] is NodeState.NEEDS_ATTENTION
    (charlie,) = [r for r in row.records if r.name == "charlie"]
    assert charlie.reason is not None and twins_problem("charlie") in charlie.reason
    assert world.agents.calls_to("charlie", "switch") == []
    assert [e for e in events if e["event"] == "step.held_failed"]
    await leader.stop()


async def test_the_hold_is_on_the_state_s_clock_which_counts_a_suspend(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s37, H: the holds counted on ``time.monotonic``, which stops while the host is
    suspended: after it resumed, a hold (and the memory of an evicted agent's id) lasted the
    suspend longer. Now on the state's clock (``LeaderState.monotonic``: the suspend-counting
    ``tlsroll.clocks.elapsed`` by default), late-bound: moved past the hold, it is over. Failed
    before: the hold went on by ``time.monotonic``."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    t = [100.0]
    rig.state.monotonic = lambda: t[0]
    hold = service_module.TWINS_HOLD_BOUNDS * renewal_deadline(rig.state.heartbeat_interval)

    def beat(agent: str) -> Any:
        peer = f"ipv4:127.0.0.1:{len(agent) + 40000}"
        context = SimpleNamespace(peer=lambda: peer)
        return SimpleNamespace(name="hb1", agent=agent, context=context, cut=False, closed=False)

    first, clone = beat("id:first"), beat("id:clone")
    try:
        rig.service._twins(clone, first)
        t[0] += hold - 1
        assert rig.state.node_problem("hb1") == twins_problem("hb1")
        assert [p.node for p in rig.state.node_problems()] == ["hb1"]
        t[0] += 1
        assert rig.state.node_problem("hb1") is None and rig.state.node_problems() == []

        # an evicted agent's id that comes back: remembered for the hold, on the same clock
        rig.service._streams["hb1"] = [first]
        rig.service._note_evicted("hb1", clone.agent)
        t[0] += hold
        rig.service._came_back(clone)
        assert rig.state.node_problem("hb1") is None
        rig.service._note_evicted("hb1", clone.agent)
        t[0] += hold - 1
        rig.service._came_back(clone)
        assert rig.state.node_problem("hb1") == twins_problem("hb1")
    finally:
        rig.service._streams.clear()
        await rig.close()


def test_the_node_problem_is_on_the_viewer_s_page_and_in_schema_show(tmp_path: Path) -> None:
    """The viewer's page warns of it in both languages (what to do: call the practice IT), the
    API carries it as ``schema show --json`` prints it, and ``schema show`` draws it first,
    with what to do."""
    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    now = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
    problems = [NodeProblemRow("hb1", twins_problem("hb1"), now)]
    reader = Reader(store, schema, lambda: now, lambda _: True, [], fresh=none_fresh)
    reader.node_problems = lambda: problems
    snap = reader.read()
    (shown,) = snap.data["node_problems"]
    assert shown["node"] == "hb1" and shown["problem"] == problems[0][1]
    page = pages.PageContext("127.0.0.1", "test", now, "/events")
    for lang, words in (("de", "Zwei Agenten verwenden"), ("en", "Two agents use node hb1")):
        html = pages.schema_content(snap, Words.of(lang), page)
        assert words in html and "hb1" in html
    reader.node_problems = list
    assert "Two agents" not in pages.schema_content(reader.read(), Words.of("en"), page)
    lines = render_node_problems(snap.data["node_problems"]).lines(200, color=False)
    text = "\n".join(lines)
    assert "node problems" in text and "tlsroll nodes remove hb1" in text
    store.close()
