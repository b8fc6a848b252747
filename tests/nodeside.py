"""Harness for the node side of the switch: a cluster with one agent managing a reference
server, and a stand-in for the leader that drives the agent's steps directly over mTLS.

    node = Node(cluster, "sw1", loopback(), tmp_path / "sw1")
    try:
        node.start()                                   # refserver on http, agent enrolled
        staged = node.stage("r1")                      # CreateCSR, sign with the CA, Stage
        node.switch("r1")
        txn = node.wait_txn("r1")                      # bounded poll of GetTransaction
        assert node.served_fingerprint() == staged.fingerprint
    finally:
        node.close()                                   # agent, server, and any server it started

The managed server's data dir lives *outside* its config dir (as /var/lib vs /etc would), so a
test can make the config dir read-only without breaking the running server's store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import itertools
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp

from tests import procs
from tests.cluster import (
    AGENT_HEARTBEAT_INTERVAL,
    READY_TIMEOUT,
    AdminTokenCluster,
    Agent,
    Cluster,
    secure_channel,
    wait_until,
)
from tests.conftest import next_loopback
from tests.refserver_helper import RefServer, Response, http_request, peer_certificate
from tlsroll import pki
from tlsroll.defaults import HTTP_PORT, HTTPS_PORT
from tlsroll.enums import Change, TxnKind, TxnOutcome
from tlsroll.httpcheck import port_open
from tlsroll.tls import client_context
from tlsroll.v1 import agent_pb2, agent_pb2_grpc
from tlsroll.wire import CHANGE, TXN_KIND, TXN_OUTCOME

TXN_PHASE_PREFIX = "TRANSACTION_PHASE_"


class TxnView:
    """A Transaction reply with its enums as text, as the tests read them: ``kind`` "switch",
    ``phase`` "config_written", ``outcome`` "completed" (or "" while it runs); every other field
    is the message's own."""

    def __init__(self, msg: agent_pb2.Transaction) -> None:
        self.msg = msg
        self.kind = TXN_KIND.text(msg.kind)
        outcome = TXN_OUTCOME.text(msg.outcome)
        self.outcome = "" if outcome == TxnOutcome.PENDING.value else outcome
        name = agent_pb2.TransactionPhase.Name(msg.phase)
        self.phase = name.removeprefix(TXN_PHASE_PREFIX).lower()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.msg, name)


RPC_TIMEOUT = 15.0

# The cluster CAs this process has loaded, by the bytes they were loaded from (a few at most:
# the newest kept). Its key is under scrypt (tlsroll.keywrap): a load costs about 0.35 s of CPU,
# which every ``Node.stage`` paid again for the same files.
_CAS: dict[tuple[bytes, bytes, bytes], pki.CertificateAuthority] = {}
_CAS_KEPT = 4


def cluster_ca(cluster: Cluster) -> pki.CertificateAuthority:
    """The cluster's CA as on disk now (certificate, key, passphrase), loaded once per those
    files' contents: a CA the test replaced on disk is loaded anew."""
    files = (
        cluster.ca_cert_path.read_bytes(),
        cluster.ca_key_path.read_bytes(),
        cluster.passphrase_path.read_bytes().strip(),
    )
    ca = _CAS.pop(files, None)
    if ca is None:  # from the bytes read, which are the key (the key file's mode: the leader's)
        ca = pki.CertificateAuthority(pki.load_cert_pem(files[0]), pki.load_key_pem(*files[1:]))
    _CAS[files] = ca  # the newest last
    while len(_CAS) > _CAS_KEPT:
        del _CAS[next(iter(_CAS))]
    return ca


class Node:
    """One node: a reference server (the managed server) and the agent that manages it."""

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        address: str,
        root: Path,
        *,
        server_env: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.address = address
        self.root = Path(root)
        settings.setdefault("data_dir", self.root / "server-data")
        self.server = RefServer(self.root / "server", address, env=server_env, **settings)
        self.agent: Agent | None = None
        self.epoch = 1

    # --- where things are ---------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        """The managed server's config dir (the agent stages certificates beside the config)."""
        return self.server.config_path.parent

    @property
    def server_data_dir(self) -> Path:
        return Path(str(self.server.settings["data_dir"]))

    @property
    def journal_path(self) -> Path:
        assert self.agent is not None
        return self.agent.data_dir / "journal.sqlite3"

    def stage_dir(self, rollout_id: str) -> Path:
        return self.config_dir / "tlsroll-tls" / rollout_id

    # --- processes ----------------------------------------------------------------------------

    def start(
        self,
        env: Mapping[str, str] | None = None,
        *,
        start_server: bool = True,
        extra_config: Mapping[str, Mapping[str, object]] | None = None,
        **server: object,
    ) -> Node:
        """Start the reference server (unless ``start_server`` is false) and the agent, whose
        ``[server]`` table is ``driver = "reference"`` plus ``server`` (which may override);
        ``extra_config`` adds tables (e.g. ``"server.commands"``)."""
        if start_server:
            self.server.start()
        self.add_agent(env, extra_config=extra_config, server=server)
        return self

    def add_agent(
        self,
        env: Mapping[str, str] | None = None,
        *,
        extra_config: Mapping[str, Mapping[str, object]] | None = None,
        start: bool = True,
        server: Mapping[str, object] | None = None,
    ) -> Agent:
        """``start``'s agent (its config and token; with ``start``, run until enrolled);
        ``server``: keys of its ``[server]`` table beside the reference driver's."""
        config: dict[str, Mapping[str, object]] = {
            "server": {
                "driver": "reference",
                "config_file": self.server.config_path,
                **(server or {}),
            }
        }
        config.update(extra_config or {})
        self.agent = self.cluster.add_agent(
            self.name, self.address, extra_config=config, env=env, start=start
        )
        return self.agent

    def restart_agent(self, env: Mapping[str, str] | None = None) -> None:
        assert self.agent is not None
        self.agent.start(env)

    def start_agent_heard(self, env: Mapping[str, str] | None = None) -> None:
        """Start the stopped agent again and wait until the leader has answered this process's
        heartbeat (its ``heartbeat.ok``). ``Cluster.wait_for_nodes_online`` alone proves
        nothing after a restart: a node counts as online for a few heartbeat intervals after
        its last heartbeat, so the stopped agent's last one passes it with no agent running,
        and a rollout started then races the new agent's start-up."""
        assert self.agent is not None
        agent = self.agent
        heard = agent.event_names().count("heartbeat.ok")
        agent.start(env)
        wait_until(
            lambda: agent.event_names().count("heartbeat.ok") > heard,
            READY_TIMEOUT,
            f"the leader to answer {self.name}'s started agent",
            interval=0.1,
        )

    def close(self) -> None:
        """Stop the agent, the server we started, and any server the agent's driver started
        (not our child): the one its pid file names, and every process that runs this node's
        server config, for a server the driver was starting as its agent was stopped has
        written no pid file yet (it did once the pid file had been read, and outlived its
        test: session 41). Idempotent."""
        errors: list[BaseException] = []
        if self.agent is not None:
            try:
                self.agent.close()
            except Exception as exc:  # keep going: every process must be stopped
                errors.append(exc)
        pid = self.server_pid()
        try:
            self.server.close()
        except Exception as exc:
            errors.append(exc)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        # The agent is gone: nothing starts a server of this node any more. (A child it forked
        # and had not yet exec'd runs the agent's command line.)
        names = [str(self.server.config_path)]
        if self.agent is not None:
            names.append(str(self.agent.config_path))
        if left := procs.stop(procs.running_with(*names)):
            errors.append(RuntimeError(f"{self.name}: still running: {', '.join(map(str, left))}"))
        if errors:
            raise errors[0]

    # --- the leader's side of the calls -------------------------------------------------------

    @contextlib.contextmanager
    def stub(
        self, credentials: tuple[bytes, bytes] | None = None
    ) -> Iterator[agent_pb2_grpc.NodeAgentStub]:
        """NodeAgent over mTLS with the leader's certificate (or ``credentials``: chain, key)."""
        assert self.agent is not None
        cert, key = credentials or self.cluster.leader_credentials()
        with secure_channel(
            self.agent.target, self.cluster.ca_pem, cert, key, name=self.agent.tls_name
        ) as channel:
            yield agent_pb2_grpc.NodeAgentStub(channel)

    def command(self, rollout_id: str, epoch: int | None = None) -> agent_pb2.Command:
        """A command as the leader sends it; its epoch is announced first, as a leader does
        when it starts a rollout (``Cluster.announce_epoch``)."""
        epoch = epoch or self.epoch
        self.cluster.announce_epoch(epoch)
        return agent_pb2.Command(rollout_id=rollout_id, epoch=epoch)

    def ca(self) -> pki.CertificateAuthority:
        return cluster_ca(self.cluster)

    def preflight(
        self, rollout_id: str, epoch: int | None = None, *, make_csr: bool = False
    ) -> agent_pb2.PreflightResponse:
        leader_time = Timestamp()
        leader_time.FromDatetime(dt.datetime.now(dt.UTC))
        with self.stub() as stub:
            reply: agent_pb2.PreflightResponse = stub.Preflight(
                agent_pb2.PreflightRequest(
                    command=self.command(rollout_id, epoch),
                    leader_time=leader_time,
                    max_clock_offset_seconds=60,
                    make_csr=make_csr,
                ),
                timeout=RPC_TIMEOUT,
            )
        return reply

    def create_csr(self, rollout_id: str, epoch: int | None = None) -> bytes:
        with self.stub() as stub:
            csr_pem: bytes = stub.CreateCSR(
                agent_pb2.CreateCSRRequest(command=self.command(rollout_id, epoch)),
                timeout=RPC_TIMEOUT,
            ).csr_pem
        return csr_pem

    def sign(self, csr_pem: bytes) -> bytes:
        """Sign ``csr_pem`` with the cluster CA as the leader would (server certificate)."""
        ca = self.ca()
        csr = pki.load_csr_pem(csr_pem)
        return pki.cert_to_pem(ca.sign_csr(csr, pki.names_of(csr), server=True, client=False))

    def send_stage(self, rollout_id: str, cert_pem: bytes) -> agent_pb2.StageResponse:
        with self.stub() as stub:
            reply: agent_pb2.StageResponse = stub.Stage(
                agent_pb2.StageRequest(
                    command=self.command(rollout_id),
                    certificate_pem=cert_pem,
                    ca_certificate_pem=self.cluster.ca_pem,
                ),
                timeout=RPC_TIMEOUT,
            )
        return reply

    def stage(self, rollout_id: str) -> agent_pb2.StageResponse:
        """CreateCSR, sign with the cluster CA as the leader would, Stage."""
        return self.send_stage(rollout_id, self.sign(self.create_csr(rollout_id)))

    def switch(self, rollout_id: str, epoch: int | None = None) -> TxnView:
        with self.stub() as stub:
            reply: agent_pb2.Transaction = stub.Switch(
                agent_pb2.SwitchRequest(
                    command=self.command(rollout_id, epoch),
                    change=CHANGE.wire(Change.ENABLE_TLS),
                ),
                timeout=RPC_TIMEOUT,
            )
        return TxnView(reply)

    def rollback(self, rollout_id: str) -> TxnView:
        with self.stub() as stub:
            reply: agent_pb2.Transaction = stub.Rollback(
                agent_pb2.RollbackRequest(command=self.command(rollout_id)), timeout=RPC_TIMEOUT
            )
        return TxnView(reply)

    def txn(
        self,
        rollout_id: str,
        kind: str = "switch",
        stub: agent_pb2_grpc.NodeAgentStub | None = None,
    ) -> TxnView:
        """The transaction as GetTransaction gives it (over ``stub``, or a channel of its own)."""
        request = agent_pb2.GetTransactionRequest(
            rollout_id=rollout_id, kind=TXN_KIND.wire(TxnKind(kind))
        )
        if stub is not None:
            return TxnView(stub.GetTransaction(request, timeout=RPC_TIMEOUT))
        with self.stub() as own:
            return TxnView(own.GetTransaction(request, timeout=RPC_TIMEOUT))

    def wait_txn(self, rollout_id: str, kind: str = "switch", timeout: float = 60) -> TxnView:
        """Poll GetTransaction until the transaction has an outcome (bounded). One channel for
        the polls (each of its own was a TLS handshake for the agent and this process, ten a
        second); a new one after a failed call (the agent restarting: a channel's reconnect
        backoff grows to two minutes)."""
        result: list[TxnView] = []
        with contextlib.ExitStack() as polls:
            opened: list[agent_pb2_grpc.NodeAgentStub] = []

            def finished() -> bool:
                if not opened:
                    opened.append(polls.enter_context(self.stub()))
                try:
                    t = self.txn(rollout_id, kind, opened[0])
                except grpc.RpcError:
                    opened.clear()
                    polls.close()  # (its channel)
                    return False
                result[:] = [t]
                return bool(t.outcome)  # "" while pending

            wait_until(
                finished, timeout, f"{kind} of {rollout_id} on {self.name} to finish", interval=0.1
            )
        return result[0]

    # --- the agent's journal (read beside the running agent; WAL allows it) -------------------

    def journal_query(self, sql: str, *params: object) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(self.journal_path, timeout=10)) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, params).fetchall()]

    def journal_events(self, rollout_id: str, kind: str = "switch") -> list[tuple[str, str]]:
        """``(step, what)`` of every journalled event of one transaction, in order."""
        rows = self.journal_query(
            "SELECT step, what FROM events WHERE rollout_id = ? AND kind = ? ORDER BY seq",
            rollout_id,
            kind,
        )
        return [(r["step"], r["what"]) for r in rows]

    # --- what a client sees ------------------------------------------------------------------

    def http_url(self, path: str = "") -> str:
        return f"http://{self.address}:{HTTP_PORT}{self.server.app_path}{path}"

    def https_url(self, path: str = "") -> str:
        return f"https://{self.address}:{HTTPS_PORT}{self.server.app_path}{path}"

    def ca_context(self) -> ssl.SSLContext:
        """A TLS client context trusting only the cluster CA."""
        return client_context(self.cluster.ca_pem)

    def get(self, scheme: str, path: str = "") -> Response:
        if scheme == "https":
            return http_request("GET", self.https_url(path), context=self.ca_context())
        return http_request("GET", self.http_url(path))

    def post(self, scheme: str, body: object, path: str = "entries") -> Response:
        if scheme == "https":
            return http_request("POST", self.https_url(path), body, context=self.ca_context())
        return http_request("POST", self.http_url(path), body)

    def served_fingerprint(self) -> str:
        """The certificate https on 8443 presents to a client trusting only the cluster CA."""
        der = peer_certificate(self.address, HTTPS_PORT, self.ca_context())
        return pki.fingerprint(x509.load_der_x509_certificate(der))

    def port_open(self, port: int) -> bool:
        return port_open(self.address, port, timeout=1.0)

    def admin_status(self) -> dict[str, Any]:
        """The managed server's own view (admin socket): frozen, watermark, listen, pid..."""
        return self.server.status()

    def server_pid(self) -> int | None:
        try:
            return int((self.server_data_dir / "refserver.pid").read_text())
        except (OSError, ValueError):
            return None

    def stored_with(self, marker: str) -> int:
        """How many entries in the server's store have ``marker`` in their body (read from the
        SQLite file itself, not through the server)."""
        db_path = self.server_data_dir / "entries.sqlite3"
        with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db:
            row = db.execute(
                "SELECT count(*) FROM entries WHERE instr(body, ?) > 0", (marker,)
            ).fetchone()
        return int(row[0])

    def driver_started_pids(self) -> list[int]:
        """Pids of the servers the agent's reference driver started (its refserver.log)."""
        assert self.agent is not None
        log = self.agent.data_dir / "refserver.log"
        pids = []
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "server.started":
                    pids.append(int(event["pid"]))
        return pids


@contextlib.contextmanager
def cluster_of(
    root: Path,
    count: int,
    *,
    env: Mapping[str, str] | None = None,
    node_env: Mapping[str, Mapping[str, str]] | None = None,
    heartbeat_interval: int = 1,
    agent_heartbeat_interval: int = AGENT_HEARTBEAT_INTERVAL,
    **leader: object,
) -> Iterator[tuple[Cluster, list[Node]]]:
    """A leader (``leader``: keys for leader.toml) and ``count`` nodes, node1 on the leader's
    own address, each with its agent and reference server, all online; ``env`` is added to the
    daemons' environment (a benchmark turns the tests' loop thread check off with it), and
    ``node_env`` (by node name) to one node's agent and server alone. A node's agent left
    stopped (SIGSTOP) by a test is continued before it is closed."""
    addresses = [next_loopback() for _ in range(count)]
    cluster = AdminTokenCluster(
        root / "cluster",
        addresses[0],
        heartbeat_interval=heartbeat_interval,
        agent_heartbeat_interval=agent_heartbeat_interval,
    )
    nodes = [Node(cluster, f"node{i + 1}", a, root / f"n{i}") for i, a in enumerate(addresses)]
    try:
        for node in nodes:  # (they need no leader: they start while init and the leader do)
            node.server.spawn()
        cluster.init("--node-name", "node1")
        if leader:
            cluster.write_leader_config(leader)
        cluster.start_leader(env)
        start_nodes(nodes, env, node_env=node_env)
        cluster.wait_for_nodes_online([n.name for n in nodes])
        yield cluster, nodes
    finally:
        errors: list[BaseException] = []
        for node in nodes:
            with contextlib.suppress(Exception):
                if node.agent is not None and node.agent.running:
                    node.agent.send_signal(signal.SIGCONT)
            try:
                node.close()
            except Exception as exc:  # keep going: stop every process, then say it
                errors.append(exc)
        cluster.close()
        if errors:
            raise errors[0]


def start_nodes(
    nodes: Sequence[Node],
    env: Mapping[str, str] | None = None,
    *,
    node_env: Mapping[str, Mapping[str, str]] | None = None,
    **server: object,
) -> None:
    """``Node.start`` for each of ``nodes`` (``server``: each agent's ``[server]`` keys;
    ``node_env`` by node name added to ``env`` for one node's agent), all at once: every
    reference server spawned (unless already) and waited for, then every agent (its token made
    first) spawned and each waited for until enrolled. One node after another, each agent's
    start-up (a process that imports, then enrols) was waited out alone: about 1.5 s of a test's
    wall time for each node after the first (session 67). A server is up before any agent
    starts, as with ``Node.start``."""
    for node in nodes:
        if not node.server.running:
            node.server.spawn()
    for node in nodes:
        node.server.wait_ready()
    envs: list[Mapping[str, str] | None] = []
    for node in nodes:
        own = (node_env or {}).get(node.name)
        envs.append({**(env or {}), **own} if own else env)
    agents = [
        node.add_agent(e, start=False, server=server) for node, e in zip(nodes, envs, strict=True)
    ]
    for agent, e in zip(agents, envs, strict=True):
        agent.spawn(e)
    # Agents started together share the cores while they import and enrol: the first waited
    # for gets the bound of one more for each other (flakesweep M1: three at once, load 18,
    # "agent node1 not ready in 20.0 s"). It only costs time when a start fails.
    bound = READY_TIMEOUT + 10.0 * (len(agents) - 1)
    for agent in agents:
        agent.wait_ready(bound)


@contextlib.contextmanager
def port_holder(address: str, port: int, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """Another program (a small python process) listening on ``address:port``; ``args`` go on
    its command line after those (it ignores them)."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket()\n"
        # A port just used has connections in TIME_WAIT, which a plain bind refuses; a second
        # listener is refused all the same.
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind((sys.argv[1], int(sys.argv[2])))\n"
        "s.listen()\n"
        "time.sleep(300)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, address, str(port), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: proc.poll() is not None or port_open(address, port, timeout=0.5),
            10,
            f"a listener on {address}:{port}",
        )
        assert proc.poll() is None, f"the listener on {address}:{port} exited"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` read-only with a read-only bind mount on itself (needs root)."""

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    run("mount", "--bind", str(directory), str(directory))
    try:
        run("mount", "-o", "remount,bind,ro", str(directory))
        yield
    finally:
        try:
            run("umount", str(directory))
        except subprocess.CalledProcessError:
            run("umount", "-l", str(directory))


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "8m") -> Iterator[Path]:
    """``directory`` on a tmpfs of its own (needs root); unmounted at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield directory
    finally:
        umount = ["umount", str(directory)]
        if subprocess.run(umount, check=False, capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(directory)], check=False, timeout=30)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up with one file; delete it to free the space."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


class NodeFactory:
    """Makes started nodes on fresh loopback addresses; ``close()`` stops all of them (for a
    fixture's teardown)."""

    def __init__(self, cluster: Cluster, root: Path, prefix: str) -> None:
        self.cluster = cluster
        self.root = Path(root)
        self.prefix = prefix
        self.nodes: list[Node] = []

    def __call__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        server_env: Mapping[str, str] | None = None,
        extra_config: Mapping[str, Mapping[str, object]] | None = None,
        **server: Any,
    ) -> Node:
        node = self.new(server_env=server_env)
        return node.start(env, extra_config=extra_config, **server)

    def new(self, *, server_env: Mapping[str, str] | None = None) -> Node:
        """A node not started yet (its processes are still stopped by ``close()``)."""
        name = f"{self.prefix}{next(_names)}"
        node = Node(self.cluster, name, next_loopback(), self.root / name, server_env=server_env)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                node.close()
            except Exception as exc:  # keep going: stop every process
                errors.append(exc)
        if errors:
            raise errors[0]


_names = itertools.count(1)


alive = procs.alive  # (the tests' name for it)
