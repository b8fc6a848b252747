"""The bootstrap protocol (tlsroll.bootstrap_protocol) and the agent's service on 9443
(nodeagent.bootstrap_server).

Protocol tests are pure. Service tests run the real aiohttp https listener on a loopback address
with the seed's port, a certificate from the test CA, and an injected clock; requests go over
real TLS, verified against the test CA.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeagent.bootstrap_server import BootstrapService, NonceStore, RateLimiter
from tests.conftest import IssuedCert
from tlsroll import bootstrap_protocol as proto
from tlsroll import password, pki
from tlsroll.defaults import BOOTSTRAP_PORT
from tlsroll.errors import UnsafePermissions
from tlsroll.tls import client_context

PASSWORD = "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"
OTHER_PASSWORD = "zz7q-x2mf-9vhc-3ptw-a8ke-rn5d"
VERIFIER = password.make_verifier(PASSWORD, **password.TEST_PARAMS)
TIMEOUT = aiohttp.ClientTimeout(total=10)
APP_URL = "https://{address}:8443/praxis_live/"


# --- helpers shared with test_workstation -------------------------------------------------------


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


def make_service(
    cert: IssuedCert,
    address: str,
    ca: pki.CertificateAuthority,
    *,
    clock: Callable[[], float] | None = None,
    verifier: password.Verifier = VERIFIER,
    port: int = BOOTSTRAP_PORT,
    sign: Callable[[bytes], Any] | None = None,
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
        clock=clock or FakeClock(),
    )


def workstation_csr(cn: str = "ws-empfang") -> tuple[pki.PrivateKey, bytes]:
    key = pki.generate_key()
    return key, pki.csr_to_pem(pki.make_csr(key, proto.workstation_names(cn)))


def secrets_in(text: str) -> list[str]:
    """Which secrets (password, verifier hash, derived keys) occur in ``text``."""
    keys = proto.Keys.from_verifier(VERIFIER)
    found = [s for s in (PASSWORD, VERIFIER["hash"]) if s in text]
    found += [
        name
        for name, k in (("mac_key", keys.mac_key), ("proof_key", keys.proof_key))
        if k.hex() in text or base64.b64encode(k).decode() in text
    ]
    return found


# --- fixtures -----------------------------------------------------------------------------------


class Node:
    def __init__(self, service: BootstrapService, clock: FakeClock, ca_pem: bytes) -> None:
        self.service = service
        self.clock = clock
        self.base = f"https://{service.address}:{service.bound_port}"
        self.ssl = client_context(ca_pem)

    async def get(self, session: aiohttp.ClientSession) -> proto.BootstrapAnswer:
        async with session.get(self.base + proto.BOOTSTRAP_PATH, ssl=self.ssl) as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == "no-store"
            return proto.parse_answer(await resp.read())

    async def enrol(
        self, session: aiohttp.ClientSession, body: object
    ) -> tuple[int, dict[str, Any], Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with session.post(
            self.base + proto.ENROL_PATH,
            data=data,
            ssl=self.ssl,
            headers={"Content-Type": "application/json"},
        ) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)

    async def enrol_with(
        self,
        session: aiohttp.ClientSession,
        secret: str = PASSWORD,
        *,
        answer: proto.BootstrapAnswer | None = None,
        csr_pem: bytes | None = None,
    ) -> tuple[int, dict[str, Any], Any]:
        answer = answer or await self.get(session)
        csr_pem = csr_pem or workstation_csr()[1]
        keys = proto.Keys.from_password(secret, answer.kdf)
        proof = proto.enrol_proof(keys, nonce=answer.nonce, csr_pem=csr_pem, node=answer.node)
        return await self.enrol(
            session, {"nonce": answer.nonce, "csr_pem": csr_pem.decode(), "proof": proof}
        )


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


# --- canonical encoding and MAC -----------------------------------------------------------------


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


def test_keys_from_password_match_keys_from_verifier() -> None:
    kdf = proto.KDF.of_verifier(VERIFIER)
    assert kdf.to_json()["salt"] == VERIFIER["salt"] and kdf.dklen == 32
    assert proto.Keys.from_password(PASSWORD, kdf) == proto.Keys.from_verifier(VERIFIER)
    assert proto.Keys.from_password(OTHER_PASSWORD, kdf) != proto.Keys.from_verifier(VERIFIER)
    assert repr(proto.Keys.from_verifier(VERIFIER)) == "Keys()"  # never in a traceback


def _sealed() -> bytes:
    payload = {
        "version": 1,
        "node": "node-a",
        "server_url": "https://192.168.1.5:8443/praxis_live/",
        "ca_bundle_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "kdf": proto.KDF.of_verifier(VERIFIER).to_json(),
        "nonce": "n" * 43,
        "expires_in": 120,
    }
    return json.dumps(proto.seal(payload, proto.Keys.from_verifier(VERIFIER))).encode()


def test_mac_verifies_with_the_password_only() -> None:
    answer = proto.parse_answer(_sealed())
    proto.verify_answer(answer, proto.Keys.from_password(PASSWORD, answer.kdf))
    with pytest.raises(proto.BootstrapError) as err:
        proto.verify_answer(answer, proto.Keys.from_password(OTHER_PASSWORD, answer.kdf))
    assert err.value.reason is proto.BootstrapReason.MAC_MISMATCH


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(node="node-b"),
        lambda d: d.update(server_url="https://10.0.0.66:8443/praxis_live/"),
        lambda d: d.update(ca_bundle_pem=d["ca_bundle_pem"].replace("MIIB", "MIIC")),
        lambda d: d.update(nonce="m" * 43),
        lambda d: d.update(expires_in=99999),
        lambda d: d["kdf"].update(p=2),
        lambda d: d.update(extra="added field"),
        lambda d: d.update(mac=d["mac"][:-1] + ("0" if d["mac"][-1] != "0" else "1")),
    ],
)
def test_mac_covers_every_field(change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(_sealed())
    change(data)
    answer = proto.parse_answer(json.dumps(data).encode())
    with pytest.raises(proto.BootstrapError, match="does not verify"):
        proto.verify_answer(answer, proto.Keys.from_password(PASSWORD, answer.kdf))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.pop("mac"), proto.BootstrapReason.MALFORMED),
        (lambda d: d.update(version=2), proto.BootstrapReason.VERSION),
        (lambda d: d.update(mac="zz"), proto.BootstrapReason.MALFORMED),
        (lambda d: d["kdf"].update(n=2**20), proto.BootstrapReason.BAD_KDF),  # 1 GiB: refused
        (lambda d: d["kdf"].update(n=1000), proto.BootstrapReason.BAD_KDF),
        (lambda d: d["kdf"].update(salt="c2hvcnQ="), proto.BootstrapReason.BAD_KDF),
        (lambda d: d["kdf"].update(alg="md5"), proto.BootstrapReason.BAD_KDF),
        (lambda d: d["kdf"].update(r=True), proto.BootstrapReason.BAD_KDF),
    ],
)
def test_malformed_answers_are_refused_before_any_kdf(
    change: Callable[[dict[str, Any]], None], reason: proto.BootstrapReason
) -> None:
    data = json.loads(_sealed())
    change(data)
    with pytest.raises(proto.BootstrapError) as err:
        proto.parse_answer(json.dumps(data).encode())
    assert err.value.reason is reason


def test_enrol_proof_is_bound_to_nonce_csr_and_node() -> None:
    keys = proto.Keys.from_verifier(VERIFIER)
    csr = workstation_csr()[1]
    proof = proto.enrol_proof(keys, nonce="n1", csr_pem=csr, node="node-a")
    assert proto.check_enrol_proof(keys, proof, nonce="n1", csr_pem=csr, node="node-a")
    assert not proto.check_enrol_proof(keys, proof, nonce="n2", csr_pem=csr, node="node-a")
    assert not proto.check_enrol_proof(keys, proof, nonce="n1", csr_pem=csr + b"\n", node="node-a")
    assert not proto.check_enrol_proof(keys, proof, nonce="n1", csr_pem=csr, node="node-b")
    other = proto.Keys.from_password(OTHER_PASSWORD, proto.KDF.of_verifier(VERIFIER))
    assert not proto.check_enrol_proof(other, proof, nonce="n1", csr_pem=csr, node="node-a")


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
    with pytest.raises(proto.BootstrapError):
        proto.check_workstation_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n")


@pytest.mark.parametrize(
    ("label", "cn"),
    [
        ("Empfang-PC.praxis.local", "ws-empfang-pc"),
        ("ws-labor", "ws-labor"),
        ("Zimmer 3 (Ärztin)", "ws-zimmer-3-aerztin"),
        ("Café", "ws-cafe"),
        ("---", "ws-workstation"),
        ("x" * 80, "ws-" + "x" * 60),
    ],
)
def test_workstation_cn(label: str, cn: str) -> None:
    assert proto.workstation_cn(label) == cn
    assert proto.WORKSTATION_CN.match(cn)


def test_nonce_store_and_rate_limiter_are_pure() -> None:
    nonces = NonceStore(ttl=120, limit=3)
    a = nonces.issue(0)
    assert nonces.consume(a, 119.9) and not nonces.consume(a, 1)
    b = nonces.issue(0)
    assert not nonces.consume(b, 120)  # expired
    for _ in range(5):
        nonces.issue(200)
    assert len(nonces) == 3  # bounded
    limiter = RateLimiter(max_failures=2, window=60)
    limiter.failed("a", 0)
    assert limiter.retry_after("a", 1) is None
    limiter.failed("a", 10)
    assert limiter.retry_after("a", 10) == 50 and limiter.retry_after("b", 10) is None
    assert limiter.retry_after("a", 60.5) is None  # the first failure left the window


# --- the service ----------------------------------------------------------------------------------


async def test_bootstrap_answer_verifies_with_the_password(
    node: Node, session: aiohttp.ClientSession, test_ca: pki.CertificateAuthority
) -> None:
    answer = await node.get(session)
    proto.verify_answer(answer, proto.Keys.from_password(PASSWORD, answer.kdf))
    assert answer.node == "node-a" and answer.expires_in == 120
    assert answer.server_url == APP_URL.format(address=node.service.address)
    assert answer.ca_bundle_pem == test_ca.cert_pem
    assert set(answer.raw) == {
        "version",
        "node",
        "server_url",
        "ca_bundle_pem",
        "kdf",
        "nonce",
        "expires_in",
        "mac",
    }
    assert "hash" not in answer.raw["kdf"]  # the verifier's hash is never sent
    assert (await node.get(session)).nonce != answer.nonce


async def test_enrol_returns_a_client_certificate(
    node: Node, session: aiohttp.ClientSession, test_ca: pki.CertificateAuthority
) -> None:
    key, csr = workstation_csr("ws-empfang")
    status, _, body = await node.enrol_with(session, csr_pem=csr)
    assert status == 200, body
    cert = pki.load_cert_pem(body["certificate_pem"].encode())
    assert pki.key_matches(cert, key) and pki.issued_by(cert, test_ca.cert)
    assert pki.names_of(cert) == proto.workstation_names("ws-empfang")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert body["ca_bundle_pem"].encode() == test_ca.cert_pem


async def test_replayed_proof_is_refused(node: Node, session: aiohttp.ClientSession) -> None:
    answer = await node.get(session)
    csr = workstation_csr()[1]
    keys = proto.Keys.from_password(PASSWORD, answer.kdf)
    proof = proto.enrol_proof(keys, nonce=answer.nonce, csr_pem=csr, node=answer.node)
    request = {"nonce": answer.nonce, "csr_pem": csr.decode(), "proof": proof}
    assert (await node.enrol(session, request))[0] == 200
    status, _, body = await node.enrol(session, request)
    assert (status, body["error"]) == (401, "nonce_invalid")


async def test_expired_nonce_is_refused(node: Node, session: aiohttp.ClientSession) -> None:
    answer = await node.get(session)
    node.clock.advance(120)
    status, _, body = await node.enrol_with(session, answer=answer)
    assert (status, body["error"]) == (401, "nonce_invalid")


async def test_wrong_password_is_refused_and_uses_up_the_nonce(
    node: Node, session: aiohttp.ClientSession
) -> None:
    answer = await node.get(session)
    status, _, body = await node.enrol_with(session, OTHER_PASSWORD, answer=answer)
    assert (status, body["error"]) == (401, "wrong_password")
    status, _, body = await node.enrol_with(session, PASSWORD, answer=answer)
    assert (status, body["error"]) == (401, "nonce_invalid")


async def test_failures_are_rate_limited_per_source(
    node: Node, session: aiohttp.ClientSession, loopback: Callable[[], str]
) -> None:
    for _ in range(5):
        assert (await node.enrol_with(session, OTHER_PASSWORD))[0] == 401
    node.clock.advance(10)
    status, headers, body = await node.enrol_with(session, PASSWORD)  # even the right one
    assert (status, body["error"]) == (429, "rate_limited")
    assert headers["Retry-After"] == "50"
    # Another source address is not affected.
    connector = aiohttp.TCPConnector(local_addr=(loopback(), 0))
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as other:
        assert (await node.enrol_with(other, PASSWORD))[0] == 200
    node.clock.advance(51)
    assert (await node.enrol_with(session, PASSWORD))[0] == 200


async def test_bad_requests(node: Node, session: aiohttp.ClientSession) -> None:
    assert (await node.enrol(session, b"{not json"))[0] == 400
    assert (await node.enrol(session, {"nonce": "x"}))[0] == 400
    status, _, _ = await node.enrol(
        session, b'{"x": "' + b"a" * (proto.MAX_REQUEST_BYTES + 10) + b'"}'
    )
    assert status == 413
    bad_csr = pki.csr_to_pem(
        pki.make_csr(pki.generate_key(), pki.Names.of("node-b", ["127.0.0.9"]))
    )
    status, _, body = await node.enrol_with(session, csr_pem=bad_csr)
    assert (status, body["error"]) == (422, "bad_csr")


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
            status, _, body = await n.enrol_with(session)
            assert (status, body["error"]) == (502, "sign_failed")


async def test_new_verifier_replaces_the_old_password(
    node: Node, session: aiohttp.ClientSession
) -> None:
    node.service.set_verifier(password.make_verifier(OTHER_PASSWORD, **password.TEST_PARAMS))
    answer = await node.get(session)
    with pytest.raises(proto.BootstrapError):
        proto.verify_answer(answer, proto.Keys.from_password(PASSWORD, answer.kdf))
    proto.verify_answer(answer, proto.Keys.from_password(OTHER_PASSWORD, answer.kdf))
    assert (await node.enrol_with(session, PASSWORD, answer=answer))[2]["error"] == "wrong_password"
    assert (await node.enrol_with(session, OTHER_PASSWORD))[0] == 200


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
        answer = await node.get(session)
        await node.enrol_with(session, OTHER_PASSWORD, answer=answer)
        await node.enrol_with(session, answer=answer)
        await node.enrol_with(session)
    reasons = [e.get("reason") for e in events if e["event"] == "bootstrap.enrol_refused"]
    assert reasons == ["wrong_password", "nonce_invalid"]
    assert any(e["event"] == "bootstrap.enrolled" and e["cn"] == "ws-empfang" for e in events)
    dump = json.dumps(events, default=str)
    assert secrets_in(dump) == []
    assert answer.nonce not in dump and "proof" not in dump


async def test_service_answers_concurrent_requests(
    node: Node, session: aiohttp.ClientSession
) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(*(node.enrol_with(session) for _ in range(8))), timeout=30
    )
    assert [r[0] for r in results] == [200] * 8
