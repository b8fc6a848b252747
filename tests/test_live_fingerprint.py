"""The live certificate's fingerprint as the agent reads it without ``cryptography``
(``plans.pem_fingerprint``, finalize's plan): a certificate's, or BAD_PEM for a file that holds
something else under a certificate's PEM header (review s41 rev2, Low 7: the ``ssl`` module's
PEM helpers decode any base64, and a corrupt live certificate got a fingerprint where it had
got ``PrepareFailed``)."""

from __future__ import annotations

import base64
import ssl

import pytest

from nodeagent import plans
from tlsroll import pki
from tlsroll.errors import PKIError, PKIReason
from tlsroll.names import Names

NAMES = Names.of("n1", ["127.0.0.1"])


def as_certificate_pem(der: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def test_a_certificates_fingerprint_is_pkis(test_ca: pki.CertificateAuthority) -> None:
    leaf = test_ca.issue(pki.generate_key().public_key(), NAMES)
    chain = pki.cert_to_pem(leaf) + test_ca.cert_pem
    assert plans.pem_fingerprint(chain) == pki.fingerprint(leaf)  # the first one's
    assert plans.pem_fingerprint(test_ca.cert_pem) == pki.fingerprint(test_ca.cert)


def test_what_is_not_a_certificate_under_its_header_is_bad_pem(
    test_ca: pki.CertificateAuthority,
) -> None:
    key = pki.generate_key()
    der = ssl.PEM_cert_to_DER_cert(test_ca.cert_pem.decode("ascii"))
    request = pki.csr_to_pem(pki.make_csr(key, NAMES)).decode("ascii").splitlines()
    key_body = b"".join(pki.key_to_pem(key).splitlines()[1:-1])
    others = {
        "garbage": b"not a certificate at all",
        "a request": base64.b64decode("".join(request[1:-1])),
        "a key": base64.b64decode(key_body),
        "a certificate and more": der + b"\x00",
        "a certificate cut short": der[:-1],
        "a certificate's tbs alone": der[4:],
        "an empty sequence": b"\x30\x00",
        "a long-form length of a short item": b"\x30\x81\x03\x02\x01\x00",
        "an indefinite length": b"\x30\x80" + der[4:] + b"\x00\x00",
    }
    for what, body in others.items():
        with pytest.raises(PKIError) as bad:
            plans.pem_fingerprint(as_certificate_pem(body))
        assert bad.value.reason is PKIReason.BAD_PEM, what
    for text in (b"", b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n"):
        with pytest.raises(PKIError):
            plans.pem_fingerprint(text)
