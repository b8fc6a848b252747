"""Event-driven steps (issue 15): the agent streams a transaction's states as it journals them
(``NodeAgent.WatchTransaction``), and the leader follows the stream instead of polling; a stream
broken mid-transaction (the agent killed and started again) still ends with the outcome.
Real agents, reference servers and a real leader; mutual TLS throughout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent.transaction import CRASH_ENV
from nodeagent.wire import TXN_PHASE
from tests.cluster import Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, NodeFactory
from tlsroll.enums import TxnKind
from tlsroll.v1 import agent_pb2
from tlsroll.wire import TXN_KIND

FORWARD = ["started", "frozen", "config_written", "restarted", "verified", "completed"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("events"), next_loopback()) as c:
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
    # A finished transaction: one message, then the end.
    again = watch(node, "r-watch")
    assert len(again) == 1 and again[0].outcome == agent_pb2.TRANSACTION_OUTCOME_COMPLETED
    # An unknown one: NOT_FOUND, as GetTransaction says.
    with pytest.raises(grpc.RpcError) as info:
        watch(node, "r-nothing")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_leader_gets_the_outcome_through_a_broken_stream(tmp_path: Path) -> None:
    """The agent kills itself right after journalling ``restarted`` (its server restarted on
    https, frozen): the leader's stream breaks mid-switch. Started again, the agent resumes
    the transaction from its journal; the leader follows it to the end and confirms."""
    address = next_loopback()
    cluster = Cluster(tmp_path / "cluster", address, heartbeat_interval=1)
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

        def newest() -> dict[str, Any]:
            shown = cluster.cli("schema", "show", "--json")
            rollout: dict[str, Any] = json.loads(shown.stdout)["rollouts"][0]
            return rollout

        wait_until(lambda: newest()["state"] in ("completed", "halted"), 90, "the rollout")
        r = newest()
        assert r["state"] == "completed", r
        assert [n["state"] for n in r["nodes"]] == ["done"]
        assert node.server.status()["listen"] == ["https"]
        [txn] = node.journal_query("SELECT phase, outcome FROM txns")
        assert txn == {"phase": "completed", "outcome": "completed"}
    finally:
        node.close()
        cluster.close()
