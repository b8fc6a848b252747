"""The reference server as a real process on a loopback address with the seed's ports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from refserver import config as refserver_config
from refserver import store as refstore
from refserver.server import (
    BODY_SECONDS_ENV,
    CLIENTS_WINDOW_ENV,
    START_DELAY_ENV,
    SWITCHING_MESSAGE,
    WRITE_DELAY_ENV,
)
from refserver.server import RefServer as Server
from refserver.server import _HttpLog as server_http_log
from tests.conftest import IssuedCert, count_thread_hops
from tests.nodeside import read_only
from tests.procs import long_grace
from tests.refserver_helper import (
    READY_TIMEOUT,
    RefServer,
    Response,
    peer_certificate,
    unix_request,
)
from tlsroll import bootstrap_protocol, clients, httpcheck, password, pki, probe
from tlsroll.clients import WORKSTATION_HEADER
from tlsroll.fsutil import PRIVATE, write_atomic
from tlsroll.httpcheck import port_open
from tlsroll.sqlite import Database, copy_name
from tlsroll.tls import client_context

IssueCert = Callable[..., IssuedCert]


class MakeServer(Protocol):
    def __call__(self, *, env: dict[str, str] | None = None, **settings: Any) -> RefServer: ...


@pytest.fixture
def make_server(tmp_path: Path, loopback: Callable[[], str]) -> Iterator[MakeServer]:
    """Build RefServers on fresh loopback addresses; all of them are killed at teardown."""
    servers: list[RefServer] = []

    def make(*, env: dict[str, str] | None = None, **settings: Any) -> RefServer:
        address = settings.pop("address", None) or loopback()
        server = RefServer(tmp_path / f"rs{len(servers)}", address, env=env, **settings)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def https_context(cert: IssuedCert, *, client: bool = False) -> ssl.SSLContext:
    """Trust only the test CA; optionally present the node cert as a client certificate."""
    ca_pem = cert.ca_file.read_bytes()
    if client:
        return client_context(ca_pem, cert_file=cert.cert_file, key_file=cert.key_file)
    return client_context(ca_pem)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def post(server: RefServer, body: object, **kw: Any) -> Response:
    return server.request("POST", "entries", body, **kw)


def write_verifier(path: Path, secret: str) -> Path:
    verifier = password.make_verifier(secret, **password.TEST_PARAMS)
    write_atomic(path, password.verifier_to_json(verifier).encode(), PRIVATE)
    return path


# --- http ---------------------------------------------------------------------------------------


def test_write_and_read_over_http(make_server: MakeServer) -> None:
    server = make_server(app_path="/praxis_live/", listen=["http"])
    server.start()

    index = server.request("GET").json()
    assert index["app"] == "praxis_live" and index["scheme"] == "http"
    assert server.request("GET", "health").json() == {
        "status": "ok",
        "scheme": "http",
        "frozen": False,
    }

    created = post(server, {"patient": "Müller", "note": "x" * 100})
    assert created.status == 201
    entry = created.json()
    assert len(entry["id"]) == 32 and int(entry["id"], 16) >= 0 and entry["seq"] == 1
    assert created.header("Location") == f"/praxis_live/entries/{entry['id']}"
    assert post(server, {"n": 2}).json()["seq"] == 2

    got = server.request("GET", f"entries/{entry['id']}")
    assert got.status == 200
    assert got.json()["body"] == {"patient": "Müller", "note": "x" * 100}
    assert got.json()["seq"] == 1 and got.json()["id"] == entry["id"]

    missing = server.request("GET", "entries/" + "0" * 32)
    assert missing.status == 404 and missing.json()["error"] == "not_found"
    assert server.request("GET", "entries/not-an-id").status == 404

    for bad in (b"{not json", b"[1, 2]", b"", b"\xff\xfe"):
        resp = post(server, bad)
        assert resp.status == 400, bad
        assert resp.json()["error"] == "bad_request" and resp.json()["message"]

    other = server.request("GET", "elsewhere")
    assert other.status == 404
    assert (other.header("Content-Type") or "").startswith("application/json")
    wrong_method = server.request("DELETE", "entries")
    assert wrong_method.status == 405 and wrong_method.header("Allow") == "POST"

    assert not port_open(server.address, 8443)
    status = server.status()
    assert status["listen"] == ["http"] and status["ports"] == {"http": 8080}
    assert status["watermark"] == 2 and status["frozen"] is False
    assert status["pid"] == server.pid and status["config"] == str(server.config_path)
    assert status["auth_configured"] is False
    assert stat.S_IMODE(os.stat(server.admin_socket).st_mode) == 0o600
    assert (server.data_dir / "refserver.pid").read_text().strip() == str(server.pid)
    assert (server.data_dir / "entries.sqlite3").exists()

    assert server.stop() == 0
    assert not server.admin_socket.exists()
    assert not (server.data_dir / "refserver.pid").exists()
    events = [e["event"] for e in server.log_events()]
    assert events[0] == "server.started" and events[-1] == "server.stopped"


NESTED = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
NO_JSON_BODIES = {
    "a lone surrogate": b'{"a": "\\ud800"}',
    "a lone surrogate in a key": b'{"\\udfff": 1}',
    "a lone surrogate's bytes": b'{"a": "\xed\xa0\x80"}',
    "nested too deeply": NESTED,
    "NaN": b'{"a": NaN}',
    "Infinity": b'{"a": [-Infinity]}',
    "a float too large": b'{"a": 1e999}',
}


def test_a_body_that_is_not_strictly_json_is_a_one_line_400(make_server: MakeServer) -> None:
    """Review s66 M1, L2: an entry nested too deeply (a RecursionError) or with a lone
    surrogate in a string (SQLite cannot store it as text) was a 500 with a traceback in the
    log, and NaN, Infinity or 1e999 were stored and given back as no JSON at all. Each is a
    400 now, one line, nothing stored; the admin socket's freeze decodes its body alike."""
    server = make_server()
    server.start()
    for name, raw in NO_JSON_BODIES.items():
        resp = post(server, raw)
        assert resp.status == 400, (name, resp.status, resp.body)
        answer = resp.json()
        assert answer["error"] == "bad_request", name
        assert answer["message"].startswith("body is not valid JSON: "), (name, answer)
        assert len(answer["message"]) < 120 and "\n" not in answer["message"], (name, answer)
    for raw in (NESTED, b'{"drain_timeout": NaN}', b'{"drain_timeout": 1, "x": "\\ud800"}'):
        resp = unix_request(server.admin_socket, "POST", "/admin/freeze", raw)
        assert resp.status == 400 and resp.json()["error"] == "bad_request", resp
    assert post(server, {"a": 1.5, "b": "\u00e9\U0001f600"}).status == 201
    status = server.status()
    assert status["watermark"] == 1 and status["frozen"] is False
    log = server.log()
    assert "Traceback" not in log and "request.failed" not in log


class FsyncCountingServer(RefServer):
    """A reference server whose process writes, for each ``os.fsync`` call it makes, the path
    of the file or directory synced to ``fsynced`` (a line each)."""

    def __init__(self, fsynced: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fsynced = fsynced

    def command(self) -> list[str]:
        code = (
            "import os, runpy, sys\n"
            "out, real = sys.argv.pop(1), os.fsync\n"
            "def fsync(fd):\n"
            "    with open(out, 'a') as f:\n"
            "        f.write(os.readlink(f'/proc/self/fd/{fd}') + '\\n')\n"
            "    return real(fd)\n"
            "os.fsync = fsync\n"
            "runpy.run_module('refserver', run_name='__main__', alter_sys=True)\n"
        )
        config = ["--config", str(self.config_path)]
        return [sys.executable, "-P", "-c", code, str(self.fsynced), *config]


def test_the_reference_server_s_start_fsyncs_no_pid_file(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Issue 15, the freeze window: the reference server starts inside every switch's freeze,
    and its pid file was an fsynced atomic write (the file and its directory: two of the
    fifteen fsyncs of a switch, ``bench.switch_calls``). A pid names a process of this boot
    only: after a crash of the machine the file names none, whatever it holds. It is still
    replaced whole (a rename), and names the process that runs, after a restart too."""
    fsynced = tmp_path / "fsynced"
    server = FsyncCountingServer(fsynced, tmp_path / "rs", loopback())
    try:
        server.start()
        first = server.pid
        server.restart()
        assert server.pid != first
        assert (server.data_dir / "refserver.pid").read_text() == f"{server.pid}\n"
        assert sorted(server.data_dir.glob(".refserver.pid.tmp-*")) == []
        assert server.stop() == 0
    finally:
        server.close()
    synced = fsynced.read_text().splitlines() if fsynced.exists() else []
    # Only the pid file's fsyncs (the file, its temporary name, its directory): another one
    # (the store's, say) is no business of this test (audit s43rev1).
    data_dir = os.path.realpath(server.data_dir)
    pid_files = ("refserver.pid", ".refserver.pid.tmp-")
    assert [p for p in synced if p == data_dir or os.path.basename(p).startswith(pid_files)] == []


def test_an_overlong_header_line_logs_its_type_and_not_the_line(make_server: MakeServer) -> None:
    """aiohttp logged the first 100 bytes of a header line over 8190 bytes: a browser's
    cookies for this host (the viewer's session, if the leader shares the address) or an
    Authorization header (audit s34 H2)."""
    server = make_server(listen=["http"])
    server.start()
    conn = http.client.HTTPConnection(server.address, 8080, timeout=10)
    try:
        conn.request("GET", server.app_path, headers={"Cookie": "sid=COOKIE-SECRET-" + "a" * 9000})
        assert conn.getresponse().status == 400
    finally:
        conn.close()
    assert server.request("GET").status == 200  # the server serves on
    assert server.stop() == 0
    refused = [e for e in server.log_events() if e.get("event") == "http.bad_request"]
    assert [e["error_type"] for e in refused] == ["LineTooLong"]
    text = server.log_path.read_text()
    assert "COOKIE-SECRET" not in text and "Error handling request" not in text


def _status_of(address: str, port: int, head: bytes) -> int:
    """The status of the answer to ``head`` (a whole request head, no body), sent raw."""
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.sendall(head)
        answer = b""
        while b"\r\n" not in answer:
            got = conn.recv(4096)
            if not got:
                break
            answer += got
    return int(answer.split(b" ", 2)[1])


def test_what_a_flood_can_make_the_reference_server_hold_is_bounded(
    make_server: MakeServer,
) -> None:
    """Review s69 (gate): aiohttp's defaults let each of the public listeners' 1024 connections
    make the server hold a request head of 128 header lines of up to 8 KiB (about 2 MiB, as its
    parser keeps them: measured) and a body of 1 MiB, for up to 35 s (``gate.HEAD_SECONDS``
    and ``gate.BODY_SECONDS``): about 3 GiB from one LAN host. An entry is a few hundred bytes
    (the demo's: 50). Now at most 32 header lines of 4 KiB and a body of 256 KiB: about 0.5
    GiB at the worst (the connections' count is the descriptors' business: ``gate``)."""
    server = make_server(listen=["http"])
    server.start()
    port = server.port("http")
    body_max = 256 * 1024
    # The body: an entry of 256 KiB is taken, a larger one is a 413, nothing stored.
    assert post(server, {"note": "x" * (body_max - 20)}).status == 201
    resp = post(server, {"note": "x" * body_max})
    assert resp.status == 413 and resp.json()["error"] == "too_large", resp
    assert server.status()["watermark"] == 1
    # The head: a browser's (about 20 lines, one of them its cookies) is served; 41 lines, or
    # a line of 5000 bytes, are a 400.
    head = f"GET {server.app_path}health HTTP/1.1\r\nHost: {server.address}\r\n".encode()
    browser = b"".join(b"X-Browser-%d: %s\r\n" % (i, b"v" * 200) for i in range(18))
    cookie = b"Cookie: sid=" + b"c" * 4000 + b"\r\n"
    assert _status_of(server.address, port, head + browser + cookie + b"\r\n") == 200
    many = b"".join(b"X-Many-%d: v\r\n" % i for i in range(40))
    assert _status_of(server.address, port, head + many + b"\r\n") == 400
    long_line = b"X-Long: " + b"v" * 5000 + b"\r\n"
    assert _status_of(server.address, port, head + long_line + b"\r\n") == 400
    assert server.request("GET", "health").status == 200  # and it serves on


def test_the_http_log_gives_a_failed_handler_s_type_and_place_not_its_text() -> None:
    """What aiohttp logs of a handler that raised, or of its debug noise (audit s34 H2)."""
    try:
        raise ValueError("Bearer SECRET-IN-A-MESSAGE")
    except ValueError as exc:
        with structlog.testing.capture_logs() as logs:
            server_http_log().exception("Unhandled exception", exc_info=exc)
            server_http_log().debug("Ignored premature client disconnection", exc_info=exc)
    assert "SECRET" not in str(logs)
    [line] = logs
    assert line["event"] == "http.request_failed" and line["error_type"] == "ValueError"
    assert line["where"].startswith("tests/test_refserver.py:")


def test_version_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "refserver", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.startswith("tlsroll-refserver ")


# --- https --------------------------------------------------------------------------------------


def test_https_only_presents_exactly_the_issued_cert(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert
) -> None:
    address = loopback()
    cert = issue_cert(address, "node1")
    server = make_server(
        address=address, listen=["https"], cert_file=cert.cert_file, key_file=cert.key_file
    )
    server.start()
    ctx = https_context(cert)

    der = peer_certificate(address, 8443, ctx)
    assert der == pki.read_cert(cert.cert_file).public_bytes(Encoding.DER)
    assert not port_open(address, 8080), "8080 must be closed with listen = ['https']"

    health = server.request("GET", "health", scheme="https", context=ctx)
    assert health.json() == {"status": "ok", "scheme": "https", "frozen": False}
    created = post(server, {"over": "tls"}, scheme="https", context=ctx)
    assert created.status == 201
    got = server.request("GET", f"entries/{created.json()['id']}", scheme="https", context=ctx)
    assert got.json()["body"] == {"over": "tls"}

    # A client that does not trust the test CA fails the handshake.
    with pytest.raises(ssl.SSLCertVerificationError):
        server.request("GET", "health", scheme="https", context=client_context(None))

    status = server.status()
    assert status["listen"] == ["https"] and status["ports"] == {"https": 8443}
    assert status["cert_sha256"].startswith("sha256:")
    assert status["requests"]["http"] == 0 and status["requests"]["https"] == 3


def test_client_certificate_required(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert
) -> None:
    address = loopback()
    cert = issue_cert(address, "node2")
    server = make_server(
        address=address,
        listen=["https"],
        cert_file=cert.cert_file,
        key_file=cert.key_file,
        client_ca_file=cert.ca_file,
        require_client_cert=True,
    )
    server.start()
    ok = server.request("GET", "health", scheme="https", context=https_context(cert, client=True))
    assert ok.status == 200
    # TLS 1.3 reports the missing client certificate after the handshake, on the first read.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        server.request("GET", "health", scheme="https", context=https_context(cert))


def test_both_listeners_count_requests_per_protocol(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert
) -> None:
    address = loopback()
    cert = issue_cert(address)
    server = make_server(
        address=address,
        listen=["http", "https"],
        cert_file=cert.cert_file,
        key_file=cert.key_file,
    )
    server.start()
    ctx = https_context(cert)
    for _ in range(3):
        assert server.request("GET", "health").json()["scheme"] == "http"
    for _ in range(2):
        assert server.request("GET", "health", scheme="https", context=ctx).json()["scheme"] == (
            "https"
        )
    a = post(server, {"via": "http"}).json()
    b = post(server, {"via": "https"}, scheme="https", context=ctx).json()
    assert b["seq"] == a["seq"] + 1  # one store behind both listeners

    status = server.status()
    assert status["requests"] == {"http": 4, "https": 3}
    assert status["clients"] == {"http": 1, "https": 1}
    assert status["listen"] == ["http", "https"]
    assert status["ports"] == {"http": 8080, "https": 8443}


# --- who is on which scheme (issue 12) -----------------------------------------------------------


def request_from(
    source: str,
    server: RefServer,
    scheme: str = "http",
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """GET the app path from the local address ``source`` (the client socket is bound to it),
    as a workstation with that address would; the status."""
    port = server.port(scheme)
    conn: http.client.HTTPConnection
    if scheme == "https":
        assert context is not None, "https needs a context"
        conn = httpcheck.HTTPSConnection(
            server.address, port, timeout=10, context=context, source_address=(source, 0)
        )
    else:
        conn = http.client.HTTPConnection(
            server.address, port, timeout=10, source_address=(source, 0)
        )
    try:
        conn.request("GET", server.app_path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def clients_seen(server: RefServer) -> dict[str, Any]:
    resp = server.admin("GET", "/admin/clients")
    assert resp.status == 200, resp.body
    data: dict[str, Any] = resp.json()
    return data


def test_dual_server_records_who_is_on_which_scheme(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert
) -> None:
    """Both listeners at once, and per scheme each client: its source address, its workstation
    name (a ws-… client certificate on https, the X-Tlsroll-Workstation header otherwise),
    first/last seen and request count. tlsroll's own probes are no clients."""
    address = loopback()
    cert = issue_cert(address, "node1")
    server = make_server(
        address=address,
        listen=["http", "https"],
        cert_file=cert.cert_file,
        key_file=cert.key_file,
        client_ca_file=cert.ca_file,
    )
    server.start()
    empfang, labor, anonym, kasse = loopback(), loopback(), loopback(), loopback()
    ws_labor = issue_cert(labor, "ws-labor")  # the certificate a workstation enrols for
    named = {WORKSTATION_HEADER: "ws-empfang"}
    for _ in range(3):
        assert request_from(empfang, server, headers=named) == 200
    assert request_from(anonym, server) == 200
    for _ in range(2):
        ctx = https_context(ws_labor, client=True)
        assert request_from(labor, server, "https", context=ctx) == 200
    # A claim that is no workstation name is not taken.
    assert request_from(kasse, server, headers={WORKSTATION_HEADER: "x'); DROP TABLE"}) == 200
    # The same workstation moved to https, without a client certificate: named by its header.
    assert request_from(empfang, server, "https", context=https_context(cert), headers=named) == 200
    # tlsroll's own checks (the agent's verify, the leader's confirm) are not counted.
    assert asyncio.run(probe.check_http(address, 8080, server.app_path)) is None
    ca_pem = cert.ca_file.read_bytes()
    assert asyncio.run(probe.check_https(address, 8443, server.app_path, ca_pem, None)) is None

    seen = clients_seen(server)
    assert seen["window_seconds"] == 86400
    rows = seen["clients"]
    assert [(c["scheme"], c["address"], c["workstation"], c["requests"]) for c in rows] == [
        ("https", empfang, "ws-empfang", 1),
        ("http", kasse, "", 1),
        ("https", labor, "ws-labor", 2),
        ("http", anonym, "", 1),
        ("http", empfang, "ws-empfang", 3),
    ]
    for c in rows:
        first = dt.datetime.fromisoformat(c["first_seen"])
        last = dt.datetime.fromisoformat(c["last_seen"])
        assert first <= last and first.tzinfo is not None
    # The counts per scheme include the probes (every request), the clients list does not.
    assert server.status()["requests"] == {"http": 6, "https": 4}


def test_workstation_names_are_the_ones_enrolment_gives() -> None:
    assert clients.WORKSTATION_CN.pattern == bootstrap_protocol.WORKSTATION_CN.pattern
    assert clients.workstation_name("ws-empfang") == "ws-empfang"
    assert clients.workstation_name("empfang") == clients.workstation_name("ws-") == ""


def test_clients_kept_are_bounded(make_server: MakeServer, loopback: Callable[[], str]) -> None:
    server = make_server(clients_max=3)
    server.start()
    sources = [loopback() for _ in range(5)]
    for source in sources:
        assert request_from(source, server) == 200
    assert request_from(sources[0], server) == 200  # seen again: the most recent now
    rows = clients_seen(server)["clients"]
    assert [c["address"] for c in rows] == [sources[0], sources[4], sources[3]]
    assert rows[0]["requests"] == 1  # it was evicted once: counted afresh


# --- freeze -------------------------------------------------------------------------------------


def test_freeze_refuses_writes_serves_reads_and_survives_restart(make_server: MakeServer) -> None:
    server = make_server()
    server.start()
    first = post(server, {"n": 1}).json()
    last = post(server, {"n": 2}).json()

    frozen = server.freeze(drain_timeout=5)
    assert frozen == {"frozen": True, "watermark": last["seq"], "drained": True, "in_flight": 0}

    refused = post(server, {"n": 3})
    assert refused.status == 503
    assert refused.header("Retry-After") is not None and int(refused.header("Retry-After") or 0) > 0
    assert refused.json() == {"error": "switching", "message": SWITCHING_MESSAGE}
    assert server.request("GET", f"entries/{first['id']}").status == 200
    assert server.request("GET", "health").json()["frozen"] is True
    assert stored_freeze(server.data_dir) == (True, server.status()["frozen_since"])

    # A restart while frozen comes back frozen, with the same watermark.
    server.restart()
    status = server.status()
    assert status["frozen"] is True and status["watermark"] == last["seq"]
    assert post(server, {"n": 3}).status == 503
    assert server.freeze(drain_timeout=1)["watermark"] == last["seq"]  # idempotent

    assert server.unfreeze() == {"frozen": False, "watermark": last["seq"]}
    assert post(server, {"n": 3}).json()["seq"] == last["seq"] + 1
    server.restart()
    assert server.status()["frozen"] is False
    assert post(server, {"n": 4}).status == 201


def stored_freeze(data_dir: Path) -> tuple[bool, str | None] | None:
    """The freeze row of the server's store (read-only beside it), None if there is none."""
    conn = sqlite3.connect(f"file:{data_dir / 'entries.sqlite3'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT frozen, since FROM freeze WHERE id = 1").fetchone()
    finally:
        conn.close()
    return None if row is None else (bool(row[0]), row[1])


def test_the_freeze_is_one_row_of_the_store_and_no_state_file(make_server: MakeServer) -> None:
    """Issue 15: the flag was state.json, written atomically (two fsyncs and a rename) at
    every freeze and unfreeze, both inside a switch's freeze window. It is one commit of the
    store now: a freeze or unfreeze answered is that row committed, and no file appears."""
    server = make_server()
    server.start()
    assert stored_freeze(server.data_dir) is None  # never frozen
    frozen_at = server.freeze(drain_timeout=1)
    assert frozen_at["frozen"] is True
    row = stored_freeze(server.data_dir)
    assert row is not None and row[0] is True and row[1] == server.status()["frozen_since"]
    assert not (server.data_dir / "state.json").exists()
    server.freeze(drain_timeout=1)  # again: the start of the freeze is kept
    assert stored_freeze(server.data_dir) == row
    server.unfreeze()
    assert stored_freeze(server.data_dir) == (False, None)
    assert not (server.data_dir / "state.json").exists()


@pytest.mark.parametrize("frozen", [True, False])
def test_a_state_file_of_an_older_release_is_taken_over_at_start(
    make_server: MakeServer, frozen: bool
) -> None:
    """A server upgraded while frozen stays frozen: its state.json is saved in the store at
    start-up, then removed (the store's flag is the only one from then on)."""
    server = make_server()
    server.start()
    server.stop()
    since = "2026-11-30T12:00:00.000+00:00" if frozen else None
    legacy = server.data_dir / "state.json"
    write_atomic(legacy, (json.dumps({"frozen": frozen, "since": since}) + "\n").encode(), PRIVATE)
    server.start()
    status = server.status()
    assert (status["frozen"], status["frozen_since"]) == (frozen, since)
    assert not legacy.exists()
    assert stored_freeze(server.data_dir) == (frozen, since)
    server.unfreeze()
    server.restart()
    assert server.status()["frozen"] is False


def test_a_malformed_state_file_of_an_older_release_leaves_the_server_frozen(
    make_server: MakeServer,
) -> None:
    server = make_server()
    server.start()
    server.stop()
    (server.data_dir / "state.json").write_text("{not json")
    server.start()
    assert server.status()["frozen"] is True
    assert [e["event"] for e in server.log_events() if e.get("event") == "state.unreadable"]
    assert not (server.data_dir / "state.json").exists()
    server.restart()  # the store kept it
    assert server.status()["frozen"] is True


def test_write_in_flight_at_freeze_completes_and_counts(make_server: MakeServer) -> None:
    server = make_server(env={WRITE_DELAY_ENV: "1.0"})
    server.start()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[Response] = pool.submit(post, server, {"slow": True})
        wait_for(lambda: server.status()["in_flight"] == 1, what="write in flight")
        frozen = server.freeze(drain_timeout=10)
        written = pending.result(timeout=10)
    assert written.status == 201
    assert frozen["drained"] is True and frozen["in_flight"] == 0
    assert frozen["watermark"] == written.json()["seq"] == 1
    assert server.status()["watermark"] == 1


def test_drain_timeout_reports_what_is_still_in_flight(make_server: MakeServer) -> None:
    server = make_server(env={WRITE_DELAY_ENV: "2.0"})
    server.start()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[Response] = pool.submit(post, server, {"slow": True})
        wait_for(lambda: server.status()["in_flight"] == 1, what="write in flight")
        frozen = server.freeze(drain_timeout=0.2)
        written = pending.result(timeout=10)
    assert frozen == {"frozen": True, "watermark": 0, "drained": False, "in_flight": 1}
    # The write was accepted before the freeze, so it still completes; the watermark moves,
    # which is exactly what the agent's "watermark unchanged" check is there to notice.
    assert written.status == 201
    assert server.status()["watermark"] == 1


def test_start_delay_holds_the_admin_socket_with_the_public_listeners_up_and_frozen(
    make_server: MakeServer,
) -> None:
    """The test knob a switch is slowed with: a frozen server's start answers 503 on its
    public port and keeps its admin socket (the agent's sign of readiness) shut that long."""
    server = make_server()
    server.start()
    server.freeze()
    server.stop()
    # A look at the admin socket that a stall of this process put past the delay proves
    # nothing either way: the start is made again with a longer delay (a socket never held
    # answers each time, and fails the test).
    for delay in (1.5, 4.0, 10.0):
        server.env[START_DELAY_ENV] = str(delay)
        started = time.monotonic()
        server.spawn()
        # The delay begins once the public listeners are up, however long the start takes to
        # them (1.2 to 3.3 s at a load of 12 on the 2-CPU test machine: this looked for 1 s
        # only, and found none): the first answer there comes within it, whenever that is
        # (some 50 ms from its start to the admin socket's look below, at that load).
        refused = None
        while refused is None:
            with contextlib.suppress(OSError):
                refused = post(server, {"early": True})
            assert server.running, server.log()
            assert time.monotonic() - started < READY_TIMEOUT, "no public listener"
            time.sleep(0.02)
        assert refused.status == 503, refused
        try:
            unix_request(server.admin_socket, "GET", "/admin/status", timeout=1.0)
        except OSError:
            break  # shut, with the public listeners up
        server.stop()
    else:
        pytest.fail("the admin socket answered at the first public answer of each start")
    status = server.wait_ready()
    # The delay was kept (a lower bound, the knob's promise: no load makes it shorter).
    assert time.monotonic() - started >= delay
    assert status["frozen"] is True
    assert [e for e in server.log_events() if e.get("event") == "test_hook.start_delay"]


def test_a_start_delay_that_is_no_number_of_seconds_stops_the_start(
    make_server: MakeServer,
) -> None:
    server = make_server(env={START_DELAY_ENV: "soon"})
    code, err = server.run_to_exit()
    assert code == 1, err
    assert f"{START_DELAY_ENV}='soon' is not a number of seconds" in err


def test_the_clients_window_test_knob_goes_below_the_least_and_no_further(
    make_server: MakeServer,
) -> None:
    """``CLIENTS_WINDOW_ENV`` sets the clients window below the config's least (60 s), so a
    test watches a sighting leave it in seconds: the server reports it and logs a warning.
    A window it cannot set (60 s or more is the config's; none or nonsense) stops the start
    in one line."""
    for raw, said in (
        ("60", f"{CLIENTS_WINDOW_ENV} must be from 1 to 59 seconds"),
        ("0", f"{CLIENTS_WINDOW_ENV} must be from 1 to 59 seconds"),
        ("1.5", f"{CLIENTS_WINDOW_ENV}='1.5' is not a whole number of seconds"),
    ):
        refused = make_server(env={CLIENTS_WINDOW_ENV: raw})
        code, err = refused.run_to_exit()
        assert code == 1 and said in err and len(err.strip().splitlines()) == 1, err
    server = make_server(env={CLIENTS_WINDOW_ENV: "15"})
    server.start()
    assert clients_seen(server)["window_seconds"] == 15
    (warned,) = [e for e in server.log_events() if e.get("event") == "test_hook.clients_window"]
    assert warned["seconds"] == 15 and warned["level"] == "warning", warned


def test_the_body_deadline_test_knob_only_shortens_it(make_server: MakeServer) -> None:
    """``BODY_SECONDS_ENV`` shortens a request body's deadline (``gate.BODY_SECONDS``, 20 s;
    tests/test_port_floods.py sees a slow body cut at it); a deadline it cannot set (none,
    longer, nonsense) stops the start in one line."""
    for raw, said in (
        ("0", f"{BODY_SECONDS_ENV} must be over 0 and at most 20 seconds"),
        ("21", f"{BODY_SECONDS_ENV} must be over 0 and at most 20 seconds"),
        ("nan", f"{BODY_SECONDS_ENV} must be over 0 and at most 20 seconds"),
        ("soon", f"{BODY_SECONDS_ENV}='soon' is not a number of seconds"),
    ):
        refused = make_server(env={BODY_SECONDS_ENV: raw})
        code, err = refused.run_to_exit()
        assert code == 1 and said in err and len(err.strip().splitlines()) == 1, err


def test_sigterm_lets_the_write_in_flight_finish(make_server: MakeServer) -> None:
    server = make_server(env={WRITE_DELAY_ENV: "1.0"})
    server.start()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[Response] = pool.submit(post, server, {"last": "words"})
        wait_for(lambda: server.status()["in_flight"] == 1, what="write in flight")
        assert server.stop() == 0
        written = pending.result(timeout=10)
    assert written.status == 201
    server.env.clear()
    server.start()
    got = server.request("GET", f"entries/{written.json()['id']}")
    assert got.json()["body"] == {"last": "words"}


def test_idle_and_half_open_connections_do_not_hold_up_a_stop(make_server: MakeServer) -> None:
    """Issue 16 #6: 200 half-open connections on 8080 stretched a restart (and the freeze
    around it) from 0.5 s to ~11 s: a stop waited for them. It waits for writes in flight
    only; a connection that carries no request is closed at once. The server's wait for its
    writes is an hour here (``long_grace``): a stop that waited on these connections for it
    would not end within ``STOP_TIMEOUT`` (this timed the stop against half of the 10 s
    before, which a loaded machine could break)."""
    server = make_server(env=long_grace())
    server.start()
    held = []
    try:
        for _ in range(200):
            sock = socket.create_connection((server.address, 8080), timeout=5)
            sock.sendall(  # a request whose body never comes: its handler waits for it
                b"POST /praxis_live/entries HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            held.append(sock)
        wait_for(lambda: post(server, {"still": "up"}).status == 201, what="server answers")
        assert server.stop() == 0  # within STOP_TIMEOUT, far short of the writes' wait
    finally:
        for sock in held:
            sock.close()
    (stopping,) = [e for e in server.log_events() if e.get("event") == "server.stopping"]
    assert stopping["in_flight"] == 0, stopping  # none of them counted as a write


# --- durability and start-up ----------------------------------------------------------------------


def test_acknowledged_entries_survive_sigkill(make_server: MakeServer) -> None:
    server = make_server()
    server.start()
    acked = [post(server, {"i": i}).json() for i in range(25)]
    server.kill()  # no graceful stop: stale pid file, socket and WAL are left behind
    assert server.admin_socket.exists()

    server.start()
    for entry in acked:
        assert server.request("GET", f"entries/{entry['id']}").status == 200
    assert server.status()["watermark"] == acked[-1]["seq"] == 25
    assert post(server, {"i": 25}).json()["seq"] == 26


def test_second_server_on_the_same_data_dir_or_port_is_refused(make_server: MakeServer) -> None:
    first = make_server()
    first.start()
    # Same data_dir: refused by the data_dir lock.
    twin = make_server(data_dir=first.data_dir)
    code, err = twin.run_to_exit()
    assert code == 1 and "Traceback" not in err
    assert "another tlsroll-refserver uses" in err and str(first.pid) in err
    # Same address and port, own data_dir: refused at bind.
    clash = make_server(address=first.address)
    code, err = clash.run_to_exit()
    assert code == 1 and "Traceback" not in err
    assert f"cannot listen on http://{first.address}:8080" in err
    assert first.status()["pid"] == first.pid  # the first one is unharmed


def test_a_live_admin_socket_is_not_taken_over(make_server: MakeServer) -> None:
    """Review s66 M2: a second server given a live one's admin_socket (its own data_dir and
    address) removed that socket and bound its own, so that the agent froze and asked the
    wrong server, and either's stop removed the other's. It exits 1 in one line now; and a
    server's stop leaves a socket file that is not the one it bound."""
    first = make_server()
    first.start()
    second = make_server(admin_socket=first.admin_socket)
    code, err = second.run_to_exit()
    assert code == 1 and "Traceback" not in err, err
    assert f"another server answers on admin_socket {first.admin_socket}" in err, err
    status = unix_request(first.admin_socket, "GET", "/admin/status").json()
    assert status["pid"] == first.pid and status["address"] == first.address
    first.admin_socket.rename(first.admin_socket.with_name("moved.sock"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(first.admin_socket))
        put = os.lstat(first.admin_socket).st_ino
        assert first.stop() == 0
        assert os.lstat(first.admin_socket).st_ino == put


CONFIG_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing-address", {"address": None}, "[server].address: missing"),
    ("bad-address", {"address": "localhost"}, "[server].address: 'localhost' is not an IP"),
    ("port-as-string", {"http_port": "8080"}, "[server].http_port: expected an integer"),
    ("port-range", {"https_port": 70000}, "[server].https_port: must be between"),
    ("listen-type", {"listen": "http"}, "[server].listen: expected a list"),
    ("listen-scheme", {"listen": ["ftp"]}, "[server].listen[0]: 'ftp' is not"),
    ("listen-empty", {"listen": []}, "[server].listen: needs at least one"),
    ("unknown-key", {"http_prot": 8080}, "[server].http_prot: unknown key"),
    ("app-path", {"app_path": "praxis"}, "[server].app_path:"),
    ("https-no-cert", {"listen": ["https"]}, "[server].cert_file: missing"),
    ("client-no-ca", {"require_client_cert": True}, "[server].require_client_cert: needs"),
    ("data-dir-missing", {"data_dir": None}, "[server].data_dir: missing"),
    ("flag-type", {"require_client_cert": "yes"}, "[server].require_client_cert: expected true"),
    ("window-short", {"clients_window": 10}, "[server].clients_window: must be between 60"),
    ("clients-max-0", {"clients_max": 0}, "[server].clients_max: must be between 1"),
]


@pytest.mark.parametrize(
    ("settings", "expected"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_config_errors_exit_2_with_one_line(
    make_server: MakeServer, settings: dict[str, Any], expected: str
) -> None:
    server = make_server()
    server.write_config(**settings)
    assert_config_error(server, expected)


def assert_config_error(server: RefServer, expected: str) -> None:
    code, err = server.run_to_exit()
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tlsroll-refserver: config error: ")
    assert str(server.config_path) in lines[0]
    assert expected in lines[0]


def test_config_file_errors(make_server: MakeServer) -> None:
    server = make_server()
    server.config_path.write_text("[server\naddress = 1\n")
    assert_config_error(server, "not valid TOML")
    server.config_path.unlink()
    assert_config_error(server, "no such file")


@pytest.mark.open_keys  # (a key others can read, on purpose)
def test_key_readable_by_others_is_refused(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert
) -> None:
    address = loopback()
    cert = issue_cert(address)
    cert.key_file.chmod(0o644)
    server = make_server(
        address=address, listen=["https"], cert_file=cert.cert_file, key_file=cert.key_file
    )
    assert_config_error(server, "[server].key_file:")
    _, err = server.run_to_exit()
    assert "chmod 600" in err and not port_open(address, 8443)


def test_a_certificate_and_key_the_wrong_way_round_are_said_so(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert
) -> None:
    """Review s66 L4: the ssl module's word for a certificate and a key given the wrong way
    round was "[SSL] PEM lib (_ssl.c:3905)". The line says which file holds what."""
    address = loopback()
    cert = issue_cert(address)
    cert.cert_file.chmod(0o600)
    server = make_server(
        address=address, listen=["https"], cert_file=cert.key_file, key_file=cert.cert_file
    )
    assert_config_error(
        server,
        f"[server].cert_file: {cert.key_file} holds a private key, not a certificate "
        "(cert_file and key_file given the wrong way round?)",
    )
    server.write_config(cert_file=cert.cert_file)
    assert_config_error(
        server, f"[server].key_file: {cert.cert_file} holds a certificate, not a private key"
    )
    server.write_config(key_file=cert.ca_file)  # neither, nor a PEM file at all
    cert.ca_file.write_bytes(b"not PEM")
    cert.ca_file.chmod(0o600)
    assert_config_error(server, f"[server].key_file: {cert.ca_file} holds no PEM private key")
    server.write_config(key_file=cert.key_file)
    server.start()
    assert not port_open(address, 8080) and port_open(address, 8443)


def test_a_key_not_of_the_certificate_or_with_a_passphrase_is_said_so(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert
) -> None:
    """Review s69 revref L: a key not of the certificate was "[server].cert_file: cannot load
    certificate/key/CA: [X509: KEY_VALUES_MISMATCH] key values mismatch (_ssl.c:3926)", and a
    key with a passphrase "[server].cert_file: ... [SSL] PEM lib": both under the wrong key."""
    address = loopback()
    cert, other = issue_cert(address), issue_cert(loopback())  # (a directory per address)
    server = make_server(
        address=address, listen=["https"], cert_file=cert.cert_file, key_file=other.key_file
    )
    assert_config_error(
        server,
        f"[server].key_file: {other.key_file} is not the key of the certificate in "
        f"{cert.cert_file}",
    )
    key = serialization.load_pem_private_key(cert.key_file.read_bytes(), None)
    forms = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }
    for name, form in forms.items():
        locked = cert.key_file.with_name(f"locked-{name}.pem")
        write_atomic(
            locked,
            key.private_bytes(
                Encoding.PEM, form, serialization.BestAvailableEncryption(b"passphrase")
            ),
            PRIVATE,
        )
        server.write_config(key_file=locked)
        assert_config_error(
            server,
            f"[server].key_file: {locked} is encrypted: the server takes a key without a "
            "passphrase",
        )


def test_bad_verifier_file_is_refused(make_server: MakeServer, tmp_path: Path) -> None:
    bad = tmp_path / "verifier.json"
    write_atomic(bad, b'{"alg": "scrypt"}', PRIVATE)
    server = make_server(auth_verifier_file=bad)
    assert_config_error(server, "[server].auth_verifier_file:")
    good = write_verifier(tmp_path / "good.json", "a-secret")
    good.chmod(0o644)
    server.write_config(auth_verifier_file=good)
    assert_config_error(server, "chmod 600")


# --- auth password --------------------------------------------------------------------------------


def https_login_server(
    make_server: MakeServer,
    loopback: Callable[[], str],
    issue_cert: IssueCert,
    verifier_file: Path,
    *,
    start: bool = True,
    **settings: Any,
) -> tuple[RefServer, ssl.SSLContext]:
    """A server on http and https (the dual phase) with the auth password, started unless
    ``start`` is False, and a context that trusts its certificate."""
    address = loopback()
    cert = issue_cert(address)
    server = make_server(
        address=address,
        listen=["http", "https"],
        cert_file=cert.cert_file,
        key_file=cert.key_file,
        auth_verifier_file=verifier_file,
        **settings,
    )
    if start:
        server.start()
    return server, https_context(cert)


# How long a login's client waits for its answer at most: a hang's bound, not a measure. A
# login waits for its scrypt check, or for the checks before it, and ``SLOW_CHECK``'s (below)
# took 33 s at a load of 11 on the 2-CPU test machine, past the 30 s this was.
ANSWER_TIMEOUT = 100.0


def login_from(
    server: RefServer, context: ssl.SSLContext, secret: str, source: str | None = None
) -> Response:
    """POST the login on https, from the local address ``source`` if given (as a PC with that
    address would)."""
    conn = httpcheck.HTTPSConnection(
        server.address,
        server.port("https"),
        timeout=ANSWER_TIMEOUT,
        context=context,
        source_address=(source, 0) if source else None,
    )
    try:
        body = json.dumps({"password": secret}).encode()
        conn.request(
            "POST",
            f"{server.app_path}login",
            body=body,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def test_login_checks_the_verifier_read_at_start_up(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    old_secret = password.generate_password()
    new_secret = password.generate_password()
    verifier_file = write_verifier(tmp_path / "auth.json", old_secret)
    server, ctx = https_login_server(make_server, loopback, issue_cert, verifier_file)
    assert server.status()["auth_configured"] is True

    def login(secret: object) -> Response:
        return server.request("POST", "login", {"password": secret}, scheme="https", context=ctx)

    assert login(old_secret).status == 200 and login(old_secret).json() == {"ok": True}
    # Typed otherwise (Caps Lock, spaces or nothing between the groups): folded to its form,
    # as the workstation folds it (session 69 left /login without it).
    typed_otherwise = {
        "capitals": old_secret.upper(),
        "spaces": old_secret.replace("-", " "),
        "no separators": old_secret.replace("-", ""),
    }
    for how, typed in typed_otherwise.items():
        assert login(typed).status == 200, how  # (never the password in a failure's output)
    wrong = login(new_secret)
    assert wrong.status == 401 and wrong.json()["ok"] is False
    assert login("").status == 400 and login(42).status == 400
    assert server.request("POST", "login", b"nope", scheme="https", context=ctx).status == 400

    # A new verifier on disk has no effect until the server restarts (the seed's rule).
    write_verifier(verifier_file, new_secret)
    assert login(old_secret).status == 200 and login(new_secret).status == 401
    server.restart()
    assert login(new_secret).status == 200 and login(old_secret).status == 401

    log = server.log()
    for secret in (old_secret, new_secret):
        assert secret not in log
    assert json.loads(verifier_file.read_text())["hash"] not in log
    assert any(e["event"] == "login.checked" for e in server.log_events())


def test_login_is_refused_over_http_in_the_dual_phase(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Both listeners up with the verifier (phase 1): the password is taken on https only; on
    http a 403 that says where to go, the body unread, nothing counted. Plain writes over http
    still work (the seed's phase 1)."""
    secret = password.generate_password()
    verifier_file = write_verifier(tmp_path / "auth.json", secret)
    server, ctx = https_login_server(make_server, loopback, issue_cert, verifier_file)

    for value in (secret, "not-" + secret):
        refused = server.request("POST", "login", {"password": value})
        assert refused.status == 403, refused.body
        body = refused.json()
        assert body["error"] == "https_required"
        assert f"https://{server.address}:8443{server.app_path}login" in body["message"]
        assert secret not in refused.body.decode()
    assert post(server, {"still": "http"}).status == 201
    assert login_from(server, ctx, secret).status == 200
    status = server.status()
    assert status["login_failures"] == 0 and status["login_refused"] == 0
    assert not [
        e
        for e in server.log_events()
        if e["event"] == "login.checked" and e.get("scheme") == "http"
    ]
    assert any(e["event"] == "login.refused_http" for e in server.log_events())
    assert secret not in server.log()


def test_login_backs_off_after_wrong_passwords(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Per source address: 5 wrong ones are free, then 2 s, doubling; a right one clears it."""
    secret = password.generate_password()
    verifier_file = write_verifier(tmp_path / "auth.json", secret)
    server, ctx = https_login_server(make_server, loopback, issue_cert, verifier_file)

    def login(value: str) -> Response:
        return login_from(server, ctx, value)

    def waits(after: float, base: int) -> None:
        """A right password now is refused with ``ceil(base - t)``, t the server's time since
        the failure that began the ``base``-second wait, which is no longer than the test's
        since that failure's request went out (``after``): on a loaded machine (CI of session
        60) more than a second passed between the two, and "3" came for "4"."""
        refused = login(secret)
        between = time.monotonic() - after
        # (A stall longer than the wait itself lets the right password in: said, not hidden.)
        assert refused.status == 429, f"{refused.status} after {between:.1f} s of a {base} s wait"
        assert refused.json()["error"] == "rate_limited"
        value = int(refused.headers["retry-after"])
        assert max(1, math.ceil(base - between)) <= value <= base, (value, between)

    for _ in range(5):
        sent = time.monotonic()
        assert login("not-" + secret).status == 401
    waits(sent, 2)  # even the right one waits now: 2 s after the fifth wrong one
    time.sleep(2.1)
    sent = time.monotonic()
    assert login("not-" + secret).status == 401  # the 6th wrong one: 4 s now
    waits(sent, 4)  # 4, not 2 again
    time.sleep(4.1)
    assert login(secret).status == 200
    assert login("not-" + secret).status == 401  # cleared: free again
    assert any(e["event"] == "login.rate_limited" for e in server.log_events())
    assert secret not in server.log()


GUESSES_AT_ONCE = 24


def test_wrong_passwords_sent_together_pass_no_more_than_the_allowance(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Each guess is counted before scrypt runs: 24 sent at once from one address get 5
    answers (the free ones) and 19 refusals, not 24 answers."""
    secret = password.generate_password()
    verifier_file = tmp_path / "auth.json"
    # The production cost (~0.1 s each), so that the guesses really overlap in the server.
    verifier = password.make_verifier(secret)
    write_atomic(verifier_file, password.verifier_to_json(verifier).encode(), PRIVATE)
    server, ctx = https_login_server(make_server, loopback, issue_cert, verifier_file)
    began = time.monotonic()
    with ThreadPoolExecutor(GUESSES_AT_ONCE) as pool:
        answers = list(
            pool.map(lambda i: login_from(server, ctx, f"guess-{i}").status, range(GUESSES_AT_ONCE))
        )
    # Each wait the checks outlast opens one more check (2 s after the fifth wrong one, then
    # 4, 8, ...): on a loaded machine (CI of session 60, load 10) the handshakes and the five
    # checks took longer than the first wait, and a sixth guess was checked. None opens
    # within 2 s, the time the guesses take on an idle machine (about half a second).
    took, opened, wait = time.monotonic() - began, 0, 2.0
    while took >= wait:
        opened, took, wait = opened + 1, took - wait, wait * 2
    checked = answers.count(401)
    assert 5 <= checked <= 5 + opened, (answers, opened)
    assert sorted(answers) == [401] * checked + [429] * (GUESSES_AT_ONCE - checked), answers
    status = server.status()
    assert status["login_failures"] == checked
    assert status["login_refused"] == GUESSES_AT_ONCE - checked


RIGHT_AT_ONCE = 12


def test_right_passwords_sent_together_from_one_address_all_get_in(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """A terminal server whose users log in together at eight, all with the right password,
    from one address: each login is counted before scrypt runs, so the sixth and later were
    refused (429) while the first five were still being checked (session 45's finding). Now a
    login over the allowance only because checks are still running waits for them: all 12 get
    in, and wrong guesses sent together still get no more than the allowance (the test above)."""
    secret = password.generate_password()
    verifier_file = tmp_path / "auth.json"
    verifier = password.make_verifier(secret)  # the production cost: the checks overlap
    write_atomic(verifier_file, password.verifier_to_json(verifier).encode(), PRIVATE)
    server, ctx = https_login_server(make_server, loopback, issue_cert, verifier_file)
    with ThreadPoolExecutor(RIGHT_AT_ONCE) as pool:
        answers = list(
            pool.map(lambda _: login_from(server, ctx, secret).status, range(RIGHT_AT_ONCE))
        )
    assert answers == [200] * RIGHT_AT_ONCE
    status = server.status()
    assert status["login_failures"] == 0 and status["login_refused"] == 0
    # Mixed: wrong guesses among right logins get their own answers, nothing more is refused
    # than the limits say, and the source is clear afterwards.
    with ThreadPoolExecutor(8) as pool:
        mixed = list(
            pool.map(
                lambda i: login_from(server, ctx, secret if i % 2 else f"guess-{i}").status,
                range(8),
            )
        )
    assert sorted(mixed) == [200] * 4 + [401] * 4  # five counted at most, one right among them
    assert login_from(server, ctx, secret).status == 200
    assert secret not in server.log()


def test_the_whole_server_has_a_ceiling_of_wrong_passwords(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Fresh addresses get no fresh budget past ``login_ceiling`` wrong passwords a day: then
    even the right password from a new address waits. A right one does not use it up."""
    secret = password.generate_password()
    verifier_file = write_verifier(tmp_path / "auth.json", secret)
    server, ctx = https_login_server(
        make_server, loopback, issue_cert, verifier_file, login_ceiling=3
    )
    assert login_from(server, ctx, secret, loopback()).status == 200
    for _ in range(3):  # one wrong password from each of three addresses
        assert login_from(server, ctx, "not-" + secret, loopback()).status == 401
    refused = login_from(server, ctx, secret, loopback())
    assert refused.status == 429 and refused.json()["error"] == "rate_limited"
    assert int(refused.headers["retry-after"]) > 80_000  # until the first leaves the day
    status = server.status()
    assert status["login_failures"] == 3 and status["login_refused"] == 1
    assert secret not in server.log()


def test_the_ceiling_goes_on_across_restarts(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Review s66 M1: the ceiling began empty at every start of the server, and every switch,
    change-password rollout and reboot restarts it: a guesser got a fresh ``login_ceiling``
    with each. The wrong passwords' times are kept with the count and counted again at start;
    one dated more than a minute ahead of the clock (counted while it was ahead) no longer is,
    and is dropped from the store with the next save."""
    secret = password.generate_password()
    verifier_file = write_verifier(tmp_path / "auth.json", secret)
    server, ctx = https_login_server(
        make_server, loopback, issue_cert, verifier_file, login_ceiling=3
    )
    for _ in range(3):
        assert login_from(server, ctx, "not-" + secret, loopback()).status == 401
    assert login_from(server, ctx, "not-" + secret, loopback()).status == 429
    server.restart()
    refused = login_from(server, ctx, secret, loopback())
    assert refused.status == 429, "a restart gave a fresh day's allowance"
    assert int(refused.headers["retry-after"]) > 80_000  # until the first leaves the day
    assert server.status()["login_failures"] == 3

    server.stop()  # the times all put an hour ahead, as if the clock was then
    db = sqlite3.connect(server.data_dir / "entries.sqlite3")
    with db:
        db.execute("UPDATE login_ceiling SET at = at + 3600")
    db.close()
    server.start()
    assert login_from(server, ctx, "not-" + secret, loopback()).status == 401
    assert login_from(server, ctx, secret, loopback()).status == 200
    wait_for(lambda: (stored_login_failures(server.data_dir) or (0,))[0] == 4, 10, "the save")
    db = sqlite3.connect(f"file:{server.data_dir / 'entries.sqlite3'}?mode=ro", uri=True)
    try:
        [(kept,)] = db.execute("SELECT at FROM login_ceiling").fetchall()
    finally:
        db.close()
    assert kept <= time.time()  # the new one; those an hour ahead are gone
    assert secret not in server.log()


def test_a_password_that_is_no_text_is_a_bad_request_not_counted(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Review s66 pw L1: a /login body whose password holds a lone surrogate (``"\\ud800"``,
    valid JSON, no text) failed in the scrypt hash: a 500 "internal", an exception with its
    traceback logged at error level, and the guess counted. A 400 ``bad_request`` now, before
    it is counted."""
    secret = password.generate_password()
    verifier_file = write_verifier(tmp_path / "auth.json", secret)
    server, ctx = https_login_server(make_server, loopback, issue_cert, verifier_file)
    refused = login_from(server, ctx, secret + "\ud800")  # json.dumps escapes it: \ud800
    assert refused.status == 400, (refused.status, refused.body)
    assert refused.json()["error"] == "bad_request", refused.json()
    status = server.status()
    assert (status["login_failures"], status["login_refused"]) == (0, 0)
    assert login_from(server, ctx, secret).status == 200
    log = server.log()
    assert "request.failed" not in log and "Traceback" not in log and secret not in log


def stored_login_failures(data_dir: Path) -> tuple[int, str | None, str | None] | None:
    """The login_failures row of the server's store (read-only beside it), None if none."""
    conn = sqlite3.connect(f"file:{data_dir / 'entries.sqlite3'}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT count, first_at, last_at FROM login_failures WHERE id = 1"
        ).fetchone()
    finally:
        conn.close()
    return None if row is None else (row[0], row[1], row[2])


def test_the_count_of_wrong_passwords_survives_restarts_and_crashes(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Review of s49 (1): the count of wrong passwords began at 0 with every start of the
    server, and every switch and every change-password rollout (the natural answer to someone
    guessing) restarts it: the evidence went at the moment it mattered. It is kept in the store
    now, with when the first and the latest were: across a stop, a crash (once saved), and a
    new password (a change-password rollout does not reset it)."""
    secret = password.generate_password()
    verifier_file = write_verifier(tmp_path / "auth.json", secret)
    server, ctx = https_login_server(make_server, loopback, issue_cert, verifier_file)
    status = server.status()
    assert (status["login_failures"], status["first_login_failure"]) == (0, None)
    for _ in range(2):
        assert login_from(server, ctx, "not-" + secret).status == 401
    before = server.status()
    assert before["login_failures"] == 2
    first, last = before["first_login_failure"], before["last_login_failure"]
    assert first is not None and last is not None and first <= last

    server.restart()
    status = server.status()
    assert (
        status["login_failures"],
        status["first_login_failure"],
        status["last_login_failure"],
    ) == (2, first, last)

    # A new password (what a change-password rollout does): still counted on.
    new_secret = password.generate_password()
    write_verifier(verifier_file, new_secret)
    server.restart()
    assert login_from(server, ctx, secret).status == 401
    assert login_from(server, ctx, new_secret).status == 200
    status = server.status()
    assert status["login_failures"] == 3 and status["first_login_failure"] == first
    assert status["last_login_failure"] >= last

    # A crash: what was saved (at once after a quiet time) is what the next start counts on.
    wait_for(lambda: (stored_login_failures(server.data_dir) or (0,))[0] == 3, 10, "the save")
    server.kill()
    server.start()
    assert server.status()["login_failures"] == 3
    assert secret not in server.log() and new_secret not in server.log()


def _in_process(tmp_path: Path, store: refstore.Store) -> Server:
    """A server object in this process (no listener started) on ``store``, for what it does
    with its count of wrong passwords."""
    config = refserver_config.RefServerConfig(
        path=tmp_path / "refserver.toml",
        address="127.0.0.1",
        app_path="/app/",
        listen=("http",),
        http_port=8080,
        https_port=8443,
        cert_file=None,
        key_file=None,
        client_ca_file=None,
        require_client_cert=False,
        data_dir=tmp_path,
        admin_socket=tmp_path / "admin.sock",
        auth_verifier_file=None,
    )
    return Server(refserver_config.Loaded(config, None, None), store, refstore.FreezeState(False))


async def test_a_flood_of_wrong_passwords_is_no_flood_of_commits(tmp_path: Path) -> None:
    """Review of s49 (1): the count is saved at once after a quiet time, then at most once
    per ``failures_save_seconds`` while more come (here an hour: none in this test), and the
    last count as the server stops; never one commit per guess."""
    store = refstore.Store(tmp_path)
    saved: list[refstore.LoginFailures] = []
    save = store.save_login_failures

    def counted(failures: refstore.LoginFailures) -> None:
        save(failures)
        saved.append(failures)

    store.save_login_failures = counted  # type: ignore[method-assign]
    server = _in_process(tmp_path, store)
    try:
        server.failures_save_seconds = 3600.0
        server._login_failed()
        for _ in range(200):
            if saved:
                break
            await asyncio.sleep(0.01)
        assert [f.count for f in saved] == [1]
        for _ in range(99):
            server._login_failed()
            await asyncio.sleep(0)
        assert [f.count for f in saved] == [1]
        await server.stop_saving_failures()
        assert [f.count for f in saved] == [1, 100]
        assert store.load_login_failures() == refstore.LoginFailures(
            100, server.first_login_failure, server.last_login_failure, server._failures().ceiling
        )
        assert len(server._failures().ceiling) == 100  # with the ceiling's times (s66 M1)
        await server.stop_saving_failures()  # nothing new: no commit
        assert len(saved) == 2
    finally:
        server.close()
        store.close()


async def test_a_count_a_failing_store_cannot_keep_is_said_as_the_server_stops(
    tmp_path: Path,
) -> None:
    """Review rev50a L3: with saves already failing (a read-only store: said once), the count
    the stop could not save went without a word; it is said at the stop, with what the store
    still holds."""
    store = refstore.Store(tmp_path)

    def broken(failures: refstore.LoginFailures) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    store.save_login_failures = broken  # type: ignore[method-assign]
    server = _in_process(tmp_path, store)
    try:
        with structlog.testing.capture_logs() as logs:
            server.failures_save_seconds = 3600.0
            server._login_failed()
            for _ in range(200):
                if server._failures_save_failed:
                    break
                await asyncio.sleep(0.01)
            server._login_failed()
            await server.stop_saving_failures()
        events = [e["event"] for e in logs]
        assert events.count("login_failures.not_saved") == 1, events
        [lost] = [e for e in logs if e["event"] == "login_failures.lost_at_stop"]
        assert (lost["count"], lost["saved"]) == (2, 0)
    finally:
        server.close()
        store.close()


def store_of_the_release_before(data_dir: Path) -> Path:
    """An entry store as the release before migration 3 (login_failures) left it: schema 2,
    one entry (id 'e1'), 0600; its path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / refstore.DB_NAME
    Database(path, refstore.MIGRATIONS[:2]).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO entries (id, body, created_at) VALUES (?, '{\"text\": \"before\"}', 't')",
            ("e1" * 16,),
        )
    conn.close()
    return path


def schema_of(path: Path) -> int:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_a_read_only_store_of_the_release_before_is_used_as_it_is(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Review rev50a L1: a server restarted (by a switch) on a store it cannot write, of the
    release before migration 3: that release started on it, read-only (the entries served,
    the count of wrong passwords in memory); this one stopped at the migration it could not
    write ("cannot open the entry store"). Migration 3 only adds a table the server copes
    without: the file is used as it is (a warning says what is missing), no copy made, the
    count kept in memory (its failed save said once), and the first start that can write the
    file migrates it (with its copy: builds that cannot read ``readable_by`` wrote schema 2)."""
    secret = password.generate_password()
    verifier_file = write_verifier(tmp_path / "auth.json", secret)
    server, ctx = https_login_server(make_server, loopback, issue_cert, verifier_file, start=False)
    path = store_of_the_release_before(server.data_dir)
    copy = copy_name(path, len(refstore.MIGRATIONS))
    with read_only(path):
        server.start()
        got = server.request("GET", f"entries/{'e1' * 16}")
        assert got.status == 200 and got.json()["body"] == {"text": "before"}
        for _ in range(2):
            assert login_from(server, ctx, "not-" + secret).status == 401
        assert login_from(server, ctx, secret).status == 200
        assert server.status()["login_failures"] == 2
        assert login_from(server, ctx, "not-" + secret).status == 401
        assert server.status()["login_failures"] == 3
        assert server.stop() == 0
    events = server.log_events()
    names = [e["event"] for e in events]
    [warning] = [e for e in events if e["event"] == "store.not_migrated"]
    assert warning["level"] == "warning" and (warning["version"], warning["to"]) == (
        2,
        len(refstore.MIGRATIONS),
    )
    assert "counted in memory only" in warning["detail"], warning
    assert names.count("login_failures.not_saved") == 1, names
    [lost] = [e for e in events if e["event"] == "login_failures.lost_at_stop"]
    assert (lost["count"], lost["saved"]) == (3, 0)
    [unwritable] = [e for e in events if e["event"] == "store.read_only"]
    assert "remount it read-write" in unwritable["hint"], unwritable  # what to do (s70)
    assert schema_of(path) == 2 and not copy.exists()
    assert not [p for p in path.parent.iterdir() if ".before-v" in p.name]

    server.start()  # writable again: migrated, its copy kept
    assert schema_of(path) == len(refstore.MIGRATIONS) and schema_of(copy) == 2
    assert login_from(server, ctx, "not-" + secret).status == 401
    assert server.status()["login_failures"] == 1  # the count of the read-only run is gone
    assert server.stop() == 0
    stored = stored_login_failures(server.data_dir)
    assert stored is not None and stored[0] == 1
    assert secret not in server.log()


def test_a_read_only_store_that_lacks_more_than_ignorable_is_still_refused(
    tmp_path: Path,
) -> None:
    """Only migrations the server copes without are left out on a read-only store: one of
    schema 1 (the freeze row missing) is refused as before, unchanged, no copy made."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / refstore.DB_NAME
    Database(path, refstore.MIGRATIONS[:1]).close()
    with read_only(path), pytest.raises(sqlite3.OperationalError, match="readonly"):
        refstore.Store(data_dir)
    assert schema_of(path) == 1


async def test_the_count_on_a_store_without_its_table_is_kept_in_memory_said_once(
    tmp_path: Path,
) -> None:
    """Review rev50a L1: on a store of schema 2 used as it is (read-only at start), a save of
    the count of wrong passwords fails without touching the file, is said once, and the
    saving ends (no retry loop); the count goes on in memory, and is said lost at the stop."""
    path = store_of_the_release_before(tmp_path / "data")
    with read_only(path):
        with structlog.testing.capture_logs() as logs:
            store = refstore.Store(path.parent)
        try:
            assert (store.version, store.keeps_login_failures) == (2, False)
            assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
                "store.not_migrated"
            ]
            assert store.load_login_failures() == refstore.LoginFailures()
            server = _in_process(path.parent, store)
            try:
                with structlog.testing.capture_logs() as logs:
                    server.failures_save_seconds = 0.0
                    for _ in range(3):
                        server._login_failed()
                        task = server._failures_saving
                        assert task is not None
                        await asyncio.wait_for(task, 30)  # ends: no loop
                    assert server.login_failures == 3
                    await server.stop_saving_failures()
                events = [e["event"] for e in logs]
                assert events.count("login_failures.not_saved") == 1, events
                [said] = [e for e in logs if e["event"] == "login_failures.not_saved"]
                assert "without table login_failures" in said["error"], said
                [lost] = [e for e in logs if e["event"] == "login_failures.lost_at_stop"]
                assert (lost["count"], lost["saved"]) == (3, 0)
            finally:
                server.close()
        finally:
            store.close()
    assert schema_of(path) == 2


# One check of this verifier takes seconds (the production cost times 64: r=32, p=16; about 7 s
# and 128 MiB on the 2-CPU test machine, where 65 logins line up behind it in 0.3 s; 33 s at a
# load of 11, and everything around it is as much slower: the clients wait ``ANSWER_TIMEOUT``).
# No password matches it (its hash is random): made without running scrypt.
SLOW_CHECK = {"n": 2**15, "r": 32, "p": 16}


def slow_verifier(path: Path) -> Path:
    verifier = password.validate_verifier(
        {
            "alg": "scrypt",
            **SLOW_CHECK,
            "salt": base64.b64encode(os.urandom(password.SALT_BYTES)).decode(),
            "hash": base64.b64encode(os.urandom(password.HASH_BYTES)).decode(),
        }
    )
    write_atomic(path, password.verifier_to_json(verifier).encode(), PRIVATE)
    return path


def login_queue(server: RefServer) -> tuple[int, int]:
    """(checks running, logins waiting for them) now, as the admin status says."""
    status = server.status()
    return status["login_checking"], status["login_waiting"]


def assert_rate_limited(resp: Response) -> None:
    assert resp.status == 429, resp.body
    assert resp.json()["error"] == "rate_limited"
    assert int(resp.headers["retry-after"]) >= 1


def test_the_login_queue_holds_16_per_source_and_64_in_all(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """A login held back only by checks still running waits for them (the tests above), but
    no more than 16 of one source and 64 in all wait: one more is refused at once, 429 and
    Retry-After as for any login the limits refuse. ``login_ceiling = 1``: while the one wrong
    password is being checked, every other login, from any address, is held back by it alone;
    once it is over (wrong), the ceiling is full and every waiting login is refused.

    "At once" is what ended the wait, not a clock: the queue's wait is as long as it may be
    (``MAX_LOGIN_QUEUE_SECONDS``, past the client's ``ANSWER_TIMEOUT``), so a login that
    waited could only be answered once the check was over, and the check still runs when the
    refusal has come. (Timed before: under 15 s, half the default wait.)"""
    verifier_file = slow_verifier(tmp_path / "auth.json")
    server, ctx = https_login_server(
        make_server,
        loopback,
        issue_cert,
        verifier_file,
        login_ceiling=1,
        login_queue_seconds=refserver_config.MAX_LOGIN_QUEUE_SECONDS,
    )
    sources = [loopback() for _ in range(5)]

    def refused_now(source: str) -> None:
        assert_rate_limited(login_from(server, ctx, "one-too-many", source))
        # not after a wait, which only the check's end could have ended: it still runs
        assert login_queue(server)[0] == 1, "refused only once the check was over"

    with ThreadPoolExecutor(70) as pool:
        checked = pool.submit(login_from, server, ctx, "guess", loopback())
        wait_for(lambda: login_queue(server) == (1, 0), what="the first check")
        waiting = [pool.submit(login_from, server, ctx, f"a{i}", sources[0]) for i in range(16)]
        wait_for(lambda: login_queue(server) == (1, 16), what="16 logins waiting")
        refused_now(sources[0])  # the 17th of one source
        waiting += [
            pool.submit(login_from, server, ctx, f"{n}{i}", source)
            for n, source in enumerate(sources[1:4])
            for i in range(16)
        ]
        wait_for(lambda: login_queue(server) == (1, 64), what="64 logins waiting")
        refused_now(sources[4])  # the 65th in all, from a source with none waiting
        assert not checked.done(), "the check ended before the queue was full: too fast here"
        assert login_queue(server) == (1, 64)
        assert checked.result(timeout=ANSWER_TIMEOUT).status == 401
        assert [f.result(timeout=ANSWER_TIMEOUT).status for f in waiting] == [429] * 64
    status = server.status()
    assert status["login_failures"] == 1 and status["login_refused"] == 66
    assert (status["login_checking"], status["login_waiting"]) == (0, 0)


def test_a_waiting_login_gives_up_after_login_queue_seconds(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """A login waiting for checks before it waits ``login_queue_seconds`` at most (30 by
    default; 1 here), then is refused (429), while the check it waited for still runs."""
    verifier_file = slow_verifier(tmp_path / "auth.json")
    server, ctx = https_login_server(
        make_server, loopback, issue_cert, verifier_file, login_ceiling=1, login_queue_seconds=1
    )
    with ThreadPoolExecutor(1) as pool:
        checked = pool.submit(login_from, server, ctx, "guess", loopback())
        wait_for(lambda: login_queue(server) == (1, 0), what="the first check")
        started = time.monotonic()
        gave_up = login_from(server, ctx, "another", loopback())
        took = time.monotonic() - started
        assert gave_up.status == 429 and gave_up.json()["error"] == "rate_limited"
        assert int(gave_up.headers["retry-after"]) >= 1
        # Waited its 1 s (a lower bound, the server's promise: no load makes a wait shorter),
        # and not until the check was over: the server still runs it. (It was held against
        # half the default 30 s too, a clock bound, as 4 s was before a load broke it; a
        # wait of the default would outlast the check, about 7 s, and end with it.)
        assert took >= 0.9, took
        assert not checked.done(), "the check ended before the wait's bound: too fast here"
        assert login_queue(server) == (1, 0)
        assert checked.result(timeout=ANSWER_TIMEOUT).status == 401
    status = server.status()
    assert status["login_failures"] == 1 and status["login_refused"] == 1


def login_sent(
    server: RefServer, context: ssl.SSLContext, secret: str, source: str
) -> httpcheck.HTTPSConnection:
    """A login POSTed on https from ``source``, its answer not read (the caller closes it)."""
    conn = httpcheck.HTTPSConnection(
        server.address,
        server.port("https"),
        timeout=ANSWER_TIMEOUT,
        context=context,
        source_address=(source, 0),
    )
    body = json.dumps({"password": secret}).encode()
    conn.request(
        "POST", f"{server.app_path}login", body=body, headers={"Content-Type": "application/json"}
    )
    return conn


def test_a_login_whose_client_went_away_gives_up_its_place_in_the_queue(
    make_server: MakeServer, loopback: Callable[[], str], issue_cert: IssueCert, tmp_path: Path
) -> None:
    """Review of s49carry (L): aiohttp does not cancel a handler whose client went away, and a
    waiting login kept its place until the checks before it were over (or 30 s): 16 clients
    that sent a login and left filled their address's queue, and the next login from it was
    refused at once. A waiting login looks at its connection at least once a second and
    leaves the queue when it is gone (counted neither refused nor checked); the next one
    waits as the queue allows. The queue's wait is as long as it may be here
    (``MAX_LOGIN_QUEUE_SECONDS``): only the look at the connection can end it while the
    check runs (a clock bound, half the default 30 s, said so before)."""
    verifier_file = slow_verifier(tmp_path / "auth.json")
    server, ctx = https_login_server(
        make_server,
        loopback,
        issue_cert,
        verifier_file,
        login_ceiling=1,
        login_queue_seconds=refserver_config.MAX_LOGIN_QUEUE_SECONDS,
    )
    source = loopback()
    with ThreadPoolExecutor(2) as pool:
        checked = pool.submit(login_from, server, ctx, "guess", loopback())
        wait_for(lambda: login_queue(server) == (1, 0), what="the first check")
        gone = [login_sent(server, ctx, f"a{i}", source) for i in range(16)]
        wait_for(lambda: login_queue(server) == (1, 16), what="16 logins waiting")
        for conn in gone:
            conn.close()
        # Left by the look at their connections, not at the end of their wait (far off) nor
        # once the check was over: it still runs (the condition's 1). The bound is a hang's.
        left = "the gone ones leaving"
        wait_for(lambda: login_queue(server) == (1, 0), ANSWER_TIMEOUT, what=left)
        assert not checked.done(), "the check ended before the gone ones left: too fast here"
        later = pool.submit(login_from, server, ctx, "another", source)
        wait_for(lambda: login_queue(server) == (1, 1), ANSWER_TIMEOUT, what="the next one waiting")
        assert checked.result(timeout=ANSWER_TIMEOUT).status == 401
        # one wrong password: the ceiling is full
        assert later.result(timeout=ANSWER_TIMEOUT).status == 429
    status = server.status()
    assert status["login_failures"] == 1 and status["login_refused"] == 1
    assert (status["login_checking"], status["login_waiting"]) == (0, 0)


def test_login_without_verifier_is_a_clear_409(make_server: MakeServer) -> None:
    server = make_server()
    server.start()
    resp = server.request("POST", "login", {"password": "whatever"})
    assert resp.status == 409 and resp.json()["error"] == "no_password"
    # Logins are not writes: a frozen server still answers them.
    server.freeze(drain_timeout=1)
    assert server.request("POST", "login", {"password": "x"}).status == 409


def test_sigint_also_stops_gracefully(make_server: MakeServer) -> None:
    server = make_server()
    server.start()
    server.signal(signal.SIGINT)
    assert server.proc is not None and server.proc.wait(10) == 0


# --- the freeze's worker-thread hand-offs (in-process: the server's own objects) --------------


def in_process_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any, Path, int, list[str]]:
    """The reference server's own objects (no process): the server, its store with one entry,
    the data directory, that entry's seq, and the worker-thread hand-offs made from now on
    (the functions ``asyncio.to_thread`` is given; the server calls it as asyncio.to_thread)."""
    from refserver import config as refserver_config
    from refserver import server as refserver_server
    from refserver.store import Store

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = tmp_path / "refserver.toml"
    path.write_text(
        f'[server]\naddress = "127.0.0.1"\napp_path = "/praxis_live/"\nlisten = ["http"]\n'
        f'data_dir = "{data_dir}"\n'
    )
    store = Store(data_dir)
    server = refserver_server.RefServer(refserver_config.load(path), store, store.load_freeze())
    _entry, seq = store.insert({"n": 1})
    hops = count_thread_hops(monkeypatch)
    return server, store, data_dir, seq, hops


async def test_freeze_and_unfreeze_with_nothing_in_flight_hand_off_to_one_thread_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the flag's durable write and the watermark were two worker-thread hand-offs
    in each of freeze and unfreeze, both inside every switch's freeze window; with no write in
    flight (none can start once frozen) they are one. The answers are as before."""
    from aiohttp.test_utils import TestClient, TestServer

    server, store, data_dir, seq, hops = in_process_server(tmp_path, monkeypatch)
    async with TestClient(TestServer(server.admin_app())) as client:
        frozen = await (await client.post("/admin/freeze", json={"drain_timeout": 1})).json()
        assert frozen == {"frozen": True, "watermark": seq, "drained": True, "in_flight": 0}
        assert len(hops) == 1, hops
        assert stored_freeze(data_dir) == (True, server.frozen_since)
        hops.clear()
        unfrozen = await (await client.post("/admin/unfreeze")).json()
        assert unfrozen == {"frozen": False, "watermark": seq}
        assert len(hops) == 1, hops
        assert stored_freeze(data_dir) == (False, None)
    server.close()
    store.close()


async def test_the_status_reads_the_store_s_watermark_without_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the admin status (the agent's readiness check after a restart, and its
    verify's watermark check, both inside the freeze window) handed the watermark's read to a
    worker thread and back. It reads it on the event loop now, still from the store: a row
    committed behind the server's back (another connection) moves it, as verify needs."""
    from aiohttp.test_utils import TestClient, TestServer

    server, store, data_dir, seq, hops = in_process_server(tmp_path, monkeypatch)
    async with TestClient(TestServer(server.admin_app())) as client:
        status = await (await client.get("/admin/status")).json()
        assert status["watermark"] == seq
        behind = sqlite3.connect(data_dir / "entries.sqlite3")  # another writer's commit
        with behind:
            behind.execute("INSERT INTO entries (id, body, created_at) VALUES ('x', '{}', 'now')")
        behind.close()
        status = await (await client.get("/admin/status")).json()
        assert status["watermark"] == seq + 1
    assert hops == []
    server.close()
    store.close()


def test_the_served_fingerprint_is_the_first_certificate_s_without_cryptography(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """Issue 15: the status's ``cert_sha256`` is made with the standard library (importing
    ``cryptography`` for it cost every start of the server about 35 ms, inside the freeze
    window). It is still ``pki.fingerprint`` of the certificate served: the first one of a file
    that carries the chain after it."""
    from refserver.server import served_fingerprint

    key = pki.generate_key()
    cert = test_ca.issue(key.public_key(), pki.Names.of("node", ["127.0.0.1"]), server=True)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.cert_to_pem(cert) + test_ca.cert_pem)
    assert served_fingerprint(chain) == pki.fingerprint(cert)


def test_a_reference_server_never_closed_leaves_no_socket_directory(tmp_path: Path) -> None:
    """The helper's short socket directory (/tmp/trs-*) goes with the object, also when a test
    never calls close(): before, every such test left one behind in /tmp."""
    import gc

    server = RefServer(tmp_path / "srv", "127.0.0.1")
    sock_dir = server.admin_socket.parent
    assert sock_dir.is_dir() and sock_dir.name.startswith("trs-")
    del server
    gc.collect()
    assert not sock_dir.exists()
