"""Review s64 M2 end to end: the auth password in use is the one the cluster's nodes were
switched to even when those nodes cannot be asked now. Enable-tls of a new node while the
nodes already on https are offline took a second password (the leader saw none in use), and
every workstation set up with the first one failed at the new node. Real leader, agents and
reference servers on loopback addresses, the real CLI."""

from __future__ import annotations

from pathlib import Path

from tests.cluster import one_line_error
from tests.test_password_rollout import PW1, PW2, World, secret_file


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
