"""Review rev58b H3: the leader's join and control ports and an agent's NodeAgent port took every
connection anyone opened: 400 idle TCP connections from one host (no TLS, no token) filled a
leader's descriptors (its limit lowered here as the review did; 16384 in the unit, as reachable
from one LAN host): `tlsroll nodes` got "the leader did not answer in time", the log filled with
asyncio's "socket.accept() out of system resource". Each gRPC port now holds at most its cap of
connections (``tlsroll.rpc.connection_cap``; one more is closed as it is accepted), and one
that has not finished its TLS handshake within ``HANDSHAKE_SECONDS`` is closed, on every gRPC
port. A real leader and agent as processes, real mutual TLS.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from refserver import gate as refserver_gate
from tests.cluster import wait_until
from tests.conftest import IssuedCert, next_loopback
from tests.nodeside import cluster_of
from tests.refserver_helper import RefServer
from tests.test_viewer_limits import fd_count, out_of_descriptors
from tlsroll import rpc
from tlsroll.defaults import AGENT_PORT, CONTROL_PORT, JOIN_PORT

pytestmark = pytest.mark.timeout(240)


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
    with cluster_of(tmp_path, 2) as (cluster, (_node1, node2)):
        pid = cluster.leader.pid
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
                3 * rpc.HANDSHAKE_SECONDS + 15,
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
                    conn.settimeout(rpc.HANDSHAKE_SECONDS + 15 - (time.monotonic() - began))
                    assert conn.recv(1) == b"", port  # closed by the daemon
            assert time.monotonic() - began >= rpc.HANDSHAKE_SECONDS - 1
        finally:
            for conns in silent.values():
                for conn in conns:
                    conn.close()


def test_a_flood_of_half_requests_and_handshakes_leaves_the_reference_server_s_admin_working(
    tmp_path: Path, loopback: Callable[[], str], issue_cert: Callable[..., IssuedCert]
) -> None:
    """Review s69 revref H1: the reference server took every connection anyone opened on 8080
    and 8443, and held one that sent half a request head (or no TLS handshake) for as long as
    aiohttp's keep-alive (75 s) or asyncio's handshake timeout (60 s) let it. One LAN host
    filled its descriptors (the agent's unit gives it 4096; lowered here): its admin socket
    then accepted nothing, and the agent could neither freeze it nor ask its status (every
    switch of the node failed). Now the public connections have a cap the descriptors leave
    room under, and one with no whole request head within ``HEAD_SECONDS`` is closed."""
    address = loopback()
    cert = issue_cert(address)
    server = RefServer(
        tmp_path / "rs",
        address,
        listen=["http", "https"],
        cert_file=cert.cert_file,
        key_file=cert.key_file,
    )
    held: list[socket.socket] = []
    try:
        server.start()
        pid = server.pid
        _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        cap, before = 40, fd_count(pid)
        limit = before + cap + refserver_gate.RESERVED_DESCRIPTORS
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        # A body a byte at a time, past its head: it held its place for as long as it went on.
        slow = socket.create_connection((address, server.port("http")), timeout=5)
        held.append(slow)
        slow.sendall(
            f"POST {server.app_path}entries HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        began = time.monotonic()
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
        # deadline, the rest as they were accepted; the slow body is a 408 at its deadline,
        # then closed (aiohttp's lingering time: 10 s).
        answer = b""
        while True:
            slow.settimeout(1.0)
            try:
                slow.sendall(b" ")  # (a byte every second: never idle)
                got = slow.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                break  # closed as the byte came
            except TimeoutError:
                assert time.monotonic() - began < refserver_gate.BODY_SECONDS + 60, answer
                continue
            if not got:
                break
            answer += got
        assert answer.startswith(b"HTTP/1.1 408 "), answer
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
        server.close()
