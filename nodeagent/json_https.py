"""A small JSON-over-https listener on asyncio streams, ``ssl`` and h11 (the bootstrap service's).

The bootstrap service answers five fixed paths with small JSON bodies. It used aiohttp.web,
which kept 10 MiB in every switched agent for months; h11 (a pure HTTP/1.1 state machine, no
I/O of its own) parses and frames the messages, this module only moves bytes and enforces the
limits a listener open to a practice's network needs:

- ``max_body`` bytes per request body (413, then the connection closes: the rest is unread);
- ``max_head`` bytes for the request line and headers (h11's ``max_incomplete_event_size``;
  431 when it is exceeded);
- ``request_timeout`` seconds for one whole request (line, headers and body) and for the idle
  wait before the next one on a kept-alive connection: a client that sends a byte at a time
  (slowloris) is cut off, and so is one that holds a connection open doing nothing;
- ``handshake_timeout`` for the TLS handshake, ``write_timeout`` for sending an answer;
- ``max_connections`` open at once, counted from the TCP accept (a connection still in its TLS
  handshake, or one that never sends a ClientHello, holds a place and a descriptor too); more
  are closed at once (the workstation client opens one per request and closes it). One source
  (an IPv4 address, an IPv6 /64) gets a share of them (``max_per_source``: a quarter, at least
  2) so that a single address cannot lock every workstation out; a host that takes several
  addresses can hold several shares, and when every place is taken a connection from a
  source that holds fewer takes the place of an idle one (or one still in its handshake) of
  the source that holds the most (``tlsroll.accept_gate``);
- a stopped listener serves nothing more: ``stop`` ends the connections still in their
  handshake as well (its routes belong to the old service, such as the old password's
  verifier, and must never answer once a new one has taken over).

A request that cannot be parsed (400, 431) or whose body is too large (413) is logged sampled
per source (``https.malformed_request``, ``https.body_too_large`` for a source's first, then
``https.bad_requests_summary`` at most once a minute: ``tlsroll.logsample``): anybody on the
network can send them as fast as the node answers (session 67).

A handler that fails unexpectedly gets the client a 500 (``internal``) and one log line with the
exception's type (no traceback, no body), and its connection is closed.

A handler gets a ``Request`` (method, path without the query, the client's address and the
body) and returns a ``Reply``; GET routes answer HEAD too. Unknown paths get 404, a known path
with another method 405 with ``Allow``. Nothing here logs bodies or headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import h11

from tlsroll import logs
from tlsroll.accept_gate import Accepted, AcceptGate, per_source
from tlsroll.backoff import source_key
from tlsroll.errors import TerminalError
from tlsroll.logsample import SampledLog

log = logs.get_logger(__name__)

READ_CHUNK = 16 << 10


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    remote: str
    body: bytes = b""


@dataclass(frozen=True)
class Reply:
    """A JSON answer; ``headers`` are added to Content-Type/Length, Date and Cache-Control."""

    data: Mapping[str, Any]
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass(frozen=True)
class HttpLimits:
    max_body: int = 64 << 10
    max_head: int = 8 << 10
    request_timeout: float = 10.0
    handshake_timeout: float = 10.0
    write_timeout: float = 10.0
    max_connections: int = 128

    @property
    def max_per_source(self) -> int:
        """How many of ``max_connections`` one source (an IPv4 address, an IPv6 /64) may hold
        at once."""
        return per_source(self.max_connections)


class _TooLarge(TerminalError):
    """A request's body is over ``max_body``: answered 413, then the connection closes."""


class JsonHttpsListener:
    """Serves ``routes`` ({(method, path): handler}) over TLS on ``address:port``."""

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Handler],
        limits: HttpLimits | None = None,
        *,
        shutdown_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = dict(routes)
        for (method, path), handler in routes.items():
            if method == "GET":
                self.routes.setdefault(("HEAD", path), handler)
        self.limits = limits or HttpLimits()
        self.shutdown_timeout = shutdown_timeout
        self.port = 0  # the port bound, once started
        self._server: asyncio.Server | None = None
        self._context: ssl.SSLContext | None = None
        # Every connection from its accept on, TLS or not, with its TCP transport and state.
        self._connections: dict[asyncio.Task[None], _Conn] = {}
        self._gate = AcceptGate(self.limits.max_connections, on_refused=_refused)
        self._busy: set[asyncio.Task[None]] = set()  # connections inside a handler
        self._closing = False
        # The bad requests' log lines: a source's first, then a summary a minute.
        self.bad_requests = SampledLog(clock=clock)

    async def bind(self, address: str, port: int) -> int:
        """Take ``address:port`` (OSError if another program holds it), not listening yet
        (``start``); returns the port bound (``port`` unless it was 0). ``stop`` gives it up.
        The bootstrap service binds before it does anything costly (review s44rev2 M1)."""
        if self._server is not None:
            raise RuntimeError("already bound")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Accepted(self._accepted), address, port, reuse_address=True, start_serving=False
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def start(self, address: str, port: int, context: ssl.SSLContext) -> int:
        """Listen (on the address and port ``bind`` took, if it was called); returns the port
        bound (``port`` unless it was 0).

        The server is plain TCP and each connection starts TLS itself (``loop.start_tls``), so
        the limits count it from the accept and ``stop`` can end it while it is still in its
        handshake (``start_server(ssl=...)`` shows a connection only once its handshake is
        done, and closing that server leaves the handshakes running)."""
        self._context = context
        if self._server is None:
            await self.bind(address, port)
        assert self._server is not None
        await self._server.start_serving()
        return self.port

    async def stop(self) -> None:
        """Stop listening; requests being answered get ``shutdown_timeout`` to finish, idle
        connections are closed at once."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True  # a connection answering now closes after its answer
        server.close()
        for task in set(self._connections) - self._busy:
            task.cancel()  # idle, or still in its handshake
        if self._busy:
            await asyncio.wait(set(self._busy), timeout=self.shutdown_timeout)
        for task in set(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=1.0)
        for state in self._connections.values():
            state.transport.abort()  # (a task that has not ended yet)
        self._connections.clear()
        self._gate.clear()
        await server.wait_closed()

    # --- one connection ---------------------------------------------------------------------

    def _accepted(self, transport: asyncio.Transport) -> None:
        """A TCP connection was accepted: take it (and start its TLS) or close it at once
        (counted by source as the project's guards count: ``tlsroll.accept_gate``)."""
        taken = self._gate.admit(
            transport, closing=self._closing or self._server is None, evict=self._evict
        )
        if taken is None:
            return
        loop = asyncio.get_running_loop()
        state = _Conn(transport, taken.source, _Counting(asyncio.StreamReader(loop=loop), loop))
        task = loop.create_task(self._connection(state, taken.remote))
        self._connections[task] = state
        # Its place is given back when the task is done, whether its coroutine ever ran or
        # not: a task cancelled before its first step (evicted in the accept batch that took
        # it: asyncio accepts a whole backlog in one step) never runs its ``finally`` (review
        # s38 H1: such places were lost for good, and the listener refused everyone).
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        """A connection's task is done: its descriptor goes, then its place (once only; none
        after ``stop``, which cleared the count)."""
        self._busy.discard(task)
        state = self._connections.pop(task, None)
        if state is None:
            return
        state.transport.abort()
        self._gate.release(state.source)
        if not task.cancelled():
            task.exception()  # (retrieved: ``_connection`` catches its own)

    def _evict(self, source: str) -> bool:
        """End the oldest of ``source``'s connections still in its handshake or idle between
        requests with nothing buffered, if it has one: never one reading a request, inside a
        handler, sending an answer or closing (review s38 L1)."""
        for task, state in self._connections.items():
            if state.source != source or task in self._busy or not state.evictable():
                continue
            state.transport.abort()
            task.cancel()
            return True
        return False

    async def _connection(self, state: _Conn, remote: str) -> None:
        assert self._context is not None
        loop = asyncio.get_running_loop()
        transport, protocol = state.transport, state.protocol
        reader = protocol.reader
        writer: asyncio.StreamWriter | None = None
        try:
            tls = await loop.start_tls(
                transport,
                protocol,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self.limits.handshake_timeout,
                ssl_shutdown_timeout=self.limits.write_timeout,
            )
            if tls is None:
                return
            assert isinstance(tls, asyncio.Transport)
            # start_tls never tells the protocol (call_connection_made=False): without the TLS
            # transport the reader cannot pause it (a client pushing data while a handler waits
            # was buffered without bound), and it would end each clean close with asyncio's
            # "returning true from eof_received() has no effect when using ssl" (audit s38 L3).
            protocol.connection_made(tls)
            writer = asyncio.StreamWriter(tls, protocol, reader, loop)
            if self._closing:
                return  # stopped during the handshake: the old routes answer nothing more
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
            state.tls, state.parser, state.stage = tls, conn, "serving"
            await self._serve(conn, state, writer, remote)
        except (OSError, ssl.SSLError, h11.LocalProtocolError, TimeoutError):
            pass  # the client went away or misbehaved: nothing to answer
        except asyncio.CancelledError:
            pass  # ``stop``: this task is the connection's own and ends here
        except Exception as exc:  # a bug here must not end in asyncio's log with a traceback
            log.error(
                "https.connection_failed",
                remote=remote,
                error=type(exc).__name__,
                hint="that connection ended; a bug in tlsroll: report it with the lines before "
                "this one",
            )
        finally:
            state.stage = "closing"  # (its place is given back by ``_forget``)
            await self._close(transport, writer)

    async def _close(
        self, transport: asyncio.Transport, writer: asyncio.StreamWriter | None
    ) -> None:
        """Close a connection; it keeps its place in the count until its descriptor is gone
        (a client that never answers TLS's close_notify holds it until ``write_timeout``)."""
        try:
            if writer is not None:
                writer.close()  # flushes an answer still being sent, then close_notify
                with contextlib.suppress(Exception):  # a reset or a timeout: aborted below
                    async with asyncio.timeout(self.limits.write_timeout):
                        await writer.wait_closed()
        finally:
            transport.abort()  # never got through its handshake, or will not close cleanly

    async def _serve(
        self,
        conn: h11.Connection,
        state: _Conn,
        writer: asyncio.StreamWriter,
        remote: str,
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self.limits.request_timeout):
                    request = await self._read(conn, state, writer, remote)
            except TimeoutError:
                return  # too slow, or idle between requests: close
            except h11.RemoteProtocolError as exc:  # 431 past max_head, else 400
                status = exc.error_status_hint
                if self.bad_requests.first(source_key(remote), f"malformed_request_{status}"):
                    log.info("https.malformed_request", remote=remote, status=status)
                self._bad_requests_summary()
                await self._reply(
                    conn, writer, "GET", _error(exc.error_status_hint, "malformed request")
                )
                return
            except _TooLarge:
                if self.bad_requests.first(source_key(remote), "body_too_large"):
                    log.info("https.body_too_large", remote=remote, limit=self.limits.max_body)
                self._bad_requests_summary()
                await self._reply(
                    conn, writer, "POST", _error(413, "request body too large", "too_large")
                )
                return
            if request is None:
                return
            task = asyncio.current_task()
            assert task is not None
            self._busy.add(task)  # a stop lets it finish its answer (up to shutdown_timeout)
            failed = False
            try:
                try:
                    reply = await self._dispatch(request)
                    body = _encode(reply)
                except Exception as exc:  # a handler's bug: answer 500, not silence
                    log.error(
                        "https.handler_failed",
                        remote=remote,
                        method=request.method,
                        path=request.path,
                        error=type(exc).__name__,
                        hint="the request got a 500; a bug in tlsroll: report it with the lines "
                        "before this one",
                    )
                    reply, failed = (
                        _error(500, "internal error; see the agent's log", "internal"),
                        True,
                    )
                    body = _encode(reply)
                await self._reply(conn, writer, request.method, reply, body)
            finally:
                self._busy.discard(task)
            if self._closing or failed:
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    def _bad_requests_summary(self) -> None:
        if (summary := self.bad_requests.summary()) is not None:
            log.info("https.bad_requests_summary", **summary.fields())

    async def _read(
        self,
        conn: h11.Connection,
        state: _Conn,
        writer: asyncio.StreamWriter,
        remote: str,
    ) -> Request | None:
        """The next whole request; None when the client closed the connection."""
        head = await self._event(conn, state)
        if not isinstance(head, h11.Request):
            return None
        # h11 bounds a head that is still incomplete; one that arrived whole is measured here.
        size = len(head.target) + sum(len(k) + len(v) + 4 for k, v in head.headers)
        if size > self.limits.max_head:
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        length = _content_length(head.headers)
        if length is not None and length > self.limits.max_body:
            raise _TooLarge
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        body = bytearray()
        while True:
            event = await self._event(conn, state)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body:
                    raise _TooLarge
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return None  # closed mid-body
        target = head.target.decode("ascii", "replace")
        return Request(
            method=head.method.decode("ascii", "replace"),
            path=target.split("?", 1)[0],
            remote=remote,
            body=bytes(body),
        )

    @staticmethod
    async def _event(conn: h11.Connection, state: _Conn) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await state.protocol.reader.read(READ_CHUNK)
            state.consumed += len(data)
            conn.receive_data(data)

    async def _dispatch(self, request: Request) -> Reply:
        handler = self.routes.get((request.method, request.path))
        if handler is not None:
            return await handler(request)
        allowed = sorted(m for m, p in self.routes if p == request.path)
        if allowed:
            reply = _error(405, f"{request.method} is not allowed here")
            return Reply(reply.data, 405, {"Allow": ", ".join(allowed)})
        return _error(404, "nothing at this path")

    async def _reply(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        method: str,
        reply: Reply,
        body: bytes | None = None,
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if body is None:
            body = _encode(reply)
        headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Cache-Control", "no-store"),
            *((k, v) for k, v in reply.headers.items() if k.lower() != "cache-control"),
        ]
        if conn.their_state is not h11.DONE:
            headers.append(("Connection", "close"))  # the rest of the request stays unread
        out = conn.send(
            h11.Response(
                status_code=reply.status,
                headers=headers,
                reason=http.HTTPStatus(reply.status).phrase.encode(),
            )
        )
        if method != "HEAD":
            out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
        out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
        writer.write(out)
        async with asyncio.timeout(self.limits.write_timeout):
            await writer.drain()


class _Counting(asyncio.StreamReaderProtocol):
    """The stream's protocol, counting the bytes TLS has delivered (what the reader holds is
    ``received`` less what ``_event`` has taken)."""

    def __init__(self, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(reader, loop=loop)
        self.reader = reader
        self.received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        super().data_received(data)


@dataclass(eq=False)
class _Conn:
    """One connection from its accept on: what ``_evict`` needs to know of it."""

    transport: asyncio.Transport  # the TCP one
    source: str
    protocol: _Counting
    stage: str = "handshake"  # then "serving", then "closing"
    tls: asyncio.Transport | None = None
    parser: h11.Connection | None = None
    consumed: int = 0  # bytes taken from the reader

    def evictable(self) -> bool:
        """In its handshake, or between requests with nothing of the next one received and
        nothing of the last answer left to send."""
        if self.transport.is_closing():
            return False  # (ending already)
        if self.stage == "handshake":
            return self.protocol.received == 0  # (not a request TLS has read already)
        if self.stage != "serving" or self.parser is None or self.tls is None:
            return False
        conn = self.parser
        return (
            conn.our_state is h11.IDLE
            and conn.their_state is h11.IDLE
            and not conn.trailing_data[0]
            and self.protocol.received == self.consumed
            and self.tls.get_write_buffer_size() == 0
            and self.transport.get_write_buffer_size() == 0
        )


def _encode(reply: Reply) -> bytes:
    return json.dumps(dict(reply.data), separators=(",", ":")).encode()


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def _error(status: int, message: str, code: str | None = None) -> Reply:
    """A refusal in the service's shape: ``error`` (a code; by default the status's phrase,
    such as ``not_found``) and a one-line ``message``."""
    error = code or http.HTTPStatus(status).phrase.lower().replace(" ", "_")
    return Reply({"error": error, "message": message}, status)


def _refused(remote: str, limit: str, refused: int) -> None:
    log.warning(
        "https.too_many_connections",
        remote=remote,
        limit=limit,
        refused=refused,
        detail="the agent's bootstrap port refused connections over its limit: many PCs at once,"
        " or a flood from that address",
    )
