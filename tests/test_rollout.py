"""Bad input and faults of the rollout (issue 4), each against real processes: a leader, agents
and reference servers on their own loopback addresses, steered with the real ``tlsroll`` CLI.

The leader's store is read beside it in read-only mode (``file:…?mode=ro``) to prove that a
refused or read-only command changed nothing, and to watch a rollout closely enough to act at
an exact point. Two deterministic ways to hold a node in the middle of its switch:

* ``TLSROLL_AGENT_TEST_CRASH_AFTER=frozen`` on its agent: the agent SIGKILLs itself once the
  server is frozen, so the node stays ``switching`` (and the rollout active) until the test
  starts the agent again, which then finishes the transaction from its journal;
* watching the agent's journal and acting while its switch transaction is under way.

A switch that fails: the node's server config demands client certificates
(``require_client_cert``), which an http server ignores, so preflight and stage pass; after the
restart on https the agent's own check (no client certificate) fails and it rolls back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from leader.engine import SILENT, UNKNOWN
from leader.rollout_core import cut_off_mid_switch
from nodeagent.transaction import CRASH_ENV
from tests.cluster import AdminTokenCluster, Cluster, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, port_holder, start_nodes
from tlsroll import pki, spiffe

pytestmark = pytest.mark.slow

TERMINAL = ("completed", "halted", "aborted")
WORKING = ("preflight", "staging", "switching", "confirming")
STORE_TABLES = ("rollouts", "rollout_nodes", "audit")
HOLD_IN_SWITCH = {CRASH_ENV: "frozen"}  # the agent dies with its server frozen, mid-switch
ROLLOUT_TIMEOUT = 60.0


# --- the setting: a cluster and its nodes --------------------------------------------------------


@dataclass
class Setup:
    cluster: Cluster
    nodes: dict[str, Node]
    password_file: Path  # the auth password enable-tls sets (no terminal to show a new one)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cluster.cli(*args, input=input)


@dataclass
class Setups:
    """Makes clusters with started nodes; ``close()`` stops every process (fixture teardown)."""

    root: Path
    clusters: list[Cluster] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)

    def __call__(
        self,
        *names: str,
        agent_env: Mapping[str, Mapping[str, str]] | None = None,
        server: Mapping[str, Mapping[str, object]] | None = None,
        leader_node: str | None = None,
        leader_config: Mapping[str, object] | None = None,
    ) -> Setup:
        """A leader and one node (reference server + agent) per name, all online.
        ``leader_node`` names the node that runs on the leader's own address; ``leader_config``
        is written into its leader.toml before it starts."""
        root = self.root / f"c{len(self.clusters)}"
        cluster = AdminTokenCluster(root, next_loopback(), heartbeat_interval=1)
        self.clusters.append(cluster)
        nodes = {}
        for name in names:
            address = cluster.address if name == leader_node else next_loopback()
            settings: dict[str, Any] = dict((server or {}).get(name, {}))
            node = Node(cluster, name, address, root / name, **settings)
            self.nodes.append(node)
            nodes[name] = node
            node.server.spawn()  # (it needs no leader: it starts while init and the leader do)
        cluster.init(*(("--node-name", leader_node) if leader_node else ()))
        if leader_config:
            cluster.write_leader_config(leader_config)
        cluster.start_leader()
        start_nodes(list(nodes.values()), node_env=agent_env)
        cluster.wait_for_nodes_online(names)
        password_file = root / "password"
        password_file.write_text("correct horse battery staple\n")
        password_file.chmod(0o600)
        return Setup(cluster, nodes, password_file)

    def close(self) -> None:
        errors: list[BaseException] = []
        closables: list[Node | Cluster] = [*self.nodes, *self.clusters]
        for closable in closables:
            try:
                closable.close()
            except Exception as exc:  # keep going: every process must be stopped
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def setups(tmp_path: Path) -> Iterator[Setups]:
    made = Setups(tmp_path)
    try:
        yield made
    finally:
        made.close()


# --- reading the leader's store and the schema ---------------------------------------------------


def store_rows(cluster: Cluster) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the rollout tables and the audit log, read-only beside the leader."""
    uri = f"file:{cluster.store_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return {
            t: [tuple(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY rowid")]  # noqa: S608
            for t in STORE_TABLES
        }


@dataclass(frozen=True)
class Snapshot:
    """The newest rollout as the store has it: id, state, node -> (state, reason)."""

    id: str
    state: str
    nodes: dict[str, tuple[str, str]]

    def node_states(self) -> dict[str, str]:
        return {name: s for name, (s, _) in self.nodes.items()}


def newest(cluster: Cluster) -> Snapshot | None:
    uri = f"file:{cluster.store_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        row = db.execute("SELECT id, state FROM rollouts ORDER BY epoch DESC LIMIT 1").fetchone()
        if row is None:
            return None
        nodes = db.execute(
            "SELECT name, state, reason FROM rollout_nodes WHERE rollout_id = ?", (row[0],)
        ).fetchall()
    return Snapshot(row[0], row[1], {n: (s, r) for n, s, r in nodes})


def wait_rollout(
    cluster: Cluster,
    what: str,
    condition: Callable[[Snapshot], bool],
    timeout: float = ROLLOUT_TIMEOUT,
) -> Snapshot:
    """Poll the store until the newest rollout meets ``condition`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = newest(cluster)
        if snap is not None and condition(snap):
            return snap
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s; last seen {snap}")
        time.sleep(0.05)


def wait_ended(cluster: Cluster, timeout: float = ROLLOUT_TIMEOUT) -> Snapshot:
    return wait_rollout(cluster, "the rollout to end", lambda s: s.state in TERMINAL, timeout)


def schema_json(setup: Setup) -> dict[str, Any]:
    result = setup.cli("schema", "show", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def newest_view(setup: Setup) -> dict[str, Any]:
    """The newest rollout as ``schema show --json`` shows it, asked from this process
    (``Cluster.schema_json``): these tests check the rollout, not that command (a CLI process
    at each look costs a few tenths of a CPU second); test 8 reads the command's own output."""
    rollouts = setup.cluster.schema_json()["rollouts"]
    assert rollouts, "no rollout in the schema"
    view: dict[str, Any] = rollouts[0]
    return view


def nodes_of(view: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in view["nodes"]}


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# --- driving it through the CLI ------------------------------------------------------------------


def start_cmd(setup: Setup) -> list[str]:
    """``rollout start`` with the auth password from a file."""
    return ["rollout", "start", "--password-file", str(setup.password_file)]


def start(setup: Setup, *args: str) -> str:
    """``tlsroll rollout start … --yes`` (default scope cluster); the new rollout's id."""
    result = setup.cli(*start_cmd(setup), *(args or ("--scope", "cluster")), "--yes")
    assert result.returncode == 0, result.stderr
    snap = newest(setup.cluster)
    assert snap is not None
    assert f"rollout {snap.id} started" in result.stdout, result.stdout
    return snap.id


def refused(setup: Setup, args: Sequence[str], code: int = 1) -> str:
    """Run a command that must be refused: exit ``code``, one error line, the store unchanged."""
    before = store_rows(setup.cluster)
    result = setup.cli(*args)
    assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
    line = one_line_error(result.stderr, "tlsroll")
    assert store_rows(setup.cluster) == before, f"{args} changed the store"
    return line


def control_refused(setup: Setup, action: str, state: str, rollout_id: str = "") -> None:
    """An illegal pause/resume/abort: refused with a reason naming the action and the state."""
    args = ["rollout", action, *([rollout_id] if rollout_id else [])]
    line = refused(setup, args)
    words = state.replace("_", " ")
    assert f" is {words}: there is nothing to {action}" in line, line  # (audit s38 L4)
    if rollout_id:
        assert rollout_id in line, line


def control_again(setup: Setup, action: str, rollout_id: str, state: str, named: bool) -> None:
    """A pause, resume or abort given again (audit s39race L1, review rev58a L4: it exited 1):
    what it asks for holds, so it succeeds, says the state, and changes nothing."""

    def rollout_rows() -> tuple[object, ...]:
        """The rollouts and their audit events (the engine may note a node meanwhile)."""
        rows = store_rows(setup.cluster)
        return rows["rollouts"], [a for a in rows["audit"] if str(a[3]).startswith("rollout.")]

    before = rollout_rows()
    result = setup.cli("rollout", action, *([rollout_id] if named else []))
    assert result.returncode == 0, (action, result.stdout, result.stderr)
    assert result.stdout.strip() == f"rollout {rollout_id}: {state}", result.stdout
    assert rollout_rows() == before, f"a repeated {action} changed the rollout"


def control_ok(setup: Setup, action: str, rollout_id: str, state: str) -> None:
    """A legal pause/resume/abort: it says the new state and the schema shows it."""
    result = setup.cli("rollout", action)
    assert result.returncode == 0, (action, result.stderr)
    assert result.stdout.strip() == f"rollout {rollout_id}: {state}", result.stdout
    view = newest_view(setup)
    assert (view["id"], view["state"]) == (rollout_id, state)


# --- what a node looks like from outside ---------------------------------------------------------


@dataclass(frozen=True)
class Before:
    """A node's server as it was before the rollout."""

    config: bytes
    pid: int | None


def before(node: Node) -> Before:
    return Before(node.server.config_path.read_bytes(), node.server_pid())


def assert_untouched(node: Node, was: Before) -> None:
    """Still on http exactly as before: same config, same process, 8080 answers, 8443 closed,
    not frozen, never asked to switch."""
    assert node.server.config_path.read_bytes() == was.config
    assert node.server_pid() == was.pid
    assert node.get("http", "health").status == 200
    assert not node.port_open(8443)
    assert node.admin_status()["frozen"] is False
    assert node.journal_query("SELECT rollout_id, kind FROM txns") == []


def assert_on_https(node: Node, fingerprint: str) -> None:
    assert node.served_fingerprint() == fingerprint
    assert node.get("https").status == 200
    assert not node.port_open(8080)


def wait_agent_died(node: Node) -> None:
    """The agent started with HOLD_IN_SWITCH has killed itself mid-switch."""
    assert node.agent is not None and node.agent.proc is not None
    node.agent.proc.wait(ROLLOUT_TIMEOUT)
    [txn] = node.journal_query("SELECT kind, phase, outcome FROM txns")
    assert txn == {"kind": "switch", "phase": "frozen", "outcome": ""}


# === 1. unknown scope, unknown node; 9. no --yes without a terminal ==============================
# Checked on two online nodes and no rollout, in test 3's checks before they stop a node (they
# had a module-scoped cluster of their own, whose idle daemons lived as long as the module).


def unknown_scope_is_a_usage_error_and_changes_nothing(setup: Setup) -> None:
    for command in ([*start_cmd(setup), "--yes"], ["plan"]):
        line = refused(setup, [*command, "--scope", "galaxy"], code=2)
        assert "galaxy" in line and "--scope" in line, line
    assert newest(setup.cluster) is None


def unknown_node_is_refused_naming_it_and_changes_nothing(setup: Setup) -> None:
    known = next(iter(setup.nodes))
    for command in ([*start_cmd(setup), "--yes"], ["plan"]):
        for nodes in ("nodeX", f"{known},nodeX"):
            # a name no node has: a failure, as for any unknown id (review s47rtin L6)
            line = refused(setup, [*command, "--nodes", nodes], code=1)
            assert "not enrolled: nodeX " in line, line
            assert known not in line, line
    assert newest(setup.cluster) is None


def start_without_yes_and_without_a_terminal_asks_for_yes(setup: Setup) -> None:
    # stdin is a pipe that even says "y": not a terminal, so no consent is read from it.
    before_rows = store_rows(setup.cluster)
    result = setup.cli(*start_cmd(setup), "--scope", "cluster", input="y\n")
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_line_error(result.stderr, "tlsroll")
    assert "--yes" in line, line
    assert "Nothing has been changed." in result.stdout  # the plan was shown
    assert store_rows(setup.cluster) == before_rows
    assert newest(setup.cluster) is None


# === 2. one rollout at a time ====================================================================


def test_start_while_another_rollout_runs_is_refused_naming_it(setups: Setups) -> None:
    s = setups("b1", "b2", agent_env={"b1": HOLD_IN_SWITCH})
    rid = start(s)
    wait_agent_died(s["b1"])  # b1 stays switching: the rollout stays running
    # b2 is prepared meanwhile (prepare_ahead 1) and waits, staged, for b1's switch slot.
    wait_rollout(s.cluster, "b2 prepared", lambda r: r.node_states()["b2"] == "staged")
    assert newest(s.cluster) == Snapshot(
        rid, "running", {"b1": ("switching", ""), "b2": ("staged", "")}
    )

    line = refused(s, [*start_cmd(s), "--nodes", "b2", "--yes"])
    assert f"rollout {rid} is running" in line and "one rollout at a time" in line, line

    control_ok(s, "pause", rid, "paused")
    line = refused(s, [*start_cmd(s), "--nodes", "b2", "--yes"])
    assert f"rollout {rid} is paused" in line, line

    # Abort from paused: b2 never starts; b1 finishes once its agent is back.
    control_ok(s, "abort", rid, "aborting")
    wait_rollout(s.cluster, "b2 skipped", lambda r: r.node_states()["b2"] == "skipped")
    s["b1"].restart_agent()
    assert wait_ended(s.cluster).state == "aborted"
    assert [r[0] for r in store_rows(s.cluster)["rollouts"]] == [rid]


# === 3. an offline node in scope (checked in test 5's cluster, before its rollout) ==============


def start_refused_for_bad_input_and_with_an_offline_node_at_plan_time(setup: Setup) -> None:
    """Tests 1, 9 and 3 on two online nodes and no rollout (the first node stays online, the
    second's agent is left stopped)."""
    s, (on, off) = setup, list(setup.nodes)
    # Tests 1 and 9 first, while both nodes are online.
    unknown_scope_is_a_usage_error_and_changes_nothing(s)
    unknown_node_is_refused_naming_it_and_changes_nothing(s)
    start_without_yes_and_without_a_terminal_asks_for_yes(s)

    stopped = s[off].agent
    assert stopped is not None
    stopped.stop()
    s.cluster.wait_for_nodes([off], online=False)
    listed = json.loads(s.cli("nodes", "--json").stdout)
    assert {n["name"]: n["online"] for n in listed} == {on: True, off: False}

    for command in ([*start_cmd(s), "--yes"], ["plan"]):
        line = refused(s, [*command, "--scope", "cluster"])
        assert f"offline: {off}" in line, line
        assert on not in line, line
    line = refused(s, [*start_cmd(s), "--yes", "--nodes", f"{on},{off}"])
    assert f"offline: {off}" in line, line
    assert newest(s.cluster) is None
    assert s[on].journal_query("SELECT * FROM txns") == []


# === 4. pause / resume / abort in every state ====================================================


def settled(snap: Snapshot | None) -> Snapshot | None:
    """The snapshot without the engine's notes on a node whose agent has been away a while
    ("unknown — agent unreachable since …", after ``UNKNOWN_AFTER`` seconds; "the agent has
    not answered since …", ``SILENT``, while a step's first attempt waits): how soon they
    come depends on the machine's load, not on what these tests check."""
    if snap is None:
        return None
    nodes = {
        name: (state, "" if reason.startswith((UNKNOWN, SILENT)) else reason)
        for name, (state, reason) in snap.nodes.items()
    }
    return replace(snap, nodes=nodes)


def test_controls_in_running_paused_aborting_and_aborted(setups: Setups) -> None:
    s = setups("p1", "p2", "p3", agent_env={"p1": HOLD_IN_SWITCH})
    untouched = {name: before(s[name]) for name in ("p2", "p3")}
    rid = start(s)
    wait_agent_died(s["p1"])  # p1 is in flight (switching) until its agent comes back
    # p2 is prepared meanwhile (prepare_ahead 1, nothing live changes on it); p3 waits.
    wait_rollout(s.cluster, "p2 prepared", lambda r: r.node_states()["p2"] == "staged")
    assert settled(newest(s.cluster)) == Snapshot(
        rid, "running", {"p1": ("switching", ""), "p2": ("staged", ""), "p3": ("pending", "")}
    )

    # A resume of a running rollout: what it asks for holds (review rev58a L4: it exited 1).
    control_again(s, "resume", rid, "running", named=False)
    control_ok(s, "pause", rid, "paused")
    control_again(s, "pause", rid, "paused", named=False)
    control_ok(s, "resume", rid, "running")
    control_ok(s, "abort", rid, "aborting")  # abort mid-rollout, p1 in flight

    # Settled: the untouched nodes skipped, and p1 noted unreachable (its agent is dead; the
    # engine writes that note once, a while after the agent died): the refusals below must
    # leave the store as it is, and an engine write in between is none of theirs.
    unreachable = "unknown — agent unreachable since "
    snap = wait_rollout(
        s.cluster,
        "untouched nodes skipped, p1 noted unreachable",
        lambda r: r.node_states()["p3"] == "skipped" and r.nodes["p1"][1].startswith(unreachable),
    )
    aborting = settled(snap)
    assert aborting is not None and aborting.node_states() == {
        "p1": "switching",
        "p2": "skipped",
        "p3": "skipped",
    }
    assert aborting.nodes["p2"] == aborting.nodes["p3"] == ("skipped", "rollout aborted")
    for action in ("pause", "resume"):
        control_refused(s, action, "aborting")
    control_again(s, "abort", rid, "aborting", named=True)

    # The node in flight finishes safely; then the rollout ends aborted.
    s["p1"].restart_agent()
    snap = wait_ended(s.cluster)
    assert snap.state == "aborted"
    assert snap.node_states() == {"p1": "done", "p2": "skipped", "p3": "skipped"}
    view = newest_view(s)
    assert view["state"] == "aborted" and view["ended_at"]
    assert "abort by admin:" in view["reason"]
    nodes = nodes_of(view)
    assert_on_https(s["p1"], nodes["p1"]["cert_fingerprint"])
    for name, was in untouched.items():
        assert nodes[name]["state"] == "skipped" and nodes[name]["reason"] == "rollout aborted"
        assert_untouched(s[name], was)

    for action in ("pause", "resume"):
        control_refused(s, action, "aborted", rid)
        line = refused(s, ["rollout", action])  # no rollout named, and none is active
        assert "no active rollout" in line or " is aborted: there is nothing to " in line, line
    for named in (True, False):
        control_again(s, "abort", rid, "aborted", named)
    # p1's agent died mid-switch (its port refusing): "unknown" alone, never first the silence
    # note that it replaced within a second (review of s60, L1).
    assert "step.agent_silent" not in s.cluster.leader.event_names()


def test_controls_while_halting_and_after_halted(setups: Setups) -> None:
    # h1's switch fails (and takes a few seconds to roll back) while h2, switching beside it,
    # is held mid-switch: the rollout stays `halting` until h2 has finished.
    s = setups(
        "h1",
        "h2",
        agent_env={"h2": HOLD_IN_SWITCH},
        server={"h1": {"require_client_cert": True, "client_ca_file": "ca.pem"}},
    )
    rid = start(s, "--scope", "cluster", "--max-parallel", "2")
    wait_agent_died(s["h2"])
    # Settled first, as in the test above: h2 noted unreachable (the engine writes that note
    # once, UNKNOWN_AFTER seconds after its agent went silent; a refusal that took that long on
    # a busy machine found the note written meanwhile and the store "changed").
    snap = wait_rollout(
        s.cluster,
        "the rollout halting, h2 noted unreachable",
        lambda r: r.state == "halting" and r.nodes["h2"][1].startswith(UNKNOWN),
    )
    assert snap.node_states() == {"h1": "rolled_back", "h2": "switching"}
    for action in ("pause", "resume", "abort"):
        control_refused(s, action, "halting")

    s["h2"].restart_agent()
    snap = wait_ended(s.cluster)
    assert snap.state == "halted"
    assert snap.node_states() == {"h1": "rolled_back", "h2": "done"}
    for action in ("pause", "resume", "abort"):
        control_refused(s, action, "halted", rid)
    # h2's agent died mid-switch (its port refusing): "unknown" alone, never first the silence
    # note that it replaced within a second (review of s60, L1).
    assert "step.agent_silent" not in s.cluster.leader.event_names()


def test_a_node_cut_off_while_the_halt_drains_is_named_in_the_halts_note(setups: Setups) -> None:
    """Review rev51b L4, end to end: h1's switch fails (the halt) while h2, switching beside
    it, is held mid-switch (its agent dies with its server frozen); h2's machine is then lost:
    its agent's certificate revoked (`tlsroll ca revoke`) while the halt drains. h2 needs
    attention (its outcome not known), and the halt's note, made when h1 failed, now names h2
    too, with `tlsroll nodes remove h2` before the retry (it named h1 alone: the retry then
    refused h2 until it was removed, which no note had said)."""
    s = setups(
        "h1",
        "h2",
        agent_env={"h2": HOLD_IN_SWITCH},
        server={"h1": {"require_client_cert": True, "client_ca_file": "ca.pem"}},
    )
    agent = s["h2"].agent
    assert agent is not None
    serial = f"{agent.cert().serial_number:x}"
    rid = start(s, "--scope", "cluster", "--max-parallel", "2")
    wait_agent_died(s["h2"])
    snap = wait_rollout(s.cluster, "the rollout halting", lambda r: r.state == "halting")
    assert snap.node_states() == {"h1": "rolled_back", "h2": "switching"}, snap
    halting = newest_view(s)["reason"]
    assert halting.startswith("halted: h1 rolled_back: ") and "h2" not in halting, halting
    revoked = s.cli("ca", "revoke", serial)
    assert revoked.returncode == 0, revoked.stderr
    snap = wait_ended(s.cluster)
    assert snap.state == "halted", snap
    assert snap.nodes["h2"] == ("needs_attention", cut_off_mid_switch("h2")), snap
    note = newest_view(s)["reason"]
    assert note.startswith(
        f"{halting.split('; next: ')[0]}; h2 needs_attention: {cut_off_mid_switch('h2')}; next: "
    ), note
    # h2 was in its switch as the halt began (the note then offered the way back), and
    # ended needing attention: no node switched, and the note made again offers no way back,
    # which `rollout rollback` would refuse, "switched no node" (review s63 faults, L1).
    assert "rollout rollback" in halting, halting
    assert note.endswith(
        "next: h2: agent cut off (its certificate revoked): `tlsroll nodes remove h2`, then"
        f" finish the nodes left: tlsroll rollout retry {rid}"
    ), note


# === 5. a node fails: preflight, or the switch itself ============================================


def test_start_refused_with_an_offline_node_then_preflight_failures_change_nothing(
    setups: Setups,
) -> None:
    s = setups("o1", "o2")
    # 3. (and 1, 9) first, before any rollout: a test of its own before, with a cluster of its
    # own. o2's agent is back (and heard by the leader) before the rollout of 5.
    start_refused_for_bad_input_and_with_an_offline_node_at_plan_time(s)
    s["o2"].start_agent_heard()
    s.cluster.wait_for_nodes_online(["o1", "o2"])

    was = {name: before(node) for name, node in s.nodes.items()}
    with port_holder(s["o1"].address, 8443) as holder, port_holder(s["o2"].address, 8443):
        # o1, stepped first, is blocked by its checks: the start is refused with the plan's
        # reason, nothing done (brief s67 engine (a): it was accepted, and halted at once);
        # so is o2, preflighted while o1 switches (the default prepare_ahead 1: review s67
        # rev2 M3), and a failure budget of 1 takes one of the two, not both.
        for budget in ("0", "1"):
            line = refused(
                s, [*start_cmd(s), "--scope", "cluster", "--yes", "--failure-budget", budget]
            )
            assert line.startswith(
                "tlsroll: error: enable-tls cannot start: its first step would fail at once on o1 "
                f"(port 8443 (https) on {s['o1'].address} is taken by"
            ), line
            assert f"o2 (port 8443 (https) on {s['o2'].address} is taken by" in line, line
            assert line.endswith("leave them out (--nodes); nothing was changed"), line
        assert s.cluster.schema_json()["rollouts"] == []  # none was made
        # A failure budget of 2 takes both: started, and o1 then o2 fail their preflights,
        # which changes nothing.
        rid = start(s, "--scope", "cluster", "--failure-budget", "2")
        snap = wait_ended(s.cluster)
        # (The budget takes both failures: it ends completed. A halt with no node switched,
        # whose way on is the retry alone, is tested in test_engine and test_needs_attention:
        # here it could only come from nodes the start refuses now.)
        assert snap.state == "completed"
        assert snap.node_states() == {"o1": "failed", "o2": "failed"}
        view = newest_view(s)
        assert view["id"] == rid
        nodes = nodes_of(view)
        reason = nodes["o1"]["reason"]
        assert f"port 8443 (https) on {s['o1'].address} is taken by" in reason, reason
        assert f"pid {holder.pid}" in reason, reason
        assert f"port 8443 (https) on {s['o2'].address} is taken by" in nodes["o2"]["reason"]
        assert [st["step"] for st in nodes["o1"]["steps"]] == ["preflight"]
        assert [st["step"] for st in nodes["o2"]["steps"]] == ["preflight"]
        # Completed, but nothing switched: `rollout status` says so plainly and exits 7, not
        # 0 with no word of it; its note (`--json`, the table, the viewer) says the same
        # (brief s67 budget).
        said = (
            "completed: 0 of 2 nodes done, 2 failed (within its failure budget of 2): o1 failed: "
            f"port 8443 (https) on {s['o1'].address} is taken by"
        )
        assert view["reason"].startswith(said), view["reason"]
        assert f"; o2 failed: port 8443 (https) on {s['o2'].address} is taken by" in view["reason"]
        assert view["reason"].endswith(
            "; fix what failed them, then a new rollout start covers them (tlsroll plan shows it)"
        ), view["reason"]
        status = s.cli("rollout", "status", rid)
        assert status.returncode == 7, (status.stdout, status.stderr)
        assert status.stderr == f"tlsroll: rollout {rid} {view['reason']}\n", status.stderr
        assert "completed: 0 of 2 nodes done, 2 failed" in " ".join(status.stdout.split())
        as_json = s.cli("rollout", "status", rid, "--json")
        assert as_json.returncode == 7, (as_json.stdout, as_json.stderr)
        assert json.loads(as_json.stdout)["reason"] == view["reason"]
    for name, node in s.nodes.items():
        assert_untouched(node, was[name])


def test_a_retry_refused_for_a_node_blocked_at_once_says_what_a_retry_can_do(
    setups: Setups,
) -> None:
    """Brief s67 engine2 (7): a retry whose first node is still blocked by its checks (its
    port taken) is refused up front (``planner.BlockedAtOnce``), as a start is; its message
    said "leave it out (--nodes)", an option `rollout retry` does not have. Now it says what
    the admin can do: fix it and retry again, or start the change anew without the node."""
    # No node prepared ahead: b3's preflight comes once b2 is done. With one (the default), a
    # loaded machine could preflight b3 before b2's switch began (b2 slow to prepare, b1 done):
    # b3 then halted the rollout with b2 still on http, and the retry's first node was b2, not
    # blocked (the session 70 CI: 7 of 12 concurrent runs, the same on 874cbb1e).
    s = setups("b1", "b2", "b3", "b4", leader_config={"prepare_ahead": 0})
    with port_holder(s["b3"].address, 8443):
        # b3 is blocked, but not preflighted at once (stepped third, past max_parallel: review
        # s67 rev2 M3): started; b1 and b2 switch, b3 halts it.
        rid = start(s, "--nodes", "b1,b2,b3,b4", "--max-parallel", "1", "--failure-budget", "0")
        snap = wait_ended(s.cluster)
        assert snap.state == "halted", snap
        assert snap.node_states() == {
            "b1": "done",
            "b2": "done",
            "b3": "failed",
            "b4": "skipped",
        }, snap
        line = refused(s, ["rollout", "retry", rid])
        assert line.startswith(
            "tlsroll: error: enable-tls cannot start: its first step would fail at once on b3 "
            f"(port 8443 (https) on {s['b3'].address} is taken by"
        ), line
        assert "--nodes)" not in line, line  # (retry has no --nodes)
        assert line.endswith(
            f"fix that, then run tlsroll rollout retry {rid} again; or start enable-tls anew "
            "without it: tlsroll rollout start --change enable-tls --nodes b4; "
            "nothing was changed"
        ), line
    # Fixed (the port free): the same retry is taken, and finishes b3.
    result = s.cli("rollout", "retry", rid, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    snap = wait_ended(s.cluster)
    assert (snap.state, snap.node_states()) == ("completed", {"b3": "done", "b4": "done"}), snap


def test_the_way_back_is_not_refused_for_a_newer_rollout_that_switched_no_node(
    setups: Setups,
) -> None:
    """Brief s67 engine2: `rollout rollback` (no id: every node on https back to http) took the
    newest enable-tls rollout as the one taken back, and when that one had switched no node
    (its node failed its preflight) refused the whole way back, "switched no node; nothing to
    undo", while an older rollout's node ran https. It takes back the newest that switched a
    node. And a way back of a rollout still running, none of its nodes switched yet, was
    refused "switched no node; nothing to undo" with a node mid-switch: now the refusal is
    that the rollout runs, as for any start beside it."""
    s = setups("w1", "w2", "w3", agent_env={"w2": HOLD_IN_SWITCH})
    first = start(s, "--nodes", "w1")
    assert wait_ended(s.cluster).state == "completed"
    more = ["rollout", "start", "--yes", "--nodes"]  # (the password w1 runs: no file)
    with port_holder(s["w3"].address, 8443):
        assert s.cli(*more, "w3", "--failure-budget", "1").returncode == 0
        snap = wait_ended(s.cluster)
        assert snap.node_states() == {"w3": "failed"}, snap
    back = s.cli("rollout", "rollback", "--yes")
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"(disable-tls, undoes {first}) started" in back.stdout, back.stdout
    snap = wait_ended(s.cluster)
    assert (snap.state, snap.node_states()["w1"]) == ("completed", "done"), snap
    assert s["w1"].get("http", "health").status == 200 and not s["w1"].port_open(8443)

    held = start(s, "--nodes", "w2")  # (none on https now: the password from the file)
    wait_agent_died(s["w2"])  # w2 stays switching: the rollout runs, no node switched yet
    for args in (["rollout", "rollback", held, "--yes"], ["rollout", "rollback", "--yes"]):
        line = refused(s, args)
        assert line.startswith(f"tlsroll: error: rollout {held} is running; "), line
        assert "switched no node" not in line, line
    s["w2"].restart_agent()
    assert wait_ended(s.cluster).state == "completed"


def test_failed_switch_is_rolled_back_and_halts_the_rollout(setups: Setups) -> None:
    s = setups(
        "s1",
        "s2",
        "s3",
        server={"s1": {"require_client_cert": True, "client_ca_file": "ca.pem"}},
    )
    was = {name: before(node) for name, node in s.nodes.items()}
    entry = s["s1"].post("http", {"note": "before"}).json()
    rid = start(s)
    snap = wait_ended(s.cluster)
    assert snap.state == "halted"
    assert snap.node_states() == {"s1": "rolled_back", "s2": "skipped", "s3": "skipped"}

    view = newest_view(s)
    assert (view["id"], view["state"]) == (rid, "halted")
    nodes = nodes_of(view)
    reason = nodes["s1"]["reason"]
    assert reason.startswith("verify: "), reason  # the agent's own check after the restart
    assert "8443" in reason and "ROLLBACK FAILED" not in reason, reason
    # What it says of the port: not "not an HTTP answer (RemoteDisconnected)" (s66 logs L2).
    assert "a port that wants client certificates" in reason, reason
    assert nodes["s1"]["freeze_started_at"] and nodes["s1"]["freeze_ended_at"]
    for name in ("s2", "s3"):
        assert nodes[name]["reason"] == "rollout halted"
        assert_untouched(s[name], was[name])
    # s2 was prepared meanwhile (prepare_ahead 1): nothing live, never switched; s3 not even
    # that.
    assert {st["step"] for st in nodes["s2"]["steps"]} <= {"preflight", "stage"}
    assert nodes["s3"]["steps"] == []

    # s1 is back on http with its old config, not frozen, its data intact, and writable.
    s1 = s["s1"]
    assert s1.server.config_path.read_bytes() == was["s1"].config
    assert s1.get("http", "health").status == 200
    assert not s1.port_open(8443)
    assert s1.admin_status()["frozen"] is False
    assert s1.get("http", f"entries/{entry['id']}").status == 200
    assert s1.post("http", {"note": "after"}).status == 201
    [txn] = s1.journal_query("SELECT kind, outcome FROM txns WHERE rollout_id = ?", rid)
    assert txn == {"kind": "switch", "outcome": "rolled_back"}

    # The rendered table says it too.
    table = s.cli("schema", "show")
    assert table.returncode == 0, table.stderr
    assert "halted" in table.stdout and "rolled_back" in table.stdout
    assert "verify:" in table.stdout


def test_a_failed_node_and_a_halt_are_warnings_naming_node_reason_and_next_step(
    setups: Setups,
) -> None:
    """Review s66 logs M1: a node rolled back and the halt behind it were logged at info only,
    the halt's line with neither reason nor next command: `journalctl -p warning` (README "When
    it fails") showed nothing of them. Now a failed node's ``step.finished`` is a warning (one
    that needs attention an error), a halt's ``rollout.state_changed`` a warning with its note
    (`tlsroll rollout retry ID`), and a rollout completed within its failure budget without a
    node a warning naming it."""
    s = setups("w1", "w2", server={"w1": {"require_client_cert": True, "client_ca_file": "ca.pem"}})
    pw = str(s.password_file)
    begin = ("rollout", "start", "--scope", "cluster", "--yes", "--wait")
    done = s.cli(*begin, "--password-file", pw, "--failure-budget", "1")
    # Completed without w1: said, exit 7 (brief s67 budget: it was 0, no word of it).
    assert done.returncode == 7, (done.stdout, done.stderr)
    assert "completed: 1 of 2 nodes done, 1 failed (within its failure budget of 1): w1" in (
        done.stderr
    ), done.stderr
    done = s.cli(*begin)  # w1 alone (w2 is done; w2's password): it fails again, and halts
    assert done.returncode == 3, (done.stdout, done.stderr)
    events = s.cluster.leader.log_events()
    loud = [e for e in events if e["level"] in ("warning", "error")]
    failed = [e for e in loud if e["event"] == "step.finished" and e["node"] == "w1"]
    assert [e["node_event"] for e in failed] == ["switch_rolled_back"] * 2, failed
    first, second = (e["rollout_id"] for e in failed)
    assert first != second
    assert all(e["level"] == "warning" and "verify" in e["reason"] for e in failed), failed
    changed = [e for e in loud if e["event"] == "rollout.state_changed"]
    completed = [e for e in changed if e["rollout_id"] == first]
    assert [e["state"] for e in completed] == ["completed"], changed
    note = completed[0]["note"]
    assert "1 failed (within its failure budget of 1): w1 rolled_back: " in note, completed
    assert "verify" in note, completed
    halted = [e for e in changed if e["rollout_id"] == second]
    assert halted and {e["state"] for e in halted} <= {"halting", "halted"}, changed
    assert all(f"tlsroll rollout retry {second}" in e["note"] for e in halted), halted
    assert all("w1" in e["note"] for e in halted), halted
    # Nothing of w2's (done) above info.
    assert not [e for e in loud if e.get("node") == "w2"], loud


# === 6. the leader dies while a node switches ====================================================


def test_leader_killed_mid_switch_resumes_and_completes(setups: Setups) -> None:
    s = setups("k1", "k2")
    k1 = s["k1"]
    rid = start(s)

    def k1_switching() -> bool:
        rows = k1.journal_query(
            "SELECT phase FROM txns WHERE rollout_id = ? AND kind = 'switch'", rid
        )
        return bool(rows) and rows[0]["phase"] in ("frozen", "config_written")

    wait_until(k1_switching, ROLLOUT_TIMEOUT, "k1's switch under way", interval=0.02)
    s.cluster.kill_leader()
    killed = newest(s.cluster)
    assert killed is not None and (killed.id, killed.state) == (rid, "running")
    assert killed.nodes["k1"] == ("switching", "")
    # k2 is being prepared meanwhile (prepare_ahead 1): not yet begun its switch.
    assert killed.nodes["k2"][0] in ("pending", "preflight", "staging", "staged"), killed
    assert killed.nodes["k2"][1] == "", killed

    # The agent carries its transaction to the end without the leader; nothing else moves.
    assert k1.wait_txn(rid).outcome == "completed"
    assert newest(s.cluster) == killed

    s.cluster.start_leader()
    snap = wait_ended(s.cluster)
    assert snap.state == "completed"
    assert snap.node_states() == {"k1": "done", "k2": "done"}
    nodes = nodes_of(newest_view(s))
    for name, node in s.nodes.items():
        assert_on_https(node, nodes[name]["cert_fingerprint"])
        # The switch ran once: one transaction, one freeze, one config write, one restart.
        txns = node.journal_query("SELECT rollout_id, kind, outcome FROM txns")
        assert txns == [{"rollout_id": rid, "kind": "switch", "outcome": "completed"}]
        events = node.journal_events(rid)
        for action in ("freeze", "write_config", "restart", "unfreeze"):
            assert events.count((action, "begin")) == 1, (name, action, events)
        assert all(what != "error" for _, what in events), events
    # The restarted leader asked k1 for its transaction rather than running a new one.
    assert k1.driver_started_pids() == [k1.server_pid()]


# === 7. the viewer never writes ==================================================================


def test_schema_show_and_friends_change_nothing(setups: Setups) -> None:
    # v1's agent dies mid-switch, so the pause lands with v1 in flight and v3 still pending
    # (a pause sent right after the start could land after v1 and v2 were done: a fast switch
    # on an idle machine). v1's agent back, v1 finishes; v2, prepared ahead, waits staged.
    s = setups("v1", "v2", "v3", agent_env={"v1": HOLD_IN_SWITCH})
    rid = start(s)
    wait_agent_died(s["v1"])
    control_ok(s, "pause", rid, "paused")
    s["v1"].restart_agent()
    # Let the node in flight finish so that nothing moves by itself (a node prepared ahead
    # waits staged while the rollout is paused).
    wait_rollout(
        s.cluster,
        "no node in flight",
        lambda r: not any(st in WORKING for st in r.node_states().values()),
    )
    snap = newest(s.cluster)
    assert snap is not None and snap.state == "paused"
    assert "pending" in snap.node_states().values()

    before_rows = store_rows(s.cluster)
    for args in (
        ["schema", "show"],
        ["schema", "show", "--json"],
        ["schema", "show", "--rollout", rid],
        ["rollout", "status"],
        ["rollout", "status", "--json"],
        ["plan", "--scope", "cluster"],
        ["plan", "--scope", "cluster", "--json"],
    ):
        result = s.cli(*args)
        if args[0] == "plan":  # shown, then exit 1: a start of it is refused while one runs
            assert result.returncode == 1, (args, result.stderr)
            assert "one rollout at a time" in result.stderr, (args, result.stderr)
        else:
            assert result.returncode == 0, (args, result.stderr)
        assert store_rows(s.cluster) == before_rows, f"{args} changed the store"
    assert newest(s.cluster) == snap

    control_ok(s, "resume", rid, "running")
    assert wait_ended(s.cluster).state == "completed"


# === 8. the schema of a completed rollout (and 4., the controls after completed) ==============


def test_schema_json_of_a_completed_rollout_is_complete(setups: Setups) -> None:
    # x1 runs on the leader's own address: it goes last.
    s = setups("x1", "x2", leader_node="x1")
    t0 = dt.datetime.now(dt.UTC)
    rid = start(s)
    assert wait_ended(s.cluster).state == "completed"
    t1 = dt.datetime.now(dt.UTC)

    data = schema_json(s)
    td = spiffe.trust_domain(pki.load_cert_pem(s.cluster.ca_cert_path.read_bytes()))
    assert when(data["generated_at"]) >= t1 - dt.timedelta(seconds=5)
    [r] = data["rollouts"]
    assert r["id"] == rid
    # Each agent's measure of its freeze in elapsed time reached the leader's store (not the
    # fallback, the wall-clock times' difference, which a NULL there stands for) and is the
    # window the schema shows (clock audit s35 J).
    uri = f"file:{s.cluster.store_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        measured = dict(
            db.execute(
                "SELECT name, freeze_seconds FROM rollout_nodes WHERE rollout_id = ?", (rid,)
            ).fetchall()
        )
    assert None not in measured.values(), measured
    assert {n["name"]: n["freeze_seconds"] for n in r["nodes"]} == measured
    assert (r["change"], r["scope"], r["scope_nodes"], r["strategy"]) == (
        "enable-tls",
        "cluster",
        [],
        "direct",
    )
    assert (r["max_parallel"], r["failure_budget"], r["freeze"]) == (1, 0, "node")
    assert (r["state"], int(r["epoch"]), r["reason"]) == ("completed", 1, "")  # int64: a string
    assert r["started_by"] == f"admin:{getpass.getuser()}"
    created, started, ended = (when(r[k]) for k in ("created_at", "started_at", "ended_at"))
    assert t0 - dt.timedelta(seconds=2) <= created <= started <= ended <= t1
    assert [n["name"] for n in r["nodes"]] == ["x2", "x1"]  # by name, the leader node last
    assert [n["leader_node"] for n in r["nodes"]] == [False, True]

    switched = started  # when the node before (in order) ended its confirm
    for n in r["nodes"]:
        node = s[n["name"]]
        ip = node.address
        assert (n["state"], n["reason"]) == ("done", "")
        assert n["old_url"] == f"http://{ip}:8080/praxis_live/"
        assert n["new_url"] == f"https://{ip}:8443/praxis_live/"
        assert n["bootstrap_port"] == 9443
        freeze = when(n["freeze_started_at"]), when(n["freeze_ended_at"])
        assert freeze[0] < freeze[1]
        assert n["restart_seconds"] > 0
        # the window's length as the agent measured it (clock audit s35 J): it holds the restart
        assert n["restart_seconds"] <= n["freeze_seconds"]
        assert n["cert_fingerprint"].startswith("sha256:")
        assert_on_https(node, n["cert_fingerprint"])
        # Its holder named as a role no peer of the cluster accepts (SPEC "Identity"; spec
        # audit s38 L3: it carried no URI at all).
        served = pki.load_cert_pem(ssl.get_server_certificate((ip, 8443)).encode())
        assert spiffe.of(served) == spiffe.server(td, n["name"])
        not_after = when(n["cert_not_after"])
        assert t0 + dt.timedelta(days=300) < not_after <= t1 + dt.timedelta(days=398)
        assert node.admin_status()["frozen"] is False
        assert node.post("https", {"note": "after the rollout"}).status == 201

        steps = {st["step"]: (when(st["started_at"]), when(st["ended_at"])) for st in n["steps"]}
        assert list(steps) == ["preflight", "stage", "switch", "confirm"]
        last_end = started
        for step, (a, b) in steps.items():
            assert last_end <= a <= b, (n["name"], step, steps)
            last_end = b
        # x1 is prepared while x2 switches (prepare_ahead 1); its switch waits for x2's end.
        assert switched <= steps["switch"][0], (n["name"], steps)
        switched = steps["confirm"][1]
        assert steps["switch"][0] <= freeze[0] and freeze[1] <= steps["switch"][1]

    # The same rollout, as `rollout status --json` and in the table.
    status = s.cli("rollout", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == r
    table = s.cli("schema", "show")
    assert table.returncode == 0, table.stderr
    for n in r["nodes"]:
        assert n["new_url"] in table.stdout and n["old_url"] in table.stdout

    # Controls after completed (a test of its own before, with a cluster of its own): refused,
    # naming the state, the store unchanged.
    for action in ("pause", "resume", "abort"):
        control_refused(s, action, "completed", rid)
