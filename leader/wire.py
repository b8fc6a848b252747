"""The leader's enums on the wire: one codec per closed set (see ``tlsroll.wire``).

Servicers read a request's enums with ``CODEC.read(number, field)`` (``WireError`` →
INVALID_ARGUMENT) and write replies with ``CODEC.wire(value)``; nothing past this boundary
compares protobuf numbers or strings.

The schema views' codecs live in ``leader.schema_wire`` (``tlsroll schema show`` imports only
those) and are re-exported here with the Admin service's own.
"""

from __future__ import annotations

from leader.rollout_core import RolloutAction
from leader.schema_wire import (
    FREEZE,
    NODE_PROBLEM_KIND,
    NODE_STATE,
    ROLLOUT_STATE,
    SCOPE_KIND,
    STRATEGY,
)
from leader.states import GrantState, Health
from tlsroll.v1 import admin_pb2
from tlsroll.wire import CHANGE, TXN_KIND, TXN_OUTCOME, EnumCodec

__all__ = [
    "CHANGE",
    "FREEZE",
    "NODE_PROBLEM_KIND",
    "NODE_STATE",
    "ROLLOUT_STATE",
    "SCOPE_KIND",
    "STRATEGY",
    "TXN_KIND",
    "TXN_OUTCOME",
]

ROLLOUT_ACTION = EnumCodec(RolloutAction, admin_pb2.RolloutAction)
VIEWER_GRANT_STATE = EnumCodec(GrantState, admin_pb2.ViewerGrantState)
NODE_HEALTH = EnumCodec(Health, admin_pb2.NodeHealth)
