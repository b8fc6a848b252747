"""Private keys encrypted at rest: PKCS#8 with PBES2, scrypt and AES-256-CBC (RFC 8018, RFC 7914).

``cryptography`` writes an encrypted PKCS#8 key only with its own fixed choice (PBKDF2-SHA256 at
2048 iterations in 50.x: a guess at the passphrase costs a millisecond) and offers no builder
for PKCS#8, so this module writes the ``EncryptedPrivateKeyInfo`` itself: the key's unencrypted
PKCS#8 DER from ``cryptography``, encrypted with ``cryptography``'s AES under a key from its
scrypt; only the few DER structures around it are built here. ``cryptography`` and
``openssl pkcs8`` read the result like any other encrypted key.

Why scrypt and why these parameters: scrypt is memory-hard, so a guess costs an attacker memory
as well as time, where PBKDF2 (even at OWASP's 600 000 iterations of SHA-256) is cheap on GPUs.
OpenSSL, which both ``cryptography`` and the ``openssl`` tool use to read the key, refuses
scrypt above 32 MiB, so OWASP's first choice (N=2^17, 128 MiB) would make a key nobody can
read back; this is OWASP's equivalent for 16 MiB: N=2^14, r=8, p=5 (about 0.2–0.4 s per try).

``kdf_of`` reads the parameters of a PEM key back, so that the leader can tell a key written by
an older tlsroll (or by hand) with a weak KDF and encrypt it again (``Kdf.strong``).

Tests only: ``TLSROLL_TEST_KDF_N`` (``TEST_KDF_N_ENV``, ``hook_kdf_n``) writes keys with a lower
N (a power of 2 under 2^14), so that each ``tlsroll init`` and leader start of the test suite
does not spend 0.2 s of CPU in scrypt. While it is set such a key passes (``Kdf.acceptable``);
without it, it is as weak as any other and the leader encrypts it again at full strength at its
next start: a key a test made never stays weak in production.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from tlsroll import kdfhook
from tlsroll.errors import PKIError, PKIReason, TerminalError

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 5
# What a PBKDF2 key needs to count as strong (OWASP, PBKDF2-HMAC-SHA256).
PBKDF2_MIN_ITERATIONS = 600_000

# The tests' hook (one for the CA key and the password's verifier): ``tlsroll.kdfhook``.
TEST_KDF_N_ENV = kdfhook.TEST_KDF_N_ENV
KdfHookError = kdfhook.KdfHookError
hook_kdf_n = kdfhook.hook_kdf_n
hook_refused_for = kdfhook.hook_refused_for


_PBES2 = "1.2.840.113549.1.5.13"
_SCRYPT = "1.3.6.1.4.1.11591.4.11"
_PBKDF2 = "1.2.840.113549.1.5.12"
_AES256_CBC = "2.16.840.1.101.3.4.1.42"
_PRF_NAMES = {
    "1.2.840.113549.2.7": "hmacWithSHA1",  # PBKDF2's default when the parameters name none
    "1.2.840.113549.2.9": "hmacWithSHA256",
    "1.2.840.113549.2.10": "hmacWithSHA384",
    "1.2.840.113549.2.11": "hmacWithSHA512",
}
_PRF_STRONG = {"hmacWithSHA256", "hmacWithSHA384", "hmacWithSHA512"}

_SEQUENCE, _INTEGER, _OCTET_STRING, _OID = 0x30, 0x02, 0x04, 0x06
_PEM_LABEL = "ENCRYPTED PRIVATE KEY"


# --- DER, the few types PKCS#8 needs -------------------------------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _seq(*items: bytes) -> bytes:
    return _tlv(_SEQUENCE, b"".join(items))


def _int(value: int) -> bytes:
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    arcs = [40 * parts[0] + parts[1], *parts[2:]]
    out = bytearray()
    for arc in arcs:
        chunk, rest = [arc & 0x7F], arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return _tlv(_OID, bytes(out))


class _Malformed(TerminalError):  # caught in this module only (read_pkcs8)
    pass


def _read(data: bytes) -> tuple[int, bytes, bytes]:
    """One TLV from ``data``: (tag, content, the rest)."""
    if len(data) < 2:
        raise _Malformed("truncated")
    tag, first = data[0], data[1]
    if first < 0x80:
        start, n = 2, first
    else:
        size = first & 0x7F
        if not 1 <= size <= 4 or len(data) < 2 + size:
            raise _Malformed("bad length")
        start, n = 2 + size, int.from_bytes(data[2 : 2 + size], "big")
    if len(data) < start + n:
        raise _Malformed("truncated")
    return tag, data[start : start + n], data[start + n :]


def _items(content: bytes) -> list[tuple[int, bytes]]:
    items = []
    while content:
        tag, value, content = _read(content)
        items.append((tag, value))
    return items


def _oid_text(content: bytes) -> str:
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        raise _Malformed("empty OID")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _expect(item: tuple[int, bytes], tag: int) -> bytes:
    if item[0] != tag:
        raise _Malformed(f"tag {item[0]:#x}, expected {tag:#x}")
    return item[1]


# --- PEM ---------------------------------------------------------------------------------------


def _pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]).encode()


def _pem_der(pem: bytes, label: str) -> bytes | None:
    text = pem.decode("ascii", errors="replace")
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if begin not in text or end not in text:
        return None
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        return None


# --- writing -----------------------------------------------------------------------------------


def encrypt(
    key: PrivateKeyTypes, passphrase: bytes, environ: Mapping[str, str] = os.environ
) -> bytes:
    """``key`` as a PEM ``ENCRYPTED PRIVATE KEY``: PBES2, scrypt (N=2^14, r=8, p=5, a new
    16-byte salt), AES-256-CBC (a new IV). N is the test hook's while it is set
    (``hook_kdf_n``: ``KdfHookError`` if it is set wrong)."""
    if not passphrase:
        raise ValueError("an encrypted key needs a passphrase")
    n = hook_kdf_n(environ) or SCRYPT_N
    plain = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    salt, iv = os.urandom(16), os.urandom(16)
    derived = Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derived), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    algorithm = _seq(
        _oid(_PBES2),
        _seq(
            _seq(
                _oid(_SCRYPT),
                _seq(_tlv(_OCTET_STRING, salt), _int(n), _int(SCRYPT_R), _int(SCRYPT_P)),
            ),
            _seq(_oid(_AES256_CBC), _tlv(_OCTET_STRING, iv)),
        ),
    )
    return _pem(_PEM_LABEL, _seq(algorithm, _tlv(_OCTET_STRING, ciphertext)))


# --- reading the parameters back ---------------------------------------------------------------


@dataclass(frozen=True)
class Kdf:
    """How a PEM key's passphrase becomes its key: ``name`` is ``scrypt``, ``pbkdf2``, or
    ``other`` (PBES1, OpenSSL's legacy PEM encryption, no encryption, unreadable)."""

    name: str
    n: int = 0
    r: int = 0
    p: int = 0
    iterations: int = 0
    prf: str = ""

    def __str__(self) -> str:
        if self.name == "scrypt":
            return f"scrypt N={self.n} r={self.r} p={self.p}"
        if self.name == "pbkdf2":
            return f"PBKDF2 {self.iterations} iterations ({self.prf})"
        return "a legacy or unknown encryption"

    @property
    def strong(self) -> bool:
        """Strong enough to keep, whatever the environment."""
        return self._strong_from(SCRYPT_N)

    def acceptable(self, environ: Mapping[str, str] = os.environ) -> bool:
        """Kept as it is by the leader's start: ``strong``, or, while the test hook is set
        (``hook_kdf_n``; ``KdfHookError`` if set wrong), scrypt at least as strong as the keys
        written under it. Without the hook a key written under it is weak: encrypted again."""
        floor = hook_kdf_n(environ)
        return self.strong or (floor is not None and self._strong_from(floor))

    def _strong_from(self, scrypt_n: int) -> bool:
        if self.name == "scrypt":
            return (
                self.n >= scrypt_n
                and self.r >= SCRYPT_R
                and self.n * self.r * self.p >= (scrypt_n * SCRYPT_R * SCRYPT_P)
            )
        if self.name == "pbkdf2":
            return self.iterations >= PBKDF2_MIN_ITERATIONS and self.prf in _PRF_STRONG
        return False


def kdf_of(pem: bytes) -> Kdf:
    """The key derivation of an encrypted PEM private key (``Kdf("other")`` for anything that is
    not PBES2 with scrypt or PBKDF2)."""
    der = _pem_der(pem, _PEM_LABEL)
    if der is None:
        return Kdf("other")
    try:
        info = _items(_expect(_read(der)[:2], _SEQUENCE))
        algorithm = _items(_expect(info[0], _SEQUENCE))
        if _oid_text(_expect(algorithm[0], _OID)) != _PBES2:
            return Kdf("other")
        kdf, _scheme = _items(_expect(algorithm[1], _SEQUENCE))[:2]
        kdf_items = _items(_expect(kdf, _SEQUENCE))
        kdf_oid = _oid_text(_expect(kdf_items[0], _OID))
        params = _items(_expect(kdf_items[1], _SEQUENCE))
        ints = [int.from_bytes(v, "big") for tag, v in params if tag == _INTEGER]
        if kdf_oid == _SCRYPT:
            return Kdf("scrypt", n=ints[0], r=ints[1], p=ints[2])
        if kdf_oid == _PBKDF2:
            prfs = [v for tag, v in params if tag == _SEQUENCE]
            prf = _oid_text(_expect(_items(prfs[0])[0], _OID)) if prfs else "1.2.840.113549.2.7"
            return Kdf("pbkdf2", iterations=ints[0], prf=_PRF_NAMES.get(prf, prf))
    except (_Malformed, IndexError) as exc:
        raise PKIError(PKIReason.BAD_PEM, f"encrypted private key: {exc}") from None
    return Kdf("other")
