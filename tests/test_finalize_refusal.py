"""Issue 12 review: plain finalize and a retry of a finalize refuse while who is on http cannot
be told, in-process on a real SchemaStore (SQLite file) and the real Commands (no agents: the
refusal comes before any node is asked)."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import sqlite3
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from leader import planner
from leader.cli.draw import AWAITING, render_rollout
from leader.cli.notify_cmd import remaining_text
from leader.commands import Commands, StillOnHttp
from leader.rollout_core import Change, Client, NodeState, RolloutEvent, Scope, Strategy
from leader.rollout_enums import RolloutState
from leader.schema_store import ClientsInfo, RolloutMeta, SchemaStore, write_clients
from leader.schema_view import (
    SchemaViewService,
    fresh_reports,
    node_clients_views,
    rollout_view,
    schema_message,
    still_on_http_now,
)
from leader.service import client_rows
from leader.store import NodeCert, Store
from leader.viewer.i18n import TEXTS
from leader.viewer.snapshot import Reader
from tests.test_schema_store import enrolled
from tlsroll import wire
from tlsroll.v1 import schema_pb2, types_pb2

NOW = dt.datetime(2026, 11, 30, 18, 0, tzinfo=dt.UTC)
HEARTBEAT = 5  # seconds: the leader's heartbeat_interval in these tests


def online(last: dt.datetime | None) -> bool:
    """``service.LeaderState.online`` for HEARTBEAT: offline after 3 silent heartbeats."""
    return last is not None and NOW - last <= dt.timedelta(seconds=3 * HEARTBEAT)


def cluster(tmp_path: Path) -> tuple[SchemaStore, Commands]:
    """t1: a transitional rollout awaiting finalize with a and b dual; both agents reported
    their clients (a: only https) — b's report is stale (the leader just restarted)."""
    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    rollout, nodes = planner.plan_rollout(
        rollout_id="t1",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=schema.next_epoch(),
        strategy=Strategy.TRANSITIONAL,
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    row = schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW, '{"v": 1}')
    dual = [replace(n, state=NodeState.DUAL) for n in row.records]
    schema.save_states(row, row.rollout.with_event(RolloutEvent.NODES_DUAL), dual, NOW, "engine")
    fresh = NOW - dt.timedelta(seconds=HEARTBEAT)
    stale = NOW - planner.report_stale_after(HEARTBEAT) - dt.timedelta(seconds=1)
    for node, at in (("a", fresh), ("b", stale)):
        https = Client(node, "https", "10.0.0.1", "ws-1", at - dt.timedelta(minutes=9), at, 5)
        report(store, node, [https], at)
    return schema, Commands(store, schema, lambda: NOW, online, "a", lambda: None)


def report(store: Store, node: str, clients: list[Client], at: dt.datetime) -> None:
    """``node``'s agent reports ``clients`` to this leader at ``at``, stored as the leader's
    heartbeat service stores it (``LeaderService._record_clients``: queued, noted, committed)."""

    def write(db: sqlite3.Connection) -> None:
        write_clients(db, node, clients, window_seconds=600, source="refserver", problem="", now=at)

    store.queue_write(node, write)
    store.note_report(node, at)
    assert store.write_queued() == 1


def test_a_node_whose_client_report_is_stale_refuses_plain_finalize(tmp_path: Path) -> None:
    schema, commands = cluster(tmp_path)
    with pytest.raises(StillOnHttp, match=r"b: cannot tell who is on http \(no recent report"):
        asyncio.run(commands.finalize("t1", "admin:test"))
    refused = None
    try:
        asyncio.run(commands.finalize("t1", "admin:test"))
    except StillOnHttp as exc:
        refused = exc
    assert refused is not None and set(refused.unknown) == {"b"} and not refused.clients
    # What to check names commands that exist (review s45rt2 M1: there is no `tlsroll status`).
    assert refused.unknown["b"].endswith(
        "UTC; check it runs: tlsroll nodes, and on the node systemctl status tlsroll-agent"
    ), refused.unknown["b"]
    assert [r.rollout.id for r in schema.awaiting()] == ["t1"]  # nothing started


def test_finalize_s_check_only_refuses_as_the_finalize_would_before_the_admin_says_yes(
    tmp_path: Path,
) -> None:
    """Review rev49fin: the CLI's confirmation (``check_only``: ``Commands.finalize_check``)
    previewed only ``finalize_scope``'s refusals; a plain finalize's still-on-http refusal
    and another rollout under way came only after the admin said yes. Both come from the
    check now, which starts nothing."""
    from leader.schema_store import RolloutBusy

    schema, commands = cluster(tmp_path)
    with pytest.raises(StillOnHttp, match=r"b: cannot tell who is on http"):
        asyncio.run(commands.finalize_check("t1"))
    row, names, cut = asyncio.run(commands.finalize_check("t1", force=True))
    assert (row.rollout.id, set(names), cut) == ("t1", {"a", "b"}, frozenset())
    assert set(asyncio.run(commands.finalize_check("t1", when_quiet=60))[1]) == {"a", "b"}
    # Another rollout under way (here a finalize of t1 already running): refused too.
    rollout, nodes = planner.plan_rollout(
        rollout_id="f1",
        change=Change.FINALIZE,
        scope=Scope.of_nodes(["a", "b"]),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a", finalizes="t1")
    schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW)
    with pytest.raises(RolloutBusy):
        asyncio.run(commands.finalize_check("t1", force=True))
    assert [r.rollout.id for r in schema.awaiting()] == ["t1"]  # nothing started by a check


def test_a_retry_of_a_finalize_refuses_as_finalize_does(tmp_path: Path) -> None:
    schema, commands = cluster(tmp_path)
    rollout, nodes = planner.plan_rollout(
        rollout_id="f1",
        change=Change.FINALIZE,
        scope=Scope.of_nodes(["a", "b"]),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a", finalizes="t1")
    row = schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW)
    halting = row.rollout.with_event(RolloutEvent.FAILURE_BUDGET_EXCEEDED)
    halted = halting.with_event(RolloutEvent.NODES_SETTLED)
    row = schema.save_states(row, halted, row.records, NOW, "engine")
    with pytest.raises(StillOnHttp, match=r"b: .*no recent report.*rollout finalize t1 --force"):
        asyncio.run(commands.retry("f1", "admin:test"))
    assert schema.get("f1") == row and schema.follower("t1") == row  # no retry started


def test_a_report_stored_before_the_leader_started_speaks_for_no_node(tmp_path: Path) -> None:
    """The leader restarted: the reports stored before (a's a moment ago, nobody on http)
    say nothing of what the workstations did while no leader listened. A finalize waits for
    each agent's first report to this leader, and says so; then that report decides."""
    first, _commands = cluster(tmp_path)
    first.close()
    store = Store(tmp_path / "leader.sqlite3")  # the leader started again
    schema = SchemaStore(store.db)
    commands = Commands(store, schema, lambda: NOW, online, "a", lambda: None)
    with pytest.raises(StillOnHttp) as waiting:
        asyncio.run(commands.finalize("t1", "admin:test"))
    assert waiting.value.unknown == {
        n: f"waiting for {n}'s first report since the leader started (seconds once its agent"
        " is connected; else check it runs: tlsroll nodes, and on the node systemctl status"
        " tlsroll-agent)"
        for n in ("a", "b")
    }
    # Nothing for the workstations to do, nothing to cut off: finalize again (review s44rev6
    # L4: "cannot tell" twice, brackets in brackets, --force offered for a wait of seconds).
    assert str(waiting.value) == (
        "finalize waits for the first client report since the leader started from a, b"
        " (seconds once their agents are connected; else check they run: tlsroll nodes, and"
        " on each node systemctl status tlsroll-agent);"
        " finalize again then, or let the leader finalize each node once it is quiet"
        " (tlsroll rollout finalize t1 --when-quiet 30m)"
    )
    at = NOW - dt.timedelta(seconds=1)
    http = Client("a", "http", "10.0.0.2", "ws-2", at - dt.timedelta(minutes=1), at, 3)
    report(store, "a", [http], at)
    report(store, "b", [], at)
    with pytest.raises(StillOnHttp) as named:
        asyncio.run(commands.finalize("t1", "admin:test"))
    assert not named.value.unknown and [c.address for c in named.value.clients] == ["10.0.0.2"]
    assert [r.rollout.id for r in schema.awaiting()] == ["t1"]  # nothing started


def test_a_sighting_its_fresh_report_lists_counts_past_the_window_until_one_leaves_it_out(
    tmp_path: Path,
) -> None:
    """The rule alone (``still_on_http_now``, ``write_clients``): the agent's report lists a
    workstation last seen on http 11 minutes ago (its view is that old; the window is 10):
    it is stored and still on http while the report is fresh, and a finalize names it; judged
    against now once the report is stale; gone once a report leaves it out."""
    schema, commands = cluster(tmp_path)
    store = commands.store
    old = NOW - dt.timedelta(minutes=11)
    http = Client("a", "http", "10.0.0.3", "ws-3", old - dt.timedelta(minutes=1), old, 2)
    https = Client("a", "https", "10.0.0.1", "ws-1", NOW, NOW, 6)
    report(store, "a", [http, https], NOW)
    clients, infos = schema.clients_report(["a"])
    assert [c.address for c in clients if c.scheme == "http"] == ["10.0.0.3"]  # kept
    assert [c.address for c in still_on_http_now(clients, infos, NOW, {"a"})] == ["10.0.0.3"]
    assert still_on_http_now(clients, infos, NOW, frozenset()) == []  # stale: against now
    assert fresh_reports(store, infos, NOW, planner.report_stale_after(HEARTBEAT)) == {"a"}
    with pytest.raises(StillOnHttp, match=r"a: 10\.0\.0\.3 \(ws-3\) last seen on http"):
        asyncio.run(commands.finalize("t1", "admin:test"))
    report(store, "a", [https], NOW)  # the agent let go of it
    clients, infos = schema.clients_report(["a"])
    assert [c.scheme for c in clients] == ["https"]
    assert still_on_http_now(clients, infos, NOW, {"a"}) == []


@pytest.mark.parametrize("shifts", [(0.0021, 0.0034), (0.0034, 0.0021), (0.0, -30.0)])
def test_a_clean_switch_stays_switched_whatever_each_report_s_clock_shift(
    tmp_path: Path, shifts: tuple[float, float]
) -> None:
    """Review s44rev6 H1: a workstation's last http and first https request in one second
    (the demo's), reported twice. Each message's times are moved onto the leader's clock by
    its own shift (its transit: milliseconds; a node clock ahead: seconds), and the store kept
    the earliest first_seen and the latest last_seen over the writes: the https first_seen
    of one message and the http last_seen of another, out of order by the shifts'
    difference, put the switched workstation back on http for the agent's window."""
    schema, _commands = cluster(tmp_path)
    store = _commands.store
    seen = NOW - dt.timedelta(seconds=30)
    for n, shift in enumerate(shifts):
        at = seen + dt.timedelta(seconds=2 + n, milliseconds=shift * 1000)
        moved = dt.timedelta(seconds=shift)
        http = Client(
            "a", "http", "10.0.0.5", "", seen - dt.timedelta(minutes=5) + moved, seen + moved, 40
        )
        https = Client("a", "https", "10.0.0.5", "", seen + moved, seen + moved, 3 + n)
        report(store, "a", [http, https], at)
        clients, infos = schema.clients_report(["a"])
        assert still_on_http_now(clients, infos, NOW, {"a"}) == [], (n, clients)


def test_a_report_committed_after_its_node_was_removed_marks_it_not(tmp_path: Path) -> None:
    """The group commit took a's report, then a was removed (``remove_node``'s
    ``_forget_seen``, made here while the batch is written: the moment between the take and
    the mark) and may be enrolled again under its name: the old agent's report does not
    speak for it as one heard since the leader started (it did: the commit marked it)."""
    store = Store(tmp_path / "leader.sqlite3")
    at = NOW - dt.timedelta(seconds=1)
    https = Client("a", "https", "10.0.0.1", "ws-1", at - dt.timedelta(minutes=9), at, 5)

    def write(db: sqlite3.Connection) -> None:
        write_clients(db, "a", [https], window_seconds=600, source="refserver", problem="", now=at)
        store._forget_seen("a")  # removed meanwhile

    store.queue_write("a", write)
    assert store.write_queued() == 1
    assert not store.report_since_start("a")
    report(store, "a", [https], at)  # the next report (a's new agent's) is the one
    assert store.report_since_start("a")


def test_the_nodes_fresh_reports_are_always_given() -> None:
    """Who is still on http goes by the fresh reports: each caller says which they are (a
    left-out ``fresh`` judged every node against now, silently: review s44rev4 L3)."""
    for f in (still_on_http_now, node_clients_views, schema_message):
        assert inspect.signature(f).parameters["fresh"].default is inspect.Parameter.empty, f


def test_the_schema_and_the_viewer_say_which_nodes_wait_for_their_report(tmp_path: Path) -> None:
    """Session 45: a restarted leader's wait for a node's first client report was said only by
    a finalize's refusal. The schema (``GetSchema``: what ``schema show`` prints) marks each
    such node of a rollout not ended (``NodeView.awaiting_report``) and its client report
    (``NodeClientsView.awaiting_report``), and so does the viewer's page row, until the
    node's report comes; a node that never reported (a leader's very first start) waits
    alike; an ended rollout's nodes wait for nothing."""
    first, _commands = cluster(tmp_path)
    first.close()
    store = Store(tmp_path / "leader.sqlite3")  # the leader started again
    schema = SchemaStore(store.db)
    stale_after = planner.report_stale_after(HEARTBEAT)

    def fresh(infos: Mapping[str, ClientsInfo], now: dt.datetime) -> frozenset[str]:
        return fresh_reports(store, infos, now, stale_after)

    service = SchemaViewService(schema, lambda: NOW, fresh=fresh, reported=store.report_since_start)
    reader = Reader(store, schema, lambda: NOW, online, [], fresh=fresh)

    def marks() -> tuple[dict[str, bool], dict[str, bool], dict[str, bool]]:
        message = service._answer(schema_pb2.GetSchemaRequest(), None)
        (t1,) = message.rollouts
        page = reader.read(page=True, clients=False).data["rollouts"][0]
        return (
            {n.name: n.awaiting_report for n in t1.nodes},
            {v.node: v.awaiting_report for v in message.node_clients},
            {n["name"]: bool(n.get("awaiting_report")) for n in page["nodes"]},
        )

    assert marks() == ({"a": True, "b": True},) * 3
    text = "\n".join(
        render_rollout(
            wire.to_dict(service._answer(schema_pb2.GetSchemaRequest(), None).rollouts[0])
        ).lines(400, False)
    )
    assert text.count(AWAITING) == 2, text
    report(store, "a", [], NOW - dt.timedelta(seconds=1))  # a's agent reports to this leader
    assert marks() == ({"a": False, "b": True},) * 3
    # Ended, the rollout's nodes wait for nothing (a removed one never reports again).
    row = schema.get("t1")
    assert row is not None
    ended = replace(row, rollout=replace(row.rollout, state=RolloutState.COMPLETED))
    assert [n.awaiting_report for n in rollout_view(ended, reported=lambda _n: False).nodes] == [
        False,
        False,
    ]
    store.close()

    # A leader's very first start: no report was ever stored, and the nodes wait alike.
    other = tmp_path / "first"
    other.mkdir()
    new = Store(other / "leader.sqlite3")
    new_schema = SchemaStore(new.db)
    rollout, nodes = planner.plan_rollout(
        rollout_id="t2",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"c": True},
        leader="c",
        epoch=new_schema.next_epoch(),
        strategy=Strategy.TRANSITIONAL,
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="c")
    made = new_schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW, "{}")
    dual = [replace(n, state=NodeState.DUAL) for n in made.records]
    new_schema.save_states(made, made.rollout.with_event(RolloutEvent.NODES_DUAL), dual, NOW, "x")
    view = SchemaViewService(
        new_schema, lambda: NOW, fresh=lambda _i, _n: frozenset(), reported=new.report_since_start
    )
    (t2,) = view._answer(schema_pb2.GetSchemaRequest(), None).rollouts
    assert [(n.name, n.awaiting_report) for n in t2.nodes] == [("c", True)]
    new.close()


def test_the_schema_and_the_viewer_say_which_nodes_a_when_quiet_finalize_holds(
    tmp_path: Path,
) -> None:
    """Session 56's walk (rev56f L1) found a pending node of a running ``finalize --when-quiet``
    shown as "pending" without a word why; session 57 made ``schema show`` say it, the viewer's
    row still did not. Both now read ``NodeView.waits_until_quiet`` (the schema, the page's
    row in both languages): a's report came, so a waits for quiet; b's did not, so b waits for
    its report (that comes first, and says so); none once the rollout is halted."""
    from leader.cli.draw import QUIET
    from leader.viewer import pages
    from leader.viewer.i18n import Words
    from tests.test_schema_store import follower

    schema, _commands = cluster(tmp_path)
    follower(schema, Change.FINALIZE, "t1")  # f1: finalize --when-quiet 600 of t1, a and b
    store = Store(tmp_path / "leader.sqlite3")  # the leader started again
    schema = SchemaStore(store.db)
    report(store, "a", [], NOW - dt.timedelta(seconds=1))  # a's agent reports to this leader

    def fresh(infos: Mapping[str, ClientsInfo], now: dt.datetime) -> frozenset[str]:
        return fresh_reports(store, infos, now, planner.report_stale_after(HEARTBEAT))

    service = SchemaViewService(schema, lambda: NOW, fresh=fresh, reported=store.report_since_start)
    reader = Reader(store, schema, lambda: NOW, online, [], fresh=fresh)

    def shown() -> tuple[dict[str, tuple[bool, bool]], dict[str, tuple[bool, bool]], str]:
        message = service._answer(schema_pb2.GetSchemaRequest(rollout_id="f1"), None)
        (f1,) = message.rollouts
        snap = reader.read("f1", page=True, clients=False)
        (page,) = (r for r in snap.data["rollouts"] if r["id"] == "f1")
        rows = "".join(
            pages.Drawn().rows(snap, Words.of(lang)).get("node-a", "") for lang in ("en", "de")
        )
        return (
            {n.name: (n.awaiting_report, n.waits_until_quiet) for n in f1.nodes},
            {
                n["name"]: (bool(n.get("awaiting_report")), bool(n.get("waits_until_quiet")))
                for n in page["nodes"]
            },
            rows + "\n".join(render_rollout(wire.to_dict(f1)).lines(400, False)),
        )

    by_schema, by_page, text = shown()
    assert by_schema == by_page == {"a": (False, True), "b": (True, False)}, (by_schema, by_page)
    for words in (QUIET.format(seconds=600), TEXTS["en"]["waits_until_quiet"].format(seconds=600)):
        assert text.count(words) == 2, text  # a's row in the viewer (en) and in schema show
    assert TEXTS["de"]["waits_until_quiet"].format(seconds=600) in text, text
    assert TEXTS["en"]["waits_until_quiet"].format(seconds=600) == QUIET.format(seconds=600)
    row = schema.get("f1")
    assert row is not None
    halted = replace(row.rollout, state=RolloutState.HALTED)
    schema.save_states(row, halted, row.records, NOW, "engine")
    by_schema, by_page, text = shown()
    assert by_schema == by_page == {"a": (False, False), "b": (False, False)}, (by_schema, by_page)
    assert "--when-quiet" not in text, text
    store.close()


def test_only_a_wait_that_decides_something_marks_a_node(tmp_path: Path) -> None:
    """Review s45rev5 L1: every node of any rollout not ended was marked as waiting for its
    client report (a renewal, a password change, phase 1 while it ran), though only a
    finalize (refused until the report comes) and ``--when-quiet`` (holds a pending node)
    wait for it. Now only a dual node of phase 1 awaiting its finalize and a pending node of
    a ``finalize --when-quiet`` not ended are marked, and only while the report has not come."""
    schema, _commands = cluster(tmp_path)
    row = schema.get("t1")  # phase 1 awaiting finalize, a and b dual
    assert row is not None
    none = lambda _n: False  # noqa: E731 (no report since the leader started)

    def marks(
        change: Change,
        state: RolloutState,
        states: tuple[NodeState, NodeState],
        when_quiet: int = 0,
        reported: Callable[[str], bool] = none,
    ) -> tuple[bool, bool]:
        """(a's mark, b's) in ``row`` made a ``change`` rollout in ``state``, with a and b
        in ``states``."""
        of = dict(zip("ab", states, strict=True))
        made = replace(
            row,
            rollout=replace(row.rollout, change=change, state=state),
            meta=replace(row.meta, when_quiet=when_quiet),
            nodes=tuple((replace(rec, state=of[rec.name]), d) for rec, d in row.nodes),
        )
        shown = {n.name: n.awaiting_report for n in rollout_view(made, reported=reported).nodes}
        return shown["a"], shown["b"]

    enable, finalize = Change.ENABLE_TLS, Change.FINALIZE
    dual, pending, done = NodeState.DUAL, NodeState.PENDING, NodeState.DONE
    running, waiting = RolloutState.RUNNING, RolloutState.AWAITING_FINALIZE
    # Where the wait decides something.
    assert marks(enable, waiting, (dual, dual)) == (True, True)
    assert marks(enable, waiting, (dual, NodeState.FAILED)) == (True, False)  # not finalized
    assert marks(finalize, running, (pending, done), when_quiet=60) == (True, False)
    assert marks(finalize, RolloutState.PAUSED, (pending, pending), 60) == (True, True)
    assert marks(enable, waiting, (dual, dual), reported=lambda n: n == "a") == (False, True)
    # Where it decides nothing: marked before.
    for change in (Change.ROTATE_CERT, Change.CHANGE_PASSWORD, enable, Change.DISABLE_TLS):
        assert marks(change, running, (pending, pending)) == (False, False), change
    assert marks(enable, running, (dual, pending)) == (False, False)  # phase 1 runs
    assert marks(finalize, running, (pending, pending)) == (False, False)  # refused at start
    assert marks(finalize, RolloutState.HALTED, (pending, pending), 60) == (False, False)


def test_the_row_says_what_to_do_if_the_wait_lasts() -> None:
    """Review s45rev5 L2: the row's phrase said the wait but not what to do if it lasts, as a
    finalize's refusal does; ``schema show`` and the viewer (both languages) now say it, in
    the same words in English."""
    for text in (AWAITING, TEXTS["en"]["awaiting_report"]):
        assert text.startswith("waiting for its first client report since the leader started")
        assert "tlsroll nodes, on the node systemctl status tlsroll-agent" in text, text
    assert TEXTS["en"]["awaiting_report"] == AWAITING
    assert (
        "tlsroll nodes, auf dem Knoten systemctl status tlsroll-agent"
        in (TEXTS["de"]["awaiting_report"])
    )


def test_a_removed_node_s_client_report_goes_with_it(tmp_path: Path) -> None:
    """Review s45rev5 M2: a removed node's client report stayed stored, and the node was
    forgotten as one heard since the leader started, so it waited for its first report for
    good (``notify --remaining``: "cannot tell"; the schema's line). Its report now goes at
    the removal, and one that outlived it (committed by a batch taken before the removal; or
    stored by an older leader) is not read. Enrolled again under its name (a new key: another
    machine, maybe) it starts from nothing, none of the old machine's workstations: its new
    agent's first report is the one."""
    store, schema = enrolled(tmp_path, "a", "b")
    at = NOW - dt.timedelta(seconds=1)
    for node in ("a", "b"):  # ws-5 writes over http to both, within the window
        http = Client(node, "http", "10.0.0.5", "ws-5", at - dt.timedelta(minutes=1), at, 3)
        report(store, node, [http], at)
    stale_after = planner.report_stale_after(HEARTBEAT)

    def fresh(infos: Mapping[str, ClientsInfo], now: dt.datetime) -> frozenset[str]:
        return fresh_reports(store, infos, now, stale_after)

    service = SchemaViewService(schema, lambda: NOW, fresh=fresh, reported=store.report_since_start)

    def remaining() -> str:
        message = service._answer(schema_pb2.GetSchemaRequest(), None)
        return remaining_text(message, "en", zoneinfo.ZoneInfo("UTC"))

    def stored(node: str) -> int:
        with store.db.read() as db:
            row = db.execute("SELECT count(*) FROM node_clients_info WHERE node = ?", (node,))
            return int(row.fetchone()[0])

    both = remaining()
    assert "  a: 10.0.0.5 (ws-5)" in both and "  b: 10.0.0.5 (ws-5)" in both, both
    store.remove_node("a", now=NOW, actor="admin")
    assert remaining() == (
        # (no transitional rollout awaits finalize here: the header says so, session 64)
        "Workstations seen on http lately (no transitional rollout awaits finalize):\n"
        f"  b: 10.0.0.5 (ws-5), last seen {at:%Y-%m-%d %H:%M:%S} UTC\n"
    )
    message = service._answer(schema_pb2.GetSchemaRequest(), None)
    assert [v.node for v in message.node_clients] == ["b"], message.node_clients
    assert stored("a") == 0

    # a, enrolled again under its name by a new key: nothing of the old machine's clients;
    # its new agent reports https only, and a is on http nowhere.
    store.add_token(
        "t9", "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description="", now=NOW,
        actor="test", node_name="a", addresses=("10.1.1.9",),
    )  # fmt: skip
    store.enrol(
        token_id="t9", secret="s" * 26, name="a", addresses=("10.1.1.9",), dns_names=(),
        agent_version="t", agent_port=9442, key_pin="sha256:pin9",
        issue=lambda: NodeCert("sha256:pin9", "sha256:fp9", "9", NOW + dt.timedelta(days=30)),
        now=NOW,
    )  # fmt: skip
    message = service._answer(schema_pb2.GetSchemaRequest(), None)
    assert [v.node for v in message.node_clients] == ["b"], message.node_clients
    https = Client("a", "https", "10.0.0.6", "ws-6", at - dt.timedelta(minutes=1), at, 2)
    report(store, "a", [https], at)
    message = service._answer(schema_pb2.GetSchemaRequest(), None)
    views = {v.node: (v.awaiting_report, len(v.still_on_http)) for v in message.node_clients}
    assert views == {"a": (False, 0), "b": (False, 1)}, views
    assert "  a:" not in remaining()

    # b removed while a batch with its report was taken: committed after the removal, the
    # report is not stored again (review rev55e L2; it was stored, and not read).
    def write(db: sqlite3.Connection) -> None:
        http = Client("b", "http", "10.0.0.5", "ws-5", at - dt.timedelta(minutes=1), at, 4)
        write_clients(db, "b", [http], window_seconds=600, source="refserver", problem="", now=at)

    store.remove_node("b", now=NOW, actor="admin")
    store.queue_write("b", write)
    assert store.write_queued() == 1 and stored("b") == 0
    message = service._answer(schema_pb2.GetSchemaRequest(), None)
    assert [v.node for v in message.node_clients] == ["a"], message.node_clients
    assert remaining() == "No workstation was seen on http lately.\n"
    store.close()


def test_the_providers_of_fresh_reports_are_required() -> None:
    """Review s44rev6 L3: the schema's servicer and the viewer's reader judged every node
    against now ("no fresh report") when not given who has a fresh report; production always
    gave one. Now they cannot be made without it (nor without ``reported``)."""
    for f, names in (
        (SchemaViewService.__init__, ("fresh", "reported")),
        (Reader.__init__, ("fresh",)),
        (schema_message, ("fresh", "reported")),
    ):
        for name in names:
            param = inspect.signature(f).parameters[name]
            assert param.default is inspect.Parameter.empty, (f, name)


def sighting(
    scheme: str, first: dt.datetime, last: dt.datetime, name: str = "ws-9"
) -> types_pb2.ClientSeen:
    """ws-9's sighting as its agent sends it (times on the node's clock); ``name`` "": its
    requests carry no name (an http one without the header)."""
    seen = types_pb2.ClientSeen(scheme=scheme, address="10.0.0.9", workstation=name)
    seen.first_seen.FromDatetime(first)
    seen.last_seen.FromDatetime(last)
    return seen


@pytest.mark.parametrize("http_name", ["ws-9", ""])
@pytest.mark.parametrize("back", [True, False])
def test_a_node_clock_ahead_keeps_a_return_to_http_in_its_order(
    tmp_path: Path, back: bool, http_name: str
) -> None:
    """Review s44rev6 L1: node a's clock is 30 s ahead (the preflight allows 100 s). ws-9
    makes its first https request, then goes back to http 5 s later, both within those 30 s.
    The leader caps a sighting's times at its now (``service.client_rows``): stored, both
    were ``now``, a tie, taken for switched, and the finalize's rule let it go ahead while
    ws-9 had used http 5 s before. It is on http now; a clean switch (http, then https) so
    capped stays switched (a tie, as before). So too where its http requests carry no name
    (``http_name`` ""): the one name seen from its address is its (session 68)."""
    schema, commands = cluster(tmp_path)
    store = commands.store
    ahead = NOW + dt.timedelta(seconds=30)  # the node's clock at the leader's NOW
    one, two = ahead - dt.timedelta(seconds=10), ahead - dt.timedelta(seconds=5)
    https_at, http_at = (one, two) if back else (two, one)
    view = types_pb2.ClientsView(window_seconds=600, source="refserver")
    view.clients.extend(
        [
            sighting("https", https_at, https_at),
            sighting("http", NOW - dt.timedelta(minutes=5), http_at, http_name),
        ]
    )
    rows = client_rows("a", view, NOW, dt.timedelta(0))  # (ahead: no shift, capped)
    assert {r.last_seen for r in rows} == {NOW}
    report(store, "a", rows, NOW)
    clients, infos = schema.clients_report(["a", "b"])
    left = still_on_http_now(clients, infos, NOW, {"a", "b"})
    assert [c.workstation for c in left] == ([http_name] if back else []), clients
    if back:
        named = r" \(ws-9\)" if http_name else ""
        with pytest.raises(StillOnHttp, match=rf"a: 10\.0\.0\.9{named} last seen on http"):
            asyncio.run(commands.finalize("t1", "admin:test"))
