"""The transitional strategy end to end (issue 12): a real leader, agents and reference servers
over real mutual TLS, with two kinds of workstation writing to every node throughout — one
that moves to https after phase 1 and one that stays on http.

Phase 1 (`rollout start --strategy transitional`) leaves every node dual and the rollout
`awaiting_finalize`, holding no freeze; `rollout finalize` is refused while a workstation was
seen on http lately (naming it), forced with `--force`, or done by the leader itself with
`--when-quiet`; a node failing in either phase goes back to the side it came from; a leader
killed between the phases picks the rollout up again.

Each workstation writes from a loopback address of its own, so the managed server tells them
apart by address (no workstation name is sent).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import signal
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodeagent.transaction import CRASH_ENV
from tests.cluster import AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, cluster_of, start_nodes
from tests.test_level_based import live, password_file
from tlsroll import httpcheck, tls

WAITED = ("completed", "halted", "aborted", "awaiting_finalize")
# Seconds between two looks at the schema while waiting (``look``).
SCHEMA_POLL = 0.5


@dataclass
class Write:
    started: dt.datetime
    ended: dt.datetime
    scheme: str
    status: int  # 0: no answer (connection refused or reset)
    marker: str
    entry_id: str = ""


@dataclass
class Workstation:
    """Posts entries to one node from its own source address until stopped, on ``scheme``
    (switched by the test: the client steps), recording every POST and its outcome."""

    name: str
    node: Node
    source: str
    ca_pem: bytes
    scheme: str = "http"
    # Seconds between an acknowledged write and the next (a refused or unanswered one is tried
    # again after 0.05 s, so a node's restart window is still probed closely): a write every
    # second is "throughout" for every assertion here (the longest quiet time a test waits for
    # is 8 s), and six workstations at a write each 0.2 s, each a new connection (TLS on
    # https), took most of a core from the daemons under test.
    pace: float = 1.0
    stop: threading.Event = field(default_factory=threading.Event)
    writes: list[Write] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def post(self, scheme: str, marker: str) -> tuple[int, str]:
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = httpcheck.HTTPSConnection(
                self.node.address,
                8443,
                timeout=10,
                context=tls.client_context(self.ca_pem),
                source_address=(self.source, 0),
            )
        else:
            conn = http.client.HTTPConnection(
                self.node.address, 8080, timeout=10, source_address=(self.source, 0)
            )
        resp: http.client.HTTPResponse | None = None
        try:
            conn.request(
                "POST",
                f"{self.node.server.app_path}entries",
                body=json.dumps({"marker": marker, "ws": self.name}).encode(),
                headers={"Content-Type": "application/json", "Connection": "close"},
            )
            resp = conn.getresponse()
            body = resp.read()
        finally:
            if resp is not None:  # a read cut short leaves the response holding the socket
                resp.close()
            conn.close()
        entry = json.loads(body).get("id", "") if resp.status == 201 else ""
        return resp.status, str(entry)

    def _run(self) -> None:
        while not self.stop.is_set():
            scheme, marker = self.scheme, uuid.uuid4().hex
            started = dt.datetime.now(dt.UTC)
            try:
                status, entry = self.post(scheme, marker)
            except (OSError, http.client.HTTPException, ssl.SSLError):
                status, entry = 0, ""
            except Exception as exc:  # reported by the test, never lost with the thread
                self.errors.append(f"{self.name}: {exc!r}")
                return
            self.writes.append(
                Write(started, dt.datetime.now(dt.UTC), scheme, status, marker, entry)
            )
            # (Woken by ``close``: a sleep made each workstation's close wait out its pace.)
            self.stop.wait(self.pace if status == 201 else 0.05)

    def start(self) -> Workstation:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(20)

    def acked_on(self, scheme: str, after: dt.datetime) -> int:
        return sum(
            w.status == 201 and w.scheme == scheme and w.started > after for w in self.writes
        )


@contextlib.contextmanager
def two_per_node(cluster: Cluster, nodes: list[Node]) -> Iterator[dict[str, list[Workstation]]]:
    """Per node a workstation that will move to https ("mover") and one that stays on http
    ("stayer"), writing from the start."""
    ca = cluster.ca_pem
    world = {
        n.name: [
            Workstation(f"{n.name}-mover", n, next_loopback(), ca).start(),
            Workstation(f"{n.name}-stayer", n, next_loopback(), ca).start(),
        ]
        for n in nodes
    }
    try:
        yield world
    finally:
        everyone = [ws for pair in world.values() for ws in pair]
        for ws in everyone:  # all told first: their last writes end together
            ws.stop.set()
        for ws in everyone:
            ws.close()


def schema(cluster: Cluster) -> dict[str, Any]:
    out = cluster.cli("schema", "show", "--all", "--json")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def look(cluster: Cluster) -> dict[str, Any]:
    """``schema`` for a wait: the same data, asked from this process (``Cluster.schema_json``);
    a `tlsroll schema show` process at each look took a core from the daemons under test."""
    return cluster.schema_json(limit=0)


def rollout(cluster: Cluster, rollout_id: str) -> dict[str, Any]:
    """A rollout as ``schema show --all --json`` shows it (by ``look``: what these tests check
    is the strategy, not the command; test_phase_1 reads the command's own output)."""
    found: dict[str, Any] = next(r for r in look(cluster)["rollouts"] if r["id"] == rollout_id)
    return found


def newest(cluster: Cluster) -> dict[str, Any]:
    found: dict[str, Any] = look(cluster)["rollouts"][0]
    return found


def wait_state(
    cluster: Cluster, rollout_id: str, states: tuple[str, ...], what: str
) -> dict[str, Any]:
    wait_until(
        lambda: rollout(cluster, rollout_id)["state"] in states,
        150,
        what,
        interval=SCHEMA_POLL,
    )
    return rollout(cluster, rollout_id)


def wait_states(
    cluster: Cluster, rollout_id: str, want: dict[str, str], timeout: float, what: str
) -> None:
    """Wait until the rollout's nodes are in exactly the states ``want``; on timeout, say what
    they were and what the leader knew of each node's clients (its --when-quiet inputs)."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.clear()
        seen.update(look(cluster))
        got = next(r for r in seen["rollouts"] if r["id"] == rollout_id)
        return {n["name"]: n["state"] for n in got["nodes"]} == want

    try:
        wait_until(reached, timeout, what, interval=SCHEMA_POLL)
    except TimeoutError as exc:
        last: dict[str, Any] = next(
            (r for r in seen.get("rollouts", []) if r["id"] == rollout_id), {}
        )
        nodes = {n["name"]: (n["state"], n.get("reason", "")) for n in last.get("nodes", [])}
        clients = {
            v["node"]: {
                "reported_at": v.get("reported_at"),
                "last_http_at": v.get("last_http_at"),
                "clients": [
                    (c["scheme"], c["address"], c.get("last_seen"))
                    for c in v["clients"].get("clients", [])
                ],
            }
            for v in seen.get("node_clients", [])
        }
        failed = [
            line
            for line in cluster.leader.log_text().splitlines()
            if "engine.failed" in line or '"level": "error"' in line
        ][-5:]
        raise TimeoutError(
            f"{exc}; at {seen.get('generated_at')}: nodes {nodes}; clients {clients};"
            f" leader errors {failed}"
        ) from None


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def windows(view: dict[str, Any]) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """Each node's freeze window in a rollout (its restart lies inside it)."""
    return {
        n["name"]: (when(n["freeze_started_at"]), when(n["freeze_ended_at"]))
        for n in view["nodes"]
        if n.get("freeze_started_at") and n.get("freeze_ended_at")
    }


def check_writes(
    cluster: Cluster,
    world: dict[str, list[Workstation]],
    rollouts: list[dict[str, Any]],
    cut_off: dict[str, dt.datetime] | None = None,
) -> None:
    """No acknowledged write is lost, nothing refused is stored, and every write that was
    refused or got no answer overlaps its node's freeze window in one of ``rollouts`` (or came
    after ``cut_off[workstation]``: http closed by a forced finalize)."""
    frozen: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}
    for view in rollouts:
        for name, window in windows(view).items():
            frozen.setdefault(name, []).append(window)
    # The writes as made so far (the workstations may still be writing), then each node's store
    # read once after: every acknowledged write among them is stored by then. A read of the
    # store per write (``Node.stored_with``) took seconds of the test's CPU at the end of a
    # long test (hundreds of writes, each a scan of every entry).
    made = {ws.name: list(ws.writes) for pair in world.values() for ws in pair}
    stored = {
        name: stored_counts(pair[0].node, {w.marker for ws in pair for w in made[ws.name]})
        for name, pair in world.items()
    }
    for pair in world.values():
        for ws in pair:
            assert ws.errors == []
            writes, found = made[ws.name], stored[ws.node.name]
            assert sum(w.status == 201 for w in writes) > 0, ws.name
            for w in writes:
                if w.status == 201:
                    continue
                assert w.status in (0, 503), (ws.name, w)
                if cut_off and ws.name in cut_off and w.started >= cut_off[ws.name]:
                    continue
                assert any(
                    w.started <= end and w.ended >= start
                    for start, end in frozen.get(ws.node.name, [])
                ), f"{ws.name}: {w.scheme} write refused outside the node's restart window: {w}"
                if w.status == 503:
                    assert found[w.marker] == 0, w
            for w in writes:
                if w.status == 201:
                    assert found[w.marker] == 1, (ws.name, w)


def stored_counts(node: Node, markers: set[str]) -> dict[str, int]:
    """How many entries in ``node``'s store have each of ``markers`` in their body, as
    ``Node.stored_with`` counts them (read from the SQLite file itself), in one read."""
    db_path = node.server_data_dir / "entries.sqlite3"
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db:
        bodies = [str(row[0]) for row in db.execute("SELECT body FROM entries")]
    return {m: sum(m in body for body in bodies) for m in markers}


LONG = 240  # seconds a CLI call with --wait may take (a rollout over three nodes)


def start_transitional(cluster: Cluster, tmp_path: Path, *extra: str) -> str:
    secret = password_file(tmp_path, "pw", "transitional-password-for-the-practice")
    started = cluster.cli(
        "rollout",
        "start",
        "--scope",
        "cluster",
        "--strategy",
        "transitional",
        "--password-file",
        str(secret),
        "--yes",
        *extra,
        timeout=LONG,
    )
    assert started.returncode == 0, started.stderr
    rollout_id: str = newest(cluster)["id"]
    return rollout_id


def on_http_named(cluster: Cluster, node: str) -> list[str]:
    """The addresses ``schema show --json`` lists as still on http at ``node`` (for a wait)."""
    for view in look(cluster).get("node_clients", []):
        if view["node"] == node:
            return sorted(c["address"] for c in view.get("still_on_http", []))
    return []


# --- phase 1, the still-on-http list, finalize refused then done -------------------------------


@pytest.mark.timeout(420)
def test_phase_1_keeps_every_write_then_finalize_waits_for_the_workstation_that_stayed(
    tmp_path: Path,
) -> None:
    # Agents that read their server's clients every second (``fresh_reports``): each wait for
    # the still-on-http list to follow the workstations took up to the default 10 s.
    with fresh_reports(tmp_path) as (cluster, nodes), two_per_node(cluster, nodes) as world:
        wait_until(
            lambda: all(
                ws.acked_on("http", dt.datetime.min.replace(tzinfo=dt.UTC)) >= 3
                for pair in world.values()
                for ws in pair
            ),
            30,
            "writes before the rollout",
        )
        phase1 = start_transitional(cluster, tmp_path)
        view = wait_state(cluster, phase1, WAITED, "phase 1")
        assert view["state"] == "awaiting_finalize", view
        assert {n["name"]: n["state"] for n in view["nodes"]} == dict.fromkeys(
            [n.name for n in nodes], "dual"
        )
        for node in nodes:  # dual, and nothing left frozen while the rollout waits
            server = live(node)
            assert sorted(server.schemes) == ["http", "https"] and not server.frozen
        # Another rollout cannot start meanwhile; the refusal says what to run.
        other = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--change", "rotate-cert", "--yes"
        )
        assert other.returncode == 1
        assert "awaits finalize" in other.stderr and "tlsroll rollout finalize" in other.stderr
        assert "nothing was started" in other.stderr, other.stderr

        # The practice is told it can switch any time until http closes.
        notice = cluster.cli("notify", "--lang", "en", "--until", "2099-12-12 18:00")
        assert notice.returncode == 0, notice.stderr
        assert "switch each workstation any time until Saturday, 12 December 2099" in notice.stdout
        for node in nodes:
            assert f"(for now {node.http_url()} still works too)" in notice.stdout

        # The movers do the client steps; the stayers do not.
        moved_at = dt.datetime.now(dt.UTC)
        for pair in world.values():
            pair[0].scheme = "https"
        wait_until(
            lambda: all(pair[0].acked_on("https", moved_at) >= 3 for pair in world.values()),
            30,
            "movers writing over https",
        )
        stayers = {n.name: world[n.name][1].source for n in nodes}
        movers = {n.name: world[n.name][0].source for n in nodes}
        # Who is still on http, per node: exactly the stayer, once the agents have reported.
        wait_until(
            lambda: all(on_http_named(cluster, n) == [a] for n, a in stayers.items()),
            30,
            "the still-on-http list",
            interval=SCHEMA_POLL,
        )
        data = schema(cluster)
        for v in data["node_clients"]:
            seen = {(c["scheme"], c["address"]) for c in v["clients"]["clients"]}
            assert ("http", stayers[v["node"]]) in seen and ("https", movers[v["node"]]) in seen
        shown = cluster.cli("schema", "show")
        assert "still on http" in shown.stdout
        for address in stayers.values():
            assert address in shown.stdout

        refused = cluster.cli("rollout", "finalize", phase1, "--yes")
        assert refused.returncode == 1, refused.stdout
        for name, address in stayers.items():
            assert f"{name}: {address}" in refused.stderr
        for address in movers.values():
            assert address not in refused.stderr
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"  # nothing started

        remaining = cluster.cli("notify", "--remaining")
        assert remaining.returncode == 0, remaining.stderr
        for address in stayers.values():
            assert address in remaining.stdout
        for address in movers.values():
            assert address not in remaining.stdout

        moved_at = dt.datetime.now(dt.UTC)
        for pair in world.values():
            pair[1].scheme = "https"
        wait_until(
            lambda: all(on_http_named(cluster, n) == [] for n in stayers),
            30,
            "everyone moved",
            interval=SCHEMA_POLL,
        )
        done = cluster.cli("rollout", "finalize", phase1, "--yes", "--wait", timeout=LONG)
        assert done.returncode == 0, done.stderr
        final = newest(cluster)
        assert final["change"] == "finalize" and final["finalizes"] == phase1
        assert final["state"] == "completed"
        wait_state(cluster, phase1, ("completed",), "phase 1 finalized")
        for node in nodes:
            server = live(node)
            assert list(server.schemes) == ["https"] and not server.frozen
            assert not node.port_open(8080)
        # The finalize's id given to `rollback`: refused, naming the rollout to give (review
        # s64 trans L6); nothing started.
        wrong = cluster.cli("rollout", "rollback", final["id"], "--yes")
        assert wrong.returncode != 0 and newest(cluster)["id"] == final["id"]
        assert f"tlsroll rollout rollback {phase1}" in wrong.stderr, wrong.stderr
        ended = dt.datetime.now(dt.UTC)
        wait_until(  # a few more writes after the end, each workstation's on https
            lambda: all(ws.acked_on("https", ended) >= 1 for pair in world.values() for ws in pair),
            30,
            "writes after the end",
        )
        check_writes(cluster, world, [rollout(cluster, phase1), final])
        # The notice after the finalize (the newest rollout), and phase 1's own since: the
        # switch has ended, http is closed (session 56's second README walk, H1: an internal
        # error, and phase 1's notice said the old address still worked).
        for args in ((), ("--rollout", phase1)):
            notice = cluster.cli("notify", "--lang", "en", *args)
            assert notice.returncode == 0, notice.stderr
            assert "still works" not in notice.stdout and "internal error" not in notice.stderr
            for node in nodes:
                assert node.https_url() in notice.stdout, notice.stdout


# --- a node failing in each phase goes back to the side it came from --------------------------


def write_behind_the_freeze(node: Node) -> None:
    """A row committed straight into the server's store, as a write the freeze failed to stop
    would be: the watermark moves, and the agent's verify must notice (and roll back)."""
    db_path = node.server_data_dir / "entries.sqlite3"
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db, db:
        db.execute(
            "INSERT INTO entries (id, body, created_at) VALUES (?, '{}', '2026-01-01T00:00:00Z')",
            (uuid.uuid4().hex,),
        )


def fail_next_switch(node: Node) -> None:
    """The node's agent dies right after its next restart of the server (the crash hook);
    the test slips a write past the freeze and starts the agent again, which resumes at
    verify, finds the watermark moved and rolls the switch back."""
    assert node.agent is not None
    node.agent.stop()
    node.restart_agent({CRASH_ENV: "restarted"})


def after_the_crash(node: Node) -> None:
    assert node.agent is not None and node.agent.proc is not None
    assert node.agent.proc.wait(90) == -signal.SIGKILL
    write_behind_the_freeze(node)
    node.restart_agent()


@pytest.mark.timeout(420)
def test_a_node_failing_in_each_phase_goes_back_to_the_side_it_came_from(
    tmp_path: Path,
) -> None:
    # Two nodes (a third, like node2 skipped, added only its processes to the machine's load).
    with cluster_of(tmp_path, 2) as (cluster, nodes), two_per_node(cluster, nodes) as world:
        node2 = nodes[1]  # the order: node2, node1 (the leader node last)
        # Phase 1 fails on node2: back to http only, the rollout halts (budget 0).
        fail_next_switch(node2)
        first = start_transitional(cluster, tmp_path)
        after_the_crash(node2)
        view = wait_state(cluster, first, WAITED, "phase 1 halting")
        assert view["state"] == "halted", view
        states = {n["name"]: n["state"] for n in view["nodes"]}
        assert states == {"node1": "skipped", "node2": "rolled_back"}
        assert list(live(node2).schemes) == ["http"]
        # The way on: retry the nodes it left, to dual; then it waits for finalize.
        retried = cluster.cli("rollout", "retry", first, "--wait", timeout=LONG)
        assert retried.returncode == 0, retried.stderr
        phase1 = newest(cluster)["id"]
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        for node in nodes:
            assert sorted(live(node).schemes) == ["http", "https"]

        # Phase 2 fails on node2: back to dual (not http only), phase 1 keeps waiting.
        fail_next_switch(node2)
        forced = cluster.cli("rollout", "finalize", phase1, "--force", "--yes")
        assert forced.returncode == 0, forced.stderr
        finalize = newest(cluster)["id"]
        after_the_crash(node2)
        view = wait_state(cluster, finalize, WAITED, "finalize halting")
        assert view["state"] == "halted", view
        states = {n["name"]: n["state"] for n in view["nodes"]}
        assert states == {"node1": "skipped", "node2": "rolled_back"}
        assert sorted(live(node2).schemes) == ["http", "https"] and not live(node2).frozen
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"

        # Finalize again: every node is dual still, and now they all close http.
        again = cluster.cli(
            "rollout", "finalize", phase1, "--force", "--yes", "--wait", timeout=LONG
        )
        assert again.returncode == 0, again.stderr
        second = newest(cluster)
        assert second["state"] == "completed" and second["finalizes"] == phase1
        wait_state(cluster, phase1, ("completed",), "phase 1 finalized")
        for node in nodes:
            assert list(live(node).schemes) == ["https"] and not node.port_open(8080)
        views = [rollout(cluster, r) for r in (first, phase1, finalize, second["id"])]
        # Nobody moved: the forced finalize cut every workstation off when its node closed
        # http; until then, writes were refused only inside the nodes' restart windows.
        cut = {ws.name: windows(second)[ws.node.name][0] for pair in world.values() for ws in pair}
        check_writes(cluster, world, views, cut_off=cut)


@pytest.mark.timeout(420)
def test_a_retry_of_phase_1_carries_the_nodes_it_left_dual_to_its_finalize(
    tmp_path: Path,
) -> None:
    """Phase 1 halts after one node went dual: that node must not be stranded. Before, the
    retry planned only the unfinished nodes, so its finalize closed http there and left the
    dual node serving http for good (finalize needs a rollout awaiting it; the halted one never
    will, and a new transitional rollout skipped the node as already done). Now the retry starts
    the node ``dual`` (it serves both with this CA's certificate and the same password), and the
    retry's finalize closes http on every node."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node1 = nodes[0]  # the order: node2, then node1 (the leader node last)
        fail_next_switch(node1)
        first = start_transitional(cluster, tmp_path)
        after_the_crash(node1)
        view = wait_state(cluster, first, WAITED, "phase 1 halting")
        assert view["state"] == "halted", view
        states = {n["name"]: n["state"] for n in view["nodes"]}
        assert states == {"node1": "rolled_back", "node2": "dual"}
        retried = cluster.cli("rollout", "retry", first, "--wait", timeout=LONG)
        assert retried.returncode == 0, retried.stderr
        retry = newest(cluster)
        assert retry["state"] == "awaiting_finalize", retry
        states = {n["name"]: n["state"] for n in retry["nodes"]}
        assert states == {"node1": "dual", "node2": "dual"}, retry["nodes"]
        carried = next(n for n in retry["nodes"] if n["name"] == "node2")
        assert first in carried["reason"], carried
        done = cluster.cli(
            "rollout", "finalize", retry["id"], "--force", "--yes", "--wait", timeout=LONG
        )
        assert done.returncode == 0, done.stderr
        assert newest(cluster)["state"] == "completed"
        for node in nodes:
            assert list(live(node).schemes) == ["https"] and not node.port_open(8080), node.name


# --- the way back from dual -------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_rollback_from_dual_returns_every_node_to_http_and_ends_the_wait(tmp_path: Path) -> None:
    # Two nodes, the leader node (last) and one other: what holds for every node holds there
    # (a third, like the second, added only its processes and workstations to the machine's load).
    with cluster_of(tmp_path, 2) as (cluster, nodes), two_per_node(cluster, nodes) as world:
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        # An abort of a waiting rollout would hide that its nodes are dual: refused, with the
        # two ways on.
        abort = cluster.cli("rollout", "abort", phase1)
        assert abort.returncode == 1
        assert "rollout finalize" in abort.stderr and "rollout rollback" in abort.stderr
        back = cluster.cli("rollout", "rollback", phase1, "--yes")
        assert back.returncode == 0, back.stderr
        way_back = newest(cluster)
        assert way_back["change"] == "disable-tls" and way_back["undoes"] == phase1
        way_back = wait_state(cluster, way_back["id"], WAITED, "the way back")
        assert way_back["state"] == "completed", way_back
        for node in nodes:
            assert list(live(node).schemes) == ["http"] and not node.port_open(8443)
        view = wait_state(cluster, phase1, ("aborted",), "phase 1 taken back")
        assert "taken back by rollout" in view["reason"]
        # The log says the state it ended in, as for every other state change (it said
        # "taken_back", which no state is: review s64 trans L7).
        changed = [
            (e.get("state"), e.get("cause"))
            for e in cluster.leader.log_events()
            if e.get("event") == "rollout.state_changed" and e.get("rollout_id") == phase1
        ]
        assert changed[-1] == ("aborted", "taken_back"), changed
        # Nothing waits any more: a new rollout may start.
        plan = cluster.cli("plan", "--scope", "cluster", "--strategy", "transitional")
        assert plan.returncode == 0, plan.stderr
        assert "in two phases (strategy transitional)" in plan.stdout  # both phases explained
        assert "phase 1: https beside http (dual); phase 2 (finalize): http closes" in plan.stdout
        assert "awaiting_finalize" in plan.stdout and "tlsroll rollout finalize" in plan.stdout
        check_writes(cluster, world, [rollout(cluster, phase1), way_back])


# --- the leader killed between the phases ------------------------------------------------------


@pytest.mark.timeout(420)
def test_a_leader_killed_between_the_phases_finalizes_after_its_restart(tmp_path: Path) -> None:
    # Two nodes, the leader node (last) and one other: what holds for every node holds there
    # (a third, like the second, added only its processes and workstations to the machine's load).
    with cluster_of(tmp_path, 2) as (cluster, nodes), two_per_node(cluster, nodes) as world:
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        cluster.kill_leader()
        cluster.start_leader()
        cluster.wait_for_nodes_online([n.name for n in nodes])
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        for pair in world.values():
            for ws in pair:
                ws.scheme = "https"
        done = cluster.cli("rollout", "finalize", "--force", "--yes", "--wait", timeout=LONG)
        assert done.returncode == 0, done.stderr
        final = newest(cluster)
        assert final["finalizes"] == phase1 and final["state"] == "completed"
        wait_state(cluster, phase1, ("completed",), "phase 1 finalized after the restart")
        for node in nodes:
            assert list(live(node).schemes) == ["https"]
        # Session 64's review L3': said of the finalize "only a transitional rollout is
        # finalized", and of phase 1's notice --until "… is not" transitional.
        again = cluster.cli("rollout", "finalize", "--yes")
        assert again.returncode == 1, again.stderr
        assert f"nothing awaits finalize: {final['id']} finalized {phase1}" in again.stderr
        until = f"{dt.datetime.now() + dt.timedelta(days=5):%Y-%m-%d} 18:00"
        told = cluster.cli("notify", "--rollout", phase1, "--until", until)
        assert told.returncode == 2, told.stderr
        assert f"{phase1}'s http was closed by finalize {final['id']}" in told.stderr
        check_writes(cluster, world, [rollout(cluster, phase1), final])


# --- finalize --when-quiet: each node by itself, across a leader restart -----------------------


@contextlib.contextmanager
def fresh_reports(root: Path) -> Iterator[tuple[Cluster, list[Node]]]:
    """Three nodes whose agents read their server's clients afresh every second (the default
    reuses them for 10 s), so "quiet for 8 s" can be told apart from a busy workstation, and
    the still-on-http list follows a workstation's move within seconds."""
    addresses = [next_loopback() for _ in range(3)]
    cluster = AdminTokenCluster(root / "cluster", addresses[0], heartbeat_interval=1)
    nodes = [Node(cluster, f"node{i + 1}", a, root / f"n{i}") for i, a in enumerate(addresses)]
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        start_nodes(nodes, clients_refresh=1)
        cluster.wait_for_nodes_online([n.name for n in nodes])
        yield cluster, nodes
    finally:
        with contextlib.ExitStack() as stack:  # every one closed though one's close raises
            stack.callback(cluster.close)
            for node in nodes:
                stack.callback(node.close)


@pytest.mark.timeout(420)
def test_finalize_when_quiet_closes_each_node_once_its_http_clients_are_gone(
    tmp_path: Path,
) -> None:
    with fresh_reports(tmp_path) as (cluster, nodes), two_per_node(cluster, nodes) as world:
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        for pair in world.values():
            pair[0].scheme = "https"
        stayers = {n.name: world[n.name][1].source for n in nodes}
        wait_until(
            lambda: all(on_http_named(cluster, n) == [a] for n, a in stayers.items()),
            30,
            "the stayers reported on http",
            interval=SCHEMA_POLL,
        )
        started = cluster.cli("rollout", "finalize", phase1, "--when-quiet", "8s", "--yes")
        assert started.returncode == 0, started.stderr
        final_id = newest(cluster)["id"]
        view = rollout(cluster, final_id)
        assert view["when_quiet_seconds"] == 8 and view["finalizes"] == phase1
        # While its stayer writes on http, no node starts — across a leader restart too:
        # node1 and node3, whose stayers write on. node2's stayer moves once the leader is
        # back (its quiet time runs meanwhile: the test waited it out again after this).
        cluster.kill_leader()
        cluster.start_leader()
        cluster.wait_for_nodes_online([n.name for n in nodes])
        world["node2"][1].scheme = "https"
        deadline = time.monotonic() + 12  # longer than the quiet time
        while time.monotonic() < deadline:
            view = rollout(cluster, final_id)
            states = {n["name"]: n["state"] for n in view["nodes"]}
            assert (states["node1"], states["node3"]) == ("pending", "pending"), states
            time.sleep(1)
        # node2 alone is finalized once quiet; the others keep waiting.
        wait_states(
            cluster,
            final_id,
            {"node1": "pending", "node2": "done", "node3": "pending"},
            90,
            "node2 finalized by itself",
        )
        assert list(live(nodes[1]).schemes) == ["https"]
        assert sorted(live(nodes[2]).schemes) == ["http", "https"]
        for name in ("node1", "node3"):
            world[name][1].scheme = "https"
        final = wait_state(cluster, final_id, WAITED, "the rest finalized once quiet")
        assert final["state"] == "completed", final
        wait_state(cluster, phase1, ("completed",), "phase 1 finalized")
        for node in nodes:
            assert list(live(node).schemes) == ["https"]
        check_writes(cluster, world, [rollout(cluster, phase1), final])


@pytest.mark.timeout(420)
def test_the_notice_during_a_partial_when_quiet_finalize_is_about_phase_1_node_by_node(
    tmp_path: Path,
) -> None:
    """Session 64's review M2': with node2 finalized and the others waiting for quiet (a
    --when-quiet finalize may wait days by design), `notify` said "still in progress … make no
    new entries until it is complete", refused --until ("not transitional"), `notify --rollout
    PHASE1` said node2's http "still works too" though 8080 was closed there, and `rollout
    status PHASE1` said every node serves http and https."""
    with fresh_reports(tmp_path) as (cluster, nodes), two_per_node(cluster, nodes) as world:
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        for pair in world.values():
            pair[0].scheme = "https"
        world["node2"][1].scheme = "https"
        stayers = {n: world[n][1].source for n in ("node1", "node3")}
        wait_until(
            lambda: all(on_http_named(cluster, n) == [a] for n, a in stayers.items()),
            30,
            "the stayers reported on http",
            interval=SCHEMA_POLL,
        )
        started = cluster.cli("rollout", "finalize", phase1, "--when-quiet", "8s", "--yes")
        assert started.returncode == 0, started.stderr
        final_id = newest(cluster)["id"]
        wait_states(
            cluster,
            final_id,
            {"node1": "pending", "node2": "done", "node3": "pending"},
            120,
            "node2 finalized by itself",
        )
        assert not nodes[1].port_open(8080)
        http1 = f"http://{nodes[0].address}:8080/"
        http2 = f"http://{nodes[1].address}:8080/"
        until = f"{dt.datetime.now() + dt.timedelta(days=5):%Y-%m-%d} 18:00"
        for args in ((), ("--until", until), ("--rollout", phase1, "--until", until)):
            shown = cluster.cli("notify", "--lang", "en", *args)
            assert shown.returncode == 0, shown.stderr
            text = shown.stdout
            assert "no new entries" not in text and "in progress" not in text, text
            assert "each server restarts briefly when its turn comes" in text
            assert f"({http2}" in text and "closed since" in text
            assert f"(for now {http1}" in text and "still works too" in text
            assert "On the server node2, however, the old address is closed already" in text
            if "--until" in args:
                assert "at the latest" in text
        german = cluster.cli("notify")
        assert german.returncode == 0, german.stderr
        assert "keine neuen Einträge" not in german.stdout
        assert f"({http2}" in german.stdout and "geschlossen)" in german.stdout
        status = cluster.cli("rollout", "status", phase1)
        assert "node2 serve(s) https only (http closed by its finalize)" in status.stderr
        assert "node1, node3 http and https" in status.stderr
        assert "its nodes serve http and https" not in status.stderr


@pytest.mark.timeout(420)
def test_the_notice_after_a_finalize_that_left_a_node_out_tells_phase_1_s_scope(
    tmp_path: Path,
) -> None:
    """Review b3 of session 64 (L4): after a completed finalize the notice (about the switch to
    https, phases 1 and 2) took the finalize's own scope, the nodes phase 1 left dual, so a
    cluster-wide switch whose finalize left out a node cut off (a machine lost) was told as one
    of "the servers listed below". It tells phase 1's scope: the whole multiserver."""
    with cluster_of(tmp_path, 2) as (cluster, (node1, node2)):
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        agent = node2.agent
        assert agent is not None
        serial = f"{agent.cert().serial_number:x}"
        agent.stop()
        revoked = cluster.cli("ca", "revoke", serial)
        assert revoked.returncode == 0, revoked.stderr
        done = cluster.cli(
            "rollout", "finalize", phase1, "--force", "--yes", "--wait", timeout=LONG
        )
        assert done.returncode == 7, done.stderr  # completed without node2 (session 75: 0)
        final = newest(cluster)
        assert final["state"] == "completed" and final["finalizes"] == phase1, final
        states = {n["name"]: n["state"] for n in final["nodes"]}
        assert states == {"node1": "done", "node2": "skipped"}, final["nodes"]
        for lang, whole, listed in (
            ("en", "This affects the whole multiserver.", "servers listed below"),
            ("de", "Betroffen ist der gesamte Multiserver-Verbund.", "unten genannten Server"),
        ):
            shown = cluster.cli("notify", "--lang", lang)
            assert shown.returncode == 0, shown.stderr
            assert whole in shown.stdout and listed not in shown.stdout, shown.stdout
        assert node1.https_url() in shown.stdout
