"""A managed server that runs as a user of its own (systemd's ``User=praxis``) reads, after
every switch, what the switch gave it (session 39, s39key).

The agent (root) stages a switch's key, certificate, CA and verifier file in
``<config dir>/tlsroll-tls/<rollout>/`` and names them in the new config. They were root's
alone (directories 0700, key 0600): a server of its own user could read its config (kept
``root:praxis 0640`` or ``praxis:praxis 0600`` since session 38) but not the files it names,
so it could not start, and every switch rolled back. Now the files get the access the live
config gives (``nodeagent.plans.Sharing``): its owner and group, its group's read bit (never
more than 0640), the directories the agent's with the config's group, 0710.

The real-process tests run a real agent (systemd driver, a fake ``systemctl`` as in
``test_drivers``) and a real reference server started as uid/gid 65534 (nobody/nogroup): an
enable-tls switch with a password, a rotate-cert, a change-password and disable-tls (the way
back), for a config ``root:nogroup 0640``, one ``nobody:nogroup 0600``, and one changed from
the first to the second between the stage and the switch. They need root (CI runs as root):
the agent chowns, the test starts the server as another user.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import json
import os
import pwd
import shutil
import ssl
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
import structlog.testing

from nodeagent import drivers, plans
from nodeagent.cryptoworker import CryptoWorker
from nodeagent.journal import Journal, Staged, StageNeeds
from nodeagent.service import NodeAgentService
from nodeagent.trust import LeaderTrust
from tests.cluster import AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import RPC_TIMEOUT, Node, TxnView, alive
from tlsroll import fsutil, httpcheck, password, pki
from tlsroll.enums import Change
from tlsroll.errors import UnsafePermissions
from tlsroll.fsutil import check_private_file
from tlsroll.httpcheck import port_open
from tlsroll.names import Names
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE

SERVER_UID = SERVER_GID = 65534  # nobody, nogroup: in /etc/passwd here; never added by a test
UNIT = "praxis-live.service"
REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not ROOT,
    reason="needs root (CI runs as root): the agent chowns the staged files to the config's "
    "owner, and the test starts the reference server as uid 65534",
)

CONTROL = '''#!{python}
"""Fake systemctl: ``restart UNIT`` restarts the node's reference server as its own user."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

S = json.loads({settings!r})


def alive(pid):
    try:
        stat = Path(f"/proc/{{pid}}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def server_pid():
    try:
        return int(Path(S["pid_file"]).read_text())
    except (OSError, ValueError):
        return None


def restart():
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
            [S["python"], "-P", "-m", "refserver", "--config", S["config"]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd="/",
            env={{"PYTHONPATH": S["pythonpath"], "PATH": "/usr/bin:/bin"}},
            user=S["uid"],
            group=S["gid"],
            extra_groups=[],
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # like a Type=notify unit: wait for start-up
        if child.poll() is not None:
            lines = Path(S["server_log"]).read_text(errors="replace").strip().splitlines()
            last = lines[-1] if lines else "no output"
            sys.exit(f"Job for {{S['unit']}} failed: {{last}}")
        if server_pid() == child.pid:
            child.returncode = 0  # detached: it runs on without us
            return
        time.sleep(0.05)
    sys.exit(f"Job for {{S['unit']}} timed out.")


if sys.argv[1:] == ["restart", S["unit"]]:
    restart()
else:
    sys.exit(f"unsupported: {{sys.argv[1:]}}")
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
auth_verifier_file = "$auth_verifier_file"
data_dir = "{data_dir}"
admin_socket = "{admin_socket}"
"""


def _import_roots() -> list[str]:
    """Where this checkout's packages and this interpreter's third-party packages are."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([str(REPO), paths["purelib"], paths["platlib"]]))


def _server_python(roots: list[str] | None = None) -> tuple[str, str] | None:
    """An interpreter uid 65534 may run with tlsroll importable (``python``, ``PYTHONPATH``):
    this one if it may (a virtualenv under /root may not be reachable), else the system's
    Python of the same version with ``roots`` (default: this checkout and this interpreter's
    packages) on its path. None if neither starts ``refserver`` as that user."""
    pythonpath = os.pathsep.join(roots if roots is not None else _import_roots())
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if not os.path.exists(exe):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [exe, "-P", "-c", "import refserver.server"],
                env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"},
                cwd="/",
                user=SERVER_UID,
                group=SERVER_GID,
                extra_groups=[],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                return exe, pythonpath
    return None


def a_verifier(secret: str) -> str:
    """A verifier the server takes without the tests' scrypt hook (its unit's environment is
    its own: ``restart``), at the least N a verifier may have without it."""
    return password.verifier_to_json(
        password.make_verifier(secret, **{**password.TEST_PARAMS, "n": password.MIN_N})
    )


def mode_and_owner(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


@dataclass
class OwnUserNode:
    """A node whose reference server runs as uid/gid 65534, restarted by a fake systemctl."""

    node: Node
    control: Path
    bin_dir: Path
    server_log: Path

    @property
    def config(self) -> Path:
        return self.node.server.config_path

    def restart_server(self) -> None:
        """As systemd at boot: the server started (as its user) before the agent."""
        done = subprocess.run(
            [sys.executable, str(self.control), "restart", UNIT],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr + self.server_log.read_text(errors="replace")

    def server_uid(self) -> int:
        pid = self.node.server_pid()
        assert pid is not None and alive(pid)
        return uid_of(pid)

    def switch(self, rollout_id: str, change: Change, verifier: str = "") -> TxnView:
        with self.node.stub() as stub:
            stub.Switch(
                agent_pb2.SwitchRequest(
                    command=self.node.command(rollout_id),
                    change=CHANGE.wire(change),
                    auth_verifier_json=verifier,
                ),
                timeout=RPC_TIMEOUT,
            )
        return self.node.wait_txn(rollout_id)

    def disable_tls(self, rollout_id: str) -> TxnView:
        with self.node.stub() as stub:
            stub.Rollback(
                agent_pb2.RollbackRequest(command=self.node.command(rollout_id), undoes=""),
                timeout=RPC_TIMEOUT,
            )
        return self.node.wait_txn(rollout_id, "rollback")

    def bootstrap_up(self) -> None:
        """The agent's bootstrap service (9443) serves with the live key (it reads it too)."""
        assert self.node.agent is not None
        wait_until(
            lambda: port_open(self.node.address, 9443, timeout=0.5), 30, "the bootstrap service"
        )
        assert "bootstrap.not_started" not in self.node.agent.event_names()


@contextlib.contextmanager
def _bound_where_the_server_reaches(roots: list[str]) -> Iterator[list[str]]:
    """``roots`` bind-mounted (read-only) under a directory of /tmp uid 65534 may pass
    through: a checkout or virtualenv under /root (0700) is not theirs to reach, wherever CI
    clones. Unmounted at the end."""
    base = Path(tempfile.mkdtemp(prefix="tlsroll-own-user-py-", dir="/tmp"))
    base.chmod(0o755)
    mounted: list[Path] = []
    try:
        for i, root in enumerate(roots):
            target = base / f"p{i}"
            target.mkdir()
            subprocess.run(
                ["mount", "--bind", "-o", "ro", root, str(target)],
                check=True,
                capture_output=True,
                timeout=30,
            )
            mounted.append(target)
        yield [str(t) for t in mounted]
    finally:
        for target in reversed(mounted):
            umount = ["umount", str(target)]
            if subprocess.run(umount, check=False, capture_output=True, timeout=30).returncode:
                subprocess.run(["umount", "-l", str(target)], check=False, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server_python() -> Iterator[tuple[str, str]]:
    if not ROOT:
        pytest.skip("needs root")
    found = _server_python()
    if found is not None:
        yield found
        return
    with _bound_where_the_server_reaches(_import_roots()) as roots:
        found = _server_python(roots)
        if found is None:  # as root (CI) the test must run: say what is missing, never skip
            pytest.fail(
                f"no Python that uid {SERVER_UID} may run with tlsroll importable: "
                f"{sys.executable} (or its directories) is not theirs to run, no "
                f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor} was "
                "found, or this checkout bind-mounted under /tmp did not help"
            )
        yield found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("own-user"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory uid 65534 can pass through (pytest's tmp_path is root's alone, 0700)."""
    base = Path(tempfile.mkdtemp(prefix="tlsroll-own-user-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_user_nodes(
    cluster: Cluster, reachable: Path, server_python: tuple[str, str]
) -> Iterator[list[OwnUserNode]]:
    made: list[OwnUserNode] = []
    try:
        yield made
    finally:
        for n in made:
            with contextlib.suppress(Exception):
                n.node.close()


def own_user_node(
    cluster: Cluster,
    reachable: Path,
    server_python: tuple[str, str],
    made: list[OwnUserNode],
    name: str,
    config_owner: tuple[int, int],
    config_mode: int,
) -> OwnUserNode:
    """A node in ``reachable``: its config ``config_owner`` with ``config_mode`` (the
    directory it is in root's, 0755, as /etc/praxis), the server's data directory and admin
    socket directory the server's user's, the server started as that user."""
    root = reachable / name
    data_dir = root / "server-data"
    node = Node(cluster, name, next_loopback(), root, data_dir=data_dir)
    ctl = root / "ctl"
    bin_dir = ctl / "bin"
    bin_dir.mkdir(parents=True)
    for directory in (data_dir, node.server.admin_socket.parent):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chown(directory, SERVER_UID, SERVER_GID)
    os.chown(node.config_dir, 0, 0)
    node.config_dir.chmod(0o755)
    os.chown(node.server.config_path, *config_owner)
    node.server.config_path.chmod(config_mode)
    python, pythonpath = server_python
    settings = {
        "config": str(node.server.config_path),
        "pid_file": str(data_dir / "refserver.pid"),
        "server_log": str(ctl / "server.log"),
        "unit": UNIT,
        "python": python,
        "pythonpath": pythonpath,
        "uid": SERVER_UID,
        "gid": SERVER_GID,
    }
    control = ctl / "systemctl"
    control.write_text(CONTROL.format(python=sys.executable, settings=json.dumps(settings)))
    control.chmod(0o755)
    template = root / "refserver.toml.tmpl"
    template.write_text(
        TEMPLATE.format(unit=UNIT, data_dir=data_dir, admin_socket=node.server.admin_socket)
    )
    own = OwnUserNode(node, control, ctl, ctl / "server.log")
    (bin_dir / "systemctl").symlink_to(control)
    made.append(own)
    own.restart_server()
    assert own.server_uid() == SERVER_UID
    node.start(
        {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        start_server=False,
        driver="systemd",
        template=template,
        unit=UNIT,
        admin_socket=node.server.admin_socket,
        app_path=node.server.app_path,
        timeout=30,
    )
    return own


def assert_shared(own: OwnUserNode, rollout_id: str, files: tuple[str, ...]) -> None:
    """The shape: ``tlsroll-tls`` and the rollout's directory root's, the config's group,
    0710; each file root's (never the server user's, s39key2 M1) with the config's group,
    0640 (the server reads it by the group), 0600 if the config is root's and its group may
    not read it."""
    st = own.config.stat()
    group_reads = st.st_mode & 0o040 or st.st_uid != 0
    stage = own.node.stage_dir(rollout_id)
    for directory in (stage.parent, stage):
        assert mode_and_owner(directory) == (0o710, 0, st.st_gid), directory
    for name in files:
        want = (0o640 if group_reads else 0o600, 0, st.st_gid)
        assert mode_and_owner(stage / name) == want, name


def assert_completed(done: TxnView, own: OwnUserNode) -> None:
    assert done.outcome == "completed", (done.reason, own.server_log.read_text(errors="replace"))


CONFIGS = {
    "group": ((0, SERVER_GID), 0o640),  # root:nogroup 0640: the server reads it by its group
    "owner": ((SERVER_UID, SERVER_GID), 0o600),  # nobody:nogroup 0600: as its owner
}


@needs_root
@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", ["group", "owner", "changed_after_stage"])
def test_a_server_running_as_its_own_user_reads_every_switch(
    cluster: Cluster,
    reachable: Path,
    server_python: tuple[str, str],
    own_user_nodes: list[OwnUserNode],
    config: str,
) -> None:
    """enable-tls (with a password), rotate-cert, change-password and disable-tls on a real
    agent with a real reference server running as uid/gid 65534; after each the server runs
    (still as its user) on what the switch staged, the agent's bootstrap service serves with
    the same key, and each staged path has the config's access. ``changed_after_stage``: the
    config is ``root:nogroup 0640`` when the first rollout stages and ``nobody:nogroup 0600``
    by its switch: the switch gives the staged files the config's access as it is then.

    Before session 39 the server could not read what the switch named (the stage directory
    root's, 0700): every switch rolled back (``restart: ... Permission denied``)."""
    owner, mode = CONFIGS["group" if config == "changed_after_stage" else config]
    name = f"own-{config.replace('_', '-')}"  # one cluster for the module: a name each
    own = own_user_node(cluster, reachable, server_python, own_user_nodes, name, owner, mode)
    node = own.node
    original = own.config.read_bytes()
    entry = node.post("http", {"n": 1}).json()

    staged = node.stage("own-on")
    if config == "changed_after_stage":
        os.chown(own.config, SERVER_UID, SERVER_GID)
        own.config.chmod(0o600)
    shape = mode_and_owner(own.config)
    done = own.switch("own-on", Change.ENABLE_TLS, a_verifier("first-s3cret"))
    assert_completed(done, own)
    assert node.served_fingerprint() == staged.fingerprint
    assert node.get("https", f"entries/{entry['id']}").status == 200
    assert not node.port_open(8080)
    assert own.server_uid() == SERVER_UID
    assert mode_and_owner(own.config) == shape  # the config kept its access (session 38)
    files = ("server.key", "server.pem", "ca.pem", "auth-verifier.json")
    assert_shared(own, "own-on", files)
    own.bootstrap_up()

    rotated = node.stage("own-rotate")
    assert_shared(own, "own-rotate", ("server.key", "server.pem", "ca.pem"))
    done = own.switch("own-rotate", Change.ROTATE_CERT)
    assert_completed(done, own)
    assert node.served_fingerprint() == rotated.fingerprint != staged.fingerprint
    assert own.server_uid() == SERVER_UID
    own.bootstrap_up()

    done = own.switch("own-password", Change.CHANGE_PASSWORD, a_verifier("second-s3cret"))
    assert_completed(done, own)
    assert_shared(own, "own-password", ("auth-verifier.json",))
    assert node.served_fingerprint() == rotated.fingerprint
    assert own.server_uid() == SERVER_UID
    own.bootstrap_up()

    done = own.disable_tls("own-off")
    assert_completed(done, own)
    assert own.config.read_bytes() == original
    assert mode_and_owner(own.config) == shape
    assert node.get("http", f"entries/{entry['id']}").status == 200
    assert not node.port_open(8443)
    assert own.server_uid() == SERVER_UID
    assert node.admin_status()["listen"] == ["http"]


@needs_root
@pytest.mark.timeout(300)
def test_a_server_of_its_own_user_refuses_a_key_others_may_read(
    cluster: Cluster,
    reachable: Path,
    server_python: tuple[str, str],
    own_user_nodes: list[OwnUserNode],
) -> None:
    """The safety net stays: a staged key others may read (an admin's chmod after the stage)
    is refused by the server of its own user too; the switch rolls back to http and the server
    runs on, as its user. (The agent gives the key the config's access again at the switch's
    plan: the chmod comes after the plan here, through the server's own check.)"""
    own = own_user_node(
        cluster, reachable, server_python, own_user_nodes, "own-loose", (0, SERVER_GID), 0o640
    )
    node = own.node
    original = own.config.read_bytes()
    node.stage("own-loose")
    key = node.stage_dir("own-loose") / "server.key"
    real_restart = own.control.read_text()
    # The admin's chmod comes just before the restart (after the plan gave the key its access).
    own.control.write_text(
        real_restart.replace(
            "def restart():\n",
            f"def restart():\n    os.chmod({str(key)!r}, 0o644)\n",
            1,
        )
    )
    done = own.switch("own-loose", Change.ENABLE_TLS, a_verifier("loose-s3cret"))
    assert done.outcome == "rolled_back", done.reason
    assert "server.key is accessible by others" in done.reason, done.reason
    assert own.config.read_bytes() == original
    assert node.get("http").status == 200
    assert own.server_uid() == SERVER_UID


# --- the shape of every staged path, without processes ------------------------------------------


@dataclass
class ConfigOnly:
    """What ``plans`` needs of a driver here: the config file, and whether its server may run
    as a user of its own (the systemd and exec drivers; not the reference driver)."""

    config_file: Path
    own_user: bool = True


def stage_all(driver: ConfigOnly, rollout_id: str) -> Path:
    """Every file a stage writes, written as the agent writes them."""
    share = plans.sharing(driver)  # type: ignore[arg-type]
    directory = plans.make_stage_dir(driver, rollout_id, share)  # type: ignore[arg-type]
    for name in sorted(plans.STAGE_FILES):
        plans.write_staged(directory / name, name.encode(), share)
    return directory


def shape(directory: Path) -> dict[str, tuple[int, int, int]]:
    paths = [directory.parent, directory, *sorted(directory.iterdir())]
    return {p.name: mode_and_owner(p) for p in paths}


ME = (os.geteuid(), os.getegid())
N = SERVER_GID
NAMES = Names.of("n1", ["127.0.0.1"])


def own_shape(rollout_id: str) -> dict[str, tuple[int, int, int]]:
    """As before session 39: the agent's, 0700 directories, 0600 secrets, 0644 certificates."""
    return {
        "tlsroll-tls": (0o700, *ME),
        rollout_id: (0o700, *ME),
        "auth-verifier.json": (0o600, *ME),
        "ca.pem": (0o644, *ME),
        "server.key": (0o600, *ME),
        "server.pem": (0o644, *ME),
    }


def shared_shape(rollout_id: str, uid: int, gid: int, mode: int) -> dict[str, tuple[int, int, int]]:
    return {
        "tlsroll-tls": (0o710, ME[0], gid),
        rollout_id: (0o710, ME[0], gid),
        **{name: (mode, uid, gid) for name in plans.STAGE_FILES},
    }


@needs_root
@pytest.mark.parametrize(
    ("owner", "mode", "own_user", "want"),
    [
        (ME, 0o600, True, "own"),  # the common case: nothing changes
        (ME, 0o644, True, "own"),  # the agent's user and group: others never get anything
        ((0, N), 0o640, True, (0, N, 0o640)),
        ((0, N), 0o600, True, (0, N, 0o600)),  # the group passes, may not read
        # never the server user's (it could rewrite what the root bootstrap service serves):
        # root's, read by the group (s39key2 M1)
        ((N, N), 0o600, True, (0, N, 0o640)),
        ((N, N), 0o660, True, (0, N, 0o640)),  # never more than 0640
        ((N, N), 0o666, True, (0, N, 0o640)),
        ((0, N), 0o604, True, (0, N, 0o600)),  # others' bits never passed on
        ((0, N), 0o640, False, "own"),  # the reference driver: its server runs as the agent
    ],
)
def test_every_staged_path_gets_the_access_the_config_gives(
    tmp_path: Path,
    owner: tuple[int, int],
    mode: int,
    own_user: bool,
    want: str | tuple[int, int, int],
) -> None:
    config = tmp_path / "etc" / "praxis.toml"
    config.parent.mkdir()
    config.write_bytes(b"[server]\n")
    os.chown(config, *owner)
    config.chmod(mode)
    driver = ConfigOnly(config, own_user)
    directory = stage_all(driver, "r1")
    expected = own_shape("r1") if isinstance(want, str) else shared_shape("r1", *want)
    assert shape(directory) == expected
    # The agent reads the key it staged (Stage, the bootstrap service) as the config shares it.
    check_private_file(directory / "server.key", shared=plans.sharing(driver).reader)  # type: ignore[arg-type]


@needs_root
def test_the_agent_takes_a_staged_key_only_as_the_config_shares_it(tmp_path: Path) -> None:
    """``check_private_file(shared=(uid, gid))`` (Stage reading the key CreateCSR made, the
    bootstrap service serving the live key): the key must be ours (never the server's user's:
    s39key2 M1) and may be readable by the config's group, nothing more; with no one to
    share with (the agent's own config) the rule is as before: ours alone."""
    key = tmp_path / "server.key"
    key.write_bytes(b"k")
    other = SERVER_GID - 1
    cases = [
        (None, (0, 0), 0o600, None),
        (None, (0, N), 0o640, "accessible by others"),  # not shared: as before
        (None, (N, N), 0o600, "owned by"),
        ((0, N), (0, N), 0o640, None),  # root:nogroup 0640
        ((0, N), (0, other), 0o640, "accessible by others"),  # another group may not read
        ((0, N), (0, N), 0o660, "accessible by others"),  # nor write
        ((0, N), (0, N), 0o644, "accessible by others"),
        ((N, N), (N, N), 0o600, "owned by"),  # the server user's: it could rewrite it
        ((N, N), (N, N), 0o640, "owned by"),
        ((N, N), (0, N), 0o640, None),  # what a nobody:nogroup config now gets
        ((N, N), (other, N), 0o600, "owned by"),  # another user's
    ]
    for shared, owner, mode, refused in cases:
        os.chown(key, *owner)
        key.chmod(mode)
        if refused is None:
            check_private_file(key, shared=shared)
        else:
            with pytest.raises(UnsafePermissions, match=refused):
                check_private_file(key, shared=shared)


@needs_root
def test_a_switch_catches_up_with_a_config_whose_access_changed_since_the_stage(
    tmp_path: Path,
) -> None:
    """``plans.share_named`` (every switch's plan): the files the new config names get the
    access the config gives now, their directories too; back to the agent's own config, they
    are the agent's again. A file it does not name, or one outside a stage directory, is left
    as it is; one that is gone is skipped (a way back is never refused for it)."""
    config = tmp_path / "etc" / "praxis.toml"
    config.parent.mkdir()
    config.write_bytes(b"[server]\n")
    config.chmod(0o600)
    driver = ConfigOnly(config)
    directory = stage_all(driver, "r1")
    other = stage_all(driver, "r2")
    outside = tmp_path / "etc" / "server.key"
    outside.write_bytes(b"k")
    outside.chmod(0o600)
    named = [directory / name for name in sorted(plans.STAGE_FILES)]

    os.chown(config, SERVER_UID, SERVER_GID)
    plans.share_named(driver, [*named, outside, directory / "gone.pem", None])  # type: ignore[arg-type]
    assert shape(directory) == shared_shape("r1", 0, SERVER_GID, 0o640)  # never the server's
    assert shape(other)["server.key"] == (0o600, *ME)  # not named: as it was
    assert mode_and_owner(outside) == (0o600, *ME)

    os.chown(config, 0, SERVER_GID)
    config.chmod(0o640)
    plans.share_named(driver, named)  # type: ignore[arg-type]
    assert shape(directory) == shared_shape("r1", 0, SERVER_GID, 0o640)

    os.chown(config, *ME)
    config.chmod(0o600)
    plans.share_named(driver, named)  # type: ignore[arg-type]
    back = shape(directory)
    files = {k: v for k, v in back.items() if k in plans.STAGE_FILES}
    assert files == {k: v for k, v in own_shape("r1").items() if k in plans.STAGE_FILES}
    # The directories are left their group: the rollout's, 0700 again, lets nobody else in
    # (tlsroll-tls, 0710, only lets its group pass to the directories in it).
    assert back["r1"] == (0o700, ME[0], SERVER_GID)
    assert back["tlsroll-tls"] == (0o710, ME[0], SERVER_GID)


@needs_root
def test_shared_stage_directories_are_still_recognised_and_removed(tmp_path: Path) -> None:
    """``remove_stages`` and ``sweep_stage_dirs`` still know a shared stage directory (the
    agent's, group nogroup, 0710, its files nobody's) for one of tlsroll's and remove it; a
    shared ``tlsroll-tls`` is still refused if others may write it."""
    config = tmp_path / "etc" / "praxis.toml"
    config.parent.mkdir()
    config.write_bytes(b"[server]\n")
    os.chown(config, SERVER_UID, SERVER_GID)
    driver = ConfigOnly(config)
    one = stage_all(driver, "r1")
    two = stage_all(driver, "r2")
    root = one.parent
    assert plans._stage_dir_of(one, os.lstat(root))
    plans.remove_stages([a_staged("r1", one)], "a test")
    assert not one.exists()

    class Journal:
        def stage_needs(self) -> StageNeeds:
            return StageNeeds(frozenset(), frozenset(), (), None, frozenset())

    class Driver(ConfigOnly):
        def read_config(self) -> bytes:
            return self.config_file.read_bytes()

    plans.sweep_stage_dirs(Journal(), Driver(config))  # type: ignore[arg-type]
    assert not two.exists()

    root.chmod(0o730)  # the group may write: it could swap a directory after the check
    with pytest.raises(UnsafePermissions, match="writable by group or others"):
        stage_all(driver, "r3")
    assert not (root / "r3").exists()


def a_staged(rollout_id: str, directory: Path) -> Staged:
    return Staged(rollout_id, directory / "server.key", b"", None, None, None, None)


@needs_root
def test_a_server_of_its_own_user_takes_roots_key_its_group_may_read(
    tmp_path: Path, reachable: Path, server_python: tuple[str, str]
) -> None:
    """``check_private_file(root_shares=True)``, the reference server's key check: a server
    not running as root takes a key root keeps and lets its group read (0640, as PostgreSQL
    does), never one others may read nor one of another user's; a server running as root
    checks as before (its key its own alone)."""
    key_dir = reachable / "keys"
    key_dir.mkdir(mode=0o755)
    key = key_dir / "server.key"
    key.write_bytes(b"k")
    python, pythonpath = server_python
    check = (
        "import sys; from pathlib import Path; from tlsroll.fsutil import check_private_file\n"
        "from tlsroll.errors import UnsafePermissions\n"
        "try:\n    check_private_file(Path(sys.argv[1]), root_shares=True)\n"
        "except UnsafePermissions as exc:\n    sys.exit(str(exc))\n"
    )

    def as_server() -> str:
        done = subprocess.run(
            [python, "-P", "-c", check, str(key)],
            env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"},
            cwd="/",
            user=SERVER_UID,
            group=SERVER_GID,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.stderr.strip() if done.returncode else "ok"

    for owner, mode, want in [
        ((0, SERVER_GID), 0o640, "ok"),
        ((0, SERVER_GID), 0o600, "ok"),
        ((0, SERVER_GID), 0o644, "accessible by others"),
        ((0, SERVER_GID), 0o660, "accessible by others"),
        ((SERVER_UID, SERVER_GID), 0o600, "ok"),
        ((SERVER_UID, SERVER_GID), 0o640, "accessible by others"),  # its own: alone
        ((1, SERVER_GID), 0o640, "owned by"),
    ]:
        os.chown(key, *owner)
        key.chmod(mode)
        assert want in as_server(), (owner, oct(mode))
    os.chown(key, 0, SERVER_GID)
    key.chmod(0o640)
    with pytest.raises(UnsafePermissions, match="accessible by others"):
        check_private_file(key, root_shares=True)  # the server as root: as before


# --- s39key2: the server's user never steers the root agent ----------------------------------


def test_a_safe_config_directory_is_checked_without_a_user_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the config directory's check (at a stage, and again as a switch takes what
    its stage prepared) looked up the agent's user name in the passwd database every time,
    for an answer it gives only when the directory is unsafe. It still names the user then."""
    lookups: list[int] = []
    real = pwd.getpwuid

    def counted(uid: int) -> Any:
        lookups.append(uid)
        return real(uid)

    monkeypatch.setattr(pwd, "getpwuid", counted)  # the module tlsroll.fsutil asks
    config_dir = tmp_path / "conf"
    config_dir.mkdir(mode=0o755)
    assert fsutil.config_dir_problem(config_dir) is None
    assert lookups == []
    config_dir.chmod(0o777)
    problem = fsutil.config_dir_problem(config_dir)
    name = real(os.geteuid()).pw_name
    assert problem is not None and f"run: chown {name} {config_dir}; chmod go-w" in problem
    assert lookups


@needs_root
def test_a_config_directory_the_servers_user_can_write_refuses_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H1 (review s39rev2): the config in a directory the server's user owns (PostgreSQL's
    data directory): between the agent's checks and ``give_file`` that user renames
    ``tlsroll-tls`` away and puts a directory of its own there, ``r1`` a link to another
    service's key directory. The agent now refuses to share (or stage, or write the config)
    in such a directory: the other service's key stays root's. Before: chowned to uid 65534."""
    tmp_path.chmod(0o755)
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    config = pgdata / "server.conf"
    config.write_bytes(b"x")
    os.chown(config, SERVER_UID, SERVER_GID)
    config.chmod(0o600)
    victim_dir = tmp_path / "othersvc"
    victim_dir.mkdir(mode=0o755)
    victim = victim_dir / "server.key"
    victim.write_bytes(b"another service's key")
    victim.chmod(0o600)
    driver = ConfigOnly(config)
    share = plans.sharing(driver)  # type: ignore[arg-type]
    staged = plans.make_stage_dir(driver, "r1", share) / "server.key"  # type: ignore[arg-type]
    plans.write_staged(staged, b"k", share)
    os.chown(pgdata, SERVER_UID, SERVER_GID)  # the data directory is the server's user's
    # what uid 65534 can do in its own directory (done for it here, at the worst moment)
    fake = pgdata / "fake"
    fake.mkdir()
    os.chown(fake, SERVER_UID, SERVER_GID)
    os.symlink(victim_dir, fake / "r1")
    real_make = fsutil.make_private_dir

    def make_then_swap(*args: object, **kwargs: object) -> Path:
        made = real_make(*args, **kwargs)  # type: ignore[arg-type]
        os.rename(pgdata / "tlsroll-tls", pgdata / "real")
        os.rename(fake, pgdata / "tlsroll-tls")
        return made

    monkeypatch.setattr(plans, "make_private_dir", make_then_swap)
    with pytest.raises(UnsafePermissions, match=rf"{pgdata} is owned by nobody") as refused:
        plans.share_named(driver, [staged])  # type: ignore[arg-type]
    assert f"run: chown root {pgdata}; chmod go-w {pgdata}" in str(refused.value)
    assert mode_and_owner(victim) == (0o600, 0, 0)
    assert victim.read_bytes() == b"another service's key"
    # Nothing else is written there either: a stage, a staged file, the config.
    monkeypatch.undo()
    with pytest.raises(UnsafePermissions, match="owned by nobody"):
        plans.make_stage_dir(driver, "r2", share)  # type: ignore[arg-type]
    with pytest.raises(UnsafePermissions, match="owned by nobody"):
        plans.write_staged(staged, b"k2", share)
    with pytest.raises(UnsafePermissions, match="owned by nobody"):
        SystemdLike(config).stage_config(b"y")  # type: ignore[abstract]
    assert staged.read_bytes() == b"k" and config.read_bytes() == b"x"
    assert sorted(p.name for p in pgdata.iterdir()) == ["fake", "server.conf", "tlsroll-tls"]
    # A directory writable by its group (root's, 0775) is refused as well; 0755 passes.
    os.chown(pgdata, 0, 0)
    pgdata.chmod(0o775)
    with pytest.raises(UnsafePermissions, match="writable by group or others"):
        plans.make_stage_dir(driver, "r2", share)  # type: ignore[arg-type]
    pgdata.chmod(0o755)
    plans.make_stage_dir(driver, "r2", share)  # type: ignore[arg-type]


class SystemdLike(drivers.Driver):
    """A driver writing its config the common way (``Driver.write_config``); only its
    ``stage_config`` is called."""

    def __init__(self, config_file: Path) -> None:
        self.config_file = config_file


SystemdLike.__abstractmethods__ = frozenset()  # the rest is never called here


@needs_root
def test_a_link_planted_at_a_temporary_name_is_never_followed(tmp_path: Path) -> None:
    """H2 (session 38, s39rev2): ``stage_atomic`` opened its guessable ``.NAME.staged-PID-N``
    with ``O_CREAT|O_TRUNC``: a link planted there made root truncate, write and chown its
    target. Now the name is random and the file created new (``O_EXCL|O_NOFOLLOW``); a name
    given (``write_atomic``'s once, the workstation's settings) that exists is replaced, the
    link itself, never followed."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    config = config_dir / "server.conf"
    config.write_bytes(b"old")
    target = tmp_path / "target"
    target.write_bytes(b"root's file")
    target.chmod(0o600)
    pid = os.getpid()
    planted = [config_dir / f".server.conf.staged-{pid}-{n}" for n in range(1, 200)] + [
        config_dir / f".server.conf.tmp-{pid}"
    ]
    for link in planted:
        link.symlink_to(target)
    staged = fsutil.stage_atomic(config, b"NEW", 0o640, owner=(SERVER_UID, SERVER_GID))
    assert staged not in planted and staged.read_bytes() == b"NEW"
    fsutil.write_atomic(config, b"NEWER", 0o640, (SERVER_UID, SERVER_GID))
    given = fsutil.stage_atomic(config, b"GIVEN", 0o600, planted[0].name)
    assert given == planted[0] and not given.is_symlink() and given.read_bytes() == b"GIVEN"
    assert config.read_bytes() == b"NEWER"
    assert target.read_bytes() == b"root's file"
    assert mode_and_owner(target) == (0o600, 0, 0)


@needs_root
def test_give_file_narrows_the_mode_before_it_changes_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L2: a file ``give_file`` hands to a new group is never, even for a moment, readable by
    that group with its old mode: the mode is narrowed to owner bits before the chown."""
    path = tmp_path / "server.key"
    path.write_bytes(b"k")
    path.chmod(0o644)
    seen: list[int] = []
    real = os.fchown

    def fchown(fd: int, uid: int, gid: int) -> None:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real(fd, uid, gid)

    monkeypatch.setattr(os, "fchown", fchown)
    fsutil.give_file(path, 0o640, (0, SERVER_GID))
    assert seen == [0o600]
    assert mode_and_owner(path) == (0o640, 0, SERVER_GID)


@needs_root
def test_a_group_with_other_members_reading_the_secrets_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M2: the verifier file (password-equivalent) and the key are readable by the config's
    group; a group that lists members (``root:adm 0640``: every admin) is warned of, with its
    name and members; one of the server's alone (no members listed), and a certificate, not."""
    config = tmp_path / "etc" / "praxis.toml"
    config.parent.mkdir()
    config.write_bytes(b"[server]\n")
    os.chown(config, 0, N)
    config.chmod(0o640)
    driver = ConfigOnly(config)
    real = grp.getgrgid
    members: list[str] = []

    def getgrgid(gid: int) -> grp.struct_group:
        got = real(gid)
        return grp.struct_group((got.gr_name, got.gr_passwd, got.gr_gid, members))

    monkeypatch.setattr(grp, "getgrgid", getgrgid)  # nodeagent.sharing calls grp.getgrgid
    with structlog.testing.capture_logs() as alone:
        stage_all(driver, "r1")
    assert [e for e in alone if e["event"] == "stage.group_shares_secrets"] == []
    members[:] = ["alice", "bob"]
    with structlog.testing.capture_logs() as wide:
        stage_all(driver, "r2")
    said = [e for e in wide if e["event"] == "stage.group_shares_secrets"]
    assert sorted(Path(e["file"]).name for e in said) == ["auth-verifier.json", "server.key"]
    assert {(e["group"], e["members"]) for e in said} == {(real(N).gr_name, "alice,bob")}


class Aborted(Exception):
    """What ``FakeContext.abort`` raises: the gRPC status a servicer answered with."""


class FakeContext:
    """The servicer's context, as far as ``map_errors`` uses it: ``abort`` raises."""

    async def abort(self, code: object, details: str) -> None:
        raise Aborted(code, details)


@pytest.mark.open_keys  # (the staged key root:N 0640 on purpose: the config's group reads it)
@needs_root
async def test_a_refused_certificate_leaves_the_staged_keys_access_as_it_was(
    tmp_path: Path, test_ca: pki.CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s41 rev2, Low 1: Stage gave the staged key the live config's access (its group,
    0640: the config's group had changed since CreateCSR) before any certificate check, and a
    certificate Stage then refused (another CA's) had changed the key anyway. Review s42 of
    the lean child, Low 1: so had one of the cluster CA's for another key, with other names,
    not valid at the node's clock (10 years ahead: the reviewer's case), or a CA the TLS
    library refuses. Every check that needs no key read comes first now (the key's match
    against the journalled CSR's public key); a certificate of the cluster CA's for the key
    is staged, the key given the config's access on the way."""
    config = tmp_path / "etc" / "praxis.toml"
    config.parent.mkdir()
    config.write_bytes(b"[server]\n")
    driver = ConfigOnly(config)
    # CreateCSR's key, staged while the config was the agent's alone: root:root 0600.
    stage = plans.make_stage_dir(driver, "r1", plans.sharing(driver))  # type: ignore[arg-type]
    key_file = stage / "server.key"
    key = pki.generate_key()
    pki.write_key(key_file, key)
    csr = pki.make_csr(key, NAMES)
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.record_csr("r1", key_file, pki.csr_to_pem(csr))
    os.chown(config, 0, N)  # the config's access changed since: root:nogroup 0640
    config.chmod(0o640)
    crypto = CryptoWorker()
    skew = [dt.timedelta(0)]  # the node's clock, ahead of the real one by this
    agent = NodeAgentService(
        cast(Any, SimpleNamespace(names=NAMES, ca_pin=pki.spki_pin(test_ca.cert))),
        cast(Any, None),
        journal,
        cast(Any, driver),
        None,
        lambda: dt.datetime.now(dt.UTC) + skew[0],
        trust=LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem"),
        crypto=crypto,
    )

    async def command(_context: object, command: agent_pb2.Command, **_: object) -> str:
        return command.rollout_id  # the leader's call admitted (not what this test is about)

    monkeypatch.setattr(agent, "_command", command)
    monkeypatch.setattr(agent, "_prepare", lambda *_args: None)  # no switch made ready here

    def stage_request(cert: bytes, ca: bytes) -> agent_pb2.StageRequest:
        return agent_pb2.StageRequest(
            command=agent_pb2.Command(rollout_id="r1", epoch=1),
            certificate_pem=cert,
            ca_certificate_pem=ca,
        )

    other_ca = pki.CertificateAuthority.create("not the cluster CA")
    foreign = pki.cert_to_pem(other_ca.sign_csr(csr, NAMES, server=True, client=False))
    # An earlier CSR's certificate (another key), and one for this key with other names.
    earlier = pki.make_csr(pki.generate_key(), NAMES)
    other_key = pki.cert_to_pem(test_ca.sign_csr(earlier, NAMES, server=True, client=False))
    other_names = Names.of("n2", ["127.0.0.2"])
    renamed = pki.cert_to_pem(test_ca.issue(key.public_key(), other_names, server=True))
    right = pki.cert_to_pem(test_ca.sign_csr(csr, NAMES, server=True, client=False))
    # One for this key and these names, kept apart from its SAN (an agent's kind: review s59
    # L5, ``names_of`` reads them there, and it would have served none of them).
    apart = pki.cert_to_pem(
        test_ca.issue(key.public_key(), NAMES, internal_dns=["k.node.t.invalid"], names_apart=True)
    )
    real_trusting = httpcheck.trusting

    def refusing(ca_pem: bytes) -> ssl.SSLContext:
        raise ssl.SSLError("[X509] the test's refusal")

    changed = []  # the refusals that changed the key's access (each put back, to see all)
    try:
        for cert, ca, refusal, ahead, tls_refuses in [
            (foreign, test_ca.cert_pem, "not issued by the cluster CA", 0, False),
            (foreign, other_ca.cert_pem, "pin mismatch", 0, False),
            (b"not a certificate", test_ca.cert_pem, "certificate", 0, False),
            (other_key, test_ca.cert_pem, "does not match the staged key", 0, False),
            (renamed, test_ca.cert_pem, "names differ from this node's names", 0, False),
            (apart, test_ca.cert_pem, "serves none of this node's names", 0, False),
            (right, test_ca.cert_pem, "expired or not yet valid", 3653, False),
            (right, test_ca.cert_pem, "expired or not yet valid", -1, False),
            (right, test_ca.cert_pem, "the TLS library refuses the CA certificate", 0, True),
        ]:
            skew[0] = dt.timedelta(days=ahead)
            monkeypatch.setattr(httpcheck, "trusting", refusing if tls_refuses else real_trusting)
            with pytest.raises(Aborted, match=refusal) as aborted:
                await agent.Stage(stage_request(cert, ca), cast(Any, FakeContext()))
            assert aborted.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT
            if mode_and_owner(key_file) != (0o600, 0, 0):  # as it was
                changed.append(refusal)
                os.chown(key_file, 0, 0)
                key_file.chmod(0o600)
        assert changed == []
        skew[0] = dt.timedelta(0)
        monkeypatch.setattr(httpcheck, "trusting", real_trusting)
        staged = await agent.Stage(stage_request(right, test_ca.cert_pem), cast(Any, FakeContext()))
        assert staged.fingerprint == pki.fingerprint(pki.load_cert_pem(right))
        assert mode_and_owner(key_file) == (0o640, 0, N)  # the config's access, once checked
    finally:
        await crypto.close()
        journal.close()
