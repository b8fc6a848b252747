"""What one switch costs its node, in counts that do not depend on the machine's load.

One real node (agent + reference server, a real leader for enrolment), switched enable-tls
``--switches`` times (each switch is rolled back between two, untraced). During each switch,
begun and followed with one WatchTransaction as the leader does, ``strace -f -c`` counts the
system calls of the agent (and the server it restarts: a child of the agent) and of the server
it freezes: fsync + fdatasync (durable writes), renames (atomic file replacements: a new inode
each), and every system call. The agent's journal gives the step-by-step times.

    python -m bench.switch_calls --switches 5

The new server's start-up is part of the agent's count (it is the agent's child), the same
for every release: compare counts between releases, not with zero.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import shutil
import signal
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import NO_DEBUG
from leader.agent_client import WATCHED_PHASES
from tests.nodeside import RPC_TIMEOUT, Node, cluster_of
from tlsroll.enums import Change, TxnKind
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE, TXN_KIND

DURABLE = ("fsync", "fdatasync")
RENAMES = ("rename", "renameat", "renameat2")


def context_switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of the process's threads so far, and the
    nanoseconds they ran on a CPU (schedstat; a thread that has ended is no longer counted:
    read it around work that keeps its threads)."""
    switches = ran = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
            ran += int((task / "schedstat").read_text().split()[0])
    return switches, ran


class Strace:
    """``strace -f -c`` of some processes while the ``with`` block runs: calls by name."""

    def __init__(self, pids: list[int], out: Path) -> None:
        self.pids, self.out = pids, out
        self.calls: dict[str, int] = {}
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Strace:
        for i, pid in enumerate(self.pids):
            proc = subprocess.Popen(
                ["strace", "-f", "-c", "-o", f"{self.out}.{i}", "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            assert proc.stderr is not None
            proc.stderr.readline()  # attached
            self._procs.append(proc)
        return self

    def __exit__(self, *_exc: object) -> None:
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)
        for i, proc in enumerate(self._procs):
            proc.wait(30)
            text = Path(f"{self.out}.{i}").read_text()
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    self.calls[parts[-1]] = self.calls.get(parts[-1], 0) + int(parts[3])


@dataclass
class Switched:
    calls: dict[str, int]  # system calls by name (under strace), else empty
    switches: int  # the agent's context switches (meaningless under strace)
    cpu_ms: float  # the agent's CPU time (its threads; the new server is another process)
    steps: dict[str, float]  # ms from the journal: the phase -> since the phase before
    added: float  # ms: the freeze window less the server's restart (what the agent adds to it)
    messages: int  # the states the stream brought


def switch(node: Node, rid: str, trace: Path | None) -> Switched:
    """Stage and switch ``node`` (enable-tls, begun and followed with one WatchTransaction as
    the leader does; under strace if ``trace`` names its output), then roll it back."""
    node.stage(rid)
    agent, server = node.agent, node.server_pid()
    assert agent is not None and server is not None
    request = agent_pb2.GetTransactionRequest(
        rollout_id=rid,
        kind=TXN_KIND.wire(TxnKind.SWITCH),
        phases=WATCHED_PHASES,  # the states the leader asks for
        switch=agent_pb2.SwitchRequest(
            command=node.command(rid), change=CHANGE.wire(Change.ENABLE_TLS)
        ),
    )
    calls: dict[str, int] = {}
    with node.stub() as stub:
        stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT)  # warm
        before, ran = context_switches(agent.pid)
        with Strace([agent.pid, server], trace) if trace else contextlib.nullcontext() as traced:
            states = list(stub.WatchTransaction(request, timeout=RPC_TIMEOUT))
        after, ran_after = context_switches(agent.pid)
    if isinstance(traced, Strace):
        calls = traced.calls
    last = states[-1] if states else None
    assert last is not None and last.outcome, last
    ends = node.journal_query(
        "SELECT step, at FROM events WHERE rollout_id = ? AND kind = 'switch'"
        " AND what = 'end' ORDER BY seq",
        rid,
    )
    at = {r["step"]: dt.datetime.fromisoformat(r["at"]) for r in ends}
    order = ["create", "frozen", "config_written", "restarted", "verified", "completed"]
    steps = {
        b: (at[b] - at[a]).total_seconds() * 1000
        for a, b in itertools.pairwise(order)
        if a in at and b in at
    }
    (row,) = node.journal_query(
        "SELECT freeze_started_at, freeze_ended_at, restart_seconds FROM txns"
        " WHERE rollout_id = ? AND kind = 'switch'",
        rid,
    )
    window = dt.datetime.fromisoformat(row["freeze_ended_at"]) - dt.datetime.fromisoformat(
        row["freeze_started_at"]
    )
    added = (window.total_seconds() - row["restart_seconds"]) * 1000
    node.rollback(rid)
    node.wait_txn(rid, "rollback")
    return Switched(calls, after - before, (ran_after - ran) / 1e6, steps, added, len(states))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=5)
    ns = parser.parse_args(argv)
    if shutil.which("strace") is None:
        print("strace not found")
        return 1
    root = Path(tempfile.mkdtemp(prefix="tlsroll-switch-calls-"))
    rows: list[dict[str, float]] = []
    first: Switched | None = None
    steps: dict[str, list[float]] = {}
    try:
        with cluster_of(root, 1, env=NO_DEBUG) as (_cluster, (node,)):
            for i in range(ns.switches):
                # One switch without strace (the agent's context switches, which ptrace's stops
                # would count too, and the step times), one under it (its system calls). The
                # first is the agent's first switch: what it makes once (its https check's
                # context, OpenSSL's first handshake) is in it, as in a rollout, where each
                # agent switches once.
                plain = switch(node, f"sp{i}", None)
                traced = switch(node, f"sc{i}", root / f"strace-{i}")
                if i == 0:
                    first = plain
                calls = traced.calls
                rows.append(
                    {
                        "durable": sum(calls.get(c, 0) for c in DURABLE),
                        "renames": sum(calls.get(c, 0) for c in RENAMES),
                        "all": sum(calls.values()),
                        "switches": plain.switches,
                        "cpu": plain.cpu_ms,
                        "added": plain.added,
                        "messages": plain.messages,
                    }
                )
                for step, ms in plain.steps.items():
                    steps.setdefault(step, []).append(ms)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {
        k: statistics.median(r[k] for r in rows)
        for k in ("durable", "renames", "all", "switches", "cpu", "added", "messages")
    }
    print(f"one switch, agent + its server ({len(rows)} switches each way, median):")
    print(f"  fsync+fdatasync: {med['durable']:.0f}   renames: {med['renames']:.0f}")
    print(f"  system calls in all: {med['all']:.0f} (the new server's start-up included)")
    print(f"  the stream's messages: {med['messages']:.0f} (the states the leader is sent)")
    print(f"  the agent's context switches: {med['switches']:.0f} (its threads, not under strace)")
    print(f"  the agent's CPU: {med['cpu']:.1f} ms (its threads, not under strace)")
    print(
        f"  the freeze window less the server's restart: {med['added']:.1f} ms"
        " (from the journal, not under strace)"
    )
    split = ", ".join(f"→{k} {statistics.median(v):.1f}" for k, v in steps.items())
    print(f"  steps (ms, median, not under strace): {split}")
    assert first is not None
    print(f"  per switch: {[int(r['durable']) for r in rows]} fsync+fdatasync")
    print(
        f"  the agent's first switch: CPU {first.cpu_ms:.1f} ms, {first.switches} context"
        f" switches, verify {first.steps.get('verified', float('nan')):.1f} ms, the freeze"
        f" window less the restart {first.added:.1f} ms (not under strace)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
