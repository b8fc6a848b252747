"""A node whose way back failed is ``needs_attention``: its own state in the store, the schema,
``--json`` and the CLI, with an exit code of its own — not ``rolled_back`` with words in a
reason. The engine's side (an agent transaction that ends ``failed``) is in test_engine.py;
here a real leader serves a schema prepared in its store before it starts.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import pytest

from leader.cli.rollout import attention_line
from leader.rollout_core import (
    Change,
    NodeRecord,
    NodeState,
    Rollout,
    RolloutEvent,
    Scope,
    cut_off_mid_switch,
)
from leader.schema_store import RolloutMeta, SchemaStore
from tests.cluster import Cluster
from tests.conftest import next_loopback

NOW = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
WHY = "outside check failed: https://x: refused; the rollback failed too: restart: no answer"


def store_rollout(
    cluster: Cluster,
    rid: str,
    states: dict[str, NodeState],
    reason: str,
    change: Change = Change.DISABLE_TLS,
) -> None:
    schema = SchemaStore(cluster.store_path)
    try:
        rollout = Rollout(rid, change, Scope.of_nodes(states), tuple(states), epoch=1)
        row = schema.create(
            rollout.with_event(RolloutEvent.START),
            [NodeRecord(n) for n in states],
            RolloutMeta(created_at=NOW, started_by="admin:test", leader_node=""),
            NOW,
        )
        ended = row.rollout.with_event(RolloutEvent.FAILURE_BUDGET_EXCEEDED).with_event(
            RolloutEvent.NODES_SETTLED
        )
        records = [
            NodeRecord(n, s, reason if s is not NodeState.DONE else "") for n, s in states.items()
        ]
        schema.save_states(row, ended, records, NOW, "engine", "halted: see the nodes")
    finally:
        schema.close()


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("attention"), next_loopback()) as c:
        c.init()
        yield c


def test_needs_attention_is_shown_apart_and_exits_4(cluster: Cluster) -> None:
    store_rollout(cluster, "r-att", {"a1": NodeState.DONE, "a2": NodeState.NEEDS_ATTENTION}, WHY)
    cluster.start_leader()
    result = cluster.cli("rollout", "status")
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "needs_attention" in result.stdout and "the rollback failed too" in result.stdout
    assert result.stderr.startswith("tlsroll: a2 need(s) attention")
    assert result.stderr.count("\n") == 1

    data = json.loads(cluster.cli("schema", "show", "--json").stdout)
    states = {n["name"]: n["state"] for n in data["rollouts"][0]["nodes"]}
    assert states == {"a1": "done", "a2": "needs_attention"}


def test_a_halted_rollout_without_attention_exits_3(cluster: Cluster) -> None:
    store_rollout(cluster, "r-rb", {"b1": NodeState.ROLLED_BACK}, "verify: port 8443 closed")
    cluster.start_leader()
    result = cluster.cli("rollout", "status", "--json")
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["state"] == "halted"
    # One line on stderr: the way on (issue 16: every halted rollout names the next command).
    assert result.stderr.startswith(
        "tlsroll: rollout r-rb halted; to finish the nodes it left: tlsroll rollout retry r-rb"
    )
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("states", "back"),
    [
        ({"e1": NodeState.ROLLED_BACK, "e2": NodeState.SKIPPED}, ""),
        (
            {"e1": NodeState.DONE, "e2": NodeState.ROLLED_BACK},
            " (or go back to http: tlsroll rollout rollback)",
        ),
    ],
    ids=["none-switched", "one-switched"],
)
def test_a_halted_enable_tls_offers_the_way_back_only_if_it_switched_a_node(
    cluster: Cluster, states: dict[str, NodeState], back: str
) -> None:
    """Review s63 faults, L1: a halted enable-tls rollout that switched no node offered `rollout
    rollback`, which then refused it ("switched no node; nothing to undo"): the way back is
    offered only once a node is done (or dual)."""
    store_rollout(cluster, "r-en", states, "verify: port 8443 closed", Change.ENABLE_TLS)
    cluster.start_leader()
    result = cluster.cli("rollout", "status")
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stderr == (
        f"tlsroll: rollout r-en halted; to finish the nodes it left: tlsroll rollout retry r-en"
        f"{back}\n"
    )


def test_a_node_cut_off_during_its_switch_is_not_fixed_by_hand(cluster: Cluster) -> None:
    """s51 (found by tests/test_cut_off_live.py): a node whose agent was cut off during its
    switch (its certificate revoked: a machine lost or stolen) needs attention as its outcome
    is not known; `rollout status` said of it "neither on the new settings nor back on the old
    ones; ... fix the server by hand", which no one can on a machine gone: it says its agent
    was cut off, and `tlsroll nodes remove` as its reason does. Another node needing attention
    keeps its line, in the same one."""
    store_rollout(
        cluster,
        "r-cut",
        {"c1": NodeState.DONE, "c2": NodeState.NEEDS_ATTENTION},
        cut_off_mid_switch("c2"),
    )
    cluster.start_leader()
    result = cluster.cli("rollout", "status")
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert result.stderr == (
        "tlsroll: c2 need(s) attention: its agent was cut off during its switch (certificate"
        " revoked), what it runs is not known (see the reason above): `tlsroll nodes remove"
        " c2` once the rollout has ended; to take the other nodes back meanwhile: see the"
        " rollout's note above\n"
    ), result.stderr


def test_the_attention_line_of_nodes_cut_off_and_of_nodes_to_fix_by_hand() -> None:
    """Several cut-off nodes, and one to fix by hand beside them: one line, each kind named
    with its own way on."""
    line = attention_line(
        [("a", WHY), ("c", cut_off_mid_switch("c")), ("b", cut_off_mid_switch("b"))]
    )
    assert line == (
        "a need(s) attention: neither on the new settings nor back on the old ones; see the"
        " reason above, fix the server by hand; c, b need(s) attention: their agents were cut"
        " off during their switches (certificates revoked), what they run is not known (see"
        " the reason above): `tlsroll nodes remove NAME` for each once the rollout has ended"
    )
    assert "\n" not in line
