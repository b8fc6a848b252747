"""``tlsroll-leader --backup DIR``: a copy of a running leader that restores (README "Backups").

Real leader and agents as processes, a real SQLite store written while the backup reads it.
The restore is the README's steps, done by the test as an admin would: stop the leader, put
the files back into an empty data directory, give the CA passphrase kept offline, start.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from leader.layout import read_passphrase
from tests.cluster import (
    Cluster,
    child_env,
    command,
    one_line_error,
    secure_channel,
    wait_until,
)
from tests.conftest import next_loopback
from tlsroll import pki, spiffe
from tlsroll.v1 import leader_pb2, leader_pb2_grpc

BACKUP_TIMEOUT = 60


def backup(cluster: Cluster, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *command("tlsroll-leader", "leader.daemon"),
            "--config",
            str(cluster.config_path),
            "--backup",
            str(dest),
        ],
        capture_output=True,
        text=True,
        timeout=BACKUP_TIMEOUT,
        env=child_env(),
        check=False,
    )


def token_ids(cluster: Cluster) -> set[str]:
    listed = cluster.cli("token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {t["id"] for t in json.loads(listed.stdout)}


def test_a_backup_of_a_running_leader_restores_its_nodes_tokens_and_ca(tmp_path: Path) -> None:
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        c.add_agent("n1", next_loopback())
        c.add_agent("n2", next_loopback())
        c.wait_for_nodes_online(["n1", "n2"])
        pin = c.ca_pin()
        # Writes go on while the backup reads: tokens made in a loop.
        stop = threading.Event()

        def write() -> None:
            while not stop.is_set():
                c.create_token("later", next_loopback(), ttl="1h")

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            dest = tmp_path / "backup"
            result = backup(c, dest)
        finally:
            stop.set()
            writer.join(timeout=60)
        assert result.returncode == 0, result.stderr
        assert str(dest) in result.stdout and pin in result.stdout
        assert "passphrase" in result.stdout

        # What is in it: private, described, and no secret that is not the leader's own.
        assert stat.S_IMODE(dest.stat().st_mode) == 0o700
        manifest = json.loads((dest / "MANIFEST.json").read_text())
        assert manifest["ca_pin"] == pin
        assert set(manifest["files"]) == {
            "leader.toml",
            "leader.sqlite3",
            "ca/ca.pem",
            "ca/ca.key",
            "tls/leader.pem",
            "tls/leader.key",
        }
        for rel, desc in manifest["files"].items():
            path = dest / rel
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, rel
            assert hashlib.sha256(path.read_bytes()).hexdigest() == desc["sha256"], rel
        assert not (dest / "secrets").exists()
        passphrase = c.passphrase_path.read_bytes()
        assert not any(passphrase.strip() in p.read_bytes() for p in dest.rglob("*") if p.is_file())
        # The store stands alone (no -wal needed) and is whole.
        assert not list(dest.glob("leader.sqlite3-*"))
        with sqlite3.connect(f"file:{dest / 'leader.sqlite3'}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        tokens_at_backup = token_ids(c)  # at least those the backup holds (more were made)

        # The leader's server is lost: an empty data dir, the backup put back, the passphrase
        # from where the admin kept it.
        c.stop_leader()
        shutil.rmtree(c.data_dir)
        c.data_dir.mkdir(mode=0o700)
        for rel in manifest["files"]:
            target = c.data_dir / rel
            target.parent.mkdir(mode=0o700, exist_ok=True)
            shutil.copy2(dest / rel, target)
        c.passphrase_path.parent.mkdir(mode=0o700)
        c.passphrase_path.write_bytes(passphrase)
        os.chmod(c.passphrase_path, 0o600)
        c.start_leader()

        assert c.ca_pin() == pin
        c.wait_for_nodes_online(["n1", "n2"])
        restored = token_ids(c)
        assert restored and restored <= tokens_at_backup


def test_a_backup_into_a_used_directory_or_without_a_store_is_refused_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        used = tmp_path / "used"
        used.mkdir()
        (used / "mine.txt").write_text("the admin's\n")
        result = backup(c, used)
        assert result.returncode == 1
        assert "not an empty directory" in one_line_error(result.stderr, "tlsroll-leader")
        assert sorted(p.name for p in used.iterdir()) == ["mine.txt"]

        # `tlsroll init` made no store yet (the leader makes it at its first start).
        fresh = tmp_path / "fresh"
        result = backup(c, fresh)
        assert result.returncode == 1
        assert "nothing to back up" in one_line_error(result.stderr, "tlsroll-leader")
        assert not fresh.exists()


def restore(c: Cluster, dest: Path, passphrase: bytes) -> None:
    """The README's restore: the leader stopped, an empty data dir, the backup's files put
    back, the passphrase from where the admin kept it."""
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    c.stop_leader()
    shutil.rmtree(c.data_dir)
    c.data_dir.mkdir(mode=0o700)
    for rel in manifest["files"]:
        target = c.data_dir / rel
        target.parent.mkdir(mode=0o700, exist_ok=True)
        shutil.copy2(dest / rel, target)
    c.passphrase_path.parent.mkdir(mode=0o700)
    c.passphrase_path.write_bytes(passphrase)
    os.chmod(c.passphrase_path, 0o600)


def test_a_node_that_renewed_its_certificate_after_the_backup_is_back_after_a_restore(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.write_leader_config({"agent_cert_lifetime": 60})  # renewed at 42-54 s
        c.start_leader()
        n1 = c.add_agent("n1", next_loopback())
        c.wait_for_nodes_online(["n1"])
        first = n1.cert().serial_number
        dest = tmp_path / "backup"
        result = backup(c, dest)
        assert result.returncode == 0, result.stderr
        passphrase = c.passphrase_path.read_bytes()
        wait_until(lambda: n1.cert().serial_number != first, 90, "n1 renewed its certificate")
        renewed = n1.cert()
        restore(c, dest, passphrase)
        c.start_leader()
        c.wait_for_nodes_online(["n1"])
        assert "store.restored" in c.leader.event_names()
        assert c.list_nodes()["n1"].cert_serial == f"{renewed.serial_number:x}"
        [relearned] = [e for e in c.store_table("audit") if e["kind"] == "node.relearned"]
        assert relearned["subject"] == "n1"

        # Only a certificate issued after the backup, for the node's own names, is taken: one
        # the CA issued before it (superseded since, say) or for other addresses is refused.
        ca = pki.CertificateAuthority.load(
            c.ca_cert_path, c.ca_key_path, read_passphrase(c.passphrase_path)
        )
        td = spiffe.trust_domain(ca.cert)
        made = dt.datetime.fromisoformat(
            json.loads((dest / "MANIFEST.json").read_text())["made_at"]
        )
        for names, issued in (
            (pki.Names.of("n1", [n1.address]), made - dt.timedelta(minutes=10)),
            (pki.Names.of("n1", [next_loopback()]), dt.datetime.now(dt.UTC)),
        ):
            key = pki.generate_key()
            cert = ca.issue(
                key.public_key(),
                names,
                client=True,
                identity=spiffe.node(td, "n1"),
                internal_dns=[spiffe.key_host(td, pki.spki_pin(key.public_key()))],
                now=issued,
            )
            with (
                secure_channel(
                    c.control_target, c.ca_pem, pki.cert_to_pem(cert), pki.key_to_pem(key)
                ) as channel,
                pytest.raises(grpc.RpcError) as refused,
            ):
                leader_pb2_grpc.LeaderStub(channel).Heartbeat(
                    leader_pb2.HeartbeatRequest(agent_version="t", agent_port=n1.port),
                    timeout=10,
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (names, issued)
        assert c.list_nodes()["n1"].cert_serial == f"{renewed.serial_number:x}"
