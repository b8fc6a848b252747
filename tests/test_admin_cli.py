"""The admin CLI (``tlsroll``) against a real leader over its Unix socket: tokens, the CA pin,
nodes, one-line errors with the right exit codes, and no Admin service on any TCP port."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from leader.cli import cluster_cmd
from leader.cli.cluster_cmd import short_serial_digits
from leader.tokens import SECRET_ALPHABET
from tests.cluster import (
    CLI_TIMEOUT,
    AdminTokenCluster,
    Cluster,
    child_env,
    command,
    enrol,
    enrol_request,
    one_line_error,
)
from tests.conftest import next_loopback
from tlsroll import __version__, keywrap, pki
from tlsroll.cli import main
from tlsroll.v1 import admin_pb2, admin_pb2_grpc

TOKEN = re.compile(r"^([a-z0-9]{6})\.([a-z2-7]{26})$")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # tokens only to enrol nodes come over the admin socket; the command is what the token
    # tests run (``cli``, ``Cluster.create_token``)
    with AdminTokenCluster(tmp_path_factory.mktemp("cli"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def cli_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The CLI failed with ``code`` and said so in one line on stderr, nothing on stdout."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    line = one_line_error(result.stderr, "tlsroll")
    assert line.startswith("tlsroll: error: ")
    return line


def tokens_json(cluster: Cluster) -> dict[str, dict[str, object]]:
    result = cluster.cli("token", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {t["id"]: t for t in json.loads(result.stdout)}


# --- tokens -----------------------------------------------------------------------------------


def test_token_create_list_revoke(cluster: Cluster) -> None:
    address = next_loopback()
    result = cluster.cli(
        *("token", "create", "--node", "n7", "--address", address),
        *("--ttl", "30m", "--uses", "1", "--description", "n7"),  # a script's --uses 1 works
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the hint goes to a terminal only
    m = TOKEN.match(result.stdout.strip())
    assert m is not None, result.stdout
    cluster.tokens.append(m.group(0))
    token_id = m.group(1)

    info = tokens_json(cluster)[token_id]
    assert info["uses_allowed"] == 1
    assert info["uses_left"] == 1
    assert info["revoked"] is False
    assert info["description"] == "n7"
    assert (info["node_name"], info["addresses"]) == ("n7", [address])
    listed = cluster.cli("token", "list")
    assert listed.returncode == 0
    (row,) = [line for line in listed.stdout.splitlines() if token_id in line]
    assert "1/1" in row and "valid" in row

    revoked = cluster.cli("token", "revoke", m.group(0))  # the whole token is accepted too
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == f"revoked token {token_id}"
    assert tokens_json(cluster)[token_id]["revoked"] is True
    (row,) = [line for line in cluster.cli("token", "list").stdout.splitlines() if token_id in line]
    assert "revoked" in row
    assert cluster.find_secrets(revoked.stdout + revoked.stderr + cluster.logs_text()) == []


def test_token_secret_is_random_and_only_its_hash_is_stored(cluster: Cluster) -> None:
    first = Cluster.create_token(cluster, "first-a", next_loopback())  # what the command printed
    second = Cluster.create_token(cluster, "second-a", next_loopback())
    secrets = []
    for token in (first, second):
        m = TOKEN.match(token)
        assert m is not None
        secret = m.group(2)
        assert set(secret) <= set(SECRET_ALPHABET)
        assert len(secret) * 5 >= 128  # base32: 5 bits a character
        secrets.append(secret)
        rows = cluster.store_rows(("tokens",))["tokens"]
        (row,) = [r for r in rows if r[0] == m.group(1)]
        assert hashlib.sha256(secret.encode()).hexdigest() in row
    assert secrets[0] != secrets[1]
    # Not in any row, and not in the bytes of the store files (WAL included).
    everything = cluster.store_rows(("tokens", "nodes", "audit"))
    assert not any(s in repr(everything) for s in secrets)
    for path in cluster.data_dir.glob("leader.sqlite3*"):
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secrets), path.name
    assert cluster.find_secrets(cluster.logs_text()) == []


def test_revoke_unknown_token_is_one_line_exit_1(cluster: Cluster) -> None:
    before = cluster.store_rows()
    line = cli_error(cluster.cli("token", "revoke", "zzzzzz"), 1)
    assert "no join token with id 'zzzzzz'" in line
    assert cluster.store_rows() == before


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--ttl", "0s"], 2, "Invalid value for --ttl: '0s': give more than 0"),
        (["--ttl", "soon"], 2, "use a number with s, m, h or d"),
        (["--uses", "0"], 2, "--uses"),
        (["--uses", "many"], 2, "--uses"),
        # A second use could never enrol (the node's enrolment supersedes the token): no
        # token that promises it is made (s44).
        (["--uses", "2"], 2, "--uses: 2: a token enrols its node once"),
        (["--uses", "1000"], 2, "--uses: 1000: a token enrols its node once"),
        (["--ttl", "8d"], 2, "at most 7 days"),  # the leader's INVALID_ARGUMENT: usage
        (["--ttl", "99999999999d"], 2, "too long"),  # over a uint32: was a traceback
    ],
)
def test_token_create_bad_values(cluster: Cluster, args: list[str], code: int, says: str) -> None:
    before = cluster.store_rows()
    node = ("--node", "bad-values", "--address", next_loopback())
    line = cli_error(cluster.cli("token", "create", *node, *args), code)
    assert says in line
    assert cluster.store_rows() == before


def test_token_create_takes_dns_names_as_init_does(cluster: Cluster) -> None:
    """Review s67 L: ``init`` took ``--dns Leader.Example.`` as ``leader.example`` (DNS names
    are case-insensitive; a final dot is the FQDN form) and ``token create`` refused both
    forms. Now the token holds them as the certificate will (as ``token list`` shows them);
    two final dots and a non-ASCII letter that lowers to ASCII (the Kelvin sign) are still
    refused, by both commands, and make nothing."""
    address = next_loopback()
    result = cluster.cli(
        *("token", "create", "--node", "dotted", "--address", address),
        *("--dns", "Host.Example.com", "--dns", "other.example."),
    )
    assert result.returncode == 0, result.stderr
    m = TOKEN.match(result.stdout.strip())
    assert m is not None, result.stdout
    cluster.tokens.append(m.group(0))
    token_id = m.group(1)
    assert tokens_json(cluster)[token_id]["dns_names"] == ["host.example.com", "other.example"]
    cluster.cli("token", "revoke", token_id)
    for bad in ("two.dots..", "\u212aelvin.example"):
        before = cluster.store_rows()
        node = ("--node", "dotted", "--address", next_loopback())
        line = cli_error(cluster.cli("token", "create", *node, "--dns", bad), 2)
        assert "is not a DNS host name" in line
        assert cluster.store_rows() == before
        with Cluster(cluster.root / f"init-{len(bad)}", next_loopback()) as fresh:
            args = ["--data-dir", str(fresh.data_dir), "--address", fresh.address, "--dns", bad]
            line = cli_error(fresh.cli("init", *args), 2)
            assert "--dns" in line and "is not a DNS host name" in line
            assert not fresh.data_dir.exists()


# --- the CA -----------------------------------------------------------------------------------


def test_ca_show_pin_is_the_sha256_of_the_ca_spki(cluster: Cluster) -> None:
    cert = pki.read_cert(cluster.ca_cert_path)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pin = "sha256:" + hashlib.sha256(spki).hexdigest()
    der = cert.public_bytes(serialization.Encoding.DER)
    fingerprint = "sha256:" + hashlib.sha256(der).hexdigest()

    result = cluster.cli("ca", "show")
    assert result.returncode == 0, result.stderr
    head, _, bundle = result.stdout.partition("trust bundle")
    fields = dict(line.split(None, 1) for line in head.splitlines())
    assert fields["pin"] == pin
    assert fields["fingerprint"] == fingerprint
    assert "tlsroll multiserver CA" in fields["subject"]
    # Residual time (about 10 years) and the trust bundle: the CA alone, issuing.
    assert re.fullmatch(r"36[45]\dd \d+h", fields["residual"]), fields["residual"]
    (member,) = [ln.split() for ln in bundle.splitlines() if fingerprint in ln]
    assert member[0] == "issuing", member

    as_json = cluster.cli("ca", "show", "--json")
    data = json.loads(as_json.stdout)
    assert data["spki_pin"] == pin
    assert data["certificate_pem"].encode() == cluster.ca_pem
    assert data["bundle_pem"].encode() == cluster.ca_pem
    (entry,) = data["bundle"]
    assert entry["fingerprint"] == fingerprint and entry["issuing"] is True
    assert 3640 * 86400 < int(data["residual_seconds"]) <= 3650 * 86400
    assert "PRIVATE" not in result.stdout + as_json.stdout


def test_init_prints_the_pin_and_refuses_to_overwrite(tmp_path: Path) -> None:
    with Cluster(tmp_path, next_loopback()) as fresh:
        # The tests' scrypt hook (conftest's TLSROLL_TEST_KDF_N) set wrong: refused, nothing
        # made; set, said on stderr once the key is written (session 74).
        args = ["init", "--data-dir", str(fresh.data_dir), "--address", fresh.address]
        line = cli_error(fresh.cli(*args, env={keywrap.TEST_KDF_N_ENV: "1000"}), 2)
        assert "TLSROLL_TEST_KDF_N (tests only) must be a power of 2 from 2 to 8192" in line
        assert not fresh.data_dir.exists()
        result = fresh.init()
        assert fresh.ca_pin() in result.stdout
        assert result.stderr.startswith(
            "tlsroll: warning: TLSROLL_TEST_KDF_N=256 is set (tests only): the CA key is"
            " written under scrypt N=256, not N=16384"
        ), result.stderr
        before = {p: p.read_bytes() for p in fresh.data_dir.rglob("*") if p.is_file()}
        line = cli_error(
            fresh.cli("init", "--data-dir", str(fresh.data_dir), "--address", fresh.address), 1
        )
        assert "already initialised" in line
        after = {p: p.read_bytes() for p in fresh.data_dir.rglob("*") if p.is_file()}
        assert after == before
        # Without the hook (unset: empty), init writes the key at full strength and says
        # nothing of it (review of s74 revfront, L1: the suite's inits all run with it).
        full = tmp_path / "full"
        result = fresh.cli(
            "init", "--data-dir", str(full), "--address", fresh.address,
            env={keywrap.TEST_KDF_N_ENV: ""},
        )  # fmt: skip
        assert result.returncode == 0 and "TLSROLL_TEST_KDF_N" not in result.stderr, result
        kdf = keywrap.kdf_of((full / "ca" / "ca.key").read_bytes())
        assert (kdf.name, kdf.n) == ("scrypt", keywrap.SCRYPT_N) and kdf.strong, kdf


def test_two_inits_at_once_on_one_data_directory_leave_one_cluster(tmp_path: Path) -> None:
    """Audit s39race M5: two `tlsroll init` at once on one data directory both succeeded, each
    printing the pin of its own CA; half the time ca.key was left encrypted with the other's
    passphrase (the leader then refused to start: "wrong passphrase"). Now one init at a time:
    of two real processes started together one makes the cluster, the other exits 1 in one
    line ("another tlsroll init is running", or "already initialised" if the first had ended),
    and what is left is one consistent cluster whose pin is the one printed."""
    for round_ in range(3):
        with Cluster(tmp_path / f"round{round_}", next_loopback()) as fresh:
            args = ["init", "--data-dir", str(fresh.data_dir), "--address", fresh.address]
            inits = [
                subprocess.Popen(
                    [*command("tlsroll", "tlsroll"), *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=child_env(),
                )
                for _ in range(2)
            ]
            results = []
            for p in inits:
                out, err = p.communicate(timeout=CLI_TIMEOUT)
                results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
            made = [r for r in results if r.returncode == 0]
            assert len(made) == 1, [(r.returncode, r.stderr) for r in results]
            [refused] = [r for r in results if r.returncode != 0]
            line = cli_error(refused, 1)
            assert (
                f"another tlsroll init is running on {fresh.data_dir}" in line
                or "already initialised" in line
            ), line
            assert fresh.ca_pin() in made[0].stdout
            passphrase = (fresh.data_dir / "secrets" / "ca.passphrase").read_bytes().strip()
            key = pki.read_key(fresh.data_dir / "ca" / "ca.key", passphrase)
            assert pki.key_matches(pki.read_cert(fresh.ca_cert_path), key)
            assert not (fresh.data_dir / "init.lock").exists()


def test_init_ends_with_how_to_start_the_leader_as_commands_that_work_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s45rt2 M6: ``tlsroll init`` ended with "tlsroll-leader --config …", which is
    not on PATH on an installed server (only ``tlsroll`` is). It names the daemon beside the
    interpreter (``/opt/tlsroll/bin`` there); for the unit's data dir the unit comes first and
    the daemon by hand runs as the data dir's owner, the unit's user."""
    daemon = Path(sys.executable).parent / "tlsroll-leader"
    assert daemon.exists()  # the console script the line names (the venv's, here)
    with Cluster(tmp_path / "c", next_loopback()) as fresh:
        result = fresh.init()
        assert result.stdout.splitlines()[-1] == (
            f"start the leader:  {daemon} --config {fresh.data_dir / 'leader.toml'}"
        ), result.stdout
    # The unit's data dir (/var/lib/tlsroll, here a stand-in): the unit, after ca-credential;
    # no "by hand" line, which fails once the passphrase is a systemd credential (review s45rev2
    # M2: "no CA passphrase: /run/tlsroll/ca-passphrase does not exist").
    unit_dir = tmp_path / "var-lib-tlsroll"
    unit_dir.mkdir()
    monkeypatch.setattr(cluster_cmd, "DEFAULT_DATA_DIR", unit_dir.resolve())
    lines = cluster_cmd.start_lines(unit_dir, unit_dir / "leader.toml")
    assert lines[0].startswith("start the leader:  systemctl enable --now tlsroll-leader"), lines
    assert "install.sh ca-credential" in lines[1], lines
    assert not any("by hand" in line or "tlsroll-leader --config" in line for line in lines)
    # Elsewhere with no daemon beside the interpreter (pip install --user: review s45rev2 L6):
    # the one on PATH, else its bare name, never a path that does not exist.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "nowhere" / "python3"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cluster_cmd.start_lines(tmp_path / "d", tmp_path / "d" / "leader.toml") == [
        f"start the leader:  tlsroll-leader --config {tmp_path / 'd' / 'leader.toml'}"
    ]


def test_an_init_refuses_while_another_holds_the_directory(tmp_path: Path) -> None:
    """The lock two inits race for (``leader.layout``), held here as a running init holds it:
    the init exits 1 in one line and makes nothing; a lock file an init killed left behind
    (no one holds it) is no obstacle."""
    with Cluster(tmp_path, next_loopback()) as fresh:
        args = ["init", "--data-dir", str(fresh.data_dir), "--address", fresh.address]
        fresh.data_dir.mkdir(mode=0o750)
        lock = fresh.data_dir / "init.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            line = cli_error(fresh.cli(*args), 1)
            assert line == (
                f"tlsroll: error: another tlsroll init is running on {fresh.data_dir}; let it end"
            )
            assert sorted(p.name for p in fresh.data_dir.iterdir()) == ["init.lock"]
        finally:
            os.close(fd)  # as a killed init's: the file stays, nobody holds it
        result = fresh.cli(*args)
        assert result.returncode == 0, result.stderr
        assert fresh.ca_pin() in result.stdout
        assert not lock.exists()


def test_init_with_a_bad_address_is_a_usage_error(tmp_path: Path) -> None:
    with Cluster(tmp_path, next_loopback()) as fresh:
        line = cli_error(
            fresh.cli("init", "--data-dir", str(fresh.data_dir), "--address", "1.2.3"), 2
        )
        assert "--address" in line
        assert not fresh.data_dir.exists()


@pytest.mark.parametrize(
    ("args", "option", "says"),
    [
        (["--address", "0.0.0.0"], "--address", "is not the address of one host"),  # noqa: S104
        (["--address", "::"], "--address", "is not the address of one host"),
        (["--address", "224.0.0.1"], "--address", "is not the address of one host"),
        (["--address", "169.254.1.1"], "--address", "is not the address of one host"),
        (["--address", "255.255.255.255"], "--address", "names every host"),
        (["--address", "127.0.0.1"], "--address", "names every host"),
        (["--address", "::1"], "--address", "names every host"),
        (["--dns", "bad name!"], "--dns", "is not a DNS host name"),
        (["--dns", "ünï.example"], "--dns", "is not a DNS host name"),
        (["--dns", "a" * 300], "--dns", "is not a DNS host name"),
        (["--dns", "*.example"], "--dns", "wildcard"),
        (["--dns", "localhost"], "--dns", "names every host"),
    ],
    ids=lambda a: a if isinstance(a, str) else " ".join(x[:20] for x in a),
)
def test_init_refuses_names_the_ca_refuses_for_nodes(
    tmp_path: Path, args: list[str], option: str, says: str
) -> None:
    """Audit s34 M1 and L4: init took addresses and DNS names that ``token create`` refuses
    (the leader binds to its address: 0.0.0.0 opened its ports on every interface), and blamed
    a bad --dns on --address. Refused with one line naming the option, before anything is
    made. (Loopback addresses other than 127.0.0.1 stay allowed: tests run leaders there.)"""
    with Cluster(tmp_path, next_loopback()) as fresh:
        given = args if args[0] == "--address" else ["--address", fresh.address, *args]
        line = cli_error(fresh.cli("init", "--data-dir", str(fresh.data_dir), *given), 2)
        assert option in line and says in line
        assert "A-label" not in line
        assert not fresh.data_dir.exists()


def test_init_checks_its_passphrase_file_before_it_makes_anything(tmp_path: Path) -> None:
    """Audit s34 L5: a passphrase file others can read was refused after init had made the
    data directory's subdirectories. Now nothing is made; with the file fixed, init runs, and a
    DNS name is taken as the certificate holds it (lowercase, no final dot)."""
    with Cluster(tmp_path, next_loopback()) as fresh:
        passphrase = tmp_path / "passphrase"
        passphrase.write_text("correct horse battery staple\n")
        passphrase.chmod(0o644)
        args = ["init", "--data-dir", str(fresh.data_dir), "--address", fresh.address]
        args += ["--dns", "Leader.Example.", "--ca-passphrase-file", str(passphrase)]
        line = cli_error(fresh.cli(*args), 1)
        assert "chmod 600" in line
        assert not fresh.data_dir.exists()
        passphrase.chmod(0o600)
        result = fresh.cli(*args)
        assert result.returncode == 0, result.stderr
        config = tomllib.loads((fresh.data_dir / "leader.toml").read_text())
        assert config["leader"]["dns_names"] == ["leader.example"]


@pytest.mark.parametrize("below", ["", "sub"])
def test_init_on_a_symbolic_link_loop_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], below: str
) -> None:
    """Session 74's closing read (L4): ``init --data-dir`` on a symbolic link loop (or below
    one) was "internal error: RuntimeError" (Python 3.11's ``Path.resolve`` raises that on a
    loop): one line naming the path now, exit 1, nothing made (``tlsroll.fsutil.real_path``)."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    given = loop / below if below else loop
    args = ["init", "--data-dir", str(given), "--address", next_loopback()]
    assert main([*args, "--node-name", "n1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err == f"tlsroll: error: Too many levels of symbolic links: {given}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


# --- nodes ------------------------------------------------------------------------------------


def test_nodes_lists_an_enrolled_node(cluster: Cluster) -> None:
    address = next_loopback()
    reply = enrol(
        cluster, enrol_request(cluster.create_token("listed", address), "listed", address)
    )
    cert = pki.load_cert_pem(reply.certificate_pem)
    result = cluster.cli("nodes", "--json")
    assert result.returncode == 0, result.stderr
    (node,) = [n for n in json.loads(result.stdout) if n["name"] == "listed"]
    assert node["addresses"] == [address]
    assert node["agent_version"] == __version__
    assert node["cert_fingerprint"] == pki.fingerprint(cert)
    assert node["cert_not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert node["online"] is False  # enrolled, but it never sent a heartbeat
    table = cluster.cli("nodes").stdout
    (row,) = [line for line in table.splitlines() if "listed" in line]
    assert address in row and "offline" in row


# --- revocation by serial ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "serial", "says"),
    [
        (["ca", "revoke"], "0", "not a serial this CA can have issued"),
        (["ca", "revoke", "--unknown"], "000", "not a serial this CA can have issued"),
        (["ca", "revoke", "--unknown"], "f" * 40, "not a serial this CA can have issued"),
        (["ca", "revoke", "--unknown"], "8" + "0" * 39, "not a serial this CA can have issued"),
        (["workstations", "revoke"], "0", "not a serial this CA can have issued"),
        (["ca", "revoke"], "12", "no certificate with serial 12 is on record"),
        (["workstations", "revoke"], "5eed", "no certificate with serial 5eed is on record"),
    ],
)
def test_revoking_a_serial_no_certificate_has_is_one_line(
    cluster: Cluster, command: list[str], serial: str, says: str
) -> None:
    """Audit s34 H1 and H3: serial 0 or one of 2^159 and above made every revocation list fail
    to sign (every heartbeat INTERNAL, for good); a serial the store has no record of (mistyped
    or cut short) was "revoked" with exit 0 while the real certificate stayed valid. Both are
    refused with one line, and nothing is recorded."""
    before = cluster.store_rows(("certificates", "meta"))
    # A serial no certificate can have is a bad value (exit 2), one not on record a failure
    # (exit 1), review s47rtin L6.
    code = 1 if "on record" in says else 2
    line = cli_error(cluster.cli(*command, serial, "--reason", "test"), code)
    assert says in line
    if "on record" in says:
        assert "tlsroll certs check-expiration" in line and "--unknown" in line
    assert cluster.store_rows(("certificates", "meta")) == before


def test_a_cut_short_serial_is_refused_and_the_full_one_or_unknown_revokes(
    cluster: Cluster,
) -> None:
    """Audit s34 H3: the first 12 digits of a node's serial revoke nothing; the serial in full
    revokes that node's certificate; ``--unknown`` records and revokes a serial the store does
    not know (a certificate issued before the store was rebuilt)."""
    address = next_loopback()
    reply = enrol(
        cluster, enrol_request(cluster.create_token("cutshort", address), "cutshort", address)
    )
    serial = f"{pki.load_cert_pem(reply.certificate_pem).serial_number:x}"
    before = cluster.store_rows(("certificates", "meta"))
    line = cli_error(cluster.cli("ca", "revoke", serial[:12]), 1)
    assert f"no certificate with serial {serial[:12]} is on record" in line
    assert cluster.store_rows(("certificates", "meta")) == before
    assert cluster.list_nodes()["cutshort"].cert_serial == serial
    result = cluster.cli("ca", "revoke", serial.upper())
    assert (result.returncode, result.stdout.strip()) == (0, f"revoked {serial}"), result.stderr
    (row,) = [r for r in cluster.store_table("certificates") if r["serial"] == serial]
    assert row["kind"] == "node" and row["revoked_at"]
    result = cluster.cli("ca", "revoke", "--unknown", "00c0ffee", "--reason", "rebuilt store")
    assert (result.returncode, result.stdout.strip()) == (0, "revoked c0ffee"), result.stderr
    assert "00c0ffee has 6 hex digits" in result.stderr  # did the admin cut it short?
    (row,) = [r for r in cluster.store_table("certificates") if r["serial"] == "c0ffee"]
    assert row["kind"] == "other" and row["revoked_at"]
    again = cli_error(cluster.cli("ca", "revoke", "--unknown", "c0ffee"), 1)
    assert "no unrevoked certificate matches" in again


@pytest.mark.parametrize(
    ("given", "digits"),
    [("00c0ffee", 6), (" C0FFEE ", 6), ("f" * 32, None), ("ws-foo", None), ("ws-abcdef", None)],
)
def test_the_cut_short_warning_is_for_serials_only(given: str, digits: int | None) -> None:
    """`ca revoke --unknown ws-foo` revokes by name: no "ws-foo has 6 hex digits" warning
    (review 1 of s34, nit); a short hex serial still gets it."""
    assert short_serial_digits(given) == digits


# --- the admin socket -------------------------------------------------------------------------


def test_admin_socket_is_private(cluster: Cluster) -> None:
    run_dir = cluster.admin_socket.parent
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o750
    st = cluster.admin_socket.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0
    assert stat.S_IMODE(cluster.data_dir.stat().st_mode) & 0o007 == 0


@pytest.mark.parametrize("port", ["join", "control"])
def test_admin_service_is_not_served_over_tcp(cluster: Cluster, port: str) -> None:
    key = pki.generate_key()
    address = next_loopback()
    token = cluster.create_token(f"nosy-{port}", address)
    reply = enrol(cluster, enrol_request(token, f"nosy-{port}", address, key=key))
    if port == "join":
        channel = cluster.join_channel()
    else:
        channel = cluster.control_channel(reply.certificate_pem, pki.key_to_pem(key))
    before = cluster.store_rows()
    with channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for call, request in [
            (admin.ListNodes, admin_pb2.ListNodesRequest()),
            (admin.CreateToken, admin_pb2.CreateTokenRequest(uses=1)),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=5)  # type: ignore[operator]
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert cluster.store_rows() == before


# --- without a leader -------------------------------------------------------------------------


def test_cli_without_a_leader_is_one_line_exit_1(tmp_path: Path) -> None:
    with Cluster(tmp_path, next_loopback()) as idle:
        idle.init()
        for args in (
            ["nodes"],
            ["token", "create", "--node=n", "--address=127.0.0.2"],
            ["ca", "show"],
            ["schema", "show"],  # without grpcio (leader.cli.unary)
        ):
            line = cli_error(idle.cli(*args), 1)
            assert "is tlsroll-leader running?" in line
        line = cli_error(idle.cli("--data-dir", str(tmp_path / "nowhere"), "token", "list"), 1)
        assert str(tmp_path / "nowhere") in line


def test_cli_on_a_machine_without_a_leader_says_to_run_it_on_the_leader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Session 71 walkthrough: `tlsroll nodes` on an agent's node (no /var/lib/tlsroll there)
    asked "is tlsroll-leader running?", as if one should be started there. No data dir: one
    line saying that no leader is on this machine and to run tlsroll on the leader node."""
    data = tmp_path / "var-lib-tlsroll"
    for args in (["nodes"], ["schema", "show"]):
        assert main(["--data-dir", str(data), *args]) == 1
        err = capsys.readouterr().err
        assert err == (
            f"tlsroll: error: no admin socket at {data}/run/admin.sock: {data} does not exist: "
            "no leader on this machine; run tlsroll on the leader node (see --data-dir/--socket)\n"
        )
    data.mkdir()  # a leader's data dir whose leader is not running: that question stays
    assert main(["--data-dir", str(data), "nodes"]) == 1
    assert "is tlsroll-leader running?" in capsys.readouterr().err


def test_disable_tls_as_a_change_names_the_way_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Session 71 walkthrough: README calls the way back "a `disable-tls` rollout" and `notify
    --change disable-tls` announces it, so an admin tries `rollout start --change disable-tls`;
    it said only "not one of 'enable-tls', …". A usage error naming `tlsroll rollout
    rollback`, before the leader is asked (none runs here)."""
    data = ["--data-dir", str(tmp_path)]
    for args in (["rollout", "start", "--scope", "cluster"], ["plan", "--scope", "cluster"]):
        assert main([*data, *args, "--change", "disable-tls"]) == 2
        err = capsys.readouterr().err
        assert err == (
            "tlsroll: error: Invalid value for '--change': the way back to http (disable-tls) "
            "is `tlsroll rollout rollback`, which shows its plan and asks; it is no --change "
            f"here (see: tlsroll {' '.join(args[:-2])} --help)\n"
        )
    assert main([*data, "plan", "--change", "bogus"]) == 2
    assert "'bogus' is not one of 'enable-tls'" in capsys.readouterr().err


def test_cli_with_an_admin_socket_path_that_cannot_be_one_says_which(tmp_path: Path) -> None:
    """Session 50: a --socket or --data-dir with a file on its way, or a loop of symbolic links,
    said only the system's words ("Not a directory: …"), not that there is no admin socket
    there nor what to check. One line naming the socket and the file in the way, exit 1."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for args, where in (
        (["--socket", str(afile / "admin.sock")], afile / "admin.sock"),
        (["--data-dir", str(afile)], afile / "run" / "admin.sock"),
        (["--socket", str(loop)], loop),
    ):
        for command_args in (["nodes"], ["schema", "show"]):
            result = subprocess.run(
                [*command("tlsroll", "tlsroll"), *args, *command_args],
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT,
                env=child_env(None),
                check=False,
            )
            line = cli_error(result, 1)
            assert line.startswith(f"tlsroll: error: no admin socket at {where}: "), line
            assert "--data-dir/--socket" in line, line
            if loop == where:
                assert "symbolic links" in line, line
            else:
                assert f"{afile} is not a directory" in line, line


def test_cli_with_a_crashed_leader_then_a_restart(tmp_path: Path) -> None:
    with Cluster(tmp_path, next_loopback()) as c:
        c.init()
        c.start_leader()
        c.kill_leader()  # SIGKILL: the socket file stays behind
        assert c.admin_socket.exists()
        line = cli_error(c.cli("token", "list"), 1)
        assert "cannot reach the leader" in line
        line = cli_error(c.cli("schema", "show", "--json"), 1)
        assert "cannot reach the leader" in line
        c.start_leader()  # a stale socket from a crash does not stop the next start
        result = c.cli("token", "list", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["token"],
        ["ca"],
        ["token", "revoke"],
        ["nodes", "--bogus"],
        ["init", "--address", "127.0.0.1"],
        # Tracebacks before (audit s34 M2): a duration over a uint32 of seconds, and a time
        # whose conversion or end leaves the calendar.
        ["viewer", "grant", "--ttl", "99999999999d"],
        ["rollout", "finalize", "r1", "--when-quiet", "99999999999d", "--yes"],
        ["notify", "--when", "0001-01-01 00:00", "--duration", "1h", "--timezone", "Asia/Tokyo"],
        ["notify", "--when", "9999-12-31 23:59", "--duration", "1h", "--timezone", "UTC"],
        # The leader's JSON reader refused it as "not a GetSchemaRequest" (audit s34 L2).
        ["schema", "show", "--rollout", "a" * 20000],
    ],
    ids=lambda a: " ".join(a)[:60] or "no-args",
)
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = subprocess.run(
        [*command("tlsroll", "tlsroll"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TLSROLL_DATA_DIR": str(tmp_path)},
        check=False,
    )
    line = cli_error(result, 2)
    assert "--help" in line


def test_cli_version() -> None:
    result = subprocess.run(
        [*command("tlsroll", "tlsroll"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"tlsroll, version {__version__}"
