"""Issue 15, the rollout's start: the first node's agent loads its certificate code while the
leader checks the other nodes, not in its preflight, which the rollout's first switch waits for.

An idle agent does not hold ``cryptography`` (about 10 MiB); it loaded it at its first
preflight that makes a key and CSR, and on a small machine the import (40-100 ms) was the
largest part of the time from a rollout's start to its first switch (s28lead's traces). The
planning's ``Check`` of a starting rollout now tells the agents of its first nodes to load it
(``CheckRequest.warm_certificates``); a plan shown to the admin tells none.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from leader.agent_client import MAX_OPEN_CHANNELS, AgentPool
from leader.commands import Commands, RolloutRequest
from leader.observe import FirstSteps, observe
from leader.rollout_core import Change, NodeObservation, Scope
from leader.schema_store import RolloutBusy, SchemaStore
from nodeagent import service
from tests.cluster import secure_channel
from tests.test_engine import ADMIN, LEADER, VERIFIER_1, make_world, open_store
from tests.test_offline_grace import now, online
from tests.test_perf_shape import harnessed_agent, wait_for_status
from tlsroll import features, pki
from tlsroll.defaults import AGENT_PORT
from tlsroll.v1 import agent_pb2, agent_pb2_grpc, leader_pb2


class Recorder:
    """``Commands.observe``: what each call asked to warm; every node runs http."""

    def __init__(self) -> None:
        self.warmed: list[frozenset[str]] = []

    async def __call__(
        self,
        names: Sequence[str],
        *,
        warm: Collection[str],
        first: FirstSteps | None = None,
        edits: bool = False,
        way_back: bool = False,
        change: Change | None = None,
    ) -> dict[str, NodeObservation]:
        self.warmed.append(frozenset(warm))
        return {name: NodeObservation(True, schemes=("http",)) for name in names}


def enable_tls(**changes: object) -> RolloutRequest:
    request = RolloutRequest(Change.ENABLE_TLS, Scope.cluster(), auth_verifier_json=VERIFIER_1)
    return replace(request, **changes)  # type: ignore[arg-type]  # the test's own fields


async def test_a_start_warms_its_first_nodes_and_a_plan_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes alpha (the leader node: last), bravo, charlie. A plan warms none; a start warms
    the first ``max_parallel`` in the rollout's order."""
    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    try:
        for agent in world.agents:
            store.heartbeat(agent.name, "test", now=now(), features=features.AGENT_FEATURES)
        recorder = Recorder()
        commands = Commands(
            store, SchemaStore(store.db), now, online, LEADER, lambda: None, observe=recorder
        )
        await commands.plan(enable_tls())
        await commands.start(enable_tls(), ADMIN)
        assert recorder.warmed == [frozenset(), frozenset({"bravo"})]
    finally:
        store.close()


def test_which_nodes_a_start_warms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only changes that make a key on the node (not disable-tls or change-password, not
    ``--cert-dir``), only nodes of the scope that are online, in the rollout's order."""
    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    try:
        commands = Commands(store, SchemaStore(store.db), now, online, LEADER, lambda: None)
        up = ["charlie", "alpha", "bravo"]
        first = commands.first_to_make_keys
        assert first(enable_tls(), up) == {"bravo"}
        assert first(enable_tls(max_parallel=2), up) == {"bravo", "charlie"}
        assert first(enable_tls(max_parallel=5), up) == {"alpha", "bravo", "charlie"}
        assert first(enable_tls(), ["charlie", "alpha"]) == {"charlie"}  # bravo offline
        assert first(enable_tls(scope=Scope.of_nodes(["charlie", "alpha"])), up) == {"charlie"}
        assert first(enable_tls(scope=Scope.local()), up) == {"alpha"}
        assert first(enable_tls(change=Change.ROTATE_CERT), up) == {"bravo"}
        assert first(enable_tls(change=Change.DISABLE_TLS), up) == frozenset()
        assert first(enable_tls(change=Change.CHANGE_PASSWORD), up) == frozenset()
        own = enable_tls(own_certs=object())
        assert first(own, up) == frozenset()
    finally:
        store.close()


class Asked:
    """An agent pool whose agents record the Check each was sent."""

    def __init__(self) -> None:
        self.requests: dict[str, agent_pb2.CheckRequest] = {}

    async def get(self, name: str) -> _One:
        return _One(self, name)


class _One:
    def __init__(self, pool: Asked, name: str) -> None:
        self.pool, self.name = pool, name

    async def check(
        self, request: agent_pb2.CheckRequest, timeout: float = 0
    ) -> agent_pb2.PreflightResponse:
        self.pool.requests[self.name] = request
        view = agent_pb2.ServerView(driver="fake", healthy=True, schemes=["http"])
        return agent_pb2.PreflightResponse(ok=True, server=view)


async def test_observe_tells_only_the_named_agents_to_warm() -> None:
    pool = Asked()
    ca = pki.CertificateAuthority.create()
    names = ["s1", "s2", "s3"]
    await observe(pool, names, ca.cert, warm={"s2"})  # type: ignore[arg-type]  # a fake pool
    assert {n: r.warm_certificates for n, r in pool.requests.items()} == {
        "s1": False,
        "s2": True,
        "s3": False,
    }


@pytest.mark.parametrize("warm", [True, False])
def test_a_check_that_asks_loads_the_certificate_code_and_one_that_does_not_nothing(
    tmp_path: Path, loopback: Callable[[], str], warm: bool
) -> None:
    """A real agent gets only the leader's Check (its credentials): with ``warm_certificates``
    it starts its crypto worker as its checks begin; without (``tlsroll plan``) nothing. The agent
    itself holds the certificate code either way (``nodeagent.cryptoworker``)."""
    with harnessed_agent(tmp_path, loopback, "warm1") as (cluster, address, agent, out, go):
        chain, key = cluster.leader_credentials()
        target = f"{address}:{AGENT_PORT}"
        wait_for_status(cluster, "warm1", target, chain, key)
        request = agent_pb2.CheckRequest(warm_certificates=warm)
        name = cluster.agent_tls_name("warm1")
        with secure_channel(target, cluster.ca_pem, chain, key, name=name) as channel:
            checked = agent_pb2_grpc.NodeAgentStub(channel).Check(request, timeout=30)
        assert checked.ok, checked.problems  # the same answer either way
        go.touch()
        _, said = agent.communicate(timeout=120)
        assert agent.returncode == 0, said
    modules = out.read_text().split()
    assert "tlsroll.pki" not in modules  # the crypto worker's, never the agent's
    assert ("cryptoworker.started" in said) is warm


@pytest.mark.parametrize("warm", [True, False])
async def test_a_warming_check_starts_the_crypto_worker_before_its_checks(
    warm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (session 71): the first node's preflight waits for its crypto worker's cold
    start, which its planning Check begins (``warm_certificates``). It began once the Check's
    own work (the server's view, the port checks: 12-21 ms on the loaded bench) had ended,
    as the review of session 28 (M1) had it while the certificate code was an import in the
    agent, sharing the GIL with that work; the worker is a process of its own since session
    42, and now starts as the checks begin. A Check that does not ask starts nothing."""
    order: list[str] = []
    agent = service.NodeAgentService(
        cast(Any, None), cast(Any, None), cast(Any, None), None, None, now, trust=cast(Any, 1)
    )
    monkeypatch.setattr(service, "require_leader", lambda context, trust: order.append("auth"))

    async def checks(
        request: object, received: object, leader_time: object
    ) -> agent_pb2.PreflightResponse:
        order.append("checks")
        return agent_pb2.PreflightResponse(ok=True)

    monkeypatch.setattr(agent, "_checks", checks)
    monkeypatch.setattr(agent, "_warm_certificates", lambda: order.append("warm"))
    request = agent_pb2.CheckRequest(warm_certificates=warm)
    reply = await agent.Check(request, cast(Any, None))
    assert reply.ok
    assert order == (["auth", "warm", "checks"] if warm else ["auth", "checks"])


@pytest.mark.parametrize("ok", [True, False], ids=["passes", "fails"])
@pytest.mark.parametrize("make_csr", [True, False], ids=["csr", "no-csr"])
async def test_a_preflight_that_makes_the_csr_readies_the_switch_while_the_csr_waits(
    ok: bool, make_csr: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (session 71), the rollout's start: the Stage began what a switch needs ready
    (``on_prepare``: the bootstrap service's import, 9 ms of CPU, at a low priority), which
    then shared the GIL with the Stage's own work, the last step before the first switch.
    A preflight whose checks pass and that makes the CSR (a stage and a switch follow) begins
    it now, before the CSR, which waits for the crypto worker (at the first node, mostly its
    cold start); one that fails or makes no CSR begins nothing."""
    order: list[str] = []
    agent = service.NodeAgentService(
        cast(Any, None), cast(Any, None), cast(Any, None), None, None, now, trust=cast(Any, 1)
    )

    async def command(context: object, command: object, **_: object) -> str:
        order.append("command")
        return "r1"

    async def checks(
        request: object, received: object, leader_time: object
    ) -> agent_pb2.PreflightResponse:
        order.append("checks")
        return agent_pb2.PreflightResponse(ok=ok)

    async def csr(driver: object, rollout_id: str) -> bytes:
        order.append("csr")
        return b"the CSR"

    monkeypatch.setattr(agent, "_command", command)
    monkeypatch.setattr(agent, "_checks", checks)
    monkeypatch.setattr(agent, "_csr", csr)
    monkeypatch.setattr(agent, "_driver", lambda: None)
    monkeypatch.setattr(agent, "_warm_certificates", lambda: order.append("warm"))
    agent.on_prepare = lambda: order.append("prepare")
    request = agent_pb2.PreflightRequest(
        command=agent_pb2.Command(rollout_id="r1", epoch=1), make_csr=make_csr
    )
    reply = await agent.Preflight(request, cast(Any, None))
    assert reply.ok is ok
    if make_csr and ok:
        assert order == ["command", "warm", "checks", "prepare", "csr"]
        assert reply.csr_pem == b"the CSR"
    else:
        assert order == ["command", *(["warm"] if make_csr else []), "checks"]


async def ready(
    name: str, request: agent_pb2.CheckRequest, timeout: float
) -> leader_pb2.CheckAnswer:
    """``LeaderService.ask_check``: every agent answers on its stream that it runs http."""
    view = agent_pb2.ServerView(driver="fake", healthy=True, schemes=["http"])
    return leader_pb2.CheckAnswer(checked=agent_pb2.PreflightResponse(ok=True, server=view))


class Reaching:
    """``AgentPool.reach`` recorded (each node's ``channel``); ``pool``: passed on to it for
    the channels, else every node is reached."""

    def __init__(self, pool: AgentPool | None = None) -> None:
        self.pool = pool
        self.channel: dict[str, bool] = {}

    async def __call__(
        self, name: str, deadline: float, *, channel: bool, reserve: str = ""
    ) -> str | None:
        self.channel[name] = channel
        if channel and self.pool is not None:
            return await self.pool.reach(name, deadline, channel=True, reserve=reserve)
        return None


class Released:
    """``Commands``' ``channels`` (``AgentPool``'s part) recorded."""

    max_open = MAX_OPEN_CHANNELS

    def __init__(self) -> None:
        self.started: list[bool] = []

    def release_first(self, *, started: bool, rollout: str = "") -> None:
        self.started.append(started)


def planning_commands(
    world: Any, store: Any, reach: Reaching, channels: Any, agents: Any
) -> Commands:
    """The leader's commands over the world's store, planning as the leader daemon does
    (every agent answering on its stream), with ``reach`` and the pool's part ``channels``."""
    for agent in world.agents:
        store.heartbeat(agent.name, "test", now=now(), features=features.AGENT_FEATURES)
    asking = functools.partial(observe, agents, ca=world.ca.cert, ask=ready, reach=reach)
    return Commands(
        store, SchemaStore(store.db), now, online, LEADER, lambda: None, observe=asking,
        prepare_ahead=1, channels=channels,
    )  # fmt: skip


async def test_a_start_opens_channels_for_its_first_nodes_in_order_and_dials_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2, finding 5: --max-parallel 1 and prepare_ahead 1, nodes bravo, charlie, alpha
    (the leader's node, last) in the rollout's order: a start opens the channels of the first
    two (``channel=True``) and dials the third; a plan opens none; the start, made, hands
    their reservation to the engine."""
    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    try:
        reach, channels = Reaching(), Released()
        commands = planning_commands(world, store, reach, channels, Asked())
        await commands.plan(enable_tls())
        assert reach.channel == dict.fromkeys(("bravo", "charlie", "alpha"), False)
        assert channels.started == []
        await commands.start(enable_tls(), ADMIN)
        assert reach.channel == {"bravo": True, "charlie": True, "alpha": False}
        assert channels.started == [True]
        with pytest.raises(RolloutBusy):  # one live rollout at a time: refused
            await commands.start(enable_tls(), ADMIN)
        assert channels.started == [True, False]
    finally:
        store.close()


class FakeChannel:
    """A channel that is ready at once; its opening and closing recorded."""

    def __init__(self, log: list[str], target: str) -> None:
        self.log, self.target = log, target
        log.append(f"open {target}")

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY

    async def close(self, grace: float | None = None) -> None:
        self.log.append(f"close {self.target}")


async def test_a_start_opens_no_more_first_channels_than_the_pool_keeps_and_holds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2, finding 2: a start's first nodes (--max-parallel 2, prepare_ahead 1: three)
    beyond the pool's cap (2 here): it opens only as many channels as the pool keeps (on
    44aa7dd all three, and the cap closed one at once), and the pool keeps them, idle, while
    another node's channel opens, until the engine holds the nodes it steps."""
    log: list[str] = []
    monkeypatch.setattr(
        grpc.aio,
        "secure_channel",
        lambda target, credentials, options=None: FakeChannel(log, target),
    )
    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    try:
        pool = AgentPool(store, grpc.ssl_channel_credentials(), "example.org", max_open=2)
        reach = Reaching(pool)
        commands = planning_commands(world, store, reach, pool, pool)
        await commands.start(enable_tls(max_parallel=2), ADMIN)
        assert reach.channel == {"bravo": True, "charlie": True, "alpha": False}
        assert sorted(log) == ["open 10.0.0.2:9442", "open 10.0.0.3:9442"]  # bravo, charlie
        _ = (await pool.get("alpha")).channel  # another use of the pool, the cap reached
        await asyncio.sleep(0)
        assert not any(line.startswith("close") for line in log)
        pool.hold({"bravo", "charlie"})  # the engine's first pass: their steps reuse them
        _ = [(await pool.get(n)).channel for n in ("bravo", "charlie")]
        assert len(log) == 3 and not any(line.startswith("close") for line in log)
    finally:
        await pool.close()
        store.close()
