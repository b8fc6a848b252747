"""The agent's scope freeze lease: ``Freeze``, ``Unfreeze`` and the lease watch
(``NodeAgentService.watch_freeze_lease``) never interleave (audit s32 H4).

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
import datetime as dt
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from structlog.testing import capture_logs

from nodeagent import service
from nodeagent.journal import Journal
from nodeagent.service import NodeAgentService
from nodeagent.trust import LeaderTrust
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
        self.stale: tuple[str, dt.datetime] | None = None
        self.lease_reads = 0

    def freeze_lease(self) -> tuple[str, dt.datetime] | None:
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
    tmp_path: Path, journal: Journal, server: GatedServer
) -> tuple[NodeAgentService, WatchedLock]:
    trust = LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem")
    trust.announce(1)
    agent = NodeAgentService(
        cast(Any, None),
        cast(Any, None),
        journal,
        cast(Any, server),
        None,
        lambda: START,
        trust=trust,
    )
    lock = agent._freeze_lock = WatchedLock()
    return agent, lock


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
    assert lease == ("r1", START + dt.timedelta(seconds=LEASE))


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
    journal.set_freeze_lease(("r0", START - dt.timedelta(seconds=1)))  # ran out
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
    journal.stale = ("r1", START - dt.timedelta(seconds=1))
    journal.lease_reads = 0
    with capture_logs() as logs:
        watch = asyncio.create_task(agent.watch_freeze_lease())
        await until(lambda: journal.lease_reads >= 3)  # past one whole look (and its re-read)
        await stop(watch)
    assert not lapsed(logs)
    assert server.entered["unfreeze"].is_set() is False
    assert_frozen_with_a_lease(journal, server, reply)
    journal.close()
