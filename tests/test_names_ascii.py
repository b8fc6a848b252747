"""Session 68: ``Names.of`` lowered every DNS name with ``str.lower``, which makes a Kelvin sign
(U+212A) a ``k`` and so a name read from a CSR or a certificate that is not the one written:
a CSR whose SAN held "\u212aa.example" had the names enrolled as "ka.example", and a brought
certificate (``--cert-dir``) for it passed as one for ka.example, which no client dialling
ka.example takes. Now a name not ASCII is kept exactly as written (``names.dns_given``) and
differs from every name the CA signs."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from leader import byo
from tests.byo_certs import NOW, key_pem, leaf, make_ca, pem
from tlsroll import pki
from tlsroll.errors import PKIError, PKIReason

IP = "127.0.0.9"
KELVIN = "\u212aa.example"  # what str.lower() made "ka.example"
WRITTEN = "ka.example"


def _kelvin() -> x509.DNSName:
    # x509.DNSName refuses a name not ASCII; a peer's own DER is not built by it.
    return x509.DNSName._init_without_validation(KELVIN)


def _csr(names: list[x509.GeneralName]) -> x509.CertificateSigningRequest:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node1")]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(pki.generate_key(), hashes.SHA256())
    )
    return pki.load_csr_pem(csr.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize("name", [KELVIN, "\u0130a.example", "stra\u00dfe.example"])
def test_names_of_keeps_a_name_not_ascii_as_written(name: str) -> None:
    assert pki.Names.of("node1", [IP], [name]).dns == (name,)
    # ASCII letters are lowered and one final dot dropped, as before.
    assert pki.Names.of("node1", [IP], ["Node1.Praxis.LAN."]).dns == ("node1.praxis.lan",)


def test_a_csr_with_a_kelvin_sign_is_not_for_the_name_enrolled() -> None:
    csr = _csr([x509.IPAddress(ipaddress.ip_address(IP)), _kelvin()])
    assert pki.names_of(csr).dns == (KELVIN,)
    with pytest.raises(PKIError) as info:
        pki.check_csr(csr, pki.Names.of("node1", [IP], [WRITTEN]))
    assert info.value.reason == PKIReason.NAME_MISMATCH


def test_a_brought_certificate_with_a_kelvin_sign_does_not_serve_the_name() -> None:
    ca = make_ca()
    cert, key = leaf(ca, [IP], [_kelvin()])
    names = pki.Names.of("node1", [IP], [WRITTEN])
    assert pki.san_lacks(cert, names) == [f"DNS:{WRITTEN}"]
    material = byo.Material(ca.pem, {"node1": byo.NodeMaterial("node1", pem(cert), key_pem(key))})
    problems = byo.validate(
        material, {"node1": byo.Expected(names, "")}, now=NOW, horizon=dt.timedelta(days=30)
    )
    assert [str(p) for p in problems] == [
        f"node1: node1.crt: its subjectAltName lacks DNS:{WRITTEN}, which the node serves on; "
        f"reissue it with IP:{IP}, DNS:{WRITTEN}"
    ]
