"""``tlsroll schema show`` against a leader with many stored rollouts; prints figures, asserts
nothing (``make bench-schema``).

A real leader (``tlsroll init``, ``tlsroll-leader``) whose store holds ``--rollouts`` finished
enable-tls rollouts of ``--nodes`` nodes each (written to the store before it starts, as
months of history would be); then the CLI as an admin runs it, ``--runs`` times each:
``schema show`` (the active or latest rollout), ``schema show --all``, and the CLI's import
alone (``python -c 'import leader.cli'``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import NO_DEBUG, address, summary
from leader.rollout_core import Change, NodeRecord, NodeState, Rollout, RolloutEvent, Scope
from leader.schema_store import RolloutMeta, SchemaStore
from tests.cluster import Cluster, child_env, command


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


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.decode(errors="replace"))
    return times


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
            for label, args in (
                ("schema show", ["schema", "show"]),
                ("schema show --all", ["schema", "show", "--all"]),
                ("schema show --json", ["schema", "show", "--json"]),
            ):
                times = timed([*cli, *args], env, ns.runs)
                print(f"  {label:22s} {summary(times, 'ms', 1000, 0)}")
            imports = timed([sys.executable, "-c", "import leader.cli"], env, ns.runs)
            print(f"  {'import leader.cli':22s} {summary(imports, 'ms', 1000, 0)}")
            python = timed([sys.executable, "-c", "pass"], env, ns.runs)
            print(f"  {'python -c pass':22s} {summary(python, 'ms', 1000, 0)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
