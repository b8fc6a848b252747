"""The web viewer's parts without a daemon: grants on a real SQLite file with a fixed clock,
its certificate, the snapshot (timeline, live server certificates), the words in both
languages, the server-sent event framing and /metrics (parsed by prometheus-client)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import functools
import hashlib
import http.client
import json
import queue
import re
import sqlite3
import threading
import time
import types
from collections.abc import Callable, Sequence
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import StreamReader
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from leader import admin_service, planner, schema_store
from leader.layout import LEADER_RENEW_BEFORE, Layout
from leader.rollout_core import (
    Change,
    Client,
    NodeEvent,
    NodeState,
    RolloutEvent,
    RolloutState,
    Scope,
    left_cut_off,
    left_out_reason,
)
from leader.schema_store import (
    BootstrapFailureRow,
    RolloutMeta,
    RolloutRow,
    SchemaStore,
    _http_clients,
)
from leader.schema_view import SchemaViewService, schema_message
from leader.states import GrantState, LoginFailuresRow
from leader.store import IssuedCert, NodeCert, NotFound, Store
from leader.viewer import app as viewer_app
from leader.viewer import certificate, metrics, pages, snapshot
from leader.viewer.app import SESSION_COOKIE, ViewerApp, sse
from leader.viewer.grants import Grants, LoginRefused
from leader.viewer.i18n import CHANGES, LANGS, STATES, TEXTS, Words, pick_lang
from leader.viewer.snapshot import CertStatus, Reader, Snapshot
from leader.wire import CHANGE, NODE_STATE
from tests import leader_rig
from tests.conftest import none_fresh
from tests.test_store_enrol import statements
from tests.test_superseded_index import audit_plans
from tlsroll import pki, wire
from tlsroll.v1 import admin_pb2, schema_pb2

NOW = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "leader.sqlite3")


def viewer_of(reader: Reader, grants: Grants, *, closing: asyncio.Event | None = None) -> ViewerApp:
    """The viewer app as the tests here run it: the fixed clock (NOW), on loopback, /metrics
    without a scrape token; `closing` given where the test ends the streams itself."""
    return ViewerApp(
        reader=reader,
        grants=grants,
        clock=lambda: NOW,
        address="127.0.0.1",
        scrape_token=None,
        closing=asyncio.Event() if closing is None else closing,
    )


# --- grants --------------------------------------------------------------------------------------


def test_a_grant_opens_once_and_its_session_ends_with_it(store: Store, tmp_path: Path) -> None:
    grants = Grants(store.db)
    made = grants.create(" Dr. Huber ", ttl=HOUR, now=NOW, actor="admin:root")
    assert made.grant.name == "Dr. Huber" and made.grant.state(NOW) is GrantState.UNUSED
    assert made.secret not in repr(made)

    # A look (the page a preview fetches) spends nothing and writes nothing.
    for _ in range(2):
        assert grants.check(made.secret, NOW) == made.grant
    assert grants.get(made.grant.id) == made.grant
    grant, session = grants.login(made.secret, NOW + dt.timedelta(minutes=1))
    assert grant.id == made.grant.id and grant.state(NOW) is GrantState.ACTIVE
    assert grants.session(session, NOW + dt.timedelta(minutes=2)) == grant
    for spend in (grants.check, grants.login):  # the look refuses as the login does
        with pytest.raises(LoginRefused) as used:
            spend(made.secret, NOW + dt.timedelta(minutes=3))
        assert used.value.reason == "used"
        with pytest.raises(LoginRefused) as unknown:
            spend("not-a-secret-of-ours-at-all", NOW)
        assert unknown.value.reason == "unknown"

    assert grants.session(session, NOW + HOUR) is None  # expired with its grant
    assert grants.session("", NOW) is None and grants.session("x" * 43, NOW) is None

    other = grants.create("", ttl=HOUR, now=NOW, actor="admin:root")
    _, other_session = grants.login(other.secret, NOW)
    revoked = grants.revoke(other.grant.id, now=NOW, actor="admin:root")
    assert revoked.state(NOW) is GrantState.REVOKED
    assert grants.session(other_session, NOW) is None
    late = grants.create("late", ttl=HOUR, now=NOW, actor="admin:root")
    for spend in (grants.check, grants.login):
        with pytest.raises(LoginRefused) as expired:
            spend(late.secret, NOW + HOUR)
        assert expired.value.reason == "expired"
    with pytest.raises(LoginRefused) as revoked_link:
        grants.check(other.secret, NOW)
    assert revoked_link.value.reason == "revoked"
    with pytest.raises(NotFound):
        grants.revoke("nosuch", now=NOW, actor="admin:root")

    # Only hashes are stored; every change is in the audit trail, without a secret.
    db = sqlite3.connect(f"{(tmp_path / 'leader.sqlite3').as_uri()}?mode=ro", uri=True)
    try:
        text = json.dumps([list(r) for r in db.execute("SELECT * FROM viewer_grants")])
        audit = [tuple(r) for r in db.execute("SELECT actor, kind, subject FROM audit")]
    finally:
        db.close()
    for secret in (made.secret, session, other.secret, other_session, late.secret):
        assert secret not in text
    assert hashlib.sha256(made.secret.encode()).hexdigest() in text
    assert ("admin:root", "viewer_grant.created", made.grant.id) in audit
    assert (f"viewer:{made.grant.id}", "viewer_grant.used", made.grant.id) in audit
    assert ("admin:root", "viewer_grant.revoked", other.grant.id) in audit
    assert [g.id for g in grants.all()] == [made.grant.id, other.grant.id, late.grant.id]


def test_a_sign_out_ends_its_grant_once_and_nothing_else(store: Store) -> None:
    """The browser's sign-out (review s67 viewer L2): its session's grant ends (signed_out), in
    the audit by the viewer; an unknown, ended or expired session writes nothing."""
    grants = Grants(store.db)
    made = grants.create("PC", ttl=HOUR, now=NOW, actor="admin:root")
    keep = grants.create("other", ttl=HOUR, now=NOW, actor="admin:root")
    _, session = grants.login(made.secret, NOW)
    _, kept = grants.login(keep.secret, NOW)
    ended = grants.sign_out(session, NOW + dt.timedelta(minutes=1))
    assert ended is not None and ended.id == made.grant.id
    assert ended.state(NOW + dt.timedelta(minutes=1)) is GrantState.SIGNED_OUT
    assert grants.session(session, NOW + dt.timedelta(minutes=1)) is None
    assert grants.session(kept, NOW + dt.timedelta(minutes=1)) is not None  # only its own
    with pytest.raises(LoginRefused):  # its link does not open a new session
        grants.login(made.secret, NOW + dt.timedelta(minutes=1))
    commits = store.db.commits
    for stale in (session, "", "x" * 43):
        assert grants.sign_out(stale, NOW + dt.timedelta(minutes=2)) is None
    assert grants.sign_out(kept, NOW + HOUR) is None  # expired: nothing to end
    assert store.db.commits == commits
    assert grants.get(keep.grant.id).revoked_at is None
    with store.db.read() as db:
        audit = [tuple(r) for r in db.execute("SELECT actor, kind, subject FROM audit")]
    signed_out = [row for row in audit if row[1] == "viewer_grant.signed_out"]
    assert signed_out == [(f"viewer:{made.grant.id}", "viewer_grant.signed_out", made.grant.id)]


def test_the_sign_in_url_linked_from_another_site_is_refused_and_spends_nothing(
    store: Store,
) -> None:
    """Review s67 viewer L1 (login CSRF): a page anywhere could link to the sign-in URL of a
    link of its own; the navigation, top-level, spent it and replaced the visitor's session
    cookie (a browser sets a Strict cookie on such a navigation too), so the visitor was in
    the other's session. Now a request whose ``Sec-Fetch-Site`` says another site
    (``cross-site``, ``same-site``) is 403: nothing spent, no cookie, one log line per
    source, and a page with no link back to the sign-in URL (its language switch would be
    one). The link typed or pasted (``none``), the sign-in page's own (``same-origin``) and a
    client without the header sign in."""
    grants = Grants(store.db)
    theirs = grants.create("Angreifer", ttl=HOUR, now=NOW, actor="admin:root")
    mine = grants.create("Opfer", ttl=HOUR, now=NOW, actor="admin:root")
    _, session = grants.login(mine.secret, NOW)
    schema = SchemaStore(store.db)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    fine = {
        site: grants.create(f"ok {site}", ttl=HOUR, now=NOW, actor="a")
        for site in ("none", "same-origin", "")
    }

    async def ask() -> tuple[list[tuple[int, str, str, str]], dict[str, tuple[int, str]]]:
        app = viewer_of(reader, grants)
        refused: list[tuple[int, str, str, str]] = []
        signed: dict[str, tuple[int, str]] = {}
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            for site in ("cross-site", "same-site", "cross-site"):
                headers = {"Cookie": f"{SESSION_COOKIE}={session}", "Sec-Fetch-Site": site}
                response = await client.get(
                    f"/login/{theirs.secret}/open", headers=headers, allow_redirects=False
                )
                cookies = ";".join(response.headers.getall("Set-Cookie", []))
                refused.append((response.status, site, cookies, await response.text()))
            for site, made in fine.items():
                headers = {"Sec-Fetch-Site": site} if site else {}
                response = await client.get(
                    f"/login/{made.secret}/open", headers=headers, allow_redirects=False
                )
                signed[site] = (response.status, response.headers.get("Set-Cookie", ""))
            app.close()
        return refused, signed

    with structlog.testing.capture_logs() as logs:
        refused, signed = asyncio.run(ask())
    for status, site, cookies, body in refused:
        assert status == 403 and cookies == "", (site, status, cookies)
        assert 'data-reason="cross_site"' in body and "Eine andere Website" in body, body
        assert "href" not in body.split('id="denied"', 1)[1], body  # nothing leads back
        assert theirs.secret not in body
    assert grants.get(theirs.grant.id).used_at is None  # not spent
    assert grants.session(session, NOW) is not None  # the visitor's session is as it was
    lines = [e for e in logs if e["event"] == "viewer.login_refused"]
    assert [e["reason"] for e in lines] == ["cross_site"], lines  # sampled per source
    assert theirs.secret not in repr(logs)
    for site, (status, cookie) in signed.items():
        assert status == 303 and cookie.startswith(f"{SESSION_COOKIE}="), (site, status)
        assert grants.get(fine[site].grant.id).used_at == NOW


def test_the_sign_out_form_s_page_lets_the_browser_send_its_origin(store: Store) -> None:
    """Review s67 rev1 M1: every page's referrer policy was ``no-referrer``, under which a
    browser sends ``Origin: null`` with a form's POST; one without ``Sec-Fetch-Site``
    (Safari before 16.4, Firefox before 90) was then refused the sign-out (403) and stayed
    signed in. The schema pages, which hold the form, are ``same-origin`` now (header and
    meta: a browser sends the viewer's origin to the viewer only, and nothing elsewhere);
    the other pages stay ``no-referrer`` (the login link's holds its secret), and such a
    browser's POST, by its Origin alone, signs out."""
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("PC", ttl=HOUR, now=NOW, actor="admin:root")
    link = grants.create("link", ttl=HOUR, now=NOW, actor="admin:root")
    _, session = grants.login(made.secret, NOW)
    start_rollout(schema, "r1", Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    meta = re.compile(r'<meta name="referrer" content="([^"]*)">')

    async def ask() -> dict[str, tuple[int, str | None, list[str]]]:
        app = viewer_of(reader, grants)
        seen: dict[str, tuple[int, str | None, list[str]]] = {}
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            own = f"http://{client.host}:{client.port}".replace("http:", "https:")
            for name, path, headers in (
                ("schema", "/", cookie),
                ("rollout", "/rollouts/r1?lang=en", cookie),
                ("login", f"/login/{link.secret}", {}),
                ("denied", "/", {}),
            ):
                response = await client.get(path, headers=headers)
                policy = response.headers.get("Referrer-Policy")
                seen[name] = (response.status, policy, meta.findall(await response.text()))
            # A browser without Sec-Fetch-Site, its Origin the viewer's (as the schema
            # page's policy has it send): signed out.
            response = await client.post(
                "/logout", headers={**cookie, "Origin": own, "Host": own[len("https://") :]}
            )
            policy = response.headers.get("Referrer-Policy")
            seen["signed_out"] = (response.status, policy, meta.findall(await response.text()))
            app.close()
        return seen

    seen = asyncio.run(ask())
    same, none = ["same-origin"], ["no-referrer"]
    assert seen["schema"] == (200, "same-origin", same), seen
    assert seen["rollout"] == (200, "same-origin", same), seen
    assert seen["login"] == (200, "no-referrer", none), seen
    assert seen["denied"] == (401, "no-referrer", none), seen
    assert seen["signed_out"] == (200, "no-referrer", none), seen
    assert grants.get(made.grant.id).revoked_at is not None


def test_a_grant_name_reaches_terminals_without_escapes(store: Store) -> None:
    """`viewer list` and the log show the name: no control characters, one line, bounded."""
    odd = Grants(store.db).create(
        "Dr.\x1b[31m Huber\nOSC\x1b]0;x\x07", ttl=HOUR, now=NOW, actor="a"
    )
    assert odd.grant.name == "Dr.[31m Huber OSC]0;x"


def test_a_grant_lives_one_second_to_seven_days(store: Store) -> None:
    grants = Grants(store.db)
    for ttl in (dt.timedelta(0), dt.timedelta(days=8)):
        with pytest.raises(ValueError, match="7 days"):
            grants.create("x", ttl=ttl, now=NOW, actor="a")


# --- the certificate -----------------------------------------------------------------------------


def test_the_viewer_certificate_is_issued_once_and_again_when_names_change(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "tls").mkdir()
    ca = pki.CertificateAuthority.create()
    first = certificate.ensure(layout, ca, "127.0.0.9", (), NOW)
    assert layout.viewer_key.stat().st_mode & 0o777 == 0o600
    names = pki.names_of(first)
    assert names.ips == ("127.0.0.9",) and pki.issued_by(first, ca.cert)
    eku = first.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [u.dotted_string for u in eku] == ["1.3.6.1.5.5.7.3.1"]  # serverAuth only
    assert certificate.ensure(layout, ca, "127.0.0.9", (), NOW) == first
    moved = certificate.ensure(layout, ca, "127.0.0.10", ("leader.praxis",), NOW)
    assert moved != first and pki.names_of(moved).dns == ("leader.praxis",)
    due = moved.not_valid_after_utc - LEADER_RENEW_BEFORE + dt.timedelta(hours=1)
    assert certificate.ensure(layout, ca, "127.0.0.10", ("leader.praxis",), due) != moved
    other_ca = pki.CertificateAuthority.create()
    assert pki.issued_by(certificate.ensure(layout, other_ca, "127.0.0.10", (), NOW), other_ca.cert)


def test_a_viewer_certificate_not_valid_yet_is_issued_again(tmp_path: Path) -> None:
    """Session 51: one issued by a clock that ran ahead (valid from three days on) was served
    as it was, and refused by every browser until then; issued again, as the leader's own."""
    layout = Layout(tmp_path)
    (tmp_path / "tls").mkdir()
    ca = pki.CertificateAuthority.create(now=NOW - dt.timedelta(days=10))
    ahead = certificate.ensure(layout, ca, "127.0.0.9", (), NOW + dt.timedelta(days=3))
    assert ahead.not_valid_before_utc > NOW
    again = certificate.ensure(layout, ca, "127.0.0.9", (), NOW)
    assert again != ahead and again.not_valid_before_utc <= NOW
    assert certificate.ensure(layout, ca, "127.0.0.9", (), NOW) == again


def test_a_viewer_certificate_that_is_not_of_viewer_key_is_issued_again_with_its_key(
    tmp_path: Path,
) -> None:
    """Session 52 (the leader's own pair is issued again for leader.key when they do not
    match): the viewer's pair that does not match (viewer.key replaced, or viewer.pem of
    another key) never stopped the leader; the viewer's certificate and key are its own, and
    a new pair is issued, as for one missing or damaged."""
    layout = Layout(tmp_path)
    (tmp_path / "tls").mkdir()
    ca = pki.CertificateAuthority.create(now=NOW - dt.timedelta(days=10))
    first = certificate.ensure(layout, ca, "127.0.0.9", (), NOW)
    pki.write_key(layout.viewer_key, pki.generate_key())
    again = certificate.ensure(layout, ca, "127.0.0.9", (), NOW)
    assert again != first and pki.key_matches(again, pki.read_key(layout.viewer_key))
    assert pki.read_cert(layout.viewer_cert) == again
    assert certificate.ensure(layout, ca, "127.0.0.9", (), NOW) == again


# --- the snapshot --------------------------------------------------------------------------------


def start_rollout(
    schema: SchemaStore, rollout_id: str, change: Change, names: Sequence[str] = ("a", "b")
) -> RolloutRow:
    """A rollout of nodes a and b (or ``names``) as the engine creates it: running, nothing
    done yet."""
    rollout, nodes = planner.plan_rollout(
        rollout_id=rollout_id,
        change=change,
        scope=Scope.cluster(),
        enrolled=dict.fromkeys(names, True),
        leader="a",
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    return schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW)


def enrol(store: Store, names: Sequence[str]) -> None:
    """Enrol nodes ``names`` (10.0.0.1, ...), each with a certificate of its own."""
    for i, name in enumerate(names):
        address = f"10.0.0.{i + 1}"
        store.add_token(
            f"tok-{name}",
            "s" * 26,
            ttl=HOUR,
            uses=1,
            description="t",
            now=NOW,
            actor="admin:test",
            node_name=name,
            addresses=(address,),
            dns_names=(),
        )
        cert = NodeCert(f"pin-{name}", f"sha256:{i:064d}", f"{i + 1:x}", NOW + 400 * 24 * HOUR)
        store.enrol(
            token_id=f"tok-{name}",
            secret="s" * 26,
            name=name,
            addresses=(address,),
            dns_names=(),
            agent_version="t",
            agent_port=9442,
            key_pin=f"pin-{name}",
            issue=functools.partial(_same, cert),
            now=NOW,
        )


def _same(cert: NodeCert) -> NodeCert:
    return cert


def drive_rollout(
    schema: SchemaStore,
    row: RolloutRow,
    fail: str = "",
    pause: Callable[[], None] = lambda: None,
    *,
    confirm: Sequence[NodeEvent] = (NodeEvent.SWITCH_DONE, NodeEvent.CONFIRM_DONE),
    settled: RolloutEvent = RolloutEvent.NODES_SETTLED,
    cert: bool = True,
) -> None:
    """Drive a started rollout through the store as the engine would: every node done (or
    what ``confirm`` ends it), except ``fail`` (rolled back); ``pause`` between two writes;
    ``cert``: record a certificate with each node."""
    rollout_id = row.rollout.id
    for name in ("b", "a"):
        events = [NodeEvent.START, NodeEvent.PREFLIGHT_PASSED, NodeEvent.STAGE_DONE]
        events.append(NodeEvent.SWITCH)
        if name == fail:
            events.append(NodeEvent.SWITCH_ROLLED_BACK)
        else:
            events += confirm
        for event in events:
            pause()
            records = [r.with_event(event) if r.name == name else r for r in row.records]
            row = schema.save_states(row, row.rollout, records, NOW, "engine")
        pause()
        learnt: dict[str, object] = {
            "freeze_started_at": NOW,
            "freeze_ended_at": NOW + dt.timedelta(seconds=3),
            "restart_seconds": 1.5,
        }
        if cert:
            learnt["cert_fingerprint"] = f"sha256:{rollout_id}-{name}"
            learnt["cert_not_after"] = NOW + dt.timedelta(days=20)
        schema.update_detail(rollout_id, name, **learnt)
    if fail:
        halting = row.rollout.with_event(RolloutEvent.FAILURE_BUDGET_EXCEEDED)
        row = schema.save_states(row, halting, row.records, NOW, "engine", f"{fail} failed")
    pause()
    settled_ = row.rollout.with_event(settled)
    schema.save_states(row, settled_, row.records, NOW, "engine")


def run_rollout(schema: SchemaStore, rollout_id: str, change: Change, fail: str = "") -> None:
    drive_rollout(schema, start_rollout(schema, rollout_id, change), fail)


def server_certs(schema: schema_pb2.Schema) -> tuple[CertStatus, ...]:
    """The oracle of ``SchemaStore.served_certificates`` (the viewer's and the expiry check's
    one query), drawn from every rollout whole as the viewer once did: the certificate each
    node serves on 8443 is that of the newest rollout of a change in
    ``schema_store.SERVES_NEW_CERT`` that ended in ``schema_store.SERVING_STATES`` (done, or
    dual after a transitional phase 1) on the node (both read at each call, as the query
    reads them), unless a disable-tls took the node back to http after it."""
    serving = {c.value for c in schema_store.SERVES_NEW_CERT}
    states = {s.value for s in schema_store.SERVING_STATES}
    live: dict[str, CertStatus] = {}
    for r in reversed(schema.rollouts):  # oldest first
        change = CHANGE.text(r.change)
        for n in r.nodes:
            state = NODE_STATE.text(n.state)
            if state not in states:
                continue
            if change in serving and n.HasField("cert_not_after"):
                live[n.name] = CertStatus(
                    "server",
                    n.name,
                    n.cert_fingerprint,
                    n.cert_not_after.ToDatetime(tzinfo=dt.UTC),
                )
            elif change == Change.DISABLE_TLS.value and state == NodeState.DONE.value:
                live.pop(n.name, None)
    return tuple(live[name] for name in sorted(live))


def test_the_snapshot_has_the_timeline_and_the_certificates_nodes_serve(store: Store) -> None:
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)
    run_rollout(schema, "r2", Change.ENABLE_TLS, fail="a")
    ca = pki.CertificateAuthority.create(now=NOW)
    for n, name in enumerate("ab", start=2):  # (enrolled: only their served ones are listed)
        leader_rig._enrol(store, ca, name, f"10.0.0.{n}", NOW)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [("ca", ca.cert)], fresh=none_fresh)
    snap = reader.read()
    assert snap.selected is not None and snap.selected["id"] == "r2"
    assert snap.selected["state"] == RolloutState.HALTED.value
    states = [t.new for t in snap.timeline["b"]]
    assert states == ["preflight", "staging", "staged", "switching", "confirming", "done"]
    assert snap.timeline["a"][-1].new == NodeState.ROLLED_BACK.value
    assert [t.new for t in snap.timeline[""]] == ["running", "halting", "halted"]
    assert reader.read("r1").selected["id"] == "r1"  # type: ignore[index]
    assert reader.read("nosuch").selected is None

    served = {c.subject: c.fingerprint for c in snap.certificates if c.kind == "server"}
    assert served == {"a": "sha256:r1-a", "b": "sha256:r2-b"}  # a's r2 switch rolled back
    assert server_certs(reader.read(every=True).schema) == tuple(
        c for c in snap.certificates if c.kind == "server"
    )
    near = {(c.kind, c.subject) for c in snap.near_expiry}
    assert near == {("server", "a"), ("server", "b")}  # 20 days; the CA has ten years
    assert snap.attention == ()

    text = metrics.render(reader.read(times=True)).decode()  # as /metrics reads it
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {s.labels["state"]: s.value for s in families["tlsroll_rollouts"].samples}
    assert counts["completed"] == 1 and counts["halted"] == 1 and counts["running"] == 0
    freeze = {s.name: s.value for s in families["tlsroll_freeze_window_seconds"].samples}
    assert freeze["tlsroll_freeze_window_seconds_count"] == 4
    assert freeze["tlsroll_freeze_window_seconds_sum"] == 12
    one_hot = [
        (s.labels["node"], s.labels["state"])
        for s in families["tlsroll_rollout_node_state"].samples
        if s.value == 1
    ]
    assert sorted(one_hot) == [("a", "rolled_back"), ("b", "done")]


def test_the_served_certificates_query_and_its_oracle_follow_one_list_of_changes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 1 of session 29 (L8): the query the viewer and the expiry check use
    (``SchemaStore.served_certificates``) named its changes in its SQL, and the rule drawn
    from every rollout whole stayed in the product only as the tests' oracle: a change that
    serves a new certificate could be added to one only. Both read
    ``schema_store.SERVES_NEW_CERT`` now (the oracle lives in the tests)."""
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)
    run_rollout(schema, "r2", Change.ROTATE_CERT, fail="a")

    def both() -> tuple[dict[str, str], dict[str, str]]:
        drawn = server_certs(
            schema_message(schema.all(), set(), NOW, fresh=frozenset(), reported=lambda _node: True)
        )
        served = schema.served_certificates()
        return {c.subject: c.fingerprint for c in drawn}, {n: f for n, (f, _) in served.items()}

    assert both() == ({"a": "sha256:r1-a", "b": "sha256:r2-b"},) * 2
    monkeypatch.setattr(schema_store, "SERVES_NEW_CERT", (Change.ENABLE_TLS,))
    assert both() == ({"a": "sha256:r1-a", "b": "sha256:r1-b"},) * 2


def test_a_transitional_phase_1_and_its_finalize_leave_each_node_serving_its_certificate(
    store: Store,
) -> None:
    """Review 2 of session 29, finding 1: the certificate a transitional phase 1 leaves each
    node serving (``dual``) was missing from ``served_certificates`` (hence from the expiry
    watch, auto-rotate and the page), and after its finalize (done, but a change that keeps
    the certificate) too. The oracle follows the same rule."""
    from leader.expiry import ExpiryWatch
    from leader.rollout_enums import Strategy

    schema = SchemaStore(store.db)
    cert = NodeCert("sha256:" + "0" * 64, "sha256:" + "1" * 64, "1", NOW + dt.timedelta(days=397))
    for i, name in enumerate(("a", "b")):
        address = f"10.0.0.{i + 1}"
        store.add_token(
            f"tok{i}",
            "s" * 26,
            ttl=dt.timedelta(hours=1),
            uses=1,
            description="t",
            now=NOW,
            actor="admin:test",
            node_name=name,
            addresses=(address,),
            dns_names=(),
        )
        store.enrol(
            token_id=f"tok{i}",
            secret="s" * 26,
            name=name,
            addresses=(address,),
            dns_names=(),
            agent_version="t",
            agent_port=9442,
            key_pin=f"pin-{name}",
            issue=lambda: cert,
            now=NOW,
        )
    rollout, nodes = planner.plan_rollout(
        rollout_id="p1",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=schema.next_epoch(),
        strategy=Strategy.TRANSITIONAL,
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    row = schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW)
    confirm = [NodeEvent.SWITCH_DONE, NodeEvent.CONFIRM_DUAL]
    drive_rollout(schema, row, confirm=confirm, settled=RolloutEvent.NODES_DUAL)
    assert {r.state for r in schema.latest().records} == {NodeState.DUAL}  # type: ignore[union-attr]
    watch = ExpiryWatch(
        store, schema, pki.CertificateAuthority.create(now=NOW).cert, list, lambda: NOW
    )
    expected = {"a": "sha256:p1-a", "b": "sha256:p1-b"}

    def seen() -> tuple[dict[str, str], ...]:
        served = {n: f for n, (f, _) in schema.served_certificates().items()}
        drawn = server_certs(
            schema_message(schema.all(), set(), NOW, fresh=frozenset(), reported=lambda _node: True)
        )
        warned = {e.subject: e.fingerprint for e in watch.warnings() if e.kind == "server"}
        return served, {c.subject: c.fingerprint for c in drawn}, warned

    assert seen() == (expected,) * 3  # 20 days left: within the watch's 30

    rollout, nodes = planner.plan_rollout(
        rollout_id="p2",
        change=Change.FINALIZE,
        scope=Scope.of_nodes(("a", "b")),
        enrolled={"a": True, "b": True},
        leader="a",
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a", finalizes="p1")
    row = schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW)
    drive_rollout(schema, row, cert=False)
    assert {r.state for r in schema.latest().records} == {NodeState.DONE}  # type: ignore[union-attr]
    assert seen() == (expected,) * 3


def test_metrics_refuse_a_snapshot_read_without_its_switch_times(store: Store) -> None:
    """Review 1 of session 29 (L6): the freeze and restart histograms come from the
    snapshot's ``switch_times``, read only with ``times=True``; a snapshot read without them
    (the page's) once rendered histograms that said no node ever switched, with no error."""
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    with pytest.raises(ValueError, match="times=True"):
        metrics.render(reader.read())
    text = metrics.render(reader.read(times=True)).decode()
    assert "tlsroll_freeze_window_seconds_count 2.0" in text


def test_a_freeze_window_is_the_agent_s_elapsed_time_on_the_page_and_in_the_metrics(
    store: Store,
) -> None:
    """Clock audit s35 J: ``a``'s clock stepped back an hour during its freeze (its agent
    measured 2.5 s); ``b``'s agent is older (no measure) and its clock went back 10 s. The page
    and ``tlsroll_freeze_window_seconds`` showed -3597.5 s and -13 s: now 2.5 s and 0 s, with
    the times said to be the node's clock (the step times beside them are the leader's)."""
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)
    stepped = NOW - dt.timedelta(seconds=3597.5)
    schema.update_detail("r1", "a", freeze_ended_at=stepped, freeze_seconds=2.5)
    schema.update_detail("r1", "b", freeze_ended_at=NOW - dt.timedelta(seconds=10))
    snap = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh).read(times=True)
    text = metrics.render(snap).decode()
    assert "tlsroll_freeze_window_seconds_sum 2.5" in text
    assert 'tlsroll_freeze_window_seconds_bucket{le="0.5"} 1.0' in text  # b's 0, not -13
    page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, clock, measured, clamped in (
        ("de", "Uhr des Knotens", "(2,5 s)", "(0,0 s)"),
        ("en", "node's clock", "(2.5 s)", "(0.0 s)"),
    ):
        html = pages.schema_content(snap, Words.of(lang), page)
        assert f"<small>({clock})</small>" in unescape(html)
        assert measured in html and clamped in html and "3597" not in html and "-13" not in html


@pytest.mark.parametrize("bad", [float("inf"), -5.0, 1e300])
def test_a_measure_a_leader_stored_unchecked_is_not_shown_and_raises_nothing(
    store: Store, tmp_path: Path, bad: float
) -> None:
    """Review s36 L2: a leader before the check stored any ``freeze_seconds`` and
    ``restart_seconds`` an agent sent; its file keeps them. inf made the page's node row raise
    (``Words.number`` got JSON's "Infinity"); -5 and 1e300 were shown as they are. Read back,
    such a measure is not sent: the window is the times' difference, the restart untimed."""
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)
    ended = NOW + dt.timedelta(seconds=4)
    schema.update_detail("r1", "a", freeze_ended_at=ended, freeze_seconds=bad, restart_seconds=bad)
    later = Store(tmp_path / "leader.sqlite3")  # the leader started after it reads the file
    reader = SchemaStore(later.db)
    row = reader.get("r1")
    assert row is not None
    detail = row.node("a")[1]
    assert detail.freeze_window == 4.0 and detail.restart_seconds == 0.0
    snap = Reader(later, reader, lambda: NOW, lambda _: True, [], fresh=none_fresh).read(times=True)
    text = metrics.render(snap).decode()
    assert "inf" not in text.lower().replace("+inf", "") and "e+300" not in text
    page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, window in (("de", "(4,0 s)"), ("en", "(4.0 s)")):
        html = pages.schema_content(snap, Words.of(lang), page)
        assert window in html and "Infinity" not in html and "(-5" not in html
        assert "e+300" not in html and "inf s" not in html
    for value in ("Infinity", "NaN", float("inf"), float("nan")):  # defence in the words too
        assert Words.of("en").seconds(value) == Words.of("en")("seconds", value="–")


def test_the_store_s_trouble_is_in_the_page_s_words_with_sqlite_s_marked_english(
    store: Store,
) -> None:
    """Session 44: the alert for a store whose writes fail put SQLite's English (its
    ``StoreHealth.trouble``) inside the German sentence, unmarked. Now the page's own words
    come first, in its language, then SQLite's, quoted and marked ``lang="en"`` (as the words
    of a node problem the page knows no more about, session 41)."""
    problem = "store: database or disk is full (SQLITE_FULL)"
    reader = Reader(store, SchemaStore(store.db), lambda: NOW, lambda _: True, [], fresh=none_fresh)
    reader.store_trouble = lambda: (problem, NOW - dt.timedelta(minutes=3))
    snap = reader.read()
    page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, words in (
        ("de", "Der Leader kann seit "),
        ("en", "The leader cannot write its store since "),
    ):
        html = pages.schema_content(snap, Words.of(lang), page)
        (alert,) = re.findall(r'<div class="alert"[^>]*data-trouble="store"[^>]*>(.*?)</div>', html)
        (said,) = re.findall(r'<q lang="en">(.*?)</q>', alert)
        assert unescape(said) == problem
        own = unescape(re.sub(r"<q lang=\"en\">.*?</q>|<[^>]+>", "", alert))
        assert words in own and "SQLITE" not in own and "disk is full" not in own, own


def test_a_store_whose_checkpoint_alone_fails_is_not_said_to_stop_the_rollouts(
    store: Store,
) -> None:
    """Review s73 revdisk: a checkpoint the disk does not take while the writes still commit
    (``StoreHealth.writes_work``) was shown in the words of a failed write ("no rollout moves
    until it can", "keine Umstellung kommt weiter"), where rollouts go on until the writes
    fail. Its own words now, in each language; a failed write's stay."""
    problem = "store: database or disk is full (SQLITE_FULL) at its checkpoint (…)"
    reader = Reader(store, SchemaStore(store.db), lambda: NOW, lambda _: True, [], fresh=none_fresh)
    reader.store_trouble = lambda: (problem, NOW - dt.timedelta(minutes=3))
    works = [True]
    reader.store_writes_work = lambda: works[0]
    page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    expected = {
        (True, "de"): ("gehen vorerst weiter", "keine Umstellung kommt weiter"),
        (True, "en"): ("rollouts go on for now", "no rollout moves"),
        (False, "de"): ("keine Umstellung kommt weiter", "vorerst"),
        (False, "en"): ("no rollout moves until it can", "for now"),
    }
    for (writes_work, lang), (said, unsaid) in expected.items():
        works[0] = writes_work
        html = pages.schema_content(reader.read(), Words.of(lang), page)
        (alert,) = re.findall(r'<div class="alert"[^>]*data-trouble="store"[^>]*>(.*?)</div>', html)
        own = unescape(re.sub(r"<q lang=\"en\">.*?</q>|<[^>]+>", "", alert))
        assert said in own and unsaid not in own, (writes_work, lang, own)


def test_failed_bootstrap_attempts_are_on_the_page_and_in_the_metrics(store: Store) -> None:
    schema = SchemaStore(store.db)
    failure = BootstrapFailureRow("a", "127.0.0.9", "ws-empfang", 7, NOW, NOW)
    schema.record_bootstrap_failures("a", [failure], NOW)
    snap = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh).read(times=True)
    text = metrics.render(snap).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = families["tlsroll_bootstrap_failures"].samples
    assert (sample.labels, sample.value) == ({"node": "a", "source": "127.0.0.9"}, 7)
    page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, title in (("de", "Fehlgeschlagene Anmeldungen"), ("en", "Failed workstation")):
        html = pages.schema_content(snap, Words.of(lang), page)
        assert title in html and "ws-empfang" in html and "<td>7</td>" in html


def test_wrong_client_passwords_at_a_server_are_on_the_page_and_in_the_metrics_when_some(
    store: Store,
) -> None:
    """Carried finding (the leader's schema did not show them): the wrong passwords at a
    node's server's own login since it started (``LeaderState.login_failures``, from the
    agents' heartbeats) are on the page, with a hint, per node, and in the metrics; a page
    with none has no such section."""
    reader = Reader(store, SchemaStore(store.db), lambda: NOW, lambda _: True, [], fresh=none_fresh)
    page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    rows = [
        LoginFailuresRow("a", 1, None, NOW),
        LoginFailuresRow("b", 12, NOW - dt.timedelta(minutes=2), NOW),
    ]
    reader.login_failures = list
    for lang in LANGS:
        html = pages.schema_content(reader.read(), Words.of(lang), page)
        assert 'id="login-failures"' not in html
    reader.login_failures = lambda: rows
    snap = reader.read(times=True)
    for lang, title, one, many in (
        (
            "de",
            "Falsche Client-Passwörter",
            "1 falsches Client-Passwort bisher",
            "12 falsche Client-Passwörter bisher",
        ),
        (
            "en",
            "Wrong client passwords",
            "1 wrong client password so far",
            "12 wrong client passwords so far",
        ),
    ):
        html = pages.schema_content(snap, Words.of(lang), page)
        (section,) = re.findall(r'<section id="login-failures".*?</section>', html, re.S)
        assert title in section and one in section and many in section
        assert 'data-node="a" data-count="1"' in section
        assert 'data-node="b" data-count="12"' in section
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(snap).decode())}
    samples = families["tlsroll_server_login_failures"].samples
    assert sorted((s.labels["node"], s.value) for s in samples) == [("a", 1), ("b", 12)]
    shown = wire.to_dict(snap.schema)["server_login_failures"]
    assert shown[0] == {"node": "a", "count": 1, "reported_at": "2026-11-30T09:00:00Z"}
    assert shown[1]["last_at"] == "2026-11-30T08:58:00Z"


def test_the_nodes_behind_the_newest_password_are_on_the_page_with_the_command(
    store: Store,
) -> None:
    """Review s69 revpass3 M1: after a change-password that ended part way (here: node b got
    version 2, a and c did not) only the rollout's own rows marked a node, and only those in
    it. The page names, cluster-wide, the newest version and who staged it, each node still
    on an older one with its version, and the command that finishes it; a removed node is
    left out (the removal forgets its record of the password); the schema carries the same
    (``password_behind``), never a verifier; with none behind there is no such section."""
    enrol(store, ["a", "b", "c", "d"])
    schema = SchemaStore(store.db)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    assert schema.stage_password('{"v": 1}', NOW, "admin:first") == 1
    for name in ("a", "b", "c", "d"):
        schema.set_node_auth(name, 1, NOW)
    for lang in LANGS:
        html = pages.schema_content(reader.read(), Words.of(lang), page)
        assert 'id="passwords"' not in html
    assert schema.stage_password('{"v": 2}', NOW, "admin:second") == 2
    schema.set_node_auth("b", 2, NOW)
    store.remove_node("d", now=NOW, actor="admin:test")
    snap = reader.read(times=True)
    finish = "tlsroll rollout start --change change-password --nodes a,c"
    for lang, said in (
        ("de", ("Passwort-Version 2 (hinterlegt von admin:second", "a: Version 1")),
        ("en", ("Password version 2 (staged by admin:second", "a: version 1")),
    ):
        html = pages.schema_content(snap, Words.of(lang), page)
        (section,) = re.findall(r'<section id="passwords".*?</section>', html, re.S)
        assert all(text in section for text in said), section
        assert 'data-node="a" data-live="1"' in section and 'data-node="c"' in section
        assert 'data-node="b"' not in section and 'data-node="d"' not in section
        assert f"<code>{finish}</code>" in section
    shown = wire.to_dict(snap.schema)["password_behind"]
    assert shown == {
        "version": 2,
        "staged_by": "admin:second",
        "staged_at": "2026-11-30T09:00:00Z",
        "nodes": [{"node": "a", "live_version": 1}, {"node": "c", "live_version": 1}],
        "command": finish,
    }
    assert snap.pending_passwords == ("a", "c")  # (the metrics' nodes: d left out too)
    assert '"v"' not in json.dumps(shown)
    schema.set_node_auth("a", 2, NOW)
    schema.set_node_auth("c", 2, NOW)
    assert "password_behind" not in wire.to_dict(reader.read().schema)


@pytest.mark.parametrize(
    ("zone", "far"),
    [
        ("Europe/Berlin", dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),
        ("America/New_York", dt.datetime(1, 1, 1, tzinfo=dt.UTC)),
    ],
)
def test_a_time_beyond_the_local_calendar_is_shown_as_none_not_a_500(
    store: Store, monkeypatch: pytest.MonkeyPatch, zone: str, far: dt.datetime
) -> None:
    """Review of s49carry (M): a time at the calendar's edge (a node's ``last_login_failure_at``
    of 9999-12-31T23:59:59Z, kept by the leader of an older release or read back from a
    schema) has no local time on a leader east of UTC (or year 1 west of it):
    ``astimezone`` raised OverflowError and the schema page answered 500. ``Words.when`` and
    ``Words.window`` show it as "none"."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for lang in LANGS:
            w = Words.of(lang)
            assert w.when(far) == w.when(far.isoformat()) == w("none")
            assert w.window(far.isoformat(), NOW.isoformat(), 5) == w(
                "window", start=w("none"), end=w.when(NOW), seconds=w.seconds(5)
            )
            assert w.window(NOW.isoformat(), far.isoformat(), 5) == w(
                "window", start=w.when(NOW), end=w("none"), seconds=w.seconds(5)
            )
            assert w.when(NOW) != w("none")
        reader = Reader(
            store, SchemaStore(store.db), lambda: NOW, lambda _: True, [], fresh=none_fresh
        )
        reader.login_failures = lambda: [LoginFailuresRow("a", 3, far, NOW)]
        page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
        for lang in LANGS:
            html = pages.schema_content(reader.read(times=True), Words.of(lang), page)
            assert 'data-node="a" data-count="3"' in html
    finally:
        monkeypatch.undo()
        time.tzset()


# --- the live stream ------------------------------------------------------------------------------


async def next_update(stream: StreamReader, kept: bytearray) -> str:
    """The data of the next ``update`` event on an open /events response."""
    while True:
        kind, data = await next_event(stream, kept)
        if kind == "update":
            return data


async def next_event(stream: StreamReader, kept: bytearray) -> tuple[str, str]:
    """The kind and data of the next event on an open /events response."""
    while True:
        end = kept.find(b"\n\n")
        if end >= 0:
            frame, kept[:] = bytes(kept[:end]), kept[end + 2 :]
            lines = frame.decode().split("\n")
            if lines[0].startswith("event: "):
                data = "\n".join(line.removeprefix("data: ") for line in lines[1:])
                return lines[0].removeprefix("event: "), data
            continue
        chunk = await stream.readany()
        assert chunk, "the stream ended"
        kept += chunk


def test_every_write_to_the_store_reaches_an_open_page_without_waiting_for_a_look(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's live stream is woken by each of the store's committed writes, routine ones too
    (a rollout's steps, made in another thread as the leader's store thread makes them, apart
    from each other), and shows the state after the last of them; it does not wait for its next
    timed look, put at a minute here."""
    monkeypatch.setattr(viewer_app, "EVENT_INTERVAL", 60.0)
    monkeypatch.setattr(viewer_app, "SHARED_SECONDS", 60.0)
    monkeypatch.setattr(viewer_app, "EVENT_GAP", 0.1)  # (each write waits twice that)
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    row = start_rollout(schema, "r1", Change.ENABLE_TLS)

    async def watch() -> None:
        reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
        closing = asyncio.Event()
        app = viewer_of(reader, grants, closing=closing)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            response = await client.get("/events", headers=cookie)
            assert response.status == 200
            kept = bytearray()
            assert 'data-rollout="r1" data-state="running"' in await next_update(
                response.content, kept
            )
            # Each write well after the stream's last look (EVENT_GAP): no write rides on
            # another's wake-up; the last, the rollout's end, needs its own.
            pause = functools.partial(time.sleep, 2 * viewer_app.EVENT_GAP)
            driving = asyncio.create_task(asyncio.to_thread(drive_rollout, schema, row, "", pause))
            async with asyncio.timeout(30):  # the stream's own next look: a minute away
                while 'data-rollout="r1" data-state="completed"' not in (
                    await next_update(response.content, kept)
                ):
                    pass
            await driving
            closing.set()
            app.close()
            response.close()
        assert app.pulse.tell not in store.db.on_commit

    asyncio.run(watch())


def test_a_write_sends_an_open_page_the_rows_it_changed_and_draws_only_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: a page open during a rollout of many nodes is sent the whole live part once;
    after that a write that changes one node sends (and draws) that node's row and timeline
    only, not every node's (at 500 nodes the whole part is ~0.6 MiB, drawn in ~60 ms, after
    each write, for each open page). A change of the rest (the rollout's state) sends the part
    whole again. What the page is sent adds up to what it would draw whole."""
    monkeypatch.setattr(viewer_app, "EVENT_INTERVAL", 60.0)
    monkeypatch.setattr(viewer_app, "SHARED_SECONDS", 60.0)
    monkeypatch.setattr(pages, "DRAWN", pages.Drawn())
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    names = [f"n{i:02d}" for i in range(30)]
    rollout, nodes = planner.plan_rollout(
        rollout_id="r1",
        change=Change.ENABLE_TLS,
        scope=Scope.cluster(),
        enrolled=dict.fromkeys(names, True),
        leader=names[0],
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node=names[0])
    row = schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    # The page draws no workstation: its reads leave the client report out (O(clients)).
    reports: list[int] = []
    report = schema_store._clients

    def counted(*args: Any) -> Any:
        reports.append(1)
        return report(*args)

    monkeypatch.setattr(schema_store, "_clients", counted)

    def step(name: str, event: NodeEvent) -> None:
        nonlocal row
        records = [r.with_event(event) if r.name == name else r for r in row.records]
        row = schema.save_states(row, row.rollout, records, NOW, "engine")

    async def watch() -> None:
        closing = asyncio.Event()
        app = viewer_of(reader, grants, closing=closing)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            response = await client.get("/events?lang=en", headers=cookie)
            kept = bytearray()
            kind, whole = await next_event(response.content, kept)
            assert kind == "update" and whole.count('<th scope="row">n') == 30
            drawn = pages.DRAWN.count
            assert drawn == 31 + 30  # every row, the rollout's timeline and each node's
            async with asyncio.timeout(30):
                for name, event in [("n07", NodeEvent.START), ("n07", NodeEvent.PREFLIGHT_PASSED)]:
                    await asyncio.to_thread(step, name, event)
                    kind, data = await next_event(response.content, kept)
                    assert kind == "patch", data[:200]
                    parts = dict(json.loads(data))
                    assert list(parts) == ["node-n07", "tl-node-n07"]
                    assert parts["node-n07"].count("<tr") == 1
                    assert f'data-state="{event_state(event)}"' in parts["node-n07"]
                    assert pages.DRAWN.count == drawn + 2
                    drawn = pages.DRAWN.count
                    # the page put together is the page drawn whole
                    page = pages.PageContext("127.0.0.1", "test", NOW, "/events")
                    read = reader.read(clients=False, page=True)  # as the page reads
                    fresh = pages.schema_content(read, Words.of("en"), page)
                    for key, html in parts.items():
                        assert html in fresh, key
                halted = row.rollout.with_event(RolloutEvent.ABORT)
                await asyncio.to_thread(
                    schema.save_states, row, halted, row.records, NOW, "admin:test"
                )
                kind, data = await next_event(response.content, kept)
                assert kind == "update" and data.count('<th scope="row">n') == 30
            assert reports == []
            assert (await client.get("/api/v1/schema", headers=cookie)).status == 200
            assert reports == [1]  # what `schema show --json` prints: the report too
            closing.set()
            app.close()
            response.close()

    asyncio.run(watch())


def test_open_pages_of_one_language_share_each_drawing_and_each_event(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: every open page drew the live part of each read again and made its own event
    of it. Pages of one selection and language share the read (``_shared_snapshot``), so
    they share what is drawn of it and the event: two pages open, a write is drawn once and
    both are sent the same patch; a page of the other language is drawn apart."""
    monkeypatch.setattr(viewer_app, "EVENT_INTERVAL", 60.0)
    monkeypatch.setattr(viewer_app, "SHARED_SECONDS", 60.0)
    monkeypatch.setattr(pages, "DRAWN", pages.Drawn())
    drawn: list[str] = []
    content_parts = pages.content_parts

    def counted(snap: Snapshot, w: Words, page: pages.PageContext) -> pages.Content:
        drawn.append(w.lang)
        return content_parts(snap, w, page)

    monkeypatch.setattr(pages, "content_parts", counted)
    monkeypatch.setattr(viewer_app, "KEPT_EVENT_BYTES", 2048)
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    row = start_rollout(schema, "r1", Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)

    async def watch() -> None:
        closing = asyncio.Event()
        app = viewer_of(reader, grants, closing=closing)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            opened = []
            for lang in ("en", "en", "de"):
                response = await client.get(f"/events?lang={lang}", headers=cookie)
                kept = bytearray()
                kind, _ = await next_event(response.content, kept)
                assert kind == "update"
                opened.append((response, kept))
            assert sorted(drawn) == ["de", "en"]
            drawn.clear()
            async with asyncio.timeout(30):
                records = [
                    r.with_event(NodeEvent.START) if r.name == "b" else r for r in row.records
                ]
                await asyncio.to_thread(
                    schema.save_states, row, row.rollout, records, NOW, "engine"
                )
                sent = [await next_event(response.content, kept) for response, kept in opened]
            assert [kind for kind, _ in sent] == ["patch"] * 3
            assert sent[0] == sent[1] and sent[2] != sent[0]  # the same patch; German words
            assert [key for key, _ in json.loads(sent[0][1])] == ["node-b", "tl-node-b"]
            assert sorted(drawn) == ["de", "en"]  # once per language, not per page
            # kept: the patches; not the part whole each page was sent first (~4.5 KiB here,
            # ~0.9 MiB at 500 nodes: over the bound, put at 2 KiB for these two nodes)
            kept_events = [event for *_, event in app._events.values()]
            assert sent[0][1].encode() in b"".join(kept_events)
            assert all(len(e) <= viewer_app.KEPT_EVENT_BYTES for e in kept_events)
            assert not any(e.startswith(b"event: update") for e in kept_events)
            closing.set()
            app.close()
            for response, _ in opened:
                response.close()

    asyncio.run(watch())


def test_a_page_opened_beside_an_open_one_reads_nothing_the_open_one_read(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: ``GET /`` read the stores whole again, though an open page's stream had read
    them since the last write (a page opened beside it, or reloaded); it takes that read now,
    as its own stream does. After a write, it reads."""
    monkeypatch.setattr(viewer_app, "EVENT_INTERVAL", 60.0)
    monkeypatch.setattr(viewer_app, "SHARED_SECONDS", 60.0)
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    row = start_rollout(schema, "r1", Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    reads: list[str | None] = []
    read = reader.read

    def counted(rollout_id: str | None = None, **kwargs: Any) -> Snapshot:
        reads.append(rollout_id)
        return read(rollout_id, **kwargs)

    monkeypatch.setattr(reader, "read", counted)

    async def watch() -> None:
        closing = asyncio.Event()
        app = viewer_of(reader, grants, closing=closing)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            response = await client.get("/events", headers=cookie)
            kept = bytearray()
            assert (await next_event(response.content, kept))[0] == "update"
            assert reads == [None]
            for _ in range(2):
                page = await client.get("/", headers=cookie)
                assert page.status == 200 and 'data-state="running"' in await page.text()
            assert reads == [None]
            halted = row.rollout.with_event(RolloutEvent.ABORT)
            await asyncio.to_thread(schema.save_states, row, halted, row.records, NOW, "admin")
            page = await client.get("/", headers=cookie)
            shown = re.findall(r'data-rollout="r1" data-state="([^"]*)"', await page.text())
            assert shown and shown[0] == halted.state.value != "running"
            assert reads[-1] is None and len(reads) in (2, 3)  # (the stream's own, once)
            closing.set()
            app.close()
            response.close()

    asyncio.run(watch())


def test_a_page_s_read_after_a_rollout_s_write_reads_and_makes_no_enrolled_node_again(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: an open page reads again after each write of a rollout, and at 500 nodes two
    thirds of that read were the enrolled nodes: their rows read, each parsed, each made anew
    for its heartbeat (heard "now" while a stream vouches for it). A read after a rollout's
    write reads, parses and makes no node now; a write that changes a node (a removal), or a
    write by another connection, is read by the next read."""
    from leader import store as store_module

    schema = SchemaStore(store.db)
    names = ["a", "b", "c"]
    enrol(store, names)
    for name in names:
        store.heartbeat(name, "t", now=NOW)
        store.vouch(name)
    row = start_rollout(schema, "r1", Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    first = reader.read(clients=False)
    assert [(n.name, n.online) for n in first.nodes] == [(n, True) for n in names]
    done: list[str] = []

    def counting(what: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            done.append(what)
            return call(*args, **kwargs)

        return counted

    monkeypatch.setattr(Store, "node_rows", staticmethod(counting("read", Store.node_rows)))
    monkeypatch.setattr(store_module, "_node", counting("parsed", store_module._node))
    monkeypatch.setattr(store_module, "replace", counting("made", dataclasses.replace))

    def shown(snap: Snapshot) -> list[tuple[str, tuple[str, ...], bool]]:
        return [(n.name, n.addresses, n.online) for n in snap.nodes]

    for event in (NodeEvent.START, NodeEvent.PREFLIGHT_PASSED):
        records = [r.with_event(event) if r.name == "b" else r for r in row.records]
        row = schema.save_states(row, row.rollout, records, NOW, "engine")
        snap = reader.read(clients=False)
        assert done == []
        assert snap.selected is not None
        assert [n["state"] for n in snap.selected["nodes"] if n["name"] == "b"] == [
            event_state(event)
        ]
        assert shown(snap) == shown(first)
        assert all(n.last_heartbeat is not None for n in snap.nodes)

    store.remove_node("c", now=NOW, actor="admin:test")
    done.clear()
    snap = reader.read(clients=False)
    assert done == ["read"]  # the rows of a and b are as they were: not parsed again
    assert [n.name for n in snap.nodes] == ["a", "b"]
    assert [c.subject for c in snap.certificates if c.kind == "agent"] == ["a", "b"]

    other = sqlite3.connect(tmp_path / "leader.sqlite3")
    with other:
        other.execute("UPDATE nodes SET addresses = '[\"10.0.0.9\"]' WHERE name = 'a'")
    other.close()
    done.clear()
    snap = reader.read(clients=False)
    assert done == ["read", "parsed"]
    assert shown(snap)[0] == ("a", ("10.0.0.9",), True)
    fresh = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh).read(
        clients=False
    )
    assert shown(snap) == shown(fresh)


def event_state(event: NodeEvent) -> str:
    return {NodeEvent.START: "preflight", NodeEvent.PREFLIGHT_PASSED: "staging"}[event]


@pytest.mark.parametrize("view", ["schema show", "viewer"])
def test_a_view_s_time_is_never_before_what_it_shows(store: Store, view: str) -> None:
    """Session 32's audit, L3: ``schema show`` took its ``now`` before it read the agents'
    client report (the viewer before every read), in reads apart: a report that committed in
    between was shown newer than the view's time (a negative age). The parts are one read
    now, and ``now`` is taken after it."""
    schema = SchemaStore(store.db)
    start_rollout(schema, "r1", Change.ENABLE_TLS)
    later = NOW + dt.timedelta(seconds=1)
    written: list[bool] = []

    def clock() -> dt.datetime:
        if not written:  # a report commits right after the view took its time
            written.append(True)
            seen = Client("a", "http", "10.0.0.7", "ws-7", later, later, 3)
            schema.record_clients(
                "a", [seen], window_seconds=3600, source="refserver", problem="", now=later
            )
        return NOW

    if view == "schema show":
        service = SchemaViewService(schema, clock, fresh=none_fresh, reported=lambda _node: True)
        message = service._answer(schema_pb2.GetSchemaRequest(limit=1), None)
    else:
        message = Reader(store, schema, clock, lambda _: True, [], fresh=none_fresh).read().schema
    generated = message.generated_at.ToDatetime(tzinfo=dt.UTC)
    shown = [v.reported_at.ToDatetime(tzinfo=dt.UTC) for v in message.node_clients]
    shown += [
        c.last_seen.ToDatetime(tzinfo=dt.UTC) for v in message.node_clients for c in v.still_on_http
    ]
    assert written
    assert all(at <= generated for at in shown), (generated, shown)


def test_a_snapshot_read_again_after_writes_is_a_fresh_readers(store: Store) -> None:
    """The Reader keeps each node's data and the timeline between reads (issue 15) and converts
    and parses only what changed: what it reads after writes is what a new Reader reads."""
    schema = SchemaStore(store.db)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    row = start_rollout(schema, "r1", Change.ENABLE_TLS)
    first = reader.read()
    assert first.data == wire_dict(first)
    steps = 0

    def pause() -> None:
        nonlocal steps
        steps += 1
        if steps % 3 == 0:  # now and then, between the writes
            snap = reader.read()
            fresh = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh).read()
            assert snap.data == fresh.data == wire_dict(snap)
            assert snap.timeline == fresh.timeline

    drive_rollout(schema, row, "a", pause)
    run_rollout(schema, "r2", Change.ENABLE_TLS)
    for selected in ("r1", None, "r1"):
        snap = reader.read(selected)
        fresh = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh).read(
            selected
        )
        assert snap.data == fresh.data == wire_dict(snap)
        assert snap.timeline == fresh.timeline and snap.timeline


def test_a_page_s_read_keeps_of_each_node_what_its_row_draws(store: Store) -> None:
    """Issue 15: a page's read (``page``) keeps of each node only the fields its row draws
    (``ROW_FIELDS``), no node view, and its schema carries none (the leader's memory with a
    page open at 500 nodes); a node unchanged since the last read keeps its fields. What is
    drawn of it is what is drawn of the whole records, in both languages, at every step of
    a rollout (one rolled back, one done, windows, restarts and certificates recorded): a
    row that drew a field left out would differ here."""
    schema = SchemaStore(store.db)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    row = start_rollout(schema, "r1", Change.ENABLE_TLS)
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    checked: list[str] = []

    def check() -> None:
        part = reader.read(clients=False, page=True)
        whole = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh).read(
            clients=False
        )
        assert part.selected is not None and whole.selected is not None
        assert all(not view.nodes for view in part.schema.rollouts)
        assert part.selected["nodes"] == [
            {k: v for k, v in n.items() if k in snapshot.ROW_FIELDS}
            for n in whole.selected["nodes"]
        ]
        assert any("steps" in n and "cert_fingerprint" in n for n in whole.selected["nodes"])
        assert reader._views == {}
        again = reader.read(clients=False, page=True)
        assert again.selected is not None
        assert all(
            a is b for a, b in zip(again.selected["nodes"], part.selected["nodes"], strict=True)
        )
        for lang in LANGS:
            words = Words.of(lang)
            drawn = pages.Drawn().rows(part, words)
            assert drawn == pages.Drawn().rows(whole, words)
            assert pages.content_parts(part, words, context).html() == (
                pages.content_parts(whole, words, context).html()
            )
            checked.extend(drawn.values())

    drive_rollout(schema, row, "a", check)
    check()
    # A row is kept in Latin-1, its freeze window's dash a reference the browser shows as one
    # (``pages._narrow``: Python keeps a string with one "–" at two bytes a character).
    assert any("&#8211;" in html and "–" in unescape(html) for html in checked)
    assert all(max(html) <= "\xff" for html in checked)


class ReadKeys(dict[str, Any]):
    """A node's dict that notes every key the row's template reads of it: Jinja reads
    ``n.name`` of a dict as ``n["name"]`` (after ``getattr``, which a dict has no such
    attribute for), and ``n.get("…")`` by the method."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def test_every_field_a_row_draws_is_kept_for_a_page(store: Store) -> None:
    """Review s44rev3 M6: the test above drives a rollout that sets no reason, URL, measured
    freeze, pending password: a ``ROW_FIELDS`` without one of them passed it, and a page
    would have drawn that cell blank. Here one node has every field its row draws set, each
    to what shows (a reason with what HTML escapes and a character past Latin-1; a freeze
    measured at other than the two times' difference): its row drawn from its
    ``ROW_FIELDS`` alone is the row drawn from the whole record, in both languages, and
    what the template reads of a node is within ``ROW_FIELDS``."""
    schema = SchemaStore(store.db)
    start_rollout(schema, "r1", Change.ENABLE_TLS)
    whole = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh).read(
        clients=False
    )
    assert whole.selected is not None
    node = dict(whole.selected["nodes"][0])
    node.update(
        state="needs_attention",
        reason='rolled back: a & b < "c" → d',
        old_url="http://a.example:8080/",
        new_url="https://a.example:8443/",
        cert_not_after=(NOW + dt.timedelta(days=30)).isoformat(),
        freeze_started_at=NOW.isoformat(),
        freeze_ended_at=(NOW + dt.timedelta(seconds=3)).isoformat(),
        freeze_seconds=2.5,  # not the 3 s between the times: shown only if kept
        restart_seconds=1.5,
        leader_node=True,
        password_pending=True,
    )
    assert set(node) > snapshot.ROW_FIELDS  # the record has more than its row draws
    kept = {k: v for k, v in node.items() if k in snapshot.ROW_FIELDS}
    for lang in LANGS:
        words = Words.of(lang)
        row = pages._ENV.get_template("node_row.html")
        drawn = row.render(n=node, w=words)
        assert row.render(n=kept, w=words) == drawn, lang
        assert "a &amp; b &lt; &#34;c&#34; → d" in drawn  # escaped once
        assert f"({words.seconds(2.5)})" in drawn  # the measured freeze, not the times'
        assert "https://a.example:8443/" in drawn and "http://a.example:8080/" in drawn
        recorded = ReadKeys(node)
        assert row.render(n=recorded, w=words) == drawn
        # exactly what the row reads is kept: nothing missing, nothing kept for nothing
        assert recorded.read == snapshot.ROW_FIELDS, recorded.read ^ snapshot.ROW_FIELDS


def wire_dict(snap: Snapshot) -> dict[str, Any]:
    return wire.to_dict(snap.schema)


def test_an_unknown_rollout_keeps_no_snapshot_and_the_kept_ones_are_few_and_fresh(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s43rev3 Low 1: ``GET /rollouts/<any id>`` (and ``/events?rollout=<any id>``) kept a
    whole snapshot under the id the client chose before it answered 404, dropped only at the
    next read (a burst of 200 left 174 held). Now none is kept for a rollout that does not
    exist; at most ``KEPT_SHARED`` are (the least recently used out); and a stale one is
    dropped at any look, a hit included."""
    monkeypatch.setattr(viewer_app, "EVENT_INTERVAL", 60.0)
    monkeypatch.setattr(viewer_app, "SHARED_SECONDS", 60.0)
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    ids = [f"r{i}" for i in range(viewer_app.KEPT_SHARED + 2)]
    for rollout_id in ids:
        run_rollout(schema, rollout_id, Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)

    async def watch() -> None:
        app = viewer_of(reader, grants)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            for i in range(50):
                page = await client.get(f"/rollouts/nope-{i}", headers=cookie)
                assert page.status == 404
                stream = await client.get(f"/events?rollout=nope-e{i}", headers=cookie)
                assert stream.status == 404
            assert dict(app._shared) == {}
            for rollout_id in ids:  # one more than kept, and another
                page = await client.get(f"/rollouts/{rollout_id}", headers=cookie)
                assert page.status == 200
            assert list(app._shared) == ids[-viewer_app.KEPT_SHARED :]
            # a hit drops what is stale (here: one made to look old), not the next read only
            at, commits, snap = app._shared[ids[-2]]
            app._shared[ids[-2]] = (at - 3600.0, commits, snap)
            assert (await client.get(f"/rollouts/{ids[-1]}", headers=cookie)).status == 200
            assert ids[-2] not in app._shared and ids[-1] in app._shared
            assert len(app._shared) == viewer_app.KEPT_SHARED - 1
            app.close()

    asyncio.run(watch())


def test_what_was_drawn_for_the_open_pages_goes_when_the_last_one_closes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s43rev3 Low 2: the drawings and events the open pages share (``_drawn``, ``_events``)
    stayed after every page had closed, each drawing with its snapshot. They go when the last
    open stream ends, not before: a page still open keeps its own. So do (issue 15) the
    snapshot they shared, the rows and timelines drawn (``pages.DRAWN``) and what the reader
    kept for the pages' next reads (their node records, timelines and node views)."""
    monkeypatch.setattr(viewer_app, "SHARED_SECONDS", 60.0)
    monkeypatch.setattr(pages, "DRAWN", pages.Drawn())
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    start_rollout(schema, "r1", Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)

    async def until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(30):
            while not done():
                await asyncio.sleep(0.05)

    async def watch() -> None:
        closing = asyncio.Event()
        app = viewer_of(reader, grants, closing=closing)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            opened = []
            for lang in ("en", "de"):
                response = await client.get(f"/events?lang={lang}", headers=cookie)
                assert (await next_event(response.content, bytearray()))[0] == "update"
                opened.append(response)
            assert len(app._drawn) == 2 and app._events
            opened[0].close()
            await until(lambda: app._streams.total() == 1)
            assert len(app._drawn) == 2 and app._events  # the other page's
            assert app._shared and pages.DRAWN._rows and pages.DRAWN._details
            assert reader._page_nodes and reader._timelines
            assert schema._http_kept is not None  # who is still on http (review s63 v1 M2)
            opened[1].close()
            await until(lambda: not app._streams)
            assert not app._drawn and not app._events
            assert not app._shared and not pages.DRAWN._rows and not pages.DRAWN._details
            assert not reader._page_nodes and not reader._timelines
            assert schema._http_kept is None
            page = await client.get("/", headers=cookie)  # drawn again, as it was
            assert page.status == 200 and 'data-node="a"' in await page.text()
            closing.set()
            app.close()

    asyncio.run(watch())


def test_what_a_read_puts_back_with_no_page_open_goes_too(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s44rev3 L7: what the last stream's end forgot came back from a read under way
    then (a new page's GET), and a GET of a page that never opens its stream (no JavaScript,
    a scripted check) kept it too, until some later stream ended. Now it goes again once no
    stream is open and no read is under way, ``SHARED_SECONDS`` after (a short one here; the
    test waits for what is kept to be empty, bounded, and counts the reads: none of them is
    held up or repeated by it)."""
    monkeypatch.setattr(viewer_app, "SHARED_SECONDS", 0.05)
    monkeypatch.setattr(pages, "DRAWN", pages.Drawn())
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    start_rollout(schema, "r1", Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    real_read = reader.read
    entered, release = threading.Event(), threading.Event()
    reads: list[str | None] = []

    def read(rollout_id: str | None = None, **kw: Any) -> Snapshot:
        reads.append(rollout_id)
        if rollout_id == "r1" and not release.is_set():  # the GET under way: held here
            entered.set()
            assert release.wait(30)
        return real_read(rollout_id, **kw)

    monkeypatch.setattr(reader, "read", read)
    put: list[str | None] = []

    class Shared(collections.OrderedDict[str | None, Any]):
        """``ViewerApp._shared``, noting each snapshot put in (whether one was put back
        cannot be seen by looking after: it may be forgotten again by then)."""

        def __setitem__(self, key: str | None, value: Any) -> None:
            put.append(key)
            super().__setitem__(key, value)

    def kept(app: ViewerApp) -> list[str]:
        return [
            name
            for name, what in (
                ("shared", app._shared),
                ("rows", pages.DRAWN._rows),
                ("details", pages.DRAWN._details),
                ("page nodes", reader._page_nodes),
                ("timelines", reader._timelines),
                ("who is on http", schema._http_kept),
            )
            if what
        ]

    async def until(app: ViewerApp, done: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(30):
                while not done():
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"{what}: still kept {kept(app)}") from None

    async def watch() -> None:
        closing = asyncio.Event()
        app = viewer_of(reader, grants, closing=closing)
        app._shared = Shared()
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            # A GET of the page, its stream never opened.
            page = await client.get("/", headers=cookie)
            assert page.status == 200 and 'data-node="a"' in await page.text()
            assert put == [None] and pages.DRAWN.count  # read and drawn (and kept: until…)
            await until(app, lambda: not kept(app), "a page whose stream never opened")

            # A GET under way as the last stream ends.
            stream = await client.get("/events", headers=cookie)
            assert (await next_event(stream.content, bytearray()))[0] == "update"
            opening = asyncio.ensure_future(client.get("/rollouts/r1", headers=cookie))
            assert await asyncio.to_thread(entered.wait, 30)
            stream.close()
            await until(app, lambda: not app._streams, "the stream's end")
            assert not kept(app)  # forgotten at the end of the last stream
            put.clear()
            release.set()
            page = await opening
            assert page.status == 200 and 'data-node="a"' in await page.text()
            assert put == ["r1"]  # put back by the read under way
            await until(app, lambda: not kept(app), "a read under way as the last stream ended")
            assert reads.count("r1") == 1  # (read once: forgetting reads nothing)
            closing.set()
            app.close()
            # Review s44rev5 L4: streams end after the leader's ``close``, each asking for
            # the timer: none is set after it.
            app._forget_later()
            assert app._forgetting is None

    asyncio.run(watch())


def test_requests_for_the_api_and_the_metrics_read_the_store_one_at_a_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s67 M1: ``/api/v1/schema`` reads every stored rollout whole under the store's
    one lock (~0.1 s at ten 500-node rollouts, growing with each), and each request read for
    itself: one session's browser or script, a request per connection (16), held the lock
    the rollout engine and the agents' heartbeats write under nearly all the time. Now such
    reads run one at a time, and the requests that came while one ran take what the next
    one reads (review s67 viewer L2: not what the one under way reads, which began before
    they came); ``/metrics`` likewise."""
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    start_rollout(schema, "r1", Change.ENABLE_TLS)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    counted = threading.Lock()
    inside = most = 0
    reads: list[str] = []
    looks = 0  # sessions looked up: one per request, before its handler runs
    look = grants.session

    def looked(*args: Any) -> Any:
        nonlocal looks
        found = look(*args)
        with counted:
            looks += 1
        return found

    monkeypatch.setattr(grants, "session", looked)
    read = reader.read
    loop: asyncio.AbstractEventLoop | None = None
    requests = 6

    def settled() -> None:
        """(In the read's thread) until every request has reached its handler, its session
        looked up and the loop past it, or a second read has begun beside this one."""
        assert loop is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with counted:
                if inside > 1:
                    return
                if looks >= requests:
                    break
            time.sleep(0.01)
        for _ in range(20):  # the loop runs what the last lookups woke
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=10)
            with counted:
                if inside > 1:
                    return

    def reading(*args: Any, **kwargs: Any) -> Snapshot:
        nonlocal inside, most
        with counted:
            inside += 1
            most = max(most, inside)
            reads.append("api" if kwargs.get("every") else "metrics")
            first = len(reads) == 1
        try:
            if first:
                settled()
            return read(*args, **kwargs)
        finally:
            with counted:
                inside -= 1

    monkeypatch.setattr(reader, "read", reading)

    async def ask() -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        app = viewer_of(reader, grants)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}

            async def get(path: str) -> tuple[int, bytes]:
                response = await client.get(path, headers=cookie)
                return response.status, await response.read()

            paths = ["/api/v1/schema", "/metrics"] * (requests // 2)
            answers = await asyncio.wait_for(asyncio.gather(*(get(p) for p in paths)), 60)
            app.close()
        assert [status for status, _ in answers] == [200] * requests
        api = {body for (_, body), path in zip(answers, paths, strict=True) if path[1] == "a"}
        assert len(api) == 1 and b'"r1"' in next(iter(api))
        assert most == 1, f"{most} reads at once"
        # The first request's read, then one of each for the others (they came during it).
        assert len(reads) == 3 and sorted(reads[1:]) == ["api", "metrics"], reads

    asyncio.run(ask())


def test_a_request_that_came_after_a_read_began_takes_a_read_of_its_own(store: Store) -> None:
    """Review s67 viewer L2: ``/api/v1/schema`` and ``/metrics`` share a read among the
    requests that waited for it (``_one_at_a_time``), by the store's ``commits``: a request
    that came after the read had begun (even after it ended, while others still waited) took
    it too, though what the read shows of the leader's memory (who is online, heartbeat
    ages) is not in ``commits``. Now a request takes a read only if it came before that read
    began; those that came during a read share the next one."""
    schema = SchemaStore(store.db)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    reads: list[int] = []
    began = [asyncio.Event() for _ in range(4)]
    done = [asyncio.Event() for _ in range(4)]

    async def make() -> bytes:
        n = len(reads)
        reads.append(n)
        began[n].set()
        await done[n].wait()
        return f"read {n}".encode()

    async def ask() -> None:
        app = viewer_of(reader, Grants(store.db))

        def request() -> asyncio.Task[bytes]:
            return asyncio.create_task(app._one_at_a_time("api", make))

        async def waiting(count: int) -> None:
            for _ in range(1000):  # (the tasks' first steps: each counts itself in)
                if app._heavy_waiting == count:
                    return
                await asyncio.sleep(0)
            raise AssertionError(f"{app._heavy_waiting} requests waiting, not {count}")

        first = request()
        await asyncio.wait_for(began[0].wait(), 10)
        during = [request(), request()]  # came while read 0 ran
        await waiting(3)
        done[0].set()
        assert await asyncio.wait_for(first, 10) == b"read 0"
        # One of those two makes the next read; before the fix both took read 0 at once.
        second = asyncio.create_task(began[1].wait())
        await asyncio.wait([second, *during], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        finished = [t.result() for t in during if t.done()]
        assert not finished, f"came after read 0 began, and took {finished}"
        assert second.done()
        late = request()  # came while read 1 ran: not read 1's
        await waiting(3)
        done[1].set()
        assert await asyncio.wait_for(asyncio.gather(*during), 10) == [b"read 1"] * 2
        await asyncio.wait_for(began[2].wait(), 10)
        after = [request(), request()]  # came while read 2 ran (``late``'s): share read 3
        await waiting(3)
        done[2].set()
        assert await asyncio.wait_for(late, 10) == b"read 2"
        await asyncio.wait_for(began[3].wait(), 10)
        done[3].set()
        assert await asyncio.wait_for(asyncio.gather(*after), 10) == [b"read 3"] * 2
        assert reads == [0, 1, 2, 3]
        assert app._heavy_read == {}  # nothing kept once none waits
        app.close()

    asyncio.run(ask())


# --- words and frames ----------------------------------------------------------------------------


def test_both_languages_have_every_text_state_and_change() -> None:
    assert set(TEXTS["de"]) == set(TEXTS["en"])
    for lang in LANGS:
        assert set(STATES[lang]) == {s.value for s in (*NodeState, *RolloutState)}
        assert set(CHANGES[lang]) == {c.value for c in Change}
    assert pick_lang(None, None) == "de" and pick_lang("en", "de") == "en"
    assert pick_lang("fr", "en") == "en" and pick_lang("xx", "yy") == "de"
    de, en = Words.of("de"), Words.of("en")
    assert de.state("needs_attention") == "braucht Aufmerksamkeit"
    # needs_attention is also an agent cut off during its switch (s50): no way back ran then,
    # so the alert does not say it failed (review rev50d L2)
    assert "gesperrt" in de("attention", nodes="b") and "cut off" in en("attention", nodes="b")
    assert en.change("enable-tls") == "switch to https"
    assert de.seconds(2.25) == "2,2 s" and en.seconds(2.25) == "2.2 s"
    start, end = "2026-11-30T09:00:00+00:00", "2026-11-30T09:00:03.500000+00:00"
    assert de.window(start, end).endswith("(3,5 s)") and de.window(None, None) == "–"
    assert de.window(start, end, 2.0).endswith("(2,0 s)")  # the agent's measure
    assert en.window(end, start).endswith("(0.0 s)")  # a clock stepped back: never below 0


def test_a_server_sent_event_keeps_every_line_of_its_data() -> None:
    assert sse("update", "<p>\r\na\n</p>") == b"event: update\ndata: <p>\ndata: a\ndata: </p>\n\n"
    assert sse("unauthorized", "") == b"event: unauthorized\ndata: \n\n"


def live_of(servers: dict[str, str], name: str) -> str:
    """A ``Reader.live_server``: each node's server as its latest heartbeat said it."""
    return servers.get(name, "")


def test_a_retry_that_left_out_nodes_removed_since_says_so_on_the_page_and_in_the_api(
    store: Store,
) -> None:
    """A retry (or a way back of a named rollout) that left out nodes removed since (`tlsroll
    nodes remove`) stores them with itself (``RolloutMeta.removed_since``, s51leftout); they
    are no rows of its nodes' table, so the page said nothing of them. Its heading says beside
    the state which nodes it left out and why, in both languages, and the API names them."""
    schema = SchemaStore(store.db)
    rollout, records = planner.plan_rollout(
        rollout_id="re1",
        change=Change.ENABLE_TLS,
        scope=Scope.of_nodes(["a"]),
        enrolled={"a": True},
        leader="a",
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(
        created_at=NOW, started_by="admin:test", leader_node="a", removed_since=("b", "c")
    )
    row = schema.create(rollout.with_event(RolloutEvent.START), records, meta, NOW)
    drive_rollout(schema, row)  # (a done; the retry completed)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    (api,) = reader.read(every=True).data["rollouts"]  # /api/v1/schema
    assert api["removed_since"] == ["b", "c"]
    page = reader.read(clients=False, page=True)
    assert page.removed_since == ("b", "c") and page.left_out == ()
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, beside in (
        ("de", "2 Knoten ausgelassen, seither entfernt: b, c"),
        ("en", "2 nodes left out, removed since: b, c"),
    ):
        html = pages.schema_content(page, Words.of(lang), context)
        (heading,) = re.findall(r'<h2 id="rollout-h">(.*?)</h2>', html, re.S)
        assert 'data-removed-since="b c"' in heading, heading
        text = " ".join(unescape(re.sub(r"<[^>]+>", "", heading)).split())
        assert text.endswith(beside), text
    # A rollout that left none out says nothing of it.
    run_rollout(schema, "plain", Change.ENABLE_TLS)
    later = reader.read(page=True, clients=False)
    assert later.removed_since == ()
    html = pages.schema_content(later, Words.of("en"), context)
    assert "data-removed-since" not in html and "removed since" not in html


def test_a_finalize_that_left_a_node_out_says_so_on_the_page_and_in_the_api(
    store: Store,
) -> None:
    """Review s48rev5 L3: a finalize that left out node b (its agent cut off: it still
    serves http and https) showed plain "completed" on the page; only b's reason said it.
    As for a way back's nodes left as is: the heading says beside the state which node it
    left out, in both languages, and the API names it."""
    schema = SchemaStore(store.db)
    rollout, records = planner.plan_rollout(
        rollout_id="fin1",
        change=Change.FINALIZE,
        scope=Scope.of_nodes(["a", "b"]),
        enrolled={"a": True, "b": False},
        leader="a",
        epoch=schema.next_epoch(),
        finalizes="t1",
        left_out={"b": left_out_reason("b")},
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    row = schema.create(rollout.with_event(RolloutEvent.START), records, meta, NOW)
    for event in (
        NodeEvent.START,
        NodeEvent.PREFLIGHT_PASSED,
        NodeEvent.STAGE_SKIPPED,
        NodeEvent.SWITCH,
        NodeEvent.SWITCH_DONE,
        NodeEvent.CONFIRM_DONE,
    ):
        moved = [r.with_event(event) if r.name == "a" else r for r in row.records]
        row = schema.save_states(row, row.rollout, moved, NOW, "engine")
    done = row.rollout.with_event(RolloutEvent.NODES_SETTLED)
    schema.save_states(row, done, row.records, NOW, "engine")

    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    (api,) = reader.read(every=True).data["rollouts"]  # /api/v1/schema
    assert (api["state"], api["left_out"], api["left_as_is"]) == ("completed", ["b"], [])
    page = reader.read(clients=False, page=True)
    assert page.left_out == ("b",) and reader.read().left_out == ("b",)
    assert page.left_as_is == ()
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, beside in (
        ("de", "abgeschlossen, 1 Knoten ausgelassen: b"),
        ("en", "completed, 1 node left out: b"),
    ):
        html = pages.schema_content(page, Words.of(lang), context)
        (heading,) = re.findall(r'<h2 id="rollout-h">(.*?)</h2>', html, re.S)
        assert 'class="badge state-left_out"' in heading, heading
        text = " ".join(unescape(re.sub(r"<[^>]+>", "", heading)).split())
        assert text.endswith(beside), text
        (b_row,) = re.findall(r'<tr id="node-b".*?</tr>', html, re.S)
        assert left_out_reason("b") in unescape(b_row)
    # A finalize that left none out says nothing of it.
    run_rollout(schema, "fin2", Change.FINALIZE)
    later = reader.read(page=True, clients=False)
    assert later.selected is not None and later.selected["id"] == "fin2"
    assert later.left_out == () and later.selected["left_out"] == []
    html = pages.schema_content(later, Words.of("en"), context)
    assert "left out" not in html and "state-left_out" not in html


def always(value: bool, _heard: object) -> bool:
    """A ``Reader.online`` that says ``value`` of every node."""
    return value


def test_a_way_back_that_left_a_node_as_is_says_so_on_the_page_and_in_the_api(
    store: Store,
) -> None:
    """Review s45rev9 L3: a way back (disable-tls) that went past a node whose agent was off
    showed "completed" on the page, as if every node were back on http. The heading says
    beside the state which node it left as is, an alert says the way back is not complete
    and where to read what to do (the node's reason, in its row), in both languages; the
    API (`schema show --json`'s data) names the node; a page's read shows what a whole read
    does."""
    schema = SchemaStore(store.db)
    rollout, records = planner.plan_rollout(
        rollout_id="back1",
        change=Change.DISABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": False},
        leader="a",
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    row = schema.create(rollout.with_event(RolloutEvent.START), records, meta, NOW)
    for event in (
        NodeEvent.START,
        NodeEvent.PREFLIGHT_PASSED,
        NodeEvent.STAGE_DONE,
        NodeEvent.SWITCH,
        NodeEvent.SWITCH_DONE,
        NodeEvent.CONFIRM_DONE,
    ):
        moved = [r.with_event(event) if r.name == "a" else r for r in row.records]
        row = schema.save_states(row, row.rollout, moved, NOW, "engine")
    done = row.rollout.with_event(RolloutEvent.NODES_SETTLED)
    schema.save_states(row, done, row.records, NOW, "engine")
    left = "offline: left as is: run tlsroll rollout rollback again once its agent is back"

    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    whole = reader.read(every=True)  # /api/v1/schema
    (api,) = whole.data["rollouts"]
    assert (api["state"], api["left_as_is"]) == ("completed", ["b"])
    page = reader.read(clients=False, page=True)
    assert page.left_as_is == ("b",) and reader.read().left_as_is == ("b",)
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, beside, alert in (
        ("de", "abgeschlossen, 1 Knoten unverändert gelassen: b", "Der Rückweg ist nicht"),
        ("en", "completed, 1 node left as is: b", "The way back is not complete. Left as is"),
    ):
        words = Words.of(lang)
        html = pages.schema_content(page, words, context)
        assert html == pages.schema_content(reader.read(), words, context)
        (heading,) = re.findall(r'<h2 id="rollout-h">(.*?)</h2>', html, re.S)
        text = " ".join(unescape(re.sub(r"<[^>]+>", "", heading)).split())
        assert text.endswith(beside), text
        (said,) = re.findall(r'<div class="alert"[^>]*data-left-as-is="b"[^>]*>(.*?)</div>', html)
        assert alert in unescape(said) and ": b." in unescape(said)
        (b_row,) = re.findall(r'<tr id="node-b".*?</tr>', html, re.S)
        assert left in unescape(b_row)
    # Review s46rev3 M1: the node left as is was on http all along. Seen on http since (its
    # heartbeat's server, online), it leaves the alert (a later `rollout rollback` has nothing
    # to do and makes no newer rollout, so the alert stayed for good); the heading keeps what
    # the way back did. Seen on https, down, or offline, it stays in the alert.
    enrol(store, ["a", "b"])  # (the nodes the leader hears from)
    for live, online, alerted in (
        ("http", True, ()),
        ("http frozen", True, ()),
        ("https", True, ("b",)),
        ("down: the managed server: connection refused", True, ("b",)),
        ("http", False, ("b",)),
    ):
        reader.live_server = functools.partial(live_of, {"b": live})
        reader.online = functools.partial(always, online)
        snap = reader.read(clients=False, page=True)
        assert (snap.left_as_is, snap.still_left) == (("b",), alerted), (live, online)
        html = pages.schema_content(snap, Words.of("en"), context)
        assert ("data-left-as-is" in html) is bool(alerted), (live, online)
        (heading,) = re.findall(r'<h2 id="rollout-h">(.*?)</h2>', html, re.S)
        text = " ".join(unescape(re.sub(r"<[^>]+>", "", heading)).split())
        assert text.endswith("completed, 1 node left as is: b"), text
    reader.live_server, reader.online = None, lambda _: True
    # A way back that took every node back says nothing of it.
    run_rollout(schema, "back2", Change.DISABLE_TLS)
    later = reader.read(page=True, clients=False)
    assert later.selected is not None and later.selected["id"] == "back2"
    assert later.left_as_is == () and later.selected["left_as_is"] == []
    html = pages.schema_content(later, Words.of("en"), context)
    assert "left as is" not in html and "data-left-as-is" not in html


def test_the_way_back_s_alert_leaves_out_a_node_cut_off(store: Store) -> None:
    """s50: a way back that left node b as is because its agent is cut off (its certificate
    revoked: a machine lost or stolen) kept b in the page's "the way back is not complete"
    alert for good: b never comes back on http, its reason says to remove it. The alert
    leaves it out (here: no alert); the heading still says b was left as is, and b's row
    gives its reason. A node merely offline stays in the alert (the test above)."""
    schema = SchemaStore(store.db)
    rollout, records = planner.plan_rollout(
        rollout_id="back1",
        change=Change.DISABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"a": True, "b": False},
        leader="a",
        epoch=schema.next_epoch(),
        cut_off={"b"},
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="a")
    row = schema.create(rollout.with_event(RolloutEvent.START), records, meta, NOW)
    for event in (
        NodeEvent.START,
        NodeEvent.PREFLIGHT_PASSED,
        NodeEvent.STAGE_DONE,
        NodeEvent.SWITCH,
        NodeEvent.SWITCH_DONE,
        NodeEvent.CONFIRM_DONE,
    ):
        moved = [r.with_event(event) if r.name == "a" else r for r in row.records]
        row = schema.save_states(row, row.rollout, moved, NOW, "engine")
    done = row.rollout.with_event(RolloutEvent.NODES_SETTLED)
    schema.save_states(row, done, row.records, NOW, "engine")

    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for snap in (reader.read(clients=False, page=True), reader.read()):
        assert (snap.left_as_is, snap.cut_off, snap.still_left) == (("b",), ("b",), ())
        for lang in ("de", "en"):
            html = pages.schema_content(snap, Words.of(lang), context)
            assert "data-left-as-is" not in html and 'class="alert"' not in html, html
            (b_row,) = re.findall(r'<tr id="node-b".*?</tr>', html, re.S)
            assert left_cut_off("b") in unescape(b_row)
        html = pages.schema_content(snap, Words.of("en"), context)
        (heading,) = re.findall(r'<h2 id="rollout-h">(.*?)</h2>', html, re.S)
        text = " ".join(unescape(re.sub(r"<[^>]+>", "", heading)).split())
        assert text.endswith("completed, 1 node left as is: b"), text


def report_clients(schema: SchemaStore, node: str, clients: Sequence[Client]) -> None:
    """Node ``node``'s client report of ``clients`` at NOW: the reference server's, the agent's
    window an hour, no problem."""
    schema.record_clients(
        node, clients, window_seconds=3600, source="refserver", problem="", now=NOW
    )


def test_a_page_reads_the_https_sightings_an_unnamed_http_one_is_judged_against(
    store: Store,
) -> None:
    """Session 68: an unnamed http sighting is judged against the https ones from its address
    and those of the one name seen from it, wherever from (``clients.https_matches``); a
    page's own query reads them all, and only what it needs: it has who is still on http as
    the whole read has it."""
    enrol(store, ["a"])
    schema = SchemaStore(store.db)
    t = NOW - dt.timedelta(minutes=10)
    m = dt.timedelta(minutes=1)
    report_clients(
        schema,
        "a",
        [
            # Named from its address on https only; its name's https from another address
            # began before its last http request: on http.
            Client("a", "http", "10.2.0.1", "", t, t + 3 * m, 1),
            Client("a", "https", "10.2.0.1", "ws-roam", t + 5 * m, t + 6 * m, 1),
            Client("a", "https", "10.2.0.9", "ws-roam", t + m, t + 2 * m, 1),
            # Named from its address on http (the header), on https from another: moved.
            Client("a", "http", "10.2.0.2", "", t, t, 1),
            Client("a", "http", "10.2.0.2", "ws-head", t, t, 1),
            Client("a", "https", "10.2.0.8", "ws-head", t + m, t + 2 * m, 1),
            # Two names from the address: its unnamed https only (which began before): on http.
            Client("a", "http", "10.2.0.3", "", t, t + 3 * m, 1),
            Client("a", "https", "10.2.0.3", "", t + m, t + 2 * m, 1),
            Client("a", "https", "10.2.0.3", "ws-x", t + 5 * m, t + 6 * m, 1),
            Client("a", "https", "10.2.0.3", "ws-y", t + 5 * m, t + 6 * m, 1),
            # Not judged against by anyone: a page's read leaves it out.
            Client("a", "https", "10.2.0.7", "ws-other", t, t, 1),
        ],
    )
    reader = Reader(
        store, schema, lambda: NOW, lambda _: True, [], fresh=lambda i, _n: frozenset(i)
    )
    whole = reader.read(times=True)
    part = reader.read(clients=False, page=True)
    assert sorted((c.address, c.workstation) for c in whole.still_on_http) == [
        ("10.2.0.1", ""),
        ("10.2.0.3", ""),
    ]
    assert part.still_on_http == whole.still_on_http
    with store.db.read() as db:
        read = {(c.scheme, c.address, c.workstation) for c in _http_clients(db)}
    assert ("https", "10.2.0.7", "ws-other") not in read and len(read) == 10, read


def test_a_page_counts_who_is_still_on_http_only_in_a_rollout_that_takes_http_away(
    store: Store,
) -> None:
    """Session 68 (``schema_view.COUNTS_ON_HTTP``): a node's "still on http" count is shown
    only in an enable-tls rollout or a finalize, in `schema show` and in the viewer alike. The
    page's own rows (``Reader._page_data``) counted it in every rollout: a rotate-cert's (or
    a way back's) node showed "1 still on http" on the page and "-" in `schema show`
    (closing review of s68, 2)."""
    enrol(store, ["a", "b"])
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)
    start_rollout(schema, "r2", Change.ROTATE_CERT)
    seen = NOW - dt.timedelta(minutes=1)
    report_clients(schema, "a", [Client("a", "http", "10.1.0.1", "ws-empfang", seen, seen, 1)])
    reader = Reader(
        store, schema, lambda: NOW, lambda _: True, [], fresh=lambda i, _n: frozenset(i)
    )
    for rollout_id, count in (("r1", 1), ("r2", 0)):
        whole = reader.read(rollout_id)
        part = reader.read(rollout_id, clients=False, page=True)
        assert whole.selected is not None and part.selected is not None
        shown = {n["name"]: n.get("still_on_http", 0) for n in whole.selected["nodes"]}
        assert shown == {"a": count, "b": 0}, (rollout_id, shown)  # as `schema show --json`
        rows = {n["name"]: n.get("still_on_http", 0) for n in part.selected["nodes"]}
        assert rows == shown, (rollout_id, rows)
        html = pages.schema_content(
            part, Words.of("en"), pages.PageContext("127.0.0.1", "test", NOW, "/events")
        )
        (row,) = re.findall(r'<tr id="node-a".*?</tr>', html, re.S)
        assert ("1 still on http" in row) is (count == 1), (rollout_id, row)
        assert len(part.still_on_http) == 1  # the section lists it whatever the rollout


def test_a_page_reads_who_is_still_on_http_as_schema_show_and_lists_every_other_node(
    store: Store,
) -> None:
    """Review s63 M1, M3: a page's read (``page``, without the client lists: issue 15) has
    who is still on http as the whole read and `schema show` have it (its own query reads
    only the http sightings and the https ones of the same workstations, and those an
    unnamed http one is judged against: session 68), drawn in its
    section, counted in each row and per node in the metrics; and every enrolled node not in
    the selected rollout in the "other nodes" table, with its server's scheme by its
    heartbeat and the last rollout it was in."""
    enrol(store, ["a", "b", "c"])
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)  # nodes a and b
    start_rollout(schema, "r2", Change.ROTATE_CERT, ("a", "c"))
    seen = NOW - dt.timedelta(minutes=1)
    later = NOW - dt.timedelta(seconds=10)
    report_clients(
        schema,
        "a",
        [
            Client("a", "http", "10.1.0.1", "ws-empfang", seen, later, 5),  # stays on http
            Client("a", "http", "10.1.0.2", "ws-labor", seen, seen, 2),  # switched
            Client("a", "https", "10.1.0.2", "ws-labor", later, later, 3),
            Client("a", "http", "10.1.0.3", "", seen, seen, 1),  # no name: by its address
            Client("a", "https", "10.1.0.9", "ws-kasse", seen, later, 4),  # https only
            # No name on http, its certificate's on https since: switched (session 68).
            Client("a", "http", "10.1.0.6", "", seen, seen, 1),
            Client("a", "https", "10.1.0.6", "ws-rezept", later, later, 1),
        ],
    )
    report_clients(schema, "c", [Client("c", "http", "10.1.0.4", "ws-c", seen, later, 1)])
    report_clients(schema, "b", [Client("b", "https", "10.1.0.5", "ws-b", seen, later, 1)])
    reader = Reader(
        store, schema, lambda: NOW, lambda _: True, [], fresh=lambda i, _n: frozenset(i)
    )
    servers = {"a": "https", "b": "https", "c": "http"}
    reader.live_server = lambda name: servers.get(name, "")
    whole = reader.read(times=True)
    part = reader.read("r1", clients=False, page=True)
    expected = [
        ("a", "10.1.0.1", "ws-empfang"),
        ("a", "10.1.0.3", ""),
        ("c", "10.1.0.4", "ws-c"),
    ]
    assert [(c.node, c.address, c.workstation) for c in whole.still_on_http] == expected
    assert part.still_on_http == whole.still_on_http
    listed = {
        (v.node, c.address) for v in whole.schema.node_clients for c in v.still_on_http
    }  # what `schema show` lists
    assert listed == {(n, a) for n, a, _ in expected}
    assert not part.schema.node_clients  # no client lists in a page's data
    assert part.selected is not None and part.selected["id"] == "r1"
    rows = {n["name"]: n for n in part.selected["nodes"]}
    assert rows["a"]["still_on_http"] == 2 and not rows["b"].get("still_on_http")
    assert [n.name for n in part.other_nodes] == ["c"]
    assert part.last_rollouts == {"c": "r2"}
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, heading, count in (
        ("de", "Noch auf http", "2 noch auf http"),
        ("en", "Still on http", "2 still on http"),
    ):
        html = pages.schema_content(part, Words.of(lang), context)
        (section,) = re.findall(r'<section id="still-on-http".*?</section>', html, re.S)
        assert heading in section and 'data-count="3"' in section
        assert 'data-node="a" data-address="10.1.0.1" data-workstation="ws-empfang"' in section
        assert "ws-labor" not in section and "ws-kasse" not in section
        (row,) = re.findall(r'<tr id="node-a".*?</tr>', html, re.S)
        assert count in row
        (others,) = re.findall(r'<section id="other-nodes".*?</section>', html, re.S)
        assert '<tr data-node="c" data-scheme="http">' in others
        assert '<a href="/rollouts/r2">r2</a>' in others
        assert 'data-node="a"' not in others
        # The cluster is mixed (a, b on https, c on http): said, with how to finish (review
        # s69 revlocal M1: the page listed the schemes and said neither).
        (mixed,) = re.findall(r'<p class="mixed" data-nodes="c">.*?</p>', others, re.S)
        assert "<code>tlsroll plan --nodes c</code>" in mixed
        assert "<code>tlsroll rollout start --nodes c</code>" in mixed
        assert ("A mixed cluster: c on http" if lang == "en" else "Gemischter") in mixed
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(whole).decode())}
    gauge = {s.labels["node"]: s.value for s in families["tlsroll_still_on_http"].samples}
    assert gauge == {"a": 2, "b": 0, "c": 1}
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]


def test_the_page_says_the_rest_of_a_large_mixed_cluster_as_tlsroll_nodes_does(
    store: Store,
) -> None:
    """Review s69 revlocal2 L4: the other-nodes section put every node on http into one
    `--nodes a,b,…` (at 200 nodes one unreadable command). Beyond ten it names ten and counts
    the rest, and gives `--scope cluster` as `tlsroll nodes` and `schema show` do
    (``leader.mixed_cluster``), with the nodes not known now that it takes in too."""
    names = [f"n{i:02}" for i in range(1, 15)]
    enrol(store, names)
    schema = SchemaStore(store.db)
    servers = {"n01": "https", "n14": "", **{n: "http" for n in names[1:13]}}
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=lambda i, _n: frozenset())
    reader.live_server = lambda name: servers.get(name, "")
    # n01 serves a server certificate of this CA: a cluster enable-tls leaves it alone.
    store.record_certificate(
        IssuedCert("a1", "server", "n01", "n01", "sha256:n01", NOW, NOW + dt.timedelta(9)),
        actor="test",
        now=NOW,
    )
    reader.served_reported = lambda: {"n01": "sha256:n01"}
    part = reader.read(clients=False, page=True)
    # /api/v1/schema (the whole read) has the schema's mixed_cluster, as `schema show --json`.
    m = reader.read().schema.mixed_cluster
    assert (list(m.on_http), list(m.on_https), list(m.unknown)) == (names[1:13], ["n01"], ["n14"])
    assert not part.schema.HasField("mixed_cluster")  # (a page draws its own)
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, said in (
        ("en", "A mixed cluster: n02, n03, n04, n05, n06, n07, n08, n09, n10, n11 and 2 more on"),
        ("de", "Gemischter Multiserver: n02, n03, n04, n05, n06, n07, n08, n09, n10, n11 und 2 "),
    ):
        html = pages.schema_content(part, Words.of(lang), context)
        (mixed,) = re.findall(r'<p class="mixed" data-nodes="n02,.*?,n13">.*?</p>', html, re.S)
        assert said in " ".join(mixed.split()), mixed
        assert "<code>tlsroll plan --scope cluster</code>" in mixed
        assert "<code>tlsroll rollout start --scope cluster</code>" in mixed
        assert "--nodes" not in mixed.replace("with --nodes", "").replace("mit --nodes", "")
        assert ("not known now" if lang == "en" else "nicht bekannt") in mixed


def test_the_page_says_a_cluster_rollout_only_where_it_leaves_the_nodes_on_https_alone(
    store: Store,
) -> None:
    """Review of s69 (closing, M): beyond ten nodes on http the page said `--scope cluster`
    ("a cluster rollout leaves the nodes on https already alone") also with a dual node (the
    cluster enable-tls is refused) or one on https with a certificate not of this CA (it would
    be replaced). The page gives the first ten by name and "the next 10 the same way", names
    the dual node with its own way and the other one as left out, as `tlsroll nodes` says."""
    names = [f"n{i:02}" for i in range(1, 15)]
    enrol(store, names)
    schema = SchemaStore(store.db)
    servers = {"n01": "http+https", "n14": "https", **{n: "http" for n in names[1:13]}}
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=lambda i, _n: frozenset())
    reader.live_server = lambda name: servers.get(name, "")
    reader.served_reported = lambda: {"n14": "sha256:" + "ab" * 32}  # not of this CA
    # The phase 1 that left n01 on http and https, named by its id (session 69 said "the
    # rollout that left them so" and named none).
    from leader.mixed_cluster import dual_left_by
    from leader.rollout_enums import Strategy

    rollout, nodes = planner.plan_rollout(
        rollout_id="p1",
        change=Change.ENABLE_TLS,
        scope=Scope.of_nodes(("n01",)),
        enrolled=dict.fromkeys(names, True),
        leader="n01",
        epoch=schema.next_epoch(),
        strategy=Strategy.TRANSITIONAL,
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="n01")
    schema.create(rollout.with_event(RolloutEvent.START), nodes, meta, NOW)
    assert schema.left_dual(["n01", "n02"]) == {"n01": "p1"}
    part = reader.read(clients=False, page=True)
    whole = reader.read().schema  # /api/v1/schema, as `schema show --json`
    m = whole.mixed_cluster
    assert (list(m.dual), list(m.other_certificate)) == (["n01"], ["n14"])
    # what `schema show` and `tlsroll nodes` find the same rollout by, in that JSON's form
    assert dual_left_by(m.dual, wire.to_dict(whole)["rollouts"]) == {"n01": "p1"}
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    batch = "--nodes " + ",".join(names[1:11])
    for lang, said in (
        ("en", ("</code>, then the next 10 of them", "phase 1 leaves a node: n01.",
                "tlsroll rollout finalize p1, or tlsroll rollout retry p1 (the rollout",
                "not of this cluster&#39;s CA: n14.")),
        ("de", ("</code>, dann die nächsten 10 ebenso", "einen Knoten lässt: n01.",
                "tlsroll rollout finalize p1 oder tlsroll rollout retry p1 (der Rollout",
                "der CA dieses Multiservers ist: n14.")),
    ):  # fmt: skip
        html = pages.schema_content(part, Words.of(lang), context)
        (mixed,) = re.findall(r'<p class="mixed" data-nodes="n02,.*?,n13">.*?</p>', html, re.S)
        mixed = " ".join(mixed.split())
        assert f"<code>tlsroll plan {batch}</code>" in mixed, mixed
        assert f"<code>tlsroll rollout start {batch}</code>" in mixed, mixed
        assert "--scope cluster" not in mixed and "n12" not in mixed.split("</code>")[-1], mixed
        assert all(s in mixed for s in said), mixed


def on_http_report(
    schema: SchemaStore, node: str, workstations: Sequence[str], seen: dt.datetime
) -> None:
    """Node ``node``'s client report: each of ``workstations`` on http, last seen at ``seen``
    (10.2.x.y by its place), the agent's window an hour."""
    schema.record_clients(
        node,
        [
            Client(node, "http", f"10.2.{i // 200}.{i % 200 + 1}", ws, seen, seen, 1)
            for i, ws in enumerate(workstations)
        ],
        window_seconds=3600,
        source="refserver",
        problem="",
        now=seen,
    )


def test_a_page_s_read_of_who_is_on_http_is_kept_until_a_client_report_is_written(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s63 v1 M2: a page's read took who is still on http from SQLite at each read, and
    a page reads after each write of a rollout; during a transitional phase that is nearly
    every workstation (500 nodes: a read went from ~5 ms to ~30 ms). Kept now, until a client
    report is written (``record_clients``, the leader's group commit), a node removed, or
    another connection writes; judged against the reader's now at every read (a sighting
    past its window drops out without a read)."""
    from leader.schema_store import write_clients

    schema = SchemaStore(store.db)
    enrol(store, ["a", "b", "c"])
    row = start_rollout(schema, "r1", Change.ENABLE_TLS)  # nodes a and b
    on_http_report(schema, "a", ["ws-1"], NOW)
    on_http_report(schema, "c", ["ws-c"], NOW)
    clock = [NOW]
    reader = Reader(store, schema, lambda: clock[0], lambda _: True, [], fresh=none_fresh)
    reads: list[int] = []
    real = schema_store._http_clients

    def counted(db: sqlite3.Connection) -> list[Client]:
        reads.append(1)
        return real(db)

    monkeypatch.setattr(schema_store, "_http_clients", counted)

    def on_http() -> list[tuple[str, str]]:
        snap = reader.read(clients=False, page=True)
        return sorted((c.node, c.workstation) for c in snap.still_on_http)

    assert on_http() == [("a", "ws-1"), ("c", "ws-c")]
    assert len(reads) == 1
    for event in (NodeEvent.START, NodeEvent.PREFLIGHT_PASSED):  # a rollout's steps: routine
        records = [r.with_event(event) if r.name == "b" else r for r in row.records]
        row = schema.save_states(row, row.rollout, records, NOW, "engine")
        schema.update_detail("r1", "b", restart_seconds=1.0)
        assert on_http() == [("a", "ws-1"), ("c", "ws-c")]
    assert len(reads) == 1, "a rollout's steps read who is on http again"

    schema.record_clients(  # a report by its own transaction
        "a",
        [
            Client("a", "http", "10.2.0.1", "ws-1", NOW, NOW, 1),
            Client("a", "http", "10.2.0.2", "ws-2", NOW, NOW, 1),
        ],
        window_seconds=3600,
        source="refserver",
        problem="",
        now=NOW,
    )
    assert on_http() == [("a", "ws-1"), ("a", "ws-2"), ("c", "ws-c")]
    assert len(reads) == 2

    def queued(db: sqlite3.Connection) -> None:  # as ``LeaderService._record_clients``
        http = Client("b", "http", "10.2.0.9", "ws-b", NOW, NOW, 1)
        write_clients(db, "b", [http], window_seconds=3600, source="refserver", problem="", now=NOW)

    store.queue_write("b", queued)
    assert store.write_queued() == 1  # the group commit (routine)
    assert on_http() == [("a", "ws-1"), ("a", "ws-2"), ("b", "ws-b"), ("c", "ws-c")]
    assert len(reads) == 3

    store.remove_node("c", now=NOW, actor="admin:test")  # its report goes with it
    assert on_http() == [("a", "ws-1"), ("a", "ws-2"), ("b", "ws-b")]
    assert len(reads) == 4

    other = sqlite3.connect(tmp_path / "leader.sqlite3")  # another connection
    with other:
        other.execute("DELETE FROM node_clients WHERE workstation = 'ws-b'")
    other.close()
    assert on_http() == [("a", "ws-1"), ("a", "ws-2")]
    assert len(reads) == 5

    clock[0] = NOW + 2 * HOUR  # past the agents' window: judged against now, without a read
    assert on_http() == []
    assert len(reads) == 5
    fresh = Reader(store, schema, lambda: clock[0], lambda _: True, [], fresh=none_fresh)
    assert fresh.read(clients=False, page=True).still_on_http == ()


def test_who_is_on_http_is_drawn_again_when_someone_comes_or_goes_or_a_minute_later(
    store: Store,
) -> None:
    """Review s63 v1 M1: each node stores its client report at least every ~30 s, each moving
    its workstations' last-seen times; the section compared them, to the second, and was
    drawn again and sent whole at nearly every read (1000 workstations: 176 KiB a patch).
    A time that moved sends no patch of it now; who comes or goes does at once, and the
    times shown (to the minute) are drawn again once the minute of now moved."""
    schema = SchemaStore(store.db)
    enrol(store, ["a", "b"])
    start_rollout(schema, "r1", Change.ENABLE_TLS)
    seen = NOW - dt.timedelta(seconds=50)  # 08:59:10
    on_http_report(schema, "a", ["ws-1", "ws-2"], seen)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    snap = reader.read(clients=False, page=True)
    w = Words.of("en")
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    pages.DRAWN.clear()
    before = pages.content_parts(snap, w, context)

    def moved(by: dt.timedelta, now: dt.datetime, *extra: str) -> Snapshot:
        still = tuple(c._replace(last_seen=c.last_seen + by) for c in snap.still_on_http)
        added = tuple(snapshot.OnHttp("b", "10.3.0.1", ws, now) for ws in extra)
        return dataclasses.replace(snap, now=now, still_on_http=still + added)

    # the reports moved the times (one past a minute), now still within its minute: no patch
    later = moved(dt.timedelta(seconds=55), NOW + dt.timedelta(seconds=40))
    assert later.still_on_http != snap.still_on_http
    after = pages.content_parts(later, w, context)
    assert after.changed(before) == []
    (section,) = re.findall(r"<td>([^<]*)</td></tr>", before.sections["still-on-http"])[:1]
    assert section == w.minute(seen) and section != w.when(seen)  # to the minute

    # the minute of now moves on: the times are drawn as they are now
    minute = moved(dt.timedelta(seconds=55), NOW + dt.timedelta(seconds=60))
    patch = dict(pages.content_parts(minute, w, context).changed(after) or [])
    assert list(patch) == ["still-on-http"]
    assert w.minute(seen + dt.timedelta(seconds=55)) in patch["still-on-http"]
    assert w.minute(seen) not in patch["still-on-http"]
    again = pages.content_parts(minute, w, context)

    # someone comes: a patch of the section (and not of the other one), at once
    came = moved(dt.timedelta(seconds=58), NOW + dt.timedelta(seconds=65), "ws-new")
    patch = dict(pages.content_parts(came, w, context).changed(again) or [])
    assert list(patch) == ["still-on-http"]
    assert 'data-workstation="ws-new"' in patch["still-on-http"]
    assert patch["still-on-http"].count("<tr data-node=") == 3


def test_the_still_on_http_section_lists_the_100_most_recent_and_counts_every_one(
    store: Store,
) -> None:
    """Review s63 v1 M1: the section listed every workstation on http (a thousand at 500
    nodes, 176 KiB a patch). It lists the 100 most recently seen and says how many more and
    where all are; its count, each node's row and the metrics count every one."""
    schema = SchemaStore(store.db)
    enrol(store, ["a", "b"])
    start_rollout(schema, "r1", Change.ENABLE_TLS)
    for node in ("a", "b"):  # 130 workstations, each seen a minute after the one before
        names = [f"ws-{node}-{i:03d}" for i in range(65)]
        for i, ws in enumerate(names):
            seen = NOW - dt.timedelta(minutes=(130 - 2 * i - (node == "b")))
            schema.record_clients(
                node,
                [Client(node, "http", f"10.4.{node == 'b':d}.{i + 1}", ws, seen, seen, 1)],
                window_seconds=0 if i else 3 * 3600,  # (the rows before stay: no window)
                source="refserver",
                problem="",
                now=seen,
            )
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    part = reader.read(clients=False, page=True)
    assert len(part.still_on_http) == 130
    oldest = sorted(part.still_on_http, key=lambda c: c.last_seen)[:30]
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    pages.DRAWN.clear()
    for lang, more in (("en", "… and 30 more"), ("de", "… und 30 weitere")):
        html = pages.schema_content(part, Words.of(lang), context)
        (section,) = re.findall(r'<section id="still-on-http".*?</section>', html, re.S)
        listed = re.findall(
            r'<tr data-node="(\w)" data-address="[^"]*" data-workstation="([^"]*)"', section
        )
        assert len(listed) == 100
        assert not {c.workstation for c in oldest} & {ws for _, ws in listed}
        assert [n for n, _ in listed] == sorted(n for n, _ in listed)  # by node, as before
        assert 'data-count="130"' in section and 'data-more="30"' in section
        assert more in unescape(section) and "<code>tlsroll schema show</code>" in section
        (row,) = re.findall(r'<tr id="node-a".*?</tr>', html, re.S)
        assert Words.of(lang)("on_http_count", count=65) in row
    whole = reader.read(times=True)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(whole).decode())}
    gauge = {s.labels["node"]: s.value for s in families["tlsroll_still_on_http"].samples}
    assert gauge == {"a": 65, "b": 65}


def test_the_other_nodes_last_rollout_is_the_newest_and_read_under_the_store_s_lock(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s63 v1 L4: two rollouts made in the same second (the same ``created_at``) left
    SQLite to choose which one an other node showed as its last; it is the newer (by its
    epoch). L2: what the read keeps was marked in ``Database.cache`` outside the store's lock
    (a writer copies the cache under it: ``Database._settle``)."""
    schema = SchemaStore(store.db)
    enrol(store, ["a", "b", "c"])
    for rollout_id in ("r1", "r9"):  # (SQLite chose r1: the first of the group by its key)
        row = start_rollout(schema, rollout_id, Change.ROTATE_CERT, ("a", "c"))
        for event in (RolloutEvent.ABORT, RolloutEvent.NODES_SETTLED):  # aborted: ended
            row = schema.save_states(row, row.rollout.with_event(event), row.records, NOW, "t")
    start_rollout(schema, "r5", Change.ROTATE_CERT, ("a", "b"))
    assert {r.rollout.id: r.meta.created_at for r in schema.all()} == dict.fromkeys(
        ("r1", "r9", "r5"), NOW
    )
    locked = store.db._lock.locked

    class Checked(dict[Any, Any]):
        """``Database.cache``, refusing the viewer's marks outside the store's lock."""

        def __setitem__(self, key: Any, value: Any) -> None:
            assert key != snapshot._TOUCHED_READ or locked(), "marked outside the lock"
            super().__setitem__(key, value)

    monkeypatch.setattr(store.db, "cache", Checked(store.db.cache))
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    snap = reader.read("r5", clients=False, page=True)
    assert [n.name for n in snap.other_nodes] == ["c"]
    assert snap.last_rollouts == {"c": "r9"}


def test_a_used_link_s_page_links_to_the_schema() -> None:
    """Review s63 v1 L1: a used link clicked on another site (a webmail) comes without the
    session cookie (SameSite=Strict), so its browser got "already used" with no way on; the
    page links to the schema, and that navigation, from the leader's own page, sends it."""
    for lang, words in (("de", "Zum Schema"), ("en", "To the schema")):
        w = Words.of(lang)
        used = pages.denied_page(w, "used")
        assert f'<a href="/" id="to-schema">{words}</a>' in used
        for reason in ("none", "session", "unknown", "expired", "revoked"):
            assert 'id="to-schema"' not in pages.denied_page(w, reason)


class Meanwhile:
    """Another browser, in a thread of its own: while each slow step (``step``, which a test
    patches into a draw, a JSON or an event made) waits, it asks for the stylesheet and a
    login link's page, and lets the step go on once both were answered. A step on the event
    loop holds the loop, and nothing is answered until it ends: it gives up after 20 s (a
    bound), and the steps after it do not wait. ``most``: steps under way at once. ``gate``,
    if given: the thread asks only once it is set (at most 60 s)."""

    def __init__(self, link: str, gate: threading.Event | None = None) -> None:
        self.link = link
        self.gate = gate
        self.began = threading.Event()  # a step is under way
        self.during: list[bool] = []  # each step: whether the others were answered meanwhile
        self.answers: list[tuple[int, ...]] = []
        self.most = 0
        self._inside = 0
        self._counted = threading.Lock()
        self._turns: queue.Queue[threading.Event | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def step(self) -> None:
        with self._counted:
            self._inside += 1
            self.most = max(self.most, self._inside)
        try:
            self.began.set()
            if not all(self.during):  # the loop was held once: no 20 s each again
                self.during.append(False)
                return
            answered = threading.Event()
            self._turns.put(answered)
            self.during.append(answered.wait(20))
        finally:
            with self._counted:
                self._inside -= 1

    def start(self, port: int) -> None:
        self._thread = threading.Thread(target=self._answer, args=(port,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """(In a thread: it may wait for the last answers.)"""
        self._turns.put(None)
        assert self._thread is not None
        self._thread.join(120)

    def _answer(self, port: int) -> None:
        while (answered := self._turns.get(timeout=300)) is not None:
            if self.gate is not None:
                self.gate.wait(60)
            statuses = []
            for path in ("/static/viewer.css", f"/login/{self.link}"):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                try:
                    conn.request("GET", path)
                    reply = conn.getresponse()
                    reply.read()
                    statuses.append(reply.status)
                finally:
                    conn.close()
            self.answers.append(tuple(statuses))
            answered.set()


def _viewer_with_rollouts(store: Store, ids: Sequence[str]) -> tuple[Grants, Reader, str, str]:
    """Grants, a reader of rollouts ``ids`` (nodes a and b; all but the last ended), a session
    id and another grant's unused link."""
    schema = SchemaStore(store.db)
    grants = Grants(store.db)
    made = grants.create("test", ttl=HOUR, now=NOW, actor="admin:test")
    _, session = grants.login(made.secret, NOW)
    link = grants.create("another", ttl=HOUR, now=NOW, actor="admin:test").secret
    for k, rollout_id in enumerate(ids):
        row = start_rollout(schema, rollout_id, Change.ENABLE_TLS)
        if k < len(ids) - 1:  # (one rollout at a time: the others failed their preflight)
            for event in (NodeEvent.START, NodeEvent.PREFLIGHT_FAILED):
                records = [r.with_event(event) for r in row.records]
                row = schema.save_states(row, row.rollout, records, NOW, "engine")
            settled = row.rollout.with_event(RolloutEvent.NODES_SETTLED)
            schema.save_states(row, settled, row.records, NOW, "engine")
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    return grants, reader, session, link


@pytest.mark.parametrize("path", ["/rollouts", "/events"])
def test_a_slow_draw_leaves_the_loop_to_other_requests_and_draws_one_at_a_time(
    store: Store, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Session 67's closing read: a cold draw (the first after the start, or after what was
    drawn went: a 500-node page, a few hundred ms) ran on the event loop, and every other
    request waited for it, the stylesheet and a login link's page too (and the agents'
    heartbeats and the admin socket). Here each draw waits until those two were answered
    (``Meanwhile``); two draws still run one at a time (review s67 L1). Review s67 L1's own
    case too (its test, which counted the loop's rounds between draws, merged here: a draw in
    a thread passes that whatever it holds): requests whose snapshots were shared became
    ready in one round of the loop and drew one after another in it, 16 of them for 5 s; here
    16 page requests are ready together so, and every one of their draws leaves the loop to
    the others."""
    monkeypatch.setattr(viewer_app, "SHARED_SECONDS", 60.0)  # every snapshot shared
    monkeypatch.setattr(pages, "DRAWN", pages.Drawn())
    ids = [f"r{k}" for k in range(viewer_app.KEPT_SHARED)]
    grants, reader, session, link = _viewer_with_rollouts(store, ids)
    meanwhile = Meanwhile(link)
    name = "schema_page" if path == "/rollouts" else "content_parts"
    draw = getattr(pages, name)

    def slow(*args: Any) -> Any:
        meanwhile.step()
        return draw(*args)

    monkeypatch.setattr(pages, name, slow)
    asked: list[str] = []

    async def ask() -> None:
        app = viewer_of(reader, grants)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            assert client.port is not None
            meanwhile.start(client.port)
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            if path == "/rollouts":

                async def get(path: str) -> int:
                    response = await client.get(path, headers=cookie)
                    await response.read()
                    return response.status

                for rollout_id in ids:  # each snapshot read once, and shared from then on
                    assert await get(f"/rollouts/{rollout_id}") == 200
                asked.extend(f"/rollouts/{i}?lang={lang}" for i in ids for lang in LANGS)
                statuses = await asyncio.wait_for(asyncio.gather(*map(get, asked)), 120)
                assert statuses == [200] * len(asked)
            else:  # a stream in either language: two draws of one snapshot

                async def update(lang: str) -> str:
                    response = await client.get(f"/events?lang={lang}", headers=cookie)
                    assert response.status == 200
                    data = await next_update(response.content, bytearray())
                    response.close()
                    return data

                asked.extend(LANGS)
                updates = await asyncio.wait_for(asyncio.gather(*map(update, LANGS)), 120)
                assert all(f'data-rollout="{ids[-1]}"' in update for update in updates)
            await asyncio.to_thread(meanwhile.stop)
            app.close()

    asyncio.run(ask())
    drawn = len(asked) + (len(ids) if path == "/rollouts" else 0)
    assert meanwhile.during == [True] * drawn, "the other requests waited for a draw"
    assert meanwhile.answers == [(200, 200)] * drawn
    assert meanwhile.most == 1, f"{meanwhile.most} draws at once"


@pytest.mark.parametrize("made", ["api", "event"])
def test_the_api_s_json_and_a_stream_s_event_leave_the_loop_to_other_requests(
    store: Store, monkeypatch: pytest.MonkeyPatch, made: str
) -> None:
    """Session 68 (what the draws off the loop left): ``/api/v1/schema``'s JSON of every
    stored rollout (a few MiB at ten 500-node rollouts) and a live stream's event (the part
    whole, ~0.9 MiB at 500 nodes, joined and encoded) were made on the event loop, which
    every other request waited for. Here each waits until the stylesheet and a login link's
    page were answered (``Meanwhile``), and they are made one at a time still: the API's two
    (the second request came while the first was made, so it takes a body of its own:
    ``_one_at_a_time``), and a stream's event with the draws (of two streams, one a
    language)."""
    monkeypatch.setattr(pages, "DRAWN", pages.Drawn())
    grants, reader, session, link = _viewer_with_rollouts(store, ["r1"])
    gate = threading.Event()  # the API's: the second request waits for the first
    meanwhile = Meanwhile(link, gate if made == "api" else None)
    if made == "api":

        def dumps(*args: Any, **kwargs: Any) -> str:
            if kwargs.get("indent") == 2:  # the API's (not a patch event's)
                meanwhile.step()
            return json.dumps(*args, **kwargs)

        monkeypatch.setattr(viewer_app, "json", types.SimpleNamespace(dumps=dumps))
    else:
        draw = pages.content_parts

        def slow_sse(event: str, data: str) -> bytes:
            if event in ("update", "patch"):
                meanwhile.step()
            return sse(event, data)

        def slow_draw(*args: Any) -> Any:
            meanwhile.step()
            return draw(*args)

        monkeypatch.setattr(viewer_app, "sse", slow_sse)
        monkeypatch.setattr(pages, "content_parts", slow_draw)

    async def ask() -> None:
        app = viewer_of(reader, grants)
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            assert client.port is not None
            meanwhile.start(client.port)
            cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
            if made == "api":

                async def get() -> Any:
                    response = await client.get("/api/v1/schema", headers=cookie)
                    assert response.status == 200
                    return json.loads(await response.read())

                first = asyncio.create_task(get())
                assert await asyncio.to_thread(meanwhile.began.wait, 60)
                second = asyncio.create_task(get())
                for _ in range(6000):  # until the second waits for the first (at most 60 s)
                    if app._heavy_waiting == 2:
                        break
                    await asyncio.sleep(0.01)
                gate.set()
                bodies = await asyncio.wait_for(asyncio.gather(first, second), 120)
                assert all([r["id"] for r in body["rollouts"]] == ["r1"] for body in bodies), bodies
            else:

                async def update(lang: str) -> str:
                    response = await client.get(f"/events?lang={lang}", headers=cookie)
                    assert response.status == 200
                    data = await next_update(response.content, bytearray())
                    response.close()
                    return data

                updates = await asyncio.wait_for(asyncio.gather(*map(update, LANGS)), 120)
                assert all('data-rollout="r1"' in update for update in updates)
            await asyncio.to_thread(meanwhile.stop)
            app.close()

    asyncio.run(ask())
    steps = 2 if made == "api" else 2 * len(LANGS)  # two bodies; or two draws, two events
    assert meanwhile.during == [True] * steps, "the other requests waited for it"
    assert meanwhile.answers == [(200, 200)] * steps
    assert meanwhile.most == 1, f"{meanwhile.most} at once"


def test_a_revoked_session_s_look_reads_no_audit(store: Store) -> None:
    """Closing review of s68 (4): whether a grant was signed out is asked of the audit, which
    has no index for it (a scan: ~0.15 s a million rows, under the store's lock). The look at
    a session's cookie, at every request, needs only whether it is valid: for a revoked or
    signed-out grant's cookie it scanned the audit too, and the 401's reason (``ended``) once
    more; now only the reason does."""
    grants = Grants(store.db)
    left = grants.create("Abgemeldet", ttl=HOUR, now=NOW, actor="admin:root")
    cut = grants.create("Widerrufen", ttl=HOUR, now=NOW, actor="admin:root")
    _, left_session = grants.login(left.secret, NOW)
    _, cut_session = grants.login(cut.secret, NOW)
    assert grants.sign_out(left_session, NOW) is not None
    grants.revoke(cut.grant.id, now=NOW, actor="admin:root")
    statements: list[str] = []
    store.db._db.set_trace_callback(statements.append)  # the leader's one connection
    try:
        for session in (left_session, cut_session):
            assert grants.session(session, NOW) is None
            assert grants.sign_out(session, NOW) is None  # (a stale cookie's sign-out)
        looked = [s for s in statements if "audit" in s]
        assert not looked, looked
        # Nor does a stale cookie's sign-out take the write lock (its pre-check matched an
        # ended grant's cookie too: review2 of s68, note).
        written = [s for s in statements if s.lstrip().upper().startswith(("BEGIN", "UPDATE"))]
        assert not written, written
        assert grants.ended(left_session) == "signed_out"
        assert grants.ended(cut_session) == "session"
    finally:
        store.db._db.set_trace_callback(None)
    assert grants.get(left.grant.id).state(NOW) is GrantState.SIGNED_OUT


def test_a_signed_out_viewer_is_told_it_signed_out_not_that_its_grant_was_revoked(
    store: Store,
) -> None:
    """Session 67's closing read: the sign-out ends the session's grant (``revoked_at``), so
    the link opened again, a copy of the cookie or the API said "revoked", as after `tlsroll
    viewer revoke`, to a person who had only signed out. Now they say "signed out" and how to
    come back (a new link); a grant revoked by the admin still says revoked, also one revoked
    after its session signed out (``COALESCE``: the sign-out ended it first). `viewer list`
    (``Grants.all``, the admin's ``ViewerGrantInfo``) says ``signed_out`` too (session 68:
    it said revoked), and a later grant expired, unused or active still as before."""
    grants = Grants(store.db)
    left = grants.create("Abgemeldet", ttl=HOUR, now=NOW, actor="admin:root")
    cut = grants.create("Widerrufen", ttl=HOUR, now=NOW, actor="admin:root")
    _, left_session = grants.login(left.secret, NOW)
    _, cut_session = grants.login(cut.secret, NOW)
    assert grants.sign_out(left_session, NOW) is not None
    grants.revoke(cut.grant.id, now=NOW, actor="admin:root")
    with store.db.read() as db:
        audit_before = db.execute("SELECT * FROM audit").fetchall()
    # After the sign-out: nothing to revoke, nothing written (session 68, viewer2's L).
    assert grants.revoke(left.grant.id, now=NOW + HOUR / 2, actor="admin:root").signed_out
    with store.db.read() as db:
        assert db.execute("SELECT * FROM audit").fetchall() == audit_before
    unused = grants.create("Unbenutzt", ttl=HOUR, now=NOW, actor="admin:root").grant
    listed = {g.name: g.state(NOW) for g in grants.all()}
    assert listed == {
        "Abgemeldet": GrantState.SIGNED_OUT,
        "Widerrufen": GrantState.REVOKED,
        "Unbenutzt": GrantState.UNUSED,
    }
    assert grants.get(left.grant.id).state(NOW) is GrantState.SIGNED_OUT
    assert grants.get(unused.id).state(NOW + 2 * HOUR) is GrantState.EXPIRED
    info = admin_service.grant_info(grants.get(left.grant.id), NOW)
    assert info.state == admin_pb2.VIEWER_GRANT_STATE_SIGNED_OUT
    for secret, reason in ((left.secret, "signed_out"), (cut.secret, "revoked")):
        for spend in (grants.check, grants.login):
            with pytest.raises(LoginRefused) as refused:
                spend(secret, NOW)
            assert refused.value.reason == reason, spend
    schema = SchemaStore(store.db)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)

    async def ask() -> dict[str, tuple[int, str]]:
        app = viewer_of(reader, grants)
        seen: dict[str, tuple[int, str]] = {}
        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            for who, secret, session in (
                ("left", left.secret, left_session),
                ("cut", cut.secret, cut_session),
            ):
                for path in (f"/login/{secret}?lang=en", f"/login/{secret}/open?lang=en"):
                    response = await client.get(path, allow_redirects=False)
                    seen[f"{who} {path.split('?')[0].endswith('open')}"] = (
                        response.status,
                        await response.text(),
                    )
                cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
                for path in ("/?lang=en", "/api/v1/schema"):
                    response = await client.get(path, headers=cookie)
                    seen[f"{who} {path}"] = (response.status, await response.text())
            app.close()
        return seen

    seen = asyncio.run(ask())
    for key, (status, body) in seen.items():
        assert status == 401, (key, status)
        if key.endswith("/api/v1/schema"):
            want = '"signed_out"' if key.startswith("left") else '"session"'
            assert want in body, (key, body)
            continue
        if key.startswith("left"):
            assert 'data-reason="signed_out"' in body, (key, body)
            assert "You signed out" in body and "revoked" not in body, (key, body)
            assert "tlsroll viewer grant" in body, (key, body)  # how to come back
        else:
            assert 'data-reason="signed_out"' not in body and "revoked" in body, (key, body)


def test_viewer_list_tells_signed_out_grants_through_the_audit_s_index(store: Store) -> None:
    """`viewer list` (``Grants.all``) and each grant's read tell a signed-out grant by the
    audit (``viewer_grant.signed_out``), which is never pruned: through its partial index
    (migration 20, session 68), not a scan of every event once a grant is revoked (~0.16 s a
    million rows). The plan SQLite makes for the statements the grants run."""
    grants = Grants(store.db)
    left = grants.create("Abgemeldet", ttl=HOUR, now=NOW, actor="admin:root")
    cut = grants.create("Widerrufen", ttl=HOUR, now=NOW, actor="admin:root")
    _, session = grants.login(left.secret, NOW)
    assert grants.sign_out(session, NOW) is not None
    grants.revoke(cut.grant.id, now=NOW, actor="admin:root")
    with statements(store) as ran:
        listed = {g.name: g.state(NOW) for g in grants.all()}
        assert grants.get(left.grant.id).signed_out
    assert listed == {"Abgemeldet": GrantState.SIGNED_OUT, "Widerrufen": GrantState.REVOKED}
    plans = audit_plans(store, ran)
    assert len(plans) == 2, ran
    for plan in plans:  # (the index's rows only: the sign-outs)
        assert re.search(r"\bSCAN audit(?! USING)", plan) is None, plan
        assert "audit USING INDEX audit_signed_out" in plan, plan


def test_a_link_s_page_from_another_site_sets_nothing_and_its_sign_in_keeps_a_session(
    store: Store,
) -> None:
    """Session 67's closing read (login CSRF by the link's own page): the sign-in URL linked
    from another site is refused (review s67 viewer L1), but the link's page cannot be: a
    web mail's link to it is a navigation from another site too. So a page anywhere could
    link a visitor to the page of its own unused link, and the visitor's click on "Sign in"
    (from the viewer's page: ``same-origin``) replaced the visitor's session with one of the
    other's. The page itself sets no cookie and spends nothing, from anywhere; its click no
    longer replaces a valid session of another grant: 409, a page that says to sign out
    first, nothing spent or set. Without a session (or with one that ended) it signs in, and
    so does the sign-in URL pasted (``none``, the admin's own way)."""
    grants = Grants(store.db)
    theirs = grants.create("Angreifer", ttl=HOUR, now=NOW, actor="admin:root")
    mine = grants.create("Opfer", ttl=HOUR, now=NOW, actor="admin:root")
    _, session = grants.login(mine.secret, NOW)
    ended = grants.create("Vorher", ttl=HOUR, now=NOW, actor="admin:root")
    _, ended_session = grants.login(ended.secret, NOW)
    grants.revoke(ended.grant.id, now=NOW, actor="admin:root")
    fresh = grants.create("Neu", ttl=HOUR, now=NOW, actor="admin:root")
    pasted = grants.create("Eingefügt", ttl=HOUR, now=NOW, actor="admin:root")
    schema = SchemaStore(store.db)
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    cookie = f"{SESSION_COOKIE}={session}"

    async def ask() -> dict[str, tuple[int, str, str]]:
        app = viewer_of(reader, grants)
        seen: dict[str, tuple[int, str, str]] = {}

        async def get(key: str, path: str, headers: dict[str, str]) -> None:
            response = await client.get(path, headers=headers, allow_redirects=False)
            cookies = ";".join(response.headers.getall("Set-Cookie", []))
            seen[key] = (response.status, cookies, await response.text())

        async with TestClient(TestServer(app.make(), host="127.0.0.1", port=0)) as client:
            for site in ("cross-site", "same-site", "none"):
                await get(
                    f"page {site}",
                    f"/login/{theirs.secret}",
                    {"Sec-Fetch-Site": site, "Cookie": cookie},
                )
            # The page's link, clicked: a valid session of another grant is kept.
            await get(
                "click",
                f"/login/{theirs.secret}/open?lang=en",
                {"Sec-Fetch-Site": "same-origin", "Cookie": cookie},
            )
            await get(
                "click, session ended",
                f"/login/{fresh.secret}/open",
                {"Sec-Fetch-Site": "same-origin", "Cookie": f"{SESSION_COOKIE}={ended_session}"},
            )
            await get(
                "pasted",
                f"/login/{pasted.secret}/open",
                {"Sec-Fetch-Site": "none", "Cookie": cookie},
            )
            app.close()
        return seen

    seen = asyncio.run(ask())
    for site in ("cross-site", "same-site", "none"):
        status, cookies, body = seen[f"page {site}"]
        assert status == 200 and SESSION_COOKIE not in cookies and 'id="login"' in body, site
    status, cookies, body = seen["click"]
    assert status == 409 and SESSION_COOKIE not in cookies, status  # (no session id shown)
    assert 'data-reason="signed_in"' in body and "Sign out" in body, body
    assert 'href="/"' in body  # to the schema it is signed in to
    assert grants.get(theirs.grant.id).used_at is None  # not spent
    assert grants.session(session, NOW) is not None  # the visitor's session as it was
    for key, made in (("click, session ended", fresh), ("pasted", pasted)):
        status, cookies, _ = seen[key]
        assert status == 303 and cookies.startswith(f"{SESSION_COOKIE}="), (key, status)
        assert grants.get(made.grant.id).used_at == NOW, key


def test_a_node_s_newest_row_says_what_its_server_serves_now_where_it_changed_since(
    store: Store,
) -> None:
    """Review s70 drift L2: a node put back on http by hand after its switch kept its row
    "done, https://…" in `schema show` and the viewer; only the mixed-cluster line below the
    table said otherwise. Its newest row carries what the server serves now
    (``NodeView.now_serves``, by the latest heartbeat): in `schema show` (text and --json) and
    on the page; not a node whose server is as its row says, nor one not known now (down),
    nor an older row of it (history: the newest one speaks)."""
    from unittest import mock

    from click.testing import CliRunner

    from leader.cli import schema_cmd
    from leader.schema_view import schema_json

    enrol(store, ["a", "b", "c"])
    schema = SchemaStore(store.db)
    run_rollout(schema, "r1", Change.ENABLE_TLS)  # a and b done
    live = {"a": "https", "b": "http", "c": "http"}
    service = SchemaViewService(
        schema,
        lambda: NOW,
        fresh=lambda infos, now: frozenset(),
        reported=lambda name: True,
        live_server=lambda name: live.get(name, ""),
    )
    message = service._answer(schema_pb2.GetSchemaRequest(), None)
    assert {n.name: n.now_serves for n in message.rollouts[0].nodes} == {"a": "", "b": "http"}
    data = json.loads(schema_json(message))
    marked = {n["name"]: n.get("now_serves") for n in data["rollouts"][0]["nodes"]}
    assert marked["b"] == "http" and not marked["a"], marked
    with mock.patch.object(schema_cmd, "fetch_schema_json", return_value=data):
        shown = CliRunner().invoke(schema_cmd.schema, ["show"], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    (row,) = [ln for ln in shown.output.splitlines() if "now serves" in ln]
    assert " b " in row and "now serves http (changed since)" in row, shown.output
    reader = Reader(store, schema, lambda: NOW, lambda _: True, [], fresh=none_fresh)
    reader.live_server = lambda name: live.get(name, "")
    whole = reader.read()
    part = reader.read("r1", clients=False, page=True)
    for snap in (whole, part):
        assert snap.selected is not None
        marks = {n["name"]: n.get("now_serves") for n in snap.selected["nodes"]}
        assert marks["b"] == "http" and not marks["a"], marks
    context = pages.PageContext("127.0.0.1", "test", NOW, "/events")
    for lang, said in (("en", "now serves http (changed since)"), ("de", "liefert jetzt http")):
        html = pages.schema_content(part, Words.of(lang), context)
        (row_b,) = re.findall(r'<tr id="node-b".*?</tr>', html, re.S)
        (row_a,) = re.findall(r'<tr id="node-a".*?</tr>', html, re.S)
        assert said in row_b and 'class="now-serves"' not in row_a, row_b
    # Down now (not known): nothing said of it. A later way back: its rows speak, r1's not.
    live["b"] = "down: refused"
    message = service._answer(schema_pb2.GetSchemaRequest(), None)
    assert not any(n.now_serves for n in message.rollouts[0].nodes)
    live["b"] = "http"
    run_rollout(schema, "r2", Change.DISABLE_TLS)
    message = service._answer(schema_pb2.GetSchemaRequest(), None)
    shown_now = {(r.id, n.name): n.now_serves for r in message.rollouts for n in r.nodes}
    assert shown_now == {("r2", "a"): "https", ("r2", "b"): "", ("r1", "a"): "", ("r1", "b"): ""}
