"""The administrator's rollout commands, run on the leader's event loop.

    commands = Commands(store, schema, clock, online, leader_node, wake=engine.wake.set)
    row = await commands.start(RolloutRequest(Change.ENABLE_TLS, Scope.cluster(), ...), actor)
    row = await commands.control("", RolloutAction.PAUSE, actor)

Every command is a coroutine on the loop that also runs the engine: database work goes to a
worker thread (``asyncio.to_thread``), and the engine is woken on the loop, never from another
thread. What to plan is decided by the pure planner (``plan_rollout``, ``decide_auth``,
``undo_target``); a write that crosses an engine verdict (``StaleRecords``) is decided again on
what is stored now (tenacity, a few attempts).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from leader import planner
from leader.rollout_core import (
    Change,
    FreezeMode,
    NodeRecord,
    Rollout,
    RolloutAction,
    RolloutEvent,
    Scope,
    ScopeKind,
)
from leader.schema_store import RolloutMeta, RolloutRow, SchemaStore, StaleRecords
from leader.store import Store
from tlsroll import logs, password
from tlsroll.errors import TerminalError

log = logs.get_logger(__name__)

STALE_ATTEMPTS = 5


@dataclass(frozen=True)
class RolloutRequest:
    change: Change
    scope: Scope
    max_parallel: int = 1
    failure_budget: int = 0
    freeze: FreezeMode = FreezeMode.NODE
    # The auth password's verifier (JSON) made by the CLI, for a change that brings its own
    # password (enable-tls); never the password itself.
    auth_verifier_json: str | None = None
    # disable-tls: the enable-tls rollout to take back (None: the newest one).
    undo_rollout_id: str | None = None


class NoSuchRollout(TerminalError):
    """The named rollout is not in the schema (NOT_FOUND)."""


class NoRolloutYet(TerminalError):
    """A command needs a rollout and none was ever started (FAILED_PRECONDITION)."""


def new_rollout_id(now: dt.datetime) -> str:
    return f"r{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _check_verifier(verifier_json: str) -> None:
    try:
        password.verifier_from_json(verifier_json)
    except ValueError as exc:
        raise planner.PlanError(f"bad password verifier: {exc}") from None


class Commands:
    def __init__(
        self,
        store: Store,
        schema: SchemaStore,
        clock: Callable[[], dt.datetime],
        online: Callable[[dt.datetime | None], bool],
        leader_node: str | None,
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.schema = schema
        self.clock = clock
        self.online = online
        self.leader_node = leader_node
        self.wake = wake

    async def _resolve(self, request: RolloutRequest) -> tuple[RolloutRequest, str]:
        """disable-tls: its scope is the nodes the rollout it takes back switched; a rollout is
        taken back once (``planner.AlreadyUndone`` names the one that did)."""
        if request.change is not Change.DISABLE_TLS:
            return request, ""
        rows = await asyncio.to_thread(self.schema.all)
        target, switched = planner.undo_target(
            [(r.rollout, r.records) for r in rows],
            request.undo_rollout_id,
            {r.rollout.id: r.meta.undoes for r in rows},
        )
        return replace(request, scope=Scope.of_nodes(switched)), target.id

    async def plan(self, request: RolloutRequest) -> tuple[Rollout, tuple[NodeRecord, ...]]:
        """The records a rollout would start with; PlanError if the scope cannot be planned."""
        request, _undoes = await self._resolve(request)
        return await self._plan(request)

    async def _plan(self, request: RolloutRequest) -> tuple[Rollout, tuple[NodeRecord, ...]]:
        if request.scope.kind is ScopeKind.LOCAL and not self.leader_node:
            raise planner.PlanError(
                "scope local needs the leader node's name: set node_name in leader.toml"
            )
        nodes = await asyncio.to_thread(self.store.list_nodes)
        epoch = await asyncio.to_thread(self.schema.next_epoch)
        return planner.plan_rollout(
            rollout_id=new_rollout_id(self.clock()),
            change=request.change,
            scope=request.scope,
            enrolled={n.name: self.online(n.last_heartbeat) for n in nodes},
            leader=self.leader_node or "",
            epoch=epoch,
            max_parallel=request.max_parallel,
            failure_budget=request.failure_budget,
            freeze=request.freeze,
        )

    async def start(self, request: RolloutRequest, actor: str) -> RolloutRow:
        latest = await asyncio.to_thread(self.schema.latest_auth_version)
        auth = planner.decide_auth(request.change, bool(request.auth_verifier_json), latest)
        if auth.add_new:
            assert request.auth_verifier_json is not None
            _check_verifier(request.auth_verifier_json)
        request, undoes = await self._resolve(request)
        rollout, nodes = await self._plan(request)
        now = self.clock()
        rollout = rollout.with_event(RolloutEvent.START)
        meta = RolloutMeta(
            created_at=now,
            started_by=actor,
            leader_node=self.leader_node or "",
            started_at=now,
            auth_version=auth.version,
            undoes=undoes,
        )
        row = await asyncio.to_thread(
            self.schema.create,
            rollout,
            nodes,
            meta,
            now,
            request.auth_verifier_json if auth.add_new else None,
        )
        log.info(
            "rollout.started",
            rollout_id=rollout.id,
            change=rollout.change.value,
            scope=rollout.scope.kind.value,
            order=list(rollout.order),
            epoch=rollout.epoch,
            actor=actor,
        )
        self.wake()
        return row

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
        ``rollout_core.next_command``) if not allowed now."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(StaleRecords),
            stop=stop_after_attempt(STALE_ATTEMPTS),
            reraise=True,
        ):
            with attempt:
                row = await asyncio.to_thread(self._target, rollout_id)
                rollout = row.rollout.with_action(action)
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
        )
        self.wake()
        return row

    def _target(self, rollout_id: str) -> RolloutRow:
        row = (
            self.schema.get(rollout_id)
            if rollout_id
            else self.schema.active() or self.schema.latest()
        )
        if row is None and rollout_id:
            raise NoSuchRollout(f"no rollout {rollout_id!r} (see: tlsroll schema show)")
        if row is None:
            raise NoRolloutYet("no rollout yet; start one with: tlsroll rollout start")
        return row
