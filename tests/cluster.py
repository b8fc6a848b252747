"""A real tlsroll cluster for end-to-end tests: the leader and its agents as processes.

Everything is real: ``tlsroll init`` and the CLI run as subprocesses, the daemons are the
installed console scripts, they talk gRPC over mutual TLS on loopback addresses, and the store
is the leader's SQLite file (read here in read-only mode)::

    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()                               # tlsroll init; short heartbeat interval
        cluster.start_leader()                       # waits until the admin socket answers
        cluster.add_agent("node1", loopback())       # one-time token, agent process, port up
        cluster.wait_for_nodes_online(["node1"])
        result = cluster.cli("nodes", "--json")      # CompletedProcess[str]
        assert cluster.find_secrets(cluster.logs_text()) == []

Every wait polls with a bound; ``close()`` (also on leaving the ``with`` block) terminates
every process the cluster started, so a fixture can always call it in its teardown.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from leader.cli.base import Leader, fetch_schema_json, parse_duration
from tests import grpc_env
from tests.refserver_helper import write_toml
from tlsroll import __version__, pki, spiffe
from tlsroll.defaults import AGENT_PORT, CONTROL_PORT, JOIN_PORT
from tlsroll.errors import PKIError
from tlsroll.httpcheck import port_open
from tlsroll.v1 import admin_pb2, admin_pb2_grpc, enrolment_pb2, enrolment_pb2_grpc

READY_TIMEOUT = 20.0  # a daemon up and answering
STOP_TIMEOUT = 15.0  # above the daemons' 10 s grace period
CLI_TIMEOUT = 30.0
POLL = 0.05
# A wait whose look asks the leader (``schema_json``, ``poll_newest_rollout``, ``list_nodes``):
# each look is a connection to its admin socket and, for the schema, the whole schema built,
# about 10 ms of CPU of the leader's and this process's together. At ``POLL`` a wait for a
# rollout to end took a tenth of a core from the daemons under test for its whole length; a
# quarter of a second more at its end is nothing beside a rollout's time.
LEADER_POLL = 0.25
# Agents beat every second; the leader expects one every 2 s and calls a node offline after
# 3 silent intervals (6 s), which leaves room for a busy test machine.
AGENT_HEARTBEAT_INTERVAL = 1
LEADER_HEARTBEAT_INTERVAL = 2
LOOP_CHECKS = Path(__file__).resolve().parent / "loop_checks"  # its sitecustomize.py
MAX_SOCKET_PATH = 100  # sun_path holds 107 bytes; pytest's tmp_path can be long


def command(script: str, module: str) -> list[str]:
    """The installed console script beside this interpreter, else ``python -m module``."""
    path = Path(sys.executable).parent / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours minus anything that would steer it elsewhere, with the
    harness's event-loop thread check on (``tests/loop_checks/sitecustomize.py``): a loop touched
    from another thread raises, as under asyncio's debug mode (an admin command that once woke
    the engine from a worker thread answered INTERNAL only there). Debug mode itself, which every
    daemon ran with before, doubled the daemons' CPU; they now run as in production."""
    env = {
        k: v
        for k, v in os.environ.items()
        # COLUMNS/LINES: a terminal's size (pytest-xdist passes one on) would fold the CLI's
        # tables; without them a pipe gets whole lines.
        if k not in {"NOTIFY_SOCKET", "TLSROLL_DATA_DIR", "TLSROLL_SOCKET", "COLUMNS", "LINES"}
    }
    if grpc_env.SET["GRPC_VERBOSITY"] is None:
        # What ``nodeagent`` set, imported in this process: a daemon sets its own, as in
        # production, and tells it from the admin's (``nodeagent.command_env``).
        env.pop("GRPC_VERBOSITY", None)
    env["PYTHONASYNCIODEBUG"] = ""
    env["TLSROLL_LOOP_CHECKS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LOOP_CHECKS), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def merge_config(
    base: Mapping[str, Mapping[str, object]], changes: Mapping[str, Mapping[str, object]] | None
) -> dict[str, dict[str, object]]:
    """``base`` with ``changes`` applied per table (a ``None`` value removes the key)."""
    merged = {name: dict(table) for name, table in base.items()}
    for name, table in (changes or {}).items():
        merged.setdefault(name, {}).update(table)
    return {n: {k: v for k, v in t.items() if v is not None} for n, t in merged.items()}


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = POLL,
    *,
    not_yet: tuple[type[Exception], ...] = (),
) -> None:
    """Poll ``condition`` until it holds; TimeoutError naming ``what`` after ``timeout`` s.

    An exception of a type in ``not_yet`` (opt-in, per wait) counts as "not yet", as False
    does: for a state a loaded machine may not have reached when the condition first looks (a
    row or view filled by a first report, a daemon still starting). The timeout then names the
    last one. Any other exception fails the wait at once: a real failure is no "not yet". A
    StopIteration the condition lets out (a ``next()`` without a default that found nothing,
    the project CI's failure on 2f4605d0) fails it at once too, but says so, naming ``what``
    (bare, it says nothing of where, and inside a generator it would end that silently)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            if condition():
                return
            last = None
        except not_yet as exc:
            last = exc
        except StopIteration as exc:
            raise AssertionError(
                f"{what}: the condition's next() found nothing (StopIteration): if that is a"
                " state not there yet, give next() a default or the wait not_yet="
            ) from exc
        if time.monotonic() > deadline:
            said = f" (the last look: {type(last).__name__}: {last})" if last else ""
            raise TimeoutError(f"{what}: not within {timeout} s{said}") from last
        time.sleep(interval)


def secure_channel(
    target: str,
    ca_pem: bytes,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    *,
    name: str | None = None,
) -> grpc.Channel:
    """A sync channel trusting only ``ca_pem``; with ``cert_pem``/``key_pem``: mutual TLS.
    The server is checked for ``name``: by default the leader's internal name, as agents dial
    the leader (its certificate names no address a client could take: ``pki.NAMES_OID``); an
    agent's is ``agent_host``'s."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    td = spiffe.trust_domain(pki.load_cert_pem(ca_pem))
    options = [("grpc.ssl_target_name_override", name or spiffe.leader_host(td))]
    return grpc.secure_channel(target, creds, options=options)


def agent_host(ca_pem: bytes, node_pem: bytes) -> str:
    """The name the leader dials an agent by (its key's, ``spiffe.key_host``), ``node_pem``
    its certificate."""
    td = spiffe.trust_domain(pki.load_cert_pem(ca_pem))
    return spiffe.key_host(td, pki.spki_pin(pki.load_cert_pem(node_pem)))


def health_check(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> int:
    """The gRPC health status (``health_pb2.HealthCheckResponse.SERVING`` == 1)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return int(reply.status)


def pem_body_lines(pem: bytes) -> list[str]:
    """The base64 lines of a PEM file (what a leaked key would show), headers left out."""
    return [
        line.strip()
        for line in pem.decode("ascii", errors="replace").splitlines()
        if line.strip() and not line.startswith("-----") and ":" not in line
    ]


GRPC_CORE_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


METRICS_TOKEN = "scrape-token-0123456789abcdef"


def metrics_token_file(path: Path, mode: int = 0o600) -> Path:
    """A ``metrics_token_file`` holding ``METRICS_TOKEN``, of ``mode``, at ``path``."""
    path.write_text(METRICS_TOKEN + "\n")
    path.chmod(mode)
    return path


def one_line_error(output: str, prog: str, *, allow_grpc_core: bool = False) -> str:
    """The one error line ``prog`` printed; fails on a traceback, on more than one error line,
    if it is not the last line, or if anything before it is not a JSON log event (with
    ``allow_grpc_core``: or a line of gRPC's C core, which logs past structlog)."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: ")]
    assert len(errors) == 1, output
    assert lines[-1] == errors[0], output
    for line in lines[:-1]:
        if allow_grpc_core and GRPC_CORE_LOG.match(line):
            continue
        assert line.startswith("{") and isinstance(json.loads(line), dict), output
    return errors[0]


# --- crafted enrolment (what a well-behaved or a bent agent sends) -----------------------------


def csr_pem(
    key: pki.PrivateKey | ec.EllipticCurvePrivateKey,
    common_name: str,
    ips: Sequence[str],
    dns: Sequence[str] = (),
    *,
    ca: bool = False,
) -> bytes:
    """A PEM CSR signed by ``key`` carrying these names; ``ca`` asks for a CA certificate."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    san: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    san += [x509.DNSName(d) for d in dns]
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def enrol_request(
    token: str,
    name: str,
    address: str,
    *,
    key: pki.PrivateKey | None = None,
    csr: bytes | None = None,
) -> enrolment_pb2.EnrolRequest:
    """An EnrolRequest as a well-behaved agent sends it, unless ``csr`` replaces the CSR."""
    key = key or pki.generate_key()
    return enrolment_pb2.EnrolRequest(
        token=token,
        csr_pem=csr if csr is not None else csr_pem(key, name, [address]),
        node_name=name,
        addresses=[address],
        agent_version=__version__,
        agent_port=AGENT_PORT,
        names_apart=True,
    )


def enrol(cluster: Cluster, request: enrolment_pb2.EnrolRequest) -> enrolment_pb2.EnrolResponse:
    """Send ``request`` to the cluster's join port (TLS, trusting the cluster CA)."""
    with cluster.enrolment() as stub:
        reply: enrolment_pb2.EnrolResponse = stub.Enrol(request, timeout=10)
    return reply


class Daemon:
    """One daemon process; its stdout and stderr are appended to ``log_path``.

    ``ready`` says when the daemon answers; ``start`` polls it (and fails at once, with the
    log, if the process exits instead).
    """

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, ready: Callable[[], bool]
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # A file the process's stdout and stderr go to in place of ``log_path`` (``/dev/full``:
        # no line it logs can be written); ``log_text`` then has nothing of that run.
        self.output: Path | None = None

    def spawn(self, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to be ready."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = (self.output or self.log_path).open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=child_env(env),
        )
        return self.proc

    def start(self, env: Mapping[str, str] | None = None, timeout: float = READY_TIMEOUT) -> None:
        self.spawn(env)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self._close_log()
                raise RuntimeError(f"{self.name} exited with {code} on start:\n{self.log_text()}")
            if self.ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.name} not ready in {timeout} s:\n{self.log_text()}")
            time.sleep(POLL)

    def run_to_exit(
        self, env: Mapping[str, str] | None = None, timeout: float = READY_TIMEOUT
    ) -> tuple[int, str]:
        """Run a daemon expected to exit by itself (bad config...): ``(code, its new output)``."""
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc = self.spawn(env)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close_log()
        return code, self.log_path.read_bytes()[start:].decode(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def send_signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait; the exit code (SIGKILL and TimeoutExpired after ``timeout``)."""
        assert self.proc is not None, f"{self.name} not started"
        self.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def close(self, grace: float = 5.0) -> None:
        """Terminate (SIGTERM, then SIGKILL after ``grace``) and reap; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        """Everything the process wrote (all runs so far)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines (structlog events) written so far."""
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    def event_names(self) -> list[str]:
        return [str(e.get("event")) for e in self.log_events()]


class Agent(Daemon):
    """A ``tlsroll-agent`` with its own config file, data dir and loopback address."""

    def __init__(
        self, name: str, address: str, root: Path, config: Mapping[str, Mapping[str, object]]
    ) -> None:
        self.node_name = name
        self.address = address
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "agent.toml"
        self.config = merge_config(config, None)
        write_toml(self.config_path, self.config)
        super().__init__(
            f"agent {name}",
            [*command("tlsroll-agent", "nodeagent.daemon"), "--config", str(self.config_path)],
            root / "agent.log",
            lambda: port_open(self.address, self.port, timeout=0.5),
        )

    @property
    def port(self) -> int:
        return int(str(self.config["agent"].get("port", AGENT_PORT)))

    @property
    def target(self) -> str:
        return hostport(self.address, self.port)

    @property
    def data_dir(self) -> Path:
        return Path(str(self.config["agent"]["data_dir"]))

    @property
    def key_file(self) -> Path:
        return self.data_dir / "node.key"

    @property
    def cert_file(self) -> Path:
        return self.data_dir / "node.pem"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca.pem"

    def cert(self) -> Any:
        """The node certificate on disk (``cryptography.x509.Certificate``)."""
        return pki.read_cert(self.cert_file)

    @property
    def tls_name(self) -> str:
        """The name the leader dials this agent by (its current key's: ``agent_host``)."""
        return agent_host(self.ca_file.read_bytes(), self.cert_file.read_bytes())

    def write_config(self, changes: Mapping[str, Mapping[str, object]]) -> Path:
        """Apply ``{"table": {key: value}}`` (``None`` removes a key) and rewrite the file."""
        self.config = merge_config(self.config, changes)
        return write_toml(self.config_path, self.config)


class Cluster:
    """A leader (data dir, config, process) and the agents added to it."""

    def __init__(
        self,
        root: Path,
        leader_address: str,
        *,
        heartbeat_interval: int = LEADER_HEARTBEAT_INTERVAL,
        agent_heartbeat_interval: int = AGENT_HEARTBEAT_INTERVAL,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.address = leader_address
        self.heartbeat_interval = heartbeat_interval
        self.agent_heartbeat_interval = agent_heartbeat_interval
        self._tmp_dir: Path | None = None
        data_dir = self.root / "data"
        if len(str(data_dir / "run" / "admin.sock")) > MAX_SOCKET_PATH:
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="tlsroll-"))
            data_dir = self._tmp_dir / "data"
        self.data_dir = data_dir.resolve()
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.agents: dict[str, Agent] = {}
        self.tokens: list[str] = []  # every token this cluster handed out (for find_secrets)
        self.leader = Daemon(
            "leader",
            [*command("tlsroll-leader", "leader.daemon"), "--config", str(self.config_path)],
            self.log_dir / "leader.log",
            self._leader_ready,
        )

    # --- files --------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.data_dir / "leader.toml"

    @property
    def store_path(self) -> Path:
        return self.data_dir / "leader.sqlite3"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "run" / "admin.sock"

    @property
    def ca_cert_path(self) -> Path:
        return self.data_dir / "ca" / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.data_dir / "ca" / "ca.key"

    @property
    def passphrase_path(self) -> Path:
        return self.data_dir / "secrets" / "ca.passphrase"

    @property
    def tls_cert_path(self) -> Path:
        return self.data_dir / "tls" / "leader.pem"

    @property
    def tls_key_path(self) -> Path:
        return self.data_dir / "tls" / "leader.key"

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert_path.read_bytes()

    def ca_pin(self) -> str:
        """The CA's SPKI pin, computed from DATA/ca/ca.pem (not asked of the leader)."""
        return pki.spki_pin(pki.read_cert(self.ca_cert_path))

    @property
    def join_target(self) -> str:
        return hostport(self.address, JOIN_PORT)

    @property
    def control_target(self) -> str:
        return hostport(self.address, CONTROL_PORT)

    # --- init and the leader process ----------------------------------------------------------

    def init(self, *extra_args: str) -> subprocess.CompletedProcess[str]:
        """``tlsroll init`` (must succeed), then set this cluster's heartbeat interval."""
        result = self.cli(
            "init", "--data-dir", str(self.data_dir), "--address", self.address, *extra_args
        )
        if result.returncode != 0:
            raise RuntimeError(f"tlsroll init failed ({result.returncode}): {result.stderr}")
        # Tests make many refused enrolments from one address; test_join_guard.py sets the
        # join port's backoff back to its default.
        self.write_leader_config(
            {"heartbeat_interval": self.heartbeat_interval, "join_free_failures": 10_000}
        )
        return result

    def leader_config(self) -> dict[str, Any]:
        with self.config_path.open("rb") as f:
            table: dict[str, Any] = tomllib.load(f)["leader"]
        return table

    def write_leader_config(self, changes: Mapping[str, object]) -> None:
        """Change keys of ``[leader]`` in DATA/leader.toml (``None`` removes a key)."""
        write_toml(
            self.config_path, merge_config({"leader": self.leader_config()}, {"leader": changes})
        )

    def _leader_ready(self) -> bool:
        if not self.admin_socket.exists():
            return False
        try:
            with grpc.insecure_channel(f"unix:{self.admin_socket}") as channel:
                return bool(
                    health_check(channel, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
                )
        except grpc.RpcError:
            return False

    def start_leader(
        self, env: Mapping[str, str] | None = None, timeout: float = READY_TIMEOUT
    ) -> Daemon:
        self.leader.start(env, timeout)
        return self.leader

    def stop_leader(
        self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT
    ) -> int:
        return self.leader.stop(sig, timeout)

    def kill_leader(self) -> None:
        self.leader.kill()

    # --- the admin CLI and the admin socket ---------------------------------------------------

    def cli(
        self,
        *args: str,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = CLI_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``tlsroll ARGS`` with ``TLSROLL_DATA_DIR`` set to this cluster's data dir."""
        return subprocess.run(
            [*command("tlsroll", "tlsroll"), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env({"TLSROLL_DATA_DIR": str(self.data_dir), **(env or {})}),
            check=False,
        )

    def create_token(
        self,
        node: str,
        *addresses: str,
        dns: Sequence[str] = (),
        ttl: str = "1h",
        uses: int = 1,
        description: str = "",
    ) -> str:
        """``tlsroll token create --node NODE --address …``; the printed ``<id>.<secret>``."""
        args = ["token", "create", "--node", node, "--ttl", ttl, "--uses", str(uses)]
        args += [f"--address={a}" for a in addresses] + [f"--dns={d}" for d in dns]
        if description:
            args += ["--description", description]
        result = self.cli(*args)
        if result.returncode != 0:
            raise RuntimeError(f"token create failed ({result.returncode}): {result.stderr}")
        token = result.stdout.strip()
        self.tokens.append(token)
        return token

    @contextlib.contextmanager
    def admin(self) -> Iterator[admin_pb2_grpc.AdminStub]:
        """The Admin service over the Unix socket, as the CLI reaches it."""
        with grpc.insecure_channel(f"unix:{self.admin_socket}") as channel:
            yield admin_pb2_grpc.AdminStub(channel)

    def agent_tls_name(self, node: str) -> str:
        """The name the leader dials node ``node``'s agent by (its key on record's:
        ``spiffe.key_host``); "" while the node is not enrolled."""
        info = self.list_nodes().get(node)
        if info is None or not info.key_pin:
            return ""
        td = spiffe.trust_domain(pki.load_cert_pem(self.ca_pem))
        return spiffe.key_host(td, info.key_pin)

    def list_nodes(self) -> dict[str, admin_pb2.NodeInfo]:
        with self.admin() as admin:
            reply = admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=10)
        return {n.name: n for n in reply.nodes}

    def wait_for_nodes(
        self, names: Iterable[str], *, online: bool = True, timeout: float = 20.0
    ) -> dict[str, admin_pb2.NodeInfo]:
        """Poll the leader's node list until every named node is online (or offline)."""
        wanted = set(names)
        found: dict[str, admin_pb2.NodeInfo] = {}

        def done() -> bool:
            nonlocal found
            found = self.list_nodes()
            return all(n in found and found[n].online == online for n in wanted)

        state = "online" if online else "offline"
        wait_until(done, timeout, f"nodes {sorted(wanted)} {state}", interval=0.1)
        return found

    def wait_for_nodes_online(
        self, names: Iterable[str], timeout: float = 20.0
    ) -> dict[str, admin_pb2.NodeInfo]:
        return self.wait_for_nodes(names, online=True, timeout=timeout)

    # --- channels -----------------------------------------------------------------------------

    def leader_credentials(self) -> tuple[bytes, bytes]:
        """The leader's certificate chain and key (DATA/tls): what it calls agents with. A
        pair that belongs together: the leader renewing its certificate writes leader.key
        first, then leader.pem, and a read between the two found the old certificate with
        the new key (KEY_VALUES_MISMATCH in the session 70 project CI). Read again until the
        two match (a few seconds at most); a pair that stays apart is returned as it is."""
        deadline = time.monotonic() + 5
        while True:
            chain = self.tls_cert_path.read_bytes()
            key = self.tls_key_path.read_bytes()
            try:
                matches = pki.key_matches(pki.load_certs_pem(chain)[0], pki.load_key_pem(key))
            except (PKIError, ValueError, IndexError):
                matches = False
            if matches or time.monotonic() > deadline:
                return chain, key
            time.sleep(0.05)

    def join_channel(self) -> grpc.Channel:
        """Server-TLS channel to the join port, trusting the cluster CA."""
        return secure_channel(self.join_target, self.ca_pem)

    @contextlib.contextmanager
    def enrolment(self) -> Iterator[enrolment_pb2_grpc.EnrolmentStub]:
        with self.join_channel() as channel:
            yield enrolment_pb2_grpc.EnrolmentStub(channel)

    def control_channel(self, cert_pem: bytes, key_pem: bytes) -> grpc.Channel:
        """Mutual-TLS channel to the control port with the given client certificate."""
        return secure_channel(self.control_target, self.ca_pem, cert_pem, key_pem)

    # --- agents -------------------------------------------------------------------------------

    def agent_config(
        self, name: str, address: str, token: str | None, root: Path
    ) -> dict[str, dict[str, object]]:
        return {
            "node": {"name": name, "addresses": [address]},
            "leader": {"address": self.address, "ca_pin": self.ca_pin(), "join_token": token},
            "agent": {
                "data_dir": root / "data",
                "heartbeat_interval": self.agent_heartbeat_interval,
            },
        }

    def add_agent(
        self,
        name: str,
        address: str,
        *,
        token: str | None = None,
        token_file: bool = False,
        extra_config: Mapping[str, Mapping[str, object]] | None = None,
        start: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> Agent:
        """Write an agent's config (a new one-time token unless ``token`` is given; with
        ``token_file`` in a 0600 file named by ``join_token_file``) and, with ``start``, run it
        until its NodeAgent port accepts connections (it has enrolled)."""
        if name in self.agents:
            raise ValueError(f"agent {name!r} already added")
        if token is None:
            token = self.create_token(name, address)
        root = self.root / "agents" / name
        config = self.agent_config(name, address, token, root)
        if token_file:
            root.mkdir(parents=True, exist_ok=True)
            path = root / "join-token"
            path.write_text(token + "\n")
            path.chmod(0o600)
            config["leader"].update(join_token=None, join_token_file=path)
        config = merge_config(config, extra_config)
        agent = Agent(name, address, root, config)
        self.agents[name] = agent
        if start:
            agent.start(env, timeout)
        return agent

    # --- evidence -----------------------------------------------------------------------------

    def daemons(self) -> list[Daemon]:
        return [self.leader, *self.agents.values()]

    def logs_text(self) -> str:
        """Every daemon's log so far, each under a header line."""
        return "\n".join(f"=== {d.name} ===\n{d.log_text()}" for d in self.daemons())

    def secrets(self) -> dict[str, str]:
        """Secret strings that must never appear in a log: description -> secret."""
        found: dict[str, str] = {}
        for token in self.tokens:
            token_id, _, secret = token.partition(".")
            found[f"secret of token {token_id}"] = secret
        keys = [self.ca_key_path, self.tls_key_path] + [a.key_file for a in self.agents.values()]
        for key in keys:
            if key.exists():
                for i, line in enumerate(pem_body_lines(key.read_bytes())):
                    found[f"line {i} of {key.name}"] = line
        if self.passphrase_path.exists():
            found["CA passphrase"] = self.passphrase_path.read_text().strip()
        return found

    def find_secrets(self, text: str, extra: Iterable[str] = ()) -> list[str]:
        """What secret material appears in ``text`` (descriptions, not the secrets)."""
        hits = [what for what, secret in self.secrets().items() if secret and secret in text]
        hits += [f"extra secret #{i}" for i, s in enumerate(extra) if s and s in text]
        if "PRIVATE KEY" in text:
            hits.append("a PEM private key header")
        return hits

    def store_rows(
        self, tables: Sequence[str] = ("nodes", "tokens"), *, ignore: Iterable[str] = ()
    ) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of ``tables``, read from the SQLite file in read-only mode; columns named
        in ``ignore`` (e.g. ``last_heartbeat`` while agents run) are left out."""
        skip = set(ignore)
        db = sqlite3.connect(f"{self.store_path.as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            rows = {}
            for table in tables:
                columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
                keep = ", ".join(c for c in columns if c not in skip)
                query = f"SELECT {keep} FROM {table} ORDER BY 1"  # noqa: S608 - our own names
                rows[table] = [tuple(r) for r in db.execute(query)]
            return rows
        finally:
            db.close()

    def announce_epoch(self, epoch: int) -> None:
        """Let a test that stands in for the leader command agents with ``epoch``: agents obey
        only an epoch the leader announced (``nodeagent.trust``), so raise the leader's epoch
        floor (what ``tlsroll epoch advance`` keeps) in its store, never lowering it; its
        heartbeat replies (and the answer to an agent that asks) then announce it."""
        with contextlib.closing(sqlite3.connect(self.store_path, timeout=10)) as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch_floor', ?) ON CONFLICT(key)"
                " DO UPDATE SET value = MAX(CAST(value AS INTEGER), excluded.value)",
                (str(epoch),),
            )
            db.commit()
        self.notice_store_written()

    def notice_store_written(self) -> None:
        """Make a running leader take in what a test wrote to its store file directly. The
        leader is its store's only writer and keeps what heartbeats need in memory until it
        writes (``leader.service.Snapshot``); ``tlsroll epoch advance`` is a write of its
        own that changes nothing here (the floor it sets is at most the one just written,
        no node reporting a higher epoch in these tests)."""
        if not self.leader.running:
            return  # a leader that starts reads the file anew
        with self.admin() as admin:
            try:
                admin.AdvanceEpoch(admin_pb2.AdvanceEpochRequest(), timeout=CLI_TIMEOUT)
            except grpc.RpcError as exc:
                # Refused while a rollout runs: its own writes make the leader read anew.
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise

    def newest_rollout(self) -> dict[str, Any]:
        """The newest rollout as ``tlsroll schema show --json`` shows it."""
        shown = self.cli("schema", "show", "--json")
        assert shown.returncode == 0, shown.stderr
        rollout: dict[str, Any] = json.loads(shown.stdout)["rollouts"][0]
        return rollout

    def schema_json(self, rollout_id: str = "", *, limit: int = 1) -> dict[str, Any]:
        """The data ``tlsroll schema show --json`` prints (``limit=0``: ``--all``), asked of
        the leader over its admin socket as that command asks (``fetch_schema_json``), but
        from this process: for the waits that look again and again. A look as a CLI process
        costs a few tenths of a second of CPU (a process that starts and imports), and polled
        every 50 ms those took a core from the daemons under test; what a test asserts about
        the command itself it still asks of the command (``cli``)."""
        leader = Leader(self.admin_socket)
        try:
            data: dict[str, Any] = fetch_schema_json(leader, rollout_id, limit=limit)
        finally:
            leader.close()
        return data

    def poll_newest_rollout(self) -> dict[str, Any]:
        """``newest_rollout`` by ``schema_json``: for a wait's condition."""
        rollout: dict[str, Any] = self.schema_json()["rollouts"][0]
        return rollout

    def store_table(self, table: str) -> list[dict[str, Any]]:
        """The rows of ``table`` as dicts by column name (read-only, like ``store_rows``)."""
        db = sqlite3.connect(f"{self.store_path.as_uri()}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            query = f"SELECT * FROM {table} ORDER BY 1"  # noqa: S608 - our own names
            return [dict(r) for r in db.execute(query)]
        finally:
            db.close()

    # --- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Terminate every process this cluster started; remove its temp dir. Idempotent."""
        errors: list[BaseException] = []
        for daemon in [*self.agents.values(), self.leader]:
            try:
                daemon.close()
            except Exception as exc:  # keep going: every process must be stopped
                errors.append(exc)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AdminTokenCluster(Cluster):
    """A ``Cluster`` whose ``create_token`` asks the leader over its admin socket, from this
    process, what ``tlsroll token create`` asks it (``CreateToken``, the same request): for
    tests that need tokens only to enrol agents (``add_agent``, ``tests.nodeside.Node``). A
    CLI run costs a few tenths of a second of CPU, one per agent; what a test asserts about
    the command it still runs as the command (``cli``, or ``Cluster.create_token``)."""

    def create_token(
        self,
        node: str,
        *addresses: str,
        dns: Sequence[str] = (),
        ttl: str = "1h",
        uses: int = 1,
        description: str = "",
    ) -> str:
        request = admin_pb2.CreateTokenRequest(
            ttl_seconds=parse_duration(ttl, "--ttl"),
            uses=uses,
            description=description,
            node_name=node,
            addresses=addresses,
            dns_names=dns,
        )
        with self.admin() as admin:
            try:
                reply = admin.CreateToken(request, timeout=CLI_TIMEOUT)
            except grpc.RpcError as exc:
                raise RuntimeError(f"token create failed ({exc.code()}): {exc.details()}") from None
        token = str(reply.token)
        self.tokens.append(token)
        return token
