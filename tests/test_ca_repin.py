"""The store's CA pin after a restore (session 68): a damaged store is said as damaged, not as
another cluster's; ``tlsroll-leader --repin-ca``, the way out of a pin an earlier release's
store took from a wrong ``ca/`` (README "Backups").

Real leader and agent as processes, a real SQLite store; the restore is the README's steps.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

from leader.db import recorded_ca_pin
from tests.cluster import Cluster, child_env, one_line_error
from tests.conftest import next_loopback
from tests.test_backup import backup, restore, store_ca_pin, two_clusters
from tlsroll.sqlite import damage

EXIT_TIMEOUT = 60
OTHER_PIN = "sha256:" + "ab" * 32


def test_a_damaged_store_of_another_pin_is_said_as_damaged(tmp_path: Path) -> None:
    """A damaged store whose ``meta`` still reads (another table's page broken) and whose pin
    is not ``ca/``'s: the start said "the store and ca/ are of two clusters" (exit 2), from a
    pin a broken file holds, and the admin went to put back ``ca/``; it is said as lost now
    (exit 4, the damage and the way out), as any damaged store, nothing changed."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        passphrase = c.passphrase_path.read_bytes()
        dest = tmp_path / "backup"
        assert backup(c, dest).returncode == 0
        copy = dest / "leader.sqlite3"
        with contextlib.closing(sqlite3.connect(copy)) as db, db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'ca_pin'", (OTHER_PIN,))
        with contextlib.closing(sqlite3.connect(copy)) as db:
            page = db.execute("PRAGMA page_size").fetchone()[0]
            (root,) = db.execute(
                "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = 'audit'"
            ).fetchone()
        with copy.open("r+b") as f:  # the audit table's root page zeroed
            f.seek(page * (root - 1))
            f.write(b"\0" * page)
        problem = damage(copy, expected=True)
        assert (problem or "").startswith("damaged"), problem
        assert recorded_ca_pin(copy) == OTHER_PIN  # (what the pin's check reads)
        restore(c, dest, passphrase)
        before = {p: p.read_bytes() for p in (c.store_path, c.ca_key_path)}

        code, output = c.leader.run_to_exit(timeout=EXIT_TIMEOUT)
        assert code == 4, output
        line = one_line_error(output, "tlsroll-leader")
        assert "damaged" in line and "--reinitialise" in line, line
        assert OTHER_PIN not in line and "two clusters" not in line, line
        assert {p: p.read_bytes() for p in before} == before


def repin(c: Cluster, *pins: str) -> tuple[int, str]:
    """``tlsroll-leader --config … --repin-ca PINS…``, run to its exit."""
    done = subprocess.run(
        [*c.leader.argv, "--repin-ca", *pins],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        env=child_env(),
        check=False,
    )
    return done.returncode, done.stderr + done.stdout


def audit_kinds(path: Path) -> list[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT actor, kind, detail FROM audit WHERE kind = 'store.ca_pin_replaced'"
        ).fetchall()
    return [(str(a), str(k), str(d)) for a, k, d in rows]


def test_repin_ca_mends_a_store_an_earlier_release_pinned_to_a_wrong_ca(tmp_path: Path) -> None:
    """A store of an earlier release (no pin) restored with another cluster's ``ca/`` and
    ``tls/`` starts and records that CA's pin; the right ``ca/`` put back, the leader refuses
    the store (exit 2). Before, nothing but editing SQLite got it out. ``--repin-ca``: with
    no pins, or the wrong ones, one line naming both pins and the command, exit 2, nothing
    changed; refused while the leader runs; with the store's pin then ``ca/``'s, the pin is
    replaced (audited) and the leader starts, its node back."""
    with two_clusters(tmp_path) as (a, b, pin_a, pin_b, passphrase_a, dest):
        with contextlib.closing(sqlite3.connect(dest / "leader.sqlite3")) as db, db:
            db.execute("DELETE FROM meta WHERE key = 'ca_pin'")  # (an earlier release's)

        # The mistake: B's ca/ and tls/ put back with A's store; the start records B's pin.
        restore(a, dest, passphrase_a)
        for sub in ("ca", "tls"):
            for path in (b.data_dir / sub).iterdir():
                shutil.copy2(path, a.data_dir / sub / path.name)
        a.passphrase_path.write_bytes(b.passphrase_path.read_bytes())
        a.start_leader()
        assert store_ca_pin(a.store_path) == pin_b
        a.stop_leader()

        # The right ca/ and tls/ back: refused, naming the way out.
        for sub in ("ca", "tls"):
            for path in (dest / sub).iterdir():
                shutil.copy2(path, a.data_dir / sub / path.name)
        a.passphrase_path.write_bytes(passphrase_a)
        code, output = a.leader.run_to_exit(timeout=EXIT_TIMEOUT)
        assert code == 2, output
        line = one_line_error(output, "tlsroll-leader")
        assert pin_a in line and pin_b in line and "--repin-ca" in line, line

        before = a.store_path.read_bytes()
        for pins in ((), (pin_a, pin_b), (pin_b, "sha256:" + "00" * 32)):
            code, output = repin(a, *pins)
            assert code == 2, (pins, output)
            line = one_line_error(output, "tlsroll-leader")
            assert pin_a in line and pin_b in line, line
            assert f"--repin-ca {pin_b} {pin_a}`" in line, line
            assert "nothing was changed" in line, line
            assert a.store_path.read_bytes() == before
        code, output = repin(a, pin_b)
        assert code == 2 and "two pins" in output, output
        assert store_ca_pin(a.store_path) == pin_b and not audit_kinds(a.store_path)

        code, output = repin(a, pin_b, pin_a)
        assert code == 0, output
        assert f"now of the CA of pin {pin_a}" in output, output
        assert "Traceback" not in output, output
        assert store_ca_pin(a.store_path) == pin_a
        [(actor, _, detail)] = audit_kinds(a.store_path)
        assert actor == "admin:--repin-ca", actor
        assert json.loads(detail) == {"was": pin_b, "ca_pin": pin_a}
        code, output = repin(a, pin_b, pin_a)  # (done: nothing more to do)
        assert code == 0 and "already" in output, output

        a.start_leader()
        a.wait_for_nodes_online(["n1"])
        code, output = repin(a, pin_a, pin_b)  # (refused while the leader runs)
        assert code != 0 and "stop it first" in output, output
        assert store_ca_pin(a.store_path) == pin_a
