"""The cluster CA's end (session 35's clock audit, G): no leaf outlives the CA, and a
certificate that already ends with the CA is not issued again for being near its end.

Leaves were issued for their full life whatever the CA had left: from the CA's ninth year on,
every certificate showed a residual time up to 297 days past the CA's end, and all of them
would stop together with it. Cut to the CA's end, the "renew within 30 days" checks (the
leader's own certificate, the viewer's, the automatic rotation of the nodes' https
certificates) would then issue a new one at every start and every check, each ending with the
CA again: they now leave a certificate that ends with the CA alone, and the CA's own entry in
`tlsroll certs check-expiration` (warned a year ahead) says what to do.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from leader import ca_renewal, own_tls, runtime
from leader.auto_rotate import AutoRotator
from leader.expiry import ENDS_WITH_CA, ExpiryWatch
from leader.layout import (
    OWN_RENEW_CAP,
    REISSUED_FOR_KEY,
    Layout,
    Reissued,
    ensure_leader_identity,
    reissue_problem,
    write_leader_cert,
)
from leader.maintenance import parse_window
from leader.own_tls import OwnTls
from leader.store import IssuedCert
from leader.viewer import certificate
from tests.test_auto_rotate import FakeCommands, FakeSchema, served_store
from tests.test_viewer_parts import NOW
from tlsroll import pki, spiffe
from tlsroll.errors import ConfigError, PKIError, PKIReason

DAY = dt.timedelta(days=1)
NAMES = pki.Names.of("node1", ["10.0.0.5"])


def ending_in(days: float, now: dt.datetime | None = None) -> pki.CertificateAuthority:
    """A CA made so that it ends ``days`` after ``now`` (its tenth year)."""
    now = now or pki.utcnow()
    return pki.CertificateAuthority.create(
        now=now + dt.timedelta(days=days) - dt.timedelta(days=pki.CA_VALIDITY_DAYS)
    )


# --- the CA ----------------------------------------------------------------------------------


def test_no_leaf_outlives_its_ca() -> None:
    now = pki.utcnow()
    ca = ending_in(100, now)
    with structlog.testing.capture_logs() as logs:
        leaf = ca.issue(pki.generate_key().public_key(), NAMES, now=now)
        client = ca.issue(pki.generate_key().public_key(), NAMES, client=True, now=now)
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc  # not 297 days past it
    assert client.not_valid_after_utc == ca.cert.not_valid_after_utc
    assert pki.ends_with_ca(leaf, ca.cert)
    assert [(e["event"], e["log_level"], e["subject"]) for e in logs] == [
        ("certificate.cut_to_ca_end", "warning", "node1")
    ] * 2
    assert logs[0]["residual_days"] == 100.0 and logs[0]["asked_days"] == 397.0

    # A leaf that fits in the CA's life is issued as asked, without a word.
    with structlog.testing.capture_logs() as logs:
        short = ca.issue(pki.generate_key().public_key(), NAMES, now=now, validity_days=30)
    assert short.not_valid_after_utc - now < 30 * DAY + dt.timedelta(seconds=1)
    assert not pki.ends_with_ca(short, ca.cert) and logs == []


def test_a_ca_that_has_ended_issues_nothing() -> None:
    ca = ending_in(-1)
    with pytest.raises(PKIError) as ended:
        ca.issue(pki.generate_key().public_key(), NAMES)
    assert ended.value.reason is PKIReason.EXPIRED
    assert "the CA ended" in str(ended.value) and "\n" not in str(ended.value)


# --- what renews by itself -------------------------------------------------------------------


def test_the_leaders_certificate_is_not_issued_again_once_it_ends_with_the_ca(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "tls").mkdir()
    ca = ending_in(10)  # under LEADER_RENEW_BEFORE (30 days) left
    key = pki.generate_key()
    pki.write_key(layout.tls_key, key)
    names = pki.Names.of("leader", ["127.0.0.9"])
    write_leader_cert(layout, ca, key, names)
    cert = pki.read_cert(layout.tls_cert)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc
    for _ in range(3):  # each start and each check of the expiry watch
        assert not ensure_leader_identity(layout, ca, names)
    assert pki.read_cert(layout.tls_cert) == cert

    # One that ends before the CA does is still issued again when near its end, to the CA's.
    near = ca.issue(key.public_key(), names, lifetime=dt.timedelta(days=5))
    layout.tls_cert.write_bytes(pki.cert_to_pem(near) + ca.cert_pem)
    assert ensure_leader_identity(layout, ca, names)
    assert pki.read_cert(layout.tls_cert).not_valid_after_utc == ca.cert.not_valid_after_utc
    assert not ensure_leader_identity(layout, ca, names)


def test_the_viewers_certificate_is_not_issued_again_once_it_ends_with_the_ca(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "tls").mkdir()
    ca = ending_in(10)
    now = pki.utcnow()
    first = certificate.ensure(layout, ca, "127.0.0.9", (), now)
    assert first.not_valid_after_utc == ca.cert.not_valid_after_utc
    for hours in (1, 24, 24 * 9):
        later = now + dt.timedelta(hours=hours)
        assert certificate.ensure(layout, ca, "127.0.0.9", (), later) == first


@pytest.mark.parametrize("warning_days", [1, 30, 60, 200, 365])
def test_the_leader_issues_its_own_certificates_before_the_watch_warns_of_them(
    tmp_path: Path, warning_days: int
) -> None:
    """Review s46rt1 L2: the leader's and the viewer's certificates were issued again within a
    fixed 30 days of their end, and warned about ``expiry_warning_days`` before it: with 60,
    a month a year of warnings with nothing to do. Day by day through their life, whatever
    the setting: the watch warns of one only once it has been due (issued again at the
    checks before) for a day at least, and neither is due when new (not issued at every
    start, even with 365 days)."""
    store, schema = served_store(tmp_path)
    layout = Layout(tmp_path)
    (tmp_path / "tls").mkdir()
    ca = ending_in(3000)
    warning = dt.timedelta(days=warning_days)
    names = pki.Names.of("leader", ["127.0.0.9"])
    key = pki.generate_key()
    pki.write_key(layout.tls_key, key)
    write_leader_cert(layout, ca, key, names)
    t0 = pki.utcnow()
    certificate.ensure(layout, ca, "127.0.0.9", (), t0, warning)
    files = [layout.tls_cert, layout.viewer_cert, layout.viewer_key]
    kept = [f.read_bytes() for f in files]
    first = {
        "leader": pki.read_cert(layout.tls_cert),
        "viewer": pki.read_cert(layout.viewer_cert),
    }

    def due(kind: str, now: dt.datetime) -> bool:
        """Whether the leader would issue it again at a check at ``now`` (files put back)."""
        try:
            if kind == "leader":
                return ensure_leader_identity(layout, ca, names, now, warning) is not None
            return certificate.ensure(layout, ca, "127.0.0.9", (), now, warning) != first[kind]
        finally:
            for f, data in zip(files, kept, strict=True):
                f.write_bytes(data)

    watch = ExpiryWatch(
        store, schema, ca.cert, lambda: list(first.items()), lambda: t0, warning_days=warning_days
    )
    assert not due("leader", t0) and not due("viewer", t0)
    warned_from: dict[str, int] = {}  # the first day each is warned of (due from then on)
    for day in range(398):
        now = t0 + dt.timedelta(days=day)
        for entry in watch.check():
            if entry.kind in first and entry.kind not in warned_from and entry.warning(now):
                warned_from[entry.kind] = day
                assert due(entry.kind, now - dt.timedelta(days=1)), (entry.kind, day)
        if len(warned_from) == len(first):
            break
    # Warned of at the latest with ``warning_days`` left (up to half their life).
    assert all(397 - d >= min(warning_days, 397 // 2 - 2) for d in warned_from.values())
    assert set(warned_from) == {"leader", "viewer"}
    assert dt.timedelta(days=pki.LEAF_VALIDITY_DAYS / 2) == OWN_RENEW_CAP  # (layout's own 397)
    store.close()


def test_server_certificates_that_end_with_the_ca_are_not_rotated_at_every_window(
    tmp_path: Path,
) -> None:
    """The nodes' https certificates of the last rotation end with the CA (20 days on): they
    are shown within their horizon, with the CA as the reason, and ``auto_rotate`` leaves them
    alone, where it restarted the practice's servers in every window until the CA ended."""
    store, schema = served_store(tmp_path)  # a and b serve certificates to NOW + 20 days

    def rotated(ca: pki.CertificateAuthority) -> tuple[str, list[str]]:
        watch = ExpiryWatch(store, schema, ca.cert, list, lambda: NOW, warning_days=30)
        commands = FakeCommands(FakeSchema())
        rotator = AutoRotator(
            watch,
            schema,
            commands,  # type: ignore[arg-type]
            enabled=True,
            window=parse_window("Sat 02:00-05:00"),
            local_clock=lambda: dt.datetime(2026, 12, 5, 3, 0),  # inside
        )
        decision = asyncio.run(rotator.check())
        return decision.verdict.value, [e.advice for e in watch.warnings() if e.kind == "server"]

    assert rotated(ending_in(20, NOW)) == ("nothing-due", [ENDS_WITH_CA] * 2)
    # The control: a CA with years left, and the same certificates are rotated.
    verdict, advice = rotated(ending_in(2000, NOW))
    assert verdict == "started" and all("rotate-cert" in a for a in advice)

    near = ending_in(20, NOW)
    entries = ExpiryWatch(store, schema, near.cert, list, lambda: NOW).check()
    (ca_entry,) = [e for e in entries if e.kind == "ca"]
    assert ca_entry.warning(NOW) and not ca_entry.ends_with_ca  # the CA itself is shown, warned
    assert "docs/ca-renewal.md" in ca_entry.advice and "SPEC" not in ca_entry.advice
    store.close()


def test_a_workstation_certificate_that_ended_stays_listed_as_expired(tmp_path: Path) -> None:
    """Review s46rt1 M2: a workstation's certificate was warned about for 30 days, then left
    `certs check-expiration` (and the leader's log) the moment it ended: a monitoring check
    turned green just as the PC lost its certificate. Now the newest of its name is listed,
    expired, and logged ``certificate.expired``, for the warning horizon after its end; one
    that a newer certificate of its name superseded, or a revoked one, is not."""
    store, schema = served_store(tmp_path)
    ca = pki.CertificateAuthority.create()
    end = NOW + dt.timedelta(days=100)
    store.record_certificate(
        IssuedCert("c1", "workstation", "ws-pc1", "a", "sha256:c1", NOW, end), actor="t", now=NOW
    )
    store.record_certificate(  # ws-pc2: enrolled again before the first ended
        IssuedCert("d1", "workstation", "ws-pc2", "a", "sha256:d1", NOW, end), actor="t", now=NOW
    )
    later = end + dt.timedelta(days=200)
    store.record_certificate(
        IssuedCert("d2", "workstation", "ws-pc2", "a", "sha256:d2", NOW, later), actor="t", now=NOW
    )

    def workstations(now: dt.datetime) -> tuple[list[tuple[str, str, bool]], list[str]]:
        watch = ExpiryWatch(store, schema, ca.cert, list, lambda: now, warning_days=30)
        with structlog.testing.capture_logs() as logs:
            watch.log_warnings()
        listed = [(e.subject, e.serial, e.warning(now)) for e in watch.check()]
        said = [
            f"{line['event']} {line['subject']}"
            for line in logs
            if line.get("kind") == "workstation"
        ]
        return [w for w in listed if w[0].startswith("ws-")], said

    assert workstations(end - dt.timedelta(days=10)) == (
        [("ws-pc1", "c1", True), ("ws-pc2", "d1", True), ("ws-pc2", "d2", False)],
        ["certificate.expiring ws-pc1", "certificate.expiring ws-pc2"],
    )
    # Ended a minute ago: ws-pc1's is listed and logged expired; ws-pc2's first is superseded.
    assert workstations(end + dt.timedelta(minutes=1)) == (
        [("ws-pc1", "c1", True), ("ws-pc2", "d2", False)],
        ["certificate.expired ws-pc1"],
    )
    # Past the horizon after its end, it goes (the PC enrolled again, or is gone).
    assert workstations(end + dt.timedelta(days=31)) == ([("ws-pc2", "d2", False)], [])


def test_a_clock_before_the_cas_own_start_issues_no_certificate_for_being_not_valid_yet(
    tmp_path: Path,
) -> None:
    """Session 51: the leader issues its certificate and the viewer's again when they are not
    valid yet (issued by a clock that ran ahead: every agent refused them). Not when its own
    clock is before the CA's start, which no clock but a wrong one is (reset at a boot, say):
    what it would issue then ends before the agents' now, and the certificates it has are
    the ones they take."""
    layout = Layout(tmp_path)
    (tmp_path / "tls").mkdir()
    ca = pki.CertificateAuthority.create(now=pki.utcnow() - 10 * DAY)
    names = pki.Names.of("leader", ["127.0.0.9"])
    key = pki.generate_key()
    pki.write_key(layout.tls_key, key)
    write_leader_cert(layout, ca, key, names)
    viewer = certificate.ensure(layout, ca, "127.0.0.9", (), pki.utcnow())
    leader = layout.tls_cert.read_bytes()
    wrong = ca.cert.not_valid_before_utc - dt.timedelta(days=400)
    assert not ensure_leader_identity(layout, ca, names, wrong)
    assert certificate.ensure(layout, ca, "127.0.0.9", (), wrong) == viewer
    assert layout.tls_cert.read_bytes() == leader
    # Past the CA's start, one not valid yet is issued again.
    behind = pki.read_cert(layout.tls_cert).not_valid_before_utc - DAY
    assert ca.cert.not_valid_before_utc < behind
    assert ensure_leader_identity(layout, ca, names, behind)
    assert certificate.ensure(layout, ca, "127.0.0.9", (), behind) != viewer


def test_a_leader_certificate_not_valid_yet_or_of_another_ca_is_issued_again_while_it_runs(
    tmp_path: Path,
) -> None:
    """Review rev51c L5: the running leader's check (``OwnTls.renew_if_due``, before each
    check of the expiry watch) issues again a certificate agents would refuse, as the start
    does (``ensure_leader_identity``): one not valid yet, one another CA signed. It then serves
    the new one (its chain, and a version the listeners' fetchers see), for a new key (review
    of s63-o1 M1), leader.key's from then on; a usable one is left as it is."""
    layout = Layout(tmp_path)
    (tmp_path / "tls").mkdir()
    ca = pki.CertificateAuthority.create(now=pki.utcnow() - 10 * DAY)
    names = pki.Names.of("leader", ["127.0.0.9"])
    other = pki.CertificateAuthority.create()
    for issuer, at in ((ca, pki.utcnow() + 3 * DAY), (other, pki.utcnow())):
        key = pki.generate_key()
        pki.write_key(layout.tls_key, key)
        # This cluster's leader identity: only the issuer or the time is off.
        stale = _leader_leaf(layout, issuer, key, names, ca.trust_domain, 200 * DAY, now=at)
        own = OwnTls(layout, ca, names)
        renewed: list[bytes] = []
        own.on_renewed.append(renewed.append)
        assert asyncio.run(own.renew_if_due())
        served = own.cert
        assert served != stale and pki.issued_by(served, ca.cert)
        assert served.not_valid_before_utc <= pki.utcnow()
        assert served.public_key() != key.public_key()
        assert pki.key_matches(served, pki.load_key_pem(own.key_pem))
        assert own.key_pem == layout.tls_key.read_bytes()
        assert renewed == [own.chain_pem] and own.chain_pem == layout.tls_cert.read_bytes()
        assert not asyncio.run(own.renew_if_due())  # usable now: left as it is


def _leader_leaf(
    layout: Layout,
    issuer: pki.CertificateAuthority,
    key: pki.PrivateKey,
    names: pki.Names,
    trust_domain: str,
    lifetime: dt.timedelta,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A leader certificate (its identity in ``trust_domain``, serving and client use) for
    ``key`` that ``issuer`` issued ``now`` for ``lifetime``, written as leader.pem with the
    issuer's certificate (``write_leader_cert``'s, with the time and the issuer the test's)."""
    leaf = issuer.issue(
        key.public_key(),
        names,
        server=True,
        client=True,
        identity=spiffe.leader(trust_domain),
        internal_dns=[spiffe.leader_host(trust_domain)],
        lifetime=lifetime,
        now=now,
    )
    layout.tls_cert.write_bytes(pki.cert_to_pem(leaf) + issuer.cert_pem)
    return leaf


def _leader_files(tmp_path: Path) -> tuple[Layout, pki.CertificateAuthority, pki.Names]:
    """A leader's data dir with its CA (begun ten days ago) and no tls files yet."""
    (tmp_path / "tls").mkdir()
    ca = pki.CertificateAuthority.create(now=pki.utcnow() - 10 * DAY)
    return Layout(tmp_path), ca, pki.Names.of("leader", ["127.0.0.9"])


def test_a_leader_pem_that_is_not_the_certificate_of_leader_key_is_issued_again_for_it(
    tmp_path: Path,
) -> None:
    """Session 52: a leader.pem that is not the certificate of leader.key (one restored from
    another backup than the key, a leader.key replaced) stopped the leader, exit 2, "restore
    the pair", although it holds the CA and issues its certificate again for its key as on
    its expiry. Now issued again for leader.key (a key of a kind the CA issues for: ECDSA
    P-256 or RSA of 2048 bits or more), with its identity and names; a usable one is left."""
    layout, ca, names = _leader_files(tmp_path)
    key = pki.generate_key()
    pki.write_key(layout.tls_key, key)
    write_leader_cert(layout, ca, pki.generate_key(), names)  # another key's
    done = ensure_leader_identity(layout, ca, names)
    assert done is not None and done.reason == REISSUED_FOR_KEY and not done.new_key
    cert = pki.read_cert(layout.tls_cert)
    assert cert.public_key() == key.public_key() and pki.issued_by(cert, ca.cert)
    assert spiffe.of(cert) == spiffe.leader(ca.trust_domain) and pki.names_of(cert) == names
    assert pki.load_certs_pem(layout.tls_cert.read_bytes())[1:] == [ca.cert]  # the chain
    assert ensure_leader_identity(layout, ca, names) is None
    # leader.key replaced by an RSA key of 2048 bits: issued for it.
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pki.write_key(layout.tls_key, rsa_key)
    done = ensure_leader_identity(layout, ca, names)
    assert done is not None and done.reason == REISSUED_FOR_KEY
    assert pki.read_cert(layout.tls_cert).public_key() == rsa_key.public_key()
    assert ensure_leader_identity(layout, ca, names) is None


def test_a_leader_key_the_ca_issues_no_certificate_for_now_keeps_its_mismatched_pair(
    tmp_path: Path,
) -> None:
    """What the leader cannot issue for leader.key is no reason to write leader.pem, and its
    start stops with one line saying why and what to do (exit 2): a key of a kind the CA
    issues none for, a clock before the CA's own start (``pki.not_valid_yet``'s guard: what
    it issued would end before the agents' now), a CA that has ended. A key it can issue for
    passes the start's check (``_check_own_tls``): the start issues the certificate then."""
    layout, ca, names = _leader_files(tmp_path)
    write_leader_cert(layout, ca, pki.generate_key(), names)
    pem = layout.tls_cert.read_bytes()
    p384 = ec.generate_private_key(ec.SECP384R1())
    rsa1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    p256 = pki.generate_key()
    cases: dict[str, tuple[pki.PrivateKey, dt.datetime | None]] = {
        "ECDSA curve secp384r1": (p384, None),
        "RSA 1024 bits": (rsa1024, None),
        "is before the CA's own start": (p256, ca.cert.not_valid_before_utc - 400 * DAY),
        "the CA ended": (p256, ca.cert.not_valid_after_utc + DAY),
    }
    for words, (key, at) in cases.items():
        pki.write_key(layout.tls_key, key)
        assert ensure_leader_identity(layout, ca, names, at) is None, words
        assert layout.tls_cert.read_bytes() == pem, words
        problem = reissue_problem(ca, key, at or pki.utcnow())
        assert problem is not None and words in problem and "restore the pair" in problem
    assert reissue_problem(ca, p256, pki.utcnow()) is None
    # The start's check, before anything is changed: the key of another kind is a config
    # error naming leader.key; a clock before the CA's start likewise (a CA begun tomorrow).
    pki.write_key(layout.tls_key, p384)
    with pytest.raises(ConfigError) as refused:
        runtime._check_own_tls(layout, ca)
    line = str(refused.value)
    assert str(layout.tls_key) in line and str(layout.tls_cert) in line
    assert "ECDSA curve secp384r1" in line and "restore the pair from a backup" in line
    pki.write_key(layout.tls_key, p256)
    runtime._check_own_tls(layout, ca)  # (the start issues it again: ``_start_on``)
    tomorrow = pki.CertificateAuthority.create(now=pki.utcnow() + DAY)
    write_leader_cert(layout, tomorrow, pki.generate_key(), names)
    with pytest.raises(ConfigError) as refused:
        runtime._check_own_tls(layout, tomorrow)
    assert "before the CA's own start" in str(refused.value)
    assert "set it right" in str(refused.value)


def test_the_running_leader_issues_its_certificate_for_the_key_it_serves(tmp_path: Path) -> None:
    """Session 52, while the leader runs (``OwnTls.renew_if_due``): a leader.pem put in place
    that is not the certificate of the key the leader serves is issued again for that key,
    and served. A leader.key replaced meanwhile is the next start's (the running leader
    serves the key it read at start): a certificate issued again for a key while it runs is
    for the key it serves, never one it would serve with the wrong key. A due one is issued
    for a new key (review of s63-o1 M1), written to leader.key and served with it."""
    layout, ca, names = _leader_files(tmp_path)
    key = pki.generate_key()
    pki.write_key(layout.tls_key, key)
    write_leader_cert(layout, ca, key, names)
    own = OwnTls(layout, ca, names)
    # leader.pem of another key (the pair of another backup, half restored).
    write_leader_cert(layout, ca, pki.generate_key(), names)
    assert asyncio.run(own.renew_if_due())
    assert own.cert.public_key() == key.public_key()
    assert own.chain_pem == layout.tls_cert.read_bytes()
    assert not asyncio.run(own.renew_if_due())
    # leader.key replaced on disk, and leader.pem due: issued again for a new key, which
    # leader.key holds (0600) and the leader serves, never the key replaced nor the old one.
    replaced = pki.generate_key()
    pki.write_key(layout.tls_key, replaced)
    due = _leader_leaf(layout, ca, key, names, ca.trust_domain, 10 * DAY)
    assert asyncio.run(own.renew_if_due())
    assert own.cert != due
    assert own.cert.public_key() not in (key.public_key(), replaced.public_key())
    assert pki.key_matches(own.cert, pki.load_key_pem(own.key_pem))  # what it serves, a pair
    assert own.key_pem == layout.tls_key.read_bytes()
    assert layout.tls_key.stat().st_mode & 0o777 == 0o600
    assert own.chain_pem == layout.tls_cert.read_bytes()


def _served(
    tmp_path: Path,
) -> tuple[Layout, pki.CertificateAuthority, pki.Names, pki.PrivateKey, OwnTls]:
    """A leader's files with its key and certificate, and the ``OwnTls`` serving them."""
    layout, ca, names = _leader_files(tmp_path)
    key = pki.generate_key()
    pki.write_key(layout.tls_key, key)
    write_leader_cert(layout, ca, key, names)
    return layout, ca, names, key, OwnTls(layout, ca, names)


def test_a_ca_renewal_never_serves_a_chain_of_another_key_than_the_leaders(
    tmp_path: Path,
) -> None:
    """Review rev52b L3: ``OwnTls.ca_renewed`` (after `tlsroll ca renew`, same CA key) served
    leader.pem's leaf, read again from disk, with the new CA certificate, and the key it holds:
    a leader.pem replaced meanwhile by another key's certificate was a chain no peer could
    complete a handshake with (every agent, the viewer) until ``renew_if_due``, right after,
    issued it again. Now the leaf it serves is chained with the new CA certificate; the file
    is then issued again for the served key as before (session 52), and served. No chain
    whose leaf is not of the served key is ever served nor handed to ``on_renewed``."""
    (tmp_path / "ca").mkdir()
    layout, ca, names, key, own = _served(tmp_path)
    leaf = own.cert
    handed: list[bytes] = []
    own.on_renewed.append(lambda chain: handed.extend((chain, own.chain_pem)))
    for replaced in (True, False):
        if replaced:  # leader.pem of another key (a pair half restored from another backup)
            write_leader_cert(layout, ca, pki.generate_key(), names)
        ca_renewal.prepare(layout, ca, pki.utcnow(), force=True).put_in_place()
        asyncio.run(own.ca_renewed())
        assert handed
        for chain in handed:
            certs = pki.load_certs_pem(chain)
            assert certs[0].public_key() == key.public_key()
            assert pki.issued_by(certs[0], ca.cert)
        assert pki.load_certs_pem(own.chain_pem)[1:] == [ca.cert]  # the CA in use
        assert own.chain_pem == layout.tls_cert.read_bytes()  # issued again, or rechained
        if replaced:
            assert own.cert != leaf  # issued again for the served key
            leaf = own.cert
        else:  # a leader.pem of the served key: its leaf, rechained, nothing issued
            assert own.cert == leaf and len(handed) == 2
        handed.clear()


def test_a_ca_renewal_crossing_a_due_renewal_does_not_serve_the_old_leaf_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review rev53c M: `tlsroll ca renew` (``ca_renewed``) while the expiry watch's
    ``renew_if_due`` issued a due leader certificate again: the CA's rechain read the leaf
    served (the due one) in its worker thread, the renewal then served the new leaf, and the
    rechain's answer, served after it, put the due leaf back, for good (leader.pem new and not
    due: nothing issued it again, nothing warned). One change of what is served at a time:
    the new leaf is served, with the new CA certificate."""
    (tmp_path / "ca").mkdir()
    layout, ca, names = _leader_files(tmp_path)
    key = pki.generate_key()
    pki.write_key(layout.tls_key, key)
    due = _leader_leaf(layout, ca, key, names, ca.trust_domain, 10 * DAY)
    own = OwnTls(layout, ca, names)
    issued, rechained = threading.Event(), threading.Event()
    rechain = OwnTls._rechain

    def issuing(*args: Any) -> Reissued | None:
        why = ensure_leader_identity(*args)
        if why is not None:  # the due certificate issued again: the rechain may cross it now
            issued.set()
            rechained.wait(0.5)  # (it does not come while the renewal holds the change)
        return why

    def rechaining(self: OwnTls) -> bytes:
        issued.wait(5)
        try:
            return rechain(self)
        finally:
            rechained.set()
            for _ in range(50):  # its answer after the renewal's is served, if they crossed
                if self.cert != due:
                    break
                time.sleep(0.01)

    monkeypatch.setattr(own_tls, "ensure_leader_identity", issuing)
    monkeypatch.setattr(OwnTls, "_rechain", rechaining)
    ca_renewal.prepare(layout, ca, pki.utcnow(), force=True).put_in_place()

    async def both() -> None:
        await asyncio.gather(own.renew_if_due(), own.ca_renewed())

    asyncio.run(both())
    assert own.cert != due  # the new leaf, not the due one
    assert own.chain_pem == layout.tls_cert.read_bytes()
    assert pki.load_certs_pem(own.chain_pem)[1:] == [ca.cert]


def test_a_leader_pem_replaced_while_it_is_issued_again_is_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``OwnTls.renew_if_due`` served what leader.pem held after it issued it again: one
    replaced in between by another key's certificate was served with the leader's key. It
    keeps serving what it served (the next check issues it again), and says so."""
    layout, ca, names, key, own = _served(tmp_path)
    before = own.chain_pem
    handed: list[bytes] = []
    own.on_renewed.append(handed.append)
    write_leader_cert(layout, ca, pki.generate_key(), names)  # to be issued again

    def replaced_after(*args: object) -> Reissued | None:
        why = ensure_leader_identity(*args)  # type: ignore[arg-type]
        write_leader_cert(layout, ca, pki.generate_key(), names)  # replaced at once
        return why

    monkeypatch.setattr(own_tls, "ensure_leader_identity", replaced_after)
    with structlog.testing.capture_logs() as logs:
        assert not asyncio.run(own.renew_if_due())
    assert own.chain_pem == before and not handed
    assert [e["event"] for e in logs] == ["leader.certificate_replaced"]
    monkeypatch.undo()
    assert asyncio.run(own.renew_if_due())
    assert own.cert.public_key() == key.public_key() and handed == [own.chain_pem]
