"""Looking at a server from outside, as a workstation would: is a port open, what does https
serve (trusting only a given CA), does the app answer. Used by the agent's on-node verify and
by the leader's confirm step. Blocking; call through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass

from cryptography import x509

from tlsroll import pki, tls


def port_open(address: str, port: int, timeout: float = 2.0) -> bool:
    """True if something accepts TCP connections on ``address:port``."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class HttpsView:
    certificate: x509.Certificate
    status: int
    tls_version: str


def fetch_https(
    address: str, port: int, path: str, ca_pem: bytes, timeout: float = 5.0
) -> HttpsView:
    """GET ``path`` over https trusting only ``ca_pem``; the server's certificate and status."""
    ctx = tls.client_context(ca_pem)
    conn = http.client.HTTPSConnection(address, port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return HttpsView(x509.load_der_x509_certificate(der), resp.status, sock.version() or "")
    finally:
        conn.close()


def fetch_http(address: str, port: int, path: str, timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def check_https(
    address: str, port: int, path: str, ca_pem: bytes, fingerprint: str | None
) -> str | None:
    """None if https on ``address:port`` serves ``path`` with exactly the expected
    certificate, else what is wrong."""
    try:
        view = fetch_https(address, port, path, ca_pem)
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return f"https://{address}:{port}{path}: {exc}"
    if fingerprint and pki.fingerprint(view.certificate) != fingerprint:
        return (
            f"https://{address}:{port} presents {pki.fingerprint(view.certificate)}, "
            f"not the staged certificate {fingerprint}"
        )
    if view.status != 200:
        return f"https://{address}:{port}{path} answered {view.status}"
    return None


def check_http(address: str, port: int, path: str) -> str | None:
    try:
        status = fetch_http(address, port, path)
    except (OSError, http.client.HTTPException) as exc:
        return f"http://{address}:{port}{path}: {exc}"
    return None if status == 200 else f"http://{address}:{port}{path} answered {status}"
