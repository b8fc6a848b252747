"""An agent too old for a change is named before it is asked (audit s40upg M3).

A request field that carries behaviour is dropped unread by an agent that does not know it
(proto3): ``SwitchRequest.keep_http`` to such an agent turns transitional phase 1 into a
direct switch. So agents report the features they implement (``tlsroll.features``) with their
heartbeats; the leader keeps them with the node, a plan shows a node whose agent lacks one the
change needs as blocked (exit 1), a start refuses it, ``tlsroll nodes`` marks it, and the agent
pool never sends such a request to it (``leader.agent_features``, one table).

The pure table and its uses first; then a real leader and real agents, one of which reports
no features (``TLSROLL_AGENT_TEST_FEATURES``, a test-only switch of what the agent reports).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import socket
import sqlite3
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader import agent_features as af
from leader.agent_client import AgentClient, NotHeardYet, NotSent, StepFailed, SwitchRefused
from leader.planner import AgentsTooOld, plan_rollout, too_old
from leader.rollout_core import (
    BLOCKED,
    Change,
    Client,
    FreezeMode,
    NodeObservation,
    NodeState,
    Scope,
    Strategy,
    blocked_too_old,
)
from leader.schema_store import write_clients
from leader.service import agent_features_of
from leader.store import Node, NodeCert, Store
from refserver.server import START_DELAY_ENV
from tests.cluster import LEADER_POLL, Cluster, wait_until
from tests.leader_rig import _enrol
from tests.nodeside import cluster_of
from tests.test_level_based import live, password_file
from tlsroll import features, pki
from tlsroll.defaults import CONTROL_PORT
from tlsroll.errors import TransientError
from tlsroll.v1 import agent_pb2, leader_pb2

ALL = features.AGENT_FEATURES
T0 = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)

# --- the names -------------------------------------------------------------------------------


def test_the_agent_implements_every_feature_this_leader_may_need() -> None:
    """A build's agent and leader go together: the leader needs nothing its own agent lacks,
    and every feature the agent names has words for a node's "too old for …"."""
    assert frozenset(ALL) == af.EVERYTHING
    assert list(ALL) == sorted(set(ALL))
    assert features.reported(ALL) == ALL


def test_reported_names_are_cleaned_and_bounded() -> None:
    """A peer wrote them: well formed names only, sorted, once each, at most 32."""
    assert features.reported(["switch.keep_http", "x" * 65, "Bad Name", "a.b", "a.b", ""]) == (
        "a.b",
        "switch.keep_http",
    )
    many = [f"f{i:03d}" for i in range(200)]
    assert len(features.reported(many)) == features.MAX_FEATURES


def test_a_feature_named_late_is_read_from_a_later_features_name() -> None:
    """An agent of sessions 64 to 69 looks for an edited config and keeps it on the way back
    (session 59) but names no feature for it: a feature of its own release implies it, and an
    agent naming neither lacks it (review s70 compat)."""
    session_68 = sorted(set(ALL) - {features.EDITED_CONFIG})
    assert features.EDITED_CONFIG in features.reported(session_68)
    for later in (features.HELD_CRL, features.SWITCH_QUIET):
        assert features.reported([later]) == tuple(sorted({later, features.EDITED_CONFIG}))
    before_59 = [features.KEEP_HTTP, features.ROLLBACK_UNDOES, features.FREEZE_LEASE]
    assert features.reported(before_59) == tuple(sorted(before_59))
    assert af.too_old_for(features.reported(session_68)) == ()
    assert af.too_old_for(features.reported(before_59), {features.EDITED_CONFIG}) == (
        "keeping a server config edited by hand on the way back",
    )


def test_the_test_switch_of_what_an_agent_reports() -> None:
    assert features.agent_features({}) == ALL
    assert features.agent_features({features.TEST_ENV: ""}) == ()
    assert features.agent_features({features.TEST_ENV: " rollback.undoes , "}) == (
        "rollback.undoes",
    )


# --- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "strategy", "freeze", "own", "needed"),
    [
        (Change.ENABLE_TLS, Strategy.DIRECT, FreezeMode.NODE, False, set()),
        (Change.ENABLE_TLS, Strategy.TRANSITIONAL, FreezeMode.NODE, False, {features.KEEP_HTTP}),
        (Change.FINALIZE, Strategy.DIRECT, FreezeMode.NODE, False, set()),
        (Change.CHANGE_PASSWORD, Strategy.DIRECT, FreezeMode.NODE, False, set()),
        (Change.ROTATE_CERT, Strategy.DIRECT, FreezeMode.NODE, True, {features.OWN_CERTIFICATE}),
        (Change.DISABLE_TLS, Strategy.DIRECT, FreezeMode.NODE, False, {features.ROLLBACK_UNDOES}),
        (
            Change.ENABLE_TLS,
            Strategy.DIRECT,
            FreezeMode.SCOPE,
            False,
            {features.SWITCH_KEEP_FROZEN, features.ROLLBACK_KEEP_FROZEN, features.FREEZE_LEASE},
        ),
    ],
)
def test_what_a_rollout_needs_of_its_agents(
    change: Change, strategy: Strategy, freeze: FreezeMode, own: bool, needed: set[str]
) -> None:
    assert af.rollout_needs(change, strategy, freeze, own) == needed


def test_what_a_request_needs_by_what_it_carries() -> None:
    """The same table, read from the request the agent pool is about to send."""
    switch = agent_pb2.SwitchRequest(keep_http=True, keep_frozen=True)
    assert af.request_needs(switch) == {features.KEEP_HTTP, features.SWITCH_KEEP_FROZEN}
    assert af.request_needs(agent_pb2.SwitchRequest(auth_verifier_json="{}")) == set()
    # ``undoes`` set, even empty, is the way back's: an agent that drops it undoes another switch
    assert af.request_needs(agent_pb2.RollbackRequest(undoes="")) == {features.ROLLBACK_UNDOES}
    assert af.request_needs(agent_pb2.RollbackRequest()) == set()
    stage = agent_pb2.StageRequest(switch_to_come=agent_pb2.SwitchToCome(keep_http=True))
    assert af.request_needs(stage) == {features.KEEP_HTTP}
    own = agent_pb2.StageRequest(own_certificate=True, private_key_pem=b"k")
    assert af.request_needs(own) == {features.OWN_CERTIFICATE}
    assert af.request_needs(agent_pb2.FreezeRequest(lease_seconds=30)) == {features.FREEZE_LEASE}
    assert af.request_needs(agent_pb2.FreezeRequest()) == set()  # an unfreeze
    begin = agent_pb2.GetTransactionRequest(switch=switch)
    assert af.request_needs(begin) == af.request_needs(switch)
    assert af.request_needs(agent_pb2.CheckRequest(warm_certificates=True)) == set()
    # A --when-quiet finalize's switch: an agent that dropped quiet_seconds unread switched on
    # the leader's view alone (review b3 of s64, M2)
    quiet = agent_pb2.SwitchRequest(quiet_seconds=600)
    assert af.request_needs(quiet) == {features.SWITCH_QUIET}


def test_a_when_quiet_finalize_needs_its_agents_to_look_afresh() -> None:
    """Review b3 of s64 (M2): what a `finalize --when-quiet` needs of its agents (the plan
    blocks one lacking it as too old, as for every field that carries behaviour): the
    feature ``switch.quiet_seconds``; a plain finalize needs nothing."""
    assert af.rollout_needs(Change.FINALIZE, Strategy.DIRECT, FreezeMode.NODE, False, True) == {
        features.SWITCH_QUIET
    }
    assert af.rollout_needs(Change.FINALIZE, Strategy.DIRECT, FreezeMode.NODE, False) == set()
    assert af.too_old_for([], {features.SWITCH_QUIET}) == ("finalize --when-quiet",)


def test_too_old_says_which_version_for_what_and_what_to_do() -> None:
    needs = af.rollout_needs(Change.ENABLE_TLS, Strategy.TRANSITIONAL, FreezeMode.NODE, False)
    assert af.too_old("0.2.0", ALL, needs) is None
    assert af.too_old("0.2.0", (), needs) == (
        "its agent (tlsroll 0.2.0) is too old for the transitional strategy: upgrade it first"
    )
    # An agent that names none is of an earlier release: it lacks every feature.
    assert af.too_old_for(()) == tuple(dict.fromkeys(af.WHAT[f] for f in sorted(ALL)))
    assert af.too_old_for(ALL) == ()
    scope = af.rollout_needs(Change.ENABLE_TLS, Strategy.DIRECT, FreezeMode.SCOPE, False)
    assert af.too_old_for([features.SWITCH_KEEP_FROZEN], scope) == ("--freeze scope",)


# --- the planner -----------------------------------------------------------------------------


def test_a_plan_blocks_a_node_whose_agent_is_too_old_and_a_start_refuses_it() -> None:
    seen = NodeObservation(True, "", ("http",))
    _rollout, records = plan_rollout(
        rollout_id="r1",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": True, "c": True},
        leader="a",
        epoch=1,
        strategy=Strategy.TRANSITIONAL,
        observed={"a": seen, "b": seen, "c": seen},
        agents={"a": ("0.2.0", ALL), "b": ("0.1.9", ()), "c": ("0.2.0", ALL)},
    )
    by_name = {r.name: r for r in records}
    assert by_name["a"].reason == "" and by_name["c"].reason == ""
    assert by_name["b"].state is NodeState.PENDING
    assert by_name["b"].reason == (
        f"{BLOCKED} its agent (tlsroll 0.1.9) is too old for the transitional strategy: "
        "upgrade it first"
    )
    assert blocked_too_old(by_name["b"].reason)
    old = too_old(records)
    assert list(old) == ["b"]
    refusal = str(AgentsTooOld(Change.ENABLE_TLS, old))
    assert refusal.startswith("enable-tls cannot start: b (its agent (tlsroll 0.1.9) is too old")
    assert refusal.endswith("(or leave it out: --nodes); nothing was changed")
    # The same agents under a direct switch: nothing it sends needs a feature.
    _rollout, direct = plan_rollout(
        rollout_id="r2",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=1,
        observed={"a": seen, "b": seen},
        agents={"a": ("0.2.0", ALL), "b": ("0.1.9", ())},
    )
    assert not too_old(direct)


def test_a_plan_waits_for_an_agent_not_heard_since_the_leader_started() -> None:
    """Review of s63-f1, L-3: of an agent the leader has not heard since it started, the plan
    has only what the store kept (a former process's, which a kill may have left without the
    agent's first heartbeat): one that lacks a feature there is blocked, to wait for its first
    heartbeat, not told to upgrade; a start refuses it as it refuses one too old. One whose
    stored report suffices is planned, as the pool sends to it."""
    seen = NodeObservation(True, "", ("http",))
    _rollout, records = plan_rollout(
        rollout_id="r1",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": True, "c": True},
        leader="a",
        epoch=1,
        freeze=FreezeMode.SCOPE,
        observed={"a": seen, "b": seen, "c": seen},
        agents={"a": ("0.2.0", ALL), "b": ("0.2.0", ()), "c": ("0.1.9", ())},
        not_heard={"a", "b"},
    )
    by_name = {r.name: r for r in records}
    assert by_name["a"].reason == ""
    assert by_name["b"].reason == (
        f"{BLOCKED} its agent (tlsroll 0.2.0) has not been heard since the leader started, and"
        " the store holds no word that it implements --freeze scope: wait for its first"
        " heartbeat (an interval or so), then try again"
    )
    assert by_name["c"].reason.endswith("is too old for --freeze scope: upgrade it first")
    assert sorted(too_old(records)) == ["b", "c"]  # a start refuses both


# --- the agent pool: never sent --------------------------------------------------------------


def node_of(features_reported: tuple[str, ...], version: str = "0.1.9") -> Node:
    return Node(
        name="old1",
        addresses=("127.0.0.1",),
        dns_names=(),
        agent_version=version,
        agent_port=9,  # (nothing is dialled: a refused request opens no channel)
        key_pin="sha256:pin",
        cert_fingerprint="sha256:fp",
        cert_serial="1",
        cert_not_after=T0,
        enrolled_at=T0,
        last_heartbeat=T0,
        agent_features=features_reported,
    )


async def test_the_agent_pool_never_sends_what_the_agent_would_drop() -> None:
    """Defence in depth: whatever planned it, a request carrying a feature the node's agent
    has not reported is refused (FAILED_PRECONDITION, naming the node) and never sent: the
    client opens no channel for it."""
    client = AgentClient(node_of(()), grpc.ssl_channel_credentials(), "td.example")
    dual = agent_pb2.SwitchRequest(
        command=agent_pb2.Command(rollout_id="r1", epoch=1), keep_http=True
    )
    asked: list[agent_pb2.GetTransactionRequest] = []

    async def has_none(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        """The agent's answer to the question that needs no feature: no such switch."""
        asked.append(request)
        raise StepFailed("no switch transaction for rollout r1 (NOT_FOUND)", NOT_FOUND)

    client.get_transaction = has_none  # type: ignore[method-assign]
    with pytest.raises(SwitchRefused) as refused:
        async for _txn in client.switch_and_watch(dual):
            pytest.fail("a state of a switch that must not begin")
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert str(refused.value).startswith(
        "old1: its agent (tlsroll 0.1.9) is too old for the transitional strategy"
    )
    # Refused only once the agent said it has no such switch (review s63 faults, M1): asked
    # with a plain GetTransaction, which carries nothing an agent could drop.
    assert [(r.rollout_id, r.HasField("switch")) for r in asked] == [("r1", False)]
    with pytest.raises(StepFailed, match="too old for the transitional strategy"):
        await client.switch(dual)
    with pytest.raises(StepFailed, match="too old for the transitional strategy"):
        await client.stage(
            agent_pb2.StageRequest(switch_to_come=agent_pb2.SwitchToCome(keep_http=True))
        )
    with pytest.raises(StepFailed, match="too old for disable-tls"):
        await client.rollback(agent_pb2.RollbackRequest(undoes=""))
    with pytest.raises(StepFailed, match="too old for --freeze scope"):
        await client.freeze(agent_pb2.FreezeRequest(lease_seconds=300))
    with pytest.raises(StepFailed, match="too old for --cert-dir"):
        await client.stage(agent_pb2.StageRequest(own_certificate=True))
    assert not client.open and client.in_flight == 0
    # An agent that reported the feature is sent it (here: dialled, and nothing answers).
    able = AgentClient(node_of(ALL), grpc.ssl_channel_credentials(), "td.example")
    able._sendable(dual)  # the check alone: no refusal
    await client.close()
    await able.close()


NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def test_a_switch_the_leader_may_not_send_is_followed_if_its_agent_has_it() -> None:
    """Review s63 faults, M1: the leader's own refusal to send a Switch is no word that
    nothing began (a run of the step before a leader restart may have sent it): the agent is
    asked with a plain GetTransaction, and the switch it has is followed to its outcome with a
    plain watch (neither carries what the agent lacks). A refusal of that question says
    nothing either: unknown, the step runs again (``TransientError``), never "refused"."""
    client = AgentClient(node_of(()), grpc.ssl_channel_credentials(), "td.example")
    scoped = agent_pb2.SwitchRequest(
        command=agent_pb2.Command(rollout_id="r1", epoch=1), keep_frozen=True
    )
    done = agent_pb2.Transaction(
        kind=agent_pb2.TRANSACTION_KIND_SWITCH,
        phase=agent_pb2.TRANSACTION_PHASE_COMPLETED,
        outcome=agent_pb2.TRANSACTION_OUTCOME_COMPLETED,
    )
    watched: list[bool] = []

    async def has_it(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        return done

    async def watch(request: agent_pb2.GetTransactionRequest) -> AsyncGenerator[Any, None]:
        client._sendable(request)  # (the real one's first act: a begin is refused here)
        watched.append(request.HasField("switch"))
        yield done

    client.get_transaction = has_it  # type: ignore[method-assign]
    client.watch_transaction = watch  # type: ignore[method-assign]
    states = [t async for t in client.switch_and_watch(scoped)]
    assert states == [done] and watched == [False]

    async def refuses(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        raise StepFailed("bad caller (PERMISSION_DENIED)", grpc.StatusCode.PERMISSION_DENIED)

    client.get_transaction = refuses  # type: ignore[method-assign]
    with pytest.raises(TransientError, match="may have begun, its state is unknown"):
        async for _txn in client.switch_and_watch(scoped):
            pytest.fail("no state: the question was refused")
    assert not client.open and client.in_flight == 0
    await client.close()


async def test_an_agent_not_heard_since_the_leader_started_is_asked() -> None:
    """What the store holds of an agent the leader has not heard since it started is a former
    leader process's, and may lack the features of the agent's first heartbeat (a group
    commit lost with a killed leader). A request that needs a feature it lacks is judged by
    what the agent says when asked over the channel (GetStatus, which needs no feature), each
    time: it is sent if the agent implements it, refused as too old if it does not, and not
    sent while the agent does not answer (``NotHeardYet``, a ``TransientError``: the step runs
    again). Session 64: it waited for a heartbeat that might never come (its heartbeats do
    not reach the restarted leader, while the leader reaches it), and a scope freeze's renewal
    held every further switch without limit. Heard since, its heartbeats count, and it is not
    asked."""
    heard: dict[str, tuple[str, ...]] = {}
    client = AgentClient(node_of(()), grpc.ssl_channel_credentials(), "td.example", heard=heard.get)
    command = agent_pb2.Command(rollout_id="r1", epoch=1)
    requests: list[Any] = [
        agent_pb2.SwitchRequest(command=command, keep_frozen=True),
        agent_pb2.RollbackRequest(command=command, undoes=""),
        agent_pb2.FreezeRequest(lease_seconds=300),
        agent_pb2.StageRequest(own_certificate=True),
    ]
    answers: list[agent_pb2.NodeStatus | TransientError] = []
    asked: list[int] = []

    async def get_status(request: agent_pb2.GetStatusRequest, timeout: float = 30) -> Any:
        asked.append(1)
        answer = answers[0]
        if isinstance(answer, TransientError):
            raise answer
        return answer

    client.get_status = get_status  # type: ignore[method-assign]
    answers[:] = [TransientError("agent old1 unreachable (UNAVAILABLE)")]
    for request in requests:
        with pytest.raises(NotHeardYet, match="not heard since the leader started") as waits:
            await client._may_send(request)
        assert str(waits.value).endswith(
            "asked over its channel it did not say (agent old1 unreachable (UNAVAILABLE)): the"
            " leader sent it nothing, and asks again as the step runs again"
        )
    assert len(asked) == len(requests)  # once per request, not kept

    async def has_none(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        raise StepFailed("no switch transaction for rollout r1 (NOT_FOUND)", NOT_FOUND)

    client.get_transaction = has_none  # type: ignore[method-assign]
    with pytest.raises(NotHeardYet, match=r"needs \(--freeze scope\)"):
        async for _txn in client.switch_and_watch(requests[0]):
            pytest.fail("nothing is sent")
    asked.clear()
    await client._may_send(agent_pb2.SwitchRequest(command=command))  # needs nothing: sent
    assert asked == []  # (and not asked)
    answers[:] = [agent_pb2.NodeStatus(agent_version="0.3.0", features=ALL)]
    for request in requests:  # it says it implements them: sent
        await client._may_send(request)
    assert len(asked) == len(requests)
    answers[:] = [agent_pb2.NodeStatus(agent_version="0.1.8\x1b[2J", features=[])]
    with pytest.raises(NotSent, match=r"agent \(tlsroll 0\.1\.8.*\) is too old for --freeze scope"):
        await client._may_send(requests[2])  # it says it implements none: too old
    with pytest.raises(SwitchRefused, match="too old for --freeze scope"):
        async for _txn in client.switch_and_watch(requests[0]):
            pytest.fail("nothing is sent")
    asked.clear()
    heard["old1"] = ALL  # its first heartbeat since: what it says counts, not asked
    for request in requests:
        await client._may_send(request)
    heard["old1"] = ()  # it said it implements none: too old, whatever was stored
    with pytest.raises(NotSent, match="too old for --freeze scope"):
        await client._may_send(requests[2])
    assert asked == []
    assert not client.open and client.in_flight == 0
    await client.close()


async def test_a_switch_its_agent_has_is_followed_before_its_first_heartbeat() -> None:
    """Review of s63-f1, L-2: an agent not heard since the leader started (its heartbeats do
    not reach the leader, say, while the leader reaches it) was waited for before anything
    was asked, so a resumed switch it had begun, or completed, waited behind a heartbeat
    that might never come (the rollout, and a scope freeze, without limit). It is asked first
    with the plain GetTransaction (which needs no feature) and the switch it has is followed;
    only if it has none is it asked what it implements (``_may_send``: session 64), then sent
    the switch or refused."""
    client = AgentClient(
        node_of(()), grpc.ssl_channel_credentials(), "td.example", heard=lambda name: None
    )
    scoped = agent_pb2.SwitchRequest(
        command=agent_pb2.Command(rollout_id="r1", epoch=1), keep_frozen=True
    )
    with pytest.raises(NotHeardYet):
        client._sendable(scoped)  # (the leader sends it nothing)
    done = agent_pb2.Transaction(
        kind=agent_pb2.TRANSACTION_KIND_SWITCH,
        phase=agent_pb2.TRANSACTION_PHASE_COMPLETED,
        outcome=agent_pb2.TRANSACTION_OUTCOME_COMPLETED,
    )
    asked: list[tuple[str, bool]] = []
    watched: list[bool] = []

    async def has_it(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        asked.append((request.rollout_id, request.HasField("switch")))
        return done

    async def watch(request: agent_pb2.GetTransactionRequest) -> AsyncGenerator[Any, None]:
        client._sendable(request)  # (the real one's first act: a begin is not sent)
        watched.append(request.HasField("switch"))
        yield done

    client.get_transaction = has_it  # type: ignore[method-assign]
    client.watch_transaction = watch  # type: ignore[method-assign]
    states = [t async for t in client.switch_and_watch(scoped)]
    assert states == [done]
    assert asked == [("r1", False)] and watched == [False]
    assert not client.open and client.in_flight == 0
    await client.close()


def test_the_store_says_what_an_agent_reported_since_it_opened(tmp_path: Path) -> None:
    """``Store.features_heard``: None until the agent's first heartbeat since the store
    opened (what the row holds is an earlier process's), then what the newest said, queued
    or written; a store opened again has heard nothing."""
    path = tmp_path / "leader.sqlite3"
    store = Store(path)
    try:
        _enrol(store, pki.CertificateAuthority.create(), "n1", "127.0.0.1", T0)
        assert store.features_heard("n1") is None
        store.heartbeat("n1", "0.2", now=T0, features=ALL)
        assert store.features_heard("n1") == ALL
        store.queue_heartbeat("n1", "0.1", now=T0 + dt.timedelta(seconds=2), features=())
        assert store.features_heard("n1") == ()
        store.write_queued()
        assert store.features_heard("n1") == ()
        assert store.features_heard("n2") is None
    finally:
        store.close()
    store = Store(path)
    try:
        assert store.get_node("n1").agent_features == ()
        assert store.features_heard("n1") is None
    finally:
        store.close()


def test_a_heartbeat_with_other_features_has_the_pool_read_the_node_again(tmp_path: Path) -> None:
    """An agent upgraded (or replaced by an older build) says so with its next heartbeat; the
    store shows it at once (queued for the group commit or written), and the agent pool,
    which reads a node again only when ``nodes_generation`` moves (``AgentPool.get``), reads
    it again: it sends by what the agent implements now."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        _enrol(store, pki.CertificateAuthority.create(), "n1", "127.0.0.1", T0)
        assert store.get_node("n1").agent_features == ()
        store.heartbeat("n1", "0.1", now=T0, features=())
        generation = store.nodes_generation
        store.heartbeat("n1", "0.1", now=T0 + dt.timedelta(seconds=1), features=())
        assert store.nodes_generation == generation  # nothing new: not read again
        assert store.queue_heartbeat("n1", "0.2", now=T0 + dt.timedelta(seconds=2), features=ALL)
        assert store.nodes_generation > generation
        assert store.get_node("n1").agent_features == ALL  # (queued: shown at once)
        store.write_queued()
        with store.db.read() as db:
            (stored,) = db.execute("SELECT agent_features FROM nodes WHERE name = 'n1'").fetchone()
        assert json.loads(stored) == list(ALL)
        assert [n.agent_features for n in store.list_nodes()] == [ALL]
    finally:
        store.close()


def test_a_heartbeat_being_committed_is_shown_with_what_it_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI of session 55: a transitional rollout started right after its agents' first
    heartbeats halted, its first Stage refused as "too old for the transitional strategy": the
    agent pool read the node while the group commit that held those heartbeats was under way
    (taken from the queue, not yet committed), so without their features, at the
    ``nodes_generation`` they had moved on, and kept that node. A record being committed is
    shown as a queued one is (``Store._being_written``); so is one a direct write has taken
    (review rev55d M2); and a reader looks at memory inside its read, so that a write that
    ends after the row was read is still shown (review rev55d M1)."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        _enrol(store, pki.CertificateAuthority.create(), "n1", "127.0.0.1", T0)
        assert store.queue_heartbeat("n1", "0.2", now=T0, features=ALL)
        assert store.get_node("n1").agent_features == ALL  # queued: shown
        seen: list[tuple[str, ...]] = []
        tx = store.db.tx

        @contextlib.contextmanager
        def read_first(**kwargs: Any) -> Iterator[sqlite3.Connection]:
            # A reader that takes the store's lock between the batch's take and its commit.
            seen.append(store.get_node("n1").agent_features)
            with tx(**kwargs) as db:
                yield db

        monkeypatch.setattr(store.db, "tx", read_first)
        assert store.write_queued() == 1
        assert seen == [ALL]
        assert store.get_node("n1").agent_features == ALL  # committed
        assert store._being_written == {}
        monkeypatch.setattr(store.db, "tx", tx)

        # A reader whose row was read before a whole batch ended, and its memory looked at after.
        fewer = ALL[:-1]
        assert store.queue_heartbeat("n1", "0.3", now=T0 + dt.timedelta(seconds=1), features=fewer)
        read = store.db.read
        batches: list[int] = []

        @contextlib.contextmanager
        def then_a_batch() -> Iterator[sqlite3.Connection]:
            with read() as db:
                yield db
            if not batches:  # once: the lock let go, the batch runs whole before memory is seen
                batches.append(store.write_queued())

        monkeypatch.setattr(store.db, "read", then_a_batch)
        assert store.get_node("n1").agent_features == fewer and batches == [1]
        batches.clear()
        assert store.queue_heartbeat("n1", "0.4", now=T0 + dt.timedelta(seconds=2), features=ALL)
        assert [n.agent_features for n in store.list_nodes()] == [ALL] and batches == [1]
        monkeypatch.setattr(store.db, "read", read)

        # A direct write (something new the group commit does not wait for): shown while
        # written, over a stored row that says otherwise (review rev55e M1).
        assert store.queue_heartbeat("n1", "0.5", now=T0 + dt.timedelta(seconds=3), features=fewer)
        store.write_queued()
        assert store.get_node("n1").agent_features == fewer  # the row says fewer
        assert store.queue_heartbeat("n1", "0.6", now=T0 + dt.timedelta(seconds=4), features=ALL)
        direct = store._write_heartbeat
        mid: list[tuple[str, ...]] = []

        def read_mid_write(*args: Any) -> None:
            mid.append(store.get_node("n1").agent_features)
            direct(*args)

        monkeypatch.setattr(store, "_write_heartbeat", read_mid_write)
        store.heartbeat("n1", "0.7", now=T0 + dt.timedelta(seconds=5), features=ALL)
        assert mid == [ALL] and store.get_node("n1").agent_features == ALL
        assert store._being_written == {}

        # A direct write that fails: what it took from the queue is queued again (rev55e M2).
        assert store.queue_heartbeat("n1", "0.8", now=T0 + dt.timedelta(seconds=6), features=fewer)
        store.write_queued()
        assert store.queue_heartbeat("n1", "0.9", now=T0 + dt.timedelta(seconds=7), features=ALL)

        def fails(*_args: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store, "_write_heartbeat", fails)
        with pytest.raises(OSError):
            store.heartbeat("n1", "1.0", now=T0 + dt.timedelta(seconds=8), features=ALL)
        assert store.queued() == 1 and store.get_node("n1").agent_features == ALL
        monkeypatch.setattr(store, "_write_heartbeat", direct)
        store.write_queued()
        assert store.get_node("n1").agent_features == ALL
    finally:
        store.close()


def client_rows(store: Store, node: str) -> tuple[int, int]:
    """How many client rows, and client report rows, the store holds for ``node``."""
    with store.db.read() as db:
        rows = db.execute("SELECT count(*) FROM node_clients WHERE node = ?", (node,)).fetchone()
        info = db.execute("SELECT count(*) FROM node_clients_info WHERE node = ?", (node,))
        return rows[0], info.fetchone()[0]


def test_a_client_report_queued_before_a_removal_is_not_written_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev55e L2: a group commit that took a node's client report before `tlsroll nodes
    remove` and committed after the removal's transaction put the removed node's client rows
    back (the removal forgets the queued writes only after its transaction), and a node
    enrolled again under the name inherited the old workstations. The batch writes a report
    only for a node enrolled as it commits."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        _enrol(store, pki.CertificateAuthority.create(), "n1", "127.0.0.1", T0)
        seen = Client("n1", "http", "10.0.0.7", "ws-7", T0, T0, 3)

        def report(db: sqlite3.Connection) -> None:
            write_clients(
                db, "n1", [seen], window_seconds=600, source="refserver", problem="", now=T0
            )

        store.queue_write("n1", report)
        tx = store.db.tx

        @contextlib.contextmanager
        def removed_meanwhile(**kwargs: Any) -> Iterator[sqlite3.Connection]:
            monkeypatch.setattr(store.db, "tx", tx)
            store.remove_node("n1", now=T0, actor="admin:test")  # between the take and commit
            with tx(**kwargs) as db:
                yield db

        monkeypatch.setattr(store.db, "tx", removed_meanwhile)
        store.write_queued()
        assert client_rows(store, "n1") == (0, 0)
    finally:
        store.close()


def test_a_reader_never_misses_writes_that_end_between_its_read_and_its_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev55e L1: a reader that read a node's row before a heartbeat write ended and
    looked at memory after it read again, at most three times (``READ_AGAIN``), then gave the
    row it had: with a write ending after every read (records queued back to back), the node
    showed the features of the write before. A reader now looks at memory inside its read
    (``Store._being_written`` leaves as the write commits, under the same lock): there is no
    window to read again."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        _enrol(store, pki.CertificateAuthority.create(), "n1", "127.0.0.1", T0)
        store.heartbeat("n1", "0.0", now=T0, features=())
        read = store.db.read
        said = iter(range(1, 10_000))

        @contextlib.contextmanager
        def a_write_each_time() -> Iterator[sqlite3.Connection]:
            i = next(said)  # a heartbeat queued as the read begins, written as it ends
            store.queue_heartbeat(
                "n1", f"0.{i}", now=T0 + dt.timedelta(seconds=i), features=ALL[: i % len(ALL)]
            )
            with read() as db:
                yield db
            store.write_queued()

        monkeypatch.setattr(store.db, "read", a_write_each_time)
        readers: list[Callable[[], Node]] = [
            lambda: store.get_node("n1"),
            lambda: store.list_nodes()[0],
        ]
        for reader in readers:
            shown = reader()
            monkeypatch.setattr(store.db, "read", read)
            assert shown.agent_features == store.get_node("n1").agent_features
            assert shown.agent_version == store.get_node("n1").agent_version
            monkeypatch.setattr(store.db, "read", a_write_each_time)
    finally:
        store.close()


def test_a_write_taken_before_a_removal_and_a_new_enrolment_is_not_the_new_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The closing read of session 55 and review rev55e L3: node n1 removed and enrolled
    again (a new agent, a new certificate) while a write of its old agent waited for the
    database. The group commit then wrote the old agent's client report into the new
    enrolment's rows (it skipped only a node removed as it commits), and a direct heartbeat
    write wrote the old agent's version and features into the new enrolment's row, and its
    memory of the node. Both now write only what the enrolment that sent it said: a report
    of a name not forgotten since it was taken, a heartbeat into the row of the certificate
    that sent it."""
    ca = pki.CertificateAuthority.create()
    store = Store(tmp_path / "leader.sqlite3")
    try:
        certs = [_enrol(store, ca, "n1", "127.0.0.1", T0)[1]]
        seen = Client("n1", "http", "10.0.0.7", "ws-7", T0, T0, 3)

        def report(db: sqlite3.Connection) -> None:
            write_clients(
                db, "n1", [seen], window_seconds=600, source="refserver", problem="", now=T0
            )

        def anew() -> None:
            store.remove_node("n1", now=T0, actor="admin:test")
            certs.append(_enrol(store, ca, "n1", "127.0.0.1", T0 + dt.timedelta(seconds=1))[1])

        tx = store.db.tx

        @contextlib.contextmanager
        def enrolled_anew_meanwhile(**kwargs: Any) -> Iterator[sqlite3.Connection]:
            monkeypatch.setattr(store.db, "tx", tx)
            anew()  # between the write's take and its commit
            with tx(**kwargs) as db:
                yield db

        # The group commit's client report.
        store.queue_write("n1", report)
        monkeypatch.setattr(store.db, "tx", enrolled_anew_meanwhile)
        store.write_queued()
        assert client_rows(store, "n1") == (0, 0)

        # A direct heartbeat write of the agent enrolled now (its certificate accepted as the
        # heartbeat came), the node removed and enrolled again while it waits.
        now = certs[-1]
        new_version = store.get_node("n1").agent_version
        monkeypatch.setattr(store.db, "tx", enrolled_anew_meanwhile)
        store.heartbeat(
            "n1",
            "9.9-old",
            now=T0 + dt.timedelta(seconds=2),
            cert_fingerprint=pki.fingerprint(now),
            features=ALL[:1],
        )
        node = store.get_node("n1")
        assert node.cert_fingerprint == pki.fingerprint(certs[-1]) != pki.fingerprint(now)
        assert (node.agent_version, node.agent_features) == (new_version, ())
        assert node.last_heartbeat is None  # the new agent has not been heard yet
        # Without the race, the agent of the enrolment on record is written as before.
        store.heartbeat(
            "n1", "9.9", now=T0 + dt.timedelta(seconds=3), cert_fingerprint=node.cert_fingerprint
        )
        assert store.get_node("n1").agent_version == "9.9"
    finally:
        store.close()


def test_memory_says_what_the_store_holds_after_a_write_not_made_or_failed_after_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev56a: (L2) a direct heartbeat whose certificate is not the row's is not written,
    and memory does not take it as heard either; (L4) a direct write or a group commit that
    fails after its commit (a listener, a ``touch``) does not queue again what it took, which
    would go over what it stored; (pre-existing) an enrolment that fails (the CA refuses)
    forgets nothing of the node enrolled under the name."""
    ca = pki.CertificateAuthority.create()
    store = Store(tmp_path / "leader.sqlite3")
    try:
        _key, cert = _enrol(store, ca, "n1", "127.0.0.1", T0)
        # L2: another certificate's heartbeat (no forget between): neither row nor memory.
        store.heartbeat("n1", "7.7", now=T0, cert_fingerprint="sha256:" + "0" * 64)
        node = store.get_node("n1")
        assert (node.agent_version, node.last_heartbeat) == ("1", None)

        # L4, the direct write: what it took from the queue is not queued again.
        mine = pki.fingerprint(cert)
        assert store.queue_heartbeat("n1", "2", now=T0, cert_fingerprint=mine, features=())
        direct = store._write_heartbeat

        def then_fails(*args: Any) -> None:
            direct(*args)
            raise OSError(5, "Input/output error")  # after the commit

        monkeypatch.setattr(store, "_write_heartbeat", then_fails)
        with pytest.raises(OSError):
            store.heartbeat("n1", "3", now=T0 + dt.timedelta(seconds=1), cert_fingerprint=mine)
        monkeypatch.setattr(store, "_write_heartbeat", direct)
        assert store.queued() == 0 and store.get_node("n1").agent_version == "3"

        # L4, the group commit: what it committed is not queued again.
        later = T0 + dt.timedelta(seconds=2)
        assert store.queue_heartbeat("n1", "4", now=later, cert_fingerprint=mine, features=ALL)
        tx = store.db.tx

        @contextlib.contextmanager
        def fails_after_commit(**kwargs: Any) -> Iterator[sqlite3.Connection]:
            with tx(**kwargs) as db:
                yield db
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(store.db, "tx", fails_after_commit)
        with pytest.raises(OSError):
            store.write_queued()
        monkeypatch.setattr(store.db, "tx", tx)
        assert store.queued() == 0 and store.get_node("n1").agent_version == "4"

        # An enrolment of the name (the same key, a new token) that fails: nothing forgotten
        # (here: the heartbeat record still queued).
        assert store.queue_heartbeat(
            "n1", "5", now=T0 + dt.timedelta(seconds=3), cert_fingerprint=mine, features=()
        )
        store.add_token(
            "t00099", "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description="", now=T0,
            actor="test", node_name="n1", addresses=("127.0.0.1",),
        )  # fmt: skip

        def refused() -> NodeCert:
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError):
            store.enrol(
                token_id="t00099", secret="s" * 26, name="n1", addresses=("127.0.0.1",),
                dns_names=(), agent_version="1", agent_port=9442,
                key_pin=pki.spki_pin(cert), now=T0, issue=refused,
            )  # fmt: skip
        assert store.queued() == 1 and store.get_node("n1").agent_version == "5"
    finally:
        store.close()


# --- a real leader and real agents -------------------------------------------------------------


def features_of(cluster: Cluster, name: str) -> list[str]:
    return list(cluster.list_nodes()[name].agent_features)


@pytest.mark.timeout(300)
def test_a_node_whose_agent_is_too_old_is_named_before_it_is_asked(tmp_path: Path) -> None:
    """node2's agent reports no features (an agent of an earlier release): ``tlsroll nodes``
    marks it, ``tlsroll plan --strategy transitional`` shows it blocked and exits 1, ``rollout
    start --strategy transitional`` is refused and switches nothing (node2 stays on http
    only, node1 too); a direct switch needs no feature and is planned as before. Once its
    agent reports them again (upgraded), the node is planned like any other."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node2 = nodes[1]
        assert node2.agent is not None
        wait_until(
            lambda: features_of(cluster, "node2") == list(ALL),
            30,
            "node2's features",
            interval=LEADER_POLL,
        )
        node2.agent.stop()
        node2.restart_agent({features.TEST_ENV: ""})
        wait_until(
            lambda: cluster.list_nodes()["node2"].online and not features_of(cluster, "node2"),
            60,
            "node2 online, reporting no features",
            interval=LEADER_POLL,
        )

        listed = cluster.cli("nodes")
        assert listed.returncode == 0, listed.stderr
        row2 = next(line for line in listed.stdout.splitlines() if "node2" in line)
        assert "too old for" in row2
        row1 = next(line for line in listed.stdout.splitlines() if "node1" in line)
        assert "too old" not in row1
        as_json = json.loads(cluster.cli("nodes", "--json").stdout)
        by_name = {n["name"]: n for n in as_json}
        assert "the transitional strategy" in by_name["node2"]["agent_too_old_for"]
        assert not by_name["node1"].get("agent_too_old_for")

        plan = cluster.cli("plan", "--scope", "cluster", "--strategy", "transitional")
        assert plan.returncode == 1, plan.stdout + plan.stderr
        assert "its agent (tlsroll" in plan.stdout + plan.stderr
        assert "too old for the transitional strategy: upgrade it first" in plan.stderr
        assert "node2" in plan.stderr and "node1 (" not in plan.stderr

        secret = password_file(tmp_path, "pw", "too-old-agents-password-for-the-practice")
        started = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--strategy", "transitional",
            "--password-file", str(secret), "--yes",
        )  # fmt: skip
        assert started.returncode == 1, started.stdout + started.stderr
        assert "cannot start: node2 (its agent (tlsroll" in started.stderr
        assert "nothing was changed" in started.stderr
        assert "Traceback" not in started.stderr
        # Nothing was switched: both nodes serve http only, and no rollout exists.
        for node in nodes:
            assert list(live(node).schemes) == ["http"]
        schema = cluster.cli("schema", "show", "--json")
        assert schema.returncode == 0, schema.stderr
        assert not json.loads(schema.stdout).get("rollout")

        # The seed's direct switch sends nothing an agent could drop: planned as before.
        direct = cluster.cli("plan", "--scope", "cluster")
        assert direct.returncode == 0, direct.stdout + direct.stderr

        # Upgraded: its agent reports the features again, and the node is planned.
        node2.agent.stop()
        node2.restart_agent()
        wait_until(lambda: features_of(cluster, "node2") == list(ALL), 60, "node2 upgraded")
        again = cluster.cli("plan", "--scope", "cluster", "--strategy", "transitional")
        assert again.returncode == 0, again.stdout + again.stderr


def test_the_agents_report_rides_every_heartbeat_message() -> None:
    """(The field, as the leader reads it.)"""
    assert agent_features_of(leader_pb2.HeartbeatRequest()) == ()
    said = leader_pb2.HeartbeatRequest(features=[*reversed(ALL), "Bad", "z" * 10_000])
    assert agent_features_of(said) == ALL


# --- a leader restarted mid-switch, without what the agent reported ---------------------------


def lose_features(cluster: Cluster, name: str) -> None:
    """Node ``name``'s row as a leader killed before its group commit leaves it: none of the
    features its agent's first heartbeat said (``Store.write_queued``; the row's default)."""
    with contextlib.closing(sqlite3.connect(cluster.store_path, timeout=10)) as db:
        db.execute("UPDATE nodes SET agent_features = '[]' WHERE name = ?", (name,))
        db.commit()


def stored_features(cluster: Cluster) -> dict[str, list[str]]:
    return {r["name"]: json.loads(r["agent_features"]) for r in cluster.store_table("nodes")}


def newest_nodes(cluster: Cluster) -> dict[str, tuple[str, str]]:
    rollout = cluster.poll_newest_rollout()
    return {n["name"]: (n["state"], n.get("reason", "")) for n in rollout["nodes"]}


def ended(cluster: Cluster) -> dict[str, Any]:
    """The newest rollout once it has ended (the leader may still be starting)."""

    def done() -> bool:
        try:
            return cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted")
        except grpc.RpcError:
            return False

    wait_until(done, 180, "the rollout to end", interval=LEADER_POLL)
    return cluster.newest_rollout()


def server_certificates(cluster: Cluster) -> list[str]:
    """The subjects of the server certificates `tlsroll certs check-expiration` watches."""
    shown = cluster.cli("certs", "check-expiration", "--json")
    assert "Traceback" not in shown.stderr, shown.stderr
    return sorted(
        c["subject"] for c in json.loads(shown.stdout)["certificates"] if c["kind"] == "server"
    )


def txn_phases(node: Any, kind: str) -> list[str]:
    return [t["phase"] for t in node.journal_query("SELECT phase FROM txns WHERE kind = ?", kind)]


@pytest.mark.timeout(300)
def test_a_switch_resumed_by_a_leader_that_lost_the_agents_features_is_followed(
    tmp_path: Path,
) -> None:
    """Review s63 faults, M1: the leader killed while node3 switches under --freeze scope,
    and its store without node3's features (the first heartbeat's group commit, up to a
    second, lost with it). The restarted leader resumed the switch step, refused locally to
    send the Switch ("too old for --freeze scope ... the leader sent it nothing") and recorded
    node3 rolled_back, the node as it was, while its agent completed the switch from its
    journal: the rollout halted, node3 served https with a certificate `certs
    check-expiration` did not list. Now an agent not heard since the leader started is waited
    for (its first heartbeat says what it implements): the switch is followed, node3 is done
    on https, its certificate watched, and the rollout completes."""
    with cluster_of(
        tmp_path,
        3,
        step_deadline=15,
        scope_freeze_lease=20,
        node_env={"node3": {START_DELAY_ENV: "3"}},  # its switch's restart: seconds, not ms
    ) as (cluster, nodes):
        node3 = nodes[2]
        wait_until(
            lambda: all(v == list(ALL) for v in stored_features(cluster).values()),
            30,
            "every agent's features stored",
            interval=LEADER_POLL,
        )
        secret = password_file(tmp_path, "pw", "features-lost-password-for-the-practice")
        started = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(secret),
            "--freeze", "scope", "--yes",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        # node3's agent has the switch (its server restarts for 3 s): the leader dies.
        wait_until(lambda: txn_phases(node3, "switch") != [], 90, "node3's switch", interval=0.05)
        assert newest_nodes(cluster)["node3"][0] == "switching"
        cluster.kill_leader()
        lose_features(cluster, "node3")
        cluster.start_leader()

        rollout = ended(cluster)
        nodes_now = {n["name"]: (n["state"], n.get("reason", "")) for n in rollout["nodes"]}
        assert rollout["state"] == "completed", (rollout["state"], nodes_now)
        assert nodes_now["node3"][0] == "done", nodes_now
        assert txn_phases(node3, "switch") == ["completed"]
        for node in nodes:
            assert list(live(node).schemes) == ["https"], node.name
        # node3's live certificate is the one the leader watches.
        assert server_certificates(cluster) == ["node1", "node2", "node3"]


@pytest.mark.timeout(300)
def test_a_way_back_begun_before_a_restart_is_followed_on_an_agent_that_reports_none(
    tmp_path: Path,
) -> None:
    """The same for the way back (disable-tls), and the model under it: the leader's own
    refusal to send is no word that nothing began. The leader is killed while node3 goes back
    to http; meanwhile node3's agent finishes the way back and is replaced by one that reports
    no features (an older build: it lacks ``rollback.undoes``), and the store has lost what
    the old one said. The restarted leader waits for its first heartbeat, then may not send
    the Rollback, so it asks the agent (a plain GetTransaction, which needs nothing) and
    follows the way back it has: node3 done on http, the rollout completed. It was recorded
    rolled_back, "going back to http refused", with node3 on http."""
    with cluster_of(tmp_path, 3, step_deadline=15, node_env={"node3": {START_DELAY_ENV: "3"}}) as (
        cluster,
        nodes,
    ):
        node3 = nodes[2]
        assert node3.agent is not None
        secret = password_file(tmp_path, "pw", "features-lost-password-for-the-practice")
        started = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(secret),
            "--yes", "--wait", timeout=180,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stderr
        rid = cluster.newest_rollout()["id"]
        wait_until(
            lambda: txn_phases(node3, "rollback") != [], 90, "node3's way back", interval=0.05
        )
        assert newest_nodes(cluster)["node3"][0] == "switching"
        cluster.kill_leader()
        assert node3.wait_txn(rid, "rollback").outcome == "completed"
        node3.agent.stop()
        node3.restart_agent({features.TEST_ENV: ""})
        lose_features(cluster, "node3")
        cluster.start_leader()

        rollout = ended(cluster)
        nodes_now = {n["name"]: (n["state"], n.get("reason", "")) for n in rollout["nodes"]}
        assert rollout["id"] == rid
        assert rollout["state"] == "completed", (rollout["state"], nodes_now)
        assert nodes_now["node3"] == ("done", ""), nodes_now
        assert features_of(cluster, "node3") == []  # (heard: it reports none)
        for node in nodes:
            assert list(live(node).schemes) == ["http"], node.name
        assert server_certificates(cluster) == []


@pytest.mark.timeout(300)
def test_a_plan_right_after_a_restart_waits_for_an_agent_not_heard_since(
    tmp_path: Path,
) -> None:
    """Review of s63-f1, L-3: the plan judged an agent by the store's row, a former leader
    process's, which a kill may have left without what the agent's first heartbeat said
    (the group commit lost with it). In the first seconds after such a restart, `tlsroll
    plan` and `rollout start --freeze scope` blocked node3 "too old for --freeze scope:
    upgrade it first", though its agent is current. Here node3's heartbeats do not reach the
    leader (its agent's leader port: a closed one) while the leader reaches it, so the
    window stays open: the plan says it has not been heard since the leader started, to wait
    for its first heartbeat, never "upgrade it"; the start is refused alike, nothing changed.
    Once its heartbeat comes, the plan goes by what it says."""
    # A heartbeat interval of 20 s: node3, silent, is online for a minute after its last.
    with cluster_of(tmp_path, 3, heartbeat_interval=20) as (cluster, nodes):
        node3 = nodes[2]
        agent3 = node3.agent
        assert agent3 is not None
        wait_until(
            lambda: all(v == list(ALL) for v in stored_features(cluster).values()),
            30,
            "every agent's features stored",
            interval=LEADER_POLL,
        )
        agent3.stop()
        agent3.write_config({"leader": {"control_port": 9}})  # (nothing listens)
        node3.restart_agent()
        cluster.kill_leader()
        lose_features(cluster, "node3")
        cluster.start_leader()

        plan = cluster.cli("plan", "--scope", "cluster", "--freeze", "scope")
        said = plan.stdout + plan.stderr
        assert plan.returncode == 1, said
        assert "Traceback" not in said
        assert "upgrade" not in said, said
        assert "node3" in plan.stderr and "has not been heard since the leader started" in said
        assert "wait for its first heartbeat" in said, said
        assert "node1 (" not in plan.stderr and "node2 (" not in plan.stderr, plan.stderr

        secret = password_file(tmp_path, "pw", "not-heard-yet-password-for-the-practice")
        started = cluster.cli(
            "rollout", "start", "--scope", "cluster", "--password-file", str(secret),
            "--freeze", "scope", "--yes",
        )  # fmt: skip
        assert started.returncode == 1, started.stdout + started.stderr
        assert "Traceback" not in started.stderr
        assert "cannot start: node3 (its agent (tlsroll" in started.stderr, started.stderr
        assert "wait for its first heartbeat" in started.stderr, started.stderr
        assert "upgrade it" not in started.stderr, started.stderr
        assert "nothing was changed" in started.stderr
        assert cluster.store_table("rollouts") == []
        for node in nodes:
            assert list(live(node).schemes) == ["http"], node.name

        # Its heartbeats reach the leader again: what they say is what the plan goes by.
        agent3.stop()
        agent3.write_config({"leader": {"control_port": None}})
        node3.start_agent_heard()
        again = cluster.cli("plan", "--scope", "cluster", "--freeze", "scope")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "heard" not in again.stdout + again.stderr


@pytest.mark.timeout(300)
def test_a_switch_resumed_on_an_agent_not_heard_since_is_followed(tmp_path: Path) -> None:
    """Review of s63-f1, L-2 and its test gap: the leader killed while node3 switches under
    --freeze scope, its store without node3's features, and node3's heartbeats no longer
    reaching the leader (its agent, restarted meanwhile, has a closed port for the leader)
    while the leader reaches it. The resumed switch step was a wait for a heartbeat that
    never came ("not heard since the leader started"): the rollout never ended. Its agent is
    asked with the plain GetTransaction, which needs no feature, and the switch it completed
    is followed: node3 done on https, its certificate watched, the rollout completed. (Its
    scope is node2 and node3, node3 last: a further switch would wait, as it should, for
    node3's scope freeze to be renewed, which its restarted agent refuses while it cannot ask
    the leader for the rollout's epoch; node3's heartbeats are let through once it is done,
    for the freeze's end. An agent not restarted renews it: see
    ``test_a_scope_freeze_of_an_agent_not_heard_since_is_renewed_by_asking_it``.)"""
    with cluster_of(
        tmp_path,
        3,
        step_deadline=15,
        scope_freeze_lease=20,
        heartbeat_interval=20,  # node3, silent, stays online for a minute
        node_env={"node3": {START_DELAY_ENV: "3"}},  # its switch's restart: seconds, not ms
    ) as (cluster, nodes):
        node3 = nodes[2]
        agent3 = node3.agent
        assert agent3 is not None
        wait_until(
            lambda: all(v == list(ALL) for v in stored_features(cluster).values()),
            30,
            "every agent's features stored",
            interval=LEADER_POLL,
        )
        secret = password_file(tmp_path, "pw", "not-heard-switch-password-for-the-practice")
        started = cluster.cli(
            "rollout", "start", "--scope", "nodes", "--nodes", "node2,node3",
            "--password-file", str(secret), "--freeze", "scope", "--yes",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        wait_until(lambda: txn_phases(node3, "switch") != [], 90, "node3's switch", interval=0.05)
        assert newest_nodes(cluster)["node3"][0] == "switching"
        rid = cluster.newest_rollout()["id"]
        cluster.kill_leader()
        assert node3.wait_txn(rid, "switch").outcome == "completed"
        agent3.stop()
        agent3.write_config({"leader": {"control_port": 9}})  # (nothing listens)
        node3.restart_agent()
        lose_features(cluster, "node3")
        cluster.start_leader()

        # Followed without a word from node3's heartbeats (the store still holds none).
        wait_until(
            lambda: newest_nodes(cluster)["node3"][0] == "done",
            90,
            "node3 done, its agent not heard",
            interval=LEADER_POLL,
        )
        assert stored_features(cluster)["node3"] == []
        # Its heartbeats reach the leader again: its agent takes the scope freeze's end
        # (the unfreeze waits for the leader to announce the epoch: agent-side, not here).
        agent3.stop()
        agent3.write_config({"leader": {"control_port": None}})
        node3.start_agent_heard()
        rollout = ended(cluster)
        nodes_now = {n["name"]: (n["state"], n.get("reason", "")) for n in rollout["nodes"]}
        assert rollout["id"] == rid
        assert rollout["state"] == "completed", (rollout["state"], nodes_now)
        assert nodes_now["node3"][0] == "done", nodes_now
        assert txn_phases(node3, "switch") == ["completed"]
        assert [list(live(node).schemes) for node in nodes] == [["http"], ["https"], ["https"]]
        assert server_certificates(cluster) == ["node2", "node3"]


class Relay:
    """A TCP relay on ``address`` (a free port: ``port``) to ``address:target``, for an agent
    whose heartbeats are to stop reaching the leader while it keeps running (its announced
    epochs in memory: a restarted agent refuses every command until it can ask the leader).
    ``close`` ends it: its connections and its port, so the agent's next connection is
    refused."""

    def __init__(self, address: str, target: int) -> None:
        self.target = (address, target)
        self.listener = socket.create_server((address, 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                inner, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                outer = socket.create_connection(self.target, timeout=5)
            except OSError:
                inner.close()
                continue
            with self.lock:
                if self.closed.is_set():
                    inner.close()
                    outer.close()
                    return
                self.sockets += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        sink.settimeout(None)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        self.accepting.join(5)
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.sockets.clear()


@contextlib.contextmanager
def heartbeats_relayed(cluster: Cluster, node: Any) -> Iterator[Relay]:
    """``node``'s agent restarted to reach the leader's control port through a ``Relay`` (its
    heartbeats stop reaching the leader once the relay is closed; the leader reaches the
    agent directly all along); the relay closed at the end."""
    relay = Relay(cluster.address, CONTROL_PORT)
    try:
        node.agent.stop()
        node.agent.write_config({"leader": {"control_port": relay.port}})
        node.start_agent_heard()
        yield relay
    finally:
        relay.close()


@pytest.mark.timeout(300)
def test_a_scope_freeze_of_an_agent_not_heard_since_is_renewed_by_asking_it(
    tmp_path: Path,
) -> None:
    """Session 64: under --freeze scope, the leader killed while node2 switches, its store
    without node2's features, and node2's heartbeats no longer reaching the restarted leader
    (its agent, still running, dialled the leader through a relay now closed) while the
    leader reaches it. node2's switch was followed (review of s63-f1, L-2), but its scope
    freeze's renewal needs a feature (``freeze.lease_seconds``) the leader learnt only from a
    heartbeat: not sent, node2's freeze never confirmed again, and node3's switch held
    behind it without limit. The leader asks node2's agent what it implements over the
    channel it has (GetStatus): the freeze is renewed, node3 switches, and the rollout
    completes, though node2 is never heard (the store still holds none of its features)."""
    with cluster_of(
        tmp_path,
        3,
        step_deadline=15,
        scope_freeze_lease=20,
        heartbeat_interval=20,  # node2, silent, stays online for a minute
        node_env={"node2": {START_DELAY_ENV: "3"}},  # its switch's restart: seconds, not ms
    ) as (cluster, nodes):
        node2, node3 = nodes[1], nodes[2]
        with heartbeats_relayed(cluster, node2) as relay:
            wait_until(
                lambda: all(v == list(ALL) for v in stored_features(cluster).values()),
                30,
                "every agent's features stored",
                interval=LEADER_POLL,
            )
            secret = password_file(tmp_path, "pw", "not-heard-freeze-password-for-the-practice")
            started = cluster.cli(
                "rollout", "start", "--scope", "nodes", "--nodes", "node2,node3",
                "--password-file", str(secret), "--freeze", "scope", "--yes",
            )  # fmt: skip
            assert started.returncode == 0, started.stderr
            wait_until(lambda: txn_phases(node2, "switch") != [], 90, "node2's switch", 0.05)
            assert txn_phases(node3, "switch") == []
            rid = cluster.newest_rollout()["id"]
            cluster.kill_leader()
            relay.close()  # node2's heartbeats: refused from now on
            lose_features(cluster, "node2")
            cluster.start_leader()

            rollout = ended(cluster)
            nodes_now = {n["name"]: (n["state"], n.get("reason", "")) for n in rollout["nodes"]}
            assert rollout["id"] == rid
            assert rollout["state"] == "completed", (rollout["state"], nodes_now)
            assert stored_features(cluster)["node2"] == []  # never heard since the restart
            assert txn_phases(node2, "switch") == ["completed"]
            assert txn_phases(node3, "switch") == ["completed"]
            assert [list(live(node).schemes) for node in nodes] == [["http"], ["https"], ["https"]]


@pytest.mark.timeout(300)
def test_nodes_says_an_agent_not_heard_since_the_leader_started_not_too_old(
    tmp_path: Path,
) -> None:
    """Session 64: `tlsroll nodes` gave its verdict from the store's row for an agent the
    leader had not heard since it started: a killed leader whose store lost node2's features
    (the first heartbeat's group commit) listed node2's current agent "too old for …" in red
    until its first heartbeat since, for good if its heartbeats did not reach the leader. It
    says "not heard since the leader started" instead, with no verdict (``--json``:
    ``agent_not_heard``, no ``agent_too_old_for``); once heard, what its agent said counts."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node2 = nodes[1]
        agent2 = node2.agent
        assert agent2 is not None
        wait_until(
            lambda: all(v == list(ALL) for v in stored_features(cluster).values()),
            30,
            "every agent's features stored",
            interval=LEADER_POLL,
        )
        cluster.kill_leader()
        agent2.send_signal(signal.SIGSTOP)  # its heartbeats do not reach the restarted leader
        lose_features(cluster, "node2")
        cluster.start_leader()
        # node1's first heartbeat to the restarted leader (it may take a beat to come)
        wait_until(
            lambda: not json.loads(cluster.cli("nodes", "--json").stdout)[0].get("agent_not_heard"),
            60,
            "node1 heard by the restarted leader",
            interval=LEADER_POLL,
        )

        wide = {"COLUMNS": "400"}  # (one line per node)
        listed = cluster.cli("nodes", env=wide)
        assert listed.returncode == 0, listed.stderr
        row2 = next(line for line in listed.stdout.splitlines() if "node2" in line)
        assert "not heard since the leader started" in row2, listed.stdout
        assert "too old" not in listed.stdout, listed.stdout
        by_name = {n["name"]: n for n in json.loads(cluster.cli("nodes", "--json").stdout)}
        assert by_name["node2"].get("agent_not_heard") is True
        assert not by_name["node2"].get("agent_too_old_for")
        assert not by_name["node1"].get("agent_not_heard")

        agent2.send_signal(signal.SIGCONT)  # heard again: its heartbeat says what it implements
        wait_until(
            lambda: not json.loads(cluster.cli("nodes", "--json").stdout)[1].get("agent_not_heard"),
            60,
            "node2 heard again",
            interval=LEADER_POLL,
        )
        listed = cluster.cli("nodes", env=wide)
        assert "not heard" not in listed.stdout and "too old" not in listed.stdout, listed.stdout
