"""The outside checks against real tiny servers on loopback: a reply and then a close, no reply."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tests.conftest import IssuedCert
from tlsroll import httpcheck, pki, tls

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
    with tiny_server(address, OK_10) as closed_port:
        pass  # a port nobody listens on any more
    for answer in (OK_10, OK_CLOSE, OK_CLOSE_NO_LENGTH):
        with tiny_server(address, answer, _tls(cert)) as port:
            live = f"https://{address}:{port}{APP}"
            gone = f"http://{address}:{closed_port}{APP}"
            assert outside_check(live, gone, ca_pem, fingerprint) is None
        with tiny_server(address, answer) as port:
            live = f"http://{address}:{port}{APP}"
            gone = f"https://{address}:{closed_port}{APP}"
            assert outside_check(live, gone, ca_pem) is None
