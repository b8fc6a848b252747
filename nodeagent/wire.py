"""The agent's enums on the wire (see ``tlsroll.wire``): transaction kind, phase, outcome."""

from __future__ import annotations

from nodeagent.transaction import Phase
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE, TXN_KIND, TXN_OUTCOME, EnumCodec

__all__ = ["CHANGE", "TXN_KIND", "TXN_OUTCOME", "TXN_PHASE"]

TXN_PHASE = EnumCodec(Phase, agent_pb2.TransactionPhase)
