"""Benchmarks that print figures (``make bench``); nothing here asserts a time.

1. planner: a whole 200-node rollout driven through the pure core (every step succeeds);
   how many ``next_actions`` calls a second the engine could make.
2. CA: node certificates signed a second (CSR check + ECDSA P-256 signature).
3. store: enrolments and heartbeats committed a second to a real SQLite file
   (WAL, synchronous=FULL) — the leader's write path under 200 agents.
4. bootstrap: one password exchange (protocol 2: scrypt + SPAKE2 + key confirmation + sealed
   delivery) in ms on the workstation's side and on the node's, next to protocol 1's
   (scrypt + HMAC; what it cost before, and what one offline guess against it cost), with the
   production scrypt parameters (n = 2**15). No sockets, no certificate signing.
"""

from __future__ import annotations

import datetime as dt
import hmac
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from leader import planner
from leader.rollout_core import STEP_FOR_STATE, Change, NodeEvent, RolloutEvent, Scope, Step
from leader.store import NodeCert, Store
from tlsroll import bootstrap_protocol as proto
from tlsroll import password, pki

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

        def address(i: int) -> str:
            return f"127.0.{i // 250}.{i % 250 + 1}"

        for i in range(nodes):  # a token names one node
            store.add_token(
                f"t{i:05d}",
                "x" * 26,
                ttl=dt.timedelta(hours=1),
                uses=1,
                description="bench",
                now=now,
                actor="bench",
                node_name=f"node{i:03d}",
                addresses=(address(i),),
            )
        cert = NodeCert("sha256:" + "0" * 64, "sha256:" + "1" * 64, "1", now)

        def issue() -> NodeCert:
            return cert

        t0 = time.perf_counter()
        for i in range(nodes):
            store.enrol(
                token_id=f"t{i:05d}",
                secret="x" * 26,
                name=f"node{i:03d}",
                addresses=(address(i),),
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


def _ms(fn: Callable[[], object], n: int) -> float:
    """The median of ``n`` runs of ``fn``, in ms."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_bootstrap(n: int = 15) -> str:
    secret = password.generate_password()
    verifier = password.make_verifier(secret)  # the production parameters
    kdf = proto.KDF.of_verifier(verifier)
    node = proto.NodeSecret(verifier)
    hello = proto.Hello("node-a", "https://192.168.1.5:8443/praxis_live/", b"ca", kdf)
    csr = b"x" * 600  # about a CSR's size
    payload = b"y" * 1800  # about a CA bundle and a certificate

    state: dict[str, object] = {}

    def workstation_start() -> None:
        state["ws"] = proto.WorkstationPAKE(secret, kdf)  # scrypt, then X*

    def node_start() -> None:
        ws = state["ws"]
        assert isinstance(ws, proto.WorkstationPAKE)
        msg_b, shared = node.respond(ws.msg_a)
        t = proto.transcript(hello, "e" * 43, "ws-a", ws.msg_a, msg_b)
        state["node_keys"] = proto.SessionKeys.derive(shared, t)
        state["msg_b"] = msg_b

    def workstation_finish() -> None:
        ws, msg_b = state["ws"], state["msg_b"]
        assert isinstance(ws, proto.WorkstationPAKE) and isinstance(msg_b, bytes)
        t = proto.transcript(hello, "e" * 43, "ws-a", ws.msg_a, msg_b)
        keys = proto.SessionKeys.derive(ws.finish(msg_b), t)
        state["ws_keys"] = keys
        state["confirm"] = keys.confirmation(proto.Side.WORKSTATION)
        state["csr"] = keys.seal(proto.Side.NODE, csr)

    def node_finish() -> None:
        keys = state["node_keys"]
        assert isinstance(keys, proto.SessionKeys)
        assert keys.check_confirmation(proto.Side.WORKSTATION, state["confirm"])
        keys.open(proto.Side.NODE, state["csr"])
        state["answer"] = (
            keys.confirmation(proto.Side.NODE),
            keys.seal(proto.Side.WORKSTATION, payload),
        )

    def workstation_open() -> None:
        keys = state["ws_keys"]
        assert isinstance(keys, proto.SessionKeys)
        answer = state["answer"]
        assert isinstance(answer, tuple)
        confirm, sealed = answer
        assert keys.check_confirmation(proto.Side.NODE, confirm)
        keys.open(proto.Side.WORKSTATION, sealed)

    # Each step works on what the one before left, so the whole chain runs n times.
    runs_ws: list[float] = []
    runs_node: list[float] = []
    for _ in range(n):
        ws_ms = node_ms = 0.0
        for step, side in (
            (workstation_start, "ws"),
            (node_start, "node"),
            (workstation_finish, "ws"),
            (node_finish, "node"),
            (workstation_open, "ws"),
        ):
            t0 = time.perf_counter()
            step()
            spent = (time.perf_counter() - t0) * 1000
            if side == "ws":
                ws_ms += spent
            else:
                node_ms += spent
        runs_ws.append(ws_ms)
        runs_node.append(node_ms)
    scrypt_ms = _ms(lambda: proto.scrypt_hash(secret, kdf), n)
    digest = proto.scrypt_hash(secret, kdf)
    answer = proto.canonical({"node": "node-a", "ca_bundle_pem": "c" * 1200, "nonce": "n" * 43})
    # Protocol 1: the node MACed its answer with a key from the stored hash; the workstation
    # recomputed scrypt and checked the MAC, then sent an HMAC proof.
    v1_node_ms = _ms(
        lambda: hmac.new(hmac.digest(digest, b"mac", "sha256"), answer, "sha256").digest(), n
    )
    ws, nd = statistics.median(runs_ws), statistics.median(runs_node)
    return (
        f"bootstrap, one exchange (median of {n}, scrypt n=2**15): "
        f"workstation {ws:.1f} ms, node {nd:.1f} ms"
        f" | protocol 1 (scrypt + HMAC): workstation {scrypt_ms + 2 * v1_node_ms:.1f} ms, "
        f"node {v1_node_ms:.3f} ms, and one offline guess against it {scrypt_ms:.1f} ms "
        "(protocol 2: no offline guess)"
    )


def main() -> int:
    benches: list[Callable[[], str]] = [bench_planner, bench_ca, bench_store, bench_bootstrap]
    for bench in benches:
        print(bench(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
