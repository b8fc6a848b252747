"""The other lines a stranger can cause per request are sampled per source too (session 67).

Session 66 sampled the bootstrap port's refused starts and the viewer's refused links
(``tests/test_refusal_logs.py``); a line per request was left for an old client's paths
(``bootstrap.old_client``), a finish refused before the password is confirmed
(``bootstrap.finish_refused``: a bad body, an unknown exchange), a request the bootstrap
listener cannot parse or whose body is too large (``https.malformed_request``,
``https.body_too_large``) and one the viewer's aiohttp cannot parse (``viewer.bad_request``,
without the source): one client wrote a line per request, thousands a second, and journald's
rate limit then dropped the daemon's own lines. Now a source's first is logged on its own,
naming it (``remote``), and the rest are counted into one summary a minute
(``tlsroll.logsample``).

The in-process tests run the services for real (the bootstrap service's https listener, the
viewer's aiohttp app) on loopback addresses with an injected clock, so the minute passes without
waiting; the daemon tests flood a real agent's bootstrap port and a real leader's viewer over
real sockets, and find one line per source where there was one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer

from leader.schema_store import SchemaStore
from leader.store import Store
from leader.viewer.app import ViewerApp
from leader.viewer.grants import Grants
from leader.viewer.server import _HttpLog
from leader.viewer.snapshot import Reader
from refserver import config as refserver_config
from refserver import server as refserver_server
from refserver.store import Store as RefStore
from tests.cluster import Cluster, wait_until
from tests.conftest import IssuedCert, next_loopback, none_fresh
from tests.refserver_helper import RefServer
from tests.test_bootstrap import TIMEOUT, FakeClock, Node, make_service
from tests.test_password_rollout import World, secret_file
from tests.test_refserver import write_verifier
from tlsroll import bootstrap_protocol as proto
from tlsroll import password, pki
from tlsroll.defaults import BOOTSTRAP_PORT, VIEWER_PORT
from tlsroll.logsample import SampledLog

FLOOD = 100

OLD_CLIENT = f"GET {proto.V1_BOOTSTRAP_PATH} HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n"
BAD_FINISH = (
    f"POST {proto.FINISH_PATH} HTTP/1.1\r\nHost: n\r\nContent-Type: application/json\r\n"
    "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
)
UNKNOWN_EXCHANGE_BODY = '{"exchange":"' + "A" * 43 + '","confirm":"x","csr":"x"}'
MALFORMED = "NOT HTTP AT ALL\r\n\r\n"
TOO_LARGE = (
    f"POST {proto.START_PATH} HTTP/1.1\r\nHost: n\r\nContent-Type: application/json\r\n"
    f"Content-Length: {proto.MAX_REQUEST_BYTES * 10}\r\n\r\n"
)
# A header line over aiohttp's 8190 bytes: its parser refuses it (400, ``LineTooLong``).
OVERLONG = f"GET / HTTP/1.1\r\nHost: v\r\nX-Pad: {'a' * 9000}\r\nConnection: close\r\n\r\n"


# A login sent over http: refused unread (403 https_required) by a reference server with the
# auth password.
LOGIN_OVER_HTTP = (
    "POST /praxis_live/login HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
    "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
)


def named(events: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in events if e.get("event") == name]


def remotes(events: list[MutableMapping[str, Any]], name: str) -> list[str]:
    return [str(e.get("remote")) for e in named(events, name)]


def ask(address: str, port: int, source: str, request: str, *, tls: bool = True) -> bytes:
    """Send ``request`` (raw bytes of HTTP, or not) from ``source`` and read until the server
    closes; the answer's status line. The certificate is not checked: what is logged is."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(
            socket.create_connection((address, port), timeout=10, source_address=(source, 0))
        )
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = stack.enter_context(context.wrap_socket(sock, server_hostname=address))
        sock.sendall(request.encode())
        answer = b""
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):  # (a 413 reads no more)
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.split(b"\r\n", 1)[0]


def flood(address: str, port: int, source: str, request: str, count: int, status: bytes) -> None:
    for _ in range(count):
        line = ask(address, port, source, request)
        assert status in line, line


# --- the bootstrap service, in process ----------------------------------------------------------


@pytest.fixture
def service_at(
    issue_cert: Callable[..., IssuedCert], test_ca: pki.CertificateAuthority
) -> Iterator[Callable[[FakeClock], tuple[Any, str]]]:
    def make(clock: FakeClock) -> tuple[Any, str]:
        address = next_loopback()
        return make_service(issue_cert(address, "node-a"), address, test_ca, clock=clock), address

    yield make


async def test_old_clients_and_bad_finishes_write_a_line_per_source_then_a_summary(
    service_at: Callable[[FakeClock], tuple[Any, str]],
) -> None:
    clock = FakeClock()
    service, address = service_at(clock)
    first, second = next_loopback(), next_loopback()
    unknown = (
        f"POST {proto.FINISH_PATH} HTTP/1.1\r\nHost: n\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(UNKNOWN_EXCHANGE_BODY)}\r\nConnection: close\r\n\r\n"
        + UNKNOWN_EXCHANGE_BODY
    )

    def run(source: str, count: int) -> None:
        port = service.bound_port
        flood(address, port, source, OLD_CLIENT, count, b" 200 ")
        flood(address, port, source, BAD_FINISH, count, b" 400 ")
        flood(address, port, source, unknown, count, b" 410 ")

    async with service:
        with structlog.testing.capture_logs() as events:
            await asyncio.to_thread(run, first, FLOOD)
            await asyncio.to_thread(run, second, 2)
            assert remotes(events, "bootstrap.old_client") == [first, second]
            finishes = named(events, "bootstrap.finish_refused")
            assert [(e["remote"], e["reason"]) for e in finishes] == [
                (first, "bad_request"),
                (second, "bad_request"),
            ]
            assert len(events) == 4, [e["event"] for e in events]
            clock.advance(60)
            await asyncio.to_thread(run, first, 1)
    old = named(events, "bootstrap.old_clients_summary")
    assert len(old) == 1 and old[0]["refused_not_logged"] == FLOOD + 1  # 99 + 1, then 1
    assert old[0]["top"] == [f"{first}: {FLOOD}", f"{second}: 1"]
    assert old[0]["reasons"] == {proto.V1_BOOTSTRAP_PATH: FLOOD + 1}
    refused = named(events, "bootstrap.finishes_refused_summary")
    assert len(refused) == 1, [e["event"] for e in events]
    # The last round's bad body made the summary due; its unknown exchange is the next one's.
    assert refused[0]["refused_not_logged"] == 2 * FLOOD + 3
    assert refused[0]["reasons"] == {"bad_request": FLOOD + 1, "exchange_expired": FLOOD + 2}
    assert refused[0]["top"] == [f"{first}: {2 * FLOOD}", f"{second}: 3"]
    assert len(events) == 4 + 2, [e["event"] for e in events]


async def test_malformed_and_oversized_requests_write_a_line_per_source_then_a_summary(
    service_at: Callable[[FakeClock], tuple[Any, str]],
) -> None:
    clock = FakeClock()
    service, address = service_at(clock)
    first, second = next_loopback(), next_loopback()
    async with service:
        port = service.bound_port
        with structlog.testing.capture_logs() as events:
            await asyncio.to_thread(flood, address, port, first, MALFORMED, FLOOD, b" 400 ")
            await asyncio.to_thread(flood, address, port, first, TOO_LARGE, FLOOD, b" 413 ")
            await asyncio.to_thread(flood, address, port, second, TOO_LARGE, 3, b" 413 ")
            # A source's first bad request is logged, whichever kind; the rest are counted.
            assert remotes(events, "https.malformed_request") == [first]
            assert remotes(events, "https.body_too_large") == [second]
            assert len(events) == 2, [e["event"] for e in events]
            clock.advance(60)
            await asyncio.to_thread(flood, address, port, first, MALFORMED, 1, b" 400 ")
    summaries = named(events, "https.bad_requests_summary")
    assert len(events) == 3 and len(summaries) == 1, [e["event"] for e in events]
    assert summaries[0]["refused_not_logged"] == 2 * FLOOD + 2
    assert summaries[0]["top"] == [f"{first}: {2 * FLOOD}", f"{second}: 2"]
    assert summaries[0]["reasons"] == {"body_too_large": FLOOD + 2, "malformed_request_400": FLOOD}


async def test_a_finish_refused_after_the_password_is_confirmed_is_logged_each_time(
    issue_cert: Callable[..., IssuedCert], test_ca: pki.CertificateAuthority
) -> None:
    """Not every refused finish is a stranger's: one after the password was confirmed (here
    the CA does not sign) is a workstation's that knew it, and each is logged as before."""

    async def broken(csr_pem: bytes) -> bytes:
        raise RuntimeError("leader unreachable")

    address = next_loopback()
    service = make_service(issue_cert(address), address, test_ca, sign=broken)
    async with service, aiohttp.ClientSession(timeout=TIMEOUT) as session:
        node = Node(service, FakeClock(), test_ca.cert_pem)
        with structlog.testing.capture_logs() as events:
            for _ in range(3):
                attempt = await node.exchange(session)
                assert (attempt.status, attempt.error) == (502, "sign_failed")
    refused = named(events, "bootstrap.finish_refused")
    assert [e["reason"] for e in refused] == ["sign_failed"] * 3, refused
    assert named(events, "bootstrap.finishes_refused_summary") == []


# --- the viewer, in process ---------------------------------------------------------------------


# (an overlong header line, and a header line with no colon: aiohttp's two kinds of refusal)
NO_COLON = "GET / HTTP/1.1\r\nHost: viewer\r\nno colon here\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("request_text", "error_type"), [(OVERLONG, "LineTooLong"), (NO_COLON, "BadHttpMessage")]
)
def test_a_flood_of_unparsable_viewer_requests_writes_a_line_per_source_then_a_summary(
    tmp_path: Path, request_text: str, error_type: str
) -> None:
    store = Store(tmp_path / "leader.sqlite3")
    address, first, second = next_loopback(), next_loopback(), next_loopback()
    clock = FakeClock()

    async def run() -> list[MutableMapping[str, Any]]:
        at = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.UTC)
        reader = Reader(
            store, SchemaStore(store.db), lambda: at, lambda _: True, [], fresh=none_fresh
        )
        app = ViewerApp(
            reader=reader,
            grants=Grants(store.db),
            clock=lambda: at,
            address=address,
            scrape_token=None,
            closing=asyncio.Event(),
        )
        server = TestServer(app.make(), host=address, port=0)
        await server.start_server(logger=_HttpLog(clock))
        assert server.port is not None
        port = server.port

        def bad(source: str, count: int) -> None:
            for _ in range(count):
                line = ask(address, port, source, request_text, tls=False)
                assert b" 400 " in line, line

        try:
            with structlog.testing.capture_logs() as events:
                await asyncio.to_thread(bad, first, FLOOD)
                await asyncio.to_thread(bad, second, 3)
                assert remotes(events, "viewer.bad_request") == [first, second]
                assert named(events, "viewer.bad_requests_summary") == []
                clock.advance(60)
                await asyncio.to_thread(bad, first, 1)
        finally:
            app.close()
            await server.close()
        return events

    events = asyncio.run(run())
    summaries = named(events, "viewer.bad_requests_summary")
    assert len(events) == 3 and len(summaries) == 1, [e["event"] for e in events]
    assert {e["error_type"] for e in named(events, "viewer.bad_request")} == {error_type}
    assert summaries[0]["refused_not_logged"] == FLOOD + 2
    assert summaries[0]["top"] == [f"{first}: {FLOOD}", f"{second}: 2"]
    assert summaries[0]["reasons"] == {error_type: FLOOD + 2}


# --- real daemons -------------------------------------------------------------------------------


def lines_by_source(daemon: Any, name: str, marker: str) -> list[str]:
    """The sources of ``name``'s lines, once the ``marker`` source's has been written (it was
    sent last, so each line the flood made before it is in the log by then)."""

    def said() -> list[str]:
        return [str(e.get("remote")) for e in daemon.log_events() if e.get("event") == name]

    # (Or the flood's lines, one per request, with no source: the line as it was.)
    wait_until(
        lambda: marker in said() or len(said()) > FLOOD,
        20,
        f"{name} for the last source",
        interval=0.2,
    )
    return said()


def test_a_real_leader_s_viewer_flooded_from_one_source_writes_one_line(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path / "c", next_loopback())
    try:
        cluster.init()
        cluster.start_leader()
        stranger, marker = next_loopback(), next_loopback()
        for _ in range(FLOOD):
            assert b" 400 " in ask(cluster.address, VIEWER_PORT, stranger, OVERLONG)
        assert b" 400 " in ask(cluster.address, VIEWER_PORT, marker, OVERLONG)
        seen = lines_by_source(cluster.leader, "viewer.bad_request", marker)
        assert seen == [stranger, marker], len(seen)
    finally:
        cluster.close()


def test_a_real_agent_s_bootstrap_port_flooded_from_one_source_writes_a_line_per_kind(
    tmp_path: Path,
) -> None:
    """A node with the auth password set (its bootstrap service running): a stranger's old
    client requests, bad finishes, malformed and oversized requests, FLOOD of each."""
    world = World(tmp_path, nodes=1)
    try:
        world.start()
        pw = secret_file(tmp_path / "pw", "first-password-kd7q-x2mf")
        assert world.run_rollout("--password-file", str(pw))["state"] == "completed"
        node = world.nodes[0]
        agent = node.agent
        assert agent is not None
        wait_until(lambda: node.port_open(BOOTSTRAP_PORT), 30, "the bootstrap port", interval=0.2)
        stranger, marker = next_loopback(), next_loopback()
        for request, status in (
            (OLD_CLIENT, b" 200 "),
            (BAD_FINISH, b" 400 "),
            (MALFORMED, b" 400 "),
        ):
            flood(node.address, BOOTSTRAP_PORT, stranger, request, FLOOD, status)
            flood(node.address, BOOTSTRAP_PORT, marker, request, 1, status)
        flood(node.address, BOOTSTRAP_PORT, stranger, TOO_LARGE, FLOOD, b" 413 ")
        for name in ("bootstrap.old_client", "bootstrap.finish_refused"):
            assert lines_by_source(agent, name, marker) == [stranger, marker], name
        # The listener's lines: the stranger's first bad request, then the marker's.
        assert lines_by_source(agent, "https.malformed_request", marker) == [stranger, marker]
        assert [e for e in agent.event_names() if e == "https.body_too_large"] == []
    finally:
        world.close()


# --- the reference server -----------------------------------------------------------------------
#
# Review s67 L: its public ports (8080, 8443) wrote a line per request aiohttp cannot parse
# (``http.bad_request``) and per login sent over http (``login.refused_http``), from anyone.


def test_the_reference_server_s_bad_requests_and_http_logins_write_a_line_per_source_then_a_summary(
    tmp_path: Path,
) -> None:
    """The server's public app for real on a loopback address, in process, with its log's and
    its refusals' clock injected."""
    config_path, data_dir = tmp_path / "refserver.toml", tmp_path / "data"
    data_dir.mkdir()
    verifier = write_verifier(tmp_path / "auth.json", password.generate_password())
    address, first, second = next_loopback(), next_loopback(), next_loopback()
    config_path.write_text(
        f'[server]\naddress = "{address}"\napp_path = "/praxis_live/"\nlisten = ["http"]\n'
        f'data_dir = "{data_dir}"\nauth_verifier_file = "{verifier}"\n'
    )
    store = RefStore(data_dir)
    server = refserver_server.RefServer(
        refserver_config.load(config_path), store, store.load_freeze()
    )
    clock = FakeClock()
    server._refused_http = SampledLog(clock=clock)

    async def run() -> list[MutableMapping[str, Any]]:
        test_server = TestServer(server.public_app(), host=address, port=0)
        await test_server.start_server(logger=refserver_server._HttpLog(clock))
        assert test_server.port is not None
        port = test_server.port

        def send(source: str, count: int) -> None:
            for _ in range(count):
                assert b" 400 " in ask(address, port, source, OVERLONG, tls=False)
                assert b" 403 " in ask(address, port, source, LOGIN_OVER_HTTP, tls=False)

        try:
            with structlog.testing.capture_logs() as events:
                await asyncio.to_thread(send, first, FLOOD)
                await asyncio.to_thread(send, second, 3)
                assert remotes(events, "http.bad_request") == [first, second]
                assert remotes(events, "login.refused_http") == [first, second]
                clock.advance(60)
                await asyncio.to_thread(send, first, 1)
        finally:
            await test_server.close()
        return events

    try:
        events = asyncio.run(run())
    finally:
        server.close()
        store.close()
    assert len(events) == 6, [e["event"] for e in events]
    for name, reason in (
        ("http.bad_requests_summary", "LineTooLong"),
        ("login.refused_http_summary", "https_required"),
    ):
        (summary,) = named(events, name)
        assert summary["refused_not_logged"] == FLOOD + 2
        assert summary["top"] == [f"{first}: {FLOOD}", f"{second}: 2"]
        assert summary["reasons"] == {reason: FLOOD + 2}


def login_over_https(secret: str) -> str:
    body = f'{{"password": "{secret}"}}'
    return (
        "POST /praxis_live/login HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    )


def test_the_reference_server_s_logins_refused_by_the_limits_write_a_line_per_source_then_a_summary(
    tmp_path: Path, issue_cert: Callable[..., IssuedCert]
) -> None:
    """Review s67 L: once a source is told to wait (429), each login it sends is refused
    unchecked, as fast as it sends them, and each was a ``login.rate_limited`` line. The public
    app for real over TLS on a loopback address, in process, with the refusals' clock
    injected; ``login_ceiling = 1``: after one wrong password every source is told to wait."""
    config_path, data_dir = tmp_path / "refserver.toml", tmp_path / "data"
    data_dir.mkdir()
    secret = password.generate_password()
    verifier = write_verifier(tmp_path / "auth.json", secret)
    address, first, second = next_loopback(), next_loopback(), next_loopback()
    cert = issue_cert(address)
    config_path.write_text(
        f'[server]\naddress = "{address}"\napp_path = "/praxis_live/"\nlisten = ["http"]\n'
        f'data_dir = "{data_dir}"\nauth_verifier_file = "{verifier}"\nlogin_ceiling = 1\n'
    )
    store = RefStore(data_dir)
    server = refserver_server.RefServer(
        refserver_config.load(config_path), store, store.load_freeze()
    )
    clock = FakeClock()
    server._rate_limited = SampledLog(clock=clock)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert.cert_file, cert.key_file)

    async def run() -> list[MutableMapping[str, Any]]:
        test_server = TestServer(server.public_app(), host=address, port=0)
        await test_server.start_server(ssl=tls)
        assert test_server.port is not None
        port = test_server.port

        def send(source: str, count: int) -> None:
            for _ in range(count):
                assert b" 429 " in ask(address, port, source, login_over_https(secret))

        try:
            wrong = login_over_https("not-" + secret)
            assert b" 401 " in await asyncio.to_thread(ask, address, port, first, wrong)
            with structlog.testing.capture_logs() as events:
                await asyncio.to_thread(send, first, FLOOD)
                await asyncio.to_thread(send, second, 3)
                assert remotes(events, "login.rate_limited") == [first, second]
                clock.advance(60)
                await asyncio.to_thread(send, first, 1)
        finally:
            await test_server.close()
        return events

    try:
        events = asyncio.run(run())
    finally:
        server.close()
        store.close()
    assert [e["event"] for e in events] == [
        "login.rate_limited",
        "login.rate_limited",
        "login.rate_limited_summary",
    ]
    (summary,) = named(events, "login.rate_limited_summary")
    assert summary["refused_not_logged"] == FLOOD + 2
    assert summary["top"] == [f"{first}: {FLOOD}", f"{second}: 2"]
    assert summary["reasons"] == {"rate_limited": FLOOD + 2}


def test_a_real_reference_server_flooded_from_one_source_writes_a_line_per_kind(
    tmp_path: Path,
) -> None:
    verifier = write_verifier(tmp_path / "auth.json", password.generate_password())
    server = RefServer(tmp_path / "rs", next_loopback(), auth_verifier_file=verifier)
    try:
        server.start()
        stranger, marker = next_loopback(), next_loopback()
        for request, status in ((OVERLONG, b" 400 "), (LOGIN_OVER_HTTP, b" 403 ")):
            for source, count in ((stranger, FLOOD), (marker, 1)):
                for _ in range(count):
                    assert status in ask(server.address, 8080, source, request, tls=False)
        for name in ("http.bad_request", "login.refused_http"):
            assert lines_by_source(server, name, marker) == [stranger, marker], name
    finally:
        server.close()
