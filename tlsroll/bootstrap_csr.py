"""The part of the workstation bootstrap protocol (``tlsroll.bootstrap_protocol``) that the
leader needs to sign a workstation's certificate: the workstation's names, the check of its
CSR, and the protocol's error. Nothing of the password exchange: the leader imports this
module alone, and so never loads ``spake2`` (its import builds the Ed25519 group's tables:
~0.16 s and memory the leader kept for its life).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tlsroll import bootstrap_base, pki
from tlsroll.errors import PKIError

# The plain parts (standard library only) live in ``tlsroll.bootstrap_base``; they are part of
# this module as before.
DETAIL_CHARS = bootstrap_base.DETAIL_CHARS
WORKSTATION_CN = bootstrap_base.WORKSTATION_CN
BootstrapReason = bootstrap_base.BootstrapReason
BootstrapError = bootstrap_base.BootstrapError
loads_strict = bootstrap_base.loads_strict
workstation_cn = bootstrap_base.workstation_cn
# The CSR extension of a re-enrolment (``Reenrolment``), under a private OID (X.667: 2.25.UUID).
REENROL_OID = x509.ObjectIdentifier("2.25.182646992994859322264631623817214396066")
_REENROL_LABEL = b"tlsroll workstation re-enrolment v1\x00"
_MAX_REENROL_BYTES = 8192
# What reading a parsed certificate's or CSR's parts (key, names, extensions) raises for what
# a client made: its refusal, not the leader's error (audit s40ws M1).
_UNREADABLE = (ValueError, TypeError, x509.DuplicateExtension, UnsupportedAlgorithm)


def workstation_names(common_name: str) -> pki.Names:
    """What a workstation certificate carries: CN ``ws-...`` and the same name as its only SAN."""
    return pki.Names.of(common_name, dns=[common_name])


def check_workstation_csr(csr_pem: bytes) -> tuple[ec.EllipticCurvePublicKey, str]:
    """Check a workstation's CSR; return its public key and its CN.

    ECDSA P-256 only, signature valid, no CA, CN ``ws-<label>``, and the SAN exactly that name:
    no IP address or other name, so that a workstation can never get a certificate naming a
    server.
    """
    try:
        csr = pki.load_csr_pem(csr_pem)
        # (Its key, names and extensions are parsed when asked for: a key type unknown to
        # ``cryptography``, a malformed SAN or an extension twice raise then.)
        key = csr.public_key()
        cn = pki.names_of(csr).common_name
    except PKIError as exc:
        raise BootstrapError(BootstrapReason.BAD_CSR, str(exc)) from None
    except _UNREADABLE:
        raise BootstrapError(BootstrapReason.BAD_CSR, "malformed CSR") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BootstrapError(BootstrapReason.BAD_CSR, "the key must be ECDSA P-256")
    if not WORKSTATION_CN.fullmatch(cn):
        raise BootstrapError(BootstrapReason.BAD_CSR, f"CN {cn!r} is not ws-<name>")
    try:
        pki.check_csr(csr, workstation_names(cn))
    except PKIError as exc:
        raise BootstrapError(BootstrapReason.BAD_CSR, str(exc)) from None
    return key, cn


# --- re-enrolment -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reenrolment:
    """What a workstation's CSR says about the name it asks for (a non-critical extension,
    ``REENROL_OID``, that the node passes on unread with the CSR and that an older leader
    ignores):

    - ``previous``: the fingerprint of a certificate of that name whose key signed the new key
      (and the name): the PC that holds that certificate enrols again (its settings dir kept
      the key), so the leader may let it supersede that certificate;
    - ``replace``: the workstation's admin asked to take the name over from another PC
      (``--replace``).

    The leader signs the name over a certificate another PC holds only with one of them.
    ``certificate``: the previous certificate itself (a renewal's issuer is checked at the
    node: ``nodeagent.bootstrap_crypto.renewal_csr``)."""

    previous: str | None = None
    replace: bool = False
    certificate: x509.Certificate | None = field(default=None, compare=False, repr=False)


def reenrolment_extension(
    new_key: ec.EllipticCurvePublicKey,
    cn: str,
    *,
    previous: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    replace: bool = False,
) -> x509.UnrecognizedExtension | None:
    """The extension for a CSR of ``new_key`` and ``cn``; None if it would say nothing.
    ``previous``: this PC's certificate of ``cn`` and its key, which signs the new key."""
    if previous is None and not replace:
        return None
    body: dict[str, object] = {"version": 1, "replace": replace}
    if previous is not None:
        cert, key = previous
        signature = key.sign(_reenrol_message(cn, new_key), ec.ECDSA(hashes.SHA256()))
        body["previous"] = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        body["signature"] = base64.b64encode(signature).decode()
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return x509.UnrecognizedExtension(REENROL_OID, _der_octets(data))


def reenrolment_of(csr_pem: bytes) -> Reenrolment:
    """What the CSR's re-enrolment extension says, its proof checked: the previous certificate
    names the CSR's name and its key signed the CSR's key. ``BootstrapError`` (BAD_CSR) if it is
    malformed or does not verify; an empty ``Reenrolment`` without it."""
    key, cn = check_workstation_csr(csr_pem)
    try:
        csr = pki.load_csr_pem(csr_pem)
        ext = csr.extensions.get_extension_for_oid(REENROL_OID).value
    except x509.ExtensionNotFound:
        return Reenrolment()
    except (PKIError, ValueError) as exc:
        raise BootstrapError(BootstrapReason.BAD_CSR, str(exc)) from None
    bad = BootstrapError(BootstrapReason.BAD_CSR, "malformed re-enrolment extension")
    if not isinstance(ext, x509.UnrecognizedExtension) or len(ext.value) > _MAX_REENROL_BYTES:
        raise bad
    try:
        body = loads_strict(_der_unoctets(ext.value))
    except ValueError:  # UnicodeDecodeError, a malformed DER, too deep, a duplicate key, NaN
        raise bad from None
    if (
        not isinstance(body, dict)
        or type(body.get("version")) is not int  # (True == 1)
        or body["version"] != 1
        or type(body.get("replace")) is not bool
    ):
        raise bad
    if "previous" not in body:
        return Reenrolment(replace=body["replace"])
    try:
        previous_der = base64.b64decode(body["previous"], validate=True)
        signature = base64.b64decode(body["signature"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise bad from None
    # Whatever the previous certificate holds is the client's: a malformed SAN, an extension
    # twice, a point off its curve, a key type unknown to ``cryptography`` are a refusal of the
    # CSR (INVALID_ARGUMENT), not the leader's error (audit s40ws M1).
    try:
        previous = x509.load_der_x509_certificate(previous_der)
        previous_cn = pki.names_of(previous).common_name
        old_key = previous.public_key()
    except _UNREADABLE:
        raise bad from None
    if previous_cn != cn:
        raise BootstrapError(BootstrapReason.BAD_CSR, f"the previous certificate is not {cn}'s")
    if not isinstance(old_key, ec.EllipticCurvePublicKey):
        raise bad
    try:
        old_key.verify(signature, _reenrol_message(cn, key), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BootstrapError(
            BootstrapReason.BAD_CSR, "the previous certificate's key did not sign the new key"
        ) from None
    return Reenrolment(
        previous=pki.fingerprint(previous), replace=body["replace"], certificate=previous
    )


def _reenrol_message(cn: str, new_key: ec.EllipticCurvePublicKey) -> bytes:
    spki = new_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _REENROL_LABEL + cn.encode("ascii") + b"\x00" + spki


def _der_octets(data: bytes) -> bytes:
    """``data`` as a DER OCTET STRING (the extension's value is DER)."""
    n = len(data)
    if n < 0x80:
        return b"\x04" + bytes([n]) + data
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(size)]) + size + data


def _der_unoctets(der: bytes) -> bytes:
    """The contents of a DER OCTET STRING that is all of ``der``; ValueError else."""
    if len(der) < 2 or der[0] != 0x04:
        raise ValueError("not an OCTET STRING")
    first = der[1]
    if first < 0x80:
        n, start = first, 2
    else:
        width = first & 0x7F
        if not 1 <= width <= 2 or len(der) < 2 + width:
            raise ValueError("bad length")
        n, start = int.from_bytes(der[2 : 2 + width], "big"), 2 + width
    if len(der) != start + n:
        raise ValueError("bad length")
    return der[start:]
