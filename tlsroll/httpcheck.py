"""Looking at a server from outside, as a workstation would: is a port open, what does https
serve (trusting only a given CA), does the app answer. Blocking; call through
``asyncio.to_thread`` from async code.

The agent's verify and the leader's confirm judge a server with ``tlsroll.probe`` on the
event loop, which takes from here the TLS context (``trusting``), the probe's headers and the
wording of a failure (``reason``); the agent's drivers use ``port_open``, the demo
``fetch_https``. The tests hold the probe to http.client's own judgement of an answer, built
on ``fetch_https``/``fetch_http`` (tests/http_judge.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlsroll import __version__, tls
from tlsroll.clients import PROBE_AGENT
from tlsroll.errors import raise_if_local

# tlsroll's own probes say so: a managed server must not count them as clients still on http.
if TYPE_CHECKING:
    from cryptography import x509

PROBE_HEADERS = {"User-Agent": f"{PROBE_AGENT}/{__version__}"}
# The query that marks a probe's request line, for access logs without the User-Agent (the
# common log format): ``tlsroll.clients.is_probe_request``.
PROBE_QUERY = f"{PROBE_AGENT}={__version__}"


def probe_target(path: str) -> str:
    """``path`` with ``PROBE_QUERY`` added: what a probe asks for where an access log in the
    common log format, which has no User-Agent, must tell it from a client's request. The
    path routes the request as before (a server routes on the path, not the query)."""
    return f"{path}{'&' if '?' in path else '?'}{PROBE_QUERY}"


# Everything a probe can meet on the way: the network and TLS (OSError, which ssl.SSLError and
# timeouts are), a broken or missing HTTP reply, an address or port that cannot be used
# (ValueError, OverflowError).
PROBE_ERRORS = (OSError, http.client.HTTPException, ValueError, OverflowError)


def port_open(address: str, port: int, timeout: float = 2.0) -> bool:
    """True if something accepts TCP connections on ``address:port``; False on any failure of
    the port's (``LocalResourceError`` if this machine ran out of descriptors)."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except PROBE_ERRORS as exc:
        raise_if_local(exc, f"checking {address}:{port}")
        return False


@functools.lru_cache(maxsize=8)
def trusting(ca_pem: bytes) -> ssl.SSLContext:
    """The client context that trusts only ``ca_pem``, made once per CA: making one costs about
    a millisecond of CPU (OpenSSL's defaults, the cipher list, parsing the CA), which the
    leader paid for every node it confirmed and the agent for every verify. A context is
    never changed once made, so probes in several threads share it. It notes nothing of the
    handshake: ``noting`` is the one that does, for a probe that failed."""
    return tls.client_context(ca_pem)


@functools.lru_cache(maxsize=8)
def noting(ca_pem: bytes) -> ssl.SSLContext:
    """``trusting``'s context that also notes on each connection whether the server asked for
    a client certificate (``asked_for_a_certificate``): a probe presents none, and a server
    that wants one ends the connection after the handshake without an answer (with TLS 1.3),
    which said only "not an HTTP answer (RemoteDisconnected)" (review s66 logs L2). OpenSSL's
    message callback is the one way ssl tells a client of the server's CertificateRequest;
    where this Python has none, only the alert certificate_required says it (``probe``).

    Only for a probe that ended so (``probe``: it asks again with this context): the callback
    runs Python for every TLS message and record of a connection, 35 of them in a check that
    passes, about a tenth of a millisecond of CPU (7 % of the check) in the leader's confirm
    of every node and the agent's verify inside every freeze window (issue 15, session 71)."""
    ctx = tls.client_context(ca_pem)
    with contextlib.suppress(AttributeError, TypeError):  # (a private hook of ssl's)
        setattr(ctx, "_msg_callback", _note_certificate_request)  # noqa: B010 - not in typeshed
    return ctx


ASKED = "_tlsroll_asked_for_a_certificate"
"""The attribute ``_note_certificate_request`` sets on a connection's SSLObject or SSLSocket."""
_HANDSHAKE = 22  # TLS content type
_CERTIFICATE_REQUEST = 13  # TLS handshake message type


def _note_certificate_request(
    conn: object, direction: str, _version: object, kind: int, message: int, _data: bytes
) -> None:
    """ssl's message callback: mark the connection a CertificateRequest came on. Called for each
    TLS message in the handshake and each record after it; it never raises (an exception here
    would fail the connection)."""
    if direction == "read" and kind == _HANDSHAKE and message == _CERTIFICATE_REQUEST:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(conn, ASKED, True)


def asked_for_a_certificate(conn: object) -> bool:
    """Whether the server asked for a client certificate in the handshake of ``conn`` (the
    SSLObject of an asyncio stream, an SSLSocket) made with a ``noting`` context."""
    return getattr(conn, ASKED, False) is True


@dataclass(frozen=True)
class HttpsView:
    """What https served: the certificate (DER), the status and the TLS version. The agent's
    verify compares fingerprints only, without parsing X.509 (the agent does not load
    ``cryptography`` for it, issue 15); ``certificate`` parses it for who needs more."""

    der: bytes
    status: int
    tls_version: str

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the DER certificate, as ``pki.fingerprint``."""
        return "sha256:" + hashlib.sha256(self.der).hexdigest()

    @property
    def certificate(self) -> x509.Certificate:
        from cryptography import x509  # noqa: PLC0415 - see the docstring

        return x509.load_der_x509_certificate(self.der)


class HTTPSConnection(http.client.HTTPSConnection):
    """``http.client``'s, connecting through ``tls.connect``: a connection its peer resets
    before the handshake leaves no socket open (see there). No proxy tunnel."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        context: ssl.SSLContext,
        source_address: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(
            host, port, timeout=timeout, context=context, source_address=source_address
        )
        self._tls_context = context
        self._source = source_address

    def connect(self) -> None:
        sock = tls.connect(
            self._tls_context,
            self.host,
            self.port,
            timeout=self.timeout,
            server_hostname=self.host,
            source_address=self._source,
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as http.client does
        self.sock = sock


def fetch_https(
    address: str, port: int, path: str, ca_pem: bytes, timeout: float = 5.0
) -> HttpsView:
    """GET ``path`` over https trusting only ``ca_pem``; the server's certificate and status.

    The certificate and TLS version are taken right after the handshake, before the request: a
    server may close the connection after its reply (HTTP/1.0, ``Connection: close``), which
    leaves the connection without a socket. Raises one of ``PROBE_ERRORS``."""
    ctx = trusting(ca_pem)
    conn = HTTPSConnection(address, port, timeout=timeout, context=ctx)
    try:
        conn.connect()
        sock = conn.sock
        if not isinstance(sock, ssl.SSLSocket):
            raise ssl.SSLError("no TLS connection after the handshake")
        der = sock.getpeercert(binary_form=True)
        if der is None:
            raise ssl.SSLError("the server presented no certificate")
        version = sock.version() or ""
        conn.request("GET", path, headers=PROBE_HEADERS)
        resp = conn.getresponse()
        resp.read()
        return HttpsView(der, resp.status, version)
    finally:
        conn.close()


def fetch_http(address: str, port: int, path: str, timeout: float = 5.0) -> int:
    """GET ``path`` over plain http; the status. Raises one of ``PROBE_ERRORS``."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=PROBE_HEADERS)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


REASON_MAX = 200  # characters in a failure's reason, the URL included


def describe(exc: BaseException) -> str:
    """One line for a probe's failure, with none of the server's bytes: http.client's errors
    for a status line it cannot read carry the whole line (up to 64 KiB, a header's content
    with it); they are named, not quoted. The exception's name when it carries no text."""
    if isinstance(exc, (http.client.BadStatusLine, http.client.UnknownProtocol)):
        return f"not an HTTP answer ({type(exc).__name__})"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def reason(url: str, exc: BaseException) -> str:
    """``url: what is wrong``, what is wrong cut so that the whole is at most ``REASON_MAX``
    characters (the URL, the checker's own, is never cut: it says what was checked). It goes
    into the journal, the logs, the leader's store and the viewer."""
    detail = describe(exc)
    room = max(REASON_MAX - len(url) - 2, 40)
    if len(detail) > room:
        detail = detail[: room - 3] + "..."
    return f"{url}: {detail}"
