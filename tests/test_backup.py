"""``tlsroll-leader --backup DIR``: a copy of a running leader that restores (README "Backups").

Real leader and agents as processes, a real SQLite store written while the backup reads it.
The restore is the README's steps, done by the test as an admin would: stop the leader, put
the files back into an empty data directory, give the CA passphrase kept offline, start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest

from leader.db import MIGRATIONS, recorded_ca_pin
from leader.layout import read_passphrase
from leader.store import Store
from tests.cluster import (
    AdminTokenCluster,
    Cluster,
    child_env,
    command,
    csr_pem,
    enrol,
    enrol_request,
    metrics_token_file,
    one_line_error,
    secure_channel,
    wait_until,
)
from tests.conftest import next_loopback
from tests.nodeside import tmpfs
from tlsroll import bootstrap_protocol, features, pki, spiffe
from tlsroll.v1 import agent_pb2, agent_pb2_grpc, leader_pb2, leader_pb2_grpc

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
        restore(c, dest, passphrase)
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
        assert result.returncode == 2  # (bad input, as any bad argument: opswalk s75 L2)
        assert "not an empty directory" in one_line_error(result.stderr, "tlsroll-leader")
        assert sorted(p.name for p in used.iterdir()) == ["mine.txt"]

        # A parent that is not there is not made (review of s38, L4: it was, with the umask's
        # mode, and left behind on failure).
        deep = tmp_path / "no" / "such" / "dir"
        result = backup(c, deep)
        assert result.returncode == 2
        assert "no such directory" in one_line_error(result.stderr, "tlsroll-leader")
        assert not (tmp_path / "no").exists()

        # `tlsroll init` made no store yet (the leader makes it at its first start).
        fresh = tmp_path / "fresh"
        result = backup(c, fresh)
        assert result.returncode == 1
        assert "nothing to back up" in one_line_error(result.stderr, "tlsroll-leader")
        assert not fresh.exists()


def test_a_backup_onto_a_disk_that_fills_up_leaves_nothing_behind(tmp_path: Path) -> None:
    """DIR on a file system that fills up while the store is copied (a USB disk or share
    nearly full): the backup fails in one line and leaves nothing, neither DIR nor the copy's
    SQLite side files (``.leader.sqlite3.tmp-PID-wal``/``-shm`` were left, hidden, holding
    store pages; DIR then was not removed and the next backup into it was refused as "not an
    empty directory": session 67's deploy review). Needs root (a tmpfs), as test_disk_faults."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        with sqlite3.connect(f"file:{c.data_dir / 'leader.sqlite3'}?mode=ro", uri=True) as db:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            page = db.execute("PRAGMA page_size").fetchone()[0]
        store = pages * page
        failed = 0
        # Room for less than the store up to the store and more: each way the copy can fail.
        for extra in range(-4096, 48 * 1024, 4096):
            fs = tmp_path / f"fs{extra + 4096}"
            with tmpfs(fs, str(store + 16 * 1024 + extra)):
                dest = fs / "backup"
                result = backup(c, dest)
                if result.returncode == 0:
                    assert (dest / "MANIFEST.json").is_file()
                    break
                failed += 1
                assert result.returncode == 1, result.stderr
                one_line_error(result.stderr, "tlsroll-leader")
                assert sorted(p.name for p in fs.iterdir()) == [], (extra, result.stderr)
        assert failed, "no size made the copy fail: the test tried nothing"


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


def test_a_restore_that_left_out_the_store_is_refused_until_it_is_copied(tmp_path: Path) -> None:
    """An admin who puts back the backup's config, ``ca/`` and ``tls/`` but not
    ``leader.sqlite3`` (session 68, restore helper's L): the leader started on a new, empty
    store (the nodes refused, the backup's leader key not revoked). Now it exits 4 (as for a
    lost store) with one line naming the two ways on, and makes nothing; the store copied in,
    it starts."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        c.add_agent("n1", next_loopback())
        c.wait_for_nodes_online(["n1"])
        dest = tmp_path / "backup"
        result = backup(c, dest)
        assert result.returncode == 0, result.stderr
        restore(c, dest, c.passphrase_path.read_bytes())
        store = c.data_dir / "leader.sqlite3"
        store.unlink()  # (forgotten)
        before = sorted(str(p.relative_to(c.data_dir)) for p in c.data_dir.rglob("*"))

        code, output = c.leader.run_to_exit(timeout=BACKUP_TIMEOUT)
        assert code == 4, output
        line = one_line_error(output, "tlsroll-leader", allow_grpc_core=True)
        assert line.startswith(f"tlsroll-leader: store {store}: missing"), line
        assert "leader.sqlite3" in line and "backup" in line and "--reinitialise" in line, line
        assert sorted(str(p.relative_to(c.data_dir)) for p in c.data_dir.rglob("*")) == before

        shutil.copy2(dest / "leader.sqlite3", store)
        c.start_leader()
        c.wait_for_nodes_online(["n1"])


def node_cert(
    ca: pki.CertificateAuthority,
    name: str,
    address: str,
    key: pki.PrivateKey,
    issued: dt.datetime,
) -> Any:
    """A node certificate as the leader issues one (enrolment, renewal), issued ``issued``."""
    td = spiffe.trust_domain(ca.cert)
    return ca.issue(
        key.public_key(),
        pki.Names.of(name, [address]),
        server=True,
        client=True,
        identity=spiffe.node(td, name),
        internal_dns=[spiffe.key_host(td, pki.spki_pin(key.public_key()))],
        now=issued,
    )


def heartbeat_code(c: Cluster, cert: Any, key: pki.PrivateKey, port: int) -> grpc.StatusCode:
    with secure_channel(
        c.control_target, c.ca_pem, pki.cert_to_pem(cert), pki.key_to_pem(key)
    ) as channel:
        try:
            leader_pb2_grpc.LeaderStub(channel).Heartbeat(
                leader_pb2.HeartbeatRequest(agent_version="t", agent_port=port), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_node_that_renewed_its_certificate_after_the_backup_is_back_after_a_restore(
    tmp_path: Path,
) -> None:
    """A restore from a backup older than a node's renewal refused that node for good (not
    the certificate on record). The renewal is made here as the leader makes one (the CA, the
    node's own key, issued after the backup), with the agent stopped, so that the test does
    not wait for a real one. Review of s38 (M1, M2): only once a node, never displacing a
    node still heard with the backup's certificate, never a second node at a node's address,
    never a certificate issued before the backup or for other addresses."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        n1 = c.add_agent("n1", next_loopback())
        n2 = c.add_agent("n2", next_loopback())
        c.wait_for_nodes_online(["n1", "n2"])
        dest = tmp_path / "backup"
        result = backup(c, dest)
        assert result.returncode == 0, result.stderr
        passphrase = c.passphrase_path.read_bytes()
        made = dt.datetime.fromisoformat(
            json.loads((dest / "MANIFEST.json").read_text())["made_at"]
        )
        ca = pki.CertificateAuthority.load(
            c.ca_cert_path, c.ca_key_path, read_passphrase(c.passphrase_path)
        )
        # n1 renews after the backup (its own key, a new certificate).
        n1.stop()
        n1_key = pki.read_key(n1.key_file)
        renewed = node_cert(ca, "n1", n1.address, n1_key, dt.datetime.now(dt.UTC))
        pki.write_cert(n1.cert_file, renewed)
        restore(c, dest, passphrase)
        c.start_leader()
        up = dt.datetime.now(dt.UTC)
        n1.start()
        c.wait_for_nodes_online(["n1", "n2"])

        # Both agents heard by the restarted leader (not only online by their stored time,
        # which the backup's moment makes recent): "live" below is about n2's agent beating
        # with the backup's certificate (ci24, a loaded machine: the refusal came before n2's
        # beat), and n1's renewed certificate is on record from its first beat, not before
        # (s69: n2 heard first under load, n1's serial read was still the backup's).
        def heard() -> bool:
            nodes = c.list_nodes()
            return all(nodes[n].last_heartbeat.ToDatetime(dt.UTC) > up for n in ("n1", "n2"))

        wait_until(heard, 20, "n1's and n2's agents heard by the restarted leader")
        assert c.leader.event_names().count("store.restored") == 1
        assert c.list_nodes()["n1"].cert_serial == f"{renewed.serial_number:x}"
        [relearned] = [e for e in c.store_table("audit") if e["kind"] == "node.relearned"]
        assert relearned["subject"] == "n1"

        now = dt.datetime.now(dt.UTC)
        refused = {
            # issued before the backup (a certificate the backup's store had superseded)
            "before": (
                node_cert(
                    ca, "n1", n1.address, k := pki.generate_key(), made - dt.timedelta(minutes=10)
                ),
                k,
                n1.port,
            ),
            # for other addresses
            "elsewhere": (
                node_cert(ca, "n1", next_loopback(), k := pki.generate_key(), now),
                k,
                n1.port,
            ),
            # a second one since the backup: n1 was re-learned once already
            "again": (node_cert(ca, "n1", n1.address, k := pki.generate_key(), now), k, n1.port),
            # n2 is heard with the backup's certificate: a newer one does not displace it
            "live": (node_cert(ca, "n2", n2.address, k := pki.generate_key(), now), k, n2.port),
            # a node unknown to the backup at n1's address
            "same address": (
                node_cert(ca, "n9", n1.address, k := pki.generate_key(), now),
                k,
                9442,
            ),
        }
        audit = len(c.store_table("audit"))
        codes = {
            why: heartbeat_code(c, cert, key, port) for why, (cert, key, port) in refused.items()
        }
        assert codes == dict.fromkeys(refused, grpc.StatusCode.UNAUTHENTICATED)
        assert len(c.store_table("audit")) == audit  # a refusal writes nothing
        nodes = c.list_nodes()
        assert set(nodes) == {"n1", "n2"}
        assert nodes["n1"].cert_serial == f"{renewed.serial_number:x}"
        assert nodes["n2"].cert_serial == f"{n2.cert().serial_number:x}"
        # A node enrolled after the backup, at an address of its own, is re-learned.
        n9 = node_cert(ca, "n9", next_loopback(), k := pki.generate_key(), now)
        assert heartbeat_code(c, n9, k, 9442) == grpc.StatusCode.OK
        assert "n9" in c.list_nodes()


def test_a_leader_gone_back_to_the_copy_kept_before_an_upgrade_relearns_renewed_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s40, H1: README "Downgrading tlsroll" on the leader (stop, remove
    -wal and -shm, move NAME.before-vN over NAME, start). The copy was a plain copy: the
    leader started on it did not know it ran on an older state, so a node whose agent renewed
    its certificate since the upgrade was refused for good (UNAUTHENTICATED, not the
    certificate on record), and nothing said what else was lost. The copy is marked as it is
    made (``leader.db.mark_copy``: ``backup_made_at``), and the leader's restore handling
    takes it as a backup: the renewed node is re-learned, ``store.restored`` said.

    The upgrade is the store's own migration path (``open_db`` with one more migration, that
    changes nothing here), and the newer version's run is the current leader's (its schema
    set back by hand); the renewal is made as the leader makes one, with the agent stopped."""
    from leader import db as leader_db

    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        n1 = c.add_agent("n1", next_loopback())
        c.add_agent("n2", next_loopback())
        c.wait_for_nodes_online(["n1", "n2"])
        # The upgrade: the copy kept as a newer tlsroll keeps it, before its migration.
        c.stop_leader()
        known = len(leader_db.MIGRATIONS)
        monkeypatch.setattr(leader_db, "MIGRATIONS", (*leader_db.MIGRATIONS, ""))
        leader_db.open_db(c.store_path).close()
        copy = c.store_path.with_name(f"{c.store_path.name}.before-v{known + 1}")
        assert copy.exists()
        with contextlib.closing(sqlite3.connect(c.store_path)) as db:
            db.execute(f"PRAGMA user_version={known}")
            db.commit()
        c.start_leader()
        c.wait_for_nodes_online(["n1", "n2"])
        # The newer leader's store is not a copy put back (review s40 M3).
        assert c.leader.event_names().count("store.restored") == 0
        # ... the newer version runs: n1's agent renews its certificate.
        ca = pki.CertificateAuthority.load(
            c.ca_cert_path, c.ca_key_path, read_passphrase(c.passphrase_path)
        )
        n1.stop()
        renewed = node_cert(
            ca, "n1", n1.address, pki.read_key(n1.key_file), dt.datetime.now(dt.UTC)
        )
        pki.write_cert(n1.cert_file, renewed)
        # README's way back.
        c.stop_leader()
        for suffix in ("-wal", "-shm"):
            Path(f"{c.store_path}{suffix}").unlink(missing_ok=True)
        os.replace(copy, c.store_path)
        c.start_leader()
        n1.start()
        # Online by the copy's own last heartbeat (a few seconds old) before n1 is back: wait
        # for what its return brings (ci52a: the serial read before n1's first heartbeat).
        serial = f"{renewed.serial_number:x}"
        wait_until(lambda: c.list_nodes()["n1"].cert_serial == serial, 20, "n1's renewal relearned")
        c.wait_for_nodes_online(["n1", "n2"])
        assert c.leader.event_names().count("store.restored") == 1
        [relearned] = [e for e in c.store_table("audit") if e["kind"] == "node.relearned"]
        assert relearned["subject"] == "n1"


def test_a_restore_revokes_the_tokens_a_node_may_have_enrolled_by_since(tmp_path: Path) -> None:
    """Race audit of session 39, L2: two tokens for n3 are in the backup; n3 enrols by one of
    them after it. The restored store holds both unused again and does not know n3 until its
    agent is heard: the other token, given a fresh key, took the name n3 (its agent then
    refused for good). The restore revokes every token with a use left; n3's agent is
    re-learned; a token made after the restore enrols."""
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        address = next_loopback()
        lost = c.create_token("n3", address)
        used = c.create_token("n3", address)
        dest = tmp_path / "backup"
        result = backup(c, dest)
        assert result.returncode == 0, result.stderr
        passphrase = c.passphrase_path.read_bytes()
        n3 = c.add_agent("n3", address, token=used)
        c.wait_for_nodes_online(["n3"])
        n3.stop()
        restore(c, dest, passphrase)
        c.start_leader()

        with pytest.raises(grpc.RpcError) as refused:
            enrol(c, enrol_request(lost, "n3", address, key=pki.generate_key()))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "restored from a backup" in (refused.value.details() or "")
        assert "create a new token" in (refused.value.details() or "")
        assert "n3" not in c.list_nodes()
        # Made after the restore, before n3's agent is heard: its re-learning supersedes it,
        # and the refusal and `token list` name the re-learning, not an enrolment (s44).
        late = c.create_token("n3", address)

        n3.start()
        c.wait_for_nodes_online(["n3"])
        assert c.list_nodes()["n3"].cert_serial == f"{n3.cert().serial_number:x}"
        listed = {t["id"]: t for t in json.loads(c.cli("token", "list", "--json").stdout)}
        assert all(listed[t.split(".", 1)[0]].get("revoked") for t in (lost, used))
        late_id = late.split(".", 1)[0]
        assert listed[late_id]["superseded_by"] == "re-learning"
        table = c.cli("token", "list")
        assert table.returncode == 0, table.stderr
        (row,) = [line for line in table.stdout.splitlines() if late_id in line]
        assert "superseded (re-learned by the leader 20" in row, row  # not by n3 (s44rev3)
        with pytest.raises(grpc.RpcError) as superseded:
            enrol(c, enrol_request(late, "n3", address, key=pki.generate_key()))
        details = superseded.value.details() or ""
        assert superseded.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert f"join token {late_id} is superseded by n3's re-learning at" in details, details
        assert "enrolment" not in details and "create a new token" in details
        [restored] = [e for e in c.store_table("audit") if e["kind"] == "store.restored"]
        assert sorted(json.loads(restored["detail"])["revoked_tokens"]) == sorted(
            t.split(".", 1)[0] for t in (lost, used)
        )
        fresh = next_loopback()
        enrol(c, enrol_request(c.create_token("n4", fresh), "n4", fresh))
        assert "n4" in c.list_nodes()


def test_a_restore_revokes_the_viewer_grants_one_of_which_may_have_been_revoked_since(
    tmp_path: Path,
) -> None:
    """rev57b H1: a viewer grant revoked after the backup was open again in the restored store,
    and its session got in (the revocation silently undone; after a lost disk nobody knows
    which were revoked). The restore revokes every grant still open: the one revoked since and
    the one never revoked are refused; one granted after the restore opens."""
    from tests.test_viewer import fetch, grants, link_for, session_for, sign_in

    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        revoked_since = session_for(c, "revoked since")
        kept_link = link_for(c, "never revoked")
        dest = tmp_path / "backup"
        result = backup(c, dest)
        assert result.returncode == 0, result.stderr
        passphrase = c.passphrase_path.read_bytes()
        gone = c.cli("viewer", "revoke", grants(c)["revoked since"]["id"])
        assert gone.returncode == 0, gone.stderr
        assert fetch(c, "/", cookie=revoked_since).status == 401
        restore(c, dest, passphrase)
        c.start_leader()

        assert fetch(c, "/", cookie=revoked_since).status == 401  # it was 200 again
        listed = grants(c)
        assert {g["state"] for g in listed.values()} == {"revoked"}, listed
        [restored] = [e for e in c.store_table("audit") if e["kind"] == "store.restored"]
        assert sorted(json.loads(restored["detail"])["revoked_viewer_grants"]) == sorted(
            g["id"] for g in listed.values()
        )
        opened = fetch(c, "/" + kept_link.split("/", 3)[3] + "/open")
        assert opened.status != 303, opened
        assert fetch(c, "/", cookie=sign_in(c, link_for(c, "after"))).status == 200


def test_a_backup_names_the_metrics_token_file_it_leaves_out_and_is_no_reinitialise(
    tmp_path: Path,
) -> None:
    """rev57b L5: the summary's "Not in it" left out the config's metrics_token_file, which the
    README says is not in the backup; L4: ``--backup DIR --reinitialise`` made the backup and
    ignored the other without a word: a usage error (exit 2), nothing written."""
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        token = metrics_token_file(tmp_path / "metrics-token")
        c.write_leader_config({"metrics_token_file": str(token)})
        c.start_leader()
        made = backup(c, tmp_path / "backup")
        assert made.returncode == 0, made.stderr
        assert f"the metrics token file {token} (copy it yourself)" in made.stdout
        assert "scrape-token" not in made.stdout + made.stderr
        both = subprocess.run(
            [*command("tlsroll-leader", "leader.daemon"), "--config", str(c.config_path),
             "--backup", str(tmp_path / "again"), "--reinitialise"],
            capture_output=True, text=True, timeout=BACKUP_TIMEOUT, env=child_env(), check=False,
        )  # fmt: skip
        assert both.returncode == 2, both.stdout + both.stderr
        assert "--backup and --reinitialise are two things to do" in both.stderr
        assert not (tmp_path / "again").exists()


def test_the_summary_names_the_readme_s_restore_section_as_it_is_headed(tmp_path: Path) -> None:
    """Session 75 adminwalk: the summary sent the admin to README 'Backups', a heading the
    README does not have (the steps are under "Operations", "Backups of the leader")."""
    from leader.backup import summary

    manifest: dict[str, object] = {"files": {"leader.toml": {"bytes": 1}}, "ca_pin": "sha256:00"}
    said = summary(tmp_path, manifest).split("To restore: README, ")[1]
    names = re.findall(r'"([^"]+)"', said)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert names, said
    for name in names:
        assert f"\n## {name}\n" in readme or f"\n- **{name}:**" in readme, name


def superseded_by(c: Cluster) -> dict[str, str]:
    """``token list --json``: what superseded each token ("" for none)."""
    listed = c.cli("token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {t["id"]: t.get("superseded_by", "") for t in json.loads(listed.stdout)}


CURRENT = len(MIGRATIONS)
"""The store schema of this leader."""


def set_back_to_schema_12(dest: Path) -> None:
    """The backup as the leader of store schema 12 made it: migration 13 only adds the audit's
    index of re-learnings and records the floor that may read the file (``schema_floor``),
    migration 14 a column of the rollouts, 15 one of the nodes, 16 another of the rollouts,
    17 and 18 one of the certificates each with its index, 19 the audit's index of removals,
    20 its index of viewer sign-outs; all go, the schema is set back, the manifest says so."""
    store = dest / "leader.sqlite3"
    with contextlib.closing(sqlite3.connect(store, isolation_level=None)) as db:
        db.execute("DROP INDEX audit_signed_out")
        db.execute("DROP INDEX audit_removed")
        db.execute("DROP INDEX certificates_key_pin")
        db.execute("ALTER TABLE certificates DROP COLUMN key_pin")
        db.execute("DROP INDEX certificates_issued_from")
        db.execute("ALTER TABLE certificates DROP COLUMN issued_from")
        db.execute("ALTER TABLE rollouts DROP COLUMN way_back_offered")
        db.execute("ALTER TABLE rollouts DROP COLUMN removed_since")
        db.execute("ALTER TABLE nodes DROP COLUMN names_apart")
        db.execute("DROP INDEX audit_relearned")
        db.execute("DROP TABLE schema_floor")
        db.execute("PRAGMA user_version=12")
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    data = store.read_bytes()
    manifest["store_schema"] = 12
    manifest["files"]["leader.sqlite3"] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


def test_a_backup_of_store_schema_12_is_migrated_by_the_restored_leader_s_first_start(
    tmp_path: Path,
) -> None:
    """Session 45 (store schema 13: the audit's index of re-learnings, read to say what
    superseded a join token): a backup the leader of schema 12 made, restored as README
    "Backups" says, is migrated by the leader's first start (no copy kept beside it:
    migration 13 is one the leader of schema 12 may ignore, and that leader reads
    ``readable_by``, so it runs on the migrated file as it is, review rev50a L1; ``--backup``
    reads it as it is), which knows it for a restored store; ``token list``
    says what superseded each token as the leader backed up said it (an enrolment, a
    re-learning). The backup is this leader's, set back to schema 12 by hand (what migration
    13 adds, removed)."""
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        passphrase = c.passphrase_path.read_bytes()
        address = next_loopback()
        used = c.create_token("n3", address)
        first = tmp_path / "first"
        assert backup(c, first).returncode == 0
        n3 = c.add_agent("n3", address, token=used)
        c.wait_for_nodes_online(["n3"])
        n3.stop()
        # A token superseded by a re-learning: n3 enrolled after the backup restored.
        restore(c, first, passphrase)
        c.start_leader()
        late = c.create_token("n3", address).split(".", 1)[0]
        n3.start()
        c.wait_for_nodes_online(["n3"])
        # ... and one superseded by an enrolment.
        a4 = next_loopback()
        spare = c.create_token("n4", a4).split(".", 1)[0]
        enrol(c, enrol_request(c.create_token("n4", a4), "n4", a4))
        before = superseded_by(c)
        assert (before[late], before[spare]) == ("re-learning", "enrolment")

        dest = tmp_path / "backup"
        result = backup(c, dest)
        assert result.returncode == 0, result.stderr
        assert json.loads((dest / "MANIFEST.json").read_text())["store_schema"] == CURRENT
        set_back_to_schema_12(dest)
        restored_before = c.leader.event_names().count("store.restored")
        restore(c, dest, passphrase)
        # A backup reads the store as it is, never migrates it (the leader running on it may
        # be the older one): one taken now says schema 12, and the store stays so.
        again = tmp_path / "again"
        result = backup(c, again)
        assert result.returncode == 0, result.stderr
        assert json.loads((again / "MANIFEST.json").read_text())["store_schema"] == 12
        c.start_leader()
        c.wait_for_nodes_online(["n3"])

        events = c.leader.event_names()
        assert events.count("store.restored") == restored_before + 1
        assert "store.copy_skipped" in events and "store.copy_kept" not in events
        with contextlib.closing(
            sqlite3.connect(f"{c.store_path.as_uri()}?mode=ro", uri=True)
        ) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == CURRENT
            assert db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'audit_relearned'"
            ).fetchone()
            assert db.execute("SELECT readable_by FROM schema_floor").fetchall() == [(12,)]
        assert not c.store_path.with_name(f"{c.store_path.name}.before-v{CURRENT}").exists()
        assert superseded_by(c) == before


def test_a_backup_holds_the_leader_s_certificate_with_its_own_key(tmp_path: Path) -> None:
    """The session's closing review, L4: since each renewal of the leader's certificate writes
    a new key, then the certificate, a backup that copied them one after the other while one
    ran could hold the new key with the old certificate. The backup checks the copied pair
    (the TLS library loads them together), copies it again while they differ, and refuses one
    that stays so (a data dir whose files are of two pairs): one line, nothing left."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        c.stop_leader()
        good = backup(c, tmp_path / "good")
        assert good.returncode == 0, good.stderr
        key = c.data_dir / "tls" / "leader.key"
        kept = key.read_bytes()
        pki.write_key(key, pki.generate_key())  # another key beside leader.pem
        try:
            mixed = tmp_path / "mixed"
            result = backup(c, mixed)
            assert result.returncode == 1, result.stdout + result.stderr
            line = one_line_error(result.stderr, "tlsroll-leader")
            assert "tls/leader.pem is not tls/leader.key's certificate" in line, line
            assert not mixed.exists()
        finally:
            key.write_bytes(kept)


def crl_held(agent: Any, ca_pem: bytes) -> tuple[int, frozenset[int]]:
    """The number and serials of the revocation list ``agent`` keeps (0 and none: no list)."""
    path = agent.data_dir / "crl.pem"
    if not path.exists():
        return 0, frozenset()
    return pki.load_crl(path.read_bytes(), pki.load_cert_pem(ca_pem))


def agent_status(agent: Any, ca_pem: bytes, chain: bytes, key: bytes) -> grpc.StatusCode:
    """What ``agent`` answers ``GetStatus`` called with ``chain`` and ``key``."""
    with secure_channel(agent.target, ca_pem, chain, key, name=agent.tls_name) as channel:
        try:
            agent_pb2_grpc.NodeAgentStub(channel).GetStatus(
                agent_pb2.GetStatusRequest(), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.timeout(300)
def test_a_restore_keeps_what_was_revoked_since_the_backup_and_serves_a_new_leader_key(
    tmp_path: Path,
) -> None:
    """Review s64 (H): a restore quietly un-revoked what was revoked after its backup, at every
    agent. The restored leader served the backup's leader.pem and leader.key, revoked since;
    the agents said they held a list numbered above the store's, the leader raised its number
    past theirs (``crl.floor_raised``) and sent a list built from the backup's store, which
    lacked the revocations: every agent took it within seconds, dropping the only record of
    them, and obeyed the revoked key again (and a node's revoked certificate came back). Now
    the restore revokes every leader certificate on record (the backup holds the key) and the
    start serves a new key; and the leader asks an agent whose list was issued after the
    backup for it (``wants_crl``), records what it revokes, and only then sends its own."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        n1 = c.add_agent("n1", next_loopback())
        n2 = c.add_agent("n2", next_loopback())
        c.wait_for_nodes_online(["n1", "n2"])
        dest = tmp_path / "backup"
        made = backup(c, dest)
        assert made.returncode == 0, made.stderr
        passphrase = c.passphrase_path.read_bytes()
        copied_chain, copied_key = c.leader_credentials()  # the backup's, served now
        served = f"{pki.read_cert(c.tls_cert_path).serial_number:x}"
        stolen = f"{n2.cert().serial_number:x}"  # n2's machine, lost after the backup
        for serial in (served, stolen):
            revoked = c.cli("ca", "revoke", serial, "--reason", "copied")
            assert revoked.returncode == 0, (revoked.stdout, revoked.stderr)
        wanted = {int(served, 16), int(stolen, 16)}
        wait_until(
            lambda: wanted <= crl_held(n1, c.ca_pem)[1], 30, "n1's list holds both revocations"
        )
        number_before, _ = crl_held(n1, c.ca_pem)
        refused = agent_status(n1, c.ca_pem, copied_chain, copied_key)
        assert refused == grpc.StatusCode.UNAUTHENTICATED

        restore(c, dest, passphrase)
        c.start_leader()

        # A new key, and none of the backup's certificates is served.
        now_served = f"{pki.read_cert(c.tls_cert_path).serial_number:x}"
        assert now_served != served
        assert c.tls_key_path.read_bytes() != copied_key
        assert c.tls_key_path.stat().st_mode & 0o777 == 0o600
        [restored] = [e for e in c.leader.log_events() if e.get("event") == "store.restored"]
        assert served in restored["revoked_leader_serials"], restored

        # The store learns n1's list before it sends n1 one of its own.
        def revoked_in_store() -> dict[str, str]:
            rows = c.store_table("certificates")
            return {r["serial"]: r["revoke_reason"] for r in rows if r["revoked_at"]}

        wait_until(lambda: stolen in revoked_in_store(), 30, "n2's revocation learned")
        reasons = revoked_in_store()
        assert served in reasons, reasons
        assert "revoked before the restore" in reasons[stolen], reasons[stolen]
        learned = [e for e in c.store_table("audit") if e["kind"] == "crl.learned"]
        assert any(stolen in json.loads(e["detail"])["serials"] for e in learned), learned
        # n1 takes the restored leader's list (a higher number), which still names both.
        wait_until(
            lambda: crl_held(n1, c.ca_pem)[0] > number_before, 30, "n1 takes the leader's list"
        )
        assert wanted <= crl_held(n1, c.ca_pem)[1]
        unlearned = [e for e in c.leader.log_events() if e.get("event") == "crl.not_learned"]
        assert not unlearned, "n1's agent names the feature"
        # The copied key commands nothing; the new one does; n2's certificate stays refused.
        assert agent_status(n1, c.ca_pem, copied_chain, copied_key) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        chain, key = c.leader_credentials()
        assert agent_status(n1, c.ca_pem, chain, key) == grpc.StatusCode.OK
        n2_key = pki.read_key(n2.key_file)
        assert heartbeat_code(c, n2.cert(), n2_key, n2.port) == grpc.StatusCode.UNAUTHENTICATED

        # A list this CA did not sign, for a number of that span, records nothing: refused and
        # said (crl.not_learned), and the agent gets the leader's list instead.
        [above] = [r["value"] for r in c.store_table("meta") if r["key"] == "crl_restored_above"]
        number = int(above) + 1
        forged = pki.crl_to_pem(
            pki.build_crl(
                pki.CertificateAuthority.create("not this cluster's CA"),
                number,
                [("5eed", dt.datetime.now(dt.UTC))],
            )
        )
        n1_cert, n1_key = pki.cert_to_pem(n1.cert()), pki.key_to_pem(pki.read_key(n1.key_file))
        with secure_channel(c.control_target, c.ca_pem, n1_cert, n1_key) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            request = leader_pb2.HeartbeatRequest(
                agent_version="t",
                agent_port=n1.port,
                crl_number=number,
                features=[features.HELD_CRL],
            )
            asked = stub.Heartbeat(request, timeout=10)
            assert asked.wants_crl and not asked.crl_pem
            request.held_crl_pem = forged
            answered = stub.Heartbeat(request, timeout=10)
            assert not answered.wants_crl and answered.crl_pem
        assert "5eed" not in revoked_in_store()
        [said] = [e for e in c.leader.log_events() if e.get("event") == "crl.not_learned"]
        assert (said["node"], said["held"]) == ("n1", number), said
        assert "the list it sent is refused" in said["why"], said


@pytest.mark.timeout(300)
def test_an_older_agent_whose_list_the_restored_leader_cannot_learn_is_named(
    tmp_path: Path,
) -> None:
    """The same restore with an agent of an earlier release (it names no feature): the leader
    cannot ask it for its list. It says so, naming the node (``crl.not_learned``), and the
    agent gets the leader's list as before; the backup's leader key is revoked all the same
    (the restore's own revocation), so the agent refuses it."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        n1 = c.add_agent("n1", next_loopback(), env={features.TEST_ENV: ""})
        c.wait_for_nodes_online(["n1"])
        dest = tmp_path / "backup"
        made = backup(c, dest)
        assert made.returncode == 0, made.stderr
        passphrase = c.passphrase_path.read_bytes()
        copied_chain, copied_key = c.leader_credentials()
        served = f"{pki.read_cert(c.tls_cert_path).serial_number:x}"
        assert c.cli("ca", "revoke", served).returncode == 0
        wait_until(lambda: int(served, 16) in crl_held(n1, c.ca_pem)[1], 30, "n1 holds it")
        number_before, _ = crl_held(n1, c.ca_pem)

        restore(c, dest, passphrase)
        c.start_leader()

        wait_until(
            lambda: any(e.get("event") == "crl.not_learned" for e in c.leader.log_events()),
            30,
            "the leader names the node it cannot learn from",
        )
        [said] = [e for e in c.leader.log_events() if e.get("event") == "crl.not_learned"]
        assert (said["node"], said["held"]) == ("n1", number_before), said
        wait_until(lambda: crl_held(n1, c.ca_pem)[0] > number_before, 30, "n1 takes the list")
        assert int(served, 16) in crl_held(n1, c.ca_pem)[1]
        assert agent_status(n1, c.ca_pem, copied_chain, copied_key) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


@pytest.mark.timeout(300)
def test_a_copied_agent_key_revoked_after_the_backup_that_renews_first_is_cut_off_by_the_learning(
    tmp_path: Path,
) -> None:
    """Review s64 b4 (H): n2's machine is lost after the backup (its key copied) and its
    certificate revoked (`ca revoke`). The leader is restored; before any agent's list is
    learned (n1, the one agent left, is off for a moment: a reboot), the copy renews with n2's
    revoked certificate, which the restored store does not know for revoked, and asks for a
    workstation certificate with it. Once n1 is back, its list is learned, and with the listed
    serial go the certificate renewed from it and the workstation's (``Store.learn_revoked``,
    ``lineage_in``): the renewed one's next call is refused, and the lists the agents get hold
    both. Before, the renewed certificate outlived the learning: the copy was node n2 for
    good."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        n1 = c.add_agent("n1", next_loopback())
        n2 = c.add_agent("n2", next_loopback())
        c.wait_for_nodes_online(["n1", "n2"])
        dest = tmp_path / "backup"
        made = backup(c, dest)
        assert made.returncode == 0, made.stderr
        passphrase = c.passphrase_path.read_bytes()
        stolen_chain, stolen_key = n2.cert_file.read_bytes(), n2.key_file.read_bytes()
        stolen = f"{n2.cert().serial_number:x}"
        n2.stop()  # the machine is gone, its key copied
        revoked = c.cli("ca", "revoke", stolen, "--reason", "machine stolen")
        assert revoked.returncode == 0, (revoked.stdout, revoked.stderr)
        wait_until(lambda: int(stolen, 16) in crl_held(n1, c.ca_pem)[1], 30, "n1 holds it")
        n1.stop()

        restore(c, dest, passphrase)
        c.start_leader()

        # The copy, first: its revoked certificate renews, and signs a workstation's.
        new_key = pki.generate_key()
        ws_key = pki.generate_key()
        ws_csr = pki.make_csr(ws_key, bootstrap_protocol.workstation_names("ws-dieb"))
        with secure_channel(c.control_target, c.ca_pem, stolen_chain, stolen_key) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            renewed = stub.RenewNodeCertificate(
                leader_pb2.RenewNodeCertificateRequest(
                    csr_pem=csr_pem(new_key, "n2", [n2.address]), names_apart=True
                ),
                timeout=10,
            )
            ws_cert = pki.load_cert_pem(
                stub.SignWorkstationCertificate(
                    leader_pb2.SignWorkstationRequest(csr_pem=pki.csr_to_pem(ws_csr)), timeout=10
                ).certificate_pem
            )
        fresh = pki.load_cert_pem(renewed.certificate_pem)
        assert heartbeat_code(c, fresh, new_key, n2.port) == grpc.StatusCode.OK
        renewed_serial, ws_serial = f"{fresh.serial_number:x}", f"{ws_cert.serial_number:x}"

        n1.start()

        def revoked_in_store() -> dict[str, str]:
            rows = c.store_table("certificates")
            return {r["serial"]: r["revoke_reason"] for r in rows if r["revoked_at"]}

        wait_until(lambda: stolen in revoked_in_store(), 60, "n1's list learned")
        reasons = revoked_in_store()
        assert reasons[renewed_serial].startswith(f"issued from {stolen}: revoked before the")
        assert reasons[ws_serial].startswith(f"issued from {stolen}: revoked before the")
        assert heartbeat_code(c, fresh, new_key, n2.port) == grpc.StatusCode.UNAUTHENTICATED
        [learned] = [e for e in c.leader.log_events() if e.get("event") == "crl.learned"]
        assert {stolen, renewed_serial, ws_serial} <= set(learned["serials"]), learned
        wanted = {int(s, 16) for s in (stolen, renewed_serial, ws_serial)}
        wait_until(lambda: wanted <= crl_held(n1, c.ca_pem)[1], 30, "n1's list holds all three")


# --- the store's CA (review s67 deploy M1) -------------------------------------------------------


def store_ca_pin(path: Path) -> str | None:
    """The CA pin the store at ``path`` records (``meta``'s ``ca_pin``), or None."""
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'ca_pin'").fetchone()
    return None if row is None else str(row[0])


class TwoClusters(NamedTuple):
    a: Cluster
    b: Cluster
    pin_a: str
    pin_b: str
    passphrase_a: bytes
    dest: Path


@contextlib.contextmanager
def two_clusters(tmp_path: Path) -> Iterator[TwoClusters]:
    """Two clusters, A and B, to mix on a restore: A's leader running with its node ``n1``
    online, a backup of A in ``tmp_path/backup``, A's pin and passphrase read; B initialised
    only (another cluster: its own CA, leader certificate and passphrase)."""
    with (
        Cluster(tmp_path / "a", next_loopback()) as a,
        Cluster(tmp_path / "b", next_loopback()) as b,
    ):
        a.init()
        a.start_leader()
        a.add_agent("n1", next_loopback())
        a.wait_for_nodes_online(["n1"])
        pin_a = a.ca_pin()
        passphrase_a = a.passphrase_path.read_bytes()
        dest = tmp_path / "backup"
        assert backup(a, dest).returncode == 0
        b.init()
        yield TwoClusters(a, b, pin_a, b.ca_pin(), passphrase_a, dest)


def test_the_store_records_the_first_ca_pin_and_keeps_it(tmp_path: Path) -> None:
    """``Store.own_ca_pin``: the first pin is recorded, another is answered with the one on
    record and not written; ``recorded_ca_pin`` reads it without opening the store to write
    (None for a missing file or one that is no store)."""
    path = tmp_path / "leader.sqlite3"
    assert recorded_ca_pin(path) is None
    store = Store(path)
    try:
        assert recorded_ca_pin(path) is None
        assert store.own_ca_pin("sha256:aa") is None
        assert store.own_ca_pin("sha256:aa") == "sha256:aa"
        assert store.own_ca_pin("sha256:bb") == "sha256:aa"
    finally:
        store.close()
    assert recorded_ca_pin(path) == "sha256:aa"
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database" * 100)
    assert recorded_ca_pin(junk) is None


def test_a_restore_that_mixes_two_clusters_files_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """A store of cluster A put back with the ``ca/`` and ``tls/`` of cluster B (and B's
    passphrase): the leader started without a word, every node of A offline (their agents
    pin A's CA) and the leader issuing from B's CA. Now the store records its CA's pin at the
    leader's first start, and a start with another CA is refused (exit 2, one line naming both
    pins and what to do), before anything is changed: the store, the CA key. A's ``ca/`` put
    back with B's ``tls/`` left, it starts (its certificate issued again from A's CA); the same
    backup's ``ca/`` and ``tls/`` put back, it starts; and A's node is back each time."""
    with two_clusters(tmp_path) as (a, b, pin_a, pin_b, passphrase_a, dest):
        assert store_ca_pin(a.store_path) == pin_a  # (recorded at the first start)
        assert pin_b != pin_a

        restore(a, dest, passphrase_a)
        for sub in ("ca", "tls"):
            for path in (b.data_dir / sub).iterdir():
                shutil.copy2(path, a.data_dir / sub / path.name)
        a.passphrase_path.write_bytes(b.passphrase_path.read_bytes())
        before = {p: p.read_bytes() for p in (a.store_path, a.ca_key_path, a.tls_cert_path)}

        code, output = a.leader.run_to_exit()
        assert code == 2, output
        line = one_line_error(output, "tlsroll-leader")
        assert pin_a in line and pin_b in line, line
        assert "from the same backup as the store" in line, line
        assert {p: p.read_bytes() for p in before} == before
        assert not list(a.data_dir.glob("leader.sqlite3?*")), list(a.data_dir.iterdir())

        # The backup's ca/ put back, B's tls/ left: the leader's certificate of B's CA, which
        # agents would refuse, is issued again from A's CA at the start (session 51), for a
        # new key, and n1 is back.
        for path in (dest / "ca").iterdir():
            shutil.copy2(path, a.data_dir / "ca" / path.name)
        a.passphrase_path.write_bytes(passphrase_a)
        b_leader = b.tls_cert_path.read_bytes()
        assert a.tls_cert_path.read_bytes() == b_leader
        a.start_leader()
        served = pki.read_cert(a.tls_cert_path)
        assert pki.issued_by(served, pki.read_cert(a.ca_cert_path))
        assert not pki.key_matches(served, pki.read_key(b.tls_key_path))
        assert store_ca_pin(a.store_path) == pin_a
        a.wait_for_nodes_online(["n1"])
        a.stop_leader()

        # The backup's own ca/ and tls/ (and passphrase) put back: it starts, n1 is back.
        restore(a, dest, passphrase_a)
        a.start_leader()
        assert a.ca_pin() == pin_a and store_ca_pin(a.store_path) == pin_a
        a.wait_for_nodes_online(["n1"])
        assert "store.restored" in a.leader.event_names()


def test_a_store_of_an_earlier_release_records_its_ca_at_the_first_start(tmp_path: Path) -> None:
    """A store without the CA's pin (a release before, or a backup it made) starts as before
    and records the pin of the CA it starts with; a start with another CA after that is
    refused. The backup is this leader's with the pin taken out."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        pin = c.ca_pin()
        passphrase = c.passphrase_path.read_bytes()
        dest = tmp_path / "backup"
        assert backup(c, dest).returncode == 0
        with contextlib.closing(sqlite3.connect(dest / "leader.sqlite3")) as db, db:
            db.execute("DELETE FROM meta WHERE key = 'ca_pin'")
        assert store_ca_pin(dest / "leader.sqlite3") is None
        restore(c, dest, passphrase)
        c.start_leader()
        assert store_ca_pin(c.store_path) == pin
        assert "store.ca_pin_recorded" in c.leader.event_names()
        assert c.ca_pin() == pin


def test_a_ca_renewed_with_its_key_keeps_the_store_s_pin_and_starts(tmp_path: Path) -> None:
    """``tlsroll ca renew`` makes a new CA certificate for the same key: the pin the store
    records is the key's (SPKI), not the certificate's, so the leader starts again on it, and
    on a backup made before the renewal restored with the renewed ``ca/``."""
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        pin = c.ca_pin()
        passphrase = c.passphrase_path.read_bytes()
        dest = tmp_path / "backup"
        assert backup(c, dest).returncode == 0
        old = c.ca_pem
        renew = c.cli("ca", "renew", "--yes", "--force")
        assert renew.returncode == 0, (renew.stdout, renew.stderr)
        assert c.ca_pem != old and c.ca_pin() == pin
        c.stop_leader()
        c.start_leader()
        assert store_ca_pin(c.store_path) == pin
        renewed = c.ca_pem
        restore(c, dest, passphrase)
        c.ca_cert_path.write_bytes(renewed)
        c.start_leader()
        assert c.ca_pem == renewed and store_ca_pin(c.store_path) == pin
