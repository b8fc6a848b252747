"""``bench.rollout`` runs the daemons from the tree's modules compiled once before its runs, as
from an installed package (issue 15, session 30): with ``PYTHONDONTWRITEBYTECODE`` set, as in
the development shell, each daemon compiled tlsroll's own modules again at each start and at
each later import, the first node's certificate code and bootstrap service among them (on the
way to the rollout's first switch), which no installed agent does."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import rollout


def test_the_bench_compiles_the_tree_s_packages_where_python_reads_them(tmp_path: Path) -> None:
    """``cache_bytecode`` writes each module's bytecode where the import system looks for it,
    and a child with ``PYTHONDONTWRITEBYTECODE`` set (which stops writing, not reading) loads
    it: the package's sources are not compiled again (2 of them without the cache)."""
    package = tmp_path / "benchpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "mod.py"
    module.write_text("VALUE = 1\n")
    assert rollout.cache_bytecode(tmp_path, ("benchpkg",))
    cached = Path(importlib.util.cache_from_source(str(module)))
    assert cached.is_file()
    probe = (  # counts the package's modules the import system compiles from source
        "compiled = []\n"
        "import importlib._bootstrap_external as ext\n"
        "real_code = ext.SourceLoader.source_to_code\n"
        "def source_to_code(self, data, path, *a, **k):\n"
        "    compiled.append(str(path))\n"
        "    return real_code(self, data, path, *a, **k)\n"
        "ext.SourceLoader.source_to_code = source_to_code\n"
        "import benchpkg.mod\n"
        "print(sum('benchpkg' in c for c in compiled))\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["0"]


def test_the_packages_the_bench_compiles_are_the_tree_s() -> None:
    tree = Path(rollout.__file__).resolve().parents[1]
    assert all((tree / name / "__init__.py").is_file() for name in rollout.PACKAGES)


def test_a_restart_window_runs_from_the_old_server_s_stopping_to_the_new_one_s_start(
    tmp_path: Path,
) -> None:
    """``--restart-cpu`` reads each restart from the reference server's log lines: the old
    process's ``server.stopping`` (in one file) to the next ``server.started`` (in another, the
    agent's); a first start, with no stopping before it, is no restart."""
    from bench.common import restart_windows

    first, second = tmp_path / "first.log", tmp_path / "second.log"
    first.write_text(
        '{"event": "server.started", "timestamp": "2026-12-04T10:00:00.000000Z"}\n'
        '{"event": "server.stopping", "timestamp": "2026-12-04T10:00:05.000000Z"}\n'
        "not json\n"
        '{"event": "server.stopped", "timestamp": "2026-12-04T10:00:05.010000Z"}\n'
    )
    second.write_text('{"event": "server.started", "timestamp": "2026-12-04T10:00:05.400000Z"}\n')
    ((start, end),) = restart_windows(second, first)
    assert round(end - start, 3) == 0.4
    assert restart_windows(first) == []


def test_cpu_by_kind_counts_only_the_bench_s_own_processes_live(tmp_path: Path) -> None:
    """Sampled for real: a child of the bench that burns CPU counts under its kind, a process
    that is not the bench's descendant (here: pid 1) does not, and the bench's own process
    counts as "bench" without the sampler's thread."""
    from bench.common import CpuByKind

    burner = (
        "import time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\n"
        "time.sleep(0.3)\n"
    )
    with CpuByKind() as sampler:
        start = time.time()
        subprocess.run(
            [sys.executable, "-c", "# refserver\n" + burner],
            check=True,
        )
        end = time.time()
    assert all(sampler.ours[k] for k in sampler.series)
    assert not any(pid == 1 for pid, _ in sampler.series)
    used = sampler.in_window(start, end)
    assert used.get("reference server", 0.0) >= 0.2, used


def test_cpu_by_kind_counts_a_process_begun_inside_a_window_from_zero() -> None:
    """A process's CPU inside a window: its last sample by the window's end less its last one
    by its start, or all of it if it began inside (the restarted server's start); processes
    of no benchmark kind are not counted."""
    from bench.common import CpuByKind, process_kind

    assert process_kind(b"python\0-P\0-m\0refserver\0--config\0x") == "reference server"
    assert process_kind(b"python\0-c\0from nodeagent import cryptoworker_child") == "crypto worker"
    assert process_kind(b"python\0/venv/bin/tlsroll-agent\0--config\0/tmp/b/a.toml") == "agent"
    assert process_kind(b"python\0-m\0nodeagent.daemon\0--config\0a.toml") == "agent"
    # a path under the bench's directory is no program's name
    assert (
        process_kind(b"python\0/venv/bin/tlsroll-leader\0--config\0/tmp/tlsroll-bench-x/l.toml")
        == "leader"
    )
    assert process_kind(b"python\0-m\0bench.rollout\0--nodes\0003") == "bench"
    assert process_kind(b"/usr/bin/sshd") is None
    sampler = CpuByKind()
    sampler.kinds = {(1, 7): "reference server", (2, 7): "agent", (3, 7): None}
    sampler.series = {
        (1, 7): [(10.0, 0), (10.5, 30)],  # began after 9.9: all 30 ticks
        (2, 7): [(9.0, 100), (10.2, 104), (12.0, 200)],
        (3, 7): [(9.0, 0), (10.5, 50)],
    }
    sampler.span = (9.0, 12.0)
    assert sampler.covers(9.9, 10.6) and not sampler.covers(8.0, 10.6)
    used = sampler.in_window(9.9, 10.6)
    assert used == {
        "reference server": 30 / os.sysconf("SC_CLK_TCK"),
        "agent": 4 / os.sysconf("SC_CLK_TCK"),
    }


def test_cpu_by_kind_counts_one_node_s_processes_and_their_children_apart() -> None:
    """Issue 15 (session 70): a managed restart's window, split by node: the restarting
    node's agent and its children (its crypto worker, the server it starts) count as "(this
    node)", another node's agent and crypto worker under their plain kind, so that what the
    agent spends beside its own restart is told from the next node's preparation."""
    from bench.common import THIS_NODE, CpuByKind

    sampler = CpuByKind()
    tick = os.sysconf("SC_CLK_TCK")
    sampler.kinds = {
        (10, 1): "agent",  # this node's agent
        (11, 1): "crypto worker",  # its child
        (12, 1): "reference server",  # the server it started, its child too
        (20, 1): "agent",  # another node's
        (21, 1): "crypto worker",
    }
    sampler.parents = {(10, 1): 5, (11, 1): 10, (12, 1): 10, (20, 1): 5, (21, 1): 20}
    sampler.series = {key: [(9.0, 0), (11.0, 10)] for key in sampler.kinds}
    sampler.span = (9.0, 11.0)
    assert sampler.in_window(9.5, 11.0, mine=frozenset({10})) == {
        "agent" + THIS_NODE: 10 / tick,
        "crypto worker" + THIS_NODE: 10 / tick,
        "reference server" + THIS_NODE: 10 / tick,
        "agent": 10 / tick,
        "crypto worker": 10 / tick,
    }
    assert sampler.in_window(9.5, 11.0) == {
        "agent": 20 / tick,
        "crypto worker": 20 / tick,
        "reference server": 10 / tick,
    }


def test_the_bare_https_restart_takes_a_switched_node_s_files(tmp_path: Path) -> None:
    """Session 70: the bare restart "as after the switch" runs with the files the node's
    server config names once the agent rewrote it (certificate, key, client CA, verifier),
    and nothing else of that config (its address, ports and data dir are the bench's own)."""
    from bench.rollout import switched_files

    config = tmp_path / "refserver.toml"
    config.write_text(
        "[server]\n"
        'address = "127.0.0.9"\nlisten = ["https"]\ndata_dir = "/x/data"\n'
        'cert_file = "/x/c.pem"\nkey_file = "/x/k.pem"\nclient_ca_file = "/x/ca.pem"\n'
        'auth_verifier_file = "/x/auth.json"\n'
    )
    node = SimpleNamespace(server=SimpleNamespace(config_path=config))
    assert switched_files(node) == {  # type: ignore[arg-type]
        "cert_file": "/x/c.pem",
        "key_file": "/x/k.pem",
        "client_ca_file": "/x/ca.pem",
        "auth_verifier_file": "/x/auth.json",
    }


def test_the_phase_split_reads_each_event_s_times_from_a_daemon_s_json_log(tmp_path: Path) -> None:
    """``switch_phases`` reads its marks from the daemons' JSON logs: each event's times in the
    log's order, only from lines whose fields match, past lines that are not JSON or lack a
    field; a log that is missing gives none."""
    log = tmp_path / "agent.log"
    lines = [
        '{"event": "txn.started", "kind": "switch", "timestamp": "2026-12-05T01:59:02.117357Z"}',
        "not json",
        '{"event": "txn.started", "kind": "rollback", "timestamp": "2026-12-05T01:59:03Z"}',
        '{"event": "txn.started", "kind": "switch"}',
        '{"event": "txn.step", "kind": "switch", "timestamp": "2026-12-05T01:59:04.5Z"}',
        '{"event": "txn.started", "kind": "switch", "timestamp": "2026-12-05T01:59:05Z"}',
    ]
    log.write_text("\n".join(lines) + "\n")
    times = rollout._log_times(log, ("txn.started", "txn.step"), kind="switch")
    start = dt.datetime(2026, 12, 5, 1, 59, 2, 117357, tzinfo=dt.UTC).timestamp()
    assert times["txn.started"] == pytest.approx([start, start + 2.882643])
    assert times["txn.step"] == pytest.approx([start + 2.382643])
    assert rollout._log_times(tmp_path / "none.log", ("txn.started",)) == {"txn.started": []}


def test_the_phase_split_takes_a_reference_server_s_marks_only_inside_the_switch() -> None:
    """The reference server's log lines name no rollout: ``switch_phases`` takes the last of
    its marks inside the switch (from its start to its end and a second), not one that another
    rollout's restart of the same server left later in the log (review rev50b, L5)."""
    times = [10.0, 12.5, 13.0, 40.0]
    assert rollout._within(times, 12.0, 14.0) == [13.0]
    assert rollout._within(times, 20.0, 30.0) == []
    assert rollout._within(times, 0.0, float("inf")) == [40.0]


def test_the_call_to_the_agent_is_timed_from_the_write_that_held_its_record(tmp_path: Path) -> None:
    """The leader writes a switch's record in the write of the previous switch's outcome and
    logs that outcome after it: the phase "leader → agent" begins there, not at the switch's
    `started_at`, stamped before the write that the previous node's phase holds already
    (switchgap, session 72: counted in both phases)."""
    log = tmp_path / "leader.log"
    lines = [
        json.dumps({"event": "step.finished", "step": step, "node": node, "timestamp": at})
        for step, node, at in (
            ("switch", "n1", "2026-12-07T10:00:00.250Z"),
            ("confirm", "n1", "2026-12-07T10:00:00.260Z"),
            ("switch", "n2", "2026-12-07T10:00:00.500Z"),
        )
    ]
    log.write_text("\n".join(lines) + "\n")
    ended = rollout._log_fields(log, "step.finished", step="switch")
    t0 = dt.datetime(2026, 12, 7, 10, 0, tzinfo=dt.UTC).timestamp()
    assert [n for n, _ in ended] == ["n1", "n2"]
    assert rollout._written(t0 + 0.247, ended, "n2") == pytest.approx(t0 + 0.25)
    assert rollout._written(t0 + 0.01, ended, "n1") == pytest.approx(t0 + 0.01)  # the first
    assert rollout._written(t0 + 0.4, ended, "n3") == pytest.approx(t0 + 0.5)
    assert rollout._written(t0 + 0.2, ended, "n2") == pytest.approx(t0 + 0.25)
