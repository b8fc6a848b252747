"""The agent's own store trouble, read off the heartbeat's path (session 75).

What the agent's heartbeat says of its store (``HeartbeatRequest.store_trouble``: its journal's
checkpoint fails, free space low for a switch: ``NodeAgentService.store_trouble``) was read on
the beat's own thread call, with ``os.statvfs`` of the data dir and the server's config
directory: a hung network mount there stalled every heartbeat (the node then looked offline,
and took no revocation list). And a change was said only at the next beat, up to an interval
later (s74 note).

``StoreWatch`` reads it on a thread of its own, one read at a time (a read that hangs holds one
daemon thread, never the beat nor the agent's stop), every interval and at once when the
journal's checkpoint starts or stops failing (``Database.on_checkpoint``, on the store's
thread: ``loop.call_soon_threadsafe``). The beat takes the last result as it is
(``current``); a read not back within ``STALL_SECONDS`` is itself said as trouble until it
is. A change (its figures aside: ``leader_link.report_key``'s masking) wakes the heartbeat
sender (``LeaderLink.beat_soon``) at most once in ``WAKE_SECONDS``: a store that flaps makes
no beat storm; news within that bound goes with the next regular beat, or a wake once the
bound has passed (not at the next read, an interval on: review of s75 storels, L1).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import threading
import time
from collections.abc import Awaitable, Callable

from tlsroll import logs

log = logs.get_logger(__name__)

# A read of the store's trouble (its statvfs calls) not back within this is said as trouble.
STALL_SECONDS = 30.0
# At most one extra heartbeat for store news within this many seconds.
WAKE_SECONDS = 10.0
# The agent's first heartbeat waits at most this long for the first read (``beats_once_read``).
FIRST_READ_SECONDS = 5.0
# The figures of a trouble's text (free space): their moving is no news (as ``report_key``).
_FIGURES = re.compile(r"\d+(?:\.\d+)?(?: [KMGT]iB)?")


def stalled_text(bound: float) -> str:
    """What the heartbeat says while a read of the store's room has hung ``bound`` seconds."""
    return (
        "the free space of the agent's data dir and the server's config directory did not"
        f" come back within {bound:.0f} s: a file system there does not answer (a hung network"
        " mount?); the agent's checks wait on it too"
    )


class StoreWatch:
    """The agent's store trouble as last read (``current``), read on a thread of its own
    (``run``), news told to ``wake`` (at most once in ``WAKE_SECONDS``)."""

    def __init__(
        self,
        measure: Callable[[], list[str]],
        every: float,
        wake: Callable[[], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.measure = measure  # (blocking: its own thread's)
        self.every = every
        self.wake = wake
        self.monotonic = monotonic
        self._last: list[str] = []
        self._stalled = False
        self._said: list[str] = []  # masked: what ``current`` said when last compared
        self._woke_at: float | None = None
        self._owed = False  # news not told to ``wake`` yet (the bound)
        self._poke = asyncio.Event()
        self._read_once = asyncio.Event()  # the first read came back (or stalled)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checkpoint_failing = False  # (the store's thread's)
        self._error = ""  # the last read's unforeseen error, said once
        self.reads = 0  # reads come back (a test waits on it)
        self.wakes = 0

    def current(self) -> list[str]:
        """(Any thread; never blocks.) What the heartbeat says now: the last read's, and the
        stall while a read has not come back within ``STALL_SECONDS``."""
        said = list(self._last)
        if self._stalled:
            said.append(stalled_text(STALL_SECONDS))
        return said

    def poke(self) -> None:
        """(Any thread.) Read again now, not at the next interval."""
        loop = self._loop
        if loop is None:
            return  # (not running yet: its first read comes anyway)
        with contextlib.suppress(RuntimeError):  # (the loop closed: the agent stops)
            loop.call_soon_threadsafe(self._poke.set)

    def checkpoint(self, failed: BaseException | None) -> None:
        """(``Database.on_checkpoint``, on the store's thread.) A checkpoint ran: a read now
        if it starts or stops failing (each successful one says nothing new)."""
        failing = failed is not None
        if failing != self._checkpoint_failing:
            self._checkpoint_failing = failing
            self.poke()

    async def beats_once_read(self, beats: Callable[[], Awaitable[None]]) -> None:
        """Run ``beats`` (the heartbeat sender's ``LeaderLink.run``) once the first read is
        back (or said stalled), at most ``FIRST_READ_SECONDS`` on. Before it, ``current`` says
        nothing: an agent's first message said no store trouble, and a leader that showed the
        node's took the agent's restart for its end (review of s75 storels, M1)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_READ_SECONDS):
                await self._read_once.wait()
        await beats()

    async def run(self) -> None:
        """Read every ``every`` seconds, or at once when poked, until cancelled."""
        self._loop = asyncio.get_running_loop()
        while True:
            self._poke.clear()  # (this read sees what changed before it)
            await self._read()
            await self._until_next(self._loop.time() + self.every)

    async def _until_next(self, due: float) -> None:
        """Wait for a poke or ``due`` (the loop's time); news owed (``_news``: within
        ``WAKE_SECONDS`` of the last wake) is told once its bound has passed, not at the next
        read, an interval on (review of s75 storels, L1)."""
        loop = asyncio.get_running_loop()
        while (left := due - loop.time()) > 0:
            owed = self._owed_in()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left if owed is None else min(left, owed)):
                    await self._poke.wait()
                    return
            self._news()

    def _owed_in(self) -> float | None:
        """Seconds until owed news may wake the heartbeat sender; None if none is owed."""
        if not self._owed or self._woke_at is None:
            return None
        # (as ``_news`` compares: 0 exactly when it wakes)
        return max(0.0, WAKE_SECONDS - (self.monotonic() - self._woke_at))

    async def _read(self) -> None:
        """One read on its own daemon thread; said stalled after ``STALL_SECONDS`` and waited
        for (never a second read while one hangs)."""
        done: concurrent.futures.Future[list[str]] = concurrent.futures.Future()

        def read() -> None:
            if not done.set_running_or_notify_cancel():
                return  # (the agent stops: no read)
            try:
                done.set_result(self.measure())
            except BaseException as exc:  # (told on the loop)
                done.set_exception(exc)

        threading.Thread(target=read, name="store-watch", daemon=True).start()
        waiting = asyncio.wrap_future(done)
        finished, _ = await asyncio.wait({waiting}, timeout=STALL_SECONDS)
        if not finished:
            self._stalled = True
            log.warning(
                "store_watch.stalled",
                seconds=STALL_SECONDS,
                detail="reading the free space of the agent's data dir or the server's config"
                " directory has not come back: a file system there does not answer (a hung"
                " network mount?); the heartbeat says so and goes on",
            )
            self._news()
            self._read_once.set()  # (the beats go on with the stall said)
        try:
            said = await waiting
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
            if error != self._error:
                self._error = error
                log.warning(
                    "store_watch.failed",
                    error=error,
                    detail="the agent's store trouble could not be read; the heartbeat says"
                    " what it read last",
                )
        else:
            self._last, self._error = said, ""
        # (not when cancelled, the agent stopping: a read still hung never came back)
        if self._stalled:
            self._stalled = False
            log.info("store_watch.answers", detail="the stalled read came back")
        self.reads += 1
        self._read_once.set()
        self._news()

    def _news(self) -> None:
        """Wake the heartbeat sender if what ``current`` says changed (its figures aside) or
        news is owed, unless it was woken within ``WAKE_SECONDS``."""
        said = [_FIGURES.sub("#", t) for t in self.current()]
        if said != self._said:
            self._said, self._owed = said, True
        if not self._owed:
            return
        now = self.monotonic()
        if self._woke_at is not None and now - self._woke_at < WAKE_SECONDS:
            return  # (the next regular beat carries it, or a wake after the bound)
        self._woke_at, self._owed = now, False
        self.wakes += 1
        self.wake()
