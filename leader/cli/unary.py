"""One unary gRPC call at a time over the leader's admin socket, without grpcio: what ``tlsroll
schema show`` (and ``rollout status``, ``--wait``, ``notify``) read the schema with.

Why not grpcio: ``import grpc`` costs about 50 ms before any call, because its core imports
asyncio and ``grpc.aio`` whatever the caller uses; that was a third of ``schema show``'s time,
whose goal is 150 ms (issue 15). The admin socket is local and speaks plain gRPC: HTTP/2 without
TLS, by prior knowledge (RFC 9113 3.3). HTTP/2 itself (frames, HPACK, SETTINGS and PING answers,
flow control and RST_STREAM) is the ``h2`` library's, the state machine httpx uses; this module
adds only gRPC's own part on a blocking Unix socket: the 5-byte message prefix, the
``grpc-timeout`` header, and the ``grpc-status``/``grpc-message`` trailers; and GOAWAY, which it
reads before h2 sees it (``_Frames``): a leader that stops gracefully sends one, then finishes
the calls it has taken, but h2 closes the connection at the first GOAWAY and refuses every frame
after it (python-hyper/h2 #1181, #1199), our reply among them (audit s39race H2). The messages are
bytes to it: protobuf's, or JSON for a method served with gRPC's JSON codec (``codec``: the
content-type's ``+json``), as ``schema show`` reads the schema.

Not here: compression (none is offered, so the server sends none), TLS, streaming calls.
Every other admin command uses grpcio (``leader.cli.base.Leader.admin``). Failures are
``RpcFailed`` with a gRPC status code and the server's message, which ``Leader`` turns into
the same one-line errors as grpcio's. Each says whether the request had gone out whole
(``sent``): a call that changes something and fails after that may have been done (audit
s39race H1).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable
from urllib.parse import unquote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

from tlsroll.errors import TerminalError

# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html) by number.
# fmt: off
STATUS = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)
# fmt: on

DEFAULT_WINDOW = 65535  # HTTP/2's initial flow-control windows (RFC 9113 6.9.2)
WINDOW = 2**20
"""Our receive windows, stream and connection: a schema of 100 rollouts comes in one go, without
waiting for a WINDOW_UPDATE; a bigger one is acknowledged as it is read (h2 sends the update)."""
MAX_REPLY = 64 * 2**20  # a schema far beyond 100 rollouts of 500 nodes; more is a broken peer

# header_encoding=None: header names and values stay bytes, decoded here as latin-1 (what comes
# back is ASCII, grpc-message percent-encoded), so that no server's bytes can raise outside
# h2's own errors.
CONFIG = H2Configuration(client_side=True, header_encoding=None)


class RpcFailed(TerminalError):
    """The call ended with a gRPC status other than OK (``code`` is its name). Terminal for
    this call: ``Leader.refused`` reports it and the command ends."""

    def __init__(self, code: str, details: str, *, answered: bool = False) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        # The leader's own status (its trailers), not one made here for a failed connection:
        # an UNAVAILABLE it sends says why (its store's disk is full), one made here is "no
        # leader there".
        self.answered = answered
        # Whether the request had gone out whole before the call failed (``UnaryChannel.sent``;
        # set by ``call``): the leader may have acted on it. False for a stream the leader
        # says it did not take (a GOAWAY below it, REFUSED_STREAM).
        self.sent = False


# What grpc's core sends for the calls still running when a server's stop grace runs out
# (``Server::CancelAllCalls``): grpc's own words, not the leader's.
CANCELLED_AT_STOP = "Cancelling all calls"


def cut_short_by_stop(exc: RpcFailed) -> bool:
    """Whether a call's status on a connection the leader sent GOAWAY on is gRPC's own for a
    call its stop cut short (CANCELLED, or UNAVAILABLE "Cancelling all calls" once the grace
    has run out) rather than the leader's answer: the call may have done its change, and the
    leader has not said it refused it."""
    return exc.code == "CANCELLED" or (
        exc.code == "UNAVAILABLE" and exc.details == CANCELLED_AT_STOP
    )


class ProtocolError(RpcFailed):
    """The peer broke HTTP/2, HPACK or gRPC framing."""

    def __init__(self, details: str) -> None:
        super().__init__("INTERNAL", f"unreadable reply from the leader: {details}")


def grpc_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` header: at most 8 digits and a unit."""
    millis = max(1, int(seconds * 1000))
    return f"{millis}m" if millis < 10**8 else f"{min(int(seconds), 10**8 - 1)}S"


def http_status_code(status: str) -> str:
    """The gRPC code for a reply without grpc-status, by its HTTP status (gRPC's
    http-grpc-status-mapping)."""
    return {
        "400": "INTERNAL",
        "401": "UNAUTHENTICATED",
        "403": "PERMISSION_DENIED",
        "404": "UNIMPLEMENTED",
        "429": "UNAVAILABLE",
        "502": "UNAVAILABLE",
        "503": "UNAVAILABLE",
        "504": "UNAVAILABLE",
    }.get(status, "UNKNOWN")


class NotTaken(RpcFailed):
    """The leader did not take the call (its GOAWAY's last stream is below ours, or it refused
    the stream): it did nothing with it, and the call may be tried again on a new connection."""

    def __init__(self, details: str) -> None:
        super().__init__("UNAVAILABLE", details)


GOAWAY = 0x7


class _Frames:
    """The server's bytes as whole HTTP/2 frames, its GOAWAY frames taken out: h2 gets the
    rest. gRPC's graceful stop (``server.stop(grace)``, the leader's SIGTERM) sends a GOAWAY
    with the last stream id 2^31-1, a PING, then a GOAWAY with the last stream it took, and
    finishes those streams; h2 would close at the first and raise at the PING."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes, max_frame: int) -> tuple[bytes, list[int]]:
        """What to hand to h2, and each GOAWAY's last stream id. A frame over ``max_frame``
        (or a peer that is not HTTP/2) goes to h2 as it is, which refuses it."""
        self._buffer += chunk
        data = bytearray()
        goaways: list[int] = []
        buf = self._buffer
        at = 0
        while len(buf) - at >= 9:
            length, kind = int.from_bytes(buf[at : at + 3]), buf[at + 3]
            if length > max_frame:
                data += buf[at:]
                at = len(buf)
                break
            end = at + 9 + length
            if end > len(buf):
                break
            if kind == GOAWAY and length >= 8:
                (last,) = struct.unpack_from(">I", buf, at + 9)
                goaways.append(last & 0x7FFFFFFF)
            else:
                data += buf[at:end]
            at = end
        del buf[:at]
        return bytes(data), goaways


def reset_code(error_code: int | None) -> str:
    """The gRPC code for a call the server reset (gRPC's HTTP/2 error-code mapping): a stream
    it refused never ran and may be tried again."""
    return "UNAVAILABLE" if error_code == ErrorCodes.REFUSED_STREAM else "INTERNAL"


def fields(headers: Iterable[tuple[bytes | str, bytes | str]] | None) -> dict[str, str]:
    """h2's header tuples (bytes, as CONFIG asks) as a dict of latin-1 text."""
    return {_text(name): _text(value) for name, value in headers or ()}


def _text(raw: bytes | str) -> str:
    return raw.decode("latin-1") if isinstance(raw, bytes) else raw


class _Reply:
    """What has come back on one call's stream so far."""

    __slots__ = ("data", "ended", "headers", "stream", "trailers")

    def __init__(self, stream: int) -> None:
        self.stream = stream
        self.headers: dict[str, str] | None = None
        self.trailers: dict[str, str] | None = None
        self.data = bytearray()
        self.ended = False


class UnaryChannel:
    """A connection to a gRPC server on a Unix socket that makes unary calls one after the
    other (``--watch`` asks every half second on the same connection). After any failure the
    connection is dropped and the next call opens a new one; so is one the server has sent a
    GOAWAY on (it is stopping), once the call under way has its reply."""

    def __init__(self, path: str, authority: str = "localhost") -> None:
        self.path = path
        self.authority = authority
        self._sock: socket.socket | None = None
        self._conn: H2Connection | None = None
        self._frames = _Frames()
        self._gone = False  # the server sent GOAWAY: the next call needs a new connection
        self._unwritable = False  # a write failed once the request was out (the server closed)
        self._deadline = 0.0
        self.headers: dict[str, str] = {}
        """The last call's initial metadata (the leader names its code there)."""
        self.sent: bool | None = False
        """Whether the last call's request went out whole, so that the leader may have acted
        on it: False not (yet), True yes, None while its last bytes were going out (a call
        interrupted then may have been sent; one that failed then was not)."""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._conn = None

    def __enter__(self) -> UnaryChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        request: bytes,
        timeout: float = 30,
        codec: str = "proto",
        *,
        once: bool = False,
    ) -> bytes:
        """Call ``method`` (``/package.Service/Method``) with a serialized request; the
        serialized reply, or ``RpcFailed`` (its ``sent`` says whether the request had gone out
        whole). ``codec``: how the messages are serialized (gRPC's content-subtype: ``proto``,
        or ``json`` for a method served with the JSON codec). ``once``: a call that changes
        something, on a new connection and never sent again; any other is sent once more on
        a new connection when the kept one turns out closed, or the leader did not take it."""
        self._deadline = time.monotonic() + timeout
        self.headers = {}
        self.sent = False
        if self._gone or once:
            self.close()
        reused = self._sock is not None
        try:
            try:
                return self._call(method, request, timeout, codec)
            except (RpcFailed, OSError, H2Error) as exc:
                # A kept connection the leader has since closed (it restarted, or ended idle
                # connections), or a leader that is stopping: once more on a new one (a
                # restarted leader's, or none: UNAVAILABLE). Only read-only calls come this way.
                again = isinstance(exc, NotTaken) or (
                    (reused or self._gone)
                    and not isinstance(exc, H2Error)
                    and (not isinstance(exc, RpcFailed) or exc.code == "UNAVAILABLE")
                )
                if once or not again:
                    raise
                self.close()
                self.sent = False
                return self._call(method, request, timeout, codec)
        except RpcFailed as exc:
            self.close()
            exc.sent = self.sent is True and not isinstance(exc, NotTaken)
            raise
        except TimeoutError:
            self.close()
            failed = RpcFailed("DEADLINE_EXCEEDED", "the leader did not answer in time")
            failed.sent = self.sent is True
            raise failed from None
        except OSError as exc:
            self.close()
            failed = RpcFailed("UNAVAILABLE", f"{exc.strerror or exc}")
            failed.sent = self.sent is True
            raise failed from None
        except H2Error as exc:  # h2 refused what we would send, after what the peer sent
            self.close()
            if self._gone:  # (after a GOAWAY: the leader is stopping)
                failed = RpcFailed("UNAVAILABLE", "the leader is stopping")
            else:
                failed = ProtocolError(str(exc) or type(exc).__name__)
            failed.sent = self.sent is True
            raise failed from None

    def _connect(self) -> H2Connection:
        if self._sock is None or self._conn is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._remaining())
                sock.connect(self.path)
                conn = H2Connection(config=CONFIG)
                # Sent with the preface: no server push, and our stream window; the
                # connection's is raised to the same right after.
                conn.local_settings = Settings(
                    client=True,
                    initial_values={
                        SettingCodes.ENABLE_PUSH: 0,
                        SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                    },
                )
                conn.initiate_connection()
                conn.increment_flow_control_window(WINDOW - DEFAULT_WINDOW)
                sock.sendall(conn.data_to_send())
            except BaseException:
                sock.close()
                raise
            self._sock, self._conn, self._gone = sock, conn, False
            self._unwritable = False
            self._frames = _Frames()
        return self._conn

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def _call(self, method: str, request: bytes, timeout: float, codec: str) -> bytes:
        conn = self._connect()
        reply = _Reply(conn.get_next_available_stream_id())
        conn.send_headers(
            reply.stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", self.authority),
                ("content-type", f"application/grpc+{codec}"),
                ("te", "trailers"),
                ("grpc-timeout", grpc_timeout(timeout)),
                ("user-agent", "tlsroll-cli"),
            ],
        )
        body = memoryview(b"\x00" + struct.pack(">I", len(request)) + request)
        while body and not reply.ended:  # (a server may answer before it has read it all)
            # as much as the server's windows and frame size allow; else wait for its
            # WINDOW_UPDATE (the CLI's requests are small: this loop runs once)
            size = min(
                len(body),
                conn.local_flow_control_window(reply.stream),
                conn.max_outbound_frame_size,
            )
            if size <= 0:
                self._flush()
                self._receive(reply)
                continue
            conn.send_data(reply.stream, body[:size], end_stream=size == len(body))
            body = body[size:]
        if not body:
            self.sent = None  # its last bytes go out now
        self._flush()
        if not body:
            self.sent = True
        while not reply.ended:
            self._receive(reply)
        self.headers = reply.headers or {}
        if self._unwritable:
            self.close()  # (its reply was read; no new call on it)
        if not self._gone:
            return self._reply(reply)
        self.close()  # the leader is stopping: it waits for its connections to close
        try:
            return self._reply(reply)
        except RpcFailed as exc:
            if cut_short_by_stop(exc):
                raise RpcFailed("UNAVAILABLE", "the leader is stopping") from None
            raise

    def _flush(self) -> None:
        assert self._sock is not None and self._conn is not None
        out = self._conn.data_to_send()
        if out:
            self._sock.settimeout(self._remaining())
            self._sock.sendall(out)

    def _receive(self, reply: _Reply) -> None:
        """Read what the server sent next, hand it to h2 (but its GOAWAYs: ``_Frames``), and
        answer (SETTINGS and PING acknowledgements, WINDOW_UPDATEs for the data read)."""
        assert self._sock is not None and self._conn is not None
        conn = self._conn
        self._sock.settimeout(self._remaining())
        chunk = self._sock.recv(65536)
        if not chunk:
            stopping = "the leader is stopping" if self._gone else ""
            raise RpcFailed("UNAVAILABLE", stopping or "the leader closed the connection")
        data, goaways = self._frames.feed(chunk, conn.max_inbound_frame_size)
        for last in goaways:
            # The leader is stopping: no new call on this connection. Our call goes on if the
            # leader took it (its last stream id is ours or above), else it never ran.
            self._gone = True
            if last < reply.stream and not reply.ended:
                raise NotTaken("the leader is stopping")
        try:
            events = conn.receive_data(data) if data else []
        except H2Error as exc:
            if self._gone:
                raise RpcFailed("UNAVAILABLE", "the leader is stopping") from None
            raise ProtocolError(str(exc) or type(exc).__name__) from None
        for event in events:
            if isinstance(event, DataReceived):
                # counts against the connection's window, whichever stream it is on
                if event.flow_controlled_length:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id == reply.stream and event.data:
                    reply.data += event.data
                    if len(reply.data) > MAX_REPLY:
                        raise ProtocolError(f"reply over {MAX_REPLY} bytes")
            elif getattr(event, "stream_id", None) != reply.stream:
                continue
            elif isinstance(event, ResponseReceived):
                reply.headers = fields(event.headers)
            elif isinstance(event, TrailersReceived):
                reply.trailers = fields(event.headers)
            elif isinstance(event, StreamEnded):
                reply.ended = True
            elif isinstance(event, StreamReset):
                if event.error_code == ErrorCodes.REFUSED_STREAM:
                    raise NotTaken("the leader refused the call (it is busy or stopping)")
                if self._gone:
                    raise RpcFailed("UNAVAILABLE", "the leader is stopping")
                raise RpcFailed(
                    reset_code(event.error_code),
                    f"the leader reset the call (HTTP/2 error {int(event.error_code or 0)})",
                )
        if not reply.ended and self.sent is not True:
            self._flush()  # (still sending the request: a failed write fails the call)
            return
        if self._unwritable:
            return
        try:
            self._flush()
        except OSError:
            # The server has closed its side. After the reply: no failure (the next call
            # needs a new connection). Before it: what the server sent before it closed may
            # still hold the reply whole (it answered, then closed); it is read from what is
            # left in the socket, and without it the read ends and the call fails there.
            if reply.ended:
                self._gone = True
            else:
                self._unwritable = True

    def _reply(self, reply: _Reply) -> bytes:
        headers = reply.headers or {}
        if reply.trailers is None and reply.data:
            raise ProtocolError("the reply ended without trailers")
        # a trailers-only reply carries the status in its only header block
        trailers = reply.trailers if reply.trailers is not None else headers
        status = trailers.get("grpc-status")
        if status is None:
            code = http_status_code(headers.get(":status", ""))
            raise RpcFailed(
                code, f"HTTP status {headers.get(':status', '?')} without a gRPC status"
            )
        number = int(status) if status.isdigit() else 2
        if number != 0:
            code = STATUS[number] if number < len(STATUS) else "UNKNOWN"
            raise RpcFailed(code, unquote(trailers.get("grpc-message", "")), answered=True)
        data = reply.data
        if len(data) < 5:
            raise ProtocolError("no reply message")
        if data[0] != 0:
            raise ProtocolError("a compressed reply, though none was offered")
        (length,) = struct.unpack(">I", data[1:5])
        if len(data) != 5 + length:
            raise ProtocolError("more or less than one reply message")
        return bytes(data[5:])
