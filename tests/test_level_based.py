"""Rollouts planned from what the nodes run, not from what earlier rollouts recorded (issue 16):
local then cluster leaves the leader node alone and keeps its password; the way back returns
every node that runs https to http, whichever rollout switched it; a halted rollout is retried
to the end. A real leader, agents and reference servers, with writes checked throughout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leader.engine import SILENT, TEST_SILENT_AFTER_ENV
from refserver.server import START_DELAY_ENV
from tests import byo_certs
from tests.cluster import LEADER_POLL, Cluster, one_line_error, wait_until
from tests.nodeside import Node, cluster_of, port_holder
from tests.refserver_helper import http_request, write_toml
from tlsroll import pki, tls
from tlsroll.v1 import agent_pb2

ENDED = ("completed", "halted", "aborted")


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[Cluster, list[Node]]]:
    with cluster_of(tmp_path, 3) as world:
        yield world


def newest(cluster: Cluster) -> dict[str, Any]:
    return cluster.newest_rollout()


def wait_ended(cluster: Cluster, what: str) -> dict[str, Any]:
    """Wait (looking from this process: ``Cluster.poll_newest_rollout``) until the newest
    rollout ended; then the rollout as ``schema show --json`` shows it."""
    wait_until(
        lambda: cluster.poll_newest_rollout()["state"] in ENDED, 120, what, interval=LEADER_POLL
    )
    return newest(cluster)


def live(node: Node) -> agent_pb2.ServerView:
    with node.stub() as stub:
        status: agent_pb2.NodeStatus = stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
    return status.server


def read_or_nothing(path: Path) -> str:
    """The text of ``path``, "" while it does not exist."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def password_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.touch(0o600)
    path.write_text(text + "\n")
    return path


def writes_work(node: Node, scheme: str, ca_pem: bytes) -> None:
    context = tls.client_context(ca_pem) if scheme == "https" else None
    url = node.https_url() if scheme == "https" else node.http_url()
    assert http_request("POST", f"{url}entries", {"n": node.name}, context=context).status == 201


def test_local_then_cluster_leaves_the_leader_node_and_its_password_alone(
    three: tuple[Cluster, list[Node]], tmp_path: Path
) -> None:
    """Issue 16 #1 and #2: scope local with password A, then scope cluster: the leader node is
    not switched again (it shows "already done"), a second password is refused and the other
    nodes get A; then `rollout rollback` returns every node to http, node1 included."""
    cluster, nodes = three
    node1 = nodes[0]
    a = password_file(tmp_path, "a", "first-password-for-the-practice")
    b = password_file(tmp_path, "b", "another-password-for-the-practice")

    # Before the start, in plain words: node2 and node3 stay on http, the cluster is mixed
    # afterwards, and how to finish (review s69 revlocal H1: the plan and the start said
    # nothing of the nodes a local switch leaves out).
    mixed_after = (
        "Only node1 (the leader node) switches to https: node2, node3 stay on http, so the "
        "cluster is mixed afterwards"
    )
    finish = "tlsroll plan --nodes node2,node3, then tlsroll rollout start --nodes node2,node3"
    plan = cluster.cli("plan", "--scope", "local")
    assert plan.returncode == 0, plan.stderr
    said = " ".join(plan.stdout.split())
    assert mixed_after in said and finish in said, plan.stdout
    assert said.startswith("Plan: change enable-tls on scope local (the leader node, node1),")
    local = cluster.cli("rollout", "start", "--scope", "local", "--password-file", str(a), "--yes")
    assert local.returncode == 0, local.stderr
    assert mixed_after in " ".join(local.stdout.split()), local.stdout
    local_run = wait_ended(cluster, "the local switch")
    assert local_run["state"] == "completed"
    local_id = local_run["id"]
    digest_a = live(node1).verifier_digest
    assert digest_a and live(node1).schemes == ["https"]
    pid_before = node1.server_pid()

    # `tlsroll nodes` says the cluster is mixed, and the way to switch the rest (review s64
    # trans L5: a node enrolled into a cluster on https was told as nothing).
    listed = cluster.cli("nodes")
    assert listed.returncode == 0, listed.stderr
    mixed = " ".join(listed.stdout.split())
    assert (
        "a mixed cluster: node2, node3 on http, node1 on https; to switch the rest: tlsroll "
        "plan --nodes node2,node3, then tlsroll rollout start --nodes node2,node3"
    ) in mixed, listed.stdout
    # `schema show` (the update schema at the leader node, as the seed has it) says the same
    # beside the local rollout, and its --json has the nodes by scheme (review s69 revlocal2
    # M1: it named node1 alone, and nothing said the cluster is mixed).
    shown = cluster.cli("schema", "show")
    assert shown.returncode == 0, shown.stderr
    drawn = " ".join(shown.stdout.split())
    assert "scope local (the leader node, node1)" in drawn, shown.stdout
    assert mixed[mixed.index("a mixed cluster:") :] in drawn, shown.stdout
    data = json.loads(cluster.cli("schema", "show", "--json").stdout)
    assert data["mixed_cluster"] == {
        "on_http": ["node2", "node3"],
        "on_https": ["node1"],
        "unknown": [],
        # node1 serves the certificate this CA issued it, as its heartbeat names it: a cluster
        # enable-tls leaves it alone (review of s69, closing M: neither dual nor another's)
        "dual": [],
        "other_certificate": [],
    }
    # The plan shows node1 as already done and says the password in use is kept.
    plan = cluster.cli("plan", "--scope", "cluster")
    assert plan.returncode == 0, plan.stderr
    (line,) = [ln for ln in plan.stdout.splitlines() if "node1" in ln]
    assert "already done" in line
    assert "it is not replaced" in plan.stdout
    # A new password would silently replace A on node1's neighbours: refused, nothing started.
    refused = cluster.cli(
        "rollout", "start", "--scope", "cluster", "--password-file", str(b), "--yes"
    )
    assert refused.returncode == 1 and "already use auth password" in refused.stderr
    assert newest(cluster)["scope"] == "local"

    started = cluster.cli("rollout", "start", "--scope", "cluster", "--yes")
    assert started.returncode == 0, started.stderr
    assert "node1: already done" in started.stdout
    r = wait_ended(cluster, "the cluster switch")
    assert r["state"] == "completed", r
    states = {n["name"]: (n["state"], n.get("reason", "")) for n in r["nodes"]}
    assert states["node1"][0] == "skipped" and "already done" in states["node1"][1]
    assert states["node2"][0] == states["node3"][0] == "done"
    assert node1.server_pid() == pid_before  # not frozen, not restarted
    for node in nodes:
        view = live(node)
        assert view.schemes == ["https"]
        assert view.verifier_digest == digest_a  # one password, A, everywhere
        writes_work(node, "https", cluster.ca_pem)
    assert "mixed" not in cluster.cli("nodes").stdout  # every node on https
    # The way back of the local rollout alone, asked (not a terminal: nothing started): it
    # says node2 and node3 stay on https and the cluster is mixed then, not "Every
    # workstation must go back" (review s69 revlocal L2).
    cluster_id = r["id"]
    asked = cluster.cli("rollout", "rollback", local_id, input="y\n")
    assert asked.returncode == 2, (asked.stdout, asked.stderr)
    said = " ".join(asked.stdout.split())
    assert said.startswith("Back to http: node1 ("), said
    assert (
        "Only node1 (the leader node) goes back to http: node2, node3 stay on https, so the "
        "cluster is mixed afterwards." in said
    ), said
    assert "Every workstation of the nodes going back must go back" in said
    assert newest(cluster)["id"] == cluster_id  # nothing started

    back = cluster.cli("rollout", "rollback", "--yes")
    assert back.returncode == 0, back.stderr
    r = wait_ended(cluster, "the way back")
    assert r["change"] == "disable-tls" and r["state"] == "completed", r
    assert sorted(n["name"] for n in r["nodes"] if n["state"] == "done") == [
        "node1",
        "node2",
        "node3",
    ]
    for node in nodes:
        assert live(node).schemes == ["http"]
        assert node.server.status()["frozen"] is False
        writes_work(node, "http", cluster.ca_pem)
    # Nothing is left on https: a second way back has nothing to do and says whose it was.
    again = cluster.cli("rollout", "rollback", "--yes")
    assert again.returncode == 1
    assert f"already taken back by rollout {r['id']}" in again.stderr
    # ... and not the very command refused as the way on (session 56's README walk).
    assert "no node runs https now: nothing to take back" in again.stderr, again.stderr
    assert "to take back every node on https now" not in again.stderr


def test_a_halted_rollout_is_retried_to_the_end(
    three: tuple[Cluster, list[Node]], tmp_path: Path
) -> None:
    """A node whose port 8443 is taken halts the rollout at preflight; once it is free,
    `rollout retry --wait` plans the nodes not done again and exits 0 when they are. The
    node is node1, the leader node, stepped last (third). With node2, stepped first, blocked
    so, the start is refused up front with the plan's reason (brief s67 engine (a): it was
    accepted, and halted at once at node2's preflight); so it is with node3, stepped second,
    which the default ``prepare_ahead`` (1) preflights in the plan that begins node2's
    switch (review s67 rev2 M3: it was accepted, and halted seconds later with only node2
    switched)."""
    cluster, nodes = three
    node1, node2, node3 = nodes
    pw = password_file(tmp_path, "pw", "retry-password-for-the-practice")
    start_args = ("rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes")
    for blocked, others in ((node2, (node1, node3)), (node3, (node1, node2))):
        with port_holder(blocked.address, 8443):
            refused = cluster.cli(*start_args)
            assert refused.returncode == 1, (blocked.name, refused.stdout, refused.stderr)
            line = one_line_error(refused.stderr, "tlsroll")
            assert line.startswith(
                "tlsroll: error: enable-tls cannot start: its first step would fail at once on "
                f"{blocked.name} (port 8443"
            ), line
            assert all(other.name not in line.split(": fix that")[0] for other in others), line
        assert cluster.schema_json()["rollouts"] == []  # none was made
        for node in nodes:
            assert live(node).schemes == ["http"]
    with port_holder(node1.address, 8443):
        # The plan runs the agents' read-only checks: node1 is shown blocked, and why; and
        # the plan exits 1 saying so, as for any blocked node (it exited 0: brief s39small).
        plan = cluster.cli("plan", "--scope", "cluster")
        assert plan.returncode == 1, (plan.stdout, plan.stderr)
        (line,) = [ln for ln in plan.stdout.splitlines() if "node1" in ln]
        assert "blocked: port 8443" in line and "taken by" in line, line
        refusal = plan.stderr.strip()
        assert refusal.startswith("tlsroll: error: enable-tls is blocked on node1 (port 8443")
        assert "taken by" in refusal and "node2" not in refusal and "node3" not in refusal
        assert refusal.endswith("fix that, or leave it out (--nodes); nothing was changed")
        for name in ("node2", "node3"):
            ahead = next(ln for ln in plan.stdout.splitlines() if name in ln)
            assert ahead.endswith("will switch"), ahead
        # Stepped third, past max_parallel + prepare_ahead: the start runs, and halts there.
        start = cluster.cli(*start_args, "--wait")
        assert start.returncode == 3, (start.stdout, start.stderr)  # halted
        halted = newest(cluster)
        assert halted["state"] == "halted"
        by_name = {n["name"]: n for n in halted["nodes"]}
        assert by_name["node1"]["state"] == "failed" and "8443" in by_name["node1"]["reason"]
    assert by_name["node2"]["state"] == "done"  # switched before node1 was preflighted
    # node3 may have switched before the halt (node1 is prepared ahead, and fails at once).
    for node in nodes:
        switched = by_name[node.name]["state"] == "done"
        writes_work(node, "https" if switched else "http", cluster.ca_pem)
    done_before = {n["name"] for n in halted["nodes"] if n["state"] == "done"}

    retried = cluster.cli("rollout", "retry", "--wait")
    assert retried.returncode == 0, (retried.stdout, retried.stderr)
    # The seed's warnings, as `rollout start --yes` prints them (retry printed none: s39small).
    said = " ".join(retried.stdout.split())  # rich folds long lines
    assert "Important: ! The switch restarts the managed server on each node." in said, said
    assert "All connected clients must re-initiate their server connections" in said, said
    r = newest(cluster)
    assert r["id"] != halted["id"] and r["state"] == "completed"
    assert {n["name"] for n in r["nodes"]} == {"node1", "node2", "node3"} - done_before
    digests = {live(n).verifier_digest for n in nodes}
    assert len(digests) == 1  # the halted rollout's password, on every node
    for node in nodes:
        assert live(node).schemes == ["https"]
        writes_work(node, "https", cluster.ca_pem)
    # Only a halted or aborted rollout is retried.
    again = cluster.cli("rollout", "retry")
    assert again.returncode == 1 and "only a halted or aborted rollout" in again.stderr
    # And a rollout once (audit s39race H3: a second retry switched the nodes again).
    again = cluster.cli("rollout", "retry", halted["id"])
    assert again.returncode == 1, (again.stdout, again.stderr)
    assert one_line_error(again.stderr, "tlsroll") == (
        f"tlsroll: error: rollout {halted['id']} was already retried by {r['id']} (completed);"
        " see: tlsroll schema show"
    )
    assert newest(cluster)["id"] == r["id"]


def test_an_agent_that_stops_answering_neither_wedges_abort_nor_the_rollout(
    tmp_path: Path,
) -> None:
    """Issue 16 #3 with a real agent stopped (SIGSTOP) after the start: an abort settles at
    once (the node in preflight or stage is skipped, nothing on it was touched), neither waiting
    for the agent (stopped until the test's end) nor for the step deadline (300 s here: an abort
    that waited for it would outlast ``wait_ended``'s bound of 120 s, no time measured); a
    retry while the agent is away is refused naming it, and
    once it answers again the retry finishes the rollout. Without pipelining (``prepare_ahead``
    0): with it, node3 is prepared while node2 switches, often before the test can stop its
    agent, and then hangs in its switch, which an abort rightly waits for."""
    with cluster_of(tmp_path, 3, step_deadline=300, prepare_ahead=0) as (cluster, nodes):
        stopped_agent(cluster, nodes, tmp_path)


def stopped_agent(cluster: Cluster, nodes: list[Node], tmp_path: Path) -> None:
    node3 = nodes[2]
    pw = password_file(tmp_path, "pw", "stopped-agent-password-for-practice")
    assert node3.agent is not None

    def node_state(name: str) -> str:
        r = cluster.poll_newest_rollout()
        return str(next(n["state"] for n in r["nodes"] if n["name"] == name))

    start = cluster.cli(
        "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"
    )
    assert start.returncode == 0, start.stderr
    node3.agent.send_signal(signal.SIGSTOP)
    try:
        # node2 carries on to done; node3 then hangs in its preflight.
        wait_until(
            lambda: node_state("node3") == "preflight" and node_state("node2") == "done",
            60,
            "node3 hanging in preflight, node2 done",
        )
        abort = cluster.cli("rollout", "abort")
        assert abort.returncode == 0, abort.stderr
        r = wait_ended(cluster, "the abort")
        assert r["state"] == "aborted"
        states = {n["name"]: n["state"] for n in r["nodes"]}
        assert states == {"node2": "done", "node3": "skipped", "node1": "skipped"}

        # Retried with the agent still stopped: refused at once, naming the node and why (the
        # engine's step deadline for an agent that stops mid-step is tested in test_engine).
        retried = cluster.cli("rollout", "retry", "--wait")
        assert retried.returncode == 1, (retried.stdout, retried.stderr)
        assert "node3" in retried.stderr and len(retried.stderr.strip().splitlines()) == 1
        assert newest(cluster)["id"] == r["id"]
    finally:
        node3.agent.send_signal(signal.SIGCONT)

    retried = cluster.cli("rollout", "retry", "--wait")
    assert retried.returncode == 0, (retried.stdout, retried.stderr)
    # The seed's warnings, as `rollout start --yes` prints them (retry printed none: s39small).
    said = " ".join(retried.stdout.split())  # rich folds long lines
    assert "Important: ! The switch restarts the managed server on each node." in said, said
    assert "All connected clients must re-initiate their server connections" in said, said
    for node in nodes:
        assert live(node).schemes == ["https"]
        writes_work(node, "https", cluster.ca_pem)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["before-preflight", "mid-switch"])
def test_a_step_whose_agent_falls_silent_says_so_on_its_node_until_it_answers(
    where: str, tmp_path: Path
) -> None:
    """Review of s58/59: an agent stopped (SIGSTOP: alive, its connections open, answering
    nothing) while a step waits for it left its node "in progress" with an empty reason until
    the step's calls gave up (30 s a preflight's call, 46 s a switch's watch; a preflight
    whose connection's TLS handshake times out, attempt after attempt, until its step
    deadline), in `schema show`, `rollout status`, the admin API. The node's reason says now
    that the agent has not answered since it was last heard, and since when its step waits
    (``leader.engine.SILENT``); once the agent answers, the rollout goes on to the end and the
    note is gone. The leader looks for the silence 3 s into a step's wait here, not
    ``SILENT_AFTER`` (10 s; ``TEST_SILENT_AFTER_ENV``): what makes the note, two silent
    heartbeat intervals, is the same.

    The rollout takes node2 first, its switch slowed by its server's start, and the leader's
    node (node1) last. ``before-preflight``: node1's agent is stopped right after the start,
    so that its preflight begins with the agent stopped (a step deadline longer than the wait
    here, so that the preflight is answered, not failed; no pipelining, so that node1 is not
    prepared while node2 switches). ``mid-switch``: node2's agent is stopped while its switch
    runs (the server restarting: once the started server says it waits), the leader's watch of
    the switch open: its server's start slowed to 8 s, so that the stop surely lands while it
    runs (the note comes from the heartbeats' silence, not from how long the start takes:
    little or none of the start is left when it comes; 3 s from "switching" on left a narrow
    window on a busy machine: review of s60, L5). ``before-preflight`` slows node2's start to
    7 s: a switch whose agent is alive and waits for its server longer than the leader's
    first look (3 s here), and looks again each second, gets no note (review of s60, M1: only
    the stopped node's is ever said)."""
    delay = "7" if where == "before-preflight" else "8"
    slow = {"node2": {START_DELAY_ENV: delay}}
    soon = {TEST_SILENT_AFTER_ENV: "3"}  # (the leader's; the agents' and servers' ignore it)
    with cluster_of(tmp_path, 2, env=soon, node_env=slow, step_deadline=120, prepare_ahead=0) as (
        cluster,
        nodes,
    ):
        stopped = nodes[0] if where == "before-preflight" else nodes[1]
        name, step = stopped.name, "preflight" if where == "before-preflight" else "switch"
        assert stopped.agent is not None
        pw = password_file(tmp_path, "pw", "silent-agent-password-for-practice")

        def view_of() -> dict[str, Any]:
            r = cluster.poll_newest_rollout()
            view: dict[str, Any] = next(n for n in r["nodes"] if n["name"] == name)
            return view

        start = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"
        )
        assert start.returncode == 0, start.stderr
        if where == "mid-switch":
            wait_until(lambda: view_of()["state"] == "switching", 30, "node2 switching")
            # Stopped once its switch restarts the server, whose start then takes 8 s: little
            # or none of it is left when the agent runs again after the note (stopped at
            # "switching", the agent stopped before the restart in some runs, and the whole
            # start, 15 s then, came after the note).
            started = stopped.agent.data_dir / "refserver.log"
            wait_until(
                lambda: "test_hook.start_delay" in read_or_nothing(started),
                30,
                "node2's switch starting its server",
            )
        stopped.agent.send_signal(signal.SIGSTOP)
        try:
            wait_until(
                lambda: view_of()["reason"].startswith(SILENT),
                90,
                f"{name}'s reason saying its agent is silent",
                interval=LEADER_POLL,
            )
            view = view_of()
            assert view["state"] == ("preflight" if step == "preflight" else "switching"), view
            assert re.fullmatch(
                rf"{SILENT} \d\d:\d\d:\d\d UTC \(its {step} began at \d\d:\d\d:\d\d UTC"
                r" and waits for its answer; check it runs: .+\)",
                view["reason"],
            ), view
            shown = cluster.cli("rollout", "status", "--json")  # as the admin reads it
            assert shown.returncode == 0, shown.stderr
            said = {n["name"]: n["reason"] for n in json.loads(shown.stdout)["nodes"]}
            assert said[name].startswith(SILENT), said
        finally:
            stopped.agent.send_signal(signal.SIGCONT)
        r = wait_ended(cluster, f"the rollout, once {name}'s agent answers")
        assert r["state"] == "completed", r
        ended = {n["name"]: (n["state"], n["reason"]) for n in r["nodes"]}
        assert ended == {"node1": ("done", ""), "node2": ("done", "")}, ended
        noted = [e for e in cluster.leader.log_events() if e.get("event") == "step.agent_silent"]
        assert noted and {e.get("node") for e in noted} == {name}, noted


@pytest.mark.timeout(240)
def test_rotate_cert_then_a_server_that_dies_after_its_rollout_shows_within_heartbeats(
    three: tuple[Cluster, list[Node]], tmp_path: Path
) -> None:
    """Two tests once, each on a cluster of its own that began with the same enable-tls
    rollout, now one after the other on one cluster:

    Issue 11: `rollout start --change rotate-cert` issues a new key and certificate per
    node through the same safe transaction; each node serves the new fingerprint, keeps its
    password, and workstations (which trust the CA) go on writing.

    Issue 16 #6: a managed server killed after its node finished stayed down while the
    leader showed `done`. Heartbeats carry what the server runs: `tlsroll nodes` says it is
    down within a few intervals, and a new plan names it instead of going ahead."""
    cluster, nodes = three
    node2 = nodes[1]
    pw = password_file(tmp_path, "pw", "rotate-cert-password-for-practice")
    start = cluster.cli(
        *("rollout", "start", "--scope", "cluster", "--password-file", str(pw)), "--yes", "--wait"
    )
    assert start.returncode == 0, (start.stdout, start.stderr)

    # Issue 11: rotate-cert.
    before = {n.name: n.served_fingerprint() for n in nodes}
    digests = {n.name: live(n).verifier_digest for n in nodes}
    rotate = cluster.cli(
        "rollout", "start", "--scope", "cluster", "--change", "rotate-cert", "--yes", "--wait"
    )
    assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
    r = newest(cluster)
    assert r["change"] == "rotate-cert" and r["state"] == "completed", r
    for node in nodes:
        after = node.served_fingerprint()
        assert after != before[node.name]
        entry = next(n for n in r["nodes"] if n["name"] == node.name)
        assert entry["cert_fingerprint"] == after
        view = live(node)
        assert view.schemes == ["https"] and view.verifier_digest == digests[node.name]
        writes_work(node, "https", cluster.ca_pem)

    # Issue 16 #6: a server that dies after its rollout.

    def server_of(name: str) -> str:
        listed = json.loads(cluster.cli("nodes", "--json").stdout)
        return str(next(n.get("server", "") for n in listed if n["name"] == name))

    def reported(name: str) -> str:  # for a wait: the same view, asked from this process
        return str(cluster.list_nodes()[name].server)

    # Every node's, not node2's alone: node1's then said "https" without a wait (CI of
    # session 54: a beat made while its switch restarted the server said "down", the next one
    # an interval later said "https"; a beat now waits for that restart, and this waits too).
    wait_until(
        lambda: all(reported(n.name) == "https" for n in nodes), 15, "servers on https", LEADER_POLL
    )
    assert server_of("node2") == "https"
    pid = node2.server_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: reported("node2").startswith("down"), 15, "node2's server down", LEADER_POLL)
    assert server_of("node2").startswith("down")
    assert server_of("node1") == "https"
    table = cluster.cli("nodes").stdout
    (row,) = [ln for ln in table.splitlines() if " node2 " in ln]
    assert "down" in row
    plan = cluster.cli("plan", "--scope", "cluster", "--change", "change-password")
    assert plan.returncode == 1 and "node2" in plan.stderr, (plan.stdout, plan.stderr)

    # Review s70 drift H1: the admin starts node2's server again by hand, on a certificate of
    # their own (its config edited, the server started outside tlsroll). The agent reported
    # the certificate its journal says it installed, not the one served: the leader showed
    # node2 on this CA's certificate, and a plan called it "already done". What is served
    # decides: `tlsroll nodes` names the other certificate, and enable-tls switches node2
    # again, and only it.
    own = hand_made_certificate(node2, tmp_path / "own")
    wait_until(
        lambda: cluster.list_nodes()["node2"].other_certificate, 30, "node2's own certificate"
    )
    listed = " ".join(cluster.cli("nodes").stdout.split())
    assert (
        "node2 serves https with a certificate not of this cluster's CA (put in by hand?); to "
        "give it one of this CA: tlsroll plan --nodes node2, then tlsroll rollout start "
        "--nodes node2"
    ) in listed, listed
    plan = cluster.cli("plan", "--scope", "cluster")
    assert plan.returncode == 0, (plan.stdout, plan.stderr)
    said = {n.name: next(ln for ln in plan.stdout.splitlines() if n.name in ln) for n in nodes}
    # Review s70 drift L1: the plan said only "will switch" of it, its old address
    # http://…:8080, under "http (8080) closes the moment each node switches".
    assert said["node2"].endswith(
        "will switch; it serves https already, with a certificate not of this cluster's CA "
        "(the practice's own?): the switch replaces that certificate with one of this CA, its "
        "https address stays; a workstation that trusted the practice's certificate there "
        "needs this CA (the client steps)"
    ), plan.stdout
    assert "already done" in said["node1"] and "already done" in said["node3"], plan.stdout
    warned = " ".join(plan.stdout.split())
    assert "http (8080) closes" not in warned, warned
    assert "node2 serves https already, with a certificate not of this cluster's CA" in warned
    as_json = json.loads(cluster.cli("plan", "--scope", "cluster", "--json").stdout)
    (row2,) = [n for n in as_json["rollout"]["nodes"] if n["name"] == "node2"]
    assert row2["other_certificate"] and row2["old_url"] == row2["new_url"], row2
    assert row2["old_url"].startswith("https://"), row2
    again = cluster.cli("rollout", "start", "--scope", "cluster", "--yes", "--wait")
    assert again.returncode == 0, (again.stdout, again.stderr)
    switched = newest(cluster)
    states = {n["name"]: n["state"] for n in switched["nodes"]}
    assert states == {"node1": "skipped", "node2": "done", "node3": "skipped"}, states
    assert node2.served_fingerprint() not in (own, before["node2"])  # this CA's, new
    writes_work(node2, "https", cluster.ca_pem)

    # Review s70 drift M2: node2's agent loses its data dir (a disk replaced) and is enrolled
    # again (`nodes remove`, a new token) while its server goes on serving https. The removal
    # revoked the certificate served; the agent planned from its (new, empty) journal, not
    # from what the server runs: rotate-cert halted ("not on https here") and showed node2
    # rolled_back. Now the plan starts from the server's config: node2 gets a new certificate.
    agent = node2.agent
    assert agent is not None
    agent.stop()
    removal = cluster.cli("nodes", "remove", "node2", "--yes")
    assert removal.returncode == 0, (removal.stdout, removal.stderr)
    shutil.rmtree(agent.data_dir)
    agent.write_config({"leader": {"join_token": cluster.create_token("node2", node2.address)}})
    agent.start()
    cluster.wait_for_nodes_online(["node2"], timeout=30)
    revoked = node2.served_fingerprint()
    # Its password's digest is the one its config names at once: it was empty until its first
    # change, its journal holding no live verifier (session 71, reenrol).
    assert live(node2).verifier_digest == digests["node2"]
    plan = cluster.cli("plan", "--nodes", "node2", "--change", "rotate-cert")
    assert plan.returncode == 0, (plan.stdout, plan.stderr)
    rotate = cluster.cli(
        "rollout", "start", "--nodes", "node2", "--change", "rotate-cert", "--yes", "--wait"
    )
    assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
    states = {n["name"]: n["state"] for n in newest(cluster)["nodes"]}
    assert states == {"node2": "done"}, states
    assert node2.served_fingerprint() != revoked
    assert live(node2).verifier_digest == digests["node2"]  # the password kept
    writes_work(node2, "https", cluster.ca_pem)
    # ... and its way back to http, which its journal holds no switch from http for (it
    # halted: "never switched from http to https"): the server's config set back to http,
    # every other setting kept, the https one kept beside it.
    https_config = node2.server.config_path.read_bytes()
    back = cluster.cli("rollout", "rollback", switched["id"], "--yes", "--wait")
    assert back.returncode == 0, (back.stdout, back.stderr)
    r = newest(cluster)
    assert r["change"] == "disable-tls", r
    assert {n["name"]: n["state"] for n in r["nodes"]}["node2"] == "done", r
    assert live(node2).schemes == ["http"]
    writes_work(node2, "http", cluster.ca_pem)
    # Only what the named rollout switched goes back: node1 and node3, which it skipped as
    # already done (an earlier rollout switched them), stay on https (review s70 reenrol).
    assert sorted(n["name"] for n in r["nodes"]) == ["node2"], r
    for other in (nodes[0], nodes[2]):
        assert live(other).schemes == ["https"], other.name
    (kept,) = node2.config_dir.glob(f"{node2.server.config_path.name}.before-rollback-*")
    assert kept.read_bytes() == https_config
    # Its reason says what happened: the http config written, the https one kept; not "the
    # config from before the switch is back", which no switch left (session 71, reenrol).
    (row,) = [n for n in r["nodes"] if n["name"] == "node2"]
    assert row["reason"] == (
        f"the https config it replaced is kept as {kept}; the server's config was set to http,"
        " every other setting kept (this agent's journal holds no switch to put back)"
    ), row


def hand_made_certificate(node: Node, directory: Path) -> str:
    """Start ``node``'s server by hand (stopped) on https with a self-signed certificate
    written to ``directory``, the rest of the config as tlsroll left it; its fingerprint."""
    issuer = byo_certs.make_ca("Praxis own")
    cert, key = byo_certs.leaf(issuer, [node.address])
    directory.mkdir()
    (directory / "own.pem").write_bytes(byo_certs.pem(cert))
    (directory / "own.key").write_bytes(byo_certs.key_pem(key))
    (directory / "own.key").chmod(0o600)
    config = tomllib.loads(node.server.config_path.read_text())
    config["server"].update(
        cert_file=str(directory / "own.pem"), key_file=str(directory / "own.key")
    )
    write_toml(node.server.config_path, config)
    node.server.spawn()
    node.server.wait_ready()
    return pki.fingerprint(cert)


def test_a_server_its_switch_restarts_is_not_reported_down(tmp_path: Path) -> None:
    """CI of session 54: a heartbeat that looked while a switch restarted the managed server
    reported it down (its admin socket gone with the old process): the leader logged
    ``node.server_down`` and showed it so until the next beat (an interval: 5 s by default),
    after a switch that went well. A beat now waits for a restart its own agent makes (at most
    ``RESTART_VIEW_WAIT``, 1.5 s), and says "restarting: ..." if it still runs then. Here the
    restart takes longer than both (the started server waits 2.7 s before its admin socket is
    up; the heartbeat interval is 1 s): a beat in its first 1.2 s says "restarting", one after
    waits and says "https"; none says "down" (before, every run found the warning and no
    "restarting")."""
    delay = {START_DELAY_ENV: "2.7"}
    pw = password_file(tmp_path, "pw", "a-password-for-a-slow-restart")
    with cluster_of(tmp_path, 1, node_env={"node1": delay}) as (cluster, _nodes):
        start = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--password-file", str(pw)), "--yes"
        )
        assert start.returncode == 0, (start.stdout, start.stderr)
        seen: set[str] = set()

        def restarting_or_down() -> bool:
            seen.add(str(cluster.list_nodes()["node1"].server))
            return any(s.startswith(("restarting: ", "down")) for s in seen)

        wait_until(restarting_or_down, 60, "node1's server shown restarting", 0.05)
        assert not any(s.startswith("down") for s in seen), seen
        r = wait_ended(cluster, "the switch")
        assert r["state"] == "completed", r
        wait_until(lambda: restarting_or_down() and "https" in seen, 15, "https", LEADER_POLL)
        assert not any(s.startswith("down") for s in seen), seen
        down = [e for e in cluster.leader.log_events() if e.get("event") == "node.server_down"]
        assert down == [], down
        nodes = json.loads(cluster.cli("nodes", "--json").stdout)
        assert [n.get("server") for n in nodes] == ["https"]
        # The switch's restart waited (the server its driver started says so).
        started = cluster.agents["node1"].data_dir / "refserver.log"
        assert "test_hook.start_delay" in started.read_text(errors="replace")


@pytest.mark.parametrize("freeze", ["node", "scope"])
def test_a_node_switched_shows_its_new_scheme_without_waiting_for_its_next_heartbeat(
    tmp_path: Path, freeze: str
) -> None:
    """Session 56's README walk: right after `rollout start --wait` said "completed",
    `tlsroll nodes` still showed the node's server on http, until its next heartbeat (an
    interval: 5 s by default). The agent beats at once when a transaction has ended
    (``Runner.on_end``, ``LeaderLink.beat_soon``), and, under ``--freeze scope``, when its
    freeze changed (Freeze, Unfreeze: review rev56d L1, "https frozen" for an interval after the
    rollout had completed). Here the agents beat every 30 s: the node must show https (not
    frozen) within a few seconds of the rollout's end, and http again after the way back
    (before, each waited for the interval)."""
    pw = password_file(tmp_path, "pw", "a-password-for-a-prompt-view")
    with cluster_of(tmp_path, 2, heartbeat_interval=30, agent_heartbeat_interval=30) as (
        cluster,
        nodes,
    ):

        def every(server: str) -> bool:
            shown = cluster.list_nodes()
            return all(shown[n.name].server == server for n in nodes)

        wait_until(lambda: every("http"), 30, "http", LEADER_POLL)
        start = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--password-file", str(pw)),
            *("--freeze", freeze, "--yes", "--wait"),
        )
        assert start.returncode == 0, (start.stdout, start.stderr)
        # (Within 10 s of the rollout's end: an interval is 30 s.)
        wait_until(lambda: every("https"), 10, "https, not frozen", LEADER_POLL)
        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, (back.stdout, back.stderr)
        assert wait_ended(cluster, "the way back")["state"] == "completed"
        wait_until(lambda: every("http"), 10, "http, not frozen", LEADER_POLL)
