"""The agent's crypto worker's child process: its ops served, and nothing imported they do not need.

The agent's side (``nodeagent.cryptoworker``: the protocol, the child's start, its idle stop)
starts this with ``cryptoworker.CHILD``. A rollout's first node waits for the child's first
answer, and a later node's child starts while another node's server restarts on the same
cores: so from its start to its first answer the child imports the standard library, the op
modules (``OP_MODULES``: ``nodeagent.certwork_ops``, ``nodeagent.bootstrap_crypto``) and what
they need (``tlsroll.pki``, ``cryptography``; ``spake2`` for the bootstrap service), and
nothing else: no structlog (with asyncio and the standard library's logging), no agent config,
no identity module (its TLS and gRPC bits). The pieces of the agent's modules its ops need are
in lean modules of their own (``nodeagent.nodefiles``, ``nodeagent.sharing``,
``nodeagent.workerrors``, ``nodeagent.priority``); ``tests/test_cryptoworker.py`` pins the set.

Its few log lines (an op's unexpected failure, a preload that failed, an orphan's end, a staged
file whose owner could not be given, a Python warning: ``_show_warning``) are written by
``tlsroll.leanlog``, to the stderr it shares with the agent, in the agent's JSON shape
(``tlsroll.logs``). Written here, not sent back over the pipe to the agent: an orphan's line
has no agent to read it, a preload's failure comes before any request, and the protocol stays
one answer per request. Requests and answers are never logged (they carry keys and the
password's verifier), and an op's unexpected failure is logged and answered with its class name
alone. The answers are written to a descriptor of their own (the pipe the agent reads, which
was fd 1); fd 1 and ``sys.stdout`` are stderr's, so that whatever else writes to stdout (a
print, a library, C's stdio) is never read as an answer.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from nodeagent.priority import lower_priority
from tlsroll import lean, leanlog
from tlsroll.errors import TerminalError, TlsrollError

log = leanlog.get_logger(__name__)

OP_MODULES: dict[str, str] = {
    "cert": "nodeagent.certwork_ops",
    "bootstrap": "nodeagent.bootstrap_crypto",
}
"""Where the child finds an op "MODULE.NAME": ``OP_MODULES[MODULE].OPS[NAME]``."""

TAKES = "takes"
"""The child's fourth argument where the agent reads ``TAKEN`` (one that started it before
the byte was said gives three, and reads none)."""

TAKEN = b"."
"""Written back before a request's answer, once the child has the request's whole line and
before it acts on it: a child that ended without saying it never acted on the request, which
the agent then gives to a new child (a child killed while idle, whatever the order in which the
agent learns of it, and whatever the request's size)."""

PRELOAD = ("tlsroll.pki", "nodeagent.workerrors")
"""What the child imports at its start, at a low priority (``_Preload``): what every op needs,
and how an op's error is answered (``workerrors``, with ``nodefiles`` and ``tlsroll.fsutil``).
Not imported by this module itself: whatever it imports, the child imports at the normal
priority before its preload begins (issue 15, session 71: ``workerrors`` brought about 20 ms
of CPU there, with standard library modules that ``cryptography`` imports later, all of it
competing with another node's restart on the same cores)."""


_fresh_imports: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
"""How ``_op`` imports an op's module the first time: in the child (``main``) with the
collector off (``lean.importing``, as ``_Preload``); in the agent's own process
(``cryptoworker.InProcess``, a test's) as any import (no freeze of that process)."""


def _op(op: str) -> Callable[[dict[str, Any]], Any]:
    """The op named "MODULE.NAME" (``OP_MODULES``), its module imported on first use."""
    module_key, _, name = op.partition(".")
    module_name = OP_MODULES.get(module_key)
    if module_name is None or not name:
        raise TerminalError(f"unknown crypto work {op!r}")
    try:
        module = sys.modules.get(module_name)
        if module is None:
            with _fresh_imports():
                module = importlib.import_module(module_name)
    except ImportError:
        raise TerminalError(f"crypto work {op!r}: {module_name} is not available") from None
    ops = getattr(module, "OPS", None)
    found = ops.get(name) if isinstance(ops, dict) else None
    if found is None:
        raise TerminalError(f"unknown crypto work {op!r}")
    return found  # type: ignore[no-any-return]


def serve(message: Any) -> dict[str, Any]:
    """One request's answer line (never raises): ``{"ok": VALUE}`` or ``{"error": {...}}``
    (``workerrors.answer_for``; an unexpected failure is ``{"type": "WorkerBug", …}`` with
    its class name only)."""
    op = str(message.get("op", "")) if isinstance(message, dict) else ""
    try:
        if not isinstance(message, dict) or not isinstance(message.get("request"), dict):
            raise TerminalError("crypto work: a request that is not {op, request}")
        return {"ok": _op(op)(message["request"])}
    except (TlsrollError, OSError, ValueError) as exc:
        from nodeagent.workerrors import answer_for  # noqa: PLC0415 - preloaded (``PRELOAD``)

        return {"error": answer_for(exc)}
    except Exception as exc:  # its class only: the message might hold a secret
        return {"error": bug(op, exc)}


WARNING_LIMIT = 200
"""The longest warning text a ``cryptoworker.warning`` line carries (characters)."""


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` in the child (review s42 of the lean child, Low 3): a warning
    (``cryptography``'s for a certificate's negative serial, say) as one log line, JSON when the
    agent's are, not Python's two plain lines on the agent's stderr. Its category's name and
    text (whitespace made single spaces, cut to ``WARNING_LIMIT``: the texts of the libraries
    the ops use carry no secret), not its source line."""
    text = " ".join(str(message).split())
    log.warning(
        "cryptoworker.warning",
        category=category.__name__,
        message=text[:WARNING_LIMIT],
        detail="a library's warning seen in the agent's crypto worker; nothing failed",
    )


def answer_line(message: Any) -> bytes:
    """``serve``'s answer as the line written back (never raises): an op's value JSON cannot
    encode (a bug) is answered as its unexpected failure, as ``serve`` answers one, not the
    child's end."""
    answer = serve(message)
    try:
        return json.dumps(answer).encode() + b"\n"
    except Exception as exc:  # its class only, as ``serve``'s
        op = str(message.get("op", "")) if isinstance(message, dict) else ""
        return json.dumps({"error": bug(op, exc)}).encode() + b"\n"


def bug(op: str, exc: BaseException) -> dict[str, str]:
    """An op's unexpected failure, logged by its class only (its message might hold a
    secret), as the error answered for it."""
    log.error(
        "cryptoworker.op_failed",
        op=op,
        error_type=type(exc).__name__,
        hint="the operation failed and is answered as such; a bug in tlsroll: report it with"
        " the lines before this one",
    )
    return {"type": "WorkerBug", "message": failed(op, exc)}


def failed(op: str, exc: BaseException) -> str:
    """An op's unexpected failure as the agent is told it (``cryptoworker.WorkerBug``)."""
    return f"crypto work ({op}) failed: {type(exc).__name__}"


class _Preload:
    """``PRELOAD`` imported at the child's start, in a thread of low priority; a request
    waits for it (``wait``), and gives that thread its priority back while it does. The
    garbage collector is off while it imports, and what was made by then is frozen out of
    every later collection (``tlsroll.lean.importing``): importing ``cryptography`` and ours
    set off some 35 collections that freed nothing, about 15 ms of the child's 90-100 ms of
    CPU from its start to its first key (issue 15, session 71)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.tid: int | None = None
        self.before: int | None = None
        self.thread = threading.Thread(target=self._run, name="preload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if sys.platform == "linux":
                self.tid = threading.get_native_id()
                with contextlib.suppress(OSError):
                    self.before = os.getpriority(os.PRIO_PROCESS, self.tid)
            lower_priority()
            with lean.importing():
                for name in PRELOAD:
                    importlib.import_module(name)
        except Exception as exc:  # the op that needs it imports it again
            log.warning(
                "cryptoworker.preload_failed",
                error_type=type(exc).__name__,
                detail="the worker could not load its crypto library ahead; the operation that "
                "needs it loads it again",
            )
        finally:
            self.done.set()

    def wait(self) -> None:
        if self.done.is_set():
            return
        if self.tid is not None and self.before is not None:
            with contextlib.suppress(OSError):  # raising a priority may be refused: it waits
                os.setpriority(os.PRIO_PROCESS, self.tid, self.before)
        self.done.wait()


def main() -> int:
    """The child: serve requests from stdin until EOF (SIGTERM and SIGINT ignored: the
    agent's stop ends it, by EOF). Its arguments: ``json`` or ``console`` (how it logs), the
    log level, the agent's pid."""
    global _fresh_imports  # noqa: PLW0603 - the child's, set at its start
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _fresh_imports = lean.importing
    # Nothing but answers reaches the answers' pipe (review s42 of the lean child, Low 4): they
    # go through a descriptor of their own; fd 1 and ``sys.stdout`` are stderr's from here, so
    # a stray write (a print, a library's, C's) is a line in the log, not an answer.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    args = sys.argv[1:]
    level = args[1] if len(args) > 1 and args[1].lower() in leanlog.LEVELS else "info"
    leanlog.configure(
        json_lines=(args[0] if args else "json") == "json", level=leanlog.level_of(level)
    )
    warnings.showwarning = _show_warning
    parent = int(args[2]) if len(args) > 2 and args[2].isdigit() else os.getppid()
    takes = len(args) > 3 and args[3] == TAKES
    preload = _Preload()
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return 0  # EOF: the agent closed it, or ended
        if not line.strip():
            continue
        if takes and not _say(answers, TAKEN):
            return 0
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        preload.wait()
        if _orphaned(parent):
            return 0
        line = answer_line(message)
        if _orphaned(parent) or not _say(answers, line):
            return 0


def _say(answers: Any, data: bytes) -> bool:
    """``data`` written to the agent; False if it has ended (nobody to answer)."""
    try:
        answers.write(data)
        answers.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # (its buffer dropped, not flushed at exit)
            answers.close()
        return False
    return True


def _orphaned(parent: int) -> bool:
    """True once the agent that started the child has ended (killed: SIGKILL, the OOM killer):
    a request it left in the pipe is not served, so that an orphan does not write a key or
    install a renewal beside the agent started again (review s41, Low 5)."""
    if os.getppid() == parent:
        return False
    log.warning(
        "cryptoworker.orphaned",
        parent=parent,
        detail="the agent that started this crypto worker has gone: the worker ends",
    )
    return True


if __name__ == "__main__":
    raise SystemExit(main())
