"""The rollout engine: the imperative shell around the pure planner.

One loop, woken by admin commands and step outcomes (and a slow tick)::

    row   = schema.active()                       # read the durable records
    plan  = next_actions(row.rollout, records)    # pure: what happens now
    persist plan's events (one transaction)       # BEFORE anything is sent
    start every step of the plan not yet running  # level-triggered; idempotent on the agent
    ... a step's outcome is recorded as a node event, then the loop runs again

Errors at the network boundary are ``TransientError`` (UNAVAILABLE, DEADLINE_EXCEEDED): the
call is retried with tenacity a few times, then the step is left unrecorded and the loop starts
it again later — the agent's idempotency makes that safe. Anything else is terminal for the
step and becomes its failure event with the agent's reason, which the schema shows.

After a leader restart the loop simply runs: records say which steps were in flight; running
them again asks the agents for the state of their transactions (a replayed Switch returns the
transaction already under way), so no step is applied twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from leader import planner
from leader.rollout_core import (
    Change,
    FreezeMode,
    NodeEvent,
    NodeRecord,
    Rollout,
    RolloutEvent,
    Scope,
    Step,
)
from leader.schema_store import RolloutMeta, RolloutRow, SchemaStore, StaleRecords
from leader.store import Node, Store
from tlsroll import httpcheck, logs, password, pki
from tlsroll.errors import PKIError, TlsrollError, TransientError
from tlsroll.rpc import hostport
from tlsroll.v1 import agent_pb2, agent_pb2_grpc

log = logs.get_logger("tlsroll.leader.engine")
T = TypeVar("T")

TICK_SECONDS = 1.0
STEP_RETRY_SECONDS = 2.0
POLL_SECONDS = 0.3
TRANSIENT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
MAX_CLOCK_OFFSET = 120
STALE_RETRIES = 5


class StepFailed(TlsrollError):
    """A terminal failure of one step on one node; the message goes into the schema."""


@dataclass(frozen=True)
class RolloutRequest:
    change: Change
    scope: Scope
    max_parallel: int = 1
    failure_budget: int = 0
    freeze: FreezeMode = FreezeMode.NODE
    # enable-tls: the auth password's verifier (JSON) made by the CLI; never the password.
    auth_verifier_json: str | None = None
    # disable-tls: the enable-tls rollout to take back (None: the newest one).
    undo_rollout_id: str | None = None


class AgentClient:
    """NodeAgent calls to one node over mutual TLS, with the leader's certificate."""

    def __init__(self, node: Node, credentials: grpc.ChannelCredentials) -> None:
        self.node = node
        target = hostport(node.addresses[0], node.agent_port)
        self.channel = grpc.aio.secure_channel(target, credentials)
        self.stub = agent_pb2_grpc.NodeAgentStub(self.channel)

    async def call(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float = 30
    ) -> T:
        """One call; transient failures retried a few times, then TransientError."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(TransientError),
                wait=wait_exponential(multiplier=0.2, max=2),
                stop=stop_after_attempt(4),
                reraise=True,
            ):
                with attempt:
                    try:
                        return await method(request, timeout=timeout)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() in TRANSIENT_CODES:
                            raise TransientError(
                                f"agent {self.node.name}: {exc.details()}"
                            ) from None
                        raise StepFailed(f"{exc.details()} ({exc.code().name})") from None
        except TransientError:
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        await self.channel.close(None)


def new_rollout_id(now: dt.datetime) -> str:
    return f"r{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class Engine:
    def __init__(
        self,
        store: Store,
        schema: SchemaStore,
        ca: pki.CertificateAuthority,
        leader_cert_pem: bytes,
        leader_key_pem: bytes,
        clock: Callable[[], dt.datetime],
        online: Callable[[dt.datetime | None], bool],
        leader_node: str | None,
        freeze_lease: int = 300,
    ) -> None:
        self.store = store
        self.schema = schema
        self.ca = ca
        self.clock = clock
        self.online = online
        self.leader_node = leader_node
        self.freeze_lease = freeze_lease
        self.renewed: dict[tuple[str, str], float] = {}  # scope freezes: last renewal
        self.credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem,
            private_key=leader_key_pem,
            certificate_chain=leader_cert_pem,
        )
        self.wake = asyncio.Event()
        self.tasks: dict[tuple[str, str, Step], asyncio.Task[None]] = {}
        self.not_before: dict[tuple[str, str, Step], float] = {}
        self.clients: dict[str, AgentClient] = {}

    # --- admin commands -----------------------------------------------------------------------

    def plan(
        self, request: RolloutRequest, epoch: int | None = None
    ) -> tuple[Rollout, tuple[NodeRecord, ...]]:
        """The records a rollout would start with; PlanError if the scope cannot be planned."""
        request, _undoes = self._resolve(request)
        nodes = self.store.list_nodes()
        leader = self.leader_node or ""
        if request.scope.kind.value == "local" and not self.leader_node:
            raise planner.PlanError(
                "scope local needs the leader node's name: set node_name in leader.toml"
            )
        enrolled = {n.name: self.online(n.last_heartbeat) for n in nodes}
        return planner.plan_rollout(
            rollout_id=new_rollout_id(self.clock()),
            change=request.change,
            scope=request.scope,
            enrolled=enrolled,
            leader=leader,
            epoch=epoch or self.schema.next_epoch(),
            max_parallel=request.max_parallel,
            failure_budget=request.failure_budget,
            freeze=request.freeze,
        )

    def _resolve(self, request: RolloutRequest) -> tuple[RolloutRequest, str]:
        """disable-tls: its scope is the nodes the rollout it takes back switched."""
        if request.change is not Change.DISABLE_TLS:
            return request, ""
        target = (
            self.schema.get(request.undo_rollout_id)
            if request.undo_rollout_id
            else next((r for r in self.schema.all() if r.rollout.change is Change.ENABLE_TLS), None)
        )
        if target is None or target.rollout.change is not Change.ENABLE_TLS:
            raise planner.PlanError(
                f"no enable-tls rollout {request.undo_rollout_id!r} to take back"
                if request.undo_rollout_id
                else "no enable-tls rollout to take back"
            )
        switched = [r.name for r in target.records if r.state.value == "done"]
        if not switched:
            raise planner.PlanError(
                f"rollout {target.rollout.id} switched no node; nothing to undo"
            )
        return replace(request, scope=Scope.of_nodes(switched)), target.rollout.id

    def start(self, request: RolloutRequest, actor: str) -> RolloutRow:
        new_verifier, auth_version = self._auth_for(request)
        _, undoes = self._resolve(request)
        rollout, nodes = self.plan(request)
        now = self.clock()
        rollout = rollout.with_event(RolloutEvent.START)
        meta = RolloutMeta(
            created_at=now,
            started_by=actor,
            leader_node=self.leader_node or "",
            started_at=now,
            auth_version=auth_version,
            undoes=undoes,
        )
        row = self.schema.create(rollout, nodes, meta, now, new_verifier)
        log.info(
            "rollout.started",
            rollout_id=rollout.id,
            scope=rollout.scope.kind.value,
            order=list(rollout.order),
            epoch=rollout.epoch,
            actor=actor,
        )
        self.wake.set()
        return row

    def _auth_for(self, request: RolloutRequest) -> tuple[str | None, int]:
        """(new verifier to add, version to apply) for the rollout's change."""
        if request.change is Change.ENABLE_TLS:
            if not request.auth_verifier_json:
                raise planner.PlanError(
                    "enable-tls sets the auth password: give --password-file or let the CLI "
                    "generate one"
                )
            try:
                password.verifier_from_json(request.auth_verifier_json)
            except ValueError as exc:
                raise planner.PlanError(f"bad password verifier: {exc}") from None
            return request.auth_verifier_json, 0
        if request.change is Change.CHANGE_PASSWORD:
            if request.auth_verifier_json:
                raise planner.PlanError("change-password applies the staged password only")
            latest = self.schema.latest_auth_version()
            if latest == 0:
                raise planner.PlanError("no password staged: run `tlsroll password set` first")
            return None, latest
        if request.change is Change.DISABLE_TLS:
            return None, 0
        raise planner.PlanError(f"change {request.change.value} is not available yet")

    def stage_password(self, verifier_json: str, actor: str) -> tuple[int, set[str]]:
        try:
            password.verifier_from_json(verifier_json)
        except ValueError as exc:
            raise planner.PlanError(f"bad password verifier: {exc}") from None
        version = self.schema.stage_password(verifier_json, self.clock(), actor)
        log.info("password.staged", version=version, actor=actor)
        return version, self.schema.pending_password_nodes()

    def control(self, rollout_id: str, action: str, actor: str) -> RolloutRow:
        """pause | resume | abort the named, else the active, else the latest rollout;
        IllegalTransition (naming state and action) if not allowed now."""
        event = RolloutEvent(action)
        if event not in (RolloutEvent.PAUSE, RolloutEvent.RESUME, RolloutEvent.ABORT):
            raise ValueError(f"unknown action {action!r}")
        for _ in range(STALE_RETRIES):
            row = (
                self.schema.get(rollout_id)
                if rollout_id
                else self.schema.active() or self.schema.latest()
            )
            if row is None:
                raise planner.PlanError(
                    f"no rollout {rollout_id!r}" if rollout_id else "no rollout"
                )
            rollout = row.rollout.with_event(event)
            try:
                row = self.schema.save_states(
                    row, rollout, row.records, self.clock(), actor, reason=f"{action} by {actor}"
                )
                break
            except StaleRecords:
                continue  # the engine moved it meanwhile: decide again on what is stored now
        else:
            raise planner.PlanError("the rollout is changing too fast; try again")
        log.info(
            "rollout.control",
            rollout_id=rollout.id,
            action=action,
            state=rollout.state.value,
            actor=actor,
        )
        self.wake.set()
        return row

    # --- the loop -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.reconcile()
            except Exception as exc:  # the loop must survive anything; the schema shows why
                log.error("engine.error", error=str(exc), error_type=type(exc).__name__)
            self.wake.clear()
            waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=TICK_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        await self.close()

    async def reconcile(self) -> None:
        """Persist the plan's events, then make sure its steps run."""
        row = await asyncio.to_thread(self.schema.active)
        if row is None:
            return
        plan = planner.next_actions(row.rollout, row.records)
        if plan.rollout_events or plan.node_events:
            rollout, nodes = planner.apply_plan(row.rollout, row.records, plan)
            reason = None
            if RolloutEvent.FAILURE_BUDGET_EXCEEDED in plan.rollout_events:
                failed = [
                    f"{r.name} {r.state.value}: {r.reason}"
                    for r in nodes
                    if r.reason and r.state.value in ("failed", "rolled_back")
                ]
                reason = "halted: " + "; ".join(failed)
            try:
                row = await asyncio.to_thread(
                    self.schema.save_states, row, rollout, nodes, self.clock(), "engine", reason
                )
            except StaleRecords:
                self.wake.set()  # an admin command came first; plan again from what is stored
                return
            for action in plan.node_events:
                log.info(
                    "node.event",
                    rollout_id=rollout.id,
                    node=action.node,
                    node_event=action.event.value,
                    reason=action.reason,
                )
            if plan.rollout_events:
                log.info("rollout.state", rollout_id=rollout.id, state=rollout.state.value)
        for step in plan.steps:
            self._ensure_step(row.rollout, step)
        self._renew_freezes(row)

    def _renew_freezes(self, row: RolloutRow) -> None:
        """Keep the scope freeze's lease alive on every frozen node (a third of the lease)."""
        if row.rollout.freeze is not FreezeMode.SCOPE:
            return
        now = asyncio.get_running_loop().time()
        for rec in row.records:
            key = (row.rollout.id, rec.name)
            if not rec.scope_frozen:
                self.renewed.pop(key, None)
                continue
            if now - self.renewed.setdefault(key, now) < self.freeze_lease / 3:
                continue
            self.renewed[key] = now
            step = planner.StepAction(rec.name, Step.FREEZE, row.rollout.epoch)
            self._ensure_step(row.rollout, step)  # Freeze again: idempotent, renews the lease

    def _ensure_step(self, rollout: Rollout, step: planner.StepAction) -> None:
        key = (rollout.id, step.node, step.step)
        task = self.tasks.get(key)
        if task is not None and not task.done():
            return
        if asyncio.get_running_loop().time() < self.not_before.get(key, 0.0):
            return
        self.tasks[key] = asyncio.create_task(self._run_step(rollout, step), name=str(key))

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        for client in self.clients.values():
            await client.close()

    # --- steps --------------------------------------------------------------------------------

    async def _client(self, name: str) -> AgentClient:
        node = await asyncio.to_thread(self.store.get_node, name)
        client = self.clients.get(name)
        if (
            client is None
            or client.node.addresses != node.addresses
            or (client.node.agent_port != node.agent_port)
        ):
            client = AgentClient(node, self.credentials)
            self.clients[name] = client
        return client

    async def _run_step(self, rollout: Rollout, step: planner.StepAction) -> None:
        key = (rollout.id, step.node, step.step)
        await asyncio.to_thread(
            self.schema.step_times, rollout.id, step.node, step.step.value, started=self.clock()
        )
        runners: dict[Step, Callable[[Rollout, str], Awaitable[tuple[NodeEvent, str | None]]]] = {
            Step.PREFLIGHT: self._preflight,
            Step.STAGE: self._stage,
            Step.SWITCH: self._switch,
            Step.CONFIRM: self._confirm,
        }
        try:
            if step.step in (Step.FREEZE, Step.UNFREEZE):
                frozen = await self._scope_freeze(rollout, step.node, step.step is Step.FREEZE)
                await asyncio.to_thread(self._record_frozen, rollout.id, step, frozen)
                self.wake.set()
                return
            event, reason = await runners[step.step](rollout, step.node)
        except (TransientError, StepFailed) as exc:  # StepFailed here: a freeze refused
            log.warning(
                "step.retry_later",
                rollout_id=rollout.id,
                node=step.node,
                step=step.step.value,
                reason=str(exc),
            )
            self.not_before[key] = asyncio.get_running_loop().time() + STEP_RETRY_SECONDS
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not wedge the rollout silently
            log.error(
                "step.crashed",
                rollout_id=rollout.id,
                node=step.node,
                step=step.step.value,
                error=str(exc),
                error_type=type(exc).__name__,
            )
            self.not_before[key] = asyncio.get_running_loop().time() + STEP_RETRY_SECONDS
            return
        await asyncio.to_thread(self._record, rollout.id, step, event, reason)
        self.wake.set()

    async def _scope_freeze(self, rollout: Rollout, name: str, on: bool) -> bool:
        """``--freeze scope``: freeze (or unfreeze) a node for the whole rollout."""
        client = await self._client(name)
        request = agent_pb2.FreezeRequest(
            command=self._command(rollout), lease_seconds=self.freeze_lease if on else 0
        )
        reply = await client.call(client.stub.Freeze if on else client.stub.Unfreeze, request)
        return reply.frozen

    def _record_frozen(self, rollout_id: str, step: planner.StepAction, frozen: bool) -> None:
        for _ in range(STALE_RETRIES):
            row = self.schema.get(rollout_id)
            assert row is not None
            records = [
                replace(r, scope_frozen=frozen) if r.name == step.node else r for r in row.records
            ]
            try:
                self.schema.save_states(row, row.rollout, records, self.clock(), "engine")
                break
            except StaleRecords:
                continue
        self.schema.step_times(rollout_id, step.node, step.step.value, ended=self.clock())
        log.info("node.scope_frozen", rollout_id=rollout_id, node=step.node, frozen=frozen)

    def _record(
        self, rollout_id: str, step: planner.StepAction, event: NodeEvent, reason: str | None
    ) -> None:
        for _ in range(STALE_RETRIES):
            row = self.schema.get(rollout_id)
            assert row is not None
            records = list(row.records)
            i = next(i for i, r in enumerate(records) if r.name == step.node)
            records[i] = records[i].with_event(event, reason)
            try:
                self.schema.save_states(row, row.rollout, records, self.clock(), "engine")
                break
            except StaleRecords:
                continue
        else:
            raise StaleRecords(f"could not record {event.value} for {step.node}")
        self.schema.step_times(rollout_id, step.node, step.step.value, ended=self.clock())
        if event is NodeEvent.CONFIRM_DONE and row.meta.auth_version:
            # The node restarted with this rollout's password: it is live there now.
            self.schema.set_node_auth(step.node, row.meta.auth_version, self.clock())
        if event is NodeEvent.CONFIRM_DONE and row.rollout.change is Change.DISABLE_TLS:
            self.schema.set_node_auth(step.node, None, self.clock())  # back on http: no password
        log.info(
            "step.done",
            rollout_id=rollout_id,
            node=step.node,
            step=step.step.value,
            node_event=event.value,
            reason=reason,
        )

    def _command(self, rollout: Rollout) -> agent_pb2.Command:
        return agent_pb2.Command(rollout_id=rollout.id, epoch=rollout.epoch)

    async def _preflight(self, rollout: Rollout, name: str) -> tuple[NodeEvent, str | None]:
        client = await self._client(name)
        now = agent_pb2.PreflightRequest(
            command=self._command(rollout), max_clock_offset_seconds=MAX_CLOCK_OFFSET
        )
        now.leader_time.FromDatetime(self.clock())
        try:
            reply = await client.call(client.stub.Preflight, now)
        except StepFailed as exc:
            return NodeEvent.PREFLIGHT_FAILED, str(exc)
        await asyncio.to_thread(
            self.schema.update_detail,
            rollout.id,
            name,
            old_url=reply.old_url,
            new_url=reply.new_url,
            bootstrap_port=reply.bootstrap_port,
        )
        if not reply.ok:
            return NodeEvent.PREFLIGHT_FAILED, "; ".join(reply.problems)
        needs_https = rollout.change in (Change.CHANGE_PASSWORD, Change.DISABLE_TLS)
        if needs_https and "https" not in reply.server.schemes:
            return NodeEvent.PREFLIGHT_FAILED, "the node is not on https; run enable-tls first"
        node = await asyncio.to_thread(self.store.get_node, name)
        claimed = pki.Names.of(reply.common_name, reply.ip_addresses, reply.dns_names)
        enrolled = pki.Names.of(node.name, node.addresses, node.dns_names)
        if claimed != enrolled:
            return NodeEvent.PREFLIGHT_FAILED, (
                f"the node's names {claimed} differ from its enrolment {enrolled}; re-enrol it"
            )
        return NodeEvent.PREFLIGHT_PASSED, None

    async def _stage(self, rollout: Rollout, name: str) -> tuple[NodeEvent, str | None]:
        if rollout.change in (Change.CHANGE_PASSWORD, Change.DISABLE_TLS):
            return NodeEvent.STAGE_DONE, None  # no new certificate; nothing to stage
        client = await self._client(name)
        node = await asyncio.to_thread(self.store.get_node, name)
        try:
            csr_reply = await client.call(
                client.stub.CreateCSR, agent_pb2.CreateCSRRequest(command=self._command(rollout))
            )
            csr = pki.load_csr_pem(csr_reply.csr_pem)
            expected = pki.Names.of(node.name, node.addresses, node.dns_names)
            cert = self.ca.sign_csr(csr, expected, server=True, client=False, now=self.clock())
            staged = await client.call(
                client.stub.Stage,
                agent_pb2.StageRequest(
                    command=self._command(rollout),
                    certificate_pem=pki.cert_to_pem(cert),
                    ca_certificate_pem=self.ca.cert_pem,
                ),
            )
        except (StepFailed, PKIError) as exc:
            return NodeEvent.STAGE_FAILED, str(exc)
        await asyncio.to_thread(
            self.schema.update_detail,
            rollout.id,
            name,
            cert_fingerprint=staged.fingerprint,
            cert_not_after=staged.not_after.ToDatetime(tzinfo=dt.UTC),
        )
        return NodeEvent.STAGE_DONE, None

    async def _wait_txn(
        self, txn_rollout_id: str, name: str, kind: str, record_as: str
    ) -> agent_pb2.Transaction:
        """Poll the agent's transaction (keyed by ``txn_rollout_id``) until it ends, recording
        its timings in the schema of rollout ``record_as``."""
        client = await self._client(name)
        while True:
            txn = await client.call(
                client.stub.GetTransaction,
                agent_pb2.GetTransactionRequest(rollout_id=txn_rollout_id, kind=kind),
            )
            await asyncio.to_thread(self._record_txn, record_as, name, txn)
            if txn.outcome:
                return txn
            await asyncio.sleep(POLL_SECONDS)

    def _record_txn(self, rollout_id: str, name: str, txn: agent_pb2.Transaction) -> None:
        details: dict[str, Any] = {"restart_seconds": txn.restart_seconds}
        if txn.HasField("freeze_started_at"):
            details["freeze_started_at"] = txn.freeze_started_at.ToDatetime(tzinfo=dt.UTC)
        if txn.HasField("freeze_ended_at"):
            details["freeze_ended_at"] = txn.freeze_ended_at.ToDatetime(tzinfo=dt.UTC)
        self.schema.update_detail(rollout_id, name, **details)

    async def _switch(self, rollout: Rollout, name: str) -> tuple[NodeEvent, str | None]:
        client = await self._client(name)
        row = await asyncio.to_thread(self.schema.get, rollout.id)
        assert row is not None
        if rollout.change is Change.DISABLE_TLS:
            return await self._switch_back(rollout, row.meta.undoes, name)
        verifier = ""
        if row.meta.auth_version:
            verifier = await asyncio.to_thread(self.schema.verifier, row.meta.auth_version)
        try:
            await client.call(
                client.stub.Switch,
                agent_pb2.SwitchRequest(
                    command=self._command(rollout),
                    change=rollout.change.value,
                    auth_verifier_json=verifier,
                    keep_frozen=rollout.freeze is FreezeMode.SCOPE,
                ),
            )
            txn = await self._wait_txn(rollout.id, name, "switch", record_as=rollout.id)
        except StepFailed as exc:
            return NodeEvent.SWITCH_ROLLED_BACK, f"switch refused: {exc}"
        if txn.outcome == "completed":
            return NodeEvent.SWITCH_DONE, None
        prefix = "" if txn.outcome == "rolled_back" else "ROLLBACK FAILED, node needs attention: "
        return NodeEvent.SWITCH_ROLLED_BACK, prefix + txn.reason

    async def _switch_back(
        self, rollout: Rollout, undoes: str, name: str
    ) -> tuple[NodeEvent, str | None]:
        """disable-tls: the agent undoes the switch of rollout ``undoes`` (its Rollback, under
        this rollout's epoch) and the node goes back to its http config."""
        client = await self._client(name)
        command = agent_pb2.Command(rollout_id=undoes, epoch=rollout.epoch)
        try:
            await client.call(client.stub.Rollback, agent_pb2.RollbackRequest(command=command))
            txn = await self._wait_txn(undoes, name, "rollback", record_as=rollout.id)
        except StepFailed as exc:
            return NodeEvent.SWITCH_ROLLED_BACK, f"going back to http refused: {exc}"
        if txn.outcome == "completed":
            return NodeEvent.SWITCH_DONE, None
        prefix = "still on https: " if txn.outcome == "rolled_back" else "NEEDS ATTENTION: "
        return NodeEvent.SWITCH_ROLLED_BACK, prefix + txn.reason

    async def _confirm(self, rollout: Rollout, name: str) -> tuple[NodeEvent, str | None]:
        """Check the node from outside; if it fails, have the agent roll it back."""
        if rollout.change is Change.DISABLE_TLS:
            row = await asyncio.to_thread(self.schema.get, rollout.id)
            assert row is not None
            detail = next(d for r, d in row.nodes if r.name == name)
            problem = await asyncio.to_thread(http_check, detail.old_url, detail.new_url)
            if problem is None:
                return NodeEvent.CONFIRM_DONE, None
            return NodeEvent.CONFIRM_ROLLED_BACK, f"outside check after going back: {problem}"
        client = await self._client(name)
        # A rollback already under way (the leader restarted mid-confirm) is followed, not
        # second-guessed by a new check.
        try:
            existing = await client.call(
                client.stub.GetTransaction,
                agent_pb2.GetTransactionRequest(rollout_id=rollout.id, kind="rollback"),
            )
        except StepFailed:
            existing = None
        problem = None if existing is not None else await self._outside_check(rollout, name)
        if problem is None and existing is None:
            return NodeEvent.CONFIRM_DONE, None
        if existing is None:
            log.warning("confirm.failed", rollout_id=rollout.id, node=name, problem=problem)
            try:
                await client.call(
                    client.stub.Rollback, agent_pb2.RollbackRequest(command=self._command(rollout))
                )
            except StepFailed as exc:
                return NodeEvent.CONFIRM_ROLLED_BACK, f"{problem}; rollback refused: {exc}"
        txn = await self._wait_txn(rollout.id, name, "rollback", record_as=rollout.id)
        why = problem or "confirm failed before a leader restart"
        if txn.outcome != "completed":
            why += f"; ROLLBACK FAILED, node needs attention: {txn.reason}"
        return NodeEvent.CONFIRM_ROLLED_BACK, f"outside check failed: {why}"

    async def _outside_check(self, rollout: Rollout, name: str) -> str | None:
        row = await asyncio.to_thread(self.schema.get, rollout.id)
        assert row is not None
        detail = next(d for r, d in row.nodes if r.name == name)
        return await asyncio.to_thread(
            outside_check,
            detail.new_url,
            detail.old_url,
            self.ca.cert_pem,
            detail.cert_fingerprint,
        )


def _host_port(url: str, scheme: str) -> tuple[str, int, str] | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != scheme or not parts.hostname or not parts.port:
        return None
    return parts.hostname, parts.port, parts.path or "/"


def outside_check(new_url: str, old_url: str, ca_pem: bytes, fingerprint: str) -> str | None:
    """What a workstation would see: https with the staged certificate trusted through the
    cluster CA only, the app answering, and the old http port closed. None if all is well."""
    new = _host_port(new_url, "https")
    if new is None:
        return f"no https address recorded for the node ({new_url!r})"
    problem = httpcheck.check_https(*new, ca_pem, fingerprint or None)
    if problem is not None:
        return problem
    old = _host_port(old_url, "http")
    if old is not None and httpcheck.port_open(old[0], old[1], timeout=3):
        return f"{old_url} still answers; plain http must be closed"
    return None


def http_check(http_url: str, https_url: str) -> str | None:
    """After going back: the app answers on plain http and the https port is closed."""
    old = _host_port(http_url, "http")
    if old is None:
        return f"no http address recorded for the node ({http_url!r})"
    problem = httpcheck.check_http(*old)
    if problem is not None:
        return problem
    new = _host_port(https_url, "https")
    if new is not None and httpcheck.port_open(new[0], new[1], timeout=3):
        return f"{https_url} still answers"
    return None
