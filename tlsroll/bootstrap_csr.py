"""The part of the workstation bootstrap protocol (``tlsroll.bootstrap_protocol``) that the
leader needs to sign a workstation's certificate: the workstation's names, the check of its
CSR, and the protocol's error. Nothing of the password exchange: the leader imports this
module alone, and so never loads ``spake2`` (its import builds the Ed25519 group's tables:
~0.16 s and memory the leader kept for its life).
"""

from __future__ import annotations

import re
import unicodedata
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric import ec

from tlsroll import peertext, pki
from tlsroll.errors import PKIError, TerminalError

DETAIL_CHARS = 200  # node-supplied text in an error is cleaned and cut to this
# "ws-" + a DNS label: at most 63 characters, lowercase letters, digits, inner hyphens.
WORKSTATION_CN = re.compile(r"ws-[a-z0-9]([a-z0-9-]{0,58}[a-z0-9])?")


class BootstrapReason(StrEnum):
    MALFORMED = "not a valid tlsroll bootstrap message"
    VERSION = "unsupported bootstrap protocol version"
    BAD_KDF = "unacceptable key derivation parameters"
    CONFIRMATION = "key confirmation failed (wrong password, not the real node, or altered)"
    SEAL = "sealed data does not verify under the exchanged key"
    BAD_CSR = "unacceptable workstation CSR"


class BootstrapError(TerminalError):
    """A bootstrap message that is malformed or does not verify; ``str()`` is one line."""

    def __init__(self, reason: BootstrapReason, detail: str = "") -> None:
        # ``detail`` may quote what a node or a client sent: one line, bounded.
        detail = peertext.clean(detail, DETAIL_CHARS) if detail else ""
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


def workstation_names(common_name: str) -> pki.Names:
    """What a workstation certificate carries: CN ``ws-...`` and the same name as its only SAN."""
    return pki.Names.of(common_name, dns=[common_name])


def workstation_cn(label: str) -> str:
    """``ws-<label>`` from a host name or any text: lowercase, [a-z0-9-], at most 63 chars."""
    text = label.lower().split(".", 1)[0]
    for umlaut, ascii_ in (("ä", "ae"), ("ö", "oe"), ("ü", "ue"), ("ß", "ss")):
        text = text.replace(umlaut, ascii_)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^a-z0-9-]+", "-", text).strip("-")
    text = re.sub(r"-{2,}", "-", text)[:60].strip("-") or "workstation"
    cn = text if text.startswith("ws-") else f"ws-{text}"
    return cn[:63].rstrip("-")


def check_workstation_csr(csr_pem: bytes) -> tuple[ec.EllipticCurvePublicKey, str]:
    """Check a workstation's CSR; return its public key and its CN.

    ECDSA P-256 only, signature valid, no CA, CN ``ws-<label>``, and the SAN exactly that name:
    no IP address or other name, so that a workstation can never get a certificate naming a
    server.
    """
    try:
        csr = pki.load_csr_pem(csr_pem)
    except PKIError as exc:
        raise BootstrapError(BootstrapReason.BAD_CSR, str(exc)) from None
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BootstrapError(BootstrapReason.BAD_CSR, "the key must be ECDSA P-256")
    cn = pki.names_of(csr).common_name
    if not WORKSTATION_CN.fullmatch(cn):
        raise BootstrapError(BootstrapReason.BAD_CSR, f"CN {cn!r} is not ws-<name>")
    try:
        pki.check_csr(csr, workstation_names(cn))
    except PKIError as exc:
        raise BootstrapError(BootstrapReason.BAD_CSR, str(exc)) from None
    return key, cn
