"""The leader's client of the agents (``leader.agent_client``) against agents of this release
and of the one before: which calls a step makes, over real gRPC and TLS on a loopback port
(the agents here answer only the calls under test; real agents in ``test_switch``)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from leader.agent_client import AgentClient, AgentPool, StepFailed, SwitchRefused
from leader.store import Node
from tlsroll import pki, spiffe
from tlsroll.defaults import AGENT_PORT
from tlsroll.errors import TransientError
from tlsroll.v1 import agent_pb2, agent_pb2_grpc

COMPLETED = agent_pb2.TRANSACTION_OUTCOME_COMPLETED


class Agent(agent_pb2_grpc.NodeAgentServicer):
    """Switch and WatchTransaction as an agent answers them: ``merged`` (this release: a
    watch with ``switch`` set begins it) or not (the release before: the field is unknown
    to it, so the watch of a switch not yet begun is NOT_FOUND). ``refuse``: Switch's
    refusal. Every call is logged by name."""

    def __init__(
        self, *, merged: bool, refuse: str = "", fail_after_begin: grpc.StatusCode | None = None
    ) -> None:
        self.merged = merged
        self.refuse = refuse
        self.fail_after_begin = fail_after_begin  # the switch begun, then the stream fails
        self.calls: list[str] = []
        self.txns: dict[str, agent_pb2.Transaction] = {}

    async def _begin(self, request: agent_pb2.SwitchRequest, context: Any) -> None:
        if self.refuse:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.refuse)
        rid = request.command.rollout_id
        self.txns.setdefault(rid, agent_pb2.Transaction(rollout_id=rid, outcome=COMPLETED))

    async def Switch(self, request: agent_pb2.SwitchRequest, context: Any) -> Any:
        self.calls.append("Switch")
        await self._begin(request, context)
        return self.txns[request.command.rollout_id]

    async def WatchTransaction(
        self, request: agent_pb2.GetTransactionRequest, context: Any
    ) -> AsyncIterator[agent_pb2.Transaction]:
        self.calls.append("WatchTransaction")
        if self.merged and request.HasField("switch"):
            await self._begin(request.switch, context)
            if self.fail_after_begin is not None:
                await context.abort(self.fail_after_begin, "reading the journal failed")
        txn = self.txns.get(request.rollout_id)
        if txn is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no switch transaction")
        assert txn is not None
        yield txn


@contextlib.asynccontextmanager
async def served(
    address: str, agent: agent_pb2_grpc.NodeAgentServicer
) -> AsyncIterator[AgentClient]:
    """``agent`` served over TLS with a certificate for the node's key name, and the leader's
    client dialling it as ``AgentClient`` does."""
    ca = pki.CertificateAuthority.create("agent calls test CA")
    key = pki.generate_key()
    td, pin = ca.trust_domain, "sha256:" + "ab" * 32
    cert = ca.issue(key.public_key(), pki.Names.of("n1", [address], [spiffe.key_host(td, pin)]))
    server = grpc.aio.server()
    agent_pb2_grpc.add_NodeAgentServicer_to_server(agent, server)
    port = server.add_secure_port(
        f"{address}:0",
        grpc.ssl_server_credentials([(pki.key_to_pem(key), pki.cert_to_pem(cert))]),
    )
    await server.start()
    at = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    node = Node("n1", (address,), (), "1", port, pin, "", "", at, at, None)
    client = AgentClient(node, grpc.ssl_channel_credentials(ca.cert_pem), td)
    try:
        yield client
    finally:
        await client.close()
        await server.stop(None)


async def switch_calls(address: str, agent: Agent) -> list[agent_pb2.Transaction]:
    """The leader's client begins and follows rollout r1's switch on ``agent``."""
    request = agent_pb2.SwitchRequest(command=agent_pb2.Command(rollout_id="r1", epoch=1))
    async with served(address, agent) as client:
        return [t async for t in client.switch_and_watch(request)]


async def test_a_switch_is_begun_and_followed_in_one_call(loopback: Callable[[], str]) -> None:
    """Issue 15: Switch, then WatchTransaction: two calls per node. Now one."""
    agent = Agent(merged=True)  # type: ignore[abstract]  # only the calls under test
    states = await switch_calls(loopback(), agent)
    assert [t.outcome for t in states] == [COMPLETED]
    assert agent.calls == ["WatchTransaction"]


async def test_an_agent_of_the_release_before_gets_switch_then_the_watch(
    loopback: Callable[[], str],
) -> None:
    """Mixed versions: an agent that does not know ``switch`` answers the watch NOT_FOUND (no
    switch began); the client then calls Switch and watches, as the release before did."""
    agent = Agent(merged=False)  # type: ignore[abstract]  # only the calls under test
    states = await switch_calls(loopback(), agent)
    assert [t.outcome for t in states] == [COMPLETED]
    assert agent.calls == ["WatchTransaction", "Switch", "WatchTransaction"]


@pytest.mark.parametrize("merged", [True, False])
async def test_a_refused_switch_is_a_refusal_in_either_release(
    loopback: Callable[[], str], merged: bool
) -> None:
    agent = Agent(merged=merged, refuse="nothing staged for rollout r1; run Stage")  # type: ignore[abstract]
    with pytest.raises(SwitchRefused, match="nothing staged") as refused:
        await switch_calls(loopback(), agent)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert agent.txns == {}


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS]
)
async def test_a_failure_after_the_switch_began_is_no_refusal(
    loopback: Callable[[], str], code: grpc.StatusCode
) -> None:
    """From the review: any status but NOT_FOUND or UNIMPLEMENTED before the first state was
    taken for a refusal ("the node as it was"), though the agent had journalled and started
    the switch before the failure (an INTERNAL from a journal read, say): the node then
    switched behind the leader's back. Only a refusal's statuses are a refusal; anything else
    is transient (the step runs again; a replay reports what began)."""
    agent = Agent(merged=True, fail_after_begin=code)  # type: ignore[abstract]
    with pytest.raises(TransientError, match="may have begun") as unknown:
        await switch_calls(loopback(), agent)
    assert not isinstance(unknown.value, SwitchRefused)
    assert set(agent.txns) == {"r1"}  # it did begin


class SlowFirstPreflight(agent_pb2_grpc.NodeAgentServicer):
    """Preflight whose first try is lost after ``lost`` seconds (UNAVAILABLE); every try's
    ``leader_time`` kept."""

    def __init__(self, lost: float) -> None:
        self.lost = lost
        self.stamps: list[dt.datetime] = []

    async def Preflight(self, request: agent_pb2.PreflightRequest, context: Any) -> Any:
        self.stamps.append(request.leader_time.ToDatetime(tzinfo=dt.UTC))
        if len(self.stamps) == 1:
            await asyncio.sleep(self.lost)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "lost on the way")
        return agent_pb2.PreflightResponse(ok=True)


async def test_a_preflight_tried_again_carries_the_time_it_is_sent_at(
    loopback: Callable[[], str],
) -> None:
    """The agent compares the leader's time in a preflight with its clock. A try sent again
    after one that was lost (a timeout is 30 s) carried the first try's time: a node on time
    looked that much behind, one 60 s ahead failed with "fix NTP" after two lost tries (clock
    audit I of session 35). Each try now carries the stamped time moved on by what has passed."""
    agent = SlowFirstPreflight(lost=0.5)  # type: ignore[abstract]  # only the call under test
    stamped = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)  # the step's clock (a test's own)
    request = agent_pb2.PreflightRequest(command=agent_pb2.Command(rollout_id="r1", epoch=1))
    request.leader_time.FromDatetime(stamped)
    async with served(loopback(), agent) as client:
        assert (await client.preflight(request)).ok
    first, second = agent.stamps
    assert first - stamped < dt.timedelta(seconds=0.5)
    assert second - first >= dt.timedelta(seconds=0.5)  # the lost try's time, at least


class Checked(agent_pb2_grpc.NodeAgentServicer):
    """Check (the planning's question) answered as a healthy node answers it."""

    async def Check(self, request: agent_pb2.CheckRequest, context: Any) -> Any:
        return agent_pb2.PreflightResponse(ok=True)


class OneNode:
    """What ``AgentPool`` reads of the store: one node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def get_node(self, name: str) -> Node:
        assert name == self.node.name
        return self.node


async def test_an_agent_back_from_a_restart_is_reached_though_its_channel_tried_it_while_down(
    loopback: Callable[[], str],
) -> None:
    """Session 42: a start made as soon as a restarted agent was heard again was refused, the
    node unreachable ("Connection refused"), where the leader's channel to it had been tried
    while the agent was down: a channel whose connect failed fails every call at once,
    without sending it, until its reconnect backoff is over (0.5 s after a first failure, up
    to 2.4 s later on). The planning's question over the channel (Check, one try) and a
    start's channel (``reach``) drop such a channel and use a new one, which connects at
    once. (Real daemons: ``test_plan_over_stream``.)"""
    address = loopback()
    ca = pki.CertificateAuthority.create("agent restart test CA")
    key = pki.generate_key()
    td, pin = ca.trust_domain, "sha256:" + "cd" * 32
    cert = ca.issue(key.public_key(), pki.Names.of("n1", [address], [spiffe.key_host(td, pin)]))
    creds = grpc.ssl_server_credentials([(pki.key_to_pem(key), pki.cert_to_pem(cert))])

    async def start_agent() -> grpc.aio.Server:
        server = grpc.aio.server()
        agent_pb2_grpc.add_NodeAgentServicer_to_server(Checked(), server)  # type: ignore[abstract]
        server.add_secure_port(f"{address}:{AGENT_PORT}", creds)
        await server.start()
        return server

    at = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    node = Node("n1", (address,), (), "1", AGENT_PORT, pin, "", "", at, at, None)
    pool = AgentPool(OneNode(node), grpc.ssl_channel_credentials(ca.cert_pem), td)  # type: ignore[arg-type]
    question = agent_pb2.CheckRequest()
    server = await start_agent()
    try:
        client = await pool.get("n1")
        assert (await client.check(question, timeout=10)).ok
        for ask in ("check", "reach"):
            await server.stop(None)  # the agent restarts: the leader tries it meanwhile
            with pytest.raises(TransientError, match="agent n1: "):
                await client.check(question, timeout=10)
            server = await start_agent()
            if ask == "check":
                assert (await client.check(question, timeout=10)).ok
            else:
                deadline = asyncio.get_running_loop().time() + 10
                assert await pool.reach("n1", deadline, channel=True) is None
    finally:
        await pool.close()
        await server.stop(None)


class Elsewhere(agent_pb2_grpc.NodeAgentServicer):
    """An agent that answers every question about a transaction with ``txn``, whatever was
    asked: a transaction the leader never sent (another rollout's, or another kind)."""

    def __init__(self, txn: agent_pb2.Transaction) -> None:
        self.txn = txn
        self.calls: list[str] = []

    async def GetTransaction(self, request: agent_pb2.GetTransactionRequest, context: Any) -> Any:
        self.calls.append("GetTransaction")
        return self.txn

    async def WatchTransaction(
        self, request: agent_pb2.GetTransactionRequest, context: Any
    ) -> AsyncIterator[agent_pb2.Transaction]:
        self.calls.append("WatchTransaction")
        yield self.txn


SWITCH = agent_pb2.TRANSACTION_KIND_SWITCH
ROLLBACK = agent_pb2.TRANSACTION_KIND_ROLLBACK


@pytest.mark.parametrize(
    ("rollout_id", "kind", "seen"),
    [("r0", SWITCH, "rollout r0's switch"), ("r1", ROLLBACK, "rollout r1's rollback")],
)
async def test_an_answer_about_another_transaction_is_no_outcome(
    loopback: Callable[[], str], rollout_id: str, kind: int, seen: str
) -> None:
    """Engine review (s67 engine3, 2): the leader took whatever transaction the agent sent
    back as the one it asked about. A completed switch of another rollout (an agent's
    journal answered by the wrong key, say) ended rollout r1's switch as done, and a
    rollback's state a confirm's question about a rollback, which then recorded the node
    rolled back. Now an answer about another transaction is no answer: the step is tried
    again (``TransientError``, never an outcome), naming what the agent sent."""
    wrong = agent_pb2.Transaction(rollout_id=rollout_id, kind=kind, outcome=COMPLETED)  # type: ignore[arg-type]
    agent = Elsewhere(wrong)  # type: ignore[abstract]  # only the calls under test
    address = loopback()
    asked = agent_pb2.GetTransactionRequest(rollout_id="r1", kind=SWITCH)
    switch = agent_pb2.SwitchRequest(command=agent_pb2.Command(rollout_id="r1", epoch=1))
    async with served(address, agent) as client:
        states: list[agent_pb2.Transaction] = []
        with pytest.raises(TransientError, match=seen) as failed:
            states.extend([t async for t in client.switch_and_watch(switch)])
        assert states == []
        assert "not rollout r1's switch" in str(failed.value), failed.value
        with pytest.raises(StepFailed, match=seen):
            await client.get_transaction(asked)
        with pytest.raises(StepFailed, match=seen):
            _ = [t async for t in client.watch_transaction(asked)]


class Receiving(agent_pb2_grpc.NodeAgentServicer):
    """GetTransaction answered with each of ``answers`` in turn (the last one again and
    again): a (code, details) status, or the transaction asked about; every call counted."""

    def __init__(self, *answers: tuple[grpc.StatusCode, str] | None) -> None:
        self.answers = answers
        self.calls = 0

    async def GetTransaction(self, request: agent_pb2.GetTransactionRequest, context: Any) -> Any:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if answer is None:
            return agent_pb2.Transaction(rollout_id=request.rollout_id, kind=request.kind)
        await context.abort(*answer)
        raise AssertionError("unreachable")


# What an agent of session 73 or later answers GetTransaction while a Switch of the transaction
# asked about is received and not yet journalled, after its own wait (``RECEIVING_WAIT``, 10 s).
BEING_RECEIVED = (
    grpc.StatusCode.UNAVAILABLE,
    "a request of the switch transaction of rollout 'r1' is being received; ask again",
)


def journal_unavailable() -> tuple[grpc.StatusCode, str]:
    """The agent's answer when its journal could not be read for a moment (session 74)."""
    from nodeagent import service
    from nodeagent.journal import JournalUnavailable
    from tlsroll.rpc import error_status

    failed = JournalUnavailable("journal /j.sqlite3: database is locked (SQLITE_BUSY)")
    return error_status(failed, service.ERRORS, "GetTransaction")


def test_the_agents_being_received_is_what_the_leader_tells() -> None:
    """The text above is the agent's (``nodeagent.service.being_received``)."""
    from nodeagent import service
    from tlsroll.enums import TxnKind

    said = service.being_received("r1", TxnKind.SWITCH)
    assert (said.code, str(said)) == BEING_RECEIVED


@pytest.mark.parametrize(
    ("answers", "tries"),
    [
        ((BEING_RECEIVED,), 1),  # 4 before: 4 waits of 10 s
        (((grpc.StatusCode.UNAVAILABLE, "connection refused"), BEING_RECEIVED), 2),  # 4 before
    ],
)
async def test_a_question_answered_being_received_is_not_asked_again_within_the_call(
    loopback: Callable[[], str],
    answers: tuple[tuple[grpc.StatusCode, str], ...],
    tries: int,
) -> None:
    """Session 74: the agent answers GetTransaction "being received" only after waiting for
    the request (``RECEIVING_WAIT``, 10 s; it answers as soon as the request is journalled or
    dropped). The leader's client asked again at once, as for an agent it cannot reach, four
    tries: about 41 s in the call before the step's attempt ended and its node's reason could
    say anything (the engine's "unknown" note comes after 10 s). Now that answer ends the call
    (a ``TransientError``: no answer, the step runs again); counted in tries, never timed."""
    agent = Receiving(*answers)  # type: ignore[abstract]  # only the call under test
    asked = agent_pb2.GetTransactionRequest(rollout_id="r1", kind=SWITCH)
    async with served(loopback(), agent) as client:
        with pytest.raises(TransientError, match="is being received; ask again"):
            await client.get_transaction(asked)
    assert agent.calls == tries


async def test_a_journal_not_read_for_a_moment_is_still_asked_again_within_the_call(
    loopback: Callable[[], str],
) -> None:
    """Told apart from "being received": the agent's journal that could not be read for a
    moment (UNAVAILABLE, ``JournalUnavailable``) is asked again at once, as an agent the
    leader cannot reach is (4 tries, a backoff between), and answers the next try."""
    unreadable = journal_unavailable()
    assert unreadable[0] is grpc.StatusCode.UNAVAILABLE
    agent = Receiving(unreadable, unreadable, None)  # type: ignore[abstract]
    asked = agent_pb2.GetTransactionRequest(rollout_id="r1", kind=SWITCH)
    async with served(loopback(), agent) as client:
        txn = await client.get_transaction(asked)
    assert (txn.rollout_id, agent.calls) == ("r1", 3)


class Unknown(agent_pb2_grpc.NodeAgentServicer):
    """A plain WatchTransaction (no ``switch``) answered NOT_FOUND, as an agent answers it
    while a request of that transaction is still received (it does not wait for it, unlike
    GetTransaction)."""

    def __init__(self) -> None:
        self.calls = 0

    async def WatchTransaction(
        self, request: agent_pb2.GetTransactionRequest, context: Any
    ) -> AsyncIterator[agent_pb2.Transaction]:
        self.calls += 1
        await context.abort(grpc.StatusCode.NOT_FOUND, "no rollback transaction")
        yield agent_pb2.Transaction()  # (never: an async generator)


async def test_a_plain_watch_answered_none_is_no_word_that_nothing_began(
    loopback: Callable[[], str],
) -> None:
    """Session 74 (guard): the agent's plain WatchTransaction does not wait for a request of
    its transaction being received, so its NOT_FOUND may come a moment before that request
    is journalled. No leader path reads it as "nothing began": the leader follows a
    transaction with the plain watch only once it has it or has begun it (Switch answered,
    GetTransaction found it), and ``wait_transaction`` takes any StepFailed of the watch for
    no answer (a ``TransientError``: the step runs again), never an outcome."""
    from leader.changes import wait_transaction
    from tlsroll.enums import TxnKind

    agent = Unknown()  # type: ignore[abstract]  # only the call under test
    async with served(loopback(), agent) as client:
        ctx = SimpleNamespace(agent=client)
        with pytest.raises(TransientError, match="reading the rollback transaction"):
            await wait_transaction(cast(Any, ctx), "r1", TxnKind.ROLLBACK)
    assert agent.calls == 1
