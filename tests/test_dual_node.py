"""The node side of the transitional strategy (issue 12): a real agent and a real reference
server, driven over mutual TLS by a stand-in for the leader.

Phase 1 is ``Switch(enable-tls, keep_http)``: the server serves http on 8080 *and* https on
8443 with the staged certificate (the node is *dual*). Phase 2 is ``Switch(finalize)`` under a
rollout id of its own: http closes, https stays exactly as it was. Each goes through the same
safe transaction, and each rolls back to the side it came from.

Every node has its own loopback address with the seed's ports (8080, 8443).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import sqlite3
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nodeagent.transaction import CRASH_ENV
from tests.cluster import AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import RPC_TIMEOUT, Node, NodeFactory, TxnView
from tlsroll import httpcheck, password, pki
from tlsroll.clients import WORKSTATION_HEADER
from tlsroll.enums import Change, names_another_switch
from tlsroll.tls import client_context
from tlsroll.v1 import agent_pb2, types_pb2
from tlsroll.wire import CHANGE

DUAL = ["http", "https"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("dual"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@pytest.fixture
def make_node(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(cluster, tmp_path, "dn")
    try:
        yield factory
    finally:
        factory.close()


# --- the leader's calls ---------------------------------------------------------------------


def switch(
    node: Node, rollout_id: str, change: Change, *, keep_http: bool = False, verifier: str = ""
) -> TxnView:
    with node.stub() as stub:
        reply: agent_pb2.Transaction = stub.Switch(
            agent_pb2.SwitchRequest(
                command=node.command(rollout_id),
                change=CHANGE.wire(change),
                keep_http=keep_http,
                auth_verifier_json=verifier,
            ),
            timeout=RPC_TIMEOUT,
        )
    return TxnView(reply)


def rollback(node: Node, rollout_id: str, undoes: str | None = None) -> TxnView:
    request = agent_pb2.RollbackRequest(command=node.command(rollout_id))
    if undoes is not None:
        request.undoes = undoes
    with node.stub() as stub:
        reply: agent_pb2.Transaction = stub.Rollback(request, timeout=RPC_TIMEOUT)
    return TxnView(reply)


def status(node: Node) -> agent_pb2.NodeStatus:
    with node.stub() as stub:
        reply: agent_pb2.NodeStatus = stub.GetStatus(
            agent_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT
        )
    return reply


def refused(call: object) -> grpc.RpcError:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def go_dual(node: Node, rollout_id: str, verifier: str = "") -> str:
    """Phase 1 on ``node`` (with the auth password's ``verifier``, if given); the staged
    certificate's fingerprint."""
    staged = node.stage(rollout_id)
    switch(node, rollout_id, Change.ENABLE_TLS, keep_http=True, verifier=verifier)
    done = node.wait_txn(rollout_id)
    assert done.outcome == "completed", done.reason
    assert done.cert_fingerprint == staged.fingerprint
    return str(staged.fingerprint)


# --- where a node is, seen from outside and from the agent -----------------------------------


def assert_http_only(node: Node) -> None:
    assert node.get("http").status == 200
    assert not node.port_open(8443)
    s = node.admin_status()
    assert s["listen"] == ["http"] and s["frozen"] is False
    assert list(status(node).server.schemes) == ["http"]


def assert_dual(node: Node, fingerprint: str) -> None:
    """Both listeners of one server process at once, the same certificate on https."""
    assert node.get("http").json()["scheme"] == "http"
    assert node.get("https").json()["scheme"] == "https"
    assert node.served_fingerprint() == fingerprint
    s = node.admin_status()
    assert s["listen"] == DUAL and s["frozen"] is False
    view = status(node).server
    assert list(view.schemes) == DUAL and view.healthy
    assert list(view.urls) == [node.http_url(), node.https_url()]


def assert_https_only(node: Node, fingerprint: str) -> None:
    assert not node.port_open(8080)
    assert node.get("https").status == 200
    assert node.served_fingerprint() == fingerprint
    s = node.admin_status()
    assert s["listen"] == ["https"] and s["frozen"] is False
    assert list(status(node).server.schemes) == ["https"]


# --- phase 1 and 2, and the way back from each ------------------------------------------------


def test_dual_switch_serves_both_and_finalize_closes_http(make_node: NodeFactory) -> None:
    node = make_node()
    first = node.post("http", {"note": "before"}).json()
    secret = "Praxis-Passwort-2026"
    verifier = password.verifier_to_json(password.make_verifier(secret, **password.TEST_PARAMS))
    fingerprint = go_dual(node, "t1", verifier)
    assert_dual(node, fingerprint)
    # The password is live, and taken on https only: never in clear, also in the dual phase.
    assert node.post("https", {"password": secret}, path="login").status == 200
    assert node.post("http", {"password": secret}, path="login").status == 403
    pid = node.server_pid()
    # One store behind both: a write on http is read on https and the other way round.
    on_http = node.post("http", {"note": "dual via http"}).json()
    on_https = node.post("https", {"note": "dual via https"}).json()
    for entry in (first, on_http, on_https):
        for scheme in ("http", "https"):
            assert node.get(scheme, f"entries/{entry['id']}").status == 200
    verifier_digest = status(node).server.verifier_digest

    begun = switch(node, "t1.finalize", Change.FINALIZE)
    assert begun.kind == "switch" and begun.rollout_id == "t1.finalize"
    done = node.wait_txn("t1.finalize")
    assert done.outcome == "completed", done.reason
    assert done.cert_fingerprint == fingerprint
    assert done.old_url == f"{node.http_url()} {node.https_url()}"
    assert done.new_url == node.https_url()
    assert node.server_pid() != pid  # a real restart
    assert_https_only(node, fingerprint)
    view = status(node).server
    assert view.verifier_digest == verifier_digest != ""  # the same verifier
    assert node.post("https", {"password": secret}, path="login").status == 200
    for entry in (first, on_http, on_https):
        assert node.get("https", f"entries/{entry['id']}").status == 200

    # The rollback of the finalize: dual again, the same certificate.
    rollback(node, "t1.finalize")
    back = node.wait_txn("t1.finalize", "rollback")
    assert back.outcome == "completed", back.reason
    assert_dual(node, fingerprint)

    # A finalize can be tried again under a new id; then the way back goes to http only.
    switch(node, "t1.finalize-2", Change.FINALIZE)
    assert node.wait_txn("t1.finalize-2").outcome == "completed"
    assert_https_only(node, fingerprint)
    rollback(node, "wayback", undoes="")
    way = node.wait_txn("wayback", "rollback")
    assert way.outcome == "completed", way.reason
    assert_http_only(node)
    for entry in (first, on_http, on_https):
        assert node.get("http", f"entries/{entry['id']}").status == 200


@pytest.mark.parametrize("how", ["own", "wayback"])
def test_rollback_of_the_dual_switch_returns_to_http_only(make_node: NodeFactory, how: str) -> None:
    node = make_node()
    config = node.server.config_path.read_bytes()
    go_dual(node, "t2")
    if how == "own":  # the confirm step's rollback (the switch of the command's rollout)
        rollback(node, "t2")
        back = node.wait_txn("t2", "rollback")
    else:  # `tlsroll rollout rollback`: the way back from whatever the node runs
        rollback(node, "t2-back", undoes="")
        back = node.wait_txn("t2-back", "rollback")
    assert back.outcome == "completed", back.reason
    assert back.new_url == node.http_url()
    assert_http_only(node)
    assert node.server.config_path.read_bytes() == config


def test_finalize_is_refused_on_a_node_that_is_not_dual(make_node: NodeFactory) -> None:
    node = make_node()
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    err = refused(lambda: switch(node, "fin-http", Change.FINALIZE))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = str(err.details())
    assert "not dual (it serves http)" in detail and "\n" not in detail
    assert node.server.config_path.read_bytes() == config and node.server_pid() == pid
    assert node.journal_query("SELECT * FROM txns") == []

    # https only (the seed's direct switch) is not dual either.
    node.stage("direct")
    switch(node, "direct", Change.ENABLE_TLS)
    assert node.wait_txn("direct").outcome == "completed"
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    err = refused(lambda: switch(node, "fin-https", Change.FINALIZE))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not dual (it serves https)" in str(err.details())
    assert node.server.config_path.read_bytes() == config and node.server_pid() == pid
    assert [r["rollout_id"] for r in node.journal_query("SELECT rollout_id FROM txns")] == [
        "direct"
    ]


def test_finalize_under_the_phase_one_id_is_refused_not_replayed(make_node: NodeFactory) -> None:
    """The phase-1 switch's id names an enable-tls transaction: a finalize sent under it must
    not be answered "completed" with phase 1's outcome while http stays open."""
    node = make_node()
    fingerprint = go_dual(node, "t4")
    err = refused(lambda: switch(node, "t4", Change.FINALIZE))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs a rollout id of its own" in str(err.details())
    # What the leader reads it by: that switch is not the finalize's, never followed.
    assert names_another_switch(str(err.details()))
    assert_dual(node, fingerprint)
    # keep_http belongs to enable-tls only.
    err = refused(lambda: switch(node, "t4.f", Change.FINALIZE, keep_http=True))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The same phase-1 request again is a replay: the recorded outcome, nothing done twice.
    assert switch(node, "t4", Change.ENABLE_TLS, keep_http=True).outcome == "completed"


def _release(fifo: Path) -> None:
    """A reader blocked on ``fifo`` (the agent before review rev52's fix) let go: a writer
    opened and closed at once gives it an end of file, so that its agent can stop."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_finalize_with_the_live_certificate_a_fifo_is_refused_in_one_line(
    make_node: NodeFactory,
) -> None:
    """Session 51's review: the files the agent reads during a rollout's steps were plain
    reads. The live certificate a finalize's plan reads (its fingerprint) made a FIFO: the
    plan read it and waited for a writer for ever, on the agent's store thread (every later
    call of the agent waited too). Now the finalize is refused (FAILED_PRECONDITION, one line
    naming the file and what it is), nothing changes on the server, and the agent answers."""
    node = make_node()
    fingerprint = go_dual(node, "t6")
    cert = node.stage_dir("t6") / "server.pem"
    kept = cert.read_bytes()
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    cert.unlink()
    os.mkfifo(cert, 0o600)
    try:
        err = refused(lambda: switch(node, "t6.finalize", Change.FINALIZE))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        detail = str(err.details())
        assert f"{cert} is not a regular file (a FIFO)" in detail, detail
        assert "\n" not in detail and "Traceback" not in detail
        assert node.server.config_path.read_bytes() == config and node.server_pid() == pid
        assert list(status(node).server.schemes) == DUAL  # the agent answers
    finally:
        _release(cert)
        cert.unlink()
        cert.write_bytes(kept)
    switch(node, "t6.finalize-2", Change.FINALIZE)
    assert node.wait_txn("t6.finalize-2").outcome == "completed"
    assert_https_only(node, fingerprint)


# --- verification failing in each phase --------------------------------------------------------


def write_behind_the_freeze(node: Node) -> None:
    """A row committed straight into the server's store, as a write the freeze failed to stop
    would be: the watermark moves, and verify must notice."""
    db_path = node.server_data_dir / "entries.sqlite3"
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db, db:
        db.execute(
            "INSERT INTO entries (id, body, created_at) VALUES (?, '{}', '2026-01-01T00:00:00Z')",
            (uuid.uuid4().hex,),
        )


@pytest.mark.parametrize("phase", ["dual", "finalize"])
def test_failed_verification_rolls_back_to_the_side_it_came_from(
    make_node: NodeFactory, phase: str
) -> None:
    node = make_node()
    assert node.agent is not None
    fingerprint = ""
    if phase == "finalize":
        fingerprint = go_dual(node, "t5")
    else:
        node.stage("t5")
    before = node.server.config_path.read_bytes()
    # The agent dies right after the restart (the crash hook), the test slips a write past the
    # freeze, and the agent, started again, resumes at verify.
    node.agent.stop()
    node.restart_agent({CRASH_ENV: "restarted"})
    rid = "t5.finalize" if phase == "finalize" else "t5"
    with contextlib.suppress(grpc.RpcError):  # it may die before its answer is out
        if phase == "finalize":
            switch(node, rid, Change.FINALIZE)
        else:
            switch(node, rid, Change.ENABLE_TLS, keep_http=True)
    assert node.agent.proc is not None
    assert node.agent.proc.wait(30) == -signal.SIGKILL
    write_behind_the_freeze(node)
    node.restart_agent()

    done = node.wait_txn(rid)
    assert done.outcome == "rolled_back", done.reason
    assert done.reason.startswith("verify:") and "watermark moved" in done.reason, done.reason
    assert node.server.config_path.read_bytes() == before
    if phase == "finalize":
        assert_dual(node, fingerprint)
    else:
        assert_http_only(node)
    events = node.journal_events(rid)
    assert ("verify", "error") in events and ("rolled_back", "end") in events


# --- who is still on http ------------------------------------------------------------------------


def get_from(
    source: str, url: str, *, context: ssl.SSLContext | None = None, name: str = ""
) -> int:
    """GET ``url`` from the local address ``source`` (the client socket is bound to it), as the
    workstation with that address would, optionally saying its name."""
    host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    conn: http.client.HTTPConnection
    if context is not None:
        conn = httpcheck.HTTPSConnection(
            host, int(port), timeout=10, context=context, source_address=(source, 0)
        )
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={WORKSTATION_HEADER: name} if name else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_the_agent_reports_who_is_still_on_http(make_node: NodeFactory, tmp_path: Path) -> None:
    """GetStatus says, per scheme, which workstations the dual server has seen: the one still
    on http (named by its header) and the one that moved to https (named by the client
    certificate it enrolled for). The agent's own verify probes are not among them."""
    node = make_node(clients_refresh=0)
    go_dual(node, "t6")
    empfang, labor = next_loopback(), next_loopback()
    key = pki.generate_key()
    ws_cert = node.ca().issue(
        key.public_key(), pki.Names.of("ws-labor", [labor]), server=False, client=True
    )
    pki.write_key(tmp_path / "ws.key", key)
    pki.write_cert(tmp_path / "ws.pem", ws_cert)
    ws_context = client_context(
        node.cluster.ca_pem, cert_file=tmp_path / "ws.pem", key_file=tmp_path / "ws.key"
    )
    for _ in range(2):
        assert get_from(empfang, node.http_url(), name="ws-empfang") == 200
    assert get_from(labor, node.https_url(), context=ws_context) == 200

    expected = [("https", labor, "ws-labor", 1), ("http", empfang, "ws-empfang", 2)]
    views: list[types_pb2.ClientsView] = []

    def reported() -> bool:  # a status on a slow machine may still carry the previous view
        views.append(status(node).server.clients)
        return [(c.scheme, c.address, c.workstation, c.requests) for c in views[-1].clients] == (
            expected
        )

    wait_until(reported, 30, f"the agent to report {expected}")
    view = views[-1]
    assert view.source == "refserver" and view.problem == "" and view.window_seconds == 86400
    for c in view.clients:
        assert c.first_seen.ToDatetime() <= c.last_seen.ToDatetime()
