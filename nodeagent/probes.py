"""Looking at the node from the agent: who holds a port, is it open, what does https serve.

All blocking; call through ``asyncio.to_thread`` from async code. Probes only read: they never
change the node.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tlsroll import pki, tls


def _proc_addr(hexaddr: str) -> tuple[str, int]:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1])), int(port, 16)
    # /proc/net/tcp6: four little-endian 32-bit words
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words)), int(port, 16)


def listeners(port: int) -> dict[str, set[int]]:
    """Listening sockets on ``port``: local address → socket inodes (from /proc/net/tcp*)."""
    found: dict[str, set[int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A":  # 0A = LISTEN
                continue
            address, p = _proc_addr(cols[1])
            if p == port:
                found.setdefault(address, set()).add(int(cols[9]))
    return found


def holder(address: str, port: int) -> str | None:
    """Who listens on ``address:port`` (or on the wildcard): "name (pid N)", or None.

    Needs to read other processes' fds to name them (the agent runs as root or as the
    server's user); otherwise it says "another process".
    """
    wildcard = {"0.0.0.0", "::"}  # noqa: S104 - compared, not bound
    inodes = set()
    for local, nodes in listeners(port).items():
        if local == address or local in wildcard:
            inodes |= nodes
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in targets:
                    comm = (proc / "comm").read_text().strip()
                    cmdline = (
                        (proc / "cmdline")
                        .read_bytes()
                        .replace(b"\0", b" ")
                        .decode("utf-8", "replace")
                    )
                    return f"{comm} (pid {proc.name}: {cmdline.strip()[:120]})"
        except OSError:
            continue
    return "another process"


def port_free(address: str, port: int) -> bool:
    """True if nothing could stop us binding ``address:port`` (probed by binding, then closing)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


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
