"""The reference server's public listeners (http 8080, https 8443), gated: how many connections
the practice's network may hold in the server, and for how long (review s69 revref H1).

Before, aiohttp's own sites took every connection anyone opened: one LAN host holding a few
thousand connections that sent half a request head (a "slowloris"), or never finished a TLS
handshake, filled the server's descriptors (the agent's unit gives it 4096), and then its admin
socket accepted nothing: the agent could neither freeze nor ask its status, so every switch of
the node failed and its heartbeats said the server was down. Now, as the leader's viewer and
the agent's bootstrap listener do (``tlsroll.accept_gate``), counted from the TCP accept:

- at most ``MAX_CONNECTIONS`` public connections at once, and never more than the descriptor
  limit leaves after ``RESERVED_DESCRIPTORS`` (the admin socket, the store, the logs, the
  listeners), read at every accept (the limit may be changed while the server runs); a quarter
  of them per source; one more is closed as it is accepted;
- ``HANDSHAKE_SECONDS`` for a TLS handshake;
- ``HEAD_SECONDS`` for the first request's whole head from the hand-over to aiohttp (nothing
  sent, or a head a byte at a time); from each answer on, aiohttp's ``keepalive_timeout`` (the
  runner's) bounds the wait for the next; a request's body must come within ``BODY_SECONDS``
  (``refserver.server``: a body sent a byte at a time is a 408, its connection closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
from collections.abc import Callable

from tlsroll import logs
from tlsroll.accept_gate import Accepted, AcceptGate, per_source

log = logs.get_logger(__name__)

MAX_CONNECTIONS = 1024  # public connections at once, both listeners together
BACKLOG = 64  # also how many connections asyncio accepts in one go, before any is counted
# Kept for everything else the server opens (the admin socket and its connections, the store's
# connections, logs, listeners), and for one batch of accepts on each listener: a flood never
# takes the descriptors the admin socket needs, nor has asyncio log "out of system resource".
RESERVED_DESCRIPTORS = 64 + 2 * BACKLOG
HANDSHAKE_SECONDS = 10.0
HEAD_SECONDS = 15.0
BODY_SECONDS = 20.0  # for a request's whole body, once its head is in (``refserver.server``)
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


class PublicListeners:
    """Both public listeners, one count: each connection is handed to aiohttp's request
    handler (``factory``, the runner's server) once admitted (and its TLS handshake done)."""

    def __init__(self, factory: Callable[[], asyncio.Protocol]) -> None:
        self.factory = factory
        self.gate = AcceptGate(MAX_CONNECTIONS, on_refused=_refused)
        self._servers: list[asyncio.Server] = []
        self._connections: dict[asyncio.Task[None], tuple[asyncio.Transport, str]] = {}
        self._handed: set[asyncio.Task[None]] = set()
        self._closing = False

    async def listen(self, address: str, port: int, context: ssl.SSLContext | None) -> None:
        """Listen on ``address:port`` (TLS with ``context``); OSError if it cannot."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Accepted(lambda transport: self._accepted(transport, context)),
            address,
            port,
            backlog=BACKLOG,
            reuse_address=True,
        )
        self._servers.append(server)

    async def stop(self) -> None:
        """Stop accepting and end the connections not handed to aiohttp yet (those aiohttp
        has are its runner's to close: call this before ``runner.cleanup``)."""
        self._closing = True
        for server in self._servers:
            server.close()
        for task in set(self._connections) - self._handed:
            task.cancel()
        await asyncio.sleep(0)

    async def abort_all(self) -> None:
        """After ``runner.cleanup`` (which gave aiohttp's connections their bound): what is
        still open (a TLS close a client never answers) is aborted at once."""
        for transport, _ in self._connections.values():
            transport.abort()
        self._connections.clear()
        self.gate.clear()
        servers, self._servers = self._servers, []
        for server in servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_SECONDS):
                    await server.wait_closed()

    def _accepted(self, transport: asyncio.Transport, context: ssl.SSLContext | None) -> None:
        cap = connection_cap()
        self.gate.max_connections, self.gate.max_per_source = cap, per_source(cap)
        taken = self.gate.admit(transport, closing=self._closing)
        if taken is None:
            return
        task = asyncio.get_running_loop().create_task(self._connection(transport, context))
        self._connections[task] = (transport, taken.source)
        task.add_done_callback(self._forget)  # its place back whatever the task did

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._handed.discard(task)
        entry = self._connections.pop(task, None)
        if entry is None:
            return
        transport, source = entry
        transport.abort()
        self.gate.release(source)
        if not task.cancelled():
            task.exception()  # (retrieved: ``_connection`` catches its own)

    async def _connection(
        self, transport: asyncio.Transport, context: ssl.SSLContext | None
    ) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        ended: asyncio.Future[None] = loop.create_future()
        try:
            protocol = _Handed(self.factory(), ended)
            served: asyncio.BaseTransport | None = transport
            if context is not None:
                served = await loop.start_tls(
                    transport,
                    protocol,
                    context,
                    server_side=True,
                    ssl_handshake_timeout=HANDSHAKE_SECONDS,
                    ssl_shutdown_timeout=CLOSE_SECONDS,
                )
            else:
                transport.set_protocol(protocol)
            if served is None or self._closing or ended.done():
                return
            self._handed.add(task)
            protocol.connection_made(served)
            if context is None:
                transport.resume_reading()  # (``Accepted`` paused it)
            await ended  # aiohttp closes it (keepalive_timeout, an answer that closes, a stop)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, asyncio.CancelledError):
            pass  # a handshake that failed or timed out, or ``stop`` during it
        except Exception as exc:  # a bug here must not end in asyncio's log with a traceback
            log.error("public.connection_failed", error=type(exc).__name__)
        finally:
            transport.abort()  # the descriptor is gone before ``_forget`` gives the place back


class _Handed(asyncio.Protocol):
    """Between the transport and aiohttp's handler: holds what TLS delivers before the handler
    has its transport, closes the connection when no whole first request head has come
    ``HEAD_SECONDS`` after the hand-over, and tells ``ended`` when the connection is lost."""

    def __init__(self, inner: asyncio.Protocol, ended: asyncio.Future[None]) -> None:
        self.inner = inner
        self.ended = ended
        self.made = False
        self.early: list[bytes] = []
        self.early_eof = False
        self._transport: asyncio.BaseTransport | None = None
        self._headed = False  # the first request's head is whole (an empty line has come)
        self._tail = b""
        self._no_head: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made, self._transport = True, transport
        if not self._headed:
            self._no_head = asyncio.get_running_loop().call_later(HEAD_SECONDS, self._headless)
        self.inner.connection_made(transport)
        early, self.early = self.early, []
        for data in early:
            self.inner.data_received(data)
        if self.early_eof:
            self.inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if not self._headed:
            self._watch(data)
        if self.made:
            self.inner.data_received(data)
        else:
            self.early.append(data)

    def _watch(self, data: bytes) -> None:
        """Look for the empty line that ends the first head (CRLF, or a bare LF)."""
        if not self._tail:
            data = data.lstrip(b"\r\n")
            if not data:
                return
        seen = self._tail + data
        if b"\n\r\n" in seen or b"\n\n" in seen:
            self._headed, self._tail = True, b""
            if self._no_head is not None:
                self._no_head.cancel()
                self._no_head = None
        else:
            self._tail = seen[-3:]

    def _headless(self) -> None:
        self._no_head = None
        if self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool | None:
        if not self.made:
            self.early_eof = True
            return None
        self.inner.eof_received()
        return None  # the connection is closed when aiohttp is done with it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._no_head is not None:
            self._no_head.cancel()
            self._no_head = None
        if self.made:
            self.inner.connection_lost(exc)
        if not self.ended.done():
            self.ended.set_result(None)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _refused(remote: str, limit: str, refused: int) -> None:
    log.warning("public.too_many_connections", remote=remote, limit=limit, refused=refused)
