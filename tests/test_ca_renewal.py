"""Renewing the cluster CA with the same key (review s46rt1 M3; docs/ca-renewal.md).

The CA lived 10 years and was warned about a year ahead with one piece of advice: set the
cluster up again. In its last year every leaf was cut to its end, so every https certificate
stopped on the same day. ``tlsroll ca renew`` makes CA1' (CA1's subject, key, key identifier
and extensions, a new serial, 10 years from now): its pin and trust domain are CA1's, every
leaf chains to it unchanged. The leader uses it at once, agents take it with their next
certificate renewal (only a self-signed CA certificate for the key they pinned), and a
rotate-cert rollout stages it for the managed servers (and so for the workstations, which
the bootstrap hands it to).

The cluster whose CA is near its end is made by the test itself: after ``tlsroll init``, the
CA certificate is made again with its own key, ending in 20 days (the test's own builder,
not the product's), and the leader's certificate issued again under it (cut to that end).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import json
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from leader import ca_renewal
from leader.config import TEST_AGENT_CERT_ENV
from leader.expiry import held_at, renewals_to
from leader.layout import Layout, read_passphrase, write_leader_cert
from leader.schema_store import SchemaStore
from leader.store import RolloutHoldsCA, Store
from nodeagent import bootstrap_crypto, certwork_ops, renewal
from nodeagent.config import AgentConfig
from nodeagent.identity import Identity, fetch_chain, paths
from nodeagent.renewal import Renewer
from tests.cluster import AdminTokenCluster, Daemon, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node
from tests.refserver_helper import http_request
from tests.test_level_based import password_file
from tests.test_renewal import FlakyLink, _agent_config, _enrolled
from tests.test_rotation import served
from tests.test_schema_store import new_rollout
from tlsroll import bootstrap_protocol, pki, spiffe, tls
from tlsroll.defaults import JOIN_PORT, VIEWER_PORT
from tlsroll.errors import PKIError, TerminalError

DAY = dt.timedelta(days=1)
LONG = 120.0
# Seconds an agent's certificate lives where a test watches it renew (the leader's test hook,
# ``leader.config.TEST_AGENT_CERT_ENV``).
AGENT_CERT = 30


def same_key(
    cert: x509.Certificate, key: pki.PrivateKey, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    """``cert`` (a self-signed CA certificate) made again with its key, subject and
    extensions, valid from ``not_before`` to ``not_after``."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(key, hashes.SHA256())


def ending_in(cluster: AdminTokenCluster, days: int) -> x509.Certificate:
    """The cluster's CA certificate made again to end in ``days`` days (its tenth year), and
    the leader's certificate issued again under it (cut to that end): as a cluster set up
    almost 10 years ago."""
    ca = pki.CertificateAuthority.load(
        cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
    )
    now = pki.utcnow()
    near = same_key(ca.cert, ca.key, now - 3600 * DAY, now + days * DAY)
    pki.write_cert(cluster.ca_cert_path, near)
    ca = pki.CertificateAuthority(near, ca.key)
    layout = Layout(cluster.data_dir)
    names = pki.Names.of("leader", [cluster.address])
    write_leader_cert(layout, ca, pki.read_key(layout.tls_key), names)
    return near


def expiration(cluster: AdminTokenCluster) -> tuple[int, dict[str, Any]]:
    check = cluster.cli("certs", "check-expiration", "--json")
    return check.returncode, {
        c["kind"] + ("/" + c["subject"] if c.get("subject") else ""): c
        for c in json.loads(check.stdout)["certificates"]
    }


def live_client_ca(node: Node) -> bytes:
    """The CA file the managed server is configured with (what a rollout staged and the
    node's bootstrap service hands the workstations)."""
    with node.server.config_path.open("rb") as f:
        config = tomllib.load(f)
    table = config.get("server", config)
    path = Path(table["client_ca_file"])
    if not path.is_absolute():
        path = node.server.config_path.parent / path
    return path.read_bytes()


@pytest.mark.timeout(400)
def test_a_ca_near_its_end_is_renewed_with_its_key_and_reaches_agents_and_servers(
    tmp_path: Path,
) -> None:
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    node = Node(cluster, "node1", address, tmp_path / "n0")
    try:
        cluster.init("--node-name", "node1")
        old = ending_in(cluster, 20)
        key_before = cluster.ca_key_path.read_bytes()
        # Agents renew every 9-12 s (30-40 % of ``AGENT_CERT``; the setting a minute, the least
        # it takes): the test sees them take the CA.
        cluster.write_leader_config({"agent_cert_lifetime": 60})
        cluster.start_leader({TEST_AGENT_CERT_ENV: str(AGENT_CERT)})
        node.start()
        cluster.wait_for_nodes_online(["node1"])
        pw = password_file(tmp_path, "pw", "renewal-password-for-the-practice")
        enable = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--password-file", str(pw)),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert enable.returncode == 0, (enable.stdout, enable.stderr)
        before = served(node)
        assert before.not_valid_after_utc == old.not_valid_after_utc  # cut to the CA's end

        # The CA is warned about, and the advice is the renewal (it was: set up a new cluster).
        code, certs = expiration(cluster)
        assert code == 1 and certs["ca"]["warning"], certs["ca"]
        assert "tlsroll ca renew" in certs["ca"]["advice"], certs["ca"]["advice"]
        assert (
            "rotate-cert" in certs["ca"]["advice"] and "tlsroll init" not in certs["ca"]["advice"]
        )

        # Not on a terminal and no --yes: refused before anything is asked (the CLI's one
        # rule, leader.cli.base.ask_first), nothing changes.
        asked = cluster.cli("ca", "renew", input="y\n")
        assert asked.returncode == 2 and cluster.ca_pem == pki.cert_to_pem(old), asked
        assert "not a terminal: add --yes" in asked.stderr, asked.stderr

        renew = cluster.cli("ca", "renew", "--yes")
        assert renew.returncode == 0, (renew.stdout, renew.stderr)
        assert pki.spki_pin(old) in renew.stdout and "rotate-cert" in renew.stdout
        new = pki.read_cert(cluster.ca_cert_path)
        # CA1': CA1's subject, key, key identifier and extensions; a new serial and validity.
        assert new.subject == new.issuer == old.subject
        assert pki.spki_pin(new) == pki.spki_pin(old) and new.serial_number != old.serial_number
        assert list(new.extensions) == list(old.extensions)
        bc = new.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca and bc.path_length == 0
        assert new.not_valid_after_utc - pki.utcnow() > (pki.CA_VALIDITY_DAYS - 1) * DAY
        assert spiffe.trust_domain(new) == spiffe.trust_domain(old)
        assert pki.issued_by(before, new)  # the served leaf chains to it unchanged
        assert cluster.ca_key_path.read_bytes() == key_before  # the key is left as it was
        serial8 = f"{old.serial_number:x}"[:8]
        kept = cluster.ca_cert_path.with_name(
            f"ca.pem.until-{old.not_valid_after_utc:%Y-%m-%d}-{serial8}"
        )
        assert pki.read_cert(kept) == old
        assert cluster.ca_cert_path.stat().st_mode & 0o777 == 0o644
        shown = json.loads(cluster.cli("ca", "show", "--json").stdout)
        assert shown["fingerprint"] == pki.fingerprint(new)
        assert int(shown["residual_seconds"]) > (pki.CA_VALIDITY_DAYS - 1) * 86400
        audit = [a for a in cluster.store_table("audit") if a["kind"] == "ca.renewed"]
        assert len(audit) == 1, audit
        assert json.loads(audit[0]["detail"])["serial"] == f"{new.serial_number:x}"
        # The leader serves it at once: its chain carries it, and its own certificate, cut to
        # the old end, is issued again past it.
        chain = pki.load_certs_pem(cluster.tls_cert_path.read_bytes())
        assert chain[1] == new and chain[0].not_valid_after_utc > old.not_valid_after_utc
        assert fetch_chain(address, JOIN_PORT)[1:] == [new]  # what enrolling agents get
        viewer = fetch_chain(address, VIEWER_PORT)[0]  # issued again past the old end too
        assert viewer.not_valid_after_utc > old.not_valid_after_utc + DAY

        # The agent takes it with its next renewal, and still talks to the leader with it.
        agent = node.agent
        assert agent is not None
        wait_until(lambda: agent.ca_file.read_bytes() == pki.cert_to_pem(new), 60, "new ca.pem")
        # ca.pem is written before the certificate of the same renewal: that one in place (the
        # agent says so after), the next renewal is one under the new ca.pem.
        wait_until(lambda: "agent.ca_renewed" in agent.event_names(), 10, "agent.ca_renewed")
        renewed_at = pki.read_cert(agent.cert_file).serial_number
        wait_until(
            lambda: pki.read_cert(agent.cert_file).serial_number != renewed_at,
            60,
            "a renewal under the new ca.pem",
        )
        cluster.wait_for_nodes_online(["node1"])
        check = cluster.cli("nodes", "--check")
        assert check.returncode == 0, (check.stdout, check.stderr)  # the leader dials it
        assert "agent.ca_renewed" in agent.event_names()

        # A rotate-cert rollout stages the renewed CA certificate, and the new server
        # certificate is no longer cut to the old end.
        rotate = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--change", "rotate-cert"),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
        assert live_client_ca(node) == pki.cert_to_pem(new)
        after = served(node)
        assert after != before and after.not_valid_after_utc > old.not_valid_after_utc + DAY

        # Nothing is warned about any more (an agent's certificate may be for a few seconds of
        # a busy machine, its renewal late past half of its ``AGENT_CERT``: looked at again).
        checks = [expiration(cluster)]
        deadline = time.monotonic() + 30
        while checks[-1][0] != 0 and time.monotonic() < deadline:
            time.sleep(1)
            checks.append(expiration(cluster))
        code, certs = checks[-1]
        assert code == 0, {k: c for k, c in certs.items() if c.get("warning")}
        assert certs["ca"]["not_after"].startswith(f"{new.not_valid_after_utc:%Y-%m-%d}")

        # And the leader starts again with it.
        cluster.stop_leader()
        cluster.start_leader()
        shown = json.loads(cluster.cli("ca", "show", "--json").stdout)
        assert shown["fingerprint"] == pki.fingerprint(new)
        assert cluster.find_secrets(cluster.logs_text()) == []
    finally:
        node.close()
        cluster.close()


def test_the_renewal_waits_for_a_rollout_to_end(tmp_path: Path) -> None:
    """A rollout not ended holds the CA certificate: its stages send it, and what it prepared
    ahead was cut to the old end. The renewal is refused (one line), checked in the
    transaction that audits it, and nothing is written."""
    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    written: list[str] = []

    def write() -> ca_renewal.Renewal:
        written.append("written")
        raise AssertionError("prepared while a rollout runs")

    new_rollout(schema, "r1")
    with pytest.raises(RolloutHoldsCA) as refused:
        store.renew_ca(write, now=pki.utcnow(), actor="admin:test")
    assert "rollout r1" in str(refused.value) and "\n" not in str(refused.value)
    assert written == []
    store.close()
    db = sqlite3.connect(tmp_path / "leader.sqlite3")
    try:
        assert db.execute("SELECT COUNT(*) FROM audit WHERE kind = 'ca.renewed'").fetchone() == (0,)
    finally:
        db.close()


# --- the agent takes the renewed CA certificate, and nothing else -----------------------------

NAMES = pki.Names.of("n1", ["10.0.0.5"])


def _node(tmp_path: Path) -> tuple[pki.CertificateAuthority, dict[str, Any]]:
    """A node enrolled under a CA that ends in 20 days, with a renewal's key pending and the
    leader's certificate for it: ``renew_install``'s request, without a CA certificate."""
    now = pki.utcnow()
    ca = pki.CertificateAuthority.create(now=now + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    data = tmp_path / "data"
    data.mkdir()
    key = pki.generate_key()
    pki.write_key(data / "node.key.new", key)
    cert = ca.issue(
        key.public_key(), NAMES, client=True, identity=spiffe.node(ca.trust_domain, "n1")
    )
    pki.write_cert(data / "ca.pem", ca.cert)
    return ca, {
        "certificate_pem": pki.cert_to_pem(cert).decode(),
        "data_dir": str(data),
        "names": {"common_name": "n1", "ips": ["10.0.0.5"], "dns": []},
        "node_name": "n1",
        "ca_pin": pki.spki_pin(ca.cert),
    }


def _offered(kind: str, ca: pki.CertificateAuthority) -> bytes:
    """What a leader (or someone in its place) sends as the CA certificate: ``kind``."""
    now = pki.utcnow()
    later = now + pki.CA_VALIDITY_DAYS * DAY
    other = pki.CertificateAuthority.create()  # another key, and the same subject
    if kind == "renewed":
        return pki.cert_to_pem(same_key(ca.cert, ca.key, now, later))
    if kind == "another key":
        return pki.cert_to_pem(same_key(ca.cert, other.key, now, later))
    if kind == "not self-signed":  # the pinned key, the subject, signed by another key
        builder = (
            x509.CertificateBuilder()
            .subject_name(ca.cert.subject)
            .issuer_name(ca.cert.subject)
            .public_key(ca.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(later)
        )
        for extension in ca.cert.extensions:
            builder = builder.add_extension(extension.value, critical=extension.critical)
        return pki.cert_to_pem(builder.sign(other.key, hashes.SHA256()))
    if kind == "not a CA":
        leaf = ca.issue(ca.key.public_key(), NAMES)  # the pinned key, a leaf
        return pki.cert_to_pem(leaf)
    if kind == "older":
        return pki.cert_to_pem(same_key(ca.cert, ca.key, now - 400 * DAY, now + DAY))
    if kind == "another subject":
        named = pki.CertificateAuthority.create("another CA").cert
        renamed = same_key(named, ca.key, now, later)  # another subject, the pinned key
        return pki.cert_to_pem(renamed)
    if kind in VARIANTS:
        return pki.cert_to_pem(_variant(kind, ca, now))
    if kind == "not PEM":
        return b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    if kind == "the same":
        return ca.cert_pem
    raise AssertionError(kind)


KEY_USAGE = {
    "digital_signature": True,
    "key_cert_sign": True,
    "crl_sign": True,
    "content_commitment": False,
    "key_encipherment": False,
    "data_encipherment": False,
    "key_agreement": False,
    "encipher_only": False,
    "decipher_only": False,
}
# Renewals with the pinned key and subject that are weaker than the CA certificate held, or
# that nothing would verify with (review s48rev1 M1): the agent took each of them.
VARIANTS = {
    "no path length": "extensions",
    "key usage without keyCertSign": "extensions",
    "name constraints added": "extensions",
    "extended key usage added": "extensions",
    "an unknown critical extension": "does not know",
    "another signature algorithm": "signature algorithm",
    "starts in 30 days": "future",
    "ends in 30 years": "days from now",
}


def _variant(kind: str, ca: pki.CertificateAuthority, now: dt.datetime) -> x509.Certificate:
    """CA1 renewed with its key and subject, and one thing changed: ``kind``."""
    start, end = now - dt.timedelta(hours=1), now + pki.CA_VALIDITY_DAYS * DAY
    if kind == "starts in 30 days":
        start = now + 30 * DAY
    if kind == "ends in 30 years":
        end = now + 3 * pki.CA_VALIDITY_DAYS * DAY
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    for extension in ca.cert.extensions:
        value = extension.value
        if kind == "no path length" and isinstance(value, x509.BasicConstraints):
            value = x509.BasicConstraints(ca=True, path_length=None)
        if kind == "key usage without keyCertSign" and isinstance(value, x509.KeyUsage):
            value = x509.KeyUsage(**{**KEY_USAGE, "key_cert_sign": False})
        builder = builder.add_extension(value, critical=extension.critical)
    if kind == "name constraints added":
        permitted = [x509.DNSName("example.org")]
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None),
            critical=True,
        )
    if kind == "extended key usage added":
        eku = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if kind == "an unknown critical extension":
        oid = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, b"\x05\x00"), True)
    algorithm = hashes.SHA384() if kind == "another signature algorithm" else hashes.SHA256()
    return builder.sign(ca.key, algorithm)


def test_the_agent_takes_the_renewed_ca_certificate_with_its_renewal(tmp_path: Path) -> None:
    ca, request = _node(tmp_path)
    offered = _offered("renewed", ca)
    answer = certwork_ops.renew_install({**request, "ca_certificate_pem": offered.decode()})
    ca_file = tmp_path / "data" / "ca.pem"
    assert ca_file.read_bytes() == offered
    assert answer["ca_not_after"] == pki.load_cert_pem(offered).not_valid_after_utc.isoformat()
    assert "ca_refused" not in answer
    # The certificate renewed is in place, and chains to the new CA certificate.
    assert pki.issued_by(pki.read_cert(tmp_path / "data" / "node.pem"), pki.read_cert(ca_file))


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("another key", "pinned"),
        ("not self-signed", "self-signed"),
        ("not a CA", "not a CA"),
        ("another subject", "subject"),
        ("older", "no later"),
        ("not PEM", "certificate"),
        *VARIANTS.items(),
    ],
)
def test_the_agent_refuses_any_other_ca_certificate_and_renews_all_the_same(
    tmp_path: Path, kind: str, why: str
) -> None:
    ca, request = _node(tmp_path)
    answer = certwork_ops.renew_install(
        {**request, "ca_certificate_pem": _offered(kind, ca).decode()}
    )
    assert why in answer["ca_refused"] and "ca_not_after" not in answer, answer
    assert (tmp_path / "data" / "ca.pem").read_bytes() == ca.cert_pem  # left as it was
    assert pki.read_cert(tmp_path / "data" / "node.pem").serial_number == int(answer["serial"], 16)


@pytest.mark.parametrize("kind", ["the same", ""])
def test_the_same_ca_certificate_or_none_changes_nothing(tmp_path: Path, kind: str) -> None:
    """An older leader sends none; a leader whose CA was not renewed sends the one held."""
    ca, request = _node(tmp_path)
    if kind:
        request["ca_certificate_pem"] = _offered(kind, ca).decode()
    answer = certwork_ops.renew_install(request)
    assert "ca_refused" not in answer and "ca_not_after" not in answer
    assert (tmp_path / "data" / "ca.pem").read_bytes() == ca.cert_pem


def test_the_leader_renews_its_ca_certificate_and_issues_past_the_old_end(tmp_path: Path) -> None:
    """``renewed_cert``/``adopt``: the product's renewal keeps what the pin and the chains
    depend on, and the leaves are cut to the certificate in use."""
    now = pki.utcnow()
    ca = pki.CertificateAuthority.create(now=now + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    leaf = ca.issue(pki.generate_key().public_key(), NAMES)
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc  # cut
    old = ca.cert
    new = ca.renewed_cert(now)
    assert list(new.extensions) == list(old.extensions) and new.subject == old.subject
    assert pki.spki_pin(new) == pki.spki_pin(old) and new.serial_number != old.serial_number
    assert pki.issued_by(leaf, new) and pki.issued_by(new, new)
    with pytest.raises(PKIError):
        ca.adopt(pki.CertificateAuthority.create().cert)  # another key
    ca.adopt(new)
    assert ca.cert == new and ca.trust_domain == spiffe.trust_domain(old)
    longer = ca.issue(pki.generate_key().public_key(), NAMES)
    assert longer.not_valid_after_utc > old.not_valid_after_utc  # no longer cut


def test_a_renewal_by_a_leader_whose_clock_is_ahead_starts_no_later_than_now() -> None:
    """The leader made CA1' start an hour before its own now: with its clock two hours ahead,
    CA1' started in the future, every agent took it, and was cut off from the leader until
    real time reached that start (review s48rev1 M1). It starts when CA1 did now (or an hour
    before the leader's now, if earlier), and the agents' check takes it."""
    now = pki.utcnow()
    ca = pki.CertificateAuthority.create(now=now + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    old = ca.cert
    new = ca.renewed_cert(now + 2 * dt.timedelta(hours=1))
    assert new.not_valid_before_utc <= now
    assert new.not_valid_before_utc == old.not_valid_before_utc
    assert pki.renewed_ca_problem(new, old, pki.spki_pin(old), now) is None
    # Renewed again within the same second (X.509 times are whole seconds), it still ends
    # later: agents take only a later end (seen with `ca renew --force` right after another).
    ca.adopt(new)
    again = ca.renewed_cert(now + 2 * dt.timedelta(hours=1))
    assert again.not_valid_after_utc > new.not_valid_after_utc
    assert pki.renewed_ca_problem(again, new, pki.spki_pin(old), now) is None
    ca.adopt(again, now)
    # The leader adopts nothing an agent would refuse.
    weaker = _variant("no path length", ca, now)
    with pytest.raises(PKIError, match="extensions"):
        ca.adopt(weaker)
    assert ca.cert == again


# --- a workstation set up between the renewal and its node's rotate-cert rollout ---------------

OPENSSL = shutil.which("openssl")


def connect_pc(url: str, pw: Path, settings: Path) -> subprocess.CompletedProcess[str]:
    """``tlsroll client test-connection`` run as a PC runs it (its own process)."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "tlsroll", "client", "test-connection", url),
            *("--password-file", str(pw), "--yes", "--settings-dir", str(settings)),
            *("--name", settings.name),
        ],
        capture_output=True,
        text=True,
        timeout=LONG,
        check=False,
    )


def verified_at(ca_file: Path, cert: x509.Certificate, when: dt.datetime, tmp: Path) -> str:
    """``openssl verify`` of ``cert`` against the CA bundle ``ca_file`` as if it were ``when``
    (OpenSSL, as the PC's Python uses it, checks a trust anchor's dates): "OK" or why not."""
    leaf = tmp / "leaf.pem"
    leaf.write_bytes(pki.cert_to_pem(cert))
    at = str(int(when.timestamp()))
    assert OPENSSL is not None
    run = subprocess.run(
        [OPENSSL, "verify", "-attime", at, "-CAfile", str(ca_file), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    return "OK" if run.returncode == 0 else (run.stdout + run.stderr).strip()


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")
@pytest.mark.timeout(400)
def test_a_workstation_set_up_before_the_rotate_cert_rollout_trusts_the_renewed_ca(
    tmp_path: Path,
) -> None:
    """A PC set up after `tlsroll ca renew` and before its node's rotate-cert rollout was
    handed the staged CA file, CA1 alone, with a client certificate of 397 days: at CA1's end
    it could no longer verify its server, and nothing warned (review s48rev1 H1). The leader's
    signing answer carries CA1', and the node's bootstrap service adds it (its agent's check
    of a renewal) to the sealed bundle: the PC trusts CA1 and CA1', and the server's
    certificate of the rollout verifies with its settings past CA1's end."""
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    node = Node(cluster, "node1", address, tmp_path / "n0")
    try:
        cluster.init("--node-name", "node1")
        old = ending_in(cluster, 20)
        cluster.start_leader()
        node.start()
        cluster.wait_for_nodes_online(["node1"])
        pw = password_file(tmp_path, "pw", "renewal-password-for-the-practice")
        enable = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--password-file", str(pw)),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert enable.returncode == 0, (enable.stdout, enable.stderr)
        renew = cluster.cli("ca", "renew", "--yes")
        assert renew.returncode == 0, (renew.stdout, renew.stderr)
        new = pki.read_cert(cluster.ca_cert_path)
        assert live_client_ca(node) == pki.cert_to_pem(old)  # the staged file: CA1 still

        pc = tmp_path / "ws-pca"
        connected = connect_pc(node.https_url(), pw, pc)
        assert connected.returncode == 0, (connected.stdout, connected.stderr)
        client = pki.read_cert(pc / "client.pem")
        assert client.not_valid_after_utc > old.not_valid_after_utc + DAY  # 397 days

        rotate = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--change", "rotate-cert"),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
        server = served(node)
        assert server.not_valid_after_utc > old.not_valid_after_utc + DAY
        past = old.not_valid_after_utc + DAY
        assert verified_at(pc / "ca.pem", server, past, tmp_path) == "OK"
        trusted = pki.load_certs_pem((pc / "ca.pem").read_bytes())
        assert trusted == [old, new], [f"{c.serial_number:x}" for c in trusted]
        # (CA1 alone, as the PC was handed it, verifies nothing then.)
        alone = tmp_path / "ca1.pem"
        alone.write_bytes(pki.cert_to_pem(old))
        assert "expired" in verified_at(alone, server, past, tmp_path)
        # And it works now, with the settings it wrote.
        context = tls.client_context(
            (pc / "ca.pem").read_bytes(), cert_file=pc / "client.pem", key_file=pc / "client.key"
        )
        assert http_request("GET", node.https_url(), context=context).status == 200
        assert cluster.find_secrets(cluster.logs_text()) == []
    finally:
        node.close()
        cluster.close()


@pytest.mark.parametrize(
    ("kind", "added"),
    [("renewed", True), ("the same", None), ("older", False), ("another key", False)]
    + [(kind, False) for kind in VARIANTS],
)
def test_the_bootstrap_adds_only_a_renewal_of_the_pinned_ca_to_the_bundle(
    kind: str, added: bool | None
) -> None:
    """The node's crypto worker (``bootstrap_crypto.cert_facts``) adds the CA certificate the
    leader signed a workstation's certificate under to the bundle the PC is handed only if
    it is a renewal of the pinned key's certificate in it, by the agent's check; else the
    staged bundle goes out as it is, and why is said."""
    ca = pki.CertificateAuthority.create(now=pki.utcnow() + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    own = pki.CertificateAuthority.create("a practice's own CA").cert_pem  # a BYO bundle
    bundle = own + ca.cert_pem
    leaf = ca.issue(pki.generate_key().public_key(), NAMES, client=True)
    offered = _offered(kind, ca)
    answer = bootstrap_crypto.cert_facts(
        {
            "pem": bootstrap_protocol.b64(pki.cert_to_pem(leaf)),
            "ca_pem": bootstrap_protocol.b64(offered),
            "bundle": bootstrap_protocol.b64(bundle),
            "ca_pin": pki.spki_pin(ca.cert),
        }
    )
    assert answer["spki_pin"] == pki.spki_pin(leaf)
    if added:
        assert base64.b64decode(answer["bundle"]) == bundle + offered
    else:
        assert "bundle" not in answer
        assert (added is None) == ("ca_refused" not in answer), answer


# --- the renewal's files: after its commit only, and never one overwritten ----------------------


def test_a_renewal_whose_transaction_fails_changes_nothing(tmp_path: Path) -> None:
    """The renewal wrote ca.pem and adopted CA1' before its audit row and its COMMIT: one that
    failed there (a full disk) left CA1' in use, unaudited, with the hooks never run (review
    s48rev1 L1). CA1' is written aside (ca.pem.new) in the transaction, and put in place and
    adopted only once it has committed."""
    layout = Layout(tmp_path)
    (tmp_path / "ca").mkdir()
    ca = pki.CertificateAuthority.create(now=pki.utcnow() + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    old = ca.cert
    pki.write_cert(layout.ca_cert, old)
    store = Store(layout.store)
    raw = sqlite3.connect(layout.store)
    raw.execute(
        "CREATE TRIGGER full BEFORE INSERT ON audit WHEN NEW.kind = 'ca.renewed' "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    raw.commit()
    raw.close()
    now = pki.utcnow()
    prepare = functools.partial(ca_renewal.prepare, layout, ca, now)
    with pytest.raises(sqlite3.DatabaseError, match="full"):
        store.renew_ca(prepare, now=now, actor="admin:test")
    assert pki.read_cert(layout.ca_cert) == old and ca.cert == old
    assert not ca_renewal.new_path(layout).exists()
    leaf = ca.issue(pki.generate_key().public_key(), NAMES)
    assert leaf.not_valid_after_utc == old.not_valid_after_utc  # still cut to CA1's end
    # The audit taken back: the renewal goes through, in place once committed.
    raw = sqlite3.connect(layout.store)
    raw.execute("DROP TRIGGER full")
    raw.commit()
    raw.close()
    detail = store.renew_ca(prepare, now=now, actor="admin:test")
    new = pki.read_cert(layout.ca_cert)
    assert ca.cert == new != old and detail["serial"] == f"{new.serial_number:x}"
    assert not ca_renewal.new_path(layout).exists()
    store.close()


@pytest.mark.timeout(300)
def test_a_renewal_too_early_says_from_when_it_is_renewed() -> None:
    """The refusal's rule is the one applied (``RENEW_BEFORE``: renewed once at most 3285 days,
    nine years, are left), with the day that is; it said "renewed in its last 365 days" of a
    CA renewable from the end of its first year (session 56's README walk, M1)."""
    ca = pki.CertificateAuthority.create().cert
    made = ca.not_valid_before_utc
    said = ca_renewal.too_early(ca, made + dt.timedelta(days=1))
    due = ca.not_valid_after_utc - ca_renewal.RENEW_BEFORE
    assert said is not None and "last 365" not in said
    left = f"once at most {ca_renewal.RENEW_BEFORE.days} days are left"
    assert f"{left} (from {due:%Y-%m-%d %H:%M} UTC)" in said, said  # (the hour too: rev56e L6)
    assert ca_renewal.too_early(ca, due) is None
    assert ca_renewal.too_early(ca, due - dt.timedelta(seconds=1)) is not None
    # Hours before that day, "3286 days left", not the 3285 it is renewed at (rev56d L2).
    eve = str(ca_renewal.too_early(ca, due - dt.timedelta(hours=7)))
    assert f"has {ca_renewal.RENEW_BEFORE.days + 1} days left" in eve, eve


def test_a_second_renewal_is_refused_without_force_and_keeps_every_certificate(
    tmp_path: Path,
) -> None:
    """Two renewals of certificates that end the same day kept the second's previous one over
    the first's (``ca.pem.until-DATE``), and nothing refused a renewal of a CA with 10 years
    left (review s48rev1 L2). The kept file is named by the serial too, and a renewal with
    more than 9 years left is refused (one line, exit 1, nothing written) unless --force. A
    renewal left half done by a kill (its ca.pem.new) is removed at the leader's start."""
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    try:
        cluster.init("--node-name", "node1")
        old = ending_in(cluster, 20)
        cluster.start_leader()
        first = cluster.cli("ca", "renew", "--yes")
        assert first.returncode == 0, (first.stdout, first.stderr)
        once = pki.read_cert(cluster.ca_cert_path)
        files = sorted(cluster.ca_cert_path.parent.iterdir())

        again = cluster.cli("ca", "renew", "--yes")
        assert again.returncode == 1, (again.stdout, again.stderr)
        said = again.stderr.strip()
        assert "\n" not in said and "--force" in said and "days left" in said, said
        assert pki.read_cert(cluster.ca_cert_path) == once
        assert sorted(cluster.ca_cert_path.parent.iterdir()) == files

        forced = cluster.cli("ca", "renew", "--yes", "--force")
        assert forced.returncode == 0, (forced.stdout, forced.stderr)
        twice = pki.read_cert(cluster.ca_cert_path)
        assert twice != once
        kept = {
            p.name: pki.read_cert(p) for p in cluster.ca_cert_path.parent.glob("ca.pem.until-*")
        }
        assert sorted(kept.values(), key=lambda c: c.not_valid_after_utc) == [old, once], kept
        audit = [
            json.loads(a["detail"])
            for a in cluster.store_table("audit")
            if a["kind"] == "ca.renewed"
        ]
        assert [pki.read_cert(Path(a["previous_kept"])) for a in audit] == [old, once]
        assert [a.get("forced") for a in audit] == [None, True]

        # A renewal cut short by a kill (its ca.pem.new left): removed at the next start.
        cluster.stop_leader()
        left = cluster.ca_cert_path.with_name("ca.pem.new")
        left.write_bytes(pki.cert_to_pem(old))
        cluster.start_leader()
        assert not left.exists() and "ca.renewal_leftover_removed" in cluster.logs_text()
        assert pki.read_cert(cluster.ca_cert_path) == twice
    finally:
        cluster.close()


@pytest.mark.timeout(400)
def test_check_expiration_names_who_still_holds_only_the_old_ca_certificate(
    tmp_path: Path,
) -> None:
    """After the renewal the CA's line jumped to 10 years, and nothing said who still trusted
    CA1 alone: `certs check-expiration` exited 0 while agents not yet renewed, servers
    staged before it and workstations enrolled before it would stop at CA1's end (review
    s48rev1 M2). A line for the previous CA certificate (ca/previous, warned within the CA's
    horizon) names them, by kind, with what to run, until none is left."""
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    node = Node(cluster, "node1", address, tmp_path / "n0")
    try:
        cluster.init("--node-name", "node1")
        old = ending_in(cluster, 20)
        cluster.start_leader()
        node.start()
        cluster.wait_for_nodes_online(["node1"])
        pw = password_file(tmp_path, "pw", "renewal-password-for-the-practice")
        enable = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--password-file", str(pw)),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert enable.returncode == 0, (enable.stdout, enable.stderr)
        pc = tmp_path / "ws-pc0"
        before = connect_pc(node.https_url(), pw, pc)  # enrolled under CA1
        assert before.returncode == 0, (before.stdout, before.stderr)
        code, certs = expiration(cluster)
        assert "ca/previous" not in certs  # no renewal yet

        renew = cluster.cli("ca", "renew", "--yes")
        assert renew.returncode == 0, (renew.stdout, renew.stderr)
        code, certs = expiration(cluster)
        previous = certs["ca/previous"]
        assert code == 1 and previous["warning"], previous
        assert previous["serial"] == f"{old.serial_number:x}"
        assert previous["not_after"].startswith(f"{old.not_valid_after_utc:%Y-%m-%d}")
        advice = previous["advice"]
        assert "agents not renewed since" in advice and "node1" in advice, advice
        assert "managed servers staged before it" in advice, advice
        assert "workstations enrolled before it" in advice and "ws-pc0" in advice, advice
        assert not certs["ca"]["warning"]  # CA1' itself has 10 years

        rotate = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--change", "rotate-cert"),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
        again = connect_pc(node.https_url(), pw, pc)  # enrolled again: handed CA1' now
        assert again.returncode == 0, (again.stdout, again.stderr)
        code, certs = expiration(cluster)
        advice = certs["ca/previous"]["advice"]
        assert "agents not renewed since" in advice and advice.endswith(": node1"), advice
        assert "managed servers" not in advice and "workstations" not in advice, advice
    finally:
        node.close()
        cluster.close()


@pytest.mark.timeout(500)
def test_a_node_removed_after_the_renewal_is_not_named_as_holding_the_old_ca(
    tmp_path: Path,
) -> None:
    """The `ca previous` line took its servers from every served certificate, removed nodes'
    (revoked with them) too: a node removed after `ca renew` (a machine lost, left out of a
    finalize, then removed) stayed named until the old CA ended, a warning no rollout could
    clear (review s48rev5 M1). Enrolled nodes' unrevoked certificates only."""
    a1, a2 = next_loopback(), next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", a1, heartbeat_interval=1)
    node1 = Node(cluster, "node1", a1, tmp_path / "n0")
    node2 = Node(cluster, "node2", a2, tmp_path / "n1")
    try:
        cluster.init("--node-name", "node1")
        ending_in(cluster, 20)
        cluster.start_leader()
        node1.start()
        node2.start()
        cluster.wait_for_nodes_online(["node1", "node2"])
        pw = password_file(tmp_path, "pw", "renewal-password-for-the-practice")
        enable = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--password-file", str(pw)),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert enable.returncode == 0, (enable.stdout, enable.stderr)
        assert cluster.cli("ca", "renew", "--yes").returncode == 0
        _code, certs = expiration(cluster)
        assert "node2" in certs["ca/previous"]["advice"]
        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, (removed.stdout, removed.stderr)
        rotate = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--change", "rotate-cert"),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
        _code, certs = expiration(cluster)
        previous = certs.get("ca/previous")
        assert previous is None or "node2" not in previous["advice"], previous
    finally:
        node1.close()
        node2.close()
        cluster.close()


# --- every renewal kept: a second one leaves the first one's holders named ----------------------


def previous_lines(cluster: AdminTokenCluster) -> tuple[int, dict[str, dict[str, Any]]]:
    """`certs check-expiration --json`'s exit code, and its ``ca previous`` lines by serial."""
    check = cluster.cli("certs", "check-expiration", "--json")
    lines = [
        c
        for c in json.loads(check.stdout)["certificates"]
        if c["kind"] == "ca" and c.get("subject") == "previous"
    ]
    return check.returncode, {c["serial"]: c for c in lines}


@pytest.mark.timeout(400)
def test_a_second_renewal_leaves_who_holds_the_first_ones_certificate_named(
    tmp_path: Path,
) -> None:
    """The store kept the last renewal alone (meta ``ca_renewed``): after a second `ca renew`
    (--force), an agent enrolled before the first one, which still trusts CA1 alone and stops
    at its end, was named as a holder of CA1' (10 years left, no warning), and CA1's end was
    warned of nowhere (review s48rev5 M2). Every renewal is kept, and each holder is judged
    by the CA certificate in use when it was last issued: one line per replaced certificate
    that someone still holds, saying its end."""
    addresses = [next_loopback() for _ in range(3)]
    cluster = AdminTokenCluster(tmp_path / "cluster", addresses[0], heartbeat_interval=1)
    nodes = [Node(cluster, f"node{i + 1}", a, tmp_path / f"n{i}") for i, a in enumerate(addresses)]
    try:
        cluster.init("--node-name", "node1")
        old = ending_in(cluster, 20)
        cluster.start_leader()
        nodes[0].start()  # enrolled under CA1
        cluster.wait_for_nodes_online(["node1"])
        first = cluster.cli("ca", "renew", "--yes")
        assert first.returncode == 0, (first.stdout, first.stderr)
        once = pki.read_cert(cluster.ca_cert_path)
        nodes[1].start()  # enrolled under CA1'
        cluster.wait_for_nodes_online(["node1", "node2"])
        forced = cluster.cli("ca", "renew", "--yes", "--force")
        assert forced.returncode == 0, (forced.stdout, forced.stderr)
        nodes[2].start()  # enrolled under CA1'', the one in use
        cluster.wait_for_nodes_online(["node1", "node2", "node3"])

        code, lines = previous_lines(cluster)
        ca1 = lines.get(f"{old.serial_number:x}")
        assert ca1 is not None, lines  # CA1, which node1 still trusts alone, ends in 20 days
        assert code == 1 and ca1["warning"], ca1
        assert ca1["not_after"].startswith(f"{old.not_valid_after_utc:%Y-%m-%d}")
        assert f"{old.not_valid_after_utc:%Y-%m-%d}" in ca1["advice"], ca1["advice"]
        assert "agents not renewed since" in ca1["advice"], ca1["advice"]
        assert ca1["advice"].endswith(": node1"), ca1["advice"]
        ca1_once = lines.get(f"{once.serial_number:x}")  # node2's, 10 years: listed, no warning
        assert ca1_once is not None and not ca1_once.get("warning"), ca1_once
        assert sorted(lines) == sorted([f"{old.serial_number:x}", f"{once.serial_number:x}"])
        assert all("node3" not in c.get("advice", "") for c in lines.values()), lines
        text = cluster.cli("certs", "check-expiration")
        assert text.returncode == 1 and "node1" in text.stdout, (text.stdout, text.stderr)
    finally:
        for node in nodes:
            node.close()
        cluster.close()


def _renewal_row(serial: str, previous: str, at: str) -> dict[str, str]:
    """A row of meta ``ca_renewed`` as the release before wrote it (``{"at": …, **detail}``)."""
    return {
        "at": at,
        "pin": "sha256/x",
        "serial": serial,
        "fingerprint": f"sha256:{serial}",
        "not_after": "2036-12-01T00:00:00+00:00",
        "previous_serial": previous,
        "previous_fingerprint": f"sha256:{previous}",
        "previous_not_after": "2026-12-24T00:00:00+00:00",
        "previous_kept": "/nowhere",
    }


def test_the_store_keeps_every_renewal_and_the_one_a_release_before_recorded(
    tmp_path: Path,
) -> None:
    """The single ``ca_renewed`` row of a store from before is kept as the first renewal, the
    next ones after it; ``ca_renewed`` still holds the last (what a release before reads), and
    one such a release records after a downgrade comes last. The renewals that led to the
    CA certificate in use skip one never put in place (``CARenewalNotInPlace``)."""
    layout = Layout(tmp_path)
    (tmp_path / "ca").mkdir()
    ca = pki.CertificateAuthority.create(now=pki.utcnow() + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    old = ca.cert
    pki.write_cert(layout.ca_cert, old)
    store = Store(layout.store)
    raw = sqlite3.connect(layout.store)
    legacy = _renewal_row("aa01", "9999", "2026-01-01T00:00:00+00:00")
    raw.execute("INSERT INTO meta (key, value) VALUES ('ca_renewed', ?)", (json.dumps(legacy),))
    raw.commit()
    assert [r.serial for r in store.ca_renewals()] == ["aa01"]

    # One committed, never put in place (the next renewal replaces CA1 again), then one that is.
    def not_in_place() -> ca_renewal.Renewal:
        renewal = ca_renewal.prepare(layout, ca, pki.utcnow())

        def fail() -> None:
            raise OSError("rename refused")

        renewal.put_in_place = fail  # type: ignore[method-assign]
        return renewal

    with pytest.raises(TerminalError, match="could not be put in place"):
        store.renew_ca(not_in_place, now=pki.utcnow(), actor="admin:test")
    assert ca.cert == old
    detail = store.renew_ca(
        functools.partial(ca_renewal.prepare, layout, ca, pki.utcnow()),
        now=pki.utcnow(),
        actor="admin:test",
    )
    renewals = store.ca_renewals()
    assert len(renewals) == 3 and renewals[0].serial == "aa01", renewals
    assert renewals[2].serial == detail["serial"] == f"{ca.cert.serial_number:x}"
    assert renewals[2].fingerprint == pki.fingerprint(ca.cert)
    (last,) = raw.execute("SELECT value FROM meta WHERE key = 'ca_renewed'").fetchone()
    assert json.loads(last)["serial"] == detail["serial"]
    chain = renewals_to(renewals, ca.cert)
    assert [r.serial for r in chain] == [detail["serial"]], chain  # not the one not in place
    assert chain[0].previous_serial == f"{old.serial_number:x}"
    assert held_at(chain, chain[0].at - DAY) == 0 and held_at(chain, chain[0].at) is None

    # A release before, after a downgrade, wrote its own renewal over ca_renewed alone.
    raw.execute(
        "UPDATE meta SET value = ? WHERE key = 'ca_renewed'",
        (json.dumps(_renewal_row("bb02", detail["serial"], "2027-01-01T00:00:00+00:00")),),
    )
    raw.commit()
    raw.close()
    assert [r.serial for r in store.ca_renewals()][-2:] == [detail["serial"], "bb02"]
    store.close()


# --- a renewal cut short between its commit and its rename --------------------------------------


class _Killed:
    """A renewal whose leader is killed once its transaction has committed: its ``ca.pem.new``
    is never renamed, nor removed."""

    def __init__(self, renewal: ca_renewal.Renewal) -> None:
        self.detail = renewal.detail

    def put_in_place(self) -> None:
        pass

    def discard(self) -> None:
        pass


@pytest.mark.timeout(200)
def test_a_renewal_killed_between_its_commit_and_its_rename_is_put_in_place_at_the_start(
    tmp_path: Path,
) -> None:
    """A leader killed after the renewal's transaction committed (audited, recorded) and
    before ``ca.pem.new`` was renamed removed that file at its next start: the CA in use was
    not the one the store and the audit trail said, and the advice was to renew again
    (review s48rev5 L5). The rename is finished (the replaced certificate kept as the
    renewal keeps it), and said; the leader serves and issues with it. One the store does not
    record (killed before the commit) is removed, as before."""
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    try:
        cluster.init("--node-name", "node1")
        old = ending_in(cluster, 20)
        cluster.start_leader()
        cluster.stop_leader()
        layout = Layout(cluster.data_dir)
        ca = pki.CertificateAuthority.load(
            cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
        )
        store = Store(layout.store)
        now = pki.utcnow()
        try:
            detail = store.renew_ca(
                lambda: _Killed(ca_renewal.prepare(layout, ca, now)), now=now, actor="admin:test"
            )
        finally:
            store.close()
        left = ca_renewal.new_path(layout)
        new = pki.read_cert(left)
        assert detail["serial"] == f"{new.serial_number:x}"
        assert pki.read_cert(cluster.ca_cert_path) == old

        cluster.start_leader()
        assert not left.exists()
        assert pki.read_cert(cluster.ca_cert_path) == new
        assert pki.read_cert(ca_renewal.kept_path(layout, old)) == old
        assert "ca.renewal_finished" in cluster.logs_text()
        assert "ca.renewal_leftover_removed" not in cluster.logs_text()
        shown = json.loads(cluster.cli("ca", "show", "--json").stdout)
        assert shown["fingerprint"] == pki.fingerprint(new)
        chain = pki.load_certs_pem(cluster.tls_cert_path.read_bytes())
        assert chain[1] == new  # the leader's chain carries it, as after a renewal's hooks
        assert fetch_chain(address, JOIN_PORT)[1:] == [new]
    finally:
        cluster.close()


def test_a_leftover_is_put_in_place_only_if_its_renewal_replaced_the_certificate_in_use(
    tmp_path: Path,
) -> None:
    """``leftover``: a ``ca.pem.new`` the store records, but whose renewal replaced another
    certificate than ``ca.pem`` (a backup's, restored), or one it does not record, is removed
    and ``ca.pem`` kept; one it records for ``ca.pem`` is put in place and adopted."""
    layout = Layout(tmp_path)
    (tmp_path / "ca").mkdir()
    ca = pki.CertificateAuthority.create(now=pki.utcnow() + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    old = ca.cert
    pki.write_cert(layout.ca_cert, old)
    store = Store(layout.store)
    now = pki.utcnow()
    store.renew_ca(lambda: _Killed(ca_renewal.prepare(layout, ca, now)), now=now, actor="t")
    new = pki.read_cert(ca_renewal.new_path(layout))
    recorded = store.ca_renewals()
    store.close()
    other = pki.CertificateAuthority(same_key(old, ca.key, old.not_valid_before_utc, now), ca.key)
    assert not ca_renewal.leftover(layout, other, recorded, now)  # not its renewal's
    assert not ca_renewal.new_path(layout).exists() and pki.read_cert(layout.ca_cert) == old
    pki.write_cert(ca_renewal.new_path(layout), new)
    assert not ca_renewal.leftover(layout, ca, [], now)  # not recorded
    assert not ca_renewal.new_path(layout).exists() and pki.read_cert(layout.ca_cert) == old
    pki.write_cert(ca_renewal.new_path(layout), new)
    assert ca_renewal.leftover(layout, ca, recorded, now)
    assert pki.read_cert(layout.ca_cert) == new == ca.cert
    assert not ca_renewal.new_path(layout).exists()


# --- a renewed CA certificate refused is reported, not only logged ------------------------------


class _OfferingLink(FlakyLink):
    """A leader link that signs the CSR and offers ``offered`` as the CA certificate in use."""

    def __init__(self, ca: pki.CertificateAuthority, cfg: AgentConfig, offered: bytes) -> None:
        super().__init__(ca, cfg, fail=0)
        self.offered = offered

    async def renew(self, csr: bytes) -> tuple[bytes, bytes]:
        cert, _ = await super().renew(csr)
        return cert, self.offered


def test_an_agent_that_refuses_the_renewed_ca_certificate_reports_it_until_it_takes_one(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """An agent that refused a renewed CA certificate (``pki.renewed_ca_problem``: here its
    clock two days behind the leader's, so CA1' ends more than 10 years from its now) said so
    in its own log only, and `ca previous` stopped naming it once its certificate was renewed
    (review s48rev5 L4): nothing told the admin that it still trusted CA1 alone. Its
    heartbeat reports it as its renewal failing (`tlsroll nodes`, the schema), with the
    reason, from the first refusal on, until a renewal's CA certificate is taken."""
    cfg = _agent_config(tmp_path, test_ca)
    key_file, cert_file = _enrolled(cfg, test_ca)
    identity = Identity.of(
        key_file, cert_file, paths(cfg.data_dir)[2], pki.read_cert(cert_file), test_ca.cert
    )
    ahead = test_ca.renewed_cert(pki.utcnow() + 2 * DAY)  # by the leader's clock, 2 days on
    link = _OfferingLink(test_ca, cfg, pki.cert_to_pem(ahead))
    now = [pki.utcnow()]
    renewer = Renewer(cfg, identity, link, clock=lambda: now[0])
    asyncio.run(renewer.renew())
    assert renewer.status.failing_since == now[0], renewer.status
    assert renewer.status.error.startswith(renewal.CA_REFUSED), renewer.status.error
    assert "days from now" in renewer.status.error, renewer.status.error
    assert len(renewer.status.error) <= renewal.MAX_ERROR
    assert (cfg.data_dir / "ca.pem").read_bytes() == test_ca.cert_pem  # kept
    first = now[0]
    now[0] += DAY
    asyncio.run(renewer.renew())  # refused again: failing since the first refusal
    assert renewer.status.failing_since == first, renewer.status
    link.offered = pki.cert_to_pem(test_ca.renewed_cert(pki.utcnow()))
    asyncio.run(renewer.renew())  # taken
    assert renewer.status.failing_since is None and renewer.status.error == "", renewer.status
    assert (cfg.data_dir / "ca.pem").read_bytes() == link.offered


def test_an_agent_restarted_after_refusing_the_renewed_ca_certificate_still_reports_it(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """The refusal was kept in memory only (review s49 M): a new Renewer over the same data
    dir (the agent restarted) reported nothing, while DATA/ca.pem was still CA1 and `ca
    previous` no longer named the node. It is kept in DATA/ca.refused (since when, why, the
    CA held), reported after a restart, and forgotten once a renewal's CA certificate is
    taken; a record about another DATA/ca.pem (written since) or unreadable is dropped."""
    cfg = _agent_config(tmp_path, test_ca)
    key_file, cert_file = _enrolled(cfg, test_ca)
    ca_file = paths(cfg.data_dir)[2]

    def identity() -> Identity:
        return Identity.of(key_file, cert_file, ca_file, pki.read_cert(cert_file), test_ca.cert)

    ahead = test_ca.renewed_cert(pki.utcnow() + 2 * DAY)
    link = _OfferingLink(test_ca, cfg, pki.cert_to_pem(ahead))
    first = pki.utcnow().replace(microsecond=0)
    asyncio.run(Renewer(cfg, identity(), link, clock=lambda: first).renew())
    later = first + DAY
    restarted = Renewer(cfg, identity(), link, clock=lambda: later)
    assert restarted.status.failing_since == first, restarted.status
    assert restarted.status.error.startswith(renewal.CA_REFUSED), restarted.status.error
    assert "days from now" in restarted.status.error
    assert ca_file.read_bytes() == test_ca.cert_pem
    asyncio.run(restarted.renew())  # refused again: since the first refusal still
    assert Renewer(cfg, identity(), link).status.failing_since == first
    # Taken: forgotten, and not reported after a restart.
    link.offered = pki.cert_to_pem(test_ca.renewed_cert(pki.utcnow()))
    asyncio.run(Renewer(cfg, identity(), link).renew())
    assert not (cfg.data_dir / "ca.refused").exists()
    assert Renewer(cfg, identity(), link).status.failing_since is None
    # A record about another DATA/ca.pem than the one held, or unreadable: dropped.
    link.offered = pki.cert_to_pem(test_ca.renewed_cert(pki.utcnow() + 2 * DAY))
    asyncio.run(Renewer(cfg, identity(), link).renew())
    assert (cfg.data_dir / "ca.refused").exists()
    ca_file.write_bytes(test_ca.cert_pem)  # another CA certificate written (an enrolment)
    assert Renewer(cfg, identity(), link).status.failing_since is None
    assert not (cfg.data_dir / "ca.refused").exists()
    (cfg.data_dir / "ca.refused").write_bytes(b"5\n")
    status = Renewer(cfg, identity(), link).status
    assert status.failing_since is None and status.error == "", status
    assert not (cfg.data_dir / "ca.refused").exists()


def test_a_committed_leftover_this_clock_refuses_is_moved_aside_not_removed(
    tmp_path: Path,
) -> None:
    """A committed renewal's ``ca.pem.new`` that the start's ``renewed_ca_problem`` refused
    (the leader's clock more than a day behind) was deleted, logged as cut short before its
    commit, while the store and the audit recorded it: the only copy was gone (review s49
    L1). It is moved aside (``ca.pem.refused-SERIAL``), ``ca.pem`` stays in use; moved back
    once the clock is right, the next start puts it in place."""
    layout = Layout(tmp_path)
    (tmp_path / "ca").mkdir()
    ca = pki.CertificateAuthority.create(now=pki.utcnow() + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    old = ca.cert
    pki.write_cert(layout.ca_cert, old)
    store = Store(layout.store)
    now = pki.utcnow()
    store.renew_ca(lambda: _Killed(ca_renewal.prepare(layout, ca, now)), now=now, actor="t")
    new = pki.read_cert(ca_renewal.new_path(layout))
    recorded = store.ca_renewals()
    store.close()
    behind = now - 2 * DAY
    assert not ca_renewal.leftover(layout, ca, recorded, behind)
    aside = layout.ca_cert.with_name(f"ca.pem.refused-{new.serial_number:x}")
    assert aside.exists()
    assert ca_renewal.refused_path(layout, new) == aside
    assert pki.read_cert(aside) == new  # kept
    assert not ca_renewal.new_path(layout).exists()
    assert pki.read_cert(layout.ca_cert) == old == ca.cert
    aside.rename(ca_renewal.new_path(layout))  # the clock corrected: moved back, restarted
    assert ca_renewal.leftover(layout, ca, recorded, now)
    assert pki.read_cert(layout.ca_cert) == new == ca.cert


@pytest.mark.parametrize(
    ("renewals", "renewed"),
    [
        ("5", None),
        ("null", "null"),
        ("{}", "5"),
        ("not json", '"x"'),
        ('[5, null, {"at": 5, "previous_not_after": 7}]', '{"at": 5}'),
        ('[{"at": "2026-01-01T00:00:00", "previous_not_after": "2026-02-01T00:00:00"}]', None),
    ],
)
def test_ca_renewal_records_of_the_wrong_shape_are_skipped_never_raised(
    tmp_path: Path, renewals: str, renewed: str | None
) -> None:
    """A ``ca_renewals`` / ``ca_renewed`` meta value of the wrong shape (5, null, a
    non-string or naive ``at``) raised TypeError from ``Store.ca_renewals``: the leader's
    start (with a ``ca.pem.new``) exited "internal error", and ``certs check-expiration``
    failed (review s49 L2). Such values and rows are skipped; a renewal made after them is
    recorded and read."""
    layout = Layout(tmp_path)
    (tmp_path / "ca").mkdir()
    ca = pki.CertificateAuthority.create(now=pki.utcnow() + 20 * DAY - pki.CA_VALIDITY_DAYS * DAY)
    pki.write_cert(layout.ca_cert, ca.cert)
    store = Store(layout.store)
    try:
        raw = sqlite3.connect(layout.store)
        meta = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
        raw.execute(meta, ("ca_renewals", renewals))
        if renewed is not None:
            raw.execute(meta, ("ca_renewed", renewed))
        raw.execute(meta, ("ca_renewed", 5) if renewed == "5" else ("x", 0))  # not even text
        raw.commit()
        raw.close()
        assert store.ca_renewals() == []
        now = pki.utcnow()
        store.renew_ca(functools.partial(ca_renewal.prepare, layout, ca, now), now=now, actor="t")
        assert [r.serial for r in store.ca_renewals()] == [f"{ca.cert.serial_number:x}"]
    finally:
        store.close()


@pytest.mark.timeout(400)
def test_holders_of_a_certificate_older_than_the_recorded_renewals_are_warned(
    tmp_path: Path,
) -> None:
    """A gap in the record (a release that kept the last renewal alone made two): every
    holder issued before it was credited with the first recorded renewal's replaced
    certificate, which ends ~10 years on, so an agent that trusts the real CA1 alone was
    never warned (review s49 L3). One issued before that certificate was made holds an
    earlier one, not recorded: named, and warned about, saying so."""
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    node = Node(cluster, "node1", address, tmp_path / "n0")
    try:
        cluster.init("--node-name", "node1")
        ending_in(cluster, 20)
        cluster.start_leader()
        node.start()  # enrolled under CA1
        cluster.wait_for_nodes_online(["node1"])
        time.sleep(1.5)  # a CA certificate's times are whole seconds: not the same one
        first = cluster.cli("ca", "renew", "--yes")
        assert first.returncode == 0, (first.stdout, first.stderr)
        once = pki.read_cert(cluster.ca_cert_path)
        forced = cluster.cli("ca", "renew", "--yes", "--force")
        assert forced.returncode == 0, (forced.stdout, forced.stderr)
        # What a release that kept the last renewal alone left: ``ca_renewed`` only.
        raw = sqlite3.connect(Layout(cluster.data_dir).store)
        raw.execute("DELETE FROM meta WHERE key = 'ca_renewals'")
        raw.commit()
        raw.close()
        code, lines = previous_lines(cluster)
        line = lines.get(f"{once.serial_number:x}")
        assert line is not None, lines
        assert code == 1 and line["warning"], line
        assert line["advice"].startswith("a CA certificate earlier than"), line["advice"]
        assert line["advice"].endswith(": node1"), line["advice"]
    finally:
        node.close()
        cluster.close()


@pytest.mark.timeout(200)
def test_a_second_leader_on_the_same_data_changes_nothing_before_it_refuses(
    tmp_path: Path,
) -> None:
    """A second tlsroll-leader started by hand while one runs went through ``load_state``
    (a ``ca.pem.new`` put in place or removed, the certificate rechained) before serve's
    "another tlsroll-leader is running": between a running renewal's commit and its rename
    it made the rename itself (review s49 L4). It refuses first, in one line, and touches
    nothing: a ``ca.pem.new`` planted meanwhile stays."""
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        layout = Layout(cluster.data_dir)
        ca = pki.CertificateAuthority.load(
            cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
        )
        planted = pki.cert_to_pem(ca.renewed_cert())  # as a renewal between commit and rename
        ca_renewal.new_path(layout).write_bytes(planted)
        before = {p: p.read_bytes() for p in (cluster.ca_cert_path, cluster.tls_cert_path)}
        twin = Daemon("twin", cluster.leader.argv, tmp_path / "twin.log", lambda: False)
        code, output = twin.run_to_exit()
        assert code == 1, output
        assert ca_renewal.new_path(layout).exists(), output
        assert ca_renewal.new_path(layout).read_bytes() == planted
        assert {p: p.read_bytes() for p in before} == before
        line = one_line_error(output, "tlsroll-leader")
        assert "another tlsroll-leader is running" in line, line
        assert cluster.leader.running
        ca_renewal.new_path(layout).unlink()
    finally:
        cluster.close()
