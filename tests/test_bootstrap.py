"""The bootstrap protocol v2 (tlsroll.bootstrap_protocol) and the agent's service on 9443
(nodeagent.bootstrap_server): the password exchange, its limits, and what old clients get.

Protocol and limit tests are pure. Service tests run the real aiohttp https listener on a
loopback address with the seed's port, a certificate from the test CA and an injected clock;
requests go over real TLS (verified against the test CA here, for the tests' own sake: a
workstation cannot verify it, and the protocol does not need it to).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID
from spake2 import SPAKE2_B

from nodeagent import bootstrap_crypto
from nodeagent.bootstrap_server import (
    NODE_KEY,
    BootstrapService,
    Busy,
    Crypto,
    ExchangeTable,
    Guard,
    Limits,
)
from nodeagent.failure_log import FailureCount, FailureLog
from tests.conftest import IssuedCert
from tlsroll import bootstrap_protocol as proto
from tlsroll import password, pki
from tlsroll.backoff import Backoff, Ceiling, Policy, source_key
from tlsroll.defaults import BOOTSTRAP_PORT
from tlsroll.errors import UnsafePermissions
from tlsroll.tls import client_context

PASSWORD = "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"
OTHER_PASSWORD = "zz7q-x2mf-9vhc-3ptw-a8ke-rn5d"
VERIFIER = password.make_verifier(PASSWORD, **password.TEST_PARAMS)
TIMEOUT = aiohttp.ClientTimeout(total=10)
APP_URL = "https://{address}:8443/praxis_live/"


# --- helpers shared with test_workstation and test_offline_attack --------------------------------


class FakeClock:
    """Monotonic seconds that only move when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ca_signer(ca: pki.CertificateAuthority) -> Callable[[bytes], Any]:
    """The ``sign`` callback of the tests: the test CA issues a client certificate."""

    async def sign(csr_pem: bytes) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem)
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        cert = ca.issue(key, pki.names_of(csr), server=False, client=True)
        return pki.cert_to_pem(cert)

    return sign


class InProcessCrypto:
    """The tests' stand-in for the agent's crypto worker (``nodeagent.cryptoworker``): runs
    ``bootstrap_crypto.OPS[NAME]`` for the op "bootstrap.NAME" in a thread, the request and
    the answer through JSON as over the worker's pipe. ``fail`` makes the next calls raise
    what a dead worker raises; ``calls`` counts them by op."""

    def __init__(self) -> None:
        self.fail: Exception | None = None
        self.calls: dict[str, int] = {}

    async def call(self, op: str, request: dict[str, Any]) -> Any:
        module, _, name = op.partition(".")
        assert module == "bootstrap", op
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.fail is not None:
            raise self.fail
        sent = json.loads(json.dumps(request))
        answer = await asyncio.to_thread(bootstrap_crypto.OPS[name], sent)
        return json.loads(json.dumps(answer))

    def warm(self) -> None:
        pass


def make_service(
    cert: IssuedCert,
    address: str,
    ca: pki.CertificateAuthority,
    *,
    clock: Callable[[], float] | None = None,
    verifier: password.Verifier = VERIFIER,
    port: int = BOOTSTRAP_PORT,
    sign: Callable[[bytes], Any] | None = None,
    limits: Limits | None = None,
    crypto: Crypto | None = None,
    withdraw: Callable[[bytes], Any] | None = None,
) -> BootstrapService:
    return BootstrapService(
        address=address,
        port=port,
        cert_file=cert.cert_file,
        key_file=cert.key_file,
        ca_bundle_pem=ca.cert_pem,
        server_url=APP_URL.format(address=address),
        node_name="node-a",
        verifier=verifier,
        sign=sign or ca_signer(ca),
        withdraw=withdraw,
        clock=clock or FakeClock(),
        limits=limits,
        crypto=crypto or InProcessCrypto(),
    )


def workstation_csr(cn: str = "ws-empfang") -> tuple[pki.PrivateKey, bytes]:
    key = pki.generate_key()
    return key, pki.csr_to_pem(pki.make_csr(key, proto.workstation_names(cn)))


def secrets_in(text: str) -> list[str]:
    """Which secrets (password, verifier hash, what SPAKE2 runs on) occur in ``text``."""
    digest = base64.b64decode(VERIFIER["hash"])
    pake_pw = proto.pake_password(digest)
    found = [s for s in (PASSWORD, VERIFIER["hash"]) if s in text]
    for name, value in (("scrypt hash", digest), ("spake2 password", pake_pw)):
        if value.hex() in text or base64.b64encode(value).decode() in text:
            found.append(name)
    return found


@dataclass
class Attempt:
    """One exchange as a workstation runs it: the last answer, and the keys it derived."""

    status: int
    headers: dict[str, str]
    body: Any
    keys: proto.SessionKeys | None = None
    key: pki.PrivateKey | None = None

    @property
    def error(self) -> str:
        return str(self.body.get("error", "")) if isinstance(self.body, dict) else ""

    def payload(self) -> proto.Payload:
        assert self.status == 200 and self.keys is not None, self.body
        answer = proto.parse_finish_answer(json.dumps(self.body).encode())
        assert self.keys.check_confirmation(proto.Side.NODE, answer.confirm)
        return proto.Payload.from_bytes(self.keys.open(proto.Side.WORKSTATION, answer.payload))


class Node:
    def __init__(self, service: BootstrapService, clock: FakeClock, ca_pem: bytes) -> None:
        self.service = service
        self.clock = clock
        self.base = f"https://{service.address}:{service.bound_port}"
        self.ssl = client_context(ca_pem)

    async def call(
        self, session: aiohttp.ClientSession, method: str, path: str, body: object = None
    ) -> tuple[int, dict[str, str], Any]:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with session.request(
            method,
            self.base + path,
            data=data,
            ssl=self.ssl,
            headers={"Content-Type": "application/json"},
        ) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)

    async def hello(self, session: aiohttp.ClientSession) -> proto.Hello:
        status, headers, body = await self.call(session, "GET", proto.HELLO_PATH)
        assert status == 200 and headers["Cache-Control"] == "no-store"
        return proto.parse_hello(json.dumps(body).encode())

    async def exchange(
        self,
        session: aiohttp.ClientSession,
        secret: str = PASSWORD,
        *,
        cn: str = "ws-empfang",
        csr_cn: str | None = None,
        hello: proto.Hello | None = None,
        before_finish: Callable[[], None] | None = None,
    ) -> Attempt:
        hello = hello or await self.hello(session)
        pake = proto.WorkstationPAKE(secret, hello.kdf)
        status, headers, body = await self.call(
            session, "POST", proto.START_PATH, proto.StartRequest(cn, pake.msg_a).to_json()
        )
        if status != 200:
            return Attempt(status, headers, body)
        start = proto.parse_start_answer(json.dumps(body).encode())
        keys = proto.SessionKeys.derive(
            pake.finish(start.msg_b),
            proto.transcript(hello, start.exchange, cn, pake.msg_a, start.msg_b),
        )
        key, csr = workstation_csr(csr_cn or cn)
        if before_finish is not None:
            before_finish()
        finish = proto.FinishRequest(
            start.exchange,
            keys.confirmation(proto.Side.WORKSTATION),
            keys.seal(proto.Side.NODE, csr),
        )
        status, headers, body = await self.call(
            session, "POST", proto.FINISH_PATH, finish.to_json()
        )
        return Attempt(status, headers, body, keys, key)


@pytest.fixture
async def node(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
) -> AsyncIterator[Node]:
    address = loopback()
    clock = FakeClock()
    service = make_service(issue_cert(address, "node-a"), address, test_ca, clock=clock)
    async with service:
        yield Node(service, clock, test_ca.cert_pem)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


def session_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``address`` (another workstation)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    return aiohttp.ClientSession(timeout=TIMEOUT, connector=connector)


# --- the protocol, pure -------------------------------------------------------------------------


def test_canonical_encoding() -> None:
    value = {"b": [1, True, None], "a": "Verschlüsselung", "c": {"z": 1, "y": "x"}}
    assert (
        proto.canonical(value)
        == '{"a":"Verschlüsselung","b":[1,true,null],"c":{"y":"x","z":1}}'.encode()
    )
    for bad in ({"x": 1.5}, {1: "x"}, [float("nan")], {"x": b"bytes"}):
        with pytest.raises(TypeError):
            proto.canonical(bad)


def test_strict_json_refuses_duplicates_and_constants() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        proto.loads_strict(b'{"a": 1, "a": 2}')
    with pytest.raises(ValueError):
        proto.loads_strict(b'{"a": NaN}')
    with pytest.raises(ValueError, match="nested too deeply"):
        proto.loads_strict(b"[" * 30000 + b"]" * 30000)


def _hello() -> proto.Hello:
    return proto.Hello(
        node="node-a",
        server_url="https://192.168.1.5:8443/praxis_live/",
        ca_bundle_pem=b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        kdf=proto.KDF.of_verifier(VERIFIER),
    )


def _keys(secret: str, hello: proto.Hello | None = None) -> tuple[proto.SessionKeys, ...]:
    """Both sides' keys of one exchange, run in memory."""
    hello = hello or _hello()
    node = proto.NodeSecret(VERIFIER)
    ws = proto.WorkstationPAKE(secret, hello.kdf)
    msg_b, node_key = node.respond(ws.msg_a)
    ex = "x" * 43
    t_ws = proto.transcript(hello, ex, "ws-a", ws.msg_a, msg_b)
    t_node = proto.transcript(_hello(), ex, "ws-a", ws.msg_a, msg_b)
    return (
        proto.SessionKeys.derive(ws.finish(msg_b), t_ws),
        proto.SessionKeys.derive(node_key, t_node),
    )


def test_the_right_password_gives_both_sides_the_same_key() -> None:
    ws, node = _keys(PASSWORD)
    assert node.check_confirmation(proto.Side.WORKSTATION, ws.confirmation(proto.Side.WORKSTATION))
    assert ws.check_confirmation(proto.Side.NODE, node.confirmation(proto.Side.NODE))
    sealed = node.seal(proto.Side.WORKSTATION, b"the CA bundle")
    assert ws.open(proto.Side.WORKSTATION, sealed) == b"the CA bundle"
    with pytest.raises(proto.BootstrapError):  # a message for the node is not one for us
        ws.open(proto.Side.NODE, sealed)
    # The confirmations of the two sides differ: a node cannot echo the workstation's.
    assert ws.confirmation(proto.Side.WORKSTATION) != ws.confirmation(proto.Side.NODE)
    assert repr(ws) == "SessionKeys()"  # keys never in a traceback


def test_a_wrong_password_or_an_altered_hello_fails_the_confirmation() -> None:
    ws, node = _keys(OTHER_PASSWORD)
    assert not node.check_confirmation(
        proto.Side.WORKSTATION, ws.confirmation(proto.Side.WORKSTATION)
    )
    altered = proto.Hello(
        node="node-a",
        server_url="https://10.0.0.66:8443/praxis_live/",  # a MITM's address
        ca_bundle_pem=_hello().ca_bundle_pem,
        kdf=_hello().kdf,
    )
    ws, node = _keys(PASSWORD, altered)
    assert not node.check_confirmation(
        proto.Side.WORKSTATION, ws.confirmation(proto.Side.WORKSTATION)
    )
    for bad in ("", "zz", "0" * 64, 42):
        assert not node.check_confirmation(proto.Side.WORKSTATION, bad)


def test_the_nodes_precomputed_side_is_plain_spake2() -> None:
    """``NodeSecret`` reaches into spake2 (pinned); it must give the same key as SPAKE2_B."""
    kdf = proto.KDF.of_verifier(VERIFIER)
    pw = proto.pake_password(proto.scrypt_hash(PASSWORD, kdf))
    for _ in range(3):
        ws = proto.WorkstationPAKE(PASSWORD, kdf)
        plain = SPAKE2_B(
            pw,
            idA=proto.ID_WORKSTATION,
            idB=proto.ID_NODE,
            params=proto.PARAMS,
        )
        msg_b = plain.start()
        assert plain.finish(ws.msg_a) == ws.finish(msg_b)
    assert repr(proto.NodeSecret(VERIFIER)) == "NodeSecret()"


def test_the_nodes_side_is_made_once_per_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: the agent makes the service's ``NodeSecret`` again at every switch that keeps
    the password (rotate-cert), and each cost two scalar multiplications in pure Python (~9 % of
    an agent's CPU over rotate-cert rollouts). The same verifier's is made once; another
    verifier's is made anew, and both still agree with the workstation."""
    other = password.make_verifier("another password 42", **password.TEST_PARAMS)
    proto.NodeSecret(VERIFIER)  # made (or already kept) before counting
    made: list[int] = []
    scalarmult = type(proto.PARAMS.N).scalarmult

    def counting(self: Any, scalar: int) -> Any:
        made.append(1)
        return scalarmult(self, scalar)

    monkeypatch.setattr(type(proto.PARAMS.N), "scalarmult", counting)
    again = proto.NodeSecret(VERIFIER)
    assert made == []
    fresh = proto.NodeSecret(other)
    assert len(made) == 2
    for node, secret in ((again, PASSWORD), (fresh, "another password 42")):
        monkeypatch.undo()
        ws = proto.WorkstationPAKE(secret, node.kdf)
        msg_b, key = node.respond(ws.msg_a)
        assert ws.finish(msg_b) == key


def test_the_protocol_module_holds_no_cryptography_library() -> None:
    """Issue 15 (session 41): what the agent's service imports of the protocol (and the
    service itself, and the ops module its worker runs) loads neither ``cryptography`` nor
    ``spake2``; the workstation's names (``proto.WorkstationPAKE`` …) still load them when
    first used."""
    script = (
        "import sys\n"
        "import nodeagent.bootstrap_server, nodeagent.bootstrap_crypto\n"
        "from tlsroll import bootstrap_protocol as proto\n"
        "bad = lambda: sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('cryptography', 'spake2'))\n"
        "print(bad())\n"
        "proto.WorkstationPAKE\n"
        "print(bool(bad()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"], done.stdout


def test_hkdf_of_the_standard_library_is_rfc_5869() -> None:
    """``SessionKeys.derive``'s HKDF-SHA256 is ``hmac``'s (the agent holds no ``cryptography``):
    RFC 5869's test case 1, and ``cryptography``'s HKDF, for the lengths and inputs the
    protocol uses and more."""
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    assert proto.hkdf_sha256(ikm, salt, info, 42).hex() == okm
    for n in range(20):
        shared, t = os.urandom(32), hashlib.sha256(bytes([n])).digest()
        label = f"seal to {'node' if n % 2 else 'workstation'}".encode()
        for length in (32, 16, 64, 100):
            theirs = HKDF(hashes.SHA256(), length, salt=t, info=label).derive(shared)
            assert proto.hkdf_sha256(shared, t, label, length) == theirs


def test_bad_pake_messages_are_refused() -> None:
    node = proto.NodeSecret(VERIFIER)
    ws = proto.WorkstationPAKE(PASSWORD, node.kdf)
    for bad in (b"", b"A" + b"\x00" * 31, b"B" + ws.msg_a[1:], b"A" + b"\xff" * 32):
        with pytest.raises(proto.BootstrapError):
            node.respond(bad)
    with pytest.raises(proto.BootstrapError):
        ws.finish(ws.msg_a)  # its own message reflected


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.update(version=1), proto.BootstrapReason.VERSION),
        (lambda d: d.pop("node"), proto.BootstrapReason.MALFORMED),
        (lambda d: d.update(extra=1), proto.BootstrapReason.MALFORMED),
        (lambda d: d.update(node="n" * 64), proto.BootstrapReason.MALFORMED),
        (lambda d: d["kdf"].update(n=2**20), proto.BootstrapReason.BAD_KDF),  # 1 GiB: refused
        (lambda d: d["kdf"].update(n=1000), proto.BootstrapReason.BAD_KDF),
        (lambda d: d["kdf"].update(salt="c2hvcnQ="), proto.BootstrapReason.BAD_KDF),
        (lambda d: d["kdf"].update(alg="md5"), proto.BootstrapReason.BAD_KDF),
        (lambda d: d["kdf"].update(r=True), proto.BootstrapReason.BAD_KDF),
    ],
)
def test_malformed_hellos_are_refused_before_any_kdf(
    change: Callable[[dict[str, Any]], None], reason: proto.BootstrapReason
) -> None:
    data = _hello().to_json()
    change(data)
    with pytest.raises(proto.BootstrapError) as err:
        proto.parse_hello(json.dumps(data).encode())
    assert err.value.reason is reason


def test_messages_parse_strictly() -> None:
    ok = proto.StartRequest("ws-a", b"A" + b"\x01" * 32).to_json()
    assert proto.parse_start_request(json.dumps(ok).encode()).workstation == "ws-a"
    for bad in (
        {**ok, "version": 1},
        {**ok, "workstation": "node-a"},
        {**ok, "workstation": "ws-a\x1b[31m"},
        {**ok, "msg_a": "not base64!"},
        {k: v for k, v in ok.items() if k != "msg_a"},
    ):
        with pytest.raises(proto.BootstrapError):
            proto.parse_start_request(json.dumps(bad).encode())
    with pytest.raises(proto.BootstrapError):
        proto.parse_finish_request(b'{"exchange": "short", "confirm": "x", "csr": "x"}')


def test_workstation_csr_rules() -> None:
    key, csr = workstation_csr("ws-empfang-2")
    pub, cn = proto.check_workstation_csr(csr)
    assert cn == "ws-empfang-2" and pki.spki_pin(pub) == pki.spki_pin(key.public_key())
    ec_key = pki.generate_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {
        "not ws-": pki.make_csr(ec_key, pki.Names.of("node-a", dns=["node-a"])),
        "server IP": pki.make_csr(ec_key, pki.Names.of("ws-x", ["192.168.1.5"], ["ws-x"])),
        "other name": pki.make_csr(ec_key, pki.Names.of("ws-x", dns=["ws-x", "node-a"])),
        "RSA": pki.make_csr(rsa_key, proto.workstation_names("ws-x")),
    }
    for what, request in bad.items():
        with pytest.raises(proto.BootstrapError, match="unacceptable workstation CSR"):
            proto.check_workstation_csr(pki.csr_to_pem(request))
            pytest.fail(f"accepted a CSR with {what}")


@pytest.mark.parametrize(
    ("label", "cn"),
    [
        ("Empfang-PC.praxis.local", "ws-empfang-pc"),
        ("ws-labor", "ws-labor"),
        ("Zimmer 3 (Ärztin)", "ws-zimmer-3-aerztin"),
        ("Café", "ws-cafe"),
        ("---", "ws-workstation"),
        ("x" * 80, "ws-" + "x" * 60),
        # review s64: 60 after a ws- given, as after the one added (it was cut to 60 in all)
        ("ws-" + "x" * 58, "ws-" + "x" * 58),
        ("ws-" + "x" * 80, "ws-" + "x" * 60),
        ("ws-", "ws-ws"),
    ],
)
def test_workstation_cn(label: str, cn: str) -> None:
    assert proto.workstation_cn(label) == cn
    assert proto.WORKSTATION_CN.match(cn)


# --- the limits, pure ---------------------------------------------------------------------------


def test_backoff_doubles_after_the_free_failures_and_forgets() -> None:
    b = Backoff(Policy(free=2, base=2, cap=30, forget=600))
    assert b.wait("a", 0) == 0
    b.failed("a", 0)
    b.failed("a", 1)
    assert b.wait("a", 1) == 2  # third attempt: wait 2 s after the last failure
    assert [b.policy.delay(n) for n in range(2, 8)] == [2, 4, 8, 16, 30, 30]
    b.failed("a", 3)
    assert b.wait("a", 3) == 4 and b.wait("a", 6) == 1 and b.wait("b", 3) == 0
    assert b.wait("a", 603) == 0 and b.failures("a", 603) == 0  # quiet for 10 min: forgotten
    b.failed("a", 700)
    b.reset("a")
    assert b.failures("a", 700) == 0


def test_ceiling_counts_everyone() -> None:
    c = Ceiling(limit=3, window=100)
    for t in (0, 10, 20):
        assert c.wait(t) == 0
        c.failed(t)
    assert c.wait(20) == 80 and c.count(20) == 3
    assert c.wait(100) == 0  # the first failure left the window


def test_guard_counts_source_name_and_node() -> None:
    limits = Limits(
        per_source=Policy(free=2, base=10, cap=100, forget=3600),
        per_name=Policy(free=3, base=10, cap=100, forget=3600),
        per_node=Policy(free=4, base=10, cap=100, forget=3600),
        ceiling=6,
        ceiling_window=1000,
    )
    g = Guard(limits)
    g.failed("10.0.0.1", "ws-a", 0)
    g.failed("10.0.0.1", "ws-a", 0)
    assert g.wait("10.0.0.1", "ws-b", 0) == 10  # this source
    assert g.wait("10.0.0.2", "ws-b", 0) == 0
    g.failed("10.0.0.2", "ws-a", 0)
    assert g.wait("10.0.0.3", "ws-a", 0) == 10  # this name, from any source
    g.failed("10.0.0.3", "ws-c", 0)
    assert g.wait("10.0.0.4", "ws-d", 0) == 10  # the node: a distributed attack
    g.failed("10.0.0.4", "ws-e", 20)
    g.failed("10.0.0.5", "ws-f", 40)
    assert g.wait("10.0.0.6", "ws-g", 500) == 500  # the ceiling: 6 a 1000 s
    g.succeeded("10.0.0.1", "ws-a")
    assert g.sources.failures("10.0.0.1", 0) == 0 and g.names.failures("ws-a", 0) == 0


def test_exchange_table_refuses_rather_than_evicts() -> None:
    table = ExchangeTable(ttl=30, per_source=2, total=3)
    a1 = table.reserve("a", "ws-a", 0)
    table.reserve("a", "ws-a", 0)
    with pytest.raises(Busy) as err:
        table.reserve("a", "ws-a", 1)
    assert err.value.status == 429 and err.value.retry == 29
    b1 = table.reserve("b", "ws-b", 1)
    with pytest.raises(Busy) as err:
        table.reserve("c", "ws-c", 2)
    assert err.value.status == 503
    a1.keys = b1.keys = proto.SessionKeys.derive(b"k" * 32, b"t")
    assert table.take(a1.id, "b", 3) is None  # another source cannot use it up ...
    assert table.take(a1.id, "a", 3) is a1  # ... its own can, once
    assert table.take(a1.id, "a", 3) is None
    assert table.take(b1.id, "b", 31) is None  # expired
    assert table.purge(40) == 1 and len(table) == 0


def test_failure_log_adds_up_and_keeps_what_was_not_reported() -> None:
    log = FailureLog(max_sources=2)
    t = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
    log.record("10.0.0.1", "ws-a", t)
    log.record("10.0.0.1", "ws-b", t + dt.timedelta(seconds=5))
    log.record("10.0.0.2", "ws-c", t)
    log.record("10.0.0.3", "ws-d", t)  # one source too many: added up under OTHER
    sent = log.pending()
    assert [(f.source, f.workstation, f.count) for f in sent] == [
        ("10.0.0.1", "ws-b", 2),
        ("10.0.0.2", "ws-c", 1),
        (FailureLog.OTHER, "ws-d", 1),
    ]
    log.record("10.0.0.1", "ws-b", t + dt.timedelta(seconds=9))  # while the heartbeat is out
    log.reported(sent)
    assert [(f.source, f.count) for f in log.pending()] == [("10.0.0.1", 1)]

    # What an earlier run of the agent kept (its journal) comes back as it was, within bounds.
    again = FailureLog(max_sources=2)
    again.restore(sent)
    assert again.pending() == sent
    again.restore([FailureCount("10.0.0.9", "ws-e", 2, t)])
    assert [(f.source, f.count) for f in again.pending()][-1] == (FailureLog.OTHER, 3)


def test_a_guard_counts_an_earlier_runs_failures_against_the_node_only() -> None:
    g = Guard(Limits(per_node=Policy(free=2, base=10, cap=60, forget=3600), ceiling=3))
    g.restore([100.0, 90.0, 95.0])
    assert g.ceiling.wait(100.0) == 86_400 - 10  # the oldest leaves the day's window first
    assert g.node.failures(NODE_KEY, 100.0) == 3
    assert g.sources.failures("10.0.0.1", 100.0) == 0 and g.names.failures("ws-a", 100.0) == 0


def test_source_key_counts_an_ipv6_host_by_its_64() -> None:
    assert source_key("192.168.1.7") == "192.168.1.7"
    assert source_key("fd00::1:2:3:4") == source_key("fd00::ffff:1:2:3") == "fd00::/64"
    assert source_key("::ffff:192.168.1.7") == "192.168.1.7"
    assert source_key(None) == "unknown"


# --- the service ----------------------------------------------------------------------------------


async def test_hello_is_public_and_carries_no_secret(
    node: Node, session: aiohttp.ClientSession, test_ca: pki.CertificateAuthority
) -> None:
    status, _, body = await node.call(session, "GET", proto.HELLO_PATH)
    assert status == 200
    assert set(body) == {"version", "node", "server_url", "ca_bundle_pem", "kdf", "exchange_ttl"}
    assert set(body["kdf"]) == {"alg", "n", "r", "p", "salt", "dklen"}  # never the hash
    assert body["ca_bundle_pem"].encode() == test_ca.cert_pem and body["version"] == 2
    assert secrets_in(json.dumps(body)) == []


async def test_right_password_gives_a_client_certificate(
    node: Node, session: aiohttp.ClientSession, test_ca: pki.CertificateAuthority
) -> None:
    attempt = await node.exchange(session, cn="ws-empfang")
    assert attempt.status == 200, attempt.body
    assert set(attempt.body) == {"confirm", "payload"}  # the rest is sealed
    payload = attempt.payload()
    cert = pki.load_cert_pem(payload.certificate_pem)
    assert attempt.key is not None and pki.key_matches(cert, attempt.key)
    assert pki.issued_by(cert, test_ca.cert)
    assert pki.names_of(cert) == proto.workstation_names("ws-empfang")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert payload.ca_bundle_pem == test_ca.cert_pem and payload.node == "node-a"
    assert payload.server_url == APP_URL.format(address=node.service.address)


async def test_wrong_password_is_refused_counted_and_uses_up_the_exchange(
    node: Node, session: aiohttp.ClientSession
) -> None:
    attempt = await node.exchange(session, OTHER_PASSWORD)
    assert (attempt.status, attempt.error) == (401, "wrong_password")
    assert set(attempt.body) == {"error", "message"}  # nothing keyed: no MAC, no ciphertext
    assert sum(f.count for f in node.service.failures.pending()) == 1
    # The same exchange cannot be tried again with the right password.
    assert len(node.service.exchanges) == 0


async def test_a_stale_exchange_is_not_a_wrong_password(
    node: Node, session: aiohttp.ClientSession
) -> None:
    attempt = await node.exchange(session, before_finish=lambda: node.clock.advance(31))
    assert (attempt.status, attempt.error) == (410, "exchange_expired")
    assert node.service.failures.pending() == []
    assert node.service.guard.ceiling.count(node.clock()) == 0
    assert (await node.exchange(session)).status == 200


async def test_failures_back_off_exponentially_per_source(
    node: Node, session: aiohttp.ClientSession, loopback: Callable[[], str]
) -> None:
    for _ in range(5):
        assert (await node.exchange(session, OTHER_PASSWORD)).status == 401
    (source,) = {f.source for f in node.service.failures.pending()}
    assert node.service.guard.sources.failures(source, node.clock()) == 5
    attempt = await node.exchange(session)  # even the right one waits
    assert (attempt.status, attempt.error) == (429, "rate_limited")
    assert attempt.headers["Retry-After"] == "2"
    assert len(node.service.exchanges) == 0  # refused before any work
    # Another address is not affected.
    async with session_from(loopback()) as other:
        assert (await node.exchange(other, cn="ws-labor")).status == 200
    node.clock.advance(2)
    assert (await node.exchange(session, OTHER_PASSWORD)).status == 401  # the 6th failure
    assert (await node.exchange(session)).headers["Retry-After"] == "4"  # doubled
    node.clock.advance(4)
    assert (await node.exchange(session)).status == 200  # a success clears the address
    assert node.service.guard.sources.failures(source, node.clock()) == 0


async def test_a_claimed_name_and_the_node_back_off_across_addresses(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
) -> None:
    limits = Limits(
        per_name=Policy(free=2, base=8, cap=60, forget=3600),
        per_node=Policy(free=4, base=16, cap=60, forget=3600),
        ceiling=6,
        ceiling_window=3600,
    )
    address = loopback()
    clock = FakeClock()
    async with make_service(
        issue_cert(address), address, test_ca, clock=clock, limits=limits
    ) as service:
        n = Node(service, clock, test_ca.cert_pem)

        async def guess(cn: str) -> Attempt:
            async with session_from(loopback()) as s:  # a fresh address every time
                return await n.exchange(s, OTHER_PASSWORD, cn=cn)

        assert (await guess("ws-empfang")).status == 401
        assert (await guess("ws-empfang")).status == 401
        blocked = await guess("ws-empfang")
        assert (blocked.status, blocked.headers["Retry-After"]) == (429, "8")
        assert (await guess("ws-labor")).status == 401
        assert (await guess("ws-zimmer")).status == 401  # 4 failures on the node
        attempt = await guess("ws-other")
        assert (attempt.status, attempt.headers["Retry-After"]) == (429, "16")
        clock.advance(16)
        assert (await guess("ws-a")).status == 401
        clock.advance(32)
        assert (await guess("ws-b")).status == 401  # 6 in the hour: the ceiling
        clock.advance(120)
        attempt = await guess("ws-c")
        assert attempt.status == 429
        assert int(attempt.headers["Retry-After"]) == 3600 - 16 - 32 - 120
        assert "too many failed attempts" in attempt.body["message"]


async def _open_then_finish_all(n: Node, sources: list[str], per_source: int) -> list[int]:
    """Each source opens ``per_source`` exchanges first, then finishes them all with a wrong
    password: the statuses of the finishes, in order."""
    hello = proto.parse_hello(json.dumps(n.service.hello.to_json()).encode())
    opened: list[tuple[str, proto.FinishRequest]] = []
    for address in sources:
        async with session_from(address) as s:
            for _ in range(per_source):
                pake = proto.WorkstationPAKE(OTHER_PASSWORD, hello.kdf)
                status, _, body = await n.call(
                    s, "POST", proto.START_PATH, proto.StartRequest("ws-x", pake.msg_a).to_json()
                )
                assert status == 200, body
                start = proto.parse_start_answer(json.dumps(body).encode())
                keys = proto.SessionKeys.derive(
                    pake.finish(start.msg_b),
                    proto.transcript(hello, start.exchange, "ws-x", pake.msg_a, start.msg_b),
                )
                finish = proto.FinishRequest(
                    start.exchange,
                    keys.confirmation(proto.Side.WORKSTATION),
                    keys.seal(proto.Side.NODE, workstation_csr("ws-x")[1]),
                )
                opened.append((address, finish))
    statuses = []
    for address, finish in opened:
        async with session_from(address) as s:
            status, headers, body = await n.call(s, "POST", proto.FINISH_PATH, finish.to_json())
        statuses.append(status)
        if status == 429:
            assert body["error"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    return statuses


async def test_exchanges_opened_in_advance_buy_no_extra_guesses(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
) -> None:
    """The limits are checked again at finish: one source's 4 open exchanges, or many sources'
    exchanges against the node's ceiling, spend only what the backoff allows; the rest 429."""
    generous = Policy(free=100, base=1, cap=60, forget=3600)
    limits = Limits(
        per_source=Policy(free=2, base=10, cap=60, forget=3600),
        per_name=generous,
        per_node=generous,
        ceiling=5,
        ceiling_window=3600,
    )
    address = loopback()
    clock = FakeClock()
    async with make_service(
        issue_cert(address), address, test_ca, clock=clock, limits=limits
    ) as service:
        n = Node(service, clock, test_ca.cert_pem)
        # One source, 4 exchanges opened first: 2 free failures, then it must wait.
        assert await _open_then_finish_all(n, [loopback()], 4) == [401, 401, 429, 429]
        assert sum(f.count for f in service.failures.pending()) == 2
        assert len(service.exchanges) == 0  # a refused finish uses its exchange up
        # Three more sources, 2 each: the node's ceiling (5) lets 3 more through, no more.
        statuses = await _open_then_finish_all(n, [loopback() for _ in range(3)], 2)
        assert statuses == [401, 401, 401, 429, 429, 429]
        assert service.guard.ceiling.count(clock()) == 5
        assert sum(f.count for f in service.failures.pending()) == 5


async def test_a_flood_of_starts_cannot_evict_an_exchange_in_progress(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
) -> None:
    limits = Limits(open_per_source=2, open_total=6)
    address = loopback()
    clock = FakeClock()
    async with make_service(
        issue_cert(address), address, test_ca, clock=clock, limits=limits
    ) as service:
        n = Node(service, clock, test_ca.cert_pem)
        flooder_ip = loopback()
        flood_statuses: list[int] = []

        async def flood() -> None:
            ws = proto.WorkstationPAKE(OTHER_PASSWORD, service.hello.kdf)
            start = proto.StartRequest("ws-flood", ws.msg_a).to_json()
            async with session_from(flooder_ip) as s:
                for _ in range(4):
                    flood_statuses.append((await n.call(s, "POST", proto.START_PATH, start))[0])
            for _ in range(3):  # more addresses, until the node is full
                async with session_from(loopback()) as s:
                    for _ in range(2):
                        flood_statuses.append((await n.call(s, "POST", proto.START_PATH, start))[0])

        # A workstation starts; the flood comes before it finishes.
        async with session_from(loopback()) as legit:
            hello = await n.hello(legit)
            pake = proto.WorkstationPAKE(PASSWORD, hello.kdf)
            status, _, body = await n.call(
                legit, "POST", proto.START_PATH, proto.StartRequest("ws-x", pake.msg_a).to_json()
            )
            assert status == 200
            await flood()
            assert flood_statuses[:2] == [200, 200] and flood_statuses[2:4] == [429, 429]
            assert 503 in flood_statuses  # the node is full: refused, nothing evicted
            assert len(service.exchanges) == 6
            start = proto.parse_start_answer(json.dumps(body).encode())
            keys = proto.SessionKeys.derive(
                pake.finish(start.msg_b),
                proto.transcript(hello, start.exchange, "ws-x", pake.msg_a, start.msg_b),
            )
            finish = proto.FinishRequest(
                start.exchange,
                keys.confirmation(proto.Side.WORKSTATION),
                keys.seal(proto.Side.NODE, workstation_csr("ws-x")[1]),
            )
            status, _, body = await n.call(legit, "POST", proto.FINISH_PATH, finish.to_json())
            assert status == 200, body
        # The flood's exchanges expire unconfirmed: not one counts as a wrong password.
        clock.advance(31)
        assert service.exchanges.purge(clock()) == 5
        assert service.failures.pending() == []


async def test_old_client_paths_say_upgrade(node: Node, session: aiohttp.ClientSession) -> None:
    status, _, body = await node.call(session, "GET", proto.V1_BOOTSTRAP_PATH)
    assert status == 200 and body["version"] == 2 and body["error"] == "upgrade_required"
    assert set(body) == {"version", "error", "message"}  # nothing an old attack could use
    status, _, body = await node.call(session, "POST", proto.V1_ENROL_PATH, {"nonce": "x"})
    assert (status, body["error"]) == (410, "upgrade_required")


async def test_bad_requests(node: Node, session: aiohttp.ClientSession) -> None:
    assert (await node.call(session, "POST", proto.START_PATH, b"{not json"))[0] == 400
    assert (await node.call(session, "POST", proto.START_PATH, {"version": 2}))[0] == 400
    deep = b"[" * 30000 + b"]" * 30000  # the decoder's RecursionError: a 400, not a 500
    status, _, body = await node.call(session, "POST", proto.START_PATH, deep)
    assert (status, body["error"]) == (400, "bad_request"), body
    big = b'{"x": "' + b"a" * (proto.MAX_REQUEST_BYTES + 10) + b'"}'
    assert (await node.call(session, "POST", proto.START_PATH, big))[0] == 413
    bad_point = proto.StartRequest("ws-a", b"A" + b"\xff" * 32).to_json()
    status, _, body = await node.call(session, "POST", proto.START_PATH, bad_point)
    assert (status, body["error"]) == (400, "bad_request")
    assert len(node.service.exchanges) == 0  # the reserved slot was given back
    # No valid point: counted as a wrong password is (session 70: test_bootstrap_worker).
    assert [f.count for f in node.service.failures.pending()] == [1]
    attempt = await node.exchange(session, cn="ws-a", csr_cn="ws-b")  # CSR for another name
    assert (attempt.status, attempt.error) == (422, "bad_csr")
    assert [f.count for f in node.service.failures.pending()] == [1]  # the password was right


async def test_sign_failure_is_502_and_not_counted(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
    session: aiohttp.ClientSession,
) -> None:
    async def broken(csr_pem: bytes) -> bytes:
        raise RuntimeError("leader unreachable")

    address = loopback()
    async with make_service(issue_cert(address), address, test_ca, sign=broken) as service:
        n = Node(service, FakeClock(), test_ca.cert_pem)
        for _ in range(6):
            attempt = await n.exchange(session)
            assert (attempt.status, attempt.error) == (502, "sign_failed")


async def test_new_verifier_replaces_the_old_password(
    node: Node, session: aiohttp.ClientSession
) -> None:
    node.service.set_verifier(password.make_verifier(OTHER_PASSWORD, **password.TEST_PARAMS))
    assert (await node.exchange(session, PASSWORD)).status == 401
    assert (await node.exchange(session, OTHER_PASSWORD)).status == 200


@pytest.mark.open_keys  # (a key others can read, on purpose)
async def test_key_file_readable_by_others_is_refused(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
) -> None:
    address = loopback()
    cert = issue_cert(address)
    os.chmod(cert.key_file, 0o640)
    service = make_service(cert, address, test_ca)
    with pytest.raises(UnsafePermissions, match="chmod 600"):
        await service.start()
    await service.stop()


async def test_logs_name_reasons_but_no_secrets(node: Node, session: aiohttp.ClientSession) -> None:
    with structlog.testing.capture_logs() as events:
        wrong = await node.exchange(session, OTHER_PASSWORD)
        right = await node.exchange(session)
    kinds = [e["event"] for e in events]
    assert kinds.count("bootstrap.exchange_started") == 2
    assert "bootstrap.password_refused" in kinds and "bootstrap.enrolled" in kinds
    refused = next(e for e in events if e["event"] == "bootstrap.password_refused")
    assert refused["workstation"] == "ws-empfang" and refused["failures"] == 1
    dump = json.dumps(events, default=str)
    assert secrets_in(dump) == []
    assert right.keys is not None and wrong.keys is not None
    for keys in (right.keys, wrong.keys):
        assert keys.confirmation(proto.Side.WORKSTATION) not in dump
        assert keys.confirmation(proto.Side.NODE) not in dump


async def test_service_answers_concurrent_exchanges(
    node: Node, session: aiohttp.ClientSession, loopback: Callable[[], str]
) -> None:
    async def one(i: int) -> int:
        async with session_from(loopback()) as s:
            return (await node.exchange(s, cn=f"ws-pc{i}")).status

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), timeout=60)
    assert results == [200] * 8
