"""A randomized, bounded fault campaign against the seed's safety promise (SPEC, "Bad input and
faults"): what the fixed points of ``tests/test_fault_matrix.py`` miss.

Each iteration builds a real 3-node loopback cluster (the leader and its agents as processes,
each node a reference server on its own 127.x.y.z with the seed's ports), starts a rollout
(enable-tls with ``--freeze node`` at ``--max-parallel`` 1 or 2, enable-tls with ``--freeze
scope``, or the way back of a switched cluster, disable-tls) with a writer posting to every
node, and after a random delay one of: SIGKILL the leader, SIGKILL a node's agent, SIGKILL a
node's managed server, SIGSTOP a node's agent for a few seconds; then starts again what it
killed (as a service manager would), lets the rollout end, and settles one that did not
complete as README's "When it fails" tells the admin (``rollout retry ID``, or ``rollout
rollback``). Then the invariant:

- every node fully on https (8443 serving a certificate of the cluster CA, 8080 closed) or
  fully on http (8080 open, 8443 closed), not frozen: a write is accepted at the end;
- no acknowledged write is missing from the node's store;
- the leader's node states agree with what each node serves (a node ``done`` in an enable-tls
  rollout serves https, ``done`` in a way back serves http; failed, rolled back or pending:
  the scheme it had), none needs the admin;
- a way back that the admin settled leaves every node on http.

Each iteration's seed is printed first, and its fault, the moment (the rollout's and the nodes'
states when the fault hit) and the verdict after; ``--seed S --iterations 1`` runs one again
(the same mode, fault, target and delay: the rollout's pace decides the phase it meets, so a
phase-dependent violation may need a few runs). A JSON line per iteration goes to ``--out``.

    TLSROLL_TEST_SLOT=5 python -m bench.faults --minutes 25 --seed 7000 --out /tmp/faults.jsonl

Not collected by pytest (``testpaths`` is ``tests``); daemons and servers are stopped at the
end of each iteration, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leader.wire import NODE_STATE, ROLLOUT_STATE
from tests.cluster import Cluster, wait_until
from tests.nodeside import Node, cluster_of
from tests.test_fault_matrix import (
    ENDED,
    STARTED,
    rollout_state,
    rollout_view,
    scheme_of,
    start,
    start_unless_running,
)
from tests.test_switch import Writer

MODES = ("enable-node", "enable-node-p2", "enable-scope", "disable")
FAULTS = ("leader", "agent", "server", "agent-stop")
# Beyond the brief's four (``--faults``): the leader and an agent down together, and a server
# that does not come back until the rollout has ended (then the admin starts it).
EXTRA_FAULTS = ("leader+agent", "server-gone")
LEASE = 20  # scope_freeze_lease, as the matrix's
END_TIMEOUT = 100 + LEASE + 60  # a scope freeze's unanswered node: a lease and a minute more


@dataclass
class Result:
    seed: int
    mode: str
    fault: str
    target: str
    delay: float
    down: float = 0.0  # how long what it killed stays down, or the agent stopped
    moment: str = ""  # the rollout's state and each node's, just before the fault
    ended: str = ""
    settled: list[str] = field(default_factory=list)  # the admin's commands and their ends
    schemes: dict[str, str] = field(default_factory=dict)
    acked: int = 0
    verdict: str = "ok"
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def moment(cluster: Cluster, rollout_id: str) -> str:
    """The rollout's state and its nodes', from one look (four looks would mix moments)."""
    try:
        view = rollout_view(cluster, rollout_id)
    except Exception:
        return "?"
    states = ",".join(f"{n.name}={NODE_STATE.text(n.state)}" for n in view.nodes)
    return f"{ROLLOUT_STATE.text(view.state)} {states}"


def inject(result: Result, cluster: Cluster, nodes: list[Node]) -> None:
    node = next((n for n in nodes if n.name == result.target), nodes[0])
    assert node.agent is not None
    if result.fault == "leader":
        cluster.kill_leader()
        time.sleep(result.down)
        cluster.start_leader()
    elif result.fault == "leader+agent":
        node.agent.kill()
        cluster.kill_leader()
        time.sleep(result.down)
        cluster.start_leader()
        time.sleep(result.down / 2)
        node.restart_agent()
    elif result.fault == "agent":
        node.agent.kill()
        time.sleep(result.down)
        node.restart_agent()
    elif result.fault in ("server", "server-gone"):
        pid = node.server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if result.fault == "server-gone":
            return  # started again once the rollout has ended
        time.sleep(result.down)  # its service manager starts it again if it stays down
        start_unless_running(node)
    else:  # agent-stop
        node.agent.send_signal(signal.SIGSTOP)
        time.sleep(result.down)
        node.agent.send_signal(signal.SIGCONT)


def wait_end(cluster: Cluster, rollout_id: str, timeout: float) -> str:
    seen = [""]

    def ended() -> bool:
        seen[0] = rollout_state(cluster, rollout_id)
        return seen[0] in ENDED

    try:
        wait_until(ended, timeout, f"the end of {rollout_id}", interval=0.5)
    except TimeoutError:
        return f"not ended ({seen[0] or '?'})"
    return seen[0]


def node_view(cluster: Cluster, rollout_id: str) -> dict[str, tuple[str, str]]:
    view = rollout_view(cluster, rollout_id)
    return {n.name: (NODE_STATE.text(n.state), n.reason) for n in view.nodes}


def settle(result: Result, cluster: Cluster, nodes: list[Node], rollout_id: str) -> list[str]:
    """What the admin does after a rollout that did not complete (README, "When it fails");
    the rollouts whose node states the check reads (the last one last)."""
    rollouts = [rollout_id]
    if result.ended == "completed":
        return rollouts
    if result.ended not in ENDED:  # held (an agent unreachable): README says abort waits for it
        aborted = cluster.cli("rollout", "abort", rollout_id, "--yes")
        result.settled.append(f"abort rc={aborted.returncode}")
        result.ended = wait_end(cluster, rollout_id, END_TIMEOUT)
        result.settled.append(f"abort -> {result.ended}")
        if result.ended not in ENDED:
            result.problems.append(f"rollout {rollout_id} never ended, even aborted")
            return rollouts
    try:
        cluster.wait_for_nodes_online([n.name for n in nodes], timeout=30)
    except TimeoutError as exc:
        result.problems.append(f"nodes not back online: {exc}")
        return rollouts
    how = ["rollback"] if result.mode == "disable" else ["retry", rollout_id]
    done = cluster.cli("rollout", *how, "--yes")
    out = (done.stdout + done.stderr).strip().replace("\n", " | ")
    result.settled.append(f"{' '.join(how)} rc={done.returncode}: {out[:300]}")
    if done.returncode != 0:
        if "nothing to do" in out or "nothing to take back" in out or "no node" in out:
            return rollouts
        result.problems.append(f"rollout {' '.join(how)} refused: {out[:300]}")
        return rollouts
    found = STARTED.search(done.stdout)
    if found is None:
        return rollouts
    rollouts.append(found[1])
    ended = wait_end(cluster, found[1], END_TIMEOUT)
    result.settled.append(f"{found[1]} -> {ended}")
    if ended != "completed":
        result.problems.append(f"the admin's {' '.join(how)} ended {ended}")
    return rollouts


def check(
    result: Result,
    cluster: Cluster,
    nodes: list[Node],
    writers: list[Writer],
    rollouts: list[str],
) -> None:
    problems = result.problems
    problems += [e for w in writers for e in w.errors]
    for node in nodes:
        try:
            result.schemes[node.name] = scheme_of(node)  # one scheme, ports agree, not frozen
        except Exception as exc:  # an AssertionError or a dead server: the violation itself
            problems.append(f"{node.name}: not on one scheme: {exc!r}"[:400])
    for node, writer in zip(nodes, writers, strict=True):
        scheme = result.schemes.get(node.name)
        if scheme is None:
            continue
        if scheme == "https":  # the CA's certificate (node.get trusts only the CA)
            try:
                node.served_fingerprint()
            except Exception as exc:
                problems.append(f"{node.name}: 8443 not the CA's certificate: {exc!r}"[:300])
        lost = []
        for entry_id, marker in writer.acked:
            got = node.get(scheme, f"entries/{entry_id}")
            if got.status != 200 or got.json().get("body") != {"marker": marker}:
                lost.append(entry_id)
        if lost:
            problems.append(f"{node.name}: {len(lost)} acknowledged writes lost: {lost[:5]}")
        try:
            status = node.post(scheme, {"after": "the campaign"}).status
        except OSError as exc:
            status = -1
            problems.append(f"{node.name}: write at the end failed: {exc!r}")
        if status != 201:
            problems.append(f"{node.name}: write at the end answered {status}")
    # The leader's states agree with what the nodes serve: the last rollout that touched a
    # node says where it is.
    wanted_back = result.mode == "disable"
    said: dict[str, tuple[str, str, str]] = {}
    for rollout_id in rollouts:
        try:
            view = node_view(cluster, rollout_id)
        except Exception as exc:
            problems.append(f"schema of {rollout_id}: {exc!r}")
            continue
        for name, (state, reason) in view.items():
            if state == "needs_attention":
                problems.append(f"{name} needs the admin in {rollout_id}: {reason}")
            said[name] = (rollout_id, state, reason)
    for name, (rollout_id, state, reason) in said.items():
        scheme = result.schemes.get(name)
        if scheme is None or state != "done":
            continue
        expect = "http" if wanted_back else "https"
        if scheme != expect:
            problems.append(f"{name} done in {rollout_id} but serves {scheme} ({reason})")
    # The leader's node list (the agents' heartbeats) says the same within a few beats.
    seen: dict[str, str] = {}

    def heard() -> bool:
        seen.update({n: i.server for n, i in cluster.list_nodes().items()})
        return all(seen.get(n) == s for n, s in result.schemes.items())

    try:
        wait_until(heard, 15, "the leader's node list to say each node's scheme", interval=0.5)
    except Exception:
        problems.append(f"the leader's node list says {seen}, the nodes {result.schemes}")
    if wanted_back and result.settled and any(s != "http" for s in result.schemes.values()):
        problems.append(f"the admin's way back left {result.schemes}")
    result.acked = sum(len(w.acked) for w in writers)


def iteration(seed: int, root: Path, faults: tuple[str, ...] = FAULTS) -> Result:
    rng = random.Random(seed)
    mode = rng.choice(MODES)
    fault = rng.choice(faults)
    target = rng.choice(["node1", "node2", "node3"])
    # A rollout of 3 nodes takes 1.5-4 s here (idle to loaded); a delay past its end tests a
    # fault after it, which is fine too but rarer.
    result = Result(
        seed,
        mode,
        fault,
        "leader" if fault == "leader" else target,
        round(rng.uniform(0, 3.5), 2),
        # Mostly a quick restart, as systemd's; now and then an outage past the leader's
        # step deadline (15 s here) and, in a scope freeze, past its lease (20 s).
        round(rng.uniform(0.2, 3) if rng.random() < 0.6 else rng.uniform(5, 30), 2),
    )
    if fault == "server":
        result.down = max(result.down, 3.0)  # the matrix's: its manager starts it after 3 s
    began = time.monotonic()
    with cluster_of(root, 3, step_deadline=15, scope_freeze_lease=LEASE) as (cluster, nodes):
        pw = root / "pw"
        pw.touch(0o600)
        pw.write_text("fault-campaign-password-for-practice\n")
        switch = ["start", "--scope", "cluster", "--password-file", str(pw)]
        if mode == "disable":
            first = start(cluster, *switch)
            if wait_end(cluster, first, 100) != "completed":
                result.verdict = "setup-failed"
                return result
        stop = threading.Event()
        writers = [Writer(n, stop) for n in nodes]
        threads = [threading.Thread(target=w.run, daemon=True) for w in writers]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: all(len(w.acked) >= 2 for w in writers), 20, "writes before")
            if mode == "disable":
                rollout_id = start(cluster, "rollback")
            elif mode == "enable-scope":
                rollout_id = start(cluster, *switch, "--freeze", "scope", "--max-parallel", "2")
            elif mode == "enable-node-p2":
                rollout_id = start(cluster, *switch, "--max-parallel", "2")
            else:
                rollout_id = start(cluster, *switch)
            time.sleep(result.delay)
            result.moment = moment(cluster, rollout_id)
            inject(result, cluster, nodes)
            result.ended = wait_end(cluster, rollout_id, END_TIMEOUT)
            if result.fault == "server-gone":
                gone = next(n for n in nodes if n.name == result.target)
                start_unless_running(gone)
            rollouts = settle(result, cluster, nodes, rollout_id)
            time.sleep(1.5)  # writes after the end
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        check(result, cluster, nodes, writers, rollouts)
        if result.problems:
            result.verdict = "VIOLATION"
            keep = root.parent / f"logs-{seed}"
            keep.mkdir(exist_ok=True)
            (keep / "daemons.log").write_text(cluster.logs_text())
            for node in nodes:
                with contextlib.suppress(OSError):
                    (keep / f"{node.name}-server.log").write_bytes(
                        node.server.log_path.read_bytes()
                    )
    result.seconds = round(time.monotonic() - began, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=25.0, help="total time bound")
    parser.add_argument("--out", type=Path, default=None, help="a JSON line per iteration")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"the faults drawn from (a seed's draw depends on them): {FAULTS + EXTRA_FAULTS}",
    )
    parser.add_argument("--root", type=Path, default=None, help="a short tmp dir")
    args = parser.parse_args(argv)
    faults = tuple(args.faults.split(","))
    if unknown := set(faults) - set(FAULTS + EXTRA_FAULTS):
        parser.error(f"unknown faults: {sorted(unknown)}")
    if not os.environ.get("TLSROLL_TEST_SLOT"):
        print("set TLSROLL_TEST_SLOT (loopback addresses of their own)", file=sys.stderr)
        return 2
    root = args.root or Path(tempfile.mkdtemp(prefix="faults-"))
    deadline = time.monotonic() + args.minutes * 60
    results: list[Result] = []
    print(f"campaign: seeds {args.seed}.. under {root}", flush=True)
    for i in range(args.iterations):
        # An iteration takes up to ~4 min in the worst case (a held rollout, an abort).
        if time.monotonic() > deadline:
            break
        seed = args.seed + i
        print(f"[{i}] seed {seed}", flush=True)
        try:
            result = iteration(seed, root / str(seed), faults)
        except Exception as exc:
            rng = random.Random(seed)
            result = Result(seed, rng.choice(MODES), rng.choice(faults), "?", 0.0)
            result.verdict = "ERROR"
            result.problems = [f"{exc!r}"[:600], traceback.format_exc()[-1500:]]
        results.append(result)
        line = asdict(result)
        print(
            f"[{i}] seed {seed} {result.mode} {result.fault}@{result.target} "
            f"+{result.delay}s down {result.down}s at '{result.moment}' -> {result.ended} "
            f"{result.settled} {result.schemes} acked={result.acked}: "
            f"{result.verdict} {result.problems}",
            flush=True,
        )
        if args.out is not None:
            with args.out.open("a") as out:
                out.write(json.dumps(line) + "\n")
    summary: dict[str, Any] = {}
    for r in results:
        summary.setdefault(r.verdict, []).append(r.seed)
    print(f"campaign: {len(results)} iterations: {json.dumps(summary)}", flush=True)
    return 1 if any(r.verdict != "ok" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
