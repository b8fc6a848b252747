"""The rollout planner: pure functions that decide which node goes when.

``plan_rollout`` turns a scope into the initial records (the node order: by name, the leader
node last). ``next_actions`` looks at the rollout record and its node records and returns a
``Plan``: the events to persist and the steps to run now. No I/O, no clocks; the engine calls
``next_actions`` again after every event it records (an admin command, a step's outcome).

How the engine uses a ``Plan``, in this order (like raft's ``Ready``):

1. Persist ``rollout_events`` and ``node_events`` in one transaction, BEFORE any step of the
   plan is sent (``apply_plan`` computes the new records).
2. Make sure every step in ``steps`` is running. ``steps`` is level-triggered: it lists every
   step that should be running now, so the same step shows up on every call until its outcome
   is recorded. Start only the steps that are not already running; running a step again after a
   crash is safe because steps are idempotent (keyed by rollout id + node + step).
3. Record each outcome: a result event for PREFLIGHT, STAGE, SWITCH, CONFIRM
   (``NodeRecord.with_event``), ``scope_frozen`` set or cleared for FREEZE and UNFREEZE.

Decisions, in the order ``next_actions`` makes them:

* Halt: in ``running`` or ``paused``, more failed/rolled-back nodes than ``failure_budget`` →
  ``failure_budget_exceeded`` (the rollout drains to ``halted``).
* Draining (``halting``, ``aborting``): every ``pending`` node and every ``staged`` node (it
  has not begun its switch) is skipped; on an abort also every node still in ``preflight`` or
  ``staging`` (nothing live changed; its step's result is dropped); other nodes in a working
  state finish their step.
* Stage: a change that stages no certificate (``CHANGES``) has its ``staging`` nodes moved on
  with ``stage_skipped``; no stage step runs for it.
* Start: only in ``running``; the first ``pending`` nodes in ``order`` while fewer than
  ``max_parallel`` nodes are in flight (from leaving ``pending`` until a terminal state).
  Pipelining (``prepare_ahead`` > 0): up to ``prepare_ahead`` more nodes may be in
  ``preflight``, ``staging`` or ``staged`` meanwhile; those steps change nothing live on a node.
  At the rollout's start (no node has begun its switch yet) they start only while no node is
  in ``preflight`` or ``staging`` (once the first ``max_parallel`` nodes are staged: their
  switches wait for nothing else); later whenever the count allows.
* Switch: ``staged`` nodes begin their switch in ``running`` and ``paused`` (pause stops new
  nodes, not nodes in flight). Pipelining: at most ``max_parallel`` nodes switch or confirm at
  once, and a staged node begins only when no node before it in ``order`` is still to begin
  (the switch order is the rollout's order; a node prepared early waits its turn), and none
  begins while the rollout is paused (staged, nothing live has changed on it: the pause holds
  it, as it holds a pending node; without pipelining a staged node is the one whose turn
  had begun, and it switches); nor is a scope freeze begun for it. With
  ``FreezeMode.SCOPE`` the first switch waits until every node in scope that has not failed or
  been skipped is frozen; until then the plan holds FREEZE steps.
* Settle: no node pending or in flight → UNFREEZE steps for frozen nodes; once none is frozen,
  ``nodes_settled`` (the rollout ends ``completed``, ``halted`` or ``aborted``), or for a
  transitional phase 1 in ``running``/``paused`` with a node ``dual``: ``nodes_dual`` (it
  waits in ``awaiting_finalize``). The rollout never ends or waits while a node may still be
  frozen.

A terminal or waiting rollout never starts a node; its plan is empty.

The transitional strategy's phase 2 (``finalize_request``, ``awaiting_verdict``) and the
``--when-quiet`` gate (``held`` in ``next_actions``: pending nodes that may not start yet,
decided by the engine from the clients each node has seen) are described in
``leader.rollout_core``.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from leader import agent_features
from leader.rollout_core import (
    BLOCKED,
    BLOCKED_HTTP,
    CHANGES,
    DOWN_ON_HTTP,
    DRAINING_ROLLOUT_STATES,
    FAILED_NODE_STATES,
    IN_FLIGHT_NODE_STATES,
    LEFT_AS_IS,
    LEFT_OFFLINE,
    SERVER_DOWN,
    STEP_FOR_STATE,
    TERMINAL_NODE_STATES,
    TERMINAL_ROLLOUT_STATES,
    Change,
    FreezeMode,
    NodeEvent,
    NodeObservation,
    NodeRecord,
    NodeState,
    Password,
    Rollout,
    RolloutEvent,
    RolloutState,
    Scope,
    ScopeKind,
    Step,
    Strategy,
    already_done,
    blocked_too_old,
    cut_off_halts,
    cut_off_mid_switch,
    cut_off_reason,
    down_on_http,
    down_on_https,
    left_cut_off,
    left_unknown,
    left_way_on,
    needs_https_first,
    node_transition,
    nodes_remove,
    not_on_https_refusal,
    rollout_transition,
    still_dual,
    wrong_source,
)
from tlsroll import echo
from tlsroll.clients import NOT_QUIET
from tlsroll.enums import CONFIG_UNREADABLE
from tlsroll.errors import TerminalError


class PlanError(TerminalError):
    """A rollout cannot be planned for this scope; the message says which nodes and why."""


class EmptyScope(PlanError):
    def __init__(self) -> None:
        super().__init__("no enrolled node in scope: enrol a node first")


class UnknownNodes(PlanError):
    """Names no enrolled node has (NOT_FOUND: an unknown name is no usage error, review
    s47rtin L6); each named as given if it is plain, else escaped and cut (``tlsroll.echo``),
    ten at most."""

    def __init__(self, names: Sequence[str], *, local: bool = False) -> None:
        said = _some([_as_given(n) for n in names])
        if local:  # (the admin named no node: say which one scope local is, and why)
            super().__init__(
                f"scope local is the leader node, {said} (node_name in leader.toml), and no "
                f"enrolled node has that name: enrol its agent first (tlsroll token create "
                f"--node {said} --address IP --print-join-command), or name the nodes with "
                "--nodes (see `tlsroll nodes`)"
            )
        else:
            super().__init__(f"not enrolled: {said} (check the names with `tlsroll nodes`)")
        self.names = tuple(names)


def _as_given(name: str) -> str:
    """``name`` as given if it is printable, short and no secret; else ``echo.shown``."""
    plain = name.isprintable() and not any(c in name for c in " ,'\"")
    if plain and 0 < len(name) <= echo.LIMIT and echo.secret_kind(name) is None:
        return name
    return echo.shown(name)


class UnknownRollout(PlanError):
    """The rollout a command names is not one it can act on (NOT_FOUND)."""


class AlreadyUndone(PlanError):
    """The enable-tls rollout was already taken back by a disable-tls rollout (one per rollout,
    whatever that one's state: a way back that halted is looked at, not started again)."""

    def __init__(self, target: str, by: Rollout, *, named: bool = True) -> None:
        """``named``: the way back named ``target`` (`rollout rollback ID`): the refusal
        says the way back without an id, for every node on https now. Not named (`rollout
        rollback` alone, and no node runs https now): it says that instead of naming the
        very command refused (session 56's README walk)."""
        done = f"rollout {target} was already taken back by rollout {by.id} ({by.state.value})"
        then = (
            "see: tlsroll schema show; to take back every node on https now: tlsroll rollout "
            "rollback"
            if named
            else "no node runs https now: nothing to take back; see: tlsroll schema show"
        )
        super().__init__(f"{done}; {then}")
        self.target = target
        self.by = by.id
        self.rollout = by


MAX_NAMED = 10
"""Nodes a refusal names one by one; the rest are counted (a message of 500 nodes' errors
outgrew gRPC's 16 KiB limit for status details, and the admin saw "Stream removed")."""


def some_names(items: Sequence[str]) -> str:
    """``items`` joined, the first ``MAX_NAMED`` named and the rest counted."""
    return _some(items)


def _some(items: Sequence[str], noun: str = "") -> str:
    shown = ", ".join(items[:MAX_NAMED])
    more = len(items) - MAX_NAMED
    return shown if more <= 0 else f"{shown} and {more} more{noun}"


class NodesOffline(PlanError):
    """Nodes in scope whose agents are offline: a rollout never leaves one half-way. A start
    may leave it out of its scope (--nodes). A finalize has no scope of its own: it leaves out
    only a node whose agent is cut off (``rollout_core.LEFT_OUT``), so its refusal gives the
    way to that for a machine lost or stolen: ``tlsroll ca revoke`` of its agent's
    certificates (``serials``: each node's, ``Store.agent_serials``; None: not known here)."""

    def __init__(
        self,
        names: Sequence[str],
        change: Change | None = None,
        serials: Mapping[str, Sequence[str]] | None = None,
        cut_off: Collection[str] = (),
    ) -> None:
        lost = [n for n in names if n in cut_off]
        if lost and change is not Change.FINALIZE:
            # offline for good: "bring the agent up" cannot be done (s50)
            up = [n for n in names if n not in cut_off]
            said = f"agent cut off (certificate revoked): {_some(lost)}: {nodes_remove(lost)}"
            if up:
                said = f"offline: {_some(up)} (bring the agent up); {said}"
            super().__init__(f"{said}; or leave them out: --nodes")
            self.names = tuple(names)
            return
        if change is Change.FINALIZE:
            how = (
                f"bring the agent up, or if the machine is lost or stolen: "
                f"{_revoke_commands(names, serials)}, then finalize leaves it out (it stays on "
                f"http and https; `tlsroll nodes remove {names[0] if len(names) == 1 else 'NAME'}`"
                " once the rollout has ended revokes its server's certificate)"
            )
        else:
            how = "bring the agent up, or leave it out: --nodes"
        super().__init__(f"offline: {_some(names)} ({how})")
        self.names = tuple(names)


def _revoke_commands(names: Sequence[str], serials: Mapping[str, Sequence[str]] | None) -> str:
    """The `tlsroll ca revoke` that cut the agents of ``names`` off (``NodesOffline``)."""
    if serials is None or len(names) > MAX_NAMED or not all(serials.get(n) for n in names):
        return (
            "`tlsroll ca revoke SERIAL` with its agent's serial (`tlsroll certs check-expiration`)"
        )
    one = len(names) == 1
    said = [
        " and ".join(f"`tlsroll ca revoke {s}`" for s in serials[n]) + ("" if one else f" ({n})")
        for n in names
    ]
    return _some(said)


class NeedsAdmin(PlanError):
    """Nodes whose agents say they need the admin (a journal put back from a copy made
    mid-switch, which what the server runs does not settle: ``nodeagent.journal``): their
    agents refuse to stage, switch or roll back, so a plan with them is refused, naming them
    with what to do."""

    def __init__(self, why: Mapping[str, str]) -> None:
        names = sorted(why)
        said = _some([f"{n} {why[n]}" for n in names])
        super().__init__(f"{said}; or leave the node out (--nodes)")
        self.names = tuple(names)


class StoreBehind(PlanError):
    """Nodes in scope whose agents have seen a higher epoch than the rollout would carry: the
    leader's store is behind them (restored from a backup, or the copy kept before an upgrade
    put back). Their agents refuse its commands as from a stale leader, so such a start only
    halts at its first step, and its retry keeps the epoch: refused up front, with the way
    out (``tlsroll epoch advance``), from the epochs the agents' heartbeats report."""

    def __init__(self, ahead: Mapping[str, int], epoch: int) -> None:
        names = sorted(ahead)
        super().__init__(
            f"the leader's store is behind {_some(names)} (seen epoch {max(ahead.values())}; "
            f"this rollout's would be {epoch}): restored from a backup, or an older copy put "
            "back; run tlsroll epoch advance (see tlsroll epoch show), then plan again; nothing "
            "was changed"
        )
        self.names = tuple(names)


class Unreachable(PlanError):
    """Nodes whose agents could not be asked what they run (the plan needs to know), or whose
    agents answered but not their managed servers (``SERVER_DOWN``): each named with what to
    do, "bring the agent up" only where the agent did not answer (review s46rt2 L4)."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        names = sorted(errors)
        down = [n for n in names if errors[n].startswith(SERVER_DOWN)]
        agents = [n for n in names if n not in down]
        said = []
        if agents:
            # (and an agent's failed call without its "agent NODE: ", said before it too)
            what = _some(
                [f"{n}: {errors[n].removeprefix(f'agent {n}: ')}" for n in agents],
                " (tlsroll nodes --check)",
            )
            said.append(
                f"cannot ask the agent of {_some(agents)} what it runs ({what}); "
                "bring the agent up or leave the node out (--nodes)"
            )
        unreadable = [n for n in down if errors[n].startswith(SERVER_DOWN + CONFIG_UNREADABLE)]
        down = [n for n in down if n not in unreadable]
        # Each server's error without the "the managed server: " the sentence says before it
        # (session 68: "its managed server does not (srv3: the managed server: managed server
        # not answering …)").
        if down:
            what = _some(
                [f"{n}: {errors[n].removeprefix(SERVER_DOWN)}" for n in down], " (tlsroll nodes)"
            )
            its, verb = (
                ("its agent answers, its managed server does not", "runs")
                if len(down) == 1
                else ("their agents answer, their managed servers do not", "run")
            )
            said.append(
                f"cannot tell what {_some(down)} {verb}: {its} ({what}); "
                "start the server or leave the node out (--nodes)"
            )
        if unreadable:
            # (review rev58a H1: "bring the agent up" for a config edited by hand)
            cut = SERVER_DOWN + CONFIG_UNREADABLE  # (then ", fix the file: <what>")
            what = _some(
                [f"{n}: {errors[n].removeprefix(cut).removeprefix(', ')}" for n in unreadable],
                " (tlsroll nodes)",
            )
            said.append(
                f"cannot tell what {_some(unreadable)} "
                f"{'runs' if len(unreadable) == 1 else 'run'}: the managed server's config "
                f"cannot be read ({what}); fix the file or leave the node out (--nodes)"
            )
        super().__init__("; ".join(said))
        self.names = tuple(names)


class NoneReachable(PlanError):
    """The way back (disable-tls) found no node it could take back now: every node in scope
    is on http already or left as is (offline, or its agent could not say what it runs)."""

    def __init__(self, change: Change, left: Mapping[str, str], done: Mapping[str, str]) -> None:
        names = sorted(left)
        said = _some([f"{n} ({left[n].split(LEFT_AS_IS)[0].rstrip(':; ')})" for n in names])
        on_http = f"; on http already: {_some(sorted(done))}" if done else ""
        if all(left[n] == LEFT_OFFLINE for n in names):
            them = "it is" if len(names) == 1 else "they are"
            then = f"run tlsroll rollout rollback again once {them} back"
        else:  # "once it is back" only of an agent that is off (review s45rev9 L1)
            then = "; ".join(f"{n}: {left_way_on(left[n])}" for n in names)
        super().__init__(
            f"{change.value} has no node to take back now: {said}{on_http}; nothing was "
            f"changed: {then}"
        )
        self.names = tuple(names)


class WrongSource(PlanError):
    """Nodes that serve what the change cannot start from (a dual node under anything but
    finalize or the way back): named, with what to run instead."""

    def __init__(self, change: Change, why: Mapping[str, str]) -> None:
        by_reason: dict[str, list[str]] = {}
        for name, reason in sorted(why.items()):
            by_reason.setdefault(reason, []).append(name)
        what = "; ".join(f"{', '.join(names)}: {w}" for w, names in by_reason.items())
        super().__init__(f"{change.value} cannot start on {what}")
        self.names = tuple(sorted(why))


class NotOnHttps(PlanError):
    """A change that starts from https asked of nodes on http only (FAILED_PRECONDITION): the
    start is refused before any node is touched; its preflight would fail each of them, and a
    retry could only fail again (audit s38 M5)."""

    def __init__(self, change: Change, names: Sequence[str]) -> None:
        super().__init__(not_on_https_refusal(change.value, _some(list(names)), len(names)))
        self.names = tuple(names)


def not_on_https(records: Sequence[NodeRecord]) -> tuple[str, ...]:
    """The nodes ``plan_rollout`` marked ``BLOCKED_HTTP``: a start of the plan is refused."""
    return tuple(r.name for r in records if r.reason == BLOCKED_HTTP)


class AgentsTooOld(PlanError):
    """Nodes whose agents lack a feature the change needs (FAILED_PRECONDITION): the start is
    refused before any node is touched; the agent would drop what it does not know unread
    (proto3) and do something else (a transitional phase 1 would close http)."""

    def __init__(self, change: Change, reasons: Mapping[str, str]) -> None:
        names = sorted(reasons)
        what = [f"{n} ({reasons[n].removeprefix(BLOCKED).strip()})" for n in names]
        one = len(names) == 1
        super().__init__(
            f"{change.value} cannot start: {_some(what)} (or leave {'it' if one else 'them'} "
            "out: --nodes); nothing was changed"
        )
        self.names = tuple(names)


def too_old(records: Sequence[NodeRecord]) -> dict[str, str]:
    """The nodes ``plan_rollout`` marked blocked as their agents are too old, with the reason:
    a start of the plan is refused (``AgentsTooOld``)."""
    return {r.name: r.reason for r in records if blocked_too_old(r.reason)}


class BlockedAtOnce(PlanError):
    """Nodes the start would preflight at once (its first ``max_parallel`` stepped nodes and
    the ``prepare_ahead`` after them: ``blocked_at_once``) that
    the plan marks ``blocked: <why>`` by their agents' checks, more than the failure budget
    takes (FAILED_PRECONDITION): the start is refused with the plan's reasons, as one with a
    node on http only or an agent too old is. Before, it was accepted and halted at once at
    that preflight, nothing done (a systemd/exec template missing, say: brief s67 engine (a));
    no fix can come "meanwhile" for a node stepped first."""

    def __init__(
        self,
        change: Change,
        reasons: Mapping[str, str],
        *,
        retry_of: str = "",
        others: Sequence[str] = (),
    ) -> None:
        names = list(reasons)
        what = [f"{n} ({reasons[n].removeprefix(BLOCKED).strip()})" for n in names]
        them = "it" if len(names) == 1 else "them"
        if not retry_of:
            how = f"fix that, or leave {them} out (--nodes)"
        else:
            # A retry has no --nodes (brief s67 engine2 (7)): it is run again once fixed, or
            # the change started anew over the others (``others``: the retry's other nodes).
            how = f"fix that, then run tlsroll rollout retry {retry_of} again"
            if others:
                how += (
                    f"; or start {change.value} anew without {them}: tlsroll rollout start "
                    f"--change {change.value} --nodes {','.join(others)}"
                )
        super().__init__(
            f"{change.value} cannot start: its first step would fail at once on {_some(what)}: "
            f"{how}; nothing was changed"
        )
        self.names = tuple(names)


AT_ONCE_REFUSED = frozenset({Change.ENABLE_TLS, Change.ROTATE_CERT, Change.CHANGE_PASSWORD})
"""The changes whose start is refused when a node it steps at once is blocked by its checks
(``BlockedAtOnce``): those an admin starts with --nodes, to leave a node out. Not the way back
(the emergency path, whose prompt names each blocked node with its reasons) nor a finalize."""


def blocked_at_once(
    stepped: Sequence[tuple[str, str]],
    max_parallel: int,
    failure_budget: int,
    *,
    prepare_ahead: int,
) -> dict[str, str]:
    """Of ``stepped``, the (name, reason) of each node a plan steps, in its order, those the
    start would preflight at once that are ``blocked: …``, with their reasons, if there are
    more of them than ``failure_budget`` allows to fail (the rollout would halt there at once:
    ``BlockedAtOnce``); else none. At once: the first ``max_parallel`` and the
    ``prepare_ahead`` (the leader's, ``next_actions``) after them, which are preflighted in the
    plan that begins the first switch, seconds after the start (review s67 rev2 M3: with the
    first max_parallel alone, a blocked second node was accepted and halted the rollout with
    only the first switched). A node blocked further on is not refused: its preflight comes
    once a node before it has switched, and it may be fixed by then (its plan says it)."""
    first = stepped[: max(max_parallel, 1) + max(prepare_ahead, 0)]
    blocked = {name: reason for name, reason in first if reason.startswith(BLOCKED)}
    return blocked if len(blocked) > failure_budget else {}


class NoPasswordStaged(PlanError):
    """A change that applies the staged password, and none is staged (FAILED_PRECONDITION: the
    cluster's state, not the command, is what is missing)."""

    def __init__(self) -> None:
        super().__init__("no password staged: run `tlsroll password set` first")


class StagedPasswordUnusable(PlanError):
    """The staged password version a change would apply (or ``CheckPassword`` is asked about)
    holds a verifier this leader does not take (FAILED_PRECONDITION): one staged under the
    tests' scrypt hook (``tlsroll.kdfhook``), read without it (review s75 revpwkdf: a
    change-password rollout planned with the older version's digest, and CheckPassword
    answered INTERNAL). ``why``: ``password.verifier_from_json``'s line (never the hash)."""

    def __init__(self, version: int, why: str) -> None:
        super().__init__(
            f"password version {version}'s verifier is refused ({why}): stage the password"
            " again with `tlsroll password set`"
        )


class NotAwaitingFinalize(PlanError):
    """Finalize asked of a rollout that is not a transitional one awaiting it
    (FAILED_PRECONDITION)."""


class NothingToUndo(PlanError):
    """No enable-tls rollout to take back, or it switched no node (FAILED_PRECONDITION)."""


REVOKED_SERVED = (
    "the certificate served is revoked (tlsroll ca revoke), and clients, which read no "
    "revocation list, take it until its end: replace it now: {command}"
)
"""What a node skipped as done says if it serves a certificate the admin revoked
(``NodeObservation.cert_revoked``): enable-tls leaves a node on https alone, so "nothing to
do" hid it (the expiry watch, the viewer and the metrics flag it; ``auto_rotate`` rotates
it in the window)."""


def rotate_command(names: Sequence[str]) -> str:
    """The rotate-cert that replaces the served certificates of ``names``: every one named,
    however many (review rvc of s66-misc, L1: past ``MAX_NAMED`` it said ``--nodes NAMES``, a
    command that could not be run, while the names before it were cut at ten). A node's name
    needs no quoting (``tlsroll.names.NODE_NAME``)."""
    return f"tlsroll rollout start --change rotate-cert --nodes {','.join(names)}"


def revoked_served(names: Sequence[str]) -> str:
    """``REVOKED_SERVED`` for ``names``."""
    return REVOKED_SERVED.format(command=rotate_command(names))


NO_SETTINGS_SKIP = (
    "its agent's journal holds no settings for the https it serves (reinitialised, or put back "
    "from an older copy): workstations cannot enrol at its bootstrap port until a switch: {command}"
)
"""What a node skipped as done says if its agent's journal holds no settings for the https its
server serves (``NodeObservation.no_settings``): no bootstrap service runs there, and "nothing
to do" was a dead end (session 75 https9443); a rotate-cert stages them again."""


def no_settings_skip(names: Sequence[str]) -> str:
    """``NO_SETTINGS_SKIP`` for ``names``."""
    return NO_SETTINGS_SKIP.format(command=rotate_command(names))


class NothingToDo(PlanError):
    """Every node in scope already runs what the change wants."""

    def __init__(
        self,
        change: Change,
        done: Mapping[str, str],
        revoked: Sequence[str] = (),
        no_settings: Sequence[str] = (),
    ) -> None:
        names = ", ".join(sorted(done))
        # A down server whose config serves http runs nothing: its words, not "runs" (review
        # s46rev3 L1).
        down = sorted(name for name, why in done.items() if why == DOWN_ON_HTTP)
        said = f"; {', '.join(down)}: {DOWN_ON_HTTP}" if down else ""
        # ... and one that serves a revoked certificate is not left to look fine.
        if revoked:
            said += f"; {_some(sorted(revoked))}: {revoked_served(sorted(revoked))}"
        # ... nor one whose agent serves no workstation port for want of its settings.
        if no_settings:
            said += f"; {_some(sorted(no_settings))}: {no_settings_skip(sorted(no_settings))}"
        super().__init__(
            f"nothing to do: every node in scope ({names}) already runs what {change.value} "
            f"wants{said} (see: tlsroll nodes, tlsroll schema show)"
        )
        self.revoked = tuple(sorted(revoked))


class InconsistentRecords(TerminalError):
    """The node records do not match the rollout's order (a bug or a damaged store)."""


@dataclass(frozen=True)
class NodeEventAction:
    """Apply ``event`` to node ``node`` (persisted before any step of the same plan runs)."""

    node: str
    event: NodeEvent
    reason: str | None = None


@dataclass(frozen=True)
class StepAction:
    """Run ``step`` on node ``node``, the command carrying the rollout's ``epoch``."""

    node: str
    step: Step
    epoch: int


@dataclass(frozen=True)
class Plan:
    """What to do now for one rollout; see the module docstring for the order."""

    epoch: int
    rollout_events: tuple[RolloutEvent, ...] = ()
    node_events: tuple[NodeEventAction, ...] = ()
    steps: tuple[StepAction, ...] = ()

    @property
    def nodes_with_events(self) -> tuple[str, ...]:
        """Names of the nodes that get any event in this plan (a node may get two)."""
        return tuple(a.node for a in self.node_events)

    def nodes_with_event(self, event: NodeEvent) -> tuple[str, ...]:
        """Names of the nodes that get ``event`` in this plan, in rollout order."""
        return tuple(a.node for a in self.node_events if a.event is event)

    def nodes_with_step(self, step: Step) -> tuple[str, ...]:
        """Names of the nodes on which ``step`` should be running, in rollout order."""
        return tuple(a.node for a in self.steps if a.step is step)


def order_nodes(names: Iterable[str], leader: str) -> tuple[str, ...]:
    """Nodes sorted by name, the leader node last."""
    return tuple(sorted(names, key=lambda name: (name == leader, name)))


def settled_at_start(
    change: Change,
    seen: NodeObservation,
    target_digest: str = "",
    strategy: Strategy = Strategy.DIRECT,
    dual_from: str = "",
) -> tuple[NodeState, str] | None:
    """The terminal state a node ``seen`` so starts a planned rollout in, with the reason:
    ``dual`` (``dual_from``: ``still_dual``, as phase 1 left it) or ``skipped``
    (``already_done``); None: the rollout steps it (``plan_rollout``; a start's first
    channels go to such nodes, ``leader.observe.FirstSteps``)."""
    if dual_from and still_dual(seen, target_digest):
        return NodeState.DUAL, (
            f"dual since rollout {dual_from}: on http and https with a certificate of "
            "this CA; finalize closes http here too"
        )
    if why := already_done(change, seen, target_digest, strategy):
        return NodeState.SKIPPED, why
    return None


def plan_rollout(
    *,
    rollout_id: str,
    change: Change,
    scope: Scope,
    enrolled: Mapping[str, bool],
    leader: str,
    epoch: int,
    strategy: Strategy = Strategy.DIRECT,
    max_parallel: int = 1,
    failure_budget: int = 0,
    freeze: FreezeMode = FreezeMode.NODE,
    observed: Mapping[str, NodeObservation] | None = None,
    target_digest: str = "",
    dual_from: str = "",
    agents: Mapping[str, tuple[str, Collection[str]]] | None = None,
    own_certificates: bool = False,
    finalizes: str = "",
    left_out: Mapping[str, str] | None = None,
    cut_off: Collection[str] = frozenset(),
    not_heard: Collection[str] = frozenset(),
    when_quiet: bool = False,
    epochs_seen: Mapping[str, int] | None = None,
) -> tuple[Rollout, tuple[NodeRecord, ...]]:
    """Make the records of a new, ``planned`` rollout.

    ``enrolled`` maps every enrolled node's name to whether it is online now (the caller
    decides, e.g. from heartbeats); ``leader`` is the leader node's name. Scope ``local`` is the
    leader node alone, ``cluster`` every enrolled node; a node list is de-duplicated. Raises
    ``UnknownNodes``, ``NodesOffline`` or ``EmptyScope``, each naming every offending node.

    ``observed``: what each node's agent reports it runs now. A node already in the state the
    change wants (``already_done``) starts ``skipped`` with the reason, so nothing is done to
    it twice; a node whose agent cannot be asked is ``Unreachable``; if no node is left to
    change, ``NothingToDo``. A node on http only under a change that starts from https is
    ``BLOCKED_HTTP`` (``not_on_https``: the start refuses the plan, ``NotOnHttps``); one whose
    read-only preflight checks found problems is ``blocked: <them>`` (among the first nodes
    a start preflights at once, its first max_parallel + prepare_ahead, the start is refused:
    ``blocked_at_once``; further on, it starts, and fails there unless they are fixed
    meanwhile).

    ``agents``: each node's agent version and the features it reported (``Node.agent_features``).
    A node the rollout steps whose agent lacks a feature the rollout's requests need
    (``agent_features.rollout_needs``; ``own_certificates``: ``--cert-dir``) is ``blocked: its
    agent (tlsroll V) is too old for …: upgrade it first`` (``too_old``: the start refuses the
    plan, ``AgentsTooOld``). Missing: not checked. ``not_heard``: the nodes whose agents the
    leader has not heard since it started, for which ``agents`` holds what the store kept (a
    former leader process's, which a killed leader may have left without the agent's first
    heartbeat): one that lacks a feature there is blocked saying so, to wait for its first
    heartbeat (``agent_features.not_heard``), not "upgrade it" (review of s63-f1, L-3).

    ``dual_from``: this is a retry of that transitional phase 1 (``rollout retry``). A node
    that still serves http and https with a certificate of this CA and the password of
    ``target_digest`` (``still_dual``) starts ``dual``, as phase 1 left it, not ``skipped``:
    the retry's finalize must close http there too, or the node would serve http for good
    (the halted rollout is never finalized, and a new one would skip the node).

    ``left_out`` (a finalize): nodes of the scope whose agents are cut off, with their reasons
    (``rollout_core.left_out_reason``): ``skipped`` with it, neither asked nor in the way, and
    the rollout may leave out every node it has (it then completes at once, ending phase 1).

    ``epochs_seen``: the highest epoch each node's agent reports it has seen (its heartbeats):
    a node in scope that has seen one above ``epoch`` refuses the rollout's commands, so the
    plan is refused (``StoreBehind``), whatever the store recorded.

    ``cut_off``: the enrolled nodes whose agents are cut off (their certificates on record
    revoked: a machine lost or stolen), offline for good. The way back leaves one as is
    saying so and what to do instead (``left_cut_off``: `tlsroll nodes remove`), not "again
    once its agent is back" (``LEFT_OFFLINE``), which it never is (s48lost).
    """
    if scope.kind is ScopeKind.LOCAL:
        names: Sequence[str] = (leader,)
    elif scope.kind is ScopeKind.CLUSTER:
        names = tuple(enrolled)
    else:
        names = tuple(dict.fromkeys(scope.names))
    unknown = sorted(name for name in names if name not in enrolled)
    if unknown:
        raise UnknownNodes(unknown, local=scope.kind is ScopeKind.LOCAL)
    if not names:
        raise EmptyScope()
    out = {n: why for n, why in (left_out or {}).items() if n in names}
    offline = sorted(name for name in names if not enrolled[name] and name not in out)
    # The way back is the emergency path: a node whose agent is off, or cannot say what it
    # runs, is left as is (named, with what to do), not in the way of the others (review
    # s45rt1 H1: one switched-off machine refused `rollout rollback` for every node).
    left: dict[str, str] = {}
    if offline and change is Change.DISABLE_TLS:
        left = {n: left_cut_off(n) if n in cut_off else LEFT_OFFLINE for n in offline}
    elif offline:
        raise NodesOffline(offline, change, cut_off=cut_off)
    # What the nodes report, not what the store recorded, decides here too: an agent that has
    # seen a higher epoch refuses every command of this rollout (``StoreBehind``).
    seen_epochs = epochs_seen or {}
    ahead = {
        n: seen_epochs[n]
        for n in names
        if n not in left and n not in out and seen_epochs.get(n, 0) > epoch
    }
    if ahead:
        raise StoreBehind(ahead, epoch)
    done: dict[str, str] = {}
    dual: dict[str, str] = {}
    if observed is not None:
        asked = [n for n in names if n not in left and n not in out]
        admin = {n: observed[n].needs_admin for n in asked if observed[n].needs_admin}
        unreachable = {
            n: observed[n].error
            for n in asked
            if not observed[n].reachable
            and not down_on_https(change, observed[n])
            and not down_on_http(change, observed[n])  # (``already_done`` says why)
        }
        if change is Change.DISABLE_TLS:
            left |= {n: left_unknown(unreachable[n], admin.get(n, "")) for n in unreachable}
        elif admin:
            raise NeedsAdmin(admin)
        elif unreachable:
            raise Unreachable(unreachable)
        wrong: dict[str, str] = {}
        revoked: list[str] = []  # skipped as done, serving a revoked certificate
        unset: list[str] = []  # skipped as done, their journals without the https settings
        for name in asked:
            if name in left:
                continue
            if settled := settled_at_start(
                change, observed[name], target_digest, strategy, dual_from
            ):
                state, reason = settled
                if state is NodeState.SKIPPED and observed[name].cert_revoked:
                    revoked.append(name)
                    reason = f"{reason}; {revoked_served([name])}"
                if state is NodeState.SKIPPED and observed[name].no_settings:
                    unset.append(name)
                    reason = f"{reason}; {no_settings_skip([name])}"
                (dual if state is NodeState.DUAL else done)[name] = reason
            elif why := wrong_source(change, observed[name], strategy, finalizes):
                wrong[name] = why
        if wrong:
            raise WrongSource(change, wrong)
        if len(done) == len(names):
            raise NothingToDo(change, done, revoked, unset)
        if len(done) + len(left) == len(names):
            raise NoneReachable(change, left, done)
    elif left and len(left) == len(names):  # nothing asked (no agents): only they are known
        raise NoneReachable(change, left, {})
    order = order_nodes(names, leader)
    needs = agent_features.rollout_needs(change, strategy, freeze, own_certificates, when_quiet)
    rollout = Rollout(
        id=rollout_id,
        change=change,
        scope=scope,
        order=order,
        epoch=epoch,
        strategy=strategy,
        max_parallel=max_parallel,
        failure_budget=failure_budget,
        freeze=freeze,
    )

    def record(name: str) -> NodeRecord:
        if name in out:
            return NodeRecord(name, NodeState.SKIPPED, out[name])
        if name in left:
            return NodeRecord(name, NodeState.SKIPPED, left[name])
        if name in done:
            return NodeRecord(name, NodeState.SKIPPED, done[name])
        if name in dual:
            return NodeRecord(name, NodeState.DUAL, dual[name])
        seen = observed.get(name) if observed is not None else None
        if seen is not None and needs_https_first(change, seen):  # start refuses it
            return NodeRecord(name, reason=BLOCKED_HTTP)
        agent = agents.get(name) if agents is not None else None
        judge = agent_features.not_heard if name in not_heard else agent_features.too_old
        if agent is not None and (why := judge(*agent, needs)):
            return NodeRecord(name, reason=f"{BLOCKED} {why}")  # start refuses it
        if seen is not None and seen.problems:  # its preflight will fail: say so up front
            return NodeRecord(name, reason=f"{BLOCKED} {'; '.join(seen.problems)}")
        return NodeRecord(name)

    return rollout, tuple(record(name) for name in order)


# The states of a node being prepared (nothing live changed yet) and of a node that may have
# begun to change live (its switch slot).
PREPARING = frozenset({NodeState.PREFLIGHT, NodeState.STAGING, NodeState.STAGED})
SWITCH_SLOT = IN_FLIGHT_NODE_STATES - PREPARING
_BEING_PREPARED = PREPARING - {NodeState.STAGED}


@dataclass(frozen=True)
class Census:
    """Where a rollout's nodes stand: for each state, the positions (in the rollout's order)
    of its nodes, sorted; and the positions of the ones that may be scope-frozen (confirmed or
    asked: ``NodeRecord.may_be_frozen``).

    Why: ``next_actions`` runs after every step outcome. Deciding from the records alone took
    about ten passes over every node each time, so the leader's CPU per node grew with the
    rollout's size (issue 15). With a census it looks only at the nodes it names (the first
    pending ones, the staged and in-flight ones), and the store moves the census along with
    every record it saves (``moved``) instead of counting again."""

    size: int
    by_state: Mapping[NodeState, tuple[int, ...]]
    frozen: tuple[int, ...] = ()

    @classmethod
    def of(cls, records: Sequence[NodeRecord]) -> Census:
        """Count ``records`` (in the rollout's order): one pass."""
        by: dict[NodeState, list[int]] = {}
        frozen = []
        for i, r in enumerate(records):
            by.setdefault(r.state, []).append(i)
            if r.may_be_frozen:
                frozen.append(i)
        return cls(len(records), {s: tuple(p) for s, p in by.items()}, tuple(frozen))

    def at(self, state: NodeState) -> tuple[int, ...]:
        """The positions of the nodes in ``state``, in order."""
        return self.by_state.get(state, ())

    def count(self, states: Iterable[NodeState]) -> int:
        return sum(len(self.at(s)) for s in states)

    def moved(self, position: int, old: NodeRecord, new: NodeRecord) -> Census:
        """This census after the node at ``position`` went from record ``old`` to ``new``."""
        if old.state is new.state and old.may_be_frozen == new.may_be_frozen:
            return self
        by = dict(self.by_state)
        if old.state is not new.state:
            if left := _without(by.get(old.state, ()), position):
                by[old.state] = left
            else:
                by.pop(old.state, None)  # no empty states: a census equals a fresh count
            by[new.state] = _with(by.get(new.state, ()), position)
        frozen = self.frozen
        if old.may_be_frozen != new.may_be_frozen:
            frozen = (_with if new.may_be_frozen else _without)(frozen, position)
        return Census(self.size, by, frozen)


def _with(positions: tuple[int, ...], position: int) -> tuple[int, ...]:
    i = bisect.bisect_left(positions, position)
    if i < len(positions) and positions[i] == position:
        return positions
    return (*positions[:i], position, *positions[i:])


def _without(positions: tuple[int, ...], position: int) -> tuple[int, ...]:
    i = bisect.bisect_left(positions, position)
    if i < len(positions) and positions[i] == position:
        return positions[:i] + positions[i + 1 :]
    return positions


class _Tally:
    """``next_actions``' working view: the census with the plan's moves so far."""

    def __init__(self, census: Census, records: Sequence[NodeRecord]) -> None:
        self.census = census
        self.records = records
        self.moved: dict[int, NodeState] = {}
        self.lists: dict[NodeState, list[int]] = {}

    def state(self, position: int) -> NodeState:
        moved = self.moved.get(position)
        return self.records[position].state if moved is None else moved

    def at(self, state: NodeState) -> Sequence[int]:
        return self.lists[state] if state in self.lists else self.census.at(state)

    def among(self, states: Iterable[NodeState]) -> list[int]:
        """The positions of the nodes in any of ``states``, in order."""
        return sorted(itertools.chain.from_iterable(self.at(s) for s in states))

    def count(self, states: Iterable[NodeState]) -> int:
        return sum(len(self.at(s)) for s in states)

    def move(self, position: int, new: NodeState) -> None:
        old = self.state(position)
        if old is new:
            return
        for state in (old, new):
            if state not in self.lists:
                self.lists[state] = list(self.census.at(state))
        self.lists[old].remove(position)
        bisect.insort(self.lists[new], position)
        self.moved[position] = new


def next_actions(
    rollout: Rollout,
    nodes: Sequence[NodeRecord],
    held: frozenset[str] = frozenset(),
    *,
    prepare_ahead: int = 0,
    census: Census | None = None,
    lapsed: Collection[str] = frozenset(),
    unsent: Collection[str] = frozenset(),
    cut_off: Collection[str] = frozenset(),
    unanswered: Collection[str] = frozenset(),
) -> Plan:
    """Decide what happens now; safe to call any number of times (it only reads).

    ``held``: pending nodes that may not start yet (``--when-quiet``: http clients were seen
    on them lately); the others start in order past them. ``prepare_ahead``: how many nodes
    beyond ``max_parallel`` may be preflighted and staged while others switch (0: a node starts
    only when one has ended, as the seed does). ``census``: ``Census.of(nodes)``, kept by the
    caller (then ``nodes`` must be in the rollout's order, as the stores keep them, and only
    the records of the nodes the plan looks at are read); counted here if not given.
    ``lapsed`` (``--freeze scope``): nodes recorded ``scope_frozen`` whose freeze the leader
    cannot count on now (no confirmation within what its lease still covers, or none seen by
    this process): no node switches while one is, and they are frozen again, as a node not
    yet frozen is. The waiting node stays ``staged`` (an abort skips it), not ``switching``.
    ``unsent`` (``--freeze scope``): ``switching`` nodes whose Switch the engine holds for such
    a node and whose agent has no switch of this rollout (a leader restarted meanwhile:
    ``Engine._gated_switch``): a halt or an abort skips them (``skip_unsent``), as it skips
    a staged node; never while the rollout runs or pauses, unless cut off (below).
    ``cut_off``: nodes whose agents are cut off (their certificates on record revoked: a
    machine lost or stolen), which the leader sends nothing. One not yet at its switch
    (pending, preflight, staging or staged: what an abort skips) is ``skipped`` with
    ``rollout_core.cut_off_reason``: a finalize leaves it out (the left-out reason), as a
    finalize started after the revocation does (``plan_rollout``'s ``left_out``), and the
    way back leaves it as is (``left_cut_off``), the others going on; any other change halts
    (``RolloutEvent.NODE_CUT_OFF``), as its start refuses the node (``NodesOffline``): never
    half-switched silently. One ``switching`` whose Switch was never sent (``unsent``) is such
    a node too (``skip_unsent``). One whose switch was sent (switching, confirming) needs
    attention (``cut_off_mid_switch``: its outcome is not known), a failure counted against
    the budget in the same pass. None is frozen, nor holds a switch as lapsed. Before, a
    node revoked while a ``--when-quiet`` finalize held it stayed pending for good (review
    s48rev5 M3), and any other change stepped it (s50). ``unanswered`` (``--freeze scope``):
    ``lapsed`` nodes this leader has not heard confirm a freeze for a renewal period: a
    draining rollout whose every node in flight is one lifts the others' scope freeze without
    waiting for their outcomes (review s69 revfreeze M1)."""
    if census is None:
        records: Sequence[NodeRecord] = _in_order(rollout, nodes)
        census = Census.of(records)
    elif len(nodes) != len(rollout.order) or census.size != len(nodes):
        raise InconsistentRecords(
            f"rollout {rollout.id}: {len(nodes)} node records and a census of {census.size} "
            f"for its {len(rollout.order)} nodes"
        )
    else:
        records = nodes
    state = rollout.state
    if state not in _LIVE_STATES:  # planned or terminal: nothing to do
        return Plan(epoch=rollout.epoch)

    rollout_events: list[RolloutEvent] = []
    failures = census.count(FAILED_NODE_STATES)
    if state in (RolloutState.RUNNING, RolloutState.PAUSED) and failures > rollout.failure_budget:
        rollout_events.append(RolloutEvent.FAILURE_BUDGET_EXCEEDED)
        state = rollout_transition(state, RolloutEvent.FAILURE_BUDGET_EXCEEDED)

    tally = _Tally(census, records)
    name = rollout.order.__getitem__
    node_events: list[NodeEventAction] = []

    def emit(at: int, event: NodeEvent, reason: str | None = None) -> None:
        node_events.append(NodeEventAction(name(at), event, reason))
        tally.move(at, node_transition(tally.state(at), event, f"node {name(at)}"))

    if cut_off:
        # A cut-off node's scope freeze can be neither confirmed nor lifted by the leader (its
        # agent lifts it when the lease ends): its lapse holds no switch of the others, which
        # would wait for it for good (review rev49late); nor is it frozen (again).
        lapsed = [n for n in lapsed if n not in cut_off]
        # Every node not yet at its switch (pending, or prepared: the set an abort skips),
        # not only a pending one: a staged node would go on to switch against the revoked
        # agent, and on a machine gone the rollout would never end (review rev49fin). Any
        # change, not only a finalize (s50): the leader sends a revoked agent no switch.
        halts = False
        for at in [at for at in tally.among(BEFORE_SWITCH) if name(at) in cut_off]:
            emit(at, NodeEvent.SKIP, cut_off_reason(rollout.change, name(at)))
            halts = halts or cut_off_halts(rollout.change)
        # A switching one whose Switch was held at the scope freeze's gate and never sent
        # (``unsent``) is a node before its switch too: skipped, not failed (review of s50 L1).
        for at in [at for at in tally.at(NodeState.SWITCHING) if name(at) in cut_off]:
            if name(at) in unsent:
                emit(at, NodeEvent.SKIP_UNSENT, cut_off_reason(rollout.change, name(at)))
                halts = halts or cut_off_halts(rollout.change)
        # One whose switch was sent: the leader asks it nothing more (what it says cannot be
        # trusted), so its outcome is not known: it needs attention (s50).
        for at in [at for at in tally.among(_MID_SWITCH) if name(at) in cut_off]:
            event = _MID_SWITCH[tally.state(at)]
            emit(at, event, cut_off_mid_switch(name(at)))
        if halts and state in (RolloutState.RUNNING, RolloutState.PAUSED):
            rollout_events.append(RolloutEvent.NODE_CUT_OFF)
            state = rollout_transition(state, RolloutEvent.NODE_CUT_OFF)
        # A node failed just now counts against the budget in this same pass, as a failure
        # counted above: before, the rollout completed (or awaited its finalize) over a node
        # needing attention, the budget never applied (review of s50 H1).
        failures = tally.count(FAILED_NODE_STATES)
        if state in (RolloutState.RUNNING, RolloutState.PAUSED) and (
            failures > rollout.failure_budget
        ):
            rollout_events.append(RolloutEvent.FAILURE_BUDGET_EXCEEDED)
            state = rollout_transition(state, RolloutEvent.FAILURE_BUDGET_EXCEEDED)

    if state in DRAINING_ROLLOUT_STATES:
        why = "rollout aborted" if state is RolloutState.ABORTING else "rollout halted"
        gates = _ABORT_SKIPS if state is RolloutState.ABORTING else _HALT_SKIPS
        for at in tally.among(gates):
            emit(at, NodeEvent.SKIP, why)
        for at in [at for at in tally.at(NodeState.SWITCHING) if name(at) in unsent]:
            emit(at, NodeEvent.SKIP_UNSENT, f"{why}; its switch was never sent")

    if not CHANGES[rollout.change].stages_certificate:
        for at in list(tally.at(NodeState.STAGING)):
            emit(at, NodeEvent.STAGE_SKIPPED)

    def start(limit: int) -> None:
        free = limit - tally.count(IN_FLIGHT_NODE_STATES)
        if free <= 0:
            return
        ready = (at for at in tally.at(NodeState.PENDING) if name(at) not in held)
        for at in list(itertools.islice(ready, free)):
            # A node an agent's fresh look held (``SWITCH_HELD``) starts again without that
            # reason: it said why the node waited, not how it ends.
            emit(at, NodeEvent.START, "" if records[at].reason.startswith(NOT_QUIET) else None)

    if state is RolloutState.RUNNING and prepare_ahead <= 0:
        start(rollout.max_parallel)

    to_freeze: list[str] = []
    staged = list(tally.at(NodeState.STAGED))
    if prepare_ahead > 0 and state is RolloutState.PAUSED:
        staged = []  # prepared ahead, nothing live changed: a pause holds it (and freezes none)
    if staged and rollout.freeze is FreezeMode.SCOPE:
        to_freeze = [
            r.name
            for at, r in enumerate(records)
            if (not r.scope_frozen or r.name in lapsed)
            and tally.state(at) not in (NodeState.FAILED, NodeState.SKIPPED)
            and r.name not in cut_off  # (never asked: its agent is not dialled)
        ]
    # A lapsed node holds the switches whatever its state: a node frozen and then failed is
    # still frozen (and renewed), and a switch counts on it (review 2 of session 32, F1).
    if not to_freeze and not (staged and rollout.freeze is FreezeMode.SCOPE and lapsed):
        if prepare_ahead > 0:
            staged = _switch_turns(rollout, tally, staged, held)
        for at in staged:
            emit(at, NodeEvent.SWITCH)

    if state is RolloutState.RUNNING and prepare_ahead > 0:
        start(rollout.max_parallel)  # after the switches: slots they freed
        # At the rollout's start (no node has reached its switch yet) the nodes prepared
        # ahead start once every node started is past its preflight and stage: the first
        # switch waits for the first node's preparation only, not for the leader's and the
        # machine's share of the next one's. Later a node being prepared holds back none:
        # held then, a preparation slower than a switch and its confirm left the switch slot
        # idle and prepared one node at a time (review L4).
        if not tally.count(_BEING_PREPARED) or _past_the_start(tally):
            start(rollout.max_parallel + prepare_ahead)

    steps = [
        StepAction(name(at), STEP_FOR_STATE[tally.state(at)], rollout.epoch)
        for at in tally.among(STEP_FOR_STATE)
    ]
    steps += [StepAction(n, Step.FREEZE, rollout.epoch) for n in to_freeze]

    if tally.count(TERMINAL_NODE_STATES) == census.size:  # settled
        frozen = [name(at) for at in census.frozen]
        steps += [StepAction(n, Step.UNFREEZE, rollout.epoch) for n in frozen]
        if not frozen:
            dual = bool(tally.at(NodeState.DUAL))
            waits = (
                dual
                and rollout.strategy is Strategy.TRANSITIONAL
                and state in (RolloutState.RUNNING, RolloutState.PAUSED)
            )
            rollout_events.append(RolloutEvent.NODES_DUAL if waits else RolloutEvent.NODES_SETTLED)
    elif state in DRAINING_ROLLOUT_STATES and rollout.freeze is FreezeMode.SCOPE:
        # Draining, with every node still in flight one whose agent has not confirmed its
        # freeze for a renewal period (``unanswered``; its own switch keeps it frozen, and its
        # lease ends its scope freeze): the others' scope freeze is lifted now, not when that
        # node's outcome comes, which may be never (a machine that died mid-switch: every
        # other node refused entries for good, abort or not; review s69 revfreeze M1).
        in_flight = [name(at) for at in tally.among(IN_FLIGHT_NODE_STATES)]
        if in_flight and all(n in unanswered for n in in_flight):
            steps += [
                StepAction(name(at), Step.UNFREEZE, rollout.epoch)
                for at in census.frozen
                if tally.state(at) in TERMINAL_NODE_STATES
            ]

    return Plan(rollout.epoch, tuple(rollout_events), tuple(node_events), tuple(steps))


# A node in one of these states has begun its switch (a failed node may have failed its
# preflight or stage, a skipped one never started: neither counts).
_SWITCH_BEGUN = SWITCH_SLOT | {
    NodeState.DONE,
    NodeState.DUAL,
    NodeState.ROLLED_BACK,
    NodeState.NEEDS_ATTENTION,
}


def _past_the_start(tally: _Tally) -> bool:
    """Whether some node of the rollout has begun its switch: the rollout is past its start."""
    return bool(tally.count(_SWITCH_BEGUN))


def _switch_turns(
    rollout: Rollout, tally: _Tally, staged: Sequence[int], held: frozenset[str] = frozenset()
) -> list[int]:
    """The staged nodes whose turn it is to switch when nodes are prepared ahead: in rollout
    order, none after a node still waiting to begin (pending or being prepared; a node
    ``held`` by ``--when-quiet`` is passed over, as it is when nodes start), and no more than
    the switch slots ``max_parallel`` leaves free."""
    free = rollout.max_parallel - tally.count(SWITCH_SLOT)
    waiting = (at for at in tally.at(NodeState.PENDING) if rollout.order[at] not in held)
    first = min(
        next(waiting, len(rollout.order)),
        *(next(iter(tally.at(s)), len(rollout.order)) for s in PREPARING - {NodeState.STAGED}),
    )
    return [at for at in staged if at < first][: max(free, 0)]


@dataclass(frozen=True)
class AuthDecision:
    """Which auth password a new rollout applies: ``add_new`` (the start command's verifier
    becomes a new version in the same transaction as the rollout) or ``version`` (an existing
    one; 0 = none)."""

    add_new: bool
    version: int


@dataclass(frozen=True)
class PasswordInUse:
    """The auth password the nodes of the cluster run, as far as the leader can tell
    (``password_in_use``). What the agents that answer report decides; a node that cannot be
    asked now still runs what it was last switched to, as the store recorded it: one offline
    on switch day made "no node runs a password" of a cluster that did, and enable-tls of a
    new node took a second password, which every workstation set up with the first one fails
    at (review s64 M2)."""

    version: int = 0  # the version in use (0: none): observed, else as recorded
    confirmed: bool = False  # a node that answers now runs ``version``
    # Nodes recorded as running a password that cannot be asked now (offline, or their server
    # down): what they run is the record's word only.
    unconfirmed: tuple[str, ...] = ()
    # Nodes that answer and run a password whose verifier this leader does not hold (its store
    # restored from a backup older than their last password change): which one is not known.
    unknown: tuple[str, ...] = ()

    def doubt(self, change: Change, new_password: bool) -> str:
        """Why a start of ``change`` cannot give its nodes a password that is surely the one
        in use ("": it can). ``new_password``: the start brings one of its own (a file or a
        generated one), refused while a node recorded as running one cannot be asked; where
        nodes run one this leader does not know, any start is refused: the version it would
        give is not theirs either."""
        if CHANGES[change].password is not Password.NEW:
            return ""
        if self.unknown:
            return (
                f"cannot confirm the auth password in use: {_some(list(self.unknown))} "
                "run one this leader does not know (its store restored from an older "
                "backup?); give every node a known one first: tlsroll password set, then "
                "tlsroll rollout start --change change-password"
            )
        if new_password and self.unconfirmed and not self.confirmed:
            return (
                f"cannot confirm the auth password in use: {_some(list(self.unconfirmed))} "
                f"offline (recorded on password version {self.version}); start them and try "
                "again, or leave out --password-file: the nodes switched now get version "
                f"{self.version}, the one recorded"
            )
        return ""


def password_in_use(
    observed: Mapping[str, str],
    digests: Mapping[str, int],
    recorded: Mapping[str, int],
) -> PasswordInUse:
    """``PasswordInUse`` from ``observed`` (each node whose agent answered now: the digest of
    the verifier it runs, "" for none), ``digests`` (verifier digest -> version, for every
    version the store holds) and ``recorded`` (each enrolled node the store recorded as
    running a password: that version, ``SchemaStore.node_auth``). What a node that answers
    runs is what it says, whatever the record; the record speaks for the others."""
    seen = [digests[d] for d in observed.values() if d in digests]
    unconfirmed = sorted(n for n in recorded if n not in observed)
    version = max((*seen, *(recorded[n] for n in unconfirmed)), default=0)
    return PasswordInUse(
        version=version,
        confirmed=bool(seen) and version in seen,
        unconfirmed=tuple(unconfirmed),
        unknown=tuple(sorted(n for n, d in observed.items() if d and d not in digests)),
    )


def decide_auth(
    change: Change,
    verifier_given: bool,
    latest_version: int,
    in_use: PasswordInUse | int = 0,
    keep: int = 0,
) -> AuthDecision:
    """The password rule of ``change`` (``CHANGES``) applied to a start command; PlanError
    says what is missing or too much.

    ``in_use``: the auth password version that nodes of the cluster run now (0: none; a
    ``PasswordInUse`` says how sure that is). A password is never replaced as a side effect:
    enable-tls then gives the nodes it switches that same version and refuses a new one, and
    refuses one while it cannot confirm that none is in use (``PasswordInUse.doubt``).
    ``keep``: a retried rollout keeps its version."""
    spec = CHANGES[change]
    if not spec.available:
        raise PlanError(f"change {change.value} is not available yet")
    if keep:
        return AuthDecision(add_new=False, version=keep)
    facts = in_use if isinstance(in_use, PasswordInUse) else PasswordInUse(in_use, bool(in_use))
    if doubt := facts.doubt(change, new_password=verifier_given or not facts.version):
        raise PlanError(doubt)
    in_use = facts.version
    if spec.password is Password.NEW and in_use:
        if verifier_given:
            raise PlanError(
                f"nodes already use auth password version {in_use}; {change.value} gives the "
                "other nodes the same one: leave out --password-file (to change the password: "
                "tlsroll password set, then a change-password rollout)"
            )
        return AuthDecision(add_new=False, version=in_use)
    if spec.password is Password.NEW:
        if not verifier_given:
            raise PlanError(
                f"{change.value} sets the auth password: give --password-file or let the CLI "
                "generate one"
            )
        return AuthDecision(add_new=True, version=0)
    if verifier_given:
        raise PlanError(
            f"{change.value} brings no password of its own; stage one with `tlsroll password set`"
        )
    if spec.password is Password.STAGED:
        if latest_version == 0:
            raise NoPasswordStaged()
        return AuthDecision(add_new=False, version=latest_version)
    return AuthDecision(add_new=False, version=0)


def undo_target(
    candidates: Sequence[tuple[Rollout, Sequence[NodeRecord]]],
    rollout_id: str | None,
    undoes: Mapping[str, str],
    finalizes: Mapping[str, str] | None = None,
) -> tuple[Rollout, tuple[str, ...]]:
    """The enable-tls rollout a ``disable-tls`` rollout takes back, and the nodes it switched.

    ``candidates`` are the stored rollouts, newest first; ``rollout_id`` names one, else the
    newest enable-tls rollout is taken. ``undoes`` maps a stored rollout's id to the id of the
    rollout it takes back (``RolloutMeta.undoes``; missing or "" for none). The nodes are those
    it left ``done`` (only they run the https config it made), in its order. PlanError if there
    is nothing to take back (a finalize named: the phase 1 it finalizes, from ``finalizes``,
    is the one to name; review s64 trans L6); AlreadyUndone if a disable-tls rollout already
    took it back.
    """
    if rollout_id:
        found = [(r, nodes) for r, nodes in candidates if r.id == rollout_id]
        if not found:
            raise UnknownRollout(f"no rollout {echo.shown(rollout_id)} (see: tlsroll schema show)")
        if found[0][0].change is not Change.ENABLE_TLS:
            phase1 = (finalizes or {}).get(rollout_id, "")
            way = (
                f" (its switch is rollout {phase1}'s: tlsroll rollout rollback {phase1})"
                if phase1
                else ""
            )
            raise PlanError(
                f"rollout {rollout_id} is a {found[0][0].change.value} rollout: only an "
                f"enable-tls rollout is taken back{way}"
            )
        target, records = found[0]
    else:
        enabling = [(r, nodes) for r, nodes in candidates if r.change is Change.ENABLE_TLS]
        if not enabling:
            raise NothingToUndo("no enable-tls rollout to take back")
        # The newest that switched a node: a newer one that switched none (its node failed its
        # preflight) refused the whole way back, "switched no node", while an older one's
        # nodes ran https (brief s67 engine2).
        target, records = next(
            ((r, nodes) for r, nodes in enabling if _switched(r, nodes)), enabling[0]
        )
    for rollout, _ in candidates:
        if rollout.change is Change.DISABLE_TLS and undoes.get(rollout.id) == target.id:
            raise AlreadyUndone(target.id, rollout)
    switched = _switched(target, records)
    if not switched:
        raise NothingToUndo(f"rollout {target.id} switched no node; nothing to undo")
    return target, switched


# The states of an enable-tls rollout's node that its switch took, or may have taken, to https
# (a named way back takes these back: ``reached_nodes``); the others it never switched
# (pending, preflight, staging, staged: halted before it; skipped; failed: its preflight, its
# stage or its agent refused it, nothing on the node changed) or took back (rolled_back). A
# switch its agent refused was shown rolled_back, and so left out; shown failed now
# (``NodeEvent.SWITCH_REFUSED``), it stays out (session 71, reenrol).
REACHED_NODE_STATES = frozenset(
    {
        NodeState.DONE,
        NodeState.DUAL,
        NodeState.NEEDS_ATTENTION,
        NodeState.SWITCHING,
        NodeState.CONFIRMING,
    }
)


def reached_nodes(
    target: Rollout,
    records: Sequence[NodeRecord],
    retries: Sequence[tuple[Rollout, Sequence[NodeRecord]]],
) -> tuple[str, ...]:
    """The nodes a named way back takes back: those the enable-tls ``target`` or its
    ``retries`` (``rollout retry``: the same rollout carried on, oldest first) switched or
    began to switch (``REACHED_NODE_STATES``), in their order. A node it left "already done"
    (switched by an earlier rollout), never reached (halted before it, or failed before any
    change: its preflight, its stage, its switch refused) or took back itself is
    not taken back by naming it (review s70: naming the rollout that switched one drifted node
    took back every node of the cluster; a node it halted before, which a later rollout
    switched, went back too)."""
    reached = {r.name for r in records if r.state in REACHED_NODE_STATES}
    order = list(target.order)
    for rollout, nodes in retries:
        reached |= {r.name for r in nodes if r.state in REACHED_NODE_STATES}
        order += [n for n in rollout.order if n not in order]
    return tuple(n for n in order if n in reached)


def _switched(rollout: Rollout, records: Sequence[NodeRecord]) -> tuple[str, ...]:
    """The nodes of the enable-tls ``rollout`` it left switched (done or dual), in its order."""
    by_name = {r.name: r for r in records}
    return tuple(
        n
        for n in rollout.order
        if n in by_name and by_name[n].state in (NodeState.DONE, NodeState.DUAL)
    )


def confirm_success(rollout: Rollout) -> NodeEvent:
    """The event of a node confirmed from outside: ``dual`` for a transitional phase 1."""
    transitional = rollout.strategy is Strategy.TRANSITIONAL
    return NodeEvent.CONFIRM_DUAL if transitional else NodeEvent.CONFIRM_DONE


def finalize_scope(rollout: Rollout, records: Sequence[NodeRecord]) -> tuple[str, ...]:
    """The nodes phase 2 closes http on: those phase 1 left ``dual``, in its order. PlanError
    if ``rollout`` is not a transitional rollout awaiting finalize."""
    if rollout.strategy is not Strategy.TRANSITIONAL or rollout.change is not Change.ENABLE_TLS:
        raise NotAwaitingFinalize(
            f"rollout {rollout.id} is {rollout.change.value} ({rollout.strategy.value}): only a "
            "transitional rollout is finalized (tlsroll rollout start --strategy transitional)"
        )
    if rollout.state is not RolloutState.AWAITING_FINALIZE:
        raise NotAwaitingFinalize(
            f"rollout {rollout.id} is {rollout.state.value}, not awaiting finalize; "
            + (
                "wait until every node is dual: tlsroll schema show --watch"
                if rollout.state not in TERMINAL_ROLLOUT_STATES
                else "see: tlsroll schema show"
            )
        )
    by_name = {r.name: r for r in _in_order(rollout, records)}
    return tuple(n for n in rollout.order if by_name[n].state is NodeState.DUAL)


def awaiting_verdict(follower: Rollout, nodes: Sequence[NodeRecord]) -> RolloutEvent | None:
    """What the end of a rollout linked to one awaiting finalize does to it: ``finalized`` or
    ``taken_back`` once the finalize or the way back completed with no node failed; None while
    it runs, or if it left nodes dual (the waiting rollout keeps waiting; finalize again or
    retry)."""
    return settles(follower.state, follower.change, (r.state for r in nodes))


def settles(
    state: RolloutState, change: Change, node_states: Iterable[NodeState]
) -> RolloutEvent | None:
    """``awaiting_verdict``'s rule on the follower's state, change and node states alone (the
    store's ``_settled_by`` reads them in SQL and applies this same rule)."""
    if state is not RolloutState.COMPLETED:
        return None
    if any(s in FAILED_NODE_STATES for s in node_states):
        return None
    if change is Change.FINALIZE:
        return RolloutEvent.FINALIZED
    if change is Change.DISABLE_TLS:
        return RolloutEvent.TAKEN_BACK
    return None


# How old an agent's view of its clients may be when it reports it (the agent reuses it for
# [server].clients_refresh, 10 s by default, and sends it with a heartbeat).
REPORT_LAG = dt.timedelta(seconds=15)
# A node's client report is stale once older than this many heartbeat intervals + REPORT_LAG
# (the leader calls an agent offline after as many silent heartbeats: ``service.online``).
STALE_REPORT_HEARTBEATS = 3


def report_stale_after(heartbeat_interval: float) -> dt.timedelta:
    """How old a node's latest client report may be and still speak for it: an agent reports
    with every heartbeat, so a report older than a few intervals (a silent agent, a leader
    just restarted that no agent has reported to yet) says nothing about now."""
    return STALE_REPORT_HEARTBEATS * dt.timedelta(seconds=heartbeat_interval) + REPORT_LAG


def stale_reports(
    reported_at: Mapping[str, dt.datetime], now: dt.datetime, bound: dt.timedelta
) -> frozenset[str]:
    """The nodes whose latest client report is older than ``bound`` (``report_stale_after``):
    unknown for a plain finalize, held by ``--when-quiet`` (``schema_view.report_problems``)."""
    return frozenset(n for n, at in reported_at.items() if now - at > bound)


def held_for_quiet(
    pending: Sequence[str],
    last_http: Mapping[str, dt.datetime | None],
    known_since: Mapping[str, dt.datetime],
    as_of: Mapping[str, dt.datetime],
    quiet: dt.timedelta,
    stale: Collection[str] = frozenset(),
) -> frozenset[str]:
    """``--when-quiet``: the pending nodes that may not start yet. A node starts once no http
    client was seen on it for ``quiet``, *as far as its reports show*: from its ``last_http``
    sighting (or, if none was ever seen, from ``known_since``: its agent's first report, when
    the leader could first know; not the start of the window that report claims, which says
    how long a sighting is kept, not how long the server has watched: review s64 M) to
    ``as_of`` (how recent its latest report is known to be). Time for
    which no report speaks (the agent silent, the leader restarting) never counts as quiet. A
    node whose clients cannot be told (no report, a report naming a problem, or only a
    ``stale`` one: ``stale_reports``) waits."""
    held = set()
    for name in pending:
        since, until = known_since.get(name), as_of.get(name)
        if (
            name in stale
            or since is None
            or until is None
            or until - (last_http.get(name) or since) < quiet
        ):
            held.add(name)
    return frozenset(held)


def apply_plan(
    rollout: Rollout, nodes: Sequence[NodeRecord], plan: Plan
) -> tuple[Rollout, tuple[NodeRecord, ...]]:
    """The records after the plan's events (what the engine persists before running steps)."""
    by_name = {r.name: r for r in _in_order(rollout, nodes)}
    rollout, moved = plan_moves(rollout, by_name.__getitem__, plan)
    by_name.update((r.name, r) for r in moved)
    return rollout, tuple(by_name[name] for name in rollout.order)


def plan_moves(
    rollout: Rollout, record: Callable[[str], NodeRecord], plan: Plan
) -> tuple[Rollout, tuple[NodeRecord, ...]]:
    """The rollout after the plan's events and the records of the nodes they move (each once,
    after all its events, in the plan's order); ``record`` gives a node's record before the
    plan. ``apply_plan`` for the nodes that change only: what the engine saves.

    A node the plan freezes (``--freeze scope``) that is not recorded frozen is recorded
    ``freeze_asked`` with the plan, before its FREEZE is sent: a settled rollout unfreezes it
    whether or not its agent's answer is ever recorded. Recorded only with that answer, a
    leader that died after the agent froze left no trace of it, and the next one's abort left
    the node frozen until its lease ran out (audit s33 L1). It counts as frozen for a switch
    only once confirmed (``scope_frozen``), as before."""
    moved: dict[str, NodeRecord] = {}
    for action in plan.node_events:
        before = moved.get(action.node) or record(action.node)
        moved[action.node] = before.with_event(action.event, action.reason)
    for step in plan.steps:
        if step.step is Step.FREEZE:
            before = moved.get(step.node) or record(step.node)
            if not before.may_be_frozen:
                moved[step.node] = replace(before, freeze_asked=True)
    for event in plan.rollout_events:
        rollout = rollout.with_event(event)
    return rollout, tuple(moved.values())


# Draining: an abort skips every node whose live config is untouched at once (a preflight or
# stage in flight is abandoned: it changes nothing live); a halt lets those steps finish.
_HALT_SKIPS = frozenset({NodeState.PENDING, NodeState.STAGED})
_ABORT_SKIPS = _HALT_SKIPS | {NodeState.PREFLIGHT, NodeState.STAGING}
# The nodes not yet at their switch: a running finalize leaves such a node out once its agent
# is cut off (``next_actions``' ``cut_off``; the engine reads the cut-off nodes while any is).
BEFORE_SWITCH = _ABORT_SKIPS
# A node whose switch was sent (or is being sent) and the event that fails it: a cut-off
# node's there (``next_actions``' ``cut_off``).
_MID_SWITCH: Mapping[NodeState, NodeEvent] = {
    NodeState.SWITCHING: NodeEvent.SWITCH_FAILED,
    NodeState.CONFIRMING: NodeEvent.CONFIRM_FAILED,
}
_LIVE_STATES = frozenset({RolloutState.RUNNING, RolloutState.PAUSED} | DRAINING_ROLLOUT_STATES)


def _in_order(rollout: Rollout, nodes: Sequence[NodeRecord]) -> tuple[NodeRecord, ...]:
    """The node records in rollout order; raise if they are not exactly the rollout's nodes."""
    if tuple(r.name for r in nodes) == rollout.order:  # as the stores keep them: no sorting
        return tuple(nodes)
    by_name = {r.name: r for r in nodes}
    if len(by_name) != len(nodes) or set(by_name) != set(rollout.order):
        names = sorted(r.name for r in nodes)
        raise InconsistentRecords(
            f"rollout {rollout.id}: node records {names} do not match its order {rollout.order}"
        )
    return tuple(by_name[name] for name in rollout.order)
