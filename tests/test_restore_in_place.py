"""A backup's store put back in place of a store a crash left with its ``-wal`` (session 68):
SQLite applied that ``-wal`` to the copy, and the restored leader started on pages of two
stores mixed, without a word (``leader.db.foreign_wal``).

Real leader as a process, a real SQLite store; the backup is ``tlsroll-leader --backup``'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
