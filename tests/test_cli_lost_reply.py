"""The admin CLI when the leader goes away in the middle of a call (audit s39race H1, H2, M2).

A call that changes something is sent at most once; if its reply is lost after the request went
out whole, the leader may have done it: the CLI says so (exit 6) instead of "cannot reach the
leader". A leader that stops gracefully (SIGTERM: gRPC's GOAWAY, a PING, then the calls it took
are finished) gives the call under way its reply; ``--watch`` goes on across a leader restart;
Ctrl-C during ``--wait`` says the rollout goes on. Real Unix sockets, a real gRPC server, a
real leader."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from leader.cli.base import (
    EXIT_MAY_HAVE_BEEN_DONE,
    GET_SCHEMA,
    CLIError,
    Leader,
    MayHaveBeenDone,
)
from leader.cli.unary import RpcFailed, UnaryChannel, _Frames
from leader.rollout_core import Change, NodeRecord, Rollout, RolloutEvent, Scope
from leader.schema_store import RolloutMeta, SchemaStore
from tests.cluster import Cluster, child_env, command, wait_until
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


def test_a_leader_that_takes_the_call_and_never_answers_says_what_to_look_at(
    tmp_path: Path,
) -> None:
    """Review rev58a L6: a hung leader (stopped with SIGSTOP: its socket takes the connection,
    nothing answers) gave "the leader did not answer in time", neither what happened nor what
    to look at. A read-only call now says where to look (a changing one that was sent says it
    may have been done, above)."""
    sock = tmp_path / "admin.sock"
    with swallowing(sock, close=False):
        leader = Leader(sock)
        with pytest.raises(CLIError) as info:
            leader.raw(GET_SCHEMA, schema_pb2.GetSchemaRequest().SerializeToString(), timeout=0.5)
        leader.close()
    assert str(info.value) == (
        "the leader did not answer in time (is it hung? systemctl status tlsroll-leader, "
        "journalctl -u tlsroll-leader)"
    ), info.value


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


# --- a real leader: restarted under `--watch`, Ctrl-C during `--wait` ---------------------------


def store_paused_rollout(cluster: Cluster, rollout_id: str) -> None:
    """A paused enable-tls rollout of one node (not enrolled), written to the leader's store:
    it stays paused across leader restarts until it is aborted."""
    at = dt.datetime.now(dt.UTC)
    schema = SchemaStore(cluster.store_path)
    try:
        rollout = Rollout(rollout_id, Change.ENABLE_TLS, Scope.of_nodes(["n1"]), ("n1",), epoch=1)
        row = schema.create(
            rollout.with_event(RolloutEvent.START),
            [NodeRecord("n1")],
            RolloutMeta(created_at=at, started_by="admin:test", leader_node=""),
            at,
        )
        paused = row.rollout.with_event(RolloutEvent.PAUSE)
        schema.save_states(row, paused, [NodeRecord("n1")], at, "admin:test", None)
    finally:
        schema.close()


class Lines:
    """A child's output stream, read line by line in a thread."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def done(self) -> str:
        """All of it, once the child has ended (the stream is closed then)."""
        self._thread.join(WAIT)
        self._stream.close()
        return self.text()


def test_watch_goes_on_across_a_leader_restart(tmp_path: Path, loopback: Callable[[], str]) -> None:
    """`schema show --watch` follows a paused rollout; the leader stops (SIGTERM) and starts
    again under it: the watch says it waits for the leader, then that it is back, and goes on
    until the rollout is aborted (before: "no admin socket", or "unreadable reply from the
    leader", exit 1)."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        store_paused_rollout(cluster, "r-paused")
        cluster.start_leader()
        watch = subprocess.Popen(
            [*command("tlsroll", "tlsroll"), "schema", "show", "--watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
        )
        assert watch.stdout is not None and watch.stderr is not None
        out, err = Lines(watch.stdout), Lines(watch.stderr)
        try:
            wait_until(lambda: "rollout r-paused: paused" in out.text(), WAIT, "the watch")
            cluster.stop_leader()
            wait_until(
                lambda: "waiting for it to be back" in err.text() or watch.poll() is not None,
                WAIT,
                "the watch to see the leader gone",
            )
            assert watch.poll() is None, err.text()
            cluster.start_leader()
            wait_until(lambda: "the leader is back" in err.text(), WAIT, "the watch")
            aborted = cluster.cli("rollout", "abort", "r-paused")
            assert aborted.returncode == 0, aborted.stderr
            assert watch.wait(WAIT) == 0, err.text()
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(WAIT)
        assert "rollout r-paused: aborted" in out.done()
        # (gone: "no admin socket at …", or "cannot reach the leader on …" while it stops)
        away, back = err.done().splitlines()
        assert away.startswith("tlsroll: ") and str(cluster.admin_socket) in away
        assert away.endswith(": is tlsroll-leader running? - waiting for it to be back") or (
            away.endswith("(see --data-dir/--socket) - waiting for it to be back")
        )
        assert back == "tlsroll: the leader is back"


WAIT_HARNESS = """
import sys, time
from leader.cli.base import Leader
from tlsroll.cli import main
from tlsroll.v1 import schema_pb2

def retried(self, method, request, timeout=30):  # RetryRollout's reply, for the paused rollout
    return schema_pb2.RolloutView(id="r-paused")

Leader.call = retried
sleep = time.sleep
def polling(seconds):  # once it polls the real leader
    print("polling", flush=True)
    sleep(seconds)
time.sleep = polling
sys.exit(main(["rollout", "retry", "r-paused", "--wait"]))
"""


def test_ctrl_c_during_wait_says_the_rollout_goes_on(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """SIGINT while `rollout retry --wait` waits for a rollout (a paused one, polled from a
    real leader; the retry's own call is a stand-in) says the rollout goes on and how to follow
    or stop it, exit 130 (before: "tlsroll: aborted", exit 1)."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        store_paused_rollout(cluster, "r-paused")
        cluster.start_leader()
        child = subprocess.Popen(
            [sys.executable, "-c", WAIT_HARNESS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
        )
        assert child.stdout is not None and child.stderr is not None
        out, err = Lines(child.stdout), Lines(child.stderr)
        try:
            wait_until(lambda: "polling" in out.text(), WAIT, "the wait to poll")
            child.send_signal(signal.SIGINT)
            assert child.wait(WAIT) == 130, err.text()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(WAIT)
        assert "polling" in out.done()
        assert err.done() == (
            "tlsroll: stopped waiting; rollout r-paused goes on (tlsroll rollout status "
            "r-paused; to stop it: tlsroll rollout abort r-paused)\n"
        )


def test_ctrl_c_after_a_changing_request_was_sent_says_it_may_have_been_done(
    tmp_path: Path,
) -> None:
    """SIGINT while `rollout pause` waits for the reply to a request the peer has read whole:
    the leader may have done it (exit 130), not "tlsroll: aborted"."""
    sock = tmp_path / "admin.sock"
    with swallowing(sock, close=False) as taken:
        child = subprocess.Popen(
            [*command("tlsroll", "tlsroll"), "--socket", str(sock), "rollout", "pause", "r-1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        try:
            wait_until(lambda: bool(taken), WAIT, "the request")
            child.send_signal(signal.SIGINT)
            _, err = child.communicate(timeout=WAIT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(WAIT)
    assert child.returncode == 130, err
    assert err == (
        "tlsroll: error: interrupted: the leader may have done it; check with "
        "`tlsroll schema show` before repeating it\n"
    )


# --- a GOAWAY below our stream: the leader did not take the call -------------------------------


def test_goaway_frames_are_taken_out_whole_across_reads() -> None:
    """``_Frames`` hands h2 whole frames but GOAWAYs, whose last stream id it returns, however
    the bytes are cut into reads."""
    ping = bytes.fromhex("000008") + b"\x06\x00" + bytes(4) + b"12345678"
    goaway = bytes.fromhex("000008") + b"\x07\x00" + bytes(4) + bytes.fromhex("80000003") + bytes(4)
    stream = ping + goaway + ping
    for cut in range(len(stream) + 1):
        frames = _Frames()
        first, gone_first = frames.feed(stream[:cut], 16384)
        second, gone_second = frames.feed(stream[cut:], 16384)
        assert first + second == ping + ping, cut
        assert gone_first + gone_second == [3], cut  # (the reserved bit is not the id's)


@contextmanager
def turning_away(path: Path) -> Iterator[list[bytes]]:
    """An HTTP/2 peer whose first connection reads the request whole, then sends GOAWAY with
    last stream id 0 (it took none) and waits for the client to close; every later one
    answers GetSchema with one rollout ``r-again``. Yields the paths of the requests read
    whole."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(0.05)  # (to see ``stop`` soon)
    taken: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        first = True
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
                h2c.initiate_connection()
                conn.settimeout(WAIT)
                conn.sendall(h2c.data_to_send())
                ended = None
                while ended is None:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    for event in h2c.receive_data(chunk):
                        if isinstance(event, h2.events.RequestReceived):
                            taken.append(dict(event.headers)[b":path"])
                        elif isinstance(event, h2.events.StreamEnded):
                            ended = event.stream_id
                    conn.sendall(h2c.data_to_send())
                if ended is None:
                    continue
                if first:
                    first = False
                    h2c.close_connection(last_stream_id=0)
                    conn.sendall(h2c.data_to_send())
                    while conn.recv(65536):  # until the client closes (as gRPC waits)
                        pass
                    continue
                body = schema_pb2.Schema(
                    rollouts=[schema_pb2.RolloutView(id="r-again")]
                ).SerializeToString()
                h2c.send_headers(
                    ended, [(":status", "200"), ("content-type", "application/grpc+proto")]
                )
                h2c.send_data(ended, b"\x00" + len(body).to_bytes(4) + body)
                h2c.send_headers(ended, [("grpc-status", "0")], end_stream=True)
                conn.sendall(h2c.data_to_send())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield taken
    finally:
        stop.set()
        listener.close()
        thread.join(WAIT)


def test_a_call_the_stopping_leader_did_not_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GOAWAY whose last stream is below ours: the leader did nothing with the call. A
    read-only one is sent again on a new connection (and answered there); one that changes
    something is not sent again, and it is "cannot reach", not "may have been done"."""
    sock = tmp_path / "admin.sock"
    with turning_away(sock) as taken:
        leader = Leader(sock)
        request = schema_pb2.GetSchemaRequest(limit=1)
        try:
            assert leader.unary(GET_SCHEMA, request, schema_pb2.Schema).rollouts[0].id == (
                "r-again"
            )
        finally:
            leader.close()
        assert taken == [GET_SCHEMA.encode()] * 2
    capsys.readouterr()  # (a warning: the peer does not say which code it runs)
    sock.unlink()
    with turning_away(sock) as taken:
        code = main(["--socket", str(sock), "rollout", "pause", "r-1"])
        assert taken == [CONTROL.encode()]
    assert code == 1
    assert capsys.readouterr().err == (
        f"tlsroll: error: cannot reach the leader on {sock}: is tlsroll-leader running?\n"
    )


def test_a_reply_sent_whole_before_the_leader_closed_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader that answers and closes at once (it is stopping) while the CLI is still
    acknowledging what it read before the answer: the acknowledgement's write fails (the
    peer is gone), yet the reply is whole in the socket and is the call's result (CI, stop
    39: "cannot reach" for a read-only call the leader had answered). The CLI's write is held
    until the leader has closed, so the order is the same on every run."""
    sock = tmp_path / "admin.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    acking, closed = threading.Event(), threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2c.initiate_connection()
            conn.settimeout(WAIT)
            conn.sendall(h2c.data_to_send())
            ended = None
            while ended is None:
                chunk = conn.recv(65536)
                assert chunk
                for event in h2c.receive_data(chunk):
                    if isinstance(event, h2.events.StreamEnded):
                        ended = event.stream_id
            assert acking.wait(WAIT)  # the CLI read our SETTINGS and is about to answer them
            body = schema_pb2.Schema(rollouts=[schema_pb2.RolloutView(id="r-1")])
            data = body.SerializeToString()
            h2c.send_headers(
                ended, [(":status", "200"), ("content-type", "application/grpc+proto")]
            )
            h2c.send_data(ended, b"\x00" + len(data).to_bytes(4) + data)
            h2c.send_headers(ended, [("grpc-status", "0")], end_stream=True)
            conn.sendall(h2c.data_to_send())
        closed.set()

    real_flush = UnaryChannel._flush

    def held_flush(self: UnaryChannel) -> None:
        if self.sent is True and not acking.is_set():
            acking.set()
            assert closed.wait(WAIT)
        real_flush(self)

    monkeypatch.setattr(UnaryChannel, "_flush", held_flush)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        channel = UnaryChannel(str(sock))
        try:
            data = channel.call(GET_SCHEMA, schema_pb2.GetSchemaRequest().SerializeToString(), WAIT)
        finally:
            channel.close()
        assert schema_pb2.Schema.FromString(data).rollouts[0].id == "r-1"
        assert acking.is_set() and closed.is_set()  # (the order this test is about)
    finally:
        listener.close()
        thread.join(WAIT)
