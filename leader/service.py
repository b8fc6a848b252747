"""The leader's gRPC servicers for the nodes: Enrolment (join port) and Leader (mTLS port), and
the error map every leader servicer uses (``ERRORS``; ``admin_service`` has the Admin one).

Each listener serves only the service meant for its level of trust: a caller on the join port
has a token at best, a caller on the control port has a node certificate, a caller on the
admin socket is an administrator.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from leader import join_guard
from leader.commands import NoRolloutYet, NoSuchRollout
from leader.planner import AlreadyUndone, EmptyScope, NodesOffline, PlanError
from leader.rollout_core import IllegalTransition
from leader.schema_store import BootstrapFailureRow, RolloutBusy, SchemaStore, StaleRecords
from leader.store import NameTaken, NodeCert, NotFound, Store, TokenRejected
from leader.tokens import JoinToken, MalformedToken
from tlsroll import bootstrap_protocol, logs, peertext, pki
from tlsroll.errors import PKIError
from tlsroll.rpc import invalid, map_errors, peer_name, timestamp, unauthenticated
from tlsroll.v1 import enrolment_pb2, enrolment_pb2_grpc, leader_pb2, leader_pb2_grpc

log = logs.get_logger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

ERRORS = {
    NoSuchRollout: grpc.StatusCode.NOT_FOUND,
    NoRolloutYet: grpc.StatusCode.FAILED_PRECONDITION,
    bootstrap_protocol.BootstrapError: grpc.StatusCode.INVALID_ARGUMENT,
    PlanError: grpc.StatusCode.INVALID_ARGUMENT,
    NodesOffline: grpc.StatusCode.FAILED_PRECONDITION,
    EmptyScope: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyUndone: grpc.StatusCode.FAILED_PRECONDITION,
    StaleRecords: grpc.StatusCode.ABORTED,
    RolloutBusy: grpc.StatusCode.FAILED_PRECONDITION,
    IllegalTransition: grpc.StatusCode.FAILED_PRECONDITION,
    TokenRejected: grpc.StatusCode.UNAUTHENTICATED,
    MalformedToken: grpc.StatusCode.INVALID_ARGUMENT,
    PKIError: grpc.StatusCode.INVALID_ARGUMENT,
    NameTaken: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
}

"""Most specific class wins (``tlsroll.rpc.status_for``): NodesOffline is a PlanError, and
FAILED_PRECONDITION, not INVALID_ARGUMENT."""

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
        self.guard = join_guard.JoinGuard()  # per-source backoff, sampled logs

    @map_errors(ERRORS)
    @join_guard.guarded
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
        except NameTaken as exc:  # a refused token is logged (sampled) by join_guard
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


MAX_FAILURE_REPORTS = 64  # per heartbeat; the agent sends at most that many
MAX_FAILURE_COUNT = 1_000_000  # per source and report


def failure_rows(
    node: str, reports: Sequence[leader_pb2.BootstrapFailure], now: dt.datetime
) -> list[BootstrapFailureRow]:
    """What ``node``'s agent reported about failed bootstrap passwords, made safe to store and
    print: at most 64 sources, strings bounded and without control characters, counts bounded,
    no time later than ``now``."""
    rows = []
    for f in reports[:MAX_FAILURE_REPORTS]:
        source = peertext.clean(f.source, 64)
        if not source or f.count <= 0:
            continue
        last = f.last_at.ToDatetime(tzinfo=dt.UTC) if f.HasField("last_at") else now
        rows.append(
            BootstrapFailureRow(
                node=node,
                source=source,
                workstation=peertext.clean(f.workstation, 63),
                count=min(f.count, MAX_FAILURE_COUNT),
                first_at=min(last, now),
                last_at=min(last, now),
            )
        )
    return rows


class LeaderService(leader_pb2_grpc.LeaderServicer):
    def __init__(self, state: LeaderState) -> None:
        self.state = state
        self.schema = SchemaStore(state.store.db)

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
        failures = failure_rows(name, request.bootstrap_failures, now)
        if failures:
            await asyncio.to_thread(self.schema.record_bootstrap_failures, name, failures, now)
            for f in failures:
                log.warning(
                    "bootstrap.failures_reported",
                    node=name,
                    source=f.source,
                    workstation=f.workstation,
                    count=f.count,
                )
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
