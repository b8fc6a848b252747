"""Review s64 M2 end to end: the auth password in use is the one the cluster's nodes were
switched to even when those nodes cannot be asked now. Enable-tls of a new node while the
nodes already on https are offline took a second password (the leader saw none in use), and
every workstation set up with the first one failed at the new node. Real leader, agents and
reference servers on loopback addresses, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cluster import one_line_error
from tests.test_backup import backup, restore
from tests.test_password_rollout import PW1, PW2, World, secret_file

PW3 = "third-password-m4tv-8jrc"


def test_a_new_password_is_refused_while_the_nodes_on_one_are_offline(tmp_path: Path) -> None:
    w = World(tmp_path, nodes=3)
    try:
        w.start()
        pw1 = secret_file(tmp_path / "pw1", PW1)
        pw2 = secret_file(tmp_path / "pw2", PW2)
        first = w.cli(
            "rollout", "start", "--nodes", "node1,node2", "--password-file", str(pw1), "--yes",
            "--wait",
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        # Both nodes on https with password 1 go offline (a repair, a machine switched off).
        for node in w.nodes[:2]:
            assert node.agent is not None
            node.agent.stop()
        w.cluster.wait_for_nodes(["node1", "node2"], online=False, timeout=60)
        before = w.cluster.store_rows(("auth_versions", "rollouts"))

        # A new password for node3 is refused, naming the nodes and the ways out; nothing is
        # written (it exited 0 and made password version 2 for node3 alone).
        refused = w.cli(
            "rollout", "start", "--nodes", "node3", "--password-file", str(pw2), "--yes",
            "--wait",
        )  # fmt: skip
        assert refused.returncode == 1, refused.stdout + refused.stderr
        line = one_line_error(refused.stderr, "tlsroll")
        assert "cannot confirm the auth password in use: node1, node2 offline" in line, line
        assert "(recorded on password version 1)" in line, line
        assert "start them and try again, or leave out --password-file" in line, line
        assert line.endswith("nothing was started"), line
        assert w.cluster.store_rows(("auth_versions", "rollouts")) == before

        # The plan says which password node3 gets: the one the offline nodes were switched to.
        plan = w.cli("plan", "--nodes", "node3")
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert "the one the nodes already use (version 1)" in plan.stdout, plan.stdout
        assert "cannot confirm the auth password in use: node1, node2" in plan.stdout

        # node2's machine lost: its agent cut off (its certificate revoked). Its record no
        # longer speaks for the password in use ("start them" is no way on for it: review b2
        # of s64, L4a); node1's still does.
        listed = json.loads(w.cli("nodes", "--json").stdout)
        (serial,) = [n["cert_serial"] for n in listed if n["name"] == "node2"]
        assert w.cli("ca", "revoke", serial).returncode == 0
        again = w.cli(
            "rollout", "start", "--nodes", "node3", "--password-file", str(pw2), "--yes",
        )  # fmt: skip
        assert again.returncode == 1, again.stdout + again.stderr
        line = one_line_error(again.stderr, "tlsroll")
        assert "cannot confirm the auth password in use: node1 offline" in line, line

        # Without a password of its own the start gives node3 password 1: a workstation set up
        # with it connects there.
        started = w.cli("rollout", "start", "--nodes", "node3", "--yes", "--wait")
        assert started.returncode == 0, started.stdout + started.stderr
        latest = w.schema()["rollouts"][0]
        assert latest["state"] == "completed" and latest["auth_version"] == 1, latest
        pc = w.test_connection(w.nodes[2].https_url(), pw1, tmp_path / "ws-node3")
        assert pc.returncode == 0, pc.stdout + pc.stderr
        assert PW1 not in w.cluster.logs_text() + "".join(w.outputs)
        assert PW2 not in w.cluster.logs_text() + "".join(w.outputs)
    finally:
        w.close()


def test_a_password_the_restored_store_does_not_know_refuses_enable_tls(tmp_path: Path) -> None:
    """The leader's store restored from a backup older than a change-password rollout: the
    nodes on https run a password it does not know. Enable-tls of a new node took a new one
    (or, without a file, asked for one): a second password again. Now refused, either way,
    with the way out, which then works: a password set and a change-password rollout give the
    nodes a known one, and the new node gets it."""
    w = World(tmp_path, nodes=3)
    try:
        w.start()
        pw1 = secret_file(tmp_path / "pw1", PW1)
        pw2 = secret_file(tmp_path / "pw2", PW2)
        pw3 = secret_file(tmp_path / "pw3", PW3)
        first = w.cli(
            "rollout", "start", "--nodes", "node1,node2", "--password-file", str(pw1), "--yes",
            "--wait",
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        made = backup(w.cluster, tmp_path / "backup")
        assert made.returncode == 0, made.stderr
        assert w.cli("password", "set", "--password-file", str(pw2)).returncode == 0
        changed = w.cli(
            "rollout", "start", "--nodes", "node1,node2", "--change", "change-password", "--yes",
            "--wait",
        )  # fmt: skip
        assert changed.returncode == 0, changed.stderr
        restore(w.cluster, tmp_path / "backup", w.cluster.passphrase_path.read_bytes())
        w.cluster.start_leader()
        w.cluster.wait_for_nodes_online(["node1", "node2", "node3"])
        before = w.cluster.store_rows(("auth_versions", "rollouts"))

        for with_file in (["--password-file", str(pw3)], []):
            refused = w.cli("rollout", "start", "--nodes", "node3", *with_file, "--yes")
            assert refused.returncode == 1, refused.stdout + refused.stderr
            line = one_line_error(refused.stderr, "tlsroll")
            assert (
                "cannot confirm the auth password in use: node1, node2 run one this leader "
                "does not know" in line
            ), line
            assert (
                "tlsroll password set, then tlsroll rollout start --change change-password" in line
            )
            assert w.cluster.store_rows(("auth_versions", "rollouts")) == before

        # The way out, as the refusal says.
        assert w.cli("password", "set", "--password-file", str(pw3)).returncode == 0
        known = w.cli(
            "rollout", "start", "--nodes", "node1,node2", "--change", "change-password", "--yes",
            "--wait",
        )  # fmt: skip
        assert known.returncode == 0, known.stdout + known.stderr
        third = w.cli("rollout", "start", "--nodes", "node3", "--yes", "--wait")
        assert third.returncode == 0, third.stdout + third.stderr
        for node in w.nodes:
            pc = w.test_connection(node.https_url(), pw3, tmp_path / f"ws-{node.name}")
            assert pc.returncode == 0, pc.stdout + pc.stderr
        said = w.cluster.logs_text() + "".join(w.outputs)
        assert PW1 not in said and PW2 not in said and PW3 not in said
    finally:
        w.close()


def test_plan_exits_1_when_the_password_in_use_refuses_any_start(tmp_path: Path) -> None:
    """Session 64's closing notes: `tlsroll plan` exited 0 while its `password_doubt` refused
    any start of it. The store restored from a backup older than a change-password of node2
    alone: node1 runs password 1, which the store knows, node2 password 2, which it does not.
    Any start of enable-tls is refused, also one without a password of its own (as the plan:
    it brings none), though a version (1) is known in use; `plan` says so as it says any
    refusal of a start (exit 1, one line on stderr), and the start refuses before it asks.
    Nodes on a known password that only cannot be asked leave exit 0 (the first test): a
    start without a password of its own goes ahead there."""
    w = World(tmp_path, nodes=3)
    try:
        w.start()
        pw1 = secret_file(tmp_path / "pw1", PW1)
        pw2 = secret_file(tmp_path / "pw2", PW2)
        first = w.cli(
            "rollout", "start", "--nodes", "node1,node2", "--password-file", str(pw1), "--yes",
            "--wait",
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        made = backup(w.cluster, tmp_path / "backup")
        assert made.returncode == 0, made.stderr
        assert w.cli("password", "set", "--password-file", str(pw2)).returncode == 0
        changed = w.cli(
            "rollout", "start", "--nodes", "node2", "--change", "change-password", "--yes",
            "--wait",
        )  # fmt: skip
        assert changed.returncode == 0, changed.stderr
        restore(w.cluster, tmp_path / "backup", w.cluster.passphrase_path.read_bytes())
        w.cluster.start_leader()
        w.cluster.wait_for_nodes_online(["node1", "node2", "node3"])
        before = w.cluster.store_rows(("auth_versions", "rollouts"))

        doubt = "cannot confirm the auth password in use: node2 run one this leader does not know"
        plan = w.cli("plan", "--nodes", "node3")
        assert plan.returncode == 1, plan.stdout + plan.stderr
        assert "the one the nodes already use (version 1)" in plan.stdout, plan.stdout
        assert doubt in plan.stdout, plan.stdout
        line = one_line_error(plan.stderr, "tlsroll")
        assert doubt in line and line.endswith("nothing was changed"), line
        as_json = w.cli("plan", "--nodes", "node3", "--json")
        assert as_json.returncode == 1, as_json.stdout + as_json.stderr
        assert json.loads(as_json.stdout)["password_doubt_refuses"] is True
        # What the start then does: refused with the same words, before it asks.
        started = w.cli("rollout", "start", "--nodes", "node3")
        assert started.returncode == 1, started.stdout + started.stderr
        line = one_line_error(started.stderr, "tlsroll")
        assert doubt in line and line.endswith("nothing was started"), line
        assert w.cluster.store_rows(("auth_versions", "rollouts")) == before
    finally:
        w.close()
