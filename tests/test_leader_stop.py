"""The leader's graceful stop (``systemctl restart tlsroll-leader``: SIGTERM) under admin calls
(review s39rev1 M1, M2, M3): a call in flight gets its answer, with the agents still heard; a
caller that comes during the stop is refused before anything is sent ("cannot reach"); a call
that gRPC itself cuts short when the grace runs out "may have been done", never "the leader
cannot do it now". Real Unix sockets and gRPC servers, a real leader and agent; an admin
method is held in flight by ``tests/held_leader.py`` (no sleep)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader.cli.base import EXIT_MAY_HAVE_BEEN_DONE, Leader, MayHaveBeenDone
from tests.cluster import Cluster, child_env, command, wait_until
from tests.nodeside import cluster_of
from tlsroll.v1 import admin_pb2, admin_pb2_grpc, schema_pb2

WAIT = 30.0  # the bound of every wait here (a test never needs it on a healthy machine)
HELD_LEADER = Path(__file__).with_name("held_leader.py")


# --- M1: gRPC's own "Cancelling all calls" when the grace runs out ---------------------------


class _Unanswered(admin_pb2_grpc.AdminServicer):
    """ControlRollout that never answers within the server's grace."""

    def __init__(self) -> None:
        self.entered = threading.Event()

    async def ControlRollout(self, request: Any, context: Any) -> schema_pb2.RolloutView:
        self.entered.set()
        await asyncio.sleep(WAIT * 4)  # cancelled by the server's stop
        return schema_pb2.RolloutView()


def test_a_changing_call_cut_short_when_the_stop_grace_runs_out_may_have_been_done(
    tmp_path: Path,
) -> None:
    """grpc.aio's ``server.stop(grace)`` cancels the calls still running at the grace's end
    with UNAVAILABLE "Cancelling all calls" (its own status, after its GOAWAY). Before, the
    CLI took it for the leader's refusal ("the leader cannot do it now: Cancelling all calls",
    exit 1) though the change may have been made; now it may have been done (exit 6)."""
    sock = tmp_path / "admin.sock"
    servicer = _Unanswered()  # type: ignore[abstract]  # only the call under test
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(WAIT)
    request = admin_pb2.ControlRolloutRequest(
        rollout_id="r-1", action=admin_pb2.ROLLOUT_ACTION_PAUSE
    ).SerializeToString()
    result: dict[str, BaseException | str] = {}

    def call() -> None:
        leader = Leader(sock)
        try:
            leader.raw("/tlsroll.v1.Admin/ControlRollout", request, WAIT, once=True)
            result["outcome"] = "answered"
        except BaseException as exc:
            result["outcome"] = exc
        finally:
            leader.close()

    client = threading.Thread(target=call, daemon=True)
    client.start()
    try:
        assert servicer.entered.wait(WAIT)
        # a short grace: the held call outlives it and gRPC cancels it
        asyncio.run_coroutine_threadsafe(server.stop(grace=0.2), loop).result(WAIT)
        client.join(WAIT)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()
    outcome = result["outcome"]
    assert isinstance(outcome, MayHaveBeenDone), repr(outcome)
    assert outcome.exit_code == EXIT_MAY_HAVE_BEEN_DONE
    assert "may have been done" in outcome.message


# --- a real leader with an admin call held in flight -----------------------------------------


@contextmanager
def held_leader(cluster: Cluster, tmp_path: Path, methods: str) -> Iterator[Callable[[], object]]:
    """Restart ``cluster``'s leader as ``tests/held_leader.py`` holding ``methods``; yields
    ``release``. The leader is started again as itself afterwards."""
    mark, release = tmp_path / "held.mark", tmp_path / "held.release"
    default = cluster.leader.argv
    if cluster.leader.running:
        cluster.stop_leader()
    cluster.leader.argv = [sys.executable, str(HELD_LEADER), "--config", str(cluster.config_path)]
    cluster.start_leader(
        {"HELD_METHODS": methods, "HELD_MARK": str(mark), "HELD_RELEASE": str(release)}
    )
    try:
        yield lambda: release.write_text("go")
    finally:
        release.write_text("go")
        cluster.leader.argv = default


def in_flight(cluster: Cluster, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``tlsroll ARGS`` started; returns once its call is held in the leader's handler."""
    cli = subprocess.Popen(
        [*command("tlsroll", "tlsroll"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
    )
    wait_until((tmp_path / "held.mark").exists, WAIT, "the call in the handler")
    return cli


def sigterm_and_wait_for_stopping(cluster: Cluster) -> None:
    cluster.leader.send_signal(signal.SIGTERM)
    wait_until(
        lambda: any(e.get("event") == "leader.stopping" for e in cluster.leader.log_events()),
        WAIT,
        "the leader's stop",
    )


def admin_server_listens(pid: int) -> bool:
    """Whether the leader ``pid``'s gRPC admin server still listens on its abstract socket
    (``leader.admin_socket``: ``@tlsroll-admin-PID-…``), from ``/proc/net/unix`` (a listening
    socket's flags hold ``__SO_ACCEPTCON``, 0x10000)."""
    prefix = f"@tlsroll-admin-{pid}-"
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith(prefix) and int(fields[3], 16) & 0x10000:
            return True
    return False


@pytest.mark.timeout(240)  # a leader and an agent up (a minute on a busy machine), 2 restarts
def test_a_rollout_start_in_flight_at_a_restart_finds_its_nodes_online_and_is_answered(
    tmp_path: Path,
) -> None:
    """Review M2: `rollout start` in flight when the leader gets SIGTERM. Before, the stop
    ended the agents' heartbeat streams beside the admin server's graceful stop, so the start
    found every node offline ("offline: node1 (bring the agent up …)", exit 1). Now the admin
    calls finish first, with the agents still heard: the CLI gets its answer (exit 0) and the
    rollout is there after the restart."""
    password = tmp_path / "password"
    password.write_text("a-password-for-the-practice-run\n")
    os.chmod(password, 0o600)
    with cluster_of(tmp_path, 1) as (cluster, _nodes):
        with held_leader(cluster, tmp_path, "StartRollout") as release:
            cluster.wait_for_nodes_online(["node1"])
            cli = in_flight(
                cluster,
                tmp_path,
                *("rollout", "start", "--scope", "cluster", "--password-file", str(password)),
                "--yes",
            )
            sigterm_and_wait_for_stopping(cluster)
            release()
            out, err = cli.communicate(timeout=WAIT * 3)
            assert cli.returncode == 0, err
            assert cluster.leader.proc is not None
            assert cluster.leader.proc.wait(WAIT * 2) == 0
        cluster.start_leader()
        shown = cluster.cli("schema", "show", "--json")
        assert shown.returncode == 0, shown.stderr
        rollouts = json.loads(shown.stdout)["rollouts"]
        assert len(rollouts) == 1 and rollouts[0]["id"] in out, (rollouts, out)


@pytest.mark.timeout(180)
def test_a_brake_sent_during_the_stop_is_refused_unsent_and_the_call_in_flight_is_answered(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review M3: during the stop's grace the admin socket's relay still accepted connections
    while gRPC's listener was shut, so a brake (`token revoke`, sent without the contract check
    before it) went out and was lost: "may have been done" (exit 6) though the leader never
    received it. Now the relay accepts no one once the stop begins: "cannot reach the leader"
    (exit 1), nothing done. The token created by the call in flight is there after the
    restart, and the one the brake named is not revoked."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        made = cluster.cli("token", "create", "--node", "kept", "--address", loopback())
        assert made.returncode == 0, made.stderr
        listed = cluster.cli("token", "list", "--json")
        [kept] = [t["id"] for t in json.loads(listed.stdout)]
        with held_leader(cluster, tmp_path, "CreateToken") as release:
            first = in_flight(
                cluster, tmp_path, "token", "create", "--node", "first", "--address", loopback()
            )
            assert cluster.leader.proc is not None
            pid = cluster.leader.proc.pid
            assert admin_server_listens(pid)
            sigterm_and_wait_for_stopping(cluster)
            # gRPC's own listener is shut at once by its graceful stop (the call in flight
            # goes on): a caller now
            wait_until(lambda: not admin_server_listens(pid), WAIT, "the admin server's stop")
            brake = cluster.cli("token", "revoke", kept)
            release()
            _out, err = first.communicate(timeout=WAIT * 2)
            assert cluster.leader.proc.wait(WAIT * 2) == 0
        assert brake.returncode == 1, brake.stderr
        assert "cannot reach the leader" in brake.stderr, brake.stderr
        assert first.returncode == 0, err
        cluster.start_leader()
        listed = cluster.cli("token", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        tokens = {t["node_name"]: t for t in json.loads(listed.stdout)}
        assert sorted(tokens) == ["first", "kept"], listed.stdout
        assert tokens["kept"]["revoked"] is False
