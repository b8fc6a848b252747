"""Bad input in the daemons' configs, their start-up and the admin API (review s47rtin L3,
L4, L7, L9): one line naming the real cause, the config exit code 2 where a person must fix a
file, INVALID_ARGUMENT where the CLI's bounds are missed, nothing changed on a refusal. The
daemons and the CLI run as processes; the admin API is called over the leader's real socket."""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from leader import byo, front, runtime
from leader.layout import Layout
from tests.byo_certs import NOW, leaf, make_ca, pem, write_dir
from tests.cluster import (
    Agent,
    Cluster,
    child_env,
    command,
    metrics_token_file,
    one_line_error,
)
from tests.conftest import next_loopback
from tests.nodeside import Node, cluster_ca
from tests.refserver_helper import write_toml
from tlsroll import errors, fsutil, password, pki
from tlsroll.defaults import CONTROL_PORT, JOIN_PORT
from tlsroll.v1 import admin_pb2, types_pb2

STATE_TABLES = ("rollouts", "rollout_nodes", "audit", "auth_versions", "meta")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """After ``tlsroll init``; its leader stopped unless a test starts it (and stops it)."""
    with Cluster(tmp_path_factory.mktemp("bad-config"), next_loopback()) as c:
        c.init()
        yield c


def run_daemon(script: str, module: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(script, module), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _invalid(call: object, request: object) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value.details() or ""


# --- L7: the admin API bounds what the CLI bounds ----------------------------------------------


def _rollout(**fields: object) -> admin_pb2.RolloutRequest:
    return admin_pb2.RolloutRequest(
        change=types_pb2.CHANGE_ENABLE_TLS,
        scope=types_pb2.SCOPE_KIND_CLUSTER,
        freeze=types_pb2.FREEZE_MODE_NODE,
        **fields,  # type: ignore[arg-type]
    )


def test_the_admin_api_refuses_what_the_cli_bounds_and_records_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_leader()
    # A node with its agent and server, so that a request within the bounds is planned.
    node = Node(cluster, "n1", next_loopback(), tmp_path / "n1")
    try:
        node.start()
        with cluster.admin() as admin:
            # A password staged, for CheckPassword's parameters (audited: before is after this).
            verifier = password.make_verifier("kd7q-x2mf-9vhc-3ptw-a8ke-rn5d")
            admin.SetPassword(
                admin_pb2.SetPasswordRequest(
                    auth_verifier_json=password.verifier_to_json(verifier)
                ),
                timeout=30,
            )
            before = cluster.store_rows(STATE_TABLES)
            assert admin.PlanRollout(_rollout(failure_budget=200), timeout=30).rollout.nodes
            for call in (admin.PlanRollout, admin.StartRollout):
                for budget in (201, 2**32 - 1):
                    details = _invalid(call, _rollout(failure_budget=budget))
                    assert "failure-budget must be 0..200" in details
                cert_dir = admin_pb2.CertDir(ca_pem=b"")
                cert_dir.nodes.add(node="n1", key_file_mode=2**32 - 1)
                details = _invalid(call, _rollout(cert_dir=cert_dir))
                assert "key_file_mode 37777777777 is not a file mode" in details
            params = admin.CheckPassword(admin_pb2.CheckPasswordRequest(), timeout=30)
            # Malformed hashes, more of them than the throttle lets pass free (5): refused as
            # such, neither audited nor counted as wrong passwords.
            for size in (1, params.dklen - 1, params.dklen + 1, 3 * 1024 * 1024, 1, 1, 1):
                details = _invalid(
                    admin.CheckPassword,
                    admin_pb2.CheckPasswordRequest(
                        candidate_hash=b"x" * size, version=params.version
                    ),
                )
                assert f"candidate_hash must be {params.dklen} bytes (dklen), got {size}" in (
                    details
                )
            assert cluster.store_rows(STATE_TABLES) == before
            # A hash of the right length is checked as before (not throttled: nothing counted).
            right = password.derive_hash(
                "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d",
                salt=params.salt,
                n=params.n,
                r=params.r,
                p=params.p,
                dklen=params.dklen,
            )
            wrong = admin.CheckPassword(
                admin_pb2.CheckPasswordRequest(
                    candidate_hash=bytes(params.dklen), version=params.version
                ),
                timeout=30,
            )
            assert not wrong.matches
            good = admin.CheckPassword(
                admin_pb2.CheckPasswordRequest(candidate_hash=right, version=params.version),
                timeout=30,
            )
            assert good.matches
            assert base64.b64decode(params.salt)  # the parameters came back whole
    finally:
        node.close()
        cluster.stop_leader()
    audit = [row for row in cluster.store_table("audit") if row["kind"] == "password.checked"]
    assert len(audit) == 2, audit  # the two well-formed checks only


# --- L4: the daemons' start-up: the real cause, the file named, exit 2 for the config's own ---


def _run_with(cluster: Cluster, changes: dict[str, object]) -> tuple[int, str]:
    """Run the leader with ``changes`` to leader.toml until it exits; the file as it was
    afterwards. Its exit code and output."""
    original = cluster.config_path.read_bytes()
    try:
        cluster.write_leader_config(changes)
        return cluster.leader.run_to_exit(timeout=30)
    finally:
        cluster.config_path.write_bytes(original)


def _leader_refuses(cluster: Cluster, changes: dict[str, object]) -> str:
    """Start the leader with ``changes`` to leader.toml: exit 2, one line (returned); its
    certificate not issued again, no admin socket; the file as it was afterwards."""
    original = cluster.config_path.read_bytes()
    cert = cluster.tls_cert_path.read_bytes()
    try:
        cluster.write_leader_config(changes)
        code, output = cluster.leader.run_to_exit(timeout=30)
    finally:
        cluster.config_path.write_bytes(original)
    assert code == 2, output
    line = one_line_error(output, "tlsroll-leader")
    assert "chmod" not in line, line
    assert cluster.tls_cert_path.read_bytes() == cert
    assert not cluster.admin_socket.exists()
    return line


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "dev-zero"])
def test_a_ca_passphrase_file_that_is_missing_or_no_file_is_a_config_error(
    cluster: Cluster, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "passphrase"
    what = {
        "missing": "does not exist",
        "directory": "is not a regular file (a directory)",
        "fifo": "is not a regular file (a FIFO)",  # 0600: it was opened and waited on for ever
        "dev-zero": "is not a regular file (a character device)",
    }[kind]
    if kind == "directory":
        path.mkdir(mode=0o755)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    line = _leader_refuses(cluster, {"ca_passphrase_file": str(path)})
    assert f"config error: {cluster.config_path}: [leader].ca_passphrase_file: " in line, line
    assert str(path) in line and what in line, line


WRONG_PASSPHRASE = "not-the-ca-passphrase-7q2m"


@pytest.mark.parametrize("kind", ["mode-0644", "wrong", "empty"])
def test_a_ca_passphrase_the_leader_cannot_start_with_is_a_config_error(
    cluster: Cluster, tmp_path: Path, kind: str
) -> None:
    """Review s48rev3: a passphrase file others can read (the right passphrase in it), or a
    wrong passphrase, ended the leader with exit 1, and systemd started it again every 5 s
    for ever. The admin's configuration to fix: exit 2 (the config's code, which the unit's
    RestartPreventExitStatus= spares: test_deploy), one line naming the key and what is
    wrong, never the passphrase; nothing started, nothing issued."""
    right = cluster.passphrase_path.read_text().strip()
    path = tmp_path / "passphrase"
    path.touch(0o600)
    if kind == "mode-0644":
        path.write_text(right + "\n")
        path.chmod(0o644)
        what = f"{path} is accessible by others (mode 0644); run: chmod 600 {path}"
    elif kind == "wrong":
        path.write_text(WRONG_PASSPHRASE + "\n")
        what = (
            f"the CA passphrase in {path} does not open the CA key {cluster.ca_key_path}: a "
            "wrong passphrase, or a damaged key file"
        )
    else:
        what = f"{path} is empty; it must hold the CA passphrase"
    cert = cluster.tls_cert_path.read_bytes()
    code, output = _run_with(cluster, {"ca_passphrase_file": str(path)})
    assert code == 2 == runtime.EXIT_CONFIG, output
    line = one_line_error(output, "tlsroll-leader")
    key = "[leader].ca_passphrase_file"
    assert line == f"tlsroll-leader: config error: {cluster.config_path}: {key}: {what}", line
    assert right not in output and WRONG_PASSPHRASE not in output
    assert cluster.tls_cert_path.read_bytes() == cert
    assert not cluster.admin_socket.exists()


def _flip(data: bytes) -> bytes:
    """A byte of the key's base64 body changed (another base64 letter)."""
    at = len(data) // 2
    return data[:at] + (b"A" if data[at : at + 1] != b"A" else b"B") + data[at + 1 :]


CA_DAMAGE: dict[str, tuple[str, Callable[[Cluster], bytes]]] = {
    "key-empty": ("ca_key", lambda c: b""),
    "key-zeros": ("ca_key", lambda c: bytes(4096)),
    "key-garbage": ("ca_key", lambda c: b"not a key at all\n" * 20),
    "key-flipped": ("ca_key", lambda c: _flip(c.ca_key_path.read_bytes())),
    "key-truncated": ("ca_key", lambda c: c.ca_key_path.read_bytes()[:200]),
    "key-of-another-ca": (
        "ca_key",
        lambda c: pki.key_to_pem(
            pki.generate_key(), c.passphrase_path.read_text().strip().encode()
        ),
    ),
    "cert-garbage": ("ca_cert", lambda c: b"-----BEGIN CERTIFICATE-----\nxx\n"),
    "cert-empty": ("ca_cert", lambda c: b""),
    "cert-no-ca": ("ca_cert", lambda c: c.tls_cert_path.read_bytes()),
}


@pytest.mark.parametrize("kind", list(CA_DAMAGE))
def test_a_ca_the_leader_cannot_load_is_a_config_error_naming_the_file(
    cluster: Cluster, kind: str
) -> None:
    """Review s49cli M1: a damaged ca.key exited 2 or 1 depending on the damage (a flipped
    byte: "wrong passphrase", 2; empty, zeros or garbage: "not a PEM certificate or key", 1,
    naming no file, and systemd started it again every 5 s; another key: 1). Every error
    loading the CA is a person's to fix: exit 2, one line naming the file, nothing changed."""
    which, damage = CA_DAMAGE[kind]
    path = cluster.ca_key_path if which == "ca_key" else cluster.ca_cert_path
    original = path.read_bytes()
    cert = cluster.tls_cert_path.read_bytes()
    bad = damage(cluster)
    try:
        path.write_bytes(bad)
        code, output = cluster.leader.run_to_exit(timeout=30)
        assert path.read_bytes() == bad  # not rewritten (the key's re-encryption)
    finally:
        path.write_bytes(original)
    assert code == 2 == runtime.EXIT_CONFIG, output
    line = one_line_error(output, "tlsroll-leader")
    assert line.startswith("tlsroll-leader: config error: "), line
    assert str(path) in line, line
    assert cluster.passphrase_path.read_text().strip() not in output
    assert cluster.tls_cert_path.read_bytes() == cert
    assert not cluster.admin_socket.exists()


def test_a_wrong_passphrase_in_the_credentials_copy_says_how_to_make_it_again(
    tmp_path: Path,
) -> None:
    """Review s49cli L4: with install.sh ca-credential's setup (the unit's ExecStartPre=
    copies the credential to /run/tlsroll/ca-passphrase, which ca_passphrase_file names), a
    wrong passphrase named only [leader].ca_passphrase_file: the path read, and how to make
    the credential again."""
    layout = Layout(tmp_path)
    copy = front.CREDENTIAL_COPY_DIR / "ca-passphrase"
    said = runtime.wrong_passphrase(layout, copy)
    assert f"the CA passphrase in {copy} does not open the CA key {layout.ca_key}" in said
    assert "install.sh ca-credential" in said and "ca_passphrase_file" in said
    other = runtime.wrong_passphrase(layout, tmp_path / "pass")
    assert str(tmp_path / "pass") in other and "install.sh" not in other


def test_a_metrics_token_file_that_is_a_directory_is_a_config_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    line = _leader_refuses(cluster, {"metrics_token_file": str(tmp_path)})
    assert (
        f"config error: {cluster.config_path}: [leader].metrics_token_file: {tmp_path} is not "
        "a regular file (a directory)"
    ) in line, line


def test_a_metrics_token_file_that_is_not_text_is_a_config_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The review of s64-ops (L5): a binary file named by mistake (a key in DER) was a
    traceback ("internal error: UnicodeDecodeError"); it is a config error, exit 2."""
    token = tmp_path / "metrics-token.der"
    token.write_bytes(b"\x30\x82\xff\xfe" * 8)
    token.chmod(0o600)
    line = _leader_refuses(cluster, {"metrics_token_file": str(token)})
    assert (
        f"config error: {cluster.config_path}: [leader].metrics_token_file: {token}: not UTF-8 text"
    ) in line, line


def test_a_config_beside_its_own_store_naming_another_data_dir_is_a_config_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    """rev57b M1: a backup's files put into a new data directory keep the data_dir they were
    made with; the leader started on the copy ran on the old store without a word. It is
    refused (exit 2), the line saying what to set; nothing of either is changed."""
    if not (cluster.data_dir / "leader.sqlite3").exists():  # (a leader has run on it)
        cluster.start_leader()
        cluster.stop_leader()
    copy = tmp_path / "restored"
    shutil.copytree(cluster.data_dir, copy, ignore=shutil.ignore_patterns("run", "*.sock"))
    before = (
        (copy / "leader.sqlite3").read_bytes(),
        (cluster.data_dir / "leader.sqlite3").read_bytes(),
    )
    result = run_daemon("tlsroll-leader", "leader.daemon", copy / "leader.toml")
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line_error(result.stdout + result.stderr, "tlsroll-leader")
    assert (
        f"[leader].data_dir: {cluster.data_dir} is not {copy.resolve()}, where this config is "
        "beside a store (leader.sqlite3) of its own"
    ) in line, line
    assert f'set data_dir = "{copy.resolve()}"' in line
    after = (
        (copy / "leader.sqlite3").read_bytes(),
        (cluster.data_dir / "leader.sqlite3").read_bytes(),
    )
    assert after == before


def test_a_metrics_token_file_others_may_read_is_a_config_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    """rev57b M3: it exited 1, which the unit restarts every 5 s for ever; a config error
    exits 2, as the same fault of ca_passphrase_file does."""
    token = metrics_token_file(tmp_path / "metrics-token", 0o644)
    code, output = _run_with(cluster, {"metrics_token_file": str(token)})
    assert code == 2, output
    line = one_line_error(output, "tlsroll-leader")
    assert not cluster.admin_socket.exists()
    assert "scrape-token" not in output
    assert (
        f"config error: {cluster.config_path}: [leader].metrics_token_file: {token} is "
        "accessible by others (mode 0644); run: chmod 600"
    ) in line, line


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("viewer_port", CONTROL_PORT, f"viewer_port: {CONTROL_PORT} is control_port too"),
        ("join_port", CONTROL_PORT, f"join_port: {CONTROL_PORT} is control_port too"),
        ("viewer_port", JOIN_PORT, f"viewer_port: {JOIN_PORT} is join_port too"),
        ("admin_socket", "/tmp/" + "s" * 120 + "/admin.sock", "longer than 107 bytes"),
        ("data_dir", "/nonexistent/tlsroll-data", "/nonexistent/tlsroll-data: no such directory"),
    ],
)
def test_the_leader_names_the_key_of_a_config_that_cannot_work(
    cluster: Cluster, key: str, value: object, problem: str
) -> None:
    line = _leader_refuses(cluster, {key: value})
    assert f"config error: {cluster.config_path}: [leader].{key}: " in line, line
    assert problem in line, line


def test_an_admin_socket_in_a_directory_others_may_write_to_is_refused_its_mode_kept(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The leader made the admin socket's directory 0750 whatever it was: a leader.toml with
    ``admin_socket = "/tmp/tlsroll.sock"`` made /tmp 0750, every other user locked out of it
    (found by CI: a run's /tmp went 0750). A directory others may write to (here a sticky
    1777 one, as /tmp is) is refused, exit 2, its mode kept."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    try:
        line = _leader_refuses(cluster, {"admin_socket": shared / "tlsroll.sock"})
    finally:
        mode = stat.S_IMODE(shared.stat().st_mode)
        shared.chmod(0o1777)
    assert mode == 0o1777, oct(mode)
    assert f"config error: {cluster.config_path}: [leader].admin_socket: " in line, line
    assert f"its directory {shared} is writable by others" in line, line


# --- s50: a file of the leader's it cannot open, or that is missing: exit 2 too ---------------

# Root without the capabilities that let it read and write any file (CAP_DAC_OVERRIDE,
# CAP_DAC_READ_SEARCH): the files' owners and modes decide, as they do for the leader's user
# under its unit (tlsroll, CapabilityBoundingSet= empty). Root still owns the interpreter's way.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (files of another user's) and setpriv (root without its DAC capabilities)",
)


def _file_state(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and directory under ``root``: mode, owner and (files) contents."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, data)
    return found


def _aside(path: Path) -> Callable[[], None]:
    kept = path.with_name(path.name + ".kept")
    path.rename(kept)

    def undo() -> None:
        kept.rename(path)

    return undo


def _replaced(path: Path, data: bytes) -> Callable[[], None]:
    original = path.read_bytes()
    path.write_bytes(data)

    def undo() -> None:
        path.write_bytes(original)

    return undo


def _given(path: Path, mode: int, uid: int | None = None) -> Callable[[], None]:
    st = path.stat()
    if uid is not None:
        os.chown(path, uid, -1)
    path.chmod(mode)

    def undo() -> None:
        os.chown(path, st.st_uid, st.st_gid)
        path.chmod(stat.S_IMODE(st.st_mode))

    return undo


def _in_the_way(path: Path, *, directory: bool) -> Callable[[], None]:
    back = _aside(path)
    if directory:
        path.mkdir(mode=0o700)
    else:
        path.write_bytes(b"in the way\n")
        path.chmod(0o600)

    def undo() -> None:
        if directory:
            path.rmdir()
        else:
            path.unlink()
        back()

    return undo


def _planted(path: Path, mode: int, uid: int) -> Callable[[], None]:
    """An empty file at ``path``, of ``uid``'s with ``mode``; or the one there given them and
    given back after (an earlier test of the same cluster left the store's -wal or -shm: a
    connection to the stopped leader's store not yet closed; FileExistsError here)."""
    if path.exists():
        return _given(path, mode, uid)
    path.touch(mode=mode, exist_ok=False)
    os.chown(path, uid, -1)
    path.chmod(mode)
    return path.unlink


# Linux's FS_IOC_SETFLAGS (_IOW('f', 2, long)): ``chattr`` without the package (root's:
# CAP_LINUX_IMMUTABLE, on a file system with attributes: ext4, as /tmp is here and in CI).
_FS_IOC_SETFLAGS = (1 << 30) | (struct.calcsize("l") << 16) | (ord("f") << 8) | 2


def _chattr(path: Path, flag: int, *, on: bool) -> None:
    """``chattr +i`` (``flag`` ``fsutil.FS_IMMUTABLE_FL``, ``on``) or ``-i`` of ``path``. Where
    the kernel refuses to set it (no CAP_LINUX_IMMUTABLE: EPERM; a file system without
    attributes, tmpfs: ENOTTY or EOPNOTSUPP) the test is skipped with that reason (review
    rev51d L5): not here (root, ext4), nor in CI."""
    flags = fsutil.file_attributes(path)
    if flags is None and on:
        pytest.skip(f"no file attributes on {path}'s file system (FS_IOC_GETFLAGS refused)")
    assert flags is not None, f"no attributes on {path}'s file system"
    flags = flags | flag if on else flags & ~flag
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, bytearray(flags.to_bytes(4, sys.byteorder) + bytes(4)))
    except OSError as exc:
        if not on:
            raise
        pytest.skip(f"the kernel refuses FS_IOC_SETFLAGS on {path}: {exc.strerror or exc}")
    finally:
        os.close(fd)


def _immutable(path: Path) -> Callable[[], None]:
    """``path`` made immutable (``chattr +i``); its undo: ``chattr -i``."""
    _chattr(path, fsutil.FS_IMMUTABLE_FL, on=True)
    assert (fsutil.file_attributes(path) or 0) & fsutil.FS_IMMUTABLE_FL
    return lambda: _chattr(path, fsutil.FS_IMMUTABLE_FL, on=False)


def _append_only(path: Path) -> Callable[[], None]:
    """``path`` made append-only (``chattr +a``); its undo: ``chattr -a``."""
    _chattr(path, fsutil.FS_APPEND_FL, on=True)
    assert (fsutil.file_attributes(path) or 0) & fsutil.FS_APPEND_FL
    return lambda: _chattr(path, fsutil.FS_APPEND_FL, on=False)


NOBODY = 65534  # (nobody; any uid not ours will do)
# case -> (the file the line names, the damage (returns its undo), run without root's DAC
# capabilities, words the line holds)
START_FILES: dict[str, tuple[str, Callable[[Cluster], Callable[[], None]], bool, str]] = {
    "ca-key-missing": ("ca/ca.key", lambda c: _aside(c.ca_key_path), False, "is missing"),
    "ca-cert-missing": ("ca/ca.pem", lambda c: _aside(c.ca_cert_path), False, "is missing"),
    "tls-key-missing": ("tls/leader.key", lambda c: _aside(c.tls_key_path), False, "is missing"),
    "tls-cert-missing": ("tls/leader.pem", lambda c: _aside(c.tls_cert_path), False, "is missing"),
    "ca-cert-another-users": (
        "ca/ca.pem",
        lambda c: _given(c.ca_cert_path, 0o600, NOBODY),
        True,
        "cannot be read by root (uid 0)",
    ),
    "ca-dir-not-enterable": (
        "ca",
        lambda c: _given(c.ca_key_path.parent, 0o600),
        True,
        "may not be entered",
    ),
    "tls-cert-another-users": (
        "tls/leader.pem",
        lambda c: _given(c.tls_cert_path, 0o600, NOBODY),
        True,
        "cannot be read by root (uid 0)",
    ),
    "tls-key-unreadable": (
        "tls/leader.key",
        lambda c: _given(c.tls_key_path, 0o000),
        True,
        "cannot be read by root (uid 0)",
    ),
    "ca-cert-a-directory": (
        "ca/ca.pem",
        lambda c: _in_the_way(c.ca_cert_path, directory=True),
        False,
        "is not a regular file (a directory)",
    ),
    "ca-dir-a-file": (
        "ca",
        lambda c: _in_the_way(c.ca_key_path.parent, directory=False),
        False,
        "is not a directory",
    ),
    "tls-cert-garbage": (
        "tls/leader.pem",
        lambda c: _replaced(c.tls_cert_path, b"not a certificate\n"),
        False,
        "leader certificate",
    ),
    "tls-key-garbage": (
        "tls/leader.key",
        lambda c: _replaced(c.tls_key_path, b"not a key\n"),
        False,
        "leader TLS key",
    ),
    # (A key the CA issues for is no config error: the start issues leader.pem again for it,
    # session 52, test_renewal. One of a kind it issues none for still is.)
    "tls-key-of-another-certificate-and-kind": (
        "tls/leader.key",
        lambda c: _replaced(
            c.tls_key_path, pki.key_to_pem(ec.generate_private_key(ec.SECP384R1()))
        ),
        False,
        "cannot issue one for it: it is a key of ECDSA curve secp384r1",
    ),
    "tls-key-of-another-certificate-rsa-1024": (
        "tls/leader.key",
        lambda c: _replaced(
            c.tls_key_path,
            pki.key_to_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),  # noqa: S505
        ),
        False,
        "cannot issue one for it: it is a key of RSA 1024 bits",
    ),
    "store-another-users": (
        "leader.sqlite3",
        lambda c: _given(c.store_path, 0o600, NOBODY),
        True,
        "cannot be read and written by root (uid 0)",
    ),
    "data-dir-read-only": (
        ".",
        lambda c: _given(c.data_dir, 0o500),
        True,
        "cannot be written by root (uid 0)",
    ),
    # (review rev50e: "run: chmod u+rwx", which changes nothing: an attribute stops it)
    "data-dir-immutable": (
        ".",
        lambda c: _immutable(c.data_dir),
        False,
        "not its mode (owner root (uid 0), mode 0750) but an attribute: it is immutable",
    ),
    "viewer-key-another-users": (
        "tls/viewer.key",
        lambda c: _given(c.data_dir / "tls" / "viewer.key", 0o600, NOBODY),
        True,
        "remove it: the leader issues a new one",
    ),
    "viewer-cert-unreadable": (
        "tls/viewer.pem",
        lambda c: _given(c.data_dir / "tls" / "viewer.pem", 0o000),
        True,
        "cannot be read by root (uid 0)",
    ),
    "config-another-users": (
        "leader.toml",
        lambda c: _given(c.config_path, 0o600, NOBODY),
        True,
        "cannot read",
    ),
    # (review of s50lead L1: root ran sqlite3 on the stopped leader's store; were exit 1)
    "store-wal-another-users": (
        "leader.sqlite3-wal",
        lambda c: _planted(c.data_dir / "leader.sqlite3-wal", 0o644, NOBODY),
        True,
        "cannot be read and written by root (uid 0)",
    ),
    "store-shm-another-users": (
        "leader.sqlite3-shm",
        lambda c: _planted(c.data_dir / "leader.sqlite3-shm", 0o644, NOBODY),
        True,
        "cannot be read and written by root (uid 0)",
    ),
}


@needs_root
@pytest.mark.parametrize("case", list(START_FILES))
def test_a_file_the_leader_cannot_open_or_that_is_missing_is_a_config_error(
    cluster: Cluster, case: str
) -> None:
    """Session 50: a missing ca.key, ca.pem or leader certificate or key, one the leader may
    not read (another user's 0600, a directory on its way it may not enter), one of them no
    regular file or damaged (the leader's key: "cannot listen on …: in use"), a store it may
    not write and a data dir it may not write exited 1, and systemd started the leader again
    every 5 s for ever. Restarting changes none of them (a data dir on a disk not mounted yet
    holds none of the leader's files: exit 1, below): exit 2, one line naming the file and
    what to do; nothing changed. The store's -wal and -shm likewise (review of s50lead L1)."""
    name, damage, no_dac, words = START_FILES[case]
    if not cluster.store_path.exists():  # a leader that ran once: its store and its mark
        cluster.start_leader()
        cluster.stop_leader()
    path = (cluster.data_dir / name).resolve()
    undo = damage(cluster)
    argv = list(cluster.leader.argv)
    try:
        before = _file_state(cluster.data_dir)
        if no_dac:
            cluster.leader.argv = [*NO_DAC, *argv]
        code, output = cluster.leader.run_to_exit(timeout=30)
        after = _file_state(cluster.data_dir)
    finally:
        cluster.leader.argv = argv
        undo()
    assert code == 2 == runtime.EXIT_CONFIG, output
    line = one_line_error(output, "tlsroll-leader")
    assert line.startswith("tlsroll-leader: config error: "), line
    assert str(path) in line and words in line, line
    assert after == before  # nothing rewritten, made or re-encrypted
    assert not cluster.admin_socket.exists()
    assert cluster.passphrase_path.read_text().strip() not in output


def test_a_missing_viewer_key_is_issued_again_not_refused(cluster: Cluster) -> None:
    """The start's check of the viewer's files (above) leaves a missing one to the viewer,
    which issues a new certificate and key: the leader starts."""
    if not cluster.store_path.exists():
        cluster.start_leader()
        cluster.stop_leader()
    key = cluster.data_dir / "tls" / "viewer.key"
    old = key.read_bytes()
    key.unlink()
    cluster.start_leader()
    try:
        assert key.exists() and key.read_bytes() != old
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    finally:
        cluster.stop_leader()


def _elsewhere(cluster: Cluster, tmp_path: Path, data_dir: Path) -> list[str]:
    """The leader's command with a config of its own in ``tmp_path`` (a copy of the cluster's)
    naming ``data_dir``: a data dir outside the unit's StateDirectory= (on a disk of its own)."""
    config = write_toml(
        tmp_path / "leader.toml", {"leader": {**cluster.leader_config(), "data_dir": data_dir}}
    )
    return [*command("tlsroll-leader", "leader.daemon"), "--config", str(config)]


# case -> (what the data dir holds, its owner, run without root's DAC capabilities)
EMPTY_DATA_DIRS: dict[str, tuple[tuple[str, ...], int, bool]] = {
    "as-root": ((), 0, False),
    "as-the-services-user": ((), NOBODY, True),  # (one it may not write: was "chown")
    "a-file-systems-lost+found-only": (("lost+found",), 0, False),
}


@needs_root
@pytest.mark.parametrize("case", list(EMPTY_DATA_DIRS))
def test_an_empty_data_dir_is_not_mounted_yet_or_not_initialised_and_restartable(
    cluster: Cluster, tmp_path: Path, case: str
) -> None:
    """Review of s50lead M1: a data dir outside systemd's StateDirectory= (``data_dir`` on a
    disk of its own) is an empty mountpoint until its disk is mounted. Exit 2 (never started
    again) with "ca.key is missing; restore it from a backup" as root, or "chown" of the bare
    mountpoint as the service's user, stopped the leader for good and gave harmful advice:
    a data dir holding none of the leader's files says so, exit 1 (systemd starts it again,
    mounted by then), and changes nothing."""
    held, owner, no_dac = EMPTY_DATA_DIRS[case]
    data = tmp_path / "mnt" / "data"
    data.mkdir(parents=True, mode=0o755)
    for name in held:
        (data / name).mkdir(mode=0o700)
    os.chown(data, owner, -1)
    data.chmod(0o755)
    argv = _elsewhere(cluster, tmp_path, data)
    result = subprocess.run(
        [*(NO_DAC if no_dac else []), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
        env=child_env(),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    line = one_line_error(output, "tlsroll-leader")
    assert f"{data} holds none of the leader's files" in line, line
    assert "not mounted yet" in line and "tlsroll init" in line, line
    assert not line.startswith("tlsroll-leader: config error") and "restore" not in line, line
    assert "chown" not in line and "runuser" not in line, line
    assert sorted(os.listdir(data)) == sorted(held)  # nothing made
    assert data.stat().st_uid == owner


@pytest.mark.parametrize("beside", [(), ("lost+found",), ("leader.sqlite3",)])
def test_a_config_missing_from_an_empty_directory_is_a_disk_not_mounted_yet(
    tmp_path: Path, beside: tuple[str, ...]
) -> None:
    """Review rev50f M1: the shipped unit reads `/var/lib/tlsroll/leader.toml`, which `tlsroll
    init` writes into the data dir; on a disk not mounted yet (a data dir outside the unit's
    StateDirectory=) the config is missing first, and "no such file" was a config error (exit
    2): the leader stayed stopped once the disk came. A missing config in an empty directory
    says what it likely is, exit 1 (started again); one beside the leader's files stays a
    config error."""
    data = tmp_path / "mnt"
    data.mkdir()
    for name in beside:
        (data / name).mkdir()
    config = data / "leader.toml"
    result = run_daemon("tlsroll-leader", "leader.daemon", config)
    output = result.stdout + result.stderr
    line = one_line_error(output, "tlsroll-leader")
    if beside == ("leader.sqlite3",):
        assert result.returncode == 2, output
        assert line == f"tlsroll-leader: config error: {config}: no such file", line
    else:
        assert result.returncode == 1, output
        assert line == (
            f"tlsroll-leader: the config {config} is missing and {data} is empty: is its disk "
            "not mounted yet, or tlsroll init not run there? (exit 1: its service manager "
            "starts it again)"
        ), line
    assert sorted(os.listdir(data)) == sorted(beside)  # nothing made


# case -> the closed directory's group, the fix the line gives
CLOSED_ON_THE_WAY = {"of-another-group": (NOBODY, "chmod o+x"), "of-our-group": (0, "chmod g+x")}


@needs_root
@pytest.mark.parametrize("case", list(CLOSED_ON_THE_WAY))
def test_a_closed_directory_on_the_data_dirs_way_is_opened_never_given_away(
    cluster: Cluster, tmp_path: Path, case: str
) -> None:
    """Review of s50lead M2: a directory on the data dir's way the leader may not enter (a
    system directory of another user's, 0700) was to be chowned to the leader's user (or the
    leader run as its owner): a directory on the way needs only search permission, never a
    new owner. Exit 2, naming it and the chmod that opens it; nothing changed."""
    group, fix = CLOSED_ON_THE_WAY[case]
    closed = tmp_path / "srv"
    data = closed / "tlsroll"
    data.mkdir(parents=True, mode=0o750)
    os.chown(closed, NOBODY, group)
    closed.chmod(0o700)
    argv = _elsewhere(cluster, tmp_path, data)
    result = subprocess.run(
        [*NO_DAC, *argv], capture_output=True, text=True, timeout=30, check=False, env=child_env()
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 == runtime.EXIT_CONFIG, output
    line = one_line_error(output, "tlsroll-leader")
    assert f"the directory {closed} on its way may not be entered" in line, line
    assert f"{fix} {closed}" in line, line
    assert "chown" not in line and "runuser" not in line and "run it as" not in line, line
    st = closed.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, group, 0o700)


def _mount_tables(
    tmp_path: Path, point: Path, *, mounted: bool, unit: bool, noauto: bool = False
) -> dict[str, str]:
    """A child's environment whose mount tables (``fsutil.TEST_MOUNT_ROOT_ENV``) name ``point``
    as a mount point, in /etc/fstab (with ``noauto`` among its options if ``noauto``) or
    (``unit``) in a systemd mount unit of the admin's, and mounted or not: this process's
    mounts, and ``point`` among them if ``mounted``."""
    root = tmp_path / "tables"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    fstab = "# <file system> <mount point> <type> <options> <dump> <pass>\nUUID=0a1b / ext4 0 1\n"
    if unit:
        (root / "etc" / "systemd" / "system" / "srv-data.mount").write_text(
            f"[Unit]\nDescription=data\n\n[Mount]\nWhat=/dev/vdb1\nWhere={point}\nType=ext4\n"
        )
    else:
        fstab += f"/dev/vdb1 {point} ext4 defaults,{'noauto,' if noauto else ''}nofail 0 2\n"
    (root / "etc" / "fstab").write_text(fstab)
    mounts = Path("/proc/self/mountinfo").read_text()
    if mounted:
        mounts += f"990 1 253:16 / {point} rw,relatime shared:99 - ext4 /dev/vdb1 rw\n"
    (root / "proc" / "self" / "mountinfo").write_text(mounts)
    return child_env({fsutil.TEST_MOUNT_ROOT_ENV: str(root)})


# case -> (the mount point's owner and mode, the data dir below it (or "" : the mount point
# itself), the config in the mount point (else beside the test's), a systemd unit names it)
UNMOUNTED: dict[str, tuple[int, int, str, bool, bool]] = {
    "the-data-dir-open": (0, 0o755, "", False, False),
    "the-data-dir-closed": (NOBODY, 0o700, "", False, False),
    "the-data-dir-closed-by-a-unit": (NOBODY, 0o700, "", False, True),
    "above-the-data-dir-closed": (NOBODY, 0o700, "tlsroll", False, False),
    "above-the-data-dir-open": (0, 0o755, "tlsroll", False, False),
    "the-config-in-it-closed": (NOBODY, 0o700, "", True, False),
    "the-config-below-it": (0, 0o755, "tlsroll", True, False),
}


@needs_root
@pytest.mark.parametrize("mounted", [False, True], ids=["not-mounted", "mounted"])
@pytest.mark.parametrize("case", list(UNMOUNTED))
def test_a_mount_point_not_mounted_yet_on_the_data_dirs_way_is_restartable(
    cluster: Cluster, tmp_path: Path, case: str, mounted: bool
) -> None:
    """Review rev50f M2: an empty mountpoint whose disk is not mounted yet is often root's 0700
    (or the directory the data dir is made in): the leader's user may not enter it, and was
    told to chown it, or that the data dir (or the config) is missing, exit 2: stopped for
    good before the disk came. A directory on the way that /etc/fstab or a systemd mount unit
    names as a mount point and that is not mounted now says so, exit 1 (systemd starts it
    again); nothing changed. Mounted (the tables say so: what stops the leader is the
    directory itself), it stays the config error it was. The data dir the mount point itself,
    open and empty (root's 0755): the mount point is said, not "none of the leader's files"
    (that line stays for a mounted one, exit 1 as well)."""
    started = _started_on(cluster, tmp_path, case, mounted, "tlsroll-leader")
    data, result, output, line, said = started
    if mounted and case == "the-data-dir-open":
        assert result.returncode == 1, output
        assert f"{data} holds none of the leader's files" in line, line
        return
    if mounted:
        assert result.returncode == 2, output
        assert "not mounted" not in line, line
        return
    assert result.returncode == 1, output
    assert line == said


def _started_on(
    cluster: Cluster, tmp_path: Path, case: str, mounted: bool, prog: str
) -> tuple[Path, subprocess.CompletedProcess[str], str, str, str]:
    """The daemon ``prog`` started with its data dir (or its config) on ``UNMOUNTED[case]``'s
    mount point, mounted or not (``_run_on``): its data dir, result, output and one line, and
    the line a start on the mount point not mounted says (``_not_mounted_line``)."""
    owner, mode, below, config_in_it, unit = UNMOUNTED[case]
    point = tmp_path / "srv" / "data"
    point.mkdir(parents=True)
    data = point / below if below else point
    env = _mount_tables(tmp_path, point, mounted=mounted, unit=unit)
    leader = prog == "tlsroll-leader"
    argv = (_elsewhere if leader else _agent_elsewhere)(cluster, tmp_path, data)
    config = data / ("leader.toml" if leader else "agent.toml")
    if config_in_it:
        argv[-1] = str(config)
    result, output, line = _run_on(point, owner, mode, argv, env, prog)
    at = config if config_in_it else data
    said = _not_mounted_line(prog, at, point, config=config_in_it, unit=unit)
    return data, result, output, line, said


def _run_on(
    point: Path, owner: int, mode: int, argv: list[str], env: dict[str, str], prog: str
) -> tuple[subprocess.CompletedProcess[str], str, str]:
    """Run a daemon's start (``argv``, without the permission bypass: ``NO_DAC``) with the
    mount point ``point`` given ``owner`` and ``mode`` first: its result, output and one line;
    the mount point left as it was, nothing made in it."""
    os.chown(point, owner, -1)
    point.chmod(mode)
    result = subprocess.run(
        [*NO_DAC, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    output = result.stdout + result.stderr
    st = point.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner, mode)
    assert os.listdir(point) == []  # nothing made
    return result, output, one_line_error(output, prog)


def _not_mounted_line(program: str, at: Path, point: Path, *, config: bool, unit: bool) -> str:
    """A daemon's one line for its data dir or config (``at``) on the mount point ``point``,
    named by fstab or (``unit``) systemd's srv-data.mount, that is not mounted now."""
    named = "config" if config else "data dir"
    where = "systemd's srv-data.mount" if unit else "/etc/fstab"
    way = "is" if at == point else f"is below {point},"
    return (
        f"{program}: the {named} {at} {way} a mount point ({where}) that is not mounted now: is"
        " its disk not mounted yet? (exit 1: a service manager starts the daemon again; run by"
        " hand, start it again once the disk is mounted)"
    )


def test_mount_points_are_read_as_fstab_and_mountinfo_write_them(tmp_path: Path) -> None:
    """Their paths' blanks written in octal (``\\040``); comments, swap and what is not a
    path skipped; the mount point itself or one above it; none when the mounts cannot be
    read (nothing is told then)."""
    root = tmp_path / "tables"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "fstab").write_text(
        "#/dev/vdc /srv/old ext4 defaults 0 2\n"
        "/dev/vdb1 /srv/my\\040disk ext4 defaults 0 2\n"
        "/dev/vda2 none swap sw 0 0\n"
        "/dev/vdd /srv/mounted ext4 defaults 0 2\n"
    )
    env = {fsutil.TEST_MOUNT_ROOT_ENV: str(root)}
    assert fsutil.unmounted_mount_point(Path("/srv/my disk/tlsroll"), env) is None  # unreadable
    (root / "proc" / "self" / "mountinfo").write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "30 22 253:48 / /srv/mounted rw shared:9 - ext4 /dev/vdd rw\n"
    )
    found = fsutil.unmounted_mount_point(Path("/srv/my disk/tlsroll"), env)
    assert found == (Path("/srv/my disk"), "/etc/fstab", False)
    assert fsutil.unmounted_mount_point(Path("/srv/my disk"), env) == found
    assert fsutil.unmounted_mount_point(Path("/srv/mounted/tlsroll"), env) is None
    assert fsutil.unmounted_mount_point(Path("/srv/old/tlsroll"), env) is None
    assert fsutil.unmounted_mount_point(Path("/srv"), env) is None
    (root / "proc" / "self" / "mountinfo").write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "31 22 253:17 / /srv/my\\040disk rw shared:9 - ext4 /dev/vdb1 rw\n"
    )
    assert fsutil.unmounted_mount_point(Path("/srv/my disk/tlsroll"), env) is None


def test_a_mount_point_fstab_spells_through_a_link_is_mounted_on_its_target(
    tmp_path: Path,
) -> None:
    """Review rev51c L4: fstab names the mount point by a path through a symbolic link;
    mountinfo shows the link's target. Mounted there, it is mounted (it was said not mounted
    yet, exit 1 for ever, hiding a real config error)."""
    root = tmp_path / "tables"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "etc").mkdir()
    target = (tmp_path / "disks" / "data").resolve()
    target.mkdir(parents=True)
    link = tmp_path / "srv-data"
    link.symlink_to(target)
    (root / "etc" / "fstab").write_text(f"/dev/vdb1 {link} ext4 defaults 0 2\n")
    env = {fsutil.TEST_MOUNT_ROOT_ENV: str(root)}
    (root / "proc" / "self" / "mountinfo").write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    )
    assert fsutil.unmounted_mount_point(link / "tlsroll", env) == (link, "/etc/fstab", False)
    (root / "proc" / "self" / "mountinfo").write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        f"31 22 253:17 / {target} rw shared:9 - ext4 /dev/vdb1 rw\n"
    )
    assert fsutil.unmounted_mount_point(link / "tlsroll", env) is None


ROOT_MOUNTED = "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"


def _fake_tables(tmp_path: Path, fstab: str, mounts: str = "") -> tuple[Path, dict[str, str]]:
    """A fake /etc/fstab and /proc/self/mountinfo (``/`` mounted, then ``mounts``) under
    ``tmp_path/tables``, and the environment that points the mount check at them."""
    root = tmp_path / "tables"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "fstab").write_text(fstab)
    (root / "proc" / "self" / "mountinfo").write_text(ROOT_MOUNTED + mounts)
    return root, {fsutil.TEST_MOUNT_ROOT_ENV: str(root)}


def test_a_mount_point_is_the_same_whichever_way_it_is_spelled(tmp_path: Path) -> None:
    """Review rev52c L2: an fstab ``noauto`` mount point spelled through a symbolic link was
    one for the data dir spelled through the link (fstab's line: exit 2, left to a person),
    and, spelled by its real path, the unit systemd's fstab generator made of the line (its
    ``Where=`` the real path: exit 1, not mounted yet, started again for ever), or none at all
    without that unit. Mount points are now compared by their real paths on both sides: the
    fstab's line, named as fstab spells it, whichever way the data dir is written. One that
    does not exist (not made yet, a dangling link) is resolved as far as it exists and named
    as fstab spells it."""
    target = (tmp_path / "disks" / "data").resolve()
    target.mkdir(parents=True)
    link = tmp_path / "srv-data"
    link.symlink_to(target)
    dangling = tmp_path / "srv-gone"
    dangling.symlink_to(tmp_path / "disks" / "gone")
    missing = tmp_path / "disks" / "not-made"
    root, env = _fake_tables(
        tmp_path,
        f"/dev/vdb1 {link} ext4 noauto 0 2\n"
        f"/dev/vdc1 {dangling} ext4 noauto 0 2\n"
        f"/dev/vdd1 {missing} ext4 defaults 0 2\n",
    )
    generated = root / "run" / "systemd" / "generator"
    noauto = (link, "/etc/fstab", True)
    for generator in (False, True):
        if generator:  # what systemd's fstab generator makes of the line: its real path
            generated.mkdir(parents=True)
            (generated / "disks-data.mount").write_text(
                f"[Mount]\nWhat=/dev/vdb1\nWhere={target}\n"
            )
        for data in (link / "tlsroll", target / "tlsroll", link, target):
            assert fsutil.unmounted_mount_point(data, env) == noauto, (generator, data)
        for data, way in ((target, "is"), (target / "tlsroll", f"is below {link},")):
            error = fsutil.not_mounted("data dir", data, "tlsroll-leader", env)
            assert isinstance(error, errors.ConfigError)
            assert str(error) == (
                f"config error: /etc/fstab: the data dir {data} {way} a mount point marked"
                " noauto there, which is not mounted now and is never mounted at boot: mount it"
                f" (mount {link}) or remove noauto from its options, then start tlsroll-leader"
                " again"
            )
    # Not there: named as spelled (the dangling link by its own path).
    assert fsutil.unmounted_mount_point(dangling / "tlsroll", env) == (
        dangling,
        "/etc/fstab",
        True,
    )
    assert fsutil.unmounted_mount_point(missing / "tlsroll", env) == (
        missing,
        "/etc/fstab",
        False,
    )
    # Mounted on the target (mountinfo's real path): mounted, whichever way it is spelled.
    (root / "proc" / "self" / "mountinfo").write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        f"31 22 253:17 / {target} rw shared:9 - ext4 /dev/vdb1 rw\n"
    )
    for data in (link / "tlsroll", target / "tlsroll"):
        assert fsutil.unmounted_mount_point(data, env) is None
        assert fsutil.not_mounted("data dir", data, "tlsroll-leader", env) is None


def test_a_mounted_share_fstab_names_is_not_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fstab names every mount of the machine, a NAS's share too: nothing at or below a place
    mountinfo shows mounted (but ``/``) is looked at (a look at a share whose server is down
    waits for that server, and a daemon's start with it: review rev53a M1), whether fstab
    spells the share as it is mounted, through a link, or names a mount point below it; what
    lies below is taken as spelled. The data dir's own noauto mount point is still found."""
    share = (tmp_path / "srv" / "nas").resolve()
    share.mkdir(parents=True)
    (tmp_path / "nas").symlink_to(share)  # as /home -> /srv/home
    data = (tmp_path / "disks" / "data").resolve()
    data.mkdir(parents=True)
    _root, env = _fake_tables(
        tmp_path,
        f"nas:/share {share} nfs defaults 0 0\n"
        f"nas:/share {tmp_path / 'nas'} nfs defaults 0 0\n"
        f"nas:/sub {share / 'sub'} nfs noauto 0 0\n"
        f"/dev/vdb1 {data} ext4 noauto 0 2\n",
        f"40 22 0:50 / {share} rw shared:20 - nfs4 nas:/share rw\n",
    )
    looked: list[Path] = []
    lstat, stat_ = os.lstat, os.stat

    def watched(real: Callable[..., Any]) -> Callable[..., Any]:
        def look(place: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(place, str | Path):
                looked.append(Path(os.fspath(place)))
            return real(place, *args, **kwargs)

        return look

    monkeypatch.setattr(os, "lstat", watched(lstat))
    monkeypatch.setattr(os, "stat", watched(stat_))
    assert fsutil.unmounted_mount_point(data / "tlsroll", env) == (data, "/etc/fstab", True)
    assert looked, "the test looks at what is looked at"
    assert not [p for p in looked if p == share or share in p.parents]
    assert tmp_path / "nas" in looked  # the link itself: on the root file system


def test_a_link_below_a_local_partition_is_resolved_for_the_mount_check(tmp_path: Path) -> None:
    """Review rev53b M: below a mounted local disk (/var on a partition of its own) the way is
    resolved on, as below /: an fstab ``noauto`` mount point spelled through a link there
    (/var/lib/tlsroll -> /srv/disks/data) is the same one whichever way the data dir is
    spelled, with or without the unit systemd's fstab generator makes of it (by its real
    path): exit 2, left to a person. Stopping at every mount point had made it exit 1 for
    ever with the unit, and found nothing without it (the empty directory below taken for the
    data dir)."""
    var = (tmp_path / "var").resolve()
    (var / "lib").mkdir(parents=True)
    target = (tmp_path / "srv" / "disks" / "data").resolve()
    target.mkdir(parents=True)
    link = var / "lib" / "tlsroll"
    link.symlink_to(target)
    root, env = _fake_tables(
        tmp_path,
        f"/dev/vdb1 {link} ext4 noauto 0 2\n",
        f"30 22 253:2 / {var} rw,relatime shared:2 - xfs /dev/vda2 rw\n",
    )
    for generator in (False, True):
        if generator:
            made = root / "run" / "systemd" / "generator"
            made.mkdir(parents=True)
            (made / "srv-disks-data.mount").write_text(f"[Mount]\nWhat=/dev/vdb1\nWhere={target}\n")
        for data in (link / "tlsroll", target / "tlsroll"):
            assert fsutil.unmounted_mount_point(data, env) == (link, "/etc/fstab", True), data
            error = fsutil.not_mounted("data dir", data, "tlsroll-leader", env)
            assert isinstance(error, errors.ConfigError), (generator, data, error)


def test_a_mount_directory_not_made_yet_behind_a_link_is_one_mount_point(tmp_path: Path) -> None:
    """Review rev53c L: fstab's ``noauto`` line names /srv/link/data, /srv/link a link to
    /mnt/disks, whose data directory is made when the disk is mounted. systemd's fstab
    generator resolves what exists and keeps the rest (its unit's ``Where=`` is
    /mnt/disks/data); the line was taken whole as spelled, so the unit and the line were two
    mount points, and a data dir spelled by its real path exited 1 (the unit), started again
    for ever. Both spellings are now the line's: exit 2, left to a person."""
    disks = (tmp_path / "mnt" / "disks").resolve()
    disks.mkdir(parents=True)
    link = tmp_path / "srv-link"
    link.symlink_to(disks)
    spelled = link / "data"
    root, env = _fake_tables(tmp_path, f"/dev/vdb1 {spelled} ext4 noauto 0 2\n")
    made = root / "run" / "systemd" / "generator"
    made.mkdir(parents=True)
    (made / "mnt-disks-data.mount").write_text(f"[Mount]\nWhat=/dev/vdb1\nWhere={disks / 'data'}\n")
    for data in (spelled / "tlsroll", disks / "data" / "tlsroll"):
        assert fsutil.unmounted_mount_point(data, env) == (spelled, "/etc/fstab", True), data
        error = fsutil.not_mounted("data dir", data, "tlsroll-leader", env)
        assert isinstance(error, errors.ConfigError), (data, error)


def _agent_elsewhere(cluster: Cluster, tmp_path: Path, data_dir: Path) -> list[str]:
    """The agent's command with a config of its own in ``tmp_path`` naming ``data_dir``."""
    config = _agent_config(cluster, tmp_path, data_dir=data_dir)
    return [*command("tlsroll-agent", "nodeagent.daemon"), "--config", str(config)]


@needs_root
@pytest.mark.parametrize(
    ("case", "mounted"),
    [
        *((case, False) for case in UNMOUNTED),
        # Mounted, an open one is the agent's to take over and enrol in: only the closed ones.
        *((case, True) for case, (owner, *_) in UNMOUNTED.items() if owner == NOBODY),
    ],
)
def test_a_mount_point_not_mounted_yet_on_the_agents_data_dirs_way_is_restartable(
    cluster: Cluster, tmp_path: Path, case: str, mounted: bool
) -> None:
    """Session 51's open point, the leader's rev50f M2 for the agent: its data dir or config
    below a mount point /etc/fstab or a systemd mount unit names and that is not mounted now
    was told chown, or "no such file", exit 2 (stopped for good before the disk came), or,
    open or missing, made or taken over on the file system below and enrolled there (the
    node's identity lost once the disk came). The mount point is said, exit 1 (systemd starts
    it again), nothing made or changed; mounted, it stays the config error it was."""
    started = _started_on(cluster, tmp_path, case, mounted, "tlsroll-agent")
    _data, result, output, line, said = started
    if mounted:
        assert result.returncode == 2, output
        assert "not mounted" not in line, line
        return
    assert result.returncode == 1, output
    assert line == said


# case -> (the mount point's owner and mode, the data dir below it (or "": the mount point
# itself), the config below it (else beside the test's))
NOAUTO: dict[str, tuple[int, int, str, bool]] = {
    "the-data-dir-open": (0, 0o755, "", False),
    "the-data-dir-closed": (NOBODY, 0o700, "", False),
    "the-config-below-it": (0, 0o755, "tlsroll", True),
}


@needs_root
@pytest.mark.parametrize("case", list(NOAUTO))
@pytest.mark.parametrize("prog", ["tlsroll-leader", "tlsroll-agent"])
def test_a_noauto_mount_point_not_mounted_stops_the_daemon_for_a_person(
    cluster: Cluster, tmp_path: Path, prog: str, case: str
) -> None:
    """Session 51's open point: a mount point /etc/fstab marks ``noauto`` is mounted by a
    person only; not mounted, it was a disk not mounted yet, exit 1, and the service manager
    started the daemon again for ever. Now exit 2 (not started again), one line naming the
    mount point, that it is noauto in /etc/fstab and what to do: mount it or remove noauto,
    then start the daemon again. Nothing made or changed."""
    owner, mode, below, config_in_it = NOAUTO[case]
    point = tmp_path / "srv" / "data"
    point.mkdir(parents=True)
    data = point / below if below else point
    env = _mount_tables(tmp_path, point, mounted=False, unit=False, noauto=True)
    if prog == "tlsroll-leader":
        argv, config = _elsewhere(cluster, tmp_path, data), data / "leader.toml"
    else:
        argv, config = _agent_elsewhere(cluster, tmp_path, data), data / "agent.toml"
    if config_in_it:
        argv[-1] = str(config)
    result, output, line = _run_on(point, owner, mode, argv, env, prog)
    assert result.returncode == 2, output
    named, at = ("config", config) if config_in_it else ("data dir", data)
    way = "is" if at == point else f"is below {point},"
    assert line == (
        f"{prog}: config error: /etc/fstab: the {named} {at} {way} a mount point marked"
        " noauto there, which is not mounted now and is never mounted at boot: mount it"
        f" (mount {point}) or remove noauto from its options, then start {prog} again"
    ), line


def test_noauto_is_read_from_an_fstab_lines_options(tmp_path: Path) -> None:
    """A mount point whose fstab line has ``noauto`` among its options (its 4th field: split at
    the commas outside double quotes, written in octal as its paths are) is one nothing mounts
    at boot; ``noauto`` within a quoted value, or a longer word, is not; nor is a line without
    options, or one an admin's systemd unit overrides (/etc/systemd/system: systemd takes it
    in place of the unit its fstab generator makes of the line, which has no say)."""
    root = tmp_path / "tables"
    (root / "proc" / "self").mkdir(parents=True)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    generated = root / "run" / "systemd" / "generator"
    generated.mkdir(parents=True)
    (root / "etc" / "fstab").write_text(
        "/dev/vdb /srv/a ext4 noauto 0 2\n"
        "/dev/vdc /srv/b ext4 defaults,noauto,nofail 0 2\n"
        '/dev/vdd /srv/c ext4 context="system_u:object_r:a_t:s0,noauto",rw 0 2\n'
        "/dev/vde /srv/d ext4 rw\\054noauto 0 2\n"
        "/dev/vdf /srv/e ext4 noautomatic 0 2\n"
        "/dev/vdg /srv/f ext4\n"
        "/dev/vdh /srv/g ext4 noauto 0 2\n"
        "/dev/vdi /srv/h ext4 noauto 0 2\n"
        # review rev52c: mounted at first access or pulled in by a unit; the last word wins
        "nas:/x /srv/i nfs noauto,x-systemd.automount,_netdev 0 0\n"
        "nas:/y /srv/j nfs noauto,x-systemd.wanted-by=multi-user.target 0 0\n"
        "/dev/vdj /srv/k ext4 noauto,auto 0 2\n"
        "/dev/vdk /srv/l ext4 auto,noauto 0 2\n"
        "nas:/z /srv/m nfs noauto,comment=systemd.automount 0 0\n"
    )
    (units / "srv-g.mount").write_text("[Mount]\nWhat=/dev/vdh\nWhere=/srv/g\n")
    (generated / "srv-h.mount").write_text("[Mount]\nWhat=/dev/vdi\nWhere=/srv/h\n")
    (root / "proc" / "self" / "mountinfo").write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    )
    env = {fsutil.TEST_MOUNT_ROOT_ENV: str(root)}
    found = {
        name: fsutil.unmounted_mount_point(Path(f"/srv/{name}/tlsroll"), env)
        for name in "abcdefghijklm"
    }
    assert found == {
        "a": (Path("/srv/a"), "/etc/fstab", True),
        "b": (Path("/srv/b"), "/etc/fstab", True),
        "c": (Path("/srv/c"), "/etc/fstab", False),
        "d": (Path("/srv/d"), "/etc/fstab", True),
        "e": (Path("/srv/e"), "/etc/fstab", False),
        "f": (Path("/srv/f"), "/etc/fstab", False),
        "g": (Path("/srv/g"), "systemd's srv-g.mount", False),
        "h": (Path("/srv/h"), "/etc/fstab", True),
        "i": (Path("/srv/i"), "/etc/fstab", False),
        "j": (Path("/srv/j"), "/etc/fstab", False),
        "k": (Path("/srv/k"), "/etc/fstab", False),
        "l": (Path("/srv/l"), "/etc/fstab", True),
        "m": (Path("/srv/m"), "/etc/fstab", False),
    }


def test_not_mounted_is_a_restart_or_for_a_noauto_mount_point_a_config_error(
    tmp_path: Path,
) -> None:
    """``fsutil.not_mounted``, both daemons' line: a disk not mounted yet is a TerminalError
    (exit 1: started again), a ``noauto`` one the fstab's ConfigError (exit 2), its ``mount``
    command quoted for the shell; None when the mount point is mounted."""
    root = tmp_path / "tables"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "fstab").write_text(
        "/dev/vdb /srv/my\\040disk ext4 noauto 0 2\n/dev/vdc /srv/auto ext4 defaults 0 2\n"
    )
    mountinfo = root / "proc" / "self" / "mountinfo"
    mountinfo.write_text("22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n")
    env = {fsutil.TEST_MOUNT_ROOT_ENV: str(root)}
    later = fsutil.not_mounted("data dir", Path("/srv/auto"), "tlsroll-agent", env)
    assert type(later) is errors.TerminalError
    assert str(later) == (
        "the data dir /srv/auto is a mount point (/etc/fstab) that is not mounted now: is its"
        " disk not mounted yet? (exit 1: a service manager starts the daemon again; run by"
        " hand, start it again once the disk is mounted)"
    )
    noauto = fsutil.not_mounted("config", Path("/srv/my disk/agent.toml"), "tlsroll-agent", env)
    assert isinstance(noauto, errors.ConfigError)
    assert str(noauto) == (
        "config error: /etc/fstab: the config /srv/my disk/agent.toml is below /srv/my disk, a"
        " mount point marked noauto there, which is not mounted now and is never mounted at"
        " boot: mount it (mount '/srv/my disk') or remove noauto from its options, then start"
        " tlsroll-agent again"
    )
    mountinfo.write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "31 22 253:17 / /srv/my\\040disk rw shared:9 - ext4 /dev/vdb rw\n"
    )
    assert fsutil.not_mounted("config", Path("/srv/my disk/agent.toml"), "x", env) is None


def test_a_writable_directory_access_denies_is_not_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s50lead L2: under a seccomp filter that answers faccessat2 with EPERM (an
    older systemd's SystemCallErrorNumber=EPERM, glibc 2.33 or later) access() says no to a
    directory we may write, and the leader stopped for good with a line contradicting
    itself. Where the owner and mode say we may, no problem is reported."""
    tmp_path.chmod(0o700)  # ours
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
    assert fsutil.dir_write_problem(tmp_path) is None
    # The workstation's check of the directory it will make (under one that exists) alike.
    assert fsutil.private_dir_problem(tmp_path / "to-be-made" / "inside") is None


def test_a_fifo_swapped_in_after_the_look_does_not_hang_the_check(tmp_path: Path) -> None:
    """Review of s50lead L3: ``open_problem`` opened what it had stat-ed without O_NONBLOCK:
    a FIFO swapped in between the two hung the leader's start. Here the stat sees a regular
    file (the one before the swap), the open a FIFO without a writer: said, not waited on.
    (The child's timeout only ends a hang.)"""
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo, 0o600)
    regular = tmp_path / "before-the-swap"
    regular.write_bytes(b"")
    script = (
        "import os, sys\n"
        "from tlsroll import fsutil\n"
        "real = os.stat\n"
        "os.stat = lambda p, *a, **k: real(sys.argv[2] if str(p) == sys.argv[1] else p, *a, **k)\n"
        "print(fsutil.open_problem(sys.argv[1]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(fifo), str(regular)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == f"{fifo} is not a regular file (a FIFO)", result.stdout


def test_read_regular_reads_a_regular_file_and_never_waits_on_anything_else(
    tmp_path: Path,
) -> None:
    """``fsutil.read_regular``, the agent's reader of the files it finds at start (review
    rev50a L2: a FIFO read blocked for ever): a regular file's bytes; a FIFO, directory,
    socket or device is ``NotRegularFile`` naming its kind, never opened; a FIFO swapped in
    after its stat (the stat sees the regular file before the swap) is judged on the
    descriptor, opened without blocking. In a child: its timeout only ends a hang."""
    regular = tmp_path / "record"
    regular.write_bytes(b"0123456789")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    sock_path = tmp_path / "sock"
    script = (
        "import os, socket, sys\n"
        "from tlsroll import fsutil\n"
        "from tlsroll.errors import NotRegularFile\n"
        "fifo, regular, sock_path, directory = sys.argv[1:]\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sock_path)\n"
        "print(fsutil.read_regular(regular))\n"
        "for path in (fifo, directory, sock_path, '/dev/null'):\n"
        "    try:\n"
        "        fsutil.read_regular(path)\n"
        "    except NotRegularFile as exc:\n"
        "        print(exc)\n"
        "real = os.stat\n"
        "os.stat = lambda p, *a, **k: real(regular if str(p) == fifo else p, *a, **k)\n"
        "try:\n"
        "    fsutil.read_regular(fifo)\n"
        "except NotRegularFile as exc:\n"
        "    print('swapped:', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(fifo), str(regular), str(sock_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.splitlines() == [
        "b'0123456789'",
        f"{fifo} is not a regular file (a FIFO)",
        f"{tmp_path} is not a regular file (a directory)",
        f"{sock_path} is not a regular file (a socket)",
        "/dev/null is not a regular file (a character device)",
        f"swapped: {fifo} is not a regular file (a FIFO)",
    ], result.stdout


def test_a_secret_file_swapped_for_a_fifo_after_its_check_is_not_waited_on(
    tmp_path: Path,
) -> None:
    """The ops review of session 63 (every secret file read without a wait for a writer): the
    leader's CA passphrase (``layout.read_passphrase``: the start and ``tlsroll init``) and
    its /metrics token were checked (``check_private_file``: a stat), then opened blocking:
    a FIFO swapped in between waited for a writer for ever. Read as the agent's secrets are
    (``fsutil.read_regular``): NotRegularFile, at once. The stat is made to see the regular
    file (the swap); in a child, whose timeout only ends a hang."""
    regular = tmp_path / "secret"
    regular.write_bytes(b"0123456789abcdefghij\n")
    regular.chmod(0o600)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    script = (
        "import os, sys, types\n"
        "from pathlib import Path\n"
        "from leader import layout\n"
        "from leader.viewer import server\n"
        "from tlsroll.errors import TerminalError\n"
        "fifo, regular = sys.argv[1:]\n"
        "print(layout.read_passphrase(Path(regular)))\n"
        "real = os.stat\n"
        "os.stat = lambda p, *a, **k: real(regular if str(p) == fifo else p, *a, **k)\n"
        "try:\n"
        "    layout.read_passphrase(Path(fifo))\n"
        "except TerminalError as exc:\n"
        "    print('passphrase:', exc)\n"
        "cfg = types.SimpleNamespace(metrics_token_file=Path(fifo), path=Path('leader.toml'))\n"
        "try:\n"
        "    server.read_scrape_token(cfg)\n"
        "except TerminalError as exc:\n"
        "    print('token:', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(fifo), str(regular)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.splitlines() == [
        "b'0123456789abcdefghij'",
        f"passphrase: {fifo} is not a regular file (a FIFO)",
        f"token: config error: leader.toml: [leader].metrics_token_file: {fifo} is not a "
        "regular file (a FIFO)",
    ], result.stdout


def test_an_admin_socket_made_too_long_by_the_data_dir_names_the_data_dir(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 100)
    config = write_toml(
        tmp_path / "leader.toml", {"leader": {"address": "127.0.0.2", "data_dir": deep}}
    )
    result = run_daemon("tlsroll-leader", "leader.daemon", config)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-leader")
    assert f"config error: {config}: [leader].data_dir: the admin socket in it, {deep}" in line
    assert "set admin_socket to a shorter path" in line


def _agent_config(cluster: Cluster, root: Path, **agent: object) -> Path:
    tables = cluster.agent_config("n9", "127.0.0.9", "abc.def", root)
    tables["agent"].update(agent)
    return write_toml(root / "agent.toml", tables)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_an_agent_join_token_file_that_is_no_file_is_said_so(
    cluster: Cluster, tmp_path: Path, kind: str
) -> None:
    token = tmp_path / "token"
    if kind == "directory":
        token.mkdir(mode=0o755)
    else:
        os.mkfifo(token, 0o600)  # it was opened and waited on for ever
    tables = cluster.agent_config("n9", "127.0.0.9", None, tmp_path)
    tables["leader"].update(join_token=None, join_token_file=token)
    config = write_toml(tmp_path / "agent.toml", tables)
    result = run_daemon("tlsroll-agent", "nodeagent.daemon", config)
    line = one_line_error(result.stderr, "tlsroll-agent")
    assert result.returncode == 2, result.stderr
    kind_text = "a directory" if kind == "directory" else "a FIFO"
    assert f"{token} is not a regular file ({kind_text})" in line, line
    assert "chmod" not in line, line


@pytest.mark.parametrize(("content", "said"), [(b" \n", "empty"), (b"\xff\xfe", "not UTF-8 text")])
def test_an_agent_join_token_file_empty_or_not_utf8_is_a_config_error(
    cluster: Cluster, tmp_path: Path, content: bytes, said: str
) -> None:
    """Review s66 walk L2: a join token file that is empty (install.sh leaves one so until the
    join script fills it) or not UTF-8 text ended the agent with exit 1, which its unit
    restarts on: every 2 s for ever. Now exit 2 (a config error, never restarted), one line
    naming the key and the file, as for a missing file; nothing is written."""
    token = tmp_path / "token"
    token.write_bytes(content)
    token.chmod(0o600)
    tables = cluster.agent_config("n9", "127.0.0.9", None, tmp_path)
    tables["leader"].update(join_token=None, join_token_file=token)
    config = write_toml(tmp_path / "agent.toml", tables)
    result = run_daemon("tlsroll-agent", "nodeagent.daemon", config)
    line = one_line_error(result.stderr, "tlsroll-agent")
    assert result.returncode == 2, result.stderr
    assert f"config error: {config}: [leader].join_token_file: {token} is {said}; " in line, line
    assert "it must hold the join token" in line, line
    assert not (tmp_path / "data" / "node.key").exists()


# --- L9: agent.toml's data_dir and ports ------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "problem"),
    [
        ({"data_dir": "agent-data"}, "[agent].data_dir: 'agent-data' is not an absolute path"),
        ({"port": 9500, "bootstrap_port": 9500}, "[agent].bootstrap_port: 9500 is port too"),
    ],
)
def test_an_agent_config_with_a_relative_data_dir_or_one_port_twice_is_refused(
    cluster: Cluster, tmp_path: Path, agent: dict[str, object], problem: str
) -> None:
    config = _agent_config(cluster, tmp_path, **agent)
    result = subprocess.run(
        [*command("tlsroll-agent", "nodeagent.daemon"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-agent")
    assert f"config error: {config}: {problem}" in line, line
    assert not (tmp_path / "agent-data").exists()  # nothing made where it was started


@pytest.mark.parametrize("which", ["data dir", "journal", "append-only data dir"])
def test_an_immutable_agent_data_dir_or_journal_is_said_to_be_an_attribute(
    cluster: Cluster, tmp_path: Path, which: str
) -> None:
    """Review rev50e: a data dir or journal made immutable (``chattr +i``; root can, with
    CAP_LINUX_IMMUTABLE, and root cannot write it then, nor chmod it): the line said the
    chmod's bare "Operation not permitted" (the data dir) or the open's (the journal), and
    the data dir checks advise ``chmod u+rwx`` where its mode says no. Now: not its mode but
    an attribute, how to see it (``lsattr``) and clear it (``chattr -i``), exit 2. A real
    attribute on a real file system (the test's tmp dir: ext4 here and in CI)."""
    data = tmp_path / "agent-data"
    data.mkdir(mode=0o700)
    journal = data / "journal.sqlite3"
    if which == "journal":
        journal.touch(mode=0o600)
    target = journal if which == "journal" else data
    config = _agent_config(cluster, tmp_path, data_dir=data)
    undo = _append_only(target) if which == "append-only data dir" else _immutable(target)
    try:
        result = subprocess.run(
            [*command("tlsroll-agent", "nodeagent.daemon"), "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    finally:
        undo()
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-agent")
    mode = "0600" if which == "journal" else "0700"
    look = f"lsattr {target}" if which == "journal" else f"lsattr -d {target}"
    which_, letter = ("append-only", "a") if which == "append-only data dir" else ("immutable", "i")
    assert (
        f"{target} cannot be changed by root (uid 0): not its mode (owner root (uid 0), mode "
        f"{mode}) but an attribute: it is {which_} (chattr +{letter}, `{look}` shows it); run: "
        f"chattr -{letter} {target}"
    ) in line, line
    assert "chmod" not in line, line
    made = ["journal.sqlite3"] if which == "journal" else []
    assert sorted(p.name for p in data.iterdir()) == made  # nothing made


@pytest.mark.parametrize("errno_", ["EPERM", "ENOTTY"])
def test_a_kernel_refusing_attributes_skips_the_attribute_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: str
) -> None:
    """Review rev51d L5: where the kernel refuses FS_IOC_SETFLAGS (no CAP_LINUX_IMMUTABLE:
    EPERM; a file system without attributes, tmpfs: ENOTTY) the attribute tests are skipped
    with that reason, not failed with an OSError. (Here they run: root, ext4.)"""
    ioctl = fcntl.ioctl
    code = getattr(__import__("errno"), errno_)

    def refusing(fd: int, request: int, arg: bytearray) -> object:
        if request == _FS_IOC_SETFLAGS:
            raise OSError(code, os.strerror(code))
        return ioctl(fd, request, arg)

    monkeypatch.setattr(fcntl, "ioctl", refusing)
    with pytest.raises(pytest.skip.Exception, match=re.escape(os.strerror(code))):
        _immutable(tmp_path)
    assert not (fsutil.file_attributes(tmp_path) or 0) & fsutil.FS_IMMUTABLE_FL


def test_the_attribute_advice_names_a_linked_directory_itself(tmp_path: Path) -> None:
    """Review rev51d L1: a data dir reached through a symbolic link, made immutable: the
    advice named the link (``lsattr -d LINK`` lists the link's target's entries' attributes
    and ``chattr -i LINK`` fails on a link): now the directory itself."""
    real = Path(os.path.realpath(tmp_path)) / "data"
    real.mkdir(mode=0o700)
    link = tmp_path / "data-link"
    link.symlink_to(real)
    undo = _immutable(real)
    try:
        problem = fsutil.dir_write_problem(link)
    finally:
        undo()
    assert problem is not None
    assert f"`lsattr -d {real}` shows it" in problem, problem
    assert f"run: chattr -i {real}" in problem, problem
    assert f"chattr -i {link}" not in problem, problem


def test_an_append_only_directory_is_reported(tmp_path: Path) -> None:
    """Review rev51d L2: an append-only directory (``chattr +a``) passes access(W_OK), but
    nothing in it can be removed or renamed over (EPERM, for root too: SQLite's -wal and
    -shm, every atomic write's rename): reported as an immutable one is."""
    data = Path(os.path.realpath(tmp_path)) / "data"
    data.mkdir(mode=0o700)
    undo = _append_only(data)
    try:
        problem = fsutil.dir_write_problem(data)
    finally:
        undo()
    assert problem is not None
    assert "it is append-only (chattr +a" in problem, problem
    assert f"run: chattr -a {data}" in problem, problem
    assert fsutil.dir_write_problem(data) is None  # cleared: nothing to report


# --- L2 (the reference server's files): a FIFO is refused, not waited on ---------------------


def test_a_refserver_cert_file_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo, 0o600)
    config = write_toml(
        tmp_path / "refserver.toml",
        {
            "server": {
                "address": "127.0.0.9",
                "app_path": "/praxis_live/",
                "listen": ["https"],
                "data_dir": tmp_path / "data",
                "admin_socket": tmp_path / "a.sock",
                "cert_file": fifo,
                "key_file": fifo,
            }
        },
    )
    result = run_daemon("tlsroll-refserver", "refserver.daemon", config)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-refserver")
    assert f"[server].cert_file: {fifo} is not a regular file (a FIFO)" in line, line


# --- L3: --cert-dir files that are there and cannot be read: why, not "missing" ---------------


def _bad_cert_dir(root: Path) -> Path:
    """ca.crt a FIFO (no writer: it was opened and waited on for ever), n1.crt a directory,
    n1.key a link to /dev/zero, n2.crt too large for a certificate, n2.key a good key, n3's
    files good."""
    practice = make_ca("Praxis CA")
    cert, key = leaf(practice, ["127.0.0.9"], cn="n3")
    d = write_dir(root, practice, {"n2": (b"", key), "n3": (pem(cert), key)})
    (d / "ca.crt").unlink()
    os.mkfifo(d / "ca.crt", 0o644)
    (d / "n1.crt").mkdir()
    (d / "n1.key").symlink_to("/dev/zero")
    (d / "n2.crt").write_bytes(b"-" * 70_000)
    return d


def test_cert_dir_files_that_cannot_be_read_are_refused_with_why(tmp_path: Path) -> None:
    """Read as empty, each with why; ``validate`` (the leader's, which knows the nodes a
    rollout touches) says why in place of "missing" for ca.crt and the nodes touched, and
    ignores the files of the others (review s48rev3: the CLI refused a cluster-wide plan for
    them). The plan and start through a real leader: test_byo.py."""
    material = byo.read_cert_dir(_bad_cert_dir(tmp_path / "certs"))
    assert material.unreadable == {
        "ca.crt": "is not a regular file (a FIFO)",
        "n1.crt": "is not a regular file (a directory)",
        "n1.key": "is not a regular file (a character device)",
        "n2.crt": "is larger than 65536 bytes: not a certificate or key",
    }
    assert material.ca_pem == b"" and material.nodes["n1"].chain_pem == b""
    assert material.nodes["n2"].key_mode == 0o600 and material.nodes["n3"].chain_pem

    def problems(*nodes: str) -> list[str]:
        expected = {n: byo.Expected(pki.Names.of(n, ["127.0.0.9"], [])) for n in nodes}
        found = byo.validate(material, expected, now=NOW, horizon=dt.timedelta(days=30))
        return [str(p) for p in found]

    ca_line = (
        "ca: ca.crt: is not a regular file (a FIFO); put the practice CA's certificate (PEM) "
        "in DIR/ca.crt as a readable file"
    )
    assert problems("n2") == [
        ca_line,
        "n2: n2.crt: is larger than 65536 bytes: not a certificate or key; put n2's "
        "certificate (PEM) in DIR/n2.crt as a readable file",
    ]
    both = problems("n1", "n2")
    assert both[1:3] == [
        "n1: n1.crt: is not a regular file (a directory); put n1's certificate (PEM) in "
        "DIR/n1.crt as a readable file",
        "n1: n1.key: is not a regular file (a character device); put n1's private key in "
        "DIR/n1.key as a readable file",
    ]
    assert len(both) == 4 and not any("missing" in line for line in both), both


# --- L9: init's CA passphrase has the length of a password the admin chooses ----------------


def test_init_refuses_a_ca_passphrase_shorter_than_12_characters(tmp_path: Path) -> None:
    passphrase = tmp_path / "passphrase"
    with Cluster(tmp_path / "c", next_loopback()) as fresh:
        args = ["init", "--data-dir", str(fresh.data_dir), "--address", fresh.address]
        args += ["--ca-passphrase-file", str(passphrase)]
        for short in ("short", "ä" * 11):
            passphrase.write_text(short + "\n")
            passphrase.chmod(0o600)
            result = fresh.cli(*args)
            assert result.returncode == 1, result.stderr
            line = one_line_error(result.stderr, "tlsroll")
            assert (
                f"the CA passphrase in {passphrase} has {len(short)} characters; it encrypts "
                "the CA key at rest and needs at least 12"
            ) in line, line
            assert short not in line
            assert not fresh.data_dir.exists()  # nothing made
        passphrase.write_text("ä" * 12 + "\n")
        result = fresh.cli(*args)
        assert result.returncode == 0, result.stderr


# --- review s48rev3 M1, M2: a NUL in a config, a token in the wrong key, the daemons' catch-all -

TOKEN = "k3x9qa.mfrgg2lbmfrgg2lbmfrgg2lbmf"  # a join token's shape (leader.tokens)
TOKEN_SECRET = TOKEN.split(".", 1)[1]


def _refserver_config(root: Path, **server: object) -> Path:
    settings: dict[str, object] = {
        "address": "127.0.0.9",
        "app_path": "/praxis_live/",
        "listen": ["http"],
        "data_dir": root / "data",
        "admin_socket": root / "a.sock",
    }
    settings.update(server)
    return write_toml(root / "refserver.toml", {"server": settings})


@pytest.mark.parametrize(
    ("key", "value"),
    [("data_dir", "/x\x00y"), ("admin_socket", "/tmp/a\x00b"), ("ca_passphrase_file", "/a\x00")],
)
def test_a_nul_in_the_leaders_config_is_a_config_error_naming_the_key(
    cluster: Cluster, key: str, value: str
) -> None:
    line = _leader_refuses(cluster, {key: value})
    assert (
        f"config error: {cluster.config_path}: [leader].{key}: holds a control character (\\x00)"
    ) in line, line


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("agent", "data_dir", "/x\x00y"),
        ("leader", "join_token_file", "/a\x00b"),
        ("node", "name", "n9\x1b[2J"),
    ],
)
def test_a_control_character_in_an_agent_config_is_a_config_error_naming_the_key(
    cluster: Cluster, tmp_path: Path, table: str, key: str, value: str
) -> None:
    tables = cluster.agent_config("n9", "127.0.0.9", None, tmp_path)
    tables[table][key] = value
    config = write_toml(tmp_path / "agent.toml", tables)
    result = run_daemon("tlsroll-agent", "nodeagent.daemon", config)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-agent")
    assert f"config error: {config}: [{table}].{key}: holds a control character (" in line, line
    assert "\x1b" not in result.stderr


def test_a_nul_in_the_refservers_config_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    config = _refserver_config(tmp_path, data_dir="/x\x00y")
    result = run_daemon("tlsroll-refserver", "refserver.daemon", config)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-refserver")
    assert f"config error: {config}: [server].data_dir: holds a control character (\\x00)" in line


def test_a_join_token_written_as_the_join_token_file_is_a_config_error_not_repeated(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The likely slip ``join_token_file = "<id>.<secret>"`` (for ``join_token``): exit 2, which
    its unit does not restart on, and the token never printed (stderr is the journal)."""
    tables = cluster.agent_config("n9", "127.0.0.9", None, tmp_path)
    tables["leader"].update(join_token=None, join_token_file=TOKEN)
    config = write_toml(tmp_path / "agent.toml", tables)
    result = run_daemon("tlsroll-agent", "nodeagent.daemon", config)
    assert TOKEN_SECRET not in result.stderr + result.stdout
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-agent")
    assert f"config error: {config}: [leader].join_token_file: " in line, line
    assert "(id k3x9qa; its secret not shown)" in line and "no such file" in line, line


@pytest.mark.parametrize(("table", "key"), [("agent", "log_level"), ("node", "addresses")])
def test_a_token_pasted_into_another_agent_key_is_not_repeated(
    cluster: Cluster, tmp_path: Path, table: str, key: str
) -> None:
    tables = cluster.agent_config("n9", "127.0.0.9", None, tmp_path)
    tables[table][key] = [TOKEN] if key == "addresses" else TOKEN
    config = write_toml(tmp_path / "agent.toml", tables)
    result = run_daemon("tlsroll-agent", "nodeagent.daemon", config)
    assert TOKEN_SECRET not in result.stderr + result.stdout
    assert result.returncode == 2, result.stderr
    assert f"[{table}].{key}" in one_line_error(result.stderr, "tlsroll-agent")


@pytest.mark.parametrize("key", ["log_level", "maintenance_timezone", "address"])
def test_a_token_pasted_into_a_leader_key_is_not_repeated(cluster: Cluster, key: str) -> None:
    line = _leader_refuses(cluster, {key: TOKEN})
    assert TOKEN_SECRET not in line and f"[leader].{key}" in line, line


# What each daemon's main calls first that can fail: made to fail as nothing foreseen does.
_UNFORESEEN = {
    "tlsroll-leader": ("leader.runtime", "LeaderConfig.load"),
    "tlsroll-agent": ("nodeagent.runtime", "AgentConfig.load"),
    "tlsroll-refserver": ("refserver.server", "refserver_config.load"),
}


@pytest.mark.parametrize("prog", sorted(_UNFORESEEN))
@pytest.mark.parametrize("debug", [False, True])
def test_an_error_nobody_foresaw_in_a_daemon_is_one_line_with_its_type_only(
    tmp_path: Path, prog: str, debug: bool
) -> None:
    module, attr = _UNFORESEEN[prog]
    owner, _, name = attr.rpartition(".")
    script = (
        "import sys, importlib\n"
        f"m = importlib.import_module({module!r})\n"
        "def boom(*a, **k):\n"
        f"    raise RuntimeError('bug holding {TOKEN}')\n"
        f"setattr(getattr(m, {owner!r}), {name!r}, boom)\n"
        f"sys.argv[0] = {prog!r}\n"
        "sys.exit(m.main(['--config', sys.argv[1]]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TLSROLL_DEBUG"}
    if debug:
        env["TLSROLL_DEBUG"] = "1"
    # there (its load is the bug): a config missing from an empty directory is a disk not
    # mounted yet, said before the config is read (``leader.front.config_not_yet_there``)
    (tmp_path / "any.toml").write_text("")
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "any.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"{prog}: internal error: RuntimeError; run it again with "), last
    if debug:
        assert "Traceback" in result.stderr
    else:
        assert one_line_error(result.stderr, prog) == last
    # (its traceback too: TLSROLL_DEBUG left in a unit's environment, audit s75 knobaudit)
    assert TOKEN_SECRET not in result.stderr + result.stdout


# --- s49agentexit: the agent's key readable by others, a token file too, a damaged identity ---


# The agents the tests below take (``_enrolled_agent``), by name: True for those with their
# token in a file (``join_token_file``). The first test to ask for one enrols them all under
# one start of the leader: each enrolled under its own start, the module started and stopped
# the leader eleven times more (some 20 s of a CI run, session 73).
ENROLLED = {
    **dict.fromkeys(("dkey", "dcert", "dca", "dkey2", "dkey3", "mkey", "mca"), False),
    **dict.fromkeys(("mpin", "agentfiles"), False),
    **dict.fromkeys(("mnames", "eback", "nospiffe"), True),
}
_ENROLLED: dict[str, Agent] = {}
_ENROLLED_IN: list[Cluster] = []  # the cluster they are of (the module's)


def _enrolled_agent(cluster: Cluster, name: str, *, token_file: bool = False) -> Agent:
    """An agent that enrolled (its identity in its data dir), stopped, as is the leader; each
    name (``ENROLLED``) is one test's own agent, enrolled with every other on first use."""
    assert ENROLLED[name] == token_file, name
    if not _ENROLLED_IN or _ENROLLED_IN[0] is not cluster:
        _ENROLLED.clear()
        cluster.start_leader()
        try:
            for each, in_file in ENROLLED.items():  # all started, then each waited for
                agent = cluster.add_agent(each, next_loopback(), token_file=in_file, start=False)
                agent.spawn()
                _ENROLLED[each] = agent
            for agent in _ENROLLED.values():
                agent.wait_ready()  # (it has enrolled)
            for agent in _ENROLLED.values():
                assert agent.stop() == 0
        finally:
            cluster.stop_leader()
        _ENROLLED_IN[:] = [cluster]
    return _ENROLLED[name]


def test_an_agent_join_token_file_others_can_read_is_a_config_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    tables = cluster.agent_config("n9", "127.0.0.9", None, tmp_path)
    tables["leader"].update(join_token=None, join_token_file=token)
    config = write_toml(tmp_path / "agent.toml", tables)
    result = run_daemon("tlsroll-agent", "nodeagent.daemon", config)
    assert TOKEN_SECRET not in result.stderr + result.stdout
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-agent")
    assert f"config error: {config}: [leader].join_token_file: {token} is accessible" in line
    assert f"run: chmod 600 {token}" in line, line


@pytest.mark.parametrize("damaged", ["node.key", "node.pem", "ca.pem"])
def test_a_damaged_agent_identity_file_is_a_config_error_naming_it(
    cluster: Cluster, damaged: str
) -> None:
    """A key, certificate or CA file that is not PEM: exit 2 with one line naming the file and
    the way back (move it aside, enrol again), never a traceback nor the key."""
    name = {"node.key": "dkey", "node.pem": "dcert", "ca.pem": "dca"}[damaged]
    agent = _enrolled_agent(cluster, name)
    path = agent.data_dir / damaged
    path.write_bytes(b"-----BEGIN garbage-----\n")
    code, output = agent.run_to_exit(timeout=30)
    assert code == 2, output
    line = one_line_error(output, "tlsroll-agent")
    assert f": {path}: " in line, line
    assert f"mv {path} {path}.damaged" in line, line
    assert f"tlsroll token create --node {name} --address" in line, line
    assert (f"tlsroll nodes remove {name}" in line) == (damaged == "node.key"), line
    assert "PRIVATE KEY" not in output


def test_a_damaged_agent_key_with_no_certificate_is_a_config_error(cluster: Cluster) -> None:
    """A damaged key where the node has no certificate (an enrolment cut short, or node.pem
    moved aside): exit 2 naming the key and the way on, as with its certificate there (it
    exited 1: the enrolment read the key and failed on it, restarted for ever)."""
    agent = _enrolled_agent(cluster, "dkey2")
    agent.cert_file.unlink()
    key = agent.key_file
    key.write_bytes(b"-----BEGIN garbage-----\n")
    line = _refused(agent)
    assert f"config error: node key: {key}: " in line, line
    assert f"mv {key} {key}.damaged" in line, line
    assert "tlsroll nodes remove dkey2" in line, line


def test_a_damaged_agent_key_while_a_renewal_waits_is_refused_with_every_file_kept(
    cluster: Cluster,
) -> None:
    """A damaged node.key while a renewal's node.pem.new waits (its key moved into place
    already, the crash before the certificate's rename): exit 2 naming the key, and every
    file as it was (node.pem.new was deleted before the refusal: a state change, and the
    renewal's certificate lost, before the admin had looked)."""
    agent = _enrolled_agent(cluster, "dkey3")
    key = agent.key_file
    pending = agent.data_dir / "node.pem.new"
    pending.write_bytes(agent.cert_file.read_bytes())
    key.write_bytes(b"-----BEGIN garbage-----\n")
    before = _file_state(agent.data_dir)
    line = _refused(agent)
    assert f"config error: node key: {key}: " in line, line
    assert f"mv {key} {key}.damaged" in line, line
    assert pending.exists()
    after = _file_state(agent.data_dir)
    assert {k: v for k, v in after.items() if k != "agent.log"} == {
        k: v for k, v in before.items() if k != "agent.log"
    }


# --- s50agent: an identity whose files do not go together, or not with the config: exit 2 ---


def _refused(agent: Agent) -> str:
    """The agent's one line, exit 2 (its unit does not restart it: restarting changes nothing;
    these exited 1 and were started again every few seconds for ever)."""
    code, output = agent.run_to_exit(timeout=30)
    assert code == 2, output
    assert "PRIVATE KEY" not in output
    return one_line_error(output, "tlsroll-agent")


def test_an_agent_certificate_not_of_its_key_is_a_config_error(cluster: Cluster) -> None:
    """node.pem is not node.key's (one replaced, or restored from another copy): the key back
    if there is one, else node.pem aside and the key enrolled again with a new token."""
    agent = _enrolled_agent(cluster, "mkey")
    pki.write_key(agent.key_file, pki.generate_key())
    line = _refused(agent)
    cert, key = agent.cert_file, agent.key_file
    assert f"config error: node certificate: {cert} is not the certificate of {key}" in line
    assert "put it back" in line, line
    assert f"mv {cert} {cert}.mismatch" in line, line
    assert f"tlsroll token create --node mkey --address {agent.address}" in line, line
    assert f"it enrols {key} again" in line, line


def test_an_agent_certificate_of_another_ca_is_a_config_error(cluster: Cluster) -> None:
    """node.pem not issued by the CA in ca.pem (which is the pinned one): another CA's
    certificate, moved aside, the node's key enrolled again."""
    agent = _enrolled_agent(cluster, "mca")
    other = pki.CertificateAuthority.create("another CA")
    key = pki.read_key(agent.key_file)
    pki.write_cert(agent.cert_file, other.issue(key.public_key(), pki.names_of(agent.cert())))
    line = _refused(agent)
    cert = agent.cert_file
    assert f"config error: node certificate: {cert} was not issued by the CA in " in line
    assert str(agent.ca_file) in line, line
    assert f"mv {cert} {cert}.mismatch" in line, line
    assert f"tlsroll token create --node mca --address {agent.address}" in line, line
    assert "nodes remove" not in line, line


def test_agent_names_not_those_of_its_certificate_are_a_config_error(cluster: Cluster) -> None:
    """[node] changed after the enrolment: put it back, or enrol again with the new names (a
    token for them; the certificate aside). The second way, followed, enrols the node's key
    again with its new address."""
    agent = _enrolled_agent(cluster, "mnames", token_file=True)
    key_pin = pki.spki_pin(agent.cert())
    old, new = agent.address, next_loopback()
    agent.write_config({"node": {"addresses": [new]}})
    line = _refused(agent)
    cert = agent.cert_file
    assert f"config error: {agent.config_path}: [node]: {cert} is for node " in line, line
    assert f"{cert} is for node 'mnames' with {old}; [node] says node 'mnames' with {new}" in line
    assert "put [node] back as the certificate has it" in line, line
    create = re.search(r"`(tlsroll token create [^`]*)`", line)
    assert (
        create is not None
        and create.group(1) == f"tlsroll token create --node mnames --address {new}"
    ), line
    assert f"mv {cert} {cert}.mismatch" in line, line
    cert.rename(f"{cert}.mismatch")
    cluster.start_leader()
    agent.address = new  # where its port is now
    try:
        made = cluster.cli(*shlex.split(create.group(1))[1:])
        assert made.returncode == 0, made.stderr
        Path(str(agent.config["leader"]["join_token_file"])).write_text(made.stdout)
        agent.start()
        nodes = cluster.wait_for_nodes_online(["mnames"], timeout=30)
        assert list(nodes["mnames"].addresses) == [new]
        assert pki.spki_pin(agent.cert()) == key_pin
        assert agent.stop() == 0
    finally:
        agent.close()
        cluster.stop_leader()


def test_an_agent_ca_file_not_of_its_pin_is_a_config_error_not_a_reenrolment(
    cluster: Cluster,
) -> None:
    """ca.pem whose key is not [leader].ca_pin's: a wrong pin, or a file replaced (perhaps by
    an attacker): the line says both, names the leader's `tlsroll ca show` to compare with,
    and never sends the admin to take the file's pin. A node joined to another cluster (the
    join script writes the new pin, keeps the data dir) is the third case: its three files go
    aside together (review rev50a M1: the line called it an attack, with no way on)."""
    agent = _enrolled_agent(cluster, "mpin")
    other = pki.CertificateAuthority.create("another CA")
    pki.write_cert(agent.ca_file, other.cert)
    line = _refused(agent)
    ca = agent.ca_file
    assert f"config error: {agent.config_path}: [leader].ca_pin: {ca} holds a CA" in line
    assert pki.spki_pin(other.cert) in line, line
    assert "tlsroll ca show" in line and "attacker" in line, line
    assert "token create" not in line and "mv " not in line, line
    key, cert = agent.ca_file.with_name("node.key"), agent.ca_file.with_name("node.pem")
    assert f"joined to another cluster, move {key}, {cert} and {ca} aside together" in line
    assert "certificate_pem of `tlsroll ca show --json`" in line, line
    assert "never copy that file's pin here" in line, line


def test_the_way_on_from_a_damaged_agent_certificate_brings_the_node_back(
    cluster: Cluster,
) -> None:
    """End to end, as an admin reads it: a damaged node.pem stops the agent (exit 2) with one
    line; doing what it says (the `mv`, the `tlsroll token create` it prints, the token
    written to the file it names, the agent started again) enrols the node's own key again,
    and the node is online."""
    agent = _enrolled_agent(cluster, "eback", token_file=True)
    key_pin = pki.spki_pin(agent.cert())
    token_file = Path(str(agent.config["leader"]["join_token_file"]))
    agent.cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\ndamaged\n")
    line = _refused(agent)
    moved = re.search(r"`mv (\S+) (\S+)`", line)
    create = re.search(r"`(tlsroll token create [^`]*)`", line)
    assert moved is not None and create is not None, line
    assert moved.group(1) == str(agent.cert_file), line
    assert f"write the token to {token_file}" in line, line
    Path(moved.group(1)).rename(moved.group(2))
    cluster.start_leader()
    try:
        made = cluster.cli(*shlex.split(create.group(1))[1:])
        assert made.returncode == 0, made.stderr
        token_file.write_text(made.stdout.strip() + "\n")
        agent.start()
        cluster.wait_for_nodes_online(["eback"], timeout=30)
        assert pki.spki_pin(agent.cert()) == key_pin  # its own key, enrolled again
        assert Path(moved.group(2)).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----\nd")
        assert agent.stop() == 0
    finally:
        agent.close()
        cluster.stop_leader()


def test_an_agent_certificate_with_no_cluster_identity_is_enrolled_again_without_removal(
    cluster: Cluster,
) -> None:
    """A node certificate of the cluster's CA without the node's cluster identity (issued by an
    older tlsroll): exit 2 (it was 1, restarted for ever) and the way on, which is the node's
    key enrolled again with a new token: no `tlsroll nodes remove` (its line said so, which
    revokes the node's certificates, its served one too). Followed, the node is back."""
    agent = _enrolled_agent(cluster, "nospiffe", token_file=True)
    key_pin = pki.spki_pin(agent.cert())
    key = pki.read_key(agent.key_file)
    names = pki.names_of(agent.cert())
    pki.write_cert(agent.cert_file, cluster_ca(cluster).issue(key.public_key(), names))
    line = _refused(agent)
    cert = agent.cert_file
    assert f"config error: node certificate: {cert} carries no cluster identity for node " in line
    assert "nodes remove" not in line, line
    moved = re.search(r"`mv (\S+) (\S+)`", line)
    create = re.search(r"`(tlsroll token create [^`]*)`", line)
    assert moved is not None and create is not None, line
    assert moved.group(1) == str(cert), line
    Path(moved.group(1)).rename(moved.group(2))
    cluster.start_leader()
    try:
        made = cluster.cli(*shlex.split(create.group(1))[1:])
        assert made.returncode == 0, made.stderr
        Path(str(agent.config["leader"]["join_token_file"])).write_text(made.stdout)
        agent.start()
        cluster.wait_for_nodes_online(["nospiffe"], timeout=30)
        assert pki.spki_pin(agent.cert()) == key_pin
        assert agent.stop() == 0
    finally:
        agent.close()
        cluster.stop_leader()


# --- s50agent2: the agent's data dir and journal it may not use: exit 2 naming the fix ---


def _stopped_agent(cluster: Cluster) -> Agent:
    """One enrolled agent (stopped) for the cases below, each putting its damage back."""
    return _enrolled_agent(cluster, "agentfiles")


# case -> (the file the line names, relative to the data dir, the damage (returns its undo),
# run without root's DAC capabilities, words the line holds)
AGENT_FILES: dict[str, tuple[str, Callable[[Path], Callable[[], None]], bool, str]] = {
    "journal-another-users": (
        "journal.sqlite3",
        lambda d: _given(d / "journal.sqlite3", 0o600, NOBODY),
        True,
        "cannot be read and written by root (uid 0) (owner nobody (uid 65534), mode 0600); "
        "run: chown root ",
    ),
    "journal-mode-000": (
        "journal.sqlite3",
        lambda d: _given(d / "journal.sqlite3", 0o000),
        True,
        "cannot be read and written by root (uid 0) (owner root (uid 0), mode 0000); "
        "run: chmod u+rw ",
    ),
    "journal-a-directory": (
        "journal.sqlite3",
        lambda d: _in_the_way(d / "journal.sqlite3", directory=True),
        False,
        "is not a regular file (a directory)",
    ),
    "journal-wal-another-users": (
        "journal.sqlite3-wal",
        lambda d: _new_file(d / "journal.sqlite3-wal", NOBODY),
        True,
        "run: chown root ",
    ),
    "lock-another-users": (
        "agent.lock",
        lambda d: _given(d / "agent.lock", 0o600, NOBODY),
        True,
        "cannot be read and written by root (uid 0)",
    ),
    "data-dir-another-users": (
        ".",
        lambda d: _given(d, 0o700, NOBODY),
        False,
        "is owned by nobody (uid 65534), not by root (uid 0) who runs this; run: chown root ",
    ),
    "data-dir-a-file": (
        ".",
        lambda d: _in_the_way(d, directory=False),
        False,
        "is not a directory (a file)",
    ),
}


def _new_file(path: Path, uid: int) -> Callable[[], None]:
    path.write_bytes(b"")
    path.chmod(0o600)
    os.chown(path, uid, -1)
    return path.unlink


def _state_or_file(path: Path) -> object:
    return _file_state(path) if path.is_dir() else path.read_bytes()


@needs_root
@pytest.mark.parametrize("case", list(AGENT_FILES))
def test_an_agent_data_dir_or_journal_it_may_not_use_is_a_config_error(
    cluster: Cluster, case: str
) -> None:
    """Session 50 (the leader's equivalent is above): the agent's journal of another user's,
    mode 000 or a directory in its place, its -wal or lock of another user's, a data dir of
    another user's or a file in its place exited 1 (the journal's "cannot be opened now", or
    the errno's line) and systemd started the agent again every few seconds for ever. Exit 2,
    one line naming the file and the chown/chmod; nothing changed. (A read-only file system,
    a held lock, a full disk stay exit 1: test_recovery's full-disk test.)"""
    agent = _stopped_agent(cluster)
    name, damage, no_dac, words = AGENT_FILES[case]
    path = (agent.data_dir / name).resolve()
    undo = damage(agent.data_dir)
    argv = list(agent.argv)
    try:
        before = _state_or_file(agent.data_dir)
        if no_dac:
            agent.argv = [*NO_DAC, *argv]
        code, output = agent.run_to_exit(timeout=30)
        after = _state_or_file(agent.data_dir)
    finally:
        agent.argv = argv
        undo()
    assert code == 2, output
    line = one_line_error(output, "tlsroll-agent")
    assert line.startswith("tlsroll-agent: config error: "), line
    assert str(path) in line and words in line, line
    assert after == before  # nothing made, moved or chmod-ed
    assert "PRIVATE KEY" not in output


# --- session 67 (badinput2 L): a config saved with a byte order mark, or not as UTF-8 ---------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        # Notepad's "UTF-8 with BOM": tomllib's "Invalid statement (at line 1, column 1)"
        (lambda raw: b"\xef\xbb\xbf" + raw, "starts with a byte order mark"),
        # Latin-1's é in a comment: "'utf-8' codec can't decode byte 0xe9 in position 18"
        (lambda raw: b"# caf\xe9\n" * 2 + raw, "not UTF-8 text: byte 0xe9 at line 1"),
        (lambda raw: raw + b"# \xff\n", "not UTF-8 text: byte 0xff at line {last}"),
    ],
    ids=["bom", "latin1", "last-line"],
)
@pytest.mark.parametrize("daemon", ["agent", "refserver"])
def test_a_config_not_saved_as_plain_utf8_says_so_and_where(
    tmp_path: Path, daemon: str, change: Callable[[bytes], bytes], problem: str
) -> None:
    """One line naming the file, what is wrong and where, exit 2 (the exit code of a config
    error), for each daemon (they read their configs by one function, the leader too)."""
    if daemon == "refserver":
        config = _refserver_config(tmp_path)
        script, module = "tlsroll-refserver", "refserver.daemon"
    else:
        config = write_toml(
            tmp_path / "agent.toml",
            {
                "node": {"name": "n9", "addresses": ["127.0.0.9"]},
                "leader": {"address": "127.0.0.8", "ca_pin": "sha256:" + "a" * 64},
                "agent": {"data_dir": tmp_path / "data"},
            },
        )
        script, module = "tlsroll-agent", "nodeagent.daemon"
    raw = config.read_bytes()
    problem = problem.replace("{last}", str(raw.count(b"\n") + 1))
    config.write_bytes(change(raw))
    result = run_daemon(script, module, config)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, script)
    assert f"config error: {config}: {problem}" in line, line
    assert "save it as UTF-8" in line, line
