"""One unary gRPC call at a time over the leader's admin socket, without grpcio: what ``tlsroll
schema show`` (and ``rollout status``, ``--wait``, ``notify``) read the schema with.

Why not grpcio: ``import grpc`` costs about 50 ms before any call, because its core imports
asyncio and ``grpc.aio`` whatever the caller uses; that was a third of ``schema show``'s time,
whose goal is 150 ms (issue 15). The admin socket is local and speaks plain gRPC: HTTP/2 without
TLS, by prior knowledge (RFC 9113 3.3). A unary call needs little of it: the preface and SETTINGS,
one HEADERS and one DATA frame out; HEADERS, DATA and the trailers back, answering the server's
SETTINGS and PINGs on the way. The header blocks that come back are HPACK (RFC 7541) and are
decoded here in full (static and dynamic table, Huffman), since the server may use any of it.

Not here: compression (none is offered, so the server sends none), TLS, streaming calls.
Every other admin command uses grpcio (``leader.cli.base.Leader.admin``). Failures are
``RpcFailed`` with a gRPC status code and the server's message, which ``Leader`` turns into
the same one-line errors as grpcio's.
"""

from __future__ import annotations

import socket
import struct
import time
from urllib.parse import unquote

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

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
MAX_FRAME = 16384  # the server's SETTINGS_MAX_FRAME_SIZE can only be larger
MAX_REPLY = 64 * 2**20  # a schema far beyond 100 rollouts of 500 nodes; more is a broken peer


class RpcFailed(TerminalError):
    """The call ended with a gRPC status other than OK (``code`` is its name). Terminal for
    this call: ``Leader.refused`` reports it and the command ends."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class ProtocolError(RpcFailed):
    """The peer broke HTTP/2, HPACK or gRPC framing."""

    def __init__(self, details: str) -> None:
        super().__init__("INTERNAL", f"unreadable reply from the leader: {details}")


# --- HPACK (RFC 7541) decoding ----------------------------------------------------------------

# fmt: off
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
    (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
    (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"),
    (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""),
    ("accept", ""), ("access-control-allow-origin", ""), ("age", ""), ("allow", ""),
    ("authorization", ""), ("cache-control", ""), ("content-disposition", ""),
    ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
    ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""),
    ("max-forwards", ""), ("proxy-authenticate", ""), ("proxy-authorization", ""),
    ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
    ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)
# fmt: on
"""RFC 7541 Appendix A; index 1 is the first entry."""

# The Huffman code's length in bits for each symbol 0..256 (256: EOS), RFC 7541 Appendix B, as
# chr(ord("<") + length). The code is canonical (codes in order of length, then symbol), so the
# lengths alone define it; tests decode the RFC's examples.
_LENGTHS = (
    "ISXXXXXXXTZXXZXXXXXXXXZXXXXXXXXXBFFHIBDGFFDGDBBBAAABBBBBBBCDKBHFIBCCCCCCCCCCCCCCCCCCCCCC"
    "DCDIOIJBKABABABBBACCBBBABCBAABCCCCCKGJIXPRPPRRRSRSSSSSTSTTRSTSSSSQRSRSSTRQPRRSSQSRRTQRSS"
    "QQRQSRSSPRRRSRRSVVPORSRUVVVWWVTUOQVWWVWTQQVVXWWWPTPQRQQSRRUUTTVSVWVVWWWWWXWWWWWVZ"
)
_HUFFMAN: dict[tuple[int, int], int] | None = None  # (length, code) -> symbol, built on first use


def _huffman_codes() -> dict[tuple[int, int], int]:
    global _HUFFMAN  # noqa: PLW0603 - built once, only if the server Huffman-codes a string
    if _HUFFMAN is None:
        lengths = [ord(c) - ord("<") for c in _LENGTHS]
        codes: dict[tuple[int, int], int] = {}
        order = sorted(range(257), key=lambda s: (lengths[s], s))
        code, previous = -1, lengths[order[0]]
        for symbol in order:
            code = (code + 1) << (lengths[symbol] - previous)
            previous = lengths[symbol]
            codes[(previous, code)] = symbol
        _HUFFMAN = codes
    return _HUFFMAN


def huffman_decode(data: bytes) -> bytes:
    """RFC 7541 5.2: the padding is at most 7 bits, all ones (the start of EOS)."""
    codes = _huffman_codes()
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            symbol = codes.get((length, code)) if length >= 5 else None
            if symbol is not None:
                if symbol == 256:
                    raise ProtocolError("EOS inside a Huffman-coded string")
                out.append(symbol)
                code = length = 0
            elif length > 30:
                raise ProtocolError("invalid Huffman code")
    if length > 7 or code != (1 << length) - 1:
        raise ProtocolError("invalid Huffman padding")
    return bytes(out)


class HpackDecoder:
    """The decoding context of one connection: its dynamic table lives as long as the
    connection (RFC 7541 2.3.2)."""

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size  # what we allow (SETTINGS_HEADER_TABLE_SIZE, default 4096)
        self.size_limit = max_size  # what the encoder chose, at most max_size
        self.dynamic: list[tuple[str, str]] = []  # newest first
        self.size = 0

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        if 0 <= index - len(STATIC_TABLE) - 1 < len(self.dynamic):
            return self.dynamic[index - len(STATIC_TABLE) - 1]
        raise ProtocolError(f"header table index {index} out of range")

    def _add(self, name: str, value: str) -> None:
        self.dynamic.insert(0, (name, value))
        self.size += len(name) + len(value) + 32  # octets: latin-1 is one per character
        self._evict()

    def _evict(self) -> None:
        while self.size > self.size_limit and self.dynamic:
            name, value = self.dynamic.pop()
            self.size -= len(name) + len(value) + 32  # octets: latin-1 is one per character

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The header fields of one complete header block, in order."""
        fields: list[tuple[str, str]] = []
        at = 0
        while at < len(block):
            first = block[at]
            if first & 0x80:  # indexed field
                index, at = _integer(block, at, 7)
                fields.append(self._entry(index))
                continue
            if first & 0xE0 == 0x20:  # dynamic table size update
                size, at = _integer(block, at, 5)
                if size > self.max_size:
                    raise ProtocolError(f"header table size {size} over {self.max_size}")
                self.size_limit = size
                self._evict()
                continue
            indexing = first & 0xC0 == 0x40  # else without (0000) or never indexed (0001)
            index, at = _integer(block, at, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                raw, at = _string(block, at)
                name = raw.decode("latin-1")
            raw, at = _string(block, at)
            value = raw.decode("latin-1")
            fields.append((name, value))
            if indexing:
                self._add(name, value)
        return fields


def _integer(data: bytes, at: int, prefix: int) -> tuple[int, int]:
    """RFC 7541 5.1: an integer with a ``prefix``-bit prefix at ``data[at]``; the value and
    where the next field starts."""
    limit = (1 << prefix) - 1
    value = data[at] & limit
    at += 1
    if value < limit:
        return value, at
    shift = 0
    while True:
        if at >= len(data) or shift > 28:
            raise ProtocolError("truncated or oversized integer in a header block")
        byte = data[at]
        at += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _string(data: bytes, at: int) -> tuple[bytes, int]:
    if at >= len(data):
        raise ProtocolError("truncated header block")
    huffman = data[at] & 0x80
    length, at = _integer(data, at, 7)
    if at + length > len(data):
        raise ProtocolError("truncated string in a header block")
    raw = data[at : at + length]
    return (huffman_decode(raw) if huffman else raw), at + length


def encode_integer(value: int, prefix: int, flags: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(fields: list[tuple[str, str]]) -> bytes:
    """Literal fields without indexing and without Huffman (RFC 7541 6.2.2): the simplest
    block a server must accept, and it leaves the server's decoding table untouched."""
    out = bytearray()
    for name, value in fields:
        out.append(0)
        for text in (name, value):
            raw = text.encode("latin-1")
            out += encode_integer(len(raw), 7) + raw
    return bytes(out)


# --- HTTP/2 framing ---------------------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


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


class UnaryChannel:
    """A connection to a gRPC server on a Unix socket that makes unary calls one after the
    other (``--watch`` asks every half second on the same connection). After any failure the
    connection is dropped and the next call opens a new one."""

    def __init__(self, path: str, authority: str = "localhost") -> None:
        self.path = path
        self.authority = authority
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_stream = 1
        self._decoder = HpackDecoder()
        self._deadline = 0.0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> UnaryChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: bytes, timeout: float = 30) -> bytes:
        """Call ``method`` (``/package.Service/Method``) with a serialized request; the
        serialized reply, or ``RpcFailed``."""
        self._deadline = time.monotonic() + timeout
        reused = self._sock is not None
        try:
            try:
                return self._call(method, request, timeout)
            except (RpcFailed, OSError) as exc:
                # A kept connection the leader has since closed (it restarted, or ended idle
                # connections): once more on a new one. Only read-only calls come this way.
                if not reused or (isinstance(exc, RpcFailed) and exc.code != "UNAVAILABLE"):
                    raise
                self.close()
                return self._call(method, request, timeout)
        except RpcFailed:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise RpcFailed("DEADLINE_EXCEEDED", "the leader did not answer in time") from None
        except OSError as exc:
            self.close()
            raise RpcFailed("UNAVAILABLE", f"{exc.strerror or exc}") from None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._remaining())
                sock.connect(self.path)
                # Our SETTINGS: no server push, and windows so large that the server never
                # waits for a WINDOW_UPDATE within a call (the connection's is topped up after
                # each call).
                sock.sendall(
                    PREFACE
                    + frame(SETTINGS, 0, 0, struct.pack(">HIHI", 2, 0, 4, MAX_WINDOW))
                    + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
                )
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self._buffer.clear()
            self._next_stream = 1
            self._decoder = HpackDecoder()
        return self._sock

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def _call(self, method: str, request: bytes, timeout: float) -> bytes:
        sock = self._connect()
        stream = self._next_stream
        self._next_stream += 2
        block = encode_headers(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", self.authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", grpc_timeout(timeout)),
                ("user-agent", "tlsroll-cli"),
            ]
        )
        body = b"\x00" + struct.pack(">I", len(request)) + request
        out = bytearray(frame(HEADERS, END_HEADERS, stream, block))
        for start in range(0, len(body), MAX_FRAME):
            last = start + MAX_FRAME >= len(body)
            out += frame(DATA, END_STREAM if last else 0, stream, body[start : start + MAX_FRAME])
        sock.settimeout(self._remaining())
        sock.sendall(out)
        headers, trailers, data, received = self._receive(stream)
        if received:  # give the connection's window back for the next call
            sock.sendall(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", received)))
        return self._reply(headers, trailers, data)

    def _receive(self, stream: int) -> tuple[dict[str, str], dict[str, str], bytearray, int]:
        headers: dict[str, str] | None = None
        trailers: dict[str, str] = {}
        data = bytearray()
        received = 0
        block = bytearray()
        block_ends_stream = False
        while True:
            kind, flags, sid, payload = self._frame()
            if kind == SETTINGS:
                if not flags & ACK:
                    self._send(frame(SETTINGS, ACK, 0))
                continue
            if kind == PING:
                if not flags & ACK:
                    self._send(frame(PING, ACK, 0, payload))
                continue
            if kind == GOAWAY:
                last = struct.unpack(">I", payload[:4])[0] & MAX_WINDOW if len(payload) >= 8 else 0
                if last < stream:
                    raise RpcFailed("UNAVAILABLE", "the leader closed the connection")
                continue
            if kind == DATA:  # counts against the connection's window, whichever stream
                received += len(payload)
            if sid != stream or kind in (WINDOW_UPDATE, PRIORITY):
                continue
            if kind == RST_STREAM:
                code = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else -1
                status = "UNAVAILABLE" if code == 7 else "INTERNAL"  # 7: REFUSED_STREAM
                raise RpcFailed(status, f"the leader reset the call (HTTP/2 error {code})")
            if kind == DATA:
                data += _unpadded(flags, payload)
                if len(data) > MAX_REPLY:
                    raise ProtocolError(f"reply over {MAX_REPLY} bytes")
                if flags & END_STREAM:
                    raise ProtocolError("the reply ended without trailers")
                continue
            if kind == HEADERS:
                fragment = _unpadded(flags, payload)
                if flags & PRIORITY_FLAG:
                    fragment = fragment[5:]
                block = bytearray(fragment)
                block_ends_stream = bool(flags & END_STREAM)
            elif kind == CONTINUATION:
                block += payload
            else:
                raise ProtocolError(f"unexpected frame type {kind}")
            if not flags & END_HEADERS:
                continue
            fields = dict(self._decoder.decode(bytes(block)))
            if headers is None:
                headers = fields
            else:
                trailers = fields
            if block_ends_stream:
                # a trailers-only reply carries the status in its only header block
                return headers, trailers or headers, data, received

    def _reply(self, headers: dict[str, str], trailers: dict[str, str], data: bytearray) -> bytes:
        status = trailers.get("grpc-status")
        if status is None:
            code = http_status_code(headers.get(":status", ""))
            raise RpcFailed(
                code, f"HTTP status {headers.get(':status', '?')} without a gRPC status"
            )
        number = int(status) if status.isdigit() else 2
        if number != 0:
            code = STATUS[number] if number < len(STATUS) else "UNKNOWN"
            raise RpcFailed(code, unquote(trailers.get("grpc-message", "")))
        if len(data) < 5:
            raise ProtocolError("no reply message")
        if data[0] != 0:
            raise ProtocolError("a compressed reply, though none was offered")
        (length,) = struct.unpack(">I", data[1:5])
        if len(data) != 5 + length:
            raise ProtocolError("more or less than one reply message")
        return bytes(data[5:])

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.settimeout(self._remaining())
        self._sock.sendall(data)

    def _read(self, n: int) -> bytes:
        assert self._sock is not None
        while len(self._buffer) < n:
            self._sock.settimeout(self._remaining())
            chunk = self._sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise RpcFailed("UNAVAILABLE", "the leader closed the connection")
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def _frame(self) -> tuple[int, int, int, bytes]:
        head = self._read(9)
        length = int.from_bytes(head[:3], "big")
        if length > MAX_FRAME:  # we never raised SETTINGS_MAX_FRAME_SIZE
            raise ProtocolError(f"frame of {length} bytes")
        stream = struct.unpack(">I", head[5:9])[0] & MAX_WINDOW
        return head[3], head[4], stream, self._read(length)


def _unpadded(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ProtocolError("bad padding")
    return payload[1 : len(payload) - payload[0]]
