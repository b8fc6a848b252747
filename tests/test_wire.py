"""Enums on the wire (``tlsroll.wire``): every closed set in the contract is a protobuf enum with
an UNSPECIFIED zero, converted at one boundary, both ways, and shown in ``--json`` as the
words the CLI takes."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import pytest

import leader.wire
import nodeagent.wire
from leader.rollout_core import NodeState, RolloutState
from tlsroll.v1 import admin_pb2, agent_pb2, schema_pb2, types_pb2
from tlsroll.wire import _CODECS, EnumCodec, WireError, to_dict


def test_every_enum_of_the_contract_has_a_codec() -> None:
    assert leader.wire.NODE_STATE and nodeagent.wire.TXN_PHASE  # both registries loaded
    enums = {
        e.full_name
        for module in (types_pb2, agent_pb2, admin_pb2, schema_pb2)
        for e in module.DESCRIPTOR.enum_types_by_name.values()
    }
    assert enums == set(_CODECS)
    for name in enums:
        codec = _CODECS[name]
        assert codec.descriptor.values_by_number[0].name.endswith("_UNSPECIFIED")
        for member in codec.py:  # both ways, every value
            assert codec.read(codec.wire(member), "f") is member


@pytest.mark.parametrize("number", [0, 99])
def test_unspecified_or_unknown_is_refused_with_the_field(number: int) -> None:
    with pytest.raises(WireError, match=r"^state: (missing|unknown value 99) \(one of: pending"):
        leader.wire.NODE_STATE.read(number, "state")
    assert leader.wire.NODE_STATE.read_optional(0, "state") is None


def test_a_codec_without_a_partner_is_a_bug_at_import() -> None:
    class Lacking(StrEnum):
        PLANNED = "planned"

    Extra = StrEnum(  # type: ignore[misc]
        "Extra", {**{m.name: m.value for m in RolloutState}, "EXPLODED": "exploded"}
    )

    with pytest.raises(TypeError, match="have no partner"):
        EnumCodec(Lacking, types_pb2.RolloutState)
    with pytest.raises(TypeError, match="EXPLODED"):
        EnumCodec(Extra, types_pb2.RolloutState)


def test_json_shows_the_words() -> None:
    view = schema_pb2.RolloutView(
        id="r1",
        change=types_pb2.CHANGE_ENABLE_TLS,
        state=leader.wire.ROLLOUT_STATE.wire(RolloutState.HALTED),
        nodes=[schema_pb2.NodeView(name="n", state=types_pb2.NODE_STATE_NEEDS_ATTENTION)],
    )
    data: dict[str, Any] = to_dict(schema_pb2.Schema(rollouts=[view]))
    rollout = data["rollouts"][0]
    assert rollout["change"] == "enable-tls" and rollout["state"] == "halted"
    assert rollout["freeze"] == ""  # unset: no word
    assert rollout["nodes"][0]["state"] == NodeState.NEEDS_ATTENTION.value
