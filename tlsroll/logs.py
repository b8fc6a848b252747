"""Logging set-up for the daemons: structlog, JSON lines on stderr, pretty on a TTY.

Secrets are never passed to a logger in the first place; ``redact_secrets`` is the second line
of defence: any event key whose name looks like a secret has its value replaced.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEY = re.compile(r"(secret|token|password|passphrase|private|verifier)", re.IGNORECASE)
# Keys that contain one of the words above but hold only public identifiers.
_PUBLIC_KEYS = frozenset({"token_id"})


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key not in _PUBLIC_KEYS and _SECRET_KEY.search(key):
            event_dict[key] = "[redacted]"
    return event_dict


def configure(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog for a daemon; ``json=None`` picks JSON unless stderr is a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
