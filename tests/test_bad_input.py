"""Bad input from the admin's side, as the red team gave it (review s47rtin H1, M1, M3, M4, L1,
L2): one line, a proper exit code or gRPC status, and nothing changed on refusal. The daemons
and the CLI run as processes; the password-file and verifier rules also as functions (the
workstation's commands read a password file by the same function)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import grpc
import pytest

from leader.cli.cluster_cmd import NodePath
from tests.cluster import Cluster, child_env, command, one_line_error
from tests.conftest import next_loopback
from tests.refserver_helper import write_toml
from tlsroll import cli, password
from tlsroll.cli import PathParam
from tlsroll.v1 import admin_pb2

DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_TOML = "x = " + "[" * 5000 + "]" * 5000 + "\n"
DAEMONS = [
    ("tlsroll-leader", "leader.daemon"),
    ("tlsroll-agent", "nodeagent.daemon"),
    ("tlsroll-refserver", "refserver.daemon"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """After ``tlsroll init``; its leader stopped unless a test starts it (and stops it)."""
    with Cluster(tmp_path_factory.mktemp("bad-input"), next_loopback()) as c:
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


# --- H1: leader.toml's names, checked before the leader reissues its certificate --------------


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("dns_names", ["a\u0000b"], "is not a DNS host name"),
        ("dns_names", ["*.example.com"], "wildcard names are never signed"),
        ("dns_names", ["evil..x"], "is not a DNS host name"),
        ("dns_names", [f"n{i}.example" for i in range(9)], "at most 8 DNS names"),
        ("address", "0.0.0.0", "is not the address of one host"),  # noqa: S104 - refused
        ("address", "255.255.255.255", "names every host"),
        ("address", "127.0.0.1", "names every host"),
        ("address", "::ffff:10.0.0.5", "written as IPv6: give it as 10.0.0.5"),  # rev-enrol L1
        ("node_name", "BAD NAME", "is not a valid node name"),
        ("node_name", "BAD NAME\u0000", "holds a control character"),  # (tlsroll.config: any value)
        ("node_name", "tlsroll-leader", "is reserved"),
        # session 67 (badinput M1): a zone or an address taken for a DNS name
        ("address", "::1%lo", "a zone (%…) is never part of a certificate's address"),
        ("dns_names", ["127.0.0.1"], "its last label is a number"),
        ("dns_names", ["0x7f000001"], "its last label is a number"),  # (review s67 rev2 M1)
    ],
)
def test_leader_refuses_names_init_would_refuse_before_its_certificate_changes(
    cluster: Cluster, key: str, value: object, problem: str
) -> None:
    original = cluster.config_path.read_bytes()
    cert = cluster.tls_cert_path.read_bytes()
    try:
        cluster.write_leader_config({key: value})
        code, output = cluster.leader.run_to_exit()
        assert code == 2, output
        line = one_line_error(output, "tlsroll-leader")
        assert f"config error: {cluster.config_path}: [leader].{key}: " in line, line
        assert problem in line, line
        assert cluster.tls_cert_path.read_bytes() == cert  # not issued again
        assert not cluster.admin_socket.exists()
    finally:
        cluster.config_path.write_bytes(original)


def test_init_refuses_more_dns_names_than_a_node_may_hold(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dns = [arg for i in range(9) for arg in ("--dns", f"n{i}.example")]
    with Cluster(tmp_path / "c", next_loopback()) as c:
        result = c.cli("init", "--data-dir", str(data), "--address", c.address, *dns)
    assert result.returncode == 1, result.stderr
    assert "at most 8 DNS names" in one_line_error(result.stderr, "tlsroll")
    assert not data.exists()


# --- M1: a verifier nested too deeply is malformed, not an internal error --------------------


def test_a_deeply_nested_verifier_is_invalid_not_an_internal_error(cluster: Cluster) -> None:
    cluster.start_leader()
    before = cluster.store_rows(("auth_versions",))
    try:
        with cluster.admin() as admin:
            with pytest.raises(grpc.RpcError) as err:
                admin.SetPassword(
                    admin_pb2.SetPasswordRequest(auth_verifier_json=DEEP_JSON), timeout=30
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "nested too deeply" in (err.value.details() or "")
    finally:
        cluster.stop_leader()
    assert cluster.store_rows(("auth_versions",)) == before  # nothing staged
    assert "rpc.internal_error" not in cluster.leader.event_names()
    assert "RecursionError" not in cluster.leader.log_text()
    with pytest.raises(ValueError, match="nested too deeply"):
        password.verifier_from_json(DEEP_JSON)
    with pytest.raises(ValueError, match="nested too deeply"):
        password.verifier_from_json(DEEP_JSON.encode())


# --- M3: a password file is read up to a bound ---------------------------------------------------


def test_a_password_file_is_read_only_up_to_its_bound(tmp_path: Path) -> None:
    with pytest.raises(password.PasswordFileError, match="longer than 4096 bytes"):
        password.read_password_file(Path("/dev/zero"))
    big = tmp_path / "big"
    big.write_bytes(b"a" * 4097)
    big.chmod(0o600)
    with pytest.raises(password.PasswordFileError, match="longer than 4096 bytes"):
        password.read_password_file(big)
    # A pipe still serves (``<(…)``, /dev/stdin), as does a file of the bound's length.
    read, write = os.pipe()
    os.write(write, b"kd7q-x2mf-9vhc-3ptw-a8ke-rn5d\n")
    os.close(write)
    try:
        assert (
            password.read_password_file(Path(f"/dev/fd/{read}")) == "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"
        )
    finally:
        os.close(read)
    big.write_bytes(b"a" * 4095 + b"\n")
    assert password.read_password_file(big) == "a" * 4095


def test_password_set_from_dev_zero_is_one_line_and_exit_2(cluster: Cluster) -> None:
    result = cluster.cli("password", "set", "--password-file", "/dev/zero")
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll")
    assert "--password-file" in line and "longer than 4096 bytes" in line


def test_password_set_reads_a_pipe_as_before(cluster: Cluster) -> None:
    """/dev/stdin (a pipe from the shell): read, checked by the policy, staged."""
    cluster.start_leader()
    try:
        before = cluster.store_rows(("auth_versions",))["auth_versions"]
        result = cluster.cli(
            "password", "set", "--password-file", "/dev/stdin", input="kd7q-x2mf-9vhc-3ptw-a8ke\n"
        )
        assert result.returncode == 0, result.stderr
    finally:
        cluster.stop_leader()
    assert len(cluster.store_rows(("auth_versions",))["auth_versions"]) == len(before) + 1


# The CLI (``tlsroll.cli.main``, as the console script runs it) with ``tlsroll.password``'s
# PIPE_WAIT at 3 s in its own process: no setting of the product's, which has no reason to
# wait less for a password manager that asks for its passphrase first.
SHORT_PIPE_WAIT = """
import sys
from tlsroll import password
password.PIPE_WAIT = 3.0
from tlsroll.cli import main
sys.exit(main())
"""


def test_a_password_file_nobody_writes_to_is_one_line_after_its_bound(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The ops review of session 63: ``--password-file`` naming a FIFO nobody writes to waited
    until Ctrl-C. Every command that reads one (``password set``, ``rollout start``,
    ``notify``: ``tlsroll.password.read_password_file``) gives up after ``PIPE_WAIT``: exit 2,
    one line naming the file, and nothing asked of the leader (no password staged, no rollout
    started). A FIFO whose writer comes (``<(pass show x)``) is read as before. The commands
    run with ``PIPE_WAIT`` set to 3 s in their process (``SHORT_PIPE_WAIT``; 30 s in the
    product, which this test waited out): the bound, not its length, is what is tested, and
    the message says the bound the command used."""
    cluster.start_leader()
    tables = ("auth_versions", "rollouts", "rollout_nodes")
    try:
        before = cluster.store_rows(tables)
        commands = {
            "password": ["password", "set"],
            "rollout": ["rollout", "start", "--change", "enable-tls", "--scope", "cluster"],
            "notify": [
                "notify", "--when", "2030-01-02T10:00", "--scope", "cluster", "--include-password",
            ],
        }  # fmt: skip
        env = child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)})
        running = {}
        for name, args in commands.items():  # side by side: each waits PIPE_WAIT
            fifo = tmp_path / f"{name}.fifo"
            os.mkfifo(fifo, 0o600)
            running[name] = subprocess.Popen(
                [sys.executable, "-c", SHORT_PIPE_WAIT, *args, "--password-file", str(fifo)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        try:
            for name, process in running.items():
                try:
                    out, err = process.communicate(timeout=60)  # PIPE_WAIT is 3 s here
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{name}: still waiting for the FIFO")
                assert process.returncode == 2, (name, err)
                line = one_line_error(err, "tlsroll")
                fifo = tmp_path / f"{name}.fifo"
                assert "--password-file" in line and f"nothing came from {fifo} within 3 s" in line
                assert out == ""
        finally:  # every command still waiting, not only the first (they outlived a failure)
            for process in running.values():
                if process.poll() is None:
                    process.kill()
                    process.communicate()
        assert cluster.store_rows(tables) == before

        # A writer that comes: its password is read and staged.
        fifo = tmp_path / "written.fifo"
        os.mkfifo(fifo, 0o600)

        def write() -> None:
            with fifo.open("w") as f:  # (waits for the command to open it)
                f.write("kd7q-x2mf-9vhc-3ptw-a8ke-rn5e\n")

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        result = cluster.cli("password", "set", "--password-file", str(fifo))
        assert result.returncode == 0, result.stderr
        writer.join(timeout=30)
    finally:
        cluster.stop_leader()
    after = cluster.store_rows(tables)
    assert len(after["auth_versions"]) == len(before["auth_versions"]) + 1


# --- empty paths, and the node's paths a join script names ------------------------------------


def test_a_switch_without_a_scope_is_a_usage_error_storing_nothing(cluster: Cluster) -> None:
    """Session 64's review L1: `plan` and `rollout start` refused a switch without a scope,
    but `notify --when` announced one of the whole cluster: the seed's dialog asks which, and
    so do all three now (exit 2, one line), with no rollout stored."""
    cluster.start_leader()
    try:
        for args in (
            ["plan"],
            ["rollout", "start", "--yes"],
            ["notify", "--when", "2099-01-02 10:00"],
            ["notify", "--when", "2099-01-02 10:00", "--change", "rotate-cert"],
        ):
            result = cluster.cli(*args)
            assert result.returncode == 2, (args, result.stdout, result.stderr)
            assert result.stdout == ""
            line = one_line_error(result.stderr, "tlsroll")
            assert "give --scope local|cluster or --nodes a,b" in line, (args, line)
        assert cluster.schema_json(limit=0).get("rollouts", []) == []
    finally:
        cluster.stop_leader()
    # ... before any file is read or the leader asked (the closing review of session 64, M1:
    # said after the password file, a FIFO nobody writes to waited 30 s, and with the leader
    # down it was "cannot reach the leader")
    fifo = cluster.root / "nobody-writes.fifo"
    os.mkfifo(fifo, 0o600)
    result = cluster.cli(
        "notify", "--when", "2099-01-02 10:00", "--include-password", "--password-file", str(fifo)
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_line_error(result.stderr, "tlsroll")
    assert "give --scope local|cluster or --nodes a,b" in line, line


WHEN = "2030-01-02T10:00"
EMPTY_PATHS = [
    ("--socket", ["--socket", "", "schema", "show"]),
    ("--data-dir", ["--data-dir", "", "schema", "show"]),
    ("--data-dir", ["init", "--data-dir", "", "--address", "127.0.0.1"]),
    ("--ca-passphrase-file", ["init", "--data-dir", "{new}", "--address", "127.0.0.1",
                              "--ca-passphrase-file", ""]),
    ("--password-file", ["password", "set", "--password-file", ""]),
    ("--password-file", ["rollout", "start", "--change", "enable-tls", "--scope", "cluster",
                         "--password-file", ""]),
    ("--cert-dir", ["rollout", "start", "--change", "enable-tls", "--scope", "cluster",
                    "--cert-dir", ""]),
    ("--password-file", ["notify", "--when", WHEN, "--include-password", "--password-file", ""]),
    ("--cert-dir", ["notify", "--when", WHEN, "--cert-dir", ""]),
    ("--agent-config-dir", ["token", "create", "--node", "n1", "--address", "127.0.0.1",
                            "--print-join-command", "--agent-config-dir", ""]),
    ("--agent-data-dir", ["token", "create", "--node", "n1", "--address", "127.0.0.1",
                          "--print-join-command", "--agent-data-dir", ""]),
    # The workstation's own (the ops helper of session 64: click made '' the current directory)
    ("--password-file", ["client", "test-connection", "https://127.0.0.1:8443/praxis_live/",
                         "--password-file", ""]),
    ("--settings-dir", ["client", "test-connection", "https://127.0.0.1:8443/praxis_live/",
                        "--settings-dir", ""]),
]  # fmt: skip


@pytest.mark.parametrize(("option", "args"), EMPTY_PATHS)
def test_an_empty_path_is_a_usage_error_naming_its_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, args: list[str]
) -> None:
    """The ops review of session 63: click took an empty path for the current directory, and
    the error after it named "." (``--socket ''``: no admin socket at .); ``init
    --data-dir ''`` alone refused it. Every path option: exit 2, one line naming it, before
    anything is made or asked (the socket leads nowhere: a leader asked would be exit 1)."""
    new = tmp_path / "new"
    argv = ["--socket", str(tmp_path / "no-leader.sock")] if args[0] != "--socket" else []
    argv += [a.replace("{new}", str(new)) for a in args]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tlsroll: error: "), err
    assert f"'{option}': must not be empty" in err, err
    assert not new.exists()


def test_every_path_option_of_the_commands_refuses_an_empty_path() -> None:
    """The rule is the path types' (``tlsroll.cli.PathParam``, and ``NodePath`` for the node's
    paths in a join script), not each option's: a path option added later uses one of them."""

    def options(command: click.Command, path: str) -> Iterator[tuple[str, click.Parameter]]:
        for param in command.params:
            yield f"{path} {param.name}", param
        if isinstance(command, click.Group):  # (a lazy one too: looked up by name)
            ctx = click.Context(command)
            for name in command.list_commands(ctx):
                if (sub := command.get_command(ctx, name)) is not None:
                    yield from options(sub, f"{path} {name}")  # (client: the workstation's too)

    found = list(options(cli.cli, "tlsroll"))
    paths = [(where, p) for where, p in found if isinstance(p.type, click.Path | NodePath)]
    assert len(paths) >= len(EMPTY_PATHS), paths
    for where, param in paths:
        assert isinstance(param.type, PathParam | NodePath), where


# --- M4: init sets up only a new or empty directory ----------------------------------------------


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(path)): (p.stat().st_mode, p.stat().st_size if p.is_file() else 0)
        for p in [path, *path.rglob("*")]
    }


def test_init_refuses_a_directory_with_other_files_and_changes_nothing(tmp_path: Path) -> None:
    with Cluster(tmp_path / "c", next_loopback()) as c:
        target = tmp_path / "busy"
        target.mkdir(mode=0o755)
        target.chmod(0o755)
        (target / "notes.txt").write_text("mine\n")
        before = _tree(target)
        result = c.cli("init", "--data-dir", str(target), "--address", c.address)
        assert result.returncode == 1, result.stderr
        line = one_line_error(result.stderr, "tlsroll")
        assert f"{target} is not empty and not a tlsroll data directory" in line
        assert "'notes.txt'" in line
        assert _tree(target) == before  # nothing made, the mode kept (0755)
        # ``--data-dir ''`` was the current directory (click's path type): a usage error now,
        # wherever it is run, an empty directory too.
        for where in (target, tmp_path / "c"):
            result = subprocess.run(
                [*command("tlsroll", "tlsroll"), "init", "--data-dir", "", "--address", c.address],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                cwd=where,
            )
            assert result.returncode == 2, result.stderr
            assert "--data-dir" in result.stderr and "must not be empty" in result.stderr
        assert _tree(target) == before
        # An empty directory (install.sh makes /var/lib/tlsroll before init) is set up.
        empty = tmp_path / "empty"
        empty.mkdir()
        result = c.cli("init", "--data-dir", str(empty), "--address", c.address)
        assert result.returncode == 0, result.stderr
        assert (empty / "leader.toml").is_file()


# --- L1, L2: config files nested too deeply, or not regular files --------------------------------


@pytest.mark.parametrize(("script", "module"), DAEMONS)
def test_a_config_nested_too_deeply_is_a_config_error(
    tmp_path: Path, script: str, module: str
) -> None:
    config = tmp_path / "deep.toml"
    config.write_text(DEEP_TOML)
    result = run_daemon(script, module, config)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_line_error(result.stderr, script)
    assert f"config error: {config}: not valid TOML: nested too deeply" in line


@pytest.mark.parametrize(("script", "module"), DAEMONS)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_config_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, script: str, module: str, kind: str
) -> None:
    if kind == "fifo":
        config = tmp_path / "fifo.toml"
        os.mkfifo(config, 0o600)
        what = "a FIFO"
    elif kind == "dev-zero":
        config = tmp_path / "zero.toml"
        config.symlink_to("/dev/zero")
        what = "a character device"
    else:
        config = tmp_path / "dir.toml"
        config.mkdir()
        what = "a directory"
    result = run_daemon(script, module, config)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_line_error(result.stderr, script)
    assert f"config error: {config}: not a regular file ({what})" in line
    if kind == "fifo":
        assert stat.S_ISFIFO(config.lstat().st_mode)


@pytest.mark.parametrize(("script", "module"), DAEMONS)
def test_a_daemons_usage_error_is_one_line_naming_the_argument(
    tmp_path: Path, script: str, module: str
) -> None:
    """The ops review of session 63: a daemon's bad argument was argparse's usage (two or three
    lines) and then the error, in the journal at every restart; an empty path (``--config
    ''``) was the current directory, named "." by the error after it. One line on stderr,
    ``PROG: error: ... (see PROG --help)``, exit 2, as the ``tlsroll`` command's; nothing is
    read (the config named does not exist)."""
    config = str(tmp_path / "missing.toml")
    cases = [
        (["--config", config, "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: --config"),
        (["--config", ""], "argument --config: must not be empty"),
    ]
    if script != "tlsroll-refserver":
        cases.append(
            (["--config", config, "--log-level", "loud"], "argument --log-level: invalid choice")
        )
    if script == "tlsroll-leader":
        cases.append((["--config", config, "--backup", ""], "argument --backup: must not be empty"))
    for args, said in cases:
        result = subprocess.run(
            [*command(script, module), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == "" and result.stderr.count("\n") == 1, (args, result.stderr)
        line = result.stderr.rstrip("\n")
        assert line.startswith(f"{script}: error: {said}"), (args, line)
        assert line.endswith(f" (see {script} --help)"), (args, line)


def test_a_config_file_larger_than_its_bound_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "leader.toml", {"leader": {"address": "127.0.0.2"}})
    with config.open("a") as f:
        f.write("#" * (1024 * 1024) + "\n")
    result = run_daemon("tlsroll-leader", "leader.daemon", config)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll-leader")
    assert f"config error: {config}: larger than 1048576 bytes" in line


# --- session 67 (badinput): an address as the CA would not sign it, and a closed stdout ----------


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        # ::1 with a zone passed as another address than ::1; its certificate holds ::1
        ("--address", "::1%lo", "a zone (%…) is never part of a certificate's address"),
        ("--address", "2001:db8::5%eth0", "a zone (%…) is never part of a certificate's address"),
        # an address as a DNS name passed every rule addresses have
        ("--dns", "127.0.0.1", "its last label is a number"),
        ("--dns", "{leader}", "its last label is a number"),
        ("--dns", "10.9.0.7", "its last label is a number"),
        ("--dns", "0", "its last label is a number"),
        ("--dns", "0x7f000001", "its last label is a number"),  # (review s67 rev2 M1)
    ],
)
def test_token_create_refuses_a_zone_or_an_address_as_a_dns_name(
    cluster: Cluster, option: str, value: str, problem: str
) -> None:
    """Refused by the leader (INVALID_ARGUMENT: exit 2, one line), no token made: the CA signs
    a node's names by these rules (``tlsroll.names``), enrolment and leader.toml too."""
    cluster.start_leader()
    try:
        before = cluster.store_rows(("tokens",))
        value = value.replace("{leader}", cluster.address)
        result = cluster.cli("token", "create", "--node", "n7", "--address", "10.9.0.7",
                             option, value)  # fmt: skip
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert result.stdout == ""
        line = one_line_error(result.stderr, "tlsroll")
        assert problem in line, line
        assert cluster.store_rows(("tokens",)) == before
    finally:
        cluster.stop_leader()


def test_a_closed_stdout_is_one_line_exit_1_before_anything_is_done(cluster: Cluster) -> None:
    """With stdout closed (``>&-``) Python has no sys.stdout: ``schema show`` ended in a
    traceback (its quick exit's flush), the tables in ``internal error: AttributeError``,
    ``nodes --json`` wrote nowhere with exit 0; ``token create`` made a token nobody saw."""
    cluster.start_leader()
    try:
        before = cluster.store_rows(("tokens",))
        for args in (
            ["schema", "show"],
            ["nodes"],
            ["nodes", "--json"],
            ["token", "list"],
            ["token", "create", "--node", "n8", "--address", "10.9.0.8"],
        ):
            result = subprocess.run(
                ["sh", "-c", 'exec "$@" >&-', "sh", *command("tlsroll", "tlsroll"), *args],
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
                check=False,
                stdin=subprocess.DEVNULL,
            )
            assert result.returncode == 1, (args, result.stderr)
            line = one_line_error(result.stderr, "tlsroll")
            assert "standard output is closed" in line, (args, line)
        assert cluster.store_rows(("tokens",)) == before
        # stderr closed: the output as ever, exit 0 (a quick exit's flush of no stderr was 1)
        result = subprocess.run(
            ["sh", "-c", 'exec "$@" 2>&-', "sh", *command("tlsroll", "tlsroll"), "schema", "show"],
            stdout=subprocess.PIPE,
            text=True,
            timeout=60,
            env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0
        assert "no rollouts yet" in result.stdout
    finally:
        cluster.stop_leader()


# --- session 67 (badinput2 L2 of the first sweep): a secret nobody could be shown ---------------

SECRET_MAKERS = [
    ["token", "create", "--node", "n9", "--address", "10.9.0.9"],
    ["token", "create", "--node", "n9", "--address", "10.9.0.9", "--print-join-command"],
    ["viewer", "grant", "--name", "ops"],
]


@pytest.mark.parametrize("args", SECRET_MAKERS, ids=["token", "join-script", "viewer-grant"])
def test_a_secret_for_a_full_stdout_is_never_made(cluster: Cluster, args: list[str]) -> None:
    """``tlsroll token create ... > /dev/full`` exited 1 with "No space left on device" after
    the token was made and stored: a token (or a login link) nobody ever saw, and nothing said
    so. Stdout that takes no write is said before anything is made: one line, exit 1."""
    cluster.start_leader()
    try:
        before = cluster.store_rows(("tokens", "viewer_grants"))
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                [*command("tlsroll", "tlsroll"), *args],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
                check=False,
                stdin=subprocess.DEVNULL,
            )
        assert result.returncode == 1, result.stderr
        line = one_line_error(result.stderr, "tlsroll")
        assert "No space left on device" in line, line
        assert "nothing was made" in line, line
        assert cluster.store_rows(("tokens", "viewer_grants")) == before
    finally:
        cluster.stop_leader()


@pytest.mark.parametrize("args", SECRET_MAKERS, ids=["token", "join-script", "viewer-grant"])
def test_a_secret_whose_printing_fails_is_revoked_and_said_so(
    cluster: Cluster, args: list[str]
) -> None:
    """A pipe whose reader has gone takes a write of nothing (the check before), and fails the
    secret's: the token or grant was made, so it is revoked at once, and the one line says so
    and names it (exit 1); none is left that could enrol a node or let a browser in."""
    cluster.start_leader()
    try:
        before = cluster.store_rows(("tokens", "viewer_grants"))
        read_end, write_end = os.pipe()
        os.close(read_end)  # nobody reads: the write of the secret fails with EPIPE
        try:
            result = subprocess.run(
                [*command("tlsroll", "tlsroll"), *args],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
                check=False,
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(write_end)
        assert result.returncode == 1, result.stderr
        line = one_line_error(result.stderr, "tlsroll")
        assert "Broken pipe" in line, line
        after = cluster.store_rows(("tokens", "viewer_grants"))
        table = "viewer_grants" if args[0] == "viewer" else "tokens"
        made = [row for row in after[table] if row not in before[table]]
        assert len(made) == 1, made
        assert made[0][0] in line, line  # its id, to look it up
        assert "revoked" in line, line
        # revoked: nothing usable was left
        db = sqlite3.connect(f"{cluster.store_path.as_uri()}?mode=ro", uri=True, timeout=10)
        with contextlib.closing(db):
            query = f"SELECT revoked_at FROM {table} WHERE id = ?"  # noqa: S608 - our names
            (revoked_at,) = db.execute(query, (made[0][0],)).fetchone()
        assert revoked_at is not None, made
    finally:
        cluster.stop_leader()
