"""The schema store on a real SQLite file: one active rollout at a time, optimistic writes,
auth password versions."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from leader import planner
from leader.rollout_core import (
    Change,
    Client,
    NodeEvent,
    NodeState,
    RolloutAction,
    RolloutEvent,
    Scope,
    Strategy,
)
from leader.schema_store import (
    MAX_CLIENTS,
    AlreadyTakenBack,
    FollowerCompleted,
    RolloutBusy,
    RolloutMeta,
    RolloutRow,
    SchemaStore,
    StaleRecords,
)
from leader.schema_view import rollout_view, still_on_http_now
from leader.service import ERRORS, client_rows, clock_shift
from leader.store import EpochFixed, InRollout, NodeCert, Store
from tlsroll.rpc import status_for
from tlsroll.v1 import leader_pb2, types_pb2

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def new_rollout(store: SchemaStore, rollout_id: str = "r1") -> None:
    rollout, nodes = planner.plan_rollout(
        rollout_id=rollout_id,
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=store.next_epoch(),
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    store.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW, '{"v": 1}')


def dump(path: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return [
            row
            for table in ("rollouts", "rollout_nodes", "audit", "auth_versions")
            for row in db.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
        ]
    finally:
        db.close()


def test_a_write_based_on_stale_records_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    store = SchemaStore(tmp_path / "s.sqlite3")
    new_rollout(store)
    row = store.active()
    assert row is not None
    # An admin pauses the rollout ...
    store.save_states(row, row.rollout.with_event(RolloutEvent.PAUSE), row.records, NOW, "admin")
    before = dump(tmp_path / "s.sqlite3")
    # ... while the engine, still holding the old records, records a node event.
    records = list(row.records)
    records[0] = records[0].with_event(NodeEvent.START)
    with pytest.raises(StaleRecords):
        store.save_states(row, row.rollout, records, NOW, "engine")
    assert dump(tmp_path / "s.sqlite3") == before
    # A node record that changed (here: the scope freeze flag) is stale too.
    fresh = store.active()
    assert fresh is not None
    frozen = [replace(r, scope_frozen=True) for r in fresh.records]
    store.save_states(fresh, fresh.rollout, frozen, NOW, "engine")
    with pytest.raises(StaleRecords):
        store.save_states(fresh, fresh.rollout, fresh.records, NOW, "engine")
    store.close()


def test_one_active_rollout_and_the_auth_version_goes_with_it(tmp_path: Path) -> None:
    store = SchemaStore(tmp_path / "s.sqlite3")
    new_rollout(store, "r1")
    assert store.latest_auth_version() == 1
    before = dump(tmp_path / "s.sqlite3")
    with pytest.raises(RolloutBusy, match="r1 is running"):
        new_rollout(store, "r2")
    with pytest.raises(RolloutBusy):
        store.stage_password('{"v": 2}', NOW, "admin")
    assert dump(tmp_path / "s.sqlite3") == before  # not even an auth version was added
    store.close()


def test_pending_password_nodes(tmp_path: Path) -> None:
    store = SchemaStore(tmp_path / "s.sqlite3")
    new_rollout(store)
    row = store.active()
    assert row is not None
    store.save_states(row, row.rollout.with_event(RolloutEvent.ABORT), row.records, NOW, "a")
    store.set_node_auth("a", 1, NOW)
    store.set_node_auth("b", 1, NOW)
    assert store.pending_password_nodes() == set()
    # The aborting rollout has no node in flight; mark it ended so a password may be staged.
    aborting = store.active()
    assert aborting is not None
    store.save_states(
        aborting,
        aborting.rollout.with_event(RolloutEvent.NODES_SETTLED),
        aborting.records,
        NOW,
        "engine",
    )
    assert store.stage_password('{"v": 2}', NOW, "admin") == 2
    assert store.pending_password_nodes() == {"a", "b"}
    store.set_node_auth("a", 2, NOW)
    assert store.pending_password_nodes() == {"b"}
    store.close()


# --- the transitional strategy (issue 12) ------------------------------------------------------


def awaiting_rollout(store: SchemaStore, rollout_id: str = "t1") -> None:
    rollout, nodes = planner.plan_rollout(
        rollout_id=rollout_id,
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=store.next_epoch(),
        strategy=Strategy.TRANSITIONAL,
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    row = store.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW, '{"v": 1}')
    dual = [replace(n, state=NodeState.DUAL) for n in row.records]
    store.save_states(row, row.rollout.with_event(RolloutEvent.NODES_DUAL), dual, NOW, "engine")


def follower(store: SchemaStore, change: Change, link: str, rollout_id: str = "f1") -> None:
    rollout, nodes = planner.plan_rollout(
        rollout_id=rollout_id,
        change=change,
        scope=Scope.of_nodes(["a", "b"]),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=store.next_epoch(),
    )
    meta = RolloutMeta(
        created_at=NOW,
        started_by="admin:test",
        leader_node="a",
        finalizes=link if change is Change.FINALIZE else "",
        undoes=link if change is Change.DISABLE_TLS else "",
        when_quiet=600 if change is Change.FINALIZE else 0,
    )
    store.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW)


def test_a_rollout_awaiting_finalize_lets_only_its_finalize_or_way_back_start(
    tmp_path: Path,
) -> None:
    store = SchemaStore(tmp_path / "s.sqlite3")
    awaiting_rollout(store)
    with pytest.raises(RolloutBusy, match=r"awaits finalize.*rollout finalize t1.*rollback t1"):
        new_rollout(store, "r2")
    with pytest.raises(RolloutBusy):
        follower(store, Change.FINALIZE, "another")
    with pytest.raises(RolloutBusy):
        store.stage_password('{"v": 2}', NOW, "admin")
    follower(store, Change.FINALIZE, "t1")
    row = store.get("f1")
    assert row is not None and (row.meta.finalizes, row.meta.when_quiet) == ("t1", 600)
    assert store.active() == row  # the finalize runs; the engine drives it, not t1
    assert [r.rollout.id for r in store.awaiting()] == ["t1"]
    assert store.follower("t1") == row
    with pytest.raises(RolloutBusy, match="f1 is running"):  # one finalize at a time
        follower(store, Change.DISABLE_TLS, "t1", "f2")


def client(node: str, scheme: str, address: str, at: dt.datetime, ws: str = "") -> Client:
    return Client(node, scheme, address, ws, at - dt.timedelta(minutes=5), at, 3)


def test_clients_each_report_replaces_the_last_and_the_last_http_sighting_stays(
    tmp_path: Path,
) -> None:
    store = SchemaStore(tmp_path / "s.sqlite3")
    early = NOW - dt.timedelta(minutes=1)
    store.record_clients(
        "a",
        [client("a", "http", "10.0.0.1", early), client("a", "https", "10.0.0.2", NOW)],
        window_seconds=600,
        source="refserver",
        problem="",
        now=NOW,
    )
    assert {c.address for c in store.clients(["a"])} == {"10.0.0.1", "10.0.0.2"}
    assert store.clients_info()["a"].last_http_at == early
    later = NOW + dt.timedelta(minutes=20)
    store.record_clients(
        "a", [client("a", "https", "10.0.0.1", later)], window_seconds=600, source="refserver",
        problem="", now=later,
    )  # fmt: skip
    assert [(c.scheme, c.address) for c in store.clients(["a"])] == [("https", "10.0.0.1")]
    info = store.clients_info()["a"]
    assert (info.last_http_at, info.first_report, info.reported_at) == (early, NOW, later)
    many = [client("b", "http", f"10.1.{i // 250}.{i % 250}", NOW) for i in range(400)]
    store.record_clients("b", many, window_seconds=60, source="exec", problem="", now=NOW)
    assert len(store.clients(["b"])) == MAX_CLIENTS  # bounded per node


def test_what_an_agent_reports_about_clients_is_cleaned_before_it_is_stored() -> None:
    view = types_pb2.ClientsView(window_seconds=600, source="refserver")
    future = NOW + dt.timedelta(days=1)
    view.clients.add(scheme="http", address="10.0.0.1\x1b[31m", workstation="ws-a\n", requests=3)
    view.clients[-1].last_seen.FromDatetime(future)  # a clock ahead: not later than now
    view.clients.add(scheme="gopher", address="10.0.0.2")  # not a scheme: dropped
    view.clients.add(scheme="https", address="")  # no address: dropped
    for i in range(300):
        view.clients.add(scheme="https", address=f"10.1.0.{i}")
    rows = client_rows("a", view, NOW)
    assert len(rows) == MAX_CLIENTS - 2  # at most 256 looked at; two of them dropped
    first = rows[0]
    assert (first.scheme, first.last_seen, first.requests) == ("http", NOW, 3)
    assert "\x1b" not in first.address and "\n" not in first.workstation


@pytest.mark.parametrize("sent", [1, 9999])
def test_a_message_s_time_at_the_calendar_s_ends_moves_no_sighting_out_of_range(
    sent: int,
) -> None:
    """``clock_shift`` from a message sent in the year 1 (a clock far behind: its sightings
    move to the leader's now, never past it, no OverflowError) or 9999 (far ahead: nothing
    moves back)."""
    view = types_pb2.ClientsView(window_seconds=600, source="refserver")
    view.clients.add(scheme="http", address="10.0.0.1")
    view.clients[-1].last_seen.FromDatetime(NOW - dt.timedelta(hours=1))
    request = leader_pb2.HeartbeatRequest()
    request.sent_at.FromDatetime(dt.datetime(sent, 1, 1, tzinfo=dt.UTC))
    [row] = client_rows("a", view, NOW, clock_shift(request, NOW))
    assert row.last_seen == (NOW if sent == 1 else NOW - dt.timedelta(hours=1))


def test_a_switch_is_taken_back_once_even_when_two_rollbacks_cross(tmp_path: Path) -> None:
    """Two `rollout rollback` commands planned at the same time both found nothing taking r1
    back; the store itself refuses the second (FAILED_PRECONDITION at the admin API), whatever
    state the first is in, and writes nothing. A retry of the first may go on."""
    store = SchemaStore(tmp_path / "s.sqlite3")
    new_rollout(store, "r1")

    def end(rollout_id: str) -> None:
        row = store.get(rollout_id)
        assert row is not None
        store.save_states(
            row,
            row.rollout.with_action(RolloutAction.ABORT, switched=True),
            row.records,
            NOW,
            "admin",
        )
        row = store.get(rollout_id)
        assert row is not None
        skipped = [r.with_event(NodeEvent.SKIP, "aborted") for r in row.records]
        store.save_states(
            row, row.rollout.with_event(RolloutEvent.NODES_SETTLED), skipped, NOW, "engine"
        )

    def rollback(rollout_id: str, *, once: bool = True) -> None:
        rollout, nodes = planner.plan_rollout(
            rollout_id=rollout_id,
            change=Change.DISABLE_TLS,
            scope=Scope.cluster(),
            enrolled={"a": True, "b": True},
            leader="a",
            epoch=store.next_epoch(),
        )
        meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a", undoes="r1")
        store.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW, takes_back_once=once)

    end("r1")
    rollback("r2")
    end("r2")
    before = dump(tmp_path / "s.sqlite3")
    with pytest.raises(
        AlreadyTakenBack, match=r"^rollout r1 was already taken back by rollout r2 \(aborted\)"
    ):
        rollback("r3")
    assert dump(tmp_path / "s.sqlite3") == before
    rollback("r3", once=False)  # `rollout retry` of r2 keeps what it takes back
    store.close()


def test_the_kept_rollout_follows_every_writer_and_refuses_stale_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the store keeps a rollout in memory once read (the engine no longer reads
    every node row per step). What another store on the same connection writes (the admin
    commands, the Leader service) is in it at once; a write by another connection (another
    process) drops it; a failed transaction drops it; and a write based on records it has
    been told are stale is refused as before."""
    path = tmp_path / "s.sqlite3"
    engine = SchemaStore(path)
    new_rollout(engine)
    kept = engine.get("r1")
    assert kept is not None and engine.get("r1") is kept  # kept, not read again

    # Another store on the same connection pauses the rollout: seen at once.
    admin = SchemaStore(engine.db)
    paused = kept.rollout.with_event(RolloutEvent.PAUSE)
    admin.save_states(kept, paused, kept.records, NOW, "admin", "pause by admin")
    row = engine.get("r1")
    assert row is not None and row.rollout.state is paused.state
    assert row.meta.reason == "pause by admin"
    records = list(kept.records)
    records[0] = records[0].with_event(NodeEvent.START)
    with pytest.raises(StaleRecords):
        engine.save_states(kept, kept.rollout, records, NOW, "engine")
    assert engine.get("r1") is row  # a refusal wrote nothing: what is kept still holds

    # Another connection resumes it and starts a node: seen at once too.
    kept = engine.get("r1")
    assert kept is not None and engine.get("r1") is kept
    other = SchemaStore(path)
    theirs = other.get("r1")
    assert theirs is not None
    resumed = theirs.rollout.with_event(RolloutEvent.RESUME)
    other.save_states(theirs, resumed, records, NOW, "admin")
    other.close()
    row = engine.get("r1")
    assert row is not None and row.rollout.state is resumed.state
    assert row.records == tuple(records)
    with pytest.raises(StaleRecords):
        engine.save_states(theirs, theirs.rollout, theirs.records, NOW, "engine")

    # A transaction that fails after the store kept its outcome (its COMMIT, say) leaves
    # nothing of itself in memory.
    keep = engine._keep

    def keep_then_fail(row: RolloutRow) -> None:
        keep(row)
        raise sqlite3.OperationalError("disk I/O error")

    row = engine.get("r1")
    assert row is not None
    monkeypatch.setattr(engine, "_keep", keep_then_fail)
    with pytest.raises(sqlite3.OperationalError):
        engine.save_states(row, row.rollout.with_event(RolloutEvent.PAUSE), row.records, NOW, "a")
    monkeypatch.undo()
    row = engine.get("r1")
    assert row is not None and row.rollout.state is resumed.state
    # What the store keeps is what a fresh read of the file gives.
    fresh = SchemaStore(path)
    assert fresh.get("r1") == row
    fresh.close()
    engine.close()


def test_node_details_that_did_not_change_are_not_written(tmp_path: Path) -> None:
    """A step that learns nothing new writes nothing (issue 15: the leader rewrote the node's
    details on every poll): the rows the store's connection changed (``total_changes``)."""
    store = SchemaStore(tmp_path / "s.sqlite3")
    new_rollout(store)
    at = dt.datetime(2026, 11, 28, 12, 0, 1, tzinfo=dt.UTC)
    store.update_detail("r1", "a", restart_seconds=0.4, freeze_started_at=at)

    def changes() -> int:
        with store.db.read() as db:
            return db.total_changes

    before = changes()
    store.update_detail("r1", "a", restart_seconds=0.4, freeze_started_at=at)
    store.update_detail("r1", "a", restart_seconds=0.4)
    assert changes() == before
    store.update_detail("r1", "a", restart_seconds=0.5)
    assert changes() == before + 1
    row = store.get("r1")
    assert row is not None
    detail = next(d for r, d in row.nodes if r.name == "a")
    assert (detail.restart_seconds, detail.freeze_started_at) == (0.5, at)
    store.close()


def test_a_freeze_window_is_the_agent_s_elapsed_time_or_never_below_zero(tmp_path: Path) -> None:
    """Clock audit s35 J: the window (the schema's and ``tlsroll_freeze_window_seconds``) was
    the difference of the node's two wall-clock times: a clock stepped back an hour during a
    freeze made it -3597.5 s. It is now the agent's measure in elapsed time (``a``); from an
    older agent, which sends none (``b``), that difference, but never below 0."""
    store = SchemaStore(tmp_path / "s.sqlite3")
    new_rollout(store)
    began = dt.datetime(2026, 11, 28, 12, 0, 1, tzinfo=dt.UTC)
    stepped = began - dt.timedelta(seconds=3597.5)  # an hour back, 2.5 s later
    store.update_detail("r1", "a", freeze_started_at=began)  # a window still open
    assert store.switch_times() == ([], [])
    store.update_detail("r1", "a", freeze_ended_at=stepped, freeze_seconds=2.5, restart_seconds=0.4)
    store.update_detail("r1", "b", freeze_started_at=began, freeze_ended_at=stepped)
    windows, restarts = store.switch_times()
    assert sorted(windows) == [0.0, 2.5] and restarts == [0.4]
    row = store.get("r1")
    assert row is not None
    details = {r.name: d for r, d in row.nodes}
    assert (details["a"].freeze_seconds, details["a"].freeze_window) == (2.5, 2.5)
    assert (details["b"].freeze_seconds, details["b"].freeze_window) == (None, 0.0)
    views = {n.name: n for n in rollout_view(row).nodes}
    assert views["a"].freeze_seconds == 2.5
    assert views["b"].HasField("freeze_seconds") and views["b"].freeze_seconds == 0.0
    # what a fresh read of the file gives
    store.close()
    fresh = SchemaStore(tmp_path / "s.sqlite3")
    assert sorted(fresh.switch_times()[0]) == [0.0, 2.5]
    fresh.close()


def test_every_write_that_changed_a_row_is_told_routine_or_not(tmp_path: Path) -> None:
    """``Database.on_commit`` (the viewer's live pages) hears each committed write that changed
    a row, a rollout's routine steps too; ``on_change`` (the renewal watch) only those that
    move the generation; a write that changed nothing tells neither."""
    store = SchemaStore(tmp_path / "s.sqlite3")
    commits: list[int] = []
    changes: list[int] = []
    store.db.on_commit.append(lambda: commits.append(store.db.commits))
    store.db.on_change.append(lambda: changes.append(store.db.generation))
    new_rollout(store)  # not routine
    assert (len(commits), len(changes)) == (1, 1)
    at = dt.datetime(2026, 11, 28, 12, 0, 1, tzinfo=dt.UTC)
    store.update_detail("r1", "a", restart_seconds=0.4, freeze_started_at=at)  # routine
    assert (len(commits), len(changes)) == (2, 1)
    store.update_detail("r1", "a", restart_seconds=0.4)  # nothing new: not even written
    with store.db.tx(routine=True) as db:  # a transaction that changes no row
        db.execute("UPDATE rollouts SET state = state WHERE id = 'nosuch'")
    assert (len(commits), len(changes)) == (2, 1)
    assert commits == [1, 2]  # told after the count moved
    store.close()


def test_clients_reports_are_merged_so_a_server_restart_forgets_no_workstation(
    tmp_path: Path,
) -> None:
    """Issue 12 review: phase 1 restarts the reference server, whose client log is in memory;
    a workstation on http until 17:30 and off before 18:00 must still be named (and refuse a
    plain finalize) until the agent's window has passed since it was last seen."""
    store = SchemaStore(tmp_path / "s.sqlite3")
    at = dt.datetime(2026, 11, 28, 17, 35, tzinfo=dt.UTC)
    gone = Client("a", "http", "10.0.0.7", "ws-7", at - dt.timedelta(minutes=35), at, 40)
    stays = Client("a", "https", "10.0.0.1", "ws-1", at - dt.timedelta(minutes=30), at, 9)

    def report(now: dt.datetime, *clients: Client) -> list[Client]:
        store.record_clients(
            "a", clients, window_seconds=3600, source="refserver", problem="", now=now
        )
        return still_on_http_now(store.clients(["a"]), store.clients_info(), now, frozenset())

    assert [c.workstation for c in report(at, gone, stays)] == ["ws-7"]
    restarted = at + dt.timedelta(minutes=30)  # 18:05: the server forgot both
    again = replace(stays, first_seen=restarted, last_seen=restarted, requests=2)
    assert [c.workstation for c in report(restarted, again)] == ["ws-7"]
    merged = {(c.scheme, c.workstation): c for c in store.clients(["a"])}
    assert merged[("http", "ws-7")] == gone
    # listed again: the report's own times (one message, one clock shift: review s44rev6
    # H1), the most requests
    assert merged[("https", "ws-1")] == replace(stays, first_seen=restarted, last_seen=restarted)
    moved = replace(gone, scheme="https", first_seen=restarted, last_seen=restarted)
    assert report(restarted, moved) == []  # seen on https since: moved, though still stored
    assert ("http", "ws-7") in {(c.scheme, c.workstation) for c in store.clients(["a"])}
    late = at + dt.timedelta(hours=1, seconds=1)  # the window has passed since 17:35
    report(late)
    assert {(c.scheme, c.workstation) for c in store.clients(["a"])} == {
        ("https", "ws-1"),
        ("https", "ws-7"),
    }
    first = [Client("b", "http", f"10.1.0.{i}", "", NOW, NOW, 1) for i in range(200)]
    newer = NOW + dt.timedelta(seconds=1)
    second = [Client("b", "http", f"10.2.0.{i}", "", newer, newer, 1) for i in range(200)]
    for batch, now in ((first, NOW), (second, newer)):
        store.record_clients("b", batch, window_seconds=600, source="exec", problem="", now=now)
    kept = store.clients(["b"])
    assert len(kept) == MAX_CLIENTS  # bounded per node across reports: the oldest go
    assert sum(c.last_seen == newer for c in kept) == 200


def test_a_clients_report_with_no_window_forgets_no_workstation(tmp_path: Path) -> None:
    """Review rev55b H1: a report with no window (the agent could not read its server's
    clients: "cannot read the clients", the server down) removed every stored row of its node
    (those seen before now minus a window of 0), and a plain finalize no longer named the
    workstations seen on http. The rows go by the window stored now, which stays."""
    store = SchemaStore(tmp_path / "s.sqlite3")
    at = dt.datetime(2026, 12, 5, 9, 0, tzinfo=dt.UTC)
    http = Client("a", "http", "10.0.0.7", "ws-7", at - dt.timedelta(minutes=5), at, 3)
    store.record_clients("a", [http], window_seconds=3600, source="refserver", problem="", now=at)
    later = at + dt.timedelta(seconds=30)
    store.record_clients(
        "a", [], window_seconds=0, source="", problem="cannot read the clients", now=later
    )
    assert store.clients(["a"]) == [http]
    info = store.clients_info()["a"]
    assert info.window_seconds == 3600 and info.problem == "cannot read the clients"
    # judged by the stored window once the report is no longer fresh: still on http
    assert still_on_http_now(store.clients(["a"]), store.clients_info(), later, frozenset())
    # ... and the rows go by that window, also while such reports keep coming (review rev55c
    # M1: a driver that can no longer tell, source "", kept them as on http now for good).
    week = at + dt.timedelta(days=7)
    store.record_clients("a", [], window_seconds=0, source="", problem="", now=week)
    assert store.clients(["a"]) == []
    assert still_on_http_now(store.clients(["a"]), store.clients_info(), week, {"a"}) == []
    store.close()


def test_a_settled_look_while_a_write_holds_the_store_gives_what_the_last_write_left(
    tmp_path: Path,
) -> None:
    """Issue 15: while the store's thread holds the store (a write under way, as it is much of
    a rollout's time), the engine's reads of the kept rollout that a write under way may
    overtake (``kept(settled=True)``: a step's guard, a step's save, which ``save_states``
    checks) take what the last write left instead of handing a read to that thread (about
    five hand-offs per node at 50 simulated nodes). A plain look still gives nothing then; a
    transaction that fails after it wrote leaves nothing of itself to a settled look; the
    engine's ``detail_kept`` says whether a progress write would change anything."""
    store = SchemaStore(tmp_path / "s.sqlite3")
    new_rollout(store)
    row = store.get("r1")
    assert row is not None and store.kept("r1") is row
    store.active()  # the live rollouts: kept too
    name = row.records[0].name
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.db.tx():  # a write under way: it changes what it writes only as it ends
            holding.set()
            release.wait(10)

    writer = threading.Thread(target=hold)
    writer.start()
    try:
        assert holding.wait(10)
        assert store.kept("r1") is None  # busy: not known without waiting
        assert store.kept("r1", settled=True) is row  # what the last write left
        assert store.detail_kept("r1", name, {"restart_seconds": 0.0})
        assert not store.detail_kept("r1", name, {"restart_seconds": 1.5})
        assert store.peek_awaiting() == (True, [])
    finally:
        release.set()
        writer.join(10)

    # A failed transaction that wrote: nothing of it, nor of what was kept, is left to look at.
    def fail(db: sqlite3.Connection) -> None:
        db.execute("UPDATE rollouts SET epoch = epoch WHERE id = 'r1'")
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError), store.db.tx() as db:
        fail(db)
    holding.clear()
    release.clear()
    writer = threading.Thread(target=hold)
    writer.start()
    try:
        assert holding.wait(10)
        assert store.kept("r1", settled=True) is None
        assert not store.detail_kept("r1", name, {"restart_seconds": 0.0})
    finally:
        release.set()
        writer.join(10)
    store.close()


def test_what_runs_after_a_commit_runs_before_any_reader_sees_the_write(tmp_path: Path) -> None:
    """``Database.after_commit`` (review s28 L2: the preflight's certificate for the stage):
    run once the transaction has committed, still under the lock, so before ``peek``, even
    ``settled``, shows what it wrote; never for a transaction that fails."""
    from tlsroll.sqlite import Database

    db = Database(tmp_path / "t.sqlite3", ["CREATE TABLE t (x)"])
    seen: list[tuple[bool, object, int]] = []

    def look() -> None:  # inside: the lock is held, the readers see the old value
        count = len(db._db.execute("SELECT x FROM t").fetchall())
        seen.append((db._lock.locked(), db.peek("k", settled=True), count))

    with db.tx() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        db.cache["k"] = "old"
    with db.tx() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
        db.cache["k"] = "new"
        db.after_commit(look)
        assert seen == []  # not before the commit
    assert seen == [(True, "old", 2)]
    assert db.peek("k", settled=True) == "new"
    with pytest.raises(RuntimeError), db.tx() as conn:
        conn.execute("INSERT INTO t VALUES (3)")
        db.after_commit(look)
        raise RuntimeError("refused")
    with db.tx() as conn:  # nothing left over from the failed one
        conn.execute("INSERT INTO t VALUES (4)")
    assert seen == [(True, "old", 2)]
    db.close()


def test_a_callback_that_raises_after_a_commit_leaves_the_write_committed(
    tmp_path: Path,
) -> None:
    """Review s28 L4, left since: a callback run after the commit (``after_commit``) that
    raised made the committed write look failed to its caller (the engine would have seen
    its preflight's outcome fail, and signed a second certificate at the stage), skipped
    the callbacks after it, the readers' notifications (``on_change``, ``on_commit``) and
    the count of transactions. The contract now holds by construction: the exception is
    logged with the callback's name and never reaches the writer; everything else runs. A
    callback registered outside a transaction (it would never run) is refused."""
    from tlsroll.sqlite import Database

    db = Database(tmp_path / "t.sqlite3", ["CREATE TABLE t (x)"])
    ran: list[str] = []
    changes: list[int] = []
    commits: list[int] = []
    db.on_change.append(lambda: changes.append(db.generation))
    db.on_commit.append(lambda: commits.append(db.commits))

    def broken() -> None:
        raise ValueError("the callback's own bug")

    with capture_logs() as events, db.tx() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        db.cache["k"] = "kept"
        db.after_commit(broken)
        db.after_commit(lambda: ran.append("next"))
    assert ran == ["next"]
    assert changes == [1] and commits == [1] and db.transactions == 1
    assert db.peek("k") == "kept"  # the cache is what the file holds: not dropped
    with db.read() as conn:
        assert [r[0] for r in conn.execute("SELECT x FROM t")] == [1]
    [failed] = [e for e in events if e["event"] == "db.after_commit_failed"]
    assert failed["log_level"] == "error"
    assert "broken" in failed["callback"]
    assert "the callback's own bug" in failed["error"]
    with pytest.raises(RuntimeError, match="inside a transaction"):
        db.after_commit(lambda: ran.append("never"))
    db.close()


class _FailingCommit:
    """A connection whose COMMIT fails (an I/O error, as SQLite's module raises it); anything
    else is the real connection's."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorname = "SQLITE_IOERR_FSYNC"
            raise error
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_callback_that_raises_after_a_failed_commit_leaves_the_store_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s75 revjournal (L): a callback of ``if_failed`` (session 75; the agent's journal
    sets its doubt in one) that raised skipped the callbacks after it and the ROLLBACK: the
    connection stayed inside the failed transaction, and every later write of the store failed
    ("cannot start a transaction within a transaction"). As for ``after_commit`` (review s28
    L4): logged with its name, the others run, the write's own error reaches the writer, and
    the store goes on."""
    from tlsroll.sqlite import Database

    db = Database(tmp_path / "t.sqlite3", ["CREATE TABLE t (x)"])
    real = db._db
    monkeypatch.setattr(db, "_db", _FailingCommit(real))
    ran: list[str] = []

    def broken(exc: BaseException) -> None:
        raise ValueError("the callback's own bug")

    with (
        capture_logs() as events,
        pytest.raises(sqlite3.OperationalError, match="disk I/O"),
        db.tx() as conn,
    ):
        conn.execute("INSERT INTO t VALUES (1)")
        db.if_failed(broken)
        db.if_failed(lambda exc: ran.append(type(exc).__name__))
    assert ran == ["OperationalError"]
    monkeypatch.setattr(db, "_db", real)
    assert not real.in_transaction
    with db.tx() as conn:  # the store takes writes again
        conn.execute("INSERT INTO t VALUES (2)")
    with db.read() as conn:
        assert [r[0] for r in conn.execute("SELECT x FROM t")] == [2]
    [failed] = [e for e in events if e["event"] == "db.if_failed_failed"]
    assert failed["log_level"] == "error" and "broken" in failed["callback"]
    assert "the callback's own bug" in failed["error"]
    db.close()


def enrolled(tmp_path: Path, *names: str) -> tuple[Store, SchemaStore]:
    """A leader store with ``names`` enrolled (certificates made up: serial n, "fp<n>") and
    the schema store on the same database, as the leader has them."""
    store = Store(tmp_path / "leader.sqlite3")
    for n, name in enumerate(names, 1):
        store.add_token(
            f"t{n}", "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description="", now=NOW,
            actor="test", node_name=name, addresses=(f"10.1.1.{n}",),
        )  # fmt: skip
        store.enrol(
            token_id=f"t{n}", secret="s" * 26, name=name, addresses=(f"10.1.1.{n}",),
            dns_names=(), agent_version="t", agent_port=9442, key_pin=f"sha256:pin{n}",
            issue=lambda n=n: NodeCert(  # type: ignore[misc]
                f"sha256:pin{n}", f"sha256:fp{n}", f"{n:x}", NOW + dt.timedelta(days=30)
            ),
            now=NOW,
        )  # fmt: skip
    return store, SchemaStore(store.db)


def test_a_node_is_not_removed_if_a_rollout_started_after_the_admins_check(
    tmp_path: Path,
) -> None:
    """The audit's M3: ``nodes remove`` looks for the active rollout, then removes in a
    transaction of its own; a start committed between them (an admin's or auto-rotate's)
    left a rollout holding a removed node. The check is made again in the removal's
    transaction, with the early check's refusal; nothing is removed or revoked."""
    store, schema = enrolled(tmp_path, "a", "b")
    assert schema.active() is None  # RemoveNode's check: no rollout, so "a" may go
    new_rollout(schema)  # ... and a start commits, holding a and b
    assert store.queue_heartbeat("a", "t2", now=NOW, cert_fingerprint="sha256:fp1")
    before = store.list_certificates()
    with pytest.raises(InRollout) as refused:
        store.remove_node("a", now=NOW, actor="admin")
    assert str(refused.value) == (
        "node 'a' is in rollout r1, which is running; let it end (or `tlsroll rollout abort`)"
        " first. If its agent's certificate has ended, it needs no removal: `(umask 077;"
        " tlsroll token create --node a --address 10.1.1.1 --print-join-command > join-a.sh)`,"
        " `sh join-a.sh` on a as root, `systemctl restart tlsroll-agent` there: it enrols its"
        " own key again. If the"
        " machine is lost or stolen, cut its agent off now with `tlsroll ca revoke 1` (as"
        " `tlsroll certs check-expiration` lists it), while the rollout goes on; once the"
        " rollout has ended, `tlsroll nodes remove` it, which revokes its server's certificate"
        " (8443) too"
    )
    assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION
    assert store.get_node("a").removed_at is None
    assert store.list_certificates() == before
    assert store.get_node("a").agent_version == "t2"  # its queued heartbeat not forgotten
    end(schema)  # once the rollout has ended, the node may go
    store.remove_node("a", now=NOW, actor="admin")
    store.close()


def test_a_rollout_planned_over_a_node_removed_meanwhile_is_not_created(tmp_path: Path) -> None:
    """The audit's M3, the other order: a start planned with node b enrolled, b removed, then
    the rollout inserted with b in it (its steps fail on b; a certificate signed for b would
    be recorded unrevoked, though the removal revoked them all). Refused in the create's
    transaction as a plan made after the removal refuses it; nothing is written."""
    store, schema = enrolled(tmp_path, "a", "b")
    rollout, nodes = planner.plan_rollout(
        rollout_id="r1",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=schema.next_epoch(),
    )
    store.remove_node("b", now=NOW, actor="admin")  # commits between the plan and the create
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    with pytest.raises(planner.UnknownNodes) as refused:
        schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW, '{"v": 1}')
    assert str(refused.value) == "not enrolled: b (check the names with `tlsroll nodes`)"
    assert schema.active() is None and schema.latest() is None
    assert schema.latest_auth_version() == 0  # the password went with it
    store.close()


def end(schema: SchemaStore) -> None:
    """Abort the active rollout, which has nothing in flight: it ends."""
    row = schema.active()
    assert row is not None
    row = schema.save_states(row, row.rollout.with_event(RolloutEvent.ABORT), row.records, NOW, "a")
    schema.save_states(
        row, row.rollout.with_event(RolloutEvent.NODES_SETTLED), row.records, NOW, "engine"
    )
    assert schema.active() is None


def test_a_rollout_gets_an_epoch_above_the_floor_raised_since_its_plan(tmp_path: Path) -> None:
    """The audit's M2: a start reads the next epoch when it plans, and the create inserted
    it as read. An `epoch advance` (or a relearn) committed between them left the rollout
    below the floor that agents have seen (they answer "stale epoch": it halts); two starts
    that read the same epoch made the second a raw IntegrityError. The create takes the next
    epoch in its transaction when the planned one is no longer above the current one."""
    store, schema = enrolled(tmp_path, "a", "b")
    planned = [
        planner.plan_rollout(
            rollout_id=rid,
            change=Change.ENABLE_TLS,
            scope=Scope.cluster(),
            enrolled={"a": True, "b": True},
            leader="a",
            epoch=schema.next_epoch(),
        )
        for rid in ("r1", "r2")
    ]
    assert [r.epoch for r, _ in planned] == [1, 1]
    store.advance_epoch(5, now=NOW, actor="admin")  # commits between the plan and the create
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    first, nodes = planned[0]
    row = schema.create(first.with_event(RolloutEvent.START), nodes, meta, NOW)
    assert row.rollout.epoch == 6 and schema.current_epoch() == 6
    end(schema)
    second, nodes = planned[1]  # planned with the same epoch, before the first was created
    row = schema.create(second.with_event(RolloutEvent.START), nodes, meta, NOW)
    assert row.rollout.epoch == 7 == schema.get("r2").rollout.epoch  # type: ignore[union-attr]
    store.close()


def test_the_epoch_is_not_advanced_if_a_rollout_started_after_the_admins_check(
    tmp_path: Path,
) -> None:
    """The audit's M2, the other order: ``epoch advance`` found no rollout, a start
    committed, then the floor was raised under the running rollout, whose epoch is fixed.
    Refused in the advance's transaction with the early check's refusal; nothing changes."""
    store, schema = enrolled(tmp_path, "a", "b")
    assert schema.active() is None  # AdvanceEpoch's check
    new_rollout(schema)  # ... and a start commits
    with pytest.raises(EpochFixed) as refused:
        store.advance_epoch(5, now=NOW, actor="admin")
    assert str(refused.value) == "rollout r1 is running; advance the epoch once it has ended"
    assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION
    assert store.epoch_floor() == 0 and schema.current_epoch() == 1
    end(schema)
    assert store.advance_epoch(5, now=NOW, actor="admin") == 5
    store.close()


async def test_an_epoch_advance_that_moves_nothing_is_no_warning(tmp_path: Path) -> None:
    """Review s69 revlogs L3: every ``tlsroll epoch advance`` logged ``epoch.advanced`` as a
    warning, also when no node was ahead and the leader's epoch stayed where it was ("floor 1,
    was 1": 177 such warnings in one leader log of the last CI, each a test's store write
    noticed). One that moves the epoch is still a warning (it follows a store put back);
    one that moves nothing is an info line that says so."""
    from leader.admin_service import AdminService
    from leader.service import LeaderState
    from tlsroll import pki
    from tlsroll.v1 import admin_pb2

    store, schema = enrolled(tmp_path, "a")
    new_rollout(schema)
    end(schema)  # the leader's epoch is 1, no node ahead
    ca = pki.CertificateAuthority.create("epoch test CA", now=NOW)
    service = AdminService(
        LeaderState(store, ca, lambda: NOW, 1),
        None,  # type: ignore[arg-type]  # (not asked by AdvanceEpoch)
        schema,
    )
    with capture_logs() as logs:
        info = await service.AdvanceEpoch(admin_pb2.AdvanceEpochRequest(), None)  # type: ignore[arg-type]
    assert info.leader_epoch == 1 and not info.behind
    assert [(e["event"], e["log_level"]) for e in logs] == [("epoch.unchanged", "info")], logs
    assert logs[0]["epoch"] == 1

    store.heartbeat("a", "t", now=NOW, highest_epoch=4)  # a node ahead (a store put back)
    with capture_logs() as logs:
        info = await service.AdvanceEpoch(admin_pb2.AdvanceEpochRequest(), None)  # type: ignore[arg-type]
    assert info.leader_epoch == 4 and not info.behind
    assert [(e["event"], e["log_level"]) for e in logs] == [("epoch.advanced", "info")], logs
    assert (logs[0]["floor"], logs[0]["was"]) == (4, 1)
    store.close()


class LetsWriterFirst:
    """The Database's lock (``Database._lock``), for the test's thread and one writer thread:
    once ``writer`` runs, the test's thread lets it go first each time it takes the lock
    again. A read split into two lock sections thus always has the write between them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.test_thread = threading.get_ident()
        self.writer: threading.Thread | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        writer = self.writer
        if writer is not None and threading.get_ident() == self.test_thread:
            writer.join()  # we do not hold the lock here: the writer can finish
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def test_the_active_rollout_is_read_whole_never_one_that_ended_meanwhile(tmp_path: Path) -> None:
    """Session 32's audit, L1: ``active()`` found the live rollout's id in one read and read
    its row in another (``get``); a write that ended the rollout in between made it return a
    rollout in a terminal state as the active one (the engine then ran a pass on it). Now the
    id and the row come from one read: the write lands before it or after it.

    Another thread ends the rollout (abort, then settled: ``aborted``), started while
    ``active()`` looks up the live rollouts (``_live``). The store's lock lets that writer go
    first whenever ``active()`` takes the lock again, however the read is split (review s32
    F4: the test hooked ``get``, which ``active()`` no longer calls). So ``active()`` must
    return the rollout still running, and the write must land after it."""

    failed: list[BaseException] = []  # what the writer thread raised

    class Crossing(SchemaStore):
        cross = False

        def _live(self, db: sqlite3.Connection) -> tuple[tuple[str, str], ...]:
            if self.cross:  # another writer ends the rollout while active() reads
                self.cross = False
                writer = threading.Thread(target=self.end, args=("r1",))
                lock.writer = writer
                writer.start()
            return super()._live(db)

        def end(self, rollout_id: str) -> None:
            try:
                row = self.get(rollout_id)
                assert row is not None
                aborting = row.rollout.with_event(RolloutEvent.ABORT)
                after = self.save_states(row, aborting, row.records, NOW, "admin")
                settled = aborting.with_event(RolloutEvent.NODES_SETTLED)
                self.save_states(after, settled, after.records, NOW, "engine")
            except BaseException as exc:
                failed.append(exc)

    store = Crossing(tmp_path / "s.sqlite3")
    new_rollout(store)
    lock = LetsWriterFirst()
    store._db._lock = lock  # type: ignore[assignment]
    store.cross = True
    active = store.active()
    assert lock.writer is not None, "active() no longer looks up the live rollouts (_live)"
    state = active.rollout.state.value if active is not None else None
    assert state == "running", f"active() read a rollout the write ended meanwhile: {state}"
    ended = store.get("r1")  # the test's thread waits for the writer here (the lock)
    assert not failed, failed
    assert ended is not None and ended.rollout.state.value == "aborted", "the write did not land"
    assert store.active() is None
    store.close()


def test_the_schema_says_a_mixed_cluster_and_schema_show_how_to_switch_the_rest(
    tmp_path: Path,
) -> None:
    """Review s69 revlocal2 M1: after a local switch the schema (``GetSchema``, what `schema
    show` prints) named only the rollout's node: neither the other enrolled nodes nor that
    the cluster is mixed, which `tlsroll nodes` and the viewer said. It carries the mixed
    cluster by the heartbeats (``mixed_cluster``: the nodes on http, on https, not known),
    and `schema show` (text and --json) says it with the words of `tlsroll nodes`. A removed
    node is no part of it; a cluster not mixed has none."""
    import json
    from unittest import mock

    from click.testing import CliRunner

    from leader.cli import schema_cmd
    from leader.cli.identity import _mixed_schemes
    from leader.schema_view import SchemaViewService, schema_json
    from tlsroll.v1 import admin_pb2, schema_pb2

    store, schema = enrolled(tmp_path, "node1", "node2", "node3", "node4", "gone")
    store.remove_node("gone", now=NOW, actor="test")
    live = {"node1": "https", "node2": "http", "node3": "http frozen", "node4": "down: x"}
    live["gone"] = "https"
    service = SchemaViewService(
        schema,
        lambda: NOW,
        fresh=lambda infos, now: frozenset(),
        reported=lambda name: True,
        live_server=lambda name: live.get(name, ""),
    )
    message = service._answer(schema_pb2.GetSchemaRequest(limit=1), None)
    assert message.HasField("mixed_cluster")
    m = message.mixed_cluster
    assert (list(m.on_http), list(m.on_https), list(m.unknown)) == (
        ["node2", "node3"],
        ["node1"],
        ["node4"],
    )
    data = json.loads(schema_json(message))
    line = (
        "a mixed cluster: node2, node3 on http, node1 on https; to switch the rest: tlsroll "
        "plan --nodes node2,node3, then tlsroll rollout start --nodes node2,node3"
    )
    listed = [admin_pb2.NodeInfo(name=n, server=s) for n, s in live.items() if n != "gone"]
    assert _mixed_schemes(listed) == line  # the words of `tlsroll nodes`
    with mock.patch.object(schema_cmd, "fetch_schema_json", return_value=data):
        shown = CliRunner().invoke(schema_cmd.schema, ["show"])
        as_json = CliRunner().invoke(schema_cmd.schema, ["show", "--json"])
    assert shown.exit_code == 0, shown.output
    assert line in " ".join(shown.output.split()), shown.output
    assert json.loads(as_json.output)["mixed_cluster"] == {
        "on_http": ["node2", "node3"],
        "on_https": ["node1"],
        "unknown": ["node4"],
        "dual": [],
        # (no certificate heard of node1: not known to be this CA's; with two on http, named)
        "other_certificate": ["node1"],
    }
    # Not mixed (every server known on https, or none on https): nothing said.
    live.update(node2="https", node3="https")
    assert not service._answer(schema_pb2.GetSchemaRequest(), None).HasField("mixed_cluster")
    # A watch's read (rollouts only) reads no nodes for it.
    live.update(node2="http")
    only = service._answer(schema_pb2.GetSchemaRequest(rollouts_only=True), None)
    assert not only.HasField("mixed_cluster")
    assert service._answer(schema_pb2.GetSchemaRequest(), None).HasField("mixed_cluster")


def test_the_schema_names_the_nodes_on_https_a_cluster_rollout_would_not_leave_alone(
    tmp_path: Path,
) -> None:
    """Review of s69 (closing, M): the schema's mixed cluster could not tell a dual node, nor
    one on https with a certificate not of this CA (the practice's own before tlsroll), from
    one a cluster enable-tls leaves alone, and `schema show` said `--scope cluster` of them
    beyond ten nodes on http. ``SchemaStore.other_certificates`` judges by the certificate
    the heartbeat names (a server certificate of this CA on record is "already done"; an
    unknown one, or none named, is not); ``mixed_cluster`` carries ``dual`` and
    ``other_certificate``, and `schema show` advises ten at a time."""
    import json
    from unittest import mock

    from click.testing import CliRunner

    from leader.cli import schema_cmd
    from leader.schema_view import SchemaViewService, schema_json
    from leader.store import IssuedCert
    from tlsroll.v1 import schema_pb2

    http = [f"h{i:02}" for i in range(12)]
    store, schema = enrolled(tmp_path, "ours", "foreign", "silent", "dual", *http)
    store.record_certificate(
        IssuedCert("a1", "server", "ours", "ours", "sha256:ours", NOW, NOW + dt.timedelta(9)),
        actor="test",
        now=NOW,
    )
    live = {"ours": "https", "foreign": "https frozen", "silent": "https", "dual": "http+https"}
    live |= dict.fromkeys(http, "http")
    served = {"ours": "sha256:ours", "foreign": "sha256:practice", "dual": "sha256:ours"}
    assert schema.other_certificates(live, served) == {"foreign", "silent"}
    assert schema.other_certificates({"ours": "https"}, served) == frozenset()
    service = SchemaViewService(
        schema,
        lambda: NOW,
        fresh=lambda infos, now: frozenset(),
        reported=lambda name: True,
        live_server=lambda name: live.get(name, ""),
        served=lambda: served,
    )
    m = service._answer(schema_pb2.GetSchemaRequest(limit=1), None).mixed_cluster
    assert (list(m.dual), list(m.other_certificate)) == (["dual"], ["foreign", "silent"])
    data = json.loads(schema_json(service._answer(schema_pb2.GetSchemaRequest(), None)))
    with mock.patch.object(schema_cmd, "fetch_schema_json", return_value=data):
        shown = CliRunner().invoke(schema_cmd.schema, ["show"])
    said = " ".join(shown.output.split())
    batch = "--nodes " + ",".join(http[:10])
    assert (
        f"to switch the rest: tlsroll plan {batch}, then tlsroll rollout start {batch}, then "
        "the next 10 of them the same way, and so on (not --scope cluster: it refuses dual, on "
        "http and https; it would replace the certificates foreign, silent serve https "
        "with, not of this cluster's CA); dual serves http and https" in said
    ), said
    assert "left alone" not in said, said
    # Every node on https with this CA's certificate: the cluster's scope, as before.
    live.update(foreign="http", silent="http", dual="http")
    m = service._answer(schema_pb2.GetSchemaRequest(), None).mixed_cluster
    assert (list(m.on_https), list(m.dual), list(m.other_certificate)) == (["ours"], [], [])


def enrol_again(store: Store, name: str, at: dt.datetime, n: int = 9) -> None:
    """``name`` enrolled again (a new token made ``at``, a new key) as ``enrolled`` does."""
    address = (f"10.1.1.{n}",)
    store.add_token(
        f"t{n}", "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description="", now=at,
        actor="test", node_name=name, addresses=address,
    )  # fmt: skip
    store.enrol(
        token_id=f"t{n}", secret="s" * 26, name=name, addresses=address, dns_names=(),
        agent_version="t", agent_port=9442, key_pin=f"sha256:pin{n}",
        issue=lambda: NodeCert(
            f"sha256:pin{n}", f"sha256:fp{n}", f"{n:x}", at + dt.timedelta(days=30)
        ),
        now=at,
    )  # fmt: skip


@pytest.mark.parametrize("stale", [False, True])
def test_a_node_removed_and_enrolled_again_runs_no_password_and_is_not_behind(
    tmp_path: Path, stale: bool
) -> None:
    """Review 2 of s69 (revpass3): the password a node ran stayed recorded for it after
    `nodes remove` (``node_auth``), so the machine enrolled again under its name (on http, no
    password) was named behind the newest staged password in `schema show`, with a
    change-password start for it that refuses a node on http, and counted as running the old
    one. The removal forgets it in its transaction (the cache with it); an enrolment forgets a
    record a removal before this fix left (``stale``)."""
    store, schema = enrolled(tmp_path, "a", "b")
    assert schema.stage_password('{"v": 1}', NOW, "admin") == 1
    schema.set_node_auth("a", 1, NOW)
    schema.set_node_auth("b", 1, NOW)
    assert schema.stage_password('{"v": 2}', NOW, "admin") == 2
    schema.set_node_auth("a", 2, NOW)
    behind = schema.password_behind()
    assert behind is not None and behind.nodes == (("b", 1),)  # (the cache is read here)
    store.remove_node("b", now=NOW, actor="admin")
    if stale:  # as a removal before the fix left it
        with store.db.tx() as db:
            db.execute("INSERT OR REPLACE INTO node_auth VALUES ('b', 1, '')")
        store.db.cache.clear()
        # While removed, its stale record names no node behind (no workstation goes there).
        assert schema.pending_password_nodes() == {"b"}
        assert schema.password_behind() is None
    else:
        assert schema.node_auth() == {"a": 2}
    enrol_again(store, "b", NOW + dt.timedelta(minutes=1))
    assert schema.node_auth() == {"a": 2}
    assert schema.password_behind() is None
    assert schema.pending_password_nodes() == set()
    store.close()


@pytest.mark.parametrize(
    ("change", "b_ends", "completed_by"),
    [
        (Change.FINALIZE, NodeState.DONE, True),
        (Change.DISABLE_TLS, NodeState.DONE, True),
        (Change.FINALIZE, NodeState.ROLLED_BACK, False),
    ],
)
def test_a_completed_follower_holds_new_rollouts_only_if_planner_says_it_settles(
    tmp_path: Path, change: Change, b_ends: NodeState, completed_by: bool
) -> None:
    """The store's ``_settled_by`` (SQL, at a create) and the engine's
    ``planner.awaiting_verdict`` judge a completed finalize or way back by one rule: a follower
    with a failed node leaves its rollout awaiting (plain busy), one without says it settled."""
    store = SchemaStore(tmp_path / "s.sqlite3")
    awaiting_rollout(store)
    follower(store, change, "t1")
    row = store.get("f1")
    assert row is not None
    ends = {"a": NodeState.DONE, "b": b_ends}
    nodes = [replace(n, state=ends[n.name]) for n in row.records]
    store.save_states(row, row.rollout.with_event(RolloutEvent.NODES_SETTLED), nodes, NOW, "e")
    done = store.get("f1")
    assert done is not None
    verdict = planner.awaiting_verdict(done.rollout, done.records)
    assert (verdict is not None) is completed_by
    with pytest.raises(RolloutBusy) as refused:
        new_rollout(store, "r2")
    assert isinstance(refused.value, FollowerCompleted) is completed_by
