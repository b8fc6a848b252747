"""The node side of the http→https switch (issue 3): real agents, real reference servers, real
mutual TLS, driven step by step by a stand-in for the leader, and checked from outside with a
TLS client that trusts only the cluster CA.

Every node has its own loopback address with the seed's ports (8080, 8443, 9443).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import http.client
import json
import os
import signal
import sqlite3
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from leader.agent_client import REFUSAL_CODES
from nodeagent.transaction import CRASH_ENV
from refserver.server import START_DELAY_ENV, SWITCHING_MESSAGE, WRITE_DELAY_ENV
from tests import procs
from tests.cluster import LEADER_POLL, AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, NodeFactory, TxnView, port_holder, read_only
from tests.refserver_helper import Response, http_request
from tlsroll import bootstrap_protocol as proto
from tlsroll import password, pki
from tlsroll.enums import Change
from tlsroll.tls import unverified_client_context
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE

FORWARD_ACTIONS = ("freeze", "write_config", "restart", "verify", "unfreeze")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("switch"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@pytest.fixture
def make_node(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes (reference server on http + agent) on fresh loopback addresses; every
    process is stopped at teardown, including servers the agent restarted."""
    factory = NodeFactory(cluster, tmp_path, "sw")
    try:
        yield factory
    finally:
        factory.close()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def code_of(err: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = err.code()
    return code


def details_of(err: grpc.RpcError) -> str:
    return str(err.details())


def when(ts: Any) -> dt.datetime:
    value: dt.datetime = ts.ToDatetime(tzinfo=dt.UTC)
    return value


def assert_refused_while_frozen(resp: Response) -> None:
    assert resp.status == 503, resp.body
    assert int(resp.header("Retry-After") or 0) > 0
    assert resp.json() == {"error": "switching", "message": SWITCHING_MESSAGE}
    assert "id" not in resp.json()


def assert_untouched(node: Node, config: bytes, pid: int | None) -> None:
    """The node is as it was: same config file, same server process, on http, not frozen."""
    assert node.server.config_path.read_bytes() == config
    assert node.server_pid() == pid
    status = node.admin_status()
    assert status["frozen"] is False
    assert status["listen"] == ["http"]
    assert node.get("http", "health").status == 200
    assert not node.port_open(8443)


def assert_switched(node: Node, fingerprint: str) -> None:
    """From outside: https with exactly the staged certificate, the app answers, no http."""
    assert node.served_fingerprint() == fingerprint
    app = node.get("https")
    assert app.status == 200 and app.json()["scheme"] == "https"
    assert not node.port_open(8080)
    status = node.admin_status()
    assert status["frozen"] is False
    assert status["listen"] == ["https"]
    assert status["cert_sha256"] is not None


# --- 1. happy path --------------------------------------------------------------------------


def test_switch_then_rollback_checked_from_outside(make_node: NodeFactory) -> None:
    node = make_node()
    pre = node.preflight("happy")
    assert pre.ok, list(pre.problems)
    assert list(pre.problems) == []
    assert pre.common_name == node.name
    assert list(pre.ip_addresses) == [node.address]
    assert pre.old_url == f"http://{node.address}:8080/praxis_live/"
    assert pre.new_url == f"https://{node.address}:8443/praxis_live/"
    assert pre.server.healthy and list(pre.server.schemes) == ["http"]
    assert not pre.server.frozen
    assert pre.bootstrap_port == 9443

    before = node.post("http", {"note": "before the switch"})
    assert before.status == 201
    entry = before.json()
    old_pid = node.server_pid()

    staged = node.stage("happy")
    assert staged.fingerprint.startswith("sha256:")
    key_file = node.stage_dir("happy") / "server.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    cert = pki.read_cert(node.stage_dir("happy") / "server.pem")
    assert pki.fingerprint(cert) == staged.fingerprint
    assert pki.key_matches(cert, pki.read_key(key_file))
    # Staged means inactive: the server still runs on http only, same process.
    assert node.server_pid() == old_pid and not node.port_open(8443)

    begun = node.switch("happy")
    assert begun.rollout_id == "happy" and begun.kind == "switch" and begun.epoch == 1
    assert begun.outcome == ""  # it returns at once; the agent carries it on
    done = node.wait_txn("happy")
    assert done.outcome == "completed", done.reason
    assert done.phase == "completed" and done.reason == ""
    assert done.cert_fingerprint == staged.fingerprint
    assert done.old_url == pre.old_url and done.new_url == pre.new_url
    assert begun.change == done.change == "enable-tls"  # Transaction.change (session 73)

    assert_switched(node, staged.fingerprint)
    assert node.server_pid() != old_pid
    got = node.get("https", f"entries/{entry['id']}")
    assert got.status == 200 and got.json()["body"] == {"note": "before the switch"}

    # The freeze window and the restart duration, for the schema.
    assert done.HasField("freeze_started_at") and done.HasField("freeze_ended_at")
    started, ended = when(done.started_at), when(done.ended_at)
    frozen_from, frozen_to = when(done.freeze_started_at), when(done.freeze_ended_at)
    assert started <= frozen_from < frozen_to <= ended
    assert 0 < done.restart_seconds < 30
    assert frozen_to - frozen_from >= dt.timedelta(seconds=done.restart_seconds)
    # and the freeze's length in elapsed time, which holds the restart (clock audit s35 J)
    assert done.HasField("freeze_seconds") and done.restart_seconds <= done.freeze_seconds
    assert done.watermark == entry["seq"]

    after = node.post("https", {"note": "after the switch"})
    assert after.status == 201

    node.rollback("happy")
    back = node.wait_txn("happy", "rollback")
    assert back.outcome == "completed", back.reason
    assert back.old_url == pre.new_url and back.new_url == pre.old_url
    assert back.change == ""  # a rollback says none
    assert node.get("http").status == 200
    assert not node.port_open(8443)
    status = node.admin_status()
    assert status["frozen"] is False and status["listen"] == ["http"]
    for e in (entry, after.json()):
        assert node.get("http", f"entries/{e['id']}").status == 200
    assert node.post("http", {"note": "after the rollback"}).status == 201


def test_preflight_brings_back_the_csr_the_stage_is_signed_for(make_node: NodeFactory) -> None:
    """Issue 15 (a call fewer per node): Preflight with ``make_csr`` makes the rollout's key
    and CSR as CreateCSR would, the same one on every asking, and a certificate signed for it
    stages with no CreateCSR call. Without ``make_csr`` (``tlsroll plan``'s and an earlier
    leader's preflight) nothing is made."""
    node = make_node()
    plain = node.preflight("plain")
    assert plain.ok and plain.csr_pem == b""
    assert not node.stage_dir("plain").exists()
    assert node.journal_query("SELECT * FROM staged") == []

    pre = node.preflight("merged", make_csr=True)
    assert pre.ok, list(pre.problems)
    csr = pki.load_csr_pem(pre.csr_pem)
    assert pki.names_of(csr) == pki.Names.of(node.name, [node.address])
    key_file = node.stage_dir("merged") / "server.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert node.preflight("merged", make_csr=True).csr_pem == pre.csr_pem  # a replay
    assert node.create_csr("merged") == pre.csr_pem  # what an earlier leader would ask

    staged = node.send_stage("merged", node.sign(pre.csr_pem))
    cert = pki.read_cert(node.stage_dir("merged") / "server.pem")
    assert pki.fingerprint(cert) == staged.fingerprint
    assert pki.key_matches(cert, pki.read_key(key_file))


def switch_stream(node: Node, rollout_id: str, request_id: str | None = None) -> list[TxnView]:
    """WatchTransaction with ``switch`` set (the leader's one call to begin and follow a
    switch): every state it streams, to the end."""
    switch = agent_pb2.SwitchRequest(
        command=node.command(rollout_id), change=CHANGE.wire(Change.ENABLE_TLS)
    )
    request = agent_pb2.GetTransactionRequest(
        rollout_id=request_id or rollout_id, kind=agent_pb2.TRANSACTION_KIND_SWITCH, switch=switch
    )
    with node.stub() as stub:
        return [TxnView(t) for t in stub.WatchTransaction(request, timeout=60)]


def test_one_call_begins_a_switch_and_streams_it_to_its_end(make_node: NodeFactory) -> None:
    """Issue 15 (a call fewer per node): WatchTransaction with ``switch`` begins the switch as
    Switch would, then streams its states to the outcome; called again (the leader's stream
    broke) it begins nothing and streams the outcome. Refusals end the stream before any
    state, with Switch's status."""
    node = make_node()
    refused = rpc_error(lambda: switch_stream(node, "unstaged"))  # nothing staged
    assert code_of(refused) == grpc.StatusCode.FAILED_PRECONDITION, details_of(refused)
    mixed = rpc_error(lambda: switch_stream(node, "one", request_id="other"))
    assert code_of(mixed) == grpc.StatusCode.INVALID_ARGUMENT, details_of(mixed)
    assert node.journal_query("SELECT * FROM txns") == []

    staged = node.stage("one")
    states = switch_stream(node, "one")
    assert states[-1].outcome == "completed", states[-1].reason
    assert all(s.outcome == "" for s in states[:-1])  # pending until the end
    assert states[-1].cert_fingerprint == staged.fingerprint
    assert_switched(node, staged.fingerprint)
    again = switch_stream(node, "one")
    assert [s.outcome for s in again] == ["completed"]
    assert len(node.journal_query("SELECT * FROM txns")) == 1


# --- 2., 3. preflight problems --------------------------------------------------------------


def test_preflight_names_the_process_holding_8443_then_a_read_only_config_dir(
    make_node: NodeFactory,
) -> None:
    """Two tests with a node each before: the node that passes once the port is free is the
    one whose config dir is then made read-only."""
    node = make_node()
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    # Its command line holds a secret of its own: the problem names the process by its name,
    # pid and executable, never by its arguments (they go into the plan, the schema, the
    # read-only viewer and the logs: review s64 seed L2).
    secret = "S3cret-Redis-Pw"
    with port_holder(node.address, 8443, "--requirepass", secret) as holder:
        pre = node.preflight("taken", make_csr=True)
        assert not pre.ok and pre.csr_pem == b""  # no key for a node that cannot switch
        about_8443 = [p for p in pre.problems if "8443" in p]
        assert len(about_8443) == 1, list(pre.problems)
        assert f"(pid {holder.pid}, {os.path.realpath(sys.executable)})" in about_8443[0]
        assert secret not in about_8443[0] and "requirepass" not in about_8443[0]
        assert node.address in about_8443[0]
        assert len(pre.problems) == 1, list(pre.problems)
    assert_untouched(node, config, pid)
    assert not node.stage_dir("taken").exists()
    assert node.journal_query("SELECT * FROM txns") == []
    assert node.journal_query("SELECT * FROM staged") == []
    # The same node passes once the other program is gone: the problem was the port.
    assert node.preflight("taken").ok

    assert os.geteuid() == 0, "this test bind-mounts; tests run as root here and in CI"
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    with read_only(node.config_dir):
        with pytest.raises(OSError, match="Read-only"):
            (node.config_dir / "probe").write_text("x")
        pre = node.preflight("readonly")
    assert not pre.ok
    assert len(pre.problems) == 1, list(pre.problems)
    problem = pre.problems[0]
    assert str(node.config_dir) in problem and "not writable" in problem
    assert "Read-only" in problem
    assert_untouched(node, config, pid)
    assert node.preflight("readonly").ok


def test_a_config_dir_another_user_owns_blocks_the_preflight_and_the_switch(
    make_node: NodeFactory,
) -> None:
    """s39key2 H1: the config's directory owned by uid 65534 (the server's user, as a
    PostgreSQL data directory): that user could swap a directory between the agent's checks
    and its writes and steer the root agent's writes and chowns elsewhere. The preflight
    says so (one line: what to run), the stage is refused, a switch never starts; with the
    directory root's again all passes."""
    assert os.geteuid() == 0, "this test chowns; tests run as root here and in CI"
    node = make_node()
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    node.stage("unsafe")  # staged while the directory was root's
    os.chown(node.config_dir, 65534, 65534)
    try:
        pre = node.preflight("unsafe")
        assert not pre.ok
        assert len(pre.problems) == 1, list(pre.problems)
        problem = pre.problems[0]
        assert f"{node.config_dir} is owned by nobody (uid 65534)" in problem, problem
        assert problem.endswith(f"run: chown root {node.config_dir}; chmod go-w {node.config_dir}")
        err = rpc_error(lambda: node.create_csr("unsafe-2"))
        assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION, details_of(err)
        assert "owned by nobody" in details_of(err)
        assert not node.stage_dir("unsafe-2").exists()
        # The switch prepared at the stage is not taken; its own plan is refused.
        err = rpc_error(lambda: node.switch("unsafe"))
        assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION, details_of(err)
        assert "owned by nobody" in details_of(err)
        assert_untouched(node, config, pid)
        assert node.journal_query("SELECT * FROM txns") == []
    finally:
        os.chown(node.config_dir, 0, 0)
    assert node.preflight("unsafe-3").ok
    staged = node.stage("unsafe-3")
    node.switch("unsafe-3")
    done = node.wait_txn("unsafe-3")
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)


# --- 4. a staged cert whose key does not match ------------------------------------------------


def test_cert_for_another_key_is_refused_and_nothing_switches(make_node: NodeFactory) -> None:
    node = make_node()
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    csr_pem = node.create_csr("mismatch")
    names = pki.names_of(pki.load_csr_pem(csr_pem))
    other_csr = pki.csr_to_pem(pki.make_csr(pki.generate_key(), names))
    wrong_cert = node.sign(other_csr)

    err = rpc_error(lambda: node.send_stage("mismatch", wrong_cert))
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not match the staged key" in details_of(err)
    assert not (node.stage_dir("mismatch") / "server.pem").exists()
    staged = node.journal_query("SELECT * FROM staged WHERE rollout_id = 'mismatch'")
    assert len(staged) == 1 and staged[0]["cert_file"] is None

    err = rpc_error(lambda: node.switch("mismatch"))
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing staged" in details_of(err)
    err = rpc_error(lambda: node.txn("mismatch"))
    assert code_of(err) == grpc.StatusCode.NOT_FOUND
    assert_untouched(node, config, pid)
    assert node.post("http", {"still": "writable"}).status == 201


def test_the_leader_retries_a_stage_by_create_csr_only_for_a_refusal_about_its_key(
    make_node: NodeFactory,
) -> None:
    """Review L1: the real agent's Stage refusals, as the leader's ``AgentClient`` words them
    (``StepFailed``), sorted by ``leader.changes.preflight_csr_unusable``. Only no key, or
    another key, than the CSR's is worth a CreateCSR (a new certificate signed and recorded);
    another CA or a stale epoch is the node's answer, reported as it is."""
    from leader.agent_client import StepFailed
    from leader.changes import preflight_csr_unusable

    node = make_node()

    def refusal(call: Callable[[], object]) -> StepFailed:
        err = rpc_error(call)
        return StepFailed(f"{details_of(err)} ({code_of(err).name})", code_of(err))

    csr_pem = node.create_csr("r-key")
    names = pki.names_of(pki.load_csr_pem(csr_pem))
    right = node.sign(csr_pem)
    no_key = refusal(lambda: node.send_stage("r-never-asked", right))
    other_key = node.sign(pki.csr_to_pem(pki.make_csr(pki.generate_key(), names)))
    mismatch = refusal(lambda: node.send_stage("r-key", other_key))
    other_ca = pki.CertificateAuthority.create("not the cluster CA")
    foreign = pki.load_csr_pem(csr_pem)
    foreign_cert = pki.cert_to_pem(other_ca.sign_csr(foreign, names, server=True, client=False))
    untrusted = refusal(lambda: node.send_stage("r-key", foreign_cert))
    assert node.preflight("r-newer", epoch=node.epoch + 5).ok

    def stale_stage() -> None:
        with node.stub() as stub:
            stub.Stage(
                agent_pb2.StageRequest(
                    command=node.command("r-key", node.epoch),
                    certificate_pem=right,
                    ca_certificate_pem=node.cluster.ca_pem,
                ),
                timeout=30,
            )

    stale = refusal(stale_stage)
    assert "no CSR for rollout r-never-asked" in str(no_key)
    assert "does not match the staged key" in str(mismatch)
    assert "not issued by the cluster CA" in str(untrusted)
    assert "stale epoch" in str(stale)
    assert preflight_csr_unusable(no_key) and preflight_csr_unusable(mismatch)
    assert not preflight_csr_unusable(untrusted) and not preflight_csr_unusable(stale)


# --- 5. the server cannot start with the new config ------------------------------------------


def test_server_that_cannot_load_the_new_key_is_rolled_back(make_node: NodeFactory) -> None:
    node = make_node()
    config = node.server.config_path.read_bytes()
    before = node.post("http", {"note": "before"}).json()
    node.stage("badkey")
    # The reference server refuses a key file others may read.
    (node.stage_dir("badkey") / "server.key").chmod(0o644)

    node.switch("badkey")
    done = node.wait_txn("badkey")
    assert done.outcome == "rolled_back", done.reason
    assert done.reason.startswith("restart:"), done.reason
    assert (
        "exited at start" in done.reason and "server.key is accessible by others" in done.reason
    ), done.reason

    assert node.server.config_path.read_bytes() == config
    assert node.get("http").status == 200
    assert not node.port_open(8443)
    status = node.admin_status()
    assert status["frozen"] is False and status["listen"] == ["http"]
    created = node.post("http", {"note": "after the rollback"})
    assert created.status == 201
    assert node.get("http", f"entries/{created.json()['id']}").status == 200
    assert node.get("http", f"entries/{before['id']}").status == 200
    events = node.journal_events("badkey")
    assert ("restart", "error") in events
    assert ("rolling_back", "end") in events and ("rolled_back", "end") in events
    assert ("verify", "begin") not in events  # never got that far


# --- 6. the agent is SIGKILLed in the middle ---------------------------------------------------

FORWARD_PHASES = ("started", "frozen", "config_written", "restarted", "verified")
BACKWARD_PHASES = ("rolling_back", "restored", "rb_restarted", "rb_verified")
# The journal of a transaction that ran once to its end, whatever crash it survived: the agent
# stops right after journalling a phase and carries on with the next action, so every action
# begins exactly once. The way back is reached with a key the server refuses (restart fails).
FORWARD_EVENTS = [
    ("create", "end"),
    ("freeze", "begin"),
    ("frozen", "end"),
    ("write_config", "begin"),
    ("config_written", "end"),
    ("restart", "begin"),
    ("restarted", "end"),
    ("verify", "begin"),
    ("verified", "end"),
    ("unfreeze", "begin"),
    ("completed", "end"),
]
BACKWARD_EVENTS = [
    *FORWARD_EVENTS[:6],  # create, freeze, write_config, restart begins
    ("restart", "error"),
    ("rolling_back", "end"),
    ("restore_config", "begin"),
    ("restored", "end"),
    ("restart", "begin"),
    ("rb_restarted", "end"),
    ("verify_source", "begin"),
    ("rb_verified", "end"),
    ("unfreeze", "begin"),
    ("rolled_back", "end"),
]
# Where the server is while the agent is dead after each phase: (scheme, frozen), None if the
# server is down (its restart with the refused key failed).
WHILE_DEAD: dict[str, tuple[str, bool] | None] = {
    "started": ("http", False),
    "frozen": ("http", True),
    "config_written": ("http", True),  # the new config is on disk, not loaded
    "restarted": ("https", True),
    "verified": ("https", True),
    "rolling_back": None,
    "restored": None,  # the source config is back on disk
    "rb_restarted": ("http", True),
    "rb_verified": ("http", True),
}


@pytest.mark.parametrize("crash_after", [*FORWARD_PHASES, *BACKWARD_PHASES])
def test_agent_killed_after_any_phase_resumes_from_its_journal(
    make_node: NodeFactory, crash_after: str
) -> None:
    backward = crash_after in BACKWARD_PHASES
    node = make_node(env={CRASH_ENV: crash_after})
    assert node.agent is not None
    rid = f"crash-{crash_after.replace('_', '-')}"
    config = node.server.config_path.read_bytes()
    acked = [node.post("http", {"note": "before"}).json()]
    staged = node.stage(rid)
    if backward:  # the reference server refuses a key others may read: restart fails
        (node.stage_dir(rid) / "server.key").chmod(0o644)
    try:
        node.switch(rid)
    except grpc.RpcError as exc:  # the agent may die before its answer is out
        assert code_of(exc) == grpc.StatusCode.UNAVAILABLE, exc
    assert node.agent.proc is not None
    assert node.agent.proc.wait(30) == -signal.SIGKILL

    # While the agent is dead the server stays exactly where the journal says.
    [row] = node.journal_query("SELECT phase, outcome, plan FROM txns")
    assert row["phase"] == crash_after and row["outcome"] == ""
    plan = row["plan"]
    where = WHILE_DEAD[crash_after]
    if where is None:
        assert not node.port_open(8080) and not node.port_open(8443)
    else:
        scheme, frozen = where
        status = node.admin_status()
        assert (status["listen"], status["frozen"]) == ([scheme], frozen)
        marker = uuid.uuid4().hex
        if frozen:
            assert_refused_while_frozen(node.post(scheme, {"marker": marker}))
            assert node.stored_with(marker) == 0
        else:  # not frozen yet: writes go on, and must survive what follows
            acked.append(node.post(scheme, {"note": "while the agent is dead"}).json())

    node.restart_agent()  # without the crash hook
    done = node.wait_txn(rid)
    if backward:
        assert done.outcome == "rolled_back", done.reason
        assert (
            done.reason.startswith("restart:")
            and "server.key is accessible by others" in done.reason
        ), done.reason
        assert node.server.config_path.read_bytes() == config
        assert not node.port_open(8443)
        scheme = "http"
    else:
        assert done.outcome == "completed", done.reason
        assert_switched(node, staged.fingerprint)
        scheme = "https"
    status = node.admin_status()
    assert (status["listen"], status["frozen"]) == ([scheme], False)
    assert done.watermark == acked[-1]["seq"]
    for entry in acked:  # no acknowledged write is lost
        assert node.get(scheme, f"entries/{entry['id']}").status == 200
    assert node.post(scheme, {"note": "after"}).status == 201

    # The journal: the agent stopped after recording `crash_after` and carried on from there,
    # so every action ran exactly once and nothing was repeated.
    assert node.journal_events(rid) == (BACKWARD_EVENTS if backward else FORWARD_EVENTS)
    resumed = [e for e in node.agent.log_events() if e.get("event") == "txn.resuming"]
    assert [e["phase"] for e in resumed] == [crash_after]
    # One successful start of the server, whichever side of it the agent died on.
    assert node.driver_started_pids() == [node.server_pid()]
    # The plan journalled at the start was never rewritten; what the way back learnt has
    # columns of its own.
    [end] = node.journal_query("SELECT plan, failed_phase, restart_needed FROM txns")
    assert end["plan"] == plan
    assert "failed_phase" not in json.loads(plan) and "restart_needed" not in json.loads(plan)
    expected = ("config_written", 1) if backward else (None, None)
    assert (end["failed_phase"], end["restart_needed"]) == expected
    # Both configs are the transaction's row, journalled with its create (issue 15): the
    # target and the source's backup have no file of their own, and the way back restored
    # the source from the row.
    [row] = node.journal_query("SELECT source_config, target_config FROM txns")
    assert row["source_config"] == config
    assert b"https" in row["target_config"] and row["target_config"] != config
    assert not list((node.journal_path.parent / "txn").glob("*"))


# --- 7. writes during the switch ---------------------------------------------------------------


@dataclass
class Writer:
    """Posts entries until stopped, http first, https once http is refused (trusting only the
    cluster CA); records what each POST got."""

    node: Node
    stop: threading.Event
    acked: list[tuple[str, str]] = field(default_factory=list)  # (id, marker) of every 201
    refused: list[tuple[str, Response]] = field(default_factory=list)  # (marker, 503)
    unknown: int = 0  # no answer: connection refused or reset
    acked_https: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the test, never lost with the thread
            self.errors.append(f"writer died: {exc!r}")

    def _run(self) -> None:
        scheme = "http"
        while not self.stop.is_set():
            marker = uuid.uuid4().hex
            try:
                resp = self.node.post(scheme, {"marker": marker}, path="entries")
            except (OSError, http.client.HTTPException):
                self.unknown += 1
                scheme = "https" if scheme == "http" else "http"
                # Soon again (a refused connect costs little): the restarted server answers
                # 503 only from its start to its unfreeze, tens of ms; at 20 ms a try, on the
                # other scheme each time, the writers all came after it once (session 42's CI).
                time.sleep(0.005)
                continue
            if resp.status == 201:
                self.acked.append((resp.json()["id"], marker))
                self.acked_https += scheme == "https"
                # A hundred writes a second a writer still put several in every freeze window
                # (tens to hundreds of ms); at full speed the writers and their servers took
                # most of the fault tests' CPU (a new TLS handshake per https POST).
                time.sleep(0.01)
            elif resp.status == 503:
                self.refused.append((marker, resp))
                time.sleep(0.01)
            else:
                self.errors.append(f"{scheme}: {resp.status} {resp.body[:200]!r}")


def test_every_acknowledged_write_survives_the_switch(make_node: NodeFactory) -> None:
    # Slow writes (also on the server the agent restarts) keep writes in flight at the freeze;
    # the restarted server (the agent's child) answers 503 for half a second before it says it
    # is ready, so the writers meet the freeze even where a restart takes 160 ms (ci49c).
    delay = {WRITE_DELAY_ENV: "0.1"}
    node = make_node(env={**delay, START_DELAY_ENV: "0.5"}, server_env=delay)
    staged = node.stage("writes")
    stop = threading.Event()
    writers = [Writer(node, stop) for _ in range(3)]
    threads = [threading.Thread(target=w.run, name=f"writer-{i}") for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: sum(len(w.acked) for w in writers) >= 6, 20, "writes before the switch")
        node.switch("writes")
        done = node.wait_txn("writes")
        wait_until(lambda: all(w.acked_https >= 2 for w in writers), 20, "writes over https after")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)

    errors = [e for w in writers for e in w.errors]
    assert errors == []
    acked = [a for w in writers for a in w.acked]
    refused = [r for w in writers for r in w.refused]
    assert refused, "no write was refused during the freeze"
    for marker, resp in refused:
        assert_refused_while_frozen(resp)
        assert node.stored_with(marker) == 0, marker
    for entry_id, marker in acked:
        got = node.get("https", f"entries/{entry_id}")
        assert got.status == 200, entry_id
        assert got.json()["body"] == {"marker": marker}
    # Nothing was written while frozen: the watermark at the freeze is where writes stopped
    # until the freeze was lifted, and no sequence number was handed out twice.
    seqs = sorted(node.get("https", f"entries/{i}").json()["seq"] for i, _ in acked)
    assert len(set(seqs)) == len(seqs)
    assert any(s <= done.watermark for s in seqs) and any(s > done.watermark for s in seqs)


# --- 8. a replayed Switch ------------------------------------------------------------------------


def test_replayed_switch_returns_the_same_transaction_and_acts_once(make_node: NodeFactory) -> None:
    node = make_node()
    staged = node.stage("replay")
    old_pid = node.server_pid()
    first = node.switch("replay")
    second = node.switch("replay")  # while the first one runs
    assert second.started_at == first.started_at
    assert (second.rollout_id, second.kind, second.epoch) == ("replay", "switch", 1)
    done = node.wait_txn("replay")
    assert done.outcome == "completed", done.reason
    third = node.switch("replay")  # after it ended: the recorded result, nothing done
    assert third.started_at == first.started_at
    assert third.outcome == "completed" and third.ended_at == done.ended_at
    time.sleep(1.0)  # room for a second run to show itself if one had been started

    assert_switched(node, staged.fingerprint)
    new_pid = node.server_pid()
    assert new_pid != old_pid
    assert node.driver_started_pids() == [new_pid]  # the server restarted exactly once
    events = node.journal_events("replay")
    assert events.count(("create", "end")) == 1
    for action in FORWARD_ACTIONS:
        assert events.count((action, "begin")) == 1, (action, events)
    assert len(node.journal_query("SELECT * FROM txns")) == 1
    assert node.txn("replay").ended_at == done.ended_at
    # Review s71 revplans, M: a replay can be refused all the same (a stale epoch: the
    # leader's store restored), before the agent looks at its journal, while its
    # GetTransaction answers the switch it holds: the leader asks that before it records
    # "nothing on the node was changed" (``leader.changes.ChangeSteps.held``).
    assert node.preflight("replay-later", epoch=node.epoch + 1).ok
    err = rpc_error(lambda: node.switch("replay", epoch=node.epoch))
    assert code_of(err) in REFUSAL_CODES and "stale epoch" in details_of(err)
    assert node.txn("replay").outcome == "completed"


# --- 9. a stale epoch --------------------------------------------------------------------------


def test_command_with_a_stale_epoch_is_refused_and_changes_nothing(make_node: NodeFactory) -> None:
    node = make_node()
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    assert node.preflight("epoch-new", epoch=5).ok

    err = rpc_error(lambda: node.create_csr("epoch-old", epoch=3))
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "stale epoch 3" in details_of(err) and "epoch 5" in details_of(err)
    assert node.journal_query("SELECT * FROM staged") == []
    assert not node.stage_dir("epoch-old").exists()

    err = rpc_error(lambda: node.switch("epoch-old", epoch=3))
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "stale epoch 3" in details_of(err)
    assert node.journal_query("SELECT * FROM txns") == []
    assert node.journal_query("SELECT value FROM meta WHERE key = 'epoch'") == [{"value": "5"}]
    assert_untouched(node, config, pid)
    # The current epoch is still served.
    assert node.create_csr("epoch-new", epoch=5).startswith(b"-----BEGIN CERTIFICATE REQUEST")


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (-(2**62), 0), (0, -5), (253402300800, 0)],
    ids=["far-future", "far-past", "negative-nanos", "year-10000"],
)
def test_a_leader_time_that_is_no_time_is_invalid_and_checks_nothing(
    make_node: NodeFactory, seconds: int, nanos: int
) -> None:
    """Session 67 (bad-input sweep 2): a Preflight or Check whose ``leader_time`` is out of
    protobuf's range ended as INTERNAL ("internal error; see the daemon's log", an error event
    in it) after the node's checks ran; INVALID_ARGUMENT now, before any, nothing made."""
    node = make_node()
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    when = Timestamp(seconds=seconds, nanos=nanos)
    before = len(node.agent.log_text()) if node.agent else 0
    with node.stub() as stub:
        for call in (
            lambda: stub.Preflight(
                agent_pb2.PreflightRequest(
                    command=node.command("r-time"), leader_time=when, make_csr=True
                ),
                timeout=30,
            ),
            lambda: stub.Check(agent_pb2.CheckRequest(leader_time=when), timeout=30),
        ):
            err = rpc_error(call)
            assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT, details_of(err)
            assert "leader_time" in details_of(err), details_of(err)
    assert node.journal_query("SELECT * FROM staged") == []
    assert not node.stage_dir("r-time").exists()
    assert node.agent is not None and "internal_error" not in node.agent.log_text()[before:]
    assert_untouched(node, config, pid)


# --- 10. a caller that is not the leader -------------------------------------------------------


def test_a_node_certificate_may_not_command_an_agent(make_node: NodeFactory) -> None:
    node = make_node()
    assert node.agent is not None
    node.stage("intruder")  # everything ready: only the caller's identity is wrong
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    own = (node.agent.cert_file.read_bytes(), node.agent.key_file.read_bytes())
    with node.stub(own) as stub:
        err = rpc_error(
            lambda: stub.Switch(
                agent_pb2.SwitchRequest(
                    command=node.command("intruder"), change=CHANGE.wire(Change.ENABLE_TLS)
                ),
                timeout=15,
            )
        )
    assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED
    assert "not the leader" in details_of(err) and node.name in details_of(err)
    err = rpc_error(lambda: node.txn("intruder"))
    assert code_of(err) == grpc.StatusCode.NOT_FOUND
    assert_untouched(node, config, pid)


# --- 10. the switch made ready at the stage (issue 15), with a real agent and server -----------


def staged_configs(node: Node) -> list[Path]:
    """The configs the agent staged beside the live one and has not committed (yet): a
    switch's target, and its source for the way back (s38 audit H3)."""
    return sorted(node.config_dir.glob(f".{node.server.config_path.name}.staged-*"))


def staged_targets(node: Node) -> list[Path]:
    """Of those, the ones that are not the live config (a switch's target, before it)."""
    live = node.server.config_path.read_bytes()
    return [path for path in staged_configs(node) if path.read_bytes() != live]


def assert_no_staged_configs(node: Node) -> None:
    """None is left (a transaction's staged source, not taken, is removed once it has ended,
    on the store's thread: a moment after its outcome)."""
    wait_until(lambda: staged_configs(node) == [], 10, "the staged configs removed")


def test_a_chmod_of_the_config_between_stage_and_switch_is_kept(make_node: NodeFactory) -> None:
    """Review of session 28, L4: the stage stages the switch's config with the live file's
    mode then; an admin who changed the config's mode before the switch got the old mode
    back from the switch. The switch now sees the change and makes its config as before,
    with the mode the live file has at the switch."""
    node = make_node()
    config = node.server.config_path
    staged = node.stage("mode")
    assert len(staged_targets(node)) == 1  # made ready at the stage
    assert len(staged_configs(node)) == 2  # with its source, for the way back
    assert stat.S_IMODE(config.stat().st_mode) != 0o640
    config.chmod(0o640)
    node.switch("mode")
    done = node.wait_txn("mode")
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert_no_staged_configs(node)


def test_an_agent_restarted_between_stage_and_switch_switches_as_before(
    make_node: NodeFactory,
) -> None:
    """The switch made ready at the stage is in the agent's memory only: an agent started
    again removes its staged file and makes the switch as before."""
    node = make_node()
    assert node.agent is not None
    staged = node.stage("restart")
    assert len(staged_targets(node)) == 1
    node.agent.stop()
    node.restart_agent()
    assert_no_staged_configs(node)
    node.switch("restart")
    done = node.wait_txn("restart")
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)
    assert_no_staged_configs(node)


def test_a_staged_ca_made_a_fifo_rolls_the_switch_back_and_the_agent_answers(
    make_node: NodeFactory,
) -> None:
    """Session 51's review: the files the agent reads during a rollout's steps were plain
    reads. The staged CA made a FIFO after the stage (an agent started again since, so the
    switch reads it itself): the switch's staging read it and waited for a writer for ever,
    on the agent's store thread, and every later call waited too (no outcome, no answer). Now
    the CA is never read (``read_regular``): the server's restart on it fails (it names the
    FIFO), the switch is rolled back, and the agent answers."""
    node = make_node()
    assert node.agent is not None
    config, pid = node.server.config_path.read_bytes(), node.server_pid()
    node.stage("fifo")
    node.agent.stop()
    node.restart_agent()
    ca = node.stage_dir("fifo") / "ca.pem"
    ca.unlink()
    os.mkfifo(ca, 0o600)
    try:
        node.switch("fifo")
        done = node.wait_txn("fifo", timeout=30)  # before: no answer at all
        assert done.outcome == "rolled_back", done.reason
        assert f"{ca} is not a regular file (a FIFO)" in done.reason, done.reason
        assert "\n" not in done.reason and "Traceback" not in done.reason
        assert node.server.config_path.read_bytes() == config
        assert node.server_pid() != pid  # restarted on its config again
        assert node.admin_status()["listen"] == ["http"]
        assert node.preflight("after").ok  # the agent answers
    finally:
        with contextlib.suppress(OSError):  # a reader blocked on it (before) let go
            os.close(os.open(ca, os.O_WRONLY | os.O_NONBLOCK))


def test_a_staged_config_made_a_fifo_is_not_taken_and_the_switch_makes_its_own(
    make_node: NodeFactory,
) -> None:
    """Session 51's review: the switch made ready at the stage is taken only if its staged
    config still holds what was staged, which was a plain read: the staged file made a FIFO
    held the agent's store thread (and so the switch, and every later call) for ever. Now
    the FIFO is never read: the staged switch is not taken, the switch makes its own."""
    node = make_node()
    staged = node.stage("fifocfg")
    [target] = staged_targets(node)
    target.unlink()
    os.mkfifo(target, 0o600)
    try:
        node.switch("fifocfg")
        done = node.wait_txn("fifocfg", timeout=30)  # before: no answer at all
        assert done.outcome == "completed", done.reason
        assert_switched(node, staged.fingerprint)
    finally:
        with contextlib.suppress(OSError):  # a reader blocked on it (before) let go
            os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
    assert_no_staged_configs(node)


def test_a_rollback_drops_the_switch_made_ready_for_another_rollout(
    make_node: NodeFactory,
) -> None:
    """Review of session 28, L5: a node staged for a rollout that then never switched it (an
    abort) kept the switch made ready for it, its file beside the live config, until the next
    Stage or Switch; a Rollback left it. Any transaction begun now drops it."""
    node = make_node()
    node.stage("first")
    node.switch("first")
    assert node.wait_txn("first").outcome == "completed"
    node.stage("second")  # a rotation made ready; the rollout is aborted, never switched
    assert len(staged_targets(node)) == 1
    node.rollback("first")
    back = node.wait_txn("first", "rollback")
    assert back.outcome == "completed", back.reason
    assert_no_staged_configs(node)


def a_verifier_json(secret: str) -> str:
    from tlsroll import password

    return password.verifier_to_json(password.make_verifier(secret, **password.TEST_PARAMS))


@pytest.mark.parametrize(
    ("told_http", "sent_verifier", "sent_http", "taken"),
    [
        (False, "told", False, True),
        (True, "told", True, True),
        (False, "other", False, False),
        (False, "told", True, False),
        (None, "told", False, False),  # a leader of an earlier release: nothing told
    ],
    ids=["password", "transitional", "other_verifier", "http_kept_untold", "untold"],
)
def test_a_password_switch_takes_the_switch_its_stage_was_told_of(
    make_node: NodeFactory,
    told_http: bool | None,
    sent_verifier: str,
    sent_http: bool,
    taken: bool,
) -> None:
    """Review of session 29, L4, with a real agent and server: a Stage told of the switch to
    come (``switch_to_come``: a password verifier, keep_http) makes that switch ready, its
    config rendered and staged and its verifier file written at the stage; the switch that
    fits commits that very file (the staged file becomes the live config: same inode, same
    mtime) and writes no verifier file. A switch whose settings differ from what the Stage
    said (or a Stage that said nothing) builds its own: another staged file, the prepared
    one removed."""
    node = make_node()
    rollout_id = "told"
    verifier = a_verifier_json("told-s3cret")
    sent = verifier if sent_verifier == "told" else a_verifier_json("other-s3cret")
    cert_pem = node.sign(node.create_csr(rollout_id))
    stage = agent_pb2.StageRequest(
        command=node.command(rollout_id),
        certificate_pem=cert_pem,
        ca_certificate_pem=node.cluster.ca_pem,
    )
    if told_http is not None:
        stage.switch_to_come.CopyFrom(
            agent_pb2.SwitchToCome(auth_verifier_json=verifier, keep_http=told_http)
        )
    with node.stub() as stub:
        staged = stub.Stage(stage, timeout=60)
    [prepared] = staged_targets(node)  # made ready at the stage (for no verifier if untold)
    made = prepared.stat()
    verifier_file = node.stage_dir(rollout_id) / "auth-verifier.json"
    assert verifier_file.exists() is (told_http is not None)
    written = verifier_file.stat() if told_http is not None else None

    with node.stub() as stub:
        stub.Switch(
            agent_pb2.SwitchRequest(
                command=node.command(rollout_id),
                change=CHANGE.wire(Change.ENABLE_TLS),
                auth_verifier_json=sent,
                keep_http=sent_http,
            ),
            timeout=60,
        )
    done = node.wait_txn(rollout_id)
    assert done.outcome == "completed", done.reason
    assert done.cert_fingerprint == staged.fingerprint
    status = node.admin_status()
    assert sorted(status["listen"]) == (["http", "https"] if sent_http else ["https"])
    assert node.served_fingerprint() == staged.fingerprint
    assert json.loads(verifier_file.read_text()) == json.loads(sent)

    live = node.server.config_path.stat()
    if taken:  # the config staged at the stage is the live one; nothing made in the switch
        assert (live.st_ino, live.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
        assert written is not None
        again = verifier_file.stat()
        assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    else:  # made in the switch as before: its own staged file, the prepared one removed
        assert live.st_ino != made.st_ino
        assert not prepared.exists()
    assert_no_staged_configs(node)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["direct", "transitional"])
def test_a_real_leaders_password_switch_is_the_one_made_ready_at_its_stage(
    tmp_path: Path, strategy: str
) -> None:
    """Review of session 29, L4, end to end: a real leader's password enable-tls rollout
    (direct, or transitional phase 1: keep_http) on a real agent commits the config made
    ready at the node's stage: the agent's ``txn.started`` of the switch says it took the
    prepared one (``prepared``). Review 2 of session 29, finding 6: this test compared the
    live config's mtime with the transaction's start, which the coarse file clock let pass
    about half the time for a switch that built its own config."""
    with AdminTokenCluster(tmp_path / "cluster", next_loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        factory = NodeFactory(cluster, tmp_path, "told")
        try:
            node = factory()
            cluster.wait_for_nodes_online([node.name], timeout=60)
            secret = tmp_path / "password"
            secret.touch(0o600)
            secret.write_text("told-switch-password-8Kd2-pq\n")
            started = cluster.cli(
                *("rollout", "start", "--scope", "cluster", "--strategy", strategy),
                *("--password-file", str(secret), "--yes"),
                timeout=240,
            )
            assert started.returncode == 0, started.stderr
            ends = ("completed", "halted", "aborted", "awaiting_finalize")
            wait_until(
                lambda: cluster.poll_newest_rollout()["state"] in ends,
                120,
                "the rollout",
                interval=LEADER_POLL,
            )
            rollout = cluster.newest_rollout()
            wanted = "completed" if strategy == "direct" else "awaiting_finalize"
            assert rollout["state"] == wanted, json.dumps(rollout)
            done = node.txn(rollout["id"])
            assert done.outcome == "completed", done.reason
            status = node.admin_status()
            assert sorted(status["listen"]) == (
                ["https"] if strategy == "direct" else ["http", "https"]
            )
            assert "auth_verifier_file" in node.server.config_path.read_text()  # a password
            assert node.agent is not None
            began = [
                e
                for e in node.agent.log_events()
                if e.get("event") == "txn.started" and e.get("rollout_id") == rollout["id"]
            ]
            assert [(e.get("kind"), e.get("prepared")) for e in began] == [("switch", True)]
            assert_no_staged_configs(node)
        finally:
            factory.close()


def test_a_prepared_switch_s_file_that_cannot_be_removed_later_is_said() -> None:
    """Review s28rev2 L6: the removal of an unused prepared switch's staged file runs in the
    store thread's next hand-off, whose failure nobody waited for: it is logged now (the
    agent's next start removes what is left)."""
    import concurrent.futures

    import structlog.testing

    from nodeagent import service

    failed: concurrent.futures.Future[None] = concurrent.futures.Future()
    failed.set_exception(PermissionError(13, "Permission denied"))
    fine: concurrent.futures.Future[None] = concurrent.futures.Future()
    fine.set_result(None)
    with structlog.testing.capture_logs() as logs:
        service._discarded(failed)
        service._discarded(fine)
    assert [e["event"] for e in logs] == ["stage.discard_failed"]
    assert "Permission denied" in logs[0]["error"]


# --- stage directories: no key left behind (session 31) --------------------------------------


def stage_dirs(node: Node) -> set[str]:
    root = node.config_dir / "tlsroll-tls"
    return {d.name for d in root.iterdir()} if root.exists() else set()


def stage_told(node: Node, rollout_id: str, *, verifier: str | None = None) -> str:
    """CreateCSR, sign, Stage told of a password switch to come (its verifier file written
    in the stage directory): the staged fingerprint."""
    stage = agent_pb2.StageRequest(
        command=node.command(rollout_id),
        certificate_pem=node.sign(node.create_csr(rollout_id)),
        ca_certificate_pem=node.cluster.ca_pem,
    )
    if verifier is not None:
        stage.switch_to_come.CopyFrom(agent_pb2.SwitchToCome(auth_verifier_json=verifier))
    with node.stub() as stub:
        fingerprint: str = stub.Stage(stage, timeout=60).fingerprint
    return fingerprint


def test_a_stage_never_switched_leaves_no_key_once_a_later_rollout_stages(
    make_node: NodeFactory,
) -> None:
    """Session 31 (risk left by sessions 28-30): a rollout stopped between Stage and Switch
    (aborted, failed, superseded, its leader gone) left its stage directory on the node for
    good: the staged certificate, its private key and the prepared verifier file. One rollout
    runs at a time per cluster, so a later rollout's first key on this node says every
    earlier rollout that never began a transaction here is over: their stages are forgotten
    in the journal's write of the new key and their directories removed. What a transaction
    may still need is kept: the live files, and those a rollback restores."""
    node = make_node()
    verifier = a_verifier_json("stray-s3cret")
    stage_told(node, "aborted", verifier=verifier)
    aborted = node.stage_dir("aborted")
    assert {p.name for p in aborted.iterdir()} == {
        "server.key",
        "server.pem",
        "ca.pem",
        "auth-verifier.json",
    }
    assert len(staged_targets(node)) == 1  # its switch made ready, beside the live config
    csr = node.create_csr("first")  # the next rollout: the aborted one's key is gone
    assert stage_dirs(node) == {"first"}
    assert_no_staged_configs(node)  # and the switch made ready for it
    live = node.send_stage("first", node.sign(csr)).fingerprint
    assert [r["rollout_id"] for r in node.journal_query("SELECT * FROM staged")] == ["first"]
    node.switch("first")
    assert node.wait_txn("first").outcome == "completed"
    assert_switched(node, live)

    stage_told(node, "rotation")  # a rotation staged, then never switched
    node.create_csr("second")  # a later rollout: the rotation's stage goes, the live one stays
    assert stage_dirs(node) == {"first", "second"}
    assert node.served_fingerprint() == live
    # A rotation that ran: the stage it replaced ("first") is what rolling it back restores.
    second = node.send_stage("second", node.sign(node.create_csr("second"))).fingerprint
    with node.stub() as stub:
        stub.Switch(
            agent_pb2.SwitchRequest(
                command=node.command("second"), change=CHANGE.wire(Change.ROTATE_CERT)
            ),
            timeout=60,
        )
    assert node.wait_txn("second").outcome == "completed"
    assert node.served_fingerprint() == second
    # A third rollout's key: the stages of both switches that ran stay (files and journal).
    node.create_csr("third")
    assert stage_dirs(node) == {"first", "second", "third"}
    assert {r["rollout_id"] for r in node.journal_query("SELECT * FROM staged")} == {
        "first",
        "second",
        "third",
    }
    node.rollback("second")  # back to first's certificate, from first's kept files
    back = node.wait_txn("second", "rollback")
    assert back.outcome == "completed", back.reason
    assert node.served_fingerprint() == live


def test_an_agent_start_removes_only_stage_directories_nothing_needs(
    make_node: NodeFactory,
) -> None:
    """A directory the journal does not know (an agent stopped between writing a new key
    and journalling it, a journal begun again) holds a key nothing can use: the agent's
    start removes it. A stage the journal knows is kept (its switch may still come, and
    does), as is any directory the live config names."""
    node = make_node()
    assert node.agent is not None
    staged = stage_told(node, "pending")
    orphan = node.config_dir / "tlsroll-tls" / "orphan"
    orphan.mkdir(mode=0o700)
    (orphan / "server.key").write_bytes(b"not really a key")
    node.agent.stop()
    node.restart_agent()
    assert stage_dirs(node) == {"pending"}
    node.switch("pending")
    assert node.wait_txn("pending").outcome == "completed"
    assert_switched(node, staged)
    # A journal begun again (``--reinitialise``) knows nothing of the live files: the live
    # config names their directory, which the start keeps.
    node.agent.stop()
    with sqlite3.connect(node.journal_path) as db:
        db.execute("DELETE FROM txns")
        db.execute("DELETE FROM staged")
        db.execute("DELETE FROM meta WHERE key = 'live_tls'")
    node.restart_agent()
    assert stage_dirs(node) == {"pending"}
    assert node.served_fingerprint() == staged


def stage_files(node: Node) -> set[str]:
    """Every file in the node's stage directories, as ``<rollout>/<name>``."""
    root = node.config_dir / "tlsroll-tls"
    if not root.exists():
        return set()
    return {f"{d.name}/{f.name}" for d in root.iterdir() for f in d.iterdir()}


def rotated(node: Node, rollout_id: str) -> str:
    """A rotate-cert of ``rollout_id`` staged and switched, completed: its fingerprint."""
    fingerprint = node.stage(rollout_id).fingerprint
    with node.stub() as stub:
        stub.Switch(
            agent_pb2.SwitchRequest(
                command=node.command(rollout_id), change=CHANGE.wire(Change.ROTATE_CERT)
            ),
            timeout=60,
        )
    txn = node.wait_txn(rollout_id)
    assert txn.outcome == "completed", txn.reason
    assert node.served_fingerprint() == fingerprint
    return fingerprint


CERT = ("server.key", "server.pem", "ca.pem")
REMOVALS = ("stage.removed", "stage.files_removed")


def test_a_way_back_to_http_that_must_go_back_still_checks_https_after_rotations(
    make_node: NodeFactory,
) -> None:
    """Review s59 H1: after two rotations the sweep removed the first switch's CA, which the
    way back to http checks its return to https with when its own step fails: the node, back
    on https and serving well, ended failed ("needs attention") instead of rolled back. The
    way back's restart on http fails here (port 8080 held), so it goes back to https."""
    node = make_node()
    node.stage("first")
    with node.stub() as stub:
        stub.Switch(
            agent_pb2.SwitchRequest(
                command=node.command("first"), change=CHANGE.wire(Change.ENABLE_TLS)
            ),
            timeout=60,
        )
    assert node.wait_txn("first").outcome == "completed"
    rotated(node, "second")
    third = rotated(node, "third")
    wait_until(lambda: "first/server.key" not in stage_files(node), 20, "first's key removed")
    with port_holder(node.address, 8080) as holder:
        with node.stub() as stub:
            stub.Rollback(
                agent_pb2.RollbackRequest(command=node.command("back"), undoes=""), timeout=60
            )
        wait_until(
            lambda: ("rolling_back", "end") in node.journal_events("back", "rollback"),
            60,
            "the way back begun",
            0.02,
        )
        holder.kill()
        holder.wait()
    back = node.wait_txn("back", "rollback", timeout=120)
    assert back.outcome == "rolled_back", back.reason
    assert node.served_fingerprint() == third


def test_a_transaction_s_end_removes_what_no_switch_or_way_back_still_needs(
    make_node: NodeFactory,
) -> None:
    """Review rev58a L11: every stage directory of a switch that ran was kept for good (the
    journal knows every rollout), each with the private key of a certificate superseded
    since. Now each transaction's end removes what nothing can need any more: kept are the
    files live and those the rollback of the newest switch restores (the leader rolls a
    switch back when its confirm's outside check fails; these rollouts are unknown to the
    leader, which never says they ended, so that way back stays open). A rotation keeps the
    live verifier file beside the key it superseded: the key goes, the verifier stays. The
    way back still open works after the sweep; a rollback of an older switch, whose files
    went, is refused in one line and changes nothing; the way back to http still works and
    leaves nothing behind."""
    node = make_node()
    assert node.agent is not None
    secret = "sweep-s3cret"
    first = node.stage("first").fingerprint
    with node.stub() as stub:
        stub.Switch(
            agent_pb2.SwitchRequest(
                command=node.command("first"),
                change=CHANGE.wire(Change.ENABLE_TLS),
                auth_verifier_json=a_verifier_json(secret),
            ),
            timeout=60,
        )
    assert node.wait_txn("first").outcome == "completed"
    assert_switched(node, first)
    every = {*(f"first/{f}" for f in CERT), "first/auth-verifier.json"}
    assert stage_files(node) == every

    second = rotated(node, "second")
    # Its way back restores first's files: all kept.
    every |= {f"second/{f}" for f in CERT}
    assert stage_files(node) == every

    rotated(node, "third")
    # First's certificate is superseded twice: its key and certificate go; the verifier file
    # the live config still names stays, and so does its CA, which the way back to http checks
    # a failed step's return to https with (review s59 H1). Second's files are third's way back.
    wanted = {
        "first/auth-verifier.json",
        "first/ca.pem",
        *(f"second/{f}" for f in CERT),
        *(f"third/{f}" for f in CERT),
    }
    wait_until(lambda: stage_files(node) == wanted, 20, "first's superseded key removed")

    # The way back still open: back to second's certificate, from its kept files.
    node.rollback("third")
    back = node.wait_txn("third", "rollback")
    assert back.outcome == "completed", back.reason
    assert node.served_fingerprint() == second
    wanted = {"first/auth-verifier.json", "first/ca.pem", *(f"second/{f}" for f in CERT)}
    wait_until(lambda: stage_files(node) == wanted, 20, "third's rolled-back stage removed")

    # An older switch's way back: its files are gone, so it is refused before anything is
    # frozen or written.
    with node.stub() as stub:
        err = rpc_error(
            lambda: stub.Rollback(
                agent_pb2.RollbackRequest(command=node.command("older"), undoes="second"),
                timeout=60,
            )
        )
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err).startswith("the files rollout second's way back restores are gone")
    assert "\n" not in details_of(err)
    assert node.served_fingerprint() == second
    assert node.journal_query("SELECT * FROM txns WHERE rollout_id = 'older'") == []

    # The way back to http (disable-tls) needs no stage file, and leaves none.
    with node.stub() as stub:
        stub.Rollback(
            agent_pb2.RollbackRequest(command=node.command("back"), undoes=""), timeout=60
        )
    http = node.wait_txn("back", "rollback")
    assert http.outcome == "completed", http.reason
    assert node.admin_status()["listen"] == ["http"]
    wait_until(lambda: stage_files(node) == set(), 20, "every stage file removed")

    events = node.agent.log_events()
    removed = [(e["event"], e.get("rollout_id")) for e in events if e["event"] in REMOVALS]
    assert ("stage.files_removed", "first") in removed
    assert ("stage.removed", "third") in removed
    text = node.agent.log_text()
    assert secret not in text and "PRIVATE KEY" not in text


def test_a_node_closed_as_its_driver_starts_a_server_leaves_no_server_running(
    make_node: NodeFactory,
) -> None:
    """The harness (session 42): a node closed while its agent's driver starts a server (a
    test that failed mid-switch, an agent killed at the end of its stop's grace) leaves no
    server running. ``Node.close`` found the driver's server by its pid file only, which a
    server starting has not written yet: it wrote it once the close had looked, listened on
    the node's address, and outlived its test (session 41: once on 8443, where a later test
    needed it)."""
    node = make_node()
    assert node.agent is not None
    config = str(node.server.config_path)
    ours = node.server.pid
    stage_told(node, "closed")
    node.switch("closed")

    def driver_started() -> bool:
        return any(p.pid != ours for p in procs.running_with(config))

    # (every 30 ms: each look reads every process's command line; the server takes hundreds of
    # ms from its start to its pid file)
    wait_until(driver_started, 60, "the driver to start a server", interval=0.03)
    node.agent.kill()  # as ``Daemon.close`` does once its grace is over
    node.close()
    assert procs.running_with(config) == []
    assert not node.port_open(8443) and not node.port_open(8080)


def test_a_stage_s_key_and_verifier_file_are_private_at_rest(make_node: NodeFactory) -> None:
    """The staged key and the prepared verifier file (it can fake bootstrap answers) are
    0600 and the agent's, in a stage directory that is 0700 and the agent's, also when the
    directory was there before with a looser mode (an admin's mkdir, a copy): the stage
    takes it over (``make_private_dir``) rather than writing secrets into it as it is."""
    node = make_node()
    loose = node.stage_dir("loose")
    loose.mkdir(parents=True)
    loose.chmod(0o755)
    stage_told(node, "loose", verifier=a_verifier_json("rest-s3cret"))
    me = os.geteuid()
    st = loose.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, me)
    for name in ("server.key", "auth-verifier.json"):
        st = (loose / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, me), name


def test_a_cert_dir_stage_that_fails_leaves_no_switch_made_ready_for_the_stage_it_ended(
    make_node: NodeFactory,
) -> None:
    """Review 1a, finding 3: a --cert-dir stage's key ends earlier stages (their directories
    removed), but the switch made ready for one of them was dropped only by the ``_prepare``
    after the certificate was stored: a stage failing in between (a CA bundle refused, a
    write failing) left that switch's staged config, naming removed files, beside the live
    one. It is dropped right after the key now, as CreateCSR does."""
    node = make_node()
    stage_told(node, "aborted")
    assert staged_configs(node)  # the switch made ready for "aborted"
    names = pki.names_of(pki.load_cert_pem((node.stage_dir("aborted") / "server.pem").read_bytes()))
    key = pki.generate_key()
    cert_pem = node.sign(pki.csr_to_pem(pki.make_csr(key, names)))
    # The certificate's write fails: its CA file's name is taken by a directory.
    (node.stage_dir("own") / "ca.pem").mkdir(parents=True)
    node.stage_dir("own").chmod(0o700)

    def stage_own() -> None:
        with node.stub() as stub:
            stub.Stage(
                agent_pb2.StageRequest(
                    command=node.command("own"),
                    certificate_pem=cert_pem,
                    ca_certificate_pem=node.cluster.ca_pem,
                    private_key_pem=pki.key_to_pem(key),
                    own_certificate=True,
                ),
                timeout=60,
            )

    rpc_error(stage_own)
    assert not node.stage_dir("aborted").exists()  # the key ended the aborted stage
    assert_no_staged_configs(node)  # and the switch made ready for it


def test_a_stage_refuses_a_symlinked_stage_directory_and_a_shared_tlsroll_tls(
    make_node: NodeFactory,
) -> None:
    """Review 1a, finding 2: a stage directory that is a symbolic link was followed (the
    chmod 0700 landed on its target: ``ln -s /etc tlsroll-tls/r9`` and a root agent's next
    stage chmods /etc), and a ``tlsroll-tls`` others can write let them swap the directory
    after the check. Both are refused now (FAILED_PRECONDITION, with what to run), nothing
    written, the link's target untouched."""
    node = make_node()
    victim = node.config_dir.parent / "victim"
    victim.mkdir()
    victim.chmod(0o755)
    root = node.config_dir / "tlsroll-tls"
    root.mkdir(mode=0o700)
    (root / "r9").symlink_to(victim)
    err = rpc_error(lambda: node.create_csr("r9"))
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "symbolic link" in details_of(err) and f"rm {root / 'r9'}" in details_of(err)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755 and not any(victim.iterdir())

    root.chmod(0o777)  # anyone may rename r10 away and put theirs in its place
    err = rpc_error(lambda: node.create_csr("r10"))
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert f"run: chmod 700 {root}" in details_of(err)
    assert not (root / "r10").exists()
    assert node.journal_query("SELECT * FROM staged") == []
    root.chmod(0o700)
    stage_told(node, "r10")  # once fixed, the stage goes ahead
    assert (root / "r10" / "server.key").is_file()


def test_a_config_file_that_is_a_symbolic_link_is_refused_never_replaced(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """Review s64 M2: the server's config a symbolic link (a config kept under /srv and
    linked into /etc, as config management often does). The switch renamed its new config
    over the path, which replaces the link itself: the link became a regular file, the file
    it pointed to kept the old config (the next run of the config management puts the link
    back, undoing the switch), and nothing said so. Now the preflight says it in one line,
    with the path to name instead, and the stage and the switch refuse it: nothing changed."""
    node = make_node()
    config = node.server.config_path
    original = config.read_bytes()
    mode = stat.S_IMODE(config.stat().st_mode)
    real_dir = tmp_path / "srv-conf"
    real_dir.mkdir(mode=0o700)
    real = real_dir / config.name
    said = (
        f"config_file {config} is a symbolic link to {real}: set config_file = {real} "
        f"(and allow its dir: install.sh agent --server-config-dir {real_dir})"
    )

    def linked() -> None:
        real.write_bytes(original)
        real.chmod(mode)
        config.unlink()
        config.symlink_to(real)

    def nothing_changed() -> None:
        assert config.is_symlink() and os.readlink(config) == str(real)
        assert real.read_bytes() == original
        status = node.admin_status()
        assert status["listen"] == ["http"] and status["frozen"] is False

    linked()
    pre = node.preflight("lnk-pre")
    assert not pre.ok and said in list(pre.problems), list(pre.problems)
    err = rpc_error(lambda: node.stage("lnk-stage"))
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err) == said
    nothing_changed()

    # Linked after the stage (a run of the config management since): the switch refuses.
    config.unlink()
    config.write_bytes(original)
    config.chmod(mode)
    node.stage("lnk")
    linked()
    err = rpc_error(lambda: node.switch("lnk"))
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err) == said
    nothing_changed()


def test_make_private_dir_strict_never_follows_a_link_and_checks_the_parent(
    tmp_path: Path,
) -> None:
    """``make_private_dir(strict=True)``, as the stage directories use it: a symbolic link
    (to a directory, to a file, dangling) is refused and its target left as it is; a parent
    another user owns, or group or others can write, is refused; a missing parent is made
    0700, the directory 0700 and ours."""
    from tlsroll.errors import UnsafePermissions
    from tlsroll.fsutil import make_private_dir

    parent = tmp_path / "tlsroll-tls"
    made = make_private_dir(parent / "r1", strict=True)
    assert stat.S_IMODE(parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(made.stat().st_mode) == 0o700 and made.stat().st_uid == os.geteuid()
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    (tmp_path / "file").write_bytes(b"")
    for name, target in (("r2", victim), ("r3", tmp_path / "file"), ("r4", tmp_path / "none")):
        (parent / name).symlink_to(target)
        with pytest.raises(UnsafePermissions, match="symbolic link"):
            make_private_dir(parent / name, strict=True)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    parent.chmod(0o770)
    with pytest.raises(UnsafePermissions, match="writable by group or others"):
        make_private_dir(parent / "r5", strict=True)
    parent.chmod(0o700)
    os.chown(parent, os.geteuid() + 4242, -1)
    with pytest.raises(UnsafePermissions, match="run: chown"):
        make_private_dir(parent / "r5", strict=True)
    assert not (parent / "r5").exists()


def test_make_private_dir_follows_no_link_of_another_user_s(tmp_path: Path) -> None:
    """s43rev3 Low 5: ``make_private_dir`` (not strict, as a workstation's settings dir uses
    it) followed a link at the name to chmod its target, as long as the target was ours: a
    link another user planted after root's check made root chmod a directory of root's 0700.
    Another user's link is refused (and said by ``private_dir_problem``, the check before
    anything is sent) and its target left as it is; a link of ours (or root's) is still
    taken, as before."""
    from tlsroll.errors import UnsafePermissions
    from tlsroll.fsutil import make_private_dir, private_dir_problem, user_label

    if os.geteuid() != 0:
        pytest.skip("only root can give a link another user's name")
    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o755)
    planted = tmp_path / "settings"
    planted.symlink_to(victim)
    os.lchown(planted, 65534, 65534)
    problem = f"{planted} is a symbolic link owned by {user_label(65534)}, not by"
    assert str(private_dir_problem(planted)).startswith(problem)  # (the check before it)
    with pytest.raises(UnsafePermissions, match=r"is a symbolic link owned by .*run: rm"):
        make_private_dir(planted)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    os.lchown(planted, 0, 0)
    assert private_dir_problem(planted) is None
    assert make_private_dir(planted) == planted
    assert stat.S_IMODE(victim.stat().st_mode) == 0o700


def test_look_up_goes_where_the_kernel_goes(tmp_path: Path) -> None:
    """``fsutil.look_up`` (root's check of a workstation's settings dir, s43rev3 Low 5) takes
    each entry as the kernel does: a link's target where it is met (relative or absolute, a
    link in a link's target), and a ``..`` from the directory reached, not from the text (a
    ``..`` after a link is the target's parent). Where it gets to is where the kernel gets
    (``realpath``, and the directory a ``mkdir`` of the rest would make things in); every
    link on the way is among the entries; a loop is ELOOP, not "not there"."""
    from tlsroll.fsutil import look_up

    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    os.symlink("a/b/c", tmp_path / "rel")  # relative
    os.symlink(tmp_path / "rel", tmp_path / "x" / "abs")  # absolute, to a link
    os.symlink("..", tmp_path / "a" / "b" / "c" / "up")  # a .. as a target
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    a, b = tmp_path / "a", tmp_path / "a" / "b"
    for given, reached, whole in (
        ("rel", b / "c", True),
        ("rel/..", b, True),  # not tmp_path, as abspath has it
        ("x/abs/../..", a, True),
        ("x/abs/up/c/up", b, True),
        ("rel/../new/deeper", b, False),  # not there: made in a/b
        ("x/abs/up/../none", a, False),
    ):
        path = tmp_path / given
        found = look_up(path)
        assert (found.reached, found.whole) == (reached, whole), given
        if whole:
            assert found.reached == Path(os.path.realpath(path))
        assert found.entries[0][0] == Path("/")
        links = {p for p, st in found.entries if stat.S_ISLNK(st.st_mode)}
        if given.startswith("x/abs"):
            assert {tmp_path / "x" / "abs", tmp_path / "rel"} <= links
    with pytest.raises(OSError) as caught:
        look_up(tmp_path / "loop" / "settings")
    assert caught.value.errno == errno.ELOOP


# --- stage directories: only tlsroll's own are ever removed (review 1a, finding 1) -----------


@dataclass
class ConfigOnly:
    """What ``plans.sweep_stage_dirs`` needs of a driver: the config file, and its bytes
    (or the error reading them raises)."""

    config_file: Path
    unreadable: bool = False

    def read_config(self) -> bytes:
        if self.unreadable:
            raise PermissionError(13, "Permission denied", str(self.config_file))
        return self.config_file.read_bytes()


def a_stage(root: Path, name: str, *files: str) -> Path:
    """A directory as a stage leaves it (0700, the given files written 0600)."""
    directory = root / name
    directory.mkdir(mode=0o700, parents=True)
    for file in files or ("server.key", "server.pem", "ca.pem"):
        (directory / file).parent.mkdir(mode=0o700, exist_ok=True)
        (directory / file).write_bytes(b"x")
        (directory / file).chmod(0o600)
    return directory


def journal_switches(
    journal: Any, root: Path, live_of: Callable[[str], dict[str, str]], *rollout_ids: str
) -> dict[str, str] | None:
    """Journal ``rollout_ids`` as switches that completed one after the other (http to https,
    then each from the one before), each staged in ``root/ID`` with ``live_of(ID)`` its live
    files: the live files of the last one."""
    from nodeagent.journal import Txn
    from nodeagent.transaction import Phase
    from tlsroll.enums import TxnKind, TxnOutcome

    before: dict[str, str] | None = None
    for rid in rollout_ids:
        journal.record_csr(rid, root / rid / "server.key", b"csr")
        live = live_of(rid)
        plan: dict[str, Any] = {"source_schemes": ["https"] if before else ["http"]}
        plan |= {"live_tls": live, "live_before": before, "ca_file": live["ca_file"]}
        txn = journal.create(
            Txn(
                rollout_id=rid,
                kind=TxnKind.SWITCH,
                epoch=1,
                phase=Phase.STARTED,
                plan=plan,
                started_at=dt.datetime.now(dt.UTC),
                target_config=b"[server]\n",
                source_config=b"[server]\n",
            )
        )
        journal.complete(txn, live, phase=Phase.COMPLETED, outcome=TxnOutcome.COMPLETED)
        before = live
    return before


def sweep(
    tmp_path: Path, *, unreadable: bool = False, done: bool = True
) -> list[MutableMapping[str, Any]]:
    """``plans.sweep_stage_dirs`` over ``tmp_path/conf`` with an empty journal: its log
    (``done``: whether it says it did all it meant to)."""
    import structlog.testing

    from nodeagent import plans
    from nodeagent.drivers import Driver
    from nodeagent.journal import Journal

    config = tmp_path / "conf" / "server.toml"
    config.parent.mkdir(exist_ok=True)
    config.write_text("[server]\n")
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        driver: Any = ConfigOnly(config, unreadable)
        with structlog.testing.capture_logs() as logs:
            assert plans.sweep_stage_dirs(journal, cast(Driver, driver)) is done
    finally:
        journal.close()
    return logs


def test_the_start_sweep_removes_a_stage_directory_with_its_temporary_files(
    tmp_path: Path,
) -> None:
    """The case the sweep is for: a directory of a rollout the journal does not know, holding
    only what a stage writes (a write cut short left its temporary file): removed, logged."""
    root = tmp_path / "conf" / "tlsroll-tls"
    orphan = a_stage(root, "r-1.a_b", "server.key", ".server.pem.tmp-4242", "auth-verifier.json")
    logs = sweep(tmp_path)
    assert not orphan.exists()
    assert [(e["event"], e["path"]) for e in logs] == [("stage.removed", str(orphan))]


def test_a_switch_not_journalled_drops_a_directory_holding_only_its_verifier_file(
    tmp_path: Path,
) -> None:
    """``plans.drop_unjournalled_verifier`` (a change-password switch whose journal write
    failed: s32risk) removes the rollout's directory as the start's sweep would, and only if
    the verifier file is all it holds: one with a key (a stage's, or a CreateCSR not
    journalled yet), a rollout the journal knows, or one the live config names is left."""
    from nodeagent import plans
    from nodeagent.drivers import Driver
    from nodeagent.journal import Journal

    root = tmp_path / "conf" / "tlsroll-tls"
    config = tmp_path / "conf" / "server.toml"
    config.parent.mkdir()
    config.write_text('verifier_file = "tlsroll-tls/named/auth-verifier.json"\n')
    driver = cast(Driver, ConfigOnly(config))
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        alone = a_stage(root, "alone", "auth-verifier.json")
        keyed = a_stage(root, "keyed", "server.key", "auth-verifier.json")
        known = a_stage(root, "known", "auth-verifier.json")
        journal.record_csr("known", root / "known" / "server.key", b"csr")
        named = a_stage(root, "named", "auth-verifier.json")
        for name in ("alone", "keyed", "known", "named", "absent"):
            plans.drop_unjournalled_verifier(journal, driver, name)
    finally:
        journal.close()
    assert not alone.exists()
    assert keyed.exists() and known.exists() and named.exists()


def test_the_start_sweep_leaves_a_symlinked_or_foreign_tlsroll_tls(tmp_path: Path) -> None:
    """Review 1a, finding 1: ``tlsroll-tls`` a symbolic link (an admin moved the keys to
    another volume, where another service keeps its files), or a directory someone else
    owns: nothing under it is tlsroll's to remove. Logged (its path), left."""
    elsewhere = tmp_path / "srv-tls"
    othersvc = a_stage(elsewhere, "othersvc", "server.key")
    (tmp_path / "conf").mkdir()
    root = tmp_path / "conf" / "tlsroll-tls"
    root.symlink_to(elsewhere)
    logs = sweep(tmp_path)
    assert othersvc.exists() and (othersvc / "server.key").exists()
    assert [(e["event"], e["path"]) for e in logs] == [("stage.unknown_dir", str(root))]

    root.unlink()
    theirs = a_stage(root, "r2", "server.key")
    os.chown(root, os.geteuid() + 4242, -1)
    logs = sweep(tmp_path)
    assert theirs.exists()
    assert [(e["event"], e["path"]) for e in logs] == [("stage.unknown_dir", str(root))]


def test_the_start_sweep_leaves_every_directory_tlsroll_did_not_make(tmp_path: Path) -> None:
    """Review 1a, finding 1: in ``tlsroll-tls`` only a directory named as a rollout id, a real
    directory of the agent's user, holding only regular files of the names a stage writes,
    is removed. A mount point's lost+found, an admin's backup, a directory someone else
    owns, a symbolic link, one with an unexpected file, a subdirectory or a link inside:
    each logged once (``stage.unknown_dir``, its path) and left as it is."""
    root = tmp_path / "conf" / "tlsroll-tls"
    removed = a_stage(root, "orphan")
    kept = [
        a_stage(root, "lost+found", "server.key"),  # not a rollout id
        a_stage(root, "admin-backup-2025", "server.key", "notes.txt"),  # an unexpected file
        a_stage(root, "theirs", "server.key"),  # another user's
        a_stage(root, "nested", "server.key", "sub/server.key"),  # a directory inside
        a_stage(root, "linked", "ca.pem"),  # a symbolic link inside
        root / "a-link",  # a symbolic link to a stage-like directory
        a_stage(tmp_path, "target", "server.key"),
    ]
    os.chown(root / "theirs", os.geteuid() + 4242, -1)
    (root / "linked" / "server.key").symlink_to(tmp_path / "target" / "server.key")
    (root / "a-link").symlink_to(tmp_path / "target")
    logs = sweep(tmp_path)
    assert not removed.exists()
    for directory in kept:
        assert directory.exists() and any(directory.iterdir()), directory
    assert (root / "admin-backup-2025" / "notes.txt").exists()
    assert sorted((e["event"], e["path"]) for e in logs) == sorted(
        [("stage.removed", str(removed))]
        + [("stage.unknown_dir", str(d)) for d in kept if d.parent == root]
    )
    for event in logs:  # the path only: never what is in the files
        assert set(event) <= {
            *("event", "path", "rollout_id", "why", "detail", "log_level", "logger_name")
        }


def test_a_directory_not_tlsrolls_is_said_once_however_many_sweeps_find_it(
    tmp_path: Path,
) -> None:
    """Review of s59 L1: the sweep runs at every transaction's end, and said the same
    directory that is none of tlsroll's (``stage.unknown_dir``) each time. It says each once
    while the agent runs: at the start, and at the first sweep that finds one new (one that
    appears later, or another put in the place of one said); later sweeps stay quiet about
    it. Real sweeps over a real directory and journal: three switches ran, ``r3`` is live, the
    way back of ``r3`` restores ``r2`` (pruned: its key goes once that rollout ends) and ``r1``
    is superseded (removed), but an admin's notes sit in ``r1`` and ``r2``."""
    import structlog.testing

    from nodeagent import plans
    from nodeagent.drivers import Driver
    from nodeagent.journal import Journal

    conf = tmp_path / "conf"
    root = conf / "tlsroll-tls"
    r1 = a_stage(root, "r1", *CERT, "notes.txt")
    r2 = a_stage(root, "r2", *CERT, "notes.txt")
    a_stage(root, "r3")

    def files(name: str) -> dict[str, str]:
        keys = ("key_file", "cert_file", "ca_file")
        return {k: str(root / name / f) for k, f in zip(keys, CERT, strict=True)}

    config = conf / "server.toml"
    config.write_text("".join(f'{k} = "{v}"\n' for k, v in files("r3").items()))
    driver = cast(Driver, ConfigOnly(config))
    journal = Journal(tmp_path / "journal.sqlite3")

    def said(*, at_start: bool = False) -> list[str]:
        with structlog.testing.capture_logs() as logs:
            plans.sweep_stage_dirs(journal, driver, at_start=at_start)
        assert all(e["event"] == "stage.unknown_dir" for e in logs), logs
        return sorted(e["path"] for e in logs)

    try:
        journal_switches(journal, root, files, "r1", "r2", "r3")

        assert said(at_start=True) == [str(r1), str(r2)]
        assert said() == []  # a transaction's end, and another
        assert said() == []
        assert journal.end_way_back(["r3"]) == "r3"  # r2 is superseded too now: still said
        assert said() == []
        for path in sorted(r1.iterdir()):  # r1 replaced by another directory of the admin's
            path.unlink()
        r1.rmdir()
        (tmp_path / "elsewhere").mkdir()
        r1.symlink_to(tmp_path / "elsewhere")
        assert said() == [str(r1)]
        assert said() == []
        assert said(at_start=True) == []  # (the same process: a start's is said once too)
        # tlsroll-tls itself replaced by a link to another volume: said once, then quiet.
        root.rename(conf / "moved")
        root.symlink_to(conf / "moved")
        assert said() == [str(root)]
        assert said() == []
        assert r2.exists() and (root / "r3" / "server.key").exists()
    finally:
        journal.close()


def test_a_directory_said_is_said_again_once_a_sweep_found_it_gone_or_the_agent_starts(
    tmp_path: Path,
) -> None:
    """Review of s60a L1: the directories said to be none of tlsroll's were remembered by
    path, device, inode, type and owner for as long as the process ran: one removed and
    made again in its place (a new inode, or the same one back: ext4 hands a freed inode out
    again) was not always said, the set only grew, and an agent started again in the same
    process said none again. One a sweep finds gone is forgotten now, and the agent's start
    (``plans.forget_said``) forgets them all."""
    from nodeagent import plans

    root = tmp_path / "conf" / "tlsroll-tls"
    notes = root / "notes"  # (an admin's: a file tlsroll never writes in a stage)
    notes.mkdir(parents=True)
    (notes / "notes.txt").write_text("mine\n")

    def said() -> list[str]:
        return [e["path"] for e in sweep(tmp_path) if e["event"] == "stage.unknown_dir"]

    assert said() == [str(notes)]
    assert said() == []
    (notes / "notes.txt").unlink()
    notes.rmdir()
    assert said() == []  # gone: forgotten
    assert not [k for k in plans._SAID_UNKNOWN if k[0].startswith(str(root))]
    notes.mkdir()  # (may well get the inode back)
    (notes / "notes.txt").write_text("mine again\n")
    assert said() == [str(notes)]
    assert said() == []
    plans.forget_said()  # the agent's start
    assert said() == [str(notes)]
    # tlsroll-tls itself a link, said; tlsroll's again, forgotten; a link again, said again.
    root.rename(tmp_path / "conf" / "moved")
    root.symlink_to(tmp_path / "conf" / "moved")
    assert said() == [str(root)]
    root.unlink()
    (tmp_path / "conf" / "moved").rename(root)
    assert said() == []
    root.rename(tmp_path / "conf" / "moved")
    root.symlink_to(tmp_path / "conf" / "moved")
    assert said() == [str(root)]
    assert said() == []


def test_the_journal_says_which_stage_files_are_needed_and_a_sweep_keeps_them(
    tmp_path: Path,
) -> None:
    """Review rev58a L11, in the journal and the sweep alone: after an enable-tls (with a
    verifier file) and two rotations, what is needed is what is live (the last rotation's
    files and the first switch's verifier file) and what the rollback of the newest switch
    restores (the rotation before it), whose rollout the heartbeat names first; the first
    switch's key, certificate and CA go, its verifier file stays. The leader saying another
    rollout ended changes nothing; saying the newest switch's rollout ended closes its way
    back, and the next sweep removes the rotation before it. A sweep while the agent runs
    leaves a directory the journal does not know (the start's sweep removes it)."""
    import structlog.testing

    from nodeagent import plans
    from nodeagent.drivers import Driver
    from nodeagent.journal import Journal

    root = tmp_path / "conf" / "tlsroll-tls"
    a_stage(root, "p1", *CERT, "auth-verifier.json")
    for name in ("r1", "r2", "stray"):
        a_stage(root, name)

    def files(name: str, verifier: str = "p1") -> dict[str, str]:
        return {
            "cert_file": str(root / name / "server.pem"),
            "key_file": str(root / name / "server.key"),
            "ca_file": str(root / name / "ca.pem"),
            "verifier_file": str(root / verifier / "auth-verifier.json"),
        }

    config = tmp_path / "conf" / "server.toml"
    config.write_text("".join(f'{k} = "{v}"\n' for k, v in files("r2").items()))
    driver = cast(Driver, ConfigOnly(config))
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        journal_switches(journal, root, files, "p1", "r1", "r2")

        def left() -> set[str]:
            return {f"{d.name}/{f.name}" for d in root.iterdir() for f in d.iterdir()}

        assert journal.heartbeat_facts()[1] == ["r2"]
        with structlog.testing.capture_logs() as logs:
            plans.sweep_stage_dirs(journal, driver, at_start=False)
        wanted = {
            "p1/auth-verifier.json",
            "p1/ca.pem",  # (the way back to http checks a return to https with it)
            *(f"{name}/{f}" for name in ("r1", "r2", "stray") for f in CERT),
        }
        assert left() == wanted
        assert [(e["event"], e["rollout_id"], e["files"]) for e in logs] == [
            ("stage.files_removed", "p1", ["server.key", "server.pem"])
        ]

        assert journal.end_way_back(["another"]) is None
        assert journal.heartbeat_facts()[1] == ["r2"]
        assert journal.end_way_back(["r2"]) == "r2"
        assert journal.heartbeat_facts()[1] == []
        with structlog.testing.capture_logs() as logs:
            plans.sweep_stage_dirs(journal, driver, at_start=False)
        assert left() == wanted - {f"r1/{f}" for f in CERT}
        assert [(e["event"], e["rollout_id"]) for e in logs] == [("stage.removed", "r1")]

        with structlog.testing.capture_logs() as logs:
            plans.sweep_stage_dirs(journal, driver)  # the start's
        assert left() == {"p1/auth-verifier.json", "p1/ca.pem", *(f"r2/{f}" for f in CERT)}
        assert [(e["event"], e["rollout_id"], e["why"]) for e in logs] == [
            ("stage.removed", "stray", "unknown to the journal")
        ]
    finally:
        journal.close()


def test_the_start_sweep_removes_nothing_if_the_live_config_cannot_be_read(
    tmp_path: Path,
) -> None:
    """Whether the live config names a directory decides what is kept: unread, nothing is
    removed (a journal begun again knows nothing of the files the server serves)."""
    orphan = a_stage(tmp_path / "conf" / "tlsroll-tls", "orphan")
    assert sweep(tmp_path, unreadable=True, done=False) == []  # (tried again later)
    assert (orphan / "server.key").exists()


def test_a_stage_directory_that_cannot_be_removed_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal that fails (a read-only mount, an immutable file) is logged with its path
    and errno, and the sweep says it did not do all it meant to: the agent tries again
    (``NodeAgentService._swept``; tests/test_superseded_stages.py)."""
    import shutil

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    orphan = a_stage(tmp_path / "conf" / "tlsroll-tls", "orphan")
    logs = sweep(tmp_path, done=False)
    assert orphan.exists()
    assert [(e["event"], e["path"]) for e in logs] == [("stage.remove_failed", str(orphan))]
    assert "Operation not permitted" in logs[0]["error"]


def test_a_stage_directory_that_cannot_be_read_is_a_sweep_not_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s60a L2: a stage directory the sweep cannot read (EACCES, EIO) was taken for
    none of tlsroll's, the sweep counted done and nothing tried again while the agent ran.
    It is a removal that failed: logged with its path and errno, and the sweep not done (the
    agent tries again); the directory is left. (The agent runs as root here, which reads any
    directory: the listing's error is made to come, on that directory only.)"""
    orphan = a_stage(tmp_path / "conf" / "tlsroll-tls", "orphan")
    real = os.scandir

    def scandir(path: Any) -> Any:
        if Path(path) == orphan:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    logs = sweep(tmp_path, done=False)
    assert (orphan / "server.key").exists()
    assert [(e["event"], e["path"]) for e in logs] == [("stage.remove_failed", str(orphan))]
    assert "Permission denied" in logs[0]["error"] and "EACCES" in logs[0]["error"], logs


def test_a_later_rollouts_key_removes_only_a_stage_directory(tmp_path: Path) -> None:
    """Review 1a, finding 1, on the record_csr path (``plans.remove_stages``): the same
    checks as the start's sweep. A forgotten stage whose directory holds something tlsroll
    does not write there, or whose ``tlsroll-tls`` is a symbolic link, is left (and said)."""
    import structlog.testing

    from nodeagent import plans
    from nodeagent.journal import Staged

    def forgotten(directory: Path) -> Staged:
        return Staged(directory.name, directory / "server.key", b"", None, None, None, None)

    root = tmp_path / "conf" / "tlsroll-tls"
    clean = a_stage(root, "r1")
    odd = a_stage(root, "r2", "server.key", "keep-me.txt")
    elsewhere = a_stage(tmp_path / "elsewhere", "r3", "server.key")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "tlsroll-tls").symlink_to(tmp_path / "elsewhere")
    through_link = tmp_path / "linked" / "tlsroll-tls" / "r3"
    with structlog.testing.capture_logs() as logs:
        plans.remove_stages([forgotten(clean), forgotten(odd), forgotten(through_link)])
    assert not clean.exists()
    assert (odd / "keep-me.txt").exists() and (odd / "server.key").exists()
    assert (elsewhere / "server.key").exists()
    assert sorted((e["event"], e["path"]) for e in logs) == sorted(
        [
            ("stage.removed", str(clean)),
            ("stage.unknown_dir", str(odd)),
            ("stage.unknown_dir", str(tmp_path / "linked" / "tlsroll-tls")),
        ]
    )


# --- a change-password rolled back ----------------------------------------------------------


def test_a_change_password_rolled_back_serves_the_password_live_before(
    make_node: NodeFactory,
) -> None:
    """Review s69 revpass3 (3), with the real drivers: a change-password switch that the
    leader rolls back (its outside check failed) leaves the node on the password live before
    it, at the server's login and at the bootstrap service (its hello's salt): the one the
    leader still records for the node (a rolled-back node is never recorded done)."""
    node = make_node()
    node.stage("pw-tls")
    node.switch("pw-tls")
    done = node.wait_txn("pw-tls")
    assert done.outcome == "completed", done.reason
    secrets = {"pw-1": "first-password-kd7q-x2mf", "pw-2": "second-password-9wq3-p4hz"}
    verifiers = {
        rid: password.make_verifier(secret, **password.TEST_PARAMS)
        for rid, secret in secrets.items()
    }
    for rid, verifier in verifiers.items():
        with node.stub() as stub:
            stub.Switch(
                agent_pb2.SwitchRequest(
                    command=node.command(rid),
                    change=CHANGE.wire(Change.CHANGE_PASSWORD),
                    auth_verifier_json=password.verifier_to_json(verifier),
                ),
                timeout=30,
            )
        assert node.wait_txn(rid).outcome == "completed"

    def login(secret: str) -> int:
        return node.post("https", {"password": secret}, "login").status

    def salt() -> bytes | None:
        try:
            reply = http_request(
                "GET",
                f"https://{node.address}:9443{proto.HELLO_PATH}",
                context=unverified_client_context(),
            )
        except OSError:
            return None  # (the service restarting)
        return proto.parse_hello(reply.body).kdf.salt if reply.status == 200 else None

    def salt_of(rid: str) -> bytes:
        return proto.NodePassword.of_verifier(verifiers[rid]).kdf.salt

    assert (login(secrets["pw-1"]), login(secrets["pw-2"])) == (401, 200)
    wait_until(lambda: salt() == salt_of("pw-2"), 30, "the bootstrap service on pw-2")
    node.rollback("pw-2")
    assert node.wait_txn("pw-2", "rollback").outcome == "completed"
    assert (login(secrets["pw-1"]), login(secrets["pw-2"])) == (200, 401)
    wait_until(lambda: salt() == salt_of("pw-1"), 30, "the bootstrap service back on pw-1")
