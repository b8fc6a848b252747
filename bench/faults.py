"""A randomized, bounded fault campaign against the seed's safety promise (SPEC, "Bad input and
faults"): what the fixed points of ``tests/test_fault_matrix.py`` miss.

Each iteration builds a real loopback cluster of ``--nodes`` nodes (3 unless told; the leader
and its agents as processes, each node a reference server on its own 127.x.y.z with the seed's
ports), starts a rollout (enable-tls with ``--freeze node`` at ``--max-parallel`` 1 or 2,
enable-tls with ``--freeze scope``, or the way back of a switched cluster, disable-tls) with a
writer posting to every node, and hits it with one fault or two independent ones (each on its
own node, the leader at most once): SIGKILL the leader, SIGKILL a node's agent, SIGKILL a
node's managed server, SIGSTOP a node's agent (``--faults``: also the leader and an agent
together, a server gone until the rollout ends). A fault's moment is a time after the start, a
step of a node's transaction as its agent journals it (freeze, write_config, restart, verify,
unfreeze; a failed switch's restore_config, verify_source), or the leader's state of a node
(preflight, staging, switching, confirming, done). What a fault killed is started again (as a
service manager would); the rollout ends; one that did not complete is settled as README's
"When it fails" tells the admin (``rollout abort`` of a held one, ``rollout retry ID`` of the
last retry, or ``rollout rollback``), and faults of their own hit that first retry or way back.
Two modes aim at the admin's way out: ``enable-retry`` and ``disable-again`` abort the first
rollout once a node has begun its freeze (a planted stop, no fault), and their faults hit the
``rollout retry`` or the second ``rollout rollback``. Two more (session 74) aim at the
password's and the transitional strategy's transactions: ``change-password`` (a switched
cluster, a new password staged) and ``finalize`` (of a transitional phase 1, ``--force``).
``--faults disk`` fills a small tmpfs under a node's journal, its server's config dir or the
leader's data dir at the moment, freed ``down`` seconds later (root only: refused otherwise),
and a moment may be a phase of the node's transaction (frozen, config_written, restarted:
the config write, the restart, the verify runs), seen by a 1 ms watch of its journal's files.
Then the invariant:

- every node fully on https (8443 serving a certificate of the cluster CA, 8080 closed) or
  fully on http (8080 open, 8443 closed), not frozen: a write is accepted at the end;
- no acknowledged write is missing from the node's store;
- the leader's node states agree with what each node serves (a node ``done`` in an enable-tls
  rollout serves https, ``done`` in a way back serves http; failed, rolled back or pending:
  the scheme it had), none needs the admin; none shows its agent's store trouble once the
  disks are freed;
- a way back that the admin settled leaves every node on http;
- a change-password that completed leaves no node on an older password;
- no daemon's or server's log holds a traceback or a secret;
- each daemon, still running, stops at SIGTERM within its unit's ``TimeoutStopSec`` (the
  agent's 90 s, the leader's 30 s), exit 0.

Each iteration's seed is printed first, then its faults (each with the moment it met: the
journal's last two events or the leader's state; "not hit" where the rollout ended first) and
the verdict; ``--seed S --iterations 1`` with the same ``--faults`` and ``--nodes`` runs one
again (the same draw; the rollout's pace still decides what a time meets, and a step moment
what else runs then). A JSON line per iteration goes to ``--out``.

    TLSROLL_TEST_SLOT=5 python -m bench.faults --minutes 25 --seed 7000 --nodes 3,4,5 \
        --faults leader,agent,server,agent-stop,leader+agent,server-gone --out /tmp/f.jsonl

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
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leader.wire import NODE_STATE, ROLLOUT_STATE
from nodeagent.journal import JOURNAL_IN_DOUBT
from tests.cluster import Cluster, wait_until
from tests.nodeside import Node, cluster_of, fill, tmpfs
from tests.test_fault_matrix import (
    ENDED,
    ORDER,
    STARTED,
    node_state,
    rollout_state,
    rollout_view,
    scheme_of,
    start,
    start_unless_running,
)
from tests.test_switch import Writer

MODES = ("enable-node", "enable-node-p2", "enable-scope", "disable")
# Session 71: the admin's way out under faults. The first rollout is aborted once a node has
# begun to switch (a planted stop, no fault), and the faults hit the admin's ``rollout retry``
# (enable-tls) or the second way back (``rollout rollback``).
SETTLE_MODES = ("enable-retry", "disable-again")
# Session 74: the password's and the transitional strategy's transactions. A switched cluster
# (no fault) gets a new staged password (``password set``) and a change-password rollout, which
# the faults hit; or phase 1 of the transitional strategy (no fault) ends awaiting its finalize,
# and the faults hit the finalize (``--force``: the writers are workstations on http).
PASSWORD_MODES = ("change-password", "finalize")
ALL_MODES = MODES + SETTLE_MODES + PASSWORD_MODES
FAULTS = ("leader", "agent", "server", "agent-stop")
# Beyond the brief's four (``--faults``): the leader and an agent down together, and a server
# that does not come back until the rollout has ended (then the admin starts it).
EXTRA_FAULTS = ("leader+agent", "server-gone", "disk")
# Session 74: a disk with no room left. Its directory (a node's agent data dir, its journal's;
# a node's server config dir, where the agent writes the config and stages its files; or the
# leader's data dir, its store's) is a small tmpfs of its own from the iteration's start (the
# mounts need root: ``--faults disk`` refuses to run without), filled up at the fault's moment
# and freed ``down`` seconds later.
DISK_PLACES = ("journal", "config", "leader")
DISK_SIZE = {"journal": "16m", "config": "8m", "leader": "32m"}
LEADER_FAULTS = ("leader", "leader+agent")
# Where a fault hits (``Fault.at``): a time after the rollout's start (session 70's only kind:
# most fell in "switching"), a step of the watched node's transaction as its agent journals it
# (its ``begin`` record: the step is about to run or runs), or the leader's state of that node.
# The agent's steps: a switch's and a way back's forward ones, and the way back of a switch
# that failed (restore_config, verify_source: reached only where a switch goes back).
AGENT_STEPS = ("freeze", "write_config", "restart", "verify", "unfreeze")
BACK_STEPS = ("restore_config", "verify_source")
LEADER_STATES = ("preflight", "staging", "switching", "confirming", "done")
# Session 74: the watched node's transaction in a phase (its journal's ``txns`` row), seen by a
# 1 ms poll of the journal's files (SQLite opened only when they changed): the config write
# runs in ``frozen``, the restart in ``config_written``, the verify in ``restarted``. A step's
# ``begin`` record, polled every 5 ms with SQLite opened each time, was mostly seen once the
# step had ended (session 73).
PHASES = ("frozen", "config_written", "restarted")
LEASE = 20  # scope_freeze_lease, as the matrix's
END_TIMEOUT = 100 + LEASE + 60  # a scope freeze's unanswered node: a lease and a minute more
WATCH_TIMEOUT = 90.0  # a step never reached (the rollout ended first) is "not reached"
# The bound of a daemon's stop (SIGTERM) at an iteration's end: its unit's TimeoutStopSec
# (README: the agent's 90 s, a switch under way ending first; the leader's 30 s).
STOP_BOUND = {"leader": 30.0, "agent": 90.0}


@dataclass
class Fault:
    kind: str
    target: str  # the node whose agent/server it hits, or "leader"
    at: str  # "time", "step:NAME" (the watched node's journal) or "state:NAME" (the leader's)
    delay: float  # "time": seconds after the rollout's start; else after the moment was seen
    down: float  # how long what it killed stays down, or the agent stopped
    watch: str  # the node whose step or state is watched
    rollout: str = "first"  # "first", or "settle": the admin's retry or way back
    moment: str = ""  # what was seen when it hit
    hit: bool = False
    place: str = ""  # a disk fault's directory: "journal", "config" or "leader"


@dataclass
class Result:
    seed: int
    mode: str
    nodes: int = 3
    faults: list[Fault] = field(default_factory=list)
    ended: str = ""
    settled: list[str] = field(default_factory=list)  # the admin's commands and their ends
    schemes: dict[str, str] = field(default_factory=dict)
    acked: int = 0
    verdict: str = "ok"
    # The daemons' warnings and errors (each ``who:event`` once): which paths the faults
    # reached (a disk full that nothing wrote to meanwhile leaves none).
    reached: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stops: dict[str, float] = field(default_factory=dict)  # each daemon's stop, in seconds

    def line(self) -> str:
        faults = "; ".join(
            f"{f.rollout}:{f.kind}@{f.target}{':' + f.place if f.place else ''}"
            f" {f.at}(+{f.delay}s on {f.watch}) down {f.down}s"
            f" {'HIT ' + f.moment if f.hit else 'not hit: ' + f.moment}"
            for f in self.faults
        )
        return (
            f"{self.mode} n={self.nodes} [{faults}] -> {self.ended} {self.settled}"
            f" {self.schemes} acked={self.acked}: {self.verdict} {self.problems}"
            f" reached {self.reached}"
        )


def moment(cluster: Cluster, rollout_id: str) -> str:
    """The rollout's state and its nodes', from one look (four looks would mix moments)."""
    try:
        view = rollout_view(cluster, rollout_id)
    except Exception:
        return "?"
    states = ",".join(f"{n.name}={NODE_STATE.text(n.state)}" for n in view.nodes)
    return f"{ROLLOUT_STATE.text(view.state)} {states}"


def draw_fault(
    rng: random.Random, kinds: tuple[str, ...], names: list[str], taken: set[str], rollout: str
) -> Fault | None:
    """One fault on what no other fault of this rollout hits (two faults are independent: the
    leader at most once, a node at most once)."""
    kinds = tuple(k for k in kinds if not (k in LEADER_FAULTS and "leader" in taken))
    free = [n for n in names if n not in taken]
    if not kinds or not free:
        return None
    kind = rng.choice(kinds)
    target = rng.choice(free)
    place = ""
    if kind == "disk":
        place = rng.choice([p for p in DISK_PLACES if p != "leader" or "leader" not in taken])
    on_leader = kind == "leader" or place == "leader"
    watch = rng.choice(names) if on_leader else target
    where = rng.random()
    if where < 0.2:
        at, delay = "time", round(rng.uniform(0, 3.5), 2)
    elif where < 0.55:
        at = "step:" + rng.choice(AGENT_STEPS * 3 + BACK_STEPS)
        # At the record, within a few ms, or later in the step (a restart's record is written
        # before it; its end rides the verify's write: "step:verify" is seen after it).
        delay = round(rng.choice((0.0, rng.uniform(0, 0.05), rng.uniform(0, 0.3))), 3)
    elif where < 0.8:
        # In the action the phase leads to: at once, or a few ms into it. The verify runs in
        # the same hand-off as the ``restarted`` record (a look mostly sees ``verified``
        # already): ``config_written`` with a delay up to a restart's length lands in the
        # restart's end or the verify as well.
        name = rng.choice(PHASES)
        at = "phase:" + name
        delay = round(rng.choice((0.0, 0.0, rng.uniform(0, 0.01), rng.uniform(0, 0.05))), 4)
        if name == "config_written" and rng.random() < 0.5:
            delay = round(rng.uniform(0.05, 0.6), 4)
    else:
        at, delay = "state:" + rng.choice(LEADER_STATES), round(rng.uniform(0, 0.2), 3)
    # Mostly a quick restart, as systemd's; now and then an outage past the leader's step
    # deadline (15 s here) and, in a scope freeze, past its lease (20 s).
    down = round(rng.uniform(0.2, 3) if rng.random() < 0.6 else rng.uniform(5, 30), 2)
    if kind == "server":
        down = max(down, 3.0)  # the matrix's: its manager starts it after 3 s
    taken.add(target)
    if on_leader or kind in LEADER_FAULTS:
        taken.add("leader")
    return Fault(
        kind, "leader" if on_leader else target, at, delay, down, watch, rollout, place=place
    )


def draw(rng: random.Random, kinds: tuple[str, ...], names: list[str], rollout: str) -> list[Fault]:
    """One fault, or (two times in five) two independent ones."""
    taken: set[str] = set()
    count = 2 if rng.random() < 0.4 else 1
    drawn = [draw_fault(rng, kinds, names, taken, rollout) for _ in range(count)]
    return [f for f in drawn if f is not None]


def seen_step(node: Node, rollout_id: str, step: str) -> str:
    """The watched node's journal, if ``step`` of its transaction for ``rollout_id`` has begun:
    its last two events (else "")."""
    try:
        rows = node.journal_events(rollout_id, "switch") + node.journal_events(
            rollout_id, "rollback"
        )
    except sqlite3.Error:
        return ""
    if (step, "begin") not in rows:
        return ""
    return " ".join(f"{s}.{w}" for s, w in rows[-2:])


class JournalWatch:
    """The watched node's journal looked at only when its files changed (their sizes and
    times), or every 20 ms at the latest: a 1 ms poll that opens SQLite only on a write."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.signature: tuple[tuple[int, int], ...] = ()
        self.looked = 0.0

    def changed(self) -> bool:
        signature = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(f"{self.node.journal_path}{suffix}")
            except OSError:
                signature.append((-1, -1))
            else:
                signature.append((st.st_size, st.st_mtime_ns))
        now = time.monotonic()
        if tuple(signature) == self.signature and now - self.looked < 0.02:
            return False
        self.signature, self.looked = tuple(signature), now
        return True


def seen_phase(node: Node, rollout_id: str, phase: str) -> str:
    """The watched node's transactions for ``rollout_id`` (a switch, a way back): "" unless
    one is in ``phase`` or past it; else what it is in ("frozen", or "passed: restarted")."""
    try:
        rows = node.journal_query("SELECT phase FROM txns WHERE rollout_id = ?", rollout_id)
    except sqlite3.Error:
        return ""
    order = ("started", *PHASES, "verified", "completed")
    for row in rows:
        now = str(row["phase"])
        if now == phase:
            return f"in {now}"
        if now not in order or order.index(now) > order.index(phase):
            return f"passed: {now}"
    return ""


def await_moment(
    fault: Fault,
    cluster: Cluster,
    nodes: list[Node],
    rollout_id: str,
    began: float,
    over: threading.Event,
) -> bool:
    """Wait for the fault's moment (bounded); False if the rollout ended before it."""
    if fault.at == "time":  # also after the rollout's end: a fault then is fine too
        time.sleep(max(0.0, began + fault.delay - time.monotonic()))
        fault.moment = moment(cluster, rollout_id)
        return True
    how, _, name = fault.at.partition(":")
    watched = next(n for n in nodes if n.name == fault.watch)
    journal = JournalWatch(watched)
    deadline = time.monotonic() + WATCH_TIMEOUT
    while time.monotonic() < deadline:
        ended = over.is_set()  # (read first: a step seen after it still counts)
        if how == "phase":
            if journal.changed() and (seen := seen_phase(watched, rollout_id, name)):
                fault.moment = seen
                break
        elif how == "step":
            if seen := seen_step(watched, rollout_id, name):
                fault.moment = seen
                break
        else:
            with contextlib.suppress(Exception):
                state = node_state(cluster, rollout_id, fault.watch)
                if state == name or (
                    state in ORDER and name in ORDER and ORDER.index(state) > ORDER.index(name)
                ):
                    fault.moment = f"leader says {state}"
                    break
        if ended:
            fault.moment = "the rollout ended first"
            return False
        time.sleep({"phase": 0.001, "step": 0.005}.get(how, 0.03))
    else:
        fault.moment = "not seen in time"
        return False
    time.sleep(fault.delay)
    return True


def disk_dir(root: Path, fault: Fault) -> Path:
    """The directory a disk fault fills: under the iteration's ``root``, as ``cluster_of``
    lays a cluster out (mounted on before it starts)."""
    if fault.place == "leader":
        return root / "cluster" / "data"
    number = int(fault.target.removeprefix("node"))
    if fault.place == "journal":
        return root / "cluster" / "agents" / fault.target / "data"
    return root / f"n{number - 1}" / "server"


def disk_dirs(root: Path, faults: list[Fault], names: list[str]) -> dict[Path, str]:
    """The directories to mount a tmpfs on before the iteration's cluster starts (each with
    its place): each disk fault's, and for one of the admin's retry or way back every node's
    of its place, as ``run_with_faults`` may move it to a node that retry covers."""
    dirs: dict[Path, str] = {}
    for fault in faults:
        if fault.kind != "disk":
            continue
        movable = fault.rollout == "settle" and fault.place != "leader"
        for target in names if movable else [fault.target]:
            moved = Fault(fault.kind, target, fault.at, 0, 0, target, place=fault.place)
            dirs[disk_dir(root, moved)] = fault.place
    return dirs


def inject(fault: Fault, cluster: Cluster, nodes: list[Node]) -> None:
    node = next((n for n in nodes if n.name == fault.target), nodes[0])
    assert node.agent is not None
    if fault.kind == "disk":
        directory = {
            "leader": cluster.data_dir,
            "journal": node.agent.data_dir,
            "config": node.config_dir,
        }[fault.place]
        if not os.path.ismount(directory):  # the campaign's layout changed: say so
            raise RuntimeError(f"{directory} is not the tmpfs mounted for the disk fault")
        filler = fill(directory)
        try:
            time.sleep(fault.down)
        finally:
            filler.unlink()
    elif fault.kind == "leader":
        cluster.kill_leader()
        time.sleep(fault.down)
        cluster.start_leader()
    elif fault.kind == "leader+agent":
        node.agent.kill()
        cluster.kill_leader()
        time.sleep(fault.down)
        cluster.start_leader()
        time.sleep(fault.down / 2)
        node.restart_agent()
    elif fault.kind == "agent":
        node.agent.kill()
        time.sleep(fault.down)
        node.restart_agent()
    elif fault.kind in ("server", "server-gone"):
        pid = node.server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if fault.kind == "server-gone":
            return  # started again once the rollout has ended
        time.sleep(fault.down)  # its service manager starts it again if it stays down
        start_unless_running(node)
    else:  # agent-stop
        node.agent.send_signal(signal.SIGSTOP)
        time.sleep(fault.down)
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


def run_with_faults(
    result: Result, faults: list[Fault], cluster: Cluster, nodes: list[Node], rollout_id: str
) -> str:
    """Each fault in its own thread at its moment while the rollout runs; the rollout's end
    once every fault is over (what a fault killed started again)."""
    over = threading.Event()
    began = time.monotonic()
    with contextlib.suppress(Exception):  # a retry covers only the nodes left: watch those
        view = rollout_view(cluster, rollout_id).nodes
        covered = sorted(n.name for n in view if NODE_STATE.text(n.state) != "skipped")
        for fault in faults:
            if covered and fault.watch not in covered:
                number = int(fault.watch.removeprefix("node"))
                fault.watch = covered[number % len(covered)]
                if fault.target != "leader" and fault.target not in covered:
                    fault.target = (
                        fault.watch
                        if fault.watch not in {f.target for f in faults}
                        else fault.target
                    )

    def strike(fault: Fault) -> None:
        try:
            if await_moment(fault, cluster, nodes, rollout_id, began, over):
                fault.hit = True
                inject(fault, cluster, nodes)
        except Exception as exc:  # the campaign's own trouble: said, never lost
            result.problems.append(f"campaign: fault {fault.kind}: {exc!r}"[:400])

    threads = [threading.Thread(target=strike, args=(f,), daemon=True) for f in faults]
    for t in threads:
        t.start()
    ended = wait_end(cluster, rollout_id, END_TIMEOUT)
    over.set()
    for t in threads:
        t.join(WATCH_TIMEOUT + 60)
    for fault in faults:
        if fault.kind == "server-gone" and fault.hit:
            start_unless_running(next(n for n in nodes if n.name == fault.target))
    if ended in ENDED and any(f.hit for f in faults):
        ended = wait_end(cluster, rollout_id, END_TIMEOUT)  # (a leader down at its end: again)
    return ended


def node_view(cluster: Cluster, rollout_id: str) -> dict[str, tuple[str, str]]:
    view = rollout_view(cluster, rollout_id)
    return {n.name: (NODE_STATE.text(n.state), n.reason) for n in view.nodes}


def finish(result: Result, cluster: Cluster, rollout_id: str, ended: str) -> str:
    """A rollout held (an agent unreachable): README says abort, which waits for it."""
    if ended in ENDED:
        return ended
    aborted = cluster.cli("rollout", "abort", rollout_id)
    said = (aborted.stdout + aborted.stderr).strip().replace("\n", " | ")[:200]
    result.settled.append(f"abort {rollout_id} rc={aborted.returncode}: {said}")
    ended = wait_end(cluster, rollout_id, END_TIMEOUT)
    result.settled.append(f"abort -> {ended}")
    if ended not in ENDED:
        result.problems.append(f"rollout {rollout_id} never ended, even aborted")
    return ended


def settle(
    result: Result, cluster: Cluster, nodes: list[Node], rollout_id: str, faults: list[Fault]
) -> list[str]:
    """What the admin does after a rollout that did not complete (README, "When it fails"):
    ``rollout retry`` (of the last retry), or the way back again; ``faults`` hit the first of
    these, and up to two more follow (no fault) until one completes. The rollouts whose node
    states the check reads (the last one last)."""
    rollouts = [rollout_id]
    ended = result.ended
    back = result.mode.startswith("disable")
    for round_ in range(3):
        if ended == "completed" or ended not in ENDED:
            return rollouts
        try:
            cluster.wait_for_nodes_online([n.name for n in nodes], timeout=30)
        except TimeoutError as exc:
            result.problems.append(f"nodes not back online: {exc}")
            return rollouts
        how = ["rollback"] if back else ["retry", rollouts[-1]]
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
        if round_ == 0 and faults:
            ended = run_with_faults(result, faults, cluster, nodes, found[1])
        else:
            ended = wait_end(cluster, found[1], END_TIMEOUT)
        ended = finish(result, cluster, found[1], ended)
        result.settled.append(f"{found[1]} -> {ended}")
        if ended != "completed" and (round_ == 2 or not (round_ == 0 and faults)):
            result.problems.append(f"the admin's {' '.join(how)} ended {ended}")
            return rollouts
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
    wanted_back = result.mode.startswith("disable")
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
    # The leader's node list (the agents' heartbeats) says the same within a few beats, and
    # no agent's store trouble (``agent-store``) once every disk fault has freed its disk.
    seen: dict[str, str] = {}
    trouble: dict[str, list[str]] = {}

    def heard() -> bool:
        nodes_now = cluster.list_nodes()
        seen.update({n: i.server for n, i in nodes_now.items()})
        trouble.clear()
        trouble.update({n: list(i.store_trouble) for n, i in nodes_now.items() if i.store_trouble})
        return not trouble and all(seen.get(n) == s for n, s in result.schemes.items())

    try:
        wait_until(heard, 15, "the leader's node list to say each node's scheme", interval=0.5)
    except Exception:
        if trouble:
            problems.append(f"store trouble said after every disk was freed: {trouble}"[:400])
        if not trouble or any(seen.get(n) != s for n, s in result.schemes.items()):
            problems.append(f"the leader's node list says {seen}, the nodes {result.schemes}")
    if wanted_back and result.settled and any(s != "http" for s in result.schemes.values()):
        problems.append(f"the admin's way back left {result.schemes}")
    # A change-password that completed (or the admin's retry of it): no node runs an older
    # password than the one staged.
    if result.mode == "change-password" and rollout_state(cluster, rollouts[-1]) == "completed":
        with contextlib.suppress(Exception):
            behind = cluster.schema_json().get("password_behind")
            if behind:
                problems.append(f"completed, yet nodes run an older password: {behind}"[:400])
    result.acked = sum(len(w.acked) for w in writers)


def stop_daemons(result: Result, cluster: Cluster) -> None:
    """SIGTERM the leader and every agent at once (a host's shutdown) once the checks are
    done: each must be running still, and exit 0 within its unit's bound (``STOP_BOUND``).
    The cluster's close killed one still up after 5 s, unsaid: an agent that hung at its stop
    (the store watch's thread, a journal write) passed."""

    def stop(daemon: Any) -> None:
        kind = "leader" if daemon is cluster.leader else "agent"
        if not daemon.running:
            result.problems.append(f"{daemon.name} was not running at the end")
            return
        began = time.monotonic()
        try:
            code = daemon.stop(timeout=STOP_BOUND[kind])
        except subprocess.TimeoutExpired:
            result.problems.append(f"{daemon.name} did not stop within {STOP_BOUND[kind]:.0f} s")
            return
        result.stops[daemon.name] = round(time.monotonic() - began, 1)
        if code != 0:
            result.problems.append(f"{daemon.name} stopped with exit code {code}")

    threads = [threading.Thread(target=stop, args=(d,)) for d in cluster.daemons()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def abort_early(result: Result, cluster: Cluster, nodes: list[Node], rollout_id: str) -> str:
    """The planted stop of the settle modes (no fault): ``rollout abort`` once a node has begun
    to switch (its journal), so that the admin's retry or second way back has nodes left."""
    wait_until(
        lambda: any(seen_step(n, rollout_id, "freeze") for n in nodes),
        60,
        "a node's freeze",
        interval=0.01,
    )
    aborted = cluster.cli("rollout", "abort", rollout_id)
    said = (aborted.stdout + aborted.stderr).strip().replace("\n", " | ")[:200]
    result.settled.append(f"planted abort rc={aborted.returncode}: {said}")
    return finish(result, cluster, rollout_id, wait_end(cluster, rollout_id, END_TIMEOUT))


def iteration(
    seed: int,
    root: Path,
    kinds: tuple[str, ...] = FAULTS,
    sizes: tuple[int, ...] = (3,),
    modes: tuple[str, ...] = ALL_MODES,
) -> Result:
    rng = random.Random(seed)
    mode = rng.choice(modes)
    count = rng.choice(sizes)
    names = [f"node{i + 1}" for i in range(count)]
    result = Result(seed, mode, count)
    first = [] if mode in SETTLE_MODES else draw(rng, kinds, names, "first")
    # The admin's way out: faults of its own, every time in the settle modes, else one time in
    # two (used only where the first rollout did not complete).
    later = draw(rng, kinds, names, "settle") if mode in SETTLE_MODES or rng.random() < 0.5 else []
    result.faults = first + later
    began = time.monotonic()
    with contextlib.ExitStack() as mounts:
        for directory, place in disk_dirs(root, result.faults, names).items():
            mounts.enter_context(tmpfs(directory, DISK_SIZE[place]))
        run_iteration(result, root, first, later)
    for fault in later:  # (the first rollout completed: no retry or way back for them)
        fault.moment = fault.moment or "no retry or way back ran"
    result.seconds = round(time.monotonic() - began, 1)
    return result


PASSWORDS = ("fault-campaign-password-for-practice", "fault-campaign-second-password-practice")


def prepare(result: Result, cluster: Cluster, root: Path) -> bool:
    """What a mode's faulted rollout starts from, without a fault: a switched cluster (the way
    back, change-password), or phase 1 of the transitional strategy awaiting its finalize; and
    a new staged password for change-password. False if it did not get there."""
    pw = root / "pw"
    switch = ["start", "--scope", "cluster", "--password-file", str(pw)]
    mode = result.mode
    switched_first = mode.startswith("disable") or mode == "change-password"
    if switched_first and wait_end(cluster, start(cluster, *switch), 100) != "completed":
        return False
    if mode == "change-password":
        second = root / "pw2"
        second.touch(0o600)
        second.write_text(PASSWORDS[1] + "\n")
        staged = cluster.cli("password", "set", "--password-file", str(second))
        if staged.returncode != 0:
            result.problems.append(f"password set: {(staged.stdout + staged.stderr)[:300]}")
            return False
    if mode == "finalize":
        phase1 = start(cluster, *switch, "--strategy", "transitional")
        seen = [""]

        def waiting() -> bool:
            seen[0] = rollout_state(cluster, phase1)
            return seen[0] in ("awaiting_finalize", *ENDED)

        wait_until(waiting, 100, "phase 1 awaiting its finalize", interval=0.5)
        if seen[0] != "awaiting_finalize":
            return False
        result.settled.append(f"phase 1 {phase1}")
    return True


def run_iteration(result: Result, root: Path, first: list[Fault], later: list[Fault]) -> None:
    mode, count = result.mode, result.nodes
    with cluster_of(root, count, step_deadline=15, scope_freeze_lease=LEASE) as (cluster, nodes):
        pw = root / "pw"
        pw.touch(0o600)
        pw.write_text(PASSWORDS[0] + "\n")
        switch = ["start", "--scope", "cluster", "--password-file", str(pw)]
        if not prepare(result, cluster, root):
            result.verdict = "setup-failed"
            return
        stop = threading.Event()
        writers = [Writer(n, stop) for n in nodes]
        threads = [threading.Thread(target=w.run, daemon=True) for w in writers]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: all(len(w.acked) >= 2 for w in writers), 20, "writes before")
            if mode.startswith("disable"):
                rollout_id = start(cluster, "rollback")
            elif mode == "enable-scope":
                rollout_id = start(cluster, *switch, "--freeze", "scope", "--max-parallel", "2")
            elif mode == "enable-node-p2":
                rollout_id = start(cluster, *switch, "--max-parallel", "2")
            elif mode == "change-password":
                rollout_id = start(cluster, "start", "--scope", "cluster", "--change", mode)
            elif mode == "finalize":
                rollout_id = start(cluster, "finalize", "--force")
            else:
                rollout_id = start(cluster, *switch)
            if mode in SETTLE_MODES:
                result.ended = abort_early(result, cluster, nodes, rollout_id)
            else:
                result.ended = finish(
                    result,
                    cluster,
                    rollout_id,
                    run_with_faults(result, first, cluster, nodes, rollout_id),
                )
            rollouts = settle(result, cluster, nodes, rollout_id, later)
            time.sleep(1.5)  # writes after the end
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        check(result, cluster, nodes, writers, rollouts)
        stop_daemons(result, cluster)  # (before the logs are read: what a stop said too)
        logs = cluster.logs_text() + "".join(
            n.server.log_path.read_text(errors="replace")
            for n in nodes
            if n.server.log_path.exists()
        )
        result.reached = sorted(
            {
                f"{d.name}:{e.get('event')}"
                for d in cluster.daemons()
                for e in d.log_events()
                if e.get("level") in ("warning", "error", "critical")
            }
        )
        if JOURNAL_IN_DOUBT in logs:  # (an error's words, no event of its own)
            result.reached.append("journal:in_doubt")
        if "Traceback" in logs:
            result.problems.append("a traceback in a daemon's or a server's log")
        if found := cluster.find_secrets(logs, PASSWORDS):
            result.problems.append(f"secrets in the logs: {found}")
        if result.problems:
            result.verdict = "VIOLATION"
            keep = root.parent / f"logs-{result.seed}"
            keep.mkdir(exist_ok=True)
            (keep / "daemons.log").write_text(cluster.logs_text())
            for node in nodes:
                with contextlib.suppress(OSError):
                    (keep / f"{node.name}-server.log").write_bytes(
                        node.server.log_path.read_bytes()
                    )
                with contextlib.suppress(OSError, sqlite3.Error):
                    events = node.journal_query("SELECT * FROM events ORDER BY seq")
                    (keep / f"{node.name}-journal.json").write_text(json.dumps(events, indent=1))


def cannot_mount(root: Path) -> str:
    """Why a tmpfs cannot be mounted under ``root`` ("" if it can): the disk fault needs it."""
    probe = root / "mount-probe"
    try:
        with tmpfs(probe, "64k"):
            pass
    except (OSError, subprocess.SubprocessError) as exc:
        said = getattr(exc, "stderr", b"") or b""
        return (said.decode(errors="replace").strip() or str(exc)).splitlines()[-1][:200]
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return ""


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
    parser.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help=f"the rollouts drawn from (a seed's draw depends on them): {ALL_MODES}",
    )
    parser.add_argument("--root", type=Path, default=None, help="a short tmp dir")
    parser.add_argument(
        "--nodes", default="3", help="cluster sizes drawn from, e.g. 3,4,5 (a seed's draw too)"
    )
    args = parser.parse_args(argv)
    faults = tuple(args.faults.split(","))
    if unknown := set(faults) - set(FAULTS + EXTRA_FAULTS):
        parser.error(f"unknown faults: {sorted(unknown)}")
    modes = tuple(args.modes.split(","))
    if unknown := set(modes) - set(ALL_MODES):
        parser.error(f"unknown modes: {sorted(unknown)}")
    try:
        sizes = tuple(int(n) for n in args.nodes.split(","))
    except ValueError:
        parser.error(f"--nodes: not a list of numbers: {args.nodes!r}")
    if not all(2 <= n <= 8 for n in sizes):
        parser.error("--nodes: each size from 2 to 8")
    if not os.environ.get("TLSROLL_TEST_SLOT"):
        print("set TLSROLL_TEST_SLOT (loopback addresses of their own)", file=sys.stderr)
        return 2
    root = args.root or Path(tempfile.mkdtemp(prefix="faults-"))
    if "disk" in faults and (refused := cannot_mount(root)):
        print(f"--faults disk: cannot mount a tmpfs here ({refused}): run as root", file=sys.stderr)
        return 2
    # The phase moments' watch is a thread beside the writers' and the other faults': at the
    # interpreter's 5 ms switch interval it may look only every 5 ms (a verify's length);
    # 0.5 ms lets it look about as often as it polls.
    sys.setswitchinterval(0.0005)
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
            result = iteration(seed, root / str(seed), faults, sizes, modes)
        except Exception as exc:
            result = Result(seed, "?")
            result.verdict = "ERROR"
            result.problems = [f"{exc!r}"[:600], traceback.format_exc()[-1500:]]
        results.append(result)
        line = asdict(result)
        print(f"[{i}] seed {seed} {result.line()}", flush=True)
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
