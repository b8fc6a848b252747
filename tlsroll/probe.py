"""The agent's verify and the leader's confirm look at a node's server from outside on their
event loop: is a port open, does plain http serve the app, does https serve it with exactly
the staged certificate.

``tlsroll.httpcheck``'s checks, with its answers (None, or one line of what is wrong) and its
probe's ``User-Agent``, made with asyncio's streams instead of blocking sockets in worker
threads: the verify runs inside every switch's freeze window, and its three checks each took a
hand-off to a worker thread and back, the threads and the event loop passing the GIL between
them all through the TLS handshake (issue 15). The leader's confirm uses these too (one
hand-off to a worker thread fewer per node), so the two judge a server with one code.

An answer is judged as ``http.client`` (``httpcheck``) judges it, so that the agent's verify
and the leader's confirm never disagree about one server (review of session 27: h11 refused
header lines ``http.client`` and browsers take, such as ``Content-Length : 2``): the answer's
head is read from the stream up to its blank line (bounded) and handed to ``http.client``'s
own parser; its body is read as that parser says (a length, chunks, or to the connection's
end), at most ``ANSWER_MAX`` bytes of body; a chunked answer's framing around it (the size
lines, their extensions and CRLFs, the trailer) at most ``FRAMING_MAX`` bytes besides.

A check gives up after ``timeout`` seconds for the connect (with the TLS handshake), and again
after ``timeout`` seconds for the whole answer (the request, the head and the body together):
unlike ``http.client``'s socket timeout, which bounds each read, a slow but progressing answer
that takes longer fails.

A failure's reason never carries more than a short excerpt of what the server sent
(``tlsroll.httpcheck.reason``): it goes into the
journal, the logs, the leader's store and the viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.client
import io
import re
import socket
import ssl
import time
import weakref
from collections.abc import Callable
from typing import cast

from tlsroll import tls
from tlsroll.errors import TerminalError, raise_if_local
from tlsroll.httpcheck import PROBE_HEADERS, asked_for_a_certificate, noting, reason, trusting

ANSWER_MAX = 1 << 20  # bytes: a probe reads at most this much of an answer's body
HEAD_MAX = 1 << 20  # bytes: and of its head (its status lines and headers, 100 Continue's too)
# bytes: and of a chunked answer's framing (its size lines with their extensions, the chunks'
# CRLFs, the trailer), counted apart from the body, so that a body of ANSWER_MAX bytes passes
# in chunks as with a Content-Length (review rvb L1)
FRAMING_MAX = 1 << 20
LINE_MAX = 65536  # bytes in one line of the head, as http.client's _MAXLINE
HEADERS_MAX = 100  # header lines in one head, as http.client's _MAXHEADERS
# "100 Continue" heads before the answer's own: a server sends one, if any; http.client skips
# any number of them, but each is one parse here (review s66 H1).
INTERIM_MAX = 1000
CLOSE_WAIT = 1.0  # seconds a probe waits for its connection's close (a TLS close_notify)
# What http.client refuses in a request's target (its _contains_disallowed_url_pchar_re).
_NOT_IN_PATH = re.compile("[\x00-\x20\x7f]")


class _Answer(TerminalError):
    """An answer a probe cannot read as HTTP (or a TLS connection without a certificate)."""


# Everything a probe can meet on the way: the network and TLS (OSError, which ssl.SSLError and
# timeouts are), an answer it cannot read (``_Answer``, http.client's HTTPException, EOFError:
# an answer shorter than it said), an address, port or path that cannot be used (ValueError,
# which UnicodeError is, OverflowError).
PROBE_ERRORS = (OSError, _Answer, http.client.HTTPException, ValueError, OverflowError, EOFError)


def _host(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close the connection; if its close (a TLS close_notify) takes longer than
    ``CLOSE_WAIT``, abort it: the transport is not left in asyncio's TLS shutdown, holding its
    socket, for ``ssl_shutdown_timeout`` (30 s)."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_WAIT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except (OSError, ValueError):
        pass


async def port_open(address: str, port: int, timeout: float = 2.0) -> bool:
    """True if something accepts TCP connections on ``address:port``; False on any failure of
    the port's (``LocalResourceError`` if this machine ran out of descriptors)."""
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(address, port)
    except PROBE_ERRORS as exc:
        raise_if_local(exc, f"checking {address}:{port}")
        return False
    await _close(writer)
    return True


class _Head:
    """An answer's head, read already, as the socket ``http.client.HTTPResponse`` reads from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.data))


async def _line(reader: asyncio.StreamReader) -> bytes:
    """One line of the answer (b"" at its end); a line longer than the stream's limit (64 KiB,
    more than ``LINE_MAX``) is an answer http.client would refuse too."""
    try:
        return await reader.readline()
    except ValueError:
        raise _Answer(f"got more than {LINE_MAX} bytes in a line of the answer") from None


async def _block(reader: asyncio.StreamReader, head: bytearray, before: int) -> bool:
    """Read one head (a status line and its header lines, up to the blank line) onto
    ``head``, after ``before`` bytes of heads already read; False if the answer ended (or grew
    past what http.client reads) first."""
    for _ in range(HEADERS_MAX + 2):  # the status line, the headers, the one too many
        line = await _line(reader)
        head += line
        if before + len(head) > HEAD_MAX:
            raise _Answer(f"an answer's head of more than {HEAD_MAX} bytes")
        if not line:
            return False
        if line in (b"\r\n", b"\n") and len(head) > len(line):
            return True
    return False


async def _response(reader: asyncio.StreamReader) -> http.client.HTTPResponse:
    """The answer's status line and headers, parsed by ``http.client`` itself (its rules for
    the status line, the headers, ``100 Continue``, the body's length and its chunks).

    A ``100 Continue`` head, once parsed, is dropped: each head is handed to the parser alone,
    as http.client reads them one after the other. Handing it the heads so far again at each
    one (as before) was quadratic, on the event loop, where no timeout can end it: 5000 of
    them held the agent's verify, inside the freeze window, for 15 s (review s66 H1). All of
    them together are still at most ``HEAD_MAX`` bytes, and at most ``INTERIM_MAX`` heads."""
    head = bytearray()
    before = 0  # bytes of the 100 Continue heads parsed and dropped
    for _ in range(INTERIM_MAX + 1):
        ended = await _block(reader, head, before)
        response = http.client.HTTPResponse(cast(socket.socket, _Head(bytes(head))), method="GET")
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            if ended:  # a 100 Continue's head, parsed and skipped: its answer is to come
                before += len(head)
                head.clear()
                continue
            raise
        return response
    raise _Answer(f"more than {INTERIM_MAX} heads of 100 Continue before the answer")


async def _body(reader: asyncio.StreamReader, response: http.client.HTTPResponse) -> None:
    """Read the answer's body as ``http.client``'s ``read`` does (a short body fails with
    ``EOFError``), at most ``ANSWER_MAX`` bytes of it. A chunked answer's framing (the size
    lines with their extensions, the chunks' CRLFs, the trailer's lines) is bounded too, by
    ``FRAMING_MAX`` (an endless trailer, or chunks of one byte with 60 KiB of extensions each,
    was read until the timeout: 800 MiB in 5 s; review s66 L1), but apart from the body: counted
    with it, a body of exactly ``ANSWER_MAX`` bytes was refused in chunks and passed with a
    ``Content-Length`` (review rvb L1)."""
    size = 0  # bytes of the body
    framing = 0  # bytes of a chunked answer's framing

    def count(n: int) -> None:
        nonlocal size
        size += n
        if size > ANSWER_MAX:
            raise _Answer(f"an answer's body of more than {ANSWER_MAX} bytes")

    def frame(n: int) -> None:
        nonlocal framing
        framing += n
        if framing > FRAMING_MAX:
            raise _Answer(f"a chunked answer's framing of more than {FRAMING_MAX} bytes")

    if response.chunked:
        while True:
            line = await _line(reader)
            if len(line) > LINE_MAX:
                raise http.client.LineTooLong("chunk size")
            frame(len(line))
            try:
                left = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise http.client.IncompleteRead(b"") from None
            if left == 0:
                break
            count(left)
            await reader.readexactly(left)
            frame(2)
            await reader.readexactly(2)  # the chunk's CRLF (http.client does not check it)
        while True:  # the trailer, up to its blank line
            line = await _line(reader)
            if len(line) > LINE_MAX:
                raise http.client.LineTooLong("trailer line")
            frame(len(line))
            if line in (b"\r\n", b"\n", b""):
                return
    elif response.length is not None:
        count(response.length)
        await reader.readexactly(response.length)
    else:
        while data := await reader.read(1 << 16):
            count(len(data))


def _request(host: str, path: str) -> bytes:
    """The request ``http.client`` would send (its checks of the path, its ``Host``), and
    ``Connection: close``."""
    path = path or "/"
    if _NOT_IN_PATH.search(path):
        raise _Answer("the path holds a character a request cannot carry")
    headers = [("Host", host), ("Accept-Encoding", "identity"), *PROBE_HEADERS.items()]
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str, timeout: float
) -> int:
    """GET ``path`` on an open connection; the answer's status once the whole answer is in,
    within ``timeout`` seconds for all of it."""
    request = _request(host, path)
    async with asyncio.timeout(timeout):
        writer.write(request)
        response = await _response(reader)
        await _body(reader, response)
    return response.status


async def _check(
    url: str,
    address: str,
    port: int,
    path: str,
    timeout: float,
    context: ssl.SSLContext | None = None,
    look: Callable[[asyncio.StreamWriter], str | None] | None = None,
    ca_pem: bytes | None = None,
) -> str | None:
    """Connect (with TLS under ``context``, the address checked against the certificate),
    ``look`` at the connection before the request (what is wrong, or None), then GET ``path``:
    None if it answers 200, else what is wrong (``LocalResourceError`` if the checking side
    ran short). ``ca_pem``: the CA ``context`` trusts, to ask again whether the server wants
    a client certificate if the connection ends after its handshake with no answer."""
    tls: object = None  # the connection's SSLObject, once its handshake is done
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=address if context else None
            )
        try:
            tls = writer.get_extra_info("ssl_object")
            problem = look(writer) if look is not None else None
            if problem is not None:
                return problem
            status = await _get(reader, writer, _host(address, port), path, timeout)
        finally:
            await _close(writer)
    except PROBE_ERRORS as exc:
        raise_if_local(exc, f"checking {url}")
        if (
            tls is not None
            and ca_pem is not None
            and (why := await _wants_a_certificate(address, port, ca_pem, exc, timeout))
        ):
            return reason(url, _Answer(why))
        return reason(url, exc)
    return None if status == 200 else f"{url} answered {status}"


CERTIFICATE_REQUIRED = "TLSV13_ALERT_CERTIFICATE_REQUIRED"  # OpenSSL's reason for the alert
_ENDED = (http.client.RemoteDisconnected, ConnectionError, ssl.SSLError)


ASK_SECONDS = 2.0  # at most, for the handshake that asks whether a certificate is wanted


async def _wants_a_certificate(
    address: str, port: int, ca_pem: bytes, exc: BaseException, timeout: float
) -> str | None:
    """What to say of a connection that ended with no answer (``exc``) after its handshake, if
    the server wants a client certificate, which a probe has none of: it sent TLS 1.3's alert
    certificate_required, or it asks for one in a handshake made again to see
    (``_asks_for_a_certificate``). The workstation tool says the same of such a port; it said
    "not an HTTP answer (RemoteDisconnected)" (review s66 logs L2). None otherwise."""
    if not isinstance(exc, _ENDED):
        return None
    alert = isinstance(exc, ssl.SSLError) and exc.reason == CERTIFICATE_REQUIRED
    if not (alert or await _asks_for_a_certificate(address, port, ca_pem, timeout)):
        return None
    how = getattr(exc, "reason", None) or type(exc).__name__
    return (
        "no answer without a client certificate: a port that wants client certificates, "
        f"which this check cannot present ({how})"
    )


async def _asks_for_a_certificate(address: str, port: int, ca_pem: bytes, timeout: float) -> bool:
    """Whether the server on ``address:port`` asks for a client certificate in a TLS handshake
    (``httpcheck.noting``: its message callback sees the CertificateRequest), within
    ``ASK_SECONDS`` at most; False if the handshake fails. Asked only once a probe ended with
    no answer after its handshake: a probe that passes, as nearly all do, runs no Python for
    each TLS message (issue 15, session 71)."""
    try:
        async with asyncio.timeout(min(timeout, ASK_SECONDS)):
            _reader, writer = await asyncio.open_connection(
                address, port, ssl=noting(ca_pem), server_hostname=address
            )
    except PROBE_ERRORS:
        return False
    try:
        return asked_for_a_certificate(writer.get_extra_info("ssl_object"))
    finally:
        await _close(writer)


async def check_http(address: str, port: int, path: str, timeout: float = 5.0) -> str | None:
    """None if plain http on ``address:port`` serves ``path`` with 200, else what is wrong
    (``LocalResourceError`` if the checking side ran short)."""
    return await _check(f"http://{address}:{port}{path}", address, port, path, timeout)


async def check_https(
    address: str,
    port: int,
    path: str,
    ca_pem: bytes,
    fingerprint: str | None,
    timeout: float = 5.0,
) -> str | None:
    """None if https on ``address:port`` serves ``path`` with exactly the expected certificate
    (trusting only ``ca_pem``, the address checked against the certificate), else what is wrong
    (``LocalResourceError`` if the checking side ran short). The certificate is taken right
    after the handshake, before the request (a server may close after its answer)."""
    url = f"https://{address}:{port}{path}"
    look = _presents(address, port, fingerprint)
    return await _check(url, address, port, path, timeout, trusting(ca_pem), look, ca_pem=ca_pem)


async def check_pinned(
    address: str, port: int, path: str, fingerprint: str, timeout: float = 5.0
) -> str | None:
    """None if https on ``address:port`` serves ``path`` with the certificate ``fingerprint``
    (``sha256:<hex>`` of its DER; or one of several, comma-separated: a certificate on disk
    the server has not loaded yet, and the one it serves), whoever issued it, else what is
    wrong (as ``check_https``).
    For a certificate tlsroll did not install, whose issuer it does not know: the restore
    check of a change or way back whose source serves one (``Plan.source_fingerprint``). The
    handshake still proves that the server holds the certificate's key."""
    if not fingerprint:
        raise ValueError("check_pinned needs a fingerprint")
    url = f"https://{address}:{port}{path}"
    look = _presents(address, port, fingerprint, "the certificate it served before")
    return await _check(url, address, port, path, timeout, _pinning(), look)


def prepare_https(ca_pem: bytes, address: str) -> None:
    """Blocking: ``check_https``'s context for ``ca_pem`` made now (``trusting``: made once
    per CA, so the check takes this very context) and its first handshake's client side run
    once in memory, to its ClientHello (no connection): the agent's staging does it before
    the freeze (``nodeagent.transaction.Runner.stage_target``). The first check of an agent
    paid for OpenSSL's first handshake (its algorithms fetched, the key share made: about
    1.1 ms) inside the switch's freeze window (issue 15, session 72), and made the context
    there (the CA parsed, OpenSSL's defaults: 1.6 ms more) if the Stage had not
    (``NodeAgentService._store_cert`` makes it: the agent restarted since). A CA that cannot
    be read raises as ``trusting`` does (``ssl.SSLError``, ``ValueError``): the verify then
    says what is wrong, naming the CA file (``Runner._problems``)."""
    context = trusting(ca_pem)
    if context in _begun:
        return
    hello = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=address)
    with contextlib.suppress(ssl.SSLWantReadError):  # (the server's answer never comes)
        hello.do_handshake()
    _begun.add(context)


_begun: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()  # contexts ``prepare_https`` ran


@functools.cache
def _pinning() -> ssl.SSLContext:
    """``check_pinned``'s context, made once: any certificate, checked by its pin alone."""
    return tls.unverified_client_context()


def _presents(
    address: str, port: int, fingerprint: str | None, expected: str = "the staged certificate"
) -> Callable[[asyncio.StreamWriter], str | None]:
    """A probe's look at its connection: what is wrong if the server presents no certificate,
    or (``fingerprint`` given) another one than ``fingerprint`` (``expected`` says which; any
    of several, comma-separated: ``check_pinned``)."""
    pins = fingerprint.split(",") if fingerprint else []
    begun = time.monotonic()  # (before the connection: ``presented``)

    def certificate(writer: asyncio.StreamWriter) -> str | None:
        tls_object = writer.get_extra_info("ssl_object")
        der = tls_object.getpeercert(binary_form=True) if tls_object is not None else None
        if der is None:
            raise _Answer("the server presented no certificate")
        _seen.pop((address, port), None)
        _seen[(address, port)] = (begun, der)
        while len(_seen) > SEEN_KEPT:
            del _seen[next(iter(_seen))]
        served = "sha256:" + hashlib.sha256(der).hexdigest()
        if pins and served not in pins:
            said = " or ".join(pins)
            return f"https://{address}:{port} presents {served}, not {expected} {said}"
        return None

    return certificate


SEEN_KEPT = 16
_seen: dict[tuple[str, int], tuple[float, bytes]] = {}  # ``presented``'s, the latest last


def presented(address: str, port: int) -> tuple[float, bytes] | None:
    """What the latest https check of this process (``check_https``, ``check_pinned``) at
    ``address:port`` was presented: the certificate (DER), and a ``time.monotonic()`` taken
    before that check connected (so before the handshake); None if none. The agent's
    heartbeat takes the certificate a switch's verify saw from here rather than make a
    handshake of its own (``NodeAgentService._served``: only where it can tell that the
    server that answered the verify still runs). Only the latest ``SEEN_KEPT`` addresses."""
    return _seen.get((address, port))
