"""Enrolment in the leader's store (``Store.enrol``) on the real SQLite file: a replay of an
enrolment whose answer was lost (the agent killed before it wrote its certificate, or its
deadline passed while the leader's transaction committed) gets a certificate again without
spending a use of the join token; every other second call is refused as before and changes
nothing (audit of session 33, M1).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from leader.db import MIGRATIONS
from leader.store import (
    NODE_CERTS_PER_HOUR,
    WAY_TO_JOIN_AGAIN,
    NameTaken,
    NodeCert,
    Store,
    TokenRejected,
    TooMany,
)
from tlsroll.sqlite import Database, to_text

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


def issuer(key_pin: str = PIN) -> Callable[..., NodeCert]:
    def issue(_apart: bool = False) -> NodeCert:
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
    add_token(store, "t2")
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
    add_token(store, "t3")
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
    add_token(store, "t2")


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
    or not: `nodes remove` and a new key is the way back (review 1 of s34, M2; the revoked key
    never again, review rev-enrol H1). (t2 is made after the enrolment: one made before it is
    superseded by it, refused for that.)"""
    first = enrol(store)
    add_t2(store)
    store.revoke(first.serial, reason="copied key", now=NOW, actor="admin")
    before = rows(store)
    with pytest.raises(TokenRejected, match="revoked"):
        enrol(store, token_id="t2", now=NOW + dt.timedelta(minutes=1))
    assert rows(store) == before
    assert node_row(store)["cert_serial"] == first.serial
    # Another key by that token is the name's other key (NameTaken, as before); once the
    # admin removed the node, a new token enrols it anew, with a new key only.
    with pytest.raises(NameTaken):
        enrol(store, token_id="t2", key_pin="ANOTHER-KEY", now=NOW + dt.timedelta(minutes=1))
    store.remove_node("node1", now=NOW + dt.timedelta(minutes=2), actor="admin")
    add_token(store, "t3")
    before = rows(store)
    with pytest.raises(TokenRejected, match="enrol the node with a new key"):
        enrol(store, token_id="t3", now=NOW + dt.timedelta(minutes=3))
    assert rows(store) == before
    again = enrol(store, token_id="t3", key_pin="ANOTHER-KEY", now=NOW + dt.timedelta(minutes=3))
    assert node_row(store)["cert_serial"] == again.serial


def test_a_multi_use_token_does_not_re_certify_its_revoked_key(tmp_path: Path) -> None:
    """The review's demo: one token made with ``--uses 2`` enrols key K, the admin revokes
    K's certificate; K by the same token is refused and nothing changes (its second use is
    superseded by the enrolment its first made)."""
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
        with pytest.raises(TokenRejected, match="superseded by node1's enrolment"):
            enrol(s, now=NOW + dt.timedelta(minutes=1))
        assert rows(s) == before
    finally:
        s.close()


# --- a token made before an enrolment is superseded by it (race audit of session 39, L2) ----------


def add_token(
    store: Store,
    token_id: str,
    *,
    uses: int = 1,
    now: dt.datetime = NOW,
    node_name: str = "node1",
    addresses: tuple[str, ...] = (ADDRESS,),
) -> None:
    store.add_token(
        token_id,
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=uses,
        description="",
        now=now,
        actor="admin",
        node_name=node_name,
        addresses=addresses,
    )


def test_a_token_made_before_the_enrolment_is_superseded_whatever_the_key(store: Store) -> None:
    """t0 (a lost script) and t1 are made; node1 enrols by t1. t0 enrols it no more: not with a
    fresh key, not with the node's own (which re-enrolled it, its agent's certificate no
    longer on record). A token made after the enrolment enrols the key again and supersedes
    the ones before it in its turn."""
    add_token(store, "t0")
    first = enrol(store)
    later = NOW + dt.timedelta(minutes=1)
    token = store.get_token("t0")
    assert token.superseded_at == NOW and token.uses_left == 1
    assert store.get_token("t1").superseded_at is None  # used up: nothing left to supersede
    before = rows(store)
    for pin in ("A-FRESH-KEY", PIN):
        with pytest.raises(TokenRejected) as refused:
            enrol(store, token_id="t0", key_pin=pin, now=later)
        assert str(refused.value) == (
            "join token t0 is superseded by node1's enrolment at 2026-05-01 12:00:00 UTC;"
            " create a new token"
        )
        assert rows(store) == before
    assert node_row(store)["cert_fingerprint"] == first.fingerprint
    add_token(store, "t2", now=later)
    add_token(store, "t3", uses=3, now=later)
    again = enrol(store, token_id="t2", now=later)
    assert node_row(store)["cert_fingerprint"] == again.fingerprint
    assert store.get_token("t3").superseded_at == later
    (audit,) = [r for r in rows(store)["audit"] if r[3] == "node.enrolled" and "t2" in r[5]]
    assert '"superseded_tokens": ["t3"]' in audit[5]


def count_writes(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A hook on the store's database: every write transaction it opens (``Database.tx``, which
    takes the write lock: BEGIN IMMEDIATE under the database's lock) adds one to the list's
    only item, whether it commits or is refused. The store keeps no counter of refused writes
    (``generation`` moves only on a commit), hence the hook."""
    opened = [0]
    real = store.db.tx

    def tx(**kw: Any) -> Any:
        opened[0] += 1
        return real(**kw)

    monkeypatch.setattr(store.db, "tx", tx)
    return opened


def test_a_superseded_token_is_refused_without_the_write_lock(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a wrong secret is: the read before the write transaction refuses a superseded token
    (and a revoked, expired or used-up one), with the words the write transaction says, so a
    stale script retried by its agent (or a flood of it) never queues for the write lock."""
    add_token(store, "t0")
    enrol(store)
    add_token(store, "t9", now=NOW - dt.timedelta(hours=2))  # expired
    before = rows(store)
    opened = count_writes(store, monkeypatch)
    later = NOW + dt.timedelta(minutes=1)
    for token_id, says in (
        ("t0", "join token t0 is superseded by node1's enrolment at 2026-05-01 12:00:00 UTC;"),
        ("t1", "join token already used up"),
        ("t9", "join token expired"),
    ):
        with pytest.raises(TokenRejected) as refused:
            enrol(store, token_id=token_id, key_pin="A-FRESH-KEY", now=later)
        assert str(refused.value).startswith(says), refused.value
    assert opened == [0]
    assert rows(store) == before
    add_token(store, "t2", now=later)  # the hook counts: one write transaction, committed
    opened[0] = 0
    enrol(store, token_id="t2", now=later)
    assert opened == [1]


def test_a_token_superseded_after_the_read_is_refused_in_the_write_transaction(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: t0's read finds it usable, then node1 enrols by t1 (superseding t0) before
    t0's write transaction. The write transaction refuses t0 with the same words."""
    add_token(store, "t0")
    real_read = store.db.read
    raced: list[str] = []

    @contextlib.contextmanager
    def read() -> Iterator[sqlite3.Connection]:
        with real_read() as db:
            yield db
        if not raced:  # the first read is t0's check: node1 enrols by t1 right after it
            raced.append("t1")
            enrol(store, key_pin="THE-AGENT-KEY")

    monkeypatch.setattr(store.db, "read", read)
    opened = count_writes(store, monkeypatch)
    with pytest.raises(TokenRejected) as refused:
        enrol(store, token_id="t0", key_pin="A-FRESH-KEY")
    assert raced and opened == [2]  # t1's enrolment, then t0's, refused under the lock
    assert str(refused.value) == (
        "join token t0 is superseded by node1's enrolment at 2026-05-01 12:00:00 UTC;"
        " create a new token"
    )
    assert node_row(store)["key_pin"] == "THE-AGENT-KEY"


def test_a_multi_use_token_is_superseded_by_its_own_enrolment_but_replays(store: Store) -> None:
    """``--uses 2``: the first use enrols; the second is superseded by that enrolment (two
    enrolments at once by one token: the second, another key, is refused), but the first's
    lost answer is still replayed to its key."""
    add_token(store, "t2", uses=2)
    first = enrol(store, token_id="t2")
    assert store.get_token("t2").uses_left == 1
    assert store.get_token("t2").superseded_at == NOW
    before = rows(store)
    with pytest.raises(TokenRejected, match="superseded by node1's enrolment"):
        enrol(store, token_id="t2", key_pin="ANOTHER-KEY")
    assert rows(store) == before
    again = enrol(store, token_id="t2")  # the lost answer, replayed
    assert again.fingerprint != first.fingerprint
    assert store.get_token("t2").uses_left == 1


def test_tokens_made_after_a_removal_enrol_and_the_ones_before_stay_refused(store: Store) -> None:
    add_token(store, "t0")
    enrol(store)
    store.remove_node("node1", now=NOW, actor="admin")
    later = NOW + dt.timedelta(minutes=1)
    add_token(store, "t2", now=later)
    add_token(store, "t3", now=later)  # a second script for the re-added node, lost
    with pytest.raises(TokenRejected, match=r"superseded|revoked"):
        enrol(store, token_id="t0", key_pin="NEW-KEY", now=later)
    enrol(store, token_id="t2", key_pin="NEW-KEY", now=later)
    assert node_row(store)["key_pin"] == "NEW-KEY"
    with pytest.raises(TokenRejected, match="superseded by node1's enrolment"):
        enrol(store, token_id="t3", key_pin="THIRD-KEY", now=later)


def test_a_relearned_node_supersedes_the_tokens_the_store_holds(store: Store) -> None:
    """A restored (or reinitialised) store re-learns node1 from its agent: node1 enrolled after
    the backup, by a token the store may hold (unused again) or never saw. Every token of it
    in the store predates that enrolment: superseded, not valid."""
    with store.db.tx() as db:
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('relearn_until', ?)",
            (to_text(NOW + dt.timedelta(hours=24)),),
        )
    cert = issuer()()
    assert store.relearn(
        name="node1",
        names=((ADDRESS,), ()),
        agent_port=9444,
        key_pin=PIN,
        cert=cert,
        highest_epoch=0,
        now=NOW,
    )
    assert store.get_token("t1").superseded_at == NOW
    # Named as what it was (s44): a re-learning, not an enrolment.
    assert store.get_token("t1").superseded_by == "re-learning"
    assert [t.superseded_by for t in store.list_tokens()] == ["re-learning"]
    before = rows(store)
    with pytest.raises(TokenRejected) as refused:
        enrol(store, key_pin=PIN)  # re-certified the agent's key behind its back, before
    assert str(refused.value) == (
        "join token t1 is superseded by node1's re-learning at 2026-05-01 12:00:00 UTC (the"
        " leader's restored or reinitialised store learned the node from its agent); create a"
        " new token"
    )
    assert rows(store) == before
    assert node_row(store)["cert_fingerprint"] == cert.fingerprint


@contextlib.contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """Every SQL statement the store's connection runs meanwhile, as SQLite gives it to the
    connection's trace callback (``sqlite3.Connection.set_trace_callback``: called once per
    statement run, with its text, its values bound). The store keeps no count of its reads,
    and what this asks (whether the audit is read at all, and by how many statements) is in
    the text; how SQLite reads it (by the index of schema 13, not a scan), in its plan
    (``tests/test_superseded_index.py``)."""
    ran: list[str] = []
    with store.db.read() as db:  # the store's one connection (reads and writes)
        db.set_trace_callback(ran.append)
    try:
        yield ran
    finally:
        with store.db.read() as db:
            db.set_trace_callback(None)


def reads_audit(ran: list[str]) -> list[str]:
    return [sql for sql in ran if re.search(r"\bfrom\s+audit\b", sql, re.IGNORECASE)]


def relearn_node(store: Store, name: str, address: str, *, now: dt.datetime = NOW) -> None:
    """``name`` re-learned from its agent by a restored (or reinitialised) store."""
    with store.db.tx() as db:
        db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('relearn_until', ?)",
            (to_text(NOW + dt.timedelta(hours=24)),),
        )
    assert store.relearn(
        name=name,
        names=((address,), ()),
        agent_port=9444,
        key_pin=f"PIN-OF-{name}",
        cert=issuer(f"PIN-OF-{name}")(),
        highest_epoch=0,
        now=now,
    )


def test_what_superseded_a_token_is_read_from_the_audit_only_to_say_it(store: Store) -> None:
    """Review s44rev3 M1: the audit (no index for it, never pruned: a year of a fleet is
    hundreds of thousands of rows) was scanned for every lookup of a superseded token, before
    its secret was checked: each wrong guess at a superseded token's id, each retry of a stale
    script, and ``token list`` once per superseded token. Now the token is checked on its own
    row; the audit is read to refuse a token whose secret was right (one statement), and for
    ``token list`` by one statement for all the tokens listed, whatever their number."""
    add_token(store, "t0")
    enrol(store)  # by t1: supersedes t0 (node1's enrolment)
    for n, name in enumerate(("node2", "node3", "node4"), start=2):
        for k in range(2):
            add_token(store, f"{name}-{k}", node_name=name, addresses=(f"127.0.0.{10 + n}",))
        relearn_node(store, name, f"127.0.0.{10 + n}", now=NOW + dt.timedelta(minutes=n))
    later = NOW + dt.timedelta(minutes=10)

    # A wrong secret at a superseded token's id:
    with statements(store) as ran, pytest.raises(TokenRejected) as refused:
        enrol(store, token_id="node2-0", secret="w" * 26, name="node2", now=later)
    assert str(refused.value) == f"join token not valid; {WAY_TO_JOIN_AGAIN}"  # (nothing of node2)
    assert any("FROM tokens" in sql for sql in ran), ran  # (the hook sees the statements)
    assert reads_audit(ran) == []

    # The right secret: refused, and says what superseded it.
    with statements(store) as ran, pytest.raises(TokenRejected, match="node2's re-learning at"):
        enrol(store, token_id="node2-0", name="node2", addresses=("127.0.0.12",), now=later)
    assert len(reads_audit(ran)) == 1, ran

    with statements(store) as ran:
        listed = store.list_tokens()
    assert len(reads_audit(ran)) == 1, ran  # for the six superseded tokens of three nodes
    assert not any("FROM tokens" in sql for sql in reads_audit(ran)), ran  # not per token
    assert [(t.id, t.superseded_by) for t in listed] == [
        ("node2-0", "re-learning"),
        ("node2-1", "re-learning"),
        ("node3-0", "re-learning"),
        ("node3-1", "re-learning"),
        ("node4-0", "re-learning"),
        ("node4-1", "re-learning"),
        ("t0", "enrolment"),
        ("t1", ""),  # used up by the enrolment, not superseded
    ]
    add_token(store, "t2", now=later)  # not superseded: listed and looked up without the audit
    with statements(store) as ran:
        assert store.get_token("t2").superseded_by == ""
        enrol(store, token_id="t2", key_pin=PIN, now=later)
    assert reads_audit(ran) == []


def test_the_migration_supersedes_the_tokens_made_before_an_enrolment(tmp_path: Path) -> None:
    """A store of the release before: node1 enrolled by t1, t0 made before it and t9 after it
    (still pending, for a re-enrolment), t8 for another node; the upgrade supersedes t0 at
    node1's enrolment, and only t0."""
    path = tmp_path / "leader.sqlite3"
    Database(path, MIGRATIONS[:11]).close()  # the schema of the release before
    conn = sqlite3.connect(path)
    for token_id, node, created, left in [
        ("t0", "node1", "2026-05-01T11:00:00+00:00", 1),
        ("t1", "node1", "2026-05-01T11:30:00+00:00", 0),
        ("tx", "node1", "2026-05-01T11:40:00+00:00", 2),  # --uses 2: its second use
        ("t9", "node1", "2026-05-01T12:30:00+00:00", 1),
        ("t8", "node8", "2026-05-01T11:00:00+00:00", 1),
    ]:
        conn.execute(
            "INSERT INTO tokens (id, secret_hash, description, created_at, expires_at,"
            " uses_allowed, uses_left, node_name, addresses, dns_names)"
            " VALUES (?, '', '', ?, '2026-05-02T00:00:00+00:00', 2, ?, ?, '[]', '[]')",
            (token_id, created, left, node),
        )
    conn.execute(
        "INSERT INTO nodes (name, addresses, dns_names, agent_version, agent_port, key_pin,"
        " cert_fingerprint, cert_serial, cert_not_after, enrolled_at, token_id)"
        " VALUES ('node1', '[]', '[]', 'v', 9444, 'p', 'f', '1', '2026-06-01T00:00:00+00:00',"
        " '2026-05-01T12:00:00+00:00', 't1')"
    )
    conn.commit()
    conn.close()
    s = Store(path)
    try:
        superseded = {t.id: t.superseded_at for t in s.list_tokens()}
    finally:
        s.close()
    enrolled = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
    assert superseded == {"t0": enrolled, "t1": None, "tx": enrolled, "t9": None, "t8": None}


def test_a_revoked_key_is_found_by_the_index_of_the_certificates_keys(store: Store) -> None:
    """Review rev-enrol H1: every node certificate is recorded with its key (schema 18), and an
    enrolment looks a key up among the revoked ones by the partial index on it, never by a scan
    of the certificates (a server certificate per node per rollout: the table grows)."""
    first = enrol(store)  # node1, by t1, with PIN
    store.revoke(first.serial, reason="copied key", now=NOW, actor="admin")
    with store.db.read() as db:
        (recorded,) = db.execute("SELECT key_pin FROM certificates WHERE kind = 'node'").fetchall()
    assert recorded["key_pin"] == PIN
    add_token(store, "t2", node_name="node2", addresses=("127.0.0.10",))
    before = rows(store)
    other: dict[str, Any] = {"token_id": "t2", "name": "node2", "addresses": ("127.0.0.10",)}
    with (
        statements(store) as ran,
        pytest.raises(
            TokenRejected,
            match=rf"^a certificate of this key \(node 'node1', serial {first.serial}\) was"
            r" revoked: enrol the node with a new key",
        ),
    ):
        enrol(store, now=NOW + dt.timedelta(minutes=1), **other)
    assert rows(store) == before
    looked = [sql for sql in ran if "key_pin = " in sql and "FROM certificates" in sql]
    assert len(looked) == 1, ran
    with store.db.read() as db:
        plan = " | ".join(r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {looked[0]}"))
    assert "USING INDEX certificates_key_pin" in plan, plan
    enrol(store, key_pin="A-NEW-KEY", now=NOW + dt.timedelta(minutes=1), **other)


def test_a_certificate_whose_key_no_enrolment_takes_is_not_relearned(store: Store) -> None:
    """Review s65 follow-up: ``relearn`` took any certificate the CA issued, whatever the store
    knew of its key since (a restore keeps what the backup knew): the key of a removed node, or
    of another node on record, came back as a node of its own. Refused now as an enrolment
    refuses it (``_key_refused``), one line, and nothing written; a certificate the store
    would not learn anyway keeps the refusal it had (False: its caller's own words)."""
    from leader.store import KeyRefused

    enrol(store)  # node1, PIN
    relearn_node(store, "node2", "127.0.0.12")  # (opens the window; node2's key is its own)
    before = rows(store)
    with pytest.raises(KeyRefused) as refused:
        store.relearn(
            name="node3",
            names=(("127.0.0.13",), ()),
            agent_port=9444,
            key_pin=PIN,
            cert=issuer(PIN)(),
            highest_epoch=0,
            now=NOW,
        )
    said = str(refused.value)
    assert "this key is node 'node1''s, enrolled" in said and "\n" not in said, said
    assert "enrol the node with a new key" in said and "new join token" in said, said
    assert rows(store) == before
    store.remove_node("node1", now=NOW, actor="admin")
    before = rows(store)
    with pytest.raises(KeyRefused, match="this key was node 'node1''s, removed"):
        store.relearn(
            name="node3",
            names=(("127.0.0.13",), ()),
            agent_port=9444,
            key_pin=PIN,
            cert=issuer(PIN)(),
            highest_epoch=0,
            now=NOW,
        )
    assert rows(store) == before
    # A name the store would not learn anyway (removed): refused as before, no KeyRefused.
    assert not store.relearn(
        name="node1",
        names=((ADDRESS,), ()),
        agent_port=9444,
        key_pin=PIN,
        cert=issuer(PIN)(),
        highest_epoch=0,
        now=NOW,
    )
    assert rows(store) == before


def test_a_known_node_whose_key_is_refused_at_its_relearning_is_told_to_be_removed_first(
    store: Store,
) -> None:
    """Review s66 rva L2: a node the restored store has on record, renewed since the backup
    with a key the store refuses (here another node's), was told to move its key aside and
    enrol with a new token: that enrolment is refused (its name is taken) until the node is
    removed. The refusal says ``tlsroll nodes remove NAME`` first; a node not on record keeps
    the advice without it (the test above)."""
    from leader.store import KeyRefused, NameTaken

    enrol(store)  # node1, PIN
    add_token(store, "t2", node_name="node2", addresses=("127.0.0.10",))
    enrol(store, token_id="t2", name="node2", addresses=("127.0.0.10",), key_pin="NODE2-KEY")
    with store.db.tx() as db:
        for key, value in (
            ("relearn_until", NOW + dt.timedelta(hours=24)),
            ("restored_backup_at", NOW + dt.timedelta(minutes=1)),
            ("restored_at", NOW + dt.timedelta(minutes=2)),
        ):
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, to_text(value)))
    before = rows(store)
    with pytest.raises(KeyRefused) as refused:
        store.relearn(
            name="node1",
            names=((ADDRESS,), ()),
            agent_port=9444,
            key_pin="NODE2-KEY",
            cert=issuer("NODE2-KEY")(),
            highest_epoch=0,
            now=NOW + dt.timedelta(minutes=3),
            issued_at=NOW + dt.timedelta(seconds=90),
        )
    said = str(refused.value)
    assert "this key is node 'node2''s" in said and "\n" not in said, said
    assert "run `tlsroll nodes remove node1` first" in said, said
    assert said.index("nodes remove") < said.index("new join token"), said
    assert rows(store) == before
    # ... as the advice says: a new key under its name is refused while it is on record
    add_token(store, "t3")
    with pytest.raises(NameTaken):
        enrol(store, token_id="t3", key_pin="A-NEW-KEY", now=NOW + dt.timedelta(minutes=4))
    store.remove_node("node1", now=NOW + dt.timedelta(minutes=5), actor="admin")
    # (the removal revoked the node's tokens: a new one, as the advice says)
    add_token(store, "t4", now=NOW + dt.timedelta(minutes=5))
    enrol(store, token_id="t4", key_pin="A-NEW-KEY", now=NOW + dt.timedelta(minutes=6))


def test_a_relearning_puts_the_key_it_replaces_on_record_with_its_certificate(
    store: Store,
) -> None:
    """Review s65 whole (M2) at a re-learning (``relearn``'s ``_stamp_row_keys``): node1 was
    enrolled before schema 18 (its certificate on record without its key); the store is
    restored from a backup made since, and its agent, renewed after the backup, is re-learned
    with a new key. The row's key was the only place the old key was: once the admin revokes
    the old certificate (its key copied), a token for another name must not enroll that key."""
    first = enrol(store)  # node1, PIN
    with store.db.tx() as db:
        db.execute("UPDATE certificates SET key_pin = '' WHERE kind = 'node'")
        for key, value in (
            ("relearn_until", NOW + dt.timedelta(hours=24)),
            ("restored_backup_at", NOW + dt.timedelta(minutes=1)),
            ("restored_at", NOW + dt.timedelta(minutes=2)),
        ):
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, to_text(value)))
    later = NOW + dt.timedelta(minutes=3)
    assert store.relearn(
        name="node1",
        names=((ADDRESS,), ()),
        agent_port=9444,
        key_pin="RENEWED-KEY",
        cert=issuer("RENEWED-KEY")(),
        highest_epoch=0,
        now=later,
        issued_at=NOW + dt.timedelta(seconds=90),
    )
    assert node_row(store)["key_pin"] == "RENEWED-KEY"
    assert store.revoke(first.serial, reason="key copied", now=later, actor="admin") == [
        first.serial
    ]
    add_token(store, "t2", now=later, node_name="node2", addresses=("127.0.0.20",))
    with pytest.raises(TokenRejected, match=f"serial {first.serial}\\) was revoked"):
        enrol(store, token_id="t2", name="node2", addresses=("127.0.0.20",), now=later)
