"""Logging set-up for the daemons: structlog, JSON lines on stderr, pretty on a TTY.

Every line names its event and its logger::

    {"event": "rollout.started", "logger": "leader.commands", "level": "info",
     "timestamp": "2026-11-30T10:00:00Z", "rollout_id": "r…", ...}

Events are named ``subject.what_happened`` in lower snake case (``txn.rolling_back``,
``bootstrap.enrol_refused``); loggers are the module's ``__name__`` (``logs.get_logger(
__name__)``); a test checks both over the whole source. Records of the standard library's
``logging`` (asyncio's debug warnings, for one) go through the same renderer, so the output
stays one JSON object per line.

Secrets are never passed to a logger in the first place; ``redact_secrets`` is the second line
of defence: any event key whose name looks like a secret has its value replaced.

A log line that cannot be written (stderr a file on a full disk, a dead pipe, ``/dev/full``) is
dropped and counted, never raised: log calls sit in error handlers and in the middle of a
switch, and an OSError out of ``log.info`` froze a node and stopped the leader's rollout loop.
The first line written again is preceded by ``log.lines_lost`` with the count (``LineWriter``).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from tlsroll import leanlog
from tlsroll.config import Section
from tlsroll.leanlog import LineWriter as LineWriter  # noqa: PLC0414
from tlsroll.leanlog import redact_secrets as redact_secrets  # noqa: PLC0414


def _name_key(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``logger_name`` (bound by ``get_logger``) is shown as ``logger``, as stdlib records are."""
    if "logger_name" in event_dict:
        event_dict["logger"] = event_dict.pop("logger_name")
    return event_dict


def _exception_place(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """An exception on a line (``exc_info``, as a library's ``logger.exception`` gives it:
    grpc's "Unexpected error in servicer", asyncio's "Task exception was never retrieved")
    kept as its type and place only (``error_type``, ``where``): never its message nor its
    traceback. Such records came from the standard library past ``redact_secrets`` (a key
    check, blind to a traceback): in JSON ``exc_info`` held the exception's message and a
    traceback object's repr, on a terminal structlog's console renderer printed a traceback
    with every frame's locals, a join token or passphrase among them (review s66 logs L1). A
    traceback is for a developer: ``TLSROLL_DEBUG=1`` (``daemon.internal_error``)."""
    info = event_dict.pop("exc_info", None)
    event_dict.pop("stack_info", None)
    if info is True:
        info = sys.exc_info()
    exc = info[1] if isinstance(info, tuple) else info
    if isinstance(exc, BaseException):
        event_dict["error_type"] = type(exc).__name__
        event_dict["where"] = where(exc)
    return event_dict


LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
"""The names ``--log-level`` and ``log_level`` take (a daemon's default is ``info``)."""


def level_problem(name: str) -> str | None:
    """Why ``name`` is not a log level, or None."""
    if name.lower() in LEVELS:
        return None
    return f"unknown log level {name!r}; use one of {', '.join(LEVELS)}"


def config_level(section: Section) -> str:
    """``log_level`` of a daemon's config section (default ``info``), checked."""
    value: str = section.text("log_level", "info")
    if problem := level_problem(value):
        raise section.error("log_level", problem)
    return value.lower()


def level_of(name: str) -> int:
    """The ``logging`` level of a name in ``LEVELS`` (any case)."""
    return LEVELS[name.lower()]


class _Handler(logging.Handler):
    """The standard library's records, formatted, written by the same ``LineWriter`` (one
    count of lost lines for both)."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a record that cannot be formatted is no failure
            self.handleError(record)
            return
        self.writer.msg(line)


_no_locals: Any = (
    structlog.dev.RichTracebackFormatter(show_locals=False)
    if getattr(structlog.dev, "rich", None) is not None  # (structlog's own test: rich installed)
    else structlog.dev.plain_traceback
)
"""A console's exception renderer: rich's, as structlog's default, but without the frames'
locals (structlog shows them by default, a secret among them: review s66 logs L1)."""


writer: LineWriter | None = None
"""The ``LineWriter`` of the last ``configure`` (its ``lost_total`` counts dropped lines)."""


def configure(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog (and the standard library's logging) for a daemon; ``json=None``
    picks JSON unless stderr is a TTY. Events below ``level`` are dropped; the standard
    library's records (third-party libraries) stay at WARNING or above whatever the level.
    Lines that cannot be written are dropped and counted (``LineWriter``), never raised."""
    global writer  # noqa: PLW0603 - one output per process, as structlog's configuration
    if json is None:
        try:
            json = not sys.stderr.isatty()
        except (OSError, ValueError):
            json = True
    # (No exception reaches a renderer: ``_exception_place``. Were one to, a console's
    # traceback shows no frame's locals, where a secret lives.)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=True, exception_formatter=_no_locals)
    )
    if json and leanlog.to_journal(sys.stderr):
        # journald reads each line's priority from a ``<N>`` before it (``leanlog.SYSLOG_PRIORITY``)
        plain = renderer

        def renderer(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
            level = str(event_dict.get("level", method))
            return leanlog.priority_prefix(level) + str(plain(logger, method, event_dict))

    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _exception_place,
        redact_secrets,
    ]
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)

    def notice(count: int) -> str:
        event: MutableMapping[str, Any] = {
            "event": "log.lines_lost",
            "logger": __name__,
            "level": "warning",
            "lost": count,
            "detail": "log lines could not be written (a full disk? a closed pipe?); dropped",
        }
        return str(renderer(None, "warning", stamp(None, "warning", event)))

    out = writer = LineWriter(sys.stderr, notice)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _name_key,
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per event (the line with its newline; print made two system calls of
        # every log line, stderr being unbuffered), and never an exception.
        logger_factory=lambda *_args: out,
        cache_logger_on_first_use=True,
    )
    # A record the standard library cannot handle prints no traceback to a stderr that may be
    # the very thing failing.
    logging.raiseExceptions = False
    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level, logging.WARNING))


def get_logger(name: str) -> Any:
    """The logger of module ``name`` (pass ``__name__``): every event it logs carries it. In a
    lean process (``tlsroll.leanlog`` configured: the crypto worker's child) that writer's."""
    if leanlog.configured():
        return leanlog.get_logger(name)
    return structlog.get_logger(logger_name=name)  # lazy: configure() may come later


# A lean logger's events (``tlsroll.leanlog``, not configured there) go through this module.
leanlog.structlog_logger = get_logger


_OWN_PACKAGES = ("tlsroll", "leader", "nodeagent", "workstation", "refserver")


def where(exc: BaseException) -> str:
    """Where ``exc`` was raised, for a log line that must hold no message: ``path:line in
    function`` of the innermost frame of tlsroll's own code, and, when it went on into a
    library, `` < `` the innermost frame there (``tlsroll/pki.py:511 in build_crl <
    cryptography/x509/base.py:…``). Never a value: a file, a line and a function name."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"

    def short(frame: traceback.FrameSummary) -> str:
        parts = Path(frame.filename).parts
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] in _OWN_PACKAGES or parts[i] == "site-packages":
                parts = parts[i + (parts[i] == "site-packages") :]
                break
        else:
            parts = parts[-2:]
        return f"{'/'.join(parts)}:{frame.lineno} in {frame.name}"

    names = [short(f) for f in frames]
    ours = [i for i, name in enumerate(names) if name.split("/", 1)[0] in _OWN_PACKAGES]
    if not ours or ours[-1] == len(names) - 1:
        return names[-1]
    return f"{names[ours[-1]]} < {names[-1]}"
