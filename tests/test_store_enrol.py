"""Enrolment in the leader's store (``Store.enrol``) on the real SQLite file: a replay of an
enrolment whose answer was lost (the agent killed before it wrote its certificate, or its
deadline passed while the leader's transaction committed) gets a certificate again without
spending a use of the join token; every other second call is refused as before and changes
nothing (audit of session 33, M1).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from leader.store import (
    NODE_CERTS_PER_HOUR,
    NameTaken,
    NodeCert,
    Store,
    TokenRejected,
    TooMany,
)

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
SECRET = "s" * 26
ADDRESS = "127.0.0.9"
PIN = "PIN-OF-THE-AGENT-KEY"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "leader.sqlite3")
    s.add_token(
        "t1",
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name="node1",
        addresses=(ADDRESS,),
    )
    yield s
    s.close()


_serials = itertools.count(1)


def issuer(key_pin: str = PIN) -> Callable[[], NodeCert]:
    def issue() -> NodeCert:
        n = next(_serials)
        return NodeCert(
            key_pin=key_pin, fingerprint=f"fp{n}", serial=f"{n:x}", not_after=NOW + dt.timedelta(1)
        )

    return issue


def enrol(store: Store, *, key_pin: str = PIN, now: dt.datetime = NOW, **kw: Any) -> NodeCert:
    args: dict[str, Any] = {
        "token_id": "t1",
        "secret": SECRET,
        "name": "node1",
        "addresses": (ADDRESS,),
        "dns_names": (),
        "agent_version": "v",
        "agent_port": 9444,
        "key_pin": key_pin,
        "issue": issuer(key_pin),
        "now": now,
    }
    args.update(kw)
    return store.enrol(**args)


def rows(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables an enrolment writes."""
    with store.db.read() as db:
        return {
            table: [tuple(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY 1")]  # noqa: S608
            for table in ("tokens", "nodes", "certificates", "audit")
        }


def node_row(store: Store) -> dict[str, Any]:
    with store.db.read() as db:
        return dict(db.execute("SELECT * FROM nodes WHERE name = 'node1'").fetchone())


def test_a_replay_of_a_lost_answer_is_signed_again_and_spends_no_use(store: Store) -> None:
    first = enrol(store)
    assert store.get_token("t1").uses_left == 0
    again = enrol(store, agent_port=9555)
    assert again.key_pin == PIN and again.fingerprint != first.fingerprint
    assert store.get_token("t1").uses_left == 0
    node = node_row(store)
    # The new certificate is on record, the first one is the one before it (never used).
    assert (node["cert_fingerprint"], node["prev_cert_fingerprint"]) == (
        again.fingerprint,
        first.fingerprint,
    )
    assert node["agent_port"] == 9555
    assert node["enrolled_at"] is not None and node["token_id"] == "t1"
    assert store.accepted_certificates()["node1"] == {first.fingerprint, again.fingerprint}
    kinds = [r[3] for r in rows(store)["audit"]]
    assert kinds.count("node.enrolled") == 1 and kinds.count("node.enrolment_replayed") == 1


def test_a_replay_by_another_key_is_refused_as_used_up_and_changes_nothing(store: Store) -> None:
    enrol(store)
    before = rows(store)
    with pytest.raises(TokenRejected, match="used up"):
        enrol(store, key_pin="ANOTHER-KEY")
    assert rows(store) == before


def test_a_replay_after_the_node_was_heard_from_is_refused(store: Store) -> None:
    """Once the agent heartbeats (in memory: the group commit has not written it yet), it had
    its certificate: a second call is no lost answer."""
    enrol(store)
    store.queue_heartbeat("node1", "v", now=NOW)
    before = rows(store)
    with pytest.raises(TokenRejected, match="used up"):
        enrol(store)
    assert rows(store) == before
    assert store.queued() == 1  # the refused call forgot nothing
    store.write_queued()
    store2 = Store(store.db)  # a leader restarted: only the stored heartbeat says so
    with pytest.raises(TokenRejected, match="used up"):
        enrol(store2)


def test_a_replay_for_a_removed_node_or_by_a_revoked_or_expired_token_is_refused(
    store: Store,
) -> None:
    enrol(store)
    with pytest.raises(TokenRejected, match="expired"):
        enrol(store, now=NOW + dt.timedelta(hours=2))
    store.remove_node("node1", now=NOW, actor="admin")
    before = rows(store)
    with pytest.raises(TokenRejected, match="used up"):
        enrol(store)
    assert rows(store) == before
    store.revoke_token("t1", now=NOW, actor="admin")
    with pytest.raises(TokenRejected, match="revoked"):
        enrol(store)


def test_a_replay_by_another_token_spends_its_use(store: Store) -> None:
    """The same key by a second token for the name: a re-enrolment, as before (not free)."""
    enrol(store)
    store.add_token(
        "t2",
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name="node1",
        addresses=(ADDRESS,),
    )
    enrol(store, token_id="t2")
    assert store.get_token("t2").uses_left == 0
    assert node_row(store)["token_id"] == "t2"
    with pytest.raises(TokenRejected, match="used up"):
        enrol(store)  # t1 enrolled it no more


def test_replays_count_in_the_certificates_per_hour(store: Store) -> None:
    enrol(store)
    for _ in range(NODE_CERTS_PER_HOUR - 1):
        enrol(store)
    before = rows(store)
    with pytest.raises(TooMany):
        enrol(store)
    assert rows(store) == before


def test_another_key_for_the_name_by_a_fresh_token_is_still_name_taken(store: Store) -> None:
    enrol(store)
    store.add_token(
        "t3",
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name="node1",
        addresses=(ADDRESS,),
    )
    before = rows(store)
    with pytest.raises(NameTaken):
        enrol(store, token_id="t3", key_pin="ANOTHER-KEY")
    assert rows(store) == before


def test_a_replay_after_the_admin_revoked_the_node_s_certificate_is_refused(store: Store) -> None:
    """The admin revokes a node never heard from (an unexpected node, a copied key and token):
    a replay must not sign a new, unrevoked certificate; a new token is the way back, as a
    renewal's refusal says (review s34 M1)."""
    first = enrol(store)
    assert store.revoke(first.serial, reason="unexpected node", now=NOW, actor="admin") == [
        first.serial
    ]
    before = rows(store)
    with pytest.raises(TokenRejected, match="used up"):
        enrol(store, now=NOW + dt.timedelta(minutes=1))
    assert rows(store) == before
    assert node_row(store)["cert_serial"] == first.serial


def add_t2(store: Store) -> None:
    store.add_token(
        "t2",
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name="node1",
        addresses=(ADDRESS,),
    )


def test_a_lost_answer_to_a_re_enrolment_of_a_node_that_renewed_is_replayed(store: Store) -> None:
    """A node that heartbeat and renewed in its earlier life is enrolled again (its certificate
    expired while it was offline) by t2, and that answer is lost: the replay by t2 is taken
    without spending a use; the earlier life's renewal and certificate before it are gone
    (review s34 L4)."""
    first = enrol(store)
    store.heartbeat("node1", "v", now=NOW, cert_fingerprint=first.fingerprint)
    renewed = store.renew_node_certificate(
        "node1",
        presented=first.fingerprint,
        presented_serial=first.serial,
        key_pin=PIN,
        issue=issuer(),
        now=NOW,
    )
    assert node_row(store)["cert_renewed_at"] is not None
    add_t2(store)
    later = NOW + dt.timedelta(minutes=5)
    again = enrol(store, token_id="t2", now=later)
    assert store.get_token("t2").uses_left == 0
    node = node_row(store)
    assert node["cert_renewed_at"] is None and node["prev_cert_fingerprint"] == ""
    # The earlier life's certificates call no more: only the one just issued.
    assert store.accepted_certificates()["node1"] == {again.fingerprint}
    assert renewed.fingerprint != again.fingerprint
    replayed = enrol(store, token_id="t2", now=later + dt.timedelta(minutes=1))
    assert store.get_token("t2").uses_left == 0
    assert store.accepted_certificates()["node1"] == {again.fingerprint, replayed.fingerprint}
    kinds = [r[3] for r in rows(store)["audit"]]
    assert kinds.count("node.enrolment_replayed") == 1


def test_a_token_with_a_use_left_does_not_re_certify_a_revoked_key(store: Store) -> None:
    """The admin revokes a node's certificate (a copied key and token); a token with a use
    left (``--uses 2``, or any other token of the node) must not sign that key again, replay
    or not: a new key, or `nodes remove` first, is the way back (review 1 of s34, M2)."""
    add_t2(store)
    first = enrol(store)
    store.revoke(first.serial, reason="copied key", now=NOW, actor="admin")
    before = rows(store)
    with pytest.raises(TokenRejected, match="revoked"):
        enrol(store, token_id="t2", now=NOW + dt.timedelta(minutes=1))
    assert rows(store) == before
    assert node_row(store)["cert_serial"] == first.serial
    # Another key by that token is the name's other key (NameTaken, as before); once the
    # admin removed the node, a new token enrols it anew.
    with pytest.raises(NameTaken):
        enrol(store, token_id="t2", key_pin="ANOTHER-KEY", now=NOW + dt.timedelta(minutes=1))
    store.remove_node("node1", now=NOW + dt.timedelta(minutes=2), actor="admin")
    store.add_token(
        "t3",
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name="node1",
        addresses=(ADDRESS,),
    )
    again = enrol(store, token_id="t3", now=NOW + dt.timedelta(minutes=3))
    assert node_row(store)["cert_serial"] == again.serial


def test_a_multi_use_token_does_not_re_certify_its_revoked_key(tmp_path: Path) -> None:
    """The review's demo: one token made with ``--uses 2`` enrols key K, the admin revokes
    K's certificate; K by the same token is refused and nothing changes."""
    s = Store(tmp_path / "leader.sqlite3")
    s.add_token(
        "t1",
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=2,
        description="",
        now=NOW,
        actor="admin",
        node_name="node1",
        addresses=(ADDRESS,),
    )
    try:
        first = enrol(s)
        s.revoke(first.serial, reason="copied key", now=NOW, actor="admin")
        before = rows(s)
        with pytest.raises(TokenRejected, match="revoked"):
            enrol(s, now=NOW + dt.timedelta(minutes=1))
        assert rows(s) == before
    finally:
        s.close()
