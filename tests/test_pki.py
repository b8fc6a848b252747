"""tlsroll.pki: CSR checks, the CA's certificates, pins, pinned-CA discovery, keys at rest."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from leader.layout import Layout, upgrade_ca_key
from tests.cluster import csr_pem
from tlsroll import keywrap, pki
from tlsroll.errors import PKIError, PKIReason, UnsafePermissions

ADDRESS = "127.0.0.7"
NAMES = pki.Names.of("node1", [ADDRESS])


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create("unit CA")


def csr_of(key: pki.PrivateKey, names: pki.Names = NAMES, *, ca: bool = False) -> bytes:
    return csr_pem(key, names.common_name, names.ips, names.dns, ca=ca)


def reason(excinfo: pytest.ExceptionInfo[PKIError]) -> PKIReason:
    return excinfo.value.reason


# --- CSRs -------------------------------------------------------------------------------------


def test_good_csr_passes_and_yields_its_key() -> None:
    key = pki.generate_key()
    csr = pki.load_csr_pem(csr_of(key))
    assert pki.spki_pin(pki.check_csr(csr, NAMES)) == pki.spki_pin(key.public_key())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert isinstance(pki.check_csr(pki.load_csr_pem(csr_of(rsa_key)), NAMES), rsa.RSAPublicKey)


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="P-384"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()), id="secp256k1"),
        pytest.param(
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
            id="RSA-1024",
        ),
    ],
)
def test_weak_or_unexpected_keys_are_refused(make_key: object) -> None:
    assert callable(make_key)
    csr = pki.load_csr_pem(csr_of(make_key()))
    with pytest.raises(PKIError) as info:
        pki.check_csr(csr, NAMES)
    assert reason(info) == PKIReason.KEY_TYPE


def test_ed25519_key_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node1")]))
        .add_extension(pki.san_of(NAMES), critical=False)
        .sign(key, None)
    )
    with pytest.raises(PKIError) as info:
        pki.check_csr(csr, NAMES)
    assert reason(info) == PKIReason.KEY_TYPE


def test_csr_asking_for_a_ca_is_refused() -> None:
    csr = pki.load_csr_pem(csr_of(pki.generate_key(), ca=True))
    with pytest.raises(PKIError) as info:
        pki.check_csr(csr, NAMES)
    assert reason(info) == PKIReason.CA_REQUESTED


@pytest.mark.parametrize(
    "names",
    [
        pki.Names.of("node2", [ADDRESS]),
        pki.Names.of("node1", ["127.0.0.8"]),
        pki.Names.of("node1", [ADDRESS, "127.0.0.8"]),
        pki.Names.of("node1", [ADDRESS], ["node1.example"]),
        pki.Names.of("node1", []),
    ],
    ids=["other-cn", "other-ip", "extra-ip", "extra-dns", "no-san"],
)
def test_csr_names_must_equal_the_claim(names: pki.Names) -> None:
    csr = pki.load_csr_pem(csr_of(pki.generate_key(), names))
    with pytest.raises(PKIError) as info:
        pki.check_csr(csr, NAMES)
    assert reason(info) == PKIReason.NAME_MISMATCH
    assert "CN='node1'" in str(info.value)


def test_names_are_normalised_before_comparing() -> None:
    claimed = pki.Names.of("node1", ["::1", "127.0.0.7"], ["Node1.Example."])
    in_csr = pki.Names.of("node1", ["127.0.0.7", "0:0::1"], ["node1.example"])
    key = pki.generate_key()
    csr = pki.load_csr_pem(csr_of(key, in_csr))
    pki.check_csr(csr, claimed)


def test_malformed_or_forged_csr() -> None:
    with pytest.raises(PKIError) as info:
        pki.load_csr_pem(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n")
    assert reason(info) == PKIReason.BAD_CSR
    der = bytearray(
        x509.load_pem_x509_csr(csr_of(pki.generate_key())).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last byte belongs to the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PKIError) as info:
        pki.load_csr_pem(forged)
    assert reason(info) == PKIReason.BAD_SIGNATURE


def test_sign_csr_issues_exactly_the_expected_names(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    cert = ca.sign_csr(pki.load_csr_pem(csr_of(key)), NAMES, client=True)
    assert pki.names_of(cert) == NAMES
    assert pki.key_matches(cert, key)
    assert pki.issued_by(cert, ca.cert)


# --- certificates from the CA -----------------------------------------------------------------


def test_leaf_certificate_rules(ca: pki.CertificateAuthority) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    key = pki.generate_key()
    cert = ca.issue(key.public_key(), pki.Names.of("n", [ADDRESS], ["n.example"]), now=now)
    assert cert.not_valid_before_utc < now - dt.timedelta(minutes=30)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=398)
    assert cert.serial_number.bit_length() > 64
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not pki.is_ca(cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["n.example"]
    with pytest.raises(PKIError) as info:
        pki.check_valid_now(cert, now - dt.timedelta(hours=2))
    assert reason(info) == PKIReason.EXPIRED
    pki.check_valid_now(cert, now)


def test_issue_refuses_what_the_rules_forbid(ca: pki.CertificateAuthority) -> None:
    public = pki.generate_key().public_key()
    with pytest.raises(ValueError, match="validity"):
        ca.issue(public, NAMES, validity_days=398)
    with pytest.raises(ValueError, match="IP address or DNS name"):
        ca.issue(public, pki.Names.of("n"))
    with pytest.raises(ValueError, match="server or client"):
        ca.issue(public, NAMES, server=False, client=False)


def test_serials_are_unique(ca: pki.CertificateAuthority) -> None:
    public = pki.generate_key().public_key()
    serials = {ca.issue(public, NAMES).serial_number for _ in range(20)}
    assert len(serials) == 20


def test_ca_refuses_a_non_ca_or_a_foreign_key(ca: pki.CertificateAuthority) -> None:
    leaf_key = pki.generate_key()
    leaf = ca.issue(leaf_key.public_key(), NAMES)
    with pytest.raises(PKIError) as info:
        pki.CertificateAuthority(leaf, leaf_key)
    assert reason(info) == PKIReason.NOT_CA
    with pytest.raises(PKIError) as info:
        pki.CertificateAuthority(ca.cert, pki.generate_key())
    assert reason(info) == PKIReason.KEY_MISMATCH


# --- pins and finding the pinned CA -----------------------------------------------------------


def test_spki_pin_is_sha256_of_the_der_spki(ca: pki.CertificateAuthority) -> None:
    der = ca.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert pki.spki_pin(ca.cert) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert pki.spki_pin(ca.key.public_key()) == pki.spki_pin(ca.cert)


def test_parse_pin() -> None:
    good = "sha256:" + "0f" * 32
    assert pki.parse_pin(good) == good
    assert pki.parse_pin("  SHA256:" + "0F" * 32 + "\n") == good
    for bad in ["", "0f" * 32, "sha1:" + "0f" * 32, "sha256:" + "0f" * 31, "sha256:" + "zz" * 32]:
        with pytest.raises(ValueError, match="sha256:<64 hex digits>"):
            pki.parse_pin(bad)


def test_find_pinned_ca(ca: pki.CertificateAuthority) -> None:
    server = ca.issue(pki.generate_key().public_key(), NAMES)
    assert pki.find_pinned_ca([server, ca.cert], pki.spki_pin(ca.cert).upper()) == ca.cert


def test_find_pinned_ca_wrong_pin(ca: pki.CertificateAuthority) -> None:
    server = ca.issue(pki.generate_key().public_key(), NAMES)
    other = pki.CertificateAuthority.create("other")
    with pytest.raises(PKIError) as info:
        pki.find_pinned_ca([server, ca.cert], pki.spki_pin(other.cert))
    assert reason(info) == PKIReason.PIN_MISMATCH


def test_find_pinned_ca_refuses_a_pinned_leaf(ca: pki.CertificateAuthority) -> None:
    server = ca.issue(pki.generate_key().public_key(), NAMES)
    with pytest.raises(PKIError) as info:
        pki.find_pinned_ca([server, ca.cert], pki.spki_pin(server))
    assert reason(info) == PKIReason.NOT_CA


def test_find_pinned_ca_refuses_a_ca_that_did_not_issue_the_server(
    ca: pki.CertificateAuthority,
) -> None:
    """A server sending the real CA beside a certificate of its own is not trusted."""
    impostor = pki.CertificateAuthority.create("impostor")
    server = impostor.issue(pki.generate_key().public_key(), NAMES)
    with pytest.raises(PKIError) as info:
        pki.find_pinned_ca([server, ca.cert], pki.spki_pin(ca.cert))
    assert reason(info) == PKIReason.UNTRUSTED


# --- keys at rest -----------------------------------------------------------------------------


def test_encrypted_key_needs_the_right_passphrase(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "ca.key"
    ca.save(cert_path, key_path, b"right")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key_path.read_bytes()
    for wrong in (b"wrong", b""):
        with pytest.raises(PKIError) as info:
            pki.CertificateAuthority.load(cert_path, key_path, wrong)
        assert reason(info) == PKIReason.BAD_PASSPHRASE
    loaded = pki.CertificateAuthority.load(cert_path, key_path, b"right")
    assert pki.spki_pin(loaded.cert) == pki.spki_pin(ca.cert)
    with pytest.raises(ValueError, match="always encrypted"):
        ca.save(cert_path, key_path, b"")


def test_plain_key_given_a_passphrase_and_garbage(tmp_path: Path) -> None:
    pem = pki.key_to_pem(pki.generate_key())
    assert b"ENCRYPTED" not in pem
    with pytest.raises(PKIError) as info:
        pki.load_key_pem(pem, b"unneeded")
    assert reason(info) == PKIReason.BAD_PASSPHRASE
    with pytest.raises(PKIError) as info:
        pki.load_key_pem(b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
    assert reason(info) == PKIReason.BAD_PEM


@pytest.mark.open_keys  # (a key others can read, on purpose)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    pki.write_key(path, pki.generate_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pki.read_key(path)
    path.chmod(mode)
    with pytest.raises(UnsafePermissions, match=f"chmod 600 {path}"):
        pki.read_key(path)


def test_key_errors_never_show_key_material(tmp_path: Path) -> None:
    pem = pki.key_to_pem(pki.generate_key(), b"secret-passphrase")
    with pytest.raises(PKIError) as info:
        pki.load_key_pem(pem, b"wrong")
    text = str(info.value)
    assert "secret-passphrase" not in text
    body = [line for line in pem.decode().splitlines() if not line.startswith("-----")]
    assert not any(line in text for line in body)


def test_the_certificate_code_an_agent_loads_leaves_key_encryption_out() -> None:
    """Issue 15, session 30: an agent imports this module on a rollout's way to its first
    switch (its first node's key and CSR), and only the leader encrypts keys (its CA's): the
    scrypt key wrapping (``tlsroll.keywrap``: 4 modules, about 3 ms of the import's ~30) is
    loaded when a key is first encrypted, not with the module."""
    probe = (
        "import sys\n"
        "from tlsroll import pki\n"
        "print('tlsroll.keywrap' in sys.modules)\n"
        "pki.load_key_pem(pki.key_to_pem(pki.generate_key(), b'pass'), b'pass')\n"
        "print('tlsroll.keywrap' in sys.modules)\n"
    )
    tree = str(Path(pki.__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": tree},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False", "True"]


def test_chain_to_finds_a_short_path_through_a_ca_it_first_met_too_deep() -> None:
    """rev57c L1: an intermediate first met at the end of a path too long to reach an anchor
    was never tried again, also not from a shorter path that reaches one (a node's bundle, and
    so a practice's cross-signed CAs, lists them in any order)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.byo_certs import leaf, make_ca

    root = make_ca("R")
    z = make_ca("Z", parent=root)
    y = make_ca("Y", parent=z)
    c = make_ca("C", parent=y)
    b = make_ca("B", parent=c)
    shared = ec.generate_private_key(ec.SECP256R1())
    a = make_ca("LI", parent=b, key=shared)  # the long way: leaf, A, B, C, Y: too deep
    d = make_ca("LI", parent=y, key=shared)  # the short way: leaf, D, Y, Z, R
    cert = leaf(a, ["127.0.0.1"])[0]
    bundle = [a.cert, b.cert, c.cert, d.cert, y.cert, z.cert]
    path = pki.chain_to(cert, bundle, [root.cert])
    assert path == [cert, d.cert, y.cert, z.cert, root.cert]
    assert pki.chain_to(cert, bundle[::-1], [root.cert]) is not None


@pytest.mark.parametrize("signed_by_it", [True, False])
def test_a_revocation_list_whose_issuer_is_no_name_is_refused_as_one(signed_by_it: bool) -> None:
    """Review b4 of session 64 (L1): an agent's held list is parsed lazily, and its issuer was
    read before its signature: a name that is no UTF-8 raised ValueError, an internal error at
    the leader for every heartbeat that carried it (no signature needed). Refused as a list
    now, whatever the CA it is checked against."""
    ca = pki.CertificateAuthority.create("not this ca")
    der = pki.build_crl(ca, 7, [("5eed", dt.datetime.now(dt.UTC))]).public_bytes(
        serialization.Encoding.DER
    )
    name = b"\x0c" + bytes([len("not this ca")]) + b"not this ca"
    assert der.count(name) == 1
    broken = der.replace(name, name[:2] + b"\xff" * len("not this ca"))
    pem = x509.load_der_x509_crl(broken).public_bytes(serialization.Encoding.PEM)
    checked_against = ca.cert if signed_by_it else pki.CertificateAuthority.create().cert
    with pytest.raises(PKIError):
        pki.load_crl(pem, checked_against, issuer=True)


# --- session 67 (review rev2 M1): a DNS name that is an IPv4 address to a resolver --------------


@pytest.mark.parametrize(
    "name",
    # inet_aton (getaddrinfo) and WHATWG URL parsers read each of these as 127.0.0.1 or
    # 10.0.0.5: a certificate's DNS name for them vouched for that address to a client that
    # checks the name as a host name (OpenSSL's, Python's ssl)
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0177.0.0.01",
        "0x7f000001",
        "0x7f.0x1",
        "10.0.0.0x5",
        "host.0x",
        "0",
    ],
)
def test_a_dns_name_that_is_a_number_address_is_refused(name: str) -> None:
    problem = pki.dns_problem(name)
    assert problem is not None and "its last label is a number" in problem, problem


@pytest.mark.parametrize(
    "name",
    # names a practice uses stay signable: digits inside a label or in other labels, IDNA
    # (xn--), a label that starts with 0x but is no hex number, single-label host names
    [
        "1e100.net",
        "123.example.com",
        "host1.example",
        "xn--bcher-kva.example",
        "pc-0x12.lan",
        "0xgateway.example",
        "node-7",
        "s1",
        "a.b.c.d.example.org",
        "7eleven.example",
    ],
)
def test_a_dns_name_with_digits_elsewhere_is_signed(name: str) -> None:
    assert pki.dns_problem(name) is None


# --- the tests' scrypt hook (TLSROLL_TEST_KDF_N) ----------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        *("0", "1", "3", "1000", "16384", "32768", "-256", "x", "2**8"),
        # ``int`` took these as 256 (review s75 revpwkdf): blank, sign, "_", full-width digits
        *(" 256", "+256", "2_56", "\uff12\uff15\uff16"),
    ],
)
def test_the_kdf_hook_set_wrong_is_an_error_never_as_unset(value: str) -> None:
    hooked = {keywrap.TEST_KDF_N_ENV: value}
    with pytest.raises(keywrap.KdfHookError) as info:
        keywrap.hook_kdf_n(hooked)
    assert "\n" not in str(info.value) and "power of 2 from 2 to 8192" in str(info.value)
    with pytest.raises(keywrap.KdfHookError):  # nothing written under a hook set wrong
        keywrap.encrypt(pki.generate_key(), b"pass", hooked)
    assert keywrap.hook_kdf_n({}) is None
    assert keywrap.hook_kdf_n({keywrap.TEST_KDF_N_ENV: ""}) is None  # (empty: as unset)
    assert keywrap.hook_kdf_n({keywrap.TEST_KDF_N_ENV: "8192"}) == 8192


def test_the_kdf_hook_is_refused_for_the_installed_leader_s_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s74 scryptknob: the hook left in a production unit's environment kept the CA
    key (and every backup made meanwhile) weaker, said but not refused. For the installed
    leader's data dir (``DEFAULT_DATA_DIR``) both ``init`` (a usage error, exit 2) and a start
    (a config error, exit 2) refuse it before anything is read or made; any other dir (the
    tests') takes it. Nothing here touches the default dir: the checks read no file."""
    import click

    from leader import runtime
    from leader.cli import cluster_cmd
    from tlsroll.defaults import DEFAULT_DATA_DIR
    from tlsroll.errors import ConfigError

    assert keywrap.hook_refused_for(DEFAULT_DATA_DIR, None) is None  # unset: nothing to refuse
    assert keywrap.hook_refused_for(tmp_path, 256) is None
    (tmp_path / "a").symlink_to(tmp_path / "b")  # a loop: 3.11's resolve raises RuntimeError
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert keywrap.hook_refused_for(tmp_path / "a", 256) is None  # (review of s74 revfront L4)
    refused = keywrap.hook_refused_for(DEFAULT_DATA_DIR, 256)
    assert refused is not None and str(DEFAULT_DATA_DIR) in refused and "\n" not in refused
    monkeypatch.setenv(keywrap.TEST_KDF_N_ENV, "256")
    with pytest.raises(click.UsageError, match="installed leader's data directory"):
        cluster_cmd.kdf_hook(DEFAULT_DATA_DIR)
    with pytest.raises(ConfigError, match="installed leader's data directory"):
        runtime._kdf_hook(DEFAULT_DATA_DIR)
    assert cluster_cmd.kdf_hook(tmp_path) is not None  # (said, taken)
    runtime._kdf_hook(tmp_path)
    monkeypatch.delenv(keywrap.TEST_KDF_N_ENV)
    assert cluster_cmd.kdf_hook(DEFAULT_DATA_DIR) is None  # unset: the default dir is fine


def test_a_key_written_under_the_kdf_hook_is_weaker_and_kept_only_while_it_is_set(
    ca: pki.CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 74 (CI time): under ``TLSROLL_TEST_KDF_N`` the CA key is written with that N (a
    leader start's scrypt costs 0.2 s of CPU at 2^14); while it is set such a key is kept, and
    without it the leader's start encrypts it again at full strength (``upgrade_ca_key``), as a
    key of an older tlsroll: a key a test made never stays weak in production."""
    hooked, unhooked = {keywrap.TEST_KDF_N_ENV: "256"}, {keywrap.TEST_KDF_N_ENV: ""}
    pem = keywrap.encrypt(ca.key, b"right", hooked)
    kdf = keywrap.kdf_of(pem)
    assert str(kdf) == "scrypt N=256 r=8 p=5"
    assert not kdf.strong and kdf.acceptable(hooked) and not kdf.acceptable(unhooked)
    assert pki.load_key_pem(pem, b"right").private_numbers() == ca.key.private_numbers()
    full = keywrap.kdf_of(keywrap.encrypt(ca.key, b"right", unhooked))
    assert str(full) == "scrypt N=16384 r=8 p=5" and full.acceptable(hooked)  # never lowered
    lower = keywrap.kdf_of(keywrap.encrypt(ca.key, b"x", {keywrap.TEST_KDF_N_ENV: "128"}))
    assert not lower.acceptable(hooked)  # (below the hook's N: weak under it too)

    layout = Layout(tmp_path)
    layout.ca_key.parent.mkdir()
    monkeypatch.setenv(keywrap.TEST_KDF_N_ENV, "256")
    pki.write_key(layout.ca_key, ca.key, b"right")
    assert keywrap.kdf_of(layout.ca_key.read_bytes()).n == 256
    before = layout.ca_key.read_bytes()
    assert upgrade_ca_key(layout, ca, b"right") is None  # the hook set: kept
    assert layout.ca_key.read_bytes() == before
    monkeypatch.delenv(keywrap.TEST_KDF_N_ENV)
    assert upgrade_ca_key(layout, ca, b"right") == "scrypt N=256 r=8 p=5"
    assert str(keywrap.kdf_of(layout.ca_key.read_bytes())) == "scrypt N=16384 r=8 p=5"
    assert stat.S_IMODE(layout.ca_key.stat().st_mode) == 0o600
    again = pki.read_key(layout.ca_key, b"right")
    assert again.private_numbers() == ca.key.private_numbers()
