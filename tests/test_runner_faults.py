"""The runner's ways out of faults (issue 16), in process against the fake world of
tests/test_runner.py: an unfreeze the server refuses for a while, a freeze owed by a failed
transaction, a server that is down when a transaction starts, a task whose journal writes fail.
Deterministic: the fake clock's sleep returns at once and records how long it was asked for.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodeagent import transaction
from nodeagent.drivers import DriverError
from nodeagent.journal import Journal, Txn
from nodeagent.transaction import Runner
from tests.test_runner import (
    SCENARIOS,
    SOURCE,
    CrashingJournal,
    FakeDriver,
    FakeServer,
    Scenario,
    World,
)
from tlsroll.enums import TxnOutcome


def kill(server: FakeServer) -> None:
    server.running = None


class RefusingDriver(FakeDriver):
    """The fake server's driver, whose unfreeze fails ``refusals`` times before it works (the
    server cannot persist it: a full disk)."""

    refusals = 0

    async def unfreeze(self) -> None:
        if self.refusals > 0:
            self.refusals -= 1
            self.server.ops.append("unfreeze refused")
            raise DriverError("admin /admin/unfreeze answered 500: state_not_saved")
        await super().unfreeze()


def refusing(world: World, refusals: int) -> RefusingDriver:
    driver = RefusingDriver(world.server, world.driver.config_file)
    driver.refusals = refusals
    world.driver = driver
    return driver


@pytest.fixture
def world(tmp_path: Path) -> Callable[[Scenario], World]:
    made = iter(range(1, 100))
    return lambda scenario: World(tmp_path / f"w{next(made)}", scenario)


async def test_an_unfreeze_refused_many_times_is_retried_with_capped_backoff(
    world: Callable[[Scenario], World],
) -> None:
    w = world(SCENARIOS["completes"])
    refusing(w, 12)
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert w.server.frozen is False
    assert w.server.ops.count("unfreeze refused") == 12
    waits = [transaction.UNFREEZE_BACKOFF.delay(n) for n in range(1, 13)]
    assert waits[:4] == [0.5, 1.0, 2.0, 4.0] and max(waits) == 30.0
    assert w.time.slept[-12:] == waits


def test_unfreeze_retries_are_logged_at_a_bounded_rate() -> None:
    logged = [n for n in range(1, 1001) if transaction.worth_logging(n, 0.0)]
    assert logged == [1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512]
    assert transaction.worth_logging(999, transaction.UNFREEZE_LOG_EVERY)


async def test_a_failed_transaction_owes_the_unfreeze_until_the_server_takes_it(
    world: Callable[[Scenario], World],
) -> None:
    """The way back fails and the server refuses the unfreeze at first: the outcome is
    recorded at once (the leader learns it), and the unfreeze goes on in the background."""
    w = world(SCENARIOS["way_back_fails"])
    refusing(w, 5)
    journal = CrashingJournal(w.journal_path)
    runner = w.runner(journal)
    txn = await asyncio.to_thread(journal.create, w.txn)
    done = await runner.run(txn)
    assert done.outcome is TxnOutcome.FAILED
    assert "could not lift the freeze yet" in done.reason and "keeps trying" in done.reason
    assert runner._owed is not None
    await runner._owed
    assert w.server.frozen is False
    assert journal.unfreeze_owed() is None


async def test_an_owed_unfreeze_is_carried_on_after_a_restart(
    world: Callable[[Scenario], World],
) -> None:
    w = world(SCENARIOS["way_back_fails"])
    refusing(w, 1000)
    journal = CrashingJournal(w.journal_path)
    runner = w.runner(journal)
    done = await runner.run(await asyncio.to_thread(journal.create, w.txn))
    assert done.outcome is TxnOutcome.FAILED and journal.unfreeze_owed() == "r1"
    await runner.close(0)  # the agent stops while it is still owed
    assert w.server.frozen is True

    w.driver.refusals = 2  # type: ignore[attr-defined]
    again = w.runner(Journal(w.journal_path))
    assert await again.resume_all() == []
    assert again._owed is not None
    await again._owed
    assert w.server.frozen is False and again.journal.unfreeze_owed() is None


async def test_a_new_transaction_takes_over_an_owed_unfreeze(
    world: Callable[[Scenario], World],
) -> None:
    w = world(SCENARIOS["completes"])
    journal = Journal(w.journal_path)
    journal.set_unfreeze_owed("r0")
    w.server.frozen = True
    txn = await asyncio.to_thread(journal.create, w.txn)  # a switch is running
    runner = w.runner(journal)
    runner._lift_owed_freeze()
    assert runner._owed is not None
    await runner._owed
    assert journal.unfreeze_owed() is None  # dropped: the running switch unfreezes at its end
    assert w.server.ops == []
    assert (await runner.run(txn)).outcome is TxnOutcome.COMPLETED


async def test_a_way_back_that_finds_the_server_down_starts_it_on_the_old_config(
    world: Callable[[Scenario], World],
) -> None:
    """A rollback transaction (the undo of a switch) whose server is dead: its freeze fails,
    which used to send it on the way back without a restart (ending failed with the server
    down). A server that is down takes no writes: it is started on the old config instead."""
    w = world(SCENARIOS["undo"])
    kill(w.server)
    done = await w.run(CrashingJournal(w.journal_path))
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert w.server.ops == ["freeze", "write_config source", "restart", "unfreeze"]
    assert (w.server.running, w.server.frozen) == (SOURCE, False)
    assert done.watermark is None


async def test_a_failed_step_restarts_a_server_that_is_down_on_the_way_back(
    world: Callable[[Scenario], World],
) -> None:
    """A freeze that fails on a server that answers, which then dies: restore_config finds
    nothing to rewrite, but the way back starts the server."""
    w = world(SCENARIOS["freeze_fails"])

    class Dying(FakeDriver):
        healthy_answers = 1  # the server answers when the freeze is refused, then it is gone

        async def freeze(self, drain_timeout: float) -> int:
            try:
                return await super().freeze(drain_timeout)
            finally:
                self.server.running = None

        async def health(self) -> str | None:
            if self.healthy_answers:
                self.healthy_answers -= 1
                return None
            return await super().health()

    w.driver = Dying(w.server, w.driver.config_file)
    done = await w.run(CrashingJournal(w.journal_path))
    assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason
    assert w.server.ops == ["freeze", "restart", "unfreeze"]
    assert done.restart_needed is True
    assert (w.server.running, w.server.frozen) == (SOURCE, False)


class OutsideRestart(FakeDriver):
    """Someone else restarts the server (it is down when the transaction freezes): it answers
    again at the ``back_at``-th health check, or as soon as the agent has written the new
    config (``back_at`` 0), unfrozen; its restart does not keep a freeze it never had."""

    back_at = 0
    health_checks = 0

    async def health(self) -> str | None:
        self.health_checks += 1
        if self.health_checks == self.back_at:
            self.server.running = self.server.config
        return await super().health()

    def write_config(self, data: bytes) -> None:
        super().write_config(data)
        if self.back_at == 0 and self.server.running is None:
            self.server.running = SOURCE


@pytest.mark.parametrize("back_at", [2, 0], ids=["within-the-freeze", "before-the-restart"])
async def test_a_server_restarted_by_someone_else_is_frozen_once_it_answers(
    back_at: int, world: Callable[[Scenario], World]
) -> None:
    """The freeze finds the server down because someone else restarts it (s33 audit L3): the
    runner asks again for a few seconds and freezes it when it answers; back later, it is
    frozen before the agent's own restart. Either way the switch has its watermark, and the
    node took no write unchecked."""
    w = world(SCENARIOS["completes"])
    kill(w.server)
    driver = OutsideRestart(w.server, w.driver.config_file)
    driver.back_at = back_at
    w.driver = driver
    done = await w.run(CrashingJournal(w.journal_path))
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert done.watermark == 7
    if back_at:
        assert w.server.ops == ["freeze", "freeze", "write_config target", "restart", "unfreeze"]
        assert w.time.slept[0] == transaction.DOWN_RECHECK[0]
    else:
        assert w.server.ops == ["freeze", "write_config target", "freeze", "restart", "unfreeze"]
        assert tuple(w.time.slept[: len(transaction.DOWN_RECHECK)]) == transaction.DOWN_RECHECK


class FailingJournal(Journal):
    """A journal whose phase writes fail ``failures`` times (SQLite on a full disk)."""

    failures = 0

    def update(self, txn: Txn, **changes: Any) -> Txn:
        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().update(txn, **changes)


async def started(w: World, journal: Journal) -> Runner:
    runner = w.runner(journal)
    runner.start(await asyncio.to_thread(journal.create, w.txn))
    return runner


async def test_a_task_that_dies_is_started_again_from_the_journal(
    world: Callable[[Scenario], World],
) -> None:
    w = world(SCENARIOS["completes"])
    journal = FailingJournal(w.journal_path)
    journal.failures = transaction.TASK_RESTARTS
    runner = await started(w, journal)
    (task,) = runner.tasks.values()
    done = await task
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert not runner.dead.is_set()
    assert w.server.ops == ["freeze"] * 4 + ["write_config target", "restart", "unfreeze"]
    assert w.time.slept[:3] == [1.0, 2.0, 4.0]
    assert w.server.frozen is False


async def test_a_task_that_keeps_dying_lifts_the_freeze_and_tells_the_daemon(
    world: Callable[[Scenario], World],
) -> None:
    w = world(SCENARIOS["completes"])
    journal = FailingJournal(w.journal_path)
    journal.failures = 1000
    runner = await started(w, journal)
    (task,) = runner.tasks.values()
    with pytest.raises(transaction.TxnDied) as died:  # (its last death: logged once, txn.died)
        await task
    assert isinstance(died.value.__cause__, sqlite3.OperationalError)
    assert runner.dead.is_set()
    assert "rollout r1 died 4 times" in runner.fatal
    assert "database or disk is full" in runner.fatal and str(w.journal_path) in runner.fatal
    assert "writes are accepted again" in runner.fatal
    assert w.server.frozen is False
    assert w.server.ops == ["freeze"] * 4 + ["unfreeze"]
    left = await asyncio.to_thread(journal.get, "r1", w.sc.kind)
    assert left is not None and left.outcome is TxnOutcome.PENDING  # the next start resumes it
