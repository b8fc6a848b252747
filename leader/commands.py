"""The administrator's rollout commands, run on the leader's event loop.

    commands = Commands(store, schema, clock, online, leader_node, wake=engine.wake.set)
    row = await commands.start(RolloutRequest(Change.ENABLE_TLS, Scope.cluster(), ...), actor)
    row = await commands.control("", RolloutAction.PAUSE, actor)

Every command is a coroutine on the loop that also runs the engine: database work goes to a
worker thread (``asyncio.to_thread``), and the engine is woken on the loop, never from another
thread. What to plan is decided by the pure planner (``plan_rollout``, ``decide_auth``,
``undo_target``); a write that crosses an engine verdict (``StaleRecords``) is decided again on
what is stored now (tenacity, a few attempts; imported by the command that needs it: a leader
that is never paused or aborted does not hold its 0.4 MiB, issue 15).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from leader import byo, planner
from leader.agent_client import MAX_OPEN_CHANNELS
from leader.observe import OBSERVE_AT_ONCE, FirstSteps
from leader.rollout_core import (
    CHANGES,
    Change,
    Client,
    FreezeMode,
    NodeObservation,
    NodeRecord,
    NodeState,
    Password,
    Rollout,
    RolloutAction,
    RolloutEvent,
    RolloutState,
    Scope,
    ScopeKind,
    Strategy,
    cut_off_halts,
    left_as_is,
    left_out,
    left_out_reason,
    may_take_back,
)
from leader.schema_store import (
    AlreadyRetried,
    PasswordStagedMeanwhile,
    RolloutMeta,
    RolloutRow,
    SchemaStore,
    StaleRecords,
)
from leader.schema_view import report_problems, still_on_http_now, waiting_for
from leader.store import Store
from tlsroll import features, logs, password
from tlsroll.echo import shown
from tlsroll.errors import TerminalError
from tlsroll.pki import Names

log = logs.get_logger(__name__)


class Observe(Protocol):
    """Asks the named nodes' agents what they run (``leader.observe.observe``), telling those
    in ``warm`` to load their certificate code ahead, and opening the channels of the first
    nodes a start steps (``first``; every node's way in is proved by a TCP connection);
    ``edits``: asking too whether their server configs were edited since tlsroll wrote them
    (a plan of the way back to http only); ``way_back``: the question is for the way back
    (a plan or a start), which renders no template, so the agents do not check it;
    ``change``: the change planned (the agents say why their plans of it would be refused)."""

    async def __call__(
        self,
        names: Sequence[str],
        *,
        warm: Collection[str],
        first: FirstSteps | None,
        edits: bool = False,
        way_back: bool = False,
        change: Change | None = None,
    ) -> dict[str, NodeObservation]: ...


class FirstChannels(Protocol):
    """The agent pool's part in a start's first channels (``leader.agent_client.AgentPool``):
    its cap, and their reservation, handed to the engine or given back once the start is
    made or refused."""

    max_open: int

    def release_first(self, *, started: bool, rollout: str = "") -> None: ...


STALE_ATTEMPTS = 5


ALREADY: Mapping[RolloutAction, frozenset[RolloutState]] = {
    RolloutAction.PAUSE: frozenset({RolloutState.PAUSED}),
    # (resume given twice, or by two admins at once, exited 1: review rev58a L4)
    RolloutAction.RESUME: frozenset({RolloutState.RUNNING}),
    RolloutAction.ABORT: frozenset({RolloutState.ABORTING, RolloutState.ABORTED}),
}
"""The states in which an administrator's action is already done (``control``: a no-op)."""


@dataclass(frozen=True)
class RolloutRequest:
    change: Change
    scope: Scope
    max_parallel: int = 1
    failure_budget: int = 0
    freeze: FreezeMode = FreezeMode.NODE
    strategy: Strategy = Strategy.DIRECT
    # The auth password's verifier (JSON) made by the CLI, for a change that brings its own
    # password (enable-tls); never the password itself.
    auth_verifier_json: str | None = None
    # disable-tls: the enable-tls rollout to take back (None: every node on https now).
    undo_rollout_id: str | None = None
    # change-password: the staged version the admin confirmed (0: not checked); another
    # staged since the plan refuses the start (``PasswordStagedMeanwhile``).
    applies_version: int = 0
    # The nodes the admin was shown as those the rollout steps, in its order (the prompt of
    # `rollout start` or `rollout rollback`; empty: nothing shown, not checked): the start is
    # refused (``PlanChanged``) if its own plan steps others (review s69 confirm L1).
    confirmed_nodes: tuple[str, ...] = ()
    # ``rollout retry``: the rollout retried, the password version it applied, what it undid.
    retry_of: str = ""
    keep_auth_version: int = 0
    undoes: str = ""
    # finalize: the transitional rollout whose phase 2 it is; --when-quiet in seconds.
    finalizes: str = ""
    when_quiet: int = 0
    # retry of a transitional phase 1: the rollout whose dual nodes the retry carries over.
    dual_from: str = ""
    # enable-tls, rotate-cert: the practice's own certificates (``--cert-dir``; ``leader.byo``).
    own_certs: byo.Material | None = field(default=None, repr=False)
    # A retry, or the way back of a named rollout: the nodes of that rollout left out as removed
    # since (set here, ``Commands.retry`` and ``_resolve``; never by the admin's request).
    removed_since: tuple[str, ...] = ()


@dataclass(frozen=True)
class Planned:
    """What a rollout would start with: its records (nodes already in the desired state are
    ``skipped``, with the reason) and the auth password the nodes run now (its version 0:
    none), as sure as the leader can be of it."""

    rollout: Rollout
    records: tuple[NodeRecord, ...]
    password_in_use: planner.PasswordInUse = field(default_factory=planner.PasswordInUse)
    # ``--cert-dir``: the node certificates that passed every check.
    certificates: tuple[byo.Accepted, ...] = ()
    # The latest auth password version staged, as the plan read it (0: none): the one a
    # change-password start applies (``_start``).
    auth_latest: int = 0
    # The nodes it leaves out as removed since (``RolloutRequest.removed_since``).
    removed_since: tuple[str, ...] = ()
    # A rotate-cert without ``--cert-dir``: the nodes it steps that serve a practice's own
    # certificate now (one a ``--cert-dir`` rollout installed): it gives them the cluster
    # CA's, and a workstation that pinned the practice CA there must be set up again.
    leaves_practice_ca: tuple[str, ...] = ()
    # disable-tls: the nodes it takes back whose server config was edited since tlsroll wrote
    # it, with that config's path on the node (``NodeObservation.edited_config``): the way back
    # undoes the edits, keeping the file beside it first.
    edited_configs: tuple[tuple[str, str], ...] = ()
    # Per node that answered: its http and https address and its bootstrap port as its agent's
    # check gave them (``NodeObservation``): the plan's rows show them.
    addresses: Mapping[str, tuple[str, str, int]] = field(default_factory=dict)


class PlanChanged(TerminalError):
    """A start whose plan steps other nodes (or in another order) than those the admin was
    shown and confirmed (``RolloutRequest.confirmed_nodes``): another admin's rollout, an
    enrolment or a removal came between (FAILED_PRECONDITION; review s69 confirm L1)."""

    def __init__(
        self, confirmed: Sequence[str], now: Sequence[str], silent: Collection[str] = ()
    ) -> None:
        added = [n for n in now if n not in confirmed]
        gone = [n for n in confirmed if n not in now]
        what = []
        if added:
            what.append(f"it now takes {planner.some_names(added)} too")
        if gone:
            # A way back leaves a node as is whose agent is offline or cannot say what it
            # runs (``silent``): said, not blamed on a rollout or an enrolment (review3 s69).
            quiet = " (left as is now: its agent cannot say what it runs)"
            if any(n not in silent for n in gone):
                quiet = ""
            what.append(f"no longer {planner.some_names(gone)}{quiet}")
        if not what:
            what.append(f"in another order: {planner.some_names(now)}")
        super().__init__(
            "the plan changed since it was shown (another rollout, a node enrolled, removed or "
            "switched, or an agent answering again or no longer, meanwhile): "
            f"{'; '.join(what)}; nothing started: look at the new plan and start again"
        )


class StillOnHttp(TerminalError):
    """Finalize refused: workstations were seen on http lately (FAILED_PRECONDITION)."""

    def __init__(self, rollout_id: str, left: Sequence[Client], unknown: Mapping[str, str]):
        parts = [
            f"{c.node}: {c.address}"
            + (f" ({c.workstation})" if c.workstation else "")
            + f" last seen on http {c.last_seen:%Y-%m-%d %H:%M:%S} UTC"
            for c in left
        ]
        parts += [f"{node}: cannot tell who is on http ({why})" for node, why in unknown.items()]
        # Named one by one up to planner.MAX_NAMED, the rest counted: a practice's whole list
        # would outgrow gRPC's limit for a status message ("Stream removed").
        shown = "; ".join(parts[: planner.MAX_NAMED])
        if len(parts) > planner.MAX_NAMED:
            shown += f"; and {len(parts) - planner.MAX_NAMED} more (tlsroll schema show)"
        quiet = (
            f"let the leader finalize each node once it is quiet (tlsroll rollout finalize "
            f"{rollout_id} --when-quiet 30m), or cut them off (--force)"
        )
        if not left and unknown and all(why == waiting_for(n) for n, why in unknown.items()):
            # Only a restarted leader's wait, of seconds: nothing for the workstations to do,
            # nothing to cut off (review s44rev6 L4: "cannot tell" twice, brackets nested).
            names = sorted(unknown)
            who = ", ".join(names[: planner.MAX_NAMED])
            if len(names) > planner.MAX_NAMED:
                who += f" and {len(names) - planner.MAX_NAMED} more"
            agents, run, node = (
                ("its agent is", "it runs", "the node")
                if len(names) == 1
                else ("their agents are", "they run", "each node")
            )
            super().__init__(
                f"finalize waits for the first client report since the leader started from "
                f"{who} (seconds once {agents} connected; else check {run}: tlsroll nodes, and "
                f"on {node} systemctl status tlsroll-agent); "
                f"finalize again then, or let the leader finalize each node once it is quiet "
                f"(tlsroll rollout finalize {rollout_id} --when-quiet 30m)"
            )
        else:
            super().__init__(
                f"finalize would close http on workstations that still use it: {shown}. "
                "Have them do the client steps (tlsroll notify --remaining), then finalize "
                f"again; or {quiet}"
            )
        self.clients = tuple(left)
        self.unknown = dict(unknown)


class NotRetriable(TerminalError):
    """Only a halted or aborted rollout can be retried (FAILED_PRECONDITION)."""


class NoSuchRollout(TerminalError):
    """The named rollout is not in the schema (NOT_FOUND)."""


class NoRolloutYet(TerminalError):
    """A command needs a rollout and none was ever started (FAILED_PRECONDITION)."""


def new_rollout_id(now: dt.datetime) -> str:
    return f"r{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _own_count(seen: NodeObservation, installed: Collection[str]) -> NodeObservation:
    """A node on https with the certificate a ``--cert-dir`` rollout gave it (``installed``:
    their fingerprints, for enable-tls) is as done for enable-tls as one with the cluster CA's:
    a later enable-tls must not put it back on the cluster CA's (that takes rotate-cert, said
    plainly)."""
    if seen.cert_fingerprint and seen.cert_fingerprint in installed:
        return replace(seen, cert_from_ca=True)
    return seen


def _says_nothing_of_edits(
    name: str, agents: Mapping[str, tuple[str, tuple[str, ...]]], not_heard: Collection[str]
) -> bool:
    """Whether the agent of ``name`` is of a release that neither says whether its server
    config was edited since tlsroll wrote it nor keeps such a file on the way back (it lacks
    ``features.EDITED_CONFIG``, as heard since this leader started: of one not heard since,
    the store's word is a former process's, and nothing is said)."""
    if name in not_heard:
        return False
    return features.EDITED_CONFIG not in agents.get(name, ("", ()))[1]


def _check_verifier(verifier_json: str) -> None:
    """A verifier the leader may stage (INVALID_ARGUMENT if not): valid, and one whose
    parameters every workstation computes (review s66 pw L2: p=2 passed, and once applied
    every workstation refused every node's hello)."""
    try:
        verifier = password.verifier_from_json(verifier_json)
    except ValueError as exc:
        raise planner.PlanError(f"bad password verifier: {exc}") from None
    if why := password.workstation_problem(verifier):
        raise planner.PlanError(f"bad password verifier: {why}: no workstation would accept it")


class Commands:
    def __init__(
        self,
        store: Store,
        schema: SchemaStore,
        clock: Callable[[], dt.datetime],
        online: Callable[[dt.datetime | None], bool],
        leader_node: str | None,
        wake: Callable[[], None],
        observe: Observe | None = None,
        *,
        vault: byo.Vault | None = None,
        cert_horizon: dt.timedelta = dt.timedelta(days=30),
        offline_grace: float = 0.0,
        prepare_ahead: int = 1,
        channels: FirstChannels | None = None,
        heartbeat_interval: float = 5,
    ) -> None:
        """``observe``: asks the named nodes' agents what they run (``leader.observe``; those
        named in ``warm`` are told to load their certificate code ahead); rollouts are planned
        from it. None (tests of the bookkeeping only): plans from records alone.
        ``vault``: where a ``--cert-dir`` rollout's keys wait for its stage steps (the
        engine's); ``cert_horizon``: how long such certificates must still be valid
        (``expiry_warning_days``); ``offline_grace``: how long a node that went offline only
        that long ago is waited for before a plan counts it offline (``_observe_all``);
        ``prepare_ahead``: the engine's (a start's first nodes, ``first_steps``); ``channels``:
        the agent pool that opens their channels (its cap; their reservation ends with the
        start, ``start``); ``heartbeat_interval``: the leader's (how old a client report may
        be and still speak for its node: ``planner.report_stale_after``)."""
        self.stale_after = planner.report_stale_after(heartbeat_interval)
        self.offline_grace = offline_grace
        self.channels = channels
        self.prepare_ahead = prepare_ahead
        self.vault = vault if vault is not None else byo.Vault()
        self.cert_horizon = cert_horizon
        self.store = store
        self.observe = observe
        self.schema = schema
        self.clock = clock
        self.online = online
        self.leader_node = leader_node
        self.wake = wake
        # The nodes whose agents say their journal holds no settings for the https their server
        # serves (``LeaderState.no_settings``; the runtime sets it): a plan that skips one as
        # done names the rotate-cert (``planner.NO_SETTINGS_SKIP``).
        self.no_settings: Callable[[], frozenset[str]] = frozenset

    async def _resolve(
        self, request: RolloutRequest
    ) -> tuple[RolloutRequest, str, planner.AlreadyUndone | None]:
        """disable-tls: which enable-tls rollout it takes back (``undoes``) and its scope.

        Named (``undo_rollout_id``): the nodes that rollout or its retries switched or began
        to (``planner.reached_nodes``), once per rollout
        (``planner.AlreadyUndone`` names the one that did). Not named: every enrolled node that
        runs https now (the plan skips those on http), whichever rollout switched it; the newest
        enable-tls rollout that switched a node is the one recorded as taken back, and its
        earlier way back is the reason given if nothing is left to do. A retry keeps the scope
        it is given."""
        if request.change is not Change.DISABLE_TLS or request.retry_of:
            return request, request.undoes, None
        rows = await asyncio.to_thread(self.schema.undo_rows, request.undo_rollout_id)
        candidates = [(r.rollout, r.records) for r in rows]
        undoes = {r.rollout.id: r.meta.undoes for r in rows}
        if request.undo_rollout_id:
            finalizes = {r.rollout.id: r.meta.finalizes for r in rows if r.meta.finalizes}
            try:
                target, _switched = planner.undo_target(
                    candidates, request.undo_rollout_id, undoes, finalizes
                )
            except planner.NothingToUndo:
                # A rollout still running, its node mid-switch, "switched no node; nothing
                # to undo": what refuses the way back is that it runs (brief s67 engine2).
                await asyncio.to_thread(self.schema.refuse_if_busy)
                raise
            # A node removed since (`tlsroll nodes remove`: its server's certificate revoked,
            # the leader knows it no more) is left out, as a retry leaves it out; it was
            # refused "not enrolled", so no way back of that rollout could start (s50retry).
            gone = await self._removed()
            # Its nodes: those it or its retries switched or began to (not those it skipped).
            records = next(rec for ro, rec in candidates if ro.id == target.id)
            retries = await asyncio.to_thread(self._retries, target.id)
            own = planner.reached_nodes(target, records, [(r.rollout, r.records) for r in retries])
            kept = tuple(n for n in own if n not in gone)
            if not kept:
                raise planner.PlanError(
                    f"nothing to take back: the nodes of rollout {target.id} were removed since"
                    f" ({planner.some_names(sorted(own))}); see: tlsroll schema show"
                )
            removed = tuple(n for n in own if n in gone)
            if removed:
                log.info("rollout.undo_left_out", rollout_id=target.id, removed=list(removed))
            scope = Scope.of_nodes(kept)
            return replace(request, scope=scope, removed_since=removed), target.id, None
        try:
            target, _switched = planner.undo_target(candidates, None, undoes)
        except planner.NothingToUndo:
            await asyncio.to_thread(self.schema.refuse_if_busy)  # (as named, above)
            raise
        except planner.AlreadyUndone as exc:
            undone = planner.AlreadyUndone(exc.target, exc.rollout, named=False)
            return replace(request, scope=Scope.cluster()), "", undone
        return replace(request, scope=Scope.cluster()), target.id, None

    def _retries(self, rollout_id: str) -> list[RolloutRow]:
        """The retries of ``rollout_id`` (``rollout retry``), each of the one before, oldest
        first (blocking)."""
        found: list[RolloutRow] = []
        seen = {rollout_id}
        while (retry := self.schema.retried_by(rollout_id)) is not None and retry[0] not in seen:
            rollout_id = retry[0]
            seen.add(rollout_id)
            found += [r for r in self.schema.undo_rows(rollout_id) if r.rollout.id == rollout_id]
        return found

    async def plan(self, request: RolloutRequest) -> Planned:
        """What a rollout would start with, from what each node runs now; PlanError if the
        scope cannot be planned (or nothing is left to do)."""
        request, _undoes, undone = await self._resolve(request)
        return await self._plan(request, undone)

    async def _online_now(self) -> tuple[dict[str, bool], set[str]]:
        """Each enrolled node: online? And the offline ones that went offline less than
        ``offline_grace`` ago (they would still be online, heard that much later)."""
        nodes = await asyncio.to_thread(self.store.list_nodes)
        # A node whose certificate on record is revoked is refused by the leader: offline.
        online = {n.name: not n.cert_revoked and self.online(n.last_heartbeat) for n in nodes}
        grace = dt.timedelta(seconds=self.offline_grace)
        just = {
            n.name
            for n in nodes
            if not online[n.name]
            and not n.cert_revoked
            and n.last_heartbeat is not None
            and self.online(n.last_heartbeat + grace)
        }
        return online, just

    async def _observe_all(
        self,
        request: RolloutRequest | None = None,
        steps: Callable[[NodeObservation], bool] | None = None,
        rollout_id: str = "",
        *,
        edits: bool = False,
        way_back: bool = False,
        change: Change | None = None,
    ) -> tuple[dict[str, bool], dict[str, NodeObservation] | None]:
        """Which enrolled nodes are online, and what the online ones run. ``request``: a
        rollout's start (not a plan shown to the admin), whose first nodes' agents load their
        certificate code while the others are asked (``first_to_make_keys``), and whose first
        nodes it steps (``steps``: not skipped) have their channels opened (``first_steps``),
        reserved for ``rollout_id``. ``edits``: the plan of a way back to http, which names
        the nodes whose server config was edited since tlsroll wrote it (``Planned``'s
        ``edited_configs``). ``way_back``: a plan or start of the way back (``Observe``)."""
        online, just = await self._online_now()
        if just:
            # A node whose heartbeat stream just ended (the leader restarted, or ended a
            # stream that fell behind) shows offline until its agent opens a new one: within
            # a second or so of the leader being back (``nodeagent.leader_link``), at its next
            # heartbeat for an agent of an earlier release, within an interval. A command waits
            # that long for it rather than refuse a live node (seen once in CI: "offline:
            # node3" right after every node was seen online). A node offline for longer is
            # refused at once.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.offline_grace
            while just and loop.time() < deadline:
                await asyncio.sleep(0.2)
                online, _ = await self._online_now()
                just = {name for name in just if not online.get(name, True)}
        if self.observe is None:
            return online, None
        up = [name for name, is_up in online.items() if is_up]
        warm = self.first_to_make_keys(request, up) if request is not None else frozenset()
        first = (
            self.first_steps(request, up, steps, rollout_id)
            if request is not None and steps is not None
            else None
        )
        seen = await self.observe(
            up, warm=warm, first=first, edits=edits, way_back=way_back, change=change
        )
        return online, seen

    def _in_order(self, request: RolloutRequest, up: Sequence[str]) -> Sequence[str]:
        """The online nodes of ``request``'s scope, in the order a rollout steps them."""
        scope = request.scope
        if scope.kind is ScopeKind.LOCAL:
            names: Sequence[str] = (self.leader_node,) if self.leader_node else ()
        elif scope.kind is ScopeKind.CLUSTER:
            names = up
        else:
            names = scope.names
        names = [name for name in names if name in up]
        return planner.order_nodes(names, self.leader_node or "")

    def first_steps(
        self,
        request: RolloutRequest,
        up: Sequence[str],
        steps: Callable[[NodeObservation], bool],
        rollout_id: str = "",
    ) -> FirstSteps:
        """The nodes a starting rollout steps first (its first ``max_parallel`` plus
        ``prepare_ahead`` in its order that it does not skip, from their answers: ``steps``;
        those the engine holds in flight): planning opens their
        channels (``leader.observe``: the leader's way in proved with the handshake their steps
        need anyway, off the first switch's path): no more than the pool keeps open besides
        the held ones, nor than ``OBSERVE_AT_ONCE`` (they are that many handshakes at once; a
        larger --max-parallel opened up to 201 at once, and the cap closed all but 16 of them
        before the engine held them: review 2, finding 2)."""
        count = max(request.max_parallel, 1) + self.prepare_ahead
        cap = self.channels.max_open if self.channels is not None else MAX_OPEN_CHANNELS
        order = self._in_order(request, up)
        return FirstSteps(order, min(count, cap, OBSERVE_AT_ONCE), steps, rollout_id)

    def blocked_at_once(
        self, rollout: Rollout, nodes: Sequence[NodeRecord], retry_of: str = ""
    ) -> planner.BlockedAtOnce | None:
        """The refusal a start of this plan meets if nodes its preflight checks block are among
        those it preflights at once (its first max_parallel stepped nodes and the engine's
        ``prepare_ahead`` after them), more than its failure budget takes: it would halt there
        at once (brief s67 engine (a); review s67 rev2 M3: the prepared-ahead ones). Not the
        way back nor a finalize, which have no --nodes to leave a node out with: the way back
        is the emergency path, whose prompt names the blocked nodes with their reasons. The
        start raises it; a plan says it (``PlanResponse.blocked_at_once``: `rollout start`
        refuses before it asks)."""
        if rollout.change not in planner.AT_ONCE_REFUSED:
            return None
        stepped = [r for r in nodes if r.state is NodeState.PENDING]
        at_once = planner.blocked_at_once(
            [(r.name, r.reason) for r in stepped],
            rollout.max_parallel,
            rollout.failure_budget,
            prepare_ahead=self.prepare_ahead,
        )
        if not at_once:
            return None
        return planner.BlockedAtOnce(
            rollout.change,
            at_once,
            retry_of=retry_of,
            others=[r.name for r in stepped if r.name not in at_once],
        )

    def first_to_make_keys(self, request: RolloutRequest, up: Sequence[str]) -> frozenset[str]:
        """The nodes whose agents a starting rollout asks first to make a key and CSR (its
        first ``max_parallel`` in its order), if its change makes them on the nodes (not with
        ``--cert-dir``). Unlike ``first_steps``, picked before any answer (it goes with the
        question): a start after partial work may warm nodes it skips. An idle agent does not
        hold the certificate code (about 10 MiB) and loads it at its first such preflight;
        asked along with the planning's checks, the first node's agent has it loaded by then,
        and the rollout's first switch, which waits for that node's preparation, no longer
        waits for the import (40-100 ms on a small machine). A node the plan then skips
        (already done) keeps the code loaded, as it would after any rollout that prepared
        it."""
        if not CHANGES[request.change].stages_certificate or request.own_certs is not None:
            return frozenset()
        return frozenset(self._in_order(request, up)[: max(request.max_parallel, 1)])

    async def _digests(self) -> tuple[int, dict[str, int], dict[int, str]]:
        """The latest auth password version staged (0: none), verifier digest → version for
        every version staged up to it, and version → why for those whose verifier is refused
        (one staged under the tests' scrypt hook, read without it)."""
        latest = await asyncio.to_thread(self.schema.latest_auth_version)
        found: dict[str, int] = {}
        refused: dict[int, str] = {}
        for version in range(1, latest + 1):
            try:
                text = await asyncio.to_thread(self.schema.verifier, version)
                found[password.verifier_digest(text)] = version
            except (TerminalError, ValueError) as exc:
                refused[version] = " ".join(str(exc).split())
        return latest, found, refused

    async def _plan(
        self,
        request: RolloutRequest,
        undone: planner.AlreadyUndone | None = None,
        *,
        starting: bool = False,
        rollout_id: str = "",
    ) -> Planned:
        if request.scope.kind is ScopeKind.LOCAL and not self.leader_node:
            raise planner.PlanError(
                "scope local needs the leader node's name: set node_name in leader.toml"
            )
        # (Read before the agents are asked: a start picks its first nodes from their answers
        # as the planner will read them, ``steps``.)
        latest, digests, refused = await self._digests()
        staged = CHANGES[request.change].password is Password.STAGED
        if staged and not latest and not request.keep_auth_version:
            raise planner.NoPasswordStaged()  # the plan as the start (before asking agents)
        # The version it applies, refused as the agents would refuse it: planned with an older
        # one's digest, its nodes were "already done" (review s75 revpwkdf).
        applies = request.keep_auth_version if request.dual_from else 0
        if not applies and request.change is Change.CHANGE_PASSWORD:
            applies = latest
        if applies in refused:
            raise planner.StagedPasswordUnusable(applies, refused[applies])
        target_digest = ""
        if request.change is Change.CHANGE_PASSWORD and digests:
            target_digest = max(digests, key=lambda d: digests[d])
        if request.dual_from and request.keep_auth_version:  # the password phase 1 staged
            target_digest = next(
                (d for d, v in digests.items() if v == request.keep_auth_version), "?"
            )
        installed: frozenset[str] = frozenset()
        back_to_cluster = request.change is Change.ROTATE_CERT and request.own_certs is None
        if self.observe is not None and (request.change is Change.ENABLE_TLS or back_to_cluster):
            installed = frozenset(await asyncio.to_thread(self.schema.own_fingerprints))

        def steps(seen: NodeObservation) -> bool:
            """Does the plan step a node seen so (not skipped, nor left dual: the planner's own
            decision, ``planner.settled_at_start``)?"""
            settled = planner.settled_at_start(
                request.change,
                _own_count(seen, installed),  # (as ``seen`` reaches the planner below)
                target_digest,
                request.strategy,
                request.dual_from,
            )
            return settled is None  # (a node left dual is the retry's, but never stepped)

        # Only the plan shown to the admin names edited configs (the agent decides for itself,
        # as its way back begins, what it keeps: ``plans.rollback_plan``): a start does not ask.
        edits = request.change is Change.DISABLE_TLS and not starting
        online, seen = await self._observe_all(
            request if starting else None,
            steps,
            rollout_id,
            edits=edits,
            way_back=request.change is Change.DISABLE_TLS,
            change=request.change,
        )
        practice = sorted(
            name
            for name, o in (seen or {}).items()
            if back_to_cluster and o.cert_fingerprint and o.cert_fingerprint in installed
        )
        if seen and request.change is Change.ENABLE_TLS:
            seen = {name: _own_count(o, installed) for name, o in seen.items()}
        if seen:
            seen = await self._mark_revoked(seen)
            unset = self.no_settings()
            seen = {n: replace(o, no_settings=n in unset and o.reachable) for n, o in seen.items()}
        if seen is None and undone is not None:
            raise undone  # nothing observed: what was taken back is all there is to go by
        epoch = await asyncio.to_thread(self.schema.next_epoch)
        # What each agent implements, as its heartbeats say (read after the agents answered:
        # an agent just upgraded has said so by then): those since this leader started
        # (``Store.features_heard``), as the agent pool sends by; of an agent not heard since,
        # what the store kept, a former process's, which a kill may have left without its
        # first heartbeat's report: the plan says to wait for it, not "upgrade it" (review of
        # s63-f1, L-3: a start right after a restart refused a current agent "too old").
        listed = await asyncio.to_thread(self.store.list_nodes)
        heard_of = getattr(self.store, "features_heard", None)  # (a test's store: the rows)
        agents: dict[str, tuple[str, tuple[str, ...]]] = {}
        not_heard: set[str] = set()
        for n in listed:
            said = heard_of(n.name) if heard_of is not None else n.agent_features
            if said is None:
                not_heard.add(n.name)
            agents[n.name] = (n.agent_version, n.agent_features if said is None else said)
        # A finalize leaves out a node whose agent is cut off (``rollout_core.LEFT_OUT``); the
        # way back leaves it as is, saying it never comes back (``left_cut_off``).
        cut_off = frozenset(n.name for n in listed if n.cert_revoked)
        # The password in use: what the agents that answer run, and what the store recorded
        # on the enrolled nodes that did not (a removed node's record is no one's, nor is a
        # cut-off one's: its agent never answers again, and "start them" was no way on for a
        # machine lost or stolen: review b2 of s64, L4a).
        recorded = await asyncio.to_thread(self.schema.node_auth)
        in_use = planner.password_in_use(
            {name: o.verifier_digest for name, o in (seen or {}).items() if o.reachable},
            digests,
            {
                n.name: recorded[n.name]
                for n in listed
                if n.name in recorded and n.name not in cut_off
            },
        )
        out = (
            {n: left_out_reason(n) for n in cut_off} if request.change is Change.FINALIZE else None
        )
        try:
            rollout, records = planner.plan_rollout(
                rollout_id=rollout_id or new_rollout_id(self.clock()),
                change=request.change,
                scope=request.scope,
                enrolled=online,
                leader=self.leader_node or "",
                epoch=epoch,
                max_parallel=request.max_parallel,
                failure_budget=request.failure_budget,
                freeze=request.freeze,
                strategy=request.strategy,
                observed=seen,
                target_digest=target_digest,
                dual_from=request.dual_from,
                agents=agents,
                own_certificates=request.own_certs is not None,
                finalizes=request.finalizes,
                left_out=out,
                cut_off=cut_off,
                not_heard=not_heard,
                when_quiet=bool(request.when_quiet),
                epochs_seen={n.name: n.highest_epoch for n in listed},
            )
        except planner.NothingToDo:
            if undone is not None:
                raise undone from None
            raise
        except planner.NodesOffline as offline:
            if request.change is not Change.FINALIZE:
                raise
            raise await self._offline_refusal(offline.names) from None
        certificates: tuple[byo.Accepted, ...] = ()
        if request.own_certs is not None:
            certificates = await self._check_own_certs(request, records, seen or {})
        stepped = {r.name for r in records if r.state is not NodeState.SKIPPED}
        edited: tuple[tuple[str, str], ...] = ()
        if request.change is Change.DISABLE_TLS and seen:
            # A node whose agent does not say whether its config was edited (an earlier
            # release, which keeps no copy either) is named with no config: its line says that
            # an edit would be lost (``plan_texts.edited_config_line``; review s70 compat).
            edited = tuple(
                (r.name, seen[r.name].edited_config if r.name in seen else "")
                for r in records
                if r.name in stepped
                and (
                    (r.name in seen and seen[r.name].edited_config)
                    or (edits and _says_nothing_of_edits(r.name, agents, not_heard))
                )
            )
        return Planned(
            rollout,
            records,
            in_use,
            certificates,
            latest,
            request.removed_since,
            tuple(n for n in practice if n in stepped),
            edited,
            {
                name: (o.http_url, o.https_url, o.bootstrap_port)
                for name, o in (seen or {}).items()
                if o.http_url or o.https_url
            },
        )

    async def _mark_revoked(self, seen: dict[str, NodeObservation]) -> dict[str, NodeObservation]:
        """``seen`` with ``cert_revoked`` set where the certificate a node serves now is one
        the admin revoked (``Store.revocations_of``; whatever the reason: it is live, not as
        recorded): the plan says to replace it where it skips the node as done
        (``planner.REVOKED_SERVED``); before, enable-tls said "nothing to do"."""
        served = {o.cert_fingerprint for o in seen.values() if o.cert_fingerprint}
        if not served:
            return seen
        revoked = await asyncio.to_thread(self.store.revocations_of, served)
        return {
            name: replace(o, cert_revoked=True) if o.cert_fingerprint in revoked else o
            for name, o in seen.items()
        }

    async def _check_own_certs(
        self,
        request: RolloutRequest,
        records: Sequence[NodeRecord],
        seen: dict[str, NodeObservation],
    ) -> tuple[byo.Accepted, ...]:
        """``--cert-dir``: every node the rollout touches has a certificate and key that pass
        every check (``leader.byo``), before any node is touched; else ``byo.Refused`` with
        one line per problem."""
        material = request.own_certs
        assert material is not None
        if request.change not in (Change.ENABLE_TLS, Change.ROTATE_CERT):
            raise planner.PlanError("--cert-dir goes with enable-tls or rotate-cert")
        touched = [r.name for r in records if r.state is not NodeState.SKIPPED]
        expected = {}
        for name in touched:
            node = await asyncio.to_thread(self.store.get_node, name)
            names = Names.of(node.name, node.addresses, node.dns_names)
            live = seen[name].cert_fingerprint if name in seen else ""
            expected[name] = byo.Expected(names, live)
        problems = byo.validate(
            material,
            expected,
            now=self.clock(),
            horizon=self.cert_horizon,
            rotate=request.change is Change.ROTATE_CERT,
        )
        if problems:
            raise byo.Refused(problems, material.directory)
        return tuple(byo.accepted(material, touched))

    async def start(self, request: RolloutRequest, actor: str) -> RolloutRow:
        """``_start``; the channels its planning opened for its first nodes stay reserved in
        the pool until the engine holds the nodes it steps, or are given back if it is refused
        (``AgentPool.release_first``)."""
        started = False
        rollout_id = new_rollout_id(self.clock())  # (its first channels' reservation)
        try:
            row = await self._start(request, actor, rollout_id)
            started = True
            return row
        finally:
            if self.channels is not None:
                self.channels.release_first(started=started, rollout=rollout_id)

    async def _start(self, request: RolloutRequest, actor: str, rollout_id: str) -> RolloutRow:
        request, undoes, undone = await self._resolve(request)
        # Refused at once while another rollout runs, before the agents are asked: its nodes,
        # busy switching, made the refusal "cannot ask the agent of node1" (audit s39race M4).
        # ``schema.create`` checks it again in its transaction.
        await asyncio.to_thread(self.schema.refuse_if_busy, request.finalizes or undoes)
        planned = await self._plan(request, undone, starting=True, rollout_id=rollout_id)
        rollout, nodes = planned.rollout, planned.records
        # The latest password as the plan read it (not read again: a ``password set`` since
        # would be applied where the plan skipped the nodes already on the planned one); the
        # create refuses the start if another was staged since (audit s32 M1).
        latest = planned.auth_latest
        staged_one = CHANGES[request.change].password is Password.STAGED
        if staged_one and request.applies_version and latest != request.applies_version:
            # The admin confirmed (or named) another version: a `password set` came between
            # their plan and this start (review s69 revrace). The create checks ``latest``
            # again in its transaction: what it applies is the version confirmed.
            if latest > request.applies_version:
                raise PasswordStagedMeanwhile(request.applies_version, latest)
            raise planner.PlanError(
                f"no password version {request.applies_version} is staged (the newest is "
                f"{latest}); nothing started"
            )
        stepped = tuple(r.name for r in nodes if r.state is NodeState.PENDING)
        # A node of the named rollout a way back takes back, removed since, is left out and
        # named in the start's answer (``removed_since``: review rev50f L3), as before.
        confirmed = tuple(n for n in request.confirmed_nodes if n not in planned.removed_since)
        if request.confirmed_nodes and stepped != confirmed:
            # The admin confirmed a plan that stepped other nodes: the scope resolved again
            # (every node on https, the cluster's) has another rollout's nodes, or a node
            # enrolled, switched or removed since (review s69 confirm L1).
            silent = {
                r.name for r in nodes if r.state is NodeState.SKIPPED and left_as_is(r.reason)
            }
            raise PlanChanged(confirmed, stepped, silent)
        auth = planner.decide_auth(
            request.change,
            bool(request.auth_verifier_json),
            latest,
            in_use=planned.password_in_use,
            keep=request.keep_auth_version,
        )
        if auth.add_new:
            assert request.auth_verifier_json is not None
            _check_verifier(request.auth_verifier_json)
        if blocked := planner.not_on_https(nodes):  # their preflight would fail: none starts
            raise planner.NotOnHttps(request.change, blocked)
        if too_old := planner.too_old(nodes):  # they would drop what the change sends them
            raise planner.AgentsTooOld(request.change, too_old)
        if refusal := self.blocked_at_once(rollout, nodes, request.retry_of):
            raise refusal
        now = self.clock()
        rollout = rollout.with_event(RolloutEvent.START)
        meta = RolloutMeta(
            created_at=now,
            started_by=actor,
            leader_node=self.leader_node or "",
            started_at=now,
            auth_version=auth.version,
            undoes=undoes,
            finalizes=request.finalizes,
            when_quiet=request.when_quiet,
            # With the rollout, before any agent is told anything: `schema show`, the start's
            # answer and the audit name them (review rev50f L4: only a log line did).
            removed_since=planned.removed_since,
        )
        own = request.own_certs
        row = await asyncio.to_thread(
            self.schema.create,
            rollout,
            nodes,
            meta,
            now,
            request.auth_verifier_json if auth.add_new else None,
            # A way back takes a switch back once (a retry goes on with the same one).
            takes_back_once=rollout.change is Change.DISABLE_TLS and not request.retry_of,
            auth_latest=latest if staged_one and not request.keep_auth_version else None,
            # With the rollout, in its transaction: its steps find it from the start.
            own_ca=byo.ca_bundle(own) if own is not None else None,
            # ... and where a certificate's chain ends before it, that end (the expiry watch's).
            own_chain_ends=byo.chain_ends(
                own, [r.name for r in nodes if r.state is not NodeState.SKIPPED]
            )
            if own is not None
            else None,
            # A rollout is retried once; a retry of its retry may follow (audit s39race H3).
            retry_of=request.retry_of,
            # ... and the CA each node's certificate chains to: its notice gives that one's pin.
            own_pins={c.node: c.ca_pin for c in planned.certificates if c.ca_pin} or None,
        )
        if own is not None:  # the keys in memory only, until each node has staged its own
            # ... and only the keys of nodes this rollout stages: not those outside its scope
            # or left alone ("already done"), which it would keep until it ends.
            touched = {r.name for r in nodes if r.state is not NodeState.SKIPPED}
            self.vault.put(rollout.id, {n: m for n, m in own.nodes.items() if n in touched})
        log.info(
            "rollout.started",
            rollout_id=rollout.id,
            change=rollout.change.value,
            scope=rollout.scope.kind.value,
            order=list(rollout.order),
            already_done=[
                r.name for r in nodes if r.state is NodeState.SKIPPED and not left_as_is(r.reason)
            ],
            left_as_is=[r.name for r in nodes if left_as_is(r.reason)] or None,
            own_certificates=request.own_certs is not None,
            epoch=row.rollout.epoch,
            actor=actor,
            retry_of=request.retry_of or None,
            strategy=rollout.strategy.value,
            finalizes=request.finalizes or None,
            removed_since=list(planned.removed_since) or None,
        )
        self.wake()
        return row

    async def retry(self, rollout_id: str, actor: str) -> RolloutRow:
        """Start the nodes a halted or aborted rollout left unfinished again, as a new rollout
        planned from what they run now (same change, options and password)."""
        row = await asyncio.to_thread(self._target, rollout_id)
        old = row.rollout
        if old.state not in (RolloutState.HALTED, RolloutState.ABORTED):
            raise NotRetriable(
                f"rollout {old.id} is {old.state.value}: only a halted or aborted rollout is "
                "retried (see: tlsroll schema show)"
            )
        # Once: a second retry planned the nodes the first had finished again and switched
        # them a second time (audit s39race H3). Checked before the agents are asked, and in
        # the creating transaction (``schema.create``).
        await asyncio.to_thread(self._refuse_if_retried, old.id)
        finished = (NodeState.DONE, NodeState.DUAL)
        left = tuple(r.name for r in row.records if r.state not in finished)
        # A transitional phase 1 carries the nodes it left dual (those that still are, as
        # their agents report) into the retry, whose finalize then covers them.
        dual_from = ""
        transitional = old.strategy is Strategy.TRANSITIONAL and old.change is Change.ENABLE_TLS
        if transitional and self.observe is not None:
            dual_from = old.id
            left = tuple(r.name for r in row.records if r.state is NodeState.DUAL or r.name in left)
        if not left:
            # Every node done: an abort that came after the last switch had ended (a scope
            # freeze's unfreeze of a node whose server was gone kept it running). Was a
            # rollout of no node: an internal error (bench.faults seed 7126, session 71).
            raise NotRetriable(
                f"nothing to do: rollout {old.id} left no node unfinished ({old.state.value}"
                " once every node was done); see: tlsroll schema show"
            )
        left, removed = await self._still_enrolled(old, left)
        cut = await self._cut_off(left)
        if cut and cut_off_halts(old.change):
            # Its start would refuse the node as offline (the leader refuses its agent), which
            # no retry changes; the halt said what does (s50retry).
            name = sorted(cut)[0] if len(cut) == 1 else "NAME"
            raise NotRetriable(
                f"rollout {old.id} left {planner.some_names(sorted(cut))}, whose agent"
                f"{' is' if len(cut) == 1 else 's are'} cut off (certificate revoked): run"
                f" `tlsroll nodes remove {name}` first{'' if len(cut) == 1 else ' for each'},"
                f" then tlsroll rollout retry {old.id}"
            )
        if old.change is not Change.FINALIZE:
            cut = frozenset()
        if await asyncio.to_thread(self.schema.own_ca, old.id) is not None:
            raise NotRetriable(
                f"rollout {old.id} used certificates from --cert-dir, whose keys the leader "
                f"does not keep; start again: tlsroll rollout start --change {old.change.value} "
                f"--nodes {','.join(left)} --cert-dir DIR"
            )
        if old.change is Change.FINALIZE and not row.meta.when_quiet:
            # As finalize would: a retry cannot tell whether the original was --force.
            try:
                await self._refuse_while_on_http(
                    row.meta.finalizes, [n for n in left if n not in cut]
                )
            except StillOnHttp as refused:
                refused.args = (
                    f"{refused}. A retry does not know whether rollout {old.id} was forced;"
                    f" to close http anyway: tlsroll rollout finalize {row.meta.finalizes}"
                    " --force",
                )
                raise
        request = RolloutRequest(
            change=old.change,
            scope=Scope.of_nodes(left),
            max_parallel=old.max_parallel,
            failure_budget=old.failure_budget,
            freeze=old.freeze,
            strategy=old.strategy,
            retry_of=old.id,
            keep_auth_version=row.meta.auth_version,
            undoes=row.meta.undoes,
            finalizes=row.meta.finalizes,
            when_quiet=row.meta.when_quiet,
            dual_from=dual_from,
            removed_since=removed,
        )
        return await self.start(request, actor)

    async def _still_enrolled(
        self, old: Rollout, left: Sequence[str]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Of the nodes ``left`` that a retry of ``old`` would take, those still enrolled, and
        those removed since (`tlsroll nodes remove`, as the halt of a node cut off advises):
        dropped from the retry, not refused as "not enrolled" (s50retry: the advice followed
        left no retry), and stored with it (``RolloutMeta.removed_since``), which its start's
        answer names. None left: ``NotRetriable``, naming them."""
        gone = await self._removed()
        removed = tuple(n for n in left if n in gone)
        if not removed:
            return tuple(left), ()
        kept = tuple(n for n in left if n not in gone)
        if not kept:
            raise NotRetriable(
                f"nothing left to retry: the nodes rollout {old.id} left were removed since"
                f" ({planner.some_names(removed)}); see: tlsroll schema show"
            )
        log.info("rollout.retry_left_out", rollout_id=old.id, removed=list(removed))
        return kept, removed

    async def _removed(self) -> frozenset[str]:
        """The nodes removed (`tlsroll nodes remove`) and not enrolled again since: a name
        never enrolled is none of them (the plan refuses it, "not enrolled")."""
        nodes = await asyncio.to_thread(self.store.list_nodes, include_removed=True)
        return frozenset(n.name for n in nodes if n.removed_at is not None)

    def _refuse_if_retried(self, rollout_id: str) -> None:
        by = self.schema.retried_by(rollout_id)
        if by is not None:
            raise AlreadyRetried(rollout_id, *by)

    async def finalize(
        self, rollout_id: str, actor: str, *, force: bool = False, when_quiet: int = 0
    ) -> RolloutRow:
        """Phase 2 of the transitional rollout awaiting finalize (named, else the one
        awaiting): a linked finalize rollout over the nodes phase 1 left dual. Refused
        (``StillOnHttp``) while workstations were seen on http there lately, unless ``force``;
        with ``when_quiet`` the engine starts each node once it has been quiet that long.

        A node whose agent is cut off (its certificate on record revoked: a machine lost or
        stolen) is left out (``rollout_core.LEFT_OUT``): no rollout can step it until it is
        removed, which its rollout's hold refuses. Any other node offline refuses the finalize,
        however forced (``NodesOffline`` from the plan, with the way to cut a lost machine off:
        ``_offline_refusal``; a plain finalize first finds its client report stale): a node is
        never left half-way by a guess."""
        row, names, _cut = await self._finalize_checked(rollout_id, force, when_quiet)
        old = row.rollout
        request = RolloutRequest(
            change=Change.FINALIZE,
            scope=Scope.of_nodes(names),
            max_parallel=old.max_parallel,
            failure_budget=old.failure_budget,
            # Waiting for quiet nodes must hold no freeze: each node is frozen in its switch.
            freeze=FreezeMode.NODE if when_quiet else old.freeze,
            finalizes=old.id,
            when_quiet=when_quiet,
        )
        started = await self.start(request, actor)
        log.info(
            "rollout.finalize_started",
            rollout_id=started.rollout.id,
            finalizes=old.id,
            forced=force,
            when_quiet=when_quiet or None,
            left_out=[r.name for r in started.records if left_out(r.reason)] or None,
            actor=actor,
        )
        return started

    async def finalize_check(
        self, rollout_id: str, *, force: bool = False, when_quiet: int = 0
    ) -> tuple[RolloutRow, tuple[str, ...], frozenset[str]]:
        """What ``finalize`` would take (``finalize_scope``), refused as ``finalize`` refuses
        before it asks an agent: workstations on http (``StillOnHttp``, a plain finalize) and
        another rollout under way (``RolloutBusy``). Reads only (the CLI's confirmation:
        ``check_only``); before, those refusals came only after the admin said yes (review
        rev49fin)."""
        checked = await self._finalize_checked(rollout_id, force, when_quiet)
        await asyncio.to_thread(self.schema.refuse_if_busy, checked[0].rollout.id)
        return checked

    async def _finalize_checked(
        self, rollout_id: str, force: bool, when_quiet: int
    ) -> tuple[RolloutRow, tuple[str, ...], frozenset[str]]:
        """``finalize_scope``, and ``StillOnHttp`` for a plain finalize (not ``force``, not
        ``when_quiet``) while workstations were seen on http on the nodes it closes."""
        row, names, cut = await self.finalize_scope(rollout_id)
        keep = [n for n in names if n not in cut]
        if keep and not force and not when_quiet:
            await self._refuse_while_on_http(row.rollout.id, keep)
        return row, names, cut

    async def finalize_scope(
        self, rollout_id: str
    ) -> tuple[RolloutRow, tuple[str, ...], frozenset[str]]:
        """The transitional rollout awaiting finalize (named, else the one awaiting), the
        nodes its finalize takes (those phase 1 left dual, in its order) and, of them, those
        the finalize leaves out (``_cut_off``). ``NotAwaitingFinalize`` as ``finalize``
        refuses; nothing is asked of an agent (the CLI's confirmation: ``check_only``)."""
        row = await asyncio.to_thread(self._awaiting, rollout_id)
        # Its way back (or a finalize) completed, not yet recorded on it: said so, not judged
        # by nodes the way back put on http only ("not on https": review s69 confirm L2).
        await asyncio.to_thread(self.schema.refuse_if_settled, row.rollout.id)
        names = planner.finalize_scope(row.rollout, row.records)
        if not names:
            raise planner.NotAwaitingFinalize(f"rollout {row.rollout.id} left no node dual")
        return row, names, await self._cut_off(names)

    async def _cut_off(self, names: Sequence[str]) -> frozenset[str]:
        """Of ``names``, the nodes whose agent is cut off: its certificate on record revoked
        (``Node.cert_revoked``; the one before it goes with it: ``Store.revoke``). The leader
        refuses that agent, and its key cannot enrol again, until the node is removed."""
        return frozenset(names) & await asyncio.to_thread(self.store.cut_off_nodes)

    async def _offline_refusal(self, names: Sequence[str]) -> planner.NodesOffline:
        """A finalize's refusal of the offline nodes ``names``, naming for each (up to
        ``planner.MAX_NAMED``) the `tlsroll ca revoke` that would cut it off if it is lost."""
        serials = {
            n: await asyncio.to_thread(self.store.agent_serials, n)
            for n in names[: planner.MAX_NAMED]
        }
        return planner.NodesOffline(names, Change.FINALIZE, serials)

    async def _refuse_while_on_http(self, rollout_id: str, names: Sequence[str]) -> None:
        """``StillOnHttp`` if workstations were seen on http on ``names`` lately, or if who is
        on http cannot be told there: no report, a report naming a problem, none since this
        leader started, or only a stale one (``schema_view.report_problems``; stale:
        ``planner.report_stale_after``, older than ``STALE_REPORT_HEARTBEATS`` heartbeat
        intervals + ``REPORT_LAG``). Who is on http: ``still_on_http_now``, each node by its
        own report while that speaks for now."""
        clients, infos = await asyncio.to_thread(self.schema.clients_report, names)
        now = self.clock()
        problems = report_problems(self.store, infos, now, self.stale_after)
        unknown = {}
        for n in names:
            info = infos.get(n)
            if info is None:
                unknown[n] = "its agent has not reported its clients"
            elif info.problem:
                unknown[n] = info.problem
            elif n in problems:
                unknown[n] = problems[n]
        fresh = frozenset(infos).difference(problems)
        left = still_on_http_now(clients, infos, now, fresh)
        if left or unknown:
            raise StillOnHttp(rollout_id, left, unknown)

    def _awaiting(self, rollout_id: str) -> RolloutRow:
        if rollout_id:
            return self._target(rollout_id)
        waiting = self.schema.awaiting()
        if waiting:
            return waiting[0]
        latest = self.schema.latest()
        if latest is None:
            raise NoRolloutYet("no rollout yet; start one with: tlsroll rollout start")
        if latest.rollout.change is Change.FINALIZE:
            # Not "finalize (direct): only a transitional rollout is finalized": the newest is
            # a finalize itself (session 64's review L3').
            done = latest.rollout.state is RolloutState.COMPLETED
            what = "finalized" if done else f"({latest.rollout.state.value}) was the finalize of"
            raise planner.NotAwaitingFinalize(
                f"nothing awaits finalize: {latest.rollout.id} {what} {latest.meta.finalizes}; "
                "see: tlsroll schema show"
            )
        return latest  # finalize_scope says why it cannot be finalized

    async def stage_password(self, verifier_json: str, actor: str) -> tuple[int, set[str]]:
        _check_verifier(verifier_json)
        version = await asyncio.to_thread(
            self.schema.stage_password, verifier_json, self.clock(), actor
        )
        log.info("password.staged", version=version, actor=actor)
        return version, await asyncio.to_thread(self.schema.pending_password_nodes)

    async def control(self, rollout_id: str, action: RolloutAction, actor: str) -> RolloutRow:
        """pause | resume | abort the named, else the active, else the latest rollout;
        IllegalTransition (naming state and action, ending with the command to run instead:
        ``rollout_core.next_command``) if not allowed now. A pause of a paused rollout, a
        resume of a running one, an abort of one aborting or aborted, changes nothing and
        succeeds (``ALREADY``)."""
        import tenacity  # noqa: PLC0415 - a rare command's (see the module's docstring)

        async for attempt in tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(StaleRecords),
            stop=tenacity.stop_after_attempt(STALE_ATTEMPTS),
            reraise=True,
        ):
            with attempt:
                row = await asyncio.to_thread(self._target, rollout_id)
                # Given twice (a script, an impatient admin): what it asks for holds, so it
                # succeeds and changes nothing (it exited 1: audit s39race L1).
                unchanged = row.rollout.state in ALREADY[action]
                if unchanged:
                    break
                switched = may_take_back(r.state for r in row.records)
                rollout = row.rollout.with_action(action, switched=switched)
                row = await asyncio.to_thread(
                    self.schema.save_states,
                    row,
                    rollout,
                    row.records,
                    self.clock(),
                    actor,
                    f"{action.value} by {actor}",
                )
        log.info(
            "rollout.controlled",
            rollout_id=row.rollout.id,
            action=action.value,
            state=row.rollout.state.value,
            actor=actor,
            unchanged=unchanged,
        )
        if not unchanged:
            self.wake()
        return row

    def _target(self, rollout_id: str) -> RolloutRow:
        row = (
            self.schema.get(rollout_id)
            if rollout_id
            else self.schema.active() or self.schema.latest()
        )
        if row is None and rollout_id:
            raise NoSuchRollout(f"no rollout {shown(rollout_id)} (see: tlsroll schema show --all)")
        if row is None:
            raise NoRolloutYet("no rollout yet; start one with: tlsroll rollout start")
        return row
