"""The part of the bootstrap protocol (``tlsroll.bootstrap_protocol``) that needs ``spake2`` and
``cryptography``: SPAKE2's two sides, AES-256-GCM sealing, and the check of a CA bundle.

The workstation imports it (through ``bootstrap_protocol``'s names, as before); the node runs it
only in its agent's crypto worker (``nodeagent.bootstrap_crypto``), so that the agent, which
serves for months, never holds these libraries (issue 15: about 10 MiB a switched agent kept).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.ed25519_basic import NotOnCurve
from spake2.parameters.ed25519 import ParamsEd25519
from spake2.spake2 import SPAKEError

from tlsroll import pki
from tlsroll.bootstrap_protocol import (
    ID_NODE,
    ID_WORKSTATION,
    KDF,
    BootstrapError,
    BootstrapReason,
    NodePassword,
    Side,
    b64,
    check_message,
    pake_password,
    scrypt_hash,
    unb64,
)
from tlsroll.errors import PKIError

PARAMS = ParamsEd25519  # the SPAKE2 group and its M, N (public: the tests attack with them)
NONCE_BYTES = 12
TAG_BYTES = 16


def ca_certificates(bundle_pem: bytes) -> list[x509.Certificate]:
    """The certificates of a CA bundle; every one must be a CA."""
    try:
        certs = pki.load_certs_pem(bundle_pem)
    except PKIError as exc:
        raise BootstrapError(BootstrapReason.MALFORMED, str(exc)) from None
    if not certs or not all(pki.is_ca(c) for c in certs):
        raise BootstrapError(BootstrapReason.MALFORMED, "the CA bundle holds a non-CA certificate")
    return certs


# --- sealing ------------------------------------------------------------------------------------


def _aad(transcript: bytes, to: Side) -> bytes:
    return transcript + b" to " + to.value.encode()


def seal(key: bytes, transcript: bytes, to: Side, plaintext: bytes) -> str:
    """AES-256-GCM under ``key`` (the exchange's key to ``to``), with the transcript and the
    direction as associated data: base64 of nonce, ciphertext and tag."""
    nonce = os.urandom(NONCE_BYTES)
    return b64(nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(transcript, to)))


def open_sealed(key: bytes, transcript: bytes, to: Side, sealed: object) -> bytes:
    """The plaintext of ``seal(key, transcript, to, …)``; BootstrapError(SEAL) if it does not
    verify."""
    raw = unb64(sealed, "sealed data")
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise BootstrapError(BootstrapReason.SEAL, "too short")
    try:
        return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(transcript, to))
    except InvalidTag:
        raise BootstrapError(BootstrapReason.SEAL) from None


# --- SPAKE2 -------------------------------------------------------------------------------------


class _Fixed:
    """A blinding point whose product with the password's scalar is already known."""

    def __init__(self, element: Any) -> None:
        self.element = element

    def scalarmult(self, _scalar: int) -> Any:
        return self.element


class _Decoded:
    """``PARAMS.group`` with one message's element already decoded and checked: SPAKE2's
    ``finish`` decodes its message again (a check that costs a multiplication by the group's
    order), which ``node_respond`` did before ``start``."""

    def __init__(self, message: bytes, element: Any) -> None:
        self._message = message
        self._element = element

    def bytes_to_element(self, data: bytes) -> Any:
        if data == self._message:
            return self._element
        return PARAMS.group.bytes_to_element(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(PARAMS.group, name)


class _NodeSPAKE2(SPAKE2_B):  # type: ignore[misc]
    """SPAKE2's side B with ``w·N`` and ``−w·M`` computed beforehand (see "Side channels"),
    and the workstation's element decoded beforehand (``decoded``: ``_Decoded``)."""

    def __init__(self, pake_pw: bytes, blind: Any, unblind: Any, decoded: _Decoded) -> None:
        params = copy.copy(PARAMS)  # (its M, N and S as they are: made once, at the import)
        params.group = decoded
        super().__init__(pake_pw, idA=ID_WORKSTATION, idB=ID_NODE, params=params)
        self._blind = _Fixed(blind)
        self._unblind = _Fixed(unblind)

    def my_blinding(self) -> _Fixed:
        return self._blind

    def my_unblinding(self) -> _Fixed:
        return self._unblind


@functools.lru_cache(maxsize=2)
def _node_blinds(pw: bytes) -> tuple[Any, Any]:
    """The node's SPAKE2 blinding points for ``pw``: two scalar multiplications in pure Python
    (tens of ms), whose time depends on ``pw``. Kept for the last two passwords, for as long as
    the process lives."""
    scalar = PARAMS.group.password_to_scalar(pw)
    return PARAMS.N.scalarmult(scalar), PARAMS.M.scalarmult(-scalar)


def node_blinds(pake_pw: bytes) -> tuple[bytes, bytes]:
    """The node's blinding points ``w·N`` and ``−w·M`` for ``pake_pw``, encoded (32 bytes each;
    secret: they stand for the password as ``pake_pw`` does). The agent asks for them once per
    verifier, when its service starts, and passes them with each exchange (``node_respond``):
    its crypto worker, which stops when idle, then never makes them for a stranger's request,
    whose answer's time would depend on the password (see "Side channels")."""
    blind, unblind = _node_blinds(pake_pw)
    return blind.to_bytes(), unblind.to_bytes()


@functools.lru_cache(maxsize=2)
def _decoded(blind: bytes, unblind: bytes) -> tuple[Any, Any]:
    """``node_blinds``' points decoded (and checked to be in the group: a multiplication by the
    group's order, whatever the password)."""
    return PARAMS.group.bytes_to_element(blind), PARAMS.group.bytes_to_element(unblind)


def node_respond(
    pake_pw: bytes, msg_a: bytes, blinds: tuple[bytes, bytes] | None = None
) -> tuple[bytes, bytes]:
    """The node's SPAKE2 for ``pake_pw`` (what SPAKE2 runs on: ``NodePassword.pake_pw``):
    ``(msg_b, SPAKE2 key)`` for the workstation's ``msg_a`` (BootstrapError if bad).
    ``blinds``: ``node_blinds(pake_pw)``, made earlier; None: made (or kept) here.

    ``msg_a``'s point is decoded and checked (on the curve, in the group: a multiplication by
    the group's order) before SPAKE2's ``start`` (a multiplication of its own): a message of
    the right shape that is no valid point costs the worker that check alone (a fifth of a
    valid exchange's time, half of it for a point not on the curve), not ``start`` too
    (session 68 left it). No cheaper check exists: whether a point of the curve is in the
    group takes that multiplication, and ``cryptography`` decodes no Ed25519 point. A valid
    point costs what it did (decoded once)."""
    check_message(msg_a, b"A")
    try:
        element = PARAMS.group.bytes_to_element(msg_a[1:])
    except (NotOnCurve, ValueError):
        raise BootstrapError(BootstrapReason.MALFORMED, "msg_a is not a valid point") from None
    blind, unblind = _node_blinds(pake_pw) if blinds is None else _decoded(*blinds)
    side = _NodeSPAKE2(pake_pw, blind, unblind, _Decoded(msg_a[1:], element))
    msg_b: bytes = side.start()
    try:
        key: bytes = side.finish(msg_a)
    except (SPAKEError, NotOnCurve, ValueError):
        raise BootstrapError(BootstrapReason.MALFORMED, "msg_a is not a valid point") from None
    return msg_b, key


class NodeSecret:
    """The node's side of the password, made from its verifier, SPAKE2 included; never printed.
    (The agent's service keeps a ``NodePassword`` and runs ``node_respond`` in its worker.)"""

    def __init__(self, verifier: Mapping[str, Any]) -> None:
        node = NodePassword.of_verifier(verifier)
        self.kdf = node.kdf
        self._pw = node.pake_pw
        _node_blinds(self._pw)  # made now, kept for ``respond``

    def __repr__(self) -> str:
        return "NodeSecret()"

    def respond(self, msg_a: bytes) -> tuple[bytes, bytes]:
        """``(msg_b, SPAKE2 key)`` for the workstation's ``msg_a`` (BootstrapError if bad)."""
        return node_respond(self._pw, msg_a)


class WorkstationPAKE:
    """The workstation's side: scrypt, then SPAKE2's side A; ``msg_a`` goes out first."""

    def __init__(self, secret: str, kdf: KDF) -> None:
        self._side = SPAKE2_A(
            pake_password(scrypt_hash(secret, kdf)),
            idA=ID_WORKSTATION,
            idB=ID_NODE,
            params=PARAMS,
        )
        self.msg_a: bytes = self._side.start()

    def __repr__(self) -> str:
        return "WorkstationPAKE()"

    def finish(self, msg_b: bytes) -> bytes:
        """The SPAKE2 key for the node's ``msg_b`` (BootstrapError if it is no valid point)."""
        check_message(msg_b, b"B")
        try:
            key: bytes = self._side.finish(msg_b)
        except (SPAKEError, NotOnCurve, ValueError):
            raise BootstrapError(BootstrapReason.MALFORMED, "msg_b is not a valid point") from None
        return key
