"""TLS settings shared by every tlsroll listener and client: versions, ciphers, contexts.

TLS 1.2 and 1.3 only, with Mozilla's "intermediate" cipher list for TLS 1.2 (TLS 1.3 suites
are all acceptable and not configurable through ``ssl``).
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

# Mozilla server-side TLS guidelines, "intermediate" configuration (TLS 1.2 part).
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


# Given to ssl with every key file: a key encrypted with a pass phrase is refused at once
# (ssl.SSLError), where OpenSSL's default asked for it on the process's terminal and a run
# waited there for ever (review s48rev2 L1); tlsroll never writes an encrypted key file.
NO_PASS_PHRASE = b""


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(
    cert_file: Path,
    key_file: Path,
    client_ca_file: Path | None = None,
    *,
    require_client: bool = False,
) -> ssl.SSLContext:
    """A server context; with ``client_ca_file`` it asks for (or requires) a client certificate."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(cert_file, key_file, password=NO_PASS_PHRASE)
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=str(client_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca_pem: bytes | None = None,
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> ssl.SSLContext:
    """A client context trusting only ``ca_pem`` (no system roots), with an optional client cert."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca_pem is not None:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(cert_file, key_file, password=NO_PASS_PHRASE)
    return ctx


def unverified_client_context() -> ssl.SSLContext:
    """A context that accepts any server certificate; only for fetching a chain to check by pin."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(
    context: ssl.SSLContext,
    host: str,
    port: int,
    *,
    timeout: float | None,
    server_hostname: str | None = None,
    source_address: tuple[str, int] | None = None,
    handshake: bool = True,
    within: float | None = None,
) -> ssl.SSLSocket:
    """A TLS client socket connected to ``host:port`` (its handshake done unless ``handshake``
    is false: then the caller's ``do_handshake()``); closed on every failure, so the caller
    owns a socket only once it is returned.

    The socket is wrapped before its TCP connect, not after as ``socket.create_connection`` +
    ``wrap_socket`` (and ``http.client.HTTPSConnection``) do: wrapping a connected socket whose
    peer reset it in between (a server restarting) raises with the new ``SSLSocket`` unclosed
    in Python before 3.11.8 / 3.12.2 (CPython gh-113280): its descriptor stays open until the
    garbage collector finds it. As ``create_connection``, each address of ``host`` is tried
    in turn; a TLS failure is not retried on the next.

    ``timeout`` bounds the TCP connect, and then the handshake, each on its own (``ssl``'s
    handshake timeout is for all of it, since Python 3.5, however slowly bytes come), so with
    every address tried a call can take a multiple of it. ``within`` (seconds) bounds them
    all together (``TimeoutError`` once it is up; the returned socket keeps ``timeout``): for
    a caller whose own time is bounded (review s72 L: the agent's plan handshakes, on a
    Switch's path)."""
    deadline = None if within is None else time.monotonic() + within

    def left() -> float | None:
        """``timeout``, or what is left of ``within`` if that is less."""
        if deadline is None:
            return timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no TLS connection to {host}:{port} within {within} s")
        return remaining if timeout is None else min(timeout, remaining)

    last: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        raw = socket.socket(family, kind, proto)
        try:
            raw.settimeout(left())
            if source_address is not None:
                raw.bind(source_address)
            sock = context.wrap_socket(
                raw, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        except BaseException:
            raw.close()
            raise
        try:
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        try:
            if handshake and deadline is not None:
                sock.settimeout(left())
                sock.do_handshake()
                sock.settimeout(timeout)
            elif handshake:
                sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        return sock
    raise last if last is not None else OSError(f"no address for {host}")
