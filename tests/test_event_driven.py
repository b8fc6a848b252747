"""Event-driven steps (issue 15): the agent streams a transaction's states as it journals them
(``NodeAgent.WatchTransaction``), and the leader follows the stream instead of polling; a stream
broken mid-transaction (the agent killed and started again) still ends with the outcome.
Real agents, reference servers and a real leader; mutual TLS throughout."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader.agent_client import WATCHED_PHASES, AgentClient
from leader.store import _node
from nodeagent import drivers
from nodeagent.transaction import CRASH_ENV
from nodeagent.wire import TXN_PHASE
from tests.cluster import LEADER_POLL, AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, NodeFactory
from tlsroll import pki, spiffe
from tlsroll.enums import Change, TxnKind
from tlsroll.rpc import hostport
from tlsroll.v1 import agent_pb2, agent_pb2_grpc
from tlsroll.wire import CHANGE, TXN_KIND

FORWARD = ["started", "frozen", "config_written", "restarted", "verified", "completed"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("events"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@pytest.fixture
def make_node(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(cluster, tmp_path, "ev")
    try:
        yield factory
    finally:
        factory.close()


def watch(node: Node, rollout_id: str, kind: TxnKind = TxnKind.SWITCH) -> list[Any]:
    """Every message of one WatchTransaction stream, until the agent ends it (bounded)."""
    request = agent_pb2.GetTransactionRequest(rollout_id=rollout_id, kind=TXN_KIND.wire(kind))
    with node.stub() as stub:
        return list(stub.WatchTransaction(request, timeout=60))


def phase_names(messages: list[Any]) -> list[str]:
    return [TXN_PHASE.read(m.phase, "phase").value for m in messages]


def test_a_switch_is_streamed_step_by_step_and_the_stream_ends_with_it(
    make_node: NodeFactory,
) -> None:
    node = make_node()
    node.preflight("r-watch")
    node.stage("r-watch")
    node.switch("r-watch")
    messages = watch(node, "r-watch")  # opened while the switch runs (the restart takes time)
    phases = phase_names(messages)
    # The current state first, then each journalled step once, in order; the last has the
    # outcome and the stream ends by itself.
    assert phases[-1] == "completed", phases
    assert len(phases) >= 2, phases
    assert phases == sorted(set(phases), key=FORWARD.index), phases
    assert [m.outcome for m in messages[:-1]] == [agent_pb2.TRANSACTION_OUTCOME_PENDING] * (
        len(messages) - 1
    )
    assert messages[-1].outcome == agent_pb2.TRANSACTION_OUTCOME_COMPLETED
    assert messages[-1].restart_seconds > 0
    # The reference driver's unfreeze is its admin socket's flag: a check of the verified
    # server stands for one after it (the leader's confirm may begin its check then).
    assert all(m.unfreeze_keeps_answers for m in messages)
    # A finished transaction: one message, then the end.
    again = watch(node, "r-watch")
    assert len(again) == 1 and again[0].outcome == agent_pb2.TRANSACTION_OUTCOME_COMPLETED
    # An unknown one: NOT_FOUND, as GetTransaction says.
    with pytest.raises(grpc.RpcError) as info:
        watch(node, "r-nothing")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_switch_streams_only_the_states_the_leader_asks_for(make_node: NodeFactory) -> None:
    """Issue 15 (session 69): the leader acts on a switch's begun, config-written and
    verified states and its outcome; the frozen and restarted ones (two of six messages, the
    restarted one inside the freeze window) were streamed for nothing. Asked for its phases
    (``GetTransactionRequest.phases``, as the leader asks: the switch begun by the same call),
    a real agent passes them over; the states it sends carry what they said."""
    node = make_node()
    node.preflight("r-phases")
    node.stage("r-phases")
    request = agent_pb2.GetTransactionRequest(
        rollout_id="r-phases",
        kind=agent_pb2.TRANSACTION_KIND_SWITCH,
        phases=WATCHED_PHASES,
        switch=agent_pb2.SwitchRequest(
            command=node.command("r-phases"), change=CHANGE.wire(Change.ENABLE_TLS)
        ),
    )
    with node.stub() as stub:
        messages = list(stub.WatchTransaction(request, timeout=60))
    phases = phase_names(messages)
    assert phases[0] == "started" and phases[-1] == "completed", phases
    assert not {"frozen", "restarted"} & set(phases), phases
    assert set(phases) <= {"started", "config_written", "verified", "completed"}, phases
    last = messages[-1]
    assert last.outcome == agent_pb2.TRANSACTION_OUTCOME_COMPLETED
    assert last.HasField("freeze_started_at") and last.HasField("freeze_ended_at")
    assert last.restart_seconds > 0
    # Every message after the first that is pending carries the freeze's start: the frozen
    # state's news, which the leader shows, is in the next state sent.
    assert all(m.HasField("freeze_started_at") for m in messages[1:]), messages
    # A stream opened on a finished switch: its one state, whatever the phases asked.
    with node.stub() as stub:
        again = list(
            stub.WatchTransaction(
                agent_pb2.GetTransactionRequest(
                    rollout_id="r-phases",
                    kind=agent_pb2.TRANSACTION_KIND_SWITCH,
                    phases=[agent_pb2.TRANSACTION_PHASE_VERIFIED],
                ),
                timeout=60,
            )
        )
    assert phase_names(again) == ["completed"]


def test_the_leader_gets_the_outcome_through_a_broken_stream(tmp_path: Path) -> None:
    """The agent kills itself right after journalling ``restarted`` (its server restarted on
    https, frozen): the leader's stream breaks mid-switch. Started again, the agent resumes
    the transaction from its journal; the leader follows it to the end and confirms."""
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    node = Node(cluster, "node1", address, tmp_path / "n1")
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        node.start({CRASH_ENV: "restarted"})
        cluster.wait_for_nodes_online(["node1"])
        pw = tmp_path / "pw"
        pw.touch(0o600)
        pw.write_text("event-driven-test-password\n")
        started = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"
        )
        assert started.returncode == 0, started.stderr
        assert node.agent is not None and node.agent.proc is not None
        node.agent.proc.wait(60)  # died mid-switch
        [txn] = node.journal_query("SELECT phase, outcome FROM txns")
        assert txn == {"phase": "restarted", "outcome": ""}
        node.restart_agent()

        wait_until(
            lambda: cluster.poll_newest_rollout()["state"] in ("completed", "halted"),
            90,
            "the rollout",
            interval=LEADER_POLL,
        )
        r = cluster.newest_rollout()
        assert r["state"] == "completed", r
        assert [n["state"] for n in r["nodes"]] == ["done"]
        assert node.server.status()["listen"] == ["https"]
        [txn] = node.journal_query("SELECT phase, outcome FROM txns")
        assert txn == {"phase": "completed", "outcome": "completed"}
    finally:
        node.close()
        cluster.close()


class AgentBeforeWatch(agent_pb2_grpc.NodeAgentServicer):
    """An agent of a version before ``WatchTransaction``: it answers ``GetTransaction`` (from
    the real agent behind it) and nothing else; grpc's generated base class answers every
    other method UNIMPLEMENTED, as a server without the method does."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.asked = 0

    async def GetTransaction(
        self, request: agent_pb2.GetTransactionRequest, context: Any
    ) -> agent_pb2.Transaction:
        self.asked += 1

        def ask() -> agent_pb2.Transaction:
            with self.node.stub() as stub:
                reply: agent_pb2.Transaction = stub.GetTransaction(request, timeout=10)
                return reply

        return await asyncio.to_thread(ask)


def test_an_agent_without_the_stream_is_followed_by_asking(
    cluster: Cluster, make_node: NodeFactory
) -> None:
    """The leader's fallback for an older agent (UNIMPLEMENTED): it follows the transaction
    with GetTransaction until the outcome. The older agent is a gRPC server on its own loopback
    address with the real node's certificate and key (so the leader's TLS check of the node's
    key passes), answering GetTransaction from the real agent, which runs a real switch. This
    guards the fallback path, which no real agent of today takes; it passed before this test."""
    node = make_node()
    agent = node.agent
    assert agent is not None
    node.preflight("r-old")
    node.stage("r-old")
    node.switch("r-old")
    [row] = [r for r in cluster.store_table("nodes") if r["name"] == node.name]
    older_at = next_loopback()
    chain, key = cluster.leader_credentials()
    domain = spiffe.trust_domain(pki.read_cert(cluster.ca_cert_path))

    async def scenario() -> list[agent_pb2.Transaction]:
        older = AgentBeforeWatch(node)  # type: ignore[abstract]  # lacking them is the point
        server = grpc.aio.server()
        agent_pb2_grpc.add_NodeAgentServicer_to_server(older, server)
        server_creds = grpc.ssl_server_credentials(
            [(agent.key_file.read_bytes(), agent.cert_file.read_bytes())],
            root_certificates=cluster.ca_pem,
            require_client_auth=True,
        )
        port = server.add_secure_port(hostport(older_at, 0), server_creds)
        await server.start()
        client = AgentClient(
            replace(_node(row), addresses=(older_at,), agent_port=port),  # type: ignore[arg-type]
            grpc.ssl_channel_credentials(cluster.ca_pem, key, chain),
            domain,
        )
        try:
            request = agent_pb2.GetTransactionRequest(
                rollout_id="r-old", kind=TXN_KIND.wire(TxnKind.SWITCH)
            )
            seen = [txn async for txn in client.watch_transaction(request)]
            assert older.asked == len(seen)  # every state came from asking, none streamed
            return seen
        finally:
            await client.close()
            await server.stop(None)

    seen = asyncio.run(scenario())
    assert seen[-1].outcome == agent_pb2.TRANSACTION_OUTCOME_COMPLETED, seen[-1]
    assert all(t.outcome == agent_pb2.TRANSACTION_OUTCOME_PENDING for t in seen[:-1])


def test_only_an_admin_socket_s_unfreeze_is_said_to_keep_the_server_s_answers() -> None:
    """``Transaction.unfreeze_keeps_answers``: the reference and systemd drivers unfreeze by a
    flag on the server's admin socket, which changes no answer to an outside check; the exec
    driver runs the admin's command (a reload, say), which may: its transactions never say so,
    and the leader checks once the switch has completed (review rev51a M1)."""
    assert drivers.ReferenceDriver.unfreeze_keeps_answers
    assert drivers.SystemdDriver.unfreeze_keeps_answers
    assert not drivers.ExecDriver.unfreeze_keeps_answers
    assert not drivers.Driver.unfreeze_keeps_answers  # a driver must say so itself
