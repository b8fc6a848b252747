"""The agent pool's hold and a start's first channels (``leader.agent_client.AgentPool``): what
the cap may close and when (session 30's s30fixb risks, session 29's), and which nodes a start
opens channels for (review 2 of session 30, L3)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Collection
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from leader.agent_client import AgentCutOff, AgentPool
from leader.engine import _in_flight
from leader.rollout_core import NodeState, Strategy
from tests.test_engine import make_world, open_store
from tests.test_warm_ahead import (
    FakeChannel,
    Reaching,
    Released,
    enable_tls,
    planning_commands,
)
from tlsroll import pki
from tlsroll.v1 import agent_pb2, leader_pb2


def fake_channels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every channel the pool opens is a ``FakeChannel`` (ready at once): opens and closes."""
    log: list[str] = []
    monkeypatch.setattr(
        grpc.aio,
        "secure_channel",
        lambda target, credentials, options=None: FakeChannel(log, target),
    )
    return log


def bravo_serves(world: Any, monkeypatch: pytest.MonkeyPatch, schemes: list[str]) -> None:
    """The planning question's answers: bravo serves ``schemes`` with a certificate of the
    world's CA (its answer first: the others' come 10 ms later and wait for it), the other
    nodes plain http."""
    served = world.ca.issue(pki.generate_key().public_key(), pki.Names.of("bravo", ["10.0.0.2"]))
    bravo = agent_pb2.ServerView(
        driver="fake",
        healthy=True,
        schemes=schemes,
        cert_pem=served.public_bytes(serialization.Encoding.PEM),
    )
    http = agent_pb2.ServerView(driver="fake", healthy=True, schemes=["http"])

    async def answering(
        name: str, request: agent_pb2.CheckRequest, timeout: float
    ) -> leader_pb2.CheckAnswer:
        if name != "bravo":
            await asyncio.sleep(0.01)
        view = bravo if name == "bravo" else http
        return leader_pb2.CheckAnswer(checked=agent_pb2.PreflightResponse(ok=True, server=view))

    monkeypatch.setattr("tests.test_warm_ahead.ready", answering)


async def test_a_start_opens_the_channels_of_the_first_nodes_it_steps_not_of_those_it_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of session 30, L3: nodes bravo, charlie, alpha (the leader's node, last) in
    the rollout's order; bravo already runs https with a certificate of this CA (a start
    after partial work: the plan skips it). --max-parallel 1, prepare_ahead 1: the start
    opens the channels of charlie and alpha, the first two it steps, and dials bravo; on
    77bb3da it opened bravo's and charlie's (the first two in order), and alpha's first step
    opened its own."""
    world = make_world(tmp_path, monkeypatch)
    bravo_serves(world, monkeypatch, ["https"])
    store = open_store(world.path)
    try:
        reach, channels = Reaching(), Released()
        commands = planning_commands(world, store, reach, channels, None)
        row = await commands.start(enable_tls(), "admin")
        assert row.node("bravo")[0].state is NodeState.SKIPPED
        assert reach.channel == {"bravo": False, "charlie": True, "alpha": True}
    finally:
        store.close()


async def test_a_retry_of_a_transitional_phase_1_opens_no_channel_for_a_node_left_dual(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 1b of session 31, finding 2: a ``rollout retry`` of a halted transitional
    phase 1 (``dual_from``) plans a node phase 1 left dual as ``dual`` (terminal: the retry
    never preflights, stages nor switches it, only its finalize closes http there). The
    start counted it among the first nodes it steps: with --max-parallel 1 and prepare_ahead
    1 it opened bravo's channel (a TLS handshake for nothing) and only dialled alpha, the
    second node the retry steps. The start's ``steps`` is now the planner's own decision."""
    world = make_world(tmp_path, monkeypatch)
    bravo_serves(world, monkeypatch, ["http", "https"])
    store = open_store(world.path)
    try:
        reach, channels = Reaching(), Released()
        commands = planning_commands(world, store, reach, channels, None)
        request = enable_tls(strategy=Strategy.TRANSITIONAL, dual_from="r-old")
        row = await commands.start(request, "admin")
        assert row.node("bravo")[0].state is NodeState.DUAL
        assert reach.channel == {"bravo": False, "charlie": True, "alpha": True}
    finally:
        store.close()


async def test_a_start_s_first_channels_outlast_an_engine_pass_begun_before_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s30fixb's risk: an engine pass that began before the start's commit (no live rollout
    in its view) holds no node; on 77bb3da that hold dropped the start's reservation, and
    the cap (2 here) closed a first node's channel, idle until its step, as soon as another
    channel opened. The reservation now lasts until a hold names a live rollout; once the
    rollout ends, the channels of its nodes are closed (their flights are over), the others'
    kept under the cap."""
    log = fake_channels(monkeypatch)
    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    try:
        pool = AgentPool(store, grpc.ssl_channel_credentials(), "example.org", max_open=2)
        deadline = asyncio.get_running_loop().time() + 5
        for name in ("bravo", "charlie"):
            assert await pool.reach(name, deadline, channel=True) is None
        pool.release_first(started=True)  # the start was made
        pool.hold(frozenset())  # a pass that read the store before the start's commit
        _ = (await pool.get("alpha")).channel  # another use of the pool, past the cap
        await asyncio.sleep(0)
        assert not any(line.startswith("close") for line in log), log
        pool.hold({"bravo", "charlie"}, "r1")  # the engine's pass that sees the rollout
        await asyncio.sleep(0)
        assert not any(line.startswith("close") for line in log), log
        pool.hold(frozenset())  # it ended: bravo's and charlie's flights are over
        await asyncio.sleep(0)
        opened = [line.split()[1] for line in log if line.startswith("open")]
        closed = [line.split()[1] for line in log if line.startswith("close")]
        assert sorted(closed) == sorted(opened[:2]), log  # theirs closed, alpha's kept
    finally:
        await pool.close()
        store.close()


async def test_a_refused_start_gives_back_only_its_own_first_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s30fixb's risk: two starts at once shared one reservation, and the one refused
    (RolloutBusy) gave back the other's channels too. Each start now reserves under its
    rollout's id: with a cap of 1, the refused start's channel (charlie) is closed once
    another opens, the made start's (bravo) is not."""
    log = fake_channels(monkeypatch)
    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    try:
        pool = AgentPool(store, grpc.ssl_channel_credentials(), "example.org", max_open=1)
        deadline = asyncio.get_running_loop().time() + 5
        assert await pool.reach("bravo", deadline, channel=True, reserve="r1") is None
        assert await pool.reach("charlie", deadline, channel=True, reserve="r2") is None
        pool.release_first(started=True, rollout="r1")
        pool.release_first(started=False, rollout="r2")
        _ = (await pool.get("alpha")).channel
        await asyncio.sleep(0)
        assert [line for line in log if line.startswith("close")] == ["close 10.0.0.3:9442"]
    finally:
        await pool.close()
        store.close()


async def test_a_pass_holds_the_nodes_in_flight_as_stored_not_as_it_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 29's risk: an engine pass reads its row, then awaits; step outcomes saved
    meanwhile move nodes into flight and hold them; the pass then held the nodes in flight of
    the row it had read, dropping those (the cap could close their channels until the next
    pass). Now each hold is of the rollout as the store has it. --max-parallel 2 over 6
    nodes; one pass waits (inside it, where it reads ``--when-quiet``'s clients) until an
    outcome has moved a node in that its own row does not have in flight."""
    from tests.test_perf_shape import engine_world

    world = engine_world(tmp_path / "w", monkeypatch, 6)
    leader = world.boot(prepare_ahead=0)
    holds: list[frozenset[str]] = []

    class Recorded:
        async def get(self, name: str) -> Any:
            return world.agents[name]

        async def close(self) -> None:
            pass

        def hold(self, names: Collection[str], rollout: str | None = None, **kw: bool) -> None:
            holds.append(frozenset(names))

    leader.engine.agents = Recorded()
    await leader.start(max_parallel=2)
    engine = leader.engine
    held_for_quiet = engine._held_for_quiet
    waited: list[tuple[frozenset[str], frozenset[str]]] = []

    async def meanwhile(row: Any) -> frozenset[str]:
        mine = _in_flight(row)
        if not waited and mine:
            for _ in range(1000):  # the steps it began run; their outcomes move nodes on
                latest = leader.schema.latest()
                assert latest is not None
                if _in_flight(latest) - mine:
                    waited.append((mine, _in_flight(latest)))
                    break
                await asyncio.sleep(0)
        return await held_for_quiet(row)

    monkeypatch.setattr(engine, "_held_for_quiet", meanwhile)
    for _ in range(40):  # (not settled between passes: the steps run while a pass waits)
        await engine.reconcile()
        if waited:
            break
        world.clock.advance(1.0)
    assert waited, "no pass saw an outcome move a node in while it waited"
    latest = leader.schema.latest()
    assert latest is not None
    assert holds[-1] == _in_flight(latest), (waited, holds[-3:])
    await engine.settle()
    await leader.stop()


async def test_the_pool_dials_no_agent_whose_certificate_is_revoked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s50: the pool dialled a node's agent by its address, port and key only, so an agent cut
    off (its certificate on record revoked: a machine lost or stolen) was dialled as before,
    its channel kept open. A revocation moves the store's nodes generation on: the next
    ``get`` reads the node again, closes the channel and raises ``AgentCutOff`` (transient:
    no step outcome, no node failed or rolled back for it), naming `tlsroll nodes remove`;
    ``reach`` (the planning's check) says so too, as the error its callers report."""
    log = fake_channels(monkeypatch)
    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    pool = AgentPool(store, grpc.ssl_channel_credentials(), "example.org")
    try:
        client = await pool.get("alpha")
        _ = client.channel
        assert log == [line for line in log if line.startswith("open")] and log, log
        serial = store.get_node("alpha").cert_serial
        store.revoke(serial, reason="lost", now=dt.datetime.now(dt.UTC), actor="admin")
        assert store.get_node("alpha").cert_revoked
        with pytest.raises(AgentCutOff) as refused:
            await pool.get("alpha")
        said = str(refused.value)
        assert "agent alpha is cut off" in said and "`tlsroll nodes remove alpha`" in said, said
        await asyncio.sleep(0)
        assert any(line.startswith("close") for line in log), log
        with pytest.raises(AgentCutOff):
            await pool.reach("alpha", asyncio.get_running_loop().time() + 5, channel=True)
        opened = [line for line in log if line.startswith("open")]
        assert len(opened) == 1, log  # never dialled again
    finally:
        await pool.close()
        store.close()
