"""``tlsroll rollout rollback`` is the emergency path: one node that cannot be reached must not
hold the others on https (review s45rt1 H1). A node whose agent is off is left as is, named
with what to do, in the plan, the prompt and the outcome; a node whose managed server is down
with its config on https is taken back (the agent restores http and starts the server); the
other changes stay as strict as they were. Real processes throughout (``cluster_of``)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

from tests.cluster import LEADER_POLL, Cluster, wait_until
from tests.nodeside import Node, cluster_of, port_holder
from tlsroll.defaults import HTTP_PORT

ENDED = ("completed", "halted", "aborted")
LEFT = "offline: left as is: run tlsroll rollout rollback again once its agent is back"


def password_file(tmp: Path) -> Path:
    path = tmp / "pw"
    path.touch(0o600)
    path.write_text("rollback-reach-test-password\n")
    return path


def wait_ended(cluster: Cluster, what: str) -> dict[str, Any]:
    wait_until(
        lambda: cluster.poll_newest_rollout()["state"] in ENDED, 120, what, interval=LEADER_POLL
    )
    return cluster.newest_rollout()


def switch(cluster: Cluster, tmp: Path, *how: str) -> None:
    """An enable-tls rollout (``how``: its options; default every node)."""
    how = how or ("--scope", "cluster")
    started = cluster.cli(
        "rollout", "start", "--password-file", str(password_file(tmp)), *how, "--yes"
    )
    assert started.returncode == 0, started.stderr


def states(rollout: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {n["name"]: (n["state"], n.get("reason", "")) for n in rollout["nodes"]}


def going(stdout: str) -> list[str]:
    found = re.search(r"^Back to http: (.*?)(?: \(each:.*)?\.$", stdout, re.M)
    assert found is not None, stdout
    return found[1].split(", ")


def kill_server(node: Node) -> None:
    pid = node.server_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


def seen_down(cluster: Cluster, name: str) -> None:
    """Wait until the leader sees node ``name``'s managed server down (its heartbeat)."""
    wait_until(
        lambda: str(cluster.list_nodes()[name].server).startswith("down"),
        30,
        f"{name} seen down",
        LEADER_POLL,
    )


def test_rollback_goes_ahead_past_an_offline_agent(tmp_path: Path) -> None:
    with cluster_of(tmp_path, 3, step_deadline=15) as (cluster, nodes):
        node1, node2, node3 = nodes
        switch(cluster, tmp_path)
        enabled = wait_ended(cluster, "the switch")
        assert enabled["state"] == "completed"
        assert node3.agent is not None
        node3.agent.stop()  # a switched-off machine
        cluster.wait_for_nodes(["node3"], online=False, timeout=40)

        # The prompt (shown before the terminal is asked for): only the nodes that go back,
        # and node3 named apart, with what to do.
        asked = cluster.cli("rollout", "rollback")
        assert asked.returncode == 2, asked.stderr  # not a terminal: nothing started
        assert going(asked.stdout) == ["node2", "node1"]
        assert f"  node3: {LEFT}" in asked.stdout.splitlines()

        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stderr  # was: exit 1, "offline: node3 (… --nodes)"
        assert f"(disable-tls, undoes {enabled['id']}) started" in back.stdout
        assert going(back.stdout) == ["node2", "node1"]
        assert f"  node3: {LEFT}" in back.stdout.splitlines()
        way_back = wait_ended(cluster, "the way back")
        assert way_back["state"] == "completed", way_back
        assert states(way_back) == {
            "node1": ("done", ""),
            "node2": ("done", ""),
            "node3": ("skipped", LEFT),
        }
        for node in (node1, node2):
            assert node.server.status()["listen"] == ["http"]
        assert node3.server.status()["listen"] == ["https"]  # untouched
        # The outcome does not claim every node is on http.
        status = cluster.cli("rollout", "status")
        assert status.returncode == 7, status.stderr  # completed without node3 (session 75: 0)
        assert (
            f"tlsroll: rollout {way_back['id']} left node3 as is (not known to be on http: see "
            "the reason above); run tlsroll rollout rollback again once its agent is back"
        ) in status.stderr
        # ... nor does the schema (review s45rev9 L3): its --json names node3 (`way_back` is
        # what it printed), its text says so beside "completed", as `rollout status` does.
        assert way_back["left_as_is"] == ["node3"]
        beside = f"rollout {way_back['id']}  completed, 1 node left as is: node3  change"
        assert beside in status.stdout
        shown = cluster.cli("schema", "show")
        assert shown.returncode == 0, shown.stderr
        assert beside in shown.stdout, shown.stdout

        # node3 back: that switch was taken back once; the refusal says what does go on.
        node3.restart_agent()
        cluster.wait_for_nodes(["node3"], timeout=40)
        again = cluster.cli("rollout", "rollback", enabled["id"], "--yes")
        assert again.returncode == 1
        assert "to take back every node on https now: tlsroll rollout rollback" in again.stderr
        rest = cluster.cli("rollout", "rollback", "--yes")
        assert rest.returncode == 0, rest.stderr
        # No "(disable-tls, undoes )" with nothing after it (review s45rt1 L2).
        assert re.search(r"^rollout \S+ \(disable-tls\) started;", rest.stdout, re.M), rest.stdout
        assert going(rest.stdout) == ["node3"]
        lines = rest.stdout.splitlines()
        assert "  node1: already on http" in lines and "  node2: already on http" in lines
        last = wait_ended(cluster, "node3's way back")
        assert last["state"] == "completed", last
        assert states(last)["node3"] == ("done", "")
        for node in nodes:
            status_of = node.server.status()
            assert status_of["listen"] == ["http"] and status_of["frozen"] is False


def test_rollback_with_every_node_out_of_reach_is_refused(tmp_path: Path) -> None:
    """Nothing to take back now: refused in one line naming why, nothing started (not
    "nothing to do: every node already runs what disable-tls wants")."""
    with cluster_of(tmp_path, 2, step_deadline=15) as (cluster, nodes):
        switch(cluster, tmp_path, "--nodes", "node2")  # node1 (the leader's) stays on http
        first = wait_ended(cluster, "the switch")
        assert first["state"] == "completed"
        assert nodes[1].agent is not None
        nodes[1].agent.stop()
        cluster.wait_for_nodes(["node2"], online=False, timeout=40)
        refused = cluster.cli("rollout", "rollback", "--yes")
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            "tlsroll: error: disable-tls has no node to take back now: node2 (offline); on http "
            "already: node1; nothing was changed: run tlsroll rollout rollback again once it "
            "is back"
        )
        assert cluster.newest_rollout()["id"] == first["id"]


def test_rollback_takes_back_a_node_whose_server_is_down(tmp_path: Path) -> None:
    with cluster_of(tmp_path, 2, step_deadline=15) as (cluster, nodes):
        node2 = nodes[1]
        switch(cluster, tmp_path)
        assert wait_ended(cluster, "the switch")["state"] == "completed"
        kill_server(node2)  # down, its config on https
        seen_down(cluster, "node2")
        # Every other change is as strict as before: refused, naming the server.
        rotate = cluster.cli("rollout", "start", "--scope", "cluster", "--change", "rotate-cert")
        assert rotate.returncode == 1
        assert "cannot tell what node2 runs: its agent answers, its managed server does not " in (
            rotate.stderr
        )

        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stderr  # was: exit 1, "cannot ask the agent of node2"
        assert going(back.stdout) == ["node2", "node1"]
        way_back = wait_ended(cluster, "the way back")
        assert way_back["state"] == "completed", way_back
        assert states(way_back) == {"node1": ("done", ""), "node2": ("done", "")}
        for node in nodes:
            status = node.server.status()  # node2's server started again, on http
            assert status["listen"] == ["http"] and status["frozen"] is False
        assert node2.post("http", {"after": "the way back"}).status == 201


def test_rollback_skips_a_down_server_whose_config_serves_http(tmp_path: Path) -> None:
    """Review s45rev9 L2: node2's server is down, its config on http (its agent says so): the
    way back said "cannot tell what it runs" and left it as is. It is on http already: the
    prompt and the record say so, and the way back that took node1 back is complete."""
    with cluster_of(tmp_path, 2, step_deadline=15) as (cluster, nodes):
        node1, node2 = nodes
        switch(cluster, tmp_path, "--scope", "nodes", "--nodes", "node1")
        assert wait_ended(cluster, "the switch")["state"] == "completed"
        kill_server(node2)  # down, its config on http
        seen_down(cluster, "node2")
        down = "down, its config serves http: nothing to take back"
        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stderr
        assert going(back.stdout) == ["node1"]
        assert f"  node2: {down}" in back.stdout.splitlines(), back.stdout
        way_back = wait_ended(cluster, "the way back")
        assert way_back["state"] == "completed", way_back
        assert states(way_back) == {"node1": ("done", ""), "node2": ("skipped", down)}
        assert way_back["left_as_is"] == []
        assert node1.server.status()["listen"] == ["http"]
        assert not node2.port_open(8080)  # not started again: nothing was done to it


def phase_1_awaiting(cluster: Cluster, tmp_path: Path) -> str:
    """A transitional phase 1 of the whole cluster, run until it awaits its finalize: its id."""
    switch(cluster, tmp_path, "--scope", "cluster", "--strategy", "transitional")
    wait_until(
        lambda: cluster.poll_newest_rollout()["state"] == "awaiting_finalize",
        120,
        "phase 1",
        LEADER_POLL,
    )
    return str(cluster.poll_newest_rollout()["id"])


def test_finalize_refused_for_a_node_put_back_by_hand_names_the_next_step(tmp_path: Path) -> None:
    with cluster_of(tmp_path, 2, step_deadline=15) as (cluster, nodes):
        node2 = nodes[1]
        phase1 = phase_1_awaiting(cluster, tmp_path)
        kill_server(node2)  # put back on http by hand
        wait_until(
            lambda: not node2.port_open(8443) and not node2.port_open(8080), 10, "node2 down"
        )
        node2.server.write_config()
        node2.server.start()
        wait_until(
            lambda: str(cluster.list_nodes()["node2"].server) == "http", 30, "node2 http",
            LEADER_POLL,
        )  # fmt: skip
        refused = cluster.cli("rollout", "finalize", phase1, "--force", "--yes")
        assert refused.returncode == 1
        assert (
            "finalize cannot start on node2: it serves http only: finalize closes http on a dual "
            f"node; take phase 1 back with tlsroll rollout rollback {phase1}, or make the node "
            "dual again"
        ) in refused.stderr


def test_a_phase_1_taken_back_names_the_node_the_way_back_left_dual(tmp_path: Path) -> None:
    """Review s45rev9 M1: a transitional phase 1 taken back by a way back that left a node as is
    (its agent off) was noted "taken_back by rollout W" alone, and `rollout status PHASE1`
    advised `rollout retry`, while that node still served http and https. The note names the
    node and the way on, which works once the agent is back."""
    with cluster_of(tmp_path, 3, step_deadline=15) as (cluster, nodes):
        node3 = nodes[2]
        phase1 = phase_1_awaiting(cluster, tmp_path)
        assert node3.agent is not None
        node3.agent.stop()
        cluster.wait_for_nodes(["node3"], online=False, timeout=40)
        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stderr
        way_back = wait_ended(cluster, "the way back")
        assert states(way_back)["node3"] == ("skipped", LEFT)
        wait_until(
            lambda: cluster.schema_json(phase1)["rollouts"][0]["state"] == "aborted",
            30,
            "phase 1 taken back",
            LEADER_POLL,
        )
        note = cluster.schema_json(phase1)["rollouts"][0]["reason"]
        assert note == (
            f"taken back by rollout {way_back['id']}; node3 left dual: run tlsroll rollout "
            "rollback once its agent is back"
        ), note
        assert node3.server.status()["listen"] == ["http", "https"]  # so it is
        status = cluster.cli("rollout", "status", phase1)
        assert status.returncode == 3, status.stderr
        assert "rollout retry" not in status.stderr  # would not take node3 back
        assert status.stderr == (
            f"tlsroll: rollout {phase1} aborted: taken back, but not every node is back on "
            "http: node3 left dual: run tlsroll rollout rollback once its agent is back\n"
        ), status.stderr
        # The way on it names works.
        node3.start_agent_heard()
        again = cluster.cli("rollout", "rollback", "--yes")
        assert again.returncode == 0, again.stderr
        assert wait_ended(cluster, "the second way back")["state"] == "completed"
        assert node3.server.status()["listen"] == ["http"]


def test_a_halted_way_back_names_the_way_out(tmp_path: Path) -> None:
    """Review s45rev9 M2: a down server that cannot start on http (its port held) fails its way
    back, and halts it for the nodes after it, every time; the halt named only `rollout retry`,
    which fails the same way. It names the way out, and that way out takes the others back."""
    with cluster_of(tmp_path, 3, step_deadline=15) as (cluster, nodes):
        node2 = nodes[1]
        switch(cluster, tmp_path)
        assert wait_ended(cluster, "the switch")["state"] == "completed"
        kill_server(node2)
        with port_holder(node2.address, HTTP_PORT):
            seen_down(cluster, "node2")
            back = cluster.cli("rollout", "rollback", "--yes")
            assert back.returncode == 0, back.stderr
            way_back = wait_ended(cluster, "the way back")
            assert way_back["state"] == "halted", way_back
            assert way_back["reason"].endswith(
                "; next: node2: stop its agent (systemctl stop tlsroll-agent on it) so that the "
                "next way back leaves it as is, or fix what failed it (a port held: free it); "
                "then tlsroll rollout rollback again"
            ), way_back["reason"]
            status = cluster.cli("rollout", "status")
            assert status.returncode == 4, status.stderr  # node2 needs attention
            assert status.stderr.rstrip().endswith(
                "; to take the other nodes back meanwhile: see the rollout's note above"
            ), status.stderr
            # The way out it names: node2's agent stopped, the next way back takes the rest.
            assert node2.agent is not None
            node2.agent.stop()
            cluster.wait_for_nodes(["node2"], online=False, timeout=40)
            again = cluster.cli("rollout", "rollback", "--yes")
            assert again.returncode == 0, again.stderr
            way_back = wait_ended(cluster, "the second way back")
            assert way_back["state"] == "completed", way_back
            assert states(way_back)["node2"] == ("skipped", LEFT)
            for node in (nodes[0], nodes[2]):
                assert node.server.status()["listen"] == ["http"]


def test_plan_says_start_the_server_where_the_agent_answers_and_its_server_does_not(
    tmp_path: Path,
) -> None:
    """Review s46rt2 L4: node2's agent online, its managed server down: `tlsroll plan` said
    "cannot ask the agent of node2 what it runs (...); bring the agent up or leave the node
    out", of an agent that was up. Now it says what is down and what to do. Session 68: it
    said so twice over, "(node2: the managed server: managed server not answering on …)": the
    managed server is named once, the agent's words after the node's name."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        kill_server(nodes[1])
        seen_down(cluster, "node2")
        plan = cluster.cli("plan", "--scope", "cluster")
        assert plan.returncode == 1, plan.stdout
        assert re.fullmatch(
            r"tlsroll: error: cannot tell what node2 runs: its agent answers, its managed server"
            r" does not \(node2: not answering on [^\n]+\); start the server or leave the node"
            r" out \(--nodes\)\n",
            plan.stderr,
        ), plan.stderr
        assert plan.stderr.count("managed server") == 1, plan.stderr
        left_out = cluster.cli("plan", "--scope", "nodes", "--nodes", "node1")
        assert left_out.returncode == 0, left_out.stderr
