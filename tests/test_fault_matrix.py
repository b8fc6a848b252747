"""Faults injected from outside during a real rollout, with writes throughout (issue 16).

Each scenario kills (SIGKILL) the leader, node2's agent or node2's managed server, or stops
node2's agent (SIGSTOP, then SIGCONT), when node2 reaches a step of its switch (preflight,
staging, switching, confirming), after a seeded random delay; a killed daemon is started again
as its service manager would. Whatever the rollout's outcome, every node must end fully on
https or fully on http, not frozen, its server answering, and every write it acknowledged
still there. Nothing goes through a test hook of the product.

The whole matrix (4 faults × 4 steps) is marked ``fault_matrix`` and runs with
``make fault-matrix``; ``make test`` runs one seeded scenario per fault (``SAMPLE``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from leader.wire import NODE_STATE, ROLLOUT_STATE
from tests.cluster import Cluster, wait_until
from tests.nodeside import Node, alive, cluster_of
from tests.test_switch import Writer
from tlsroll.v1 import schema_pb2, schema_pb2_grpc

FAULTS = ("leader", "agent", "server", "agent-stop")
STEPS = ("preflight", "staging", "switching", "confirming")
ORDER = ("pending", *STEPS, "done")
SEED = int(os.environ.get("TLSROLL_FAULT_SEED", "1616"))
SAMPLE = [
    (fault, random.Random(SEED + i).choice(STEPS)) for i, fault in enumerate(FAULTS)
]  # one step per fault, the same on every run with the same seed
MATRIX = [(f, s) for f in FAULTS for s in STEPS if (f, s) not in SAMPLE]


def schema(cluster: Cluster) -> schema_pb2.Schema:
    with grpc.insecure_channel(f"unix:{cluster.admin_socket}") as channel:
        reply: schema_pb2.Schema = schema_pb2_grpc.SchemaViewStub(channel).GetSchema(
            schema_pb2.GetSchemaRequest(), timeout=5
        )
    return reply


def node_state(cluster: Cluster, name: str) -> str:
    try:
        rollouts = schema(cluster).rollouts
    except grpc.RpcError:
        return ""  # the leader is restarting
    if not rollouts:
        return ""
    found = [n.state for n in rollouts[0].nodes if n.name == name]
    return NODE_STATE.text(found[0]) if found else ""


def rollout_state(cluster: Cluster) -> str:
    try:
        state = schema(cluster).rollouts[0].state
    except (grpc.RpcError, IndexError):
        return ""
    return ROLLOUT_STATE.text(state)


def inject(fault: str, cluster: Cluster, node: Node, rng: random.Random) -> None:
    assert node.agent is not None
    if fault == "leader":
        cluster.kill_leader()
        time.sleep(0.5)
        cluster.start_leader()
    elif fault == "agent":
        node.agent.kill()
        time.sleep(0.5)
        node.restart_agent()
    elif fault == "server":
        pid = node.server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    else:  # agent-stop: the agent freezes mid-step for a few seconds
        node.agent.send_signal(signal.SIGSTOP)
        time.sleep(rng.uniform(3, 8))
        node.agent.send_signal(signal.SIGCONT)


def server_answers(node: Node) -> bool:
    try:
        node.server.status()
    except OSError:
        return False
    return True


def start_unless_running(node: Node, timeout: float = 30) -> None:
    """Start the killed server again, as its service manager would, unless one runs already:
    the agent's driver may have started it and it is still coming up (then a second start
    meets its data lock: "another tlsroll-refserver uses …", which is the product right)."""
    deadline = time.monotonic() + timeout
    while not server_answers(node):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node.name}'s server not back within {timeout} s")
        pid = node.server_pid()
        if pid is not None and alive(pid):
            time.sleep(0.1)  # someone's server is starting: let it
            continue
        try:
            node.server.start()
        except RuntimeError as exc:
            if "another tlsroll-refserver uses" in str(exc):
                continue  # the driver's server took the lock between our look and our start
            if "refserver exited with 0 during start-up" in str(exc):
                continue  # the agent's driver stopped ours for its own restart (a switch or
                # its way back): two managers here, where a service manager would be one
            raise


def run_scenario(fault: str, step: str, root: Path) -> None:
    rng = random.Random(f"{SEED}-{fault}-{step}")
    with cluster_of(root, 2, step_deadline=15, scope_freeze_lease=20) as (cluster, nodes):
        node2 = nodes[1]
        stop = threading.Event()
        writers = [Writer(n, stop) for n in nodes]
        threads = [threading.Thread(target=w.run) for w in writers]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: all(len(w.acked) >= 2 for w in writers), 20, "writes before")
            pw = root / "pw"
            pw.touch(0o600)
            pw.write_text("fault-matrix-password-for-practice\n")
            start = cluster.cli(
                "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"
            )
            assert start.returncode == 0, start.stderr
            target = ORDER.index(step)

            def reached() -> bool:
                state = node_state(cluster, "node2")
                return state in ORDER and ORDER.index(state) >= target

            wait_until(reached, 60, f"node2 at {step}", interval=0.02)
            time.sleep(rng.uniform(0, 0.3))
            inject(fault, cluster, node2, rng)
            if fault == "server":  # its service manager starts it again if it stays down
                time.sleep(3)
                start_unless_running(node2)
            wait_until(
                lambda: rollout_state(cluster) in ("completed", "halted", "aborted"),
                100,
                "the rollout's end",
                interval=0.5,
            )
            time.sleep(1.5)  # writes after the end, on whatever each node runs
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert [e for w in writers for e in w.errors] == []
        end = schema(cluster).rollouts[0]
        states = {n.name: NODE_STATE.text(n.state) for n in end.nodes}
        assert "needs_attention" not in states.values(), (states, [n.reason for n in end.nodes])
        for node, writer in zip(nodes, writers, strict=True):
            status = node.server.status()
            assert status["listen"] in (["http"], ["https"]), (node.name, status)
            assert status["frozen"] is False, node.name
            scheme = status["listen"][0]
            for entry_id, marker in writer.acked:  # no acknowledged write is lost
                got = node.get(scheme, f"entries/{entry_id}")
                assert got.status == 200, (node.name, entry_id)
                assert got.json()["body"] == {"marker": marker}


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "step"), SAMPLE)
def test_fault_sample(fault: str, step: str, tmp_path: Path) -> None:
    run_scenario(fault, step, tmp_path)


@pytest.mark.slow
@pytest.mark.fault_matrix
@pytest.mark.parametrize(("fault", "step"), MATRIX)
def test_fault_matrix(fault: str, step: str, tmp_path: Path) -> None:
    run_scenario(fault, step, tmp_path)
