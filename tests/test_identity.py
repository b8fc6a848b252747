"""Identities that cannot be borrowed (issue 9): bound join tokens, a CA that signs only what a
token names, roles in the certificate checked by every peer, revocation, recoverable epochs.

Real leader and agents as processes, real mutual TLS. Where a test needs an attacker's server
(a fake Enrolment or NodeAgent service), it runs in this process with the attacker's real
certificate; the victim side is the product's own client code (``nodeagent.identity.enrol``,
``leader.agent_client.AgentClient``), built exactly as the daemons build it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import sqlite3
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from leader.agent_client import AgentClient
from leader.layout import read_passphrase
from leader.store import Node
from nodeagent.bootstrap_supervisor import BootstrapHost
from nodeagent.config import AgentConfig
from nodeagent.identity import enrol as agent_enrol
from nodeagent.identity import load_identity
from tests.cluster import (
    AdminTokenCluster,
    Agent,
    Cluster,
    csr_pem,
    enrol,
    enrol_request,
    secure_channel,
    wait_until,
)
from tests.conftest import next_loopback
from tests.refserver_helper import write_toml
from tlsroll import bootstrap_csr, bootstrap_protocol, pki, spiffe
from tlsroll.errors import TlsrollError
from tlsroll.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    enrolment_pb2,
    enrolment_pb2_grpc,
    leader_pb2,
    leader_pb2_grpc,
)

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("identity"), next_loopback()) as c:
        c.init()
        c.start_leader()
        c.add_agent("node1", next_loopback())
        c.add_agent("node2", next_loopback())
        c.wait_for_nodes_online(["node1", "node2"])
        # Their first heartbeats are stored with the leader's next group commit (a second):
        # the tests compare the store before and after a refusal.
        wait_until(
            lambda: all(r["last_heartbeat"] for r in c.store_table("nodes")),
            15,
            "the first heartbeats stored",
        )
        yield c


def the_ca(cluster: Cluster) -> pki.CertificateAuthority:
    """The cluster's CA, read from the leader's data dir: what only the leader can do."""
    return pki.CertificateAuthority.load(
        cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
    )


def snapshot(cluster: Cluster) -> dict[str, list[tuple[Any, ...]]]:
    """Nodes, tokens and certificates (the agents' heartbeats aside)."""
    return cluster.store_rows(
        ("nodes", "tokens", "certificates"), ignore=("last_heartbeat", "highest_epoch")
    )


def cli_fails(cluster: Cluster, *args: str) -> str:
    result = cluster.cli(*args)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    return line


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


# --- the CA signs only what a token names -----------------------------------------------------


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (["--address", "0.0.0.0"], "not the address of one host"),  # noqa: S104
        (["--address", "::1"], "names every host"),
        (["--address", "127.0.0.1"], "names every host"),
        (["--address", "224.0.0.1"], "not the address of one host"),
        (["--dns", "*.bank.example"], "wildcard"),
        (["--dns", "localhost"], "names every host"),
        (["--dns", "leader.tlsroll-0123456789abcdef.invalid"], "cluster's own"),
        (["--dns", "bad_name"], "not a DNS host name"),
        ([f"--dns=h{i}.example" for i in range(9)], "at most"),
        ([f"--address=127.200.0.{i}" for i in range(1, 10)], "at most"),
    ],
)
def test_token_for_names_the_ca_never_signs_is_refused(
    cluster: Cluster, names: list[str], says: str
) -> None:
    before = snapshot(cluster)
    args = ["token", "create", "--node", "wrong", *names]
    if "--address" not in " ".join(names):
        args += ["--address", next_loopback()]
    line = cli_fails(cluster, *args)
    assert says in line
    assert snapshot(cluster) == before


def test_token_for_names_held_by_the_leader_or_another_node_is_refused(cluster: Cluster) -> None:
    node2 = cluster.agents["node2"].address
    before = snapshot(cluster)
    for address, says in [(cluster.address, "the leader's"), (node2, "belongs to node 'node2'")]:
        line = cli_fails(cluster, "token", "create", "--node", "thief", "--address", address)
        assert says in line
    assert "tlsroll nodes remove node2" in line  # the way out the message names exists
    assert snapshot(cluster) == before


def test_a_token_for_the_leaders_address_under_another_name_names_the_leaders_node(
    tmp_path: Path,
) -> None:
    """Review s66 walk L7: `token create --node X --address <leader IP>` for the leader's own
    node under another name (the name given to `tlsroll init` forgotten) said only "address …
    is the leader's". Now the one line names the leader's node and the --node to use, for the
    leader's DNS name alike; with that name the token is made. Nothing stored before."""
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init("--node-name", "srv1", "--dns", "leader.praxis.test")
        c.start_leader()
        before = snapshot(c)
        for names in (
            ["--address", c.address],
            ["--address", next_loopback(), "--dns", "leader.praxis.test"],
        ):
            line = cli_fails(c, "token", "create", "--node", "praxis-1", *names)
            held = c.address if len(names) == 2 else "DNS name leader.praxis.test"
            assert f"{held} is the leader's; the leader's node is srv1: use --node srv1" in line
        assert snapshot(c) == before
        assert c.create_token("srv1", c.address)  # as it said


def test_an_ordinary_token_gets_nothing_but_its_own_names(cluster: Cluster) -> None:
    """The audit's requests, each with a valid token bound to node9 at its own address: the
    leader's address, node2's, foreign names, every-host names, 5000 addresses, 60000 DNS
    names. None is signed and nothing is stored."""
    mine = next_loopback()
    token = cluster.create_token("node9", mine)  # (a refused request spends no use)
    key = pki.generate_key()
    many_ips = [f"127.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(1, 5001)]
    asks: list[tuple[list[str], list[str]]] = [
        ([cluster.address], []),
        ([cluster.agents["node2"].address], []),
        ([mine], ["www.google.com"]),
        ([mine], ["*.bank.example"]),
        ([mine], ["localhost"]),
        (["8.8.8.8"], []),
        (["0.0.0.0"], []),  # noqa: S104
        (["::1"], []),
        (many_ips, []),
        ([mine], [f"n{i}.example" for i in range(60000)]),
    ]
    before = snapshot(cluster)
    for ips, dns in asks:
        request = enrolment_pb2.EnrolRequest(
            token=token,
            csr_pem=csr_pem(key, "node9", ips, dns),
            node_name="node9",
            addresses=ips,
            dns_names=dns,
            agent_version="x",
            agent_port=9442,
            names_apart=True,
        )
        code, details = status_of(lambda r=request: enrol(cluster, r))
        assert code in (INVALID_ARGUMENT, UNAUTHENTICATED), (ips[:2], dns[:2], code, details)
    assert snapshot(cluster) == before
    # The names it was made for still work, and the certificate holds exactly them.
    reply = enrol(cluster, enrol_request(token, "node9", mine, key=key))
    cert = pki.load_cert_pem(reply.certificate_pem)
    assert pki.names_of(cert) == pki.Names.of("node9", [mine])
    td = spiffe.trust_domain(cluster_ca_cert(cluster))
    assert spiffe.of(cert) == spiffe.node(td, "node9")


def cluster_ca_cert(cluster: Cluster) -> Any:
    return pki.load_cert_pem(cluster.ca_pem)


def test_certificates_carry_their_role(cluster: Cluster) -> None:
    td = spiffe.trust_domain(cluster_ca_cert(cluster))
    leader_cert = pki.load_certs_pem(cluster.leader_credentials()[0])[0]
    assert spiffe.of(leader_cert) == spiffe.leader(td)
    node1 = cluster.agents["node1"].cert()
    assert spiffe.of(node1) == spiffe.node(td, "node1")
    san = node1.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert spiffe.key_host(td, pki.spki_pin(node1)) in san.get_values_for_type(x509.DNSName)


# --- the two impersonations, end to end -------------------------------------------------------


@contextlib.contextmanager
def fake_server(
    address: str, port: int, cert_pem: bytes, key_pem: bytes, add: Any, servicer: Any
) -> Iterator[None]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add(servicer, server)
    server.add_secure_port(f"{address}:{port}", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    server.start()
    try:
        yield
    finally:
        server.stop(None)


class CapturingEnrolment(enrolment_pb2_grpc.EnrolmentServicer):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def Enrol(self, request: Any, context: Any) -> Any:
        self.tokens.append(request.token)
        context.abort(grpc.StatusCode.UNAVAILABLE, "try again")


def test_a_node_certificate_cannot_catch_another_agents_join_token(
    cluster: Cluster, tmp_path: Path
) -> None:
    """An attacker with a token of its own cannot get a certificate for the leader's address;
    and serving the best certificate it can have (its own node certificate, chained to the CA
    the victim pins) where the victim dials the leader, it receives no join token: the agent
    checks for the leader's identity, not an address."""
    evil = next_loopback()
    token = cluster.create_token("evil", evil)
    key = pki.generate_key()
    request = enrolment_pb2.EnrolRequest(
        token=token,
        csr_pem=csr_pem(key, "evil", [cluster.address]),
        node_name="evil",
        addresses=[cluster.address],
        agent_version="x",
        agent_port=9442,
        names_apart=True,
    )
    code, _ = status_of(lambda: enrol(cluster, request))
    assert code in (UNAUTHENTICATED, ALREADY_EXISTS)
    reply = enrol(cluster, enrol_request(token, "evil", evil, key=key))
    chain = reply.certificate_pem + reply.ca_certificate_pem

    capture = CapturingEnrolment()
    victim_token = cluster.create_token("victim", next_loopback())
    config: dict[str, dict[str, object]] = {
        "node": {"name": "victim", "addresses": [next_loopback()]},
        "leader": {
            "address": evil,  # where the victim's packets for the leader end up
            "ca_pin": cluster.ca_pin(),
            "join_token": victim_token,
        },
        "agent": {"data_dir": tmp_path / "victim"},
    }
    path = write_toml(tmp_path / "agent.toml", config)
    path.chmod(0o600)
    cfg = AgentConfig.load(path)
    with (
        fake_server(
            evil,
            cfg.join_port,
            chain,
            pki.key_to_pem(key),
            enrolment_pb2_grpc.add_EnrolmentServicer_to_server,
            capture,
        ),
        pytest.raises(TlsrollError),
    ):
        agent_enrol(cfg, timeout=3)
    assert capture.tokens == []


class CapturingAgent(agent_pb2_grpc.NodeAgentServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def Switch(self, request: Any, context: Any) -> Any:
        self.calls.append(request.auth_verifier_json)
        return agent_pb2.Transaction()


def test_a_node_certificate_cannot_receive_another_nodes_switch(cluster: Cluster) -> None:
    """The leader's client dials node2's agent; an attacker holding a valid node certificate of
    the cluster answers at that address. The handshake fails before any command is sent: the
    client checks for the key node2 enrolled with, not the address."""
    evil = next_loopback()
    key = pki.generate_key()
    token = cluster.create_token("evil2", evil)
    reply = enrol(cluster, enrol_request(token, "evil2", evil, key=key))
    node2 = cluster.list_nodes()["node2"]
    record = Node(
        name="node2",
        addresses=(evil,),  # the attacker took node2's address
        dns_names=(),
        agent_version="",
        agent_port=9442,
        key_pin=pki.spki_pin(cluster.agents["node2"].cert()),
        cert_fingerprint=node2.cert_fingerprint,
        cert_serial="",
        cert_not_after=dt.datetime.now(dt.UTC),
        enrolled_at=dt.datetime.now(dt.UTC),
        last_heartbeat=None,
    )
    chain_pem, leader_key = cluster.leader_credentials()
    capture = CapturingAgent()  # type: ignore[abstract]  # serves Switch only
    with fake_server(
        evil,
        9442,
        reply.certificate_pem + reply.ca_certificate_pem,
        pki.key_to_pem(key),
        agent_pb2_grpc.add_NodeAgentServicer_to_server,
        capture,
    ):

        async def switch() -> None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=cluster.ca_pem,
                private_key=leader_key,
                certificate_chain=chain_pem,
            )
            client = AgentClient(record, creds, spiffe.trust_domain(cluster_ca_cert(cluster)))
            try:
                await client.switch(
                    agent_pb2.SwitchRequest(
                        command=agent_pb2.Command(rollout_id="r1", epoch=1),
                        auth_verifier_json='{"secret": "verifier"}',
                    )
                )
            finally:
                await client.close()

        with pytest.raises(TlsrollError):
            asyncio.run(switch())
    assert capture.calls == []


# --- workstation certificates -----------------------------------------------------------------


def node_credentials(agent: Agent) -> tuple[bytes, bytes]:
    return agent.cert_file.read_bytes(), agent.key_file.read_bytes()


PC = tuple[x509.Certificate, Any]  # a workstation's certificate and key


def sign_workstation(
    cluster: Cluster,
    agent: Agent,
    cn: str,
    *,
    previous: PC | None = None,
    replace: bool = False,
    extensions: list[x509.ExtensionType] | None = None,
    signed: list[PC] | None = None,
    csr: bytes | None = None,
) -> tuple[grpc.StatusCode, str]:
    """A node's bootstrap service asks for a workstation certificate, as a PC would make its
    CSR (``previous``: the PC's certificate and key of the name it enrols again under), or
    sends ``csr`` as it is; the certificate and key signed are appended to ``signed``."""
    key = pki.generate_key()
    if extensions is None:
        claim = bootstrap_csr.reenrolment_extension(
            key.public_key(), cn, previous=previous, replace=replace
        )
        extensions = [claim] if claim else []
    if csr is None:
        names = bootstrap_protocol.workstation_names(cn)
        csr = pki.csr_to_pem(pki.make_csr(key, names, extensions))
    answers: list[Any] = []
    with cluster.control_channel(*node_credentials(agent)) as channel:
        stub = leader_pb2_grpc.LeaderStub(channel)
        status = status_of(
            lambda: answers.append(
                stub.SignWorkstationCertificate(
                    leader_pb2.SignWorkstationRequest(csr_pem=csr), timeout=10
                )
            )
        )
    if answers and signed is not None:
        signed.append((pki.load_cert_pem(answers[0].certificate_pem), key))
    return status


def workstation_rows(cluster: Cluster, cn: str) -> list[dict[str, Any]]:
    listed = cluster.cli("workstations", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return [w for w in json.loads(listed.stdout) if w["name"] == cn]


def test_workstation_names_are_unique_listed_and_revocable(cluster: Cluster) -> None:
    node1, node2 = cluster.agents["node1"], cluster.agents["node2"]
    pcs: list[PC] = []
    assert sign_workstation(cluster, node1, "ws-vm", signed=pcs)[0] == OK
    code, details = sign_workstation(cluster, node2, "ws-vm")  # another node: a duplicate
    assert code == ALREADY_EXISTS
    assert "tlsroll workstations revoke ws-vm" in details and "is taken" in details
    # the same node, the same PC (its certificate's key signs the new key): supersedes
    assert sign_workstation(cluster, node1, "ws-vm", previous=pcs[0])[0] == OK
    rows = workstation_rows(cluster, "ws-vm")
    assert len(rows) == 2 and sum("revoked_at" in w for w in rows) == 1
    assert {w["node"] for w in rows} == {"node1"}
    revoked = cluster.cli("workstations", "revoke", "ws-vm")
    assert revoked.returncode == 0, revoked.stderr
    rows = [w for w in json.loads(cluster.cli("workstations", "list", "--json").stdout)]
    assert all("revoked_at" in w for w in rows if w["name"] == "ws-vm")
    # Revoked serials reach the agents with their next heartbeat (DATA/crl.pem).
    serials = {int(w["serial"], 16) for w in rows if w["name"] == "ws-vm"}
    crl = node2.data_dir / "crl.pem"

    def has_them() -> bool:
        if not crl.exists():
            return False
        _, revoked_serials = pki.load_crl(crl.read_bytes(), cluster_ca_cert(cluster))
        return serials <= revoked_serials

    wait_until(has_them, 15, "the revocation list on node2")
    # After revocation the name is free for another node.
    assert sign_workstation(cluster, node2, "ws-vm")[0] == OK


def test_another_pc_of_the_same_name_does_not_take_it_over_unless_it_replaces_it(
    cluster: Cluster,
) -> None:
    """Audit s39ws M2: a second PC whose host name gives the same name, enrolling at the same
    node, took the name over, and the leader revoked the first PC's certificate. Now only the
    PC that holds the name's certificate (its key signs the new key: its settings dir) enrols
    under it again without more; another is refused, with what to do, and the first PC's
    certificate stays valid, until one says it replaces that PC (--replace)."""
    node1, node2 = cluster.agents["node1"], cluster.agents["node2"]
    first: list[PC] = []
    assert sign_workstation(cluster, node1, "ws-empfang", signed=first)[0] == OK
    before = workstation_rows(cluster, "ws-empfang")

    code, details = sign_workstation(cluster, node1, "ws-empfang")  # another PC, no proof
    assert code == ALREADY_EXISTS, details
    assert "taken at this node" in details and "--replace" in details, details
    assert "--name" in details and "tlsroll workstations revoke ws-empfang" in details
    assert workstation_rows(cluster, "ws-empfang") == before  # nothing revoked, nothing new

    # a proof made with another name's certificate, or whose signature is not of the new key
    other: list[PC] = []
    assert sign_workstation(cluster, node1, "ws-other-pc", signed=other)[0] == OK
    code, details = sign_workstation(cluster, node1, "ws-empfang", previous=other[0])
    assert code != OK and "previous certificate is not ws-empfang's" in details, details
    forged = bootstrap_csr.reenrolment_extension(
        pki.generate_key().public_key(), "ws-empfang", previous=first[0]
    )
    assert forged is not None
    code, details = sign_workstation(cluster, node1, "ws-empfang", extensions=[forged])
    assert code != OK and "did not sign the new key" in details, details
    assert workstation_rows(cluster, "ws-empfang") == before

    # the first PC again (its settings dir kept its key): supersedes its own certificate
    again: list[PC] = []
    assert sign_workstation(cluster, node1, "ws-empfang", previous=first[0], signed=again)[0] == OK
    # ... and at another node too: the name is the PC's, wherever it enrols
    moved: list[PC] = []
    assert sign_workstation(cluster, node2, "ws-empfang", previous=again[0], signed=moved)[0] == OK
    # its superseded certificate proves nothing any more
    code, details = sign_workstation(cluster, node2, "ws-empfang", previous=first[0])
    assert code == ALREADY_EXISTS and "taken at this node" in details, details
    # --replace at another node than the name's is still refused (a node cannot take the
    # names of another node's workstations)
    code, details = sign_workstation(cluster, node1, "ws-empfang", replace=True)
    assert code == ALREADY_EXISTS and "(at node node2)" in details, details

    # a PC that replaces it, at its node, says so: the name is its own, the other revoked
    replaced: list[PC] = []
    assert sign_workstation(cluster, node2, "ws-empfang", replace=True, signed=replaced)[0] == OK
    rows = workstation_rows(cluster, "ws-empfang")
    live = [w for w in rows if "revoked_at" not in w]
    assert len(rows) == 4 and len(live) == 1
    assert int(live[0]["serial"], 16) == replaced[0][0].serial_number
    audit = [
        json.loads(r["detail"])
        for r in cluster.store_table("audit")
        if r["kind"] == "workstation.enrolled" and r["subject"] == "ws-empfang"
    ]
    assert [a.get("replaced", False) for a in audit] == [False, False, False, True]


def test_an_older_client_enrolling_its_own_pc_again_is_told_to_upgrade(cluster: Cluster) -> None:
    """Audit s40ws M2: a client older than the proof (its CSR has none) enrolling its own PC
    again at the same node is refused; its refusal said "another PC ... run again with
    --replace" within the 160 characters such a client shows (after the node's "the leader did
    not sign: "), an option it does not know. Now that part says it may be this PC with an
    older tlsroll, to upgrade."""
    node1 = cluster.agents["node1"]
    assert sign_workstation(cluster, node1, "ws-praxis-empfang")[0] == OK
    before = workstation_rows(cluster, "ws-praxis-empfang")
    code, details = sign_workstation(cluster, node1, "ws-praxis-empfang")  # no proof
    assert code == ALREADY_EXISTS, details
    shown = f"the leader did not sign: {details}"[:160]  # nodeagent.bootstrap_supervisor
    assert "by this PC if its tlsroll is too old to prove it (upgrade it)" in shown, shown
    assert "--replace" in details and "--name" in details, details
    assert "tlsroll workstations revoke ws-praxis-empfang" in details, details
    assert workstation_rows(cluster, "ws-praxis-empfang") == before


def withdraw_workstation(
    cluster: Cluster, agent: Agent, cert_pem: bytes
) -> tuple[grpc.StatusCode, str, bool | None]:
    """A node's bootstrap service withdraws a certificate it could not deliver: the status,
    its details, and (OK) whether it was withdrawn now."""
    answers: list[Any] = []
    with cluster.control_channel(*node_credentials(agent)) as channel:
        stub = leader_pb2_grpc.LeaderStub(channel)
        code, details = status_of(
            lambda: answers.append(
                stub.WithdrawWorkstationCertificate(
                    leader_pb2.WithdrawWorkstationRequest(certificate_pem=cert_pem), timeout=10
                )
            )
        )
    return code, details, answers[0].withdrawn if answers else None


def revoke_reasons(cluster: Cluster, cn: str) -> list[str]:
    """The revoke reasons of ``cn``'s workstation certificates, oldest first ("": valid)."""
    rows = cluster.store_table("certificates")
    return [r["revoke_reason"] for r in rows if r["kind"] == "workstation" and r["subject"] == cn]


def test_a_node_withdraws_the_certificate_it_was_just_given_and_nothing_else(
    cluster: Cluster,
) -> None:
    """Session 43: a certificate the leader signed that the node could not deliver (its crypto
    worker failed after the signing) held the name against the workstation's next try, which
    has a new key. The node now withdraws it (``WithdrawWorkstationCertificate``): revoked
    "never delivered", the name free. Only the node that asked for it, only that certificate
    (named whole): another node cannot, and a PC's working certificate is not touched by a
    withdrawal of the one that superseded it (it stays revoked, as superseded)."""
    node1, node2 = cluster.agents["node1"], cluster.agents["node2"]
    first: list[PC] = []
    assert sign_workstation(cluster, node2, "ws-withdrawn", signed=first)[0] == OK
    pem = pki.cert_to_pem(first[0][0])
    code, details, _ = withdraw_workstation(cluster, node1, pem)  # not node1's to withdraw
    assert code == NOT_FOUND, details
    assert withdraw_workstation(cluster, node2, b"not a certificate")[0] == INVALID_ARGUMENT
    assert revoke_reasons(cluster, "ws-withdrawn") == [""]
    code, details, withdrawn = withdraw_workstation(cluster, node2, pem)
    assert (code, withdrawn) == (OK, True), details
    assert revoke_reasons(cluster, "ws-withdrawn") == ["never delivered"]
    assert withdraw_workstation(cluster, node2, pem)[::2] == (OK, False)  # idempotent
    # The name is free: the workstation's next try (a new key, no proof) is signed.
    second: list[PC] = []
    assert sign_workstation(cluster, node2, "ws-withdrawn", signed=second)[0] == OK
    # The PC enrols again as itself; that certificate is not delivered and is withdrawn: the
    # one it superseded stays revoked, and the PC's next try (its proof of a revoked
    # certificate proves nothing, the name is free) is signed.
    third: list[PC] = []
    code, details = sign_workstation(
        cluster, node2, "ws-withdrawn", previous=second[0], signed=third
    )
    assert code == OK, details
    assert withdraw_workstation(cluster, node2, pki.cert_to_pem(third[0][0]))[::2] == (OK, True)
    assert revoke_reasons(cluster, "ws-withdrawn") == [
        "never delivered",
        "superseded",
        "never delivered",
    ]
    assert sign_workstation(cluster, node2, "ws-withdrawn", previous=second[0])[0] == OK
    audit = [r for r in cluster.store_table("audit") if r["kind"] == "workstation.withdrawn"]
    assert [(r["actor"], r["subject"]) for r in audit] == [("node:node2", "ws-withdrawn")] * 2


def test_the_agent_takes_a_certificate_revoked_already_as_not_withdrawn(cluster: Cluster) -> None:
    """Review s43rev2 Low: the agent's call (``BootstrapHost.withdraw``) said True, "the name
    is free", also when the leader answered ``withdrawn=False`` (revoked already: by the
    admin, or superseded by an enrolment with --replace, which holds the name then). Now it
    says whether the leader withdrew it, so that the 503 says what frees the name. Fails
    before: the second call said True."""
    node2 = cluster.agents["node2"]
    signed: list[PC] = []
    assert sign_workstation(cluster, node2, "ws-withdrawn-twice", signed=signed)[0] == OK
    pem = pki.cert_to_pem(signed[0][0])
    cfg = AgentConfig.load(node2.config_path)
    identity = load_identity(cfg)
    assert identity is not None
    journal: Any = SimpleNamespace(
        bootstrap_failures=lambda: ([], []), removed_from_cluster=lambda: None
    )
    host = BootstrapHost(cfg, identity, journal)

    async def twice() -> tuple[str, str]:
        return await host.withdraw(pem), await host.withdraw(pem)

    assert asyncio.run(twice()) == ("withdrawn", "held")  # (revoked before: "never delivered")
    assert revoke_reasons(cluster, "ws-withdrawn-twice") == ["never delivered"]


def test_a_withdrawal_cannot_take_a_name_from_the_pc_that_holds_it(cluster: Cluster) -> None:
    """A leaked password: another PC's enrolment under a name a PC holds is refused before
    anything is signed, so its node has nothing to withdraw; what the node may withdraw is a
    certificate it was given, and the holder's is not (another node's, here) — the PC's
    certificate stays valid."""
    node1, node2 = cluster.agents["node1"], cluster.agents["node2"]
    held: list[PC] = []
    assert sign_workstation(cluster, node1, "ws-held-pc", signed=held)[0] == OK
    assert sign_workstation(cluster, node2, "ws-held-pc")[0] == ALREADY_EXISTS
    code, _, _ = withdraw_workstation(cluster, node2, pki.cert_to_pem(held[0][0]))
    assert code == NOT_FOUND
    assert revoke_reasons(cluster, "ws-held-pc") == [""]


def _proof_ext(raw: bytes) -> x509.UnrecognizedExtension:
    """A re-enrolment extension holding ``raw`` (JSON or not) as it is."""
    return x509.UnrecognizedExtension(bootstrap_csr.REENROL_OID, bootstrap_csr._der_octets(raw))


def _proof_with(previous_der: bytes) -> x509.UnrecognizedExtension:
    """A re-enrolment extension naming ``previous_der`` as the previous certificate."""
    body = {
        "version": 1,
        "replace": False,
        "previous": base64.b64encode(previous_der).decode(),
        "signature": "AAAA",
    }
    return _proof_ext(json.dumps(body).encode())


def _self_signed(cn: str, extensions: list[x509.ExtensionType]) -> x509.Certificate:
    key = pki.generate_key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256())


def _hostile_proof(case: str, held: x509.Certificate) -> x509.UnrecognizedExtension:
    """Audit s40ws M1: proofs that made the leader fail (INTERNAL) or that the network-JSON
    rule refuses (``bootstrap_csr.loads_strict``); ``held``: the name's certificate."""
    der = held.public_bytes(serialization.Encoding.DER)
    point = held.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    cn = pki.names_of(held).common_name
    if case == "deep json":  # RecursionError in json.loads
        return _proof_ext(b"[" * 3000 + b"]" * 3000)
    if case == "version true":  # True == 1
        return _proof_ext(b'{"version":true,"replace":true}')
    if case == "duplicate key":
        return _proof_ext(b'{"version":1,"replace":false,"replace":true}')
    if case == "nan":
        return _proof_ext(b'{"version":1,"replace":true,"x":NaN}')
    if case == "malformed san":  # ValueError in names_of
        bad_san = x509.UnrecognizedExtension(
            x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x02\x01\x01"
        )
        return _proof_with(_self_signed(cn, [bad_san]).public_bytes(serialization.Encoding.DER))
    if case == "duplicate extension":  # x509.DuplicateExtension in names_of
        twice = _self_signed(
            cn,
            [
                x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
                x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.5"), b"\x05\x00"),
            ],
        ).public_bytes(serialization.Encoding.DER)
        assert twice.count(bytes.fromhex("06032a0305")) == 1
        return _proof_with(twice.replace(bytes.fromhex("06032a0305"), bytes.fromhex("06032a0304")))
    if case == "point off curve":  # ValueError in public_key()
        assert der.count(point) == 1
        return _proof_with(der.replace(point, point[:-1] + bytes([point[-1] ^ 1])))
    if case == "unknown key type":  # UnsupportedAlgorithm in public_key()
        ec_public_key = bytes.fromhex("06072a8648ce3d0201")
        assert der.count(ec_public_key) == 1
        return _proof_with(der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209")))
    raise AssertionError(case)


@pytest.fixture(scope="module")
def hostile_target(cluster: Cluster) -> PC:
    """A name held by a PC at node1, for the hostile proofs to be about."""
    signed: list[PC] = []
    assert sign_workstation(cluster, cluster.agents["node1"], "ws-hostile", signed=signed)[0] == OK
    return signed[0]


@pytest.mark.parametrize(
    "case",
    [
        "deep json",
        "version true",
        "duplicate key",
        "nan",
        "malformed san",
        "duplicate extension",
        "point off curve",
        "unknown key type",
    ],
)
def test_a_hostile_reenrolment_proof_is_refused_as_invalid(
    cluster: Cluster, hostile_target: PC, case: str
) -> None:
    """Audit s40ws M1: the leader answered INTERNAL to a proof it could not parse, and took
    JSON the project's network rule refuses (``{"version": true}``, a key twice, NaN). Now each
    is the CSR's one-line refusal (INVALID_ARGUMENT), and nothing is signed or revoked."""
    before = workstation_rows(cluster, "ws-hostile")
    extension = _hostile_proof(case, hostile_target[0])
    code, details = sign_workstation(
        cluster, cluster.agents["node1"], "ws-hostile", extensions=[extension]
    )
    assert code == INVALID_ARGUMENT, (code, details)
    assert details.startswith("unacceptable workstation CSR: ") and "\n" not in details, details
    assert workstation_rows(cluster, "ws-hostile") == before


def test_a_csr_whose_own_names_cannot_be_read_is_refused_as_invalid(
    cluster: Cluster, hostile_target: PC
) -> None:
    """Audit s40ws M1, the CSR's own parts: a malformed SAN raised ValueError in the leader
    (INTERNAL) before the proof was read. INVALID_ARGUMENT, nothing signed or revoked."""
    before = workstation_rows(cluster, "ws-hostile")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ws-hostile")])
    bad_san = x509.UnrecognizedExtension(
        x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x02\x01\x01"
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .add_extension(bad_san, critical=False)
        .sign(pki.generate_key(), hashes.SHA256())
    )
    code, details = sign_workstation(
        cluster, cluster.agents["node1"], "ws-hostile", csr=pki.csr_to_pem(csr)
    )
    assert code == INVALID_ARGUMENT, (code, details)
    assert details == "unacceptable workstation CSR: malformed CSR", details
    assert workstation_rows(cluster, "ws-hostile") == before


def test_a_node_cannot_mint_workstation_certificates_without_limit(tmp_path: Path) -> None:
    """The cap is leader.toml's ``workstation_certs_per_hour`` (100 by default, session 64):
    set to 30 here, as the fixed cap was."""
    with AdminTokenCluster(tmp_path, next_loopback()) as c:
        c.init()
        c.write_leader_config({"workstation_certs_per_hour": 30})
        c.start_leader()
        agent = c.add_agent("minter", next_loopback())
        codes = [sign_workstation(c, agent, f"ws-pc{i}")[0] for i in range(31)]
        assert codes[:30] == [OK] * 30
        assert codes[30] == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- removal and revocation -------------------------------------------------------------------


def test_removed_node_is_refused_and_its_names_are_free(tmp_path: Path) -> None:
    with AdminTokenCluster(tmp_path, next_loopback()) as c:
        c.init()
        c.start_leader()
        address = next_loopback()
        gone = c.add_agent("gone", address)
        c.wait_for_nodes_online(["gone"])
        creds = node_credentials(gone)
        assert sign_workstation(c, gone, "ws-gone-pc")[0] == OK
        result = c.cli("nodes", "remove", "gone", "--yes")
        assert result.returncode == 0, result.stderr
        assert "revoked 2 certificate(s)" in result.stdout
        assert f"tlsroll token create --node gone --address {address}" in result.stdout
        with c.control_channel(*creds) as channel:
            code, details = status_of(
                lambda: leader_pb2_grpc.LeaderStub(channel).Heartbeat(
                    leader_pb2.HeartbeatRequest(), timeout=10
                )
            )
        assert code == UNAUTHENTICATED and "not an enrolled node" in details
        c.wait_for_nodes([], online=True)
        assert "gone" not in c.list_nodes()
        listed = c.cli("nodes", "--all")
        assert "removed" in listed.stdout
        # The schema shows the removal and what it revoked.
        shown = json.loads(c.cli("schema", "show", "--json").stdout)
        assert [n["name"] for n in shown["removed_nodes"]] == ["gone"]
        revoked = shown["revoked_certificates"]
        assert sorted(r["kind"] for r in revoked) == ["node", "workstation"]
        assert {r["reason"] for r in revoked} == {"node removed"}
        text = c.cli("schema", "show").stdout
        assert "removed node" in text and "revoked certificate" in text
        gone.stop()
        # Its name and address can be given to a new token and enrolled with a new key.
        token = c.create_token("gone", address)
        reply = enrol(c, enrol_request(token, "gone", address))
        assert pki.names_of(pki.load_cert_pem(reply.certificate_pem)).ips == (address,)


def test_revoked_leader_certificate_is_refused_by_agents(cluster: Cluster) -> None:
    """A second certificate with the leader's identity (as after a key compromise): once the CA
    revokes it, agents refuse it within a heartbeat or two."""
    ca = the_ca(cluster)
    key = pki.generate_key()
    td = spiffe.trust_domain(ca.cert)
    cert = ca.issue(
        key.public_key(),
        pki.Names.of("tlsroll-leader", [cluster.address]),
        client=True,
        identity=spiffe.leader(td),
    )
    agent = cluster.agents["node1"]

    def get_status() -> tuple[grpc.StatusCode, str]:
        with secure_channel(
            agent.target,
            cluster.ca_pem,
            pki.cert_to_pem(cert),
            pki.key_to_pem(key),
            name=agent.tls_name,
        ) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            return status_of(lambda: stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10))

    assert get_status()[0] == OK
    result = cluster.cli("ca", "revoke", "--unknown", f"{cert.serial_number:x}")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: get_status()[0] == UNAUTHENTICATED, 15, "agent refuses the revoked cert")
    assert "revoked" in get_status()[1]


def test_a_leader_identity_beside_another_uri_is_refused_by_agents(cluster: Cluster) -> None:
    """The agent's check reads the caller's URI names from gRPC's auth context (issue 15: no
    X.509 parsing per call) and must stay as strict as ``spiffe.of``: a certificate of the CA
    carrying the leader's URI *and* another is no leader's, nor is one whose only URI is the
    leader's of another trust domain. The real leader's own certificate still passes."""
    ca = the_ca(cluster)
    td = spiffe.trust_domain(ca.cert)
    key = pki.generate_key()
    other = spiffe.leader("tlsroll-0123456789abcdef")

    def issued(*uris: str) -> bytes:
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(cluster.address))]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlsroll-leader")]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(pki.utcnow() - dt.timedelta(hours=1))
            .not_valid_after(pki.utcnow() + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca.key, hashes.SHA256())
        )
        return pki.cert_to_pem(cert)

    agent = cluster.agents["node1"]

    def get_status(chain: bytes, key_pem: bytes) -> grpc.StatusCode:
        with secure_channel(
            agent.target, cluster.ca_pem, chain, key_pem, name=agent.tls_name
        ) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            return status_of(lambda: stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10))[0]

    key_pem = pki.key_to_pem(key)
    leader_uri = spiffe.leader(td).uri
    assert get_status(issued(leader_uri), key_pem) == OK  # the shape the leader's has
    node_uri = spiffe.node(td, "node1").uri
    assert get_status(issued(leader_uri, node_uri), key_pem) == PERMISSION_DENIED
    assert get_status(issued(node_uri, leader_uri), key_pem) == PERMISSION_DENIED
    assert get_status(issued(other.uri), key_pem) == PERMISSION_DENIED
    assert get_status(issued(), key_pem) == PERMISSION_DENIED
    assert get_status(*cluster.leader_credentials()) == OK


# --- epochs -----------------------------------------------------------------------------------


def preflight(cluster: Cluster, agent: Agent, epoch: int) -> tuple[grpc.StatusCode, str]:
    chain, key = cluster.leader_credentials()
    with secure_channel(agent.target, cluster.ca_pem, chain, key, name=agent.tls_name) as channel:
        stub = agent_pb2_grpc.NodeAgentStub(channel)
        return status_of(
            lambda: stub.Preflight(
                agent_pb2.PreflightRequest(
                    command=agent_pb2.Command(rollout_id="probe", epoch=epoch)
                ),
                timeout=10,
            )
        )


def test_an_epoch_no_leader_asked_for_is_refused(cluster: Cluster) -> None:
    """The audit's Freeze(epoch=1000) with the leader's own certificate: refused, and the
    node's highest epoch stays where it was, so later rollouts are not locked out."""
    agent = cluster.agents["node2"]
    code, details = preflight(cluster, agent, 1000)
    assert code == PERMISSION_DENIED and "never announced" in details, details
    status = cluster.cli("epoch", "show", "--json")
    assert status.returncode == 0, status.stdout  # the node was not pushed ahead
    (mine,) = [n for n in json.loads(status.stdout)["nodes"] if n["name"] == "node2"]
    assert int(mine.get("highest_epoch", 0)) < 1000


def test_a_restored_leader_advances_past_what_nodes_have_seen(tmp_path: Path) -> None:
    """A node has seen epoch 50 (as from a leader state newer than the restored backup): the
    leader shows it is behind, and `tlsroll epoch advance` moves it past."""
    with AdminTokenCluster(tmp_path, next_loopback()) as c:
        c.init()
        c.start_leader()
        agent = c.add_agent("ahead", next_loopback())
        c.wait_for_nodes_online(["ahead"])
        agent.stop()
        db = sqlite3.connect(agent.data_dir / "journal.sqlite3")
        with db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', '50')"
                " ON CONFLICT(key) DO UPDATE SET value = '50'"
            )
        db.close()
        agent.start()

        def behind() -> bool:
            shown = c.cli("epoch", "show", "--json")
            return shown.returncode == 1 and json.loads(shown.stdout)["behind"] is True

        wait_until(behind, 15, "epoch show reports the node ahead", interval=0.5)  # a CLI run each
        code, details = preflight(c, agent, 3)  # what the leader would use next
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch" in details
        advanced = c.cli("epoch", "advance", "--yes")
        assert advanced.returncode == 0, advanced.stderr
        assert "leader epoch 50" in advanced.stdout
        shown = c.cli("epoch", "show")
        assert shown.returncode == 0, shown.stderr
        code, details = preflight(c, agent, 51)  # not yet given out: refused
        assert code == PERMISSION_DENIED
        code, details = preflight(c, agent, 50)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no managed server" in details
        audit = c.store_table("audit")
        assert any(a["kind"] == "epoch.advanced" for a in audit)


# --- what a peer says is cleaned ---------------------------------------------------------------


def test_escape_sequences_from_an_agent_never_reach_the_terminal(cluster: Cluster) -> None:
    """A heartbeat whose version carries terminal escapes: `tlsroll nodes` shows it cleaned,
    and it is stored cleaned. node1's own agent keeps beating meanwhile (its next message
    replaces a version not yet shown or stored: the newest heartbeat wins), so the hostile
    one is sent again until it is seen, at most 10 times: the checks look at the hostile
    version itself, never at the agent's own."""
    hostile = "1.0\x1b[31mRED\x1b]0;pwned\x07" + "x" * 500

    def send() -> None:
        with cluster.control_channel(*node_credentials(cluster.agents["node1"])) as channel:
            leader_pb2_grpc.LeaderStub(channel).Heartbeat(
                leader_pb2.HeartbeatRequest(agent_version=hostile), timeout=10
            )

    def stored() -> str:
        (row,) = [r for r in cluster.store_table("nodes") if r["name"] == "node1"]
        return str(row["agent_version"])

    for _ in range(10):
        send()
        listed = cluster.cli("nodes")
        assert listed.returncode == 0
        if "RED" in listed.stdout:
            break
    assert "RED" in listed.stdout
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout

    # Stored with the heartbeats' next group commit (a second: ``service.BATCH_SECONDS``).
    for _ in range(10):
        send()
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: "RED" in stored(), 3, "the hostile version stored")
            break
    assert "RED" in stored()
    assert "\x1b" not in stored() and "\x07" not in stored() and len(stored()) <= 64


async def test_a_signing_refused_as_removed_closes_the_bootstrap_service_at_once(
    cluster: Cluster, tmp_path: Path, issue_cert: Any, test_ca: pki.CertificateAuthority
) -> None:
    """Bootstrap review s68 L5: a node the admin removed learnt it only from its heartbeats:
    until its next refused heartbeat its bootstrap service still checked workstation passwords
    (a guess oracle), and the right one got a 502 "the CA did not sign; try later", which
    never works. The leader's refusal of the node in the signing (``BootstrapHost.sign``) is
    now taken as a removal too: that finish, and every start after it, is a 503
    ``node_removed``; the refusal is kept in the agent's journal and told to the link (whose
    next answered heartbeat takes it back). Here the real leader daemon refuses the agent's
    real identity; the agent's bootstrap part runs in this process, its link not at all (no
    heartbeat can say it first)."""
    import aiohttp

    from nodeagent.journal import Journal
    from tests.test_bootstrap import FakeClock, Node, make_service

    gone = cluster.add_agent("node-gone-sign", next_loopback())
    cluster.wait_for_nodes_online(["node-gone-sign"])
    gone.stop()  # its heartbeats stop: only the signing can tell it
    removed = cluster.cli("nodes", "remove", "node-gone-sign", "--yes")
    assert removed.returncode == 0, removed.stderr
    cfg = AgentConfig.load(gone.config_path)
    identity = load_identity(cfg)
    assert identity is not None
    journal = Journal(tmp_path / "journal.sqlite3")
    told: list[str] = []
    try:
        host = BootstrapHost(cfg, identity, journal)
        host.on_signing_removed = told.append
        address = next_loopback()
        service = make_service(issue_cert(address, "node-gone-sign"), address, test_ca)
        service.sign = host.sign
        host.service = service  # as ``sync`` sets it
        async with service, aiohttp.ClientSession() as session:
            node = Node(service, FakeClock(), test_ca.cert_pem)
            first = await node.exchange(session)  # the right password: the leader refuses
            assert (first.status, first.error) == (503, "node_removed"), first.body
            again = await node.exchange(session)  # refused at its start now
            assert (again.status, again.error, again.keys) == (503, "node_removed", None)
        assert host.removed is not None and "not an enrolled node" in host.removed
        assert told == [host.removed]
        await asyncio.gather(*host._saving)  # (the journal's write, as the link's would)
        assert journal.removed_from_cluster() == host.removed
        await host.close()
    finally:
        journal.close()
