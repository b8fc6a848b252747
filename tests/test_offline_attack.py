"""The audit's offline attack, replayed against everything an attacker can capture.

The audit of protocol 1 fetched ``GET /v1/bootstrap`` once and then tried a word list offline:
the answer's MAC, keyed from the password, confirmed the right word. Here the same attacker
(the same word list, which contains the right password) gets everything protocol 2 lets it
capture, with real processes' sockets and the real workstation client:

1. a stranger's unauthenticated requests to the real node (hello, the v1 path, an exchange it
   starts with its own scalar and abandons, one it finishes with a guess);
2. a full exchange between the real client and the real node, recorded in plaintext by a
   proxy in between (more than a passive listener sees: TLS hides even this from one);
3. a fake node that the real client is tricked into talking to, which answers with its own
   scalar and records the client's messages.

For every candidate the attack runs what the attacker can compute: the password's scalar
``w_c`` (scrypt with the node's public salt, then SPAKE2's hash), the unblinded points
(``X* − w_c·M``, ``Y* − w_c·N``), and, with every ephemeral scalar the attacker holds, the
SPAKE2 key, the session keys, and a check of every confirmation and every sealed value it
captured. A candidate is *consistent* if the captured messages do not rule it out, and
*confirmed* if a check passes. The assertions: every candidate is consistent, none is
confirmed (so the right one is not singled out). Two controls show the checks themselves work:
protocol 1's MAC confirms exactly the right word, and the workstation's own ephemeral scalar
(which only it holds) confirms exactly the right word of the recorded exchange. A fake node
learns exactly one thing: whether the one candidate it chose for its answer was right.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from spake2.spake2 import finalize_SPAKE2

from tests.conftest import IssuedCert, next_loopback
from tests.test_bootstrap import (
    OTHER_PASSWORD,
    PASSWORD,
    TIMEOUT,
    FakeClock,
    Node,
    make_service,
    secrets_in,
    session_from,
)
from tlsroll import bootstrap_protocol as proto
from tlsroll import cli, pki
from tlsroll.defaults import BOOTSTRAP_PORT, HTTPS_PORT
from tlsroll.fsutil import PRIVATE, write_atomic
from tlsroll.tls import server_context

APP = "/praxis_live/"
GROUP = proto.PARAMS.group
M, N = proto.PARAMS.M, proto.PARAMS.N

# The audit's kind of list: the practice's words, seasons and years, a few generated-looking
# ones; the right password in the middle.
WORDS = [
    "praxis2026",
    "Sommer2026!",
    "passwort123",
    "Praxis-Dr-Beispiel",
    "tomedo_live",
    "qwertz123456",
    "Empfang2026",
    OTHER_PASSWORD,
    PASSWORD,
    "kd7q-x2mf-9vhc-3ptw-a8ke-rn5e",
    "Winter2025!",
    "admin1234",
    "geheim!geheim",
    "correct horse battery staple",
]


# --- what the attacker computes ---------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    word: str
    pw: bytes  # what SPAKE2 runs on: HMAC(scrypt(word, public salt), label)
    w: int  # its scalar
    scrypt: bytes


def candidates(kdf: proto.KDF) -> list[Candidate]:
    """Every word through what the node's public salt and parameters allow (scrypt each)."""
    return list(_candidates(kdf))


@functools.cache
def _candidates(kdf: proto.KDF) -> tuple[Candidate, ...]:
    """``candidates``, computed once per salt and parameters: every test's node has the same
    verifier (``tests.test_bootstrap.VERIFIER``), and 14 scrypts were most of a test's CPU."""
    out = []
    for word in WORDS:
        digest = proto.scrypt_hash(word, kdf)
        pw = proto.pake_password(digest)
        out.append(Candidate(word, pw, GROUP.password_to_scalar(pw), digest))
    return tuple(out)


def point(msg: bytes) -> Any:
    return GROUP.bytes_to_element(msg[1:])


def is_group_element(p: Any) -> bool:
    """A valid element of the prime-order group (not the identity): what a real exchange with
    this candidate would also have produced."""
    try:
        GROUP.bytes_to_element(p.to_bytes())
    except ValueError:
        return False
    return True


@dataclass
class Capture:
    """One exchange as the attacker saw it."""

    hello: proto.Hello
    workstation: str
    msg_a: bytes
    exchange: str = ""
    msg_b: bytes = b""
    confirms: dict[proto.Side, str] = field(default_factory=dict)
    sealed: dict[proto.Side, str] = field(default_factory=dict)
    raw: list[bytes] = field(default_factory=list)  # every body, as sent

    def keys(self, c: Candidate, k_point: Any) -> proto.SessionKeys:
        shared = finalize_SPAKE2(
            proto.ID_WORKSTATION,
            proto.ID_NODE,
            self.msg_a[1:],
            self.msg_b[1:],
            k_point.to_bytes(),
            c.pw,
        )
        t = proto.transcript(self.hello, self.exchange, self.workstation, self.msg_a, self.msg_b)
        return proto.SessionKeys.derive(shared, t)

    def confirmed_by(self, keys: proto.SessionKeys) -> bool:
        """Does anything keyed in the capture check out under ``keys``?"""
        for side, value in self.confirms.items():
            if keys.check_confirmation(side, value):
                return True
        for side, value in self.sealed.items():
            try:
                keys.open(side, value)
            except proto.BootstrapError:
                continue
            return True
        return False

    def consistent(self, c: Candidate) -> bool:
        """The captured points do not rule ``c`` out."""
        unblinded = [point(self.msg_a).add(M.scalarmult(-c.w))]
        if self.msg_b:
            unblinded.append(point(self.msg_b).add(N.scalarmult(-c.w)))
        return all(is_group_element(p) for p in unblinded)

    def confirmed_as_a(self, c: Candidate, x: int) -> bool:
        """With side A's scalar ``x``: ``K = x·(Y* − w_c·N)``."""
        k = point(self.msg_b).add(N.scalarmult(-c.w)).scalarmult(x)
        return self.confirmed_by(self.keys(c, k))

    def confirmed_as_b(self, c: Candidate, y: int) -> bool:
        """With side B's scalar ``y``: ``K = y·(X* − w_c·M)``."""
        k = point(self.msg_a).add(M.scalarmult(-c.w)).scalarmult(y)
        return self.confirmed_by(self.keys(c, k))


def v1_confirms(word_scrypt: bytes, answer: dict[str, Any]) -> bool:
    """The audit's check against a protocol-1 answer: its MAC, keyed from the password."""
    if "mac" not in answer:
        return False
    mac_key = hmac.digest(word_scrypt, b"tlsroll bootstrap mac v1", "sha256")
    body = proto.canonical({k: v for k, v in answer.items() if k != "mac"})
    return hmac.compare_digest(hmac.new(mac_key, body, "sha256").hexdigest(), answer["mac"])


def report(label: str, cands: list[Candidate], hits: list[str]) -> None:
    print(f"{label}: {len(cands)} candidates tried, confirmed: {hits or 'none'}")


# --- servers ------------------------------------------------------------------------------------


def issue(ca: pki.CertificateAuthority, address: str, directory: Path) -> IssuedCert:
    directory.mkdir(parents=True, exist_ok=True)
    key = pki.generate_key()
    cert = ca.issue(key.public_key(), pki.Names.of("node-a", [address]), server=True)
    pki.write_key(directory / "key.pem", key)
    pki.write_cert(directory / "cert.pem", cert)
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    return IssuedCert(directory / "cert.pem", directory / "key.pem", directory / "ca.pem", cert)


@asynccontextmanager
async def https_site(app: web.Application, address: str, port: int, cert: IssuedCert) -> Any:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        ctx = server_context(cert.cert_file, cert.key_file)
        await web.TCPSite(runner, address, port, ssl_context=ctx).start()
        yield
    finally:
        await runner.cleanup()


def app_server() -> web.Application:
    """The managed server's app path on 8443 (all the client's step (b) needs)."""

    async def app(_request: web.Request) -> web.Response:
        return web.json_response({"app": "praxis_live"})

    a = web.Application()
    a.router.add_get(APP, app)
    return a


@pytest.fixture
def run_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """The real workstation client (``tlsroll client test-connection``) in a worker thread."""

    async def run(url: str, secret: str, settings: str, *extra: str) -> tuple[int, str]:
        pw = tmp_path / f"pw-{secrets.token_hex(4)}"
        write_atomic(pw, (secret + "\n").encode(), PRIVATE)
        argv = [
            "client",
            "test-connection",
            url,
            "--password-file",
            str(pw),
            "--yes",
            "--timeout",
            "5",
            "--settings-dir",
            str(tmp_path / settings),
            "--name",
            "empfang",  # (not the host's name: "localhost" names no PC)
            *extra,
        ]
        with structlog.testing.capture_logs():
            code = await asyncio.wait_for(asyncio.to_thread(cli.main, argv), 60)
        out, err = capsys.readouterr()
        assert secrets_in(out + err) == []
        return code, out + err

    return run


@pytest.fixture
def scalars(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The ephemeral scalars of the workstation's exchanges: only for the control (an attacker
    never has them)."""
    seen: list[int] = []
    original = proto.WorkstationPAKE

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, secret: str, kdf: proto.KDF) -> None:
            super().__init__(secret, kdf)
            seen.append(self._side.xy_scalar)

    monkeypatch.setattr(proto, "WorkstationPAKE", Recording)
    yield seen


@pytest.fixture
async def real_node(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
) -> AsyncIterator[Node]:
    address = loopback()
    clock = FakeClock()
    service = make_service(issue_cert(address, "node-a"), address, test_ca, clock=clock)
    async with service:
        yield Node(service, clock, test_ca.cert_pem)


# --- 1. a stranger's requests to the real node ----------------------------------------------------


async def test_a_strangers_requests_confirm_no_candidate(
    real_node: Node, loopback: Callable[[], str]
) -> None:
    async with session_from(loopback()) as s:
        _, _, hello_body = await real_node.call(s, "GET", proto.HELLO_PATH)
        _, _, v1_body = await real_node.call(s, "GET", proto.V1_BOOTSTRAP_PATH)
        hello = proto.parse_hello(json.dumps(hello_body).encode())
        cands = candidates(hello.kdf)
        right = next(c for c in cands if c.word == PASSWORD)

        # Protocol 1 (the audit, as a control): its MAC singled out the right word.
        old_answer = {"version": 1, "node": "node-a", "nonce": "n" * 43}
        mac_key = hmac.digest(right.scrypt, b"tlsroll bootstrap mac v1", "sha256")
        old_answer["mac"] = hmac.new(mac_key, proto.canonical(old_answer), "sha256").hexdigest()
        assert [c.word for c in cands if v1_confirms(c.scrypt, old_answer)] == [PASSWORD]
        # The same check against what a v2 node answers on the v1 path: nothing to check.
        assert [c.word for c in cands if v1_confirms(c.scrypt, v1_body)] == []

        # The stranger plays the workstation with its own scalar x, blinded with a guess.
        captures: list[tuple[Capture, int]] = []
        for guess in (cands[0], cands[1]):
            x = GROUP.random_scalar(os.urandom)
            msg_a = b"A" + GROUP.Base.scalarmult(x).add(M.scalarmult(guess.w)).to_bytes()
            cap = Capture(hello, "ws-fremd", msg_a)
            status, _, body = await real_node.call(
                s, "POST", proto.START_PATH, proto.StartRequest(cap.workstation, msg_a).to_json()
            )
            assert status == 200 and set(body) == {"exchange", "msg_b", "expires_in"}
            start = proto.parse_start_answer(json.dumps(body).encode())
            cap.exchange, cap.msg_b = start.exchange, start.msg_b
            captures.append((cap, x))
        # It finishes the second with a confirmation for its guess: a 401, nothing keyed.
        cap, x = captures[1]
        keys = cap.keys(cands[1], point(cap.msg_b).add(N.scalarmult(-cands[1].w)).scalarmult(x))
        finish = proto.FinishRequest(
            cap.exchange, keys.confirmation(proto.Side.WORKSTATION), keys.seal(proto.Side.NODE, b"")
        )
        status, _, body = await real_node.call(s, "POST", proto.FINISH_PATH, finish.to_json())
        assert (status, set(body)) == (401, {"error", "message"})

    for i, (cap, x) in enumerate(captures):
        consistent = [c.word for c in cands if cap.consistent(c)]
        confirmed = [c.word for c in cands if cap.confirmed_as_a(c, x)]
        report(f"stranger, exchange {i + 1}", cands, confirmed)
        assert consistent == WORDS  # every candidate fits what the node sent
        assert confirmed == []  # and none, the right one included, is singled out
    # One counted failure for the one guess it sent; the abandoned exchange counts nothing.
    assert sum(f.count for f in real_node.service.failures.pending()) == 1


# --- 2. a full exchange, recorded -----------------------------------------------------------------


async def test_a_recorded_exchange_confirms_no_candidate(
    test_ca: pki.CertificateAuthority,
    tmp_path: Path,
    run_client: Callable[..., Any],
    scalars: list[int],
) -> None:
    """A proxy on 9443 (its own certificate: the client cannot check TLS before the exchange)
    forwards everything to the real node on 9444 and records every body in plaintext."""
    address = next_loopback()
    node_cert = issue(test_ca, address, tmp_path / "node")
    proxy_cert = issue(pki.CertificateAuthority.create("on-path"), address, tmp_path / "proxy")
    recorded: list[tuple[str, bytes, bytes]] = []

    async def forward(request: web.Request) -> web.Response:
        sent = await request.read()
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
            s.request(
                request.method,
                f"https://{address}:9444{request.path_qs}",
                data=sent,
                headers={"Content-Type": "application/json"},
                ssl=False,
            ) as upstream,
        ):
            body = await upstream.read()
            status = upstream.status
        recorded.append((request.path, sent, body))
        return web.Response(body=body, status=status, content_type="application/json")

    proxy = web.Application()
    proxy.router.add_route("*", "/{tail:.*}", forward)
    service = make_service(node_cert, address, test_ca, port=9444)
    async with (
        https_site(app_server(), address, HTTPS_PORT, node_cert),
        https_site(proxy, address, BOOTSTRAP_PORT, proxy_cert),
        service,
    ):
        code, output = await run_client(f"https://{address}:{HTTPS_PORT}{APP}", PASSWORD, "ws")
    assert code == 0, output  # the workstation got its certificate through the recording proxy

    by_path = {path: (sent, body) for path, sent, body in recorded}
    hello = proto.parse_hello(by_path[proto.HELLO_PATH][1])
    start_req = proto.parse_start_request(by_path[proto.START_PATH][0])
    start = proto.parse_start_answer(by_path[proto.START_PATH][1])
    finish_req = proto.parse_finish_request(by_path[proto.FINISH_PATH][0])
    finish = proto.parse_finish_answer(by_path[proto.FINISH_PATH][1])
    cap = Capture(
        hello,
        start_req.workstation,
        start_req.msg_a,
        start.exchange,
        start.msg_b,
        confirms={proto.Side.WORKSTATION: finish_req.confirm, proto.Side.NODE: finish.confirm},
        sealed={proto.Side.NODE: finish_req.csr, proto.Side.WORKSTATION: finish.payload},
        raw=[b for _, sent, body in recorded for b in (sent, body)],
    )
    everything = b"".join(cap.raw).decode()
    assert PASSWORD not in everything and secrets_in(everything) == []
    # Only the public hello carries a certificate in clear; the client's is sealed.
    assert [path for path, _, body in recorded if b"BEGIN CERTIFICATE" in body] == [
        proto.HELLO_PATH
    ]

    cands = candidates(hello.kdf)
    # The observer holds no ephemeral scalar of this exchange; the best it can do is use its
    # own (as it would in any exchange it takes part in): fresh ones, on either side.
    own = [GROUP.random_scalar(os.urandom) for _ in range(2)]
    confirmed = [
        c.word for c in cands if cap.confirmed_as_a(c, own[0]) or cap.confirmed_as_b(c, own[1])
    ]
    report("observer of a full exchange", cands, confirmed)
    assert [c.word for c in cands if cap.consistent(c)] == WORDS
    assert confirmed == []
    # Control: with the workstation's own scalar (which never leaves it) the very same check
    # singles out the right word, and only it. So what stops the attack is that scalar.
    (x,) = scalars
    assert [c.word for c in cands if cap.confirmed_as_a(c, x)] == [PASSWORD]


# --- 3. a fake node -------------------------------------------------------------------------------


@dataclass
class FakeNode:
    """An attacker's bootstrap service: the real node's public hello, its own scalar ``y``, a
    Y* blinded with the one candidate it bets on; it records what the workstation sends."""

    hello_body: dict[str, Any]
    bet: Candidate
    y: int = 0
    captures: list[Capture] = field(default_factory=list)
    finish_answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # then 401

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(proto.HELLO_PATH, self.hello)
        app.router.add_post(proto.START_PATH, self.start)
        app.router.add_post(proto.FINISH_PATH, self.finish)
        return app

    async def hello(self, _request: web.Request) -> web.Response:
        return web.json_response(self.hello_body)

    async def start(self, request: web.Request) -> web.Response:
        req = proto.parse_start_request(await request.read())
        self.y = GROUP.random_scalar(os.urandom)
        msg_b = b"B" + GROUP.Base.scalarmult(self.y).add(N.scalarmult(self.bet.w)).to_bytes()
        hello = proto.parse_hello(json.dumps(self.hello_body).encode())
        cap = Capture(hello, req.workstation, req.msg_a, secrets.token_urlsafe(32), msg_b)
        self.captures.append(cap)
        return web.json_response(
            proto.StartAnswer(cap.exchange, msg_b, proto.EXCHANGE_TTL).to_json()
        )

    async def finish(self, request: web.Request) -> web.Response:
        req = proto.parse_finish_request(await request.read())
        cap = self.captures[-1]
        cap.confirms[proto.Side.WORKSTATION] = req.confirm
        cap.sealed[proto.Side.NODE] = req.csr
        if self.finish_answers:
            status, body = self.finish_answers.pop(0)
            return web.json_response(body, status=status)
        return web.json_response(
            {"error": "wrong_password", "message": "wrong password"}, status=401
        )


@asynccontextmanager
async def fake_node_at(fake: FakeNode, tmp_path: Path) -> AsyncIterator[str]:
    """The fake node's bootstrap port and an app path on a fresh address; yields the URL."""
    address = next_loopback()  # where the workstation is sent
    evil_cert = issue(pki.CertificateAuthority.create("evil"), address, tmp_path / "evil")
    async with (
        https_site(app_server(), address, HTTPS_PORT, evil_cert),
        https_site(fake.app(), address, BOOTSTRAP_PORT, evil_cert),
    ):
        yield f"https://{address}:{HTTPS_PORT}{APP}"


@pytest.mark.parametrize("bet_on_the_right_one", [False, True])
async def test_a_fake_node_learns_only_whether_its_one_bet_was_right(
    real_node: Node,
    tmp_path: Path,
    run_client: Callable[..., Any],
    bet_on_the_right_one: bool,
) -> None:
    # The attacker copies the real node's public hello (same salt: the best case for it).
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        _, _, hello_body = await real_node.call(s, "GET", proto.HELLO_PATH)
    hello = proto.parse_hello(json.dumps(hello_body).encode())
    cands = candidates(hello.kdf)
    bet = next(c for c in cands if (c.word == PASSWORD) == bet_on_the_right_one)
    fake = FakeNode(hello_body, bet)

    address = next_loopback()  # where the workstation is sent
    evil_cert = issue(pki.CertificateAuthority.create("evil"), address, tmp_path / "evil")
    async with (
        https_site(app_server(), address, HTTPS_PORT, evil_cert),
        https_site(fake.app(), address, BOOTSTRAP_PORT, evil_cert),
    ):
        code, output = await run_client(f"https://{address}:{HTTPS_PORT}{APP}", PASSWORD, "ws")
    assert code == 9, output  # the workstation's admin sees "wrong password", nothing is written
    assert not (tmp_path / "ws").exists()

    (cap,) = fake.captures
    confirmed = [c.word for c in cands if cap.confirmed_as_b(c, fake.y)]
    report(f"fake node betting on {bet.word!r}", cands, confirmed)
    assert [c.word for c in cands if cap.consistent(c)] == WORDS
    if bet_on_the_right_one:
        assert confirmed == [PASSWORD]  # its one bet, paid for with one tricked run
    else:
        assert confirmed == []  # not even the right password, though it is in the list


@asynccontextmanager
async def switching_site(
    app: web.Application, address: str, port: int, first: IssuedCert, then: IssuedCert
) -> Any:
    """``https_site`` that shows ``first``'s certificate on its first connection and
    ``then``'s on every later one: a man in the middle that lets the hello through to the
    node and takes the exchange's connections itself."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    later = server_context(then.cert_file, then.key_file)
    shown: list[object] = []

    def pick(conn: Any, _name: str | None, _ctx: Any) -> None:
        if shown:
            conn.context = later
        shown.append(conn)

    try:
        ctx = server_context(first.cert_file, first.key_file)
        ctx.sni_callback = pick
        await web.TCPSite(runner, address, port, ssl_context=ctx).start()
        yield
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("mitm", ["own app port", "relayed app port", "relayed hello"])
async def test_a_pinned_workstation_sends_a_fake_bootstrap_port_no_guess(
    real_node: Node,
    tmp_path: Path,
    run_client: Callable[..., Any],
    test_ca: pki.CertificateAuthority,
    mitm: str,
) -> None:
    """With the CA pin the workstation knows its cluster's CA before any password: a bootstrap
    port whose certificate is not of that CA is not its cluster's node, and gets no
    confirmation (one password guess) and no CSR. The fake node copies the real hello (whose
    CA matches the pin); its app port is its own, or the real server's certificate, as a man
    in the middle relaying 8443 to the real node would show; or it shows the real node's
    certificate for the hello too (relayed) and its own for the exchange's connections."""
    fake, _cands = await _fake_node(real_node, right=True)
    address = next_loopback()
    evil_cert = issue(pki.CertificateAuthority.create("evil"), address, tmp_path / "evil")
    real_cert = issue(test_ca, address, tmp_path / "real")
    app_cert = evil_cert if mitm == "own app port" else real_cert
    first = real_cert if mitm == "relayed hello" else evil_cert
    pin = pki.spki_pin(test_ca.cert)
    async with (
        https_site(app_server(), address, HTTPS_PORT, app_cert),
        switching_site(fake.app(), address, BOOTSTRAP_PORT, first, evil_cert),
    ):
        url = f"https://{address}:{HTTPS_PORT}{APP}"
        code, output = await run_client(url, PASSWORD, "ws", "--ca-pin", pin)
    assert fake.captures == [], output  # not even a start: no exchange with it at all
    assert code == 10, output  # not the cluster's node
    said = "does not verify" if mitm == "relayed hello" else "is not from the pinned CA"
    assert said in output and "do not continue" in output, output
    assert not (tmp_path / "ws").exists()


async def _fake_node(real_node: Node, right: bool = False) -> tuple[FakeNode, list[Candidate]]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        _, _, hello_body = await real_node.call(s, "GET", proto.HELLO_PATH)
    cands = candidates(proto.parse_hello(json.dumps(hello_body).encode()).kdf)
    bet = next(c for c in cands if (c.word == PASSWORD) == right)
    return FakeNode(hello_body, bet), cands


@pytest.mark.parametrize("bet_on_the_right_one", [False, True])
async def test_a_fake_node_that_says_expired_gets_no_second_guess(
    real_node: Node,
    tmp_path: Path,
    run_client: Callable[..., Any],
    bet_on_the_right_one: bool,
) -> None:
    """It answers the first finish with 410 exchange_expired, hoping the client starts again
    and confirms once more (a second guess, on a second bet): one confirmation per run."""
    fake, cands = await _fake_node(real_node, bet_on_the_right_one)
    fake.finish_answers.append(
        (410, {"error": "exchange_expired", "message": "exchange unknown, used or expired"})
    )
    async with fake_node_at(fake, tmp_path) as url:
        code, output = await run_client(url, PASSWORD, "ws")
    assert code == 1, output
    assert "try again" in output
    assert not (tmp_path / "ws").exists()
    assert [len(c.confirms) for c in fake.captures] == [1]  # exactly one confirmation
    confirmed = [c.word for c in cands if fake.captures[0].confirmed_as_b(c, fake.y)]
    assert confirmed == ([PASSWORD] if bet_on_the_right_one else [])


def _error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) >= 1
    return lines[-1]


@pytest.mark.parametrize(
    "where",
    ["hello version", "hello alg", "hello duplicate key", "finish message"],
)
async def test_a_fake_nodes_long_text_gives_one_short_error_line(
    real_node: Node, tmp_path: Path, run_client: Callable[..., Any], where: str
) -> None:
    """A node answering with (nearly) 1 MiB of text, line breaks included: the client's
    error is still one line, of a bounded length (600: a node's message is said up to 400
    characters, audit s39ws L4: the leader's refusal of a name, with its remedies, was cut)."""
    fake, _ = await _fake_node(real_node)
    huge = ("x" * 999 + "\n") * 1000
    if where == "hello version":
        fake.hello_body = {"version": huge}
    elif where == "hello alg":
        fake.hello_body = {**fake.hello_body, "kdf": {**fake.hello_body["kdf"], "alg": huge}}
    elif where == "finish message":
        fake.finish_answers.append((500, {"error": huge[:5000], "message": huge}))
    elif where == "hello duplicate key":
        key = huge[: len(huge) // 2].replace("\n", " ")

        async def duplicate(_request: web.Request) -> web.Response:
            body = json.dumps({key: 1})[:-1] + ", " + json.dumps({key: 2})[1:]
            return web.Response(body=body.encode(), content_type="application/json")

        fake.hello = duplicate  # type: ignore[method-assign]
    async with fake_node_at(fake, tmp_path) as url:
        code, output = await run_client(url, PASSWORD, "ws")
    assert code != 0
    line = _error_line(output)
    assert line.startswith("tlsroll: error: "), line
    assert output.count("tlsroll: error: ") == 1 and len(line) < 600, line[:700]


@pytest.mark.parametrize(
    "kdf",
    [
        {"p": 16},  # 16 times the work
        {"n": 2**18},  # 256 MiB
        {"n": 2**16},
        {"r": 16},
        {"dklen": 64},
    ],
)
async def test_a_fake_node_cannot_demand_costlier_scrypt_than_tlsroll_uses(
    real_node: Node, tmp_path: Path, run_client: Callable[..., Any], kdf: dict[str, int]
) -> None:
    fake, _ = await _fake_node(real_node)
    fake.hello_body = {**fake.hello_body, "kdf": {**fake.hello_body["kdf"], **kdf}}
    async with fake_node_at(fake, tmp_path) as url:
        code, output = await run_client(url, PASSWORD, "ws")
    assert code == 1, output
    line = _error_line(output)
    assert "unacceptable key derivation parameters" in line and "more than tlsroll uses" in line
    assert fake.captures == []  # refused before any exchange (and before any scrypt)
