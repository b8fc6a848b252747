"""Review s67 L4: the CA signed an RSA key of any size above 2048 bits. A 16384-bit key in an
agent's enrolment or renewal CSR (or a rollout's staged key) was signed, and every TLS peer
that verifies with it pays for it at each handshake. Now RSA of 2048 to 4096 bits only
(``pki.MAX_RSA_BITS``, what the public CAs take), refused in one line with nothing signed and
the token unspent. A real leader, real mutual TLS, a real store; the workstation's CSR
(ECDSA P-256 only, through a node's bootstrap service) and a rollout's staged CSR
(``CertificateAuthority.sign_csr``) by their checks.

(4608 bits stands for "too large": a 16384-bit key takes minutes to make.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.cluster import AdminTokenCluster, Cluster, csr_pem, enrol, enrol_request
from tests.conftest import next_loopback
from tlsroll import bootstrap_csr, pki
from tlsroll.bootstrap_base import BootstrapError
from tlsroll.errors import PKIError, PKIReason
from tlsroll.v1 import admin_pb2, leader_pb2, leader_pb2_grpc

pytestmark = pytest.mark.timeout(180)

TOO_LARGE = 4608


@pytest.fixture(scope="module")
def big() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=TOO_LARGE)


@pytest.fixture(scope="module")
def largest() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=pki.MAX_RSA_BITS)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def _uses_left(cluster: Cluster, token: str) -> int:
    token_id = token.split(".", maxsplit=1)[0]
    with cluster.admin() as admin:
        reply = admin.ListTokens(admin_pb2.ListTokensRequest(), timeout=10)
    (info,) = [t for t in reply.tokens if t.id == token_id]
    return int(info.uses_left)


def _one_line(info: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    said = info.value.details() or ""
    assert "\n" not in said and "Traceback" not in said, said
    assert f"RSA {TOO_LARGE} bits" in said and "RSA of 2048 to 4096 bits" in said, said
    return said


def test_check_csr_refuses_rsa_above_4096_bits_and_takes_4096(
    big: rsa.RSAPrivateKey, largest: rsa.RSAPrivateKey
) -> None:
    names = pki.Names.of("node1", ["127.0.0.7"])
    with pytest.raises(PKIError) as info:
        pki.check_csr(pki.load_csr_pem(csr_pem(big, "node1", ["127.0.0.7"])), names)
    assert info.value.reason == PKIReason.KEY_TYPE
    assert pki.key_kind_problem(big.public_key()) == f"RSA {TOO_LARGE} bits"
    taken = pki.check_csr(pki.load_csr_pem(csr_pem(largest, "node1", ["127.0.0.7"])), names)
    assert isinstance(taken, rsa.RSAPublicKey) and taken.key_size == pki.MAX_RSA_BITS


def test_a_rollout_s_staged_csr_of_a_too_large_key_is_not_signed(big: rsa.RSAPrivateKey) -> None:
    """``leader.changes.server_certificate`` signs a node's staged CSR by ``sign_csr``."""
    ca = pki.CertificateAuthority.create("unit CA")
    names = pki.Names.of("node1", ["127.0.0.7"])
    with pytest.raises(PKIError) as info:
        ca.sign_csr(pki.load_csr_pem(csr_pem(big, "node1", ["127.0.0.7"])), names)
    assert info.value.reason == PKIReason.KEY_TYPE


def test_a_workstation_csr_of_rsa_is_refused(big: rsa.RSAPrivateKey) -> None:
    """(Refused before this change too: a workstation's key is ECDSA P-256 only.)"""
    with pytest.raises(BootstrapError) as info:
        bootstrap_csr.check_workstation_csr(csr_pem(big, "ws-front", [], ["ws-front"]))
    assert "ECDSA P-256" in str(info.value)


def test_an_enrolment_csr_of_a_too_large_rsa_key_is_refused_and_spends_nothing(
    cluster: Cluster, big: rsa.RSAPrivateKey, largest: rsa.RSAPrivateKey
) -> None:
    address = next_loopback()
    token = cluster.create_token("big", address)
    before = cluster.store_table("certificates")
    with pytest.raises(grpc.RpcError) as info:
        enrol(cluster, enrol_request(token, "big", address, key=big))
    _one_line(info)
    assert _uses_left(cluster, token) == 1
    assert cluster.store_table("certificates") == before
    assert [n["name"] for n in cluster.store_table("nodes")] == []
    # The same token enrols a key of 4096 bits: the bound is not below it.
    reply = enrol(cluster, enrol_request(token, "big", address, key=largest))
    assert pki.spki_pin(pki.load_cert_pem(reply.certificate_pem)) == pki.spki_pin(
        largest.public_key()
    )


def test_a_renewal_csr_of_a_too_large_rsa_key_is_refused(
    cluster: Cluster, big: rsa.RSAPrivateKey
) -> None:
    address = next_loopback()
    key = pki.generate_key()
    reply = enrol(
        cluster, enrol_request(cluster.create_token("n1", address), "n1", address, key=key)
    )
    before = (cluster.store_table("nodes"), cluster.store_table("certificates"))
    with cluster.control_channel(reply.certificate_pem, pki.key_to_pem(key)) as channel:
        stub = leader_pb2_grpc.LeaderStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.RenewNodeCertificate(
                leader_pb2.RenewNodeCertificateRequest(csr_pem=csr_pem(big, "n1", [address])),
                timeout=10,
            )
        _one_line(info)
        assert (cluster.store_table("nodes"), cluster.store_table("certificates")) == before
        # A key of a kind the CA signs renews on the same connection.
        renewed = stub.RenewNodeCertificate(
            leader_pb2.RenewNodeCertificateRequest(
                csr_pem=csr_pem(pki.generate_key(), "n1", [address])
            ),
            timeout=10,
        )
    assert renewed.certificate_pem
