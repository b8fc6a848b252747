"""Review rev58b H2: the agents' and the leader's certificates were server certificates for the
node's address under the CA every workstation trusts (the address in their SAN), and no
workstation reads the revocation list. A copy of an agent's key, or a join token that leaked
before it was used (enrolment gave such a certificate), let its holder pose as that node's
practice server to every PC from a position on the path, even after ``nodes remove``.

Now the node's names are kept apart from the SAN (``pki.NAMES_OID``): a TLS client takes the
certificate as serving only the cluster's internal names under ``.invalid``, by which the
leader dials agents and agents dial the leader. A real cluster (leader, agents and reference
servers as processes); the workstation's side is Python's ``ssl`` (OpenSSL) checking a
handshake against the cluster CA, as a practice PC's client does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from leader.layout import read_passphrase
from tests.cluster import csr_pem, enrol, enrol_request
from tests.conftest import next_loopback
from tests.leader_rig import leader_with_a_node
from tests.nodeside import cluster_of
from tests.test_httpcheck import NOTHING, tiny_server
from tlsroll import pki, spiffe
from tlsroll.errors import PKIError
from tlsroll.v1 import leader_pb2, leader_pb2_grpc

pytestmark = pytest.mark.timeout(240)


@contextlib.contextmanager
def serving(chain: Path, key: Path, address: str) -> Iterator[int]:
    """A TLS server on ``address`` (a free port) presenting ``chain`` with ``key``, one
    handshake at a time, until the block ends; its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    with tiny_server(address, NOTHING, context) as port:
        yield port


def handshake(ca_file: Path, address: str, port: int, name: str) -> str:
    """A workstation's handshake with the server at ``address:port`` for ``name`` (the host it
    dialed), trusting the cluster CA alone: "ok", or what its certificate check said."""
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with (
            socket.create_connection((address, port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=name),
        ):
            return "ok"
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message)


def test_no_agent_or_leader_certificate_serves_a_node_s_address(tmp_path: Path) -> None:
    with cluster_of(tmp_path, 2) as (cluster, (node1, node2)):
        ca_file = cluster.ca_cert_path
        td = spiffe.trust_domain(pki.read_cert(ca_file))
        # node1 is on the leader's own address: the leader's certificate, and each agent's.
        held = [
            (cluster.tls_cert_path, cluster.tls_key_path, node1.address, spiffe.leader_host(td)),
        ] + [
            (n.agent.cert_file, n.agent.key_file, n.address, n.agent.tls_name)
            for n in (node1, node2)
            if n.agent is not None
        ]
        assert len(held) == 3
        for chain, key, address, internal in held:
            # Presented where the node's practice server is dialed: refused by its address.
            with serving(chain, key, address) as port:
                said = handshake(ca_file, address, port, address)
                assert "mismatch" in said, (chain, said)
                # The same handshake by the name the cluster dials it by passes: the chain is
                # trusted; only the node's address is not the certificate's.
                assert handshake(ca_file, address, port, internal) == "ok", chain
            # The names are still in it, apart, for the agent's start check and a relearning.
            cert = pki.load_certs_pem(chain.read_bytes())[0]
            assert pki.serves_names(cert) == [], chain
            assert pki.names_of(cert).ips == (address,), chain
        # Each daemon runs on them: the agents are online (the leader dials them by their
        # internal names; they dial the leader by its own).
        nodes = cluster.list_nodes()
        assert all(nodes[n].online for n in ("node1", "node2")), nodes


def test_a_join_token_gives_no_server_certificate_and_an_older_agent_is_told_to_upgrade(
    tmp_path: Path,
) -> None:
    with cluster_of(tmp_path, 1) as (cluster, _nodes):
        address = next_loopback()
        token = cluster.create_token("node7", address)
        before = cluster.store_table("tokens")
        key = pki.generate_key()
        older = enrol_request(token, "node7", address, key=key)
        older.names_apart = False  # an agent of an earlier release does not send it
        with pytest.raises(grpc.RpcError) as info:
            enrol(cluster, older)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        said = str(info.value.details())
        assert "older than this leader" in said and "\n" not in said, said
        assert said.endswith("(this refusal did not use the token)"), said
        assert cluster.store_table("tokens") == before  # the token stays as it was
        # The token is not looked at: an unknown one is refused the same way, and the leader
        # does not call it valid (it said "the token stays valid" of any token).
        stranger = enrol_request(f"zzzzzz.{'a' * 26}", "node7", address)  # no such token
        stranger.names_apart = False
        with pytest.raises(grpc.RpcError) as info:
            enrol(cluster, stranger)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "valid" not in str(info.value.details()), info.value.details()
        # The token's holder, however it asks, gets a certificate serving no name of the node.
        reply = enrol(cluster, enrol_request(token, "node7", address, key=key))
        cert = pki.load_cert_pem(reply.certificate_pem)
        assert pki.serves_names(cert) == []
        assert pki.names_of(cert) == pki.Names.of("node7", [address])
        assert spiffe.of(cert) == spiffe.node(
            spiffe.trust_domain(pki.read_cert(cluster.ca_cert_path)), "node7"
        )


def test_a_renewal_never_puts_the_node_s_names_back_into_the_san(tmp_path: Path) -> None:
    """A copy of an agent's key renewing without ``names_apart`` (as an earlier release does)
    gets its names apart all the same: what the presented certificate had."""
    with cluster_of(tmp_path, 2) as (cluster, (_node1, node2)):
        agent = node2.agent
        assert agent is not None
        new_key = pki.generate_key()
        with cluster.control_channel(
            agent.cert_file.read_bytes(), agent.key_file.read_bytes()
        ) as channel:
            reply = leader_pb2_grpc.LeaderStub(channel).RenewNodeCertificate(
                leader_pb2.RenewNodeCertificateRequest(
                    csr_pem=csr_pem(new_key, "node2", [node2.address])
                ),
                timeout=10,
            )
        cert = pki.load_cert_pem(reply.certificate_pem)
        assert pki.serves_names(cert) == []
        assert pki.names_of(cert) == pki.Names.of("node2", [node2.address])


async def test_an_agent_of_an_earlier_release_renews_as_it_can_take_it(tmp_path: Path) -> None:
    """An agent of an earlier release holds a certificate with the node's names in its SAN
    and checks a renewal for them there: its renewals keep them there until it asks for them
    apart (this release's agent does), and from then on they stay apart. The leader's real
    service and store in this process, real mutual TLS on a loopback port."""
    node_address = next_loopback()
    rig = leader_with_a_node(tmp_path, next_loopback(), node_address)
    await rig.server.start()
    try:
        key_pem, cert_pem, ca_pem = rig.node_files
        assert pki.serves_names(pki.load_cert_pem(cert_pem)) == [f"IP:{node_address}"]
        td = rig.state.trust_domain
        options = [("grpc.ssl_target_name_override", spiffe.leader_host(td))]

        async def renew(key_pem: bytes, cert_pem: bytes, apart: bool) -> tuple[bytes, bytes]:
            creds = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
            new_key = pki.generate_key()
            async with grpc.aio.secure_channel(rig.target, creds, options=options) as channel:
                reply = await leader_pb2_grpc.LeaderStub(channel).RenewNodeCertificate(
                    leader_pb2.RenewNodeCertificateRequest(
                        csr_pem=csr_pem(new_key, "hb1", [node_address]), names_apart=apart
                    ),
                    timeout=10,
                )
            rig.clock[0] += dt.timedelta(seconds=1)
            return pki.key_to_pem(new_key), bytes(reply.certificate_pem)

        key_pem, cert_pem = await renew(key_pem, cert_pem, apart=False)
        assert pki.serves_names(pki.load_cert_pem(cert_pem)) == [f"IP:{node_address}"]
        older = (key_pem, cert_pem)  # a copy of it, say
        key_pem, cert_pem = await renew(key_pem, cert_pem, apart=True)  # the upgraded agent
        assert pki.serves_names(pki.load_cert_pem(cert_pem)) == []
        # The copy of the older certificate (still accepted: the agent has not used its new
        # one yet) renews as an earlier release would: apart all the same, as the node's
        # certificates are from now on (review s59 M1: it got the node's address back).
        copy_key, copy_cert = await renew(*older, apart=False)
        assert pki.serves_names(pki.load_cert_pem(copy_cert)) == []
        key_pem, cert_pem = await renew(copy_key, copy_cert, apart=False)
        cert = pki.load_cert_pem(cert_pem)
        assert pki.serves_names(cert) == []
        assert pki.names_of(cert) == pki.Names.of("hb1", [node_address])
    finally:
        await rig.close()


def test_the_names_extension_holds_every_kind_of_name_and_nothing_else_is_read() -> None:
    ca = pki.CertificateAuthority.create()
    key = pki.generate_key()
    names = pki.Names.of("node1", ["127.0.1.1", "fd00::7"], ["praxis.example", "*.x.example"])
    cert = ca.issue(
        key.public_key(), names, client=True, internal_dns=["k1.node.t.invalid"], names_apart=True
    )
    assert pki.names_of(cert) == names
    assert pki.serves_names(cert) == []  # (its .invalid name is the cluster's own)
    with pytest.raises(ValueError, match="internal name"):
        ca.issue(key.public_key(), names, names_apart=True)
    # An extension not as ``issue`` writes it (no certificate of the cluster CA): one line of
    # why from ``names_apart``; ``names_of`` reads the SAN's names instead, which a party's
    # check of its names refuses.
    for bad in (b"", b"\x30\x03\x87\x01\x01", b"\x30\x05\x82\x03abcX", b"\x30\x81\x05\x82\x03abc"):
        forged = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node1")]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
            .not_valid_after(dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
            .add_extension(x509.UnrecognizedExtension(pki.NAMES_OID, bad), critical=False)
            .sign(ca.key, hashes.SHA256())
        )
        with pytest.raises(PKIError, match="names extension is malformed") as info:
            pki.names_apart(forged)
        assert "\n" not in str(info.value)
        assert pki.names_of(forged) == pki.Names.of("node1")


def test_a_leader_certificate_of_an_earlier_release_is_issued_again_for_a_new_key(
    tmp_path: Path,
) -> None:
    """A leader.pem naming the leader's address in its SAN (an earlier release's) was served to
    anyone at the join and control ports, and its key is in every backup: at the start it is
    issued again with the names apart, for a new key (review s59 L1), and the agents go on."""
    with cluster_of(tmp_path, 2) as (cluster, _nodes):
        cluster.stop_leader()
        ca = pki.CertificateAuthority.load(
            cluster.ca_cert_path,
            cluster.ca_key_path,
            read_passphrase(cluster.passphrase_path),
        )
        old_key = pki.read_key(cluster.tls_key_path)
        td = ca.trust_domain
        older = ca.issue(  # as write_leader_cert issued it before
            old_key.public_key(),
            pki.Names.of("tlsroll-leader", [cluster.address]),
            client=True,
            identity=spiffe.leader(td),
            internal_dns=[spiffe.leader_host(td)],
        )
        cluster.tls_cert_path.write_bytes(pki.cert_to_pem(older) + ca.cert_pem)
        cluster.start_leader()
        chain = pki.load_certs_pem(cluster.tls_cert_path.read_bytes())
        assert pki.serves_names(chain[0]) == []
        assert pki.names_of(chain[0]).ips == (cluster.address,)
        new_key = pki.read_key(cluster.tls_key_path)
        assert pki.spki_pin(new_key.public_key()) != pki.spki_pin(old_key.public_key())
        assert pki.key_matches(chain[0], new_key)
        assert stat.S_IMODE(cluster.tls_key_path.stat().st_mode) == 0o600
        said = [
            e
            for e in cluster.leader.log_events()
            if e.get("event") == "leader.certificate_reissued_names_apart"
        ]
        assert len(said) == 1 and said[0]["replaced_fingerprint"] == pki.fingerprint(older)
        cluster.wait_for_nodes_online(["node1", "node2"])
        assert cluster.find_secrets(cluster.logs_text()) == []
