"""How an agent notices a leader that vanished, and what that costs the leader.

A leader that stops closes its connections, and its agents open new streams at once. A leader
whose host vanished (power lost, cable pulled) says nothing: the agent's kernel keeps resending
what the agent wrote. gRPC's core sets the socket's TCP_USER_TIMEOUT from the channel's
keepalive timeout whenever a keepalive time is set, so the kernel drops the connection once the
leader has left the agent's next heartbeat message unacknowledged for ``UNACKED_HEARTBEATS``
intervals. The agent's own HTTP/2 PINGs come every ``tlsroll.rpc.agent_ping_seconds``, just
before the leader's keepalive PING would be due, which they spare it (session 71, issue 15:
the leader's own PINGs cost it far more than answering the agent's).

Real gRPC in child processes: one counts the PINGs an agent's channel sends on a quiet stream
(gRPC's keepalive trace logs each), one makes the leader vanish in a network namespace the
test creates (its loopback taken down: nothing is acknowledged any more) and waits for the
agent's stream to end. A leader whose Python stopped (the process stopped, or its event loop
blocked) while its kernel still acknowledges is noticed by the answer a message asks for when
the leader said nothing for a while (``leader_link.wants_answer``): the real leader service in a
child process, the agent's real link.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from nodeagent import leader_link, nodefiles
from nodeagent.leader_link import LeaderLink, leader_channel_options
from tests.children import ROOT, python_child
from tests.leader_rig import leader_with_a_node
from tests.test_heartbeat_stream import agent_link, until
from tlsroll import rpc

# A child process: a gRPC server standing in for the leader and a channel with the
# options named by argv[2] ("agent": the agent's at a 1 s interval; "before": the PINGs every 2
# intervals that agents sent until issue 15; "none": no keepalive at all), holding a stream.
CHILD = r"""
import asyncio, contextlib, os, socket, subprocess, sys, time
import grpc
from nodeagent.leader_link import leader_channel_options

address, mode, test = sys.argv[1], sys.argv[2], sys.argv[3]
OPTIONS = {
    "agent": leader_channel_options(1),
    "before": [("grpc.keepalive_time_ms", 2000), ("grpc.keepalive_timeout_ms", 2000),
               ("grpc.http2.max_pings_without_data", 0)],
    "none": [],
}

def user_timeout(port):  # the TCP_USER_TIMEOUT (ms) of this process's socket to the server
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
        except OSError:  # the listing's own descriptor, closed by now
            continue
        sock = socket.socket(fileno=os.dup(int(fd)))
        try:
            # gRPC's sockets are dual-stack (AF_INET6, the address IPv4-mapped).
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                with contextlib.suppress(OSError):
                    if sock.getpeername()[1] == port:
                        found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
        finally:
            sock.close()
    assert len(found) == 1, found
    return found[0]

async def main():
    if test == "vanish":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    async def handler(requests, context):
        async for _ in requests:
            yield b"ok"

    server = grpc.aio.server()  # no PINGs of its own (a PING received resets the client's timer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"S": grpc.stream_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port(f"{address}:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"{address}:{port}", options=OPTIONS[mode]) as channel:
        call = channel.stream_stream("/t.T/S")()
        await call.write(b"x")
        assert await call.read() == b"ok"
        print("USER_TIMEOUT", user_timeout(port), flush=True)
        if test == "pings":  # a quiet stream, as between an agent's messages
            await asyncio.sleep(5)
            print("QUIET ENDED", file=sys.stderr, flush=True)
            await call.done_writing()
            return
        subprocess.run(["ip", "link", "set", "lo", "down"], check=True)  # the leader vanished
        started = time.monotonic()
        await call.write(b"y")  # the agent's next heartbeat message
        try:
            async with asyncio.timeout(10):
                await call.read()
            print("ANSWERED")
        except TimeoutError:
            print("STILL OPEN")
        except grpc.aio.AioRpcError as exc:
            print(f"ENDED {exc.code().name} after {time.monotonic() - started:.1f} s")
    # Said: the end now. The server's side of the stream, its loopback down, is never told the
    # stream ended, and gRPC's teardown at exit waited for it about 18 s.
    sys.stdout.flush()
    os._exit(0)

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["agent", "before"])
def test_an_agent_pings_its_leader_only_at_its_keepalive_time(
    mode: str, loopback: Callable[[], str]
) -> None:
    """Issue 15: the agent PINGed the leader after each message of the leader's on a quiet
    connection (the bandwidth-delay probe), each PING waking the leader's gRPC threads; its
    keepalive PINGs, which come before the leader's own would (``agent_ping_seconds``: 1.2 s
    at this 1 s interval), spare the leader those (session 71). A reply, then five quiet
    intervals on a stream: with the agent's options at most one PING per keepalive time (the
    trace logs keepalive and probe PINGs alike) and no probe configured; two or more with the
    options before (a PING every 2 intervals, which shows the count sees them)."""
    done = python_child(CHILD, loopback(), mode, "pings", trace=True)
    # The kernel's bound on unacknowledged data (TCP_USER_TIMEOUT), from the keepalive timeout:
    # 2 intervals of 1 s with the agent's options (and with the options before).
    assert f"USER_TIMEOUT {leader_link.UNACKED_HEARTBEATS * 1000}" in done.stdout, done.stdout
    quiet = done.stderr.split("QUIET ENDED")[0].splitlines()
    pings = [line for line in quiet if "CLIENT" in line and "Ping" in line]
    if mode == "agent":
        assert rpc.NO_BDP_PROBE in leader_channel_options(1)
        assert 1 <= len(pings) <= int(5 / rpc.agent_ping_seconds(1)) + 1, "\n".join(pings)
    else:
        assert len(pings) >= 2, done.stderr[-2000:]


async def test_an_agent_pings_by_the_leader_s_interval_once_the_leader_said_it(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 71's L: an agent timed its PINGs by its own ``heartbeat_interval``, not the
    leader's, whose keepalive they are to forestall: an agent at 1 s under a leader at 5 s
    PINGed every 1.2 s, more leader CPU than the leader's own PINGs every 8 s. The leader's
    answers say its interval (``HeartbeatResponse.interval_seconds``): the agent's next beat
    dials a channel whose PINGs are timed by it (``agent_ping_seconds(5)``), once. Session 73:
    the bound on an unanswered PING (``grpc.keepalive_timeout_ms``, the kernel's
    TCP_USER_TIMEOUT too) follows it: it stayed 2 of the agent's own intervals, and such an
    agent dropped its connection 2 s into a PING's wait of 8 s. The agent keeps the interval
    heard (``DATA/leader.serial.json``): a restarted agent's first channel is timed by it and
    made once (it was made again at every start's second beat); one kept from a leader whose
    interval changed since times it until the leader's first answer, and is kept no more
    (revsmalls). Under a leader at the agent's own interval, no channel is made again. The
    agent's real link against the Leader service on a real mTLS port; what is counted is the
    channels the link makes and their keepalive options."""
    made: list[dict[str, object]] = []
    real = grpc.aio.secure_channel

    def secure_channel(target: str, creds: Any, options: Any = None, **kw: Any) -> Any:
        made.append(dict(options or ()))
        return real(target, creds, options, **kw)

    def timed_by(intervals: list[int]) -> None:
        assert [m["grpc.keepalive_time_ms"] for m in made] == [
            int(rpc.agent_ping_seconds(n) * 1000) for n in intervals
        ], made
        assert [m["grpc.keepalive_timeout_ms"] for m in made] == [
            leader_link.UNACKED_HEARTBEATS * 1000 * n for n in intervals
        ], made

    monkeypatch.setattr(grpc.aio, "secure_channel", secure_channel)
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    assert rig.state.heartbeat_interval == 5
    await rig.server.start()
    try:
        for leader_at, wanted in ((5, [1, 5]), (1, [1])):
            rig.state.heartbeat_interval = leader_at
            (tmp_path / str(leader_at)).mkdir()
            made.clear()
            link, trust, journal = agent_link(
                tmp_path / str(leader_at), rig.node_files, leader_address, node_address
            )
            try:
                for _ in range(3):
                    await link.beat()
                timed_by(wanted)
                assert link.leader_interval == leader_at
                await link.close()
                # The agent restarted: its first channel is timed by the leader's interval.
                made.clear()
                link = LeaderLink(link.cfg, link.identity, trust, journal)
                assert link.leader_interval == leader_at
                for _ in range(3):
                    await link.beat()
                timed_by([leader_at])
                # The leader's interval changed in its config meanwhile (2 s now): the kept one
                # times the restarted agent's first channel until the leader's first answer,
                # the next beat's channel is timed by the new one, which is kept in its stead.
                await link.close()
                rig.state.heartbeat_interval = 2
                made.clear()
                link = LeaderLink(link.cfg, link.identity, trust, journal)
                for _ in range(3):
                    await link.beat()
                timed_by([leader_at, 2])
                assert nodefiles.read_leader_interval(link.cfg.data_dir) == 2
            finally:
                await link.close()
                journal.close()
    finally:
        await rig.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root (CI runs as root)")
@pytest.mark.parametrize("mode", ["agent", "none"])
def test_an_agent_notices_a_vanished_leader_at_its_next_message(mode: str) -> None:
    """The agent sends a message at least every renewal bound; when the leader has vanished
    without a word, the kernel drops the connection after ``UNACKED_HEARTBEATS`` intervals
    without an acknowledgement (the socket's TCP_USER_TIMEOUT, read from it: 2 s here), the
    stream ends and the agent's next beat opens a new one. A channel with no keepalive time
    (gRPC then sets no TCP_USER_TIMEOUT) would keep that stream for the kernel's ~15 minutes
    of retransmissions: still open after 10 s. In a network namespace of the test's own
    (``unshare --net``), its loopback taken down."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed"
    done = python_child(CHILD, "127.0.0.1", mode, "vanish", prefix=[unshare, "--net"])
    said = done.stdout.splitlines()
    if mode == "agent":
        assert said[0] == f"USER_TIMEOUT {leader_link.UNACKED_HEARTBEATS * 1000}", said
        assert said[1].startswith("ENDED UNAVAILABLE"), done.stdout + done.stderr[-2000:]
    else:  # gRPC sets no user timeout on a channel without a keepalive time
        assert said[0] == "USER_TIMEOUT 0", said
        assert said[1].startswith("STILL OPEN"), done.stdout + done.stderr[-2000:]


# A child process: the leader's real Heartbeats service (``tests.leader_rig``, heartbeat interval
# 1 s: renewal bound 4 s) on argv[2], node hb1 enrolled on argv[3], the node's files written to
# argv[1]/node, then "READY" on stdout. SIGUSR1 blocks its event loop for argv[4] seconds, or
# with "told" until a line comes on its stdin (a handler that hangs the loop: its gRPC core's
# own threads still run).
HUNG_LEADER = r"""
import asyncio, functools, signal, sys, time
from pathlib import Path
from tests.leader_rig import leader_with_a_node
from tests.private_files import write_private

async def main():
    where, address, node_address, block = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    rig = leader_with_a_node(where, address, node_address)
    rig.state.heartbeat_interval = 1
    await rig.server.start()
    files = where / "node"
    files.mkdir()
    write_private(files / "key.pem", rig.node_files[0])
    for name, pem in zip(("cert.pem", "ca.pem"), rig.node_files[1:]):
        (files / name).write_bytes(pem)
    loop = asyncio.get_running_loop()
    hang = sys.stdin.readline if block == "told" else functools.partial(time.sleep, float(block))
    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.call_soon(hang))
    print("READY", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def leader_that_hangs(
    tmp_path: Path, loopback: Callable[[], str], block: str
) -> AsyncIterator[tuple[subprocess.Popen[str], LeaderLink]]:
    """``HUNG_LEADER`` in a child process (its loop blocked ``block`` seconds at SIGUSR1, or
    with "told" until a line is written to its stdin) and the agent's real link to it, not yet
    running; both closed at the end."""
    leader_address, node_address = loopback(), loopback()
    child = subprocess.Popen(
        [sys.executable, "-c", HUNG_LEADER, str(tmp_path), leader_address, node_address, block],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    link = journal = None
    try:
        assert child.stdout is not None
        out = child.stdout

        def ready() -> str:  # log lines of the rig's set-up may come first (the leader's store
            # notes that the rig recorded the node at a clock its service then set back)
            lines = []
            for line in out:
                if line.strip() == "READY":
                    return "READY"
                lines.append(line)
            return "".join(lines)

        said = await asyncio.wait_for(asyncio.to_thread(ready), 60)
        assert said == "READY", said
        files = tmp_path / "node"
        node_files = tuple((files / n).read_bytes() for n in ("key.pem", "cert.pem", "ca.pem"))
        link, _trust, journal = agent_link(
            tmp_path, (node_files[0], node_files[1], node_files[2]), leader_address, node_address
        )
        yield child, link
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
        if link is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.close(), 5)
        if journal is not None:
            journal.close()


@pytest.mark.parametrize("hang", ["stopped", "loop blocked"])
async def test_an_agent_notices_a_leader_whose_python_stopped_within_its_bound(
    hang: str, tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Audit 2 of session 33, L3: a leader whose Python stops answering while its kernel still
    acknowledges what the agent writes (the process stopped: SIGSTOP) and, for an event loop
    that hangs, its gRPC core still answers PINGs, left the agent's renewal stream up: routine
    messages asked for no answer, and the agent noticed only at its PING every
    300 s then (a stopped process) or when the stream's flow-control window
    filled (a blocked loop: many minutes). A message on a stream where the leader said nothing
    for ``UNHEARD_BOUNDS`` renewal bounds asks for an answer now, and a leader that has said
    nothing a renewal bound later is taken for gone: within about 3 bounds (12 s at this 1 s
    interval; 25 s allowed for a busy machine) the agent logs
    ``heartbeat.failed`` once and drops the stream; a blocked loop stays blocked while two
    more of the agent's beats each open a stream it leaves unanswered (no second
    ``heartbeat.failed``); once the leader answers again, a new stream says ``heartbeat.ok``.
    A real leader service in a child process, the agent's real link here."""
    async with leader_that_hangs(tmp_path, loopback, "told") as (child, link):
        with capture_logs() as logs:
            task = asyncio.create_task(link.run())
            try:
                await until(lambda: link.healthy is True, "heartbeat.ok")
                await asyncio.sleep(2)  # the stream in renewal mode, its first answer had
                assert link._stream is not None and link._stream.renew == 4
                child.send_signal(signal.SIGSTOP if hang == "stopped" else signal.SIGUSR1)
                hung = time.monotonic()
                await until(lambda: link.healthy is False, "heartbeat.failed", 25)
                noticed = time.monotonic() - hung
                if hang == "stopped":
                    child.send_signal(signal.SIGCONT)
                else:  # (blocked 30 s before, most of it after the notice: now on the test's word)
                    opened: list[object] = []  # (held: an id could be used again)

                    def third_stream() -> bool:  # the second went unanswered too
                        now = link._stream
                        if now is not None and all(s is not now for s in opened):
                            opened.append(now)
                        return len(opened) >= 3

                    await until(third_stream, "two more streams the blocked leader left", 30)
                    assert link.healthy is False
                    assert child.stdin is not None
                    child.stdin.write("go on\n")
                    child.stdin.flush()
                await until(lambda: link.healthy is True, "heartbeat.ok again", 45)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        failed = [e for e in logs if e["event"] == "heartbeat.failed"]
        assert len(failed) == 1, (noticed, logs)
        assert failed[0]["code"] == "DEADLINE_EXCEEDED", failed


async def test_a_leader_slow_for_a_moment_keeps_its_streams(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review 1 of session 34, L1: the message that asks to hear from a silent leader waited an
    interval for the answer, so a leader whose event loop (or store) was busy for longer than
    an interval had healthy streams dropped (``heartbeat.failed``, the node briefly offline,
    every agent reconnecting onto a leader already slow). Now the answer is not waited for; only
    a leader that says nothing for a renewal bound after it is taken for gone. A real leader
    service in a child process (at a 1 s interval: a renewal bound of 4 s) whose loop is
    blocked from half a second before each of two such messages is due until 1.5 s after it
    was sent (its answer held longer than an interval): not one ``heartbeat.failed``, the one
    stream throughout, and each answer heard once the loop runs again. (It blocked the loop
    1.5 s of every 3 s for 30 s before session 65, which such a message met only by chance.)"""
    async with leader_that_hangs(tmp_path, loopback, "told") as (child, link):
        assert child.stdin is not None
        stdin = child.stdin
        loop = asyncio.get_running_loop()
        with capture_logs() as logs:
            task = asyncio.create_task(link.run())
            try:
                await until(lambda: link.healthy is True, "heartbeat.ok")
                await asyncio.sleep(2)  # the stream in renewal mode
                stream = link._stream
                assert stream is not None and stream.renew == 4
                for n in range(2):
                    # Half a second before the link may send the message that asks (at its
                    # first beat from then on, within an interval), the leader's loop blocks.
                    await until(
                        lambda: leader_link.wants_answer(
                            stream.heard, loop.time() + 0.5, 1, stream.renew
                        ),
                        f"message {n + 1} that asks to hear from the leader due",
                        15,
                    )
                    child.send_signal(signal.SIGUSR1)
                    await until(
                        lambda: stream.probe_at is not None or link._stream is not stream,
                        f"message {n + 1} sent",
                        5,
                    )
                    dropped = [e for e in logs if e["event"] == "heartbeat.failed"]
                    assert link._stream is stream, dropped  # (the link waited for the answer)
                    sent = stream.probe_at
                    assert sent is not None

                    def answered(sent: float = sent) -> bool:
                        return stream.heard >= sent

                    await asyncio.sleep(1.5)  # its answer held: longer than an interval
                    assert link._stream is stream and link.healthy is True
                    stdin.write("go on\n")
                    stdin.flush()
                    await until(answered, f"the answer to message {n + 1}", 5)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        failed = [e for e in logs if e["event"] == "heartbeat.failed"]
        assert failed == [], failed
        assert link._stream is stream  # the one stream throughout
