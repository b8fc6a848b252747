"""``tlsroll rollout rollback``: the way back (change ``disable-tls``). The nodes an enable-tls
rollout switched go back to http the same safe way; entries written on https stay; the
bootstrap service closes; nothing else is touched. Real processes throughout."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

from tests.cluster import LEADER_POLL, AdminTokenCluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, start_nodes
from tests.refserver_helper import http_request
from tests.test_viewer import fetch, session_for
from tlsroll import tls


def port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def test_rollback_puts_switched_nodes_back_on_http(tmp_path: Path) -> None:
    addresses = [next_loopback() for _ in range(2)]
    cluster = AdminTokenCluster(tmp_path / "cluster", addresses[0], heartbeat_interval=1)
    nodes = [Node(cluster, f"node{i + 1}", a, tmp_path / f"n{i}") for i, a in enumerate(addresses)]
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        start_nodes(nodes)
        cluster.wait_for_nodes_online([n.name for n in nodes])

        def newest() -> dict[str, Any]:
            data = json.loads(cluster.cli("schema", "show", "--json").stdout)
            rollout: dict[str, Any] = data["rollouts"][0]
            return rollout

        def newest_switch(switch: dict[str, Any]) -> list[dict[str, Any]]:
            shown = cluster.cli("schema", "show", "--rollout", switch["id"], "--json")
            data = json.loads(shown.stdout)
            rows: list[dict[str, Any]] = data["rollouts"][0]["nodes"]
            return rows

        def ended() -> bool:  # looked at from this process: Cluster.poll_newest_rollout
            return cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted")

        # Nothing to take back yet: a one-line refusal, nothing created.
        refused = cluster.cli("rollout", "rollback", "--yes")
        assert refused.returncode == 1
        assert "no enable-tls rollout to take back" in refused.stderr

        pw = tmp_path / "pw"
        pw.touch(0o600)
        pw.write_text("way-back-test-password\n")
        start = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"
        )
        assert start.returncode == 0, start.stderr
        wait_until(ended, 90, "the switch", interval=LEADER_POLL)
        switch = newest()
        assert switch["state"] == "completed"

        ca = tls.client_context(cluster.ca_pem)
        written = {}
        for node in nodes:
            resp = http_request("POST", f"{node.https_url()}entries", {"n": node.name}, context=ca)
            assert resp.status == 201
            written[node.name] = resp.json()["id"]
            assert port_open(node.address, 9443)  # bootstrap open while on https

        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stderr
        # --yes shows no plan: the nodes going back are named all the same (every node on
        # https, whichever rollout switched it), and what the workstations must do
        going = re.search(r"^Back to http: (.*)\.$", back.stdout, re.M)
        assert going is not None and set(going[1].split(", ")) == {"node1", "node2"}, back.stdout
        assert "go back to the old http address" in back.stdout
        wait_until(ended, 90, "the way back", interval=LEADER_POLL)
        r = newest()
        assert r["change"] == "disable-tls" and r["undoes"] == switch["id"]
        assert r["state"] == "completed", r
        assert [n["state"] for n in r["nodes"]] == ["done", "done"]
        assert int(r["epoch"]) > int(switch["epoch"])
        for node in nodes:
            assert node.server.status()["listen"] == ["http"]
            assert node.server.status()["frozen"] is False
            assert not port_open(node.address, 8443)
            assert not port_open(node.address, 9443)  # no bootstrap on http
            entry = http_request("GET", f"{node.http_url()}entries/{written[node.name]}")
            assert entry.status == 200  # what was written on https is still there
            assert http_request("POST", f"{node.http_url()}entries", {"n": 1}).status == 201
        for n in r["nodes"]:
            assert not n["password_pending"]
        # Each row's addresses go the rollback's way, https to http, in every view (review
        # s45rt2 M2: "new address https://…:8443" for a node that serves http only): `schema
        # show`, `rollout status` and the viewer's page. The switch's rows stay http to https.
        urls = {n.name: (n.https_url(), n.http_url()) for n in nodes}
        assert {n["name"]: (n["old_url"], n["new_url"]) for n in r["nodes"]} == urls, r
        assert {n["name"]: (n["new_url"], n["old_url"]) for n in newest_switch(switch)} == urls
        status = cluster.cli("rollout", "status", r["id"])
        assert status.returncode == 0, status.stderr
        for node in nodes:
            (row,) = [x for x in status.stdout.splitlines() if node.https_url() in x]
            old, new = urls[node.name]
            assert row.index(old) < row.index(new), row  # the old address, then the new one
        page = fetch(cluster, f"/rollouts/{r['id']}", cookie=session_for(cluster, "m2")).body
        for node in nodes:
            row = page.split(f'id="node-{node.name}"', 1)[1].split("</tr>", 1)[0]
            cells = re.findall(r'<td class="url" data-label="[^"]*">([^<]*)</td>', row)
            assert cells == list(urls[node.name]), row

        # The same switch is taken back once: a second rollback is refused with the first's id
        # and state (it used to start and halt at preflight: "not on https"), nothing created.
        for again in (
            cluster.cli("rollout", "rollback", switch["id"], "--yes"),
            cluster.cli("rollout", "rollback", "--yes"),
        ):
            assert again.returncode == 1, again.stdout
            assert f"already taken back by rollout {r['id']} (completed)" in again.stderr
            assert len(again.stderr.strip().splitlines()) == 1
        assert newest()["id"] == r["id"]

        # Review s45rt2 M3: the password the switch applied is live on no node now, which is
        # not "never applied"; and whoever was given it needs a new one only if the new one is
        # another password (the CLI does not compare them: review s45rev8 M1, a comparison
        # through CheckPassword counted every different password as a wrong one checked).
        shown = cluster.cli("plan", "--scope", "cluster")
        assert shown.returncode == 0, shown.stderr
        assert "it replaces password version 1 (staged by " in shown.stdout, shown.stdout
        assert (
            "live on no node now): if it is another password, whoever was given" in shown.stdout
        ), shown.stdout
        assert "never applied" not in shown.stdout, shown.stdout
        staged = cluster.cli("password", "set", "--password-file", str(pw))
        assert staged.returncode == 0, staged.stderr
        assert "password version 2 staged." in staged.stdout, staged.stdout
        assert "if it is another password" in staged.stdout, staged.stdout
        again = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes", "--wait"
        )
        assert again.returncode == 0, again.stdout + again.stderr
        # Nothing of a comparison in the audit: no password was checked.
        assert "password.checked" not in cluster.leader.log_text(), "a password was checked"
        assert "way-back-test-password" not in again.stdout + again.stderr
        for node in nodes:
            assert node.server.status()["listen"] == ["https"]
    finally:
        for node in nodes:
            node.close()
        cluster.close()
