"""Who may call what: every caller identity × every RPC of the TLS ports, with the exact status.

The methods come from the services' descriptors, so a new RPC fails this test until the table
below says who may call it. Callers: the leader, the node itself, another node, a workstation,
no certificate, a foreign CA (with a certificate that claims the leader's identity), a node's
managed server (its https certificate as a rollout issues it: server usage only; and the same
identity with client usage too, so that the identity check itself is what refuses it), and a
revoked certificate (a removed node's for the leader's services, a revoked leader certificate
for the agents'). Real leader and agents, real mutual TLS.

Requests are minimal and the same for every caller, so that a caller who passes the identity
check gets the method's own answer to a bad request (INVALID_ARGUMENT, NOT_FOUND, …) and a
caller who does not gets PERMISSION_DENIED or UNAUTHENTICATED (or UNAVAILABLE where the TLS
handshake itself refuses it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from leader.layout import read_passphrase
from tests.cluster import AdminTokenCluster, Cluster, secure_channel, wait_until
from tests.conftest import next_loopback
from tlsroll import bootstrap_protocol, pki, spiffe
from tlsroll.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    enrolment_pb2,
    enrolment_pb2_grpc,
    leader_pb2,
    leader_pb2_grpc,
)

OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NO_TLS = grpc.StatusCode.UNAVAILABLE  # the handshake refused the caller
INVALID = grpc.StatusCode.INVALID_ARGUMENT

CALLERS = (
    "leader",
    "node",
    "other_node",
    "workstation",
    "server",
    "server_identity",
    "no_cert",
    "foreign_ca",
    "revoked",
)
Creds = tuple[bytes, bytes] | None

# A managed server's certificate has no client usage: the handshake refuses it as a client.
SERVER_GETS = NO_TLS
STREAMS = {"WatchTransaction", "Heartbeats"}  # methods that answer with a stream
REQUEST_STREAMS = {"Heartbeats"}  # methods that take one (here: one message)
NO_EPOCH = agent_pb2.Command(rollout_id="matrix", epoch=0)  # refused by the method itself
AGENT_REQUESTS: dict[str, Any] = {
    "GetStatus": agent_pb2.GetStatusRequest(),
    "Check": agent_pb2.CheckRequest(),
    "Preflight": agent_pb2.PreflightRequest(command=NO_EPOCH),
    "CreateCSR": agent_pb2.CreateCSRRequest(command=NO_EPOCH),
    "Stage": agent_pb2.StageRequest(command=NO_EPOCH),
    "Switch": agent_pb2.SwitchRequest(command=NO_EPOCH),
    "Rollback": agent_pb2.RollbackRequest(command=NO_EPOCH),
    "GetTransaction": agent_pb2.GetTransactionRequest(rollout_id="matrix"),
    "WatchTransaction": agent_pb2.GetTransactionRequest(rollout_id="matrix"),
    "Freeze": agent_pb2.FreezeRequest(command=NO_EPOCH),
    "Unfreeze": agent_pb2.FreezeRequest(command=NO_EPOCH),
}
# NodeAgent: only the leader; what the leader gets is the method's answer to the request.
# (Check runs preflight's checks: this node has no managed server.)
LEADER_GETS = {m: INVALID for m in AGENT_REQUESTS} | {
    "GetStatus": OK,
    "Check": grpc.StatusCode.FAILED_PRECONDITION,
}
AGENT_EXPECTED = {
    "leader": LEADER_GETS,
    "node": dict.fromkeys(AGENT_REQUESTS, DENIED),  # node1 calling its own agent
    "other_node": dict.fromkeys(AGENT_REQUESTS, DENIED),
    "workstation": dict.fromkeys(AGENT_REQUESTS, DENIED),
    "server": dict.fromkeys(AGENT_REQUESTS, SERVER_GETS),
    "server_identity": dict.fromkeys(AGENT_REQUESTS, DENIED),
    "no_cert": dict.fromkeys(AGENT_REQUESTS, NO_TLS),
    "foreign_ca": dict.fromkeys(AGENT_REQUESTS, NO_TLS),
    "revoked": dict.fromkeys(AGENT_REQUESTS, UNAUTH),
}

LEADER_METHODS = (
    "Heartbeat",
    "SignWorkstationCertificate",
    "WithdrawWorkstationCertificate",
    "RenewWorkstationCertificate",
    "RenewNodeCertificate",
    "Heartbeats",
)
# Leader: only enrolled nodes, each as itself (node2 is as much "a node" as node1); a node that
# passes gets the method's answer (a renewal with a CSR that is none, a withdrawal of a
# certificate that is none: INVALID_ARGUMENT).
NODE_GETS = dict.fromkeys(LEADER_METHODS, OK) | {
    "RenewNodeCertificate": INVALID,
    "WithdrawWorkstationCertificate": INVALID,
    # (a workstation's CSR without the proof of its certificate: no renewal)
    "RenewWorkstationCertificate": grpc.StatusCode.FAILED_PRECONDITION,
}
LEADER_EXPECTED = {
    "leader": dict.fromkeys(LEADER_METHODS, DENIED),
    "node": NODE_GETS,
    "other_node": NODE_GETS,
    "workstation": dict.fromkeys(LEADER_METHODS, DENIED),
    "server": dict.fromkeys(LEADER_METHODS, SERVER_GETS),
    "server_identity": dict.fromkeys(LEADER_METHODS, DENIED),
    "no_cert": dict.fromkeys(LEADER_METHODS, NO_TLS),
    "foreign_ca": dict.fromkeys(LEADER_METHODS, NO_TLS),
    "revoked": dict.fromkeys(LEADER_METHODS, UNAUTH),
}
# Enrolment (join port): a token is the credential, never a certificate; the port asks for
# none, so every caller gets the same answer to a malformed token.
ENROL_EXPECTED = dict.fromkeys(CALLERS, INVALID)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, dict[str, Creds]]]:
    with AdminTokenCluster(tmp_path_factory.mktemp("matrix"), next_loopback()) as c:
        c.init()
        c.start_leader()
        node1 = c.add_agent("node1", next_loopback())
        node2 = c.add_agent("node2", next_loopback())
        gone = c.add_agent("gone", next_loopback())
        c.wait_for_nodes_online(["node1", "node2", "gone"])
        ca = pki.CertificateAuthority.load(
            c.ca_cert_path, c.ca_key_path, read_passphrase(c.passphrase_path)
        )
        td = spiffe.trust_domain(ca.cert)

        def creds_of(cert: Any, key: pki.PrivateKey) -> tuple[bytes, bytes]:
            return pki.cert_to_pem(cert), pki.key_to_pem(key)

        # A workstation certificate, as node1's bootstrap service gets it.
        ws_key = pki.generate_key()
        csr = pki.make_csr(ws_key, bootstrap_protocol.workstation_names("ws-matrix"))
        with c.control_channel(node1.cert_file.read_bytes(), node1.key_file.read_bytes()) as ch:
            ws_cert = pki.load_cert_pem(
                leader_pb2_grpc.LeaderStub(ch)
                .SignWorkstationCertificate(
                    leader_pb2.SignWorkstationRequest(csr_pem=pki.csr_to_pem(csr)), timeout=10
                )
                .certificate_pem
            )
        # node1's managed server's certificate, as a rollout's stage has it signed
        # (``leader.changes``), and one with its identity that could also be a client's.
        srv_key = pki.generate_key()
        srv_names = pki.Names.of("node1", [node1.address])
        srv_cert = ca.sign_csr(
            pki.make_csr(srv_key, srv_names),
            srv_names,
            server=True,
            client=False,
            identity=spiffe.server(td, "node1"),
        )
        srv_id_key = pki.generate_key()
        srv_id_cert = ca.issue(
            srv_id_key.public_key(),
            srv_names,
            server=True,
            client=True,
            identity=spiffe.server(td, "node1"),
        )
        # Another CA's certificate claiming this cluster's leader identity.
        foreign = pki.CertificateAuthority.create("foreign")
        f_key = pki.generate_key()
        f_cert = foreign.issue(
            f_key.public_key(),
            pki.Names.of("tlsroll-leader", [c.address]),
            client=True,
            identity=spiffe.leader(td),
        )
        # A removed node's certificate, and a leader certificate the CA revoked.
        gone_creds = (gone.cert_file.read_bytes(), gone.key_file.read_bytes())
        gone.stop()
        assert c.cli("nodes", "remove", "gone", "--yes").returncode == 0
        r_key = pki.generate_key()
        r_cert = ca.issue(
            r_key.public_key(),
            pki.Names.of("tlsroll-leader", [c.address]),
            client=True,
            identity=spiffe.leader(td),
        )
        assert c.cli("ca", "revoke", "--unknown", f"{r_cert.serial_number:x}").returncode == 0
        crl = node1.data_dir / "crl.pem"

        def node1_knows() -> bool:
            if not crl.exists():
                return False
            return r_cert.serial_number in pki.load_crl(crl.read_bytes(), ca.cert)[1]

        wait_until(node1_knows, 15, "node1 has the revocation list")
        creds: dict[str, Creds] = {
            "leader": c.leader_credentials(),
            "node": (node1.cert_file.read_bytes(), node1.key_file.read_bytes()),
            "other_node": (node2.cert_file.read_bytes(), node2.key_file.read_bytes()),
            "workstation": creds_of(ws_cert, ws_key),
            "server": creds_of(srv_cert, srv_key),
            "server_identity": creds_of(srv_id_cert, srv_id_key),
            "no_cert": None,
            "foreign_ca": creds_of(f_cert, f_key),
            "revoked_leader": creds_of(r_cert, r_key),
            "revoked_node": gone_creds,
        }
        yield c, creds


def call(channel_of: Callable[[], grpc.Channel], invoke: Callable[[grpc.Channel], Any]) -> Any:
    with channel_of() as channel:
        try:
            invoke(channel)
        except grpc.RpcError as exc:
            return exc.code()
    return OK


def invoker(
    stub: Callable[[grpc.Channel], Any], method: str, request: Any
) -> Callable[[grpc.Channel], Any]:
    def invoke(channel: grpc.Channel) -> Any:
        sent = iter([request]) if method in REQUEST_STREAMS else request
        answer = getattr(stub(channel), method)(sent, timeout=10)
        if method in STREAMS:  # a stream's status comes with reading it
            return list(answer)
        return answer

    return invoke


def test_the_table_names_every_method() -> None:
    agent = agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].methods_by_name
    leader = leader_pb2.DESCRIPTOR.services_by_name["Leader"].methods_by_name
    enrolment = enrolment_pb2.DESCRIPTOR.services_by_name["Enrolment"].methods_by_name
    assert set(agent) == set(AGENT_REQUESTS)
    assert set(leader) == set(LEADER_METHODS)
    assert set(enrolment) == {"Enrol"}
    for table in (AGENT_EXPECTED, LEADER_EXPECTED):
        assert set(table) == set(CALLERS)


@pytest.mark.parametrize("caller", CALLERS)
def test_node_agent(world: tuple[Cluster, dict[str, Creds]], caller: str) -> None:
    cluster, creds = world
    mine = creds["revoked_leader" if caller == "revoked" else caller]
    target = cluster.agents["node1"].target
    name = cluster.agents["node1"].tls_name

    def channel() -> grpc.Channel:
        cert, key = mine if mine is not None else (None, None)
        return secure_channel(target, cluster.ca_pem, cert, key, name=name)

    got = {
        m: call(channel, invoker(agent_pb2_grpc.NodeAgentStub, m, r))
        for m, r in AGENT_REQUESTS.items()
    }
    assert got == AGENT_EXPECTED[caller]


@pytest.mark.parametrize("caller", CALLERS)
def test_leader_service(world: tuple[Cluster, dict[str, Creds]], caller: str) -> None:
    cluster, creds = world
    mine = creds["revoked_node" if caller == "revoked" else caller]

    def channel() -> grpc.Channel:
        cert, key = mine if mine is not None else (None, None)
        return secure_channel(cluster.control_target, cluster.ca_pem, cert, key)

    ws_key = pki.generate_key()
    csr = pki.make_csr(
        ws_key, bootstrap_protocol.workstation_names(f"ws-m-{caller.replace('_', '-')}")
    )
    requests = {
        "Heartbeat": leader_pb2.HeartbeatRequest(agent_version="matrix"),
        "SignWorkstationCertificate": leader_pb2.SignWorkstationRequest(
            csr_pem=pki.csr_to_pem(csr)
        ),
        "RenewWorkstationCertificate": leader_pb2.SignWorkstationRequest(
            csr_pem=pki.csr_to_pem(csr)
        ),
        "WithdrawWorkstationCertificate": leader_pb2.WithdrawWorkstationRequest(
            certificate_pem=b"not a certificate"
        ),
        "RenewNodeCertificate": leader_pb2.RenewNodeCertificateRequest(csr_pem=b"not a CSR"),
        "Heartbeats": leader_pb2.HeartbeatRequest(agent_version="matrix"),
    }
    got = {m: call(channel, invoker(leader_pb2_grpc.LeaderStub, m, r)) for m, r in requests.items()}
    assert got == LEADER_EXPECTED[caller]


@pytest.mark.parametrize("caller", CALLERS)
def test_enrolment(world: tuple[Cluster, dict[str, Creds]], caller: str) -> None:
    cluster, creds = world
    mine = creds["revoked_node" if caller == "revoked" else caller]

    def channel() -> grpc.Channel:
        cert, key = mine if mine is not None else (None, None)
        return secure_channel(cluster.join_target, cluster.ca_pem, cert, key)

    got = call(
        channel,
        lambda ch: enrolment_pb2_grpc.EnrolmentStub(ch).Enrol(
            enrolment_pb2.EnrolRequest(token="not-a-token"), timeout=10
        ),
    )
    assert got == ENROL_EXPECTED[caller]


# Session 67 (badinput2 L): the leader's own identity with a rollout id no leader makes. Every
# command refused it (INVALID_ARGUMENT, ``_command``); GetTransaction and WatchTransaction looked
# it up and answered NOT_FOUND with it repeated (up to 1000 characters of it, newlines and all),
# and Rollback's ``undoes`` went on to the plan, whose refusal held it.
BAD_IDS = ("a" * 65, "r1\nforged line", "", "-r1")


@pytest.mark.parametrize("rollout_id", BAD_IDS, ids=["long", "newline", "empty", "dash"])
def test_the_agent_refuses_a_rollout_id_no_leader_makes(
    world: tuple[Cluster, dict[str, Creds]], rollout_id: str
) -> None:
    cluster, creds = world
    cluster.announce_epoch(1)
    agent = cluster.agents["node1"]
    cert, key = creds["leader"] or (None, None)
    switch = agent_pb2.TransactionKind.TRANSACTION_KIND_SWITCH
    requests: list[tuple[str, Any]] = [
        ("GetTransaction", agent_pb2.GetTransactionRequest(rollout_id=rollout_id, kind=switch)),
        ("WatchTransaction", agent_pb2.GetTransactionRequest(rollout_id=rollout_id, kind=switch)),
    ]
    if rollout_id:  # (an empty undoes is the way back: the newest switch from http)
        command = agent_pb2.Command(rollout_id="matrix", epoch=1)
        requests.append(("Rollback", agent_pb2.RollbackRequest(command=command, undoes=rollout_id)))
    with secure_channel(agent.target, cluster.ca_pem, cert, key, name=agent.tls_name) as channel:
        for method, request in requests:
            with pytest.raises(grpc.RpcError) as caught:
                invoker(agent_pb2_grpc.NodeAgentStub, method, request)(channel)
            err = caught.value
            assert isinstance(err, grpc.Call)
            assert err.code() == INVALID, (method, err.code(), err.details())
            details = err.details() or ""
            assert "\n" not in details, (method, details)
            assert not rollout_id or rollout_id not in details, (method, details)
            assert "1-64 letters, digits" in details, (method, details)
