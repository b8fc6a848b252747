"""The leader and its clock (clock audit s35): a step of the leader's wall clock (NTP after a
drift, a VM restored from a snapshot) moves neither a node's liveness nor which of a node's
certificates a rotation replaced.

The rig's monotonic clock moves with its wall clock (``tests.leader_rig``); a step is the wall
clock moving without it (``_stepping``)."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from cryptography import x509

import tlsroll.sqlite
from leader import planner
from leader.agent_client import Agents
from leader.commands import Commands, StillOnHttp
from leader.db import check_store
from leader.engine import Engine
from leader.rollout_core import (
    Change,
    FreezeMode,
    NodeRecord,
    NodeState,
    RolloutEvent,
    Scope,
    Step,
    Strategy,
)
from leader.schema_store import RolloutMeta, RolloutRow, SchemaStore
from leader.service import CRL_AHEAD_LIMIT, LeaderService, LeaderState, keepalive_seconds
from leader.store import REPEATS_KEPT, Store, _record_cert
from nodeagent.journal import open_journal
from tests.leader_rig import InProcessLeader, _enrol, leader_with_a_node
from tests.test_heartbeat_stream import agent_link, until
from tlsroll import pki
from tlsroll.rpc import timestamp
from tlsroll.sqlite import to_text
from tlsroll.v1 import types_pb2

T = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


def _stepping(tmp_path: Path, loopback: Callable[[], str]) -> tuple[InProcessLeader, list[float]]:
    """The rig (node ``hb1``, the leader's clock at ``T``) with a monotonic clock of its own:
    a test moves both as time passes, and the wall clock alone for a step."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    assert rig.clock[0] == T
    mono = [1000.0]
    rig.state.monotonic = lambda: mono[0]
    return rig, mono


def _passes(rig: InProcessLeader, mono: list[float], span: dt.timedelta) -> None:
    rig.clock[0] += span
    mono[0] += span.total_seconds()


def _online(rig: InProcessLeader) -> bool:
    return rig.state.node_online(rig.store.get_node("hb1"))


async def _restarted(
    tmp_path: Path, rig: InProcessLeader, at: dt.datetime
) -> tuple[LeaderState, list[dt.datetime], list[float]]:
    """``rig``'s leader restarts with its clock at ``at``: its store and service anew, on the
    same file (what it kept in memory is gone). The new leader's wall and monotonic clocks:
    a test moves both as time passes, the wall clock alone for a step."""
    ca = rig.state.ca
    await rig.close()
    now, mono = [at], [50.0]
    state = LeaderState(
        store=Store(tmp_path / "leader.sqlite3"),
        ca=ca,
        clock=lambda: now[0],
        heartbeat_interval=rig.state.heartbeat_interval,
        monotonic=lambda: mono[0],
    )
    LeaderService(state)  # binds the store's clocks to the state's, as the leader's start does
    return state, now, mono


async def test_a_silent_node_goes_offline_after_the_leaders_clock_stepped_back(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Clock audit s35, D: the leader's clock steps back an hour, the node's agent sends once
    more and dies. It showed online for the hour (the schema, the viewer,
    ``tlsroll_node_online``, a rollout's plan), and its stored last heartbeat was not
    written again for that hour (``note_heartbeat`` took a time before the stored one as
    recent)."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        rig.store.heartbeat("hb1", "1", now=rig.clock[0])
        rig.clock[0] -= HOUR  # the step
        _passes(rig, mono, dt.timedelta(seconds=1))
        rig.store.heartbeat("hb1", "1", now=rig.clock[0])  # as the service records it
        assert _online(rig)
        _passes(rig, mono, dt.timedelta(minutes=30))  # silent (offline after 15 s)
        assert not _online(rig)
        assert rig.state.online(rig.store.list_nodes()[0].last_heartbeat) is False
        # What is stored is the heartbeat after the step: the first look after a restart.
        with sqlite3.connect(tmp_path / "leader.sqlite3") as db:
            (stored,) = db.execute("SELECT last_heartbeat FROM nodes WHERE name = 'hb1'").fetchone()
        assert dt.datetime.fromisoformat(stored) == T - HOUR + dt.timedelta(seconds=1)
    finally:
        await rig.close()


async def test_a_node_silent_since_just_before_a_step_back_goes_offline(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """D, the node dies before the step: nothing after it is recorded, only the time since
    its last heartbeat tells it is gone."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        rig.store.heartbeat("hb1", "1", now=rig.clock[0])
        rig.clock[0] -= HOUR
        _passes(rig, mono, dt.timedelta(seconds=10))
        assert _online(rig)  # heard 10 s ago (offline after 15 s)
        assert rig.store.get_node("hb1").last_heartbeat == rig.clock[0] - dt.timedelta(seconds=10)
        _passes(rig, mono, dt.timedelta(seconds=10))
        assert not _online(rig)
    finally:
        await rig.close()


async def test_a_live_node_stays_online_when_the_leaders_clock_steps_forward(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """D, the other way: the leader's clock steps forward an hour a second after a node's
    heartbeat. The node was offline until its next heartbeat."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        rig.store.heartbeat("hb1", "1", now=rig.clock[0])
        rig.clock[0] += HOUR
        _passes(rig, mono, dt.timedelta(seconds=1))
        assert _online(rig)
        assert rig.store.get_node("hb1").last_heartbeat == rig.clock[0] - dt.timedelta(seconds=1)
        _passes(rig, mono, dt.timedelta(seconds=20))
        assert not _online(rig)
    finally:
        await rig.close()


async def test_a_stream_that_ended_after_a_step_back_vouches_no_longer_than_it_proved(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """D, a renewal stream (it vouches for its node while open, ``Store.vouch``): its agent's
    last message came before the leader's clock stepped back an hour, then the stream dropped
    without a word (a killed agent). The leader took the node alive up to that message's time
    by the clock, an hour ahead of it now: online for that hour."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    mono = [1000.0]
    rig.state.monotonic = lambda: mono[0]
    await rig.server.start()
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:
        await link.beat()  # renewal mode: the stream now vouches for the node
        assert [b.renews for b in rig.service._open] == [True]
        rig.clock[0] -= HOUR
        _passes(rig, mono, dt.timedelta(seconds=2))
        assert _online(rig)  # vouched for
        link._drop_stream()
        await until(lambda: not rig.service._open, "the leader saw the stream end")
        every, wait = keepalive_seconds(rig.state.heartbeat_interval)
        since = min(2.0, every + wait)  # the message came 2 s ago; the last PING answered
        assert rig.store.get_node("hb1").last_heartbeat == rig.clock[0] - dt.timedelta(
            seconds=since
        )
        _passes(rig, mono, dt.timedelta(minutes=30))
        assert not _online(rig)
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_node_silent_since_before_a_step_back_stays_offline_after_a_restart(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review 2 of s35, M1: a node's last heartbeat came just before the leader's clock
    stepped back an hour, and the running leader took it offline (D). After a restart the
    leader knew only the stored time, an hour ahead of its clock: the node was online again
    for that hour (the schema, the viewer, ``tlsroll_node_online``, a rollout's plan). It
    was heard before the restart: it ages from there."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        rig.store.heartbeat("hb1", "1", now=rig.clock[0])  # its last message; then it dies
        rig.clock[0] -= HOUR
        _passes(rig, mono, dt.timedelta(minutes=5))
        assert not _online(rig)
    finally:
        state, now, mono = await _restarted(tmp_path, rig, rig.clock[0])
    try:
        # Heard no later than the restart, a moment ago (the leader cannot tell yet).
        assert state.node_online(state.store.get_node("hb1"))
        now[0] += dt.timedelta(minutes=30)
        mono[0] += 30 * 60
        node = state.store.get_node("hb1")
        assert not state.node_online(node)
        assert node.last_heartbeat is not None
        assert now[0] - node.last_heartbeat >= dt.timedelta(minutes=30)
        assert not state.node_online(state.store.list_nodes()[0])
        now[0] += HOUR  # NTP sets the clock right again
        assert not state.node_online(state.store.get_node("hb1"))
        state.store.heartbeat("hb1", "1", now=now[0])  # its agent is back
        assert state.node_online(state.store.get_node("hb1"))
    finally:
        state.store.close()


async def test_a_leader_that_starts_with_its_clock_behind_takes_no_dead_node_for_online(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """M1, the leader's host starts with its clock two hours behind (its RTC), before NTP
    sets it: every stored heartbeat lay in the future, and every node was online, dead ones
    too, until the clock caught up. A stored time in the past is as it was."""
    rig, _mono = _stepping(tmp_path, loopback)
    try:
        rig.add_node("hb2", loopback())
        rig.store.heartbeat("hb1", "1", now=T)  # the last message before the leader stopped
        rig.store.heartbeat("hb2", "1", now=T - 3 * HOUR)  # long gone
    finally:
        state, now, mono = await _restarted(tmp_path, rig, T - 2 * HOUR)
    try:
        assert state.store.get_node("hb2").last_heartbeat == T - 3 * HOUR  # as stored
        assert not state.node_online(state.store.get_node("hb2"))
        assert state.node_online(state.store.get_node("hb1"))  # heard before the start
        now[0] += dt.timedelta(seconds=30)  # silent (offline after 15 s)
        mono[0] += 30
        assert not state.node_online(state.store.get_node("hb1"))
        now[0] += 2 * HOUR  # NTP sets the clock
        assert not state.node_online(state.store.get_node("hb1"))
        assert state.store.get_node("hb2").last_heartbeat == T - 3 * HOUR
        state.store.heartbeat("hb2", "1", now=now[0])  # an agent that is alive
        assert state.node_online(state.store.get_node("hb2"))
    finally:
        state.store.close()


def test_a_bare_store_keeps_the_times_it_is_given(tmp_path: Path) -> None:
    """A heartbeat recorded with a time a moment ago (no step) shows that time, exactly: the
    stored and shown time is the leader's clock's when the node was heard."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        now = dt.datetime.now(dt.UTC)
        _enrol(store, pki.CertificateAuthority.create(), "n1", "127.0.0.9", now)
        at = now - dt.timedelta(seconds=3)
        store.heartbeat("n1", "1", now=at)
        assert store.get_node("n1").last_heartbeat == at
    finally:
        store.close()


def test_a_pause_of_the_leaders_host_counts_as_time_that_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of s35, L2: the leader's host is suspended (or its VM paused) for two hours
    after a node's heartbeat and client report. ``time.monotonic`` stood still meanwhile:
    the two hours looked like a step of the wall clock, and the node was taken for heard a
    moment ago (online, its report fresh). The leader's default clocks, a suspend that
    CLOCK_BOOTTIME counts."""
    slept = [0.0]
    real = time.clock_gettime

    def clock_gettime(clock: int) -> float:
        return real(clock) + (slept[0] if clock == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    wall = [T]
    ca = pki.CertificateAuthority.create()
    state = LeaderState(
        store=Store(tmp_path / "leader.sqlite3"),
        ca=ca,
        clock=lambda: wall[0],
        heartbeat_interval=5,
    )
    LeaderService(state)
    store = state.store
    try:
        _enrol(store, ca, "n1", "127.0.0.9", T)
        store.heartbeat("n1", "1", now=T)
        store.note_report("n1", T)
        wall[0] += 2 * HOUR  # the host sleeps: its wall clock goes on, time.monotonic not
        slept[0] += 2 * 3600
        node = store.get_node("n1")
        assert node.last_heartbeat is not None and node.last_heartbeat <= T
        assert not state.node_online(node)
        assert store.report_on_clock_now("n1", T) <= T
    finally:
        store.close()


async def test_a_pause_of_the_leaders_host_lapses_the_scope_freezes_it_saw_confirmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 of s35 (Low): the engine counted the scope freeze's leases on
    ``time.monotonic``, which stands still while the leader's host is suspended; the agents'
    leases run on meanwhile, and each agent lifts its freeze when its lease runs out. A leader
    back from a suspend longer than the lease took a freeze it had seen confirmed before it for
    one that still holds (``_confirmed_until``): the next switch began (``_lapsed`` empty) and
    no renewal was due, with every node of the scope taking writes again. The engine as the
    leader builds it (its default clock), a suspend that CLOCK_BOOTTIME counts."""
    slept = [0.0]
    real = time.clock_gettime

    def clock_gettime(clock: int) -> float:
        return real(clock) + (slept[0] if clock == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    store = Store(tmp_path / "leader.sqlite3")
    try:
        lease = 300
        engine = Engine(
            store,
            SchemaStore(store.db),
            pki.CertificateAuthority.create(),
            cast(Agents, None),
            lambda: T,
            lease,
        )

        async def saved(*_args: object, **_kwargs: object) -> None:
            return None  # (the record's write: not what this is about)

        monkeypatch.setattr(engine, "_save_node", saved)
        freeze = planner.StepAction("n1", Step.FREEZE, 1)
        await engine._record_frozen("r1", freeze, True, (engine.monotonic(), T))
        frozen = NodeRecord(name="n1", state=NodeState.DONE, scope_frozen=True)
        row = cast(
            RolloutRow,
            SimpleNamespace(
                rollout=SimpleNamespace(id="r1", freeze=FreezeMode.SCOPE), records=(frozen,)
            ),
        )
        assert engine._lapsed(row) == frozenset()  # confirmed a moment ago: it holds
        slept[0] += 2 * lease  # the host sleeps; time.monotonic stands still, the agents' not
        assert engine._lapsed(row) == {"n1"}  # the switches wait until it is frozen again
    finally:
        store.close()


def test_the_certificate_a_rotation_replaced_is_revoked_whatever_the_clock_said(
    tmp_path: Path,
) -> None:
    """Clock audit s35, F: "superseded" went by ``issued_at``. The leader's clock was a day
    ahead when an enable-tls issued X; corrected, a rotate-cert three hours later issued Y.
    X looked newer than Y and was never revoked (valid up to 397 days, not on the list);
    Y's successor issued before a step forward would have been taken for an older one."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        with store._db.tx() as db:  # enable-tls, the leader's clock a day ahead
            _record_cert(db, "aa01", "server", "n1", "n1", "fp-x", T + 24 * HOUR, T + 398 * DAY)
        with store._db.tx() as db:  # the clock corrected; rotate-cert three hours later
            _record_cert(db, "aa02", "server", "n1", "n1", "fp-y", T + 3 * HOUR, T + 397 * DAY)
        with store._db.tx() as db:  # a later rollout's, recorded after Y: not Y's to revoke
            _record_cert(db, "aa03", "server", "n1", "n1", "fp-z", T + 2 * HOUR, T + 397 * DAY)
        with store._db.tx() as db:  # another node's
            _record_cert(db, "bb01", "server", "n2", "n2", "fp-o", T - HOUR, T + 397 * DAY)
        now = T + 4 * HOUR
        assert store.revoke_superseded("n1", "fp-y", before=T, now=now) == ["aa01"]
        assert store.revoke_superseded("n1", "fp-y", before=T, now=now) == []  # idempotent
        revoked = {c.serial for c in store.list_certificates("server") if c.revoked_at}
        assert revoked == {"aa01"}
        # The live one not on record (the admin's own): by the rollout's start, as before.
        assert store.revoke_superseded("n2", "fp-byo", before=T, now=now) == ["bb01"]
    finally:
        store.close()


@pytest.mark.parametrize("which", ["leader", "agent"])
def test_two_stores_moved_aside_in_one_second_are_both_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """Clock audit s35, J: a lost store (the leader's, an agent's journal) moved aside by
    ``--reinitialise`` is kept as ``NAME.lost-TIME``; a second one within the same second (or
    after the clock stepped back) was renamed over the first, which was gone without a
    word."""
    monkeypatch.setattr(tlsroll.sqlite, "_now", lambda: T)
    name = "leader.sqlite3" if which == "leader" else "journal.sqlite3"
    path = tmp_path / name
    for n in range(3):
        path.write_bytes(f"lost store {n} ".encode() * 100)  # damaged: not a database
        if which == "leader":
            check_store(path, reinitialise=True)
        else:
            open_journal(path, expected=True, reinitialise=True).close()
            for made in [path, *tmp_path.glob(f"{name}-*")]:  # the new, empty journal
                made.unlink()
    tags = ("", ".2", ".3")
    kept = sorted(p.name for p in tmp_path.glob(f"{name}.lost-*"))
    assert kept == [f"{name}.lost-20261130T100000Z{t}" for t in tags]
    for n, tag in enumerate(tags):
        copy = tmp_path / f"{name}.lost-20261130T100000Z{tag}"
        assert copy.read_bytes() == f"lost store {n} ".encode() * 100


def test_a_store_moved_aside_keeps_its_companions_under_one_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """J: a store's -wal and -shm go with it, under the same name, never over a kept one's
    (a set whose -wal alone was kept before takes the next name)."""
    monkeypatch.setattr(tlsroll.sqlite, "_now", lambda: T)
    path = tmp_path / "s.sqlite3"
    (tmp_path / "s.sqlite3.lost-20261130T100000Z-wal").write_bytes(b"kept before")
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"s.sqlite3{suffix}").write_bytes(f"now{suffix}".encode())
    kept = tlsroll.sqlite.move_aside(path, ("", "-wal", "-shm", "-journal"))
    tag = "s.sqlite3.lost-20261130T100000Z.2"
    assert [p.name for p in kept] == [tag, f"{tag}-wal", f"{tag}-shm"]
    assert [p.read_bytes() for p in kept] == [b"now", b"now-wal", b"now-shm"]
    assert (tmp_path / "s.sqlite3.lost-20261130T100000Z-wal").read_bytes() == b"kept before"
    assert not list(tmp_path.glob("s.sqlite3-*")) and not path.exists()


async def test_a_list_issued_ahead_of_a_corrected_clock_is_renewed(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Clock audit s35, J: the leader's clock was a day ahead when a certificate was revoked,
    then corrected. The list's number kept its issue a day in the future: its thisUpdate was
    ahead of every clock (a server that checks the list's dates refuses it), and it was not
    renewed until the clock had passed that issue by a day. A list issued less than
    ``CRL_AHEAD_LIMIT`` ahead (a small correction) keeps its number."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    store, clock, svc = rig.store, rig.clock, rig.service
    try:
        clock[0] = T + DAY  # ahead
        assert store.revoke("5eec", reason="", now=clock[0], actor="test", unknown=True)
        n1 = store.revocations(clock[0]).number
        assert svc._read_snapshot().crl_number == n1
        clock[0] = T + dt.timedelta(minutes=1)  # corrected
        snap = svc._read_snapshot()
        assert snap.crl_number > n1
        renewed = x509.load_pem_x509_crl(snap.crl_pem)
        assert renewed.last_update_utc <= clock[0]
        assert {r.serial_number for r in renewed} == {0x5EEC}
        assert svc._read_snapshot().crl_number == snap.crl_number  # once
        clock[0] -= CRL_AHEAD_LIMIT - dt.timedelta(minutes=1)  # a step back within the limit
        assert svc._read_snapshot().crl_number == snap.crl_number
    finally:
        await rig.close()


async def _awaiting_finalize(rig: InProcessLeader, address: str) -> tuple[SchemaStore, Commands]:
    """t1: a transitional rollout awaiting finalize with hb1 and hb2 (enrolled on ``address``)
    dual, whose agents each sent a heartbeat and reported their clients (only https) now,
    through the service (``_record_clients``, the group commit)."""
    rig.add_node("hb2", address)
    schema = SchemaStore(rig.store.db)
    now = rig.clock[0]
    rollout, nodes = planner.plan_rollout(
        rollout_id="t1",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"hb1": True, "hb2": True},
        leader="hb1",
        epoch=schema.next_epoch(),
        strategy=Strategy.TRANSITIONAL,
    )
    meta = RolloutMeta(created_at=now, started_by="admin:test", leader_node="hb1")
    row = schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, now, '{"v": 1}')
    dual = [replace(n, state=NodeState.DUAL) for n in row.records]
    schema.save_states(row, row.rollout.with_event(RolloutEvent.NODES_DUAL), dual, now, "engine")
    seen = timestamp(now)
    for node in ("hb1", "hb2"):
        rig.store.heartbeat(node, "1", now=now)
        view = types_pb2.ClientsView(
            clients=[
                types_pb2.ClientSeen(
                    scheme="https", address="10.0.0.1", first_seen=seen, last_seen=seen
                )
            ],
            window_seconds=600,
            source="refserver",
        )
        rig.service._record_clients(node, view, now)
    await rig.service.write_queued()
    commands = Commands(rig.store, schema, rig.state.clock, rig.state.online, "hb1", lambda: None)
    return schema, commands


async def test_a_client_report_from_before_a_step_back_goes_stale(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """D, the client reports (``_refuse_while_on_http``, ``planner.stale_reports``): a report
    from just before the leader's clock stepped back an hour spoke for its node for that
    hour: a finalize 30 minutes later, its agents silent since, closed http on what they
    said then."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        schema, commands = await _awaiting_finalize(rig, loopback())
        rig.clock[0] -= HOUR
        _passes(rig, mono, dt.timedelta(minutes=30))
        with pytest.raises(StillOnHttp, match="no recent report") as refused:
            await commands.finalize("t1", "admin:test")
        assert set(refused.value.unknown) == {"hb1", "hb2"}
        assert schema.follower("t1") is None  # nothing started
    finally:
        await rig.close()


async def test_a_fresh_client_report_stays_fresh_when_the_clock_steps_forward(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """D, the other way: a report a second old when the clock stepped forward an hour still
    speaks for its node (it was refused "no recent report" until the agent's next one)."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        schema, commands = await _awaiting_finalize(rig, loopback())
        rig.clock[0] += HOUR
        _passes(rig, mono, dt.timedelta(seconds=1))
        await commands.finalize("t1", "admin:test")  # not refused: started
        assert schema.follower("t1") is not None
    finally:
        await rig.close()


async def test_when_quiet_holds_a_node_whose_report_came_before_a_step_back(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """D, ``--when-quiet`` (``Engine._held_for_quiet``): a node whose agent reported no http
    client, then fell silent as the leader's clock stepped back an hour, was taken for quiet
    30 minutes later on that report, as if fresh; it waits now, as for any stale report."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        schema, _commands = await _awaiting_finalize(rig, loopback())
        engine = Engine(
            rig.store,
            schema,
            rig.state.ca,
            cast(Agents, None),
            rig.state.clock,
            monotonic=rig.state.monotonic,
        )
        pending = NodeRecord(name="hb1", state=NodeState.PENDING)
        row = cast(
            RolloutRow,
            SimpleNamespace(
                rollout=SimpleNamespace(id="q1"),
                meta=SimpleNamespace(when_quiet=60),
                records=(pending,),
            ),
        )
        # Quiet for the 70 s since its first report (quiet time counts from there: review
        # s64 M), and a report that says so came just now.
        _passes(rig, mono, dt.timedelta(seconds=70))
        rig.service._record_clients("hb1", _report(rig.clock[0]), rig.clock[0])
        await rig.service.write_queued()
        assert await engine._held_for_quiet(row) == frozenset()  # quiet, its report fresh
        rig.clock[0] -= HOUR
        _passes(rig, mono, dt.timedelta(minutes=30))
        assert await engine._held_for_quiet(row) == {"hb1"}
    finally:
        await rig.close()


def _report(now: dt.datetime, *http: str) -> types_pb2.ClientsView:
    """A node's client report as ``_awaiting_finalize``'s (a workstation on https, seen
    ``now``), with workstations ``http`` on http besides."""
    seen = timestamp(now)
    return types_pb2.ClientsView(
        clients=[
            types_pb2.ClientSeen(
                scheme="https", address="10.0.0.1", first_seen=seen, last_seen=seen
            ),
            *(
                types_pb2.ClientSeen(
                    scheme="http",
                    address="10.0.0.9",
                    workstation=w,
                    first_seen=seen,
                    last_seen=seen,
                )
                for w in http
            ),
        ],
        window_seconds=600,
        source="refserver",
    )


async def test_a_report_that_waits_for_its_commit_keeps_the_stored_one_fresh(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s43rev2, M2: a renewal-mode report that repeats the stored one waits for its
    commit (``REFRESH_SECONDS``) until a batch period before the stored one is stale. A
    finalize and ``--when-quiet`` read the stored report; a commit any slower (held back
    here) had them refuse ("no recent report") and hold a node whose agent reported
    normally. They judge it by the repeat now; a queued report that says something new does
    not speak for the stored one (hb2: stale, refused, until its commit)."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        schema, commands = await _awaiting_finalize(rig, loopback())  # both reported at T
        # Both first reported an hour before: what this test judges is a report's age, not the
        # quiet time, which counts from a node's first report (review s64 M).
        with rig.store.db.tx() as db:
            db.execute("UPDATE node_clients_info SET first_report = ?", (to_text(T - HOUR),))
        engine = Engine(
            rig.store,
            schema,
            rig.state.ca,
            cast(Agents, None),
            rig.state.clock,
            monotonic=rig.state.monotonic,
        )
        pending = (
            NodeRecord(name="hb1", state=NodeState.PENDING),
            NodeRecord(name="hb2", state=NodeState.PENDING),
        )
        row = cast(
            RolloutRow,
            SimpleNamespace(
                rollout=SimpleNamespace(id="q1"),
                meta=SimpleNamespace(when_quiet=60),
                records=pending,
            ),
        )
        asked: list[float] = []
        monkeypatch.setattr(rig.service, "_start_writer", asked.append)  # the commit held back
        _passes(rig, mono, dt.timedelta(seconds=20))  # a renewal: the next reports
        rig.service._record_clients("hb1", _report(rig.clock[0]), rig.clock[0], renewing=True)
        rig.service._record_clients(
            "hb2", _report(rig.clock[0], "ws-empfang"), rig.clock[0], renewing=True
        )
        assert len(asked) == 2 and rig.store.queued() == 2
        stale = planner.report_stale_after(rig.state.heartbeat_interval)
        _passes(rig, mono, stale - dt.timedelta(seconds=19))  # the stored ones: stale
        with pytest.raises(StillOnHttp, match="no recent report") as refused:
            await commands.finalize("t1", "admin:test")
        assert set(refused.value.unknown) == {"hb2"}  # hb1's repeat speaks for it
        assert not refused.value.clients  # the stored reports: no one on http
        assert await engine._held_for_quiet(row) == {"hb2"}
        await rig.service.write_queued()  # the commit: each report judged by itself
        with pytest.raises(StillOnHttp) as refused:
            await commands.finalize("t1", "admin:test")
        assert not refused.value.unknown
        assert [c.workstation for c in refused.value.clients] == ["ws-empfang"]
        assert await engine._held_for_quiet(row) == {"hb2"}  # on http just now
        assert schema.follower("t1") is None  # nothing started
    finally:
        await rig.close()


def test_a_report_speaks_for_the_stored_ones_it_repeats_only(tmp_path: Path) -> None:
    """``Store.note_report``/``report_on_clock_now``: a stored report that the newest noted
    one repeats (each report between says the same) is as recent as the newest; one the
    newest does not repeat is judged by its own time. While commits fail, the newest
    speaks for at most ``REPEATS_KEPT`` before it."""
    wall, mono = [T], [100.0]
    store = Store(tmp_path / "leader.sqlite3")
    store.clock, store.monotonic = (lambda: wall[0]), (lambda: mono[0])
    try:

        def at(seconds: int) -> dt.datetime:
            return T + dt.timedelta(seconds=seconds)

        def noted(seconds: int, *, repeats: bool) -> None:
            wall[0], mono[0] = at(seconds), 100.0 + seconds
            store.note_report("n1", at(seconds), repeats=repeats)

        noted(0, repeats=False)
        noted(20, repeats=True)
        noted(40, repeats=True)
        assert store.report_on_clock_now("n1", at(0)) == at(40)
        assert store.report_on_clock_now("n1", at(20)) == at(40)
        assert store.report_on_clock_now("n1", at(40)) == at(40)
        assert store.report_on_clock_now("n1", at(-5)) == at(-5)  # before: not repeated
        noted(50, repeats=False)  # says something new: it speaks for itself only
        assert store.report_on_clock_now("n1", at(40)) == at(40)
        assert store.report_on_clock_now("n1", at(50)) == at(50)
        for n in range(1, REPEATS_KEPT + 2):
            noted(50 + 20 * n, repeats=True)
        newest = at(50 + 20 * (REPEATS_KEPT + 1))
        assert store.report_on_clock_now("n1", at(70)) == newest
        assert store.report_on_clock_now("n1", at(50)) == at(50)  # past REPEATS_KEPT
    finally:
        store.close()


async def test_a_client_report_from_before_a_step_back_stays_stale_after_a_restart(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """M1, the client reports: a report stored just before the leader's clock stepped back
    an hour was, after a restart, judged by the clock again, an hour ahead of it: a
    finalize (or ``--when-quiet``) 30 minutes later took it for fresh and closed http on
    what the silent agents said before the restart."""
    rig, mono = _stepping(tmp_path, loopback)
    try:
        await _awaiting_finalize(rig, loopback())
        rig.clock[0] -= HOUR
        _passes(rig, mono, dt.timedelta(minutes=5))
    finally:
        state, now, mono = await _restarted(tmp_path, rig, rig.clock[0])
    try:
        schema = SchemaStore(state.store.db)
        now[0] += dt.timedelta(minutes=30)  # the first look at the reports, 30 minutes on
        mono[0] += 30 * 60
        commands = Commands(state.store, schema, state.clock, state.online, "hb1", lambda: None)
        # (Since s44 a report stored before the leader started speaks for no node until its
        # agent reports to this leader, whatever its time says: a stronger refusal.)
        with pytest.raises(
            StillOnHttp, match="first client report since the leader started from hb1"
        ) as refused:
            await commands.finalize("t1", "admin:test")
        assert set(refused.value.unknown) == {"hb1", "hb2"}
        assert schema.follower("t1") is None  # nothing started
        engine = Engine(
            state.store,
            schema,
            state.ca,
            cast(Agents, None),
            state.clock,
            monotonic=state.monotonic,
        )
        pending = NodeRecord(name="hb1", state=NodeState.PENDING)
        row = cast(
            RolloutRow,
            SimpleNamespace(
                rollout=SimpleNamespace(id="q1"),
                meta=SimpleNamespace(when_quiet=60),
                records=(pending,),
            ),
        )
        assert await engine._held_for_quiet(row) == {"hb1"}
    finally:
        state.store.close()
