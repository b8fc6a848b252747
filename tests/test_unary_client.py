"""``leader.cli.unary``: the CLI's grpcio-free unary gRPC client (``schema show`` reads the
schema with it; HTTP/2 and HPACK are h2's, tested there). Its calls against a real gRPC server
(grpcio, on a real Unix socket): big replies over many frames and past our flow-control windows,
a request past the server's, statuses with their messages, several calls on one connection, a
server that went away between two calls, deadlines, a peer that is not gRPC."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader.cli.base import GET_SCHEMA
from leader.cli.unary import WINDOW, RpcFailed, UnaryChannel
from tlsroll.v1 import schema_pb2, schema_pb2_grpc

# --- calls against a real gRPC server -----------------------------------------------------------


class Schema(schema_pb2_grpc.SchemaViewServicer):
    """Answers ``limit`` rollouts of 50 nodes each (a big reply for a big limit); a rollout id
    chooses a failure."""

    def __init__(self) -> None:
        self.calls = 0
        # "slow" answers once this is set (or after a minute, a hang's bound): only a deadline
        # ends its call before the test lets it go.
        self.let_go = threading.Event()

    def GetSchema(self, request: schema_pb2.GetSchemaRequest, context: Any) -> schema_pb2.Schema:
        self.calls += 1
        if request.rollout_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "kein Rollout „missing“ — siehe: schema show")
        if request.rollout_id == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: must be 0 or more")
        if request.rollout_id == "slow":
            self.let_go.wait(60)
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
    """A reply of several MiB comes in many DATA frames, past HTTP/2's default 64 KiB windows
    and past ours (the data read is acknowledged, or the server would wait for a
    WINDOW_UPDATE until the deadline); the next calls reuse the connection (streams 3, 5, …)
    and its decoding table."""
    sock = tmp_path / "s.sock"
    servicer = Schema()
    with serving(sock, servicer), UnaryChannel(str(sock)) as channel:
        big = get(channel, limit=1000)
        assert len(big.rollouts) == 1000 and big.ByteSize() > 2 * WINDOW
        assert big.rollouts[999].nodes[49].name == "node-049"
        first = channel._sock
        for limit in (1, 0, 7, 1000):
            assert len(get(channel, limit=limit).rollouts) == limit
        assert channel._sock is first  # one connection
        assert channel._conn is not None and channel._conn.get_next_available_stream_id() == 11
    assert servicer.calls == 5


def test_a_request_past_the_servers_window(tmp_path: Path) -> None:
    """A request bigger than the window and frame size the server allows goes out in pieces
    as its WINDOW_UPDATEs come (the CLI's own requests are small)."""
    sock = tmp_path / "s.sock"
    with serving(sock, Schema()), UnaryChannel(str(sock)) as channel:
        assert len(get(channel, rollout_id="x" * 300_000, limit=2).rollouts) == 2


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
    """The server holds its answer until the test lets it go: the call's 0.3 s deadline is
    what ends it (timed before: under 1.5 s, against a server that answered after 2 s)."""
    sock = tmp_path / "s.sock"
    servicer = Schema()
    with serving(sock, servicer), UnaryChannel(str(sock)) as channel:
        try:
            with pytest.raises(RpcFailed) as info:
                get(channel, timeout=0.3, rollout_id="slow")
            assert info.value.code == "DEADLINE_EXCEEDED"
        finally:
            servicer.let_go.set()
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


def test_schema_show_reads_a_leader_without_the_json_codec_by_protobuf(tmp_path: Path) -> None:
    """A leader started before ``SchemaViewJson`` existed (tlsroll upgraded, the leader not
    yet restarted) answers it UNIMPLEMENTED: ``schema show`` then reads the same data by
    protobuf instead of failing with "Method not found!"."""
    from leader.cli.base import Leader, fetch_schema_json

    sock = tmp_path / "s.sock"
    servicer = Schema()
    with serving(sock, servicer):
        leader = Leader(sock)
        try:
            data = fetch_schema_json(leader, limit=2)
        finally:
            if leader._unary is not None:
                leader._unary.close()
        assert [r["id"] for r in data["rollouts"]] == ["r0", "r1"]
        assert data["rollouts"][0]["nodes"][49]["name"] == "node-049"
        assert data["rollouts"][0]["nodes"][0]["state"] == ""  # unspecified, as --json words it
        assert servicer.calls == 1
