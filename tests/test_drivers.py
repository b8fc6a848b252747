"""The ``systemd`` and ``exec`` drivers, each switching a real reference server.

systemd is not PID 1 in the test container (nor in CI), so a FAKE ``systemctl``, placed first on
the agent's PATH, stands in for it: ``systemctl restart UNIT`` really restarts the node's
reference server (SIGTERM through its pid file, then a new detached process, waiting for it
like a ``Type=notify`` unit). The same script serves as the admin's commands for the ``exec``
driver (restart, status, freeze, unfreeze).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import grpc
import pytest
from aiohttp import web
from structlog.testing import capture_logs

import tlsroll
from leader.cli.password import verifier_json
from leader.cli.rollout import rollout_request
from nodeagent import clients as client_sources
from nodeagent import drivers, plans, ports, transaction
from nodeagent.drivers import (
    Driver,
    DriverError,
    ExecDriver,
    ReferenceDriver,
    ServerFacts,
    SystemdDriver,
    Target,
    _wait_healthy,
    make_driver,
)
from nodeagent.journal import Journal
from nodeagent.leader_link import live_server
from nodeagent.service import NodeAgentService, login_failures
from tests.cluster import AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import RPC_TIMEOUT, Node, NodeFactory, alive
from tests.refserver_helper import RefServer
from tlsroll import daemon, httpcheck
from tlsroll.clients import ClientSeen, ClientsView, quiet_refusal
from tlsroll.config import ConfigFile, Section
from tlsroll.enums import Change
from tlsroll.errors import ConfigError, LocalResourceError
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE, clients_message

UNIT = "praxis-live.service"

CONTROL_SCRIPT = '''#!{python}
"""Fake systemctl (systemd is not PID 1 here) and exec-driver commands for one test node."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

S = json.loads({settings!r})
PID_FILE = Path(S["pid_file"])


def log_call(argv):
    with open(S["calls"], "a") as f:
        f.write(" ".join(argv) + "\\n")


class Unix(http.client.HTTPConnection):
    def __init__(self):
        super().__init__("localhost", timeout=30)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(S["admin_socket"])


def admin(method, path, body=None):
    conn = Unix()
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={{"Content-Type": "application/json"}})
        resp = conn.getresponse()
        payload = resp.read()
    except OSError as exc:
        sys.exit(f"server not answering on {{S['admin_socket']}}: {{exc}}")
    finally:
        conn.close()
    if resp.status != 200:
        sys.exit(f"admin {{path}} answered {{resp.status}}")
    return json.loads(payload)


def alive(pid):
    try:
        stat = Path(f"/proc/{{pid}}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def server_pid():
    try:
        return int(PID_FILE.read_text())
    except (OSError, ValueError):
        return None


def restart():
    hang = Path(S["hang_once"])
    if hang.exists():  # a restart that hangs (once): the agent must not hang with it
        hang.unlink()
        # Whole or not at all (a file being written was read empty once): renamed into place.
        tmp = Path(S["hang_pid"] + ".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, S["hang_pid"])
        time.sleep(600)
    pid = server_pid()
    if pid and alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    with open(S["server_log"], "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "refserver", "--config", S["config"]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # like a Type=notify unit: wait for start-up
        if child.poll() is not None:
            sys.exit(
                f"Job for {{S['unit']}} failed because the control process exited with "
                f"error code {{child.returncode}}."
            )
        if server_pid() == child.pid:
            child.returncode = 0  # detached: it runs on without us
            return
        time.sleep(0.05)
    sys.exit(f"Job for {{S['unit']}} timed out.")


def main(argv):
    log_call(argv)
    if argv == ["restart", S["unit"]] or argv == ["restart"]:
        restart()
    elif argv == ["status"]:
        print(json.dumps(admin("GET", "/admin/status")))
    elif argv == ["status", "--no-watermark"]:  # an admin's status command that omits it
        data = admin("GET", "/admin/status")
        del data["watermark"]
        print(json.dumps(data))
    elif argv == ["freeze"]:
        data = admin("POST", "/admin/freeze", {{"drain_timeout": 10}})
        if not data["drained"]:
            sys.exit("writes still in flight")
        print(data["watermark"])
    elif argv == ["unfreeze"]:
        admin("POST", "/admin/unfreeze")
    else:
        sys.exit(f"unsupported: {{argv}}")


main(sys.argv[1:])
'''

TEMPLATE = """# $scheme for {unit}: rendered by tlsroll-agent from the admin's template
[server]
address = "$address"
app_path = "$app_path"
listen = $listen
http_port = $http_port
https_port = $https_port
cert_file = "$cert_file"
key_file = "$key_file"
client_ca_file = "$ca_file"
data_dir = "{data_dir}"
admin_socket = "{admin_socket}"
"""


@dataclass
class Control:
    """The control script of one node and what it records."""

    script: Path
    bin_dir: Path
    calls: Path
    hang_once: Path
    hang_pid: Path

    def calls_made(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def restarts(self) -> int:
        return sum(1 for c in self.calls_made() if c.startswith("restart"))


def write_control(node: Node) -> Control:
    """Write the control script for ``node``, also as ``systemctl`` in a bin dir of its own."""
    ctl_dir = node.root / "ctl"
    bin_dir = ctl_dir / "bin"
    bin_dir.mkdir(parents=True)
    settings = {
        "config": str(node.server.config_path),
        "pid_file": str(node.server_data_dir / "refserver.pid"),
        "admin_socket": str(node.server.admin_socket),
        "server_log": str(ctl_dir / "server.log"),
        "calls": str(ctl_dir / "calls.log"),
        "hang_once": str(ctl_dir / "hang-once"),
        "hang_pid": str(ctl_dir / "hang.pid"),
        "unit": UNIT,
    }
    text = CONTROL_SCRIPT.format(python=sys.executable, settings=json.dumps(settings))
    script = ctl_dir / "nodectl.py"
    script.write_text(text)
    script.chmod(0o755)
    (bin_dir / "systemctl").symlink_to(script)
    return Control(
        script, bin_dir, ctl_dir / "calls.log", ctl_dir / "hang-once", ctl_dir / "hang.pid"
    )


def write_template(node: Node, extra: str = "") -> Path:
    path = node.root / "refserver.toml.tmpl"
    path.write_text(
        TEMPLATE.format(
            unit=UNIT, data_dir=node.server_data_dir, admin_socket=node.server.admin_socket
        )
        + extra
    )
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("drivers"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@pytest.fixture
def nodes(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(cluster, tmp_path, "drv")
    try:
        yield factory
    finally:
        factory.close()


def code_and_details(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return err.code(), str(err.details())


def systemd_node(nodes: NodeFactory, template_extra: str = "") -> tuple[Node, Control, Path]:
    """A node whose agent runs the systemd driver against the fake ``systemctl`` on its PATH.

    The reference server is first started by the test, as systemd would have started it."""
    node = nodes.new()
    control = write_control(node)
    template = write_template(node, template_extra)
    node.start(
        {"PATH": f"{control.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        driver="systemd",
        template=template,
        unit=UNIT,
        admin_socket=node.server.admin_socket,
        app_path=node.server.app_path,
        timeout=20,
    )
    return node, control, template


def exec_node(
    nodes: NodeFactory,
    timeout: int,
    status: tuple[str, ...] = ("status",),
    freeze: Callable[[Path], list[str]] | None = None,
) -> tuple[Node, Control]:
    """A node whose agent runs the exec driver with the control script as its commands
    (``freeze``: the freeze command, given the script's path)."""
    node = nodes.new()
    control = write_control(node)
    template = write_template(node)
    commands: dict[str, object] = {
        op: [sys.executable, str(control.script), op]
        for op in ("restart", "status", "freeze", "unfreeze")
    }
    commands["status"] = [sys.executable, str(control.script), *status]
    if freeze is not None:
        commands["freeze"] = freeze(control.script)
    node.start(
        extra_config={"server.commands": commands},
        driver="exec",
        template=template,
        app_path=node.server.app_path,
        timeout=timeout,
    )
    return node, control


def assert_switched(node: Node, fingerprint: str) -> None:
    assert node.served_fingerprint() == fingerprint
    assert node.get("https").status == 200
    assert not node.port_open(8080)
    status = node.admin_status()
    assert status["frozen"] is False and status["listen"] == ["https"]


def assert_back_on_http(node: Node, config: bytes) -> None:
    assert node.server.config_path.read_bytes() == config
    assert node.get("http").status == 200
    assert not node.port_open(8443)
    status = node.admin_status()
    assert status["frozen"] is False and status["listen"] == ["http"]
    assert node.post("http", {"after": "rollback"}).status == 201


# --- systemd -----------------------------------------------------------------------------------


def test_systemd_driver_switches_through_systemctl(nodes: NodeFactory) -> None:
    """systemd is not PID 1 here, so a fake ``systemctl`` first on the agent's PATH stands in;
    its ``restart`` really restarts the reference server with the rendered config."""
    node, control, template = systemd_node(nodes)
    pre = node.preflight("sd-ok")
    assert pre.ok, list(pre.problems)
    assert pre.server.driver == "systemd" and list(pre.server.schemes) == ["http"]
    entry = node.post("http", {"n": 1}).json()
    staged = node.stage("sd-ok")
    node.switch("sd-ok")
    done = node.wait_txn("sd-ok")
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)
    assert node.get("https", f"entries/{entry['id']}").status == 200
    assert control.calls_made().count(f"restart {UNIT}") == 1
    assert done.restart_seconds > 0
    # The live config is the admin's template with the staged files filled in.
    stage_dir = node.stage_dir("sd-ok")
    expected = string.Template(template.read_text()).substitute(
        address=node.address,
        app_path=node.server.app_path,
        listen='["https"]',
        scheme="https",
        http_port="8080",
        https_port="8443",
        cert_file=stage_dir / "server.pem",
        key_file=stage_dir / "server.key",
        ca_file=stage_dir / "ca.pem",
    )
    assert node.server.config_path.read_text() == expected


def dual_switch(node: Node, rollout_id: str, change: Change, *, keep_http: bool = False) -> str:
    """Switch(change) as the leader sends it (keep_http: transitional phase 1); the outcome."""
    with node.stub() as stub:
        stub.Switch(
            agent_pb2.SwitchRequest(
                command=node.command(rollout_id), change=CHANGE.wire(change), keep_http=keep_http
            ),
            timeout=RPC_TIMEOUT,
        )
    done = node.wait_txn(rollout_id)
    assert done.outcome == "completed", done.reason
    return str(done.outcome)


def test_systemd_driver_goes_dual_then_finalizes(nodes: NodeFactory) -> None:
    """The transitional strategy through a template: phase 1 renders http and https into one
    config (both served by one restarted process), finalize renders https only."""
    node, control, _template = systemd_node(nodes)
    entry = node.post("http", {"n": 1}).json()
    staged = node.stage("sd-dual")
    dual_switch(node, "sd-dual", Change.ENABLE_TLS, keep_http=True)
    assert node.admin_status()["listen"] == ["http", "https"]
    assert node.get("http", f"entries/{entry['id']}").status == 200
    assert node.get("https", f"entries/{entry['id']}").status == 200
    assert node.served_fingerprint() == staged.fingerprint
    assert 'listen = ["http", "https"]' in node.server.config_path.read_text()
    dual_switch(node, "sd-dual.finalize", Change.FINALIZE)
    assert_switched(node, staged.fingerprint)
    assert control.calls_made().count(f"restart {UNIT}") == 2


def test_template_renders_http_only_https_only_and_dual(tmp_path: Path) -> None:
    template = tmp_path / "nginx.conf.tmpl"
    template.write_text(
        "$http_off listen $address:$http_port;\n"
        "$https_off listen $address:$https_port ssl;\n"
        "$https_off ssl_certificate $cert_file;\n"
        "# scheme=$scheme http=$http_enabled https=$https_enabled listen=$listen\n"
    )
    settings = {
        "config_file": str(tmp_path / "nginx.conf"),
        "template": str(template),
        "app_path": "/",
        "unit": "nginx.service",
        "admin_socket": str(tmp_path / "admin.sock"),
    }
    driver = SystemdDriver(Section(tmp_path / "agent.toml", "server", settings), "10.0.0.5")
    cert = tmp_path / "server.pem"

    def render(*schemes: str) -> list[str]:
        return driver.render(Target(schemes, cert_file=cert)).decode().splitlines()

    assert render("http") == [
        " listen 10.0.0.5:8080;",
        "# listen 10.0.0.5:8443 ssl;",
        f"# ssl_certificate {cert};",
        '# scheme=http http=true https=false listen=["http"]',
    ]
    assert render("https") == [
        "# listen 10.0.0.5:8080;",
        " listen 10.0.0.5:8443 ssl;",
        f" ssl_certificate {cert};",
        '# scheme=https http=false https=true listen=["https"]',
    ]
    assert render("http", "https") == [
        " listen 10.0.0.5:8080;",
        " listen 10.0.0.5:8443 ssl;",
        f" ssl_certificate {cert};",
        '# scheme=https http=true https=true listen=["http", "https"]',
    ]


def test_a_template_that_is_not_utf8_is_one_line_at_the_check_and_the_switch(
    tmp_path: Path,
) -> None:
    """Review s66 walk M1: a template that is not UTF-8 text raised UnicodeDecodeError out of
    ``render`` (no DriverError: no one-line refusal of the switch); now it is one, and the
    checks' ``render_problem`` says it with the config key to fix. A good template: None."""
    template = tmp_path / "server.toml.tmpl"
    template.write_bytes(b'listen = $listen\nname = "Praxis M\xfcller"\n')  # latin-1
    settings = {
        "config_file": str(tmp_path / "server.toml"),
        "template": str(template),
        "app_path": "/",
        "unit": "praxis.service",
        "admin_socket": str(tmp_path / "admin.sock"),
    }
    agent_toml = tmp_path / "agent.toml"
    driver = SystemdDriver(Section(agent_toml, "server", settings), "10.0.0.5")
    with pytest.raises(DriverError) as info:
        driver.render(Target(("https",)))
    assert str(info.value) == f"cannot read template {template}: not UTF-8 text"
    assert driver.render_problem() == (
        f"cannot read template {template}: not UTF-8 text; fix [server].template in {agent_toml}"
    )
    template.write_text('listen = $listen\ncert = "$cert_file"\n')
    assert driver.render_problem() is None


def test_a_servers_config_or_template_that_is_a_fifo_is_said_not_waited_on(
    tmp_path: Path,
) -> None:
    """Review rev50a L2 (the files the agent reads, audited): the managed server's live config
    (read at the agent's start by the stage sweep, and by every switch) and its template made
    FIFOs were read and waited on for ever. Now each is an OSError naming the file and its kind
    (as a directory was: each caller's way with an unreadable config stays), the template's a
    DriverError. In a child: its timeout only ends a hang."""
    config, template = tmp_path / "nginx.conf", tmp_path / "nginx.conf.tmpl"
    os.mkfifo(config, 0o600)
    os.mkfifo(template, 0o600)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from nodeagent.drivers import DriverError, SystemdDriver, Target\n"
        "from tlsroll.config import Section\n"
        "config, template, root = sys.argv[1:]\n"
        "settings = {'config_file': config, 'template': template, 'app_path': '/',\n"
        "            'unit': 'nginx.service', 'admin_socket': root + '/admin.sock'}\n"
        "d = SystemdDriver(Section(Path(root) / 'agent.toml', 'server', settings), '10.0.0.5')\n"
        "try:\n"
        "    d.read_config()\n"
        "except OSError as exc:\n"
        "    print(exc.strerror)\n"
        "try:\n"
        "    d.render(Target(('https',), cert_file=Path(root) / 'server.pem'))\n"
        "except DriverError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(config), str(template), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.splitlines() == [
        f"{config} is not a regular file (a FIFO)",
        f"cannot read template {template}: {template} is not a regular file (a FIFO)",
    ], result.stdout + result.stderr


def test_a_servers_lock_file_that_is_a_fifo_is_not_locked_and_never_waited_on(
    tmp_path: Path,
) -> None:
    """Session 52 (review of 1ff7d01): the reference server's lock file, which the agent
    opens to learn whether a server holds it (``_locked_by_another``, where it may not look
    into the process), made a FIFO: a plain open waited for a writer for ever. Now it is
    opened without blocking: nobody holds a lock on it ("not locked"), at once. In a child:
    its timeout only ends a hang."""
    lock = tmp_path / "refserver.lock"
    os.mkfifo(lock, 0o600)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from nodeagent.drivers import _locked_by_another\n"
        "print(_locked_by_another(Path(sys.argv[1])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(lock)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.splitlines() == ["False"], result.stdout + result.stderr
    assert stat.S_ISFIFO(os.stat(lock).st_mode)  # left as it was


def test_systemd_template_with_an_unknown_placeholder_is_refused(nodes: NodeFactory) -> None:
    node, control, _template = systemd_node(nodes, 'note = "$nonsense"\n')
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    node.stage("sd-tmpl")
    with pytest.raises(grpc.RpcError) as info:
        node.switch("sd-tmpl")
    code, details = code_and_details(info.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "nonsense" in details and "placeholder" in details
    with pytest.raises(grpc.RpcError) as info:
        node.txn("sd-tmpl")
    assert code_and_details(info.value)[0] == grpc.StatusCode.NOT_FOUND
    # Refused before anything changed: same config, same process, never frozen or restarted.
    assert node.server.config_path.read_bytes() == config
    assert node.server_pid() == pid
    assert control.restarts() == 0
    assert node.admin_status()["frozen"] is False
    assert node.post("http", {"still": "writable"}).status == 201


def test_plan_and_start_block_a_node_whose_template_is_missing_or_has_a_bad_placeholder(
    cluster: Cluster, nodes: NodeFactory, tmp_path: Path
) -> None:
    """Review s66 walk M1: the checks never rendered a template driver's template, so
    `tlsroll plan` said "will switch" for a node whose template was missing (install.sh's
    example names one nothing ships) and the rollout halted at that node's first switch, after
    its server certificate was issued. Now the checks render it (nothing written): the plan
    exits 1 naming each node, the file, the reason and the config key; a start is refused and
    nothing is issued, staged or changed on either node. Refused up front with the plan's
    reason, by the CLI and by the leader (brief s67 engine (a): it was accepted, and halted at
    once at the first node's preflight, exit 3), as a plan with a node on http only is."""
    missing, _control, template = systemd_node(nodes)
    template.unlink()  # (read at a switch only: the agent started with it there)
    unknown, _exec_control = exec_node(nodes, timeout=20)
    unknown_template = unknown.root / "refserver.toml.tmpl"
    with unknown_template.open("a") as f:
        f.write('note = "$nonsense"\n')
    before = {
        n.name: (n.server.config_path.read_bytes(), n.server_pid()) for n in (missing, unknown)
    }
    names = f"{missing.name},{unknown.name}"
    plan = cluster.cli("plan", "--nodes", names)
    said = plan.stdout + plan.stderr
    assert plan.returncode == 1, said
    assert "Traceback" not in said and "will switch" not in said, said
    assert f"cannot read template {template}: No such file or directory" in said, said
    assert "placeholder 'nonsense'" in said and str(unknown_template) in said, said
    assert "fix [server].template in" in said, said
    for node in (missing, unknown):
        pre = node.preflight(f"tmpl-{node.name}")
        assert not pre.ok
        (problem,) = pre.problems
        assert "\n" not in problem and "[server].template" in problem, problem

    newest = [r["id"] for r in cluster.schema_json()["rollouts"]]
    password = tmp_path / "pw"
    password.touch(0o600)
    password.write_text("the-practice-password-for-templates\n")
    start = cluster.cli(
        "rollout", "start", "--nodes", names, "--password-file", str(password), "--yes", "--wait"
    )  # fmt: skip
    said = start.stdout + start.stderr
    assert start.returncode == 1 and "Traceback" not in said, said
    (line,) = start.stderr.splitlines()
    assert line.startswith(
        f"tlsroll: error: enable-tls cannot start: its first step would fail at once on "
        f"{missing.name} (cannot read template {template}: No such file or directory; fix "
        "[server].template in "
    ), line
    # (the second node too: prepared ahead while the first switches, review s67 rev2 M3)
    assert f"{unknown.name} (template {unknown_template}: unknown or bad placeholder" in line
    assert line.endswith("leave them out (--nodes); nothing was changed"), line
    # The leader refuses it too (a CLI that does not check: an older one, the API), with the
    # same reason, FAILED_PRECONDITION; --max-parallel 2 takes both nodes at once: both named.
    request = rollout_request(None, names, 2, "node", "enable-tls")
    request.auth_verifier_json = verifier_json("the-practice-password-for-templates")
    with cluster.admin() as admin, pytest.raises(grpc.RpcError) as info:
        admin.StartRollout(request, timeout=60)
    code, details = code_and_details(info.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert details.startswith(
        f"enable-tls cannot start: its first step would fail at once on {missing.name} (cannot "
        f"read template {template}: No such file or directory; fix [server].template in "
    ), details
    assert f"{unknown.name} (template {unknown_template}: unknown or bad placeholder" in details
    assert details.endswith("leave them out (--nodes); nothing was changed"), details
    assert [r["id"] for r in cluster.schema_json()["rollouts"]] == newest  # none was made
    shown = json.loads(cluster.cli("certs", "check-expiration", "--json").stdout)
    servers = [c["subject"] for c in shown["certificates"] if c["kind"] == "server"]
    assert missing.name not in servers and unknown.name not in servers, servers
    for node in (missing, unknown):
        assert node.journal_query("SELECT * FROM staged") == []
        assert node.journal_query("SELECT * FROM txns") == []
        assert (node.server.config_path.read_bytes(), node.server_pid()) == before[node.name]
        assert node.get("http").status == 200


def test_the_way_back_is_not_blocked_by_a_template_it_does_not_render(
    cluster: Cluster, nodes: NodeFactory, tmp_path: Path
) -> None:
    """Review s66 closing M1: the checks rendered a template driver's template for every
    change, so a template moved after the switch blocked the plan and the preflight of
    `rollout rollback`, whose way back puts back the kept http config and renders nothing:
    the safe way back halted. Now the way back's questions say so (``way_back``) and the agent
    leaves that check out; any other change still checks it (the test above)."""
    node, _control = exec_node(nodes, timeout=20)
    password = tmp_path / "pw"
    password.touch(0o600)
    password.write_text("the-practice-password-for-templates\n")
    start = cluster.cli(
        "rollout", "start", "--nodes", node.name, "--password-file", str(password), "--yes",
        "--wait", timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    assert node.get("https").status == 200
    (node.root / "refserver.toml.tmpl").unlink()  # the admin moved it after the switch
    asked = cluster.cli("rollout", "rollback")  # its plan; not a terminal: nothing started
    said = asked.stdout + asked.stderr
    assert asked.returncode == 2 and f"Back to http: {node.name} (" in said, said
    assert "template" not in said, said
    back = cluster.cli("rollout", "rollback", "--yes", timeout=120)
    assert back.returncode == 0, back.stdout + back.stderr
    wait_until(
        lambda: cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted"),
        120,
        "the way back",
        interval=0.5,
    )
    rollout = cluster.poll_newest_rollout()
    assert rollout["change"] == "disable-tls" and rollout["state"] == "completed", rollout
    assert node.get("http").status == 200


def test_a_node_whose_agent_lost_its_journal_is_blocked_up_front_where_its_driver_cannot_change_it(
    cluster: Cluster, nodes: NodeFactory, tmp_path: Path
) -> None:
    """Session 71, reenrol (2): an exec node on https whose agent lost its journal (its data
    dir begun again, a disk replaced) cannot be rotated nor taken back by tlsroll: the driver
    cannot read its https files back from the config it renders. `tlsroll plan` said "will get
    a new certificate", the start signed one, and the switch was refused (the node shown
    rolled back). Now the agent's read-only checks say its plan's one line: the plan shows the
    node blocked with it (exit 1), the start is refused up front, the way back's prompt names
    it; nothing on the node changes."""
    node, _control = exec_node(nodes, timeout=20)
    password = tmp_path / "pw"
    password.touch(0o600)
    password.write_text("the-practice-password-for-a-lost-journal\n")
    start = cluster.cli(
        "rollout", "start", "--nodes", node.name, "--password-file", str(password), "--yes",
        "--wait", timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    agent = node.agent
    assert agent is not None
    agent.stop()
    for suffix in ("", "-wal", "-shm"):  # the journal lost (the agent's key and certificate kept)
        Path(f"{node.journal_path}{suffix}").unlink(missing_ok=True)
    Journal(node.journal_path).close()  # begun empty (as `tlsroll-agent --reinitialise` does)
    node.start_agent_heard()
    before = (node.server.config_path.read_bytes(), node.served_fingerprint())
    newest = [r["id"] for r in cluster.schema_json()["rollouts"]]
    by_hand = f"the exec driver cannot read them from {node.server.config_path}"

    plan = cluster.cli("plan", "--nodes", node.name, "--change", "rotate-cert")
    said = " ".join(plan.stdout.split())
    assert plan.returncode == 1 and "Traceback" not in plan.stderr, plan.stdout + plan.stderr
    assert "blocked: the server serves https on port" in said and by_hand in said, said
    assert "will get a new certificate" not in said, said
    rotate = cluster.cli(
        "rollout", "start", "--nodes", node.name, "--change", "rotate-cert", "--yes", "--wait"
    )
    (line,) = rotate.stderr.splitlines()
    assert rotate.returncode != 0 and "cannot start" in line and by_hand in line, line
    back = cluster.cli("rollout", "rollback")  # its prompt; not a terminal: nothing started
    said = " ".join(back.stdout.split())
    assert back.returncode == 2 and f"{node.name}: blocked: " in said, back.stdout + back.stderr
    assert f"set {node.server.config_path} back to http by hand" in said, said

    assert [r["id"] for r in cluster.schema_json()["rollouts"]] == newest  # none was made
    assert (node.server.config_path.read_bytes(), node.served_fingerprint()) == before
    assert node.journal_query("SELECT * FROM staged") == []
    assert node.journal_query("SELECT * FROM txns") == []
    # Out of the module's cluster: a node left on https with this test's password, then
    # stopped, would hold the next start's password check ("cannot confirm ...: offline").
    removed = cluster.cli("nodes", "remove", node.name, "--yes")
    assert removed.returncode == 0, removed.stdout + removed.stderr


def test_the_way_backs_prompt_names_a_blocked_node_with_its_reasons(
    cluster: Cluster, nodes: NodeFactory, tmp_path: Path
) -> None:
    """Brief s67 engine (b): the confirmation of `rollout rollback` named a node its agent's
    checks block among those going back, without why (`tlsroll plan` gives it), so the admin
    said yes to a way back that halts there. Now the prompt gives its reason (and so does the
    list printed after a start with --yes); nothing is started without the answer."""
    node = nodes.new().start()
    password = tmp_path / "pw"
    password.touch(0o600)
    password.write_text("the-practice-password-for-the-prompt\n")
    start = cluster.cli(
        "rollout", "start", "--nodes", node.name, "--password-file", str(password), "--yes",
        "--wait", timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    switched = cluster.poll_newest_rollout()["id"]
    config_dir = node.server.config_path.parent
    mode = stat.S_IMODE(config_dir.stat().st_mode)
    config_dir.chmod(mode | 0o022)  # writable by group and others: the agent writes no config
    try:
        asked = cluster.cli("rollout", "rollback")  # the prompt; not a terminal: not started
    finally:
        config_dir.chmod(mode)
    said = asked.stdout + asked.stderr
    assert asked.returncode == 2 and "Traceback" not in said, said
    assert f"Back to http: {node.name} (" in asked.stdout, said
    blocked = [line for line in asked.stdout.splitlines() if line.startswith(f"  {node.name}: ")]
    assert len(blocked) == 1, said
    assert blocked[0].startswith(f"  {node.name}: blocked: config directory: {config_dir} is wr")
    assert blocked[0].endswith("(the way back halts there unless it is fixed)"), blocked
    assert cluster.poll_newest_rollout()["id"] == switched  # nothing started
    assert node.get("https").status == 200


def test_systemd_config_the_server_cannot_load_is_rolled_back(nodes: NodeFactory) -> None:
    node, control, _template = systemd_node(nodes, "no_such_setting = true\n")
    config = node.server.config_path.read_bytes()
    node.stage("sd-bad")
    node.switch("sd-bad")
    done = node.wait_txn("sd-bad")
    assert done.outcome == "rolled_back", done.reason
    assert done.reason.startswith("restart:") and "failed" in done.reason, done.reason
    assert_back_on_http(node, config)
    assert control.calls_made().count(f"restart {UNIT}") == 2  # the new config, then the old


# --- exec --------------------------------------------------------------------------------------


def test_exec_driver_switches_with_the_admins_commands(nodes: NodeFactory) -> None:
    node, control = exec_node(nodes, timeout=20)
    pre = node.preflight("ex-ok")
    assert pre.ok, list(pre.problems)
    assert pre.server.driver == "exec"
    staged = node.stage("ex-ok")
    node.switch("ex-ok")
    done = node.wait_txn("ex-ok")
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)
    acts = [c for c in control.calls_made() if c != "status"]
    assert acts == ["freeze", "restart", "unfreeze"]


def test_exec_commands_do_not_inherit_the_agents_own_grpc_verbosity(
    nodes: NodeFactory, tmp_path: Path
) -> None:
    """Review s66 closing L5: the agent sets GRPC_VERBOSITY=NONE for itself (none of gRPC
    core's lines in its log), and its exec commands inherited it: a restart's `nohup server &`
    ran without its own gRPC core's lines. The admin's commands run without it now (one the
    admin set for the agent is passed on: ``nodeagent.command_env``)."""
    seen = tmp_path / "verbosity"
    node, control = exec_node(
        nodes,
        timeout=20,
        freeze=lambda script: [
            "sh",
            "-c",
            f'printf %s "${{GRPC_VERBOSITY-unset}}" > {shlex.quote(str(seen))};'
            f" exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} freeze",
        ],
    )
    staged = node.stage("ex-env")
    node.switch("ex-env")
    done = node.wait_txn("ex-env")
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)
    assert seen.read_text() == "unset"
    assert "freeze" in control.calls_made()


def test_exec_command_that_hangs_times_out_and_rolls_back(nodes: NodeFactory) -> None:
    node, control = exec_node(nodes, timeout=4)
    config = node.server.config_path.read_bytes()
    node.stage("ex-hang")
    control.hang_once.touch()  # the next restart hangs
    node.switch("ex-hang")
    wait_until(control.hang_pid.exists, 20, "the hanging restart to begin")
    hung = int(control.hang_pid.read_text())
    # The agent answers while its command hangs: the transaction it tells of is not over, still
    # at the restart (an answer held until the command's 4 s were out would tell of its
    # rollback). This timed the answer before, under 2 s.
    during = node.txn("ex-hang")
    assert during.outcome == "" and during.phase == "config_written"

    done = node.wait_txn("ex-hang", timeout=30)
    assert done.outcome == "rolled_back", done.reason
    assert "restart" in done.reason and "did not finish within 4s" in done.reason, done.reason
    wait_until(lambda: not alive(hung), 5, "the hung command to be killed")
    assert_back_on_http(node, config)
    # Ended by the command's timeout, as the reason says (4s), within the test's bound of 30 s.
    # (Its recorded start and end were held under 20 s apart once, a clock bound; then that
    # the start came before the end, which could hardly fail: the reason is the check.)


def test_exec_status_without_a_watermark_rolls_back_and_unfreezes(nodes: NodeFactory) -> None:
    """A status command that leaves out the watermark cannot prove nothing was written while
    frozen: the switch must end rolled back and unfrozen, not stuck frozen."""
    node, _control = exec_node(nodes, timeout=10, status=("status", "--no-watermark"))
    config = node.server.config_path.read_bytes()
    # The preflight says so first (rev57b M2: it passed, and the first switch failed).
    pre = node.preflight("ex-nowm-pre")
    assert not pre.ok
    assert any(
        "the server's status has no write watermark (an integer; its keys: " in p
        for p in pre.problems
    ), list(pre.problems)
    node.stage("ex-nowm")
    node.switch("ex-nowm")
    done = node.wait_txn("ex-nowm", timeout=30)
    assert done.outcome == "rolled_back", done.reason
    assert done.reason.startswith("verify:") and "watermark" in done.reason, done.reason
    assert_back_on_http(node, config)


def patch_control(control: Control, before: str, added: str) -> None:
    """``added`` put into the control script before ``before`` (a line of its ``main`` or
    ``restart``); written whole (renamed into place): the agent may be running it."""
    text = control.script.read_text()
    patched = text.replace(before, added + before, 1)
    assert patched != text
    tmp = control.script.with_suffix(".tmp")
    tmp.write_text(patched)
    tmp.chmod(0o755)
    os.replace(tmp, control.script)


def test_a_status_command_that_hangs_is_killed_when_the_heartbeat_gives_up(
    nodes: NodeFactory, tmp_path: Path
) -> None:
    """Review s64 H1: each heartbeat asks the server's status and gives up after 2 s; the
    exec driver's hung ``status`` command (the server's admin port stuck, a hung mount) was
    left running, with two pipes of the agent's, one more at every beat until the agent ran
    out of processes or descriptors. Now the beat that gives up on it kills it."""
    _node, control = exec_node(nodes, timeout=60)
    hang, hung = tmp_path / "hang-status", tmp_path / "hung"
    hung.mkdir()
    patch_control(
        control,
        '    elif argv == ["status"]:\n',
        f'    elif argv == ["status"] and Path({str(hang)!r}).exists():\n'
        f"        Path({str(hung)!r}, str(os.getpid())).touch()\n"
        "        time.sleep(3600)\n",
    )
    hang.touch()
    try:
        wait_until(lambda: len(list(hung.iterdir())) >= 2, 60, "two heartbeats' hung statuses")
        hang.unlink()
        for pid in sorted(int(p.name) for p in hung.iterdir()):
            wait_until(lambda: not alive(pid), 20, f"hung status {pid} to be killed")  # noqa: B023
    finally:
        hang.unlink(missing_ok=True)
        for entry in hung.iterdir():
            if alive(int(entry.name)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


def test_a_freeze_command_that_timed_out_leaves_no_tool_to_freeze_the_server_later(
    nodes: NodeFactory, tmp_path: Path
) -> None:
    """Review s64 H2: a ``freeze`` command that is a wrapper (``sh -c``, a script calling a
    tool) outlives its timeout; the agent killed the wrapper only, rolled back and unfroze
    the server, and the tool went on and froze it again, for ever (nothing unfreezes a
    server the agent believes unfrozen). Now the whole command is killed at its timeout."""
    tool_pid = tmp_path / "tool.pid"
    node, control = exec_node(
        nodes,
        timeout=2,
        freeze=lambda script: [
            "sh",
            "-c",
            f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} freeze-slow"
            " >/dev/null 2>&1; true",
        ],
    )
    patch_control(
        control,
        '    elif argv == ["freeze"]:\n',
        '    elif argv == ["freeze-slow"]:  # longer than 10 s + [server] timeout\n'
        f"        Path({str(tool_pid)!r}).write_text(str(os.getpid()))\n"
        "        time.sleep(20)\n"
        '        admin("POST", "/admin/freeze", {"drain_timeout": 10})\n'
        '        log_call(["freeze-slow froze"])\n',
    )
    config = node.server.config_path.read_bytes()
    node.stage("ex-orphan")
    node.switch("ex-orphan")
    try:
        done = node.wait_txn("ex-orphan", timeout=60)
        assert done.outcome == "rolled_back", done.reason
        assert done.reason == "freeze: sh did not finish within 12s", done.reason
        pid = int(tool_pid.read_text())
        wait_until(lambda: not alive(pid), 40, "the freeze tool to end")
        assert "freeze-slow froze" not in control.calls_made()
        assert_back_on_http(node, config)  # and not frozen
    finally:
        kill_recorded(tool_pid)


def test_an_exec_restart_that_leaves_the_server_on_its_stdout_completes(
    nodes: NodeFactory,
) -> None:
    """Review s64 M1: a ``restart`` command that starts the server in the background without
    redirecting its output (``nohup server &``, many vendors' ctl scripts) exits at once, and
    the server keeps the command's stdout: the agent waited for that stdout's end, counted
    the restart that worked as hung and rolled back. Now the command's exit ends the step."""
    node, control = exec_node(nodes, timeout=6)
    text = control.script.read_text()
    patched = text.replace("            stdout=log,\n            stderr=log,\n", "")
    assert patched != text
    control.script.write_text(patched)
    staged = node.stage("ex-bg")
    node.switch("ex-bg")
    done = node.wait_txn("ex-bg", timeout=60)
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)
    assert control.restarts() == 1


# --- the admin's commands (``drivers._run``), in process (review s64 H1, H2, M1) --------------


def kill_recorded(*pid_files: Path) -> None:
    """SIGKILL the processes a test's commands recorded in ``pid_files`` that still run."""
    for pid_file in pid_files:
        text = pid_file.read_text() if pid_file.exists() else ""
        for pid in (int(word) for word in text.split()):
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("quiet", [True, False], ids=["tool-quiet", "tool-on-stdout"])
async def test_a_command_that_times_out_is_killed_with_the_tool_it_runs(
    tmp_path: Path, quiet: bool
) -> None:
    """H2: a ``freeze`` command that is a wrapper (``sh -c``, a script calling a tool) and
    outlives its timeout. The agent killed the wrapper only: the tool went on and froze the
    server after the way back had unfrozen it (tool-quiet: its output elsewhere), and one that
    kept the wrapper's stdout held the step until it ended, whatever the timeout
    (tool-on-stdout). Now the whole command is killed when its timeout ends."""
    pid_file, acted = tmp_path / "tool.pid", tmp_path / "tool-froze"
    tool = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        f"time.sleep(6); open({str(acted)!r}, 'w').close()"
    )
    wrapper = f"{shlex.quote(sys.executable)} -c {shlex.quote(tool)}"
    wrapper += " >/dev/null 2>&1; true" if quiet else "; true"
    try:
        with pytest.raises(DriverError, match=r"^freeze: sh did not finish within 2s$"):
            await drivers._run(["sh", "-c", wrapper], 2, "freeze")
        if pid_file.exists():  # (else the tool was killed before it began: as good)
            tool_pid = int(pid_file.read_text())
            wait_until(lambda: not alive(tool_pid), 10, "the tool to be killed")
        assert not acted.exists()  # before: it acted, after the step had given up
    finally:
        kill_recorded(pid_file)


async def test_a_command_its_caller_gives_up_on_is_killed_with_what_it_started(
    tmp_path: Path,
) -> None:
    """H1: the heartbeat waits 2 s for the server's status and cancels the wait then. A
    ``status`` command that hangs (the server's admin port stuck, a hung NFS mount) was
    killed only at its own timeout, never at a cancel: every heartbeat left one more behind,
    with two pipes of the agent's. Now a cancel kills the command and what it started."""
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait"
    run = asyncio.create_task(drivers._run(["sh", "-c", script], 60, "status"))
    try:
        for _ in range(500):  # until both are running (10 s at most)
            if pids.exists() and len(pids.read_text().split()) == 2:
                break
            await asyncio.sleep(0.02)
        started = [int(word) for word in pids.read_text().split()]
        assert len(started) == 2 and all(alive(pid) for pid in started)
        run.cancel()  # what the heartbeat's asyncio.timeout does
        with pytest.raises(asyncio.CancelledError):
            await run
        for pid in started:
            wait_until(lambda: not alive(pid), 10, f"pid {pid} to be killed")  # noqa: B023
    finally:
        run.cancel()
        kill_recorded(pids)


KILLED_AGENT = """
import asyncio, json, sys
from pathlib import Path
from nodeagent.drivers import make_driver
from tlsroll.config import Section
root = Path(sys.argv[1])
data = json.loads(sys.argv[2])
driver = make_driver(Section(root / "agent.toml", "server", data), "10.0.0.5", root)
asyncio.run(driver._op("restart"))
"""


async def test_a_command_an_agent_killed_mid_restart_left_running_is_ended_at_its_next_start(
    tmp_path: Path,
) -> None:
    """Session 69 (journalm, L): an exec driver's command runs in a session of its own, so an
    agent killed with SIGKILL (outside systemd, whose ``KillMode=control-group`` ends it with
    the agent) left a slow ``restart`` running, and the restart its next start resumed ran
    beside it (the old one could still act after, on a server the new one had restarted).
    Now each command is noted in the data dir while it runs, and the next start ends what is
    left of one (its whole process group) before it resumes anything."""
    pid_file, acted = tmp_path / "tool.pid", tmp_path / "acted"
    tool = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        f"time.sleep(300); open({str(acted)!r}, 'w').close()"
    )
    restart = ["sh", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(tool)}; true"]
    commands = {op: ["true"] for op in ("status", "freeze", "unfreeze")} | {"restart": restart}
    section = driver_section(tmp_path, "exec", commands=commands)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    agent = subprocess.Popen(
        [sys.executable, "-c", KILLED_AGENT, str(tmp_path), json.dumps(section.data)], env=env
    )
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 30, "the restart")
        tool_pid = int(pid_file.read_text())
        agent.kill()  # SIGKILL mid-restart
        agent.wait(timeout=30)
        assert alive(tool_pid)  # the command outlives the agent (its own session)

        driver = make_driver(section, "10.0.0.5", tmp_path)  # the agent's next start
        journal = Journal(tmp_path / "journal.sqlite3")
        try:
            await transaction.Runner(journal, driver, lambda: dt.datetime.now(dt.UTC)).resume_all()
        finally:
            journal.close()
        # Before: it ran on (300 s) beside the resumed restart. Its SIGKILL, sent to the
        # whole group, may take a moment to end this child once its parent (the pid waited
        # for) is gone, on a loaded machine (CI of session 73): a bounded wait.
        wait_until(lambda: not alive(tool_pid), 10, "the stale command's child ended")
        assert not acted.exists()
        assert list((tmp_path / "exec-running").iterdir()) == []
    finally:
        if agent.poll() is None:
            agent.kill()
        kill_recorded(pid_file)


def test_a_noted_command_whose_pid_now_names_another_process_is_left_alone(
    tmp_path: Path,
) -> None:
    """The other side of the test above (s69 mutants: the start-time half of the match had no
    test): a note whose pid now names another process (its command exited, the pid given
    again) kills nothing, and the note goes; one whose pid and start time match is killed
    with its process group."""
    track = tmp_path / "exec-running"
    track.mkdir()
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        started = client_sources._start_time(other.pid)
        assert started is not None
        (track / str(other.pid)).write_text(started + "0\n")  # another process's start
        assert client_sources.end_stale(track) == []
        assert other.poll() is None and alive(other.pid)
        assert list(track.iterdir()) == []
        (track / str(other.pid)).write_text(started + "\n")  # this one's
        assert client_sources.end_stale(track) == [client_sources.Stale(other.pid)]
        assert other.wait(timeout=30) == -signal.SIGKILL
        assert list(track.iterdir()) == []
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(timeout=30)


def _stale_group(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A noted command (a ``sh`` in a session of its own) with a child in its group, as an
    earlier agent process left it: (the command, its child's pid, the notes' directory)."""
    track, child = tmp_path / "exec-running", tmp_path / "child.pid"
    track.mkdir()
    command = subprocess.Popen(
        ["sh", "-c", f"sleep 300 & echo $! > {shlex.quote(str(child))}; wait"],
        start_new_session=True,
    )
    wait_until(lambda: child.exists() and child.read_text().strip() != "", 30, "the child")
    started = client_sources._start_time(command.pid)
    assert started is not None
    (track / str(command.pid)).write_text(started + "\n")
    return command, int(child.read_text()), track


def _only_the_leader_killed(
    monkeypatch: pytest.MonkeyPatch, later: dict[int, float]
) -> list[threading.Timer]:
    """``end_stale``'s SIGKILL to a group reaches its leader at once, and each member in
    ``later`` (pid → seconds) only that much later: a child whose end lags behind its
    parent's, as under load (session 73's CI), made certain; a member not in it never ends."""
    timers: list[threading.Timer] = []

    def killpg(pgid: int, sig: int) -> None:
        os.kill(pgid, sig)
        for pid, after in later.items():
            timers.append(timer := threading.Timer(after, os.kill, (pid, sig)))
            timer.start()

    monkeypatch.setattr(os, "killpg", killpg)  # (end_stale calls os.killpg)
    return timers


def test_a_stale_command_is_ended_with_its_whole_group_before_end_stale_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 73 (its CI's L): ``end_stale`` waited for the noted pid only, not for its
    process group to be gone: a child of the command whose SIGKILL had not ended it yet
    still ran when the resumed step (a restart begun again) began. Now it waits (bounded)
    until no member of the group runs."""
    command, child, track = _stale_group(tmp_path)
    timers = _only_the_leader_killed(monkeypatch, {child: 0.5})
    try:
        ended = client_sources.end_stale(track)
        assert not alive(child)  # still running before: its parent's end was all waited for
        assert ended == [client_sources.Stale(command.pid)]
        assert command.wait(timeout=30) == -signal.SIGKILL
        assert list(track.iterdir()) == []
    finally:
        for timer in timers:
            timer.join(30)
        for pid in (child, command.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        command.wait(timeout=30)


@pytest.mark.parametrize("state", ["as it is", "D"])
def test_a_stale_command_whose_group_does_not_end_in_time_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    """A member of the group that its SIGKILL does not end within the wait (uninterruptible
    sleep: a hung mount; or only slow, on a loaded machine) bounds it: ``end_stale`` returns
    it in ``Stale.left``, and the exec driver says so in a warning of its own, with its pid.
    The warning named uninterruptible sleep as the cause whatever it was (session 74's note,
    Open): now only for a member seen in it (state D in ``/proc/PID/stat``; here the child
    sleeps interruptibly, as it is, or its state is read as D)."""
    command, child, track = _stale_group(tmp_path)
    _only_the_leader_killed(monkeypatch, {})  # the child never ends
    try:
        ended = client_sources.end_stale(track, wait=0.2)
        assert ended == [client_sources.Stale(command.pid, (child,))]
        assert alive(child)
        assert client_sources.uninterruptible([child, command.pid]) == ()  # (it sleeps: S)
        monkeypatch.setattr(client_sources, "end_stale", lambda _track: ended)
        if state == "D":
            monkeypatch.setattr(
                client_sources, "uninterruptible", lambda pids: tuple(p for p in pids if p == child)
            )
        with capture_logs() as logs:
            drivers.ExecDriver.end_stale_commands(cast(Any, SimpleNamespace(running=track)))
        said = [e for e in logs if e["event"] == "exec.stale_command_lingers"]
        assert [(e["pid"], e["left"], e["log_level"]) for e in said] == [
            (command.pid, [child], "warning")
        ], logs
        named = "uninterruptible sleep" in said[0]["detail"]
        assert named is (state == "D"), said[0]["detail"]  # named always before
        assert said[0]["uninterruptible"] == ([child] if state == "D" else [])
    finally:
        for pid in (child, command.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        command.wait(timeout=30)


def test_a_process_whose_name_is_not_utf8_does_not_stop_the_stale_commands_end(
    tmp_path: Path,
) -> None:
    """Review s74 revsmall (M): ``group_alive`` reads every process's ``/proc/PID/stat``,
    whose name (in parentheses) is any bytes, cut by the kernel at 15: "ääääääää" is kept as
    7½ characters, not UTF-8. Read as text, such a process anywhere on the host made
    ``end_stale`` raise UnicodeDecodeError at the agent's start, after its SIGKILL and
    before its wait. Here the stale command itself has such a name (``_start_time`` reads
    its stat too), and the group is waited for as any."""
    code = (
        "import sys, time; open('/proc/self/comm', 'wb').write(b'(\\xc3\\xa4) x\\xc3');"
        " print('named', flush=True); time.sleep(300)"
    )
    odd = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert odd.stdout is not None and odd.stdout.readline() == b"named\n"
        assert Path(f"/proc/{odd.pid}/comm").read_bytes() == b"(\xc3\xa4) x\xc3\n"
        assert client_sources.group_alive(odd.pid) == (odd.pid,)
        started = client_sources._start_time(odd.pid)
        assert started is not None
        track = tmp_path / "exec-running"
        track.mkdir()
        (track / str(odd.pid)).write_text(started + "\n")
        assert client_sources.end_stale(track) == [client_sources.Stale(odd.pid)]
        assert odd.wait(timeout=30) == -signal.SIGKILL
        assert client_sources.group_alive(odd.pid) == ()
        assert list(track.iterdir()) == []
    finally:
        if odd.poll() is None:
            odd.kill()
            odd.wait(timeout=30)
        if odd.stdout is not None:
            odd.stdout.close()


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """``wait_until`` with the event loop running (it reads the commands' outputs)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


async def test_a_command_that_leaves_a_child_on_its_output_returns_when_it_exits(
    tmp_path: Path,
) -> None:
    """M1: a ``restart`` that starts the server in the background without redirecting its
    output (``nohup server &``, vendor ctl scripts) exits at once, and the server keeps the
    command's stdout. The agent waited for that stdout's end, the server's: a restart that
    worked failed at its timeout; and the server, its log unread, then blocked writing it.
    Now the command's exit ends the step, and the server writes on, read by the agent's event
    loop (waited on with it running)."""
    pid_file, go, wrote = tmp_path / "server.pid", tmp_path / "go", tmp_path / "wrote"
    server = (
        f"import os, sys, time, pathlib; open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)\n"
        "for _ in range(64): sys.stdout.write('x' * 16383 + '\\n'); sys.stdout.flush()\n"
        f"open({str(wrote)!r}, 'w').close(); time.sleep(300)"
    )
    script = f"{shlex.quote(sys.executable)} -c {shlex.quote(server)} & echo restarted"
    try:
        out = await drivers._run(["sh", "-c", script], 10, "restart")
        assert out == "restarted\n"
        go.touch()  # 1 MiB of log on the restart's stdout, after the agent is done with it
        await _until(wrote.exists, 30, "the server to write its log")
        assert alive(int(pid_file.read_text()))  # neither blocked nor killed (SIGPIPE)
    finally:
        kill_recorded(pid_file)


def _pipe_of(pid: int, fd: int) -> str:
    """What a process's descriptor ``fd`` is (``pipe:[INODE]``, a file's path)."""
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def _agent_holds(target: str) -> bool:
    """Whether this process (the agent here) has a descriptor on ``target``."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
    return False


async def test_a_server_left_writing_on_a_commands_output_takes_no_disk(tmp_path: Path) -> None:
    """Review s66: a ``restart`` that leaves the server writing on its stdout and stderr
    (``nohup server &``) had them go to the agent's temporary files, deleted at once: the
    server's log filled the disk, in no directory (unseen by ``du``, and freed only when the
    server ended). Now they are pipes the agent reads on and throws away: the server writes
    8 MiB on each, neither blocked nor killed by SIGPIPE, and nothing it writes is stored;
    once it ends, the agent lets go of them (no descriptor of its left). (Waited on with the
    event loop running: it is what reads them.)"""
    pid_file, go, wrote = tmp_path / "server.pid", tmp_path / "go", tmp_path / "wrote"
    server = (
        f"import os, sys, time, pathlib; open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)\n"
        "for _ in range(512):\n"
        "    sys.stdout.write('x' * 16383 + '\\n'); sys.stdout.flush()\n"
        "    sys.stderr.write('y' * 16383 + '\\n'); sys.stderr.flush()\n"
        f"open({str(wrote)!r}, 'w').close(); time.sleep(300)"
    )
    script = f"{shlex.quote(sys.executable)} -c {shlex.quote(server)} & echo restarted"
    try:
        out = await drivers._run(["sh", "-c", script], 10, "restart")
        assert out == "restarted\n"
        await _until(pid_file.exists, 10, "the server to start")
        pid = int(pid_file.read_text())
        go.touch()  # 16 MiB of log, after the agent is done with the restart
        await _until(wrote.exists, 60, "the server to write its log")
        assert alive(pid)  # neither blocked nor killed (SIGPIPE)
        held = []
        for fd in (1, 2):
            what = os.stat(f"/proc/{pid}/fd/{fd}")
            # Before: a deleted regular file of 8 MiB each ("/tmp/#123 (deleted)").
            assert stat.S_ISFIFO(what.st_mode), (fd, _pipe_of(pid, fd))
            assert what.st_blocks == 0, (fd, what.st_blocks)
            held.append(_pipe_of(pid, fd))
        assert all(_agent_holds(pipe) for pipe in held)  # read on, by the agent
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: not any(map(_agent_holds, held)), 10, "the agent to let go")
    finally:
        kill_recorded(pid_file)


@pytest.fixture
def left_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The count of outputs left held, and what was said of them, as at an agent's start
    (commands of earlier tests may have left some held, on a loop that has ended)."""
    monkeypatch.setattr(client_sources, "_left_held", 0)
    monkeypatch.setattr(client_sources, "_held_warn_at", client_sources.HELD_WARN_FROM)
    monkeypatch.setattr(client_sources, "_kinds_warned", set())


@pytest.mark.usefixtures("left_held")
async def test_a_restarts_server_is_not_killed_however_many_outputs_are_held(
    tmp_path: Path,
) -> None:
    """Review s66 rva M2: the agent read on at most 32 outputs that commands left held (a
    thread each), shared by every command: 16 ``status`` commands that each left a helper
    (``sleep &``) filled it, and the next ``restart`` that left its server logging on stdout
    (``nohup server &``) had its outputs closed at once: the server died of SIGPIPE at its
    next log line, a restart that worked. Now no held output is ever closed: each is read on
    the event loop (a descriptor, no thread) and thrown away until its writer lets go. What
    holds them is said once per kind of command (``exec.output_held``, naming the output) and
    as their count doubles from 32 (``exec.outputs_held``), not once per output."""
    pids = tmp_path / "pids"
    helper = f"sh -c 'echo $$ >> {shlex.quote(str(pids))}; exec sleep 60' &"
    server = (
        f"echo $$ >> {shlex.quote(str(pids))}; trap '' HUP; "
        "while :; do echo log-line; echo err-line >&2; sleep 0.05; done"
    )
    try:
        with capture_logs() as logs:
            for _ in range(17):  # 34 outputs held: more than the 32 of before
                assert await drivers._run(["sh", "-c", helper], 10, "status") == ""
            script = f"nohup sh -c {shlex.quote(server)} & echo restarted"
            out = await drivers._run(["sh", "-c", script], 10, "restart")
            # (and the server's first lines, maybe: before it too, on a loaded machine)
            assert "restarted" in out.splitlines(), out
            await _until(lambda: pids.exists() and len(pids.read_text().split()) == 18, 10, "pids")
            pid = int(pids.read_text().split()[-1])
            await asyncio.sleep(1)  # about 20 lines on each output after the restart returned
            assert alive(pid), "the server a restart left running was killed"
            for fd in (1, 2):
                assert _agent_holds(_pipe_of(pid, fd)), fd  # read on, not closed
            assert client_sources._left_held == 36
        said = [(e["event"], e.get("command"), e.get("output")) for e in logs]
        assert said == [
            ("exec.output_held", "status", "stdout"),
            ("exec.outputs_held", None, None),
            ("exec.output_held", "restart", "stdout"),
        ], logs
        assert "give it its own output" in logs[0]["detail"], logs[0]
    finally:
        kill_recorded(pids)
    await _until(lambda: client_sources._left_held == 0, 10, "the agent to let go of them")


@pytest.mark.usefixtures("left_held")
async def test_past_the_bound_of_held_outputs_no_command_runs_and_none_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``MAX_LEFT_HELD`` outputs held by what commands left running, a further command is
    not run (one line saying why; the agent's descriptors are kept for its own work), and the
    held ones are read on still: none is closed under its writer. Once they are let go of,
    commands run again."""
    monkeypatch.setattr(client_sources, "MAX_LEFT_HELD", 2)
    pids, ran = tmp_path / "pids", tmp_path / "ran"
    writer = (
        f"echo $$ >> {shlex.quote(str(pids))}; trap '' HUP; while :; do echo z; sleep 0.05; done"
    )
    script = f"exec 2>/dev/null; sh -c {shlex.quote(writer)} & echo ok"
    try:
        # (what the writer printed before the command exited is the command's output too)
        assert (await drivers._run(["sh", "-c", script], 10, "status")).startswith("ok\n")
        assert client_sources._left_held == 1  # stdout (its stderr went away)
        assert (await drivers._run(["sh", "-c", script], 10, "status")).startswith("ok\n")
        with pytest.raises(DriverError) as refused:
            await drivers._run(["sh", "-c", f"touch {shlex.quote(str(ran))}"], 10, "status")
        assert str(refused.value).startswith(
            "status: not run: processes earlier commands left running hold 2 of their outputs"
        ), refused.value
        assert not ran.exists()
        await asyncio.sleep(0.5)
        first, second = (int(p) for p in pids.read_text().split())
        assert alive(first) and alive(second)  # read on, neither killed
    finally:
        kill_recorded(pids)
    await _until(lambda: client_sources._left_held == 0, 10, "the agent to let go of them")
    assert await drivers._run(["sh", "-c", f"touch {shlex.quote(str(ran))}"], 10, "x") == ""
    assert ran.exists()


async def test_a_command_that_fails_says_its_last_line(tmp_path: Path) -> None:
    """Its last line on stderr (else stdout), read from the end of its output, cleaned (it
    goes into the step's reason, the schema and the viewer)."""
    lots = "printf 'a lot\\n%.0s' $(seq 5000)"
    script = f"{lots}; echo first >&2; printf 'the \\033[31mend\\n' >&2; exit 3"
    with pytest.raises(DriverError) as failed:
        await drivers._run(["sh", "-c", script], 10, "unfreeze")
    assert str(failed.value) == "unfreeze: sh exited 3: the [31mend"
    with pytest.raises(DriverError, match=r"^restart: sh exited 1: a lot$"):
        await drivers._run(["sh", "-c", f"{lots}; exit 1"], 10, "restart")
    with pytest.raises(DriverError, match=r"^status: false exited 1$"):
        await drivers._run(["false"], 10, "status")


# --- polling a starting server (tenacity), in process -----------------------------------------


class Starting(Driver):
    """A server that answers its status after ``unhealthy`` calls (nothing else is used)."""

    name = "starting"
    config_file = Path("/nonexistent/server.toml")

    def __init__(self, unhealthy: int) -> None:
        self.unhealthy = unhealthy
        self.asked = 0

    async def status(self) -> dict[str, Any]:
        self.asked += 1
        if self.asked <= self.unhealthy:
            raise DriverError(f"not yet ({self.asked})")
        return {"frozen": False, "watermark": 0}

    def facts(self) -> ServerFacts:
        raise NotImplementedError

    def render(self, target: Target) -> bytes:
        raise NotImplementedError

    async def restart(self) -> None:
        raise NotImplementedError

    async def freeze(self, drain_timeout: float) -> int:
        raise NotImplementedError

    async def unfreeze(self) -> None:
        raise NotImplementedError


async def test_waiting_for_a_server_polls_until_it_answers() -> None:
    driver = Starting(unhealthy=3)
    await _wait_healthy(driver, 5, "did not come back", interval=0.01)
    assert driver.asked == 4


async def test_waiting_for_a_server_that_never_answers_names_the_last_problem() -> None:
    driver = Starting(unhealthy=10**6)
    t0 = time.monotonic()
    with pytest.raises(DriverError, match=r"^unit did not come back: not yet \((\d+)\)$") as info:
        await _wait_healthy(driver, 0.3, "unit did not come back", interval=0.05)
    # It waited its 0.3 s (a lower bound, the wait's promise: no load makes it shorter), and
    # then gave up: no more looks than 0.3 s holds at one per 0.05 s (a slow machine makes
    # fewer). (It was held under 2 s too, a clock bound.)
    assert time.monotonic() - t0 >= 0.3
    assert str(info.value).endswith(f"({driver.asked})") and 1 <= driver.asked <= 10


FAKE_UNIT = """#!{python}
# A stand-in for systemctl (systemd is not PID 1 here, nor in CI): the restart of a unit whose
# server exits at once (Type=simple: its restart job succeeds all the same), then that unit's
# state as `systemctl show` prints it. Each call noted in {calls}.
import sys
with open({calls!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "show" and {state!r}:
    print({state!r})
elif sys.argv[1] == "show":  # (an old systemctl)
    sys.exit("Unknown command verb show.")
"""


def fake_unit_driver(tmp_path: Path, state: str) -> tuple[SystemdDriver, Path]:
    """A systemd driver whose ``systemctl`` is a stand-in (``FAKE_UNIT``) that says the unit
    is in ``state`` after its restart; no server answers on its admin socket. Its calls file."""
    calls = tmp_path / "calls"
    fake = tmp_path / "systemctl"
    fake.write_text(FAKE_UNIT.format(python=sys.executable, calls=str(calls), state=state))
    fake.chmod(0o755)
    sockets = tmp_path / "sock"
    sockets.mkdir(mode=0o700)
    settings = {
        "config_file": str(tmp_path / "srv.conf"),
        "template": str(tmp_path / "srv.conf.tmpl"),
        "app_path": "/",
        "unit": "srv.service",
        "systemctl": str(fake),
        "admin_socket": str(sockets / "admin.sock"),
    }
    return SystemdDriver(Section(tmp_path / "agent.toml", "server", settings), "10.0.0.5"), calls


async def test_a_systemd_unit_failed_after_its_restart_ends_the_wait_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 69 (smalls, 1): the systemd driver never read its unit's state, so a unit whose
    server exits at once (``Type=simple``: ``systemctl restart`` succeeds all the same) cost
    the whole ``START_TIMEOUT`` inside the freeze window, the server refusing new entries,
    before "did not come back" and the server's last problem. Now the unit's state is read
    after a failed check: failed or inactive ends the wait at the first look, naming the
    unit's result. systemd is not PID 1 here: a stand-in ``systemctl`` says the state."""
    monkeypatch.setattr(drivers, "START_TIMEOUT", 3.0)  # (the wait, if the state is not read)
    driver, calls = fake_unit_driver(
        tmp_path, "ActiveState=failed\nSubState=failed\nResult=exit-code"
    )
    with pytest.raises(DriverError) as info:
        await driver.restart()
    assert str(info.value) == (
        "srv.service did not come back: the unit is failed (failed, result exit-code) after "
        "its restart; journalctl -u srv.service says why"
    )
    # One look at the unit, after the first check of the server: it did not wait.
    assert calls.read_text().splitlines() == [
        "restart srv.service",
        "show srv.service --property=ActiveState,SubState,Result",
    ]
    # Inactive after a run that failed (a unit without Restart= whose server crashed) too.
    (tmp_path / "gone").mkdir()
    driver, calls = fake_unit_driver(
        tmp_path / "gone", "ActiveState=inactive\nSubState=dead\nResult=exit-code"
    )
    with pytest.raises(DriverError, match=r"the unit is inactive \(dead, result exit-code\) "):
        await driver.restart()
    assert len(calls.read_text().splitlines()) == 2


async def test_a_systemd_unit_still_starting_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the test above: a unit active (its server not answering yet) or
    activating (a ``Restart=`` pending: systemd starts it again), or inactive after a run
    that succeeded (a oneshot unit that starts the server elsewhere), is waited for until the
    deadline, which names the server's last problem as before; so is one whose state cannot
    be read (a ``systemctl`` without ``show``: its answer "" here)."""
    monkeypatch.setattr(drivers, "START_TIMEOUT", 0.5)
    for n, state in enumerate(
        (
            "ActiveState=active\nSubState=running\nResult=success",
            "ActiveState=activating\nSubState=auto-restart\nResult=exit-code",
            # A oneshot starter (``docker compose up -d``): its run ended well, its server may
            # come up a moment later (last read of session 69: this was taken as final).
            "ActiveState=inactive\nSubState=dead\nResult=success",
            "",
        )
    ):
        (tmp_path / str(n)).mkdir()
        driver, calls = fake_unit_driver(tmp_path / str(n), state)
        with pytest.raises(DriverError) as info:
            await driver.restart()
        assert str(info.value).startswith("srv.service did not come back: "), info.value
        assert "the unit is" not in str(info.value), info.value
        shows = [c for c in calls.read_text().splitlines() if c.startswith("show ")]
        assert len(shows) >= 1, calls.read_text()


async def test_an_exec_freeze_watermark_is_ascii_digits_only(tmp_path: Path) -> None:
    """Session 69 (smalls, 5): the exec driver read its freeze command's last line with
    ``int()``, which takes "1_000", "+5" and other scripts' digits as watermarks; only ASCII
    digits are one now (so is a status's watermark given as text)."""

    def freezing(printed: str) -> ExecDriver:
        commands = {op: ["true"] for op in ("restart", "status", "unfreeze")}
        commands["freeze"] = [sys.executable, "-c", f"print({printed!r})"]
        driver = make_driver(
            driver_section(tmp_path, "exec", commands=commands), "10.0.0.5", tmp_path
        )
        assert isinstance(driver, ExecDriver)
        return driver

    assert await freezing("frozen\n 1000 ").freeze(1) == 1000
    assert await freezing("0").freeze(1) == 0
    for bad in ("1_000", "+5", "-5", "\u0663", "\uff11", "1.0", ""):
        with pytest.raises(DriverError, match=r"^freeze command printed no watermark: "):
            await freezing(bad).freeze(1)
    assert drivers._watermark_of({"watermark": " 12 "}) == 12
    for text in ("1_000", "+5", "\u0663"):
        with pytest.raises(DriverError, match="has no write watermark"):
            drivers._watermark_of({"watermark": text})


def reference_driver(root: Path, **settings: object) -> ReferenceDriver:
    """The reference driver of a server that is not running yet (``settings``: its config)."""
    server = RefServer(root / "server", next_loopback())
    server.write_config(**settings)
    return ReferenceDriver(server.config_path, root / "refserver.log")


async def test_reference_driver_start_waits_for_the_server(tmp_path: Path) -> None:
    """(And session 69, smalls 2: the server's log, appended to at every start, was never
    bounded; one beyond ``REFSERVER_LOG_MAX`` is moved aside to ``refserver.log.1`` at a
    start, so it stays under about twice that.)"""
    driver = reference_driver(tmp_path)
    big = drivers.REFSERVER_LOG_MAX + 1
    with open(tmp_path / "refserver.log", "wb") as f:  # (sparse: nothing written)
        f.truncate(big)
    try:
        await driver.start()
        assert await driver.health() is None
        assert driver._pid() is not None
    finally:
        await driver.stop()
    assert await driver.health() is not None
    assert (tmp_path / "refserver.log.1").stat().st_size == big
    assert 0 < (tmp_path / "refserver.log").stat().st_size < 1024 * 1024
    assert b"\0" not in (tmp_path / "refserver.log").read_bytes()  # the new start's output


def test_a_failed_starts_last_log_line_reads_only_the_logs_tail(tmp_path: Path) -> None:
    """Session 69 (smalls, 2): a start that failed read the whole refserver.log into memory
    (as text, then as lines) for its last line; now only its last ``LOG_TAIL`` bytes."""
    import tracemalloc

    log = tmp_path / "refserver.log"
    with open(log, "wb") as f:
        f.truncate(20 * 1024 * 1024)  # 20 MiB (sparse), then the last lines
        f.seek(0, os.SEEK_END)
        f.write(b"\nbefore\n" + b'{"event": "server.failed", "why": "in use"}\n\n')
    reader = SimpleNamespace(log_file=log)
    tracemalloc.start()
    try:
        last = ReferenceDriver._last_log_line(reader)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert last == "server.failed (why=in use)", last
    assert peak < 1024 * 1024, peak  # (the whole file was 20 MiB, and more as text)
    # A last line longer than the tail is its end, not "no output".
    log.write_bytes(b"x" * (drivers.LOG_TAIL + 10) + b"END\n")
    assert ReferenceDriver._last_log_line(reader).endswith("xxxEND")  # type: ignore[arg-type]
    log.write_bytes(b"a\n" + b"b" * drivers.LOG_TAIL + b"\nlast\n")
    assert ReferenceDriver._last_log_line(reader) == "last"  # type: ignore[arg-type]
    log.unlink()
    os.mkfifo(log)  # never read (it would block)
    assert ReferenceDriver._last_log_line(reader) == "no log"  # type: ignore[arg-type]


async def test_reference_driver_is_told_when_the_server_is_ready_and_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 ("the reference driver waits on the child process and checks readiness
    promptly"): the driver polled the starting server (5 ms, doubling to 40 ms: a check every
    40 ms for the whole start, and up to 40 ms late) and the stopping one. The server now tells
    it (READY=1 on the driver's notify socket) and a pidfd tells of an exit, so a start checks
    once when told, plus a safety-net check per ``READY_FALLBACK_WAIT``; a stop looks at the
    process four times (two before it waits, two once its exit woke it; it polled from 5 ms
    doubling to 40 ms, and the reference server took 350 ms to exit)."""
    driver = reference_driver(tmp_path)
    pid_reads, alive_checks = [0], [0]
    read_pid = driver._pid
    pid_alive = drivers._pid_alive

    def counting_pid() -> int | None:
        pid_reads[0] += 1
        return read_pid()

    def counting_alive(pid: int) -> bool:
        alive_checks[0] += 1
        return pid_alive(pid)

    monkeypatch.setattr(driver, "_pid", counting_pid)
    monkeypatch.setattr(drivers, "_pid_alive", counting_alive)
    try:
        t0 = time.monotonic()
        await driver.start()
        took = time.monotonic() - t0
        assert await driver.health() is None
        # At most one look per ``READY_FALLBACK_WAIT`` of the start, besides the one when told:
        # a bound that grows with the time the start took (a slow machine loosens it).
        assert 1 <= pid_reads[0] <= took / drivers.READY_FALLBACK_WAIT + 2, (pid_reads, took)
        pid_reads[0] = 0
        await driver.stop()
        assert pid_reads[0] == 1 and alive_checks[0] <= 4, (pid_reads, alive_checks)
        assert await driver.health() is not None
    finally:
        await driver.stop()


async def test_a_start_the_server_said_ready_for_does_not_ask_its_admin_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, the freeze window: once the started server had said READY=1 (which it sends
    once its listeners and admin socket are up), the driver still asked its admin socket for
    the status, a round trip inside every switch's freeze (the verify after it asks again).
    The pid file is still read; the server answers all the same."""
    driver = reference_driver(tmp_path)
    asked: list[str] = []
    status = driver.status

    async def counting() -> dict[str, Any]:
        asked.append("status")
        return await status()

    monkeypatch.setattr(driver, "status", counting)
    # No fallback look before the READY=1 (a loaded machine can take longer than its half
    # second to start the server, and the look would ask the socket: review of session 25).
    monkeypatch.setattr(drivers, "READY_FALLBACK_WAIT", 60.0)
    try:
        await driver.start()
        assert asked == []
        assert driver._pid() is not None
        assert await driver.health() is None
    finally:
        await driver.stop()


async def test_only_the_started_server_s_ready_message_counts_as_ready() -> None:
    """What wakes the driver is a cue to look; only READY=1 from the started server spares it
    the admin socket's question (another message of the server's, or anyone's READY=1, does
    not)."""
    wakeup = drivers.Wakeup()
    wakeup.listen()
    assert wakeup.address is not None
    code = (
        "import sys; from tlsroll import daemon\n"
        "daemon.sd_notify('STATUS=starting'); sys.stdin.readline(); daemon.sd_notify('READY=1')"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": wakeup.address},
    )
    wakeup.sender = server.pid
    try:
        await asyncio.wait_for(wakeup._event.wait(), 60)
        assert not wakeup.ready
        wakeup._event.clear()
        assert server.stdin is not None
        server.stdin.write(b"go\n")
        server.stdin.flush()
        await asyncio.wait_for(wakeup._event.wait(), 60)
        assert wakeup.ready
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
        wakeup.close()


async def test_the_readiness_socket_hears_only_the_started_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the review: the driver's readiness socket has a name every local user can see (in
    /proc/net/unix). A READY=1 from anyone but the started server must not wake the driver
    (one who kept sending could make it check readiness back to back during a freeze); the
    kernel tells who sent each message (SO_PASSCRED)."""
    wakeup = drivers.Wakeup()
    wakeup.listen()
    assert wakeup.address is not None
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); "
         "from tlsroll import daemon; daemon.sd_notify('READY=1')"],
        stdin=subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": wakeup.address},
    )  # fmt: skip
    wakeup.sender = server.pid
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", wakeup.address)
        assert daemon.sd_notify("READY=1")  # from this process: not the server
        await asyncio.sleep(0.3)
        assert not wakeup._event.is_set(), "a stranger's READY=1 woke the driver"
        assert server.stdin is not None
        server.stdin.write(b"go\n")
        server.stdin.flush()
        await asyncio.wait_for(wakeup._event.wait(), 60)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
        wakeup.close()


async def test_a_ready_sent_before_the_driver_knows_the_pid_still_wakes_it() -> None:
    """From the second review: messages read while the started server's pid was not yet known
    (the spawn's thread still returning) were dropped, and a fast server's READY=1 cost the
    freeze a fallback wait (0.5 s). It counts once the pid is known."""
    wakeup = drivers.Wakeup()
    wakeup.listen()
    assert wakeup.address is not None
    server = subprocess.Popen(
        [sys.executable, "-c", "from tlsroll import daemon; daemon.sd_notify('READY=1')"],
        env={**os.environ, "NOTIFY_SOCKET": wakeup.address},
    )
    try:
        server.wait(60)  # it has sent its READY=1
        await asyncio.sleep(0.3)  # read while the sender is unknown
        assert not wakeup._event.is_set()
        wakeup.sender = server.pid
        assert wakeup._event.is_set(), "the server's early READY=1 was dropped"
        assert wakeup.ready
    finally:
        wakeup.close()


async def test_the_agents_own_notify_socket_is_not_passed_to_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd the agent has a NOTIFY_SOCKET of its own (its unit is Type=notify). The
    server the driver starts inherited it and sent READY=1 and STOPPING=1 for the agent's unit
    (systemd drops them with NotifyAccess=main, and logs each). Not any more."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    driver = reference_driver(tmp_path)
    try:
        await driver.start()
        await driver.restart()
        assert await driver.health() is None
    finally:
        await driver.stop()
        with pytest.raises(TimeoutError):
            got = sock.recv(4096)
            pytest.fail(f"the agent's notify socket got {got!r} from the managed server")
        sock.close()


async def test_reference_driver_asks_readiness_without_an_aiohttp_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the agent asks the managed server's admin socket at every heartbeat, for
    months, and aiohttp's client cost an idle agent 10 MiB (its readiness checks once made a
    new aiohttp session each). The standard library's client now asks; start, restart, status
    and a stop work with aiohttp's client unusable, against a real reference server."""

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the driver made an aiohttp client session")

    monkeypatch.setattr(aiohttp, "ClientSession", refused)
    driver = reference_driver(tmp_path)
    try:
        await driver.start()
        first = driver._pid()
        await driver.restart()
        assert driver._pid() != first and await driver.health() is None
        assert (await driver.status())["frozen"] is False
    finally:
        await driver.stop()
    assert "not answering" in (await driver.health() or "")


async def test_admin_calls_hand_nothing_to_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: each admin call (freeze, the verify's watermark, unfreeze: three inside every
    switch's freeze window) was the standard library's client on a worker thread. They are
    spoken on the event loop now, against a real reference server, with the same answers."""
    driver = reference_driver(tmp_path)
    hops: list[str] = []
    to_thread = asyncio.to_thread

    async def counting(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await to_thread(fn, *args, **kwargs)

    try:
        await driver.start()
        monkeypatch.setattr(asyncio, "to_thread", counting)
        assert await driver.freeze(5) == 0
        assert (await driver.status())["frozen"] is True
        assert await driver.watermark() == 0
        await driver.unfreeze()
        assert await driver.health() is None
        assert (await driver.status())["frozen"] is False
        assert hops == [], hops
        with pytest.raises(DriverError, match=r"^admin /admin/freeze answered 400: "):
            await driver.admin.call("POST", "/admin/freeze", {"drain_timeout": -1})
    finally:
        monkeypatch.undo()
        await driver.stop()
    assert "not answering" in (await driver.health() or "")


async def status_from(tmp_path: Path, answer: bytes, asked: list[bytes]) -> dict[str, Any]:
    """The admin client's status call against a socket that answers ``answer`` to whatever it
    is asked (each request's head goes to ``asked``), then closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    path = tmp_path / "admin.sock"
    server = await asyncio.start_unix_server(serve, str(path))
    try:
        return await drivers.AdminSocketClient(path, timeout=5).call("GET", "/admin/status")
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n" + b'{"frozen": 1}',
        b"HTTP/1.0 200 OK\r\n\r\n" + b'{"frozen": 1}',  # to the connection's end
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;x=y\r\n{"fro\r\n8\r\nzen": 1}\r\n0\r\nTrailer: t\r\n\r\n',
    ],
)
async def test_an_admin_answer_of_any_framing_is_read(tmp_path: Path, answer: bytes) -> None:
    """A systemd server's admin socket is someone else's HTTP server: a length, the
    connection's end or chunks, the answer is the same."""
    asked: list[bytes] = []
    assert await status_from(tmp_path, answer, asked) == {"frozen": 1}
    assert asked == [b"GET /admin/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Only Transfer-Encoding: chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "illegal chunk header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}xx", "chunk footer"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "received 2 bytes, expected 10"),
        (b"HTTP/1.1 200 OK\r\n\r\n[1, 2]", "answered [1, 2]"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{x", "Expecting property name"),
        (b"", "closed without an answer"),
    ],
)
async def test_an_admin_answer_the_client_cannot_read_is_one_line(
    tmp_path: Path, answer: bytes, why: str
) -> None:
    """Whatever answers on the admin socket, the agent gets a DriverError of one line."""
    with pytest.raises(DriverError) as info:
        await status_from(tmp_path, answer, [])
    message = str(info.value)
    assert why in message and "\n" not in message, message


async def test_reference_driver_start_fails_at_once_if_the_server_exits(tmp_path: Path) -> None:
    """The start's timeout is an hour: only the server's exit can end the start within the
    test's bound (a minute; this timed it against half of a 20 s timeout before)."""
    driver = reference_driver(tmp_path, no_such_key=1)  # the server refuses its config
    with pytest.raises(DriverError, match=r"^the server exited at start \(code 2\): .*no_such_key"):
        async with asyncio.timeout(60):  # a hang's bound
            await driver.start(timeout=3600)


async def test_reference_driver_start_gives_up_after_its_timeout(tmp_path: Path) -> None:
    driver = reference_driver(tmp_path)
    try:
        with pytest.raises(DriverError, match=r"^the server did not answer within 0.05s$"):
            await driver.start(timeout=0.05)  # too short for a Python process to start
    finally:
        for child in driver._children:  # it may not have written its pid file yet
            child.kill()
            child.wait(10)


async def test_a_start_that_timed_out_leaves_no_server_to_come_up_later(tmp_path: Path) -> None:
    """Review s69 revref M: a start that gave up left the server it started running. One that
    had not written its pid file yet escaped the stop after it (the way back's), came up
    later on the config the agent had gone back from, or kept the next start from taking the
    data_dir. Now the driver stops what it started before it says the start failed."""
    driver = reference_driver(tmp_path)
    spawned: list[subprocess.Popen[bytes]] = []
    spawn = driver._spawn

    def recording(notify_socket: str | None = None) -> subprocess.Popen[bytes]:
        child = spawn(notify_socket)
        spawned.append(child)
        return child

    driver._spawn = recording  # type: ignore[method-assign]
    try:
        with pytest.raises(DriverError, match=r"^the server did not answer within 0.05s$"):
            await driver.start(timeout=0.05)  # too short for a Python process to start
        assert len(spawned) == 1
        assert spawned[0].poll() is not None, "the server whose start timed out still runs"
        assert not (driver.data_dir / "refserver.pid").exists()
        await driver.start(timeout=30)  # and the next start takes the data_dir
        assert (await driver.status())["pid"] == spawned[1].pid
    finally:
        for child in spawned:
            if child.poll() is None:
                child.kill()
                child.wait(10)


def test_a_port_on_an_address_not_of_this_machine_is_a_problem_not_an_error() -> None:
    """Review s69 revref M: the preflight's port check bound the server's address to see
    whether the port was free; an address this machine does not have (EADDRNOTAVAIL: a typo in
    the server's config, an address moved) raised OSError, and the preflight ended as an
    internal error with no reason. Now it is the node's problem, one line."""
    unassigned = ServerFacts("192.0.2.1", "/app/", 8080, 8443, ("http",))
    service = SimpleNamespace(driver=None, cfg=SimpleNamespace(bootstrap_port=9443))
    assert NodeAgentService._port_problems(service, unassigned) == [  # type: ignore[arg-type]
        f"port {port} ({what}) on 192.0.2.1 cannot be listened on: "
        "the address is not one of this machine's" + tail
        for port, what, tail in (
            (8443, "https", ""),
            (9443, "bootstrap", "; set [agent].bootstrap_port to a free port"),
        )
    ]
    address = next_loopback()
    with socket.create_server((address, 0)) as listener:
        port = listener.getsockname()[1]
        taken = ports.port_problem(address, port, "https", set())
        assert taken is not None and taken.startswith(
            f"port {port} (https) on {address} is taken by"
        )
        assert ports.port_problem(address, port, "https", {os.getpid()}) is None  # our own
    assert ports.port_problem(address, port, "https", set()) is None


def lowest_free_fd() -> int:
    """The lowest descriptor number this process does not use (``dup`` takes that one)."""
    fd = os.dup(0)
    os.close(fd)
    return fd


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[Callable[[], None]]:
    """This process short of descriptors (its soft limit lowered to the lowest free one: every
    new descriptor fails with EMFILE, the open ones keep working), as an agent meets it. The
    context gives a function that lifts the limit early; leaving it lifts it in any case."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), limits[1]))

    def lift() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    try:
        yield lift
    finally:
        lift()


async def test_a_reference_server_start_the_agent_cannot_check_is_not_blamed_on_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (the agent's own EMFILE): the server is started, then the agent runs out of
    descriptors and cannot read its pid file or ask its admin socket until the start's deadline.
    That is the agent's trouble (``LocalResourceError``: the transaction waits and tries
    again), not "the server did not answer" (a DriverError, which rolls the node back)."""
    driver = reference_driver(tmp_path)
    spawn = driver._spawn
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)

    def spawn_then_run_short(notify_socket: str | None = None) -> subprocess.Popen[bytes]:
        child = spawn(notify_socket)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), limits[1]))
        return child

    monkeypatch.setattr(driver, "_spawn", spawn_then_run_short)
    try:
        with pytest.raises(LocalResourceError, match="Too many open files"):
            await driver.start(timeout=1.5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        for child in driver._children:  # it may not have written its pid file yet
            child.kill()
            child.wait(10)


async def test_a_stop_the_agent_cannot_check_does_not_pass_for_done(tmp_path: Path) -> None:
    """Short of descriptors, the agent could not read the server's pid file and took that for
    "not running": the stop returned at once with the old server up (and the start after it
    met its ports in use). Now the stop says the agent is short, and stops once it is not."""
    driver = reference_driver(tmp_path)
    try:
        await driver.start()
        pid = driver._pid()
        assert pid is not None
        with out_of_descriptors(), pytest.raises(LocalResourceError, match="Too many open"):
            await driver.stop()
        assert alive(pid), "the server was left running, and the stop said so"
        await driver.stop()
        assert not alive(pid)
    finally:
        await driver.stop()


async def test_a_server_that_died_is_reaped_by_the_next_stop(tmp_path: Path) -> None:
    """The server the driver started crashed (SIGKILL from outside): it stays a zombie child of
    the agent until it is waited for. ``stop`` returned at once for a server that is not
    running, so the zombie was never reaped (and the tests' in-process driver left a ``Popen``
    still "running" when collected: a ResourceWarning in whatever test ran then)."""
    driver = reference_driver(tmp_path)
    try:
        await driver.start()
        pid = driver._pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 10, "the server's crash")
        await driver.stop()
        assert [c.pid for c in driver._children if c.returncode is None] == []
        assert not Path(f"/proc/{pid}").exists(), "a zombie is left"
    finally:
        await driver.stop()


@pytest.mark.parametrize("crash", ["before-stop", "stop-kills"])
async def test_a_stop_that_reaped_the_server_removes_its_stale_pid_file(
    crash: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 1 of s34, L4: a crashed (SIGKILLed) server leaves its pid file. Once ``stop``
    reaped it, its pid is free for reuse, and the file still named it: a later stop (after a
    start that failed before it wrote a new file) would SIGTERM and SIGKILL whatever process
    got that pid. A stop that reaped the server now removes the file naming it; so does one
    whose own SIGKILL ended a server that ignored SIGTERM (the pid file stays then too)."""
    driver = reference_driver(tmp_path)
    pid_file = driver.data_dir / "refserver.pid"
    try:
        await driver.start()
        pid = driver._pid()
        assert pid is not None and pid_file.exists()
        if crash == "before-stop":
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not alive(pid), 10, "the server's crash")
        else:  # the server ignores SIGTERM: the stop's SIGKILL, after its wait, ends it
            os.kill(pid, signal.SIGSTOP)
            monkeypatch.setattr(drivers, "STOP_TIMEOUT", 0.3)
        await driver.stop()
        assert not Path(f"/proc/{pid}").exists(), "a zombie is left"
        assert not pid_file.exists(), "the pid file still names a pid free for reuse"
        await driver.stop()  # nothing to stop, nothing signalled
    finally:
        await driver.stop()


def may_not_look(monkeypatch: pytest.MonkeyPatch, look: bool) -> None:
    """Unless ``look``: the agent may not look into other processes' descriptors (a server
    started with privileges the agent lacks now): the data_dir's lock decides."""
    if not look:
        monkeypatch.setattr(drivers, "_has_open", lambda pid, path: None)


@pytest.mark.parametrize("look", [True, False])
async def test_a_pid_file_naming_an_unrelated_process_is_not_signalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, look: bool
) -> None:
    """Review 2 of s34, F5: the server a previous agent started died while the agent was down,
    and the system gave its pid to an unrelated process. The new agent has no child record for
    it, so the reaped-pid guard does not apply: its stop read the pid file and SIGTERMed (then
    SIGKILLed) that process. Now only this data_dir's server is signalled; the stale file is
    dropped, with one log line."""
    may_not_look(monkeypatch, look)
    driver = reference_driver(tmp_path)
    driver.data_dir.mkdir(parents=True, exist_ok=True)
    (driver.data_dir / "refserver.lock").touch()  # a server ran here once
    pid_file = driver.data_dir / "refserver.pid"
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pid_file.write_text(f"{other.pid}\n")  # a bare pid, as every release writes it
        with capture_logs() as logged:
            await driver.stop()
        assert other.poll() is None and alive(other.pid), "an unrelated process was signalled"
        assert not pid_file.exists(), "the stale pid file is left for the next stop"
        assert [e["event"] for e in logged] == ["server.pid_file_stale"]
        assert logged[0]["pid"] == other.pid
    finally:
        other.kill()
        other.wait(10)


@pytest.mark.parametrize("look", [True, False])
async def test_a_server_a_previous_agent_started_is_still_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, look: bool
) -> None:
    """The other side of the check above: a server the driver did not start (an agent before
    a restart did) holds its data_dir's lock, and a new driver's stop ends it."""
    may_not_look(monkeypatch, look)
    before = reference_driver(tmp_path)
    try:
        await before.start()
        pid = before._pid()
        assert pid is not None
        after = ReferenceDriver(before.config_file, before.log_file)
        await after.stop()
        assert not alive(pid), "the server is still running"
        assert not (before.data_dir / "refserver.pid").exists()
    finally:
        for child in before._children:  # the server, even if its pid file went missing
            child.kill()
            child.wait(10)


HUNG_AFTER_ITS_LOCK = """
import fcntl, os, socket, sys, time
data_dir, address, ports = sys.argv[1], sys.argv[2], sys.argv[3:]
held = []
for port in ports:  # the server's listeners, never closed
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, int(port)))
    s.listen()
    held.append(s)
lock = os.open(os.path.join(data_dir, "refserver.lock"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
with open(os.path.join(data_dir, "refserver.pid"), "w") as f:
    f.write(f"{os.getpid()}\\n")
os.close(lock)  # lets go of the lock, and hangs
print("ready", flush=True)
time.sleep(600)
"""


async def test_a_server_that_let_go_of_its_lock_and_hangs_gets_no_second_server_beside_it(
    tmp_path: Path,
) -> None:
    """Review 1 of s35 (a nit): a server a previous agent started that hangs after letting go of
    its ``refserver.lock`` is not signalled (since s35agent2 only a process holding the lock,
    or a child of ours, is). The reference server lets go of the lock last, after its
    listeners, admin socket, store and pid file (``refserver.server.serve``), so such a process
    holds nothing of a server's. A stand-in that does keep the server's ports after letting go
    of the lock: the stop leaves it alone (one line, no wait), and the new server's start fails
    at once naming the port, rather than the agent waiting for ever or a second server
    listening beside it."""
    driver = reference_driver(tmp_path)
    facts = driver.facts()
    ports = [str(facts.https_port if s == "https" else facts.http_port) for s in facts.schemes]
    driver.data_dir.mkdir(parents=True, exist_ok=True)
    hung = subprocess.Popen(
        [sys.executable, "-c", HUNG_AFTER_ITS_LOCK, str(driver.data_dir), facts.address, *ports],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert hung.stdout is not None and hung.stdout.readline() == b"ready\n"
        with capture_logs() as logged:
            await driver.stop()
        assert [e["event"] for e in logged] == ["server.pid_file_stale"]
        assert hung.poll() is None, "the stand-in was signalled"
        with pytest.raises(DriverError, match=r"exited at start .*cannot listen on .*in use"):
            await driver.start(timeout=30)
        assert [c for c in driver._children if c.poll() is None] == []  # no second server
        assert hung.poll() is None
    finally:
        hung.kill()
        hung.wait(10)
        if hung.stdout is not None:
            hung.stdout.close()
        await driver.stop()


async def test_waiting_for_a_server_waits_out_the_agents_own_shortage(tmp_path: Path) -> None:
    """``_wait_healthy`` (systemd and exec after their restart command) ended at the first
    EMFILE of the agent's, and the transaction then ran the restart again on a server that was
    fine. Now it keeps asking: descriptors back within the deadline, the running server passes;
    short to the deadline, the shortage (not the server) is what it reports."""
    driver = reference_driver(tmp_path)
    try:
        await driver.start()
        with out_of_descriptors() as lift:
            asyncio.get_running_loop().call_later(0.3, lift)
            await _wait_healthy(driver, 5.0, "did not come back", interval=0.05)
        with out_of_descriptors(), pytest.raises(LocalResourceError, match="Too many open"):
            await _wait_healthy(driver, 0.3, "did not come back", interval=0.05)
    finally:
        await driver.stop()


async def test_reference_driver_refuses_a_socket_others_could_have_put_there(
    tmp_path: Path,
) -> None:
    """Issue 9: someone who can write the socket's directory can swap in a socket of their
    own, and the agent froze that fake. The driver now refuses before it connects: a fake
    admin socket in a directory everyone may write gets no request."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sock = shared / "admin.sock"
    asked: list[str] = []

    async def fake(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"frozen": True, "drained": True, "watermark": 0})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.UnixSite(runner, str(sock))
    await site.start()
    try:
        driver = reference_driver(tmp_path, admin_socket=str(sock))
        with pytest.raises(DriverError, match=r"not trusting the admin socket .*writ"):
            await driver.freeze(5)
        with pytest.raises(DriverError, match="not trusting"):
            await driver.status()
        assert asked == []
        # Review s69 revref M: so does the systemd driver (it trusted any socket anywhere).
        settings = {
            "config_file": str(tmp_path / "srv.conf"),
            "template": str(tmp_path / "srv.conf.tmpl"),
            "app_path": "/",
            "unit": "srv.service",
            "admin_socket": str(sock),
        }
        unit = SystemdDriver(Section(tmp_path / "agent.toml", "server", settings), "10.0.0.5")
        with pytest.raises(DriverError, match=r"not trusting the admin socket .*writ"):
            await unit.freeze(5)
        assert asked == []
        shared.chmod(0o700)  # ours alone: now it is the server's socket
        assert (await driver.status())["frozen"] is True
        assert (await unit.status())["frozen"] is True
        assert asked == ["/admin/status", "/admin/status"]
    finally:
        await runner.cleanup()


async def test_a_socket_dir_that_is_not_there_is_a_server_not_running(tmp_path: Path) -> None:
    """Session 71 walkthrough: the example agent.toml's systemd driver on a node whose server
    is not started (its /run/praxis not made yet) showed in `tlsroll nodes` and `plan` as
    "not trusting the admin socket /run/praxis/admin.sock: No such file or directory", a
    security refusal to the admin's eye; it is a server not running (or a wrong path)."""
    sock = tmp_path / "run" / "praxis" / "admin.sock"
    settings = {
        "config_file": str(tmp_path / "srv.conf"),
        "template": str(tmp_path / "srv.conf.tmpl"),
        "app_path": "/",
        "unit": "srv.service",
        "admin_socket": str(sock),
    }
    unit = SystemdDriver(Section(tmp_path / "agent.toml", "server", settings), "10.0.0.5")
    for driver in (unit, reference_driver(tmp_path, admin_socket=str(sock))):
        with pytest.raises(DriverError) as info:
            await driver.status()
        assert str(info.value) == (
            f"managed server not answering on {sock}: {sock.parent} does not exist (the server "
            "not started yet, or [server] admin_socket names another path)"
        )


# --- who is on which scheme: the systemd driver's access logs, the exec driver's command ------

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def clf(
    address: str,
    at: dt.datetime,
    agent: str | None = None,
    port: int | None = None,
    *,
    target: str = "/praxis_live/",
    request: str | None = None,
    status: int = 200,
) -> str:
    """One access log line: common log format, combined with ``agent``, vhost with ``port``;
    ``target`` asked for, or ``request`` the whole request as logged."""
    request = f"GET {target} HTTP/1.1" if request is None else request
    line = f'{address} - - [{at.strftime("%d/%b/%Y:%H:%M:%S %z")}] "{request}" {status} 57'
    if agent is not None:
        line += f' "-" "{agent}"'
    if port is not None:
        line = f"praxis.local:{port} {line}"
    return line + "\n"


def driver_section(tmp_path: Path, driver: str = "systemd", **settings: Any) -> Section:
    base: dict[str, object] = {
        "driver": driver,
        "config_file": str(tmp_path / "server.toml"),
        "template": str(tmp_path / "server.toml.in"),
        "app_path": "/praxis_live/",
    }
    if driver == "systemd":
        base |= {"unit": "praxis.service", "admin_socket": str(tmp_path / "admin.sock")}
    return Section(tmp_path / "agent.toml", "server", {**base, **settings})


LEADER = "10.0.0.2"


def systemd_with_logs(tmp_path: Path, **settings: Any) -> SystemdDriver:
    driver = make_driver(
        driver_section(tmp_path, **settings), "10.0.0.5", tmp_path, not_clients=(LEADER,)
    )
    assert isinstance(driver, SystemdDriver)
    return driver


def rows(view: ClientsView) -> list[tuple[str, str, int]]:
    return [(c.scheme, c.address, c.requests) for c in view.clients]


async def test_access_logs_one_per_scheme_in_the_common_log_format(tmp_path: Path) -> None:
    http_log, https_log = tmp_path / "http.log", tmp_path / "https.log"
    http_log.write_text(
        clf("192.168.1.20", NOW - dt.timedelta(minutes=5))
        + clf("192.168.1.21", NOW - dt.timedelta(minutes=4))
        + clf("192.168.1.20", NOW - dt.timedelta(minutes=3))
        + clf("10.0.0.5", NOW - dt.timedelta(minutes=2))  # the node itself (its own checks)
        + clf(LEADER, NOW - dt.timedelta(minutes=2))  # the leader's confirm step
        + clf("192.168.1.9", NOW - dt.timedelta(days=3))  # outside the window
        + clf("192.168.1.22", NOW, agent="tlsroll-check/0.9")  # combined: tlsroll's probe
        + clf("192.168.1.23", NOW - dt.timedelta(minutes=1), agent="Praxis/7")  # combined
    )
    https_log.write_text(clf("192.168.1.30", NOW - dt.timedelta(seconds=30)))
    driver = systemd_with_logs(
        tmp_path, access_log_http=str(http_log), access_log_https=str(https_log)
    )
    view = await driver.read_clients()
    assert view.source == "access-log" and view.problem == "" and view.window_seconds == 86400
    assert rows(view) == [
        ("https", "192.168.1.30", 1),
        ("http", "192.168.1.23", 1),
        ("http", "192.168.1.20", 2),
        ("http", "192.168.1.21", 1),
    ]
    first = next(c for c in view.clients if c.address == "192.168.1.20")
    assert first.first_seen == NOW - dt.timedelta(minutes=5)
    assert first.last_seen == NOW - dt.timedelta(minutes=3)

    # Incremental: only what was appended is read, and counts go on.
    with http_log.open("a") as f:
        f.write(clf("192.168.1.21", NOW))
        f.write("this is not an access log line\n")
        f.write(clf("192.168.1.24", NOW)[:20])  # a line still being written: not yet
    view = await driver.read_clients()
    assert rows(view)[0] == ("http", "192.168.1.21", 2)
    assert "1 lines not in access_log_format" in view.problem and "\n" not in view.problem
    with http_log.open("a") as f:
        f.write(clf("192.168.1.24", NOW)[20:])
    view = await driver.read_clients()
    assert ("http", "192.168.1.24", 1) in rows(view) and view.problem == ""

    # Rotated: the new file is read from its start; the clients seen stay.
    http_log.rename(tmp_path / "http.log.1")
    http_log.write_text(clf("192.168.1.25", NOW))
    view = await driver.read_clients()
    assert ("http", "192.168.1.25", 1) in rows(view)
    assert ("http", "192.168.1.20", 2) in rows(view)


async def test_tlsroll_s_checks_are_no_clients_in_a_log_without_the_user_agent(
    tmp_path: Path,
) -> None:
    """Session 75 probemark (review revknob M2): the common log format records no User-Agent,
    so the workstation's checks before its new settings (from the PC's own address) counted
    as its sightings, on https too: a run refused for a wrong password made the PC look moved.
    Every format has the request line: theirs is marked (``httpcheck.probe_target``). A line
    without a request (``"-"``, Apache's 408 for a connection that sent none: a TLS handshake
    alone) is no client's request either."""
    probe = httpcheck.probe_target("/praxis_live/")
    assert probe == f"/praxis_live/?tlsroll-check={tlsroll.__version__}"
    log = tmp_path / "https.log"
    log.write_text(
        clf("192.168.1.20", NOW, target=probe)
        + clf("192.168.1.21", NOW, target=httpcheck.probe_target("/praxis_live/?a=1"))
        + clf("192.168.1.22", NOW, request="-", status=408)
        + clf("192.168.1.23", NOW, target="/praxis_live/?tlsroll-checked=1")  # not the mark
        + clf("192.168.1.24", NOW, target="/praxis_live/tlsroll-check=1")  # (a path, no query)
    )
    driver = systemd_with_logs(tmp_path, access_log_https=str(log))
    view = await driver.read_clients()
    assert sorted(rows(view)) == [("https", "192.168.1.23", 1), ("https", "192.168.1.24", 1)]
    assert view.problem == ""


async def test_a_missing_log_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    log = tmp_path / "missing.log"
    driver = systemd_with_logs(tmp_path, access_log_http=str(log))
    view = await driver.read_clients()
    assert view.clients == () and view.problem == f"access log {log}: no such file"
    log.write_text(clf("192.168.1.20", NOW))
    view = await driver.read_clients()
    assert rows(view) == [("http", "192.168.1.20", 1)] and view.problem == ""


async def test_a_huge_log_is_read_from_its_tail_and_in_bounded_steps(tmp_path: Path) -> None:
    log = tmp_path / "huge.log"
    old = clf("192.168.1.1", NOW - dt.timedelta(hours=1))
    with log.open("w") as f:  # twice what a first look reads
        f.write(old * (2 * client_sources.TAIL_BYTES // len(old)))
        f.write(clf("192.168.1.2", NOW))
    driver = systemd_with_logs(tmp_path, access_log_http=str(log))
    view = await driver.read_clients()
    assert [a for _s, a, _n in rows(view)] == ["192.168.1.2", "192.168.1.1"]
    n = next(c.requests for c in view.clients if c.address == "192.168.1.1")
    assert n <= client_sources.TAIL_BYTES // len(old)  # the tail only, not the whole file
    assert view.problem == ""
    # More appended at once than one look reads: the older part is skipped, and said so.
    with log.open("a") as f:
        f.write(old * (2 * client_sources.MAX_READ_BYTES // len(old)))
        f.write(clf("192.168.1.3", NOW))
    view = await driver.read_clients()
    assert rows(view)[0][1] == "192.168.1.3"
    assert "skipped" in view.problem and "written too fast" in view.problem


async def test_one_log_for_both_schemes_tells_them_by_port(tmp_path: Path) -> None:
    log = tmp_path / "vhost.log"
    log.write_text(
        clf("192.168.1.20", NOW - dt.timedelta(minutes=1), agent="Praxis", port=8080)
        + clf("192.168.1.20", NOW, agent="Praxis", port=8443)
        + clf("192.168.1.21", NOW, agent="Praxis", port=9000)  # another site on this server
    )
    driver = systemd_with_logs(tmp_path, access_log=str(log), access_log_format="vhost_combined")
    view = await driver.read_clients()
    assert rows(view) == [("https", "192.168.1.20", 1), ("http", "192.168.1.20", 1)]
    # A pattern of the admin's own, with a workstation name the server logs.
    log.write_text(f"{NOW.isoformat()} 192.168.1.40 https ws-empfang\n")
    driver = systemd_with_logs(
        tmp_path,
        access_log=str(log),
        access_log_format=r"(?P<time>\S+) (?P<address>\S+) (?P<scheme>\S+) (?P<workstation>\S+)",
    )
    view = await driver.read_clients()
    assert [(c.scheme, c.address, c.workstation) for c in view.clients] == [
        ("https", "192.168.1.40", "ws-empfang")
    ]


@pytest.mark.parametrize(
    ("settings", "key", "problem"),
    [
        ({"access_log": "a.log"}, "access_log", "does not say the scheme"),
        ({"access_log_http": "a.log", "access_log_format": "(x"}, "access_log_format", "regex"),
        (
            {"access_log_http": "a.log", "access_log_format": r"(?P<address>\S+)"},
            "access_log_format",
            "needs the groups",
        ),
        ({"access_log": "a.log", "access_log_http": "b.log"}, "access_log", "either"),
        (
            {"access_log_http": "a.log", "clients_ignore": ["leader"]},
            "clients_ignore[0]",
            "not an IP",
        ),
        ({"access_log_format": "combined"}, "access_log_format", "needs access_log"),
        ({"clients_window": 5}, "clients_window", "must be between 60"),
        ({"clients_refresh": -1}, "clients_refresh", "must be between 0"),
    ],
)
def test_bad_client_settings_are_one_line_config_errors(
    tmp_path: Path, settings: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_driver(driver_section(tmp_path, **settings), "10.0.0.5", tmp_path)
    text = str(info.value)
    assert f"[server].{key}" in text and problem in text and "\n" not in text


def exec_driver(tmp_path: Path, script: str, **settings: object) -> ExecDriver:
    """An exec driver whose ``clients`` command runs ``script`` (Python)."""
    commands = {op: ["true"] for op in ("restart", "status", "freeze", "unfreeze")}
    section = driver_section(
        tmp_path, "exec", commands={**commands, "clients": [sys.executable, "-c", script]}
    )
    section.data = {**section.data, **settings}
    driver = make_driver(section, "10.0.0.5", tmp_path)
    assert isinstance(driver, ExecDriver)
    return driver


GOOD = {
    "window_seconds": 3600,
    "clients": [
        {
            "scheme": "http",
            "address": "192.168.1.20",
            "workstation": "ws-empfang",
            "first_seen": (NOW - dt.timedelta(minutes=9)).isoformat(),
            "last_seen": (NOW - dt.timedelta(minutes=1)).isoformat(),
            "requests": 40,
        },
        {"scheme": "https", "address": "192.168.1.21", "last_seen": NOW.timestamp()},
        {"scheme": "http", "address": "192.168.1.22", "last_seen": NOW.timestamp() - 7200},
    ],
}


async def test_exec_clients_command_prints_the_documented_json(tmp_path: Path) -> None:
    driver = exec_driver(tmp_path, f"print({json.dumps(json.dumps(GOOD))})")
    view = await driver.read_clients()
    assert view.source == "exec" and view.problem == "" and view.window_seconds == 3600
    assert [(c.scheme, c.address, c.workstation, c.requests) for c in view.clients] == [
        ("https", "192.168.1.21", "", 1),
        ("http", "192.168.1.20", "ws-empfang", 40),  # 192.168.1.22: outside its window
    ]


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        ("print('not json')", "printed no clients JSON: not JSON"),
        ("print('[1, 2]')", 'expected a JSON object with "clients"'),
        (
            "import json; print(json.dumps({'clients': [{'scheme': 'ftp', 'address': '1.2.3.4', "
            "'last_seen': 1}, {'scheme': 'http', 'address': '192.168.1.5', 'last_seen': 9e9}]}))",
            "1 malformed entries left out (first: clients[0]: scheme 'ftp'",
        ),
        ("import sys; sys.stdout.write('x' * 3_000_000)", "printed more than 1024 KiB"),
        ("import sys; sys.exit('no access to the log')", "exited 1: no access to the log"),
        ("import time; time.sleep(30)", "did not finish within 1s"),
    ],
    ids=["not-json", "not-object", "bad-entry", "huge", "fails", "hangs"],
)
async def test_exec_clients_command_gone_wrong_is_a_problem(
    tmp_path: Path, script: str, problem: str
) -> None:
    driver = exec_driver(tmp_path, script, clients_timeout=1)
    view = await driver.read_clients()
    assert problem in view.problem, view.problem
    assert view.source == "exec" and len(view.problem) <= 200 and "\n" not in view.problem


async def test_exec_clients_command_whose_child_escapes_its_kill_is_not_waited_on(
    tmp_path: Path,
) -> None:
    """The exec helper of session 64: a ``clients`` command timed out was killed with its
    session, then waited on until its output closed; a child of it that left the session
    (``setsid``, a daemon forking away) and kept the output open held the agent's clients
    refresh for as long as it lived. Its report comes within the timeout and a bounded wait."""
    pid_file = tmp_path / "escaped.pid"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(40)'],"
        " start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(30)\n"
    )
    driver = exec_driver(tmp_path, script, clients_timeout=1)
    try:
        async with asyncio.timeout(15):  # (a bound for the test: 1 s, then at most KILL_WAIT)
            view = await driver.read_clients()
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert "did not finish within 1s" in view.problem, view.problem


async def test_exec_clients_at_the_edges_of_the_wire_still_make_a_report(tmp_path: Path) -> None:
    """A count beyond uint64 once made building the agent's report raise, which ended its
    heartbeats for good (the node looked offline while serving); a date at the calendar's edge
    with an offset raised OverflowError instead of being one malformed entry."""
    data = {
        "clients": [
            {
                "scheme": "http",
                "address": "192.168.1.20",
                "last_seen": NOW.timestamp(),
                "requests": 2**64,
            },
            {"scheme": "http", "address": "192.168.1.21", "last_seen": "0001-01-01T00:00:00+05:00"},
        ]
    }
    driver = exec_driver(tmp_path, f"print({json.dumps(json.dumps(data))})")
    view = await driver.read_clients()
    assert [c.address for c in view.clients] == ["192.168.1.20"]
    assert "1 malformed entries left out" in view.problem and "out of range" in view.problem
    report = clients_message(view)  # what GetStatus and every heartbeat carry
    assert report.clients[0].requests == 2**62


async def test_exec_clients_command_that_does_not_exist(tmp_path: Path) -> None:
    driver = exec_driver(tmp_path, "")
    assert driver.clients_command is not None
    driver.clients_command = [str(tmp_path / "no-such-command")]
    view = await driver.read_clients()
    assert view.problem.startswith("clients: cannot run") and "No such file" in view.problem


def test_the_agent_reports_the_exec_clients_and_caches_them(nodes: NodeFactory) -> None:
    """GetStatus carries what the command printed; the command runs once per clients_refresh,
    not once per status or heartbeat."""
    node = nodes.new()
    control = write_control(node)
    template = write_template(node)
    runs = node.root / "clients-runs"
    script = f"open({str(runs)!r}, 'a').write('run\\n'); print({json.dumps(json.dumps(GOOD))})"
    commands: dict[str, object] = {
        op: [sys.executable, str(control.script), op]
        for op in ("restart", "status", "freeze", "unfreeze")
    }
    commands["clients"] = [sys.executable, "-c", script]
    node.start(
        extra_config={"server.commands": commands},
        driver="exec",
        template=template,
        app_path=node.server.app_path,
        clients_refresh=600,
    )
    views: list[Any] = []

    def reported() -> bool:  # the first read may outlast a status call (a slow machine)
        with node.stub() as stub:
            views.append(
                stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT).server.clients
            )
        return bool(views[-1].source)

    wait_until(reported, 30, "the agent to report the clients")
    first = views[-1]
    assert reported() and views[-1] == first
    assert first.source == "exec" and first.window_seconds == 3600
    assert [(c.scheme, c.address, c.workstation) for c in first.clients] == [
        ("https", "192.168.1.21", ""),
        ("http", "192.168.1.20", "ws-empfang"),
    ]
    assert first.clients[1].requests == 40
    assert first.clients[1].last_seen.ToDatetime(tzinfo=dt.UTC) == NOW - dt.timedelta(minutes=1)
    # Heartbeats (every few seconds) and both GetStatus calls shared one run of the command.
    assert runs.read_text() == "run\n"


def test_a_heartbeat_carries_the_clients_of_the_status_view() -> None:
    view = agent_pb2.ServerView(driver="reference", healthy=True, schemes=["http", "https"])
    view.clients.CopyFrom(
        clients_message(
            ClientsView(
                (ClientSeen("http", "192.168.1.20", "ws-empfang", NOW, NOW, 3),), 86400, "refserver"
            )
        )
    )
    live = live_server(view)
    assert list(live.schemes) == ["http", "https"]
    assert live.clients == view.clients
    assert live.clients.clients[0].workstation == "ws-empfang"
    assert live.login_failures == 0 and not live.HasField("last_login_failure_at")
    view.login_failures = 7
    view.last_login_failure_at.FromDatetime(NOW)
    live = live_server(view)
    assert live.login_failures == 7
    assert live.last_login_failure_at.ToDatetime(tzinfo=dt.UTC) == NOW


async def test_a_slow_clients_command_runs_once_whoever_gives_up_waiting(tmp_path: Path) -> None:
    """A heartbeat waits only so long for the view: giving up must neither kill the command
    nor start another one; the next status gets what it printed."""
    runs = tmp_path / "runs"
    gate = tmp_path / "gate"
    script = (
        "import os, time\n"
        f"open({str(runs)!r}, 'a').write('run\\n')\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
        f"print({json.dumps(json.dumps(GOOD))})\n"
    )
    driver = exec_driver(tmp_path, script, clients_timeout=60)
    for _ in range(3):  # three callers give up while the command runs
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(driver.clients(), 0.05)
    waiting = await driver.clients()  # one that waits its own while: the slow-read problem
    assert waiting.clients == () and "still reading" in waiting.problem
    gate.touch()
    task = driver._clients_task
    assert task is not None
    view = await asyncio.wait_for(asyncio.shield(task), 30)
    assert view.source == "exec" and len(view.clients) == 2
    assert (await driver.clients()) == view  # cached now
    assert runs.read_text() == "run\n"


async def test_a_when_quiet_switch_reads_the_clients_afresh_and_judges_them(
    tmp_path: Path,
) -> None:
    """``finalize --when-quiet`` (review s64 M): just before the switch the agent asks its
    server afresh (``clients_now``): the command runs again though a view is cached, and that
    view is the one the heartbeats send next. ``quiet_refusal`` refuses the switch for an
    http client seen within the quiet time, or for a view that cannot tell."""
    runs = tmp_path / "runs"
    script = f"open({str(runs)!r}, 'a').write('run\\n'); print({json.dumps(json.dumps(GOOD))})"
    driver = exec_driver(tmp_path, script)
    first = await driver.clients_now()
    fresh = await driver.clients_now()
    assert runs.read_text() == "run\nrun\n"  # not the cached view
    assert fresh == first and fresh.source == "exec" and len(fresh.clients) == 2
    assert (await driver.clients()) == fresh  # cached: what the heartbeats send
    assert runs.read_text() == "run\nrun\n"
    assert quiet_refusal(fresh, NOW, 120) == (
        "not quiet: ws-empfang (192.168.1.20) was seen on http 60s ago, within --when-quiet"
        " 120s; http stays open"
    )
    assert quiet_refusal(fresh, NOW, 59) is None  # the https client does not count
    broken = ClientsView(source="exec", problem="clients: x exited 1")
    assert quiet_refusal(broken, NOW, 60) == (
        "not quiet: who is on http cannot be told: clients: x exited 1"
    )
    assert quiet_refusal(ClientsView(), NOW, 60) == (
        "not quiet: who is on http cannot be told: the server's driver cannot tell who it has seen"
    )


async def test_a_when_quiet_switch_s_slow_fresh_look_refuses_before_the_leader_gives_up(
    tmp_path: Path,
) -> None:
    """Review b3 of s64 (M1): the fresh look waited 30 s, the leader's first wait for a
    switch's answer is 15 s: a slow ``clients`` command (one allowed up to 120 s) had the
    leader take the agent for unreachable mid-switch and ask again for ever, the node shown
    "switching", nothing ever refused. The look gives up first and says it cannot tell."""
    from leader.agent_client import STREAM_SECONDS
    from nodeagent.drivers import CLIENTS_FRESH_WAIT

    assert CLIENTS_FRESH_WAIT < STREAM_SECONDS - 3  # (room for the switch's own first steps)
    driver = exec_driver(tmp_path, "import time; time.sleep(40)", clients_timeout=60)
    try:
        view = await driver.clients_now()
    finally:  # (the read goes on for the heartbeats: this test ends it, killing the command)
        if (reading := driver._clients_task) is not None:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    refusal = quiet_refusal(view, NOW, 60)
    assert refusal is not None and refusal.startswith("not quiet: who is on http cannot be told")
    assert f"took over {CLIENTS_FRESH_WAIT:g}s" in refusal, refusal


async def test_fresh_looks_at_the_clients_run_one_at_a_time(tmp_path: Path) -> None:
    """The closing review of session 64 (M2): each `--when-quiet` pass began a fresh read
    though one was under way (a slow ``clients`` command piled up, a dozen at once at its
    120 s timeout), and an older read that ended after a fresh one put its view in the cache
    over the fresher. Two looks at once here: the command never runs twice at a time."""
    runs = tmp_path / "runs"
    script = (
        "import time\n"
        f"open({str(runs)!r}, 'a').write('start\\n')\n"
        "time.sleep(1)\n"
        f"open({str(runs)!r}, 'a').write('end\\n')\n"
        f"print({json.dumps(json.dumps(GOOD))})\n"
    )
    driver = exec_driver(tmp_path, script, clients_timeout=10)
    first, second = await asyncio.gather(driver.clients_now(), driver.clients_now())
    assert runs.read_text() == "start\nend\nstart\nend\n", runs.read_text()
    assert first.problem == second.problem == "" and len(second.clients) == 2
    assert (await driver.clients()) == second  # the cache: the newest read's


async def test_the_admin_client_sends_its_request_before_its_first_wait() -> None:
    """Issue 15: a switch's freeze call is the first thing on the loop once the switch has
    begun (``Runner.under_way``) only if the call is out before its task first yields: the
    client connected with a stream, which waits a loop round for the connection before it
    writes. It connects and sends at once now (a local socket takes a small request whole);
    the answer is read as before."""
    directory = Path(tempfile.mkdtemp(prefix="trs-"))
    path = directory / "admin.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        call = asyncio.ensure_future(
            drivers.AdminSocketClient(path, timeout=5).call("POST", "/admin/freeze", {"x": 1})
        )
        await asyncio.sleep(0)  # the call's first step, up to its first wait
        conn, _ = listener.accept()
        conn.setblocking(False)
        try:
            sent = conn.recv(65536)
        except BlockingIOError:
            sent = b""
        assert sent.startswith(b"POST /admin/freeze HTTP/1.1\r\n") and sent.endswith(b'{"x": 1}')
        conn.setblocking(True)
        body = b'{"frozen": true}'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        assert await asyncio.wait_for(call, 5) == {"frozen": True}
        conn.close()
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_the_reference_driver_reads_its_config_once_within_reading_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: a switch's plan and its source (the driver's facts, its render, the live
    config) read refserver.toml three times and parsed it twice. Within ``reading_once``
    the file is read once and parsed once; outside it, each reads the file (and sees a
    change)."""
    driver = reference_driver(tmp_path)
    reads: list[Path] = []
    read_bytes = Path.read_bytes
    read_file = drivers.read_file  # (the driver's reader of its files: never a FIFO's wait)
    config_read = ConfigFile.read

    def counting(path: Path) -> bytes:
        if path == driver.config_file:
            reads.append(path)
        return read_file(path)

    def counting_config(path: Path) -> bytes:  # (the config reader opens the file itself)
        if path == driver.config_file:
            reads.append(path)
        return config_read(path)

    monkeypatch.setattr(drivers, "read_file", counting)
    monkeypatch.setattr(ConfigFile, "read", staticmethod(counting_config))
    target = Target(("https",), tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")
    with driver.reading_once():
        facts, rendered, source = driver.facts(), driver.render(target), driver.read_config()
        assert driver.facts() == facts
    assert len(reads) == 1
    assert source == read_bytes(driver.config_file) and b'"https"' in rendered
    assert (driver.facts(), driver.render(target), driver.read_config()) == (
        facts,
        rendered,
        source,
    )
    assert len(reads) == 4  # outside it, each reads the file
    driver.config_file.write_bytes(source.replace(b'"http"', b'"https"'))
    assert driver.facts().schemes == ("https",)


def stopped_template_server(tmp_path: Path) -> SystemdDriver:
    """A systemd driver whose server is stopped (an admin checking it): nothing listens on its
    loopback address."""
    template = tmp_path / "srv.conf.tmpl"
    template.write_text(
        "$http_off listen $address:$http_port;\n"
        "$https_off listen $address:$https_port ssl;\n"
        "$https_off ssl_certificate $cert_file;\n"
        "auth $auth_verifier_file\n"
    )
    settings = {
        "config_file": str(tmp_path / "srv.conf"),
        "template": str(template),
        "app_path": "/",
        "unit": "srv.service",
        "admin_socket": str(tmp_path / "admin.sock"),
    }
    return SystemdDriver(Section(tmp_path / "agent.toml", "server", settings), next_loopback())


def journal_holding(tmp_path: Path, live: dict[str, str] | None) -> Journal:
    """A journal whose ``live_tls`` is ``live`` (as a completed transaction leaves it)."""
    journal = Journal(tmp_path / "journal.sqlite3")
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.sqlite3")) as db, db:
        Journal._set_live_tls(db, live)
    return journal


LIVE_FILES = {"cert_file": "/x/cert.pem", "key_file": "/x/key.pem", "ca_file": "/x/ca.pem"}


def test_journal_checked_with_a_template_driver_and_its_server_stopped(tmp_path: Path) -> None:
    """Review s41rev3 N3: ``live_contradiction`` took the schemes from the template driver's
    ``facts``, which probes the ports: with the server stopped (the admin checking it) there
    were none. With https files live, ``render`` failed on ``schemes[0]`` (IndexError, a
    traceback on --journal-checked); with none live, a config serving https passed. Now the
    config is compared with the renders for https and both schemes, or the http-only render;
    a config that is neither needs the server up to say what it serves."""
    driver = stopped_template_server(tmp_path)
    files = Target(("https",), Path("/x/cert.pem"), Path("/x/key.pem"), Path("/x/ca.pem"))
    with_tls = journal_holding(tmp_path, LIVE_FILES)
    try:
        for schemes in (("https",), ("http", "https")):
            driver.config_file.write_bytes(driver.render(replace(files, schemes=schemes)))
            assert plans.live_contradiction(with_tls, driver) is None, schemes
        other = replace(files, cert_file=Path("/y/cert.pem"))
        driver.config_file.write_bytes(driver.render(other))
        problem = plans.live_contradiction(with_tls, driver)
        assert problem is not None
        assert "names other files than the journal holds live" in problem
        driver.config_file.write_bytes(driver.render(Target(("http",))))
        assert plans.live_contradiction(with_tls, driver) is not None  # https files live
    finally:
        with_tls.close()

    (tmp_path / "journal.sqlite3").unlink()
    http_only = journal_holding(tmp_path, None)
    try:
        driver.config_file.write_bytes(driver.render(files))  # https, the server stopped
        problem = plans.live_contradiction(http_only, driver)
        assert problem is not None
        assert problem.startswith("the server does not answer"), problem
        driver.config_file.write_bytes(driver.render(Target(("http",))))
        assert plans.live_contradiction(http_only, driver) is None
        driver.config_file.write_text("listen 127.0.0.1:8080; # the admin's own\n")
        problem = plans.live_contradiction(http_only, driver)
        assert problem is not None
        assert problem.startswith("the server does not answer"), problem
        assert problem.endswith("start it, then run --journal-checked again"), problem
    finally:
        http_only.close()


def test_journal_checked_refuses_a_reference_config_naming_a_verifier_not_live(
    tmp_path: Path,
) -> None:
    """Review s41rev3 L1: ``ReferenceDriver.render`` keeps the file keys its target leaves out
    (None), so ``says`` took a config naming a verifier the journal does not hold live (a
    later rollout's, say) for the journal's files. Now such a key must be absent."""
    server = RefServer(tmp_path / "server", next_loopback())
    server.write_config(
        listen=["https"],
        cert_file="/x/cert.pem",
        key_file="/x/key.pem",
        client_ca_file="/x/ca.pem",
        auth_verifier_file="/x/verifier-v2.json",
    )
    driver = ReferenceDriver(server.config_path, tmp_path / "refserver.log")
    without = journal_holding(tmp_path, LIVE_FILES)
    try:
        problem = plans.live_contradiction(without, driver)
        assert problem is not None
        assert "names other files than the journal holds live" in problem
    finally:
        without.close()
    (tmp_path / "journal.sqlite3").unlink()
    named = journal_holding(tmp_path, {**LIVE_FILES, "verifier_file": "/x/verifier-v2.json"})
    try:
        assert plans.live_contradiction(named, driver) is None
    finally:
        named.close()
    server.write_config(auth_verifier_file=None)  # none in the config, none live: agreed
    (tmp_path / "journal.sqlite3").unlink()
    with_none = journal_holding(tmp_path, LIVE_FILES)
    try:
        assert plans.live_contradiction(with_none, driver) is None
    finally:
        with_none.close()


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"login_failures": 3, "last_login_failure": "2026-12-04T22:50:01.250+00:00"}, 3),
        ({"login_failures": 3, "last_login_failure": None}, 3),
        ({"login_failures": 3, "last_login_failure": "yesterday"}, 3),
        ({"login_failures": 3, "last_login_failure": "2026-12-04T22:50:01"}, 3),  # no zone
        ({"login_failures": 2**40}, 2**32 - 1),
        ({"login_failures": 0, "last_login_failure": "2026-12-04T22:50:01+00:00"}, 0),
        ({"login_failures": -1}, 0),
        ({"login_failures": True}, 0),
        ({"login_failures": "3"}, 0),
        ({}, 0),
    ],
)
def test_the_wrong_client_passwords_are_read_from_the_servers_status(
    status: dict[str, Any], expected: int
) -> None:
    """What the agent carries to the leader of a server's ``login_failures`` (the reference
    server's count since it started) and ``last_login_failure``: a count or 0, never an error,
    and the time only where it is one with a zone."""
    count, last = login_failures(status)
    assert count == expected
    well_formed = status.get("last_login_failure") in (
        "2026-12-04T22:50:01.250+00:00",
        "2026-12-04T22:50:01+00:00",
    )
    if expected and well_formed:
        assert last == dt.datetime(2026, 12, 4, 22, 50, 1, 250_000, tzinfo=dt.UTC)
    else:
        assert last is None


def test_the_write_watermark_a_status_may_give() -> None:
    """rev57b M2 / rev57c L5: as ``int()`` took it before (123, 123.0, "123"); a status with
    none, or one that is no whole number, is a DriverError that names the status's keys, not
    its values (they go to the schema and the viewer), never a KeyError."""
    from nodeagent.drivers import _watermark_of

    for value, number in ((123, 123), (7.0, 7), ("42", 42), (0, 0)):
        assert _watermark_of({"watermark": value}) == number
    for status in (
        {"started_at": "2026-12-03T13:40:00+00:00", "frozen": False},
        {"watermark": True},
        {"watermark": 1.5},
        {"watermark": "many"},
        {"watermark": None},
        {"watermark": [1]},
    ):
        with pytest.raises(DriverError) as refused:
            _watermark_of(status)
        said = str(refused.value)
        assert said.startswith("the server's status has no write watermark (an integer; its keys:")
        assert "2026-12-03" not in said and "many" not in said


@contextlib.asynccontextmanager
async def freezing_with(
    tmp_path: Path, answer: dict[str, Any]
) -> AsyncIterator[drivers._AdminSocketFreeze]:
    """An admin-socket freezer whose server answers every request with ``answer`` (JSON)."""
    body = json.dumps(answer).encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    path = tmp_path / "admin.sock"
    server = await asyncio.start_unix_server(serve, str(path))
    freezer = drivers._AdminSocketFreeze()
    freezer.admin = drivers.AdminSocketClient(path, timeout=5)
    try:
        yield freezer
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "answer",
    [
        {"drained": True},
        {"drained": True, "watermark": None},
        {"drained": True, "watermark": True},
        {"drained": True, "watermark": "7x"},
        {"drained": True, "watermark": 7},
    ],
    ids=["none", "null", "true", "not-a-number", "seven"],
)
async def test_a_freeze_answer_is_checked_for_its_watermark_as_a_status_is(
    tmp_path: Path, answer: dict[str, Any]
) -> None:
    """Review s64 L1: the admin socket's freeze answer went through ``int()`` unchecked: one
    without a watermark was a KeyError (the step's reason the bare key's name), "7x" int()'s
    own text, and true passed as watermark 1. Now it is read as a status's is
    (``_watermark_of``): a DriverError in one line naming the answer's keys (the freeze
    step rolls back)."""
    async with freezing_with(tmp_path, answer) as freezer:
        if answer.get("watermark") == 7:
            assert await freezer.freeze(10) == 7
            return
        with pytest.raises(DriverError) as refused:
            await freezer.freeze(10)
    keys = ", ".join(sorted(answer))
    assert str(refused.value) == (
        f"the server's freeze answer has no write watermark (an integer; its keys: {keys})"
    )


async def test_a_freeze_answered_unfrozen_is_no_freeze(tmp_path: Path) -> None:
    """Review s69 revref L: a freeze waits for writes in flight with its lock released, so an
    unfreeze sent meanwhile answers first, and the freeze then answers drained but
    ``"frozen": false``. The driver took it for a freeze (it reads ``drained`` alone)."""
    answer = {"frozen": False, "watermark": 7, "drained": True}
    async with freezing_with(tmp_path, answer) as freezer:
        with pytest.raises(DriverError, match=r"^the server was unfrozen again before its freeze"):
            await freezer.freeze(10)


def test_the_reference_config_says_where_the_previous_one_is_kept(tmp_path: Path) -> None:
    """Review s64 L2: the header of a config the agent writes said "the previous version is
    kept", not where: an admin looked for a backup file beside it."""
    rendered = reference_driver(tmp_path).render(Target(("https",))).decode()
    assert rendered.startswith(
        "# managed by tlsroll-agent; the previous version is kept in the agent's journal:\n"
        "# `tlsroll rollout rollback` puts it back\n"
    )


def test_a_server_killed_at_start_says_by_which_signal_and_its_last_line_reads(
    tmp_path: Path,
) -> None:
    """Review rev58a L2: "the server exited at start (code -9): {"seconds": 4.0, …, "event":
    …}": the signal by name, the reference server's JSON line as its message and the rest."""
    from types import SimpleNamespace

    from nodeagent.drivers import ReferenceDriver, ended_at_start

    assert ended_at_start(-9) == "the server was killed at start (SIGKILL)"
    assert ended_at_start(2) == "the server exited at start (code 2)"
    log = tmp_path / "refserver.log"
    log.write_text(
        '{"seconds": 4.0, "event": "test_hook.start_delay", "level": "info", '
        '"logger": "refserver", "timestamp": "2026-12-05T22:00:00Z"}\n'
    )
    last = ReferenceDriver._last_log_line(SimpleNamespace(log_file=log))  # type: ignore[arg-type]
    assert last == "test_hook.start_delay (seconds=4.0)", last
    log.write_text("refserver: error: cannot listen on 127.0.0.1:8443: in use\n")
    last = ReferenceDriver._last_log_line(SimpleNamespace(log_file=log))  # type: ignore[arg-type]
    assert last == "refserver: error: cannot listen on 127.0.0.1:8443: in use"


async def test_a_watermark_beyond_64_bits_is_refused_in_one_line(tmp_path: Path) -> None:
    """Review s69 review4 (L): a watermark is journalled (SQLite's signed 64-bit INTEGER) and
    sent as a uint64: one beyond 2**63 - 1 made the journal's write raise OverflowError, and a
    freeze command's line of more than 4300 digits made ``int()`` raise ValueError (not the
    driver's one-line refusal): the transaction task crashed. Both are "no watermark" now."""
    commands = {op: ["true"] for op in ("restart", "status", "unfreeze")}
    for printed in (str(2**63), "9" * 5000):
        commands["freeze"] = [sys.executable, "-c", f"print({printed!r})"]
        driver = make_driver(
            driver_section(tmp_path, "exec", commands=commands), "10.0.0.5", tmp_path
        )
        assert isinstance(driver, ExecDriver)
        with pytest.raises(DriverError, match=r"^freeze command printed no watermark: "):
            await driver.freeze(1)
    commands["freeze"] = [sys.executable, "-c", f"print({str(2**63 - 1)!r})"]
    driver = make_driver(driver_section(tmp_path, "exec", commands=commands), "10.0.0.5", tmp_path)
    assert isinstance(driver, ExecDriver)
    assert await driver.freeze(1) == 2**63 - 1
    for value in (2**63, str(2**63), "9" * 5000, -1):
        with pytest.raises(DriverError, match="has no write watermark"):
            drivers._watermark_of({"watermark": value})
    assert drivers._watermark_of({"watermark": 2**63 - 1}) == 2**63 - 1
