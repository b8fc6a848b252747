"""Who is still on http, judged by the node's own client report (session 44), end to end: a
real leader, agent and reference server over real mutual TLS, a transitional rollout left
awaiting its finalize, and a workstation that writes over http from a loopback address of its
own.

- A workstation the agent's latest report still lists counts as on http while that report
  is fresh, however old its stored ``last_seen`` is against now: judged against now, it
  dropped out before the agent let go of it, and a finalize closed http under it.
- A restarted leader judges a node by the report its agent sends to it, and until then says
  it waits for it (a report stored before the crash says nothing of what the workstations
  did while no leader listened); it never finalizes on the old one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leader import engine, planner, service
from leader.cli.draw import AWAITING
from refserver.server import CLIENTS_WINDOW_ENV
from tests.cluster import AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node
from tests.test_level_based import live
from tests.test_transitional import (
    LONG,
    SCHEMA_POLL,
    Workstation,
    look,
    newest,
    on_http_named,
    rollout,
    start_transitional,
)
from tests.test_viewer import fetch, session_for
from tlsroll import httpcheck, keywrap, pki, tls

WINDOW = 60  # seconds: the reference server's clients_window (its least)
SHORT_WINDOW = 15
"""Seconds: the reference server's clients window below its least (its test knob,
``CLIENTS_WINDOW_ENV``) where a test waits for a sighting to fall out of it: a minute's wait
was most of such a test. Long beside an agent's restart, which must read the sighting within
it."""
WAITS = AWAITING  # what a node's row says (and, in English, the viewer's)


@contextlib.contextmanager
def one_node(
    root: Path,
    clients_refresh: int = 10,
    window: int = WINDOW,
    leader_env: dict[str, str] | None = None,
) -> Iterator[tuple[Cluster, Node]]:
    """A leader (1 s heartbeats) and node1 on its address, whose reference server reports
    the workstations it saw within ``window`` seconds; its agent reuses its view of them for
    ``clients_refresh`` seconds (the agent's default: 10). A window below the config's least
    (60 s) is set by the server's test knob, for the server the test starts and each one its
    agent starts (a switch's restart); ``leader_env`` is added to the leader's environment."""
    address = next_loopback()
    cluster = AdminTokenCluster(root / "cluster", address, heartbeat_interval=1)
    short = {CLIENTS_WINDOW_ENV: str(window)} if window < WINDOW else None
    node = Node(
        cluster, "node1", address, root / "n0", server_env=short, clients_window=max(window, WINDOW)
    )
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader(leader_env)
        node.start(short, clients_refresh=clients_refresh)
        cluster.wait_for_nodes_online(["node1"])
        yield cluster, node
    finally:
        node.close()
        cluster.close()


def phase_1(cluster: Cluster, root: Path) -> str:
    """A transitional rollout's phase 1, done: node1 serves http and https, awaiting finalize."""
    phase1 = start_transitional(cluster, root, "--wait")
    assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
    return phase1


def visit(ws: Workstation) -> dt.datetime:
    """One write of ``ws`` over http; when it was made (the server sees it at about then)."""
    before = dt.datetime.now(dt.UTC)
    status, _entry = ws.post("http", uuid.uuid4().hex)
    assert status == 201
    return before


def restart_agent(node: Node) -> None:
    """The node's agent stopped and started again: its view of the server's clients is read
    afresh at its first heartbeat."""
    assert node.agent is not None
    node.agent.stop()
    node.start_agent_heard()


def node1_clients(cluster: Cluster) -> dict[str, Any]:
    """node1's client view; empty until its agent's first client report is stored (the schema
    lists only nodes that reported: a wait polled before that report came saw none and ended
    in StopIteration, CI on 2f4605d0)."""
    view: dict[str, Any] = next(
        (v for v in look(cluster)["node_clients"] if v["node"] == "node1"), {}
    )
    return view


def reported_at(cluster: Cluster) -> dt.datetime:
    """When node1's stored client report came (its ``reported_at``)."""
    view = node1_clients(cluster)
    assert view, "node1 has no stored client report"
    return dt.datetime.fromisoformat(view["reported_at"].replace("Z", "+00:00"))


@pytest.mark.timeout(300)
def test_a_workstation_the_latest_report_lists_counts_on_http_past_its_stored_time(
    tmp_path: Path,
) -> None:
    """The agent reuses its view of its server's clients for ``clients_refresh`` (an hour
    here: the lag made long enough to look at; the leader's stored copy lags the same way
    for up to ~29 s at a 5 s interval, as a sighting that moves only ``last_seen`` is no
    news). Past the window (``SHORT_WINDOW``) since the workstation's stored sighting, the
    agent's every report still lists it: it is still on http for the schema, ``notify
    --remaining`` and a finalize, until a report leaves it out."""
    with one_node(tmp_path, clients_refresh=3600, window=SHORT_WINDOW) as (cluster, node):
        phase1 = phase_1(cluster, tmp_path)
        ws = Workstation("ws", node, next_loopback(), cluster.ca_pem)
        seen = visit(ws)
        restart_agent(node)  # its view, read now, lists the workstation for the next hour
        wait_until(
            lambda: on_http_named(cluster, "node1") == [ws.source],
            30,
            "the workstation reported on http",
            interval=SCHEMA_POLL,
        )
        # Past the window since it was seen, and a report stored since then.
        time.sleep(max(0.0, (seen - dt.datetime.now(dt.UTC)).total_seconds() + SHORT_WINDOW + 2))
        assert node1_clients(cluster)["clients"]["window_seconds"] == SHORT_WINDOW  # the knob
        wait_until(
            lambda: reported_at(cluster) > seen + dt.timedelta(seconds=SHORT_WINDOW + 1),
            40,
            "a report stored past the window",
            interval=SCHEMA_POLL,
        )
        view = node1_clients(cluster)
        assert [c["address"] for c in view.get("still_on_http", [])] == [ws.source], view
        remaining = cluster.cli("notify", "--remaining")
        assert remaining.returncode == 0 and ws.source in remaining.stdout, remaining
        refused = cluster.cli("rollout", "finalize", phase1, "--yes")
        assert refused.returncode == 1, refused.stdout
        assert f"node1: {ws.source}" in refused.stderr, refused.stderr
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"  # nothing started

        # The agent's next view leaves it out (the server's window has passed): gone here too.
        restart_agent(node)
        wait_until(
            lambda: on_http_named(cluster, "node1") == [],
            30,
            "the workstation no longer on http",
            interval=SCHEMA_POLL,
        )
        done = cluster.cli("rollout", "finalize", phase1, "--yes", "--wait", timeout=LONG)
        assert done.returncode == 0, done.stderr


@pytest.mark.timeout(300)
def test_a_restarted_leader_waits_for_the_agents_first_report_and_judges_by_it(
    tmp_path: Path,
) -> None:
    """The stored report says nobody is on http. The leader is killed, a workstation writes
    over http meanwhile, and the leader starts again with its group commit held back for an
    hour (``TEST_BATCH_ENV``): the agent reconnects and reports, but its first report is not
    stored (the moment right after a restart, made to last). With node1 online, a finalize
    refuses, saying it waits for node1's first report since the leader started (it took the
    stored report for fresh and closed http under the workstation). The leader killed and
    started as usual, the report the agent sends on reconnecting decides: it names the
    workstation."""
    with one_node(tmp_path) as (cluster, node):
        phase1 = phase_1(cluster, tmp_path)
        wait_until(
            lambda: any(v["node"] == "node1" for v in look(cluster).get("node_clients", [])),
            30,
            "node1's client report",
            interval=SCHEMA_POLL,
        )
        assert on_http_named(cluster, "node1") == []
        cluster.kill_leader()
        ws = Workstation("ws", node, next_loopback(), cluster.ca_pem)
        visit(ws)
        cluster.start_leader({service.TEST_BATCH_ENV: "3600"})
        # (the hook in effect is said: one left in a production unit is seen in the log)
        hooks = [e for e in cluster.leader.log_events() if e["event"] == "leader.test_hook"]
        hooks = [e for e in hooks if e["hook"] != keywrap.TEST_KDF_N_ENV]  # (conftest's)
        assert [(e["hook"], e["value"]) for e in hooks] == [(service.TEST_BATCH_ENV, 3600.0)]
        cluster.wait_for_nodes_online(["node1"])
        refused = cluster.cli("rollout", "finalize", phase1, "--yes")
        assert refused.returncode == 1, refused.stdout
        assert (
            "finalize waits for the first client report since the leader started from node1"
            " (seconds once its agent is connected; else check it runs: tlsroll nodes, and on"
            " the node systemctl status tlsroll-agent);"
            " finalize again then" in refused.stderr
        ), refused.stderr
        assert "client steps" not in refused.stderr, refused.stderr
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"  # nothing started

        cluster.kill_leader()
        cluster.start_leader()
        wait_until(
            lambda: on_http_named(cluster, "node1") == [ws.source],
            60,
            "the agent's report to the restarted leader",
            interval=SCHEMA_POLL,
        )
        named = cluster.cli("rollout", "finalize", phase1, "--yes")
        assert named.returncode == 1, named.stdout
        assert f"node1: {ws.source}" in named.stderr and "waiting" not in named.stderr, named
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"


def node_cell(text: str, node: str, column: str) -> str:
    """The cell of ``column`` in ``node``'s row of the first rollout table that ``schema
    show``'s text draws (a cell folds onto the lines below its row's first), its lines joined."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("┃ # "))
    at = [c.strip() for c in lines[head].split("┃")].index(column)
    start = next(i for i, line in enumerate(lines) if line.startswith("│ 1 ") and node in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(("│ 2 ", "└")))
    return " ".join(filter(None, (line.split("│")[at].strip() for line in lines[start:end])))


@pytest.mark.timeout(300)
def test_a_restarted_leader_says_on_each_node_that_it_waits_for_its_report(
    tmp_path: Path,
) -> None:
    """Session 45: the wait was said only by a finalize's refusal. The leader restarted with
    its group commit held back for an hour (``TEST_BATCH_ENV``: the moment before the agent's
    first report is stored, made to last), node1 online: ``schema show`` (text and
    ``--json``), the web viewer's page and ``notify --remaining`` say on node1 that the leader
    waits for its first report since it started, and a ``finalize --when-quiet`` that holds
    node1 for it logs why, in the refusal's words, and shows it on node1 of the finalize.
    Started as usual, the agent's report comes: the marks go, and the finalize goes ahead."""
    with one_node(tmp_path) as (cluster, _node):
        phase1 = phase_1(cluster, tmp_path)
        wait_until(
            lambda: any(v["node"] == "node1" for v in look(cluster).get("node_clients", [])),
            30,
            "node1's client report",
            interval=SCHEMA_POLL,
        )
        assert not rollout(cluster, phase1)["nodes"][0].get("awaiting_report")
        cluster.kill_leader()
        cluster.start_leader({service.TEST_BATCH_ENV: "3600"})
        # (the hook in effect is said: one left in a production unit is seen in the log)
        hooks = [e for e in cluster.leader.log_events() if e["event"] == "leader.test_hook"]
        hooks = [e for e in hooks if e["hook"] != keywrap.TEST_KDF_N_ENV]  # (conftest's)
        assert [(e["hook"], e["value"]) for e in hooks] == [(service.TEST_BATCH_ENV, 3600.0)]
        cluster.wait_for_nodes_online(["node1"])

        shown = cluster.cli("schema", "show", "--all", "--json")
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        (n1,) = next(r for r in data["rollouts"] if r["id"] == phase1)["nodes"]
        assert n1["name"] == "node1" and n1.get("awaiting_report") is True, n1
        (clients,) = data["node_clients"]
        assert clients["node"] == "node1" and clients.get("awaiting_report") is True, clients
        text = cluster.cli("schema", "show")
        assert text.returncode == 0, text.stderr
        assert node_cell(text.stdout, "node1", "reason") == WAITS, text.stdout
        assert f"node1: 0 still on http; window {WINDOW}s" in text.stdout
        assert f"; {WAITS}" in text.stdout.split("node1: 0 still on http", 1)[1].splitlines()[0]

        session = session_for(cluster, "staff")
        page = fetch(cluster, f"/rollouts/{phase1}?lang=en", cookie=session)
        assert page.status == 200, page
        drawn = re.search(r'<tr id="node-node1".*?</tr>', page.body, re.S)
        assert drawn is not None, page.body
        assert WAITS in " ".join(drawn.group(0).split()), drawn.group(0)

        remaining = cluster.cli("notify", "--remaining", "--lang", "en")
        assert remaining.returncode == 0, remaining.stderr
        assert (
            "node1: cannot tell (no report from its agent since the leader started yet)"
            in remaining.stdout
        ), remaining.stdout

        started = cluster.cli("rollout", "finalize", phase1, "--when-quiet", "1s", "--yes")
        assert started.returncode == 0, started.stderr
        said = "rollout.node_waits_for_report"
        wait_until(lambda: said in cluster.leader.event_names(), 30, "the hold said", interval=0.2)
        (event,) = [e for e in cluster.leader.log_events() if e.get("event") == said]
        assert event["node"] == "node1", event
        assert event["reason"] == (
            "waiting for node1's first report since the leader started (seconds once its agent"
            " is connected; else check it runs: tlsroll nodes, and on the node systemctl status"
            " tlsroll-agent)"
        ), event
        final = newest(cluster)
        assert final["finalizes"] == phase1, final
        (held,) = final["nodes"]
        assert held["state"] == "pending" and held.get("awaiting_report") is True, held

        cluster.kill_leader()
        cluster.start_leader()
        wait_until(
            lambda: newest(cluster)["state"] == "completed",
            LONG,
            "the finalize, once node1's report came",
            interval=SCHEMA_POLL,
        )
        done = newest(cluster)
        assert not done["nodes"][0].get("awaiting_report"), done
        assert not look(cluster)["node_clients"][0].get("awaiting_report")


@pytest.mark.timeout(300)
def test_a_removed_node_waits_for_no_report_and_enrolled_again_reports_anew(
    tmp_path: Path,
) -> None:
    """Review s45rev5 M2: node2, removed, was forgotten as heard since the leader started
    while its client report stayed stored: ``notify --remaining`` said "cannot tell" for it
    for good (the all-clear never came back) and ``schema show`` added the wait to its line.
    Removed, its report goes; enrolled again under its name, node2 shows a report again once
    its agent sends one, not waiting."""
    address1, address2 = next_loopback(), next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address1, heartbeat_interval=1)
    node1 = Node(cluster, "node1", address1, tmp_path / "n1", clients_window=WINDOW)
    node2 = Node(cluster, "node2", address2, tmp_path / "n2", clients_window=WINDOW)
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        node1.start()
        node2.start()
        cluster.wait_for_nodes_online(["node1", "node2"])

        def reported() -> list[str]:
            return sorted(v["node"] for v in look(cluster).get("node_clients", []))

        wait_until(
            lambda: reported() == ["node1", "node2"],
            30,
            "both nodes' client reports",
            interval=SCHEMA_POLL,
        )
        assert node2.agent is not None
        agent2 = node2.agent
        agent2.stop()
        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, removed.stderr
        remaining = cluster.cli("notify", "--remaining", "--lang", "en")
        assert remaining.returncode == 0, remaining.stderr
        assert remaining.stdout == "No workstation was seen on http lately.\n", remaining.stdout
        text = cluster.cli("schema", "show")
        assert text.returncode == 0, text.stderr
        assert "node2: " not in text.stdout and "waiting for" not in text.stdout, text.stdout
        assert reported() == ["node1"]

        # Enrolled again under its name (a token of the admin's, the key of before moved
        # aside: README): its agent's first report is stored and speaks for it.
        token = Cluster.create_token(cluster, "node2", address2)
        agent2.key_file.rename(agent2.key_file.with_name("node.key.removed"))
        agent2.write_config({"leader": {"join_token": token}})
        agent2.start()
        cluster.wait_for_nodes_online(["node2"])
        wait_until(
            lambda: reported() == ["node1", "node2"],
            30,
            "node2's report, enrolled again",
            interval=SCHEMA_POLL,
        )
        view = next(v for v in look(cluster)["node_clients"] if v["node"] == "node2")
        assert not view.get("awaiting_report"), view
        remaining = cluster.cli("notify", "--remaining", "--lang", "en")
        assert remaining.stdout == "No workstation was seen on http lately.\n", remaining.stdout
    finally:
        node2.close()
        node1.close()
        cluster.close()


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def sightings(cluster: Cluster, source: str) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """node1's stored sightings of ``source``: scheme -> (first_seen, last_seen)."""
    clients = node1_clients(cluster).get("clients", {}).get("clients", [])
    return {
        c["scheme"]: (when(c["first_seen"]), when(c["last_seen"]))
        for c in clients
        if c["address"] == source
    }


@pytest.mark.timeout(300)
def test_a_workstation_that_alternates_http_and_https_counts_on_http(tmp_path: Path) -> None:
    """One address writes on http, then on https, then on http and https again (one PC with
    two programs, a terminal server, a NAT): its https is seen after its last http request,
    but it used http after it first used https, so it has not switched. Once the stored
    report holds both schemes that way, a plain finalize refuses, naming it (it went ahead:
    "seen on https since its last http request" hid it)."""
    with one_node(tmp_path, clients_refresh=1) as (cluster, node):
        phase1 = phase_1(cluster, tmp_path)
        ws = Workstation("ws", node, next_loopback(), cluster.ca_pem)
        for scheme in ("http", "https", "http", "https"):
            status, _entry = ws.post(scheme, uuid.uuid4().hex)
            assert status == 201, scheme
            time.sleep(1.2)  # whole seconds on the server: each write in a later second

        def alternated() -> bool:
            seen = sightings(cluster, ws.source)
            return (
                set(seen) == {"http", "https"}
                and seen["http"][1] > seen["https"][0]  # http used after https first was
                and seen["https"][1] > seen["http"][1]  # and https last
            )

        wait_until(alternated, 60, "both schemes stored as written", interval=SCHEMA_POLL)
        refused = cluster.cli("rollout", "finalize", phase1, "--yes")
        assert refused.returncode == 1, refused.stdout
        assert f"node1: {ws.source}" in refused.stderr, refused.stderr
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"  # nothing started
        assert on_http_named(cluster, "node1") == [ws.source]


def named_context(node: Node, name: str, source: str, root: Path) -> ssl.SSLContext:
    """A client context with a workstation certificate for ``name`` (as its enrolment gets
    one): the reference server names its https requests by it."""
    key = pki.generate_key()
    cert = node.ca().issue(
        key.public_key(), pki.Names.of(name, [source]), server=False, client=True
    )
    pki.write_key(root / f"{name}.key", key)
    pki.write_cert(root / f"{name}.pem", cert)
    return tls.client_context(
        node.cluster.ca_pem, cert_file=root / f"{name}.pem", key_file=root / f"{name}.key"
    )


def https_write(node: Node, source: str, context: ssl.SSLContext) -> dt.datetime:
    """One write from ``source`` over https with ``context``; when it was made."""
    before = dt.datetime.now(dt.UTC)
    conn = httpcheck.HTTPSConnection(
        node.address, 8443, timeout=10, context=context, source_address=(source, 0)
    )
    try:
        conn.request(
            "POST",
            f"{node.server.app_path}entries",
            body=json.dumps({"marker": uuid.uuid4().hex}).encode(),
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201
    finally:
        conn.close()
    return before


@pytest.mark.timeout(300)
def test_a_pc_unnamed_on_http_and_named_on_https_is_one_workstation(tmp_path: Path) -> None:
    """Session 68 (README walk, M3): two PCs write over http without a workstation name (a
    practice application that sends no ``X-Tlsroll-Workstation`` header), then over https
    with their workstation certificates, which name them. Each is one workstation: once the
    agent reports the https sightings, neither is still on http (each stayed "still on
    http" for the server's whole window, an hour here, and a plain finalize was refused that
    long). Then one writes over http again: it is back on http at once, and a plain finalize
    refuses, naming it alone."""
    with one_node(tmp_path, clients_refresh=1, window=3600) as (cluster, node):
        phase1 = phase_1(cluster, tmp_path)
        pcs = {
            name: Workstation(name, node, next_loopback(), cluster.ca_pem)
            for name in ("ws-empfang", "ws-labor")
        }
        contexts = {n: named_context(node, n, ws.source, tmp_path) for n, ws in pcs.items()}
        for ws in pcs.values():
            visit(ws)
        https_at = max(https_write(node, ws.source, contexts[n]) for n, ws in pcs.items())

        def moved() -> bool:
            view = node1_clients(cluster)
            named = {
                (c["address"], c.get("workstation", ""))
                for c in view.get("clients", {}).get("clients", [])
                if c["scheme"] == "https"
            }
            return named == {(ws.source, n) for n, ws in pcs.items()} and not view.get(
                "still_on_http"
            )

        wait_until(moved, 30, "both PCs reported on https, none on http", interval=SCHEMA_POLL)
        listed = cluster.cli("notify", "--remaining")
        assert listed.returncode == 0, listed.stderr
        assert all(ws.source not in listed.stdout for ws in pcs.values()), listed.stdout

        # ws-labor goes back to http (whole seconds on the server: in a later second).
        back = pcs["ws-labor"]
        later = https_at.replace(microsecond=0) + dt.timedelta(seconds=1)
        wait_until(lambda: dt.datetime.now(dt.UTC) >= later, 5, "the next second")
        visit(back)
        wait_until(
            lambda: on_http_named(cluster, "node1") == [back.source],
            30,
            "ws-labor back on http",
            interval=SCHEMA_POLL,
        )
        refused = cluster.cli("rollout", "finalize", phase1, "--yes")
        assert refused.returncode == 1, refused.stdout
        assert f"node1: {back.source}" in refused.stderr, refused.stderr
        assert pcs["ws-empfang"].source not in refused.stderr, refused.stderr
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"  # nothing started


# --- finalize --when-quiet: quiet since the leader could know, judged afresh (review s64 M) ------


def final_node1(cluster: Cluster, final_id: str) -> dict[str, Any]:
    """node1's row in the finalize ``final_id``."""
    found: dict[str, Any] = next(
        n for n in rollout(cluster, final_id)["nodes"] if n["name"] == "node1"
    )
    return found


@pytest.mark.timeout(300)
def test_when_quiet_does_not_take_the_day_before_a_nodes_first_report_for_quiet(
    tmp_path: Path,
) -> None:
    """The review's walk: a workstation writes on http (201), and within seconds `finalize
    --when-quiet 1h` closed 8080: the leader counted quiet time from a day (the reference
    server's window) before the node's first report, though the server has watched only since
    it started; the finalize's restart wiped the server's memory of the write before the agent
    reported it, and "still on http" and `notify --remaining` never showed it. Now node1 waits:
    the leader has known it for seconds, not an hour; the agent reports the workstation. The
    reference server's default window (a day), as the review ran it."""
    with one_node(tmp_path, window=24 * 3600) as (cluster, node):
        phase1 = phase_1(cluster, tmp_path)
        ws = Workstation("ws", node, next_loopback(), cluster.ca_pem)
        visit(ws)
        started = cluster.cli("rollout", "finalize", phase1, "--when-quiet", "1h", "--yes")
        assert started.returncode == 0, started.stderr
        final_id = newest(cluster)["id"]
        assert rollout(cluster, final_id)["when_quiet_seconds"] == 3600
        wait_until(
            lambda: on_http_named(cluster, "node1") == [ws.source],
            60,
            "the workstation reported on http",
            interval=SCHEMA_POLL,
        )
        for _ in range(5):  # a few of the engine's passes (1 s heartbeats) see it so
            assert final_node1(cluster, final_id)["state"] == "pending"
            assert node.port_open(8080)
            time.sleep(1)
        remaining = cluster.cli("notify", "--remaining")
        assert remaining.returncode == 0 and ws.source in remaining.stdout, remaining


@pytest.mark.timeout(300)
def test_when_quiet_refuses_a_switch_if_the_agent_sees_http_afresh_and_stores_the_sighting(
    tmp_path: Path,
) -> None:
    """The gate judges by the view the agent reported, which it reuses for
    ``clients_refresh`` (an hour here: the lag made long enough to look at; 10 s by default).
    node1 has been known long enough and its reports show no http, so the gate lets it start;
    a workstation wrote on http just before, which no report shows. Just before the switch's
    freeze the agent reads its server's clients afresh, sees the write and refuses: node1
    goes back to pending with the reason, 8080 stays open, and the sighting is stored (the
    schema's still-on-http list). It finalized before, and the restart wiped the write.
    The leader takes a report to be ``lag`` s old, not ``planner.REPORT_LAG``'s 15 (its test
    hook ``TEST_REPORT_LAG_ENV``): node1 is known long enough 12 s sooner."""
    quiet = 10  # seconds; the write comes about a second before the agent's look
    lag = 3  # seconds (the hook's)
    hooked = {engine.TEST_REPORT_LAG_ENV: str(lag)}
    with one_node(tmp_path, clients_refresh=3600, leader_env=hooked) as (cluster, node):
        said = [e for e in cluster.leader.log_events() if e["event"] == "leader.test_hook"]
        said = [e for e in said if e["hook"] != keywrap.TEST_KDF_N_ENV]  # (conftest's)
        assert [(e["hook"], e["value"]) for e in said] == [(engine.TEST_REPORT_LAG_ENV, lag)]
        phase1 = phase_1(cluster, tmp_path)

        def known_long_enough() -> bool:
            # The gate's quiet time: from the node's first report to its latest, less what an
            # agent may have cached (``lag``, the hook's), a margin on top.
            rows = [r for r in cluster.store_table("node_clients_info") if r["node"] == "node1"]
            if not rows:
                return False
            first = dt.datetime.fromisoformat(rows[0]["first_report"])
            latest = dt.datetime.fromisoformat(rows[0]["reported_at"])
            spoken = latest - first - dt.timedelta(seconds=lag)
            return spoken > dt.timedelta(seconds=quiet + 3)

        wait_until(known_long_enough, 120, "node1 known for the quiet time", interval=1)
        assert on_http_named(cluster, "node1") == []
        ws = Workstation("ws", node, next_loopback(), cluster.ca_pem)
        visit(ws)  # the agent's view, read an hour ago at most, leaves it out
        started = cluster.cli("rollout", "finalize", phase1, "--when-quiet", f"{quiet}s", "--yes")
        assert started.returncode == 0, started.stderr
        final_id = newest(cluster)["id"]
        wait_until(
            lambda: "not quiet:" in final_node1(cluster, final_id).get("reason", ""),
            60,
            "the agent's refusal on node1",
            interval=SCHEMA_POLL,
        )
        row = final_node1(cluster, final_id)
        assert row["state"] == "pending", row
        assert ws.source in row["reason"] and f"--when-quiet {quiet}s" in row["reason"], row
        assert node.port_open(8080)
        assert on_http_named(cluster, "node1") == [ws.source]  # stored with the refusal
        assert sorted(live(node).schemes) == ["http", "https"]


def test_the_test_only_report_lag_only_shortens_the_gate_s() -> None:
    """``TEST_REPORT_LAG_ENV`` (above) takes whole seconds from 1 to ``REPORT_LAG``'s; anything
    else leaves ``REPORT_LAG``: the hook never makes a report count as older, nor as fresher
    than a second."""
    most = planner.REPORT_LAG
    assert engine.report_lag({}) == most
    assert engine.report_lag({engine.TEST_REPORT_LAG_ENV: "3"}) == dt.timedelta(seconds=3)
    assert engine.report_lag({engine.TEST_REPORT_LAG_ENV: "1"}) == dt.timedelta(seconds=1)
    assert engine.report_lag({engine.TEST_REPORT_LAG_ENV: "15"}) == most
    for bad in ("0", "-3", "16", "3.5", "nan", "x", ""):
        assert engine.report_lag({engine.TEST_REPORT_LAG_ENV: bad}) == most, bad
