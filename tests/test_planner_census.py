"""The planner's census (issue 15): ``next_actions`` decides from where the nodes stand (a
``Census`` the store keeps with the active rollout) instead of passing over every node record
about ten times per call; the leader's CPU per node grew with the rollout's size. These
tests hold the new pass to the old one's decisions (the old pass is kept here, verbatim, as
the oracle), check that it reads only the records of the nodes it names, and that the census
the store moves along with each saved record is the one a fresh count gives."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

from hypothesis import given, settings
from hypothesis import strategies as st

from leader.planner import (
    _ABORT_SKIPS,
    _HALT_SKIPS,
    _LIVE_STATES,
    PREPARING,
    SWITCH_SLOT,
    Census,
    NodeEventAction,
    Plan,
    StepAction,
    _in_order,
    apply_plan,
    next_actions,
    plan_moves,
)
from leader.rollout_core import (
    CHANGES,
    DRAINING_ROLLOUT_STATES,
    FAILED_NODE_STATES,
    IN_FLIGHT_NODE_STATES,
    STEP_FOR_STATE,
    TERMINAL_NODE_STATES,
    Change,
    FreezeMode,
    NodeEvent,
    NodeRecord,
    NodeState,
    Rollout,
    RolloutEvent,
    RolloutState,
    Scope,
    ScopeKind,
    Step,
    Strategy,
    node_transition,
    rollout_transition,
)
from leader.schema_store import RolloutMeta, SchemaStore

N = NodeState


# --- the oracle: next_actions as it was before the census (stop 22, 40fe927) -------------------


def old_next_actions(
    rollout: Rollout,
    nodes: Sequence[NodeRecord],
    held: frozenset[str] = frozenset(),
    *,
    prepare_ahead: int = 0,
) -> Plan:
    records = _in_order(rollout, nodes)
    state = rollout.state
    if state not in _LIVE_STATES:
        return Plan(epoch=rollout.epoch)
    rollout_events: list[RolloutEvent] = []
    failures = sum(r.state in FAILED_NODE_STATES for r in records)
    if state in (RolloutState.RUNNING, RolloutState.PAUSED) and failures > rollout.failure_budget:
        rollout_events.append(RolloutEvent.FAILURE_BUDGET_EXCEEDED)
        state = rollout_transition(state, RolloutEvent.FAILURE_BUDGET_EXCEEDED)
    after = {r.name: r.state for r in records}
    node_events: list[NodeEventAction] = []

    def emit(name: str, event: NodeEvent, reason: str | None = None) -> None:
        node_events.append(NodeEventAction(name, event, reason))
        after[name] = node_transition(after[name], event, f"node {name}")

    if state in DRAINING_ROLLOUT_STATES:
        why = "rollout aborted" if state is RolloutState.ABORTING else "rollout halted"
        gates = _ABORT_SKIPS if state is RolloutState.ABORTING else _HALT_SKIPS
        for name in rollout.order:
            if after[name] in gates:
                emit(name, NodeEvent.SKIP, why)
    if not CHANGES[rollout.change].stages_certificate:
        for name in rollout.order:
            if after[name] is NodeState.STAGING:
                emit(name, NodeEvent.STAGE_SKIPPED)

    def start(limit: int) -> None:
        free = limit - sum(s in IN_FLIGHT_NODE_STATES for s in after.values())
        if free <= 0:
            return
        ready = (n for n in rollout.order if after[n] is NodeState.PENDING and n not in held)
        for name in list(itertools.islice(ready, free)):
            emit(name, NodeEvent.START)

    if state is RolloutState.RUNNING and prepare_ahead <= 0:
        start(rollout.max_parallel)
    to_freeze: list[str] = []
    staged = [name for name in rollout.order if after[name] is NodeState.STAGED]
    if prepare_ahead > 0 and state is RolloutState.PAUSED:
        staged = []
    if staged and rollout.freeze is FreezeMode.SCOPE:
        to_freeze = [
            r.name
            for r in records
            if not r.scope_frozen and after[r.name] not in (NodeState.FAILED, NodeState.SKIPPED)
        ]
    if not to_freeze:
        if prepare_ahead > 0:
            staged = old_switch_turns(rollout, after, staged, held)
        for name in staged:
            emit(name, NodeEvent.SWITCH)
    if state is RolloutState.RUNNING and prepare_ahead > 0:
        start(rollout.max_parallel)
        begun = SWITCH_SLOT | {
            NodeState.DONE,
            NodeState.DUAL,
            NodeState.ROLLED_BACK,
            NodeState.NEEDS_ATTENTION,
        }
        if any(s in begun for s in after.values()) or not any(
            s in (NodeState.PREFLIGHT, NodeState.STAGING) for s in after.values()
        ):
            start(rollout.max_parallel + prepare_ahead)
    steps = [
        StepAction(name, STEP_FOR_STATE[after[name]], rollout.epoch)
        for name in rollout.order
        if after[name] in STEP_FOR_STATE
    ]
    steps += [StepAction(name, Step.FREEZE, rollout.epoch) for name in to_freeze]
    if all(s in TERMINAL_NODE_STATES for s in after.values()):
        frozen = [r.name for r in records if r.scope_frozen]
        steps += [StepAction(name, Step.UNFREEZE, rollout.epoch) for name in frozen]
        if not frozen:
            dual = any(s is NodeState.DUAL for s in after.values())
            waits = (
                dual
                and rollout.strategy is Strategy.TRANSITIONAL
                and state in (RolloutState.RUNNING, RolloutState.PAUSED)
            )
            rollout_events.append(RolloutEvent.NODES_DUAL if waits else RolloutEvent.NODES_SETTLED)
    return Plan(rollout.epoch, tuple(rollout_events), tuple(node_events), tuple(steps))


def old_switch_turns(
    rollout: Rollout,
    after: Mapping[str, NodeState],
    staged: Sequence[str],
    held: frozenset[str] = frozenset(),
) -> list[str]:
    free = rollout.max_parallel - sum(s in SWITCH_SLOT for s in after.values())
    turns: list[str] = []
    for name in rollout.order:
        if len(turns) >= free:
            break
        if after[name] is NodeState.PENDING and name in held:
            continue
        if after[name] is NodeState.PENDING or after[name] in PREPARING - {NodeState.STAGED}:
            break
        if name in staged:
            turns.append(name)
    return turns


# --- random rollouts ----------------------------------------------------------------------------


def rollout_of(size: int, **fields: object) -> Rollout:
    order = tuple(f"n{i:03d}" for i in range(size))
    given: dict[str, object] = {"change": Change.ENABLE_TLS, **fields}
    return Rollout(
        id="r1",
        scope=Scope(ScopeKind.CLUSTER),
        order=order,
        epoch=3,
        **given,  # type: ignore[arg-type]
    )


# Mostly the states a running rollout has (many pending or done, a few in flight).
node_states = st.sampled_from(
    [N.PENDING] * 4 + [N.DONE] * 4 + list(IN_FLIGHT_NODE_STATES) + list(TERMINAL_NODE_STATES)
)


def drawn(
    states: list[tuple[NodeState, bool]],
    change: Change,
    strategy: Strategy,
    freeze: FreezeMode,
    max_parallel: int,
    failure_budget: int,
    rollout_state: RolloutState,
) -> tuple[Rollout, tuple[NodeRecord, ...]]:
    """The rollout and its nodes' records that a property's drawn values describe."""
    rollout = rollout_of(
        len(states),
        change=change,
        strategy=strategy,
        freeze=freeze,
        max_parallel=max_parallel,
        failure_budget=failure_budget,
        state=rollout_state,
    )
    records = tuple(
        NodeRecord(name, state, scope_frozen=frozen)
        for name, (state, frozen) in zip(rollout.order, states, strict=True)
    )
    return rollout, records


@settings(max_examples=400, deadline=None)
@given(
    states=st.lists(st.tuples(node_states, st.booleans()), min_size=1, max_size=30),
    rollout_state=st.sampled_from(sorted(_LIVE_STATES, key=lambda s: s.value)),
    change=st.sampled_from(Change),
    strategy=st.sampled_from(Strategy),
    freeze=st.sampled_from(FreezeMode),
    max_parallel=st.integers(1, 4),
    failure_budget=st.integers(0, 3),
    prepare_ahead=st.integers(0, 3),
    held_every=st.integers(0, 4),
)
def test_the_census_pass_decides_as_the_pass_over_every_record_did(
    states: list[tuple[NodeState, bool]],
    rollout_state: RolloutState,
    change: Change,
    strategy: Strategy,
    freeze: FreezeMode,
    max_parallel: int,
    failure_budget: int,
    prepare_ahead: int,
    held_every: int,
) -> None:
    rollout, records = drawn(
        states, change, strategy, freeze, max_parallel, failure_budget, rollout_state
    )
    held = frozenset(rollout.order[::held_every]) if held_every else frozenset()
    expected = old_next_actions(rollout, records, held, prepare_ahead=prepare_ahead)
    counted = next_actions(rollout, records, held, prepare_ahead=prepare_ahead)
    kept = next_actions(
        rollout, records, held, prepare_ahead=prepare_ahead, census=Census.of(records)
    )
    assert counted == expected
    assert kept == expected
    # The records the engine saves: apply_plan's, of the nodes the plan moves, in its order.
    whole_rollout, whole = apply_plan(rollout, records, expected)
    after, moved = plan_moves(rollout, {r.name: r for r in records}.__getitem__, expected)
    assert after == whole_rollout
    by_name = {r.name: r for r in records}
    asked = [  # a scope FREEZE to send is recorded asked first (audit s33 L1)
        s.node
        for s in expected.steps
        if s.step is Step.FREEZE and not by_name[s.node].may_be_frozen
    ]
    assert [r.name for r in moved] == list(dict.fromkeys([*expected.nodes_with_events, *asked]))
    assert all(r.freeze_asked for r in moved if r.name in asked)
    assert all(whole[rollout.order.index(r.name)] == r for r in moved)


class Watched(Sequence[NodeRecord]):
    """Records that note which positions were read."""

    def __init__(self, records: Sequence[NodeRecord]) -> None:
        self.records = records
        self.read: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, i: int) -> NodeRecord: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[NodeRecord]: ...

    def __getitem__(self, i: int | slice) -> NodeRecord | Sequence[NodeRecord]:
        if isinstance(i, slice):
            self.read.update(range(len(self.records))[i])
            return self.records[i]
        self.read.add(i)
        return self.records[i]

    def __iter__(self) -> Iterator[NodeRecord]:
        self.read.update(range(len(self.records)))
        return iter(self.records)


def test_a_pass_with_the_census_reads_only_the_records_of_the_nodes_it_names() -> None:
    """500 nodes, 480 done, 10 in flight, 10 pending: the pass reads the in-flight nodes'
    records and the pending ones it starts, never a done node's (the old pass read every
    record about ten times)."""
    rollout = rollout_of(500, max_parallel=10, state=RolloutState.RUNNING)
    states = [N.DONE] * 480 + [N.SWITCHING] * 3 + [N.CONFIRMING] * 2 + [N.STAGED] * 5
    states += [N.PENDING] * 10
    records = [NodeRecord(name, s) for name, s in zip(rollout.order, states, strict=True)]
    watched = Watched(records)
    plan = next_actions(rollout, watched, prepare_ahead=2, census=Census.of(records))
    assert plan == old_next_actions(rollout, records, prepare_ahead=2)
    assert plan.nodes_with_step(Step.SWITCH) and plan.nodes_with_event(NodeEvent.START)
    assert watched.read and min(watched.read) >= 480, sorted(watched.read)


def test_a_census_that_does_not_fit_the_records_is_refused() -> None:
    rollout = rollout_of(3, state=RolloutState.RUNNING)
    records = [NodeRecord(n) for n in rollout.order]
    try:
        next_actions(rollout, records[:2], census=Census.of(records))
    except Exception as exc:
        assert "census" in str(exc)
    else:
        raise AssertionError("a census for 3 nodes with 2 records was used")


@settings(max_examples=200, deadline=None)
@given(
    moves=st.lists(
        st.tuples(st.integers(0, 19), node_states, st.booleans()), min_size=1, max_size=40
    )
)
def test_a_census_moved_record_by_record_is_the_one_a_fresh_count_gives(
    moves: list[tuple[int, NodeState, bool]],
) -> None:
    records = [NodeRecord(f"n{i:02d}") for i in range(20)]
    census = Census.of(records)
    for at, state, frozen in moves:
        new = NodeRecord(records[at].name, state, scope_frozen=frozen)
        census = census.moved(at, records[at], new)
        records[at] = new
        assert census == Census.of(records)


def test_the_store_moves_the_kept_rollout_s_census_with_each_saved_record(
    tmp_path: Path,
) -> None:
    """The active rollout's census is counted once (when the row is read) and then moved
    with each record the engine saves: a step's outcome costs no count over every node."""
    now = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    schema = SchemaStore(tmp_path / "leader.db")
    rollout = rollout_of(50)
    records = tuple(NodeRecord(n) for n in rollout.order)
    meta = RolloutMeta(created_at=now, started_by="admin", leader_node="n049")
    schema.create(rollout, records, meta, now)
    row = schema.get("r1")
    assert row is not None
    row = schema.save_states(row, rollout.with_event(RolloutEvent.START), (), now, "admin")
    assert row.census == Census.of(row.records)
    counted = 0
    real = Census.of

    def counting(records: Sequence[NodeRecord]) -> Census:
        nonlocal counted
        counted += 1
        return real(records)

    try:
        Census.of = counting  # type: ignore[method-assign]
        for i, event in enumerate([NodeEvent.START, NodeEvent.PREFLIGHT_PASSED] * 3):
            name = rollout.order[i // 2]
            new = row.node(name)[0].with_event(event)
            row = schema.save_states(row, row.rollout, [new], now, "engine", only=(name,))
            kept = schema.kept("r1")
            assert kept is row and "census" in row.__dict__
    finally:
        Census.of = real  # type: ignore[method-assign]
    assert counted == 0
    assert row.census == Census.of(row.records)
    assert row.census.at(N.STAGING) == (0, 1, 2)


@settings(max_examples=1000, deadline=None)
@given(
    states=st.lists(st.tuples(node_states, st.booleans()), min_size=1, max_size=30),
    change=st.sampled_from(Change),
    strategy=st.sampled_from(Strategy),
    freeze=st.sampled_from(FreezeMode),
    max_parallel=st.integers(1, 4),
    failure_budget=st.integers(0, 3),
    prepare_ahead=st.integers(0, 3),
)
def test_a_plan_that_moves_nodes_only_leaves_nothing_for_the_next_pass(
    states: list[tuple[NodeState, bool]],
    change: Change,
    strategy: Strategy,
    freeze: FreezeMode,
    max_parallel: int,
    failure_budget: int,
    prepare_ahead: int,
) -> None:
    """The engine does not wake its loop for a step's outcome whose write persisted the plan
    that follows (node moves only: ``Engine._plan_next``): the loop's pass would plan again
    from the records as that write left them. That pass must find nothing to persist and no
    step the plan did not begin. While the rollout runs (the engine wakes its loop for a
    draining one: a halt skips a node a change without a stage moved to staged only at the
    next pass)."""
    rollout, records = drawn(
        states, change, strategy, freeze, max_parallel, failure_budget, RolloutState.RUNNING
    )
    plan = next_actions(rollout, records, prepare_ahead=prepare_ahead)
    if plan.rollout_events or not plan.node_events:
        return  # the engine wakes its loop for these
    after_rollout, after = apply_plan(rollout, records, plan)
    again = next_actions(after_rollout, after, prepare_ahead=prepare_ahead)
    assert again.rollout_events == () and again.node_events == ()
    assert set(again.steps) <= set(plan.steps)
