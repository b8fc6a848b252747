"""A backup's store put back in place of a store a crash left with its ``-wal`` (session 68):
SQLite applied that ``-wal`` to the copy, and the restored leader started on pages of two
stores mixed, without a word (``leader.db.foreign_wal``).

Real leader as a process, a real SQLite store; the backup is ``tlsroll-leader --backup``'s.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
from pathlib import Path

import pytest

from leader.backup import _copy_store
from leader.config import LeaderConfig
from leader.db import foreign_wal
from leader.layout import init
from leader.runtime import load_state
from leader.store import Restored, Store
from tests.cluster import Cluster, one_line_error
from tests.conftest import next_loopback
from tests.test_backup import backup, token_ids

EXIT_TIMEOUT = 60


def test_a_copy_put_back_beside_another_store_s_wal_is_refused(tmp_path: Path) -> None:
    """The leader killed (its ``-wal`` left, holding a token made after the backup), the
    backup's ``leader.sqlite3`` copied over the store, nothing else touched: the start mixed
    the two (the later token was in the "restored" store). Now it is refused (exit 2, one line
    naming the ``-wal`` and what to do), nothing changed; the ``-wal`` and ``-shm`` moved away
    as it says, the copy starts as a restore, without the later token. A copy's first start
    killed once it served leaves a ``-wal`` of its own: the next start takes it."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        dest = tmp_path / "backup"
        assert backup(c, dest).returncode == 0
        before_backup = token_ids(c)
        made = c.cli("token", "create", "--node", "late", "--address", "127.0.0.9")
        assert made.returncode == 0, made.stderr
        late = token_ids(c) - before_backup
        assert late
        c.leader.kill()
        wal = c.data_dir / "leader.sqlite3-wal"
        shm = c.data_dir / "leader.sqlite3-shm"
        assert wal.stat().st_size > 0  # (what the crash left)
        shutil.copy2(dest / "leader.sqlite3", c.store_path)
        files = (c.store_path, wal, shm)
        before = {p: p.read_bytes() for p in files}

        code, output = c.leader.run_to_exit(timeout=EXIT_TIMEOUT)
        assert code == 2, output
        line = one_line_error(output, "tlsroll-leader")
        assert "backup's copy" in line and "leader.sqlite3-wal" in line, line
        assert "nothing was changed" in line, line
        assert {p: p.read_bytes() for p in files} == before

        aside = tmp_path / "aside"
        aside.mkdir()
        for path in (wal, shm):
            path.rename(aside / path.name)
        c.start_leader()
        assert "store.restored" in c.leader.event_names()
        assert not token_ids(c) & late

        c.leader.kill()  # (the copy's own -wal, if any, after its first start)
        c.start_leader()
        assert not token_ids(c) & late


def test_a_restored_config_naming_the_credential_copy_says_what_to_do(tmp_path: Path) -> None:
    """A ``leader.toml`` restored from a server where ``install.sh ca-credential`` ran names
    ``/run/tlsroll/ca-passphrase``, which the unit of a server where it did not never makes:
    the start said only that the file does not exist (an admin may write it into the tmpfs,
    gone at the next boot). The line says what the README's restore does (exit 2)."""
    copy = Path("/run/tlsroll/ca-passphrase")
    if copy.exists():  # (a leader installed on this machine: not this test's to touch)
        pytest.skip(f"{copy} exists here")
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.write_leader_config({"ca_passphrase_file": str(copy)})
        code, output = c.leader.run_to_exit(timeout=EXIT_TIMEOUT)
        assert code == 2, output
        line = one_line_error(output, "tlsroll-leader")
        assert f"{copy} does not exist" in line, line
        assert "set ca_passphrase_file to it" in line and "install.sh ca-credential" in line, line


def test_a_copys_first_start_whose_checkpoint_a_reader_held_back_keeps_its_own_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing review of session 68: the restore's checkpoint into the file
    (``Store.restore_began``) is held back by a reader of the store (another process, such as
    a backup run), and SQLite says so only in its answer: the file still said "a backup's copy
    no leader started". The leader then killed (its ``-wal`` holds the restore and all since),
    the next start refused its own ``-wal`` as another store's, and the way out it named
    (move the ``-wal`` away) dropped the restore and everything after. The copy is marked
    opened in the file itself before anything writes a ``-wal`` (``leader.db.claim_copy``):
    its ``-wal`` is taken as its own."""
    layout = init(tmp_path / "data", next_loopback())
    cfg = LeaderConfig.load(layout.config)
    load_state(cfg).store.close()  # (a clean stop: no -wal left)
    copy = tmp_path / "copy.sqlite3"
    _copy_store(layout.store, copy, dt.datetime.now(dt.UTC))
    files = [layout.store.with_name(layout.store.name + s) for s in ("", "-wal", "-shm")]
    for path in files[1:]:  # (a clean stop leaves them empty: the README's restore removes them)
        path.unlink(missing_ok=True)
    shutil.copy2(copy, layout.store)  # the restore, with the leader stopped

    readers: list[sqlite3.Connection] = []
    began = Store.restore_began

    def read_meanwhile(store: Store, now: dt.datetime) -> Restored | None:
        reader = sqlite3.connect(layout.store, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM meta").fetchall()  # (its snapshot, held)
        readers.append(reader)
        store.db._db.execute("PRAGMA busy_timeout = 50")  # (the 10 s wait, made short)
        return began(store, now)

    monkeypatch.setattr(Store, "restore_began", read_meanwhile)
    state = load_state(cfg)
    monkeypatch.undo()
    assert readers
    # Killed here: the files as the kill leaves them (the connections still open).
    left = {p: p.read_bytes() for p in files if p.exists()}
    assert left.get(files[1]), "the restore is in the -wal (the checkpoint was held back)"
    state.store.close()
    for reader in readers:
        reader.close()
    for path in files:
        path.unlink(missing_ok=True)
    for path, data in left.items():
        path.write_bytes(data)

    assert foreign_wal(layout.store) is None
    state = load_state(cfg)  # the next start: its own -wal taken, the restore not begun again
    try:
        with state.store.db.read() as db:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        state.store.close()
    assert "restored_at" in meta and "backup_made_at" not in meta, meta
