"""The admin CLI when the leader goes away in the middle of a call (audit s39race H1, H2, M2).

A call that changes something is sent at most once; if its reply is lost after the request went
out whole, the leader may have done it: the CLI says so (exit 6) instead of "cannot reach the
leader". A leader that stops gracefully (SIGTERM: gRPC's GOAWAY, a PING, then the calls it took
are finished) gives the call under way its reply; ``--watch`` goes on across a leader restart;
Ctrl-C during ``--wait`` says the rollout goes on. Real Unix sockets, a real gRPC server, a
real leader."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from leader.cli.base import EXIT_MAY_HAVE_BEEN_DONE, GET_SCHEMA, Leader, MayHaveBeenDone
from leader.cli.unary import RpcFailed, UnaryChannel
from tlsroll.cli import main
from tlsroll.v1 import admin_pb2, schema_pb2, schema_pb2_grpc

WAIT = 20.0  # the bound of every wait here (a test never needs it on a healthy machine)

CONTROL = "/tlsroll.v1.Admin/ControlRollout"

# --- a peer that takes the request and never answers --------------------------------------------


@contextmanager
def swallowing(path: Path, *, close: bool) -> Iterator[list[bytes]]:
    """A Unix-socket HTTP/2 peer that reads each connection's request whole (h2, server side)
    and then closes the connection without a reply (``close``), or keeps it open unanswered.
    Yields the paths of the requests it read whole."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(0.05)  # (to see ``stop`` soon)
    taken: list[bytes] = []
    kept: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2c.initiate_connection()
            conn.sendall(h2c.data_to_send())
            conn.settimeout(WAIT)
            path_of: dict[int, bytes] = {}
            done = False
            while not done:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                for event in h2c.receive_data(chunk):
                    if isinstance(event, h2.events.RequestReceived):
                        path_of[event.stream_id] = dict(event.headers)[b":path"]
                    elif isinstance(event, h2.events.StreamEnded):
                        taken.append(path_of[event.stream_id])
                        done = True
                conn.sendall(h2c.data_to_send())
            if close:
                conn.close()
            else:
                kept.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield taken
    finally:
        stop.set()
        listener.close()
        for conn in kept:
            conn.close()
        thread.join(WAIT)


def pause_request() -> bytes:
    return admin_pb2.ControlRolloutRequest(
        rollout_id="r-1", action=admin_pb2.ROLLOUT_ACTION_PAUSE
    ).SerializeToString()


def test_a_changing_call_whose_reply_is_lost_after_it_was_sent_may_have_been_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The peer reads the whole request, then closes: `rollout pause` says it may have been
    done and where to look (exit 6), not "cannot reach the leader"; so does a reply that does
    not come in time. The request went out once."""
    sock = tmp_path / "admin.sock"
    with swallowing(sock, close=True) as taken:
        code = main(["--socket", str(sock), "rollout", "pause", "r-1"])
        assert taken == [CONTROL.encode()]  # once, not again on a new connection
    err = capsys.readouterr().err
    assert code == EXIT_MAY_HAVE_BEEN_DONE, err
    assert err == (
        "tlsroll: error: the connection to the leader was lost after the request was sent: it "
        "may have been done; check with `tlsroll schema show` before repeating it\n"
    )

    sock.unlink()
    with swallowing(sock, close=False) as taken:
        leader = Leader(sock)
        with pytest.raises(MayHaveBeenDone) as info:
            leader.raw(CONTROL, pause_request(), timeout=0.5, once=True)
        leader.close()
        assert taken == [CONTROL.encode()]
    assert info.value.exit_code == EXIT_MAY_HAVE_BEEN_DONE
    assert str(info.value.message).startswith(
        "the leader did not answer in time after the request was sent: it may have been done;"
    )


def test_a_read_only_call_or_no_leader_at_all_is_cannot_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the request is sent (no socket), or for a call that changes nothing, the lost
    connection is what it was: "cannot reach the leader" (exit 1)."""
    sock = tmp_path / "admin.sock"
    with swallowing(sock, close=True) as taken:
        code = main(["--socket", str(sock), "schema", "show", "--json"])
        assert taken  # read whole, and lost
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"tlsroll: error: cannot reach the leader on {sock}: is tlsroll-leader running?\n"

    # a socket file with nobody behind it: the connection fails before anything is sent
    sock.unlink()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()
    code = main(["--socket", str(sock), "rollout", "pause", "r-1"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"tlsroll: error: cannot reach the leader on {sock}: is tlsroll-leader running?\n"

    sock.unlink()  # no socket at all
    code = main(["--socket", str(sock), "rollout", "pause", "r-1"])
    assert code == 1
    assert "no admin socket at" in capsys.readouterr().err


# --- a gRPC server stopping gracefully under a call ---------------------------------------------


class _Held(schema_pb2_grpc.SchemaViewServicer):
    """Answers GetSchema once ``release`` is set (an asyncio event of the server's loop)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release: asyncio.Event | None = None

    async def GetSchema(
        self, request: schema_pb2.GetSchemaRequest, context: Any
    ) -> schema_pb2.Schema:
        assert self.release is not None
        self.entered.set()
        await self.release.wait()
        return schema_pb2.Schema(rollouts=[schema_pb2.RolloutView(id="r-held")])


def test_a_leader_stopping_gracefully_finishes_the_call_under_way(tmp_path: Path) -> None:
    """grpc.aio's ``server.stop(grace)`` (the leader's SIGTERM) sends GOAWAY and a PING, and
    finishes the call it took: the CLI's client gets that reply (h2 alone closed at the GOAWAY
    and raised at the PING: "unreadable reply from the leader: Invalid input
    ConnectionInputs.RECV_PING in state ConnectionState.CLOSED"), and its next call goes to a
    new connection."""
    sock = tmp_path / "grpc.sock"
    servicer = _Held()
    loop = asyncio.new_event_loop()
    server_thread = threading.Thread(target=loop.run_forever, daemon=True)
    server_thread.start()

    async def start() -> grpc.aio.Server:
        servicer.release = asyncio.Event()
        server = grpc.aio.server()
        schema_pb2_grpc.add_SchemaViewServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(WAIT)

    channel = UnaryChannel(str(sock))
    result: dict[str, Any] = {}

    def call() -> None:
        request = schema_pb2.GetSchemaRequest(limit=1).SerializeToString()
        try:
            result["reply"] = schema_pb2.Schema.FromString(channel.call(GET_SCHEMA, request, WAIT))
        except RpcFailed as exc:
            result["error"] = exc

    client = threading.Thread(target=call, daemon=True)
    client.start()
    try:
        assert servicer.entered.wait(WAIT)
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=WAIT), loop)
        # the client has read the GOAWAY (or, before the change, failed on it)
        deadline = time.monotonic() + WAIT
        while not channel._gone and client.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert servicer.release is not None
        loop.call_soon_threadsafe(servicer.release.set)
        client.join(WAIT)
        stopping.result(WAIT)
    finally:
        if servicer.release is not None:
            loop.call_soon_threadsafe(servicer.release.set)
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        server_thread.join(WAIT)
        loop.close()
        channel.close()
    assert "error" not in result, result["error"]
    assert [r.id for r in result["reply"].rollouts] == ["r-held"]
    assert channel._gone  # it saw the GOAWAY: the next call opens a new connection
