"""Issue 15: the planning question (``leader.observe``: ``tlsroll plan`` and a rollout's start)
goes over the agent's own ``Leader.Heartbeats`` stream, already open, not over a channel the
leader opens to every node (an mTLS handshake each, ~2.2-2.6 ms of the leader's CPU, and the
agent pool keeps only 16: a node planned but not kept had a second one opened for its steps).

The in-process tests run the real Leader service and the real agent code (``LeaderLink``, and
``NodeAgentService`` served over mutual TLS on the node's address) in this process, on real gRPC
ports, with a real agent pool whose channel opens are counted; the last test runs the real
daemons and ``tlsroll plan``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import functools
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
import pytest

from leader import agent_client, planner
from leader import observe as observe_module
from leader.agent_client import AgentPool
from leader.cli.rollout import rollout_request
from leader.commands import Commands, RolloutRequest
from leader.observe import StreamEnded, observe
from leader.rollout_core import Change, NodeObservation, Scope
from leader.schema_store import SchemaStore
from leader.store import Node as StoredNode
from leader.store import NotFound, Store
from nodeagent import leader_link
from nodeagent import service as service_module
from nodeagent.drivers import ServerFacts
from nodeagent.identity import Identity
from nodeagent.journal import Journal
from nodeagent.leader_link import LeaderLink
from nodeagent.service import NodeAgentService
from tests.cluster import secure_channel
from tests.leader_rig import InProcessLeader, leader_with_a_node
from tests.nodeside import cluster_of, port_holder
from tests.test_engine import VERIFIER_1
from tests.test_heartbeat_stream import agent_link
from tests.test_perf_shape import channels_opened
from tests.test_warm_ahead import ready
from tlsroll import pki, spiffe
from tlsroll.clients import ClientsView
from tlsroll.defaults import AGENT_PORT, HTTPS_PORT
from tlsroll.enums import SERVER_RESTARTING
from tlsroll.errors import TransientError
from tlsroll.v1 import agent_pb2, agent_pb2_grpc, leader_pb2, leader_pb2_grpc, types_pb2


@dataclass
class StubDriver:
    """A managed server that is only facts: http on the node's address; ``down``: what its
    health check says (None: healthy)."""

    address: str
    config_file: Path
    down: str | None = None
    name: str = "stub"

    def facts(self) -> ServerFacts:
        return ServerFacts(self.address, "/app/", 18080, HTTPS_PORT, ("http",))

    async def status(self) -> dict[str, Any]:
        return {"frozen": False}

    async def health(self) -> str | None:
        return self.down

    async def status_problem(self) -> str | None:  # (the preflight's: ``Driver``'s)
        return self.down

    def render_problem(self) -> str | None:  # (the checks' since review s66 walk M1)
        return None  # renders from no template

    async def clients(self) -> ClientsView:
        return ClientsView()


class Held:
    """An agent's answer that waits until ``go`` is set (``LeaderLink.answer_check``)."""

    def __init__(self, answer: Callable[[leader_pb2.CheckQuestion], Awaitable[Any]]) -> None:
        self.answer = answer
        self.asked: asyncio.Queue[leader_pb2.CheckQuestion] = asyncio.Queue()
        self.go = asyncio.Event()

    async def __call__(self, question: leader_pb2.CheckQuestion) -> leader_pb2.CheckAnswer:
        await self.asked.put(question)
        await self.go.wait()
        return await self.answer(question)  # type: ignore[no-any-return]


@dataclass
class Node:
    """The node's agent in this process: its heartbeat link and its NodeAgent service."""

    name: str
    link: LeaderLink
    service: NodeAgentService
    journal: Journal
    held: Held | None  # its answers, held until told (``agent``'s ``hold``)


@contextlib.asynccontextmanager
async def agent(
    tmp_path: Path,
    rig: InProcessLeader,
    node_address: str,
    *,
    driver: bool = True,
    down: str | None = None,
    skew: dt.timedelta = dt.timedelta(0),
    answers: bool = True,
    hold: bool = False,
    listen: str | None = None,
    pin: int | None = None,
) -> AsyncIterator[Node]:
    """Node hb1's agent: ``LeaderLink`` (one beat done: its stream in renewal mode; ``answers``:
    it says it answers planning questions) and ``NodeAgentService`` on ``node_address``'s
    agent port (``driver``: a ``StubDriver``, else none configured; its clock ``skew`` ahead);
    ``hold``: its answers wait for ``Node.held.go``; ``listen``: the NodeAgent service listens
    on this address instead (the leader dials the node's, where nothing listens); ``pin``: it
    holds that serial of a leader that announced serials (``LeaderLink.pin``)."""
    leader_address = rig.target.rsplit(":", 1)[0]
    # At the leader's interval: an agent at another one opens its channel again at its second
    # beat, to time its PINGs by the leader's (``LeaderLink.leader_interval``).
    link, trust, journal = agent_link(
        tmp_path, rig.node_files, leader_address, node_address, rig.state.heartbeat_interval
    )
    if pin is not None:
        link.pin, link.announces = pin, True
    files = tmp_path / "agent"
    key_pem, cert_pem, ca_pem = rig.node_files
    identity = Identity.of(
        files / "key.pem",
        files / "cert.pem",
        files / "ca.pem",
        pki.load_cert_pem(cert_pem),
        pki.load_cert_pem(ca_pem),
    )
    (tmp_path / "server").mkdir()
    stub = StubDriver(node_address, tmp_path / "server" / "server.toml", down)
    svc = NodeAgentService(
        link.cfg,
        identity,
        journal,
        stub if driver else None,  # type: ignore[arg-type]  # the driver's part Check uses
        None,
        lambda: dt.datetime.now(dt.UTC) + skew,
        trust,
    )
    server = grpc.aio.server()
    agent_pb2_grpc.add_NodeAgentServicer_to_server(svc, server)
    server.add_secure_port(
        f"{listen or node_address}:{AGENT_PORT}",
        grpc.ssl_server_credentials([(key_pem, cert_pem)], ca_pem, require_client_auth=True),
    )
    await server.start()
    held = Held(svc.answer_check) if hold else None
    if answers:
        link.answer_check = held or svc.answer_check
    try:
        await link.beat()
        yield Node("hb1", link, svc, journal, held)
    finally:
        await link.close()
        await server.stop(None)
        journal.close()


def pool_of(rig: InProcessLeader) -> AgentPool:
    """The leader's agent pool, dialling with the leader's certificate."""
    key, cert = rig.leader_files
    creds = grpc.ssl_channel_credentials(rig.state.ca.cert_pem, key, cert)
    return AgentPool(rig.store, creds, rig.state.trust_domain)


@contextlib.asynccontextmanager
async def world(
    tmp_path: Path, loopback: Callable[[], str], **options: Any
) -> AsyncIterator[tuple[InProcessLeader, AgentPool, Node]]:
    """The Leader service in this process on a loopback address (node hb1 enrolled), its
    agent pool, and hb1's agent on another (``agent``, with ``options``)."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    await rig.server.start()
    pool = pool_of(rig)
    try:
        async with agent(tmp_path, rig, node_address, **options) as node:
            yield rig, pool, node
    finally:
        await pool.close()
        await rig.close()


CASES: dict[str, dict[str, Any]] = {
    "ready": {},
    # (a driver's words name the server: the preflight's problem names it once: session 68)
    "blocked": {"down": "managed server not answering: 503", "skew": dt.timedelta(minutes=10)},
    "refused": {"driver": False},
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_planning_asks_on_the_stream_opens_no_channel_and_sees_what_check_sees(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The leader asks the node's agent on its heartbeat stream: the pool opens no channel to
    it (on d39e527 planning opened one to every node), and what the plan sees is what the
    channel's Check (and, for an agent that refuses its checks, GetStatus) gives: a ready
    node, a blocked one (its server's health and its clock's skew), one that refuses (no
    managed server: the refusal as its problem, its server view)."""
    opened = channels_opened(monkeypatch)
    async with world(tmp_path, loopback, **CASES[case]) as (rig, pool, _):
        on_stream = await observe(pool, ["hb1"], rig.state.ca.cert, ask=rig.service.ask_check)
        assert sum(opened.values()) == 0
        on_channel = await observe(pool, ["hb1"], rig.state.ca.cert)
        assert opened["hb1"] == 1  # the channel's Check, for the comparison
    assert on_stream == on_channel
    seen = on_stream["hb1"]
    if case == "ready":
        assert seen.reachable and seen.problems == () and seen.schemes == ("http",)
    elif case == "blocked":
        assert seen.reachable
        assert list(seen.problems) == [
            "managed server not healthy: not answering: 503",
            "clock differs from the leader's by +600s (limit 120s); fix NTP",
        ]
    else:
        assert not seen.reachable and "no managed server" in seen.error
    assert all(not b.questions for b in rig.service._open)  # nothing left waiting


@pytest.mark.parametrize("where", ["stream", "channel"])
async def test_the_clock_is_compared_as_the_question_comes_not_after_the_checks(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The node's clock agrees with the leader's; its server's health check is slow (here it
    takes 150 s of the node's clock). The leader's time in the question is compared with the
    node's clock when the question came: the node is ready. It was compared after the checks,
    and such a node failed with "clock differs ... by +150s; fix NTP" (clock audit I of
    session 35)."""
    async with world(tmp_path, loopback) as (rig, pool, node):
        late = [dt.timedelta(0)]
        node.service.clock = lambda: dt.datetime.now(dt.UTC) + late[0]

        async def slow_health() -> str | None:
            late[0] += dt.timedelta(seconds=150)
            return None

        monkeypatch.setattr(node.service.driver, "status_problem", slow_health)
        ask = rig.service.ask_check if where == "stream" else None
        seen = (await observe(pool, ["hb1"], rig.state.ca.cert, ask=ask))["hb1"]
    assert seen.reachable and seen.problems == (), seen
    assert late[0] > dt.timedelta(0)  # the slow check ran


@pytest.mark.parametrize("where", ["stream", "channel"])
async def test_a_node_whose_disk_is_full_is_planned_blocked_with_it_not_unreachable(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Brief s39small: the agent's checks fail with ENOSPC (its disk is full). Its answer
    (RESOURCE_EXHAUSTED "disk full: …", on the stream and over the real mTLS channel alike;
    it was UNAVAILABLE) makes the node reachable, with the full disk as its problem (the plan
    shows it blocked, exit 1), not an agent the leader "cannot ask what it runs"."""
    async with world(tmp_path, loopback) as (rig, pool, node):
        path = tmp_path / "probe"

        async def full(*args: object) -> NoReturn:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(node.service, "_checks", full)
        ask = rig.service.ask_check if where == "stream" else None
        seen = (await observe(pool, ["hb1"], rig.state.ca.cert, ask=ask))["hb1"]
    assert seen.reachable, seen
    assert seen.problems == (
        f"its checks: agent hb1: the node's disk is full: {path}: No space left on device"
        " (errno 28, ENOSPC)",
    ), seen


@pytest.mark.parametrize("how", ["cannot answer", "no stream", "unary heartbeats"])
async def test_an_agent_that_cannot_answer_on_a_stream_is_asked_over_the_channel(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """An agent that does not say it answers (an older one), one with no stream open, and one
    on unary heartbeats (an older leader's fallback) are asked with Check over the channel,
    as before: the same observation, one channel opened."""
    opened = channels_opened(monkeypatch)
    async with world(tmp_path, loopback, answers=how != "cannot answer") as (rig, pool, node):
        if how == "no stream":
            await node.link._finish_stream()
            async with asyncio.timeout(30):
                while rig.service._open:
                    await asyncio.sleep(0.02)
        elif how == "unary heartbeats":
            await node.link._finish_stream()
            node.link.streaming = False
            await node.link.beat()
        assert await rig.service.ask_check("hb1", agent_pb2.CheckRequest(), 5) is None
        seen = await observe(pool, ["hb1"], rig.state.ca.cert, ask=rig.service.ask_check)
        assert opened["hb1"] == 1
        assert seen["hb1"].reachable and seen["hb1"].problems == ()


async def planning(
    rig: InProcessLeader, pool: AgentPool, held: Held
) -> tuple[asyncio.Future[dict[str, NodeObservation]], leader_pb2.CheckQuestion]:
    """hb1 planned (observe, asking on the stream) in a task of its own, once its agent has
    the question (and holds its answer): the task and the question."""
    asked = asyncio.ensure_future(
        observe(pool, ["hb1"], rig.state.ca.cert, ask=rig.service.ask_check)
    )
    async with asyncio.timeout(30):
        return asked, await held.asked.get()


async def test_a_stream_that_ends_before_its_answer_falls_back_to_the_channel(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream a question was asked on ends before the answer (the agent restarts, moves to
    a renewed certificate, the leader cuts the stream): the question fails at once
    (``StreamEnded``, not the deadline), and observe asks over the channel in the time the
    deadline has left, as it asks an agent without a stream: the end says nothing of whether
    the agent can answer (an agent that vanished fails the channel's Check too, and is
    reported unreachable with that reason)."""
    opened = channels_opened(monkeypatch)
    async with world(tmp_path, loopback, hold=True) as (rig, pool, node):
        assert node.held is not None
        held = node.held
        asked, _ = await planning(rig, pool, held)
        node.link._drop_stream()  # ends as a killed agent's would, mid-question
        async with asyncio.timeout(30):
            seen = await asked
        assert seen["hb1"].reachable and seen["hb1"].problems == ()
        assert opened["hb1"] == 1  # the channel's Check

        # The service's part: the question fails with the stream, and nothing is kept.
        await node.link.beat()
        question = asyncio.ensure_future(rig.service.ask_check("hb1", agent_pb2.CheckRequest(), 30))
        async with asyncio.timeout(30):
            await held.asked.get()
        node.link._drop_stream()
        with pytest.raises(StreamEnded):
            async with asyncio.timeout(30):
                await question
        assert all(not b.questions for b in rig.service._open)


@pytest.mark.parametrize("answers", [True, False])
async def test_a_question_on_a_stream_its_restarted_agent_left_is_asked_on_its_new_one(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch, answers: bool
) -> None:
    """Audit s33 L5: the agent restarted while the leader had not yet noticed its old stream
    dead (a killed agent's connection ends only at the keepalive): a question asked on the old
    one waited out its whole deadline and the node was reported unreachable ("no answer
    within"), though the new agent's stream was open by then. Once a newer stream of the node
    has a message accepted, the question is asked on it: answered there, no channel opened
    (or, if the new agent does not answer on its stream, over the channel in the time left).
    On ecdc160: "no answer within 3 s"."""
    monkeypatch.setattr(observe_module, "OBSERVE_TIMEOUT", 3.0)
    opened = channels_opened(monkeypatch)
    async with world(tmp_path, loopback, hold=True) as (rig, pool, node):
        assert node.held is not None
        asked, _ = await planning(rig, pool, node.held)  # the old agent never answers it
        (tmp_path / "restarted").mkdir()
        cfg = node.link.cfg
        link, _, journal = agent_link(
            tmp_path / "restarted", rig.node_files, cfg.leader_address, cfg.addresses[0]
        )
        link.answer_check = node.service.answer_check if answers else None
        try:
            await link.beat()  # the new agent's stream: counted beside the old one
            async with asyncio.timeout(30):
                seen = await asked
        finally:
            await link.close()
            journal.close()
        assert seen["hb1"].reachable and seen["hb1"].problems == ()
        assert opened.get("hb1", 0) == (0 if answers else 1)  # on the new stream, or not
        assert all(not b.questions for b in rig.service._open)
        node.held.go.set()


async def test_an_answer_the_agent_cannot_make_in_time_is_given_up_and_frees_its_place(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that hangs (a driver's status command) is cancelled after ``ANSWER_SECONDS``,
    as a Check call is at its deadline, and its place among ``QUESTIONS_AT_ONCE`` is free
    again; the leader reported the node unreachable at its own deadline meanwhile."""
    monkeypatch.setattr(observe_module, "OBSERVE_TIMEOUT", 1.0)
    monkeypatch.setattr(leader_link, "ANSWER_SECONDS", 2.0)
    async with world(tmp_path, loopback, hold=True) as (rig, pool, node):
        assert node.held is not None
        asked, _ = await planning(rig, pool, node.held)
        assert (await asked)["hb1"] == NodeObservation(False, "no answer within 1 s")
        stream = node.link._stream
        assert stream is not None and len(stream._answering) == 1
        async with asyncio.timeout(30):
            while stream._answering:
                await asyncio.sleep(0.05)


async def test_a_question_the_agent_has_no_room_for_is_asked_over_the_channel(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 2 of review 1: the agent answers ``QUESTIONS_AT_ONCE`` questions at once; the
    leader's count of waiting questions frees at its own deadline, so it may ask one more
    while the agent is still busy with the others (their checks hang). The agent says so
    (``BUSY``) and the leader asks over the channel in the time left: the node is seen, not
    reported "no answer within" (as on d1993b7, where the agent dropped it). The agent's
    bound on an answer is the leader's deadline."""
    assert leader_link.ANSWER_SECONDS == observe_module.OBSERVE_TIMEOUT
    monkeypatch.setattr(leader_link, "ANSWER_SECONDS", 60.0)  # checks that hang
    opened = channels_opened(monkeypatch)
    async with world(tmp_path, loopback, hold=True) as (rig, pool, node):
        assert node.held is not None
        for _ in range(leader_link.QUESTIONS_AT_ONCE):
            with pytest.raises(TimeoutError):
                await rig.service.ask_check("hb1", agent_pb2.CheckRequest(), 0.3)
        stream = node.link._stream
        assert stream is not None and len(stream._answering) == leader_link.QUESTIONS_AT_ONCE
        assert all(not b.questions for b in rig.service._open)  # the leader's count is free
        async with asyncio.timeout(30):
            seen = await observe(pool, ["hb1"], rig.state.ca.cert, ask=rig.service.ask_check)
        assert seen["hb1"].reachable and seen["hb1"].problems == ()
        assert opened["hb1"] == 1


async def test_an_answer_carries_the_agent_s_revocation_list_and_epoch_as_now(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Finding 5 of review 1: an answer is a copy of the last report, but its revocation
    list's number and highest epoch are the agent's now (as a report would carry them): one
    that took a newer list since its last report does not tell the leader it holds the older
    one (the leader would send the list again). On d1993b7 the answer carried the last
    report's."""
    async with world(tmp_path, loopback) as (rig, _, node):
        stream = node.link._stream
        assert stream is not None
        last = stream.last
        assert last is not None
        written: list[leader_pb2.HeartbeatRequest] = []
        write = stream._write

        async def noting(request: leader_pb2.HeartbeatRequest, **how: Any) -> int:
            written.append(request)
            return await write(request, **how)

        stream._write = noting  # type: ignore[method-assign,assignment]
        node.link.trust.crl_number = last.crl_number + 3  # a newer list taken since
        node.journal.admit_epoch(last.highest_epoch + 2)  # a newer epoch seen since
        answer = await rig.service.ask_check("hb1", agent_pb2.CheckRequest(), 30)
        assert answer is not None and not answer.refused_code
        (message,) = written
        assert message.HasField("check_answer")
        assert message.crl_number == last.crl_number + 3
        assert message.highest_epoch == last.highest_epoch + 2
        (beat,) = rig.service._streams["hb1"]
        assert beat.crl_number == last.crl_number + 3


async def test_an_answer_made_while_a_newer_report_went_out_carries_the_newer_report(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Audit s33 L1: an answer is a copy of the agent's last report, and the leader takes it as
    the node's report. The copy was taken before the answer's last await (the revocation list's
    number and epoch as now, a worker-thread hop); a report sent meanwhile (the server went
    down) was then followed by the older copy, and the leader showed the server healthy again
    until the agent's next message (the renewal bound). On ecdc160 the leader ends on
    "http"."""
    async with world(tmp_path, loopback) as (rig, _, node):
        view = agent_pb2.ServerView(driver="reference", healthy=True, schemes=["http"])

        async def server_view() -> agent_pb2.ServerView:
            return view

        node.link.server_view = server_view
        await node.link.beat()
        assert rig.state.live_servers["hb1"] == "http"
        stream = node.link._stream
        assert stream is not None and stream._now is not None
        now, asking, go = stream._now, asyncio.Event(), asyncio.Event()

        async def slow_now() -> tuple[int, int]:
            asking.set()
            await go.wait()
            return await now()

        stream._now = slow_now
        asked = asyncio.ensure_future(rig.service.ask_check("hb1", agent_pb2.CheckRequest(), 30))
        async with asyncio.timeout(30):
            await asking.wait()
            view.healthy, view.detail = False, "it answers 503"
            await node.link.beat()  # the newer report, written while the answer waits
            assert rig.state.live_servers["hb1"] == "down: it answers 503"
            go.set()
            answer = await asked
        assert answer is not None and not answer.refused_code
        assert rig.state.live_servers["hb1"] == "down: it answers 503"


async def test_an_answer_on_one_node_s_stream_cannot_answer_another_node_s_question(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A question is answered only by a message on the stream it was asked on, whose every
    message carries its node's certificate: node hb2's stream sends an answer with the number
    of hb1's question, which stays unanswered (hb1's agent holds its answer) until its
    deadline: hb1 is reported unreachable, "no answer within", not with hb2's answer."""
    monkeypatch.setattr(observe_module, "OBSERVE_TIMEOUT", 2.0)
    async with world(tmp_path, loopback, hold=True) as (rig, pool, node):
        assert node.held is not None
        held = node.held
        asked, question = await planning(rig, pool, held)
        forged = await node.service.answer_check(question)  # what hb1 would say
        other = rig.add_node("hb2", loopback())
        async with other_stream(rig, other) as stream:
            await stream.write(leader_pb2.HeartbeatRequest(agent_version="x", renews=True, seq=1))
            await stream.read()  # its first message is answered: counted for hb2
            await stream.write(
                leader_pb2.HeartbeatRequest(
                    agent_version="x", renews=True, seq=2, check_answer=forged
                )
            )
            async with asyncio.timeout(30):
                seen = await asked
        assert seen["hb1"] == NodeObservation(False, "no answer within 2 s")
        held.go.set()
        assert all(not b.questions for b in rig.service._open)


def commands_of(rig: InProcessLeader, pool: AgentPool) -> Commands:
    """The leader's commands (plan, start) over ``rig``'s store, planning as the leader daemon
    does (``leader.runtime``): on the streams, the way in proved by ``pool.reach``."""
    ask = functools.partial(
        observe, pool, ca=rig.state.ca.cert, ask=rig.service.ask_check, reach=pool.reach
    )
    return Commands(
        rig.store, SchemaStore(rig.store.db), lambda: rig.clock[0], lambda _: True, None,
        lambda: None, observe=ask, channels=pool,
    )  # fmt: skip


ENABLE_TLS = RolloutRequest(Change.ENABLE_TLS, Scope.cluster(), auth_verifier_json=VERIFIER_1)


@pytest.mark.parametrize("command", ["plan", "start"])
async def test_a_node_whose_agent_port_the_leader_cannot_reach_is_unreachable(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Finding 1 of review 1: hb1's agent answers on its heartbeat stream, but its NodeAgent
    service listens on another address than the one the leader dials (a firewall, a stale
    address, the port not listening). The plan says it is unreachable and why (a plain TCP
    connection refused; no channel opened), and a start is refused before anything switches,
    with the very reason the channel's Check gives (it opens the channel of its first node).
    On d1993b7 both saw hb1 ready."""
    opened = channels_opened(monkeypatch)
    async with world(tmp_path, loopback, listen=loopback()) as (rig, pool, _):
        commands = commands_of(rig, pool)
        with pytest.raises(planner.Unreachable) as refused:
            if command == "plan":
                await commands.plan(ENABLE_TLS)
            else:
                await commands.start(ENABLE_TLS, "admin")
        error = refused.value.errors["hb1"]
        if command == "plan":
            assert sum(opened.values()) == 0
            address = rig.store.get_node("hb1").addresses[0]
            assert (
                error == f"agent hb1: cannot connect to {address}:{AGENT_PORT}: Connection refused"
            )
            assert "hb1" not in pool.clients  # (nor a client made for the question)
        else:
            # Its channel, then a new one for the Check whose reason the refusal gives: a
            # channel whose connect failed is not asked over (``AgentClient.renew_failed``).
            assert opened["hb1"] == 2
            on_channel = await observe(pool, ["hb1"], rig.state.ca.cert)
            assert error == on_channel["hb1"].error


async def test_a_start_opens_the_channels_of_its_first_nodes_and_a_plan_none(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning for a start opens the channels of the nodes it steps first and leaves them
    open for their steps (the handshake they need anyway, off the first switch's path); a plan
    opens none; neither opens a second one."""
    opened = channels_opened(monkeypatch)
    async with world(tmp_path, loopback) as (rig, pool, _):
        commands = commands_of(rig, pool)
        await commands.plan(ENABLE_TLS)
        assert sum(opened.values()) == 0
        await commands.start(ENABLE_TLS, "admin")
        assert opened == {"hb1": 1}
        assert pool.clients["hb1"].open
        await (await pool.get("hb1")).check(agent_pb2.CheckRequest())  # its first step's
        assert opened == {"hb1": 1}


@contextlib.asynccontextmanager
async def other_stream(rig: InProcessLeader, creds: grpc.ChannelCredentials) -> AsyncIterator[Any]:
    """A Heartbeats stream with another node's credentials."""
    options = [("grpc.ssl_target_name_override", spiffe.leader_host(rig.state.trust_domain))]
    async with grpc.aio.secure_channel(rig.target, creds, options) as channel:
        call = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]
        try:
            yield call
        finally:
            call.cancel()


def outbound_to(pid: int, port: int) -> int:
    """The process's established TCP connections to remote ``port`` (/proc/PID/net/tcp*,
    matched to its socket descriptors by inode)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def test_tlsroll_plan_asks_the_real_agents_on_their_streams_and_opens_no_channel(
    tmp_path: Path,
) -> None:
    """Real daemons: ``tlsroll plan`` sees node2 blocked (its https port taken) with the very
    problem its agent's Check gives over a channel, and the leader holds no connection to any
    agent's port afterwards (on d39e527 the plan opened one to each node and the pool kept
    them; since review 1's finding 1 a plan proves the way in with a plain TCP connection per
    node, closed at once, and opens no channel: only a start opens those of its first nodes)."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node2 = nodes[1]
        with port_holder(node2.address, HTTPS_PORT):
            plan = cluster.cli("plan", "--scope", "cluster")
            assert plan.returncode == 1, plan.stderr  # a blocked node: exit 1 (brief s39small)
            assert outbound_to(cluster.leader.pid, AGENT_PORT) == 0
            chain, key = cluster.leader_credentials()
            target = f"{node2.address}:{AGENT_PORT}"
            name = cluster.agent_tls_name("node2")
            with secure_channel(target, cluster.ca_pem, chain, key, name=name) as channel:
                checked = agent_pb2_grpc.NodeAgentStub(channel).Check(
                    agent_pb2.CheckRequest(), timeout=30
                )
        (problem,) = checked.problems
        assert f"port {HTTPS_PORT} (https)" in problem
        assert problem in plan.stdout, (problem, plan.stdout)


def test_a_start_right_after_an_agent_restart_reaches_it_though_the_leader_tried_it_while_down(
    tmp_path: Path,
) -> None:
    """Session 42, real daemons: node2's agent stops, a start asks it meanwhile (refused: the
    node cannot be asked), and once the started agent has been heard again a start reaches it
    at once. On the code before, the leader's channel to node2, whose connect had failed
    while the agent was down, failed every call at once until its reconnect backoff was over
    (up to 2.4 s), and the start was refused "cannot ask the agent of node2 ... Connection
    refused" (5 starts of 5 in one run, 1 of 4 in another: the backoff's phase decides). The
    start's planning is all this looks at: its verifier is bad, so that it is refused after
    its planning, for that, and nothing starts."""
    request = rollout_request("nodes", "node2", 1, "node", "enable-tls")
    request.auth_verifier_json = "{"
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node2 = nodes[1]
        assert node2.agent is not None

        def start() -> str:
            with cluster.admin() as admin:
                try:
                    admin.StartRollout(request, timeout=60)
                except grpc.RpcError as exc:
                    return str(exc.details())
            raise AssertionError("a start with a bad verifier started")

        for _ in range(3):  # the window is the backoff's phase as the agent comes back
            node2.agent.stop()
            said = start()  # the channel tries it: refused
            assert "cannot ask the agent of node2" in said, said
            time.sleep(4)  # (its reconnect backoff grows to its top, 2 s)
            node2.start_agent_heard()
            said = start()
            assert said.startswith("bad password verifier: "), said  # planned: node2 reached


class Listed:
    """The store as ``AgentPool`` reads it: nodes on 127.0.0.1 at their ports; ``fail``: how
    many listings in a row fail first ("database is locked"). A node not listed is not found
    (removed since the online listing)."""

    nodes_generation = 1

    def __init__(self, ports: dict[str, int], fail: int = 0) -> None:
        when = dt.datetime.now(dt.UTC)
        self.nodes = {
            name: StoredNode(name, ("127.0.0.1",), (), "x", port, "pin", "", "", when, when, None)
            for name, port in ports.items()
        }
        self.fail = fail

    def list_nodes(self) -> list[StoredNode]:
        if self.fail:
            self.fail -= 1
            raise sqlite3.OperationalError("database is locked")
        return list(self.nodes.values())

    def get_node(self, name: str) -> StoredNode:
        if name not in self.nodes:
            raise NotFound(f"no enrolled node named {name!r}")
        return self.nodes[name]


@contextlib.contextmanager
def listening(backlog: int = 16) -> Iterator[int]:
    """A TCP listener on 127.0.0.1 that never accepts: its port. ``backlog`` 0: its queue is
    filled first, so that a connection to it is dropped (no answer to its SYN), as a firewall
    that DROPs would."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket())
        server.bind(("127.0.0.1", 0))
        server.listen(backlog)
        port = int(server.getsockname()[1])
        for _ in range(4 if backlog == 0 else 0):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port


def pool_over(store: Listed) -> AgentPool:
    return AgentPool(cast(Store, store), grpc.ssl_channel_credentials(), "example.org")


async def test_a_node_not_dialled_by_its_deadline_says_so_and_is_not_waited_for_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review 2, finding 1: one dial at a time (``DIAL_AT_ONCE``), the first node's port drops
    the connection (a firewall), the second's listens. The second's deadline covers its wait
    for the dial slot too: it comes back by it, saying that it was not dialled and why (on
    44aa7dd it waited for the first's dial to time out, then got its own full timeout)."""
    monkeypatch.setattr(agent_client, "DIAL_AT_ONCE", 1)
    with listening(0) as dropped, listening() as good:
        pool = pool_over(Listed({"dropped": dropped, "good": good}))
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(pool.reach("dropped", loop.time() + 30, channel=False))
        try:
            async with asyncio.timeout(20):
                while not pool._connecting:  # its connect holds the one slot
                    await asyncio.sleep(0.01)
                second = await pool.reach("good", loop.time() + 0.5, channel=False)
            assert not first.done()  # (still connecting: the second did not wait for it)
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
    assert second is not None and second.startswith("agent good: not dialled within ")
    assert second.endswith(" s: 1 connections to other agents pending")


async def test_a_failed_address_read_is_read_again_and_a_removed_node_is_its_own_reason() -> None:
    """Review 2, finding 4: a listing of the nodes' addresses that failed ("database is
    locked") is not kept: the next plan reads them again (on 44aa7dd every plan failed with it
    until the nodes changed); a node removed between the online listing and its way in is
    unreachable with the reason, and the other nodes are planned (on 44aa7dd the whole plan
    failed with NotFound)."""
    ca = pki.CertificateAuthority.create().cert
    with listening() as port:
        pool = pool_over(Listed({"n1": port}, fail=1))
        try:
            async with asyncio.timeout(20):
                with pytest.raises(sqlite3.OperationalError):
                    await observe(pool, ["n1"], ca, ask=ready, reach=pool.reach)
                seen = await observe(pool, ["n1", "gone"], ca, ask=ready, reach=pool.reach)
        finally:
            await pool.close()
    assert seen["n1"].reachable
    assert seen["gone"] == NodeObservation(False, "no enrolled node named 'gone'")


@pytest.mark.parametrize("late_steps", [False, True], ids=["skipped", "stepped"])
@pytest.mark.parametrize("late", ["n0", "n1"])
async def test_a_start_s_node_answering_late_in_the_window_is_still_proved(
    monkeypatch: pytest.MonkeyPatch, late: str, late_steps: bool
) -> None:
    """Review 1b of session 31, finding 1: a start's every node was dialled (or its channel
    opened) only once its answer was in, by the question's deadline: an agent answering just
    before it left the dial no time, and the start refused a node ``tlsroll plan`` accepts.
    Now a start dials its nodes while the question is out, but its first ``count`` in order
    (n0 here), which are dialled or opened once the answers are in, with
    ``PROVED_AFTER_ANSWER`` at least. The late node's answer comes just before the deadline;
    the way in (a stub keeping to its deadline) needs 0.1 s of it. ``late_steps``: the start
    steps the late node (n0: its channel is opened; n1: it is dialled, n0 being the first)."""
    monkeypatch.setattr(observe_module, "OBSERVE_TIMEOUT", 1.0)
    loop = asyncio.get_running_loop()

    async def ask(name: str, request: agent_pb2.CheckRequest, timeout: float) -> Any:
        await asyncio.sleep(timeout - 0.05 if name == late else 0.01)
        view = agent_pb2.ServerView(
            driver="fake", healthy=True, schemes=["http"], verifier_digest=name
        )
        return leader_pb2.CheckAnswer(checked=agent_pb2.PreflightResponse(ok=True, server=view))

    dialled: dict[str, bool] = {}

    async def reach(name: str, deadline: float, *, channel: bool, reserve: str = "") -> Any:
        if deadline - loop.time() < 0.1:
            return f"agent {name}: no connection within the deadline"
        dialled[name] = channel
        return None

    def steps(seen: NodeObservation) -> bool:
        return late_steps or seen.verifier_digest != late

    names = ["n0", "n1", "n2"]
    first = observe_module.FirstSteps(names, 1, steps, "r1")
    seen = await observe(cast(Any, None), names, cast(Any, None), ask=ask, reach=reach, first=first)
    assert {n: (o.reachable, o.error) for n, o in seen.items()} == {n: (True, "") for n in names}
    # The first node the start steps has its channel opened, the others are dialled; n0
    # skipped, n1 (the first it steps) is not known to be so within half the window, and is
    # dialled (``among_first``).
    opened = "n0" if late == "n1" or late_steps else ""
    assert dialled == {n: n == opened for n in names}


@pytest.mark.parametrize("ready", [True, False], ids=["channel-refused", "channel-slow"])
async def test_a_first_node_answering_late_whose_channel_fails_keeps_the_reason(
    monkeypatch: pytest.MonkeyPatch, ready: bool
) -> None:
    """Review 2 of session 31, finding 1: a start's first node answers just before the
    question's deadline; its channel (the proof made after the answer, with
    ``PROVED_AFTER_ANSWER`` of its own) fails. Its channel's Check gives gRPC's reason in that
    bound, not in what the question left of the deadline (before: "no answer within 5 s",
    though it answered, or the Check's own deadline error); a channel not ready within the
    bound says so."""
    monkeypatch.setattr(observe_module, "OBSERVE_TIMEOUT", 1.0)
    loop = asyncio.get_running_loop()
    reason = "agent n0: failed to connect: SSL handshake failed (key pin)"

    async def ask(name: str, request: agent_pb2.CheckRequest, timeout: float) -> Any:
        await asyncio.sleep(timeout - 0.05 if name == "n0" else 0.01)
        view = agent_pb2.ServerView(driver="fake", healthy=True, schemes=["http"])
        return leader_pb2.CheckAnswer(checked=agent_pb2.PreflightResponse(ok=True, server=view))

    async def reach(name: str, deadline: float, *, channel: bool, reserve: str = "") -> Any:
        if not channel:
            return None
        if not ready:  # the handshake does not finish by the bound
            await asyncio.sleep(max(0.0, deadline - loop.time()))
        return "channel"  # failed: the channel's Check says why

    class Refusing:
        async def check(self, request: agent_pb2.CheckRequest, timeout: float) -> Any:
            assert timeout > 0.5  # (the bound's, not the ~0.05 s the question left)
            await asyncio.sleep(0.1)
            raise TransientError(reason)

    class Agents:
        async def get(self, name: str) -> Refusing:
            return Refusing()

    names = ["n0", "n1"]
    first = observe_module.FirstSteps(names, 1, lambda _seen: True, "r1")
    async with asyncio.timeout(10):
        seen = await observe(
            cast(Any, Agents()), names, cast(Any, None), ask=ask, reach=reach, first=first
        )
    assert seen["n1"].reachable
    expected = reason if ready else "agent n0: its channel was not ready within 1 s of its answer"
    assert (seen["n0"].reachable, seen["n0"].error) == (False, expected)


async def test_a_heartbeats_view_waits_for_the_agents_own_restart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``NodeAgentService.server_view`` (CI of session 54, reviews rev55a and rev55b): while a
    restart the agent's own transaction makes runs (``Driver.restarting``), a heartbeat's view
    waits for it to end, at most ``RESTART_VIEW_WAIT``, and then looks; past that it says
    "restarting: ..." without asking the server and with no client list (the leader keeps
    its own), for the restart's first ``RESTARTING_SAID`` seconds only; a view that found the
    server down while such a restart began (ended, or not yet) looks again. (The service's
    ``_view`` is replaced: what is tested is when it is called; ``tests/test_level_based.py``
    has it with real daemons.)"""
    driver = StubDriver("127.0.0.1", tmp_path / "server.toml")
    svc = NodeAgentService.__new__(NodeAgentService)
    svc.driver = driver  # type: ignore[assignment]
    looked: list[bool] = []
    loop = asyncio.get_running_loop()

    def restart(ends_in: float | None) -> None:
        """A restart of the agent's own begins (as ``Runner._restart`` marks it)."""
        ended = asyncio.Event()
        d: Any = driver
        d.restarting = ended
        d.restarts_begun = getattr(driver, "restarts_begun", 0) + 1
        d.restart_began = time.monotonic()
        if ends_in is not None:
            loop.call_later(ends_in, ended.set)

    async def view() -> agent_pb2.ServerView:
        restarting = getattr(driver, "restarting", None)
        up = restarting is None or restarting.is_set()
        looked.append(up)
        return agent_pb2.ServerView(
            healthy=up, detail="" if up else "down", clients=types_pb2.ClientsView(source="x")
        )

    monkeypatch.setattr(svc, "_view", view)

    # A restart that ends within the wait: one look, after it.
    restart(0.05)
    assert (await svc.server_view()).healthy and looked == [True]

    # One that outlasts the wait: said as restarting, the server not asked, no client list.
    monkeypatch.setattr(service_module, "RESTART_VIEW_WAIT", 0.05)
    looked.clear()
    restart(None)
    said = await svc.server_view()
    assert not said.healthy and said.detail.startswith(SERVER_RESTARTING) and looked == []
    assert not leader_link.live_server(said).HasField("clients")
    assert leader_link.live_server(await view()).clients.source == "x"  # a view's list goes
    # ... for its first RESTARTING_SAID seconds: past them, the server as it is.
    looked.clear()
    monkeypatch.setattr(service_module, "RESTARTING_SAID", 0.0)
    assert (await svc.server_view()).detail == "down" and looked == [False]
    monkeypatch.setattr(service_module, "RESTARTING_SAID", 30.0)

    # A restart that begins while the view looks: found down, looked at again once it ended;
    # also one that began and ended during the look (review rev55b L3).
    monkeypatch.setattr(service_module, "RESTART_VIEW_WAIT", 5.0)
    for ends_in in (0.05, 0.0):
        driver.restarting = None  # type: ignore[attr-defined]
        looked.clear()

        async def begins_meanwhile(ends_in: float = ends_in) -> agent_pb2.ServerView:
            if not looked:
                restart(ends_in or None)
                said = await view()
                if not ends_in:  # it ended before the look came back
                    driver.restarting.set()  # type: ignore[attr-defined]
                    driver.restarting = None  # type: ignore[attr-defined]
                return said
            return await view()

        monkeypatch.setattr(svc, "_view", begins_meanwhile)
        assert (await svc.server_view()).healthy and looked == [False, True], ends_in
