"""The leader's enums on the wire: one codec per closed set (see ``tlsroll.wire``).

Servicers read a request's enums with ``CODEC.read(number, field)`` (``WireError`` →
INVALID_ARGUMENT) and write replies with ``CODEC.wire(value)``; nothing past this boundary
compares protobuf numbers or strings.
"""

from __future__ import annotations

from leader.rollout_core import (
    FreezeMode,
    NodeState,
    RolloutAction,
    RolloutState,
    ScopeKind,
    Strategy,
)
from leader.states import GrantState, Health
from tlsroll.v1 import admin_pb2, types_pb2
from tlsroll.wire import CHANGE, TXN_KIND, TXN_OUTCOME, EnumCodec

__all__ = ["CHANGE", "TXN_KIND", "TXN_OUTCOME"]

SCOPE_KIND = EnumCodec(ScopeKind, types_pb2.ScopeKind)
STRATEGY = EnumCodec(Strategy, types_pb2.Strategy)
FREEZE = EnumCodec(FreezeMode, types_pb2.FreezeMode)
ROLLOUT_STATE = EnumCodec(RolloutState, types_pb2.RolloutState)
NODE_STATE = EnumCodec(NodeState, types_pb2.NodeState)
ROLLOUT_ACTION = EnumCodec(RolloutAction, admin_pb2.RolloutAction)
VIEWER_GRANT_STATE = EnumCodec(GrantState, admin_pb2.ViewerGrantState)
NODE_HEALTH = EnumCodec(Health, admin_pb2.NodeHealth)
