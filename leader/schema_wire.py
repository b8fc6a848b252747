"""The codecs of the enums a schema view carries (``schema.proto``): a rollout's change, scope,
strategy, freeze mode and state, each node's state, and which problem the leader sees with a
node (see ``tlsroll.wire``).

Apart from ``leader.wire``, which re-exports them beside the Admin service's codecs, so that
``tlsroll schema show`` (and ``--json``, whose words these codecs give) imports neither the Admin
service's messages (``admin_pb2``) nor the pure core's tables: about 30 ms of a command whose goal
is 150 ms (issue 15). ``tests/test_perf_shape.py`` checks that every enum a schema view can carry
has its codec here.
"""

from __future__ import annotations

from leader.rollout_enums import FreezeMode, NodeState, RolloutState, ScopeKind, Strategy
from leader.states import NodeProblemKind
from tlsroll.v1 import schema_pb2, types_pb2
from tlsroll.wire import CHANGE, EnumCodec

__all__ = ["CHANGE"]

SCOPE_KIND = EnumCodec(ScopeKind, types_pb2.ScopeKind)
STRATEGY = EnumCodec(Strategy, types_pb2.Strategy)
FREEZE = EnumCodec(FreezeMode, types_pb2.FreezeMode)
ROLLOUT_STATE = EnumCodec(RolloutState, types_pb2.RolloutState)
NODE_STATE = EnumCodec(NodeState, types_pb2.NodeState)
NODE_PROBLEM_KIND = EnumCodec(NodeProblemKind, schema_pb2.NodeProblemKind)
