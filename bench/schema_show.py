"""``tlsroll schema show`` against a leader with many stored rollouts; prints figures, asserts
nothing (``make bench-schema``).

A real leader (``tlsroll init``, ``tlsroll-leader``) whose store holds ``--rollouts`` finished
enable-tls rollouts of ``--nodes`` nodes each (written to the store before it starts, as
months of history would be); then the CLI as an admin runs it, ``--runs`` times each:
``schema show`` (the active or latest rollout), ``schema show --all``, ``--json``, the CLI's
import alone (``python -c 'import leader.cli'``) and what ``schema show`` imports; and the
leader's part alone: the ``GetSchema`` call ``schema show`` makes, from an open channel (wall
time, and the leader's CPU per call read from /proc), so that what the leader does is told
apart from what the CLI does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import NO_DEBUG, address, cpu_seconds, summary
from leader.rollout_core import Change, NodeRecord, NodeState, Rollout, RolloutEvent, Scope
from leader.schema_store import RolloutMeta, SchemaStore
from tests.cluster import Cluster, child_env, command
from tlsroll.v1 import schema_pb2, schema_pb2_grpc

# What `tlsroll schema show` imports before it calls the leader: the entry point, and the
# command looked up as click does.
SCHEMA_SHOW_IMPORTS = (
    "import click; from tlsroll.cli import cli; "
    "cli.get_command(click.Context(cli), 'schema').get_command(None, 'show')"
)


def store_history(cluster: Cluster, rollouts: int, nodes: int) -> None:
    names = [f"n{i:03d}" for i in range(nodes)]
    schema = SchemaStore(cluster.store_path)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    try:
        for epoch in range(1, rollouts + 1):
            at = start + dt.timedelta(hours=epoch)
            rollout = Rollout(
                f"r{epoch:04d}", Change.ENABLE_TLS, Scope.of_nodes(names), tuple(names), epoch
            )
            row = schema.create(
                rollout.with_event(RolloutEvent.START),
                [NodeRecord(n) for n in names],
                RolloutMeta(created_at=at, started_by="admin:bench", leader_node=""),
                at,
            )
            done = [NodeRecord(n, NodeState.DONE) for n in names]
            ended = row.rollout.with_event(RolloutEvent.NODES_SETTLED)
            schema.save_states(row, ended, done, at, "engine", None)
    finally:
        schema.close()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Wall time and the command's own CPU time (user + system) of each run: on a shared
    machine the CPU time is the steadier figure."""
    walls, cpus = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), children_cpu()
        done = subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
        walls.append(time.perf_counter() - t0)
        cpus.append(children_cpu() - c0)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.decode(errors="replace"))
    return walls, cpus


def rpc_alone(cluster: Cluster, calls: int) -> tuple[list[float], float]:
    """The ``GetSchema`` call of a plain ``schema show`` (the newest rollout), ``calls`` times
    on one channel: each call's wall time, and the leader's CPU per call."""
    assert cluster.leader is not None
    pid = cluster.leader.pid
    walls = []
    with grpc.insecure_channel(f"unix:{cluster.admin_socket}") as channel:
        stub = schema_pb2_grpc.SchemaViewStub(channel)
        request = schema_pb2.GetSchemaRequest(limit=1)
        stub.GetSchema(request, timeout=30)  # the connection, outside the figures
        cpu0 = cpu_seconds(pid)
        for _ in range(calls):
            t0 = time.perf_counter()
            stub.GetSchema(request, timeout=30)
            walls.append(time.perf_counter() - t0)
        cpu = (cpu_seconds(pid) - cpu0) / calls
    return walls, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=7)
    ns = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="tlsroll-schema-"))
    try:
        with Cluster(root / "cluster", address(990)) as cluster:
            cluster.init()
            store_history(cluster, ns.rollouts, ns.nodes)
            cluster.start_leader(NO_DEBUG)
            env = child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir), **NO_DEBUG})
            cli = command("tlsroll", "tlsroll")
            print(f"schema show: {ns.rollouts} stored rollouts of {ns.nodes} nodes each")
            commands = [
                ("schema show", [*cli, "schema", "show"]),
                ("schema show --all", [*cli, "schema", "show", "--all"]),
                ("schema show --json", [*cli, "schema", "show", "--json"]),
                ("import leader.cli", [sys.executable, "-c", "import leader.cli"]),
                ("import schema show", [sys.executable, "-c", SCHEMA_SHOW_IMPORTS]),
                ("python -c pass", [sys.executable, "-c", "pass"]),
            ]
            for label, command_line in commands:
                walls, cpus = timed(command_line, env, ns.runs)
                print(
                    f"  {label:20s} wall {summary(walls, 'ms', 1000, 0)}; "
                    f"CPU {summary(cpus, 'ms', 1000, 0)}"
                )
            walls, cpu = rpc_alone(cluster, 20 * ns.runs)
            print(
                f"  {'GetSchema RPC alone':20s} wall {summary(walls, 'ms', 1000, 1)}; "
                f"leader CPU {cpu * 1000:.1f} ms per call"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
