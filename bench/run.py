"""Benchmarks that print figures (``make bench``); nothing here asserts a time.

1. planner: a whole 200-node rollout driven through the pure core (every step succeeds);
   how many ``next_actions`` calls a second the engine could make.
2. CA: node certificates signed a second (CSR check + ECDSA P-256 signature).
3. store: enrolments and heartbeats committed a second to a real SQLite file
   (WAL, synchronous=FULL) — the leader's write path under 200 agents.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from leader import planner
from leader.rollout_core import STEP_FOR_STATE, Change, NodeEvent, RolloutEvent, Scope, Step
from leader.store import NodeCert, Store
from tlsroll import pki

RESULT = {
    Step.PREFLIGHT: NodeEvent.PREFLIGHT_PASSED,
    Step.STAGE: NodeEvent.STAGE_DONE,
    Step.SWITCH: NodeEvent.SWITCH_DONE,
    Step.CONFIRM: NodeEvent.CONFIRM_DONE,
}


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s ({n} in {seconds:.2f}s)"


def bench_planner(nodes: int = 200, max_parallel: int = 10) -> str:
    names = {f"node{i:03d}": True for i in range(nodes)}
    rollout, records = planner.plan_rollout(
        rollout_id="bench",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled=names,
        leader="node000",
        epoch=1,
        max_parallel=max_parallel,
    )
    rollout = rollout.with_event(RolloutEvent.START)
    calls = 0
    t0 = time.perf_counter()
    while rollout.state.value not in ("completed", "halted", "aborted"):
        plan = planner.next_actions(rollout, records)
        calls += 1
        rollout, records = planner.apply_plan(rollout, records, plan)
        by_name = {r.name: r for r in records}
        for step in plan.steps:
            rec = by_name[step.node]
            if step.step in RESULT and STEP_FOR_STATE.get(rec.state) is step.step:
                by_name[step.node] = rec.with_event(RESULT[step.step])
        records = tuple(by_name[n] for n in rollout.order)
    elapsed = time.perf_counter() - t0
    return f"planner: {nodes}-node rollout, max-parallel {max_parallel}: {rate(calls, elapsed)}"


def bench_ca(n: int = 300) -> str:
    ca = pki.CertificateAuthority.create()
    key = pki.generate_key()
    names = pki.Names.of("node1", ["192.168.1.5"])
    csr = pki.make_csr(key, names)
    t0 = time.perf_counter()
    for _ in range(n):
        ca.sign_csr(csr, names, server=True)
    return f"CA: server certificates signed: {rate(n, time.perf_counter() - t0)}"


def bench_store(nodes: int = 200, beats: int = 2000) -> str:
    now = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "leader.sqlite3")
        store.add_token(
            "abcdef",
            "x" * 26,
            ttl=dt.timedelta(hours=1),
            uses=nodes,
            description="bench",
            now=now,
            actor="bench",
        )
        cert = NodeCert("sha256:" + "0" * 64, "sha256:" + "1" * 64, "1", now)

        def issue() -> NodeCert:
            return cert

        t0 = time.perf_counter()
        for i in range(nodes):
            store.enrol(
                token_id="abcdef",
                secret="x" * 26,
                name=f"node{i:03d}",
                addresses=(f"127.0.{i // 250}.{i % 250 + 1}",),
                dns_names=(),
                agent_version="bench",
                agent_port=9442,
                key_pin=f"pin{i}",
                issue=issue,
                now=now,
            )
        enrol = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(beats):
            store.heartbeat(f"node{i % nodes:03d}", "bench", now=now)
        beat = time.perf_counter() - t0
        store.close()
    return (
        f"store: enrolments {rate(nodes, enrol)}; heartbeats {rate(beats, beat)} "
        f"(200 agents at a 5 s interval need 40/s)"
    )


def main() -> int:
    benches: list[Callable[[], str]] = [bench_planner, bench_ca, bench_store]
    for bench in benches:
        print(bench(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
