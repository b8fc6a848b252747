"""The rollout engine: the imperative shell around the pure planner.

One loop, woken by admin commands, by step outcomes that leave it work, and by a tick
(``TICK_SECONDS``; while no rollout is live, by writes to the store and ``IDLE_TICK_SECONDS``)::

    row   = schema.active()                       # read the durable records
    record the password live on nodes now done    # level-triggered, like everything here
    plan  = next_actions(row.rollout, records)    # pure: what happens now
    persist plan's events (one transaction)       # BEFORE anything is sent
    start every step of the plan not yet running  # level-triggered; idempotent on the agent
    ... a step's outcome is recorded as a node event, then the loop runs again, unless
    that write persisted the plan that follows too and began its steps (``_record``)

How a step runs on a node is the change's strategy (``leader.changes``); the engine decides
only when, and what happens with the result:

* ``TransientError`` (the agent unreachable after the client's own retries, a write that
  crossed an admin command): nothing is recorded and the loop is not woken; the step runs
  again at the first pass after a pause (``not_before``): the tick's, or another wake's. Nothing
  waits forever: a preflight or stage (which changes nothing live) that gets no answer for
  ``step_deadline`` seconds (twice that for a stage) fails with "agent unreachable since …"
  (recorded at the first failed attempt past the deadline, which wakes the loop);
  a switch or confirm cannot fail that way (the node may be mid-transaction), so after
  ``UNKNOWN_AFTER`` seconds its node's reason says "unknown — agent unreachable since …" while
  the leader keeps asking, and the next answer replaces it. A scope freeze or unfreeze the
  agent keeps refusing is retried with a growing pause, and its reason shown on the node.
* A step whose agent falls silent while the step waits for it (a stopped or hung agent, whose
  port stays open: no error until the calls' own deadlines, 30 to 46 s, or attempts whose TLS
  handshakes time out until the step's deadline) has its node's empty reason say so ("the
  agent has not answered since …") once the heartbeats show the silence, from
  ``SILENT_AFTER`` seconds into the wait on (``_Silence``); the next answer, or a heartbeat
  heard while the step waits, takes it away.
* The strategy's result event (terminal outcomes included: a refused switch, a failed check):
  recorded on the node, with its reason, which the schema shows.
* Anything else is a bug: logged with its type, and the step runs again at the first pass
  after a pause (no wake: the tick), so that a rollout is never wedged silently.

After a leader restart the loop simply runs: records say which steps were in flight; running
them again asks the agents for the state of their transactions (a replayed Switch returns the
transaction already under way), so no step is applied twice.

Time comes in through ``clock`` (wall time for the records), ``monotonic`` and ``sleep``
(pauses), so tests can drive the engine with a fake clock. ``monotonic`` is by default the
leader's elapsed-time clock (``leader.store.elapsed``: CLOCK_BOOTTIME, which counts a suspend
of the leader's host): the scope freeze's leases run on the nodes while the leader's host
sleeps, and ``time.monotonic``, which stands still meanwhile, let a leader back from a suspend
longer than a lease count a freeze as confirmed (``_confirmed_until``) that the agents had
lifted, and begin a switch with nodes of the scope taking writes (review 2 of s35).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from leader import byo, planner
from leader.agent_client import (
    NODE_DISK_FULL,
    NODE_STORE_UNAVAILABLE,
    Agents,
    NodeDiskFull,
    NodeStoreUnavailable,
    StepFailed,
)
from leader.changes import (
    BegunNotKnown,
    Outcome,
    RolloutFacts,
    Signed,
    StepContext,
    drop_check,
    rollout_facts,
    strategy_for,
)
from leader.config import hook_number
from leader.rollout_core import (
    CHANGES,
    DRAINING_ROLLOUT_STATES,
    FAILED_NODE_STATES,
    IN_FLIGHT_NODE_STATES,
    STEP_FOR_STATE,
    TAKEN_BACK_FROM,
    TERMINAL_NODE_STATES,
    TERMINAL_ROLLOUT_STATES,
    WAITING_ROLLOUT_STATES,
    FreezeMode,
    NodeEvent,
    NodeRecord,
    NodeState,
    Password,
    Rollout,
    RolloutEvent,
    RolloutState,
    Step,
    begun_not_known,
    completed_failed_note,
    drained_halt_note,
    finalized_note,
    halt_note,
    halt_offers_way_back,
    left_as_is,
    left_out,
    may_take_back,
    taken_back_note,
)
from leader.schema_store import (
    SERVING_STATES,
    IfCutOff,
    NodeDetail,
    Revocation,
    RolloutRow,
    SchemaStore,
    StaleRecords,
    StepTime,
)
from leader.schema_view import CHECK_AGENT, report_problems, waiting_for
from leader.store import IssuedCert, Node, NotFound, Store, elapsed
from leader.store_health import StoreHealth
from tlsroll import dbthread, logs, pki
from tlsroll.enums import NEEDS_ADMIN
from tlsroll.errors import TlsrollError, TransientError
from tlsroll.v1 import agent_pb2

log = logs.get_logger(__name__)

TICK_SECONDS = 1.0
LEASE_MARGIN = 60.0
"""Seconds past a scope freeze's lease after which a node that never answered its unfreeze
counts as unfrozen (``Engine._lease_ran_out``): the agent's watch of its lease, a Freeze that
waited for the agent's freeze lock, its clock."""
TEST_LEASE_MARGIN_ENV = "TLSROLL_TEST_LEASE_MARGIN_SECONDS"
"""Tests only: a leader daemon's ``LEASE_MARGIN`` (seconds, over 0, never longer than
``LEASE_MARGIN``: ``lease_margin``), so that a test of a node cut off while scope-frozen sees
its rollout end seconds after the lease, not a minute (the CI's slowest test waited it out).
Not a setting: the margin covers what the leader cannot see of the agent (its lease watch, a
Freeze that waited for its lock, its clock), which no administrator can size better; a longer
one is ``scope_freeze_lease``'s third."""

WAITS_FOR_FREEZE = "waits for the scope freeze of "
"""A node's note while a frozen node's freeze is not confirmed (``_note_waiting``): a staged
node, or a switching one whose Switch its agent never got (``Engine._gated_switch``)."""

IDLE_TICK_SECONDS = 60.0
"""The loop's tick while no rollout is live (none, or only one that waits for its finalize):
a pass then has nothing to do, and a leader idles for months. What brings a pass sooner: an
admin command (``wake``: a start, and pause/resume/abort, whose write is routine) and any
write to the store that moves its generation on (``Database.on_change``: a rollout created,
an enrolment, a revocation; not a heartbeat's routine record nor a control's). A write that
commits during the pass that first finds the loop idle is seen by the generation ``run``
compares after it. The 1 s tick woke the idle leader each second for nothing (its largest
fixed cost with no agent; issue 15). This tick is only a backstop."""
STEP_RETRY_SECONDS = 2.0
PREPARE_HOLD_SECONDS = 1.0
"""The longest a step preparing a node ahead (its preflight, its stage: each, and each time it
runs) waits for the switches whose first freeze steps are under way
(``Engine._prepare_later``): a freeze that drains long requests, a stream that says nothing,
never hold it longer than this."""
PREPARE_LOOK_SECONDS = 0.05
"""While a preparation waits, how often it looks again whether a switch slot came free (a
confirm's outcome frees one and sets nothing it waits on)."""
STEP_DEADLINE = 30.0  # seconds without an answer before a preflight fails (a stage: twice)
UNKNOWN_AFTER = 10.0  # seconds without an answer before a switching node shows "unknown"
UNKNOWN = "unknown — agent unreachable since"
UNKNOWN_ANSWERED = "unknown — its agent answers but cannot go on since"
"""``UNKNOWN``'s words for an agent that answers, but that its node's disk is full
(``NodeDiskFull``) or its journal or disk failed for a moment (``NodeStoreUnavailable``: a
locked journal, an I/O error): not unreachable (review s74 L1); the answer's cause follows."""
SILENT_AFTER = 10.0
"""Seconds a step may wait for its agent before the engine looks whether the agent is still
heard (``_Silence``), then again every half heartbeat interval (at least a second) while it
waits. A stopped agent (SIGSTOP, a hung host) keeps its connection open and answers nothing: a
preflight's call ends only at its 30 s timeout, a switch's watch after three silent streams
(46 s), and the node's reason was empty all that while (review of s58/59). A timer per
attempt of a step; a look at when its agent was last heard (from memory: ``Store.last_heard``)
only once the step has waited this long, so that a step answered sooner costs the timer
alone."""
TEST_SILENT_AFTER_ENV = "TLSROLL_TEST_SILENT_AFTER_SECONDS"
"""Tests only: a leader daemon's ``SILENT_AFTER`` (seconds, over 0, never longer than
``SILENT_AFTER``: ``silent_after``), so that a test of a stopped agent's note waits seconds for
it, not ten, and a test that a live agent's slow switch gets none can slow it by seconds only.
Not a setting: only how soon a note comes changes (what makes it, the agent's silence for
``SILENT_HEARTBEATS`` intervals, does not), and an administrator has no reason to pay the
look of every step that waits a few seconds."""


def silent_after(environ: Mapping[str, str]) -> float:
    """``SILENT_AFTER``, or the test hook's (``TEST_SILENT_AFTER_ENV``) if it holds a number in
    (0, ``SILENT_AFTER``]."""
    return hook_number(
        environ, TEST_SILENT_AFTER_ENV, SILENT_AFTER, lambda v: 0 < v <= SILENT_AFTER
    )


def lease_margin(environ: Mapping[str, str]) -> float:
    """``LEASE_MARGIN``, or the test hook's (``TEST_LEASE_MARGIN_ENV``) if it holds a number in
    (0, ``LEASE_MARGIN``]."""
    return hook_number(
        environ, TEST_LEASE_MARGIN_ENV, LEASE_MARGIN, lambda v: 0 < v <= LEASE_MARGIN
    )


SILENT_HEARTBEATS = 2
"""A step's agent counts as silent once the leader has heard nothing from it (its heartbeats,
``Node.last_heartbeat``) for this many heartbeat intervals: a live agent's stream vouches for
it, or sends every interval. A stopped agent's stream is seen to be silent by its keepalive
(``leader.service.KEEPALIVE_NOTICE``, 2.5 intervals), and is counted silent from its last
word on."""
SILENT = "the agent has not answered since"
MAX_RETRY_SECONDS = 30.0
REASON_AFTER_ATTEMPTS = 3  # a freeze refused this often: its reason goes on the node
STALE_ATTEMPTS = 5
REPORT_LAG = planner.REPORT_LAG  # --when-quiet: how old an agent's client view may be
TEST_REPORT_LAG_ENV = "TLSROLL_TEST_REPORT_LAG_SECONDS"
"""Tests only: a leader daemon's ``REPORT_LAG`` for ``--when-quiet`` (whole seconds, 1 to
``REPORT_LAG``'s: ``report_lag``), so that a test of a node known long enough to be quiet
waits seconds less for it. Not a setting: only how old a report the gate takes an agent's view
to be (its ``clients_refresh``, 10 s, and a margin) changes; the agent's fresh look before the
freeze stays, and a report's staleness (``planner.report_stale_after``) does not change."""


def report_lag(environ: Mapping[str, str]) -> dt.timedelta:
    """``REPORT_LAG``, or the test hook's (``TEST_REPORT_LAG_ENV``) if it holds a whole number
    of seconds from 1 to ``REPORT_LAG``'s."""
    most = int(REPORT_LAG.total_seconds())
    return dt.timedelta(
        seconds=hook_number(environ, TEST_REPORT_LAG_ENV, most, lambda v: 1 <= v <= most)
    )


StepKey = tuple[str, str, Step]
_OPPOSITE = {Step.FREEZE: Step.UNFREEZE, Step.UNFREEZE: Step.FREEZE}
# The planner's routine node events: the engine logs them at debug (``reconcile``).
_GATES = frozenset({NodeEvent.START, NodeEvent.SWITCH})
WITH = {"with_switch": True}  # a confirm's ``step.finished`` written with its switch's outcome
CONFIRMED = frozenset({NodeEvent.CONFIRM_DONE, NodeEvent.CONFIRM_DUAL})
"""A confirm's outcomes that take its node to done (or dual): written only while its agent is
not cut off, which the write decides (``Engine._save_node``'s ``confirm``)."""
# The plan's events that halt a rollout: the pass writes the halt's note (``halt_note``).
_HALTS = frozenset({RolloutEvent.FAILURE_BUDGET_EXCEEDED, RolloutEvent.NODE_CUT_OFF})
# A node's outcome is logged at the level of what it asks of the admin: README ("When it
# fails") sends them to `journalctl -p warning`, which saw no failure at info (review s66 logs
# M1). A node failed or rolled back (back where it was, counted against the failure budget):
# warning; one that needs attention (neither switched nor back: its server to be checked by
# hand): error.
_FAILED_EVENTS = frozenset(
    {
        NodeEvent.PREFLIGHT_FAILED,
        NodeEvent.STAGE_FAILED,
        NodeEvent.SWITCH_ROLLED_BACK,
        NodeEvent.SWITCH_REFUSED,
        NodeEvent.CONFIRM_ROLLED_BACK,
    }
)
_ATTENTION_EVENTS = frozenset({NodeEvent.SWITCH_FAILED, NodeEvent.CONFIRM_FAILED})


def _node_log(event: NodeEvent, otherwise: Any) -> Any:
    """The log method for a node's ``event``: ``otherwise`` unless it failed the node."""
    if event in _ATTENTION_EVENTS:
        return log.error
    if event in _FAILED_EVENTS:
        return log.warning
    return otherwise


def _log_state_changed(row: RolloutRow) -> None:
    """``rollout.state_changed``, as a pass saved it: at info, but a halt (halting, halted)
    at warning with its note, which names the nodes, why, and the command that goes on
    (``halt_note``: `tlsroll rollout retry ID`...), and a rollout completed with nodes failed
    within its failure budget at warning naming them: the log alone tells an admin why and
    what next, at `journalctl -p warning` (review s66 logs M1)."""
    rollout = row.rollout
    fields: dict[str, Any] = {"rollout_id": rollout.id, "state": rollout.state.value}
    if rollout.state in (RolloutState.HALTING, RolloutState.HALTED):
        log.warning(
            "rollout.state_changed",
            **fields,
            note=row.meta.reason,
            hint="the note names the nodes and why: fix that, then tlsroll rollout retry ID "
            "(tlsroll rollout status ID shows each node)",
        )
        return
    failed = [r for r in row.records if r.state in FAILED_NODE_STATES]
    if rollout.state is RolloutState.COMPLETED and failed:
        outcomes = [(r.name, r.state.value, r.reason) for r in row.records]
        note = completed_failed_note(rollout.change, rollout.failure_budget, outcomes)
        log.warning(
            "rollout.state_changed",
            **fields,
            nodes_failed=len(failed),
            note=note,
            hint="the note names the nodes and why: fix that, then tlsroll rollout retry ID "
            "(tlsroll rollout status ID shows each node)",
        )
        return
    log.info("rollout.state_changed", **fields)


# The steps whose agent's silence goes on the node (``_Silence``): not a scope freeze's, whose
# node may be any node of the scope, and whose refusals and silence have a note of their own.
_WATCHED = frozenset({Step.PREFLIGHT, Step.STAGE, Step.SWITCH, Step.CONFIRM})


def _moment(when: dt.datetime, now: dt.datetime) -> str:
    """``when`` in a node's note: its time of day, with its date if that is not today's."""
    return f"{when:%H:%M:%S} UTC" if when.date() == now.date() else f"{when:%Y-%m-%d %H:%M:%S} UTC"


def silent_note(step: Step, last: dt.datetime, began: dt.datetime, now: dt.datetime) -> str:
    """A node's note while its ``step``, begun at ``began``, waits for an agent last heard at
    ``last`` (``_Silence``)."""
    return (
        f"{SILENT} {_moment(last, now)} (its {step.value} began at {_moment(began, now)} and"
        f" waits for its answer; check it runs: {CHECK_AGENT})"
    )


MID_STEP = "; its {step} waits: the leader keeps asking and records the outcome when it goes on"
"""How a switching node's note ends when its agent says the node needs the admin
(``Engine._needs_admin_note``)."""


def _answered(reason: str) -> bool:
    """Whether ``reason`` is a note that an answer of the agent ends (``Engine._record``): its
    silence, its being unreachable mid-switch, or its saying it needs the admin mid-switch."""
    return reason.startswith((UNKNOWN, UNKNOWN_ANSWERED, SILENT)) or (
        reason.startswith(NEEDS_ADMIN) and reason.endswith(MID_STEP.split("{step}")[1])
    )


def crash_fields(exc: BaseException) -> dict[str, str]:
    """What ``step.crashed`` logs of ``exc``: its type and place (``logs.where``), and its
    message only for an error of the project's own or the store's (SQLite's name no value).
    Any other may hold any value, as ``rpc.internal_error`` says (review 1 of s34, nit)."""
    fields = {"error_type": type(exc).__name__, "where": logs.where(exc)}
    if isinstance(exc, TlsrollError | sqlite3.Error):
        fields["error"] = str(exc)
    return fields


class Engine:
    # A store that cannot be written (a full disk): why and since when, logged once a minute
    # (``leader.store_health``); set by the leader.
    store_health: StoreHealth | None = None
    # When a step that waits for its agent first looks whether the agent is heard
    # (``_Silence``): ``SILENT_AFTER``, shorter only in a test (the leader sets it:
    # ``silent_after``).
    silent_after: float = SILENT_AFTER
    # Past a scope freeze's lease, when a node that never answered its unfreeze counts as
    # unfrozen (``_lease_ran_out``): ``LEASE_MARGIN``, shorter only in a test (the leader sets
    # it: ``lease_margin``).
    lease_margin: float = LEASE_MARGIN
    # How old an agent's client view may be, for ``--when-quiet`` (``_held_for_quiet``'s
    # ``as_of``): ``REPORT_LAG``, shorter only in a test (the leader sets it: ``report_lag``).
    report_lag: dt.timedelta = REPORT_LAG
    # What a node's agent says of its server on its heartbeats (``LeaderState.live_servers``:
    # "needs the admin: <why>" for one whose transaction is held on a journal it cannot write);
    # set by the leader. A switching node's note says it, not "unreachable" (session 70).
    live_server: Callable[[str], str] | None = None

    def __init__(
        self,
        store: Store,
        schema: SchemaStore,
        ca: pki.CertificateAuthority,
        agents: Agents,
        clock: Callable[[], dt.datetime],
        freeze_lease: int = 300,
        *,
        monotonic: Callable[[], float] = elapsed,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        step_deadline: float = STEP_DEADLINE,
        prepare_ahead: int = 1,
        heartbeat_interval: float = 5,
        after_rollouts: Callable[[], Awaitable[None]] | None = None,
        node_problem: Callable[[str], str | None] | None = None,
    ) -> None:
        self.store = store
        # Why a node may not be switched now (``leader.service.LeaderState.node_problem``:
        # two agents use its identity), or None; its switch waits while it holds.
        self.node_problem = node_problem
        # Switches held so (logged once each), with since when (monotonic).
        self.problem_held: dict[StepKey, float] = {}
        # --when-quiet holds a node whose latest client report is older than this.
        self.stale_after = planner.report_stale_after(heartbeat_interval)
        # How long an agent may be unheard before a step that waits for it says so (``_Silence``).
        self.heartbeat_interval = heartbeat_interval
        # (rollout id, node) that --when-quiet holds until the node's first client report
        # since the leader started (logged once each while it waits: ``_held_for_quiet``).
        self.report_waits: set[tuple[str, str]] = set()
        # A finalize's nodes whose agents are cut off, as the last pass read them
        # (``_cut_off``): the plan a step's outcome makes leaves them out too (``_plan_next``).
        self.cut_off: frozenset[str] = frozenset()
        self.schema = schema
        self.ca = ca
        self.agents = agents
        self.clock = clock
        self.freeze_lease = freeze_lease
        self.monotonic = monotonic
        self.sleep = sleep
        self.wake = asyncio.Event()
        self.tasks: dict[StepKey, asyncio.Task[None]] = {}
        self.not_before: dict[StepKey, float] = {}
        self.renewed: dict[tuple[str, str], float] = {}  # scope freezes: last renewal
        # rollout -> its done nodes whose superseded certificate is revoked (or that have none).
        self.revoked: dict[str, set[str]] = {}
        self.step_deadline = step_deadline
        self.prepare_ahead = prepare_ahead  # pipelining (``planner.next_actions``)
        # Scope freezes this process has seen an agent confirm, each with the time (monotonic)
        # until which it counts: a switch under --freeze scope begins only when every frozen
        # node's does, so a leader back after the lease ran out (the agents lifted their
        # freezes) freezes them all again first, and so does a leader whose renewals of a
        # node failed for longer than a renewal period (``_confirmed_until``).
        self.confirmed: dict[tuple[str, str], float] = {}
        # When this process last sent each scope freeze (monotonic), and when it began: how
        # long an agent that never answers again may still hold a freeze (``_lease_ran_out``).
        self.freeze_sent: dict[tuple[str, str], float] = {}
        # Since when (monotonic) this process has seen each scope-frozen node's freeze lapsed,
        # and whether that was logged (``_unanswered``): gone once it is confirmed again.
        self.lapsed_since: dict[tuple[str, str], tuple[float, bool]] = {}
        self.began = monotonic()
        # Switching nodes whose Switch the step's gate holds and whose agent said it has no
        # switch of the rollout (``_gated_switch``): True once the rollout drains (the plan
        # skips them: ``unsent``; none is sent then), False while it runs (they wait).
        self.unsent: dict[tuple[str, str], bool] = {}
        # A step that gets no (good) answer: since when (monotonic, wall) and how often.
        self.trouble: dict[StepKey, tuple[float, dt.datetime, int]] = {}
        # ``--cert-dir``: the running rollout's keys, until each node has staged its own.
        self.vault = byo.Vault()
        # rollout -> its nodes whose live password is recorded (``_record_node_auth``): only
        # done (or dual) nodes, which stay so.
        self.auth_known: dict[str, set[str]] = {}
        # What the steps of the running rollout look up and what does not change while it
        # runs (``leader.changes.RolloutFacts``): read once per rollout, not per step.
        self.facts: dict[str, asyncio.Future[RolloutFacts]] = {}
        # The running rollout's nodes whose switch this process saw complete
        # (``StepContext.switched_here``): confirm then skips a question to the agent.
        self.switched_here: dict[tuple[str, str], bool] = {}
        # The certificates preflights signed from the CSRs they brought back, recorded with
        # their outcomes, until each node's stage (``StepContext.signed``).
        self.signed: dict[tuple[str, str], Signed] = {}
        # Outside checks begun as switches ended, until each node's confirm
        # (``StepContext.checks``).
        self.checks: dict[tuple[str, str], asyncio.Future[str | None]] = {}
        # Switch steps running whose switch has not yet left the first part of its freeze
        # window (``StepContext.restarting``): set once it has, or once the step ended.
        self.before_restart: dict[StepKey, asyncio.Event] = {}
        # Run once no rollout is live any more (the leader gives back what the rollout's
        # work left behind: ``leader.runtime``), in a task of its own.
        self.after_rollouts = after_rollouts
        self._live_seen = False  # a pass saw a live rollout since the last release
        self._kept_for: str | None = None  # the live rollout the per-rollout maps are of
        self._releasing: asyncio.Task[None] | None = None
        # The last pass found no live rollout: the loop waits for ``IDLE_TICK_SECONDS`` or a
        # wake (``_store_changed`` sets it on a write, once per wait: ``_told``).
        self.idle = False
        self._told = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the loop -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        # Between passes the loop waits on ``wake`` alone: ``stop`` and the tick set it. Each
        # pass made two tasks (one waiting on ``wake``, one on ``stop``) and cancelled both,
        # and ``asyncio.wait`` a timer and callbacks of its own: several turns of the event
        # loop per pass, about five passes per node of a rollout.
        loop = self._loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _t: self.wake.set())
        self.schema.db.on_change.append(self._store_changed)
        try:
            while not stop.is_set():
                # Cleared before the pass reads anything: a wake during the pass (a step's
                # outcome that leaves the loop work, an admin command, the stop) brings another
                # pass at once, not the tick.
                self.wake.clear()
                self._told = False
                generation = self.schema.db.generation
                try:
                    await self.reconcile()
                except Exception as exc:  # the loop must survive anything; the schema shows why
                    if not self._store_failing(exc, "engine.failed"):
                        log.error(
                            "engine.failed",
                            error=str(exc),
                            error_type=type(exc).__name__,
                            hint="the engine tries again at its next pass; a bug in tlsroll: "
                            "report it with the lines before this one",
                        )
                    self.idle = False
                if self.wake.is_set():
                    continue  # (the stop too: the loop's test sees it)
                if self.idle and self.schema.db.generation != generation:
                    continue  # written while the pass ran, before it knew it was idle: look
                every = IDLE_TICK_SECONDS if self.idle else TICK_SECONDS
                tick = loop.call_later(every, self.wake.set)
                try:
                    await self.wake.wait()
                finally:
                    tick.cancel()
        finally:
            stopping.cancel()
            with contextlib.suppress(ValueError):
                self.schema.db.on_change.remove(self._store_changed)
        await self.close()

    def _store_failing(self, exc: BaseException, event: str, **fields: Any) -> bool:
        """``StoreHealth.failed`` (True: a store that cannot be written, logged there)."""
        return self.store_health is not None and self.store_health.failed(exc, event, **fields)

    def _store_changed(self) -> None:
        """(The writer's thread.) A write moved the store's generation on: an idle loop
        (``IDLE_TICK_SECONDS``) makes a pass now, as it did at its next tick before. Told once
        per wait; a busy loop ticks each second anyway and is not told."""
        loop = self._loop
        if not self.idle or self._told or loop is None:
            return
        self._told = True
        with contextlib.suppress(RuntimeError):  # the loop closed (the leader stopped)
            loop.call_soon_threadsafe(self.wake.set)

    async def reconcile(self) -> None:
        """Persist the plan's events, then make sure its steps run."""
        await self._settle_awaiting()
        known, row = self.schema.peek_active()  # from memory when it can (no worker thread)
        if not known:
            row = await dbthread.run(self.schema.active)
        await self._forget_ended_keys(row)
        self._forget_ended(row.rollout.id if row is not None else None)
        # A rollout waiting (a transitional phase 1 in awaiting_finalize, for days) runs
        # nothing: the pool holds none of its nodes, and what the rollouts left is given back.
        waiting = row is not None and row.rollout.state in WAITING_ROLLOUT_STATES
        self.idle = row is None or waiting
        if row is None or waiting:
            self.agents.hold(frozenset())
            if self._live_seen:
                self._live_seen = False
                self._after_rollouts()
            if row is None:
                return
        else:
            self._live_seen = True
        await self._record_node_auth(row)
        await self._revoke_superseded(row)
        cut_off = await self._cut_off(row)  # (before the quiet gate, which passes them by)
        held = await self._held_for_quiet(row)
        lapsed = self._lapsed(row)
        plan = planner.next_actions(
            row.rollout,
            row.record_view,
            held,
            prepare_ahead=self.prepare_ahead,
            census=row.census,  # kept with the row: the pass reads only the nodes it names
            lapsed=lapsed,
            unsent=self._unsent(row),
            cut_off=cut_off,
            unanswered=self._unanswered(row.rollout.id, lapsed),
        )
        before = row
        rollout, moved = planner.plan_moves(row.rollout, lambda n: before.node(n)[0], plan)
        if plan.rollout_events or moved:  # moved: by an event, or a scope freeze asked
            reason = None
            way_back = False  # (whether ``reason`` offers the way back to http)
            if _HALTS & set(plan.rollout_events):
                # The failed nodes and those cut off before their switches, whichever halted
                # the rollout in this pass: the note names both (review rev50e L). A skip_unsent
                # too: a switch held at the scope freeze's gate, never sent (rev50e M1).
                skips = (NodeEvent.SKIP, NodeEvent.SKIP_UNSENT)
                cut = [a.node for a in plan.node_events if a.event in skips and a.node in cut_off]
                switched = _may_take_back_after(row, moved)
                failed = _failed_after(row, moved)
                reason = halt_note(rollout, failed, cut, cut_off, switched=switched)
                way_back = halt_offers_way_back(rollout, bool(failed), switched=switched)
            elif row.rollout.state is RolloutState.HALTING and (
                any(a.node in cut_off for a in plan.node_events)
                or (
                    rollout.state is RolloutState.HALTED
                    and row.meta.way_back_offered is not False  # (None: not known)
                    and not _may_take_back_after(row, moved)
                )
            ):
                # A node in flight as the halt drains, stepped as its agent is cut off since the
                # halt was decided: the note made then named it not; made again, it does, with
                # `tlsroll nodes remove` before the retry (review rev51b L4). And a halt whose
                # note offered the way back as a node was still in its switch, which ended
                # other than switched (its step's write, before this pass): with none switched
                # as the halt ends, the note made again offers the retry alone, and names that
                # node; `rollout rollback` refused it, "switched no node" (review of s63-f1, L-1).
                ended = _ended_after(row, moved)
                switched = _may_take_back_after(row, moved)
                reason = drained_halt_note(rollout, ended, cut_off, switched=switched)
                any_failed = any(r.state in FAILED_NODE_STATES for r in ended)
                way_back = halt_offers_way_back(rollout, any_failed, switched=switched)
            elif (
                rollout.state is RolloutState.COMPLETED
                and row.rollout.state is not RolloutState.COMPLETED
            ):
                # Completed with nodes failed within its failure budget: its note says so, as
                # `rollout status` (exit 7), `--json` and the viewer show it; before, every
                # node failed and it read "completed", no word of it (brief s67 budget).
                after = {r.name: r for r in row.records}
                after.update((r.name, r) for r in moved)
                outcomes = [(r.name, r.state.value, r.reason) for r in after.values()]
                note = completed_failed_note(rollout.change, rollout.failure_budget, outcomes)
                reason = note or None
            now = self.clock()
            # Only the nodes the plan moves: the save is as cheap at 500 nodes as at 3.
            try:
                row = await dbthread.run(
                    self.schema.save_states,
                    row,
                    rollout,
                    moved,
                    now,
                    "engine",
                    reason,
                    way_back=way_back,
                    steps=_begun([row.node(r.name)[0] for r in moved], moved, now),
                )
            except StaleRecords:
                self.wake.set()  # an admin command came first; plan again from what is stored
                return
            for action in plan.node_events:
                # A node's gate into its preflight or its switch is chatter at info: each
                # step's outcome is logged as it ends (``step.finished``), and an admin reads
                # where a node is in the schema. A skip (an abort, a failure) is not.
                emit = _node_log(action.event, log.debug if action.event in _GATES else log.info)
                emit(
                    "node.event",
                    rollout_id=rollout.id,
                    node=action.node,
                    node_event=action.event.value,
                    reason=action.reason,
                )
            if plan.rollout_events:
                _log_state_changed(row)
        if not waiting:  # its nodes in flight, with those this pass moved in: before their steps
            self._hold(row)
        for step in plan.steps:
            self._ensure_step(row, step)
        self._renew_freezes(row, plan)
        if row.rollout.freeze is FreezeMode.SCOPE:
            await self._note_waiting(row, lapsed)

    async def _settle_awaiting(self) -> None:
        """A transitional rollout awaiting finalize moves on once its linked finalize (or way
        back) has completed (``planner.awaiting_verdict``). Level-triggered: a leader that
        died between the two writes makes the second on its next pass."""
        known, rows = self.schema.peek_awaiting()
        for row in rows if known else await dbthread.run(self.schema.awaiting):
            follower = await dbthread.run(self.schema.follower, row.rollout.id)
            if follower is None:
                continue
            event = planner.awaiting_verdict(follower.rollout, follower.records)
            if event is None:
                continue
            reason = f"{event.value} by rollout {follower.rollout.id}"
            if event is RolloutEvent.TAKEN_BACK:
                # A node phase 1 made dual that the way back left as is still serves http
                # and https: its note says so, and what to do (review s45rev9 M1).
                dual = {r.name for r in row.records if r.state is NodeState.DUAL}
                left = {
                    r.name: r.reason
                    for r in follower.records
                    if r.name in dual and r.state is NodeState.SKIPPED and left_as_is(r.reason)
                }
                reason = taken_back_note(follower.rollout.id, left)
            elif out := [r.name for r in follower.records if left_out(r.reason)]:
                # Finalized without the nodes whose agents are cut off: they stay dual.
                reason = finalized_note(follower.rollout.id, out)
            ended = row.rollout.with_event(event)
            try:
                await dbthread.run(
                    self.schema.save_states,
                    row,
                    ended,
                    row.records,
                    self.clock(),
                    "engine",
                    reason,
                )
            except StaleRecords:
                continue
            # ``state`` the rollout's state, as every other ``rollout.state_changed`` line says
            # it (it said "finalized"/"taken_back", which no state is: review s64 trans L7).
            log.info(
                "rollout.state_changed",
                rollout_id=row.rollout.id,
                state=ended.state.value,
                cause=event.value,  # (``event`` is structlog's own key)
            )

    async def _cut_off(self, row: RolloutRow) -> frozenset[str]:
        """The nodes whose agents are cut off (their certificates on record revoked:
        ``Store.cut_off_nodes``, kept until a revocation or an enrolment), read at each pass
        while a node of the rollout has not ended or its scope freeze holds: the plan leaves
        such a node out of a finalize, as a finalize started after the revocation does (one
        revoked while ``--when-quiet`` held it stayed pending for good: review s48rev5 M3;
        one staged went on to switch against the revoked agent: review rev49fin); any other
        change steps it no further either (``next_actions``' ``cut_off``: s50), and its scope
        freeze is not renewed (``_renew_freezes``)."""
        census = row.census
        ended = census.count(TERMINAL_NODE_STATES) == census.size
        if ended and row.rollout.freeze is not FreezeMode.SCOPE:
            self.cut_off = frozenset()
        elif (kept := self.store.cut_off_kept()) is not None:
            self.cut_off = kept  # nothing changed it: no hand-off to the store's thread (s50)
        else:
            self.cut_off = await dbthread.run(self.store.cut_off_nodes)
        return self.cut_off

    async def _held_for_quiet(self, row: RolloutRow) -> frozenset[str]:
        """``finalize --when-quiet``: the pending nodes that have had http clients lately;
        not those cut off, which this pass leaves out (``cut_off``, read just before:
        ``_cut_off``)."""
        if not row.meta.when_quiet:
            return frozenset()
        cut_off = self.cut_off
        pending = [
            r.name for r in row.records if r.state is NodeState.PENDING and r.name not in cut_off
        ]
        if not pending:
            return frozenset()
        # One read: a node's summary and its sightings from the same report (``clients_report``).
        clients, infos = await dbthread.run(self.schema.clients_report, pending)
        # Quiet time counts from the node's first report, when the leader could first know:
        # not from the start of the window that report claimed. A window says how long a
        # sighting is kept, not how long the server has watched (the reference server keeps
        # its clients in memory, since its start): counted from a day before, a node known
        # for seconds was finalized at once by `--when-quiet 1h`, right after a workstation
        # wrote on http there (review s64 M).
        known = {n: i.first_report for n, i in infos.items() if i.source and not i.problem}
        # How fresh each node's latest report is known to be: its newest sighting of anyone,
        # or its arrival less what an agent may have cached (REPORT_LAG), the later of both.
        as_of = {n: i.reported_at - self.report_lag for n, i in infos.items()}
        for c in clients:
            as_of[c.node] = max(as_of.get(c.node, c.last_seen), c.last_seen)
        last = {n: i.last_http_at for n, i in infos.items()}
        quiet = dt.timedelta(seconds=row.meta.when_quiet)
        # Stale by the time since each report came, whatever the clock did meanwhile
        # (``Store.report_on_clock_now``). Not ``as_of``: that is measured against the
        # sightings, stored on the clock as it ran then (a step forward counted as quiet time
        # would finalize a node under a workstation on http).
        # A report stored before this leader started speaks for its node only once the agent
        # has reported to this one (``report_problems``: "waiting for ...").
        stale = report_problems(self.store, infos, self.clock(), self.stale_after)
        self._say_report_waits(row.rollout.id, pending)
        return planner.held_for_quiet(pending, last, known, as_of, quiet, frozenset(stale))

    def _say_report_waits(self, rollout_id: str, pending: Sequence[str]) -> None:
        """Log once each pending node ``--when-quiet`` holds because no client report of it
        came to this leader since it started (``Store.report_since_start``; or none ever, at
        a leader's very first start), in the words of a finalize's refusal (``waiting_for``);
        the schema shows it on the node (``NodeView.awaiting_report``). Before, the node was
        held without a word (session 45)."""
        waiting = {n for n in pending if not self.store.report_since_start(n)}
        for name in sorted(waiting):
            if (rollout_id, name) not in self.report_waits:
                if len(self.report_waits) >= 1024:
                    self.report_waits.clear()
                self.report_waits.add((rollout_id, name))
                log.info(
                    "rollout.node_waits_for_report",
                    rollout_id=rollout_id,
                    node=name,
                    reason=waiting_for(name),
                )
        self.report_waits -= {
            key for key in self.report_waits if key[0] == rollout_id and key[1] not in waiting
        }

    async def _record_node_auth(self, row: RolloutRow) -> None:
        """Record the password live on each node the rollout has left ``done`` (it restarted
        with this rollout's config). Level-triggered, before the plan: a leader that died
        between recording a node done and this write makes it on its next pass, and the
        rollout cannot end before it."""
        rule = CHANGES[row.rollout.change].password
        if rule is Password.KEPT:
            return
        version = None if rule is Password.CLEARED else row.meta.auth_version
        rid = row.rollout.id
        # A dual node runs the password on its https side. Nodes this process has seen
        # recorded are not looked at again, nor every node at each pass once all are known.
        done_at = _positions(row, (NodeState.DONE, NodeState.DUAL))
        known = self.auth_known.setdefault(rid, set())
        if len(known) >= len(done_at):  # every done node is known: both only ever grow
            return
        done = [n for n in (row.nodes[at][0].name for at in done_at) if n not in known]
        if not done:
            return
        live = await dbthread.run(self.schema.node_auth)
        for name in done:
            if live.get(name) != version:
                await dbthread.run(self.schema.set_node_auth, name, version, self.clock())
            known.add(name)

    async def _revoke_superseded(self, row: RolloutRow) -> None:
        """Revoke the server certificate a node served before this rollout gave it a new one,
        once the node is ``done`` or ``dual`` (a transitional phase 1 that serves the new one
        beside http: ``SERVING_STATES``; level-triggered, before the plan, like the password
        above: the rollout cannot end before it). Not earlier: a node that fails goes back
        to it."""
        if not CHANGES[row.rollout.change].stages_certificate:
            return
        done_at = _positions(row, SERVING_STATES)
        revoked = self.revoked.setdefault(row.rollout.id, set())
        if len(revoked) >= len(done_at):  # each done node's is revoked: both only ever grow
            return
        for at in done_at:
            rec, detail = row.nodes[at]
            if rec.name in revoked:
                continue
            if not detail.cert_fingerprint:  # no new certificate recorded: nothing superseded
                revoked.add(rec.name)
                continue
            serials = await dbthread.run(
                self.store.revoke_superseded,
                rec.name,
                detail.cert_fingerprint,
                before=row.meta.started_at or row.meta.created_at,
                now=self.clock(),
            )
            revoked.add(rec.name)
            if serials:
                log.info("certificate.superseded", node=rec.name, serials=serials)

    def _renew_freezes(self, row: RolloutRow, plan: planner.Plan) -> None:
        """Keep the scope freeze's lease alive on every frozen node (a third of the lease),
        but not on a node the plan unfreezes."""
        if row.rollout.freeze is not FreezeMode.SCOPE:
            return
        now = self.monotonic()
        unfreezing = plan.nodes_with_step(Step.UNFREEZE)
        for rec in row.records:
            key = (row.rollout.id, rec.name)
            if not rec.scope_frozen or rec.name in unfreezing:
                continue  # (a stale read must not forget a renewal: only an unfreeze does)
            if rec.name in self.cut_off:
                # Its agent is cut off (a machine lost or stolen): never dialled, so never
                # renewed; its lease runs out on its own (s50: each lease period dialled it).
                continue
            # A key first seen by this process renews at once: after a leader restart the
            # agents' leases run from the old process's last renewal, not from now.
            # A node whose confirmation no longer counts is frozen again at once (as fast as
            # the step's retries allow): the switches wait for it.
            last = self.renewed.get(key)
            if (
                last is not None
                and now - last < self.freeze_lease / 3
                and now < self.confirmed.get(key, 0.0)
            ):
                continue
            self.renewed[key] = now
            step = planner.StepAction(rec.name, Step.FREEZE, row.rollout.epoch)
            self._ensure_step(row, step)  # Freeze again: idempotent, renews the lease

    def _ensure_step(
        self, row: RolloutRow, step: planner.StepAction, *, fresh: bool = False
    ) -> None:
        """Begin ``step`` unless it runs (or waits out a pause). ``fresh``: ``row`` is what the
        write that moved the node into the step's state left (``_planned``)."""
        key = (row.rollout.id, step.node, step.step)
        task = self.tasks.get(key)
        if task is not None and not task.done():
            return
        gated = False
        if step.step is Step.SWITCH and row.rollout.freeze is FreezeMode.SCOPE:
            at = (row.rollout.id, step.node)
            unsent = self.unsent.get(at)
            if unsent:  # the rollout drains and its agent has none: never sent (it is skipped)
                return
            now = self.monotonic()
            # A frozen node's freeze unconfirmed: _renew_freezes is freezing it again, and no
            # new Switch goes out meanwhile (``_gated_switch``).
            # Not a cut-off node's: never renewed, its freeze lapses for good and held every
            # switch of the others (review of s50 H2; the plan leaves it out too).
            cut_off = self.cut_off
            gated = any(
                r.scope_frozen
                and now >= self.confirmed.get((row.rollout.id, r.name), 0.0)
                and r.name not in cut_off
                for r in row.records
            )
            if gated and unsent is False and not self._draining(row):
                return  # its agent has none (asked once): it waits (``_note_waiting``)
            if not gated:
                self.unsent.pop(at, None)
        if self.monotonic() < self.not_before.get(key, 0.0):
            return
        if step.step is Step.SWITCH and self._problem_holds(key):
            if row.rollout.freeze is FreezeMode.SCOPE and self._held_too_long(key):
                run = self._held_fails(row, step)
                task = self.tasks[key] = asyncio.create_task(run, name=str(key))
                task.add_done_callback(functools.partial(self._forget, key))
            return
        # A node's FREEZE and UNFREEZE never run at once: its agent could get them in either
        # order, and the record of the one that ends last could contradict the node.
        other = _OPPOSITE.get(step.step)
        if other is not None:
            running = self.tasks.get((row.rollout.id, step.node, other))
            if running is not None and not running.done():
                return
        run = self._gated_switch(row, step) if gated else self._run_step(row, step, fresh=fresh)
        task = self.tasks[key] = asyncio.create_task(run, name=str(key))
        task.add_done_callback(functools.partial(self._forget, key))
        if step.step is Step.SWITCH and not gated:
            # Known before any step task of this pass runs (a preparation begun in the same
            # pass sees it: ``_prepare_later``); set as the switch restarts or the step ends.
            began = self.before_restart[key] = asyncio.Event()
            task.add_done_callback(functools.partial(self._restarted, key, began))

    def _restarted(self, key: StepKey, began: asyncio.Event, _task: object = None) -> None:
        """The switch step ``key`` left the first part of its freeze window, or ended."""
        began.set()
        if self.before_restart.get(key) is began:
            del self.before_restart[key]

    async def _prepare_later(self, row: RolloutRow) -> bool:
        """Hold a preparation step (a node's preflight or stage) of ``row``'s rollout while
        every switch slot is taken and a switch is in the first part of its freeze window:
        its call reaching the agent, the create's record, the freeze and the config's write,
        until its agent says the restart begins (``StepContext.restarting``), at most
        ``PREPARE_HOLD_SECONDS``. Whether it waited.

        The node cannot switch before one of those switches ends, and its preparation (the
        leader's signing and calls, the node's key) then runs inside their restarts instead
        of lengthening their freeze windows: on a machine shared with the nodes (bench
        ``rollout``, 10 real nodes: each switch less its restart 2-5 ms shorter, each freeze
        window 5-13 ms shorter), and by the leader's own work where it is not. A
        preparation that a free slot waits for is never held, nor held on once a slot comes
        free (a switch that ended, a confirm's outcome: the rollout looked at again every
        ``PREPARE_LOOK_SECONDS``, from memory as a rule)."""
        rid = row.rollout.id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PREPARE_HOLD_SECONDS
        slots = max(row.rollout.max_parallel, 1)
        held = False
        while True:
            busy = [e for (r, _n, _s), e in self.before_restart.items() if r == rid]
            busy = [e for e in busy if not e.is_set()]
            left = deadline - loop.time()
            if not busy or left <= 0:  # (as a rule: no store read for a step that waits not)
                return held
            # As the store has it now (kept, or read: a write from another connection, an
            # admin's, empties what is kept), not as the step's task was given it.
            now = await self._rollout_now(rid) or row
            if len(_positions(now, planner.SWITCH_SLOT)) < slots:
                return held
            held = True
            # Tasks of their own, each cancelled after (a gather cancelled by a timeout left
            # an exception nobody read, logged as an error: review rev54a M1).
            waits = [asyncio.ensure_future(e.wait()) for e in busy]
            try:
                await asyncio.wait(
                    waits,
                    timeout=min(left, PREPARE_LOOK_SECONDS),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for wait in waits:
                    wait.cancel()

    def _problem_holds(self, key: StepKey) -> bool:
        """A node's switch waits while the leader sees a problem with the node
        (``node_problem``: two agents use its identity, so the Switch could reach either host,
        and its outcome would say nothing of the other): audit s33 M5. Logged as it begins to
        wait; the pass after the problem ends (the tick) begins it."""
        why = self.node_problem(key[1]) if self.node_problem is not None else None
        if why is None:
            self.problem_held.pop(key, None)
            return False
        if key not in self.problem_held:
            if len(self.problem_held) >= 1024:
                self.problem_held.clear()
            self.problem_held[key] = self.monotonic()
            log.warning(
                "step.held",
                rollout_id=key[0],
                node=key[1],
                step=key[2].value,
                reason=why,
                detail="the node's switch waits while the reason holds (tlsroll schema show "
                "names the node problem); it goes on by itself once it ends",
            )
        return True

    def _held_too_long(self, key: StepKey) -> bool:
        """Under ``--freeze scope`` a held switch (``_problem_holds``) keeps every node of the
        scope frozen (``_renew_freezes``), and the node cannot be removed while the rollout
        holds it: held for a freeze lease (``freeze_lease``), the node fails instead (review 2
        of s34, F1), and the rollout halts and unfreezes by its usual rules."""
        since = self.problem_held.get(key)
        return since is not None and self.monotonic() - since >= self.freeze_lease

    async def _held_fails(self, row: RolloutRow, step: planner.StepAction) -> None:
        """A switch held too long (``_held_too_long``): the node needs attention, with the
        problem as its reason. No Switch of this process reached it while held; one sent
        before (a retried switch) leaves it unknown, which is what needs attention says."""
        key = (row.rollout.id, step.node, step.step)
        why = self.node_problem(step.node) if self.node_problem is not None else None
        why = why or "the node's problem ended just now"  # (never "None" in its reason)
        held = self.freeze_lease
        reason = f"switch held for {held} s (a freeze lease) with the scope frozen, failed: {why}"
        log.warning(
            "step.held_failed",
            rollout_id=key[0],
            node=key[1],
            reason=why,
            hint="the node was held too long and failed; fix the reason, then tlsroll rollout "
            "retry ID",
        )
        self.problem_held.pop(key, None)
        if not await self._record(row.rollout.id, step, NodeEvent.SWITCH_FAILED, reason):
            self.wake.set()

    async def _gated_switch(self, row: RolloutRow, step: planner.StepAction) -> None:
        """``--freeze scope``: a node's switch while a frozen node's freeze is not confirmed
        (``_ensure_step``), when no new Switch may go out. A switch its agent already has
        (sent by a leader before a restart, or its answer lost) is no new one: it is followed
        at once. Held, that watch waited for good for a dead frozen node after a restart (this
        process has no confirmations), an abort too, which skips no node in flight (review 2
        of session 32, F2). A switch the agent has not got waits while the rollout runs
        (``_note_waiting`` says why; the agent is not asked again: only this process could
        send it one), and once the rollout drains the plan skips the node (``unsent``)."""
        rollout = row.rollout
        started = (self.monotonic(), self.clock())
        try:
            agent = await self.agents.get(step.node)
            begun = await strategy_for(rollout).switch_begun(agent, rollout.id, self.sleep)
        except BegunNotKnown as exc:  # answered, not said: asked again within, then attention
            reason = begun_not_known("switch", str(exc))
            log.warning(
                "step.begun_not_known",
                rollout_id=rollout.id,
                node=step.node,
                reason=reason,
                hint="look at the node (tlsroll rollout status ID), then tlsroll rollout retry ID",
            )
            if not await self._record(rollout.id, step, NodeEvent.SWITCH_FAILED, reason):
                self.wake.set()
            return
        except (TransientError, StepFailed, TimeoutError) as exc:  # unknown: it may have begun
            await self._trouble(row, step, str(exc) or "no answer", None, started)
            return
        if begun:
            await self._run_step(row, step)
            return
        self.unsent[(rollout.id, step.node)] = self._draining(row)
        self.wake.set()  # the pass notes it, or skips it

    def _draining(self, row: RolloutRow) -> bool:
        """Whether ``row``'s rollout halts or aborts, as the last write left it (for good)."""
        fresh = self.schema.kept(row.rollout.id, settled=True)
        return (fresh or row).rollout.state in DRAINING_ROLLOUT_STATES

    def _unsent(self, row: RolloutRow) -> frozenset[str]:
        """The plan's ``unsent``: ``row``'s switching nodes whose agent has no switch of the
        draining rollout, held at the step's gate (``_gated_switch``); while it runs too, the
        nodes cut off (``_cut_off``): never sent one, they are skipped as nodes before their
        switches, not failed (review of s50 L1)."""
        rid = row.rollout.id
        cut_off = self.cut_off
        return frozenset(
            name
            for (r, name), drains in self.unsent.items()
            if r == rid and (drains or name in cut_off)
        )

    def _forget(self, key: StepKey, task: asyncio.Task[None]) -> None:
        """A step task ended: drop it (every step of every rollout was kept for the leader's
        life, about 1 MiB per 500-node rollout). What escaped the step's own handling (a
        store error in ``_trouble``'s write, inside the step's ``except``) is logged with the
        step, as ``_run_step`` logs a crash, and the step waits at least the retry pause
        (``_trouble`` set its own before the write): it went unretrieved before (review 2 of
        session 33, L2)."""
        if self.tasks.get(key) is task:
            del self.tasks[key]
        if task.cancelled() or (exc := task.exception()) is None:
            return
        rollout_id, node, step = key
        if not self._store_failing(
            exc, "step.crashed", rollout_id=rollout_id, node=node, step=step.value
        ):
            log.error(
                "step.crashed",
                rollout_id=rollout_id,
                node=node,
                step=step.value,
                **crash_fields(exc),
                hint="the step is tried again after a pause; a bug in tlsroll: report it with "
                "the lines before this one",
            )
        retry = self.monotonic() + STEP_RETRY_SECONDS
        self.not_before[key] = max(self.not_before.get(key, 0.0), retry)

    async def settle(self) -> None:
        """Wait until no step task is running (for tests that drive the loop by hand)."""
        while running := [t for t in self.tasks.values() if not t.done()]:
            await asyncio.wait(running)

    def _after_rollouts(self) -> None:
        """The last live rollout has ended: ``after_rollouts`` runs in its own task (never
        twice at a time); a failure is logged, the engine goes on."""
        if self.after_rollouts is None or (
            self._releasing is not None and not self._releasing.done()
        ):
            return
        release = self.after_rollouts

        async def run() -> None:
            try:
                await release()
            except Exception as exc:  # giving memory back is never worth a failed engine
                log.warning(
                    "engine.release_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    detail="giving memory back failed; nothing else is affected",
                )

        self._releasing = asyncio.ensure_future(run())

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for check in self.checks.values():
            drop_check(check)
        self.checks.clear()
        if self._releasing is not None:
            await asyncio.gather(self._releasing, return_exceptions=True)
        # What the cancelled steps had handed to the store's thread is written before the
        # store closes (``dbthread.run``).
        await dbthread.barrier()
        await self.agents.close()

    # --- one step -----------------------------------------------------------------------------

    async def _run_step(
        self, row: RolloutRow, step: planner.StepAction, *, fresh: bool = False
    ) -> None:
        rollout = row.rollout
        key = (rollout.id, step.node, step.step)
        if step.step in (Step.PREFLIGHT, Step.STAGE) and await self._prepare_later(row):
            fresh = False  # it waited: read whether the node still waits for it (an abort)
        if step.step in STEP_FOR_STATE.values() and not fresh:
            # ``row`` was read before this task started, maybe while the previous run of the
            # same step was saving its result: run only if the node still waits for it. Not
            # settled (unlike ``_record`` and ``node_detail``, whose ``save_states`` checks
            # the records): while a write holds the store (another step's outcome, an admin
            # pause or abort, a pass's events), the read waits for it and sees what it wrote.
            # Not for a step begun by the write that moved its node into the step's state
            # (``fresh``): no earlier run of it can be saving (the node was not in that state
            # before), and an abort that overtakes it drops a preflight's or stage's result
            # as ever (it skips no switching node). At 50 simulated nodes 91 of the 200 steps'
            # reads went to the store's thread, the write of the outcome before still holding
            # the store.
            now = await self._look_again(rollout.id)
            try:
                state = now.node(step.node)[0].state if now is not None else None
            except KeyError:  # not a node of this rollout
                state = None
            if now is None or state is None or STEP_FOR_STATE.get(state) is not step.step:
                return
            row = now
        if step.step in (Step.FREEZE, Step.UNFREEZE) and step.node in self.cut_off:
            # Its agent is cut off: never dialled (``AgentPool.get`` refuses it anyway). Its
            # scope freeze is recorded lifted once its lease surely ran out, as for a machine
            # that never answers; its reason (why it left the rollout) stays (s50).
            why = f"agent {step.node} is cut off"
            if step.step is Step.UNFREEZE and await self._lease_ran_out_saved(
                rollout.id, step, why
            ):
                self.wake.set()
            else:
                self.not_before[key] = self.monotonic() + STEP_RETRY_SECONDS
            return
        bounded = step.step in (Step.PREFLIGHT, Step.STAGE)
        started = (self.monotonic(), self.clock())
        deadline = self.step_deadline * (2 if step.step is Step.STAGE else 1)
        try:
            if step.step in (Step.FREEZE, Step.UNFREEZE):
                if step.step is Step.FREEZE:
                    self.freeze_sent[(rollout.id, step.node)] = started[0]
                try:
                    frozen = await self._scope_freeze(rollout, step.node, step.step is Step.FREEZE)
                finally:  # an attempt may reach the agent until the call ends (retries, its lock)
                    if step.step is Step.FREEZE:
                        self.freeze_sent[(rollout.id, step.node)] = self.monotonic()
                await self._record_frozen(rollout.id, step, frozen, started)
            else:
                learnt: dict[str, Any] = {}  # what the step learnt: written with its outcome
                issued: list[Signed] = []  # what it signed: recorded with its outcome
                confirmed: list[NodeEvent] = []  # a switch's confirm: written with its outcome
                work = self._step(row, step, learnt, issued, confirmed)
                silence = (
                    self._silence(rollout.id, step, started) if step.step in _WATCHED else None
                )
                try:
                    if bounded:  # one attempt never outlasts the step's deadline
                        # In this task, not wait_for's (3.11): that made a task of the work,
                        # a waiter and its callbacks, two loop passes more a step (issue 15).
                        async with asyncio.timeout(deadline):
                            result = await work
                    else:
                        result = await work
                finally:  # its note written, if a look was writing one: the outcome's is later
                    if silence is not None:
                        await silence.stop()
                event, reason = result
                planned = await self._record(
                    rollout.id, step, event, reason, started[1], learnt, issued, confirmed
                )
                if planned:  # the plan that follows is persisted, its steps begun: no wake
                    self.trouble.pop(key, None)
                    return
        except (TransientError, StepFailed, TimeoutError) as exc:  # StepFailed: a freeze refused
            why = str(exc) or f"no answer within {deadline:.0f} s"
            if (
                step.step is Step.UNFREEZE
                # A refusal is an answer: the agent is there, and it keeps the freeze it has.
                # Not for a node only asked (no FREEZE of it confirmed): its agent may hold a
                # lease from a FREEZE it refused or never answered, or none; either way it is
                # gone once the lease surely ran out (review 1 of session 33, H2; a refused
                # FREEZE is no proof of "nothing frozen": review 2, M1).
                and (not isinstance(exc, StepFailed) or self._only_asked(row, step.node))
                and await self._lease_ran_out_saved(rollout.id, step, why)
            ):
                self.trouble.pop(key, None)
                self.wake.set()
                return
            log.warning(
                "step.deferred",
                rollout_id=rollout.id,
                node=step.node,
                step=step.step.value,
                reason=why,
                detail="the step waits and is tried again by itself; the reason says what it "
                "waits for (tlsroll rollout status)",
            )
            limit = deadline if bounded else None
            full = isinstance(exc, NodeDiskFull)
            store = isinstance(exc, NodeStoreUnavailable)
            await self._trouble(row, step, why, limit, started, disk_full=full, store=store)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not wedge the rollout silently
            if not self._store_failing(
                exc, "step.crashed", rollout_id=rollout.id, node=step.node, step=step.step.value
            ):
                log.error(
                    "step.crashed",
                    rollout_id=rollout.id,
                    node=step.node,
                    step=step.step.value,
                    **crash_fields(exc),
                    hint="the step is tried again after a pause; a bug in tlsroll: report it "
                    "with the lines before this one",
                )
            self.not_before[key] = self.monotonic() + STEP_RETRY_SECONDS
            return
        self.trouble.pop(key, None)
        self.wake.set()

    async def _look_again(self, rollout_id: str) -> RolloutRow | None:
        """The stored rollout as a step about to run sees it (``_run_step``): from memory
        when it can, not settled. A method of its own so that tests count these reads."""
        return await self._rollout_now(rollout_id)

    async def _rollout_now(self, rollout_id: str) -> RolloutRow | None:
        """The stored rollout: from memory when it can, not settled (a write under way is
        waited for), else read in the store's thread."""
        return self.schema.kept(rollout_id) or await dbthread.run(self.schema.get, rollout_id)

    async def _trouble(
        self,
        row: RolloutRow,
        step: planner.StepAction,
        why: str,
        deadline: float | None,
        started: tuple[float, dt.datetime],
        *,
        disk_full: bool = False,
        store: bool = False,
    ) -> None:
        """A step got no good answer: when to try again, and what the records say about it.
        ``deadline``: the step fails once it has had no answer that long since the attempt
        that began the trouble started (``started``; None: never). ``disk_full``: the last
        answer was the node's full disk (``NodeDiskFull``), ``store``: its journal or disk
        failing for a moment (``NodeStoreUnavailable``), which the failure and a switch's
        note say instead of "agent unreachable" (the agent answered)."""
        rollout = row.rollout
        key = (rollout.id, step.node, step.step)
        now = self.monotonic()
        first, since, attempts = self.trouble.get(key, (*started, 0))
        attempts += 1
        self.trouble[key] = (first, since, attempts)
        pause = min(STEP_RETRY_SECONDS * 2 ** max(attempts - 3, 0), MAX_RETRY_SECONDS)
        self.not_before[key] = now + pause
        stamp = f"{since:%H:%M:%S} UTC"
        if deadline is not None and now - first >= deadline:
            failed = {
                Step.PREFLIGHT: NodeEvent.PREFLIGHT_FAILED,
                Step.STAGE: NodeEvent.STAGE_FAILED,
            }
            self.trouble.pop(key, None)
            if disk_full:
                said = (
                    f"{NODE_DISK_FULL} since {stamp} (for {deadline:.0f} s; free space on it,"
                    f" then retry the rollout): {why}"
                )
            elif store:
                said = (
                    f"{NODE_STORE_UNAVAILABLE} since {stamp} (for {deadline:.0f} s; its agent's"
                    f" log says more, then retry the rollout): {why}"
                )
            else:
                said = f"agent unreachable since {stamp} (no answer for {deadline:.0f} s): {why}"
            await self._record(rollout.id, step, failed[step.step], said)
            self.wake.set()
            return
        if step.step in (Step.SWITCH, Step.CONFIRM) and now - first >= UNKNOWN_AFTER:
            headline = UNKNOWN_ANSWERED if disk_full or store else UNKNOWN
            reason = self._needs_admin_note(step) or (
                f"{headline} {stamp}: {why}; it may be mid-switch (writes refused); the leader "
                "keeps asking and records the outcome when it answers"
            )
            await self._note(rollout.id, step, reason)
        elif step.step in (Step.FREEZE, Step.UNFREEZE) and attempts >= REASON_AFTER_ATTEMPTS:
            note = f"scope {step.step.value} failing since {stamp}: {why}"
            # A node whose switch waits for its agent keeps that note ("unknown — …: it may be
            # mid-switch"), which says more; a renewal's failure replaced it (review s69
            # revfreeze L2). Its agent's answer replaces either (``_record``).
            await self._save_node(
                rollout.id,
                step.node,
                lambda r: r if _answered(r.reason) else replace(r, reason=note),
            )

    async def _forget_ended_keys(self, active: RolloutRow | None) -> None:
        """``--cert-dir`` keys live no longer than their rollout (``leader.byo.Vault``)."""
        held = self.vault.rollout_id
        if not held or (active is not None and active.rollout.id == held):
            return
        row = await dbthread.run(self.schema.get, held)
        if row is None or row.rollout.state in TERMINAL_ROLLOUT_STATES:
            self.vault.forget(held)

    def _forget_ended(self, live: str | None) -> None:
        """What the engine keeps per rollout is of the live one only (``live``; None: none
        is): ``not_before``, ``trouble``, ``renewed``, ``confirmed``, ``unsent``, ``revoked``,
        ``auth_known``, ``facts``, ``switched_here``, ``signed`` and ``checks`` (a check still
        pending is cancelled). Found with ``bench.simagents --rollouts``: ``revoked`` and
        ``auth_known`` kept the names of a rollout's done nodes for the leader's life (two
        sets of N names for every enable-tls rollout, one for every other), and the others
        kept a rollout's entries until the next one began. Forgetting is what a leader
        restart does: each of them is level-triggered or re-read for the live rollout. Looked
        at when the live rollout changes, and at each pass while none is (a step of an ended
        rollout may still be running: an abort leaves its preflights and stages to end on
        their own). The maps are emptied in place (steps hold them) and made anew, so that
        their tables shrink too
        (``lapsed_since`` too)."""
        if live is not None and live == self._kept_for:
            return
        self._kept_for = live

        def of_live(key: str | tuple[str, ...]) -> bool:
            return (key if isinstance(key, str) else key[0]) == live

        maps: tuple[dict[Any, Any], ...] = (
            self.not_before,
            self.trouble,
            self.renewed,
            self.confirmed,
            self.freeze_sent,
            self.lapsed_since,
            self.unsent,
            self.revoked,
            self.auth_known,
            self.facts,
            self.switched_here,
            self.signed,
            self.checks,
        )
        for held in maps:
            if not held:
                continue
            kept = {k: v for k, v in held.items() if of_live(k)}
            if len(kept) == len(held):
                continue
            if held is self.checks:
                for key, check in held.items():
                    if key not in kept:
                        drop_check(check)
            held.clear()
            held.update(kept)

    def _needs_admin_note(self, step: planner.StepAction) -> str:
        """The note of a node whose ``step`` waits while its agent says, on its heartbeats,
        that the node needs the admin (a transaction held on a journal it cannot write: the
        agent is up, its watch says nothing), or ""."""
        said = self.live_server(step.node) if self.live_server is not None else ""
        if not said.startswith(NEEDS_ADMIN):
            return ""
        return f"{said}{MID_STEP.format(step=step.step.value)}"

    async def _note(self, rollout_id: str, step: planner.StepAction, reason: str) -> None:
        """Put ``reason`` on the node's record (its state unchanged), once."""
        await self._save_node(rollout_id, step.node, lambda r: replace(r, reason=reason))

    def _silence(
        self, rollout_id: str, step: planner.StepAction, started: tuple[float, dt.datetime]
    ) -> _Silence | None:
        """The watch of ``step``'s agent for an attempt begun at ``started`` (monotonic,
        wall): its first look ``SILENT_AFTER`` seconds after the step began to wait, which is
        when the first of its attempts without an answer began (``trouble``): attempts that
        each fail within seconds (a stopped agent refuses no connection, its TLS handshake
        times out) are one wait, and the look comes at the start of the first attempt past
        it.

        None (no watch) for a switch or confirm that is in trouble already: each of its
        failed attempts from ``UNKNOWN_AFTER`` seconds on puts "unknown — agent unreachable
        since …" on the node (``_trouble``), and a look during an attempt that then failed
        wrote the silence note for that note to replace within a second (a dead agent, its
        port refusing: two notes in a row, ``step.agent_silent`` logged for nothing; review
        of s60 L1). Its first attempt, which a stopped agent holds open for up to 46 s, is
        watched."""
        trouble = self.trouble.get((rollout_id, step.node, step.step))
        if trouble is None:
            return _Silence(self, rollout_id, step, started[1], self.silent_after)
        if step.step in (Step.SWITCH, Step.CONFIRM):
            return None
        waited = started[0] - trouble[0]
        return _Silence(self, rollout_id, step, trouble[1], max(0.0, self.silent_after - waited))

    async def _look_for_silence(
        self, rollout_id: str, step: planner.StepAction, began: dt.datetime
    ) -> None:
        """``step`` (begun at ``began``) still waits for its agent: if the leader has not
        heard from the agent for ``SILENT_HEARTBEATS`` intervals, the node's reason says so,
        where it says nothing else (``silent_note``); if it has (the agent is back, its
        answer on the way), a note of its silence goes. Written only on such a change, and
        only while the node waits for this step; an answer takes the note away too
        (``_record``)."""
        known, last = self.store.last_heard(step.node)  # from memory when it can (no SQL)
        if not known:
            try:
                last = (await dbthread.run(self.store.get_node, step.node)).last_heartbeat
            except NotFound:  # removed meanwhile: the pass deals with it
                return
        now = self.clock()
        quiet = dt.timedelta(seconds=SILENT_HEARTBEATS * self.heartbeat_interval)
        silent = last is not None and now - last > quiet
        noted: list[str] = []
        # Heard, and saying the node needs the admin (``_needs_admin_note``): that, not silence.
        held = "" if silent else self._needs_admin_note(step)
        admin: list[str] = []

        def change(r: NodeRecord) -> NodeRecord:
            if STEP_FOR_STATE.get(r.state) is not step.step:
                return r  # its outcome is written (or an abort skipped it)
            if held:
                if r.reason != held and (not r.reason or _answered(r.reason)):
                    admin.append(held)
                    return replace(r, reason=held)
                return r
            if r.reason.startswith(NEEDS_ADMIN) and _answered(r.reason):
                r = replace(r, reason="")  # no longer said (or the agent is silent now)
            if silent and not r.reason:
                assert last is not None
                noted.append(silent_note(step.step, last, began, now))
                return replace(r, reason=noted[0])
            if not silent and r.reason.startswith(SILENT):
                return replace(r, reason="")
            return r

        await self._save_node(rollout_id, step.node, change)
        if admin:
            log.warning(
                "step.needs_admin",
                rollout_id=rollout_id,
                node=step.node,
                step=step.step.value,
                reason=admin[0],
                hint="the agent's reason says what to do on that node (tlsroll nodes); the"
                " leader keeps asking and records the outcome once the node goes on",
            )
        if noted:
            log.warning(
                "step.agent_silent",
                rollout_id=rollout_id,
                node=step.node,
                step=step.step.value,
                reason=noted[0],
                hint="check the node's agent runs (systemctl status tlsroll-agent there); the "
                "step goes on where it was once it answers",
            )

    async def _step(
        self,
        row: RolloutRow,
        step: planner.StepAction,
        learnt: dict[str, Any],
        issued: list[Signed],
        confirmed: list[NodeEvent],
    ) -> Outcome:
        steps = strategy_for(row.rollout)
        runners: dict[Step, Callable[[StepContext], Awaitable[Outcome]]] = {
            Step.PREFLIGHT: steps.preflight,
            Step.STAGE: steps.stage,
            Step.SWITCH: steps.switch,
            Step.CONFIRM: steps.confirm,
        }
        facts = self.facts.get(row.rollout.id)
        if facts is None or (facts.done() and facts.exception() is not None):
            facts = asyncio.ensure_future(
                dbthread.run(
                    rollout_facts,
                    self.schema,
                    row.rollout.id,
                    row.meta.auth_version,
                    self.ca.cert_pem,
                )
            )
            self.facts = {row.rollout.id: facts}  # the running rollout's only
            for held in (self.switched_here, self.signed, self.checks):  # in place: running
                for key in [k for k in held if k[0] != row.rollout.id]:  # steps hold them
                    if isinstance(check := held.pop(key), asyncio.Future):
                        drop_check(check)
        agent = await self.agents.get(step.node)
        began = self.before_restart.get((row.rollout.id, step.node, step.step))
        ctx = StepContext(
            rollout=row.rollout,
            meta=row.meta,
            node=step.node,
            facts=await asyncio.shield(facts),  # steps that begin at once share one read
            agent=agent,
            enrolled=node if isinstance(node := getattr(agent, "node", None), Node) else None,
            schema=self.schema,
            store=self.store,
            ca=self.ca,
            clock=self.clock,
            monotonic=self.monotonic,
            sleep=self.sleep,
            vault=self.vault,
            learnt=learnt,
            switched_here=self.switched_here,
            signed=self.signed,
            issued=issued,
            checks=self.checks,
            confirmed=confirmed,
            restarting=began.set if began is not None else (lambda: None),
        )
        return await runners[step.step](ctx)

    async def _scope_freeze(self, rollout: Rollout, name: str, on: bool) -> bool:
        """``--freeze scope``: freeze (or unfreeze) a node for the whole rollout."""
        agent = await self.agents.get(name)
        request = agent_pb2.FreezeRequest(
            command=agent_pb2.Command(rollout_id=rollout.id, epoch=rollout.epoch),
            lease_seconds=self.freeze_lease if on else 0,
        )
        reply = await (agent.freeze(request) if on else agent.unfreeze(request))
        return reply.frozen

    async def _save_node(
        self,
        rollout_id: str,
        name: str,
        change: Callable[[NodeRecord], NodeRecord],
        step: StepTime | None = None,
        details: Callable[[NodeDetail], dict[str, Any]] = lambda _d: {},
        *,
        timed_if_unchanged: bool = False,
        plan_next: list[planner.Plan] | None = None,
        certs: Sequence[IssuedCert] = (),
        recorded: Callable[[], None] | None = None,
        confirm: Sequence[NodeEvent] = (),
        confirm_only: bool = False,
        also: Sequence[StepTime] = (),
        cut: list[bool] | None = None,
    ) -> RolloutRow:
        """Apply ``change`` to one node record and save it, in one transaction with the
        step's times (``step``: only if the record changed, unless ``timed_if_unchanged``),
        the start of the step the node's new state begins, what the step learnt
        (``details`` of the node's stored detail: the fields to write), and the password now
        live on the node if it is now done, and the certificates ``certs`` if the record
        changed and the rollout runs (``_records_certs``; then ``recorded`` runs on the
        store's thread once the write has committed, before it is visible: see
        ``SchemaStore.save_states``). Nothing is written if nothing changed. Reads
        again if a write crossed (the rollout is kept in memory: reading it is cheap).

        ``plan_next`` (a step's outcome): the plan that follows from the records as this write
        leaves them is made in it too (``_plan_next``): a confirm's outcome and the next
        node's switch (persisted before that switch is sent, as ever) are one durable write,
        not two, and the next steps begin without waiting for the loop's pass. The plan, if
        the write made one, is appended to the list given.

        ``confirm``: the events of a switch's confirm, applied after ``change``'s if it changed
        the record, with ``also``'s step times (the steps it ended too), unless the node's
        agent is cut off (its certificate revoked): the write decides that in its transaction
        (``IfCutOff``), and then leaves ``change``'s record alone, as a write without
        ``confirm`` would (the node confirming: the confirm step, which cannot reach it, and
        the pass that reads the cut-off nodes fail it as a node cut off mid-switch). The
        agent pool's word, read before, may be older than a revocation that commits while the
        write waits for the store (review rev52d L1). ``cut`` gets True if it did.
        ``confirm_only``: ``change`` leaves the record as it is, and ``confirm`` is a confirm
        step's own outcome (its node confirming), decided the same way: a revocation that
        commits while the step's outside check runs, after the pass that planned the step read
        the nodes cut off, leaves the node confirming (review rev53a M2)."""
        # A plain loop, not tenacity: its machinery cost ~20 µs of CPU per save, four saves
        # per node (issue 15), for a retry that is rare.
        for attempt in range(1, STALE_ATTEMPTS + 1):
            try:
                # Settled: ``save_states`` checks this node's record (``only``) and raises
                # StaleRecords if a write overtook it.
                row = self.schema.kept(rollout_id, settled=True) or await dbthread.run(
                    self.schema.get, rollout_id
                )
                assert row is not None
                old, detail = row.node(name)
                new = change(old)
                now = self.clock()
                learnt = {k: v for k, v in details(detail).items() if getattr(detail, k) != v}
                fingerprint = learnt.get("cert_fingerprint")
                if_cut_off = None
                if confirm and (new != old or (confirm_only and old.state is NodeState.CONFIRMING)):
                    # The confirm's too, unless the write finds the agent cut off: then this.
                    plain = _times(step, old, new, now, timed_if_unchanged)
                    auth = self._auth_now(row, old, new)
                    revoke = self._revoke_now(row, old, new, fingerprint, detail)
                    if_cut_off = IfCutOff(name, [new], plain, auth, revoke)
                    new = functools.reduce(NodeRecord.with_event, confirm, new)
                ended = also if if_cut_off is not None else ()  # the steps the write ends too
                steps = _times(step, old, new, now, timed_if_unchanged, ended)
                if new == old and not steps and not learnt:
                    return row
                auth = self._auth_now(row, old, new)
                revoke = self._revoke_now(row, old, new, fingerprint, detail)
                plans: list[planner.Plan] = []
                then = (
                    None
                    if plan_next is None
                    else functools.partial(self._plan_next, plans, now, cut=if_cut_off)
                )
                row = await dbthread.run(
                    self.schema.save_states,
                    row,
                    row.rollout,
                    [new],
                    now,
                    "engine",
                    steps=steps,
                    details={name: learnt} if learnt else None,
                    auth=auth,
                    only=(name,),  # decided from this node's record alone
                    revoke=revoke,
                    then=then,
                    certs=certs if _records_certs(row, old, new) else (),
                    recorded=recorded,
                    if_cut_off=if_cut_off,
                )
                if if_cut_off is not None and if_cut_off.taken:
                    auth, revoke = dict(if_cut_off.auth), list(if_cut_off.revoke)
                    if cut is not None:
                        cut.append(True)
                # A plan that moves no node counts only if every step it names runs already
                # (``_running``): one that would begin a step is the loop's pass's, as before.
                plans[:] = [p for p in plans if p.node_events or self._running(row, p)]
                for plan in plans:
                    self._planned(row, plan)
                if plan_next is not None:
                    plan_next += plans
                if auth:
                    self.auth_known.setdefault(rollout_id, set()).add(name)
                for r in revoke:
                    self.revoked.setdefault(rollout_id, set()).add(name)
                    if r.serials:
                        log.info("certificate.superseded", node=name, serials=r.serials)
                return row
            except StaleRecords:
                if attempt == STALE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt raises

    def _plan_next(
        self,
        plans: list[planner.Plan],
        now: dt.datetime,
        after: RolloutRow,
        *,
        cut: IfCutOff | None = None,
    ) -> tuple[Sequence[NodeRecord], list[StepTime]]:
        """Inside the write of a step's outcome (``_save_node``), on the store's thread: the
        node moves the loop's next pass would persist (``reconcile``), from the records as
        that write leaves them, and the steps they begin; ``plans`` gets the plan. Only node
        moves: a plan that changes the rollout's state (its end, a halt), one that steps a
        cut-off node of a halting rollout (whose note the loop makes again:
        ``drained_halt_note``), a rollout held by ``--when-quiet`` (whose gate reads the
        store) and a planner error are left to the loop, which the step's task wakes when
        this persists no plan (``_record`` returns False, ``_run_step``); so is a write that
        found its node's agent cut off (``cut``: its plan would not know that node cut off,
        which the pass reads again: review rev53a L2). A plan that moves no node (a stage's
        outcome while another node switches) persists nothing; in a running rollout without
        scope freezes it is given all the same, and if every step it names runs already
        (``_running``, checked on the loop) the outcome wakes no pass to make it again
        (``_record``)."""
        if after.meta.when_quiet or (cut is not None and cut.taken):
            return (), []
        try:
            plan = planner.next_actions(
                after.rollout,
                after.record_view,
                prepare_ahead=self.prepare_ahead,
                census=after.census,
                lapsed=self._lapsed(after),
                unsent=self._unsent(after),
                cut_off=self.cut_off,  # (as the last pass read them: at most a pass old)
            )
        except Exception:  # the loop's pass meets it again, and logs it
            return (), []
        if plan.rollout_events:
            return (), []
        if not plan.node_events:
            # Nothing to persist (a stage's outcome while another node switches, say): if its
            # steps all run already (``_save_node``), a running rollout without scope freezes
            # need not wake the loop for a pass that would make the same plan and find
            # nothing to do (issue 15: about one pass a node).
            if (
                after.rollout.state is RolloutState.RUNNING
                and after.rollout.freeze is not FreezeMode.SCOPE
            ):
                plans.append(plan)
            return (), []
        if after.rollout.state is RolloutState.HALTING and any(
            a.node in self.cut_off for a in plan.node_events
        ):
            return (), []  # the loop's pass writes the halt's note again (``reconcile``)
        _rollout, moved = planner.plan_moves(after.rollout, lambda n: after.node(n)[0], plan)
        plans.append(plan)
        return moved, _begun([after.node(r.name)[0] for r in moved], moved, now)

    def _running(self, row: RolloutRow, plan: planner.Plan) -> bool:
        """Whether every step of ``plan`` runs already, in a task other than this one (the
        step whose outcome is being written ends with it): the loop's pass would begin none."""
        me = asyncio.current_task()
        for step in plan.steps:
            task = self.tasks.get((row.rollout.id, step.node, step.step))
            if task is None or task.done() or task is me:
                return False
        return True

    def _planned(self, row: RolloutRow, plan: planner.Plan) -> None:
        """A plan persisted with a step's outcome (``_plan_next``): logged as the loop logs
        its own, and its steps begun now. The outcome does not wake the loop then
        (``_record``, ``_run_step``); a pass that comes anyway (the tick, another wake)
        finds them running."""
        for action in plan.node_events:
            emit = log.debug if action.event in _GATES else log.info
            emit(
                "node.event",
                rollout_id=row.rollout.id,
                node=action.node,
                node_event=action.event.value,
                reason=action.reason,
            )
        moved = set(plan.nodes_with_events)
        self._hold(row)  # with the nodes it moved in, before their steps
        for step in plan.steps:
            self._ensure_step(row, step, fresh=step.node in moved)

    def _hold(self, row: RolloutRow) -> None:
        """The pool holds ``row``'s rollout's nodes in flight as the store has them now
        (``AgentPool.hold``), not as ``row`` had them: a pass's row, read before a step's
        outcome saved a move meanwhile (which held the node it moved in), would drop that node
        from the hold until the next pass, and the cap could close its channel meanwhile
        (session 29's risk). What the last write left is never older than a row this loop
        got from the store."""
        fresh = self.schema.kept(row.rollout.id, settled=True)
        self.agents.hold(
            _in_flight(fresh if fresh is not None else row),
            row.rollout.id,
            # A scope freeze still renews and unfreezes its done nodes: their channels stay
            # under the pool's cap rather than closed as they land (review 1b, finding 4).
            close_landed=row.rollout.freeze is not FreezeMode.SCOPE,
        )

    @staticmethod
    def _revoke_now(
        row: RolloutRow,
        old: NodeRecord,
        new: NodeRecord,
        learnt_fingerprint: str | None,
        detail: NodeDetail,
    ) -> list[Revocation]:
        """The certificate a node this save leaves done (or dual) served before this rollout
        gave it a new one: revoked in the same write (``_revoke_superseded`` is the same rule,
        level-triggered, for a node done without it: a leader that died in between)."""
        fingerprint = learnt_fingerprint or detail.cert_fingerprint
        if (
            not CHANGES[row.rollout.change].stages_certificate
            or new.state not in SERVING_STATES
            or old.state in SERVING_STATES
            or not fingerprint
        ):
            return []
        before = row.meta.started_at or row.meta.created_at
        return [Revocation(new.name, fingerprint, before)]

    @staticmethod
    def _auth_now(row: RolloutRow, old: NodeRecord, new: NodeRecord) -> dict[str, int | None]:
        """The password live on a node this save leaves done (or dual): recorded with it
        (``_record_node_auth`` is the same rule, level-triggered, for a record without it)."""
        rule = CHANGES[row.rollout.change].password
        done = (NodeState.DONE, NodeState.DUAL)
        if rule is Password.KEPT or new.state not in done or old.state is new.state:
            return {}
        return {new.name: None if rule is Password.CLEARED else row.meta.auth_version}

    def _lapsed(self, row: RolloutRow) -> frozenset[str]:
        """``--freeze scope``: the nodes recorded frozen whose freeze this process cannot
        count on now (``_confirmed_until`` passed, or no confirmation seen since its start):
        the plan switches no node while there is one (``planner.next_actions``). Not a node
        cut off (``_cut_off``): never renewed, its freeze lapses for good, and the switches
        of the others (``_ensure_step``), their notes (``_note_waiting``) waited for it
        (review of s50 H2). A little
        early (a tick, or a sixth of the lease if shorter: a confirmation of a short lease
        counts for two thirds of it, renewed every third): a confirmation that runs out
        between the plan and its steps must not leave a node ``switching`` that the step's
        gate then holds (``_ensure_step``)."""
        if row.rollout.freeze is not FreezeMode.SCOPE:
            return frozenset()
        early = min(TICK_SECONDS, self.freeze_lease / 6)
        now, rid, cut_off = self.monotonic() + early, row.rollout.id, self.cut_off
        return frozenset(
            r.name
            for r in row.records
            if r.scope_frozen
            and now >= self.confirmed.get((rid, r.name), 0.0)
            and r.name not in cut_off
        )

    def _unanswered(self, rollout_id: str, lapsed: frozenset[str]) -> frozenset[str]:
        """The ``lapsed`` nodes whose freeze this process has seen lapsed for a renewal period
        (a third of the lease) or longer: renewed again at once and still not confirmed, their
        agents do not answer (``planner.next_actions``' ``unanswered``). Not a node only just
        lapsed, nor every node after a leader restart (none confirmed yet): a live agent
        confirms within that period."""
        now, period = self.monotonic(), self.freeze_lease / 3
        for key in [k for k in self.lapsed_since if k[0] == rollout_id and k[1] not in lapsed]:
            del self.lapsed_since[key]
        unanswered = []
        for name in sorted(lapsed):
            since, told = self.lapsed_since.setdefault((rollout_id, name), (now, False))
            if now - since < period:
                continue
            unanswered.append(name)
            if not told:  # once per lapse: who is told that the scope stays frozen
                self.lapsed_since[rollout_id, name] = (since, True)
                log.warning(
                    "freeze.unanswered",
                    rollout_id=rollout_id,
                    node=name,
                    seconds=round(now - since),
                    detail="its scope freeze is not confirmed: no switch begins while the"
                    " rollout runs, and those of its scope still frozen stay frozen"
                    " (refusing entries) until it answers;"
                    f" tlsroll rollout abort {rollout_id} lifts their freeze",
                )
        return frozenset(unanswered)

    async def _note_waiting(self, row: RolloutRow, lapsed: frozenset[str]) -> None:
        """``--freeze scope``: a node staged for its switch, or switching with its Switch held
        at the step's gate (``_gated_switch``), says which nodes' freezes it waits for
        (``_lapsed``); the note goes once it no longer waits."""
        rid = row.rollout.id
        for r in row.records:
            held = r.state is NodeState.SWITCHING and self.unsent.get((rid, r.name)) is False
            waits = (r.state is NodeState.STAGED or held) and bool(lapsed)
            note = f"{WAITS_FOR_FREEZE}{', '.join(sorted(lapsed))}" if waits else ""
            if r.reason != note and (waits or r.reason.startswith(WAITS_FOR_FREEZE)):
                step = planner.StepAction(r.name, Step.SWITCH, row.rollout.epoch)
                await self._note(row.rollout.id, step, note)

    def _only_asked(self, row: RolloutRow, name: str) -> bool:
        """Whether ``name`` is recorded as asked to freeze and never confirmed frozen, as the
        last write left it."""
        fresh = self.schema.kept(row.rollout.id, settled=True) or row
        try:
            rec = fresh.node(name)[0]
        except KeyError:
            return False
        return rec.freeze_asked and not rec.scope_frozen

    async def _lease_ran_out_saved(
        self, rollout_id: str, step: planner.StepAction, why: str
    ) -> bool:
        """``_lease_ran_out`` from inside a step's ``except``: a store error of its write (a
        full disk) is logged once and leaves the step in trouble, with its pause, as any other
        failure (False). It escaped that ``except`` before: no ``_trouble``, no
        ``not_before``, the UNFREEZE sent again at every pass, the task's exception never
        retrieved (review 2 of session 33, L2)."""
        try:
            return await self._lease_ran_out(rollout_id, step, why)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "step.record_failed",
                rollout_id=rollout_id,
                node=step.node,
                step=step.step.value,
                error=str(exc),
                error_type=type(exc).__name__,
                hint="the leader could not write the step to its store: check the disk under the"
                " leader's data dir (df -h)",
            )
            return False

    async def _lease_ran_out(self, rollout_id: str, step: planner.StepAction, why: str) -> bool:
        """An unfreeze that got no answer at all (``why``; a refusal is an answer and stays
        trouble, but for a node only asked to freeze: ``_only_asked``), of a rollout that has
        settled: once the node's freeze lease has surely run
        out, its agent, if it runs, has lifted the freeze by itself
        (``nodeagent.service.watch_freeze_lease``; a dead machine holds none), so the node is
        recorded unfrozen, with a note saying so and why, and the rollout can end. Without
        this a scope freeze whose node never answered again kept the rollout (an abort too)
        from ending, and every later rollout, and ``nodes remove`` of that node, was refused
        (session 32's review 1, F2). Surely: ``LEASE_MARGIN`` (or a third of the lease, if
        longer) after the lease from the end of the last freeze call this process made (an
        attempt may reach the agent until then) or from its start (an earlier process sent
        none after it). The freeze window's end is left unset: nobody saw it end. True if
        so recorded."""
        key = (rollout_id, step.node)
        since = max(self.freeze_sent.get(key, self.began), self.began)
        ran_out = since + self.freeze_lease + max(self.freeze_lease / 3, self.lease_margin)
        if self.monotonic() < ran_out:
            return False
        self.renewed.pop(key, None)
        self.confirmed.pop(key, None)
        note = (
            f"unfreeze not confirmed ({why}); its scope freeze lease has run out since, so its "
            "agent, if it runs and ever froze it, has lifted the freeze by itself; check the node"
        )
        # A node cut off keeps its reason (why it left the rollout, and `nodes remove`): the
        # leader never dials it, so no unfreeze was ever sent (s50).
        cut = step.node in self.cut_off
        await self._save_node(
            rollout_id,
            step.node,
            lambda r: replace(
                r, scope_frozen=False, freeze_asked=False, reason=r.reason if cut else note
            ),
        )
        log.warning(
            "freeze.lease_ran_out",
            rollout_id=rollout_id,
            node=step.node,
            reason=why,
            hint="the node never answered its unfreeze and its freeze lease has run out since, "
            "so it is counted unfrozen: check the node (tlsroll nodes) and that its server "
            "takes writes",
        )
        return True

    def _confirmed_until(self, sent: float) -> float:
        """Until when (monotonic) an agent's confirmation of a scope freeze whose request left
        at ``sent`` counts: the agent's lease runs from its receipt of the request, not
        earlier, so it holds at least until ``sent`` plus the lease; less a renewal period
        (a third of the lease), for a switch begun just before then to run inside it and for
        the agent's clock (the lease is its wall time). A confirmed renewal moves it on;
        renewals that fail for a renewal period let it pass, and the switches wait."""
        return sent + self.freeze_lease - self.freeze_lease / 3

    async def _record_frozen(
        self,
        rollout_id: str,
        step: planner.StepAction,
        frozen: bool,
        started: tuple[float, dt.datetime],
    ) -> None:
        """A scope freeze or unfreeze the agent confirmed: the node's flag, the step's end and
        the node's freeze window (from the first confirmed freeze, renewals leave it, to the
        confirmed unfreeze), in one write. The agent's reply carries no time: the leader's
        clock it is. ``started``: when the request left (monotonic, wall)."""
        key = (rollout_id, step.node)
        if frozen:  # the lease this process just set or renewed runs from now
            self.renewed[key] = self.monotonic()
            self.confirmed[key] = max(
                self.confirmed.get(key, 0.0), self._confirmed_until(started[0])
            )
        else:
            self.renewed.pop(key, None)
            self.confirmed.pop(key, None)
        now = self.clock()

        def window(detail: NodeDetail) -> dict[str, Any]:
            if frozen and detail.freeze_started_at is None:
                return {"freeze_started_at": now}
            if not frozen and step.step is Step.UNFREEZE:
                return {"freeze_ended_at": now}
            return {}

        await self._save_node(
            rollout_id,
            step.node,
            lambda r: replace(r, scope_frozen=frozen, freeze_asked=False),
            StepTime(step.node, step.step.value, started[1], now),
            window,
            timed_if_unchanged=True,
        )
        log.info("node.scope_frozen", rollout_id=rollout_id, node=step.node, frozen=frozen)

    async def _record(
        self,
        rollout_id: str,
        step: planner.StepAction,
        event: NodeEvent,
        reason: str | None,
        started: dt.datetime | None = None,
        learnt: dict[str, Any] | None = None,
        issued: Sequence[Signed] = (),
        confirmed: Sequence[NodeEvent] = (),
    ) -> bool:
        """The step's result on the node, if the node still waits for it (an abort skips a
        node whose preflight or stage is in flight: that result is dropped), with its times
        and what it ``learnt`` about the node (kept even if the result is dropped), and the
        certificates it ``issued`` (``_records_certs``: not if the result is dropped, nor while
        the rollout pauses or aborts): one write. Those are then the node's stage's to send
        (``signed``): only certificates recorded before they are sent. One not recorded is
        forgotten: a stage that runs later (a resumed rollout) asks CreateCSR, signs and
        records one then, as before.

        ``signed`` is filled on the store's thread as the write commits, before the lock is
        released (``Database.after_commit``): a pass on another wake (another node's outcome)
        that sees the node in ``staging`` and begins its stage finds it there. Filled here
        after the write, such a stage took the CreateCSR path and signed a second
        certificate (review s28 L2).

        True if the write persisted the plan that follows too (``_plan_next``: nodes moved
        and the steps they begin, no change of the rollout's state) and those steps are begun:
        then the loop need not be woken for this outcome (its pass would make the same plan
        again and find nothing to persist or begin); its tick and any other wake still
        come.

        ``confirmed``: the confirm's event a switch reached too (``StepContext.confirmed``),
        applied after the switch's in the same write, with the confirm's step times (begun and
        ended as the switch ended: its check began inside the switch, at the verify), so that
        the node goes from switching to done (or dual) and the next node's switch is planned
        in that write; each outcome logged as its step's. Unless the node's agent is cut off
        (its certificate revoked), which the write decides in its own transaction
        (``_save_node``'s ``confirm``): then the switch's outcome alone is written and logged,
        the node left confirming for the pass that fails it as a node cut off mid-switch."""
        dropped: list[bool] = []
        cut: list[bool] = []  # the write found the agent cut off: no confirm written
        plans: list[planner.Plan] = []
        key = (rollout_id, step.node)
        also = confirmed if event is NodeEvent.SWITCH_DONE else ()
        # A confirm step's own outcome that takes the node to done (or dual): written only if
        # the write finds its agent not cut off, as a confirm written with its switch.
        alone = step.step is Step.CONFIRM and event in CONFIRMED

        def recorded() -> None:  # the store's thread: a dict's item set, atomic
            self.signed[key] = issued[-1]

        def change(r: NodeRecord) -> NodeRecord:
            if STEP_FOR_STATE.get(r.state) is not step.step:
                dropped.append(True)
                return r
            # An answer at last: what was said while the agent was away no longer holds.
            cleared = "" if reason is None and _answered(r.reason) else reason
            if alone:  # the write applies it (``confirm_only``)
                return r if cleared is None or cleared == r.reason else replace(r, reason=cleared)
            return r.with_event(event, cleared)  # ``also``: the write applies it (``confirm``)

        now = self.clock()
        row = await self._save_node(
            rollout_id,
            step.node,
            change,
            StepTime(step.node, step.step.value, started, now),
            lambda _d: learnt or {},
            plan_next=plans,
            certs=[s.record for s in issued],
            recorded=recorded if issued else None,
            confirm=(event,) if alone else also,  # switching -> confirming -> done (or dual)
            confirm_only=alone,
            also=[StepTime(step.node, Step.CONFIRM.value, now, now)] if also else (),
            cut=cut,
        )
        if dropped or (cut and alone):  # cut: left confirming, failed by the pass as cut off
            log.info(
                "step.result_dropped",
                rollout_id=rollout_id,
                node=step.node,
                step=step.step.value,
                node_event=event.value,
                **({} if dropped else {"reason": "its agent is cut off"}),
            )
            return False
        if cut:  # switching -> confirming only: the confirm step's and the pass's to fail it
            also = ()
        ended = [(step.step, event, reason, {}), *((Step.CONFIRM, e, None, WITH) for e in also)]
        for what, outcome, why, more in ended:
            _node_log(outcome, log.info)(
                "step.finished",
                rollout_id=rollout_id,
                node=step.node,
                step=what.value,
                node_event=outcome.value,
                reason=why,
                **more,
            )
        # Only while the rollout runs, without scope freezes: a plan of a draining rollout
        # can leave the next pass more to do (a change without a stage: a node it moves to
        # staged is skipped by a halt only at the next pass), and each pass renews the
        # scope freezes' leases (``_renew_freezes``).
        return (
            bool(plans)
            and row.rollout.state is RolloutState.RUNNING
            and row.rollout.freeze is not FreezeMode.SCOPE
        )


class _Silence:
    """The watch of one attempt of a step while it waits for its agent (``Engine._run_step``):
    a timer, ``SILENT_AFTER`` seconds into the wait (``Engine._silence``), then every half
    heartbeat interval, whose look (``Engine._look_for_silence``) puts the agent's silence on
    the node's record or takes it away. A step answered within ``SILENT_AFTER`` costs the
    timer alone: nothing is read or written for it (issue 15)."""

    __slots__ = ("began", "engine", "look", "rollout_id", "step", "stopped", "timer")

    def __init__(
        self,
        engine: Engine,
        rollout_id: str,
        step: planner.StepAction,
        began: dt.datetime,
        after: float,
    ) -> None:
        self.engine = engine
        self.rollout_id = rollout_id
        self.step = step
        self.began = began  # when the step began to wait (``Engine._silence``)
        self.stopped = False
        self.look: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(after, self._due)

    def _due(self) -> None:
        if not self.stopped:
            self.look = asyncio.ensure_future(self._look())

    async def _look(self) -> None:
        try:
            await self.engine._look_for_silence(self.rollout_id, self.step, self.began)
        except Exception as exc:  # only a note: never the step's failure
            fields = {
                "rollout_id": self.rollout_id,
                "node": self.step.node,
                "step": self.step.step.value,
            }
            # A store that cannot be written (a full disk): logged there, at most every
            # ``store_health.LOG_SECONDS``, not at each look (every 1-2.5 s per waiting step).
            if not self.engine._store_failing(exc, "step.silence_look_failed", **fields):
                log.warning(
                    "step.silence_look_failed",
                    **fields,
                    **crash_fields(exc),
                    detail="the leader could not read when the agent last answered; it looks "
                    "again at the next tick",
                )
        if not self.stopped:
            again = max(1.0, self.engine.heartbeat_interval / 2)
            self.timer = asyncio.get_running_loop().call_later(again, self._due)

    async def stop(self) -> None:
        """The attempt ended: no look after this, and one under way has ended (its write
        comes before the outcome's, which clears it: ``Engine._record``)."""
        self.stopped = True
        self.timer.cancel()
        if self.look is not None and not self.look.done():
            await asyncio.wait({self.look})


def _times(
    step: StepTime | None,
    old: NodeRecord,
    new: NodeRecord,
    now: dt.datetime,
    timed_if_unchanged: bool,
    also: Sequence[StepTime] = (),
) -> list[StepTime]:
    """The step times a write of ``old`` -> ``new`` records (``Engine._save_node``): the
    step's (and ``also``'s, the steps it ended too) if the record changed, unless
    ``timed_if_unchanged``, then the start of the step the new state begins."""
    steps = _begun([old], [new], now)
    if step is not None and (new != old or timed_if_unchanged):
        steps[:0] = [step, *also]
    return steps


def _records_certs(row: RolloutRow, old: NodeRecord, new: NodeRecord) -> bool:
    """Whether a step's outcome records the certificates the step issued (a preflight's): only
    if it changes the node's record (a result an abort dropped does not) while the rollout
    runs. A paused or aborting rollout sends no Stage now (an abort skips the node), and a
    certificate recorded but never sent would stay in `certs check-expiration`."""
    return new != old and row.rollout.state is RolloutState.RUNNING


def _in_flight(row: RolloutRow) -> frozenset[str]:
    """The names of ``row``'s nodes in flight (from its census)."""
    census = row.census
    return frozenset(row.nodes[at][0].name for s in IN_FLIGHT_NODE_STATES for at in census.at(s))


def _failed_after(row: RolloutRow, moved: Iterable[NodeRecord]) -> list[NodeRecord]:
    """The failed records (``FAILED_NODE_STATES``) of ``row`` once ``moved`` is saved, in the
    rollout's order: a node the plan fails halts the rollout in the same pass (a cut-off one
    mid-switch), and the halt's note names it (review of s50 H1)."""
    failed = {r.name: r for r in (row.nodes[at][0] for at in _positions(row, FAILED_NODE_STATES))}
    for r in moved:
        if r.state in FAILED_NODE_STATES:
            failed[r.name] = r
        else:
            failed.pop(r.name, None)
    return sorted(failed.values(), key=lambda r: row.position(r.name))


def _ended_after(row: RolloutRow, moved: Iterable[NodeRecord]) -> list[NodeRecord]:
    """The failed and skipped records of ``row`` once ``moved`` is saved (with the others
    ``moved`` holds), in the rollout's order: what a halt's note made again reads
    (``drained_halt_note``)."""
    positions = _positions(row, FAILED_NODE_STATES | {NodeState.SKIPPED})
    ended = {r.name: r for r in (row.nodes[at][0] for at in positions)}
    ended.update((r.name, r) for r in moved)
    return sorted(ended.values(), key=lambda r: row.position(r.name))


def _may_take_back_after(row: RolloutRow, moved: Iterable[NodeRecord]) -> bool:
    """Whether ``rollout rollback`` would have a node of ``row`` to take back once ``moved``
    is saved (``may_take_back``): a halt's note offers it only then (review s63 faults, L1)."""
    states = {
        r.name: r.state for r in (row.nodes[at][0] for at in _positions(row, TAKEN_BACK_FROM))
    }
    states.update((r.name, r.state) for r in moved)
    return may_take_back(states.values())


def _positions(row: RolloutRow, states: Iterable[NodeState]) -> list[int]:
    """The positions of ``row``'s nodes in any of ``states``, in order (from its census)."""
    return sorted(itertools.chain.from_iterable(row.census.at(s) for s in states))


def _begun(
    before: Sequence[NodeRecord], after: Sequence[NodeRecord], now: dt.datetime
) -> list[StepTime]:
    """The steps that nodes begin by the move from ``before`` to ``after`` (the same nodes, in
    the same order; a node entering a
    working state begins its step, ``STEP_FOR_STATE``): their start time goes in the same
    write as the move, which is persisted before the step is sent anyway."""
    return [
        StepTime(new.name, STEP_FOR_STATE[new.state].value, started=now)
        for old, new in zip(before, after, strict=True)
        if new.state is not old.state and new.state in STEP_FOR_STATE
    ]
