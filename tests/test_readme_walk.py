"""Session 68's README walk (an admin following README "On real servers" and "Back to http"
on loopback): what it found in the commands themselves, with a real leader, agent and
reference server.

- `tlsroll nodes` on a new cluster (README step 5) drew an empty table: not a word that no
  node is enrolled, nor of how to enrol one.
- `tlsroll rollout rollback` was the one command that starts a rollout without `--wait`
  (`start`, `retry` and `finalize` have it): a script that took the nodes back to http could
  learn the outcome only by polling `rollout status`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.conftest import next_loopback
from tests.nodeside import Node, cluster_of
from tests.test_going_back import enable_tls


@pytest.fixture
def one(tmp_path: Path) -> Iterator[tuple[Cluster, Node]]:
    with cluster_of(tmp_path, 1) as (cluster, nodes):
        yield cluster, nodes[0]


def test_rollback_waits_for_the_way_back_and_exits_with_its_outcome(
    one: tuple[Cluster, Node], tmp_path: Path
) -> None:
    cluster, _node = one
    switched = enable_tls(cluster, tmp_path)
    assert switched["state"] == "completed", switched

    back = cluster.cli("rollout", "rollback", "--yes", "--wait", timeout=120)

    assert back.returncode == 0, back.stderr
    # The way back has ended when the command returns: its status table, as `rollout status`.
    assert "disable-tls" in back.stdout and "completed" in back.stdout, back.stdout
    newest = cluster.newest_rollout()
    assert newest["change"] == "disable-tls" and newest["state"] == "completed", newest
    assert [n["state"] for n in newest["nodes"]] == ["done"], newest["nodes"]


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Cluster]:
    """A leader, just started (README step 5), no node enrolled yet."""
    with Cluster(tmp_path / "bare", next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def test_nodes_of_a_new_cluster_says_how_to_enrol_one(bare: Cluster) -> None:
    """README step 5: "`tlsroll nodes` now answers". It answered with an empty table, which
    said neither that no node is enrolled nor how to enrol one."""
    listed = bare.cli("nodes")

    assert listed.returncode == 0, listed.stderr
    assert "no nodes enrolled" in listed.stdout, listed.stdout
    assert "tlsroll token create --node NAME --address IP --print-join-command" in " ".join(
        listed.stdout.split()
    ), listed.stdout
    # The JSON stays what scripts read: an empty list.
    as_json = bare.cli("nodes", "--json")
    assert as_json.returncode == 0 and as_json.stdout.strip() == "[]", as_json.stdout
