"""The edges of the daemons, tried as a local attacker would (real processes throughout):
private store files, the audit actor from the kernel, the reference server's socket directory,
and secret files and inline secrets in configs.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.cluster import Cluster, Daemon, child_env, one_line_error
from tests.conftest import next_loopback
from tests.refserver_helper import RefServer
from tlsroll import fsutil
from tlsroll.fsutil import SHARED_SYSTEM_DIRS, _shared_dir, peer_credentials, socket_dir_problem
from tlsroll.v1 import admin_pb2, admin_pb2_grpc

# Public by design: certificates, the leader's config (paths and ports, no secret), the socket
# and run directory meant for the admin group, and what the tests themselves write.
PUBLIC_NAMES = {"ca.pem", "leader.pem", "viewer.pem", "node.pem", "leader.toml", "refserver.pid"}


def readable_by_others(root: Path) -> list[str]:
    """Every file under ``root`` (not a public one) that group or others may read or write."""
    found = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode) or stat.S_ISSOCK(st.st_mode) or path.name in PUBLIC_NAMES:
            continue
        if st.st_mode & 0o077:
            found.append(f"{path.relative_to(root)} {stat.S_IMODE(st.st_mode):04o}")
    return found


# --- 1. every store file 0600 -------------------------------------------------------------------


def test_store_files_of_leader_agent_and_refserver_are_private(tmp_path: Path) -> None:
    """Daemons started with umask 000 (the loosest an operator could give them): the leader,
    an agent and a reference server create their SQLite files and ``-wal``/``-shm`` 0600, and
    nothing else in their data directories is open to group or others."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        old = os.umask(0)  # inherited by the daemons, not by the files the test writes
        try:
            c.start_leader()
        finally:
            os.umask(old)
        agent = c.add_agent("node1", next_loopback(), token_file=True, start=False)
        ref = RefServer(tmp_path / "ref", next_loopback())
        old = os.umask(0)
        try:
            agent.start()
            ref.start()
        finally:
            os.umask(old)
        try:
            c.wait_for_nodes_online(["node1"])
            assert c.cli("nodes").returncode == 0  # a command: the store is read and written
            assert ref.request("POST", "entries", {"x": 1}).status == 201
            ref.freeze()
            stores = {
                c.store_path: c.data_dir,
                agent.data_dir / "journal.sqlite3": agent.data_dir,
                ref.data_dir / "entries.sqlite3": ref.data_dir,
            }
            for store in stores:
                for suffix in ("", "-wal", "-shm"):
                    path = Path(f"{store}{suffix}")
                    assert path.exists(), path
                    assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            for data_dir in stores.values():
                assert readable_by_others(data_dir) == [], data_dir
        finally:
            ref.close()


# --- 2. the audit actor is the kernel's, not the client's ---------------------------------------

FORGING_CLIENT = textwrap.dedent(
    """
    import os, sys, grpc
    from tlsroll.v1 import admin_pb2, admin_pb2_grpc
    if len(sys.argv) > 3:  # become that user (group root) once everything is imported
        os.setgroups([])
        os.setgid(0)
        os.setuid(int(sys.argv[3]))
    with grpc.insecure_channel("unix:" + sys.argv[1]) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).CreateViewerGrant(
            admin_pb2.CreateViewerGrantRequest(name=sys.argv[2], ttl_seconds=600),
            metadata=(("x-tlsroll-user", "dr-mueller"),),
            timeout=10,
        )
    print(reply.info.id)
    """
)


def grant_actor(cluster: Cluster, grant_id: str) -> list[str]:
    db = sqlite3.connect(f"{cluster.store_path.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT actor FROM audit WHERE kind = 'viewer_grant.created' AND subject = ?",
            (grant_id,),
        ).fetchall()
    finally:
        db.close()
    return [r[0] for r in rows]


@pytest.fixture(scope="module")
def leader() -> Iterator[Cluster]:
    # Not under pytest's tmp dir (0700): other users must reach the admin socket's directory.
    root = Path(tempfile.mkdtemp(prefix="tlsroll-edges-"))
    root.chmod(0o711)
    try:
        with Cluster(root, next_loopback()) as c:
            c.init()
            c.start_leader()
            yield c
    finally:
        shutil.rmtree(root, ignore_errors=True)


def forge(cluster: Cluster, name: str, uid: int | None = None) -> str:
    """Create a viewer grant with a forged ``x-tlsroll-user`` header, as ``uid`` (with group
    root: the admin socket is 0660 root:root) if given; the grant's id."""
    result = subprocess.run(
        [sys.executable, "-c", FORGING_CLIENT, str(cluster.admin_socket), name]
        + ([] if uid is None else [str(uid)]),
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_actor_is_the_socket_peer_not_the_header(leader: Cluster) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    assert grant_actor(leader, forge(leader, "forged")) == [f"admin:{me}"]


@pytest.mark.skipif(os.getuid() != 0, reason="runs a client as other users (CI runs as root)")
def test_actor_of_another_user_and_of_a_uid_without_a_name(leader: Cluster) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    assert grant_actor(leader, forge(leader, "as nobody", nobody)) == ["admin:nobody"]
    nameless = next(u for u in range(54321, 60000) if not _has_name(u))
    assert grant_actor(leader, forge(leader, "nameless", nameless)) == [f"admin:uid={nameless}"]


def _has_name(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_the_grpc_server_behind_the_socket_refuses_direct_callers(leader: Cluster) -> None:
    """The relay's backend is an abstract socket anyone can find in /proc/net/unix; a call that
    does not come through the relay is refused before any servicer runs."""
    pid = str(leader.leader.pid)
    names = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith(f"@tlsroll-admin-{pid}-"):
            names.append(fields[7][1:])
    (backend,) = set(names)
    channel = grpc.insecure_channel(f"unix-abstract:{backend}")
    with channel, pytest.raises(grpc.RpcError) as info:
        admin_pb2_grpc.AdminStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # and the admin socket itself still answers
    assert leader.cli("viewer", "list", "--json").returncode == 0
    assert json.loads(leader.cli("viewer", "list", "--json").stdout) is not None


# --- 3. the reference server's socket directory --------------------------------------------------


def refserver_error(err: str) -> str:
    """The one error line a refused reference server printed (JSON log lines may precede it)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("tlsroll-refserver: ")]
    assert len(errors) == 1, err
    assert err.splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.fixture
def socket_dirs() -> Iterator[Path]:
    """A root for socket directories outside pytest's tmp dir (sun_path is short)."""
    root = Path(tempfile.mkdtemp(prefix="trs-edges-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_refserver_refuses_a_socket_directory_others_can_write(
    tmp_path: Path, socket_dirs: Path
) -> None:
    shared = socket_dirs / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    ref = RefServer(tmp_path / "ref", next_loopback(), admin_socket=shared / "admin.sock")
    try:
        code, err = ref.run_to_exit()
    finally:
        ref.close()
    assert code == 1
    line = refserver_error(err)
    assert "admin_socket directory" in line and "writable by group or others" in line
    assert not (shared / "admin.sock").exists()


def test_refserver_refuses_tmp_itself_as_the_socket_directory(tmp_path: Path) -> None:
    sock = Path(f"/tmp/trs-edges-{os.getpid()}-{secrets.token_hex(4)}.sock")
    ref = RefServer(tmp_path / "ref", next_loopback(), admin_socket=sock)
    try:
        code, err = ref.run_to_exit()
    finally:
        ref.close()
        bound = sock.exists()
        sock.unlink(missing_ok=True)
    assert code == 1
    line = refserver_error(err)
    assert "admin_socket directory" in line and "use a directory of its own" in line
    assert "chmod" not in line  # review s66 L3: a root server was told to chmod 700 /tmp
    assert not bound


@pytest.mark.parametrize("mode", [0o1777, 0o2775])
def test_a_shared_socket_directory_is_not_to_be_chmodded(socket_dirs: Path, mode: int) -> None:
    """A sticky directory (as /tmp) or one a group shares (setgid, as /var/mail) is not the
    server's to chmod 700: only "use a directory of its own" is advised (review s66 L3); a
    directory of the server's own that others may write is still to be chmodded."""
    shared = socket_dirs / "shared"
    shared.mkdir()
    shared.chmod(mode)
    problem = socket_dir_problem(shared)
    assert problem is not None and "use a directory of its own" in problem, problem
    assert "chmod" not in problem, problem
    shared.chmod(0o777)
    assert f"run: chmod 700 {shared}" in str(socket_dir_problem(shared))


def _stats_counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``os.stat`` and ``os.lstat`` calls made from now on, by name."""
    calls: list[str] = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    return calls


@pytest.mark.parametrize("check", ["socket", "config"])
def test_a_directorys_check_walks_its_path_once(
    socket_dirs: Path, monkeypatch: pytest.MonkeyPatch, check: str
) -> None:
    """Issue 15 (s72 agentcpu): the check of a socket's or a config's directory (four in each
    switch: the prepared switch's config directory, then one for each of its three admin
    calls) walked the path three times: an ``lstat`` of each part for links, the path's
    resolution (``realpath``, an ``lstat`` of each part again) and a ``stat`` of the directory
    and of each one above it, 21 calls for a directory six deep. With no link on the way the
    first walk says it all: one ``lstat`` a part, and the same answers."""
    safe = socket_dirs / "a" / "b"
    safe.mkdir(parents=True, mode=0o700)
    parts = len(safe.parents) + 1
    problem = fsutil.socket_dir_problem if check == "socket" else fsutil.config_dir_problem
    calls = _stats_counted(monkeypatch)
    assert problem(safe) is None
    assert calls == ["lstat"] * parts
    safe.chmod(0o770)
    calls.clear()
    assert "writable by group or others (mode 0770)" in str(problem(safe))
    assert len(calls) == parts
    safe.chmod(0o700)
    (socket_dirs / "a").chmod(0o777)  # a directory above that anyone may rename away
    calls.clear()
    said = str(problem(safe))
    assert f"{socket_dirs / 'a'} (above {safe}) is writable by group or others" in said, said
    assert len(calls) == parts


@pytest.mark.parametrize("check", ["socket", "config"])
def test_a_directory_reached_through_a_link_is_judged_where_it_is(
    socket_dirs: Path, check: str
) -> None:
    """A link on the way (ours) is followed: the directory is judged at its real path, and so
    is every directory above that one, not above the link (the walk's shortcut is only for a
    path with no link at all)."""
    problem = fsutil.socket_dir_problem if check == "socket" else fsutil.config_dir_problem
    open_above = socket_dirs / "open"
    real = open_above / "real"
    real.mkdir(parents=True, mode=0o700)
    open_above.chmod(0o777)  # not sticky: ``real`` could be renamed away
    link = socket_dirs / "link"
    link.symlink_to(real)
    said = str(problem(link))
    assert f"{open_above} (above {real}) is writable by group or others" in said, said
    open_above.chmod(0o755)
    assert problem(link) is None
    real.chmod(0o777)
    assert f"{real} is writable by group or others" in str(problem(link))


@pytest.mark.skipif(os.getuid() != 0, reason="another user's link needs root (CI runs as root)")
@pytest.mark.parametrize("check", ["socket", "config"])
def test_a_link_of_another_users_on_the_way_is_refused(socket_dirs: Path, check: str) -> None:
    """A symbolic link on the way that another user owns (who could point it elsewhere) is
    refused, wherever it is on the path, even when the directory it leads to is safe."""
    problem = fsutil.socket_dir_problem if check == "socket" else fsutil.config_dir_problem
    real = socket_dirs / "real"
    (real / "inner").mkdir(parents=True, mode=0o700)
    link = socket_dirs / "link"
    link.symlink_to(real)
    os.lchown(link, 65534, 65534)
    for target in (link, link / "inner"):
        said = str(problem(target))
        assert f"{link} is a symbolic link owned by" in said, (target, said)


def test_a_servers_own_directory_two_levels_below_root_is_still_to_be_chmodded() -> None:
    """Only the system's shared directories are spared the chmod advice: a directory of the
    server's own two levels below / (/run/tlsroll, /srv/refserver) that others may write was
    taken for the system's, for its depth alone, and not advised the chmod that fixes it
    (review rvb L2)."""
    own = Path(f"/run/trs-edges-{os.getpid()}-{secrets.token_hex(4)}")
    own.mkdir(mode=0o700)
    try:
        own.chmod(0o777)
        problem = socket_dir_problem(own)
    finally:
        own.rmdir()
    assert f"run: chmod 700 {own}" in str(problem), problem


def test_the_systems_shared_directories_are_known_by_name(socket_dirs: Path) -> None:
    """The system's shared directories (/, a directory right below it, /var/tmp, /dev/shm,
    /run...) are spared the chmod advice even where their mode is neither sticky nor setgid;
    a directory of the server's own below them is not (review rvb L2). Judged on the stat of
    a directory writable by all, neither sticky nor setgid."""
    plain = socket_dirs / "plain"
    plain.mkdir()
    plain.chmod(0o777)
    st = os.stat(plain)
    for shared in [Path("/"), Path("/home"), Path("/var"), *SHARED_SYSTEM_DIRS]:
        assert _shared_dir(shared, st), shared
    for own in ("/run/tlsroll", "/srv/refserver", "/var/lib/tlsroll", "/tmp/tlsroll"):
        assert not _shared_dir(Path(own), st), own


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root (CI runs as root)")
def test_refserver_refuses_a_socket_directory_another_user_owns(
    tmp_path: Path, socket_dirs: Path
) -> None:
    """The audit's attack: another user made the directory (0700, theirs), so they can swap
    the socket at any time; the server must not bind there."""
    nobody = pwd.getpwnam("nobody")
    theirs = socket_dirs / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    ref = RefServer(tmp_path / "ref", next_loopback(), admin_socket=theirs / "admin.sock")
    try:
        code, err = ref.run_to_exit()
    finally:
        ref.close()
    assert code == 1
    line = refserver_error(err)
    assert "admin_socket directory" in line and "owned by nobody" in line


def test_refserver_default_socket_directory_is_private(tmp_path: Path) -> None:
    """Without admin_socket the server binds in its data_dir, which it creates 0700."""
    ref = RefServer(tmp_path / "ref", next_loopback(), admin_socket=None)
    ref.admin_socket = ref.data_dir / "admin.sock"
    if len(str(ref.admin_socket)) > 100:
        pytest.skip("tmp path too long for a socket")
    try:
        ref.start()
        assert stat.S_IMODE(ref.data_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(ref.admin_socket.stat().st_mode) == 0o600
        # What a client (the agent) can check before it trusts the socket: the directory is
        # the expected user's alone, and the kernel names that user as the one listening.
        assert socket_dir_problem(ref.admin_socket.parent, owner=os.getuid()) is None
        assert "owned by" in str(socket_dir_problem(ref.admin_socket.parent, owner=65534))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(ref.admin_socket))
            pid, uid, _ = peer_credentials(client)
        assert (pid, uid) == (ref.proc.pid if ref.proc else -1, os.getuid())
    finally:
        ref.close()


# --- 4. secret files, secret directories, inline secrets ---------------------------------------


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """An initialised leader that is not running: each test starts it with one thing wrong."""
    with Cluster(tmp_path_factory.mktemp("secrets"), next_loopback()) as c:
        c.init()
        yield c


def refused_start(daemon: Daemon, prog: str, code: int = 1) -> str:
    exit_code, output = daemon.run_to_exit()
    assert exit_code == code, output
    return one_line_error(output, prog)


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root (CI runs as root)")
def test_leader_refuses_a_passphrase_file_another_user_owns(idle: Cluster) -> None:
    nobody = pwd.getpwnam("nobody")
    os.chown(idle.passphrase_path, nobody.pw_uid, nobody.pw_gid)
    try:
        # the config's to fix: exit 2, not restarted by systemd (review s48rev3: it was 1)
        line = refused_start(idle.leader, "tlsroll-leader", code=2)
    finally:
        os.chown(idle.passphrase_path, 0, 0)
    assert "[leader].ca_passphrase_file: " in line, line
    assert str(idle.passphrase_path) in line and "owned by nobody" in line
    assert "chown" in line


@pytest.mark.parametrize(("sub", "mode"), [("secrets", 0o777), ("ca", 0o755), ("tls", 0o750)])
def test_leader_refuses_a_secret_directory_others_can_enter(
    idle: Cluster, sub: str, mode: int
) -> None:
    directory = idle.data_dir / sub
    directory.chmod(mode)
    try:
        line = refused_start(idle.leader, "tlsroll-leader")
    finally:
        directory.chmod(0o700)
    assert str(directory) in line and f"chmod 700 {directory}" in line


def test_leader_starts_when_its_secrets_are_private(idle: Cluster) -> None:
    """The control for the refusals above: restored, the same data dir starts."""
    idle.start_leader()
    idle.stop_leader()


def test_agent_refuses_an_inline_join_token_in_a_readable_config(idle: Cluster) -> None:
    agent = idle.add_agent("inline", next_loopback(), token="abcdef.x", start=False)
    agent.config_path.chmod(0o644)
    line = refused_start(agent, "tlsroll-agent", code=2)
    assert str(agent.config_path) in line and "[leader].join_token" in line
    assert f"chmod 600 {agent.config_path}" in line and "join_token_file" in line
    assert "abcdef.x" not in agent.log_text()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root (CI runs as root)")
def test_agent_refuses_a_join_token_file_another_user_owns(idle: Cluster) -> None:
    agent = idle.add_agent(
        "foreign", next_loopback(), token="abcdef.y", token_file=True, start=False
    )
    token_file = Path(str(agent.config["leader"]["join_token_file"]))
    nobody = pwd.getpwnam("nobody")
    os.chown(token_file, nobody.pw_uid, nobody.pw_gid)
    idle.start_leader()
    try:
        # a config error (exit 2, not restarted), as the file's mode (s49agentexit)
        line = refused_start(agent, "tlsroll-agent", code=2)
    finally:
        idle.stop_leader()
    assert str(token_file) in line and "owned by nobody" in line


def test_every_kind_of_call_passes_the_relay(leader: Cluster) -> None:
    """The guard wraps unary and streaming handlers alike: health Check (unary), health Watch
    (a server stream) and reflection (a bidirectional stream) answer through the socket."""
    with grpc.insecure_channel(f"unix:{leader.admin_socket}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(iter(watch)).status == 1
        watch.cancel()
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in reply.list_services_response.service}
        assert "tlsroll.v1.Admin" in names
