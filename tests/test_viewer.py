"""The web viewer (issue 13) against real processes: a leader, agents and reference servers on
their own loopback addresses, steered with the real ``tlsroll`` CLI.

Two ways in, as a person and a program would come:

* HTTP (``http.client`` trusting only the cluster CA, hostname checked): the login link and
  its cookie, 401 and 405, the scrape token, ``/api/v1/schema`` and ``/metrics``;
* a browser: Debian's Chromium (``/usr/bin/chromium``, installed by ``make``), headless,
  driven by Playwright (no browser download). It trusts the viewer's key by its SPKI hash
  (``--ignore-certificate-errors-spki-list``), the browser's way of trusting one certificate;
  that the chain verifies against the cluster CA is what the HTTP tests check.

The rollout page's screenshot and its print view (a PDF) are written under the test's tmp
dir; the paths are printed.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import hashlib
import http.client
import http.server
import json
import os
import re
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    Request,
    sync_playwright,
)
from prometheus_client.parser import text_string_to_metric_families

from leader.runtime import start_listeners
from refserver.server import START_DELAY_ENV
from tests import test_rollout
from tests.cluster import (
    LEADER_POLL,
    AdminTokenCluster,
    Cluster,
    metrics_token_file,
    one_line_error,
    wait_until,
)
from tests.conftest import next_loopback
from tests.test_rollout import Setup, Setups, newest, start_cmd, wait_ended, wait_rollout
from tlsroll import pki
from tlsroll.errors import TerminalError
from tlsroll.tls import client_context
from tlsroll.v1 import admin_pb2

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWER_PORT = 9444
SESSION_COOKIE = "__Host-tlsroll-viewer"
NODE_ORDER = ["pending", "preflight", "staging", "staged", "switching", "confirming", "done"]
WORKING = {"preflight", "staging", "staged", "switching", "confirming"}
BROWSER_TIMEOUT_MS = 45_000
HOW_TO_GET_ACCESS = "tlsroll viewer grant"


# --- HTTP with only the cluster CA trusted -------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: str

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def cookies(self) -> dict[str, str]:
        """Set-Cookie headers by cookie name: the whole header line."""
        lines = [v for k, v in self.headers if k.lower() == "set-cookie"]
        return {line.split("=", 1)[0]: line for line in lines}


def fetch(
    cluster: Cluster,
    path: str,
    *,
    method: str = "GET",
    cookie: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request to the viewer, verifying its certificate against the cluster CA only."""
    context = client_context(cluster.ca_pem)  # check_hostname: the leader's IP in the SAN
    conn = http.client.HTTPSConnection(cluster.address, VIEWER_PORT, timeout=10, context=context)
    sent = dict(headers or {})
    if cookie is not None:
        sent["Cookie"] = f"{SESSION_COOKIE}={cookie}"
    try:
        conn.request(method, path, headers=sent)
        response = conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read().decode())
    finally:
        conn.close()


def grant(cluster: Cluster, *args: str) -> str:
    """``tlsroll viewer grant ARGS``: the printed login link."""
    result = cluster.cli("viewer", "grant", *args)
    assert result.returncode == 0, result.stderr
    link = result.stdout.strip()
    assert re.fullmatch(rf"https://{re.escape(cluster.address)}:9444/login/[\w-]{{43}}", link)
    return link


def path_of(link: str) -> str:
    return "/" + link.split("/", 3)[3]


def link_for(cluster: Cluster, name: str, ttl_seconds: int = 0) -> str:
    """A login link for ``name`` (``ttl_seconds`` 0: the default), asked of the leader over its
    admin socket as ``tlsroll viewer grant`` asks (``CreateViewerGrant``), from this process:
    for tests that need a session, not the command (``grant`` runs the command)."""
    request = admin_pb2.CreateViewerGrantRequest(name=name, ttl_seconds=ttl_seconds)
    with cluster.admin() as admin:
        made = admin.CreateViewerGrant(request, timeout=10)
    return str(made.login_url)


def login(cluster: Cluster, *args: str) -> str:
    """Grant (``tlsroll viewer grant ARGS``) and sign in over HTTP (the link's sign-in URL):
    the session cookie's value."""
    return sign_in(cluster, grant(cluster, *args))


def session_for(cluster: Cluster, name: str, ttl_seconds: int = 0) -> str:
    """``login`` with the link from ``link_for``: a session, not the command, is what the
    test needs."""
    return sign_in(cluster, link_for(cluster, name, ttl_seconds))


def sign_in(cluster: Cluster, link: str) -> str:
    """Open the link's sign-in URL over HTTP: the session cookie's value."""
    reply = fetch(cluster, path_of(link) + "/open")
    assert reply.status == 303 and reply.header("Location") == "/", reply
    line = reply.cookies()[SESSION_COOKIE]
    return line.split(";", 1)[0].split("=", 1)[1]


def grants(cluster: Cluster) -> dict[str, dict[str, Any]]:
    result = cluster.cli("viewer", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {g["name"]: g for g in json.loads(result.stdout)}


def audit_rows(cluster: Cluster) -> list[dict[str, Any]]:
    return cluster.store_table("audit")


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A leader alone (no node needed to log in), with a scrape token for /metrics."""
    root = tmp_path_factory.mktemp("lone")
    cluster = Cluster(root, next_loopback())
    try:
        cluster.init()
        token_file = metrics_token_file(root / "metrics-token")
        cluster.write_leader_config({"metrics_token_file": str(token_file)})
        cluster.start_leader()
        yield cluster
    finally:
        cluster.close()


def test_a_login_link_opens_one_strict_session_and_only_once(lone: Cluster) -> None:
    before = fetch(lone, "/")
    assert before.status == 401
    assert '<html lang="de">' in before.body and HOW_TO_GET_ACCESS in before.body
    assert 'data-reason="none"' in before.body

    link = grant(lone, "--name", "Dr. Huber", "--ttl", "1h")
    secret = link.rsplit("/", 1)[1]
    assert fetch(lone, path_of(link), method="HEAD").status == 200  # a link checker's look
    assert grants(lone)["Dr. Huber"]["state"] == "unused"

    # A mail or chat preview, a security scanner: a plain GET spends nothing and sets no
    # session; the page it gets has one link, to the URL that signs in.
    for _ in range(2):
        shown = fetch(lone, path_of(link))
        assert shown.status == 200 and SESSION_COOKIE not in shown.cookies(), shown
        assert f'href="{path_of(link)}/open"' in shown.body and "Anmelden" in shown.body
        assert "<form" not in shown.body and "http-equiv" not in shown.body
    assert "Sign in" in fetch(lone, path_of(link) + "?lang=en").body
    assert fetch(lone, path_of(link) + "/open", method="HEAD").status == 200
    assert grants(lone)["Dr. Huber"]["state"] == "unused"

    opened = fetch(lone, path_of(link) + "/open")
    assert opened.status == 303 and opened.header("Location") == "/"
    cookie_line = opened.cookies()[SESSION_COOKIE]
    flags = {part.strip().split("=")[0].lower() for part in cookie_line.split(";")[1:]}
    assert {"httponly", "secure", "path", "max-age"} <= flags, cookie_line
    assert "samesite=strict" in cookie_line.lower().replace(" ", ""), cookie_line
    assert "Path=/" in cookie_line and "Domain" not in cookie_line
    max_age = int(re.search(r"Max-Age=(\d+)", cookie_line).group(1))  # type: ignore[union-attr]
    assert 3500 <= max_age <= 3600
    session = cookie_line.split(";", 1)[0].split("=", 1)[1]
    assert session != secret and len(session) >= 43

    for used in (path_of(link), path_of(link) + "/open"):  # once only, on either URL
        again = fetch(lone, used)
        assert again.status == 401 and 'data-reason="used"' in again.body, used
        assert HOW_TO_GET_ACCESS in again.body and SESSION_COOKIE not in again.cookies()
    for unknown_path in ("/login/" + "x" * 43, "/login/" + "x" * 43 + "/open"):
        unknown = fetch(lone, unknown_path)
        assert unknown.status == 401 and 'data-reason="unknown"' in unknown.body

    page = fetch(lone, "/", cookie=session)
    assert page.status == 200 and "Angemeldet als Dr. Huber" in page.body
    assert page.header("Content-Security-Policy") is not None
    # Its one form is the sign-out's, to the viewer itself; no other answer may post a form.
    assert "form-action 'self'" in page.header("Content-Security-Policy")  # type: ignore[operator]
    api = fetch(lone, "/api/v1/schema", cookie=session).header("Content-Security-Policy")
    assert "form-action 'none'" in api  # type: ignore[operator]
    assert page.header("Cache-Control") == "no-store"
    state = grants(lone)["Dr. Huber"]
    assert state["state"] == "active" and state["used_at"]

    # The leader keeps hashes only, and logs neither secret.
    [row] = [r for r in lone.store_table("viewer_grants") if r["name"] == "Dr. Huber"]
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert row["session_hash"] == hashlib.sha256(session.encode()).hexdigest()
    stored = json.dumps(lone.store_rows(("viewer_grants", "audit")), default=str)
    assert secret not in stored and session not in stored
    assert lone.find_secrets(lone.logs_text(), extra=[secret, session]) == []
    events = lone.leader.event_names()
    assert "viewer.login_succeeded" in events and "viewer.login_refused" in events


def test_every_method_but_get_and_head_answers_405_and_changes_nothing(lone: Cluster) -> None:
    session = session_for(lone, "methods")
    link = grant(lone, "--name", "unopened")
    before = audit_rows(lone)
    paths = ["/", "/rollouts/x", "/events", "/api/v1/schema", "/metrics", "/static/viewer.css"]
    paths += [path_of(link), "/no/such/path"]
    for path in paths:
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            for cookie in (None, session):
                reply = fetch(lone, path, method=method, cookie=cookie)
                assert reply.status == 405, (method, path, reply.status)
                assert reply.header("Allow") == "GET, HEAD", (method, path)
    assert audit_rows(lone) == before
    assert grants(lone)["unopened"]["state"] == "unused"  # a POST to its link spent nothing


def test_revoked_and_expired_sessions_get_the_page_that_says_how_to_get_access(
    lone: Cluster,
) -> None:
    revoked = session_for(lone, "to revoke")
    assert fetch(lone, "/api/v1/schema", cookie=revoked).status == 200
    grant_id = grants(lone)["to revoke"]["id"]
    result = lone.cli("viewer", "revoke", grant_id)
    assert result.returncode == 0 and grant_id in result.stdout, result.stderr
    for path in ("/", "/metrics", "/events"):
        reply = fetch(lone, path, cookie=revoked)
        assert reply.status == 401, path
        assert 'data-reason="session"' in reply.body and HOW_TO_GET_ACCESS in reply.body
    # A script's API says it in JSON (rev57b L2: the German HTML page).
    api = fetch(lone, "/api/v1/schema", cookie=revoked)
    assert api.status == 401 and (api.header("Content-Type") or "").startswith("application/json")
    assert HOW_TO_GET_ACCESS in json.loads(api.body)["error"]
    assert json.loads(api.body)["reason"] == "session"
    assert grants(lone)["to revoke"]["state"] == "revoked"

    unopened = grant(lone, "--name", "short, unopened", "--ttl", "2s")  # expires first
    expiring = session_for(lone, "short", 2)
    assert fetch(lone, "/", cookie=expiring).status == 200
    wait_until(lambda: fetch(lone, "/", cookie=expiring).status == 401, 10, "session expired")
    english = fetch(lone, "/?lang=en", cookie=expiring)
    assert english.status == 401 and '<html lang="en">' in english.body
    assert "ask the practice IT" in english.body and HOW_TO_GET_ACCESS in english.body
    late = fetch(lone, path_of(unopened))
    assert late.status == 401 and 'data-reason="expired"' in late.body
    assert grants(lone)["short"]["state"] == "expired"

    refused = lone.cli("viewer", "revoke", "nosuch")
    assert refused.returncode == 1 and "no viewer grant" in refused.stderr


def open_stream(cluster: Cluster, cookie: str) -> tuple[http.client.HTTPSConnection, Any]:
    """A page's live stream (/events) with this session, read (raw, as it comes: chunked) up
    to its first event."""
    context = client_context(cluster.ca_pem)
    conn = http.client.HTTPSConnection(cluster.address, VIEWER_PORT, timeout=15, context=context)
    conn.request("GET", "/events", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"})
    response = conn.getresponse()
    assert response.status == 200
    while not response.fp.readline().startswith(b"event: update"):
        pass
    return conn, response


def test_signing_out_ends_the_session_its_copies_and_its_live_streams(lone: Cluster) -> None:
    """Review s67 viewer L2: a session lasted as long as its grant, up to 7 days, and only
    `tlsroll viewer revoke` on the leader ended it (a shared practice PC)."""
    session = session_for(lone, "Abmelden")
    page = fetch(lone, "/", cookie=session)
    assert 'action="/logout?lang=de"' in page.body and 'method="post"' in page.body
    grant_id = grants(lone)["Abmelden"]["id"]
    before = audit_rows(lone)

    # GET and HEAD of the path are 405 and change nothing (a prefetch, a link to it).
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        refused = fetch(lone, "/logout", method=method, cookie=session)
        assert refused.status == 405 and refused.header("Allow") == "POST", method
    # A POST from another site (besides SameSite=Strict, which keeps the cookie from it), or
    # from no browser at all: 403, nothing changed.
    own = f"https://{lone.address}:{VIEWER_PORT}"
    for headers in (
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": f"https://{lone.address}:9443", "Sec-Fetch-Site": "same-site"},
        {"Origin": own, "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "none"},
        {},
    ):
        refused = fetch(lone, "/logout", method="POST", cookie=session, headers=headers)
        assert refused.status == 403, headers
        assert SESSION_COOKIE not in refused.cookies(), headers
    assert audit_rows(lone) == before
    assert fetch(lone, "/", cookie=session).status == 200
    assert grants(lone)["Abmelden"]["state"] == "active"

    # The button: a browser's form POST with Sec-Fetch-Site (under a no-referrer policy its
    # Origin is "null": that with Sec-Fetch-Site is enough; the schema pages' policy is
    # same-origin now, so a browser sends its origin: the browser test).
    conn, stream = open_stream(lone, session)
    try:
        left = fetch(
            lone,
            "/logout?lang=de",
            method="POST",
            cookie=session,
            headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"},
        )
        assert left.status == 200, left
        assert 'id="signed-out"' in left.body and "Abgemeldet" in left.body
        assert HOW_TO_GET_ACCESS in left.body
        cleared = left.cookies()[SESSION_COOKIE]
        assert cleared.split(";", 1)[0] in (f"{SESSION_COOKIE}=", f'{SESSION_COOKIE}=""')
        attributes = {part.strip().lower() for part in cleared.split(";")[1:]}
        assert {"max-age=0", "path=/", "secure", "httponly", "samesite=strict"} <= attributes
        assert "form-action 'none'" in (left.header("Content-Security-Policy") or "")
        # The open live stream of that session says so and ends (its page reloads: 401).
        rest = b""
        while (line := stream.fp.readline()) not in (b"", b"0\r\n"):  # (raw: chunked)
            rest += line
        assert b"event: unauthorized" in rest and line == b"0\r\n", rest  # its last chunk
    finally:
        conn.close()

    # The same cookie (or a copy of it) is refused from now on.
    for path in ("/", "/events", "/metrics"):
        reply = fetch(lone, path, cookie=session)
        assert reply.status == 401 and 'data-reason="signed_out"' in reply.body, path
    assert fetch(lone, "/api/v1/schema", cookie=session).status == 401
    assert grants(lone)["Abmelden"]["state"] == "signed_out"
    audit = [(r["actor"], r["kind"], r["subject"]) for r in audit_rows(lone)]
    assert audit.count((f"viewer:{grant_id}", "viewer_grant.signed_out", grant_id)) == 1

    def signed_out() -> list[dict[str, Any]]:
        return [e for e in lone.leader.log_events() if e.get("event") == "viewer.signed_out"]

    wait_until(lambda: len(signed_out()) == 1, 10, "viewer.signed_out logged")
    assert signed_out()[0]["name"] == "Abmelden" and signed_out()[0]["grant_id"] == grant_id
    assert lone.find_secrets(lone.logs_text(), extra=[session]) == []

    # Again (another tab's button): the same page, nothing more to end, nothing written.
    after = audit_rows(lone)
    again = fetch(lone, "/logout?lang=en", method="POST", cookie=session, headers={"Origin": own})
    assert again.status == 200 and "Signed out" in again.body
    assert "max-age=0" in again.cookies()[SESSION_COOKIE].lower()
    assert audit_rows(lone) == after and len(signed_out()) == 1

    # `viewer revoke` of it (session 68, viewer2's L): it had ended by its sign-out; said so,
    # nothing written, the exit of a revoke of a grant already revoked (0).
    revoked = lone.cli("viewer", "revoke", grant_id)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == (
        f"viewer grant {grant_id} had already ended: its browser signed out; nothing to revoke"
    ), revoked.stdout
    assert audit_rows(lone) == after
    assert grants(lone)["Abmelden"]["state"] == "signed_out"
    revokes = [e for e in lone.leader.log_events() if e.get("event") == "viewer_grant.revoked"]
    assert not [e for e in revokes if e.get("grant_id") == grant_id], revokes  # no log line


def test_metrics_take_the_scrape_token_or_a_session(lone: Cluster) -> None:
    token = {"Authorization": "Bearer scrape-token-0123456789abcdef"}
    scraped = fetch(lone, "/metrics", headers=token)
    assert scraped.status == 200, scraped
    assert (scraped.header("Content-Type") or "").startswith("text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(scraped.body)}
    assert "tlsroll_rollouts" in names
    wrong = fetch(lone, "/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert wrong.status == 401 and wrong.header("WWW-Authenticate") == 'Bearer realm="tlsroll"'
    assert fetch(lone, "/metrics").status == 401
    assert fetch(lone, "/", headers=token).status == 401  # the token opens /metrics only
    assert fetch(lone, "/metrics", cookie=session_for(lone, "prom")).status == 200


def test_the_page_goes_by_the_leaders_warning_days_and_its_renewed_certificate(
    tmp_path: Path,
) -> None:
    """The viewer's "near expiry" went by a fixed 30 days and kept the leader's certificate it
    was started with: once the leader had issued its own again, the page (and /metrics) showed
    the old one, ever nearer its end, until a restart. It goes by ``expiry_warning_days`` now
    (the page says how long ahead the leader warns), and shows the leader's new certificate,
    as the expiry watch does."""
    from leader.layout import read_passphrase
    from tlsroll import spiffe
    from tlsroll.fsutil import write_atomic

    cluster = Cluster(tmp_path / "c", next_loopback())
    try:
        cluster.init()
        cluster.write_leader_config({"expiry_warning_days": 45, "expiry_check_interval": 1})
        cluster.start_leader()
        session = session_for(cluster, "near")
        page = fetch(cluster, "/?lang=en", cookie=session)
        assert page.status == 200 and "the leader warns 45 days ahead" in page.body, page.body

        def leader_fingerprints() -> set[str]:
            scraped = fetch(cluster, "/metrics", cookie=session)
            assert scraped.status == 200, scraped
            return {
                s.labels["fingerprint"]
                for f in text_string_to_metric_families(scraped.body)
                if f.name == "tlsroll_certificate_expiry_timestamp_seconds"
                for s in f.samples
                if s.labels["kind"] == "leader"
            }

        before = pki.read_cert(cluster.tls_cert_path)
        assert leader_fingerprints() == {pki.fingerprint(before)}
        ca = pki.CertificateAuthority.load(
            cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
        )
        td = ca.trust_domain
        due = ca.issue(
            pki.read_key(cluster.tls_key_path).public_key(),
            pki.names_of(before),
            client=True,
            identity=spiffe.leader(td),
            internal_dns=[spiffe.leader_host(td)],
            lifetime=dt.timedelta(days=10),  # due: the running leader issues it again
        )
        write_atomic(cluster.tls_cert_path, pki.cert_to_pem(due) + ca.cert_pem)
        wait_until(
            lambda: pki.read_cert(cluster.tls_cert_path) not in (before, due),
            40,
            "the leader issues its certificate again",
        )
        renewed = pki.fingerprint(pki.read_cert(cluster.tls_cert_path))
        wait_until(
            lambda: leader_fingerprints() == {renewed}, 10, "the viewer shows the new certificate"
        )
        page = fetch(cluster, "/?lang=en", cookie=session)
        assert 'data-kind="leader"' not in page.body  # 397 days left: not near
    finally:
        cluster.close()


def test_an_overlong_header_line_logs_its_type_and_no_session_or_token(lone: Cluster) -> None:
    """aiohttp refuses a header line over 8190 bytes with a 400 and logged the line's first
    100 bytes: the session id of a Cookie line, "Bearer <scrape token>" (audit s34 H2). A
    large cookie of another web app on the leader's address is enough (cookies ignore the
    port)."""
    session = session_for(lone, "long-cookie")
    pad = "a" * 9000
    cookie_line = {"Cookie": f"{SESSION_COOKIE}={session}; pad={pad}"}
    assert fetch(lone, "/", headers=cookie_line).status == 400
    token_line = {"Authorization": f"Bearer scrape-token-0123456789abcdef{pad}"}
    assert fetch(lone, "/metrics", headers=token_line).status == 400

    def refused() -> list[dict[str, Any]]:
        return [e for e in lone.leader.log_events() if e.get("event") == "viewer.bad_request"]

    # One line: both came from this host, whose later bad requests go into a summary a minute
    # (sampled per source: tests/test_sampled_logs.py).
    wait_until(lambda: len(refused()) >= 1, timeout=10, what="a viewer.bad_request line")
    assert {e["error_type"] for e in refused()} == {"LineTooLong"}
    text = lone.logs_text()
    assert session not in text and "scrape-token-0123456789abcdef" not in text
    assert "Error handling request" not in text and pad[:100] not in text
    assert fetch(lone, "/metrics", cookie=session).status == 200  # the listener serves on


def test_admin_calls_for_grants_answer_with_their_status(lone: Cluster) -> None:
    with lone.admin() as admin:
        made = admin.CreateViewerGrant(admin_pb2.CreateViewerGrantRequest(name="rpc"), timeout=10)
        lives = made.info.expires_at.ToDatetime() - made.info.created_at.ToDatetime()
        assert lives == dt.timedelta(hours=8)  # the default
        assert made.login_url.startswith(f"https://{lone.address}:9444/login/")
        with pytest.raises(grpc.RpcError) as too_long:
            admin.CreateViewerGrant(
                admin_pb2.CreateViewerGrantRequest(ttl_seconds=8 * 86400), timeout=10
            )
        assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as missing:
            admin.RevokeViewerGrant(admin_pb2.RevokeViewerGrantRequest(id="nosuch"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    result = lone.cli("viewer", "grant", "--ttl", "8d")  # a bad value: a usage error
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "at most 7 days" in result.stderr


@contextlib.contextmanager
def created_in(directory: Path) -> Iterator[list[str]]:
    """The names created in ``directory`` while the block runs (inotify's IN_CREATE, read at
    its end: one created and removed again is there too)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    names: list[str] = []
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(directory), 0x100) >= 0  # IN_CREATE
        yield names
        with contextlib.suppress(BlockingIOError):
            data = os.read(fd, 1 << 16)
            at = 0
            while at < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, at)
                names.append(os.fsdecode(data[at + 16 : at + 16 + length].rstrip(b"\0")))
                at += 16 + length
    finally:
        os.close(fd)


def test_a_taken_viewer_port_stops_the_leader_with_one_line(tmp_path: Path) -> None:
    """Session 75 (flakesweep L6): the admin socket is the last listener a start opens (the
    relay after the viewer), so that one that answers says every listener is up: a leader whose
    viewer cannot listen never creates it (before: made, then removed as the leader stopped)."""
    with Cluster(tmp_path / "taken", next_loopback()) as cluster, socket.socket() as squatter:
        cluster.init()
        squatter.bind((cluster.address, VIEWER_PORT))
        squatter.listen()
        with created_in(cluster.admin_socket.parent) as created:
            code, output = cluster.leader.run_to_exit()
        assert code == 1, output
        line = one_line_error(output, "tlsroll-leader", allow_grpc_core=True)
        assert f"cannot listen on {cluster.address}:9444 (the viewer)" in line, line
        assert "viewer_port" in line
        assert cluster.admin_socket.name not in created, created
        assert not cluster.admin_socket.exists()


class Listener:
    """A listener of ``start_listeners``'s, in memory: what was done to it, in ``done``."""

    def __init__(self, name: str, done: list[str], fails: bool = False) -> None:
        self.name, self.done, self.fails = name, done, fails

    async def start(self, *_args: object) -> None:
        self.done.append(f"start {self.name}")
        if self.fails:
            raise TerminalError(f"{self.name} cannot listen")

    async def stop(self, *_args: object) -> None:
        self.done.append(f"stop {self.name}")


@pytest.mark.parametrize("fails", [None, "viewer", "relay"])
async def test_the_admin_socket_is_the_last_listener_a_start_opens(fails: str | None) -> None:
    """Session 75 (flakesweep L6): the gRPC servers, the viewer, then the admin socket's relay;
    a start that fails stops every listener (the relay too: a socket file it bound)."""
    done: list[str] = []
    servers = [Listener(n, done) for n in ("join", "control", "admin")]
    viewer, relay = (Listener(n, done, fails == n) for n in ("viewer", "relay"))
    started = ["start join", "start control", "start admin", "start viewer", "start relay"]
    if fails is None:
        await start_listeners(servers, viewer, relay)  # type: ignore[arg-type]
        assert done == started
        return
    with pytest.raises(TerminalError, match=f"{fails} cannot listen"):
        await start_listeners(servers, viewer, relay)  # type: ignore[arg-type]
    stopped = ["stop viewer", "stop join", "stop control", "stop admin", "stop relay"]
    assert done == started[: started.index(f"start {fails}") + 1] + stopped


def test_viewer_port_zero_turns_the_viewer_off(tmp_path: Path) -> None:
    with Cluster(tmp_path / "off", next_loopback()) as cluster:
        cluster.init()
        assert cluster.leader_config()["viewer_port"] == 9444  # init writes the default
        cluster.write_leader_config({"viewer_port": 0})
        cluster.start_leader()
        assert not (cluster.data_dir / "tls" / "viewer.key").exists()
        result = cluster.cli("viewer", "grant")
        assert result.returncode == 1 and "viewer is off" in result.stderr, result.stderr
        with pytest.raises(OSError):
            fetch(cluster, "/")


def test_tls_is_the_cluster_ca_and_the_leader_address(lone: Cluster) -> None:
    """A client that trusts only the cluster CA and checks the name accepts the viewer;
    one that trusts nothing refuses it."""
    assert fetch(lone, "/static/viewer.css").status == 200
    strict = ssl.create_default_context()  # the system's roots: not our CA
    conn = http.client.HTTPSConnection(lone.address, VIEWER_PORT, timeout=10, context=strict)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/")
    conn.close()
    key = lone.data_dir / "tls" / "viewer.key"
    assert key.stat().st_mode & 0o777 == 0o600


# --- a cluster with nodes: real rollouts, watched in a browser ------------------------------------


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Three nodes; z9's server demands client certificates, so its switch fails on https
    (the agent's own check has none) and is rolled back."""
    made = Setups(tmp_path_factory.mktemp("farm"))
    try:
        with pytest.MonkeyPatch.context() as patch:
            # the agents' tokens over the admin socket, not by three CLI runs (the tests here
            # are about the viewer)
            patch.setattr(test_rollout, "Cluster", AdminTokenCluster)
            setup = made(
                "a1",
                "a2",
                "z9",
                # each switch of a1 and a2 lasts a second or more, so the page (at most two
                # updates a second) sees them under way where a restart takes 160 ms (ci49d)
                agent_env={name: {START_DELAY_ENV: "1"} for name in ("a1", "a2")},
                server={"z9": {"require_client_cert": True, "client_ca_file": "ca.pem"}},
            )
        yield setup
    finally:
        made.close()


def spki_hash(cluster: Cluster) -> str:
    """Base64 SHA-256 of the viewer certificate's key, as Chromium's SPKI list takes it."""
    cert = pki.load_certs_pem((cluster.data_dir / "tls" / "viewer.pem").read_bytes())[0]
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make` installs Debian's chromium package")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright, farm: Setup) -> Iterator[Browser]:
    """Chromium from Debian, headless, with a fresh profile (Playwright makes a temporary
    user-data-dir for each launch), trusting the viewer's key."""
    args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_hash(farm.cluster)}"]
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh cookie jar per test."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(BROWSER_TIMEOUT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


def base(cluster: Cluster) -> str:
    return f"https://{cluster.address}:{VIEWER_PORT}"


def browser_login(
    context: BrowserContext, cluster: Cluster, name: str, ttl_seconds: int = 0
) -> Page:
    """Open a fresh login link in the browser and sign in; it lands on the schema."""
    page = context.new_page()
    page.goto(link_for(cluster, name, ttl_seconds))
    page.get_by_role("link", name="Anmelden").click()
    page.wait_for_url(base(cluster) + "/")
    page.wait_for_selector("#live.on")  # the live stream is connected
    return page


WIDER_THAN_THE_SCREEN = """() => Array.from(document.querySelectorAll("body *"))
  .filter((e) => e.getBoundingClientRect().right > window.innerWidth
    && !(e.parentElement && e.parentElement.closest(".scroll")))
  .slice(0, 10)
  .map((e) => e.tagName + (e.id ? "#" + e.id : "") + "." + e.className + " "
    + Math.round(e.getBoundingClientRect().right) + "px")
  .concat([document.styleSheets.length + " stylesheets"])"""


RECORD_STATES = """() => {
  window.__marker = "no reload";
  window.__seen = [];
  const record = () => {
    const rollout = document.querySelector("#rollout");
    const nodes = Array.from(document.querySelectorAll("#nodes tr[data-node]"))
      .map((tr) => tr.dataset.node + "=" + tr.dataset.state);
    const entry = (rollout ? rollout.dataset.state : "") + "|" + nodes.join(",");
    if (window.__seen[window.__seen.length - 1] !== entry) { window.__seen.push(entry); }
  };
  new MutationObserver(record).observe(
    document.getElementById("content"), {childList: true, subtree: true});
  record();
}"""


def sequences(seen: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The rollout's states and each node's, in the order the page showed them (no repeats)."""
    rollout: list[str] = []
    nodes: dict[str, list[str]] = {}
    for entry in seen:
        state, _, rows = entry.partition("|")
        if state and (not rollout or rollout[-1] != state):
            rollout.append(state)
        for row in filter(None, rows.split(",")):
            name, _, node_state = row.partition("=")
            states = nodes.setdefault(name, [])
            if not states or states[-1] != node_state:
                states.append(node_state)
    return rollout, nodes


def artefact(page: Page, path: Path, capsys: pytest.CaptureFixture[str], what: str) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\n{what}: {path}")


def test_browser_watches_a_real_rollout_live_without_reload(
    farm: Setup, context: BrowserContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = browser_login(context, farm.cluster, "Praxis-IT")
    assert page.locator("html").get_attribute("lang") == "de"
    before = newest(farm.cluster)
    page.evaluate(RECORD_STATES)

    result = farm.cli(*start_cmd(farm), "--nodes", "a1,a2", "--yes")
    assert result.returncode == 0, result.stderr
    rid = newest(farm.cluster)
    assert rid is not None and rid != before
    page.wait_for_selector(f'#rollout[data-rollout="{rid.id}"][data-state="completed"]')
    assert wait_ended(farm.cluster).state == "completed"

    assert page.evaluate("window.__marker") == "no reload"
    rollout_states, node_states = sequences(page.evaluate("window.__seen"))
    assert rollout_states[0] == "running" and rollout_states[-1] == "completed", rollout_states
    for name in ("a1", "a2"):
        states = node_states[name]
        assert states[-1] == "done", (name, states)
        assert [NODE_ORDER.index(s) for s in states] == sorted(NODE_ORDER.index(s) for s in states)
    # seen before its switch began (prepared at once, beside a1, with prepare_ahead 1, and
    # staged throughout a1's switch: the page is woken by each write, at most 0.1 s apart)
    assert node_states["a2"][0] in ("pending", "preflight", "staging", "staged"), node_states
    assert WORKING & {s for states in node_states.values() for s in states}, node_states

    row = page.locator('#nodes tr[data-node="a1"]')
    urls = row.locator("td.url").all_inner_texts()
    address = farm["a1"].address
    assert urls == [f"http://{address}:8080/praxis_live/", f"https://{address}:8443/praxis_live/"]
    assert "fertig" in row.inner_text()
    assert page.locator("#live").inner_text() == "Live"
    artefact(page, tmp_path / "rollout-live.png", capsys, "screenshot of the rollout page")


def test_browser_shows_why_a_node_failed_and_prints_the_record(
    farm: Setup, context: BrowserContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nodes of the farm may already run a password (earlier tests): then z9 gets that one and
    # no new one may be given (issue 16).
    plan = json.loads(farm.cli("plan", "--nodes", "z9", "--json").stdout)
    command = start_cmd(farm) if not plan.get("password_version_in_use") else ["rollout", "start"]
    result = farm.cli(*command, "--nodes", "z9", "--yes")
    assert result.returncode == 0, result.stderr
    snap = wait_rollout(farm.cluster, "z9 started", lambda s: "z9" in s.nodes)
    page = browser_login(context, farm.cluster, "Support")
    row = page.locator('#nodes tr[data-node="z9"][data-state="rolled_back"]')
    row.wait_for()  # live, if the switch was still under way when the page opened
    assert wait_ended(farm.cluster).state == "halted"
    reason = row.locator("td.reason").inner_text()
    assert reason.startswith("verify: ") and "8443" in reason, reason
    assert "zurückgerollt" in row.inner_text()
    page.wait_for_selector(f'#rollout[data-rollout="{snap.id}"][data-state="halted"]')
    assert page.locator("#rollout .badge").first.inner_text() == "nach Fehler gestoppt"

    timeline = page.locator("#tl-node-z9")
    timeline.locator("summary").click()
    items = timeline.locator("li").all_inner_texts()
    assert any("zurückgerollt" in item for item in items), items
    assert any("verify: " in item for item in items), items
    artefact(page, tmp_path / "rollout-failed.png", capsys, "screenshot of a failed node")

    page.emulate_media(media="print")
    assert page.locator("#live").is_hidden()
    assert page.locator("header nav").is_hidden()
    assert page.locator(".print-only").is_visible()
    pdf = tmp_path / "rollout-record.pdf"
    page.pdf(path=str(pdf), prefer_css_page_size=True)
    assert pdf.read_bytes().startswith(b"%PDF")
    with capsys.disabled():
        print(f"\nprint view of the rollout page: {pdf}")


def test_browser_signs_in_from_a_link_in_a_mail_after_a_preview_spent_nothing(
    farm: Setup, context: BrowserContext
) -> None:
    """The link as it comes: clicked in another site (a web mail), after a preview fetched it.
    The click on the sign-in page is a same-site navigation, so the SameSite=Strict cookie set
    by the sign-in URL goes along its redirect to /."""
    link = grant(farm.cluster, "--name", "Kollegin")
    assert fetch(farm.cluster, path_of(link)).status == 200  # the mail program's preview
    assert grants(farm.cluster)["Kollegin"]["state"] == "unused"
    mail = "https://mail.example/inbox"
    context.route(
        mail,
        lambda route: route.fulfill(
            content_type="text/html", body=f'<p>Ihr Zugang: <a href="{link}">Schema</a></p>'
        ),
    )
    page = context.new_page()
    page.goto(mail)
    page.get_by_role("link", name="Schema").click()
    page.wait_for_url(link)
    assert page.locator("html").get_attribute("lang") == "de"
    assert page.locator("form, button, input").count() == 0
    assert context.cookies() == [] and grants(farm.cluster)["Kollegin"]["state"] == "unused"

    page.get_by_role("link", name="Anmelden").click()
    page.wait_for_url(base(farm.cluster) + "/")  # a redirect, no self-refreshing page
    page.wait_for_selector("#live.on")
    assert "Kollegin" in page.locator("header").inner_text()
    assert page.locator("h1").inner_text() == "Update-Schema"
    [cookie] = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert grants(farm.cluster)["Kollegin"]["state"] == "active"

    # The link again in this browser (a bookmark, the mail's link clicked again): signed in by
    # it, the browser goes to the schema (review s63 L3: the page said "already used").
    again = context.new_page()
    for opened in (link, link + "/open"):
        again.goto(opened)
        again.wait_for_url(base(farm.cluster) + "/")
        assert again.locator("#denied").count() == 0
    again.wait_for_selector("#live.on")
    # In any other browser the sign-in URL works once.
    elsewhere = context.browser.new_context()  # type: ignore[union-attr]
    try:
        other = elsewhere.new_page()
        other.goto(link + "/open")
        assert other.locator('#denied .why[data-reason="used"]').count() == 1
        other.goto(link + "?lang=en")
        assert other.locator('#denied .why[data-reason="used"]').count() == 1
    finally:
        elsewhere.close()


@contextlib.contextmanager
def another_site(html: str) -> Iterator[str]:
    """A page on another origin (a loopback address of its own, plain http) that shows
    ``html``: its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((next_loopback(), 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_browser_refuses_the_sign_in_url_linked_from_another_site_and_spends_nothing(
    farm: Setup, context: BrowserContext
) -> None:
    """Review s67 viewer L1 (login CSRF): a page on any site could link to the sign-in URL of
    its own unused link; the click spent it and replaced the visitor's session cookie (a
    top-level navigation sets a Strict cookie too): the visitor was in the other's session.
    Now the viewer refuses it by what Chromium says (``Sec-Fetch-Site: cross-site``): 403,
    the link unused, the visitor's session as it was. The admin's way, the link pasted
    (``none``) and the sign-in page's link (``same-origin``), signs in, as does the sign-in
    URL pasted."""
    cluster = farm.cluster
    opened: list[Request] = []
    context.on("request", lambda r: opened.append(r) if r.url.endswith("/open") else None)
    page = browser_login(context, cluster, "Opfer")  # the link pasted, then its page's link
    [mine] = [c["value"] for c in context.cookies() if c["name"] == SESSION_COOKIE]
    theirs = link_for(cluster, "Angreifer")
    with another_site(f'<a href="{theirs}/open">Urlaubsfotos</a>') as url:
        page.goto(url)
        with page.expect_response(theirs + "/open") as answer:
            page.get_by_role("link", name="Urlaubsfotos").click()
        status = answer.value.status  # (the response's repr would show the link)
        assert status == 403, status
    page.wait_for_selector('#denied .why[data-reason="cross_site"]')
    hrefs = page.locator("a[href]").evaluate_all("(as) => as.map((a) => a.href)")
    assert not [h for h in hrefs if h.startswith(theirs)], hrefs  # nothing leads back to it
    assert grants(cluster)["Angreifer"]["state"] == "unused"
    assert [c["value"] for c in context.cookies() if c["name"] == SESSION_COOKIE] == [mine]
    page.goto(base(cluster) + "/")
    assert "Opfer" in page.locator("header").inner_text()

    # The sign-in URL pasted: signs in.
    pasted = link_for(cluster, "Selbst")
    page.goto(pasted + "/open")
    page.wait_for_url(base(cluster) + "/")
    assert "Selbst" in page.locator("header").inner_text()
    assert grants(cluster)["Selbst"]["state"] == "active"
    sites = [r.all_headers().get("sec-fetch-site") for r in opened]
    assert sites == ["same-origin", "cross-site", "none"], sites


def test_browser_finds_nothing_that_posts_but_the_sign_out_and_loads_nothing_from_elsewhere(
    farm: Setup, context: BrowserContext
) -> None:
    requested: list[str] = []
    context.on("request", lambda request: requested.append(request.url))
    page = browser_login(context, farm.cluster, "Prüfer")
    origin = base(farm.cluster)
    [action] = page.locator("form").evaluate_all("(fs) => fs.map((f) => f.action)")
    assert action == origin + "/logout?lang=de"
    assert page.locator("button").count() == 1 and page.locator("form button").count() == 1
    assert page.locator("input, select, textarea").count() == 0
    for href in page.locator("a[href]").evaluate_all("(as) => as.map((a) => a.href)"):
        assert href.startswith(origin + "/"), href
    assert requested and all(url.startswith(origin + "/") for url in requested), requested
    statuses = page.evaluate(
        """async () => {
          const out = {};
          for (const method of ["POST", "PUT", "DELETE", "PATCH"]) {
            out[method] = (await fetch("/", {method})).status;
          }
          out.GET = (await fetch("/api/v1/schema")).status;
          return out;
        }"""
    )
    assert statuses == {"POST": 405, "PUT": 405, "DELETE": 405, "PATCH": 405, "GET": 200}


def test_browser_signs_out_with_the_button_and_its_other_tab_is_shown_the_door(
    farm: Setup, context: BrowserContext
) -> None:
    """Review s67 viewer L2: no sign-out; a session outlived the browser's closing."""
    page = browser_login(context, farm.cluster, "Praxis-PC")
    other = context.new_page()  # a second tab of the same session, live
    other.goto(base(farm.cluster) + "/?lang=en")
    other.wait_for_selector("#live.on")
    [cookie] = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
    assert fetch(farm.cluster, "/", cookie=cookie["value"]).status == 200

    posted: list[dict[str, str]] = []
    page.on(
        "request",
        lambda r: posted.append(r.all_headers()) if r.method == "POST" else None,
    )
    page.get_by_role("button", name="Abmelden").click()
    page.wait_for_selector("#signed-out")
    # Its Origin is the viewer's own (review s67 rev1 M1): under the pages' no-referrer
    # policy it was "null", and a browser without Sec-Fetch-Site (Safari before 16.4, Firefox
    # before 90) was answered 403 and stayed signed in; the schema pages' policy is
    # same-origin now, so ``_same_origin`` takes such a browser by its Origin.
    assert [h.get("origin") for h in posted] == [base(farm.cluster)], posted
    assert page.locator("h1").inner_text() == "Abgemeldet"
    assert HOW_TO_GET_ACCESS in page.locator("#signed-out").inner_text()
    assert [c for c in context.cookies() if c["name"] == SESSION_COOKIE] == []
    assert grants(farm.cluster)["Praxis-PC"]["state"] == "signed_out"
    # The other tab's live stream ended: it reloads, and is not signed in any more.
    other.wait_for_selector("#denied")
    assert other.locator("#denied .why").get_attribute("data-reason") == "none"
    # A copy of the cookie is worth nothing now.
    copied = fetch(farm.cluster, "/", cookie=cookie["value"])
    assert copied.status == 401 and 'data-reason="signed_out"' in copied.body
    page.goto(base(farm.cluster) + "/")
    assert page.locator('#denied .why[data-reason="none"]').count() == 1


def test_browser_renders_german_and_english_also_on_a_phone(
    farm: Setup, context: BrowserContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = browser_login(context, farm.cluster, "Sprachen")
    assert page.locator("html").get_attribute("lang") == "de"
    assert page.locator("h1").inner_text() == "Update-Schema"
    assert page.locator("#offline h2").inner_text() == "Knoten offline"
    page.get_by_role("link", name="English").click()
    page.wait_for_selector('html[lang="en"]')
    assert page.locator("h1").inner_text() == "Update schema"
    assert page.locator("#offline h2").inner_text() == "Nodes offline"
    assert page.locator("#certificates h2").inner_text() == "Certificates near expiry"
    page.goto(base(farm.cluster) + "/")  # the choice is kept in a cookie
    assert page.locator("html").get_attribute("lang") == "en"
    page.wait_for_selector("#live.on")
    page.get_by_role("link", name="Deutsch").click()
    page.wait_for_selector('html[lang="de"]')
    # The new page is styled only once its stylesheet has loaded: before that its tables are as
    # wide as their content (a CI run measured 1162 px there). The deferred script runs only
    # after the stylesheet, and marks the page live.
    page.wait_for_load_state("load")
    page.wait_for_selector("#live.on")

    # A phone: the page fits the screen; wide tables scroll inside their own region.
    page.set_viewport_size({"width": 390, "height": 844})
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, page.evaluate(WIDER_THAN_THE_SCREEN)
    assert page.locator("h1").is_visible() and page.locator("#rollout h2").is_visible()
    artefact(page, tmp_path / "phone.png", capsys, "screenshot on a phone")


def test_browser_is_shown_the_door_when_revoked_or_expired(
    farm: Setup, context: BrowserContext
) -> None:
    page = browser_login(context, farm.cluster, "Widerruf")
    grant_id = grants(farm.cluster)["Widerruf"]["id"]
    assert farm.cli("viewer", "revoke", grant_id).returncode == 0
    page.wait_for_selector('#denied .why[data-reason="session"]')  # the open page, live
    assert HOW_TO_GET_ACCESS in page.locator("#denied").inner_text()

    # Expiry: the open page notices by itself (the browser has dropped the cookie by then, or
    # the leader refuses it: either way the page says how to get access).
    context.clear_cookies()
    page = browser_login(context, farm.cluster, "Kurz", 3)
    page.wait_for_selector("#denied", timeout=15_000)
    assert page.locator("#denied .why").get_attribute("data-reason") in ("none", "session")
    assert "Praxis-IT" in page.locator("#denied").inner_text()


# --- what programs read --------------------------------------------------------------------------


def test_api_schema_is_what_schema_show_json_prints(farm: Setup) -> None:
    # Every node's client report is in the store first (reports come with heartbeats and are
    # committed once a second): one arriving between the two reads below is no difference.
    def reported() -> bool:  # looked at from this process: the command's output is below
        nodes = {v["node"] for v in farm.cluster.schema_json()["node_clients"]}
        return nodes >= set(farm.nodes)

    wait_until(reported, 30, "every node's client report", interval=LEADER_POLL)
    session = session_for(farm.cluster, "api")
    served = fetch(farm.cluster, "/api/v1/schema", cookie=session)
    assert (
        served.status == 200
        and served.header(
            "Content-Type",
        )
        is not None
    )
    shown = farm.cli("schema", "show", "--all", "--json")  # the API serves every rollout
    assert shown.returncode == 0, shown.stderr
    api, cli = json.loads(served.body), json.loads(shown.stdout)
    api.pop("generated_at"), cli.pop("generated_at")
    for data in (api, cli):  # when each agent last reported its clients: every heartbeat
        for view in data["node_clients"]:
            assert view.pop("reported_at")
    assert api == cli


def test_metrics_parse_and_agree_with_the_schema(farm: Setup) -> None:
    session = session_for(farm.cluster, "metrics")
    scraped = fetch(farm.cluster, "/metrics", cookie=session)
    assert scraped.status == 200, scraped
    families = {f.name: f for f in text_string_to_metric_families(scraped.body)}
    schema = json.loads(fetch(farm.cluster, "/api/v1/schema", cookie=session).body)

    def samples(family: str, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
        return {
            tuple(sorted(s.labels.items())): s.value
            for s in families[family].samples
            if s.name == family + suffix
        }

    by_state = {labels[0][1]: v for labels, v in samples("tlsroll_rollouts").items()}
    for state in ("completed", "halted", "running"):
        assert by_state[state] == sum(r["state"] == state for r in schema["rollouts"])

    online = {dict(k)["node"]: v for k, v in samples("tlsroll_node_online").items()}
    assert online == {"a1": 1.0, "a2": 1.0, "z9": 1.0}
    ages = samples("tlsroll_node_heartbeat_age_seconds")
    assert len(ages) == 3 and all(0 <= age < 10 for age in ages.values())

    windows = [n for r in schema["rollouts"] for n in r["nodes"] if n.get("freeze_ended_at")]
    assert families["tlsroll_freeze_window_seconds"].type == "histogram"
    [count] = samples("tlsroll_freeze_window_seconds", "_count").values()
    assert count == len(windows)
    restarts = [n for r in schema["rollouts"] for n in r["nodes"] if n["restart_seconds"] > 0]
    [count] = samples("tlsroll_restart_seconds", "_count").values()
    assert count == len(restarts)

    expiry = samples("tlsroll_certificate_expiry_timestamp_seconds")
    kinds = {dict(k)["kind"] for k in expiry}
    assert {"ca", "leader", "viewer", "agent"} <= kinds
    ca = pki.read_cert(farm.cluster.ca_cert_path)
    [ca_expiry] = [v for k, v in expiry.items() if dict(k)["kind"] == "ca"]
    assert ca_expiry == ca.not_valid_after_utc.timestamp()
    if schema["rollouts"]:
        newest_rollout = schema["rollouts"][0]
        states = samples("tlsroll_rollout_node_state")
        for n in newest_rollout["nodes"]:
            current = [
                dict(k)["state"]
                for k, v in states.items()
                if dict(k)["node"] == n["name"] and v == 1
            ]
            assert current == [n["state"]]
