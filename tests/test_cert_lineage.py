"""What a revocation takes with it (``leader.store.lineage_in``), on the real SQLite file.

Review s64 b4 (H): a copy of an agent key whose certificate was revoked after a backup renewed
at the restored leader before any agent's list was learned; the learning revoked the listed
serial (and the node's pair), never the certificate renewed from it, so the copy was the node
for good. Each certificate is now recorded with the one it was issued on the strength of
(``certificates.issued_from``, schema 17: a renewal's presented certificate, the node
certificate a workstation's was asked with), and a revocation that ends a key's trust (`ca
revoke`, a learned list, `nodes remove`) takes every certificate issued from it, down a chain
of renewals; one that records a replacement (a workstation "superseded" by its PC's
re-enrolment) takes nothing, and a renewal revokes nothing. The daemon's side, a restored
leader learning a list after a copy renewed: ``tests/test_backup.py``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from leader.store import IssuedCert, NodeCert, Store

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
SECRET = "s" * 26
_serials = itertools.count(0x1000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "leader.sqlite3")
    yield s
    s.close()


def issuer(key_pin: str) -> Callable[..., NodeCert]:
    def issue(_apart: bool = False) -> NodeCert:
        n = next(_serials)
        return NodeCert(
            key_pin=key_pin,
            fingerprint=f"fp{n:x}",
            serial=f"{n:x}",
            not_after=NOW + dt.timedelta(1),
        )

    return issue


def enrol(store: Store, name: str, address: str) -> NodeCert:
    store.add_token(
        f"t-{name}",
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name=name,
        addresses=(address,),
    )
    return store.enrol(
        token_id=f"t-{name}",
        secret=SECRET,
        name=name,
        addresses=(address,),
        dns_names=(),
        agent_version="v",
        agent_port=9444,
        key_pin=f"pin-{name}-0",
        issue=issuer(f"pin-{name}-0"),
        now=NOW,
    )


def renew(store: Store, name: str, presented: NodeCert, *, beat: bool = True) -> NodeCert:
    """``name``'s agent renews with ``presented``, then (``beat``) heartbeats with the new
    one (the link to the one before is cleared then, as it is at the leader)."""
    pin = f"pin-{name}-{next(_serials)}"
    new = store.renew_node_certificate(
        name,
        presented=presented.fingerprint,
        presented_serial=presented.serial,
        key_pin=pin,
        issue=issuer(pin),
        now=NOW,
    )
    if beat:
        store.heartbeat(name, "v", now=NOW, cert_fingerprint=new.fingerprint)
    return new


def workstation(
    store: Store, node: str, presented: NodeCert, cn: str, previous: IssuedCert | None = None
) -> IssuedCert:
    """A workstation certificate ``node``'s bootstrap service asks for with ``presented``."""

    def issue() -> IssuedCert:
        n = next(_serials)
        return IssuedCert(
            serial=f"{n:x}",
            kind="workstation",
            subject=cn,
            node=node,
            fingerprint=f"ws-fp{n:x}",
            issued_at=NOW,
            not_after=NOW + dt.timedelta(days=365),
        )

    return store.issue_workstation(
        node,
        cn,
        issue,
        now=NOW,
        presented=presented.fingerprint,
        presented_serial=presented.serial,
        previous=None if previous is None else previous.fingerprint,
    )


def revoked(store: Store) -> dict[str, str]:
    """Serial -> reason of every revoked certificate."""
    return {c.serial: c.revoke_reason for c in store.list_certificates() if c.revoked_at}


def test_a_revoked_certificate_takes_a_chain_of_two_renewals_and_their_workstations(
    store: Store,
) -> None:
    """node1's enrolment certificate is renewed twice (c1 -> c2 -> c3, each used); workstation
    certificates are asked for with c1 and with c2. `ca revoke` of c1 (a key found copied,
    long after it was superseded) revokes c2 and c3 (renewed from it, in turn: c3 is the one
    on record, so the node is cut off) and both workstations'; each one's reason names the one
    it was issued from. Before, only c1 was revoked: a copy of c1's key that renewed itself
    was the node for good. node2, of another lineage, keeps its certificate."""
    c1 = enrol(store, "node1", "127.0.0.9")
    other = enrol(store, "node2", "127.0.0.10")
    ws1 = workstation(store, "node1", c1, "ws-empfang")
    c2 = renew(store, "node1", c1)
    ws2 = workstation(store, "node1", c2, "ws-labor")
    c3 = renew(store, "node1", c2)
    assert revoked(store) == {}

    taken = store.revoke(c1.serial, reason="key copied", now=NOW, actor="admin")

    assert set(taken) == {c1.serial, c2.serial, c3.serial, ws1.serial, ws2.serial}
    assert revoked(store) == {
        c1.serial: "key copied",
        c2.serial: f"issued from {c1.serial}: key copied",
        c3.serial: f"issued from {c2.serial}: key copied",
        ws1.serial: f"issued from {c1.serial}: key copied",
        ws2.serial: f"issued from {c2.serial}: key copied",
    }
    assert store.cut_off_nodes() == {"node1"}
    assert not store.is_revoked(other.serial)


def test_a_chain_revoked_halfway_by_an_older_leader_is_followed_through(
    store: Store,
) -> None:
    """A certificate in the chain revoked already (by a leader without this rule, which
    revoked it alone) is passed through, not revoked again: revoking c1 takes c3, issued from
    c2, whose own revocation stays as it was."""
    c1 = enrol(store, "node1", "127.0.0.9")
    c2 = renew(store, "node1", c1)
    c3 = renew(store, "node1", c2)
    with store.db.tx() as db:  # as an older leader's `ca revoke` of c2 left it
        db.execute(
            "UPDATE certificates SET revoked_at = ?, revoke_reason = 'older' WHERE serial = ?",
            (NOW.isoformat(), c2.serial),
        )
    assert store.revoke(c1.serial, reason="", now=NOW, actor="admin") == [c1.serial, c3.serial]
    assert revoked(store) == {
        c1.serial: "revoked by the admin",
        c2.serial: "older",
        c3.serial: f"issued from {c2.serial}: revoked by the admin",
    }


def test_a_learned_list_takes_what_a_copy_renewed_from_a_serial_on_it(store: Store) -> None:
    """The restored leader's store (the backup's): node2's certificate c1 was revoked after
    the backup, which the store does not know. A copy of c1's key renews (c1 -> c2, and c2 ->
    c3: two renewals, each used, so no link to the one before is left) and asks for a
    workstation certificate with c2, before any agent's list is learned. Learning a list
    that holds c1 revokes c1, c2, c3 and the workstation's, audited with what each was issued
    from; the node is cut off. Before, c3 stayed valid: the list names only c1, and c1 was no
    longer the node's certificate or the one before it."""
    enrol(store, "node1", "127.0.0.9")
    c1 = enrol(store, "node2", "127.0.0.10")
    c2 = renew(store, "node2", c1)
    ws = workstation(store, "node2", c2, "ws-dieb")
    c3 = renew(store, "node2", c2)

    reason = "revoked before the restore (on node node1's list 7)"
    fresh = store.learn_revoked([c1.serial], number=7, node="node1", now=NOW, reason=reason)

    assert set(fresh) == {c1.serial, c2.serial, c3.serial, ws.serial}
    assert revoked(store)[c3.serial] == f"issued from {c2.serial}: {reason}"
    assert store.cut_off_nodes() == {"node2"}
    [learned] = [e for e in audit(store) if e["kind"] == "crl.learned"]
    assert learned["detail"]["issued_from"] == {
        c2.serial: c1.serial,
        ws.serial: c2.serial,
        c3.serial: c2.serial,
    }
    # The same list again (another agent holds it): nothing more.
    assert store.learn_revoked([c1.serial], number=7, node="node2", now=NOW, reason=reason) == []


def test_a_replacement_s_revocation_and_a_renewal_take_nothing(store: Store) -> None:
    """What records a replacement takes nothing with it. node1 renews (c1 -> c2): c1 is not
    revoked, and a list that does not hold it leaves c2 alone. A PC re-enrols as itself
    (ws1 -> ws2, proven by ws1's key): ws1 is revoked "superseded" and ws2 is not recorded as
    issued from it (it is issued from c2, on whose strength node1 asked): the supersede does
    not take ws2, nor does learning a list that holds ws1. In the same list, node2's
    certificate and the one a copy renewed from it go."""
    c1 = enrol(store, "node1", "127.0.0.9")
    stolen = enrol(store, "node2", "127.0.0.10")
    c2 = renew(store, "node1", c1)
    ws1 = workstation(store, "node1", c2, "ws-empfang")
    ws2 = workstation(store, "node1", c2, "ws-empfang", previous=ws1)
    assert revoked(store) == {ws1.serial: "superseded"}
    copy = renew(store, "node2", stolen)

    reason = "revoked before the restore (on node node1's list 9)"
    fresh = store.learn_revoked(
        [ws1.serial, stolen.serial], number=9, node="node1", now=NOW, reason=reason
    )

    assert set(fresh) == {stolen.serial, copy.serial}
    assert not any(store.is_revoked(c.serial) for c in (c1, c2, ws2))
    assert store.cut_off_nodes() == {"node2"}


def test_a_certificate_of_the_same_key_goes_with_the_one_before(store: Store) -> None:
    """A node enrolled again with its key on record (its certificate ended while it was off),
    and a replay of that enrolment (its answer lost): both new certificates are of the key of
    the first, so `ca revoke` of the first (the key found copied) takes them too, and the
    node is cut off. Before, the first alone was revoked: the key went on as the node."""
    c1 = enrol(store, "node1", "127.0.0.9")
    store.heartbeat("node1", "v", now=NOW, cert_fingerprint=c1.fingerprint)
    store.add_token(
        "t-again",
        SECRET,
        ttl=dt.timedelta(hours=1),
        uses=1,
        description="",
        now=NOW,
        actor="admin",
        node_name="node1",
        addresses=("127.0.0.9",),
    )
    again: dict[str, Any] = {
        "token_id": "t-again",
        "secret": SECRET,
        "name": "node1",
        "addresses": ("127.0.0.9",),
        "dns_names": (),
        "agent_version": "v",
        "agent_port": 9444,
        "key_pin": "pin-node1-0",
        "issue": issuer("pin-node1-0"),
    }
    later = NOW + dt.timedelta(minutes=5)
    c2 = store.enrol(**again, now=later)
    c3 = store.enrol(**again, now=later + dt.timedelta(minutes=1))  # the replay
    assert [e["kind"] for e in audit(store)][-2:] == ["node.enrolled", "node.enrolment_replayed"]
    assert set(store.revoke(c1.serial, reason="", now=later, actor="admin")) == {
        c1.serial,
        c2.serial,
        c3.serial,
    }
    assert store.cut_off_nodes() == {"node1"}


def test_removing_a_node_revokes_what_its_certificates_were_issued_for(store: Store) -> None:
    """`nodes remove` revokes every certificate of the node, as before (what was issued from
    them is the node's too), and nothing of another node."""
    c1 = enrol(store, "node1", "127.0.0.9")
    other = enrol(store, "node2", "127.0.0.10")
    ws = workstation(store, "node1", c1, "ws-empfang")
    c2 = renew(store, "node1", c1)
    _, serials = store.remove_node("node1", now=NOW, actor="admin")
    assert set(serials) == {c1.serial, c2.serial, ws.serial}
    assert set(revoked(store)) == {c1.serial, c2.serial, ws.serial}
    assert not store.is_revoked(other.serial)


def audit(store: Store) -> list[dict[str, Any]]:
    with store.db.read() as db:
        rows = db.execute("SELECT kind, subject, detail FROM audit ORDER BY seq").fetchall()
    return [
        {"kind": r["kind"], "subject": r["subject"], "detail": json.loads(r["detail"])}
        for r in rows
    ]


def test_a_learned_list_skips_the_ca_s_own_serials_and_takes_the_leader_s(store: Store) -> None:
    """Session 66: ``learn_revoked`` recorded the cluster CA's own serials as "other"
    certificates revoked (a release before s63 put them in its lists): no list can revoke its
    issuer, and ``revoke`` refuses them (``CAsOwn``). Skipped now, the one in use and one a
    `ca renew` replaced alike (``ca_serials``: ``LeaderState.ca_serials``); a serial of the
    leader's own certificate is learned as any other (the CA revoked it: the leader issues
    itself a new one, ``leader.own_tls``), and so is the rest of the list."""
    from leader.store import _record_cert

    c1 = enrol(store, "node1", "127.0.0.9")
    with store.db.tx() as db:
        _record_cert(db, "1ead", "leader", "leader", "", "fp-leader", NOW, NOW + dt.timedelta(9))
    cas = ["0ca1", "ca0"]  # (as the CA's serial may be written: leading zeros are not a serial's)
    reason = "revoked before the restore (on node node1's list 7)"
    fresh = store.learn_revoked(
        ["ca1", "ca0", "1ead", c1.serial], number=7, node="node1", now=NOW, reason=reason,
        ca_serials=cas,
    )  # fmt: skip
    assert set(fresh) == {"1ead", c1.serial}
    assert set(revoked(store)) == {"1ead", c1.serial}
    with store.db.read() as db:
        on_record = {r["serial"] for r in db.execute("SELECT serial FROM certificates")}
    assert not on_record & {"ca1", "ca0"}, on_record
    # A list naming only the CA's: nothing written.
    assert store.learn_revoked(["ca1"], number=8, node="node1", now=NOW, reason=reason,
                               ca_serials=cas) == []  # fmt: skip
