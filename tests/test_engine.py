"""The rollout engine in one process: real stores, fake agents, a fake clock, no sleeps.

The harness, in the manner of etcd raft's deterministic tests:

* **The world** (``World``): three nodes enrolled into a real ``Store`` on a tmp SQLite file
  (``alpha`` is the leader node, so the order is bravo, charlie, alpha), a real CA, and one
  ``FakeAgent`` per node (``tests/fake_agent.py``), which answers like the real agent and keeps
  count of what it was asked to do. The outside https/http checks of ``leader.changes`` look at
  those fake nodes.
* **A leader** (``World.boot``): a ``Store`` and a ``ScriptedSchema`` (a ``SchemaStore`` whose
  writes a test can count, crash, or cross with an admin command) on that file, an ``Engine``
  and the admin ``Commands``. Booting again on the same world is a restarted leader: new stores
  on the same file, the same agents.
* **The loop** (``Leader.run``): one pass is ``reconcile()`` then ``settle()`` (wait for the
  step tasks it started), then the fake clock ticks ``TICK_SECONDS``; passes repeat until the
  rollout ends, with a bound.
* **Determinism**: ``asyncio.to_thread`` is replaced by ``hop``, which yields to the loop once
  (as a thread hop would let other tasks run) and then runs the call on the loop. No threads,
  no real time: every run interleaves the tasks the same way, so a test can name "the 17th write"
  and mean the same write each time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import json
import random
import sqlite3
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn, TypeVar, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from structlog.testing import capture_logs

from leader import byo, changes, planner
from leader import engine as engine_module
from leader.agent_client import (
    NODE_STORE_UNAVAILABLE,
    BeingReceived,
    NotHeardYet,
    NotSent,
    StepFailed,
    SwitchRefused,
    cut_off_error,
)
from leader.commands import Commands, RolloutRequest
from leader.engine import (
    MAX_RETRY_SECONDS,
    STEP_DEADLINE,
    STEP_RETRY_SECONDS,
    TICK_SECONDS,
    UNKNOWN,
    UNKNOWN_ANSWERED,
    WAITS_FOR_FREEZE,
    Engine,
)
from leader.planner import PlanError
from leader.rollout_core import (
    IN_FLIGHT_NODE_STATES,
    TERMINAL_NODE_STATES,
    TERMINAL_ROLLOUT_STATES,
    Change,
    Client,
    FreezeMode,
    IllegalTransition,
    NodeRecord,
    NodeState,
    RolloutAction,
    RolloutState,
    Scope,
    Step,
)
from leader.schema_store import RolloutRow, SchemaStore, StaleRecords, write_clients
from leader.service import ERRORS
from leader.store import IssuedCert, NodeCert, Store
from leader.store_health import StoreHealth
from tests.fake_agent import (
    DISK_FULL_CAUSE,
    RESTART_SECONDS,
    START,
    STORE_CAUSE,
    FakeAgent,
    FakeAgents,
    FakeClock,
    FakeTxn,
)
from tlsroll import dbthread, features, pki
from tlsroll.clients import ClientSeen, ClientsView
from tlsroll.enums import TxnKind, TxnOutcome, another_switch
from tlsroll.errors import PKIError, PKIReason, TerminalError, TransientError
from tlsroll.rpc import status_for
from tlsroll.v1 import agent_pb2
from tlsroll.wire import TXN_KIND, clients_message

T = TypeVar("T")
N, R = NodeState, RolloutState

NODES = {"alpha": "10.0.0.1", "bravo": "10.0.0.2", "charlie": "10.0.0.3"}
LEADER = "alpha"
ORDER = ("bravo", "charlie", "alpha")  # by name, the leader node last
ADMIN = "admin:test"
ALL_DONE = dict.fromkeys(ORDER, N.DONE)


def verifier(mark: int) -> str:
    """A well-formed scrypt verifier (the engine only passes it on; nothing hashes here)."""
    salt, digest = bytes([mark]) * 16, bytes([mark]) * 32
    return json.dumps(
        {
            "alg": "scrypt",
            "n": 2**14,
            "r": 8,
            "p": 1,
            "salt": base64.b64encode(salt).decode(),
            "hash": base64.b64encode(digest).decode(),
        }
    )


VERIFIER_1, VERIFIER_2 = verifier(1), verifier(2)


# --- the harness ------------------------------------------------------------------------------


class Crash(BaseException):
    """The leader process dies here. A BaseException, so that nothing in the engine catches it
    (its step tasks log and retry every ``Exception``)."""


@dataclass
class Cue:
    """An admin command run once, on the loop, just before the engine's first save whose node
    records ``when`` matches: the command and the engine's write cross."""

    when: Callable[[Sequence[NodeRecord]], bool]
    action: Callable[[], Awaitable[object]]


class ScriptedSchema(SchemaStore):
    """A SchemaStore whose writes a test can count (``writes``), crash at (the ``crash_at``-th
    write raises ``Crash`` before it commits, or after with ``crash_after``; a dead leader
    writes nothing more) or cross with an admin command (``cue``)."""

    def __init__(self, store: Store, *, crash_at: int = 0, crash_after: bool = False) -> None:
        super().__init__(store.db)
        self.crash_at = crash_at
        self.crash_after = crash_after
        self.writes: list[str] = []
        self.dead = False
        self.stale = 0  # writes refused with StaleRecords
        self.cue: Cue | None = None

    def _write(self, method: str, write: Callable[[], T]) -> T:
        if self.dead:
            raise Crash(f"the leader is dead; no {method}")
        self.writes.append(method)
        here = len(self.writes) == self.crash_at
        if here and not self.crash_after:
            self._die(f"before write {self.crash_at} ({method})")
        try:
            result = write()
        except StaleRecords:
            self.stale += 1
            if here:
                self._die(f"after write {self.crash_at} ({method}, refused as stale)")
            raise
        if here:
            self._die(f"after write {self.crash_at} ({method})")
        return result

    def _die(self, where: str) -> NoReturn:
        self.dead = True
        raise Crash(where)

    def create(self, *args: Any, **kwargs: Any) -> RolloutRow:
        return self._write("create", functools.partial(super().create, *args, **kwargs))

    def save_states(self, *args: Any, **kwargs: Any) -> RolloutRow:
        return self._write("save_states", functools.partial(super().save_states, *args, **kwargs))

    def update_detail(self, *args: Any, **kwargs: Any) -> None:
        self._write("update_detail", functools.partial(super().update_detail, *args, **kwargs))

    def set_node_auth(self, *args: Any, **kwargs: Any) -> None:
        self._write("set_node_auth", functools.partial(super().set_node_auth, *args, **kwargs))

    async def interpose(self, method: str, args: tuple[Any, ...]) -> None:
        """Called by ``hop`` just before a call on this store runs."""
        cue = self.cue
        if cue is None or method != "save_states" or args[4] != "engine":
            return
        # The records the save would leave: ``before``'s, with the ones it is given (a step's
        # outcome gives only its node's).
        given = {r.name: r for r in args[2]}
        if not cue.when([given.get(r.name, r) for r in args[0].records]):
            return
        self.cue = None
        await cue.action()


async def hop(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread`` for the harness: one hop through the loop (the other tasks run, as
    they would while a thread works), then the call itself, on the loop."""
    await asyncio.sleep(0)
    owner = getattr(func, "__self__", None)
    if isinstance(owner, ScriptedSchema):
        await owner.interpose(func.__name__, args)
    return func(*args, **kwargs)


def ended(row: RolloutRow) -> bool:
    return row.rollout.state in TERMINAL_ROLLOUT_STATES


def states(row: RolloutRow) -> dict[str, NodeState]:
    return {r.name: r.state for r in row.records}


def open_store(path: Path) -> Store:
    store = Store(path)
    with store.db.read() as db:
        # A crash here is a process dying, not a power cut: what was committed stays in the
        # OS either way, so the tests do without an fsync per commit.
        db.execute("PRAGMA synchronous=OFF")
    return store


@dataclass(frozen=True)
class Audit:
    actor: str
    kind: str
    subject: str
    detail: dict[str, Any]


class Leader:
    """One leader process on the world's store file: its stores, engine and admin commands."""

    def __init__(
        self,
        world: World,
        freeze_lease: int,
        crash_at: int,
        crash_after: bool,
        prepare_ahead: int = 0,
    ) -> None:
        self.world = world
        self.store = open_store(world.path)
        self.schema = ScriptedSchema(self.store, crash_at=crash_at, crash_after=crash_after)
        clock = world.clock
        self.engine = Engine(
            self.store,
            self.schema,
            world.ca,
            world.agents,
            clock.wall,
            freeze_lease,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
            prepare_ahead=prepare_ahead,
        )
        self.commands = Commands(
            self.store, self.schema, clock.wall, lambda _seen: True, LEADER, self.engine.wake.set
        )

    async def start(
        self,
        change: Change = Change.ENABLE_TLS,
        *,
        max_parallel: int = 1,
        failure_budget: int = 0,
        freeze: FreezeMode = FreezeMode.NODE,
    ) -> RolloutRow:
        request = RolloutRequest(
            change,
            Scope.cluster(),
            max_parallel=max_parallel,
            failure_budget=failure_budget,
            freeze=freeze,
            auth_verifier_json=VERIFIER_1 if change is Change.ENABLE_TLS else None,
        )
        return await self.commands.start(request, ADMIN)

    async def control(self, action: RolloutAction) -> RolloutRow:
        return await self.commands.control("", action, ADMIN)

    async def one_pass(self) -> RolloutRow:
        """One pass of the engine's loop: plan and persist, run the steps until they end, and
        a tick of the clock. Returns the rollout as the pass left it."""
        await self.engine.reconcile()
        await self.engine.settle()
        if self.schema.dead:
            raise Crash("a step task crashed the leader")
        row = self.schema.latest()
        assert row is not None
        self.world.clock.advance(TICK_SECONDS)
        return row

    async def run(
        self, until: Callable[[RolloutRow], bool] = ended, passes: int = 100
    ) -> RolloutRow:
        """Pass after pass until ``until`` holds of the rollout (by default: it has ended)."""
        for _ in range(passes):
            row = await self.one_pass()
            if until(row):
                return row
        raise AssertionError(f"still not there after {passes} passes: {self.schema.latest()}")

    async def crash(self) -> None:
        """The process is gone: its step tasks stop where they stand; the agents live on."""
        tasks = list(self.engine.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()

    async def stop(self) -> None:
        await self.engine.close()
        self.store.close()

    def audit(self) -> list[Audit]:
        with self.store.db.read() as db:
            rows = db.execute("SELECT actor, kind, subject, detail FROM audit ORDER BY seq")
            return [Audit(r[0], r[1], r[2], json.loads(r[3])) for r in rows]


@dataclass
class World:
    """What outlives a leader: the store file, the CA, the nodes and their agents, the time."""

    path: Path
    clock: FakeClock
    ca: pki.CertificateAuthority
    agents: FakeAgents

    def boot(
        self,
        *,
        freeze_lease: int = 300,
        crash_at: int = 0,
        crash_after: bool = False,
        prepare_ahead: int = 0,
    ) -> Leader:
        return Leader(self, freeze_lease, crash_at, crash_after, prepare_ahead)


def make_world(directory: Path, mp: pytest.MonkeyPatch, nodes: Mapping[str, str] = NODES) -> World:
    clock = FakeClock()
    ca = pki.CertificateAuthority.create("tlsroll engine test CA", now=START)
    agents = FakeAgents(clock, ca.cert, nodes)
    mp.setattr(asyncio, "to_thread", hop)
    mp.setattr(dbthread, "run", hop)  # the store's thread (``tlsroll.dbthread``) too
    mp.setattr(changes, "outside_check", agents.outside_check)
    world = World(directory / "leader.sqlite3", clock, ca, agents)
    enrol(world)
    return world


def agent_serial(i: int) -> str:
    """The serial (hex) of the certificate the ``i``-th fake node enrolled with (``enrol``)."""
    return f"{i + 1:x}"


def enrol(world: World) -> None:
    """Every fake node enrolled with the names its agent will claim in preflight."""
    store = open_store(world.path)
    secret = "s" * 26
    for i, agent in enumerate(world.agents):
        store.add_token(
            f"tok{i:03}",
            secret,
            ttl=dt.timedelta(hours=1),
            uses=1,
            description="engine test",
            now=START,
            actor=ADMIN,
            node_name=agent.name,
            addresses=agent.names.ips,
            dns_names=agent.names.dns,
        )
    pin, fingerprint = "sha256:" + "0" * 64, "sha256:" + "1" * 64
    until = START + dt.timedelta(days=397)
    for i, agent in enumerate(world.agents):
        store.enrol(
            token_id=f"tok{i:03}",
            secret=secret,
            name=agent.name,
            addresses=agent.names.ips,
            dns_names=agent.names.dns,
            agent_version="test",
            agent_port=9442,
            key_pin=f"pin-{agent.name}",
            # Each its own serial (``agent_serial``): revoking one cuts off that node alone.
            issue=functools.partial(NodeCert, pin, fingerprint, agent_serial(i), until),
            now=START,
        )
        # Its agent says what it implements, as a real one's first heartbeat does: a rollout
        # that needs a feature blocks on an agent that reported none (``leader.agent_features``).
        store.heartbeat(agent.name, "test", now=START, features=features.AGENT_FEATURES)
    store.close()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return make_world(tmp_path, monkeypatch)


def most_in_flight(audit: Sequence[Audit]) -> int:
    """The most nodes in flight at once, replayed from the audit trail."""
    now: dict[str, NodeState] = {}
    most = 0
    for event in audit:
        if event.kind == "node.state":
            now[event.subject] = NodeState(event.detail["new"])
            most = max(most, sum(s in IN_FLIGHT_NODE_STATES for s in now.values()))
    return most


# --- the happy path ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_parallel", [1, 2])
async def test_enable_tls_switches_every_node_once_in_order(
    world: World, max_parallel: int
) -> None:
    leader = world.boot()
    started = await leader.start(max_parallel=max_parallel)
    assert started.rollout.order == ORDER

    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    calls = world.agents.calls
    assert [c.node for c in calls if c.method == "preflight"] == list(ORDER)
    assert [c.node for c in calls if c.method == "switch"] == list(ORDER)
    assert most_in_flight(leader.audit()) == max_parallel
    for record, detail in row.nodes:
        agent = world.agents[record.name]
        assert agent.applied["switch"] == 1, record.name
        assert (agent.scheme, agent.verifier) == ("https", VERIFIER_1), record.name
        assert agent.fingerprint == detail.cert_fingerprint, record.name
    assert leader.schema.node_auth() == dict.fromkeys(ORDER, row.meta.auth_version)
    assert row.meta.auth_version == 1
    await leader.stop()


def practice_material(world: World, monkeypatch: pytest.MonkeyPatch) -> byo.Material:
    """A practice CA's certificate and key for every fake node (``--cert-dir``'s material,
    ``byo.Material``), and the outside check patched to judge by the cluster CA: the fake nodes
    know only that one, where the outside check of a --cert-dir rollout trusts the practice CA."""
    from tests.byo_certs import key_pem, leaf, make_ca, pem

    practice = make_ca("Praxis CA", now=START)
    files = {}
    for agent in world.agents:
        ips, dns = list(agent.names.ips), list(agent.names.dns)
        cert, key = leaf(practice, ips, dns, now=START, cn=agent.names.common_name)
        files[agent.name] = byo.NodeMaterial(agent.name, pem(cert), key_pem(key), 0o600)
    check = world.agents.outside_check

    async def outside(live: str, closed: str, _ca: bytes, fingerprint: str = "") -> Any:
        return await check(live, closed, world.ca.cert_pem, fingerprint)

    monkeypatch.setattr(changes, "outside_check", outside)
    return byo.Material(practice.pem, files)


@pytest.mark.parametrize(
    ("change", "transitional", "cert_dir", "coming"),
    [
        (Change.ENABLE_TLS, False, False, (VERIFIER_1, False)),
        (Change.ENABLE_TLS, True, False, (VERIFIER_1, True)),  # phase 1: keep_http
        (Change.ENABLE_TLS, False, True, (VERIFIER_1, False)),  # stage_own
        (Change.ENABLE_TLS, True, True, (VERIFIER_1, True)),
        (Change.ROTATE_CERT, False, False, ("", False)),  # the password stays: no verifier
        (Change.ROTATE_CERT, False, True, ("", False)),
    ],
    ids=[
        "direct",
        "transitional",
        "cert-dir",
        "cert-dir-transitional",
        "rotate",
        "rotate-cert-dir",
    ],
)
async def test_a_stage_tells_the_agent_the_switch_to_come(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    change: Change,
    transitional: bool,
    cert_dir: bool,
    coming: tuple[str, bool],
) -> None:
    """Review of session 28, L6: the agent makes a node's switch ready at its Stage, but the
    Stage did not say which (a password verifier, keep_http), so a password switch's was
    made for nothing. The StageRequest carries the settings its node's SwitchRequest then
    carries: for each node, what its Stage said (``switch_to_come``) is what its Switch then
    carries, whichever strategy, stage (the CA's or ``--cert-dir``'s) and change (review of
    session 29, L4: a divergence would silently drop every prepared switch)."""
    from leader.rollout_enums import Strategy
    from leader.wire import CHANGE

    leader = world.boot()
    leader.commands.vault = leader.engine.vault  # as the daemon wires them (--cert-dir)
    if change is Change.ROTATE_CERT:  # the nodes on https first, as a rotation needs
        await leader.start()
        assert states(await leader.run()) == ALL_DONE

    own = practice_material(world, monkeypatch) if cert_dir else None
    # Phase 1's confirm wants both schemes answering; the fake node knows only its scheme.
    monkeypatch.setattr(changes, "dual_check", changes.outside_check)

    told: dict[str, list[tuple[str, bool]]] = {}
    carried: dict[str, list[tuple[str, bool]]] = {}
    for agent in world.agents:
        stage, switch_and_watch = agent.stage, agent.switch_and_watch

        async def staging(
            request: agent_pb2.StageRequest,
            name: str = agent.name,
            real: Callable[[agent_pb2.StageRequest], Awaitable[agent_pb2.StageResponse]] = stage,
        ) -> agent_pb2.StageResponse:
            assert request.own_certificate is cert_dir
            assert request.HasField("switch_to_come"), name
            coming_ = request.switch_to_come
            told.setdefault(name, []).append((coming_.auth_verifier_json, coming_.keep_http))
            return await real(request)

        def switching(
            request: agent_pb2.SwitchRequest, name: str = agent.name, real: Any = switch_and_watch
        ) -> Any:
            assert CHANGE.read(request.change, "change") is change
            carried.setdefault(name, []).append((request.auth_verifier_json, request.keep_http))
            return real(request)

        monkeypatch.setattr(agent, "stage", staging)
        monkeypatch.setattr(agent, "switch_and_watch", switching)
    request = RolloutRequest(
        change,
        Scope.cluster(),
        strategy=Strategy.TRANSITIONAL if transitional else Strategy.DIRECT,
        auth_verifier_json=VERIFIER_1 if change is Change.ENABLE_TLS else None,
        own_certs=own,
    )
    await leader.commands.start(request, ADMIN)
    if transitional:  # phase 1 ends with every node dual, awaiting `rollout finalize`
        row = await leader.run(lambda r: r.rollout.state is R.AWAITING_FINALIZE)
        assert states(row) == dict.fromkeys(ORDER, N.DUAL)
    else:
        row = await leader.run()
        assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert told == carried == {name: [coming] for name in ORDER}
    for record, detail in row.nodes:
        agent = world.agents[record.name]
        assert agent.fingerprint == detail.cert_fingerprint, record.name
        assert agent.verifier == VERIFIER_1, record.name  # a rotation keeps the password
    await leader.stop()


@pytest.mark.parametrize("cert_dir", [False, True], ids=["ca-signed", "cert-dir"])
async def test_a_stage_whose_agent_names_another_certificate_fails_the_node(
    world: World, monkeypatch: pytest.MonkeyPatch, cert_dir: bool
) -> None:
    """Brief s67 budget 2: the leader recorded the fingerprint the agent's StageResponse gave
    as the certificate the node would serve, though it signed (or, ``--cert-dir``, holds) and
    sent that certificate itself. An agent that names another one now fails the node's stage,
    the reason naming both; nothing recorded as served, the node not switched; the others go
    on (a failure budget of 1) and are recorded with the certificate they were sent."""

    leader = world.boot()
    leader.commands.vault = leader.engine.vault  # as the daemon wires them (--cert-dir)
    own = practice_material(world, monkeypatch) if cert_dir else None
    other = "sha256:" + "ab" * 32
    bravo = world.agents["bravo"]
    sent: list[str] = []

    async def staging(
        request: agent_pb2.StageRequest,
        real: Callable[[agent_pb2.StageRequest], Awaitable[agent_pb2.StageResponse]] = bravo.stage,
    ) -> agent_pb2.StageResponse:
        sent.append(pki.fingerprint(pki.load_cert_pem(request.certificate_pem)))
        answer = await real(request)
        return agent_pb2.StageResponse(fingerprint=other, not_after=answer.not_after)

    monkeypatch.setattr(bravo, "stage", staging)
    request = RolloutRequest(
        Change.ENABLE_TLS,
        Scope.cluster(),
        failure_budget=1,
        auth_verifier_json=VERIFIER_1,
        own_certs=own,
    )
    await leader.commands.start(request, ADMIN)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == {**ALL_DONE, "bravo": N.FAILED}
    record, detail = row.node("bravo")
    assert len(sent) == 1 and sent[0] != other
    assert record.reason == (
        f"stage: the agent of bravo says it staged the certificate {other}, not {sent[0]}, the"
        " one the leader signed and sent; not switched (check that agent: tlsroll nodes"
        " --check)"
    ), record.reason
    assert detail.cert_fingerprint == ""  # never recorded as served
    assert world.agents.calls_to("bravo", "switch") == []
    assert bravo.scheme == "http"
    for name in ("charlie", "alpha"):
        agent = world.agents[name]
        assert row.node(name)[1].cert_fingerprint == agent.fingerprint != "", name
    await leader.stop()


async def test_a_node_left_dual_serves_its_certificate_to_the_expiry_watch_and_auto_rotate(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of session 29, finding 1: ``SchemaStore.served_certificates`` counted only
    nodes that ended ``done``, so the certificate a transitional phase 1 leaves each node
    serving (``dual``) was in no expiry warning, on no page and never auto-rotated. A
    disable-tls taking the nodes back to http removes them, as before. (The finalize's effect
    on what is served is in tests/test_viewer_parts.py: the fake agents run its switch only.)"""
    from leader.auto_rotate import AutoRotator
    from leader.expiry import ExpiryWatch
    from leader.maintenance import parse_window

    monkeypatch.setattr(changes, "dual_check", changes.outside_check)  # fakes know one scheme
    leader = world.boot()
    watch = ExpiryWatch(
        leader.store,
        leader.schema,
        world.ca.cert,
        list,
        world.clock.wall,
        warning_days=100_000,  # every certificate within its horizon: all due
    )
    rotator = AutoRotator(
        watch,
        leader.schema,
        leader.commands,
        enabled=True,
        window=parse_window("Sat 02:00-05:00"),  # outside it: the rotator says who is due
        local_clock=lambda: dt.datetime(2026, 12, 2, 12, 0),  # a Wednesday
    )

    def served() -> dict[str, str]:
        return {name: f for name, (f, _) in leader.schema.served_certificates().items()}

    async def seen() -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
        warned = {e.subject: e.fingerprint for e in watch.warnings() if e.kind == "server"}
        return served(), warned, (await rotator.check()).nodes

    phase_1, row = await transitional_phase_1(leader)
    live = {name: world.agents[name].fingerprint for name in ORDER}
    assert all(live.values())
    assert await seen() == (live, live, tuple(sorted(ORDER)))

    disabling = await leader.start(Change.DISABLE_TLS)
    row = await leader.run()
    assert disabling.meta.undoes == phase_1.rollout.id
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert {world.agents[n].scheme for n in ORDER} == {"http"}
    assert await seen() == ({}, {}, ())
    await leader.stop()


async def test_a_node_left_dual_revokes_the_certificate_its_new_one_supersedes(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of session 29, finding 1, the same gap in the revocation: a node an enable-tls
    leaves ``done`` revokes the server certificates issued to it before (superseded); one a
    transitional phase 1 leaves ``dual`` did not, nor its finalize (which stages none), so
    a certificate of an earlier https period stayed valid on record for good."""

    monkeypatch.setattr(changes, "dual_check", changes.outside_check)  # fakes know one scheme
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    first = {name: world.agents[name].fingerprint for name in ORDER}
    await leader.start(Change.DISABLE_TLS)
    assert states(await leader.run()) == ALL_DONE
    await transitional_phase_1(leader)
    for name in ORDER:
        live = world.agents[name].fingerprint
        assert live != first[name]
        assert cert_reasons(leader, name) == [(first[name], "superseded"), (live, "")], name
    await leader.stop()


async def test_pipelining_prepares_the_next_node_while_one_switches(world: World) -> None:
    """prepare_ahead=1: the next node's preflight and stage run while a node switches; the
    switches still run one at a time, in order, each after the previous node's confirm."""
    leader = world.boot(prepare_ahead=1)
    await leader.start(max_parallel=1)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    calls = [(c.node, c.method) for c in world.agents.calls]
    assert [n for n, m in calls if m == "switch"] == list(ORDER)
    first, second = ORDER[0], ORDER[1]
    last_of_first = max(i for i, (n, _m) in enumerate(calls) if n == first)
    # The second node was prepared while the first one switched: it started once the first
    # was staged (not beside the first one's preparation, which the first switch waits for) ...
    assert calls.index((first, "stage")) < calls.index((second, "preflight")) < last_of_first
    # ... and its switch began only after the first node's switch and confirm ended.
    assert calls.index((second, "switch")) > last_of_first
    assert most_in_flight(leader.audit()) == 2
    await leader.stop()


def _call(world: World, node: str, method: str) -> int:
    """Where the first ``method`` call to ``node`` is in the world's calls."""
    return next(
        i for i, c in enumerate(world.agents.calls) if c.node == node and c.method == method
    )


def _restart_seen(world: World, node: str, after: float) -> int:
    """Where the first read of ``node``'s switch that says its config is written (begun
    ``after`` fake seconds after its Switch: ``config_written_after``) is in the calls."""
    calls = world.agents.calls
    switch = calls[_call(world, node, "switch")]
    return next(
        i
        for i, c in enumerate(calls)
        if c.node == node and c.method == "get_transaction" and c.at >= switch.at + after
    )


def _slow_stream(agent: FakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of ``agent``'s transactions takes 10 ms of real time too: its switch lasts
    longer than the steps of another node, as a real restart does (the fake stream's own
    time is fake: a switch would end before a step of another node that goes through the
    store)."""
    fetch = agent.get_transaction

    async def get_transaction(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        await asyncio.sleep(0.01)
        return await fetch(request)

    monkeypatch.setattr(agent, "get_transaction", get_transaction)


async def test_a_node_prepared_ahead_waits_for_the_switch_before_it_to_restart(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: with every switch slot taken, the next node's preflight is sent once the
    switching node's agent says its config is written (its restart begins), not with the
    Switch: its preparation then runs inside that restart, not beside the freeze, the create's
    record and the config's write (on one machine they share its cores). The order, the
    outcome and the pipelining (each node prepared before its turn) as before."""
    for agent in world.agents:
        agent.txn_seconds = 1.5
        agent.config_written_after = 0.6
        _slow_stream(agent, monkeypatch)  # a switch outlasts the next node's preparation
    leader = world.boot(prepare_ahead=1)
    await leader.start(max_parallel=1)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    # The second node is started with the first one's switch (the third node here only after
    # the first is done: this harness begins the second one's stage at its next pass, after
    # that switch, so no switch is under way when the third starts).
    first, second = ORDER[0], ORDER[1]
    assert _call(world, second, "preflight") > _restart_seen(world, first, 0.6)
    assert _call(world, second, "preflight") < _call(world, first, "outside_check")
    assert most_in_flight(leader.audit()) == 2
    await leader.stop()


async def test_a_switch_that_says_nothing_holds_no_preparation_for_long(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold is bounded (``PREPARE_HOLD_SECONDS``, elapsed time): a switch whose stream
    stays at its start (a freeze draining long requests) lets the next node be prepared
    while it lasts."""
    monkeypatch.setattr(engine_module, "PREPARE_HOLD_SECONDS", 0.05)
    unread: list[str] = []  # what the loop logs as errors: a wait's result nobody read
    asyncio.get_running_loop().set_exception_handler(lambda _l, c: unread.append(c["message"]))
    first, second = ORDER[0], ORDER[1]
    slow = world.agents[first]
    slow.txn_seconds, slow.config_written_after = 30.0, 29.0
    _slow_stream(slow, monkeypatch)  # 100 reads, a second of real time at its start
    leader = world.boot(prepare_ahead=1)
    await leader.start(max_parallel=1)
    row = await leader.run()
    assert states(row) == ALL_DONE
    switch, preflight = _call(world, first, "switch"), _call(world, second, "preflight")
    assert switch < preflight < _restart_seen(world, first, 29.0)
    await leader.stop()
    gc.collect()
    await asyncio.sleep(0)
    assert unread == []  # (review rev54a M1: a gather cancelled by the bound was logged)


async def test_a_held_preparation_goes_on_once_a_switch_slot_comes_free(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev54a M2: a preparation held while both switch slots were taken goes on as soon
    as one comes free (a node's confirm done), though the other switch is still at its start:
    the rollout waits for it then. Driven by hand (``Engine._prepare_later``): in this harness
    a pass that would start such a node waits for every step of the pass before, the slow
    switch's too. The hold's bound is an hour: only the free slot can end the hold within the
    test's bound (a hang's, 30 s; it was 1 s against a hold of 30 s, a clock bound)."""
    monkeypatch.setattr(engine_module, "PREPARE_HOLD_SECONDS", 3600.0)
    leader = world.boot(prepare_ahead=1)
    engine = leader.engine
    rollout = SimpleNamespace(id="r-held", max_parallel=2)

    def with_switching(*positions: int) -> RolloutRow:
        """A rollout row whose nodes at ``positions`` take a switch slot."""
        return cast(RolloutRow, SimpleNamespace(rollout=rollout, switching=positions))

    monkeypatch.setattr(engine_module, "_positions", lambda row, _states: list(row.switching))
    row = with_switching(0, 1)  # as the step's task was given it: both slots taken
    stored = [row]  # as the store has it now

    async def look_again(rollout_id: str) -> RolloutRow:
        assert rollout_id == "r-held"
        return stored[0]

    monkeypatch.setattr(engine, "_rollout_now", look_again)
    slow, quick = asyncio.Event(), asyncio.Event()
    engine.before_restart[("r-held", "bravo", Step.SWITCH)] = slow
    engine.before_restart[("r-held", "charlie", Step.SWITCH)] = quick
    held = asyncio.ensure_future(engine._prepare_later(row))
    await asyncio.sleep(0.1)
    assert not held.done()  # both slots taken, both switches at their start
    quick.set()  # its restart begins: its slot is still taken
    await asyncio.sleep(0.1)
    assert not held.done()
    stored[0] = with_switching(0)  # its switch and confirm done: a slot is free
    assert await asyncio.wait_for(held, 30) is True
    await leader.stop()


async def test_a_preparation_with_no_switch_under_way_reads_no_rollout(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold reads the stored rollout only while a switch is at its start: a preparation
    with none under way (the rollout's first nodes, every node without pipelining) costs no
    read, which would often go to the store's thread behind the write that began it."""
    leader = world.boot(prepare_ahead=1)
    engine = leader.engine
    reads: list[str] = []

    async def rollout_now(rollout_id: str) -> RolloutRow | None:
        reads.append(rollout_id)
        return None

    monkeypatch.setattr(engine, "_rollout_now", rollout_now)
    row = cast(RolloutRow, SimpleNamespace(rollout=SimpleNamespace(id="r-none", max_parallel=1)))
    assert await engine._prepare_later(row) is False
    done = asyncio.Event()
    done.set()  # a switch past its start
    engine.before_restart[("r-none", "bravo", Step.SWITCH)] = done
    assert await engine._prepare_later(row) is False
    assert reads == []
    await leader.stop()


async def test_a_preparation_that_a_free_switch_slot_waits_for_is_not_held(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a switch slot free, the node started for it is prepared at once, though another
    node's switch is at its start: it is not prepared ahead of anything (it switches as soon
    as it is staged), and holding it would hold the rollout."""
    monkeypatch.setattr(engine_module, "PREPARE_HOLD_SECONDS", 30.0)
    first, quick, third = ORDER
    slow = world.agents[first]
    slow.txn_seconds, slow.config_written_after = 30.0, 29.0
    _slow_stream(slow, monkeypatch)  # its switch at its start for about a second
    # The quick one's confirm is written with its switch (its stream says it verified), and
    # the third node starts with it: this harness's next pass would wait for the slow switch.
    world.agents[quick].txn_seconds, world.agents[quick].verified_for = 0.9, 0.4
    leader = world.boot(prepare_ahead=0)
    await leader.start(max_parallel=2)
    row = await leader.run()
    assert states(row) == ALL_DONE
    # The third node started as the quick one's switch ended (a slot free), while the slow
    # one's agent had not yet said its config was written.
    assert _call(world, quick, "switch") < _call(world, third, "preflight")
    assert _call(world, third, "preflight") < _restart_seen(world, first, 29.0)
    await leader.stop()


async def test_the_outside_check_begins_as_the_switch_ends(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each confirm's outside check is begun by the switch step as the agent reports the switch
    complete, so it runs while the switch's outcome is written (it only looks at the node; it
    sends the agent nothing), and the confirm takes its answer: one check per node, each begun
    before the write that records its node's switch done (performance only: the outcome and the
    order of the switches are as before)."""
    leader = world.boot()
    began: list[str] = []
    real = SchemaStore.save_states

    def save_states(self: SchemaStore, before: RolloutRow, *args: Any, **kw: Any) -> RolloutRow:
        for rec in args[1]:
            newly = before.node(rec.name)[0].state is not NodeState.CONFIRMING
            held = (before.rollout.id, rec.name) in leader.engine.checks
            if rec.state is NodeState.CONFIRMING and newly and held:
                began.append(rec.name)
        return real(self, before, *args, **kw)

    monkeypatch.setattr(SchemaStore, "save_states", save_states)
    await leader.start(max_parallel=1)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    assert began == list(ORDER)
    checks = [c.node for c in world.agents.calls if c.method == "outside_check"]
    assert sorted(checks) == sorted(ORDER)  # the confirm checked no second time
    assert leader.engine.checks == {}  # each taken by its confirm
    await leader.stop()


async def test_the_outside_check_begins_as_the_agent_verifies_the_new_server(
    world: World,
) -> None:
    """Issue 15: a real agent's stream says the new server verified before the agent
    unfreezes it and journals the switch complete; the confirm's outside check begins then,
    so it runs while the unfreeze, the completion's record and its way to the leader do, not
    after them. One check per node, each begun before the read that brought the switch's
    outcome; the rollout as before."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4  # one read of the stream (every 0.3 s) sees the verify
    leader = world.boot()
    await leader.start(max_parallel=1)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    calls = [(c.node, c.method) for c in world.agents.calls]
    for name in ORDER:
        mine = [m for n, m in calls if n == name]
        last_read = len(mine) - 1 - mine[::-1].index("get_transaction")
        assert mine.count("outside_check") == 1, (name, mine)  # the confirm did not check again
        assert mine.index("outside_check") < last_read, (name, mine)
    assert leader.engine.checks == {}  # each taken by its confirm
    await leader.stop()


async def transitional_phase_1(leader: Leader) -> tuple[RolloutRow, RolloutRow]:
    """An enable-tls rollout of the transitional strategy started and run to its phase 1's
    end (every node dual, awaiting `rollout finalize`): the rollout as started, and as it is
    then."""
    from leader.rollout_enums import Strategy

    request = RolloutRequest(
        Change.ENABLE_TLS,
        Scope.cluster(),
        strategy=Strategy.TRANSITIONAL,
        auth_verifier_json=VERIFIER_1,
    )
    phase_1 = await leader.commands.start(request, ADMIN)
    row = await leader.run(lambda r: r.rollout.state is R.AWAITING_FINALIZE)
    assert states(row) == dict.fromkeys(ORDER, N.DUAL)
    return phase_1, row


def written_states(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[str, NodeState, NodeState]]:
    """Every node record the store writes, as (node, state before, state written), in order
    (``SchemaStore.save_states``; the records it leaves instead for a node cut off, if it
    does: ``IfCutOff``)."""
    written: list[tuple[str, NodeState, NodeState]] = []
    real = SchemaStore.save_states

    def save_states(self: SchemaStore, before: RolloutRow, *args: Any, **kw: Any) -> RolloutRow:
        instead = kw.get("if_cut_off")
        try:
            return real(self, before, *args, **kw)
        finally:
            given = instead.nodes if instead is not None and instead.taken else args[1]
            written.extend((r.name, before.node(r.name)[0].state, r.state) for r in given)

    monkeypatch.setattr(SchemaStore, "save_states", save_states)
    return written


async def test_a_switch_whose_check_passed_as_it_ended_is_confirmed_in_the_same_write(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the check begun at the verify has found nothing wrong by the time the switch
    completes: the switch's outcome and the confirm's are one durable write (each node goes
    from switching to done; no record of it confirming is ever written), no confirm step runs
    (its step times are the switch's end), both outcomes are logged as their steps', and the
    rollout is as before."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4
    written = written_states(monkeypatch)
    leader = world.boot()
    await leader.start(max_parallel=1)
    with capture_logs() as logs:
        row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    for name in ORDER:
        mine = [(was, now) for n, was, now in written if n == name]
        assert (N.SWITCHING, N.DONE) in mine, (name, mine)
        assert all(N.CONFIRMING not in pair for pair in mine), (name, mine)
        steps = row.node(name)[1].steps
        assert steps["confirm"] == [steps["switch"][1], steps["switch"][1]], (name, steps)
        finished = [
            (e["step"], e["node_event"])
            for e in logs
            if e["event"] == "step.finished" and e.get("node") == name
        ]
        assert finished[-2:] == [("switch", "switch_done"), ("confirm", "confirm_done")]
    checks = [c.node for c in world.agents.calls if c.method == "outside_check"]
    assert sorted(checks) == sorted(ORDER)
    assert leader.engine.checks == {}
    await leader.stop()


async def test_a_node_cut_off_as_its_switch_ends_is_not_confirmed_with_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev52a M: the agent of a node is cut off (its certificate revoked) while its
    switch runs, and the switch completes with the check begun at the verify passed, before a
    pass has read the cut-off set: the confirm is not written with the switch (that took the
    node to done and the rollout completed, nobody told to remove the lost machine); the node
    is failed as one cut off mid-switch, and the rollout halts."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4
    leader = world.boot()
    cut = cut_off_agents(world, leader)
    real = world.agents.outside_check
    serial = agent_serial(list(NODES).index("charlie"))

    async def check(live: str, closed: str, ca: bytes, fingerprint: str = "") -> Any:
        if f"//{world.agents['charlie'].address}:" in live and "charlie" not in cut:
            # Revoked now: the store says so, the pool refuses it; no pass has read it yet.
            leader.store.revoke(serial, reason="lost", now=world.clock.wall(), actor=ADMIN)
            cut.add("charlie")
        return await real(live, closed, ca, fingerprint)

    monkeypatch.setattr(changes, "outside_check", check)
    await leader.start(max_parallel=1)
    row = await leader.run(passes=400)
    charlie = node(row.records, "charlie")
    assert charlie.state is N.NEEDS_ATTENTION, (charlie, row.rollout.state)
    assert row.rollout.state is R.HALTED
    assert "tlsroll nodes remove charlie" in row.meta.reason, row.meta.reason
    await leader.stop()


async def test_a_node_cut_off_after_it_was_dialled_is_not_confirmed_in_the_write(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev52d L1: the agent pool said charlie's agent may be dialled as its switch
    completed with the check begun at the verify passed, and `tlsroll ca revoke` of its
    certificate commits after that, before the write of the switch's and the confirm's
    outcomes: that write took charlie to done (the pool's answer was older than the
    revocation) and the rollout completed, nobody told to remove the lost machine. The write
    itself decides, in its transaction: the switch's outcome only (charlie confirming, no
    confirm logged), and charlie is failed as a node cut off mid-switch; the rollout halts,
    its note naming charlie."""
    from leader.rollout_core import cut_off_mid_switch

    written = confirm_with_switch(world, monkeypatch)
    # After the switch step ended (the pool's answer is in), before the write commits.
    leader, row, logs = await revoking_charlie_as_it_is_written_done(world)
    charlie = node(row.records, "charlie")
    assert (charlie.state, charlie.reason) == (
        N.NEEDS_ATTENTION,
        cut_off_mid_switch("charlie"),
    ), (charlie, row.rollout.state)
    assert row.rollout.state is R.HALTED, row.rollout
    assert "tlsroll nodes remove charlie" in row.meta.reason, row.meta.reason
    assert states(row)["alpha"] is N.SKIPPED, states(row)
    mine = [(was, now) for n, was, now in written if n == "charlie"]
    assert (N.SWITCHING, N.CONFIRMING) in mine, mine
    assert all(N.DONE not in pair for pair in mine), mine
    committed = [
        a.detail["new"] for a in leader.audit() if a.kind == "node.state" and a.subject == "charlie"
    ]
    assert "done" not in committed, committed
    assert not [
        e
        for e in logs
        if e["event"] == "step.finished"
        and e.get("node") == "charlie"
        and e.get("node_event") == "confirm_done"
    ]
    assert _auth_rows(leader, "charlie") == []  # no password version live, as for a node done
    await leader.stop()


async def revoking_charlie_as_it_is_written_done(
    world: World,
) -> tuple[Leader, RolloutRow, list[MutableMapping[str, Any]]]:
    """A rollout (max-parallel 1) in which `tlsroll ca revoke` of charlie's certificate
    commits just before the write that would take charlie to done: the leader, the rollout
    as it ended and its log lines."""
    leader = world.boot()
    cut = cut_off_agents(world, leader)
    serial = agent_serial(list(NODES).index("charlie"))

    async def revoke() -> None:
        leader.store.revoke(serial, reason="lost", now=world.clock.wall(), actor=ADMIN)
        cut.add("charlie")  # the fake pool refuses it from now on, as ``AgentPool.get``

    leader.schema.cue = Cue(
        when=lambda records: node(records, "charlie").state is N.DONE, action=revoke
    )
    await leader.start(max_parallel=1)
    with capture_logs() as logs:
        row = await leader.run(passes=400)
    assert cut == {"charlie"}  # (the cue ran)
    return leader, row, logs


def _auth_rows(leader: Leader, name: str) -> list[dict[str, Any]]:
    """The password versions the store has as live on node ``name`` (``node_auth``)."""
    with leader.store.db.read() as db:
        return [dict(r) for r in db.execute("SELECT * FROM node_auth WHERE name = ?", (name,))]


async def test_a_node_cut_off_while_its_confirm_step_ran_is_not_written_done(
    world: World,
) -> None:
    """Review rev53a M2: a confirm step of its own (no check merged with the switch) takes
    its node to done in its outcome's write; a `tlsroll ca revoke` of charlie's certificate
    that commits while the step's outside check runs, after the pass that planned the step
    read the nodes cut off, was written over: charlie done, the rollout completed, nobody
    told to remove the lost machine. That write decides in its transaction too: charlie left
    confirming, failed as a node cut off mid-switch, the rollout halted with its note."""
    from leader.rollout_core import cut_off_mid_switch

    # The confirm step has run (its check passed), before its outcome's write commits.
    leader, row, logs = await revoking_charlie_as_it_is_written_done(world)
    assert not [e for e in logs if e.get("with_switch")]  # the confirm step's own write
    charlie = node(row.records, "charlie")
    assert (charlie.state, charlie.reason) == (N.NEEDS_ATTENTION, cut_off_mid_switch("charlie"))
    assert row.rollout.state is R.HALTED, row.rollout
    assert "tlsroll nodes remove charlie" in row.meta.reason, row.meta.reason
    committed = [
        a.detail["new"] for a in leader.audit() if a.kind == "node.state" and a.subject == "charlie"
    ]
    assert "done" not in committed, committed
    assert _auth_rows(leader, "charlie") == []
    dropped = [e for e in logs if e["event"] == "step.result_dropped" and e["node"] == "charlie"]
    assert [(e["step"], e["node_event"], e["reason"]) for e in dropped] == [
        ("confirm", "confirm_done", "its agent is cut off")
    ]
    await leader.stop()


async def test_a_check_still_running_as_the_switch_ends_is_left_to_the_confirm_step(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check begun at the verify has not ended within ``CONFIRM_WITH_SWITCH`` of the
    switch's completion: the switch's outcome is written alone (the node confirming), and the
    confirm step takes the check's answer when it comes (one check per node)."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4
    check = world.agents.outside_check

    async def slow(live: str, closed: str, ca: bytes, fingerprint: str = "") -> Any:
        # Longer than the switch's wait (the fake clock's sleep yields once), in real
        # scheduling: the switch completes first.
        for _ in range(50):
            await asyncio.sleep(0)
        answer = await check(live, closed, ca, fingerprint)
        for _ in range(50):
            await asyncio.sleep(0)
        return answer

    monkeypatch.setattr(changes, "outside_check", slow)
    written = written_states(monkeypatch)
    leader = world.boot()
    await leader.start(max_parallel=1)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    for name in ORDER:
        mine = [(was, now) for n, was, now in written if n == name]
        assert (N.SWITCHING, N.CONFIRMING) in mine, (name, mine)
        assert (N.CONFIRMING, N.DONE) in mine, (name, mine)
    checks = [c.node for c in world.agents.calls if c.method == "outside_check"]
    assert sorted(checks) == sorted(ORDER)  # the confirm took the check begun at the verify
    assert leader.engine.checks == {}
    await leader.stop()


# --- a switch confirmed in the same write, beside the other paths (issue 15) -----------------


def confirm_with_switch(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, NodeState, NodeState]]:
    """Every agent's stream says the new server verified ahead of the switch's end, so each
    switch's confirm is written with it (``written_states``: the list returned)."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4
    return written_states(monkeypatch)


def assert_confirmed_with_switch(
    written: Sequence[tuple[str, NodeState, NodeState]],
    names: Sequence[str] = ORDER,
    end: NodeState = N.DONE,
) -> None:
    """Each node in ``names`` went from switching to ``end`` in one write, never confirming."""
    for name in names:
        mine = [(was, now) for n, was, now in written if n == name]
        assert (N.SWITCHING, end) in mine, (name, mine)
        assert all(N.CONFIRMING not in pair for pair in mine), (name, mine)


def during_check_of(
    world: World, monkeypatch: pytest.MonkeyPatch, name: str, action: Callable[[], Awaitable[Any]]
) -> None:
    """``action`` runs once, as the outside check of node ``name`` begun at its verify runs:
    while its switch is under way."""
    real = changes.outside_check
    done: list[bool] = []

    async def check(live: str, closed: str, ca: bytes, fingerprint: str = "") -> Any:
        if f"//{world.agents[name].address}:" in live and not done:
            done.append(True)
            await action()
        return await real(live, closed, ca, fingerprint)

    monkeypatch.setattr(changes, "outside_check", check)


async def test_an_abort_while_a_node_switches_ends_it_done_in_one_write(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Aborted while bravo switches: bravo's switch and its confirm are written at once (done),
    the rollout ends aborted and the nodes not begun are skipped."""
    written = confirm_with_switch(world, monkeypatch)
    leader = world.boot()
    during_check_of(world, monkeypatch, "bravo", lambda: leader.control(RolloutAction.ABORT))
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.ABORTED
    assert states(row) == {"bravo": N.DONE, "charlie": N.SKIPPED, "alpha": N.SKIPPED}
    assert_confirmed_with_switch(written, ["bravo"])
    assert world.agents["bravo"].applied["switch"] == 1
    assert world.agents["bravo"].scheme == "https"
    assert not world.agents.calls_to("charlie", "preflight")
    assert row.meta.reason == f"abort by {ADMIN}"
    assert leader.engine.checks == {}
    await leader.stop()


async def test_a_pause_while_a_node_switches_holds_the_next_until_resumed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused while bravo switches: bravo ends done in one write, charlie does not start while
    the rollout is paused; resumed, the rollout completes, each node confirmed with its
    switch."""
    written = confirm_with_switch(world, monkeypatch)
    leader = world.boot()
    during_check_of(world, monkeypatch, "bravo", lambda: leader.control(RolloutAction.PAUSE))
    await leader.start()
    row = await leader.run(until=lambda row: node(row.records, "bravo").state is N.DONE)
    for _ in range(5):
        row = await leader.one_pass()  # nothing more happens while paused
    assert row.rollout.state is R.PAUSED
    assert states(row) == {"bravo": N.DONE, "charlie": N.PENDING, "alpha": N.PENDING}
    assert_confirmed_with_switch(written, ["bravo"])
    assert not world.agents.calls_to("charlie", "preflight")

    await leader.control(RolloutAction.RESUME)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    assert_confirmed_with_switch(written)
    assert leader.engine.checks == {}
    await leader.stop()


async def test_a_scope_frozen_rollout_confirms_each_switch_with_it_and_unfreezes_at_the_end(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--freeze scope``: each switch's confirm is written with it, every node stays frozen
    until the rollout's scope unfreeze, and that unfreeze is sent to each node."""
    written = confirm_with_switch(world, monkeypatch)
    leader = world.boot(freeze_lease=6)
    await leader.start(freeze=FreezeMode.SCOPE)
    row = await leader.run(passes=400)
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    assert not any(r.scope_frozen for r in row.records)
    assert_confirmed_with_switch(written)
    assert_frozen_until_the_scope_unfreeze(world)
    assert {n: world.agents[n].applied["unfreeze"] for n in ORDER} == dict.fromkeys(ORDER, 1)
    assert leader.engine.checks == {}
    await leader.stop()


async def test_a_transitional_rollout_and_its_finalize_confirm_each_switch_with_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phase 1 of a transitional rollout: each node goes from switching to dual in one write;
    its finalize: from switching to done in one write, and the finalize completes."""

    monkeypatch.setattr(changes, "dual_check", changes.outside_check)  # fakes know one scheme
    written = confirm_with_switch(world, monkeypatch)
    leader = world.boot()
    phase_1, row = await transitional_phase_1(leader)
    assert_confirmed_with_switch(written, end=N.DUAL)

    for agent in world.agents:  # a fake node knows one scheme: each says it is dual
        preflight = agent.preflight

        async def dual(
            request: agent_pb2.PreflightRequest, real: Any = preflight
        ) -> agent_pb2.PreflightResponse:
            answer: agent_pb2.PreflightResponse = await real(request)
            del answer.server.schemes[:]
            answer.server.schemes.extend(["http", "https"])
            return answer

        monkeypatch.setattr(agent, "preflight", dual)
    written.clear()
    finalize = await leader.commands.finalize(phase_1.rollout.id, ADMIN, force=True)
    assert finalize.rollout.change is Change.FINALIZE
    row = await leader.run()
    assert row.rollout.id == finalize.rollout.id
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    assert_confirmed_with_switch(written)
    assert [c.node for c in world.agents.calls if c.method == "switch"] == list(ORDER) * 2
    assert leader.engine.checks == {}
    await leader.stop()


def recorded_at_the_end(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Any, list[Any]]]:
    """For each node, what the write that left it done recorded with it
    (``SchemaStore.save_states``): the password version live on it ("-": none), and the
    revocations of what it served before (the live fingerprint, how many revoked)."""
    seen: dict[str, tuple[Any, list[Any]]] = {}
    real = SchemaStore.save_states

    def save_states(self: SchemaStore, before: RolloutRow, *args: Any, **kw: Any) -> RolloutRow:
        row = real(self, before, *args, **kw)
        for r in args[1]:
            if r.state is N.DONE and before.node(r.name)[0].state is not N.DONE:
                revoked = [(v.live_fingerprint, len(v.serials)) for v in kw.get("revoke", ())]
                seen[r.name] = ((kw.get("auth") or {}).get(r.name, "-"), revoked)
        return row

    monkeypatch.setattr(SchemaStore, "save_states", save_states)
    return seen


async def run_confirmed_or_not(
    world: World,
    leader: Leader,
    monkeypatch: pytest.MonkeyPatch,
    change: Change,
    with_switch: bool,
) -> tuple[RolloutRow, dict[str, tuple[Any, list[Any]]]]:
    """Run ``change`` to completion, each confirm written with its switch (``with_switch``)
    or on its own (the node confirming in between): the row and ``recorded_at_the_end``'s."""
    written = written_states(monkeypatch)
    at_the_end = recorded_at_the_end(monkeypatch)
    if with_switch:
        confirm_with_switch(world, monkeypatch)
    await leader.start(change)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    if with_switch:
        assert_confirmed_with_switch(written)
    else:
        assert all((n, N.SWITCHING, N.CONFIRMING) in written for n in ORDER), written
    return row, at_the_end


@pytest.mark.parametrize("with_switch", [True, False], ids=["with-switch", "own-write"])
async def test_a_change_password_confirmed_with_its_switch_records_the_password_as_ever(
    world: World, monkeypatch: pytest.MonkeyPatch, with_switch: bool
) -> None:
    """The password version live on each node is recorded by the combined write as by the
    confirm's own (``own-write``: verified_for 0, the node confirming in between)."""
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    await leader.commands.stage_password(VERIFIER_2, ADMIN)
    _row, at_the_end = await run_confirmed_or_not(
        world, leader, monkeypatch, Change.CHANGE_PASSWORD, with_switch
    )
    assert at_the_end == {n: (2, []) for n in ORDER}  # in the write that left it done
    assert {n: world.agents[n].verifier for n in ORDER} == dict.fromkeys(ORDER, VERIFIER_2)
    assert leader.schema.node_auth() == dict.fromkeys(ORDER, 2)
    assert leader.schema.pending_password_nodes() == set()
    await leader.stop()


@pytest.mark.parametrize("with_switch", [True, False], ids=["with-switch", "own-write"])
async def test_a_rotate_cert_confirmed_with_its_switch_revokes_the_superseded_as_ever(
    world: World, monkeypatch: pytest.MonkeyPatch, with_switch: bool
) -> None:
    """The certificate a rotation supersedes is revoked by the combined write as by the
    confirm's own (``own-write``), and the new one stays valid."""
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    first = {name: world.agents[name].fingerprint for name in ORDER}
    row, at_the_end = await run_confirmed_or_not(
        world, leader, monkeypatch, Change.ROTATE_CERT, with_switch
    )
    for record, detail in row.nodes:
        name = record.name
        live = world.agents[name].fingerprint
        assert live == detail.cert_fingerprint and live != first[name], name
        assert cert_reasons(leader, name) == [(first[name], "superseded"), (live, "")], name
        assert at_the_end[name] == ("-", [(live, 1)]), name  # in the write that left it done
    assert leader.schema.node_auth() == dict.fromkeys(ORDER, 1)  # the password stays
    await leader.stop()


@pytest.mark.parametrize("crash_after", [False, True], ids=["before", "after"])
async def test_a_leader_restarted_at_a_switch_confirmed_with_it_goes_on(
    world: World, monkeypatch: pytest.MonkeyPatch, crash_after: bool
) -> None:
    """The leader dies at the write of charlie's switch and confirm (before it commits, or
    just after): a restarted leader finishes the rollout, nothing switched twice or rolled
    back, and the switches after it are confirmed with them too."""
    written = confirm_with_switch(world, monkeypatch)
    first = world.boot()

    async def die_at_this_write() -> None:
        first.schema.crash_at = len(first.schema.writes) + 1
        first.schema.crash_after = crash_after

    first.schema.cue = Cue(lambda r: node(r, "charlie").state is N.DONE, die_at_this_write)
    await first.start()
    with pytest.raises(Crash):
        await first.run()
    await first.crash()
    assert (("charlie", N.SWITCHING, N.DONE) in written) is crash_after
    kept = SchemaStore(world.path)
    try:
        stored = kept.latest()
    finally:
        kept.close()
    assert stored is not None
    assert node(stored.records, "charlie").state is (N.DONE if crash_after else N.SWITCHING)

    written.clear()
    second = world.boot()
    row = await second.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    assert_confirmed_with_switch(written, ["alpha"])
    for name in ORDER:
        agent = world.agents[name]
        assert (agent.applied["switch"], agent.applied["rollback"]) == (1, 0), name
        assert agent.scheme == "https", name
    assert second.schema.node_auth() == dict.fromkeys(ORDER, 1)
    assert second.engine.checks == {}
    await second.stop()


async def test_no_check_begins_at_the_verify_where_the_unfreeze_may_change_answers(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev51a M1: an exec driver's unfreeze is a command the admin wrote (a reload, say),
    which may leave the server other than the agent verified it; its agent's states do not
    say ``unfreeze_keeps_answers``, and the confirm checks the server once the switch has
    completed: a server the unfreeze left down is rolled back, not taken for done."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4
        agent.unfreeze_keeps_answers = False
    bravo = world.agents["bravo"]
    check = world.agents.outside_check

    async def outside(live: str, closed: str, ca: bytes, fingerprint: str = "") -> Any:
        switch = next((t for (_r, k), t in bravo.txns.items() if k is TxnKind.SWITCH), None)
        done = switch is not None and world.clock.monotonic() >= switch.started + bravo.txn_seconds
        if f"//{bravo.address}:" in live and done:
            await check(live, closed, ca, fingerprint)  # its mark in the calls
            return f"{live}: refused (the unfreeze command left the server down)"
        return await check(live, closed, ca, fingerprint)

    monkeypatch.setattr(changes, "outside_check", outside)
    leader = world.boot()
    await leader.start(failure_budget=1)
    row = await leader.run(passes=400)
    assert states(row)["bravo"] is N.ROLLED_BACK
    calls = [(c.node, c.method) for c in world.agents.calls]
    for name in ("alpha", "bravo"):
        mine = [m for n, m in calls if n == name]
        switch_done = len(mine) - 1 - mine[::-1].index("get_transaction")
        if name == "bravo":  # its rollback's reads come after: the switch's last read
            switch_done = max(
                i
                for i, m in enumerate(mine)
                if m == "get_transaction" and i < mine.index("rollback")
            )
        assert mine.index("outside_check") > switch_done, (name, mine)
    assert leader.engine.checks == {}
    await leader.stop()


async def test_a_problem_the_check_begun_at_the_verify_finds_rolls_the_node_back(
    world: World,
) -> None:
    """The check begun at the verify is the confirm's: a problem it finds rolls the node back
    as a confirm's own check would."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4
    world.agents["bravo"].outside_problem = "https://bravo: certificate unknown"
    leader = world.boot()
    await leader.start(failure_budget=1)
    row = await leader.run(passes=400)
    assert states(row)["bravo"] is N.ROLLED_BACK
    assert world.agents["bravo"].applied["rollback"] == 1
    bravo = [m for n, m in ((c.node, c.method) for c in world.agents.calls) if n == "bravo"]
    assert bravo.count("outside_check") == 1  # the check begun at the verify, taken
    assert leader.engine.checks == {}
    await leader.stop()


async def test_a_check_begun_at_the_verify_is_dropped_when_the_stream_breaks(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that breaks after the verify: the step runs again (the agent replays the
    switch); the check begun on the broken stream is dropped (none is kept while the step
    waits to run again), the replayed switch's confirm checks for itself, and the rollout
    ends as ever."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4
    charlie = world.agents["charlie"]
    real = charlie.switch_and_watch
    calls: list[str] = []
    kept_at_replay: list[bool] = []

    async def breaking(request: agent_pb2.SwitchRequest) -> Any:
        calls.append("call")
        first = len(calls) == 1
        async for txn in real(request):
            if not first and len(kept_at_replay) == 0:
                kept_at_replay.append(any(k[1] == "charlie" for k in leader.engine.checks))
            yield txn
            if first and txn.phase == agent_pb2.TRANSACTION_PHASE_VERIFIED:
                raise TransientError("the stream broke")

    monkeypatch.setattr(charlie, "switch_and_watch", breaking)
    leader = world.boot()
    await leader.start(max_parallel=1)
    row = await leader.run(passes=400)
    assert row.rollout.state is R.COMPLETED
    assert len(calls) == 2
    assert kept_at_replay == [False]  # the broken stream's check was not kept
    assert leader.engine.checks == {}
    await leader.stop()


async def test_a_check_begun_at_the_verify_long_before_the_switch_completed_is_made_again(
    world: World,
) -> None:
    """A switch whose verify came long before its completion (its unfreeze tried again for a
    while): the check begun at the verify may have seen a server gone since, so its confirm
    does not take it; the check is made again as the switch completes."""
    for agent in world.agents:
        agent.txn_seconds = 2.5
        agent.verified_for = 2.0  # verified 2 s of fake time before the switch completes
    leader = world.boot()
    await leader.start(max_parallel=1)
    row = await leader.run(passes=400)
    assert row.rollout.state is R.COMPLETED
    calls = [(c.node, c.method) for c in world.agents.calls]
    for name in ORDER:
        mine = [m for n, m in calls if n == name]
        last_read = len(mine) - 1 - mine[::-1].index("get_transaction")
        assert mine.count("outside_check") == 2, (name, mine)
        assert (
            mine.index("outside_check")
            < last_read
            < len(mine) - 1 - mine[::-1].index("outside_check")
        ), (name, mine)
    assert leader.engine.checks == {}
    await leader.stop()


async def test_a_check_begun_at_the_verify_is_dropped_when_the_switch_rolls_back(
    world: World,
) -> None:
    """The check a switch began at its verify is not its confirm's when the switch then rolls
    back (its unfreeze failed, say): dropped, the node rolled back as before, nothing kept."""
    for agent in world.agents:
        agent.txn_seconds = 0.9
        agent.verified_for = 0.4
    world.agents["bravo"].switch_outcome = TxnOutcome.ROLLED_BACK
    leader = world.boot()
    await leader.start(failure_budget=1)
    row = await leader.run(passes=400)
    assert states(row)["bravo"] is N.ROLLED_BACK
    assert ("bravo", "outside_check") in [(c.node, c.method) for c in world.agents.calls]
    assert leader.engine.checks == {}  # the dropped check is not kept for a confirm
    await leader.stop()


async def test_a_check_begun_ahead_that_was_cancelled_is_made_again_by_its_confirm(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of session 26: the check begun as a switch ended, cancelled on its own while its
    confirm waited for it, ended the confirm as "cancelled", silently, and the loop ran the
    confirm again. The confirm now checks itself, once, and goes on."""
    leader = world.boot()
    real_check = changes.ChangeSteps.outside_problem
    real_confirm = changes.ChangeSteps.confirm
    cancelled: list[str] = []
    confirms: Counter[str] = Counter()

    async def outside_problem(self: changes.ChangeSteps, ctx: changes.StepContext) -> str | None:
        if ctx.node == "charlie" and not cancelled:
            cancelled.append(ctx.node)
            raise asyncio.CancelledError  # as a cancelled check ends
        return await real_check(self, ctx)

    async def confirm(self: changes.ChangeSteps, ctx: changes.StepContext) -> changes.Outcome:
        confirms[ctx.node] += 1
        return await real_confirm(self, ctx)

    monkeypatch.setattr(changes.ChangeSteps, "outside_problem", outside_problem)
    monkeypatch.setattr(changes.ChangeSteps, "confirm", confirm)
    await leader.start(max_parallel=1)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    assert cancelled == ["charlie"]
    assert confirms == Counter(dict.fromkeys(ORDER, 1))  # charlie's confirm ran once
    checks = [c.node for c in world.agents.calls if c.method == "outside_check"]
    assert sorted(checks) == sorted(ORDER)
    await leader.stop()


async def test_a_longer_transaction_costs_no_more_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the leader rewrote a node's details on every read of its transaction, so the
    writes grew with the switch's duration. Now a write happens only when something changed:
    a transaction six times as long makes exactly as many writes."""

    async def writes(name: str, txn_seconds: float) -> Counter[str]:
        (tmp_path / name).mkdir()
        world = make_world(tmp_path / name, monkeypatch)
        for agent in world.agents:
            agent.txn_seconds = txn_seconds
        leader = world.boot()
        await leader.start(max_parallel=1)
        row = await leader.run(passes=400)
        assert row.rollout.state is R.COMPLETED
        await leader.stop()
        # each switch is read pending at least twice, then done (confirm asks nothing more)
        assert sum(c.method == "get_transaction" for c in world.agents.calls) >= 3 * len(NODES)
        return Counter(leader.schema.writes)

    short, long = await writes("short", 0.5), await writes("long", 3.0)
    assert long == short
    assert long["update_detail"] <= 4 * len(NODES)  # preflight, stage, the switch's start and end


async def test_a_switch_writes_its_restart_time_with_its_outcome_not_while_it_runs(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real agent's stream says the restart's duration once the server has restarted (its
    phase ``restarted``), a verify and an unfreeze before the switch's outcome. What the
    schema shows of a running switch, its freeze begun, is written at once; the restart's
    duration comes with the outcome's write: one durable write (and store hand-off) per node,
    not two (there was one more for the restart time, a few milliseconds before the outcome
    wrote it anyway)."""
    real = FakeAgent._message

    def restarted_before_the_end(agent: FakeAgent, txn: Any) -> agent_pb2.Transaction:
        message = real(agent, txn)
        pending = message.outcome == agent_pb2.TRANSACTION_OUTCOME_PENDING
        if pending and agent.world.clock.monotonic() > txn.started:
            message.restart_seconds = RESTART_SECONDS
        return message

    monkeypatch.setattr(FakeAgent, "_message", restarted_before_the_end)
    for agent in world.agents:
        agent.txn_seconds = 1.0  # read pending (and restarted) more than once
    leader = world.boot()
    await leader.start(max_parallel=1)
    row = await leader.run(passes=400)
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert Counter(leader.schema.writes)["update_detail"] == len(NODES)  # each freeze begun
    for name in NODES:
        detail = row.node(name)[1]
        assert detail.restart_seconds == RESTART_SECONDS, name
        assert detail.freeze_started_at is not None, name
    await leader.stop()


async def test_a_switch_s_freeze_window_is_the_length_its_agent_measured(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clock audit s35 J: the node's wall clock stepped back an hour during the freeze, so its
    two times are 3597.5 s the wrong way round; the agent's measure in elapsed time (2.5 s) is
    recorded beside them, and it is the window the schema shows."""
    real = FakeAgent._message

    def stepped_back(agent: FakeAgent, txn: Any) -> agent_pb2.Transaction:
        message = real(agent, txn)
        if message.outcome != agent_pb2.TRANSACTION_OUTCOME_PENDING:
            began = message.freeze_started_at.ToDatetime(tzinfo=dt.UTC)
            message.freeze_ended_at.FromDatetime(began - dt.timedelta(seconds=3597.5))
            message.freeze_seconds = 2.5
        return message

    monkeypatch.setattr(FakeAgent, "_message", stepped_back)
    leader = world.boot()
    await leader.start(max_parallel=1)
    row = await leader.run(passes=400)
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    for name in NODES:
        detail = row.node(name)[1]
        assert detail.freeze_started_at is not None and detail.freeze_ended_at is not None
        assert detail.freeze_ended_at < detail.freeze_started_at, name
        assert (detail.freeze_seconds, detail.freeze_window) == (2.5, 2.5), name
    assert leader.schema.switch_times()[0] == [2.5] * len(NODES)
    await leader.stop()


@pytest.mark.parametrize("bad", [-5.0, float("inf"), float("nan"), 1e300, 86400.5])
async def test_an_agent_s_measure_that_is_not_sane_is_taken_as_not_sent(
    world: World, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    """Review s36 L2: the leader recorded any ``freeze_seconds`` and ``restart_seconds`` an
    agent sent (a buggy or foreign one, with a valid certificate): a negative window, a
    300-digit one, inf (the viewer's node row raised), NaN. Only a finite value in 0..a day
    counts; else the window is the times' difference and the restart is not timed, with one
    warning per node and field."""
    real = FakeAgent._message

    def insane(agent: FakeAgent, txn: Any) -> agent_pb2.Transaction:
        message = real(agent, txn)
        message.restart_seconds = bad  # on every state: still logged once
        if message.outcome != agent_pb2.TRANSACTION_OUTCOME_PENDING:
            began = message.freeze_started_at.ToDatetime(tzinfo=dt.UTC)
            message.freeze_ended_at.FromDatetime(began + dt.timedelta(seconds=2.5))
            message.freeze_seconds = bad
        return message

    monkeypatch.setattr(FakeAgent, "_message", insane)
    for agent in world.agents:
        agent.txn_seconds = 1.0  # read pending more than once
    leader = world.boot()
    await leader.start(max_parallel=1)
    with capture_logs() as logs:
        row = await leader.run(passes=400)
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    for name in NODES:
        detail = row.node(name)[1]
        assert detail.freeze_seconds is None and detail.freeze_window == 2.5, name
        assert detail.restart_seconds == 0.0, name
    assert leader.schema.switch_times() == ([2.5] * len(NODES), [])
    refused = Counter(
        (e["node"], e["field"]) for e in logs if e["event"] == "transaction.measure_refused"
    )
    assert refused == Counter(
        {(n, f): 1 for n in NODES for f in ("restart_seconds", "freeze_seconds")}
    )
    assert all(e["log_level"] == "warning" for e in logs if e["event"].endswith("_refused"))
    await leader.stop()


async def test_a_rollback_s_freeze_is_not_shown_with_the_switch_s_end_and_length(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s36 L3: charlie's confirm fails and its agent rolls the switch back, on the same
    node row. The switch's freeze ended and measured 2.5 s; the rollback's began later. While
    the rollback is frozen its window is open (the switch's end is not its end), and when it
    ends unmeasured (an older agent, a reboot during it) its window is its own times'
    difference (30 s), not the switch's 2.5 s."""
    real = FakeAgent._message

    def measured_switch(agent: FakeAgent, txn: Any) -> agent_pb2.Transaction:
        message = real(agent, txn)
        if message.outcome != agent_pb2.TRANSACTION_OUTCOME_PENDING:
            began = message.freeze_started_at.ToDatetime(tzinfo=dt.UTC)
            if txn.kind is TxnKind.SWITCH:
                message.freeze_ended_at.FromDatetime(began + dt.timedelta(seconds=2.5))
                message.freeze_seconds = 2.5
            else:  # the rollback's own freeze, with no measure
                message.freeze_ended_at.FromDatetime(began + dt.timedelta(seconds=30))
        return message

    monkeypatch.setattr(FakeAgent, "_message", measured_switch)
    world.agents["charlie"].outside_problem = "handshake: unknown CA"
    for agent in world.agents:
        agent.txn_seconds = 1.0  # the rollback is read frozen (pending) before it ends
    leader = world.boot()
    seen: list[tuple[Any, ...]] = []
    update_detail = SchemaStore.update_detail

    def watched(self: SchemaStore, rollout_id: str, name: str, **changes: Any) -> None:
        update_detail(self, rollout_id, name, **changes)
        if name == "charlie":
            kept = self.get(rollout_id)
            assert kept is not None
            d = kept.node(name)[1]
            seen.append((d.freeze_started_at, d.freeze_ended_at, d.freeze_window))

    monkeypatch.setattr(SchemaStore, "update_detail", watched)
    await leader.start(failure_budget=1)
    row = await leader.run(passes=400)
    assert states(row)["charlie"] is N.ROLLED_BACK
    charlie = world.agents["charlie"]
    assert (charlie.applied["switch"], charlie.applied["rollback"]) == (1, 1)
    detail = row.node("charlie")[1]
    assert detail.freeze_started_at is not None and detail.freeze_ended_at is not None
    assert detail.freeze_ended_at - detail.freeze_started_at == dt.timedelta(seconds=30)
    assert (detail.freeze_seconds, detail.freeze_window) == (None, 30.0)
    # The rollback's freeze, once begun and before it ended, was shown open.
    rollback_began = detail.freeze_started_at
    frozen = [s for s in seen if s[0] == rollback_began and s[2] != 30.0]
    assert frozen and all(end is None and window is None for _, end, window in frozen), seen
    await leader.stop()


# --- a leader crash at every persisted point --------------------------------------------------


async def full_rollout(leader: Leader) -> RolloutRow:
    """The rollout the crash tests break: enable-tls on three nodes, two at a time."""
    await leader.start(max_parallel=2)
    return await leader.run()


@functools.cache
def writes_of_a_full_rollout() -> int:
    """How many writes ``full_rollout`` makes without a crash (the same every run)."""

    async def count(world: World) -> int:
        leader = world.boot()
        row = await full_rollout(leader)
        assert row.rollout.state is R.COMPLETED
        await leader.stop()
        return len(leader.schema.writes)

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        return asyncio.run(count(make_world(Path(tmp), mp)))


async def test_the_harness_is_deterministic(tmp_path: Path) -> None:
    """What the crash tests stand on: two runs make the same writes and the same agent calls
    at the same fake times."""
    runs = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        with pytest.MonkeyPatch.context() as mp:
            world = make_world(tmp_path / name, mp)
            leader = world.boot()
            await full_rollout(leader)
            await leader.stop()
        calls = [(c.node, c.method, c.at, c.answer, c.frozen) for c in world.agents.calls]
        runs.append((leader.schema.writes, calls))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == writes_of_a_full_rollout()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "crash_at" in metafunc.fixturenames:
        metafunc.parametrize("crash_at", range(1, writes_of_a_full_rollout() + 1))


@pytest.mark.parametrize("crash_after", [False, True], ids=["before", "after"])
async def test_a_leader_crash_at_any_write_loses_nothing_and_repeats_nothing(
    world: World, crash_at: int, crash_after: bool
) -> None:
    """Persist before send: whichever write the leader dies at (before it commits, or just
    after), a restarted leader finishes the rollout, and no node is switched twice."""
    first = world.boot(crash_at=crash_at, crash_after=crash_after)
    with pytest.raises(Crash):
        await full_rollout(first)
    await first.crash()

    second = world.boot()
    if second.schema.latest() is None:  # it died taking the start command: the admin retries
        await second.start(max_parallel=2)
    row = await second.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    for name in ORDER:
        agent = world.agents[name]
        assert agent.applied["switch"] == 1, name
        assert agent.applied["rollback"] == 0, name
        assert [kind for _id, kind in agent.txns] == ["switch"], name
        assert agent.scheme == "https", name
    assert second.schema.node_auth() == dict.fromkeys(ORDER, 1)
    await second.stop()


# --- admin commands that cross the engine -----------------------------------------------------


def server_certs(leader: Leader, name: str) -> list[IssuedCert]:
    """The server certificates the leader's store records for node ``name``, oldest first."""
    return [c for c in leader.store.list_certificates("server") if c.node == name]


def control_during_preflight(
    leader: Any, agent: Any, action: RolloutAction, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """The admin's ``action`` lands while ``agent``'s preflight is in flight (before the agent
    answers); its real preflight, to put back."""
    real = agent.preflight

    async def meanwhile(request: agent_pb2.PreflightRequest) -> Any:
        await leader.control(action)
        return await real(request)

    monkeypatch.setattr(agent, "preflight", meanwhile)
    return cast(Callable[..., Any], real)


def node(records: Sequence[NodeRecord], name: str) -> NodeRecord:
    return next(r for r in records if r.name == name)


async def test_an_abort_that_crosses_the_verdict_to_switch_wins(world: World) -> None:
    """The engine is about to save "bravo switches" (with bravo's stage outcome, in one write:
    ``Engine._plan_next``); the abort lands first. The engine's write is stale, it plans again
    from the aborting rollout, and bravo is skipped, never switched."""
    leader = world.boot()
    leader.schema.cue = Cue(
        when=lambda records: node(records, "bravo").state is N.STAGED,
        action=lambda: leader.control(RolloutAction.ABORT),
    )
    await leader.start()

    row = await leader.run()

    assert leader.schema.stale == 1
    assert row.rollout.state is R.ABORTED
    assert states(row) == dict.fromkeys(ORDER, N.SKIPPED)
    assert not [c for c in world.agents.calls if c.method == "switch"]
    assert world.agents["bravo"].scheme == "http"
    trail = [(a.actor, a.kind, a.detail.get("new")) for a in leader.audit()]
    assert (ADMIN, "rollout.state", "aborting") in trail
    assert ("engine", "node.state", "switching") not in trail
    await leader.stop()


async def test_an_abort_that_crosses_a_step_result_loses_neither(world: World) -> None:
    """Bravo's switch is done and the engine is about to record it; the abort lands first. The
    record is written again on the fresh records: bravo finishes, the others are skipped."""
    leader = world.boot()
    leader.schema.cue = Cue(
        when=lambda records: node(records, "bravo").state is N.CONFIRMING,
        action=lambda: leader.control(RolloutAction.ABORT),
    )
    await leader.start()

    row = await leader.run()

    assert leader.schema.stale == 1
    assert row.rollout.state is R.ABORTED
    assert states(row) == {"bravo": N.DONE, "charlie": N.SKIPPED, "alpha": N.SKIPPED}
    assert world.agents["bravo"].applied["switch"] == 1
    assert not world.agents.calls_to("charlie", "preflight")
    trail = [(a.actor, a.kind, a.subject, a.detail.get("new")) for a in leader.audit()]
    bravo = f"{row.rollout.id}/bravo"
    aborted = trail.index((ADMIN, "rollout.state", row.rollout.id, "aborting"))
    recorded = trail.index(("engine", "node.state", bravo, "confirming"))
    assert aborted < recorded < trail.index(("engine", "node.state", bravo, "done"))
    assert row.meta.reason == f"abort by {ADMIN}"
    await leader.stop()


@pytest.mark.parametrize(
    "crossing",
    [
        lambda records: node(records, "bravo").state is N.CONFIRMING,
        # the verdict to start charlie is written with bravo's confirm outcome
        lambda records: node(records, "bravo").state is N.DONE,
    ],
    ids=["bravo's switch result", "the verdict to start charlie"],
)
async def test_a_pause_that_crosses_the_engine_holds_new_nodes_only(
    world: World, crossing: Callable[[Sequence[NodeRecord]], bool]
) -> None:
    """Paused while bravo is in flight (its result about to be saved), or just as charlie is
    about to start: bravo finishes, charlie does not start until the rollout is resumed."""
    leader = world.boot()
    leader.schema.cue = Cue(crossing, lambda: leader.control(RolloutAction.PAUSE))
    await leader.start()

    row = await leader.run(until=lambda row: node(row.records, "bravo").state is N.DONE)
    for _ in range(5):
        row = await leader.one_pass()  # nothing more happens while paused

    assert leader.schema.stale == 1
    assert row.rollout.state is R.PAUSED
    assert states(row) == {"bravo": N.DONE, "charlie": N.PENDING, "alpha": N.PENDING}
    assert not world.agents.calls_to("charlie", "preflight")

    await leader.control(RolloutAction.RESUME)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    trail = [(a.actor, a.detail.get("old"), a.detail.get("new")) for a in leader.audit()]
    assert (ADMIN, "running", "paused") in trail
    assert (ADMIN, "paused", "running") in trail
    await leader.stop()


async def test_a_pause_from_another_connection_is_seen_though_the_rollout_is_kept(
    world: World,
) -> None:
    """Issue 15: the engine keeps the active rollout in memory instead of reading every node
    row per step. A pause written through another connection to the file (another process)
    just as the engine is about to start charlie from what it keeps (with bravo's confirm
    outcome): the engine's save is refused as stale, charlie does not start, and the passes
    after it plan from the pause."""
    leader = world.boot()

    async def pause_elsewhere() -> None:
        kept = leader.schema.active()
        assert kept is not None and leader.schema.active() is kept  # in memory, not re-read
        other = SchemaStore(world.path)
        try:
            row = other.active()
            assert row is not None
            paused = row.rollout.with_action(RolloutAction.PAUSE, switched=True)
            other.save_states(row, paused, row.records, world.clock.wall(), ADMIN, "paused")
        finally:
            other.close()

    leader.schema.cue = Cue(lambda r: node(r, "bravo").state is N.DONE, pause_elsewhere)
    await leader.start()
    row = await leader.run(until=lambda row: node(row.records, "bravo").state is N.DONE)
    for _ in range(5):
        row = await leader.one_pass()

    assert leader.schema.cue is None  # the pause did cross the engine
    assert leader.schema.stale == 1
    assert row.rollout.state is R.PAUSED
    assert states(row) == {"bravo": N.DONE, "charlie": N.PENDING, "alpha": N.PENDING}
    assert not world.agents.calls_to("charlie", "preflight")
    await leader.control(RolloutAction.RESUME)
    row = await leader.run()
    assert states(row) == ALL_DONE
    await leader.stop()


# --- a switch that does not complete ----------------------------------------------------------


def switch_fails(agent: FakeAgent) -> None:
    agent.switch_outcome = TxnOutcome.FAILED
    agent.switch_reason = "restoring the old config failed: disk full"


def switch_rolls_back(agent: FakeAgent) -> None:
    agent.switch_outcome = TxnOutcome.ROLLED_BACK
    agent.switch_reason = "the server did not come back on https"


def switch_refused(agent: FakeAgent) -> None:
    agent.refuse["switch"] = "this node is busy with switch of rollout r0"


@pytest.mark.parametrize(
    ("script", "state", "reason"),
    [
        (switch_fails, N.NEEDS_ATTENTION, "restoring the old config failed: disk full"),
        (switch_rolls_back, N.ROLLED_BACK, "the server did not come back on https"),
        # Refused before it began: nothing changed, so failed, not rolled back (s71 reenrol).
        (switch_refused, N.FAILED, "switch refused: this node is busy with switch"),
    ],
    ids=["failed", "rolled-back", "refused"],
)
async def test_a_switch_that_does_not_complete_halts_the_rollout(
    world: World, script: Callable[[FakeAgent], None], state: NodeState, reason: str
) -> None:
    script(world.agents["charlie"])
    leader = world.boot()
    await leader.start()

    row = await leader.run()

    assert row.rollout.state is R.HALTED
    assert states(row) == {"bravo": N.DONE, "charlie": state, "alpha": N.SKIPPED}
    assert node(row.records, "charlie").reason.startswith(reason)
    assert row.meta.reason.startswith(f"halted: charlie {state.value}: {reason}")
    refused = state is N.FAILED  # nothing began: it says so (session 71, reenrol)
    assert ("nothing on the node was changed" in node(row.records, "charlie").reason) is refused
    rid = row.rollout.id  # the retry, and the way back for bravo (switched)
    way_on = f"tlsroll rollout retry {rid} or go back to http: tlsroll rollout rollback {rid}"
    assert row.meta.reason.endswith(f"next: finish the nodes left: {way_on}"), row.meta.reason
    assert not world.agents.calls_to("alpha", "preflight")
    await leader.stop()


STALE = "stale epoch 1: this node has seen epoch 2 (FAILED_PRECONDITION)"
NOT_LEADER = "the caller is not this node's leader (PERMISSION_DENIED)"
ASK_FAILED = "the journal is busy (ABORTED)"


def refuses_its_replay(
    agent: FakeAgent, kind: TxnKind, method: str, *, question: str | None = None
) -> None:
    """``agent`` begins the step's transaction (``kind``), but the answer to the first read of
    it is lost (the step runs again), and from then on it refuses the request that began it
    (``method``: its replay) with a stale epoch, as an agent does whose leader's store was
    restored, before it looks whether it holds it. ``question``: "refused", it refuses to say
    what it holds too (a leader identity it no longer trusts: PERMISSION_DENIED);
    "unreachable", the first answer to that question is lost too; "other", it answers with
    a switch of another certificate than the one this rollout staged (not this step's);
    "failing", it answers the question with its own failure (ABORTED) every time; "failed
    once", the first time only; "change NAME", it answers with a switch whose journalled
    change (``Transaction.change``) is NAME."""
    get, begin = agent.get_transaction, getattr(agent, method)
    lost = False
    unanswered = 1 if question == "unreachable" else 0
    failing = {"failing": 10**6, "failed once": 1}.get(question or "", 0)

    async def get_transaction(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        nonlocal lost, unanswered, failing
        if not lost and any(k is kind for _, k in agent.txns):
            lost = True
            raise TransientError(f"agent {agent.name}: unreachable")
        if question == "refused" and lost:
            raise StepFailed(NOT_LEADER, grpc.StatusCode.PERMISSION_DENIED)
        if failing and lost:
            failing -= 1
            agent.world.log(agent, "get_transaction", request.rollout_id, 0, "failed")
            raise StepFailed(ASK_FAILED, grpc.StatusCode.ABORTED)
        if unanswered and lost:
            unanswered -= 1
            raise TransientError(f"agent {agent.name}: unreachable")
        txn = await get(request)
        if question == "other" and lost:
            txn.cert_fingerprint = "sha256:" + "9" * 64
        if (question or "").startswith("change ") and lost:
            txn.change = (question or "").removeprefix("change ")
        return txn

    async def replayed(request: Any) -> agent_pb2.Transaction:
        if lost:
            agent.world.log(agent, method, request.command.rollout_id, 0, "refused")
            raise StepFailed(STALE, grpc.StatusCode.FAILED_PRECONDITION)
        return cast(agent_pb2.Transaction, await begin(request))

    agent.get_transaction = get_transaction  # type: ignore[method-assign]
    setattr(agent, method, replayed)


@pytest.mark.parametrize(
    ("outcome", "question", "state"),
    [
        (TxnOutcome.COMPLETED, None, N.DONE),
        (TxnOutcome.ROLLED_BACK, None, N.ROLLED_BACK),
        (TxnOutcome.COMPLETED, "refused", N.NEEDS_ATTENTION),
        # The question's answer lost: the step runs again (refused again), and asks again.
        (TxnOutcome.COMPLETED, "unreachable", N.DONE),
        # Not the certificate this rollout staged: another switch, not followed; it may
        # have changed the node, so it needs attention (session 72: it was failed).
        (TxnOutcome.COMPLETED, "other", N.NEEDS_ATTENTION),
        # The question answered with the agent's own failure every time: asked again a few
        # times, then not known (review s72 refused, L4: the step ran again without end).
        (TxnOutcome.COMPLETED, "failing", N.NEEDS_ATTENTION),
        # Its failure once: asked again within the step, and followed.
        (TxnOutcome.COMPLETED, "failed once", N.DONE),
    ],
    ids=[
        "completed",
        "rolled-back",
        "question-refused",
        "question-lost",
        "other-switch",
        "question-failing",
        "question-failed-once",
    ],
)
async def test_a_switch_refused_when_run_again_is_followed_if_it_began(
    world: World, outcome: TxnOutcome, question: str | None, state: NodeState
) -> None:
    """Review s71 revplans, M: a refusal answered to a switch step that runs again does not
    prove that nothing began. The leader asks the agent whether it holds the step's switch:
    it does, so it is followed to its outcome (done, or rolled back), never "failed: nothing
    on the node was changed" (which a named way back leaves out). An agent that refuses the
    question too leaves it unknown: the node needs attention, saying so."""
    charlie = world.agents["charlie"]
    charlie.switch_outcome, charlie.switch_reason = outcome, "the server did not come back"
    refuses_its_replay(charlie, TxnKind.SWITCH, "switch", question=question)
    leader = world.boot()
    await leader.start()

    row = await leader.run()

    assert states(row)["charlie"] is state, node(row.records, "charlie")
    reason = node(row.records, "charlie").reason
    assert "nothing on the node was changed" not in reason
    assert charlie.applied["switch"] == 1  # refused again, begun once
    assert [c.answer for c in world.agents.calls_to("charlie", "switch")][-1] == "refused"
    if state is N.ROLLED_BACK:
        assert reason == "the server did not come back"
    refusals = [c for c in world.agents.calls_to("charlie", "switch") if c.answer == "refused"]
    assert len(refusals) == (2 if question == "unreachable" else 1)
    if question == "refused":
        assert reason.startswith(f"switch refused: {STALE}; whether an earlier try began it")
        assert NOT_LEADER in reason
    if question == "other":
        assert reason.startswith(f"switch refused: {STALE}; this switch did not begin"), reason
    if question in ("failing", "failed once"):
        asked = world.agents.calls_to("charlie", "get_transaction")
        failed = [c for c in asked if c.answer == "failed"]
        assert len(failed) == (1 + changes.SEND_AGAIN if question == "failing" else 1), failed
    if question == "failing":
        assert reason == (
            f"switch refused: {STALE}; whether an earlier try began it is not known: the agent"
            f" failed to say too, each time asked ({ASK_FAILED}); look at the node"
        ), reason
    if state is N.DONE:
        assert row.rollout.state is R.COMPLETED and charlie.scheme == "https"
    await leader.stop()


@pytest.mark.parametrize(
    ("journalled", "state"),
    [
        ("change-password", N.DONE),
        ("", N.DONE),  # an agent of an earlier release: the key alone, as before
        ("finalize", N.NEEDS_ATTENTION),
        ("enable-tls+http", N.NEEDS_ATTENTION),
    ],
    ids=["same-change", "no-change-said", "finalize-held", "dual-held"],
)
async def test_a_change_password_refused_when_run_again_is_followed_only_if_the_same_change(
    world: World, journalled: str, state: NodeState
) -> None:
    """Session 73 (s72 refused's L): a change-password switch, begun, then refused when the
    step runs again (a stale epoch), is asked after by its key (rollout id, kind); it stages
    no certificate, so the key alone matched, and a switch of another change under the same
    id (a rollout id used again after the leader's store was restored) was followed as this
    step's, its outcome recorded as the password's. The agent now says the change it
    journalled (``Transaction.change``): another change is another switch, not followed (the
    node needs attention); the same change, or none said (an older agent), is followed."""
    leader = world.boot()
    await leader.start()
    await leader.run()
    await leader.commands.stage_password(VERIFIER_2, ADMIN)
    charlie = world.agents["charlie"]
    # The same change: the fake's own (as the real agent's); none said: an agent of the
    # release before (the key-alone path); another: its answer says another change.
    charlie.says_no_change = journalled == ""
    other = journalled not in ("", Change.CHANGE_PASSWORD.value)
    refuses_its_replay(
        charlie, TxnKind.SWITCH, "switch", question=f"change {journalled}" if other else None
    )
    await leader.start(Change.CHANGE_PASSWORD)
    row = await leader.run(passes=400)

    charlie_row = node(row.records, "charlie")
    assert charlie_row.state is state, charlie_row
    assert "nothing on the node was changed" not in charlie_row.reason
    assert [c.answer for c in world.agents.calls_to("charlie", "switch")][-1] == "refused"
    if state is N.NEEDS_ATTENTION:
        assert charlie_row.reason.startswith(f"switch refused: {STALE}; this switch did not")
        assert "the agent holds another switch under this rollout id" in charlie_row.reason
    else:
        assert row.rollout.state is R.COMPLETED, states(row)
    await leader.stop()


async def test_the_fake_agents_say_the_change_their_switch_journalled(world: World) -> None:
    """Session 73's L: ``tests/fake_agent.py`` said no ``Transaction.change``, so every engine
    test ran the leader's key-alone matching of an older agent. Its switches now say their
    change as the real agent's plan journals it (the phase-1 switch "enable-tls+http"), and
    its rollbacks none; ``says_no_change`` is the agent of the release before."""
    leader = world.boot()
    row = await leader.start()
    await leader.run()
    switch = agent_pb2.GetTransactionRequest(
        rollout_id=row.rollout.id, kind=TXN_KIND.wire(TxnKind.SWITCH)
    )
    for name in ORDER:
        assert (await world.agents[name].get_transaction(switch)).change == "enable-tls", name
    world.agents["charlie"].says_no_change = True
    assert (await world.agents["charlie"].get_transaction(switch)).change == ""
    await leader.stop()


async def test_a_way_back_refused_when_run_again_is_followed_if_it_began(world: World) -> None:
    """The same for the way back (disable-tls): its Rollback, begun, then refused when the
    step runs again, is followed to its end (the node back on http, done), not recorded
    "failed: nothing on the node was changed"."""
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    charlie = world.agents["charlie"]
    refuses_its_replay(charlie, TxnKind.ROLLBACK, "rollback")
    await leader.start(Change.DISABLE_TLS)

    row = await leader.run()

    assert states(row) == ALL_DONE, node(row.records, "charlie")
    assert charlie.scheme == "http" and charlie.applied["rollback"] == 1
    assert [c.answer for c in world.agents.calls_to("charlie", "rollback")][-1] == "refused"
    await leader.stop()


async def _finalize_under_a_password_rollout(world: World) -> tuple[Leader, str]:
    """A change-password rollout started whose id already names a completed finalize switch
    on charlie (a rollout id used again after the store was restored): its leader and id."""
    leader = world.boot()
    await leader.start()
    await leader.run()
    await leader.commands.stage_password(VERIFIER_2, ADMIN)
    row = await leader.start(Change.CHANGE_PASSWORD)
    charlie = world.agents["charlie"]
    rid = row.rollout.id
    charlie.txns[(rid, TxnKind.SWITCH)] = FakeTxn(
        rid,
        TxnKind.SWITCH,
        row.rollout.epoch,
        0.0,
        TxnOutcome.COMPLETED,
        "",
        (charlie.scheme, charlie.fingerprint, charlie.verifier),
        change="finalize",
    )
    return leader, rid


async def test_the_fake_agent_refuses_a_switch_of_another_change_under_its_id(
    world: World,
) -> None:
    """Session 74's note, Open (L): ``tests/fake_agent.py`` answered a Switch whose rollout id
    names its switch of another change with that switch (a replay), where the real agent
    refuses it FAILED_PRECONDITION ``another_switch`` (``NodeAgentService._switch``;
    ``test_dual_node``'s finalize under the phase-1 id): the engine tests followed a switch
    no real agent gives them. Here a change-password rollout's id already names a finalize
    on charlie (a rollout id used again after the store was restored): the fake refuses, as
    the real agent does, and the node needs attention, that switch never followed (its
    outcome was recorded as the password's: done)."""
    leader, rid = await _finalize_under_a_password_rollout(world)
    charlie = world.agents["charlie"]

    row = await leader.run(passes=400)

    charlie_row = node(row.records, "charlie")
    assert charlie_row.state is N.NEEDS_ATTENTION, charlie_row  # DONE before
    said = another_switch(rid, "finalize", Change.CHANGE_PASSWORD.value)
    assert charlie_row.reason.startswith(f"switch refused: {said} (FAILED_PRECONDITION)")
    assert "the agent holds another switch under this rollout id" in charlie_row.reason
    assert [c.answer for c in world.agents.calls_to("charlie", "switch")] == ["ok", "refused"]
    assert charlie.verifier != VERIFIER_2
    await leader.stop()


@pytest.mark.parametrize("says_change", [True, False], ids=["change-said", "no-change-said"])
async def test_a_switch_answered_with_another_change_under_its_id_is_not_followed(
    world: World, says_change: bool
) -> None:
    """Session 75 (smallls2, 7): an agent that answers a Switch whose rollout id names its
    switch of another change with that switch (a replay: an agent of an earlier release, or a
    bug; one of this release refuses it, as above) was followed on the leader's direct path,
    which did not compare ``Transaction.change`` with the change it asked for (only the path
    after a refusal did): a finalize under a change-password rollout's id was recorded as the
    password's switch, done. Now its state is taken as the agent's refusal: the node needs
    attention, that switch never followed. An agent that says no change (the release before
    session 73) is matched by the key alone, as before: followed (the leader cannot tell)."""
    leader, rid = await _finalize_under_a_password_rollout(world)
    charlie = world.agents["charlie"]
    charlie.replays_another_change = True
    charlie.says_no_change = not says_change
    sent = len(world.agents.calls_to("charlie", "switch"))  # the enable-tls rollout's

    row = await leader.run(passes=400)

    charlie_row = node(row.records, "charlie")
    assert [c.answer for c in world.agents.calls_to("charlie", "switch")[sent:]] == ["replay"]
    assert charlie.verifier != VERIFIER_2  # that switch changed nothing of the password
    if not says_change:
        assert charlie_row.state is N.DONE, charlie_row  # the key alone: as before
        await leader.stop()
        return
    assert charlie_row.state is N.NEEDS_ATTENTION, charlie_row  # DONE before
    said = another_switch(rid, "finalize", Change.CHANGE_PASSWORD.value)
    assert charlie_row.reason == (
        f"switch refused: {said} (the agent answered with that switch's state: not followed);"
        " this switch did not begin: the agent holds another switch under this rollout id,"
        " which may have changed the node; look at the node"
    ), charlie_row.reason
    assert row.node("charlie")[1].freeze_started_at is None  # nothing of it recorded
    assert row.rollout.state is not R.COMPLETED
    await leader.stop()


async def test_a_switch_refused_as_another_under_its_id_is_not_followed(world: World) -> None:
    """The agent's refusal "rollout id ... already names another switch" (a finalize sent
    under the phase-1 id): the switch it holds under the id is not this step's, so it is not
    asked after, nor followed; the node is failed, and its reason does not say "nothing on the
    node was changed" (that other switch may have changed it)."""
    charlie = world.agents["charlie"]
    said = (
        "rollout id r1 already names another switch on this node (enable-dual); finalize "
        "needs a rollout id of its own"
    )
    charlie.refuse["switch"] = said
    leader = world.boot()
    await leader.start()
    asked = len(world.agents.calls_to("charlie", "get_transaction"))

    row = await leader.run()

    charlie_row = node(row.records, "charlie")
    # Session 72: needs attention (a named way back takes it; `failed` says "back where it
    # was"), as that other switch may have changed the node.
    assert charlie_row.state is N.NEEDS_ATTENTION, charlie_row
    assert charlie_row.reason.startswith(f"switch refused: {said}"), charlie_row
    assert "; this switch did not begin: the agent holds another switch" in charlie_row.reason
    assert "nothing on the node was changed" not in charlie_row.reason
    assert len(world.agents.calls_to("charlie", "get_transaction")) == asked
    await leader.stop()


PUT_BACK = (
    "needs the admin: journal put back mid-switch of rollout r0: not settled by what the server"
    " runs; check it, then run the agent once with --journal-checked"
)
HELD = "needs the admin: its journal cannot be written (disk full): free space under /var"


@pytest.mark.parametrize(
    ("said", "state"),
    [(PUT_BACK, N.NEEDS_ATTENTION), (HELD, N.FAILED)],
    ids=["journal-put-back", "journal-held"],
)
async def test_a_switch_refused_by_a_journal_put_back_needs_attention(
    world: World, said: str, state: NodeState
) -> None:
    """Review s72 refused, L5: an agent whose journal was put back from a copy refuses the
    switch ("needs the admin: journal put back mid-..."), and asked, holds none of it: the
    copy may be older than a try that began it, so the node needs attention (a person looks,
    as the agent says), not failed with "nothing on the node was changed". An agent that
    holds a transaction on a journal it cannot write says "needs the admin" too, but its
    journal lost nothing: its "none" holds, the node failed, nothing changed."""
    charlie = world.agents["charlie"]
    charlie.refuse["switch"] = said
    leader = world.boot()
    await leader.start()

    row = await leader.run()

    charlie_row = node(row.records, "charlie")
    assert charlie_row.state is state, charlie_row
    assert charlie_row.reason.startswith(f"switch refused: {said} (FAILED_PRECONDITION); ")
    assert ("nothing on the node was changed" in charlie_row.reason) is (state is N.FAILED)
    if state is N.NEEDS_ATTENTION:
        assert charlie_row.reason.endswith(
            "the agent holds no switch of this rollout, but its journal was put back from a"
            " copy, which may be older than a try that began it; look at the node"
        ), charlie_row
    assert [c.answer for c in world.agents.calls_to("charlie", "get_transaction")][-1:] == [
        "not_found"
    ]
    await leader.stop()


AGENT_FAILED = "internal error (see the agent's log)"


def fails_rollback(
    agent: FakeAgent, code: grpc.StatusCode, *, begins: bool, times: int = 1
) -> Counter[str]:
    """``agent``'s first ``times`` Rollbacks are answered ``code`` (not a refusal: its own
    failure, a cancel, an abort), after it began the rollback (``begins``) or before. The
    answers it gave, counted."""
    begin, answered = agent.rollback, Counter[str]()

    async def rollback(request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        nonlocal times
        if times:
            times -= 1
            if begins:
                await begin(request)
            answered[code.name] += 1
            raise StepFailed(f"{AGENT_FAILED} ({code.name})", code)
        answered["ok"] += 1
        return await begin(request)

    agent.rollback = rollback  # type: ignore[method-assign]
    return answered


@pytest.mark.parametrize(
    ("code", "begins", "times", "state"),
    [
        # Begun, then the answer is the agent's failure: followed to its end (back on http).
        (grpc.StatusCode.INTERNAL, True, 1, N.DONE),
        (grpc.StatusCode.UNKNOWN, True, 1, N.DONE),
        (grpc.StatusCode.CANCELLED, True, 1, N.DONE),
        # Not begun, its bug every time: failed, nothing changed (the agent said so).
        (grpc.StatusCode.INTERNAL, False, 99, N.FAILED),
        # Not begun, "try again" (the agent stopping, an abort): tried again, then done.
        (grpc.StatusCode.CANCELLED, False, 2, N.DONE),
        (grpc.StatusCode.ABORTED, False, 1, N.DONE),
    ],
    ids=["internal-began", "unknown-began", "cancelled-began", "internal", "cancelled", "aborted"],
)
async def test_a_way_back_the_agent_failed_is_asked_about_not_recorded_refused(
    world: World, code: grpc.StatusCode, begins: bool, times: int, state: NodeState
) -> None:
    """Session 72: the way back's Rollback answered with a status that is no refusal
    (INTERNAL, UNKNOWN, CANCELLED, ABORTED) was recorded rolled_back, "going back to http
    refused", unasked: a named way back skips such a node, while the agent may have taken it
    back. The agent is asked what it holds, as for a refusal: a way back it began is followed
    (done, on http); none begun is "try again" (the step runs again) for a cancel or an
    abort, else the node failed, "nothing on the node was changed"."""
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    charlie = world.agents["charlie"]
    answered = fails_rollback(charlie, code, begins=begins, times=times)
    await leader.start(Change.DISABLE_TLS)

    row = await leader.run(passes=400)

    reason = node(row.records, "charlie").reason
    assert states(row)["charlie"] is state, node(row.records, "charlie")
    assert "going back to http refused" not in reason
    assert answered[code.name] >= 1
    if state is N.DONE:
        assert charlie.scheme == "http" and charlie.applied["rollback"] == 1
        assert answered["ok"] == (0 if begins else 1)  # begun: followed, not sent again
    else:
        assert reason == (
            f"going back to http failed: {AGENT_FAILED} (INTERNAL); nothing on the node was changed"
        ), reason
        assert charlie.scheme == "https" and charlie.applied["rollback"] == 0
        # Sent again within the step (review s72 revrefused), then it ends: never for good.
        assert answered == {"INTERNAL": 1 + changes.SEND_AGAIN}
    await leader.stop()


@pytest.mark.parametrize(
    ("code", "times", "state"),
    [(grpc.StatusCode.INTERNAL, 99, N.FAILED), (grpc.StatusCode.CANCELLED, 1, N.DONE)],
    ids=["internal", "cancelled"],
)
async def test_a_switch_an_older_agent_failed_before_it_began_says_failed(
    world: World, code: grpc.StatusCode, times: int, state: NodeState
) -> None:
    """Session 72: an agent of an earlier release gets Switch, then the watch; its Switch
    answered INTERNAL became "switch refused" (any code). Asked, it holds none: "switch failed:
    ...; nothing on the node was changed"; a cancel is sent again."""
    charlie = world.agents["charlie"]
    plain, sent = charlie.switch_and_watch, Counter[str]()

    def older(request: agent_pb2.SwitchRequest) -> Any:
        nonlocal times
        sent["switch"] += 1
        if times:
            times -= 1
            raise SwitchRefused(f"{AGENT_FAILED} ({code.name})", code)
        return plain(request)

    charlie.switch_and_watch = older  # type: ignore[method-assign]
    leader = world.boot()
    await leader.start(failure_budget=1)

    row = await leader.run(passes=400)

    reason = node(row.records, "charlie").reason
    assert states(row)["charlie"] is state, reason
    if state is N.FAILED:
        assert reason == (
            f"switch failed: {AGENT_FAILED} (INTERNAL); nothing on the node was changed"
        )
        assert sent["switch"] == 1 + changes.SEND_AGAIN and charlie.applied["switch"] == 0
    else:
        assert sent["switch"] == 2 and charlie.applied["switch"] == 1
    await leader.stop()


@pytest.mark.parametrize("begins", [True, False], ids=["began", "not-begun"])
async def test_a_confirms_rollback_the_agent_failed_is_asked_about(
    world: World, begins: bool
) -> None:
    """Session 72: the confirm's Rollback (the outside check failed) answered INTERNAL was
    "rollback refused", the node needing attention, while the agent rolled it back. Asked,
    the agent holds it: followed, the node rolled back; it holds none: needs attention,
    saying it did not begin."""
    charlie = world.agents["charlie"]
    charlie.outside_problem = "handshake: unknown CA"
    answered = fails_rollback(charlie, grpc.StatusCode.INTERNAL, begins=begins, times=99)
    leader = world.boot()
    await leader.start(failure_budget=1)

    row = await leader.run()

    reason = node(row.records, "charlie").reason
    assert "rollback refused" not in reason
    # Begun: followed at its first answer; none held: sent again within the confirm, then it
    # ends (review s72 revrefused).
    assert answered == {"INTERNAL": 1 if begins else 1 + changes.SEND_AGAIN}
    if begins:
        assert states(row)["charlie"] is N.ROLLED_BACK, reason
        assert reason == "outside check failed: handshake: unknown CA"
        assert charlie.scheme == "http" and charlie.applied["rollback"] == 1
    else:
        assert states(row)["charlie"] is N.NEEDS_ATTENTION, reason
        assert reason == (
            f"handshake: unknown CA; rollback failed: {AGENT_FAILED} (INTERNAL); it did not begin"
        )
        assert charlie.scheme == "https" and charlie.applied["rollback"] == 0
    await leader.stop()


def journals_after_the_question(agent: FakeAgent, code: grpc.StatusCode) -> Counter[str]:
    """``agent``'s first Rollback is answered ``code`` by the transport (a stream reset: "stream
    removed") while its handler goes on: the rollback is journalled, and begun, just after the
    leader's first question (GetTransaction) was answered "none" (the agent's journal writes
    queue on one thread; its GetTransaction reads beside them). What it answered, counted."""
    begin, ask = agent.rollback, agent.get_transaction
    late: list[agent_pb2.RollbackRequest] = []
    answered = Counter[str]()

    async def rollback(request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        if not answered:
            late.append(request)
            answered[code.name] += 1
            raise StepFailed(f"Stream removed ({code.name})", code)
        answered["sent again"] += 1
        return await begin(request)

    async def get_transaction(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        try:
            return await ask(request)
        finally:
            while late:
                await begin(late.pop())  # its handler's journal write lands now

    agent.rollback = rollback  # type: ignore[method-assign]
    agent.get_transaction = get_transaction  # type: ignore[method-assign]
    return answered


@pytest.mark.parametrize("code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL])
async def test_a_way_back_journalled_after_the_question_is_followed(
    world: World, code: grpc.StatusCode
) -> None:
    """Review s72 revrefused: an answer that is no refusal, made by the transport while the
    agent's handler still journals the way back, was asked about at once: "none", so the node
    was recorded failed, "going back to http failed: ...; nothing on the node was changed"
    (a named way back leaves it out), while the agent took it back to http. It is sent again
    (a replay begins nothing and answers with the way back, which is followed)."""
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    charlie = world.agents["charlie"]
    answered = journals_after_the_question(charlie, code)
    await leader.start(Change.DISABLE_TLS)

    row = await leader.run(passes=400)

    charlie_row = node(row.records, "charlie")
    assert charlie.scheme == "http" and charlie.applied["rollback"] == 1
    assert charlie_row.state is N.DONE, charlie_row
    assert "nothing on the node was changed" not in charlie_row.reason
    assert answered == {code.name: 1, "sent again": 1}
    await leader.stop()


@pytest.mark.parametrize("code", [grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_a_way_back_answered_try_again_for_good_ends(
    world: World, code: grpc.StatusCode
) -> None:
    """Review s72 revrefused: a way back whose agent answered ABORTED (or RESOURCE_EXHAUSTED,
    not its full disk) every time, holding none, ran its step again without end: the rollout
    never ended, its abort neither (it waits for a node in its switch), and the node's row said
    "agent unreachable ... it may be mid-switch (writes refused)". Sent again a few times
    within the step, then the node is failed, nothing on it changed: the rollout ends."""
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    charlie = world.agents["charlie"]
    answered = fails_rollback(charlie, code, begins=False, times=10**6)
    await leader.start(Change.DISABLE_TLS)

    row = await leader.run(passes=400)

    charlie_row = node(row.records, "charlie")
    assert charlie_row.state is N.FAILED, charlie_row
    assert charlie_row.reason == (
        f"going back to http failed: {AGENT_FAILED} ({code.name}); nothing on the node was changed"
    ), charlie_row
    assert charlie.scheme == "https" and charlie.applied["rollback"] == 0
    assert answered == {code.name: 1 + changes.SEND_AGAIN}
    await leader.stop()


@pytest.mark.parametrize("late", [False, True], ids=["not-begun", "journalled-late"])
async def test_a_leader_dead_as_it_sends_a_way_back_again_goes_on(world: World, late: bool) -> None:
    """Review s72 revrefused, the new crash point: the way back's Rollback answered ABORTED,
    none held when asked (``late``: the agent journals it just after the question), and the
    leader dies as it sends it again. The restarted leader runs the step again: the way back
    begins once (or is replayed and followed), and the node ends done, on http."""
    first = world.boot()
    await first.start()
    assert states(await first.run()) == ALL_DONE
    charlie = world.agents["charlie"]
    begin, ask = charlie.rollback, charlie.get_transaction
    sent = Counter[str]()
    journal_late: list[agent_pb2.RollbackRequest] = []

    async def rollback(request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        sent["rollback"] += 1
        if sent["rollback"] == 1:
            if late:
                journal_late.append(request)
            raise StepFailed(f"{AGENT_FAILED} (ABORTED)", grpc.StatusCode.ABORTED)
        if sent["rollback"] == 2:  # sent again: the leader dies here
            first.schema.dead = True
            raise Crash("the leader dies as it sends the way back again")
        return await begin(request)

    async def get_transaction(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        try:
            return await ask(request)
        finally:
            while journal_late:
                await begin(journal_late.pop())

    charlie.rollback = rollback  # type: ignore[method-assign]
    charlie.get_transaction = get_transaction  # type: ignore[method-assign]
    await first.start(Change.DISABLE_TLS)
    with pytest.raises(Crash):
        await first.run(passes=400)
    await first.crash()
    assert sent["rollback"] == 2

    second = world.boot()
    row = await second.run(passes=400)

    charlie_row = node(row.records, "charlie")
    assert charlie_row.state is N.DONE, charlie_row
    assert charlie.scheme == "http" and charlie.applied["rollback"] == 1
    assert sent["rollback"] == 3
    await second.stop()


async def test_a_confirms_rollback_answered_try_again_for_good_ends(world: World) -> None:
    """Review s72 revrefused: the confirm's Rollback answered ABORTED every time, none held, ran
    the confirm again without end (the rollout held, its abort too). Sent again a few times,
    then the node needs attention: switched, its outside check failed, not rolled back."""
    charlie = world.agents["charlie"]
    charlie.outside_problem = "handshake: unknown CA"
    answered = fails_rollback(charlie, grpc.StatusCode.ABORTED, begins=False, times=10**6)
    leader = world.boot()
    await leader.start(failure_budget=1)

    row = await leader.run(passes=400)

    charlie_row = node(row.records, "charlie")
    assert charlie_row.state is N.NEEDS_ATTENTION, charlie_row
    assert charlie_row.reason == (
        f"handshake: unknown CA; rollback failed: {AGENT_FAILED} (ABORTED); it did not begin"
    ), charlie_row
    assert charlie.scheme == "https" and charlie.applied["rollback"] == 0
    assert answered == {"ABORTED": 1 + changes.SEND_AGAIN}
    await leader.stop()


async def test_an_agents_reason_is_cleaned_before_it_is_the_nodes(world: World) -> None:
    """Review of s60a L4: the reason an agent's transaction ends with is the agent's text, put
    into the node's reason (``rollout status``, ``schema show``, its history) and the
    rollout's. It is cleaned where it is read (``wait_transaction``): no control or bidi
    characters, its white space one space, at most 500 characters (``…`` marks the cut)."""
    agent = world.agents["charlie"]
    agent.switch_outcome = TxnOutcome.ROLLED_BACK
    agent.switch_reason = "the server\x1b[2J did not\ncome back\u202e on https " + "x" * 600
    leader = world.boot()
    await leader.start()

    row = await leader.run()

    assert row.rollout.state is R.HALTED
    reason = node(row.records, "charlie").reason
    assert reason.startswith("the server[2J did not come back on https xxx"), reason
    assert len(reason) == 500 and reason.endswith("x…"), reason
    assert row.meta.reason.startswith(f"halted: charlie rolled_back: {reason[:40]}")
    shown = row.meta.reason + "".join(r.reason or "" for r in row.records)
    assert not {"\x1b", "\n", "\u202e"} & set(shown), shown
    await leader.stop()


async def test_an_outcome_only_a_newer_agent_knows_leaves_the_node_needing_attention(
    world: World,
) -> None:
    """Upgrade audit s35 F8: a newer agent's transaction ends with an outcome this leader's
    contract does not know. The node is in no state the leader knows: it needs a person, and
    the rollout halts, as for a failed switch; it was an engine "bug" run again every 2 s,
    the node SWITCHING for good."""
    world.agents["charlie"].newer_outcome = agent_pb2.TransactionOutcome.ValueType(99)
    leader = world.boot()
    await leader.start()

    with capture_logs() as logs:
        row = await leader.run()

    assert row.rollout.state is R.HALTED
    assert states(row) == {"bravo": N.DONE, "charlie": N.NEEDS_ATTENTION, "alpha": N.SKIPPED}
    assert node(row.records, "charlie").reason.startswith(
        "the agent runs a newer tlsroll than this leader: transaction.outcome: unknown value 99"
    )
    assert node(row.records, "charlie").reason.endswith("; upgrade the leader")
    assert [e for e in logs if e["event"] == "step.crashed"] == []
    await leader.stop()


async def test_a_state_only_a_newer_agent_knows_goes_by(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state between others whose outcome the leader cannot read (a newer agent's) is
    passed over; the states after it say how the switch ends."""
    charlie = world.agents["charlie"]
    plain = charlie.switch_and_watch

    async def newer(request: agent_pb2.SwitchRequest) -> Any:
        first = True
        async for txn in plain(request):
            if first:
                unknown = agent_pb2.TransactionOutcome.ValueType(99)
                yield agent_pb2.Transaction(
                    rollout_id=txn.rollout_id, kind=txn.kind, outcome=unknown
                )
                first = False
            yield txn

    monkeypatch.setattr(charlie, "switch_and_watch", newer)
    leader = world.boot()
    await leader.start()

    with capture_logs() as logs:
        row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row)["charlie"] is N.DONE
    assert [e for e in logs if e["event"] == "step.crashed"] == []
    await leader.stop()


async def test_needs_attention_counts_against_the_budget_and_the_rest_carries_on(
    world: World,
) -> None:
    switch_fails(world.agents["charlie"])
    leader = world.boot()
    await leader.start(failure_budget=1)

    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == {"bravo": N.DONE, "charlie": N.NEEDS_ATTENTION, "alpha": N.DONE}
    assert leader.schema.node_auth() == {"bravo": 1, "alpha": 1}  # not charlie's: it is unknown
    await leader.stop()


async def test_a_node_that_fails_the_outside_check_is_rolled_back_by_its_agent(
    world: World,
) -> None:
    world.agents["charlie"].outside_problem = "handshake: unknown CA"
    leader = world.boot()
    await leader.start(failure_budget=1)

    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == {"bravo": N.DONE, "charlie": N.ROLLED_BACK, "alpha": N.DONE}
    assert node(row.records, "charlie").reason == "outside check failed: handshake: unknown CA"
    charlie = world.agents["charlie"]
    assert (charlie.applied["switch"], charlie.applied["rollback"]) == (1, 1)
    assert (charlie.scheme, charlie.verifier) == ("http", "")
    assert leader.schema.node_auth() == {"bravo": 1, "alpha": 1}
    await leader.stop()


# --- an admin action refused: the next command to run ----------------------------------------


async def refused(leader: Leader, action: RolloutAction, rollout_id: str = "") -> str:
    with pytest.raises(IllegalTransition) as refusal:
        await leader.commands.control(rollout_id, action, ADMIN)
    line = str(refusal.value)
    assert f"there is nothing to {action.value}" in line and "\n" not in line, line
    return line


async def test_a_refused_admin_action_ends_with_the_next_command_to_run(world: World) -> None:
    """Issue 16 #2: ``rollout resume`` on a halted rollout said only "event 'resume' is not
    allowed in state 'halted'"; now every refusal ends with what to run instead."""
    leader = world.boot()
    await leader.start()
    # A resume of a running rollout succeeds and changes nothing, as a pause of a paused one
    # (review rev58a L4: the second of two resumes exited 1, the second pause 0).
    audit = leader.audit()
    assert (await leader.control(RolloutAction.RESUME)).rollout.state is R.RUNNING
    assert leader.audit() == audit
    paused = await leader.control(RolloutAction.PAUSE)
    # Given twice, pause and abort succeed and change nothing (audit s39race L1: exit 1).
    audit = leader.audit()
    assert await leader.control(RolloutAction.PAUSE) == paused
    assert leader.audit() == audit
    assert (await leader.control(RolloutAction.RESUME)).rollout.state is R.RUNNING
    assert (await leader.control(RolloutAction.RESUME)).rollout.state is R.RUNNING
    await leader.control(RolloutAction.PAUSE)
    aborting = await leader.control(RolloutAction.ABORT)
    assert aborting.rollout.state is R.ABORTING
    assert await leader.control(RolloutAction.ABORT) == aborting
    for action in (RolloutAction.PAUSE, RolloutAction.RESUME):
        line = await refused(leader, action)
        assert line.endswith("; wait until it has ended: tlsroll schema show --watch"), line
    assert (await leader.run()).rollout.state is R.ABORTED
    assert (await leader.control(RolloutAction.ABORT)).rollout.state is R.ABORTED

    switch_fails(world.agents["charlie"])
    rid = (await leader.start()).rollout.id
    assert (await leader.run()).rollout.state is R.HALTED
    for action in RolloutAction:
        line = await refused(leader, action, rid)
        assert line == (
            f"rollout {rid} is halted: there is nothing to {action.value}; finish the nodes "
            f"left: tlsroll rollout retry {rid} or go back to http: tlsroll rollout rollback {rid}"
        ), line
    await leader.stop()


async def test_a_halt_that_switched_no_node_offers_no_way_back(world: World) -> None:
    """Review s63 faults, L1: a halted enable-tls rollout that switched no node (its first
    switch rolled back) offered `rollout rollback` in its note and in every refusal of an
    admin action, which then refused it: "switched no node; nothing to undo". It offers the
    retry alone; a halt after a node was switched still offers both (above)."""
    leader = world.boot()
    switch_rolls_back(world.agents["bravo"])
    rid = (await leader.start()).rollout.id
    row = await leader.run()
    assert row.rollout.state is R.HALTED
    assert not {N.DONE, N.DUAL} & set(states(row).values()), states(row)
    assert row.meta.reason.endswith(f"; next: finish the nodes left: tlsroll rollout retry {rid}")
    for action in RolloutAction:
        line = await refused(leader, action, rid)
        assert line == (
            f"rollout {rid} is halted: there is nothing to {action.value}; finish the nodes "
            f"left: tlsroll rollout retry {rid}"
        ), line
    back = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id=rid)
    with pytest.raises(PlanError, match=f"rollout {rid} switched no node; nothing to undo"):
        await leader.commands.plan(back)
    await leader.stop()


async def test_a_halt_whose_drain_leaves_no_node_switched_offers_no_way_back(
    world: World,
) -> None:
    """Review of s63-f1, L-1: the halt's note is made as the halt is decided, with charlie
    still in its switch, which may end done: it offers `rollout rollback`. Charlie's switch
    then rolls back too, and the rollout ends halted having switched no node: the note, made
    again in that pass, names charlie and offers the retry alone (it kept offering the way
    back, which `rollout rollback` refused, "switched no node")."""
    leader = world.boot()
    switch_rolls_back(world.agents["bravo"])
    world.agents["alpha"].unreachable = 10**6
    undo = switch_gets_no_answer(world, "charlie")
    switch_rolls_back(world.agents["charlie"])
    row = await leader.start(max_parallel=3)
    rid = row.rollout.id
    row = await leader.run(until=lambda r: r.rollout.state is not R.RUNNING)
    assert row.rollout.state is R.HALTING, (row.rollout, states(row))
    assert states(row)["charlie"] is N.SWITCHING, states(row)
    assert row.meta.reason.endswith(f"or go back to http: tlsroll rollout rollback {rid}")
    undo()
    world.agents["alpha"].unreachable = 0
    row = await leader.run()
    assert row.rollout.state is R.HALTED
    assert not {N.DONE, N.DUAL} & set(states(row).values()), states(row)
    back = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id=rid)
    with pytest.raises(PlanError, match="switched no node"):
        await leader.commands.plan(back)
    note = row.meta.reason
    bravo, charlie = node(row.records, "bravo"), node(row.records, "charlie")
    assert note == (
        f"halted: bravo rolled_back: {bravo.reason}; charlie rolled_back: {charlie.reason};"
        f" next: finish the nodes left: tlsroll rollout retry {rid}"
    ), note
    await leader.stop()


@pytest.mark.parametrize(
    ("stored", "made_again"),
    [(None, True), (1, True), (0, False)],
    ids=["not-known", "offered", "not-offered"],
)
async def test_whether_a_halt_note_offers_the_way_back_is_stored_with_it(
    world: World, stored: int | None, made_again: bool
) -> None:
    """Session 64: whether the halt's note offers the way back is a fact stored with it
    (``rollouts.way_back_offered``), not read from the note's last words. The leader dies
    halting with charlie still in its switch (its note offers `rollout rollback`, and says
    so); the next leader reads the fact: offered, or not known (a rollout an older leader
    wrote: NULL), and the note is made again as the halt ends with no node switched; stored
    as not offered, the note is left as it is, whatever its words."""
    first = world.boot()
    switch_rolls_back(world.agents["bravo"])
    world.agents["alpha"].unreachable = 10**6
    undo = switch_gets_no_answer(world, "charlie")
    switch_rolls_back(world.agents["charlie"])
    row = await first.start(max_parallel=3)
    rid = row.rollout.id
    row = await first.run(until=lambda r: r.rollout.state is not R.RUNNING)
    assert row.rollout.state is R.HALTING, (row.rollout, states(row))
    offering = row.meta.reason
    assert offering.endswith(f"or go back to http: tlsroll rollout rollback {rid}")
    assert row.meta.way_back_offered is True
    await first.crash()
    with contextlib.closing(sqlite3.connect(world.path)) as db:
        assert db.execute("SELECT way_back_offered FROM rollouts").fetchall() == [(1,)]
        db.execute("UPDATE rollouts SET way_back_offered = ?", (stored,))
        db.commit()
    undo()
    world.agents["alpha"].unreachable = 0
    second = world.boot()
    row = await second.run()
    assert row.rollout.state is R.HALTED
    assert not {N.DONE, N.DUAL} & set(states(row).values()), states(row)
    if made_again:
        assert row.meta.reason == (
            f"halted: bravo rolled_back: {node(row.records, 'bravo').reason}; charlie"
            f" rolled_back: {node(row.records, 'charlie').reason}; next: finish the nodes"
            f" left: tlsroll rollout retry {rid}"
        ), row.meta.reason
        assert row.meta.way_back_offered is False
    else:
        assert row.meta.reason == offering
    await second.stop()


async def test_a_way_back_its_agent_has_is_followed_before_its_first_heartbeat(
    world: World,
) -> None:
    """Review of s63-f1, L-2 (the way back, ``DisableTls.switch``): an agent not heard since
    the leader started is sent nothing that needs a feature the store holds no word of
    (``NotHeardYet``); the step waited for its heartbeat before it asked anything, so a way
    back it had begun (an earlier run of the step sent it) waited without limit behind a
    heartbeat that might not come. Its agent is asked first (a plain GetTransaction) and the
    way back it has is followed to done (bravo); only one that has none waits, and is sent
    the Rollback once it may be (charlie)."""
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    bravo, charlie = world.agents["bravo"], world.agents["charlie"]
    bravo_rollback, charlie_rollback = bravo.rollback, charlie.rollback
    unheard = "agent {}: not heard since the leader started; the leader sent it nothing"
    sent: list[str] = []
    waited: list[str] = []

    async def begun_then_not_heard(request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        if not sent:  # the step's first run sent it; its agent not heard since
            sent.append(request.command.rollout_id)
            await bravo_rollback(request)
        raise NotHeardYet(unheard.format("bravo"))

    async def not_heard_at_first(request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        if len(waited) < 2:
            waited.append(request.command.rollout_id)
            raise NotHeardYet(unheard.format("charlie"))
        return await charlie_rollback(request)

    bravo.rollback = begun_then_not_heard  # type: ignore[method-assign]
    charlie.rollback = not_heard_at_first  # type: ignore[method-assign]
    rid = (await leader.start(Change.DISABLE_TLS)).rollout.id
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED, (row.rollout, states(row), row.meta.reason)
    assert states(row) == ALL_DONE, states(row)
    assert {world.agents[n].scheme for n in ORDER} == {"http"}
    assert sent == [rid] and waited == [rid, rid]
    assert not any(r.reason for r in row.records), row.records
    await leader.stop()


@pytest.mark.parametrize("unsent", ["not heard", "not sent"])
@pytest.mark.parametrize("code", [grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL])
async def test_a_way_back_not_sendable_whose_agent_fails_the_question_needs_attention(
    world: World, code: grpc.StatusCode, unsent: str
) -> None:
    """Session 73 (s72 refused's L): the way back's Rollback not sendable yet (its agent not
    heard since the leader started: ``NotHeardYet``) asks the agent whether it has the way
    back; an agent that fails that question each time (ABORTED, INTERNAL) is asked again
    within the step, then the node needs attention, saying so. The failure went up as the
    step's ``StepFailed``, never bounded as the other paths' questions are."""
    leader = world.boot()
    await leader.start()
    assert states(await leader.run()) == ALL_DONE
    charlie = world.agents["charlie"]

    async def not_heard(request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        if unsent == "not sent":  # (review s73 revrefused: the NotSent branch, the same way)
            raise NotSent("agent charlie has not reported rollback.undoes; sent nothing")
        raise NotHeardYet("agent charlie: not heard since the leader started; sent nothing")

    charlie.rollback = not_heard  # type: ignore[method-assign]
    asked = fails_the_question(charlie, code)
    await leader.start(Change.DISABLE_TLS)
    row = await leader.run(passes=400)

    charlie_row = node(row.records, "charlie")
    assert charlie_row.state is N.NEEDS_ATTENTION, charlie_row
    assert charlie_row.reason == (
        "whether an earlier try began the way back to http is not known: the agent failed"
        f" to say, each time asked ({ASK_FAILED}); look at the node"
    ), charlie_row.reason
    assert len(asked) == 1 + changes.SEND_AGAIN, asked
    await leader.stop()


# --- an agent that cannot be reached ----------------------------------------------------------


async def test_a_preflight_without_answer_fails_after_the_step_deadline(world: World) -> None:
    """Issue 16 #3: an agent that never answers its preflight no longer keeps the node in
    `preflight` with an empty reason: after the deadline the node fails, saying since when the
    agent is unreachable, and the rollout halts (failure budget 0)."""
    world.agents["bravo"].unreachable = 10_000
    leader = world.boot()
    started = world.clock.monotonic()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.HALTED
    bravo = node(row.records, "bravo")
    assert bravo.state is N.FAILED
    assert bravo.reason.startswith("agent unreachable since ")
    assert "no answer for 30 s" in bravo.reason
    waited = world.clock.monotonic() - started
    assert STEP_DEADLINE <= waited <= STEP_DEADLINE + MAX_RETRY_SECONDS + 2 * TICK_SECONDS
    await leader.stop()


async def test_a_preflight_on_a_full_disk_says_so_and_fails_after_the_step_deadline(
    world: World,
) -> None:
    """Brief s39small: an agent whose disk is full answers RESOURCE_EXHAUSTED "disk full: …"
    (it was UNAVAILABLE, which the leader took for an agent it cannot reach): retried as
    before, and the failure at the deadline says the node's disk is full, with the cause, not
    "agent unreachable"."""
    world.agents["bravo"].disk_full = 10_000
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.HALTED
    bravo = node(row.records, "bravo")
    assert bravo.state is N.FAILED
    assert bravo.reason.startswith("the node's disk is full since "), bravo.reason
    assert "(for 30 s; free space on it, then retry the rollout)" in bravo.reason, bravo.reason
    assert DISK_FULL_CAUSE in bravo.reason and "unreachable" not in bravo.reason, bravo.reason
    await leader.stop()


async def test_a_preflight_on_a_locked_journal_says_so_and_fails_after_the_step_deadline(
    world: World,
) -> None:
    """Review s74 L1: an agent whose journal is locked or busy answers UNAVAILABLE "store
    unavailable: …" (``JournalUnavailable``): retried as an agent away is, but the failure at
    the deadline says what the agent answered, not "agent unreachable" (it answered)."""
    world.agents["bravo"].store_unavailable = 10_000
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.HALTED
    bravo = node(row.records, "bravo")
    assert bravo.state is N.FAILED
    assert bravo.reason.startswith(f"{NODE_STORE_UNAVAILABLE} since "), bravo.reason
    assert STORE_CAUSE in bravo.reason and "unreachable" not in bravo.reason, bravo.reason
    await leader.stop()


async def test_a_switching_node_whose_journal_is_locked_shows_it_answers_not_unreachable(
    world: World,
) -> None:
    """Review s74 L1: a switching node whose agent answers UNAVAILABLE over its locked journal
    (a switch it may have begun: asked again) said "unknown — agent unreachable since …"; it
    says the agent answers now, with its words, until the outcome replaces it."""
    alpha = world.agents["alpha"]
    switch = alpha.switch

    async def switch_then_locked(request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction:
        txn = await switch(request)
        alpha.store_unavailable = 6  # its journal locked right after it began the switch
        alpha.switch = switch  # type: ignore[method-assign]  # once
        return txn

    alpha.switch = switch_then_locked  # type: ignore[method-assign]
    leader = world.boot()
    await leader.start()
    row = await leader.run(
        until=lambda row: node(row.records, "alpha").reason.startswith(UNKNOWN_ANSWERED)
    )
    reason = node(row.records, "alpha").reason
    assert node(row.records, "alpha").state is N.SWITCHING
    assert STORE_CAUSE in reason and "unreachable" not in reason, reason
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert node(row.records, "alpha") == NodeRecord("alpha", N.DONE)
    await leader.stop()


async def test_a_full_disk_that_is_freed_meanwhile_is_retried_to_the_end(world: World) -> None:
    """A full disk is transient: the step runs again, and once the space is back (here: after
    a few calls) the rollout completes; no node fails or is rolled back for it."""
    world.agents["bravo"].disk_full = 3
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED, [(r.name, r.state, r.reason) for r in row.records]
    assert world.agents["bravo"].disk_full == 0
    assert all(r.state is N.DONE for r in row.records)
    await leader.stop()


async def test_a_switching_node_without_answer_shows_unknown_until_it_answers(
    world: World,
) -> None:
    """A switch cannot fail for want of an answer (the node may be mid-transaction): its reason
    says "unknown — agent unreachable since …" while the leader keeps asking, and the outcome
    replaces it once the agent answers again."""
    alpha = world.agents["alpha"]
    switch = alpha.switch

    async def switch_then_vanish(request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction:
        txn = await switch(request)
        alpha.unreachable = 6  # the agent goes away right after it began the switch (~20 s)
        alpha.switch = switch  # type: ignore[method-assign]  # once
        return txn

    alpha.switch = switch_then_vanish  # type: ignore[method-assign]
    leader = world.boot()
    await leader.start()
    row = await leader.run(until=lambda row: node(row.records, "alpha").reason.startswith(UNKNOWN))
    assert node(row.records, "alpha").state is N.SWITCHING
    assert "keeps asking" in node(row.records, "alpha").reason
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert node(row.records, "alpha") == NodeRecord("alpha", N.DONE)
    await leader.stop()


async def test_a_switching_node_whose_agent_says_it_needs_the_admin_shows_that_not_unknown(
    world: World,
) -> None:
    """Session 70 (keptfreeze): an agent whose switch is held on a journal it cannot write (a
    full disk) stays up and says on its heartbeats that the node needs the admin, and why
    (``LeaderState.live_servers``); its switch's watch brings nothing. The node's reason said
    "unknown — agent unreachable since …", and the admin looked at the network, not at the
    node's disk. It says what the agent said now, while the leader keeps asking; the outcome
    replaces it once the agent carries the switch on."""
    alpha = world.agents["alpha"]
    switch = alpha.switch
    said = "needs the admin: its journal cannot be written (database or disk is full)"
    live = {"alpha": ""}

    async def switch_then_hold(request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction:
        txn = await switch(request)
        alpha.unreachable = 6  # its watch says nothing for a while (~20 s)
        live["alpha"] = said
        alpha.switch = switch  # type: ignore[method-assign]  # once
        return txn

    alpha.switch = switch_then_hold  # type: ignore[method-assign]
    leader = world.boot()
    leader.engine.live_server = lambda name: live.get(name, "")
    await leader.start()
    row = await leader.run(until=lambda row: node(row.records, "alpha").reason.startswith(said))
    reason = node(row.records, "alpha").reason
    assert node(row.records, "alpha").state is N.SWITCHING
    assert reason == (
        f"{said}; its switch waits: the leader keeps asking and records the outcome when it goes on"
    ), reason
    live["alpha"] = "https"
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED
    assert node(row.records, "alpha") == NodeRecord("alpha", N.DONE)
    await leader.stop()


async def test_an_unreachable_agent_defers_the_step_and_it_runs_again_later(world: World) -> None:
    world.agents["bravo"].unreachable = 3
    leader = world.boot()
    await leader.start()

    row = await leader.one_pass()  # the first try fails, and nothing is recorded
    assert node(row.records, "bravo") == NodeRecord("bravo", N.PREFLIGHT)
    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    tries = world.agents.calls_to("bravo", "preflight")
    assert [c.answer for c in tries] == ["unreachable"] * 3 + ["ok"]
    for before, after in pairwise(tries):
        assert STEP_RETRY_SECONDS <= after.at - before.at <= STEP_RETRY_SECONDS + TICK_SECONDS
    assert not [a for a in leader.audit() if a.detail.get("new") == "failed"]
    await leader.stop()


# --- the other changes ------------------------------------------------------------------------


async def test_change_password_skips_the_stage_and_applies_the_staged_password(
    world: World,
) -> None:
    leader = world.boot()
    await leader.start()
    await leader.run()
    version, pending = await leader.commands.stage_password(VERIFIER_2, ADMIN)
    assert (version, pending) == (2, set(ORDER))
    seen = len(world.agents.calls)

    with capture_logs() as events:
        await leader.start(Change.CHANGE_PASSWORD)
        row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    skipped = [e["node"] for e in events if e.get("node_event") == "stage_skipped"]
    assert skipped == list(ORDER)
    methods = {c.method for c in world.agents.calls[seen:]}
    assert methods.isdisjoint({"create_csr", "stage"})
    assert {n: world.agents[n].verifier for n in ORDER} == dict.fromkeys(ORDER, VERIFIER_2)
    assert leader.schema.node_auth() == dict.fromkeys(ORDER, 2)
    assert leader.schema.pending_password_nodes() == set()
    await leader.stop()


async def test_a_change_password_rolled_back_at_a_node_leaves_it_behind_and_says_so(
    world: World,
) -> None:
    """Review s69 revpass3 (3): a node whose change-password switch fails the outside check is
    rolled back by its agent to the password live before it; the leader keeps recording that
    one for it, and the schema names it behind the newest (``password_behind``, with the
    command that finishes it), not the nodes done."""
    leader = world.boot()
    await leader.start()
    await leader.run()
    await leader.commands.stage_password(VERIFIER_2, ADMIN)
    before = world.agents["charlie"].verifier
    world.agents["charlie"].outside_problem = "handshake: unknown CA"
    await leader.start(Change.CHANGE_PASSWORD, failure_budget=1)
    row = await leader.run()

    assert states(row) == {"bravo": N.DONE, "charlie": N.ROLLED_BACK, "alpha": N.DONE}
    charlie = world.agents["charlie"]
    assert (charlie.scheme, charlie.verifier) == ("https", before) and before != VERIFIER_2
    assert leader.schema.node_auth() == {"bravo": 2, "charlie": 1, "alpha": 2}
    behind = leader.schema.password_behind()
    assert behind is not None and behind.staged.version == 2
    assert behind.nodes == (("charlie", 1),)
    await leader.stop()


@pytest.mark.parametrize("when", ["planning", "create"])
async def test_a_password_staged_while_a_change_password_starts_refuses_the_start(
    world: World, when: str
) -> None:
    """Audit s32 M1: the start of a change-password rollout planned with the latest staged
    password (the nodes already on it are skipped) and then read the latest version again to
    apply it; a ``tlsroll password set`` in between (it is refused only while a rollout is
    active) made the rollout apply another version than it planned with (``planning``), or
    record the older one though the newer was staged before it (``create``): both commands
    succeeded, which no order of the two allows. The version the plan used is the one the
    start applies, and the create refuses it if another was staged meanwhile."""
    leader = world.boot()
    await leader.start()
    await leader.run()
    await leader.commands.stage_password(VERIFIER_2, ADMIN)  # version 2
    schema = leader.schema
    staged: list[int] = []

    def stage_3() -> None:
        staged.append(SchemaStore.stage_password(schema, verifier(3), world.clock.wall(), ADMIN))

    if when == "planning":  # just after the start's first read of the latest version
        real = schema.latest_auth_version

        def latest() -> int:
            found = real()
            if not staged:
                stage_3()
            return found

        schema.latest_auth_version = latest  # type: ignore[method-assign]
    else:  # just before the rollout is created
        interpose = schema.interpose

        async def before_create(method: str, args: tuple[Any, ...]) -> None:
            if method == "create" and not staged:
                stage_3()
            await interpose(method, args)

        schema.interpose = before_create  # type: ignore[method-assign]
    enabled = schema.latest()
    assert enabled is not None

    with pytest.raises(TerminalError, match="password version 3 was staged"):
        await leader.start(Change.CHANGE_PASSWORD)

    assert staged == [3]
    after = schema.latest()
    assert after is not None and after.rollout.id == enabled.rollout.id  # none created
    await leader.stop()


async def test_disable_tls_rolls_back_the_undone_switch_and_clears_the_password(
    world: World,
) -> None:
    leader = world.boot()
    enabled = await leader.start()
    await leader.run()
    seen = len(world.agents.calls)

    disabling = await leader.start(Change.DISABLE_TLS)
    row = await leader.run()

    assert disabling.meta.undoes == enabled.rollout.id
    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    rollbacks = [c for c in world.agents.calls[seen:] if c.method == "rollback"]
    # The way back is this rollout's transaction (so a failed one can be tried again), and it
    # undoes the switch that took the node from http, whichever rollout that was.
    assert [(c.node, c.rollout_id, c.epoch) for c in rollbacks] == [
        (n, disabling.rollout.id, row.rollout.epoch) for n in ORDER
    ]
    assert {world.agents[n].scheme for n in ORDER} == {"http"}
    assert leader.schema.node_auth() == {}
    await leader.stop()


async def test_a_rollout_is_taken_back_once_a_second_rollback_names_the_first(
    world: World,
) -> None:
    """Issue 16 #5: a second ``rollout rollback`` of the same rollout started and halted at
    preflight; it is refused with the first one's id and state, FAILED_PRECONDITION."""
    leader = world.boot()
    enabled = await leader.start()
    await leader.run()
    first = await leader.start(Change.DISABLE_TLS)
    await leader.run()
    seen = len(world.agents.calls)

    for undo in (None, enabled.rollout.id):
        request = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id=undo)
        with pytest.raises(PlanError, match=f"already taken back by rollout {first.rollout.id}"):
            await leader.commands.start(request, ADMIN)
        with pytest.raises(PlanError, match="completed") as refused:
            await leader.commands.plan(request)
        assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION

    assert world.agents.calls[seen:] == []
    assert [r.rollout.id for r in leader.schema.all()] == [first.rollout.id, enabled.rollout.id]
    await leader.stop()


# --- the scope freeze -------------------------------------------------------------------------


async def test_scope_freeze_holds_every_node_from_the_first_switch_to_the_last(
    world: World,
) -> None:
    lease = 6  # renewed every 2 s of fake time
    leader = world.boot(freeze_lease=lease)
    await leader.start(freeze=FreezeMode.SCOPE)

    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    assert not any(r.scope_frozen for r in row.records)
    calls = world.agents.calls
    switches = [c for c in calls if c.method == "switch"]
    assert [c.node for c in switches] == list(ORDER)
    assert all(c.frozen == set(ORDER) for c in switches)
    last_confirm = max(i for i, c in enumerate(calls) if c.method == "outside_check")
    for name in ORDER:
        agent = world.agents[name]
        mine = [c for c in calls if c.node == name]
        assert mine[-1].method == "unfreeze", name  # nothing after it
        assert calls.index(mine[-1]) > last_confirm, name
        assert not agent.frozen and agent.lapsed == 0, name
        freezes = [c.at for c in mine if c.method == "freeze"]
        assert len(freezes) >= 3, name  # the freeze and its renewals
        assert all(lease / 3 <= b - a < lease for a, b in pairwise(freezes)), name
        assert mine[-1].at - freezes[-1] < lease, name
    await leader.stop()


def assert_frozen_until_the_scope_unfreeze(world: World, since: int = 0) -> None:
    """Every node stays frozen from its first scope freeze to the rollout's scope unfreeze:
    no call in the log (from ``since`` on) shows it unfrozen in between, and its last call is
    that unfreeze, after the last confirm."""
    calls = world.agents.calls[since:]
    last_confirm = max(i for i, c in enumerate(calls) if c.method == "outside_check")
    for name in ORDER:
        mine = [i for i, c in enumerate(calls) if c.node == name]
        first_freeze = next(i for i in mine if calls[i].method == "freeze")
        last = mine[-1]
        assert calls[last].method == "unfreeze" and last > last_confirm, name
        thawed = [calls[i] for i in range(first_freeze + 1, last) if name not in calls[i].frozen]
        assert thawed == [], name
        assert not world.agents[name].frozen and world.agents[name].lapsed == 0, name


async def test_scope_freeze_holds_on_a_node_its_confirm_rolls_back(world: World) -> None:
    """Found by review: a Rollback carried no ``keep_frozen``, so the agent's rollback
    transaction lifted the scope freeze at its end and the node took writes until the next
    renewal froze it again (up to a third of the lease later)."""
    world.agents["charlie"].outside_problem = "handshake: unknown CA"
    leader = world.boot(freeze_lease=6)
    await leader.start(freeze=FreezeMode.SCOPE, failure_budget=1)

    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == {"bravo": N.DONE, "charlie": N.ROLLED_BACK, "alpha": N.DONE}
    charlie = world.agents["charlie"]
    assert (charlie.applied["switch"], charlie.applied["rollback"]) == (1, 1)
    assert charlie.scheme == "http"
    assert_frozen_until_the_scope_unfreeze(world)
    await leader.stop()


async def test_scope_freeze_holds_through_a_disable_tls_rollout(world: World) -> None:
    """disable-tls switches each node with its agent's Rollback: under ``--freeze scope`` that
    Rollback keeps the node frozen too."""
    leader = world.boot(freeze_lease=6)
    await leader.start()
    await leader.run()
    seen = len(world.agents.calls)

    await leader.start(Change.DISABLE_TLS, freeze=FreezeMode.SCOPE)
    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    assert {world.agents[n].scheme for n in ORDER} == {"http"}
    assert_frozen_until_the_scope_unfreeze(world, seen)
    await leader.stop()


async def test_scope_freeze_window_runs_from_the_scope_freeze_to_the_scope_unfreeze(
    world: World,
) -> None:
    """Issue 16 #4: with ``--freeze scope`` every node's window stayed "HH:MM:SS–(frozen)"
    (``freeze_ended_at`` null) though the nodes took writes again. The window is the scope
    freeze's: from its first confirmed freeze (renewals do not move it; the switch inside it
    does not either) to its confirmed unfreeze."""
    leader = world.boot(freeze_lease=6)
    await leader.start(freeze=FreezeMode.SCOPE)

    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    calls = world.agents.calls
    for record, detail in row.nodes:
        mine = [c for c in calls if c.node == record.name]
        at = {
            m: [START + dt.timedelta(seconds=c.at) for c in mine if c.method == m]
            for m in ("freeze", "switch", "unfreeze")
        }
        started, ended_at = detail.freeze_started_at, detail.freeze_ended_at
        assert started is not None and ended_at is not None, (record.name, detail)
        assert at["freeze"][0] <= started < at["freeze"][1], record.name  # not a renewal
        assert started <= at["switch"][0] <= at["unfreeze"][-1] <= ended_at, record.name
    await leader.stop()


# --- the real loop, with thread hops of varying length (found by review) ---------------------


def _hops(rng: random.Random) -> Callable[..., Awaitable[Any]]:
    async def hop(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        for _ in range(rng.randint(1, 6)):  # as long as a worker thread might take
            await asyncio.sleep(0)
        return func(*args, **kwargs)

    return hop


async def _run_loop(world: World, leader: Leader) -> RolloutRow:
    stop = asyncio.Event()
    task = asyncio.create_task(leader.engine.run(stop))
    try:
        for _ in range(4000):
            await asyncio.sleep(0)
            world.clock.advance(0.05)
            row = leader.schema.latest()
            if row is not None and ended(row):
                return row
        raise AssertionError("the rollout did not end")
    finally:
        stop.set()
        await task


@pytest.mark.parametrize("seed", range(12))
async def test_the_real_loop_never_runs_a_step_twice(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Engine.run`` (not the pass-by-pass harness): a pass that read the schema while a step
    was saving its result must not start that step again. With reads that take a few loop
    turns, 16 of 30 seeds once re-ran preflight, stage, switch or confirm, and a confirm run
    again could roll back a node already recorded done."""
    world = make_world(tmp_path, monkeypatch)
    hops = _hops(random.Random(seed))
    monkeypatch.setattr(asyncio, "to_thread", hops)
    monkeypatch.setattr(dbthread, "run", hops)
    monkeypatch.setattr("leader.engine.TICK_SECONDS", 0.001)
    seen: dict[str, int] = {}
    real = world.agents.outside_check

    async def one_blip(live: str, closed: str, ca: bytes, fp: str = "") -> str | None:
        seen[live] = seen.get(live, 0) + 1  # a second check of a node would see a blip
        return "timeout (a blip)" if seen[live] == 2 else await real(live, closed, ca, fp)

    monkeypatch.setattr(changes, "outside_check", one_blip)
    leader = world.boot()
    await leader.start(max_parallel=2)
    with capture_logs() as logs:
        row = await _run_loop(world, leader)
    assert [e for e in logs if e.get("event") == "step.crashed"] == []
    assert row.rollout.state is RolloutState.COMPLETED, states(row)
    mutating = ("preflight", "create_csr", "stage", "switch", "rollback")
    calls = [(c.node, c.method) for c in world.agents.calls if c.method in mutating]
    assert sorted(calls) == sorted(set(calls)), calls  # each at most once per node
    assert all(world.agents[n].scheme == "https" for n in states(row))


async def test_a_restarted_leader_renews_the_scope_freeze_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agents' leases run from the old leader's last renewal: a leader back within the
    lease must renew on its first pass, not a third of a lease later."""
    world = make_world(tmp_path, monkeypatch)
    lease = 6
    first = world.boot(freeze_lease=lease)
    await first.start(freeze=FreezeMode.SCOPE)
    await first.run(until=lambda r: all(x.scope_frozen for x in r.records))
    await first.crash()
    world.clock.advance(lease * 0.6)
    second = world.boot(freeze_lease=lease)
    row = await second.run()
    assert row.rollout.state is RolloutState.COMPLETED
    assert {a.name: a.lapsed for a in world.agents} == {a.name: 0 for a in world.agents}


async def test_a_freeze_a_leader_sent_before_it_died_is_lifted_by_the_next_one_s_abort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s33 L1: a scope FREEZE went out with nothing recorded, and the node's flag was
    written only with the agent's answer. A leader that died after charlie's agent froze and
    before that write left no record of it: an abort then unfroze the nodes recorded frozen
    only, and charlie refused writes until its lease ran out (5 minutes by default) while the
    schema said the rollout aborted and charlie unfrozen. The freeze is now recorded as asked
    (the node's flag) in the write that plans it, before it is sent."""
    world = make_world(tmp_path, monkeypatch)
    first = world.boot()
    charlie = world.agents["charlie"]
    real = charlie.freeze

    async def froze_then_died(request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        await real(request)  # the agent froze its server; its answer never reaches the leader
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    charlie.freeze = froze_then_died  # type: ignore[method-assign]
    await first.start(freeze=FreezeMode.SCOPE)
    passes = asyncio.create_task(first.run())  # its pass waits for charlie's freeze for good
    for _ in range(10_000):
        if charlie.frozen:
            break
        await asyncio.sleep(0)
    assert charlie.frozen
    passes.cancel()
    await asyncio.gather(passes, return_exceptions=True)
    await first.crash()
    charlie.freeze = real  # type: ignore[method-assign]
    second = world.boot()
    await second.control(RolloutAction.ABORT)
    row = await second.run()
    assert row.rollout.state is R.ABORTED
    assert not charlie.frozen, "the aborted rollout left charlie frozen"
    assert not any(a.frozen for a in world.agents)
    assert not any(r.scope_frozen for r in row.records)


@pytest.mark.parametrize("refuses", ["freeze and unfreeze", "unfreeze only"])
async def test_an_abort_ends_while_a_scope_node_s_server_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuses: str
) -> None:
    """Review 1 of session 33, H2: charlie's managed server is down, so its agent refuses
    Freeze and Unfreeze (FAILED_PRECONDITION: the driver's error). The freeze recorded as asked
    before it was sent (audit s33 L1) kept the abort from ending for good: the settled rollout
    sent charlie an UNFREEZE, refused for ever, and a refusal never counted as a lease run
    out. An UNFREEZE refused on a node only asked (no FREEZE of it confirmed: refused, or its
    answer never recorded) now counts as unfrozen once its lease has surely run out, with a
    note to check the node. (A refused FREEZE is no proof that nothing froze: the agent writes
    its lease first, and a drain that timed out may have frozen the server: review 2, M1.)"""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot(freeze_lease=6)
    charlie = world.agents["charlie"]

    async def down(request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        raise StepFailed(
            "managed server not answering (FAILED_PRECONDITION)",
            grpc.StatusCode.FAILED_PRECONDITION,
        )

    if refuses == "freeze and unfreeze":
        charlie.freeze = down  # type: ignore[method-assign]
    charlie.unfreeze = down  # type: ignore[method-assign]
    await leader.start(freeze=FreezeMode.SCOPE)
    for _ in range(5):
        await leader.one_pass()
    if refuses == "unfreeze only":  # asked and answered, the answer never recorded
        await leader.run(until=lambda _r: charlie.frozen)
        row = leader.schema.latest()
        assert row is not None
        await leader.engine._save_node(
            row.rollout.id,
            "charlie",
            lambda r: replace(r, scope_frozen=False, freeze_asked=True),
        )
    await leader.control(RolloutAction.ABORT)
    row = await leader.run(passes=600)
    assert row.rollout.state is R.ABORTED
    assert not any(r.scope_frozen or r.freeze_asked for r in row.records)
    assert node(row.records, "charlie").reason.startswith("unfreeze not confirmed")
    assert not any(a.frozen for a in world.agents if a.name != "charlie")


def charlie_s_server_down(world: World, *, unfreeze: bool = False) -> list[float]:
    """charlie's FREEZE (and with ``unfreeze`` its UNFREEZE) refused as by an agent whose
    server does not answer; the times each was sent."""
    sent: list[float] = []

    async def down(request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        sent.append(world.clock.monotonic())
        raise StepFailed(
            "managed server not answering (FAILED_PRECONDITION)",
            grpc.StatusCode.FAILED_PRECONDITION,
        )

    charlie = world.agents["charlie"]
    charlie.freeze = down  # type: ignore[method-assign]
    if unfreeze:
        charlie.unfreeze = down  # type: ignore[method-assign]
    return sent


def disk_full_for(
    monkeypatch: pytest.MonkeyPatch,
    world: World,
    leader: Leader,
    reason: str,
    times: int | None = None,
) -> list[float]:
    """The store full (``sqlite3.OperationalError``) for the engine's writes of a node whose
    new reason starts with ``reason``, ``times`` times (None: always); when each failed."""
    engine = leader.engine
    real_save = engine._save_node
    failed: list[float] = []

    async def full_disk(
        rollout_id: str, name: str, change: Callable[[Any], Any], *more: Any, **named: Any
    ) -> Any:
        row = leader.schema.latest()
        assert row is not None
        hit = change(node(row.records, name)).reason.startswith(reason)
        if hit and (times is None or len(failed) < times):
            failed.append(world.clock.monotonic())
            raise sqlite3.OperationalError("database or disk is full")
        return await real_save(rollout_id, name, change, *more, **named)

    monkeypatch.setattr(engine, "_save_node", full_disk)
    return failed


async def test_a_failed_write_of_a_lease_run_out_keeps_the_unfreeze_s_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of session 33, L2: the write of ``_lease_ran_out`` runs inside the step's
    ``except`` for an unanswered or refused UNFREEZE. A store error there (a full disk) escaped
    it: no ``_trouble``, no ``not_before``, so the UNFREEZE went out again at every pass, and
    the task's exception was never retrieved. It is now logged once per failure and the step
    is in trouble with its pause, as any other failure; once the store takes the write again
    the abort ends."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot(freeze_lease=6)
    sent = charlie_s_server_down(world, unfreeze=True)
    failed = disk_full_for(monkeypatch, world, leader, "unfreeze not confirmed", times=3)
    await leader.start(freeze=FreezeMode.SCOPE)
    for _ in range(5):
        await leader.one_pass()
    await leader.control(RolloutAction.ABORT)
    with capture_logs() as logs:
        row = await leader.run(passes=600)
    assert row.rollout.state is R.ABORTED
    assert not any(r.scope_frozen or r.freeze_asked for r in row.records)
    assert len(failed) == 3
    said = [e for e in logs if e["event"] == "step.record_failed"]
    assert len(said) == 3, logs
    assert all("disk is full" in e["error"] and e["node"] == "charlie" for e in said)
    # From the first failed write on, the UNFREEZE went out at its pauses, not at every pass.
    after = [t for t in sent if t >= failed[0]]
    assert len(after) == 4, after  # three failed writes, then the one that went through
    assert all(b - a >= STEP_RETRY_SECONDS for a, b in pairwise(after)), after


async def test_a_failed_write_of_a_step_s_trouble_is_logged_and_keeps_its_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of session 33, L2, the rest of it: ``_trouble`` writes too (a note on the
    node once a scope freeze failed ``REASON_AFTER_ATTEMPTS`` times, a switch's "unknown", a
    failed stage), inside the step's ``except``. A store error there ended the task with an
    exception nobody retrieved: not logged with the step's context (asyncio's "never
    retrieved" at best, when the task is collected). It is now logged as ``step.crashed``
    with the step, and the pause ``_trouble`` set before its write holds: the FREEZE goes out
    at its pauses, never at every pass."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    sent = charlie_s_server_down(world)
    failed = disk_full_for(monkeypatch, world, leader, "scope freeze failing")
    await leader.start(freeze=FreezeMode.SCOPE)
    with capture_logs() as logs:
        for _ in range(60):
            await leader.one_pass()
    assert len(failed) >= 2, (failed, sent)
    crashed = [e for e in logs if e["event"] == "step.crashed"]
    assert len(crashed) == len(failed), crashed
    assert all(
        e["node"] == "charlie"
        and e["step"] == "freeze"
        and e["error_type"] == "OperationalError"
        and "in full_disk" in e["where"]  # the place (review 1 of s34, nit)
        and "disk is full" in e["error"]  # a store error's message names no value: kept
        for e in crashed
    )
    assert all(b - a >= STEP_RETRY_SECONDS for a, b in pairwise(sent)), sent


async def test_a_crashed_step_logs_its_type_and_place_not_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 1 of s34, nit: ``step.crashed`` logged ``str(exc)`` of any exception, which may
    hold any value; like ``rpc.internal_error`` it now logs the type and the place only."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()

    async def bug(*_args: Any) -> Any:
        raise ValueError("a value that may be a secret: hunter2")

    monkeypatch.setattr(leader.engine, "_step", bug)
    await leader.start()
    with capture_logs() as logs:
        for _ in range(3):
            await leader.one_pass()
    crashed = [e for e in logs if e["event"] == "step.crashed"]
    assert crashed
    assert all(
        e["error_type"] == "ValueError" and "in bug" in e["where"] and "hunter2" not in str(e)
        for e in crashed
    ), crashed


async def test_a_leader_back_after_the_lease_freezes_again_before_the_next_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 #6: a leader away longer than the lease found the agents unfrozen (they lift a
    freeze nobody renews) and went on switching. It freezes every node in scope again, and
    no switch begins before each of them confirmed it."""
    world = make_world(tmp_path, monkeypatch)
    lease = 6
    first = world.boot(freeze_lease=lease)
    await first.start(freeze=FreezeMode.SCOPE)
    # Down when charlie is staging: its switch is the next step after its stage (the stage's
    # outcome and the switch are one write).
    await first.run(until=lambda r: node(r.records, "charlie").state is N.STAGING)
    await first.crash()
    world.clock.advance(lease * 2)
    world.agents.expire_leases()
    assert not any(a.frozen for a in world.agents)
    for agent in world.agents:  # a freeze takes a while to reach the node

        def slow(
            real: Callable[[agent_pb2.FreezeRequest], Awaitable[agent_pb2.FreezeResponse]],
        ) -> Callable[[agent_pb2.FreezeRequest], Awaitable[agent_pb2.FreezeResponse]]:
            async def freeze(request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
                for _ in range(50):
                    await asyncio.sleep(0)
                return await real(request)

            return freeze

        agent.freeze = slow(agent.freeze)  # type: ignore[method-assign,assignment]
    seen = len(world.agents.calls)
    second = world.boot(freeze_lease=lease)
    row = await second.run()
    assert row.rollout.state is RolloutState.COMPLETED
    calls = world.agents.calls[seen:]
    first_switch = next(i for i, c in enumerate(calls) if c.method == "switch")
    refrozen = {c.node for c in calls[:first_switch] if c.method == "freeze" and c.answer == "ok"}
    assert refrozen == {"bravo", "charlie", "alpha"}
    # Every switch after the restart ran with the whole scope frozen.
    for c in calls:
        if c.method == "switch":
            assert c.frozen == frozenset({"bravo", "charlie", "alpha"}), c
    await second.stop()


async def test_a_switch_waits_while_a_frozen_node_s_renewals_fail_past_its_lease(
    world: World,
) -> None:
    """Audit s32 H3: a confirmed scope freeze counted for good, though the agent lifts a
    freeze whose lease ran out (``watch_freeze_lease``). A frozen node the leader could not
    reach for longer than the lease took writes again while the next node switched. A
    confirmation now counts only while the lease it confirmed may still hold (less a
    renewal period); after that the switches wait until a renewal is confirmed again."""
    lease = 6  # renewed every 2 s of fake time; a confirmation counts for 4 s from its send
    leader = world.boot(freeze_lease=lease)
    await leader.start(freeze=FreezeMode.SCOPE)
    bravo, charlie = world.agents["bravo"], world.agents["charlie"]
    real = charlie.preflight
    hold = [float("inf")]  # charlie's preflight gets no answer before this time

    async def late(request: agent_pb2.PreflightRequest) -> agent_pb2.PreflightResponse:
        if world.clock.monotonic() < hold[0]:
            raise TransientError("charlie: not yet")
        return await real(request)

    charlie.preflight = late  # type: ignore[method-assign]
    await leader.run(until=lambda r: node(r.records, "bravo").state is N.DONE)
    bravo.unreachable = 10**6  # switched, frozen for the others: every renewal fails now
    cut = world.clock.monotonic()
    hold[0] = cut + 2 * lease  # charlie switches after bravo's lease ran out
    row = await leader.run(until=lambda _r: world.clock.monotonic() >= cut + 4 * lease)
    assert not bravo.frozen and bravo.lapsed >= 1  # its lease ran out: it takes writes
    bravo.unreachable = 0  # back: the next renewal freezes it again
    row = await leader.run()

    assert row.rollout.state is R.COMPLETED
    assert states(row) == ALL_DONE
    switches = [c for c in world.agents.calls if c.method == "switch"]
    assert [c.node for c in switches] == list(ORDER)
    for c in switches:  # no switch with a node of the scope taking writes
        assert c.frozen == frozenset(ORDER), c
    await leader.stop()


async def test_a_dead_frozen_node_holds_the_next_switch_staged_and_an_abort_ends_the_rollout(
    world: World,
) -> None:
    """Session 32's review 1, F1: the switch that waits for a frozen node whose confirmation
    lapsed (audit H3) waited at its step, after the plan had moved the next node to
    ``switching``: a node in flight, which an abort does not skip. A switched node whose machine
    died then kept every other node of the scope frozen (refusing writes) for good, abort or
    not. The plan now holds the switch: the next node stays ``staged`` (and says why), so an
    abort skips it and unfreezes every node that answers; and the dead node's unfreeze counts
    as done once its lease has surely run out, so the aborted rollout ends (F2)."""
    lease = 6
    leader = world.boot(freeze_lease=lease)
    await leader.start(freeze=FreezeMode.SCOPE)
    bravo, charlie = world.agents["bravo"], world.agents["charlie"]
    real = charlie.preflight
    hold = [float("inf")]

    async def late(request: agent_pb2.PreflightRequest) -> agent_pb2.PreflightResponse:
        if world.clock.monotonic() < hold[0]:
            raise TransientError("charlie: not yet")
        return await real(request)

    charlie.preflight = late  # type: ignore[method-assign]
    await leader.run(until=lambda r: node(r.records, "bravo").state is N.DONE)
    bravo.unreachable = 10**6  # its machine died: it never answers again
    cut = world.clock.monotonic()
    hold[0] = cut + 2 * lease  # charlie is prepared after bravo's confirmation lapsed
    row = await leader.run(until=lambda _r: world.clock.monotonic() >= cut + 6 * lease)
    assert node(row.records, "charlie").state is N.STAGED, states(row)
    assert "bravo" in node(row.records, "charlie").reason
    assert not [c for c in world.agents.calls if c.method == "switch" and c.node == "charlie"]
    await leader.control(RolloutAction.ABORT)
    row = await leader.run(until=lambda _r: not charlie.frozen and not world.agents["alpha"].frozen)
    assert node(row.records, "charlie").state is N.SKIPPED, states(row)
    # F2: bravo never confirms its unfreeze. Once its lease has surely run out (its agent lifts
    # such a freeze by itself), it is recorded unfrozen, and the rollout ends: before, it stayed
    # ``aborting`` for good, and every later rollout was refused.
    row = await leader.run(passes=400)
    assert row.rollout.state is R.ABORTED, row.rollout.state
    gone = node(row.records, "bravo")
    assert not gone.scope_frozen and "lease has run out" in gone.reason, gone
    assert gone.reason.startswith("unfreeze not confirmed"), gone
    await leader.stop()


async def test_the_test_only_lease_margin_is_how_long_past_the_lease_an_unfreeze_waits(
    world: World,
) -> None:
    """``TEST_LEASE_MARGIN_ENV`` (a test leader's ``Engine.lease_margin``, set as the leader
    sets it) is the wait past a dead frozen node's lease: its unanswered unfreeze counts as
    done once that margin past the lease from its last freeze call has gone by, not before,
    and not a whole ``LEASE_MARGIN`` later (tests/test_cut_off_live.py waits for it)."""
    lease, margin = 6, 5.0
    leader = world.boot(freeze_lease=lease)
    leader.engine.lease_margin = engine_module.lease_margin(
        {engine_module.TEST_LEASE_MARGIN_ENV: str(margin)}
    )
    assert leader.engine.lease_margin == margin > lease / 3
    first = await leader.start(freeze=FreezeMode.SCOPE)
    bravo = world.agents["bravo"]
    await leader.run(until=lambda r: node(r.records, "bravo").state is N.DONE)
    bravo.unreachable = 10**6  # its machine died: it never answers again
    await leader.control(RolloutAction.ABORT)
    row = await leader.run(
        until=lambda r: not node(r.records, "bravo").scope_frozen,
        passes=int(engine_module.LEASE_MARGIN),
    )
    now = world.clock.monotonic()
    sent = leader.engine.freeze_sent[(first.rollout.id, "bravo")]
    assert sent + lease + margin <= now < sent + lease + margin + 2 * TICK_SECONDS, (now, sent)
    assert "lease has run out" in node(row.records, "bravo").reason
    row = await leader.run()
    assert row.rollout.state is R.ABORTED, row.rollout.state
    await leader.stop()


def test_the_test_only_lease_margin_only_shortens_it() -> None:
    """``TEST_LEASE_MARGIN_ENV`` brings the margin closer; anything else there, a longer one
    included, leaves it at ``LEASE_MARGIN``."""
    env, margin = engine_module.TEST_LEASE_MARGIN_ENV, engine_module.LEASE_MARGIN
    assert engine_module.lease_margin({}) == margin == 60.0
    assert engine_module.lease_margin({env: "5"}) == 5.0
    assert engine_module.lease_margin({env: "60"}) == margin
    for bad in ("", "soon", "0", "-1", "nan", "inf", "60.5", "3600"):
        assert engine_module.lease_margin({env: bad}) == margin, bad


async def test_a_dead_frozen_node_that_failed_holds_the_switches_too(world: World) -> None:
    """Review 2 of session 32, F1: a node frozen and then failed (its machine died after it
    confirmed the scope freeze; its preflight fails; a failure budget of 1) stays frozen on
    record and renewed, and its confirmation lapses. The plan froze only nodes not failed, so
    it moved the next node to ``switching``, which the step's gate then never sent, and an
    abort does not skip: every live node stayed frozen. The plan now holds the switches while
    any frozen node has lapsed, whatever its state: the next node stays ``staged`` and says
    why, and an abort ends the rollout."""
    lease = 6
    leader = world.boot(freeze_lease=lease)
    await leader.start(freeze=FreezeMode.SCOPE, failure_budget=1)
    charlie, alpha = world.agents["charlie"], world.agents["alpha"]
    real_freeze, real_alpha = charlie.freeze, alpha.preflight
    cut = [float("inf")]

    async def then_dies(request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        reply = await real_freeze(request)
        charlie.unreachable = 10**6  # confirmed the freeze, then its machine died
        return reply

    async def late(request: agent_pb2.PreflightRequest) -> agent_pb2.PreflightResponse:
        if world.clock.monotonic() < cut[0]:
            raise TransientError("alpha: not yet")
        return await real_alpha(request)

    charlie.freeze = then_dies  # type: ignore[method-assign]
    alpha.preflight = late  # type: ignore[method-assign]
    await leader.run(until=lambda r: node(r.records, "charlie").state is N.FAILED, passes=400)
    cut[0] = world.clock.monotonic() + 2 * lease  # alpha is prepared once charlie has lapsed
    row = await leader.run(
        until=lambda r: (
            node(r.records, "alpha").state is not N.PENDING
            and node(r.records, "alpha").state is not N.PREFLIGHT
            and node(r.records, "alpha").state is not N.STAGING
            and world.clock.monotonic() > cut[0] + 2 * lease
        ),
        passes=400,
    )
    assert node(row.records, "alpha").state is N.STAGED, states(row)
    assert "charlie" in node(row.records, "alpha").reason
    assert not [c for c in world.agents.calls if c.method == "switch" and c.node == "alpha"]
    await leader.control(RolloutAction.ABORT)
    row = await leader.run(passes=400)
    assert row.rollout.state is R.ABORTED, states(row)
    assert not alpha.frozen and not world.agents["bravo"].frozen
    await leader.stop()


def switch_gets_no_answer(world: World, name: str) -> Callable[[], None]:
    """``name``'s Switch never reaches its agent (logged "unreachable"); returns the undo."""
    agent = world.agents[name]
    real = agent.switch

    async def lost(request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction:
        command = request.command
        world.agents.log(agent, "switch", command.rollout_id, command.epoch, "unreachable")
        raise TransientError(f"agent {name}: unreachable")

    agent.switch = lost  # type: ignore[method-assign]

    def undo() -> None:
        agent.switch = real  # type: ignore[method-assign]

    return undo


async def died_as_charlie_s_switch_went_out(world: World, lease: int) -> None:
    """A ``--freeze scope`` rollout whose leader died as charlie's Switch went out, which never
    reached charlie's agent (the agent is fine: only that call was lost)."""
    first = world.boot(freeze_lease=lease)
    await first.start(freeze=FreezeMode.SCOPE)
    restore = switch_gets_no_answer(world, "charlie")
    await first.run(until=lambda _r: bool(world.agents.calls_to("charlie", "switch")))
    await first.crash()
    restore()


async def test_a_restarted_leader_s_abort_skips_a_switch_held_for_a_dead_frozen_node_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of session 32, F2: charlie is ``switching`` (its Switch never answered), the
    leader dies, bravo (switched, frozen for the others) dies too, and a new leader starts:
    it has seen no confirmation, bravo never confirms, and the step's gate held charlie's
    switch for good; an abort does not skip a node in flight, so the rollout stayed
    ``aborting`` with every live node frozen. The gate holds only a new Switch: it asks the
    agent, and one that has no switch of this rollout is skipped once the rollout drains."""
    world = make_world(tmp_path, monkeypatch)
    lease = 6
    await died_as_charlie_s_switch_went_out(world, lease)
    world.agents["bravo"].unreachable = 10**6  # its machine died
    seen = len(world.agents.calls)
    second = world.boot(freeze_lease=lease)
    await second.control(RolloutAction.ABORT)
    row = await second.run(passes=400)

    assert row.rollout.state is R.ABORTED, states(row)
    charlie = node(row.records, "charlie")
    assert charlie.state is N.SKIPPED and "rollout aborted" in charlie.reason, charlie
    assert "never sent" in charlie.reason, charlie
    assert not [c for c in world.agents.calls[seen:] if c.method == "switch"]
    assert not world.agents["charlie"].txns
    assert not world.agents["charlie"].frozen and not world.agents["alpha"].frozen
    await second.stop()


async def test_a_restarted_leader_follows_a_switch_begun_before_though_a_frozen_node_is_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of session 32, F2, the other half: the Switch the old leader sent has begun
    on charlie. Following it is no new switch: the new leader watches it to its end though
    bravo's freeze is not confirmed (the gate held that watch for good), and only the next
    switch waits (alpha stays ``staged``, saying why); an abort then ends the rollout."""
    world = make_world(tmp_path, monkeypatch)
    lease = 6
    first = world.boot(freeze_lease=lease)
    await first.start(freeze=FreezeMode.SCOPE)
    charlie = world.agents["charlie"]
    real = charlie.get_transaction

    async def lost(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        raise TransientError("agent charlie: unreachable")  # the Switch's answer was lost

    charlie.get_transaction = lost  # type: ignore[method-assign]
    await first.run(until=lambda _r: bool(charlie.txns))
    await first.crash()
    charlie.get_transaction = real  # type: ignore[method-assign]
    assert charlie.applied["switch"] == 1
    world.agents["bravo"].unreachable = 10**6
    second = world.boot(freeze_lease=lease)
    row = await second.run(
        until=lambda r: (
            node(r.records, "alpha").state is N.STAGED and node(r.records, "alpha").reason != ""
        ),
        passes=400,
    )
    assert node(row.records, "charlie").state is N.DONE, states(row)
    assert charlie.applied["switch"] == 1  # followed, not begun again
    assert "bravo" in node(row.records, "alpha").reason
    assert not world.agents.calls_to("alpha", "switch")
    await second.control(RolloutAction.ABORT)
    row = await second.run(passes=400)
    assert row.rollout.state is R.ABORTED, states(row)
    assert not charlie.frozen and not world.agents["alpha"].frozen
    await second.stop()


def fails_the_question(agent: FakeAgent, code: grpc.StatusCode) -> list[str]:
    """``agent`` answers every GetTransaction with its own failure (``code``, ``ASK_FAILED``);
    the rollout ids asked, counted."""
    asked: list[str] = []

    async def failing(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        asked.append(request.rollout_id)
        raise StepFailed(ASK_FAILED, code)

    agent.get_transaction = failing  # type: ignore[method-assign]
    return asked


@pytest.mark.parametrize("code", [grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL])
async def test_a_gated_switch_whose_agent_fails_the_question_needs_attention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: grpc.StatusCode
) -> None:
    """Session 73 (s72 refused's L): a ``--freeze scope`` switch held at the gate
    (``_gated_switch``) asks its agent whether it has the switch; an agent that answers with
    its own failure (ABORTED, INTERNAL) each time is asked again within the step
    (``SEND_AGAIN``), then the node needs attention, saying the agent failed to say. It went
    to ``_trouble`` with no deadline: "agent unreachable ... may be mid-switch", asked again
    without end, the rollout never ending."""
    world = make_world(tmp_path, monkeypatch)
    lease = 6
    await died_as_charlie_s_switch_went_out(world, lease)
    world.agents["bravo"].unreachable = 10**6  # its freeze never confirmed: charlie is gated
    asked = fails_the_question(world.agents["charlie"], code)
    second = world.boot(freeze_lease=lease)
    row = await second.run(
        until=lambda r: node(r.records, "charlie").state is not N.SWITCHING, passes=400
    )

    charlie = node(row.records, "charlie")
    assert charlie.state is N.NEEDS_ATTENTION, charlie
    assert charlie.reason == (
        "whether an earlier try began the switch is not known: the agent failed to say, each"
        f" time asked ({ASK_FAILED}); look at the node"
    ), charlie.reason
    assert len(asked) == 1 + changes.SEND_AGAIN, asked
    assert not world.agents.calls_to("charlie", "switch")[1:]  # (the first leader's, lost)
    await second.control(RolloutAction.ABORT)
    row = await second.run(passes=400)
    assert row.rollout.state in TERMINAL_ROLLOUT_STATES, states(row)
    await second.stop()


async def test_a_restarted_leader_holds_a_switch_never_sent_while_a_frozen_node_is_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the rollout runs, a switch its agent never got waits for every frozen node's
    confirmation, as before, and now says so on the node (it said nothing); the agent is
    asked once, not at every pass. Once bravo is back and confirms, charlie switches."""
    world = make_world(tmp_path, monkeypatch)
    lease = 6
    await died_as_charlie_s_switch_went_out(world, lease)
    bravo = world.agents["bravo"]
    bravo.unreachable = 10**6
    seen, since = len(world.agents.calls), world.clock.monotonic()
    second = world.boot(freeze_lease=lease)
    row = await second.run(until=lambda _r: world.clock.monotonic() > since + 10 * lease)
    charlie = node(row.records, "charlie")
    assert charlie.state is N.SWITCHING and "scope freeze of bravo" in charlie.reason, charlie
    later = world.agents.calls[seen:]
    assert not [c for c in later if c.method == "switch"]
    asked = [c for c in later if c.method == "get_transaction" and c.node == "charlie"]
    assert len(asked) == 1, asked
    bravo.unreachable = 0
    row = await second.run(passes=400)
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert node(row.records, "charlie").reason == ""
    for c in world.agents.calls[seen:]:
        if c.method == "switch":
            assert c.frozen == frozenset(ORDER), c
    await second.stop()


async def test_an_unfreeze_the_agent_refuses_is_not_taken_for_a_lapsed_lease(
    world: World,
) -> None:
    """Review 2 of session 32, F3: an unfreeze the agent answered with a refusal (its server's
    admin API failed: the node still refuses writes) was, a lease later, recorded as lifted by
    the lease and the rollout completed. A refusal is an answer: the node stays frozen on
    record, the trouble shows, and the rollout waits."""
    lease = 6
    leader = world.boot(freeze_lease=lease)
    bravo = world.agents["bravo"]

    async def refuses(request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        raise StepFailed("unfreeze failed: DriverError: the admin API did not answer")

    bravo.unfreeze = refuses  # type: ignore[method-assign]
    await leader.start(freeze=FreezeMode.SCOPE)
    row = await leader.run(
        until=lambda r: (
            all(x.state is N.DONE for x in r.records) and world.clock.monotonic() > 20 * lease
        ),
        passes=400,
    )
    assert row.rollout.state is R.RUNNING, row.rollout.state
    assert node(row.records, "bravo").scope_frozen
    assert "unfreeze" in node(row.records, "bravo").reason
    await leader.stop()


async def test_an_error_reading_a_running_switch_is_not_its_outcome(world: World) -> None:
    """Found by review: a GetTransaction that failed (INTERNAL on a journal hiccup, say) was
    recorded as "rolled back" while the agent's switch went on to https. It is transient: the
    step runs again and the agent replays the same transaction."""
    agent = world.agents["bravo"]
    real = agent.get_transaction
    failures = [StepFailed("journal busy (INTERNAL)")]

    async def hiccup(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        if request.kind == TXN_KIND.wire(TxnKind.SWITCH) and failures:
            raise failures.pop()
        return await real(request)

    agent.get_transaction = hiccup  # type: ignore[method-assign]
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert not failures  # the hiccup happened
    assert [c.answer for c in world.agents.calls_to("bravo", "switch")] == ["ok", "replay"]
    await leader.stop()


# --- calls that carry nothing new (issue 15: the leader's CPU per node) ------------------------


async def test_confirm_asks_no_agent_for_a_rollback_after_a_switch_this_leader_saw(
    world: World,
) -> None:
    """Confirm asked every agent whether a rollback was under way (a GetTransaction answered
    NOT_FOUND on every healthy node). Only this leader's Rollback starts one, so after a
    switch this process saw complete, the question is not asked."""
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    questions = [
        c for c in world.agents.calls if c.method == "get_transaction" and c.answer == "not_found"
    ]
    assert questions == []
    await leader.stop()


async def test_a_restarted_leader_s_confirm_asks_whether_a_rollback_is_under_way(
    world: World,
) -> None:
    """A leader that did not see the node's switch (it restarted since) still asks, and
    follows a rollback its predecessor began instead of checking again."""
    first = world.boot()
    await first.start(max_parallel=1)
    # The first node's switch is recorded done; the leader goes before its confirm runs.
    await first.run(until=lambda r: node(r.records, ORDER[0]).state is N.CONFIRMING)
    await first.crash()
    second = world.boot()
    row = await second.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    asked = [
        c for c in world.agents.calls_to(ORDER[0], "get_transaction") if c.answer == "not_found"
    ]
    assert len(asked) == 1  # the restarted leader's confirm of the first node
    await second.stop()


GROWN = [2.0, 2.0, 2.0, 4.0, 8.0, 16.0, MAX_RETRY_SECONDS, MAX_RETRY_SECONDS]
"""The pauses after a step's attempts that got no answer, one after another (``_trouble``)."""


@pytest.mark.parametrize(
    ("script", "pauses"),
    [
        # An outage: the pause grows, as it did.
        (["gone"] * 8, GROWN),
        # "Being received" each time: the agent answered, having waited in the call; a
        # constant pause (it grew to 30 s: a request journalled meanwhile learned that late).
        (["received"] * 8, [STEP_RETRY_SECONDS] * 8),
        # Mixed: the outage's pauses are what they were at that attempt (no faster).
        (
            ["gone", "received", "gone", "gone", "received", "received", "gone", "gone"],
            [GROWN[0], 2.0, GROWN[2], GROWN[3], 2.0, 2.0, GROWN[6], GROWN[7]],
        ),
    ],
    ids=["outage", "being-received", "mixed"],
)
async def test_a_being_received_answer_does_not_grow_the_step_s_pause(
    world: World, monkeypatch: pytest.MonkeyPatch, script: list[str], pauses: list[float]
) -> None:
    """Session 74's note, Open (L): the engine's pause between a step's attempts grew (2, 2,
    2, 4, 8, 16, 30 s) after the agent's "being received" (``BeingReceived``) too. A restarted
    leader's confirm asks the first node whether a rollback is under way; its agent answers
    as ``script`` says (its "being received", or nothing), then as it should: the pauses
    ``_trouble`` set, counted, are ``pauses``, and the rollout completes."""
    first = world.boot()
    await first.start(max_parallel=1)
    await first.run(until=lambda r: node(r.records, ORDER[0]).state is N.CONFIRMING)
    await first.crash()
    agent = world.agents[ORDER[0]]
    real = agent.get_transaction
    left = list(script)

    async def scripted(request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction:
        if request.kind == TXN_KIND.wire(TxnKind.ROLLBACK) and left:
            if left.pop(0) == "gone":
                raise TransientError(f"agent {agent.name}: unreachable")
            raise BeingReceived(
                f"agent {agent.name}: a request of the rollback transaction of rollout"
                f" {request.rollout_id!r} is being received; ask again"
            )
        return await real(request)

    agent.get_transaction = scripted  # type: ignore[method-assign]
    second = world.boot()
    engine = second.engine
    trouble = engine._trouble
    seen: list[float] = []

    async def counted(row: RolloutRow, step: planner.StepAction, *args: Any, **kw: Any) -> None:
        now = world.clock.monotonic()
        await trouble(row, step, *args, **kw)
        seen.append(engine.not_before[(row.rollout.id, step.node, step.step)] - now)

    monkeypatch.setattr(engine, "_trouble", counted)
    note = engine._note
    notes: list[str] = []

    async def noted(rollout_id: str, step: planner.StepAction, reason: str) -> None:
        notes.append(reason)
        await note(rollout_id, step, reason)

    monkeypatch.setattr(engine, "_note", noted)
    row = await second.run(passes=400)
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert not left
    assert seen == pytest.approx(pauses)
    # The node's "unknown" note, once 10 s passed: the last answer's (it answered, or not).
    said = UNKNOWN if script[-1] == "gone" else UNKNOWN_ANSWERED
    assert notes and notes[-1].startswith(said), notes
    await second.stop()


async def test_a_confirm_run_again_after_its_rollback_follows_that_rollback(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The confirm that sent a Rollback must, when it runs again (the rollback's answer was
    lost), follow that rollback: it asks the agent again, and sends no second Rollback."""
    charlie = world.agents["charlie"]
    charlie.outside_problem = "handshake: unknown CA"
    real = charlie.watch_transaction
    lost = [StepFailed("stream reset (INTERNAL)")]

    async def once_lost(request: agent_pb2.GetTransactionRequest) -> Any:
        if request.kind == TXN_KIND.wire(TxnKind.ROLLBACK) and lost:
            raise lost.pop()
        async for txn in real(request):
            yield txn

    monkeypatch.setattr(charlie, "watch_transaction", once_lost)
    leader = world.boot()
    await leader.start(failure_budget=1)
    row = await leader.run()
    assert not lost  # the rollback's answer was lost once
    assert states(row) == {"bravo": N.DONE, "charlie": N.ROLLED_BACK, "alpha": N.DONE}
    assert [c.answer for c in world.agents.calls_to("charlie", "rollback")] == ["ok"]
    assert (charlie.applied["switch"], charlie.applied["rollback"]) == (1, 1)
    await leader.stop()


async def test_the_stage_signs_the_csr_its_preflight_brought_back(world: World) -> None:
    """Preflight brings the key's CSR back (``make_csr``): the stage makes no CreateCSR call,
    and what the agent stages is signed for the key it made (the fake checks it)."""
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert [c for c in world.agents.calls if c.method == "create_csr"] == []
    for agent in world.agents:
        assert (agent.applied["create_csr"], agent.applied["stage"]) == (1, 1), agent.name
        assert agent.fingerprint == pki.fingerprint(agent.staged[row.rollout.id]), agent.name
    await leader.stop()


async def test_the_stage_compares_the_names_the_preflight_signed_for_without_parsing_them(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate its preflight signed is sent by the stage if the node's enrolled names
    are still the ones it was signed for (``Signed.names``: ``sign_csr`` issues exactly
    those): the leader does not parse the names back out of a certificate it made itself
    (``pki.names_of``, once per node before: its extensions decoded again). The CSR's names
    are still checked (``check_csr``), once per node."""
    parsed: list[str] = []
    real = pki.names_of

    def counting(obj: Any) -> pki.Names:
        caller = sys._getframe(1).f_globals["__name__"]
        if not caller.startswith("tests."):  # the fake agent checks what it is sent
            parsed.append(type(obj).__name__)
        return real(obj)

    monkeypatch.setattr(pki, "names_of", counting)
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert world.agents.calls_to("bravo", "create_csr") == []
    assert parsed == ["CertificateSigningRequest"] * len(ORDER)  # check_csr's, one per node
    await leader.stop()


async def test_the_preflight_s_certificate_is_recorded_with_its_outcome(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preflight signs the CSR it brought back, and the certificate is recorded in the
    same write as the preflight's outcome (the node's move to staging): the stage sends it
    with no write of its own first (``Store.record_certificate``, and since session 31
    ``SchemaStore.record_stage_certificate``, is not called; it was once per node, a durable
    write and a store hand-off on the first node's way to its switch). Still recorded before
    it is sent: each agent's Stage finds it in the store."""
    recorded: list[str] = []
    monkeypatch.setattr(
        Store, "record_certificate", lambda _s, cert, **_k: recorded.append(cert.node)
    )

    def recording(_s: SchemaStore, _rid: str, cert: IssuedCert, **_k: Any) -> bool:
        recorded.append(cert.node)
        return True

    monkeypatch.setattr(SchemaStore, "record_stage_certificate", recording)
    leader = world.boot()
    seen_at_stage: dict[str, set[str]] = {}
    for agent in world.agents:
        real = agent.stage

        async def staging(
            request: agent_pb2.StageRequest,
            name: str = agent.name,
            real: Callable[[agent_pb2.StageRequest], Awaitable[agent_pb2.StageResponse]] = real,
        ) -> agent_pb2.StageResponse:
            pem = request.certificate_pem
            fingerprint = pki.fingerprint(pki.load_cert_pem(pem))
            seen_at_stage[name] = {
                c.fingerprint
                for c in leader.store.list_certificates("server")
                if c.node == name and c.fingerprint == fingerprint
            }
            return await real(request)

        monkeypatch.setattr(agent, "stage", staging)
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert recorded == []
    for agent in world.agents:
        issued = server_certs(leader, agent.name)
        assert [c.fingerprint for c in issued] == [agent.fingerprint], agent.name
        assert seen_at_stage[agent.name] == {agent.fingerprint}, agent.name
    trail = [(a.kind, a.subject) for a in leader.audit()]
    assert sorted(s for k, s in trail if k == "certificate.issued.server") == sorted(ORDER)
    await leader.stop()


async def test_a_preflight_that_ends_while_the_rollout_aborts_records_no_certificate(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An abort lands while a node's preflight is in flight: its outcome is written while the
    rollout aborts, and the node is skipped. The certificate the preflight signed is neither
    recorded nor sent (``certs check-expiration`` would list it for good)."""
    leader = world.boot()
    bravo = world.agents["bravo"]
    control_during_preflight(leader, bravo, RolloutAction.ABORT, monkeypatch)
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.ABORTED
    assert node(row.records, "bravo").state is N.SKIPPED
    assert bravo.applied["create_csr"] == 1  # its preflight made the key and CSR
    assert not world.agents.calls_to("bravo", "stage")
    assert server_certs(leader, "bravo") == []
    assert not leader.engine.signed
    await leader.stop()


async def test_a_preflight_that_ends_while_the_rollout_pauses_leaves_the_stage_its_csr(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause lands while a node's preflight is in flight: its certificate is not recorded
    with the outcome (the rollout may be aborted before it resumes). On resume the stage asks
    CreateCSR (the agent answers with the CSR of the key it made), signs and records it, as
    a leader restarted since would: one certificate, the one staged."""
    leader = world.boot()
    bravo = world.agents["bravo"]
    real = control_during_preflight(leader, bravo, RolloutAction.PAUSE, monkeypatch)
    await leader.start()
    row = await leader.run(until=lambda r: node(r.records, "bravo").state is N.STAGING)
    await leader.engine.settle()
    assert server_certs(leader, "bravo") == []
    assert not world.agents.calls_to("bravo", "stage")
    monkeypatch.setattr(bravo, "preflight", real)
    await leader.control(RolloutAction.RESUME)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert [c.answer for c in world.agents.calls_to("bravo", "create_csr")] == ["replay"]
    issued = server_certs(leader, "bravo")
    assert [c.fingerprint for c in issued] == [bravo.fingerprint]
    await leader.stop()


async def test_the_preflight_s_certificate_is_the_stage_s_once_its_write_is_visible(
    world: World,
) -> None:
    """Review s28 L2: ``signed`` is filled as the preflight's outcome commits, before any
    reader can see the node in ``staging``: a pass on another wake that begins the stage
    then finds the certificate (filled after the write returned, such a stage asked
    CreateCSR and signed a second one). Looked at from the store's own commit listener,
    which runs as soon as the write is visible, before the engine's step resumes."""
    leader = world.boot()
    row = await leader.start()
    rid = row.rollout.id
    had: dict[str, bool] = {}

    def on_commit() -> None:
        kept = leader.schema.kept(rid)
        if kept is None:
            return
        for rec in kept.records:
            if rec.state is N.STAGING and rec.name not in had:
                had[rec.name] = (rid, rec.name) in leader.engine.signed

    leader.store.db.on_commit.append(on_commit)
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert had == dict.fromkeys(ORDER, True)
    assert world.agents.calls_to("bravo", "create_csr") == []
    await leader.stop()


async def test_a_node_enrolled_again_with_other_names_before_its_stage_is_staged_with_them(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s28 L3: the preflight signed bravo's certificate for the names enrolled then;
    bravo is enrolled again with one more DNS name before its stage (and its agent has it
    too). The stage does not send that certificate (the agent refuses it: "names differ",
    the node failed): it asks CreateCSR and signs with the names enrolled now. The one not
    sent is revoked once bravo is done (superseded)."""
    bravo = world.agents["bravo"]
    real = world.ca.sign_csr
    leader = world.boot()
    extra: dict[str, list[str]] = {}
    monkeypatch.setattr(
        FakeAgent,
        "names",
        property(
            lambda a: pki.Names.of(
                a.name, [a.address], [f"{a.name}.praxis.lan", *extra.get(a.name, [])]
            )
        ),
    )

    def enrolled_again_after(csr: Any, names: pki.Names, **kw: Any) -> Any:
        cert = real(csr, names, **kw)
        if names.common_name == "bravo" and not extra:  # the preflight's; then re-enrolled
            extra["bravo"] = ["bravo.example.org"]
            with leader.store.db.tx() as db:
                dns = json.dumps(list(bravo.names.dns))
                db.execute("UPDATE nodes SET dns_names = ? WHERE name = 'bravo'", (dns,))
        return cert

    monkeypatch.setattr(world.ca, "sign_csr", enrolled_again_after)
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert [c.answer for c in world.agents.calls_to("bravo", "stage")] == ["ok"]
    assert [c.answer for c in world.agents.calls_to("bravo", "create_csr")] == ["replay"]
    assert pki.names_of(bravo.staged[row.rollout.id]) == bravo.names
    issued = server_certs(leader, "bravo")
    assert [(c.fingerprint == bravo.fingerprint, c.revoke_reason) for c in issued] == [
        (False, "superseded"),
        (True, ""),
    ]
    await leader.stop()


async def test_a_stage_tried_again_after_no_answer_sends_the_preflight_s_certificate(
    world: World,
) -> None:
    """bravo's agent does not answer the first Stage (a TransientError): the stage is tried
    again with the certificate its preflight signed and recorded, not through CreateCSR
    with a second one (the stage took it out of ``signed`` before its call)."""
    leader = world.boot()
    await leader.start(max_parallel=1)
    await leader.run(until=lambda r: node(r.records, "bravo").state is N.STAGING)
    world.agents["bravo"].unreachable = 1
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    answers = [c.answer for c in world.agents.calls_to("bravo", "stage")]
    assert answers[0] == "unreachable" and answers[-1] == "ok", answers
    assert world.agents.calls_to("bravo", "create_csr") == []
    issued = server_certs(leader, "bravo")
    assert [c.fingerprint for c in issued] == [world.agents["bravo"].fingerprint]
    await leader.stop()


async def test_a_csr_the_preflight_cannot_sign_fails_the_preflight(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s28 L8: a CSR the CA refuses fails the preflight with the reason. The agent
    answers a later CreateCSR with the same CSR: leaving it to the stage only added a round
    trip before the same failure there."""
    real = world.ca.sign_csr

    def refusing(csr: Any, names: pki.Names, **kw: Any) -> Any:
        if names.common_name == "bravo":
            raise PKIError(PKIReason.BAD_SIGNATURE)
        return real(csr, names, **kw)

    monkeypatch.setattr(world.ca, "sign_csr", refusing)
    leader = world.boot()
    await leader.start(max_parallel=1)
    row = await leader.run(until=lambda r: node(r.records, "bravo").state is N.FAILED)
    assert node(row.records, "bravo").reason == (
        f"its CSR cannot be signed: {PKIReason.BAD_SIGNATURE.value}"
    )
    assert world.agents.calls_to("bravo", "create_csr") == []
    assert world.agents.calls_to("bravo", "stage") == []
    assert server_certs(leader, "bravo") == []
    await leader.stop()


async def test_an_agent_of_the_previous_release_is_staged_through_create_csr(
    world: World,
) -> None:
    """An agent that ignores ``make_csr`` (no CSR in its preflight answer) is asked with
    CreateCSR, as before; the others are not."""
    world.agents["bravo"].without_preflight_csr = True
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert [c.node for c in world.agents.calls if c.method == "create_csr"] == ["bravo"]
    await leader.stop()


async def test_a_leader_restarted_between_preflight_and_stage_asks_for_the_same_csr(
    world: World,
) -> None:
    """The preflight's CSR lives in the leader's memory only: a restarted leader asks with
    CreateCSR, and the agent answers with the CSR of the key it already made."""
    first = world.boot()
    await first.start(max_parallel=1)
    await first.run(until=lambda r: node(r.records, ORDER[0]).state is N.STAGING)
    await first.crash()
    second = world.boot()
    row = await second.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    asked = world.agents.calls_to(ORDER[0], "create_csr")
    assert [c.answer for c in asked] == ["replay"]
    assert world.agents[ORDER[0]].applied["create_csr"] == 1
    await second.stop()


def cert_reasons(leader: Leader, name: str) -> list[tuple[str, str]]:
    """The server certificates on record for node ``name``: (fingerprint, revoke reason)."""
    return [(c.fingerprint, c.revoke_reason) for c in server_certs(leader, name)]


async def test_a_preflight_s_certificate_a_restarted_leader_never_sent_is_revoked_at_the_abort(
    world: World,
) -> None:
    """Review s28 L1: the leader stops between bravo's preflight (its certificate recorded
    with the outcome) and its stage; the restarted leader is told to abort, and bravo is
    skipped. The certificate no node holds is revoked ("never delivered"), not left valid in
    `certs check-expiration` until it expires; the revocation list moves on, not urgently."""
    first = world.boot()
    await first.start(max_parallel=1)
    await first.run(until=lambda r: node(r.records, "bravo").state is N.STAGING)
    await first.crash()
    assert world.agents.calls_to("bravo", "stage") == []
    second = world.boot()
    recorded = cert_reasons(second, "bravo")
    assert [reason for _fp, reason in recorded] == [""]
    crl = second.store.revocations()
    await second.control(RolloutAction.ABORT)
    row = await second.run()
    assert row.rollout.state is R.ABORTED
    assert node(row.records, "bravo").state is N.SKIPPED
    assert world.agents.calls_to("bravo", "stage") == []
    assert cert_reasons(second, "bravo") == [(recorded[0][0], "never delivered")]
    after = second.store.revocations()
    assert after.number > crl.number and after.urgent == crl.urgent
    trail = [(a.kind, a.subject) for a in second.audit()]
    assert ("certificate.undelivered", "bravo") in trail
    await second.stop()


async def test_a_certificate_a_stage_in_flight_at_an_abort_signs_after_the_skip_is_revoked(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s28 (second) L1, left since: the stage takes the CreateCSR path (an agent that
    brings no CSR with its preflight; also a leader restarted, a pause, re-enrolled names);
    the admin aborts while its CreateCSR is in flight, and the write that skips bravo runs
    before the stage records the certificate it then signs. That certificate stayed valid
    on record (``certs check-expiration``) until it expired. Now the stage's record sees the
    node already ended: the certificate is revoked in the same write ("never delivered",
    not urgent) and never sent."""
    bravo = world.agents["bravo"]
    bravo.without_preflight_csr = True
    leader = world.boot()
    real = bravo.create_csr
    skipped: list[NodeState] = []

    async def meanwhile(request: agent_pb2.CreateCSRRequest) -> Any:
        await leader.control(RolloutAction.ABORT)
        await leader.engine.reconcile()  # the pass whose write skips bravo, stage in flight
        kept = leader.schema.kept(request.command.rollout_id)
        assert kept is not None
        skipped.append(node(kept.records, "bravo").state)
        return await real(request)

    monkeypatch.setattr(bravo, "create_csr", meanwhile)
    await leader.start()
    crl = leader.store.revocations()
    row = await leader.run()
    assert skipped == [N.SKIPPED]
    assert row.rollout.state is R.ABORTED
    assert node(row.records, "bravo").state is N.SKIPPED
    assert world.agents.calls_to("bravo", "stage") == []
    certs = cert_reasons(leader, "bravo")
    assert [reason for _fp, reason in certs] == ["never delivered"], certs
    after = leader.store.revocations()
    assert after.number > crl.number and after.urgent == crl.urgent
    trail = [(a.kind, a.subject) for a in leader.audit()]
    assert ("certificate.undelivered", "bravo") in trail
    await leader.stop()


async def test_a_node_rolled_back_keeps_the_certificate_it_staged_and_loses_the_one_it_did_not(
    world: World,
) -> None:
    """Review s28 L1: a restarted leader's stage of bravo signs a second certificate
    (CreateCSR); bravo's switch rolls back. The preflight's certificate, never sent, is
    revoked as bravo ends; the one it staged (and holds, inactive) is not: only what no node
    was given. Nodes never reached (skipped) have nothing recorded."""
    switch_rolls_back(world.agents["bravo"])
    first = world.boot()
    await first.start(max_parallel=1)
    await first.run(until=lambda r: node(r.records, "bravo").state is N.STAGING)
    await first.crash()
    second = world.boot()
    row = await second.run()
    assert row.rollout.state is R.HALTED
    assert states(row) == {"bravo": N.ROLLED_BACK, "charlie": N.SKIPPED, "alpha": N.SKIPPED}
    assert [c.answer for c in world.agents.calls_to("bravo", "create_csr")] == ["replay"]
    staged = pki.fingerprint(world.agents["bravo"].staged[row.rollout.id])
    certs = cert_reasons(second, "bravo")
    assert len(certs) == 2 and (staged, "") in certs, certs
    assert [r for fp, r in certs if fp != staged] == ["never delivered"]
    assert cert_reasons(second, "charlie") == cert_reasons(second, "alpha") == []
    await second.stop()


async def test_an_agent_that_lost_the_preflight_s_key_is_staged_with_a_new_one(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the agent no longer holds the key the preflight's CSR is of (its journal lost), the
    stage does not fail the node: it asks CreateCSR once, as before the merge."""
    bravo = world.agents["bravo"]
    real = bravo.stage
    forget = [True]

    async def forgetting(request: agent_pb2.StageRequest) -> agent_pb2.StageResponse:
        if forget and forget.pop():
            bravo.keys.clear()  # before its first stage
        return await real(request)

    monkeypatch.setattr(bravo, "stage", forgetting)
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert [c.answer for c in world.agents.calls_to("bravo", "stage")] == ["refused", "ok"]
    assert [c.answer for c in world.agents.calls_to("bravo", "create_csr")] == ["ok"]
    await leader.stop()


async def test_an_agent_holding_another_key_than_the_preflight_s_is_staged_with_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the agent's key is no longer the one the preflight's CSR is of (its journal lost and
    a key made again since), its Stage says "does not match the staged key": the stage asks
    CreateCSR once for that key's CSR, and the node is staged."""
    bravo = world.agents["bravo"]
    real = bravo.stage
    swap = [True]

    async def swapped(request: agent_pb2.StageRequest) -> agent_pb2.StageResponse:
        if swap and swap.pop():
            bravo.keys[request.command.rollout_id] = pki.generate_key()
        return await real(request)

    monkeypatch.setattr(bravo, "stage", swapped)
    leader = world.boot()
    await leader.start()
    row = await leader.run()
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert [c.answer for c in world.agents.calls_to("bravo", "stage")] == ["refused", "ok"]
    assert [c.answer for c in world.agents.calls_to("bravo", "create_csr")] == ["replay"]
    await leader.stop()


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        ("stale epoch 1: this node has seen epoch 2", grpc.StatusCode.FAILED_PRECONDITION),
        ("rollout {rid} is already switching this node", grpc.StatusCode.FAILED_PRECONDITION),
        ("the CA is not this cluster's CA (pin mismatch)", grpc.StatusCode.INVALID_ARGUMENT),
        ("the certificate was not issued by the cluster CA", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_a_stage_refused_for_another_reason_than_its_key_issues_one_certificate(
    world: World, monkeypatch: pytest.MonkeyPatch, refusal: str, code: grpc.StatusCode
) -> None:
    """Review L1: a Stage refused for a reason that has nothing to do with the preflight's key
    (the refusals of ``nodeagent/service.py`` ``Stage``, as ``AgentClient`` words them) fails the
    node with that refusal. The old code went round once more with CreateCSR: a second
    certificate signed and recorded that nobody uses, and the second error reported."""
    bravo = world.agents["bravo"]

    async def refusing(request: agent_pb2.StageRequest) -> agent_pb2.StageResponse:
        rid = request.command.rollout_id
        raise StepFailed(f"{refusal.format(rid=rid)} ({code.name})", code)

    monkeypatch.setattr(bravo, "stage", refusing)
    leader = world.boot()
    row = await leader.start(max_parallel=1)
    row = await leader.run(until=lambda r: node(r.records, "bravo").state is N.FAILED)
    reason = node(row.records, "bravo").reason
    assert reason == f"{refusal.format(rid=row.rollout.id)} ({code.name})"
    assert world.agents.calls_to("bravo", "create_csr") == []
    issued = server_certs(leader, "bravo")
    assert len(issued) == 1, issued
    await leader.stop()


async def test_a_stop_set_during_a_pass_ends_the_loop_without_waiting_for_a_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stop`` wakes the loop through ``wake``; a stop set while a pass ran had its wake
    cleared after the pass, and the loop then waited for the next tick (1 s) before it
    ended (found by review). Here the tick is an hour away: the loop ends at once."""
    monkeypatch.setattr("leader.engine.TICK_SECONDS", 3600)
    world = make_world(tmp_path, monkeypatch)
    engine = world.boot().engine
    stop = asyncio.Event()
    passes: list[int] = []
    closed: list[bool] = []

    async def reconcile() -> None:
        passes.append(len(passes))
        if len(passes) == 2:
            stop.set()  # told to stop while a pass runs, which goes on a little (a store
            for _ in range(5):  # hand-off): long enough for stop's wake to come in the pass
                await asyncio.sleep(0)

    async def close() -> None:
        closed.append(True)

    monkeypatch.setattr(engine, "reconcile", reconcile)
    monkeypatch.setattr(engine, "close", close)
    task = asyncio.create_task(engine.run(stop))
    for _ in range(20):  # the first pass, then the loop waits for a wake
        await asyncio.sleep(0)
    assert passes == [0] and not task.done()
    engine.wake.set()  # a second pass, during which stop is set
    for _ in range(20):
        await asyncio.sleep(0)
    assert passes == [0, 1]
    assert closed == [True] and task.done()
    await task


async def in_preflight(leader: Leader) -> tuple[RolloutRow, NodeRecord]:
    """The engine's first pass (``reconcile``) with its step tasks then cancelled, so that a
    test runs the step itself: the newest rollout and its node in preflight."""
    engine = leader.engine
    await engine.reconcile()
    tasks = list(engine.tasks.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    engine.tasks.clear()
    row = leader.schema.latest()
    assert row is not None
    [record] = [r for r in row.records if r.state is NodeState.PREFLIGHT]
    return row, record


async def test_a_step_does_not_start_on_what_a_write_under_way_is_changing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step task checks, before it runs, that its node still waits for it. While a write
    holds the store (here one that skips the node, as a pass does after an abort), that check
    waits for the write and sees it; a read of what the last write left (settled) ran the
    step on a node the write was just taking out of it (found by review)."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    await leader.start()
    engine = leader.engine
    row, record = await in_preflight(leader)  # bravo: in preflight, its step task stopped
    step = planner.StepAction(record.name, Step.PREFLIGHT, row.rollout.epoch)
    calls = len(world.agents.calls)

    # The write: parked under the store's lock at its first statement until the step's check
    # has looked.
    parked, proceed = threading.Event(), threading.Event()
    writer: list[threading.Thread] = []

    def park(_statement: str) -> None:
        if writer and threading.current_thread() is writer[0] and not parked.is_set():
            parked.set()
            proceed.wait(30)

    def skip() -> None:
        skipped = dataclasses.replace(record, state=NodeState.SKIPPED, reason="aborted")
        leader.schema.save_states(row, row.rollout, [skipped], world.clock.wall(), "engine")

    leader.store.db._db.set_trace_callback(park)
    writer.append(threading.Thread(target=skip))
    writer[0].start()
    assert parked.wait(30)

    async def run(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        proceed.set()  # the check hands its read to the store's thread: the write goes on
        return await hop(func, *args, **kwargs)

    monkeypatch.setattr(dbthread, "run", run)
    try:
        await engine._run_step(row, step)
    finally:
        proceed.set()
        writer[0].join(30)
        leader.store.db._db.set_trace_callback(None)
    assert world.agents.calls[calls:] == []  # the step did not run
    latest = leader.schema.latest()
    assert latest is not None and latest.node(record.name)[0].state is NodeState.SKIPPED


async def test_a_wake_during_a_pass_brings_another_pass_without_waiting_for_a_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that ends (or an admin command that arrives) while a pass runs wakes the engine;
    that wake was cleared after the pass, and what it brought waited for the next tick. Here
    the tick is an hour away: the wake during the second pass brings a third."""
    monkeypatch.setattr("leader.engine.TICK_SECONDS", 3600)
    world = make_world(tmp_path, monkeypatch)
    engine = world.boot().engine
    stop = asyncio.Event()
    passes: list[int] = []

    async def reconcile() -> None:
        passes.append(len(passes))
        if len(passes) == 2:
            await asyncio.sleep(0)  # the pass goes on (a store hand-off) ...
            engine.wake.set()  # ... while a step ends
            await asyncio.sleep(0)

    async def close() -> None:
        pass

    monkeypatch.setattr(engine, "reconcile", reconcile)
    monkeypatch.setattr(engine, "close", close)
    task = asyncio.create_task(engine.run(stop))
    for _ in range(20):
        await asyncio.sleep(0)
    assert passes == [0] and not task.done()
    engine.wake.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert passes == [0, 1, 2]  # and then it waits again
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_a_step_outcome_whose_write_planned_what_follows_brings_no_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's outcome is written with the plan that follows (``Engine._plan_next``: the
    next node's switch, the next node's start) and those steps begin at once; the loop is
    then not woken for it: its pass planned the same again and found nothing to persist
    (two plans per step outcome). Outcomes that move no node, or end the rollout, still
    wake it. The tick is an hour here: the rollout ends on wakes alone."""
    monkeypatch.setattr("leader.engine.TICK_SECONDS", 3600)
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    passes: list[int] = []
    real = leader.engine.reconcile

    async def reconcile() -> None:
        passes.append(len(passes))
        await real()

    monkeypatch.setattr(leader.engine, "reconcile", reconcile)
    await leader.start(max_parallel=1)
    row = await _run_loop(world, leader)
    assert row.rollout.state is RolloutState.COMPLETED, states(row)
    steps = [c for c in world.agents.calls if c.method in ("preflight", "stage", "switch")]
    assert len(steps) == 3 * len(NODES)
    assert len(passes) <= 3 * len(NODES)  # 13 when every outcome woke the loop (3 nodes)


async def test_a_step_begun_by_the_write_that_moved_its_node_reads_no_rollout_first(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step looks at the stored rollout before it runs (was its result saved meanwhile by an
    earlier run?), often on the store's thread while the write before holds the store. A
    step that the write of another step's outcome begins (its node moved into the step's
    state by that very write: a switch, the next node's preflight) has no earlier run: it
    runs on that write's row. The others still look."""
    leader = world.boot()
    engine = leader.engine
    # Counted at the source: every read a step makes before it runs goes through
    # ``_look_again`` (a frame-name filter on ``kept``/``get`` could count none: ``get``
    # runs on the store's thread).
    looks: list[str] = []
    runs: list[tuple[str, Step, bool]] = []
    real_look, real_run = engine._look_again, engine._run_step

    async def look_again(rollout_id: str) -> RolloutRow | None:
        looks.append(rollout_id)
        return await real_look(rollout_id)

    async def run_step(row: RolloutRow, step: planner.StepAction, *, fresh: bool = False) -> None:
        runs.append((step.node, step.step, fresh))
        await real_run(row, step, fresh=fresh)

    monkeypatch.setattr(engine, "_look_again", look_again)
    monkeypatch.setattr(engine, "_run_step", run_step)
    await leader.start(max_parallel=1)
    row = await leader.run()
    assert row.rollout.state is RolloutState.COMPLETED, states(row)
    assert [c.node for c in world.agents.calls if c.method == "switch"] == list(ORDER)
    # preflight, stage, switch, confirm of each node, each run once (12)
    assert len(runs) == 4 * len(ORDER), runs
    not_fresh = [r for r in runs if not r[2]]
    # Lower bound: the loop's pass begins at least the first node's preflight, which looks.
    # If the counter stopped counting, this fails.
    assert len(looks) >= 1
    assert len(looks) == len(not_fresh)  # each step not begun fresh looks once, no other
    assert len(looks) == 7, runs  # 12 (every step looked first) at aeb78c3
    await leader.stop()


async def counted_to(passes: Sequence[object], count: int) -> None:
    """Until the loop made ``count`` passes (``passes``, one entry each), 1 s at most."""
    for _ in range(500):
        if len(passes) >= count:
            return
        await asyncio.sleep(0.002)


async def test_an_idle_loop_makes_no_pass_each_tick_only_when_the_store_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no live rollout the loop does not pass at each tick (a leader idles for months,
    and a pass a second was its largest fixed cost with no agent): it waits for a wake, a
    write that moves the store's generation on, or ``IDLE_TICK_SECONDS``. A heartbeat's
    routine record brings no pass. Here the tick is a millisecond: on 77bb3da the loop made
    a pass each millisecond."""
    monkeypatch.setattr("leader.engine.TICK_SECONDS", 0.001)
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    engine = leader.engine
    passes: list[bool | None] = []
    reconcile = engine.reconcile

    async def counted() -> None:
        await reconcile()
        passes.append(getattr(engine, "idle", None))  # (77bb3da had no such flag)

    monkeypatch.setattr(engine, "reconcile", counted)
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        await counted_to(passes, 1)
        for _ in range(50):  # 50 ticks
            await asyncio.sleep(0.002)
        assert passes == [True]
        with leader.schema.db.tx(routine=True) as db:  # a heartbeat's record
            db.execute("UPDATE nodes SET agent_port = agent_port")
        for _ in range(50):
            await asyncio.sleep(0.002)
        assert passes == [True]
        with leader.schema.db.tx() as db:  # anything else: an enrolment, a revocation, …
            db.execute("UPDATE nodes SET agent_port = agent_port")
        await counted_to(passes, 2)
        for _ in range(50):
            await asyncio.sleep(0.002)
        assert passes == [True, True]
        await leader.start()  # wakes the loop, which passes at each tick while it is live
        await counted_to(passes, 3)
        assert passes[2] is False
    finally:
        stop.set()
        await task
        leader.store.close()


async def test_a_write_during_the_first_idle_pass_brings_the_next_pass_without_a_wake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass learns that it is idle only as it reads the store; a write that commits before
    (the loop was busy, so ``_store_changed`` did not wake it) is seen by the generation the
    loop compares after the pass: the next pass comes at once, not at ``IDLE_TICK_SECONDS``.
    Here the write is the first pass's own (a non-routine write in ``_forget_ended_keys``),
    and no wake is set (review 1b, finding 6: without that comparison this test fails)."""
    monkeypatch.setattr("leader.engine.TICK_SECONDS", 0.001)
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    engine = leader.engine
    passes: list[bool] = []
    woken: list[bool] = []
    reconcile, forget = engine.reconcile, engine._forget_ended_keys

    async def counted() -> None:
        await reconcile()
        passes.append(engine.idle)
        woken.append(engine.wake.is_set())

    async def writing(active: RolloutRow | None) -> None:
        if not passes:  # the first pass, before it knew it was idle
            assert not engine.idle
            with leader.schema.db.tx() as db:  # an enrolment, a revocation, …
                db.execute("UPDATE nodes SET agent_port = agent_port")
        await forget(active)

    monkeypatch.setattr(engine, "reconcile", counted)
    monkeypatch.setattr(engine, "_forget_ended_keys", writing)
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        await counted_to(passes, 2)
        for _ in range(50):  # 50 ticks: no further pass (the second wrote nothing)
            await asyncio.sleep(0.002)
        assert passes == [True, True]
        assert woken == [False, False]  # nothing woke the loop: the generation brought it
    finally:
        stop.set()
        await task
        leader.store.close()


async def test_when_quiet_reads_a_nodes_report_whole_even_when_the_next_one_commits_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``finalize --when-quiet`` starts a node once its reports show no http client for the
    quiet time: from its last http sighting to the newest sighting of anyone. Both come from
    the same stored report, and must be read from the same one. On b5d33c0 the engine read
    the node's report summary (``last_http_at``) and its clients in two reads: the agent's
    next report (both workstations seen again, one on http) committed between them, and the
    pass took the new sightings against the old summary's last http time as 12 s of quiet.
    It finalized a node whose workstation was still writing on http (session 32: after a
    leader restart, whose first reports commit while the engine's first passes read)."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    now = world.clock.wall()
    node = next(iter(NODES))

    def report(at: dt.datetime) -> None:
        seen = [
            Client(node, "http", "10.9.0.2", "stayer", at - dt.timedelta(minutes=5), at),
            Client(node, "https", "10.9.0.1", "mover", at - dt.timedelta(minutes=5), at),
        ]
        leader.schema.record_clients(
            node, seen, window_seconds=86400, source="refserver", problem="", now=at
        )

    report(now - dt.timedelta(seconds=13))  # the stored report: the stayer on http 13 s ago
    reads: list[str] = []

    async def interleaved(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        reads.append(getattr(func, "__name__", "?"))
        if len(reads) == 2:  # the agent's next report commits between the pass's reads
            report(now - dt.timedelta(seconds=1))
        return await hop(func, *args, **kwargs)

    monkeypatch.setattr(dbthread, "run", interleaved)
    pending = NodeRecord(name=node, state=NodeState.PENDING)
    row = SimpleNamespace(
        rollout=SimpleNamespace(id="q1"), meta=SimpleNamespace(when_quiet=8), records=(pending,)
    )
    try:
        held = await leader.engine._held_for_quiet(cast(RolloutRow, row))
        assert held == {node}, reads  # the stayer wrote on http 1 s ago: not quiet
    finally:
        leader.store.close()


async def test_when_quiet_holds_a_node_whose_report_may_have_left_an_http_client_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent reports at most ``MAX_CLIENTS`` clients, the most recently seen, and the leader
    keeps as many per node. With more, a workstation on http can be left out of a report: its
    sighting never moved the node's last http time, and ``--when-quiet`` took the node for
    quiet while that workstation still wrote on http. A node whose stored clients are at the
    cap may miss one: who is on http there cannot be told, as with a report naming a problem
    (the node waits; a plain finalize refuses it; the schema says why)."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    now = world.clock.wall()
    node = next(iter(NODES))
    ago = dt.timedelta

    def report(at: dt.datetime, clients: list[Client]) -> None:
        leader.schema.record_clients(
            node, clients, window_seconds=86400, source="refserver", problem="", now=at
        )

    stayer = Client(node, "http", "10.9.0.2", "stayer", now - ago(minutes=5), now - ago(seconds=60))
    report(now - ago(seconds=59), [stayer])
    # The stayer writes on http again 5 s ago; since then 256 others were seen on https: the
    # agent's next report carries those 256, the most recently seen, and not the stayer.
    others = [
        Client(node, "https", f"10.9.1.{i}", f"ws-{i}", now - ago(seconds=4), now - ago(seconds=1))
        for i in range(256)
    ]
    report(now, others)
    pending = NodeRecord(name=node, state=NodeState.PENDING)
    row = SimpleNamespace(
        rollout=SimpleNamespace(id="q1"), meta=SimpleNamespace(when_quiet=30), records=(pending,)
    )
    try:
        held = await leader.engine._held_for_quiet(cast(RolloutRow, row))
        assert held == {node}  # the stayer wrote on http 5 s ago: not quiet
        _clients, infos = leader.schema.clients_report([node])
        assert "cannot be told" in infos[node].problem, infos[node]
    finally:
        leader.store.close()


async def test_when_quiet_counts_quiet_time_from_a_nodes_first_report_not_a_day_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``finalize --when-quiet 1h`` of a node whose agent first reported 3 minutes ago, with
    nothing seen on http since: not quiet for an hour as far as anyone knows. The engine took
    the start of its agent's first reported window (the reference server says a day) as the
    start of its quiet, though the reference server has watched only since it started, and
    finalized at once a node known for seconds, right after a workstation wrote on http there
    (review s64 M). A node whose agent has reported for two hours is quiet enough."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    now = world.clock.wall()
    new, old = sorted(NODES)[:2]
    ago = dt.timedelta

    def report(node: str, at: dt.datetime) -> None:
        seen = [Client(node, "https", "10.9.0.1", "mover", at - ago(seconds=30), at)]

        def write(db: sqlite3.Connection) -> None:
            write_clients(
                db, node, seen, window_seconds=86400, source="refserver", problem="", now=at
            )

        leader.store.queue_write(node, write)
        leader.store.write_queued()  # as the heartbeat's group commit: a report to this leader

    report(new, now - ago(minutes=3))
    report(old, now - ago(hours=2))
    for node in (new, old):
        report(node, now)
    records = tuple(NodeRecord(name=n, state=NodeState.PENDING) for n in (new, old))
    row = SimpleNamespace(
        rollout=SimpleNamespace(id="q1"), meta=SimpleNamespace(when_quiet=3600), records=records
    )
    try:
        held = await leader.engine._held_for_quiet(cast(RolloutRow, row))
        assert held == {new}  # known for 3 minutes: not an hour of quiet yet
    finally:
        leader.store.close()


@pytest.mark.parametrize(("behind", "quiet"), [(0, 600), (100, 60)])
async def test_a_when_quiet_switch_its_agent_refuses_puts_the_node_back_with_the_sighting(
    world: World, monkeypatch: pytest.MonkeyPatch, behind: int, quiet: int
) -> None:
    """``finalize --when-quiet``: the gate lets a node start by the view its agent reported,
    which the agent reuses for ``clients_refresh``; just before the switch the agent reads its
    server's clients afresh, sees a workstation on http 3 s ago and refuses (nothing began).
    The node goes back to pending with the agent's reason, not ``rolled_back`` (which halted
    the finalize), and the sighting the agent read is stored with the refusal: the gate holds
    the node by it, pass after pass, while the others are finalized (review s64 M).

    ``behind``: the node's clock is that many seconds behind the leader's (the preflight
    allows up to 100), its answer's time (``NodeStatus.agent_time``) and the sighting's on
    it. The sighting is stored on the leader's clock, as a heartbeat's report is
    (``service.clock_shift``): it was stored that much older (review s64 L1), and under a
    ``--when-quiet`` shorter than that the gate let the node go again at the next pass, to
    be refused again."""
    monkeypatch.setattr(changes, "dual_check", changes.outside_check)  # fakes know one scheme
    leader = world.boot()
    phase_1, _row = await transitional_phase_1(leader)
    for agent in world.agents:  # a fake node knows one scheme: each says it is dual
        preflight = agent.preflight

        async def dual(
            request: agent_pb2.PreflightRequest, real: Any = preflight
        ) -> agent_pb2.PreflightResponse:
            answer: agent_pb2.PreflightResponse = await real(request)
            del answer.server.schemes[:]
            answer.server.schemes.extend(["http", "https"])
            return answer

        monkeypatch.setattr(agent, "preflight", dual)
    now = world.clock.wall()
    ago = dt.timedelta

    def report(node: str, at: dt.datetime) -> None:
        seen = [Client(node, "https", "10.9.0.1", "ws-mover", at - ago(seconds=30), at)]

        def write(db: sqlite3.Connection) -> None:
            write_clients(
                db, node, seen, window_seconds=86400, source="refserver", problem="", now=at
            )

        leader.store.queue_write(node, write)
        leader.store.write_queued()

    for node in ORDER:  # each known for two hours, nobody on http as far as its reports show
        report(node, now - ago(hours=2))
        report(node, now)
    held = ORDER[0]
    agent = world.agents[held]
    why = f"not quiet: ws-front (10.9.0.2) was seen on http 3s ago, within --when-quiet {quiet}s"
    agent.refuse["switch"] = why
    status = agent.get_status
    sighted = world.clock.wall() - ago(seconds=3)
    off = ago(seconds=behind)  # the node's clock less the leader's, negated

    async def fresh(request: agent_pb2.GetStatusRequest, timeout: float = 30.0) -> Any:
        answer: agent_pb2.NodeStatus = await status(request, timeout)
        if behind:  # (an agent that sends no time: as before)
            answer.agent_time.FromDatetime(world.clock.wall() - off)
        seen = sighted - off
        answer.server.clients.CopyFrom(
            clients_message(
                ClientsView(
                    (ClientSeen("http", "10.9.0.2", "ws-front", seen, seen, 1),),
                    86400,
                    "refserver",
                )
            )
        )
        return answer

    monkeypatch.setattr(agent, "get_status", fresh)
    finalize = await leader.commands.finalize(phase_1.rollout.id, ADMIN, when_quiet=quiet)

    def others_done(row: RolloutRow) -> bool:
        return row.rollout.id == finalize.rollout.id and all(
            states(row)[n] is N.DONE for n in ORDER[1:]
        )

    row = await leader.run(others_done)
    for _ in range(5):  # the gate holds it by the stored sighting
        row = await leader.one_pass()
    record = row.node(held)[0]
    assert record.state is N.PENDING and record.reason.startswith(why), record
    assert row.rollout.state is R.RUNNING
    asked = [
        c for c in world.agents.calls_to(held, "switch") if c.rollout_id == finalize.rollout.id
    ]
    assert [c.answer for c in asked] == ["refused"]  # once: the gate holds it since
    _clients, infos = leader.schema.clients_report([held])
    assert infos[held].last_http_at == sighted
    await leader.stop()


async def test_a_finalize_reads_the_cut_off_nodes_while_one_is_prepared_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev49fin: the engine read the cut-off nodes (``Store.cut_off_nodes``) only while
    a finalize had pending nodes, so a cut-off node prepared ahead (staged: the next node,
    ``prepare_ahead``) with none pending behind it went on to its switch against the revoked
    agent. They are read while any node is not yet at its switch; not once every node is."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    names = sorted(NODES)[:2]
    try:
        leader.store.cut_off_nodes = lambda: frozenset({names[1]})  # type: ignore[method-assign]
        for state, read in (
            (NodeState.PREFLIGHT, True),
            (NodeState.STAGING, True),
            (NodeState.STAGED, True),
            (NodeState.SWITCHING, True),  # s50: one mid-switch needs attention
            (NodeState.DONE, False),
        ):
            records = (
                NodeRecord(name=names[0], state=NodeState.DONE),
                NodeRecord(name=names[1], state=state),
            )
            row = SimpleNamespace(
                rollout=SimpleNamespace(id="f1", change=Change.FINALIZE, freeze=FreezeMode.NODE),
                census=planner.Census.of(records),
                records=records,
            )
            got = await leader.engine._cut_off(cast(RolloutRow, row))
            assert got == ({names[1]} if read else set()), state
    finally:
        leader.store.close()


def cut_off_agents(world: World, leader: Leader, dialled: list[str] | None = None) -> set[str]:
    """A set whose nodes are cut off (their agents' certificates revoked): the store says so
    (``Store.cut_off_nodes``) and the agents' pool refuses to dial them, as ``AgentPool.get``
    does (``cut_off_error``; each refusal noted in ``dialled``). Empty at first: a test adds
    the nodes it cuts off when it wants."""
    cut: set[str] = set()
    leader.store.cut_off_nodes = lambda: frozenset(cut)  # type: ignore[method-assign]
    real_get = world.agents.get

    async def get(name: str) -> Any:
        if name in cut:
            if dialled is not None:
                dialled.append(name)
            raise cut_off_error(name)
        return await real_get(name)

    world.agents.get = get  # type: ignore[method-assign]
    return cut


async def test_a_node_cut_off_while_a_scope_frozen_rollout_runs_is_never_asked_again(
    world: World,
) -> None:
    """s50: a node whose agent was cut off (its certificate revoked) while an enable-tls ran
    under ``--freeze scope`` was switched as if nothing happened, and its freeze lease renewed
    every third of a lease (a lost machine dialled for good). Now its agent is asked nothing
    more: not switched, not renewed, not unfrozen (its lease runs out on its own); the
    rollout halts, charlie skipped with a reason naming `tlsroll nodes remove`, and the
    rollout's note says what to do. The node switching meanwhile (none here) would go on."""
    from leader.rollout_core import cut_off_reason

    leader = world.boot(freeze_lease=6)
    cut = cut_off_agents(world, leader)
    await leader.start(freeze=FreezeMode.SCOPE)
    row = await leader.run(lambda r: r.node("bravo")[0].state is N.DONE)
    charlie = row.node("charlie")[0]
    assert charlie.scope_frozen and charlie.state not in TERMINAL_NODE_STATES, charlie
    cut.add("charlie")
    since = len(world.agents.calls)
    row = await leader.run()
    assert row.rollout.state is R.HALTED, row.rollout
    by = {r.name: r for r in row.records}
    assert (by["charlie"].state, by["charlie"].reason) == (
        N.SKIPPED,
        cut_off_reason(Change.ENABLE_TLS, "charlie"),
    )
    assert by["bravo"].state is N.DONE
    assert by["alpha"].state is N.SKIPPED and by["alpha"].reason == "rollout halted"
    assert [c for c in world.agents.calls[since:] if c.node == "charlie"] == []
    assert row.meta.reason.startswith("halted: agent cut off (its certificate revoked)")
    assert "`tlsroll nodes remove charlie`" in row.meta.reason, row.meta.reason
    assert not any(r.scope_frozen for r in row.records if r.name != "charlie")
    await leader.stop()


async def test_a_cut_off_frozen_node_holds_no_switch_of_the_others_and_is_never_renewed(
    world: World,
) -> None:
    """Review of s50 H2 and L4: under ``--freeze scope`` a node cut off (its agent's certificate
    revoked) after it was done and frozen is never renewed, so its freeze lapses; the switch's
    gate (``_ensure_step``), ``_lapsed`` and ``_note_waiting`` still counted it: the next
    node waited "for the scope freeze of bravo" for good, the others kept frozen. Now they
    leave it out and the rollout completes; the node's agent is never dialled, and no freeze
    step (a renewal) of it ever runs (not even one ``_run_step`` then turns away)."""
    leader = world.boot(freeze_lease=6)
    dialled: list[str] = []
    cut = cut_off_agents(world, leader, dialled)
    engine = leader.engine
    real_run_step = engine._run_step
    ran: list[Step] = []

    def run_step(row: RolloutRow, step: planner.StepAction, **kw: Any) -> Any:
        if step.node in cut:
            ran.append(step.step)
        return real_run_step(row, step, **kw)

    engine._run_step = run_step  # type: ignore[method-assign]
    await leader.start(freeze=FreezeMode.SCOPE)
    row = await leader.run(lambda r: r.node("bravo")[0].state is N.DONE)
    assert row.node("bravo")[0].scope_frozen, row.node("bravo")
    assert row.node("charlie")[0].state not in TERMINAL_NODE_STATES
    cut.add("bravo")
    world.clock.advance(10)  # bravo's confirmation surely lapsed (lease 6 s)
    row = await leader.run(passes=300)
    assert row.rollout.state is R.COMPLETED, (row.rollout, row.records)
    assert states(row) == {"alpha": N.DONE, "bravo": N.DONE, "charlie": N.DONE}
    assert not any(r.reason.startswith(WAITS_FOR_FREEZE) for r in row.records), row.records
    assert not any(r.scope_frozen for r in row.records), row.records
    assert dialled == [], dialled
    assert Step.FREEZE not in ran, ran
    await leader.stop()


@pytest.mark.parametrize("lost", ["bravo", "alpha"])  # the first node, the last
@pytest.mark.parametrize("change", [Change.ENABLE_TLS, Change.DISABLE_TLS])
async def test_a_node_cut_off_mid_switch_halts_the_rollout_over_its_budget(
    world: World, change: Change, lost: str
) -> None:
    """Review of s50 H1 and M2: a node whose agent was cut off (its certificate revoked) once
    its switch was sent needs attention, and the budget (0) was counted before the plan
    failed it: the last node's rollout completed all the same, and the next node started in
    that pass. Now it halts in that pass, its note naming the node; for the way back, with
    `tlsroll nodes remove` as the way on for the node (not "stop its agent", pointless for
    a machine lost or stolen)."""
    from leader.rollout_core import cut_off_mid_switch

    leader = world.boot()
    if change is Change.DISABLE_TLS:
        await leader.start()
        assert states(await leader.run()) == ALL_DONE
    cut = cut_off_agents(world, leader)

    async def revoke() -> None:
        cut.add(lost)

    # Revoked as the outcome before its switch is saved (its stage's; the way back stages
    # nothing: its preflight's): that write moves it on into its switch (as the last pass
    # read the cut-off nodes), which its agent then never answers.
    before = N.STAGED if change is Change.ENABLE_TLS else N.STAGING
    leader.schema.cue = Cue(when=lambda records: node(records, lost).state is before, action=revoke)
    await leader.start(change)
    row = await leader.run()
    assert cut == {lost}  # (the cue ran)
    assert row.rollout.state is R.HALTED, row.rollout
    by = {r.name: r for r in row.records}
    assert (by[lost].state, by[lost].reason) == (N.NEEDS_ATTENTION, cut_off_mid_switch(lost))
    after = ORDER[ORDER.index(lost) + 1 :]
    assert {n: by[n].state for n in after} == dict.fromkeys(after, N.SKIPPED)
    note = row.meta.reason
    assert note.startswith(f"halted: {lost} needs_attention: {cut_off_mid_switch(lost)}"), note
    if change is Change.DISABLE_TLS:
        assert note.endswith(
            f"next: {lost}: agent cut off (its certificate revoked), it never comes back: "
            f"`tlsroll nodes remove {lost}`; then tlsroll rollout rollback again"
        ), note
        assert "stop its agent" not in note, note
    await leader.stop()


async def test_a_cut_off_switch_held_at_the_gate_is_unsent_while_the_rollout_runs(
    world: World,
) -> None:
    """Review of s50 L1: a switch held at the scope freeze's gate whose agent has none
    (``_gated_switch``) is left out of the plan's ``unsent`` while the rollout runs (it
    waits); once its agent is cut off it never gets it, so it is named (and skipped)."""
    leader = world.boot()
    engine = leader.engine
    row = cast(RolloutRow, SimpleNamespace(rollout=SimpleNamespace(id="r1")))
    engine.unsent[("r1", "bravo")] = False  # held while running
    engine.unsent[("r1", "charlie")] = False
    engine.unsent[("r2", "alpha")] = True  # another rollout's
    assert engine._unsent(row) == frozenset()
    engine.cut_off = frozenset({"bravo", "alpha"})
    assert engine._unsent(row) == {"bravo"}
    leader.store.close()


async def test_a_cut_off_switch_held_at_the_gate_is_named_in_the_halt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev50e M1 (fixed in 19ccf0c with no test of its own): charlie's switch is held
    at the scope freeze's gate (bravo, frozen, is away: its freeze not confirmed) and its
    agent never got it; charlie's agent is then cut off. The pass skips charlie as a node
    before its switch (``skip_unsent``) and halts; the halt's note named no node ("before its
    switch: ;"): it took the cut-off nodes from the plain skips only. It names charlie, with
    `tlsroll nodes remove charlie`, and charlie is never sent a switch."""
    from leader.rollout_core import cut_off_halt, cut_off_reason

    world = make_world(tmp_path, monkeypatch)
    lease = 6
    await died_as_charlie_s_switch_went_out(world, lease)
    world.agents["bravo"].unreachable = 10**6
    seen = len(world.agents.calls)
    second = world.boot(freeze_lease=lease)
    cut = cut_off_agents(world, second)
    row = await second.run(
        until=lambda r: "scope freeze of bravo" in node(r.records, "charlie").reason, passes=400
    )
    assert node(row.records, "charlie").state is N.SWITCHING, states(row)
    assert second.engine.unsent.get((row.rollout.id, "charlie")) is False  # held, not sent
    cut.add("charlie")
    row = await second.run(until=lambda r: r.rollout.state is not R.RUNNING, passes=20)
    assert row.rollout.state in (R.HALTING, R.HALTED), row.rollout
    charlie = node(row.records, "charlie")
    assert (charlie.state, charlie.reason) == (
        N.SKIPPED,
        cut_off_reason(Change.ENABLE_TLS, "charlie"),
    ), charlie
    note = row.meta.reason
    assert note == cut_off_halt(row.rollout, ["charlie"]), note
    assert "before its switch: charlie; next: `tlsroll nodes remove charlie`" in note, note
    assert not [c for c in world.agents.calls[seen:] if c.method == "switch"]
    await second.stop()


@pytest.mark.parametrize("how", ["cut_off_mid_switch", "switch_rolled_back"])
async def test_a_node_failing_in_the_pass_of_a_cut_off_halt_is_named_beside_it(
    world: World, how: str
) -> None:
    """Review rev50e L: a halt names the nodes that failed and the nodes cut off before their
    switches, whichever halted the rollout in that pass. bravo fails (its agent cut off during
    its switch: it needs attention; or its switch rolled back) and charlie, not yet started, is
    cut off: the pass that skips charlie halts. The note named only one side: charlie alone
    (a cut-off halt; bravo, needing attention, unnamed) or bravo alone (a failure halt; charlie
    unnamed, whose retry refuses it until `nodes remove`). It names both now: bravo with its
    state and reason, charlie as cut off before its switch, and `tlsroll nodes remove` for
    each cut-off node before the retry."""
    from leader.rollout_core import cut_off_mid_switch, cut_off_reason

    leader = world.boot()
    cut = cut_off_agents(world, leader)
    lost = {"bravo", "charlie"} if how == "cut_off_mid_switch" else {"charlie"}
    if how == "cut_off_mid_switch":
        # Revoked as bravo's stage outcome is saved: that write moves bravo into its switch,
        # which its agent never answers (as the mid-switch test above); charlie is pending.
        before = N.STAGED
        failed = (N.NEEDS_ATTENTION, cut_off_mid_switch("bravo"))
    else:
        world.agents["bravo"].switch_outcome = TxnOutcome.ROLLED_BACK
        world.agents["bravo"].switch_reason = "verify: port 8443 closed"
        before = N.ROLLED_BACK

    async def revoke() -> None:
        cut.update(lost)

    leader.schema.cue = Cue(
        when=lambda records: node(records, "bravo").state is before, action=revoke
    )
    await leader.start()
    row = await leader.run(until=lambda r: r.rollout.state is not R.RUNNING)
    assert cut == lost  # (the cue ran)
    assert row.rollout.state in (R.HALTING, R.HALTED), row.rollout
    by = {r.name: r for r in row.records}
    bravo = by["bravo"]
    if how == "switch_rolled_back":
        failed = (N.ROLLED_BACK, bravo.reason)
        assert bravo.reason, bravo
    assert (bravo.state, bravo.reason) == failed, bravo
    assert (by["charlie"].state, by["charlie"].reason) == (
        N.SKIPPED,
        cut_off_reason(Change.ENABLE_TLS, "charlie"),
    )
    note = row.meta.reason
    assert note.startswith(f"halted: bravo {bravo.state.value}: {bravo.reason}; "), note
    assert "agent cut off (its certificate revoked) before its switch: charlie; next: " in note
    remove = (
        "`tlsroll nodes remove NAME` for each"
        if how == "cut_off_mid_switch"
        else "`tlsroll nodes remove charlie`"
    )
    assert f"{remove}, then finish the nodes left: tlsroll rollout retry {row.rollout.id}" in (
        note
    ), note
    await leader.stop()


@pytest.mark.parametrize("where", ["mid_switch", "before_its_switch"])
async def test_a_node_cut_off_while_a_halt_drains_is_named_in_the_halts_note(
    world: World, where: str
) -> None:
    """Review rev51b L4: the halt's note is made in the pass that decides the halt. A node in
    flight then (its switch, or its preflight, ending while the halt drains) whose agent is
    cut off (its certificate revoked) after it was named by no note: it needs attention (cut
    off mid-switch) or is skipped (before its switch), and the note said only "retry", which
    refuses it until `tlsroll nodes remove`. The note now names it, with that way out before
    the retry, beside the node that halted the rollout. bravo's switch rolls back (budget 0:
    the halt) while charlie's switch (or preflight) gets no answer, and alpha's preflight
    (still in flight once charlie has ended); charlie is then cut off. The pass that steps it
    writes the note again, not a step's outcome (``_plan_next``), and the rollout's end
    keeps it."""
    from leader.rollout_core import cut_off_mid_switch, cut_off_reason

    leader = world.boot()
    cut = cut_off_agents(world, leader)
    switch_rolls_back(world.agents["bravo"])
    world.agents["alpha"].unreachable = 10**6
    if where == "mid_switch":
        switch_gets_no_answer(world, "charlie")
        held = N.SWITCHING
    else:
        world.agents["charlie"].unreachable = 10**6
        held = N.PREFLIGHT
    row = await leader.start(max_parallel=3)
    row = await leader.run(until=lambda r: r.rollout.state is not R.RUNNING)
    assert row.rollout.state is R.HALTING, (row.rollout, states(row))
    assert states(row) == {"bravo": N.ROLLED_BACK, "charlie": held, "alpha": N.PREFLIGHT}
    assert "charlie" not in row.meta.reason, row.meta.reason  # (the note made at the halt)
    # A step's outcome written after a pass read charlie cut off, before that pass's own
    # write: the plan made in that write (``_plan_next``) leaves charlie to the pass, whose
    # write makes the note again; else charlie moved there, unnamed, and the pass found
    # nothing to write.
    leader.engine.cut_off = frozenset({"charlie"})
    assert leader.engine._plan_next([], world.clock.wall(), row) == ((), [])
    cut.add("charlie")
    row = await leader.run(until=lambda r: node(r.records, "charlie").state is not held)
    assert row.rollout.state is R.HALTING, (row.rollout, states(row))
    drained = row.meta.reason
    world.agents["alpha"].unreachable = 0
    row = await leader.run()
    assert row.rollout.state is R.HALTED, (row.rollout, states(row))
    assert node(row.records, "alpha").state is N.SKIPPED
    assert row.meta.reason == drained
    charlie = node(row.records, "charlie")
    if where == "mid_switch":
        assert (charlie.state, charlie.reason) == (N.NEEDS_ATTENTION, cut_off_mid_switch("charlie"))
        named = f"charlie needs_attention: {cut_off_mid_switch('charlie')}; "
    else:
        assert (charlie.state, charlie.reason) == (
            N.SKIPPED,
            cut_off_reason(Change.ENABLE_TLS, "charlie"),
        )
        named = "agent cut off (its certificate revoked) before its switch: charlie; "
    bravo = node(row.records, "bravo")
    note = row.meta.reason
    assert note.startswith(f"halted: bravo rolled_back: {bravo.reason}; {named}next: "), note
    # No node switched (bravo rolled back, charlie cut off, alpha skipped): no way back to
    # http offered, which `rollout rollback` would refuse, "switched no node" (review s63
    # faults, L1).
    assert note.endswith(
        "next: charlie: agent cut off (its certificate revoked): `tlsroll nodes remove charlie`,"
        f" then finish the nodes left: tlsroll rollout retry {row.rollout.id}"
    ), note
    await leader.stop()


async def a_step_waiting_on_a_silent_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[World, Leader, RolloutRow, planner.StepAction]:
    """A rollout whose first node is in preflight (its step task cancelled: the test looks
    for it), its agent heard by this leader's store once, then silent for three heartbeat
    intervals."""
    world = make_world(tmp_path, monkeypatch)
    leader = world.boot()
    leader.store.bind_clocks(world.clock.wall, world.clock.monotonic)
    await leader.start()
    engine = leader.engine
    row, record = await in_preflight(leader)
    leader.store.heartbeat(
        record.name, "test", now=world.clock.wall(), features=features.AGENT_FEATURES
    )
    world.clock.advance(3 * engine.heartbeat_interval)
    return world, leader, row, planner.StepAction(record.name, Step.PREFLIGHT, row.rollout.epoch)


def test_the_test_only_silent_after_only_shortens_the_first_look() -> None:
    """``TEST_SILENT_AFTER_ENV`` brings a test leader's first look at a waiting step's agent
    sooner; anything else there, a longer wait included, leaves it at ``SILENT_AFTER``."""
    env, after = engine_module.TEST_SILENT_AFTER_ENV, engine_module.SILENT_AFTER
    assert engine_module.silent_after({}) == after == 10.0
    assert engine_module.silent_after({env: "3"}) == 3.0
    assert engine_module.silent_after({env: "10"}) == after
    for bad in ("", "soon", "0", "-1", "nan", "inf", "10.5", "3600"):
        assert engine_module.silent_after({env: bad}) == after, bad


async def test_a_look_for_an_agent_s_silence_reads_no_node_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s60, L3: the look at a waiting step's agent (``_Silence``, every 1-2.5 s per
    waiting step) read the node from SQLite for one value that memory holds: when the agent
    was last heard (``Store.last_heard``). It reads no node now, and the note says the time
    memory has."""
    world, leader, row, step = await a_step_waiting_on_a_silent_agent(tmp_path, monkeypatch)
    heard = leader.store.get_node(step.node).last_heartbeat
    assert heard is not None
    reads: list[str] = []
    real_get_node = leader.store.get_node

    def get_node(name: str) -> Any:
        reads.append(name)
        return real_get_node(name)

    monkeypatch.setattr(leader.store, "get_node", get_node)
    began = world.clock.wall()
    await leader.engine._look_for_silence(row.rollout.id, step, began)
    assert reads == []
    latest = leader.schema.latest()
    assert latest is not None
    reason = latest.node(step.node)[0].reason
    assert reason == engine_module.silent_note(Step.PREFLIGHT, heard, began, world.clock.wall())


async def test_a_look_at_a_heard_agent_that_says_it_needs_the_admin_notes_that(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 70 (keptfreeze): a step's agent heard on its heartbeats while the step waits,
    saying the node needs the admin (its transaction held on a journal it cannot write): the
    look puts that on the node, not "unreachable" nor nothing; once it no longer says so, the
    note goes."""
    world, leader, row, step = await a_step_waiting_on_a_silent_agent(tmp_path, monkeypatch)
    leader.store.heartbeat(
        step.node, "test", now=world.clock.wall(), features=features.AGENT_FEATURES
    )  # heard again: not silent
    said = {step.node: "needs the admin: its journal cannot be written (disk full)"}
    leader.engine.live_server = lambda name: said.get(name, "")

    def reason() -> str:
        latest = leader.schema.latest()
        assert latest is not None
        return latest.node(step.node)[0].reason

    await leader.engine._look_for_silence(row.rollout.id, step, world.clock.wall())
    assert reason() == (
        f"{said[step.node]}; its preflight waits: the leader keeps asking and records the"
        " outcome when it goes on"
    )
    said[step.node] = "http"
    await leader.engine._look_for_silence(row.rollout.id, step, world.clock.wall())
    assert reason() == ""


async def test_a_look_for_an_agent_s_silence_on_a_full_store_is_the_store_s_trouble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s60, L2: a look at a waiting step's agent that failed to write its note (a
    full disk) logged ``step.silence_look_failed`` at each look, every 1-2.5 s per waiting
    step, for as long as the disk stayed full. It is the store's trouble now
    (``StoreHealth``: logged once a minute at most, ``during`` the look), as a step's is."""
    world, leader, row, step = await a_step_waiting_on_a_silent_agent(tmp_path, monkeypatch)
    engine = leader.engine
    engine.store_health = StoreHealth(world.clock.wall, world.clock.monotonic)

    async def full_disk(*_: Any) -> None:
        full = sqlite3.OperationalError("database or disk is full")
        full.sqlite_errorname = "SQLITE_FULL"  # as SQLite sets it
        raise full

    monkeypatch.setattr(engine, "_save_node", full_disk)
    silence = engine_module._Silence(engine, row.rollout.id, step, world.clock.wall(), 3600)
    with capture_logs() as logs:
        for _ in range(3):
            await silence._look()
            world.clock.advance(2)
    await silence.stop()
    events = [e["event"] for e in logs]
    assert "step.silence_look_failed" not in events, logs
    [failing] = [e for e in logs if e["event"] == "store.writes_failing"]
    assert failing["during"] == "step.silence_look_failed" and failing["node"] == step.node
    assert engine.store_health.trouble is not None


NO_TIMES = [(2**62, 0), (0, -1), (253402300799, 0), (-62135596800, 0)]
"""Timestamps an agent may send that are no time (beyond year 9999, negative nanos) or absurd
(the last second of 9999, the first of year 1)."""


@pytest.mark.parametrize("field", ["freeze_started_at", "freeze_ended_at"])
@pytest.mark.parametrize(("seconds", "nanos"), NO_TIMES)
async def test_an_agent_s_freeze_time_that_is_no_time_is_taken_as_not_sent(
    world: World, monkeypatch: pytest.MonkeyPatch, field: str, seconds: int, nanos: int
) -> None:
    """Session 67 (peers' times): a transaction state whose freeze time was out of protobuf's
    range crashed the step at every pass (``step.crashed``, ValueError), the node held
    switching for good; one in range but absurd was stored, and the window taken from it. Now
    a time more than a year from the leader's is not recorded, with one warning per node and
    field, and the rollout completes."""
    real = FakeAgent._message

    def absurd(agent: FakeAgent, txn: Any) -> agent_pb2.Transaction:
        message = real(agent, txn)
        if message.outcome != agent_pb2.TRANSACTION_OUTCOME_PENDING:
            began = message.freeze_started_at.ToDatetime(tzinfo=dt.UTC)
            message.freeze_ended_at.FromDatetime(began + dt.timedelta(seconds=2.5))
        if field == "freeze_started_at" or message.HasField("freeze_ended_at"):
            getattr(message, field).CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
        return message

    monkeypatch.setattr(FakeAgent, "_message", absurd)
    for agent in world.agents:
        agent.txn_seconds = 1.0  # read pending more than once
    leader = world.boot()
    await leader.start(max_parallel=1)
    with capture_logs() as logs:
        row = await leader.run(passes=400)
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert not [e for e in logs if e["event"] == "step.crashed"]
    for name in NODES:
        detail = row.node(name)[1]
        assert getattr(detail, field) is None, (name, detail)
        for other in ("freeze_started_at", "freeze_ended_at"):
            if (at := getattr(detail, other)) is not None:
                assert abs(at - world.clock.wall()) < dt.timedelta(days=1), (name, detail)
    refused = Counter(
        (e["node"], e["field"]) for e in logs if e["event"] == "transaction.time_refused"
    )
    assert refused == Counter({(n, field): 1 for n in NODES})
    await leader.stop()


@pytest.mark.parametrize(("seconds", "nanos"), NO_TIMES)
async def test_the_certificate_s_end_is_the_one_the_leader_signed_not_the_agent_s_word(
    world: World, monkeypatch: pytest.MonkeyPatch, seconds: int, nanos: int
) -> None:
    """Session 67 (peers' times): the leader recorded the ``not_after`` an agent's Stage
    answered: one out of protobuf's range crashed the stage at every pass (the node held
    staging for good), a far one was stored and shown. The end recorded is now that of the
    certificate the leader signed and sent."""
    real = FakeAgent.stage

    async def absurd(agent: FakeAgent, request: agent_pb2.StageRequest) -> Any:
        answer = await real(agent, request)
        answer.not_after.CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
        return answer

    monkeypatch.setattr(FakeAgent, "stage", absurd)
    leader = world.boot()
    await leader.start(max_parallel=1)
    with capture_logs() as logs:
        row = await leader.run(passes=400)
    assert row.rollout.state is R.COMPLETED and states(row) == ALL_DONE
    assert not [e for e in logs if e["event"] == "step.crashed"]
    for agent in world.agents:
        signed = agent.staged[row.rollout.id].not_valid_after_utc
        assert row.node(agent.name)[1].cert_not_after == signed, agent.name
    await leader.stop()


async def test_an_abort_unfreezes_the_scope_though_a_node_died_mid_switch(world: World) -> None:
    """Review s69 revfreeze M1: under ``--freeze scope`` a node whose machine died in the middle
    of its switch stays ``switching`` for good (its outcome is unknown: it cannot fail for want
    of an answer). The settled rollout alone unfroze the scope, so every other node went on
    refusing entries, renewed by the leader, abort or not: the practice could not work until
    the admin revoked the dead machine's agent. An aborted (or halted) rollout now lifts the
    scope freeze of every node not in flight at once; the dead node's switch is still
    followed."""
    lease = 6
    bravo = world.agents["bravo"]
    switch = bravo.switch

    async def switch_then_die(request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction:
        txn = await switch(request)
        bravo.unreachable = 10**6  # its machine died right after it began the switch
        bravo.switch = switch  # type: ignore[method-assign]  # once
        return txn

    bravo.switch = switch_then_die  # type: ignore[method-assign]
    leader = world.boot(freeze_lease=lease)
    await leader.start(freeze=FreezeMode.SCOPE)
    with capture_logs() as logs:
        await leader.run(
            until=lambda r: (
                node(r.records, "bravo").reason.startswith(UNKNOWN)
                and any(e["event"] == "freeze.unanswered" for e in logs)
            )
        )
        for _ in range(20):  # still unanswered: told once
            await leader.one_pass()
    told = [e for e in logs if e["event"] == "freeze.unanswered"]
    assert [e["node"] for e in told] == ["bravo"], told  # who is told: once per lapse
    assert f"tlsroll rollout abort {told[0]['rollout_id']}" in told[0]["detail"]
    assert world.agents["charlie"].frozen and world.agents["alpha"].frozen
    await leader.control(RolloutAction.ABORT)
    alive = (world.agents["charlie"], world.agents["alpha"])
    row = await leader.run(until=lambda _r: not any(a.frozen for a in alive), passes=200)
    assert row.rollout.state is R.ABORTING, states(row)
    assert node(row.records, "bravo").state is N.SWITCHING  # still followed
    # L2: its note stays the switch's (a renewal's failure wrote over it).
    assert node(row.records, "bravo").reason.startswith(UNKNOWN), node(row.records, "bravo")
    for name in ("charlie", "alpha"):
        assert not node(row.records, name).scope_frozen, row.records
    for _ in range(50):  # nothing freezes them again while bravo's switch waits
        row = await leader.one_pass()
    assert row.rollout.state is R.ABORTING, states(row)
    assert not any(a.frozen for a in alive)
    assert all(not node(row.records, n).scope_frozen for n in ("charlie", "alpha"))
    bravo.unreachable = 0  # back: its switch's outcome ends the rollout, bravo unfrozen
    row = await leader.run(passes=200)
    assert row.rollout.state is R.ABORTED, states(row)
    assert not any(a.frozen for a in world.agents)
    await leader.stop()


async def test_a_node_counts_as_unanswered_only_once_lapsed_for_a_renewal_period(
    world: World,
) -> None:
    """Review s69 revfreeze M1, the guard: a leader restarted mid-switch has seen no
    confirmation, so every frozen node counts as lapsed at first; a draining rollout lifts the
    others' scope freeze only for nodes in flight still unconfirmed a renewal period later
    (``Engine._unanswered``), which a live agent never is."""
    lease = 6
    leader = world.boot(freeze_lease=lease)
    engine = leader.engine
    assert engine._unanswered("r1", frozenset({"a", "b"})) == frozenset()
    world.clock.advance(lease / 3 - 0.5)
    assert engine._unanswered("r1", frozenset({"a", "b"})) == frozenset()
    assert engine._unanswered("r1", frozenset({"a"})) == frozenset()  # b confirmed again
    world.clock.advance(0.5)
    assert engine._unanswered("r1", frozenset({"a", "b"})) == frozenset({"a"})  # b anew
    world.clock.advance(lease / 3)
    assert engine._unanswered("r1", frozenset({"a", "b"})) == frozenset({"a", "b"})
    await leader.stop()


async def test_a_staged_password_made_under_the_scrypt_hook_is_refused_by_a_leader_without_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s75 revpwkdf: a leader run with ``TLSROLL_TEST_KDF_N`` (conftest's 256) stages a
    verifier under that N; started again without the hook it takes no such verifier
    (``password.least_n``). ``_digests`` skipped the unreadable newest version, so a
    change-password rollout planned with the older version's digest: every node on it was
    "already done: the staged password is live", which the newest one was not, and
    ``CheckPassword`` answered INTERNAL. Both are refused (FAILED_PRECONDITION), saying why
    and to set the password again; nothing is created."""
    from leader.admin_service import AdminService
    from leader.service import LeaderState
    from tlsroll import kdfhook
    from tlsroll.v1 import admin_pb2

    leader = world.boot()
    await leader.start()
    await leader.run()
    weak = json.loads(VERIFIER_2) | {"n": 256}
    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "256")
    await leader.commands.stage_password(json.dumps(weak), ADMIN)  # version 2, under the hook
    monkeypatch.delenv(kdfhook.TEST_KDF_N_ENV)  # the leader, started again without it
    enabled = leader.schema.latest()
    assert enabled is not None

    with pytest.raises(PlanError) as refused:
        await leader.start(Change.CHANGE_PASSWORD)
    said = str(refused.value)
    assert "password version 2" in said and "tlsroll password set" in said, said
    assert kdfhook.TEST_KDF_N_ENV in said, said
    assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION
    after = leader.schema.latest()
    assert after is not None and after.rollout.id == enabled.rollout.id  # none created

    class Aborted(Exception):
        pass

    class Context:
        code: grpc.StatusCode | None = None
        details = ""

        async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
            self.code, self.details = code, details
            raise Aborted

    service = AdminService(
        LeaderState(leader.store, world.ca, world.clock.wall, 1), leader.commands, leader.schema
    )
    context = Context()
    with pytest.raises(Aborted):
        await service.CheckPassword(admin_pb2.CheckPasswordRequest(), context)  # type: ignore[arg-type]
    assert context.code is grpc.StatusCode.FAILED_PRECONDITION, context.details
    assert "password version 2" in context.details and "tlsroll password set" in context.details
    await leader.stop()
