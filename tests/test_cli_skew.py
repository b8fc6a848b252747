"""The admin CLI and a leader that runs other code (upgrade audit s35 F2): after an upgrade
without a leader restart, the older leader dropped the request fields it did not know without a
word, and ``rollout start --strategy transitional`` became a direct switch.

* the leader names its version and contract revision in every admin reply's initial metadata
  (``tlsroll.contract``); the CLI refuses any call that changes something through a leader of
  other code (exit 5, nothing changed) and warns on read-only ones;
* ``rollout start`` checks the plan's echo of what it asked (strategy, ``--cert-dir``);
* a method the leader does not serve is named as such, not grpc's "Method not found!".
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader.cli import rollout as rollout_cmd
from leader.cli.base import EXIT_OTHER_CODE, UNIMPLEMENTED, Leader
from tests.cluster import Cluster
from tests.conftest import next_loopback
from tlsroll import __version__, contract
from tlsroll.cli import main
from tlsroll.v1 import admin_pb2, schema_pb2, types_pb2

PASSWORD = "Qv7-tundra-Mosaik-Fjord-42-kelp\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("skew"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@dataclass
class Ran:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def tlsroll(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """``tlsroll ARGS`` in this process, as the program reports (so a test can make it other
    code than the leader, and stand in for the leader)."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def other_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CLI speaks another contract than the leader (as after an upgrade of the package
    under a leader that was not restarted)."""
    monkeypatch.setattr(contract, "REVISION", "000000000000")  # read-only commands' literal
    monkeypatch.setattr(contract, "computed", lambda: "000000000000")  # and before a change


def token_ids(tlsroll: Callable[..., Ran], socket: Path) -> set[str]:
    listed = tlsroll("--socket", str(socket), "token", "list", "--json")
    assert listed.exit_code == 0, listed.stderr
    return {t["id"] for t in json.loads(listed.stdout)}


# --- (a) the leader says which code it runs --------------------------------------------------


def test_the_cli_knows_this_trees_contract_revision() -> None:
    """The CLI reads the literal; the leader announces the computed value: a changed contract
    must move the literal too (else every change would be refused by the same code)."""
    assert contract.computed() == contract.REVISION, (
        f"the gRPC contract changed: set REVISION = {contract.computed()!r} in tlsroll/contract.py"
    )


def test_every_admin_reply_names_the_leaders_version_and_contract(cluster: Cluster) -> None:
    with grpc.insecure_channel(f"unix:{cluster.admin_socket}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", None, None)
        _, call = check.with_call(b"", timeout=10)
        metadata = dict(call.initial_metadata())
    assert metadata[contract.VERSION_KEY] == __version__
    assert metadata[contract.REVISION_KEY] == contract.REVISION == contract.computed()


def test_a_change_through_a_leader_of_other_code_is_refused_and_changes_nothing(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    sock = cluster.admin_socket
    before = token_ids(tlsroll, sock)
    other_code(monkeypatch)
    result = tlsroll(
        "--socket", str(sock), "token", "create", "--node", "n9", "--address", next_loopback()
    )
    assert result.exit_code == EXIT_OTHER_CODE, (result.stdout, result.stderr)
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("tlsroll: error: the running tlsroll-leader is other code than this")
    assert "contract 000000000000" in line and f"the leader runs {__version__}" in line
    assert line.endswith("restart it (systemctl restart tlsroll-leader) and try again")
    monkeypatch.undo()
    assert token_ids(tlsroll, sock) == before


def test_rollout_start_through_a_leader_of_other_code_is_refused_before_the_plan(
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tlsroll: Callable[..., Ran],
) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    password.chmod(0o600)
    planned: list[object] = []
    real_call = Leader.call

    def call(self: Leader, method: Any, request: Any, timeout: float = 30) -> Any:
        planned.append(method)
        return real_call(self, method, request, timeout)

    monkeypatch.setattr(Leader, "call", call)
    other_code(monkeypatch)
    result = tlsroll(
        *(
            "--socket",
            str(cluster.admin_socket),
            "rollout",
            "start",
            "--scope",
            "cluster",
            "--strategy",
            "transitional",
        ),
        *("--password-file", str(password), "--yes"),
    )
    assert result.exit_code == EXIT_OTHER_CODE, (result.stdout, result.stderr)
    assert "other code than this tlsroll" in result.stderr
    assert planned == []  # nothing asked of the Admin service, the plan neither


def test_read_only_commands_go_on_with_one_warning(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    other_code(monkeypatch)
    for args in (["nodes"], ["token", "list"], ["schema", "show", "--json"]):
        result = tlsroll("--socket", str(cluster.admin_socket), *args)
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        (line,) = result.stderr.splitlines()
        assert line.startswith("tlsroll: warning: the running tlsroll-leader is other code")
        assert "contract 000000000000" in line


def test_the_same_code_says_nothing(cluster: Cluster, tlsroll: Callable[..., Ran]) -> None:
    for args in (["nodes"], ["schema", "show", "--json"]):
        result = tlsroll("--socket", str(cluster.admin_socket), *args)
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        assert result.stderr == ""


# --- (b) the plan's echo ---------------------------------------------------------------------


def older_leader(monkeypatch: pytest.MonkeyPatch, *, certificates: bool = False) -> list[Any]:
    """What an older leader answers (the request without ``strategy`` and ``cert_dir``), one
    that says it runs this code (a build whose revision was not moved): the echo alone must
    stop the start. Returns the StartRollout requests it got."""
    started: list[Any] = []

    class OlderLeader:
        def PlanRollout(self, request: Any, timeout: float = 30) -> Any:
            view = schema_pb2.RolloutView(
                change=types_pb2.CHANGE_ENABLE_TLS,
                scope=types_pb2.SCOPE_KIND_CLUSTER,
                strategy=types_pb2.STRATEGY_DIRECT,  # whatever was asked
                freeze=types_pb2.FREEZE_MODE_NODE,
            )
            view.nodes.add(name="n1")
            reply = admin_pb2.PlanResponse(rollout=view)
            if certificates:
                reply.certificates.append("n1: CN=n1, sha256:…, valid until 2027-12-31")
            return reply

        def StartRollout(self, request: Any, timeout: float = 30) -> Any:
            started.append(request)
            return schema_pb2.RolloutView(id="r1", strategy=types_pb2.STRATEGY_DIRECT)

    @contextlib.contextmanager
    def admin(self: Leader) -> Iterator[Any]:
        yield OlderLeader()

    monkeypatch.setattr(Leader, "admin", admin)
    monkeypatch.setattr(Leader, "require_same_code", lambda self: None)
    return started


def start(tlsroll: Callable[..., Ran], tmp_path: Path, *args: str) -> Ran:
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    password.chmod(0o600)
    return tlsroll(
        *("--data-dir", str(tmp_path), "rollout", "start", "--scope", "cluster"),
        *("--password-file", str(password), "--yes", *args),
    )


def test_a_strategy_the_leader_ignored_is_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    started = older_leader(monkeypatch)
    result = start(tlsroll, tmp_path, "--strategy", "transitional")
    assert not started, f"a direct switch was started: {(result.stdout, result.stderr)}"
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line == (
        "tlsroll: error: the leader planned strategy direct, not the transitional asked for: "
        "it runs an older tlsroll (restart it after an upgrade); nothing was started"
    )


def test_certificates_the_leader_ignored_are_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    started = older_leader(monkeypatch)
    monkeypatch.setattr(rollout_cmd, "cert_dir_message", lambda _d: admin_pb2.CertDir())
    result = start(tlsroll, tmp_path, "--cert-dir", str(tmp_path))
    assert not started, f"started with the leader's own keys: {(result.stdout, result.stderr)}"
    assert result.exit_code == 1
    assert "carries none of the --cert-dir certificates" in result.stderr


def test_a_plan_that_echoes_the_request_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    started = older_leader(monkeypatch, certificates=True)
    monkeypatch.setattr(rollout_cmd, "cert_dir_message", lambda _d: admin_pb2.CertDir())
    result = start(tlsroll, tmp_path, "--cert-dir", str(tmp_path))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert len(started) == 1


# --- (c) a method the leader does not serve -------------------------------------------------


def test_a_method_the_leader_does_not_serve_is_named_as_such(
    tmp_path: Path, tlsroll: Callable[..., Ran]
) -> None:
    """A gRPC server with none of tlsroll's services (grpc's own UNIMPLEMENTED): a read-only
    command and a changing one (whose health Check is not served either) each say so."""
    sock = tmp_path / "admin.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        for args in (["ca", "show"], ["token", "revoke", "abcdef"]):
            result = tlsroll("--socket", str(sock), *args)
            assert result.exit_code == 1, (args, result.stdout, result.stderr)
            assert result.stderr.splitlines() == [f"tlsroll: error: {UNIMPLEMENTED}"]
    finally:
        server.stop(None).wait(5)
