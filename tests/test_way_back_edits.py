"""The way back to http (``tlsroll rollout rollback``) and a server config edited by hand since
the switch (review rev58a H2). The way back puts back the config from before the switch byte
for byte, the one known to run on http, so the edit is undone: never silently. Its plan names
each node whose config is no longer what tlsroll wrote, and the agent keeps the edited file
beside the config (``NAME.before-rollback-ID``) before it replaces it. Real processes
throughout."""

from __future__ import annotations

import json
import os
import signal
import tomllib
from pathlib import Path
from typing import Any

from nodeagent.transaction import CRASH_ENV
from tests.cluster import LEADER_POLL, wait_until
from tests.nodeside import cluster_of
from tests.procs import alive
from tests.refserver_helper import http_request
from tlsroll import features

EDITED = "was edited since tlsroll wrote it"


def test_the_way_back_says_first_it_undoes_a_config_edited_by_hand_and_keeps_that_file(
    tmp_path: Path,
) -> None:
    # node3's agent reports what one of a release before session 59 does (the features of
    # session 64 on imply the one that says it looks and keeps: ``features.IMPLIED_BY``): it
    # neither says whether its config was edited nor keeps such a file (review s70 compat: the
    # plan said nothing of it, as of a node not edited). What it does is this release's.
    later = {features.EDITED_CONFIG, features.HELD_CRL, features.SWITCH_QUIET}
    earlier = [f for f in features.AGENT_FEATURES if f not in later]
    node_env = {"node3": {features.TEST_ENV: ",".join(earlier)}}
    with cluster_of(tmp_path, 3, node_env=node_env) as (cluster, nodes):
        configs = {n.name: n.server.config_path for n in nodes}
        on_http = {name: path.read_bytes() for name, path in configs.items()}

        def newest() -> dict[str, Any]:
            data = json.loads(cluster.cli("schema", "show", "--json").stdout)
            rollout: dict[str, Any] = data["rollouts"][0]
            return rollout

        def ended() -> bool:
            return cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted")

        pw = tmp_path / "pw"
        pw.touch(0o600)
        pw.write_text("way-back-edits-password\n")
        start = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"
        )
        assert start.returncode == 0, start.stderr
        wait_until(ended, 90, "the switch", interval=LEADER_POLL)
        switch = newest()
        assert switch["state"] == "completed", switch

        # node2's config edited by hand since the switch: a harmless setting of the reference
        # server (how long a login waits for the checks before it, 30 s by default).
        config = configs["node2"]
        switched = config.read_bytes()
        assert "login_queue_seconds" not in tomllib.loads(switched.decode())["server"]
        edited = switched.replace(b"[server]\n", b"[server]\nlogin_queue_seconds = 20\n", 1)
        assert edited != switched
        config.write_bytes(edited)
        assert tomllib.loads(edited.decode())["server"]["login_queue_seconds"] == 20
        assert config.stat().st_mode & 0o777 == 0o600  # the switch's mode, kept by the edit

        # The way back's plan, shown before it asks, names node2 in one line, and no other
        # node (off a terminal it then refuses to ask: nothing started).
        asked = cluster.cli("rollout", "rollback")
        assert asked.returncode == 2, asked.stdout + asked.stderr
        assert "not a terminal" in asked.stderr, asked.stderr
        said = [line for line in asked.stdout.splitlines() if EDITED in line]
        assert len(said) == 2, asked.stdout
        assert said[0].startswith(f"  ! node2: its server config {config} "), asked.stdout
        assert "undoes those edits" in said[0], asked.stdout
        assert f"kept as {config}.before-rollback-" in said[0], asked.stdout
        # node3's agent cannot say: an edit there would be lost, with no copy kept.
        assert said[1].startswith(
            "  ! node3: its agent is of an earlier release that may not say whether its"
            " server config was edited"
        ), asked.stdout
        assert "keeps no copy, so an edit made there since would be lost" in said[1], said
        # tlsroll nodes marks that agent as lacking it.
        listed = cluster.cli("nodes", "--json")
        assert listed.returncode == 0, listed.stderr
        by_name = {n["name"]: n for n in json.loads(listed.stdout)}
        too_old_for = by_name["node3"]["agent_too_old_for"]
        assert "keeping a server config edited by hand on the way back" in too_old_for
        assert not by_name["node2"].get("agent_too_old_for"), by_name["node2"]
        assert newest()["id"] == switch["id"]  # nothing started

        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stdout + back.stderr
        wait_until(ended, 90, "the way back", interval=LEADER_POLL)
        r = newest()
        assert r["change"] == "disable-tls" and r["state"] == "completed", r
        kept = config.with_name(f"{config.name}.before-rollback-{r['id']}")

        # The edited file is kept as it was, as private as the config; the config from before
        # the switch is back on every node, and each server serves http.
        assert kept.read_bytes() == edited
        assert kept.stat().st_mode & 0o777 == config.stat().st_mode & 0o777
        assert (kept.stat().st_uid, kept.stat().st_gid) == (
            config.stat().st_uid,
            config.stat().st_gid,
        )
        for node in nodes:
            assert configs[node.name].read_bytes() == on_http[node.name], node.name
            assert node.server.status()["listen"] == ["http"]
            assert http_request("POST", f"{node.http_url()}entries", {"n": 1}).status == 201
            beside = sorted(p.name for p in node.config_dir.glob("*.before-rollback-*"))
            assert beside == ([kept.name] if node.name == "node2" else []), beside

        # The node's outcome says where the edited file is; the others say nothing.
        reasons = {n["name"]: n["reason"] for n in r["nodes"]}
        assert [n["state"] for n in r["nodes"]] == ["done"] * 3, r
        assert f"kept as {kept}" in reasons["node2"], reasons
        assert reasons["node1"] == reasons["node3"] == "", reasons
        status = cluster.cli("rollout", "status", r["id"])
        assert status.returncode == 0, status.stderr
        assert "the config as edited since the" in status.stdout, status.stdout  # (wrapped)
        # The agent logged it (the path, never the file's content).
        agent = nodes[1].agent
        assert agent is not None
        logged = [ln for ln in agent.log_text().splitlines() if "rollback.kept_edited_config" in ln]
        assert len(logged) == 1 and str(kept) in logged[0], logged
        assert "login_queue_seconds" not in agent.log_text()


def test_the_leaders_own_rollback_after_a_failed_confirm_names_the_config_it_kept(
    tmp_path: Path,
) -> None:
    """Review of s59 L2: the rollback the leader starts by itself when a switch's confirm
    fails (not the admin's way back) is the same plan (``plans.rollback_plan``): a config
    edited since the switch wrote it is kept beside it as ``NAME.before-rollback-ID``. The
    node's reason said only "outside check failed: …"; it names the copy now, as the way
    back's does. The edit comes where a real one can: the leader down between the switch
    and its confirm (its agent died mid-switch and carried the switch on from its journal),
    an admin edits the config, and the server dies (the confirm's outside check fails)."""
    with cluster_of(tmp_path, 1, node_env={"node1": {CRASH_ENV: "frozen"}}) as (cluster, nodes):
        [node] = nodes
        agent = node.agent
        assert agent is not None and agent.proc is not None
        config = node.server.config_path
        on_http = config.read_bytes()
        pw = tmp_path / "pw"
        pw.touch(0o600)
        pw.write_text("confirm-rollback-password\n")
        start = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"
        )
        assert start.returncode == 0, start.stderr
        agent.proc.wait(90)  # (dies with its server frozen, mid-switch: CRASH_ENV)
        [txn] = node.journal_query("SELECT rollout_id, kind, phase, outcome FROM txns")
        assert (txn["kind"], txn["phase"], txn["outcome"]) == ("switch", "frozen", ""), txn
        rid = txn["rollout_id"]

        # The leader down; the agent started again carries the switch on by itself.
        cluster.stop_leader()
        node.restart_agent()
        wait_until(
            lambda: node.journal_query("SELECT outcome FROM txns")[0]["outcome"] == "completed",
            60,
            "the switch carried on",
        )
        switched = config.read_bytes()
        edited = switched.replace(b"[server]\n", b"[server]\nlogin_queue_seconds = 20\n", 1)
        assert edited != switched
        config.write_bytes(edited)
        pid = node.server_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid) and not node.port_open(8443), 10, "the server killed")

        # The leader back: the confirm's outside check fails, and the leader rolls back.
        cluster.start_leader()
        wait_until(
            lambda: cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted"),
            90,
            "the rollout to end",
            interval=LEADER_POLL,
        )
        shown = json.loads(cluster.cli("schema", "show", "--json").stdout)["rollouts"][0]
        assert shown["id"] == rid and shown["state"] == "halted", shown
        [row] = shown["nodes"]
        kept = config.with_name(f"{config.name}.before-rollback-{rid}")
        assert row["state"] == "rolled_back", row
        assert row["reason"].startswith("outside check failed: "), row
        assert f"the config as edited since the switch is kept as {kept}" in row["reason"], row
        assert kept.read_bytes() == edited
        assert config.read_bytes() == on_http
        assert http_request("POST", f"{node.http_url()}entries", {"n": 1}).status == 201
        status = cluster.cli("rollout", "status", rid)
        assert "the config as edited since the" in status.stdout, status.stdout  # (wrapped)
        assert "login_queue_seconds" not in (agent.log_text() + cluster.leader.log_text())
