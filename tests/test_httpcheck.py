"""The outside checks against real tiny servers on loopback: a reply and then a close, no reply."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tests.conftest import IssuedCert
from tlsroll import httpcheck, pki, probe, tls

APP = "/praxis_live/"
OK_10 = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSE_NO_LENGTH = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok"
GARBAGE = b"this is not http\r\n\r\n"
NOTHING = b""


@contextmanager
def tiny_server(address: str, answer: bytes, ctx: ssl.SSLContext | None = None) -> Iterator[int]:
    """Accept connections on ``address`` (TLS with ``ctx``), read what the client sends first,
    send ``answer`` and close; yield the port."""
    listener = socket.create_server((address, 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                raw.settimeout(5)
                conn = ctx.wrap_socket(raw, server_side=True) if ctx is not None else raw
                conn.recv(65536)  # the request (or a TLS hello), whatever it is
                if answer:
                    conn.sendall(answer)
                conn.close()
            except OSError:
                pass
            finally:
                raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def _tls(cert: IssuedCert) -> ssl.SSLContext:
    return tls.server_context(cert.cert_file, cert.key_file)


def test_https_reply_then_close_is_a_view_with_the_certificate(
    loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    address = loopback()
    cert = issue_cert(address)
    ca_pem = cert.ca_file.read_bytes()
    fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
    for answer in (OK_10, OK_CLOSE, OK_CLOSE_NO_LENGTH):
        with tiny_server(address, answer, _tls(cert)) as port:
            view = httpcheck.fetch_https(address, port, APP, ca_pem)
            assert view.status == 200
            assert pki.fingerprint(view.certificate) == fingerprint == view.fingerprint
            assert view.tls_version in ("TLSv1.2", "TLSv1.3")
            assert httpcheck.check_https(address, port, APP, ca_pem, fingerprint) is None


def test_https_failures_are_what_is_wrong_never_an_exception(
    loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    address = loopback()
    cert = issue_cert(address)
    ca_pem = cert.ca_file.read_bytes()
    fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
    for answer in (NOTHING, GARBAGE):
        with tiny_server(address, answer, _tls(cert)) as port:
            problem = httpcheck.check_https(address, port, APP, ca_pem, fingerprint)
            assert problem is not None and problem.startswith(f"https://{address}:{port}")
    with tiny_server(address, OK_CLOSE) as port:  # plain http where https should be
        problem = httpcheck.check_https(address, port, APP, ca_pem, fingerprint)
        assert problem is not None and problem.startswith(f"https://{address}:{port}")
    other = pki.CertificateAuthority.create("another CA")
    with tiny_server(address, OK_CLOSE, _tls(cert)) as port:  # a CA we do not trust
        assert httpcheck.check_https(address, port, APP, other.cert_pem, None) is not None
        problem = httpcheck.check_https(address, port, APP, ca_pem, "sha256:" + "0" * 64)
        assert problem is not None and "not the staged certificate" in problem
    with tiny_server(address, OK_CLOSE) as port:
        pass
    assert httpcheck.check_https(address, port, APP, ca_pem, None) is not None  # closed port
    assert httpcheck.check_https("not an address", 1, APP, ca_pem, None) is not None
    assert httpcheck.check_https(address, 70000, APP, ca_pem, None) is not None


def test_http_probes_answer_a_string_or_false(loopback: Callable[[], str]) -> None:
    address = loopback()
    with tiny_server(address, OK_10) as port:
        assert httpcheck.check_http(address, port, APP) is None
        assert httpcheck.port_open(address, port)
    with tiny_server(address, OK_CLOSE) as port:
        assert httpcheck.check_http(address, port, APP) is None
    for answer in (NOTHING, GARBAGE):
        with tiny_server(address, answer) as port:
            problem = httpcheck.check_http(address, port, APP)
            assert problem is not None and problem.startswith(f"http://{address}:{port}")
    assert not httpcheck.port_open(address, port)
    assert httpcheck.check_http(address, port, APP) is not None
    assert not httpcheck.port_open(address, 70000)
    assert httpcheck.check_http(address, 70000, APP) is not None
    assert not httpcheck.port_open("not an address", 1)


def test_the_leaders_outside_check_passes_servers_that_close_after_replying(
    loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    """``leader.changes.outside_check`` (the confirm step) against a server that closes after
    its reply: https live with the staged certificate and http closed is confirmed; the other
    way round too. It used to raise (and the leader retried confirm for ten minutes)."""
    from leader.changes import outside_check

    address = loopback()
    cert = issue_cert(address)
    ca_pem = cert.ca_file.read_bytes()
    fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
    # A port nobody listens on, kept bound so that no server below is given it (a freed port
    # went to the next server once): a bound socket that does not listen refuses connections.
    closed = socket.socket()
    closed.bind((address, 0))
    closed_port = closed.getsockname()[1]
    with closed:
        for answer in (OK_10, OK_CLOSE, OK_CLOSE_NO_LENGTH):
            with tiny_server(address, answer, _tls(cert)) as port:
                live = f"https://{address}:{port}{APP}"
                gone = f"http://{address}:{closed_port}{APP}"
                assert outside_check(live, gone, ca_pem, fingerprint) is None
            with tiny_server(address, answer) as port:
                live = f"http://{address}:{port}{APP}"
                gone = f"https://{address}:{closed_port}{APP}"
                assert outside_check(live, gone, ca_pem) is None


# --- tlsroll.probe: the same checks on the event loop (the agent's verify) ---------------------


async def test_the_async_https_probe_passes_what_the_blocking_one_passes(
    loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    address = loopback()
    cert = issue_cert(address)
    ca_pem = cert.ca_file.read_bytes()
    fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
    for answer in (OK_10, OK_CLOSE, OK_CLOSE_NO_LENGTH):
        with tiny_server(address, answer, _tls(cert)) as port:
            assert await probe.check_https(address, port, APP, ca_pem, fingerprint) is None
            assert await probe.check_https(address, port, APP, ca_pem, None) is None
    not_found = b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    with tiny_server(address, not_found, _tls(cert)) as port:
        problem = await probe.check_https(address, port, APP, ca_pem, fingerprint)
        assert problem == f"https://{address}:{port}{APP} answered 404"


async def test_the_async_https_probe_says_what_is_wrong_never_raises(
    loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    address = loopback()
    cert = issue_cert(address)
    ca_pem = cert.ca_file.read_bytes()
    fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
    for answer in (NOTHING, GARBAGE):
        with tiny_server(address, answer, _tls(cert)) as port:
            problem = await probe.check_https(address, port, APP, ca_pem, fingerprint)
            assert problem is not None and problem.startswith(f"https://{address}:{port}")
    with tiny_server(address, OK_CLOSE) as port:  # plain http where https should be
        problem = await probe.check_https(address, port, APP, ca_pem, fingerprint, timeout=2)
        assert problem is not None and problem.startswith(f"https://{address}:{port}")
    other = pki.CertificateAuthority.create("another CA")
    with tiny_server(address, OK_CLOSE, _tls(cert)) as port:  # a CA we do not trust
        assert await probe.check_https(address, port, APP, other.cert_pem, None) is not None
        problem = await probe.check_https(address, port, APP, ca_pem, "sha256:" + "0" * 64)
        assert problem is not None and "not the staged certificate" in problem
    other_address = loopback()  # a certificate for another address
    with tiny_server(other_address, OK_CLOSE, _tls(cert)) as port:
        assert await probe.check_https(other_address, port, APP, ca_pem, None) is not None
    with tiny_server(address, OK_CLOSE) as port:
        pass
    assert await probe.check_https(address, port, APP, ca_pem, None) is not None  # closed
    assert await probe.check_https("not an address", 1, APP, ca_pem, None) is not None
    assert await probe.check_https(address, 70000, APP, ca_pem, None) is not None


async def test_the_async_http_probes_answer_a_string_or_false(
    loopback: Callable[[], str],
) -> None:
    address = loopback()
    with tiny_server(address, OK_10) as port:
        assert await probe.check_http(address, port, APP) is None
        assert await probe.port_open(address, port)
    with tiny_server(address, OK_CLOSE_NO_LENGTH) as port:
        assert await probe.check_http(address, port, APP) is None
    for answer in (NOTHING, GARBAGE):
        with tiny_server(address, answer) as port:
            problem = await probe.check_http(address, port, APP)
            assert problem is not None and problem.startswith(f"http://{address}:{port}")
    assert not await probe.port_open(address, port)
    assert await probe.check_http(address, port, APP) is not None
    assert not await probe.port_open(address, 70000)
    assert await probe.check_http(address, 70000, APP) is not None
    assert not await probe.port_open("not an address", 1)


async def test_the_async_probes_say_who_they_are() -> None:
    """The probe's User-Agent, as the blocking probes send it: a managed server does not count
    tlsroll's own probes as clients still on http."""
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(OK_CLOSE)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert await probe.check_http("127.0.0.1", port, APP) is None
    (request,) = seen
    assert request.startswith(f"GET {APP} HTTP/1.1\r\n".encode())
    agent = httpcheck.PROBE_HEADERS["User-Agent"]
    assert f"\r\nuser-agent: {agent}\r\n".lower() in request.decode().lower()
