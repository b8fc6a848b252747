"""The agent's gRPC servicer (NodeAgent), served over mutual TLS to the leader only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from nodeagent.identity import Identity
from tlsroll import __version__
from tlsroll.defaults import LEADER_NAME
from tlsroll.rpc import map_errors, peer_name, permission_denied
from tlsroll.v1 import agent_pb2, agent_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
ERRORS: dict[type[BaseException], grpc.StatusCode] = {}


def ts(t: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(t)
    return out


def require_leader(context: Ctx) -> None:
    """Only the leader may command an agent; other nodes hold certificates of the same CA."""
    name, _cert = peer_name(context)
    if name != LEADER_NAME:
        raise permission_denied(f"{name!r} is not the leader; only the leader may call NodeAgent")


class NodeAgentService(agent_pb2_grpc.NodeAgentServicer):
    def __init__(
        self, node_name: str, identity: Identity, clock: Callable[[], dt.datetime]
    ) -> None:
        self.node_name = node_name
        self.identity = identity
        self.clock = clock

    @map_errors(ERRORS)
    async def GetStatus(
        self, request: agent_pb2.GetStatusRequest, context: Ctx
    ) -> agent_pb2.NodeStatus:
        require_leader(context)
        return agent_pb2.NodeStatus(
            node_name=self.node_name,
            agent_version=__version__,
            cert_not_after=ts(self.identity.cert.not_valid_after_utc),
            agent_time=ts(self.clock()),
        )
