"""The fault campaign's own parts that need no cluster (``bench/faults.py``, session 74): its
arguments, the draw of a disk fault, the phase moments' reading of a journal, and the refusal
of ``--faults disk`` where no tmpfs can be mounted (never a silent skip). In-process, cheap."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import faults
from tests.cluster import wait_until


def test_unknown_modes_and_faults_are_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv, said in (
        (["--modes", "enable-node,bogus"], "unknown modes: ['bogus']"),
        (["--faults", "disk,flood"], "unknown faults: ['flood']"),
    ):
        with pytest.raises(SystemExit) as exited:
            faults.main(argv)
        assert exited.value.code == 2
        assert said in capsys.readouterr().err


def test_disk_faults_are_drawn_on_a_place_each_and_the_leader_at_most_once() -> None:
    names = ["node1", "node2", "node3"]
    places: set[str] = set()
    moments: set[str] = set()
    for seed in range(300):
        drawn = faults.draw(random.Random(seed), ("disk", "leader"), names, "first")
        assert 1 <= len(drawn) <= 2
        assert sum(f.target == "leader" for f in drawn) <= 1, drawn
        for fault in drawn:
            moments.add(fault.at.partition(":")[0])
            if fault.kind == "disk":
                places.add(fault.place)
                assert (fault.target == "leader") == (fault.place == "leader"), fault
                assert fault.watch in names
            else:
                assert fault.place == ""
        assert len({(f.target, f.place) for f in drawn}) == len(drawn), drawn
    assert places == set(faults.DISK_PLACES)
    assert moments == {"time", "step", "phase", "state"}


def test_a_disk_faults_directory_follows_the_clusters_layout(tmp_path: Path) -> None:
    def at(target: str, place: str) -> Path:
        fault = faults.Fault("disk", target, "time", 0, 1, "node1", place=place)
        return faults.disk_dir(tmp_path, fault)

    assert at("leader", "leader") == tmp_path / "cluster" / "data"
    assert at("node2", "journal") == tmp_path / "cluster" / "agents" / "node2" / "data"
    assert at("node3", "config") == tmp_path / "n2" / "server"


class Journal:
    """A node whose journal is a file of this test (``seen_phase`` reads ``txns``)."""

    def __init__(self, path: Path) -> None:
        self.journal_path = path
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE txns (rollout_id TEXT, kind TEXT, phase TEXT)")
            db.commit()

    def put(self, phase: str) -> None:
        with contextlib.closing(sqlite3.connect(self.journal_path)) as db:
            db.execute("DELETE FROM txns")
            db.execute("INSERT INTO txns VALUES ('r1', 'switch', ?)", (phase,))
            db.commit()

    def journal_query(self, sql: str, *params: object) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(self.journal_path)) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, params).fetchall()]


def test_a_phase_moment_is_seen_in_its_phase_or_after_it_never_before(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    node: Any = journal
    watch = faults.JournalWatch(node)
    assert watch.changed()
    assert faults.seen_phase(node, "r1", "config_written") == ""  # no transaction yet
    for phase, seen in (
        ("started", ""),
        ("frozen", ""),
        ("config_written", "in config_written"),
        ("restarted", "passed: restarted"),
        ("rolling_back", "passed: rolling_back"),
    ):
        journal.put(phase)
        # A write is seen (a file's time may not move within a clock tick: then at the next
        # look 20 ms on at the latest).
        wait_until(watch.changed, 10, f"the journal's change to {phase}", interval=0.001)
        assert faults.seen_phase(node, "r1", "config_written") == seen, phase
    assert faults.seen_phase(node, "r2", "frozen") == ""  # another rollout's


def test_disk_faults_where_no_tmpfs_can_be_mounted_refuse_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @contextlib.contextmanager
    def refused(directory: Path, size: str = "8m") -> Iterator[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        raise subprocess.CalledProcessError(
            32, ["mount"], stderr=b"mount: /x: must be superuser to use mount.\n"
        )
        yield directory  # (never reached)

    monkeypatch.setattr(faults, "tmpfs", refused)
    monkeypatch.setenv("TLSROLL_TEST_SLOT", "3")
    code = faults.main(["--faults", "agent,disk", "--root", str(tmp_path), "--iterations", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "--faults disk: cannot mount a tmpfs here (mount: /x: must be superuser to use mount.):"
        " run as root\n"
    )
    assert list(tmp_path.iterdir()) == []  # no iteration ran


def test_a_disk_fault_moved_to_a_node_the_admins_retry_covers_finds_its_tmpfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of the admin's retry on a node that retry skips (done before the abort) moves to
    one it covers (``run_with_faults``); a disk fault's tmpfs must be there too (session 74: it
    was mounted only on the node first drawn, and the fault failed as the campaign's own)."""
    mounted: list[Path] = []
    filled: list[Path] = []

    @contextlib.contextmanager
    def tmpfs(directory: Path, size: str = "8m") -> Iterator[Path]:
        mounted.append(directory)
        yield directory

    def fill(directory: Path) -> Path:
        filled.append(Path(directory))
        filler = tmp_path / "filler"
        filler.touch()
        return filler

    def run_iteration(result: Any, root: Path, first: Any, later: list[Any]) -> None:
        (fault,) = later
        names = [f"node{i + 1}" for i in range(result.nodes)]
        views = [
            SimpleNamespace(name=n, state="skipped" if n == fault.target else "pending")
            for n in names
        ]
        monkeypatch.setattr(faults, "rollout_view", lambda *a: SimpleNamespace(nodes=views))
        cluster: Any = SimpleNamespace(data_dir=root / "cluster" / "data")
        nodes: Any = [
            SimpleNamespace(
                name=n,
                agent=SimpleNamespace(data_dir=root / "cluster" / "agents" / n / "data"),
                config_dir=root / f"n{i}" / "server",
            )
            for i, n in enumerate(names)
        ]
        faults.run_with_faults(result, later, cluster, nodes, "r2")

    monkeypatch.setattr(faults, "tmpfs", tmpfs)
    monkeypatch.setattr(faults, "fill", fill)
    monkeypatch.setattr(faults, "run_iteration", run_iteration)
    monkeypatch.setattr(faults, "NODE_STATE", SimpleNamespace(text=lambda state: state))
    monkeypatch.setattr(faults, "await_moment", lambda *a: True)
    monkeypatch.setattr(faults, "wait_end", lambda *a: "completed")
    monkeypatch.setattr(os.path, "ismount", lambda d: Path(d) in mounted)
    no_wait = SimpleNamespace(sleep=lambda seconds: None, monotonic=time.monotonic)
    monkeypatch.setattr(faults, "time", no_wait)  # (the fault's ``down``)
    seeds = 0
    for seed in range(200):
        rng = random.Random(seed)
        rng.choice(["enable-retry"]), rng.choice([3])
        (drawn, *more) = faults.draw(rng, ("disk",), ["node1", "node2", "node3"], "settle")
        if more or drawn.place == "leader":
            continue
        seeds += 1
        mounted.clear()
        filled.clear()
        result = faults.iteration(seed, tmp_path / str(seed), ("disk",), (3,), ("enable-retry",))
        (fault,) = result.faults
        assert result.problems == [], result.problems
        assert fault.hit and fault.target != drawn.target, fault
        assert filled == [faults.disk_dir(tmp_path / str(seed), fault)], (filled, mounted)
    assert seeds >= 5


class _Stopping:
    """A daemon's stand-in for ``faults.stop_daemons``: how its SIGTERM ends."""

    def __init__(self, name: str, running: bool = True, code: int = 0, hangs: bool = False):
        self.name, self.running, self.code, self.hangs = name, running, code, hangs
        self.bounds: list[float] = []

    def stop(self, timeout: float) -> int:
        self.bounds.append(timeout)
        if self.hangs:  # (``Daemon.stop``: killed, then TimeoutExpired)
            raise subprocess.TimeoutExpired("tlsroll-agent", timeout)
        return self.code


def test_a_daemon_that_does_not_stop_cleanly_within_its_units_bound_is_a_violation() -> None:
    """Session 75 (faultrun3): the campaign's end killed every daemon still up after 5 s,
    unsaid; each is now stopped with SIGTERM within its unit's TimeoutStopSec, and one not
    running, stopping with another exit code or outliving the bound is a problem."""
    leader = _Stopping("leader")
    agents = [
        _Stopping("agent node1"),
        _Stopping("agent node2", hangs=True),
        _Stopping("agent node3", code=1),
        _Stopping("agent node4", running=False),
    ]
    cluster: Any = SimpleNamespace(leader=leader, daemons=lambda: [leader, *agents])
    result = faults.Result(1, "enable-node")
    faults.stop_daemons(result, cluster)
    assert sorted(result.problems) == [
        "agent node2 did not stop within 90 s",
        "agent node3 stopped with exit code 1",
        "agent node4 was not running at the end",
    ]
    assert leader.bounds == [faults.STOP_BOUND["leader"]] == [30.0]
    assert agents[0].bounds == agents[1].bounds == [faults.STOP_BOUND["agent"]] == [90.0]
    assert agents[3].bounds == []
    assert set(result.stops) == {"leader", "agent node1", "agent node3"}
