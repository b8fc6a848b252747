"""A gated listener for aiohttp: how many connections the practice's network may hold in a
process that serves aiohttp's request handler on a port open to the LAN, and for how long.

The leader's web viewer (``leader.viewer.listener``) and the reference server's public
listeners (``refserver.gate``) serve aiohttp this way, each with its own ``Limits``:

- every connection is counted from its TCP accept (``tlsroll.accept_gate``: a cap in all and a
  quarter of it per source; one more is closed as it is accepted), ``cap`` (if given) read at
  every accept;
- ``handshake_timeout`` for the TLS handshake (a listener without TLS context has none);
- ``head_timeout`` for the first request's whole head, from the hand-over to aiohttp (nothing
  sent, or a head a line at a time): only recent aiohttp starts its ``keepalive_timeout`` as a
  connection is made (review s38 M2); from each answer on, the runner's ``keepalive_timeout``
  bounds the wait for the next;
- ``write_timeout`` (unless None) for a write that cannot go on (a client that reads no more),
  after which the connection is aborted;
- ``close_timeout`` for TLS's close (a client that never answers close_notify), after which the
  connection is aborted: its descriptor is gone and its place free.

Each connection starts TLS itself (``loop.start_tls``) and is then handed to aiohttp's handler
(``factory``, the runner's server), which sees it as an aiohttp site would have given it.
``stop`` before the runner's ``cleanup`` (no new connections; handshakes end), ``abort_all``
after it (what is still open is aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from tlsroll.accept_gate import Accepted, AcceptGate, Refused, per_source


@dataclass(frozen=True)
class Limits:
    max_connections: int
    handshake_timeout: float
    write_timeout: float | None
    close_timeout: float
    head_timeout: float


class GatedListener:
    """Serves aiohttp's handlers (``factory``) on one or more listening sockets, one count.

    ``on_refused`` and ``on_failed(error)`` are the role's log lines (refused connections; a
    bug in the hand-over). ``cap()``, if given, is the cap at each accept (at most
    ``limits.max_connections``). ``abort_all`` gives the connections still open ``grace``
    seconds to end first."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        limits: Limits,
        *,
        on_refused: Refused,
        on_failed: Callable[[str], None],
        cap: Callable[[], int] | None = None,
        grace: float = 0.0,
    ) -> None:
        self.factory = factory
        self.limits = limits
        self.on_failed = on_failed
        self.cap = cap
        self.grace = grace
        self.gate = AcceptGate(limits.max_connections, on_refused=on_refused)
        self._servers: list[asyncio.Server] = []
        # Every connection from its accept on: its TCP transport and its source.
        self._connections: dict[asyncio.Task[None], tuple[asyncio.Transport, str]] = {}
        self._handed: set[asyncio.Task[None]] = set()  # aiohttp serves them
        self._closing = False

    async def listen(
        self,
        context: ssl.SSLContext | None,
        *,
        backlog: int,
        sock: socket.socket | None = None,
        address: str | None = None,
        port: int = 0,
    ) -> None:
        """Serve on ``sock`` (listening already; owned from here on), or listen on
        ``address:port`` (OSError if it cannot); over TLS with ``context``, else in clear."""
        loop = asyncio.get_running_loop()

        def accepted() -> Accepted:
            return Accepted(lambda transport: self._accepted(transport, context))

        if sock is not None:
            server = await loop.create_server(accepted, sock=sock, backlog=backlog)
        else:
            server = await loop.create_server(
                accepted, address, port, backlog=backlog, reuse_address=True
            )
        self._servers.append(server)

    async def stop(self) -> None:
        """Stop accepting, and end the connections still in their handshake (those aiohttp
        has are its runner's to close: call this before ``runner.cleanup``)."""
        self._closing = True
        for server in self._servers:
            server.close()
        for task in set(self._connections) - self._handed:
            task.cancel()  # a handshake ends here; a connection aiohttp serves goes on
        await asyncio.sleep(0)

    async def abort_all(self) -> None:
        """After ``runner.cleanup``: what is still open (after ``grace``) is aborted."""
        if self.grace > 0 and self._connections:
            await asyncio.wait(set(self._connections), timeout=self.grace)
        for transport, _ in self._connections.values():
            transport.abort()
        self._connections.clear()
        self.gate.clear()
        servers, self._servers = self._servers, []
        for server in servers:  # (from 3.12 on this waits for its connections: none are left)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.close_timeout):
                    await server.wait_closed()

    def _accepted(self, transport: asyncio.Transport, context: ssl.SSLContext | None) -> None:
        if self.cap is not None:
            cap = self.cap()
            self.gate.max_connections, self.gate.max_per_source = cap, per_source(cap)
        taken = self.gate.admit(transport, closing=self._closing)
        if taken is None:
            return
        task = asyncio.get_running_loop().create_task(self._connection(transport, context))
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

    async def _connection(
        self, transport: asyncio.Transport, context: ssl.SSLContext | None
    ) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        ended: asyncio.Future[None] = loop.create_future()
        try:
            # (in the try: a factory that raises must not leave the transport open and the
            # place taken, with asyncio's "Task exception was never retrieved": review s38 M1)
            protocol = Handed(self.factory(), ended, transport, self.limits)
            served: asyncio.BaseTransport | None = transport
            if context is not None:
                served = await loop.start_tls(
                    transport,
                    protocol,
                    context,
                    server_side=True,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                    ssl_shutdown_timeout=self.limits.close_timeout,
                )
            else:
                transport.set_protocol(protocol)
            if served is None or self._closing or ended.done():
                return
            self._handed.add(task)
            protocol.connection_made(served)  # start_tls never calls it
            if context is None:
                transport.resume_reading()  # (``Accepted`` paused it)
            await ended  # aiohttp closes it (keepalive_timeout, an answer that closes, a stop)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, asyncio.CancelledError):
            pass  # a handshake that failed or timed out, or ``stop`` during it
        except Exception as exc:  # a bug here must not end in asyncio's log with a traceback
            self.on_failed(type(exc).__name__)
        finally:
            transport.abort()  # the descriptor is gone before ``_forget`` gives the place back


class Handed(asyncio.Protocol):
    """Between the transport (TLS's, or TCP's) and aiohttp's handler: holds what TLS delivers
    before the handler has its transport (TLS may read the first request in the same step as
    it ends the handshake), closes the connection when no whole first request head has come
    ``head_timeout`` after the hand-over, aborts it when its writes stay paused for
    ``write_timeout`` (unless None), and tells ``ended`` when the connection is lost."""

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
        self._served: asyncio.BaseTransport | None = None
        self._headed = False  # the first request's head is whole (an empty line has come)
        self._tail = b""  # the last bytes received until then
        self._no_head: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made, self._served = True, transport
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
        if self._served is not None:
            self._served.close()  # over TLS its close (close_notify), aborted after close_timeout

    def eof_received(self) -> bool | None:
        if not self.made:
            self.early_eof = True
            return None
        self.inner.eof_received()
        return None  # the connection is closed when aiohttp is done with it (over TLS, True
        # would mean nothing, and asyncio says so in the log)

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
        if self._stalled is None and self.write_timeout is not None:
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
