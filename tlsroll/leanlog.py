"""Log lines for a process that must stay lean (the agent's crypto worker), in the daemons' shape.

``tlsroll.logs`` is structlog, and structlog brings asyncio, its console renderer and the
standard library's logging: about 0.1 s of CPU before a process logs its first line. The agent's
crypto worker (``nodeagent.cryptoworker_child``) starts while a rollout waits for it and says little
(an op that failed, an orphan's end, a staged file whose owner could not be given); it writes
those lines itself, here, in the same shape as the agent's (``tlsroll.logs``)::

    {"parent": 4711, "event": "cryptoworker.orphaned", "logger": "nodeagent.cryptoworker_child",
     "level": "warning", "timestamp": "2026-12-03T15:00:00.123456Z"}

the event's keys first, then ``event``, ``logger``, ``level`` and ``timestamp`` (UTC, ISO),
secrets redacted by the same rule (``redact_secrets``), a line that cannot be written dropped
and counted (``LineWriter``), never raised; an event whose fields cannot be rendered is a line
with its name and none of its fields (``_Output.unrendered_line``, counted).

Code that runs in both the agent and the lean child (``nodeagent.sharing``) takes its logger
here (``get_logger(__name__)``): until ``configure`` is called (the child's ``main``) its
events go through ``tlsroll.logs`` (structlog: the agent's configuration, a test's
``capture_logs``), after it they are written here. So are those of a logger
``tlsroll.logs.get_logger`` makes after it, should the child import that module after all
(its unconfigured structlog would write to stdout, the child's answers). Imports the standard
library only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import threading
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

_SECRET_KEY = re.compile(r"(secret|token|password|passphrase|private|verifier)", re.IGNORECASE)
# Keys that contain one of the words above but hold only public identifiers.
_PUBLIC_KEYS = frozenset({"token_id"})

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
"""The names ``--log-level`` and ``log_level`` take, and their ``logging`` numbers."""

_NUMBERS = {**LEVELS, "critical": 50}  # every level a logger writes (structlog's names)

SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
"""A level's syslog priority, which journald reads from a ``<N>`` before a line
(``SyslogLevelPrefix=``, on by default): without it every line was stored at 6 (info), and
``journalctl -p warning`` or an alert on priority saw none of tlsroll's warnings and errors
(review s46rt2 M1)."""


def to_journal(stream: Any) -> bool:
    """Whether ``stream`` is connected to journald: systemd sets ``JOURNAL_STREAM`` to the
    device and inode of the stream it connects stdout/stderr to (systemd.exec(5)), which a
    redirected stderr (a file, a pipe) is not."""
    wanted = os.environ.get("JOURNAL_STREAM")
    if not wanted:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # (no descriptor: io.UnsupportedOperation)
        return False
    return wanted == f"{st.st_dev}:{st.st_ino}"


def priority_prefix(level: str) -> str:
    """``<N>`` for a line of ``level`` going to journald (``SYSLOG_PRIORITY``; 6 if unknown)."""
    return f"<{SYSLOG_PRIORITY.get(level, 6)}>"


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Any event key whose name looks like a secret has its value replaced (a processor of
    structlog's, and this module's last step before a line is written)."""
    for key in list(event_dict):
        if key not in _PUBLIC_KEYS and _SECRET_KEY.search(key):
            event_dict[key] = "[redacted]"
    return event_dict


class LineWriter:
    """The daemons' log output: one write of each whole line (and its newline) to ``file``,
    then a flush, under a lock (structlog's ``WriteLogger`` did the same). A line that cannot
    be written (OSError: a full disk, a closed pipe; ValueError: a closed file) is dropped and
    counted in ``lost``; the next line that can be written is preceded by the line
    ``notice(count)`` makes (``log.lines_lost``). Never raises, so a log call is never the
    cause of a failure. structlog calls it as a logger (``msg``, ``info``, …); the standard
    library's records come through ``tlsroll.logs._Handler``."""

    def __init__(self, file: TextIO, notice: Callable[[int], str] | None = None) -> None:
        self.file = file
        self.notice = notice or (lambda n: f"{n} log lines lost")
        self.lost = 0  # dropped since the last line written
        self.lost_total = 0
        self._lock = threading.Lock()

    def _write(self, line: str) -> bool:
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except (OSError, ValueError):
            return False
        return True

    def msg(self, message: str) -> None:
        with self._lock:
            if self.lost:
                try:
                    notice = self.notice(self.lost)
                except Exception:  # the notice is best effort, never a failure
                    notice = f"{self.lost} log lines lost"
                if self._write(notice):
                    self.lost = 0
            if self.lost or not self._write(message):
                self.lost += 1
                self.lost_total += 1

    def drop(self) -> None:
        """Count a line that could not be made as lost (said by the next notice)."""
        with self._lock:
            self.lost += 1
            self.lost_total += 1

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def render(event_dict: MutableMapping[str, Any], json_lines: bool = True) -> str:
    """One line: JSON as ``tlsroll.logs`` renders it, or a plain line for a terminal."""
    if json_lines:
        return json.dumps(event_dict, default=repr)
    rest = {k: v for k, v in event_dict.items() if k not in ("event", "level", "timestamp")}
    return (
        f"{event_dict.get('timestamp', '')} [{event_dict.get('level', '')!s:<9}] "
        f"{event_dict.get('event', '')!s:<30} " + " ".join(f"{k}={v!r}" for k, v in rest.items())
    ).rstrip()


class _Output:
    """Where this process's lean lines go once ``configure`` was called."""

    def __init__(self, json_lines: bool, level: int, file: TextIO) -> None:
        self.json_lines = json_lines
        self.journal = json_lines and to_journal(file)  # each line's priority before it
        self.level = level
        self.writer = LineWriter(file, self.notice)
        self.unrendered = 0  # events whose line could not be made (``unrendered_line``)

    def line(self, level: str, event_dict: MutableMapping[str, Any]) -> str:
        event_dict["level"] = level
        event_dict["timestamp"] = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        line = render(redact_secrets(None, level, event_dict), self.json_lines)
        return priority_prefix(level) + line if self.journal else line

    def notice(self, count: int) -> str:
        """``log.lines_lost``, its keys in the order of ``tlsroll.logs``' notice."""
        return self.line(
            "warning",
            {
                "event": "log.lines_lost",
                "logger": __name__,
                "level": "warning",
                "lost": count,
                "detail": "log lines could not be written (a full disk? a closed pipe?); dropped",
            },
        )

    def unrendered_line(self, level: str, event: str, logger: str, exc: Exception) -> str:
        """The line of an event whose own could not be made (a value whose ``repr`` raises,
        one that refers to itself): its name, logger and level, the failure's class, none of
        its values; counted in ``unrendered``."""
        self.unrendered += 1
        return self.line(
            level,
            {
                "error_type": type(exc).__name__,
                "detail": "this event's fields could not be rendered; left out",
                "event": event,
                "logger": logger,
            },
        )


_output: _Output | None = None

structlog_logger: Callable[[str], Any] | None = None
"""``tlsroll.logs.get_logger``, set when that module is imported: where a lean logger's events
go until ``configure`` is called."""


def configure(
    *, json_lines: bool = True, level: int = LEVELS["info"], file: TextIO | None = None
) -> None:
    """Write this process's lean loggers' events here from now on (JSON lines, or plain ones
    for a terminal; events below ``level`` dropped), to ``file`` (stderr)."""
    global _output  # noqa: PLW0603 - one output per process, as tlsroll.logs' configuration
    _output = _Output(json_lines, level, sys.stderr if file is None else file)


def configured() -> bool:
    """True once ``configure`` was called in this process (the lean child)."""
    return _output is not None


def level_of(name: str) -> int:
    """The level of a name in ``LEVELS`` (any case)."""
    return LEVELS[name.lower()]


class Logger:
    """``get_logger``'s: ``log.warning("subject.what_happened", key=value, …)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _emit(self, level: str, event: str, kw: dict[str, Any]) -> None:
        output = _output
        if output is None:  # not the lean child: the process's structlog configuration
            if structlog_logger is None:
                import tlsroll.logs  # noqa: F401, PLC0415 - it sets structlog_logger

            assert structlog_logger is not None
            getattr(structlog_logger(self.name), level)(event, **kw)
            return
        if _NUMBERS[level] < output.level:
            return
        event_dict: dict[str, Any] = {**kw, "event": event, "logger": self.name}
        try:
            line = output.line(level, event_dict)
        except Exception as exc:  # a line that cannot be made is no failure: its name said
            try:
                line = output.unrendered_line(level, str(event), self.name, exc)
            except Exception:  # (an event name that is no text): counted as lost
                output.writer.drop()
                return
        output.writer.msg(line)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        self._emit("critical", event, kw)

    # No traceback: it could show a secret's value (structlog's ``exception`` adds one).
    exception = error


def get_logger(name: str) -> Logger:
    """The lean logger of module ``name`` (pass ``__name__``)."""
    return Logger(name)
