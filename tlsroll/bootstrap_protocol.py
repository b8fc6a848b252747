"""The workstation bootstrap protocol (port 9443), shared by the agent's service and the client.

A workstation that knows the cluster's auth password, and nothing else, must learn the cluster
CA without trusting the network, and then obtain a client certificate. Two requests, both over
https with the node's certificate (which the client cannot verify yet, so it checks the answer
instead):

    GET  /v1/bootstrap  -> 200 {"version": 1,
                                "node": "node-a",
                                "server_url": "https://192.168.1.5:8443/praxis_live/",
                                "ca_bundle_pem": "-----BEGIN CERTIFICATE-----\\n...",
                                "kdf": {"alg": "scrypt", "n": 32768, "r": 8, "p": 1,
                                        "salt": "<base64>", "dklen": 32},
                                "nonce": "<43 url-safe base64 characters>",
                                "expires_in": 120,
                                "mac": "<64 hex digits>"}

    POST /v1/enroll     {"nonce": "...", "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----...",
                         "proof": "<64 hex digits>"}
                        -> 200 {"certificate_pem": "...", "ca_bundle_pem": "..."}
                        -> {"error": <code>, "message": <one line>} with
                           400 bad_request | 401 nonce_invalid | 401 wrong_password |
                           413 too_large (over 64 KiB) | 422 bad_csr |
                           429 rate_limited (with Retry-After) | 502 sign_failed

Keys. ``H = scrypt(NFC(password), salt, n, r, p, dklen)`` is exactly the ``hash`` of the node's
verifier (``tlsroll.password``); the node holds only the verifier, the client recomputes ``H``
from the password and the published ``kdf``. From ``H``, two keys with domain separation:

    mac_key   = HMAC-SHA256(key=H, msg=b"tlsroll bootstrap mac v1")
    proof_key = HMAC-SHA256(key=H, msg=b"tlsroll enrol proof v1")

MAC. ``mac = hex(HMAC-SHA256(mac_key, canonical(answer without "mac")))`` over *every* other
field the answer carries, so a field added later is covered too. The client checks it in
constant time before it looks at the CA bundle; a byte changed on the way, or a wrong password,
both show up as a MAC mismatch.

Proof. ``proof = hex(HMAC-SHA256(proof_key, canonical({"nonce": nonce, "csr_sha256":
hex(SHA-256(csr_pem bytes as sent)), "node": node})))``: bound to one server-issued nonce
(single use, 120 s), to this CSR and to this node, so it cannot be replayed or moved.

Canonical encoding: JSON with object keys sorted (by code point), no whitespace
(``separators=(",", ":")``), non-ASCII characters as themselves (``ensure_ascii=False``), encoded
as UTF-8. Values are limited to strings, integers, booleans, null, arrays and objects with
string keys; floats, NaN and non-string keys are refused rather than encoded ambiguously. For
those values (and ASCII keys, which is all this protocol uses) the bytes are the same as
RFC 8785 (JCS) produces, so another implementation can use a JCS library.

What the MAC does and does not give. Everyone who knows the password can compute ``mac_key``,
and so can anyone who holds a verifier (the node's verifier file is 0600 and never leaves the
node and the leader): such a party can fake a bootstrap answer to other workstations on the
same network. The CA's SPKI pin (``sha256:...``, public) closes that gap; a client given the pin
trusts the CA by the pin and uses the password only to enrol. The answer also lets whoever
fetches it try passwords offline at scrypt's cost per guess: a generated password (119 bits)
makes that hopeless; a short hand-picked one does not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tlsroll import password, pki
from tlsroll.errors import PKIError, TerminalError

VERSION = 1
BOOTSTRAP_PATH = "/v1/bootstrap"
ENROL_PATH = "/v1/enroll"
MAC_INFO = b"tlsroll bootstrap mac v1"
PROOF_INFO = b"tlsroll enrol proof v1"
NONCE_TTL = 120  # seconds
MAX_ANSWER_BYTES = 1 << 20  # a bootstrap or enrol answer larger than this is refused
MAX_REQUEST_BYTES = 64 << 10  # the service refuses larger enrol requests (413)
# What a client will spend on the KDF of an answer it cannot verify yet: 256 MiB of memory
# (n = 2**18 at r = 8; tlsroll's default is 2**15, 32 MiB). A forged answer must not be able to
# make a workstation allocate gigabytes.
MAX_KDF_MEMORY = 256 << 20
MIN_DKLEN = 16
MAX_DKLEN = 64
# "ws-" + a DNS label: at most 63 characters, lowercase letters, digits, inner hyphens.
WORKSTATION_CN = re.compile(r"^ws-[a-z0-9]([a-z0-9-]{0,58}[a-z0-9])?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BootstrapReason(StrEnum):
    MALFORMED = "not a valid tlsroll bootstrap message"
    VERSION = "unsupported bootstrap protocol version"
    BAD_KDF = "unacceptable key derivation parameters"
    MAC_MISMATCH = "bootstrap answer does not verify (wrong password, or altered on the way)"
    BAD_CSR = "unacceptable workstation CSR"


class BootstrapError(TerminalError):
    """A bootstrap message that is malformed or does not verify; ``str()`` is one line."""

    def __init__(self, reason: BootstrapReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


# --- canonical encoding -----------------------------------------------------------------------


def canonical(value: Any) -> bytes:
    """The canonical bytes of a JSON value (see the module docstring); refuses floats."""
    _check_canonical(value)
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _check_canonical(value: Any) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, list):
        for item in value:
            _check_canonical(item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError("canonical JSON needs string keys")
            _check_canonical(item)
        return
    raise TypeError(f"canonical JSON cannot encode {type(value).__name__}")


def loads_strict(body: bytes) -> Any:
    """Parse JSON from the network: UTF-8, no duplicate keys, no NaN/Infinity; ValueError else."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, item in items:
            if key in obj:
                raise ValueError(f"duplicate key {key!r}")
            obj[key] = item
        return obj

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    return json.loads(body.decode("utf-8"), object_pairs_hook=pairs, parse_constant=no_constant)


# --- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KDF:
    """The public scrypt parameters of a verifier: what a client needs besides the password."""

    n: int
    r: int
    p: int
    salt: bytes
    dklen: int

    def to_json(self) -> dict[str, Any]:
        return {
            "alg": password.ALG,
            "n": self.n,
            "r": self.r,
            "p": self.p,
            "salt": base64.b64encode(self.salt).decode("ascii"),
            "dklen": self.dklen,
        }

    @classmethod
    def from_json(cls, data: object) -> KDF:
        """Parse and bound the parameters of an answer that is not verified yet."""
        if not isinstance(data, Mapping) or set(data) != {"alg", "n", "r", "p", "salt", "dklen"}:
            raise BootstrapError(BootstrapReason.BAD_KDF, "expected alg, n, r, p, salt, dklen")
        if data["alg"] != password.ALG:
            raise BootstrapError(BootstrapReason.BAD_KDF, f"alg {data['alg']!r}")
        n, r, p, dklen = (data[k] for k in ("n", "r", "p", "dklen"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p, dklen)):
            raise BootstrapError(BootstrapReason.BAD_KDF, "n, r, p and dklen must be integers")
        if n < password.MIN_N or n & (n - 1) or not 1 <= r <= password.MAX_R:
            raise BootstrapError(BootstrapReason.BAD_KDF, f"n={n} r={r}")
        if 128 * r * n > MAX_KDF_MEMORY or not 1 <= p <= password.MAX_P:
            raise BootstrapError(BootstrapReason.BAD_KDF, f"n={n} r={r} p={p} is too costly")
        if not MIN_DKLEN <= dklen <= MAX_DKLEN:
            raise BootstrapError(BootstrapReason.BAD_KDF, f"dklen={dklen}")
        salt_text = data["salt"]
        if not isinstance(salt_text, str):
            raise BootstrapError(BootstrapReason.BAD_KDF, "salt must be a base64 string")
        try:
            salt = base64.b64decode(salt_text, validate=True)
        except (binascii.Error, ValueError):
            raise BootstrapError(BootstrapReason.BAD_KDF, "salt is not base64") from None
        if len(salt) < password.SALT_BYTES:
            raise BootstrapError(BootstrapReason.BAD_KDF, "salt too short")
        return cls(n=n, r=r, p=p, salt=salt, dklen=dklen)

    @classmethod
    def of_verifier(cls, verifier: Mapping[str, Any]) -> KDF:
        v = password.validate_verifier(verifier)
        return cls(
            n=v["n"],
            r=v["r"],
            p=v["p"],
            salt=base64.b64decode(v["salt"]),
            dklen=len(base64.b64decode(v["hash"])),
        )


@dataclass(frozen=True)
class Keys:
    """The two keys derived from the scrypt hash; never printed (``repr`` hides them)."""

    mac_key: bytes = field(repr=False)
    proof_key: bytes = field(repr=False)

    @classmethod
    def from_hash(cls, scrypt_hash: bytes) -> Keys:
        return cls(
            mac_key=hmac.digest(scrypt_hash, MAC_INFO, "sha256"),
            proof_key=hmac.digest(scrypt_hash, PROOF_INFO, "sha256"),
        )

    @classmethod
    def from_verifier(cls, verifier: Mapping[str, Any]) -> Keys:
        """The node's side: the verifier's hash *is* the scrypt hash."""
        v = password.validate_verifier(verifier)
        return cls.from_hash(base64.b64decode(v["hash"]))

    @classmethod
    def from_password(cls, secret: str, kdf: KDF) -> Keys:
        """The workstation's side: recompute the scrypt hash from the password (slow on purpose)."""
        return cls.from_hash(scrypt_hash(secret, kdf))


def scrypt_hash(secret: str, kdf: KDF) -> bytes:
    """``scrypt(NFC(secret) as UTF-8, ...)``: the same bytes as the verifier's ``hash``."""
    data = unicodedata.normalize("NFC", secret).encode("utf-8")
    maxmem = 128 * kdf.r * (kdf.n + kdf.p + 2) + (1 << 20)
    return hashlib.scrypt(
        data, salt=kdf.salt, n=kdf.n, r=kdf.r, p=kdf.p, dklen=kdf.dklen, maxmem=maxmem
    )


# --- the bootstrap answer ---------------------------------------------------------------------


def compute_mac(keys: Keys, payload: Mapping[str, Any]) -> str:
    """Hex HMAC of the canonical encoding of ``payload`` minus any ``mac`` field."""
    body = {k: v for k, v in payload.items() if k != "mac"}
    return hmac.new(keys.mac_key, canonical(body), "sha256").hexdigest()


def seal(payload: Mapping[str, Any], keys: Keys) -> dict[str, Any]:
    """``payload`` plus its ``mac``."""
    return {**payload, "mac": compute_mac(keys, payload)}


@dataclass(frozen=True)
class BootstrapAnswer:
    """A parsed ``GET /v1/bootstrap`` answer; ``raw`` is what the MAC covers."""

    node: str
    server_url: str
    ca_bundle_pem: bytes
    kdf: KDF
    nonce: str
    expires_in: int
    mac: str
    raw: Mapping[str, Any] = field(repr=False)


_ANSWER_FIELDS = {
    "version": int,
    "node": str,
    "server_url": str,
    "ca_bundle_pem": str,
    "kdf": dict,
    "nonce": str,
    "expires_in": int,
    "mac": str,
}


def parse_answer(body: bytes) -> BootstrapAnswer:
    """Check the shape of an answer (not its MAC: see ``verify_answer``)."""
    try:
        data = loads_strict(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BootstrapError(BootstrapReason.MALFORMED, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BootstrapError(BootstrapReason.MALFORMED, "not a JSON object")
    if "version" in data and data["version"] != VERSION:
        raise BootstrapError(BootstrapReason.VERSION, f"{data['version']!r}, this client: 1")
    for name, kind in _ANSWER_FIELDS.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BootstrapError(BootstrapReason.MALFORMED, f"field {name} missing or wrong type")
    if not _HEX64.match(data["mac"]):
        raise BootstrapError(BootstrapReason.MALFORMED, "mac is not 64 hex digits")
    try:
        bundle = data["ca_bundle_pem"].encode("ascii")
    except UnicodeEncodeError:
        raise BootstrapError(BootstrapReason.MALFORMED, "ca_bundle_pem is not ASCII") from None
    return BootstrapAnswer(
        node=data["node"],
        server_url=data["server_url"],
        ca_bundle_pem=bundle,
        kdf=KDF.from_json(data["kdf"]),
        nonce=data["nonce"],
        expires_in=data["expires_in"],
        mac=data["mac"],
        raw=data,
    )


def verify_answer(answer: BootstrapAnswer, keys: Keys) -> None:
    """Raise ``BootstrapError(MAC_MISMATCH)`` unless the MAC matches (constant time)."""
    expected = compute_mac(keys, answer.raw)
    if not hmac.compare_digest(expected.encode("ascii"), answer.mac.encode("ascii")):
        raise BootstrapError(BootstrapReason.MAC_MISMATCH)


def ca_certificates(answer: BootstrapAnswer) -> list[x509.Certificate]:
    """The CA certificates of a (verified) answer; every one must be a CA."""
    try:
        certs = pki.load_certs_pem(answer.ca_bundle_pem)
    except PKIError as exc:
        raise BootstrapError(BootstrapReason.MALFORMED, str(exc)) from None
    if not certs or not all(pki.is_ca(c) for c in certs):
        raise BootstrapError(BootstrapReason.MALFORMED, "ca_bundle_pem holds a non-CA certificate")
    return certs


# --- enrolment --------------------------------------------------------------------------------


def csr_sha256(csr_pem: bytes) -> str:
    return hashlib.sha256(csr_pem).hexdigest()


def enrol_proof(keys: Keys, *, nonce: str, csr_pem: bytes, node: str) -> str:
    """The hex proof of the password for one enrol request."""
    message = canonical({"nonce": nonce, "csr_sha256": csr_sha256(csr_pem), "node": node})
    return hmac.new(keys.proof_key, message, "sha256").hexdigest()


def check_enrol_proof(keys: Keys, proof: str, *, nonce: str, csr_pem: bytes, node: str) -> bool:
    """True if ``proof`` is right for this request (constant-time compare)."""
    expected = enrol_proof(keys, nonce=nonce, csr_pem=csr_pem, node=node)
    return hmac.compare_digest(expected.encode("ascii"), proof.encode("ascii", "replace"))


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
    if not WORKSTATION_CN.match(cn):
        raise BootstrapError(BootstrapReason.BAD_CSR, f"CN {cn!r} is not ws-<name>")
    try:
        pki.check_csr(csr, workstation_names(cn))
    except PKIError as exc:
        raise BootstrapError(BootstrapReason.BAD_CSR, str(exc)) from None
    return key, cn
