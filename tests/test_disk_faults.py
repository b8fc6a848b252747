"""A log that cannot be written, and stores and files that cannot be written (session 38's audit
of a full disk and I/O errors).

- A log line that cannot be written (stderr a file on a full disk, ``/dev/full``, a closed
  pipe) is dropped and counted, never raised: an OSError out of ``log.info`` used to end an
  agent's switch with its server frozen, and the leader's rollout loop after one pass. The
  daemons here run for real with their stderr opened on ``/dev/full`` (every write fails with
  ENOSPC), or on a file of a small tmpfs that a test fills up and frees again.
- A loop of the leader that ends before the stop stops the leader (exit 1, one line), rather
  than leave it answering with no rollout moving.
- An admin command on a leader whose disk is full says so (UNAVAILABLE with SQLite's words and
  code), not "internal error".
- An agent whose journal cannot be written mid-switch (its data dir on a full tmpfs) restarts
  nothing, holds the switch and says the node needs the admin, and carries it on with room.
- The smaller ones: a staged file's write error names the file; a failing ROLLBACK does not
  hide the error that made it; a daemon's OSError line never says ": None".

The mounts need root, as ``tests.test_recovery`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing

from leader import runtime as leader_runtime
from leader import store_health
from leader.cli import rollout as rollout_cli
from leader.config import LeaderConfig
from leader.store_health import StoreHealth
from nodeagent import runtime as agent_runtime
from nodeagent.config import AgentConfig
from nodeagent.transaction import CRASH_ENV
from tests.cluster import LEADER_POLL, AdminTokenCluster, Cluster, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, NodeFactory, fill, tmpfs
from tests.test_recovery import announce_epoch, assert_on_https
from tests.test_viewer import fetch, login
from tlsroll import daemon, logs
from tlsroll.errors import os_error_text
from tlsroll.fsutil import stage_atomic
from tlsroll.rpc import error_status
from tlsroll.sqlite import TEST_CHECKPOINT_ENV, Database
from tlsroll.v1 import schema_pb2

DEV_FULL = Path("/dev/full")
ROLLOUT_TIMEOUT = 90.0

pytestmark = pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full")


# --- the log writer itself ----------------------------------------------------------------------


class Flaky(io.StringIO):
    """A stream whose writes fail with ENOSPC while ``full`` is set (a file on a full disk)."""

    full = False

    def write(self, s: str) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(s)


def test_a_line_that_cannot_be_written_is_dropped_counted_and_told_once_writing_works() -> None:
    out = Flaky()
    writer = logs.LineWriter(out, lambda n: f"lost {n}")
    writer.info("one")
    out.full = True
    writer.info("two")
    writer.error("three")
    assert (writer.lost, writer.lost_total) == (2, 2)
    out.full = False
    writer.info("four")
    writer.info("five")
    assert out.getvalue().splitlines() == ["one", "lost 2", "four", "five"]
    assert (writer.lost, writer.lost_total) == (0, 2)

    closed = logs.LineWriter(io.StringIO())
    closed.file.close()
    closed.info("to a closed file")  # ValueError, dropped as well
    assert closed.lost == 1


_LOG_TO_DEV_FULL = """
import json, logging, os, sys
from tlsroll import logs

logs.configure(json=True)
log = logs.get_logger("tlsroll.check")
saved = os.dup(2)
full = os.open("/dev/full", os.O_WRONLY)
os.dup2(full, 2)
log.info("check.info", n=1)
log.error("check.error")
logging.getLogger("asyncio").warning("a library's record")
os.dup2(saved, 2)
log.info("check.back")
print(json.dumps(logs.writer.lost_total))
"""


def test_logging_to_a_full_stderr_raises_nothing_and_says_how_many_lines_were_lost() -> None:
    """structlog's and the standard library's lines alike; no traceback of the standard
    library's handler either (``logging.raiseExceptions``). Before: OSError out of
    ``log.info``."""
    result = subprocess.run(
        [sys.executable, "-c", _LOG_TO_DEV_FULL],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == 3
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event"] for e in events] == ["log.lines_lost", "check.back"]
    assert events[0]["lost"] == 3 and events[0]["level"] == "warning"


_ENGINE_ON_DEV_FULL = """
import asyncio, os, types
from tlsroll import logs
logs.configure(json=True)
from leader.engine import Engine

async def main():
    engine = Engine.__new__(Engine)
    engine.wake = asyncio.Event(); engine.idle = False; engine._told = False; engine._loop = None
    engine.schema = types.SimpleNamespace(db=types.SimpleNamespace(on_change=[], generation=0))
    stop = asyncio.Event()
    passes = 0

    async def reconcile():
        nonlocal passes
        passes += 1
        if passes == 3:
            stop.set()
        raise RuntimeError("database or disk is full")

    async def close():
        pass

    engine.reconcile = reconcile
    engine.close = close
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, 2)
    await asyncio.wait_for(engine.run(stop), 60)
    print(passes)

asyncio.run(main())
"""


def test_the_engine_loop_survives_failing_passes_whose_log_lines_cannot_be_written() -> None:
    """Each pass fails and its ``engine.failed`` line cannot be written: the loop goes on to
    its third pass and ends at the stop. Before: it died with OSError after the first."""
    result = subprocess.run(
        [sys.executable, "-c", _ENGINE_ON_DEV_FULL],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


# --- a loop of the leader that ends -------------------------------------------------------------


def test_a_loop_that_ends_before_the_stop_is_named_with_its_error_and_sets_the_stop() -> None:
    async def scenario() -> tuple[str, bool, str]:
        stop = asyncio.Event()

        async def failing() -> None:
            await asyncio.sleep(0)
            raise OSError(errno.ENOSPC, "No space left on device")

        engine = asyncio.create_task(failing(), name="engine")
        other = asyncio.create_task(stop.wait(), name="expiry-watch")
        died = await daemon.until_stop_or_end(stop, (engine, other))
        await other  # the stop it set ends the other loop

        stopped = asyncio.Event()
        stopped.set()
        running = asyncio.create_task(asyncio.Event().wait(), name="engine")
        told = await daemon.until_stop_or_end(stopped, (running,))
        running.cancel()
        return died, stop.is_set(), told

    died, stopped, told = asyncio.run(scenario())
    assert died == "the engine loop ended: OSError: [Errno 28] No space left on device"
    assert stopped
    assert told == ""  # the stop came first: nothing ended


# --- real daemons whose stderr cannot be written ------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("diskfaults"), next_loopback()) as c:
        c.init()
        c.start_leader()
        announce_epoch(c, 1)
        yield c


@pytest.fixture
def make_node(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(cluster, tmp_path, "df")
    try:
        yield factory
    finally:
        factory.close()


def test_an_agent_whose_stderr_is_dev_full_completes_a_switch_and_unfreezes(
    make_node: NodeFactory,
) -> None:
    """Every line the agent logs fails (ENOSPC): the switch still completes, the server on
    https and not frozen. Before: the agent died at its first log line (``agent.started``);
    one whose log filled up mid-run answered Switch with UNKNOWN "Unexpected OSError" and left
    the server frozen (the next test)."""
    node = make_node()
    agent = node.agent
    assert agent is not None
    agent.stop()
    agent.output = DEV_FULL
    agent.start()
    staged = node.stage("full")
    node.switch("full")
    txn = node.wait_txn("full", timeout=60)
    assert txn.outcome == "completed", txn.reason
    assert_on_https(node, staged.fingerprint)
    assert agent.running


def fill_log(path: Path) -> None:
    """Fill the rest of ``path``'s last page, on a file system ``fill`` has filled."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\n")
    finally:
        os.close(fd)


def test_an_agent_whose_log_disk_fills_mid_run_completes_a_switch_and_tells_the_lines_lost(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """The agent's log is a file on a small tmpfs, full once the agent runs (a log file on a
    full /var): the switch completes and unfreezes; once there is room again, the next line is
    preceded by ``log.lines_lost`` with the count."""
    node = make_node.new()
    logfs = tmp_path / "logfs"
    with tmpfs(logfs, "1m"):
        agent_root = node.cluster.root / "agents" / node.name
        agent_root.mkdir(parents=True, exist_ok=True)
        (agent_root / "agent.log").symlink_to(logfs / "agent.log")
        node.start()
        staged = node.stage("logfull")
        filler = fill(logfs)
        fill_log(logfs / "agent.log")
        node.switch("logfull")
        txn = node.wait_txn("logfull", timeout=60)
        assert txn.outcome == "completed", txn.reason
        assert_on_https(node, staged.fingerprint)
        agent = node.agent
        assert agent is not None and agent.running
        filler.unlink()
        assert agent.stop() == 0
        events = agent.log_events()
        names = [e["event"] for e in events]
        assert "log.lines_lost" in names, names
        lost = events[names.index("log.lines_lost")]
        assert lost["lost"] >= 1
        assert names.index("log.lines_lost") < names.index("agent.stopped")
        assert "txn.step" not in names  # written while full: lost, not written late


def test_an_agent_whose_journal_disk_is_full_mid_switch_holds_it_and_says_it_needs_the_admin(
    make_node: NodeFactory, cluster: Cluster, tmp_path: Path
) -> None:
    """Session 70 (keptfreeze): the disk under the agent's data dir is full while a switch is
    mid-way (here: the agent killed right after journalling ``config_written``, then its data
    dir on a full tmpfs). Started again, the agent resumed the switch: it restarted the
    managed server, could not journal that, and exited after four tries (the server restarted
    four times at each start, systemd starting it every few seconds), and the leader showed an
    unreachable node. Now it makes no restart while the journal takes no write: it holds the
    switch, frozen, stays up and says why, which `tlsroll nodes` and the schema's node problems
    show ("needs the admin: its journal cannot be written ..."); with room again it carries the
    switch on by itself, to its end."""
    node = make_node(env={CRASH_ENV: "config_written"})
    agent = node.agent
    assert agent is not None and agent.proc is not None
    staged = node.stage("jfull")
    try:
        node.switch("jfull")
    except grpc.RpcError as exc:  # the agent may die before its answer is out
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    agent.proc.wait(30)
    pid = node.server_pid()
    assert node.admin_status()["frozen"] is True
    data = agent.data_dir
    kept = tmp_path / "data-kept"
    shutil.copytree(data, kept, symlinks=True)

    def shown() -> str:
        listed = cluster.cli("nodes", "--json")
        assert listed.returncode == 0, listed.stderr
        return str(next(n for n in json.loads(listed.stdout) if n["name"] == node.name)["server"])

    def problem(kind: str = "needs-admin") -> str:  # (the schema's, from this process)
        said = [
            p
            for p in cluster.schema_json()["node_problems"]
            if p["node"] == node.name and p["kind"] == kind
        ]
        return f"{said[0]['kind']}: {said[0]['problem']}" if said else ""

    with tmpfs(data, "4m"), contextlib.closing(sqlite3.connect(data / "journal.sqlite3")) as db:
        shutil.copytree(kept, data, symlinks=True, dirs_exist_ok=True)
        # Its WAL emptied into the file (the next write needs new blocks: a WAL with room
        # left is written over from its start), its -shm kept by this open connection.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = fill(data)
        try:
            agent.start()  # without the crash hook
            said = "needs the admin: its journal cannot be written (disk full: SQLITE_FULL): free"
            wait_until(
                lambda: problem().startswith(f"needs-admin: {node.name} {said}"),
                60,
                "the schema's node problems to say so",
                interval=0.2,
            )
            # `tlsroll nodes` (200 characters of it: what to do first; this data dir is long)
            assert shown().startswith(f"{said} space in {data}; the switch of rollout jfull")
            # Session 74: its agent's own store trouble too (its heartbeats say it), the disk
            # under its journal below a switch's floor.
            low = f"free space is low for a switch: the agent's data dir {data} has "
            wait_until(
                lambda: f"its store safely: {low}" in problem("agent-store"),
                30,
                "the schema's node problems to show the agent's store trouble",
                interval=0.2,
            )
            assert agent.running
            status = node.admin_status()
            assert (node.server_pid(), status["frozen"]) == (pid, True)  # no restart, no lift
            events = agent.log_events()
            assert "restart" not in [e.get("step") for e in events]
            (held,) = [e["detail"] for e in events if e.get("event") == "txn.held"]
            assert "the switch of rollout jfull waits mid-way, writes refused" in held, held
            # Session 71 (held2): another rollout's switch, or a way back, is refused at once
            # with the hold's reason (it was "busy", or with a new epoch the disk's error, which
            # the leader tried again for as long as the disk stayed full); the held switch's
            # own repeat is answered with it as it stands (the leader follows it).
            for other in (node.switch, node.rollback):
                with pytest.raises(grpc.RpcError) as caught:
                    other("jother")
                code, details = caught.value.code(), caught.value.details() or ""
                assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
                assert details.startswith(said), details
            assert node.switch("jfull").phase == "config_written"
        finally:
            filler.unlink()
        txn = node.wait_txn("jfull", timeout=90)  # carried on by the same agent process
        assert txn.outcome == "completed", txn.reason
        assert_on_https(node, staged.fingerprint)
        assert agent.running
        wait_until(lambda: not problem(), 30, "the node problem to go", interval=0.2)
        assert not shown().startswith("needs the admin")
        assert agent.stop() == 0  # (before the unmount: the journal lives there)


def test_a_leader_whose_stderr_is_dev_full_runs_a_rollout_to_completion(tmp_path: Path) -> None:
    """Every line the leader logs fails: it still starts, and a rollout completes (its engine
    loop logs at each step). Before: the leader died at its first log line; the engine loop
    alone died after one pass (``test_the_engine_loop_survives…``)."""
    cluster = AdminTokenCluster(tmp_path / "c", next_loopback(), heartbeat_interval=1)
    node: Node | None = None
    try:
        cluster.leader.output = DEV_FULL
        cluster.init()
        cluster.start_leader()
        node = Node(cluster, "full1", next_loopback(), tmp_path / "full1").start()
        cluster.wait_for_nodes_online(["full1"])
        password = tmp_path / "password"
        password.write_text("correct horse battery staple\n")
        password.chmod(0o600)
        started = cluster.cli(
            "rollout", "start", "--password-file", str(password), "--scope", "cluster", "--yes"
        )
        assert started.returncode == 0, started.stderr

        def done() -> bool:  # looked at from this process
            return cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted")

        wait_until(done, ROLLOUT_TIMEOUT, "the rollout to end", interval=LEADER_POLL)
        ended = cluster.newest_rollout()
        assert ended["state"] == "completed", ended
        assert cluster.leader.running
        assert node.get("https").status == 200
        assert cluster.leader.log_text() == ""  # nothing of it could be written
    finally:
        if node is not None:
            node.close()
        cluster.close()


# --- an admin command on a full store -------------------------------------------------------------


def test_an_admin_command_on_a_leader_whose_disk_is_full_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    """The leader's data dir on a tiny tmpfs, filled up: `tlsroll token create` fails with one
    line naming SQLite's words and code, exit 1; the leader logs the same. Before: "internal
    error; see the daemon's log", and the log said only ``error_type=OperationalError``."""
    # A short root: the data dir must be on the tmpfs, not moved to /tmp for its socket's path.
    root = Path(tempfile.mkdtemp(prefix="tlsroll-full-"))
    cleanup = contextlib.ExitStack()
    cleanup.callback(shutil.rmtree, root, ignore_errors=True)
    with cleanup, tmpfs(root, "16m"), AdminTokenCluster(root, next_loopback()) as cluster:
        assert cluster.data_dir.is_relative_to(root)
        cluster.init()
        cluster.start_leader()
        filler = fill(root)
        try:
            result = cluster.cli(
                "token", "create", "--node", "n9", "--address", "127.0.0.9", "--ttl", "1h"
            )
            # `rollout status` says it with no rollout stored too (README: it tells the store's
            # trouble; it said only "no rollout yet": review s64 store L2).
            status = cluster.cli("rollout", "status")
        finally:
            filler.unlink()
        assert status.returncode == 1, status.stderr
        trouble, last = status.stderr.splitlines()
        assert trouble.startswith("tlsroll: the leader cannot write its store since 20"), trouble
        assert "SQLITE_FULL" in trouble and "no rollout yet" in last, status.stderr
        assert result.returncode == 1, result.stderr
        line = one_line_error(result.stderr, "tlsroll")
        assert line == (
            "tlsroll: error: the leader cannot do it now:"
            " store: database or disk is full (SQLITE_FULL)"
        ), line
        logged = [e for e in cluster.leader.log_events() if e.get("event") == "rpc.unavailable"]
        assert logged and "SQLITE_FULL" in logged[-1]["error"], cluster.leader.log_text()[-2000:]
        assert cluster.leader.running
        # Room again: the same command works.
        again = cluster.cli(
            "token", "create", "--node", "n9", "--address", "127.0.0.9", "--ttl", "1h"
        )
        assert again.returncode == 0, again.stderr


def test_a_leader_whose_checkpoint_cannot_grow_its_store_says_so_while_its_writes_still_work(
    tmp_path: Path,
) -> None:
    """A leader that has run a while: its ``-wal`` has been through a checkpoint, so on a full
    disk its commits go on into the ``-wal``'s pages, which SQLite reuses, while the checkpoint
    cannot copy them into a file that must grow. The leader says it cannot write its store
    (`rollout status`, the same words as for a failed write, a warning with a hint) once that
    checkpoint fails, not only once a commit does; room again, a later checkpoint clears it.
    Before (review s72 leaderwrite): the failed checkpoint was logged at debug only, and the
    leader said nothing until the ``-wal`` had to grow and a write failed."""
    root = Path(tempfile.mkdtemp(prefix="tlsroll-ckpt-"))
    cleanup = contextlib.ExitStack()
    cleanup.callback(shutil.rmtree, root, ignore_errors=True)
    with cleanup, AdminTokenCluster(root, next_loopback()) as cluster:
        data = cluster.data_dir
        with tmpfs(data, "16m"):
            try:
                checkpoint_on_a_full_disk(cluster, data)
            finally:
                cluster.close()  # (before the unmount)


def checkpoint_on_a_full_disk(cluster: AdminTokenCluster, data: Path) -> None:
    cluster.init()
    # a checkpoint every 5 commits, not 100
    cluster.start_leader({TEST_CHECKPOINT_ENV: "5"})
    assert any(
        e.get("event") == "leader.test_hook" and e.get("hook") == TEST_CHECKPOINT_ENV
        for e in cluster.leader.log_events()
    ), cluster.leader.log_text()[-2000:]
    described = "x" * 200  # (each token a few hundred bytes: the file grows)
    # A -wal as a leader's grows between its checkpoints (a hundred commits, or more while a
    # reader holds pages: a backup): a reader holds it here while 40 commits go in, then one
    # checkpoint copies it all. The leader's next commits reuse its pages from the start.
    with contextlib.closing(sqlite3.connect(data / "leader.sqlite3", isolation_level=None)) as db:
        db.execute("BEGIN")
        db.execute("SELECT count(*) FROM sqlite_master").fetchall()
        for i in range(40):
            cluster.create_token(f"c{i}", "127.0.3.1", description=described)
        db.execute("COMMIT")
        assert db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][0] == 0
    filler = fill(data)
    try:
        took = 0  # tokens made on the full disk before the leader said it
        said = False
        for i in range(200):
            try:
                cluster.create_token(f"f{i}", "127.0.4.1", description=described)
            except RuntimeError as exc:  # a write failed: said too late
                raise AssertionError(f"a write failed before a word ({took}): {exc}") from None
            took += 1
            events = cluster.leader.log_events()
            if any(e.get("event") == "store.checkpoint_failing" for e in events):
                said = True
                break
        assert said and took >= 1, took
        (warned,) = [e for e in events if e.get("event") == "store.checkpoint_failing"]
        assert warned["level"] == "warning" and "df -h" in warned["hint"], warned
        assert "SQLITE_FULL" in warned["error"], warned
        status = cluster.cli("rollout", "status")
        trouble = status.stderr.splitlines()[0]
        # (its writes still work: not said as a failed write's, review s73 revdisk)
        assert trouble.startswith("tlsroll: the leader's store cannot grow since 20"), status.stderr
        assert "database or disk is full (SQLITE_FULL) at its checkpoint" in trouble
        assert "rollouts go on for now" in trouble
        # Session 73 (diskroom): no rollout starts meanwhile, in the same words, before it is
        # planned or a password made; the way back is not refused for it (here: none to take
        # back). Before: the start went on, its records failing once the -wal had to grow.
        refused = cluster.cli("rollout", "start", "--scope", "cluster", "--yes")
        assert refused.returncode == 1, refused.stderr
        line = one_line_error(refused.stderr, "tlsroll")
        assert line.startswith("tlsroll: error: the leader's store cannot grow since 20"), line
        assert "(SQLITE_FULL) at its checkpoint" in line, line
        assert "free space on the leader's disk (df -h); no rollout starts until then" in line
        assert line.endswith("is not refused for it); nothing was started"), line
        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 1 and "cannot grow" not in back.stderr, back.stderr
    finally:
        filler.unlink()

    def clear() -> bool:  # its next try, after a wait of seconds
        return "cannot grow" not in cluster.cli("rollout", "status").stderr

    wait_until(clear, ROLLOUT_TIMEOUT, "a checkpoint to succeed", interval=0.5)
    events = cluster.leader.log_events()
    assert [e["event"] for e in events if e.get("event", "").startswith("store.")] == [
        "store.checkpoint_failing",
        "store.checkpoint_recovered",
    ], events[-10:]
    # one failed try logged by the store too, and no try per commit meanwhile
    failed = [e for e in events if e.get("event") == "db.checkpoint_failed"]
    assert len(failed) == 1 and "hint" in failed[0], failed
    cluster.create_token("after", "127.0.4.2")


def test_a_disk_error_becomes_unavailable_with_its_cause_and_other_errors_stay_internal() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"
    assert error_status(full, {}, "M") == (
        grpc.StatusCode.UNAVAILABLE,
        "store: database or disk is full (SQLITE_FULL)",
    )
    ioerr = sqlite3.OperationalError("disk I/O error")
    ioerr.sqlite_errorname = "SQLITE_IOERR_WRITE"
    assert error_status(ioerr, {}, "M")[0] == grpc.StatusCode.UNAVAILABLE
    wrong = sqlite3.OperationalError("no such table: x")
    wrong.sqlite_errorname = "SQLITE_ERROR"
    assert error_status(wrong, {}, "M")[0] == grpc.StatusCode.INTERNAL
    rofs = OSError(errno.EROFS, os.strerror(errno.EROFS), "/var/lib/tlsroll/x")
    assert error_status(rofs, {}, "M", paths=True) == (
        grpc.StatusCode.UNAVAILABLE,
        "/var/lib/tlsroll/x: Read-only file system (errno 30, EROFS)",
    )
    # (a caller that may not read paths: the errno only; session 70)
    assert error_status(rofs, {}, "M") == (
        grpc.StatusCode.UNAVAILABLE,
        "Read-only file system (errno 30, EROFS)",
    )
    assert error_status(OSError(errno.EBADF, "x"), {}, "M")[0] == grpc.StatusCode.INTERNAL


def test_a_full_disk_on_a_node_is_resource_exhausted_disk_full_and_the_leader_retries_it() -> None:
    """Brief s39small: the agent's ENOSPC, EDQUOT or SQLITE_FULL reached the leader as
    UNAVAILABLE, an agent it cannot reach. The agent's servicers (``full_disk``) answer
    RESOURCE_EXHAUSTED "disk full: CAUSE"; the leader's client makes it a ``NodeDiskFull``,
    transient (retried, as UNAVAILABLE was) and said as the node's full disk. Other disk
    trouble (EIO, EROFS, a failed write) stays UNAVAILABLE, and servicers without
    ``full_disk`` (the leader's own) answer as before."""
    from leader.agent_client import NodeDiskFull, StepFailed, call_failed
    from nodeagent.service import ERRORS as AGENT_ERRORS
    from nodeagent.service import FULL_DISK
    from tlsroll.errors import TransientError

    assert FULL_DISK is grpc.StatusCode.RESOURCE_EXHAUSTED
    nospace = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/var/lib/tlsroll-agent/x")
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/var/lib/tlsroll-agent/y")
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"
    for exc, cause in (
        (nospace, "/var/lib/tlsroll-agent/x: No space left on device (errno 28, ENOSPC)"),
        (quota, "/var/lib/tlsroll-agent/y: Disk quota exceeded (errno 122, EDQUOT)"),
        (full, "store: database or disk is full (SQLITE_FULL)"),
    ):
        code, details = error_status(exc, AGENT_ERRORS, "Stage", FULL_DISK, paths=True)
        assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, f"disk full: {cause}")
        assert error_status(exc, {}, "M")[0] == grpc.StatusCode.UNAVAILABLE  # the leader's
        failed = call_failed("node1", code, details)
        assert isinstance(failed, NodeDiskFull) and isinstance(failed, TransientError)
        assert str(failed) == f"agent node1: the node's disk is full: {cause}"
    ioerr = sqlite3.OperationalError("disk I/O error")
    ioerr.sqlite_errorname = "SQLITE_IOERR_WRITE"
    rofs = OSError(errno.EROFS, os.strerror(errno.EROFS), "/var/lib/tlsroll-agent/x")
    for other in (ioerr, rofs):
        assert error_status(other, AGENT_ERRORS, "Stage", FULL_DISK)[0] == (
            grpc.StatusCode.UNAVAILABLE
        )
    # gRPC's own RESOURCE_EXHAUSTED (a message too large) is still the agent saying no.
    too_big = call_failed("node1", grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large")
    assert isinstance(too_big, StepFailed) and not isinstance(too_big, TransientError)


def test_the_agents_journal_that_cannot_grow_is_its_full_disk(tmp_path: Path) -> None:
    """Review s39rev1 M4: the agent's journal wraps SQLite's errors in ``JournalError``, a
    TerminalError, which its servicers mapped to FAILED_PRECONDITION before looking for a full
    disk: a step whose journal write met SQLITE_FULL failed at once ("step failed") instead of
    being retried as the node's full disk. A real SQLITE_FULL (the journal's file may not grow:
    ``max_page_count``) now answers RESOURCE_EXHAUSTED "disk full: …", a ``NodeDiskFull`` to
    the leader; the leader's own servicers (no ``full_disk``) answer as before."""
    from leader.agent_client import NodeDiskFull, call_failed
    from nodeagent.journal import Journal, JournalError
    from nodeagent.service import ERRORS as AGENT_ERRORS
    from nodeagent.service import FULL_DISK

    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        with journal._db.tx() as db:  # its file stays the size it is: as a disk that is full
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(JournalError) as raised:
            journal.record_csr("r-1", tmp_path / "key.pem", b"x" * 200_000)
    finally:
        journal.close()
    exc = raised.value
    code, details = error_status(exc, AGENT_ERRORS, "Stage", FULL_DISK)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == f"disk full: {exc}" and details.endswith("(SQLITE_FULL)")
    assert isinstance(call_failed("node1", code, details), NodeDiskFull)
    # the leader's servicers keep their mapping of a TerminalError
    assert error_status(exc, AGENT_ERRORS, "Stage")[0] == grpc.StatusCode.FAILED_PRECONDITION
    # a JournalError over another cause is still the refusal it was
    other = JournalError("journal x: no such table")
    other.__cause__ = sqlite3.OperationalError("no such table")
    assert error_status(other, AGENT_ERRORS, "Stage", FULL_DISK)[0] == (
        grpc.StatusCode.FAILED_PRECONDITION
    )


# --- the smaller ones -----------------------------------------------------------------------------


def test_a_staged_files_write_error_names_the_file(tmp_path: Path) -> None:
    """A full disk fails the staged file's write (or its fsync), which names no file by
    itself: the error names the temporary file, which is gone."""
    directory = tmp_path / "cfg"
    with tmpfs(directory, "256k"):
        filler = fill(directory)
        with pytest.raises(OSError) as info:
            stage_atomic(directory / "server.toml", b"y" * 100_000)
        filler.unlink()
        assert info.value.errno == errno.ENOSPC
        text = os_error_text(info.value)
        assert text.startswith(f"{directory}/.server.toml.staged-"), text
        assert text.endswith("No space left on device (errno 28, ENOSPC)"), text
        assert sorted(p.name for p in directory.iterdir()) == []


class RollbackFails:
    """A connection whose ROLLBACK fails (an I/O error as SQLite rolls back)."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self._real = real

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() == "ROLLBACK":
            raise sqlite3.OperationalError("disk I/O error")
        return self._real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_rollback_that_fails_does_not_hide_the_error_that_made_it(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.sqlite3", ["CREATE TABLE t (x INTEGER)"])
    real = db._db
    db._db = RollbackFails(real)  # type: ignore[assignment]
    try:
        with pytest.raises(ValueError, match="the error that matters"), db.tx() as c:
            c.execute("INSERT INTO t VALUES (1)")
            raise ValueError("the error that matters")
    finally:
        db._db = real
        real.execute("ROLLBACK")  # what the failed one left open
        db.close()


def test_a_daemons_os_error_without_a_file_is_one_line_with_its_errno(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Before: ``tlsroll-leader: Bad file descriptor: None``."""

    def bad_fd(_path: object) -> Any:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    config = tmp_path / "x.toml"
    config.write_text("")  # there: one missing from an empty directory is said before its load
    monkeypatch.setattr(LeaderConfig, "load", staticmethod(bad_fd))
    assert leader_runtime.main(["--config", str(config)]) == 1
    assert capsys.readouterr().err == "tlsroll-leader: Bad file descriptor (errno 9, EBADF)\n"
    monkeypatch.setattr(AgentConfig, "load", staticmethod(bad_fd))
    assert agent_runtime.main(["--config", str(config)]) == 1
    assert capsys.readouterr().err == "tlsroll-agent: Bad file descriptor (errno 9, EBADF)\n"


def test_a_rollout_on_a_leader_whose_disk_fills_says_why_in_rollout_status(tmp_path: Path) -> None:
    """The leader's data dir fills up while a rollout runs: the rollout waits, `rollout status`
    and the web viewer's page say why (SQLite's words and code, since when), the repeated
    failure is logged at most once a minute, not at every tick; with room again the rollout
    completes and the line is gone. Before: the reason was in the log only, a line per tick
    (and, after session 38, on `rollout status` but not on the page a practice IT watches)."""
    root = Path(tempfile.mkdtemp(prefix="tlsroll-m2-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        full_leader_rollout(root, tmp_path)


def full_leader_rollout(root: Path, tmp_path: Path) -> None:
    cluster = AdminTokenCluster(root, next_loopback(), heartbeat_interval=1)
    data = cluster.data_dir
    assert data.is_relative_to(root)
    node: Node | None = None
    with tmpfs(data, "16m"):
        try:
            cluster.init()
            cluster.start_leader()
            cookie = login(cluster)  # before the disk is full: a grant is a write
            node = Node(cluster, "m2", next_loopback(), tmp_path / "m2")
            node.start({CRASH_ENV: "frozen"})  # the agent dies mid-switch, server frozen
            cluster.wait_for_nodes_online(["m2"])
            password = tmp_path / "password"
            password.write_text("correct horse battery staple\n")
            password.chmod(0o600)
            started = cluster.cli(
                "rollout", "start", "--password-file", str(password), "--scope", "cluster", "--yes"
            )
            assert started.returncode == 0, started.stderr
            assert node.agent is not None and node.agent.proc is not None
            node.agent.proc.wait(ROLLOUT_TIMEOUT)
            began = time.monotonic()
            filler = fill(data)
            try:
                node.restart_agent()  # without the crash: its switch completes from the journal
                status: subprocess.CompletedProcess[str] | None = None

                def said() -> bool:
                    nonlocal status
                    status = cluster.cli("rollout", "status")
                    return "cannot write its store" in status.stderr

                wait_until(
                    said, ROLLOUT_TIMEOUT, "rollout status to say why it waits", interval=0.5
                )  # a CLI run each look
                assert status is not None
                assert status.returncode == 0, status.stderr
                (line,) = [ln for ln in status.stderr.splitlines() if "cannot write" in ln]
                assert "store: database or disk is full (SQLITE_FULL)" in line, line
                assert line.startswith("tlsroll: the leader cannot write its store since 20"), line
                assert cluster.newest_rollout()["state"] == "running"
                page = fetch(cluster, "/", cookie=cookie)  # a session is read, never written
                assert page.status == 200, page
                assert 'data-trouble="store"' in page.body, page.body[-3000:]
                assert "nicht in seinen Speicher schreiben" in page.body
                assert "database or disk is full (SQLITE_FULL)" in page.body
                english = fetch(cluster, "/?lang=en", cookie=cookie)
                assert "The leader cannot write its store since" in english.body
            finally:
                filler.unlink()

            def done() -> bool:  # looked at from this process
                return cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted")

            wait_until(done, ROLLOUT_TIMEOUT, "the rollout to end", interval=LEADER_POLL)
            ended = cluster.newest_rollout()
            full_for = time.monotonic() - began
            assert ended["state"] == "completed", ended
            after = cluster.cli("rollout", "status")
            assert after.returncode == 0, after.stderr
            assert "cannot write" not in after.stderr
            assert 'data-trouble="store"' not in fetch(cluster, "/", cookie=cookie).body
            events = cluster.leader.log_events()
            failing = [e for e in events if e.get("event") == "store.writes_failing"]
            assert failing, cluster.leader.log_text()[-3000:]
            assert {e["during"] for e in failing} <= {
                "engine.failed",
                "step.crashed",
                "heartbeat.batch_failed",
            }
            # the first, then at most one a minute whoever fails (the engine's steps, the
            # heartbeats' batches), not one of each per tick (a bound that grows with the time
            # the disk was full: a slow machine loosens it)
            assert len(failing) <= 1 + full_for // 60, failing
            recovered = [e for e in events if e.get("event") == "store.writes_recovered"]
            assert len(recovered) == 1, recovered
        finally:
            if node is not None:
                node.close()
            cluster.close()


def test_store_health_keeps_the_cause_logs_it_once_a_minute_and_clears_at_a_commit() -> None:
    now = [1000.0]
    wall = dt.datetime(2026, 12, 3, 2, 0, tzinfo=dt.UTC)
    health = StoreHealth(lambda: wall, monotonic=lambda: now[0])
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"
    with structlog.testing.capture_logs() as logged:
        assert health.failed(RuntimeError("a bug"), "engine.failed") is False  # not the store's
        assert health.trouble is None
        for _ in range(5):  # one a second, as the ticks come
            assert health.failed(full, "step.crashed", node="n1")
            now[0] += 1
        assert health.trouble == ("store: database or disk is full (SQLITE_FULL)", wall)
        now[0] += store_health.LOG_SECONDS
        assert health.failed(full, "heartbeat.batch_failed")
        health.works()
        assert health.trouble is None
        health.works()  # said once
    assert [(e["event"], e.get("during"), e.get("left_out")) for e in logged] == [
        ("store.writes_failing", "step.crashed", 0),
        ("store.writes_failing", "heartbeat.batch_failed", 4),
        ("store.writes_recovered", None, None),
    ]


def test_a_failing_checkpoint_alone_is_said_with_writes_that_still_work(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s73 revdisk: a checkpoint the disk does not take, while the writes still commit
    (into the ``-wal``), was said in the words of a failed write, "no rollout moves until it
    can", where rollouts go on. ``StoreHealth.writes_work`` tells the two apart, and `rollout
    status` and systemd's STATUS= say the rollouts go on, or the checkpoint fails; a failed
    write, with or without it, stays as it was."""
    wall = dt.datetime(2026, 12, 3, 2, 0, tzinfo=dt.UTC)
    health = StoreHealth(lambda: wall)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    statuses: list[str] = []
    monkeypatch.setattr(store_health, "sd_notify", statuses.append)
    with structlog.testing.capture_logs():
        health.checkpoint(full)
        assert health.trouble is not None and health.writes_work
        health.failed(full, "step.crashed")
        assert health.trouble is not None and not health.writes_work
        health.works()
        assert health.writes_work
        health.checkpoint(None)
        assert health.trouble is None and not health.writes_work
    # systemd's STATUS= likewise; a write's failure over, the checkpoint's said again
    checkpoint_status = (
        "STATUS=Store checkpoint failing since 2026-12-03 02:00:00: store: database or disk is"
        " full (SQLITE_FULL) at its checkpoint (its writes go on in the -wal until that must grow)"
    )
    assert statuses == [
        checkpoint_status,
        "STATUS=Store writes failing since 2026-12-03 02:00:00: store: database or disk is full"
        " (SQLITE_FULL)",
        checkpoint_status,
        "STATUS=Store writes work again",
    ], statuses
    said: list[str] = []
    for writes_work in (True, False):
        schema = schema_pb2.Schema()
        schema.store_trouble.problem = "store: database or disk is full (SQLITE_FULL) at its …"
        schema.store_trouble.since.FromDatetime(wall)
        schema.store_trouble.writes_work = writes_work
        rollout_cli._say_store_trouble(schema)
        said.append(capsys.readouterr().err)
    checkpoint, write = said
    assert checkpoint.startswith("tlsroll: the leader's store cannot grow since 2026-12-03 02:00")
    assert "rollouts go on for now, until its writes fail" in checkpoint
    assert "no rollout moves" not in checkpoint and "cannot write" not in checkpoint
    assert write.startswith("tlsroll: the leader cannot write its store since 2026-12-03 02:00")
    assert "no rollout moves until it can" in write
