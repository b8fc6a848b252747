"""Rollout commands given twice, crossed, or left by their caller (audit s39race: H3, M3, M4),
in-process on a real SchemaStore (SQLite file) and the real Commands and AdminService; the
engine harness of tests/test_engine.py where a rollout has to run."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from leader import planner
from leader.commands import RolloutRequest
from leader.observe import FirstSteps
from leader.rollout_core import (
    Change,
    NodeObservation,
    NodeState,
    RolloutEvent,
    RolloutState,
    Scope,
    Strategy,
)
from leader.schema_store import (
    AlreadyRetried,
    RolloutBusy,
    RolloutMeta,
    RolloutRow,
    SchemaStore,
)
from leader.service import ERRORS
from tlsroll.rpc import status_for

NOW = dt.datetime(2026, 12, 3, 6, 0, tzinfo=dt.UTC)
ADMIN = "admin:test"


def rollout(
    schema: SchemaStore,
    rollout_id: str,
    change: Change,
    names: Sequence[str],
    *,
    retry_of: str = "",
    strategy: Strategy = Strategy.DIRECT,
    finalizes: str = "",
) -> RolloutRow:
    leader = "alpha" if "alpha" in names else "a"
    made, nodes = planner.plan_rollout(
        rollout_id=rollout_id,
        change=change,
        scope=Scope.of_nodes(names),
        enrolled=dict.fromkeys(names, True),
        leader=leader,
        epoch=schema.next_epoch(),
        strategy=strategy,
    )
    meta = RolloutMeta(created_at=NOW, started_by=ADMIN, leader_node=leader, finalizes=finalizes)
    verifier = '{"v": 1}' if change is Change.ENABLE_TLS else None
    return schema.create(
        made.with_event(RolloutEvent.START), nodes, meta, NOW, verifier, retry_of=retry_of
    )


def settle(schema: SchemaStore, row: RolloutRow, done: Collection[str]) -> RolloutRow:
    """The rollout ends: ``done`` switched, the others failed (halted) or none (completed)."""
    records = [
        replace(r, state=NodeState.DONE if r.name in done else NodeState.FAILED)
        for r in row.records
    ]
    head = row.rollout
    if len(done) < len(records):
        head = head.with_event(RolloutEvent.FAILURE_BUDGET_EXCEEDED)
    head = head.with_event(RolloutEvent.NODES_SETTLED)
    return schema.save_states(row, head, records, NOW, "engine")


class Agents:
    """``Commands.observe`` for nodes on https: every call to the agents is counted."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def __call__(
        self, names: Sequence[str], *, warm: Collection[str], first: FirstSteps | None
    ) -> dict[str, NodeObservation]:
        self.asked.append(list(names))
        return {
            n: NodeObservation(reachable=True, schemes=("https",), cert_from_ca=True) for n in names
        }


# --- H3: a rollout is retried once ----------------------------------------------------------


def test_a_rollout_is_retried_once_even_when_two_retries_cross(tmp_path: Path) -> None:
    """Two `rollout retry R` planned at the same time both found R not retried; the store
    itself refuses the second (FAILED_PRECONDITION at the admin API), whatever state the
    first is in, and writes nothing. The retry may itself be retried."""
    schema = SchemaStore(tmp_path / "s.sqlite3")
    first = settle(schema, rollout(schema, "r1", Change.ROTATE_CERT, ["a", "b", "c"]), {"a"})
    assert first.rollout.state is RolloutState.HALTED
    second = rollout(schema, "r2", Change.ROTATE_CERT, ["b", "c"], retry_of="r1")
    assert schema.retried_by("r1") == ("r2", "running")
    settle(schema, second, {"b"})  # halted again: c failed
    with pytest.raises(AlreadyRetried) as refused:
        rollout(schema, "r3", Change.ROTATE_CERT, ["b", "c"], retry_of="r1")
    assert str(refused.value) == (
        "rollout r1 was already retried by r2 (halted); to carry on where it stopped: "
        "tlsroll rollout retry r2; see: tlsroll schema show"
    )
    assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION
    assert schema.get("r3") is None and schema.retried_by("r1") == ("r2", "halted")
    third = rollout(schema, "r3", Change.ROTATE_CERT, ["c"], retry_of="r2")  # a retry's retry
    settle(schema, third, {"c"})
    assert schema.retried_by("r2") == ("r3", "completed")
    schema.close()


async def test_a_second_retry_switches_no_node_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s39race H3: `rollout retry R` after R's retry R2 completed started R3, which
    rotated the nodes R2 had rotated a second time (each restarted again). Refused now, in
    one line naming R2 and its state, before any agent is asked, and nothing is created."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands = leader_.schema, leader_.commands
    first = rollout(schema, "r1", Change.ROTATE_CERT, ["alpha", "bravo", "charlie"])
    settle(schema, first, {"bravo"})
    retried = await commands.retry("r1", ADMIN)
    assert retried.rollout.order == ("charlie", "alpha")
    settle(schema, retried, {"charlie", "alpha"})
    before = schema.latest()
    agents = Agents()
    commands.observe = agents
    with pytest.raises(
        AlreadyRetried,
        match=rf"^rollout r1 was already retried by {retried.rollout.id} \(completed\); "
        r"see: tlsroll schema show$",
    ):
        await commands.retry("r1", ADMIN)
    assert schema.latest() == before and agents.asked == []
    await leader_.stop()


# --- M4: a start refused because another rollout runs says so, asking no agent --------------


async def test_a_start_retry_or_finalize_beside_a_running_rollout_asks_no_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s39race M4: a start refused because another rollout runs asked every agent first,
    and with nodes busy switching said "cannot ask the agent of node1 ..." instead of naming
    the rollout. The running rollout is checked first (and again in the create)."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands = leader_.schema, leader_.commands
    agents = Agents()
    commands.observe = agents
    halted = settle(schema, rollout(schema, "r1", Change.ROTATE_CERT, ["bravo"]), set())
    running = rollout(schema, "r2", Change.ROTATE_CERT, ["alpha"])
    assert running.rollout.state is RolloutState.RUNNING
    busy = r"^rollout r2 is running; one rollout at a time per cluster"
    with pytest.raises(RolloutBusy, match=busy):
        await commands.start(RolloutRequest(Change.ROTATE_CERT, Scope.cluster()), ADMIN)
    with pytest.raises(RolloutBusy, match=busy):
        await commands.retry(halted.rollout.id, ADMIN)
    settle(schema, running, {"alpha"})
    # A transitional phase 1 awaiting finalize, its finalize running: a second finalize.
    phase1 = rollout(schema, "t1", Change.ENABLE_TLS, ["charlie"], strategy=Strategy.TRANSITIONAL)
    dual = [replace(r, state=NodeState.DUAL) for r in phase1.records]
    schema.save_states(phase1, phase1.rollout.with_event(RolloutEvent.NODES_DUAL), dual, NOW, "e")
    rollout(schema, "f1", Change.FINALIZE, ["charlie"], finalizes="t1")
    with pytest.raises(RolloutBusy, match=r"^rollout f1 is running; one rollout at a time"):
        await commands.finalize("t1", ADMIN, force=True)
    assert agents.asked == []
    latest = schema.latest()
    assert latest is not None and latest.rollout.id == "f1"
    await leader_.stop()
