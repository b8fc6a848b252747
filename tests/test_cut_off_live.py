"""A node cut off while a rollout runs, end to end (s51): a real leader, agents and reference
servers as processes, real mutual TLS, the real CLI. The planner's and engine's part is
tested in tests/test_engine.py (a node cut off mid-switch, a cut-off frozen node under
``--freeze scope``); the cut-off node before its switch, end to end, in
tests/test_reenrol_ended.py.

A rollout holds its nodes: `tlsroll nodes remove` of one is refused while it runs, naming
`tlsroll ca revoke SERIAL` of its agent's certificate, which cuts the agent off at once (a
machine lost or stolen); the node is removed once the rollout has ended (README, "nodes
remove"). A switch is held open by the restarted server's start delay (its test-only knob,
``TLSROLL_REFSERVER_TEST_START_DELAY``), long beside the CLI's calls, so that the revocation
comes while it is under way (checked by its outcome: a switch ended before it would be done).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from leader.engine import TEST_LEASE_MARGIN_ENV
from leader.rollout_core import cut_off_mid_switch
from refserver.server import START_DELAY_ENV
from tests.cluster import LEADER_POLL, Cluster, one_line_error, wait_until
from tests.nodeside import Node, cluster_of
from tests.refserver_helper import http_request
from tests.test_level_based import live, password_file
from tests.test_scope_freeze import ScopeWorld
from tests.test_transitional import LONG, WAITED, rollout, wait_state

HOLD = 10
"""Seconds the restarted server of a switch waits before it answers (its start delay): a
switch lasts at least that long after its restart, which leaves the revocation, one CLI call
after the switch was seen, time to come while it is under way. node2's alone: the others'
switches (the retry's) are not held."""

LEASE = 10
"""The scope freeze's lease (s), the least leader.toml takes: a cut-off node's freeze, never
renewed, lapses on its agent within it."""

MARGIN = 20
"""Seconds past that lease after which the leader counts the cut-off node's freeze lifted (its
``LEASE_MARGIN``, a minute, shortened by the leader's test hook ``TEST_LEASE_MARGIN_ENV``): the
rollout's end waits for it, the others' switches must not. Well past what the switches take
after the resume (3 s on a loaded machine), so that a switch held for it would be seen: the
leader has not counted it lifted when they are done."""


def node_states(view: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {n["name"]: (n["state"], n.get("reason", "")) for n in view["nodes"]}


def state_of(cluster: Cluster, name: str) -> str:
    """Node ``name``'s state in the newest rollout, asked of the leader (for a wait)."""
    return str(node_states(cluster.poll_newest_rollout())[name][0])


def unfrozen_on(node: Node, scheme: str) -> bool:
    """Whether ``node``'s server answers its admin socket, serves ``scheme`` alone and is not
    frozen (a write would be taken)."""
    try:
        status = node.server.status()
    except OSError:
        return False  # (restarting)
    return status["listen"] == [scheme] and status["frozen"] is False


def takes_writes_on_http(node: Node) -> bool:
    return http_request("POST", f"{node.http_url()}entries", {"note": "after"}).status == 201


@pytest.mark.timeout(600)
def test_a_node_cut_off_during_its_switch_needs_attention_and_halts_the_rollout(
    tmp_path: Path,
) -> None:
    """An enable-tls over three nodes, one at a time (node2, node3, then node1, the leader's
    own). While node2's switch is under way its machine is lost: `nodes remove node2` is
    refused, giving the `tlsroll ca revoke` of its agent's serial; once revoked, the leader
    asks node2's agent nothing more, so its outcome is not known: node2 needs attention (its
    reason saying so, and `nodes remove`), which the failure budget (0) counts in the same
    pass: the rollout halts (it does not complete), node3 and node1 are never touched (on
    http, not frozen, taking writes), and the halt's note names node2 with `tlsroll nodes
    remove node2` before the retry. Its retry is refused in one line until node2 is removed;
    then it runs on node3 and node1 alone, naming node2 left out, and completes. Nothing waits
    without a bound: the halt comes while node2's agent still carries its switch on its own."""
    slow = {"node2": {START_DELAY_ENV: str(HOLD)}}  # node2's switch alone is held open
    with cluster_of(tmp_path, 3, node_env=slow) as (cluster, nodes):
        node1, node2, node3 = nodes
        agent = node2.agent
        assert agent is not None
        secret = password_file(tmp_path, "pw", "cut-off-mid-switch-password-for-the-practice")
        started = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--max-parallel", "1"),
            *("--password-file", str(secret), "--yes"),
        )
        assert started.returncode == 0, (started.stdout, started.stderr)
        first = cluster.poll_newest_rollout()["id"]
        # The rollout holds node2 from its start: its removal is refused, naming the revocation
        # (asked before its switch, so that the one call left inside the held switch is the
        # revocation itself: review rev51b L2).
        removal = cluster.cli("nodes", "remove", "node2", "--yes")
        line = one_line_error(removal.stderr, "tlsroll")
        assert removal.returncode == 1, line
        serial = f"{agent.cert().serial_number:x}"
        assert f"cut its agent off now with `tlsroll ca revoke {serial}`" in line, line
        assert state_of(cluster, "node2") != "done"  # (asked while node2 was still to switch)
        wait_until(
            lambda: state_of(cluster, "node2") == "switching",
            120,
            "node2's switch",
            interval=LEADER_POLL,
        )
        revoked = cluster.cli("ca", "revoke", serial)
        assert revoked.returncode == 0, revoked.stderr

        ended = wait_state(cluster, first, WAITED, "the rollout to halt")
        assert ended["state"] == "halted", ended
        states = node_states(ended)
        assert states == {
            "node1": ("skipped", "rollout halted"),
            "node2": ("needs_attention", cut_off_mid_switch("node2")),
            "node3": ("skipped", "rollout halted"),
        }, states
        note = ended["reason"]
        assert note.startswith(f"halted: node2 needs_attention: {cut_off_mid_switch('node2')}")
        assert note.endswith(
            "; next: node2: agent cut off (its certificate revoked): `tlsroll nodes remove"
            f" node2`, then finish the nodes left: tlsroll rollout retry {first}"
        ), note  # (no way back offered: no node is switched, node2's outcome is not known)
        # The others as they were: never frozen, never switched, taking writes on http.
        for node in (node1, node3):
            assert unfrozen_on(node, "http"), node.server.status()
            assert takes_writes_on_http(node), node.name
            assert list(live(node).schemes) == ["http"], node.name
        # `rollout status` says what to do with node2: remove it (not "fix the server by hand",
        # which no one can on a machine lost or stolen: it said so before s51).
        status = cluster.cli("rollout", "status", first)
        assert status.returncode == 4, (status.stdout, status.stderr)
        assert one_line_error(status.stderr, "tlsroll") == (
            "tlsroll: node2 need(s) attention: its agent was cut off during its switch"
            " (certificate revoked), what it runs is not known (see the reason above):"
            " `tlsroll nodes remove node2` once the rollout has ended"
        ), status.stderr

        refused = cluster.cli("rollout", "retry", first)
        line = one_line_error(refused.stderr, "tlsroll")
        assert refused.returncode == 1, line
        assert line == (
            f"tlsroll: error: rollout {first} left node2, whose agent is cut off (certificate"
            " revoked): run `tlsroll nodes remove node2` first, then tlsroll rollout retry"
            f" {first}"
        ), line
        assert cluster.poll_newest_rollout()["id"] == first  # nothing started

        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, removed.stderr
        retried = cluster.cli("rollout", "retry", first, "--wait", timeout=LONG)
        assert retried.returncode == 0, (retried.stdout, retried.stderr)
        assert "  node2 left out: removed since (tlsroll nodes remove)" in retried.stdout, (
            retried.stdout
        )
        second = cluster.poll_newest_rollout()
        assert second["id"] != first
        assert second["state"] == "completed", second
        assert node_states(second) == {"node1": ("done", ""), "node3": ("done", "")}, second
        for node in (node1, node3):
            assert list(live(node).schemes) == ["https"], node.name
        assert rollout(cluster, first)["state"] == "halted"
        # node2's agent carries its switch to its end on its own (the leader is not needed
        # for that): its server ends unfrozen, on https (its switch's outcome, which the
        # leader no longer asks). Looked at last: its held start (``HOLD``) may still be
        # delaying it, and the rest of the test need not wait for that first.
        wait_until(lambda: unfrozen_on(node2, "https"), 60, "node2's switch to end on its own")
        assert cluster.find_secrets(cluster.logs_text()) == []


@pytest.mark.timeout(600)
def test_a_scope_frozen_node_cut_off_holds_no_switch_of_the_others(tmp_path: Path) -> None:
    """`--freeze scope` over three nodes, paused once node2 (first in order) is switched: every
    node frozen, node3 and node1 waiting. node2's machine is lost: its agent is cut off (`ca
    revoke`), so the leader renews its freeze no more and its agent lifts it once its lease
    has run out. Resumed after that, the switches of node3 and node1 are not held by node2's
    lapsed freeze (before s50cut2 the gate waited for it for good): both switch, the rollout
    completes, every node ends unfrozen, and node2's freeze was never renewed after the
    revocation (its agent lifted it by its lease)."""
    world = ScopeWorld(tmp_path, 3)
    try:
        world.start_paused_rollout({TEST_LEASE_MARGIN_ENV: str(MARGIN)}, scope_freeze_lease=LEASE)
        cluster, (node1, node2, node3) = world.cluster, world.nodes
        r = world.schema()
        assert r["state"] == "paused" and r["freeze"] == "scope", r
        assert {n: s for n, (s, _) in node_states(r).items()} == {
            "node1": "pending",
            "node2": "done",
            "node3": "pending",
        }, r
        for node in world.nodes:
            assert node.server.status()["frozen"] is True, node.name
        agent = node2.agent
        assert agent is not None
        revoked = cluster.cli("ca", "revoke", f"{agent.cert().serial_number:x}")
        assert revoked.returncode == 0, revoked.stderr
        # Never renewed again: its agent lifts the freeze when its lease runs out.
        wait_until(
            lambda: "scope_freeze.lease_expired" in agent.event_names(),
            LEASE + 30,
            "node2's freeze lease to run out",
            interval=0.25,
        )
        assert node2.server.status()["frozen"] is False
        for node in (node1, node3):  # renewed: still frozen
            assert node.server.status()["frozen"] is True, node.name

        resumed = cluster.cli("rollout", "resume")
        assert resumed.returncode == 0, resumed.stderr
        # The others switch at once, not held until the leader counts node2's freeze lifted
        # (its lease and a margin after its last freeze call, ``MARGIN`` here: the rollout's
        # end waits for that, the switches must not; review rev51b L1).
        wait_until(
            lambda: {state_of(cluster, n) for n in ("node1", "node3")} == {"done"},
            30,
            "node3 and node1 to switch",
            interval=LEADER_POLL,
        )
        assert "freeze.lease_ran_out" not in cluster.leader.event_names()  # (not held for it)
        wait_until(
            lambda: world.poll()["state"] in WAITED,
            120,
            "the rollout to end",
            interval=LEADER_POLL,
        )
        r = world.schema()
        assert r["state"] == "completed", r
        assert {n: s for n, (s, _) in node_states(r).items()} == {
            "node1": "done",
            "node2": "done",
            "node3": "done",
        }, r
        for node in world.nodes:
            assert unfrozen_on(node, "https"), (node.name, node.server.status())
        # Its agent lifted the freeze by its lease, once: no renewal reached it after that
        # (the leader dials it no more), nor an unfreeze.
        # The leader counted it lifted by its lease and margin: the rollout's end waited for it.
        ran_out = [e for e in cluster.leader.log_events() if e["event"] == "freeze.lease_ran_out"]
        assert [e["node"] for e in ran_out] == ["node2"], ran_out
        events = agent.event_names()
        assert events.count("scope_freeze.lease_expired") == 1, events
        after = events[events.index("scope_freeze.lease_expired") :]
        assert "scope_freeze.on" not in after and "scope_freeze.off" not in after, events
        assert cluster.find_secrets(cluster.logs_text()) == []
    finally:
        world.close()
