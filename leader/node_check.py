"""``tlsroll nodes --check``: the leader asks each node's agent for its standard gRPC health.

The call is ``grpc.health.v1.Health/Check`` on the NodeAgent port, mutual TLS with the leader's
own certificate and, as for every call to an agent (``leader.agent_client``), the node's key
name as the TLS target: only the key that enrolled answers. The leader makes the calls (the
admin CLI cannot read the leader's key, ``DATA/tls`` is the leader user's alone) and the CLI asks
for them over the admin socket (``Admin.CheckNodes``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from leader.states import Health
from tlsroll import peertext, spiffe

if TYPE_CHECKING:  # not the store or logging
    from leader.store import Node

UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class NodeCheck:
    name: str
    target: str
    health: Health
    detail: str = ""


async def check_node(
    node: Node, credentials: grpc.ChannelCredentials, trust_domain: str, timeout: float
) -> NodeCheck:
    from tlsroll.rpc import hostport  # noqa: PLC0415 - see the TYPE_CHECKING note above

    target = hostport(node.addresses[0], node.agent_port)
    options = [("grpc.ssl_target_name_override", spiffe.key_host(trust_domain, node.key_pin))]
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            health = Health.UNREACHABLE if code in UNREACHABLE_CODES else Health.NOT_SERVING
            detail = peertext.clean(f"{code.name}: {exc.details() or ''}", 300)
            return NodeCheck(node.name, target, health, detail)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return NodeCheck(node.name, target, Health.SERVING)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return NodeCheck(node.name, target, Health.NOT_SERVING, status)


async def check_nodes(
    nodes: Iterable[Node],
    credentials: grpc.ChannelCredentials,
    trust_domain: str,
    timeout: float,
) -> list[NodeCheck]:
    """Every node at once, each within ``timeout`` seconds; in the order given."""
    return list(
        await asyncio.gather(*(check_node(n, credentials, trust_domain, timeout) for n in nodes))
    )
