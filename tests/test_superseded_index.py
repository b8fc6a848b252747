"""What superseded a join token is read through the audit's index of re-learnings (store schema
13, ``leader.db._V13``), never by a scan of the audit (session 45): the audit is never pruned,
and a refusal of a superseded token whose secret was right, or a ``token list``, scanned all
of it. On the real SQLite file: the plan SQLite makes for the very statements the store runs
(``EXPLAIN QUERY PLAN`` of each, as the connection's trace callback gives it, its values
bound), a store of the schema before migrated with the same answers, and the older leader on
the migrated store and on a backup of it (README "Downgrading tlsroll",
"Backups"). The leader of the schema before is this code with the migrations it had
(``MIGRATIONS[:12]``, nothing ignorable): the statements that read and write tokens and the
audit are the same, only the migration is new.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from leader import backup
from leader import db as leader_db
from leader import store as leader_store
from leader.store import Store, TokenRejected, superseded_text
from tests.test_store_enrol import (
    NOW,
    SECRET,
    add_token,
    enrol,
    reads_audit,
    relearn_node,
    statements,
)
from tlsroll.sqlite import copy_name, to_text

BEFORE = 12
"""The store schema of the release before this migration."""

LATER = NOW + dt.timedelta(minutes=30)


def user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def indexes_of_audit(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        return {r[0] for r in db.execute("SELECT name FROM pragma_index_list('audit')")}


@contextlib.contextmanager
def older_leader(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The leader of the schema before: its migrations, none an older one may ignore; it
    recorded neither a certificate's parent (schema 17) nor a node certificate's key (nor a
    node row's onto its certificate), nor refused a key for one (schema 18, s65)."""
    with monkeypatch.context() as m:
        m.setattr(leader_db, "MIGRATIONS", leader_db.MIGRATIONS[:BEFORE])
        m.setattr(leader_db, "IGNORABLE", frozenset())
        m.setattr(leader_store, "_record_issued_from", lambda *_: None)
        m.setattr(leader_store, "_record_key_pin", lambda *_: None)
        m.setattr(leader_store, "_stamp_row_keys", lambda *_: None)
        m.setattr(leader_store, "_key_refused", lambda *_, **__: None)
        yield


def audit_plans(store: Store, ran: list[str]) -> list[str]:
    """SQLite's plan for each statement of ``ran`` that reads the audit, as it was run: its
    steps' words, one string a statement."""
    with store.db.read() as db:
        return [
            " | ".join(r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in reads_audit(ran)
        ]


def assert_by_the_index(store: Store, ran: list[str], count: int = 1) -> None:
    plans = audit_plans(store, ran)
    assert len(plans) == count, ran
    for plan in plans:
        assert "SCAN audit" not in plan, plan
        assert "USING INDEX audit_relearned" in plan, plan


def fill_audit(store: Store, n: int) -> None:
    """``n`` audit rows of other kinds, of the nodes as well (a year of a fleet, in small)."""
    with store.db.tx() as db:
        db.executemany(
            "INSERT INTO audit (at, actor, kind, subject, detail) VALUES (?, 'admin', ?, ?, '{}')",
            [
                (to_text(NOW), kind, f"node{i % 5}")
                for i in range(n)
                for kind in ("node.heartbeat_gap", "token.created")
            ],
        )


def superseded(store: Store) -> list[tuple[str, Any, str]]:
    """``token list``'s answer on what superseded each token, and when."""
    return [(t.id, t.superseded_at, t.superseded_by) for t in store.list_tokens()]


def refusal(store: Store, token_id: str, name: str, address: str) -> str:
    """The refusal of the token, given its right secret."""
    with pytest.raises(TokenRejected) as refused:
        enrol(store, token_id=token_id, name=name, addresses=(address,), now=LATER)
    return str(refused.value)


def node_token(store: Store, token_id: str, name: str, address: str) -> None:
    store.add_token(
        token_id,
        SECRET,
        ttl=dt.timedelta(hours=2),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name=name,
        addresses=(address,),
    )


def superseded_both_ways(store: Store) -> None:
    """t0 superseded by node1's enrolment (by t1), node2-0 and node2-1 by node2's re-learning
    (a restored store learned it from its agent), amid other audit rows."""
    store.add_token(
        "t1",
        SECRET,
        ttl=dt.timedelta(hours=2),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name="node1",
        addresses=("127.0.0.9",),
    )
    add_token(store, "t0")
    fill_audit(store, 1000)
    enrol(store)
    for k in range(2):
        node_token(store, f"node2-{k}", "node2", "127.0.0.12")
    relearn_node(store, "node2", "127.0.0.12", now=NOW + dt.timedelta(minutes=2))
    fill_audit(store, 1000)


def test_what_superseded_a_token_is_read_by_the_index_never_a_scan(tmp_path: Path) -> None:
    """The refusal of a superseded token whose secret was right, ``get_token`` and ``token
    list`` read the audit's re-learnings of the tokens' nodes by the index. Before: "SCAN
    audit", every row of it, for each."""
    store = Store(tmp_path / "leader.sqlite3")
    try:
        superseded_both_ways(store)
        with statements(store) as ran:
            text = refusal(store, "node2-0", "node2", "127.0.0.12")
        assert "superseded by node2's re-learning at" in text
        assert_by_the_index(store, ran)
        with statements(store) as ran:
            text = refusal(store, "t0", "node1", "127.0.0.9")
        assert "superseded by node1's enrolment at" in text
        assert_by_the_index(store, ran)
        with statements(store) as ran:
            listed = superseded(store)
        assert_by_the_index(store, ran)
        assert [(i, by) for i, _, by in listed] == [
            ("node2-0", "re-learning"),
            ("node2-1", "re-learning"),
            ("t0", "enrolment"),
            ("t1", ""),
        ]
        with statements(store) as ran:
            assert store.get_token("node2-1").superseded_by == "re-learning"
        assert_by_the_index(store, ran)
    finally:
        store.close()


def answers(store: Store) -> tuple[list[tuple[str, Any, str]], list[str]]:
    return superseded(store), [
        refusal(store, "t0", "node1", "127.0.0.9"),
        refusal(store, "node2-0", "node2", "127.0.0.12"),
    ]


def test_a_store_of_the_schema_before_migrates_and_answers_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store the leader of schema 12 wrote, with tokens superseded by an enrolment and by a
    re-learning, is migrated as the leader opens it (no copy before: that leader reads the
    migrated file as it is): what superseded each token, and the refusals' words, are what
    that leader said, now read by the index.
    The migration is one an older leader may ignore: the file says schema 12 may read it."""
    path = tmp_path / "leader.sqlite3"
    with older_leader(monkeypatch):
        old = Store(path)
        try:
            superseded_both_ways(old)
            before = answers(old)
        finally:
            old.close()
    assert user_version(path) == BEFORE
    assert "audit_relearned" not in indexes_of_audit(path)
    assert [by for _, _, by in before[0]] == ["re-learning", "re-learning", "enrolment", ""]

    store = Store(path)  # the upgrade
    try:
        assert user_version(path) == len(leader_db.MIGRATIONS) > BEFORE
        assert "audit_relearned" in indexes_of_audit(path)
        # No copy: the leader of schema 12 reads the migrated file as it is (rev50a L1).
        assert not copy_name(path, len(leader_db.MIGRATIONS)).exists()
        with store.db.read() as db:
            floor = db.execute("SELECT readable_by FROM schema_floor").fetchall()
        assert [tuple(r) for r in floor] == [(BEFORE,)]
        with statements(store) as ran:
            after = answers(store)
        assert after == before
        assert_by_the_index(store, ran, count=3)
        assert after[1][1] == superseded_text(store.get_token("node2-0"))
    finally:
        store.close()


def test_the_older_leader_runs_on_the_migrated_store_and_on_a_backup_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README "Downgrading tlsroll": the leader of schema 12 opens a store of schema 13 as it is
    (``store.newer_schema_read``, nothing lost), and so a backup this leader made
    (``leader.backup``'s copy of the store, restored: ``store.restored``, its tokens with a use
    left revoked). What it writes there (a node re-learned, its token superseded) is in the
    index SQLite kept up to date: this leader, back on the file, reads it by the index and
    says what the older one said."""
    path = tmp_path / "leader.sqlite3"
    store = Store(path)
    try:
        superseded_both_ways(store)
        before = superseded(store)
    finally:
        store.close()
    copy = tmp_path / "backup" / "leader.sqlite3"
    copy.parent.mkdir()
    backup._copy_store(path, copy, NOW + dt.timedelta(minutes=5))
    assert user_version(copy) == len(leader_db.MIGRATIONS)

    for where in (path, copy):
        with older_leader(monkeypatch), structlog.testing.capture_logs() as logs:
            old = Store(where)
            try:
                read_as_is = [e for e in logs if e["event"] == "store.newer_schema_read"]
                assert [e["readable_by"] for e in read_as_is] == [BEFORE], logs
                restored = old.restore_began(LATER)
                assert (restored is not None) == (where == copy)
                assert superseded(old) == before
                node_token(old, "node3-0", "node3", "127.0.0.13")
                relearn_node(old, "node3", "127.0.0.13", now=LATER)
                by_the_older = superseded(old)
            finally:
                old.close()
        assert user_version(where) == len(leader_db.MIGRATIONS)  # left as it was
        assert ("node3-0", LATER, "re-learning") in by_the_older

        store = Store(where)
        try:
            with statements(store) as ran:
                assert superseded(store) == by_the_older
            assert_by_the_index(store, ran)
            with store.db.read() as db:
                assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                indexed = db.execute(
                    "SELECT subject FROM audit INDEXED BY audit_relearned"
                    " WHERE kind = 'node.relearned' ORDER BY seq"
                ).fetchall()
            assert [r[0] for r in indexed] == ["node2", "node3"]
        finally:
            store.close()
