"""A node's served (8443) certificate and a workstation's revoked (review s64 pki M1), end to
end: a real leader, agents and reference servers as processes, real mutual TLS, the real CLI
and a real `tlsroll client test-connection`.

`tlsroll ca revoke` of the serial `certs check-expiration` lists for node2's server
certificate printed "revoked …" and nothing more; check-expiration went on calling it "ok"
(exit 0), node2 went on serving it (and the practice's clients, which read no revocation list,
on taking it), and the automatic rotation left it alone until its end. Now `ca revoke` warns
on stderr that the node still serves it, with the rotate-cert that replaces it;
check-expiration shows it `REVOKED` (exit 1) with that command as the advice, `schema show`
lists it, and `auto_rotate` rotates it in the window. `workstations revoke` says that the
managed servers read no revocation list, and until when they take the certificate.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import (
    LEADER_POLL,
    METRICS_TOKEN,
    Cluster,
    metrics_token_file,
    one_line_error,
    wait_until,
)
from tests.nodeside import Node, cluster_of
from tests.test_auto_rotate import auto_view, checked_at
from tests.test_bootstrap_worker import client_test_connection
from tests.test_level_based import password_file
from tests.test_own_revoked import expiration
from tests.test_viewer import fetch, session_for

LONG = 180.0
ROTATE = "tlsroll rollout start --change rotate-cert --nodes node2"


def enable_tls(cluster: Cluster, pw: Path) -> None:
    enable = cluster.cli(
        *("rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"),
        "--wait",
        timeout=LONG,
    )
    assert enable.returncode == 0, (enable.stdout, enable.stderr)


@pytest.mark.timeout(600)
def test_a_revoked_server_certificate_is_shown_revoked_until_a_rotation_replaces_it(
    tmp_path: Path,
) -> None:
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node1, node2 = nodes
        pw = password_file(tmp_path, "pw", "served-revoked-password-for-the-practice")
        enable_tls(cluster, pw)
        code, rows = expiration(cluster)
        assert code == 0, rows
        serial, fingerprint = rows["server/node2"]["serial"], rows["server/node2"]["fingerprint"]
        assert node2.served_fingerprint() == fingerprint

        revoked = cluster.cli("ca", "revoke", serial, "--reason", "server key copied")
        assert (revoked.returncode, revoked.stdout.strip()) == (0, f"revoked {serial}"), revoked
        (said,) = revoked.stderr.splitlines()
        assert said.startswith(
            "tlsroll: warning: node node2 still serves the revoked certificate on 8443"
        ), said
        assert said.endswith(ROTATE), said
        assert node2.served_fingerprint() == fingerprint  # revoking replaces nothing

        code, rows = expiration(cluster)
        assert code == 1, rows
        assert rows["server/node2"]["revoked"] is True, rows["server/node2"]
        assert ROTATE in rows["server/node2"]["advice"], rows["server/node2"]
        assert not rows["server/node1"].get("revoked"), rows["server/node1"]
        table = cluster.cli("certs", "check-expiration")
        assert table.returncode == 1 and table.stdout.count("REVOKED") == 1, table
        assert "1 certificate(s) within their warning horizon, expired or revoked" in (table.stderr)
        listed = json.loads(cluster.cli("schema", "show", "--json").stdout)
        assert [
            (c["kind"], c["subject"], c["serial"], c.get("revoked"))
            for c in listed.get("expiring_certificates", [])
        ] == [("server", "node2", serial, True)], listed.get("expiring_certificates")
        (event,) = [
            e for e in cluster.leader.log_events() if e.get("event") == "certificate.revoked"
        ]
        assert (event["serials"], event["served_by"]) == ([serial], ["node2"]), event

        rotate = cluster.cli(
            *("rollout", "start", "--nodes", "node2", "--change", "rotate-cert"),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
        code, rows = expiration(cluster)
        assert code == 0, rows
        assert rows["server/node2"]["serial"] != serial, rows["server/node2"]
        assert not rows["server/node2"].get("revoked"), rows["server/node2"]
        assert node2.served_fingerprint() == rows["server/node2"]["fingerprint"] != fingerprint

        # A workstation's: the managed servers read no revocation list; the command says so,
        # with the date its certificate ends.
        pc = client_test_connection(node1.https_url(), pw, tmp_path / "empfang")
        assert pc.returncode == 0, (pc.stdout, pc.stderr)
        listed_ws = json.loads(cluster.cli("workstations", "list", "--json").stdout)
        (ws,) = [w for w in listed_ws if w["name"] == "ws-empfang"]
        end = dt.datetime.strptime(ws["not_after"], "%Y-%m-%dT%H:%M:%SZ")
        gone = cluster.cli("workstations", "revoke", "ws-empfang")
        assert (gone.returncode, gone.stdout.strip()) == (0, f"revoked {ws['serial']}"), gone
        (note,) = gone.stderr.splitlines()
        assert note.startswith("tlsroll: note: the managed servers read no revocation list"), note
        assert f"until its end, {end:%Y-%m-%d %H:%M:%S} UTC" in note, note
        assert cluster.find_secrets(cluster.logs_text()) == []


def revoked_gauge(cluster: Cluster) -> dict[str, float]:
    """``tlsroll_certificate_revoked`` of the viewer's /metrics (the scrape token): by node."""
    scraped = fetch(cluster, "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status == 200, scraped
    return {
        s.labels["subject"]: s.value
        for f in text_string_to_metric_families(scraped.body)
        if f.name == "tlsroll_certificate_revoked"
        for s in f.samples
        if s.labels["kind"] == "server"
    }


def revoked_rows(cluster: Cluster, session: str) -> list[str]:
    """The rows of the viewer page's certificate list flagged revoked (their subjects)."""
    page = fetch(cluster, "/?lang=en", cookie=session)
    assert page.status == 200, page
    section = page.body[page.body.index('<section id="certificates"') :]
    section = section[: section.index("</section>")]
    rows = re.findall(r'<tr data-kind="server" data-revoked="true">.*?</tr>', section, re.S)
    assert all("revoked, still served: replace it with rotate-cert" in r for r in rows), rows
    return [re.sub(r"<[^>]+>", "|", r).split("|")[4] for r in rows]


@pytest.mark.timeout(600)
def test_a_revoked_served_certificate_is_in_the_plan_on_the_page_and_in_the_metrics(
    tmp_path: Path,
) -> None:
    """Review s66 (leader-side Lows): after `tlsroll ca revoke` of the certificate node2
    serves, `tlsroll plan` of enable-tls said "nothing to do" and no more, and the web viewer
    and /metrics showed the certificate as any other until its end (check-expiration alone
    said REVOKED). Now the plan's refusal names node2 and the rotate-cert that replaces it,
    the page lists it flagged revoked (its end a year off), and
    ``tlsroll_certificate_revoked`` is 1 for it, 0 for node1's; the rotation clears both."""
    token = metrics_token_file(tmp_path / "metrics-token")
    with cluster_of(tmp_path, 2, metrics_token_file=str(token)) as (cluster, nodes):
        pw = password_file(tmp_path, "pw", "served-revoked-plan-page-metrics")
        enable_tls(cluster, pw)
        session = session_for(cluster, "revoked")
        assert revoked_gauge(cluster) == {"node1": 0, "node2": 0}
        assert revoked_rows(cluster, session) == []
        code, rows = expiration(cluster)
        assert code == 0, rows
        revoked = cluster.cli("ca", "revoke", rows["server/node2"]["serial"])
        assert revoked.returncode == 0, revoked

        plan = cluster.cli("plan", "--scope", "cluster", "--change", "enable-tls")
        assert plan.returncode != 0, (plan.stdout, plan.stderr)
        said = one_line_error(plan.stderr, "tlsroll")
        assert "nothing to do: every node in scope (node1, node2)" in said, said
        assert "; node2: the certificate served is revoked (tlsroll ca revoke)" in said, said
        assert f"replace it now: {ROTATE} (see:" in said, said
        assert "node1:" not in said, said

        assert revoked_gauge(cluster) == {"node1": 0, "node2": 1}
        assert revoked_rows(cluster, session) == ["node2"]

        rotate = cluster.cli(
            *("rollout", "start", "--nodes", "node2", "--change", "rotate-cert"),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
        assert revoked_gauge(cluster) == {"node1": 0, "node2": 0}
        assert revoked_rows(cluster, session) == []
        again = cluster.cli("plan", "--scope", "cluster", "--change", "enable-tls")
        assert again.returncode != 0 and "revoked" not in again.stderr, again.stderr
        assert (
            nodes[1].served_fingerprint() == expiration(cluster)[1]["server/node2"]["fingerprint"]
        )


@pytest.mark.timeout(600)
def test_auto_rotate_replaces_a_revoked_server_certificate_in_the_window(tmp_path: Path) -> None:
    """With `auto_rotate` and the window open, the leader rotates a node's served certificate
    that the admin revoked by itself (nothing else is due: server certificates live 397 days),
    and leaves the other node's as it is."""
    with cluster_of(
        tmp_path,
        2,
        auto_rotate=True,
        maintenance_window="daily 00:00-24:00",
        expiry_check_interval=1,
    ) as (cluster, nodes):
        node1, node2 = nodes
        enable_tls(cluster, password_file(tmp_path, "pw", "served-revoked-auto-rotate-password"))
        code, rows = expiration(cluster)
        assert code == 0, rows
        serial, kept = rows["server/node2"]["serial"], rows["server/node1"]["serial"]
        revoked = cluster.cli("ca", "revoke", serial)
        assert revoked.returncode == 0, revoked

        def rotated() -> dict[str, Any] | None:
            done = [
                r
                for r in cluster.schema_json()["rollouts"]
                if r["change"] == "rotate-cert" and r["state"] in ("completed", "halted")
            ]
            return done[0] if done else None

        wait_until(
            lambda: rotated() is not None, LONG, "an automatic rotation", interval=LEADER_POLL
        )
        r = rotated()
        assert r is not None and r["state"] == "completed", r
        assert r["started_by"] == "leader (auto_rotate)"
        assert [n["name"] for n in r["nodes"]] == ["node2"], r["nodes"]
        code, rows = expiration(cluster)
        assert code == 0, rows
        assert rows["server/node2"]["serial"] != serial and rows["server/node1"]["serial"] == kept
        assert node2.served_fingerprint() == rows["server/node2"]["fingerprint"]
        assert node1.served_fingerprint() == rows["server/node1"]["fingerprint"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("revoked_first", [False, True], ids=["removed", "revoked-then-removed"])
def test_a_machine_removed_and_replaced_under_its_name_serves_nothing_revoked(
    tmp_path: Path, revoked_first: bool
) -> None:
    """The review of s64-rev (M1): `tlsroll nodes remove` revokes the certificate the node
    served, and the rollout's record of it stayed the node's: a new machine enrolled under
    the name, its server on http, was shown serving a revoked certificate ("it was revoked
    … the node still serves it", exit 1), and auto_rotate found it due at every check and
    had its rotate-cert start refused ("not on https"), holding back any other node due.
    The removed machine's record is no node's now. ``revoked_first`` (review rvc of
    s66-misc, M1): the admin revoked it (`tlsroll ca revoke`) before the removal, which left
    it the admin's reason: it was still shown as the new machine's, revoked, as the record
    was dropped only for the removal's reason; it goes by when the name was removed now."""
    with cluster_of(
        tmp_path,
        2,
        auto_rotate=True,
        maintenance_window="daily 00:00-24:00",
        expiry_check_interval=1,
    ) as (cluster, nodes):
        node2 = nodes[1]
        enable_tls(cluster, password_file(tmp_path, "pw", "served-revoked-replaced-machine"))
        if revoked_first:
            _code, rows = expiration(cluster)
            revoked = cluster.cli("ca", "revoke", rows["server/node2"]["serial"])
            assert revoked.returncode == 0, (revoked.stdout, revoked.stderr)
        node2.close()
        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, removed.stderr
        # Between the revoke and the removal auto_rotate (its check every second) may start a
        # rotate-cert of the revoked certificate node2 still served, as it should (CI of
        # session 73: it did, 0.35 s after the revoke): only none after the removal counts.
        rotations = _rotations(cluster)
        del cluster.agents["node2"]
        shutil.rmtree(cluster.root / "agents" / "node2")
        fresh = Node(cluster, "node2", node2.address, tmp_path / "node2-replaced")
        nodes.append(fresh)
        fresh.start()  # (its reference server on http, a new token, a new agent key)
        cluster.wait_for_nodes_online(["node1", "node2"])
        joined = dt.datetime.now(dt.UTC)
        code, rows = expiration(cluster)
        assert code == 0, rows
        assert "server/node2" not in rows and not rows["server/node1"]["revoked"], rows
        # auto_rotate's next check after the join finds nothing due.
        wait_until(
            lambda: checked_at(cluster, polled=True) > joined,
            LONG,
            "auto_rotate's check after the join",
            interval=LEADER_POLL,
        )
        view = auto_view(cluster)
        assert view["verdict"] == "nothing-due", view
        assert _rotations(cluster) == rotations
        assert revoked_first or not rotations  # (nothing was due before the removal)


def _rotations(cluster: Cluster) -> list[str]:
    """The ids of the rotate-cert rollouts the leader holds (every one, not the latest only)."""
    rollouts = cluster.schema_json(limit=0)["rollouts"]
    return [r["id"] for r in rollouts if r["change"] == "rotate-cert"]


@pytest.mark.timeout(600)
def test_a_machine_enrolled_again_still_serving_its_revoked_certificate_is_flagged_everywhere(
    tmp_path: Path,
) -> None:
    """Review rvc of s66-misc (L2): node2 removed (`tlsroll nodes remove`: its served
    certificate revoked) and the same machine enrolled again with a new key, as the removal
    says, its server still serving that certificate. `plan` (which asks the node) said to
    replace it; check-expiration, the page and /metrics said nothing (the rollout's record is
    the removed machine's). Now each goes by what node2's heartbeats say it serves: REVOKED
    (exit 1) with the rotate-cert, flagged on the page, 1 in the gauge; the rotation clears
    them all."""
    token = metrics_token_file(tmp_path / "metrics-token")
    with cluster_of(tmp_path, 2, metrics_token_file=str(token)) as (cluster, nodes):
        node2 = nodes[1]
        enable_tls(cluster, password_file(tmp_path, "pw", "served-revoked-enrolled-again"))
        session = session_for(cluster, "again")
        served = node2.served_fingerprint()
        agent = node2.agent
        assert agent is not None
        agent.stop()  # (its server goes on serving on https)
        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, (removed.stdout, removed.stderr)
        # As the removal says: a new key, a new token.
        os.rename(agent.cert_file, f"{agent.cert_file}.removed")
        os.rename(agent.key_file, f"{agent.key_file}.removed")
        agent.write_config({"leader": {"join_token": cluster.create_token("node2", node2.address)}})
        agent.start()
        cluster.wait_for_nodes_online(["node1", "node2"])
        assert node2.served_fingerprint() == served

        def flagged() -> bool:
            row = expiration(cluster)[1].get("server/node2")
            return row is not None and bool(row["revoked"])

        wait_until(flagged, LONG, "node2's served certificate REVOKED", interval=LEADER_POLL)
        code, rows = expiration(cluster)
        assert code == 1 and rows["server/node2"]["fingerprint"] == served, rows
        assert ROTATE in rows["server/node2"]["advice"], rows["server/node2"]
        assert revoked_gauge(cluster) == {"node1": 0, "node2": 1}
        assert revoked_rows(cluster, session) == ["node2"]
        plan = cluster.cli("plan", "--scope", "cluster", "--change", "enable-tls")
        assert "node2: the certificate served is revoked" in plan.stderr, plan.stderr

        rotate = cluster.cli(
            *("rollout", "start", "--nodes", "node2", "--change", "rotate-cert"),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
        code, rows = expiration(cluster)
        assert code == 0 and not rows["server/node2"]["revoked"], rows
        assert rows["server/node2"]["fingerprint"] == node2.served_fingerprint() != served
        assert revoked_gauge(cluster) == {"node1": 0, "node2": 0}
        assert revoked_rows(cluster, session) == []
