"""The rollout and node state machines, driven directly: one test per table row, every
illegal (state, event) pair, and short stories asserting the whole record after each event."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from leader.rollout_core import (
    ADMIN_ROLLOUT_EVENTS,
    FAILED_NODE_STATES,
    IN_FLIGHT_NODE_STATES,
    LINKED_ROLLOUT_EVENTS,
    NODE_TRANSITIONS,
    PLANNER_NODE_EVENTS,
    RESULT_NODE_EVENTS,
    ROLLOUT_TRANSITIONS,
    STEP_FOR_STATE,
    TAKEN_BACK_FROM,
    TERMINAL_NODE_STATES,
    TERMINAL_ROLLOUT_STATES,
    WAITING_ROLLOUT_STATES,
    Change,
    Held,
    IllegalTransition,
    NodeEvent,
    NodeRecord,
    NodeState,
    Rollout,
    RolloutAction,
    RolloutEvent,
    RolloutState,
    Scope,
    ScopeKind,
    Step,
    after_refusal,
    cut_off_halt,
    cut_off_mid_switch,
    cut_off_reason,
    drained_halt_note,
    halt_note,
    halt_offers_way_back,
    halt_way_out,
    next_command,
    refused_reason,
    way_out,
)
from tlsroll.enums import another_switch, names_another_switch, names_journal_put_back

R, RE, N, NE = RolloutState, RolloutEvent, NodeState, NodeEvent

# The tables, written out once more by hand: a change to a table must change this list too.
ROLLOUT_ROWS = [
    (R.PLANNED, RE.START, R.RUNNING),
    (R.PLANNED, RE.ABORT, R.ABORTING),
    (R.RUNNING, RE.PAUSE, R.PAUSED),
    (R.RUNNING, RE.ABORT, R.ABORTING),
    (R.RUNNING, RE.FAILURE_BUDGET_EXCEEDED, R.HALTING),
    (R.RUNNING, RE.NODE_CUT_OFF, R.HALTING),
    (R.RUNNING, RE.NODES_SETTLED, R.COMPLETED),
    (R.PAUSED, RE.RESUME, R.RUNNING),
    (R.PAUSED, RE.ABORT, R.ABORTING),
    (R.PAUSED, RE.FAILURE_BUDGET_EXCEEDED, R.HALTING),
    (R.PAUSED, RE.NODE_CUT_OFF, R.HALTING),
    (R.PAUSED, RE.NODES_SETTLED, R.COMPLETED),
    (R.ABORTING, RE.NODES_SETTLED, R.ABORTED),
    (R.HALTING, RE.NODES_SETTLED, R.HALTED),
    # The transitional strategy: phase 1 waits once its nodes are dual; a linked finalize (or
    # way back) that completes moves it on.
    (R.RUNNING, RE.NODES_DUAL, R.AWAITING_FINALIZE),
    (R.PAUSED, RE.NODES_DUAL, R.AWAITING_FINALIZE),
    (R.AWAITING_FINALIZE, RE.FINALIZED, R.COMPLETED),
    (R.AWAITING_FINALIZE, RE.TAKEN_BACK, R.ABORTED),
]
NODE_ROWS = [
    (N.PENDING, NE.START, N.PREFLIGHT),
    (N.PENDING, NE.SKIP, N.SKIPPED),
    (N.PREFLIGHT, NE.SKIP, N.SKIPPED),
    (N.STAGING, NE.SKIP, N.SKIPPED),
    (N.PREFLIGHT, NE.PREFLIGHT_PASSED, N.STAGING),
    (N.PREFLIGHT, NE.PREFLIGHT_FAILED, N.FAILED),
    (N.STAGING, NE.STAGE_DONE, N.STAGED),
    (N.STAGING, NE.STAGE_FAILED, N.FAILED),
    (N.STAGING, NE.STAGE_SKIPPED, N.STAGED),
    (N.STAGED, NE.SWITCH, N.SWITCHING),
    (N.STAGED, NE.SKIP, N.SKIPPED),
    (N.SWITCHING, NE.SWITCH_DONE, N.CONFIRMING),
    (N.SWITCHING, NE.SWITCH_ROLLED_BACK, N.ROLLED_BACK),
    (N.SWITCHING, NE.SWITCH_REFUSED, N.FAILED),  # its agent refused to begin: nothing changed
    (N.SWITCHING, NE.SWITCH_FAILED, N.NEEDS_ATTENTION),
    (N.SWITCHING, NE.SKIP_UNSENT, N.SKIPPED),  # draining, its Switch never sent (planner only)
    (N.SWITCHING, NE.SWITCH_HELD, N.PENDING),  # --when-quiet: the agent saw http, nothing began
    (N.CONFIRMING, NE.CONFIRM_DONE, N.DONE),
    (N.CONFIRMING, NE.CONFIRM_ROLLED_BACK, N.ROLLED_BACK),
    (N.CONFIRMING, NE.CONFIRM_FAILED, N.NEEDS_ATTENTION),
    (N.CONFIRMING, NE.CONFIRM_DUAL, N.DUAL),  # transitional phase 1: http and https answer
]

ROLLOUT_ILLEGAL = [
    (s, e)
    for s, e in itertools.product(RolloutState, RolloutEvent)
    if (s, e) not in {(row[0], row[1]) for row in ROLLOUT_ROWS}
]
NODE_ILLEGAL = [
    (s, e)
    for s, e in itertools.product(NodeState, NodeEvent)
    if (s, e) not in {(row[0], row[1]) for row in NODE_ROWS}
]


def a_rollout(state: RolloutState = R.PLANNED) -> Rollout:
    return Rollout(
        id="r1",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        order=("a", "b"),
        epoch=7,
        state=state,
    )


def test_rollout_table_is_exactly_the_rows() -> None:
    table = {(s, e, new) for s, row in ROLLOUT_TRANSITIONS.items() for e, new in row.items()}
    assert table == set(ROLLOUT_ROWS)
    assert set(ROLLOUT_TRANSITIONS) == set(RolloutState)


def test_node_table_is_exactly_the_rows() -> None:
    table = {(s, e, new) for s, row in NODE_TRANSITIONS.items() for e, new in row.items()}
    assert table == set(NODE_ROWS)
    assert set(NODE_TRANSITIONS) == set(NodeState)


@pytest.mark.parametrize(("state", "event", "new"), ROLLOUT_ROWS)
def test_rollout_row(state: RolloutState, event: RolloutEvent, new: RolloutState) -> None:
    before = a_rollout(state)
    after = before.with_event(event)
    assert after == replace(before, state=new)
    assert before.state is state  # the old record is untouched


@pytest.mark.parametrize(("state", "event"), ROLLOUT_ILLEGAL)
def test_rollout_illegal_event(state: RolloutState, event: RolloutEvent) -> None:
    before = a_rollout(state)
    with pytest.raises(IllegalTransition) as caught:
        before.with_event(event)
    assert (caught.value.subject, caught.value.state, caught.value.event) == (
        "rollout r1",
        state,
        event,
    )
    assert str(caught.value) == f"rollout r1: event '{event}' is not allowed in state '{state}'"
    assert before == a_rollout(state)


@pytest.mark.parametrize("change", list(Change))
@pytest.mark.parametrize("action", list(RolloutAction))
@pytest.mark.parametrize("state", list(RolloutState))
def test_an_admin_action_refused_ends_with_the_command_to_run(
    state: RolloutState, action: RolloutAction, change: Change
) -> None:
    before = replace(a_rollout(state), change=change)
    if action.event in ROLLOUT_TRANSITIONS[state]:
        assert before.with_action(action, switched=True) == before.with_event(action.event)
        return
    with pytest.raises(IllegalTransition) as caught:
        before.with_action(action, switched=True)
    hint = next_command(before, action, switched=True)
    assert (caught.value.state, caught.value.event, caught.value.hint) == (
        state,
        action.event,
        hint,
    )
    # Said in the admin's words, not the tables' ("event 'pause' is not allowed in state
    # 'completed'": audit s38 L4).
    words = state.value.replace("_", " ")
    assert str(caught.value) == (f"rollout r1 is {words}: there is nothing to {action}; {hint}")
    assert "event '" not in str(caught.value) and "state '" not in str(caught.value)
    assert "tlsroll " in hint and "\n" not in hint
    takes_back = "tlsroll rollout rollback r1" in hint
    waiting = state is R.AWAITING_FINALIZE
    assert takes_back == (
        (state in TERMINAL_ROLLOUT_STATES and change is Change.ENABLE_TLS) or waiting
    )
    assert ("tlsroll rollout finalize r1" in hint) == waiting
    retries = "tlsroll rollout retry r1" in hint
    assert retries == (state in (RolloutState.HALTED, RolloutState.ABORTED))


def test_pause_of_a_completed_rollout_is_said_plainly() -> None:
    with pytest.raises(IllegalTransition) as caught:
        a_rollout(R.COMPLETED).with_action(RolloutAction.PAUSE, switched=True)
    assert str(caught.value) == (
        "rollout r1 is completed: there is nothing to pause; it has ended: start a new one "
        "(tlsroll rollout start --scope …) or take it back (tlsroll rollout rollback r1)"
    )
    with pytest.raises(IllegalTransition) as caught:
        a_rollout(R.AWAITING_FINALIZE).with_action(RolloutAction.ABORT, switched=True)
    assert str(caught.value).startswith(
        "rollout r1 is awaiting finalize: there is nothing to abort; its nodes serve http and "
        "https: close http with tlsroll rollout finalize r1"
    )


@pytest.mark.parametrize(("state", "event", "new"), NODE_ROWS)
def test_node_row(state: NodeState, event: NodeEvent, new: NodeState) -> None:
    before = NodeRecord("a", state, reason="earlier")
    assert before.with_event(event) == NodeRecord("a", new, reason="earlier")
    assert before.with_event(event, "why") == NodeRecord("a", new, reason="why")
    assert before == NodeRecord("a", state, reason="earlier")


@pytest.mark.parametrize(("state", "event"), NODE_ILLEGAL)
def test_node_illegal_event(state: NodeState, event: NodeEvent) -> None:
    before = NodeRecord("a", state, reason="earlier", scope_frozen=True)
    with pytest.raises(IllegalTransition, match=f"node a: event '{event}'.*'{state}'") as caught:
        before.with_event(event, "ignored")
    assert (caught.value.subject, caught.value.state, caught.value.event) == (
        "node a",
        state,
        event,
    )
    assert before == NodeRecord("a", state, reason="earlier", scope_frozen=True)


def test_a_node_switched_and_confirmed() -> None:
    node = NodeRecord("a")
    for event, expected in [
        (NE.START, NodeRecord("a", N.PREFLIGHT)),
        (NE.PREFLIGHT_PASSED, NodeRecord("a", N.STAGING)),
        (NE.STAGE_DONE, NodeRecord("a", N.STAGED)),
        (NE.SWITCH, NodeRecord("a", N.SWITCHING)),
        (NE.SWITCH_DONE, NodeRecord("a", N.CONFIRMING)),
        (NE.CONFIRM_DONE, NodeRecord("a", N.DONE)),
    ]:
        node = node.with_event(event)
        assert node == expected
    with pytest.raises(IllegalTransition):
        node.with_event(NE.START)
    assert node == NodeRecord("a", N.DONE)


def test_a_node_through_transitional_phase_1_ends_dual_and_stays() -> None:
    node = NodeRecord("a")
    for event in (NE.START, NE.PREFLIGHT_PASSED, NE.STAGE_DONE, NE.SWITCH, NE.SWITCH_DONE):
        node = node.with_event(event)
    node = node.with_event(NE.CONFIRM_DUAL)
    assert node == NodeRecord("a", N.DUAL)
    # Dual is the end of phase 1 for this record: no event moves it (not even a confirm), so
    # nothing inside this rollout takes it to https-only; a linked finalize rollout does.
    for event in NodeEvent:
        with pytest.raises(IllegalTransition):
            node.with_event(event)


def test_a_transitional_rollout_waits_then_is_finalized_or_taken_back() -> None:
    rollout = a_rollout().with_event(RE.START).with_event(RE.NODES_DUAL)
    assert rollout == a_rollout(R.AWAITING_FINALIZE)
    assert rollout.with_event(RE.FINALIZED) == a_rollout(R.COMPLETED)
    assert rollout.with_event(RE.TAKEN_BACK) == a_rollout(R.ABORTED)
    # While it waits, the admin's actions are refused with the two ways on.
    for action in RolloutAction:
        with pytest.raises(IllegalTransition, match=r"rollout finalize r1.*rollout rollback r1"):
            rollout.with_action(action, switched=True)


def test_a_node_rolled_back_by_the_agent_keeps_the_reason() -> None:
    node = NodeRecord("a", N.SWITCHING)
    node = node.with_event(NE.SWITCH_ROLLED_BACK, "verify: 8080 still open")
    assert node == NodeRecord("a", N.ROLLED_BACK, reason="verify: 8080 still open")


def test_a_switch_its_agent_refused_fails_the_node_saying_nothing_changed() -> None:
    """Session 71, reenrol: a switch (or the way back) its agent refused before it began (its
    plan found the node not ready: ``PlanRefused``) leaves the node ``failed``, with the
    agent's line and that nothing on the node was changed; it showed ``rolled_back``, which
    says something happened and was undone. It counts against the failure budget (the
    rollout halts at it) and is left to ``rollout retry``, never to a named way back."""
    said = "the server serves https on port 8443, but this agent holds no https files"
    node = NodeRecord("a", N.SWITCHING).with_event(
        NE.SWITCH_REFUSED, refused_reason("switch", said)
    )
    assert node.state is N.FAILED and node.state in FAILED_NODE_STATES
    assert node.reason == f"switch refused: {said}; nothing on the node was changed"
    assert node.state not in TAKEN_BACK_FROM
    # The agent's line that says so already is not said twice.
    gone = "the files its way back restores are gone; nothing was changed (FAILED_PRECONDITION)"
    assert refused_reason("going back to http", gone) == f"going back to http refused: {gone}"
    assert refused_reason("switch", "not ready; ") == (
        "switch refused: not ready; nothing on the node was changed"
    )


REFUSED_LINE = "stale epoch 3: this node has seen epoch 4 (FAILED_PRECONDITION)"
DENIED = "the caller is not this node's leader (PERMISSION_DENIED)"


@pytest.mark.parametrize(
    ("held", "event", "state", "said"),
    [
        # None held: refused before anything began, and the reason says so.
        (Held.NONE, NE.SWITCH_REFUSED, N.FAILED, "; nothing on the node was changed"),
        # Another switch under the id (a finalize under the phase-1 id): this one did not
        # begin, but the node may have been changed: never "nothing changed", and needs
        # attention (session 72: it was failed, "back where it was").
        (Held.OTHER, NE.SWITCH_FAILED, N.NEEDS_ATTENTION, "did not begin: the agent holds"),
        # The question refused too: not known, so the node needs attention (a named way back
        # takes it), and the reason says what is known.
        (Held.UNANSWERED, NE.SWITCH_FAILED, N.NEEDS_ATTENTION, f"refused to say too ({DENIED})"),
        # The question failed each time asked (review s72 refused, L4): not known either.
        (Held.FAILED, NE.SWITCH_FAILED, N.NEEDS_ATTENTION, f"each time asked ({DENIED})"),
    ],
)
def test_a_refusal_says_nothing_changed_only_when_the_agent_holds_nothing(
    held: Held, event: NodeEvent, state: NodeState, said: str
) -> None:
    """Review s71 revplans, M: a refusal answered to a step that runs again (a stale epoch
    after the store was restored, a leader identity the agent no longer trusts, an older
    agent's "needs the admin") does not prove that nothing began. The node is failed with
    "nothing on the node was changed" only if the agent, asked, holds no transaction of the
    step; one it holds (``Held.THIS``) is followed (None: no outcome from the refusal)."""
    assert after_refusal("switch", REFUSED_LINE, Held.THIS) is None
    assert after_refusal("going back to http", REFUSED_LINE, Held.THIS, DENIED) is None
    for what in ("switch", "going back to http"):
        found = after_refusal(what, REFUSED_LINE + "; ", held, DENIED)
        assert found is not None
        assert found[0] is event
        assert found[1].startswith(f"{what} refused: {REFUSED_LINE}; "), found
        assert said in found[1], found
        assert ("nothing on the node was changed" in found[1]) is (held is Held.NONE), found
        assert NodeRecord("a", N.SWITCHING).with_event(*found).state is state


FAILED_LINE = "internal error (see the agent's log) (INTERNAL)"


@pytest.mark.parametrize(
    ("held", "event", "state", "said"),
    [
        (Held.NONE, NE.SWITCH_REFUSED, N.FAILED, f"{FAILED_LINE}; nothing on the node was"),
        (Held.OTHER, NE.SWITCH_FAILED, N.NEEDS_ATTENTION, "did not begin: the agent holds"),
        (Held.UNANSWERED, NE.SWITCH_FAILED, N.NEEDS_ATTENTION, "whether it began is not known"),
        (Held.FAILED, NE.SWITCH_FAILED, N.NEEDS_ATTENTION, "the agent failed to say too"),
    ],
)
def test_a_failure_that_is_no_refusal_is_decided_by_what_the_agent_holds(
    held: Held, event: NodeEvent, state: NodeState, said: str
) -> None:
    """Session 72: an agent's answer that is no refusal (INTERNAL, UNKNOWN, ...) to a way
    back was recorded rolled_back, "going back to http refused". It says nothing of whether
    the call began the step: what the agent holds decides, as for a refusal, and the reason
    says "failed"; one it holds (this call's) is followed."""
    what = "going back to http"
    assert after_refusal(what, FAILED_LINE, Held.THIS, refused=False) is None
    found = after_refusal(what, FAILED_LINE, held, DENIED, refused=False)
    assert found is not None
    assert found[0] is event
    assert found[1].startswith(f"{what} failed: {FAILED_LINE}"), found
    assert said in found[1], found
    assert "refused:" not in found[1], found
    assert ("nothing on the node was changed" in found[1]) is (held is Held.NONE), found
    assert NodeRecord("a", N.SWITCHING).with_event(*found).state is state


PUT_BACK_LINE = (
    "needs the admin: journal put back mid-switch of rollout r1: not settled by what the server"
    " runs; check it, then run the agent once with --journal-checked (FAILED_PRECONDITION)"
)


def test_a_refusal_of_a_journal_put_back_holding_none_needs_attention() -> None:
    """Review s72 refused, L5: the refusal of an agent whose journal was put back from a copy
    (its words as the agent writes them, in this release and earlier ones), none held: the
    copy may be older than a try that began the step, so "none" proves nothing: needs
    attention, never "nothing on the node was changed". The "needs the admin" of a journal
    that cannot be written (a transaction held on a full disk) lost nothing: failed, as any
    refusal with none held."""
    assert names_journal_put_back(PUT_BACK_LINE)
    for what in ("switch", "going back to http"):
        found = after_refusal(what, PUT_BACK_LINE, Held.NONE)
        assert found is not None
        assert found[0] is NE.SWITCH_FAILED, found
        assert found[1].startswith(f"{what} refused: {PUT_BACK_LINE}; "), found
        assert "nothing on the node was changed" not in found[1], found
        assert "journal was put back from a copy" in found[1], found
        assert NodeRecord("a", N.SWITCHING).with_event(*found).state is N.NEEDS_ATTENTION
        assert after_refusal(what, PUT_BACK_LINE, Held.THIS) is None
    held = "needs the admin: its journal cannot be written (disk full): free space (FAILED_PRE"
    assert not names_journal_put_back(held)
    found = after_refusal("switch", held, Held.NONE)
    assert found is not None and found[0] is NE.SWITCH_REFUSED, found
    assert found[1].endswith("; nothing on the node was changed"), found
    # Words that only mention a journal put back, not as the agent's reason, are not it.
    assert not names_journal_put_back("stale epoch 2: journal put back mid-switch")


def test_another_switch_is_told_by_one_shared_text() -> None:
    """Session 72: the agent's refusal and the leader's test share ``tlsroll.enums``' text;
    an agent of an earlier release (its words, as it wrote them) is told the same way."""
    said = another_switch("r1", "enable-dual", "finalize")
    assert names_another_switch(f"{said} (FAILED_PRECONDITION)")
    older = (
        "rollout id r1 already names another switch on this node (enable-dual); finalize "
        "needs a rollout id of its own (FAILED_PRECONDITION)"
    )
    assert f"{said} (FAILED_PRECONDITION)" == older
    assert names_another_switch(older)
    assert not names_another_switch("rollout r1 is already switching this node")


def test_a_rollout_paused_resumed_and_aborted() -> None:
    rollout = a_rollout()
    for event, state in [
        (RE.START, R.RUNNING),
        (RE.PAUSE, R.PAUSED),
        (RE.RESUME, R.RUNNING),
        (RE.ABORT, R.ABORTING),
        (RE.NODES_SETTLED, R.ABORTED),
    ]:
        rollout = rollout.with_event(event)
        assert rollout == a_rollout(state)


def test_event_groups() -> None:
    assert {RE.START, RE.PAUSE, RE.RESUME, RE.ABORT} == ADMIN_ROLLOUT_EVENTS
    assert {NE.START, NE.SWITCH, NE.SKIP, NE.STAGE_SKIPPED, NE.SKIP_UNSENT} == PLANNER_NODE_EVENTS
    assert set(NodeEvent) == PLANNER_NODE_EVENTS | RESULT_NODE_EVENTS
    assert not PLANNER_NODE_EVENTS & RESULT_NODE_EVENTS


def test_state_groups() -> None:
    assert {N.PREFLIGHT, N.STAGING, N.STAGED, N.SWITCHING, N.CONFIRMING} == IN_FLIGHT_NODE_STATES
    assert {
        N.DONE,
        N.DUAL,
        N.FAILED,
        N.ROLLED_BACK,
        N.SKIPPED,
        N.NEEDS_ATTENTION,
    } == TERMINAL_NODE_STATES
    assert {N.FAILED, N.ROLLED_BACK, N.NEEDS_ATTENTION} == FAILED_NODE_STATES
    assert {R.COMPLETED, R.HALTED, R.ABORTED} == TERMINAL_ROLLOUT_STATES
    assert {R.AWAITING_FINALIZE} == WAITING_ROLLOUT_STATES
    assert {RE.FINALIZED, RE.TAKEN_BACK} == LINKED_ROLLOUT_EVENTS
    # Terminal states have no way out; every other state has one.
    assert {s for s, row in NODE_TRANSITIONS.items() if not row} == TERMINAL_NODE_STATES
    assert {s for s, row in ROLLOUT_TRANSITIONS.items() if not row} == TERMINAL_ROLLOUT_STATES
    assert STEP_FOR_STATE == {
        N.PREFLIGHT: Step.PREFLIGHT,
        N.STAGING: Step.STAGE,
        N.SWITCHING: Step.SWITCH,
        N.CONFIRMING: Step.CONFIRM,
    }
    # Every result event belongs to exactly one working state.
    for event in RESULT_NODE_EVENTS:
        states = [s for s, row in NODE_TRANSITIONS.items() if event in row]
        assert len(states) == 1
        assert states[0] in STEP_FOR_STATE


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_parallel": 0}, "max_parallel must be at least 1"),
        ({"failure_budget": -1}, "failure_budget must be 0 or more"),
        ({"epoch": -1}, "epoch must be 0 or more"),
        ({"order": ()}, "order must name each node once"),
        ({"order": ("a", "a")}, "order must name each node once"),
    ],
)
def test_rollout_record_rejects_bad_settings(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(a_rollout(), **changes)


def test_scope() -> None:
    assert Scope.local() == Scope(ScopeKind.LOCAL)
    assert Scope.cluster() == Scope(ScopeKind.CLUSTER)
    assert Scope.of_nodes(["b", "a"]) == Scope(ScopeKind.NODES, ("b", "a"))
    with pytest.raises(ValueError, match="node list"):
        Scope.of_nodes([])
    with pytest.raises(ValueError, match="node list"):
        Scope(ScopeKind.CLUSTER, ("a",))


def test_a_halted_way_back_names_the_way_out_for_each_failed_node() -> None:
    """Review s45rev9 M2: a halted disable-tls names what to do with the nodes that failed it
    (a retry would fail them again); any other change keeps ``way_out``."""
    back = replace(a_rollout(R.HALTING), change=Change.DISABLE_TLS)
    assert halt_way_out(back, ["a", "b"], switched=True) == (
        "a, b: stop each one's agent (systemctl stop tlsroll-agent on that node) so that the "
        "next way back leaves that node as is, or fix what failed that node (a port held: free "
        "it); then tlsroll rollout rollback again"
    )
    switch = a_rollout(R.HALTING)
    assert halt_way_out(switch, ["a"], switched=True) == way_out(switch, switched=True)


def test_a_halted_way_back_says_to_remove_a_cut_off_node_not_to_stop_its_agent() -> None:
    """Review of s50 M2: a node of the way back cut off mid-switch (needs attention) halts it;
    the note said to stop its agent or fix it and roll back again, pointless for a machine
    lost or stolen: its removal is the way on. The others keep their advice."""
    back = replace(a_rollout(R.HALTING), change=Change.DISABLE_TLS)
    assert halt_way_out(back, ["b"], frozenset({"b"}), switched=True) == (
        "b: agent cut off (its certificate revoked), it never comes back: "
        "`tlsroll nodes remove b`; then tlsroll rollout rollback again"
    )
    mixed = halt_way_out(back, ["a", "b", "c"], frozenset({"b", "c"}), switched=True)
    assert mixed == (
        "a: stop its agent (systemctl stop tlsroll-agent on it) so that the next way back "
        "leaves it as is, or fix what failed it (a port held: free it); b, c: agent cut off "
        "(its certificate revoked), it never comes back: `tlsroll nodes remove NAME` for "
        "each; then tlsroll rollout rollback again"
    )
    # Any other change (review rev50e M2): its retry refuses a node still cut off, so the
    # removal comes first; a finalize's retry leaves the node out by itself.
    switch = a_rollout(R.HALTING)
    assert switch.change is Change.ENABLE_TLS
    assert halt_way_out(switch, ["b"], frozenset({"b"}), switched=True) == (
        f"b: agent cut off (its certificate revoked): `tlsroll nodes remove b`, then "
        f"{way_out(switch, switched=True)}"
    )
    assert halt_way_out(switch, ["a"], frozenset({"b"}), switched=True) == way_out(
        switch, switched=True
    )
    assert halt_way_out(switch, iter(["b", "c"]), frozenset({"b", "c"}), switched=True).startswith(
        "b, c: agent cut off (its certificate revoked): `tlsroll nodes remove NAME` for each"
    )
    final = replace(switch, change=Change.FINALIZE)
    assert halt_way_out(final, ["b"], frozenset({"b"}), switched=True) == way_out(
        final, switched=True
    )


def test_a_halt_names_the_failed_nodes_and_those_cut_off_before_their_switches() -> None:
    """Review rev50e L: a pass that halts names the nodes failed and the nodes cut off before
    their switches, whichever event halted it (one side went unnamed); without a failed node
    the note is the cut-off halt's; a finalize's or a way back's cut-off node (left out, left
    as is) is no part of a halt."""
    switch = a_rollout(R.HALTING)
    lost = NodeRecord("b", N.NEEDS_ATTENTION, "cut off: during its switch")
    failed = NodeRecord("a", N.ROLLED_BACK, "verify: port 8443 closed")
    assert halt_note(switch, [], ["c"], frozenset({"c"}), switched=True) == cut_off_halt(
        switch, ["c"]
    )
    assert halt_note(switch, [failed], ["c"], frozenset({"c"}), switched=True) == (
        "halted: a rolled_back: verify: port 8443 closed; agent cut off (its certificate"
        " revoked) before its switch: c; next: c: agent cut off (its certificate revoked):"
        f" `tlsroll nodes remove c`, then {way_out(switch, switched=True)}"
    )
    assert halt_note(
        switch, [failed, lost], ["d", "c"], frozenset({"b", "c", "d"}), switched=True
    ) == (
        "halted: a rolled_back: verify: port 8443 closed; b needs_attention: cut off: during"
        " its switch; agent cut off (its certificate revoked) before its switch: c, d; next:"
        " b, c, d: agent cut off (its certificate revoked): `tlsroll nodes remove NAME` for"
        f" each, then {way_out(switch, switched=True)}"
    )
    # No node cut off: the failure halt's note as it was.
    assert halt_note(switch, [failed], [], switched=True) == (
        f"halted: a rolled_back: verify: port 8443 closed; next: {way_out(switch, switched=True)}"
    )
    back = replace(switch, change=Change.DISABLE_TLS)
    assert halt_note(back, [failed], ["c"], frozenset({"c"}), switched=True) == (
        "halted: a rolled_back: verify: port 8443 closed; next: "
        + halt_way_out(back, ["a"], switched=True)
    )
    final = replace(switch, change=Change.FINALIZE)
    assert "before its switch" not in halt_note(
        final, [failed], ["c"], frozenset({"c"}), switched=True
    )


@pytest.mark.parametrize("change", list(Change))
@pytest.mark.parametrize("switched", [True, False])
@pytest.mark.parametrize("cut", [(), ("c",)])
@pytest.mark.parametrize("failed", [True, False])
def test_whether_a_halt_note_offers_the_way_back_is_known_without_its_words(
    change: Change, switched: bool, cut: tuple[str, ...], failed: bool
) -> None:
    """Session 64: the fact the engine stores with a halt's note (``halt_offers_way_back``),
    by which it makes the note again as the halt ends, is what the note says: it offers the
    way back exactly when it ends offering `tlsroll rollout rollback` (the engine read that
    from the words)."""
    rollout = replace(a_rollout(R.HALTING), change=change)
    records = [NodeRecord("a", N.ROLLED_BACK, "verify: port 8443 closed")] if failed else []
    if not records and not cut:
        return  # (a halt names a failed node or one cut off)
    note = halt_note(rollout, records, cut, frozenset(cut), switched=switched)
    words = f" or go back to http: tlsroll rollout rollback {rollout.id}"
    assert halt_offers_way_back(rollout, failed, switched=switched) is note.endswith(words)
    assert words not in note.removesuffix(words)


def test_a_node_cut_off_while_the_halt_drains_is_named_as_at_the_halt() -> None:
    """Review rev51b L4: a node cut off (its agent's certificate revoked) after the halt was
    decided, while the switches in flight end, was named by no note (made at the halt). The
    note made again from the records names it as a halt names it: failed (cut off mid-switch)
    or cut off before its switch, beside those the halt named, with `tlsroll nodes remove`
    before the retry. Other nodes' states (done, skipped by the halt, in flight) say nothing."""
    switch = a_rollout(R.HALTING)
    failed = NodeRecord("a", N.ROLLED_BACK, "verify: port 8443 closed")
    done = NodeRecord("b", N.DONE)
    halted = NodeRecord("e", N.SKIPPED, "rollout halted")
    mid = NodeRecord("c", N.NEEDS_ATTENTION, cut_off_mid_switch("c"))
    before = NodeRecord("d", N.SKIPPED, cut_off_reason(Change.ENABLE_TLS, "d"))
    going = NodeRecord("f", N.SWITCHING)
    # Nothing cut off: the halt's note as it was made.
    assert drained_halt_note(switch, [failed, done, halted, going], switched=True) == halt_note(
        switch, [failed], [], switched=True
    )
    assert drained_halt_note(
        switch, [failed, done, mid, halted], frozenset({"c"}), switched=True
    ) == (
        f"halted: a rolled_back: verify: port 8443 closed; c needs_attention: {mid.reason};"
        " next: c: agent cut off (its certificate revoked): `tlsroll nodes remove c`, then"
        f" {way_out(switch, switched=True)}"
    )
    assert drained_halt_note(switch, [failed, before, going], frozenset({"d"}), switched=True) == (
        "halted: a rolled_back: verify: port 8443 closed; agent cut off (its certificate"
        " revoked) before its switch: d; next: d: agent cut off (its certificate revoked):"
        f" `tlsroll nodes remove d`, then {way_out(switch, switched=True)}"
    )
    # A halt by a cut-off node (no failure), and one more cut off since: both named.
    earlier = NodeRecord("g", N.SKIPPED, cut_off_reason(Change.ENABLE_TLS, "g"))
    assert drained_halt_note(switch, [earlier, before], frozenset({"d", "g"}), switched=True) == (
        cut_off_halt(switch, ["d", "g"])
    )
    # The way back goes on without a node cut off before its switch (left as is): no part
    # of its halt; one cut off mid-switch is, with its removal as the way on.
    back = replace(switch, change=Change.DISABLE_TLS)
    left = NodeRecord("d", N.SKIPPED, cut_off_reason(Change.DISABLE_TLS, "d"))
    assert drained_halt_note(
        back, [failed, left, mid], frozenset({"c", "d"}), switched=True
    ) == halt_note(back, [failed, mid], [], frozenset({"c", "d"}), switched=True)
    assert "`tlsroll nodes remove c`" in drained_halt_note(
        back, [failed, mid], frozenset({"c"}), switched=True
    )
