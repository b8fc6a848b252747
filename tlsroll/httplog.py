"""aiohttp's server logger for tlsroll's https listeners: one line, the error's type, no text.

aiohttp logs a request it cannot parse ("Error handling request", ``LineTooLong`` and the
other ``HttpProcessingError``) and a handler that raised ("Unhandled exception") with the
exception's message and traceback. A ``LineTooLong``'s message holds the first 100 bytes of
the line, so an overlong Cookie or Authorization header put the viewer's session id or the
/metrics bearer token into the leader's log (audit s34 H2). Pass a subclass as ``logger=``
to ``web.AppRunner``::

    class _HttpLog(httplog.ServerLog):
        def bad_request(self, error_type: str, remote: str | None) -> None:
            log.warning("viewer.bad_request", remote=remote, error_type=error_type)

        def failed(self, error_type: str, where: str) -> None:
            log.error("viewer.request_failed", error_type=error_type, where=where)

    web.AppRunner(app, access_log=None, logger=_HttpLog())

Only the type and the place (``logs.where``) are logged, never a message or a traceback;
aiohttp's debug lines (a client that sends no HTTP, a client gone) are dropped. A bad request
comes with the client's address (``remote``: aiohttp's record's argument), so that a
subclass can sample its lines per source (the viewer: ``tlsroll.logsample``).
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType

from tlsroll.logs import where

_ExcInfo = (
    BaseException | tuple[type[BaseException], BaseException, TracebackType | None] | bool | None
)


def _exception(exc_info: object) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        value = exc_info[1]
        return value if isinstance(value, BaseException) else None
    if exc_info is True:
        return sys.exc_info()[1]
    return None


def _bad_request(exc: BaseException) -> bool:
    """A request aiohttp could not parse (the client's fault: 4xx)."""
    from aiohttp.http_exceptions import HttpProcessingError  # noqa: PLC0415 - loaded by then

    return isinstance(exc, HttpProcessingError)


def _remote(record: logging.LogRecord) -> str | None:
    """The client's address of aiohttp's "Error handling request from %s" line, if it is one."""
    args = record.args
    if (
        str(record.msg).startswith("Error handling request from")
        and isinstance(args, tuple)
        and len(args) == 1
        and isinstance(args[0], str)
    ):
        return args[0][:64]
    return None


class ServerLog(logging.Logger):
    """A ``logging.Logger`` that aiohttp's request handler writes to; subclasses log the two
    kinds of line with their own event names (``bad_request``, ``failed``). It has no handler
    and no parent: ``handle`` (the public step every record of a logger passes) turns each
    record into one of those lines, and nothing else reaches a handler."""

    def __init__(self) -> None:
        super().__init__("aiohttp.server", logging.WARNING)  # its debug lines: not even made

    def handle(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            return
        exc = _exception(record.exc_info)
        if exc is not None and _bad_request(exc):
            self.bad_request(type(exc).__name__, _remote(record))
        elif exc is not None:
            self.failed(type(exc).__name__, where(exc))
        else:  # aiohttp's own complaint (a handler without a response): its fixed text
            self.failed("none", str(record.msg).split("%", 1)[0].split(",", 1)[0][:80])

    def bad_request(self, error_type: str, remote: str | None) -> None:
        raise NotImplementedError

    def failed(self, error_type: str, where: str) -> None:
        raise NotImplementedError
