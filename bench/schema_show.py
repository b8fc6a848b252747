"""``tlsroll schema show`` against a leader with many stored rollouts; prints figures, asserts
nothing (``make bench-schema``).

A real leader (``tlsroll init``, ``tlsroll-leader``) whose store holds ``--rollouts`` finished
enable-tls rollouts of ``--nodes`` nodes each (written to the store before it starts, as
months of history would be); then the CLI as an admin runs it, ``--runs`` times each:
``schema show`` (the active or latest rollout), ``schema show --all``, ``--json``, the CLI's
import alone (``python -c 'import leader.cli'``) and what ``schema show`` imports; and the
leader's part alone: the ``GetSchema`` call ``schema show`` makes (with the JSON codec,
``SchemaViewJson``), from an open channel (wall time, and the leader's CPU per call read from
/proc), so that what the leader does is told apart from what the CLI does.

The CLI is the development environment's ``tlsroll`` console script (pip's wrapper, ``from
tlsroll.cli import main``), with this source tree first on ``PYTHONPATH``: as installed from a
wheel but for the editable install's ``.pth`` line (one path more for ``site``). With
``--instructions``, and valgrind installed, it also counts the instructions of one run of
``schema show``, ``--json`` and ``python -c pass`` (callgrind): a figure the machine's load
does not move, for comparing two trees on a busy machine.

Every figure is also shown less and relative to ``python -c pass`` in the same run (wall and
CPU medians), since the machine's own speed varies through the day; on a busy machine the CPU
multiple is the steadier one. The commands run with a bytecode cache (in a
temporary ``PYTHONPYCACHEPREFIX``, filled by one untimed run of each) as from an installed
package, whose modules pip compiles at install: with ``PYTHONDONTWRITEBYTECODE`` set, as in the
development shell, a source tree's modules were compiled again on every run (about 30 ms of
``schema show``). ``--no-bytecode-cache`` measures that way instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import NO_DEBUG, address, cpu_seconds, summary
from leader.cli.base import GET_SCHEMA_JSON
from leader.cli.unary import UnaryChannel
from leader.rollout_core import Change, NodeRecord, NodeState, Rollout, RolloutEvent, Scope
from leader.schema_store import RolloutMeta, SchemaStore
from tests.cluster import Cluster, child_env, command

# What `tlsroll schema show` imports: the entry point, the command looked up as click does, and
# what it draws with (imported once the reply is in).
SCHEMA_SHOW_IMPORTS = (
    "import click; from tlsroll.cli import cli; "
    "cli.get_command(click.Context(cli), 'schema').get_command(None, 'show'); "
    "import leader.cli.draw, leader.cli.plain"
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
    machine the CPU time is the steadier figure. One untimed run first (it fills the bytecode
    cache)."""
    subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
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
    """The ``GetSchema`` call of a plain ``schema show`` (the newest rollout, JSON codec),
    ``calls`` times on one connection, made as the CLI makes it (``leader.cli.unary``): each
    call's wall time with the reply parsed, and the leader's CPU per call."""
    assert cluster.leader is not None
    pid = cluster.leader.pid
    walls = []
    with UnaryChannel(str(cluster.admin_socket)) as channel:
        request = json.dumps({"limit": 1}).encode()
        channel.call(GET_SCHEMA_JSON, request, codec="json")  # the connection, not counted
        cpu0 = cpu_seconds(pid)
        for _ in range(calls):
            t0 = time.perf_counter()
            json.loads(channel.call(GET_SCHEMA_JSON, request, codec="json"))
            walls.append(time.perf_counter() - t0)
        cpu = (cpu_seconds(pid) - cpu0) / calls
    return walls, cpu


def instructions(argv: list[str], env: dict[str, str]) -> float:
    """Instructions one run of ``argv`` executes, counted by callgrind (after a run that fills
    the bytecode cache): the same on a busy machine as on an idle one."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    counted = [line for line in done.stderr.splitlines() if "Collected :" in line]
    return float(counted[-1].rsplit(":", 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="compile every module on every run (PYTHONDONTWRITEBYTECODE, no cache)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions of one run each (valgrind's callgrind; slow)",
    )
    ns = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="tlsroll-schema-"))
    try:
        with Cluster(root / "cluster", address(990)) as cluster:
            cluster.init()
            store_history(cluster, ns.rollouts, ns.nodes)
            cluster.start_leader(NO_DEBUG)
            env = child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir), **NO_DEBUG})
            if ns.no_bytecode_cache:
                env["PYTHONDONTWRITEBYTECODE"] = "1"
                env["PYTHONPYCACHEPREFIX"] = str(root / "no-pycache")  # an empty place
            else:
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
            cli = command("tlsroll", "tlsroll")
            print(
                f"schema show: {ns.rollouts} stored rollouts of {ns.nodes} nodes each; "
                f"bytecode {'never cached' if ns.no_bytecode_cache else 'cached'}; "
                f"load average {os.getloadavg()[0]:.2f} at the start"
            )
            commands = [
                ("schema show", [*cli, "schema", "show"]),
                ("schema show --all", [*cli, "schema", "show", "--all"]),
                ("schema show --json", [*cli, "schema", "show", "--json"]),
                ("import leader.cli", [sys.executable, "-c", "import leader.cli"]),
                ("import schema show", [sys.executable, "-c", SCHEMA_SHOW_IMPORTS]),
                ("python -c pass", [sys.executable, "-c", "pass"]),
            ]
            figures = {label: timed(argv, env, ns.runs) for label, argv in commands}
            bare = statistics.median(figures["python -c pass"][0])
            bare_cpu = statistics.median(figures["python -c pass"][1])
            for label, (walls, cpus) in figures.items():
                wall = statistics.median(walls)
                relative = (
                    f"; less python -c pass {(wall - bare) * 1000:.0f} ms, "
                    f"{wall / bare:.1f}x python -c pass (CPU "
                    f"{statistics.median(cpus) / bare_cpu:.1f}x)"
                    if label != "python -c pass"
                    else ""
                )
                print(
                    f"  {label:20s} wall {summary(walls, 'ms', 1000, 0)}; "
                    f"CPU {summary(cpus, 'ms', 1000, 0)}{relative}"
                )
            if ns.instructions:
                counted = {
                    label: instructions(argv, env)
                    for label, argv in commands
                    if label in {"schema show", "schema show --json", "python -c pass"}
                }
                for label, count in counted.items():
                    ratio = (
                        f"; {count / counted['python -c pass']:.1f}x python -c pass"
                        if label != "python -c pass"
                        else ""
                    )
                    print(f"  {label:20s} {count / 1e6:.1f} M instructions (callgrind){ratio}")
            walls, cpu = rpc_alone(cluster, 20 * ns.runs)
            print(
                f"  {'GetSchema RPC alone':20s} wall {summary(walls, 'ms', 1000, 1)}; "
                f"leader CPU {cpu * 1000:.1f} ms per call"
            )
            print(f"  load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
