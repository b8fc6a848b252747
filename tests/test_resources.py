"""The leader out of file descriptors (issue 15): "Too many open files" is the leader's own
trouble, never the node's. A real leader whose soft RLIMIT_NOFILE is lowered (``prlimit``) in
the middle of a rollout must defer the step, not record a failed confirm and roll back a healthy
node; once it has descriptors again the rollout completes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader.agent_client import AgentPool
from leader.store import Node as NodeRow
from leader.store import _node
from tests.cluster import LEADER_POLL, AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node
from tlsroll import pki, spiffe
from tlsroll.enums import Change
from tlsroll.errors import TransientError
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE


def lowest_free_fd(pid: int) -> int:
    """The lowest descriptor number ``pid`` does not use: a soft limit of it makes every new
    descriptor fail with EMFILE while the open ones keep working."""
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def no_descriptor_left(pid: int) -> int:
    """A soft limit that leaves ``pid`` no new descriptor even if it closes some it holds now:
    3 while it holds 0, 1 and 2 (a limit of :func:`lowest_free_fd` gave one back whenever the
    agent closed a descriptor below it before the call, and the call went through)."""
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return 3 if {0, 1, 2} <= used else lowest_free_fd(pid)


def deferred_for_files(events: list[dict[str, Any]]) -> bool:
    return any(
        e.get("event") == "step.deferred" and "Too many open files" in str(e.get("reason"))
        for e in events
    )


def test_a_leader_out_of_descriptors_defers_and_never_rolls_back(tmp_path: Path) -> None:
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    node = Node(cluster, "node1", address, tmp_path / "n1")
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        node.start()
        cluster.wait_for_nodes_online(["node1"])
        pw = tmp_path / "pw"
        pw.touch(0o600)
        pw.write_text("resource-test-password\n")
        started = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"
        )
        assert started.returncode == 0, started.stderr
        # The plan dialled the agent: its channel stays open. From now on the leader gets no new
        # descriptor (the confirm's outside check needs a socket).
        pid = cluster.leader.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid), hard))
        try:
            wait_until(
                lambda: (
                    deferred_for_files(cluster.leader.log_events())
                    or "confirm.failed" in cluster.leader.event_names()
                ),
                60,
                "the confirm meeting EMFILE",
            )
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert "confirm.failed" not in cluster.leader.event_names()

        wait_until(
            lambda: cluster.poll_newest_rollout()["state"] in ("completed", "halted"),
            60,
            "the rollout",
            interval=LEADER_POLL,
        )
        r = cluster.newest_rollout()
        assert r["state"] == "completed", r
        assert [n["state"] for n in r["nodes"]] == ["done"]
        assert "confirm.failed" not in cluster.leader.event_names()
        assert node.server.status()["listen"] == ["https"]
        assert node.journal_query("SELECT * FROM txns WHERE kind = 'rollback'") == []
    finally:
        node.close()
        cluster.close()


class RowStore:
    """What ``AgentPool`` reads of the store: the node rows, from the leader's file."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def get_node(self, name: str) -> NodeRow:
        (row,) = [r for r in self.cluster.store_table("nodes") if r["name"] == name]
        return _node(row)  # type: ignore[arg-type]


def test_the_agent_pool_keeps_few_channels_open_and_never_closes_a_busy_one(
    tmp_path: Path,
) -> None:
    """Three real agents, a pool capped at two open channels: the least recently used idle
    channel is closed when a third opens, its client opens a new one when asked again, and a
    channel with a call on it (its agent stopped, the call waiting) is left alone."""
    with AdminTokenCluster(tmp_path / "cluster", next_loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        agents = {f"node{i}": cluster.add_agent(f"node{i}", next_loopback()) for i in (1, 2, 3)}
        cluster.wait_for_nodes_online(list(agents))
        chain, key = cluster.leader_credentials()
        creds = grpc.ssl_channel_credentials(cluster.ca_pem, key, chain)
        domain = spiffe.trust_domain(pki.read_cert(cluster.ca_cert_path))

        async def scenario() -> None:
            pool = AgentPool(RowStore(cluster), creds, domain, max_open=2)  # type: ignore[arg-type]
            try:

                async def ask(name: str, timeout: float = 5) -> str:
                    client = await pool.get(name)
                    reply = await client.get_status(agent_pb2.GetStatusRequest(), timeout)
                    return reply.node_name

                assert [await ask(n) for n in ("node1", "node2")] == ["node1", "node2"]
                assert pool.open_channels() == 2
                assert await ask("node3") == "node3"
                assert pool.open_channels() == 2
                assert not pool.clients["node1"].open  # the least recently used
                assert await ask("node1") == "node1"  # opened again
                assert pool.open_channels() == 2 and not pool.clients["node2"].open

                # node1's and node2's agents stopped: a call on each waits; opening node3's
                # channel must not close theirs under the calls (three open for a moment).
                for name in ("node1", "node2"):
                    agents[name].send_signal(signal.SIGSTOP)
                try:
                    waiting = [asyncio.create_task(ask(n, timeout=3)) for n in ("node1", "node2")]
                    await asyncio.sleep(0.2)
                    assert await ask("node3") == "node3"
                    assert pool.open_channels() == 3
                    for task in waiting:
                        with contextlib.suppress(TransientError):  # no answer in time
                            await task
                    # Their calls over, the channels past the cap are closed at once (a plan
                    # that asked every node must not leave them all open).
                    assert pool.open_channels() == 2
                finally:
                    for name in ("node1", "node2"):
                        agents[name].send_signal(signal.SIGCONT)
                assert await ask("node1") == "node1"
                assert pool.open_channels() <= 2
            finally:
                await pool.close()

        asyncio.run(scenario())


def test_an_agent_out_of_descriptors_waits_and_never_rolls_back(tmp_path: Path) -> None:
    """The agent's own "Too many open files" says nothing about the managed server. With no
    descriptor left (its soft limit lowered with ``prlimit`` to what it holds) a Switch is
    refused as UNAVAILABLE, the leader's cue to try again, not as a config error (before:
    FAILED_PRECONDITION "cannot read" the server's config). With one left the switch begins
    and meets the shortage inside the transaction: before the fix that rolled the node back
    (or skipped the freeze, taking its own EMFILE for a server that is down); now the agent
    journals the shortage, waits for descriptors and carries the switch to the end."""
    with AdminTokenCluster(tmp_path / "cluster", next_loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        node = Node(cluster, "fd1", next_loopback(), tmp_path / "fd1")
        try:
            node.start()
            node.preflight("r-fd")
            node.stage("r-fd")
            assert node.agent is not None
            pid = node.agent.pid
            request = agent_pb2.SwitchRequest(
                command=node.command("r-fd"), change=CHANGE.wire(Change.ENABLE_TLS)
            )
            with node.stub() as stub:
                stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)  # the connection is up
                soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
                try:
                    resource.prlimit(pid, resource.RLIMIT_NOFILE, (no_descriptor_left(pid), hard))
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.Switch(request, timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                    assert "Too many open files" in str(refused.value.details())
                    assert node.journal_query("SELECT * FROM txns") == []

                    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid) + 1, hard))
                    stub.Switch(request, timeout=10)
                    wait_until(
                        lambda: bool(
                            node.journal_query("SELECT * FROM events WHERE what = 'short'")
                        ),
                        30,
                        "the agent journalling its shortage",
                    )
                finally:
                    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            txn = node.wait_txn("r-fd")
            assert txn.outcome == "completed", txn.reason
            shortages = node.journal_query("SELECT detail FROM events WHERE what = 'short'")
            assert all("Too many open files" in r["detail"] for r in shortages), shortages
            assert "txn.freeze_skipped" not in node.agent.event_names()
            assert node.journal_query("SELECT * FROM txns WHERE kind = 'rollback'") == []
            assert node.server.status()["listen"] == ["https"]
        finally:
            node.close()
