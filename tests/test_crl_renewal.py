"""The revocation list gets a new number a day after its number was issued (session 33).

An agent holds a list by number, and a list is valid for ``pki.CRL_VALIDITY`` (7 days) from
its number's issue: the leader's daily signing of the same number reached no agent, and with
no revocation for a week every node's ``DATA/crl.pem`` was past its nextUpdate. The list the
agents get over a renewal stream is ``tests/test_heartbeat_stream.py``'s; here the store's
and the snapshot's side.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
from cryptography import x509

from leader.service import CRL_RENEW_AFTER
from leader.store import crl_time
from tests.leader_rig import leader_with_a_node
from tlsroll import pki
from tlsroll.sqlite import to_text
from tlsroll.v1 import leader_pb2, leader_pb2_grpc

DAY = dt.timedelta(days=1)


def _list(pem: bytes) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(pem)


async def test_a_list_s_number_is_renewed_a_day_after_its_issue_and_not_before(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A revocation records when its number was issued; the list keeps that number (and its
    thisUpdate, nextUpdate) for a day, then gets a new one, not urgent; a second renewal of
    the same issue (two readers at once) does nothing. Nothing revoked ever (number 0): no
    list, and nothing written."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    store, clock, svc = rig.store, rig.clock, rig.service
    try:
        transactions = store.db.transactions
        snap = svc._read_snapshot()
        assert (snap.crl_number, store.db.transactions) == (0, transactions)  # nothing written
        t0 = clock[0]
        assert store.revoke("5eec", reason="", now=t0, actor="test", unknown=True) == ["5eec"]
        revs = store.revocations(t0)
        n1 = crl_time(t0)  # a number is at least the time in ms (audit s33 H1)
        assert (revs.number, revs.urgent, revs.issued) == (n1, n1, t0.replace(microsecond=0))
        clock[0] = t0 + CRL_RENEW_AFTER - dt.timedelta(seconds=1)
        snap = svc._read_snapshot()
        assert snap.crl_number == n1
        first = _list(snap.crl_pem)
        assert revs.issued is not None
        assert first.next_update_utc == revs.issued + pki.CRL_VALIDITY  # its number's
        clock[0] = t0 + CRL_RENEW_AFTER + dt.timedelta(seconds=1)
        with structlog.testing.capture_logs() as events:
            snap = svc._read_snapshot()
        n2 = crl_time(clock[0])
        assert (snap.crl_number, snap.crl_urgent) == (n2, n1)  # not urgent: the next round
        assert [e["event"] for e in events] == ["crl.renewed"]
        renewed = _list(snap.crl_pem)
        assert renewed.next_update_utc == clock[0].replace(microsecond=0) + pki.CRL_VALIDITY
        assert {r.serial_number for r in renewed} == {0x5EEC}
        assert snap.generation == store.db.generation  # read after the renewal's write
        assert not store.renew_crl(clock[0], clock[0] - DAY)  # renewed meanwhile: nothing
        assert store.revocations(clock[0]).number == n2
        clock[0] += CRL_RENEW_AFTER  # exactly a day after its issue: renewed (and only once)
        assert svc._read_snapshot().crl_number == crl_time(clock[0])
    finally:
        await rig.close()


async def test_a_store_that_never_recorded_its_list_s_issue_renews_it_at_once(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A store of an earlier release has a number and no issue time: the agents' lists may
    be long past their nextUpdate (they never got one signed again), so the first read
    gives the list a new number."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    store, clock, svc = rig.store, rig.clock, rig.service
    try:
        assert store.revoke("5eec", reason="", now=clock[0], actor="test", unknown=True) == ["5eec"]
        with store.db.tx() as db:
            db.execute("DELETE FROM meta WHERE key = 'crl_issued'")
        assert store.revocations(clock[0]).issued is None
        held = store.revocations(clock[0]).number
        snap = svc._read_snapshot()
        assert snap.crl_number == held + 1  # the same ms: one more
        assert store.revocations(clock[0]).issued == clock[0].replace(microsecond=0)
    finally:
        await rig.close()


async def test_a_renewal_that_cannot_be_written_leaves_the_list_as_it_is_and_is_logged(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal is a write on the heartbeats' read path: a full disk must not fail every
    heartbeat. The list as it is goes out, the failure is logged, the next read tries again."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    store, clock, svc = rig.store, rig.clock, rig.service
    try:
        assert store.revoke("5eec", reason="", now=clock[0], actor="test", unknown=True) == ["5eec"]
        clock[0] += 2 * DAY

        def full(*args: Any) -> bool:
            raise OSError("database or disk is full")

        monkeypatch.setattr(store, "renew_crl", full)
        with structlog.testing.capture_logs() as events:
            snap = svc._read_snapshot()
        assert snap.crl_number == crl_time(clock[0] - 2 * DAY) and snap.crl_pem
        (failed,) = [e for e in events if e["event"] == "crl.renew_failed"]
        assert failed["error"] == "OSError: database or disk is full"
        monkeypatch.undo()
        assert svc._read_snapshot().crl_number == crl_time(clock[0])
    finally:
        await rig.close()


async def test_a_stored_serial_no_list_can_hold_is_left_out_and_heartbeats_go_on(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Audit s34 H1: a store that took serial 0 or one of 2^159 and above (``ca revoke``
    refuses them now) made every list fail to sign, and with it every heartbeat (INTERNAL,
    every node offline, for good). Such a serial is left out of the list, logged once, and the
    others are listed."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    store, clock = rig.store, rig.clock
    await rig.server.start()
    try:
        assert store.revoke("5eec", reason="", now=clock[0], actor="test", unknown=True)
        with store.db.tx() as db:  # as a store of an earlier release could hold them
            for serial in ("0", "8" + "0" * 39):
                db.execute(
                    "INSERT INTO certificates (serial, kind, subject, node, fingerprint,"
                    " issued_at, not_after, revoked_at) VALUES (?, 'other', '', '', '', ?, ?, ?)",
                    (serial, to_text(clock[0]), to_text(clock[0] + 400 * DAY), to_text(clock[0])),
                )
        clock[0] += dt.timedelta(seconds=1)
        assert store.revoke("5eed", reason="", now=clock[0], actor="test", unknown=True)
        with structlog.testing.capture_logs() as events:
            async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
                stub = leader_pb2_grpc.LeaderStub(channel)
                for _ in range(2):
                    reply = await stub.Heartbeat(leader_pb2.HeartbeatRequest(), timeout=10)
        assert {r.serial_number for r in _list(reply.crl_pem)} == {0x5EEC, 0x5EED}
        skipped = [e for e in events if e["event"] == "crl.serial_skipped"]
        assert sorted(e["serial"] for e in skipped) == ["0", "8" + "0" * 39]  # once each
    finally:
        await rig.close()
