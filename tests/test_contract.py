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

Some methods travel as JSON (gRPC's JSON codec: ``tlsroll schema show`` reads the schema so,
``leader.schema_view.JSON_METHODS``), and for their messages the field *names* are the contract
as well: a CLI and a leader of different builds (a leader not restarted since an upgrade, the
CLI of the one before) read each other's JSON by name. For every message reachable from those
methods' requests and replies in the baseline, each field of the baseline keeps its name,
and one that is removed has its name ``reserved`` too (``reserved "name";``), unless a field
of the same name and kind took another number. A field of a message the leader parses (one
reachable from a request) is not removed at all: ``json_format.Parse`` refuses a key that is
no field, reserved or not, and a CLI of the baseline sends it. And a field keeps its presence
(plain, proto3 ``optional``, or in a oneof with the same fields of the baseline): the JSON
leaves out the key of an unset field with presence, and ``json_format.Parse`` refuses two
fields of one oneof. The JSON methods are derived from the code: what the leader
registers, and every name of a ``tlsroll.v1`` service the packages' code spells out that the
.proto does not define, must be in ``JSON_METHODS``. What the CLI sends as a JSON request is
only what the baseline's request has: an older leader's parser refuses a name it does not know.

Moving the baseline. The baseline is the contract of the oldest release a current leader or
agent must still talk to. At a release (and only then, or for a break the release notes
announce), write the release's contract over it from the repository root::

    wk=$(python -c 'import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__))')
    python -m grpc_tools.protoc -Iproto -I"$wk/_proto" --include_imports \\
        --descriptor_set_out=tests/data/contract-baseline.pb \\
        $(cd proto && find . -name '*.proto' | sed 's|^\\./||' | sort)

and the words the JSON gives the enums of JSON-coded messages (the codecs', see below) over
``tests/data/contract-baseline-words.json``::

    python -c 'import json, tests.test_contract as t; print(json.dumps(t.json_words(t.head()),
        indent=1, sort_keys=True))' > tests/data/contract-baseline-words.json

and say in the commit which release it is. The baseline committed now is the contract of
2026-12-02 (after 0.1.0, whose string fields the enums replaced on purpose: 0.1.0 is not a
mixed-version partner, see the changelog).

The JSON of those messages gives an enum not by its protobuf name but by the word of its codec
(``tlsroll.wire.to_dict``: ``needs_attention``, ``enable-tls``): the Python value, which no
descriptor holds. Those words are pinned against the words baseline: each value keeps its word
(``schema show`` styles and reads the states by them).
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import grpc
import pytest
from google.protobuf import descriptor_pb2

import tlsroll.v1
from leader import schema_view
from leader.cli.base import fetch_schema_json
from leader.schema_view import JSON_METHODS, JSON_SERVICE
from tlsroll import wire

BASELINE = Path(__file__).resolve().parent / "data" / "contract-baseline.pb"
WORDS = BASELINE.with_name("contract-baseline-words.json")
ROOT = Path(__file__).resolve().parent.parent
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


def _method_types(files: descriptor_pb2.FileDescriptorSet, full_name: str) -> tuple[str, str]:
    """The request and reply message types (full names) of the method ``full_name``
    (``tlsroll.v1.Service.Method``); KeyError if ``files`` has no such method."""
    service, _, method = full_name.rpartition(".")
    for m in index(files)[2][service].method:
        if m.name == method:
            return m.input_type.lstrip("."), m.output_type.lstrip(".")
    raise KeyError(full_name)


def json_messages(
    files: descriptor_pb2.FileDescriptorSet, methods: Iterable[str], *, replies: bool = True
) -> dict[str, str]:
    """Every message of our package reachable from the requests and replies of ``methods``
    (protobuf methods by full name; one ``files`` lacks is left out), through fields of its
    messages, with the method it is reached from. ``replies=False``: from the requests alone
    (what the leader parses)."""
    messages = index(files)[0]
    found: dict[str, str] = {}
    for method in sorted(methods):
        try:
            request, reply = _method_types(files, method)
        except KeyError:
            continue
        todo = [request, reply] if replies else [request]
        while todo:
            name = todo.pop()
            if name in found or name not in messages:  # (well-known types: their own JSON)
                continue
            found[name] = method
            todo.extend(
                f.type_name.lstrip(".") for f in messages[name].field if f.type == Fdp.TYPE_MESSAGE
            )
    return found


def _presence(
    m: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto, among: set[str]
) -> str:
    """Whether the JSON of ``m`` (``tlsroll.wire.to_dict``: every field without presence, at
    its default too) always has field ``f``'s key: "plain", or "optional" (proto3, left out
    when unset), or "oneof with [...]" (left out when unset, and at most one of the named
    fields of ``among`` that share it is set: ``json_format.Parse`` refuses two)."""
    if f.proto3_optional:
        return "optional"
    if f.HasField("oneof_index"):
        with_ = sorted(
            g.name
            for g in m.field
            if g.HasField("oneof_index")
            and g.oneof_index == f.oneof_index
            and g.name != f.name
            and g.name in among
        )
        return f"oneof with {with_}"
    return "plain"


def json_breaks(
    old: descriptor_pb2.FileDescriptorSet,
    new: descriptor_pb2.FileDescriptorSet,
    methods: Iterable[str],
) -> list[str]:
    """One line per field name of a JSON-coded message (reachable from ``methods``) that a
    peer of ``old`` reading ``new``'s JSON, or writing what ``new`` reads, would miss.

    Only the messages ``old`` carries as JSON: one that a JSON message of ``new`` carries
    first is new to every JSON reader (review s36 F4). The leader parses the messages of a
    request (``json_format.Parse``), which refuses a key that is no field of the message,
    reserved or not: there, no field a peer of ``old`` sends may go (review s36 F2). A field
    that becomes ``optional`` or joins a oneof has its key left out when unset, where a peer of
    ``old`` reads it (review s36 F3)."""
    methods = list(methods)
    reached = json_messages(old, methods)
    parsed = json_messages(old, methods, replies=False)
    old_messages, new_messages = index(old)[0], index(new)[0]
    found: list[str] = []
    for name, via in sorted(reached.items()):
        was, now = old_messages.get(name), new_messages.get(name)
        if was is None or now is None:
            continue  # removed (``breaks`` says so)
        numbers = {f.number: f for f in now.field}
        names = {f.name: f for f in now.field}
        among = {f.name for f in was.field}
        for f in was.field:
            then = numbers.get(f.number)
            if then is None:
                moved = names.get(f.name)
                if moved is not None and _field_kind(moved) == _field_kind(f):
                    then = moved  # the same name and kind under another number
                elif name in parsed:
                    found.append(
                        f"{name} field {f.number} ({f.name}): removed, but the leader parses"
                        f" the message from JSON in {via}: a peer of the baseline sends"
                        f" {f.name}, which json_format refuses, reserved or not"
                    )
                    continue
                elif f.name not in now.reserved_name:
                    found.append(
                        f'{name} field {f.number} ({f.name}): removed without `reserved "{f.name}"`'
                        f" (its JSON name; the message goes as JSON in {via})"
                    )
                    continue
                else:
                    continue
            if then.name != f.name:
                found.append(
                    f"{name} field {f.number}: its JSON name {f.name} became {then.name} "
                    f"(the message goes as JSON in {via})"
                )
            elif (before := _presence(was, f, among)) != (after := _presence(now, then, among)):
                found.append(
                    f"{name} field {f.number} ({f.name}): {before} became {after}, which"
                    f" changes when its JSON key is there (the message goes as JSON in {via})"
                )
    return found


def test_the_contract_is_wire_compatible_with_the_baseline() -> None:
    problems = breaks(baseline(), head())
    assert problems == [], "\n".join(
        ["the gRPC contract broke against tests/data/contract-baseline.pb:", *problems]
    )


def json_words(files: descriptor_pb2.FileDescriptorSet) -> dict[str, dict[str, str | None]]:
    """For every enum a field of a JSON-coded message has: the word the leader's JSON gives
    each value (its codec's, ``tlsroll.wire.to_dict``; None: no codec, the number itself), by
    number. The codecs are this process's: meaningful for ``head()`` alone."""
    messages, enums, _ = index(files)
    found: dict[str, dict[str, str | None]] = {}
    for name in json_messages(files, JSON_METHODS.values()):
        for f in messages[name].field:
            enum = f.type_name.lstrip(".")
            if f.type == Fdp.TYPE_ENUM and enum in enums:
                codec = wire._CODECS.get(enum)
                found[enum] = {
                    str(v.number): codec.text(v.number) if codec is not None else None
                    for v in enums[enum].value
                }
    return found


def word_breaks(
    was: dict[str, dict[str, str | None]], now: dict[str, dict[str, str | None]]
) -> list[str]:
    """One line per enum value whose JSON word changed (a value or an enum no longer there is
    for ``breaks`` and ``json_breaks`` to say)."""
    found: list[str] = []
    for enum, values in sorted(was.items()):
        for number, word in sorted(values.items(), key=lambda item: int(item[0])):
            if enum in now and number in now[enum] and now[enum][number] != word:
                found.append(
                    f"enum {enum} value {number}: its JSON word {word!r} became "
                    f"{now[enum][number]!r}"
                )
    return found


def test_the_json_coded_messages_keep_their_field_names() -> None:
    problems = json_breaks(baseline(), head(), JSON_METHODS.values())
    assert problems == [], "\n".join(
        ["a JSON-coded message broke against tests/data/contract-baseline.pb:", *problems]
    )


def test_the_json_coded_enums_keep_their_words() -> None:
    was = json.loads(WORDS.read_text())
    # the two baselines are of one contract: the words of the enums its JSON messages have
    assert set(was) == set(json_words(baseline())), "move both baselines together"
    problems = word_breaks(was, json_words(head()))
    assert problems == [], "\n".join(
        ["a JSON-coded enum broke against tests/data/contract-baseline-words.json:", *problems]
    )


def served_json_methods() -> dict[str, set[str]]:
    """The methods ``add_json_to_server`` registers on the admin server, by service (caught as
    it hands them to gRPC)."""
    served: dict[str, set[str]] = {}
    real = grpc.method_handlers_generic_handler

    def recording(service: str, handlers: dict[str, Any]) -> Any:
        served.setdefault(service, set()).update(handlers)
        return real(service, handlers)

    server = SimpleNamespace(add_generic_rpc_handlers=lambda _handlers: None)
    with mock.patch.object(grpc, "method_handlers_generic_handler", recording):
        schema_view.add_json_to_server(
            cast(Any, SimpleNamespace(get_schema_json=None)), cast(Any, server)
        )
    return served


def named_services() -> set[tuple[str, str, str]]:
    """Every ``tlsroll.v1`` service (and method) the packages' code spells out in a string of
    its own, ``tlsroll.v1.Service`` or ``/tlsroll.v1.Service/Method``: (file, service, method
    or "")."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["packages"]
    spelled = re.compile(r"/?tlsroll\.v1\.([A-Z]\w*)(?:/(\w+))?")
    found: set[tuple[str, str, str]] = set()
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "tlsroll" / "v1"):
                continue  # the generated code
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    m = spelled.fullmatch(node.value)
                    if m:
                        found.add((str(path.relative_to(ROOT)), m[1], m[2] or ""))
    return found


def test_every_json_method_is_known_to_the_guard() -> None:
    """The JSON methods the guard pins are those the leader serves, and every service the code
    names that the .proto does not define is one of them: a JSON method added without
    ``JSON_METHODS`` (whose messages the guard would then not pin) fails here."""
    assert served_json_methods() == {JSON_SERVICE: set(JSON_METHODS)}
    now = head()
    for method in JSON_METHODS.values():
        _method_types(now, method)  # names a method of the .proto
    messages, enums, services = index(now)
    defined = {name.rpartition(".")[2]: s for name, s in services.items()}
    seen = named_services()
    assert any(service == JSON_SERVICE.rpartition(".")[2] for _, service, _ in seen)
    for path, service, method in sorted(seen):
        if not method and f"{PACKAGE}.{service}" in messages.keys() | enums.keys():
            continue  # a message's or an enum's name (a codec's key), not a service's
        if service in defined:
            assert not method or any(m.name == method for m in defined[service].method), (
                f"{path}: /tlsroll.v1.{service}/{method} is not a method of the .proto"
            )
        else:
            assert f"tlsroll.v1.{service}" == JSON_SERVICE, (
                f"{path} names tlsroll.v1.{service}, which the .proto does not define: a JSON"
                " service? name its methods in leader.schema_view.JSON_METHODS"
            )
            assert not method or method in JSON_METHODS, (
                f"{path}: /{JSON_SERVICE}/{method} is not in leader.schema_view.JSON_METHODS"
            )


def test_what_the_cli_sends_as_json_an_older_leader_reads() -> None:
    """``schema show``'s JSON request names only fields the baseline's request has: a leader of
    the baseline refuses (INVALID_ARGUMENT) a request with a name it does not know, where
    protobuf would have skipped an unknown field."""
    sent: list[tuple[str, dict[str, Any]]] = []

    class Asked:
        def unary_json(self, method: str, request: dict[str, Any], timeout: float = 30) -> Any:
            sent.append((method, request))
            return {}

    fetch_schema_json(cast(Any, Asked()), "r1", limit=1, rollouts_only=True)
    old = baseline()
    for method, request in sent:
        service, _, name = method.strip("/").partition("/")
        assert service == JSON_SERVICE and name in JSON_METHODS, method
        request_type = _method_types(old, JSON_METHODS[name])[0]
        known = {f.name for f in index(old)[0][request_type].field}
        assert set(request) <= known, f"{method}: {sorted(set(request) - known)} unknown"
    assert sent


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


# --- the JSON guard notices a renamed or removed field of a JSON-coded message ----------------


def rename_json_field(files: descriptor_pb2.FileDescriptorSet) -> str:
    # a node's state, three messages down from the schema's reply: `schema show` reads it by name
    _field(_find(files, "tlsroll.v1.NodeView"), "state").name = "status"
    return "tlsroll.v1.NodeView field 2: its JSON name state became status"


def rename_json_request_field(files: descriptor_pb2.FileDescriptorSet) -> str:
    _field(_find(files, "tlsroll.v1.GetSchemaRequest"), "rollouts_only").name = "only_rollouts"
    return "tlsroll.v1.GetSchemaRequest field 3: its JSON name rollouts_only became only_rollouts"


def remove_json_field(files: descriptor_pb2.FileDescriptorSet) -> str:
    view = _find(files, "tlsroll.v1.RolloutView")
    gone = _field(view, "reason")
    view.field.remove(gone)
    view.reserved_range.add(start=gone.number, end=gone.number + 1)  # the wire guard's due
    return 'tlsroll.v1.RolloutView field 16 (reason): removed without `reserved "reason"`'


def remove_json_request_field(files: descriptor_pb2.FileDescriptorSet) -> str:
    # as the guard asks of a reply's field: number and name reserved. But the leader parses
    # the request (json_format.Parse), which refuses the key every baseline CLI sends
    request = _find(files, "tlsroll.v1.GetSchemaRequest")
    gone = _field(request, "rollouts_only")
    request.field.remove(gone)
    request.reserved_range.add(start=gone.number, end=gone.number + 1)
    request.reserved_name.append(gone.name)
    return "tlsroll.v1.GetSchemaRequest field 3 (rollouts_only): removed, but the leader parses"


def make_json_field_optional(files: descriptor_pb2.FileDescriptorSet) -> str:
    # proto3 `optional`: the JSON leaves its key out when unset (draw.py reads n["state"])
    view = _find(files, "tlsroll.v1.NodeView")
    state = _field(view, "state")
    view.oneof_decl.add(name="_state")
    state.proto3_optional, state.oneof_index = True, len(view.oneof_decl) - 1
    return "tlsroll.v1.NodeView field 2 (state): plain became optional"


def move_json_field_into_a_oneof(files: descriptor_pb2.FileDescriptorSet) -> str:
    view = _find(files, "tlsroll.v1.RolloutView")
    view.oneof_decl.add(name="why")
    _field(view, "reason").oneof_index = len(view.oneof_decl) - 1
    return "tlsroll.v1.RolloutView field 16 (reason): plain became oneof with []"


@pytest.mark.parametrize(
    "change",
    [
        rename_json_field,
        rename_json_request_field,
        remove_json_field,
        remove_json_request_field,
        make_json_field_optional,
        move_json_field_into_a_oneof,
    ],
    ids=lambda f: f.__name__,
)
def test_the_json_guard_notices(change: Any) -> None:
    changed = head()
    expected = change(changed)
    assert breaks(head(), changed) == []  # fine on the wire: only the JSON guard sees it
    problems = json_breaks(head(), changed, JSON_METHODS.values())
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_the_json_guard_lets_through_what_json_readers_do_not_see() -> None:
    """A removed field whose name is reserved, a field that keeps its name under another
    number, additions, and a rename in a message no JSON method carries."""
    changed = head()
    view = _find(changed, "tlsroll.v1.RolloutView")
    gone = _field(view, "reason")
    view.field.remove(gone)
    view.reserved_name.append(gone.name)
    moved = _field(view, "undoes")
    moved.number = 99
    view.field.add(name="why", number=98, type=Fdp.TYPE_STRING, label=Fdp.LABEL_OPTIONAL)
    _field(_find(changed, "tlsroll.v1.Transaction"), "outcome").name = "ending"
    assert (
        json_messages(changed, JSON_METHODS.values()).keys().isdisjoint({"tlsroll.v1.Transaction"})
    )
    assert json_breaks(head(), changed, JSON_METHODS.values()) == []


def test_the_json_guard_notices_two_request_fields_put_in_one_oneof() -> None:
    """A baseline CLI sends every key of the request; ``json_format.Parse`` refuses two
    fields of one oneof: each of the two is reported."""
    changed = head()
    request = _find(changed, "tlsroll.v1.GetSchemaRequest")
    request.oneof_decl.add(name="what")
    for name in ("limit", "rollouts_only"):
        _field(request, name).oneof_index = len(request.oneof_decl) - 1
    assert breaks(head(), changed) == []
    assert [p.partition(",")[0] for p in json_breaks(head(), changed, JSON_METHODS.values())] == [
        "tlsroll.v1.GetSchemaRequest field 2 (limit): plain became oneof with ['rollouts_only']",
        "tlsroll.v1.GetSchemaRequest field 3 (rollouts_only): plain became oneof with ['limit']",
    ]


def test_the_json_guard_pins_no_message_the_baseline_did_not_carry_as_json() -> None:
    """A message renamed while no JSON method carried it (allowed then), then carried by a new
    field of a JSON message: no JSON reader of the baseline ever saw its old names (review
    s36 F4). The same rename in a message the baseline carries is still caught."""
    was = head()
    changed = head()
    _field(_find(changed, "tlsroll.v1.Transaction"), "outcome").name = "ending"
    _find(changed, "tlsroll.v1.NodeView").field.add(
        name="last_transaction", number=99, type=Fdp.TYPE_MESSAGE, label=Fdp.LABEL_OPTIONAL,
        type_name=".tlsroll.v1.Transaction",
    )  # fmt: skip
    assert "tlsroll.v1.Transaction" not in json_messages(was, JSON_METHODS.values())
    assert "tlsroll.v1.Transaction" in json_messages(changed, JSON_METHODS.values())
    assert breaks(was, changed) == []
    assert json_breaks(was, changed, JSON_METHODS.values()) == []
    _field(_find(changed, "tlsroll.v1.NodeView"), "state").name = "status"
    assert json_breaks(was, changed, JSON_METHODS.values()) == [
        "tlsroll.v1.NodeView field 2: its JSON name state became status (the message goes as"
        " JSON in tlsroll.v1.SchemaView.GetSchema)"
    ]


def test_a_message_s_or_enum_s_name_in_the_code_is_no_unknown_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``"tlsroll.v1.NodeState"`` spelled out in the code (a codec's key) names an enum, not
    a JSON service the .proto lacks (review s36 F4); a name the .proto does not define still
    fails."""
    real = named_services
    extra = {("leader/x.py", "NodeState", ""), ("leader/x.py", "SchemaView", "")}
    monkeypatch.setattr(sys.modules[__name__], "named_services", lambda: real() | extra)
    test_every_json_method_is_known_to_the_guard()
    monkeypatch.setattr(
        sys.modules[__name__],
        "named_services",
        lambda: real() | {("leader/x.py", "Hidden", "")},
    )
    with pytest.raises(AssertionError, match=r"names tlsroll\.v1\.Hidden"):
        test_every_json_method_is_known_to_the_guard()


def test_the_words_guard_notices_a_new_word(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python value of a state respelled (``needs_attention`` as ``needs-attention``):
    the descriptors do not change, the JSON does."""
    was = json_words(head())
    codec = wire._CODECS["tlsroll.v1.NodeState"]
    real = codec.text
    (number,) = [n for n, word in was["tlsroll.v1.NodeState"].items() if word == "needs_attention"]
    monkeypatch.setattr(codec, "text", lambda n: "needs-attention" if n == int(number) else real(n))
    assert breaks(head(), head()) == json_breaks(head(), head(), JSON_METHODS.values()) == []
    assert word_breaks(was, json_words(head())) == [
        f"enum tlsroll.v1.NodeState value {number}: its JSON word 'needs_attention' became "
        "'needs-attention'"
    ]
