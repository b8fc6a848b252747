"""End-to-end rollout benchmark on real nodes (``make bench-rollout N=10``); prints figures,
asserts nothing.

Each run builds a fresh cluster on loopback addresses (``bench.common.address``): ``tlsroll
init``, a real leader, and N real nodes, each a reference server on its own address (ports
8080/8443) managed by a real agent (9442, bootstrap 9443), enrolled through the join port with a
one-time token. Then, in this order:

1. the Ansible baseline (``bench.ansible_baseline``) on the same nodes, if ansible-playbook is
   installed (``pip install -e '.[bench]'``) and ``--ansible`` is not 0;
2. the bare restart of a reference server (SIGTERM, wait for the exit, start, poll its health
   every 5 ms) on an address of its own, ``--restarts`` times: the server's own restart; once
   on the idle machine, and once while the writer (below) posts to the nodes as it does during
   the rollout, since its load (a TLS handshake per https post) slows any restart on two cores:
   half of those before the rollout (every node on http), half after it (every node on https);
   the server runs on http there, as every node does before its switch;
3. an enable-tls rollout of the whole cluster (max-parallel 1, freeze per node) while a writer
   thread posts entries to every node in turn (http, then https once a node has switched).

The leader is read from /proc before and after the rollout (CPU: utime + stime; context
switches, voluntary + involuntary, summed over its threads and sampled while it runs, since a
thread that ends takes its counts with it: ``bench.common.Switches``; a figure of how often the
leader woke that the machine's load moves little), and after it (RSS, open files); the end of
the rollout is read from the leader's log, so that finding it out costs the leader nothing.
Figures per run, then over the runs: median and spread (min–max).

Overhead per node = (rollout wall time − Σ managed-server restart) / N, the restart being what
each agent's transaction recorded (``restart_seconds``). Freeze − bare restart = each node's
write freeze window (schema) minus the median bare restart under the writer's load (the idle
one is printed too). After the rollout, on the idle machine, the bare restart again on http
and on https with a switched node's files (https alone, its certificate, client CA and
password verifier: the config a node runs after its switch), one of each in turn, ``--restarts``
times, and freeze − each: a node's freeze ends with the server on https, so the https figure is
the server's own restart as it runs then (in session 70's runs its start-up cost about 2 ms of
CPU more: the TLS context and its certificate; the ~40 ms by which the managed restart
outlasts the bare one is the other nodes' work on the same two cores, see
``--restart-cpu``); freeze − own restart = each node's
freeze window minus the restart its agent recorded inside it (what tlsroll itself adds: the
freeze call, the config write, the verify and the unfreeze), which keeps the restart's own
spread under load (one node's restart taking twice the median) out of tlsroll's part.

The daemons run from the tree's modules compiled once before the runs (``cache_bytecode``), as
from an installed package, whose modules pip compiles at install (``bench.schema_show`` does the
same). With ``PYTHONDONTWRITEBYTECODE`` set, as in the development shell, every daemon compiled
tlsroll's own modules again at each start and at each import made later: the certificate code
and the bootstrap service that the rollout's first node imports between its planning Check and
its switch (about 20-30 ms of the time before the first switch, which no installed agent
spends), and the reference server's modules at each of its restarts. ``--no-bytecode-cache``
measures that way instead.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime as dt
import itertools
import json
import shutil
import signal
import sqlite3
import ssl
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import ansible_baseline
from bench.common import (
    NO_DEBUG,
    CpuByKind,
    Fsyncs,
    Reading,
    Switches,
    address,
    crypto_workers,
    enable_tls_request,
    fine_cpu_seconds,
    get_schema,
    log_says_ended,
    median,
    restart_windows,
    rss_mib,
    seconds,
    summary,
    task_switches,
    wait_for,
)
from bench.profile import Perf, Profile, Yappi, yappi_env
from tests.cluster import Agent, Cluster
from tests.nodeside import Node
from tests.refserver_helper import RefServer, http_request
from tlsroll.tls import client_context
from tlsroll.v1 import admin_pb2_grpc, schema_pb2, types_pb2

IDLE_SECONDS = 2.0  # the leader's idle context switches per second, read over this

START_TIMEOUT = 60.0


@dataclass
class Writes:
    """What the writer thread saw: accepted, refused while frozen (503), no answer on either
    scheme (the server restarting), any other answer."""

    ok: int = 0
    frozen: int = 0
    no_answer: int = 0
    failed: int = 0
    https: set[str] = field(default_factory=set)


def writer(nodes: Sequence[Node], ca: ssl.SSLContext, stop: threading.Event, w: Writes) -> None:
    """Post one entry to each node in turn (about 50 a second in all) until ``stop``."""
    for n in itertools.cycle(nodes):
        if stop.is_set():
            return
        body = {"bench": "write", "node": n.name}
        for scheme in ("https", "http") if n.name in w.https else ("http", "https"):
            url = n.https_url("entries") if scheme == "https" else n.http_url("entries")
            try:
                r = http_request("POST", url, body, context=ca, timeout=5)
            except OSError:
                continue
            if scheme == "https":
                w.https.add(n.name)
            if r.status == 201:
                w.ok += 1
            elif r.status == 503:
                w.frozen += 1
            else:
                w.failed += 1
            break
        else:
            w.no_answer += 1
        stop.wait(0.02)


def bare_restarts(
    root: Path, addr: str, count: int, tls: Mapping[str, str] | None = None
) -> list[float]:
    """The reference server's own restart, ``count`` times: SIGTERM, exit, start, first 200
    on its health path (polled every 5 ms). With ``tls`` (``switched_files``: a switched
    node's certificate, key, client CA and password verifier) it listens on https alone, as
    a node does after its enable-tls switch, and is polled over https."""
    times: list[float] = []
    # (the [server] keys as RefServer takes them: its typed keywords do not fit these)
    settings: dict[str, Any] = {"listen": ("https",), **tls} if tls is not None else {}
    with RefServer(root, addr, **settings) as server:
        context = None
        if tls is not None:
            # The node's certificate names the node's address, not this server's: the chain
            # is still checked against the cluster CA, the name is not.
            context = client_context(Path(tls["client_ca_file"]).read_bytes())
            context.check_hostname = False
        scheme = "https" if tls else "http"
        server.start()
        for _ in range(count):
            assert server.proc is not None
            t0 = time.perf_counter()
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(15)
            server.spawn()
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"refserver not answering on {scheme}:\n{server.log()}")
                with contextlib.suppress(OSError):
                    answer = server.request(
                        "GET", "health", scheme=scheme, context=context, timeout=1
                    )
                    if answer.status == 200:
                        break
                if server.proc.poll() is not None:
                    raise RuntimeError(f"refserver exited on restart:\n{server.log()}")
                time.sleep(0.005)
            times.append(time.perf_counter() - t0)
    return times


TLS_FILES = ("cert_file", "key_file", "client_ca_file", "auth_verifier_file")


def switched_files(node: Node) -> dict[str, str]:
    """The files a switched node's server config names (``TLS_FILES``; the agent wrote that
    config at the switch): for a bare restart with the node's config after the switch."""
    server = tomllib.loads(node.server.config_path.read_text())["server"]
    return {key: str(server[key]) for key in TLS_FILES if key in server}


def bare_restarts_both(
    root: Path, addr: str, count: int, tls: Mapping[str, str]
) -> tuple[list[float], list[float]]:
    """``bare_restarts`` on http (the config before the switch) and on https with ``tls``
    (a node's config after it) in turn, one restart of each at a time, so that both meet the
    same load: the http ones, the https ones."""
    http: list[float] = []
    https: list[float] = []
    for i in range(count):
        for scheme in ("http", "https") if i % 2 == 0 else ("https", "http"):
            if scheme == "https":
                https += bare_restarts(root / "https", addr, 1, tls)
            else:
                http += bare_restarts(root / "http", addr, 1)
    return http, https


def restarts_while_writing(
    root: Path, nodes: Sequence[Node], ca: ssl.SSLContext, count: int
) -> list[float]:
    """``bare_restarts`` while the writer posts to ``nodes`` (as during the rollout)."""
    writes, stop = Writes(), threading.Event()
    thread = threading.Thread(target=writer, args=(nodes, ca, stop, writes), daemon=True)
    thread.start()
    try:
        return bare_restarts(root, address(1), count)
    finally:
        stop.set()
        thread.join(10)


def start_nodes(cluster: Cluster, nodes: Sequence[Node]) -> None:
    """Start the nodes (server + agent) side by side; each enrolled and online."""
    for n in nodes:
        n.server.spawn()
    for n in nodes:
        n.server.wait_ready(START_TIMEOUT)
    agents: list[Agent] = []
    for n in nodes:
        config = {"server": {"driver": "reference", "config_file": n.server.config_path}}
        n.agent = cluster.add_agent(n.name, n.address, extra_config=config, start=False)
        agents.append(n.agent)
    for a in agents:
        a.spawn(NO_DEBUG)
    for a in agents:
        a.wait_ready(START_TIMEOUT)
    cluster.wait_for_nodes_online([n.name for n in nodes], timeout=START_TIMEOUT)


@dataclass
class Run:
    nodes: int
    wall: float
    restarts: list[float]
    freezes: list[float]
    freeze_own: list[float]  # each node's freeze window less its own restart: tlsroll's part
    bare: list[float]  # the reference server's restart on an idle machine
    bare_loaded: list[float]  # the same while the writer posts to the nodes
    agent_rss: list[float]
    agent_rss_after: list[float]
    # The agents' crypto workers alive when ``agent_rss_after`` was read (each one's RSS; one
    # per agent at most, gone after ``cryptoworker.IDLE_SECONDS`` idle), and of how many agents.
    worker_rss_after: list[float]
    agents_after: int
    cpu: float
    after: Reading
    writes: Writes
    state: str
    ansible: ansible_baseline.Result | None
    fsyncs: int | None = None  # the leader's, during the rollout (--fsyncs)
    switches: int = 0  # the leader's context switches during the rollout, all its threads
    loop_switches: int = 0  # of them, its main thread's (the event loop)
    switches_by_name: dict[str, tuple[int, int]] = field(default_factory=dict)
    cpu_by_name: dict[str, float] = field(default_factory=dict)  # its CPU (s) by thread name
    # The leader's context switches and CPU (fine: schedstat) over the StartRollout call alone
    # (its planning: the agents asked, their way in proved, the first channels opened), and
    # its context switches per second while idle just before it (heartbeats, the engine's
    # tick, keepalive PINGs), over ``idle_seconds``: what a slower rollout adds by lasting
    # longer, which ``net_switches`` takes out.
    start_switches: int = 0
    start_cpu: float = 0.0
    idle_rate: float = 0.0
    window: float = 0.0  # seconds the rollout's switches were counted over
    # After the rollout (idle, no writer), in turn: the bare restart on http (the config
    # before the switch) and on https with a switched node's files (its config after it).
    bare_http_after: list[float] = field(default_factory=list)
    bare_https: list[float] = field(default_factory=list)

    @property
    def net_switches(self) -> float:
        """The rollout's context switches less the idle rate over its window."""
        return self.switches - self.idle_rate * self.window

    # CPU seconds by process kind per restart window (--restart-cpu): "managed" (each node's
    # restart in its switch), "bare" (idle machine), "bare, writer" (while the writer posts).
    restart_cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    gaps: list[float] = field(default_factory=list)  # a node's confirm end → the next's switch
    parts: dict[str, float] = field(default_factory=dict)  # overhead per node, by where it went
    steps: dict[str, list[float]] = field(default_factory=dict)  # a switch, step by step
    phases: dict[str, list[float]] = field(default_factory=dict)  # finer, from the logs

    @property
    def overhead(self) -> float:
        return (self.wall - sum(self.restarts)) / self.nodes

    @property
    def freeze_excess(self) -> list[float]:
        """Each node's freeze window less the median bare restart under the same writer load."""
        bare = median(self.bare_loaded)
        return [f - bare for f in self.freezes]

    @property
    def freeze_excess_idle(self) -> list[float]:
        """The same against the bare restart on an idle machine (no writer)."""
        bare = median(self.bare)
        return [f - bare for f in self.freezes]

    def freeze_excess_after(self, scheme: str) -> list[float]:
        """Each node's freeze window less the median bare restart after the rollout on
        ``scheme`` (http: the config before the switch; https: a node's after it)."""
        bare = median(self.bare_https if scheme == "https" else self.bare_http_after)
        return [f - bare for f in self.freezes]


def one_run(
    root: Path,
    n: int,
    *,
    ansible: bool,
    restarts: int,
    fsyncs: bool = False,
    profile: Path | None = None,
    prepare_ahead: int | None = None,
    restart_cpu: bool = False,
    yappi: Path | None = None,
) -> Run:
    cluster = Cluster(
        root / "cluster", address(0), heartbeat_interval=5, agent_heartbeat_interval=5
    )
    nodes = [Node(cluster, f"n{i:03d}", address(i + 2), root / f"n{i:03d}") for i in range(n)]
    try:
        cluster.init()
        if prepare_ahead is not None:
            cluster.write_leader_config({"prepare_ahead": prepare_ahead})
        cluster.start_leader(
            {**NO_DEBUG, **(yappi_env(yappi / f"leader-{root.name}.pstat") if yappi else {})}
        )
        start_nodes(cluster, nodes)
        baseline = ansible_baseline.run(nodes, root / "ansible") if ansible else None
        sampler = CpuByKind() if restart_cpu else None
        if sampler is not None:
            sampler.__enter__()
        bare = bare_restarts(root / "bare", address(1), restarts)
        ca = client_context(cluster.ca_pem)
        # The same restart while the writer posts to the nodes, as it does during the rollout:
        # its load (on https a TLS handshake per post, on the same two cores) slows any restart,
        # so this, not the idle one, is what a node's freeze compares with. Half now, with
        # every node on http, half after the rollout, with every node on https.
        bare_loaded = restarts_while_writing(root / "bare-before", nodes, ca, (restarts + 1) // 2)
        agent_rss = [rss_mib(node.agent.pid) for node in nodes if node.agent is not None]
        writes, stop = Writes(), threading.Event()
        thread = threading.Thread(target=writer, args=(nodes, ca, stop, writes), daemon=True)
        thread.start()
        pid = cluster.leader.pid
        idle0, idle_t0 = sum(map(sum, task_switches(pid).values())), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle1, idle_t1 = sum(map(sum, task_switches(pid).values())), time.monotonic()
        idle_rate = (idle1 - idle0) / (idle_t1 - idle_t0)
        before = Reading.of(pid)
        counting = Fsyncs(pid, root / "strace.txt")
        spied = Profile(pid, profile / f"leader-{root.name}.spy", gil=True) if profile else None
        perf = Perf(pid, profile / f"leader-{root.name}.perf") if profile else None
        switches = Switches(pid)
        with (
            switches,
            counting if fsyncs else contextlib.nullcontext(),
            perf if perf is not None else contextlib.nullcontext(),
            spied if spied is not None else contextlib.nullcontext(),
            Yappi(pid) if yappi is not None else contextlib.nullcontext(),
            grpc.insecure_channel(f"unix:{cluster.admin_socket}") as channel,
        ):
            began = time.monotonic()
            began_wall = time.time()
            start0 = sum(map(sum, task_switches(pid).values())), fine_cpu_seconds(pid)
            view = admin_pb2_grpc.AdminStub(channel).StartRollout(enable_tls_request(), timeout=60)
            start1 = sum(map(sum, task_switches(pid).values())), fine_cpu_seconds(pid)
            wait_for(
                lambda: log_says_ended(cluster.leader.log_path, view.id),
                60 + 15 * n,
                f"rollout {view.id}",
                poll=0.05,
            )
            after = Reading.of(pid)
            window = time.monotonic() - began
            ended_wall = time.time()
            # Switched, each with its bootstrap service on 9443: what an agent holds from then on.
            agent_rss_after = [rss_mib(node.agent.pid) for node in nodes if node.agent]
            worker_rss_after = [
                rss_mib(worker)
                for node in nodes
                if node.agent
                for worker in crypto_workers(node.agent.pid)
            ]
            stop.set()
            thread.join(10)
            view = get_schema(channel, view.id)
        bare_loaded += restarts_while_writing(root / "bare-after", nodes, ca, restarts // 2)
        # The server's own restart with the config a node runs after its switch (https alone,
        # its certificate, client CA and password verifier) beside the same on http, in turn.
        http_after, https_after = bare_restarts_both(
            root / "bare-both", address(1), restarts, switched_files(nodes[0])
        )
        by_kind: dict[str, dict[str, float]] = {}
        if sampler is not None:
            sampler.__exit__(None, None, None)
            by_kind = cpu_beside_restarts(sampler, root, nodes, (began_wall, ended_wall))
        if spied is not None and perf is not None:
            print(spied.summary(n), perf.by_dso(), sep="\n", flush=True)
        return Run(
            nodes=n,
            wall=seconds(view),
            restarts=[v.restart_seconds for v in view.nodes],
            freezes=[
                (v.freeze_ended_at.ToDatetime() - v.freeze_started_at.ToDatetime()).total_seconds()
                for v in view.nodes
                if v.HasField("freeze_started_at") and v.HasField("freeze_ended_at")
            ],
            freeze_own=[
                (v.freeze_ended_at.ToDatetime() - v.freeze_started_at.ToDatetime()).total_seconds()
                - v.restart_seconds
                for v in view.nodes
                if v.HasField("freeze_started_at") and v.HasField("freeze_ended_at")
            ],
            bare=bare,
            bare_loaded=bare_loaded,
            agent_rss=agent_rss,
            agent_rss_after=agent_rss_after,
            worker_rss_after=worker_rss_after,
            agents_after=len(agent_rss_after),
            cpu=after.cpu - before.cpu,
            after=after,
            writes=writes,
            state=types_pb2.RolloutState.Name(view.state),
            ansible=baseline,
            fsyncs=counting.count,
            switches=switches.total,
            loop_switches=switches.main,
            switches_by_name=switches.by_name(),
            cpu_by_name=switches.cpu_by_name(),
            start_switches=start1[0] - start0[0],
            start_cpu=start1[1] - start0[1],
            idle_rate=idle_rate,
            window=window,
            restart_cpu=by_kind,
            bare_http_after=http_after,
            bare_https=https_after,
            gaps=switch_gaps(view),
            parts=overhead_parts(view),
            steps=switch_steps(view, nodes),
            phases=switch_phases(view, nodes, cluster.leader.log_path),
        )
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.close()
        cluster.close()


def cpu_beside_restarts(
    sampler: CpuByKind, root: Path, nodes: Sequence[Node], rollout: tuple[float, float]
) -> dict[str, dict[str, float]]:
    """CPU seconds by process kind in a mean restart window (``--restart-cpu``), and the
    number of windows (``count``): each node's managed restart inside the rollout (wall-clock
    ``rollout``: from its first server's ``server.stopping`` to the agent's server's
    ``server.started``; the Ansible playbook's restart of the same server, earlier, is not
    one), and the bare restarts, idle and while the writer posts. Windows the sampler did not
    cover are left out. In a managed restart the restarting node's own processes (its agent,
    its crypto worker, its old and new server) count apart, as "(this node)": what the agent
    itself spends beside its restart, against what the other nodes' agents, crypto workers and
    servers (the next node's preparation, the writer's posts) take from the same two cores."""
    groups: dict[str, list[tuple[float, float, frozenset[int]]]] = {
        "managed": [
            (start, end, own_pids(n))
            for n in nodes
            if n.agent is not None
            for start, end in restart_windows(n.server.log_path, n.agent.data_dir / "refserver.log")
            if rollout[0] <= start and end <= rollout[1]
        ],
        "bare": [(*w, frozenset()) for w in restart_windows(root / "bare" / "refserver.log")],
        "bare, writer": [
            (*w, frozenset())
            for d in ("bare-before", "bare-after")
            for w in restart_windows(root / d / "refserver.log")
        ],
    }
    found: dict[str, dict[str, float]] = {}
    for label, all_windows in groups.items():
        windows = [w for w in all_windows if sampler.covers(w[0], w[1])]
        total: dict[str, float] = {"window": 0.0}
        for start, end, mine in windows:
            total["window"] += end - start
            for kind, used in sampler.in_window(start, end, mine).items():
                total[kind] = total.get(kind, 0.0) + used
        if windows:
            found[label] = {k: v / len(windows) for k, v in total.items()}
            found[label]["count"] = len(windows)
    return found


def own_pids(node: Node) -> frozenset[int]:
    """The pids of ``node``'s processes the benchmark started: its agent and the reference
    server it started before the agent took it over (``CpuByKind.in_window`` counts their
    children with them)."""
    pids = {node.agent.pid} if node.agent is not None and node.agent.proc is not None else set()
    if node.server.proc is not None:
        pids.add(node.server.proc.pid)
    return frozenset(pids)


def switch_gaps(view: schema_pb2.RolloutView) -> list[float]:
    """Seconds from each node's confirm end to the next node's switch start (in the rollout's
    order): what the leader spends between two switches (preflight and stage of the next node,
    unless ``prepare_ahead`` did them meanwhile)."""
    times = [
        {st.step: (st.started_at.ToDatetime(), st.ended_at.ToDatetime()) for st in n.steps}
        for n in view.nodes
    ]
    return [
        (b["switch"][0] - a["confirm"][1]).total_seconds()
        for a, b in itertools.pairwise(times)
        if "confirm" in a and "switch" in b
    ]


def overhead_parts(view: schema_pb2.RolloutView) -> dict[str, float]:
    """Where the overhead per node went (seconds per node; they add up to the overhead):
    before the first switch (the first node's preflight and stage), each switch less the
    restart its agent recorded (freeze, config write, verify, unfreeze, and the leader hearing
    of it), the confirms, the gaps between a confirm and the next switch, and the end (the last
    confirm to the rollout's end)."""
    nodes = [
        (n, {st.step: (st.started_at.ToDatetime(), st.ended_at.ToDatetime()) for st in n.steps})
        for n in view.nodes
    ]
    nodes = [(n, t) for n, t in nodes if "switch" in t and "confirm" in t]
    if not nodes:
        return {}
    nodes.sort(key=lambda nt: nt[1]["switch"][0])
    count = len(view.nodes)
    first, last = nodes[0][1], nodes[-1][1]
    switch = sum(
        (t["switch"][1] - t["switch"][0]).total_seconds() - n.restart_seconds for n, t in nodes
    )
    confirm = sum((t["confirm"][1] - t["confirm"][0]).total_seconds() for _, t in nodes)
    between = sum(
        (b["switch"][0] - a["confirm"][1]).total_seconds()
        for (_, a), (_, b) in itertools.pairwise(nodes)
    )
    return {
        "start": (first["switch"][0] - view.started_at.ToDatetime()).total_seconds() / count,
        "switch less restart": switch / count,
        "confirm": confirm / count,
        "between": between / count,
        "end": (view.ended_at.ToDatetime() - last["confirm"][1]).total_seconds() / count,
    }


# A switch as its agent journalled it: (name, from event, to event). The journal stamps each
# step's end with the phase reached; "create" is the transaction's first record.
SWITCH_STEPS = (
    ("freeze", "create", "frozen"),
    ("config write", "frozen", "config_written"),
    ("restart", "config_written", "restarted"),
    ("verify", "restarted", "verified"),
    ("unfreeze", "verified", "completed"),
)


def switch_steps(view: schema_pb2.RolloutView, nodes: Sequence[Node]) -> dict[str, list[float]]:
    """Each node's switch, step by step (seconds): the leader's call reaching the agent's
    journal ("leader → agent"), the agent's steps from its journal, and its end reaching the
    leader's record ("agent → leader"). Read after the rollout from the agents' journals (same
    machine, same clock), so the split costs the rollout nothing."""
    split: dict[str, list[float]] = {}
    by_name = {n.name: n for n in nodes}
    for v in view.nodes:
        node = by_name.get(v.name)
        switch = next((st for st in v.steps if st.step == "switch"), None)
        if node is None or node.agent is None or switch is None:
            continue
        with contextlib.closing(
            sqlite3.connect(f"file:{node.journal_path}?mode=ro", uri=True)
        ) as db:
            rows = db.execute(
                "SELECT step, at FROM events WHERE rollout_id = ? AND kind = 'switch' "
                "AND what = 'end' ORDER BY seq",
                (view.id,),
            ).fetchall()
        at = {phase: dt.datetime.fromisoformat(t) for phase, t in rows}
        if not all(p in at for p in ("create", "completed")):
            continue
        started = switch.started_at.ToDatetime(tzinfo=dt.UTC)
        ended = switch.ended_at.ToDatetime(tzinfo=dt.UTC)
        split.setdefault("leader → agent", []).append((at["create"] - started).total_seconds())
        for name, a, b in SWITCH_STEPS:
            if a in at and b in at:
                split.setdefault(name, []).append((at[b] - at[a]).total_seconds())
        split.setdefault("agent → leader", []).append((ended - at["completed"]).total_seconds())
    return split


def _log_times(path: Path, events: Sequence[str], **match: str) -> dict[str, list[float]]:
    """The times (epoch seconds) at which a daemon's JSON log says each of ``events``, in the
    log's order, of the lines whose fields equal ``match``."""
    times: dict[str, list[float]] = {e: [] for e in events}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                entry = json.loads(line)
                if entry["event"] in times and all(entry.get(k) == v for k, v in match.items()):
                    stamp = entry["timestamp"].replace("Z", "+00:00")
                    times[entry["event"]].append(dt.datetime.fromisoformat(stamp).timestamp())
    return times


def _written(start: float, ended: Sequence[tuple[str, float]], name: str) -> float:
    """When the write holding the switch of ``name`` begun at ``start`` ended: the first
    `step.finished` of another node's switch (``ended``: node, time) within 0.1 s after it,
    else ``start`` (the first switch: its record is a write of its own)."""
    after = (t for node, t in ended if node != name and start <= t <= start + 0.1)
    return min(after, default=start)


def _log_fields(path: Path, event: str, **match: str) -> list[tuple[str, float]]:
    """(node, epoch seconds) of each line of a daemon's JSON log saying ``event``, of the lines
    whose fields equal ``match``."""
    found: list[tuple[str, float]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                entry = json.loads(line)
                if entry["event"] == event and all(entry.get(k) == v for k, v in match.items()):
                    stamp = entry["timestamp"].replace("Z", "+00:00")
                    when = dt.datetime.fromisoformat(stamp).timestamp()
                    found.append((str(entry.get("node", "")), when))
    return found


def _within(times: list[float], begin: float, end: float) -> list[float]:
    """The last of ``times`` from ``begin`` to ``end``, if any (as a list of at most one)."""
    return [t for t in times if begin <= t <= end][-1:]


# The switch's finer phases (``switch_phases``): (name, from mark, to mark). The journal's marks
# ("j:") are stamped as each record's write begins, so a record's own commit (its fsync) falls
# in the phase after its mark; "a:" the agent's log, "old:"/"new:" the reference server's logs
# (the server the switch stops and the one it starts), "leader:" the leader's log.
SWITCH_PHASES = (
    ("leader → agent (the call, the agent's check)", "leader:written", "j:create"),
    ("create's record (its commit)", "j:create", "a:txn.started"),
    ("freeze call (the server's drain and its record)", "a:txn.started", "old:writes.frozen"),
    ("freeze answer → frozen record", "old:writes.frozen", "j:frozen"),
    ("frozen record + config rename", "j:frozen", "j:config_written"),
    ("config_written record", "j:config_written", "a:config_written"),
    ("→ the old server stopping", "a:config_written", "old:server.stopping"),
    ("the old server's stop", "old:server.stopping", "old:server.stopped"),
    ("the new server's start", "old:server.stopped", "new:server.started"),
    ("its READY=1 → restarted record", "new:server.started", "j:restarted"),
    ("verify", "j:restarted", "j:verified"),
    ("verified record + unfreeze call", "j:verified", "new:writes.unfrozen"),
    ("unfreeze answer → completed record", "new:writes.unfrozen", "j:completed"),
    ("completed record → the leader's outcome", "j:completed", "leader:switch"),
)


def switch_phases(
    view: schema_pb2.RolloutView, nodes: Sequence[Node], leader_log: Path
) -> dict[str, list[float]]:
    """Each node's switch, phase by phase (seconds; ``SWITCH_PHASES``), from the journals and
    the daemons' logs, read after the rollout (one machine, one clock: it costs the rollout
    nothing). A phase whose marks are missing is left out for that node."""
    split: dict[str, list[float]] = {}
    by_name = {n.name: n for n in nodes}
    # The leader writes a switch's record in the write of the previous switch's outcome and
    # logs that outcome's `step.finished` after the write: the call begins there. The switch's
    # `started_at` is stamped before that write, which the phase "completed record → the
    # leader's outcome" of the previous node holds already (switchgap, session 72: counted
    # twice before). The first switch has no such line: its `started_at` stands.
    ended = _log_fields(leader_log, "step.finished", step="switch")
    for v in view.nodes:
        node = by_name.get(v.name)
        switch = next((st for st in v.steps if st.step == "switch"), None)
        if node is None or node.agent is None or switch is None:
            continue
        start = switch.started_at.ToDatetime(tzinfo=dt.UTC).timestamp()
        marks: dict[str, float] = {
            "leader:start": start,
            "leader:written": _written(start, ended, v.name),
        }
        with contextlib.closing(
            sqlite3.connect(f"file:{node.journal_path}?mode=ro", uri=True)
        ) as db:
            for phase, at in db.execute(
                "SELECT step, at FROM events WHERE rollout_id = ? AND kind = 'switch' "
                "AND what = 'end' ORDER BY seq",
                (view.id,),
            ):
                marks.setdefault(f"j:{phase}", dt.datetime.fromisoformat(at).timestamp())
        agent = _log_times(node.agent.log_path, ("txn.started",), rollout_id=view.id, kind="switch")
        steps = _log_times(
            node.agent.log_path, ("txn.step",), rollout_id=view.id, phase="config_written"
        )
        old = _log_times(
            node.root / "server" / "refserver.log",
            ("writes.frozen", "server.stopping", "server.stopped"),
        )
        new = _log_times(
            node.journal_path.parent / "refserver.log", ("server.started", "writes.unfrozen")
        )
        leader = _log_times(leader_log, ("step.finished",), node=v.name, step="switch")
        # The reference server's log lines name no rollout: its marks count only inside this
        # switch (from the leader's start of it to its end, a second's slack for the clocks of
        # the log lines), so that another rollout's restarts of the same server are not taken.
        begin = marks["leader:start"]
        end = (
            switch.ended_at.ToDatetime(tzinfo=dt.UTC).timestamp() + 1.0
            if switch.HasField("ended_at")
            else float("inf")
        )

        found = {
            "a:txn.started": agent["txn.started"][:1],
            "a:config_written": steps["txn.step"][:1],
            "leader:switch": leader["step.finished"][-1:],
            **{f"old:{k}": _within(t, begin, end) for k, t in old.items()},
            **{f"new:{k}": _within(t, begin, end) for k, t in new.items()},
        }
        marks |= {k: t[0] for k, t in found.items() if t}
        for name, a, b in SWITCH_PHASES:
            if a in marks and b in marks:
                split.setdefault(name, []).append(marks[b] - marks[a])
    return split


def report(runs: Sequence[Run]) -> None:
    ms = 1000.0
    n = runs[0].nodes
    print(f"rollout: enable-tls on {n} real nodes, max-parallel 1, freeze per node")
    print(f"  outcome:                  {', '.join(r.state for r in runs)}")
    print(f"  rollout wall:             {summary([r.wall for r in runs], 's', digits=2)}")
    print(
        "  managed-server restart:   "
        f"{summary([median(r.restarts) for r in runs], 'ms', ms, 0)} (agent-recorded, median)"
    )
    print(f"  overhead per node:        {summary([r.overhead for r in runs], 'ms', ms, 0)}")
    parts = [r.parts for r in runs if r.parts]
    if parts:
        names = list(parts[0])
        split = ", ".join(f"{k} {median([p[k] for p in parts]) * ms:.0f}" for k in names)
        print(f"    of which (ms per node, median run): {split}")
    steps = [r.steps for r in runs if r.steps]
    if steps:
        split = ", ".join(
            f"{k} {median([median(s[k]) for s in steps if k in s]) * ms:.0f}" for k in steps[0]
        )
        print(f"    a switch, step by step (ms, median node): {split}")
    phases = [r.phases for r in runs if r.phases]
    if phases:
        print("    a switch, phase by phase (ms; per run the median node, then median (min–max)):")
        for name, _a, _b in SWITCH_PHASES:
            per_run = [median(p[name]) for p in phases if p.get(name)]
            if per_run:
                print(f"      {name:62s} {summary(per_run, 'ms', ms, 1)}")
    print(
        "  between two switches:     "
        f"{summary([median(r.gaps) for r in runs], 'ms', ms, 0)} (median; confirm end → next "
        "switch start)"
    )
    print(
        f"  bare refserver restart:   {summary([median(r.bare_loaded) for r in runs], 'ms', ms, 0)}"
        " (with the writer posting, as during the rollout); "
        f"idle {summary([median(r.bare) for r in runs], 'ms', ms, 0)}"
    )
    print(
        "  freeze window:            "
        f"{summary([median(r.freezes) for r in runs], 'ms', ms, 0)} (median node)"
    )
    print(
        "  freeze − bare restart:    "
        f"{summary([median(r.freeze_excess) for r in runs], 'ms', ms, 0)} (median node); "
        f"worst node {max(max(r.freeze_excess, default=0) for r in runs) * ms:.0f} ms "
        "(the bare restart with the writer)"
    )
    print(
        "  freeze − idle restart:    "
        f"{summary([median(r.freeze_excess_idle) for r in runs], 'ms', ms, 0)} (median node; "
        "against the bare restart with no writer)"
    )
    if all(r.bare_https for r in runs):
        print(
            "  bare restart after, in turn: "
            f"http {summary([median(r.bare_http_after) for r in runs], 'ms', ms, 0)}, "
            f"https {summary([median(r.bare_https) for r in runs], 'ms', ms, 0)} (idle, after "
            "the rollout; https: a switched node's config, its certificate, client CA and "
            "verifier)"
        )
        for scheme, what in (("http", "http, as before it"), ("https", "https, as after it")):
            excess = [median(r.freeze_excess_after(scheme)) for r in runs]
            print(
                f"  freeze − bare {scheme + ' restart:':15s}{summary(excess, 'ms', ms, 0)} "
                f"(median node; against that bare restart after the rollout: {what})"
            )
    print(
        "  freeze − own restart:     "
        f"{summary([median(r.freeze_own) for r in runs], 'ms', ms, 0)} (median node); "
        f"worst node {max(max(r.freeze_own, default=0) for r in runs) * ms:.0f} ms "
        "(what tlsroll adds to a node's freeze: freeze, config write, verify, unfreeze)"
    )
    print(
        "  agent idle RSS:           "
        f"{summary([median(r.agent_rss) for r in runs], 'MiB')} (median agent, before the rollout)"
    )
    print(
        "  agent RSS after:          "
        f"{summary([median(r.agent_rss_after) for r in runs], 'MiB')} (median agent, switched; "
        "its bootstrap service runs; the agent's own, its crypto worker apart)"
    )
    alive = sum(len(r.worker_rss_after) for r in runs)
    print(
        "  crypto worker RSS after:  "
        + (
            f"{summary([median(r.worker_rss_after) for r in runs if r.worker_rss_after], 'MiB')} "
            f"(median worker; alive for {alive} of {sum(r.agents_after for r in runs)} agents "
            "then, each gone after a minute without work)"
            if alive
            else "none alive when the agents were read"
        )
    )
    print(f"  leader CPU per node:      {summary([r.cpu / r.nodes for r in runs], 'ms', ms, 1)}")
    print(
        "  leader ctx switches/node: "
        f"{summary([r.switches / r.nodes for r in runs], '', digits=0)} (all its threads, "
        "voluntary + involuntary, from /proc: how often it woke; the event loop's "
        f"{summary([r.loop_switches / r.nodes for r in runs], '', digits=0)}; the rest its "
        "worker threads and gRPC's)"
    )
    print(f"  leader RSS after:         {summary([r.after.rss for r in runs], 'MiB')}")
    print(f"  leader open files after:  {summary([r.after.files for r in runs], 'fds', digits=0)}")
    for label in ("managed", "bare, writer", "bare"):
        readings = [r.restart_cpu[label] for r in runs if label in r.restart_cpu]
        if not readings:
            continue
        kinds = sorted({k for r in readings for k in r} - {"window", "count"})
        split = ", ".join(
            f"{k} {median([r.get(k, 0.0) for r in readings]) * ms:.0f}" for k in kinds
        )
        window = median([r["window"] for r in readings]) * ms
        count = sum(int(r["count"]) for r in readings)
        print(
            f"  CPU in a restart ({label}): window {window:.0f} ms ({count} restarts); ms by "
            f"process (median run, mean restart; clock ticks, ±1 sample at each end; bench: "
            f"its writer and poll, not the sampler): {split}"
        )
    if any(r.fsyncs is not None for r in runs):
        counted = [r.fsyncs / r.nodes for r in runs if r.fsyncs is not None]
        print(
            f"  leader fsyncs per node:   {summary(counted, '', digits=1)} "
            "(strace: CPU not comparable)"
        )
    writes = [r.writes for r in runs]
    print(
        "  writes during rollout:    "
        f"{sum(w.ok for w in writes)} accepted, {sum(w.frozen for w in writes)} refused while "
        f"frozen (503), {sum(w.no_answer for w in writes)} unanswered (restarting), "
        f"{sum(w.failed for w in writes)} other answers"
    )
    with_ansible = [r for r in runs if r.ansible is not None and r.ansible.ok]
    if with_ansible:
        per_node = [r.ansible.seconds / r.nodes for r in with_ansible if r.ansible]
        print(f"  ansible playbook per node: {summary(per_node, 'ms', ms, 0)} (serial 1, local)")
        ratios = [r.overhead / (r.ansible.seconds / r.nodes) for r in with_ansible if r.ansible]
        print(f"  tlsroll overhead / ansible per node: {summary(ratios, '×', digits=3)}")
    else:
        why = next((r.ansible.problem for r in runs if r.ansible), "not run (--ansible 0)")
        print(f"  ansible baseline:         {why}")


PACKAGES = ("leader", "nodeagent", "refserver", "tlsroll", "workstation")
"""What the daemons the bench starts import from the tree (``cache_bytecode``)."""


def cache_bytecode(tree: Path, packages: Sequence[str] = PACKAGES) -> bool:
    """Compile ``packages`` of ``tree`` to bytecode where Python looks for it
    (``__pycache__``, or under ``PYTHONPYCACHEPREFIX``), as pip does at install: the daemons
    then load it, even with ``PYTHONDONTWRITEBYTECODE`` set (which only stops them writing
    it). A module whose source changes later is compiled again as usual (its bytecode records
    the source's time and size). True if every module compiled."""
    return all(compileall.compile_dir(tree / name, quiet=1, force=False) for name in packages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=5, help="bare restarts per run")
    parser.add_argument("--ansible", type=int, default=1, help="0: leave out the baseline")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument(
        "--fsyncs",
        action="store_true",
        help="count the leader's fsyncs during the rollout (strace: its CPU figures then "
        "compare with no other run)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="profile the leader during each rollout (py-spy: Python frames holding the GIL; "
        "perf: CPU by library), keep the stacks in this directory and print where the CPU "
        "went (the CPU figures then compare with no other run)",
    )
    parser.add_argument(
        "--prepare-ahead",
        type=int,
        help="the leader's prepare_ahead (default: the product's). 0: no node is preflighted "
        "and staged while another switches; on one machine, that staging shares the two cores "
        "with the restart of the node switching, which separate machines would not",
    )
    parser.add_argument(
        "--restart-cpu",
        action="store_true",
        help="sample the bench's processes' CPU (/proc, every 20 ms) and print what each kind "
        "used inside the restarts: the managed ones in the switches, the bare ones (what runs "
        "beside a restart on the same cores; the sampler takes about a tenth of a core, so "
        "the run's other figures compare with no other run)",
    )
    parser.add_argument(
        "--yappi",
        type=Path,
        help="run the leader with yappi (CPU clock, every thread; pip install yappi) through "
        "each rollout and keep its stats in this directory (leader-RUN.pstat; read them with "
        "pstats: CPU time per Python function; the CPU figures then compare with no other run)",
    )
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="do not compile the tree's modules before the runs: with PYTHONDONTWRITEBYTECODE "
        "set, each daemon compiles them again at each start and late import",
    )
    ns = parser.parse_args(argv)
    for where in (ns.profile, ns.yappi):
        if where is not None:
            where.mkdir(parents=True, exist_ok=True)
    if not ns.no_bytecode_cache and not cache_bytecode(Path(__file__).resolve().parents[1]):
        print("some of the tree's modules did not compile", flush=True)
    cached = "compiled at each import" if ns.no_bytecode_cache else "compiled before the runs"
    print(f"daemons' bytecode: {cached}", flush=True)
    runs = []
    for i in range(ns.runs):
        root = Path(tempfile.mkdtemp(prefix="tlsroll-bench-"))
        try:
            run = one_run(
                root,
                ns.nodes,
                ansible=bool(ns.ansible),
                restarts=ns.restarts,
                fsyncs=ns.fsyncs,
                profile=ns.profile,
                prepare_ahead=ns.prepare_ahead,
                restart_cpu=ns.restart_cpu,
                yappi=ns.yappi,
            )
        finally:
            if not ns.keep:
                shutil.rmtree(root, ignore_errors=True)
        runs.append(run)
        ans = f", ansible {run.ansible.seconds:.2f} s" if run.ansible and run.ansible.ok else ""
        print(
            f"run {i + 1}/{ns.runs}: {run.state}, wall {run.wall:.2f} s, overhead/node "
            f"{run.overhead * 1000:.0f} ms, leader CPU/node {run.cpu / run.nodes * 1000:.1f} ms, "
            f"start: ctx {run.start_switches} cpu {run.start_cpu * 1000:.1f} ms; idle "
            f"{run.idle_rate:.0f} ctx/s; net ctx/node {run.net_switches / run.nodes:.0f}; "
            f"ctx switches/node {run.switches / run.nodes:.0f} (by thread name, threads: "
            + ", ".join(
                f"{k} {v / run.nodes:.0f} ({t})" for k, (t, v) in run.switches_by_name.items()
            )
            + "); CPU ms/node by thread name: "
            + ", ".join(f"{k} {v / run.nodes * 1000:.1f}" for k, v in run.cpu_by_name.items())
            + ans,
            flush=True,
        )
    report(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
