"""Heartbeats on one stream (``Leader.Heartbeats``), and the leader's heartbeat path.

A stream outlives what the leader knows about its caller, so every message is checked as a new
call would be: a removed node's stream, a revoked certificate's stream and, once the agent has
used its renewed certificate, the old certificate's stream are cut with UNAUTHENTICATED, exactly
when a unary Heartbeat with that certificate is refused. A real agent beats on the stream (its
server going down, the revocation list and the epoch reach it as before), falls back to unary
calls with a leader that has no stream, and returns to the stream when the leader does.

Real leader daemon, real agents, real mutual TLS. The one stand-in is the "older leader" of the
fallback test: a small real gRPC server in this test, on the leader's address with the leader's
certificate, that implements only the unary Heartbeat (as tlsroll before the stream did).

The shape test at the top runs the Leader service in-process on a real gRPC server and a real
store file, to count what a heartbeat that says nothing new costs: no SQL, no worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp

from leader import service
from leader.layout import read_passphrase
from leader.planner import report_stale_after
from leader.service import (
    MAX_AGENT_MESSAGE,
    LeaderService,
    LeaderState,
    clients_persist,
    clients_said,
)
from leader.store import IssuedCert, Store
from nodeagent import leader_link
from nodeagent.config import AgentConfig
from nodeagent.cryptoworker import InProcess
from nodeagent.failure_log import FailureLog
from nodeagent.identity import Identity
from nodeagent.journal import Journal
from nodeagent.leader_link import LeaderLink, report_key
from nodeagent.trust import LeaderTrust
from tests.children import python_child
from tests.cluster import (
    LEADER_POLL,
    AdminTokenCluster,
    Cluster,
    csr_pem,
    enrol,
    enrol_request,
    wait_until,
)
from tests.conftest import next_loopback
from tests.leader_rig import leader_with_a_node
from tests.nodeside import RPC_TIMEOUT, NodeFactory
from tests.private_files import write_private
from tlsroll import features, pki, rpc, spiffe, wire
from tlsroll.defaults import AGENT_PORT, CONTROL_PORT, JOIN_PORT
from tlsroll.v1 import agent_pb2, leader_pb2, leader_pb2_grpc, types_pb2

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def ts(when: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


# --- the shape of a quiet heartbeat ---------------------------------------------------------


def client_report(now: dt.datetime, requests: int, *who: str) -> leader_pb2.LiveServer:
    """A server's state with workstations ``who`` seen on http just now (``requests`` each)."""
    seen = [
        types_pb2.ClientSeen(
            scheme="http",
            address=f"192.168.1.{20 + i}",
            workstation=w,
            first_seen=ts(now - dt.timedelta(hours=1)),
            last_seen=ts(now),
            requests=requests,
        )
        for i, w in enumerate(who)
    ]
    return leader_pb2.LiveServer(
        driver="reference",
        healthy=True,
        schemes=["http"],
        clients=types_pb2.ClientsView(clients=seen, window_seconds=3600, source="refserver"),
    )


@pytest.mark.parametrize("how", ["unary", "stream"])
async def test_a_heartbeat_that_says_nothing_new_runs_no_sql_and_no_worker_thread(
    tmp_path: Path,
    loopback: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """After the first heartbeat, one that says what the last said (its client report's times
    and counts move, as a busy workstation's do) runs no SQL statement and no worker-thread
    hop: the caller is checked against the leader's in-memory snapshot of the store and the
    heartbeat is kept in memory. A new workstation in the report is written with the next
    group commit (here when the test says: ``write_queued``)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    server, store, state, clock = rig.server, rig.store, rig.state, rig.clock
    rig.service.batch_seconds = 3600  # the test commits (``write_queued``)
    await server.start()
    statements: list[str] = []
    store.db._db.set_trace_callback(statements.append)  # the leader's one connection
    hops: list[Any] = []
    to_thread = asyncio.to_thread

    async def counting(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(func)
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    # The node's clock's lag is read once a message (session 72: twice before, for the client
    # report and for the login failures).
    shifts: list[object] = []
    real_shift = service.clock_shift

    def clock_shift(request: leader_pb2.HeartbeatRequest, now: dt.datetime) -> dt.timedelta:
        shifts.append(request)
        return real_shift(request, now)

    monkeypatch.setattr(service, "clock_shift", clock_shift)

    def beat(requests: int, *who: str) -> leader_pb2.HeartbeatRequest:
        return leader_pb2.HeartbeatRequest(
            agent_version="1",
            agent_port=AGENT_PORT,
            highest_epoch=0,
            server=client_report(clock[0], requests, *who),
        )

    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            stream = stub.Heartbeats() if how == "stream" else None  # type: ignore[call-arg]

            async def send(request: leader_pb2.HeartbeatRequest) -> leader_pb2.HeartbeatResponse:
                if stream is None:
                    return await stub.Heartbeat(request, timeout=10)
                await stream.write(request)
                reply = await stream.read()
                assert isinstance(reply, leader_pb2.HeartbeatResponse)
                return reply

            await send(beat(1, "ws-empfang"))
            assert await rig.service.write_queued() == 2  # its record and its client report
            statements.clear()
            hops.clear()
            shifts.clear()
            for n in range(2, 5):
                clock[0] += dt.timedelta(seconds=1)
                await send(beat(n, "ws-empfang"))
            assert len(shifts) == 3  # one reading of the node's clock a message
            assert statements == []  # nothing new: no SQL at all
            assert hops == []  # and no worker thread
            assert store.get_node("hb1").last_heartbeat == clock[0]  # yet the newest is known
            statements.clear()
            clock[0] += dt.timedelta(seconds=1)
            await send(beat(5, "ws-empfang", "ws-labor"))  # a new workstation: queued
            assert statements == []
            assert await rig.service.write_queued() == 1
            assert any("INSERT INTO node_clients" in s for s in statements)
            statements.clear()
            clock[0] += dt.timedelta(seconds=1)
            await send(beat(6, "ws-empfang", "ws-labor"))
            assert statements == []
            # The same report, once the stored one is getting old (half the age at which the
            # engine stops trusting it): written again, so it never looks stale.
            clock[0] += clients_persist(state.heartbeat_interval)
            await send(beat(7, "ws-empfang", "ws-labor"))
            await rig.service.write_queued()
            assert any("INSERT INTO node_clients" in s for s in statements)
            assert clients_persist(5) < report_stale_after(5)
            if stream is not None:
                await stream.done_writing()
    finally:
        await server.stop(None)
        store.close()


@pytest.mark.parametrize("behind", [100, 0, -100])
async def test_a_node_s_client_sightings_are_stored_on_the_leader_s_clock(
    tmp_path: Path, loopback: Callable[[], str], behind: int
) -> None:
    """A node's clock behind the leader's by 100 s (the preflight allows 120): its agent
    reports a workstation on http seen just now, stamped on the node's clock, 100 s before the
    leader's now. Stored as it came, ``--when-quiet 60s`` took the node for quiet and closed
    its http port under that workstation (clock audit H of session 35). The leader moves the
    report's times by how far the message's ``sent_at`` is behind its own clock; a clock ahead
    moves nothing (its times are capped at the leader's now, as ever), nor does one in time."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    node_now = rig.clock[0] - dt.timedelta(seconds=behind)
    request = leader_pb2.HeartbeatRequest(
        agent_version="1",
        agent_port=AGENT_PORT,
        server=client_report(node_now, 1, "ws-empfang"),
        sent_at=ts(node_now),
    )
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            await leader_pb2_grpc.LeaderStub(channel).Heartbeat(request, timeout=10)
        await rig.service.write_queued()
        clients, infos = rig.service.schema.clients_report(["hb1"])
        [seen] = clients
        assert seen.last_seen == rig.clock[0]  # seen just now, on the leader's clock
        assert infos["hb1"].last_http_at == rig.clock[0]
        first = rig.clock[0] - dt.timedelta(hours=1)
        ahead = dt.timedelta(seconds=max(-behind, 0))  # not moved back: as the node said
        assert seen.first_seen == first + ahead
    finally:
        await rig.close()


async def test_a_stream_s_messages_schedule_no_timer_of_their_own(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, a heartbeat's fixed cost: each read of a stream's next message ran under a
    timer of its own (``asyncio.timeout``: one scheduled and cancelled per message, for every
    agent). The deadline of a stream's next message is now a time kept with the stream, which
    the renewal watch sweeps (``LeaderService._sweep``): the messages of a stream schedule no
    timer on the leader's event loop, however many they are (the watch's own sleep is one per
    tick, not per stream). Counts, not times."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    rig.service.batch_seconds = 3600  # the group commit's sleep is not what is counted
    await rig.server.start()
    loop = asyncio.get_running_loop()
    timers: list[str] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        if task is None or task is not rig.service._watch:  # the watch: one per tick
            timers.append(repr(callback)[:80])
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting)
    messages = 20
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]

            async def send(n: int) -> None:
                await stream.write(
                    leader_pb2.HeartbeatRequest(
                        agent_version="1",
                        agent_port=AGENT_PORT,
                        seq=n,
                        renews=True,
                        wants_answer=True,  # the test knows the leader has read it
                        server=client_report(rig.clock[0], n, "ws-empfang"),
                    )
                )
                reply = await stream.read()
                assert isinstance(reply, leader_pb2.HeartbeatResponse)
                assert reply.answers == n

            await send(1)  # the stream is counted, its watch started
            timers.clear()
            for n in range(2, 2 + messages):
                await send(n)
            assert timers == []  # was one per message
            assert len(rig.service._open) == 1
            await stream.done_writing()
    finally:
        await rig.close()


async def test_a_cut_while_the_handler_refuses_a_message_ends_the_stream_once(
    tmp_path: Path, loopback: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    """Review of session 22, L4: the leader cuts a stream (its node removed: ``_cut_refused``
    from the renewal watch) just after the handler read a message, which it then refuses too.
    The handler's abort was the second on the stream: gRPC raised UsageError, and the leader
    logged a spurious internal error with gRPC's "Unexpected [UsageError]" traceback. Made
    deterministic here: the handler's snapshot read (in-process leader, real gRPC and mutual
    TLS) is where the node is removed and the stream cut, before the refusal."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    snapshot = rig.service.snapshot
    cut_now = asyncio.Event()

    async def cut_first() -> Any:
        if cut_now.is_set():
            cut_now.clear()
            rig.store.remove_node("hb1", now=rig.clock[0], actor="test")
            snap = await snapshot()
            rig.service._cut_refused(snap)
            assert service._ENDING  # the cut's abort, under way
            await asyncio.gather(*service._ENDING)  # has run: the stream is ended
        return await snapshot()

    rig.service.snapshot = cut_first  # type: ignore[method-assign]
    request = leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
    try:
        with structlog.testing.capture_logs() as events:
            async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
                stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]
                await stream.write(request)
                assert isinstance(await stream.read(), leader_pb2.HeartbeatResponse)
                cut_now.set()
                await stream.write(request)
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await stream.read()
                assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "removed" in (ended.value.details() or "")
            await asyncio.sleep(0.2)  # the handler's end, logged after the client saw it
    finally:
        await rig.server.stop(None)
        rig.store.close()
    assert not cut_now.is_set()  # the cut came where the test put it
    assert [e for e in events if e["event"] == "rpc.internal_error"] == []
    assert "UsageError" not in caplog.text and "already called" not in caplog.text


async def test_what_heartbeats_of_all_agents_write_goes_into_one_transaction(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """The group commit (issue 15: an fsync'd transaction nearly every renewal-mode message
    was a third of the leader's heartbeat time). Three nodes' streams, four messages each that
    say something new (a new workstation in the client report, a new agent version): no
    transaction while they come, the nodes list shows what they said at once, and then one
    transaction writes all of it; with nothing queued, none. Before, every message was a
    transaction of its own (24 here: the record and the client report)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    rig.service.batch_seconds = 3600  # the test commits (``write_queued``)
    creds = {"hb1": rig.node, "hb2": rig.add_node("hb2", loopback())}
    creds["hb3"] = rig.add_node("hb3", loopback())
    store, clock = rig.store, rig.clock
    await rig.server.start()
    try:
        channels = {n: grpc.aio.secure_channel(rig.target, c) for n, c in creds.items()}
        streams = {
            n: leader_pb2_grpc.LeaderStub(ch).Heartbeats()  # type: ignore[call-arg]
            for n, ch in channels.items()
        }
        commits, transactions = store.db.commits, store.db.transactions
        for i in range(1, 5):
            clock[0] += dt.timedelta(seconds=1)
            for name, stream in streams.items():
                who = [f"ws-{name}-{k}" for k in range(i)]  # one more each time
                await stream.write(
                    leader_pb2.HeartbeatRequest(
                        agent_version=f"v{i}",
                        agent_port=AGENT_PORT,
                        server=client_report(clock[0], i, *who),
                    )
                )
                assert isinstance(await stream.read(), leader_pb2.HeartbeatResponse)
        assert (store.db.commits, store.db.transactions) == (commits, transactions)
        listed = {n.name: n for n in store.list_nodes()}
        assert {n: listed[n].agent_version for n in creds} == dict.fromkeys(creds, "v4")
        assert all(listed[n].last_heartbeat == clock[0] for n in creds)
        written = await rig.service.write_queued()
        assert (store.db.commits, store.db.transactions) == (commits + 1, transactions + 1)
        assert written == 3 + 12  # the newest record of each node, and every client report
        seen = {(c.node, c.workstation) for c in rig.service.schema.clients()}
        assert seen == {(n, f"ws-{n}-{k}") for n in creds for k in range(4)}
        rows = {n.name: n for n in store.list_nodes()}
        assert {n: rows[n].agent_version for n in creds} == dict.fromkeys(creds, "v4")
        assert await rig.service.write_queued() == 0  # nothing queued: no transaction
        assert store.db.transactions == transactions + 1
        for stream in streams.values():
            await stream.done_writing()
        for ch in channels.values():
            await ch.close(None)
    finally:
        await rig.close()


async def test_the_group_commit_runs_by_itself_and_a_failed_one_is_retried(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the test's help: a queued client report is stored within a batch period or so;
    a group commit that fails (here a full disk, as SQLite reports it) loses nothing: what it
    held is queued again and the next period writes it."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    rig.service.batch_seconds = 0.2
    store, clock = rig.store, rig.clock
    await rig.server.start()
    tx = store.db.tx
    failures = [sqlite3.OperationalError("database or disk is full")]

    def failing(**kw: Any) -> Any:
        if failures:
            raise failures.pop()
        return tx(**kw)

    monkeypatch.setattr(store.db, "tx", failing)
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            await leader_pb2_grpc.LeaderStub(channel).Heartbeat(
                leader_pb2.HeartbeatRequest(
                    agent_version="2", server=client_report(clock[0], 1, "ws-flur")
                ),
                timeout=10,
            )
        for _ in range(200):
            if rig.service.schema.clients() and store.queued() == 0:
                break
            await asyncio.sleep(0.05)
        assert failures == []  # the first commit failed
        assert [c.workstation for c in rig.service.schema.clients()] == ["ws-flur"]
        with store.db.read() as db:
            (version,) = db.execute("SELECT agent_version FROM nodes WHERE name = 'hb1'").fetchone()
        assert version == "2"
    finally:
        await rig.close()


async def test_writes_that_say_nothing_new_wait_for_a_later_group_commit(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (s43hb): a renewal-mode message that says nothing new still had its client
    report written (the stored one is ``clients_persist`` old, 2 s in renewal mode) and, every
    other one, its heartbeat record (``HEARTBEAT_PERSIST``): the leader committed about once a
    second however few agents it had. Such writes now wait (``REFRESH_SECONDS``, here an hour),
    never longer than a batch period short of when the stored report would be stale; a write
    that says something new comes within the batch period and takes them along, in one
    commit. Counted: commits and the time each write asked for, not how long anything took
    (the waits are only long enough for the old code's batch period to have passed)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    batch = rig.service.batch_seconds = 0.05
    monkeypatch.setattr(service, "REFRESH_SECONDS", 3600.0)
    store, clock = rig.store, rig.clock
    commits: list[int] = []
    write_queued = store.write_queued

    def counting() -> int:
        written = write_queued()
        commits.append(written)
        return written

    monkeypatch.setattr(store, "write_queued", counting)
    asked: list[float] = []  # the time each queued write asked for (``_start_writer``)
    start_writer = rig.service._start_writer

    def noting(within: float) -> None:
        asked.append(within)
        start_writer(within)

    monkeypatch.setattr(rig.service, "_start_writer", noting)
    stale = report_stale_after(rig.state.heartbeat_interval).total_seconds()

    def beat(version: str, requests: int) -> leader_pb2.HeartbeatRequest:
        return leader_pb2.HeartbeatRequest(
            agent_version=version,
            agent_port=AGENT_PORT,
            renews=True,
            wants_answer=True,
            server=client_report(clock[0], requests, "ws-empfang"),
        )

    async def committed(count: int) -> None:
        for _ in range(500):
            if len(commits) >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{len(commits)} commits, not {count}")

    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]

            async def send(request: leader_pb2.HeartbeatRequest) -> None:
                await stream.write(request)
                assert isinstance(await stream.read(), leader_pb2.HeartbeatResponse)

            await send(beat("1", 1))  # new: its record and its client report, at once
            await committed(1)
            assert commits == [2] and asked == [batch, batch]
            asked.clear()
            clock[0] += dt.timedelta(seconds=20)  # a renewal: its report's times moved on
            await send(beat("1", 2))
            clock[0] += dt.timedelta(seconds=11)  # the next: its record is 31 s old too
            await send(beat("1", 3))
            await asyncio.sleep(20 * batch)
            assert commits == [2]  # neither committed yet (once a batch period each before)
            assert store.queued() == 3  # a report each, one record (the newest)
            # Each waits, but less than the stored report's age allows (a batch period short).
            # (The report at +20 s, then the record and the report at +31 s.)
            assert asked == [
                pytest.approx(stale - 20 - batch),
                3600.0,
                pytest.approx(stale - 11 - batch),
            ]
            clock[0] += dt.timedelta(seconds=1)
            await send(beat("2", 4))  # something new: within a batch period, all of it
            await committed(2)
            assert commits == [2, 3]
            assert store.get_node("hb1").agent_version == "2"
            with store.db.read() as db:
                (version,) = db.execute(
                    "SELECT agent_version FROM nodes WHERE name = 'hb1'"
                ).fetchone()
            assert version == "2"
            # A report whose stored one (+31 s) is nearly stale waits no longer than it may; one
            # whose stored one is as good as stale, a batch period as before.
            asked.clear()
            clock[0] += dt.timedelta(seconds=stale - 2.5)  # its age: 28.5 s
            await send(beat("2", 5))
            clock[0] += dt.timedelta(seconds=stale - 0.02)
            await send(beat("2", 6))
            # (The second's record, 58.5 s old, waits: only its age has it written.)
            assert asked == [pytest.approx(stale - 28.5 - batch), 3600.0, batch]
            await stream.done_writing()
    finally:
        await rig.close()


async def test_refreshes_alone_are_committed_when_due_and_the_writer_then_ends(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s43rev2 (Low): writes that say nothing new, with nothing new queued to take
    them along, are committed by themselves when the first of them is due (the writer's
    deadline, ``_write_due``, as each is queued), not before, in one commit; then the writer
    ends. Counted: commits, writes, and the writer's deadline against the event loop's time
    at the commit (an order, not a duration: ``REFRESH_SECONDS`` is short here only so that
    the test does not wait 10 s)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    batch = rig.service.batch_seconds = 0.05
    refresh = 0.3
    monkeypatch.setattr(service, "REFRESH_SECONDS", refresh)
    store, clock, svc = rig.store, rig.clock, rig.service
    loop = asyncio.get_running_loop()
    commits: list[tuple[int, float]] = []  # (writes, the loop's time as the commit began)
    write_queued = store.write_queued

    def counting() -> int:
        began = loop.time()  # (the loop's clock, time.monotonic: read in the worker thread)
        written = write_queued()
        commits.append((written, began))
        return written

    monkeypatch.setattr(store, "write_queued", counting)
    asked: list[tuple[float, float]] = []  # (within, the writer's deadline then)
    start_writer = svc._start_writer

    def noting(within: float) -> None:
        start_writer(within)
        asked.append((within, svc._write_due))

    monkeypatch.setattr(svc, "_start_writer", noting)

    def beat(requests: int) -> leader_pb2.HeartbeatRequest:
        return leader_pb2.HeartbeatRequest(
            agent_version="1",
            agent_port=AGENT_PORT,
            renews=True,
            wants_answer=True,
            server=client_report(clock[0], requests, "ws-empfang"),
        )

    async def ended(count: int) -> None:
        """``count`` commits made, and the writer ended with nothing queued."""
        for _ in range(500):
            if len(commits) >= count and svc._writer is None:
                break
            await asyncio.sleep(0.02)
        assert len(commits) == count and svc._writer is None
        assert store.queued() == 0 and svc._write_due == math.inf

    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]

            async def send(request: leader_pb2.HeartbeatRequest) -> None:
                await stream.write(request)
                assert isinstance(await stream.read(), leader_pb2.HeartbeatResponse)

            await send(beat(1))  # new: its record and its report, within a batch period
            await ended(1)
            assert [w for w, _ in commits] == [2] and [w for w, _ in asked] == [batch, batch]
            asked.clear()
            clock[0] += dt.timedelta(seconds=20)  # a renewal: only its report's times moved
            await send(beat(2))
            await ended(2)
            assert [w for w, _ in asked] == [refresh]  # (its record is kept in memory)
            assert commits[1][0] == 1 and commits[1][1] >= asked[0][1]  # when due, not before
            asked.clear()
            clock[0] += dt.timedelta(seconds=11)  # the next: its record is 31 s old too
            await send(beat(3))
            await ended(3)
            assert [w for w, _ in asked] == [refresh, refresh]  # the record, the report
            assert commits[2][0] == 2 and commits[2][1] >= min(due for _, due in asked)
            await stream.done_writing()
    finally:
        await rig.close()


async def test_a_batch_taken_before_a_direct_heartbeat_write_does_not_commit_after_it(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of session 22, L2: the group commit took a node's queued record (agent 1.0),
    then a direct write (``Store.heartbeat``: the first message with a renewed certificate)
    stored a newer one (2.0), then the batch committed the older one over it. As the newer
    one was in ``_seen``, later identical messages did not write it again: the store kept
    1.0 until something changed. Deterministic: the batch's thread is held between taking the
    batch and its transaction (a wrapped ``tx``), and the direct write is given its chance
    there (up to 3 s: on the old code it is written by then; on the fixed code it waits for
    the batch, and the wait just runs out)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    store, t0 = rig.store, rig.clock[0]
    db = store.db
    real_tx = db.tx
    taken, go_on = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def held_tx(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "batch" and not taken.is_set():
            taken.set()  # the batch is taken: its records are out of the queue
            assert go_on.wait(30)
        return real_tx(*args, **kwargs)

    def run(work: Callable[[], object]) -> Callable[[], None]:
        def target() -> None:
            try:
                work()
            except BaseException as exc:  # re-raised in the test's thread below
                errors.append(exc)

        return target

    monkeypatch.setattr(db, "tx", held_tx)
    try:
        assert store.queue_heartbeat("hb1", "1.0", now=t0)
        batch = threading.Thread(target=run(store.write_queued), name="batch")
        batch.start()
        assert taken.wait(30)
        newer = t0 + dt.timedelta(seconds=5)
        direct = threading.Thread(
            target=run(lambda: store.heartbeat("hb1", "2.0", now=newer)), name="direct"
        )
        direct.start()
        direct.join(3)
        go_on.set()
        batch.join(30)
        direct.join(30)
        assert not batch.is_alive() and not direct.is_alive()
        if errors:
            raise errors[0]
        assert store.get_node("hb1").agent_version == "2.0"
        # And the same message again is not written (``_seen``): the store must already hold it.
        store.heartbeat("hb1", "2.0", now=newer + dt.timedelta(seconds=1))
        with sqlite3.connect(tmp_path / "leader.sqlite3") as check:
            (version,) = check.execute(
                "SELECT agent_version FROM nodes WHERE name = 'hb1'"
            ).fetchone()
        assert version == "2.0"
    finally:
        go_on.set()
        store.close()


async def test_a_queued_message_keeps_its_node_online_when_an_older_stream_ends(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Found by a clean CI run (``test_transitional``: right after a leader's restart its nodes
    were online, and a finalize a moment later was refused "offline: node3"). A stream that
    ends takes back the liveness it vouched for (``Store.heard_until``), down to its own last
    message; a newer message on another stream was still queued for the group commit, and
    the node's last heartbeat fell back below it, offline until the commit. A message the
    leader received counts as it did when it was written at once."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    store, t0 = rig.store, rig.clock[0]
    try:
        store.heartbeat("hb1", "1", now=t0)  # stored: the old stream's message
        later = t0 + dt.timedelta(seconds=30)
        store.queue_heartbeat("hb1", "2", now=later)  # the new stream's, queued
        store.heard_until("hb1", t0)  # the old stream ends: alive only up to its message
        assert store.get_node("hb1").last_heartbeat == later
        assert {n.name: n.last_heartbeat for n in store.list_nodes()}["hb1"] == later
        store.write_queued()
        assert store.get_node("hb1").last_heartbeat == later
    finally:
        await rig.close()


async def test_a_read_of_the_store_that_ended_before_its_callback_ran_is_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the 200-node benchmark, where the leader hung: a heartbeat that ran between
    the end of a snapshot read and its done-callback found that read still "in flight",
    awaited it (which does not yield: it has ended), found it older than a write it must see,
    and went round again for ever. It must read anew instead."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        state = LeaderState(
            store=store,
            ca=pki.CertificateAuthority.create(),
            clock=lambda: dt.datetime.now(dt.UTC),
            heartbeat_interval=5,
        )
        service = LeaderService(state)
        ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ended.set_result(service._read_snapshot())  # ended; its callback has not run
        service._reading = ended
        store.advance_epoch(7, now=dt.datetime.now(dt.UTC), actor="test")  # a write after it
        awaited: list[object] = []
        shield = asyncio.shield

        def counting(arg: Any) -> Any:
            awaited.append(arg)
            assert len(awaited) < 5, "snapshot() goes round and round"
            return shield(arg)

        monkeypatch.setattr(asyncio, "shield", counting)
        snap = await service.snapshot()
        assert snap.epoch == 7 and snap.generation == store.db.generation
    finally:
        store.close()


# --- renewal mode, in process: the agent's link against the Leader service -------------------


async def test_a_stream_that_never_sends_a_message_ends_at_its_deadline_and_at_the_stop(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left from the last session: a stream that never sent a message was not counted against
    its node, so nothing ended it, not even the leader's stop; it held memory until its client
    went away. Its first message must now come within ``FIRST_MESSAGE_SECONDS`` (or two
    intervals), and the stop ends every open stream."""
    monkeypatch.setattr(service, "FIRST_MESSAGE_SECONDS", 0.5)
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    rig.state.heartbeat_interval = 1  # the deadline: two intervals
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            silent = stub.Heartbeats()  # type: ignore[call-arg]
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(30):
                    await silent.read()
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            rig.state.heartbeat_interval = 60  # the next one's deadline is far off
            waiting = stub.Heartbeats()  # type: ignore[call-arg]
            await waiting.wait_for_connection()
            async with asyncio.timeout(30):
                while not rig.service._open:  # once the leader has it open
                    await asyncio.sleep(0.05)
                assert rig.service.close_streams() == 1  # (it refuses new ones from then on)
                with pytest.raises(grpc.aio.AioRpcError) as stopped:
                    await waiting.read()
            assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await rig.close()


async def test_a_stream_silent_after_its_first_message_ends_at_the_renewal_bound(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of session 26: the streams' deadlines are swept by the renewal watch, which
    looked again only at the earliest deadline it knew; a message moved its stream's deadline
    without telling it, on the thought that a deadline only moves later. After the first
    message it can move earlier (at a 1 s interval the renewal bound is 8 s, the first
    message's deadline 10 s): a stream silent after its first message ended at the first
    deadline, not at the renewal bound. Here the bound is 1 s and the first deadline 60 s."""
    monkeypatch.setattr(service, "FIRST_MESSAGE_SECONDS", 60.0)
    monkeypatch.setattr(service, "renewal_deadline", lambda _interval: 1.0)
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    rig.state.heartbeat_interval = 1
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]
            await stream.write(
                leader_pb2.HeartbeatRequest(
                    agent_version="1",
                    agent_port=AGENT_PORT,
                    seq=1,
                    renews=True,
                    wants_answer=True,
                    server=client_report(rig.clock[0], 1, "ws-x"),
                )
            )
            await stream.read()  # its answer: the message was taken
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(30):  # well before the first deadline's 60 s
                    while isinstance(await stream.read(), leader_pb2.HeartbeatResponse):
                        pass
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "renewal bound" in (ended.value.details() or "")
    finally:
        await rig.close()


LONG_RENEW = 600
"""A renewal bound (s) no test waits for: a message at the bound never mixes into a count."""


def agent_link(
    tmp_path: Path,
    node_files: tuple[bytes, bytes, bytes],
    leader_address: str,
    node_address: str,
    interval: int = 1,
) -> tuple[LeaderLink, LeaderTrust, Journal]:
    """The agent's real heartbeat code (``LeaderLink``, with a real journal, trust and identity
    files; its config built here, no agent daemon) for node hb1 at ``interval`` (1 s)."""
    key_pem, cert_pem, ca_pem = node_files
    files = tmp_path / "agent"
    files.mkdir()
    write_private(files / "key.pem", key_pem)
    for name, pem in (("cert.pem", cert_pem), ("ca.pem", ca_pem)):
        (files / name).write_bytes(pem)
    ca = pki.load_cert_pem(ca_pem)
    identity = Identity.of(
        files / "key.pem", files / "cert.pem", files / "ca.pem", pki.load_cert_pem(cert_pem), ca
    )
    cfg = AgentConfig(
        path=files / "agent.toml", node_name="hb1", addresses=(node_address,), dns_names=(),
        leader_address=leader_address, control_port=CONTROL_PORT, join_port=JOIN_PORT,
        ca_pin="", join_token=None, join_token_file=None, data_dir=files, port=AGENT_PORT,
        heartbeat_interval=interval, server=None, bootstrap_port=9443,
    )  # fmt: skip
    # The lists checked by the crypto worker's op in this process (``InProcess``): a child for
    # each (``certwork``, a third of a second) delayed the stream's answers on a loaded machine.
    trust = LeaderTrust.load(files / "ca.pem", identity.trust_domain, files, InProcess())
    journal = Journal(files / "journal.sqlite3")
    return LeaderLink(cfg, identity, trust, journal), trust, journal


async def until(what: Callable[[], bool], why: str, seconds: float = 30) -> None:
    """Wait until ``what`` holds, or fail saying ``why`` was not seen within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while not what():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {seconds:g} s: {why}") from None


def viewing_link(
    tmp_path: Path, node_files: tuple[bytes, bytes, bytes], leader_address: str, node_address: str
) -> tuple[LeaderLink, LeaderTrust, Journal, agent_pb2.ServerView]:
    """``agent_link`` whose server view is the returned message (a test changes it)."""
    link, trust, journal = agent_link(tmp_path, node_files, leader_address, node_address)
    view = agent_pb2.ServerView(driver="reference", healthy=True, schemes=["http"])

    async def server_view() -> agent_pb2.ServerView:
        return view

    link.server_view = server_view
    return link, trust, journal, view


async def test_an_agent_that_closes_its_stream_counts_alive_until_then_a_dropped_one_less(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Issue 15: the leader's keepalive PINGs were a third of what heartbeats cost it, and
    PINGing less often left a stream that ended only half an interval before its node showed
    offline (an agent's restart made its node flicker). An agent that closes its stream (it
    stops, or moves to a renewed certificate: the real ``LeaderLink.close``) now says so, and
    the leader counts it alive up to that moment: its node stays online for the whole offline
    bound from then. A stream dropped without a word (a killed agent, a vanished host) counts
    alive only up to the last PING it could have answered (``keepalive_seconds``). The old
    agent cancelled its stream, and every end was taken for a vanished agent."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    await rig.server.start()
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:
        await link.beat()  # renewal mode: the stream now vouches for the node
        assert [b.renews for b in rig.service._open] == [True]
        rig.clock[0] += dt.timedelta(seconds=60)  # a minute without a message
        await link.close()
        async with asyncio.timeout(30):
            while rig.service._open:
                await asyncio.sleep(0.02)
        closed_at = rig.clock[0]
        assert rig.store.get_node("hb1").last_heartbeat == closed_at
        assert rig.state.node_online(rig.store.get_node("hb1"))

        # The same agent's next stream, dropped without a word (as a killed agent's).
        (tmp_path / "again").mkdir()
        link2, _, journal2 = agent_link(
            tmp_path / "again", rig.node_files, leader_address, node_address
        )
        try:
            rig.clock[0] += dt.timedelta(seconds=60)
            await link2.beat()
            rig.clock[0] += dt.timedelta(seconds=60)
            link2._drop_stream()
            async with asyncio.timeout(30):
                while rig.service._open:
                    await asyncio.sleep(0.02)
            every, wait = service.keepalive_seconds(rig.state.heartbeat_interval)
            proven = rig.clock[0] - dt.timedelta(seconds=every + wait)
            assert rig.store.get_node("hb1").last_heartbeat == proven
        finally:
            await link2.close()
            journal2.close()
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_an_agent_s_closing_message_does_not_report_its_last_failures_again(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of session 23: the message that closes a stream (``closing``) is a copy of the
    last one sent, bootstrap failures included, and the leader adds the failures a message
    carries to its counts (they are what came in since the last report). A failure reported
    with the last heartbeat before the agent stopped was counted twice, with a second audit
    entry. Failed with 2 where 1 before the goodbye dropped them."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    await rig.server.start()
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    link.failures = failures = FailureLog()
    try:
        failures.record("192.168.1.66", "ws-flur", rig.clock[0])
        await link.beat()  # reports it (and answered: the leader took it)
        assert failures.pending() == []
        await link.close()
        async with asyncio.timeout(30):
            while rig.service._open:
                await asyncio.sleep(0.02)
        rows = rig.service.schema.bootstrap_failures()
        assert [(r.source, r.count) for r in rows] == [("192.168.1.66", 1)]
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_stream_the_leader_ends_as_its_agent_cancels_it_ends_without_an_error(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of session 23 (found by a fuzz of stream lives against the vouch count): the
    leader ends a stream (``_end``: a newer stream replaces it, its certificate is cut, the
    leader stops) at the moment its agent cancels it. gRPC's core then refuses the abort's
    status (``ExecuteBatchError``, GRPC_CALL_ERROR_TOO_MANY_OPERATIONS); the handler, waiting on
    that end, raised it on, and the leader logged ``rpc.internal_error`` and gRPC a traceback
    ("Unexpected [UsageError]": the error's own abort came second). The call had ended: there
    is nothing to end, no error to log, and the stream's vouch is released as on any end.
    Failed on the old code with 17 or 18 errors in 20 tries."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    try:
        with structlog.testing.capture_logs() as events:
            async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
                stub = leader_pb2_grpc.LeaderStub(channel)
                for _ in range(20):
                    call: Any = stub.Heartbeats()  # type: ignore[call-arg]
                    await call.write(
                        leader_pb2.HeartbeatRequest(
                            agent_version="1", renews=True, wants_answer=True, seq=1
                        )
                    )
                    await call.read()
                    (beat,) = rig.service._open
                    call.cancel()  # the agent's cancel, and at once the leader's end
                    service._end(beat, grpc.StatusCode.RESOURCE_EXHAUSTED, "a newer stream")
                    async with asyncio.timeout(30):
                        while rig.service._open:
                            await asyncio.sleep(0.005)
        assert [e for e in events if e["log_level"] == "error"] == []
        assert rig.store._vouched == {} and rig.service._streams == {}
    finally:
        await rig.close()


async def test_every_ended_renewal_stream_releases_its_vouch_a_replaced_one_too(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A guard for the vouch (``Store.vouch``, this session): a renewal stream keeps its node
    online while it is open, so every way a stream ends must release it (the oldest one a
    third stream replaced included), or the node would stay online for ever. Three streams,
    the first replaced, the others cancelled: the node goes offline once its last message is
    3 intervals old. (It passes on the code before the vouch too, which had none to leak.)"""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            calls: list[Any] = []
            for seq in range(3):
                call = stub.Heartbeats()  # type: ignore[call-arg]
                await call.write(
                    leader_pb2.HeartbeatRequest(
                        agent_version="1", renews=True, wants_answer=True, seq=1
                    )
                )
                reply = await call.read()
                assert isinstance(reply, leader_pb2.HeartbeatResponse) and reply.answers == 1, seq
                calls.append(call)
            assert (await calls[0].code()) == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls[1:]:
                call.cancel()
            async with asyncio.timeout(30):
                while rig.service._open:
                    await asyncio.sleep(0.02)
        rig.clock[0] += dt.timedelta(hours=1)
        assert not rig.state.node_online(rig.store.get_node("hb1"))
    finally:
        await rig.close()


PINGS_PER_MESSAGE = """
import asyncio, sys
import grpc
from leader.service import control_server_options

async def main(address: str, options: str) -> None:
    async def handler(requests, context):
        async for _ in requests:
            pass
        yield b"done"

    opts = control_server_options(5) if options == "control" else []
    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"S": grpc.stream_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port(f"{address}:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"{address}:{port}") as channel:
        call = channel.stream_stream("/t.T/S")()
        for _ in range(4):  # heartbeats: a small message now and then on a quiet stream
            await call.write(b"x" * 300)
            await asyncio.sleep(0.3)
        print("MESSAGES SENT", file=sys.stderr, flush=True)  # (the stop's GOAWAY PINGs)
        await call.done_writing()
        assert await call.read() == b"done"
    await server.stop(None)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("options", ["control", "plain"])
def test_the_control_port_answers_a_message_without_a_ping_of_its_own(
    options: str, loopback: Callable[[], str]
) -> None:
    """Issue 15: gRPC's core probes the bandwidth-delay product when data arrives on a quiet
    connection: a PING from the leader, and its answer, for every heartbeat message (a message
    costs the leader about as much again). The control port's options turn the probe off
    (``control_server_options``). Real gRPC in a child process with gRPC's keepalive trace on
    (it logs every PING a server sends): no PING with the control port's options, one or more
    with gRPC's defaults (which shows the count can see them)."""
    done = python_child(PINGS_PER_MESSAGE, loopback(), options, trace=True, timeout=60)
    sent = done.stderr.split("MESSAGES SENT")[0].splitlines()
    pings = [line for line in sent if "SERVER" in line and "Ping" in line]
    if options == "control":
        assert pings == []
    else:
        assert len(pings) >= 2, done.stderr[-2000:]


def test_the_leader_pings_a_quiet_agent_as_rarely_as_the_offline_bound_allows() -> None:
    """Issue 15: a PING on every agent connection every interval was about a third of what
    heartbeats cost the leader. It notices a silent connection within 2.5 intervals now (a
    PING every 2 intervals from 2 s on), still under the 3 silent intervals after which a node
    is offline, so a stopped agent's node goes offline as promptly as before."""
    assert service.keepalive_seconds(5) == (10.0, 2.5)  # the product's 5 s: README
    assert service.keepalive_seconds(1) == (1.5, 1.0)
    for interval in (1, 2, 5, 10, 60):
        every, wait = service.keepalive_seconds(interval)
        assert every + wait == service.KEEPALIVE_NOTICE * interval < 3 * interval
        assert every >= interval and wait >= 1
        options = dict(service.control_server_options(interval))
        assert options["grpc.keepalive_time_ms"] == int(every * 1000)


QUIET_AGENTS = """
import asyncio, sys
import grpc
from leader.service import control_server_options
from nodeagent.leader_link import leader_channel_options

async def main(address: str) -> None:
    async def handler(requests, context):
        async for _ in requests:
            yield b"ok"

    server = grpc.aio.server(options=control_server_options(1))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"S": grpc.stream_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port(f"{address}:0")
    await server.start()
    target = f"{address}:{port}"
    # An agent's channel, and one that sends no PING (a silent agent, for the leader).
    async with grpc.aio.insecure_channel(target, options=leader_channel_options(1)) as agent, \
            grpc.aio.insecure_channel(target) as silent:
        calls = [channel.stream_stream("/t.T/S")() for channel in (agent, silent)]
        for call in calls:
            await call.write(b"x")  # the first message, answered
            assert await call.read() == b"ok"
        print("QUIET BEGINS", file=sys.stderr, flush=True)
        await asyncio.sleep(6)  # 4 of the leader's keepalive times at 1 s: quiet streams
        print("QUIET ENDED", file=sys.stderr, flush=True)  # (the stop's GOAWAY PINGs)
        for call in calls:
            await call.done_writing()
    await server.stop(None)

asyncio.run(main(sys.argv[1]))
"""


def test_the_leader_pings_no_agent_that_pings_it(loopback: Callable[[], str]) -> None:
    """Issue 15 (session 71): a keepalive PING the leader sends costs it about five times what
    answering one does (a timer, a write and the answer's read on gRPC's event-engine threads:
    0.42-0.46 ms of leader CPU per agent and interval at 50 agents, 0.27 without them). gRPC's
    core starts a connection's keepalive time again whenever something arrives on it, so an
    agent that PINGs a little more often than the leader would (``rpc.agent_ping_seconds``) is
    never PINGed by it; one that goes silent is, as before. Real gRPC in a child process with
    its keepalive trace on (it logs every PING sent, by either side, with its connection): a
    server with the control port's options and two quiet streams, each on its own connection,
    one from a channel with the agent's options (which PINGs), one from a channel that sends
    none: the first connection gets no PING from the server, the second two or more (which
    shows the count sees them). (One is let pass: a timer late on a loaded machine.)"""
    assert rpc.agent_ping_seconds(5) == 8.0 < rpc.keepalive_seconds(5)[0]  # the product's 5 s
    for interval in (1, 2, 5, 10, 60):  # never more often than the control port takes them
        assert 1.0 <= rpc.agent_ping_seconds(interval) < rpc.keepalive_seconds(interval)[0]
        taken = dict(service.control_server_options(interval))
        assert taken["grpc.http2.min_ping_interval_without_data_ms"] <= 1000
    done = python_child(QUIET_AGENTS, loopback(), trace=True, timeout=60)
    quiet = done.stderr.split("QUIET BEGINS")[1].split("QUIET ENDED")[0].splitlines()
    by_connection: dict[str, int] = {}
    for line in quiet:
        if "SERVER[" in line and "Ping" in line:
            connection = line.split("SERVER[")[1].split("]")[0]
            by_connection[connection] = by_connection.get(connection, 0) + 1
    counts = sorted(by_connection.values())
    assert counts and counts[-1] >= 2, done.stderr[-2000:]  # the silent one's
    assert len(counts) == 1 or counts[0] <= 1, by_connection  # none (or one) to the agent's
    client = [line for line in quiet if "CLIENT" in line and "Ping" in line]
    assert len(client) >= 2, done.stderr[-2000:]  # the agent's own PINGs


def watch_waits_for_a_change(svc: LeaderService) -> bool:
    """True if the renewal watch is waiting for the store to change (or a deadline), not for
    its next tick."""
    watch = svc._watch
    if watch is None or watch.done():
        return False
    names = []
    awaited: Any = watch.get_coro()
    while awaited is not None:  # the chain of coroutines the watch awaits, outermost first
        code = getattr(awaited, "cr_code", None) or getattr(awaited, "gi_code", None)
        names.append(code.co_name if code is not None else type(awaited).__name__)
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return names[:1] == ["_watch_renewals"] and "wait" in names and "sleep" not in names


async def test_a_quiet_renewal_stream_keeps_its_node_online_without_a_visit_each_second(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Issue 15: the renewal watch visited every open stream each second to move its node's
    time on (``note_alive``), O(agents) a second for agents that said nothing. A renewal
    stream now vouches for its node while it is open (``Store.vouch``), and the watch's tick
    looks at the streams only when the store changed (a cut, news to push)."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)

    class Counted(set[Any]):
        visits = 0

        def __iter__(self) -> Iterator[Any]:
            Counted.visits += 1
            return super().__iter__()

    rig.service._open = Counted()
    ticks: list[int] = []
    real = rig.service.snapshot

    async def counting() -> Any:
        ticks.append(Counted.visits)
        return await real()

    rig.service.snapshot = counting  # type: ignore[method-assign]
    await rig.server.start()
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:
        await link.beat()
        async with asyncio.timeout(30):
            while len(ticks) < 2:  # the message's own read, then the watch's first look
                await asyncio.sleep(0.05)
        async with asyncio.timeout(30):  # then it waits for a change, not a tick
            while not watch_waits_for_a_change(rig.service):
                await asyncio.sleep(0.05)
        settled = Counted.visits
        for _ in range(3):  # woken with nothing changed (as a tick did each second before)
            looked = len(ticks)
            rig.service._changed.set()
            async with asyncio.timeout(30):
                while len(ticks) == looked:
                    await asyncio.sleep(0.05)
        assert Counted.visits == settled  # three more looks, no stream visited
        rig.clock[0] += dt.timedelta(minutes=5)
        assert rig.store.get_node("hb1").last_heartbeat == rig.clock[0]
        assert rig.state.node_online(rig.store.get_node("hb1"))
        rig.store.advance_epoch(7, now=rig.clock[0], actor="test")  # news: the streams, once
        async with asyncio.timeout(30):
            while Counted.visits == settled:
                await asyncio.sleep(0.05)
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_an_agent_in_renewal_mode_sends_a_change_at_once_and_the_rest_at_the_bound(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's real heartbeat code (``LeaderLink``, with a real journal, trust and
    identity files; its config built here, no agent daemon) against the Leader service on a
    real mTLS port. Renewal mode: of its beats, one in ``renew_seconds`` reaches the leader
    (before: every one), a changed report goes at the next beat, and the leader's news (a new
    epoch) reaches it without a message of its own."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    assert service.renew_seconds(1) == 4
    messages: list[leader_pb2.HeartbeatRequest] = []
    real = rig.service._heartbeat

    async def counting(*args: Any) -> Any:
        messages.append(args[1])
        return await real(*args)

    monkeypatch.setattr(rig.service, "_heartbeat", counting)
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    view = agent_pb2.ServerView(driver="reference", healthy=True, schemes=["http"])
    beats: list[int] = []

    async def server_view() -> agent_pb2.ServerView:
        beats.append(len(messages))
        return view

    link.server_view = server_view
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(60):
            while len(beats) < 9:  # about 8 s: messages at 0, 4 and 8 s
                await asyncio.sleep(0.05)
        sent = len(messages)
        assert 2 <= sent <= len(beats) // 2, (sent, len(beats))
        assert all(m.renews for m in messages)
        assert link.healthy
        view.healthy, view.detail = False, "connection refused"
        changed_at = len(beats)
        async with asyncio.timeout(30):
            while not any(m.server.detail for m in messages):
                await asyncio.sleep(0.05)
        assert len(beats) - changed_at <= 2  # the next beat (or the one under way) took it
        rig.store.advance_epoch(9, now=rig.clock[0], actor="test")  # as a rollout's start
        async with asyncio.timeout(30):
            while trust.announced_epoch != 9:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await link.close()
        journal.close()
        await rig.close()


async def test_an_agent_that_took_the_leader_s_revocation_list_sends_no_message_for_it(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the leader counts an agent as holding a revocation list once it wrote it to
    the agent's stream, so a message from the agent that says only "I took it" tells it
    nothing; each round of news (a rollout's superseded certificates, every
    ``CRL_NEWS_SECONDS``) brought one back from every agent (about a millisecond of the
    leader's CPU each). The agent's real LeaderLink against the real Leader service: a beat
    after a list came (its first answer's, an urgent revocation's) is not sent, while a
    change in its report is; the next message carries the number (at the bound at the
    latest).

    The renewal bound is long here (``LONG_RENEW``; 4 s at the 1 s interval): a message the
    bound brought would count as one the list brought, and the two takes (each a child
    process) must not race it on a loaded machine (review 1b, finding 7)."""
    monkeypatch.setattr(service, "renew_seconds", lambda _interval: LONG_RENEW)
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    messages: list[leader_pb2.HeartbeatRequest] = []
    real = rig.service._heartbeat

    async def counting(*args: Any) -> Any:
        messages.append(args[1])
        return await real(*args)

    monkeypatch.setattr(rig.service, "_heartbeat", counting)
    await rig.server.start()
    link, trust, journal, view = viewing_link(
        tmp_path, rig.node_files, leader_address, node_address
    )
    assert rig.store.revoke("5eec", reason="", now=rig.clock[0], actor="test", unknown=True) == [
        "5eec"
    ]
    try:
        await link.beat()  # the stream opens, in renewal mode; its answer brings the list
        assert link._stream is not None and link._stream.renew == LONG_RENEW
        await until(lambda: trust.crl_number == rig.store.revoked()[0], "the first list")
        assert len(messages) == 1 and messages[0].crl_number != trust.crl_number
        await link.beat(quiet=True)  # the list is all that changed: nothing to say
        assert rig.store.revoke(
            "5eed", reason="", now=rig.clock[0], actor="test", unknown=True
        ) == ["5eed"]
        await until(lambda: 0x5EED in trust.revoked, "the admin's revocation, pushed")
        await link.beat(quiet=True)
        view.healthy, view.detail = False, "connection refused"  # a change: sent at once
        await link.beat(quiet=True)
        # The stream keeps its order: a message either quiet beat sent came before this one.
        await until(lambda: any(m.server.detail for m in messages), "the change")
        assert len(messages) == 2
        assert messages[1].crl_number == trust.crl_number == rig.store.revoked()[0]
    finally:
        await link.close()
        journal.close()
        await rig.close()
    # What a message is sent for: its report, not how it was sent nor the list's number.
    said = leader_pb2.HeartbeatRequest(agent_version="1", highest_epoch=2)
    asked = leader_pb2.HeartbeatRequest(agent_version="1", highest_epoch=2, crl_number=3)
    asked.wants_answer, asked.renews, asked.seq = True, True, 7
    assert report_key(asked) == report_key(said)
    assert report_key(said) != report_key(leader_pb2.HeartbeatRequest(agent_version="1"))


async def test_the_agent_s_revocation_list_stays_within_its_validity_with_no_revocation(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 33 (s32risk's risk): a revocation list is valid for ``pki.CRL_VALIDITY`` (7
    days). The leader signed the same number again daily, but an agent holds a list by
    number, so it never got one: with no revocation for a week its ``DATA/crl.pem`` was past
    its nextUpdate, and a server checking the list's freshness would refuse every client. The
    list now gets a new number a day after its number was issued (``CRL_RENEW_AFTER``), which
    reaches a renewal stream as news. Two weeks on the leader's clock, no revocation; real
    LeaderLink and Leader service (the watch reads the store again at once, not in 30 s)."""
    monkeypatch.setattr(service, "renew_seconds", lambda _interval: LONG_RENEW)
    monkeypatch.setattr(service, "SNAPSHOT_MAX_AGE", 0.2)
    monkeypatch.setattr(service, "CRL_NEWS_SECONDS", 0.1)  # a day's list at once
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    await rig.server.start()
    link, trust, journal, _ = viewing_link(tmp_path, rig.node_files, leader_address, node_address)
    assert rig.store.revoke("5eec", reason="", now=rig.clock[0], actor="test", unknown=True) == [
        "5eec"
    ]

    def held() -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl(trust.crl_file.read_bytes())

    try:
        await link.beat()  # the stream opens, in renewal mode; its answer brings the list
        assert link._stream is not None and link._stream.renew == LONG_RENEW
        await until(lambda: trust.crl_number == rig.store.revoked()[0], "the first list")
        first = trust.crl_number
        for day in range(1, 15):
            rig.clock[0] += dt.timedelta(days=1)
            fresh = rig.clock[0] + pki.CRL_VALIDITY - 2 * service.CRL_RENEW_AFTER

            def valid(fresh: dt.datetime = fresh) -> bool:
                next_update = held().next_update_utc
                return next_update is not None and next_update > fresh

            await until(valid, f"a list valid on day {day}")
        assert trust.crl_number > first and 0x5EEC in trust.revoked  # kept, signed by the CA
        assert link._stream is not None and not link._stream.ended  # the same stream: news
        # Signed once per number: a leader that starts again signs the list the agent holds
        # with the same times, not later ones under the same number. (The last day's list may
        # still be on its way: the one before it is valid too; the clock stands still now.)
        await until(
            lambda: trust.crl_number == rig.store.revocations(rig.clock[0]).number,
            "the agent holds the store's list",
        )
        rev = rig.store.revocations(rig.clock[0])
        later = rig.clock[0] + dt.timedelta(hours=5)
        again = LeaderState(
            store=rig.store, ca=rig.state.ca, clock=lambda: later, heartbeat_interval=1
        )
        number, pem = again.crl_of(rev.number, rev.entries, rev.issued)
        assert number == trust.crl_number
        assert x509.load_pem_x509_crl(pem).last_update_utc == held().last_update_utc
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_message_that_crosses_a_pushed_list_does_not_roll_the_leader_s_note_back(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 1b, finding 5: the leader counts a list as the agent's once it wrote it to the
    stream, and the agent sends no message for taking it. A message the agent sent before
    the push came (a change in its report) and read after it carries the older number: the
    note of the stream went back to it, the stream lacked the list again, and the leader
    wrote the whole list once more (at once for an urgent revocation, as here; at the next
    round of news for a superseded certificate). On the leader a stream's number only grows
    while the stream lives. Real LeaderLink and Leader service; the crossing is made by
    reading the message with the number it had before the push."""
    monkeypatch.setattr(service, "renew_seconds", lambda _interval: LONG_RENEW)
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    handled: list[leader_pb2.HeartbeatRequest] = []
    stale: list[int] = []  # the number the next message is read with
    real = rig.service._heartbeat

    async def crossing(*args: Any) -> Any:
        request = args[1]
        if stale:
            request.crl_number = stale.pop()
        reply = await real(*args)
        handled.append(request)  # the handler notes its number next, without a pause
        return reply

    lists: list[int] = []  # each list the leader wrote to a stream, by number
    send = service._Beats.send

    async def sending(
        beat: Any, reply: leader_pb2.HeartbeatResponse, snap: service.Snapshot
    ) -> None:
        if reply.crl_pem:
            lists.append(snap.crl_number)
        await send(beat, reply, snap)

    monkeypatch.setattr(rig.service, "_heartbeat", crossing)
    monkeypatch.setattr(service._Beats, "send", sending)
    await rig.server.start()
    link, trust, journal, view = viewing_link(
        tmp_path, rig.node_files, leader_address, node_address
    )
    assert rig.store.revoke("5eec", reason="", now=rig.clock[0], actor="test", unknown=True) == [
        "5eec"
    ]
    try:
        await link.beat()  # the stream opens, in renewal mode; its answer brings the list
        assert link._stream is not None and link._stream.renew == LONG_RENEW
        await until(lambda: trust.crl_number == rig.store.revoked()[0], "the first list")
        old = trust.crl_number
        (beat,) = rig.service._open
        assert rig.store.revoke(
            "5eed", reason="", now=rig.clock[0], actor="test", unknown=True
        ) == ["5eed"]
        await until(lambda: 0x5EED in trust.revoked, "the admin's revocation, pushed")
        new = trust.crl_number
        await until(lambda: beat.crl_number == new, "the push written")
        assert new > old and lists == [old, new]
        stale.append(old)
        view.healthy, view.detail = False, "connection refused"  # a change: sent at once
        await link.beat(quiet=True)
        await until(lambda: any(m.server.detail for m in handled), "the change")
        assert beat.crl_number == new  # was ``old``
        view.detail = "connection reset"  # one more message: its answer comes after any
        await link.beat(quiet=True)
        await until(lambda: any(m.server.detail == view.detail for m in handled), "the next")
        assert lists == [old, new]  # [old, new, new]: the list written again
        assert beat.crl_number == new == trust.crl_number
        # A message that crosses the list and asks for an answer (an epoch refresh): the
        # answer carries the list only if the stream's note lacks it, not the message's
        # older number (review 2, finding 2).
        stale.append(old)
        view.detail = "connection timed out"
        await link.beat()  # not quiet: sent, and its answer waited for
        await until(lambda: any(m.server.detail == view.detail for m in handled), "the answered")
        assert handled[-1].wants_answer and handled[-1].crl_number == old
        assert lists == [old, new]  # [old, new, new]: the answer brought the list again
        assert beat.crl_number == new == trust.crl_number
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_renewal_with_a_slow_server_view_reaches_the_leader_before_its_deadline(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 3 (session 21): the agent's beat waits for its server's status (up to
    ``SERVER_VIEW_SECONDS``) before it decides whether to send, so its last message before the
    renewal bound left up to half an interval plus that wait after the bound, and the leader
    aborted the stream an interval after it: at a 1 s interval a status that takes 0.7 s
    missed every renewal (``heartbeat.renewal_missed``, a new stream each time, the node
    offline in between). The real LeaderLink against the real Leader service, both at 1 s, the
    leader on the wall clock: one stream all along, no renewal missed, the node online and the
    agent healthy at every sample."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    rig.state.clock = lambda: dt.datetime.now(dt.UTC)
    opened: list[str] = []
    missed: list[str] = []
    count, expired = rig.service._count, rig.service._expired

    def counting(beat: Any, name: str) -> None:
        opened.append(name)
        count(beat, name)

    def expiring(beat: Any) -> None:
        missed.append(beat.name)
        expired(beat)

    monkeypatch.setattr(rig.service, "_count", counting)
    monkeypatch.setattr(rig.service, "_expired", expiring)
    await rig.server.start()
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    view = agent_pb2.ServerView(driver="reference", healthy=True, schemes=["http"])

    async def slow_view() -> agent_pb2.ServerView:
        await asyncio.sleep(0.7)  # a busy node's status: under SERVER_VIEW_SECONDS
        return view

    link.server_view = slow_view
    task = asyncio.create_task(link.run())
    samples: list[tuple[bool, bool | None]] = []
    try:
        async with asyncio.timeout(30):
            while not link.healthy:
                await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        end = loop.time() + 16  # three renewal bounds and more at 1 s (4 s each)
        while loop.time() < end:
            await asyncio.sleep(0.25)
            node = await asyncio.to_thread(rig.store.get_node, "hb1")
            samples.append((rig.state.online(node.last_heartbeat), link.healthy))
        assert missed == []
        assert opened == ["hb1"]  # one stream: never aborted and opened again
        assert samples and all(online and healthy for online, healthy in samples), samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await link.close()
        journal.close()
        await rig.close()


async def test_an_epoch_refresh_waits_for_its_answer_not_for_news_sent_before_it(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 6 (session 21): on the stream the agent took any reply after its write
    for the answer, news included. News the leader sent before it read the agent's message
    (an epoch pushed just before a rollout's new epoch was committed) ended an epoch refresh
    early, and a command with the new epoch was refused (EpochNotAnnounced) although the
    answer carrying it was on its way. Here the leader writes the older epoch on the stream
    after it has read the refresh message and before it answers it: the command's epoch must
    be admitted."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    real = rig.service._heartbeat
    race = [False]

    async def news_first(*args: Any) -> Any:
        if race[0]:  # the refresh message, read by the leader
            race[0] = False
            context = args[2]
            await context.write(leader_pb2.HeartbeatResponse(epoch=6, renew_seconds=4))
            rig.store.advance_epoch(7, now=rig.clock[0], actor="test")
        return await real(*args)

    monkeypatch.setattr(rig.service, "_heartbeat", news_first)
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    trust.refresh = link.beat
    try:
        await link.beat()  # the stream opens, in renewal mode
        assert link._stream is not None and link._stream.renew
        assert rig.service._watch is not None
        rig.service._watch.cancel()  # no news but the one written here
        assert trust.announced_epoch < 6
        race[0] = True
        async with asyncio.timeout(30):
            await trust.admit_epoch(7)  # asks the leader: EpochNotAnnounced on the old code
        assert not race[0] and trust.announced_epoch == 7
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_leader_that_echoes_no_message_number_is_answered_as_before(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader older than ``HeartbeatResponse.answers`` (the Leader service here with its
    answers' number cleared): the agent takes any reply after its message as the answer, and
    an epoch refresh still returns with the leader's epoch."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    real = rig.service._response

    def older(*args: Any, **kwargs: Any) -> leader_pb2.HeartbeatResponse:
        reply = real(*args, **kwargs)
        reply.ClearField("answers")
        return reply

    monkeypatch.setattr(rig.service, "_response", older)
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    trust.refresh = link.beat
    try:
        await link.beat()
        assert link._stream is not None and link._stream.renew and not link._stream.echoes
        assert rig.service._watch is not None
        rig.service._watch.cancel()  # the new epoch comes only as the refresh's answer
        rig.store.advance_epoch(8, now=rig.clock[0], actor="test")
        async with asyncio.timeout(30):
            await trust.admit_epoch(8)
        assert link.healthy and link._stream is not None and link._stream.seq == 2
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_news_the_agent_does_not_take_ends_its_stream_and_the_write_is_not_cancelled(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 6 (session 21): when an agent had not taken pushed news within an
    interval the leader cancelled the write in progress, which leaves a grpc.aio call in no
    defined state. It must leave the write alone and end the stream with a status instead.
    Stand-in: the leader's write of the push never completes (what a write to an agent that
    stopped reading does once HTTP/2 flow control is full; filling it in a test would take
    megabytes and depends on gRPC's window sizing). The rest is real: the Leader service, the
    agent's LeaderLink, mutual TLS."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    await rig.server.start()
    link, _, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    release = asyncio.Event()
    cancelled: list[bool] = []
    real_send = service._Beats.send

    async def stuck(self: Any, reply: leader_pb2.HeartbeatResponse, snap: Any) -> None:
        if reply.answers:  # an answer to a message: written as usual
            return await real_send(self, reply, snap)
        try:
            await release.wait()  # the push: the agent does not take it
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    monkeypatch.setattr(service._Beats, "send", stuck)
    try:
        await link.beat()  # the stream opens, in renewal mode
        stream = link._stream
        assert stream is not None and stream.renew
        rig.store.advance_epoch(9, now=rig.clock[0], actor="test")  # news for the agent
        async with asyncio.timeout(30):
            while stream.ended is None and not cancelled:
                await asyncio.sleep(0.05)
        assert cancelled == []
        assert isinstance(stream.ended, grpc.aio.AioRpcError)
        assert stream.ended.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        await link.close()
        journal.close()
        await rig.close()


async def test_superseded_certificates_reach_renewal_streams_in_rounds_a_revocation_at_once(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (s28leak): each node a rollout leaves done revokes its superseded server
    certificate, and the renewal watch sent the whole, growing revocation list to every agent
    at each change, about once a second through a rollout (500 agents, a second enable-tls:
    ~190 MiB). A list newer only by superseded certificates now waits for the next round
    (``CRL_NEWS_SECONDS``, an hour here: none comes); a certificate the admin revokes goes out
    at once and carries them all; the agent's own message is answered with the newest list.
    The real Leader service and the agent's real LeaderLink over mutual TLS."""
    monkeypatch.setattr(service, "CRL_NEWS_SECONDS", 3600.0)
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.state.heartbeat_interval = 1
    ca_cert = pki.load_cert_pem(rig.node_files[2])
    pushed: list[int] = []  # the list's number in each news sent unasked
    answered: list[int] = []  # and in each answer to a message
    real_send = service._Beats.send

    async def counting(self: Any, reply: leader_pb2.HeartbeatResponse, snap: Any) -> None:
        if reply.crl_pem:
            number = pki.load_crl(reply.crl_pem, ca_cert)[0]
            (answered if reply.answers else pushed).append(number)
        await real_send(self, reply, snap)

    monkeypatch.setattr(service._Beats, "send", counting)
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    issued = rig.clock[0] - dt.timedelta(days=1)

    def server_cert(serial: str) -> str:
        nonlocal issued
        issued += dt.timedelta(minutes=1)
        fingerprint = "sha256:" + serial * 8
        cert = IssuedCert(
            serial, "server", "hb1", "hb1", fingerprint, issued, issued + dt.timedelta(days=90)
        )
        rig.store.record_certificate(cert, actor="test", now=rig.clock[0])
        return fingerprint

    try:
        server_cert("a1")
        await link.beat()  # the stream opens, in renewal mode
        stream = link._stream
        assert stream is not None and stream.renew
        await until(lambda: trust.crl_number == rig.store.revoked()[0], "the first list")
        rig.store.revoke_superseded("hb1", server_cert("a2"), before=issued, now=rig.clock[0])
        await until(lambda: len(pushed) == 1, "the first superseded one, at once")
        for serial in ("a3", "a4"):  # a rollout's next nodes: within the round, not sent
            rig.store.revoke_superseded("hb1", server_cert(serial), before=issued, now=rig.clock[0])
        # A renewal that asks nothing is not answered with the list either.
        quiet = leader_pb2.HeartbeatRequest()
        assert stream.last is not None
        quiet.CopyFrom(stream.last)
        quiet.renews, quiet.wants_answer, quiet.crl_number = True, False, trust.crl_number
        answered.clear()
        await stream.send(quiet, 5, answer=False)
        await asyncio.sleep(2.5)  # five of the watch's ticks at this interval
        assert len(pushed) == 1
        assert answered == []
        assert rig.store.revoke(
            "5eed", reason="", now=rig.clock[0], actor="test", unknown=True
        ) == ["5eed"]
        await until(lambda: len(pushed) == 2, "the admin's revocation, at once")
        assert pushed[1] == rig.store.revoked()[0]
        await until(lambda: {0x5EED, 0xA1, 0xA2, 0xA3} <= trust.revoked, "all of them")
        rig.store.revoke_superseded("hb1", server_cert("a5"), before=issued, now=rig.clock[0])
        await link.beat()  # the agent's own message: answered with the newest list
        assert 0xA4 in trust.revoked
        assert len(pushed) == 2
        # The round comes by itself: a list newer only by a superseded one goes out once the
        # round is due (here at once), with no message and no other change to the store.
        rig.store.revoke_superseded("hb1", server_cert("a6"), before=issued, now=rig.clock[0])
        monkeypatch.setattr(service, "CRL_NEWS_SECONDS", 0.0)
        await until(lambda: len(pushed) == 3, "the round, unasked")
        # ``pushed`` counts what the leader began to send: the agent takes it a moment later
        # (asserting at once failed under load: CI of session 30).
        await until(lambda: 0xA5 in trust.revoked, "the round, taken by the agent")
    finally:
        await link.close()
        journal.close()
        await rig.close()


# --- one leader, nodes enrolled by hand: the stream's security --------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("hbstream"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


class Credentials:
    """A node's certificate and key, as its agent holds them."""

    def __init__(
        self, cluster: Cluster, name: str, address: str, key: pki.PrivateKey, cert_pem: bytes
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.address = address
        self.key = key
        self.cert_pem = cert_pem

    @classmethod
    def enrolled(cls, cluster: Cluster, name: str) -> Credentials:
        """A node enrolled through the join port with a key made here (no agent process)."""
        address = next_loopback()
        key = pki.generate_key()
        token = cluster.create_token(name, address)
        reply = enrol(cluster, enrol_request(token, name, address, key=key))
        return cls(cluster, name, address, key, bytes(reply.certificate_pem))

    @property
    def serial(self) -> str:
        return f"{pki.load_cert_pem(self.cert_pem).serial_number:x}"

    def channel(self) -> grpc.Channel:
        return self.cluster.control_channel(self.cert_pem, pki.key_to_pem(self.key))

    def unary(self, **fields: Any) -> grpc.StatusCode:
        """A unary Heartbeat with this certificate: its status."""
        with self.channel() as ch:
            try:
                leader_pb2_grpc.LeaderStub(ch).Heartbeat(request(**fields), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    def renewed(self) -> Credentials:
        """These credentials renewed (RenewNodeCertificate with a new key), as an agent does."""
        key = pki.generate_key()
        with self.channel() as ch:
            reply = leader_pb2_grpc.LeaderStub(ch).RenewNodeCertificate(
                leader_pb2.RenewNodeCertificateRequest(
                    csr_pem=csr_pem(key, self.name, [self.address])
                ),
                timeout=10,
            )
        return Credentials(self.cluster, self.name, self.address, key, reply.certificate_pem)


def request(**fields: Any) -> leader_pb2.HeartbeatRequest:
    return leader_pb2.HeartbeatRequest(agent_version="test", agent_port=AGENT_PORT, **fields)


class Stream:
    """One open Heartbeats stream: ``beat`` sends a message and reads its answer; ``next``
    reads what the leader sends (a thread reads the stream, so that a read is bounded)."""

    def __init__(self, creds: Credentials) -> None:
        self.channel = creds.channel()
        self.outbox: queue.Queue[leader_pb2.HeartbeatRequest | None] = queue.Queue()
        self.inbox: queue.Queue[leader_pb2.HeartbeatResponse | grpc.RpcError | None] = queue.Queue()
        self.ended: grpc.RpcError | None = None
        replies = leader_pb2_grpc.LeaderStub(self.channel).Heartbeats(
            iter(self.outbox.get, None), timeout=120
        )

        def read() -> None:
            try:
                for reply in replies:
                    self.inbox.put(reply)
                self.inbox.put(None)
            except grpc.RpcError as exc:
                self.inbox.put(exc)

        threading.Thread(target=read, daemon=True).start()

    def next(self, timeout: float = 30) -> leader_pb2.HeartbeatResponse:
        """The next response; the stream's error if it ended (queue.Empty: none came)."""
        if self.ended is not None:
            raise self.ended
        item = self.inbox.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            self.ended = item
            raise item
        assert item is not None, "the stream ended without a status"
        return item

    def status(self, timeout: float = 30) -> grpc.StatusCode:
        """The status the stream ends with, sending nothing (queue.Empty: it did not end)."""
        while True:
            try:
                self.next(timeout)
            except grpc.RpcError as exc:
                return exc.code()

    def beat(self, **fields: Any) -> leader_pb2.HeartbeatResponse:
        self.outbox.put(request(**fields))
        return self.next()

    def send(self, **fields: Any) -> None:
        """A message that asks no answer (renewal mode)."""
        self.outbox.put(request(**fields))

    def refused(self, **fields: Any) -> grpc.StatusCode:
        """The status that ends the stream at the next message (OK if it was answered)."""
        try:
            self.beat(**fields)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


@pytest.fixture
def streams() -> Iterator[Callable[[Credentials], Stream]]:
    opened: list[Stream] = []

    def open_stream(creds: Credentials) -> Stream:
        opened.append(Stream(creds))
        return opened[-1]

    yield open_stream
    for s in opened:
        s.close()


def test_a_removed_nodes_open_stream_is_cut(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    gone = Credentials.enrolled(cluster, "hb-gone")
    stay = Credentials.enrolled(cluster, "hb-stay")
    mine, other = streams(gone), streams(stay)
    assert mine.beat().interval_seconds > 0
    other.beat()
    assert cluster.cli("nodes", "remove", "hb-gone", "--yes").returncode == 0
    assert mine.refused() == UNAUTH
    assert gone.unary() == UNAUTH  # as a new call is
    assert other.refused() == grpc.StatusCode.OK  # another node's stream goes on
    assert other.beat().epoch == other.beat().epoch


def test_a_revoked_certificates_stream_is_cut_and_the_others_get_the_new_list(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    bad = Credentials.enrolled(cluster, "hb-revoked")
    good = Credentials.enrolled(cluster, "hb-good")
    mine, other = streams(bad), streams(good)
    mine.beat()
    first = other.beat()
    ca = pki.CertificateAuthority.load(
        cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
    )
    # No list yet if nothing was revoked in this cluster (the test runs alone), else the newest.
    number = pki.load_crl(first.crl_pem, ca.cert)[0] if first.crl_pem else 0
    assert other.beat(crl_number=number).crl_pem == b""  # it has the newest: none sent
    assert cluster.cli("ca", "revoke", bad.serial).returncode == 0
    assert mine.refused(crl_number=number) == UNAUTH
    assert bad.unary() == UNAUTH
    fresh = other.beat(crl_number=number)
    newer, serials = pki.load_crl(fresh.crl_pem, ca.cert)
    assert newer > number and int(bad.serial, 16) in serials


def test_a_renewed_certificate_s_old_stream_works_until_the_new_one_is_used(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    """The unary rule (``RenewNodeCertificate``): the old certificate stays valid until the
    agent has used the new one; then it is refused, on a stream already open as on a call."""
    old = Credentials.enrolled(cluster, "hb-renew")
    before = streams(old)
    before.beat()
    new = old.renewed()
    assert before.refused() == grpc.StatusCode.OK  # not used yet: the old one still counts
    assert old.unary() == grpc.StatusCode.OK
    after = streams(new)
    after.beat()  # the agent uses the new certificate
    assert before.refused() == UNAUTH
    assert old.unary() == UNAUTH
    assert after.refused() == grpc.StatusCode.OK
    assert new.unary() == grpc.StatusCode.OK


def test_a_node_holds_at_most_two_streams_a_third_ends_its_oldest(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    """A stream holds the leader's memory while it is open, so one node's certificate may
    not pin many: its agent's stream, and one opened before the leader noticed that one die."""
    creds = Credentials.enrolled(cluster, "hb-many")
    first = streams(creds)
    first.beat()
    second = streams(creds)
    second.beat()
    third = streams(creds)
    third.beat()  # a third: the first is ended
    assert first.refused() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert second.refused() == grpc.StatusCode.OK
    assert third.refused() == grpc.StatusCode.OK
    assert any(
        e.get("event") == "heartbeat.stream_replaced" and e.get("node") == "hb-many"
        for e in cluster.leader.log_events()
    )


def test_a_message_over_the_control_ports_limit_ends_its_stream_and_no_other(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    """The control port takes messages of at most ``MAX_AGENT_MESSAGE`` bytes (gRPC's default
    is 4 MiB, which a node could fill with a version string: audit 2 of session 33, M3); a
    larger one ends its stream RESOURCE_EXHAUSTED and the node's next stream is served."""
    creds = Credentials.enrolled(cluster, "hb-big")
    huge = leader_pb2.LiveServer(driver="v" * (MAX_AGENT_MESSAGE + 1))
    assert streams(creds).refused(server=huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert streams(creds).refused() == grpc.StatusCode.OK


def test_a_refused_certificate_cannot_push_the_agents_streams_out(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    """A certificate the leader refuses (here a renewed node's old one, which TLS still
    accepts: the CA signed it and it is not revoked) must not count against the node's streams.
    Before, a stream was counted, and the node's oldest one ended, as it opened, before its
    certificate was checked: whoever held the old certificate could keep pushing the real
    agent's streams out (RESOURCE_EXHAUSTED) and the node would look offline. Now a stream
    counts only once its first message was accepted."""
    old = Credentials.enrolled(cluster, "hb-push")
    new = old.renewed()
    agent = [streams(new), streams(new)]
    for s in agent:
        s.beat()  # the new certificate is used: the old one is refused from now on
    for _ in range(3):
        assert streams(old).refused() == UNAUTH
    assert [s.refused() for s in agent] == [grpc.StatusCode.OK, grpc.StatusCode.OK]


def test_bootstrap_failures_and_the_epoch_arrive_on_the_stream(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    creds = Credentials.enrolled(cluster, "hb-boot")
    stream = streams(creds)
    now = dt.datetime.now(dt.UTC)
    stream.beat(
        bootstrap_failures=[
            leader_pb2.BootstrapFailure(
                source="192.168.1.66", workstation="ws-flur", count=3, last_at=ts(now)
            )
        ]
    )
    rows = [r for r in cluster.store_table("bootstrap_failures") if r["node"] == "hb-boot"]
    assert [(r["source"], r["workstation"], r["count"]) for r in rows] == [
        ("192.168.1.66", "ws-flur", 3)
    ]
    epoch = stream.beat().epoch
    cluster.announce_epoch(epoch + 5)  # as a rollout's start raises it
    assert stream.beat().epoch == epoch + 5


# --- real agents ------------------------------------------------------------------------------


def agent_events(agent: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in agent.log_events() if e.get("event") == event]


def test_a_real_agent_beats_on_the_stream(cluster: Cluster, tmp_path: Path) -> None:
    """A real agent with a reference server: it beats on the stream (never unary), the
    leader sees its server go down, it gets a new revocation list and obeys a new epoch."""
    make = NodeFactory(cluster, tmp_path, "hbs")
    try:
        node = make()
        assert node.agent is not None
        agent = node.agent
        cluster.wait_for_nodes_online([node.name])
        wait_until(
            lambda: cluster.list_nodes()[node.name].server == "http",
            15,
            "the server reported",
            interval=LEADER_POLL,
        )
        # The revocation list: a serial revoked now reaches the agent.
        ca = pki.CertificateAuthority.load(
            cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
        )
        crl = agent.data_dir / "crl.pem"
        assert cluster.cli("ca", "revoke", "--unknown", "7e57ab1e").returncode == 0

        def has_it() -> bool:
            return crl.exists() and 0x7E57AB1E in pki.load_crl(crl.read_bytes(), ca.cert)[1]

        wait_until(has_it, 15, "the agent holds the new revocation list")
        # The epoch: a command with an epoch the leader announced only now is obeyed (the
        # agent asks the leader at once, on the stream).
        cluster.announce_epoch(41)
        with node.stub() as stub:
            frozen = stub.Freeze(
                agent_pb2.FreezeRequest(command=agent_pb2.Command(rollout_id="hbs", epoch=41)),
                timeout=RPC_TIMEOUT,
            )
            assert frozen.frozen
            stub.Unfreeze(
                agent_pb2.FreezeRequest(command=agent_pb2.Command(rollout_id="hbs", epoch=41)),
                timeout=RPC_TIMEOUT,
            )
        # The server goes down: the leader notices within a heartbeat or two.
        node.server.stop()
        wait_until(
            lambda: cluster.list_nodes()[node.name].server.startswith("down"),
            20,
            "the leader sees the server down",
            interval=LEADER_POLL,
        )
        assert any(
            e.get("node") == node.name for e in cluster.leader.log_events()
            if e.get("event") == "node.server_down"
        )  # fmt: skip
        oks = agent_events(agent, "heartbeat.ok")
        assert oks and all(e.get("stream") is True for e in oks)
        assert agent_events(agent, "heartbeat.unary") == []
    finally:
        make.close()


# --- renewal mode against the real leader: liveness between messages -------------------------


def test_a_renewal_stream_keeps_its_node_online_until_the_bound_then_it_goes_offline(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    """A stream in renewal mode whose agent says nothing (what a hung agent looks like: its
    gRPC core still answers the leader's PINGs) keeps its node online past the 3 silent
    intervals that made a node offline before (the connection's keepalive vouches for it),
    until the renewal bound passes without a message: then its stream ends with
    DEADLINE_EXCEEDED and the node goes offline."""
    creds = Credentials.enrolled(cluster, "hb-lease")
    stream = streams(creds)
    interval = cluster.heartbeat_interval
    reply = stream.beat(renews=True, wants_answer=True)
    assert reply.renew_seconds == service.renew_seconds(interval) > 3 * interval
    time.sleep(3 * interval + 1)  # silent longer than a node may be without renewal mode
    assert cluster.list_nodes()["hb-lease"].online
    assert stream.status(timeout=60) == grpc.StatusCode.DEADLINE_EXCEEDED
    cluster.wait_for_nodes(["hb-lease"], online=False, timeout=30)
    assert any(
        e.get("event") == "heartbeat.renewal_missed" and e.get("node") == "hb-lease"
        for e in cluster.leader.log_events()
    )


def test_news_reaches_a_renewal_stream_without_a_message(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    """In renewal mode a message asks no answer, so the leader sends what the agent lacks on
    its own: a new epoch (a rollout started) and a new revocation list, at once."""
    creds = Credentials.enrolled(cluster, "hb-news")
    stream = streams(creds)
    first = stream.beat(renews=True, wants_answer=True)
    ca = pki.CertificateAuthority.load(
        cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
    )
    number = pki.load_crl(first.crl_pem, ca.cert)[0] if first.crl_pem else 0
    stream.send(renews=True, crl_number=number)  # nothing new: no answer
    cluster.announce_epoch(first.epoch + 3)
    assert stream.next().epoch == first.epoch + 3
    assert cluster.cli("ca", "revoke", "--unknown", "5eed5eed").returncode == 0
    pushed = stream.next()
    newer, serials = pki.load_crl(pushed.crl_pem, ca.cert)
    assert newer > number and 0x5EED5EED in serials


def test_a_stopped_or_killed_agent_goes_offline_and_a_resumed_one_comes_back(
    cluster: Cluster,
) -> None:
    """Real agents in renewal mode. One SIGSTOPped (it answers nothing, PINGs included: the
    leader's keepalive closes its connection) and one killed (its connection closes) go
    offline as when every heartbeat was a message: 3 silent intervals after they stopped, as
    ``tlsroll nodes`` shows. The stopped one, resumed, comes back on a new stream."""
    stopped = cluster.add_agent("hb-sigstop", next_loopback())
    killed = cluster.add_agent("hb-sigkill", next_loopback())
    try:
        cluster.wait_for_nodes_online(["hb-sigstop", "hb-sigkill"])
        wait_until(
            lambda: all(agent_events(a, "heartbeat.ok") for a in (stopped, killed)),
            20,
            "both agents beating",
        )
        renew = service.renew_seconds(cluster.heartbeat_interval)
        assert all(e.get("renew") == renew for e in agent_events(stopped, "heartbeat.ok"))
        stopped.send_signal(signal.SIGSTOP)
        killed.kill()
        # Within the documented bound (3 intervals after the agent stopped; 6 s here), with
        # room for a busy test machine.
        cluster.wait_for_nodes(["hb-sigstop", "hb-sigkill"], online=False, timeout=30)
        stopped.send_signal(signal.SIGCONT)
        cluster.wait_for_nodes_online(["hb-sigstop"], timeout=30)
    finally:
        stopped.send_signal(signal.SIGCONT)
        stopped.stop()


def test_a_revoked_node_is_offline_at_once_and_its_renewal_stream_is_cut(
    cluster: Cluster,
) -> None:
    """Review of session 21, finding 6 (left open then): a node whose certificate is revoked
    (``tlsroll ca revoke SERIAL``) but not removed stayed online until its agent's next
    message, up to the renewal bound, because its renewal stream vouched for it. Now the node
    is offline from the revocation on (the very next ``nodes`` call says so), and the leader
    ends the agent's stream at once (UNAUTHENTICATED), without waiting for a message. Another
    node's agent stays online. A real agent, in renewal mode, against the real leader."""
    bad = cluster.add_agent("hb-cutoff", next_loopback())
    good = cluster.add_agent("hb-stays", next_loopback())
    try:
        cluster.wait_for_nodes_online(["hb-cutoff", "hb-stays"])
        renew = service.renew_seconds(cluster.heartbeat_interval)
        wait_until(
            lambda: all(
                any(e.get("renew") == renew for e in agent_events(a, "heartbeat.ok"))
                for a in (bad, good)
            ),
            20,
            "both agents beating in renewal mode",
        )
        serial = cluster.list_nodes()["hb-cutoff"].cert_serial
        assert cluster.cli("ca", "revoke", serial).returncode == 0
        listed = cluster.list_nodes()
        assert not listed["hb-cutoff"].online  # at once: no wait for a message
        assert listed["hb-stays"].online
        shown = cluster.cli("nodes").stdout
        (row,) = [line for line in shown.splitlines() if " hb-cutoff " in line]
        assert "offline" in row

        def cut() -> bool:
            """The leader ended the stream: cut at once (``heartbeat.stream_cut``), or, had
            the agent's next message come first, refused that message (seen twice in CI,
            session 25: the agent's report changed right then, its first answer having
            brought the revocation list). That the leader cuts a stream whose agent sends
            nothing: the test after this one, with a stream the test drives."""
            return any(
                e.get("event") == "heartbeat.stream_cut" and e.get("node") == "hb-cutoff"
                for e in cluster.leader.log_events()
            ) or any(
                e.get("code") == "UNAUTHENTICATED" for e in agent_events(bad, "heartbeat.failed")
            )

        try:
            wait_until(cut, 20, "the leader ends the revoked node's stream")
        except TimeoutError:
            # Seen once in CI (session 25, a loaded machine), not reproduced: say what the
            # leader and the agent logged about the stream, for the next time.
            said = [
                {k: e.get(k) for k in ("timestamp", "event", "node", "code", "reason")}
                for e in cluster.leader.log_events()
                if str(e.get("event", "")).startswith("heartbeat.")
            ] + [
                {k: e.get(k) for k in ("timestamp", "event", "code", "detail", "again_in")}
                for e in bad.log_events()
                if str(e.get("event", "")).startswith("heartbeat.")
            ]
            raise AssertionError(
                f"no stream_cut for hb-cutoff within 20 s; logged: {said}"
            ) from None
        assert not cluster.list_nodes()["hb-cutoff"].online  # and it stays offline
        assert cluster.list_nodes()["hb-stays"].online
    finally:
        bad.stop()
        good.stop()


def test_a_revoked_certificate_s_quiet_renewal_stream_is_cut_without_a_message(
    cluster: Cluster, streams: Callable[[Credentials], Stream]
) -> None:
    """The cut itself, with a stream the test drives: in renewal mode, its agent sends
    nothing after the revocation, and the leader ends the stream all the same (UNAUTHENTICATED,
    ``heartbeat.stream_cut``), without waiting for a message."""
    creds = Credentials.enrolled(cluster, "hb-quiet-cut")
    stream = streams(creds)
    stream.beat(renews=True)
    assert cluster.cli("ca", "revoke", creds.serial).returncode == 0
    assert stream.status() == UNAUTH
    assert any(
        e.get("event") == "heartbeat.stream_cut" and e.get("node") == "hb-quiet-cut"
        for e in cluster.leader.log_events()
    )


def test_the_leader_s_stop_writes_what_waits_for_the_group_commit(tmp_path: Path) -> None:
    """A client report queued for the group commit when the leader is told to stop is in the
    store file after the stop (the stop writes the queue after the last stream ended):
    without it the report would be lost at every stop. Real leader daemon; the report comes on
    a stream right before the stop. The leader's group commit is set to an hour (the tests'
    ``TEST_BATCH_ENV``), so only the stop can write the report: with the default second the
    periodic commit could write it first and the test pass without the stop's write (review of
    session 22, L9)."""
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader({service.TEST_BATCH_ENV: "3600"})
        creds = Credentials.enrolled(c, "hb-stop")
        stream = Stream(creds)
        try:
            stream.beat(server=client_report(dt.datetime.now(dt.UTC), 1, "ws-abend"))
            assert c.stop_leader() == 0
        finally:
            stream.close()
        rows = [r for r in c.store_table("node_clients") if r["node"] == "hb-stop"]
        assert [r["workstation"] for r in rows] == ["ws-abend"]
        assert c.store_table("node_clients_info")[0]["node"] == "hb-stop"


def test_the_test_only_batch_period_takes_only_a_usable_number() -> None:
    """``TEST_BATCH_ENV`` steers a test leader's group commit; anything else there leaves the
    period at ``BATCH_SECONDS``."""
    assert service.batch_period({}) == service.BATCH_SECONDS
    assert service.batch_period({service.TEST_BATCH_ENV: "3600"}) == 3600.0
    assert service.batch_period({service.TEST_BATCH_ENV: "0.5"}) == 0.5
    for bad in ("", "soon", "0", "-1", "nan", "inf", "1e9"):
        assert service.batch_period({service.TEST_BATCH_ENV: bad}) == service.BATCH_SECONDS


class OlderLeader:
    """tlsroll's leader before the stream, as far as heartbeats go: the Leader service with
    the unary Heartbeat only (gRPC answers UNIMPLEMENTED to any other method, Heartbeats
    included)."""

    def __init__(self) -> None:
        self.beats: list[str] = []
        self.lock = threading.Lock()

    def heartbeat(self, request: Any, context: Any) -> leader_pb2.HeartbeatResponse:
        with self.lock:
            self.beats.append(request.agent_version)
        return leader_pb2.HeartbeatResponse(leader_time=ts(dt.datetime.now(dt.UTC)))

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "tlsroll.v1.Leader",
            {
                "Heartbeat": grpc.unary_unary_rpc_method_handler(
                    self.heartbeat,
                    request_deserializer=leader_pb2.HeartbeatRequest.FromString,
                    response_serializer=leader_pb2.HeartbeatResponse.SerializeToString,
                )
            },
        )


def test_an_agent_falls_back_to_unary_with_an_older_leader_and_returns_to_the_stream(
    tmp_path: Path,
) -> None:
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        agent = c.add_agent("hb-old", next_loopback())
        c.wait_for_nodes_online(["hb-old"])
        wait_until(lambda: bool(agent_events(agent, "heartbeat.ok")), 10, "the agent beating")

        # The first answer names the leader's serial and the agent dials it anew (session 67):
        # its first stream ends then, and a stop between the two would find no stream. So wait
        # for a beat the leader heard after that dial (its last heartbeat is kept in memory).
        wait_until(lambda: bool(agent_events(agent, "leader.dialed")), 10, "the dial by serial")
        dialed = dt.datetime.fromisoformat(agent_events(agent, "leader.dialed")[-1]["timestamp"])

        def heard_since_the_dial() -> bool:
            shown = json.loads(c.cli("nodes", "--json").stdout)
            nodes = shown["nodes"] if isinstance(shown, dict) else shown
            (node,) = [n for n in nodes if n["name"] == "hb-old"]
            last = node.get("last_heartbeat")
            return bool(last) and dt.datetime.fromisoformat(last) > dialed

        wait_until(heard_since_the_dial, 20, "a heartbeat the leader heard by the serial's link")
        c.stop_leader()
        # The leader ended the agent's stream itself (its graceful stop would otherwise wait
        # out the whole grace period for a stream that never ends).
        closed = [e for e in c.leader.log_events() if e.get("event") == "heartbeat.streams_closed"]
        assert closed and closed[0]["streams"] >= 1
        older = OlderLeader()
        chain, key = c.leader_credentials()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((older.handler(),))
        server.add_secure_port(
            c.control_target,
            grpc.ssl_server_credentials(
                [(key, chain)], root_certificates=c.ca_pem, require_client_auth=True
            ),
        )
        server.start()
        try:
            wait_until(lambda: len(older.beats) >= 3, 20, "unary heartbeats at the older leader")
        finally:
            server.stop(None).wait(10)
        assert agent_events(agent, "heartbeat.unary")
        seen = len(agent.log_events())
        # The leader away for a heartbeat (as during an upgrade): the agent tries the stream
        # again with the next leader.
        wait_until(
            lambda: any(e.get("event") == "heartbeat.failed" for e in agent.log_events()[seen:]),
            20,
            "a heartbeat that found no leader",
        )
        c.start_leader()  # upgraded: the agent comes back on the stream
        c.wait_for_nodes_online(["hb-old"])

        def back_on_the_stream() -> bool:
            later = agent.log_events()[seen:]
            return any(e.get("event") == "heartbeat.ok" and e.get("stream") for e in later)

        wait_until(back_on_the_stream, 20, "the agent back on the stream")


def test_the_store_is_read_only_when_something_changed(tmp_path: Path) -> None:
    """``Database.generation``: what the heartbeat snapshot watches. A heartbeat's routine
    write leaves it; any other write (a revocation, a removal, an epoch) moves it."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        now = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
        g0 = store.db.generation
        with store.db.tx(routine=True) as db:
            db.execute("SELECT 1")
        assert store.db.generation == g0
        store.advance_epoch(3, now=now, actor="test")
        assert store.db.generation > g0
    finally:
        store.close()


@pytest.mark.parametrize("revoke", [True, False])
async def test_after_a_lost_store_the_agents_take_the_new_store_s_revocation_lists(
    tmp_path: Path, loopback: Callable[[], str], revoke: bool
) -> None:
    """Audit s33 H1: a store begun again (``--reinitialise``) or restored from a backup
    numbered its revocation lists from 1 again, and an agent that held a higher number from
    the lost store refused every new list without a word: a leader certificate the admin
    revoked afterwards was still obeyed. Now a list's number is at least the time in ms
    (``revoke``: the admin's revocation after the loss is above any number before it), and
    an agent that says it holds a higher number than the store's makes the leader raise its
    number past it at once (not ``revoke``: nothing revoked since the loss). The agent says
    when it refuses an older list, once per number. Review s64 (H): before it raises it, the
    leader asks the agent for its list (``wants_crl``; the agent sends it with its next
    message) and records what it revokes, so the new list still holds it (not ``revoke``:
    "aa"); its number then passes the agent's without a raise."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    lost = pki.build_crl(rig.state.ca, 57, [("aa", rig.clock[0])], now=rig.clock[0])
    trust.take_crl(pki.crl_to_pem(lost))  # the lost store's list 57
    assert trust.crl_number == 57
    try:
        with structlog.testing.capture_logs() as logs:
            trust.take_crl(pki.crl_to_pem(pki.build_crl(rig.state.ca, 3, [], now=rig.clock[0])))
            trust.take_crl(pki.crl_to_pem(pki.build_crl(rig.state.ca, 3, [], now=rig.clock[0])))
        assert [e["number"] for e in logs if e["event"] == "crl.older"] == [3]
        assert trust.crl_number == 57  # still kept: it is the newer
        if revoke:
            assert rig.store.revoke(
                "bb", reason="", now=rig.clock[0], actor="test", unknown=True
            ) == ["bb"]
        await link.beat()
        if not revoke:  # asked for its list (57, above the store's): it goes with this beat
            await link.beat()
        await until(lambda: trust.crl_number > 57, "the new store's list taken")
        await link.beat()
        assert trust.crl_number == rig.store.revocations().number
        assert (0xBB in trust.revoked) is revoke
        assert (0xAA in trust.revoked) is not revoke  # learned from the agent's list 57
        with rig.store.db.read() as db:
            raised = db.execute("SELECT 1 FROM audit WHERE kind = 'crl.floor_raised'").fetchall()
            learned = db.execute("SELECT 1 FROM audit WHERE kind = 'crl.learned'").fetchall()
        assert (len(raised), len(learned)) == (0, 0 if revoke else 1)
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_held_list_too_large_to_send_is_said_once_per_list_not_at_each_ask(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review b4 of s64 (L3): an agent whose list is too large to send (``HELD_CRL_MAX``) said
    so (``crl.held_too_large``) at each of the leader's asks: every heartbeat until the
    leader's patience ended, and again after each restart of the leader. Now once per list
    (its number); a newer list too large is said again. (The bound made small here.)"""
    monkeypatch.setattr(leader_link, "HELD_CRL_MAX", 64)
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    above = rig.store.revocations().number + 10**6  # the leader asks for it
    for number in (above, above + 1):  # (each taken: the newer)
        trust.take_crl(pki.crl_to_pem(pki.build_crl(rig.state.ca, number, [], now=rig.clock[0])))
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(4):  # asked, then each beat carries the ask's answer
                await link.beat()
            newer = pki.build_crl(rig.state.ca, above + 2, [], now=rig.clock[0])
            trust.take_crl(pki.crl_to_pem(newer))
            for _ in range(3):
                await link.beat()
        said = [e for e in logs if e["event"] == "crl.held_too_large"]
        assert len(said) == 2, said  # (it was said at each of the seven beats but the first)
        assert [e["number"] for e in said] == [above + 1, above + 2], said
        assert trust.crl_number == above + 2  # nothing taken meanwhile: the leader still asks
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_one_node_s_list_numbers_restart_no_other_node_s_patience_nor_tell_a_restore(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review b4 of s64 (L4): the leader's asks for an agent's list (``_crl_asked``) were one
    dict for every node, cleared when full; one node saying another number at each message
    started every other agent's patience (``crl_patience``) again, for ever, and those agents
    never got the leader's list. And a leader whose store was never restored warned that "the
    backup the store was restored from" lacked revocations when an agent said a number above
    the store's (a clock ahead, a node that lies). Now the asks are kept per node, each node's
    bounded on its own, and the warning names the node's word without a restore. (The global
    bound made small here: 4096 numbers would take minutes.)"""
    monkeypatch.setattr(service, "MAX_CALLERS", 8)
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    liar = rig.add_node("hb2", loopback())
    await rig.server.start()
    held = rig.store.revocations().number + 10**6  # above the store's: asked for

    def beat(number: int) -> leader_pb2.HeartbeatRequest:
        return leader_pb2.HeartbeatRequest(
            agent_version="1", agent_port=AGENT_PORT, crl_number=number,
            features=[features.HELD_CRL],
        )  # fmt: skip

    try:
        with structlog.testing.capture_logs() as logs:
            async with (
                grpc.aio.secure_channel(rig.target, rig.node) as honest,
                grpc.aio.secure_channel(rig.target, liar) as lying,
            ):
                hb1, hb2 = leader_pb2_grpc.LeaderStub(honest), leader_pb2_grpc.LeaderStub(lying)
                asked = await hb1.Heartbeat(beat(held))
                assert asked.wants_crl and not asked.crl_pem
                rig.clock[0] += dt.timedelta(seconds=30)
                for i in range(1, 11):  # another number at each message
                    said = await hb2.Heartbeat(beat(held + i))
                    assert said.wants_crl, i
                rig.clock[0] += dt.timedelta(seconds=31)  # hb1 asked 61 s ago: patience is 60
                answer = await hb1.Heartbeat(beat(held))
                assert not answer.wants_crl and answer.crl_pem
                again = await hb2.Heartbeat(beat(held + 10))  # its own patience, 31 s
                assert again.wants_crl and not again.crl_pem
        [unlearned] = [e for e in logs if e["event"] == "crl.not_learned"]
        assert (unlearned["node"], unlearned["held"]) == ("hb1", held), unlearned
        assert "within 60 s" in unlearned["why"], unlearned
        detail = unlearned["detail"]
        assert "the backup the store was restored from" not in detail, detail
        assert "node hb1's agent says it holds revocation list" in detail, detail
        assert "neither restored from a backup nor begun again" in detail, detail
    finally:
        await rig.close()


async def test_one_node_s_list_numbers_push_out_no_other_node_s_wanted_list(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 66 (the rest of review b4 of s64, L4): the numbers of the lists the leader wants
    of agents (``_crl_wanted``) and of those an agent could not send (``_crl_unsent``) were one
    set each for every node, cleared when full. One node saying another number at each message
    pushed an honest agent's wanted number out; once the store's number passed it (any
    revocation), that agent's list was no longer taken for one the store may lack: it was not
    learned, and what only it revoked stayed valid. Now each node's numbers are its own,
    bounded by themselves (``CRL_ASKS_PER_NODE``), and go with the node when it is removed.
    (The global bound made small here: 4096 numbers would take minutes.)"""
    monkeypatch.setattr(service, "MAX_CALLERS", 8)
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    liar = rig.add_node("hb2", loopback())
    await rig.server.start()
    held = rig.store.revocations().number + 1  # above the store's: wanted
    lost = pki.build_crl(rig.state.ca, held, [("aa", rig.clock[0])], now=rig.clock[0])

    def beat(number: int, pem: bytes = b"") -> leader_pb2.HeartbeatRequest:
        return leader_pb2.HeartbeatRequest(
            agent_version="1", agent_port=AGENT_PORT, crl_number=number,
            features=[features.HELD_CRL], held_crl_pem=pem,
        )  # fmt: skip

    def revoked(serial: str) -> bool:
        with rig.store.db.read() as db:
            row = db.execute(
                "SELECT revoked_at FROM certificates WHERE serial = ?", (serial,)
            ).fetchone()
        return row is not None and row["revoked_at"] is not None

    try:
        async with (
            grpc.aio.secure_channel(rig.target, rig.node) as honest,
            grpc.aio.secure_channel(rig.target, liar) as lying,
        ):
            hb1, hb2 = leader_pb2_grpc.LeaderStub(honest), leader_pb2_grpc.LeaderStub(lying)
            asked = await hb1.Heartbeat(beat(held))
            assert asked.wants_crl and not asked.crl_pem
            for i in range(1, 11):  # another number at each message, and a list refused
                said = await hb2.Heartbeat(beat(2**62 + i, b"not a list"))
                assert not said.wants_crl, i
            # The store's number passes the one hb1 holds (hb2's word raised it already:
            # ``_crl_floor``; any revocation moves it too).
            assert rig.store.revoke(
                "bb", reason="", now=rig.clock[0], actor="test", unknown=True
            ) == ["bb"]  # fmt: skip
            assert rig.store.revocations().number > held
            answer = await hb1.Heartbeat(beat(held, pki.crl_to_pem(lost)))
            assert revoked("aa"), "hb1's list was not learned"
            assert not answer.wants_crl and answer.crl_pem
        # A removed node's numbers go with it.
        assert "hb2" in rig.service._crl_unsent
        rig.store.remove_node("hb2", now=rig.clock[0], actor="test")
        rig.state.forget_node("hb2")
        assert "hb2" not in rig.service._crl_unsent
        assert "hb2" not in rig.service._crl_wanted and "hb2" not in rig.service._crl_asked
    finally:
        await rig.close()


async def test_a_learned_list_naming_the_ca_s_own_certificate_revokes_the_rest_not_it(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Session 66: a list learned from an agent (``Store.learn_revoked``) recorded every serial
    it named, the cluster CA's own certificate's too (a release before s63 "revoked" it for
    nothing, and put it in its lists): an "other" certificate revoked under the CA's serial,
    named in every list the leader signed after. A list cannot revoke its own issuer, and
    ``ca revoke`` refuses the CA's serial: learning skips it now, and says so in one log line
    naming the node and the list; the rest of the list is learned."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    held = rig.store.revocations().number + 1  # above the store's: wanted
    ca_serial = rig.state.ca.cert.serial_number
    lost = pki.build_crl(
        rig.state.ca, held, [(f"{ca_serial:x}", rig.clock[0]), ("aa", rig.clock[0])],
        now=rig.clock[0],
    )  # fmt: skip

    def beat(pem: bytes = b"") -> leader_pb2.HeartbeatRequest:
        return leader_pb2.HeartbeatRequest(
            agent_version="1", agent_port=AGENT_PORT, crl_number=held,
            features=[features.HELD_CRL], held_crl_pem=pem,
        )  # fmt: skip

    try:
        with structlog.testing.capture_logs() as logs:
            async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
                stub = leader_pb2_grpc.LeaderStub(channel)
                assert (await stub.Heartbeat(beat())).wants_crl
                answer = await stub.Heartbeat(beat(pki.crl_to_pem(lost)))
        with rig.store.db.read() as db:
            recorded = {
                r["serial"]: r["revoked_at"] is not None
                for r in db.execute("SELECT serial, revoked_at FROM certificates")
            }
        assert recorded.get("aa") is True, recorded
        assert f"{ca_serial:x}" not in recorded, recorded
        number, serials = pki.load_crl(answer.crl_pem, rig.state.ca.cert)
        assert number > held and 0xAA in serials and ca_serial not in serials
        skipped = [e for e in logs if e["event"] == "crl.serial_skipped"]
        assert len(skipped) == 1, skipped
        assert (skipped[0]["serial"], skipped[0]["node"], skipped[0]["number"]) == (
            f"{ca_serial:x}",
            "hb1",
            held,
        ), skipped
        assert "the cluster CA's own certificate" in skipped[0]["why"], skipped
    finally:
        await rig.close()


async def test_a_certificate_of_another_node_s_key_is_not_relearned_and_says_why(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Session 66: within a re-learning window (a store begun again or restored) the leader
    learned any node certificate the CA issued, whatever the store knew of its key: a
    certificate for a new name with the key of node hb1, on record, became a node of its
    own. Refused now as an enrolment of that key is (``_key_refused``): UNAUTHENTICATED, its
    one line (the node whose key it is, the way to a new key), nothing written, and one log
    line however often the agent calls (``node.relearn_refused``)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    with rig.store.db.tx() as db:  # (the window ``--reinitialise`` opens)
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('relearn_until', ?)",
            ((rig.clock[0] + dt.timedelta(hours=24)).isoformat(),),
        )
    await rig.server.start()
    ca, key = rig.state.ca, pki.load_key_pem(rig.node_files[0])
    cert = ca.issue(
        key.public_key(), pki.Names.of("hb9", [loopback()]), server=True, client=True,
        identity=spiffe.node(ca.trust_domain, "hb9"),
        internal_dns=[spiffe.key_host(ca.trust_domain, pki.spki_pin(key.public_key()))],
    )  # fmt: skip
    copy = grpc.ssl_channel_credentials(ca.cert_pem, rig.node_files[0], pki.cert_to_pem(cert))
    nodes = rig.store.list_nodes()
    try:
        with structlog.testing.capture_logs() as logs:
            async with grpc.aio.secure_channel(rig.target, copy) as channel:
                stub = leader_pb2_grpc.LeaderStub(channel)
                for _ in range(2):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.Heartbeat(
                            leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
                        )
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    said = refused.value.details() or ""
                    assert "this key is node 'hb1''s, enrolled" in said, said
                    assert "enrol the node with a new key" in said and "\n" not in said, said
        assert rig.store.list_nodes() == nodes
        logged = [e for e in logs if e["event"] == "node.relearn_refused"]
        assert [e["node"] for e in logged] == ["hb9"], logged
    finally:
        await rig.close()


async def test_an_agent_s_list_number_raises_the_store_s_once_and_no_further_than_the_clock(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Audit s33 H1's floor, bounded: the number an agent says it holds is only its word,
    so a node that lies gets one write per leader start (a store is lost or restored only
    while the leader is down), and no further than the clock takes the number anyway."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            beat = leader_pb2.HeartbeatRequest(
                agent_version="1", agent_port=AGENT_PORT, crl_number=2**64 - 1
            )
            answer = await stub.Heartbeat(beat)
            number, _ = pki.load_crl(answer.crl_pem, rig.state.ca.cert)
            ms = int(rig.clock[0].timestamp() * 1000)
            assert number == rig.store.revocations().number == ms + 1
            assert rig.store.revocations().urgent == number
            generation = rig.store.db.generation
            rig.clock[0] += dt.timedelta(seconds=5)
            await stub.Heartbeat(beat)  # once for this process: no second write
            assert rig.store.revocations().number == number
            assert rig.store.db.generation == generation
    finally:
        await rig.close()


def other_credentials(rig: Any, name: str = "hb1") -> grpc.ChannelCredentials:
    """Credentials with another certificate of the rig's CA naming node ``name`` (as a revoked,
    superseded or removed one does): TLS passes, the leader refuses it."""
    ca = rig.state.ca
    key = pki.generate_key()
    pin = pki.spki_pin(key.public_key())
    cert = ca.issue(
        key.public_key(), pki.Names.of(name, ["127.0.0.9"]), server=True, client=True,
        identity=spiffe.node(ca.trust_domain, name),
        internal_dns=[spiffe.key_host(ca.trust_domain, pin)],
    )  # fmt: skip
    return grpc.ssl_channel_credentials(ca.cert_pem, pki.key_to_pem(key), pki.cert_to_pem(cert))


async def test_a_refused_certificate_of_a_node_neither_wipes_its_liveness_nor_writes(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Audit s33 M1: a heartbeat with a certificate the leader refuses for node hb1 was first
    tried for re-learning, and ``Store.relearn`` forgot hb1's liveness, its queued heartbeat
    and client report before it found the window closed, in a write transaction that moved
    the store's generation on for every agent. hb1 showed offline while its stream was open.
    Now a known node's refused certificate is refused without a write."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    rig.service.batch_seconds = 3600  # what hb1's message queued stays queued
    await rig.server.start()
    store = rig.store
    message = leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT, renews=True)
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            call = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]
            await call.write(message)
            await call.read()  # hb1's agent: a renewal stream, which vouches for it
            queued, generation = store.queued(), store.db.generation
            assert queued and rig.state.node_online(store.get_node("hb1"))
            async with grpc.aio.secure_channel(rig.target, other_credentials(rig)) as bad:
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await leader_pb2_grpc.LeaderStub(bad).Heartbeat(message, timeout=30)
                    assert refused.value.code() == UNAUTH
            assert store.db.generation == generation and store.queued() == queued
            rig.clock[0] += dt.timedelta(seconds=2)
            assert rig.state.node_online(store.get_node("hb1"))
            call.cancel()
    finally:
        await rig.close()


async def test_a_certificate_holds_two_silent_streams_at_most_and_a_refused_one_none(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s33 M2: a stream was counted against its node only at its first accepted
    message, so one node certificate, even one the leader refuses, held any number of silent
    streams (2271 in 3 s on one connection), each until its first message's deadline. Now a
    node's silent streams beyond ``SILENT_STREAMS_PER_NODE`` end its oldest silent one, and a
    certificate the leader refuses is refused as its stream opens. The agent's own stream, a
    message at once, is not pushed out by them."""
    monkeypatch.setattr(service, "FIRST_MESSAGE_SECONDS", 600.0)  # no deadline ends them here
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()

    async def status(call: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await call.read()
        return ended.value.code()

    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            silent = [stub.Heartbeats() for _ in range(20)]  # type: ignore[call-arg]
            ends = [asyncio.ensure_future(status(call)) for call in silent]
            await until(lambda: sum(e.done() for e in ends) == 18, "18 silent streams ended")
            assert {e.result() for e in ends if e.done()} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            await until(lambda: len(rig.service._open) == 2, "two silent streams left")
            agent = stub.Heartbeats()  # type: ignore[call-arg]
            await agent.write(leader_pb2.HeartbeatRequest(agent_version="1", seq=1))
            reply = await agent.read()  # taken (one more silent one ends)
            assert isinstance(reply, leader_pb2.HeartbeatResponse) and reply.interval_seconds > 0
            await until(lambda: sum(e.done() for e in ends) == 19, "the oldest silent one ended")
            assert [b.name for b in rig.service._streams["hb1"]] == ["hb1"]
            async with grpc.aio.secure_channel(rig.target, other_credentials(rig)) as bad:
                refused = leader_pb2_grpc.LeaderStub(bad).Heartbeats()  # type: ignore[call-arg]
                assert await status(refused) == UNAUTH  # without a message
            for call in silent:
                call.cancel()
            agent.cancel()
        await until(lambda: not rig.service._open and not rig.service._silent, "all ended")
    finally:
        await rig.close()


def _clients(*seen: tuple[str, int, int]) -> types_pb2.ClientsView:
    """A client report of one workstation (``ws-1``): (scheme, first_seen, last_seen) each."""
    view = types_pb2.ClientsView(window_seconds=600)
    for scheme, first, last in seen:
        c = view.clients.add(scheme=scheme, address="10.0.0.5", workstation="ws-1", requests=1)
        c.first_seen.seconds, c.last_seen.seconds = first, last
    return view


def test_going_back_to_http_is_news_once_not_per_request() -> None:
    """A workstation that switched (https first seen after its last http request) and then
    went back to http changes only its http ``last_seen``: that is news to the agent
    (``report_key``) and to the leader (``clients_said``), sent and written at once (it was
    not: the stored rows said it had switched until they aged, and a finalize went ahead).
    Later requests of either scheme, which move the times only, are not news again."""
    switched = _clients(("http", 100, 110), ("https", 120, 130))
    back = _clients(("http", 100, 140), ("https", 120, 130))
    again = _clients(("http", 100, 150), ("https", 120, 160))  # more requests: no news
    moved = _clients(("http", 100, 110), ("https", 120, 170))  # a switched one's requests

    def key(view: types_pb2.ClientsView) -> bytes:
        request = leader_pb2.HeartbeatRequest(agent_version="1")
        request.server.clients.CopyFrom(view)
        return report_key(request)

    assert key(switched) != key(back) == key(again)
    assert key(switched) == key(moved)
    assert clients_said(switched) != clients_said(back) == clients_said(again)
    assert clients_said(switched) == clients_said(moved)
    # A tie (whole seconds) counts as switched, as the leader judges it (``still_on_http``).
    tie = _clients(("http", 100, 120), ("https", 120, 130))
    assert key(tie) == key(switched) and clients_said(tie) == clients_said(switched)


def test_an_unnamed_http_client_going_back_after_its_named_https_use_is_news() -> None:
    """Session 68: a PC whose http requests carry no workstation name and whose https ones its
    certificate names (``ws-1``) is one client (``clients.https_matches``): its going back to
    http after its https use is news to the agent (``report_key``) and to the leader
    (``clients_said``) at once, as a named one's is; a clean switch is not, nor are later
    requests. Two names from the address: its unnamed http client is none of them."""

    def view(*seen: tuple[str, str, int, int]) -> types_pb2.ClientsView:
        out = types_pb2.ClientsView(window_seconds=600)
        for scheme, name, first, last in seen:
            c = out.clients.add(scheme=scheme, address="10.0.0.5", workstation=name, requests=1)
            c.first_seen.seconds, c.last_seen.seconds = first, last
        return out

    def key(v: types_pb2.ClientsView) -> bytes:
        request = leader_pb2.HeartbeatRequest(agent_version="1")
        request.server.clients.CopyFrom(v)
        return report_key(request)

    switched = view(("http", "", 100, 110), ("https", "ws-1", 120, 130))
    back = view(("http", "", 100, 140), ("https", "ws-1", 120, 130))
    again = view(("http", "", 100, 150), ("https", "ws-1", 120, 160))
    moved = view(("http", "", 100, 110), ("https", "ws-1", 120, 170))
    assert wire.back_on_http(switched.clients) == frozenset()
    assert wire.back_on_http(back.clients) == {"10.0.0.5"}
    assert key(switched) != key(back) == key(again) and key(switched) == key(moved)
    assert clients_said(switched) != clients_said(back) == clients_said(again)
    assert clients_said(switched) == clients_said(moved)
    shared = view(("http", "", 100, 110), ("https", "ws-1", 120, 130), ("https", "ws-2", 90, 95))
    assert wire.back_on_http(shared.clients) == frozenset()  # (no https of its own: on http)


async def test_a_client_report_is_matched_once_a_message(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 72's L: a client report the leader wrote had its http sightings matched to the
    https ones (``clients.https_matches``) twice, once for what is news (``clients_said``) and
    once for the rows (``client_rows``); now once a message (``service.sightings``). What is
    stored is as before: the client that went back to http keeps its order on the leader's
    clock (its https ``first_seen`` a microsecond before its http ``last_seen``), and a report
    that says the same again is matched once and not written."""
    from tlsroll import clients

    calls: list[int] = []
    real = clients.https_matches

    def counted(seen: Any) -> dict[int, list[int]]:
        calls.append(len(seen))
        return real(seen)

    monkeypatch.setattr(clients, "https_matches", counted)
    monkeypatch.setattr(service, "https_matches", counted)
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    queued: list[str] = []
    queue_write = rig.state.store.queue_write

    def queue(node: str, write: Any) -> None:
        queued.append(node)
        queue_write(node, write)

    monkeypatch.setattr(rig.state.store, "queue_write", queue)
    try:
        now = rig.clock[0]
        back = _clients(("http", 100, 140), ("https", 120, 130))
        for c in back.clients:  # the node's clock an hour ahead: both capped at the leader's now
            c.first_seen.seconds += int(now.timestamp()) + 3600
            c.last_seen.seconds += int(now.timestamp()) + 3600
        rig.service._record_clients("hb1", back, now)
        assert calls == [2] and queued == ["hb1"]
        calls.clear()
        rig.service._record_clients("hb1", back, now)  # nothing new: not written
        assert calls == [2] and queued == ["hb1"]
        rows = {r.scheme: r for r in service.client_rows("hb1", back, now)}
        assert rows["https"].first_seen < rows["http"].last_seen == now, rows
    finally:
        await rig.close()


# --- times an agent sends that are no time (session 67, peers' times) ----------------------


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (0, -1), (0, 10**9), (253402300799, 999999999), (-62135596800, 0)],
    ids=["beyond-9999", "negative-nanos", "nanos-a-second", "end-of-9999", "year-1"],
)
async def test_a_heartbeat_whose_times_are_no_time_or_absurd_stores_none_of_them(
    tmp_path: Path, loopback: Callable[[], str], seconds: int, nanos: int
) -> None:
    """Session 67 (peers' times): every Timestamp of a heartbeat (its ``sent_at``, the
    renewal's due and failing times, the clients' first and last sightings, a bootstrap
    failure's and the server's last login failure's times) out of protobuf's range or absurd
    (year 9999, year 1) is answered OK, never INTERNAL, and none is stored as sent: nothing
    later than the leader's now, and a renewal due more than ``RENEWAL_DUE_SPAN`` away is not
    known (one due in 9999 was stored and listed as said)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    rig.service.batch_seconds = 3600  # the test commits (``write_queued``)
    await rig.server.start()
    now = rig.clock[0]
    bad = Timestamp(seconds=seconds, nanos=nanos)
    server = client_report(now, 3, "ws-a")
    for c in server.clients.clients:
        c.first_seen.CopyFrom(bad)
        c.last_seen.CopyFrom(bad)
    server.login_failures = 2
    server.last_login_failure_at.CopyFrom(bad)
    request = leader_pb2.HeartbeatRequest(
        agent_version="1",
        agent_port=AGENT_PORT,
        sent_at=bad,
        renewal_due_at=bad,
        renewal_failing_since=bad,
        renewal_error="the leader is away",
        server=server,
        bootstrap_failures=[leader_pb2.BootstrapFailure(source="10.0.0.9", count=1, last_at=bad)],
    )
    try:
        with structlog.testing.capture_logs() as logs:
            async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
                await leader_pb2_grpc.LeaderStub(channel).Heartbeat(request, timeout=30)
            await rig.service.write_queued()
        assert not [e["event"] for e in logs if e["log_level"] == "error"]
        node = rig.store.get_node("hb1")
        due = node.renewal_due_at
        assert due is None or abs(due - now) <= service.RENEWAL_DUE_SPAN, due
        assert node.renewal_failing_since is not None and node.renewal_failing_since <= now
        times = [
            t for c in rig.service.schema.clients(["hb1"]) for t in (c.first_seen, c.last_seen)
        ]
        times += [f.last_at for f in rig.service.schema.bootstrap_failures()]
        login = rig.state.server_login_failures["hb1"].last_at
        times += [login] if login is not None else []
        assert times and all(t <= now for t in times), times
    finally:
        await rig.close()
