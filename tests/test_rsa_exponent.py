"""Session 68: an RSA public exponent was not checked. A CSR (an agent's enrolment or renewal,
a rollout's staged key) or a brought certificate's key (``--cert-dir``) with e=3 was taken, and
a CSR with an even e ended in ``cryptography``'s ValueError rather than a refusal. Now 65537
only (``pki.RSA_EXPONENT``), refused in one line naming the exponent, nothing signed and the
token unspent. A real leader, real mutual TLS, a real store for the enrolment."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from leader import byo
from tests.byo_certs import NOW, key_pem, leaf, make_ca, pem
from tests.cluster import AdminTokenCluster, Cluster, csr_pem, enrol, enrol_request
from tests.conftest import next_loopback
from tests.test_key_size import _uses_left
from tlsroll import pki
from tlsroll.errors import PKIError, PKIReason

pytestmark = pytest.mark.timeout(180)

IP = "127.0.0.7"
NAMES = pki.Names.of("node1", [IP])


@pytest.fixture(scope="module")
def e3() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=3, key_size=2048)


@pytest.fixture(scope="module")
def e65537() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _even_exponent_csr(key: rsa.RSAPrivateKey) -> bytes:
    """``key``'s CSR with its exponent 65537 made 65538 in the DER (no key has it: its
    signature cannot verify, and ``cryptography`` refuses the key as it checks it)."""
    der = x509.load_pem_x509_csr(csr_pem(key, "node1", [IP])).public_bytes(
        serialization.Encoding.DER
    )
    exponent = b"\x02\x03\x01\x00\x01"
    assert der.count(exponent) == 1
    der = der.replace(exponent, b"\x02\x03\x01\x00\x02")
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def test_check_csr_refuses_exponent_3_and_takes_65537(
    e3: rsa.RSAPrivateKey, e65537: rsa.RSAPrivateKey
) -> None:
    assert pki.key_kind_problem(e3.public_key()) == "RSA exponent 3"
    with pytest.raises(PKIError) as info:
        pki.check_csr(pki.load_csr_pem(csr_pem(e3, "node1", [IP])), NAMES)
    assert info.value.reason == PKIReason.KEY_TYPE
    assert "RSA exponent 3" in str(info.value) and "exponent 65537" in str(info.value)
    assert pki.key_kind_problem(e65537.public_key()) is None
    taken = pki.check_csr(pki.load_csr_pem(csr_pem(e65537, "node1", [IP])), NAMES)
    assert isinstance(taken, rsa.RSAPublicKey)


def test_a_rollout_s_staged_csr_with_exponent_3_is_not_signed(e3: rsa.RSAPrivateKey) -> None:
    """``leader.changes.server_certificate`` signs a node's staged CSR by ``sign_csr``."""
    ca = pki.CertificateAuthority.create("unit CA")
    with pytest.raises(PKIError) as info:
        ca.sign_csr(pki.load_csr_pem(csr_pem(e3, "node1", [IP])), NAMES)
    assert info.value.reason == PKIReason.KEY_TYPE


def test_a_csr_with_an_even_exponent_is_a_pki_refusal(e65537: rsa.RSAPrivateKey) -> None:
    with pytest.raises(PKIError) as info:
        pki.load_csr_pem(_even_exponent_csr(e65537))
    assert info.value.reason == PKIReason.KEY_TYPE
    assert "\n" not in str(info.value)


def _even_exponent_pem(cert: x509.Certificate) -> bytes:
    """``cert`` with its key's exponent 65537 made 65538 in the DER (its signature no longer
    verifies: what a file damaged or made so holds)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    assert der.count(b"\x02\x03\x01\x00\x01") == 1
    der = der.replace(b"\x02\x03\x01\x00\x01", b"\x02\x03\x01\x00\x02")
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


def _brought(ca_pem: bytes, chain: bytes, key: object) -> list[str]:
    names = pki.Names.of("node1", ["127.0.0.9"])
    material = byo.Material(ca_pem, {"node1": byo.NodeMaterial("node1", chain, key_pem(key))})
    problems = byo.validate(
        material, {"node1": byo.Expected(names, "")}, now=NOW, horizon=dt.timedelta(days=30)
    )
    return [str(p) for p in problems]


def test_a_brought_certificate_or_ca_with_an_even_exponent_is_a_problem_not_a_traceback(
    e65537: rsa.RSAPrivateKey,
) -> None:
    ca = make_ca()
    cert, key = leaf(ca, ["127.0.0.9"], key=e65537)
    assert _brought(ca.pem, _even_exponent_pem(cert), key) == [
        "node1: node1.crt: it has a public key that is not a valid key (an RSA exponent must be "
        "odd); reissue it"
    ]
    rsa_ca = make_ca(key=e65537)
    cert, key = leaf(rsa_ca, ["127.0.0.9"])
    problems = _brought(_even_exponent_pem(rsa_ca.cert), pem(cert), key)
    assert problems == [
        "ca: ca.crt: CN=Praxis CA,O=Praxis Dr. Beispiel has a public key that is not a valid key"
        " (an RSA exponent must be odd); put the practice CA's certificate (PEM) in DIR/ca.crt"
    ]


def test_a_brought_certificate_with_exponent_3_is_refused(e3: rsa.RSAPrivateKey) -> None:
    ca = make_ca()
    names = pki.Names.of("node1", ["127.0.0.9"])
    cert, key = leaf(ca, ["127.0.0.9"], key=e3)
    material = byo.Material(ca.pem, {"node1": byo.NodeMaterial("node1", pem(cert), key_pem(key))})
    problems = [
        str(p)
        for p in byo.validate(
            material, {"node1": byo.Expected(names, "")}, now=NOW, horizon=dt.timedelta(days=30)
        )
    ]
    assert problems == [
        "node1: node1.crt: has an RSA key of exponent 3 (only 65537); reissue it with a "
        "stronger key"
    ]


def test_a_practice_ca_or_intermediate_with_exponent_3_is_refused(
    e3: rsa.RSAPrivateKey, e65537: rsa.RSAPrivateKey
) -> None:
    """Session 70 (session 68 left it): the RSA exponent of the practice CA's own certificate
    (``ca.crt``) and of an intermediate (after the node's certificate) was not checked: e=3
    there passed, as it no longer does for a leaf. Refused by the leaves' rule, one line each;
    65537 passes. (An even one is ``UNUSABLE_KEY``: the test above.)"""
    low_ca = make_ca(key=e3)
    cert, key = leaf(low_ca, ["127.0.0.9"])
    assert _brought(low_ca.pem, pem(cert), key) == [
        "ca: ca.crt: CN=Praxis CA,O=Praxis Dr. Beispiel has an RSA key of exponent 3 (only"
        " 65537); make the CA a new key of exponent 65537 and issue its certificates again"
    ]
    root = make_ca()
    low = make_ca("Praxis Sub CA", parent=root, key=e3, path_length=0)
    cert, key = leaf(low, ["127.0.0.9"])
    assert _brought(root.pem, pem(cert) + low.pem, key) == [
        "node1: node1.crt: the intermediate CN=Praxis Sub CA,O=Praxis Dr. Beispiel has an RSA"
        " key of exponent 3 (only 65537); make the intermediate CA a new key of exponent 65537"
        " and reissue it"
    ]
    # In ca.crt beside the root, the intermediate is the CA file's problem.
    problems = _brought(root.pem + low.pem, pem(cert), key)
    assert problems == [
        "ca: ca.crt: CN=Praxis Sub CA,O=Praxis Dr. Beispiel has an RSA key of exponent 3 (only"
        " 65537); make the CA a new key of exponent 65537 and issue its certificates again"
    ], problems
    # 65537 at every level: taken.
    good_root = make_ca(key=e65537)
    good = make_ca("Praxis Sub CA", parent=good_root, key=e65537, path_length=0)
    cert, key = leaf(good, ["127.0.0.9"])
    assert _brought(good_root.pem, pem(cert) + good.pem, key) == []


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def test_an_enrolment_csr_with_exponent_3_or_an_even_one_is_refused_and_spends_nothing(
    cluster: Cluster, e3: rsa.RSAPrivateKey, e65537: rsa.RSAPrivateKey
) -> None:
    address = next_loopback()
    token = cluster.create_token("small", address)
    before = cluster.store_table("certificates")
    for csr, said in (
        (csr_pem(e3, "small", [address]), "RSA exponent 3"),
        (_even_exponent_csr(e65537), "not a valid key"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            enrol(cluster, enrol_request(token, "small", address, csr=csr))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        details = info.value.details() or ""
        assert said in details and "\n" not in details and "Traceback" not in details, details
        assert _uses_left(cluster, token) == 1
        assert cluster.store_table("certificates") == before
        assert cluster.store_table("nodes") == []
    # The same token enrols a key of exponent 65537.
    reply = enrol(cluster, enrol_request(token, "small", address, key=e65537))
    assert pki.spki_pin(pki.load_cert_pem(reply.certificate_pem)) == pki.spki_pin(
        e65537.public_key()
    )
