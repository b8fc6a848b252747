"""The agent's cryptography in one child process of its own, started on demand, gone when idle.

The agent runs on every node for months, and ``cryptography`` (its Rust library with OpenSSL
inside, and the Python modules around it) costs a process about 10 MiB, which it keeps until
it ends (issue 15: a switched agent idled at 64.5 MiB, one never switched at 49 MiB). The
agent needs it only while a rollout passes the node (a key and its CSR, the leader's
certificate checked and stored, a practice's own certificate, the bootstrap service's PAKE),
once a year for a renewal, and for each revocation list. All of that runs here, in ONE child
per agent (``CryptoWorker``): started at need, or ahead of it (``warm``: a rollout's planning
and preflight), kept while work comes (a rotation sends each node one revocation list per
node of the cluster), and stopped after ``IDLE_SECONDS`` without a call. The agent itself never
imports ``tlsroll.pki``.

Protocol: one JSON line per request on the child's stdin, ``{"op": "MODULE.NAME", "request":
{...}}``; on its stdout, ``TAKEN`` (one byte, once the child has the request's whole line and
before it acts on it; asked for by ``cryptoworker_child.TAKES``), then one JSON line per answer,
``{"ok": VALUE}`` or ``{"error": {...}}`` (an error of the op, answered as
``workerrors.answer_for`` makes it and rebuilt in the agent as the same class with the same
message, ``certwork._error``). The child (``nodeagent.cryptoworker_child``, which imports
nothing of this side) resolves MODULE through ``cryptoworker_child.OP_MODULES`` (imported on
first use) and calls ``module.OPS[NAME](request)``; ops are stateless (the child keeps its
imports and caches between calls, nothing else). A missing module or op is an error answer,
never a crash. The child's stderr is the agent's (its JSON log lines, ``tlsroll.leanlog``).
EOF on its stdin ends it: the agent closed it, or died.

Calls are serialised (one request in flight). A child that dies mid-call (a signal, the OOM
killer: after ``TAKEN``) is ``WorkerEnded``, a ``TransientError`` (UNAVAILABLE for the leader,
which tries the step again, as when the agent itself was killed). One that ended before it
took the request (killed while idle) never acted on it, and a new child takes it, once,
however the agent learns of the end (the write fails, or lands in the pipe before the kernel
closed the child's end of it) and whatever the request's size. One that does not answer within
``TIMEOUT`` (the request's write included: a stopped child reads nothing of one larger than
the pipe holds) is killed and the call is a ``TransientError`` too; a call cancelled while it
waits kills the child (its answer would be read as the next call's). Either way the next call
starts a new child. An answer that is not one JSON object, or too long, is
``certwork.NoAnswer`` (terminal: a bug, not chance). The child ignores SIGTERM and SIGINT:
systemd signals the whole control group when the agent stops, and Ctrl-C a terminal's process
group; the child's call (a key being written) ends, the agent closes its stdin and it ends on
EOF (killed after ``STOP_PATIENCE``).

Secrets (a staged or renewed key, a practice's key, the password verifier) cross the pipe
only: requests and answers are never logged, and an op's unexpected failure is answered with
its class name alone.

The child imports only what its ops need (no structlog, asyncio or agent config: its cold
start is what a rollout's first node waits for; ``cryptoworker_child``'s docstring), and
``tlsroll.pki`` (with ``workerrors``: ``cryptoworker_child.PRELOAD``), with the garbage
collector off, at its start in a thread that lowers its own priority (``priority.WARM_NICE``,
as ``nodeagent.warmup`` does: a node is prepared while another node's server restarts on the
same machine); a request waits for that import (given its priority back where the system
allows it) and is served at the normal priority. Under the agent's systemd unit it never is:
raising a priority needs CAP_SYS_NICE, which the unit's CapabilityBoundingSet leaves out, so a
request that comes before the import has ended waits for it at nice +10 (a cold start on a busy
machine; review s41, Low 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from nodeagent import certwork, cryptoworker_child
from tlsroll import logs
from tlsroll.errors import (
    ShuttingDown,
    TerminalError,
    TlsrollError,
    TransientError,
    raise_if_local,
)

log = logs.get_logger(__name__)

IDLE_SECONDS = 60.0
"""The child is stopped after this long without a call. A rotation sends each node one
revocation list per node of the cluster, seconds apart at most, and each must not start a child
of its own (about 0.3 s of CPU); a minute covers them, and a switch's steps (preflight, CSR,
stage, switch), which come at most a freeze window apart."""

TIMEOUT = 60.0
"""The longest one call may take (a key, a CSR, a check take milliseconds; a loaded machine
and the child's start, under a second)."""

STARTUP_TIMEOUT = 20.0
"""``TIMEOUT`` while the agent starts (before it tells systemd READY, whose start timeout is
90 s): a cold child on a loaded machine, its import at a low priority, well within it."""

STOP_PATIENCE = 5.0  # seconds a child told to stop (its stdin closed) has before it is killed
LINE_LIMIT = 64 * 1024 * 1024  # the longest answer line read (a large revocation list)

# -P: the child (root, handling keys) never imports from its working directory, whatever that
# is. What a daemon never needs is kept out first (``tlsroll.lean``), then the child's own
# module (``nodeagent.cryptoworker_child``: none of this one's imports) with the garbage
# collector off (its preload's imports, and the collector's freeze, follow in ``main``).
CHILD = (
    "from tlsroll import lean; lean.keep_out(); import gc; gc.disable(); "
    "from nodeagent import cryptoworker_child; gc.enable(); cryptoworker_child.main()"
)


class CryptoWorker:
    """The agent's side: one child at a time, one call at a time (``call``), started ahead of
    need by ``warm``, stopped after ``idle_seconds`` without a call or by ``close``."""

    def __init__(
        self,
        *,
        idle_seconds: float | None = None,
        timeout: float = TIMEOUT,
        log_level: str = "info",
        json_logs: bool | None = None,
    ) -> None:
        self.idle_seconds = IDLE_SECONDS if idle_seconds is None else idle_seconds
        self.timeout = timeout
        self.log_level = log_level
        self.json_logs = (not sys.stderr.isatty()) if json_logs is None else json_logs
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        # The loop it serves (``call_blocking`` runs calls there): the one it is made in, else
        # the first one it is called or warmed in.
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.started = 0  # children started so far (tests, the bench)

    @property
    def pid(self) -> int | None:
        """The running child's process id, None if none runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    # --- calls ---------------------------------------------------------------------------------

    async def call(self, op: str, request: dict[str, Any]) -> Any:
        """The child's answer to ``op`` with ``request`` (its ``ok`` value), or its error
        raised as the class it was (``certwork._error``)."""
        self._loop = asyncio.get_running_loop()
        async with self._lock:
            self._disarm()
            try:
                answer = await self._exchange(op, request)
            finally:
                self._arm()
        return _result(answer)

    def call_blocking(self, op: str, request: dict[str, Any]) -> Any:
        """``call`` from a worker thread of the agent (never its event loop's thread): run on
        the loop the worker serves, waited for here."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise TransientError(f"crypto work ({op}): the agent's event loop is not running")
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:  # it would wait for itself for good
                raise TerminalError(f"crypto work ({op}) waited for on the event loop's thread")
        return asyncio.run_coroutine_threadsafe(self.call(op, request), loop).result()

    async def _exchange(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise ShuttingDown(f"crypto work ({op}): the agent is stopping")
        line = json.dumps({"op": op, "request": request}).encode() + b"\n"
        for again in (False, True):
            proc = await self._running(op)
            taken, raw = await self._ask(proc, op, line)
            if raw.endswith(b"\n"):
                break
            # EOF: the child ended. It had not taken the request (no ``TAKEN``): it had ended
            # while idle, however the agent learns of it (the write failed, or landed in the
            # pipe before the kernel closed the child's end), and a new child takes it, once.
            # It had taken it: it died in the middle of the call.
            code = await self._ended(proc)
            if taken or again:
                raise WorkerEnded(f"crypto work ({op}) failed: the worker ended ({code})")
        try:
            answer = json.loads(raw)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
        except ValueError:
            await self._kill(proc)
            raise NoAnswer(f"crypto work ({op}) failed: an answer that is not JSON") from None
        return answer

    async def _ask(
        self, proc: asyncio.subprocess.Process, op: str, line: bytes
    ) -> tuple[bool, bytes]:
        """``line`` written to ``proc``: whether the child took it (``TAKEN`` came), and its
        answer's line (without its newline: EOF first). The write and the reads have the
        call's ``timeout`` together: a child that never reads (stopped, hung) holds no call
        longer, whatever the request's size (review s47rev5 L2)."""
        assert proc.stdin is not None and proc.stdout is not None
        try:
            async with asyncio.timeout(self.timeout):
                # Not drained: a request larger than the pipe holds goes on being written
                # while the child reads it, and the answer's end says what became of it (a
                # write that fails finds a child that ended before it read the whole line, and
                # the EOF that follows says so; ``drain`` would wait for good on a pipe that a
                # reader of a dead child, or a stopped child, keeps full).
                proc.stdin.write(line)
                taken = await proc.stdout.read(len(TAKEN))
                if not taken:  # EOF: it ended before it took the request
                    return False, b""
                if taken != TAKEN:
                    raise NoAnswer(f"crypto work ({op}) failed: an answer that is not JSON")
                return True, await proc.stdout.readline()
        except TimeoutError:
            await self._kill(proc)
            raise TransientError(f"crypto work ({op}) took over {self.timeout:.0f} s") from None
        except (asyncio.LimitOverrunError, ValueError):
            await self._kill(proc)
            raise NoAnswer(
                f"crypto work ({op}): an answer longer than {LINE_LIMIT} bytes"
            ) from None
        except BaseException:  # cancelled (its answer must not be the next call's), NoAnswer
            await self._kill(proc)
            raise

    async def _running(self, op: str) -> asyncio.subprocess.Process:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc
        if proc is not None:
            await self._reap(proc)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-c",
                CHILD,
                "json" if self.json_logs else "console",
                self.log_level,
                str(os.getpid()),  # its parent: an orphan serves nothing (``_orphaned``)
                cryptoworker_child.TAKES,  # it says ``TAKEN`` once it has a whole request
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,  # its log lines go where the agent's go
                limit=LINE_LIMIT,
                close_fds=True,
            )
        except OSError as exc:  # no child at all: short of descriptors, processes or memory, …
            what = f"starting the crypto worker ({op})"
            raise_if_local(exc, what)
            raise TransientError(f"{what}: {' '.join(str(exc).split())}") from None
        self._proc = proc
        self.started += 1
        log.info("cryptoworker.started", pid=proc.pid)
        return proc

    # --- start ahead, stop when idle ---------------------------------------------------------

    def warm(self) -> None:
        """Start the child now, ahead of need (its start and its import of the certificate
        code then overlap other work); nothing if one runs or is starting. Needs the running
        event loop."""
        if self._closed or self.pid is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._lock.locked():
            return  # a call (or a start) is under way: it starts one
        self._spawn(self._warm())

    async def _warm(self) -> None:
        async with self._lock:
            if self._closed or self.pid is not None:
                return
            self._disarm()
            try:
                await self._running("warm")
            except TlsrollError as exc:  # the call that needs it says so again
                log.warning(
                    "cryptoworker.not_started",
                    error=str(exc),
                    detail="the agent's crypto worker did not start ahead; the call that needs "
                    "it starts it again and says why if it fails",
                )
            finally:
                self._arm()

    def _arm(self) -> None:
        """(Re)start the idle clock: the child is stopped after ``idle_seconds`` without a
        call."""
        self._disarm()
        if self._proc is not None and not self._closed:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(self.idle_seconds, self._on_idle)

    def _disarm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        if self._lock.locked():
            return  # a call runs: it arms the clock again when done
        self._spawn(self._stop_idle())

    async def _stop_idle(self) -> None:
        async with self._lock:
            if self._idle is not None or self._proc is None:
                return  # a call came meanwhile (its clock runs), or nothing runs
            proc, self._proc = self._proc, None
            await self._stop(proc)
            log.info("cryptoworker.idle_stopped", pid=proc.pid)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop the child (its stdin closed, killed if it does not end); no call is taken
        after."""
        self._closed = True
        self._disarm()
        # A start ahead or an idle stop under way ends first (not cut short: its child would
        # be left running, its pipes open).
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                await self._stop(proc)

    # --- the child's end -----------------------------------------------------------------------

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """End ``proc`` as asked: EOF on its stdin, then a kill after ``STOP_PATIENCE``."""
        if proc.stdin is not None:
            proc.stdin.close()
            with contextlib.suppress(OSError):
                await proc.stdin.wait_closed()
        try:
            await asyncio.wait_for(proc.wait(), STOP_PATIENCE)
        except TimeoutError:
            await self._kill(proc)
        await self._reap(proc)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await self._reap(proc)
        if self._proc is proc:
            self._proc = None

    async def _ended(self, proc: asyncio.subprocess.Process) -> str:
        """How a child that closed its stdout ended: 'exit N' or 'signal N' (killed if it
        does not end within ``STOP_PATIENCE``)."""
        try:
            code = await asyncio.wait_for(proc.wait(), STOP_PATIENCE)
        except TimeoutError:
            await self._kill(proc)
            code = proc.returncode if proc.returncode is not None else -9
        await self._reap(proc)
        if self._proc is proc:
            self._proc = None
        return f"signal {-code}" if code < 0 else f"exit {code}"

    @staticmethod
    async def _reap(proc: asyncio.subprocess.Process) -> None:
        """Wait for a child known to end, and close its pipes (no transport left behind)."""
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()
        # What the child never read of a request is dropped (a request larger than the pipe
        # holds, to a child that ended: its pipe kept open by a reader that reads no more).
        if proc.stdin is not None and proc.stdin.transport.get_write_buffer_size():
            proc.stdin.transport.abort()
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()


NoAnswer = certwork.NoAnswer
TAKEN = cryptoworker_child.TAKEN


class WorkerBug(Exception):
    """An op failed unexpectedly (a bug: a ``TypeError``, a ``KeyError``): its class name only
    (its message might hold a secret). Not a ``TlsrollError``, as the op's own exception was
    when the agent ran it: a servicer answers INTERNAL with a generic message (logged), not
    FAILED_PRECONDITION (review s41, Low 2)."""


def _result(answer: dict[str, Any]) -> Any:
    """An answer's ``ok`` value, or its error raised as the class it was."""
    if "ok" in answer:
        return answer["ok"]
    error = answer.get("error") or {}
    if error.get("type") == "WorkerBug":
        raise WorkerBug(str(error.get("message", "")))
    raise certwork._error(error)


class WorkerEnded(TransientError):
    """The child ended in the middle of a call (a signal, the OOM killer, its parent's stop):
    no verdict on the request, and a new child takes the next. Transient (UNAVAILABLE): the
    leader tries the step again, as when the whole agent was killed. (``certwork.NoAnswer``
    stays for certwork's one-shot children and for an answer that is not one.)"""


class InProcess:
    """``CryptoWorker``'s interface, the ops run in this process (in a worker thread): for
    tests and tools that build the agent's parts without an agent (its memory is not theirs
    to keep low). The same ops, the same errors."""

    pid: int | None = None

    async def call(self, op: str, request: dict[str, Any]) -> Any:
        return await asyncio.to_thread(self.call_blocking, op, request)

    def call_blocking(self, op: str, request: dict[str, Any]) -> Any:
        # Answered and raised as the child's (``cryptoworker_child.serve``): the same errors
        # either way.
        return _result(cryptoworker_child.serve({"op": op, "request": request}))

    def warm(self) -> None:
        pass

    async def close(self) -> None:
        pass


Worker = CryptoWorker | InProcess
"""What the agent's parts take: the child, or the same ops in-process."""


def main() -> int:
    """The child's start for an agent started before 900742f, whose ``CHILD`` was
    ``from nodeagent import cryptoworker; cryptoworker.main()`` (review s42 of the lean child,
    Low 2): upgraded underneath a running agent, that agent starts each new child with it
    until it restarts itself, and without this every crypto call it makes (a key, a stage, a
    revocation list) would fail (AttributeError). It runs ``cryptoworker_child.main``; such a
    child also imports this module (structlog, asyncio), and starts as slowly as it did.

    Keep it until no such agent can run: remove it in the release after the first one that
    ships ``nodeagent.cryptoworker_child`` (an upgrade restarts the agent)."""
    return cryptoworker_child.main()
