"""``--freeze scope`` (the seed's literal advice: no new entries anywhere during the switch):
every node in scope is frozen before the first switch and unfrozen only when the rollout has
ended. Real leader, agents and reference servers."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import LEADER_POLL, AdminTokenCluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, start_nodes
from tests.refserver_helper import http_request
from tlsroll.v1 import admin_pb2, admin_pb2_grpc

LEASE = 10
"""The lease test's scope freeze lease (s): the leader renews it every third of it, at its
engine's tick (a second) — a 3 s lease lapsed under a loaded CI machine (a renewal two seconds
late); a 10 s lease lapses only if one is six seconds late."""


class ScopeWorld:
    """Leader + nodes (node1 the leader node), a rollout started with --freeze scope and
    paused at once: the node first in order (node2) finishes, the others wait, frozen."""

    def __init__(self, root: Path, count: int) -> None:
        addresses = [next_loopback() for _ in range(count)]
        self.root = root
        self.cluster = AdminTokenCluster(root / "cluster", addresses[0], heartbeat_interval=1)
        self.nodes = [
            Node(self.cluster, f"node{i + 1}", a, root / f"n{i}") for i, a in enumerate(addresses)
        ]

    def start_paused_rollout(
        self, env: Mapping[str, str] | None = None, **leader_config: object
    ) -> None:
        """A scope-frozen rollout paused at once: its first node (in flight) finishes, the
        others stay pending. Without pipelining (``prepare_ahead`` 0): with it, a pause holds
        the first node too, staged, if its switch had not begun (``leader.planner``). ``env``
        is added to the leader's environment."""
        self.cluster.init("--node-name", "node1")
        self.cluster.write_leader_config({"prepare_ahead": 0, **leader_config})
        self.cluster.start_leader(env)
        start_nodes(self.nodes)
        self.cluster.wait_for_nodes_online([n.name for n in self.nodes])
        pw = self.root / "pw"
        pw.touch(0o600)
        pw.write_text("scope-freeze-test-password\n")
        with self.cluster.admin() as admin:
            self._start_and_pause(admin, pw)

    def _start_and_pause(self, admin: admin_pb2_grpc.AdminStub, pw: Path) -> None:
        admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=30)  # (the channel open)
        started = self.cluster.cli(
            "rollout",
            "start",
            "--scope",
            "cluster",
            "--freeze",
            "scope",
            "--password-file",
            str(pw),
            "--yes",
        )
        assert started.returncode == 0, started.stderr
        # Paused over the admin socket from here, on a channel already open, not by a CLI
        # process: its start (about 0.3 s, more under load) let node2 finish its switch before
        # the pause, and node1, started by then, switched too (a run of session 42's CI).
        (rollout_id,) = set(re.findall(r"\br\d{8}-\d{6}-[0-9a-f]{4}\b", started.stdout))
        paused = admin.ControlRollout(
            admin_pb2.ControlRolloutRequest(
                rollout_id=rollout_id, action=admin_pb2.ROLLOUT_ACTION_PAUSE
            ),
            timeout=30,
        )
        assert paused is not None
        wait_until(
            lambda: self.poll()["nodes"][0]["state"] == "done",
            60,
            "node2 done",
            interval=LEADER_POLL,
        )

    def schema(self) -> dict[str, Any]:
        """The newest rollout as ``schema show --json`` shows it, asked of the leader from this
        process (``Cluster.poll_newest_rollout``): these tests are about the freeze, not the
        command."""
        return self.cluster.poll_newest_rollout()

    def poll(self) -> dict[str, Any]:
        """``schema`` for a wait."""
        return self.schema()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.cluster.close()


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[[int], ScopeWorld]]:
    worlds: list[ScopeWorld] = []

    def make(count: int) -> ScopeWorld:
        worlds.append(ScopeWorld(tmp_path, count))
        return worlds[-1]

    try:
        yield make
    finally:
        for w in worlds:
            w.close()


def test_scope_freeze_holds_every_node_until_the_rollout_ends(
    make_world: Callable[[int], ScopeWorld],
) -> None:
    w = make_world(3)
    w.start_paused_rollout()
    cluster, nodes, schema = w.cluster, w.nodes, w.schema
    r = schema()
    assert r["state"] == "paused" and r["freeze"] == "scope"
    assert [n["state"] for n in r["nodes"]] == ["done", "pending", "pending"]
    for node in nodes[1:]:
        assert node.server.status()["frozen"] is True
    waiting = nodes[2]  # node3: untouched, on http, but no new entries
    refused = http_request("POST", f"{waiting.http_url()}entries", {"note": "x"})
    assert refused.status == 503 and refused.header("Retry-After")
    switched = nodes[1]  # node2: on https, still frozen until the rollout ends
    assert switched.server.status()["listen"] == ["https"]

    assert cluster.cli("rollout", "resume").returncode == 0
    wait_until(
        lambda: w.poll()["state"] == "completed",
        90,
        "the rollout to complete",
        interval=LEADER_POLL,
    )
    r = schema()
    assert all(n["state"] == "done" for n in r["nodes"])
    times = {n["name"]: {s["step"]: s for s in n["steps"]} for n in r["nodes"]}
    first_switch = min(t["switch"]["started_at"] for t in times.values())
    last_confirm = max(t["confirm"]["ended_at"] for t in times.values())
    for name, t in times.items():
        assert t["freeze"]["ended_at"] <= first_switch, name
        assert t["unfreeze"]["started_at"] >= last_confirm, name
    for node in nodes:
        assert node.server.status()["frozen"] is False


def test_scope_freeze_is_a_lease_the_leader_must_renew(
    make_world: Callable[[int], ScopeWorld],
) -> None:
    """While the leader lives, a paused scope freeze outlasts its lease (it is renewed); once
    the leader is gone the agents lift it when the lease runs out — no node stays frozen
    because of a dead leader — and the restarted leader carries the rollout to its end."""
    w = make_world(2)
    w.start_paused_rollout(scope_freeze_lease=LEASE)
    frozen_by = time.monotonic()  # node1's first Freeze was before node2's switch
    cluster, nodes, schema = w.cluster, w.nodes, w.schema
    waiting = nodes[0]  # node1, the leader node, goes last: it waits, frozen
    assert waiting.agent is not None
    agent = waiting.agent

    def freezes() -> int:
        """Freezes node1's agent granted: the first and the leader's renewals."""
        return agent.event_names().count("scope_freeze.on")

    # Longer than a lease since the first Freeze, and renewed twice (every third of a lease):
    # the freeze held past its lease because it was renewed, never lifted in between.
    wait_until(
        lambda: time.monotonic() - frozen_by > LEASE and freezes() >= 3,
        LEASE + 60,
        "a lease's time with renewals",
        interval=0.5,
    )
    assert waiting.server.status()["frozen"] is True
    assert "scope_freeze.lease_expired" not in agent.event_names()

    cluster.kill_leader()
    wait_until(
        lambda: waiting.server.status()["frozen"] is False,
        LEASE + 20,
        "the lease to lapse",
        interval=0.25,
    )
    accepted = http_request("POST", f"{waiting.http_url()}entries", {"note": "after"})
    assert accepted.status == 201
    # The agent logs it once the server's unfreeze has returned: a moment after the server
    # says so on a busy machine (session 67: the look at once missed it under load).
    wait_until(
        lambda: "scope_freeze.lease_expired" in agent.event_names(),
        10,
        "node1's agent to log the lapsed lease",
        interval=0.1,
    )

    cluster.start_leader()
    assert cluster.cli("rollout", "resume").returncode == 0
    wait_until(
        lambda: w.poll()["state"] == "completed",
        90,
        "the rollout to complete",
        interval=LEADER_POLL,
    )
    assert all(n["state"] == "done" for n in schema()["nodes"])
    for node in nodes:
        assert node.server.status()["frozen"] is False
