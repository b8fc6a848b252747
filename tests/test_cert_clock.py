"""The leader's certificate bookkeeping and its clock (session 36; clock audit s35, F and J): a
step of the leader's wall clock moves neither the hourly certificate caps nor which server
certificates a rollout revokes as never delivered, and the order certificates were recorded
in is a column of the file that its copies keep (``NAME.before-vN``).

Real SQLite stores; the leader's wall and monotonic clocks are injected (``Store.bind_clocks``,
as the service binds them): time passing moves both, a step moves the wall clock alone."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from leader import db as leader_db
from leader import planner
from leader.rollout_core import Change, NodeState, RolloutEvent, Scope
from leader.schema_store import RolloutMeta, RolloutRow, SchemaStore
from leader.store import (
    NODE_CERTS_PER_HOUR,
    WITHDRAW_WINDOW,
    IssuedCert,
    NodeCert,
    NotFound,
    Store,
    TooLate,
    TooMany,
    _check_hourly_certs,
    _record_cert,
)
from leader.store_rules import WORKSTATION_CERTS_PER_HOUR
from tlsroll.sqlite import Database, copy_name, migrate

T = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
MINUTE = dt.timedelta(minutes=1)
BEFORE = 9  # the leader store's schema before migration 10 (the certificates' columns)


class Clocks:
    """The leader's wall clock and its monotonic clock, bound to a store."""

    def __init__(self, at: dt.datetime = T, mono: float = 1000.0) -> None:
        self.wall, self.mono = at, mono

    def bind(self, store: Store) -> Store:
        store.bind_clocks(lambda: self.wall, lambda: self.mono)
        return store

    def passes(self, span: dt.timedelta) -> None:
        self.wall += span
        self.mono += span.total_seconds()

    def steps(self, by: dt.timedelta) -> None:
        self.wall += by


class Node:
    """Node ``n1`` of a store: enrolled, renewing (each renewal counts in its hour's cap) and
    asking for workstation certificates (counted in theirs)."""

    def __init__(self, store: Store, clocks: Clocks) -> None:
        self.store, self.clocks = store, clocks
        self.serials: Iterator[int] = itertools.count(1)
        store.add_token(
            "t1", "s" * 26, ttl=HOUR, uses=1, description="", now=clocks.wall, actor="test",
            node_name="n1", addresses=("10.1.1.1",),
        )  # fmt: skip
        cert = self._cert()
        store.enrol(
            token_id="t1", secret="s" * 26, name="n1", addresses=("10.1.1.1",), dns_names=(),
            agent_version="1", agent_port=9442, key_pin="pin", issue=lambda: cert,
            now=clocks.wall,
        )  # fmt: skip
        self.current = cert

    def _cert(self) -> NodeCert:
        n = next(self.serials)
        return NodeCert("pin", f"fp{n}", f"{n:x}", self.clocks.wall + 30 * DAY)

    def renew(self) -> None:
        cert = self._cert()
        self.current = self.store.renew_node_certificate(
            "n1", presented=self.current.fingerprint, presented_serial=self.current.serial,
            key_pin="pin", issue=lambda _apart: cert, now=self.clocks.wall,
        )  # fmt: skip

    def renew_until_refused(self) -> int:
        """Renew until the cap refuses; how many renewals it allowed."""
        for n in range(NODE_CERTS_PER_HOUR + 1):
            try:
                self.renew()
            except TooMany:
                return n
        raise AssertionError("the cap never refused")

    def workstation(self, name: str) -> None:
        def issue() -> IssuedCert:
            n = next(self.serials)
            at = self.clocks.wall
            return IssuedCert(f"{n:x}", "workstation", name, "n1", f"fp{n}", at, at + DAY)

        self.store.issue_workstation(
            "n1", name, issue, now=self.clocks.wall, presented=self.current.fingerprint,
            presented_serial=self.current.serial,
        )  # fmt: skip

    def may_renew(self) -> bool:
        try:
            self.renew()
        except TooMany:
            return False
        return True


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def store(tmp_path: Path, clocks: Clocks) -> Iterator[Store]:
    store = clocks.bind(Store(tmp_path / "leader.sqlite3"))
    yield store
    store.close()


# --- the hourly caps --------------------------------------------------------------------------


def test_a_step_forward_does_not_lift_a_node_s_hourly_cap(store: Store, clocks: Clocks) -> None:
    """The cap counted by ``issued_at``: two hours ahead, the hour's 30 certificates looked
    two hours old and the node had 30 more at once (and 30 more at each step)."""
    node = Node(store, clocks)  # its enrolment counts
    assert node.renew_until_refused() == NODE_CERTS_PER_HOUR - 1
    clocks.passes(10 * MINUTE)
    clocks.steps(2 * HOUR)
    assert not node.may_renew()
    clocks.passes(50 * MINUTE)  # the hour since they were issued, in elapsed time
    assert node.may_renew()


def test_a_step_back_locks_a_node_out_for_an_hour_at_most(store: Store, clocks: Clocks) -> None:
    """The cap counted what was issued "later" than the clock: a node that used its hour's
    renewals just before a step back of a day could not renew, replay or sign a workstation
    certificate for that day."""
    node = Node(store, clocks)
    assert node.renew_until_refused() == NODE_CERTS_PER_HOUR - 1
    clocks.steps(-DAY)
    assert not node.may_renew()  # still its hour
    clocks.passes(HOUR + MINUTE)
    assert node.may_renew()


def test_a_node_s_workstation_cap_goes_by_elapsed_time(store: Store, clocks: Clocks) -> None:
    node = Node(store, clocks)
    for n in range(WORKSTATION_CERTS_PER_HOUR):
        node.workstation(f"ws-{n}")
    with pytest.raises(TooMany, match=r"asked for 100 workstation certificates in the last hour"):
        node.workstation("ws-next")
    clocks.steps(3 * HOUR)
    with pytest.raises(TooMany):
        node.workstation("ws-next")
    clocks.steps(-2 * DAY)
    with pytest.raises(TooMany):
        node.workstation("ws-next")
    clocks.passes(HOUR + MINUTE)
    node.workstation("ws-next")


def test_a_node_withdraws_a_workstation_certificate_within_minutes_of_its_issue_by_elapsed_time(
    store: Store, clocks: Clocks
) -> None:
    """Session 43: a node may withdraw a workstation certificate it could not deliver only
    within ``WITHDRAW_WINDOW`` of its issue, by elapsed time (the caps' clock): a step of the
    wall clock neither shortens it nor makes an old certificate (delivered, maybe in use)
    withdrawable; after it, the admin revokes."""
    node = Node(store, clocks)

    def withdraw(fingerprint: str) -> str | None:
        return store.withdraw_workstation(
            "n1", fingerprint, now=clocks.wall, presented=node.current.fingerprint,
            presented_serial=node.current.serial,
        )  # fmt: skip

    node.workstation("ws-a")  # fp2
    clocks.steps(-DAY)  # the wall clock back a day: still minutes since its issue
    clocks.passes(WITHDRAW_WINDOW - MINUTE)
    assert withdraw("fp2") == "2"
    assert withdraw("fp2") is None  # idempotent
    node.workstation("ws-b")  # fp3
    clocks.steps(-2 * WITHDRAW_WINDOW)  # back: the window counts elapsed time, not the wall
    clocks.passes(WITHDRAW_WINDOW + MINUTE)
    with pytest.raises(TooLate, match=r"tlsroll workstations revoke ws-b"):
        withdraw("fp3")
    with pytest.raises(NotFound):
        withdraw("fp-unknown")
    reasons = {c.subject: c.revoke_reason for c in store.list_certificates("workstation")}
    assert reasons == {"ws-a": "never delivered", "ws-b": ""}


def test_the_cap_holds_across_a_restart_and_a_clock_behind_holds_it_an_hour(
    tmp_path: Path, store: Store, clocks: Clocks
) -> None:
    """Durable as before: a restarted leader counts what the store holds. One whose clock
    stepped back a day while it was down (or started before NTP set it) counts what was
    issued "later" for an hour after its start, not for the day."""
    node = Node(store, clocks)
    assert node.renew_until_refused() == NODE_CERTS_PER_HOUR - 1
    store.close()

    again = Clocks(T + 10 * MINUTE, mono=50.0)
    node.store = again.bind(Store(tmp_path / "leader.sqlite3"))
    node.clocks = again
    assert not node.may_renew()
    node.store.close()

    behind = Clocks(T - DAY, mono=7.0)
    node.store = behind.bind(Store(tmp_path / "leader.sqlite3"))
    node.clocks = behind
    assert not node.may_renew()
    behind.passes(30 * MINUTE)
    assert not node.may_renew()
    behind.passes(30 * MINUTE + MINUTE)
    assert node.may_renew()
    node.store.close()


def test_a_start_with_the_clock_far_ahead_leaves_no_lead_after_an_hour(tmp_path: Path) -> None:
    """A leader that once started with its clock a year ahead (before NTP set it) counted by
    it, and kept counting by it after the clock was corrected (no step moves ``cap_now``).
    Restarted, it used to start ``cap_now`` from the latest ``counted_at`` (a year ahead
    still): every restart counted the last hour's certificates again, whatever the downtime
    (review s36 F5). Now the restart moves them back to end at its clock: they count for the
    hour after the start as they did, and no lead is left. (A time two years back, so that
    the store's first reading of the real clock, as it opens, is later than all of it.)"""
    start = T - 2 * 365 * DAY
    ahead = 365 * DAY
    clocks = Clocks(start + ahead, mono=100.0)  # started a year ahead
    node = Node(clocks.bind(Store(tmp_path / "leader.sqlite3")), clocks)
    clocks.steps(-ahead)  # corrected a minute later
    clocks.passes(MINUTE)
    clocks.passes(30 * DAY)
    assert node.renew_until_refused() == NODE_CERTS_PER_HOUR  # (its enrolment: a month ago)
    assert node.store.cap_now() - clocks.wall > 364 * DAY  # counting by it, as designed
    node.store.close()

    # restarted ten minutes later: what the hour counted still counts, for the hour after the
    # start (the time it was down is not known: its clock counted a year ahead), as it did
    again = Clocks(clocks.wall + 10 * MINUTE, mono=5.0)
    node.store, node.clocks = again.bind(Store(tmp_path / "leader.sqlite3")), again
    assert abs(node.store.cap_now() - again.wall) < MINUTE
    assert not node.may_renew()
    again.passes(59 * MINUTE)
    assert not node.may_renew()
    again.passes(2 * MINUTE)
    assert node.may_renew()
    node.store.close()

    # restarted three hours later: nothing of that hour counts any more
    later = Clocks(again.wall + 3 * HOUR, mono=9.0)
    node.store, node.clocks = later.bind(Store(tmp_path / "leader.sqlite3")), later
    assert abs(node.store.cap_now() - later.wall) < MINUTE
    assert node.renew_until_refused() == NODE_CERTS_PER_HOUR
    node.store.close()


def test_the_migration_counts_no_certificate_later_than_the_upgrade(tmp_path: Path) -> None:
    """Migration 10 took ``counted_at`` from ``issued_at``: one certificate of the release
    before issued while the leader's clock was a year ahead, "later" than the upgrade still,
    became the latest one counted, and the hour's real certificates stopped counting (review
    s36 F5). It counts as issued at the upgrade now. (The real clock: the migration's.)"""
    path = tmp_path / "leader.sqlite3"
    Database(path, leader_db.MIGRATIONS[:BEFORE]).close()
    now = dt.datetime.now(dt.UTC)
    rows = [
        (f"a{i}", "n2", now - 10 * MINUTE) for i in range(NODE_CERTS_PER_HOUR)
    ]  # n2's hour: its cap used
    rows.append(("ff", "n1", now + 365 * DAY))  # issued while the clock was a year ahead
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO certificates (serial, kind, subject, node, fingerprint, issued_at,"
            " not_after) VALUES (?, 'node', ?, ?, ?, ?, ?)",
            [(s, n, n, f"fp-{s}", at.isoformat(), (at + DAY).isoformat()) for s, n, at in rows],
        )
    conn.close()
    store = Store(path)
    try:
        assert abs(store.cap_now() - dt.datetime.now(dt.UTC)) < MINUTE
        with store.db.read() as db:
            with pytest.raises(TooMany):
                _check_hourly_certs(db, "n2", store.cap_now())
            (counted,) = db.execute(
                "SELECT counted_at FROM certificates WHERE serial = 'ff'"
            ).fetchone()
        assert now <= dt.datetime.fromisoformat(counted) <= dt.datetime.now(dt.UTC)
    finally:
        store.close()


# --- never delivered: a rollout's own certificates ------------------------------------------------


def _rotation(schema: SchemaStore, rollout_id: str, now: dt.datetime) -> RolloutRow:
    """A running rotate-cert rollout of n1 and n2, started ``now`` (by the leader's clock)."""
    rollout, nodes = planner.plan_rollout(
        rollout_id=rollout_id,
        change=Change.ROTATE_CERT,
        scope=Scope.cluster(),
        enrolled={"n1": True, "n2": True},
        leader="n1",
        epoch=schema.next_epoch(),
    )
    meta = RolloutMeta(created_at=now, started_by="admin:test", leader_node="n1")
    row = schema.create(rollout, nodes, meta, now)
    return schema.save_states(row, row.rollout.with_event(RolloutEvent.START), (), now, "admin")


def _server_cert(serial: str, node: str, at: dt.datetime) -> IssuedCert:
    return IssuedCert(serial, "server", node, node, f"fp-{serial}", at, at + 397 * DAY)


def _preflight(
    schema: SchemaStore, row: RolloutRow, cert: IssuedCert, now: dt.datetime
) -> RolloutRow:
    """The node's preflight passed: its certificate recorded with the outcome (the stage
    would send it)."""
    rec = replace(row.node(cert.node)[0], state=NodeState.STAGING)
    return schema.save_states(row, row.rollout, [rec], now, "engine", certs=[cert])


def _ends(
    schema: SchemaStore, row: RolloutRow, name: str, state: NodeState, now: dt.datetime
) -> RolloutRow:
    rec = replace(row.node(name)[0], state=state, reason="test")
    return schema.save_states(row, row.rollout, [rec], now, "engine")


def _revoked(store: Store) -> dict[str, str]:
    return {c.serial: c.revoke_reason for c in store.list_certificates("server") if c.revoked_at}


def test_a_rollout_s_certificate_issued_after_a_step_back_is_revoked_as_never_delivered(
    store: Store,
) -> None:
    """Picked by ``issued_at`` within the rollout's span: the leader's clock stepped back a
    day after the rollout started, so the preflight's certificate of n1, never sent (n1
    failed), looked issued before the rollout and stayed valid, on record, for 397 days."""
    schema = SchemaStore(store.db)
    row = _rotation(schema, "r1", T)
    back = T - DAY
    row = _preflight(schema, row, _server_cert("a1", "n1", back), back)
    _ends(schema, row, "n1", NodeState.FAILED, back + MINUTE)
    assert _revoked(store) == {"a1": "never delivered"}


def test_a_node_failing_a_rollout_keeps_the_certificate_an_earlier_one_gave_it(
    store: Store,
) -> None:
    """The other way: r1 ran with the leader's clock an hour ahead and gave n1 the
    certificate it serves (a1). The clock corrected, r2 started ten minutes later and n1
    failed in it an hour after, before anything was staged: a1's ``issued_at`` fell in r2's
    span and it was revoked as "never delivered", the certificate n1 serves: its clients
    refused it at their next check of the revocation list."""
    schema = SchemaStore(store.db)
    ahead = T + HOUR
    r1 = _rotation(schema, "r1", ahead)
    r1 = _preflight(schema, r1, _server_cert("a1", "n1", ahead), ahead)
    r1 = _ends(schema, r1, "n1", NodeState.DONE, ahead + MINUTE)
    r1 = _ends(schema, r1, "n2", NodeState.SKIPPED, ahead + MINUTE)
    schema.save_states(
        r1, r1.rollout.with_event(RolloutEvent.NODES_SETTLED), (), ahead + MINUTE, "engine"
    )
    r2 = _rotation(schema, "r2", T + 10 * MINUTE)
    r2 = _preflight(schema, r2, _server_cert("b2", "n2", T + 20 * MINUTE), T + 20 * MINUTE)
    r2 = _ends(schema, r2, "n1", NodeState.FAILED, T + 70 * MINUTE)
    assert _revoked(store) == {}
    _ends(schema, r2, "n2", NodeState.ROLLED_BACK, T + 80 * MINUTE)
    assert _revoked(store) == {"b2": "never delivered"}


# --- the record order, in the file and in its copies ------------------------------------------


def _record(db: sqlite3.Connection, serial: str, fingerprint: str, at: dt.datetime) -> None:
    _record_cert(db, serial, "server", "n1", "n1", fingerprint, at, at + 397 * DAY)


def _columns(path: Path) -> dict[str, tuple[str, int]]:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return {r[1]: (r[2], r[5]) for r in conn.execute("PRAGMA table_info(certificates)")}
    finally:
        conn.close()


def _order(path: Path) -> list[tuple[int, str]]:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute("SELECT seq, serial FROM certificates ORDER BY seq")]
    finally:
        conn.close()


def test_the_record_order_is_a_column_that_the_copy_before_a_migration_keeps(
    tmp_path: Path,
) -> None:
    """``revoke_superseded_in`` goes by the order certificates were recorded in. It was the
    implicit rowid, which SQLite documents as not persistent ("the VACUUM command may change
    the ROWIDs of entries in any tables that do not have an explicit INTEGER PRIMARY KEY"),
    and ``NAME.before-vN``, the copy put back after a tlsroll rolled back, is a ``VACUUM
    INTO``. Now it is ``seq``, an INTEGER PRIMARY KEY: a v9 file's rowids become ``seq`` as
    they were (record order, not serial nor issue time), and the copy of the migrated file,
    put back, supersedes by the same order."""
    path = tmp_path / "leader.sqlite3"
    Database(path, leader_db.MIGRATIONS[:BEFORE]).close()  # as the build before left it
    conn = sqlite3.connect(path)
    with conn:
        # recorded: ff (the leader's clock a day ahead), then 11 (corrected: live now), then 88
        # (another node's), then a gap where a row went, then 33 (a later rollout's)
        for serial, node, at in (("ff", "n1", T + DAY), ("11", "n1", T), ("88", "n2", T)):
            conn.execute(
                "INSERT INTO certificates (serial, kind, subject, node, fingerprint, issued_at,"
                " not_after) VALUES (?, 'server', ?, ?, ?, ?, ?)",
                (serial, node, node, f"fp-{serial}", at.isoformat(), (at + DAY).isoformat()),
            )
        conn.execute(
            "INSERT INTO certificates (rowid, serial, kind, subject, node, fingerprint,"
            " issued_at, not_after) VALUES (7, '33', 'server', 'n1', 'n1', 'fp-33', ?, ?)",
            ((T - HOUR).isoformat(), T.isoformat()),
        )
    conn.close()
    Store(path).close()  # migrated
    assert _columns(path)["seq"] == ("INTEGER", 1)  # the primary key: rowid's alias
    assert _order(path) == [(1, "ff"), (2, "11"), (3, "88"), (7, "33")]
    assert os.path.exists(copy_name(path, len(leader_db.MIGRATIONS)))

    # A copy of the migrated file as migrate keeps it (VACUUM INTO), put back over it.
    conn = sqlite3.connect(path)
    conn.execute("VACUUM INTO ?", (str(tmp_path / "copy.sqlite3"),))
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.rename(tmp_path / "copy.sqlite3", path)
    assert _order(path) == [(1, "ff"), (2, "11"), (3, "88"), (7, "33")]
    store = Store(path)
    try:
        with store.db.tx() as db:
            _record(db, "22", "fp-22", T - DAY)  # recorded last, whatever the clock said
        assert _order(path)[-1] == (8, "22")
        assert store.revoke_superseded("n1", "fp-11", before=T, now=T) == ["ff"]
        assert store.revoke_superseded("n1", "fp-22", before=T, now=T) == ["11", "33"]
    finally:
        store.close()


def test_the_migration_takes_a_live_rollout_s_certificates_for_its_own(tmp_path: Path) -> None:
    """A leader upgraded while a rollout is not ended (it resumes it): the server
    certificates recorded before had no rollout; those of its nodes issued since it began are
    taken for its own, so that "never delivered" still finds them. Node and workstation
    certificates count in the hourly caps by when they were issued, as before."""
    path = tmp_path / "leader.sqlite3"
    Database(path, leader_db.MIGRATIONS[:BEFORE]).close()
    conn = sqlite3.connect(path)
    with conn:
        for rid, state, epoch, started in (
            ("old", "completed", 1, T - DAY),
            ("r9", "running", 2, T),
        ):
            conn.execute(
                "INSERT INTO rollouts (id, change, scope_kind, scope_names, node_order, strategy,"
                " max_parallel, failure_budget, freeze, epoch, state, created_at, started_at,"
                " started_by, leader_node) VALUES (?, 'rotate-cert', 'cluster', '[]', '[]',"
                " 'direct', 1, 0, 'node', ?, ?, ?, ?, 'admin', 'n1')",
                (rid, epoch, state, started.isoformat(), started.isoformat()),
            )
            conn.execute(
                "INSERT INTO rollout_nodes (rollout_id, name, state) VALUES (?, 'n1', 'staging')",
                (rid,),
            )
        for serial, kind, at in (
            ("a0", "server", T - DAY + MINUTE),  # the ended rollout's
            ("a1", "server", T + MINUTE),  # the live one's preflight
            ("c1", "node", T + 2 * MINUTE),
        ):
            conn.execute(
                "INSERT INTO certificates (serial, kind, subject, node, fingerprint, issued_at,"
                " not_after) VALUES (?, ?, 'n1', 'n1', ?, ?, ?)",
                (serial, kind, f"fp-{serial}", at.isoformat(), (at + DAY).isoformat()),
            )
    conn.close()
    Store(path).close()
    conn = sqlite3.connect(path)
    try:
        got = conn.execute(
            "SELECT serial, rollout_id, counted_at FROM certificates ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    assert got == [
        ("a0", "", None),
        ("a1", "r9", None),
        ("c1", "", (T + 2 * MINUTE).isoformat()),
    ]


def _v9_with_rollouts(
    path: Path, rollouts: list[tuple[str, str, int, dt.datetime, tuple[str, ...]]]
) -> None:
    """A leader store as the release before migration 10 left it, with ``rollouts`` (id,
    state, epoch, started, nodes)."""
    Database(path, leader_db.MIGRATIONS[:BEFORE]).close()
    conn = sqlite3.connect(path)
    with conn:
        for rid, state, epoch, started, nodes in rollouts:
            conn.execute(
                "INSERT INTO rollouts (id, change, scope_kind, scope_names, node_order, strategy,"
                " max_parallel, failure_budget, freeze, epoch, state, created_at, started_at,"
                " started_by, leader_node) VALUES (?, 'rotate-cert', 'cluster', '[]', '[]',"
                " 'direct', 1, 0, 'node', ?, ?, ?, ?, 'admin', 'n1')",
                (rid, epoch, state, started.isoformat(), started.isoformat()),
            )
            conn.executemany(
                "INSERT INTO rollout_nodes (rollout_id, name, state) VALUES (?, ?, 'staging')",
                [(rid, node) for node in nodes],
            )
    conn.close()


def _add_certs(path: Path, certs: list[tuple[str, str, str, dt.datetime]]) -> None:
    """(serial, kind, node, issued_at) rows, recorded in that order."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO certificates (serial, kind, subject, node, fingerprint, issued_at,"
            " not_after) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (serial, kind, node, node, f"fp-{serial}", at.isoformat(), (at + DAY).isoformat())
                for serial, kind, node, at in certs
            ],
        )
    conn.close()


def test_the_migration_s_attribution_takes_the_newest_live_rollout_of_the_node(
    tmp_path: Path,
) -> None:
    """Ended rollouts (completed, halted, aborted) own nothing; a server certificate of a node
    of a rollout not ended, issued since it began, is that rollout's, the one of the highest
    epoch if two are live (a finalize beside the rollout awaiting it); any other certificate
    is none's. Checked against that rule, certificate by certificate, on a store of both."""
    path = tmp_path / "leader.sqlite3"
    live = ("awaiting_finalize", "running")
    rollouts = [
        ("c1", "completed", 1, T - 3 * DAY, ("n1", "n2", "n3")),
        ("h2", "halted", 2, T - 2 * DAY, ("n1", "n2")),
        ("a3", "aborted", 3, T - DAY, ("n3",)),
        ("w4", "awaiting_finalize", 4, T - HOUR, ("n1", "n2")),
        ("f5", "running", 5, T, ("n2",)),
    ]
    _v9_with_rollouts(path, rollouts)
    certs = [
        (f"{i:x}", kind, node, T + offset)
        for i, (kind, node, offset) in enumerate(
            (kind, node, offset)
            for kind in ("server", "node")
            for node in ("n1", "n2", "n3", "n4")
            for offset in (-3 * DAY + MINUTE, -DAY + MINUTE, -HOUR, -MINUTE, 0 * MINUTE, MINUTE)
        )
    ]
    _add_certs(path, certs)
    Store(path).close()

    def owner(kind: str, node: str, at: dt.datetime) -> str:
        if kind != "server":
            return ""
        mine = [
            (epoch, rid)
            for rid, state, epoch, started, nodes in rollouts
            if state in live and node in nodes and at >= started
        ]
        return max(mine)[1] if mine else ""

    conn = sqlite3.connect(path)
    try:
        got = dict(conn.execute("SELECT serial, rollout_id FROM certificates").fetchall())
    finally:
        conn.close()
    assert got == {serial: owner(kind, node, at) for serial, kind, node, at in certs}
    assert {"w4", "f5", ""} == set(got.values())  # (the rule picks each kind of answer)


def _migration_work(path: Path, ended: int) -> int:
    """How many SQLite virtual-machine steps (in hundreds) migration 10 takes on a v9 store of
    ``ended`` completed rollouts of ten nodes, each of which gave each node a server
    certificate, and one running rollout that gave them one since it began."""
    nodes = tuple(f"n{i}" for i in range(10))
    _v9_with_rollouts(
        path,
        [(f"r{i}", "completed", i + 1, T + i * HOUR, nodes) for i in range(ended)]
        + [("live", "running", ended + 1, T + ended * HOUR, nodes)],
    )
    _add_certs(
        path,
        [
            (f"{i:x}-{node}", "server", node, T + i * HOUR + MINUTE)
            for i in range(ended + 1)
            for node in nodes
        ],
    )
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.set_progress_handler(count, 100)
        migrate(conn, path, leader_db.MIGRATIONS)
        conn.set_progress_handler(None, 0)
        (live,) = conn.execute(
            "SELECT COUNT(*) FROM certificates WHERE rollout_id = 'live'"
        ).fetchone()
    finally:
        conn.close()
    assert live == len(nodes)
    return steps


def test_the_migration_s_attribution_does_not_walk_the_rollouts_for_every_certificate(
    tmp_path: Path,
) -> None:
    """The attribution looked through the rollouts, by epoch, for every server certificate:
    its work was the product of the two, and a store of a thousand rollouts took tens of
    seconds at the leader's start, beyond systemd's start timeout (review s36 F1). Now only
    the certificates that can be a live rollout's are looked up: four times the rollouts and
    certificates is about four times the work, not sixteen. Counted in SQLite's steps (its
    progress handler), not by the clock."""
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small = _migration_work(tmp_path / "small" / "leader.sqlite3", 50)
    large = _migration_work(tmp_path / "large" / "leader.sqlite3", 200)
    assert large < 6 * small, (small, large)
