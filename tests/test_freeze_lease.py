"""The agent's scope freeze lease: ``Freeze``, ``Unfreeze``, the lease watch
(``NodeAgentService.watch_freeze_lease``) and the runner's lifts of a freeze (an owed unfreeze,
a failed way back, a task that died) never interleave (audit s32 H4, review F3).

The watch read the lease, found it run out, and then lifted the freeze and cleared the lease
without looking again, while a Freeze (a leader back after the lease ran out sends one at
once) set a new lease and froze the server in between. Depending on the order, the node took
writes while the leader held the Freeze's ``frozen=True`` (until the next renewal, a third of a
lease later), or stayed frozen with no lease at all (nothing would ever lift it if the leader
then went away). These run the real servicer on a real journal file with a fake server whose
freeze and unfreeze wait for the test, so the orders are the test's, not the scheduler's; only
the caller's certificate check is left out (tests/test_identity.py covers it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path, PosixPath
from typing import Any, Literal, cast

import pytest
from structlog.testing import capture_logs

from nodeagent import lease as lease_module
from nodeagent import service, transaction
from nodeagent.drivers import DriverError, ServerFacts
from nodeagent.journal import Journal, JournalError, Txn
from nodeagent.lease import BOOT_ID, Boot, Lease, boot_clock
from nodeagent.service import NodeAgentService
from nodeagent.transaction import Action, Phase, Plan, Runner
from nodeagent.trust import LeaderTrust
from tests.test_server_user import Aborted, FakeContext
from tlsroll.defaults import MAX_FREEZE_LEASE
from tlsroll.enums import TxnKind, TxnOutcome
from tlsroll.v1 import agent_pb2

START = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
LEASE = 300


class GatedServer:
    """A managed server's freeze and unfreeze (only what the freeze code uses): each says it
    was entered, then waits for its gate (open unless a test closes it) before it acts."""

    name = "gated"

    def __init__(self, *, frozen: bool) -> None:
        self.frozen = frozen
        self.entered = {"freeze": asyncio.Event(), "unfreeze": asyncio.Event()}
        self.gate = {"freeze": asyncio.Event(), "unfreeze": asyncio.Event()}
        for gate in self.gate.values():
            gate.set()

    async def freeze(self, drain_timeout: float) -> int:
        self.entered["freeze"].set()
        await self.gate["freeze"].wait()
        self.frozen = True
        return 7

    async def unfreeze(self) -> None:
        self.entered["unfreeze"].set()
        await self.gate["unfreeze"].wait()
        self.frozen = False

    async def watermark(self) -> int:
        return 7


class WatchedLock(asyncio.Lock):
    """The service's freeze lock, saying when someone had to wait for it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = asyncio.Event()

    async def acquire(self) -> Literal[True]:
        if self.locked():
            self.waited.set()
        return await super().acquire()


class StaleOnce(Journal):
    """A journal whose first lease read returns ``stale``: what the watch read just before a
    Freeze committed a new lease. Counts the lease reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.stale: Lease | None = None
        self.lease_reads = 0

    def freeze_lease(self) -> Lease | None:
        self.lease_reads += 1
        if self.stale is not None:
            stale, self.stale = self.stale, None
            return stale
        return super().freeze_lease()


@pytest.fixture(autouse=True)
def any_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "require_leader", lambda _context, _trust: None)
    monkeypatch.setattr(service, "LEASE_CHECK_SECONDS", 0)  # the watch looks at every turn


def make_agent(
    tmp_path: Path, journal: Journal, server: GatedServer, runner: Runner | None = None
) -> tuple[NodeAgentService, WatchedLock]:
    """The servicer, with ``runner`` as the daemon gives it one (sharing its freeze lock)."""
    trust = LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem")
    trust.announce(1)
    agent = NodeAgentService(
        cast(Any, None),
        cast(Any, None),
        journal,
        cast(Any, server),
        runner,
        lambda: START,
        trust=trust,
    )
    lock = agent._freeze_lock = WatchedLock()
    if runner is not None:
        runner.freeze_lock = lock
    return agent, lock


async def no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


def make_runner(journal: Journal, server: GatedServer) -> Runner:
    return Runner(journal, cast(Any, server), lambda: START, sleep=no_sleep)


def scope_switch(tmp_path: Path) -> tuple[Txn, Plan]:
    """A switch of a ``--freeze scope`` rollout (``keep_frozen``), as the journal holds it."""
    plan = Plan(
        facts=ServerFacts("127.0.0.1", "/", 8080, 8443, ("http",)),
        source_schemes=("http",),
        target_schemes=("https",),
        new_config_file=tmp_path / "new.conf",
        backup_file=tmp_path / "backup.conf",
        ca_file=tmp_path / "ca.pem",
        target_fingerprint="",
        keep_frozen=True,
    )
    txn = Txn(
        rollout_id="r0",
        kind=TxnKind.SWITCH,
        epoch=1,
        phase=Phase.ROLLING_BACK,
        plan=plan.to_json(),
        started_at=START,
        reason="verify failed",
    )
    return txn, plan


def freeze_request() -> agent_pb2.FreezeRequest:
    return agent_pb2.FreezeRequest(
        command=agent_pb2.Command(rollout_id="r1", epoch=1), lease_seconds=LEASE
    )


async def first(*waits: Awaitable[Any]) -> None:
    """Until the first of ``waits`` is done (the others go on, or are dropped if events)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)


def lapsed(logs: list[MutableMapping[str, Any]]) -> bool:
    return any(e.get("event") == "scope_freeze.lease_expired" for e in logs)


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def assert_frozen_with_a_lease(
    journal: Journal, server: GatedServer, reply: agent_pb2.FreezeResponse
) -> None:
    assert reply.frozen
    assert server.frozen, "the leader was told frozen; the server takes writes"
    lease = journal.freeze_lease()
    assert lease is not None, "frozen with no lease: nothing lifts it if the leader goes"
    assert lease[:3] == ("r1", START + dt.timedelta(seconds=LEASE), LEASE)


@pytest.mark.parametrize("freeze_waits", [False, True], ids=["freeze-first", "unfreeze-first"])
async def test_a_freeze_crossing_the_lapse_of_the_lease_leaves_the_node_frozen_with_a_lease(
    tmp_path: Path, freeze_waits: bool
) -> None:
    """The watch has found the lease run out and is lifting the freeze when the leader's Freeze
    arrives. ``freeze-first``: the Freeze freezes the server before the watch's unfreeze acts
    (before: the watch then unfroze it and cleared the new lease; the leader counted the node
    frozen). ``unfreeze-first``: the Freeze's lease is written, then the watch unfreezes and
    clears it, then the Freeze freezes (before: frozen with no lease). Now the Freeze waits
    until the watch is done, and its lease and freeze are what stays."""
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.set_freeze_lease(Lease("r0", START - dt.timedelta(seconds=1), LEASE))  # ran out
    server = GatedServer(frozen=True)
    agent, lock = make_agent(tmp_path, journal, server)
    server.gate["unfreeze"].clear()
    if freeze_waits:
        server.gate["freeze"].clear()
    with capture_logs() as logs:
        watch = asyncio.create_task(agent.watch_freeze_lease())
        await server.entered["unfreeze"].wait()  # the watch is lifting the freeze
        freeze = asyncio.create_task(agent.Freeze(freeze_request(), cast(Any, None)))
        # The Freeze goes as far as it can: its server call, its end, or the lock.
        await first(server.entered["freeze"].wait(), freeze, lock.waited.wait())
        server.gate["unfreeze"].set()
        await until(lambda: lapsed(logs))  # the watch has lifted and cleared
        server.gate["freeze"].set()
        reply = await freeze
        await stop(watch)
    assert_frozen_with_a_lease(journal, server, reply)
    journal.close()


async def test_the_watch_reads_the_lease_again_before_it_lifts_the_freeze(tmp_path: Path) -> None:
    """The watch read the lease just before a Freeze renewed it: what it read has run out, the
    lease in the journal has not. It must not lift the freeze the Freeze has just set."""
    journal = StaleOnce(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    agent, _lock = make_agent(tmp_path, journal, server)
    reply = await agent.Freeze(freeze_request(), cast(Any, None))
    journal.stale = Lease("r1", START - dt.timedelta(seconds=1), LEASE)
    journal.lease_reads = 0
    with capture_logs() as logs:
        watch = asyncio.create_task(agent.watch_freeze_lease())
        await until(lambda: journal.lease_reads >= 3)  # past one whole look (and its re-read)
        await stop(watch)
    assert not lapsed(logs)
    assert server.entered["unfreeze"].is_set() is False
    assert_frozen_with_a_lease(journal, server, reply)
    journal.close()


LIFTS = ["owed-unfreeze", "way-back-failed", "task-died", "scope-switch-ended"]


async def runner_lift(
    path: str, runner: Runner, journal: Journal, tmp_path: Path
) -> asyncio.Task[Any]:
    """Start the runner's lift of a freeze on ``path``: a failed transaction's owed unfreeze
    (the agent started again with it owed), a scope switch whose way back failed
    (``_give_up``), a scope switch whose task died for good (``_die``), or a scope switch at
    its end (``_unfreeze``: s34 review M3). Each reads the lease (none: the rollout's scope
    freeze has been lifted or has lapsed) and then unfreezes."""
    if path == "owed-unfreeze":
        journal.set_unfreeze_owed("r0")
        runner._lift_owed_freeze()
        assert runner._owed is not None
        return runner._owed
    txn, plan = scope_switch(tmp_path)
    txn = journal.create(txn)
    if path == "way-back-failed":
        way_back = runner._give_up(txn, Action.RESTORE_CONFIG, "restore failed", plan)
        return asyncio.create_task(way_back)
    if path == "scope-switch-ended":
        return asyncio.create_task(runner._unfreeze(txn, plan))

    async def proved(_txn: Txn) -> str:
        return ""  # the server proves the config it runs (``Runner._unproved``): it may lift

    # (The fake server answers no status: the freeze would be kept for that, session 69
    # journalm, and what these tests look at, the lease and the lock, never reached.)
    runner._unproved = proved  # type: ignore[method-assign, assignment]
    return asyncio.create_task(runner._die(txn, 4, "database is locked"))


@pytest.mark.parametrize("path", LIFTS)
async def test_a_freeze_crossing_a_lift_by_the_runner_leaves_the_node_frozen_with_a_lease(
    tmp_path: Path, path: str
) -> None:
    """The runner has read "no lease" and is lifting the freeze when the leader's scope Freeze
    arrives (a new ``--freeze scope`` rollout, or the leader back after the lease ran out).
    Before (review F3), the Freeze set its lease and froze the server, was answered
    ``frozen=True``, and then the runner's unfreeze landed: the node took writes while the
    leader counted it frozen and switched the next node. Now the runner's read and unfreeze
    hold the servicer's freeze lock, so the Freeze comes after them, and its freeze stays."""
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=True)
    runner = make_runner(journal, server)
    agent, lock = make_agent(tmp_path, journal, server, runner)
    server.gate["unfreeze"].clear()
    lift = await runner_lift(path, runner, journal, tmp_path)
    await first(server.entered["unfreeze"].wait(), lift)
    assert server.entered["unfreeze"].is_set(), "the runner did not try to lift the freeze"
    freeze = asyncio.create_task(agent.Freeze(freeze_request(), cast(Any, None)))
    # The Freeze goes as far as it can: its server call, its end, or the lock.
    await first(server.entered["freeze"].wait(), freeze, lock.waited.wait())
    server.gate["unfreeze"].set()
    await lift
    reply = await freeze
    assert_frozen_with_a_lease(journal, server, reply)
    assert journal.unfreeze_owed() is None
    journal.close()


@pytest.mark.parametrize("path", LIFTS)
async def test_a_runner_lift_after_a_freeze_leaves_the_freeze_to_its_lease(
    tmp_path: Path, path: str
) -> None:
    """The other order: the Freeze holds the lock (its server call is draining writes) when the
    runner comes to lift. The runner waits for it, reads the lease the Freeze wrote, and leaves
    the freeze to the scope freeze (the leader's Unfreeze, or the lease watch once it runs
    out); what was owed is dropped."""
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    runner = make_runner(journal, server)
    agent, lock = make_agent(tmp_path, journal, server, runner)
    server.gate["freeze"].clear()
    freeze = asyncio.create_task(agent.Freeze(freeze_request(), cast(Any, None)))
    await server.entered["freeze"].wait()
    lift = await runner_lift(path, runner, journal, tmp_path)
    await first(lift, lock.waited.wait())
    server.gate["freeze"].set()
    reply = await freeze
    await lift
    assert not server.entered["unfreeze"].is_set()
    assert_frozen_with_a_lease(journal, server, reply)
    assert journal.unfreeze_owed() is None
    if path == "task-died":
        assert "the freeze is left to the scope freeze's lease" in runner.fatal
    if path == "way-back-failed":
        failed = journal.get("r0", TxnKind.SWITCH)
        assert failed is not None and failed.outcome is TxnOutcome.FAILED
    journal.close()


async def test_a_freeze_grants_no_lease_longer_than_the_longest(tmp_path: Path) -> None:
    """Review 1 of s34, L3: a scope switch that cannot read its lease unfreezes after
    ``MAX_FREEZE_LEASE``, so no Freeze may journal a longer one (the leader never asks more:
    its scope_freeze_lease is bounded by it); a longer request is cut to it."""
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    agent, _lock = make_agent(tmp_path, journal, server)
    request = freeze_request()
    request.lease_seconds = 10 * MAX_FREEZE_LEASE
    reply = await agent.Freeze(request, cast(Any, None))
    assert reply.frozen and server.frozen
    lease = journal.freeze_lease()
    assert lease is not None
    assert lease[:3] == ("r1", START + dt.timedelta(seconds=MAX_FREEZE_LEASE), MAX_FREEZE_LEASE)
    journal.close()


# --- the lease in elapsed time (clock audit s35 A, review 2 F4 of s34) -------------------------


class Clocks:
    """The agent's wall clock, monotonic clock and boot-time clock (with the boot's id): a
    sleep moves all three; a test steps the wall clock alone (NTP, a VM restored from a
    snapshot, an RTC in local time)."""

    def __init__(self) -> None:
        self.wall = START
        self.mono = 1000.0
        self.boot_id = "boot-1"
        self.boottime = 50_000.0

    def clock(self) -> dt.datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def boot(self) -> Boot:
        return Boot(self.boot_id, self.boottime)

    def pass_(self, seconds: float) -> None:
        self.wall += dt.timedelta(seconds=seconds)
        self.mono += seconds
        self.boottime += seconds

    async def sleep(self, seconds: float) -> None:
        self.pass_(seconds)
        await asyncio.sleep(0)


def timed_agent(
    tmp_path: Path, journal: Journal, server: GatedServer, clocks: Clocks
) -> NodeAgentService:
    agent, _lock = make_agent(tmp_path, journal, server)
    agent.clock, agent.monotonic = clocks.clock, clocks.monotonic
    agent.leases.boot = clocks.boot
    return agent


async def frozen_agent(
    tmp_path: Path, clocks: Clocks, seconds: int = LEASE
) -> tuple[NodeAgentService, Journal, GatedServer]:
    """A servicer that has just granted a scope freeze of ``seconds`` (its Freeze), at START."""
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    agent = timed_agent(tmp_path, journal, server, clocks)
    request = freeze_request()
    request.lease_seconds = seconds
    reply = await agent.Freeze(request, cast(Any, None))
    assert reply.frozen and server.frozen
    return agent, journal, server


async def test_a_clock_stepped_back_does_not_stretch_the_freeze_lease(tmp_path: Path) -> None:
    """Clock audit s35 A: the lease was a wall-clock deadline. The node's clock steps back an
    hour during a ``--freeze scope`` rollout and the leader is gone: ten minutes later (a
    five-minute lease) the practice still refused writes, for another 55 minutes, while a
    leader still running recorded the node as unfrozen. The lease runs in elapsed time now."""
    clocks = Clocks()
    agent, journal, server = await frozen_agent(tmp_path, clocks)
    clocks.pass_(LEASE - 1)
    clocks.wall -= dt.timedelta(hours=1)
    assert await agent._lift_lapsed_freeze() is None  # 299 s of 300: it holds
    assert server.frozen
    clocks.pass_(1)
    assert await agent._lift_lapsed_freeze() == "r1"
    assert not server.frozen and journal.freeze_lease() is None
    journal.close()


async def test_a_clock_stepped_forward_does_not_cut_the_freeze_lease(tmp_path: Path) -> None:
    """Clock audit s35 A, the other way: the node's clock steps an hour forward a second after
    the Freeze. The lease watch lifted the freeze at once, while the leader counted the node
    frozen and switched other nodes under the scope freeze (the invariant of audit s32 H4)."""
    clocks = Clocks()
    agent, journal, server = await frozen_agent(tmp_path, clocks)
    clocks.pass_(1)
    clocks.wall += dt.timedelta(hours=1)
    assert await agent._lift_lapsed_freeze() is None
    assert server.frozen and journal.freeze_lease() is not None
    clocks.pass_(LEASE - 2)
    assert await agent._lift_lapsed_freeze() is None  # 299 s of 300
    clocks.pass_(1)
    assert await agent._lift_lapsed_freeze() == "r1"
    assert not server.frozen
    journal.close()


HOUR = dt.timedelta(hours=1)
# The agent restarts ``after`` seconds after its Freeze (of LEASE seconds), its wall clock
# stepped by ``step`` meanwhile, in the same boot or after a reboot; the journalled lease then
# runs out ``left`` seconds later.
RESTARTS = {
    "no-step": (100, dt.timedelta(0), False, LEASE - 100),
    # In the same boot its end on the boot-time clock decides: not an hour more, and not its
    # whole length either.
    "stepped-back": (100, -HOUR, False, LEASE - 100),
    # Not at once: the leader counts the node frozen for 200 s more (review 1 of s35, 3).
    "stepped-forward": (100, HOUR, False, LEASE - 100),
    # After a reboot only the wall clock spans the time between: what its end says is left...
    "rebooted": (100, dt.timedelta(0), True, LEASE - 100),
    "rebooted-stepped-back": (100, -HOUR, True, LEASE),  # ...but never more than its length
    # ...and a clock ahead after the reboot still cuts it (nothing measured the time between).
    "rebooted-stepped-forward": (100, HOUR, True, 0),
}


@pytest.mark.parametrize(
    ("after", "step", "reboot", "left"), RESTARTS.values(), ids=RESTARTS.keys()
)
async def test_after_a_restart_a_journalled_lease_lasts_at_most_its_own_length(
    tmp_path: Path, after: int, step: dt.timedelta, reboot: bool, left: int
) -> None:
    """Clock audit s35 A, across a restart: the new process knows the lease only from the
    journal: its wall-clock end, its length, and its end on the boot-time clock. In the same
    boot the boot-time end decides, whatever the wall clock did; after a reboot the lease runs
    for what its wall-clock end says is left, never longer than its own length from the
    restart (an end further away means the clock went back, which stretched it by the step
    before). Review 1 of s35, finding 3: with the clock stepped forward while the agent
    restarted, the freeze was lifted at once, while the leader still counted the node frozen
    (the invariant of audit s32 H4), until its next renewal."""
    clocks = Clocks()
    first_agent, journal, server = await frozen_agent(tmp_path, clocks)
    journal.close()
    clocks.pass_(after)
    clocks.wall += step
    clocks.mono = 5.0  # a new process: its monotonic clock means nothing to the last one's
    if reboot:
        clocks.boot_id, clocks.boottime = "boot-2", 30.0
    journal = Journal(tmp_path / "journal.sqlite3")
    agent = timed_agent(tmp_path, journal, server, clocks)
    assert agent.leases is not first_agent.leases
    if left:
        assert await agent._lift_lapsed_freeze() is None
        clocks.pass_(left - 1)
        assert await agent._lift_lapsed_freeze() is None
        assert server.frozen
        clocks.pass_(1)
    assert await agent._lift_lapsed_freeze() == "r1"
    assert not server.frozen
    journal.close()


@pytest.mark.parametrize("boot", ["journalled", "none"])
async def test_a_lease_without_its_boot_time_end_is_taken_over_by_its_wall_clock_end(
    tmp_path: Path, boot: str
) -> None:
    """A lease journalled by the build before the boot-time end (``journalled``: none in the
    journal), or granted on a node with no boot-time clock (``none``): after a restart in the
    same boot it runs for what its wall-clock end says is left."""
    clocks = Clocks()
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    first = timed_agent(tmp_path, journal, server, clocks)
    if boot == "none":
        first.leases.boot = lambda: None
    request = freeze_request()
    request.lease_seconds = LEASE
    assert (await first.Freeze(request, cast(Any, None))).frozen
    if boot == "journalled":
        lease = journal.freeze_lease()
        assert lease is not None and lease.boot == ("boot-1", 50_000.0 + LEASE)
        journal.set_freeze_lease(lease._replace(boot=None))
    assert journal.freeze_lease() == ("r1", START + dt.timedelta(seconds=LEASE), LEASE, None)
    clocks.pass_(100)
    clocks.mono = 5.0  # a new process
    agent = timed_agent(tmp_path, journal, server, clocks)
    assert await agent._lift_lapsed_freeze() is None
    clocks.pass_(LEASE - 101)
    assert await agent._lift_lapsed_freeze() is None
    clocks.pass_(1)
    assert await agent._lift_lapsed_freeze() == "r1"
    assert not server.frozen
    journal.close()


async def test_a_restart_in_this_boot_keeps_the_lease_on_the_real_boot_time_clock(
    tmp_path: Path,
) -> None:
    """The same as the ``stepped-forward`` restart, on this machine's own boot-time clock and
    boot id (``nodeagent.lease.boot_clock``): the wall clock an hour ahead after the restart
    does not lift the freeze."""
    assert boot_clock() is not None, "no CLOCK_BOOTTIME or boot id on this system"
    clocks = Clocks()
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    first, _lock = make_agent(tmp_path, journal, server)
    first.clock, first.monotonic = clocks.clock, clocks.monotonic
    request = freeze_request()
    request.lease_seconds = LEASE
    assert (await first.Freeze(request, cast(Any, None))).frozen
    lease = journal.freeze_lease()
    assert lease is not None and lease.boot is not None
    assert lease.boot.boot_id == BOOT_ID.read_text().strip()
    clocks.wall += HOUR
    clocks.mono = 5.0  # a new process
    agent, _lock = make_agent(tmp_path, journal, server)
    agent.clock, agent.monotonic = clocks.clock, clocks.monotonic
    assert agent.leases is not first.leases
    assert await agent._lift_lapsed_freeze() is None
    assert server.frozen and journal.freeze_lease() == lease
    journal.close()


def test_the_boot_id_is_read_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: every switch reads the boot-time clock at its freeze's start (inside the freeze
    window) and end, and read the boot id from /proc each time; it cannot change while the
    process runs. The clock itself is read each time."""
    reads: list[str] = []

    class CountingPath(PosixPath):
        def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
            reads.append(str(self))
            return super().read_text(encoding, errors)

    boot_id_file = tmp_path / "boot_id"
    boot_id_file.write_text("0b5e0b5e-0000-4000-8000-000000000001\n")
    monkeypatch.setattr(lease_module, "BOOT_ID", CountingPath(boot_id_file))
    lease_module._boot_id.cache_clear()
    try:
        first, second = boot_clock(), boot_clock()
    finally:
        lease_module._boot_id.cache_clear()
    assert first is not None and second is not None
    assert first.boot_id == second.boot_id == "0b5e0b5e-0000-4000-8000-000000000001"
    assert second.seconds >= first.seconds
    assert reads == [str(boot_id_file)]


async def test_a_lease_journalled_before_its_length_was_is_bounded_by_the_longest(
    tmp_path: Path,
) -> None:
    """A lease from a journal before migration 5 has no length: after the upgrade's restart it
    runs at most the longest lease an agent grants (never less than any it granted), however
    far away its wall-clock end is (the clock went back two days)."""
    clocks = Clocks()
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.set_freeze_lease(Lease("r1", START + dt.timedelta(days=2)))
    server = GatedServer(frozen=True)
    agent = timed_agent(tmp_path, journal, server, clocks)
    assert await agent._lift_lapsed_freeze() is None
    clocks.pass_(MAX_FREEZE_LEASE - 1)
    assert await agent._lift_lapsed_freeze() is None
    clocks.pass_(1)
    assert await agent._lift_lapsed_freeze() == "r1"
    assert not server.frozen
    journal.close()


class Unreadable(Journal):
    """A journal whose lease reads fail once ``broken`` (EIO on its file, descriptors gone)."""

    broken = False

    def freeze_lease(self) -> Lease | None:
        if self.broken:
            raise JournalError("journal: disk I/O error")
        return super().freeze_lease()


async def test_a_scope_switch_that_cannot_read_its_lease_waits_only_for_the_lease_granted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 2 F4 of s34: a scope switch whose lease could not be read stayed frozen for
    ``MAX_FREEZE_LEASE`` (a day), whatever lease was configured (scope_freeze_lease, here 30 s),
    while the leader counted the node unfrozen after about that lease: the practice refused
    writes for a day. The agent process granted that lease itself, so it knows when it runs
    out: the switch unfreezes then (in elapsed time, as the lease watch would)."""
    warned: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(transaction.log, "warning", lambda event, **kw: warned.append((event, kw)))
    clocks = Clocks()
    journal = Unreadable(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    runner = Runner(
        journal, cast(Any, server), clocks.clock, sleep=clocks.sleep, monotonic=clocks.monotonic
    )
    agent, _lock = make_agent(tmp_path, journal, server, runner)
    agent.clock, agent.monotonic = clocks.clock, clocks.monotonic
    request = freeze_request()
    request.lease_seconds = 30
    assert (await agent.Freeze(request, cast(Any, None))).frozen
    clocks.wall -= dt.timedelta(hours=1)  # and the wall clock steps: elapsed time decides
    journal.broken = True
    txn, plan = scope_switch(tmp_path)
    started = clocks.mono
    ended = await asyncio.wait_for(runner._unfreeze(txn, plan), 60)
    assert not server.frozen and ended == {"freeze_ended_at": clocks.wall}
    waited = clocks.mono - started
    assert 30 <= waited < 30 + transaction.UNFREEZE_BACKOFF.cap + 1
    (unfrozen,) = [kw for event, kw in warned if event == "txn.lease_unread_unfreeze"]
    assert "every lease this agent knows of has run out" in unfrozen["detail"]
    journal.close()


async def test_a_scope_switch_that_cannot_read_its_lease_unfreezes_if_none_can_hold(
    tmp_path: Path,
) -> None:
    """Review 2 F4 of s34, the case with no lease at all: this agent process read the journal
    (the lease watch: no lease; the leader had lifted the scope freeze) and granted none since,
    so no lease can be journalled; a scope switch that then cannot read it unfreezes at its
    end, not a day later."""
    clocks = Clocks()
    journal = Unreadable(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=True)  # the switch's own freeze
    runner = Runner(
        journal, cast(Any, server), clocks.clock, sleep=clocks.sleep, monotonic=clocks.monotonic
    )
    agent, _lock = make_agent(tmp_path, journal, server, runner)
    agent.clock, agent.monotonic = clocks.clock, clocks.monotonic
    assert await agent._lift_lapsed_freeze() is None  # a look of the watch: no lease
    journal.broken = True
    txn, plan = scope_switch(tmp_path)
    started = clocks.mono
    await asyncio.wait_for(runner._unfreeze(txn, plan), 60)
    assert not server.frozen and clocks.mono == started
    journal.close()


async def test_a_suspend_of_the_node_counts_against_the_freeze_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's own clocks (the daemon's defaults) count a suspend of the node's host (or a
    paused VM) against the lease, as the leader counts its side of it (its engine and node
    liveness on CLOCK_BOOTTIME, session 36). On ``time.monotonic``, which stands still while
    the host sleeps, a node that slept through its lease woke still frozen for the rest of it
    (five minutes by default) while the leader counted the lease run out: the practice's
    writes refused with nobody left to lift the freeze. The suspend here moves the boot-time
    clock and the wall clock and leaves ``time.monotonic`` where it was, as a real one does."""
    slept = 0.0
    real_gettime = time.clock_gettime

    def clock_gettime(clock: int) -> float:
        return real_gettime(clock) + (slept if clock == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    agent, _lock = make_agent(tmp_path, journal, server)
    agent.clock = lambda: START + dt.timedelta(seconds=slept)
    request = freeze_request()
    request.lease_seconds = LEASE
    assert (await agent.Freeze(request, cast(Any, None))).frozen and server.frozen
    assert await agent._lift_lapsed_freeze() is None  # just granted: it holds
    slept = LEASE + 1.0  # the host slept through the lease
    assert await agent._lift_lapsed_freeze() == "r1"
    assert not server.frozen and journal.freeze_lease() is None
    journal.close()


async def test_every_change_of_a_scope_freeze_is_told_also_one_that_fails(
    tmp_path: Path,
) -> None:
    """Reviews rev56d L1 and rev56e L1, L4, L5: the agent's heartbeat comes at once when a
    scope freeze begins, is lifted by the leader, or lapses (``on_freeze_change``:
    ``LeaderLink.beat_soon``), also when the call fails part way (a freeze whose drain timed
    out leaves the server refusing writes), and a listener that raises fails no call."""
    clocks = Clocks()
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    agent = timed_agent(tmp_path, journal, server, clocks)
    told: list[bool] = []
    agent.on_freeze_change = lambda: told.append(server.frozen)

    assert (await agent.Freeze(freeze_request(), cast(Any, None))).frozen
    assert told == [True]
    assert not (await agent.Unfreeze(freeze_request(), cast(Any, None))).frozen
    assert told == [True, False]
    assert (await agent.Freeze(freeze_request(), cast(Any, None))).frozen
    clocks.pass_(LEASE)
    assert await agent._lift_lapsed_freeze() == "r1"  # the lease ran out: lifted
    assert told == [True, False, True, False]

    async def drain_timed_out(_drain_timeout: float) -> int:
        server.frozen = True  # (as the reference server: frozen, writes still in flight)
        raise OSError("writes still in flight")

    server.freeze = drain_timed_out  # type: ignore[method-assign, assignment]
    with pytest.raises(Aborted):
        await agent.Freeze(freeze_request(), cast(Any, FakeContext()))
    assert told == [True, False, True, False, True]

    def fails() -> None:
        raise RuntimeError("listener")

    agent.on_freeze_change = fails
    assert not (await agent.Unfreeze(freeze_request(), cast(Any, None))).frozen
    journal.close()


async def scope_frozen(tmp_path: Path) -> tuple[Journal, GatedServer, Runner, NodeAgentService]:
    """An agent whose server the leader's Freeze has scope-frozen (a lease held): its
    journal, the server, the runner and the agent's servicer."""
    journal = Journal(tmp_path / "journal.sqlite3")
    server = GatedServer(frozen=False)
    runner = make_runner(journal, server)
    agent, _lock = make_agent(tmp_path, journal, server, runner)
    assert (await agent.Freeze(freeze_request(), cast(Any, None))).frozen
    return journal, server, runner, agent


@pytest.mark.parametrize("phase", [Phase.FROZEN, Phase.CONFIG_WRITTEN, Phase.RESTARTED])
async def test_the_leader_s_unfreeze_leaves_a_switch_under_way_frozen(
    tmp_path: Path, phase: Phase
) -> None:
    """Review s69 revfreeze L1: the leader's Unfreeze lifted the server's freeze whatever ran
    on the node, also in the middle of this node's own switch (its config being written, its
    server restarting): entries were acknowledged while its config changed, the seed's first
    warning. The lease watch and the runner's lifts never did that (``journal.unfinished``).
    Now the Unfreeze ends the scope freeze (its lease) and leaves the server's freeze to the
    switch, whose end lifts it, no lease being left (``Runner._unfreeze``)."""
    journal, server, runner, agent = await scope_frozen(tmp_path)
    txn, plan = scope_switch(tmp_path)
    txn = journal.create(dataclasses.replace(txn, rollout_id="r1", phase=phase, reason=""))
    with capture_logs() as logs:
        reply = await agent.Unfreeze(freeze_request(), cast(Any, None))
    assert not reply.frozen  # the scope freeze is over
    assert journal.freeze_lease() is None
    assert server.frozen, "unfrozen in the middle of the node's own switch"
    assert any(e.get("event") == "scope_freeze.off_left_to_switch" for e in logs), logs
    await runner._unfreeze(txn, plan)  # the switch's end: no lease left, so it lifts it
    assert not server.frozen
    journal.close()


@pytest.mark.parametrize("path", ["unfreeze-step", "way-back-failed"])
async def test_the_leader_s_unfreeze_as_a_switch_ends_leaves_no_freeze_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Review s69 review3: the runner's end of a scope switch reads the lease under the freeze
    lock and leaves the freeze to it, then journals the outcome after the lock. The leader's
    Unfreeze landing in between (the node judged failed or unknown, the rollout's end) saw
    the switch still under way, left the freeze to it and cleared the lease: the switch then
    ended with nothing left to lift the freeze, no lease, no transaction, no unfreeze owed,
    and the server refused writes for good (``A node never stays frozen because of
    tlsroll``). Now the switch's end looks again once its outcome is journalled."""
    journal, server, runner, agent = await scope_frozen(tmp_path)
    txn, _plan = scope_switch(tmp_path)
    phase = Phase.VERIFIED if path == "unfreeze-step" else Phase.ROLLING_BACK
    txn = journal.create(dataclasses.replace(txn, rollout_id="r1", phase=phase))
    replies: list[agent_pb2.FreezeResponse] = []

    async def then_the_leader_s_unfreeze() -> None:
        replies.append(await agent.Unfreeze(freeze_request(), cast(Any, None)))

    if path == "unfreeze-step":
        decided = runner._unfreeze

        async def unfreeze(txn: Txn, plan: Plan) -> dict[str, Any]:
            done = await decided(txn, plan)  # the lease holds: the freeze is left to it
            await then_the_leader_s_unfreeze()  # before the outcome is journalled
            return done

        monkeypatch.setattr(runner, "_unfreeze", unfreeze)
    else:
        record = runner._record

        async def failing(*args: Any, **kwargs: Any) -> Txn:
            raise DriverError("the way back failed")

        async def recorded(*args: Any, **kwargs: Any) -> Txn:
            if kwargs.get("phase") is Phase.FAILED:
                await then_the_leader_s_unfreeze()  # the lease read, the outcome not written
            return await record(*args, **kwargs)

        monkeypatch.setattr(runner, "_act", failing)
        monkeypatch.setattr(runner, "_record", recorded)
    ended = await runner.run(txn)
    assert ended.phase in (Phase.COMPLETED, Phase.FAILED), ended
    assert replies and not replies[0].frozen  # the leader was told the freeze is over
    assert journal.freeze_lease() is None and not journal.unfinished()
    assert not server.frozen, "frozen with no lease, no transaction and nothing owed"
    journal.close()


async def test_a_scope_switch_s_end_with_its_lease_held_leaves_the_freeze_to_it(
    tmp_path: Path,
) -> None:
    """The other side of the test above: no Unfreeze came, the lease holds after the switch's
    outcome is written, and the freeze stays the scope freeze's (its lease bounds it)."""
    journal, server, runner, _agent = await scope_frozen(tmp_path)
    txn, _plan = scope_switch(tmp_path)
    txn = journal.create(dataclasses.replace(txn, rollout_id="r1", phase=Phase.VERIFIED))
    ended = await runner.run(txn)
    assert ended.phase is Phase.COMPLETED, ended
    assert server.frozen and journal.freeze_lease() is not None
    assert not server.entered["unfreeze"].is_set()
    journal.close()
