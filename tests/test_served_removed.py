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


def _views(store: Store, schema: SchemaStore) -> tuple[dict[str, bool], ...]:
    """Per node listed, whether it is flagged revoked: as ``served_now`` has it, as the expiry
    watch (check-expiration, auto_rotate) does, as the viewer's page and the metrics do."""
    ca = pki.CertificateAuthority.create(now=NOW).cert
    watch = ExpiryWatch(store, schema, ca, list, lambda: LATER)
    checked = {e.subject: e.revoked for e in watch.check() if e.kind == "server"}
    reader = Reader(store, schema, lambda: LATER, lambda _: True, [("ca", ca)], fresh=none_fresh)
    page = {c.subject: c.revoked for c in reader.read().certificates if c.kind == "server"}
    text = metrics.render(reader.read(times=True)).decode()
    gauge = {
        s.labels["subject"]: bool(s.value)
        for f in text_string_to_metric_families(text)
        if f.name == "tlsroll_certificate_revoked"
        for s in f.samples
    }
    listed = {name: revoked for name, (_, _, revoked) in served_now(store, schema).items()}
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
