"""The schema store on a real SQLite file: one active rollout at a time, optimistic writes,
auth password versions."""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from leader import planner
from leader.rollout_core import Change, NodeEvent, RolloutAction, RolloutEvent, Scope
from leader.schema_store import (
    AlreadyTakenBack,
    RolloutBusy,
    RolloutMeta,
    SchemaStore,
    StaleRecords,
)

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
            row, row.rollout.with_action(RolloutAction.ABORT), row.records, NOW, "admin"
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
