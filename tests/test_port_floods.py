"""Review rev58b H3: the leader's join and control ports and an agent's NodeAgent port took every
connection anyone opened: 400 idle TCP connections from one host (no TLS, no token) filled a
leader's descriptors (its limit lowered here as the review did; 16384 in the unit, as reachable
from one LAN host): `tlsroll nodes` got "the leader did not answer in time", the log filled with
asyncio's "socket.accept() out of system resource". Each gRPC port now holds at most its cap of
connections (``tlsroll.rpc.connection_cap``; one more is closed as it is accepted), and one
that has not finished its TLS handshake within ``HANDSHAKE_SECONDS`` is closed, on every gRPC
port (``HANDSHAKE`` here: the daemons' test hook ``TEST_HANDSHAKE_ENV``). A real leader and agent
as processes, real mutual TLS.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from refserver import gate as refserver_gate
from refserver.server import BODY_SECONDS_ENV
from tests.cluster import wait_until
from tests.conftest import IssuedCert, next_loopback
from tests.nodeside import cluster_of
from tests.refserver_helper import RefServer
from tests.test_viewer_limits import fd_count, out_of_descriptors
from tlsroll import rpc
from tlsroll.defaults import AGENT_PORT, CONTROL_PORT, JOIN_PORT

pytestmark = pytest.mark.timeout(240)

HANDSHAKE = 5.0
"""The leader's and the agent's TLS handshake deadline here (their test-only knob,
``tlsroll.rpc.TEST_HANDSHAKE_ENV``, for ``HANDSHAKE_SECONDS``): the silent connections are
closed in seconds, not ten (twice)."""

BODY = 3.0
"""The reference server's deadline for a request's body here (its test-only knob,
``BODY_SECONDS_ENV``, for ``refserver.gate.BODY_SECONDS``), and its lingering time after the
408 with it: the slow body is cut in seconds, not half a minute."""


def _flood(address: str, port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections to ``address:port`` that send nothing, from a few loopback
    addresses (the kernel's ephemeral ports would do; several sources as a LAN would have)."""
    sources = [next_loopback() for _ in range(4)]
    held = []
    for i in range(count):
        try:
            held.append(
                socket.create_connection(
                    (address, port), timeout=2, source_address=(sources[i % 4], 0)
                )
            )
        except OSError:
            break
    return held


def _trickle(conn: socket.socket, answer: list[tuple[bytes, float]]) -> None:
    """A byte of a request's body every half second on ``conn`` (never idle) until the server
    closes it, and what it answered meanwhile (in ``answer``: what, and when, as it came)."""
    while True:
        conn.settimeout(0.5)
        try:
            conn.sendall(b" ")
            got = conn.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return  # closed as the byte came
        except TimeoutError:
            continue
        if not got:
            return
        answer.append((got, time.monotonic()))


def _holds_its_cap(pid: int, before: int, cap: int, port: str) -> None:
    """Process ``pid`` (``before`` descriptors before the flood) took ``port``'s cap of the
    flood's connections, and not many more (a few of its own meanwhile)."""
    wait_until(
        lambda: fd_count(pid) >= before + cap - 8,
        20,
        f"{port} accepted its cap of connections",
        interval=0.2,
    )
    assert fd_count(pid) <= before + cap + 40, (port, fd_count(pid), before)


def test_a_flood_of_idle_connections_leaves_the_leader_and_the_agent_working(
    tmp_path: Path,
) -> None:
    short = {rpc.TEST_HANDSHAKE_ENV: str(HANDSHAKE)}
    with cluster_of(tmp_path, 2, env=short) as (cluster, (_node1, node2)):
        pid = cluster.leader.pid
        said = [e for e in cluster.leader.log_events() if e["event"] == "leader.test_hook"]
        assert (rpc.TEST_HANDSHAKE_ENV, HANDSHAKE) in [(e["hook"], e["value"]) for e in said]
        assert node2.agent is not None
        hooks = [e for e in node2.agent.log_events() if e["event"] == "agent.test_hook"]
        assert rpc.TEST_HANDSHAKE_ENV in [e["hook"] for e in hooks]  # (the agent's, likewise)
        logged = len(cluster.leader.log_events())
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        before = fd_count(pid)
        # Room for one port's cap and some, not for a flood held whole.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (before + rpc.JOIN_CONNECTIONS + 120, hard))
        held: list[socket.socket] = []
        try:
            held += _flood(cluster.address, JOIN_PORT, rpc.JOIN_CONNECTIONS + 200)
            _holds_its_cap(pid, before, rpc.JOIN_CONNECTIONS, "the leader's join port")
            nodes = cluster.cli("nodes", "--json")  # the admin socket answers ...
            assert nodes.returncode == 0, nodes.stderr
            # ... and the agents' heartbeats (the control port has its own cap) go on.
            assert all(n["online"] for n in json.loads(nodes.stdout)), nodes.stdout
            # Silent, they are closed at the handshake deadline (and the next ones accepted).
            assert node2.agent is not None
            agent = node2.agent.pid
            agent_before = fd_count(agent)
            held += _flood(node2.address, AGENT_PORT, rpc.AGENT_CONNECTIONS + 50)
            _holds_its_cap(agent, agent_before, rpc.AGENT_CONNECTIONS, "node2's agent port")
            assert not out_of_descriptors(cluster.leader.log_events()[logged:])
            # Past the handshake deadline the leader can reach the agent again (the flood's
            # connections closed).
            wait_until(
                lambda: cluster.cli("nodes", "--check", "--json").returncode == 0,
                3 * HANDSHAKE + 15,
                "nodes --check answers again",
                interval=1.0,
            )
        finally:
            for conn in held:
                conn.close()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        # Every port closes a connection that says nothing within the handshake deadline (the
        # control port's cap, 4096, does not fit a test's descriptors; its deadline does).
        # A lower bound on when they were closed, the deadline's promise (no load makes it come
        # sooner), read before the first connection opened: read after the floods (as it was),
        # it was later than their start by as long as the floods took, and a slow flood could
        # have made it fail.
        began = time.monotonic()
        silent = {port: _flood(cluster.address, port, 3) for port in (JOIN_PORT, CONTROL_PORT)}
        silent[AGENT_PORT] = _flood(node2.address, AGENT_PORT, 3)
        try:
            for port, conns in silent.items():
                for conn in conns:
                    conn.settimeout(HANDSHAKE + 15 - (time.monotonic() - began))
                    assert conn.recv(1) == b"", port  # closed by the daemon
            assert time.monotonic() - began >= HANDSHAKE - 1
        finally:
            for conns in silent.values():
                for conn in conns:
                    conn.close()


def test_the_test_only_handshake_deadline_only_shortens_it() -> None:
    """``TEST_HANDSHAKE_ENV`` brings a daemon's handshake deadline closer; anything else there,
    a longer one included, leaves it at ``HANDSHAKE_SECONDS``; the servers' options carry it."""
    env, deadline = rpc.TEST_HANDSHAKE_ENV, rpc.HANDSHAKE_SECONDS
    assert rpc.handshake_seconds({}) == deadline == 10.0
    assert rpc.handshake_seconds({env: "5"}) == 5.0
    assert rpc.handshake_seconds({env: "10"}) == deadline
    for bad in ("", "soon", "0", "-1", "nan", "inf", "10.5", "3600"):
        assert rpc.handshake_seconds({env: bad}) == deadline, bad
    assert ("grpc.server_handshake_timeout_ms", 10_000) in rpc.connection_cap(1)


def test_a_flood_of_half_requests_and_handshakes_leaves_the_reference_server_s_admin_working(
    tmp_path: Path, loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    """Review s69 revref H1: the reference server took every connection anyone opened on 8080
    and 8443, and held one that sent half a request head (or no TLS handshake) for as long as
    aiohttp's keep-alive (75 s) or asyncio's handshake timeout (60 s) let it. One LAN host
    filled its descriptors (the agent's unit gives it 4096; lowered here): its admin socket
    then accepted nothing, and the agent could neither freeze it nor ask its status (every
    switch of the node failed). Now the public connections have a cap the descriptors leave
    room under, and one with no whole request head within ``HEAD_SECONDS`` is closed; a body
    sent a byte at a time is cut at its deadline (``BODY`` here)."""
    address = loopback()
    cert = issue_cert(address)
    server = RefServer(
        tmp_path / "rs",
        address,
        listen=["http", "https"],
        cert_file=cert.cert_file,
        key_file=cert.key_file,
        env={BODY_SECONDS_ENV: str(BODY)},
    )
    held: list[socket.socket] = []
    trickled: list[tuple[bytes, float]] = []  # the slow body's answer, and when it came
    trickle = threading.Thread()
    try:
        server.start()
        pid = server.pid
        (warned,) = [e for e in server.log_events() if e["event"] == "test_hook.body_seconds"]
        assert warned["seconds"] == BODY, warned
        _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        cap, before = 40, fd_count(pid)
        limit = before + cap + refserver_gate.RESERVED_DESCRIPTORS
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        # A body a byte at a time, past its head: it held its place for as long as it went on.
        # (From a thread, while the flood comes: its deadline is shorter than the flood's.)
        slow = socket.create_connection((address, server.port("http")), timeout=5)
        held.append(slow)
        began = time.monotonic()  # (before its head: its body's deadline runs from later)
        slow.sendall(
            f"POST {server.app_path}entries HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        trickle = threading.Thread(target=_trickle, args=(slow, trickled), daemon=True)
        trickle.start()
        for port in (server.port("http"), server.port("https")):
            conns = _flood(address, port, 150)
            for conn in conns:
                with contextlib.suppress(OSError):  # (one refused is closed already)
                    conn.send(b"POST /" if port == server.port("http") else b"")
            held += conns
        wait_until(
            lambda: fd_count(pid) >= limit - refserver_gate.RESERVED_DESCRIPTORS - 8,
            20,
            "the reference server took its cap of connections",
            interval=0.2,
        )
        assert fd_count(pid) < limit
        # Its admin socket answers, and freezes it, while the flood holds every place.
        assert server.status()["frozen"] is False
        assert server.freeze(drain_timeout=1)["drained"] is True
        assert server.unfreeze()["frozen"] is False
        assert not out_of_descriptors(server.log_events())
        # Every one of them is closed by the server: admitted ones at the head (or handshake)
        # deadline, the rest as they were accepted; the slow body is a 408 at its deadline
        # (not sooner), then closed (after aiohttp's lingering time, ``BODY`` here).
        trickle.join(BODY + 60)
        assert not trickle.is_alive(), trickled
        answer = b"".join(got for got, _ in trickled)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert trickled[0][1] - began >= BODY, (trickled, began)  # (a lower bound: no sooner)
        for conn in held:
            conn.settimeout(refserver_gate.HEAD_SECONDS + 30 - (time.monotonic() - began))
            with contextlib.suppress(ConnectionResetError):
                assert conn.recv(1) == b""
        wait_until(
            lambda: fd_count(pid) <= before + 4, 20, "the flood's descriptors closed", interval=0.2
        )
        # And it serves again.
        assert server.request("POST", "entries", {"after": "flood"}).status == 201
    finally:
        for conn in held:
            conn.close()
        if trickle.ident is not None:  # (started)
            trickle.join(5)
        server.close()
