"""What a node serves after its name was removed and enrolled again (review rvc of s66-misc,
M1), in the store: the admin revokes node b's served certificate (`tlsroll ca revoke`, the
admin's reason), then removes b (`tlsroll nodes remove`: the certificate is revoked already,
so it keeps the admin's reason), and a new machine is enrolled as b, on http. Every view of
what nodes serve (the expiry watch behind check-expiration and auto_rotate, the viewer, the
metrics) went on listing the removed machine's certificate as the new b's, revoked: "replace
it with rotate-cert", which the plan refuses for a node on http, and auto_rotate found b due
at every check. They dropped only a record revoked for the removal (``NODE_REMOVED``); now
they drop what was recorded before the name's last removal, whatever the revocation's
reason (``schema_store.before_removal``).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from leader.expiry import ExpiryWatch, served_now
from leader.rollout_core import Change
from leader.schema_store import SchemaStore
from leader.store import IssuedCert, NodeCert, Store
from leader.viewer import metrics
from leader.viewer.snapshot import Reader
from tests.conftest import none_fresh
from tests.test_store_enrol import statements
from tests.test_superseded_index import audit_plans
from tests.test_viewer_parts import HOUR, NOW, drive_rollout, enrol, start_rollout
from tlsroll import pki
from tlsroll.v1 import agent_pb2

LATER = NOW + dt.timedelta(days=1)


def _served_by_rollout(
    store: Store, schema: SchemaStore, rollout_id: str, change: Change, serials: int
) -> None:
    """A rollout of a and b, done, and its certificates as the leader records them (serials
    ``serials`` and the next, hex)."""
    drive_rollout(schema, start_rollout(schema, rollout_id, change))
    for i, name in enumerate(("a", "b")):
        store.record_certificate(
            IssuedCert(
                f"{serials + i:x}",
                "server",
                name,
                name,
                f"sha256:{rollout_id}-{name}",
                NOW,
                NOW + 397 * 24 * HOUR,
            ),
            actor="leader",
            now=NOW,
            rollout_id=rollout_id,
        )


def _enrol_again(store: Store, name: str, now: dt.datetime) -> None:
    """A new machine enrolled under ``name`` (a new key, a new token)."""
    store.add_token(
        f"tok-{name}2",
        "s" * 26,
        ttl=HOUR,
        uses=1,
        description="t",
        now=now,
        actor="admin:test",
        node_name=name,
        addresses=("10.0.0.9",),
        dns_names=(),
    )
    cert = NodeCert(f"pin-{name}2", "sha256:" + "9" * 64, "99", now + 400 * 24 * HOUR)
    store.enrol(
        token_id=f"tok-{name}2",
        secret="s" * 26,
        name=name,
        addresses=("10.0.0.9",),
        dns_names=(),
        agent_version="t",
        agent_port=9442,
        key_pin=f"pin-{name}2",
        issue=lambda: cert,
        now=now,
    )


def _views(
    store: Store, schema: SchemaStore, heard: dict[str, str] | None = None
) -> tuple[dict[str, bool], ...]:
    """Per node listed, whether it is flagged revoked: as ``served_now`` has it, as the expiry
    watch (check-expiration, auto_rotate) does, as the viewer's page and the metrics do;
    ``heard``: what the nodes' heartbeats say they serve (as the daemon wires it)."""
    ca = pki.CertificateAuthority.create(now=NOW).cert
    watch = ExpiryWatch(store, schema, ca, list, lambda: LATER)
    watch.reported = lambda: heard or {}
    checked = {e.subject: e.revoked for e in watch.check() if e.kind == "server"}
    reader = Reader(store, schema, lambda: LATER, lambda _: True, [("ca", ca)], fresh=none_fresh)
    reader.served_reported = lambda: heard or {}
    page = {c.subject: c.revoked for c in reader.read().certificates if c.kind == "server"}
    text = metrics.render(reader.read(times=True)).decode()
    gauge = {
        s.labels["subject"]: bool(s.value)
        for f in text_string_to_metric_families(text)
        if f.name == "tlsroll_certificate_revoked"
        for s in f.samples
    }
    listed = {
        name: revoked for name, (_, _, revoked) in served_now(store, schema, None, heard).items()
    }
    return listed, checked, page, gauge


def test_a_machine_removed_after_its_certificate_was_revoked_leaves_nothing_served_on_its_name(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    enrol(store, ["a", "b"])
    _served_by_rollout(store, schema, "p1", Change.ENABLE_TLS, 0xA0)
    assert _views(store, schema) == ({"a": False, "b": False},) * 4
    store.revoke("a1", reason="", now=LATER, actor="admin:test")  # b's served certificate
    assert _views(store, schema) == ({"a": False, "b": True},) * 4

    store.remove_node("b", now=LATER, actor="admin:test")
    _enrol_again(store, "b", LATER)
    # The new machine b serves nothing the leader recorded (on http): listed nowhere.
    assert _views(store, schema) == ({"a": False},) * 4

    # Once a rollout switches it, what it recorded is the new b's.
    _served_by_rollout(store, schema, "p2", Change.ROTATE_CERT, 0xB0)
    assert _views(store, schema) == ({"a": False, "b": False},) * 4
    assert served_now(store, schema)["b"][0] == "sha256:p2-b"


def test_a_removal_an_older_leader_recorded_goes_by_its_time(tmp_path: Path) -> None:
    """A removal recorded before schema 19 carries no epoch: a rollout that ended before it
    (the removal waits for every rollout that holds the node) is the removed machine's."""
    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    enrol(store, ["a", "b"])
    _served_by_rollout(store, schema, "p1", Change.ENABLE_TLS, 0xA0)
    store.revoke("a1", reason="", now=LATER, actor="admin:test")
    store.remove_node("b", now=LATER, actor="admin:test")
    with sqlite3.connect(tmp_path / "leader.sqlite3") as db:  # as the older leader wrote it
        (detail,) = db.execute("SELECT detail FROM audit WHERE kind = 'node.removed'").fetchone()
        older = {k: v for k, v in json.loads(detail).items() if k != "epoch"}
        db.execute("UPDATE audit SET detail = ? WHERE kind = 'node.removed'", (json.dumps(older),))
    _enrol_again(store, "b", LATER)
    assert {n: f for n, (f, _, _) in served_now(store, schema).items()} == {"a": "sha256:p1-a"}


def test_the_removals_are_read_through_the_audit_s_index(tmp_path: Path) -> None:
    """The audit is never pruned: the removals are read through its partial index
    (migration 19), not by a scan of every event, at each check, page read and scrape: the
    plan SQLite makes for the statements ``served_now`` runs."""
    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    enrol(store, ["a", "b"])
    _served_by_rollout(store, schema, "p1", Change.ENABLE_TLS, 0xA0)
    store.remove_node("b", now=LATER, actor="admin:test")
    with statements(store) as ran:
        assert set(served_now(store, schema)) == {"a"}
    plans = audit_plans(store, ran)
    assert len(plans) == 1, ran
    assert "USING INDEX audit_removed" in plans[0], plans


def test_a_machine_enrolled_again_still_serving_its_revoked_certificate_is_flagged_everywhere(
    tmp_path: Path,
) -> None:
    """Review rvc of s66-misc (L2): the same machine enrolled again after `tlsroll nodes
    remove`, its server still serving the certificate the removal revoked. The plan, which
    asks the node what it serves, said to replace it; the records' views (the watch behind
    check-expiration and auto_rotate, the page, the metrics) said nothing (the record is the
    removed machine's). They go by what the node's heartbeats say it serves now, as the plan
    does: revoked, in every one. A fingerprint the CA issued for another node, or none on
    record, changes nothing."""
    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    enrol(store, ["a", "b"])
    _served_by_rollout(store, schema, "p1", Change.ENABLE_TLS, 0xA0)
    store.remove_node("b", now=LATER, actor="admin:test")  # revokes b's: "node removed"
    _enrol_again(store, "b", LATER)
    assert _views(store, schema) == ({"a": False},) * 4  # the records alone: nothing for b

    heard = {"a": "sha256:p1-a", "b": "sha256:p1-b"}  # what the heartbeats say
    assert _views(store, schema, heard) == ({"a": False, "b": True},) * 4
    listed = served_now(store, schema, reported=heard)
    assert listed["b"] == ("sha256:p1-b", NOW + 397 * 24 * HOUR, True)

    # a's fingerprint said by b, or one the leader never issued: the record (none) stands.
    for said in ("sha256:p1-a", "sha256:" + "7" * 64):
        assert _views(store, schema, {"b": said}) == ({"a": False},) * 4


async def test_what_a_node_serves_goes_with_its_heartbeat_to_the_views(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """The agent's heartbeat says the fingerprint of the certificate its server serves https
    with (``LiveServer.cert_fingerprint``, as ``pki.fingerprint`` has it), over real mTLS; the
    leader keeps it (``LeaderState.served_fingerprints``) for the views, and forgets it once
    the server is on http, or down."""
    from tests.test_plan_over_stream import world

    async with world(tmp_path, loopback) as (rig, _, node):
        served = pki.CertificateAuthority.create(now=NOW).cert
        fingerprint = pki.fingerprint(served)
        view = agent_pb2.ServerView(
            driver="reference",
            healthy=True,
            schemes=["https"],
            cert_pem=pki.cert_to_pem(served) + pki.cert_to_pem(served),  # (and its chain)
        )

        async def server_view() -> agent_pb2.ServerView:
            return view

        node.link.server_view = server_view
        await node.link.beat()
        assert rig.state.served_fingerprints == {"hb1": fingerprint}

        # On record for hb1, and revoked: the watch, given what the heartbeats say, flags it.
        rig.store.record_certificate(
            IssuedCert("c0ffee", "server", "hb1", "hb1", fingerprint, NOW, LATER),
            actor="t",
            now=NOW,
        )
        rig.store.revoke("c0ffee", reason="", now=NOW, actor="admin:test")
        watch = ExpiryWatch(rig.store, SchemaStore(rig.store.db), served, list, lambda: NOW)
        assert [e.subject for e in watch.check() if e.kind == "server"] == []
        watch.reported = lambda: rig.state.served_fingerprints
        assert [(e.subject, e.revoked) for e in watch.check() if e.kind == "server"] == [
            ("hb1", True)
        ]

        view.cert_pem, view.schemes[:] = b"", ["http"]
        await node.link.beat()
        assert rig.state.served_fingerprints == {}
        view.cert_pem, view.schemes[:], view.healthy = pki.cert_to_pem(served), ["https"], False
        await node.link.beat()
        assert rig.state.served_fingerprints == {}
