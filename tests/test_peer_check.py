"""What the agent reads of a caller's certificate on every leader call without parsing X.509
(issue 15: ``cryptography`` cost every agent about 10 MiB for months): the serial number for
the revocation check (``tlsroll.rpc.serial_of``) and the trust domain from the pinned CA's pin
(``spiffe.trust_domain_of_pin``). Each must give exactly what ``cryptography`` gives; the
agent-level refusals (other roles, several URIs, revoked) are in test_identity and
test_caller_matrix.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsroll import pki, spiffe
from tlsroll.rpc import serial_of

KEY = pki.generate_key()
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlsroll-leader")])
NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def certificate(serial: int, *, version: x509.Version = x509.Version.v3, uris: int = 1) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    if uris:
        san = [x509.UniformResourceIdentifier(f"spiffe://tlsroll-x/node/n{i}") for i in range(uris)]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(KEY, hashes.SHA256())
    if version is x509.Version.v1:  # cryptography builds v3 only
        return _strip_version(cert)
    return pki.cert_to_pem(cert)


def _strip_version(cert: x509.Certificate) -> bytes:
    """The same certificate as v1 (no [0] version), re-signed; extensions must be absent."""
    tbs = cert.tbs_certificate_bytes
    hdr = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)
    body = tbs[hdr:]
    assert body[0] == 0xA0
    body = body[2 + body[1] :]
    new_tbs = _tlv(0x30, body)
    signature = KEY.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    alg = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))  # ecdsa-with-SHA256
    der = _tlv(0x30, new_tbs + alg + _tlv(0x03, b"\x00" + signature))
    loaded = x509.load_der_x509_certificate(der)
    assert loaded.version is x509.Version.v1
    return pki.cert_to_pem(loaded)


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=(1 << 159) - 1))
def test_the_serial_is_the_one_cryptography_reads(serial: int) -> None:
    pem = certificate(serial)
    assert serial_of(pem) == x509.load_pem_x509_certificate(pem).serial_number == serial


@pytest.mark.parametrize("serial", [1, 127, 128, 255, 256, 1 << 63, (1 << 159) - 1])
def test_serials_at_the_byte_edges_and_a_v1_certificate(serial: int) -> None:
    """A serial whose top bit is set gets a 0x00 byte in DER (it stays positive); a v1
    certificate has no version field before the serial."""
    assert serial_of(certificate(serial)) == serial
    v1 = certificate(serial, version=x509.Version.v1, uris=0)
    assert serial_of(v1) == x509.load_pem_x509_certificate(v1).serial_number == serial


def test_not_a_certificate_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        serial_of(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n")


def test_the_trust_domain_of_a_pin_is_the_trust_domain_of_its_ca() -> None:
    ca = pki.CertificateAuthority.create("tlsroll test CA")
    assert spiffe.trust_domain_of_pin(pki.spki_pin(ca.cert)) == spiffe.trust_domain(ca.cert)
    assert spiffe.trust_domain_of_pin(pki.spki_pin(ca.cert)) == ca.trust_domain


def test_one_uri_names_an_identity_several_or_none_do_not() -> None:
    """``of_uris`` (the URIs gRPC lists) answers as ``of`` (the certificate) does."""
    for count in (0, 1, 2):
        pem = certificate(7, uris=count)
        uris = []
        cert = x509.load_pem_x509_certificate(pem)
        if count:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert spiffe.of_uris(uris) == spiffe.of(cert)
    assert spiffe.of_uris(["spiffe://tlsroll-x/node/n0"]) == spiffe.node("tlsroll-x", "n0")
