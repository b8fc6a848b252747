"""The agent's checks of its file systems, on a thread of their own with a bound (session 75).

The checks (the preflight's, `tlsroll plan`'s, a start's: ``NodeAgentService._local_checks``)
and the Stage's look at the room left (``tlsroll.room``: ``os.statvfs``, ``os.stat``) read
the agent's data dir and the server's config directory: the config, its templates, a probe
file written there, the free space. They ran on the loop's default executor
(``asyncio.to_thread``). On a hung network mount there, such a call never comes back: the
preflight hung (the leader's call timed out and asked again, each try parking one more
default-executor thread), and ``asyncio.run`` waits for the default executor's threads at its
end with no bound, so the agent's stop hung until systemd killed it, its orderly stop skipped
(review of s75 revstore, L).

``BoundedWorker`` runs them on one daemon thread of its own, one after another (a thread hop,
as ``asyncio.to_thread`` was), and its caller waits at most ``BOUND_SECONDS`` for its call:
a call not back by then is ``Hung``, a refusal for now whose words say why ("a file system
there does not answer (a hung network mount?)"). While a call has hung past the bound, a new
one is refused at once: nothing queues behind it, no thread is started for it (the leader's
retries pile up nothing). A hung call holds its daemon thread, never the agent's stop. The
heartbeat's own read of the room has its own thread (``nodeagent.store_watch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar

from tlsroll.errors import TransientError

P = ParamSpec("P")
T = TypeVar("T")

# A check's call not back within this many seconds is refused as hung. Well within the leader's
# call timeout (``leader.agent_client.CALL_TIMEOUT``, 30 s): the preflight answers with why.
BOUND_SECONDS = 10.0
# A worker's thread idle this long ends (another starts with the next call): an agent's
# heartbeat reads its view every interval, which keeps that one; a test's many services leave
# none behind.
IDLE_SECONDS = 60.0


def hung_text(what: str, bound: float) -> str:
    """Why ``what`` is refused while a call of the checks does not come back."""
    return (
        f"{what} did not come back within {bound:g} s: a file system there does not answer"
        " (a hung network mount?)"
    )


class Hung(TransientError):
    """A call of the checks did not come back within its bound (``str``: ``hung_text``): for
    now (the project's error tree: a file system that answers again ends it)."""


@dataclass
class _Call(Generic[T]):
    call: Callable[[], T]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[T]
    state: list[str] = field(default_factory=lambda: ["queued"])  # queued, running, dropped


class BoundedWorker:
    """Blocking calls on one daemon thread (``run``), each waited for ``BOUND_SECONDS`` at
    most; refused at once while the call it runs has hung past that."""

    def __init__(
        self, name: str, what: str, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name  # (its thread's)
        self.what = what  # (``hung_text``'s)
        self.monotonic = monotonic
        self._calls: queue.SimpleQueue[_Call[Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running_since: float | None = None  # (the thread's call, begun then)
        self.threads = 0  # threads started (a test counts them)

    def hung(self) -> bool:
        """Whether the call on the thread has run past the bound (never blocks)."""
        since = self._running_since
        return since is not None and self.monotonic() - since >= BOUND_SECONDS

    async def run(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``func(*args, **kwargs)`` on the thread, with the caller's context variables;
        ``Hung`` if it is not back within ``BOUND_SECONDS`` (then dropped if it had not
        begun) or if the thread's call has hung past it already (nothing queued)."""
        bound = BOUND_SECONDS
        if self.hung():
            raise Hung(hung_text(self.what, bound))
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        item: _Call[T] = _Call(call, loop, loop.create_future())
        self._hand(item)
        try:
            finished, _ = await asyncio.wait({item.done}, timeout=bound)
        finally:
            if not item.done.done():  # (timed out, or the caller cancelled)
                with self._lock:
                    if item.state[0] == "queued":
                        item.state[0] = "dropped"
                item.done.cancel()
        if not finished:
            raise Hung(hung_text(self.what, bound))
        return item.done.result()

    def _hand(self, item: _Call[Any]) -> None:
        """``item`` to the thread, started if none runs (under the lock, as the thread's end:
        never an item left behind by a thread that ends)."""
        with self._lock:
            self._calls.put(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self.threads += 1
                self._thread.start()

    def _work(self) -> None:
        """(The thread's.) The calls in turn; one dropped before it began is skipped."""
        while True:
            try:
                item = self._calls.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._calls.empty():
                        self._thread = None
                        return
                continue
            with self._lock:
                if item.state[0] == "dropped":
                    continue
                item.state[0] = "running"
                self._running_since = self.monotonic()
            try:
                result = item.call()
            except BaseException as exc:  # (the caller's to raise)
                settle = functools.partial(_failed, item.done, exc)
            else:
                settle = functools.partial(_settled, item.done, result)
            finally:
                self._running_since = None
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for it
                item.loop.call_soon_threadsafe(settle)


def _settled(done: asyncio.Future[T], result: T) -> None:
    if not done.done():  # (cancelled: its caller gave up on it)
        done.set_result(result)


def _failed(done: asyncio.Future[Any], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)
