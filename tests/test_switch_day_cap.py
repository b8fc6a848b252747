"""Review s64 M3 end to end: on switch day every PC of the practice enrols again at its server,
and the hourly cap of workstation certificates per node (a brake on a stolen agent key) cut
off the 31st PC at one server with "409 sign_failed" and no time to try again, and nothing in
`schema show`. The cap is leader.toml's ``workstation_certs_per_hour`` now (default 100); a PC
over it is answered 429 with Retry-After and told when to try again, and the refusal shows
with the node's bootstrap failures. Real leader, agent and reference server on loopback
addresses, the real CLI. And (review b2 of s64, L4b) what the refusals cost the store, with
the real Leader service and store in this process."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import grpc

from leader.store_health import StoreHealth
from tests.cluster import LEADER_POLL, one_line_error, wait_until
from tests.leader_rig import leader_with_a_node
from tests.nodeside import fill, tmpfs
from tests.test_password_rollout import PW1, World, secret_file
from tlsroll import bootstrap_protocol, pki
from tlsroll.enums import CAP_SOURCE
from tlsroll.v1 import leader_pb2, leader_pb2_grpc


def test_the_pc_over_the_hourly_cap_is_told_when_to_try_again(tmp_path: Path) -> None:
    w = World(tmp_path, nodes=1)
    try:
        w.cluster.init("--node-name", "node1")
        w.cluster.write_leader_config({"workstation_certs_per_hour": 2})
        w.cluster.start_leader()
        node = w.nodes[0]
        node.start()
        w.cluster.wait_for_nodes_online([node.name])
        pw1 = secret_file(tmp_path / "pw1", PW1)
        assert w.run_rollout("--password-file", str(pw1))["state"] == "completed"
        for pc in ("pc1", "pc2"):
            ok = w.test_connection(node.https_url(), pw1, tmp_path / pc)
            assert ok.returncode == 0, ok.stdout + ok.stderr

        # The third PC within the hour: refused (exit 11), with when to try again by this
        # PC's clock, and nothing kept.
        over = w.test_connection(node.https_url(), pw1, tmp_path / "pc3")
        assert over.returncode == 11, over.stdout + over.stderr
        line = one_line_error(over.stderr, "tlsroll")
        assert "has no certificate signed for this PC now" in line, line
        assert "at most 2: workstation_certs_per_hour in leader.toml" in line, line
        assert re.search(r"; try again after \d\d:\d\d$", line), line
        assert not (tmp_path / "pc3" / "client.key").exists()

        # The node answered 429 with Retry-After (the oldest issue counted + 1 h), and said
        # so in its log; the leader kept the refusal with the node's bootstrap failures.
        assert node.agent is not None
        said = [e for e in node.agent.log_events() if e["event"] == "bootstrap.finish_refused"]
        assert [(e["reason"], e["status"]) for e in said] == [("sign_failed", 429)], said
        assert 0 < said[0]["retry_after"] <= 3600, said  # (the first PC's issue + 1 h)

        # (Counted in memory and written by the group commit, within its batch period.)
        def kept() -> bool:
            return any(f["source"] == CAP_SOURCE for f in w.poll()["bootstrap_failures"])

        wait_until(kept, 30, "the refusal kept", interval=LEADER_POLL)
        data = w.schema()
        capped = [f for f in data["bootstrap_failures"] if f["source"] == CAP_SOURCE]
        assert len(capped) == 1, data["bootstrap_failures"]
        assert capped[0]["node"] == "node1" and capped[0]["workstation"] == "ws-pc3", capped
        assert capped[0]["count"] == 1, capped
        shown = w.cli("schema", "show")
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        assert f"{CAP_SOURCE}: PCs refused a certificate" in text, text
        assert "ws-pc3" in text, text
        assert PW1 not in w.cluster.logs_text() + "".join(w.outputs)
    finally:
        w.close()


async def _until(done: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    """Wait on the event loop (the service's writer runs there) until ``done``."""
    for _ in range(int(seconds / 0.05)):
        if done():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds:.0f} s: {what}")


async def test_pcs_refused_over_the_cap_cost_no_write_each_and_a_full_disk_is_the_stores_trouble(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review b2 of s64, L4b: each PC refused over a node's hourly cap was a transaction of its
    own (an fsync per call that a stolen agent key, asking on, could make the leader do), and
    a failure to write it (a full disk) was dropped without the store's health hearing of it.
    Now the refusals are counted in memory and the group commit writes their sum: 20 refusals
    commit nothing until it comes, then once. On a full disk (a real one: the store on a
    small tmpfs, filled) the group commit fails, and the store's health says so, as for the
    heartbeats; once there is room, the refusal counted meanwhile is written too. The real
    Leader service and store in this process, on a real mutual-TLS port."""
    with tmpfs(tmp_path / "fs", "16m") as fs:
        rig = leader_with_a_node(fs, loopback(), loopback())
        health = StoreHealth(lambda: rig.clock[0])
        rig.service.store_health = health
        rig.store.db.on_commit.append(health.works)
        rig.service.workstation_certs_per_hour = 1
        rig.service.batch_seconds = 3600.0  # no group commit while the calls are made
        await rig.server.start()
        filler: Path | None = None
        try:
            async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
                stub = leader_pb2_grpc.LeaderStub(channel)

                async def sign(cn: str) -> grpc.StatusCode:
                    names = bootstrap_protocol.workstation_names(cn)
                    csr = pki.make_csr(pki.generate_key(), names)
                    request = leader_pb2.SignWorkstationRequest(csr_pem=pki.csr_to_pem(csr))
                    try:
                        await stub.SignWorkstationCertificate(request, timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        return exc.code()
                    return grpc.StatusCode.OK

                def capped() -> list[tuple[str, int]]:
                    return [
                        (f.workstation, f.count)
                        for f in rig.service.schema.bootstrap_failures()
                        if f.source == CAP_SOURCE
                    ]

                assert await sign("ws-a") is grpc.StatusCode.OK
                commits = rig.store.db.commits
                for i in range(20):
                    assert await sign(f"ws-b{i}") is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert rig.store.db.commits == commits  # none per refused call
                assert capped() == []
                await rig.service.write_queued()  # the group commit (the leader's, at once)
                assert rig.store.db.commits == commits + 1
                assert capped() == [("ws-b19", 20)]

                filler = fill(fs)
                rig.service.batch_seconds = 0.05
                assert await sign("ws-c") is grpc.StatusCode.RESOURCE_EXHAUSTED
                await _until(lambda: health.trouble is not None, "the store's trouble")
                assert health.trouble is not None and "SQLITE_FULL" in health.trouble[0]
                filler.unlink()
                filler = None
                await _until(lambda: health.trouble is None, "the store writable again")
                await _until(lambda: capped() == [("ws-c", 21)], "the count kept")
        finally:
            if filler is not None:
                filler.unlink()
            await rig.close()
