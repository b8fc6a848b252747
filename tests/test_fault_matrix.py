"""Faults injected from outside during a real rollout, with writes throughout (issue 16).

Each scenario kills (SIGKILL) the leader, node2's agent or node2's managed server, or stops
node2's agent (SIGSTOP, then SIGCONT), when node2 reaches a step of its switch (preflight,
staging, switching, confirming), after a seeded random delay; a killed daemon is started again
as its service manager would. ``leader-lost`` kills the leader before its group commit of
node2's agent features (what a kill within a second of an agent's first report after its
enrolment or upgrade leaves: the row's default, as ``tests/test_agent_features.py``'s
``lose_features`` writes it while the leader is down): the restarted leader knows what the agent
implements only once it hears it again, which session 63's bug needed and a plain kill never
gives (its leader refused to send the switch it had begun, "too old", and recorded the node as
it was). Whatever the rollout's outcome, every node must end fully on https or fully on http
(its ports saying the same from outside), not frozen, its server answering, and every write it
acknowledged still there. Nothing goes through a test hook of the product.

In three modes (``MODES``), as a bug lives where the faults are not: a begun switch recorded
"refused" after a leader restart (session 63) showed only under ``--freeze scope`` and on the
way back, which the matrix did not run then.

    node   enable-tls with ``--freeze node`` (the default) and ``--max-parallel 1``, two nodes
    scope  enable-tls with ``--freeze scope`` and ``--max-parallel 2``, three nodes (node2 and
           node3 switch together; every node refuses writes for the whole rollout)
    back   a switched cluster of two nodes taken back to http (``rollout rollback``): the
           faults hit the way back's steps (its stage is skipped: "staging" is the moment
           just after the preflight). Besides the above, every node must end on http, 8080
           open, 8443 and the bootstrap's 9443 closed: a way back that an agent's or a
           server's fault halted is run again once, as README's "Back to http" says
           (``rollout rollback`` without ID), and that one must complete.

In every mode a restart of the leader (with its last commit or without) fails no node: the
rollout completes.

The whole matrix (5 faults × 4 steps × 3 modes) is marked ``fault_matrix`` and runs with
``make fault-matrix``; ``make test`` runs one seeded step per fault (``SAMPLE``), the modes
rotated over the faults by the seed, so that each mode runs in every ``make test``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from leader.wire import NODE_STATE, ROLLOUT_STATE
from tests.cluster import Cluster, wait_until
from tests.nodeside import Node, alive, cluster_of
from tests.test_agent_features import lose_features
from tests.test_switch import Writer
from tlsroll.defaults import BOOTSTRAP_PORT, HTTP_PORT, HTTPS_PORT
from tlsroll.v1 import schema_pb2, schema_pb2_grpc

FAULTS = ("leader", "agent", "server", "agent-stop", "leader-lost")
STEPS = ("preflight", "staging", "switching", "confirming")
MODES = ("node", "scope", "back")
# "staged" (prepared, waiting for its switch slot) comes between: a fault meant for the stage
# may land there, never before it.
ORDER = ("pending", "preflight", "staging", "staged", "switching", "confirming", "done")
ENDED = ("completed", "halted", "aborted")
SEED = int(os.environ.get("TLSROLL_FAULT_SEED", "1616"))
SAMPLE = [
    (fault, random.Random(SEED + i).choice(STEPS), MODES[(SEED + i) % len(MODES)])
    for i, fault in enumerate(FAULTS)
]  # one step per fault, the same on every run with the same seed; 5 faults cover the 3 modes
MATRIX = [(f, s, m) for f in FAULTS for s in STEPS for m in MODES if (f, s, m) not in SAMPLE]
LEASE = 20  # scope_freeze_lease (s): a stopped agent (3-8 s) stays within a third of it
# Above the sum of a scenario's bounded waits (the way back's twice), which say what they waited
# for: this bound only stops a hung one.
pytestmark = pytest.mark.timeout(420)
STARTED = re.compile(r"^rollout (\S+) (?:\([^)]*\) )?started", re.M)  # (a way back: what)


def schema(cluster: Cluster, rollout_id: str = "") -> schema_pb2.Schema:
    with grpc.insecure_channel(f"unix:{cluster.admin_socket}") as channel:
        reply: schema_pb2.Schema = schema_pb2_grpc.SchemaViewStub(channel).GetSchema(
            schema_pb2.GetSchemaRequest(rollout_id=rollout_id, rollouts_only=True), timeout=5
        )
    return reply


def rollout_view(cluster: Cluster, rollout_id: str) -> schema_pb2.RolloutView:
    (view,) = schema(cluster, rollout_id).rollouts
    return view


def node_state(cluster: Cluster, rollout_id: str, name: str) -> str:
    try:
        rollouts = schema(cluster, rollout_id).rollouts
    except grpc.RpcError:
        return ""  # the leader is restarting
    if not rollouts:
        return ""
    found = [n.state for n in rollouts[0].nodes if n.name == name]
    return NODE_STATE.text(found[0]) if found else ""


def rollout_state(cluster: Cluster, rollout_id: str) -> str:
    try:
        state = schema(cluster, rollout_id).rollouts[0].state
    except (grpc.RpcError, IndexError):
        return ""
    return ROLLOUT_STATE.text(state)


def start(cluster: Cluster, *args: str) -> str:
    """Run ``tlsroll rollout ARGS`` (a start or a way back, with ``--yes``); the id of the
    rollout it started."""
    result = cluster.cli("rollout", *args, "--yes")
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    found = STARTED.search(result.stdout)
    assert found is not None, result.stdout
    return found[1]


def wait_ended(cluster: Cluster, rollout_id: str, timeout: float) -> str:
    """Wait for the rollout's end (bounded); its state, as the look that saw it ended (a
    look after it might meet the admin socket busy)."""
    seen: list[str] = []

    def ended() -> bool:
        seen[:] = [rollout_state(cluster, rollout_id)]
        return seen[0] in ENDED

    wait_until(ended, timeout, f"the end of rollout {rollout_id}", interval=0.5)
    return seen[0]


def inject(fault: str, cluster: Cluster, node: Node, rng: random.Random) -> None:
    assert node.agent is not None
    if fault in ("leader", "leader-lost"):
        cluster.kill_leader()
        if fault == "leader-lost":
            lose_features(cluster, node.name)
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


def scheme_of(node: Node) -> str:
    """The one scheme the node's server listens on, checked from outside as well: its own
    port open and the other closed (8080 for http, 8443 for https), and the bootstrap's 9443
    open only beside https (it follows the live config: a moment after a restart)."""
    status = node.server.status()
    assert status["listen"] in (["http"], ["https"]), (node.name, status)
    assert status["frozen"] is False, node.name
    scheme: str = status["listen"][0]
    assert node.port_open(HTTP_PORT) == (scheme == "http"), (node.name, scheme, HTTP_PORT)
    assert node.port_open(HTTPS_PORT) == (scheme == "https"), (node.name, scheme, HTTPS_PORT)
    wait_until(
        lambda: node.port_open(BOOTSTRAP_PORT) == (scheme == "https"),
        30,
        f"{node.name}'s bootstrap port {'open' if scheme == 'https' else 'closed'} on {scheme}",
        interval=0.2,
    )
    return scheme


def no_attention(cluster: Cluster, rollout_id: str) -> schema_pb2.RolloutView:
    view = rollout_view(cluster, rollout_id)
    states = {n.name: NODE_STATE.text(n.state) for n in view.nodes}
    assert "needs_attention" not in states.values(), (
        rollout_id,
        states,
        [n.reason for n in view.nodes],
    )
    return view


def run_scenario(fault: str, step: str, mode: str, root: Path) -> None:
    # (the node mode's moments are those of the matrix before it had modes)
    rng = random.Random(f"{SEED}-{fault}-{step}" + ("" if mode == "node" else f"-{mode}"))
    count = 3 if mode == "scope" else 2
    with cluster_of(root, count, step_deadline=15, scope_freeze_lease=LEASE) as (cluster, nodes):
        node2 = nodes[1]
        pw = root / "pw"
        pw.touch(0o600)
        pw.write_text("fault-matrix-password-for-practice\n")
        switch = ("start", "--scope", "cluster", "--password-file", str(pw))
        if mode == "back":  # switched first, without a fault: what the way back takes back
            switched = start(cluster, *switch)
            assert wait_ended(cluster, switched, 100) == "completed"
        stop = threading.Event()
        writers = [Writer(n, stop) for n in nodes]
        threads = [threading.Thread(target=w.run) for w in writers]
        for t in threads:
            t.start()
        rollouts: list[str] = []
        try:
            wait_until(lambda: all(len(w.acked) >= 2 for w in writers), 20, "writes before")
            if mode == "back":
                rollouts.append(start(cluster, "rollback"))
            elif mode == "scope":
                rollouts.append(start(cluster, *switch, "--freeze", "scope", "--max-parallel", "2"))
            else:
                rollouts.append(start(cluster, *switch))
            target = ORDER.index(step)

            def reached() -> bool:
                state = node_state(cluster, rollouts[0], "node2")
                return state in ORDER and ORDER.index(state) >= target

            wait_until(reached, 60, f"node2 at {step}", interval=0.02)
            time.sleep(rng.uniform(0, 0.3))
            inject(fault, cluster, node2, rng)
            if fault == "server":  # its service manager starts it again if it stays down
                time.sleep(3)
                start_unless_running(node2)
            # A frozen node that never answers its unfreeze is counted unfrozen only a lease
            # and a minute after its last freeze call (README, --freeze scope).
            ended = wait_ended(cluster, rollouts[0], 100 + (LEASE + 60) * (mode == "scope"))
            if fault in ("leader", "leader-lost"):
                # The restarted leader takes the step up again and follows it to its end
                # (README, "When it fails"): a leader's restart fails no node, in any mode (a
                # way back "refused" by a leader that restarted: session 63).
                assert ended == "completed", (rollouts, rollout_view(cluster, rollouts[0]))
            elif mode == "back" and ended != "completed":
                # An agent carries its way back on "to the end or back", and a server may not
                # come back: each node fully on one scheme, nothing needing the admin, as in
                # every mode; then, once every node is heard again, the way back again for the
                # nodes still on https, which must end them on http.
                no_attention(cluster, rollouts[0])
                if "https" in [scheme_of(node) for node in nodes]:
                    cluster.wait_for_nodes_online([n.name for n in nodes], timeout=30)
                    rollouts.append(start(cluster, "rollback"))
                    assert wait_ended(cluster, rollouts[1], 100) == "completed", rollouts
            time.sleep(1.5)  # writes after the end, on whatever each node runs
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert [e for w in writers for e in w.errors] == []
        for rollout_id in rollouts:
            no_attention(cluster, rollout_id)
        for node, writer in zip(nodes, writers, strict=True):
            scheme = scheme_of(node)
            if mode == "back":
                assert scheme == "http", (node.name, rollouts)
            for entry_id, marker in writer.acked:  # no acknowledged write is lost
                got = node.get(scheme, f"entries/{entry_id}")
                assert got.status == 200, (node.name, entry_id)
                assert got.json()["body"] == {"marker": marker}
            if mode == "back":  # http takes writes again
                assert node.post("http", {"after": "the way back"}).status == 201, node.name


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "step", "mode"), SAMPLE)
def test_fault_sample(fault: str, step: str, mode: str, tmp_path: Path) -> None:
    run_scenario(fault, step, mode, tmp_path)


@pytest.mark.slow
@pytest.mark.fault_matrix
@pytest.mark.parametrize(("fault", "step", "mode"), MATRIX)
def test_fault_matrix(fault: str, step: str, mode: str, tmp_path: Path) -> None:
    run_scenario(fault, step, mode, tmp_path)
