"""Schema migrations (``PRAGMA user_version``) of the three SQLite stores, against databases
written by the previous release (tests/data/previous_layout, tlsroll 0.1.0), and the mode of
every store file."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import pytest
import structlog

from leader.schema_store import SchemaStore
from leader.store import Store
from nodeagent.journal import MIGRATIONS, Journal
from nodeagent.lease import Boot, Lease
from refserver import store as refstore
from tlsroll.enums import TxnKind
from tlsroll.errors import TlsrollError
from tlsroll.sqlite import Database, SchemaTooNew

PREVIOUS = Path(__file__).parent / "data" / "previous_layout"
ROLLOUT = "r20261129-120000-ab12"  # the rollout in leader.sql


class Closable(Protocol):
    def close(self) -> None: ...


def load(dump: str, path: Path) -> Path:
    """A database file exactly as tlsroll 0.1.0 left it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript((PREVIOUS / dump).read_text())
    finally:
        conn.close()
    return path


def user_version(path: Path) -> int:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


def refserver_db(data_dir: Path) -> Path:
    data_dir.mkdir(exist_ok=True)
    return data_dir / refstore.DB_NAME


# Each store: the dump of its 0.1.0 file, where its file goes under a directory, how it is
# opened. The leader's file is opened through either of its two stores.
STORES: dict[str, tuple[str, Callable[[Path], Path], Callable[[Path], Closable]]] = {
    "leader-store": ("leader.sql", lambda d: d / "leader.sqlite3", Store),
    "leader-schema": ("leader.sql", lambda d: d / "leader.sqlite3", SchemaStore),
    "journal": ("journal.sql", lambda d: d / "journal.sqlite3", Journal),
    "refserver": ("refserver.sql", refserver_db, lambda p: refstore.Store(p.parent)),
}


def current_version(kind: str, tmp_path: Path) -> int:
    """The version a fresh database of this store gets (at least 1: the 0.1.0 tables)."""
    _, where, opener = STORES[kind]
    directory = tmp_path / f"fresh-{kind}"
    directory.mkdir()
    path = where(directory)
    opener(path).close()
    version = user_version(path)
    assert version >= 1
    return version


# --- databases written by 0.1.0 ---------------------------------------------------------------


def test_the_leader_file_of_0_1_0_is_taken_over(tmp_path: Path) -> None:
    path = load("leader.sql", tmp_path / "leader.sqlite3")
    assert user_version(path) == 1  # 0.1.0's Store set it
    store = Store(path)
    schema = SchemaStore(path)
    try:
        assert [n.name for n in store.list_nodes()] == ["node1", "node2"]
        assert store.get_node("node2").last_heartbeat is None
        assert store.get_token("abc123").uses_left == 0
        row = schema.get(ROLLOUT)
        assert row is not None
        assert row.rollout.state.value == "halted"
        assert row.rollout.order == ("node1", "node2")
        # Migration 2: 0.1.0 wrote a failed way back as rolled_back + "ROLLBACK FAILED" words.
        assert [r.state.value for r in row.records] == ["done", "needs_attention"]
        assert "ROLLBACK FAILED" in row.records[1].reason
        assert row.meta.auth_version == 1
        assert '"alg": "scrypt"' in schema.verifier(1)
        assert schema.node_auth() == {"node1": 1}
        assert schema.next_epoch() == 2
    finally:
        schema.close()
        store.close()
    assert user_version(path) == current_version("leader-store", tmp_path)


def test_a_leader_file_of_0_1_0_without_the_rollout_tables_gets_them(tmp_path: Path) -> None:
    # 0.1.0's Store set user_version=1 on open; the rollout tables came later, from
    # SchemaStore, so a leader that failed in between (a port in use) left a file at 1
    # without them.
    path = load("leader.sql", tmp_path / "leader.sqlite3")
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE rollout_nodes; DROP TABLE rollouts; DROP TABLE auth_versions;"
        "DROP TABLE node_auth;"
    )
    conn.close()
    assert user_version(path) == 1
    schema = SchemaStore(path)
    try:
        assert schema.next_epoch() == 1
        assert schema.latest_auth_version() == 0
    finally:
        schema.close()
    assert {"rollouts", "rollout_nodes", "auth_versions", "node_auth"} <= tables(path)


def test_the_agent_journal_of_0_1_0_is_taken_over(tmp_path: Path) -> None:
    path = load("journal.sql", tmp_path / "journal.sqlite3")
    assert user_version(path) == 0
    journal = Journal(path)
    try:
        done = journal.get("r0", "switch")
        assert done is not None
        assert (done.epoch, done.outcome, done.watermark) == (2, "completed", 7)
        failed = journal.get("r1", "switch")
        assert failed is not None
        assert (failed.phase, failed.reason) == ("restored", "verify: no answer")
        # Migration 2 of the journal: runtime flags move out of the fixed plan.
        assert (failed.failed_phase, failed.restart_needed) == ("restarted", True)
        assert "failed_phase" not in failed.plan and "restart_needed" not in failed.plan
        assert [t.rollout_id for t in journal.unfinished()] == ["r1"]
        assert journal.highest_epoch() == 3
        live = journal.live_tls()
        assert live is not None
        assert live["server_url"] == "https://127.0.10.2:8443/praxis_live/"
        staged = journal.staged("r1")
        assert staged is not None
        assert staged.cert_file is None
        assert len(journal.events("r1")) == 3
    finally:
        journal.close()
    assert user_version(path) == current_version("journal", tmp_path)


def test_a_journalled_lease_without_its_length_is_taken_over(tmp_path: Path) -> None:
    """Migration 5 of the journal: the scope freeze's lease keeps its length (clock audit s35
    A). A lease journalled before it, ``[rollout_id, until]``, is read with no length (the
    agent bounds it by the longest lease); an empty one stays empty."""
    path = tmp_path / "journal.sqlite3"
    Database(path, MIGRATIONS[:4]).close()  # the journal as the release before migration 5 made it
    until = dt.datetime(2026, 11, 30, 10, 5, tzinfo=dt.UTC)
    conn = sqlite3.connect(path)
    try:  # and the lease it journalled
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('freeze_lease', ?)",
            (f'["r1", "{until.isoformat()}"]',),
        )
        conn.commit()
    finally:
        conn.close()
    journal = Journal(path)
    try:
        assert journal.freeze_lease() == ("r1", until, None, None)
        journal.set_freeze_lease(None)
        assert journal.freeze_lease() is None
    finally:
        journal.close()
    assert user_version(path) == current_version("journal", tmp_path) == 6


def test_a_transaction_journalled_before_migration_6_has_no_freeze_length(tmp_path: Path) -> None:
    """Migration 6 of the journal: a freeze's start on the boot-time clock and its length (clock
    audit s35 J). A transaction journalled before, frozen and unfrozen, reads with neither; the
    agent then sends no length (the leader takes the wall-clock times' difference)."""
    from nodeagent.service import txn_message

    path = tmp_path / "journal.sqlite3"
    Database(path, MIGRATIONS[:5]).close()
    began = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "INSERT INTO txns (rollout_id, kind, epoch, phase, outcome, started_at, ended_at,"
            " freeze_started_at, freeze_ended_at, restart_seconds, plan)"
            " VALUES ('r1', 'switch', 1, 'completed', 'completed', ?, ?, ?, ?, 0.5, '{}')",
            (began.isoformat(), began.isoformat(), began.isoformat(), began.isoformat()),
        )
        conn.commit()
    finally:
        conn.close()
    journal = Journal(path)
    try:
        txn = journal.get("r1", TxnKind.SWITCH)
        assert txn is not None and txn.freeze_ended_at == began
        assert (txn.freeze_boot_id, txn.freeze_boot_at, txn.freeze_seconds) == (None, None, None)
        assert not txn_message(txn).HasField("freeze_seconds")
    finally:
        journal.close()
    assert user_version(path) == current_version("journal", tmp_path) == 6


def test_a_journalled_lease_without_its_boot_time_end_is_read(tmp_path: Path) -> None:
    """The lease's value grew its end on the boot-time clock and the boot's id after migration 5
    (unreleased): a value of three, as the build before wrote it, is read with no boot-time
    end (the agent takes it over by its wall-clock end); the new form is read back as
    written."""
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    until = dt.datetime(2026, 11, 30, 10, 5, tzinfo=dt.UTC)
    conn = sqlite3.connect(path)
    try:  # the journal as the build before wrote it
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('freeze_lease', ?)",
            (f'["r1", "{until.isoformat()}", 300]',),
        )
        conn.commit()
    finally:
        conn.close()
    journal = Journal(path)
    try:
        assert journal.freeze_lease() == ("r1", until, 300.0, None)
        lease = Lease("r2", until, 60.0, Boot("9f2c-boot", 1234.5))
        journal.set_freeze_lease(lease)
        assert journal.freeze_lease() == lease
        journal.set_freeze_lease(lease._replace(boot=None))
        assert journal.freeze_lease() == ("r2", until, 60.0, None)
    finally:
        journal.close()
    assert user_version(path) == current_version("journal", tmp_path) == 6


def test_the_refserver_entries_of_0_1_0_are_taken_over(tmp_path: Path) -> None:
    path = load("refserver.sql", refserver_db(tmp_path / "ref"))
    assert user_version(path) == 0
    store = refstore.Store(path.parent)
    try:
        assert store.watermark() == 2
        entry = store.get("7dcf32ed12da42dd89eba9faab435dd2")
        assert entry is not None
        assert (entry["seq"], entry["body"]) == (1, {"text": "entry one"})
        _, seq = store.insert({"text": "drei"})
        assert seq == 3
    finally:
        store.close()
    assert user_version(path) == current_version("refserver", tmp_path)


def test_a_refserver_file_of_the_release_before_keeps_its_entries_and_counts_failures(
    tmp_path: Path,
) -> None:
    """Review of s49 (1): migration 3 adds the count of wrong passwords at the login to an
    existing entry store (schema 2: the release before) without loss: its entries and its
    freeze stay, the count begins at 0 and is kept from then on. It only adds a table, so a
    release without it may run on the file (``IGNORABLE``)."""
    path = refserver_db(tmp_path / "ref")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for script in refstore.MIGRATIONS[:2]:
            assert isinstance(script, str)
            conn.execute(script)
        conn.execute("INSERT INTO entries (id, body, created_at) VALUES ('a1', '{}', 't')")
        conn.execute("INSERT INTO freeze (id, frozen, since) VALUES (1, 1, 's')")
        conn.execute("PRAGMA user_version = 2")
    finally:
        conn.close()
    store = refstore.Store(path.parent)
    try:
        assert store.watermark() == 1
        assert store.load_freeze() == refstore.FreezeState(True, "s")
        assert store.load_login_failures() == refstore.LoginFailures(0, None, None)
        store.save_login_failures(refstore.LoginFailures(3, "f", "l"))
    finally:
        store.close()
    assert user_version(path) == len(refstore.MIGRATIONS)
    store = refstore.Store(path.parent)
    try:
        assert store.load_login_failures() == refstore.LoginFailures(3, "f", "l")
    finally:
        store.close()
    assert {3, 4} == refstore.IGNORABLE


def test_the_readme_names_every_migration_an_older_tlsroll_may_ignore() -> None:
    """Review s66 walk L4: README "Downgrading tlsroll" listed the leader's ignorable
    migrations as 13 to 17 while ``leader.db.IGNORABLE`` held 18 too (a downgrade reader was
    told a store of schema 18 would be refused). Its paragraph names each of them, the range a
    leader of schema 12 or later runs on, and the reference server's newest ignorable one."""
    from leader import db as leader_db

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("Migrations an older tlsroll may ignore")
    paragraph = " ".join(readme[start : readme.index("\n\n", start)].split())
    first, last = min(leader_db.IGNORABLE), max(leader_db.IGNORABLE)
    assert frozenset(range(first, last + 1)) == leader_db.IGNORABLE  # (what the range says)
    said = f"a leader of schema {first - 1} or later runs on a store of schema {first} to {last} as"
    assert said in paragraph, paragraph
    for version in sorted(leader_db.IGNORABLE - {first}):
        assert f" {version}, the " in paragraph, (version, paragraph)
    assert f"reference server's entry store {max(refstore.IGNORABLE)}," in paragraph, paragraph


# --- the copy kept before a migration (upgrade audit F5) ---------------------------------------


def rows(path: Path) -> dict[str, int]:
    """How many rows each table of the file has."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return {
            name: conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]  # noqa: S608
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    finally:
        conn.close()


def meta(path: Path) -> dict[str, str]:
    """The file's ``meta`` rows ({} without the table)."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            return {}
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


# The row each store's copy is marked with (``tlsroll.sqlite.keep_copy``'s ``mark``): the
# leader's file of 0.1.0 has no ``meta`` (migration 5 made it), so its copy is not marked.
MARKS = {"journal": "copy_made_at"}


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize("kind", sorted(STORES))
def test_an_older_store_is_copied_as_it_was_before_its_migration(kind: str, tmp_path: Path) -> None:
    """The way back for a tlsroll rolled back: the file as the older tlsroll left it, beside
    it as NAME.before-v<N> (N: the version it was migrated to), private like the store, marked
    as a copy where its store marks one. A copy of that name already there is replaced by the
    file as it is now, with a warning (audit s40, L3: a copy put back with cp and run on,
    then upgraded again, kept the stale copy, "store.copy_already_kept" an info line)."""
    dump, where, opener = STORES[kind]
    path = load(dump, where(tmp_path / "data"))
    old_version, old_rows, old_meta = user_version(path), rows(path), meta(path)
    current = current_version(kind, tmp_path)
    opener(path).close()
    copy = path.with_name(f"{path.name}.before-v{current}")
    assert user_version(path) == current
    assert copy.exists(), sorted(p.name for p in path.parent.iterdir())
    assert user_version(copy) == old_version
    marked = {MARKS[kind]} if kind in MARKS else set()
    assert set(meta(copy)) - set(old_meta) == marked
    assert rows(copy) == old_rows | ({"meta": old_rows["meta"] + 1} if marked else {})
    assert mode(copy) == 0o600
    assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name] == []
    # Only the copy is marked: the live file is not a copy put back (review s40 M3).
    assert set(meta(path)) & (COPY_MARKS | RESTORED) == set()
    # A copy of that name there already: the file put back at the old version (with cp: the
    # copy stays), written to by the older tlsroll, and migrated again: the copy is of the
    # file as it is now, and the warning says the one before was replaced.
    path.unlink()
    load(dump, path)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE marker (x)")  # what the older tlsroll wrote meanwhile
    conn.close()
    assert user_version(path) == old_version
    with structlog.testing.capture_logs() as logs:
        opener(path).close()
    assert "marker" in tables(copy)
    assert user_version(copy) == old_version
    replaced = [e for e in logs if e["event"] == "store.copy_replaced"]
    assert len(replaced) == 1, logs
    assert replaced[0]["log_level"] == "warning"
    assert replaced[0]["copy"] == str(copy)


COPY_MARKS = {"copy_made_at", "backup_made_at"}
# What a store opened on a marked copy keeps of it (the mark is taken as it opens).
RESTORED = {
    "restored_copy_at",
    "restored_unfinished",
    "restored_backup_at",
    "restored_at",
    "relearn_until",
}


@pytest.mark.parametrize("kind", ["journal", "leader-store"])
def test_only_the_copy_is_marked_never_the_migrated_file(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s40 M3: the mark says "this file is the copy kept before an upgrade" (the
    leader then re-learns its nodes as after a restore, the agent says its journal was put
    back): the copy made before a migration of a current store has it, the file migrated
    never (nothing pinned that: marking the live file as well passed every test)."""
    from leader import db as leader_db
    from nodeagent import journal

    path = tmp_path / "x.sqlite3"
    module: Any = journal if kind == "journal" else leader_db

    def opener() -> Closable:
        return journal.Journal(path) if kind == "journal" else leader_db.open_db(path)

    opener().close()
    known = len(module.MIGRATIONS)
    monkeypatch.setattr(module, "MIGRATIONS", (*module.MIGRATIONS, ""))
    opener().close()  # the upgrade
    copy = path.with_name(f"{path.name}.before-v{known + 1}")
    mark = "copy_made_at" if kind == "journal" else "backup_made_at"
    assert set(meta(copy)) & COPY_MARKS == {mark}
    assert set(meta(path)) & (COPY_MARKS | RESTORED) == set()
    assert user_version(path) == known + 1


def test_a_journal_copy_is_marked_with_its_own_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s40 L-d: a journal that is itself a copy put back, not yet opened, migrated
    (a newer agent started on it): its copy carried the older copy's time."""
    from nodeagent import journal

    path = tmp_path / "x.sqlite3"
    journal.Journal(path).close()
    stale = "2001-01-01T00:00:00+00:00"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('copy_made_at', ?)", (stale,))
        conn.commit()
    known = len(journal.MIGRATIONS)
    monkeypatch.setattr(journal, "MIGRATIONS", (*journal.MIGRATIONS, ""))
    journal.Journal(path).close()
    made = meta(path.with_name(f"{path.name}.before-v{known + 1}"))["copy_made_at"]
    assert made != stale
    assert dt.datetime.fromisoformat(made) > dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    # Review s40 L-f: a journal without meta (none this code makes) is left as it is, as the
    # leader's mark does; it was "no such table: meta", and the upgrade failed.
    with contextlib.closing(sqlite3.connect(":memory:")) as bare:
        bare.execute("CREATE TABLE txns (id)")
        journal.mark_copy(bare, dt.datetime.now(dt.UTC))
        assert [r[0] for r in bare.execute("SELECT name FROM sqlite_master")] == ["txns"]


@pytest.mark.usefixtures("open_umask")
def test_a_copy_left_half_made_by_a_killed_run_is_removed(tmp_path: Path) -> None:
    """Audit s40, L2: a copy interrupted by a kill left NAME.before-vN.tmp-PID (a whole copy of
    the store, secrets and all) for good: each run removed only its own pid's. The next open
    removes those of a process that is gone, and any a day old; never one of a live process."""
    from tlsroll.sqlite import Database

    path = tmp_path / "x.sqlite3"
    Database(path, ["CREATE TABLE a (x)"]).close()
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = path.with_name(f"{path.name}.before-v2.tmp-{dead.pid}")
    old = path.with_name(f"{path.name}.before-v7.tmp-{os.getppid()}")
    live = path.with_name(f"{path.name}.before-v3.tmp-{os.getppid()}")
    # SQLite's companions of a copy half made (review s40 L-c: they were left for good).
    companions = [gone.with_name(f"{gone.name}{s}") for s in ("-journal", "-wal", "-shm")]
    for tmp in (gone, old, live, *companions):
        tmp.write_bytes(b"a copy of the store")
    day_ago = time.time() - 2 * 86400
    os.utime(old, (day_ago, day_ago))
    Database(path, ["CREATE TABLE a (x)"]).close()  # no migration: removed all the same
    assert not gone.exists()
    assert not old.exists()
    assert live.exists()
    assert [c.name for c in companions if c.exists()] == []


class Racing:
    """A connection whose first read of ``user_version`` is followed by ``then`` (another
    process migrating the file) before the caller goes on: two starts at once."""

    def __init__(self, conn: sqlite3.Connection, then: Callable[[], None]) -> None:
        self.conn = conn
        self.then: Callable[[], None] | None = then

    def execute(self, sql: str, *args: Any) -> Any:
        cursor = self.conn.execute(sql, *args)
        if sql == "PRAGMA user_version" and self.then is not None:
            row, then, self.then = cursor.fetchone(), self.then, None
            then()
            return Racing.One(row)
        return cursor

    class One:
        def __init__(self, row: Any) -> None:
            self.row = row

        def fetchone(self) -> Any:
            return self.row


def test_a_file_another_process_migrated_meanwhile_needs_no_copy(tmp_path: Path) -> None:
    """Review s40 L-a: two processes migrating the file at once: the one that read the old
    version before the other migrated it failed (StoreCopyFailed, "changed to schema version
    2 while it was copied") though the file was migrated and its copy kept by the other. Now
    it keeps no copy and goes on; the other's copy stays as it made it."""
    from tlsroll.sqlite import Migration, keep_copy

    path = tmp_path / "x.sqlite3"
    older: list[Migration] = ["CREATE TABLE a (x)"]
    newer: list[Migration] = [*older, "CREATE TABLE b (y)"]
    Database(path, older).close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        racing = Racing(conn, lambda: Database(path, newer).close())
        assert keep_copy(cast(sqlite3.Connection, racing), path, 2) is None
    finally:
        conn.close()
    copy = path.with_name(f"{path.name}.before-v2")
    assert user_version(copy) == 1
    assert user_version(path) == 2
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_newer_copy_of_that_name_is_kept_aside_not_replaced(tmp_path: Path) -> None:
    """Review s40 L-b: the copy of that name there already is replaced by the file as it is
    (audit s40 L3), but one of a newer schema than the file (a backup of an older state
    restored over the store, then the upgrade again) may hold what the file lacks: it is kept
    as NAME.before-vN.replaced-TIME, and said so."""
    from tlsroll.sqlite import Migration

    path = tmp_path / "x.sqlite3"
    v1: list[Migration] = ["CREATE TABLE a (x)"]
    v2: list[Migration] = [*v1, "CREATE TABLE b (y)"]
    v3: list[Migration] = [*v2, "CREATE TABLE c (z)"]
    Database(path, v2).close()
    copy = path.with_name(f"{path.name}.before-v3")
    shutil.copyfile(path, copy)  # a copy at schema 2 of that name
    path.unlink()
    Database(path, v1).close()  # the store restored at schema 1
    with structlog.testing.capture_logs() as logs:
        Database(path, v3).close()
    assert user_version(copy) == 1
    [kept] = [p for p in tmp_path.iterdir() if ".before-v3.replaced-" in p.name]
    assert user_version(kept) == 2
    [replaced] = [e for e in logs if e["event"] == "store.copy_replaced"]
    assert replaced["kept_as"] == str(kept)


@pytest.mark.parametrize("kind", sorted(STORES))
def test_a_fresh_or_current_store_leaves_no_copy(kind: str, tmp_path: Path) -> None:
    _, where, opener = STORES[kind]
    path = where(tmp_path / "data")
    path.parent.mkdir(parents=True, exist_ok=True)
    opener(path).close()  # fresh
    opener(path).close()  # current already
    assert [p.name for p in path.parent.iterdir() if ".before-v" in p.name] == []


def test_a_copy_that_cannot_be_made_leaves_the_file_unmigrated(tmp_path: Path) -> None:
    """No way back, no migration: the file stays at its version, with one line saying why."""
    from tlsroll.sqlite import Database, StoreCopyFailed

    path = tmp_path / "x.sqlite3"
    Database(path, ["CREATE TABLE a (x)"]).close()
    path.with_name(f"{path.name}.before-v2.tmp-{os.getpid()}").mkdir()  # in the copy's way
    with pytest.raises(StoreCopyFailed, match=r"cannot keep a copy before migrating it from "):
        Database(path, ["CREATE TABLE a (x)", "CREATE TABLE b (x)"])
    assert user_version(path) == 1
    assert not path.with_name(f"{path.name}.before-v2").exists()


# --- fresh, too new, failing ------------------------------------------------------------------


# Each store's module (its MIGRATIONS, IGNORABLE, READS_FLOOR_FROM) and how it is opened.
def _store_module(kind: str) -> Any:
    from leader import db as leader_db
    from nodeagent import journal

    return {"leader": leader_db, "journal": journal, "refserver": refstore}[kind]


def _open_store(kind: str, path: Path) -> Closable:
    from leader import db as leader_db

    if kind == "leader":
        return leader_db.open_db(path)
    if kind == "journal":
        return Journal(path)
    return refstore.Store(path.parent)


LATER_TABLE = "CREATE TABLE later_s51 (x TEXT)"  # a migration an older tlsroll may ignore
LATER_STEP = "CREATE TABLE later_s51b (x TEXT NOT NULL); INSERT INTO later_s51b VALUES ('y')"


@pytest.mark.parametrize(
    ("kind", "found", "extra", "extra_ignorable", "copied"),
    [
        # leader 12 -> 13: 13 is ignorable, and only builds reading readable_by wrote 12
        ("leader", 12, (), set(), False),
        # leader 10 -> 13: 11 and 12 may not be ignored
        ("leader", 10, (), set(), True),
        # leader 11 -> 13 + an ignorable 14: 12 may not be ignored
        ("leader", 11, (LATER_TABLE,), {14}, True),
        # refserver 2 -> 3: builds that did not read readable_by wrote schema 2 too
        ("refserver", 2, (), set(), True),
        # refserver 3 -> 4 and an ignorable 5: only builds reading readable_by wrote 3
        ("refserver", 3, (LATER_TABLE,), {5}, False),
        # refserver 3 -> 4 and a 5 that may not be ignored
        ("refserver", 3, (LATER_STEP,), set(), True),
        # journal 6 -> an ignorable 7: builds that did not read readable_by wrote 6 too
        ("journal", 6, (LATER_TABLE,), {7}, True),
        # journal 7 -> an ignorable 8
        ("journal", 7, (LATER_STEP, LATER_TABLE), {8}, False),
    ],
)
def test_a_copy_is_kept_unless_the_build_that_wrote_the_file_reads_it_migrated(
    kind: str,
    found: int,
    extra: tuple[str, ...],
    extra_ignorable: set[int],
    copied: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review rev50a L1: the copy before a migration (a VACUUM INTO of the whole file; the
    reference server's start is inside a switch's freeze window) is the way back for the
    build that wrote the file. It is not needed when every pending migration is one that
    build may ignore and that build reads ``readable_by`` (the file's schema at least the
    store's ``READS_FLOOR_FROM``: from git history, the first schema of the store added after
    that code): that build runs on the migrated file as it is. Otherwise it is kept."""
    module = _store_module(kind)
    migrations = (*module.MIGRATIONS, *extra)
    monkeypatch.setattr(module, "MIGRATIONS", migrations)
    monkeypatch.setattr(module, "IGNORABLE", frozenset(module.IGNORABLE | extra_ignorable))
    path = tmp_path / "data" / f"{kind}.sqlite3"
    if kind == "refserver":
        path = refserver_db(tmp_path / "data")
    path.parent.mkdir(parents=True, exist_ok=True)
    Database(path, migrations[:found]).close()  # as the build of schema ``found`` left it
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE written_before (x)")  # what the way back must not lose
    conn.close()
    with structlog.testing.capture_logs() as logs:
        _open_store(kind, path).close()  # the upgrade
    assert user_version(path) == len(migrations)
    copy = path.with_name(f"{path.name}.before-v{len(migrations)}")
    events = [e["event"] for e in logs]
    assert copy.exists() == copied, sorted(p.name for p in path.parent.iterdir())
    assert ("store.copy_kept" in events) == copied, events
    assert ("store.copy_skipped" in events) == (not copied), events
    if copied:
        assert user_version(copy) == found and "written_before" in tables(copy)
    else:
        [skipped] = [e for e in logs if e["event"] == "store.copy_skipped"]
        assert (skipped["version"], skipped["to"]) == (found, len(migrations))
        # The build of schema ``found`` reads the migrated file as it is.
        floor = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            [(readable_by,)] = floor.execute("SELECT readable_by FROM schema_floor").fetchall()
            assert readable_by <= found
        finally:
            floor.close()
        older = Database(path, migrations[:found], what=kind)
        assert older.version == len(migrations)
        older.close()


def test_a_copy_of_an_earlier_upgrade_is_set_aside_when_this_one_keeps_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev51a L3: a migration that keeps no copy found ``NAME.before-v<N>`` of an
    earlier upgrade to N (gone back from since) and left it there, to be taken for this
    upgrade's way back (losing all since). It is kept aside as ``.replaced-TIME`` with a
    warning, unchanged."""
    module = _store_module("refserver")
    migrations = (*module.MIGRATIONS, LATER_TABLE)
    monkeypatch.setattr(module, "MIGRATIONS", migrations)
    monkeypatch.setattr(module, "IGNORABLE", frozenset(module.IGNORABLE | {len(migrations)}))
    path = refserver_db(tmp_path / "data")
    path.parent.mkdir(parents=True, exist_ok=True)
    Database(path, migrations[:3]).close()
    old = path.with_name(f"{path.name}.before-v{len(migrations)}")
    old.write_bytes(b"an earlier upgrade's copy")
    with structlog.testing.capture_logs() as logs:
        _open_store("refserver", path).close()
    assert user_version(path) == len(migrations)
    assert not old.exists()
    [aside] = [p for p in path.parent.iterdir() if p.name.startswith(f"{old.name}.replaced-")]
    assert aside.read_bytes() == b"an earlier upgrade's copy"
    [warned] = [e for e in logs if e["event"] == "store.old_copy_set_aside"]
    assert warned["kept_as"] == str(aside)


def test_each_store_says_from_which_schema_its_builds_read_the_floor() -> None:
    """The schema of each store at the commit that taught ``tlsroll.sqlite.migrate`` to read
    ``readable_by`` (096a57d: leader 10, journal 6, reference server 2) had been written by
    builds before it too, and the leader's 11 by a side branch's builds without that code
    (s40feat, merged later: review rev51a L2): the first schema after those is the store's
    ``READS_FLOOR_FROM``."""
    assert {k: _store_module(k).READS_FLOOR_FROM for k in ("leader", "journal", "refserver")} == {
        "leader": 12,
        "journal": 7,
        "refserver": 3,
    }


def test_a_fresh_database_gets_the_current_version(tmp_path: Path) -> None:
    from leader import db as leader_db
    from nodeagent import journal

    assert current_version("leader-store", tmp_path) == len(leader_db.MIGRATIONS)
    assert current_version("leader-schema", tmp_path) == len(leader_db.MIGRATIONS)
    assert current_version("journal", tmp_path) == len(journal.MIGRATIONS)
    assert current_version("refserver", tmp_path) == len(refstore.MIGRATIONS)


def test_both_leader_stores_share_one_database(tmp_path: Path) -> None:
    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    assert schema.next_epoch() == 1
    assert store.list_nodes() == []
    schema.close()  # the store owns the database: it is still open
    assert schema.next_epoch() == 1
    store.close()


# The word each store's refusal of a newer file names it with (audit s40, L1: the journal was
# a "store schema").
WHAT = {"journal": "journal"}


@pytest.mark.parametrize("kind", sorted(STORES))
def test_a_newer_schema_is_refused_and_left_unchanged(kind: str, tmp_path: Path) -> None:
    """Refused in the words of going back (audit s40, L1: "upgrade tlsroll" on a deliberate
    downgrade, and "store schema" for the journal)."""
    dump, where, opener = STORES[kind]
    path = load(dump, where(tmp_path / "data"))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    current = current_version(kind, tmp_path)

    with pytest.raises(TlsrollError) as refused:
        opener(path)

    assert str(refused.value) == (
        f"{path}: {WHAT.get(kind, 'store')} schema version 99 is newer than this tlsroll knows"
        f" ({current}): this tlsroll is older than the one that wrote {path.name}; run the"
        ' newer version, or see README "Downgrading tlsroll"'
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert user_version(path) == 99


@pytest.mark.parametrize("kind", ["journal", "leader-store"])
def test_the_refusal_of_a_newer_file_names_the_copy_to_go_back_to(
    kind: str, tmp_path: Path
) -> None:
    """Audit s40, H2 and L1: the older tlsroll's refusal names the copy kept before the upgrade
    that it can read (the newest of those), and what putting it back loses."""
    from leader import db as leader_db
    from nodeagent import journal

    dump, where, opener = STORES[kind]
    path = load(dump, where(tmp_path / "data"))
    opener(path).close()  # the upgrade: the copy kept, the file migrated
    current = user_version(path)
    copy = path.with_name(f"{path.name}.before-v{current}")
    assert copy.exists()
    # A copy too new for this tlsroll (kept by a later upgrade of a file a newer one wrote)
    # is not the one named.
    newer = path.with_name(f"{path.name}.before-v{current + 2}")
    shutil.copyfile(path, newer)
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version={current + 1}")
    conn.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={current + 2}")  # a newer tlsroll wrote it since,
    conn.execute("DROP TABLE IF EXISTS schema_floor")  # by a migration not to be ignored
    conn.close()

    with pytest.raises(TlsrollError) as refused:
        opener(path)

    text = str(refused.value)
    assert f"this tlsroll is older than the one that wrote {path.name}" in text
    old_version = user_version(copy)
    assert (
        f"; {copy.name} is {path.name} as it was before that upgrade (schema {old_version}," in text
    )
    assert newer.name not in text
    losing = journal.LOSING if kind == "journal" else leader_db.LOSING
    assert text.endswith(f"putting it back loses what was written since ({losing})")


def test_the_too_new_error_is_its_own_kind(tmp_path: Path) -> None:
    from tlsroll.sqlite import Database, SchemaTooNew

    path = tmp_path / "x.sqlite3"
    Database(path, ["CREATE TABLE a (x)", "CREATE TABLE b (x)"]).close()
    with pytest.raises(SchemaTooNew, match=r"store schema version 2 is newer .* \(1\):"):
        Database(path, ["CREATE TABLE a (x)"])


# --- going back without the copy: what an older tlsroll may ignore (audit s40, H2) -------------


def test_an_older_tlsroll_reads_a_newer_file_whose_migrations_it_may_ignore(
    tmp_path: Path,
) -> None:
    """A newer tlsroll whose migrations since only add (a table, a column with a default or
    NULL) records the lowest schema that reads the file; an older one that knows it opens
    the file as it is (no copy, no change of version), writes to it, and the newer one opens
    it again and reads what the older wrote. Before: SchemaTooNew, and going back meant
    putting the copy back (what was written since lost)."""
    from tlsroll.sqlite import Database, Migration

    path = tmp_path / "x.sqlite3"
    older: list[Migration] = ["CREATE TABLE a (x TEXT NOT NULL)"]
    newer: list[Migration] = [
        *older,
        "ALTER TABLE a ADD COLUMN y TEXT NOT NULL DEFAULT 'dflt'; CREATE TABLE b (z);",
        "ALTER TABLE a ADD COLUMN w INTEGER",
    ]
    Database(path, older).close()
    Database(path, newer, ignorable={2, 3}).close()  # the upgrade
    assert user_version(path) == 3
    with structlog.testing.capture_logs() as logs:
        db = Database(path, older)  # going back: no copy put back
    assert db.version == 3
    with db.tx() as conn:
        conn.execute("INSERT INTO a (x) VALUES ('written by the older')")
    db.close()
    assert [e["readable_by"] for e in logs if e["event"] == "store.newer_schema_read"] == [1]
    assert user_version(path) == 3
    db = Database(path, newer, ignorable={2, 3})  # forward again
    with db.read() as conn:
        assert [tuple(r) for r in conn.execute("SELECT x, y, w FROM a")] == [
            ("written by the older", "dflt", None)
        ]
    db.close()
    # A migration since that is not ignorable: refused as before.
    Database(path, [*newer, "UPDATE a SET x = upper(x)"], ignorable={2, 3}).close()
    with pytest.raises(SchemaTooNew, match="newer than this tlsroll"):
        Database(path, older)
    with pytest.raises(SchemaTooNew, match="newer than this tlsroll"):
        Database(path, newer, ignorable={2, 3})
    # ... until an ignorable one follows: the floor is the last one that is not (4).
    Database(
        path, [*newer, "UPDATE a SET x = upper(x)", "CREATE TABLE c (v)"], ignorable={5}
    ).close()
    Database(path, [*newer, "UPDATE a SET x = upper(x)"]).close()
    with pytest.raises(SchemaTooNew, match="newer than this tlsroll"):
        Database(path, newer)


@pytest.mark.parametrize(
    "floor",
    [
        "DELETE FROM schema_floor; INSERT INTO schema_floor VALUES ('abc')",
        "DELETE FROM schema_floor; INSERT INTO schema_floor VALUES (x'00')",
        "DELETE FROM schema_floor; INSERT INTO schema_floor VALUES (0.5)",
        "DELETE FROM schema_floor; INSERT INTO schema_floor VALUES (-7)",
        "DELETE FROM schema_floor; INSERT INTO schema_floor VALUES (0)",
        "DELETE FROM schema_floor; INSERT INTO schema_floor VALUES (3)",  # above its version
        "DELETE FROM schema_floor",
        "INSERT INTO schema_floor VALUES (1)",  # two rows
        "DROP TABLE schema_floor; CREATE TABLE schema_floor (other INTEGER)",
        "DROP TABLE schema_floor; CREATE VIEW schema_floor AS SELECT 1 AS readable_by",
    ],
)
def test_a_newer_file_whose_readable_by_is_not_one_integer_is_refused(
    floor: str, tmp_path: Path
) -> None:
    """Review s40 M1: a ``readable_by`` that is not exactly one integer row from 1 to the
    file's version is not trusted: the newer file is refused (SchemaTooNew: exit 3), and left
    as it is. Before: 'abc' or a blob was a ValueError or TypeError (a traceback, exit 1,
    restarted for ever), a table without the column "no such column", and -7 or 0.5 opened
    the file as it is."""
    from tlsroll.sqlite import Database, Migration

    path = tmp_path / "x.sqlite3"
    older: list[Migration] = ["CREATE TABLE a (x TEXT NOT NULL)"]
    Database(path, older).close()
    Database(path, [*older, "ALTER TABLE a ADD COLUMN w INTEGER"], ignorable={2}).close()
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in floor.split("; "):
        conn.execute(statement)
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew, match="schema version 2 is newer than this tlsroll"):
        Database(path, older)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("step", "problem"),
    [
        (
            "ALTER TABLE a ADD COLUMN y TEXT NOT NULL DEFAULT NULL",
            "adds column a.y NOT NULL without a default",
        ),
        ("ALTER TABLE a DROP COLUMN x", "changes or drops column a.x"),
        ("ALTER TABLE a RENAME TO b", "drops or renames table a"),
        ("CREATE UNIQUE INDEX a_x ON a (x)", "adds index a_x on table a"),
        ("CREATE TRIGGER a_t AFTER INSERT ON a BEGIN SELECT 1; END", "adds trigger a_t"),
        # Review s40 M2: each of these passed, and an older tlsroll's writes then failed.
        (
            "ALTER TABLE a ADD COLUMN y TEXT NOT NULL DEFAULT (NULL)",
            "adds column a.y NOT NULL without a default",
        ),
        (
            "ALTER TABLE a ADD COLUMN c TEXT CHECK (c IS NOT NULL)",
            "adds to table a a column with CHECK",
        ),
        (
            "ALTER TABLE a ADD COLUMN d INTEGER NOT NULL DEFAULT 0 CHECK (d > 0)",
            "adds to table a a column with CHECK",
        ),
        ("ALTER TABLE a ADD COLUMN c TEXT COLLATE NOCASE", "adds to table a a column with COLLATE"),
        (
            "ALTER TABLE a ADD COLUMN g INTEGER GENERATED ALWAYS AS (k / 0) VIRTUAL",
            "adds to table a a column with GENERATED",
        ),
        (
            "ALTER TABLE a ADD COLUMN pid INTEGER DEFAULT 7 REFERENCES p(id)",
            "changes the foreign keys of table a",
        ),
        (
            "CREATE TABLE n (pid INTEGER NOT NULL REFERENCES p(id))",
            "adds table n with a foreign key into table p",
        ),
        (
            "CREATE TABLE a2 (x TEXT NOT NULL CHECK (x <> 'o'), k INTEGER);"
            " INSERT INTO a2 SELECT * FROM a; DROP TABLE a; ALTER TABLE a2 RENAME TO a",
            "rebuilds table a",
        ),
        (
            "CREATE TABLE a2 (x TEXT NOT NULL, k INTEGER, UNIQUE (k));"
            " INSERT INTO a2 SELECT * FROM a; DROP TABLE a; ALTER TABLE a2 RENAME TO a",
            "rebuilds table a",
        ),
        (
            "CREATE TABLE a2 (k INTEGER, x TEXT NOT NULL);"
            " INSERT INTO a2 (x, k) SELECT x, k FROM a; DROP TABLE a; ALTER TABLE a2 RENAME TO a",
            "changes or moves column a.k",
        ),
        ("DROP INDEX p_k", "changes or drops index p_k on table p"),
        (
            "ALTER TABLE a ADD COLUMN w INTEGER; INSERT INTO a (x, k) VALUES ('backfill', 1)",
            "writes rows",
        ),
        ("ALTER TABLE a ADD COLUMN w INTEGER; UPDATE p SET k = k", "writes rows"),
    ],
)
def test_a_migration_an_older_tlsroll_may_not_ignore_cannot_be_marked_so(
    step: str, problem: str, tmp_path: Path
) -> None:
    """An older tlsroll writes the file without knowing the migration: one that would make its
    writes fail (a NOT NULL column without a default, a unique index) or change what it knows
    is refused as it runs, and the file stays as it was."""
    from tlsroll.sqlite import Database

    path = tmp_path / "x.sqlite3"
    older = (
        "CREATE TABLE p (id INTEGER PRIMARY KEY, k INTEGER); CREATE INDEX p_k ON p (k);"
        " INSERT INTO p VALUES (7, 1); CREATE TABLE a (x TEXT NOT NULL, k INTEGER)"
    )
    Database(path, [older]).close()
    with pytest.raises(
        RuntimeError, match=f"migration 2 is one an older tlsroll may ignore, but it {problem}"
    ):
        Database(path, [older, step], ignorable={2})
    assert user_version(path) == 1


def test_a_migration_that_fails_halfway_leaves_the_old_version(tmp_path: Path) -> None:
    from tlsroll.sqlite import Database, Migration

    path = tmp_path / "x.sqlite3"
    v1: list[Migration] = ["CREATE TABLE a (x); INSERT INTO a VALUES (1);"]
    Database(path, v1).close()

    def rename(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE a RENAME TO c")
        conn.execute("INSERT INTO a VALUES (3)")  # a is gone: fails after a change

    broken: list[Migration] = [
        *v1,
        "CREATE TABLE b (x); INSERT INTO a VALUES (2); INSERT INTO nosuch VALUES (1);",
    ]
    with pytest.raises(sqlite3.OperationalError, match="no such table: nosuch"):
        Database(path, broken)
    with pytest.raises(sqlite3.OperationalError, match="no such table: a"):
        Database(path, [*v1, "CREATE TABLE b (x)", rename])

    assert user_version(path) == 1
    assert tables(path) == {"a"}
    db = Database(path, v1)
    with db.read() as conn:
        assert [tuple(r) for r in conn.execute("SELECT x FROM a")] == [(1,)]
    db.close()


def test_migrations_apply_in_order_from_the_version_found(tmp_path: Path) -> None:
    from tlsroll.sqlite import Database, Migration

    path = tmp_path / "x.sqlite3"
    seen: list[int] = []

    def count(conn: sqlite3.Connection) -> None:
        seen.append(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])

    steps: list[Migration] = [
        # a trigger's body and a string hold semicolons: split into statements correctly
        "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('a;b');"
        "CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;",
        count,
    ]
    Database(path, steps).close()
    Database(path, [*steps, "INSERT INTO t VALUES ('c')", count]).close()
    Database(path, [*steps, "INSERT INTO t VALUES ('c')", count]).close()  # nothing to do
    assert seen == [1, 2]
    assert user_version(path) == 4


def test_a_migration_may_not_end_the_transaction(tmp_path: Path) -> None:
    from tlsroll.sqlite import Database

    def commits(conn: sqlite3.Connection) -> None:
        conn.executescript("CREATE TABLE a (x)")  # COMMITs first

    path = tmp_path / "x.sqlite3"
    with pytest.raises(RuntimeError, match="migration 1 ended the transaction"):
        Database(path, [commits])


# --- file modes -------------------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def companions(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def write(store: Closable) -> None:
    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    if isinstance(store, Store):
        store.add_token(
            "t1",
            "s" * 32,
            ttl=dt.timedelta(hours=1),
            uses=1,
            description="",
            now=now,
            actor="test",
            node_name="n1",
            addresses=("127.0.0.2",),
        )
    elif isinstance(store, SchemaStore):
        assert store.stage_password('{"v": 1}', now, "test") == 1
    elif isinstance(store, Journal):
        assert store.admit_epoch(1) is None
    else:
        assert isinstance(store, refstore.Store)
        store.insert({"text": "x"})


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize("kind", sorted(STORES))
def test_store_files_are_private(kind: str, tmp_path: Path) -> None:
    _, where, opener = STORES[kind]
    path = where(tmp_path / "data")
    path.parent.mkdir(parents=True, exist_ok=True)
    store = opener(path)
    try:
        write(store)  # so the WAL is in use
        files = companions(path)
        assert all(f.exists() for f in files), files
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        store.close()


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize("kind", sorted(STORES))
def test_a_store_file_of_0_1_0_is_made_private(kind: str, tmp_path: Path) -> None:
    dump, where, opener = STORES[kind]
    path = load(dump, where(tmp_path / "data"))
    assert mode(path) == 0o644
    opener(path).close()
    assert mode(path) == 0o600
