"""Each node's clock against the leader's between rollouts (``leader.node_clocks``): a node
whose clock drifted was noticed only when a rollout's preflight refused it, or a certificate
looked expired or not yet valid (clock audit of session 35, C). Now the leader reads every
heartbeat's ``sent_at`` against its own clock, keeps the estimate in memory, and shows a node
problem "clock differs from the leader's by N s" beyond ``WARN_SECONDS`` where node problems
appear (``schema show``, the viewer's page), and the estimate in ``tlsroll nodes`` and the
metrics; the problem ends once the clock agrees again.

* the estimate itself (pure): unknown until a second message, the less delayed of the last
  two, one late message never makes a node behind, the problem ends below ``CLEAR_SECONDS``;
* the real Leader service in this process and the agent's real heartbeat code (``LeaderLink``)
  with its clock off, on real mutual-TLS gRPC; messages with no time, and copies of an earlier
  report (a planning answer), do not count;
* a real leader daemon and a real agent daemon whose clock is off (its runtime's clock moved by
  the seconds in a file), through the CLI and the viewer's ``/metrics`` and page.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import json
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from html import unescape
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
from prometheus_client.parser import text_string_to_metric_families

from leader.node_clocks import CLEAR_SECONDS, WARN_SECONDS, NodeClocks, clock_problem
from leader.schema_store import SchemaStore
from leader.schema_view import SchemaViewService
from leader.states import NodeProblemKind
from leader.viewer import metrics, pages
from leader.viewer.i18n import Words
from leader.viewer.snapshot import Reader
from nodeagent.leader_link import LeaderLink
from tests.cluster import Cluster, wait_until
from tests.leader_rig import InProcessLeader, leader_with_a_node
from tests.test_heartbeat_stream import agent_link, ts
from tlsroll.defaults import AGENT_PORT
from tlsroll.tls import client_context
from tlsroll.v1 import agent_pb2, leader_pb2, leader_pb2_grpc, schema_pb2

T = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
CLOCK_OFFSET = NodeProblemKind.CLOCK_OFFSET


# --- the estimate -----------------------------------------------------------------------------


def test_the_estimate_is_unknown_until_a_second_message_then_the_less_delayed_of_two() -> None:
    """``x`` (sent_at less the leader's receipt) is the offset less the message's delay: the
    larger of the last two is the better. A first message alone says nothing; a node whose
    messages stop carrying a time, or whose stream ended, is unknown again."""
    clocks = NodeClocks()
    clocks.heard("a", 3.0, T)
    assert clocks.offset("a") is None and clocks.problems() == []
    clocks.heard("a", 1.5, T)  # this one took 1.5 s longer on the way
    assert clocks.offset("a") == 3.0
    clocks.heard("a", 2.0, T)
    assert clocks.offset("a") == 2.0
    clocks.forget("a")
    assert clocks.offset("a") is None and clocks.offset("never") is None


def test_one_late_message_never_makes_a_node_behind_and_two_that_say_so_do() -> None:
    """A node in step whose one message was read 90 s late (a leader busy after its start) is
    no problem; a node whose two messages in a row say it is 90 s behind is, since the first
    of them; a node ahead by more than the threshold is at its second message (its messages
    can only understate that)."""
    clocks = NodeClocks()
    late = -(WARN_SECONDS + 30.0)
    for x in (0.0, 0.01, late, 0.02):
        clocks.heard("a", x, T)
        assert not clocks.differs("a")
    assert clocks.problems() == []
    clocks.heard("b", 0.0, T)
    clocks.heard("b", late, T)
    assert not clocks.differs("b")
    later = T + dt.timedelta(seconds=20)
    clocks.heard("b", late - 1, later)
    assert clocks.problems() == [("b", late, later)]
    clocks.heard("c", WARN_SECONDS + 1.0, T)
    clocks.heard("c", WARN_SECONDS + 1.0, T)
    assert clocks.differs("c") and clocks.offset("c") == WARN_SECONDS + 1.0
    assert [node for node, _, _ in clocks.problems()] == ["b", "c"]


def test_the_problem_ends_once_the_clock_is_back_below_the_clear_threshold() -> None:
    """It ends below ``CLEAR_SECONDS``, not at the threshold itself: an offset that hovers
    around 60 s does not come and go with each message's delay. Its ``since`` stays while it
    lasts, and the leader logs its start and its end once each, not every message."""
    clocks = NodeClocks()
    with structlog.testing.capture_logs() as events:
        for x in (WARN_SECONDS + 2.0, WARN_SECONDS + 2.0, WARN_SECONDS + 3.0):
            clocks.heard("a", x, T)
        ((_, _, since),) = clocks.problems()
        for x in (WARN_SECONDS - 1, WARN_SECONDS - 1, CLEAR_SECONDS + 1, CLEAR_SECONDS + 1):
            clocks.heard("a", x, T + dt.timedelta(minutes=1))
            assert clocks.problems() == [("a", clocks.offset("a"), since)]
        for x in (CLEAR_SECONDS - 1.0, CLEAR_SECONDS - 1.0, 0.0, 0.0):
            clocks.heard("a", x, T + dt.timedelta(minutes=2))
    assert clocks.problems() == [] and not clocks.differs("a")
    assert clocks.offset("a") == 0.0
    logged = [(e["event"], e["offset"]) for e in events]
    assert logged == [("node.clock_differs", WARN_SECONDS + 2), ("node.clock_agrees", 54)]


def test_the_words_say_how_far_which_way_and_what_to_do() -> None:
    assert clock_problem(75.4).startswith("clock differs from the leader's by +75 s (ahead;")
    assert clock_problem(-300.0).startswith("clock differs from the leader's by -300 s (behind;")
    assert "NTP" in clock_problem(75.0)


# --- the real Leader service and the agent's heartbeat code ------------------------------------


@contextlib.asynccontextmanager
async def leader_and_link(
    tmp_path: Path, loopback: Callable[[], str]
) -> AsyncIterator[tuple[InProcessLeader, LeaderLink, list[float]]]:
    """The Leader service (its clock at ``T``, still) with node hb1, and hb1's ``LeaderLink``
    whose clock is the leader's and the list's seconds more (a test changes it)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    leader_address = rig.target.rsplit(":", 1)[0]
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, loopback())
    skew = [0.0]
    link.clock = lambda: rig.clock[0] + dt.timedelta(seconds=skew[0])
    try:
        yield rig, link, skew
    finally:
        await link.close()
        journal.close()
        await rig.close()


def reader_of(rig: InProcessLeader) -> Reader:
    """The viewer's reader of ``rig``'s leader, hooked to its state as the daemon hooks it."""
    reader = Reader(rig.store, SchemaStore(rig.store.db), lambda: rig.clock[0], lambda _: True, [])
    reader.node_problems = rig.state.node_problems
    reader.clock_offset = rig.state.clocks.offset
    return reader


def gauge(text: bytes, name: str) -> dict[str, float]:
    """A per-node gauge of the metrics ``text``: node -> value."""
    (family,) = [f for f in text_string_to_metric_families(text.decode()) if f.name == name]
    return {s.labels["node"]: s.value for s in family.samples}


@pytest.mark.parametrize("skew", [300.0, -300.0])
async def test_a_node_whose_clock_is_off_is_a_node_problem_until_it_agrees_again(
    tmp_path: Path, loopback: Callable[[], str], skew: float
) -> None:
    """hb1's agent beats with its clock 300 s ahead (behind): after its second message the
    leader shows the node problem, with the offset, in ``schema show``'s schema and on the
    viewer's page (German and English), and the offset in the metrics; the engine is not held
    by it (the preflight judges the clock itself). Its clock put right, the problem is gone
    within two messages and the metrics say 0. Before, nothing anywhere said so."""
    async with leader_and_link(tmp_path, loopback) as (rig, link, offset):
        offset[0] = skew
        await link.beat()
        await link.beat()
        (problem,) = rig.state.node_problems()
        assert (problem.node, problem.kind, problem.clock_offset) == ("hb1", CLOCK_OFFSET, skew)
        assert problem.problem == clock_problem(skew) and problem.since == T
        assert rig.state.node_problem("hb1") is None  # a warning: it holds nothing

        view = SchemaViewService(
            SchemaStore(rig.store.db), lambda: rig.clock[0], node_problems=rig.state.node_problems
        )
        shown = view._answer(schema_pb2.GetSchemaRequest(), None)
        (listed,) = shown.node_problems
        assert listed.node == "hb1" and listed.problem == clock_problem(skew)
        assert listed.kind == schema_pb2.NODE_PROBLEM_KIND_CLOCK_OFFSET
        assert listed.clock_offset_seconds == skew

        reader = reader_of(rig)
        snap = reader.read(times=True)
        (data,) = snap.data["node_problems"]
        assert data["kind"] == "clock-offset" and data["clock_offset_seconds"] == skew
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        seconds = f"{skew:+.0f} s"
        for lang, words in (
            ("de", f"Die Uhr von Knoten hb1 weicht um {seconds} von der des Leaders ab"),
            ("en", f"The clock of node hb1 differs from the leader's by {seconds}"),
        ):
            html = unescape(pages.schema_content(snap, Words.of(lang), page))
            assert words in html and "Two agents" not in html and "Zwei Agenten" not in html
        assert gauge(metrics.render(snap), "tlsroll_node_clock_offset_seconds") == {"hb1": skew}

        offset[0] = 0.0
        await link.beat()
        # The larger of its last two messages' offsets: ahead, the one before still says so;
        # behind, the one just come agrees already.
        assert (rig.state.node_problems() != []) == (skew > 0)
        await link.beat()
        assert rig.state.node_problems() == []
        snap = reader.read(times=True)
        assert snap.data["node_problems"] == []
        html = pages.schema_content(snap, Words.of("en"), page)
        assert "The clock of node" not in html
        assert gauge(metrics.render(snap), "tlsroll_node_clock_offset_seconds") == {"hb1": 0.0}


async def test_the_agent_stamps_a_message_as_it_goes_not_before_its_server_s_status(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """The agent reads its server's status for each message (up to ``SERVER_VIEW_SECONDS``)
    and the journal before it sends: stamped before those, the time they took counted as the
    node being behind (here 2 s a message, on a node whose clock agrees)."""
    async with leader_and_link(tmp_path, loopback) as (rig, link, _):

        async def slow_view() -> agent_pb2.ServerView:
            rig.clock[0] += dt.timedelta(seconds=2)  # two seconds pass, on both clocks
            return agent_pb2.ServerView(driver="reference", healthy=True, schemes=["http"])

        link.server_view = slow_view
        await link.beat()
        await link.beat()
        assert rig.state.clocks.offset("hb1") == 0.0


async def test_messages_without_a_time_or_copying_an_earlier_report_do_not_count(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """On one stream: two messages 300 s ahead make the problem; a planning answer, which
    copies the last report with its ``sent_at`` (here an hour old), moves nothing (taken, it
    made the node look an hour behind); a message with no ``sent_at`` (an agent that sends
    none) makes the clock unknown: no problem, no offset. Once the stream ended, unknown too."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()

    def message(sent: dt.datetime | None, answers: int = 0) -> leader_pb2.HeartbeatRequest:
        request = leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
        if sent is not None:
            request.sent_at.CopyFrom(ts(sent))
        if answers:
            request.check_answer.id = answers
        return request

    ahead = T + dt.timedelta(seconds=300)
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]

            async def send(request: leader_pb2.HeartbeatRequest) -> None:
                await stream.write(request)
                assert isinstance(await stream.read(), leader_pb2.HeartbeatResponse)

            clocks = rig.state.clocks
            for _ in range(2):
                await send(message(ahead))
            assert clocks.offset("hb1") == 300.0 and clocks.differs("hb1")
            copy = message(T - dt.timedelta(hours=1), answers=7)
            await send(copy)
            await send(copy)
            assert clocks.offset("hb1") == 300.0
            await send(message(None))
            assert clocks.offset("hb1") is None and rig.state.node_problems() == []
            for _ in range(2):
                await send(message(ahead))
            assert clocks.differs("hb1")
            await stream.done_writing()
            assert not isinstance(await stream.read(), leader_pb2.HeartbeatResponse)  # EOF

            async with asyncio.timeout(10):  # the handler's end runs after the call's
                while clocks.offset("hb1") is not None:
                    await asyncio.sleep(0.02)
            assert rig.state.node_problems() == []
    finally:
        await rig.close()


# --- a real leader and a real agent whose clock is off -----------------------------------------


SKEWED_AGENT = """
import datetime as dt, sys
from pathlib import Path
from typing import Any
from tlsroll import lean
lean.keep_out()
from nodeagent import runtime
skew_file = Path(sys.argv.pop(1))
def now():
    try:
        skew = float(skew_file.read_text())
    except (OSError, ValueError):
        skew = 0.0
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=skew)
runtime.now = now  # the agent's one clock: its service, renewal and heartbeats read it
sys.exit(runtime.main(sys.argv[1:]))
"""

METRICS_TOKEN = "scrape-token-0123456789abcdef"


def scrape(cluster: Cluster) -> bytes:
    """The viewer's ``/metrics`` with the scrape token (only the cluster CA trusted)."""
    conn = http.client.HTTPSConnection(
        cluster.address, 9444, timeout=10, context=client_context(cluster.ca_pem)
    )
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        return body
    finally:
        conn.close()


def test_a_real_agent_with_its_clock_off_shows_in_nodes_schema_and_metrics_until_put_right(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A real leader daemon (1 s interval: the agents' renewal bound is 4 s) and a real agent
    daemon whose clock is 300 s ahead: `tlsroll nodes` (table and --json) shows the offset as
    differing, `schema show` (text and --json) shows the node problem with what to do, and the
    viewer's /metrics the offset; the leader logs it once. The agent's clock put right (no
    restart), all of it ends within two of its messages."""
    skew_file = tmp_path / "skew"
    skew_file.write_text("300")
    with Cluster(tmp_path / "c", loopback(), heartbeat_interval=1) as cluster:
        cluster.init()
        token_file = tmp_path / "metrics-token"
        token_file.write_text(METRICS_TOKEN + "\n")
        token_file.chmod(0o600)
        cluster.write_leader_config({"metrics_token_file": str(token_file)})
        cluster.start_leader()
        agent = cluster.add_agent("n1", loopback(), start=False)
        agent.argv = [sys.executable, "-c", SKEWED_AGENT, str(skew_file), *agent.argv[-2:]]
        agent.start()
        cluster.wait_for_nodes_online(["n1"])

        def node() -> dict[str, object]:
            done = cluster.cli("nodes", "--json")
            assert done.returncode == 0, done.stderr
            (found,) = json.loads(done.stdout)
            assert isinstance(found, dict)
            return found

        def schema() -> dict[str, object]:
            done = cluster.cli("schema", "show", "--json")
            assert done.returncode == 0, done.stderr
            found = json.loads(done.stdout)
            assert isinstance(found, dict)
            return found

        wait_until(lambda: cluster.list_nodes()["n1"].clock_differs, 30, "n1's clock differs")
        offset = node()["clock_offset_seconds"]
        assert isinstance(offset, float)
        # Never more than the node is ahead; less by the delay of the better of two messages
        # (milliseconds; a loaded machine's seconds are allowed for).
        assert 290 < offset < 300.5
        shown_as = f"{round(offset):+d} s"
        table = cluster.cli("nodes", env={"COLUMNS": "250"}).stdout
        assert f"{shown_as}: fix NTP" in table
        problems = schema()["node_problems"]
        assert isinstance(problems, list)
        (problem,) = problems
        assert problem["node"] == "n1" and problem["kind"] == "clock-offset"
        assert re.fullmatch(
            r"clock differs from the leader's by \+(29\d|300) s \(ahead;.*NTP.*", problem["problem"]
        )
        text = cluster.cli("schema", "show", env={"COLUMNS": "250"}).stdout
        assert "node problems" in text and "clock differs from the leader's by +" in text
        assert 290 < gauge(scrape(cluster), "tlsroll_node_clock_offset_seconds")["n1"] < 300.5
        assert "node.clock_differs" in cluster.leader.event_names()

        skew_file.write_text("0")
        wait_until(lambda: not cluster.list_nodes()["n1"].clock_differs, 30, "n1 agrees")
        offset = node()["clock_offset_seconds"]
        assert isinstance(offset, float)
        assert -10 < offset < 0.5
        assert schema()["node_problems"] == []
        assert -10 < gauge(scrape(cluster), "tlsroll_node_clock_offset_seconds")["n1"] < 0.5
        assert "node.clock_agrees" in cluster.leader.event_names()


async def test_a_stream_whose_first_message_failed_leaves_no_reading_behind(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review 3 of s36, F1: a stream's first message was read into the node's clock before its
    bootstrap failures were written; that write failing (a full disk) ended the stream before
    the leader counted it, so its end forgot nothing, and the node's next stream, its clock put
    right, showed a clock problem at its FIRST message (unknown until a second, by design). The
    reading is taken last now, once the message went through."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    schema: Any = rig.service.schema

    def full(*_a: object, **_k: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    def beat(sent: dt.datetime, failure: bool = False) -> leader_pb2.HeartbeatRequest:
        request = leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
        request.sent_at.CopyFrom(ts(sent))
        if failure:
            f = request.bootstrap_failures.add(source="10.0.0.9", workstation="ws-001", count=1)
            f.last_at.CopyFrom(ts(sent))
        return request

    original = schema.record_bootstrap_failures
    schema.record_bootstrap_failures = full
    await rig.server.start()
    clocks = rig.state.clocks
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            first = stub.Heartbeats()  # type: ignore[call-arg]
            await first.write(beat(T + dt.timedelta(seconds=300), failure=True))  # 300 s ahead
            with pytest.raises(grpc.aio.AioRpcError):
                await first.read()
            schema.record_bootstrap_failures = original
            second = stub.Heartbeats()  # type: ignore[call-arg]
            await second.write(beat(T))  # the node's clock in step now
            assert isinstance(await second.read(), leader_pb2.HeartbeatResponse)
            assert not clocks.differs("hb1"), rig.state.node_problems()
            assert clocks.offset("hb1") is None  # one message: not known yet
            second.cancel()
    finally:
        await rig.close()
