"""The Admin servicer, on the leader's Unix socket only: whoever can open the socket is an
administrator. Requests are converted from the wire here (``rollout_request``, the enum codecs
of ``leader.wire``); rollout commands run in ``leader.commands``; errors become statuses through
the leader's one map (``leader.service.ERRORS``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hmac
import inspect
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from leader import agent_features, byo
from leader.admin_socket import current_caller
from leader.commands import Commands, RolloutRequest
from leader.expiry import ExpiryWatch
from leader.layout import Layout
from leader.mixed_cluster import https_only, is_dual, mixed
from leader.node_check import check_nodes
from leader.plan_texts import (
    direct_warnings,
    edited_config_line,
    outside_scope_warning,
    plan_texts,
)
from leader.planner import StagedPasswordUnusable, not_on_https, too_old
from leader.rollout_core import (
    NOT_ON_HTTPS,
    Change,
    NodeRecord,
    NodeState,
    Rollout,
    RolloutState,
    Scope,
    ScopeKind,
    Strategy,
)
from leader.schema_store import (
    NodeDetail,
    RolloutBusy,
    RolloutMeta,
    RolloutRow,
    SchemaStore,
    StagedAuth,
)
from leader.schema_view import behind_view, finalize_preview, rollout_view, still_on_http_now
from leader.service import ERRORS, LeaderState, claimed_names
from leader.store import Node, OwnCert, RolloutHoldsCA, in_rollout_text
from leader.store_health import StoreHealth, start_refused
from leader.tokens import ID_LEN, ID_SHAPE, JoinToken
from leader.viewer.grants import MAX_NAME as MAX_VIEWER_NAME
from leader.viewer.grants import MAX_TTL as MAX_VIEWER_TTL
from leader.viewer.grants import Grant, Grants
from leader.wire import (
    CHANGE,
    FREEZE,
    NODE_HEALTH,
    ROLLOUT_ACTION,
    SCOPE_KIND,
    STRATEGY,
    VIEWER_GRANT_STATE,
)
from tlsroll import logs, password, peertext, pki, spiffe
from tlsroll.backoff import Backoff, Policy, retry_after
from tlsroll.echo import free_text_problem, shown, whole_secret_kind
from tlsroll.errors import TlsrollError, os_error_text
from tlsroll.rpc import RpcStatusError, failed_precondition, invalid, map_errors, timestamp
from tlsroll.v1 import admin_pb2, admin_pb2_grpc, schema_pb2

log = logs.get_logger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_TOKEN_TTL = dt.timedelta(days=7)
DEFAULT_VIEWER_TTL = dt.timedelta(hours=8)
MAX_WHEN_QUIET = 30 * 86400
MAX_FAILURE_BUDGET = 200  # as `--failure-budget` allows (leader/cli/rollout.py)


def trust_bundle(ca: pki.CertificateAuthority) -> list[Any]:
    """The CA certificates agents and workstations are given to trust (enrolment, the
    bootstrap's ``ca_bundle_pem``): today the cluster CA alone. During a CA roll it holds the
    old and the new CA (docs/ca-renewal.md), and ``tlsroll ca show`` lists both."""
    return [ca.cert]


# Admin.CheckPassword's wrong hashes per caller: 5 free, then 1 s doubling up to a minute (a
# person mistyping is not held up; a script using the leader to test guesses is).
CHECK_BACKOFF = Policy(free=5, base=1.0, cap=60.0, forget=3600.0)


def _require_id(value: str, what: str, listed_by: str) -> None:
    """A join token's or viewer grant's id of a shape none can have (``leader.tokens``:
    ``ID_LEN`` of ``ID_ALPHABET``): INVALID_ARGUMENT (the CLI's exit 2), as a malformed
    serial is, not NOT_FOUND (exit 1: "the right shape, nothing has it"; session 56's README
    walk). Not echoed: the shape is the whole message."""
    if not ID_SHAPE.fullmatch(value):
        raise invalid(
            f"a {what}'s id is {ID_LEN} lower-case letters and digits, as `{listed_by}` lists them"
        )


def _planned_detail(urls: tuple[str, str, int] | None) -> NodeDetail:
    """A plan's row detail: the node's http and https address and bootstrap port (``urls``,
    from its agent's check), as a rollout's preflight records them; none if it did not
    answer."""
    if urls is None:
        return NodeDetail()
    http_url, https_url, port = urls
    return NodeDetail(old_url=http_url, new_url=https_url, bootstrap_port=port)


def _hook_error(exc: Exception) -> str:
    """What a failed re-issue of the leader's own certificate logs: a file's path and errno,
    the project's own message, else the type and place only (any other may hold any value)."""
    if isinstance(exc, OSError):
        return os_error_text(exc)
    if isinstance(exc, TlsrollError):
        return str(exc)
    return f"{type(exc).__name__} at {logs.where(exc)}"


def _actor(context: Ctx) -> str:
    """Who is calling, for the audit trail: the user the kernel saw connect to the admin socket
    (``leader.admin_socket``), never a name the client sends."""
    return current_caller().actor


def staged_password(s: StagedAuth) -> admin_pb2.StagedPassword:
    return admin_pb2.StagedPassword(
        version=s.version,
        staged_by=s.staged_by,
        staged_at=timestamp(s.staged_at),
        live_on=s.live_on,
    )


def free_text(value: str, what: str, limit: int) -> str:
    """A free-text field of a request (a token's description, a viewer grant's name, a
    revocation's reason) as it is stored: ``peertext.clean``, at most ``limit`` characters.
    INVALID_ARGUMENT, before anything is stored, if it holds what looks like one of tlsroll's
    secrets (``tlsroll.echo.free_text_problem``; the secret not repeated): every list would
    show it again (review s48rev3). The CLI refuses it too; this is the rule for every
    caller."""
    text = peertext.clean(value, limit)
    # the cleaned text (what would be stored: a control character inside a secret dropped)
    # and what was given (a secret past the cut)
    problem = free_text_problem(text, what) or free_text_problem(
        value[: limit * peertext.READ_FACTOR], what
    )
    if problem is not None:
        raise invalid(problem)
    return text


def token_info(t: Any) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        id=t.id,
        created_at=timestamp(t.created_at),
        expires_at=timestamp(t.expires_at),
        uses_allowed=t.uses_allowed,
        uses_left=t.uses_left,
        revoked=t.revoked_at is not None,
        description=t.description,
        node_name=t.node_name or "",
        addresses=t.addresses,
        dns_names=t.dns_names,
        superseded_at=timestamp(t.superseded_at),
        superseded_by=t.superseded_by,
    )


def grant_info(g: Grant, now: dt.datetime) -> admin_pb2.ViewerGrantInfo:
    return admin_pb2.ViewerGrantInfo(
        id=g.id,
        name=g.name,
        created_at=timestamp(g.created_at),
        expires_at=timestamp(g.expires_at),
        used_at=timestamp(g.used_at),
        state=VIEWER_GRANT_STATE.wire(g.state(now)),
        created_by=g.created_by,
    )


def rollout_request(request: admin_pb2.RolloutRequest) -> RolloutRequest:
    """The command's request from the wire; INVALID_ARGUMENT names what is wrong."""
    change = CHANGE.read(request.change, "change")
    if change is Change.FINALIZE:
        raise invalid(
            "finalize is phase 2 of a transitional rollout: tlsroll rollout finalize [ID]"
        )
    strategy = STRATEGY.read_optional(request.strategy, "strategy") or Strategy.DIRECT
    if strategy is Strategy.TRANSITIONAL and change is not Change.ENABLE_TLS:
        raise invalid("the transitional strategy is for enable-tls only")
    if change is Change.DISABLE_TLS:
        if request.scope or request.nodes:
            raise invalid("disable-tls takes its nodes from the rollout it takes back")
        scope = Scope.cluster()  # replaced by the nodes that rollout switched
    else:
        kind = SCOPE_KIND.read(request.scope, "scope")
        if (kind is ScopeKind.NODES) != bool(request.nodes):
            raise invalid("a node list goes with scope nodes, and only with it")
        scope = Scope(kind, tuple(request.nodes))
    if not 1 <= (request.max_parallel or 1) <= 200:
        raise invalid("max-parallel must be 1..200")
    if not 0 <= request.failure_budget <= MAX_FAILURE_BUDGET:  # the CLI's bound (s47rtin L7)
        raise invalid(f"failure-budget must be 0..{MAX_FAILURE_BUDGET}")
    return RolloutRequest(
        change=change,
        scope=scope,
        max_parallel=request.max_parallel or 1,
        failure_budget=request.failure_budget,
        auth_verifier_json=request.auth_verifier_json or None,
        freeze=FREEZE.read(request.freeze, "freeze"),
        strategy=strategy,
        undo_rollout_id=request.undo_rollout_id or None,
        own_certs=own_certs(request.cert_dir) if request.HasField("cert_dir") else None,
        applies_version=request.auth_version,
        confirmed_nodes=tuple(request.confirmed_nodes),
    )


def own_certs(cert_dir: admin_pb2.CertDir) -> byo.Material:
    """``--cert-dir`` from the wire (the keys are secrets: into memory, nowhere else)."""
    nodes: dict[str, byo.NodeMaterial] = {}
    for n in cert_dir.nodes:
        if n.node in nodes:
            raise invalid(f"--cert-dir: node {shown(n.node)} given twice")
        mode = n.key_file_mode if n.HasField("key_file_mode") else None
        if mode is not None and mode > 0o7777:  # permission bits only (s47rtin L7)
            raise invalid(f"--cert-dir: node {n.node!r}: key_file_mode {mode:o} is not a file mode")
        nodes[n.node] = byo.NodeMaterial(n.node, n.chain_pem, n.private_key_pem, mode)
    # (why a file could not be read: repeated, cleaned and cut, for the nodes it touches only)
    return byo.Material(cert_dir.ca_pem, nodes, dict(cert_dir.unreadable), cert_dir.directory)


H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


def runs_to_end(handler: H) -> H:
    """Decorate a servicer method that changes something: it runs to its end whatever the
    caller does. gRPC cancels a handler whose client goes away (a closed CLI, Ctrl-C, a
    deadline); cancelled after its commit, ``StartRollout`` never logged ``rollout.started``
    nor kept a ``--cert-dir`` rollout's keys for its stages, which then failed (audit s39race
    M3). The handler runs as a task of its own, shielded; a caller that went away is answered
    by nobody; the leader logs that it went away (``admin.caller_gone``) and, once the command
    ends, what it did (``admin.finished_without_caller``), which is also shown where it always
    is (``tlsroll rollout status``, ``schema show``). Below
    ``map_errors``: the errors it maps are the task's."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Ctx) -> Any:
        task = asyncio.ensure_future(handler(self, request, context))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                log.info("admin.caller_gone", method=handler.__name__)
                carried: set[asyncio.Task[Any]] = self.carried_on
                carried.add(task)
                task.add_done_callback(carried.discard)
                task.add_done_callback(functools.partial(_carried_on, handler.__name__))
            raise

    return wrapper  # type: ignore[return-value]


def _carried_on(name: str, task: asyncio.Task[Any]) -> None:
    """The end of a command whose caller went away (``runs_to_end``): logged, never raised."""
    if task.cancelled():
        log.warning(
            "admin.finished_without_caller",
            method=name,
            outcome="cancelled",
            detail="an admin command ran on after its caller went away (Ctrl-C, a lost ssh); "
            "outcome says how it ended",
        )
        return
    error = task.exception()
    if error is None:
        log.info("admin.finished_without_caller", method=name, outcome="done")
    else:  # (the type and its one line, as map_errors would have sent it)
        log.warning(
            "admin.finished_without_caller",
            method=name,
            outcome="refused",
            error=type(error).__name__,
            message=str(error) if isinstance(error, TlsrollError) else "",
            detail="an admin command ran on after its caller went away (Ctrl-C, a lost ssh); "
            "outcome says how it ended",
        )


@dataclass(frozen=True)
class Endpoints:
    """Where agents reach the leader: what an agent's ``[leader]`` table needs."""

    address: str
    join_port: int
    control_port: int


class AdminService(admin_pb2_grpc.AdminServicer):
    # Its callers (the admin socket's) read an OSError's path (``tlsroll.rpc.SHOWS_PATHS``).
    shows_paths = True

    def __init__(
        self,
        state: LeaderState,
        commands: Commands,
        schema: SchemaStore,
        leader_node: str | None = None,
        *,
        grants: Grants | None = None,
        viewer_url: str = "",
        expiry: ExpiryWatch | None = None,
        endpoints: Endpoints | None = None,
        agent_credentials: grpc.ChannelCredentials | None = None,
        layout: Layout | None = None,
    ) -> None:
        """``layout``: the leader's files (``RenewCA`` writes the CA certificate there; None:
        it is refused); ``viewer_url``: the web viewer's base URL (``https://ADDRESS:PORT``),
        empty if it is off; ``grants``: its read-only grants (on the leader's database);
        ``endpoints``: where agents reach the leader (for a token's join command);
        ``agent_credentials``: the leader's mutual-TLS credentials for calls to agents
        (``CheckNodes``)."""
        self.endpoints = endpoints
        self.agent_credentials = agent_credentials
        self.layout = layout
        # Called on the event loop after the CA certificate was renewed (``RenewCA``), one
        # after the other, an awaitable awaited: the leader serves and dials with it, and
        # issues its own certificates again (``leader.runtime``).
        self.ca_renewed: list[Callable[[], object]] = []
        # Likewise after the leader's or the viewer's own certificate was revoked
        # (``RevokeCertificate``): the leader issues it again for a new key and serves it.
        self.own_revoked: list[Callable[[], object]] = []
        # The commands still running whose callers went away (``runs_to_end``).
        self.carried_on: set[asyncio.Task[Any]] = set()
        self.state = state
        self.commands = commands
        self.schema = schema
        self.leader_node = leader_node
        self.grants = grants or Grants(state.store.db)
        self.viewer_url = viewer_url
        self.expiry = expiry or ExpiryWatch(
            state.store,
            schema,
            lambda: state.ca.cert,
            lambda: [],
            state.clock,
            agent_lifetime=state.agent_cert_lifetime,
        )
        # Hashes CheckPassword found wrong, per caller (``_actor``): the call compares a hash
        # computed anywhere with the stored verifier's, so it is rate-limited like any guess
        # (audit s45rt3 L3); the monotonic clock, ``check_clock``, a test may move.
        self._check_failures = Backoff(CHECK_BACKOFF)
        self.check_clock: Callable[[], float] = time.monotonic
        # Why the store cannot be written, kept from a failed command's error as from the
        # engine's (``tlsroll.rpc.map_errors``); set by the leader.
        self.store_health: StoreHealth | None = None

    async def finish_carried_on(self, timeout: float) -> None:
        """At the leader's stop, after its servers: let the commands whose callers went away
        (``runs_to_end``) end, for ``timeout`` seconds at most, before the stores close; those
        still running then are cancelled (what they committed stays, as at a crash)."""
        if self.carried_on:
            await asyncio.wait(set(self.carried_on), timeout=timeout)
        for task in set(self.carried_on):
            task.cancel()
        if self.carried_on:
            await asyncio.wait(set(self.carried_on))

    # --- rollouts -----------------------------------------------------------------------------

    @map_errors(ERRORS)
    async def PlanRollout(
        self, request: admin_pb2.RolloutRequest, context: Ctx
    ) -> admin_pb2.PlanResponse:
        wanted = rollout_request(request)
        active = await asyncio.to_thread(self.schema.active)
        busy = ""
        if active is not None:
            # (A way back may start beside a transitional rollout awaiting finalize.)
            waiting = active.rollout.state is RolloutState.AWAITING_FINALIZE
            if not (waiting and wanted.change is Change.DISABLE_TLS):
                busy = str(
                    RolloutBusy(
                        active.rollout.id,
                        active.rollout.state.value,
                        active.rollout.change.value,
                    )
                )
        if busy and request.refuse_if_busy:
            # `rollout start`'s dry run: the refusal at once, no agent asked (review rev58a
            # M2: with a node's agent stopped it said "cannot ask the agent of node2").
            return admin_pb2.PlanResponse(busy=busy)
        no_room = await self._start_refused(wanted.change)
        if no_room and request.refuse_if_busy:  # (said as `busy` is: the CLI refuses with it)
            return admin_pb2.PlanResponse(busy=no_room)
        planned = await self.commands.plan(wanted)
        rollout, nodes = planned.rollout, planned.records
        checks, steps, warnings = plan_texts(
            rollout.change, rollout.strategy, rollout.freeze, request.HasField("cert_dir")
        )
        replaced = await self._replaces_other(rollout, nodes)
        if rollout.strategy is Strategy.DIRECT:
            going = [r for r in nodes if r.state is not NodeState.SKIPPED]
            every = bool(going) and all(r.name in replaced for r in going)
            warnings = direct_warnings(warnings, sorted(replaced), every)
        if active is not None:
            warnings.append(
                f"rollout {active.rollout.id} is {active.rollout.state.value}: a new one "
                "cannot start until it has ended"
            )
        kept = [r.name for r in nodes if r.state is NodeState.SKIPPED]
        if request.HasField("cert_dir") and kept:
            warnings.append(
                f"{', '.join(kept)} already run(s) https and keep(s) the certificate served "
                "now; to give them yours: --change rotate-cert --cert-dir DIR"
            )
        if planned.leaves_practice_ca:
            names = ", ".join(planned.leaves_practice_ca)
            warnings.append(
                f"{names} serve(s) the practice's own certificate (from --cert-dir): this "
                "rotate-cert gives them the cluster CA's; a workstation set up there with the "
                "practice CA's pin (--ca-pin) must be set up again (tlsroll notify says so); to "
                "keep the practice's: --cert-dir DIR"
            )
            steps = [
                "none at a workstation set up with the password alone (it was handed the "
                "cluster CA too); one set up with the practice CA's pin (--ca-pin) needs the "
                "client steps again (Test connection, confirm the port, the password, restart)"
            ]
        if blocked := not_on_https(nodes):
            warnings.append(
                f"{', '.join(blocked)}: {NOT_ON_HTTPS}; {rollout.change.value} cannot start "
                "while a node in scope is on http only (rollout start refuses it)"
            )
        if aged := too_old(nodes):
            # An agent not heard since the leader started is waited for, not upgraded: what
            # the store kept of it may be older than the agent (review of s63-f1, L-3).
            heard_not = [n for n, why in aged.items() if agent_features.NOT_HEARD in why]
            if len(heard_not) < len(aged):
                warnings.append(
                    f"{rollout.change.value} cannot start while a node's agent is too old for "
                    "it (rollout start refuses it): upgrade tlsroll on that node first"
                )
            if heard_not:
                warnings.append(
                    f"{rollout.change.value} cannot start while the leader has not heard a "
                    "node's agent since it started and the store holds no word that it "
                    "implements what the change needs (rollout start refuses it): wait for "
                    "its first heartbeat, then plan again"
                )
        if outside := await self._outside_scope(rollout, nodes):
            warnings.append(outside)
        if no_room and busy:  # (else said as the plan's refusal: `busy`, below)
            warnings.append(f"{no_room} (rollout start refuses it)")
        on_http = await self._on_http(
            [r.name for r in nodes if r.state is not NodeState.SKIPPED], rollout
        )
        if on_http and rollout.change is Change.ENABLE_TLS:
            count = sum(on_http.values())
            warnings.append(
                f"{count} workstation(s) were seen on http lately and not on https since "
                f"({', '.join(f'{n}: {c}' for n, c in sorted(on_http.items()))}): "
                + (
                    "each must do the client steps before finalize"
                    if rollout.strategy is Strategy.TRANSITIONAL
                    else "each loses the server the moment its node switches, until the "
                    "client steps are done there (tlsroll notify --remaining lists them)"
                )
            )
        row = RolloutRow(
            rollout,
            RolloutMeta(
                created_at=self.state.clock(),
                started_by=_actor(context),
                leader_node=self.leader_node or "",
                removed_since=planned.removed_since,
                own_certificates=request.HasField("cert_dir"),
                own_ca_pins=tuple((c.node, c.ca_pin) for c in planned.certificates if c.ca_pin),
            ),
            # Each node's addresses as its agent's check gave them (session 64's review M2:
            # `notify --when` announced a node never switched with the seed's port and "…").
            tuple((n, _planned_detail(planned.addresses.get(n.name))) for n in nodes),
        )
        reply = admin_pb2.PlanResponse(
            rollout=rollout_view(row, on_http=on_http),
            checks=checks,
            client_steps=steps,
            warnings=warnings,
        )
        for view in reply.rollout.nodes:
            if view.name in replaced:  # (its address now is its https one: no http to close)
                view.other_certificate = True
                view.old_url = view.new_url
        if rollout.change is Change.ENABLE_TLS:
            reply.password_version_in_use = planned.password_in_use.version
            # What a start that brings a new password meets (the CLI refuses it before it
            # generates one or asks); where no password is sure, any start (review s64 M2).
            reply.password_doubt = planned.password_in_use.doubt(rollout.change, True)
            # ... and whether it refuses a start that brings none too, as ``decide_auth``
            # does: `plan` exits 1 for it, as for any refusal a start of the plan meets.
            in_use = planned.password_in_use
            reply.password_doubt_refuses = bool(in_use.doubt(rollout.change, not in_use.version))
        # The leader's disk refuses a start too: `tlsroll plan` exits 1 for it, as for a
        # rollout not ended (review s73 revroom: it warned and exited 0).
        reply.busy = busy or no_room or ""
        # What the start refuses as nodes it preflights at once are blocked (its first
        # max_parallel and this leader's prepare_ahead: review s67 rev2 M3): the CLI refuses
        # with it before it asks or makes a password.
        if refusal := self.commands.blocked_at_once(rollout, nodes):
            reply.blocked_at_once = str(refusal)
        staged = (
            await asyncio.to_thread(self.schema.staged_password, planned.auth_latest)
            if planned.auth_latest
            else None
        )
        if staged is not None and rollout.change is Change.CHANGE_PASSWORD:
            reply.applies.CopyFrom(staged_password(staged))
        # enable-tls brings a new password unless the nodes run one: it supersedes a staged
        # one that never went live (two admins: audit s39 H4).
        new_password = rollout.change is Change.ENABLE_TLS and not planned.password_in_use.version
        if staged is not None and new_password and not staged.live_on:
            reply.replaces.CopyFrom(staged_password(staged))
        reply.edited_configs.extend(edited_config_line(n, c) for n, c in planned.edited_configs)
        for c in planned.certificates:
            reply.certificates.append(
                f"{c.node}: {c.subject}, {c.fingerprint}, valid until {c.not_after:%Y-%m-%d}"
            )
        return reply

    async def _replaces_other(
        self, rollout: Rollout, nodes: Sequence[NodeRecord]
    ) -> frozenset[str]:
        """Of the nodes an enable-tls plan switches, those whose server serves https only, with
        a certificate not known as one of this CA by their heartbeats
        (``SchemaStore.other_certificates``): the switch replaces it (review s70 drift L1:
        the plan said only "will switch", and that http closes there)."""
        if rollout.change is not Change.ENABLE_TLS:
            return frozenset()
        live = self.state.live_servers
        going = {r.name: live.get(r.name, "") for r in nodes if r.state is not NodeState.SKIPPED}
        if not any(https_only(s) for s in going.values()):
            return frozenset()
        served = dict(self.state.served_fingerprints)
        other = await asyncio.to_thread(self.schema.other_certificates, going, served)
        # (one whose agent names no certificate, an earlier release's: not said to be another)
        return frozenset(n for n in other if served.get(n))

    async def _outside_scope(self, rollout: Rollout, nodes: Sequence[NodeRecord]) -> str:
        """The plan's warning for the enrolled nodes its scope leaves out (``--scope local``,
        ``--nodes``, a way back of one rollout's nodes) that stay different from the nodes it
        changes: the cluster is mixed afterwards, said before the start (``plan``, the
        prompt, and ``rollout start --yes``; review s69 revlocal H1)."""
        if rollout.scope.kind is ScopeKind.CLUSTER:
            return ""
        enrolled = await asyncio.to_thread(self.state.store.list_nodes)
        shown = {r.name for r in nodes}
        outside = {
            n.name: self.state.live_servers.get(n.name, "")
            for n in enrolled
            if n.name not in shown and n.removed_at is None
        }
        if not outside:
            return ""
        other: Collection[str] = ()
        left_by: dict[str, str] = {}
        if rollout.change is Change.ENABLE_TLS:  # (the only change that says how to switch)
            other = await asyncio.to_thread(
                self.schema.other_certificates, outside, dict(self.state.served_fingerprints)
            )
            if dual := [n for n, s in outside.items() if is_dual(s)]:
                left_by = await asyncio.to_thread(self.schema.left_dual, dual)
        return outside_scope_warning(
            rollout.change, [r.name for r in nodes], outside, self.leader_node or "", other, left_by
        )

    async def _on_http(self, names: list[str], rollout: Rollout) -> dict[str, int]:
        """Per node of ``names``: how many workstations its agent saw on http lately and not
        on https since (who still needs the client steps there; the schema's
        ``still_on_http``). Only for enable-tls: the other changes keep the address."""
        if rollout.change is not Change.ENABLE_TLS or not names:
            return {}
        clients, infos = await asyncio.to_thread(self.schema.clients_report, names)
        now = self.state.clock()
        left = still_on_http_now(clients, infos, now, self.state.fresh_reports(infos, now))
        return dict(Counter(c.node for c in left))

    @map_errors(ERRORS)
    @runs_to_end
    async def StartRollout(
        self, request: admin_pb2.RolloutRequest, context: Ctx
    ) -> schema_pb2.RolloutView:
        wanted = rollout_request(request)
        if no_room := await self._start_refused(wanted.change):
            raise failed_precondition(no_room)
        row = await self.commands.start(wanted, _actor(context))
        return rollout_view(row)

    async def _start_refused(self, change: Change) -> str | None:
        """Why a start of ``change`` is refused for the leader's own disk now
        (``store_health.start_refused``), or None: never the way back (disable-tls)."""
        if change is Change.DISABLE_TLS:
            return None
        data_dir = self.state.store.db.path.parent
        return await asyncio.to_thread(start_refused, self.store_health, data_dir)

    @map_errors(ERRORS)
    @runs_to_end
    async def RetryRollout(
        self, request: admin_pb2.RetryRolloutRequest, context: Ctx
    ) -> schema_pb2.RolloutView:
        row = await self.commands.retry(request.rollout_id, _actor(context))
        return rollout_view(row)

    @map_errors(ERRORS)
    @runs_to_end
    async def FinalizeRollout(
        self, request: admin_pb2.FinalizeRolloutRequest, context: Ctx
    ) -> schema_pb2.RolloutView:
        if request.when_quiet_seconds > MAX_WHEN_QUIET:
            raise invalid("--when-quiet is at most 30 days")
        if request.when_quiet_seconds and request.force:
            raise invalid("--force and --when-quiet exclude each other")
        if request.check_only:  # what the CLI's confirmation shows: nothing starts
            old, names, cut = await self.commands.finalize_check(
                request.rollout_id, force=request.force, when_quiet=request.when_quiet_seconds
            )
            return finalize_preview(old.rollout.id, names, cut, request.when_quiet_seconds)
        row = await self.commands.finalize(
            request.rollout_id,
            _actor(context),
            force=request.force,
            when_quiet=request.when_quiet_seconds,
        )
        return rollout_view(row)

    @map_errors(ERRORS)
    @runs_to_end
    async def ControlRollout(
        self, request: admin_pb2.ControlRolloutRequest, context: Ctx
    ) -> schema_pb2.RolloutView:
        action = ROLLOUT_ACTION.read(request.action, "action")
        row = await self.commands.control(request.rollout_id, action, _actor(context))
        return rollout_view(row)

    @map_errors(ERRORS)
    @runs_to_end
    async def SetPassword(
        self, request: admin_pb2.SetPasswordRequest, context: Ctx
    ) -> admin_pb2.SetPasswordResponse:
        if request.check_only:  # asked before a generated password is shown (audit s39 M1)
            await asyncio.to_thread(self.schema.refuse_if_busy)
            reply = admin_pb2.SetPasswordResponse()
            newest = await asyncio.to_thread(self.schema.staged_password)
        else:
            version, pending = await self.commands.stage_password(
                request.auth_verifier_json, _actor(context)
            )
            reply = admin_pb2.SetPasswordResponse(version=version, pending_nodes=sorted(pending))
            # The version staged just before this one is the one it supersedes (versions
            # are numbered in the store's transaction: two admins at once, each their own).
            newest = (
                await asyncio.to_thread(self.schema.staged_password, version - 1)
                if version > 1
                else None
            )
        # staged, live on no node now: never applied, or taken back (audit s39 H4)
        if newest is not None and not newest.live_on:
            reply.replaces.CopyFrom(staged_password(newest))
        return reply

    @map_errors(ERRORS)
    async def CheckPassword(
        self, request: admin_pb2.CheckPasswordRequest, context: Ctx
    ) -> admin_pb2.CheckPasswordResponse:
        """The newest staged password's (or with ``about`` that version's) salt and
        parameters, and with ``candidate_hash`` whether that is its hash; the verifier's own
        hash never leaves the leader. With them, the version each node runs."""
        newest = await asyncio.to_thread(self.schema.latest_auth_version)
        if newest == 0:
            raise failed_precondition("no password staged: run `tlsroll password set` first")
        version = request.about or newest
        if version > newest:
            raise failed_precondition(f"no password version {version} (the newest is {newest})")
        try:
            stored = password.verifier_from_json(
                await asyncio.to_thread(self.schema.verifier, version)
            )
        except ValueError as exc:  # (INTERNAL before: review s75 revpwkdf)
            raise StagedPasswordUnusable(version, " ".join(str(exc).split())) from None
        expected = base64.b64decode(stored["hash"])
        live = await asyncio.to_thread(self.schema.node_auth)
        reply = admin_pb2.CheckPasswordResponse(
            version=version,
            salt=stored["salt"],
            n=stored["n"],
            r=stored["r"],
            p=stored["p"],
            dklen=len(expected),
            newest=newest,
            live=[
                admin_pb2.NodePasswordVersion(node=k, version=v) for k, v in sorted(live.items())
            ],
        )
        if request.candidate_hash:
            actor = _actor(context)
            wait = self._check_failures.wait(actor, self.check_clock())
            if wait > 0:
                log.warning(
                    "password.check_refused",
                    actor=actor,
                    retry_after=retry_after(wait),
                    detail="too many wrong password checks by this user: try again after "
                    "retry_after",
                )
                raise RpcStatusError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many wrong passwords checked; try again in {retry_after(wait)} s",
                )
            if request.version != version:
                raise failed_precondition(
                    f"the hash was made under password version {request.version}, not the "
                    f"version asked about ({version})"
                    if request.about or request.version > newest
                    else f"password version {newest} was staged meanwhile; check again"
                )
            if len(request.candidate_hash) != len(expected):
                # Malformed, not a wrong password: no audit row, not counted (s47rtin L7).
                raise invalid(
                    f"candidate_hash must be {len(expected)} bytes (dklen), got "
                    f"{len(request.candidate_hash)}"
                )
            reply.matches = hmac.compare_digest(request.candidate_hash, expected)
            # Counted with no await since the wait was checked: calls at once pass no more.
            if reply.matches:
                self._check_failures.reset(actor)
            else:
                self._check_failures.failed(actor, self.check_clock())
            log.info("password.checked", version=version, matches=reply.matches, actor=actor)
            try:  # the audit trail's; a full disk must not stop the check (notify's)
                await asyncio.to_thread(
                    self.state.store.record_event,
                    "password.checked",
                    actor,
                    f"password version {version}",
                    self.state.clock(),
                    matches=reply.matches,
                )
            except (sqlite3.Error, OSError) as exc:
                log.warning(
                    "password.check_not_audited",
                    error=" ".join(str(exc).split()),
                    hint="the check ran but its audit row was not written: check the disk under "
                    "the leader's data dir (df -h)",
                )
        return reply

    # --- tokens, nodes, CA --------------------------------------------------------------------

    @map_errors(ERRORS)
    @runs_to_end
    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Ctx
    ) -> admin_pb2.CreateTokenResponse:
        ttl = dt.timedelta(seconds=request.ttl_seconds or 3600)
        if ttl > MAX_TOKEN_TTL:
            raise invalid(f"a join token lives at most {MAX_TOKEN_TTL.days} days")
        uses = request.uses or 1
        if uses > 1:
            # A second use could never enrol: the node's enrolment supersedes every token of
            # the node with a use left, its own included (review s44rev3 L2: `token create`
            # refuses it since s44, an older CLI or another client did not). Tokens stored
            # with more uses stay as they are.
            raise invalid(
                f"uses {uses}: a join token enrols its node once (the enrolment supersedes it);"
                " ask for 1, and make a new token to enrol the node again"
            )
        description = free_text(request.description, "the token's description", 200)
        for name in (request.node_name, *request.dns_names):
            # the names are stored and listed (token list, nodes); a secret pasted as one is
            # refused for every caller, as the CLI's not_a_secret does (review s49sec2 L3)
            if (kind := whole_secret_kind(name)) is not None:
                raise invalid(
                    f"a node name or DNS name looks like {kind}; give the node's name and "
                    "its DNS names"
                )
        names = claimed_names(request.node_name, request.addresses, request.dns_names)
        token = JoinToken.generate()
        info = await asyncio.to_thread(
            self.state.store.add_token,
            token.id,
            token.secret,
            ttl=ttl,
            uses=uses,
            description=description,
            now=self.state.clock(),
            actor=_actor(context),
            node_name=names.common_name,
            addresses=names.ips,
            dns_names=names.dns,
            reserved=lambda: self.state.reserved_for(names.common_name),
        )
        log.info(
            "token.created",
            token_id=token.id,
            node=names.common_name,
            uses=uses,
            ttl_seconds=int(ttl.total_seconds()),
        )
        reply = admin_pb2.CreateTokenResponse(
            token=str(token), info=token_info(info), ca_pin=pki.spki_pin(self.state.ca.cert)
        )
        if self.endpoints is not None:
            reply.leader_address = self.endpoints.address
            reply.join_port = self.endpoints.join_port
            reply.control_port = self.endpoints.control_port
        return reply

    @map_errors(ERRORS)
    async def CheckNodes(
        self, request: admin_pb2.CheckNodesRequest, context: Ctx
    ) -> admin_pb2.CheckNodesResponse:
        if request.timeout_seconds > 60:
            raise invalid("timeout must be 1..60 seconds")
        if self.agent_credentials is None:
            raise failed_precondition("this leader makes no calls to agents")
        nodes = await asyncio.to_thread(self.state.store.list_nodes)
        checks = await check_nodes(
            nodes,
            self.agent_credentials,
            self.state.trust_domain,
            float(request.timeout_seconds or 5),
        )
        return admin_pb2.CheckNodesResponse(
            nodes=[
                admin_pb2.NodeHealthCheck(
                    name=c.name, target=c.target, health=NODE_HEALTH.wire(c.health), detail=c.detail
                )
                for c in checks
            ]
        )

    @map_errors(ERRORS)
    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: Ctx
    ) -> admin_pb2.ListTokensResponse:
        tokens = await asyncio.to_thread(self.state.store.list_tokens)
        return admin_pb2.ListTokensResponse(tokens=[token_info(t) for t in tokens])

    @map_errors(ERRORS)
    @runs_to_end
    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: Ctx
    ) -> admin_pb2.RevokeTokenResponse:
        _require_id(request.id, "join token", "tlsroll token list")
        info = await asyncio.to_thread(
            self.state.store.revoke_token,
            request.id,
            now=self.state.clock(),
            actor=_actor(context),
        )
        log.info("token.revoked", token_id=request.id)
        return admin_pb2.RevokeTokenResponse(info=token_info(info))

    def _node_info(
        self, n: Node, clocks: Mapping[str, tuple[float, bool, bool]] | None = None
    ) -> admin_pb2.NodeInfo:
        """``n`` as ``NodeInfo``; its clock from ``clocks`` (``NodeClocks.listing``, read once
        for every node listed; read now if not given)."""
        info = admin_pb2.NodeInfo(
            name=n.name,
            addresses=n.addresses,
            dns_names=n.dns_names,
            agent_version=n.agent_version,
            agent_port=n.agent_port,
            enrolled_at=timestamp(n.enrolled_at),
            last_heartbeat=timestamp(n.last_heartbeat),
            cert_not_after=timestamp(n.cert_not_after),
            cert_fingerprint=n.cert_fingerprint,
            online=self.state.node_online(n),
            identity=spiffe.node(self.state.trust_domain, n.name).uri,
            token_id=n.token_id,
            highest_epoch=n.highest_epoch,
            removed_at=timestamp(n.removed_at),
            server=self.state.live_servers.get(n.name, "") if n.removed_at is None else "",
            cert_serial=n.cert_serial,
            key_pin=n.key_pin,
            cert_renewed_at=timestamp(n.cert_renewed_at),
            renewal_due_at=timestamp(n.renewal_due_at),
            renewal_failing_since=timestamp(n.renewal_failing_since),
            renewal_error=n.renewal_error,
            agent_features=n.agent_features,
        )
        if n.removed_at is not None:
            return info  # (a removed node has no clock to show: nothing read for it)
        if (store := self.state.agent_store.get(n.name)) is not None:
            info.store_trouble.extend(store[1])  # (its agent's own store: session 74)
        # What the agent implements as its heartbeats said since this leader started
        # (``Store.features_heard``); of an agent not heard since, the store's row is a former
        # process's, which a kill may have left without its first heartbeat's report: no
        # verdict, "not heard since the leader started" (session 64: `tlsroll nodes` said
        # "too old for …" of a current agent until its first heartbeat, for good if its
        # heartbeats did not reach the leader). (A test's store without it: the row.)
        heard_of = getattr(self.state.store, "features_heard", None)
        heard = heard_of(n.name) if heard_of is not None else n.agent_features
        if heard is None:
            info.agent_not_heard = True
        else:
            info.agent_too_old_for.extend(agent_features.too_old_for(heard))
        if clocks is None:
            clocks = self.state.clocks.listing()
        clock = clocks.get(n.name)
        if clock is not None:
            # the leader's one verdict (``NodeClocks.listing``), as ``schema show`` has it
            info.clock_offset_seconds, info.clock_differs, info.clock_leader = clock
        return info

    @map_errors(ERRORS)
    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: Ctx
    ) -> admin_pb2.ListNodesResponse:
        nodes = await asyncio.to_thread(
            self.state.store.list_nodes, include_removed=request.include_removed
        )
        clocks = self.state.clocks.listing()
        infos = [self._node_info(n, clocks) for n in nodes]
        servers = {i.name: i.server for i in infos if not i.HasField("removed_at")}
        # (The certificates read only where one may be said: a node on https only. Not only
        # in a mixed cluster: one put on another certificate by hand is said too, s70 drift.)
        if any(https_only(s) for s in servers.values()):
            served = dict(self.state.served_fingerprints)
            other = await asyncio.to_thread(self.schema.other_certificates, servers, served)
            if mixed(servers) is None:  # only a certificate named (an older agent names none)
                other = frozenset(n for n in other if served.get(n))
            for info in infos:
                info.other_certificate = info.name in other and not info.HasField("removed_at")
        behind = await asyncio.to_thread(self.schema.password_behind)
        return admin_pb2.ListNodesResponse(
            nodes=infos,
            password_behind=behind_view(behind) if behind is not None else None,
        )

    @map_errors(ERRORS)
    @runs_to_end
    async def RemoveNode(
        self, request: admin_pb2.RemoveNodeRequest, context: Ctx
    ) -> admin_pb2.RemoveNodeResponse:
        active = await asyncio.to_thread(self.schema.active)
        if active is not None and request.name in {r.name for r in active.records}:
            held = await asyncio.to_thread(self.state.store.get_node, request.name)
            serials = await asyncio.to_thread(self.state.store.agent_serials, request.name)
            raise failed_precondition(
                in_rollout_text(
                    request.name,
                    active.rollout.id,
                    active.rollout.state.value,
                    held.addresses,
                    held.dns_names,
                    serials,
                )
            )
        node, serials = await asyncio.to_thread(
            self.state.store.remove_node,
            request.name,
            now=self.state.clock(),
            actor=_actor(context),
        )
        self.state.forget_node(node.name)  # no node problem of it is left
        # Info: the admin's own command (its audit entry and output say it), nothing to act on.
        log.info("node.removed", node=node.name, revoked=len(serials))
        return admin_pb2.RemoveNodeResponse(node=self._node_info(node), revoked_serials=serials)

    @map_errors(ERRORS)
    async def ListWorkstations(
        self, request: admin_pb2.ListWorkstationsRequest, context: Ctx
    ) -> admin_pb2.ListWorkstationsResponse:
        certs = await asyncio.to_thread(self.state.store.list_certificates, "workstation")
        return admin_pb2.ListWorkstationsResponse(
            workstations=[
                admin_pb2.WorkstationInfo(
                    name=c.subject,
                    serial=c.serial,
                    fingerprint=c.fingerprint,
                    node=c.node,
                    issued_at=timestamp(c.issued_at),
                    not_after=timestamp(c.not_after),
                    revoked_at=timestamp(c.revoked_at),
                    revoke_reason=c.revoke_reason,
                )
                for c in certs
            ]
        )

    @map_errors(ERRORS)
    @runs_to_end
    async def RevokeCertificate(
        self, request: admin_pb2.RevokeCertificateRequest, context: Ctx
    ) -> admin_pb2.RevokeCertificateResponse:
        reason = free_text(request.reason, "the reason", 200)
        own = await asyncio.to_thread(self._own_certs)
        ca_serials = await asyncio.to_thread(self.state.ca_serials)
        serials = await asyncio.to_thread(
            self.state.store.revoke,
            request.name_or_serial,
            reason=reason,
            now=self.state.clock(),
            actor=_actor(context),
            unknown=request.unknown,
            own=own,
            ca_serials=ca_serials,
            workstations_only=request.workstations_only,
        )
        try:
            served_by, until = await asyncio.to_thread(self._still_taken, serials)
        except Exception as exc:  # revoked all the same: the answer must say so
            log.error(
                "certificate.revoked_still_taken_failed",
                error=str(exc),
                hint="the revocation stands; tlsroll certs check-expiration shows whether a node"
                " still serves it",
            )
            served_by, until = [], None
        if served_by:
            # Nothing the node runs reads the revocation list: the CLI names the rotation
            # (before, "revoked", exit 0, and check-expiration said "ok": review s64 pki M1).
            log.warning(
                "certificate.revoked",
                serials=serials,
                served_by=served_by,
                hint="the node still serves it: tlsroll rollout start --change rotate-cert "
                "--nodes NODE",
            )
        else:
            log.info("certificate.revoked", serials=serials)
        not_reissued: list[str] = []
        if {c.serial for c in own} & set(serials):
            # The leader's or the viewer's: issued again (a new key) and served at once.
            for hook in self.own_revoked:
                try:
                    result = hook()
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:  # revoked all the same; the watch's next check tries
                    log.error(
                        "certificate.revoked_hook_failed",
                        error=_hook_error(exc),
                        detail=(
                            "the revocation stands, but the revoked certificate is not issued"
                            " again and is still served: the expiry watch tries again, and so"
                            " does the leader's next start; see `tlsroll certs"
                            " check-expiration` (review s69 revlogs L4)"
                        ),
                    )
            # Those still revoked: the CLI says so (before, "revoked", exit 0, and only
            # `certs check-expiration` told: review of s63-o1 L3).
            now_own = await asyncio.to_thread(self._own_certs)
            not_reissued = [c.kind for c in now_own if c.serial in serials]
        return admin_pb2.RevokeCertificateResponse(
            revoked_serials=serials,
            not_reissued=not_reissued,
            served_by=served_by,
            workstations_until=timestamp(until),
        )

    def _still_taken(self, serials: Sequence[str]) -> tuple[list[str], dt.datetime | None]:
        """Of certificates just revoked, what still takes them (blocking): the enrolled nodes
        that serve one of them on 8443 as the expiry watch lists them (``Expiry.revoked``),
        and the latest end of the workstation certificates among them not ended yet (a
        managed server that asks for client certificates reads no revocation list either);
        None if there is none."""
        revoked = set(serials)
        served = sorted(
            {e.subject for e in self.expiry.check() if e.kind == "server" and e.serial in revoked}
        )
        now = self.state.clock()
        ends = [
            c.not_after
            for c in self.state.store.list_certificates("workstation")
            if c.serial in revoked and c.not_after > now
        ]
        return served, max(ends, default=None)

    def _own_certs(self) -> list[OwnCert]:
        """The leader's own certificates as the expiry watch lists them (leader, viewer)."""
        return [
            OwnCert(
                kind,
                f"{cert.serial_number:x}",
                pki.fingerprint(cert),
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
            )
            for kind, cert in self.expiry.own_certs()
        ]

    async def _epochs(self) -> admin_pb2.EpochInfo:
        leader_epoch = await asyncio.to_thread(self.schema.current_epoch)
        nodes = await asyncio.to_thread(self.state.store.list_nodes)
        return admin_pb2.EpochInfo(
            leader_epoch=leader_epoch,
            nodes=[admin_pb2.NodeEpoch(name=n.name, highest_epoch=n.highest_epoch) for n in nodes],
            behind=any(n.highest_epoch > leader_epoch for n in nodes),
        )

    @map_errors(ERRORS)
    async def GetEpoch(
        self, request: admin_pb2.GetEpochRequest, context: Ctx
    ) -> admin_pb2.EpochInfo:
        return await self._epochs()

    @map_errors(ERRORS)
    @runs_to_end
    async def AdvanceEpoch(
        self, request: admin_pb2.AdvanceEpochRequest, context: Ctx
    ) -> admin_pb2.EpochInfo:
        """Raise the leader's epoch to the highest any node reports, so the next rollout's is
        above it. Refused while a rollout runs (its epoch is fixed)."""
        active = await asyncio.to_thread(self.schema.active)
        if active is not None:
            raise failed_precondition(
                f"rollout {active.rollout.id} is {active.rollout.state.value}; advance the "
                "epoch once it has ended"
            )
        before = await self._epochs()
        target = max([before.leader_epoch, *(n.highest_epoch for n in before.nodes)])
        floor = await asyncio.to_thread(
            self.state.store.advance_epoch, target, now=self.state.clock(), actor=_actor(context)
        )
        after = await self._epochs()
        if after.leader_epoch > before.leader_epoch:
            log.info("epoch.advanced", floor=floor, was=before.leader_epoch)
        else:  # no node ahead: a warning here said something moved (review s69 revlogs L3)
            log.info(
                "epoch.unchanged",
                epoch=after.leader_epoch,
                detail="no node reports an epoch above the leader's: nothing to advance",
            )
        return after

    @map_errors(ERRORS)
    @runs_to_end
    async def RenewCA(
        self, request: admin_pb2.RenewCARequest, context: Ctx
    ) -> admin_pb2.GetCAResponse:
        """Renew the CA certificate with the same key (``leader.ca_renewal``), unless a
        rollout has not ended (``Store.renew_ca``: its stages carry the CA certificate, and
        certificates it prepared ahead are cut to the old end), or while more than 9 years of
        it remain and it is not ``force``d (``ca_renewal.TooEarly``); then the leader serves,
        dials and issues with it (``ca_renewed``). Audited (``ca.renewed``)."""
        if self.layout is None:
            raise failed_precondition("this leader cannot renew its CA (no data directory)")
        active = await asyncio.to_thread(self.schema.active)
        if active is not None:
            raise RolloutHoldsCA(active.rollout.id, active.rollout.state.value)
        # Imported here, on the loop (an import in a worker thread can deadlock on 3.11's
        # import locks): a leader whose CA is never renewed does not hold it (issue 15).
        from leader import ca_renewal  # noqa: PLC0415

        layout, ca, now = self.layout, self.state.ca, self.state.clock()
        detail = await asyncio.to_thread(
            self.state.store.renew_ca,
            functools.partial(ca_renewal.prepare, layout, ca, now, force=request.force),
            now=now,
            actor=_actor(context),
        )
        log.info("ca.renewed", **detail)
        for hook in self.ca_renewed:
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # the renewal stands; the hook's work is done later
                log.error(
                    "ca.renewed_hook_failed",
                    error=str(exc),
                    detail="the CA renewal stands; the work that follows it is done later",
                )
        return await self.GetCA(admin_pb2.GetCARequest(), context)

    @map_errors(ERRORS)
    async def GetCA(self, request: admin_pb2.GetCARequest, context: Ctx) -> admin_pb2.GetCAResponse:
        ca = self.state.ca.cert
        now = self.state.clock()
        bundle = trust_bundle(self.state.ca)
        return admin_pb2.GetCAResponse(
            certificate_pem=self.state.ca.cert_pem,
            fingerprint=pki.fingerprint(ca),
            spki_pin=pki.spki_pin(ca),
            not_after=timestamp(ca.not_valid_after_utc),
            subject=ca.subject.rfc4514_string(),
            residual_seconds=int((ca.not_valid_after_utc - now).total_seconds()),
            bundle=[
                admin_pb2.TrustedCA(
                    subject=c.subject.rfc4514_string(),
                    fingerprint=pki.fingerprint(c),
                    spki_pin=pki.spki_pin(c),
                    not_before=timestamp(c.not_valid_before_utc),
                    not_after=timestamp(c.not_valid_after_utc),
                    residual_seconds=int((c.not_valid_after_utc - now).total_seconds()),
                    issuing=c == ca,
                )
                for c in bundle
            ],
            bundle_pem=b"".join(pki.cert_to_pem(c) for c in bundle),
        )

    @map_errors(ERRORS)
    async def CheckExpiration(
        self, request: admin_pb2.CheckExpirationRequest, context: Ctx
    ) -> admin_pb2.CheckExpirationResponse:
        now = self.state.clock()
        entries = await asyncio.to_thread(self.expiry.check)
        reply = admin_pb2.CheckExpirationResponse(checked_at=timestamp(now))
        for e in entries:
            warning = e.warning(now)
            reply.certificates.append(
                admin_pb2.CertificateExpiry(
                    kind=e.kind,
                    subject=e.subject,
                    serial=e.serial,
                    fingerprint=e.fingerprint,
                    not_after=timestamp(e.not_after),
                    residual_seconds=int(e.residual(now).total_seconds()),
                    horizon_seconds=int(e.horizon.total_seconds()),
                    warning=warning,
                    advice=e.advice if warning or e.revoked else "",
                    revoked=e.revoked,
                )
            )
            reply.warning |= warning or e.revoked
        return reply

    # --- the web viewer's read-only grants ----------------------------------------------------

    @map_errors(ERRORS)
    @runs_to_end
    async def CreateViewerGrant(
        self, request: admin_pb2.CreateViewerGrantRequest, context: Ctx
    ) -> admin_pb2.CreateViewerGrantResponse:
        if not self.viewer_url:
            raise failed_precondition(
                "the web viewer is off (viewer_port = 0 in leader.toml); set a port and "
                "restart tlsroll-leader"
            )
        ttl = dt.timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None
        ttl = ttl or DEFAULT_VIEWER_TTL
        if ttl > MAX_VIEWER_TTL:
            raise invalid(f"a viewer grant lives at most {MAX_VIEWER_TTL.days} days")
        name = free_text(request.name, "the grant's name", MAX_VIEWER_NAME)
        now = self.state.clock()
        made = await asyncio.to_thread(
            self.grants.create, name, ttl=ttl, now=now, actor=_actor(context)
        )
        log.info(
            "viewer_grant.created",
            grant_id=made.grant.id,
            ttl_seconds=int(ttl.total_seconds()),
            actor=made.grant.created_by,
        )
        return admin_pb2.CreateViewerGrantResponse(
            login_url=f"{self.viewer_url}/login/{made.secret}", info=grant_info(made.grant, now)
        )

    @map_errors(ERRORS)
    async def ListViewerGrants(
        self, request: admin_pb2.ListViewerGrantsRequest, context: Ctx
    ) -> admin_pb2.ListViewerGrantsResponse:
        grants = await asyncio.to_thread(self.grants.all)
        now = self.state.clock()
        return admin_pb2.ListViewerGrantsResponse(grants=[grant_info(g, now) for g in grants])

    @map_errors(ERRORS)
    @runs_to_end
    async def RevokeViewerGrant(
        self, request: admin_pb2.RevokeViewerGrantRequest, context: Ctx
    ) -> admin_pb2.RevokeViewerGrantResponse:
        _require_id(request.id, "viewer grant", "tlsroll viewer list")
        now = self.state.clock()
        grant = await asyncio.to_thread(
            self.grants.revoke, request.id, now=now, actor=_actor(context)
        )
        if not grant.signed_out:  # (else it had ended by its sign-out: nothing done)
            log.info("viewer_grant.revoked", grant_id=grant.id)
        return admin_pb2.RevokeViewerGrantResponse(info=grant_info(grant, now))
