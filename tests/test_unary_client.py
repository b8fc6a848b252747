"""``leader.cli.unary``: the CLI's grpcio-free unary gRPC client (``schema show`` reads the
schema with it). HPACK against RFC 7541's own examples; the calls against a real gRPC server
(grpcio, on a real Unix socket): big replies over many frames, statuses with their messages,
several calls on one connection, a server that went away between two calls, deadlines."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader.cli.base import GET_SCHEMA
from leader.cli.unary import (
    HpackDecoder,
    ProtocolError,
    RpcFailed,
    UnaryChannel,
    encode_headers,
    encode_integer,
    huffman_decode,
)
from tlsroll.v1 import schema_pb2, schema_pb2_grpc

# --- HPACK: RFC 7541 Appendix C -----------------------------------------------------------------


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


REQUEST_1 = [
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
]
REQUEST_2 = [*REQUEST_1, ("cache-control", "no-cache")]
REQUEST_3 = [
    (":method", "GET"),
    (":scheme", "https"),
    (":path", "/index.html"),
    (":authority", "www.example.com"),
    ("custom-key", "custom-value"),
]


def test_hpack_integers_and_a_literal_with_indexing() -> None:
    """C.1 (integers) and C.2.1: a literal that enters the dynamic table."""
    assert encode_integer(10, 5) == b"\x0a"
    assert encode_integer(1337, 5) == b"\x1f\x9a\x0a"
    assert encode_integer(42, 8) == b"\x2a"
    decoder = HpackDecoder()
    block = hexbytes("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")
    assert decoder.decode(block) == [("custom-key", "custom-header")]
    assert decoder.size == 55
    assert decoder.decode(hexbytes("040c 2f73 616d 706c 652f 7061 7468")) == [
        (":path", "/sample/path")
    ]  # C.2.2: without indexing, the table is unchanged
    assert decoder.size == 55
    assert decoder.decode(hexbytes("be")) == [("custom-key", "custom-header")]  # index 62


def test_hpack_requests_on_one_connection_without_and_with_huffman() -> None:
    """C.3 and C.4: three requests each, the dynamic table carried from one to the next."""
    plain = HpackDecoder()
    assert plain.decode(hexbytes("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d")) == REQUEST_1
    assert plain.decode(hexbytes("8286 84be 5808 6e6f 2d63 6163 6865")) == REQUEST_2
    block = "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"
    assert plain.decode(hexbytes(block)) == REQUEST_3
    assert plain.size == 164
    huffman = HpackDecoder()
    assert huffman.decode(hexbytes("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")) == REQUEST_1
    assert huffman.decode(hexbytes("8286 84be 5886 a8eb 1064 9cbf")) == REQUEST_2
    block = "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"
    assert huffman.decode(hexbytes(block)) == REQUEST_3
    assert huffman.size == 164


def test_hpack_responses_evict_from_a_small_table() -> None:
    """C.6.1 and C.6.2 (Huffman) with a 256-octet table: the second response evicts the
    first's :status."""
    decoder = HpackDecoder(max_size=256)
    first = hexbytes(
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6"
        "2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3"
    )
    common = [
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ]
    assert decoder.decode(first) == [(":status", "302"), *common]
    assert decoder.size == 222
    assert decoder.decode(hexbytes("4883 640e ffc1 c0bf")) == [(":status", "307"), *common]
    assert decoder.size == 222
    assert decoder.dynamic[0] == (":status", "307") and (":status", "302") not in decoder.dynamic


@pytest.mark.parametrize(
    ("block", "says"),
    [
        (b"\xff\x80", "truncated"),  # an index whose continuation never ends
        (b"\xc0", "out of range"),  # index 64: the dynamic table is empty
        (b"\x3f\xe2\x1f", "header table size"),  # a size update to 4097, beyond ours
        (b"\x00\x85\xff\xff\xff\xff\xff\x00", "Huffman"),  # EOS inside a string
        (b"\x00\x05ab", "truncated"),
    ],
)
def test_hpack_refuses_a_broken_block_with_one_line(block: bytes, says: str) -> None:
    with pytest.raises(ProtocolError) as info:
        HpackDecoder().decode(block)
    assert says in str(info.value) and info.value.code == "INTERNAL"


def test_huffman_padding_must_be_the_start_of_eos() -> None:
    assert huffman_decode(hexbytes("f1e3 c2e5 f23a 6ba0 ab90 f4ff")) == b"www.example.com"
    assert huffman_decode(b"\x1f") == b"a"  # 00011, then 111
    with pytest.raises(ProtocolError):
        huffman_decode(b"\x18")  # 00011, then 000
    with pytest.raises(ProtocolError):
        huffman_decode(b"\x1f\xff")  # more than 7 bits of padding


def test_our_header_blocks_decode_as_sent() -> None:
    fields = [(":path", "/x" * 100), ("content-type", "application/grpc"), ("k", "v" * 300)]
    assert HpackDecoder().decode(encode_headers(fields)) == fields


# --- calls against a real gRPC server -----------------------------------------------------------


class Schema(schema_pb2_grpc.SchemaViewServicer):
    """Answers ``limit`` rollouts of 50 nodes each (a big reply for a big limit); a rollout id
    chooses a failure."""

    def __init__(self) -> None:
        self.calls = 0

    def GetSchema(self, request: schema_pb2.GetSchemaRequest, context: Any) -> schema_pb2.Schema:
        self.calls += 1
        if request.rollout_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "kein Rollout „missing“ — siehe: schema show")
        if request.rollout_id == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: must be 0 or more")
        if request.rollout_id == "slow":
            time.sleep(2)
        nodes = [schema_pb2.NodeView(name=f"node-{i:03d}", reason="x" * 40) for i in range(50)]
        return schema_pb2.Schema(
            rollouts=[schema_pb2.RolloutView(id=f"r{i}", nodes=nodes) for i in range(request.limit)]
        )


@contextmanager
def serving(path: Path, servicer: Schema) -> Iterator[grpc.Server]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    schema_pb2_grpc.add_SchemaViewServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield server
    finally:
        server.stop(None).wait(5)


def get(channel: UnaryChannel, timeout: float = 10, **request: Any) -> schema_pb2.Schema:
    data = schema_pb2.GetSchemaRequest(**request).SerializeToString()
    return schema_pb2.Schema.FromString(channel.call(GET_SCHEMA, data, timeout))


def test_calls_on_one_connection_with_replies_far_over_the_default_windows(tmp_path: Path) -> None:
    """A reply of several MiB comes in many DATA frames, past HTTP/2's default 64 KiB windows;
    the next calls reuse the connection (streams 3, 5, …) and its decoding table."""
    sock = tmp_path / "s.sock"
    servicer = Schema()
    with serving(sock, servicer), UnaryChannel(str(sock)) as channel:
        big = get(channel, limit=400)
        assert len(big.rollouts) == 400 and big.ByteSize() > 2**20
        assert big.rollouts[399].nodes[49].name == "node-049"
        first = channel._sock
        for limit in (1, 0, 7, 400):
            assert len(get(channel, limit=limit).rollouts) == limit
        assert channel._sock is first and channel._next_stream == 11  # one connection
    assert servicer.calls == 5


def test_statuses_and_their_messages_come_through(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with serving(sock, Schema()), UnaryChannel(str(sock)) as channel:
        with pytest.raises(RpcFailed) as info:
            get(channel, rollout_id="missing")
        assert info.value.code == "NOT_FOUND"
        assert info.value.details == "kein Rollout „missing“ — siehe: schema show"
        with pytest.raises(RpcFailed) as info:
            get(channel, rollout_id="bad")
        assert (info.value.code, info.value.details) == (
            "INVALID_ARGUMENT",
            "limit: must be 0 or more",
        )
        with pytest.raises(RpcFailed) as info:
            channel.call("/tlsroll.v1.SchemaView/NoSuchMethod", b"")
        assert info.value.code == "UNIMPLEMENTED"
        assert len(get(channel, limit=2).rollouts) == 2  # and the channel still works


def test_a_deadline_ends_the_call(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with serving(sock, Schema()), UnaryChannel(str(sock)) as channel:
        t0 = time.monotonic()
        with pytest.raises(RpcFailed) as info:
            get(channel, timeout=0.3, rollout_id="slow")
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - t0 < 1.5
        assert len(get(channel, limit=1).rollouts) == 1


def test_a_server_gone_and_back_between_two_calls(tmp_path: Path) -> None:
    """``--watch`` keeps its connection: a leader restart between two calls costs one new
    connection, not an error; with no server at all the call is UNAVAILABLE."""
    sock = tmp_path / "s.sock"
    with UnaryChannel(str(sock)) as channel:
        with serving(sock, Schema()):
            assert len(get(channel, limit=1).rollouts) == 1
        with pytest.raises(RpcFailed) as info:
            get(channel, limit=1)
        assert info.value.code == "UNAVAILABLE"
        with serving(sock, Schema()):
            assert len(get(channel, limit=1).rollouts) == 1
            old = channel._sock
        with serving(sock, Schema()):  # the kept connection is now the old server's
            assert len(get(channel, limit=3).rollouts) == 3
            assert channel._sock is not old


def test_a_peer_that_is_not_grpc_is_one_line(tmp_path: Path) -> None:
    """Anything else on the socket (here: one that answers HTTP/1.1) ends the call with one
    line, not a hang or a traceback."""

    sock = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with UnaryChannel(str(sock)) as channel, pytest.raises(RpcFailed) as info:
            get(channel, timeout=5, limit=1)
        assert info.value.code in {"INTERNAL", "UNAVAILABLE"}
    finally:
        thread.join(5)
        listener.close()
