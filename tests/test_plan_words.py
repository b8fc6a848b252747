"""What the plan tells the admin (audit s38), against a real leader, agent and reference server:
the direct switch says who loses the server and points to the transitional strategy, with the
http workstations counted per node; the seed's data-loss warning is a warning, not reassurance;
a change that cannot start is blocked in the plan (exit 1) and refused by the start before any
node is touched; `--yes` still prints the warnings; an admin action a rollout's state does not
allow is said plainly."""

from __future__ import annotations

import datetime as dt
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node

RECONNECT = "All connected clients must re-initiate their server connections"
ENTRIES = (
    "Staff must make no new entries during the switch (tlsroll notify tells them): entries "
    "already acknowledged are kept, but one refused with 503 during the freeze must be made "
    "again; with --freeze node the other nodes keep taking entries."
)


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[tuple[Cluster, Node]]:
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    node = Node(cluster, "node1", address, tmp_path / "node1")
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        node.start(clients_refresh=1)
        cluster.wait_for_nodes_online(["node1"])
        yield cluster, node
    finally:
        node.close()
        cluster.close()


def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "pw"
    path.touch(0o600)
    path.write_text("plan-words-password-for-the-practice\n")
    return path


def on_http(node: Node) -> None:
    """One workstation (its own loopback address) reads from the node over http."""
    conn = http.client.HTTPConnection(
        node.address, 8080, timeout=10, source_address=(next_loopback(), 0)
    )
    try:
        conn.request("GET", node.server.app_path, headers={"Connection": "close"})
        conn.getresponse().read()
    finally:
        conn.close()


def plan_json(cluster: Cluster, *args: str) -> tuple[int, dict[str, Any]]:
    run = cluster.cli("plan", "--scope", "local", "--json", *args)
    return run.returncode, json.loads(run.stdout) if run.stdout.strip() else {}


@pytest.mark.timeout(240)
def test_what_the_plan_tells_the_admin(one_node: tuple[Cluster, Node], tmp_path: Path) -> None:
    cluster, node = one_node

    # M5: rotate-cert on a node on http only: blocked in the plan, exit 1 (it said "will
    # switch", exit 0, and the start then halted at the node's preflight).
    plan = cluster.cli("plan", "--scope", "local", "--change", "rotate-cert")
    assert plan.returncode == 1, (plan.stdout, plan.stderr)
    (line,) = [ln for ln in plan.stdout.splitlines() if ln.startswith("  1. node1")]
    assert line.endswith("— blocked: not on https; run enable-tls first"), line
    assert plan.stderr.strip() == (
        "tlsroll: error: rotate-cert is blocked on node1 (not on https; run enable-tls first): "
        "fix that, or leave it out (--nodes); nothing was changed"
    )
    # ... with its own steps: no address to change, nothing asked of the workstations.
    assert "change server address" not in plan.stdout
    assert "none: the address, the port and the password stay the same" in plan.stdout
    code, data = plan_json(cluster, "--change", "rotate-cert")
    assert code == 1 and data["rollout"]["nodes"][0]["reason"].startswith("blocked: not on https")
    start = cluster.cli("rollout", "start", "--scope", "local", "--change", "rotate-cert", "--yes")
    assert start.returncode == 1, (start.stdout, start.stderr)
    assert "not on https; run enable-tls first" in start.stderr
    # change-password with nothing staged: refused by the plan too, as a failure (exit 1).
    for words in (("plan",), ("rollout", "start", "--yes")):
        run = cluster.cli(*words, "--scope", "local", "--change", "change-password")
        assert run.returncode == 1, (words, run.stdout, run.stderr)
        assert run.stderr.strip() == (
            "tlsroll: error: no password staged: run `tlsroll password set` first"
        )
    schema = json.loads(cluster.cli("schema", "show", "--json").stdout)
    assert not schema.get("rollouts"), schema  # nothing was started

    # M1: the direct plan counts the workstations still on http, per node, and says what
    # happens to them; M2: the seed's warning about entries, not "no data is lost".
    on_http(node)
    wait_until(
        lambda: plan_json(cluster)[1]["rollout"]["nodes"][0].get("still_on_http") == 1,
        30,
        "the plan to count the workstation on http",
    )
    plan = cluster.cli("plan", "--scope", "local")
    assert plan.returncode == 0, plan.stderr
    text = " ".join(plan.stdout.split())  # rich folds long lines
    assert "1. node1 (leader node) — will switch; 1 workstation(s) still on http lose the " in text
    assert f"{RECONNECT}: http (8080) closes the moment each node switches" in text
    assert "--strategy transitional" in text
    assert "1 workstation(s) were seen on http lately and not on https since (node1: 1)" in text
    assert ENTRIES in text
    assert "no data is lost" not in text

    # M6a: with --yes the plan is not shown, but its warnings are.
    start = cluster.cli(
        *("rollout", "start", "--scope", "local", "--yes"),
        *("--password-file", str(password_file(tmp_path)), "--wait"),
        timeout=120,
    )
    assert start.returncode == 0, (start.stdout, start.stderr)
    said = " ".join(start.stdout.split())
    assert "The switch restarts the managed server on each node." in said
    assert RECONNECT in said and ENTRIES in said
    assert "(node1: 1)" in said

    # rotate-cert now runs (the node is on https), with its own texts.
    plan = cluster.cli("plan", "--scope", "local", "--change", "rotate-cert")
    assert plan.returncode == 0, (plan.stdout, plan.stderr)
    text = " ".join(plan.stdout.split())
    # ... and says what happens to the node: a new certificate and a restart, no switch.
    assert "1. node1 (leader node) — will get a new certificate and restart" in text, text
    assert "will switch" not in text and "blocked" not in text
    assert "the address, the port and the password stay the same" in text
    assert "8080 closes" not in text and "change server address" not in text

    # L4: an action the rollout's state does not allow, in the admin's words.
    rid = cluster.newest_rollout()["id"]
    pause = cluster.cli("rollout", "pause")
    assert pause.returncode == 1
    assert pause.stderr.startswith(
        f"tlsroll: error: rollout {rid} is completed: there is nothing to pause; it has ended: "
    ), pause.stderr
    assert "not allowed in state" not in pause.stderr


def test_a_retry_gives_the_warnings_of_its_change_as_the_plan_does() -> None:
    """Brief s39small: `rollout retry` printed none of the warnings `rollout start` prints. It
    gives those of the retried change, from the texts the leader's plan sends
    (``leader.plan_texts``); a finalize (whose plan is never asked for) has its own."""
    from leader.cli.rollout import change_warnings
    from leader.plan_texts import FINALIZE_WARNINGS, plan_texts
    from leader.rollout_core import Change, FreezeMode, Strategy
    from leader.wire import CHANGE, FREEZE, STRATEGY
    from tlsroll.v1 import schema_pb2

    for change, strategy in (
        (Change.ENABLE_TLS, Strategy.DIRECT),
        (Change.ENABLE_TLS, Strategy.TRANSITIONAL),
        (Change.ROTATE_CERT, Strategy.DIRECT),
        (Change.CHANGE_PASSWORD, Strategy.DIRECT),
        (Change.DISABLE_TLS, Strategy.DIRECT),
    ):
        view = schema_pb2.RolloutView(
            change=CHANGE.wire(change),
            strategy=STRATEGY.wire(strategy),
            freeze=FREEZE.wire(FreezeMode.SCOPE),
        )
        warnings = change_warnings(view)
        assert warnings == plan_texts(change, strategy, FreezeMode.SCOPE, own_certs=False)[2]
        assert warnings[-1].startswith("Staff must make no new entries"), warnings
    seed = change_warnings(schema_pb2.RolloutView(change=CHANGE.wire(Change.ENABLE_TLS)))
    assert seed[0] == "The switch restarts the managed server on each node.", seed
    assert seed[1].startswith("All connected clients must re-initiate"), seed
    final = change_warnings(schema_pb2.RolloutView(change=CHANGE.wire(Change.FINALIZE)))
    assert final[:-1] == list(FINALIZE_WARNINGS), final
    assert "--strategy transitional" not in " ".join(final), final
    assert change_warnings(schema_pb2.RolloutView()) == []


def test_a_plan_that_leaves_enrolled_nodes_out_says_the_cluster_is_mixed_afterwards() -> None:
    """Review s69 revlocal H1: the seed says the choice between the local node and the whole
    multiserver "should be thought through before the switch"; the plan and the prompt of
    `--scope local` in a cluster of three said nothing of the two nodes it leaves on http. The
    plan's warning (``PlanRollout`` adds it: plan, prompt, `rollout start --yes`) names them,
    says the cluster is mixed afterwards, whose workstations are concerned, and how to
    finish; the way back of some nodes and a change-password of some say theirs."""
    from leader.plan_texts import outside_scope_warning
    from leader.rollout_core import Change

    outside = {"node2": "http", "node3": "http frozen", "node4": "https", "node5": "down: x"}
    said = outside_scope_warning(Change.ENABLE_TLS, ["node1"], outside, "node1")
    assert said == (
        "Only node1 (the leader node) switches to https: node2, node3 stay on http, so the "
        "cluster is mixed afterwards (some servers on https, some on http). Only the "
        "workstations of the servers that switch need the client steps; those of node2, node3 "
        "keep their http address. To switch the rest later: tlsroll plan --nodes node2,node3, "
        "then tlsroll rollout start --nodes node2,node3 (tlsroll notify with the same scope "
        "tells the staff which servers change)."
    )
    named = outside_scope_warning(Change.ENABLE_TLS, ["node1", "node2"], {"node3": "http"})
    assert named.startswith("Only node1, node2 switch to https: node3 stays on http, so ")
    # Nothing is left different: no warning (every other node on https already, or unknown).
    assert outside_scope_warning(Change.ENABLE_TLS, ["node2"], {"n4": "https", "n5": ""}) == ""
    back = outside_scope_warning(Change.DISABLE_TLS, ["node1"], outside, "node1")
    assert back.startswith(
        "Only node1 (the leader node) goes back to http: node4 stays on https, so the cluster "
        "is mixed afterwards."
    )
    password = outside_scope_warning(Change.CHANGE_PASSWORD, ["node1", "node2"], outside)
    assert "node4 stays on the password in use now" in password
    assert password.endswith("tlsroll rollout start --change change-password --nodes node4.")
    # Session 69 (smalls, 6): the advice named every such node in one --nodes list (at 200
    # nodes one unreadable command); capped as the enable-tls advice is (``rest_scope``).
    many = {f"n{i:03}": "https" for i in range(2, 201)}
    big = outside_scope_warning(Change.CHANGE_PASSWORD, ["n001"], many)
    assert "n050" not in big and len(big) < 700, big
    assert big.endswith(
        "To give them the new one too: tlsroll rollout start --change change-password --scope "
        "cluster (the nodes with the new password already are left alone)."
    ), big
    unknown = outside_scope_warning(Change.CHANGE_PASSWORD, ["n001"], {**many, "n300": ""})
    assert unknown.endswith(
        "(the nodes with the new password already are left alone; it takes in n300 too, whose "
        "servers are not known now: wait until their agents are heard, or leave them out with "
        "--nodes)."
    ), unknown
    # A node on http only has a cluster change-password refused: ten at a time, said why.
    mixed = outside_scope_warning(Change.CHANGE_PASSWORD, ["n001"], {**many, "h1": "http"})
    assert "n050" not in mixed and len(mixed) < 700, mixed
    assert mixed.endswith(
        "tlsroll rollout start --change change-password --nodes n002,n003,n004,n005,n006,n007,"
        "n008,n009,n010,n011, then the next 10 of them the same way, and so on (tlsroll "
        "rollout start --change change-password --scope cluster is refused while h1 is on http "
        "only)."
    ), mixed
    # The cap's edge: ten such nodes are named, the eleventh makes it --scope cluster.
    ten = {f"n{i:03}": "https" for i in range(2, 12)}
    at_ten = outside_scope_warning(Change.CHANGE_PASSWORD, ["n001"], ten)
    assert at_ten.endswith(f"--change change-password --nodes {','.join(ten)}."), at_ten
    eleven = outside_scope_warning(Change.CHANGE_PASSWORD, ["n001"], {**ten, "n012": "https"})
    assert eleven.endswith(
        "--scope cluster (the nodes with the new password already are left alone)."
    )
    assert outside_scope_warning(Change.ROTATE_CERT, ["node1"], outside) == ""


def test_the_rest_of_a_large_mixed_cluster_is_one_short_command_said_alike_everywhere() -> None:
    """Review s69 revlocal2 L4: the advice for a mixed cluster (`tlsroll nodes`, the plan of
    some nodes, `schema show`, the viewer) put every node on http into one `--nodes a,b,…`:
    at 200 nodes one unreadable command. Up to ten are named; beyond, `--scope cluster` (a
    cluster enable-tls leaves the nodes on https already alone), naming the nodes not known
    now that it takes in too; one helper (``leader.mixed_cluster``) says it for all."""
    from leader.cli.identity import _mixed_schemes
    from leader.mixed_cluster import NAMED, mixed, mixed_line, switch_the_rest
    from leader.plan_texts import outside_scope_warning
    from leader.planner import MAX_NAMED
    from leader.rollout_core import Change
    from tlsroll.v1 import admin_pb2

    assert NAMED == MAX_NAMED
    many = [f"n{i:03}" for i in range(2, 201)]  # 199 nodes on http
    servers = {"n001": "https", **dict.fromkeys(many, "http")}
    m = mixed(servers)
    assert m is not None
    line = mixed_line(m)
    assert line == (
        "a mixed cluster: n002, n003, n004, n005, n006, n007, n008, n009, n010, n011 and 189 "
        "more on http, n001 on https; to switch the rest: tlsroll plan --scope cluster, then "
        "tlsroll rollout start --scope cluster (the nodes on https already are left alone)"
    )
    listed = [admin_pb2.NodeInfo(name=n, server=s) for n, s in servers.items()]
    assert _mixed_schemes(listed) == line  # `tlsroll nodes`
    said = outside_scope_warning(Change.ENABLE_TLS, ["n001"], dict.fromkeys(many, "http"))
    assert "n201" not in said and "n050" not in said and len(said) < 700, said
    assert (
        "To switch the rest later: tlsroll plan --scope cluster, then tlsroll rollout start "
        "--scope cluster (the nodes on https already are left alone) (tlsroll notify" in said
    )
    # A node not known now is in a cluster rollout too: said, with the way out.
    unknown = switch_the_rest(many, ["n300"])
    assert unknown.endswith(
        "(the nodes on https already are left alone; it takes in n300 too, whose servers are "
        "not known now: wait until their agents are heard, or leave them out with --nodes)"
    )
    # A few are named, as before: the exact command.
    assert switch_the_rest(["b", "a"]) == (
        "tlsroll plan --nodes a,b, then tlsroll rollout start --nodes a,b"
    )
    assert mixed({"a": "https", "b": "down: x"}) is None  # nothing on http: not mixed


def test_the_command_for_the_nodes_behind_the_newest_password_names_ten_at_most() -> None:
    """Session 69 left it: ``password_behind``'s command (`tlsroll nodes`, `schema show`, the
    viewer) named every node behind in one ``--nodes``; it is capped as the mixed cluster's
    advice is: ten by name, then the next ten the same way (never the cluster: it would take
    in nodes on http, where a change-password does not start)."""
    from leader.cli.draw import password_behind_words
    from leader.schema_store import PasswordBehind, StagedAuth
    from leader.schema_view import behind_view, finish_password_command
    from tlsroll.wire import to_dict

    start = "tlsroll rollout start --change change-password --nodes "
    assert finish_password_command(["c", "a"]) == start + "a,c"  # a few: the exact command
    ten = [f"n{i:03}" for i in range(1, 11)]
    assert finish_password_command(reversed(ten)) == start + ",".join(ten)
    many = [f"n{i:03}" for i in range(1, 201)]
    command = finish_password_command(many)
    assert command == start + ",".join(ten) + ", then the next 10 of them the same way, and so on"
    behind = PasswordBehind(
        StagedAuth(2, "admin:x", dt.datetime(2026, 12, 1, tzinfo=dt.UTC)),
        tuple((n, 1) for n in many),
    )
    shown = password_behind_words(to_dict(behind_view(behind)))[2]  # `schema show`, `nodes`
    assert shown.endswith(command) and "n011" not in shown, shown


def test_the_rest_of_a_mixed_cluster_is_a_cluster_rollout_only_where_it_leaves_https_alone() -> (
    None
):
    """Review of s69 (closing, M): beyond ten nodes on http the advice was `--scope cluster`,
    "the nodes on https already are left alone", also where a node counted "on https" is dual
    (http+https: a halted transitional phase 1), which the advised cluster enable-tls refuses as
    a whole (``WrongSource``), or serves https with a certificate not of this CA (https before
    tlsroll), which it plans and whose certificate it would replace. `--scope cluster` only
    where the planner finds every node on https "already done"; else ten at a time by name,
    saying why, and a dual node named with its own way; alike in `tlsroll nodes` (by
    ``NodeInfo.other_certificate``), the plan's warning and `schema show`."""
    from leader import planner
    from leader.cli.identity import _mixed_schemes
    from leader.mixed_cluster import CLUSTER, mixed, mixed_line, rest_scope
    from leader.plan_texts import outside_scope_warning
    from leader.rollout_core import Change, NodeObservation, Scope
    from tlsroll.v1 import admin_pb2

    names = [f"n{i:02}" for i in range(12)]  # twelve on http
    on_http = NodeObservation(reachable=True, schemes=("http",))
    cases = {  # the node on https: its server by the heartbeat, what its agent says, foreign
        "done": ("https", NodeObservation(True, schemes=("https",), cert_from_ca=True), False),
        "dual": (
            "http+https",
            NodeObservation(True, schemes=("http", "https"), cert_from_ca=True),
            False,
        ),
        "other": ("https", NodeObservation(True, schemes=("https",), cert_from_ca=False), True),
    }
    batch = "--nodes " + ",".join(names[:10])
    for case, (server, seen, other) in cases.items():
        servers = {**dict.fromkeys(names, "http"), "x1": server}
        m = mixed(servers, ["x1"] if other else [])
        assert m is not None
        line = mixed_line(m)
        listed = [
            admin_pb2.NodeInfo(name=n, server=s, other_certificate=other and n == "x1")
            for n, s in servers.items()
        ]
        assert _mixed_schemes(listed) == line, case  # `tlsroll nodes`
        warned = outside_scope_warning(
            Change.ENABLE_TLS, ["n99"], servers, other_certificate=["x1"] if other else []
        )
        # What the planner makes of the cluster scope, as the advice must say it.
        observed = {**dict.fromkeys(names, on_http), "x1": seen}
        try:
            _, records = planner.plan_rollout(
                rollout_id="r", change=Change.ENABLE_TLS, scope=Scope.cluster(), epoch=1,
                enrolled=dict.fromkeys(observed, True), leader="n00", observed=observed,
            )  # fmt: skip
            left_alone = {r.name: r.state.value for r in records}["x1"] == "skipped"
        except planner.WrongSource:
            left_alone = False
        assert left_alone == (case == "done"), case
        if case == "done":
            assert rest_scope(m.on_http, not m.dual and not m.other_certificate) == CLUSTER
            assert line.endswith(
                "tlsroll plan --scope cluster, then tlsroll rollout start --scope cluster (the "
                "nodes on https already are left alone)"
            ), line
            continue
        assert CLUSTER + ")" not in line and "left alone" not in line, line
        assert (
            f"tlsroll plan {batch}, then tlsroll rollout start {batch}, then the next 10 of "
            "them the same way, and so on (not --scope cluster: "
        ) in line, line
        assert "n10" not in line.split("; to switch")[1], line  # the batch: ten by name
        if case == "dual":
            assert line.endswith(
                "(not --scope cluster: it refuses x1, on http and https); x1 serves http and "
                "https, as a transitional rollout's phase 1 leaves a node: close http there "
                "with tlsroll rollout finalize, or tlsroll rollout retry, of the rollout that "
                "left it"
            ), line
        else:
            assert line.endswith(
                "(not --scope cluster: it would replace the certificate x1 serves https with, "
                "not of this cluster's CA)"
            ), line
        said = " ".join(warned.split())
        assert "To switch the rest later: tlsroll plan " + batch in said, said
        assert "left alone" not in said, said
    # Ten or fewer on http: named as before, a dual node with its own way.
    few = mixed({"a": "http", "b": "http+https", "c": "https"}, ["c"])
    assert few is not None and (few.dual, few.other_certificate) == (("b",), ("c",))
    assert mixed_line(few) == (
        "a mixed cluster: a on http, b, c on https; to switch the rest: tlsroll plan --nodes a, "
        "then tlsroll rollout start --nodes a; b serves http and https, as a transitional "
        "rollout's phase 1 leaves a node: close http there with tlsroll rollout finalize, or "
        "tlsroll rollout retry, of the rollout that left it"
    )


def test_a_dual_node_s_way_names_the_rollout_that_left_it() -> None:
    """Session 69 left it: the way for a node on http and https named "the rollout that left
    it", not its id. The newest transitional enable-tls rollout (a phase 1) that has the node
    is named in the commands (`schema show` and `tlsroll nodes` from the rollouts they read,
    the plan and the viewer from the store: ``SchemaStore.left_dual``); two that left nodes
    so are named by node; one not known leaves the words as they were."""
    from leader.mixed_cluster import dual_left_by, dual_way, mixed, mixed_line
    from leader.plan_texts import outside_scope_warning
    from leader.rollout_core import Change

    def rollout(rid: str, epoch: str, change: str, strategy: str, *nodes: str) -> dict[str, Any]:
        # (as `schema show --json` gives it: a uint64 epoch is a string there)
        named = [{"name": n} for n in nodes]
        return {"id": rid, "epoch": epoch, "change": change, "strategy": strategy, "nodes": named}

    rollouts = [
        rollout("r4", "4", "finalize", "direct", "b"),  # its finalize (aborted): not it
        rollout("r3", "3", "enable-tls", "direct", "d"),
        rollout("r2", "2", "enable-tls", "transitional", "b", "d"),
        rollout("r1", "1", "enable-tls", "transitional", "b", "e"),
    ]
    assert dual_left_by(["b", "e", "x"], rollouts) == {"b": "r2", "e": "r1"}
    few = mixed({"a": "http", "b": "http+https", "c": "https"})
    assert few is not None
    assert mixed_line(few, dual_left_by(few.dual, rollouts)) == (
        "a mixed cluster: a on http, b, c on https; to switch the rest: tlsroll plan --nodes a, "
        "then tlsroll rollout start --nodes a; b serves http and https, as a transitional "
        "rollout's phase 1 leaves a node: close http there with tlsroll rollout finalize r2, "
        "or tlsroll rollout retry r2 (the rollout that left it so)"
    )
    assert dual_way(["b", "e"], {"b": "r2", "e": "r1"}) == (
        "close http there with tlsroll rollout finalize, or tlsroll rollout retry, of the "
        "rollout that left each (b: r2, e: r1)"
    )
    assert dual_way(["b", "e"], {"b": "r2", "e": "r2"}).endswith(
        "finalize r2, or tlsroll rollout retry r2 (the rollout that left them so)"
    )
    assert dual_way(["b"], {}).endswith("of the rollout that left it")  # not known: as before
    warned = outside_scope_warning(
        Change.ENABLE_TLS, ["c"], {"a": "http", "b": "http+https"}, left_by={"b": "r2"}
    )
    assert "tlsroll rollout finalize r2, or tlsroll rollout retry r2" in warned, warned


def test_the_line_of_a_certificate_not_on_record_names_the_way_when_the_plan_finds_it_done() -> (
    None
):
    """Session 75 opswalk: after a restore from a backup, a node that a rotate-cert gave a
    certificate after the backup serves one of this CA the store has no record of; `tlsroll
    nodes` said "not of this cluster's CA" and named `plan --nodes`, which found the node done
    ("nothing to do"): a dead end. The line keeps its way for a certificate put in by hand and
    names the rotate-cert that gives a node the plan finds done a certificate on record."""
    from leader.mixed_cluster import other_certificate_line

    assert other_certificate_line(["node3"]) == (
        "node3 serves https with a certificate not of this cluster's CA (put in by hand?); to "
        "give it one of this CA: tlsroll plan --nodes node3, then tlsroll rollout start "
        "--nodes node3 (a node the plan finds done serves one of this CA that the leader has "
        "no record of, issued after the backup its store was restored from: tlsroll rollout "
        "start --change rotate-cert --nodes node3 gives it one on record)"
    )
    assert other_certificate_line(["b", "a"]).endswith(
        "tlsroll rollout start --change rotate-cert --nodes a,b gives them one on record)"
    )


def test_the_plan_and_the_help_say_which_node_scope_local_is() -> None:
    """Review s69 revlocal2 L3/L6: the plan's head said "on scope local" and never which node
    that is; `rollout start --help` said "the local node" while `--scope`'s help said "local =
    the leader node". The head names the leader node; the help says it is the node the
    admin CLI runs on; `schema show`'s head of a local rollout names it too."""
    from click.testing import CliRunner

    from leader.cli import rollout as rollout_cmd
    from leader.cli.draw import render_rollout
    from leader.cli.plain import emit
    from leader.rollout_core import ScopeKind
    from leader.wire import CHANGE, SCOPE_KIND
    from tlsroll.enums import Change
    from tlsroll.v1 import admin_pb2, schema_pb2

    reply = admin_pb2.PlanResponse(
        rollout=schema_pb2.RolloutView(
            change=CHANGE.wire(Change.ENABLE_TLS),
            scope=SCOPE_KIND.wire(ScopeKind.LOCAL),
            max_parallel=1,
            nodes=[schema_pb2.NodeView(name="node1", leader_node=True)],
        )
    )
    runner = CliRunner()
    with runner.isolation() as (out, _err, *_):
        rollout_cmd.show_plan(reply)
    head = out.getvalue().decode().splitlines()[0]
    assert head.startswith(
        "Plan: change enable-tls on scope local (the leader node, node1), 1 node(s)"
    ), head
    helped = " ".join(runner.invoke(rollout_cmd.rollout, ["start", "--help"]).output.split())
    assert "the local node" not in helped
    assert (
        "Start the switch from http to https on the leader node (--scope local: the node "
        "this command runs on)" in helped
    ), helped
    assert "local = the leader node (the one this command runs on" in helped, helped
    from tlsroll import wire

    with runner.isolation() as (out, _err, *_):
        emit(render_rollout(wire.to_dict(reply.rollout)))
    assert "scope local (the leader node, node1)" in out.getvalue().decode()


def test_a_plan_says_a_node_s_own_https_certificate_is_replaced_and_no_http_closes_there() -> None:
    """Review s70 drift L1: a node serving https with the practice's own certificate (not of
    this CA) while the records say http was planned as "will switch" alone, its old address
    http://…:8080, under the warning that http (8080) closes as each node switches. Its line
    says the certificate is replaced by one of this CA and who needs this CA; the warning
    names it apart, and goes where every node switched is such a one (``PlanRollout`` marks
    the node ``other_certificate`` and gives its https address as the old one)."""
    from click.testing import CliRunner

    from leader.cli import rollout as rollout_cmd
    from leader.plan_texts import RECONNECT_DIRECT, direct_warnings, plan_texts
    from leader.rollout_core import Change, FreezeMode, Strategy
    from leader.wire import CHANGE
    from tlsroll.v1 import admin_pb2, schema_pb2

    warnings = plan_texts(Change.ENABLE_TLS, Strategy.DIRECT, FreezeMode.NODE, False)[2]
    assert RECONNECT_DIRECT in warnings
    assert direct_warnings(warnings, [], False) == warnings
    some = direct_warnings(warnings, ["node2"], False)
    said = " ".join(some)
    assert "closes the moment each node on http switches (not at node2: https there" in said
    assert (
        "node2 serves https already, with a certificate not of this cluster's CA (the "
        "practice's own?): the switch replaces it with one of this CA, at the same https "
        "address; every workstation that trusted the practice's certificate there loses the "
        "server until it does the client steps (it needs this CA)." in some
    ), some
    every = direct_warnings(warnings, ["node2", "node3"], True)
    assert not any("http (8080) closes" in w for w in every), every
    assert any(w.startswith("node2, node3 serve https already") for w in every), every
    reply = admin_pb2.PlanResponse(
        rollout=schema_pb2.RolloutView(
            change=CHANGE.wire(Change.ENABLE_TLS),
            max_parallel=1,
            nodes=[
                schema_pb2.NodeView(name="node1"),
                schema_pb2.NodeView(
                    name="node2",
                    other_certificate=True,
                    old_url="https://127.0.0.2:8443/",
                    new_url="https://127.0.0.2:8443/",
                ),
            ],
        ),
        warnings=some,
    )
    runner = CliRunner()
    with runner.isolation() as (out, _err, *_):
        rollout_cmd.show_plan(reply)
    lines = out.getvalue().decode().splitlines()
    (line1,) = [ln for ln in lines if ln.startswith("  1. ")]
    (line2,) = [ln for ln in lines if ln.startswith("  2. ")]
    assert line1 == "  1. node1 — will switch", lines
    assert line2.startswith(
        "  2. node2 — will switch; it serves https already, with a certificate not of this "
        "cluster's CA (the practice's own?): the switch replaces that certificate with one of "
        "this CA"
    ), line2
