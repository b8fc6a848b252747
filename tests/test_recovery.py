"""Faults on the node side that used to leave a node frozen, dead or misreported (issue 16),
each injected from outside the agent: real agents, real reference servers, real mutual TLS,
driven step by step by a stand-in for the leader (``tests.nodeside``).

How the faults are made, none through a hook in the agent:

- a vanishing fd: this process (or a child) closes fds while ``ports.holder`` reads them;
- a server store that cannot be written: a read-only bind mount of ``entries.sqlite3`` on
  itself, then a server started (or restarted) under it: SQLite opens the file read-only and
  every commit fails with SQLITE_READONLY, as on a read-only disk; a server already running
  keeps the descriptor it opened before, so the fault needs its start;
- a dead server: SIGKILL of the managed server's process;
- a full disk under the agent's journal: the agent's data dir is a small tmpfs, filled up
  with a file (SQLite then fails with SQLITE_FULL), and freed again by deleting that file;
- a directory the agent cannot write: a read-only bind mount.

The mounts need root, as ``tests.nodeside.read_only`` does. A write kept in flight by the
reference server's own test knob (``TLSROLL_REFSERVER_TEST_WRITE_DELAY``) holds the agent in
its freeze's bounded drain for a moment, so that a fault lands between two exact steps.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent import ports, transaction
from refserver.server import WRITE_DELAY_ENV
from tests.cluster import AdminTokenCluster, Cluster, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.nodeside import RPC_TIMEOUT, Node, NodeFactory, alive, fill, read_only, tmpfs
from tests.refserver_helper import Response
from tlsroll import password
from tlsroll.enums import Change
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("recovery"), next_loopback()) as c:
        c.init()
        c.start_leader()
        announce_epoch(c, 1)
        yield c


def announce_epoch(cluster: Cluster, epoch: int) -> None:
    """The stand-in leader commands with epoch 1, and agents obey only an epoch the leader
    announced: raise the leader's epoch floor (what ``tlsroll epoch advance`` keeps) in its
    store, so that its heartbeat replies announce it."""
    with contextlib.closing(sqlite3.connect(cluster.store_path, timeout=10)) as db:
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch_floor', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(epoch),),
        )
        db.commit()
    cluster.notice_store_written()


@pytest.fixture
def make_node(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(cluster, tmp_path, "rc")
    try:
        yield factory
    finally:
        factory.close()


def assert_on_https(node: Node, fingerprint: str) -> None:
    """From outside: https with the staged certificate, writes accepted, http closed."""
    assert node.served_fingerprint() == fingerprint
    status = node.admin_status()
    assert status["frozen"] is False
    assert status["listen"] == ["https"]
    assert node.post("https", {"after": "switch"}).status == 201
    assert not node.port_open(8080)


def assert_on_http(node: Node) -> None:
    status = node.admin_status()
    assert status["frozen"] is False
    assert status["listen"] == ["http"]
    assert node.post("http", {"after": "way back"}).status == 201
    assert not node.port_open(8443)


def server_events(node: Node, name: str) -> list[dict[str, Any]]:
    """Events ``name`` in the log of the servers the agent's driver started."""
    assert node.agent is not None
    path = node.agent.data_dir / "refserver.log"
    found = []
    for line in (path.read_text(errors="replace") if path.exists() else "").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
    return found


class SlowWrite:
    """One write that the reference server keeps in flight (its write-delay knob): the agent's
    freeze waits for it to drain, which holds the switch between two known steps."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.response: Response | None = None
        self.thread = threading.Thread(target=self._post, daemon=True)

    def _post(self) -> None:
        self.response = self.node.post("http", {"slow": "write"})

    def start(self) -> SlowWrite:
        self.thread.start()
        wait_until(lambda: self.node.admin_status()["in_flight"] == 1, 10, "a write in flight")
        return self

    def acknowledged(self) -> None:
        self.thread.join(30)
        assert self.response is not None and self.response.status == 201


def wait_frozen_on_disk(node: Node) -> Path:
    """Wait until the server has committed the agent's freeze (the row in its store says so);
    return the store's file."""
    store = node.server_data_dir / "entries.sqlite3"

    def persisted() -> bool:
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
            try:
                row = conn.execute("SELECT frozen FROM freeze WHERE id = 1").fetchone()
            finally:
                conn.close()
            return row is not None and bool(row[0])
        return False

    wait_until(persisted, 15, "the freeze persisted", interval=0.01)
    return store


# --- 1. who holds a port: fds that vanish during the scan ---------------------------------------


def test_holder_names_this_process_although_an_fd_vanishes_during_the_scan(
    loopback: Callable[[], str],
) -> None:
    """The scan's own directory fd is listed in /proc/self/fd and closed before it is read.
    Below the listener's fd (a gap made here), it used to make the scan drop this process and
    say "another process" (the agent then called its own 9443 listener foreign)."""
    address = loopback()
    gap = os.open(os.devnull, os.O_RDONLY)
    listener = socket.socket()
    try:
        listener.bind((address, 0))
        listener.listen()
        os.close(gap)  # the lowest free fd is now below the listener's: the scan's own takes it
        assert listener.fileno() > gap
        who = ports.holder(address, listener.getsockname()[1])
        assert who is not None and ports.names_pid(who, os.getpid()), who
    finally:
        listener.close()


def test_holder_names_a_listener_on_the_ipv4_mapped_ipv6_address(
    loopback: Callable[[], str],
) -> None:
    """Session 69 (smalls, 4): an IPv6 socket bound to ``::ffff:a.b.c.d`` holds a.b.c.d (a
    bind of a.b.c.d is refused), and /proc/net/tcp6 shows it by the mapped address: ``holder``
    of a.b.c.d found nothing, and the preflight said "another process" instead of naming it."""
    address = loopback()
    listener = socket.socket(socket.AF_INET6)
    try:
        listener.bind((f"::ffff:{address}", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not ports.port_free(address, port)  # it holds the IPv4 address
        assert address in ports.listeners(port)
        who = ports.holder(address, port)
        assert who is not None and ports.names_pid(who, os.getpid()), who
    finally:
        listener.close()


def test_holder_names_a_process_with_a_newline_in_its_arguments_in_one_line(
    loopback: Callable[[], str],
) -> None:
    """Session 44: the reason a preflight gives for a taken port names the holder, whose
    name any user may fill with a newline or an escape sequence; it went as it was into
    ``tlsroll plan``'s one-line refusal and split it. Session 64: never its command line,
    which may hold its secrets (review s64 seed L2). A real process listens here with such a
    name and such arguments."""
    address = loopback()
    code = (
        "import socket, sys, time\n"
        # (the kernel keeps 15 bytes of a name: the newline and the escape fit)
        "open('/proc/self/comm', 'w').write('ab\\ncd\\x1b[31mef')\n"
        "s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen()\n"
        "print(s.getsockname()[1], flush=True); time.sleep(30)\n"
    )
    child = subprocess.Popen(  # (its argv[0], first in the command line)
        ["first\nsecond \x1b[31mred\tend", "-c", code, address, "--password", "hunter2"],
        executable=sys.executable,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        who = ports.holder(address, port)
        assert who is not None and ports.names_pid(who, child.pid), who
        assert who.startswith("ab cd[31mef (pid "), who
        assert who.isprintable(), who
        assert "first" not in who and "hunter2" not in who and "password" not in who, who
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def test_finding_a_ports_listener_decodes_only_the_lines_on_that_port(
    loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: /proc/net/tcp* list every TCP socket of the machine, and every preflight
    looks there (the bootstrap port the agent itself holds). Each line's address was decoded
    (19 ms at 2,200 sockets); now only the lines on the asked port are. 200 connections made
    here and a listener beside, none on the asked port, must cost no decoding."""
    address = loopback()
    decoded: list[str] = []
    decode = ports._proc_addr

    def counting(hexaddr: str) -> tuple[str, int]:
        decoded.append(hexaddr)
        return decode(hexaddr)

    monkeypatch.setattr(ports, "_proc_addr", counting)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind((address, 0))
        listener.listen()
        other = stack.enter_context(socket.socket())
        other.bind((address, 0))
        other.listen(256)
        for _ in range(100):
            client = stack.enter_context(socket.create_connection(other.getsockname()))
            stack.enter_context(other.accept()[0])
            assert client.getsockname()[1] != listener.getsockname()[1]
        port = listener.getsockname()[1]
        found = ports.listeners(port)
        assert found.get(address), found
        assert decoded and all(h.endswith(f":{port:04X}") for h in decoded), decoded
        assert ports.holder(address, port) is not None


CHURNER = """
import os, socket, sys
def burst():
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
gap = burst()
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
for fd in gap:
    os.close(fd)
print(s.getsockname()[1], flush=True)
while True:  # 300 fds below the listener's, opened and closed all the time
    for fd in burst():
        os.close(fd)
"""


def test_holder_names_another_process_whose_fds_come_and_go(loopback: Callable[[], str]) -> None:
    address = loopback()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHURNER, address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(30):
            who = ports.holder(address, port)
            assert who is not None and ports.names_pid(who, proc.pid), who
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# --- 2. unfreeze is retried until it works ------------------------------------------------------


def test_an_unfreeze_that_fails_for_a_while_is_retried_until_the_node_is_unfrozen(
    make_node: NodeFactory,
) -> None:
    """The server cannot persist the unfreeze for several seconds (the server restarted by the
    switch finds its store read-only, as on a read-only disk); the agent used to try three
    times in 1.5 s, roll back and leave the node frozen. Now the switch completes once the
    file can be written again."""
    node = make_node(server_env={WRITE_DELAY_ENV: "2"})
    staged = node.stage("uf")
    slow = SlowWrite(node).start()
    node.switch("uf")
    store = wait_frozen_on_disk(node)  # the freeze is still draining the slow write
    with read_only(store):
        wait_until(
            lambda: len(server_events(node, "unfreeze.not_persisted")) >= 3,
            30,
            "three refused unfreezes",
        )
        assert node.txn("uf").outcome == ""  # still at it: neither given up nor rolled back
        assert node.admin_status()["frozen"] is True
    txn = node.wait_txn("uf", timeout=60)
    assert txn.outcome == "completed", txn.reason
    assert_on_https(node, staged.fingerprint)
    slow.acknowledged()
    assert node.agent is not None
    failed = [e for e in node.agent.log_events() if e.get("event") == "txn.unfreeze_failed"]
    assert [e["attempt"] for e in failed][:3] == [1, 2, 3]
    assert all(e["retry_in"] <= 30 for e in failed)
    assert "unfreeze_done" in " ".join(node.agent.event_names())


LEASE = 4  # seconds: long enough for the test to restart the server within it


def test_a_lapsed_scope_freeze_is_lifted_once_the_server_takes_the_unfreeze(
    make_node: NodeFactory,
) -> None:
    """A scope freeze whose lease ran out (the leader is gone) while the server cannot persist
    an unfreeze: the agent's lease watch retries with backoff and logs at a bounded rate (it
    used to log every second), and lifts the freeze once the server takes it."""
    node = make_node()
    with node.stub() as stub:
        stub.Freeze(
            agent_pb2.FreezeRequest(command=node.command("sf"), lease_seconds=LEASE),
            timeout=RPC_TIMEOUT,
        )
    store = wait_frozen_on_disk(node)

    def refusals() -> int:
        return sum(e.get("event") == "unfreeze.not_persisted" for e in node.server.log_events())

    with read_only(store):
        # Restarted within the lease: it comes back frozen, and cannot write its store.
        node.server.restart()
        assert node.admin_status()["frozen"] is True
        assert refusals() == 0, "the lease lapsed during the restart: make LEASE longer"
        wait_until(lambda: refusals() >= 5, 40, "five refused unfreezes")
    wait_until(lambda: node.admin_status()["frozen"] is False, 40, "the freeze lifted")
    assert node.agent is not None
    agent = node.agent
    # The agent logs the lapse once the journal has forgotten the lease, just after the
    # server took the unfreeze: wait for the line rather than race it.
    wait_until(lambda: "scope_freeze.lease_expired" in agent.event_names(), 10, "the lapse logged")
    refused = refusals()
    failed = [
        e for e in node.agent.log_events() if e.get("event") == "scope_freeze.lease_unfreeze_failed"
    ]
    assert [e["attempt"] for e in failed] == [
        n for n in range(1, refused + 1) if transaction.worth_logging(n, 0.0)
    ]
    assert [e["retry_in"] for e in failed][:4] == [0.5, 1.0, 2.0, 4.0]
    assert "scope_freeze.lease_expired" in node.agent.event_names()
    assert node.post("http", {"after": "lease"}).status == 201


# --- 3. a rollback that finds the server dead --------------------------------------------------


def test_a_rollback_that_finds_the_server_dead_restores_http_and_starts_it(
    make_node: NodeFactory,
) -> None:
    """The server dies after the switch (before the leader's confirm, say): the rollback's
    freeze fails on it. That used to skip the restart and end "failed" with both ports closed;
    now the old config is written, the server started on it and verified."""
    node = make_node()
    node.stage("dead")
    node.switch("dead")
    assert node.wait_txn("dead").outcome == "completed"
    pid = node.server_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # A killed process with threads is a zombie (its leader thread) a moment before its other
    # threads let go of the shared file table, and with it the listening socket: wait for both.
    wait_until(lambda: not alive(pid) and not node.port_open(8443), 10, "the server killed")

    node.rollback("dead")
    txn = node.wait_txn("dead", "rollback", timeout=60)
    assert txn.outcome == "completed", txn.reason
    assert_on_http(node)
    assert node.server_pid() not in (None, pid)
    assert node.agent is not None
    assert "txn.freeze_skipped" in node.agent.event_names()


# --- 4. a transaction task that dies ----------------------------------------------------------


@contextlib.contextmanager
def node_with_agent_on_tmpfs(make_node: NodeFactory) -> Iterator[tuple[Node, Path]]:
    """A node (server with a slow write knob) whose agent's data dir is a small tmpfs."""
    node = make_node.new(server_env={WRITE_DELAY_ENV: "2"})
    data_dir = make_node.cluster.root / "agents" / node.name / "data"
    with tmpfs(data_dir):
        try:
            node.start()
            yield node, data_dir
        finally:
            node.close()


def crash_at_frozen(node: Node, data_dir: Path, rollout_id: str) -> tuple[Path, SlowWrite]:
    """Start a switch and fill the agent's disk while its freeze drains a slow write: the
    journal write of ``frozen`` fails and the task dies."""
    slow = SlowWrite(node).start()
    node.switch(rollout_id)
    wait_frozen_on_disk(node)
    return fill(data_dir), slow


def test_a_transaction_task_that_dies_is_restarted_from_the_journal(
    make_node: NodeFactory,
) -> None:
    with node_with_agent_on_tmpfs(make_node) as (node, data_dir):
        staged = node.stage("td")
        filler, slow = crash_at_frozen(node, data_dir, "td")
        assert node.agent is not None
        agent = node.agent
        wait_until(lambda: "txn.crashed" in agent.event_names(), 30, "the task to die")
        filler.unlink()  # space again before the restart (after 1 s)
        txn = node.wait_txn("td", timeout=60)
        assert txn.outcome == "completed", txn.reason
        assert_on_https(node, staged.fingerprint)
        slow.acknowledged()
        assert agent.running  # the same agent carried it on
        assert "txn.restarting" in agent.event_names()
        crashed = [e for e in agent.log_events() if e.get("event") == "txn.crashed"]
        assert len(crashed) == 1
        # the journal's error names its file and SQLite's code
        assert "SQLITE_FULL" in crashed[0]["error"] and str(data_dir) in crashed[0]["error"]


def test_a_transaction_task_that_keeps_dying_on_a_full_disk_unfreezes_and_holds_the_switch(
    make_node: NodeFactory,
) -> None:
    """The disk stays full: after its restarts the task dies for good, the agent lifts the
    freeze (the config never changed: ``frozen`` was the failed record) and, since session 70,
    holds the switch instead of exiting (``txn.held``: it said "needs the admin"; before, it
    exited 1 and each new start restarted the server again); writes go in meanwhile; with space
    again the same agent process carries the switch on, the freeze taken again, the write kept."""
    with node_with_agent_on_tmpfs(make_node) as (node, data_dir):
        staged = node.stage("tk")
        filler, slow = crash_at_frozen(node, data_dir, "tk")
        assert node.agent is not None
        agent = node.agent
        wait_until(lambda: "txn.held" in agent.event_names(), 60, "the switch to be held")
        assert agent.running
        # A line per death that was restarted; the last one, for good, is the hold's line
        # (no ``txn.died``: the agent does not exit).
        events = [
            e
            for e in agent.log_events()
            if e.get("event") in ("txn.crashed", "txn.died", "txn.held")
        ]
        assert [(e["event"], e.get("rollout_id")) for e in events] == [
            ("txn.crashed", "tk"),
            ("txn.crashed", "tk"),
            ("txn.crashed", "tk"),
            ("txn.held", "tk"),
        ], events
        held = events[-1]["detail"]
        assert "SQLITE_FULL" in held and "writes are accepted again" in held, held
        assert node.admin_status()["frozen"] is False  # never left frozen by a dead task
        slow.acknowledged()
        assert node.post("http", {"while": "the switch is held"}).status == 201

        filler.unlink()
        txn = node.wait_txn("tk", timeout=90)  # carried on by the same agent process
        # Writes went in while the switch was held, unfrozen: the switch carried on freezes
        # again (whether its ``frozen`` record made it or not) and completes with the write kept.
        assert txn.outcome == "completed", txn.reason
        assert_on_https(node, staged.fingerprint)
        assert agent.running


def test_a_switch_resumed_after_its_freeze_was_lifted_freezes_again_and_completes(
    make_node: NodeFactory,
) -> None:
    """The agent dies after journalling ``frozen`` and the freeze is lifted meanwhile (its exit
    after a dying transaction lifts it; so does someone's restart of a server whose freeze does
    not outlive it); a write goes in. Resumed, the switch freezes again with a fresh watermark
    (journalled before the config write) and completes, the write kept (s33 audit L2; it used
    to run unfrozen and go back on the moved watermark)."""
    node = make_node(env={transaction.CRASH_ENV: "frozen"})
    assert node.agent is not None
    staged = node.stage("lifted")
    with contextlib.suppress(grpc.RpcError):  # the agent may die before its answer is out
        node.switch("lifted")
    assert node.agent.proc is not None
    assert node.agent.proc.wait(30) == -signal.SIGKILL
    node.server.unfreeze()
    acked = node.post("http", {"while": "the agent is away, unfrozen"}).json()

    node.restart_agent()  # without the crash hook
    done = node.wait_txn("lifted")
    assert done.outcome == "completed", done.reason
    assert_on_https(node, staged.fingerprint)
    assert done.watermark == acked["seq"]  # taken when it froze again
    assert node.get("https", f"entries/{acked['id']}").status == 200  # no write lost
    assert "txn.refrozen" in node.agent.event_names()


# --- 5. errors carry their cause ----------------------------------------------------------------


def test_a_file_error_while_preparing_a_switch_names_the_file_and_the_errno(
    make_node: NodeFactory,
) -> None:
    """The staged files' directory is read-only when the switch writes the password's
    verifier there: Switch used to answer INTERNAL "internal error"; now the leader gets the
    path and the errno (its schema shows them), and nothing is journalled or frozen."""
    node = make_node()
    staged = node.stage("ro")
    verifier = password.make_verifier("pw", **password.TEST_PARAMS)
    request = agent_pb2.SwitchRequest(
        command=node.command("ro"),
        change=CHANGE.wire(Change.ENABLE_TLS),
        auth_verifier_json=password.verifier_to_json(verifier),
    )
    stage_dir = node.stage_dir("ro")
    with read_only(stage_dir), node.stub() as stub, pytest.raises(grpc.RpcError) as info:
        stub.Switch(request, timeout=RPC_TIMEOUT)
    err = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    details = str(err.details())
    assert str(stage_dir) in details and "(errno 30, EROFS)" in details, details
    assert node.admin_status()["frozen"] is False
    assert node.journal_query("SELECT rollout_id FROM txns") == []
    assert_on_http(node)

    # Issue 15: the transaction's configs are in its journal row, not in files of the
    # agent's txn dir (the target and the source's backup were written there): with that
    # directory read-only the switch completes.
    assert node.agent is not None
    txn_dir = node.agent.data_dir / "txn"
    txn_dir.mkdir(mode=0o700, exist_ok=True)
    with read_only(txn_dir):
        node.switch("ro")
        done = node.wait_txn("ro")
    assert done.outcome == "completed", done.reason
    assert_on_https(node, staged.fingerprint)
    assert list(txn_dir.iterdir()) == []


# --- 6. a full or read-only disk is not a damaged journal ---------------------------------------


def test_an_agent_restarted_on_a_full_disk_says_so_and_keeps_its_journal(
    make_node: NodeFactory,
) -> None:
    """Audit s38, H2: an agent started on a full data dir (systemd restarting it, a reboot)
    said its journal was "damaged (disk I/O error)" and advised --reinitialise, which moved
    the intact journal aside and lost the node's transactions (its way back). Now: exit 1 (the
    unit starts it again) with one line saying the journal cannot be opened now, the space
    free, and that it is not damaged; --reinitialise is refused (exit 2) and moves nothing;
    likewise on a read-only file system; with space again the agent starts on its journal
    as it was (its transaction there)."""
    with node_with_agent_on_tmpfs(make_node) as (node, data_dir):
        staged = node.stage("fd")
        node.switch("fd")
        assert node.wait_txn("fd").outcome == "completed"
        agent = node.agent
        assert agent is not None
        journal = node.journal_path
        assert agent.stop() == 0
        saved = journal.read_bytes()
        argv = list(agent.argv)

        def run(*extra: str) -> tuple[int, str]:
            agent.argv = [*argv, *extra]
            try:
                code, output = agent.run_to_exit(timeout=30)
            finally:
                agent.argv = argv
            return code, one_line_error(output, "tlsroll-agent", allow_grpc_core=True)

        def unchanged() -> None:
            assert journal.read_bytes() == saved
            assert not list(data_dir.glob("journal.sqlite3.lost-*"))

        filler = fill(data_dir)
        code, line = run()
        assert code == 1, line
        assert line.startswith(f"tlsroll-agent: journal {journal}: cannot be opened now ("), line
        assert "SQLITE_IOERR" in line and "bytes free on its file system" in line, line
        assert line.endswith("it is not damaged"), line
        assert "damaged (" not in line and "--reinitialise" not in line, line
        unchanged()

        code, line = run("--reinitialise")
        assert code == 2, line
        assert "it is not damaged" in line and "nothing was moved aside" in line, line
        unchanged()
        filler.unlink()

        # The journal on a read-only mount of its own (a read-only data dir stops the agent
        # before, at its chmod, with "Read-only file system: DIR").
        prefix = f"tlsroll-agent: journal {journal}: cannot be opened now ("
        with read_only(journal):
            code, line = run()
            assert code == 1, line
            assert line.startswith(prefix), line
            assert "EROFS" in line and line.endswith("it is not damaged"), line
            assert "--reinitialise" not in line, line
            code, line = run("--reinitialise")
            assert code == 2, line
            unchanged()

        node.restart_agent()
        txn = node.txn("fd")
        assert txn.outcome == "completed", txn.reason
        assert_on_https(node, staged.fingerprint)
        assert "journal.reinitialised" not in agent.event_names()


# --- 7. a full disk under the managed server's config -----------------------------------------


@contextlib.contextmanager
def runaway_writer(directory: Path) -> Iterator[None]:
    """Something that keeps appending to a file in ``directory`` (a runaway log): on a full
    file system it takes any block as soon as it is freed. Stopped at the end."""
    stop = threading.Event()
    fd = os.open(directory / "runaway.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write() -> None:
        while not stop.is_set():
            try:
                os.write(fd, b"x" * 512)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    return
                stop.wait(0.0005)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
        os.close(fd)


@contextlib.contextmanager
def port_taken(address: str, port: int) -> Iterator[None]:
    """``address:port`` bound, not listening: a server cannot listen there, and nothing
    answers on it (the way back to http finds it closed)."""
    with socket.socket() as sock:
        sock.bind((address, port))
        yield


def test_the_way_back_on_a_full_config_disk_takes_no_new_block(make_node: NodeFactory) -> None:
    """The managed server's config dir is on a full file system that something keeps writing
    to, and the restart into https fails (its port is taken): the way back must put the source
    config back without a new block. It wrote it whole, met ENOSPC three times in 1.5 s and
    ended ``failed``, the https config live and the server down (s38 audit H3); now the source
    is staged beside the live config with the target, and the way back is a rename."""
    node = make_node.new()
    config_dir = node.config_dir
    saved = node.root / "server-saved"
    shutil.copytree(config_dir, saved)
    with tmpfs(config_dir, "256k"):
        try:
            for path in saved.iterdir():
                shutil.copy2(path, config_dir / path.name)
            node.start()
            source = node.server.config_path.read_bytes()
            mode = os.stat(node.server.config_path).st_mode
            node.stage("full")  # the configs are staged here, with room to spare
            filler = fill(config_dir)
            with runaway_writer(config_dir), port_taken(node.address, 8443):
                node.switch("full")
                txn = node.wait_txn("full", timeout=90)
            assert txn.outcome == "rolled_back", txn.reason
            assert "restart" in txn.reason
            assert node.server.config_path.read_bytes() == source
            assert os.stat(node.server.config_path).st_mode == mode
            assert_on_http(node)
            filler.unlink()
        finally:
            node.close()


def test_the_config_keeps_its_owner_group_and_mode_there_and_back(make_node: NodeFactory) -> None:
    """A config the server's own user reads (nobody:nogroup 0640 here) keeps its owner, group
    and mode through a switch that goes back, one that completes and its rollback: the agent
    (root) wrote each config as a new file of its own, root's, which a server running as its
    own user could no longer read (s38 audit D)."""
    node = make_node()
    config = node.server.config_path
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    os.chown(config, nobody, nogroup)
    config.chmod(0o640)

    def kept() -> tuple[int, int, int]:
        st = os.stat(config)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    source = config.read_bytes()
    node.stage("own1")
    with port_taken(node.address, 8443):  # the restart into https fails: the way back
        node.switch("own1")
        back = node.wait_txn("own1")
    assert back.outcome == "rolled_back", back.reason
    assert config.read_bytes() == source and kept() == (nobody, nogroup, 0o640)

    node.stage("own2")
    node.switch("own2")
    done = node.wait_txn("own2")
    assert done.outcome == "completed", done.reason
    assert config.read_bytes() != source and kept() == (nobody, nogroup, 0o640)

    node.rollback("own2")
    undone = node.wait_txn("own2", "rollback")
    assert undone.outcome == "completed", undone.reason
    assert kept() == (nobody, nogroup, 0o640)
    assert_on_http(node)
