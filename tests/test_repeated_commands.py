"""Rollout commands given twice, crossed, or left by their caller (audit s39race: H3, M3, M4),
in-process on a real SchemaStore (SQLite file) and the real Commands and AdminService; the
engine harness of tests/test_engine.py where a rollout has to run."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from leader import byo, planner
from leader.commands import RolloutRequest
from leader.observe import FirstSteps
from leader.rollout_core import (
    TERMINAL_ROLLOUT_STATES,
    Change,
    NodeObservation,
    NodeState,
    RolloutAction,
    RolloutEvent,
    RolloutState,
    Scope,
    Strategy,
)
from leader.schema_store import (
    AlreadyRetried,
    RolloutBusy,
    RolloutMeta,
    RolloutRow,
    SchemaStore,
)
from leader.service import ERRORS
from tests.cluster import wait_until
from tlsroll.rpc import status_for

NOW = dt.datetime(2026, 12, 3, 6, 0, tzinfo=dt.UTC)
ADMIN = "admin:test"


def rollout(
    schema: SchemaStore,
    rollout_id: str,
    change: Change,
    names: Sequence[str],
    *,
    retry_of: str = "",
    strategy: Strategy = Strategy.DIRECT,
    finalizes: str = "",
) -> RolloutRow:
    leader = "alpha" if "alpha" in names else "a"
    made, nodes = planner.plan_rollout(
        rollout_id=rollout_id,
        change=change,
        scope=Scope.of_nodes(names),
        enrolled=dict.fromkeys(names, True),
        leader=leader,
        epoch=schema.next_epoch(),
        strategy=strategy,
    )
    meta = RolloutMeta(created_at=NOW, started_by=ADMIN, leader_node=leader, finalizes=finalizes)
    verifier = '{"v": 1}' if change is Change.ENABLE_TLS else None
    return schema.create(
        made.with_event(RolloutEvent.START), nodes, meta, NOW, verifier, retry_of=retry_of
    )


def settle(schema: SchemaStore, row: RolloutRow, done: Collection[str]) -> RolloutRow:
    """The rollout ends: ``done`` switched, the others failed (halted) or none (completed)."""
    records = [
        replace(r, state=NodeState.DONE if r.name in done else NodeState.FAILED)
        for r in row.records
    ]
    head = row.rollout
    if len(done) < len(records):
        head = head.with_event(RolloutEvent.FAILURE_BUDGET_EXCEEDED)
    head = head.with_event(RolloutEvent.NODES_SETTLED)
    return schema.save_states(row, head, records, NOW, "engine")


class Agents:
    """``Commands.observe`` for nodes on https: every call to the agents is counted."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def __call__(
        self,
        names: Sequence[str],
        *,
        warm: Collection[str],
        first: FirstSteps | None,
        edits: bool = False,
        way_back: bool = False,
        change: Change | None = None,
    ) -> dict[str, NodeObservation]:
        self.asked.append(list(names))
        return {
            n: NodeObservation(reachable=True, schemes=("https",), cert_from_ca=True) for n in names
        }


# --- H3: a rollout is retried once ----------------------------------------------------------


def test_a_rollout_is_retried_once_even_when_two_retries_cross(tmp_path: Path) -> None:
    """Two `rollout retry R` planned at the same time both found R not retried; the store
    itself refuses the second (FAILED_PRECONDITION at the admin API), whatever state the
    first is in, and writes nothing. The retry may itself be retried."""
    schema = SchemaStore(tmp_path / "s.sqlite3")
    first = settle(schema, rollout(schema, "r1", Change.ROTATE_CERT, ["a", "b", "c"]), {"a"})
    assert first.rollout.state is RolloutState.HALTED
    second = rollout(schema, "r2", Change.ROTATE_CERT, ["b", "c"], retry_of="r1")
    assert schema.retried_by("r1") == ("r2", "running")
    settle(schema, second, {"b"})  # halted again: c failed
    with pytest.raises(AlreadyRetried) as refused:
        rollout(schema, "r3", Change.ROTATE_CERT, ["b", "c"], retry_of="r1")
    assert str(refused.value) == (
        "rollout r1 was already retried by r2 (halted); to carry on where it stopped: "
        "tlsroll rollout retry r2; see: tlsroll schema show"
    )
    assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION
    assert schema.get("r3") is None and schema.retried_by("r1") == ("r2", "halted")
    third = rollout(schema, "r3", Change.ROTATE_CERT, ["c"], retry_of="r2")  # a retry's retry
    settle(schema, third, {"c"})
    assert schema.retried_by("r2") == ("r3", "completed")
    schema.close()


async def test_a_second_retry_switches_no_node_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s39race H3: `rollout retry R` after R's retry R2 completed started R3, which
    rotated the nodes R2 had rotated a second time (each restarted again). Refused now, in
    one line naming R2 and its state, before any agent is asked, and nothing is created."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands = leader_.schema, leader_.commands
    first = rollout(schema, "r1", Change.ROTATE_CERT, ["alpha", "bravo", "charlie"])
    settle(schema, first, {"bravo"})
    retried = await commands.retry("r1", ADMIN)
    assert retried.rollout.order == ("charlie", "alpha")
    settle(schema, retried, {"charlie", "alpha"})
    before = schema.latest()
    agents = Agents()
    commands.observe = agents
    with pytest.raises(
        AlreadyRetried,
        match=rf"^rollout r1 was already retried by {retried.rollout.id} \(completed\); "
        r"see: tlsroll schema show$",
    ):
        await commands.retry("r1", ADMIN)
    assert schema.latest() == before and agents.asked == []
    await leader_.stop()


# --- M4: a start refused because another rollout runs says so, asking no agent --------------


async def test_a_start_retry_or_finalize_beside_a_running_rollout_asks_no_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s39race M4: a start refused because another rollout runs asked every agent first,
    and with nodes busy switching said "cannot ask the agent of node1 ..." instead of naming
    the rollout. The running rollout is checked first (and again in the create)."""
    from tests.test_engine import make_world

    leader_ = make_world(tmp_path, monkeypatch).boot()
    schema, commands = leader_.schema, leader_.commands
    agents = Agents()
    commands.observe = agents
    halted = settle(schema, rollout(schema, "r1", Change.ROTATE_CERT, ["bravo"]), set())
    running = rollout(schema, "r2", Change.ROTATE_CERT, ["alpha"])
    assert running.rollout.state is RolloutState.RUNNING
    busy = (
        r"^rollout r2 is running; one rollout at a time per cluster "
        r"\(wait for it, or: tlsroll rollout abort r2\)$"
    )
    with pytest.raises(RolloutBusy, match=busy):
        await commands.start(RolloutRequest(Change.ROTATE_CERT, Scope.cluster()), ADMIN)
    with pytest.raises(RolloutBusy, match=busy):
        await commands.retry(halted.rollout.id, ADMIN)
    # Paused, it never ends by waiting: the way on is resume or abort (review s64 trans L4).
    paused = schema.save_states(
        running, running.rollout.with_event(RolloutEvent.PAUSE), running.records, NOW, "admin"
    )
    with pytest.raises(
        RolloutBusy,
        match=r"^rollout r2 is paused; one rollout at a time per cluster \(resume it: "
        r"tlsroll rollout resume r2, or end it: tlsroll rollout abort r2\)$",
    ):
        await commands.start(RolloutRequest(Change.ROTATE_CERT, Scope.cluster()), ADMIN)
    running = schema.save_states(
        paused, paused.rollout.with_event(RolloutEvent.RESUME), paused.records, NOW, "admin"
    )
    settle(schema, running, {"alpha"})
    # A transitional phase 1 awaiting finalize, its finalize running: a second finalize.
    phase1 = rollout(schema, "t1", Change.ENABLE_TLS, ["charlie"], strategy=Strategy.TRANSITIONAL)
    dual = [replace(r, state=NodeState.DUAL) for r in phase1.records]
    schema.save_states(phase1, phase1.rollout.with_event(RolloutEvent.NODES_DUAL), dual, NOW, "e")
    rollout(schema, "f1", Change.FINALIZE, ["charlie"], finalizes="t1")
    # A finalize may wait days for quiet workstations: "wait for it" is no way on.
    with pytest.raises(
        RolloutBusy,
        match=r"^rollout f1 is running; one rollout at a time per cluster \(a finalize may "
        r"wait long for each node's workstations to leave http; end it: tlsroll rollout "
        r"abort f1\)$",
    ):
        await commands.finalize("t1", ADMIN, force=True)
    assert agents.asked == []
    latest = schema.latest()
    assert latest is not None and latest.rollout.id == "f1"
    await leader_.stop()


async def test_rollout_start_s_dry_run_beside_a_running_rollout_asks_no_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev58a M2: `rollout start`'s dry run (``PlanRollout``) asked every agent before
    it said another rollout runs: with a node's agent stopped mid-switch it took 5 s and said
    "cannot ask the agent of node2 … bring the agent up" (or "nothing to do" for a node a
    running way back was about to take back). With ``refuse_if_busy`` (what the CLI's start
    sends) it answers ``busy`` at once, nothing planned; `tlsroll plan` (without) still plans,
    with the warning; a way back beside a rollout awaiting finalize is not refused."""
    import types

    from leader.admin_service import AdminService
    from leader.cli.rollout import rollout_request
    from leader.commands import Planned
    from leader.rollout_core import NodeRecord, Rollout
    from leader.service import LeaderState
    from tests.fake_agent import START
    from tests.test_engine import make_world, open_store
    from tlsroll.v1 import admin_pb2
    from tlsroll.wire import CHANGE

    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    planned: list[object] = []
    rollout = Rollout(
        id="r3", change=Change.ROTATE_CERT, scope=Scope.cluster(), order=("alpha",), epoch=1
    )

    async def plan(request: object) -> Planned:
        planned.append(request)  # what asks the agents
        return Planned(rollout, (NodeRecord("alpha", NodeState.PENDING),))

    state = [RolloutState.RUNNING]
    active = types.SimpleNamespace(
        rollout=types.SimpleNamespace(id="r2", state=None, change=Change.ROTATE_CERT)
    )

    def current() -> object:
        active.rollout.state = state[0]
        return active

    service = AdminService(
        LeaderState(store, world.ca, lambda: START, 1),
        # (blocked_at_once: asked by the plan since review s67 rev2 M3; none blocked here)
        types.SimpleNamespace(plan=plan, blocked_at_once=lambda rollout, nodes: None),  # type: ignore[arg-type]
        types.SimpleNamespace(  # type: ignore[arg-type]
            active=current, clients_report=lambda names: ([], {})
        ),
    )
    request = rollout_request("cluster", None, 1, "node", "rotate-cert")
    request.refuse_if_busy = True
    reply = await service.PlanRollout(request, None)  # type: ignore[arg-type]
    assert reply.busy.startswith("rollout r2 is running; one rollout at a time"), reply.busy
    assert not reply.HasField("rollout") and planned == []
    request.refuse_if_busy = False  # `tlsroll plan`: the plan, marked busy
    reply = await service.PlanRollout(request, None)  # type: ignore[arg-type]
    assert reply.busy and reply.rollout.id == "r3" and len(planned) == 1
    assert any("cannot start until it has ended" in w for w in reply.warnings)
    state[0] = RolloutState.AWAITING_FINALIZE  # a way back beside it is planned
    back = admin_pb2.RolloutRequest(
        change=CHANGE.wire(Change.DISABLE_TLS),
        freeze=request.freeze,
        max_parallel=1,
        refuse_if_busy=True,
    )
    reply = await service.PlanRollout(back, None)  # type: ignore[arg-type]
    assert not reply.busy and len(planned) == 2
    store.close()


# --- M3: a command runs to its end when its caller goes away --------------------------------


async def test_a_start_whose_caller_went_away_after_its_commit_still_runs_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s39race M3: gRPC cancels the handler of a call whose client goes away (Ctrl-C,
    a closed terminal). Cancelled right after its commit, StartRollout never logged
    rollout.started nor handed a --cert-dir rollout's keys to the engine, whose stages then
    failed ("the leader holds no key from --cert-dir"). Here the call is cancelled at that very
    point (the create has committed): the start still logs, keeps the keys, and the first
    node stages the certificate it was given."""
    from leader.admin_service import AdminService
    from leader.cli.rollout import rollout_request
    from leader.service import LeaderState
    from tests.byo_certs import key_pem, leaf, make_ca, pem
    from tests.fake_agent import START
    from tests.test_engine import VERIFIER_1, make_world
    from tlsroll.v1 import admin_pb2

    world = make_world(tmp_path, monkeypatch)
    practice = make_ca("Praxis CA", now=START)
    files = {}
    for agent in world.agents:  # as the node's own names (the fake agent compares them)
        ips, dns = list(agent.names.ips), list(agent.names.dns)
        cert, key = leaf(practice, ips, dns, now=START, cn=agent.name)
        files[agent.name] = byo.NodeMaterial(agent.name, pem(cert), key_pem(key), 0o600)
    leader_ = world.boot()
    leader_.commands.vault = leader_.engine.vault  # as the daemon wires them
    service = AdminService(
        LeaderState(leader_.store, world.ca, world.clock.wall, 1), leader_.commands, leader_.schema
    )
    request = rollout_request("cluster", None, 1, "node", "enable-tls")
    request.auth_verifier_json = VERIFIER_1
    request.cert_dir.CopyFrom(
        admin_pb2.CertDir(
            ca_pem=practice.pem,
            nodes=[
                admin_pb2.NodeCertificate(
                    node=m.node,
                    chain_pem=m.chain_pem,
                    private_key_pem=m.key_pem,
                    key_file_mode=0o600,
                )
                for m in files.values()
            ],
        )
    )
    call: list[asyncio.Task[Any]] = []
    hop = asyncio.to_thread  # the harness's

    async def create_then_caller_gone(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        result = await hop(func, *args, **kwargs)
        if getattr(func, "__name__", "") == "create":
            call[0].cancel()  # the client went away while the create committed
            await asyncio.sleep(0)  # (the cancellation lands where the thread's await ends)
        return result

    monkeypatch.setattr(asyncio, "to_thread", create_then_caller_gone)
    with capture_logs() as logs:
        call.append(asyncio.ensure_future(service.StartRollout(request, None)))  # type: ignore[arg-type]
        with pytest.raises(asyncio.CancelledError):
            await call[0]
        while service.carried_on:  # the start, carried on without its caller
            await asyncio.wait(set(service.carried_on))
    monkeypatch.setattr(asyncio, "to_thread", hop)
    started = [e for e in logs if e["event"] == "rollout.started"]
    assert len(started) == 1 and started[0]["own_certificates"] is True
    [finished] = [e for e in logs if e["event"] == "admin.finished_without_caller"]
    assert finished["method"] == "StartRollout" and finished["outcome"] == "done"
    rollout_id = started[0]["rollout_id"]
    for name in files:
        assert leader_.engine.vault.get(rollout_id, name) is not None
    # The first node stages the certificate it was given (the fake agents' outside check
    # knows only the cluster CA's certificates: the confirm after it is not this test's).
    first = leader_.engine.vault.get(rollout_id, "bravo")
    row = await leader_.run()
    assert row.rollout.id == rollout_id
    assert not any("holds no key" in r.reason for r in row.records), row.records
    [bravo] = [a for a in world.agents if a.name == "bravo"]
    assert bravo.applied["stage"] == 1 and first is not None
    await leader_.stop()


async def test_a_control_whose_caller_went_away_is_logged_as_it_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal met by a command whose caller is gone is logged (its one line), not lost."""
    from leader.admin_service import AdminService
    from leader.service import LeaderState
    from leader.wire import ROLLOUT_ACTION
    from tests.test_engine import make_world
    from tlsroll.v1 import admin_pb2

    world = make_world(tmp_path, monkeypatch)
    leader_ = world.boot()
    service = AdminService(
        LeaderState(leader_.store, world.ca, world.clock.wall, 1), leader_.commands, leader_.schema
    )
    gate = asyncio.Event()
    hop = asyncio.to_thread

    async def held(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await hop(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", held)
    request = admin_pb2.ControlRolloutRequest(action=ROLLOUT_ACTION.wire(RolloutAction.PAUSE))
    with capture_logs() as logs:
        call = asyncio.ensure_future(service.ControlRollout(request, None))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        gate.set()
        while service.carried_on:
            await asyncio.wait(set(service.carried_on))
    [finished] = [e for e in logs if e["event"] == "admin.finished_without_caller"]
    assert finished["outcome"] == "refused" and finished["error"] == "NoRolloutYet"
    assert finished["message"] == "no rollout yet; start one with: tlsroll rollout start"
    monkeypatch.setattr(asyncio, "to_thread", hop)
    await leader_.stop()


# --- M3 with real daemons -------------------------------------------------------------------


@pytest.mark.timeout(300)  # two nodes up (a minute on a busy machine) and one rollout
def test_a_real_start_whose_caller_gave_up_still_starts_and_its_stages_find_the_keys(
    tmp_path: Path,
) -> None:
    """Audit s39race M3 with a real leader and agents: a `rollout start --cert-dir` whose
    caller goes away while the leader is at it (here: its deadline passes while the leader
    waits for its store, which the test holds locked; as a client that went away, gRPC
    cancels the handler). Before, the rollout was committed once the store was free but its
    start went no further: no rollout.started, no keys for its stages, which failed ("the
    leader holds no key from --cert-dir"). Now it runs to its end: logged, and each node
    serves the certificate it was given."""
    import sqlite3

    from leader.cli.password import verifier_json
    from leader.cli.rollout import cert_dir_message, rollout_request
    from tests.byo_certs import make_ca, pem, write_dir
    from tests.test_byo import close, newest, real_leaf, served, two_nodes
    from tlsroll.defaults import HTTPS_PORT
    from tlsroll.v1 import admin_pb2_grpc

    cluster, nodes = two_nodes(tmp_path)
    try:
        practice = make_ca("Praxis CA")
        issued = {n.name: real_leaf(practice, n) for n in nodes}
        d = write_dir(
            tmp_path / "certs", practice, {k: (pem(c), key) for k, (c, key) in issued.items()}
        )
        request = rollout_request("cluster", None, 1, "node", "enable-tls")
        request.auth_verifier_json = verifier_json("the-practice-password-for-m3")
        request.cert_dir.CopyFrom(cert_dir_message(d))
        held = sqlite3.connect(cluster.data_dir / "leader.sqlite3", isolation_level=None)
        try:
            held.execute("BEGIN EXCLUSIVE")  # the leader's create waits for it (10 s at most)
            with grpc.insecure_channel(f"unix:{cluster.admin_socket}") as channel:
                stub = admin_pb2_grpc.AdminStub(channel)
                with pytest.raises(grpc.RpcError) as gave_up:
                    stub.StartRollout(request, timeout=3)
            assert gave_up.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # The store stays held until the leader has seen its caller go: released at once,
            # the start could end before gRPC cancelled its handler (a loaded machine), and
            # nothing would have carried on without its caller (the CI flake of ci48e).
            wait_until(
                lambda: any(
                    e.get("event") == "admin.caller_gone" and e.get("method") == "StartRollout"
                    for e in cluster.leader.log_events()
                ),
                30,
                "the leader saw its caller go",
            )
        finally:
            held.execute("ROLLBACK")
            held.close()

        def ended() -> dict[str, Any] | None:
            r = newest(cluster)
            return r if r is not None and r["state"] in ("completed", "halted", "aborted") else None

        wait_until(
            lambda: ended() is not None, 120, "the rollout started without its caller ending"
        )
        r = ended()
        assert r is not None and r["state"] == "completed", r
        events = cluster.leader.log_events()
        started = [e for e in events if e.get("event") == "rollout.started"]
        assert [e["rollout_id"] for e in started] == [r["id"]], started
        assert started[0]["own_certificates"] is True
        [gone] = [e for e in events if e.get("event") == "admin.finished_without_caller"]
        assert gone["method"] == "StartRollout" and gone["outcome"] == "done"
        for node in nodes:
            assert served(node.address, HTTPS_PORT, practice.pem) == issued[node.name][0]
    finally:
        close(cluster, nodes)


# --- s69 revrace: the password version the admin confirmed ----------------------------------


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    """The servicer context as far as ``map_errors`` uses it: ``abort`` raises."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


async def test_a_change_password_start_applies_the_version_confirmed_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s69 revrace (M): `rollout start --change change-password` showed "applies
    password version 2" (or checked `--password-version 2` against its plan) and then asked
    the leader to start; a second admin's `password set` in between (allowed: no rollout runs)
    had the start apply version 3, which the first admin never confirmed, and nodes took a
    password they did not know of. The start names the version confirmed (``auth_version``)
    and is refused if another is the newest, nothing created; named again, it applies it."""
    from leader.admin_service import AdminService
    from leader.cli.rollout import rollout_request
    from leader.service import LeaderState
    from tests.test_engine import VERIFIER_2, make_world, verifier

    world = make_world(tmp_path, monkeypatch)
    leader_ = world.boot()
    await leader_.start()  # enable-tls with password version 1
    assert (await leader_.run()).rollout.state is RolloutState.COMPLETED
    service = AdminService(
        LeaderState(leader_.store, world.ca, world.clock.wall, 1), leader_.commands, leader_.schema
    )
    context: Any = Context()
    from tlsroll.v1 import admin_pb2

    staged = await service.SetPassword(
        admin_pb2.SetPasswordRequest(auth_verifier_json=VERIFIER_2), context
    )
    assert staged.version == 2
    request = rollout_request("cluster", None, 1, "node", "change-password")
    planned = await service.PlanRollout(request, context)
    assert planned.applies.version == 2  # what the admin is shown and confirms
    # ... while a second admin stages another password
    other = await service.SetPassword(
        admin_pb2.SetPasswordRequest(auth_verifier_json=verifier(3)), context
    )
    assert other.version == 3
    before = leader_.schema.latest()
    request.auth_version = planned.applies.version  # as the CLI sends it
    with pytest.raises(Aborted) as refused:
        await service.StartRollout(request, context)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details == (
        "auth password version 3 was staged while this rollout was planned (with version 2); "
        "nothing started: start it again to apply version 3"
    )
    assert leader_.schema.latest() == before  # nothing created
    # A version that was never staged is refused as such.
    request.auth_version = 4
    with pytest.raises(Aborted) as unknown:
        await service.StartRollout(request, context)
    assert unknown.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.value.details == (
        "no password version 4 is staged (the newest is 3); nothing started"
    )
    assert leader_.schema.latest() == before
    # Planned and confirmed again: version 3 goes out.
    request.auth_version = (await service.PlanRollout(request, context)).applies.version
    view = await service.StartRollout(request, context)
    assert view.auth_version == 3
    row = await leader_.run()
    assert row.rollout.state is RolloutState.COMPLETED
    assert set(leader_.schema.node_auth().values()) == {3}
    await leader_.stop()


# --- s69 confirm L2: a transitional rollout whose finalize or way back just completed -------


def dual_agents(world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fake agent says its server serves http and https (a fake knows one scheme): what
    a finalize's preflight checks on a node phase 1 left dual."""
    for agent in world.agents:
        preflight = agent.preflight

        async def dual(request: Any, real: Any = preflight) -> Any:
            answer = await real(request)
            del answer.server.schemes[:]
            answer.server.schemes.extend(["http", "https"])
            return answer

        monkeypatch.setattr(agent, "preflight", dual)


def state(schema: SchemaStore, rollout_id: str) -> RolloutState:
    row = schema.get(rollout_id)
    assert row is not None
    return row.rollout.state


def latest(schema: SchemaStore) -> str:
    row = schema.latest()
    assert row is not None
    return row.rollout.id


@pytest.mark.parametrize("first", ["finalize", "way-back"])
async def test_nothing_follows_a_transitional_rollout_whose_follower_just_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """Review s69 confirm (L2): once the finalize (or the way back) of a transitional rollout
    X completed, X stayed awaiting_finalize until the engine's next pass ended it, and a new
    rollout following X was let in meanwhile: `rollout rollback X` right after its finalize
    completed was created and X ended "aborted (taken back)", not "completed (finalized)";
    `rollout finalize X` after its way back completed was refused "not on https". The engine's
    settle is held here (the pass that would record X's end does nothing) while both are
    asked: each is refused naming the rollout that completed, nothing created; released, X ends
    as its follower decided."""
    from leader import changes
    from tests.test_engine import make_world, transitional_phase_1

    world = make_world(tmp_path, monkeypatch)
    monkeypatch.setattr(changes, "dual_check", changes.outside_check)  # fakes know one scheme
    leader_ = world.boot()
    phase_1, _ = await transitional_phase_1(leader_)
    x = phase_1.rollout.id
    dual_agents(world, monkeypatch)
    settle = leader_.engine._settle_awaiting
    held = True

    async def held_settle() -> None:
        if not held:
            await settle()

    monkeypatch.setattr(leader_.engine, "_settle_awaiting", held_settle)
    if first == "finalize":
        follower = await leader_.commands.finalize(x, ADMIN, force=True)
        how, ends = "finalized", (RolloutState.COMPLETED, "finalized")
    else:
        back = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id=x)
        follower = await leader_.commands.start(back, ADMIN)
        how, ends = "taken back", (RolloutState.ABORTED, "taken back")
    f = follower.rollout.id
    row = await leader_.run(
        lambda r: r.rollout.id == f and r.rollout.state in TERMINAL_ROLLOUT_STATES
    )
    assert row.rollout.state is RolloutState.COMPLETED, row.rollout
    assert state(leader_.schema, x) is RolloutState.AWAITING_FINALIZE  # (held)
    line = (
        f"rollout {x} was {how} by rollout {f}, which has just completed; the leader records "
        "that in a moment: try again then (see: tlsroll schema show)"
    )
    back = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id=x)
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: leader_.commands.start(replace(back, undo_rollout_id=None), ADMIN),  # rollback
        lambda: leader_.commands.finalize(x, ADMIN, force=True),
        lambda: leader_.commands.finalize(x, ADMIN),
        lambda: leader_.commands.finalize("", ADMIN, force=True),
    ]
    if first == "finalize":  # (after the way back, `rollback X` is "already taken back")
        attempts.append(lambda: leader_.commands.start(back, ADMIN))  # rollback X
    for attempt in attempts:
        with pytest.raises(RolloutBusy) as refused:
            await attempt()
        assert str(refused.value) == line
        assert status_for(refused.value, ERRORS) is grpc.StatusCode.FAILED_PRECONDITION
    assert latest(leader_.schema) == f  # nothing created
    held = False
    await leader_.one_pass()
    ended = leader_.schema.get(x)
    assert ended is not None
    assert ended.rollout.state is ends[0], ended.rollout
    assert ends[1] in ended.meta.reason, ended.meta.reason
    assert latest(leader_.schema) == f
    await leader_.stop()


# --- s69 confirm L1: what the admin confirmed is what starts ----------------------------------


class Serving:
    """``Commands.observe``: each node on the scheme this map gives it (a certificate of the
    cluster CA with https), as another admin's rollouts leave them."""

    def __init__(self, schemes: dict[str, str]) -> None:
        self.schemes = schemes

    async def __call__(
        self,
        names: Sequence[str],
        *,
        warm: Collection[str],
        first: FirstSteps | None,
        edits: bool = False,
        way_back: bool = False,
        change: Change | None = None,
    ) -> dict[str, NodeObservation]:
        return {
            n: NodeObservation(
                reachable=True,
                schemes=(self.schemes[n],),
                cert_from_ca=self.schemes[n] == "https",
            )
            for n in names
        }


def switched_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serving: Serving
) -> tuple[Any, SchemaStore, Any, Any]:
    """The engine harness's leader with ``serving`` as what its nodes run, alpha and bravo
    switched by rollout e1, its admin service, and a `rollout rollback` request (no id): the
    leader, its schema, the service, the request."""
    from leader.admin_service import AdminService
    from leader.rollout_core import FreezeMode
    from leader.service import LeaderState
    from leader.wire import CHANGE, FREEZE
    from tests.test_engine import make_world
    from tlsroll.v1 import admin_pb2

    world = make_world(tmp_path, monkeypatch)
    leader_ = world.boot()
    schema = leader_.schema
    leader_.commands.observe = serving
    settle(schema, rollout(schema, "e1", Change.ENABLE_TLS, ["alpha", "bravo"]), {"alpha", "bravo"})
    service = AdminService(
        LeaderState(leader_.store, world.ca, world.clock.wall, 1), leader_.commands, schema
    )
    back = admin_pb2.RolloutRequest(
        change=CHANGE.wire(Change.DISABLE_TLS), freeze=FREEZE.wire(FreezeMode.NODE)
    )
    return leader_, schema, service, back


async def test_a_confirmed_start_or_way_back_starts_the_nodes_confirmed_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s69 confirm (L1): `rollout rollback` confirmed "Back to http: alpha, bravo" and
    `rollout start --scope cluster` its plan's nodes, then the leader resolved the scope again
    at the start: another admin's enable-tls completed meanwhile (or a way back) put more
    nodes in than were confirmed, without a word. The start names the nodes confirmed
    (``confirmed_nodes``, what the CLI sends after its prompt) and is refused if its plan
    steps others, nothing created; without them (`--yes`: nothing shown) it starts as planned."""
    from leader.cli.rollout import rollout_request, stepped
    from tests.test_engine import VERIFIER_1

    serving = Serving({"alpha": "https", "bravo": "https", "charlie": "http"})
    leader_, schema, service, back = switched_two(tmp_path, monkeypatch, serving)
    context: Any = Context()

    # `rollout rollback` (no id): alpha and bravo go back, confirmed ...
    planned = await service.PlanRollout(back, context)
    assert stepped(planned.rollout.nodes) == ["bravo", "alpha"]
    # ... while another admin's enable-tls switches charlie
    settle(schema, rollout(schema, "e2", Change.ENABLE_TLS, ["charlie"]), {"charlie"})
    serving.schemes["charlie"] = "https"
    back.confirmed_nodes.extend(stepped(planned.rollout.nodes))  # as the CLI sends them
    with pytest.raises(Aborted) as refused:
        await service.StartRollout(back, context)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details == (
        "the plan changed since it was shown (another rollout, a node enrolled, removed or "
        "switched, or an agent answering again or no longer, meanwhile): it now takes charlie "
        "too; nothing started: look at the new plan and start again"
    )
    assert latest(schema) == "e2"  # nothing created

    # `rollout start --scope cluster` (enable-tls): charlie and bravo... planned with all
    # three on https but bravo, which another admin's way back took back to http.
    serving.schemes["bravo"] = "http"
    start = rollout_request("cluster", None, 1, "node", "enable-tls")
    start.auth_verifier_json = VERIFIER_1  # (the nodes run none the leader knows of)
    planned = await service.PlanRollout(start, context)
    assert stepped(planned.rollout.nodes) == ["bravo"]
    serving.schemes["charlie"] = "http"
    start.confirmed_nodes.extend(stepped(planned.rollout.nodes))
    with pytest.raises(Aborted) as refused:
        await service.StartRollout(start, context)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "it now takes charlie too; nothing started" in refused.value.details
    assert latest(schema) == "e2"
    serving.schemes["charlie"] = "https"
    serving.schemes["alpha"] = "http"  # (as if taken back meanwhile, alone)
    serving.schemes["bravo"] = "https"
    with pytest.raises(Aborted) as refused:
        await service.StartRollout(start, context)
    assert "it now takes alpha too; no longer bravo; nothing started" in refused.value.details
    assert latest(schema) == "e2"

    # The plan unchanged: it starts; without any (--yes), as planned, as before.
    serving.schemes["alpha"] = "https"
    serving.schemes["bravo"] = "http"
    view = await service.StartRollout(start, context)
    assert stepped(view.nodes) == ["bravo"]
    started = schema.get(view.id)
    assert started is not None
    settle(schema, started, {"bravo"})
    serving.schemes["bravo"] = "https"
    # The same nodes confirmed in another order than the plan steps them: refused too.
    del back.confirmed_nodes[:]
    back.confirmed_nodes.extend(["alpha", "bravo", "charlie"])
    with pytest.raises(Aborted) as refused:
        await service.StartRollout(back, context)
    assert "in another order: bravo, charlie, alpha; nothing started" in refused.value.details
    assert latest(schema) == view.id
    del back.confirmed_nodes[:]  # `rollout rollback --yes`: every node on https goes back
    view = await service.StartRollout(back, context)
    assert stepped(view.nodes) == ["bravo", "charlie", "alpha"]
    await leader_.stop()


async def test_a_finalize_completed_with_a_node_failed_lets_the_next_finalize_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the test above (s69 mutants: nothing pinned it): a finalize that
    completed with a node failed within its budget leaves the transitional rollout awaiting
    (``planner.awaiting_verdict``), so it does not settle it, and a finalize again (for the
    node left dual) is let in, not refused as "finalized ... just completed" until the engine
    records an end that never comes."""
    from leader import changes
    from leader.rollout_enums import Strategy
    from tests.test_engine import VERIFIER_1, make_world

    world = make_world(tmp_path, monkeypatch)
    monkeypatch.setattr(changes, "dual_check", changes.outside_check)  # fakes know one scheme
    leader_ = world.boot()
    request = RolloutRequest(
        Change.ENABLE_TLS,
        Scope.cluster(),
        strategy=Strategy.TRANSITIONAL,
        failure_budget=1,
        auth_verifier_json=VERIFIER_1,
    )
    x = (await leader_.commands.start(request, ADMIN)).rollout.id
    await leader_.run(
        lambda r: r.rollout.id == x and r.rollout.state is RolloutState.AWAITING_FINALIZE
    )
    dual_agents(world, monkeypatch)
    world.agents["bravo"].outside_problem = "https://bravo: certificate unknown"
    first = (await leader_.commands.finalize(x, ADMIN, force=True)).rollout.id
    row = await leader_.run(
        lambda r: r.rollout.id == first and r.rollout.state in TERMINAL_ROLLOUT_STATES
    )
    assert row.rollout.state is RolloutState.COMPLETED, row.rollout
    assert any(r.state is not NodeState.DONE for r in row.records), row.records
    await leader_.one_pass()
    assert state(leader_.schema, x) is RolloutState.AWAITING_FINALIZE  # not settled
    leader_.schema.refuse_if_settled(x)  # (says nothing)
    world.agents["bravo"].outside_problem = None
    again = await leader_.commands.finalize(x, ADMIN, force=True)
    assert again.rollout.id != first and again.rollout.change is Change.FINALIZE
    await leader_.run(
        lambda r: r.rollout.id == again.rollout.id and r.rollout.state in TERMINAL_ROLLOUT_STATES
    )
    await leader_.one_pass()
    assert state(leader_.schema, x) is RolloutState.COMPLETED
    await leader_.stop()


class Flapping(Serving):
    """``Serving``, with the agents of ``silent`` not answering (a machine switched off, an
    agent overloaded): the way back leaves such a node as is."""

    def __init__(self, schemes: dict[str, str]) -> None:
        super().__init__(schemes)
        self.silent: set[str] = set()

    async def __call__(
        self,
        names: Sequence[str],
        *,
        warm: Collection[str],
        first: FirstSteps | None,
        edits: bool = False,
        way_back: bool = False,
        change: Change | None = None,
    ) -> dict[str, NodeObservation]:
        seen = await super().__call__(names, warm=warm, first=first, edits=edits)
        for n in self.silent & set(seen):
            seen[n] = NodeObservation(reachable=False, error="connection refused")
        return seen


async def test_a_way_back_refused_for_an_agent_gone_silent_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing review of s69 (review3): `rollout rollback` confirmed "Back to http: bravo,
    alpha", and bravo's agent stopped answering before the start: the way back now leaves it
    as is, so the start is refused (what was confirmed is what starts), but the refusal blamed
    "another rollout, or a node enrolled or removed", none of which happened. It says why the
    node dropped out, and an agent back again is among the causes it names."""
    from leader.cli.rollout import stepped

    serving = Flapping({"alpha": "https", "bravo": "https", "charlie": "http"})
    leader_, schema, service, back = switched_two(tmp_path, monkeypatch, serving)
    context: Any = Context()
    planned = await service.PlanRollout(back, context)
    back.confirmed_nodes.extend(stepped(planned.rollout.nodes))
    assert list(back.confirmed_nodes) == ["bravo", "alpha"]
    serving.silent.add("bravo")
    with pytest.raises(Aborted) as refused:
        await service.StartRollout(back, context)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details == (
        "the plan changed since it was shown (another rollout, a node enrolled, removed or "
        "switched, or an agent answering again or no longer, meanwhile): no longer bravo (left "
        "as is now: its agent cannot say what it runs); nothing started: look at the new plan "
        "and start again"
    )
    assert latest(schema) == "e1"  # nothing created
    await leader_.stop()
