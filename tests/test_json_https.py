"""The bootstrap service's https listener (``nodeagent.json_https``) against raw TLS clients:
framing and routing, and the limits a listener open to a practice network needs (body and head
sizes, a request that arrives a byte at a time, idle kept-alive connections, how many at once,
a stop while an answer is being made). The limits are made small so each case ends in well
under a second; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import structlog

from nodeagent.json_https import HttpLimits, JsonHttpsListener, Reply, Request
from tests.conftest import IssuedCert
from tlsroll import pki
from tlsroll.backoff import source_key
from tlsroll.tls import client_context, server_context

SMALL = HttpLimits(
    max_body=1000, max_head=600, request_timeout=0.5, handshake_timeout=2, max_connections=3
)
BOUND = 10.0  # no step of a test waits longer than this


async def echo(request: Request) -> Reply:
    return Reply({"path": request.path, "method": request.method, "size": len(request.body)})


@asynccontextmanager
async def listening(
    cert: IssuedCert, address: str, limits: HttpLimits = SMALL
) -> AsyncIterator[JsonHttpsListener]:
    listener = JsonHttpsListener({("GET", "/hello"): echo, ("POST", "/post"): echo}, limits)
    await listener.start(address, 0, server_context(cert.cert_file, cert.key_file))
    try:
        yield listener
    finally:
        await listener.stop()


async def connect(
    listener: JsonHttpsListener, address: str, ca: pki.CertificateAuthority, source: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    local = (source, 0) if source else None
    context = client_context(ca.cert_pem)
    return await asyncio.wait_for(
        asyncio.open_connection(address, listener.port, ssl=context, local_addr=local), BOUND
    )


async def answer(
    reader: asyncio.StreamReader, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    length = int(headers.get("content-length", "0"))
    if head_only:
        return status, headers, b""
    body = await asyncio.wait_for(reader.readexactly(length), BOUND) if length else b""
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed the connection (EOF, or a reset)."""
    try:
        return await asyncio.wait_for(reader.read(), BOUND) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def request(method: str, path: str, body: bytes = b"", *extra: str) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: node", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.fixture
def served(
    issue_cert: Callable[..., IssuedCert], loopback: Callable[[], str]
) -> tuple[IssuedCert, str]:
    address = loopback()
    return issue_cert(address), address


async def test_answers_json_keeps_alive_and_routes(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority
) -> None:
    cert, address = served
    async with listening(cert, address) as listener:
        reader, writer = await connect(listener, address, test_ca)
        writer.write(request("GET", "/hello?x=1"))
        status, headers, body = await answer(reader)
        assert status == 200 and json.loads(body) == {"path": "/hello", "method": "GET", "size": 0}
        assert headers["content-type"].startswith("application/json")
        assert headers["cache-control"] == "no-store" and "server" not in headers
        writer.write(request("POST", "/post", b"x" * 1000))  # the same connection, at the limit
        status, _, body = await answer(reader)
        assert status == 200 and json.loads(body)["size"] == 1000
        writer.write(request("HEAD", "/hello"))
        status, headers, _ = await answer(reader, head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0  # and no body follows:
        writer.write(request("POST", "/hello"))
        status, headers, body = await answer(reader)
        assert status == 405 and headers["allow"] == "GET, HEAD"
        writer.write(request("GET", "/nothing"))
        status, _, body = await answer(reader)
        assert status == 404 and json.loads(body)["error"] == "not_found"
        writer.close()


async def test_a_body_over_the_limit_is_413_and_never_read(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority
) -> None:
    cert, address = served
    async with listening(cert, address) as listener:
        # Announced too large: refused before a byte of the body is sent.
        reader, writer = await connect(listener, address, test_ca)
        writer.write(b"POST /post HTTP/1.1\r\nHost: node\r\nContent-Length: 1001\r\n\r\n")
        status, headers, body = await answer(reader)
        assert (status, json.loads(body)["error"]) == (413, "too_large")
        assert headers["connection"] == "close" and await closed(reader)
        # Chunked, so no length is announced: refused once it passes the limit.
        reader, writer = await connect(listener, address, test_ca)
        writer.write(b"POST /post HTTP/1.1\r\nHost: node\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (1200, b"y" * 1200))
        status, _, _ = await answer(reader)
        assert status == 413 and await closed(reader)


async def test_headers_over_the_limit_and_garbage_are_refused(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority
) -> None:
    cert, address = served
    async with listening(cert, address) as listener:
        reader, writer = await connect(listener, address, test_ca)
        writer.write(request("GET", "/hello", b"", "X-Pad: " + "a" * 1000))
        status, _, _ = await answer(reader)
        assert status == 431 and await closed(reader)
        reader, writer = await connect(listener, address, test_ca)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, _ = await answer(reader)
        assert status == 400 and await closed(reader)


async def test_a_request_sent_a_byte_at_a_time_and_an_idle_connection_are_cut_off(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority
) -> None:
    """Slowloris: a client keeps a connection by sending its request slower than
    ``request_timeout`` (0.5 s here) allows for the whole of it."""
    cert, address = served
    async with listening(cert, address) as listener:
        reader, writer = await connect(listener, address, test_ca)
        gone = False
        for byte in request("GET", "/hello"):
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except (ConnectionError, ssl.SSLError):
                gone = True
                break
            if reader.at_eof():
                gone = True
                break
            await asyncio.sleep(0.1)
        assert gone or await closed(reader)  # never answered: cut off
        idle_reader, _ = await connect(listener, address, test_ca)
        assert await closed(idle_reader)  # connected, said nothing: closed too


async def test_connections_over_the_limit_are_closed_and_the_others_still_served(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority, loopback: Callable[[], str]
) -> None:
    cert, address = served
    limits = HttpLimits(request_timeout=5, max_connections=3)
    async with listening(cert, address, limits) as listener:
        # From three sources: one source alone gets only a share of the places (2 of 3).
        held = [await connect(listener, address, test_ca, loopback()) for _ in range(3)]
        await asyncio.sleep(0.2)  # the server has taken the three
        extra_reader, extra_writer = await raw(listener, address, loopback())
        assert await closed(extra_reader)
        extra_writer.close()
        reader, writer = held[0]
        writer.write(request("GET", "/hello"))
        assert (await answer(reader))[0] == 200


async def test_a_stop_lets_the_answer_being_made_finish_and_closes_idle_connections(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority
) -> None:
    cert, address = served
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> Reply:
        entered.set()
        await asyncio.wait_for(release.wait(), BOUND)
        return Reply({"done": True})

    limits = HttpLimits(request_timeout=5)
    async with listening(cert, address, limits) as listener:
        listener.routes[("GET", "/slow")] = slow
        idle_reader, _ = await connect(listener, address, test_ca)
        reader, writer = await connect(listener, address, test_ca)
        writer.write(request("GET", "/slow"))
        await asyncio.wait_for(entered.wait(), BOUND)
        stopping = asyncio.create_task(listener.stop())
        assert await closed(idle_reader)
        release.set()
        status, _, body = await answer(reader)
        assert status == 200 and json.loads(body) == {"done": True}
        assert await closed(reader)
        await asyncio.wait_for(stopping, BOUND)


async def raw(
    listener: JsonHttpsListener, address: str, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection from ``source`` that has sent nothing (no ClientHello yet)."""
    return await asyncio.wait_for(
        asyncio.open_connection(address, listener.port, local_addr=(source, 0)), BOUND
    )


async def test_a_connection_still_in_its_handshake_at_a_stop_is_never_served(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority, loopback: Callable[[], str]
) -> None:
    """A stopped listener's routes belong to the old service (the old password's verifier):
    a connection accepted before the stop that completes TLS after it gets no answer."""
    cert, address = served
    listener = JsonHttpsListener({("GET", "/hello"): echo}, HttpLimits(handshake_timeout=30))
    await listener.start(address, 0, server_context(cert.cert_file, cert.key_file))
    reader, writer = await raw(listener, address, loopback())
    await asyncio.sleep(0.2)  # accepted by the server (if not yet, the stop resets it: no answer)
    await asyncio.wait_for(listener.stop(), BOUND)
    try:
        await asyncio.wait_for(
            writer.start_tls(client_context(test_ca.cert_pem), server_hostname=address), BOUND
        )
        writer.write(request("GET", "/hello"))
        assert await closed(reader)
    except (ConnectionError, ssl.SSLError):
        pass  # cut off during the handshake: also no answer
    writer.close()


async def test_connections_are_capped_before_tls_and_per_source(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority, loopback: Callable[[], str]
) -> None:
    """Connections that never send a ClientHello count against ``max_connections`` (4 here)
    from the accept on, one source gets a share of them (2 of 4), and a workstation at
    another address is still served while one host floods."""
    cert, address = served
    limits = HttpLimits(handshake_timeout=60, request_timeout=30, max_connections=4)
    async with listening(cert, address, limits) as listener:
        flooder = loopback()
        flood = [await raw(listener, address, flooder) for _ in range(50)]
        waits = {asyncio.ensure_future(closed(r)) for r, _ in flood}
        done: set[asyncio.Future[bool]] = set()
        async with asyncio.timeout(BOUND):  # well before handshake_timeout: closed at accept
            while len(done) < 48:
                finished, waits = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                done |= finished
        assert len(waits) == 2 and all(f.result() for f in done)  # its share stays open
        reader, writer = await connect(listener, address, test_ca)  # another source (.0.1)
        writer.write(request("GET", "/hello"))
        assert (await answer(reader))[0] == 200
        writer.close()
        # The whole cap: two more sources take the two places left; a fourth takes the place
        # of one of the flooder's, which holds the most and is still in its handshake.
        spare = [loopback() for _ in range(2)]
        others = [await raw(listener, address, s) for s in spare]
        held = {source_key(flooder): 2, **{source_key(s): 1 for s in spare}}
        await asyncio.wait_for(_until(lambda: dict(listener._gate.sources) == held), BOUND)
        extra = await raw(listener, address, loopback())
        async with asyncio.timeout(BOUND):
            finished, waits = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        assert len(waits) == 1 and all(f.result() for f in finished)
        await asyncio.sleep(0.2)
        assert not extra[0].at_eof()
        # Now every source holds one: a fifth is refused.
        fifth = await raw(listener, address, loopback())
        assert await closed(fifth[0])
        fifth[1].close()
        for task in waits:
            task.cancel()
        for _, w in [*flood, *others, extra]:
            w.close()


async def test_a_handler_that_fails_gets_a_500_and_one_log_line_without_a_traceback(
    served: tuple[IssuedCert, str],
    test_ca: pki.CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, address = served

    async def broken(request: Request) -> Reply:
        raise RuntimeError("a bug in the handler")

    async with listening(cert, address) as listener:
        listener.routes[("POST", "/broken")] = broken
        with structlog.testing.capture_logs() as events:
            reader, writer = await connect(listener, address, test_ca)
            writer.write(request("POST", "/broken", b'{"password": "hunter2"}'))
            status, _, body = await answer(reader)
            assert await closed(reader)
        assert status == 500 and json.loads(body)["error"] == "internal"
        failed = [e for e in events if e["event"] == "https.handler_failed"]
        assert len(failed) == 1 and "exc_info" not in failed[0] and "exception" not in failed[0]
        assert "hunter2" not in repr(events)
        writer.close()
    gc.collect()  # a task whose exception was never retrieved is reported when collected
    assert not [r for r in caplog.records if r.exc_info or "never retrieved" in r.getMessage()]


def answered_and_held(
    address: str, port: int, source: str, ca: pki.CertificateAuthority
) -> socket.socket:
    """A blocking client that reads its answer, then neither closes nor answers the server's
    TLS close_notify: its connection stays open on the server until a timeout ends it."""
    sock = socket.create_connection((address, port), timeout=BOUND, source_address=(source, 0))
    tls = client_context(ca.cert_pem).wrap_socket(sock, server_hostname=address)
    tls.sendall(request("GET", "/hello", b"", "Connection: close"))  # the server closes
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(4096)
    return tls


async def test_a_connection_still_closing_keeps_its_place(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority, loopback: Callable[[], str]
) -> None:
    """An answered connection whose client never completes the TLS close still holds a
    descriptor on the server, so it still counts (until ``write_timeout``)."""
    cert, address = served
    limits = HttpLimits(handshake_timeout=60, write_timeout=30, max_connections=4)
    async with listening(cert, address, limits) as listener:
        source = loopback()
        held = [
            await asyncio.to_thread(answered_and_held, address, listener.port, source, test_ca)
            for _ in range(2)
        ]
        await asyncio.sleep(0.2)  # the server has answered both and sent its close_notify
        extra = await raw(listener, address, source)
        assert await closed(extra[0])  # the source's share (2 of 4) is still taken
        extra[1].close()
        for tls in held:
            tls.close()


async def test_one_ipv6_slash_64_is_one_source(served: tuple[IssuedCert, str]) -> None:
    """From the second review: the share per source counted exact addresses, while the
    project's guards count an IPv6 /64 as one source (``tlsroll.backoff.source_key``): one host
    with four addresses of its /64 could take every place. A connection from another address
    of a /64 whose share is taken is refused at accept. (Loopback has one IPv6 address, so the
    accept is fed a transport that only names its peer; a refused one is aborted, nothing
    else is asked of it.)"""

    class Accepted:
        def __init__(self, ip: str) -> None:
            self.ip, self.aborted = ip, False

        def get_extra_info(self, name: str, default: object = None) -> object:
            return (self.ip, 40000, 0, 0) if name == "peername" else default

        def abort(self) -> None:
            self.aborted = True

    cert, address = served
    limits = HttpLimits(max_connections=8)  # a share of 2 per source
    async with listening(cert, address, limits) as listener:
        listener._gate.sources[source_key("fd00:1:2:3::1")] = 2  # its /64 holds its share
        other = Accepted("fd00:1:2:3::99")
        listener._accepted(other)  # type: ignore[arg-type]
        taken = [t for t in listener._connections if not t.done()]
        for task in taken:  # the old code took it: let its task end before the listener stops
            task.cancel()
        assert other.aborted and not taken
        listener._gate.sources.clear()


async def test_a_clean_close_logs_nothing_and_a_pushing_client_is_held_back(
    served: tuple[IssuedCert, str],
    test_ca: pki.CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Audit s38 L3: start_tls never gave the stream's protocol the TLS transport, so every
    clean close (close_notify, as curl sends it) logged asyncio's "returning true from
    eof_received() has no effect when using ssl", and the reader could not pause the
    transport: a client pushing data while a handler waited was buffered without bound."""
    cert, address = served
    release = asyncio.Event()

    async def waits(request: Request) -> Reply:
        await asyncio.wait_for(release.wait(), BOUND)
        return Reply({"size": len(request.body)})

    listener = JsonHttpsListener({("GET", "/hello"): echo, ("POST", "/wait"): waits}, SMALL)
    await listener.start(address, 0, server_context(cert.cert_file, cert.key_file))
    try:
        reader, writer = await connect(listener, address, test_ca)
        writer.write(request("GET", "/hello"))
        status, _, _ = await answer(reader)
        assert status == 200
        writer.close()  # close_notify, then the end
        await asyncio.wait_for(writer.wait_closed(), BOUND)
        await asyncio.wait_for(_until(lambda: not listener._connections), BOUND)
        assert not [r for r in caplog.records if "eof_received" in r.getMessage()]

        # A request whose handler waits, then data pushed behind it (pipelined junk).
        reader, writer = await connect(listener, address, test_ca)
        writer.write(request("POST", "/wait", b"x"))
        await writer.drain()
        ((task, state),) = listener._connections.items()
        tcp = state.transport
        await asyncio.wait_for(_until(lambda: task in listener._busy), BOUND)
        chunk, pushed, blocked = b"j" * (256 << 10), 0, False
        while pushed < 64 << 20 and not blocked:  # the old code took it all in
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                blocked = True
            pushed += len(chunk)
        assert blocked and not tcp.is_reading(), pushed  # the server stopped reading
        writer.transport.abort()  # (what it pushed is no request: it would get a 431)
    finally:
        release.set()
        await listener.stop()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.02)


async def test_one_host_with_several_addresses_cannot_lock_a_workstation_out(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority, loopback: Callable[[], str]
) -> None:
    """Audit s38 L5: four addresses of one host, each at its share, took every place (the
    docstring said a single host could not), and a workstation was refused. Now it takes the
    place of a connection still in its handshake of the source that holds the most."""
    cert, address = served
    limits = HttpLimits(handshake_timeout=60, request_timeout=30, max_connections=8)
    async with listening(cert, address, limits) as listener:
        host = [loopback() for _ in range(4)]
        flood = [await raw(listener, address, a) for a in host for _ in range(2)]
        await asyncio.wait_for(_until(lambda: listener._gate.total == 8), BOUND)  # taken all
        reader, writer = await connect(listener, address, test_ca, loopback())
        writer.write(request("GET", "/hello"))
        assert (await answer(reader))[0] == 200
        writer.close()
        waits = {asyncio.ensure_future(closed(r)) for r, _ in flood}
        finished, waits = await asyncio.wait(
            waits, timeout=BOUND, return_when=asyncio.FIRST_COMPLETED
        )
        assert len(finished) == 1 and all(f.result() for f in finished)  # one made way
        for task in waits:
            task.cancel()
        for _, w in flood:
            w.close()


def _blocking_connect(address: str, port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(BOUND)
    sock.bind((source, 0))
    sock.connect((address, port))  # the kernel completes it: the loop has not run yet
    return sock


async def test_a_connection_evicted_in_the_accept_batch_that_took_it_gives_its_place_back(
    served: tuple[IssuedCert, str], loopback: Callable[[], str]
) -> None:
    """Review s38 H1: asyncio accepts a whole backlog in one step, so a newcomer could evict a
    connection whose task had not started yet; cancelled before its first step, its cleanup
    never ran and its place was lost for good (4 places, A A B B C D, all closed: the count
    stayed at 2, and then a third of three fresh clients was refused)."""
    cert, address = served
    limits = HttpLimits(handshake_timeout=30, max_connections=4)
    async with listening(cert, address, limits) as listener:
        a, b = loopback(), loopback()
        sources = [a, a, b, b, loopback(), loopback()]
        socks = [_blocking_connect(address, listener.port, s) for s in sources]
        # All six are in the backlog before the loop runs: one accept batch takes them.
        await asyncio.wait_for(_until(lambda: listener._gate.total >= 4), BOUND)
        for sock in socks:
            sock.close()
        await asyncio.wait_for(_until(lambda: not listener._connections), BOUND)
        assert listener._gate.total == 0 and not listener._gate.sources
        fresh = [await raw(listener, address, s) for s in (loopback(), loopback(), loopback())]
        await asyncio.wait_for(_until(lambda: listener._gate.total == 3), BOUND)
        assert not any(r.at_eof() for r, _ in fresh)
        for _, w in fresh:
            w.close()


async def test_a_connection_reading_a_request_is_never_evicted(
    served: tuple[IssuedCert, str], test_ca: pki.CertificateAuthority, loopback: Callable[[], str]
) -> None:
    """Review s38 L1: eviction took any connection outside a handler, one whose request body
    was half read too. Now only one in its handshake or idle with nothing buffered makes way:
    with the source that holds the most reading requests, a newcomer is refused."""
    cert, address = served
    limits = HttpLimits(handshake_timeout=60, request_timeout=30, max_connections=4)
    async with listening(cert, address, limits) as listener:
        host = loopback()
        body = b"x" * 100
        posting = [await connect(listener, address, test_ca, host) for _ in range(2)]
        for _, writer in posting:
            writer.write(request("POST", "/post", body)[:-90])  # the head and 10 bytes
            await writer.drain()

        def reading() -> bool:  # the server has both heads and part of their bodies
            held = [s for s in listener._connections.values() if s.source == source_key(host)]
            return len(held) == 2 and not any(s.evictable() for s in held)

        await asyncio.wait_for(_until(reading), BOUND)
        spare = [loopback() for _ in range(2)]
        others = [await raw(listener, address, s) for s in spare]
        held = {source_key(host): 2, **{source_key(s): 1 for s in spare}}
        await asyncio.wait_for(_until(lambda: dict(listener._gate.sources) == held), BOUND)
        newcomer = await raw(listener, address, loopback())
        assert await closed(newcomer[0])  # refused: nothing of the host's may go
        newcomer[1].close()
        for reader, writer in posting:
            writer.write(body[-90:])
            status, _, got = await answer(reader)
            assert (status, json.loads(got)["size"]) == (200, 100)
            writer.close()
        for _, w in others:
            w.close()
