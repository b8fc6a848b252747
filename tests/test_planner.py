"""The planner, driven like the engine drives it: scenario stories on a small cluster, the
initial plan of a scope, and a property test over random event sequences."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leader.planner import (
    PREPARING,
    SWITCH_SLOT,
    AlreadyUndone,
    AuthDecision,
    BlockedAtOnce,
    EmptyScope,
    InconsistentRecords,
    NodeEventAction,
    NodesOffline,
    NoneReachable,
    NothingToDo,
    PasswordInUse,
    Plan,
    PlanError,
    StepAction,
    StoreBehind,
    UnknownNodes,
    Unreachable,
    WrongSource,
    apply_plan,
    awaiting_verdict,
    blocked_at_once,
    confirm_success,
    decide_auth,
    finalize_scope,
    held_for_quiet,
    next_actions,
    order_nodes,
    password_in_use,
    plan_moves,
    plan_rollout,
    reached_nodes,
    report_stale_after,
    stale_reports,
    undo_target,
)
from leader.rollout_core import (
    ADMIN_ROLLOUT_EVENTS,
    CHANGES,
    DRAINING_ROLLOUT_STATES,
    FAILED_NODE_STATES,
    IN_FLIGHT_NODE_STATES,
    LEFT_OFFLINE,
    RESULT_NODE_EVENTS,
    STEP_FOR_STATE,
    TERMINAL_NODE_STATES,
    TERMINAL_ROLLOUT_STATES,
    Change,
    Client,
    FreezeMode,
    IllegalTransition,
    NodeEvent,
    NodeObservation,
    NodeRecord,
    NodeState,
    Rollout,
    RolloutEvent,
    RolloutState,
    Scope,
    Step,
    Strategy,
    already_done,
    left_as_is,
    serves_after,
    still_on_http,
)

R, RE, N, NE = RolloutState, RolloutEvent, NodeState, NodeEvent

SUCCESS = {
    N.PREFLIGHT: NE.PREFLIGHT_PASSED,
    N.STAGING: NE.STAGE_DONE,
    N.SWITCHING: NE.SWITCH_DONE,
    N.CONFIRMING: NE.CONFIRM_DONE,
}


def success(rollout: Rollout, state: NodeState) -> NodeEvent:
    """The event of the step of ``state`` succeeding (a transitional confirm: dual)."""
    return confirm_success(rollout) if state is N.CONFIRMING else SUCCESS[state]


@dataclass
class Engine:
    """A stand-in for the engine: holds the records, persists plans, feeds outcomes back."""

    rollout: Rollout
    nodes: tuple[NodeRecord, ...]
    plans: list[Plan] = field(default_factory=list)
    prepare_ahead: int = 0

    @classmethod
    def cluster(
        cls,
        names: str = "a b c",
        *,
        leader: str = "c",
        max_parallel: int = 1,
        failure_budget: int = 0,
        freeze: FreezeMode = FreezeMode.NODE,
        strategy: Strategy = Strategy.DIRECT,
        prepare_ahead: int = 0,
    ) -> Engine:
        """A started-from-scratch rollout over ``names`` (all online), epoch 3."""
        rollout, nodes = plan_rollout(
            rollout_id="r1",
            strategy=strategy,
            change=Change.ENABLE_TLS,
            scope=Scope.cluster(),
            enrolled=dict.fromkeys(names.split(), True),
            leader=leader,
            epoch=3,
            max_parallel=max_parallel,
            failure_budget=failure_budget,
            freeze=freeze,
        )
        return cls(rollout, nodes, prepare_ahead=prepare_ahead)

    def plan(self) -> Plan:
        """Ask the planner, persist the plan's events, return the plan."""
        plan = next_actions(self.rollout, self.nodes, prepare_ahead=self.prepare_ahead)
        self.rollout, self.nodes = apply_plan(self.rollout, self.nodes, plan)
        self.plans.append(plan)
        return plan

    def admin(self, event: RolloutEvent) -> Plan:
        self.rollout = self.rollout.with_event(event)
        return self.plan()

    def outcome(self, name: str, event: NodeEvent, reason: str | None = None) -> Plan:
        self.nodes = tuple(n.with_event(event, reason) if n.name == name else n for n in self.nodes)
        return self.plan()

    def succeed(self, name: str) -> Plan:
        """The step now running on ``name`` succeeds."""
        return self.outcome(name, success(self.rollout, self.node(name).state))

    def finish(self, name: str) -> Plan:
        """Every remaining step on ``name`` succeeds (it must not wait at a gate)."""
        plan = self.succeed(name)
        while self.node(name).state in STEP_FOR_STATE:
            plan = self.succeed(name)
        return plan

    def ack(self, plan: Plan) -> Plan:
        """The agents confirm the plan's FREEZE and UNFREEZE steps (as the engine records an
        answer: the node's freeze is no longer only asked)."""
        frozen = dict.fromkeys(plan.nodes_with_step(Step.FREEZE), True)
        frozen.update(dict.fromkeys(plan.nodes_with_step(Step.UNFREEZE), False))
        self.nodes = tuple(
            replace(n, scope_frozen=frozen[n.name], freeze_asked=False) if n.name in frozen else n
            for n in self.nodes
        )
        return self.plan()

    def status(self) -> RolloutState:
        return self.rollout.state

    def node(self, name: str) -> NodeRecord:
        return next(n for n in self.nodes if n.name == name)

    def states(self) -> dict[str, NodeState]:
        return {n.name: n.state for n in self.nodes}


def steps(plan: Plan) -> dict[str, Step]:
    return {a.node: a.step for a in plan.steps}


# --- stories ----------------------------------------------------------------------------------


def test_three_nodes_one_at_a_time() -> None:
    eng = Engine.cluster()
    assert eng.plan() == Plan(epoch=3)  # planned: nothing happens until start

    plan = eng.admin(RE.START)
    assert plan.node_events == (NodeEventAction("a", NE.START),)
    assert plan.steps == (StepAction("a", Step.PREFLIGHT, 3),)

    assert steps(eng.succeed("a")) == {"a": Step.STAGE}
    plan = eng.succeed("a")  # staged → the gate opens at once
    assert plan.nodes_with_event(NE.SWITCH) == ("a",)
    assert steps(plan) == {"a": Step.SWITCH}
    assert steps(eng.succeed("a")) == {"a": Step.CONFIRM}

    plan = eng.succeed("a")  # a is done: b starts
    assert eng.states() == {"a": N.DONE, "b": N.PREFLIGHT, "c": N.PENDING}
    assert plan.nodes_with_event(NE.START) == ("b",)

    eng.finish("b")
    assert eng.states() == {"a": N.DONE, "b": N.DONE, "c": N.PREFLIGHT}
    plan = eng.finish("c")
    assert plan.rollout_events == (RE.NODES_SETTLED,)
    assert eng.status() is R.COMPLETED
    assert eng.plan() == Plan(epoch=3)


def test_pipelining_prepares_the_next_node_while_one_switches() -> None:
    """prepare_ahead=1: b is preflighted and staged while a switches (nothing live changes on
    b), but b switches only after a, and never two at once with max_parallel 1. b starts once
    a is staged, in the plan that begins a's switch: at the rollout's start, b's preparation
    no longer shares the machine with a's, which the first switch waited for."""
    eng = Engine.cluster(prepare_ahead=1)
    plan = eng.admin(RE.START)
    assert plan.nodes_with_event(NE.START) == ("a",)
    plan = eng.succeed("a")  # a staging: b still waits
    assert plan.nodes_with_event(NE.START) == ()
    assert eng.states() == {"a": N.STAGING, "b": N.PENDING, "c": N.PENDING}
    plan = eng.succeed("a")  # a staged: a switches and b starts preparing, in one plan
    assert plan.nodes_with_event(NE.SWITCH) == ("a",)
    assert plan.nodes_with_event(NE.START) == ("b",)
    assert eng.states() == {"a": N.SWITCHING, "b": N.PREFLIGHT, "c": N.PENDING}
    eng.succeed("b")
    plan = eng.succeed("b")  # b staged while a switches: it waits; c waits for a slot
    assert plan.nodes_with_event(NE.SWITCH) == () and plan.nodes_with_event(NE.START) == ()
    assert eng.states() == {"a": N.SWITCHING, "b": N.STAGED, "c": N.PENDING}
    plan = eng.succeed("a")  # confirming: still a's switch slot
    assert plan.nodes_with_event(NE.SWITCH) == () and plan.nodes_with_event(NE.START) == ()
    plan = eng.succeed("a")  # a done: b switches and c starts preparing, in one plan
    assert plan.nodes_with_event(NE.SWITCH) == ("b",)
    assert plan.nodes_with_event(NE.START) == ("c",)
    assert eng.states() == {"a": N.DONE, "b": N.SWITCHING, "c": N.PREFLIGHT}
    eng.finish("c")  # c is ready before b is done: it waits
    assert eng.states() == {"a": N.DONE, "b": N.SWITCHING, "c": N.STAGED}
    eng.finish("b")
    eng.finish("c")
    assert eng.status() is R.COMPLETED


def test_pipelining_prepares_ahead_only_once_the_started_nodes_are_staged() -> None:
    """max_parallel 2, prepare_ahead 1: a and b start; c starts only when neither is still in
    its preflight or stage (b staged first waits for a, and so does c)."""
    eng = Engine.cluster("a b c d", leader="d", prepare_ahead=1, max_parallel=2)
    plan = eng.admin(RE.START)
    assert plan.nodes_with_event(NE.START) == ("a", "b")
    eng.succeed("b")
    plan = eng.succeed("b")  # b staged, a still in preflight: nothing more starts
    assert plan.nodes_with_event(NE.START) == ()
    eng.succeed("a")
    plan = eng.succeed("a")  # a staged: both switch, c starts
    assert plan.nodes_with_event(NE.SWITCH) == ("a", "b")
    assert plan.nodes_with_event(NE.START) == ("c",)


def test_pipelining_a_slow_preparation_holds_back_no_other_once_a_switch_began() -> None:
    """Review L4: past the rollout's start, a node still being prepared holds back no node
    prepared ahead. a is done while b is still in its preflight (a preparation slower than a
    switch and its confirm): c starts its preparation at once (max_parallel 1 + prepare_ahead
    1 = 2 in flight), so it is ready when b is done. Before, c waited for b's stage, the switch
    slot stood idle meanwhile, and the nodes were prepared one at a time. b still switches
    first (the order), and never two at once."""
    eng = Engine.cluster("a b c d", leader="d", prepare_ahead=1)
    eng.admin(RE.START)
    eng.succeed("a")
    plan = eng.succeed("a")  # a staged: a switches, b starts
    assert plan.nodes_with_event(NE.START) == ("b",)
    eng.succeed("a")  # a confirming, b still in preflight
    plan = eng.succeed("a")  # a done, b still in preflight: c starts
    assert plan.nodes_with_event(NE.START) == ("c",)
    assert eng.states() == {"a": N.DONE, "b": N.PREFLIGHT, "c": N.PREFLIGHT, "d": N.PENDING}
    eng.finish("c")  # c ready first: it waits for b, which is before it in the order
    assert eng.states()["c"] is N.STAGED
    eng.succeed("b")
    plan = eng.succeed("b")  # b staged: it switches; c waits its turn, d for a slot
    assert plan.nodes_with_event(NE.SWITCH) == ("b",)
    assert plan.nodes_with_event(NE.START) == ()
    plan = eng.finish("b")  # b done: c switches, d starts
    assert plan.nodes_with_event(NE.SWITCH) == ("c",)
    assert plan.nodes_with_event(NE.START) == ("d",)
    eng.finish("c")
    eng.finish("d")
    assert eng.status() is R.COMPLETED


def test_pipelining_keeps_the_seeds_safety_a_failed_switch_switches_nothing_else() -> None:
    """A switch that rolls back halts the rollout (budget 0): the node prepared meanwhile is
    skipped without switching, and no other node starts."""
    eng = Engine.cluster(prepare_ahead=1)
    eng.admin(RE.START)
    eng.succeed("a")
    eng.succeed("a")  # a switching, b started
    eng.finish("b")  # b staged
    plan = eng.outcome("a", NE.SWITCH_ROLLED_BACK, "server did not come back")
    assert plan.nodes_with_event(NE.SWITCH) == () and plan.nodes_with_event(NE.START) == ()
    assert eng.states() == {"a": N.ROLLED_BACK, "b": N.SKIPPED, "c": N.SKIPPED}
    assert eng.status() is R.HALTED


@pytest.mark.parametrize("freeze", [FreezeMode.NODE, FreezeMode.SCOPE])
def test_pipelining_a_pause_holds_the_node_prepared_ahead(freeze: FreezeMode) -> None:
    """Paused while a switches and b is being prepared: a finishes, b ends its stage and waits,
    staged (nothing live has changed on it), until the rollout is resumed; no scope freeze
    begins for it meanwhile. Before, b switched once a was done, paused or not: with
    pipelining, a pause let one more node change live."""
    eng = Engine.cluster(prepare_ahead=1, freeze=freeze)
    eng.admin(RE.START)
    eng.succeed("a")
    plan = eng.succeed("a")  # a staged: it switches (with a scope freeze: once all are frozen)
    if freeze is FreezeMode.SCOPE:
        plan = eng.ack(plan)
    assert plan.nodes_with_event(NE.SWITCH) == ("a",)
    eng.admin(RE.PAUSE)
    eng.finish("b")
    plan = eng.finish("a")
    assert eng.states() == {"a": N.DONE, "b": N.STAGED, "c": N.PENDING}
    assert plan.nodes_with_event(NE.SWITCH) == () and plan.nodes_with_event(NE.START) == ()
    if freeze is FreezeMode.SCOPE:  # the nodes stay frozen for the rollout; none newly
        assert plan.nodes_with_step(Step.FREEZE) == ()
    plan = eng.admin(RE.RESUME)
    assert plan.nodes_with_event(NE.SWITCH) == ("b",)
    assert plan.nodes_with_event(NE.START) == ("c",)
    eng.finish("b")
    plan = eng.finish("c")
    if freeze is FreezeMode.SCOPE:
        eng.ack(plan)  # the unfreeze at the end
    assert eng.status() is R.COMPLETED


def test_two_at_a_time() -> None:
    eng = Engine.cluster(max_parallel=2)
    plan = eng.admin(RE.START)
    assert plan.nodes_with_event(NE.START) == ("a", "b")
    assert eng.states() == {"a": N.PREFLIGHT, "b": N.PREFLIGHT, "c": N.PENDING}

    eng.finish("b")  # b is quick; c takes its place while a is still in preflight
    assert eng.states() == {"a": N.PREFLIGHT, "b": N.DONE, "c": N.PREFLIGHT}
    eng.finish("a")
    eng.finish("c")
    assert eng.status() is R.COMPLETED


def test_asking_again_repeats_steps_but_never_starts_twice() -> None:
    eng = Engine.cluster(max_parallel=2)
    eng.admin(RE.START)
    again = next_actions(eng.rollout, eng.nodes)
    assert again == Plan(
        3, steps=(StepAction("a", Step.PREFLIGHT, 3), StepAction("b", Step.PREFLIGHT, 3))
    )


def test_a_failure_halts_and_the_rest_is_skipped() -> None:
    eng = Engine.cluster()
    eng.admin(RE.START)
    plan = eng.outcome("a", NE.PREFLIGHT_FAILED, "port 8443 in use by nginx")
    assert plan.rollout_events == (RE.FAILURE_BUDGET_EXCEEDED, RE.NODES_SETTLED)
    assert plan.nodes_with_event(NE.SKIP) == ("b", "c")
    assert plan.steps == ()
    assert eng.status() is R.HALTED
    assert eng.nodes == (
        NodeRecord("a", N.FAILED, "port 8443 in use by nginx"),
        NodeRecord("b", N.SKIPPED, "rollout halted"),
        NodeRecord("c", N.SKIPPED, "rollout halted"),
    )


def test_a_halt_lets_the_switch_in_flight_finish() -> None:
    eng = Engine.cluster("a b c d", leader="d", max_parallel=2)
    eng.admin(RE.START)
    eng.succeed("a")
    eng.succeed("a")  # a is switching
    plan = eng.outcome("b", NE.PREFLIGHT_FAILED)
    assert plan.rollout_events == (RE.FAILURE_BUDGET_EXCEEDED,)
    assert eng.status() is R.HALTING
    assert eng.states() == {"a": N.SWITCHING, "b": N.FAILED, "c": N.SKIPPED, "d": N.SKIPPED}
    assert steps(plan) == {"a": Step.SWITCH}

    plan = eng.finish("a")
    assert plan.rollout_events == (RE.NODES_SETTLED,)
    assert eng.status() is R.HALTED
    assert eng.node("a").state is N.DONE


def test_a_node_still_preparing_when_halted_is_not_switched() -> None:
    eng = Engine.cluster(max_parallel=2)
    eng.admin(RE.START)
    eng.succeed("a")  # a is staging
    eng.outcome("b", NE.PREFLIGHT_FAILED, "clock off by 40 s")
    plan = eng.succeed("a")  # staging ends: the halted rollout skips a at the gate
    assert plan.nodes_with_event(NE.SKIP) == ("a",)
    assert eng.states() == {"a": N.SKIPPED, "b": N.FAILED, "c": N.SKIPPED}
    assert eng.status() is R.HALTED


def test_failure_budget_of_one_tolerates_one_failure() -> None:
    eng = Engine.cluster(failure_budget=1)
    eng.admin(RE.START)
    eng.succeed("a")
    eng.succeed("a")
    eng.succeed("a")
    plan = eng.outcome("a", NE.CONFIRM_ROLLED_BACK, "handshake: unknown CA")
    assert plan.nodes_with_event(NE.START) == ("b",)
    assert eng.status() is R.RUNNING
    eng.succeed("b")
    eng.succeed("b")
    plan = eng.outcome("b", NE.SWITCH_ROLLED_BACK, "server did not come back")
    assert plan.rollout_events == (RE.FAILURE_BUDGET_EXCEEDED, RE.NODES_SETTLED)
    assert eng.states() == {"a": N.ROLLED_BACK, "b": N.ROLLED_BACK, "c": N.SKIPPED}


def test_pause_lets_the_node_in_flight_finish_and_resume_goes_on() -> None:
    eng = Engine.cluster()
    eng.admin(RE.START)
    plan = eng.admin(RE.PAUSE)
    assert steps(plan) == {"a": Step.PREFLIGHT}
    eng.succeed("a")
    plan = eng.succeed("a")
    assert plan.nodes_with_event(NE.SWITCH) == ("a",)  # paused, but a is in flight
    plan = eng.finish("a")
    assert plan == Plan(epoch=3)  # nothing new starts
    assert eng.states() == {"a": N.DONE, "b": N.PENDING, "c": N.PENDING}

    plan = eng.admin(RE.RESUME)
    assert plan.nodes_with_event(NE.START) == ("b",)


def test_abort_mid_switch_finishes_that_node_then_stops() -> None:
    eng = Engine.cluster()
    eng.admin(RE.START)
    eng.succeed("a")
    eng.succeed("a")  # a is switching
    plan = eng.admin(RE.ABORT)
    assert eng.status() is R.ABORTING
    assert plan.nodes_with_event(NE.SKIP) == ("b", "c")
    assert steps(plan) == {"a": Step.SWITCH}
    plan = eng.finish("a")
    assert plan.rollout_events == (RE.NODES_SETTLED,)
    assert eng.status() is R.ABORTED
    assert eng.states() == {"a": N.DONE, "b": N.SKIPPED, "c": N.SKIPPED}
    assert eng.node("b").reason == "rollout aborted"


def test_abort_before_start_skips_everything() -> None:
    eng = Engine.cluster()
    plan = eng.admin(RE.ABORT)
    assert plan.rollout_events == (RE.NODES_SETTLED,)
    assert eng.status() is R.ABORTED
    assert set(eng.states().values()) == {N.SKIPPED}


def test_the_leader_node_goes_last() -> None:
    eng = Engine.cluster("alpha beta gamma", leader="alpha")
    assert eng.rollout.order == ("beta", "gamma", "alpha")
    eng.admin(RE.START)
    started = []
    while eng.status() is R.RUNNING:
        (name,) = [n.name for n in eng.nodes if n.state in STEP_FOR_STATE]
        started.append(name)
        eng.finish(name)
    assert started == ["beta", "gamma", "alpha"]
    assert eng.status() is R.COMPLETED


def test_scope_freeze_before_the_first_switch_and_unfreeze_after_the_last() -> None:
    eng = Engine.cluster(freeze=FreezeMode.SCOPE)
    eng.admin(RE.START)
    eng.succeed("a")
    plan = eng.succeed("a")  # a is staged: freeze everybody first, do not switch yet
    assert plan.node_events == ()
    assert plan.nodes_with_step(Step.FREEZE) == ("a", "b", "c")

    plan = eng.ack(replace(plan, steps=plan.steps[:2]))  # c has not confirmed yet
    assert plan.node_events == ()
    assert plan.nodes_with_step(Step.FREEZE) == ("c",)
    plan = eng.ack(plan)
    assert plan.nodes_with_event(NE.SWITCH) == ("a",)
    assert plan.nodes_with_step(Step.FREEZE) == ()

    eng.finish("a")
    eng.finish("b")  # frozen already: b switches without waiting
    plan = eng.finish("c")
    assert plan.rollout_events == ()  # not complete while nodes are frozen
    assert plan.nodes_with_step(Step.UNFREEZE) == ("a", "b", "c")
    plan = eng.ack(plan)
    assert plan.rollout_events == (RE.NODES_SETTLED,)
    assert eng.status() is R.COMPLETED
    assert not any(n.scope_frozen for n in eng.nodes)


def test_scope_freeze_leaves_out_failed_nodes() -> None:
    eng = Engine.cluster(freeze=FreezeMode.SCOPE, failure_budget=1)
    eng.admin(RE.START)
    eng.outcome("a", NE.PREFLIGHT_FAILED, "config dir not writable")
    eng.succeed("b")
    plan = eng.succeed("b")
    assert plan.nodes_with_step(Step.FREEZE) == ("b", "c")


def test_a_drain_skips_a_switching_node_whose_switch_was_never_sent_and_only_then() -> None:
    """``unsent`` (the engine held the node's Switch for a lapsed scope freeze and its agent
    has none: review 2 of session 32, F2): a halt or an abort skips the node, with a reason;
    while the rollout runs or pauses it stays ``switching``, and a node not named stays."""
    eng = Engine.cluster(freeze=FreezeMode.SCOPE, max_parallel=2)
    eng.admin(RE.START)
    for name in ("a", "b"):
        eng.succeed(name)
        eng.succeed(name)
    eng.ack(eng.plan())
    assert eng.states() == {"a": N.SWITCHING, "b": N.SWITCHING, "c": N.PENDING}
    for state in (R.RUNNING, R.PAUSED):
        rollout = replace(eng.rollout, state=state)
        assert not next_actions(rollout, eng.nodes, unsent={"a"}).node_events
    for state, why in ((R.ABORTING, "rollout aborted"), (R.HALTING, "rollout halted")):
        rollout = replace(eng.rollout, state=state)
        plan = next_actions(rollout, eng.nodes, unsent={"a"})
        assert plan.nodes_with_event(NE.SKIP_UNSENT) == ("a",)
        assert steps(plan) == {"b": Step.SWITCH}
        _, moved = plan_moves(rollout, eng.node, plan)
        skipped = next(r for r in moved if r.name == "a")
        assert skipped.state is N.SKIPPED
        assert skipped.reason == f"{why}; its switch was never sent"


def test_steps_carry_the_epoch() -> None:
    eng = Engine.cluster(max_parallel=3, freeze=FreezeMode.SCOPE)
    plan = eng.admin(RE.START)
    eng.succeed("a")
    plan = eng.succeed("a")
    assert plan.steps
    assert {a.epoch for a in plan.steps} == {3}
    assert plan.epoch == 3


def test_records_that_do_not_match_the_order_are_refused() -> None:
    eng = Engine.cluster()
    with pytest.raises(InconsistentRecords, match="r1"):
        next_actions(eng.rollout, eng.nodes[:2])
    with pytest.raises(InconsistentRecords):
        next_actions(eng.rollout, (*eng.nodes, eng.nodes[0]))


# --- the initial plan of a scope --------------------------------------------------------------

ENROLLED = {"node2": True, "node1": True, "leader": True, "node3": False}


def plan(scope: Scope, enrolled: dict[str, bool] = ENROLLED) -> tuple[str, ...]:
    rollout, nodes = plan_rollout(
        rollout_id="r9",
        change=Change.ROTATE_CERT,
        scope=scope,
        enrolled=enrolled,
        leader="leader",
        epoch=1,
    )
    assert rollout.state is R.PLANNED
    assert nodes == tuple(NodeRecord(name) for name in rollout.order)
    return rollout.order


def test_a_node_that_has_seen_a_higher_epoch_refuses_the_plan_whatever_the_records_say() -> None:
    """Review s70 drift M1: the epochs the agents report are part of what the plan reads. A
    node in scope that has seen an epoch above the rollout's refuses its commands, so the plan
    is refused naming it and the way out; one at the rollout's epoch, or out of scope, or left
    as is by the way back (offline), is no obstacle."""

    def planned(change: Change, seen: dict[str, int], scope: Scope | None = None) -> None:
        plan_rollout(
            rollout_id="r9",
            change=change,
            scope=scope or Scope.cluster(),
            enrolled=ENROLLED,
            leader="leader",
            epoch=3,
            epochs_seen=seen,
        )

    with pytest.raises(StoreBehind) as refused:
        planned(Change.ROTATE_CERT, {"node1": 3, "node2": 5}, Scope.of_nodes(["node1", "node2"]))
    assert refused.value.names == ("node2",)
    assert str(refused.value).startswith(
        "the leader's store is behind node2 (seen epoch 5; this rollout's would be 3)"
    )
    assert "run tlsroll epoch advance" in str(refused.value)
    planned(Change.ROTATE_CERT, {"node1": 3, "node3": 9}, Scope.of_nodes(["node1", "leader"]))
    planned(Change.DISABLE_TLS, {"node3": 9})  # node3 is offline: the way back leaves it


def test_local_scope_is_the_leader_node() -> None:
    assert plan(Scope.local()) == ("leader",)


def test_cluster_scope_is_every_enrolled_node_leader_last() -> None:
    assert plan(Scope.cluster(), {**ENROLLED, "node3": True}) == (
        "node1",
        "node2",
        "node3",
        "leader",
    )


def test_a_node_list_is_sorted_and_deduplicated() -> None:
    assert plan(Scope.of_nodes(["leader", "node2", "node1", "node2"])) == (
        "node1",
        "node2",
        "leader",
    )


def test_unknown_names_are_named() -> None:
    with pytest.raises(UnknownNodes, match="not enrolled: ghost, nope") as caught:
        plan(Scope.of_nodes(["node1", "nope", "ghost"]))
    assert caught.value.names == ("ghost", "nope")


def test_a_local_scope_whose_leader_node_is_not_enrolled_says_what_local_is() -> None:
    """Review s69 revlocal L1: `--scope local` names no node, yet its refusal was "not
    enrolled: leader (check the names …)", as if the admin had typed that name. It says that
    scope local is the leader node (node_name in leader.toml) and how to enrol it or name
    nodes instead."""
    with pytest.raises(UnknownNodes) as caught:
        plan(Scope.local(), {"node1": True, "node2": True})
    said = str(caught.value)
    assert said.startswith("scope local is the leader node, leader (node_name in leader.toml)")
    assert "tlsroll token create --node leader --address IP" in said and "--nodes" in said
    assert caught.value.names == ("leader",)
    # A name the admin gave is still refused as before.
    with pytest.raises(UnknownNodes, match=r"^not enrolled: leader \(check"):
        plan(Scope.of_nodes(["leader"]), {"node1": True})


def test_offline_nodes_in_scope_are_named() -> None:
    with pytest.raises(NodesOffline, match="offline: node3") as caught:
        plan(Scope.cluster())
    assert caught.value.names == ("node3",)
    assert plan(Scope.of_nodes(["node1"])) == ("node1",)  # node3 is not in this scope


def test_a_finalize_leaves_out_only_the_nodes_whose_agents_are_cut_off() -> None:
    """Review s48 (a machine lost while phase 1 awaits finalize): a finalize leaves out the
    nodes it is given as cut off (``left_out``: skipped, with the reason, never asked); any
    other node offline refuses it, naming the way to cut a lost machine off. Left out every
    node, it completes at once (phase 1 then ends)."""
    from leader.rollout_core import LEFT_OUT, left_out_reason

    def finalize(
        left: dict[str, str], online: dict[str, bool]
    ) -> tuple[Rollout, tuple[NodeRecord, ...]]:
        return plan_rollout(
            rollout_id="f1", change=Change.FINALIZE, scope=Scope.of_nodes(["a", "b"]),
            enrolled=online, leader="a", epoch=2, left_out=left,
        )  # fmt: skip

    with pytest.raises(NodesOffline) as held:
        finalize({}, {"a": True, "b": False})
    said = str(held.value)
    assert said.startswith("offline: b (bring the agent up, or if the machine is lost or stolen:")
    assert "then finalize leaves it out" in said and "`tlsroll nodes remove b`" in said
    assert "`tlsroll ca revoke SERIAL`" in said  # (serials not known here)
    named = NodesOffline(["b"], Change.FINALIZE, {"b": ["1a", "2b"]})
    assert "`tlsroll ca revoke 1a` and `tlsroll ca revoke 2b`, then finalize" in str(named)
    # another change's refusal: leave it out of the scope
    assert str(NodesOffline(["b"])) == "offline: b (bring the agent up, or leave it out: --nodes)"
    # ... but one whose agent is cut off never comes up: its removal is the way on (s50)
    with pytest.raises(NodesOffline) as lost:
        plan_rollout(
            rollout_id="e1", change=Change.ENABLE_TLS, scope=Scope.of_nodes(["a", "b", "c"]),
            enrolled={"a": True, "b": False, "c": False}, leader="a", epoch=2,
            cut_off=frozenset({"b"}),
        )  # fmt: skip
    assert str(lost.value) == (
        "offline: c (bring the agent up); agent cut off (certificate revoked): b: `tlsroll "
        "nodes remove b`; or leave them out: --nodes"
    )
    assert lost.value.names == ("b", "c")

    rollout, records = finalize({"b": left_out_reason("b")}, {"a": True, "b": False})
    by = {r.name: r for r in records}
    assert by["a"].state is NodeState.PENDING
    assert by["b"].state is NodeState.SKIPPED and by["b"].reason.startswith(f"{LEFT_OUT}: ")
    assert "`tlsroll nodes remove b`" in by["b"].reason

    every = {n: left_out_reason(n) for n in ("a", "b")}
    rollout, records = finalize(every, {"a": False, "b": False})
    assert all(r.state is NodeState.SKIPPED for r in records)
    started = rollout.with_event(RolloutEvent.START)
    assert next_actions(started, records).rollout_events == (RolloutEvent.NODES_SETTLED,)


def test_a_running_finalize_leaves_out_a_pending_node_cut_off_meanwhile() -> None:
    """Review s48rev5 M3: a node revoked while a finalize ran (``--when-quiet`` holding it)
    stayed pending for good. ``next_actions`` skips a pending node given as cut off with the
    left-out reason, as a finalize started after the revocation does; the others go on, and
    a node in flight is not touched. Another change leaves no node out."""
    from leader.rollout_core import left_out_reason

    rollout, records = plan_rollout(
        rollout_id="f1", change=Change.FINALIZE, scope=Scope.of_nodes(["a", "b", "c"]),
        enrolled={"a": True, "b": True, "c": True}, leader="a", epoch=2,
    )  # fmt: skip
    running = rollout.with_event(RolloutEvent.START)
    held = frozenset({"b", "c"})  # --when-quiet: not quiet yet
    plan_ = next_actions(running, records, held, cut_off={"b"})
    assert [(a.node, a.event, a.reason) for a in plan_.node_events] == [
        ("b", NodeEvent.SKIP, left_out_reason("b")),
        ("a", NodeEvent.START, None),
    ]
    after, moved = apply_plan(running, records, plan_)
    assert {r.name: r.state for r in moved}["b"] is NodeState.SKIPPED
    # Again (nothing pending is cut off any more): nothing more of b.
    again = next_actions(after, moved, held, cut_off={"b"})
    assert "b" not in again.nodes_with_events
    # (A node switching needs attention: ``test_a_cut_off_node_mid_switch_needs_attention``.)
    # A paused finalize leaves its cut-off node out too.
    paused = running.with_event(RolloutEvent.PAUSE)
    skipped = next_actions(paused, records, held, cut_off={"b"}).nodes_with_event(NodeEvent.SKIP)
    assert skipped == ("b",)
    # Left out the last pending one, with the others done: the finalize completes.
    rest = tuple(r if r.name == "b" else replace(r, state=NodeState.DONE) for r in records)
    last = next_actions(running, rest, cut_off={"b"})
    assert last.rollout_events == (RolloutEvent.NODES_SETTLED,)
    # (Any other change: ``test_a_cut_off_node_is_never_switched_by_any_change``.)


def test_a_running_finalize_leaves_out_a_cut_off_node_prepared_ahead() -> None:
    """Review rev49fin: only a pending cut-off node was left out; one in preflight, staging or
    staged (``prepare_ahead``: the next node is usually staged) went on to its switch against
    the revoked agent. Every node not yet at its switch (the set an abort skips) is skipped
    with the left-out reason, and no switch or step is planned for it."""
    from leader.rollout_core import left_out_reason

    rollout, records = plan_rollout(
        rollout_id="f1", change=Change.FINALIZE, scope=Scope.of_nodes(["a", "b", "c"]),
        enrolled={"a": True, "b": True, "c": True}, leader="a", epoch=2,
    )  # fmt: skip
    running = rollout.with_event(RolloutEvent.START)
    for state in (NodeState.PREFLIGHT, NodeState.STAGING, NodeState.STAGED):
        nodes = tuple(
            replace(r, state=NodeState.DONE) if r.name == "a"
            else replace(r, state=state) if r.name == "b" else r
            for r in records
        )  # fmt: skip
        for ahead in (0, 1):
            plan_ = next_actions(running, nodes, prepare_ahead=ahead, cut_off={"b"})
            b_events = [(a.event, a.reason) for a in plan_.node_events if a.node == "b"]
            assert b_events == [(NodeEvent.SKIP, left_out_reason("b"))], (state, ahead)
            assert "b" not in {s.node for s in plan_.steps}, (state, ahead)
            _after, moved = apply_plan(running, nodes, plan_)
            assert {r.name: r.state for r in moved}["b"] is NodeState.SKIPPED


def test_a_cut_off_node_whose_scope_freeze_lapsed_holds_no_switch_of_a_finalize() -> None:
    """Review rev49late: under ``--freeze scope`` a finalize's nodes are all frozen before the
    first switch; a lost machine's freeze cannot be renewed, so it lapses, and a lapsed node
    held every other staged node's switch: the finalize stood still for good, and `nodes
    remove` stayed refused. A cut-off node's lapse holds nothing; the others switch."""
    rollout, records = plan_rollout(
        rollout_id="f1", change=Change.FINALIZE, scope=Scope.of_nodes(["a", "b", "c"]),
        enrolled={"a": True, "b": True, "c": True}, leader="a", epoch=2,
        freeze=FreezeMode.SCOPE,
    )  # fmt: skip
    running = rollout.with_event(RolloutEvent.START)
    nodes = tuple(replace(r, state=NodeState.STAGED, scope_frozen=True) for r in records)
    first = next_actions(running, nodes, prepare_ahead=1, cut_off={"b"}, lapsed={"b"})
    after, moved = apply_plan(running, nodes, first)
    assert {r.name: r.state for r in moved}["b"] is NodeState.SKIPPED
    again = next_actions(after, moved, prepare_ahead=1, cut_off={"b"}, lapsed={"b"})
    switched = [
        a.node for a in (*first.node_events, *again.node_events) if a.event is NodeEvent.SWITCH
    ]
    assert switched and "b" not in switched, (first, again)
    # A lapsed node that is not cut off still holds them (review 2 of session 32, F1).
    held = next_actions(running, nodes, prepare_ahead=1, lapsed={"b"})
    assert not [a for a in held.node_events if a.event is NodeEvent.SWITCH], held


def test_the_way_back_leaves_a_cut_off_node_as_is_saying_to_remove_it() -> None:
    """s48lost: the way back left a node whose agent is cut off (revoked: a machine lost) as
    is saying "run tlsroll rollout rollback again once its agent is back"; it never comes
    back. Its reason, what to do (``left_way_on``, phase 1's note) and a refusal with no
    node to take back say `tlsroll nodes remove` instead; a node merely offline as before."""
    from leader.rollout_core import LEFT_AS_IS, left_cut_off, left_way_on, taken_back_note

    def back(online: dict[str, bool]) -> tuple[NodeRecord, ...]:
        return plan_rollout(
            rollout_id="d1", change=Change.DISABLE_TLS, scope=Scope.of_nodes(list(online)),
            enrolled=online, leader="a", epoch=2, cut_off={"b"},
        )[1]  # fmt: skip

    by = {r.name: r for r in back({"a": True, "b": False, "c": False})}
    assert by["a"].state is NodeState.PENDING
    assert (by["b"].state, by["b"].reason) == (NodeState.SKIPPED, left_cut_off("b"))
    assert by["c"].reason == LEFT_OFFLINE
    said = by["b"].reason
    assert left_as_is(said) and f"{LEFT_AS_IS}: " in said
    assert "never comes back" in said and "`tlsroll nodes remove b`" in said
    assert "once its agent is back" not in said
    way_on = left_way_on(said)
    assert way_on.startswith("its agent's certificate is revoked") and "nodes remove b" in way_on
    note = taken_back_note("d1", {"b": said, "c": LEFT_OFFLINE})
    assert f"b left dual: {way_on}" in note and "c left dual: run tlsroll rollout" in note
    with pytest.raises(NoneReachable) as none:
        back({"b": False})
    assert "b (cut off)" in str(none.value) and "nodes remove b" in str(none.value)
    assert "once it is back" not in str(none.value)


def test_an_empty_cluster_cannot_be_planned() -> None:
    with pytest.raises(EmptyScope):
        plan(Scope.cluster(), {})
    with pytest.raises(UnknownNodes, match="leader"):
        plan(Scope.local(), {})


def test_order_nodes() -> None:
    assert order_nodes(["b", "leader", "a"], "leader") == ("a", "b", "leader")
    assert order_nodes(["b", "a"], "elsewhere") == ("a", "b")


# --- property: random event sequences ---------------------------------------------------------


@dataclass(frozen=True)
class Admin:
    event: RolloutEvent


@dataclass(frozen=True)
class Outcome:
    node: int
    event: NodeEvent


@dataclass(frozen=True)
class Progress:
    """The step running on some working node ends: success, or its failure outcome."""

    node: int
    ok: bool


@dataclass(frozen=True)
class Ask:
    """The engine asks the planner and persists the plan."""


@dataclass(frozen=True)
class Ack:
    """The agents confirm the pending FREEZE/UNFREEZE steps."""


Op = Admin | Outcome | Progress | Ask | Ack

FAILURE = {
    N.PREFLIGHT: NE.PREFLIGHT_FAILED,
    N.STAGING: NE.STAGE_FAILED,
    N.SWITCHING: NE.SWITCH_ROLLED_BACK,
    N.CONFIRMING: NE.CONFIRM_ROLLED_BACK,
}

progress = st.builds(Progress, st.integers(0, 4), st.integers(0, 4).map(bool))
ops = st.one_of(
    st.builds(Admin, st.sampled_from(sorted(ADMIN_ROLLOUT_EVENTS))),
    st.builds(Outcome, st.integers(0, 4), st.sampled_from(sorted(RESULT_NODE_EVENTS))),
    # Outcomes that fit the node's state, mostly successes, drawn more often so runs get far.
    progress,
    progress,
    progress,
    st.just(Ask()),
    st.just(Ask()),
    st.just(Ack()),
)


def check_plan(rollout: Rollout, plan: Plan, ahead: int = 0) -> None:
    """What a plan may contain, given the rollout state it was made for (``ahead``: the
    leader's ``prepare_ahead``)."""
    if rollout.state in TERMINAL_ROLLOUT_STATES or rollout.state in (
        R.PLANNED,
        R.AWAITING_FINALIZE,
    ):
        assert plan == Plan(epoch=rollout.epoch)
    if rollout.state is not R.RUNNING:
        assert not plan.nodes_with_event(NE.START)
    if ahead and rollout.state is R.PAUSED:  # a node prepared ahead waits staged
        assert not plan.nodes_with_event(NE.SWITCH)
        assert not [a for a in plan.steps if a.step is Step.FREEZE]
    if (
        rollout.state in DRAINING_ROLLOUT_STATES
        or RE.FAILURE_BUDGET_EXCEEDED in plan.rollout_events
    ):
        assert not plan.nodes_with_event(NE.SWITCH)
    if {RE.NODES_SETTLED, RE.NODES_DUAL} & set(plan.rollout_events):
        assert plan.steps == ()  # nothing may be left to do, not even unfreeze
    if RE.NODES_DUAL in plan.rollout_events:
        assert rollout.strategy is Strategy.TRANSITIONAL
    assert all(a.epoch == rollout.epoch for a in plan.steps)


def check_records(rollout: Rollout, nodes: tuple[NodeRecord, ...], ahead: int = 0) -> None:
    """What must hold of the records at every moment."""
    states = [n.state for n in nodes]
    failures = sum(s in FAILED_NODE_STATES for s in states)
    assert sum(s in IN_FLIGHT_NODE_STATES for s in states) <= rollout.max_parallel + ahead
    assert sum(s in SWITCH_SLOT for s in states) <= rollout.max_parallel
    if ahead:  # a node switches only once every node before it in order has begun
        for i, n in enumerate(nodes):
            if n.state in SWITCH_SLOT:
                before = {m.state for m in nodes[:i]}
                assert not before & (PREPARING | {N.PENDING}), (n.name, states)
    if rollout.state in TERMINAL_ROLLOUT_STATES:
        assert all(s in TERMINAL_NODE_STATES for s in states)
        assert not any(n.scope_frozen for n in nodes)
    if rollout.state is R.COMPLETED:
        assert failures <= rollout.failure_budget
        assert N.SKIPPED not in states
    if rollout.state in (R.HALTING, R.HALTED):
        assert failures > rollout.failure_budget
    if rollout.state in (R.PLANNED, R.RUNNING, R.PAUSED):
        assert N.SKIPPED not in states
    if rollout.state is R.AWAITING_FINALIZE:  # waits holding nothing: settled, unfrozen
        assert all(s in TERMINAL_NODE_STATES for s in states)
        assert not any(n.scope_frozen for n in nodes)
        assert N.DUAL in states and N.SKIPPED not in states
        assert failures <= rollout.failure_budget
    if rollout.strategy is Strategy.DIRECT:
        assert N.DUAL not in states  # only a transitional phase 1 leaves a node dual
    else:
        assert N.DONE not in states  # ... and it never leaves one https-only
    if rollout.freeze is FreezeMode.NODE:
        assert not any(n.scope_frozen for n in nodes)
    elif any(s in (N.SWITCHING, N.CONFIRMING) for s in states):
        assert all(n.scope_frozen for n in nodes if n.state not in (N.FAILED, N.SKIPPED))


def run(eng: Engine, op: Op) -> None:
    """One step of the engine; an illegal event must raise and change nothing."""
    before = (eng.rollout, eng.nodes)
    if isinstance(op, Admin | Outcome):
        try:
            if isinstance(op, Admin):
                eng.rollout = eng.rollout.with_event(op.event)
            else:
                i = op.node % len(eng.nodes)
                event = op.event
                if event in (NE.CONFIRM_DONE, NE.CONFIRM_DUAL):  # the strategy picks which
                    event = confirm_success(eng.rollout)
                new = eng.nodes[i].with_event(event)
                eng.nodes = (*eng.nodes[:i], new, *eng.nodes[i + 1 :])
        except IllegalTransition:
            assert (eng.rollout, eng.nodes) == before
    elif isinstance(op, Progress):
        working = [n for n in eng.nodes if n.state in STEP_FOR_STATE]
        if working:
            node = working[op.node % len(working)]
            event = success(eng.rollout, node.state) if op.ok else FAILURE[node.state]
            i = eng.nodes.index(node)
            new = node.with_event(event, None if op.ok else "it broke")
            eng.nodes = (*eng.nodes[:i], new, *eng.nodes[i + 1 :])
    else:  # the planner itself must never make an illegal move
        check_plan(
            eng.rollout,
            next_actions(eng.rollout, eng.nodes, prepare_ahead=eng.prepare_ahead),
            eng.prepare_ahead,
        )
        plan = eng.plan()
        check_records(eng.rollout, eng.nodes, eng.prepare_ahead)
        if isinstance(op, Ack):
            eng.ack(plan)
    check_records(eng.rollout, eng.nodes, eng.prepare_ahead)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 5),
    max_parallel=st.integers(1, 3),
    failure_budget=st.integers(0, 2),
    freeze=st.sampled_from(FreezeMode),
    strategy=st.sampled_from(Strategy),
    script=st.lists(ops, max_size=60),
    prepare_ahead=st.integers(0, 2),
)
def test_random_events_keep_the_rollout_sound_and_it_always_ends(
    size: int,
    max_parallel: int,
    failure_budget: int,
    freeze: FreezeMode,
    strategy: Strategy,
    script: list[Op],
    prepare_ahead: int,
) -> None:
    eng = Engine.cluster(
        " ".join(f"n{i}" for i in range(size)),
        leader="n0",
        max_parallel=max_parallel,
        failure_budget=failure_budget,
        freeze=freeze,
        strategy=strategy,
        prepare_ahead=prepare_ahead,
    )
    for op in script:
        run(eng, op)

    # Whatever happened, an engine that keeps going reaches a terminal state.
    if eng.rollout.state is R.PLANNED:
        run(eng, Admin(RE.START))
    if eng.rollout.state is R.PAUSED:
        run(eng, Admin(RE.RESUME))
    ends = TERMINAL_ROLLOUT_STATES | {R.AWAITING_FINALIZE}
    for _ in range(10 * size + 10):
        if eng.rollout.state in ends:
            break
        working = [n for n in eng.nodes if n.state in STEP_FOR_STATE]
        if working:
            event = success(eng.rollout, working[0].state)
            run(eng, Outcome(eng.nodes.index(working[0]), event))
        else:
            run(eng, Ack())
    assert eng.rollout.state in ends
    # A transitional rollout waits for finalize exactly when it ended well with a node dual.
    waits = eng.rollout.state is R.AWAITING_FINALIZE
    assert not waits or strategy is Strategy.TRANSITIONAL
    assert eng.plan() == Plan(epoch=3)


# --- decisions the engine used to take: which password, which nodes to undo, which step ----


def test_every_change_has_a_row() -> None:
    assert set(CHANGES) == set(Change)


@pytest.mark.parametrize(
    ("change", "given", "latest", "expected"),
    [
        (Change.ENABLE_TLS, True, 0, AuthDecision(add_new=True, version=0)),
        (Change.ENABLE_TLS, True, 4, AuthDecision(add_new=True, version=0)),
        (Change.CHANGE_PASSWORD, False, 3, AuthDecision(add_new=False, version=3)),
        (Change.DISABLE_TLS, False, 3, AuthDecision(add_new=False, version=0)),
    ],
)
def test_decide_auth(change: Change, given: bool, latest: int, expected: AuthDecision) -> None:
    assert decide_auth(change, given, latest) == expected


@pytest.mark.parametrize(
    ("change", "given", "latest", "words"),
    [
        (Change.ENABLE_TLS, False, 0, "sets the auth password"),
        (Change.CHANGE_PASSWORD, False, 0, "no password staged"),
        (Change.CHANGE_PASSWORD, True, 2, "brings no password of its own"),
        (Change.DISABLE_TLS, True, 0, "brings no password of its own"),
        (Change.ROTATE_CERT, True, 0, "brings no password of its own"),
    ],
)
def test_decide_auth_refuses(change: Change, given: bool, latest: int, words: str) -> None:
    with pytest.raises(PlanError, match=words):
        decide_auth(change, given, latest)


def _stored(
    rid: str, change: Change, states: dict[str, NodeState]
) -> tuple[Rollout, tuple[NodeRecord, ...]]:
    rollout = Rollout(rid, change, Scope.cluster(), tuple(states), epoch=1)
    return rollout, tuple(NodeRecord(n, s) for n, s in states.items())


def test_undo_target_takes_the_newest_enable_tls_and_its_done_nodes() -> None:
    newest_first = [
        _stored("r3", Change.CHANGE_PASSWORD, {"a": NodeState.DONE}),
        _stored(
            "r2",
            Change.ENABLE_TLS,
            {"a": NodeState.DONE, "b": NodeState.ROLLED_BACK, "c": NodeState.DONE},
        ),
        _stored("r1", Change.ENABLE_TLS, {"d": NodeState.DONE}),
    ]
    target, nodes = undo_target(newest_first, None, {})
    assert (target.id, nodes) == ("r2", ("a", "c"))
    target, nodes = undo_target(newest_first, "r1", {})
    assert (target.id, nodes) == ("r1", ("d",))


def test_undo_target_unnamed_passes_over_a_newer_rollout_that_switched_no_node() -> None:
    """Brief s67 engine2: the newest enable-tls rollout switched no node (its node failed its
    preflight) and refused the whole way back, "switched no node", with r1's node on https."""
    newest_first = [
        _stored("r2", Change.ENABLE_TLS, {"b": NodeState.FAILED}),
        _stored("r1", Change.ENABLE_TLS, {"a": NodeState.DONE}),
    ]
    assert undo_target(newest_first, None, {}) == (newest_first[1][0], ("a",))
    with pytest.raises(PlanError, match="rollout r2 switched no node"):
        undo_target(newest_first, "r2", {})  # (named: that one's nodes only)
    with pytest.raises(PlanError, match="rollout r2 switched no node"):
        undo_target(newest_first[:1], None, {})


@pytest.mark.parametrize(
    ("rollout_id", "words"),
    [
        ("r3", "rollout r3 is a change-password rollout: only an enable-tls rollout"),
        ("nope", "no rollout 'nope'"),  # UnknownRollout: NOT_FOUND (review s47rtin L6)
        ("r4", "switched no node"),
    ],
)
def test_undo_target_refuses(rollout_id: str, words: str) -> None:
    stored = [
        _stored("r4", Change.ENABLE_TLS, {"a": NodeState.ROLLED_BACK}),
        _stored("r3", Change.CHANGE_PASSWORD, {"a": NodeState.DONE}),
    ]
    with pytest.raises(PlanError, match=words):
        undo_target(stored, rollout_id, {})
    with pytest.raises(PlanError, match="no enable-tls rollout to take back"):
        undo_target(stored[1:], None, {})


def test_undo_target_takes_a_rollout_back_once() -> None:
    """A disable-tls rollout that took ``r1`` back, in any state, is named; ``r2`` is free."""
    r1 = _stored("r1", Change.ENABLE_TLS, {"a": NodeState.DONE})
    r2 = _stored("r2", Change.ENABLE_TLS, {"b": NodeState.DONE})
    for state in RolloutState:
        undo = _stored("r3", Change.DISABLE_TLS, {"a": NodeState.PENDING})
        undo = (replace(undo[0], state=state), undo[1])
        stored = [undo, r2, r1]
        with pytest.raises(
            AlreadyUndone, match=f"rollout r1 was already taken back by rollout r3 [(]{state}[)]"
        ) as refused:
            undo_target(stored, "r1", {"r3": "r1"})
        assert refused.value.by == "r3"
        assert undo_target(stored, None, {"r3": "r1"})[0].id == "r2"
        assert undo_target(stored, "r1", {"r3": ""})[0].id == "r1"  # undoes something else
    undo_r2 = _stored("r3", Change.DISABLE_TLS, {"b": NodeState.DONE})
    with pytest.raises(AlreadyUndone, match="by rollout r3"):  # the newest one was taken back
        undo_target([undo_r2, r2, r1], None, {"r3": "r2"})


@pytest.mark.parametrize("change", [Change.CHANGE_PASSWORD, Change.DISABLE_TLS])
def test_a_change_without_staging_skips_the_stage_step(change: Change) -> None:
    rollout = Rollout("r", change, Scope.cluster(), ("a",), 1, state=RolloutState.RUNNING)
    plan = next_actions(rollout, [NodeRecord("a", NodeState.STAGING)])
    assert plan.nodes_with_event(NodeEvent.STAGE_SKIPPED) == ("a",)
    assert plan.nodes_with_step(Step.STAGE) == ()
    assert plan.nodes_with_event(NodeEvent.SWITCH) == ("a",)  # the same plan moves it on


def test_enable_tls_runs_the_stage_step() -> None:
    rollout = Rollout(
        "r", Change.ENABLE_TLS, Scope.cluster(), ("a",), 1, state=RolloutState.RUNNING
    )
    plan = next_actions(rollout, [NodeRecord("a", NodeState.STAGING)])
    assert plan.nodes_with_event(NodeEvent.STAGE_SKIPPED) == ()
    assert plan.nodes_with_step(Step.STAGE) == ("a",)


# --- issue 16: abort at once, plans from what nodes run ----------------------------------------


def test_an_abort_skips_nodes_still_preflighting_or_staging_at_once() -> None:
    """Issue 16 #3: an agent that does not answer its preflight must not keep the rollout in
    `aborting`: a node whose live config nothing touched yet is skipped at once."""
    eng = Engine.cluster(max_parallel=2)
    eng.admin(RE.START)  # a and b in preflight
    eng.succeed("a")  # a is staging; b's agent never answers
    plan = eng.admin(RE.ABORT)
    assert set(plan.nodes_with_event(NE.SKIP)) == {"a", "b", "c"}
    assert eng.states() == {"a": N.SKIPPED, "b": N.SKIPPED, "c": N.SKIPPED}
    assert eng.status() is R.ABORTED
    assert not plan.steps  # nothing is asked of any agent any more


def test_a_halt_still_lets_a_preflight_finish() -> None:
    eng = Engine.cluster(max_parallel=2)
    eng.admin(RE.START)
    eng.outcome("b", NE.PREFLIGHT_FAILED, "port 8443 taken")
    assert eng.node("a").state is N.PREFLIGHT  # halting: a's preflight runs to its end
    assert eng.status() is R.HALTING


def seen(*schemes: str, from_ca: bool = True, digest: str = "") -> NodeObservation:
    return NodeObservation(True, "", tuple(schemes), from_ca, digest)


def test_nodes_already_in_the_wanted_state_start_skipped_with_the_reason() -> None:
    rollout, nodes = plan_rollout(
        rollout_id="r2",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled=dict.fromkeys(["a", "b", "c"], True),
        leader="c",
        epoch=4,
        observed={"a": seen("http"), "b": seen("https", from_ca=False), "c": seen("https")},
    )
    states = {n.name: (n.state, n.reason) for n in nodes}
    assert states["a"] == (N.PENDING, "")
    assert states["b"] == (N.PENDING, "")  # https with a certificate of another CA: switched
    assert states["c"][0] is N.SKIPPED and states["c"][1].startswith("already done")
    plan = next_actions(rollout.with_event(RE.START), nodes)
    assert plan.nodes_with_event(NE.START) == ("a",)


def test_a_node_skipped_as_done_that_serves_a_revoked_certificate_is_told_to_rotate() -> None:
    """Review s66: a node on https whose certificate the admin revoked (the plan marks it from
    the store: ``NodeObservation.cert_revoked``) is as done for enable-tls, but its skip says
    to replace the certificate, with the rotate-cert for it; and where every node is done, the
    refusal names it with that command, not "nothing to do" alone."""
    revoked = replace(seen("https"), cert_revoked=True)
    _, nodes = plan_rollout(
        rollout_id="r2",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled=dict.fromkeys(["a", "b", "c"], True),
        leader="c",
        epoch=4,
        observed={"a": seen("http"), "b": revoked, "c": seen("https")},
    )
    states = {n.name: (n.state, n.reason) for n in nodes}
    assert states["a"] == (N.PENDING, "")
    assert states["b"][0] is N.SKIPPED
    assert states["b"][1] == (
        "already done: on https with a certificate of this CA; the certificate served is "
        "revoked (tlsroll ca revoke), and clients, which read no revocation list, take it until "
        "its end: replace it now: tlsroll rollout start --change rotate-cert --nodes b"
    )
    assert states["c"] == (N.SKIPPED, "already done: on https with a certificate of this CA")
    with pytest.raises(NothingToDo) as refused:
        plan_rollout(
            rollout_id="r3",
            change=Change.ENABLE_TLS,
            scope=Scope.cluster(),
            enrolled=dict.fromkeys(["b", "c", "d"], True),
            leader="c",
            epoch=4,
            observed={"b": revoked, "c": seen("https"), "d": revoked},
        )
    assert str(refused.value) == (
        "nothing to do: every node in scope (b, c, d) already runs what enable-tls wants; b, d: "
        "the certificate served is revoked (tlsroll ca revoke), and clients, which read no "
        "revocation list, take it until its end: replace it now: tlsroll rollout start "
        "--change rotate-cert --nodes b,d (see: tlsroll nodes, tlsroll schema show)"
    )


def test_a_node_skipped_as_done_whose_agent_lacks_its_https_settings_is_told_to_rotate() -> None:
    """Session 75 https9443: a node on https whose agent's journal holds no settings for it
    (begun again, or an older copy put back: ``NodeObservation.no_settings``, from its
    heartbeats) runs no bootstrap service; enable-tls finds it done, and "nothing to do" was a
    dead end. Its skip and the refusal name the rotate-cert that stages the settings again."""
    unset = replace(seen("https"), no_settings=True)
    _, nodes = plan_rollout(
        rollout_id="r2",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled=dict.fromkeys(["a", "b"], True),
        leader="b",
        epoch=4,
        observed={"a": seen("http"), "b": unset},
    )
    states = {n.name: (n.state, n.reason) for n in nodes}
    assert states["b"] == (
        N.SKIPPED,
        "already done: on https with a certificate of this CA; its agent's journal holds no "
        "settings for the https it serves (reinitialised, or put back from an older copy): "
        "workstations cannot enrol at its bootstrap port until a switch: tlsroll rollout start "
        "--change rotate-cert --nodes b",
    )
    with pytest.raises(NothingToDo) as refused:
        plan_rollout(
            rollout_id="r3",
            change=Change.ENABLE_TLS,
            scope=Scope.cluster(),
            enrolled=dict.fromkeys(["node2", "node3"], True),
            leader="node3",
            epoch=4,
            observed={"node2": unset, "node3": seen("https")},
        )
    assert str(refused.value) == (
        "nothing to do: every node in scope (node2, node3) already runs what enable-tls wants; "
        "node2: its agent's journal holds no settings for the https it serves (reinitialised, "
        "or put back from an older copy): workstations cannot enrol at its bootstrap port until "
        "a switch: tlsroll rollout start --change rotate-cert --nodes node2 (see: tlsroll nodes,"
        " tlsroll schema show)"
    )


def test_the_rotate_cert_said_for_many_nodes_serving_a_revoked_certificate_names_them_all() -> None:
    """Review rvc of s66-misc (L1): past ten nodes serving a revoked certificate, the refusal
    cut their names at ten and its command said ``--nodes NAMES``, which cannot be run. The
    command names every one of them."""
    names = [f"n{i:02d}" for i in range(12)]
    with pytest.raises(NothingToDo) as refused:
        plan_rollout(
            rollout_id="r",
            change=Change.ENABLE_TLS,
            scope=Scope.cluster(),
            enrolled=dict.fromkeys(names, True),
            leader="n00",
            epoch=4,
            observed={n: replace(seen("https"), cert_revoked=True) for n in names},
        )
    said = str(refused.value)
    assert "NAMES" not in said, said
    command = re.search(r"tlsroll rollout start --change rotate-cert --nodes (\S+)", said)
    assert command is not None, said
    assert command.group(1).split(",") == names, said


@pytest.mark.parametrize("dual_from", ["", "r1"])
def test_a_retry_of_phase_1_starts_the_nodes_still_dual_with_its_password_dual(
    dual_from: str,
) -> None:
    """A retry of a transitional phase 1 (``dual_from``) carries the nodes phase 1 left dual
    (http and https, this CA, its password) as ``dual``, so its finalize covers them; a new
    transitional rollout skips them as before. A dual node with another password or another
    CA's certificate is not carried."""
    observed = {
        "a": seen("http", "https", digest="d1"),
        "b": seen("http", "https", digest="d0"),
        "c": seen("http"),
        "d": seen("http", "https", from_ca=False, digest="d1"),
    }
    rollout, nodes = plan_rollout(
        rollout_id="r2",
        change=Change.ENABLE_TLS,
        strategy=Strategy.TRANSITIONAL,
        scope=Scope.of_nodes(["a", "b", "c"]),
        enrolled=dict.fromkeys(observed, True),
        leader="c",
        epoch=4,
        observed=observed,
        target_digest="d1",
        dual_from=dual_from,
    )
    states = {n.name: (n.state, n.reason) for n in nodes}
    if dual_from:
        assert states["a"][0] is N.DUAL and "dual since rollout r1" in states["a"][1]
    else:
        assert states["a"][0] is N.SKIPPED
    assert states["b"][0] is N.SKIPPED  # another password: not this retry's to finalize
    assert states["c"] == (N.PENDING, "")
    plan = next_actions(rollout.with_event(RE.START), nodes)
    assert plan.nodes_with_event(NE.START) == ("c",)
    with pytest.raises(PlanError, match="http and https"):
        plan_rollout(
            rollout_id="r3",
            change=Change.ENABLE_TLS,
            strategy=Strategy.TRANSITIONAL,
            scope=Scope.of_nodes(["d"]),
            enrolled=dict.fromkeys(observed, True),
            leader="c",
            epoch=5,
            observed=observed,
            target_digest="d1",
            dual_from="r1",
        )


@pytest.mark.parametrize(
    ("change", "observed", "target"),
    [
        (Change.ENABLE_TLS, seen("https"), ""),
        (Change.DISABLE_TLS, seen("http"), ""),
        (Change.CHANGE_PASSWORD, seen("https", digest="d2"), "d2"),
    ],
)
def test_nothing_to_do_when_every_node_already_runs_it(
    change: Change, observed: NodeObservation, target: str
) -> None:
    with pytest.raises(NothingToDo, match="already runs what"):
        plan_rollout(
            rollout_id="r3",
            change=change,
            scope=Scope.cluster(),
            enrolled={"a": True},
            leader="a",
            epoch=1,
            observed={"a": observed},
            target_digest=target,
        )


def test_a_node_whose_agent_cannot_be_asked_blocks_the_plan_naming_why() -> None:
    with pytest.raises(Unreachable, match=r"node b.*|b: connection refused") as info:
        plan_rollout(
            rollout_id="r4",
            change=Change.ENABLE_TLS,
            scope=Scope.cluster(),
            enrolled={"a": True, "b": True},
            leader="a",
            epoch=1,
            observed={"a": seen("http"), "b": NodeObservation(False, "connection refused")},
        )
    assert info.value.names == ("b",)
    assert "b: connection refused" in str(info.value)


def test_an_agent_that_answers_for_a_down_server_is_not_told_to_be_brought_up() -> None:
    """Review s46rt2 L4: each node with what to do: the agent that does not answer brought up,
    the server that does not started (its agent answered)."""
    with pytest.raises(Unreachable) as info:
        plan_rollout(
            rollout_id="r4",
            change=Change.ENABLE_TLS,
            scope=Scope.cluster(),
            enrolled={"a": True, "b": True, "c": True},
            leader="a",
            epoch=1,
            observed={
                "a": seen("http"),
                "b": NodeObservation(False, "connection refused"),
                "c": NodeObservation(False, "the managed server: not answering on /run/x.sock"),
            },
        )
    assert info.value.names == ("b", "c")
    assert str(info.value) == (
        "cannot ask the agent of b what it runs (b: connection refused); bring the agent up or "
        "leave the node out (--nodes); cannot tell what c runs: its agent answers, its managed "
        "server does not (c: not answering on /run/x.sock); start the "
        "server or leave the node out (--nodes)"
    )


def test_a_password_in_use_is_kept_never_replaced() -> None:
    assert decide_auth(Change.ENABLE_TLS, False, 3, in_use=2) == AuthDecision(False, 2)
    with pytest.raises(PlanError, match="already use auth password version 2"):
        decide_auth(Change.ENABLE_TLS, True, 3, in_use=2)
    assert decide_auth(Change.ENABLE_TLS, True, 0) == AuthDecision(True, 0)
    assert decide_auth(Change.ENABLE_TLS, False, 3, keep=1) == AuthDecision(False, 1)


def test_the_password_in_use_comes_from_the_record_of_nodes_not_asked() -> None:
    """Review s64 M2: a node that cannot be asked still runs what the store recorded on it; a
    new password is refused while that is all there is to go by, and any start while a node
    that answers runs one this leader does not know (a store restored from an older backup)."""
    digests = {"d1": 1, "d2": 2}
    offline = password_in_use({"c": ""}, digests, {"a": 1, "b": 1})
    assert offline == PasswordInUse(1, confirmed=False, unconfirmed=("a", "b"))
    assert decide_auth(Change.ENABLE_TLS, False, 1, offline) == AuthDecision(False, 1)
    with pytest.raises(PlanError, match=r"cannot confirm .*: a, b offline \(recorded on pass"):
        decide_auth(Change.ENABLE_TLS, True, 1, offline)
    # A node that answers decides for itself, whatever the record says.
    seen = password_in_use({"a": "d2", "b": ""}, digests, {"a": 1, "b": 1, "c": 2})
    assert seen == PasswordInUse(2, confirmed=True, unconfirmed=("c",))
    with pytest.raises(PlanError, match="already use auth password version 2"):
        decide_auth(Change.ENABLE_TLS, True, 2, seen)
    unknown = password_in_use({"a": "d9", "b": "d1"}, digests, {"a": 1, "b": 1})
    assert unknown.unknown == ("a",)
    for with_one in (True, False):
        with pytest.raises(PlanError, match="a run one this leader does not know"):
            decide_auth(Change.ENABLE_TLS, with_one, 2, unknown)
    assert unknown.doubt(Change.CHANGE_PASSWORD, False) == ""  # its way out
    assert password_in_use({"a": ""}, digests, {}) == PasswordInUse()


def test_already_done_per_change() -> None:
    assert already_done(Change.ENABLE_TLS, seen("http", "https")) is None  # dual: not done
    assert already_done(Change.DISABLE_TLS, seen("https")) is None
    assert already_done(Change.CHANGE_PASSWORD, seen("https", digest="d1"), "d2") is None
    assert already_done(Change.CHANGE_PASSWORD, seen("https", digest="d1"), "") is None


# --- the transitional strategy (issue 12) ------------------------------------------------------


def test_transitional_phase_1_leaves_every_node_dual_and_waits_holding_nothing() -> None:
    eng = Engine.cluster(freeze=FreezeMode.SCOPE, strategy=Strategy.TRANSITIONAL)
    plan = eng.admin(RE.START)
    for name in "abc":
        eng.succeed(name)  # preflight
        plan = eng.succeed(name)  # stage: the scope freeze comes first
        if plan.nodes_with_step(Step.FREEZE):
            plan = eng.ack(plan)
        eng.finish(name)
        assert eng.node(name).state is N.DUAL
    assert eng.status() is R.RUNNING  # still frozen: unfreeze before it waits
    plan = next_actions(eng.rollout, eng.nodes)
    assert set(plan.nodes_with_step(Step.UNFREEZE)) == {"a", "b", "c"}
    assert plan.rollout_events == ()
    plan = eng.ack(eng.plan())
    assert plan.rollout_events == (RE.NODES_DUAL,)
    assert eng.status() is R.AWAITING_FINALIZE
    assert not any(n.scope_frozen for n in eng.nodes)
    assert eng.plan() == Plan(epoch=3)  # waiting: no step at all
    assert finalize_scope(eng.rollout, eng.nodes) == ("a", "b", "c")


def test_transitional_node_failing_goes_back_to_http_and_halts() -> None:
    eng = Engine.cluster(strategy=Strategy.TRANSITIONAL)
    eng.admin(RE.START)
    eng.finish("a")
    eng.succeed("b")
    eng.succeed("b")
    eng.succeed("b")  # switched; the outside check fails → the agent rolls b back to http
    eng.outcome("b", NE.CONFIRM_ROLLED_BACK, "8080 closed")
    assert eng.states() == {"a": N.DUAL, "b": N.ROLLED_BACK, "c": N.SKIPPED}
    assert eng.status() is R.HALTED  # a halted phase 1 does not wait for finalize
    assert serves_after(eng.rollout, N.ROLLED_BACK, frozenset({"http"})) == {"http"}
    assert serves_after(eng.rollout, N.DUAL, frozenset({"http"})) == {"http", "https"}
    with pytest.raises(PlanError, match="halted, not awaiting finalize"):
        finalize_scope(eng.rollout, eng.nodes)


def test_a_transitional_failure_within_the_budget_still_waits_for_the_others() -> None:
    eng = Engine.cluster(strategy=Strategy.TRANSITIONAL, failure_budget=1)
    eng.admin(RE.START)
    eng.finish("a")
    eng.outcome("b", NE.PREFLIGHT_FAILED, "port 8443 taken")
    eng.finish("c")
    assert eng.status() is R.AWAITING_FINALIZE
    assert finalize_scope(eng.rollout, eng.nodes) == ("a", "c")  # b is on http only


def test_finalize_is_only_for_a_transitional_rollout_awaiting_it() -> None:
    eng = Engine.cluster()
    eng.admin(RE.START)
    with pytest.raises(PlanError, match="only a transitional rollout is finalized"):
        finalize_scope(eng.rollout, eng.nodes)
    eng = Engine.cluster(strategy=Strategy.TRANSITIONAL)
    eng.admin(RE.START)
    with pytest.raises(PlanError, match="running, not awaiting finalize; wait until every"):
        finalize_scope(eng.rollout, eng.nodes)


def test_held_nodes_wait_at_the_gate_and_the_others_go_past() -> None:
    eng = Engine.cluster(max_parallel=1)
    eng.rollout = eng.rollout.with_event(RE.START)
    plan = next_actions(eng.rollout, eng.nodes, held=frozenset({"a"}))
    assert plan.nodes_with_event(NE.START) == ("b",)
    plan = next_actions(eng.rollout, eng.nodes, held=frozenset({"a", "b", "c"}))
    assert plan == Plan(epoch=3)  # nobody quiet: the rollout waits, nothing in flight
    aborted = eng.rollout.with_event(RE.ABORT)
    plan = next_actions(aborted, eng.nodes, held=frozenset({"a", "b", "c"}))
    assert plan.nodes_with_event(NE.SKIP) == ("a", "b", "c")  # an abort skips held nodes


def a_follower(
    change: Change, state: RolloutState, *node_states: NodeState
) -> tuple[Rollout, list[NodeRecord]]:
    names = [f"n{i}" for i in range(len(node_states))]
    rollout = Rollout("f1", change, Scope.of_nodes(names), tuple(names), 9, state=state)
    return rollout, [NodeRecord(n, s) for n, s in zip(names, node_states, strict=True)]


@pytest.mark.parametrize(
    ("change", "state", "nodes", "verdict"),
    [
        (Change.FINALIZE, R.COMPLETED, (N.DONE, N.DONE), RE.FINALIZED),
        (Change.FINALIZE, R.COMPLETED, (N.DONE, N.SKIPPED), RE.FINALIZED),  # already https
        (Change.FINALIZE, R.COMPLETED, (N.DONE, N.ROLLED_BACK), None),  # within the budget
        (Change.FINALIZE, R.RUNNING, (N.DONE, N.PENDING), None),
        (Change.FINALIZE, R.HALTED, (N.DONE, N.ROLLED_BACK), None),
        (Change.FINALIZE, R.ABORTED, (N.DONE, N.SKIPPED), None),
        (Change.DISABLE_TLS, R.COMPLETED, (N.DONE, N.DONE), RE.TAKEN_BACK),
        (Change.DISABLE_TLS, R.HALTED, (N.DONE, N.NEEDS_ATTENTION), None),
    ],
)
def test_what_a_linked_rollout_ending_does_to_the_one_awaiting_finalize(
    change: Change,
    state: RolloutState,
    nodes: tuple[NodeState, ...],
    verdict: RolloutEvent | None,
) -> None:
    rollout, records = a_follower(change, state, *nodes)
    assert awaiting_verdict(rollout, records) == verdict


def plan_on(
    change: Change, observed: dict[str, NodeObservation], strategy: Strategy = Strategy.DIRECT
) -> tuple[Rollout, tuple[NodeRecord, ...]]:
    return plan_rollout(
        rollout_id="r9",
        change=change,
        scope=Scope.of_nodes(sorted(observed)),
        enrolled=dict.fromkeys(observed, True),
        leader="zz",
        epoch=9,
        strategy=strategy,
        observed=observed,
    )


@pytest.mark.parametrize(
    ("change", "strategy"),
    [
        (Change.ENABLE_TLS, Strategy.DIRECT),
        (Change.CHANGE_PASSWORD, Strategy.DIRECT),
        (Change.ROTATE_CERT, Strategy.DIRECT),
    ],
)
def test_a_dual_node_is_refused_to_any_change_but_finalize_and_the_way_back(
    change: Change, strategy: Strategy
) -> None:
    with pytest.raises(WrongSource, match=r"cannot start on b: .*rollout finalize.*rollback"):
        plan_on(change, {"a": seen("https"), "b": seen("http", "https")}, strategy)


def test_transitional_and_finalize_plans_from_what_each_node_serves() -> None:
    _, nodes = plan_on(
        Change.ENABLE_TLS,
        {"a": seen("http"), "b": seen("http", "https"), "c": seen("https")},
        Strategy.TRANSITIONAL,
    )
    assert [(n.state, n.reason.split(":")[0]) for n in nodes] == [
        (N.PENDING, ""),
        (N.SKIPPED, "already done"),  # dual already
        (N.SKIPPED, "already done"),  # finalized already
    ]
    _, nodes = plan_on(Change.FINALIZE, {"a": seen("http", "https"), "b": seen("https")})
    assert [n.state for n in nodes] == [N.PENDING, N.SKIPPED]
    with pytest.raises(WrongSource, match="b: it serves http only: finalize closes http"):
        plan_on(Change.FINALIZE, {"a": seen("http", "https"), "b": seen("http")})
    _, nodes = plan_on(Change.DISABLE_TLS, {"a": seen("http", "https")})
    assert [n.state for n in nodes] == [N.PENDING]  # the way back from dual


# --- property: what the nodes serve across a chain of rollouts --------------------------------

HTTP_ONLY, HTTPS_ONLY, BOTH = (
    frozenset({"http"}),
    frozenset({"https"}),
    frozenset({"http", "https"}),
)

Kind = tuple[Change, Strategy]
KINDS: list[Kind] = [
    (Change.ENABLE_TLS, Strategy.TRANSITIONAL),
    (Change.FINALIZE, Strategy.DIRECT),
    (Change.DISABLE_TLS, Strategy.DIRECT),
    (Change.ENABLE_TLS, Strategy.DIRECT),
    (Change.CHANGE_PASSWORD, Strategy.DIRECT),
    (Change.ROTATE_CERT, Strategy.DIRECT),
]


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 4),
    chain=st.lists(
        st.tuples(st.sampled_from(KINDS), st.lists(st.booleans(), min_size=1, max_size=40)),
        max_size=8,
    ),
)
def test_a_dual_node_reaches_https_only_only_through_finalize(
    size: int, chain: list[tuple[Kind, list[bool]]]
) -> None:
    """Nodes start on http; rollouts of random kinds follow one another, each planned from what
    the nodes serve (as the leader plans from ``GetStatus``) and run with random step outcomes.
    What each node serves moves only as its record says (``serves_after``). Whatever the
    chain: no node ever goes from dual to https-only except in a finalize rollout, a finalize
    that fails leaves it dual, and the way back from dual ends on http only."""
    serving = {f"n{i}": HTTP_ONLY for i in range(size)}
    for (change, strategy), outcomes in chain:
        observed = {n: seen(*sorted(s)) for n, s in serving.items()}
        try:
            rollout, nodes = plan_rollout(
                rollout_id="rx",
                change=change,
                scope=Scope.cluster(),
                enrolled=dict.fromkeys(serving, True),
                leader="n0",
                epoch=1,
                strategy=strategy,
                observed=observed,
            )
        except (WrongSource, NothingToDo):
            continue
        for n in nodes:  # a node planned to change starts where the change may start
            if n.state is N.PENDING:
                assert frozenset(serving[n.name]) != BOTH or change in (
                    Change.FINALIZE,
                    Change.DISABLE_TLS,
                )
        eng = Engine(rollout.with_event(RE.START), nodes)
        eng.plan()
        flips = iter(outcomes * 20)
        while eng.rollout.state not in TERMINAL_ROLLOUT_STATES | {R.AWAITING_FINALIZE}:
            working = [n for n in eng.nodes if n.state in STEP_FOR_STATE]
            if not working:
                eng.plan()
                continue
            node = working[0]
            ok = next(flips, True)
            eng.outcome(
                node.name,
                success(eng.rollout, node.state) if ok else FAILURE[node.state],
                None if ok else "it broke",
            )
        for n in eng.nodes:
            before = serving[n.name]
            after = serves_after(eng.rollout, n.state, before)
            if not after:  # needs attention: a person looks; the chain ends for the test
                return
            if before == BOTH and after == HTTPS_ONLY:
                assert change is Change.FINALIZE and n.state is N.DONE
            if before == BOTH and change is Change.FINALIZE and n.state is not N.DONE:
                assert after == BOTH  # a finalize that did not finish leaves it dual
            if before == BOTH and change is Change.DISABLE_TLS and n.state is N.DONE:
                assert after == HTTP_ONLY  # the way back from dual: http only
            serving[n.name] = after


# --- who is still on http; when a node is quiet ------------------------------------------------

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
MIN = dt.timedelta(minutes=1)


def seen_at(node: str, scheme: str, who: str, minutes_ago: int, ws: str = "") -> Client:
    at = T0 - minutes_ago * MIN
    return Client(node, scheme, who, ws, at - MIN, at, 1)


def test_still_on_http_is_who_was_on_http_lately_and_not_on_https_since() -> None:
    clients = [
        seen_at("a", "http", "10.0.0.1", 1),  # stays on http
        seen_at("a", "http", "10.0.0.2", 5),
        seen_at("a", "https", "10.0.0.2", 2),  # moved after its last http request
        seen_at("a", "https", "10.0.0.3", 9),
        seen_at("a", "http", "10.0.0.3", 3),  # went back to http after https
        seen_at("b", "https", "10.0.0.1", 0),  # same address at another node: not a move
        seen_at("a", "http", "10.0.0.4", 30),  # outside the window
        seen_at("b", "http", "10.9.9.9", 2, ws="ws-front"),
        seen_at("b", "https", "10.9.9.8", 1, ws="ws-front"),  # same workstation, new address
        # Alternates: https seen last, but http used after https first was (from minute 5).
        Client("a", "http", "10.0.0.5", "", T0 - 8 * MIN, T0 - 2 * MIN, 4),
        Client("a", "https", "10.0.0.5", "", T0 - 5 * MIN, T0 - 1 * MIN, 4),
        # Same second on both schemes (whole seconds): a switch made at once, switched.
        Client("a", "http", "10.0.0.6", "", T0 - 8 * MIN, T0 - 6 * MIN, 4),
        Client("a", "https", "10.0.0.6", "", T0 - 6 * MIN, T0 - 1 * MIN, 4),
    ]
    left = still_on_http(clients, T0, dt.timedelta(minutes=10))
    assert [(c.node, c.address) for c in left] == [
        ("a", "10.0.0.1"),
        ("a", "10.0.0.5"),
        ("a", "10.0.0.3"),
    ]


def test_an_unnamed_http_client_is_the_one_workstation_named_from_its_address() -> None:
    """Session 68 (README walk, M3): a PC whose http requests carry no workstation name (the
    practice application sends no ``X-Tlsroll-Workstation`` header) is known by its address on
    http; on https its client certificate names it. It was two clients, and its http one
    stayed "still on http" for the agent's whole window (a day): a plain finalize was refused
    all day. Now an unnamed http sighting is judged against the https ones of the one name
    seen from its address as well; from an address with several names (a terminal server,
    NAT) against its unnamed ones only, and an unnamed https sighting never stands for a
    named workstation."""
    t = T0 - 10 * MIN
    day = dt.timedelta(days=1)

    def at(node: str, scheme: str, address: str, ws: str, first: int, last: int) -> Client:
        return Client(node, scheme, address, ws, t + first * MIN, t + last * MIN, 1)

    # The brief's reproduction: http at t unnamed, https 5 minutes later with its certificate.
    moved = [
        at("a", "http", "192.168.1.20", "", 0, 0),
        at("a", "https", "192.168.1.20", "ws-empfang", 5, 5),
    ]
    assert still_on_http(moved, T0, day) == []
    # The same second: moved (a tie, as for a named one).
    assert still_on_http([moved[0], replace(moved[1], first_seen=t)], T0, day) == []
    # Back on http after its https use (or another program of the PC): still on http.
    back = [replace(moved[0], last_seen=t + 7 * MIN), moved[1]]
    assert still_on_http(back, T0, day) == [back[0]]
    clients = [
        # On https since before its last http request (alternates, or a second PC behind the
        # address that moved earlier): still on http.
        at("a", "http", "10.0.0.1", "", 0, 3),
        at("a", "https", "10.0.0.1", "ws-one", 1, 9),
        # Two names seen from the address (a terminal server, NAT): the unnamed http client
        # is none of them, however late their https use began.
        at("a", "http", "10.0.0.2", "", 0, 0),
        at("a", "https", "10.0.0.2", "ws-two", 5, 9),
        at("a", "https", "10.0.0.2", "ws-three", 6, 9),
        # An unnamed https client never stands for a named http one.
        at("a", "http", "10.0.0.3", "ws-four", 0, 0),
        at("a", "https", "10.0.0.3", "", 5, 9),
        # The name seen at another node's server says nothing here.
        at("a", "http", "10.0.0.4", "", 0, 0),
        at("b", "https", "10.0.0.4", "ws-five", 5, 9),
        # Named from the address on http (its header, as test-connection sends it), on https
        # from a new address: the unnamed http client of that address moved with it.
        at("a", "http", "10.0.0.6", "", 0, 1),
        at("a", "http", "10.0.0.6", "ws-six", 0, 2),
        at("a", "https", "10.0.0.7", "ws-six", 4, 9),
        # The unnamed https client of the address began before its last http request: on http
        # (as before), though the one name's began after.
        at("a", "http", "10.0.0.8", "", 0, 3),
        at("a", "https", "10.0.0.8", "", 2, 9),
        at("a", "https", "10.0.0.8", "ws-eight", 5, 9),
    ]
    left = still_on_http(clients, T0, day)
    assert sorted((c.node, c.address, c.workstation) for c in left) == [
        ("a", "10.0.0.1", ""),
        ("a", "10.0.0.2", ""),
        ("a", "10.0.0.3", "ws-four"),
        ("a", "10.0.0.4", ""),
        ("a", "10.0.0.8", ""),
    ]


def test_a_node_is_quiet_once_no_http_client_was_seen_for_the_duration() -> None:
    quiet = dt.timedelta(minutes=10)
    known = {n: T0 - 60 * MIN for n in "abcdf"}
    last = {"a": T0 - 11 * MIN, "b": T0 - 2 * MIN, "c": None, "f": T0 - 30 * MIN}
    as_of = {n: T0 for n in "abcde"} | {"f": T0 - 25 * MIN}
    held = held_for_quiet(["a", "b", "c", "d", "e", "f"], last, known, as_of, quiet)
    # a: quiet for 11 min; c, d: no http client since the leader knows (60 min); b: 2 min ago;
    # e: its clients cannot be told (no report, or a problem): it waits; f: its last report
    # is 25 min old and spoke for 5 quiet minutes only: the silence since is not quiet.
    assert held == {"b", "e", "f"}
    # Known for 3 min only (its first report, as the engine passes it: test_engine's
    # test_when_quiet_counts_quiet_time_from_a_nodes_first_report_not_a_day_before), nothing
    # seen: not long enough yet.
    recent = {"c": T0 - 3 * MIN}
    assert held_for_quiet(["c"], {"c": None}, recent, {"c": T0}, quiet) == {"c"}


def test_when_quiet_holds_a_node_whose_client_report_is_stale() -> None:
    """Issue 12 review: right after a leader restart (or with its agent silent) a node's last
    report may have shown it quiet long enough; an old report never releases it."""
    bound = report_stale_after(5)
    assert bound == dt.timedelta(seconds=3 * 5) + dt.timedelta(seconds=15)
    reported = {"a": T0 - bound, "b": T0 - bound - dt.timedelta(seconds=1)}
    assert stale_reports(reported, T0, bound) == {"b"}
    quiet = 10 * MIN
    known = {n: T0 - 60 * MIN for n in "ab"}
    as_of = {n: T0 - MIN for n in "ab"}  # both reports spoke for 59 quiet minutes
    stale = stale_reports(reported, T0, bound)
    assert held_for_quiet(["a", "b"], {"a": None, "b": None}, known, as_of, quiet, stale) == {"b"}


def _way_back(
    enrolled: dict[str, bool], observed: dict[str, NodeObservation], change: Change
) -> dict[str, tuple[NodeState, str]]:
    _, records = plan_rollout(
        rollout_id="r5",
        change=change,
        scope=Scope.cluster(),
        enrolled=enrolled,
        leader="a",
        epoch=1,
        observed=observed,
    )
    return {r.name: (r.state, r.reason) for r in records}


def test_the_way_back_leaves_nodes_it_cannot_reach_as_is_and_goes_on() -> None:
    """Review s45rt1 H1: one switched-off machine (offline), an agent that cannot be asked or
    one that needs the admin no longer refuses `rollout rollback` for every node: each is left
    as is, named with what to do; a server down with its config on https is stepped."""
    down = NodeObservation(False, "the managed server: connection refused", configured=("https",))
    admin = NodeObservation(False, "x", needs_admin="needs the admin: check the journal")
    planned = _way_back(
        {"a": True, "b": True, "c": False, "d": True, "e": True, "f": True},
        {
            "a": seen("https"),
            "b": seen("http"),
            "d": NodeObservation(False, "connection refused"),
            "e": down,
            "f": admin,
        },
        Change.DISABLE_TLS,
    )
    assert planned == {
        "a": (NodeState.PENDING, ""),
        "b": (NodeState.SKIPPED, "already done: on http"),
        "c": (NodeState.SKIPPED, LEFT_OFFLINE),
        "d": (
            NodeState.SKIPPED,
            "cannot tell what it runs (connection refused): left as is; fix that, then run "
            "tlsroll rollout rollback again",
        ),
        "e": (NodeState.PENDING, ""),
        "f": (
            NodeState.SKIPPED,
            "needs the admin: check the journal; left as is: then run tlsroll rollout rollback "
            "again",
        ),
    }
    assert [n for n, (_, why) in planned.items() if left_as_is(why)] == ["c", "d", "f"]


def test_other_changes_stay_strict_about_nodes_out_of_reach() -> None:
    down = NodeObservation(False, "the managed server: connection refused", configured=("https",))
    with pytest.raises(NodesOffline):
        _way_back({"a": True, "b": False}, {"a": seen("https")}, Change.ROTATE_CERT)
    with pytest.raises(Unreachable, match=r"its managed server does not \(b: connection refused\)"):
        _way_back({"a": True, "b": True}, {"a": seen("https"), "b": down}, Change.ROTATE_CERT)


def test_the_way_back_with_no_node_to_take_back_now_is_refused() -> None:
    with pytest.raises(
        NoneReachable,
        match=r"^disable-tls has no node to take back now: c \(offline\); on http already: b; "
        "nothing was changed",
    ):
        _way_back({"b": True, "c": False}, {"b": seen("http")}, Change.DISABLE_TLS)
    with pytest.raises(NothingToDo):  # every node on http: as before
        _way_back({"b": True}, {"b": seen("http")}, Change.DISABLE_TLS)


def test_the_way_back_says_once_it_is_back_only_of_an_agent_that_is_off() -> None:
    """Review s45rev9 L1: a node left as is because it needs the admin, or because its agent
    (an older one) cannot say what a down server's config holds, has its agent up: the refusal
    says what fits each, not "once it is back"."""
    old_agent_down = NodeObservation(False, "the managed server: connection refused")
    admin = NodeObservation(False, "x", needs_admin="needs the admin: check the journal")
    with pytest.raises(NoneReachable) as refused:
        _way_back(
            {"b": True, "c": False, "d": True, "e": True},
            {"b": seen("http"), "d": old_agent_down, "e": admin},
            Change.DISABLE_TLS,
        )
    said = str(refused.value)
    assert said.endswith(
        "nothing was changed: c: run tlsroll rollout rollback once its agent is back; "
        "d: start its server or upgrade tlsroll on the node, then run tlsroll rollout "
        "rollback; e: needs the admin: check the journal; then run tlsroll rollout rollback"
    ), said
    assert "once they are back" not in said
    unanswered = NodeObservation(False, "no answer within 5 s")
    with pytest.raises(NoneReachable, match=r"once its agent answers \(tlsroll nodes --check\)$"):
        _way_back({"d": True}, {"d": unanswered}, Change.DISABLE_TLS)


def test_the_way_back_says_a_down_server_whose_config_serves_http_has_nothing_to_take_back() -> (
    None
):
    """Review s45rev9 L2: a managed server that is down, its config on http (its agent says so:
    ``ServerView.configured_schemes``), was left as is as "cannot tell what it runs": it is
    on http already, and the way back says so (skipped, not left as is). Only the way back:
    other changes still wait for a healthy server; an older agent that says nothing of the
    config still cannot tell."""
    down_http = NodeObservation(
        False, "the managed server: connection refused", configured=("http",), config_read=True
    )
    planned = _way_back(
        {"a": True, "b": True}, {"a": seen("https"), "b": down_http}, Change.DISABLE_TLS
    )
    assert planned == {
        "a": (NodeState.PENDING, ""),
        "b": (NodeState.SKIPPED, "down, its config serves http: nothing to take back"),
    }
    assert not left_as_is(planned["b"][1])
    with pytest.raises(NothingToDo, match="; b: down, its config serves http: nothing to take"):
        _way_back({"b": True}, {"b": down_http}, Change.DISABLE_TLS)  # (b runs nothing)
    with pytest.raises(NoneReachable, match=r"c \(offline\); on http already: b; "):
        _way_back({"b": True, "c": False}, {"b": down_http}, Change.DISABLE_TLS)
    with pytest.raises(Unreachable, match=r"its managed server does not \(b: connection refused\)"):
        _way_back({"a": True, "b": True}, {"a": seen("https"), "b": down_http}, Change.ROTATE_CERT)
    # Review s46rev3 H1: the systemd and exec drivers send the ports that answer, not the
    # config: a down server whose http port another program holds may be configured on https.
    # Not read in a config file, it is left as is, named, as before.
    probed = NodeObservation(
        False, "the managed server: status: false exited 1", configured=("http",)
    )
    planned = _way_back(
        {"a": True, "b": True}, {"a": seen("https"), "b": probed}, Change.DISABLE_TLS
    )
    assert planned["b"][0] is NodeState.SKIPPED and left_as_is(planned["b"][1]), planned


def _running(
    change: Change, names: list[str], **kw: object
) -> tuple[Rollout, tuple[NodeRecord, ...]]:
    rollout, records = plan_rollout(
        rollout_id="r1", change=change, scope=Scope.of_nodes(names),
        enrolled=dict.fromkeys(names, True), leader=names[0], epoch=2, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return rollout.with_event(RolloutEvent.START), records


@pytest.mark.parametrize(
    "change",
    [Change.ENABLE_TLS, Change.CHANGE_PASSWORD, Change.ROTATE_CERT, Change.DISABLE_TLS],
)
def test_a_cut_off_node_is_never_switched_by_any_change(change: Change) -> None:
    """s50: a node whose agent was cut off (revoked) while a rollout other than a finalize ran
    went on to its switch against the revoked agent. Now no change steps it: the way back
    leaves it as is (as it does a node cut off before it starts: ``left_cut_off``) and goes
    on; any other change halts, the node skipped with a reason naming `tlsroll nodes remove`,
    as its start refuses a cut-off node (offline): never half-switched silently. Whatever
    state before its switch it is in, running or paused."""
    from leader.rollout_core import cut_off_reason, left_cut_off

    running, records = _running(change, ["a", "b", "c"])
    reason = cut_off_reason(change, "b")
    if change is Change.DISABLE_TLS:
        assert reason == left_cut_off("b")
    else:
        assert "`tlsroll nodes remove b`" in reason and "halted" in reason, reason
    halts = change is not Change.DISABLE_TLS
    for state in (NodeState.PENDING, NodeState.PREFLIGHT, NodeState.STAGING, NodeState.STAGED):
        nodes = tuple(
            replace(r, state=NodeState.SWITCHING) if r.name == "a"
            else replace(r, state=state) if r.name == "b" else r
            for r in records
        )  # fmt: skip
        for rollout in (running, running.with_event(RolloutEvent.PAUSE)):
            for ahead in (0, 1):
                plan_ = next_actions(rollout, nodes, prepare_ahead=ahead, cut_off={"b"})
                b_events = [(a.event, a.reason) for a in plan_.node_events if a.node == "b"]
                assert b_events == [(NodeEvent.SKIP, reason)], (state, ahead)
                assert "b" not in {s.node for s in plan_.steps}, (state, ahead)
                halted = plan_.rollout_events == (RolloutEvent.NODE_CUT_OFF,)
                assert halted is halts, plan_.rollout_events
                after, moved = apply_plan(rollout, nodes, plan_)
                by = {r.name: r for r in moved}
                assert by["b"].state is NodeState.SKIPPED
                assert "a" not in plan_.nodes_with_events  # its switch goes on
                if halts:
                    assert after.state is RolloutState.HALTING
                    # c is not started: halted, it is skipped (the halt's own rule)
                    assert by["c"].state is NodeState.SKIPPED, by["c"]
                    assert by["c"].reason == "rollout halted", by["c"]
                else:
                    assert after.state is rollout.state
    # Not cut off, the same rollout goes on as ever.
    plain = next_actions(running, records)
    assert plain.rollout_events == () and plain.nodes_with_event(NodeEvent.SKIP) == ()


@pytest.mark.parametrize("change", [Change.ENABLE_TLS, Change.DISABLE_TLS, Change.FINALIZE])
def test_a_cut_off_node_mid_switch_needs_attention(change: Change) -> None:
    """s50: a node whose switch was sent when its agent was cut off: the leader asks the
    revoked agent nothing more (``AgentPool.get`` refuses to dial it), so its outcome is not
    known: it needs attention with a reason naming `tlsroll nodes remove`, not "unknown"
    for good (the rollout never ended and the node could never be removed)."""
    from leader.rollout_core import cut_off_mid_switch

    running, records = _running(change, ["a", "b"])
    for state, event in (
        (NodeState.SWITCHING, NodeEvent.SWITCH_FAILED),
        (NodeState.CONFIRMING, NodeEvent.CONFIRM_FAILED),
    ):
        nodes = tuple(
            replace(r, state=state) if r.name == "b" else replace(r, state=NodeState.DONE)
            for r in records
        )
        plan_ = next_actions(running, nodes, cut_off={"b"})
        assert [(a.node, a.event, a.reason) for a in plan_.node_events] == [
            ("b", event, cut_off_mid_switch("b"))
        ], state
        assert "`tlsroll nodes remove b`" in cut_off_mid_switch("b")
        assert not plan_.steps, plan_.steps
        # Review of s50 H1: the failure counts against the budget (0) in the same pass, as
        # any failure does: the rollout halts, it does not complete.
        assert plan_.rollout_events == (
            RolloutEvent.FAILURE_BUDGET_EXCEEDED,
            RolloutEvent.NODES_SETTLED,
        ), (state, plan_.rollout_events)
        after, moved = apply_plan(running, nodes, plan_)
        assert {r.name: r.state for r in moved}["b"] is NodeState.NEEDS_ATTENTION
        assert after.state is RolloutState.HALTED, after
        # Within the budget, the rollout completes as with any failure.
        tolerant = replace(running, failure_budget=1)
        plan_ = next_actions(tolerant, nodes, cut_off={"b"})
        assert plan_.rollout_events == (RolloutEvent.NODES_SETTLED,), plan_.rollout_events
        assert apply_plan(tolerant, nodes, plan_)[0].state is RolloutState.COMPLETED


def test_a_cut_off_node_mid_switch_of_a_transitional_phase_1_halts_it() -> None:
    """Review of s50 H1: a transitional phase 1 whose last node is cut off mid-switch, the
    others dual, went on to ``awaiting_finalize`` (``nodes_dual``), the failure passed
    silently: it halts, as any failure over the budget halts it."""
    running, records = _running(Change.ENABLE_TLS, ["a", "b"], strategy=Strategy.TRANSITIONAL)
    for state in (NodeState.SWITCHING, NodeState.CONFIRMING):
        nodes = tuple(
            replace(r, state=state) if r.name == "b" else replace(r, state=NodeState.DUAL)
            for r in records
        )
        plan_ = next_actions(running, nodes, cut_off={"b"})
        assert plan_.rollout_events == (
            RolloutEvent.FAILURE_BUDGET_EXCEEDED,
            RolloutEvent.NODES_SETTLED,
        ), (state, plan_.rollout_events)
        after, _moved = apply_plan(running, nodes, plan_)
        assert after.state is RolloutState.HALTED, after


@pytest.mark.parametrize("change", [Change.ENABLE_TLS, Change.DISABLE_TLS, Change.FINALIZE])
@pytest.mark.parametrize("rollout_state", [RolloutState.RUNNING, RolloutState.HALTING])
def test_a_cut_off_node_whose_switch_was_never_sent_is_skipped_not_failed(
    change: Change, rollout_state: RolloutState
) -> None:
    """Review of s50 L1: a switching node whose Switch the engine held at the scope freeze's
    gate and never sent (``unsent``), then cut off, was marked needs attention ("revoked
    during its switch"): nothing was sent, so it is a node before its switch, skipped with
    ``cut_off_reason`` as a staged one is (the change halting as for a staged one)."""
    from leader.rollout_core import cut_off_halts, cut_off_reason

    running, records = _running(change, ["a", "b", "c"], freeze=FreezeMode.SCOPE)
    rollout = replace(running, state=rollout_state)
    nodes = tuple(
        replace(r, state=NodeState.SWITCHING) if r.name == "b"
        else replace(r, state=NodeState.DONE) if r.name == "a"
        else r
        for r in records
    )  # fmt: skip
    plan_ = next_actions(rollout, nodes, cut_off={"b"}, unsent={"b"})
    b_events = [(a.event, a.reason) for a in plan_.node_events if a.node == "b"]
    assert b_events == [(NodeEvent.SKIP_UNSENT, cut_off_reason(change, "b"))], b_events
    halts = cut_off_halts(change) and rollout_state is RolloutState.RUNNING
    assert (RolloutEvent.NODE_CUT_OFF in plan_.rollout_events) is halts, plan_.rollout_events
    assert RolloutEvent.FAILURE_BUDGET_EXCEEDED not in plan_.rollout_events
    _after, moved = apply_plan(rollout, nodes, plan_)
    assert {r.name: r.state for r in moved}["b"] is NodeState.SKIPPED


def test_a_cut_off_node_is_never_frozen_nor_holds_a_switch() -> None:
    """s50: under ``--freeze scope`` every node not failed or skipped is frozen before the
    first switch, a node done too; a cut-off one would be asked (its agent dialled) for good
    and hold every switch. It is not frozen, and its lapse holds nothing."""
    running, records = _running(Change.ENABLE_TLS, ["a", "b", "c"], freeze=FreezeMode.SCOPE)
    nodes = tuple(
        replace(r, state=NodeState.DONE) if r.name == "b"
        else replace(r, state=NodeState.STAGED)
        for r in records
    )  # fmt: skip
    plan_ = next_actions(running, nodes, cut_off={"b"})
    frozen = {s.node for s in plan_.steps if s.step is Step.FREEZE}
    assert frozen == {"a", "c"}, plan_.steps
    # Frozen: a and c confirmed, b's lapse (never renewed) holds no switch.
    nodes = tuple(replace(r, scope_frozen=True) for r in nodes)
    go = next_actions(running, nodes, cut_off={"b"}, lapsed={"b"})
    assert set(go.nodes_with_event(NodeEvent.SWITCH)) == {"a", "c"}, go
    assert not [s for s in go.steps if s.node == "b"], go.steps


def test_a_start_is_refused_only_for_the_blocked_nodes_it_would_preflight_at_once() -> None:
    """Brief s67 engine (a): a start whose first node its agent's checks block (a template
    missing) was accepted and halted at once at that preflight. Refused now: a node blocked
    among the first --max-parallel stepped ones and the ``prepare_ahead`` after them (review
    s67 rev2 M3: those are preflighted in the plan that begins the first switch), more of them
    than the failure budget takes; not one further on, which may be fixed while those before
    it switch."""
    ok, port = "", "blocked: port 8443 taken"
    tmpl = "blocked: cannot read template /t: No such file or directory; fix [server].template"

    def at_once(
        stepped: list[tuple[str, str]], most: int, budget: int, ahead: int = 0
    ) -> dict[str, str]:
        return blocked_at_once(stepped, most, budget, prepare_ahead=ahead)

    assert at_once([("a", tmpl), ("b", ok)], 1, 0) == {"a": tmpl}
    assert at_once([("a", ok), ("b", tmpl)], 1, 0) == {}  # b: fixed meanwhile, maybe
    assert at_once([("a", ok), ("b", tmpl)], 2, 0) == {"b": tmpl}  # both at once
    assert at_once([("a", ok), ("b", tmpl)], 0, 0) == {}  # (0 steps one at a time)
    assert at_once([("a", tmpl), ("b", ok)], 2, 1) == {}  # the budget takes one
    assert at_once([("a", tmpl), ("b", port)], 2, 1) == {"a": tmpl, "b": port}
    assert at_once([], 1, 0) == {}
    # Prepared ahead (the default 1): b is preflighted while a switches, c once a is done.
    three = [("a", ok), ("b", tmpl), ("c", port)]
    assert at_once(three, 1, 0, ahead=1) == {"b": tmpl}
    assert at_once(three, 0, 0, ahead=1) == {"b": tmpl}
    assert at_once([("a", ok), ("b", ok), ("c", port)], 1, 0, ahead=1) == {}  # c: later
    assert at_once(three, 1, 0, ahead=2) == {"b": tmpl, "c": port}
    assert at_once(three, 1, 1, ahead=2) == {"b": tmpl, "c": port}  # two: past the budget
    assert at_once(three, 1, 1, ahead=1) == {}  # the budget takes b
    one = BlockedAtOnce(Change.ENABLE_TLS, {"a": tmpl})
    assert str(one) == (
        "enable-tls cannot start: its first step would fail at once on a (cannot read template"
        " /t: No such file or directory; fix [server].template): fix that, or leave it out"
        " (--nodes); nothing was changed"
    )
    assert one.names == ("a",) and isinstance(one, PlanError)
    two = BlockedAtOnce(Change.ROTATE_CERT, {"a": tmpl, "b": port})
    assert ", b (port 8443 taken): fix that, or leave them out (--nodes)" in str(two)
    # A retry has no --nodes (brief s67 engine2 (7)): run again once fixed, or start anew.
    again = BlockedAtOnce(Change.ENABLE_TLS, {"a": tmpl}, retry_of="r1", others=["b", "c"])
    assert str(again).endswith(
        "[server].template): fix that, then run tlsroll rollout retry r1 again; or start "
        "enable-tls anew without it: tlsroll rollout start --change enable-tls --nodes b,c; "
        "nothing was changed"
    ), again
    alone = BlockedAtOnce(Change.ROTATE_CERT, {"a": tmpl, "b": port}, retry_of="r1")
    assert str(alone).endswith(
        "(port 8443 taken): fix that, then run tlsroll rollout retry r1 again; nothing was changed"
    ), alone


def test_a_driver_s_words_after_words_that_name_the_server_name_it_once() -> None:
    """Session 68's README walk: a plan with a managed server down read "(srv3: the managed
    server: managed server not answering …)": the driver's error ("managed server not
    answering on …") after the leader's "the managed server: " (and the agent's preflight's
    "managed server not healthy: ") is taken without its own "managed server "."""
    from leader.observe import observation
    from tlsroll import pki
    from tlsroll.enums import of_server
    from tlsroll.v1 import agent_pb2

    assert of_server("managed server not answering on /run/x.sock: refused") == (
        "not answering on /run/x.sock: refused"
    )
    assert of_server("the managed server did not start") == "did not start"
    assert of_server("managed server ") == "managed server "  # nothing after it: as it is
    assert of_server("status command printed no JSON") == "status command printed no JSON"
    view = agent_pb2.ServerView(healthy=False, detail="managed server not answering on /x: 111")
    seen = observation(view, pki.CertificateAuthority.create().cert)
    assert seen.error == "the managed server: not answering on /x: 111"
    # The plan's sentence names the server, and an agent that did not answer, once.
    observed = {
        "a": seen,
        "b": NodeObservation(False, "agent b: failed to connect to all addresses"),
        "c": NodeObservation(False, "connection refused"),
    }
    with pytest.raises(Unreachable) as info:
        plan_rollout(
            rollout_id="r5",
            change=Change.ENABLE_TLS,
            scope=Scope.cluster(),
            enrolled={"a": True, "b": True, "c": True},
            leader="a",
            epoch=1,
            observed=observed,
        )
    assert str(info.value) == (
        "cannot ask the agent of b, c what it runs (b: failed to connect to all addresses, "
        "c: connection refused); bring the agent up or leave the node out (--nodes); cannot "
        "tell what a runs: its agent answers, its managed server does not (a: not answering "
        "on /x: 111); start the server or leave the node out (--nodes)"
    )


async def test_an_earlier_agent_s_preflight_problem_names_the_server_once() -> None:
    """Session 68: an agent of an earlier release words its preflight problem "managed server
    not healthy: managed server not answering …"; the leader cleaned the heartbeat's view of
    the server (``of_server``) but not the problems: the plan (``observe``) and the rollout's
    preflight showed the server named twice. Both name it once now; other problems as sent."""
    import types

    from leader.changes import EnableTls
    from leader.observe import observe
    from leader.rollout_core import NodeEvent
    from tlsroll import pki
    from tlsroll.enums import problem_of_server
    from tlsroll.v1 import agent_pb2

    doubled = "managed server not healthy: managed server not answering on /x: 111"
    once = "managed server not healthy: not answering on /x: 111"
    skew = "clock differs from the leader's by +600s (limit 120s); fix NTP"
    assert problem_of_server(doubled) == once
    assert problem_of_server(once) == once  # a current agent's: as it is
    assert problem_of_server(skew) == skew
    assert problem_of_server("managed server not healthy: managed server ") == (
        "managed server not healthy: managed server "  # nothing after it: as it is
    )
    view = agent_pb2.ServerView(driver="old", healthy=True, schemes=["http"])
    reply = agent_pb2.PreflightResponse(ok=False, server=view, problems=[doubled, skew])

    class OldAgent:  # an earlier release's agent, as the pool hands it out
        async def get(self, name: str) -> OldAgent:
            return self

        async def check(self, request: object, timeout: float = 0) -> agent_pb2.PreflightResponse:
            return reply

        async def preflight(self, request: object) -> agent_pb2.PreflightResponse:
            return reply

    ca = pki.CertificateAuthority.create()
    seen = await observe(OldAgent(), ["old"], ca.cert)  # type: ignore[arg-type]
    assert seen["old"].problems == (once, skew), seen
    # The rollout's preflight, which fails with the problems before it asks anything else.

    async def detail(**changes: object) -> None:
        return None

    ctx = types.SimpleNamespace(
        facts=types.SimpleNamespace(own_ca=None),
        command=agent_pb2.Command,
        clock=lambda: dt.datetime.now(dt.UTC),
        agent=OldAgent(),
        detail=detail,
    )
    outcome = await EnableTls().preflight(ctx)  # type: ignore[arg-type]
    assert outcome == (NodeEvent.PREFLIGHT_FAILED, f"{once}; {skew}")


def test_a_drain_unfreezes_the_scope_when_every_node_in_flight_is_unanswered() -> None:
    """Review s69 revfreeze M1: an aborted (or halted) ``--freeze scope`` rollout unfroze the
    scope only once every node had settled; a node whose machine died mid-switch never does,
    and every other node refused entries for good. Once every node in flight is one whose
    agent has not confirmed its freeze for a renewal period (``unanswered``), the nodes not in
    flight are unfrozen; never while the rollout runs, nor for a node merely ``lapsed``."""
    rollout, records = plan_rollout(
        rollout_id="r1", change=Change.ENABLE_TLS, scope=Scope.of_nodes(["a", "b", "c"]),
        enrolled={"a": True, "b": True, "c": True}, leader="c", epoch=2,
        freeze=FreezeMode.SCOPE,
    )  # fmt: skip
    running = rollout.with_event(RolloutEvent.START)
    where = {"a": NodeState.SWITCHING, "b": NodeState.DONE, "c": NodeState.SKIPPED}
    nodes = tuple(replace(r, state=where[r.name], scope_frozen=True) for r in records)
    everyone = {"a", "b", "c"}
    for state in (RolloutState.ABORTING, RolloutState.HALTING):
        draining = replace(running, state=state)
        plan = next_actions(draining, nodes, lapsed=everyone, unanswered={"a"})
        assert plan.nodes_with_step(Step.UNFREEZE) == ("b", "c"), plan
        assert "a" not in plan.nodes_with_step(Step.FREEZE)
        plan = next_actions(draining, nodes, lapsed=everyone)  # (a leader just restarted)
        assert not plan.nodes_with_step(Step.UNFREEZE), plan
    plan = next_actions(running, nodes, lapsed=everyone, unanswered={"a"})
    assert not plan.nodes_with_step(Step.UNFREEZE), plan
    two = tuple(replace(r, state=NodeState.SWITCHING) if r.name == "b" else r for r in nodes)
    draining = replace(running, state=RolloutState.ABORTING)
    plan = next_actions(draining, two, lapsed=everyone, unanswered={"a"})  # b still answers
    assert not plan.nodes_with_step(Step.UNFREEZE), plan


def test_a_named_way_back_takes_back_what_its_rollout_or_its_retries_reached() -> None:
    """``reached_nodes``: done, dual, needs attention, switching and confirming nodes of the
    rollout and its retries, in their order; never one it skipped as already done, never
    reached (pending, staged), failed before any change (its preflight, its stage, its switch
    refused by its agent: session 71, reenrol) or took back itself (rolled back)."""
    N = NodeState
    target, records = _stored(
        "e1",
        Change.ENABLE_TLS,
        {"a": N.DONE, "b": N.SKIPPED, "c": N.FAILED, "d": N.PENDING, "e": N.ROLLED_BACK},
    )
    retry = _stored("e2", Change.ENABLE_TLS, {"d": N.DONE, "f": N.NEEDS_ATTENTION, "g": N.STAGED})
    assert reached_nodes(target, records, []) == ("a",)
    assert reached_nodes(target, records, [retry]) == ("a", "d", "f")
