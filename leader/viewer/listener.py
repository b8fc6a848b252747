"""The viewer's accept gate: how many connections the LAN may hold in the leader, and for how long.

The viewer shares the leader's process (and its descriptors) with the agents' gRPC and the
admin socket, and its port is open to every host of the practice's network, signed in or not.
So no host may hold connections there without bound (audit s38 M1: a thousand idle TLS
connections took the leader's descriptors; with a low limit the admin socket hung):

- at most ``max_connections`` open at once, counted from the TCP accept, and a quarter of them
  per source (``tlsroll.accept_gate``, as the agent's bootstrap listener counts); more are
  closed at once, so the rest of the leader goes on. (Unlike the bootstrap listener, nothing
  is evicted for a newcomer: a host with four addresses can fill the viewer, not the leader,
  for as long as it keeps its connections busy or renews them);
- ``handshake_timeout`` for the TLS handshake (a connection that never sends a ClientHello);
- ``head_timeout`` for the first request's head, from the hand-over to aiohttp (a client that
  sends nothing after its handshake, or its headers a line at a time): ours, since only recent
  aiohttp starts its ``keepalive_timeout`` as a connection is made (review s38 M2); from each
  answer on, aiohttp's ``keepalive_timeout`` (``Viewer``'s ``HEAD_SECONDS``) bounds the next;
- ``write_timeout`` for a write that cannot go on (a client that reads no more of an answer
  or of an /events stream: the socket's buffers are full), after which the connection is
  aborted;
- ``close_timeout`` for TLS's close (a client that never answers close_notify), after which
  the connection is aborted: its descriptor is gone and its place free.

An /events stream is a connection like any other and counts here (the app caps them too).

The listener is a plain TCP server on the viewer's socket; each connection starts TLS itself
(``loop.start_tls``) and is then handed to aiohttp's request handler (``factory``), which sees
it as ``web.SockSite`` would have given it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from tlsroll import logs
from tlsroll.accept_gate import Accepted, AcceptGate

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class Limits:
    max_connections: int = 64
    handshake_timeout: float = 10.0
    write_timeout: float = 30.0
    close_timeout: float = 5.0
    head_timeout: float = 15.0


class GatedListener:
    """Serves aiohttp's handlers (``factory``) over TLS on a listening socket, gated."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        limits: Limits | None = None,
        *,
        backlog: int = 128,
    ) -> None:
        self.factory = factory
        self.context = context
        self.limits = limits or Limits()
        self.backlog = backlog
        self.gate = AcceptGate(self.limits.max_connections, on_refused=_refused)
        self._server: asyncio.Server | None = None
        # Every connection from its accept on: its TCP transport and its source.
        self._connections: dict[asyncio.Task[None], tuple[asyncio.Transport, str]] = {}
        self._handed: set[asyncio.Task[None]] = set()  # aiohttp serves them
        self._closing = False

    async def start(self, sock: socket.socket) -> None:
        """Serve on ``sock`` (listening already); the server owns it from here on."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Accepted(self._accepted), sock=sock, backlog=self.backlog
        )

    async def stop(self) -> None:
        """Stop accepting, and end the connections still in their handshake (those aiohttp
        has are its runner's to close: call this before ``runner.cleanup``)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in set(self._connections) - self._handed:
            task.cancel()  # a handshake ends here; a connection aiohttp serves goes on
        await asyncio.sleep(0)

    async def abort_all(self) -> None:
        """After ``runner.cleanup``: what is still open is aborted."""
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=self.limits.close_timeout)
        for transport, _ in self._connections.values():
            transport.abort()
        self._connections.clear()
        self.gate.clear()
        server, self._server = self._server, None
        if server is not None:  # (from 3.12 on this waits for its connections: none are left)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.close_timeout):
                    await server.wait_closed()

    def _accepted(self, transport: asyncio.Transport) -> None:
        taken = self.gate.admit(transport, closing=self._closing)
        if taken is None:
            return
        task = asyncio.get_running_loop().create_task(self._connection(transport))
        self._connections[task] = (transport, taken.source)
        # Its place is given back when the task is done, whatever it did (a task cancelled
        # before its first step never runs its ``finally``: review s38 H1, M1).
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        """A connection's task is done: its descriptor goes, then its place (once only; none
        after ``abort_all``, which cleared the count)."""
        self._handed.discard(task)
        entry = self._connections.pop(task, None)
        if entry is None:
            return
        transport, source = entry
        transport.abort()
        self.gate.release(source)
        if not task.cancelled():
            task.exception()  # (retrieved: ``_connection`` catches its own)

    async def _connection(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        ended: asyncio.Future[None] = loop.create_future()
        try:
            # (in the try: a factory that raises must not leave the transport open and the
            # place taken, with asyncio's "Task exception was never retrieved": review s38 M1)
            protocol = _Handed(self.factory(), ended, transport, self.limits)
            tls = await loop.start_tls(
                transport,
                protocol,
                self.context,
                server_side=True,
                ssl_handshake_timeout=self.limits.handshake_timeout,
                ssl_shutdown_timeout=self.limits.close_timeout,
            )
            if tls is None or self._closing or ended.done():
                return
            self._handed.add(task)
            protocol.connection_made(tls)  # start_tls never calls it (call_connection_made=False)
            await ended  # aiohttp closes it (keepalive_timeout, an answer that closes, a stop)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            pass  # a handshake that failed or timed out: nothing to answer
        except asyncio.CancelledError:
            pass  # ``stop`` during the handshake
        except Exception as exc:  # a bug here must not end in asyncio's log with a traceback
            log.error("viewer.connection_failed", error=type(exc).__name__)
        finally:
            transport.abort()  # the descriptor is gone before ``_forget`` gives the place back


class _Handed(asyncio.Protocol):
    """Between the TLS transport and aiohttp's handler: holds what TLS delivers before the
    handler has its transport (TLS may read the first request in the same step as it ends
    the handshake), closes the connection when no whole first request head has come
    ``head_timeout`` after the hand-over, aborts it when its writes stay paused for
    ``write_timeout``, and tells ``ended`` when the connection is lost."""

    def __init__(
        self,
        inner: asyncio.Protocol,
        ended: asyncio.Future[None],
        tcp: asyncio.Transport,
        limits: Limits,
    ) -> None:
        self.inner = inner
        self.ended = ended
        self.tcp = tcp
        self.write_timeout = limits.write_timeout
        self.head_timeout = limits.head_timeout
        self.made = False
        self.early: list[bytes] = []
        self.early_eof = False
        self._stalled: asyncio.TimerHandle | None = None
        self._tls: asyncio.BaseTransport | None = None
        self._headed = False  # the first request's head is whole (an empty line has come)
        self._tail = b""  # the last bytes received until then
        self._no_head: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made, self._tls = True, transport
        if not self._headed:  # ours: aiohttp's keepalive_timeout may not run yet (M2)
            loop = asyncio.get_running_loop()
            self._no_head = loop.call_later(self.head_timeout, self._headless)
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
        """Look for the empty line that ends the first head (CRLF, or a bare LF); empty lines
        before its request line are no head."""
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
            self._tail = seen[-3:]  # (never empty once a request line has begun)

    def _headless(self) -> None:
        self._no_head = None
        if self._tls is not None:
            self._tls.close()  # TLS's close (close_notify), aborted after ``close_timeout``

    def eof_received(self) -> bool | None:
        if not self.made:
            self.early_eof = True
            return None
        self.inner.eof_received()
        return None  # over TLS, True would mean nothing (and asyncio says so in the log)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._no_head is not None:
            self._no_head.cancel()
            self._no_head = None
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        if self.made:
            self.inner.connection_lost(exc)
        if not self.ended.done():
            self.ended.set_result(None)

    def pause_writing(self) -> None:
        if self._stalled is None:
            loop = asyncio.get_running_loop()
            self._stalled = loop.call_later(self.write_timeout, self._stall)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        self.inner.resume_writing()

    def _stall(self) -> None:
        self._stalled = None
        self.tcp.abort()  # TLS and aiohttp learn it as a lost connection


def _refused(remote: str, limit: str, refused: int) -> None:
    log.warning("viewer.too_many_connections", remote=remote, limit=limit, refused=refused)
