"""`rollout retry` of a rollout that left a node whose agent is cut off (s50retry): the halt
says `tlsroll nodes remove NODE`; before that is done, the retry is refused saying so (not
"offline"); once done, the retry leaves the node out (it was refused "not enrolled") and the
CLI names it. A node merely offline is refused as before. The nodes a retry or a way back
left out are stored with the new rollout (review rev50f L4: ``RolloutMeta.removed_since``,
store schema 14), in its start's answer and `schema show` (--json too). In-process on a real
store with the engine harness of tests/test_engine.py. The real leader, agents and CLI:
tests/test_reenrol_ended.py."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from leader import db as leader_db
from leader import planner
from leader.cli.base import Leader
from leader.cli.draw import render_rollout
from leader.commands import NotRetriable, RolloutRequest
from leader.rollout_core import (
    Change,
    NodeState,
    Rollout,
    RolloutEvent,
    RolloutState,
    Scope,
    cut_off_halt,
)
from leader.schema_store import NodeDetail, RolloutMeta, RolloutRow, SchemaStore
from leader.schema_view import rollout_view, schema_json, schema_message
from leader.service import ERRORS
from leader.store import Store
from tests.test_repeated_commands import ADMIN, NOW, rollout, settle
from tlsroll.cli import main
from tlsroll.rpc import status_for
from tlsroll.sqlite import Database
from tlsroll.v1 import admin_pb2, schema_pb2


def remove(store: Store, name: str) -> None:
    """`tlsroll nodes remove NAME`. The harness enrols every node with one certificate (of
    serial 1), which the removal revokes: it is not revoked again for the nodes left."""
    store.remove_node(name, now=NOW, actor=ADMIN)
    with store.db.tx() as db:
        db.execute("UPDATE certificates SET revoked_at = NULL")
    assert name not in {n.name for n in store.list_nodes()}
    assert not any(n.cert_revoked for n in store.list_nodes())


@pytest.mark.parametrize("change", [Change.ROTATE_CERT, Change.ENABLE_TLS])
async def test_a_retry_refuses_a_node_cut_off_and_leaves_out_one_removed_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Change
) -> None:
    """r1 left charlie (cut off) and alpha: the retry is refused in one line naming charlie
    and `tlsroll nodes remove charlie` (was "offline: charlie (bring the agent up, or leave
    it out: --nodes)", which no retry can), creating nothing. Once charlie is removed, the
    retry starts on alpha alone (was refused "not enrolled: charlie"), logging charlie."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands, store = leader_.schema, leader_.commands, leader_.store
    first = settle(schema, rollout(schema, "r1", change, ["alpha", "bravo", "charlie"]), {"bravo"})
    cut = frozenset({"charlie"})
    monkeypatch.setattr(store, "cut_off_nodes", lambda: cut)
    with pytest.raises(NotRetriable) as refused:
        await commands.retry("r1", ADMIN)
    said = str(refused.value)
    assert said == (
        "rollout r1 left charlie, whose agent is cut off (certificate revoked): run"
        " `tlsroll nodes remove charlie` first, then tlsroll rollout retry r1"
    ), said
    assert "offline" not in said and "\n" not in said
    assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION
    assert schema.latest() == first and schema.retried_by("r1") is None
    remove(store, "charlie")
    monkeypatch.setattr(store, "cut_off_nodes", frozenset)
    with capture_logs() as logs:
        retried = await commands.retry("r1", ADMIN)
    assert retried.rollout.order == ("alpha",), retried.rollout
    assert [r.name for r in retried.records] == ["alpha"]
    assert schema.retried_by("r1") == (retried.rollout.id, "running")
    left = [(e["rollout_id"], e["removed"]) for e in logs if e["event"] == "rollout.retry_left_out"]
    assert left == [("r1", ["charlie"])], logs
    # Stored with the retry, in the transaction that made it (review rev50f L4): its row, its
    # audit row, and the start's answer, which the CLI prints (not read back: L3).
    assert retried.meta.removed_since == ("charlie",), retried.meta
    again = schema.get(retried.rollout.id)
    assert again is not None and again.meta.removed_since == ("charlie",)
    assert list(rollout_view(retried).removed_since) == ["charlie"]
    assert created_audit(store, retried.rollout.id)["removed_since"] == ["charlie"]
    await leader_.stop()


async def test_a_retry_with_every_node_left_removed_since_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every node r1 left was removed since: nothing to retry, said in one line naming them
    (was "not enrolled: bravo, charlie"); nothing is created."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands, store = leader_.schema, leader_.commands, leader_.store
    first = settle(
        schema, rollout(schema, "r1", Change.ROTATE_CERT, ["alpha", "bravo", "charlie"]), {"alpha"}
    )
    for name in ("bravo", "charlie"):
        remove(store, name)
    with pytest.raises(NotRetriable) as refused:
        await commands.retry("r1", ADMIN)
    assert str(refused.value) == (
        "nothing left to retry: the nodes rollout r1 left were removed since (bravo, charlie);"
        " see: tlsroll schema show"
    )
    assert schema.latest() == first and schema.retried_by("r1") is None
    await leader_.stop()


async def test_a_retry_of_a_rollout_that_left_no_node_unfinished_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aborted rollout whose every node had switched (a scope freeze's unfreeze of a node
    whose server was gone held it running until the admin's abort; bench.faults seed 7126):
    its retry, as "When it fails" advises after an abort, is refused in one line, nothing to
    do, nothing created (was an internal error: a rollout of an empty node list)."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands = leader_.schema, leader_.commands
    row = rollout(schema, "r1", Change.ENABLE_TLS, ["alpha", "bravo", "charlie"])
    records = [replace(r, state=NodeState.DONE) for r in row.records]
    head = row.rollout.with_event(RolloutEvent.ABORT).with_event(RolloutEvent.NODES_SETTLED)
    first = schema.save_states(row, head, records, NOW, "engine")
    assert first.rollout.state is RolloutState.ABORTED
    with pytest.raises(NotRetriable) as refused:
        await commands.retry("r1", ADMIN)
    assert str(refused.value) == (
        "nothing to do: rollout r1 left no node unfinished (aborted once every node was done);"
        " see: tlsroll schema show"
    )
    assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION
    assert schema.latest() == first and schema.retried_by("r1") is None
    await leader_.stop()


async def test_a_retry_still_refuses_a_node_merely_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed: a rollout never starts on an offline node; a retry neither (not cut off, not
    removed: its refusal is the start's, "offline")."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands = leader_.schema, leader_.commands
    first = settle(
        schema, rollout(schema, "r1", Change.ROTATE_CERT, ["alpha", "bravo", "charlie"]), {"bravo"}
    )
    monkeypatch.setattr(commands, "online", lambda _seen: False)
    with pytest.raises(planner.NodesOffline, match=r"^offline: alpha, charlie \("):
        await commands.retry("r1", ADMIN)
    assert schema.latest() == first
    await leader_.stop()


def test_the_halt_for_a_node_cut_off_says_remove_then_retry() -> None:
    """The halt's way on is the retry now (it said `rollout start --nodes` with the nodes
    left, as the retry took the cut-off node)."""
    head = Rollout(id="r7", change=Change.ROTATE_CERT, scope=Scope.cluster(), order=("a",), epoch=1)
    assert cut_off_halt(head, ["b"]) == (
        "halted: agent cut off (its certificate revoked) before its switch: b; next:"
        " `tlsroll nodes remove b`, then tlsroll rollout retry r7 (it leaves out the nodes"
        " removed)"
    )
    assert "for each" in cut_off_halt(head, ["c", "b"])


def created_audit(store: Store, rollout_id: str) -> dict[str, Any]:
    """The detail of the audit row that recorded rollout ``rollout_id``'s creation."""
    with store.db.read() as db:
        (row,) = db.execute(
            "SELECT detail FROM audit WHERE kind = 'rollout.created' AND subject = ?",
            (rollout_id,),
        ).fetchall()
    detail: dict[str, Any] = json.loads(row["detail"])
    return detail


async def test_a_retry_that_leaves_none_out_stores_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No node removed: nothing stored (the column NULL, no word in the audit, an empty list
    in the view)."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands, store = leader_.schema, leader_.commands, leader_.store
    settle(schema, rollout(schema, "r1", Change.ROTATE_CERT, ["alpha", "bravo"]), {"bravo"})
    retried = await commands.retry("r1", ADMIN)
    assert retried.meta.removed_since == () and not rollout_view(retried).removed_since
    assert "removed_since" not in created_audit(store, retried.rollout.id)
    with store.db.read() as db:
        stored = db.execute(
            "SELECT removed_since FROM rollouts WHERE id = ?", (retried.rollout.id,)
        ).fetchone()[0]
    assert stored is None
    await leader_.stop()


async def test_the_way_back_of_a_named_rollout_leaves_out_its_nodes_removed_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rollout rollback R` takes R's nodes back; one removed since (as a cut-off halt
    advises) refused the way back as "not enrolled: charlie". It is left out now: logged,
    named by the plan, and stored with the way back as its start left it out (the CLI prints
    the start's answer)."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands, store = leader_.schema, leader_.commands, leader_.store
    names = ["alpha", "bravo", "charlie"]
    settle(schema, rollout(schema, "e1", Change.ENABLE_TLS, names), set(names))
    remove(store, "charlie")
    request = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id="e1")
    with capture_logs() as logs:
        planned = await commands.plan(request)
    assert sorted(r.name for r in planned.records) == ["alpha", "bravo"], planned.records
    left = [(e["rollout_id"], e["removed"]) for e in logs if e["event"] == "rollout.undo_left_out"]
    assert left == [("e1", ["charlie"])], logs
    # The plan says what it leaves out (what `rollout rollback R` shows before it asks) ...
    assert planned.removed_since == ("charlie",), planned
    # ... and the start stores what it left out itself (review rev50f L3, L4): bravo,
    # removed since the plan, is left out too, and named.
    remove(store, "bravo")
    back = await commands.start(request, ADMIN)
    assert [r.name for r in back.records] == ["alpha"], back.records
    assert back.meta.removed_since == ("bravo", "charlie"), back.meta
    assert list(rollout_view(back).removed_since) == ["bravo", "charlie"]
    assert created_audit(store, back.rollout.id)["removed_since"] == ["bravo", "charlie"]
    await leader_.stop()


async def test_a_way_back_of_every_node_removed_since_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every node of R removed, one line says there is nothing to take back."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands, store = leader_.schema, leader_.commands, leader_.store
    names = ["alpha", "bravo", "charlie"]
    settle(schema, rollout(schema, "e1", Change.ENABLE_TLS, names), set(names))
    request = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id="e1")
    for name in names:
        remove(store, name)
    with pytest.raises(planner.PlanError) as refused:
        await commands.plan(request)
    assert str(refused.value) == (
        "nothing to take back: the nodes of rollout e1 were removed since (alpha, bravo,"
        " charlie); see: tlsroll schema show"
    )
    await leader_.stop()


def test_schema_show_names_the_nodes_a_rollout_left_out_removed_since() -> None:
    """`schema show --json` carries ``removed_since`` (the JSON the leader's SchemaViewJson
    answers), and `schema show` says it under the rollout's heading; a rollout that left
    none out says nothing of it."""
    row = rollout_row("r2", ("alpha",), removed_since=("charlie", "delta"))
    message = schema_message([row], set(), NOW, fresh=frozenset(), reported=lambda _n: True)
    data = json.loads(schema_json(message))["rollouts"][0]  # what `schema show --json` prints
    assert data["removed_since"] == ["charlie", "delta"], data
    assert [n["name"] for n in data["nodes"]] == ["alpha"], data
    lines = render_rollout(data).lines(400, color=False)
    said = [line for line in lines if "removed since" in line]
    assert said == ["left out, removed since (tlsroll nodes remove): charlie, delta"], lines
    plain = rollout_row("r3", ("alpha",))
    message = schema_message([plain], set(), NOW, fresh=frozenset(), reported=lambda _n: True)
    data = json.loads(schema_json(message))["rollouts"][0]
    assert not data.get("removed_since"), data
    assert "removed since" not in "\n".join(render_rollout(data).lines(400, color=False))


def rollout_row(rollout_id: str, names: tuple[str, ...], **meta: Any) -> RolloutRow:
    """A rotate-cert rollout of ``names`` as planned, with ``meta``."""
    made, records = planner.plan_rollout(
        rollout_id=rollout_id,
        change=Change.ROTATE_CERT,
        scope=Scope.of_nodes(names),
        enrolled=dict.fromkeys(names, True),
        leader=names[0],
        epoch=1,
    )
    return RolloutRow(
        made,
        RolloutMeta(created_at=NOW, started_by=ADMIN, leader_node=names[0], **meta),
        tuple((r, NodeDetail()) for r in records),
    )


BEFORE = 13
"""The store schema of the release before ``removed_since`` (``leader.db._V14``)."""


def test_a_store_of_the_schema_before_opens_with_no_node_left_out(tmp_path: Path) -> None:
    """A leader file of schema 13 with a rollout: the current leader migrates it (the column
    added, NULL: the rollout left none out) and reads the rollout as before; a leader of
    schema 13 may ignore the migration (``IGNORABLE``): it opens the migrated file and
    writes a rollout without the column, which the current leader reads as leaving none out."""
    path = tmp_path / "leader.sqlite3"
    Database(path, leader_db.MIGRATIONS[:BEFORE]).close()  # as the build before left it
    insert_rollout(path, "r1", epoch=1)
    schema = SchemaStore(path)
    try:
        row = schema.get("r1")
        assert row is not None and row.meta.removed_since == (), row
        assert list(rollout_view(row).removed_since) == []
    finally:
        schema.close()
    assert user_version(path) == len(leader_db.MIGRATIONS) > BEFORE
    assert BEFORE + 1 in leader_db.IGNORABLE
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT removed_since FROM rollouts").fetchall() == [(None,)]
    older = Database(path, leader_db.MIGRATIONS[:BEFORE], ignorable=leader_db.IGNORABLE - {14})
    older.close()  # (opened as it is: no SchemaTooNew)
    insert_rollout(path, "r2", epoch=2)  # as the older leader writes a rollout
    schema = SchemaStore(path)
    try:
        row = schema.get("r2")
        assert row is not None and row.meta.removed_since == ()
    finally:
        schema.close()


@pytest.mark.parametrize("stored", ["{bad", "5", "[1, 2]", "[null]", '"node3"', '{"a": 1}'])
def test_a_damaged_removed_since_reads_as_none_with_a_warning(stored: str, tmp_path: Path) -> None:
    """Review rev51c L1: ``tuple(json.loads(...))`` of a damaged column raised (or made a
    string's letters into node names) at every read of the rollout: each `schema show` and the
    live rollout's engine passes failed. It is only what the start left out: read as none,
    with a warning."""
    path = tmp_path / "leader.sqlite3"
    SchemaStore(path).close()
    insert_rollout(path, "r1", epoch=1)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE rollouts SET removed_since = ?", (stored,))
    schema = SchemaStore(path)
    try:
        with structlog.testing.capture_logs() as logs:
            row = schema.get("r1")
        assert row is not None and row.meta.removed_since == ()
        assert [e["event"] for e in logs] == ["store.removed_since_unreadable"]
    finally:
        schema.close()


def user_version(path: Path) -> int:
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def insert_rollout(path: Path, rollout_id: str, *, epoch: int) -> None:
    """A halted rollout of one node as the leader of schema 13 wrote it (its columns only)."""
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO rollouts (id, change, scope_kind, scope_names, node_order, strategy,"
            " max_parallel, failure_budget, freeze, epoch, state, created_at, started_at,"
            " started_by, leader_node, auth_version, undoes, finalizes, when_quiet)"
            " VALUES (?, 'rotate-cert', 'nodes', '[\"alpha\"]', '[\"alpha\"]', 'direct', 1, 0,"
            " 'node', ?, 'halted', ?, ?, 'admin:test', 'alpha', 0, '', '', 0)",
            (rollout_id, epoch, NOW.isoformat(), NOW.isoformat()),
        )
        db.execute(
            "INSERT INTO rollout_nodes (rollout_id, name, state, reason)"
            " VALUES (?, 'alpha', 'failed', '')",
            (rollout_id,),
        )


class StandIn:
    """The Admin service as a leader answers `rollout retry` and `rollout rollback R --yes`:
    its plan leaves out charlie; its start, resolving the scope again, also bravo (removed
    between the two). The CLI must print what the start answered."""

    def RetryRollout(self, request: Any, timeout: float = 30) -> Any:
        view = schema_pb2.RolloutView(id="r2", epoch=2, removed_since=["charlie"])
        view.nodes.add(name="alpha")
        return view

    def PlanRollout(self, request: Any, timeout: float = 30) -> Any:
        view = schema_pb2.RolloutView(removed_since=["charlie"])
        view.nodes.add(name="alpha")
        view.nodes.add(name="bravo")
        return admin_pb2.PlanResponse(rollout=view)

    def StartRollout(self, request: Any, timeout: float = 30) -> Any:
        view = schema_pb2.RolloutView(id="r3", undoes="e1", removed_since=["bravo", "charlie"])
        view.nodes.add(name="alpha")
        return view


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """``StandIn`` for the leader; reading the schema back fails the test (review rev50f L3:
    the CLI named the nodes left out from a read-back that raced another start)."""

    @contextlib.contextmanager
    def admin(self: Leader) -> Iterator[Any]:
        yield StandIn()

    def read_back(self: Leader, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"read back from the leader: {args[:1]}")

    monkeypatch.setattr(Leader, "admin", admin)
    monkeypatch.setattr(Leader, "require_same_code", lambda self: None)
    monkeypatch.setattr(Leader, "unary", read_back)
    monkeypatch.setattr(Leader, "unary_json", read_back)


def tlsroll(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--socket", str(tmp_path / "admin.sock"), *args])
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    return code, captured.out


@pytest.mark.usefixtures("stand_in")
def test_the_cli_names_the_nodes_the_start_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rollout retry` and `rollout rollback R --yes` name the nodes left out as the start
    answered (``RolloutView.removed_since``), not as the schema read back after it, or the
    plan, said (review rev50f L3)."""
    code, said = tlsroll(capsys, tmp_path, "rollout", "retry", "r1")
    assert code == 0, said
    assert "  charlie left out: removed since (tlsroll nodes remove)" in said.splitlines(), said
    code, said = tlsroll(capsys, tmp_path, "rollout", "rollback", "e1", "--yes")
    assert code == 0, said
    lines = said.splitlines()
    for name in ("bravo", "charlie"):
        assert f"  {name} left out: removed since (tlsroll nodes remove)" in lines, said


@pytest.mark.parametrize("retry", [False, True], ids=["another", "its retry"])
async def test_a_named_way_back_takes_back_what_that_rollout_or_its_retry_switched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retry: bool
) -> None:
    """`rollout rollback e1` takes back what e1 switched or began to (alpha done, bravo
    needs the admin: its switch may have left it on https). charlie, which e1 halted before
    (left pending), goes back if e1's retry switched it (the same rollout carried on), not if
    another enable-tls did (review s70 review2: every node e1 did not skip went back, so
    naming e1 undid another rollout's switch of charlie). delta, failed in e1 (its preflight,
    its stage or its switch refused: nothing on it changed, session 71), is not taken back."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands = leader_.schema, leader_.commands
    names = ["alpha", "bravo", "charlie", "delta"]
    e1 = rollout(schema, "e1", Change.ENABLE_TLS, names)
    states = {
        "alpha": NodeState.DONE,
        "bravo": NodeState.NEEDS_ATTENTION,
        "charlie": NodeState.PENDING,
        "delta": NodeState.FAILED,
    }
    records = [replace(r, state=states[r.name]) for r in e1.records]
    head = e1.rollout.with_event(RolloutEvent.FAILURE_BUDGET_EXCEEDED)
    schema.save_states(e1, head.with_event(RolloutEvent.NODES_SETTLED), records, NOW, "engine")
    later = rollout(schema, "e2", Change.ENABLE_TLS, ["charlie"], retry_of="e1" if retry else "")
    settle(schema, later, {"charlie"})
    request = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id="e1")
    planned = await commands.plan(request)
    expected = ["alpha", "bravo", "charlie"] if retry else ["alpha", "bravo"]
    assert sorted(r.name for r in planned.records) == expected, planned.records
    await leader_.stop()
