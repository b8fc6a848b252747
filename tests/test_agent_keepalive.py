"""How an agent notices a leader that vanished, and what that costs the leader.

A leader that stops closes its connections, and its agents open new streams at once. A leader
whose host vanished (power lost, cable pulled) says nothing: the agent's kernel keeps resending
what the agent wrote. gRPC's core sets the socket's TCP_USER_TIMEOUT from the channel's
keepalive timeout whenever a keepalive time is set, so the kernel drops the connection once the
leader has left the agent's next heartbeat message unacknowledged for ``UNACKED_HEARTBEATS``
intervals; the agent's own HTTP/2 PINGs, every 2 intervals before (about a quarter of what
heartbeats cost the leader, issue 15), are a backstop every ``KEEPALIVE_PING_SECONDS`` now.

Real gRPC in child processes: one counts the PINGs an agent's channel sends on a quiet stream
(gRPC's keepalive trace logs each), one makes the leader vanish in a network namespace the
test creates (its loopback taken down: nothing is acknowledged any more) and waits for the
agent's stream to end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest

from nodeagent import leader_link
from tests.children import python_child

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

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["agent", "before"])
def test_an_agent_does_not_ping_its_leader_between_messages(
    mode: str, loopback: Callable[[], str]
) -> None:
    """Issue 15: the agent PINGed the leader every 2 intervals, and after each message of the
    leader's on a quiet connection (the bandwidth-delay probe), and each PING woke the leader's
    gRPC threads. A reply, then five quiet intervals on a stream: no PING from a channel with
    the agent's options (the trace logs keepalive and probe PINGs alike), two or more with the
    options before (which shows the count sees them)."""
    done = python_child(CHILD, loopback(), mode, "pings", trace=True)
    # The kernel's bound on unacknowledged data (TCP_USER_TIMEOUT), from the keepalive timeout:
    # 2 intervals of 1 s with the agent's options (and with the options before).
    assert f"USER_TIMEOUT {leader_link.UNACKED_HEARTBEATS * 1000}" in done.stdout, done.stdout
    quiet = done.stderr.split("QUIET ENDED")[0].splitlines()
    pings = [line for line in quiet if "CLIENT" in line and "Ping" in line]
    if mode == "agent":
        assert pings == [], "\n".join(pings[:5])
    else:
        assert len(pings) >= 2, done.stderr[-2000:]


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
