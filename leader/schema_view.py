"""The read-only schema: records → protobuf views, and the SchemaView servicer.

Nothing here writes: the servicer only reads the schema store (a test compares the store
before and after a call to prove it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from leader.schema_store import BootstrapFailureRow, RolloutRow, SchemaStore
from leader.wire import CHANGE, FREEZE, NODE_STATE, ROLLOUT_STATE, SCOPE_KIND, STRATEGY
from tlsroll.rpc import map_errors, not_found, timestamp
from tlsroll.sqlite import from_text
from tlsroll.v1 import schema_pb2, schema_pb2_grpc

if TYPE_CHECKING:
    from leader.expiry import ExpiryWatch

Ctx = grpc.aio.ServicerContext[Any, Any]


def rollout_view(row: RolloutRow, pending: set[str] | None = None) -> schema_pb2.RolloutView:
    """The view of one rollout; ``pending`` names nodes with a staged, not yet live password."""
    r, meta = row.rollout, row.meta
    nodes = []
    for rec, d in row.nodes:
        steps = [
            schema_pb2.StepTimes(
                step=step,
                started_at=timestamp(dt.datetime.fromisoformat(a)) if a else None,
                ended_at=timestamp(dt.datetime.fromisoformat(b)) if b else None,
            )
            for step, (a, b) in d.steps.items()
        ]
        nodes.append(
            schema_pb2.NodeView(
                name=rec.name,
                state=NODE_STATE.wire(rec.state),
                reason=rec.reason,
                old_url=d.old_url,
                new_url=d.new_url,
                cert_fingerprint=d.cert_fingerprint,
                cert_not_after=timestamp(d.cert_not_after),
                freeze_started_at=timestamp(d.freeze_started_at),
                freeze_ended_at=timestamp(d.freeze_ended_at),
                restart_seconds=d.restart_seconds,
                steps=steps,
                leader_node=rec.name == meta.leader_node,
                bootstrap_port=d.bootstrap_port,
                password_pending=rec.name in (pending or set()),
            )
        )
    return schema_pb2.RolloutView(
        id=r.id,
        change=CHANGE.wire(r.change),
        scope=SCOPE_KIND.wire(r.scope.kind),
        scope_nodes=list(r.scope.names),
        strategy=STRATEGY.wire(r.strategy),
        max_parallel=r.max_parallel,
        failure_budget=r.failure_budget,
        freeze=FREEZE.wire(r.freeze),
        epoch=r.epoch,
        state=ROLLOUT_STATE.wire(r.state),
        created_at=timestamp(meta.created_at),
        started_at=timestamp(meta.started_at),
        ended_at=timestamp(meta.ended_at),
        started_by=meta.started_by,
        nodes=nodes,
        reason=meta.reason,
        undoes=meta.undoes,
    )


def failure_view(row: BootstrapFailureRow) -> schema_pb2.BootstrapFailureView:
    return schema_pb2.BootstrapFailureView(
        node=row.node,
        source=row.source,
        workstation=row.workstation,
        count=min(row.count, 2**32 - 1),
        first_at=timestamp(row.first_at),
        last_at=timestamp(row.last_at),
    )


def schema_message(
    rows: list[RolloutRow],
    pending: set[str],
    now: dt.datetime,
    failures: Sequence[BootstrapFailureRow] = (),
    removed: Sequence[tuple[str, tuple[str, ...], dt.datetime]] = (),
    revoked: Sequence[Any] = (),
    expiring: Sequence[Any] = (),
    renewal_failures: Sequence[tuple[str, dt.datetime, str, dt.datetime]] = (),
) -> schema_pb2.Schema:
    """The whole schema as ``GetSchema`` answers it (and ``schema show --json`` prints it).
    ``expiring``: ``leader.expiry.Expiry`` within their horizon; ``renewal_failures``: (node,
    failing since, reason, its certificate's end)."""
    return schema_pb2.Schema(
        rollouts=[rollout_view(r, pending) for r in rows],
        generated_at=timestamp(now),
        bootstrap_failures=[failure_view(f) for f in failures],
        removed_nodes=[
            schema_pb2.RemovedNodeView(name=name, addresses=addresses, removed_at=timestamp(at))
            for name, addresses, at in removed
        ],
        revoked_certificates=[
            schema_pb2.RevokedCertificateView(
                serial=r["serial"],
                kind=r["kind"],
                subject=r["subject"],
                node=r["node"],
                revoked_at=timestamp(from_text(r["revoked_at"])),
                reason=r["revoke_reason"],
                not_after=timestamp(from_text(r["not_after"])),
            )
            for r in revoked
        ],
        expiring_certificates=[
            schema_pb2.ExpiringCertificateView(
                kind=e.kind,
                subject=e.subject,
                serial=e.serial,
                not_after=timestamp(e.not_after),
                residual_seconds=int(e.residual(now).total_seconds()),
            )
            for e in expiring
        ],
        renewal_failures=[
            schema_pb2.RenewalFailureView(
                node=node,
                failing_since=timestamp(since),
                reason=reason,
                cert_not_after=timestamp(not_after),
            )
            for node, since, reason, not_after in renewal_failures
        ],
    )


class SchemaViewService(schema_pb2_grpc.SchemaViewServicer):
    def __init__(
        self,
        schema: SchemaStore,
        clock: Callable[[], dt.datetime],
        expiry: ExpiryWatch | None = None,
    ) -> None:
        self.schema = schema
        self.clock = clock
        self.expiry = expiry

    @map_errors({})
    async def GetSchema(
        self, request: schema_pb2.GetSchemaRequest, context: Ctx
    ) -> schema_pb2.Schema:
        if request.rollout_id:
            row = await asyncio.to_thread(self.schema.get, request.rollout_id)
            if row is None:
                raise not_found(f"no rollout {request.rollout_id!r} (see: tlsroll schema show)")
            rows, total = [row], 0
        elif request.limit:
            rows, total = await asyncio.to_thread(self.schema.newest, request.limit)
        else:
            rows = await asyncio.to_thread(self.schema.all)
            total = len(rows)
        pending = await asyncio.to_thread(self.schema.pending_password_nodes)
        now = self.clock()
        if request.rollouts_only:
            message = schema_message(rows, pending, now)
        else:
            failures = await asyncio.to_thread(self.schema.bootstrap_failures)
            removed = await asyncio.to_thread(self.schema.removed_nodes)
            revoked = await asyncio.to_thread(self.schema.revoked_certificates, now)
            expiring: list[Any] = []
            renewals: list[Any] = []
            if self.expiry is not None:
                expiring = await asyncio.to_thread(self.expiry.warnings)
                renewals = await asyncio.to_thread(self.expiry.renewal_failures)
            message = schema_message(
                rows, pending, now, failures, removed, revoked, expiring, renewals
            )
        if total > len(rows):  # only when some were left out (else as the viewer's API)
            message.total_rollouts = total
        return message
