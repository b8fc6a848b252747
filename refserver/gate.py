"""The reference server's public listeners (http 8080, https 8443), gated: how many connections
the practice's network may hold in the server, and for how long (review s69 revref H1).

Before, aiohttp's own sites took every connection anyone opened: one LAN host holding a few
thousand connections that sent half a request head (a "slowloris"), or never finished a TLS
handshake, filled the server's descriptors (the agent's unit gives it 4096), and then its admin
socket accepted nothing: the agent could neither freeze nor ask its status, so every switch of
the node failed and its heartbeats said the server was down. Now, as the leader's viewer does
(``tlsroll.gated_listener``, with the limits below), counted from the TCP accept:

- at most ``MAX_CONNECTIONS`` public connections at once, and never more than the descriptor
  limit leaves after ``RESERVED_DESCRIPTORS`` (the admin socket, the store, the logs, the
  listeners), read at every accept (the limit may be changed while the server runs); a quarter
  of them per source; one more is closed as it is accepted;
- ``HANDSHAKE_SECONDS`` for a TLS handshake;
- ``HEAD_SECONDS`` for the first request's whole head from the hand-over to aiohttp (nothing
  sent, or a head a byte at a time); from each answer on, aiohttp's ``keepalive_timeout`` (the
  runner's) bounds the wait for the next; a request's body must come within ``BODY_SECONDS``
  (``refserver.server``: a body sent a byte at a time is a 408, its connection closed);
- ``MAX_HEADERS`` header lines of ``MAX_FIELD_BYTES`` at most in a request (then a 400) and
  ``MAX_BODY_BYTES`` of body (then a 413): what a flood can make the server hold is bounded.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
from collections.abc import Callable

from tlsroll import logs
from tlsroll.gated_listener import GatedListener, Limits

log = logs.get_logger(__name__)

MAX_CONNECTIONS = 1024  # public connections at once, both listeners together
# What one connection can make the server hold for up to ``HEAD_SECONDS`` + ``BODY_SECONDS``:
# a request head of ``MAX_HEADERS`` lines of up to ``MAX_FIELD_BYTES`` (aiohttp's parser keeps
# each line twice: 32 x 4 KiB, about 256 KiB measured) and a body of ``MAX_BODY_BYTES``. With
# aiohttp's defaults (128 lines of 8 KiB, about 2 MiB; a body of 1 MiB) 1024 connections could
# make it hold about 3 GiB; now about 0.5 GiB (review s69 gate). A browser sends about 20 lines
# (its cookies for this host one of them); an entry is a few hundred bytes (the demo's: 50).
MAX_HEADERS = 32  # header lines of one request (aiohttp's ``max_headers``; more: a 400)
MAX_FIELD_BYTES = 4096  # one header line's name and value (``max_field_size``; more: a 400)
MAX_BODY_BYTES = 256 * 1024  # one request's body: an entry, a login (``client_max_size``: 413)
BACKLOG = 64  # also how many connections asyncio accepts in one go, before any is counted
# Kept for everything else the server opens (the admin socket and its connections, the store's
# connections, logs, listeners), and for one batch of accepts on each listener: a flood never
# takes the descriptors the admin socket needs, nor has asyncio log "out of system resource".
RESERVED_DESCRIPTORS = 64 + 2 * BACKLOG
HANDSHAKE_SECONDS = 10.0
HEAD_SECONDS = 15.0
BODY_SECONDS = 20.0  # for a request's whole body, once its head is in (``refserver.server``)
# aiohttp's lingering time (its default, named): after an answer sent before the request's
# body was read (the 408 of a body past ``BODY_SECONDS``), the rest of the body is read and
# dropped for this long at most, then the connection is closed.
LINGER_SECONDS = 10.0
CLOSE_SECONDS = 5.0  # TLS's close, then the connection is aborted


def connection_cap() -> int:
    """How many public connections the server may hold now (at least 1)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft - RESERVED_DESCRIPTORS))


class PublicListeners(GatedListener):
    """Both public listeners, one count: each connection is handed to aiohttp's request
    handler (``factory``, the runner's server) once admitted (and its TLS handshake done).
    ``stop`` before ``runner.cleanup``; ``abort_all`` after it (which gave aiohttp's
    connections their bound): what is still open then (a TLS close a client never answers)
    is aborted at once."""

    def __init__(self, factory: Callable[[], asyncio.Protocol]) -> None:
        limits = Limits(
            max_connections=MAX_CONNECTIONS,
            handshake_timeout=HANDSHAKE_SECONDS,
            write_timeout=None,
            close_timeout=CLOSE_SECONDS,
            head_timeout=HEAD_SECONDS,
        )
        super().__init__(
            factory, limits, on_refused=_refused, on_failed=_failed, cap=connection_cap
        )

    async def listen_on(self, address: str, port: int, context: ssl.SSLContext | None) -> None:
        """Listen on ``address:port`` (TLS with ``context``); OSError if it cannot."""
        await self.listen(context, backlog=BACKLOG, address=address, port=port)


def _failed(error: str) -> None:
    log.error(
        "public.connection_failed",
        error=error,
        hint="that connection ended; a bug in tlsroll: report it with the lines before this one",
    )


def _refused(remote: str, limit: str, refused: int) -> None:
    log.warning(
        "public.too_many_connections",
        remote=remote,
        limit=limit,
        refused=refused,
        detail="the server refused connections over its limit: many clients at once, or a flood "
        "from that address",
    )
