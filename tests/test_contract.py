"""The gRPC contract stays wire-compatible with a committed baseline (upgrade audit s35 F4).

``tests/test_proto.py`` only checks that the generated code is what ``proto/`` makes; nothing
noticed when 15 fields were retyped from string to enum under the same numbers (0.1.0 → now),
or when three branches gave Schema's field 8 three different meanings. Here the contract as it
is now (the generated ``tlsroll.v1`` modules, which the drift check keeps equal to ``proto/``)
is compared with ``tests/data/contract-baseline.pb``, a descriptor set of the contract as it
was:

* every (message, field number) of the baseline has, in HEAD, the same type (and message or
  enum type name) and label; a field's *name* may change (the wire carries numbers). A number
  HEAD no longer has must be ``reserved`` in its message, so that it is never reused;
* every (enum, number) keeps its name (the name is what the code reads: a number that meant
  ``ROLLED_BACK`` and now means ``FAILED`` breaks a mixed pair silently), or is ``reserved``;
* no message, enum, service or method is removed, and a method keeps its request and reply
  types and streaming.

Additions (messages, fields, enum values, methods) are free.

Moving the baseline. The baseline is the contract of the oldest release a current leader or
agent must still talk to. At a release (and only then, or for a break the release notes
announce), write the release's contract over it from the repository root::

    wk=$(python -c 'import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__))')
    python -m grpc_tools.protoc -Iproto -I"$wk/_proto" --include_imports \\
        --descriptor_set_out=tests/data/contract-baseline.pb \\
        $(cd proto && find . -name '*.proto' | sed 's|^\\./||' | sort)

and say in the commit which release it is. The baseline committed now is the contract of
2026-12-02 (after 0.1.0, whose string fields the enums replaced on purpose: 0.1.0 is not a
mixed-version partner, see the changelog).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

import tlsroll.v1

BASELINE = Path(__file__).resolve().parent / "data" / "contract-baseline.pb"
PACKAGE = "tlsroll.v1"

Fdp = descriptor_pb2.FieldDescriptorProto


def head() -> descriptor_pb2.FileDescriptorSet:
    """The contract as the generated modules carry it."""
    found = descriptor_pb2.FileDescriptorSet()
    for info in sorted(pkgutil.iter_modules(tlsroll.v1.__path__), key=lambda m: m.name):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"{PACKAGE}.{info.name}")
            found.file.add().MergeFromString(module.DESCRIPTOR.serialized_pb)
    return found


def baseline() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())


def _messages(
    prefix: str, messages: Iterable[descriptor_pb2.DescriptorProto]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for m in messages:
        name = f"{prefix}.{m.name}"
        yield name, m
        yield from _messages(name, m.nested_type)


def index(
    files: descriptor_pb2.FileDescriptorSet,
) -> tuple[
    dict[str, descriptor_pb2.DescriptorProto],
    dict[str, descriptor_pb2.EnumDescriptorProto],
    dict[str, descriptor_pb2.ServiceDescriptorProto],
]:
    """Our package's messages, enums and services by full name (nested ones too)."""
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
    for f in files.file:
        if f.package != PACKAGE:
            continue
        for e in f.enum_type:
            enums[f"{f.package}.{e.name}"] = e
        for name, m in _messages(f.package, f.message_type):
            messages[name] = m
            for e in m.enum_type:
                enums[f"{name}.{e.name}"] = e
        for s in f.service:
            services[f"{f.package}.{s.name}"] = s
    return messages, enums, services


def _field_kind(f: descriptor_pb2.FieldDescriptorProto) -> str:
    kind = Fdp.Type.Name(f.type)
    return f"{Fdp.Label.Name(f.label)} {kind}{' ' + f.type_name if f.type_name else ''}"


def breaks(
    old: descriptor_pb2.FileDescriptorSet, new: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    """One line per way ``new`` cannot be read by a peer of ``old``, or read it."""
    old_messages, old_enums, old_services = index(old)
    new_messages, new_enums, new_services = index(new)
    found: list[str] = []
    for name, was in old_messages.items():
        now = new_messages.get(name)
        if now is None:
            found.append(f"message {name}: removed")
            continue
        fields = {f.number: f for f in now.field}
        for f in was.field:
            then = fields.get(f.number)
            if then is None:
                if not any(r.start <= f.number < r.end for r in now.reserved_range):
                    found.append(
                        f"{name} field {f.number} ({f.name}): removed without `reserved {f.number}`"
                    )
            elif _field_kind(then) != _field_kind(f):
                found.append(
                    f"{name} field {f.number} ({f.name}): {_field_kind(f)} became "
                    f"{_field_kind(then)}"
                )
    for name, was_enum in old_enums.items():
        now_enum = new_enums.get(name)
        if now_enum is None:
            found.append(f"enum {name}: removed")
            continue
        values = {v.number: v.name for v in now_enum.value}
        for v in was_enum.value:
            if v.number not in values:
                # an enum's reserved ranges include their end
                if not any(r.start <= v.number <= r.end for r in now_enum.reserved_range):
                    found.append(
                        f"enum {name} value {v.number} ({v.name}): removed without "
                        f"`reserved {v.number}`"
                    )
            elif values[v.number] != v.name:
                found.append(f"enum {name} value {v.number}: {v.name} became {values[v.number]}")
    for name, was_service in old_services.items():
        now_service = new_services.get(name)
        if now_service is None:
            found.append(f"service {name}: removed")
            continue
        methods = {m.name: m for m in now_service.method}
        for m in was_service.method:
            then_m = methods.get(m.name)
            shape = (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            if then_m is None:
                found.append(f"{name}.{m.name}: removed")
            elif shape != (
                then_m.input_type,
                then_m.output_type,
                then_m.client_streaming,
                then_m.server_streaming,
            ):
                found.append(f"{name}.{m.name}: its request, reply or streaming changed")
    return found


def test_the_contract_is_wire_compatible_with_the_baseline() -> None:
    problems = breaks(baseline(), head())
    assert problems == [], "\n".join(
        ["the gRPC contract broke against tests/data/contract-baseline.pb:", *problems]
    )


def test_the_baseline_holds_the_contract() -> None:
    """The baseline is a descriptor set of this package (not an empty or foreign file)."""
    messages, enums, services = index(baseline())
    assert "tlsroll.v1.Transaction" in messages and "tlsroll.v1.Schema" in messages
    assert "tlsroll.v1.TransactionOutcome" in enums
    assert {"tlsroll.v1.Admin", "tlsroll.v1.NodeAgent", "tlsroll.v1.Leader"} <= set(services)


# --- the guard notices each kind of break -----------------------------------------------------


def _find(
    files: descriptor_pb2.FileDescriptorSet, full_name: str
) -> descriptor_pb2.DescriptorProto:
    for f in files.file:
        for name, m in _messages(f.package, f.message_type):
            if name == full_name:
                return m
    raise KeyError(full_name)


def _enum(
    files: descriptor_pb2.FileDescriptorSet, full_name: str
) -> descriptor_pb2.EnumDescriptorProto:
    return index(files)[1][full_name]


def _field(m: descriptor_pb2.DescriptorProto, name: str) -> descriptor_pb2.FieldDescriptorProto:
    (found,) = [f for f in m.field if f.name == name]
    return found


def retype(files: descriptor_pb2.FileDescriptorSet) -> str:
    # as cd67ef2 did to 15 fields: the outcome, an enum, becomes a string under its number
    outcome = _field(_find(files, "tlsroll.v1.Transaction"), "outcome")
    outcome.type, outcome.type_name = Fdp.TYPE_STRING, ""
    return "tlsroll.v1.Transaction field 5 (outcome): LABEL_OPTIONAL TYPE_ENUM"


def repeat(files: descriptor_pb2.FileDescriptorSet) -> str:
    _field(_find(files, "tlsroll.v1.Transaction"), "reason").label = Fdp.LABEL_REPEATED
    return "tlsroll.v1.Transaction field 6 (reason): LABEL_OPTIONAL TYPE_STRING became"


def remove_field(files: descriptor_pb2.FileDescriptorSet) -> str:
    txn = _find(files, "tlsroll.v1.Transaction")
    (kept,) = [f for f in txn.field if f.name == "reason"]
    txn.field.remove(kept)
    return "tlsroll.v1.Transaction field 6 (reason): removed without `reserved 6`"


def rename_value(files: descriptor_pb2.FileDescriptorSet) -> str:
    outcome = _enum(files, "tlsroll.v1.TransactionOutcome")
    (failed,) = [v for v in outcome.value if v.name == "TRANSACTION_OUTCOME_FAILED"]
    failed.name = "TRANSACTION_OUTCOME_NEEDS_ATTENTION"  # the number now means something else
    return "enum tlsroll.v1.TransactionOutcome value 4: TRANSACTION_OUTCOME_FAILED became"


def remove_method(files: descriptor_pb2.FileDescriptorSet) -> str:
    admin = index(files)[2]["tlsroll.v1.Admin"]
    (gone,) = [m for m in admin.method if m.name == "FinalizeRollout"]
    admin.method.remove(gone)
    return "tlsroll.v1.Admin.FinalizeRollout: removed"


@pytest.mark.parametrize(
    "change", [retype, repeat, remove_field, rename_value, remove_method], ids=lambda f: f.__name__
)
def test_the_guard_notices(change: Any) -> None:
    changed = head()
    expected = change(changed)
    problems = breaks(head(), changed)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_a_removed_field_that_is_reserved_and_additions_pass() -> None:
    changed = head()
    txn = _find(changed, "tlsroll.v1.Transaction")
    (gone,) = [f for f in txn.field if f.name == "reason"]
    txn.field.remove(gone)
    txn.reserved_range.add(start=gone.number, end=gone.number + 1)
    txn.field.add(name="why", number=99, type=Fdp.TYPE_STRING, label=Fdp.LABEL_OPTIONAL)
    _field(txn, "outcome").name = "ending"  # a new name, the same number and type
    _enum(changed, "tlsroll.v1.TransactionOutcome").value.add(name="NEWER", number=99)
    assert breaks(head(), changed) == []
