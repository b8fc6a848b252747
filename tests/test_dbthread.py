"""The store's own thread (``tlsroll.dbthread``): a rollout's store calls run there one after
another. A call whose caller is cancelled (a step task at the leader's stop) still runs when
its turn comes, and ``barrier`` waits for every call queued before it: a step's outcome
queued behind another write when the leader stops is written before the store closes, not
dropped (review of session 25; with one thread, a queued call cancelled before it started
was skipped)."""

from __future__ import annotations

import asyncio
import threading

from tlsroll import dbthread


async def test_a_call_whose_caller_is_cancelled_still_runs_and_the_barrier_waits_for_it() -> None:
    gate = threading.Event()
    written: list[str] = []
    first = asyncio.ensure_future(dbthread.run(gate.wait, 30))  # holds the thread
    queued = asyncio.ensure_future(dbthread.run(written.append, "the step's outcome"))
    await asyncio.sleep(0.05)  # both handed to the thread's queue
    queued.cancel()
    gate.set()
    assert await first is True
    await dbthread.run(lambda: None)  # what ``barrier`` does: after every call queued before
    assert written == ["the step's outcome"]
    await dbthread.barrier()
    assert queued.cancelled()


async def test_calls_run_on_one_thread_in_order() -> None:
    seen: list[tuple[int, str]] = []

    def note(n: int) -> None:
        seen.append((n, threading.current_thread().name))

    await asyncio.gather(*(dbthread.run(note, n) for n in range(20)))
    assert [n for n, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {f"{dbthread.THREAD_NAME}_0"}
