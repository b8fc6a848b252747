"""The shape of what makes tlsroll cheap to run (issue 15), without timing anything: which
modules a running agent holds, what the leader does per heartbeat, what ``schema show`` draws.
The figures themselves come from ``bench/`` (``make bench-rollout``, ``make bench-agents``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import grpc
import pytest
import tenacity
from tenacity import AsyncRetrying

from leader import GRPC_EXPERIMENTS, agent_client
from leader.agent_client import AgentClient, AgentPool, StepFailed
from leader.observe import OBSERVE_AT_ONCE, observe
from leader.planner import NodesOffline, Unreachable
from leader.rollout_core import (
    Change,
    NodeRecord,
    NodeState,
    Rollout,
    RolloutEvent,
    RolloutState,
    Scope,
)
from leader.schema_store import RolloutMeta, SchemaStore
from leader.store import Node, NotFound, Store
from tests import grpc_env
from tests.cluster import Cluster, child_env, secure_channel, wait_until
from tests.conftest import IssuedCert
from tests.leader_rig import leader_with_a_node
from tests.nodeside import Node as NodeSide
from tests.private_files import write_private
from tests.refserver_helper import RefServer, write_toml
from tlsroll import daemon, dbthread, httpcheck, pki, probe, tls
from tlsroll.defaults import AGENT_PORT, BOOTSTRAP_PORT
from tlsroll.errors import TransientError
from tlsroll.httpcheck import port_open
from tlsroll.v1 import agent_pb2, agent_pb2_grpc, leader_pb2, leader_pb2_grpc

if TYPE_CHECKING:
    from leader.schema_store import RolloutRow
    from nodeagent.drivers import Driver
    from tests.test_engine import Leader, World

# Never in a running agent: a terminal UI (rich, and pygments through it), the admin CLI's
# libraries, the other roles.
NOT_IN_AGENT = {"rich", "pygments", "click", "jinja2", "zxcvbn", "prometheus_client"}
OTHER_ROLES = {"leader", "workstation", "refserver"}

# Runs the real agent daemon (``nodeagent.daemon.main``, as the tlsroll-agent script does) and,
# once its NodeAgent port answers (and, given a fifth argument, once that file exists: the test
# has done what it wanted with the agent), writes the modules the process holds and stops it
# (SIGTERM, the graceful stop). Only the standard library is imported besides the daemon.
HARNESS = """
import os, signal, socket, sys, threading, time
address, port, out, config = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
go = sys.argv[5] if len(sys.argv) > 5 else None

def watch():
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), 0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    time.sleep(1.0)  # a heartbeat and the bootstrap service's first sync
    while go and not os.path.exists(go) and time.monotonic() < deadline + 150:
        time.sleep(0.1)
    warmup = sys.modules.get("nodeagent.warmup")
    if warmup is not None:  # the imports queued ahead (a warming Check's) first: bounded
        warmup._WARMER.submit(int).result(timeout=60)
    loaded = sorted(name for name, module in list(sys.modules.items()) if module is not None)
    with open(out, "w") as f:
        f.write("\\n".join(loaded))
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
from nodeagent.daemon import main
sys.exit(main(["--config", config]))
"""


def test_the_running_agent_holds_no_terminal_ui_nor_cli_libraries(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        address = loopback()
        token = cluster.create_token("lean1", address)
        config = write_toml(
            tmp_path / "agent.toml",
            cluster.agent_config("lean1", address, token, tmp_path / "agent"),
        )
        out = tmp_path / "modules.txt"
        try:
            done = subprocess.run(
                [sys.executable, "-c", HARNESS, address, str(AGENT_PORT), str(out), str(config)],
                capture_output=True,
                text=True,
                timeout=90,  # the harness gives the agent 40 s to listen, then stops it
                env=child_env(),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:  # what the agent said, to see where it hung
            said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            raise AssertionError(f"the agent did not stop in time:\n{said[-3000:]}") from None
        assert done.returncode == 0, done.stderr
        assert "agent.started" in done.stderr, done.stderr
        modules = out.read_text().split()
    tops = {m.split(".")[0] for m in modules}
    assert "nodeagent" in tops and "grpc" in tops  # it did run
    assert tops & NOT_IN_AGENT == set()
    assert tops & OTHER_ROLES == set()
    # Nor greenlet, which structlog imports whenever it is installed (``tlsroll.lean``).
    assert "greenlet" not in tops


@contextlib.contextmanager
def harness_agent(
    cluster: Cluster, tmp_path: Path, name: str, address: str, server: RefServer
) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    """A real agent (through ``HARNESS``) for node ``name`` managing ``server``: the process,
    the file it lists its modules in, and the file whose creation makes it stop. Killed on
    the way out if it is still running."""
    config = cluster.agent_config(
        name, address, cluster.create_token(name, address), tmp_path / "agent"
    )
    config["server"] = {"driver": "reference", "config_file": server.config_path}
    out, go = tmp_path / "modules.txt", tmp_path / "go"
    agent = subprocess.Popen(
        [
            sys.executable, "-c", HARNESS, address, str(AGENT_PORT), str(out),
            str(write_toml(tmp_path / "agent.toml", config)), str(go),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        yield agent, out, go
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()


class Harnessed(NamedTuple):
    """What ``harnessed_agent`` yields."""

    cluster: Cluster
    address: str  # the node's: its reference server's and its agent's
    agent: subprocess.Popen[str]
    out: Path  # where the agent lists its modules
    go: Path  # created: the agent lists them and stops


@contextlib.contextmanager
def harnessed_agent(tmp_path: Path, loopback: Callable[[], str], name: str) -> Iterator[Harnessed]:
    """A real leader, and for node ``name`` a real reference server managed by a real agent
    (``harness_agent``) on an address of its own; all stopped on the way out."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        address = loopback()
        server = RefServer(tmp_path / "server", address)
        server.start()
        try:
            with harness_agent(cluster, tmp_path, name, address, server) as (agent, out, go):
                yield Harnessed(cluster, address, agent, out, go)
        finally:
            server.close()


def test_an_idle_agent_holds_no_http_library_until_its_bootstrap_service_runs(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Issue 15: an idle agent held aiohttp (10 MiB of its 74): the reference driver's client
    for the status every heartbeat asks, and the bootstrap service, imported at start though it
    runs only once the node serves https with an auth password. It held cryptography too (10
    MiB more) for its identity check, its enrolment and the check of every leader call. A
    real agent managing a real reference server, enrolled, heartbeating with its status and
    answering the leader's call, holds none of them now."""
    with harnessed_agent(tmp_path, loopback, "lean2") as (cluster, address, agent, out, go):
        # The leader's kind of call, as the leader makes it: checked against the caller's
        # certificate (its identity and revocation) on every call.
        chain, key = cluster.leader_credentials()
        target = f"{address}:{AGENT_PORT}"
        status = wait_for_status(cluster, "lean2", target, chain, key)
        assert status.node_name == "lean2"
        go.touch()
        _, said = agent.communicate(timeout=90)
        assert agent.returncode == 0, said
        listed = json.loads(cluster.cli("nodes", "--json").stdout)
    (node,) = listed
    assert node["name"] == "lean2" and node["server"] == "http"  # its status, from a heartbeat
    modules = out.read_text().split()
    assert "nodeagent.drivers" in modules
    assert {m for m in modules if m.split(".")[0] == "aiohttp"} == set()
    assert "nodeagent.bootstrap_server" not in modules
    # Nor X.509 code (issue 15, 10 MiB more): this agent enrolled, checked its identity, got
    # the leader's heartbeat replies and answered its calls, each without cryptography.
    assert {m for m in modules if m.split(".")[0] == "cryptography"} == set()
    assert "tlsroll.pki" not in modules


def test_a_switched_agent_serves_its_bootstrap_service_without_aiohttp(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Issue 15: once its node was switched with an auth password, an agent ran its bootstrap
    service on aiohttp.web and kept it (about 10 MiB) for months. A real agent, switched by a
    real enable-tls rollout, serves the service on 9443 (h11 on asyncio streams) and holds no
    aiohttp."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        address = loopback()
        server = RefServer(tmp_path / "server", address)
        server.start()
        try:
            with harness_agent(cluster, tmp_path, "lean3", address, server) as (agent, out, go):
                cluster.wait_for_nodes_online(["lean3"], timeout=60)
                secret = tmp_path / "password"
                secret.write_text("lean-agent-switch-password-7Qx\n")
                secret.chmod(0o600)
                start = cluster.cli(
                    *("rollout", "start", "--scope", "cluster", "--password-file", str(secret)),
                    *("--yes", "--wait"),
                )
                rollout = cluster.newest_rollout()
                shown = json.dumps(rollout)
                assert start.returncode == 0 and rollout["state"] == "completed", shown
                wait_until(lambda: port_open(address, BOOTSTRAP_PORT), 30, "the bootstrap service")
                go.touch()
                _, said = agent.communicate(timeout=120)
            assert agent.returncode == 0, said
        finally:
            # The switch restarted the server from the agent: that one is no child of ours.
            pid_file = Path(str(server.settings["data_dir"])) / "refserver.pid"
            restarted = int(pid_file.read_text()) if pid_file.exists() else None
            server.close()
            if restarted is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(restarted, signal.SIGKILL)
    modules = out.read_text().split()
    assert "nodeagent.bootstrap_server" in modules  # it did serve
    assert {m for m in modules if m.split(".")[0] == "aiohttp"} == set()
    assert "h11" in modules


# Runs the real leader daemon (``leader.daemon.main``, as the tlsroll-leader script does) and,
# once the file named by its second argument exists (the test saw it answer), writes the modules
# the process holds to the first and stops it (SIGTERM). Only the standard library's os,
# signal, sys, threading and time are imported besides the daemon.
LEADER_HARNESS = """
import os, signal, sys, threading, time
out, go = sys.argv[1], sys.argv[2]

def watch():
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the viewer's listener, the expiry watch's first check
    loaded = sorted(name for name, module in list(sys.modules.items()) if module is not None)
    with open(out, "w") as f:
        f.write("\\n".join(loaded))
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
from leader.daemon import main
sys.exit(main(sys.argv[3:]))
"""

# What a running leader needs only on a rare path, if ever, and so imports only there (issue 15):
# zoneinfo (with sysconfig, which it reads for TZPATH) for a configured maintenance_timezone,
# tenacity for a call to an agent tried again or a rollout command that met the engine's write,
# shutil (with bz2 and lzma), which argparse's help formatter imports for the terminal's width,
# greenlet, which structlog imports for a deprecated context the daemons never use.
NOT_IN_IDLE_LEADER = {"zoneinfo", "sysconfig", "tenacity", "shutil", "bz2", "lzma", "greenlet"}


def test_a_started_leader_holds_no_module_it_needs_only_on_a_rare_path(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Issue 15: the leader's RSS at 500 simulated nodes grew past its 120 MiB goal, about 1.5
    MiB of it modules a started leader holds for months and needs on rare paths only
    (``NOT_IN_IDLE_LEADER``). A real leader, started from ``tlsroll init``'s config with its
    viewer on, answering its health check, holds none of them."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        assert cluster.leader_config().get("viewer_port", 1) != 0  # its viewer is on
        out, go = tmp_path / "modules.txt", tmp_path / "go"
        config = ["--config", str(cluster.config_path)]
        cluster.leader.argv = [sys.executable, "-c", LEADER_HARNESS, str(out), str(go), *config]
        cluster.start_leader()
        go.touch()
        proc = cluster.leader.proc
        assert proc is not None
        assert proc.wait(timeout=60) == 0, cluster.leader.log_text()[-3000:]
        modules = out.read_text().split()
    assert "leader.runtime" in modules and "leader.viewer.server" in modules  # it did run
    tops = {m.split(".")[0] for m in modules}
    assert tops & NOT_IN_IDLE_LEADER == set()
    assert "leader.ca_renewal" not in modules


@pytest.mark.parametrize("columns", ["50", "120", "", "junk"])
def test_a_daemon_s_help_is_folded_as_argparse_folds_it_without_shutil(
    monkeypatch: pytest.MonkeyPatch, columns: str
) -> None:
    """``tlsroll.daemon.arguments`` reads the terminal's width without shutil (above), and its
    help is what argparse's own formatter makes of the same width (``COLUMNS``, else the
    terminal, else 80)."""
    monkeypatch.setenv("COLUMNS", columns)
    words = "a help text long enough to be folded at any width a terminal has " * 3
    ours = daemon.arguments("tlsroll-x", "a daemon")
    stock = argparse.ArgumentParser(prog="tlsroll-x", description="a daemon")
    for parser in (ours, stock):
        parser.add_argument("--config", required=True, help=words)
    assert ours.format_help() == stock.format_help()


def _refserver_script() -> str:
    """The installed ``tlsroll-refserver`` command, as pyproject.toml declares it."""
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    module, _, function = project["project"]["scripts"]["tlsroll-refserver"].partition(":")
    return f"import {module}\n{module}.{function}()\n"


@pytest.mark.parametrize("how", ["python -m refserver", "tlsroll-refserver"])
def test_the_reference_server_as_its_driver_starts_it_loads_neither_rich_nor_cryptography(
    how: str,
) -> None:
    """Issue 15, the freeze window: the reference driver starts ``python -P -m refserver`` at
    every restart, inside the switch's freeze, and structlog imported rich and pygments there
    merely because they are installed (about 40 ms of CPU per start, 4 MiB). ``python -m
    refserver`` keeps them out, as the agent does (``tlsroll.lean``); nor does it import
    ``cryptography`` (about 35 ms) for the served certificate's fingerprint. The installed
    command (a practice's own start of the server) is the same entry point. It still runs (here
    as far as ``--version``: everything the server imports)."""
    start = (
        "runpy.run_module('refserver', run_name='__main__', alter_sys=True)\n"
        if how == "python -m refserver"
        else _refserver_script()
    )
    code = (
        "import atexit, runpy, sys\n"
        "NEVER = ('rich', 'pygments', 'cryptography')\n"
        "def held():\n"
        "    print(' '.join(n for n in NEVER if sys.modules.get(n)))\n"
        "atexit.register(held)\n"
        "sys.argv = ['refserver', '--version']\n"
    ) + start
    done = subprocess.run(
        [sys.executable, "-P", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("tlsroll-refserver "), done.stdout
    assert lines[-1] == "", f"the reference server loaded {lines[-1]}"


def _refused_start(
    tmp_path: Path, script: str, args: list[str], never: tuple[str, ...], code: int, said: str
) -> None:
    """Run the installed command ``script`` (as pyproject.toml declares it) with ``args``
    (``{tmp}``: ``tmp_path``) and check it ends ``code``, saying ``said`` first (on stderr in
    one line when refused), having imported none of ``never``."""
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    module, _, function = project["project"]["scripts"][script].partition(":")
    argv = [script, *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    program = (
        "import atexit, sys\n"
        f"NEVER = {never!r}\n"
        "def held():\n"
        "    print('held: ' + ' '.join(n for n in NEVER if sys.modules.get(n)))\n"
        "atexit.register(held)\n"
        f"sys.argv = {argv!r}\n"
        f"import {module}\n"
        f"sys.exit({module}.{function}())\n"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert done.returncode == code, done.stderr
    said_on = done.stdout if code == 0 else done.stderr
    assert said_on.startswith(said), done.stderr
    assert code == 0 or len(done.stderr.splitlines()) == 1, done.stderr  # one line, as before
    assert done.stdout.splitlines()[-1] == "held: ", f"a refused {script} loaded {done.stdout}"


AGENT_REFUSED = {
    "help": (["--help"], 0, "usage: tlsroll-agent"),
    "missing": (["--config", "{tmp}/none.toml"], 2, "tlsroll-agent: config error: "),
    "bad": (["--config", "{tmp}/agent.toml"], 2, "tlsroll-agent: config error: "),
}
NOT_IN_A_REFUSED_AGENT = ("nodeagent.runtime", "grpc", "google.protobuf", "nodeagent.journal")


@pytest.mark.parametrize("case", list(AGENT_REFUSED))
def test_an_agent_refusing_its_config_or_showing_its_help_imports_no_daemon(
    tmp_path: Path, case: str
) -> None:
    """Session 74 (startcpu): ``tlsroll-agent`` reads its command line and config
    (``nodeagent.front``) before it imports the daemon (``nodeagent.runtime``: gRPC, protobuf,
    the journal, about half of a start's CPU), so ``--help`` and a config refused (missing, a
    table missing) cost about 0.1 s of CPU less, with the same line and exit code as before.
    The installed command, as pyproject.toml declares it."""
    (tmp_path / "agent.toml").write_text("[leader]\nbogus = 1\n")
    args, code, said = AGENT_REFUSED[case]
    _refused_start(tmp_path, "tlsroll-agent", args, NOT_IN_A_REFUSED_AGENT, code, said)


LEADER_REFUSED = {
    "help": (["--help"], 0, "usage: tlsroll-leader"),
    "missing": (["--config", "{tmp}/none.toml"], 2, "tlsroll-leader: config error: "),
    "bad": (["--config", "{tmp}/leader.toml"], 2, "tlsroll-leader: config error: "),
    "no data dir": (["--config", "{tmp}/nodir.toml"], 2, "tlsroll-leader: config error: "),
    "empty data dir": (["--config", "{tmp}/empty.toml"], 1, "tlsroll-leader: the data dir "),
}
NOT_IN_A_REFUSED_LEADER = ("leader.runtime", "grpc", "google.protobuf", "cryptography")


@pytest.mark.parametrize("case", list(LEADER_REFUSED))
def test_a_leader_refusing_its_config_or_data_dir_or_showing_its_help_imports_no_daemon(
    tmp_path: Path, case: str
) -> None:
    """Session 74 (leaderfront): ``tlsroll-leader`` reads its command line and config and
    checks its data dir (``leader.front``) before it imports the daemon (``leader.runtime``:
    gRPC, protobuf, ``cryptography``, the store), so ``--help``, a config refused (missing, a
    key missing) and a data dir refused (missing: exit 2; holding none of the leader's files,
    a disk not mounted yet: exit 1) cost about two thirds of the CPU less, with the same line
    and exit code as before. The installed command, as pyproject.toml declares it."""
    (tmp_path / "leader.toml").write_text("[leader]\nbogus = 1\n")
    (tmp_path / "empty").mkdir()
    for name, data in (("nodir", tmp_path / "none"), ("empty", tmp_path / "empty")):
        (tmp_path / f"{name}.toml").write_text(
            f'[leader]\ndata_dir = "{data}"\naddress = "127.0.0.2"\n'
        )
    args, code, said = LEADER_REFUSED[case]
    _refused_start(tmp_path, "tlsroll-leader", args, NOT_IN_A_REFUSED_LEADER, code, said)


@pytest.mark.parametrize("make_csr", [True, False])
def test_a_preflight_starts_loading_the_certificate_code_the_csr_after_it_needs(
    tmp_path: Path, loopback: Callable[[], str], make_csr: bool
) -> None:
    """Issue 15, the overhead before a rollout's first switch: the first node's CSR imported
    ``cryptography`` (about 40 ms) after its preflight's checks, while the whole rollout waited.
    A preflight that asks for the CSR (``make_csr``) now starts the crypto worker (which
    imports it, at a low priority) before its checks. Here a real agent gets only the
    leader's Preflight call (the leader's credentials, the epoch of a real rollout of another
    node), whose clock check fails: no CSR is made, and the worker was started all the same.
    A preflight that stages nothing starts nothing; the agent itself holds the certificate
    code either way (from the review: a disable-tls rollout left every agent holding about
    10 MiB until its restart; session 41: so did every switch)."""
    with harnessed_agent(tmp_path, loopback, "lean4") as (cluster, address, agent, out, go):
        other = NodeSide(cluster, "other", loopback(), tmp_path / "other")
        try:
            other.start()
            cluster.wait_for_nodes_online(["lean4", "other"], timeout=60)
            started = cluster.cli(
                *("rollout", "start", "--scope", "nodes", "--nodes", "other"),
                *("--password-file", str(_password_file(tmp_path)), "--yes", "--wait"),
            )
            assert started.returncode == 0, started.stderr
            epoch = int(cluster.newest_rollout()["epoch"])
            chain, key = cluster.leader_credentials()
            target = f"{address}:{AGENT_PORT}"
            wait_for_status(cluster, "lean4", target, chain, key)
            request = agent_pb2.PreflightRequest(
                command=agent_pb2.Command(rollout_id="r-warm", epoch=epoch),
                make_csr=make_csr,
            )
            request.leader_time.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
            name = cluster.agent_tls_name("lean4")
            with secure_channel(target, cluster.ca_pem, chain, key, name=name) as channel:
                checked = agent_pb2_grpc.NodeAgentStub(channel).Preflight(request, timeout=30)
            assert not checked.ok and "clock" in " ".join(checked.problems)
            assert not checked.csr_pem
            go.touch()
            _, said = agent.communicate(timeout=120)
            assert agent.returncode == 0, said
        finally:
            other.close()
    modules = out.read_text().split()
    assert "tlsroll.pki" not in modules  # the crypto worker's, never the agent's
    assert ("cryptoworker.started" in said) is make_csr
    assert "stage.csr_created" not in said  # no CSR ran: the preflight alone started it


def _password_file(tmp_path: Path) -> Path:
    secret = tmp_path / "password"
    secret.write_text("lean-agent-switch-password-7Qx\n")
    secret.chmod(0o600)
    return secret


def wait_for_status(
    cluster: Cluster, node: str, target: str, chain: bytes, key: bytes, timeout: float = 60.0
) -> agent_pb2.NodeStatus:
    """Node ``node``'s agent's GetStatus, called with the leader's credentials (and dialed by
    its key's name, as the leader dials it) once it is enrolled and answers."""
    deadline = time.monotonic() + timeout
    while True:
        name = cluster.agent_tls_name(node)
        if name:
            with secure_channel(target, cluster.ca_pem, chain, key, name=name) as channel:
                stub = agent_pb2_grpc.NodeAgentStub(channel)
                try:
                    return stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
        elif time.monotonic() > deadline:
            raise TimeoutError(f"{node}: not enrolled within {timeout} s")
        time.sleep(0.2)


# --- the leader at 500 nodes -------------------------------------------------------------------


def test_a_refusal_naming_hundreds_of_nodes_stays_short() -> None:
    """500 unreachable agents once made a message of 14 KiB, over gRPC's 16 KiB limit for a
    status with its framing: the admin saw "Stream removed", not why."""
    errors = {f"s{i:03d}": f"agent s{i:03d}: connection attempt timed out" for i in range(500)}
    text = str(Unreachable(errors))
    assert len(text) < 2000
    assert "s000" in text and "and 490 more" in text
    offline = str(NodesOffline([f"s{i:03d}" for i in range(500)]))
    assert len(offline) < 500 and "and 490 more" in offline


def test_a_finalize_refusal_naming_a_whole_practice_stays_short() -> None:
    """Right after phase 1 every workstation is still on http: the refusal names ten and
    counts the rest, so the admin reads why and not "Stream removed"."""
    from leader.commands import StillOnHttp
    from leader.rollout_core import Client

    at = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
    left = [
        Client(f"node{i % 3}", "http", f"192.168.1.{i}", f"ws-platz-{i:03d}", at, at, 5)
        for i in range(1, 250)
    ]
    text = str(StillOnHttp("r1", left, {f"node{i}": "no report yet" for i in range(3, 60)}))
    assert len(text) < 2000, len(text)
    assert "ws-platz-001" in text and "and 296 more (tlsroll schema show)" in text
    assert "tlsroll notify --remaining" in text and "--force" in text


class CountingAgents:
    """Agents that answer GetStatus and Check after a moment, counting the calls and how
    many are open at once."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0
        self.calls: Counter[str] = Counter()
        self.view = agent_pb2.ServerView(driver="bench", healthy=True, schemes=["http"])

    async def get(self, name: str) -> CountingAgents:
        return self

    async def close(self) -> None:
        return None

    async def _arrive(self, method: str) -> None:
        self.calls[method] += 1
        self.open += 1
        self.most = max(self.most, self.open)
        await asyncio.sleep(0.01)
        self.open -= 1

    async def get_status(self, request: object, timeout: float = 0) -> agent_pb2.NodeStatus:
        await self._arrive("get_status")
        return agent_pb2.NodeStatus(server=self.view)

    async def check(self, request: object, timeout: float = 0) -> agent_pb2.PreflightResponse:
        await self._arrive("check")
        return agent_pb2.PreflightResponse(ok=True, server=self.view)


async def test_observe_asks_a_bounded_number_of_agents_at_once() -> None:
    """Every first call opens a TLS connection: 500 at once timed out by the hundred."""
    agents = CountingAgents()
    ca = pki.CertificateAuthority.create()
    seen = await observe(agents, [f"s{i:03d}" for i in range(200)], ca.cert)  # type: ignore[arg-type]
    assert len(seen) == 200
    assert agents.most <= OBSERVE_AT_ONCE


async def test_observe_asks_each_agent_one_call() -> None:
    """Issue 15: planning asked every agent twice, GetStatus then Check; Check's answer
    carries the same ServerView, so it is asked alone, and what the plan sees is the same."""
    agents = CountingAgents()
    ca = pki.CertificateAuthority.create()
    seen = await observe(agents, [f"s{i:03d}" for i in range(20)], ca.cert)  # type: ignore[arg-type]
    assert agents.calls == Counter({"check": 20})
    assert all(s.reachable and s.schemes == ("http",) and not s.problems for s in seen.values())


# --- heartbeats ---------------------------------------------------------------------------------


def data_version(db: sqlite3.Connection) -> int:
    """Changes whenever another connection has committed to the file since ``db`` last asked."""
    return int(db.execute("PRAGMA data_version").fetchone()[0])


async def test_a_heartbeat_that_says_nothing_new_parses_nothing_and_writes_nothing(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Leader service on a real gRPC server with mutual TLS and a real store file: the
    caller's certificate is parsed once, not per heartbeat, and a heartbeat that says what the
    last one said is not written (the node's newest heartbeat is still what the store returns),
    while one that says something new is (with the next group commit; here when the test
    says: ``write_queued``)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    server, store, clock = rig.server, rig.store, rig.clock
    rig.service.batch_seconds = 3600
    parsed: list[bytes] = []
    load = pki.load_cert_pem

    def counting(data: bytes) -> object:
        parsed.append(data)
        return load(data)

    monkeypatch.setattr(pki, "load_cert_pem", counting)
    await server.start()
    watcher = sqlite3.connect(store.path)
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            beat = leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
            await stub.Heartbeat(beat, timeout=10)
            await rig.service.write_queued()
            written = data_version(watcher)
            for _ in range(3):
                clock[0] += dt.timedelta(seconds=5)
                await stub.Heartbeat(beat, timeout=10)
            assert data_version(watcher) == written  # nothing new: nothing written
            assert store.get_node("hb1").last_heartbeat == clock[0]  # yet the newest is known
            assert len(parsed) == 1  # parsed once, not per heartbeat
            clock[0] += dt.timedelta(seconds=5)
            await stub.Heartbeat(leader_pb2.HeartbeatRequest(agent_version="2"), timeout=10)
            assert store.get_node("hb1").agent_version == "2"  # known at once
            assert await rig.service.write_queued() == 1
            assert data_version(watcher) != written  # something new: written
            assert store.get_node("hb1").agent_version == "2"
    finally:
        watcher.close()
        await server.stop(None)
        store.close()


# --- schema show --------------------------------------------------------------------------------


def store_finished_rollout(cluster: Cluster, rollout_id: str, epoch: int) -> None:
    """A completed enable-tls rollout of one node, written to the leader's store."""
    at = dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(hours=epoch)
    schema = SchemaStore(cluster.store_path)
    try:
        rollout = Rollout(
            rollout_id, Change.ENABLE_TLS, Scope.of_nodes(["n1"]), ("n1",), epoch=epoch
        )
        row = schema.create(
            rollout.with_event(RolloutEvent.START),
            [NodeRecord("n1")],
            RolloutMeta(created_at=at, started_by="admin:test", leader_node=""),
            at,
        )
        ended = row.rollout.with_event(RolloutEvent.NODES_SETTLED)
        schema.save_states(row, ended, [NodeRecord("n1", NodeState.DONE)], at, "engine", None)
    finally:
        schema.close()


def test_schema_show_draws_the_newest_rollout_and_all_of_them_with_all(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """With a history of rollouts, `schema show` draws the active or latest one and says how
    many older ones it left out; `--all` (and `--all --json`) draws every one."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        for epoch, rid in enumerate(["r-old-1", "r-old-2", "r-newest"], start=1):
            store_finished_rollout(cluster, rid, epoch)
        cluster.start_leader()

        shown = cluster.cli("schema", "show")
        assert shown.returncode == 0, shown.stderr
        assert "r-newest" in shown.stdout
        assert "r-old-1" not in shown.stdout and "r-old-2" not in shown.stdout
        assert "2 older rollout(s) not shown: tlsroll schema show --all" in shown.stdout

        every = cluster.cli("schema", "show", "--all")
        assert every.returncode == 0, every.stderr
        assert all(rid in every.stdout for rid in ("r-old-1", "r-old-2", "r-newest"))
        assert "not shown" not in every.stdout

        data = json.loads(cluster.cli("schema", "show", "--json").stdout)
        assert [r["id"] for r in data["rollouts"]] == ["r-newest"]
        assert data["total_rollouts"] == 3
        data = json.loads(cluster.cli("schema", "show", "--all", "--json").stdout)
        assert [r["id"] for r in data["rollouts"]] == ["r-newest", "r-old-2", "r-old-1"]
        # How many are stored, also when none is left out and for one rollout asked for (it
        # said 0 beside the rollouts listed: session 56's README walk).
        assert data["total_rollouts"] == 3
        data = json.loads(cluster.cli("schema", "show", "--json", "--rollout", "r-old-1").stdout)
        assert [r["id"] for r in data["rollouts"]] == ["r-old-1"]
        assert data["total_rollouts"] == 3

        one = cluster.cli("schema", "show", "--rollout", "r-old-1")
        assert "r-old-1" in one.stdout and "r-newest" not in one.stdout

        # --watch of an ended rollout: its states as lines, the table, and it stops by itself
        watched = cluster.cli("schema", "show", "--watch")
        assert watched.returncode == 0, watched.stderr
        assert "rollout r-newest: completed" in watched.stdout and "node n1: done" in watched.stdout
        watched = cluster.cli("schema", "show", "--watch", "--json", "--rollout", "r-old-1")
        assert json.loads(watched.stdout)["id"] == "r-old-1"

        missing = cluster.cli("schema", "show", "--rollout", "r-nope")
        assert missing.returncode == 1 and missing.stdout == ""
        assert missing.stderr.strip() == (
            "tlsroll: error: no rollout 'r-nope' (see: tlsroll schema show --all)"
        )


# Runs ``tlsroll ARGS`` as its console script does (``tlsroll.cli.main``) and, as the process
# exits, writes the modules it imported.
CLI_HARNESS = """
import atexit, sys
out, args = sys.argv[1], sys.argv[2:]

def written():
    with open(out, "w") as f:
        f.write("\\n".join(sorted(n for n, m in list(sys.modules.items()) if m is not None)))

atexit.register(written)
from tlsroll.cli import main
sys.exit(main(args))
"""

# Never in `tlsroll schema show`: the certificate code (cryptography: 40 ms), the daemons'
# libraries, the notice templates and password policy, the other roles; nor grpcio (50 ms: its
# core imports asyncio and grpc.aio; the schema is read with leader.cli.unary on h2, which
# brings h2, hpack, hyperframe and, through hpack, logging, but no asyncio); nor protobuf (a
# quarter of what was left: the schema comes as JSON, from the leader's SchemaViewJson).
NOT_IN_SCHEMA_SHOW = {
    "cryptography", "aiohttp", "structlog", "spake2", "jinja2", "zxcvbn", "tenacity",
    "nodeagent", "workstation", "refserver", "grpc", "asyncio", "google",
}  # fmt: skip
# ... nor the leader's daemon parts: the store, the engine, the --cert-dir checks; nor the pure
# core's tables, records and enums, the messages and their codecs (the JSON has the words), the
# clients' reports (tlsroll.clients), the passphrase generator of `init` (secrets); nor rich
# (about 40 ms to import it and draw one rollout: leader.cli.plain draws the same tables).
NOT_IN_SCHEMA_SHOW_LEADER = {
    "leader.store", "leader.schema_store", "leader.engine", "leader.byo", "leader.node_check",
    "leader.viewer", "leader.cli.rollout", "leader.cli.password", "leader.cli.cluster_cmd",
    "leader.rollout_core", "leader.rollout_enums", "leader.wire", "leader.schema_wire",
    "leader.states", "tlsroll.v1", "tlsroll.wire", "tlsroll.clients", "secrets", "rich",
}  # fmt: skip


def imported_by(cluster: Cluster, out: Path, *args: str, code: int = 0) -> tuple[str, set[str]]:
    """What ``tlsroll ARGS`` printed (stdout, or stderr with a ``code`` other than 0), and the
    modules the process had imported by its end; it must exit with ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", CLI_HARNESS, str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
        check=False,
    )
    assert done.returncode == code, (done.stdout, done.stderr)
    return done.stdout if code == 0 else done.stderr, set(out.read_text().split())


def test_schema_show_imports_what_it_draws_with_and_nothing_else(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """An admin runs `schema show` often (and --watch while a rollout runs): it once imported
    every command's libraries and, through the leader's codecs, cryptography, for 270 ms
    before it asked the leader anything; then grpcio (with asyncio), the Admin service's
    messages and the pure core, for about 80 ms more, and rich for 40 ms. Its text is drawn
    with leader.cli.plain; with --json not even that is imported."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        store_finished_rollout(cluster, "r-lean", 1)
        cluster.start_leader()
        text, modules = imported_by(cluster, tmp_path / "text.txt", "schema", "show")
        assert "r-lean" in text and "done" in text  # it did draw the rollout
        data, json_modules = imported_by(cluster, tmp_path / "json.txt", "schema", "show", "--json")
        assert json.loads(data)["rollouts"][0]["id"] == "r-lean"
    for seen in (modules, json_modules):
        tops = {m.split(".")[0] for m in seen}
        assert "leader.cli.unary" in seen  # it did talk to the leader, without grpcio
        assert "h2.connection" in seen  # HTTP/2 by h2, not by hand
        assert tops & NOT_IN_SCHEMA_SHOW == set()
        assert {m for m in seen if m.startswith(tuple(NOT_IN_SCHEMA_SHOW_LEADER))} == set()
    assert "leader.cli.plain" in modules and "leader.cli.plain" not in json_modules


def test_admin_commands_import_neither_grpcio_nor_the_certificate_code(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Every admin command's Admin call is one unary call by ``leader.cli.unary`` (h2), not
    grpcio (about 50 ms of import, its core's asyncio and a channel's threads); the
    certificate code (cryptography, about 50 ms) is imported by the commands that use it
    (``init``), not by every command of ``cluster_cmd``. Session 37 measured a command's CPU
    before and after, against a real leader: `nodes` 355 -> 300 ms, `token list` 425 -> 335,
    `token create` 378 -> 311 (3 rounds of 8)."""
    node_address = loopback()
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        for args in (
            ("token", "create", "--node", "n1", "--address", node_address, "--ttl", "1h"),
            ("token", "list"),
            ("nodes",),
            ("nodes", "--json"),
        ):
            out = tmp_path / ("-".join(args).replace("/", "_") + ".txt")
            _, seen = imported_by(cluster, out, *args)
            tops = {m.split(".")[0] for m in seen}
            assert "leader.cli.unary" in seen and "tlsroll.v1.admin_pb2" in seen, args
            assert tops & {"grpc", "cryptography"} == set(), (args, tops & {"grpc", "cryptography"})
        listed = imported_by(cluster, tmp_path / "again.txt", "token", "list", "--json")[0]
        assert [t["node_name"] for t in json.loads(listed)] == ["n1"]  # the create did reach it


# What no command below imports, heavy and needed elsewhere only: the certificate code
# (cryptography: `init`, `rollout --cert-dir`), the planner, the notice's templates and the
# password policy, the workstation's code, the leader's store (with SQLite, structlog and gRPC's
# helpers); nor rich (25 ms for its tables), as none of them draws a table.
NOT_IN_COMMON_COMMANDS = {
    "cryptography", "jinja2", "zxcvbn", "workstation", "rich", "grpc", "sqlite3", "structlog",
}  # fmt: skip
NOT_IN_COMMON_COMMANDS_LEADER = {
    "leader.byo", "leader.planner", "leader.cli.join_merge", "leader.store", "leader.db",
}  # fmt: skip


def test_the_common_admin_commands_and_help_import_only_what_they_run(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """The test suite runs the CLI as a program about a thousand times (session 65's process
    accounting: 0.17 s of CPU each); `tlsroll --help` imported every command's module to list
    them (the workstation's connection code, cryptography, jinja2, rich, the planner: 0.24 s of
    CPU), every `rollout` command and `plan` the certificate code of ``--cert-dir``
    (``leader.byo``, some 60 ms) and the planner, `token create` and `ca revoke` rich's tables
    and the join script's parts, `ca revoke` and `nodes remove` the leader's whole store for
    two of its rules. Each imports what it runs now (figures: docs/performance.md, session
    66)."""
    node_address = loopback()
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        store_finished_rollout(cluster, "r-lean", 1)
        cluster.start_leader()
        ran: dict[tuple[str, ...], set[str]] = {}

        def run(*args: str, code: int = 0) -> str:
            name = "-".join(args).replace("/", "_")[:80]
            said, ran[args] = imported_by(cluster, tmp_path / f"{name}.txt", *args, code=code)
            return said

        listed = run("--help")
        assert "notify " in listed and "client " in listed and "workstations " in listed
        assert "rollout " in listed and "Start and steer the switch to https." in listed
        assert "abort " in run("rollout", "--help")  # the group's own commands, as listed
        created = run("token", "create", "--node", "n1", "--address", node_address)
        assert created.count(".") == 1 and "\n" not in created.strip()  # <id>.<secret>
        assert json.loads(run("nodes", "--json")) == []
        assert json.loads(run("rollout", "status", "--json"))["id"] == "r-lean"
        refused = run("rollout", "start", "--scope", "cluster", "--yes", code=1)
        assert refused == "tlsroll: error: no enrolled node in scope: enrol a node first\n"
        assert run("plan", "--scope", "cluster", code=1) == refused
        unknown = run("ca", "revoke", "0abc", code=1)
        assert unknown.startswith("tlsroll: error: no certificate with serial abc is on record")
        removed = run("nodes", "remove", "ghost", "--yes", code=1)
        assert removed.startswith("tlsroll: error: ") and "ghost" in removed
    for args, seen in ran.items():
        tops = {m.split(".")[0] for m in seen}
        assert tops & NOT_IN_COMMON_COMMANDS == set(), (args, tops & NOT_IN_COMMON_COMMANDS)
        assert seen & NOT_IN_COMMON_COMMANDS_LEADER == set(), (args, seen)
    # `--help` lists the commands by their summaries: none of their modules, no message
    listing = ran[("--help",)]
    assert {m for m in listing if m.startswith(("leader.cli.", "tlsroll.v1", "h2"))} == set()
    # the commands that print no Admin data need none of its codecs
    created_with = ran[("token", "create", "--node", "n1", "--address", node_address)]
    assert "tlsroll.v1.admin_pb2" in created_with and "leader.wire" not in created_with


def test_help_lists_every_command_by_its_own_first_sentence() -> None:
    """`tlsroll --help` lists each command by the summary given where it is registered
    (``Lazy.summary``), not by its help, which it no longer imports: each listing is the one
    click makes of the commands themselves, at any width (1000: no summary shortened, so
    each is its command's first sentence in full)."""
    import click

    from leader.cli import admin
    from tlsroll.cli import Summarized, cli

    for group in (cli, admin):
        assert isinstance(group, Summarized)
        ctx = click.Context(group, info_name="tlsroll")
        names = group.list_commands(ctx)
        commands: dict[str, click.Command] = {}
        for name in names:
            command = group.get_command(ctx, name)
            assert isinstance(command, click.Command), name
            commands[name] = command
        eager = click.Group("tlsroll", commands=commands)  # click's own, from the commands
        for width in (40, 60, 80, 120, 200, 1000):
            lazy, own = click.HelpFormatter(width=width), click.HelpFormatter(width=width)
            group.format_commands(ctx, lazy)
            eager.format_commands(ctx, own)
            assert lazy.getvalue() == own.getvalue(), width
        assert all(group.summary(ctx, name) for name in names)


# Run with nothing else imported: which enums of the schema's messages have no codec once
# leader.schema_wire alone is loaded (their --json would show numbers, their text nothing).
CODECS_PROBE = """
import leader.schema_wire
from tlsroll import wire
from tlsroll.v1 import schema_pb2
seen, missing = set(), set()
def walk(message):
    if message.full_name in seen:
        return
    seen.add(message.full_name)
    for field in message.fields:
        if field.enum_type is not None and field.enum_type.full_name not in wire._CODECS:
            missing.add(field.enum_type.full_name)
        if field.message_type is not None:
            walk(field.message_type)
for message in schema_pb2.DESCRIPTOR.message_types_by_name.values():
    walk(message)
print(" ".join(sorted(missing)) or "none")
"""


def test_the_schema_codecs_cover_every_enum_of_the_schema_views() -> None:
    """`rollout status` and `--wait` read the schema with only the schema's codecs
    (``leader.schema_wire``), not the Admin service's (``leader.wire``): each enum a schema view
    can carry must have its codec there, or ``--json`` prints a number and the table an empty
    state. (`schema show` has its words from the leader, which has every codec.)"""
    done = subprocess.run(
        [sys.executable, "-c", CODECS_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"


def test_where_watch_and_wait_stop_is_where_the_core_says_nothing_more_happens() -> None:
    """``schema_cmd`` names the end states itself (so as not to import the core): the same
    as the core's terminal and waiting states."""
    from leader.cli.schema_cmd import ENDS, TERMINAL
    from leader.rollout_core import (
        TERMINAL_ROLLOUT_STATES,
        WAITING_ROLLOUT_STATES,
    )

    assert {s.value for s in TERMINAL_ROLLOUT_STATES} == TERMINAL
    assert {s.value for s in TERMINAL_ROLLOUT_STATES | WAITING_ROLLOUT_STATES} == ENDS


def test_schema_show_checks_a_rollout_id_as_the_leader_does() -> None:
    """The CLI checks a rollout id itself (audit s34 L2) without importing the view."""
    from leader.cli.base import ROLLOUT_ID
    from leader.schema_view import ROLLOUT_ID as LEADERS

    assert ROLLOUT_ID.pattern == LEADERS.pattern


def test_the_expiry_check_behind_every_schema_show_reads_no_rollout_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`schema show` asks the expiry watch which certificates are near their end; the
    certificate each node serves was found by drawing every rollout ever stored (35 ms of
    leader CPU per call with 100 rollouts). One query now gives the same answer, whatever the
    history: enable-tls and rotate-cert set it, a node rolled back keeps the one before, a
    disable-tls takes it away."""
    from leader.expiry import ExpiryWatch
    from leader.schema_view import schema_message
    from tests.test_viewer_parts import NOW, run_rollout, server_certs

    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)
    run_rollout(schema, "r2", Change.ROTATE_CERT, fail="a")
    run_rollout(schema, "r3", Change.DISABLE_TLS, fail="b")
    run_rollout(schema, "r4", Change.ROTATE_CERT, fail="a")
    every = schema_message(schema.all(), set(), NOW, fresh=frozenset(), reported=lambda _node: True)
    drawn = {c.subject: (c.fingerprint, c.not_after) for c in server_certs(every)}
    assert drawn == {"b": ("sha256:r4-b", NOW + dt.timedelta(days=20))}  # a: disabled in r3
    assert schema.served_certificates() == drawn

    reads: list[str] = []
    get = SchemaStore.get

    def counting(self: SchemaStore, rollout_id: str) -> object:
        reads.append(rollout_id)
        return get(self, rollout_id)

    monkeypatch.setattr(SchemaStore, "get", counting)
    ca = pki.CertificateAuthority.create()
    watch = ExpiryWatch(store, schema, ca.cert, lambda: [], lambda: NOW)
    assert [e.kind for e in watch.check()] == ["ca"]  # no node enrolled in this store
    assert reads == []  # no rollout drawn
    store.close()


# --- the leader's bookkeeping per step ------------------------------------------------------------


@dataclass
class StoreTrace:
    """Every SQL statement the leader's connection runs (with its values, as SQLite expands
    them) and how much work SQLite does (virtual machine steps, in tens), while ``on``."""

    on: bool = False
    statements: list[str] = field(default_factory=list)
    work: int = 0

    def statement(self, sql: str) -> None:
        if self.on:
            self.statements.append(sql)

    def step(self) -> int:
        self.work += self.on
        return 0  # go on

    def transactions(self) -> list[list[str]]:
        """The statements of each write transaction, in order."""
        found: list[list[str]] = []
        current: list[str] | None = None
        for sql in self.statements:
            if sql.startswith("BEGIN IMMEDIATE"):
                current = []
            elif sql.startswith(("COMMIT", "ROLLBACK")) and current is not None:
                found.append(current)
                current = None
            elif current is not None:
                current.append(sql)
        return found


@dataclass
class RolloutCost:
    nodes: int
    trace: StoreTrace
    node_writes: Counter[str]  # node → write transactions that changed its record or details
    node_updates: Counter[str]  # node → UPDATE statements of its row
    auth_reads: int  # reads of every node's live password

    @property
    def whole_rollout(self) -> list[str]:
        """Statements on every node row of the rollout at once (not one named node's)."""
        return [
            s
            for s in self.trace.statements
            if "rollout_nodes" in s and "name = '" not in s and not s.startswith("INSERT")
        ]


def engine_world(directory: Path, mp: pytest.MonkeyPatch, n: int) -> World:
    """``tests/test_engine.py``'s harness for ``n`` nodes: the real engine and stores on a real
    SQLite file in ``directory``, fake agents, a fake clock."""
    from tests.test_engine import make_world

    directory.mkdir()
    nodes = {f"n{i:02d}": f"10.0.{i // 200}.{i % 200 + 1}" for i in range(n)}
    return make_world(directory, mp, nodes)


def pool_reads_enrolment(world: World, leader: Leader) -> None:
    """Each fake agent holds its node's enrolment, as ``AgentClient.node`` (the pool's read)."""
    for agent in world.agents:
        agent.node = leader.store.get_node(agent.name)  # type: ignore[attr-defined]


async def drive_to_the_end(
    world: World, leader: Leader, n: int, counting: Callable[[bool], None] = lambda on: None
) -> RolloutRow:
    """The engine's passes until the rollout of ``n`` nodes has ended, the clock ticking
    between them; ``counting`` is told when a pass begins (True) and ends (False). The rollout
    must have completed."""
    from leader.engine import TICK_SECONDS
    from tests.test_engine import ended

    row = None
    for _ in range(20 * n + 20):
        counting(True)
        await leader.engine.reconcile()
        await leader.engine.settle()
        counting(False)
        row = leader.schema.latest()
        assert row is not None
        if ended(row):
            break
        world.clock.advance(TICK_SECONDS)
    assert row is not None and row.rollout.state is RolloutState.COMPLETED
    return row


async def rollout_cost(directory: Path, mp: pytest.MonkeyPatch, n: int) -> RolloutCost:
    """An enable-tls rollout of ``n`` nodes driven pass by pass (``tests/test_engine.py``'s
    harness: the real engine and stores on a real SQLite file, fake agents, a fake clock),
    the leader's store traced from its first pass to its end."""
    world = engine_world(directory, mp, n)
    leader = world.boot()
    await leader.start(max_parallel=1)
    trace = StoreTrace()
    with leader.store.db.read() as conn:
        conn.set_trace_callback(trace.statement)
        conn.set_progress_handler(trace.step, 10)

    def tracing(on: bool) -> None:
        trace.on = on

    row = await drive_to_the_end(world, leader, n, tracing)
    assert {r.state for r in row.records} == {NodeState.DONE}
    await leader.stop()
    writes: Counter[str] = Counter()
    updates: Counter[str] = Counter()
    for tx in trace.transactions():
        touched = [m for s in tx if (m := ROW_UPDATE.search(s))]
        updates.update(m["node"] for m in touched)
        writes.update({m["node"] for m in touched})
    auth_reads = sum(s.startswith("SELECT name, version FROM node_auth") for s in trace.statements)
    return RolloutCost(n, trace, writes, updates, auth_reads)


ROW_UPDATE = re.compile(
    r"UPDATE rollout_nodes SET .* WHERE rollout_id = '[^']+' AND name = '(?P<node>[^']+)'"
)


async def test_a_step_reads_no_node_rows_and_its_outcome_is_one_write_at_any_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: every step re-read the whole rollout (5 times and more) and wrote ~19
    transactions per node, so the leader's CPU per node grew with N. Now the active rollout is
    kept in memory: at 2 and at 20 nodes no statement reads (or writes) every node row, the
    nodes' live passwords are read once, each node's row is written by exactly as many
    transactions as its rollout has moments worth recording (the start, each step's outcome
    with its times and what it learnt, the switch event, the freeze beginning), each of them
    one UPDATE of that row, and SQLite's work per node does not grow with N."""
    small = await rollout_cost(tmp_path / "small", monkeypatch, 2)
    large = await rollout_cost(tmp_path / "large", monkeypatch, 20)
    for cost in (small, large):
        assert cost.whole_rollout == [], cost.whole_rollout[:3]
        assert cost.auth_reads <= 1
        # pending → preflight (the plan), preflight's outcome, stage's outcome with staged →
        # switching (the plan it allows: ``test_a_steps_outcome_and_the_plan_it_allows_are_
        # one_write``), the switch's freeze began, its outcome, confirm's outcome
        assert set(cost.node_writes.values()) == {6}, cost.node_writes
        # one UPDATE of the row per write, but two in the stage's (its outcome, then its
        # switch: the audit keeps both moves)
        assert cost.node_updates == cost.node_writes + Counter(cost.node_writes.keys())
    # SQLite's own work per node (its B-trees grow a level meanwhile; it was 3.6 times as much
    # at 20 nodes as at 2 when every step read every node)
    assert large.trace.work / large.nodes <= 1.5 * small.trace.work / small.nodes


async def test_a_steps_outcome_and_the_plan_it_allows_are_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan that follows from a step's outcome is written with it: a confirm's outcome
    with the next node's start (and, pipelined, its switch), a stage's outcome with the
    node's own switch. The rollout's writes of node rows fall from 7 per node to 5 per node
    and the first node's start (each switch and each preflight waited for one more durable
    write, on the rollout's critical path); each node's row is written 6 times, not 7."""
    for n in (2, 6):
        cost = await rollout_cost(tmp_path / f"n{n}", monkeypatch, n)
        assert set(cost.node_writes.values()) == {6}, cost.node_writes
        writes = [tx for tx in cost.trace.transactions() if any(ROW_UPDATE.search(s) for s in tx)]
        # the first start; per node: the preflight's outcome, the stage's with the switch,
        # the freeze begun, the switch's outcome, the confirm's with the next node's start
        assert len(writes) == 5 * n + 1, len(writes)


async def test_a_switch_whose_stream_says_its_restart_time_early_writes_its_row_no_more_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real agent's stream says the restart's duration once its server restarted (phase
    ``restarted``), a verify and an unfreeze before the switch's outcome. It is written with
    the outcome: each node's row is still written 6 times (7 before: one durable write of the
    restart time alone, a few milliseconds before the outcome's, at every real node)."""
    from tests.fake_agent import RESTART_SECONDS, FakeAgent

    real = FakeAgent._message

    def restarted_before_the_end(agent: FakeAgent, txn: Any) -> Any:
        message = real(agent, txn)
        pending = message.outcome == agent_pb2.TRANSACTION_OUTCOME_PENDING
        if pending and agent.world.clock.monotonic() > txn.started:
            message.restart_seconds = RESTART_SECONDS
        return message

    monkeypatch.setattr(FakeAgent, "_message", restarted_before_the_end)
    cost = await rollout_cost(tmp_path / "n3", monkeypatch, 3)
    assert set(cost.node_writes.values()) == {6}, cost.node_writes
    restarts = [s for s in cost.trace.statements if "restart_seconds" in s and "UPDATE" in s]
    assert len(restarts) == 3, restarts  # each with its switch's outcome


async def record_reads_per_node(directory: Path, mp: pytest.MonkeyPatch, n: int) -> float:
    """An enable-tls rollout of ``n`` nodes, 5 at once and the next prepared ahead, driven
    pass by pass (``tests/test_engine.py``'s harness: the real engine, planner and stores on a
    real SQLite file, fake agents): how many times the leader read a field of a node record,
    per node."""
    world = engine_world(directory, mp, n)
    leader = world.boot(prepare_ahead=1)
    await leader.start(max_parallel=5)
    reads = [0, False]  # count, counting
    plain = NodeRecord.__getattribute__

    def counting(self: NodeRecord, name: str) -> Any:
        if reads[1] and not name.startswith("__"):
            reads[0] += 1
        return plain(self, name)

    mp.setattr(NodeRecord, "__getattribute__", counting)

    def passes(on: bool) -> None:
        reads[1] = on

    await drive_to_the_end(world, leader, n, passes)
    await leader.stop()
    return reads[0] / n


async def test_the_engine_s_passes_read_as_many_node_records_per_node_at_any_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: each pass of the engine (one per step outcome) read every node's record about
    a dozen times: the planner's passes over them, the done nodes looked over for their
    password and their superseded certificate, a step looking its node up in the list. The
    leader's CPU per node grew with the rollout's size. Now the planner decides from the
    census the store keeps with the rollout and the engine looks up what it names: a rollout
    of 40 nodes reads about as many records per node as one of 4."""
    few = await record_reads_per_node(tmp_path / "few", monkeypatch, 4)
    many = await record_reads_per_node(tmp_path / "many", monkeypatch, 40)
    assert many <= 1.5 * few, (few, many)  # the old code: 378 and 653


def client_looks_per_client(mp: pytest.MonkeyPatch, n: int) -> float:
    """``schema_view.node_clients_views`` for ``n`` nodes of two workstations each (one on
    http, one on https, each node's report fresh): how many times it read a client's node, per
    client."""
    from leader.rollout_core import Client
    from leader.schema_store import ClientsInfo
    from leader.schema_view import node_clients_views

    now = dt.datetime(2026, 12, 4, 23, 0, tzinfo=dt.UTC)
    seen = now - dt.timedelta(seconds=30)
    names = [f"n{i:03d}" for i in range(n)]
    clients = [
        Client(name, scheme, f"10.1.{i // 200}.{i % 200 + 1}", f"ws-{name}-{scheme}", seen, seen, 3)
        for i, name in enumerate(names)
        for scheme in ("http", "https")
    ]
    infos = {name: ClientsInfo(name, 600, "access log", "", seen, seen, seen) for name in names}
    looks = [0]
    plain = Client.__getattribute__

    def counting(self: Client, name: str) -> Any:
        if name == "node":
            looks[0] += 1
        return plain(self, name)

    with mp.context() as m:
        m.setattr(Client, "__getattribute__", counting)
        views = node_clients_views(clients, infos, now, frozenset(names), lambda _: True)
    assert [len(v.clients.clients) for v in views] == [2] * n
    assert [len(v.still_on_http) for v in views] == [1] * n
    return looks[0] / len(clients)


def test_the_schema_s_client_views_look_at_each_client_a_few_times_at_any_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each node's clients in the schema (``schema show``, ``/api/v1/schema``, the viewer's
    page) were found by a pass over every node's clients, twice: a view of N nodes read N
    times as many clients, 500 nodes a million looks (under yappi, ~0.1 s of the leader's CPU
    per view at 500 simulated nodes). Now they are grouped by node once: as many looks per
    client at 100 nodes as at 10."""
    few = client_looks_per_client(monkeypatch, 10)
    many = client_looks_per_client(monkeypatch, 100)
    assert many == few, (few, many)  # the old code: 17.5 and 152.5


# --- the leader's CPU per node in a rollout (issue 15) -------------------------------------------


class NodeRows:
    """What ``AgentPool`` reads of the store, for ``n`` nodes on one address where nothing
    listens (every call fails at once with UNAVAILABLE, after really opening its channel)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.reads = 0

    def get_node(self, name: str) -> Node:
        self.reads += 1
        at = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
        return Node(name, (self.address,), (), "1", AGENT_PORT, f"pin-{name}", "", "", at, at, None)


async def looks_per_call(address: str, n: int) -> float:
    """Calls to ``n`` nodes' agents through a pool capped at 2 open channels, every node twice:
    how often the pool looked at a client's channel (``AgentClient.open``) per call."""
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    pool = AgentPool(NodeRows(address), creds, "tlsroll-test", max_open=2)  # type: ignore[arg-type]
    looks = 0
    try:
        for name in [f"n{i:03d}" for i in range(n)] * 2:
            before = CountingOpen.looks
            client = await pool.get(name)
            with contextlib.suppress(TransientError):  # nothing listens there
                await client.get_status(agent_pb2.GetStatusRequest(), timeout=5)
            looks += CountingOpen.looks - before
            assert pool.open_channels() <= 2
    finally:
        await pool.close()
    return looks / (2 * n)


class CountingOpen:
    looks = 0


def count_open_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count each look at an agent client's ``open`` (in ``CountingOpen.looks``)."""

    def counted(self: AgentClient) -> bool:
        CountingOpen.looks += 1
        return self._channel is not None  # what AgentClient.open says

    monkeypatch.setattr(AgentClient, "open", property(counted))


async def test_the_agent_pool_s_bookkeeping_per_call_does_not_grow_with_the_nodes(
    loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: at the end of every call to an agent (and as each channel opened) the pool
    counted its open channels by looking at every node's client: the leader's CPU per step
    grew with the number of nodes (1,991 such counts over 195,000 clients in a rollout of 200).
    Real channels (to an address where nothing listens), real calls: the pool looks at as few
    clients per call with 40 nodes as with 4, and keeps its cap."""

    count_open_looks(monkeypatch)
    address = loopback()
    few = await looks_per_call(address, 4)
    many = await looks_per_call(address, 40)
    assert many <= few + 1, (few, many)


async def looks_with_busy_channels(address: str, busy: int) -> float:
    """``busy`` nodes' channels open with a call on each (a stream that lasts: a switch being
    watched), then calls to 20 other nodes through a pool capped at 2: how often the pool
    looked at a client's channel (``AgentClient.open``) per call."""
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    pool = AgentPool(NodeRows(address), creds, "tlsroll-test", max_open=2)  # type: ignore[arg-type]
    try:
        for name in [f"b{i:03d}" for i in range(busy)]:
            client = await pool.get(name)
            client.in_flight += 1  # as a stream on it does
            assert client.channel is not None
        looks = 0
        for name in [f"n{i:03d}" for i in range(20)]:
            before = CountingOpen.looks
            client = await pool.get(name)
            with contextlib.suppress(TransientError):  # nothing listens there
                await client.get_status(agent_pb2.GetStatusRequest(), timeout=5)
            looks += CountingOpen.looks - before
        # Idle ones beyond the cap are closed (the one used last on its next call's end).
        assert pool.open_channels() <= busy + 1
        assert all(pool.clients[f"b{i:03d}"].open for i in range(busy))  # never under a call
    finally:
        for client in pool.clients.values():
            client._in_flight = 0
        await pool.close()
    return looks / 20


async def test_the_agent_pool_s_bookkeeping_per_call_does_not_grow_with_its_busy_channels(
    loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (a profile of the leader at 500 nodes: 10 % of its CPU in ``AgentPool._trim``,
    615,000 looks at clients' channels): past the cap, the pool walked every busy channel
    ahead of the first idle one at the end of every call (busy channels stay first in line
    while their calls last: a switch's stream, or one the step left open). Now it keeps its
    idle channels apart: as few looks per call with 40 busy channels as with 2."""

    count_open_looks(monkeypatch)
    address = loopback()
    few = await looks_with_busy_channels(address, 2)
    many = await looks_with_busy_channels(address, 40)
    assert many <= few + 1, (few, many)


class ListedRows(NodeRows):
    """``NodeRows`` with the listing of every node that ``AgentPool.reach``'s dial reads, and
    the store's count of writes to its nodes (none: one listing for all the dials)."""

    nodes_generation = 0

    def __init__(self, address: str, names: list[str]) -> None:
        super().__init__(address)
        self.names = names

    def list_nodes(self) -> list[Node]:
        return [self.get_node(name) for name in self.names]


class LookedAt(asyncio.Future[Any]):
    """A future that counts how often something asked whether it is over."""

    looks = 0

    def done(self) -> bool:
        LookedAt.looks += 1
        return super().done()

    def cancelled(self) -> bool:
        LookedAt.looks += 1
        return super().cancelled()


async def looks_per_dial(address: str, n: int, mp: pytest.MonkeyPatch) -> float:
    """``n`` nodes dialled at once (``AgentPool.reach`` without a channel, as a start's
    planning dials every node it asks on its stream) through half as many dial slots, to a
    port that listens (the first half's connections are made together, and their slots
    handed on together, as at a real start): how often the waiters' futures were looked at,
    per dial."""
    names = [f"n{i:03d}" for i in range(n)]
    mp.setattr(agent_client, "DIAL_AT_ONCE", n // 2)
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    pool = AgentPool(ListedRows(address, names), creds, "tlsroll-test")  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    with socket.socket() as listening, mp.context() as m:
        listening.bind((address, AGENT_PORT))
        listening.listen(n)
        m.setattr(loop, "create_future", lambda: LookedAt(loop=loop))
        connect = loop.sock_connect

        async def a_turn_later(sock: socket.socket, where: Any) -> None:
            await asyncio.sleep(0)  # as over a network: made at a later turn of the loop
            await connect(sock, where)

        m.setattr(loop, "sock_connect", a_turn_later)
        before = LookedAt.looks
        deadline = loop.time() + 20
        found = await asyncio.gather(*(pool.reach(nm, deadline, channel=False) for nm in names))
        looks = LookedAt.looks - before
    await pool.close()
    assert found == [None] * n
    return looks / n


async def test_a_start_s_dials_wait_for_their_slots_at_a_cost_that_does_not_grow_with_them(
    loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start's planning dials every node it asks on its heartbeat stream, ``DIAL_AT_ONCE``
    at a time; the rest wait. ``asyncio.Semaphore`` (Python 3.11) walked its queue of waiters
    from the front at every release and each waiter took itself out of it: quadratic in the
    waiters (500 simulated nodes, 256 slots: ~60,000 looks at woken waiters' futures in one
    start). The dial slots now hand themselves on in order: as few looks per dial with 200
    nodes waiting as with 20."""
    few = await looks_per_dial(loopback(), 20, monkeypatch)
    many = await looks_per_dial(loopback(), 200, monkeypatch)
    assert many <= few + 1, (few, many)  # asyncio.Semaphore: 5.15 and 27.29


async def test_the_dial_slots_let_waiters_in_in_order_and_pass_over_the_cancelled() -> None:
    """``agent_client.Slots`` as ``asyncio.Semaphore`` behaves: at most its count inside,
    waiters in the order they came, a waiter cancelled in the queue passed over, and a slot
    handed to a waiter cancelled before it ran handed on, not lost."""
    slots = agent_client.Slots(2)
    inside: list[str] = []
    order: list[str] = []
    go = asyncio.Event()

    async def holder(name: str) -> None:
        async with slots:
            order.append(name)
            inside.append(name)
            assert len(inside) <= 2
            await go.wait()
            inside.remove(name)

    tasks = {n: asyncio.ensure_future(holder(n)) for n in ("a", "b", "c", "d", "e", "f")}
    await asyncio.sleep(0)
    assert order == ["a", "b"]
    tasks["c"].cancel()  # cancelled while it waits: passed over
    await asyncio.sleep(0)
    go.set()
    # a and b leave: their slots go to d and e; d is cancelled before it runs: on to f
    await asyncio.sleep(0)
    tasks["d"].cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert order == ["a", "b", "e", "f"], order
    assert tasks["c"].cancelled() and tasks["d"].cancelled()
    async with asyncio.timeout(5), slots, slots:  # both slots free again (none lost)
        pass

    # More waiters than slots, none cancelled, each leaving in turn: in the order they came.
    one = agent_client.Slots(1)
    came: list[int] = []
    leave = [asyncio.Event() for _ in range(5)]

    async def turn(i: int) -> None:
        async with one:
            came.append(i)
            await leave[i].wait()

    waiting = [asyncio.ensure_future(turn(i)) for i in range(5)]
    for i in range(5):
        await asyncio.sleep(0)
        leave[i].set()
    async with asyncio.timeout(5):
        await asyncio.gather(*waiting)
    assert came == [0, 1, 2, 3, 4], came


async def test_a_step_s_call_to_an_agent_reads_its_node_only_after_a_store_write(
    loopback: Callable[[], str],
) -> None:
    """Issue 15: every call of every step read the node's row again (a worker thread and a
    query, five times per node). The pool reads it once, and again only once the store had a
    write that can change it (``Store.nodes_generation``: enrolment, renewal, removal)."""

    class Rows(NodeRows):
        nodes_generation = 0

    store = Rows(loopback())
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    pool = AgentPool(store, creds, "tlsroll-test")  # type: ignore[arg-type]
    try:
        names = [f"n{i}" for i in range(5)]
        for _ in range(4):  # preflight, stage, switch, confirm
            for name in names:
                assert (await pool.get(name)).node.name == name
        assert store.reads == len(names)
        store.nodes_generation += 1  # a write that may have changed a node (a renewal, say)
        await pool.get("n0")
        assert store.reads == len(names) + 1
    finally:
        await pool.close()


async def test_the_pool_reads_a_node_again_after_its_enrolment_changed_not_after_other_writes(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Issue 15: the pool read a node again after any write to the leader's store, and a
    rollout writes one with every stage (the certificate issued) and every node's end (the
    one it served before revoked): at 500 nodes 2,426 reads of a node, each in a worker
    thread, about one per step. Now only a write to the nodes (here a renewal, a removal: a
    real store on a real file) makes it read again."""
    from leader.store import NodeCert

    now = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)

    class Counting(Store):
        reads = 0

        def get_node(self, name: str) -> Node:
            Counting.reads += 1
            return super().get_node(name)

    store = Counting(tmp_path / "leader.sqlite3")
    address = loopback()
    serials = iter(range(1, 100))

    def cert(_apart: bool = False) -> NodeCert:
        n = next(serials)
        return NodeCert(f"sha256:pin{n}", f"sha256:fp{n}", f"{n:x}", now + dt.timedelta(days=30))

    for token, secret in (("t1", "s" * 26), ("t2", "u" * 26)):
        store.add_token(
            token,
            secret,
            ttl=dt.timedelta(hours=1),
            uses=1,
            description="",
            now=now,
            actor="test",
            node_name="n1",
            addresses=(address,),
        )
        if token == "t1":
            store.enrol(
                token_id="t1",
                secret=secret,
                name="n1",
                addresses=(address,),
                dns_names=(),
                agent_version="t",
                agent_port=AGENT_PORT,
                key_pin="sha256:pin1",
                issue=cert,
                now=now,
            )
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    pool = AgentPool(store, creds, "tlsroll-test")
    try:
        first = await pool.get("n1")
        assert Counting.reads == 1
        store.db.touch()  # as any write does (the second token above, too)
        assert await pool.get("n1") is first
        assert Counting.reads == 1
        store.renew_node_certificate(
            "n1", presented="sha256:fp1", presented_serial="1", key_pin="sha256:pin2",
            issue=cert, now=now,
        )  # fmt: skip
        renewed = await pool.get("n1")
        assert Counting.reads == 2
        assert renewed is not first and renewed.node.key_pin == "sha256:pin2"
        store.remove_node("n1", now=now, actor="test")
        with pytest.raises(NotFound):
            await pool.get("n1")
    finally:
        await pool.close()
        store.close()


def test_the_outside_check_makes_its_tls_context_once_per_ca(
    loopback: Callable[[], str],
    issue_cert: Callable[..., IssuedCert],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15: every https probe (the leader's confirm, once per node; the agent's verify)
    made a new SSLContext, about a millisecond of CPU each. Real TLS servers on loopback with
    certificates of one CA, checked again and again: one context, and each check still trusts
    only the CA it is given (a server of another CA is refused)."""
    from tests.test_httpcheck import APP, OK_CLOSE, tiny_server

    made: list[bytes] = []
    real = tls.client_context

    def counting(ca_pem: bytes | None = None, **kwargs: Any) -> ssl.SSLContext:
        made.append(ca_pem or b"")
        return real(ca_pem, **kwargs)

    monkeypatch.setattr(tls, "client_context", counting)
    httpcheck.trusting.cache_clear()
    first, second = loopback(), loopback()
    one, two = issue_cert(first), issue_cert(second)
    ca_pem = one.ca_file.read_bytes()
    assert ca_pem == two.ca_file.read_bytes()  # one CA for the test's certificates
    for address, cert in ((first, one), (second, two)):
        fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
        server = tls.server_context(cert.cert_file, cert.key_file)
        with tiny_server(address, OK_CLOSE, server) as port:
            for _ in range(3):
                check = probe.check_https(address, port, APP, ca_pem, fingerprint)
                assert asyncio.run(check) is None
    assert made == [ca_pem]
    other = pki.CertificateAuthority.create().cert_pem
    server = tls.server_context(one.cert_file, one.key_file)
    with tiny_server(first, OK_CLOSE, server) as port:
        problem = asyncio.run(probe.check_https(first, port, APP, other, None))
    assert problem is not None and "certificate verify failed" in problem
    assert made == [ca_pem, other]


def test_an_https_probe_that_passes_runs_no_python_for_each_tls_message(
    loopback: Callable[[], str],
    issue_cert: Callable[..., IssuedCert],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15 (session 71): every https probe (the leader's confirm of each node, the
    agent's verify inside each freeze window) ran ssl's message callback, Python called for
    each TLS message and record of the connection (35 in a check that passes, about a tenth
    of a millisecond of CPU, 7 % of the check), only to say better why a server that wants a
    client certificate gave no answer. Now it runs only once a probe ended so, in a handshake
    made again to see (``tests/test_probe_client_cert.py``): none in a probe that passes."""
    from tests.test_httpcheck import APP, OK_CLOSE, tiny_server

    calls: list[int] = []
    real = httpcheck._note_certificate_request

    def counting(*args: Any) -> None:
        calls.append(1)
        real(*args)

    monkeypatch.setattr(httpcheck, "_note_certificate_request", counting)
    httpcheck.trusting.cache_clear()  # contexts made from now on take the counting callback
    if hasattr(httpcheck, "noting"):
        httpcheck.noting.cache_clear()
    try:
        address = loopback()
        cert = issue_cert(address)
        fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
        with tiny_server(
            address, OK_CLOSE, tls.server_context(cert.cert_file, cert.key_file)
        ) as port:
            for _ in range(2):
                check = probe.check_https(
                    address, port, APP, cert.ca_file.read_bytes(), fingerprint
                )
                assert asyncio.run(check) is None
        assert calls == [], len(calls)  # the old code: 35 per check here
    finally:  # no context with the counting callback outlives the test
        httpcheck.trusting.cache_clear()
        if hasattr(httpcheck, "noting"):
            httpcheck.noting.cache_clear()


def staging_agent(tmp_path: Path, issued: IssuedCert) -> tuple[Any, Any, Any]:
    """The agent's service as far as ``_store_cert`` needs it (its journal only), with a
    rollout r1 whose key (``issued``'s) and CSR are journalled: the service, the staged key's
    record, the journal (close it)."""
    from nodeagent.journal import Journal
    from nodeagent.service import NodeAgentService

    journal = Journal(tmp_path / "journal.sqlite3")
    stage_dir = tmp_path / "tlsroll-tls" / "r1"
    stage_dir.mkdir(parents=True)
    key_file = stage_dir / "server.key"
    write_private(key_file, issued.key_file.read_bytes())
    journal.record_csr("r1", key_file, b"")
    staged = journal.staged("r1")
    assert staged is not None
    service = NodeAgentService.__new__(NodeAgentService)
    service.journal = journal
    # (the files are written with the access the live config gives: a driver whose server
    # runs as the agent, ``plans.sharing``, so the agent's own, as before)
    service.driver = cast(
        "Driver", SimpleNamespace(own_user=False, config_file=tmp_path / "server.toml")
    )
    return service, staged, journal


def checked(issued: IssuedCert) -> dict[str, str]:
    """What the crypto worker answers for ``issued``'s certificate (``certwork_ops.stage``)."""
    cert = pki.read_cert(issued.cert_file)
    return {
        "chain_pem": pki.cert_to_pem(cert).decode(),
        "ca_pem": pki.cert_to_pem(pki.read_cert(issued.ca_file)).decode(),
        "fingerprint": pki.fingerprint(cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def test_a_stage_makes_the_tls_context_its_switch_s_verify_trusts(
    tmp_path: Path,
    loopback: Callable[[], str],
    issue_cert: Callable[..., IssuedCert],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15, the freeze window: the agent's verify made the client context that trusts the
    staged CA (its first probe with that CA), about a millisecond of CPU inside the freeze.
    Staging the certificate makes it now: verify's probes, which read the CA back from the
    staged file, make none."""
    made: list[bytes] = []
    real = tls.client_context

    def counting(ca_pem: bytes | None = None, **kwargs: Any) -> ssl.SSLContext:
        made.append(ca_pem or b"")
        return real(ca_pem, **kwargs)

    monkeypatch.setattr(tls, "client_context", counting)
    httpcheck.trusting.cache_clear()
    address = loopback()
    issued = issue_cert(address)
    service, staged, journal = staging_agent(tmp_path, issued)
    fingerprint = service._store_cert(staged, checked(issued))
    assert made == [issued.ca_file.read_bytes()]
    staged = journal.staged("r1")
    assert staged is not None and staged.ca_file is not None
    server = tls.server_context(issued.cert_file, issued.key_file)
    from tests.test_httpcheck import APP, OK_CLOSE, tiny_server

    with tiny_server(address, OK_CLOSE, server) as port:
        ca_pem = staged.ca_file.read_bytes()  # as the switch's staging reads it for verify
        assert asyncio.run(probe.check_https(address, port, APP, ca_pem, fingerprint)) is None
    assert len(made) == 1
    journal.close()


def test_a_stage_whose_ca_the_tls_library_refuses_fails_before_it_writes_anything(
    tmp_path: Path,
    loopback: Callable[[], str],
    issue_cert: Callable[..., IssuedCert],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review of session 25, L3: the stage made the verify's TLS context after journalling
    the stage, so a CA the TLS library refused failed the call as an INTERNAL error with the
    stage recorded. Now it is made first: the stage fails with its reason (a PKIError, which
    the service answers INVALID_ARGUMENT), nothing written, nothing journalled."""
    from tlsroll.errors import PKIError

    def refusing(ca_pem: bytes) -> ssl.SSLContext:
        raise ssl.SSLError(136, "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found")

    monkeypatch.setattr(httpcheck, "trusting", refusing)
    issued = issue_cert(loopback())
    service, staged, journal = staging_agent(tmp_path, issued)
    with pytest.raises(PKIError, match="TLS library refuses the CA certificate"):
        service._store_cert(staged, checked(issued))
    after = journal.staged("r1")
    assert after is not None and after.ca_file is None  # not journalled
    assert sorted(p.name for p in staged.key_file.parent.iterdir()) == ["server.key"]  # unwritten
    journal.close()


@dataclass
class StepHops:
    per_node: float  # worker-thread hops (``asyncio.to_thread``) per node
    by_call: Counter[str]
    refused: int  # step outcomes refused as stale (written again)


async def step_hops(directory: Path, mp: pytest.MonkeyPatch, n: int, parallel: int) -> StepHops:
    """An enable-tls rollout of ``n`` nodes (``parallel`` at once, the next prepared ahead) in
    ``tests/test_engine.py``'s harness: the real engine and stores on a real SQLite file, fake
    agents; every hand-off to a worker thread counted, by what it calls."""
    world = engine_world(directory, mp, n)
    calls: Counter[str] = Counter()

    def counted(hop: Callable[..., Any]) -> Callable[..., Any]:
        async def counting(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            calls[getattr(func, "__qualname__", repr(func))] += 1
            return await hop(func, *args, **kwargs)

        return counting

    # Both kinds of hand-off: the default executor's and the store's own thread's.
    mp.setattr(asyncio, "to_thread", counted(asyncio.to_thread))
    mp.setattr(dbthread, "run", counted(dbthread.run))
    leader = world.boot(prepare_ahead=1)
    pool_reads_enrolment(world, leader)
    await leader.start(max_parallel=parallel)
    calls.clear()
    await drive_to_the_end(world, leader, n)
    await leader.stop()
    return StepHops(sum(calls.values()) / n, calls, leader.schema.stale)


async def test_a_rollout_s_steps_hand_few_reads_to_worker_threads_at_any_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: a step handed each read of its rollout to a worker thread (about 66 µs of CPU
    per hand-off, before the read), though the rollout is kept in memory; a pass read the
    active rollout, those awaiting finalize and every node's password (again and again); each
    step read the rollout's practice CA, the trusted CAs and the password verifier anew; and
    a step's outcome that crossed another node's was refused as stale and written again (one
    in three with ten nodes in flight). 31 hand-offs per node then. Now what is kept is read
    on the loop when no writer holds the store, what a rollout's steps look up once per
    rollout, and an outcome is checked against its own node's record only: what is left are
    the writes, the signing record and the outside check (the node's enrolled names come
    with its agent's client, the revocation of the certificate it served before with the
    write of its end)."""
    small = await step_hops(tmp_path / "small", monkeypatch, 2, 1)
    large = await step_hops(tmp_path / "large", monkeypatch, 20, 1)
    wide = await step_hops(tmp_path / "wide", monkeypatch, 20, 5)
    for n, cost in ((2, small), (20, large), (20, wide)):
        # 10 per node at most, and a few per rollout (what its steps look up, its end)
        assert cost.per_node * n <= 10 * n + 6, cost.by_call.most_common()
        # The enrolled names come with the agent's client (the pool read them).
        assert cost.by_call["Store.get_node"] == 0, cost.by_call.most_common()
        # The certificate a done node served before is revoked in the write of its end (it
        # was a transaction of its own, in a worker thread, per node).
        assert cost.by_call["Store.revoke_superseded"] == 0, cost.by_call.most_common()
        for call in ("SchemaStore.get", "SchemaStore.active", "SchemaStore.node_auth"):
            assert cost.by_call[call] <= 1, cost.by_call.most_common()
    assert wide.refused == 0


async def test_a_plan_leaves_open_the_channels_of_the_nodes_a_rollout_asks_first(
    loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: a rollout is planned from what every node's agent says (``observe``), and the
    agent pool keeps only the channels used last open. Asked in the rollout's order, those
    were the channels of the nodes the rollout reaches last: every node beyond the cap cost
    the leader two TLS handshakes. Asked last to first, the channels left open are those of
    the nodes the rollout asks first (real channels, to an address where nothing listens)."""
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    pool = AgentPool(NodeRows(loopback()), creds, "tlsroll-test", max_open=4)  # type: ignore[arg-type]
    names = [f"n{i:02d}" for i in range(12)]
    # One at a time (it asks OBSERVE_AT_ONCE at once: which of those ends last is up to the
    # network, and the test would say so only now and then).
    monkeypatch.setattr("leader.observe.OBSERVE_AT_ONCE", 1)
    try:
        seen = await observe(pool, names, pki.CertificateAuthority.create().cert)
        assert list(seen) == names and not any(s.reachable for s in seen.values())
        assert {n for n, c in pool.clients.items() if c.open} == set(names[:4])
    finally:
        await pool.close()


async def logged_per_node(directory: Path, mp: pytest.MonkeyPatch, n: int) -> Counter[str]:
    """An enable-tls rollout of ``n`` nodes (4 at once, the next prepared ahead) in
    ``tests/test_engine.py``'s harness (the real engine and stores, fake agents): the events
    the leader logs at the default level (info and above), by name."""
    from structlog.testing import capture_logs

    world = engine_world(directory, mp, n)
    leader = world.boot(prepare_ahead=1)
    pool_reads_enrolment(world, leader)
    await leader.start(max_parallel=4)
    with capture_logs() as events:
        await drive_to_the_end(world, leader, n)
    await leader.stop()
    return Counter(e["event"] for e in events if e["log_level"] != "debug")


async def test_a_rollout_logs_each_node_s_step_outcomes_and_no_chatter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the leader logged six events per node at info, two of them the planner's
    gates into a node's preflight and its switch (``node.event`` start, switch), which say
    nothing the step outcomes after them do not (about 17 µs of CPU each, rendered to JSON
    and written). At the default level a node now logs its four step outcomes
    (``step.finished``: preflight, stage, switch, confirm), and the rollout its end."""
    for n in (3, 12):
        logged = await logged_per_node(tmp_path / f"n{n}", monkeypatch, n)
        assert logged["step.finished"] == 4 * n, logged
        assert logged["node.event"] == 0, logged
        assert logged.total() <= 4 * n + 2, logged


def channels_opened(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each node's agent channel is opened from now on (``AgentClient.channel``
    making a new one)."""
    opened: Counter[str] = Counter()
    channel = AgentClient.channel

    def counting(self: AgentClient) -> grpc.aio.Channel:
        if self._channel is None:
            opened[self.node.name] += 1
        return channel.fget(self)  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(AgentClient, "channel", property(counting))
    return opened


async def test_a_rollout_opens_a_node_s_agent_channel_once_or_at_most_twice(
    loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: each channel an agent pool opens is an mTLS handshake (the leader's CPU for a
    new channel and its first call: 2.3-2.8 ms, against 0.2-0.3 ms for a call on an open one).
    Planning asks every node (``observe``, last to first) and the pool keeps ``max_open``
    channels; then the rollout's three calls per node (preflight, stage, switch), three nodes
    in flight at once. The nodes the pool kept open cost one handshake, the others two (one
    for planning, one for the steps), never more: a node's channel is not closed between its
    steps (real channels, to an address where nothing listens)."""
    opened = channels_opened(monkeypatch)
    monkeypatch.setattr("leader.observe.OBSERVE_AT_ONCE", 1)  # as the test above: one order
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    pool = AgentPool(NodeRows(loopback()), creds, "tlsroll-test", max_open=4)  # type: ignore[arg-type]
    names = [f"n{i:02d}" for i in range(12)]

    async def step(name: str) -> None:
        client = await pool.get(name)
        with contextlib.suppress(TransientError):  # nothing listens there
            await client.get_status(agent_pb2.GetStatusRequest(), timeout=5)

    try:
        await observe(pool, names, pki.CertificateAuthority.create().cert)
        assert opened == Counter(names)
        # Node i's k-th step runs with node i+1's (k-1)-th and node i+2's (k-2)-th.
        for t in range(len(names) + 2):
            at_once = [names[t - k] for k in range(3) if 0 <= t - k < len(names)]
            await asyncio.gather(*(step(n) for n in at_once))
        assert all(opened[n] == 1 for n in names[:4]), opened
        assert all(opened[n] == 2 for n in names[4:]), opened
        assert pool.open_channels() <= 4
    finally:
        await pool.close()


REAL_TO_THREAD = asyncio.to_thread
REAL_STORE_THREAD = dbthread.run


async def store_threads(directory: Path, mp: pytest.MonkeyPatch, n: int) -> Counter[int]:
    """An enable-tls rollout of ``n`` nodes, 5 at once and the next prepared ahead, in
    ``tests/test_engine.py``'s harness (the real engine and stores on a real SQLite file, fake
    agents that answer at once) but with real worker threads: which threads ran the store's
    writes of the rollout, by thread id (what the store keeps in memory is read on the loop
    when no write holds it, by design)."""
    world = engine_world(directory, mp, n)
    mp.setattr(asyncio, "to_thread", REAL_TO_THREAD)
    mp.setattr(dbthread, "run", REAL_STORE_THREAD)
    leader = world.boot(prepare_ahead=1)
    pool_reads_enrolment(world, leader)
    await leader.start(max_parallel=5)
    ran: Counter[int] = Counter()

    def on_thread(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            ran[threading.get_ident()] += 1
            return real(*args, **kwargs)

        return call

    for name in ("save_states", "update_detail", "record_stage_certificate"):
        mp.setattr(leader.schema, name, on_thread(getattr(leader.schema, name)))
    mp.setattr(leader.store, "record_certificate", on_thread(leader.store.record_certificate))
    await drive_to_the_end(world, leader, n)
    await leader.stop()
    return ran


async def test_a_rollout_s_store_calls_run_on_one_thread_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (a profile of the leader at 200 nodes: a fifth of its CPU context switching;
    its default executor's threads switched about 120 times per node): each store call of a
    step went to ``asyncio.to_thread``, whose executor grew to six threads as steps overlapped,
    though the store runs one call at a time (one connection, one lock): the threads waited
    for that lock and the GIL, each wait a switch. Now the store's calls go to its own single
    thread (``tlsroll.dbthread``), and its writes never to the event loop's: 20 nodes, 5 at
    once, with real threads."""
    ran = await store_threads(tmp_path / "rollout", monkeypatch, 20)
    # Four outcomes and the signing record a node; the plans' own writes mostly ride with an
    # outcome now (how many depends on how the steps interleave), so not counted on.
    assert ran.total() >= 20 * 5, ran
    assert threading.get_ident() not in ran  # off the loop (durable writes wait on the disk)
    assert len(ran) == 1, ran


class Tries:
    """What ``AgentClient._once`` answers, one by one (an exception is raised), and how often
    it was asked."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def __call__(self, method: Any, request: Any, timeout: float = 0) -> Any:
        self.asked += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


async def test_a_call_to_an_agent_that_answers_builds_no_retry_machinery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15: every call to an agent (about six per node) built tenacity's ``AsyncRetrying``
    (its strategies, its attempt state) before its first try. Now the first try goes without
    it, and tenacity comes in only when that try was transient, with the tries and waits it
    had before: 4 tries at most, 0.2, 0.4 and 0.8 s apart; a refusal is never tried again."""
    made: list[int] = []

    class Counting(AsyncRetrying):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    waits: list[float] = []

    async def no_wait(seconds: float) -> None:  # tenacity's waits, recorded
        waits.append(seconds)

    monkeypatch.setattr(tenacity, "AsyncRetrying", Counting)  # imported by the retry only
    monkeypatch.setattr(asyncio, "sleep", no_wait)
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    client = AgentClient(NodeRows("127.0.0.1").get_node("n1"), creds, "tlsroll-test")
    request = agent_pb2.PreflightRequest()
    answer = agent_pb2.PreflightResponse(ok=True)
    unavailable = TransientError("agent n1: unavailable")

    tries = Tries(answer)
    monkeypatch.setattr(client, "_once", tries)
    for _ in range(6):
        assert await client.preflight(request) == answer
    assert (tries.asked, made, waits) == (6, [], [])

    tries = Tries(unavailable, unavailable, answer)
    monkeypatch.setattr(client, "_once", tries)
    assert await client.preflight(request) == answer
    assert (tries.asked, made, waits) == (3, [1], [0.2, 0.4])

    made.clear()
    waits.clear()
    tries = Tries(unavailable)
    monkeypatch.setattr(client, "_once", tries)
    with pytest.raises(TransientError):
        await client.preflight(request)
    assert (tries.asked, made, waits) == (4, [1], [0.2, 0.4, 0.8])

    made.clear()
    waits.clear()
    tries = Tries(StepFailed("no (FAILED_PRECONDITION)"))
    monkeypatch.setattr(client, "_once", tries)
    with pytest.raises(StepFailed):
        await client.preflight(request)
    assert (tries.asked, made, waits) == (1, [], [])
    assert client.in_flight == 0


async def generation_moves(directory: Path, mp: pytest.MonkeyPatch, n: int) -> int:
    """An enable-tls rollout of ``n`` nodes (no certificate of theirs superseded: none is
    revoked) in ``tests/test_engine.py``'s harness: how often the store's ``generation``
    moved, each move making the heartbeat path read its snapshot again."""
    world = engine_world(directory, mp, n)
    leader = world.boot(prepare_ahead=1)
    pool_reads_enrolment(world, leader)
    await leader.start(max_parallel=2)
    before = leader.store.db.generation
    await drive_to_the_end(world, leader, n)
    moved = leader.store.db.generation - before
    await leader.stop()
    return moved


async def test_a_rollout_s_stages_leave_the_heartbeats_snapshot_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: each stage's signing record (``Store.record_certificate``) moved the store's
    ``generation`` on, so the next heartbeat read the heartbeat path's snapshot again (a
    worker-thread hop and four queries, per node of a rollout), though a new certificate
    changes nothing it keeps (the revoked serials, the certificates nodes call with, the
    epoch, the revocation list). A rollout that revokes nothing moves it as often at 8 nodes
    as at 2."""
    few = await generation_moves(tmp_path / "few", monkeypatch, 2)
    many = await generation_moves(tmp_path / "many", monkeypatch, 8)
    assert many == few, (few, many)  # the old code: 2 and 8


def test_the_leader_s_channels_to_agents_and_the_agent_s_server_send_no_bdp_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15: gRPC's core answers data that arrives on a quiet connection with a PING of its
    own (a bandwidth-delay probe, to size the flow-control window): on the leader's channels
    to agents, one more round trip for every reply and every message of a switch's watch,
    each waking the leader's gRPC threads (``bench.rollout``: its event-engine threads
    switched about a third less per node without it), and on the agent's server the same for
    every call the leader makes. The control port has had none since heartbeats were cut down.
    Options as passed to gRPC (what gRPC then sends is not observable from Python)."""
    from tlsroll import rpc

    seen: list[Any] = []

    def capturing(target: str, credentials: Any, options: Any = None, **kw: Any) -> Any:
        seen.append(dict(options or []))
        raise RuntimeError("captured")

    monkeypatch.setattr(grpc.aio, "secure_channel", capturing)
    creds = grpc.ssl_channel_credentials(pki.CertificateAuthority.create().cert_pem)
    client = AgentClient(NodeRows("127.0.0.1").get_node("n1"), creds, "tlsroll-test")
    with pytest.raises(RuntimeError, match="captured"):
        client.channel  # noqa: B018 - opens the channel
    assert seen and seen[0].get("grpc.http2.bdp_probe") == 0, seen
    assert dict(rpc.AGENT_SERVER_OPTIONS).get("grpc.http2.bdp_probe") == 0


_ACCEPT_ONE = """
import asyncio, os, sys
import {first}
import grpc
from leader.runtime import SERVER_OPTIONS

async def main():
    server = grpc.aio.server(options=SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await channel.unary_unary("/none.N/M")(b"", timeout=10)
        except grpc.aio.AioRpcError as exc:
            print(exc.code().name)
    await server.stop(None)

asyncio.run(main())
print(repr(os.environ.get("GRPC_EXPERIMENTS")))
"""


def _accept_one(environ: dict[str, str], first: str = "leader.daemon") -> str:
    """gRPC's tcp trace of a leader-like process (imported as the daemon is: ``first``, the
    module it imports before gRPC) whose server accepts one connection and answers one
    call."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    env |= {"GRPC_VERBOSITY": "debug", "GRPC_TRACE": "tcp"} | environ
    done = subprocess.run(
        [sys.executable, "-c", _ACCEPT_ONE.replace("{first}", first)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    code, experiments = done.stdout.split()
    assert code == "UNIMPLEMENTED", done.stdout
    if first == "tests.grpc_env":  # gRPC has read it: off the environment again
        assert experiments == repr(environ.get("GRPC_EXPERIMENTS")), done.stdout
    return done.stderr


def test_the_leader_accepts_connections_on_grpc_s_polling_thread_not_the_event_engine() -> None:
    """The leader turns gRPC's ``event_engine_listener`` experiment off (``leader.__init__``):
    the connections its ports accept (every agent's heartbeat stream) are then read by the
    thread that polls the completion queue, not handed over from the EventEngine's thread pool
    (~12 context switches of gRPC's threads per sparse message down to ~3;
    docs/performance.md). Seen in gRPC's own tcp trace: iomgr's listener and endpoint
    (``tcp_server_posix.cc``, ``tcp_posix.cc``), which gRPC's defaults never use. If a
    later grpcio drops the switch, gRPC says "Unknown experiment" and this fails: measure
    again (``bench.grpc_floor --modes message``)."""
    trace = _accept_one({})
    assert "Unknown experiment" not in trace, UNKNOWN.format(grpc.__version__, GRPC_EXPERIMENTS)
    # iomgr's listener and the accepted connection's iomgr endpoint. (Not "no
    # posix_endpoint.cc": the test's own client was an EventEngine client before session 67,
    # whose endpoint's shutdown may be traced with that file: it failed once in CI so.)
    assert "tcp_server_posix.cc" in trace, trace[-2000:]
    assert "tcp_posix.cc" in trace, trace[-2000:]
    # An explicit GRPC_EXPERIMENTS wins (here: gRPC's defaults, the EventEngine listener and
    # endpoints, none of iomgr's; the EventEngine's own file names show only in its error
    # traces, which a clean run may not have).
    default = _accept_one({"GRPC_EXPERIMENTS": ""})
    assert "tcp_server_posix.cc" not in default, default[-2000:]
    assert "tcp_posix.cc" not in default, default[-2000:]


_READ_STREAM = """
import asyncio, os, sys
import {first}
import grpc


def woke(name):
    # Voluntary context switches of this process's threads called ``name`` (a thread that
    # ended takes its count along: fewer, never more).
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/self/task/{tid}/status") as f:
                status = f.read()
        except OSError:
            continue
        total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


async def main():
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
        stream = channel.unary_stream("/t.T/S")
        async for _ in stream(b""):  # connected, warm
            break
        before, got = woke("event_engine"), 0
        async for _ in stream(b""):
            got += 1
        print(got, woke("event_engine") - before)


asyncio.run(main())
"""


def _read_stream(port: int, environ: dict[str, str], first: str = "leader.daemon") -> float:
    """The voluntary context switches of gRPC's EventEngine threads per message, in a
    leader-like process (``first`` imported before gRPC, as the daemon does) whose channel
    reads a stream of sparse messages, as the leader reads an agent's replies and a switch's
    watch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")} | environ
    done = subprocess.run(
        [sys.executable, "-c", _READ_STREAM.replace("{first}", first), str(port)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got, woke = map(int, done.stdout.split())
    assert got == SPARSE_MESSAGES, done.stdout
    return woke / got


SPARSE_MESSAGES = 40


@contextlib.contextmanager
def sparse_stream_server() -> Iterator[int]:
    """A gRPC server on loopback whose one method streams ``SPARSE_MESSAGES`` small messages
    10 ms apart (each arrives on a quiet connection, as a switch's states do); its port."""

    def stream(_request: bytes, _context: Any) -> Iterator[bytes]:
        for _ in range(SPARSE_MESSAGES):
            time.sleep(0.01)
            yield b"x" * 100

    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"S": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def test_the_leader_reads_its_channels_to_agents_on_grpc_s_polling_thread() -> None:
    """Issue 15 (session 67): the leader turns gRPC's ``event_engine_client`` experiment off
    too (``leader.GRPC_EXPERIMENTS``), so its channels to agents are iomgr's endpoints, read
    by the thread that polls the completion queue, as its listening ports' connections have
    been since session 32. An EventEngine client hands every message that arrives (an
    agent's reply, each state of a switch's watch) from the engine's thread pool to that
    thread: 5-6 wake-ups of the engine's threads per sparse message, about one with iomgr
    (``bench.rollout``: the leader's event_engine threads per node; docs/performance.md).
    Counted, not timed; an explicit GRPC_EXPERIMENTS wins (here the setting before this one:
    the count fails so)."""
    with sparse_stream_server() as port:
        leader = _read_stream(port, {})
        before = _read_stream(port, {"GRPC_EXPERIMENTS": "-event_engine_listener"})
    assert leader <= 2.5, (leader, before)
    assert before >= 3, (leader, before)


UNKNOWN = (
    "grpcio {} does not know the experiment the leader turns off (leader.GRPC_EXPERIMENTS = "
    "{!r}): gRPC says 'Unknown experiment' (which the daemon's GRPC_VERBOSITY=NONE does not "
    "write) and the leader runs gRPC's default listener. Measure again (bench.grpc_floor "
    "--modes message; docs/performance.md) and change or remove the setting."
)


def test_the_installed_grpcio_knows_the_experiment_the_leader_turns_off() -> None:
    """A later grpcio may drop ``event_engine_listener``: gRPC then says "Unknown experiment"
    (the daemon's ``GRPC_VERBOSITY=NONE`` keeps it off the log, so it is asked for here at
    ERROR, as an explicit value wins) and runs its default. That fails here, saying what to
    do, rather than passing unnoticed (review 2 of session 32, F6). A name gRPC does not know
    shows so (the check can fail)."""

    def imported(environ: dict[str, str]) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")} | environ
        env["GRPC_VERBOSITY"] = "ERROR"
        done = subprocess.run(
            [sys.executable, "-c", "import leader, grpc"],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    assert "Unknown experiment" in imported({"GRPC_EXPERIMENTS": "-no_such_experiment"})
    stderr = imported({})
    assert "Unknown experiment" not in stderr, UNKNOWN.format(grpc.__version__, GRPC_EXPERIMENTS)
    assert stderr == "", stderr[-2000:]  # nothing else gRPC says at the leader's import either


def test_the_in_process_tests_run_the_listener_the_leader_ships() -> None:
    """Review 2 of session 32, F6: the in-process tests (the leader's service in the test
    process) ran gRPC's default listener, not the leader's. ``tests/grpc_env.py`` (imported
    by ``tests/conftest.py`` before gRPC) sets the leader's value before gRPC reads it, and
    takes it off the environment again (the daemons the tests start set their own). Seen as
    the listener test above sees it, in a process that imports what the test session does;
    and this session set the leader's value (unless one was given)."""
    trace = _accept_one({}, first="tests.grpc_env")
    assert "tcp_server_posix.cc" in trace, trace[-2000:]
    assert "tcp_posix.cc" in trace, trace[-2000:]
    if grpc_env.SET["GRPC_EXPERIMENTS"] is None:
        assert grpc_env.EXPERIMENTS == GRPC_EXPERIMENTS
        assert "GRPC_EXPERIMENTS" not in os.environ  # the daemons the tests start: their own
    # An explicit value wins (gRPC's defaults here), and stays in the environment.
    default = _accept_one({"GRPC_EXPERIMENTS": ""}, first="tests.grpc_env")
    assert "tcp_server_posix.cc" not in default, default[-2000:]


REFSERVER_LOAD = """
import json, os, ssl, sys
from refserver import daemon
from tlsroll import lean
if sys.argv[1] == "whole":  # a release of aiohttp whose server cannot be imported alone
    lean.AIOHTTP_VERSION = "(?!)"
daemon.load()
client = "aiohttp.connector" in sys.modules
if client:
    import aiohttp.connector as connector
print(json.dumps({
    "client": client,
    "aiohttp": [c.cert_store_stats()["x509"] for c in
                (connector._SSL_CONTEXT_VERIFIED, connector._SSL_CONTEXT_UNVERIFIED)]
               if client else None,
    "env": [os.environ.get(n) for n in ("SSL_CERT_FILE", "SSL_CERT_DIR")],
    "after": ssl.create_default_context().cert_store_stats()["x509"],
    "rich": "rich" in sys.modules and sys.modules["rich"] is not None,
}))
"""


@pytest.mark.parametrize("aiohttp", ["alone", "whole"])
def test_the_reference_server_loads_no_ca_bundle_for_aiohttps_client(
    tmp_path: Path, test_ca: pki.CertificateAuthority, aiohttp: str
) -> None:
    """Session 42: every start of the reference server (each switch's restart, inside its
    freeze window) loaded the system's CA bundle twice as it imported aiohttp, whose client
    makes two default TLS contexts at import (about 0.17 s of CPU of its 0.6), for a client the
    server never uses. Its start (``refserver.daemon.load``, as ``main`` does) imports
    aiohttp's server without that client since session 66 (``tlsroll.lean.import_aiohttp_web``:
    no contexts made at all); where aiohttp must be imported whole (``aiohttp="whole"``) the
    client's contexts are made with no certificates. Either way the environment is put back,
    so that a context made after it loads the default store as before. The default store here
    is a bundle of one certificate named by ``SSL_CERT_FILE``, so that the test does not depend
    on the machine's."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(test_ca.cert_pem)
    env = child_env() | {"SSL_CERT_FILE": str(bundle)}
    env.pop("SSL_CERT_DIR", None)
    said = subprocess.run(
        [sys.executable, "-P", "-c", REFSERVER_LOAD, aiohttp],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    facts = json.loads(said.stdout)
    whole = aiohttp == "whole"
    assert facts == {
        "client": whole,
        "aiohttp": [0, 0] if whole else None,
        "env": [str(bundle), None],
        "after": 1,
        "rich": False,
    }


# Starts the reference server as ``python -P -m refserver`` does (``refserver/__main__.py`` run
# as ``__main__``) and, once the file named by its second argument exists (the test saw it
# serve), writes what the process holds to the first: its modules, and its garbage collector
# (on or not, how many objects it froze). The test stops it (SIGTERM). Only the standard library
# is imported besides the server.
REFSERVER_HELD = """
import gc, json, os, runpy, sys, threading, time
out, go = sys.argv[1], sys.argv[2]

def watch():
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    held = {
        "modules": sorted(name for name, module in list(sys.modules.items()) if module),
        "gc": {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()},
    }
    with open(out + ".part", "w") as f:
        json.dump(held, f)
    os.rename(out + ".part", out)

threading.Thread(target=watch, daemon=True).start()
sys.argv = ["refserver", *sys.argv[3:]]
runpy.run_module("refserver", run_name="__main__", alter_sys=True)
"""

# aiohttp's client: sessions, the connector (and its default TLS contexts), the cookie jar,
# tracing, the resolver and happy eyeballs.
AIOHTTP_CLIENT = {
    "aiohttp.client",
    "aiohttp.client_reqrep",
    "aiohttp.connector",
    "aiohttp.cookiejar",
    "aiohttp.tracing",
    "aiohttp.resolver",
    "aiohappyeyeballs",
}


class _HeldRefServer(RefServer):
    """A reference server started through ``REFSERVER_HELD``, which writes to ``held``."""

    def __init__(self, root: Path, address: str, held: Path, go: Path) -> None:
        super().__init__(root, address)
        self.held, self.go = held, go

    def command(self) -> list[str]:
        return [sys.executable, "-P", "-c", REFSERVER_HELD, str(self.held), str(self.go),
                "--config", str(self.config_path)]  # fmt: skip


def test_a_started_reference_server_holds_no_http_client_and_froze_its_imports(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Session 66, issue 15: the reference server starts at every switch, inside its freeze
    window, and its start was about 0.18 s of CPU, nearly all of it imports. ``import
    aiohttp.web`` ran ``aiohttp/__init__.py``, which imports the whole client (15-20 ms of
    CPU) for a server that makes no client connection; and the garbage collector ran about 90
    collections during the imports, which freed nothing (about 11 ms). A started server
    (``python -P -m refserver``, as the agent's reference driver starts it) now holds none of
    aiohttp's client (``tlsroll.lean.import_aiohttp_web``), and its collector, on, left its
    imports frozen out of every collection (``tlsroll.lean.importing``). It serves as before,
    with aiohttp's own ``Server`` header (the version taken from aiohttp's ``__init__``)."""
    import aiohttp.http  # the whole package, as this test process has it

    held, go = tmp_path / "held.json", tmp_path / "go"
    server = _HeldRefServer(tmp_path / "server", loopback(), held, go)
    try:
        server.start()
        index = server.request("GET", "")
        assert index.status == 200 and index.json()["server"] == "tlsroll-refserver"
        assert index.header("Server") == aiohttp.http.SERVER_SOFTWARE
        entry = server.request("POST", "entries", {"x": 1})
        assert entry.status == 201, entry.body
        go.touch()
        wait_until(held.exists, 30, "the reference server's modules")
        assert server.stop() == 0
    finally:
        server.close()
    facts = json.loads(held.read_text())
    modules = set(facts["modules"])
    assert {"refserver.server", "aiohttp.web"} <= modules  # it did serve
    assert modules & AIOHTTP_CLIENT == set()
    assert facts["gc"]["enabled"] is True
    assert facts["gc"]["frozen"] > 10_000, facts["gc"]  # the imports' objects (about 58,000)


# A stand-in package ``aiohttp`` (its ``__init__.py``, its ``web.py``, and what its package and
# its server are named): whether ``import_aiohttp_web`` runs the package's ``__init__``
# (imported "whole") or not ("alone").
STAND_INS = {
    # Its server takes only the version from the package: imported alone, __init__ never runs.
    "alone": ('__version__ = "9.9.9"\nraise RuntimeError("the package ran")\n',
              "from . import __version__\nNAME = 'web ' + __version__\n",
              None, "web 9.9.9"),
    # Its server takes another name from the package: imported whole.
    "whole, a name": ('__version__ = "9.9.9"\nNAME = "package"\n',
                      "from . import NAME as PACKAGE\nNAME = 'web of ' + PACKAGE\n",
                      "package", "web of package"),
    # No version line to read: imported whole.
    "whole, no version": ('NAME = "package"\n', "NAME = 'web'\n", "package", "web"),
    # In a zip (its __init__.py cannot be opened as a file): imported whole.
    "whole, in a zip": ('__version__ = "9.9.9"\nNAME = "package"\n', "NAME = 'web'\n",
                        "package", "web"),
}  # fmt: skip


@pytest.mark.parametrize("case", STAND_INS)
def test_aiohttps_server_is_imported_alone_only_where_it_can_be(tmp_path: Path, case: str) -> None:
    """``tlsroll.lean.import_aiohttp_web`` (the reference server's start, session 66) makes
    the package without running its ``__init__`` only where the server's modules take nothing
    from it but its version; otherwise (another release of aiohttp, or a package it cannot
    read) the package is imported whole, as before, and nothing of the attempt is left behind:
    never a start that fails for it. Seen with a stand-in package ahead of the real one on the
    path."""
    init, web, package_name, web_name = STAND_INS[case]
    if case.endswith("in a zip"):
        where = tmp_path / "packages.zip"
        with zipfile.ZipFile(where, "w") as packages:
            packages.writestr("aiohttp/__init__.py", init)
            packages.writestr("aiohttp/web.py", web)
    else:
        where = tmp_path
        (where / "aiohttp").mkdir()
        (where / "aiohttp" / "__init__.py").write_text(init)
        (where / "aiohttp" / "web.py").write_text(web)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(where), env["PYTHONPATH"]])
    code = (
        "import json, sys\n"
        "from tlsroll import lean\n"
        "lean.import_aiohttp_web()\n"
        "import aiohttp, aiohttp.web\n"
        "print(json.dumps([getattr(aiohttp, 'NAME', None), aiohttp.web.NAME, aiohttp.__file__,\n"
        "                  sorted(n for n in sys.modules if n.startswith('aiohttp'))]))\n"
    )
    said = subprocess.run(
        [sys.executable, "-P", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert said.returncode == 0, said.stderr
    package_held, web_held, package_file, modules = json.loads(said.stdout)
    assert package_file == str(where / "aiohttp" / "__init__.py")  # the stand-in
    assert modules == ["aiohttp", "aiohttp.web"]
    assert (package_held, web_held) == (package_name, web_name)


def test_the_cut_off_nodes_are_looked_for_again_only_once_a_revocation_or_removal_moved_on(
    tmp_path: Path,
) -> None:
    """Review rev49fin: ``Store.cut_off_nodes`` (read at each engine pass of a finalize and in
    every heartbeat snapshot) scanned every enrolled node each time. The set changes only
    with a revocation or a removal (both move the revocation list's number on) or a node's
    certificate on record changing (``nodes_generation``): it is looked for again only then.
    Counted in statements, not timed."""
    from leader.store import NodeCert, _record_node_cert

    store = Store(tmp_path / "leader.sqlite3")
    now = dt.datetime.now(dt.UTC)
    with store.db.tx() as db:
        for i in range(20):
            serial = f"{i + 1:x}abc"
            db.execute(
                "INSERT INTO nodes (name, addresses, dns_names, agent_version, agent_port,"
                " key_pin, cert_fingerprint, cert_serial, cert_not_after, enrolled_at)"
                " VALUES (?, ?, '[]', '1', 9000, ?, ?, ?, ?, ?)",
                (f"n{i}", json.dumps([f"127.0.4.{i + 1}"]), f"pin{i}", f"fp{i}", serial,
                 now.isoformat(), now.isoformat()),
            )  # fmt: skip
            cert = NodeCert(f"pin{i}", f"fp{i}", serial, now + dt.timedelta(days=30))
            _record_node_cert(db, f"n{i}", cert, now, None)
    trace = StoreTrace(on=True)
    with store.db.read() as conn:
        conn.set_trace_callback(trace.statement)

    def scans() -> int:
        return sum("JOIN certificates" in s for s in trace.statements)

    try:
        assert store.cut_off_nodes() == frozenset()
        assert scans() == 1
        for _ in range(50):  # passes and snapshots: nothing revoked or removed meanwhile
            assert store.cut_off_nodes() == frozenset()
        assert scans() == 1
        store.revoke("3abc", reason="lost", now=now, actor="admin")  # n2's agent cut off
        assert store.cut_off_nodes() == {"n2"}
        assert store.cut_off_nodes() == {"n2"}
        assert scans() == 2
        store.remove_node("n2", now=now, actor="admin")  # removed: no longer enrolled
        assert store.cut_off_nodes() == frozenset()
        assert scans() == 3

        # ``cut_off_kept``, the engine's read on the event loop at every pass (s50): no query
        # at all until a write that may change the set (a revocation, a removal: not routine;
        # an enrolment or renewal: nodes_generation); then None, and the store is read again.
        count = len(trace.statements)
        for _ in range(50):
            assert store.cut_off_kept() == frozenset()
        assert len(trace.statements) == count
        with store.db.tx(routine=True) as db:  # a rollout's progress, a heartbeat's record
            db.execute("UPDATE nodes SET agent_version = '2' WHERE name = 'n5'")
        count = len(trace.statements)
        assert store.cut_off_kept() == frozenset()
        assert len(trace.statements) == count
        store.revoke("5abc", reason="lost", now=now, actor="admin")  # n4's agent cut off
        assert store.cut_off_kept() is None
        assert store.cut_off_nodes() == {"n4"} and store.cut_off_kept() == frozenset({"n4"})
        store.nodes_generation += 1  # an enrolment, a renewal
        assert store.cut_off_kept() is None
        assert store.cut_off_nodes() == {"n4"} and store.cut_off_kept() == frozenset({"n4"})
        store.remove_node("n4", now=now, actor="admin")
        assert store.cut_off_kept() is None and store.cut_off_nodes() == frozenset()
    finally:
        store.close()


@pytest.mark.parametrize("merged", [True, False])
async def test_the_leader_asks_a_switch_s_watch_only_for_the_states_it_acts_on(
    loopback: Callable[[], str], merged: bool
) -> None:
    """Issue 15 (session 69): a switch's stream brought six states, two of them (frozen and
    restarted, the latter inside the freeze window) for nothing: the leader acts on the begun
    one, the config written (the restart begins), the verified one and the outcome, and the
    next state sent carries what the two said. The leader's watch asks for its phases
    (``GetTransactionRequest.phases``; a real agent's answer: ``tests/test_event_driven.py``),
    in one call or as to an agent of the release before (Switch, then the watch), and every
    state of a way back; what ``wait_transaction`` acts on is among them."""
    from leader import changes
    from tests.test_agent_calls import Agent, switch_calls

    asked: list[frozenset[int]] = []

    class Asked(Agent):
        async def WatchTransaction(self, request: Any, context: Any) -> Any:
            asked.append(frozenset(request.phases))
            async for txn in super().WatchTransaction(request, context):
                yield txn

    await switch_calls(loopback(), Asked(merged=merged))  # type: ignore[abstract]
    assert asked and len(set(asked)) == 1, asked
    (phases,) = set(asked)
    assert agent_pb2.TRANSACTION_PHASE_FROZEN not in phases
    assert agent_pb2.TRANSACTION_PHASE_RESTARTED not in phases
    # What the leader acts on: the restart begun (not before the restart), the verify (the
    # confirm's early check), every phase of a way back.
    acted_on = {agent_pb2.TRANSACTION_PHASE_VERIFIED}
    every = set(agent_pb2.TransactionPhase.values()) - {0}
    acted_on |= every - changes._BEFORE_RESTART - {agent_pb2.TRANSACTION_PHASE_RESTARTED}
    acted_on |= {agent_pb2.TRANSACTION_PHASE_STARTED}
    assert phases == acted_on, sorted(phases)


class _CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts its passes and the callbacks handed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.passes = 0
        self.callbacks = 0

    def _run_once(self) -> None:
        self.passes += 1
        super()._run_once()  # type: ignore[misc]

    def call_soon(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.callbacks += 1
        return super().call_soon(*args, **kwargs)

    def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.callbacks += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_a_store_call_comes_back_to_the_loop_in_one_hop() -> None:
    """Issue 15 (session 69): the leader's loop made about 85 passes a node in a rollout, and
    each store call (``tlsroll.dbthread.run``: about nine a node at the leader, more for a
    switch at the agent) took three of them and six callbacks: the executor future's chaining
    to an asyncio future, then ``asyncio.shield``'s inner and outer callbacks, then the
    caller's wake-up. Now the store's thread hands the loop one callback that settles the
    awaited future: two passes a call (that callback, the caller's wake-up) and two
    callbacks. What it must keep (``tests/test_dbthread.py``): one thread, in order, and a
    call whose caller is cancelled still runs."""
    calls = 40
    loop = _CountingLoop()
    try:

        async def calls_in_a_row() -> list[int]:
            got = []
            for i in range(calls):
                got.append(await dbthread.run(int, str(i)))
            return got

        loop.run_until_complete(dbthread.run(int, "0"))  # the thread made, the loop started
        loop.passes = loop.callbacks = 0
        assert loop.run_until_complete(calls_in_a_row()) == list(range(calls))
        # (the task's own start and end: a few passes and callbacks, not per call)
        assert loop.callbacks <= 2 * calls + 4, loop.callbacks
        assert loop.passes <= 2 * calls + 4, loop.passes
    finally:
        loop.close()


def test_a_store_call_s_exception_reaches_its_caller_and_a_closed_loop_drops_its_result() -> None:
    """The one-hop store call (above) raises the call's own exception in its caller, and a
    call whose loop closed before it ended is dropped without a word from the thread."""

    def fails() -> None:
        raise ValueError("the store said no")

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="the store said no"):
            loop.run_until_complete(dbthread.run(fails))
        gate = threading.Event()

        async def start() -> asyncio.Task[bool]:
            task = asyncio.ensure_future(dbthread.run(gate.wait, 30))
            await asyncio.sleep(0)
            return task

        task = loop.run_until_complete(start())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
    finally:
        loop.close()
    gate.set()
    asyncio.run(dbthread.barrier())  # the thread ran the call and dropped its result


async def test_a_bounded_step_s_work_runs_in_its_own_step_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (session 69): a preflight's and a stage's work (``Engine._step``) was bounded
    by Python 3.11's ``asyncio.wait_for``, which made a task of it, a waiter future and their
    callbacks: two loop passes and a task more a node and step. Now the step's own task runs
    it under ``asyncio.timeout`` (the deadline's failure: ``tests/test_engine.py``'s
    ``test_a_preflight_without_answer_fails_after_the_step_deadline``). And a switch's watch
    (two generators, ``AgentClient.switch_and_watch`` around ``watch_transaction``), left
    unfinished as its outcome returned, was closed by the garbage collector's hook: the loop
    woken from outside (``call_soon_threadsafe``) to make a task for each."""
    world = engine_world(tmp_path / "rollout", monkeypatch, 4)
    leader = world.boot(prepare_ahead=1)
    await leader.start(max_parallel=1)
    loop = asyncio.get_running_loop()
    made: Counter[str] = Counter()
    real = loop.create_task

    def create_task(coro: Any, **kwargs: Any) -> Any:
        made[getattr(coro, "__qualname__", type(coro).__name__)] += 1
        return real(coro, **kwargs)

    with monkeypatch.context() as counting:
        counting.setattr(loop, "create_task", create_task)
        await drive_to_the_end(world, leader, 4)
    await leader.stop()
    assert made["Engine._run_step"] >= 4 * 2, made  # (the steps ran: each in a task of its own)
    assert made["Engine._step"] == 0, made
    # A switch's and a confirm's watch closed in the step's task as its outcome returns, not
    # in tasks the loop made for the generators the garbage collector found unfinished.
    assert made["async_generator_athrow"] == 0, made


async def test_a_switch_s_watch_closed_by_its_caller_ends_its_stream_at_once(
    loopback: Callable[[], str],
) -> None:
    """Issue 15 (session 69): the leader's switch watch is two generators
    (``AgentClient.switch_and_watch`` around ``watch_transaction``). The step returns at the
    outcome and closes the outer one (``leader.changes.wait_transaction``); the inner one,
    holding the stream's call and the channel's use, was left to the garbage collector's hook,
    which wakes the loop from outside to close it in a task of its own. Now the outer one
    closes it as it is closed: the channel's use has ended when the close returns."""
    from tests.test_agent_calls import Agent, served

    request = agent_pb2.SwitchRequest(command=agent_pb2.Command(rollout_id="r1", epoch=1))
    async with served(loopback(), Agent(merged=True)) as client:  # type: ignore[abstract]
        states = client.switch_and_watch(request)
        async for txn in states:
            if txn.outcome != agent_pb2.TRANSACTION_OUTCOME_PENDING:
                break
        assert client.in_flight == 1  # (the watch is open until it is closed)
        await states.aclose()
        assert client.in_flight == 0


def test_a_switch_whose_early_check_has_ended_takes_it_without_a_wait() -> None:
    """Issue 15 (session 70): when a switch completes, the confirm's outside check begun at the
    agent's verify has mostly ended already (it began before the agent's unfreeze and its
    completed record). Its result was still taken through ``asyncio.wait`` with a timer task
    of ``CONFIRM_WITH_SWITCH``: a task, a waiter and their callbacks, two loop passes and more
    on the switch's critical path, between the outcome's arrival and the write that plans the
    next node's switch. Now an ended check is taken at once: no loop pass, no timer; the
    confirm is written with the switch as before (a check not ended yet is still waited for:
    ``tests/test_engine.py``)."""
    from leader.changes import ChangeSteps
    from leader.rollout_core import NodeEvent
    from leader.rollout_enums import Strategy

    loop = _CountingLoop()
    key = ("r1", "n1")
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(seconds)

    async def switch_completed() -> tuple[int, int, SimpleNamespace]:
        early: asyncio.Future[str | None] = loop.create_future()
        early.set_result(None)  # the check found nothing wrong, before the outcome came
        ctx = SimpleNamespace(
            sleep=sleep,
            checks={key: early},
            confirmed=[],
            rollout=SimpleNamespace(strategy=Strategy.DIRECT),
        )
        passes, callbacks = loop.passes, loop.callbacks
        await ChangeSteps._confirm_with_switch(cast(Any, ctx), key, early)
        return loop.passes - passes, loop.callbacks - callbacks, ctx

    try:
        passes, callbacks, ctx = loop.run_until_complete(switch_completed())
    finally:
        loop.close()
    assert ctx.confirmed == [NodeEvent.CONFIRM_DONE]  # written with the switch's outcome
    assert ctx.checks == {}  # taken: the confirm step does not run it again
    assert (passes, callbacks, slept) == (0, 0, []), (passes, callbacks, slept)


async def test_a_stage_s_outcome_while_another_node_switches_wakes_no_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (session 70): a step's outcome is written with the plan that follows it, and
    the engine's loop is not woken for it (its pass would make the same plan again). But a
    stage's outcome while another node switches (nodes prepared ahead: the staged node waits
    for that switch's confirm) moves no node, so it persisted no plan and woke the loop for a
    pass that found nothing to do: one pass a node, each a plan, a read of the cut-off nodes
    and the loop's turns. Now an outcome whose plan moves no node and names only steps that
    run already wakes none (one whose plan would begin a step still wakes the pass, which
    begins it, as before). The rollout is as before (``tests/test_engine.py``)."""
    n = 3
    world = engine_world(tmp_path / "rollout", monkeypatch, n)
    leader = world.boot(prepare_ahead=1)
    await leader.start(max_parallel=1)
    woken: Counter[str] = Counter()
    real = leader.engine.wake.set

    def wake() -> None:
        task = asyncio.current_task()
        # a step's task is named by its key: (rollout id, node, <Step.X: 'x'>)
        step = re.search(r"<Step\.\w+: '(\w+)'>", task.get_name() if task is not None else "")
        woken[step[1] if step is not None else "other"] += 1
        real()

    monkeypatch.setattr(leader.engine.wake, "set", wake)
    row = await drive_to_the_end(world, leader, n)
    await leader.stop()
    assert {r.state for r in row.records} == {NodeState.DONE}
    # (before: 2 of the 3 stages, all but the first node's, whose outcome plans its switch)
    assert woken["stage"] == 0, woken
