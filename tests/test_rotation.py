"""Rotating the server (8443) certificates of a 3-node cluster under continuous writes
(issue 11): real leader, agents and reference servers, writers posting over https (trusting
only the cluster CA) to every node throughout.

One node is made to fail verification from outside: the moment its new certificate is staged,
the test swaps the staged pair for another CA-signed pair with the node's names (as a
misbehaving deployment tool or a second hand on the server might), so the server starts but
presents a certificate other than the one the leader signed and recorded. The agent's check
of the *new* fingerprint fails and the node goes back to its old certificate. Nothing goes
through a test hook of the product.

Afterwards: the two other nodes present their new certificates to a plain ssl client, the
failed one its old certificate, every write any server acknowledged is stored exactly once, and
the certificates the two nodes no longer serve are revoked as "superseded" (the schema, and the
revocation list the agents get), while the failed node's old one, still live, is not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import http.client
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from leader.store import IssuedCert, Store, crl_time, revoke_undelivered_in
from refserver.server import WRITE_DELAY_ENV
from tests.cluster import AdminTokenCluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, start_nodes
from tests.refserver_helper import peer_certificate
from tests.test_level_based import password_file
from tlsroll import pki
from tlsroll.defaults import HTTPS_PORT
from tlsroll.fsutil import write_atomic

DELAY = {WRITE_DELAY_ENV: "0.05"}  # writes in flight when a server is frozen and restarted


@dataclass
class HttpsWriter:
    """Posts entries to one node over https until stopped; records what each POST got."""

    node: Node
    stop: threading.Event
    acked: list[tuple[str, str]] = field(default_factory=list)  # (id, marker) of every 201
    refused: int = 0  # 503 while frozen: not stored, the client tries again
    unknown: int = 0  # no answer (the server restarting)
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                marker = uuid.uuid4().hex
                try:
                    resp = self.node.post("https", {"marker": marker})
                except (OSError, http.client.HTTPException):
                    self.unknown += 1
                    time.sleep(0.02)
                    continue
                if resp.status == 201:
                    self.acked.append((resp.json()["id"], marker))
                elif resp.status == 503:
                    self.refused += 1
                    time.sleep(0.01)
                else:
                    self.errors.append(f"{resp.status} {resp.body[:200]!r}")
        except Exception as exc:  # reported by the test, never lost with the thread
            self.errors.append(f"writer died: {exc!r}")


def served(node: Node) -> x509.Certificate:
    """The certificate node's 8443 presents to Python's ssl, trusting only the cluster CA."""
    return x509.load_der_x509_certificate(
        peer_certificate(node.address, HTTPS_PORT, node.ca_context())
    )


class StagedSwap:
    """Swaps the next certificate staged on ``node`` (a new rollout's stage directory) for
    another CA-signed key and certificate with the same names, as soon as it is written."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.root = node.config_dir / "tlsroll-tls"
        self.before = {p.name for p in self.root.iterdir()} if self.root.exists() else set()
        self.stop = threading.Event()
        self.swapped: x509.Certificate | None = None
        self.thread = threading.Thread(target=self._watch, name="staged-swap")

    def _watch(self) -> None:
        ca = self.node.ca()
        while not self.stop.is_set() and self.swapped is None:
            for d in self.root.iterdir() if self.root.exists() else []:
                cert_file = d / "server.pem"
                if d.name in self.before or not cert_file.exists():
                    continue
                staged = pki.read_cert(cert_file)
                key = pki.generate_key()
                other = ca.issue(key.public_key(), pki.names_of(staged), server=True)
                write_atomic(d / "server.key", pki.key_to_pem(key), 0o600)
                write_atomic(cert_file, pki.cert_to_pem(other), 0o644)
                self.swapped = other
                return
            time.sleep(0.001)

    def __enter__(self) -> StagedSwap:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@contextlib.contextmanager
def writers(nodes: list[Node]) -> Iterator[list[HttpsWriter]]:
    stop = threading.Event()
    ws = [HttpsWriter(n, stop) for n in nodes]
    threads = [threading.Thread(target=w.run, name=f"writer-{w.node.name}") for w in ws]
    for t in threads:
        t.start()
    try:
        yield ws
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)


def serial(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:x}"


@pytest.mark.timeout(600)
def test_rotating_three_nodes_under_writes_one_fails_verification_and_keeps_its_cert(
    tmp_path: Path,
) -> None:
    addresses = [next_loopback() for _ in range(3)]
    cluster = AdminTokenCluster(tmp_path / "cluster", addresses[0], heartbeat_interval=1)
    nodes = [
        Node(cluster, f"node{i + 1}", a, tmp_path / f"n{i}", server_env=DELAY)
        for i, a in enumerate(addresses)
    ]
    node1, node2, node3 = nodes
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        start_nodes(nodes, DELAY)
        cluster.wait_for_nodes_online([n.name for n in nodes])
        pw = password_file(tmp_path, "pw", "rotation-password-for-the-practice")
        enable = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--password-file", str(pw)),
            *("--yes", "--wait"),
        )
        assert enable.returncode == 0, (enable.stdout, enable.stderr)
        before = {n.name: served(n) for n in nodes}

        with writers(nodes) as ws:
            wait_until(lambda: all(len(w.acked) >= 3 for w in ws), 30, "writes before")
            with StagedSwap(node2) as swap:
                rotate = cluster.cli(
                    *("rollout", "start", "--scope", "cluster", "--change", "rotate-cert"),
                    *("--failure-budget", "1", "--yes", "--wait"),
                )
            counts = [len(w.acked) for w in ws]
            wait_until(
                lambda: all(len(w.acked) >= c + 3 for w, c in zip(ws, counts, strict=True)),
                30,
                "writes after the rotation",
            )
        assert swap.swapped is not None, "node2's staged certificate was never seen"
        shown = json.loads(cluster.cli("schema", "show", "--json").stdout)
        r = shown["rollouts"][0]
        assert r["change"] == "rotate-cert", r
        states = {n["name"]: n for n in r["nodes"]}
        assert rotate.returncode != 0 or states["node2"]["state"] != "done", rotate.stdout

        # node1, node3: the new certificate, the one the leader signed and recorded.
        for node in (node1, node3):
            now = served(node)
            assert states[node.name]["state"] == "done", states[node.name]
            assert now != before[node.name]
            assert pki.fingerprint(now) == states[node.name]["cert_fingerprint"]
            assert pki.spki_pin(now) != pki.spki_pin(before[node.name])  # a new key
        # node2: the new fingerprint was not what https presented; back to its old one.
        assert states["node2"]["state"] == "rolled_back", states["node2"]
        assert "presents" in states["node2"]["reason"], states["node2"]["reason"]
        assert served(node2) == before["node2"]

        # Not one acknowledged write lost, none stored twice; the writers saw only 201, 503
        # (frozen) and the odd connection refused while a server restarted.
        for w in ws:
            assert not w.errors, w.errors
            assert w.acked
            missing = [m for _id, m in w.acked if w.node.stored_with(m) != 1]
            assert not missing, f"{w.node.name}: {len(missing)} acknowledged writes not stored once"
            assert w.node.get("https", f"entries/{w.acked[0][0]}").status == 200

        # The certificates node1 and node3 no longer serve are revoked as superseded; node2's
        # old one is still its live certificate and stays valid.
        revoked = {c["serial"]: c for c in shown.get("revoked_certificates", [])}
        for node in (node1, node3):
            entry = revoked.get(serial(before[node.name]))
            assert entry is not None, (node.name, sorted(revoked))
            assert entry["reason"] == "superseded" and entry["node"] == node.name
            assert entry["kind"] == "server"
            assert serial(served(node)) not in revoked
        assert serial(before["node2"]) not in revoked
        text = cluster.cli("schema", "show").stdout
        assert serial(before["node1"]) in text and "superseded" in text
        # The revocation list the agents get with their heartbeats lists them too.
        ca = pki.read_cert(cluster.ca_cert_path)
        crl_file = node3.agent.data_dir / "crl.pem" if node3.agent else Path()

        def crl() -> set[int]:
            if not crl_file.exists():
                return set()
            return set(pki.load_crl(crl_file.read_bytes(), ca)[1])

        wanted = {before["node1"].serial_number, before["node3"].serial_number}
        wait_until(lambda: wanted <= crl(), 20, "the superseded serials in node3's CRL")
        assert before["node2"].serial_number not in crl()
    finally:
        for node in nodes:
            node.close()
        cluster.close()


T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)  # the store tests' clock


def issue_server_cert(
    store: Store, serial: str, node: str, minutes: int, rollout_id: str = ""
) -> None:
    """Record server certificate ``serial`` of ``node`` (fingerprint ``fp<serial>``, valid 397
    days), issued ``minutes`` after ``T0`` (by rollout ``rollout_id``)."""
    at = T0 + dt.timedelta(minutes=minutes)
    cert = IssuedCert(serial, "server", node, node, f"fp{serial}", at, at + dt.timedelta(days=397))
    store.record_certificate(cert, actor="test", now=at, rollout_id=rollout_id)


def test_the_store_revokes_only_the_certificates_a_node_was_not_given_in_a_rollout(
    tmp_path: Path,
) -> None:
    """``revoke_undelivered_in`` (review s28 L1): the node's server certificates the rollout
    recorded other than the one it staged, reason "never delivered", once, not urgently; the
    staged one, one of an earlier rollout (live), one of a later rollout and another node's
    are not. (By the rollout that recorded them, not by the time: ``tests.test_cert_clock``.)"""
    store = Store(tmp_path / "leader.sqlite3")
    issue = functools.partial(issue_server_cert, store)

    issue("a0", "n1", -10, "r0")  # live before the rollout
    issue("a1", "n1", 1, "r1")  # its preflight's, never sent
    issue("a2", "n1", 2, "r1")  # its stage's (CreateCSR), staged
    issue("a3", "n1", 30, "r2")  # a later rollout's
    issue("b1", "n2", 1, "r1")
    now = T0 + dt.timedelta(minutes=40)
    with store.db.tx() as db:
        assert revoke_undelivered_in(db, "n1", "fpa2", rollout_id="r1", now=now) == ["a1"]
    with store.db.tx() as db:
        assert revoke_undelivered_in(db, "n1", "fpa2", rollout_id="r1", now=now) == []
    rows = {c.serial: c for c in store.list_certificates("server")}
    assert {s for s, c in rows.items() if c.revoked_at} == {"a1"}
    assert rows["a1"].revoke_reason == "never delivered"
    number, urgent, *_ = store.revocations()
    assert urgent == 0 and number == crl_time(now)  # (``_bump_crl``: at least the time in ms)
    store.close()


def test_the_store_revokes_only_what_the_live_certificate_superseded(tmp_path: Path) -> None:
    """``Store.revoke_superseded``: the node's server certificates issued before the live one
    (a rotate's, or a later enable-tls's after a way back to http) are revoked once, with
    reason "superseded"; a newer one (another rollout's), another node's, and the live one are
    not; a live certificate not on record (brought by the admin) supersedes what was issued
    before its rollout began."""
    store = Store(tmp_path / "leader.sqlite3")
    issue = functools.partial(issue_server_cert, store)

    issue("a1", "n1", 0)  # the first enable-tls
    issue("a2", "n1", 10)  # a rotate that was rolled back (never live)
    issue("a3", "n1", 20)  # a later enable-tls: live now
    issue("a4", "n1", 30)  # staged by a newer rollout, not live yet
    issue("b1", "n2", 0)
    later = T0 + dt.timedelta(hours=1)
    assert store.revoke_superseded("n1", "fpa3", before=T0, now=later) == ["a1", "a2"]
    assert store.revoke_superseded("n1", "fpa3", before=T0, now=later) == []  # once
    rows = {c.serial: c for c in store.list_certificates("server")}
    assert {s for s, c in rows.items() if c.revoked_at} == {"a1", "a2"}
    assert rows["a1"].revoke_reason == rows["a2"].revoke_reason == "superseded"
    assert store.revoked()[1] and {s for s, _ in store.revoked()[1]} == {"a1", "a2"}
    # A certificate the admin brought (not on record): what was issued before its rollout.
    assert store.revoke_superseded(
        "n1", "byo", before=T0 + dt.timedelta(minutes=25), now=later
    ) == ["a3"]
    assert store.revoke_superseded("n2", "fpb1", before=T0, now=later) == []
    # The list the agents get holds unexpired certificates only: it no longer grows with
    # every rollout for good. Superseded ones are not urgent; one the admin revokes is.
    number, urgent, *_ = store.revocations()
    assert urgent == 0 and number > 0
    # a1 (issued at 0) expired a day and five minutes ago (a day's margin for clocks behind).
    expired = T0 + dt.timedelta(days=398, minutes=5)
    assert {s for s, _ in store.revoked(expired)[1]} == {"a2", "a3"}
    assert {s for s, _ in store.revoked()[1]} == {"a1", "a2", "a3"}
    store.revoke("b1", reason="", now=later, actor="test", unknown=True)
    assert store.revocations().urgent == store.revocations().number == number + 1
    store.close()


def test_revocation_lists_of_a_restored_or_new_store_are_numbered_above_the_lost_ones(
    tmp_path: Path,
) -> None:
    """Audit s33 H1: agents keep a list only if its number is not below the one they hold,
    and a store restored from a backup (or begun again, ``--reinitialise``) counted on from
    its own number: its lists were ignored until the count passed the agents'. A list's
    number is now at least the time it was made in ms, so a revocation after the restore is
    numbered above every list of the lost store (while the clock does not go back)."""
    lost = Store(tmp_path / "leader.sqlite3")
    for minutes, serial in enumerate(("a1", "a2", "a3")):
        issue_server_cert(lost, serial, "n1", minutes)
    lost.revoke("a1", reason="", now=T0, actor="test")
    lost.close()
    backup = tmp_path / "backup.sqlite3"
    backup.write_bytes((tmp_path / "leader.sqlite3").read_bytes())
    lost = Store(tmp_path / "leader.sqlite3")
    for minutes, serial in ((1, "a2"), (2, "a3")):  # revocations after the backup
        lost.revoke(serial, reason="", now=T0 + dt.timedelta(minutes=minutes), actor="test")
    held = lost.revocations().number  # the agents' list
    lost.close()
    later = T0 + dt.timedelta(days=3)
    restored, fresh = Store(backup), Store(tmp_path / "new.sqlite3")
    assert restored.revocations().number < held and fresh.revocations().number == 0
    issue_server_cert(fresh, "b1", "n1", 0)
    for store in (restored, fresh):
        store.revoke("b1" if store is fresh else "a2", reason="", now=later, actor="test")
        after = store.revocations()
        assert after.number > held and after.urgent == after.number
        store.close()
    # The same clock twice, and a number above it (an agent's floor): still one more each time.
    store = Store(tmp_path / "floor.sqlite3")
    assert store.raise_crl_floor(crl_time(later) + 10, now=later, node="n1") == crl_time(later) + 1
    assert store.raise_crl_floor(5, now=later, node="n1") is None
    issue_server_cert(store, "c1", "n1", 0)
    store.revoke("c1", reason="", now=later, actor="test")
    assert store.revocations().number == crl_time(later) + 2
    store.close()


def test_an_agent_s_floor_never_lowers_the_list_number_a_clock_once_ahead_made(
    tmp_path: Path,
) -> None:
    """Review 2 of session 33, L1: a leader clock once ahead numbered a list from its time;
    back to the right time, an agent saying it holds a higher number set the store's number to
    the clock's, below the one the agents hold: they refused every list until the clock
    caught up. The floor only ever raises it."""
    store = Store(tmp_path / "leader.sqlite3")
    issue_server_cert(store, "a1", "n1", 0)
    ahead = T0 + dt.timedelta(days=3)
    store.revoke("a1", reason="", now=ahead, actor="test")
    number = store.revocations().number
    assert number == crl_time(ahead)
    raised = store.raise_crl_floor(number + 100, now=T0, node="n1")
    assert raised is not None and raised > number
    assert store.revocations().number == raised
    store.close()
