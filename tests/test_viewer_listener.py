"""The viewer's accept gate (``leader.viewer.listener``) without a leader, on real loopback
sockets and real TLS, with handlers that stand for aiohttp's: a place is given back whatever
the handler does (review s38 M1), and a connection that sends no whole first head is closed by
the listener itself, whatever aiohttp's timers do (review s38 M2). Every wait is bounded."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from leader.viewer.listener import GatedListener, Limits, _Handed
from tests.conftest import IssuedCert
from tlsroll import pki
from tlsroll.tls import client_context, server_context

BOUND = 10.0  # no step of a test waits longer than this


class Silent(asyncio.Protocol):
    """A handler that never closes anything (an aiohttp whose keepalive timer does not run
    before the first request)."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.02)


@asynccontextmanager
async def gated(
    address: str, factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext, limits: Limits
) -> AsyncIterator[tuple[GatedListener, int]]:
    sock = socket.socket()
    sock.bind((address, 0))
    sock.listen()
    port = int(sock.getsockname()[1])
    listener = GatedListener(factory, context, limits)
    await listener.start(sock)
    try:
        yield listener, port
    finally:
        await listener.stop()
        await listener.abort_all()


async def _ended(reader: asyncio.StreamReader) -> bytes:
    """What came before the server closed the connection (EOF or a reset)."""
    got = b""
    async with asyncio.timeout(BOUND):
        while True:
            try:
                data = await reader.read(4096)
            except (ConnectionError, ssl.SSLError):
                return got
            if not data:
                return got
            got += data


async def test_a_handler_factory_that_raises_gives_the_place_back(
    loopback: Callable[[], str],
) -> None:
    """Review s38 M1: the factory was called before the ``try``: when it raised, the TCP
    transport stayed open and the place was never given back (4 places: after four clients
    the count stayed at 4 and every later one was refused), with asyncio's "Task exception
    was never retrieved"."""

    def factory() -> asyncio.Protocol:
        raise TypeError("an aiohttp that takes other arguments")

    address = loopback()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    async with gated(address, factory, context, Limits(max_connections=4)) as (listener, port):
        for _ in range(6):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address, port, local_addr=(loopback(), 0)), BOUND
            )
            assert await _ended(reader) == b""  # closed at once, nothing said
            writer.close()
            await asyncio.wait_for(_until(lambda: not listener._connections), BOUND)
            assert listener.gate.total == 0 and not listener.gate.sources


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: viewer\r\n", b"\r\n\r\n"])
async def test_a_connection_without_a_whole_first_head_is_closed_by_the_listener(
    sent: bytes,
    issue_cert: Callable[..., IssuedCert],
    test_ca: pki.CertificateAuthority,
    loopback: Callable[[], str],
) -> None:
    """Review s38 M2: the deadline for the first head was aiohttp's keepalive timer, which
    only recent aiohttp starts as a connection is made: with a handler that closes nothing,
    a connection that sent nothing (or part of a head, or empty lines) was held for ever."""
    address = loopback()
    cert = issue_cert(address)
    handlers: list[Silent] = []

    def factory() -> asyncio.Protocol:
        handlers.append(Silent())
        return handlers[-1]

    context = server_context(cert.cert_file, cert.key_file)
    limits = Limits(head_timeout=0.3, close_timeout=1.0)
    async with gated(address, factory, context, limits) as (listener, port):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                address, port, ssl=client_context(test_ca.cert_pem), server_hostname=address
            ),
            BOUND,
        )
        writer.write(sent)
        await writer.drain()
        assert await _ended(reader) == b""
        writer.close()
        await asyncio.wait_for(_until(lambda: not listener._connections), BOUND)
        assert listener.gate.total == 0 and handlers[0].lost


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


async def test_the_listener_s_deadline_runs_until_the_first_head_is_whole() -> None:
    """``_Handed`` arms the first head's deadline at the hand-over unless the head came whole
    with the handshake; empty lines before the request line do not stop it, a head in pieces
    (CRLF or bare LF) does, and so does the connection's end. The handler gets every byte."""
    head = b"GET / HTTP/1.1\r\nHost: viewer\r\n\r\n"
    loop = asyncio.get_running_loop()
    limits = Limits(head_timeout=60)

    def handed() -> tuple[_Handed, Silent, FakeTransport]:
        inner, tls = Silent(), FakeTransport()
        return _Handed(inner, loop.create_future(), FakeTransport(), limits), inner, tls

    early, inner, tls = handed()
    early.data_received(head)  # with the handshake, before the hand-over
    early.connection_made(tls)
    assert early._no_head is None and inner.received == head

    for parts in ([b"\r\n\r\n", head[:-3], head[-3:]], [b"GET / HTTP/1.0\n", b"\n"]):
        pieces, inner, tls = handed()
        pieces.connection_made(tls)
        assert pieces._no_head is not None
        for part in parts[:-1]:
            pieces.data_received(part)
            assert pieces._no_head is not None
        pieces.data_received(parts[-1])
        assert pieces._no_head is None and inner.received == b"".join(parts)

    lost, inner, tls = handed()
    lost.connection_made(tls)
    timer = lost._no_head
    lost.connection_lost(None)
    assert timer is not None and timer.cancelled() and lost._no_head is None and inner.lost
    assert not tls.closed
