"""The workstation bootstrap protocol v2 (port 9443): SPAKE2 over the scrypt-stretched password.

A workstation that knows the cluster's auth password, and nothing else, must learn the cluster
CA without trusting the network, and obtain a client certificate. It runs a password-
authenticated key exchange (PAKE) with the node's bootstrap service; every password guess then
costs one online exchange with the real node, which counts it (``nodeagent.bootstrap_server``).
Nothing a passive listener, a stranger querying the node, or a fake node that a workstation is
tricked into talking to captures lets anyone test a password offline.

The exchange (https, but the client cannot check the node's certificate yet: the PAKE, not TLS,
authenticates; ``msg_*`` and sealed values are base64, ``confirm`` 64 hex digits)::

    GET  /v2/hello            -> {"version": 2, "node", "server_url", "ca_bundle_pem",
                                  "kdf": {"alg": "scrypt", "n", "r", "p", "salt", "dklen"},
                                  "exchange_ttl": 30}
    POST /v2/exchange/start   {"version": 2, "workstation": "ws-…", "msg_a": X*}
                              -> {"exchange": "<43 url-safe chars>", "msg_b": Y*, "expires_in"}
    POST /v2/exchange/finish  {"exchange", "confirm": confirm_ws, "csr": seal(to node, CSR PEM)}
                              -> {"confirm": confirm_node, "payload": seal(to workstation,
                                  canonical({"ca_bundle_pem", "certificate_pem", "node",
                                             "server_url"}))}
    errors: {"error": <ErrorCode>, "message": <one line>}, 429/503 with Retry-After

Keys. ``H = scrypt(NFC(password), salt, n, r, p, dklen)`` is exactly the ``hash`` of the node's
verifier (``tlsroll.password``). Both sides run SPAKE2 (``spake2``, Ed25519 group, sides A =
workstation and B = node) on ``w = HMAC-SHA256(H, "tlsroll bootstrap v2: spake2 password")``.
``T = SHA-256(canonical(everything said so far: version, node, server_url, kdf, SHA-256 of the
CA bundle, exchange id, workstation name, X*, Y*))``; four keys come from HKDF-SHA256 (salt
``T``, ikm the SPAKE2 key, a label each): two for key confirmation, two for AES-256-GCM, one per
direction (``SessionKeys``). A hello field changed on the way changes ``T``, so the
confirmation checks it too.

Order, and why. The workstation confirms first (``HMAC(k_confirm_ws, T)``) and sends its CSR
sealed under the key; the node checks that confirmation *before* it says anything that depends
on the key. A wrong one is counted as a failed password; only a right one makes the node
confirm its side and hand over the CA bundle and the certificate, sealed. So:

- an observer (even one inside TLS) sees X*, Y*, two MACs and ciphertext; testing a candidate
  needs the Diffie-Hellman value of X* and Y*, i.e. an ephemeral scalar it does not have;
- a stranger who queries the node gets Y* and nothing keyed (no MAC, no ciphertext) until it
  sends a confirmation, which the node counts: one guess per counted exchange;
- a fake node that a workstation talks to chose Y* for one candidate; the workstation's
  confirmation tells it whether that one candidate was right, and nothing about any other:
  one guess per tricked run. So a client sends one confirmation per run: whatever the answer
  (a 410 ``exchange_expired`` too), it reports it and stops; it starts a fresh exchange only
  *before* confirming, if the one it has is about to expire;
- an exchange abandoned after ``start`` has given nothing away, so one that expires is not
  counted as a failure.

Why SPAKE2 and not OPAQUE. OPAQUE (an augmented PAKE) would keep a stolen verifier from being
usable to log in as a workstation. Three OPAQUE bindings install on Python 3.11 from PyPI
(opaquepy 0.6.0 of 2025-01, opaque-ke-py 0.1.x of 2025-12, opaque-snake 0.1.1 of 2026-02), each
a young single-maintainer wrapper with little use; ``spake2`` is magic-wormhole's. OPAQUE would
also replace the verifier that every part of tlsroll carries (``password set``, change-password
rollouts, the agent's journal, the reference server's ``/login``) by a registration record
plus a server key shared by all nodes. And what it adds is small here: whoever can read a
node's verifier file is root on that node and holds the agent's key, with which the leader
signs workstation certificates anyway.

What that costs: for this protocol ``H`` is password-equivalent. Whoever holds a node's verifier
can run either side: enrol a workstation, or pose as a node to workstations. The verifier file
is root's (the agent's), 0600, or ``root:<group> 0640`` when the managed server runs as a user
of its own and reads its config by that group (the config's group, never the server's user as
owner; the agent warns, ``stage.group_shares_secrets``, if that group lists other members), and
is never sent; only its salt and parameters are (a salt is no guessing oracle; a
transcript that confirms a key would be, and there is none). A stolen verifier is open to
offline guessing at scrypt's cost, as it was before. The CA pin (``--ca-pin``, public) still
closes "whoever has the password can pose as a node": a pinned client trusts the CA by the pin
and uses the password only to enrol.

Side channels. ``spake2`` is pure Python and not constant time. The node computes the
password's blinding points ``w·N`` and ``−w·M`` once per verifier, when its service starts
(``tlsroll.bootstrap_pake.node_blinds``; the agent keeps them and hands them to its crypto
worker with each exchange, so that a worker started afresh for a stranger's request does not
make them then), so what an exchange costs it depends on its random scalar and the peer's
message, not on ``w``; the workstation's one run per attempt is a single timing sample.

Canonical encoding: JSON with sorted keys, no whitespace, UTF-8, no floats (RFC 8785 for these
values). An old (v1) client gets ``{"version": 2, "error": "upgrade_required", …}`` on
``GET /v1/bootstrap``, which it reports as "unsupported bootstrap protocol version: 2"; a v2
client never falls back to v1 (a fake node claiming to be old would get an offline oracle).
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
from typing import TYPE_CHECKING, Any

from tlsroll import bootstrap_base, password

if TYPE_CHECKING:  # imported when first used (``__getattr__`` below)
    from tlsroll.bootstrap_csr import check_workstation_csr as check_workstation_csr  # noqa: PLC0414
    from tlsroll.bootstrap_csr import workstation_names as workstation_names  # noqa: PLC0414
    from tlsroll.bootstrap_pake import PARAMS as PARAMS  # noqa: PLC0414
    from tlsroll.bootstrap_pake import NodeSecret as NodeSecret  # noqa: PLC0414
    from tlsroll.bootstrap_pake import WorkstationPAKE as WorkstationPAKE  # noqa: PLC0414
    from tlsroll.bootstrap_pake import ca_certificates as ca_certificates  # noqa: PLC0414

# This module is the standard library's only (no ``cryptography``, no ``spake2``): the agent
# runs its bootstrap service with it, and leaves the X.509 and PAKE work to its crypto worker
# (``nodeagent.bootstrap_crypto``). What needs those libraries is in ``tlsroll.bootstrap_pake``
# (SPAKE2, AES-GCM, the CA bundle's check) and ``tlsroll.bootstrap_csr`` (the CSR's rules); it
# is part of the protocol here as before, imported when first asked for (``__getattr__``).
_LAZY = {
    "NodeSecret": "tlsroll.bootstrap_pake",
    "WorkstationPAKE": "tlsroll.bootstrap_pake",
    "PARAMS": "tlsroll.bootstrap_pake",
    "ca_certificates": "tlsroll.bootstrap_pake",
    "check_workstation_csr": "tlsroll.bootstrap_csr",
    "workstation_names": "tlsroll.bootstrap_csr",
}


if not TYPE_CHECKING:  # mypy sees the names above, and flags any other (review s41 M3)

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib  # noqa: PLC0415

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


DETAIL_CHARS = bootstrap_base.DETAIL_CHARS
WORKSTATION_CN = bootstrap_base.WORKSTATION_CN
BootstrapReason = bootstrap_base.BootstrapReason
BootstrapError = bootstrap_base.BootstrapError
workstation_cn = bootstrap_base.workstation_cn
loads_strict = bootstrap_base.loads_strict

VERSION = 2
HELLO_PATH = "/v2/hello"
START_PATH = "/v2/exchange/start"
FINISH_PATH = "/v2/exchange/finish"
RENEW_PATH = "/v2/renew"  # ``tlsroll client renew``: no password, the current certificate's proof
V1_BOOTSTRAP_PATH = "/v1/bootstrap"  # answered with "upgrade_required" for old clients
V1_ENROL_PATH = "/v1/enroll"
EXCHANGE_TTL = 30  # seconds from start to finish; the password is asked before start
CLIENT_WAIT = 10.0
"""How long the workstation waits for each answer by default (its ``--timeout``). The node
answers a finish well within it (``nodeagent.bootstrap_server.FINISH_DEADLINE``): an answer
sealed after the workstation gave up delivers a certificate no one receives, which holds the
workstation's name against its next try (review s43rev2, M1)."""
FINISH_DEADLINE = CLIENT_WAIT / 2
"""Seconds from a finish request's arrival within which the node sends its sealed answer, or
none: past it, it withdraws the certificate and answers "busy" (``nodeagent.bootstrap_server``)."""
MIN_EXCHANGE_WAIT = FINISH_DEADLINE + 2.0
"""The least the workstation waits for each answer of the exchange, whatever its ``--timeout``:
a sealed answer comes within ``FINISH_DEADLINE`` of the request's arrival, plus the way there and
back and a loaded node (2 s); a shorter wait could give up on a certificate the node still
delivers, and the name would stay held until the node withdraws it."""
MAX_ANSWER_BYTES = 1 << 20  # a larger answer is refused by the client
MAX_REQUEST_BYTES = 64 << 10  # the service refuses larger requests (413)
# What a client will spend on the KDF of a hello it cannot verify yet: no more than tlsroll
# itself asks of the verifiers it makes (``tlsroll.password``: n = 2**15, r = 8, p = 1, 32 MiB,
# a 32-byte hash). A fake node must not be able to make a workstation spend more.
# The bounds are ``tlsroll.password``'s (``CLIENT_MAX_*``, ``kdf_problem``): the leader stages
# no verifier beyond them (review s66 pw L2).
MAX_N = password.CLIENT_MAX_N
MAX_R = password.CLIENT_MAX_R
MAX_P = password.CLIENT_MAX_P
MIN_DKLEN = password.CLIENT_MIN_HASH
MAX_DKLEN = password.CLIENT_MAX_HASH
EXCHANGE_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
PAKE_MESSAGE_BYTES = 33  # one side byte and one Ed25519 point

ID_WORKSTATION = b"tlsroll bootstrap v2: workstation"
ID_NODE = b"tlsroll bootstrap v2: node"
_PAKE_INFO = b"tlsroll bootstrap v2: spake2 password"
_KEY_INFO = b"tlsroll bootstrap v2: "


class Side(StrEnum):
    WORKSTATION = "workstation"
    NODE = "node"


class ErrorCode(StrEnum):
    """The ``error`` of a refusal; the client picks its exit code by it."""

    BAD_REQUEST = "bad_request"  # 400
    WRONG_PASSWORD = "wrong_password"  # noqa: S105 - 401: a wrong confirmation (counted)
    EXCHANGE_EXPIRED = "exchange_expired"  # 410: unknown, used or expired (not counted)
    UPGRADE_REQUIRED = "upgrade_required"  # a v1 request to a v2 node
    TOO_LARGE = "too_large"  # 413
    BAD_CSR = "bad_csr"  # 422
    RATE_LIMITED = "rate_limited"  # 429 + Retry-After: too many failed passwords
    BUSY = "busy"  # 429/503 + Retry-After: too many open exchanges
    SIGN_FAILED = "sign_failed"  # 502: the password was right, the CA did not sign (409: it
    # refused, a name taken; 429 + Retry-After: the node's hour's cap of PCs reached)
    # 503, no Retry-After: the leader refuses this node (removed from the cluster, or its
    # certificate revoked); no password is checked (a client that does not know the code
    # shows its message)
    NODE_REMOVED = "node_removed"
    # 403: a renewal refused (the certificate revoked, ended, not this cluster's, or no proof
    # of it): the PC enrols again with the password (``tlsroll client test-connection``)
    RENEW_REFUSED = "renew_refused"


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


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise BootstrapError(BootstrapReason.MALFORMED, f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BootstrapError(BootstrapReason.MALFORMED, f"{what} is not base64") from None


def _object(body: bytes, fields: Mapping[str, type]) -> dict[str, Any]:
    """A JSON object with exactly ``fields``, of those types (a bool is not an int here)."""
    try:
        data = loads_strict(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BootstrapError(BootstrapReason.MALFORMED, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BootstrapError(BootstrapReason.MALFORMED, "not a JSON object")
    if set(data) != set(fields):
        raise BootstrapError(
            BootstrapReason.MALFORMED, f"expected the fields {', '.join(sorted(fields))}"
        )
    for name, kind in fields.items():
        value = data[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BootstrapError(BootstrapReason.MALFORMED, f"field {name} has the wrong type")
    return data


# --- the password's public parameters ---------------------------------------------------------


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
            "salt": b64(self.salt),
            "dklen": self.dklen,
        }

    @classmethod
    def from_json(cls, data: object) -> KDF:
        """Parse and bound the parameters of a hello that is not verified yet."""
        if not isinstance(data, Mapping) or set(data) != {"alg", "n", "r", "p", "salt", "dklen"}:
            raise BootstrapError(BootstrapReason.BAD_KDF, "expected alg, n, r, p, salt, dklen")
        if data["alg"] != password.ALG:
            raise BootstrapError(BootstrapReason.BAD_KDF, f"alg {data['alg']!r}")
        n, r, p, dklen = (data[k] for k in ("n", "r", "p", "dklen"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p, dklen)):
            raise BootstrapError(BootstrapReason.BAD_KDF, "n, r, p and dklen must be integers")
        if n < password.least_n() or n & (n - 1) or r < 1 or p < 1 or dklen < MIN_DKLEN:
            raise BootstrapError(BootstrapReason.BAD_KDF, f"n={n} r={r} p={p} dklen={dklen}")
        if why := password.kdf_problem(n, r, p, dklen):
            raise BootstrapError(BootstrapReason.BAD_KDF, f"{why}: not a tlsroll node")
        try:
            salt = unb64(data["salt"], "salt")
        except BootstrapError as exc:
            raise BootstrapError(BootstrapReason.BAD_KDF, exc.detail) from None
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


def scrypt_hash(secret: str, kdf: KDF) -> bytes:
    """``scrypt(NFC(secret) as UTF-8, ...)``: the same bytes as the verifier's ``hash``."""
    data = unicodedata.normalize("NFC", secret).encode("utf-8")
    maxmem = 128 * kdf.r * (kdf.n + kdf.p + 2) + (1 << 20)
    return hashlib.scrypt(
        data, salt=kdf.salt, n=kdf.n, r=kdf.r, p=kdf.p, dklen=kdf.dklen, maxmem=maxmem
    )


def pake_password(scrypt_digest: bytes) -> bytes:
    """What SPAKE2 runs on: ``HMAC-SHA256(H, label)``, apart from any other use of ``H``."""
    return hmac.digest(scrypt_digest, _PAKE_INFO, "sha256")


# --- hello --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """``GET /v2/hello``: public and unauthenticated, but bound into the transcript."""

    node: str
    server_url: str
    ca_bundle_pem: bytes
    kdf: KDF
    exchange_ttl: int = EXCHANGE_TTL

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "node": self.node,
            "server_url": self.server_url,
            "ca_bundle_pem": self.ca_bundle_pem.decode("ascii"),
            "kdf": self.kdf.to_json(),
            "exchange_ttl": self.exchange_ttl,
        }


_HELLO_FIELDS = {
    "version": int,
    "node": str,
    "server_url": str,
    "ca_bundle_pem": str,
    "kdf": dict,
    "exchange_ttl": int,
}


def parse_hello(body: bytes) -> Hello:
    """Check the shape of a hello (its content is checked later, through the transcript)."""
    try:
        data = loads_strict(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BootstrapError(BootstrapReason.MALFORMED, f"not JSON: {exc}") from None
    if isinstance(data, dict) and "version" in data and data["version"] != VERSION:
        raise BootstrapError(BootstrapReason.VERSION, f"{data['version']!r}, this client: 2")
    data = _object(body, _HELLO_FIELDS)
    try:
        bundle = data["ca_bundle_pem"].encode("ascii")
    except UnicodeEncodeError:
        raise BootstrapError(BootstrapReason.MALFORMED, "ca_bundle_pem is not ASCII") from None
    if len(data["node"]) > 63 or len(data["server_url"]) > 2048:
        raise BootstrapError(BootstrapReason.MALFORMED, "node or server_url too long")
    return Hello(
        node=data["node"],
        server_url=data["server_url"],
        ca_bundle_pem=bundle,
        kdf=KDF.from_json(data["kdf"]),
        exchange_ttl=data["exchange_ttl"],
    )


def check_message(msg: bytes, side: bytes) -> None:
    """A SPAKE2 message of ``side`` (b"A": the workstation's, b"B": the node's), by its shape."""
    if len(msg) != PAKE_MESSAGE_BYTES or msg[:1] != side:
        raise BootstrapError(BootstrapReason.MALFORMED, "not a SPAKE2 message of the other side")


@dataclass(frozen=True)
class NodePassword:
    """The node's side of the password, from its verifier, without SPAKE2: the public KDF for
    the hello and ``pake_pw``, what SPAKE2 runs on (which the agent passes to its crypto
    worker). Never printed."""

    kdf: KDF
    pake_pw: bytes = field(repr=False)

    @classmethod
    def of_verifier(cls, verifier: Mapping[str, Any]) -> NodePassword:
        v = password.validate_verifier(verifier)
        return cls(KDF.of_verifier(v), pake_password(base64.b64decode(v["hash"])))

    def __repr__(self) -> str:
        return "NodePassword()"


# --- transcript and session keys ------------------------------------------------------------------


def transcript(hello: Hello, exchange: str, workstation: str, msg_a: bytes, msg_b: bytes) -> bytes:
    """``T``: SHA-256 of everything both sides said before the keys (see the docstring)."""
    return hashlib.sha256(
        canonical(
            {
                "protocol": "tlsroll-bootstrap",
                "version": VERSION,
                "node": hello.node,
                "server_url": hello.server_url,
                "kdf": hello.kdf.to_json(),
                "ca_bundle_sha256": hashlib.sha256(hello.ca_bundle_pem).hexdigest(),
                "exchange": exchange,
                "workstation": workstation,
                "msg_a": b64(msg_a),
                "msg_b": b64(msg_b),
            }
        )
    ).digest()


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF with SHA-256 (RFC 5869), extract then expand, by ``hmac`` of the standard library."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF-SHA256 gives 1 to 8160 bytes")
    prk = hmac.digest(salt or bytes(32), ikm, "sha256")
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
    return out[:length]


def _hkdf(shared: bytes, salt: bytes, label: str) -> bytes:
    return hkdf_sha256(shared, salt, _KEY_INFO + label.encode())


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one exchange, bound to its transcript; ``repr`` hides them."""

    transcript: bytes = field(repr=False)
    confirm: Mapping[Side, bytes] = field(repr=False)
    seal_to: Mapping[Side, bytes] = field(repr=False)

    @classmethod
    def derive(cls, shared: bytes, transcript: bytes) -> SessionKeys:
        return cls(
            transcript=transcript,
            confirm={s: _hkdf(shared, transcript, f"confirm {s.value}") for s in Side},
            seal_to={s: _hkdf(shared, transcript, f"seal to {s.value}") for s in Side},
        )

    def confirmation(self, side: Side) -> str:
        """What ``side`` sends to prove it holds the key: hex HMAC of the transcript."""
        message = b"confirm " + side.value.encode() + b" " + self.transcript
        return hmac.new(self.confirm[side], message, "sha256").hexdigest()

    def check_confirmation(self, side: Side, value: object) -> bool:
        """True if ``value`` is ``side``'s confirmation (constant-time compare)."""
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            return False
        return hmac.compare_digest(self.confirmation(side).encode(), value.encode())

    def seal(self, to: Side, plaintext: bytes) -> str:
        """AES-256-GCM for ``to``, with the transcript and the direction as associated data
        (``tlsroll.bootstrap_pake.seal``: imports ``cryptography``; the agent's service seals
        in its crypto worker instead)."""
        from tlsroll import bootstrap_pake  # noqa: PLC0415

        return bootstrap_pake.seal(self.seal_to[to], self.transcript, to, plaintext)

    def open(self, to: Side, sealed: object) -> bytes:
        """The plaintext of ``seal(to, …)``; BootstrapError(SEAL) if it does not verify."""
        from tlsroll import bootstrap_pake  # noqa: PLC0415

        return bootstrap_pake.open_sealed(self.seal_to[to], self.transcript, to, sealed)


# --- the exchange's messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class StartRequest:
    workstation: str
    msg_a: bytes

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "workstation": self.workstation, "msg_a": b64(self.msg_a)}


def parse_start_request(body: bytes) -> StartRequest:
    data = _object(body, {"version": int, "workstation": str, "msg_a": str})
    if data["version"] != VERSION:
        raise BootstrapError(BootstrapReason.VERSION, f"{data['version']!r}, this node: 2")
    if not WORKSTATION_CN.fullmatch(data["workstation"]):
        raise BootstrapError(BootstrapReason.MALFORMED, "workstation must be ws-<name>")
    return StartRequest(data["workstation"], unb64(data["msg_a"], "msg_a"))


@dataclass(frozen=True)
class StartAnswer:
    exchange: str
    msg_b: bytes
    expires_in: int

    def to_json(self) -> dict[str, Any]:
        return {"exchange": self.exchange, "msg_b": b64(self.msg_b), "expires_in": self.expires_in}


def parse_start_answer(body: bytes) -> StartAnswer:
    data = _object(body, {"exchange": str, "msg_b": str, "expires_in": int})
    if not EXCHANGE_ID.fullmatch(data["exchange"]):
        raise BootstrapError(BootstrapReason.MALFORMED, "exchange id")
    return StartAnswer(data["exchange"], unb64(data["msg_b"], "msg_b"), data["expires_in"])


@dataclass(frozen=True)
class FinishRequest:
    exchange: str
    confirm: str
    csr: str  # sealed to the node

    def to_json(self) -> dict[str, Any]:
        return {"exchange": self.exchange, "confirm": self.confirm, "csr": self.csr}


def parse_finish_request(body: bytes) -> FinishRequest:
    data = _object(body, {"exchange": str, "confirm": str, "csr": str})
    if not EXCHANGE_ID.fullmatch(data["exchange"]):
        raise BootstrapError(BootstrapReason.MALFORMED, "exchange id")
    return FinishRequest(data["exchange"], data["confirm"], data["csr"])


@dataclass(frozen=True)
class FinishAnswer:
    confirm: str
    payload: str  # sealed to the workstation

    def to_json(self) -> dict[str, Any]:
        return {"confirm": self.confirm, "payload": self.payload}


def parse_finish_answer(body: bytes) -> FinishAnswer:
    data = _object(body, {"confirm": str, "payload": str})
    return FinishAnswer(data["confirm"], data["payload"])


@dataclass(frozen=True)
class RenewRequest:
    """A renewal (``RENEW_PATH``): the CSR of a new key (PEM), which carries the proof that the
    workstation holds its current certificate (``bootstrap_csr.reenrolment_extension``); over
    the node's TLS only, which the workstation verifies against its settings' CA."""

    csr_pem: bytes

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "csr": b64(self.csr_pem)}


def parse_renew_request(body: bytes) -> RenewRequest:
    data = _object(body, {"version": int, "csr": str})
    if data["version"] != VERSION:
        raise BootstrapError(BootstrapReason.VERSION, f"{data['version']!r}, this node: 2")
    return RenewRequest(unb64(data["csr"], "csr"))


@dataclass(frozen=True)
class RenewAnswer:
    """The renewed certificate and the CA bundle the node hands out with it (PEM)."""

    certificate_pem: bytes
    ca_bundle_pem: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "certificate_pem": b64(self.certificate_pem),
            "ca_bundle_pem": b64(self.ca_bundle_pem),
        }


def parse_renew_answer(body: bytes) -> RenewAnswer:
    data = _object(body, {"certificate_pem": str, "ca_bundle_pem": str})
    return RenewAnswer(
        unb64(data["certificate_pem"], "certificate_pem"),
        unb64(data["ca_bundle_pem"], "ca_bundle_pem"),
    )


@dataclass(frozen=True)
class Payload:
    """What the node hands over under the confirmed key."""

    ca_bundle_pem: bytes
    certificate_pem: bytes
    node: str
    server_url: str

    def to_bytes(self) -> bytes:
        return canonical(
            {
                "ca_bundle_pem": self.ca_bundle_pem.decode("ascii"),
                "certificate_pem": self.certificate_pem.decode("ascii"),
                "node": self.node,
                "server_url": self.server_url,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        fields = {"ca_bundle_pem": str, "certificate_pem": str, "node": str, "server_url": str}
        obj = _object(data, fields)
        try:
            return cls(
                ca_bundle_pem=obj["ca_bundle_pem"].encode("ascii"),
                certificate_pem=obj["certificate_pem"].encode("ascii"),
                node=obj["node"],
                server_url=obj["server_url"],
            )
        except UnicodeEncodeError:
            raise BootstrapError(BootstrapReason.MALFORMED, "PEM is not ASCII") from None


def upgrade_answer() -> dict[str, Any]:
    """What a v2 node answers a v1 client; the old client's version check reports it."""
    return {
        "version": VERSION,
        "error": ErrorCode.UPGRADE_REQUIRED.value,
        "message": "this node speaks bootstrap protocol 2: update tlsroll on the workstation",
    }
