"""``auto_rotate = true``: the leader rotates server certificates by itself, in the window.

    window = parse_window("Sat 02:00-05:00")
    rotator = AutoRotator(watch, schema, commands, enabled=True, window=window,
                          zone=ZoneInfo("Europe/Berlin"))   # None: the host's local time
    rotator.announce()                         # at start: warns of a window read in UTC
    watch.before_check.append(rotator.check)   # with every check of the expiry watch
    watch.wake_hints.append(rotator.wake_in)   # and one as the window opens, if one is due

At each check it takes the server (8443) certificates within their warning horizon
(``ExpiryWatch.warnings``), the active and the newest rollout, and the time on the window's
wall clock (``maintenance_timezone``, else the host's), and asks the pure
``leader.maintenance.decide`` what to do. While certificates are due outside the window,
the watch checks again as the window opens (``wake_in``), so that a window shorter than the
watch's interval is not missed. If that says start, it plans and starts a
``rotate-cert`` rollout of exactly those nodes, as an admin's ``tlsroll rollout start`` would
(the same planner, the same checks of the nodes), with the audit actor ``leader (auto_rotate)``.
A plan that is refused (a node offline, one that cannot be reached, ...) starts nothing: the
refusal is logged once and kept for the schema (``status``) until something changes.
Nodes whose agent says they need the admin (``needs_admin``: a journal put back mid-switch;
their agents refuse every switch, and the planner refuses a plan with them) are left out of
what is due, and named in the check's reason: before, one such node blocked every rotation,
and the other nodes' certificates could expire over it (review s41rev3). So are the nodes
whose agent is cut off (``cut_off``: its certificate revoked, a machine lost or stolen; the
start refuses it as offline until `tlsroll nodes remove`), named with that way on (s50). And
so are the nodes the start finds offline: the others are started without them, and they are
named in the reason; each is rotated at a later check in the window once its agent is back
(review s64 pki L1: one node switched off blocked the rotation of every other). Only in the
leader's first ``SETTLE_SECONDS``, when the agents are still reconnecting, does an offline
node block the start, which is tried again soon (``RETRY_BLOCKED``): left out then, nodes
that are merely late would wait for the rotation of the others and the watch's next check.
A plan refused for some of the nodes only, naming them (``planner.PlanError.names``: one not
on https, one the plan cannot ask, one whose agent is too old, ...), is started without them,
each named with the refusal in the reason (review rvc of s66-misc, M1: a node the watch found
due that is not on https had every start refused, and no node was rotated in any window).

A served certificate the admin revoked (``Expiry.revoked``) is due whatever its end, and even
one that ends with the CA: the node goes on serving it until it is rotated (review s64 pki
M1).

Never two at once: the checks run one after the other (a lock as well), ``decide`` waits while
any rollout is active, and the schema store refuses a second active rollout in the same
transaction that would create it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from leader.commands import Commands, RolloutRequest
from leader.expiry import ExpiryWatch
from leader.maintenance import (
    Decision,
    LastRollout,
    Verdict,
    Window,
    decide,
    in_window,
    next_opening,
    seconds_until,
)
from leader.planner import NodesOffline, PlanError
from leader.rollout_core import Change, RolloutState, Scope
from leader.schema_store import RolloutRow, SchemaStore
from leader.zones import host_is_utc
from tlsroll import logs
from tlsroll.errors import TlsrollError
from tlsroll.v1 import schema_pb2

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo  # loaded by leader.zones.load_zone only

log = logs.get_logger(__name__)

ACTOR = "leader (auto_rotate)"
# How long after the window opens the watch checks again: inside it, whatever the rounding.
AFTER_OPENING = 1.0  # seconds
SETTLE_SECONDS = 180.0
"""After the leader starts, how long a blocked check is tried again soon (``RETRY_BLOCKED``):
its first check runs as it starts, before the agents have reconnected, and every node is
offline then (rev57b M4: the rotation then waited for the watch's interval, an hour by
default, of a window that an upgrade's restart fell into)."""
RETRY_BLOCKED = 20.0  # seconds


def local_now() -> dt.datetime:
    """Now, on the leader host's wall clock (its TZ), aware."""
    return dt.datetime.now().astimezone()


def utc_window_warning(window: Window) -> str:
    """What the leader says at its start (and the schema shows) when the window is read in UTC
    only because the host runs on UTC: servers commonly do, and a practice's "04:00-06:00"
    before opening is then 06:00-08:00 in German summer time."""
    return (
        f"the maintenance window {window.text} is read in UTC (the leader host's zone; "
        "maintenance_timezone is not set); if the practice is elsewhere, set it in "
        'leader.toml, e.g. maintenance_timezone = "Europe/Berlin"'
    )


@dataclass
class Status:
    """The last check, as the schema shows it (``AutoRotateView``)."""

    enabled: bool
    window: str
    timezone: str = ""  # maintenance_timezone; "": the leader host's zone
    warning: str = ""  # a setting the admin should look at (``utc_window_warning``)
    in_window: bool = False
    checked_at: dt.datetime | None = None
    verdict: str = ""
    reason: str = ""
    due: tuple[str, ...] = ()
    rollout_id: str = ""
    next_window: str = ""
    logged: tuple[str, str] = field(default=("", ""))  # (verdict, reason) last logged

    def view(self) -> schema_pb2.AutoRotateView:
        view = schema_pb2.AutoRotateView(
            enabled=self.enabled,
            window=self.window,
            in_window=self.in_window,
            verdict=self.verdict,
            reason=self.reason,
            due_nodes=list(self.due),
            rollout_id=self.rollout_id,
            next_window=self.next_window,
            timezone=self.timezone,
            warning=self.warning,
        )
        if self.checked_at is not None:
            view.checked_at.FromDatetime(self.checked_at)
        return view


class AutoRotator:
    def __init__(
        self,
        watch: ExpiryWatch,
        schema: SchemaStore,
        commands: Commands,
        *,
        enabled: bool,
        window: Window | None,
        zone: ZoneInfo | None = None,
        local_clock: Callable[[], dt.datetime] = local_now,
        utc_host: Callable[[], bool] = host_is_utc,
        needs_admin: Callable[[], Collection[str]] = frozenset,
        cut_off: Callable[[], Collection[str]] = frozenset,
        monotonic: Callable[[], float] = time.monotonic,
        start_refused: Callable[[], str | None] = lambda: None,
    ) -> None:
        """``zone``: the window's (``maintenance_timezone``); None: the host's local time.
        ``local_clock``: now, aware in any zone (it is read on ``zone``'s wall clock), or
        without a ``zone`` as the window's wall clock itself (naive: the host's).
        ``needs_admin``: the nodes that need the admin now (any thread; the leader's node
        problems of that kind), left out of every rotation. ``cut_off``: the nodes whose agent
        is cut off (``Store.cut_off_nodes``: it reads the store, so in a thread), left out
        too. ``monotonic``: elapsed time (``SETTLE_SECONDS`` from this rotator's making).
        ``start_refused``: why no rollout may start now for the leader's own disk (blocking:
        ``leader.store_health.start_refused``, as `rollout start` is refused), or None."""
        self.monotonic = monotonic
        self.start_refused = start_refused
        self._made = monotonic()
        self.needs_admin = needs_admin
        self.cut_off = cut_off
        self.watch = watch
        self.schema = schema
        self.commands = commands
        self.enabled = enabled
        self.window = window
        self.zone = zone
        self.local_clock = local_clock
        self.status = Status(enabled, window.text if window else "", zone.key if zone else "")
        if enabled and window is not None and zone is None and utc_host():
            self.status.warning = utc_window_warning(window)
        self._lock = asyncio.Lock()
        # The local time the last check began, whether or not it got as far as a verdict
        # (``wake_in``), and the elapsed time then (``_settling``).
        self._began: dt.datetime | None = None
        self._began_at = self._made

    def now(self) -> dt.datetime:
        """Now on the window's wall clock."""
        now = self.local_clock()
        return now.astimezone(self.zone) if self.zone is not None else now

    def announce(self) -> None:
        """At the leader's start: one warning if the window is read in UTC only because the
        host runs on UTC (``Status.warning``)."""
        if self.status.warning:
            log.warning(
                "auto_rotate.window_in_utc",
                window=self.status.window,
                detail=self.status.warning,
            )

    async def check(self) -> Decision:
        """One check (the expiry watch's hook); returns what was decided, with STARTED or
        BLOCKED once the start was tried. One that raises (the store: disk I/O error, busy)
        records nothing; the watch logs it and checks again at its interval."""
        async with self._lock:
            local = self._began = self.now()
            self._began_at = self.monotonic()
            return await self._check(local)

    def _settling(self) -> bool:
        """Whether the last check began in this rotator's first ``SETTLE_SECONDS`` (the
        leader's start: its agents still reconnecting)."""
        return self._began_at - self._made < SETTLE_SECONDS

    async def _check(self, local: dt.datetime) -> Decision:
        if not self.enabled or self.window is None:
            decision = Decision(Verdict.OFF)
            self._record(decision, local)
            return decision
        # The newest rollout before and after what is due is read: a rotation that ends in
        # between (its last node's new certificate not yet in what was read) would look due
        # and idle at once, and its nodes would be rotated again (session 32's audit, M4).
        before = _last_state(await asyncio.to_thread(self.schema.latest))
        warnings = await asyncio.to_thread(self.watch.warnings)
        # One that ends with the CA is not rotated: a new one would end no later, and the
        # practice's servers would be restarted at every window for nothing until the CA ends.
        # One revoked is: the rotation is what takes it out of service.
        servers = [e for e in warnings if e.kind == "server" and (e.revoked or not e.ends_with_ca)]
        # A node that needs the admin is left out: its agent refuses, the planner refuses a
        # plan with it, and the others' certificates must not expire over it.
        held = set(self.needs_admin())
        lost = set(await asyncio.to_thread(self.cut_off)) if servers else set()
        left_out = sorted({e.subject for e in servers if e.subject in held - lost})
        cut = sorted({e.subject for e in servers if e.subject in lost})
        servers = [e for e in servers if e.subject not in held | lost]
        due = [e.subject for e in servers]
        # No record of the cluster CA issuing it: the practice's own (--cert-dir) certificate.
        foreign = [e.subject for e in servers if not e.serial]
        active = await asyncio.to_thread(self.schema.active)
        latest = await asyncio.to_thread(self.schema.latest)
        if _last_state(latest) != before:
            decision = Decision(Verdict.BUSY, tuple(due), "a rollout moved on meanwhile")
            self._record(decision, local)
            return decision
        last = None
        if latest is not None:
            last = LastRollout(
                latest.rollout.id, latest.rollout.state.value, latest.meta.started_by == ACTOR
            )
        decision = decide(
            enabled=self.enabled,
            window=self.window,
            local=local,
            due=due,
            active=active.rollout.id if active is not None else None,
            latest=last,
            foreign=foreign,
            finalize_waits=active is not None
            and active.rollout.state is RolloutState.AWAITING_FINALIZE,
        )
        if decision.verdict is Verdict.START:
            decision = await self._start(decision)
        said = []
        if left_out:
            said.append(f"left out, needing the admin (`tlsroll nodes`): {', '.join(left_out)}")
        if cut:
            said.append(
                f"left out, agent cut off (certificate revoked; `tlsroll nodes remove`): "
                f"{', '.join(cut)}"
            )
        if said:
            reason = "; ".join(said)
            decision = replace(
                decision, reason=f"{decision.reason}; {reason}" if decision.reason else reason
            )
        self._record(decision, local)
        return decision

    async def _start(self, decision: Decision) -> Decision:
        nodes = decision.nodes
        offline: list[str] = []
        refused: list[str] = []  # "names: the plan's refusal", one for each refusal
        # The leader's disk first, as `rollout start` is refused for it: a rotation begun
        # there failed its steps' records mid-way, a node frozen or switched while the leader
        # could not record it (review s73 revroom: it bypassed the admin's refusal).
        if (no_room := await asyncio.to_thread(self.start_refused)) is not None:
            return Decision(Verdict.BLOCKED, decision.nodes, no_room)
        while True:
            request = RolloutRequest(Change.ROTATE_CERT, Scope.of_nodes(nodes))
            try:
                row = await self.commands.start(request, ACTOR)
                break
            except NodesOffline as exc:
                # The planner names every node in scope that is offline. They are left out,
                # as those that need the admin are, and the others started: before, one node
                # switched off held back every other, whose certificates could expire over it
                # (review s64 pki L1). Not while the leader settles: its agents are still
                # reconnecting, and the start is tried again soon (``wake_in``).
                down = set(exc.names)
                rest = tuple(n for n in nodes if n not in down)
                offline = sorted(set(offline) | (down & set(nodes) or down))
                if self._settling() or not rest or rest == nodes:
                    # Its own way on: the planner's ("leave it out: --nodes") is an admin's
                    # command's (rev57b L8); the rotator tries again at its next check.
                    how = (
                        "the leader has just started and its agents are reconnecting: tried "
                        "again shortly, then those still offline are left out"
                        if self._settling()
                        else "bring the agent up: it is rotated at a check in the window once "
                        "it is online"
                    )
                    return Decision(
                        Verdict.BLOCKED, decision.nodes, f"offline: {', '.join(offline)} ({how})"
                    )
                nodes = rest  # (each round leaves out one node at least: it ends)
            except PlanError as exc:
                # A refusal that names some of the nodes (not on https, ...) is theirs alone:
                # the others are started without them, as those offline are. One that names
                # none, or all, is the whole start's, and so is any while the leader settles
                # (an agent still reconnecting cannot say what it runs: tried again soon).
                names = set(getattr(exc, "names", ())) & set(nodes)
                rest = tuple(n for n in nodes if n not in names)
                if self._settling() or not names or not rest:
                    return Decision(Verdict.BLOCKED, decision.nodes, str(exc))
                refused.append(f"{', '.join(sorted(names))} ({exc})")
                nodes = rest  # (each round leaves out one node at least: it ends)
            except TlsrollError as exc:  # a rollout begun meanwhile, agents away
                return Decision(Verdict.BLOCKED, decision.nodes, str(exc))
        self.status.rollout_id = row.rollout.id
        log.info(
            "auto_rotate.started",
            rollout_id=row.rollout.id,
            nodes=list(nodes),
            offline=offline,
            refused=refused,
            window=self.status.window,
            timezone=self.status.timezone or "host",
            actor=ACTOR,
        )
        reason = f"rollout {row.rollout.id}"
        if offline:
            reason += (
                f"; left out, offline: {', '.join(offline)} (bring the agent up: it is rotated"
                " at a check in the window once it is online)"
            )
        if refused:
            reason += f"; left out, refused by the plan: {'; '.join(refused)}"
        return Decision(Verdict.STARTED, nodes, reason)

    def wake_in(self) -> float | None:
        """When the expiry watch should check next for this rotator (its ``wake_hints``): the
        window's next opening, plus ``AFTER_OPENING``, while the last check found server
        certificates due outside the window (once: not again after a check inside it that
        failed); ``RETRY_BLOCKED`` after a blocked check in the window in the leader's first
        ``SETTLE_SECONDS``; None otherwise (the watch's own interval). Only
        the hourly checks looked at the window before, so a window shorter than
        ``expiry_check_interval`` could be missed every week, and the certificates expired."""
        if not self.enabled or self.window is None:
            return None
        if (
            self.status.verdict == Verdict.BLOCKED.value
            and self._settling()
            and in_window(self.window, self.now())
        ):
            # The agents reconnect to a leader just started. By when the check began, not
            # now: the check that the settling ends after is followed by one more, which
            # leaves out the nodes still offline (a check that ended after the settling
            # ended waited for the watch's interval).
            return RETRY_BLOCKED
        if self.status.verdict != Verdict.OUTSIDE_WINDOW.value:
            return None
        local = self.now()
        if in_window(self.window, local):  # it opened since that check
            # Once: a check that began inside the window and left that verdict raised before
            # it decided (the watch logged it). It is tried again at the watch's interval, as
            # any failed check, not every second for the rest of the window.
            if self._began is not None and in_window(self.window, self._began):
                return None
            return AFTER_OPENING
        opens = next_opening(self.window, local)
        if opens is None:
            return None
        seconds = seconds_until(opens, local)
        # Not positive (a clock with a fixed offset the host's rules do not match): the
        # watch's interval, never a check every second.
        return seconds + AFTER_OPENING if seconds > 0 else None

    def _record(self, decision: Decision, local: dt.datetime) -> None:
        s = self.status
        s.checked_at = dt.datetime.now(dt.UTC)
        s.verdict = decision.verdict.value
        s.reason = decision.reason
        s.due = decision.nodes
        s.in_window = self.window is not None and in_window(self.window, local)
        opens = None
        if self.window is not None and not s.in_window:
            opens = next_opening(self.window, local)
        s.next_window = opens.isoformat(timespec="minutes") if opens else ""
        key = (s.verdict, s.reason)
        if key == s.logged or decision.verdict in (Verdict.OFF, Verdict.STARTED):
            return
        s.logged = key
        fields = {"verdict": s.verdict, "reason": s.reason, "due": list(s.due)}
        if decision.verdict is Verdict.BLOCKED:
            log.warning(
                "auto_rotate.blocked",
                **fields,
                next="tlsroll plan --change rotate-cert",
                hint="the reason says what blocks it: run tlsroll plan --change rotate-cert to "
                "see it, fix it, or rotate by hand",
            )
        elif decision.verdict is Verdict.HELD:
            log.warning(
                "auto_rotate.held",
                **fields,
                hint="the last automatic rotation did not complete: the reason names the "
                "rollout to look at and the retry that goes on",
            )
        elif decision.verdict is Verdict.WAITS_FINALIZE:  # the admin's move, as HELD
            log.warning(
                "auto_rotate.waits_finalize",
                **fields,
                hint="a rollout awaits finalize: tlsroll rollout finalize ID (or rollback), then"
                " auto_rotate goes on in its window",
            )
        elif decision.nodes:
            log.info("auto_rotate.waiting", **fields, next_window=s.next_window)


def _last_state(row: RolloutRow | None) -> tuple[str, str] | None:
    """A rollout's id and state (None: no rollout): what ``AutoRotator._check`` compares."""
    return (row.rollout.id, row.rollout.state.value) if row is not None else None
