"""No switch begun on a disk with no room for it (session 73, diskroom).

A node whose disk was full froze its server for a switch, then failed its journal's write
mid-way: a switch held until the admin came. Nothing looked at the free space before. Now the
agent's checks (its preflight, `tlsroll plan`, a start's) and its Stage refuse a node whose data
dir or server config directory has too little free space for a switch's writes
(``tlsroll.room``), or whose journal's checkpoint fails; and the leader refuses `rollout start`
(never the way back) while its own store's checkpoint fails or its data dir has too little
free. The file systems are real small tmpfs mounts, filled (needs root, as
``tests.test_disk_faults``); the servicers run in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from leader.admin_service import AdminService
from leader.cli.rollout import rollout_request
from leader.rollout_core import Change, FreezeMode, RolloutState
from leader.service import LeaderState
from leader.store_health import StoreHealth
from leader.wire import CHANGE, FREEZE
from nodeagent import fsbound, service
from nodeagent.journal import Journal
from nodeagent.service import NodeAgentService
from tests.nodeside import fill, tmpfs
from tests.test_agent_command import Ctx, StillDriver, still_service
from tests.test_engine import VERIFIER_1, make_world
from tlsroll import room
from tlsroll import sqlite as tsqlite
from tlsroll.rpc import RpcStatusError
from tlsroll.v1 import admin_pb2, agent_pb2


@pytest.fixture(autouse=True)
def any_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "require_leader", lambda _context, _trust: None)
    # (the view's handshake: no server at a port of the host's here)
    monkeypatch.setattr(service, "served_certificate", lambda *_: b"")


def agent_on(directory: Path) -> tuple[NodeAgentService, Journal]:
    """The real servicer, its journal in ``directory/data``, its server's config in
    ``directory/cfg`` (a server that is healthy and never changes)."""
    (directory / "data").mkdir()
    (directory / "cfg").mkdir()
    journal = Journal(directory / "data" / "journal.sqlite3")
    driver = StillDriver(directory / "cfg")
    agent = still_service(directory, journal, driver, announced=5)
    return agent, journal


COMMAND = agent_pb2.Command(rollout_id="r1", epoch=3)


async def stage_refused(agent: NodeAgentService) -> str:
    with pytest.raises(RpcStatusError) as caught:
        await agent.Stage(agent_pb2.StageRequest(command=COMMAND), cast(Any, Ctx()))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION, caught.value
    return str(caught.value)


async def test_a_node_with_too_little_free_space_is_refused_by_its_checks_and_its_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data dir and the config directory on one small file system, filled: the checks
    (`tlsroll plan`'s, a start's, the preflight's) say it in one line naming both directories,
    the space each has and needs, and "free space ... (df -h)"; the Stage refuses before it
    looks for its CSR; the way back's checks do not refuse it. Room again: no such problem.
    Before: nothing looked, and the switch froze the server, then held mid-way."""
    fs = tmp_path / "fs"
    with tmpfs(fs, "8m"):
        agent, journal = agent_on(fs)
        try:
            reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
            assert reply.ok, reply.problems  # 8 MiB: room for a switch's writes
            await agent._command(cast(Any, None), COMMAND)  # (the preflight's: the epoch kept)
            filler = fill(fs)
            try:
                reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
                assert not reply.ok
                (line,) = [p for p in reply.problems if "free space" in p]
                assert line.startswith(
                    f"too little free space for a switch: the agent's data dir {fs / 'data'} and"
                    f" the server's config directory {fs / 'cfg'} have "
                ), line
                assert line.endswith("; free space on their file system (df -h)"), line
                need = room.JOURNAL_ROOM + room.CONFIG_ROOM  # (the config file is empty)
                assert f"a switch needs {room.size_text(need)}" in line, line
                said = await stage_refused(agent)
                assert said.startswith("too little free space for a switch"), said
                assert "CSR" not in said
                # (the way back's own plan, which reads what the switch kept, is not this one's)
                monkeypatch.setattr(service, "_plan_problem", lambda *_: None)
                way_back = agent_pb2.CheckRequest(way_back=True)
                back = await agent.Check(way_back, cast(Any, None))
                assert not any("free space" in p for p in back.problems), back.problems
            finally:
                filler.unlink()
            reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
            assert reply.ok, reply.problems
            # (the Stage now gets past the room's check, to its own refusal)
            assert "no CSR for rollout r1" in await stage_refused(agent)
        finally:
            journal.close()


@contextlib.contextmanager
def hung_statvfs(
    under: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[threading.Event, list[int]]]:
    """``os.statvfs`` of anything under ``under`` blocks until the event is set (a fake: a hung
    NFS mount cannot be made here); the list counts the calls that entered it."""
    real = os.statvfs
    gate = threading.Event()
    entered = [0]

    def statvfs(path: Any) -> os.statvfs_result:
        if str(path).startswith(str(under)) and not gate.is_set():
            entered[0] += 1
            gate.wait(120)  # (bounded: a failing test ends)
        return real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    try:
        yield gate, entered
    finally:
        gate.set()


def checks_threads(before: set[threading.Thread]) -> int:
    """The checks' threads started since ``before`` (``threading.enumerate()``) still running."""
    return sum(t.name == "fs-checks" for t in set(threading.enumerate()) - before)


async def test_a_hung_file_system_refuses_the_checks_and_the_stage_for_now_and_piles_up_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s75 revstore (L): the checks and the Stage read the free space (statvfs) on
    the default executor; on a hung network mount under the data or config dir the preflight
    hung (the leader's call timed out and asked again, each try parking one more thread). Now
    the checks run on a thread of their own, bounded (``nodeagent.fsbound``): the preflight's
    checks answer within the bound with why (a problem: a refusal for now), the Stage refuses
    with the same words, and the retries start no thread and no second read while the first
    hangs. Counted: the reads entered, the checks' threads. Once the mount answers, the
    checks pass and the Stage goes on to its own refusal."""
    monkeypatch.setattr(fsbound, "BOUND_SECONDS", 0.5)
    agent, journal = agent_on(tmp_path)
    threads = set(threading.enumerate())
    hung = fsbound.hung_text(agent.fs_checks.what, 0.5)
    assert "a file system there does not answer (a hung network mount?)" in hung
    try:
        with hung_statvfs(tmp_path, monkeypatch) as (gate, entered):
            async with asyncio.timeout(30):  # (a failing test ends: before, it hung here)
                reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
            assert not reply.ok and hung in reply.problems, reply.problems
            await agent._command(cast(Any, None), COMMAND)  # (the preflight's: the epoch kept)
            for _ in range(3):  # the leader's retries
                async with asyncio.timeout(30):
                    reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
                    said = await stage_refused(agent)
                assert hung in reply.problems and said == hung, (reply.problems, said)
            assert (entered[0], agent.fs_checks.threads, checks_threads(threads)) == (1, 1, 1)
            gate.set()
            async with asyncio.timeout(30):
                while agent.fs_checks.hung():  # (the hung read comes back)
                    await asyncio.sleep(0.01)
                reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
            assert reply.ok, reply.problems
            assert "no CSR for rollout r1" in await stage_refused(agent)
            assert (entered[0], agent.fs_checks.threads) == (1, 1)
    finally:
        journal.close()


async def test_a_hung_config_read_answers_the_preflight_and_the_view_within_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same review, further: on such a mount not only the free space hangs; the read of the
    server's config does too, which the preflight's view (and every heartbeat's) made on the
    default executor beside the checks. A driver whose config read blocks (the fake): the
    preflight answers within the bound, its view unhealthy with why and its checks refused;
    one thread each for the checks and the view, one read each, however often asked."""
    monkeypatch.setattr(fsbound, "BOUND_SECONDS", 0.5)
    agent, journal = agent_on(tmp_path)
    driver = cast(StillDriver, agent.driver)
    real = driver.facts
    gate = threading.Event()
    entered = [0]

    def facts() -> Any:
        if not gate.is_set():
            entered[0] += 1
            gate.wait(120)  # (bounded: a failing test ends)
        return real()

    monkeypatch.setattr(driver, "facts", facts)
    try:
        for _ in range(3):  # the leader's retries
            async with asyncio.timeout(30):  # (a failing test ends: before, it hung here)
                reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
            assert not reply.ok
            assert fsbound.hung_text(agent.fs_checks.what, 0.5) in reply.problems
            assert not reply.server.healthy
            assert reply.server.detail == fsbound.hung_text(agent.fs_view.what, 0.5)
        assert (entered[0], agent.fs_checks.threads, agent.fs_view.threads) == (2, 1, 1)
    finally:
        gate.set()
        journal.close()


async def test_the_checks_thread_ends_when_idle_and_another_takes_the_next_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's thread idle ``IDLE_SECONDS`` ends (a test's many services left one each
    behind, for ever); the next call starts another, and a call's error is its caller's."""
    monkeypatch.setattr(fsbound, "IDLE_SECONDS", 0.05)
    worker = fsbound.BoundedWorker("fs-test", "a test's call")
    assert await worker.run(lambda: 1) == 1
    async with asyncio.timeout(30):
        while worker._thread is not None:  # (it ends once idle)
            await asyncio.sleep(0.01)
    with pytest.raises(OSError, match="gone"):
        await worker.run(os.stat, "/gone/for/this/test")
    assert (await worker.run(lambda: 2), worker.threads) == (2, 2)


def test_a_hung_check_holds_no_stop_of_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s75 revstore (L): Python 3.11's ``asyncio.run`` waits for the default
    executor's threads at its end with no bound, so a check hung there (a hung network mount)
    held the agent's stop until systemd killed it, its orderly stop skipped. Now the check's
    daemon thread holds nothing: a loop whose check hangs and whose handler is cancelled (as
    the agent's stop cancels its calls) ends while the read still hangs."""
    monkeypatch.setattr(fsbound, "BOUND_SECONDS", 3600.0)  # (the check still waits at the stop)
    agent, journal = agent_on(tmp_path)
    try:
        with hung_statvfs(tmp_path, monkeypatch) as (_gate, entered):

            async def serve_then_stop() -> None:
                check = asyncio.ensure_future(
                    agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
                )
                async with asyncio.timeout(30):
                    while not entered[0]:
                        await asyncio.sleep(0.01)
                check.cancel()  # (the agent's stop: its server's calls cancelled)
                await asyncio.gather(check, return_exceptions=True)

            loop = threading.Thread(target=asyncio.run, args=(serve_then_stop(),), daemon=True)
            loop.start()
            loop.join(60)  # (before: until the read came back, here never)
            assert not loop.is_alive(), "the loop's end waits for the hung check"
            assert entered[0] == 1
    finally:
        journal.close()


async def test_a_node_whose_journal_checkpoint_fails_is_refused_until_one_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's checkpoint fails as on a full disk (SQLITE_FULL: the file must grow):
    its records still commit into the ``-wal``, until that must grow. The checks and the Stage
    refuse a switch naming the journal and "free space"; a checkpoint that succeeds clears
    it. Before: only the agent's log said it (``db.checkpoint_failed``)."""
    monkeypatch.setattr(tsqlite, "RETRY_FIRST", 3600.0)  # (no retry of its own meanwhile)
    monkeypatch.setattr(tsqlite, "RETRY_MOST", 3600.0)
    agent, journal = agent_on(tmp_path)
    db = journal._db
    real = db._db
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    full.sqlite_errorname = "SQLITE_FULL"
    failing = [True]

    class Failing:  # the journal's connection, whose checkpoint fails while ``failing``
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def execute(self, sql: str, *args: Any) -> Any:
            if failing[0] and sql.startswith("PRAGMA wal_checkpoint"):
                raise full
            return real.execute(sql, *args)

    db._db = cast(Any, Failing())
    try:
        db._checkpoint_idle(tsqlite.IDLE_WAITS)  # (as the store's thread runs it)
        assert journal.checkpoint_trouble == "SQLITE_FULL: database or disk is full"
        reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
        assert not reply.ok
        expected = (
            f"the journal {journal.path} cannot grow: its checkpoint fails (SQLITE_FULL:"
            " database or disk is full); free space on its file system (df -h)"
        )
        assert expected in reply.problems, reply.problems
        assert await stage_refused(agent) == expected
        failing[0] = False
        db._checkpoint_idle(tsqlite.IDLE_WAITS)
        assert journal.checkpoint_trouble is None
        reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
        assert reply.ok, reply.problems
    finally:
        if db._retry is not None:
            db._retry.cancel()
        db._db = real
        journal.close()


async def test_a_node_whose_agent_has_no_room_is_shown_in_the_leaders_view_until_room_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback: Callable[[], str]
) -> None:
    """Session 74: between rollouts the leader did not know of a node whose agent cannot write
    its store safely: `tlsroll nodes`, `schema show` and the viewer showed it healthy, and a
    start's preflight was the first to say it. Now the agent's heartbeat says it
    (``HeartbeatRequest.store_trouble``: the real servicer's checks on a real full tmpfs, then
    its journal's checkpoint failing as on a full disk) over a real stream to the real Leader
    service, which shows it as the node's problem (``agent-store``, in the schema, `tlsroll
    nodes` and the viewer's page, in German and English) from the message that says so,
    its since kept while the free space it names moves, until a message says none."""
    from html import unescape

    from leader.schema_store import SchemaStore
    from leader.schema_view import SchemaViewService
    from leader.states import NodeProblemKind
    from leader.viewer import pages
    from leader.viewer.i18n import Words
    from tests.test_node_clocks import T, leader_and_link, reader_of
    from tlsroll.v1 import schema_pb2

    monkeypatch.setattr(tsqlite, "RETRY_FIRST", 3600.0)  # (no retry of its own meanwhile)
    monkeypatch.setattr(tsqlite, "RETRY_MOST", 3600.0)
    fs = tmp_path / "fs"
    with tmpfs(fs, "8m"):
        agent, journal = agent_on(fs)
        try:
            async with leader_and_link(tmp_path, loopback) as (rig, link, _skew):
                link.store_trouble = agent.store_trouble
                admin = AdminService(rig.state, cast(Any, None), SchemaStore(rig.store.db))

                async def listed() -> list[str]:
                    reply = await admin.ListNodes(admin_pb2.ListNodesRequest(), cast(Any, None))
                    (node,) = reply.nodes
                    return list(node.store_trouble)

                await link.beat()
                assert rig.state.node_problems() == [] and await listed() == []
                filler = fill(fs)
                try:
                    await link.beat()
                    (problem,) = rig.state.node_problems()
                    assert (problem.node, problem.kind) == ("hb1", NodeProblemKind.AGENT_STORE)
                    assert problem.since == T
                    start = (
                        "hb1's agent cannot write its store safely: free space is low for a"
                        f" switch: the agent's data dir {fs / 'data'} and the server's config"
                        f" directory {fs / 'cfg'} have "
                    )
                    assert problem.problem.startswith(start), problem.problem
                    assert problem.problem.endswith(
                        "(df -h); its checks refuse a switch there while it lacks room (it says"
                        " so once that changes)"
                    ), problem.problem
                    (said,) = await listed()
                    assert said.startswith("free space is low for a switch: "), said
                    assert rig.state.node_problem("hb1") is None  # the agent's checks refuse
                    view = SchemaViewService(
                        SchemaStore(rig.store.db),
                        lambda: rig.clock[0],
                        node_problems=rig.state.node_problems,
                        fresh=rig.state.fresh_reports,
                        reported=rig.store.report_since_start,
                    )
                    answer = view._answer(schema_pb2.GetSchemaRequest(), None)
                    (shown,) = answer.node_problems
                    assert shown.kind == schema_pb2.NODE_PROBLEM_KIND_AGENT_STORE
                    assert shown.problem == problem.problem
                    snap = reader_of(rig).read(times=True)
                    page = pages.PageContext("127.0.0.1", "test", T, "/events")
                    for lang, words in (
                        ("de", "Der Agent von Knoten hb1 kann nicht mehr sicher in seinen"),
                        ("en", "The agent of node hb1 cannot write its store safely"),
                    ):
                        html = unescape(pages.schema_content(snap, Words.of(lang), page))
                        assert words in html and "knows no more" not in html, html
                        assert "nicht näher" not in html and problem.problem not in html
                        assert f'<q lang="en">{said}</q>' in html  # (the agent's words: s74 L5)
                    # The journal's checkpoint fails too (SQLITE_FULL, as on a full disk): both
                    # said; the problem's since stays.
                    db = journal._db
                    real = db._db
                    full = sqlite3.OperationalError("database or disk is full")
                    full.sqlite_errorcode = sqlite3.SQLITE_FULL
                    full.sqlite_errorname = "SQLITE_FULL"

                    class Failing:  # the journal's connection, whose checkpoint fails
                        def __getattr__(self, name: str) -> Any:
                            return getattr(real, name)

                        def execute(self, sql: str, *args: Any) -> Any:
                            if sql.startswith("PRAGMA wal_checkpoint"):
                                raise full
                            return real.execute(sql, *args)

                    db._db = cast(Any, Failing())
                    try:
                        db._checkpoint_idle(tsqlite.IDLE_WAITS)  # (as the store's thread runs it)
                    finally:
                        db._db = real
                        if db._retry is not None:
                            db._retry.cancel()
                    assert journal.checkpoint_trouble is not None
                    rig.clock[0] += dt.timedelta(seconds=5)
                    await link.beat()
                    (problem,) = rig.state.node_problems()
                    assert problem.since == T, problem
                    assert (
                        f"the journal {journal.path} cannot grow: its checkpoint fails"
                        " (SQLITE_FULL: database or disk is full)" in problem.problem
                    ), problem.problem
                    assert len(await listed()) == 2
                finally:
                    filler.unlink()
                await link.beat()  # room on the disk, but the journal's checkpoint still fails
                (problem,) = rig.state.node_problems()
                assert "free space for a switch" not in problem.problem
                assert "cannot grow" in problem.problem
                db._checkpoint_idle(tsqlite.IDLE_WAITS)  # (a checkpoint that succeeds)
                assert journal.checkpoint_trouble is None
                await link.beat()
                assert rig.state.node_problems() == [] and await listed() == []
        finally:
            journal.close()


def test_the_free_space_a_store_trouble_names_is_not_news_its_coming_and_going_is() -> None:
    """Session 74: a heartbeat is sent before the renewal bound only with news
    (``report_key``): a filling disk's free space, named in the agent's store trouble, moves at
    every beat and would have made each a message; the trouble that comes, goes or changes
    its kind is news."""
    from nodeagent.leader_link import report_key
    from tlsroll.v1 import leader_pb2

    def key(*trouble: str) -> bytes:
        return report_key(leader_pb2.HeartbeatRequest(agent_version="v", store_trouble=trouble))

    low = "too little free space for a switch: the agent's data dir /d has {} free, needs 4 MiB"
    assert key(low.format("1.2 MiB")) == key(low.format("0.9 MiB")) == key(low.format("8 KiB"))
    assert key() != key(low.format("1.2 MiB"))
    journal = "the journal /d/j cannot grow: its checkpoint fails (SQLITE_FULL: disk is full)"
    assert key(low.format("1 MiB")) != key(low.format("1 MiB"), journal) != key(journal)


def plan_refusal(reply: admin_pb2.PlanResponse) -> str:
    """What `tlsroll plan` (``leader.cli.rollout.plan``) refuses with (exit 1) given ``reply``
    (its warnings must not say it again), "" if it exits 0."""
    from contextlib import nullcontext

    from leader.cli import rollout as rollout_cmd
    from leader.cli.base import CLIError

    leader = type(
        "L",
        (),
        {
            "admin": lambda _self: nullcontext(type("A", (), {"PlanRollout": 0})),
            "call": lambda _self, _method, _request: reply,
        },
    )()
    assert not any("free space" in w or "cannot grow" in w for w in reply.warnings), reply
    try:
        rollout_cmd.plan.callback.__wrapped__(  # type: ignore[union-attr]
            cast(Any, leader), "cluster", None, 0, 1, "node", "rotate-cert", "direct", None, True
        )
    except CLIError as exc:
        return str(exc)
    return ""


async def test_the_leader_refuses_a_start_on_its_full_disk_never_the_way_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's store on a small file system: `rollout start` (its dry run and the start
    itself) is refused while the store's checkpoint fails (in `rollout status`'s words) or
    while its data dir has too little free space; the way back (`rollout rollback`:
    disable-tls) is planned and started all the same. Before: a start went on, and its steps'
    records failed mid-rollout."""
    fs = tmp_path / "fs"
    with tmpfs(fs, "16m"):
        world = make_world(fs, monkeypatch)
        leader = world.boot()
        try:
            health = StoreHealth(world.clock.wall)
            admin = AdminService(
                LeaderState(leader.store, world.ca, world.clock.wall, 1),
                leader.commands,
                leader.schema,
            )
            admin.store_health = health
            first = rollout_request("cluster", None, 1, "node", "enable-tls")
            first.auth_verifier_json = VERIFIER_1
            await admin.StartRollout(first, cast(Any, Ctx()))  # room: it starts
            assert (await leader.run()).rollout.state is RolloutState.COMPLETED
            start = rollout_request("cluster", None, 1, "node", "rotate-cert")
            dry_run = rollout_request("cluster", None, 1, "node", "rotate-cert")
            dry_run.refuse_if_busy = True
            # as `rollout rollback` asks
            way_back = admin_pb2.RolloutRequest(
                change=CHANGE.wire(Change.DISABLE_TLS),
                max_parallel=1,
                freeze=FREEZE.wire(FreezeMode.NODE),
            )

            async def refused() -> str:
                planned = await admin.PlanRollout(dry_run, cast(Any, Ctx()))
                with pytest.raises(RpcStatusError) as caught:
                    await admin.StartRollout(start, cast(Any, Ctx()))
                assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert planned.busy == str(caught.value)
                return planned.busy

            full = sqlite3.OperationalError("database or disk is full")
            full.sqlite_errorname = "SQLITE_FULL"
            health.checkpoint(full)
            said = await refused()
            # `tlsroll plan` shows the plan and exits 1 with it, as for any refusal a start
            # meets now (review s73 revroom: it warned and exited 0).
            assert plan_refusal(await admin.PlanRollout(start, cast(Any, Ctx()))) == (
                f"{said}; nothing was changed"
            )
            assert said.startswith("the leader's store cannot grow since 20"), said
            assert "(SQLITE_FULL) at its checkpoint" in said, said
            assert "free space on the leader's disk (df -h); no rollout starts until then" in said
            assert said.endswith("(the way back, tlsroll rollout rollback, is not refused for it)")
            # the way back is planned and starts (its writes still commit)
            dry_back = admin_pb2.RolloutRequest()
            dry_back.CopyFrom(way_back)
            dry_back.refuse_if_busy = True
            assert (await admin.PlanRollout(dry_back, cast(Any, Ctx()))).busy == ""
            view = await admin.StartRollout(way_back, cast(Any, Ctx()))
            assert view.id and view.undoes
            assert (await leader.run()).rollout.state is RolloutState.COMPLETED
            health.checkpoint(None)  # one succeeded
            filler = fill(fs)
            try:
                said = await refused()
                assert said.startswith(
                    f"too little free space for a rollout: the leader's data dir {fs} has "
                ), said
                assert f"a rollout needs {room.size_text(room.LEADER_ROOM)}" in said, said
                planned = await admin.PlanRollout(start, cast(Any, Ctx()))
                assert plan_refusal(planned) == f"{said}; nothing was changed"
            finally:
                filler.unlink()
            planned = await admin.PlanRollout(dry_run, cast(Any, Ctx()))
            assert not planned.busy, planned.busy  # (room again: planned)
            assert plan_refusal(await admin.PlanRollout(start, cast(Any, Ctx()))) == ""
        finally:
            await leader.stop()


async def test_the_automatic_rotation_is_refused_on_the_leaders_full_disk_as_a_start_is(
    tmp_path: Path,
) -> None:
    """``auto_rotate`` starts its rotation through the leader's commands, not `rollout
    start`'s servicer: it went on where the admin's start is refused (review s73 revroom), a
    rotation whose steps' records would fail mid-way. Now it is blocked with the same words
    (the schema and ``auto_rotate.blocked`` say them), and starts once the store's checkpoint
    works again."""
    import functools

    from leader.store_health import start_refused
    from tests.test_auto_rotate import FakeCommands, FakeSchema, _rotator

    schema = FakeSchema()
    commands = FakeCommands(schema)
    health = StoreHealth(lambda: dt.datetime.now(dt.UTC))
    rotator = _rotator(schema, commands, ["n1"], "2026-12-05 03:00")  # in its window
    # (as the leader's runtime gives it)
    rotator.start_refused = functools.partial(start_refused, health, tmp_path)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"
    health.checkpoint(full)
    decision = await rotator.check()
    assert decision.verdict.value == "blocked", decision
    assert decision.reason.startswith("the leader's store cannot grow since 20"), decision
    assert "no rollout starts until then" in rotator.status.view().reason
    assert not commands.started
    health.checkpoint(None)  # one succeeded
    assert (await rotator.check()).verdict.value == "started"
    assert len(commands.started) == 1
