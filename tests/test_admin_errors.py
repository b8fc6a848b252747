"""Every error path of the Admin service answers with its own gRPC status (a real leader over
its Unix socket), and the error map behind it picks the most specific class.

The status is decided in one place (``tlsroll.rpc.map_errors`` with ``leader.service.ERRORS``),
by the most specific class of the error: ``NodesOffline`` is a ``PlanError`` but says
FAILED_PRECONDITION, whatever the order of the map (it once came back INVALID_ARGUMENT).

The cluster here has no agent process: nodes are enrolled with crafted requests, and "online"
is a heartbeat this test sends with the node's own certificate. A rollout over such a node
stays in preflight (its agent port answers nothing), which keeps it active for the paths that
need an active rollout.
"""

from __future__ import annotations

import ast
import base64
import importlib
import json
import pkgutil
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

import leader
import nodeagent
import refserver
import tlsroll
import workstation
from leader import planner
from leader.rollout_core import Change, FreezeMode, RolloutAction, ScopeKind
from leader.wire import CHANGE, FREEZE, ROLLOUT_ACTION, SCOPE_KIND
from nodeagent import cryptoworker
from tests.cluster import Cluster, enrol, enrol_request
from tests.conftest import next_loopback
from tlsroll import password, pki
from tlsroll.defaults import AGENT_PORT
from tlsroll.errors import ConfigError, TerminalError, TlsrollError, TransientError
from tlsroll.rpc import BASE_ERRORS, MAX_DETAILS, error_status, short_details, status_for
from tlsroll.v1 import (
    admin_pb2,
    agent_pb2,
    agent_pb2_grpc,
    leader_pb2,
    leader_pb2_grpc,
    types_pb2,
)
from tlsroll.wire import WireError

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("admin-errors"), next_loopback()) as c:
        c.init()  # no --node-name: scope local cannot be planned
        c.start_leader()
        yield c


class StubAgent(agent_pb2_grpc.NodeAgentServicer):
    """Just enough of an agent for the leader's plan: it says it runs http, and its preflight
    never answers (the rollout stays in preflight, up to the leader's step deadline)."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def GetStatus(self, request: Any, context: Any) -> agent_pb2.NodeStatus:
        view = agent_pb2.ServerView(driver="stub", healthy=True, schemes=["http"])
        return agent_pb2.NodeStatus(server=view)

    def Check(self, request: Any, context: Any) -> agent_pb2.PreflightResponse:
        view = agent_pb2.ServerView(driver="stub", healthy=True, schemes=["http"])
        return agent_pb2.PreflightResponse(ok=True, server=view)  # as every real agent's

    def Preflight(self, request: Any, context: Any) -> agent_pb2.PreflightResponse:
        self.stop.wait(60)
        context.abort(grpc.StatusCode.UNAVAILABLE, "stub agent stopping")
        raise AssertionError("unreachable")


class Node:
    """An enrolled node with a stub agent (mutual TLS with its own certificate)."""

    def __init__(self, cluster: Cluster, name: str, *, agent: bool = True) -> None:
        self.cluster = cluster
        self.name = name
        key = pki.generate_key()
        self.key_pem = pki.key_to_pem(key)
        address = next_loopback()
        token = cluster.create_token(name, address)
        reply = enrol(cluster, enrol_request(token, name, address, key=key))
        self.cert_pem = reply.certificate_pem
        self.stub = StubAgent()  # type: ignore[abstract]  # answers what the plan asks
        self.server: grpc.Server | None = None
        if agent:
            self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            agent_pb2_grpc.add_NodeAgentServicer_to_server(self.stub, self.server)
            creds = grpc.ssl_server_credentials(
                [(self.key_pem, self.cert_pem)],
                root_certificates=cluster.ca_pem,
                require_client_auth=True,
            )
            self.server.add_secure_port(f"{address}:{AGENT_PORT}", creds)
            self.server.start()

    def close(self) -> None:
        self.stub.stop.set()
        if self.server is not None:
            self.server.stop(None)

    def heartbeat(self) -> None:
        with self.cluster.control_channel(self.cert_pem, self.key_pem) as channel:
            leader_pb2_grpc.LeaderStub(channel).Heartbeat(
                leader_pb2.HeartbeatRequest(agent_version="test"), timeout=10
            )


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    exc: Any = err.value
    return exc.code(), exc.details()


def request(
    change: Change = Change.ENABLE_TLS,
    scope: ScopeKind | None = ScopeKind.CLUSTER,
    freeze: FreezeMode | None = FreezeMode.NODE,
    **fields: Any,
) -> admin_pb2.RolloutRequest:
    unset: Any = 0  # UNSPECIFIED
    return admin_pb2.RolloutRequest(
        change=CHANGE.wire(change),
        scope=SCOPE_KIND.wire(scope) if scope else unset,
        freeze=FREEZE.wire(freeze) if freeze else unset,
        **fields,
    )


def raw(**numbers: Any) -> admin_pb2.RolloutRequest:
    """A request with enum numbers as given (unchecked: an old or bent client)."""
    return admin_pb2.RolloutRequest(**numbers)


VERIFIER = password.verifier_to_json(password.make_verifier("correct horse battery staple"))


def test_plan_and_start_error_paths(cluster: Cluster) -> None:
    with cluster.admin() as admin:
        # Nothing enrolled yet.
        assert (
            code_of(lambda: admin.PlanRollout(request(), timeout=10))[0] == Code.FAILED_PRECONDITION
        )
        offline = Node(cluster, "offline1", agent=False)  # enrolled, never a heartbeat
        cases: list[tuple[admin_pb2.RolloutRequest, grpc.StatusCode, str]] = [
            (request(), Code.FAILED_PRECONDITION, "offline: offline1"),  # NodesOffline
            (request(scope=ScopeKind.NODES, nodes=["ghost"]), Code.NOT_FOUND, "ghost"),  # L6
            (request(scope=ScopeKind.LOCAL), Code.INVALID_ARGUMENT, "node_name"),
            (request(scope=ScopeKind.NODES), Code.INVALID_ARGUMENT, "node list"),
            (request(nodes=["offline1"]), Code.INVALID_ARGUMENT, "node list"),
            (request(scope=None), Code.INVALID_ARGUMENT, "scope: missing"),
            (request(freeze=None), Code.INVALID_ARGUMENT, "freeze: missing"),
            (raw(scope=2, freeze=1), Code.INVALID_ARGUMENT, "change: missing"),
            (raw(change=99, scope=2, freeze=1), Code.INVALID_ARGUMENT, "99"),
            (request(max_parallel=500), Code.INVALID_ARGUMENT, "max-parallel"),
            (request(Change.DISABLE_TLS), Code.INVALID_ARGUMENT, "takes its nodes"),
        ]
        for req, code, words in cases:
            got, details = code_of(partial(admin.PlanRollout, req, timeout=10))
            assert (got, words in details) == (code, True), (req, got, details)
        assert offline.name == "offline1"
        offline.close()

        node = Node(cluster, "node1")
        node.heartbeat()
        online = request(scope=ScopeKind.NODES, nodes=["node1"])
        assert admin.PlanRollout(online, timeout=10).rollout.nodes[0].name == "node1"
        start_cases: list[tuple[admin_pb2.RolloutRequest, grpc.StatusCode, str]] = [
            (online, Code.INVALID_ARGUMENT, "password-file"),  # enable-tls without a verifier
            (
                request(scope=ScopeKind.NODES, nodes=["node1"], auth_verifier_json="{"),
                Code.INVALID_ARGUMENT,
                "bad password verifier",
            ),
            (  # the cluster's state, not the request: exit 1 (audit s38 M5)
                request(Change.CHANGE_PASSWORD, scope=ScopeKind.NODES, nodes=["node1"]),
                Code.FAILED_PRECONDITION,
                "no password staged: run `tlsroll password set` first",
            ),
            (
                request(
                    Change.ROTATE_CERT,
                    scope=ScopeKind.NODES,
                    nodes=["node1"],
                    auth_verifier_json=VERIFIER,
                ),
                Code.INVALID_ARGUMENT,
                "brings no password of its own",
            ),
            (  # nothing to take back: a precondition, not a bad request
                request(Change.DISABLE_TLS, scope=None),
                Code.FAILED_PRECONDITION,
                "no enable-tls rollout",
            ),
        ]
        for req, code, words in start_cases:
            got, details = code_of(partial(admin.StartRollout, req, timeout=10))
            assert (got, words in details) == (code, True), (req, got, details)
        # The plan checks the staged password as the start does (it said OK: audit s38 M5).
        unstaged = request(Change.CHANGE_PASSWORD, scope=ScopeKind.NODES, nodes=["node1"])
        got, details = code_of(partial(admin.PlanRollout, unstaged, timeout=10))
        assert (got, "no password staged" in details) == (Code.FAILED_PRECONDITION, True), details
        bad = admin_pb2.SetPasswordRequest(auth_verifier_json="not json")
        assert code_of(lambda: admin.SetPassword(bad, timeout=10))[0] == Code.INVALID_ARGUMENT
    node.close()


def test_a_verifier_no_workstation_accepts_is_not_staged(tmp_path: Path) -> None:
    """Review s66 pw L2: the leader staged any verifier a verifier file may hold (scrypt n up
    to 2**20, r 32, p 16, a hash of 64 bytes), while a workstation computes no more than
    tlsroll's own parameters (``tlsroll.password.kdf_problem``): one with p=2 was staged, a
    change-password rollout applied it and completed, and every workstation then refused
    every node's hello. Refused (INVALID_ARGUMENT), nothing staged; the tests' cheaper n (the
    scrypt hook's, ``password.TEST_PARAMS``) is one workstations accept."""
    base = dict(password.make_verifier("correct horse battery staple", **password.TEST_PARAMS))
    long_hash = base64.b64encode(bytes(64)).decode()
    with Cluster(tmp_path, next_loopback()) as c:
        c.init()
        c.start_leader()
        with c.admin() as admin:
            for changes, says in (
                ({"p": 2}, "p=2"),
                ({"n": 2**16}, "n=65536"),
                ({"r": 16}, "r=16"),
                ({"hash": long_hash}, "dklen=64"),
            ):
                verifier = json.dumps({**base, **changes})
                bad = admin_pb2.SetPasswordRequest(auth_verifier_json=verifier)
                got, details = code_of(partial(admin.SetPassword, bad, timeout=10))
                assert got == Code.INVALID_ARGUMENT, (changes, got, details)
                assert says in details and "no workstation would accept it" in details, details
            staged = admin.SetPassword(
                admin_pb2.SetPasswordRequest(auth_verifier_json=json.dumps(base)), timeout=10
            )
            assert staged.version == 1  # the first: none of those was staged


def test_control_and_busy_error_paths(cluster: Cluster) -> None:
    node = Node(cluster, "busy1")
    with cluster.admin() as admin:
        action = admin_pb2.ControlRolloutRequest
        pause = ROLLOUT_ACTION.wire(RolloutAction.PAUSE)
        resume = ROLLOUT_ACTION.wire(RolloutAction.RESUME)
        got, details = code_of(lambda: admin.ControlRollout(action(action=pause), timeout=10))
        assert (got, "no rollout yet" in details) == (Code.FAILED_PRECONDITION, True), details
        got, details = code_of(
            lambda: admin.ControlRollout(action(rollout_id="r-none", action=pause), timeout=10)
        )
        assert (got, "r-none" in details) == (Code.NOT_FOUND, True), details
        got, details = code_of(lambda: admin.ControlRollout(action(), timeout=10))
        assert (got, "action: missing" in details) == (Code.INVALID_ARGUMENT, True), details

        node.heartbeat()
        start = request(scope=ScopeKind.NODES, nodes=["busy1"], auth_verifier_json=VERIFIER)
        view = admin.StartRollout(start, timeout=10)  # stays in preflight: the stub never answers
        node.heartbeat()
        got, details = code_of(lambda: admin.StartRollout(start, timeout=10))
        assert (got, view.id in details) == (Code.FAILED_PRECONDITION, True), details  # busy
        got, details = code_of(
            lambda: admin.SetPassword(
                admin_pb2.SetPasswordRequest(auth_verifier_json=VERIFIER), timeout=10
            )
        )
        assert (got, view.id in details) == (Code.FAILED_PRECONDITION, True), details
        # A resume of a running rollout succeeds and changes nothing (review rev58a L4).
        resumed = admin.ControlRollout(action(action=resume), timeout=10)
        assert resumed.id == view.id and resumed.state == types_pb2.ROLLOUT_STATE_RUNNING
        admin.ControlRollout(action(action=ROLLOUT_ACTION.wire(RolloutAction.ABORT)), timeout=10)
    node.close()


def test_the_most_specific_class_decides_whatever_the_order() -> None:
    specific_last = {planner.PlanError: Code.INVALID_ARGUMENT, planner.NodesOffline: Code.ABORTED}
    specific_first = dict(reversed(list(specific_last.items())))
    for mapping in (specific_last, specific_first):
        assert status_for(planner.NodesOffline(["n"]), mapping) == Code.ABORTED
        assert status_for(planner.UnknownNodes(["n"]), mapping) == Code.INVALID_ARGUMENT
        assert status_for(ValueError("x"), mapping) is None


def test_a_long_value_echoed_in_a_refusal_comes_back_cut_not_as_grpc_s_limit(
    cluster: Cluster,
) -> None:
    """A refusal echoes the value it refuses; 100,000 characters went over gRPC's 16 KiB
    metadata limit and the admin read "Stream removed (received metadata size exceeds hard
    limit …)" (audit s34 L1). The details are cut to ``MAX_DETAILS``."""
    result = cluster.cli("nodes", "remove", "a" * 100_000, "--yes")
    assert result.returncode == 1, result.stderr
    assert "no enrolled node" in result.stderr and "aaaa" in result.stderr, result.stderr[:300]
    assert "metadata" not in result.stderr and result.stderr.count("\n") == 1
    assert len(result.stderr) < MAX_DETAILS + 100
    assert short_details("x" * 5000) == "x" * (MAX_DETAILS - 1) + "…"


def _fails_in_a_library() -> None:
    int("not a number")


def test_an_internal_error_logs_its_type_and_place_never_its_message() -> None:
    """rpc.internal_error names the type and where it was raised (audit s34 L6: H1 showed
    only "ValueError" four times a second), never the message: it may hold any value."""
    try:
        _fails_in_a_library()
    except ValueError as exc:
        with structlog.testing.capture_logs() as logs:
            code, details = error_status(exc, {}, "Heartbeat")
    assert code == Code.INTERNAL and "not a number" not in details
    [line] = [e for e in logs if e["event"] == "rpc.internal_error"]
    assert line["error_type"] == "ValueError" and "not a number" not in str(line)
    assert line["where"].startswith("tests/test_admin_errors.py:")
    assert line["where"].endswith("in _fails_in_a_library"), line


def test_an_internal_error_from_a_file_names_the_file_and_its_errno(tmp_path: Path) -> None:
    """Review s69 revlogs M2: a file the daemon could not write for a reason that is not a full
    or failing disk (a directory where its file goes, a file it may not write) was
    ``rpc.internal_error`` with its type and place only (``IsADirectoryError``,
    ``tlsroll/fsutil.py:148 in replace_staged``), and the caller read "internal error; see the
    daemon's log": neither said which file. An OSError's path and the system's words hold no
    value of a request or a secret: the line and the details name them, so the admin knows
    what to fix. The status stays INTERNAL; any other error's message is still kept out."""
    taken = tmp_path / "ca.pem"
    taken.mkdir()
    try:
        taken.write_bytes(b"x")
    except IsADirectoryError as exc:
        with structlog.testing.capture_logs() as logs:
            code, details = error_status(exc, {}, "Stage", paths=True)
    assert code == Code.INTERNAL
    assert f"{taken}: Is a directory (errno 21, EISDIR)" in details, details
    assert details.startswith("internal error: ") and "see the daemon's log" in details
    [line] = [e for e in logs if e["event"] == "rpc.internal_error"]
    assert line["error"] == f"{taken}: Is a directory (errno 21, EISDIR)", line
    assert line["error_type"] == "IsADirectoryError" and line["method"] == "Stage"
    # An OSError raised with a message of its own (no errno) may hold any value: not sent.
    with structlog.testing.capture_logs() as logs:
        code, details = error_status(OSError("secret-ish text"), {}, "Stage")
    assert code == Code.INTERNAL and "secret-ish" not in details + str(logs)


class _Aborted(Exception):
    pass


class _Context:
    """What ``map_errors`` asks of a call's context: ``abort``, which records the status."""

    def __init__(self) -> None:
        self.status: tuple[Code, str] | None = None

    async def abort(self, code: Code, details: str) -> None:
        self.status = (code, details)
        raise _Aborted


def test_a_file_error_names_its_path_only_to_the_admin_and_the_leader(tmp_path: Path) -> None:
    """Session 70 (review s69, left): an OSError's path and errno (s69 revlogs M2) went to
    every caller, the join port's too, who holds a join token or nothing and learnt the
    leader's file layout. A servicer whose callers may read paths says so (``SHOWS_PATHS``:
    the admin socket's two, the agent's, whose one caller is the leader); any other's caller
    gets the generic INTERNAL text, or a full or read-only disk's errno without its path. The
    log line keeps the path either way."""
    import asyncio

    from leader.admin_service import AdminService
    from leader.schema_view import SchemaViewService
    from leader.service import EnrolmentService, LeaderService
    from nodeagent.service import NodeAgentService
    from tlsroll.rpc import INTERNAL_DETAILS, SHOWS_PATHS, map_errors

    taken = tmp_path / "ca.pem"
    taken.mkdir()
    readonly = OSError(30, "Read-only file system", str(tmp_path / "leader.sqlite3"))

    class Join:  # as the join port's servicer: no ``shows_paths``
        @map_errors({})
        async def Enrol(self, request: object, context: Any) -> None:
            taken.write_bytes(b"x")

        @map_errors({})
        async def Store(self, request: object, context: Any) -> None:
            raise readonly

    class Admin(Join):
        shows_paths = True

    def status(servicer: Join, method: str) -> tuple[tuple[Code, str] | None, list[Any]]:
        context = _Context()
        with structlog.testing.capture_logs() as logs, pytest.raises(_Aborted):
            asyncio.run(getattr(servicer, method)(None, context))
        return context.status, logs

    told, logs = status(Join(), "Enrol")
    assert told == (Code.INTERNAL, INTERNAL_DETAILS), told
    [line] = [e for e in logs if e["event"] == "rpc.internal_error"]
    assert line["error"] == f"{taken}: Is a directory (errno 21, EISDIR)", line
    told, logs = status(Join(), "Store")
    assert told == (Code.UNAVAILABLE, "Read-only file system (errno 30, EROFS)"), told
    assert str(tmp_path) in str(logs)
    told, _ = status(Admin(), "Enrol")
    assert told is not None and f"{taken}: Is a directory" in told[1], told
    told, _ = status(Admin(), "Store")
    assert told is not None and str(tmp_path / "leader.sqlite3") in told[1], told
    # The servicers: the admin socket's and the agent's read paths; the join port's and the
    # control port's (every node) do not.
    for servicer in (AdminService, SchemaViewService, NodeAgentService):
        assert getattr(servicer, SHOWS_PATHS, False) is True, servicer
    for other in (EnrolmentService, LeaderService):
        assert getattr(other, SHOWS_PATHS, False) is False, other


def _all_error_classes() -> set[type[TlsrollError]]:
    for package in (tlsroll, leader, nodeagent, workstation, refserver):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    found: set[type[TlsrollError]] = set()
    todo: list[type[TlsrollError]] = [TlsrollError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_error_is_transient_or_terminal() -> None:
    """One tree: every error class of the project is exactly one of the two kinds, and
    every exception class the project defines is in the tree."""
    classes = _all_error_classes()
    assert len(classes) > 20
    kinds = {c: (issubclass(c, TransientError), issubclass(c, TerminalError)) for c in classes}
    both_or_neither = [
        c for c, (t, e) in kinds.items() if t == e and c not in {TransientError, TerminalError}
    ]
    assert both_or_neither == []
    ours = [
        obj
        for package in ("tlsroll", "leader", "nodeagent", "workstation", "refserver")
        for name, module in list(__import__("sys").modules.items())
        if name == package or name.startswith(f"{package}.")
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and obj.__module__ == name
        and "_pb2" not in name
    ]
    # The one exception: the crypto worker's stand-in for a bug in an op (a TypeError, a
    # KeyError in the child), which is deliberately not the project's own, so that a servicer
    # answers INTERNAL with a generic message, as it did for that bug before the worker.
    foreign = {cryptoworker.WorkerBug}
    assert ours and all(issubclass(c, TlsrollError) for c in ours if c not in foreign), [
        c for c in ours if not issubclass(c, TlsrollError) and c not in foreign
    ]


def test_nothing_raises_the_root_of_the_tree() -> None:
    """``raise TlsrollError(...)`` would be neither kind: callers could not tell retry from
    report. Every raise names a TransientError or a TerminalError (or a subclass)."""
    root = Path(__file__).resolve().parent.parent
    bad = []
    for package in ("tlsroll", "leader", "nodeagent", "workstation", "refserver"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Raise)
                    and isinstance(node.exc, ast.Call)
                    and isinstance(node.exc.func, ast.Name)
                    and node.exc.func.id == "TlsrollError"
                ):
                    bad.append(f"{path.relative_to(root)}:{node.lineno}")
    assert bad == []


def test_the_project_errors_have_a_status_by_kind() -> None:
    """Found by review: a project error no map named (a ConfigError from a driver in Preflight)
    became INTERNAL "see the daemon's log"; a TransientError was not UNAVAILABLE, so the
    leader took it for terminal. Only a bug of ours is INTERNAL now."""
    assert status_for(ConfigError("agent.toml", "[server].x", "bad"), BASE_ERRORS) == (
        Code.FAILED_PRECONDITION
    )
    assert status_for(TransientError("busy"), BASE_ERRORS) == Code.UNAVAILABLE
    assert status_for(WireError("x"), BASE_ERRORS) == Code.INVALID_ARGUMENT
    assert status_for(KeyError("bug"), BASE_ERRORS) is None
