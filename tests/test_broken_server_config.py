"""Review rev58a H1: the managed server's config edited by hand into something that cannot be
read (not valid TOML) failed every heartbeat of the node's agent (the driver's ConfigError):
`tlsroll nodes` showed the node offline with its old scheme while its agent and server ran and
served, and `plan`/`rollout start` said to bring the agent up. Now the heartbeat says what is
wrong: the node stays online, its server column reads "down: its config cannot be read (…)",
and the plan names the file to fix. A real cluster: leader, agents and reference servers as
processes, real mutual TLS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import wait_until
from tests.nodeside import cluster_of

pytestmark = pytest.mark.timeout(180)


def _node(cluster: Any, name: str) -> dict[str, Any]:
    shown = cluster.cli("nodes", "--json")
    assert shown.returncode == 0, shown.stderr
    (row,) = [n for n in json.loads(shown.stdout) if n["name"] == name]
    return dict(row)


def test_a_server_config_that_cannot_be_read_is_said_not_taken_for_an_agent_down(
    tmp_path: Path,
) -> None:
    with cluster_of(tmp_path, 2) as (cluster, (_node1, node2)):
        config = node2.server.config_path
        good = config.read_bytes()
        config.write_bytes(good + b"\nthis is = = broken [\n")
        wait_until(
            lambda: str(_node(cluster, "node2").get("server", "")).startswith(
                "down: its config cannot be read"
            ),
            30,
            "node2's server column says its config cannot be read",
        )
        time.sleep(4)  # more than three heartbeat intervals (1 s here): it stays online
        row = _node(cluster, "node2")
        assert row.get("online") is True, row
        assert row["server"].startswith("down: its config cannot be read, fix the file"), row
        # What is wrong, before the file's path (the test's is long): the leader keeps 120
        # characters of a server down, and the path went first in them (review rev58c L6).
        assert "fix the file: not valid TOML" in row["server"], row
        assert node2.agent is not None and "Traceback" not in node2.agent.log_text()
        plan = cluster.cli("plan", "--scope", "cluster")
        said = plan.stdout + plan.stderr
        assert plan.returncode != 0, said
        assert "config cannot be read" in said and "fix the file" in said, said
        assert "fix the file: not valid TOML" in said, said  # (then the path, cut where long)
        assert "bring the agent up" not in said and "start the server" not in said, said
        # Fixed, the node is as before.
        config.write_bytes(good)
        wait_until(
            lambda: _node(cluster, "node2").get("server") == "http", 30, "node2 back to http"
        )
