"""The gRPC boundary for enums: Python ``StrEnum`` members ⇄ protobuf enum numbers.

Inside tlsroll a closed set of values is a ``StrEnum`` (``Change.ENABLE_TLS``); on the wire it
is a protobuf enum with an UNSPECIFIED zero (``CHANGE_ENABLE_TLS = 1``). One ``EnumCodec`` per
pair converts both ways, matched by name (``CHANGE_`` + ``ENABLE_TLS``), and is checked when it
is built: a value on either side without a partner is a bug caught at import, not a silent
default::

    CHANGE = EnumCodec(Change, types_pb2.Change)
    CHANGE.wire(Change.ENABLE_TLS)              # -> 1
    CHANGE.read(request.change, "change")       # -> Change.ENABLE_TLS, or WireError

``WireError`` (a request carried UNSPECIFIED or an unknown number) maps to INVALID_ARGUMENT.
``to_dict`` turns a message into JSON-ready data with every enum as its Python value
(``"enable-tls"``, ``"done"``), which is what ``--json`` output shows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf.descriptor import FieldDescriptor

from tlsroll.enums import Change, TxnKind, TxnOutcome
from tlsroll.errors import TerminalError
from tlsroll.v1 import agent_pb2, types_pb2

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from tlsroll.clients import ClientsView

# ``tlsroll schema show`` imports this module for its codecs: what only ``to_dict`` and the
# clients' reports need (json_format, ``tlsroll.clients``) is imported where they run.

E = TypeVar("E", bound=StrEnum)

_CODECS: dict[str, EnumCodec[Any]] = {}  # by the protobuf enum's full name


class WireError(TerminalError):
    """A message carried an enum value that is UNSPECIFIED or unknown where one is required."""


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


class EnumCodec(Generic[E]):
    """Converts one ``StrEnum`` to and from one protobuf enum (see the module docstring)."""

    def __init__(self, py: type[E], pb: Any) -> None:
        self.py = py
        self.descriptor = pb.DESCRIPTOR
        self.prefix = _upper_snake(self.descriptor.name) + "_"
        self._to_wire: dict[E, int] = {}
        for member in py:
            try:
                self._to_wire[member] = pb.Value(self.prefix + member.name)
            except ValueError:
                raise TypeError(
                    f"{py.__name__}.{member.name} has no {self.prefix}{member.name}"
                ) from None
        self._from_wire = {number: member for member, number in self._to_wire.items()}
        extra = set(pb.values()) - {0} - set(self._from_wire)
        if extra:
            raise TypeError(f"{self.descriptor.full_name} values {sorted(extra)} have no partner")
        _CODECS[self.descriptor.full_name] = self

    def wire(self, value: E) -> Any:
        """The protobuf number of ``value`` (typed ``Any``: each generated enum has a type of
        its own, which a number from any codec would not match)."""
        return self._to_wire[value]

    def read(self, number: int, field: str) -> E:
        """The value of a required enum field; ``WireError`` names the field otherwise."""
        try:
            return self._from_wire[number]
        except KeyError:
            what = "missing" if number == 0 else f"unknown value {number}"
            choices = ", ".join(m.value for m in self.py)
            raise WireError(f"{field}: {what} (one of: {choices})") from None

    def read_optional(self, number: int, field: str) -> E | None:
        """Like ``read``, but UNSPECIFIED (0) is ``None``."""
        return None if number == 0 else self.read(number, field)

    def text(self, number: int) -> str:
        """The Python value's text for a number ("" for UNSPECIFIED or unknown)."""
        member = self._from_wire.get(number)
        return member.value if member is not None else ""


CHANGE = EnumCodec(Change, types_pb2.Change)
TXN_KIND = EnumCodec(TxnKind, agent_pb2.TransactionKind)
TXN_OUTCOME = EnumCodec(TxnOutcome, agent_pb2.TransactionOutcome)


def to_dict(msg: Message) -> dict[str, Any]:
    """JSON-ready data of ``msg``: field names as in the .proto, every field present, and
    enums as their Python values (a registered codec), never as protobuf names."""
    from google.protobuf.json_format import MessageToDict  # noqa: PLC0415

    data = MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        use_integers_for_enums=True,
    )
    _texts(msg.DESCRIPTOR, data)
    return data


def _texts(descriptor: Any, data: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type == FieldDescriptor.TYPE_ENUM:
            codec = _CODECS.get(field.enum_type.full_name)
            if codec is not None:
                data[field.name] = (
                    [codec.text(v) for v in value] if isinstance(value, list) else codec.text(value)
                )
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.fields:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict):
                    _texts(field.message_type, item)


def clients_message(view: ClientsView) -> types_pb2.ClientsView:
    """A driver's ``ClientsView`` as the agent reports it (GetStatus, heartbeats)."""
    from tlsroll.clients import (  # noqa: PLC0415
        MAX_ADDRESS,
        MAX_PROBLEM,
        MAX_REPORTED,
        MAX_WORKSTATION,
    )

    msg = types_pb2.ClientsView(
        window_seconds=view.window_seconds,
        source=view.source,
        problem=view.problem[:MAX_PROBLEM],
    )
    for c in view.clients[:MAX_REPORTED]:
        seen = msg.clients.add(
            scheme=c.scheme,
            address=c.address[:MAX_ADDRESS],
            workstation=c.workstation[:MAX_WORKSTATION],
            requests=c.requests,
        )
        seen.first_seen.FromDatetime(c.first_seen)
        seen.last_seen.FromDatetime(c.last_seen)
    return msg


def back_on_http(clients: Iterable[types_pb2.ClientSeen]) -> frozenset[str]:
    """``tlsroll.clients.used_http_after_https`` of a report's clients (the agent's
    ``report_key``, the leader's ``clients_said``)."""
    from tlsroll.clients import used_http_after_https  # noqa: PLC0415

    return used_http_after_https(
        (
            c.scheme,
            c.address,
            c.workstation,
            (c.first_seen.seconds, c.first_seen.nanos),
            (c.last_seen.seconds, c.last_seen.nanos),
        )
        for c in clients
    )
