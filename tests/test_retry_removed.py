"""`rollout retry` of a rollout that left a node whose agent is cut off (s50retry): the halt
says `tlsroll nodes remove NODE`; before that is done, the retry is refused saying so (not
"offline"); once done, the retry leaves the node out (it was refused "not enrolled") and the
CLI names it. A node merely offline is refused as before. In-process on a real store with
the engine harness of tests/test_engine.py; the CLI's part on its pure helper. The real
leader, agents and CLI: tests/test_reenrol_ended.py."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from leader import planner
from leader.cli.rollout import removed_since
from leader.commands import NotRetriable, RolloutRequest
from leader.rollout_core import Change, NodeState, Rollout, Scope, cut_off_halt
from leader.schema_view import rollout_view
from leader.service import ERRORS
from leader.store import Store
from leader.wire import NODE_STATE
from tests.test_repeated_commands import ADMIN, NOW, rollout, settle
from tlsroll.rpc import status_for
from tlsroll.v1 import schema_pb2


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
    # What the CLI prints after the retry's start line: the node left out, from the two views.
    old = schema.get("r1")
    assert old is not None
    assert removed_since(rollout_view(old), rollout_view(retried).nodes) == ["charlie"]
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


def test_removed_since_names_only_nodes_the_retry_dropped() -> None:
    """Nodes done in the retried rollout are not named; nor is anything when the retried
    rollout cannot be read (None)."""
    old = schema_pb2.RolloutView(id="r1")
    for name, state in (("a", NodeState.DONE), ("b", NodeState.FAILED), ("c", NodeState.SKIPPED)):
        old.nodes.add(name=name, state=NODE_STATE.wire(state))
    new = schema_pb2.RolloutView(id="r2")
    new.nodes.add(name="b")
    assert removed_since(old, new.nodes) == ["c"]
    assert removed_since(old, new.nodes, done_too=True) == ["a", "c"]
    assert removed_since(None, new.nodes) == []


async def test_the_way_back_of_a_named_rollout_leaves_out_its_nodes_removed_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rollout rollback R` takes R's nodes back; one removed since (as a cut-off halt
    advises) refused the way back as "not enrolled: charlie". It is left out now (logged;
    the CLI names it, ``removed_since(..., done_too=True)``); with every node of R removed,
    one line says there is nothing to take back."""
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
    old = schema.get("e1")
    assert old is not None
    shown = [schema_pb2.NodeView(name=r.name) for r in planned.records]  # (the plan's)
    assert removed_since(rollout_view(old), shown, done_too=True) == ["charlie"]
    for name in ("alpha", "bravo"):
        remove(store, name)
    with pytest.raises(planner.PlanError) as refused:
        await commands.plan(request)
    assert str(refused.value) == (
        "nothing to take back: the nodes of rollout e1 were removed since (alpha, bravo,"
        " charlie); see: tlsroll schema show"
    )
    await leader_.stop()
