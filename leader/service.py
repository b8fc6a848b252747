"""The leader's gRPC servicers: Enrolment (join port), Leader (mTLS port), Admin (Unix socket).

Each listener serves only the service meant for its level of trust: a caller on the join port
has a token at best, a caller on the control port has a node certificate, a caller on the
admin socket is an administrator.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from leader.engine import Engine, RolloutRequest
from leader.planner import NodesOffline, PlanError
from leader.rollout_core import Change, FreezeMode, IllegalTransition, Scope
from leader.schema_store import NodeDetail, RolloutBusy, RolloutMeta, RolloutRow
from leader.schema_view import rollout_view
from leader.store import NameTaken, NodeCert, NotFound, Store, TokenRejected
from leader.tokens import JoinToken, MalformedToken
from tlsroll import bootstrap_protocol, logs, pki
from tlsroll.errors import PKIError
from tlsroll.rpc import invalid, map_errors, peer_name, timestamp, unauthenticated
from tlsroll.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    enrolment_pb2,
    enrolment_pb2_grpc,
    leader_pb2,
    leader_pb2_grpc,
    schema_pb2,
)

log = logs.get_logger("tlsroll.leader")

Ctx = grpc.aio.ServicerContext[Any, Any]

ERRORS = {
    bootstrap_protocol.BootstrapError: grpc.StatusCode.INVALID_ARGUMENT,
    PlanError: grpc.StatusCode.INVALID_ARGUMENT,
    NodesOffline: grpc.StatusCode.FAILED_PRECONDITION,
    RolloutBusy: grpc.StatusCode.FAILED_PRECONDITION,
    IllegalTransition: grpc.StatusCode.FAILED_PRECONDITION,
    TokenRejected: grpc.StatusCode.UNAUTHENTICATED,
    MalformedToken: grpc.StatusCode.INVALID_ARGUMENT,
    PKIError: grpc.StatusCode.INVALID_ARGUMENT,
    NameTaken: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
}

MAX_TOKEN_TTL = dt.timedelta(days=7)
OFFLINE_AFTER_HEARTBEATS = 3


@dataclass
class LeaderState:
    """What the servicers share: the store, the CA, the clock and a few settings."""

    store: Store
    ca: pki.CertificateAuthority
    clock: Callable[[], dt.datetime]
    heartbeat_interval: int

    def online(self, last_heartbeat: dt.datetime | None) -> bool:
        if last_heartbeat is None:
            return False
        silence = self.clock() - last_heartbeat
        return silence <= dt.timedelta(seconds=self.heartbeat_interval * OFFLINE_AFTER_HEARTBEATS)


def _claimed_names(request: enrolment_pb2.EnrolRequest) -> pki.Names:
    name = request.node_name
    if problem := pki.node_name_problem(name):
        raise invalid(problem)
    if not request.addresses:
        raise invalid("a node needs at least one IP address")
    try:
        return pki.Names.of(name, request.addresses, request.dns_names)
    except ValueError as exc:
        raise invalid(f"bad address: {exc}") from None


class EnrolmentService(enrolment_pb2_grpc.EnrolmentServicer):
    def __init__(self, state: LeaderState) -> None:
        self.state = state

    @map_errors(ERRORS)
    async def Enrol(
        self, request: enrolment_pb2.EnrolRequest, context: Ctx
    ) -> enrolment_pb2.EnrolResponse:
        token = JoinToken.parse(request.token)
        names = _claimed_names(request)
        if not 1 <= request.agent_port <= 65535:
            raise invalid("agent_port must be 1..65535")
        csr = pki.load_csr_pem(request.csr_pem)
        public_key = pki.check_csr(csr, names)
        issued: list[Any] = []

        def issue() -> NodeCert:
            cert = self.state.ca.issue(public_key, names, server=True, client=True)
            issued.append(cert)
            return NodeCert(
                key_pin=pki.spki_pin(public_key),
                fingerprint=pki.fingerprint(cert),
                serial=f"{cert.serial_number:x}",
                not_after=cert.not_valid_after_utc,
            )

        try:
            await asyncio.to_thread(
                self.state.store.enrol,
                token_id=token.id,
                secret=token.secret,
                name=names.common_name,
                addresses=names.ips,
                dns_names=names.dns,
                agent_version=request.agent_version,
                agent_port=request.agent_port,
                key_pin=pki.spki_pin(public_key),
                issue=issue,
                now=self.state.clock(),
            )
        except (TokenRejected, NameTaken) as exc:
            log.warning(
                "enrol.refused",
                node=names.common_name,
                token_id=token.id,
                reason=str(exc),
                peer=context.peer(),
            )
            raise
        log.info(
            "enrol.accepted", node=names.common_name, token_id=token.id, addresses=list(names.ips)
        )
        return enrolment_pb2.EnrolResponse(
            certificate_pem=pki.cert_to_pem(issued[0]), ca_certificate_pem=self.state.ca.cert_pem
        )


class LeaderService(leader_pb2_grpc.LeaderServicer):
    def __init__(self, state: LeaderState) -> None:
        self.state = state

    async def _caller(self, context: Ctx) -> str:
        """The enrolled node calling, checked against the certificate on record."""
        name, cert = peer_name(context)
        try:
            node = await asyncio.to_thread(self.state.store.get_node, name)
        except NotFound:
            raise unauthenticated(f"{name!r} is not an enrolled node") from None
        if pki.fingerprint(cert) != node.cert_fingerprint:
            raise unauthenticated(f"certificate is not the one on record for node {name!r}")
        return name

    @map_errors(ERRORS)
    async def Heartbeat(
        self, request: leader_pb2.HeartbeatRequest, context: Ctx
    ) -> leader_pb2.HeartbeatResponse:
        name = await self._caller(context)
        now = self.state.clock()
        await asyncio.to_thread(self.state.store.heartbeat, name, request.agent_version, now=now)
        return leader_pb2.HeartbeatResponse(
            leader_time=timestamp(now), interval_seconds=self.state.heartbeat_interval
        )

    @map_errors(ERRORS)
    async def SignWorkstationCertificate(
        self, request: leader_pb2.SignWorkstationRequest, context: Ctx
    ) -> leader_pb2.SignWorkstationResponse:
        """A node's bootstrap service has checked the workstation's password proof; the
        leader signs a client-only certificate naming nothing but ``ws-<name>``."""
        node = await self._caller(context)
        key, cn = bootstrap_protocol.check_workstation_csr(request.csr_pem)
        cert = self.state.ca.issue(
            key,
            bootstrap_protocol.workstation_names(cn),
            server=False,
            client=True,
            now=self.state.clock(),
        )
        await asyncio.to_thread(
            self.state.store.record_event,
            "workstation.enrolled",
            f"node:{node}",
            cn,
            self.state.clock(),
            fingerprint=pki.fingerprint(cert),
        )
        log.info("workstation.enrolled", node=node, workstation=cn)
        return leader_pb2.SignWorkstationResponse(certificate_pem=pki.cert_to_pem(cert))


def _actor(context: Ctx) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-tlsroll-user" and isinstance(value, str) and value.isprintable():
            return f"admin:{value[:64]}"
    return f"admin:{getpass.getuser()}"


def token_info(t: Any) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        id=t.id,
        created_at=timestamp(t.created_at),
        expires_at=timestamp(t.expires_at),
        uses_allowed=t.uses_allowed,
        uses_left=t.uses_left,
        revoked=t.revoked_at is not None,
        description=t.description,
    )


SEED_WARNINGS = (
    "The switch restarts the managed server on each node.",
    "All connected clients must re-initiate their server connections afterwards.",
    "No new entries can be made at the clients while a node switches (writes are refused "
    "with 503 during the freeze, so no data is lost).",
)
CHECKS = (
    "preflight: managed server healthy; ports 8443 and 9443 free on the node; config "
    "directory writable; clock within 120 s of the leader; certificate names known",
    "stage: node key made on the node, CSR signed by the cluster CA, stored inactive",
    "switch: freeze writes, write new config atomically, restart, verify https with the "
    "staged certificate and 8080 closed, write watermark unchanged, unfreeze; else roll back",
    "confirm: the leader checks https from outside trusting only the cluster CA",
)
CLIENT_STEPS = (
    "Admin -> change server address to the new https address of the node",
    "Test connection; confirm the port prompt for 9443 (or the port shown)",
    "enter the authentication password",
    "restart the client",
)


def rollout_request(request: admin_pb2.RolloutRequest) -> RolloutRequest:
    try:
        change = Change(request.change or "enable-tls")
    except ValueError:
        raise invalid(f"unknown change {request.change!r}") from None
    kind = request.scope or ("nodes" if request.nodes else "")
    if change is Change.DISABLE_TLS:
        if request.scope or request.nodes:
            raise invalid("disable-tls takes its nodes from the rollout it takes back")
        scope = Scope.cluster()  # replaced by the engine with the nodes that rollout switched
    elif kind == "local":
        scope = Scope.local()
    elif kind == "cluster":
        scope = Scope.cluster()
    elif kind == "nodes" and request.nodes:
        scope = Scope.of_nodes(request.nodes)
    else:
        raise invalid(f"unknown scope {request.scope!r}: use local, cluster or a node list")
    try:
        freeze = FreezeMode(request.freeze or "node")
    except ValueError:
        raise invalid(f"unknown freeze mode {request.freeze!r}: use node or scope") from None
    if not 1 <= (request.max_parallel or 1) <= 200:
        raise invalid("max-parallel must be 1..200")
    return RolloutRequest(
        change=change,
        scope=scope,
        max_parallel=request.max_parallel or 1,
        failure_budget=request.failure_budget,
        auth_verifier_json=request.auth_verifier_json or None,
        freeze=freeze,
        undo_rollout_id=request.undo_rollout_id or None,
    )


class RolloutAdmin:
    """The rollout part of the Admin service (mixed into AdminService)."""

    engine: Engine | None

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("no rollout engine")
        return self.engine

    @map_errors(ERRORS)
    async def PlanRollout(
        self, request: admin_pb2.RolloutRequest, context: Ctx
    ) -> admin_pb2.PlanResponse:
        engine = self._engine()
        req = rollout_request(request)
        rollout, nodes = await asyncio.to_thread(engine.plan, req)

        now = engine.clock()
        warnings = list(SEED_WARNINGS)
        active = await asyncio.to_thread(engine.schema.active)
        if active is not None:
            warnings.append(
                f"rollout {active.rollout.id} is {active.rollout.state.value}: a new one "
                "cannot start until it has ended"
            )
        row = RolloutRow(
            rollout,
            RolloutMeta(
                created_at=now, started_by=_actor(context), leader_node=engine.leader_node or ""
            ),
            tuple((n, NodeDetail()) for n in nodes),
        )
        return admin_pb2.PlanResponse(
            rollout=rollout_view(row),
            checks=CHECKS,
            client_steps=CLIENT_STEPS,
            warnings=warnings,
        )

    @map_errors(ERRORS)
    async def StartRollout(
        self, request: admin_pb2.RolloutRequest, context: Ctx
    ) -> schema_pb2.RolloutView:
        engine = self._engine()
        row = await asyncio.to_thread(engine.start, rollout_request(request), _actor(context))
        return rollout_view(row)

    @map_errors(ERRORS)
    async def ControlRollout(
        self, request: admin_pb2.ControlRolloutRequest, context: Ctx
    ) -> schema_pb2.RolloutView:
        if request.action not in ("pause", "resume", "abort"):
            raise invalid(f"unknown action {request.action!r}: use pause, resume or abort")
        engine = self._engine()
        row = await asyncio.to_thread(
            engine.control, request.rollout_id, request.action, _actor(context)
        )
        return rollout_view(row)

    @map_errors(ERRORS)
    async def SetPassword(
        self, request: admin_pb2.SetPasswordRequest, context: Ctx
    ) -> admin_pb2.SetPasswordResponse:
        engine = self._engine()
        version, pending = await asyncio.to_thread(
            engine.stage_password, request.auth_verifier_json, _actor(context)
        )
        return admin_pb2.SetPasswordResponse(version=version, pending_nodes=sorted(pending))


class AdminService(RolloutAdmin, admin_pb2_grpc.AdminServicer):
    def __init__(self, state: LeaderState, engine: Engine | None = None) -> None:
        self.state = state
        self.engine = engine

    @map_errors(ERRORS)
    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Ctx
    ) -> admin_pb2.CreateTokenResponse:
        ttl = dt.timedelta(seconds=request.ttl_seconds or 3600)
        if ttl > MAX_TOKEN_TTL:
            raise invalid(f"a join token lives at most {MAX_TOKEN_TTL.days} days")
        uses = request.uses or 1
        if uses > 1000:
            raise invalid("a join token allows at most 1000 uses")
        token = JoinToken.generate()
        info = await asyncio.to_thread(
            self.state.store.add_token,
            token.id,
            token.secret,
            ttl=ttl,
            uses=uses,
            description=request.description[:200],
            now=self.state.clock(),
            actor=_actor(context),
        )
        log.info(
            "token.created", token_id=token.id, uses=uses, ttl_seconds=int(ttl.total_seconds())
        )
        return admin_pb2.CreateTokenResponse(token=str(token), info=token_info(info))

    @map_errors(ERRORS)
    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: Ctx
    ) -> admin_pb2.ListTokensResponse:
        tokens = await asyncio.to_thread(self.state.store.list_tokens)
        return admin_pb2.ListTokensResponse(tokens=[token_info(t) for t in tokens])

    @map_errors(ERRORS)
    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: Ctx
    ) -> admin_pb2.RevokeTokenResponse:
        info = await asyncio.to_thread(
            self.state.store.revoke_token,
            request.id,
            now=self.state.clock(),
            actor=_actor(context),
        )
        log.info("token.revoked", token_id=request.id)
        return admin_pb2.RevokeTokenResponse(info=token_info(info))

    @map_errors(ERRORS)
    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: Ctx
    ) -> admin_pb2.ListNodesResponse:
        nodes = await asyncio.to_thread(self.state.store.list_nodes)
        return admin_pb2.ListNodesResponse(
            nodes=[
                admin_pb2.NodeInfo(
                    name=n.name,
                    addresses=n.addresses,
                    dns_names=n.dns_names,
                    agent_version=n.agent_version,
                    agent_port=n.agent_port,
                    enrolled_at=timestamp(n.enrolled_at),
                    last_heartbeat=timestamp(n.last_heartbeat),
                    cert_not_after=timestamp(n.cert_not_after),
                    cert_fingerprint=n.cert_fingerprint,
                    online=self.state.online(n.last_heartbeat),
                )
                for n in nodes
            ]
        )

    @map_errors(ERRORS)
    async def GetCA(self, request: admin_pb2.GetCARequest, context: Ctx) -> admin_pb2.GetCAResponse:
        ca = self.state.ca.cert
        return admin_pb2.GetCAResponse(
            certificate_pem=self.state.ca.cert_pem,
            fingerprint=pki.fingerprint(ca),
            spki_pin=pki.spki_pin(ca),
            not_after=timestamp(ca.not_valid_after_utc),
            subject=ca.subject.rfc4514_string(),
        )
