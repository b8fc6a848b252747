"""The store's own worker thread: a rollout's reads and writes of the leader's SQLite store
(and, in the agent, a switch's journal writes and config write), handed off the event loop one
after another to a single thread.

``asyncio.to_thread`` hands each call to the loop's default executor, which grows to several
threads (six on two cores) when calls overlap, as the steps of a rollout with nodes in flight
do. Their store calls still run one at a time (one connection under one lock,
``tlsroll.sqlite.Database``): the extra threads only wait for that lock and for the GIL, and
each such wait is a context switch (a profile of the leader at 200 nodes: about a fifth of its
CPU went to switching, and its default executor's threads switched about 120 times per node).
One thread for the store runs the calls queued behind each other back to back, and never
waits for a lock another of its own holds. Calls that are not the store's (the confirm's
outside check, which waits on the network) stay on ``asyncio.to_thread``, so they never hold
up a write.

Blocking calls only (they run off the loop); the thread never calls back into the loop
except through the future it completes, so a call can never wait for one queued behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

THREAD_NAME = "tlsroll-store"

# How many calls handed to the thread have not finished (``pending``).
_pending = 0
_counting = threading.Lock()


class StoreThread(ThreadPoolExecutor):
    """The store's one thread; each call ``submit`` hands it is counted until it has run or
    was cancelled (``pending``): ``run``'s and those handed to it directly (the agent's
    ``Runner.stage_next``, the staged configs' discards), which a checkpoint lets go first as
    well (review s72 revlate: only ``run``'s were counted)."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        _count(1)
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            _count(-1)
            raise
        future.add_done_callback(_finished)  # (also once cancelled before its turn)
        return future

    def submit_uncounted(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """``submit``, not counted in ``pending``: ``tlsroll.sqlite.Database``'s checkpoint,
        which looks at ``pending`` to let the others go first."""
        return super().submit(fn, *args, **kwargs)


_executor: StoreThread | None = None
_made = threading.Lock()


def executor() -> StoreThread:
    """The process's store thread (made on first use; one per process, for every loop)."""
    global _executor  # noqa: PLW0603 - one per process, made on first use
    if _executor is not None:  # every call but the first: no lock
        return _executor
    with _made:
        if _executor is None:
            _executor = StoreThread(max_workers=1, thread_name_prefix=THREAD_NAME)
        return _executor


def started() -> StoreThread | None:
    """The process's store thread if it was made (a daemon's), else None (a command that writes
    its store from its own thread: ``tlsroll.sqlite.Database``'s checkpoint then stays
    SQLite's)."""
    return _executor


def pending() -> int:
    """How many calls handed to the thread (``StoreThread.submit``) have not finished: 0 when
    it is idle, or runs the last of them (``tlsroll.sqlite.Database``'s checkpoint, run on
    the thread, lets the calls queued behind it go first)."""
    return _pending


def _count(by: int) -> None:
    global _pending  # noqa: PLW0603 - one count per process, as the thread
    with _counting:
        _pending += by


def _finished(_future: Future[Any]) -> None:
    _count(-1)


async def run(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``asyncio.to_thread`` on the store's thread: ``func(*args, **kwargs)`` there, with the
    caller's context variables (the log's bound fields). A call whose caller is cancelled
    still runs when its turn comes (its result is dropped), as a call ``to_thread`` had
    handed to a thread of its own would have: a step's outcome queued behind another write
    when the leader stops is written, not dropped (review of session 25). ``barrier`` waits
    for every call queued before it.

    The result comes back to the loop in one hop: the thread hands the loop one callback that
    settles the future the caller awaits. ``asyncio.shield`` around ``run_in_executor`` took
    three loop passes and six callbacks a call (the executor future's chaining, then the
    shield's inner and outer futures' callbacks), the shield only to keep a cancelled caller
    from cancelling the call: a call handed to the thread here is never cancelled by its
    caller (issue 15: the leader's loop passes per node, session 69)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
    executor().submit(_work, loop, done, call)
    return await done


def _work(loop: asyncio.AbstractEventLoop, done: asyncio.Future[T], call: Callable[[], T]) -> None:
    """(On the store's thread.) Run ``call`` and hand its result or exception to ``done`` on
    its loop; dropped if the loop has closed meanwhile (as ``run_in_executor``'s is)."""
    try:
        result = call()
    except BaseException as exc:  # (the caller's to raise, as run_in_executor's future did)
        settle = functools.partial(_failed, done, exc)
    else:
        settle = functools.partial(_settled, done, result)
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits it any more
        loop.call_soon_threadsafe(settle)


def _settled(done: asyncio.Future[T], result: T) -> None:
    if not done.done():  # (cancelled: the caller was; the call ran all the same)
        done.set_result(result)


def _failed(done: asyncio.Future[T], exc: BaseException) -> None:
    if not done.done():
        try:
            done.set_exception(exc)
        except TypeError:  # StopIteration cannot be a future's exception
            done.set_exception(RuntimeError(f"{type(exc).__name__} raised in the store thread"))


def _nothing() -> None:
    return None


async def barrier() -> None:
    """Wait until every call queued on the store's thread before this one has run (one
    thread, in order): before the store closes."""
    await run(_nothing)
