"""The pure state machines of a rollout and of each node in it.

Rules
-----
Everything that decides whether a rollout or a node may move from one state to another lives
in this file, in two tables: ``ROLLOUT_TRANSITIONS`` and ``NODE_TRANSITIONS`` (state → event →
new state). An event that has no entry for the current state raises ``IllegalTransition`` and
changes nothing. Records are frozen dataclasses; a transition returns a new record.

Nothing here does I/O: no sockets, no clocks, no disk, no logging. The engine (the imperative
shell) persists records, talks to agents and feeds the results back in as events.

Theory of operation
-------------------
A rollout applies one *change* to the nodes of a *scope*, in a fixed *order* (by name, the
leader node last; see ``leader.planner.plan_rollout``). Each node walks, on the leader's
orders, through these states::

    pending ─start→ preflight ─preflight_passed→ staging ─stage_done→ staged ─switch→ switching
    switching ─switch_done→ confirming ─confirm_done→ done
    preflight/staging ─*_failed→ failed              (nothing was changed on the node)
    switching ─switch_rolled_back→ rolled_back       (the agent rolled its transaction back)
    switching ─switch_refused→ failed                (the agent refused to begin it, and
                                                      holds none begun before: nothing on
                                                      the node was changed: ``after_refusal``)
    confirming ─confirm_rolled_back→ rolled_back     (outside check failed; agent rolled back)
    switching ─switch_failed→ needs_attention        (even the agent's way back failed)
    confirming ─confirm_failed→ needs_attention      (outside check failed, and so did the
                                                      rollback)
    confirming ─confirm_dual→ dual                   (transitional phase 1: http and https)
    pending/staged ─skip→ skipped                    (rollout halting or aborting)
    preflight/staging ─skip→ skipped                 (rollout aborting: nothing was changed)
    staging ─stage_skipped→ staged                   (the change stages no certificate)
    switching ─skip_unsent→ skipped                  (rollout halting or aborting, or the
                                                      node cut off, and the agent has no
                                                      switch of it: never sent)
    pending…staged ─skip→ skipped                    (its agent cut off: ``cut_off_reason``)
    switching ─switch_failed→ needs_attention        (its agent cut off after its switch was
    confirming ─confirm_failed→ needs_attention       sent: ``cut_off_mid_switch``)

Two kinds of node state:

* *gates* (``pending``, ``staged``): the node waits for the planner. Only the planner emits the
  gate events ``start``, ``switch`` and ``skip`` — that is where ``max_parallel``, pause, halt,
  abort and the scope freeze are enforced. It also emits ``stage_skipped`` for a change that
  stages no certificate (``CHANGES``), so no stage step runs for it, and ``skip_unsent`` for a
  ``switching`` node of a draining rollout whose Switch the engine held and its agent never got
  (``planner.next_actions``' ``unsent``: a leader restarted while a scope freeze lapsed), or
  of any rollout once its agent is cut off. A node whose agent is cut off (its certificate
  revoked: ``planner.next_actions``' ``cut_off``) is stepped by the planner alone: ``skip``
  before its switch, and the result events ``switch_failed`` / ``confirm_failed`` after
  it (its outcome is not known: the leader asks the revoked agent nothing more).
* *working* states (``preflight``, ``staging``, ``switching``, ``confirming``): exactly one step
  (``STEP_FOR_STATE``) runs; its outcome comes back from the engine as a *result* event,
  except for a node cut off (above).

``staging`` is not in the issue's list of states; it exists so that every working state has
exactly one step, and a leader that restarts knows which step to run again (steps are
idempotent, keyed by rollout id + node + step).

A node is *in flight* from the moment it leaves ``pending`` until it reaches a terminal state
(``done``, ``dual``, ``failed``, ``rolled_back``, ``needs_attention``, ``skipped``). ``failed``,
``rolled_back`` and ``needs_attention`` count against the failure budget (``failed``: nothing on
the node was changed, ``rolled_back``: changed and undone). ``needs_attention``
is the one outcome in which the node is in no known good state: neither the target verified nor
the source restored; the schema and the CLI show it apart from a clean rollback.

The rollout itself::

    planned ─start→ running ⇄ paused                          (pause / resume)
    planned/running/paused ─abort→ aborting ─nodes_settled→ aborted
    running/paused ─failure_budget_exceeded→ halting ─nodes_settled→ halted
    running/paused ─node_cut_off→ halting            (an agent cut off before its switch;
                                                      not a finalize nor the way back)
    running/paused ─nodes_settled→ completed

``aborting`` and ``halting`` are explicit draining states: no node starts, no node begins a
switch, nodes already switching or confirming finish, and untouched nodes are skipped. Nodes
still preflighting or staging (which changes nothing live on the node) are skipped at once on
an abort, so an abort never waits for an agent that does not answer; on a halt they finish
that step and are then skipped at the ``staged`` gate. ``pause`` only stops new nodes from
starting; nodes in flight go all the way to a terminal state. Admin events are ``start``,
``pause``, ``resume``, ``abort``; ``failure_budget_exceeded``, ``node_cut_off``,
``nodes_settled`` and ``nodes_dual`` are emitted only by the planner, ``finalized`` and
``taken_back`` only by the engine (``leader.planner.awaiting_verdict``).

The transitional strategy (issue 12)
------------------------------------
Phase 1 is an ``enable-tls`` rollout with ``strategy=transitional``: each node goes through the
same safe transaction (freeze only for its restart, atomic config, verify, roll back on
failure), but its target serves https on 8443 *and keeps* http on 8080, so a confirmed node
ends ``dual`` (``confirm_dual``), not ``done``. Once every node has settled, with at least one
``dual`` and no more failures than the budget, the rollout waits in a state of its own::

    running/paused ─nodes_dual→ awaiting_finalize ─finalized→ completed
                                awaiting_finalize ─taken_back→ aborted

``awaiting_finalize`` holds no freeze and runs no step: every node is settled (the planner
unfroze a scope freeze before ``nodes_dual``). Phase 2 is *a linked rollout* of
``Change.FINALIZE`` (``tlsroll rollout finalize``; ``RolloutMeta.finalizes`` names phase 1):
its nodes walk the ordinary path (pending … switching, confirming) with the agent closing
8080, so everything a rollout has — freeze per node, verify, the agent's rollback (which for a
finalize goes back to *dual*), pause, abort, failure budget, retry, leader restarts — works for
phase 2 unchanged, and ``rolled_back`` means "back where the change found it" in both phases.
The way back from dual is the ordinary ``disable-tls`` rollout undoing phase 1 (``rollout
rollback``): its nodes go from dual to http-only. When the linked rollout ends completed with
no failed node, the engine moves phase 1 on: ``finalized`` (→ ``completed``) or ``taken_back``
(→ ``aborted``). Until then phase 1 keeps waiting, and only its finalize or its way back may
start beside it (``SchemaStore.create``). An admin's ``abort`` of a waiting rollout is refused
with those two commands (an abort that left nodes dual would hide that they are).

Linking a rollout instead of a second phase inside one record keeps every node state meaning
one thing, keeps the node table small (one new row) and reuses the whole engine. Which
schemes a node serves before and after each change is the data in ``SCHEMES``; the planner
refuses to plan a change whose source is not what a node serves (a dual node never goes to
https-only except through ``finalize``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from leader.rollout_enums import FreezeMode, NodeState, RolloutState, ScopeKind, Strategy
from tlsroll.clients import https_matches
from tlsroll.enums import NEEDS_ADMIN, Change, names_journal_put_back
from tlsroll.errors import TerminalError

# Re-exported: the core's vocabulary. ``Change`` is defined where the agents share it; the
# states and a rollout's settings in ``leader.rollout_enums``, which ``tlsroll schema show``
# names without building this module's tables and records.
__all__ = ["Change", "FreezeMode", "NodeState", "RolloutState", "ScopeKind", "Strategy"]


class RolloutEvent(StrEnum):
    """What can happen to a rollout: admin commands and the planner's verdicts."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    FAILURE_BUDGET_EXCEEDED = "failure_budget_exceeded"
    NODES_SETTLED = "nodes_settled"
    NODES_DUAL = "nodes_dual"  # transitional phase 1 settled with dual nodes
    FINALIZED = "finalized"  # its linked finalize rollout completed
    TAKEN_BACK = "taken_back"  # its linked way back (disable-tls) completed
    NODE_CUT_OFF = "node_cut_off"  # a node's agent cut off before its switch (``cut_off_halt``)


class RolloutAction(StrEnum):
    """What an administrator may do to a running rollout (each is a rollout event)."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"

    @property
    def event(self) -> RolloutEvent:
        return RolloutEvent(self.value)


class NodeEvent(StrEnum):
    """What can happen to a node: the planner's gate events and the engine's step results."""

    START = "start"
    SWITCH = "switch"
    SKIP = "skip"
    PREFLIGHT_PASSED = "preflight_passed"
    PREFLIGHT_FAILED = "preflight_failed"
    STAGE_DONE = "stage_done"
    STAGE_FAILED = "stage_failed"
    STAGE_SKIPPED = "stage_skipped"
    SKIP_UNSENT = "skip_unsent"  # a switch never sent, of a draining rollout (planner only)
    SWITCH_DONE = "switch_done"
    SWITCH_ROLLED_BACK = "switch_rolled_back"
    # The agent refused to begin the switch (or the way back): nothing began, nothing on the
    # node was changed (its plan found it not ready: ``refused_reason``). Not "rolled back",
    # which says something happened and was undone (session 71, reenrol).
    SWITCH_REFUSED = "switch_refused"
    SWITCH_FAILED = "switch_failed"
    # finalize --when-quiet: the agent, reading its server's clients afresh just before the
    # switch, saw http within the quiet time; nothing began, the node waits at the gate again.
    SWITCH_HELD = "switch_held"
    CONFIRM_DONE = "confirm_done"
    CONFIRM_DUAL = "confirm_dual"  # transitional phase 1: both schemes answer from outside
    CONFIRM_ROLLED_BACK = "confirm_rolled_back"
    CONFIRM_FAILED = "confirm_failed"


class Step(StrEnum):
    """A unit of work the engine runs against one node's agent (idempotent per rollout+node)."""

    PREFLIGHT = "preflight"
    STAGE = "stage"
    SWITCH = "switch"
    CONFIRM = "confirm"
    FREEZE = "freeze"
    UNFREEZE = "unfreeze"


class Password(StrEnum):
    """What a change does to the auth password live on a node once the node is ``done``."""

    NEW = "new"  # the rollout brings its own (its verifier came with the start command)
    STAGED = "staged"  # the newest staged one (`tlsroll password set`)
    CLEARED = "cleared"  # none: the node is back on http
    KEPT = "kept"  # unchanged


@dataclass(frozen=True)
class ChangeSpec:
    """How one change runs on a node; the engine reads these instead of branching on names."""

    available: bool  # can a rollout of this change be started today
    stages_certificate: bool  # stage step: a new key on the node, a CSR signed by the CA
    requires_https: bool  # preflight: the node must already serve https
    password: Password
    target_scheme: str  # what the outside check expects after the switch: "https" or "http"


CHANGES: Mapping[Change, ChangeSpec] = {
    Change.ENABLE_TLS: ChangeSpec(True, True, False, Password.NEW, "https"),
    Change.CHANGE_PASSWORD: ChangeSpec(True, False, True, Password.STAGED, "https"),
    Change.ROTATE_CERT: ChangeSpec(True, True, True, Password.KEPT, "https"),
    Change.DISABLE_TLS: ChangeSpec(True, False, True, Password.CLEARED, "http"),
    # Started only by `tlsroll rollout finalize` (a transitional rollout's phase 2).
    Change.FINALIZE: ChangeSpec(True, False, True, Password.KEPT, "https"),
}
"""Every change and how it runs; a test checks that each one has a row."""


def before_after(change: Change, http_url: str, https_url: str) -> tuple[str, str]:
    """A node's address before ``change`` and after it, from the two its record holds
    (``http_url``, ``https_url``: the agent's preflight gives its http and its https URL, as
    the record's ``old_url`` and ``new_url``, whatever the change), by the schemes
    ``ADDRESSES`` derives from the change's ``SCHEMES`` rows. The one place that decides it
    for every view of a rollout's rows (`schema show`, `rollout status`, the viewer) and for
    a notice (``leader.cli.notify_cmd.notice_node``): a change whose target is http
    (disable-tls, a rollback) goes from the https address to the http one (review s45rt2 M2),
    one on https the whole time (change-password, rotate-cert) stays on https, finalize goes
    from http to https (review s45rev6 L2: they showed the node's http address as "old")."""
    urls = {"http": http_url, "https": https_url}
    old, new = ADDRESSES[change]
    return urls[old], urls[new]


def live_and_closed(change: Change, http_url: str, https_url: str) -> tuple[str, str]:
    """For the outside check of a change with one target scheme: the URL the change leaves the
    node serving on (``ChangeSpec.target_scheme``) and the other, whose port must be closed.
    Not ``before_after``: a node on https the whole time has no "old" address, but still one
    that must stay closed (its http)."""
    if CHANGES[change].target_scheme == "http":
        return http_url, https_url
    return https_url, http_url


HTTP: frozenset[str] = frozenset({"http"})
HTTPS: frozenset[str] = frozenset({"https"})
DUAL_SCHEMES: frozenset[str] = frozenset({"http", "https"})


@dataclass(frozen=True)
class Schemes:
    """What a node serves before a change may run on it (``sources``) and after it is done."""

    sources: frozenset[frozenset[str]]
    target: frozenset[str]


SCHEMES: Mapping[tuple[Change, Strategy], Schemes] = {
    (Change.ENABLE_TLS, Strategy.DIRECT): Schemes(frozenset({HTTP, HTTPS}), HTTPS),
    (Change.ENABLE_TLS, Strategy.TRANSITIONAL): Schemes(frozenset({HTTP}), DUAL_SCHEMES),
    (Change.CHANGE_PASSWORD, Strategy.DIRECT): Schemes(frozenset({HTTPS}), HTTPS),
    (Change.ROTATE_CERT, Strategy.DIRECT): Schemes(frozenset({HTTPS}), HTTPS),
    (Change.DISABLE_TLS, Strategy.DIRECT): Schemes(frozenset({HTTPS, DUAL_SCHEMES}), HTTP),
    (Change.FINALIZE, Strategy.DIRECT): Schemes(frozenset({DUAL_SCHEMES}), HTTPS),
}
"""Which schemes each change (with its strategy) starts from and leaves behind. Direct
enable-tls may start on https-only (a certificate of another CA is replaced); no change but
``finalize`` and ``disable-tls`` starts on a dual node, so a dual node never goes to
https-only without finalize."""


def _addresses(change: Change) -> tuple[str, str]:
    """The scheme of a node's address before ``change`` and after it, from its ``SCHEMES``
    rows: before, the scheme the change closes (http for enable-tls and finalize, https for
    disable-tls), else the one it served (http for a transitional enable-tls, https for
    change-password); after, the scheme it opens, else the one it serves after (https, http).
    Every strategy of a change must agree (a test checks it, as it does every row)."""
    found = set()
    for (each, _), row in SCHEMES.items():
        if each is not change:
            continue
        was: frozenset[str] = frozenset().union(*row.sources)
        (old,) = (was - row.target) or was
        (new,) = (row.target - was) or row.target
        found.add((old, new))
    (one,) = found
    return one


ADDRESSES: Mapping[Change, tuple[str, str]] = {change: _addresses(change) for change in CHANGES}
"""Per change, the scheme of a node's address before it and after it (``before_after``)."""


def schemes(change: Change, strategy: Strategy = Strategy.DIRECT) -> Schemes:
    """The ``SCHEMES`` row of a change; ValueError for a strategy it does not have."""
    try:
        return SCHEMES[(change, strategy)]
    except KeyError:
        raise ValueError(f"{change.value} has no {strategy.value} strategy") from None


def serves_after(rollout: Rollout, state: NodeState, before: frozenset[str]) -> frozenset[str]:
    """What a node that served ``before`` serves once its record in ``rollout`` is ``state``
    (a terminal state): the target when done or dual, else what it served (nothing changed,
    or the agent rolled it back). ``needs_attention`` is unknown: the empty set."""
    if state in (NodeState.DONE, NodeState.DUAL):
        return schemes(rollout.change, rollout.strategy).target
    if state is NodeState.NEEDS_ATTENTION:
        return frozenset()
    return before


BLOCKED = "blocked:"
"""How the reason of a planned node begins when its change cannot get past it: on http only
under a change that starts from https (``BLOCKED_HTTP``: a start is refused), or problems its
agent's read-only preflight checks found (a start is refused if it preflights the node at
once, ``planner.blocked_at_once``; else it would fail there unless they are fixed meanwhile). A
plan with such a node exits 1 (``tlsroll plan``), whatever the reason."""

NOT_ON_HTTPS = "not on https; run enable-tls first"
"""Why a change that starts from https (``ChangeSpec.requires_https``) cannot run on a node
that serves http only: the planner marks such a node ``blocked: …`` with it (``BLOCKED_HTTP``),
a start is refused, and a plan that shows one exits 1."""
BLOCKED_HTTP = f"{BLOCKED} {NOT_ON_HTTPS}"

AGENT_TOO_OLD = "its agent (tlsroll "
"""How the reason of a node whose agent lacks a feature the change needs goes on after
``blocked:`` ("its agent (tlsroll V) is too old for …: upgrade it first":
``leader.agent_features.too_old``): a start of the plan is refused (``blocked_too_old``), as
the agent would drop what it does not know and do something else."""
BLOCKED_TOO_OLD = f"{BLOCKED} {AGENT_TOO_OLD}"


LEFT_AS_IS = "left as is"
"""In the reason of a node the way back (disable-tls) skipped as it could not tell what the node
runs (``LEFT_OFFLINE``, ``left_unknown``): the others go back to http, this one does not; the
CLI names such nodes apart from those already on http (review s45rt1 H1)."""

LEFT_OFFLINE = f"offline: {LEFT_AS_IS}: run tlsroll rollout rollback again once its agent is back"


def left_unknown(error: str, needs_admin: str = "") -> str:
    """The reason of a node the way back leaves as is: its agent could not say what it runs
    (``error``), or says it needs the admin first (``needs_admin``)."""
    if needs_admin:
        return f"{needs_admin}; {LEFT_AS_IS}: then run tlsroll rollout rollback again"
    return (
        f"cannot tell what it runs ({error}): {LEFT_AS_IS}; fix that, then run tlsroll "
        "rollout rollback again"
    )


SERVER_DOWN = "the managed server: "
"""The start of an observation's error when the agent answered that its server is not healthy
(``leader.observe.observation``)."""


CUT_OFF = "cut off: "
"""How the reason of a node the way back left as is as its agent is cut off begins
(``left_cut_off``)."""


def left_cut_off(name: str) -> str:
    """The reason of node ``name``, left as is by the way back (disable-tls) as its agent is
    cut off (its certificate on record revoked: ``tlsroll ca revoke``, a machine lost or
    stolen). Not ``LEFT_OFFLINE``'s "again once its agent is back": it never comes back; its
    removal is the way on (session 48, s48lost)."""
    return (
        f"{CUT_OFF}{LEFT_AS_IS}: its agent's certificate is revoked (a machine lost or stolen):"
        f" it never comes back; `tlsroll nodes remove {name}` (once the rollout has ended)"
        " revokes its server's certificate"
    )


NOTHING_CHANGED = "nothing on the node was changed"
"""What the reason of a node whose switch its agent refused says (``refused_reason``)."""


def refused_reason(what: str, said: str) -> str:
    """The reason of a node whose ``what`` ("switch", "going back to http") its agent refused
    before it began (``NodeEvent.SWITCH_REFUSED``: the node ``failed``): the agent's one line
    ``said`` (its plan found the node not ready, and says what to do), and that nothing on the
    node was changed, unless the line says so itself. It showed ``rolled_back``, which says
    something happened and was undone (session 71, reenrol)."""
    said = said.strip().rstrip(";").rstrip()
    shown = said.lower()
    if NOTHING_CHANGED in shown or "nothing was changed" in shown:
        return f"{what} refused: {said}"
    return f"{what} refused: {said}; {NOTHING_CHANGED}"


class Held(StrEnum):
    """What the agent says it holds under a step's key (its rollout id and the transaction's
    kind), asked after it refused that step's switch or way back (``after_refusal``)."""

    NONE = "none"  # NOT_FOUND: no transaction under the key; nothing began
    THIS = "this"  # this step's, begun by an earlier run of the step: it is followed
    OTHER = "other"  # another switch under the key (its refusal or the answer says so)
    UNANSWERED = "unanswered"  # it refused the question too: whether it began is not known
    # Its answers to the question were failures (INTERNAL, ABORTED...), asked again a few
    # times (``leader.changes.SEND_AGAIN``): whether it began is not known either.
    FAILED = "failed"


def after_refusal(
    what: str, said: str, held: Held, asked: str = "", *, refused: bool = True
) -> tuple[NodeEvent, str] | None:
    """How a node whose ``what`` ("switch", "going back to http") its agent refused
    (``said``) ends, from what the agent then said it holds under the step's key (``held``;
    ``asked``: its refusal of that question). None: the transaction it holds is this step's,
    begun by an earlier run of the step (its refusal answered a replay: a stale epoch after
    the leader's store was restored, a leader identity it no longer trusts, an edited
    config, an agent older than the replay check), or by this very call (``refused`` False):
    followed to its outcome as any, so the node ends done, rolled back or needing attention
    as it truly does.

    ``refused`` False: the agent's answer was no refusal but its own failure (INTERNAL,
    UNKNOWN, UNIMPLEMENTED, ...: ``leader.changes.failed_code``), which says nothing of
    whether the call began the step: the same question decides, and the reason says
    "failed", not "refused" (session 72: the way back recorded any such answer
    ``rolled_back``, "going back to http refused", without asking; a named way back skips a
    rolled-back node).

    Only with none held is it ``SWITCH_REFUSED`` with "nothing on the node was changed"
    (``refused_reason``): a refusal to a step that runs again proves nothing of what the
    first run began (review s71 revplans, M; a named way back leaves a failed node out). With
    another switch held under the key (the finalize sent under the phase-1 id), this step's
    did not begin, but what that one changed is not known here: the node needs attention
    (session 72: it was ``failed``, whose meaning is "back where it was", beside a reason
    saying that switch may have changed the node; needs attention is what a named way back
    takes and a person looks at). With the question refused too, whether it began is not
    known, and asking again gets the same answer (a refusal, not a lost call): needs
    attention, as a named way back takes it. With the question failing each time it was asked
    (``Held.FAILED``; ``asked``: its last answer), the same (review s72 refused, L4: it ran the
    step again without end, the node's row saying "agent unreachable").

    None held after a refusal from an agent whose journal was put back from a copy
    (``tlsroll.enums.names_journal_put_back``: "needs the admin: journal put back mid-..."):
    the copy may be older than the try that began this step, so "none" proves nothing; the
    node needs attention, as the agent's own refusal says it needs the admin (review s72
    refused, L5: it was failed, "nothing on the node was changed"). One that holds a
    transaction on a journal it cannot write ("needs the admin" too) lost nothing: its "none"
    holds."""
    said = said.strip().rstrip(";").rstrip()
    verb = "refused" if refused else "failed"
    if held is Held.THIS:
        return None
    if held is Held.NONE:
        if refused and names_journal_put_back(said):
            return NodeEvent.SWITCH_FAILED, (
                f"{what} refused: {said}; the agent holds no {what} of this rollout, but its "
                f"journal was put back from a copy, which may be older than a try that began "
                f"it; look at the node"
            )
        if refused:
            return NodeEvent.SWITCH_REFUSED, refused_reason(what, said)
        return NodeEvent.SWITCH_REFUSED, f"{what} failed: {said}; {NOTHING_CHANGED}"
    if held is Held.OTHER:
        return NodeEvent.SWITCH_FAILED, (
            f"{what} {verb}: {said}; this {what} did not begin: the agent holds another "
            "switch under this rollout id, which may have changed the node; look at the node"
        )
    began = "an earlier try began it" if refused else "it began"
    return NodeEvent.SWITCH_FAILED, (
        f"{what} {verb}: {said}; whether {began} is not known: {unanswered(held, asked)}; "
        "look at the node"
    )


def unanswered(held: Held, asked: str, *, too: bool = True) -> str:
    """Why the agent did not say whether it holds a step's transaction (``held``:
    ``Held.UNANSWERED`` or ``Held.FAILED``; ``asked``: its answer to the question; ``too``:
    after its refusal or failure of the step's own request)."""
    also = " too" if too else ""
    if held is Held.FAILED:
        return f"the agent failed to say{also}, each time asked ({asked.strip() or 'no reason'})"
    return f"the agent refused to say{also} ({asked.strip() or 'no reason given'})"


def begun_not_known(what: str, why: str) -> str:
    """The reason of a node whose ``what`` ("switch", "way back to http") was not sent this
    time (held at the ``--freeze scope`` gate, or not sendable yet) and whose agent did not
    say whether an earlier try began it (``why``: ``unanswered``): it needs attention, as
    ``after_refusal`` says of the same unknown (session 73: the step was tried again without
    end, "agent unreachable ... it may be mid-switch", of an agent that answered)."""
    return f"whether an earlier try began the {what} is not known: {why}; look at the node"


def cut_off_reason(change: Change, name: str) -> str:
    """The reason of node ``name`` skipped before its switch by a rollout of ``change`` as its
    agent was cut off while the rollout ran (its certificate on record revoked: ``tlsroll ca
    revoke``, a machine lost or stolen): the leader sends a revoked agent nothing, a switch
    least of all. A finalize leaves it out (``left_out_reason``) and the way back leaves it
    as is (``left_cut_off``), as each does for a node cut off before it starts; any other
    change halts (``RolloutEvent.NODE_CUT_OFF``), as its start refuses such a node
    (``planner.NodesOffline``): it never goes on leaving a node behind silently (s50)."""
    if change is Change.FINALIZE:
        return left_out_reason(name)
    if change is Change.DISABLE_TLS:
        return left_cut_off(name)
    return (
        f"{CUT_OFF}its agent's certificate was revoked while the rollout ran (a machine lost"
        f" or stolen): never switched, and the rollout halted; `tlsroll nodes remove {name}`"
        " (once the rollout has ended) revokes its server's certificate"
    )


def cut_off(reason: str) -> bool:
    """Whether a node's ``reason`` says its agent is cut off (``left_cut_off``,
    ``cut_off_reason``, ``cut_off_mid_switch``; a finalize's ``left_out_reason`` too): it
    never comes back; its removal is the way on."""
    return reason.startswith(CUT_OFF) or left_out(reason)


def cut_off_halts(change: Change) -> bool:
    """Whether a node of a rollout of ``change`` cut off before its switch halts the rollout
    (``cut_off_reason``): not a finalize, nor the way back, which go on without it."""
    return change not in (Change.FINALIZE, Change.DISABLE_TLS)


def cut_off_mid_switch(name: str) -> str:
    """The reason of node ``name`` whose agent was cut off (its certificate revoked) after its
    switch was sent: the leader asks a revoked agent nothing more, so what it runs is not
    known; it needs attention, as any switch whose outcome is not known (s50)."""
    return (
        f"{CUT_OFF}its agent's certificate was revoked during its switch (a machine lost or"
        " stolen): the leader asks it nothing more, what it runs is not known; `tlsroll nodes"
        f" remove {name}` (once the rollout has ended) revokes its server's certificate"
    )


def nodes_remove(names: Sequence[str]) -> str:
    """The `tlsroll nodes remove` for the cut-off nodes ``names`` (sorted; one or more), as the
    notes and refusals say it: the node's own name for one, ``NAME`` "for each" for more."""
    if len(names) == 1:
        return f"`tlsroll nodes remove {names[0]}`"
    return "`tlsroll nodes remove NAME` for each"


def cut_off_halt(rollout: Rollout, names: Iterable[str]) -> str:
    """The note of a rollout halted as the agents of ``names`` were cut off before their
    switches (``RolloutEvent.NODE_CUT_OFF``): what to do next. A retry refuses a node still
    cut off (saying `nodes remove`) and leaves out one removed since (``Commands.retry``:
    s50retry; before, it took them, and its start refused them, offline or not enrolled)."""
    cut = sorted(names)
    return (
        f"halted: agent cut off (its certificate revoked) before its switch: {', '.join(cut)};"
        f" next: {nodes_remove(cut)}, then tlsroll rollout retry {rollout.id} (it leaves out"
        " the nodes removed)"
    )


def left_way_on(reason: str) -> str:
    """What to do about a node the way back left as is, by its ``reason`` (``LEFT_OFFLINE``,
    ``left_unknown``, ``left_cut_off``): wait for an agent only where the agent is off and
    may come back (review s45rev9 L1; a cut-off one never does: s48lost)."""
    if reason.startswith(f"{CUT_OFF}{LEFT_AS_IS}: "):
        return reason.removeprefix(f"{CUT_OFF}{LEFT_AS_IS}: ")
    if reason.startswith("offline: "):
        return "run tlsroll rollout rollback once its agent is back"
    if reason.startswith(NEEDS_ADMIN):
        said = reason.split(f"; {LEFT_AS_IS}", maxsplit=1)[0].rstrip(":; ")
        return f"{said}; then run tlsroll rollout rollback"
    if reason.startswith(f"cannot tell what it runs ({SERVER_DOWN}"):
        # Its agent is up: its server is down and the agent (an older one) does not say
        # what its config holds (a config on https is taken back, one on http skipped:
        # ``down_on_https``, ``down_on_http``).
        return "start its server or upgrade tlsroll on the node, then run tlsroll rollout rollback"
    return "run tlsroll rollout rollback once its agent answers (tlsroll nodes --check)"


LEFT_DUAL = "left dual"
"""In the note of a transitional phase 1 taken back by a way back that left a node as is: the
node still serves http and https (review s45rev9 M1)."""


def taken_back_note(follower_id: str, left: Mapping[str, str]) -> str:
    """The note of a phase 1 its way back ``follower_id`` took back; ``left``: the nodes that
    way back left as is (with their reasons) while phase 1 had made them dual."""
    note = f"taken back by rollout {follower_id}"
    return "; ".join([note, *(f"{n} {LEFT_DUAL}: {left_way_on(left[n])}" for n in sorted(left))])


LEFT_OUT = "left out"
"""How the reason of a node a finalize left out begins (``left_out_reason``): phase 1 made it
dual and its agent is cut off (its certificate on record revoked: ``tlsroll ca revoke``, a
machine lost or stolen), so no rollout can ever step it again until it is removed; the others
close http, it stays as it is (review s48: a lost machine held phase 1 for good, and the only
way on took every PC back to http). A node merely offline is never left out: finalize refuses
it (``planner.NodesOffline``), as the seed never leaves a node half-way silently."""


def left_out_reason(name: str) -> str:
    """The reason of node ``name``, left out of a finalize as its agent is cut off."""
    return (
        f"{LEFT_OUT}: its agent is cut off (its certificate revoked: a machine lost or stolen); "
        f"it stays on http and https, its server's certificate valid until `tlsroll nodes "
        f"remove {name}` (once the rollout has ended) revokes it"
    )


def left_out(reason: str) -> bool:
    """Whether a skipped node's ``reason`` says a finalize left it out (``left_out_reason``)."""
    return reason.startswith(f"{LEFT_OUT}: ")


def finalized_note(follower_id: str, left: Iterable[str]) -> str:
    """The note of a phase 1 its finalize ``follower_id`` finalized; ``left``: the nodes that
    finalize left out (still dual, their agents cut off)."""
    note = f"{RolloutEvent.FINALIZED.value} by rollout {follower_id}"
    return "; ".join(
        [
            note,
            *(
                f"{n} {LEFT_DUAL}: left out, its agent cut off (revoked); tlsroll nodes remove {n}"
                for n in sorted(left)
            ),
        ]
    )


def halt_way_out(
    rollout: Rollout,
    failed: Iterable[str],
    cut_off: Collection[str] = frozenset(),
    *,
    switched: bool,
) -> str:
    """The end of a halted rollout's note: ``way_out``, and for the way back (disable-tls), what
    to do with a node that failed it, which would fail a retry again (review s45rev9 M2). One
    of ``cut_off`` (its agent's certificate revoked: a machine lost or stolen) has no agent
    to stop nor anything to fix: its removal is the way on (review of s50 M2), and the next
    way back leaves it as is (``left_cut_off``). ``switched``: as ``way_out``'s."""
    failed = list(failed)  # read twice below (review rev50e L)
    if rollout.change is not Change.DISABLE_TLS:
        lost = sorted(n for n in failed if n in cut_off)
        if not lost or rollout.change is Change.FINALIZE:  # a finalize's retry leaves it out
            return way_out(rollout, switched=switched)
        # its retry refuses a node still cut off (``Commands.retry``), and leaves it out once
        # removed: say so before the retry (review rev50e M2)
        return (
            f"{', '.join(lost)}: agent cut off (its certificate revoked): {nodes_remove(lost)},"
            f" then {way_out(rollout, switched=switched)}"
        )
    names = [n for n in failed if n not in cut_off]
    lost = sorted(n for n in failed if n in cut_off)
    parts = []
    if names or not lost:
        its, it = ("its", "it") if len(names) <= 1 else ("each one's", "that node")
        parts.append(
            f"{', '.join(names) or 'the failed node'}: stop {its} agent (systemctl stop "
            f"tlsroll-agent on {it}) so that the next way back leaves {it} as is, or fix what "
            f"failed {it} (a port held: free it)"
        )
    if lost:
        parts.append(
            f"{', '.join(lost)}: agent cut off (its certificate revoked), it never comes back:"
            f" {nodes_remove(lost)}"
        )
    return "; ".join(parts) + "; then tlsroll rollout rollback again"


def completed_failed_note(
    change: Change, failure_budget: int, outcomes: Sequence[tuple[str, str, str]]
) -> str:
    """The note of a rollout that completed with nodes failed within its failure budget, ""
    if none failed; ``outcomes``: each of its nodes' name, state (its value) and reason, in
    the rollout's order. The leader writes it as the rollout's note (`rollout status`, `--json`,
    the viewer) and logs it; `rollout status` says it (exit 7). Before, a rollout whose every
    node failed within its budget ended "completed" with no word of it, exit 0 (brief s67
    budget)."""
    failed_states = {s.value for s in FAILED_NODE_STATES}
    failed = [(n, s, why) for n, s, why in outcomes if s in failed_states]
    if not failed:
        return ""
    done = sum(s in (_N.DONE.value, _N.DUAL.value) for _, s, _ in outcomes)
    said = "; ".join(f"{n} {s}: {why}" if why else f"{n} {s}" for n, s, why in failed)
    then = (
        "tlsroll rollout rollback again"
        if change is Change.DISABLE_TLS
        else "a new rollout start covers them (tlsroll plan shows it)"
    )
    return (
        f"completed: {done} of {len(outcomes)} node{'' if len(outcomes) == 1 else 's'} done, "
        f"{len(failed)} failed (within its failure budget of {failure_budget}): {said}; "
        f"fix what failed {'it' if len(failed) == 1 else 'them'}, then {then}"
    )


def halt_note(
    rollout: Rollout,
    failed: Sequence[NodeRecord],
    cut: Iterable[str],
    cut_off: Collection[str] = frozenset(),
    *,
    switched: bool,
) -> str:
    """The note of a rollout the pass halted (``RolloutEvent.FAILURE_BUDGET_EXCEEDED`` or
    ``NODE_CUT_OFF``), whichever halted it: the nodes ``failed`` (its failed records once the
    pass's moves are saved) with their states and reasons, the nodes ``cut`` whose agents the
    pass found cut off before their switches (skipped), and what to do next (``halt_way_out``,
    with `tlsroll nodes remove` for each node cut off, failed or skipped). A halt named one
    side only: a cut-off halt not the node failing in its pass (one cut off mid-switch), a
    failure halt not the node cut off in its pass, whose retry refuses it until it is removed
    (review rev50e L). Without a failed node: ``cut_off_halt``. A finalize and the way back
    go on without a node cut off before its switch (``cut_off_halts``): no part of a halt.
    ``switched``: a node of the rollout is switched, or in its switch (``may_take_back``)."""
    lost = sorted(cut) if cut_off_halts(rollout.change) else []
    if not failed:
        return cut_off_halt(rollout, lost)
    said = [f"{r.name} {r.state.value}: {r.reason}" for r in failed if r.reason]
    if lost:
        said.append(f"agent cut off (its certificate revoked) before its switch: {', '.join(lost)}")
    out = halt_way_out(
        rollout, [*(r.name for r in failed), *lost], {*cut_off, *lost}, switched=switched
    )
    return f"halted: {'; '.join(said)}; next: {out}"


def drained_halt_note(
    rollout: Rollout,
    records: Iterable[NodeRecord],
    cut_off: Collection[str] = frozenset(),
    *,
    switched: bool,
) -> str:
    """The note of a halting rollout once a pass stepped a node whose agent was cut off (its
    certificate revoked) after the halt was decided, while its switches in flight ended: the
    halt's note (``halt_note``) made again from ``records`` (the rollout's, in its order, as
    the pass leaves them; others than the failed and skipped ones are passed by): the nodes
    failed (one cut off mid-switch among them: ``cut_off_mid_switch``) and those skipped as
    cut off before their switches (``cut_off_reason``), with `tlsroll nodes remove` for each
    before the retry. The note the halt made named none cut off later, and its retry refuses
    them until they are removed (review rev51b L4). Made again, too, as the halt ends, when
    the note made as it began offered the way back (a node was still in its switch:
    ``switched``) and none ended switched: ``tlsroll rollout rollback`` refused it, "switched
    no node" (review of s63-f1, L-1); this one names that node and offers the retry alone."""
    failed: list[NodeRecord] = []
    cut: list[str] = []
    for r in records:
        if r.state in FAILED_NODE_STATES:
            failed.append(r)
        elif r.state is NodeState.SKIPPED and r.reason.startswith(CUT_OFF):
            cut.append(r.name)
    return halt_note(rollout, failed, cut, cut_off, switched=switched)


def down_on_https(change: Change, seen: NodeObservation) -> bool:
    """The way back (disable-tls) and node ``seen``, whose managed server is down with a config
    on https (or http and https): the way back restores http and starts the server (the
    agent's freeze is skipped for a server that is down), so it steps such a node; any other
    change waits for a healthy server."""
    return (
        change is Change.DISABLE_TLS
        and not seen.reachable
        and not seen.needs_admin
        and "https" in seen.configured
    )


CONFIG_READING_DRIVERS = frozenset({"reference"})
"""The drivers whose agent reads a down server's schemes from its config file
(``ServerView.configured_schemes``); the systemd and exec drivers send the ports that answer."""

DOWN_ON_HTTP = "down, its config serves http: nothing to take back"
"""Why the way back skips a node whose managed server is down with its config on http only
(``down_on_http``): it is on http already, not left as is (review s45rev9 L2: it read
"cannot tell what it runs")."""


def down_on_http(change: Change, seen: NodeObservation) -> bool:
    """The way back (disable-tls) and node ``seen``, whose managed server is down with a config
    on http only (its agent read it in the config file: ``ServerView.configured_schemes`` from
    a driver of ``CONFIG_READING_DRIVERS``): nothing to take back (``already_done``'s
    ``DOWN_ON_HTTP``); any other change waits for a healthy server. A port that answers on
    http (another program's) says nothing of the config: such a node is left as is."""
    return (
        change is Change.DISABLE_TLS
        and not seen.reachable
        and not seen.needs_admin
        and seen.config_read
        and seen.configured == ("http",)
    )


def left_as_is(reason: str) -> bool:
    """Whether a skipped node's ``reason`` says the way back left it as is (not on http)."""
    return LEFT_AS_IS in reason and not reason.startswith("already done")


def blocked_too_old(reason: str) -> bool:
    """Whether a planned node's ``reason`` says its agent is too old for the change."""
    return reason.startswith(BLOCKED_TOO_OLD)


def not_on_https_refusal(change: str, names: str, count: int) -> str:
    """The one line a start (and a plan, exit 1) is refused with: ``names`` (``count`` of them,
    as the message shows them) are on http only."""
    one = count == 1
    return (
        f"{change} cannot start: {names} {'is' if one else 'are'} {NOT_ON_HTTPS} (or leave "
        f"{'it' if one else 'them'} out: --nodes); nothing was changed"
    )


def needs_https_first(change: Change, seen: NodeObservation) -> bool:
    """Node ``seen`` serves http and not https, and ``change`` starts from https only: its
    preflight would fail it (``NOT_ON_HTTPS``), and no retry could do better."""
    now = frozenset(seen.schemes)
    return CHANGES[change].requires_https and "http" in now and "https" not in now


def wrong_source(
    change: Change,
    seen: NodeObservation,
    strategy: Strategy = Strategy.DIRECT,
    finalizes: str = "",
) -> str | None:
    """Why a node may not take ``change`` from what it serves now (None: it may). A dual node
    is named with the two ways on; so is a node a finalize finds on http only (``finalizes``:
    the phase 1 it finalizes, named in the way back)."""
    now = frozenset(seen.schemes)
    row = schemes(change, strategy)
    # Only the transitional states are judged here; the other changes' preflight says why a
    # node is not ready (as it did before issue 12).
    strict = now == DUAL_SCHEMES or change is Change.FINALIZE or strategy is Strategy.TRANSITIONAL
    if now in row.sources or not now or not strict:
        return None
    if now == DUAL_SCHEMES:
        return (
            "it serves http and https (a transitional rollout's phase 1): close http with "
            "tlsroll rollout finalize, or go back with tlsroll rollout rollback, first"
        )
    if change is Change.FINALIZE:
        back = f"tlsroll rollout rollback {finalizes or '<its ID>'}"
        return (
            f"it serves {'+'.join(sorted(now))} only: finalize closes http on a dual node; "
            f"take phase 1 back with {back}, or make the node dual again"
        )
    return f"it serves {'+'.join(sorted(now))}: {change.value} does not start from there"


@dataclass(frozen=True)
class Client:
    """A workstation a node's managed server saw on one scheme (from the agent's heartbeat
    ``ClientsView``; the leader keeps them in ``SchemaStore.clients``)."""

    node: str
    scheme: str  # "http" or "https"
    address: str
    workstation: str  # "" where unknown
    first_seen: dt.datetime
    last_seen: dt.datetime
    requests: int = 0

    @property
    def key(self) -> str:
        """Who it is: its workstation name where known, else its address."""
        return self.workstation or self.address


def still_on_http(
    clients: Iterable[Client], now: dt.datetime, window: dt.timedelta
) -> list[Client]:
    """The http clients seen within ``window`` of ``now`` that have not switched to https
    (same node: its https sightings as ``tlsroll.clients.https_matches`` pairs them, those of
    its workstation name, else of its address): who still needs the client steps. Most
    recently seen first.

    An unnamed http sighting (no ``X-Tlsroll-Workstation`` header) is judged against the https
    sightings of the one workstation named from its address at that node, where exactly one
    was, too: its https requests carry its client certificate, and it kept the PC "still on
    http" for the agent's whole window (session 68). From an address where several names were
    seen (a terminal server, NAT) only its address's unnamed https sightings count.

    A key has switched only when its first https request came at or after its last http
    one (``first_seen`` on https >= ``last_seen`` on http): a clean switch clears, a client
    that alternates or went back to http stays counted (one PC with two programs, a terminal
    server or NAT whose address is the key). A tie counts as switched: the reference
    server's times are whole seconds, and a program that switches at once (the demo's
    workstations, a write every 0.1 s) makes its last http and first https request in the
    same second; a tie counted as http kept it on http for the agent's whole window. Only
    a client whose one http request after https came within its first https second and
    that then used http no more is taken for switched; any later http request counts it.
    """
    by_node: dict[str, list[Client]] = {}
    for c in clients:
        by_node.setdefault(c.node, []).append(c)
    left = []
    for seen in by_node.values():
        for i, matched in https_matches(
            [(c.scheme, c.address, c.workstation) for c in seen]
        ).items():
            c = seen[i]
            if now - c.last_seen <= window and (
                not matched or c.last_seen > min(seen[j].first_seen for j in matched)
            ):
                left.append(c)
    return sorted(left, key=lambda c: (c.last_seen, c.node, c.key), reverse=True)


@dataclass(frozen=True)
class NodeObservation:
    """What a node's agent reports it runs now (``GetStatus``), as the planner needs it:
    rollouts are planned from this, not from what earlier rollouts recorded."""

    reachable: bool
    error: str = ""  # why the agent could not be asked (reachable False)
    schemes: tuple[str, ...] = ()  # what the managed server listens on: "http", "https"
    cert_from_ca: bool = False  # the certificate served on https was issued by this CA
    verifier_digest: str = ""  # SHA-256 of the live auth password verifier ("" if none)
    problems: tuple[str, ...] = ()  # what the agent's read-only preflight checks found
    cert_fingerprint: str = ""  # ``sha256:…`` of the certificate served on https ("" if none)
    # That certificate is one the admin revoked (`tlsroll ca revoke`): set by the plan from the
    # store (``leader.commands.Commands._plan``), not by the agent. The node is no less done
    # for enable-tls, but its skip says to replace it (``planner.REVOKED_SERVED``).
    cert_revoked: bool = False
    # Its agent says (heartbeats: ``LeaderState.no_settings``) that its server serves https
    # while its journal holds no settings for it, so no bootstrap service (9443) runs there: set
    # by the plan, as ``cert_revoked``. The node is no less done for enable-tls, but its skip
    # names the rotate-cert that brings the service back (``planner.NO_SETTINGS_SKIP``).
    no_settings: bool = False
    # "needs the admin: <why, what to do>" (``tlsroll.enums.NEEDS_ADMIN``): the agent said so
    # (its journal put back from a copy made mid-switch); reachable is False then.
    needs_admin: str = ""
    # Its managed server is down (reachable False) and its config says it listens on these
    # (``ServerView.configured_schemes``): the way back takes a node on https so to http.
    configured: tuple[str, ...] = ()
    # ``configured`` was read from the server's config file (``CONFIG_READING_DRIVERS``), not
    # from the ports that answer, as the systemd and exec drivers find it: a down server whose
    # http port something else holds says nothing of its config (review s46rev3 H1).
    config_read: bool = False
    # The server's config file (its path on the node) when it was edited since tlsroll wrote
    # it (``PreflightResponse.edited_config``): the way back undoes those edits, and its plan
    # says so (review rev58a H2). "" otherwise.
    edited_config: str = ""
    # Where its clients find the server on http and on https, and its bootstrap port, as the
    # agent's check answered (``PreflightResponse``; "" and 0 from a GetStatus): a plan's rows
    # carry them, and ``tlsroll notify --when`` announces a node never switched with them.
    http_url: str = ""
    https_url: str = ""
    bootstrap_port: int = 0


def still_dual(seen: NodeObservation, digest: str = "") -> bool:
    """Node ``seen`` serves http and https with a certificate of this CA (and, given a
    ``digest``, the password whose verifier has it): where a transitional phase 1 leaves a
    node. A retry of that phase 1 starts such a node ``dual``, so that its finalize covers it."""
    return (
        frozenset(seen.schemes) == DUAL_SCHEMES
        and seen.cert_from_ca
        and (not digest or seen.verifier_digest == digest)
    )


def already_done(
    change: Change,
    seen: NodeObservation,
    target_digest: str = "",
    strategy: Strategy = Strategy.DIRECT,
) -> str | None:
    """Why node ``seen`` needs nothing of ``change`` (it already runs the desired state), or
    None if it does. ``target_digest``: the digest of the password change-password applies."""
    https_only = seen.schemes == ("https",)
    dual = frozenset(seen.schemes) == DUAL_SCHEMES
    if change is Change.ENABLE_TLS and strategy is Strategy.TRANSITIONAL:
        if dual and seen.cert_from_ca:
            return "already done: on http and https with a certificate of this CA"
        if https_only and seen.cert_from_ca:
            return "already done: on https only (finalized)"
        return None
    if change is Change.FINALIZE and https_only and seen.cert_from_ca:
        return "already done: on https only"
    if change is Change.ENABLE_TLS and https_only and seen.cert_from_ca:
        return "already done: on https with a certificate of this CA"
    if change is Change.DISABLE_TLS and seen.schemes == ("http",):
        return "already done: on http"
    if down_on_http(change, seen):
        return DOWN_ON_HTTP
    if (
        change is Change.CHANGE_PASSWORD
        and https_only
        and target_digest
        and seen.verifier_digest == target_digest
    ):
        return "already done: the staged password is live"
    return None


_R = RolloutState
_RE = RolloutEvent
_N = NodeState
_NE = NodeEvent

ROLLOUT_TRANSITIONS: Mapping[RolloutState, Mapping[RolloutEvent, RolloutState]] = {
    _R.PLANNED: {_RE.START: _R.RUNNING, _RE.ABORT: _R.ABORTING},
    _R.RUNNING: {
        _RE.PAUSE: _R.PAUSED,
        _RE.ABORT: _R.ABORTING,
        _RE.FAILURE_BUDGET_EXCEEDED: _R.HALTING,
        _RE.NODE_CUT_OFF: _R.HALTING,
        _RE.NODES_SETTLED: _R.COMPLETED,
        _RE.NODES_DUAL: _R.AWAITING_FINALIZE,
    },
    _R.PAUSED: {
        _RE.RESUME: _R.RUNNING,
        _RE.ABORT: _R.ABORTING,
        _RE.FAILURE_BUDGET_EXCEEDED: _R.HALTING,
        _RE.NODE_CUT_OFF: _R.HALTING,
        _RE.NODES_SETTLED: _R.COMPLETED,
        _RE.NODES_DUAL: _R.AWAITING_FINALIZE,
    },
    _R.ABORTING: {_RE.NODES_SETTLED: _R.ABORTED},
    _R.HALTING: {_RE.NODES_SETTLED: _R.HALTED},
    _R.AWAITING_FINALIZE: {_RE.FINALIZED: _R.COMPLETED, _RE.TAKEN_BACK: _R.ABORTED},
    _R.COMPLETED: {},
    _R.HALTED: {},
    _R.ABORTED: {},
}
"""The rollout machine: state → event → new state. A missing entry is an illegal event."""

NODE_TRANSITIONS: Mapping[NodeState, Mapping[NodeEvent, NodeState]] = {
    _N.PENDING: {_NE.START: _N.PREFLIGHT, _NE.SKIP: _N.SKIPPED},
    _N.PREFLIGHT: {
        _NE.PREFLIGHT_PASSED: _N.STAGING,
        _NE.PREFLIGHT_FAILED: _N.FAILED,
        _NE.SKIP: _N.SKIPPED,
    },
    _N.STAGING: {
        _NE.STAGE_DONE: _N.STAGED,
        _NE.STAGE_FAILED: _N.FAILED,
        _NE.STAGE_SKIPPED: _N.STAGED,
        _NE.SKIP: _N.SKIPPED,
    },
    _N.STAGED: {_NE.SWITCH: _N.SWITCHING, _NE.SKIP: _N.SKIPPED},
    _N.SWITCHING: {
        _NE.SWITCH_DONE: _N.CONFIRMING,
        _NE.SWITCH_ROLLED_BACK: _N.ROLLED_BACK,
        _NE.SWITCH_REFUSED: _N.FAILED,
        _NE.SWITCH_FAILED: _N.NEEDS_ATTENTION,
        _NE.SKIP_UNSENT: _N.SKIPPED,
        _NE.SWITCH_HELD: _N.PENDING,
    },
    _N.CONFIRMING: {
        _NE.CONFIRM_DONE: _N.DONE,
        _NE.CONFIRM_DUAL: _N.DUAL,
        _NE.CONFIRM_ROLLED_BACK: _N.ROLLED_BACK,
        _NE.CONFIRM_FAILED: _N.NEEDS_ATTENTION,
    },
    _N.DONE: {},
    _N.FAILED: {},
    _N.ROLLED_BACK: {},
    _N.SKIPPED: {},
    _N.NEEDS_ATTENTION: {},
    _N.DUAL: {},  # phase 1 ends here; a linked finalize or disable-tls rollout moves it on
}
"""The per-node machine: state → event → new state. A missing entry is an illegal event."""

ADMIN_ROLLOUT_EVENTS = frozenset({_RE.START, _RE.PAUSE, _RE.RESUME, _RE.ABORT})
"""Rollout events an administrator may send; the others come only from the planner (and,
for a rollout awaiting finalize, from the engine: ``LINKED_ROLLOUT_EVENTS``)."""

LINKED_ROLLOUT_EVENTS = frozenset({_RE.FINALIZED, _RE.TAKEN_BACK})
"""What a linked rollout's end does to the transitional rollout awaiting finalize."""

PLANNER_NODE_EVENTS = frozenset(
    {_NE.START, _NE.SWITCH, _NE.SKIP, _NE.STAGE_SKIPPED, _NE.SKIP_UNSENT}
)
"""Gate events: only the planner emits them (it enforces max_parallel, pause, halt, freeze,
and skips the stage step of a change that stages nothing)."""

RESULT_NODE_EVENTS = frozenset(NodeEvent) - PLANNER_NODE_EVENTS
"""Step outcomes the engine feeds back after running the step of a working state."""

STEP_FOR_STATE: Mapping[NodeState, Step] = {
    _N.PREFLIGHT: Step.PREFLIGHT,
    _N.STAGING: Step.STAGE,
    _N.SWITCHING: Step.SWITCH,
    _N.CONFIRMING: Step.CONFIRM,
}
"""The one step that runs while a node is in a working state (the CONFIRM step includes having
the agent roll back when the outside check fails)."""

TERMINAL_NODE_STATES = frozenset(
    {_N.DONE, _N.DUAL, _N.FAILED, _N.ROLLED_BACK, _N.SKIPPED, _N.NEEDS_ATTENTION}
)
FAILED_NODE_STATES = frozenset({_N.FAILED, _N.ROLLED_BACK, _N.NEEDS_ATTENTION})
"""Node outcomes that count against the failure budget."""
IN_FLIGHT_NODE_STATES = frozenset(NodeState) - TERMINAL_NODE_STATES - {_N.PENDING}
"""A node is in flight from leaving ``pending`` until it reaches a terminal state."""

TERMINAL_ROLLOUT_STATES = frozenset({_R.COMPLETED, _R.HALTED, _R.ABORTED})
WAITING_ROLLOUT_STATES = frozenset({_R.AWAITING_FINALIZE})
"""Not ended, but nothing runs: no step, no freeze; only a linked rollout moves it on."""
DRAINING_ROLLOUT_STATES = frozenset({_R.ABORTING, _R.HALTING})
"""No node starts or begins a switch; in-flight work finishes, then the rollout ends."""


class IllegalTransition(TerminalError):
    """An event that the tables do not allow in the subject's current state; ``hint`` (for an
    administrator's action) says what to run instead."""

    def __init__(
        self,
        subject: str,
        state: RolloutState | NodeState,
        event: RolloutEvent | NodeEvent,
        hint: str = "",
        said: str = "",
    ) -> None:
        """``said``: the refusal in the administrator's words (``Rollout.with_action``), in
        place of the tables' (``event 'pause' is not allowed in state 'completed'``)."""
        super().__init__(
            (said or f"{subject}: event {event.value!r} is not allowed in state {state.value!r}")
            + (f"; {hint}" if hint else "")
        )
        self.subject = subject
        self.state = state
        self.event = event
        self.hint = hint


TAKEN_BACK_FROM = frozenset({_N.DONE, _N.DUAL, _N.SWITCHING, _N.CONFIRMING})
"""The states of a node of an enable-tls rollout for which a note offers the way back (``tlsroll
rollout rollback``): switched (done, or dual: the nodes the way back takes back,
``planner.undo_target``, which refuses a rollout with none: "switched no node; nothing to
undo"), or in its switch still, which may end done as a halt drains: a halt's note is written
as the halt begins, and made again as the halt ends if the drain left no node of the rollout
in these states (``leader.engine``; review of s63-f1, L-1). Once the rollout has ended none is
switching or confirming, and these are the nodes taken back."""


def may_take_back(states: Iterable[NodeState]) -> bool:
    """Whether ``tlsroll rollout rollback`` has a node to take back of an enable-tls rollout
    whose nodes are in ``states`` (``TAKEN_BACK_FROM``)."""
    return any(state in TAKEN_BACK_FROM for state in states)


def way_out(rollout: Rollout, *, switched: bool) -> str:
    """The commands that go on from a halted or aborted rollout (the end of its reason).
    ``switched``: a node of it is switched, or in its switch (``may_take_back``); only then is
    the way back to http offered: a halted enable-tls that switched no node offered `rollout
    rollback`, which then refused it, "switched no node; nothing to undo" (review s63 faults,
    L1)."""
    back = _way_back(rollout) if offers_way_back(rollout, switched=switched) else ""
    return f"finish the nodes left: tlsroll rollout retry {rollout.id}{back}"


def _way_back(rollout: Rollout) -> str:
    """How ``way_out`` offers the way back to http, at the end of a note."""
    return f" or go back to http: tlsroll rollout rollback {rollout.id}"


def offers_way_back(rollout: Rollout, *, switched: bool) -> bool:
    """Whether ``way_out`` offers the way back to http (``switched`` as its own)."""
    return rollout.change is Change.ENABLE_TLS and switched


def halt_offers_way_back(rollout: Rollout, failed: bool, *, switched: bool) -> bool:
    """Whether the note ``halt_note`` (or ``drained_halt_note``) makes, with a node ``failed``
    or none, offers the way back to http: the fact the engine stores with it
    (``RolloutMeta.way_back_offered``), by which it makes the note again as the halt ends if the
    drain left no node switched. With a failed node the note ends with ``halt_way_out``'s way
    on, which is ``way_out``'s but for the way back's (which never offers it); with none, a
    cut-off halt's (``cut_off_halt``), which offers the retry alone. Session 64: the engine read
    the fact from the note's last words."""
    return failed and offers_way_back(rollout, switched=switched)


def refused_action(rollout: Rollout, action: RolloutAction) -> str:
    """An administrator's action the rollout's state does not allow, said plainly (the start
    of an ``IllegalTransition``; ``next_command`` is its end): "rollout R is completed: there
    is nothing to pause"."""
    state = rollout.state.value.replace("_", " ")
    return f"rollout {rollout.id} is {state}: there is nothing to {action.value}"


def next_command(rollout: Rollout, action: RolloutAction, *, switched: bool) -> str:
    """What to run when ``action`` is not allowed in the rollout's state (one clause, the
    end of an ``IllegalTransition``); the one place that says it. ``switched``: a node of the
    rollout is switched (``may_take_back``): else no way back is offered."""
    state = rollout.state
    if state is RolloutState.AWAITING_FINALIZE:
        return (
            f"its nodes serve http and https: close http with tlsroll rollout finalize "
            f"{rollout.id}, or go back to http with tlsroll rollout rollback {rollout.id}"
        )
    if state in (RolloutState.HALTED, RolloutState.ABORTED):
        return way_out(rollout, switched=switched)
    if state in TERMINAL_ROLLOUT_STATES:
        back = (
            f" or take it back (tlsroll rollout rollback {rollout.id})"
            if rollout.change is Change.ENABLE_TLS and switched
            else ""
        )
        return f"it has ended: start a new one (tlsroll rollout start --scope …){back}"
    if state in DRAINING_ROLLOUT_STATES:
        return "wait until it has ended: tlsroll schema show --watch"
    if state is RolloutState.PAUSED and action is RolloutAction.PAUSE:
        return f"carry on with tlsroll rollout resume {rollout.id}"
    return "see: tlsroll schema show"


def rollout_transition(
    state: RolloutState, event: RolloutEvent, subject: str = "rollout"
) -> RolloutState:
    """Return the rollout state that ``event`` leads to from ``state``, or raise."""
    try:
        return ROLLOUT_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(subject, state, event) from None


def node_transition(state: NodeState, event: NodeEvent, subject: str = "node") -> NodeState:
    """Return the node state that ``event`` leads to from ``state``, or raise."""
    try:
        return NODE_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(subject, state, event) from None


@dataclass(frozen=True)
class Scope:
    """The nodes a rollout covers; ``names`` is used only (and required) for kind ``nodes``."""

    kind: ScopeKind
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.kind is ScopeKind.NODES) != bool(self.names):
            raise ValueError("a node list is required for scope 'nodes' and only for it")

    @classmethod
    def local(cls) -> Scope:
        return cls(ScopeKind.LOCAL)

    @classmethod
    def cluster(cls) -> Scope:
        return cls(ScopeKind.CLUSTER)

    @classmethod
    def of_nodes(cls, names: Iterable[str]) -> Scope:
        return cls(ScopeKind.NODES, tuple(names))


@dataclass(frozen=True)
class Rollout:
    """The durable record of one rollout (its settings, its node order and its state).

    ``order`` is the order in which nodes start (see ``plan_rollout``); ``epoch`` is carried
    into every command so that agents refuse a stale leader.
    """

    id: str
    change: Change
    scope: Scope
    order: tuple[str, ...]
    epoch: int
    strategy: Strategy = Strategy.DIRECT
    max_parallel: int = 1
    failure_budget: int = 0
    freeze: FreezeMode = FreezeMode.NODE
    state: RolloutState = RolloutState.PLANNED

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel must be at least 1, not {self.max_parallel}")
        if self.failure_budget < 0:
            raise ValueError(f"failure_budget must be 0 or more, not {self.failure_budget}")
        if self.epoch < 0:
            raise ValueError(f"epoch must be 0 or more, not {self.epoch}")
        if not self.order or len(set(self.order)) != len(self.order):
            raise ValueError(f"order must name each node once: {self.order!r}")

    def with_event(self, event: RolloutEvent) -> Rollout:
        """Return this record after ``event``; raise ``IllegalTransition`` if not allowed."""
        new = rollout_transition(self.state, event, f"rollout {self.id}")
        return replace(self, state=new)

    def with_action(self, action: RolloutAction, *, switched: bool) -> Rollout:
        """``with_event`` for an administrator's action: a refusal ends with what to run
        instead (``next_command``; ``switched``: as its)."""
        try:
            return self.with_event(action.event)
        except IllegalTransition as exc:
            hint = next_command(self, action, switched=switched)
            said = refused_action(self, action)
            raise IllegalTransition(exc.subject, exc.state, exc.event, hint, said) from None


@dataclass(frozen=True)
class NodeRecord:
    """The durable record of one node within one rollout.

    ``reason`` is the last error or rollback reason, shown in the schema. ``scope_frozen`` is
    set by the engine once the agent confirms a scope-wide freeze (``FreezeMode.SCOPE`` only)
    and cleared once it confirms the unfreeze. ``freeze_asked``: a scope FREEZE was planned
    for the node (persisted before it is sent) and no answer recorded yet: its agent may have
    frozen (``may_be_frozen``), so a settled rollout unfreezes it too (audit s33 L1).
    """

    name: str
    state: NodeState = NodeState.PENDING
    reason: str = ""
    scope_frozen: bool = False
    freeze_asked: bool = False

    @property
    def may_be_frozen(self) -> bool:
        """Frozen as confirmed, or a freeze sent whose answer is not recorded."""
        return self.scope_frozen or self.freeze_asked

    def with_event(self, event: NodeEvent, reason: str | None = None) -> NodeRecord:
        """Return this record after ``event`` (keeping the old reason unless one is given)."""
        new = node_transition(self.state, event, f"node {self.name}")
        return replace(self, state=new, reason=self.reason if reason is None else reason)
