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
import sqlite3
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader.cli import rollout as rollout_cmd
from leader.cli.base import EXIT_OTHER_CODE, STOPS, UNIMPLEMENTED, Leader
from nodeagent.transaction import CRASH_ENV
from tests.cluster import Cluster
from tests.conftest import next_loopback
from tests.nodeside import Node
from tlsroll import __version__, bootstrap_protocol, contract, pki
from tlsroll.cli import main
from tlsroll.v1 import admin_pb2, leader_pb2, leader_pb2_grpc, schema_pb2, types_pb2

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

        def ListNodes(self, request: Any, timeout: float = 30) -> Any:
            # (a start with --password-file asks for the nodes' names first: session 70)
            return admin_pb2.ListNodesResponse()

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


def test_a_first_password_under_the_scrypt_hook_is_said_and_one_set_wrong_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    """Review s75 revpwkdf: ``rollout start --change enable-tls`` makes the cluster's first
    password verifier as ``password set`` does (``verifier_json``): under the tests' scrypt hook
    (conftest's 256) with that N, and said on stderr once started, as ``password set`` says it;
    set wrong, a usage error (exit 2) before anything is read or asked. It made a verifier
    256 times cheaper to guess without a word (``password set`` said it)."""
    from tlsroll import kdfhook

    started = older_leader(monkeypatch)
    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "256")
    result = start(tlsroll, tmp_path)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    (request,) = started
    assert json.loads(request.auth_verifier_json)["n"] == 256
    assert (
        f"tlsroll: warning: {kdfhook.TEST_KDF_N_ENV}=256 is set (tests only): the password's"
        " verifier is made under scrypt N=256, not N=32768"
    ) in result.stderr
    assert PASSWORD.strip() not in result.stdout + result.stderr
    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "3")
    result = start(tlsroll, tmp_path)
    assert result.exit_code == 2 and len(started) == 1, (result.stdout, result.stderr)
    assert "must be a power of 2" in result.stderr
    monkeypatch.delenv(kdfhook.TEST_KDF_N_ENV)
    result = start(tlsroll, tmp_path)
    assert result.exit_code == 0 and len(started) == 2, (result.stdout, result.stderr)
    assert json.loads(started[1].auth_verifier_json)["n"] == 2**15
    assert kdfhook.TEST_KDF_N_ENV not in result.stderr


@pytest.mark.parametrize(
    ("args", "change", "asked"),
    [
        (("rollout", "rollback"), types_pb2.CHANGE_DISABLE_TLS, True),
        (("rollout", "rollback", "--yes"), types_pb2.CHANGE_DISABLE_TLS, False),
        (
            ("rollout", "start", "--scope", "cluster", "--change", "rotate-cert"),
            types_pb2.CHANGE_ROTATE_CERT,
            True,
        ),
        (
            ("rollout", "start", "--scope", "cluster", "--change", "rotate-cert", "--yes"),
            types_pb2.CHANGE_ROTATE_CERT,
            False,
        ),
    ],
    ids=["rollback", "rollback-yes", "start", "start-yes"],
)
def test_a_start_after_the_prompt_names_the_nodes_confirmed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tlsroll: Callable[..., Ran],
    args: tuple[str, ...],
    change: types_pb2.Change.ValueType,
    asked: bool,
) -> None:
    """Review s69 confirm (L1): the nodes the prompt showed as those the rollout steps, in
    its order (not those already done), go with the start (``confirmed_nodes``): the leader
    refuses it if its plan steps others by then. With --yes (nothing shown) none go."""
    started: list[Any] = []

    class Answers:
        def PlanRollout(self, request: Any, timeout: float = 30) -> Any:
            view = schema_pb2.RolloutView(
                change=change,
                scope=types_pb2.SCOPE_KIND_CLUSTER,
                strategy=types_pb2.STRATEGY_DIRECT,
                freeze=types_pb2.FREEZE_MODE_NODE,
            )
            view.nodes.add(name="n2", state=types_pb2.NODE_STATE_PENDING)
            view.nodes.add(
                name="n1", state=types_pb2.NODE_STATE_SKIPPED, reason="already done: on http"
            )
            view.nodes.add(name="n3", state=types_pb2.NODE_STATE_PENDING)
            return admin_pb2.PlanResponse(rollout=view)

        def StartRollout(self, request: Any, timeout: float = 30) -> Any:
            started.append(request)
            return schema_pb2.RolloutView(id="r1", change=change)

    @contextlib.contextmanager
    def admin(self: Leader) -> Iterator[Any]:
        yield Answers()

    monkeypatch.setattr(Leader, "admin", admin)
    monkeypatch.setattr(Leader, "require_same_code", lambda self: None)
    monkeypatch.setattr("leader.cli.base.terminal_only", lambda _why: None)
    monkeypatch.setattr("click.confirm", lambda *_a, **_k: True)
    result = tlsroll("--data-dir", str(tmp_path), *args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    (request,) = started
    assert list(request.confirmed_nodes) == (["n2", "n3"] if asked else [])


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


# --- (d) the brakes go through a leader of other code (review s35 M2) --------------------------


def warned_once(result: Ran, *also: str) -> None:
    """Exit 0, and on stderr exactly the one warning that the leader runs other code (then
    the command's own lines, each starting with one of ``also``, in that order)."""
    assert result.exit_code == 0, (result.stdout, result.stderr)
    line, *more = result.stderr.splitlines()
    assert len(more) == len(also), result.stderr
    for said, start in zip(more, also, strict=True):
        assert said.startswith(start), said
    assert line.startswith("tlsroll: warning: the running tlsroll-leader is other code"), line
    assert "contract 000000000000" in line


def test_revokes_go_through_a_leader_of_other_code_with_one_warning(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    """An admin must be able to take a token, a viewer session or a certificate away also in
    the window between an upgrade and the leader's restart: each takes effect."""
    sock = ("--socket", str(cluster.admin_socket))
    token_id = cluster.create_token("n-brake", next_loopback()).split(".", 1)[0]
    granted = tlsroll(*sock, "viewer", "grant", "--name", "brake")
    assert granted.exit_code == 0, granted.stderr
    listed = tlsroll(*sock, "viewer", "list", "--json")
    (grant_id,) = [g["id"] for g in json.loads(listed.stdout) if g["name"] == "brake"]
    serial = "5eed" + "0" * 28  # one the store has no record of (--unknown)

    other_code(monkeypatch)
    revoked = tlsroll(*sock, "token", "revoke", token_id)
    warned_once(revoked)
    assert revoked.stdout == f"revoked token {token_id}\n"
    revoked = tlsroll(*sock, "viewer", "revoke", grant_id)
    warned_once(revoked)
    assert revoked.stdout == f"revoked viewer grant {grant_id}\n"
    revoked = tlsroll(*sock, "ca", "revoke", "--unknown", serial)
    warned_once(revoked)
    assert revoked.stdout == f"revoked {serial}\n"

    monkeypatch.undo()
    tokens = json.loads(tlsroll(*sock, "token", "list", "--json").stdout)
    assert [t.get("revoked") for t in tokens if t["id"] == token_id] == [True]
    grants = json.loads(tlsroll(*sock, "viewer", "list", "--json").stdout)
    assert [g["state"] for g in grants if g["id"] == grant_id] == ["revoked"]
    uri = f"{cluster.store_path.as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        rows = db.execute("SELECT revoked_at FROM certificates WHERE serial = ?", (serial,))
        (revoked_at,) = rows.fetchone()
    assert revoked_at is not None


def test_a_serial_no_certificate_can_have_is_refused_before_it_is_sent(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    """A leader from before session 34 (reached through other code) would record serial 0 and
    then fail every revocation list it signs: the CLI refuses it before anything is sent."""
    called: list[str] = []
    real_call = Leader.call

    def call(self: Leader, method: Any, request: Any, timeout: float = 30) -> Any:
        called.append(getattr(method, "name", "?"))
        return real_call(self, method, request, timeout)

    monkeypatch.setattr(Leader, "call", call)
    other_code(monkeypatch)
    for args in (["ca", "revoke", "0"], ["ca", "revoke", "--unknown", "f" * 40]):
        result = tlsroll("--socket", str(cluster.admin_socket), *args)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)  # a bad value
        assert result.stderr.splitlines() == [
            f"tlsroll: error: {args[-1]!r} is not a serial this CA can have issued (1 to 2^159-1)"
            " (see: tlsroll ca revoke --help)"
        ]
    result = tlsroll("--socket", str(cluster.admin_socket), "workstations", "revoke", "000")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert called == []


BRAKE_REQUESTS = {
    "ControlRollout": {"rollout_id", "action"},
    "RevokeToken": {"id"},
    "RevokeViewerGrant": {"id"},
    # workstations_only (4): dropped by an older leader, which revokes a workstation's serial
    # as asked all the same (and any other serial too, as it always did).
    "RevokeCertificate": {"name_or_serial", "reason", "unknown", "workstations_only"},
}


def test_every_brake_asks_only_what_the_leaders_of_this_contract_read() -> None:
    """A brake goes through a leader of other code because that leader reads its whole request
    (leader/cli/base.py ``STOPS``): a field added to one is one an older leader drops."""
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert set(BRAKE_REQUESTS) == STOPS
    for name, fields in BRAKE_REQUESTS.items():
        asked = {f.name for f in service.methods_by_name[name].input_type.fields}
        assert asked == fields, (
            f"{name}'s request changed ({sorted(asked ^ fields)}): would an older leader "
            "that drops it still stop or revoke as asked? If not, take it out of STOPS"
        )


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Node, str]]:
    """A leader whose rollout runs (its only node's agent died mid-switch and stays away: the
    rollout stays running) and that node (whose credentials may still call the leader); the
    rollout's id."""
    root = tmp_path_factory.mktemp("held")
    with Cluster(root, next_loopback(), heartbeat_interval=1) as c:
        node = Node(c, "h1", next_loopback(), root / "h1")
        try:
            c.init()
            c.start_leader()
            node.start({CRASH_ENV: "frozen"})  # the agent SIGKILLs itself once frozen
            c.wait_for_nodes_online(["h1"])
            password = root / "password"
            password.write_text(PASSWORD)
            password.chmod(0o600)
            started = c.cli(
                *("rollout", "start", "--scope", "cluster", "--password-file", str(password)),
                "--yes",
            )
            assert started.returncode == 0, started.stderr
            assert node.agent is not None and node.agent.proc is not None
            node.agent.proc.wait(60)
            status = json.loads(c.cli("rollout", "status", "--json").stdout)
            assert status["state"] == "running", status
            yield c, node, status["id"]
        finally:
            node.close()


def rollout_state(cluster: Cluster) -> str:
    status = json.loads(cluster.cli("rollout", "status", "--json").stdout)
    state: str = status["state"]
    return state


def test_pause_and_abort_go_through_a_leader_of_other_code_and_resume_does_not(
    held: tuple[Cluster, Node, str], monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    """Pause and abort are the brakes of a rollout that runs while the leader runs other code
    (`install.sh --restart-later`); resume sets it going again, and waits for the restart a
    pause is the time for."""
    cluster, _, rid = held
    sock = ("--socket", str(cluster.admin_socket))
    other_code(monkeypatch)
    paused = tlsroll(*sock, "rollout", "pause")
    warned_once(paused)
    assert paused.stdout == f"rollout {rid}: paused\n"
    assert rollout_state(cluster) == "paused"

    resumed = tlsroll(*sock, "rollout", "resume", rid)
    assert resumed.exit_code == EXIT_OTHER_CODE, (resumed.stdout, resumed.stderr)
    assert rollout_state(cluster) == "paused"

    aborted = tlsroll(*sock, "rollout", "abort", rid)
    warned_once(aborted)
    assert aborted.stdout == f"rollout {rid}: aborting\n"
    assert rollout_state(cluster) == "aborting"


def test_workstations_revoke_goes_through_a_leader_of_other_code(
    held: tuple[Cluster, Node, str], monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    cluster, node, _ = held
    assert node.agent is not None
    key = pki.generate_key()
    csr = pki.csr_to_pem(pki.make_csr(key, bootstrap_protocol.workstation_names("ws-brake")))
    agent = (node.agent.cert_file.read_bytes(), node.agent.key_file.read_bytes())
    with cluster.control_channel(*agent) as channel:
        leader_pb2_grpc.LeaderStub(channel).SignWorkstationCertificate(
            leader_pb2.SignWorkstationRequest(csr_pem=csr), timeout=10
        )

    other_code(monkeypatch)
    revoked = tlsroll("--socket", str(cluster.admin_socket), "workstations", "revoke", "ws-brake")
    # (The note that the managed servers take it until its end: review s64 pki M1.)
    warned_once(revoked, "tlsroll: note: the managed servers read no revocation list")
    monkeypatch.undo()
    listed = json.loads(cluster.cli("workstations", "list", "--json").stdout)
    assert [w["name"] for w in listed if "revoked_at" in w] == ["ws-brake"]


# --- (e) refused before anything is shown or asked (review s35 L1) -----------------------------


def refused_at_once(result: Ran) -> None:
    """Exit 5 with the one error line, and nothing on stdout: no password, no question."""
    assert result.exit_code == EXIT_OTHER_CODE, (result.stdout, result.stderr)
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("tlsroll: error: the running tlsroll-leader is other code"), line


def test_password_set_generate_through_a_leader_of_other_code_shows_no_password(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    """A password shown "once, never again" and then not staged is one the admin wrote down
    (and perhaps passed on) for nothing."""
    before = cluster.store_rows(("auth_versions", "audit"))
    other_code(monkeypatch)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # shown only on a terminal
    result = tlsroll("--socket", str(cluster.admin_socket), "password", "set", "--generate")
    refused_at_once(result)
    assert cluster.store_rows(("auth_versions", "audit")) == before


@pytest.mark.parametrize(
    "args",
    [["rollout", "finalize"], ["nodes", "remove", "n1"], ["epoch", "advance"]],
    ids=["finalize", "nodes-remove", "epoch-advance"],
)
def test_a_change_that_asks_first_is_refused_before_it_asks(
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    tlsroll: Callable[..., Ran],
    args: list[str],
) -> None:
    before = cluster.store_rows(("audit",))
    other_code(monkeypatch)
    refused_at_once(tlsroll("--socket", str(cluster.admin_socket), *args))
    assert cluster.store_rows(("audit",)) == before


def test_viewer_list_says_signed_out_and_a_newer_leader_s_state_by_its_number(
    monkeypatch: pytest.MonkeyPatch, tlsroll: Callable[..., Ran]
) -> None:
    """Session 68: a grant whose browser signed out is ``signed_out`` (it showed as revoked,
    as after `viewer revoke`). A CLI before it reads that value as none it knows: an empty
    cell (and --json ""), after the warning that the leader runs other code. This CLI shows
    a state it does not know (a newer leader's, here 99) by its number instead; --json keeps
    "" (as for every enum it does not know)."""
    states = {
        "signed": admin_pb2.VIEWER_GRANT_STATE_SIGNED_OUT,
        "cut": admin_pb2.VIEWER_GRANT_STATE_REVOKED,
        "later": 99,
    }

    class Answers:
        def ListViewerGrants(self, request: Any, timeout: float = 30) -> Any:
            reply = admin_pb2.ListViewerGrantsResponse()
            for name, state in states.items():
                reply.grants.add(id=f"id{name}", name=name, state=state, created_by="root")
            return reply

    @contextlib.contextmanager
    def admin(self: Leader) -> Iterator[Any]:
        yield Answers()

    monkeypatch.setattr(Leader, "admin", admin)
    listed = tlsroll("viewer", "list", "--json")
    assert listed.exit_code == 0, listed.stderr
    said = {g["name"]: g["state"] for g in json.loads(listed.stdout)}
    assert said == {"signed": "signed_out", "cut": "revoked", "later": ""}
    table = tlsroll("viewer", "list")
    assert table.exit_code == 0, table.stderr
    rows = {line.split()[1]: line for line in table.stdout.splitlines() if "id" in line}
    assert "signed_out" in rows["idsigned"], table.stdout
    assert "revoked" in rows["idcut"] and "? (99)" in rows["idlater"], table.stdout
