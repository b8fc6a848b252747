"""The agent's verify looks at its server from outside on its own event loop: is a port open,
does plain http serve the app, does https serve it with exactly the staged certificate.

``tlsroll.httpcheck``'s checks, with its answers (None, or one line of what is wrong) and its
probe's ``User-Agent``, made with asyncio's streams instead of blocking sockets in worker
threads: the verify runs inside every switch's freeze window, and its three checks each took a
hand-off to a worker thread and back, the threads and the event loop passing the GIL between
them all through the TLS handshake (issue 15). The leader's confirm keeps ``httpcheck``.

A check gives up after ``timeout`` seconds for each of its steps (connect with the TLS
handshake, the answer), as ``http.client``'s socket timeout does for each operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import h11

from tlsroll.errors import TerminalError, raise_if_local
from tlsroll.httpcheck import PROBE_HEADERS, trusting

ANSWER_MAX = 1 << 20  # bytes: a probe reads at most this much of an answer
CLOSE_WAIT = 1.0  # seconds a probe waits for its connection's close (a TLS close_notify)


class _Answer(TerminalError):
    """An answer a probe cannot read as HTTP (or a TLS connection without a certificate)."""


# Everything a probe can meet on the way: the network and TLS (OSError, which ssl.SSLError and
# timeouts are), an answer it cannot read (``_Answer``, as h11's errors are turned into), an
# address or port that cannot be used (ValueError, OverflowError, UnicodeError).
PROBE_ERRORS = (OSError, _Answer, ValueError, OverflowError, EOFError)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _host(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, ValueError):
        async with asyncio.timeout(CLOSE_WAIT):
            await writer.wait_closed()


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


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str, timeout: float
) -> int:
    """GET ``path`` on an open connection; the answer's status once the whole answer is in (a
    length, chunks, or the connection's end, as h11 reads it)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=ANSWER_MAX)
    headers = [("Host", host), *PROBE_HEADERS.items(), ("Connection", "close")]
    writer.write(
        (conn.send(h11.Request(method="GET", target=path, headers=headers)) or b"")
        + (conn.send(h11.EndOfMessage()) or b"")
    )
    status, size = 0, 0
    async with asyncio.timeout(timeout):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Answer(f"not an HTTP answer: {exc}") from None
            if event is h11.NEED_DATA:
                data = await reader.read(1 << 16)
                if not data and status == 0:
                    raise _Answer("the connection closed without an answer")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > ANSWER_MAX:
                    raise _Answer(f"an answer of more than {ANSWER_MAX} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return status
            elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover - h11 raises
                raise _Answer("the connection closed before the answer's end")


async def check_http(address: str, port: int, path: str, timeout: float = 5.0) -> str | None:
    """None if plain http on ``address:port`` serves ``path`` with 200, else what is wrong
    (``LocalResourceError`` if the checking side ran short)."""
    url = f"http://{address}:{port}{path}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port)
        try:
            status = await _get(reader, writer, _host(address, port), path, timeout)
        finally:
            await _close(writer)
    except PROBE_ERRORS as exc:
        raise_if_local(exc, f"checking {url}")
        return f"{url}: {_describe(exc)}"
    return None if status == 200 else f"{url} answered {status}"


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
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                address, port, ssl=trusting(ca_pem), server_hostname=address
            )
        try:
            tls = writer.get_extra_info("ssl_object")
            der = tls.getpeercert(binary_form=True) if tls is not None else None
            if der is None:
                raise _Answer("the server presented no certificate")
            served = "sha256:" + hashlib.sha256(der).hexdigest()
            if fingerprint and served != fingerprint:
                return (
                    f"https://{address}:{port} presents {served}, "
                    f"not the staged certificate {fingerprint}"
                )
            status = await _get(reader, writer, _host(address, port), path, timeout)
        finally:
            await _close(writer)
    except PROBE_ERRORS as exc:
        raise_if_local(exc, f"checking {url}")
        return f"{url}: {_describe(exc)}"
    return None if status == 200 else f"{url} answered {status}"
