"""Issue 15, session 41: a switched agent kept ``cryptography`` (about 8 MiB of its Rust
library, and its Python modules) for months: the certificate work of a switch, a renewal and
a revocation list imported it into the agent, where it stayed until the agent restarted. That
work is now its crypto worker's (``nodeagent.cryptoworker``), a child that is gone once idle.

A real leader and a real agent managing a real reference server, the agent's certificates 20 s
long (``AGENT_CERT``, the leader's test hook ``TLSROLL_TEST_AGENT_CERT_SECONDS`` under the
minute leader.toml takes: renewed at 6-8 s, and every 6-8 s after, through the rollout too, as
in tests/test_reenrol_ended.py), its worker's idle time short; the agent's memory map is read
while it runs, as ``bench.rollout`` reads its RSS."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leader.config import TEST_AGENT_CERT_ENV
from tests.cluster import Cluster, child_env, wait_until
from tests.refserver_helper import RefServer, write_toml
from tlsroll.defaults import BOOTSTRAP_PORT

# Seconds the agent's certificates live (``leader.config.TEST_AGENT_CERT_ENV``; leader.toml's
# ``agent_cert_lifetime`` a minute): a renewal is seconds away.
AGENT_CERT = 20

# The worker's idle time in these agents (seconds): each wait for it to stop is this long, and
# nothing here needs a worker kept between calls (its ops are stateless).
IDLE = 1.0

# The real agent daemon (as the tlsroll-agent script runs it), its worker's idle time short.
# (An agent of code before the worker has none to set: the same test, for showing it fails.)
HARNESS = """
import sys
from tlsroll import lean
lean.keep_out()
try:
    from nodeagent import cryptoworker
    cryptoworker.IDLE_SECONDS = float(sys.argv[2])
except ImportError:
    pass
from nodeagent.daemon import main
sys.exit(main(["--config", sys.argv[1]]))
"""

RUST = "_rust.abi3.so"  # cryptography's library (OpenSSL inside)


def holds_cryptography(pid: int) -> bool:
    return RUST in Path(f"/proc/{pid}/maps").read_text()


def workers_of(pid: int) -> list[int]:
    """The agent's crypto worker children running now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if b"cryptoworker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def running_agent(
    cluster: Cluster, tmp_path: Path, name: str, address: str, server: RefServer
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real agent for node ``name`` managing ``server``: the process and its log file
    (stderr). Stopped (SIGTERM, then killed) on the way out."""
    config = cluster.agent_config(
        name, address, cluster.create_token(name, address), tmp_path / "agent"
    )
    config["server"] = {"driver": "reference", "config_file": server.config_path}
    config_file = write_toml(tmp_path / "agent.toml", config)
    log_file = tmp_path / "agent.log"
    with log_file.open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-c", HARNESS, str(config_file), str(IDLE)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=child_env(),
        )
    try:
        yield agent, log_file
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def said(log_file: Path, event: str) -> bool:
    return event in log_file.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_renewed_revoked_and_switched_agent_holds_no_cryptography(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """The agent's maps, read once its worker has stopped (idle): after a revocation list and
    a renewal, and after a real enable-tls rollout has switched its node and started its
    bootstrap service. Each time the agent started a worker for that work and holds no
    ``cryptography`` after it. (Run once, with the bootstrap service: a run without it, which
    showed the switch's part alone before the service's PAKE moved to the worker too, proves
    nothing more now; the service's part alone: ``tests/test_bootstrap_worker.py``.)"""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        cluster.write_leader_config({"agent_cert_lifetime": 60})
        cluster.start_leader({TEST_AGENT_CERT_ENV: str(AGENT_CERT)})
        address = loopback()
        server = RefServer(tmp_path / "server", address)
        server.start()
        restarted: int | None = None
        try:
            with running_agent(cluster, tmp_path, "crypto1", address, server) as run:
                agent, log = run
                cluster.wait_for_nodes_online(["crypto1"], timeout=60)
                # A revocation list (the leader sends it with a heartbeat reply) ...
                revoked = cluster.cli("ca", "revoke", "--unknown", "5eec")
                assert revoked.returncode == 0, revoked.stderr
                wait_until(lambda: said(log, "crl.updated"), 60, "the agent takes the list")
                # ... and a renewal, at 30-40 % of the certificate's life.
                wait_until(lambda: said(log, "agent.certificate_renewed"), 90, "the agent renews")
                wait_until(lambda: not workers_of(agent.pid), 60, "the worker stops when idle")
                assert not holds_cryptography(agent.pid), "the renewal or the list loaded it"
                assert said(log, "cryptoworker.started") and said(log, "cryptoworker.idle_stopped")

                # A real enable-tls rollout switches the node (a key, its CSR, the stage).
                secret = tmp_path / "password"
                secret.write_text("lean-agent-switch-password-7Qx\n")
                secret.chmod(0o600)
                start = cluster.cli(
                    *("rollout", "start", "--scope", "cluster", "--password-file", str(secret)),
                    *("--yes", "--wait"),
                )
                rollout = cluster.newest_rollout()
                assert start.returncode == 0 and rollout["state"] == "completed", rollout
                wait_until(lambda: port_open(address, BOOTSTRAP_PORT), 30, "its service")
                pid_file = Path(str(server.settings["data_dir"])) / "refserver.pid"
                restarted = int(pid_file.read_text()) if pid_file.exists() else None
                wait_until(lambda: not workers_of(agent.pid), 60, "the worker stops when idle")
                assert agent.poll() is None
                text = log.read_text(errors="replace")
                assert "stage.csr_created" in text
                # (a cross-check only: the list and the renewals start workers too; what shows
                # the switch's key work ran outside the agent is its CSR, and no cryptography
                # in the agent after it)
                assert text.count("cryptoworker.started") >= 2
                assert not holds_cryptography(agent.pid), "the switch loaded it"
        finally:
            server.close()
            if restarted is not None:  # the switch restarted the server from the agent
                with contextlib.suppress(ProcessLookupError):
                    os.kill(restarted, signal.SIGKILL)


def port_open(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), 0.5).close()
    except OSError:
        return False
    return True
