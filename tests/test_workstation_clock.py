"""``tlsroll client test-connection`` on a PC whose clock is off (review s67 wsrev M1).

A server certificate that this PC's clock says is not valid yet (the PC's clock behind the
cluster's: on switch day the servers' certificates are hours old) or no longer valid (the
PC's clock ahead, or a certificate not renewed) was found only after the password exchange:
the password spent, a new client certificate signed (the leader superseding the one in
place), then "X's certificate: valid DATE to DATE", exit 10 ("not the cluster's node"), a
range that held the PC's own date and said nothing of its clock. It is found before the
password is asked, said with the PC's time, and nothing is sent.

The PC's clock is played by the certificates' dates: a real reference server serving a
certificate issued hours ahead (or one that has ended), the node's real bootstrap service.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests import test_workstation
from tests.conftest import IssuedCert, next_loopback
from tests.refserver_helper import RefServer
from tests.test_bootstrap import PASSWORD
from tests.test_workstation import APP, ServerNode, bootstrap_on, claim_of, recording
from tlsroll import pki
from workstation.connection import Exit
from workstation.settings_files import REPLACED

# test_workstation's fixtures, used here by name (its run of the command)
logs = test_workstation.logs
password_file = test_workstation.password_file
run_cli = test_workstation.run_cli


@asynccontextmanager
async def server_with(
    ca: pki.CertificateAuthority, root: Path, *, now: dt.datetime, days: int
) -> AsyncIterator[ServerNode]:
    """A switched reference server whose certificate was issued at ``now`` for ``days``."""
    address = next_loopback()
    pki_dir = root / "pki"
    pki_dir.mkdir(parents=True)
    key = pki.generate_key()
    cert = ca.issue(
        key.public_key(), pki.Names.of("node-a", [address]), validity_days=days, now=now
    )
    pki.write_key(pki_dir / "key.pem", key)
    pki.write_cert(pki_dir / "cert.pem", cert)
    (pki_dir / "ca.pem").write_bytes(ca.cert_pem)
    issued = IssuedCert(pki_dir / "cert.pem", pki_dir / "key.pem", pki_dir / "ca.pem", cert)
    server = RefServer(
        root / "server",
        address,
        app_path=APP,
        listen=["https"],
        cert_file=issued.cert_file,
        key_file=issued.key_file,
    )
    server.start()
    try:
        yield ServerNode(address, issued, server)
    finally:
        server.close()


NOW = dt.datetime.now(dt.UTC)


@pytest.mark.parametrize(
    ("issued", "days", "said"),
    [
        # This PC's clock 3 hours behind the cluster's (the certificate issued on switch day).
        (NOW + dt.timedelta(hours=3), 397, "is valid only from"),
        # This PC's clock ahead of the certificate's end (or the certificate not renewed).
        (NOW - dt.timedelta(days=40), 30, "ended on"),
    ],
    ids=["pc-behind", "pc-ahead"],
)
async def test_a_server_certificate_out_of_its_dates_by_this_pcs_clock_stops_before_the_password(
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
    issued: dt.datetime,
    days: int,
    said: str,
) -> None:
    csrs: list[bytes] = []
    async with (
        server_with(test_ca, tmp_path / "node", now=issued, days=days) as node,
        bootstrap_on(node, test_ca, sign=recording(test_ca, csrs)),
    ):
        run = await run_cli(node.url, "--password-file", password_file(PASSWORD), "--yes")
    assert run.code == Exit.TLS, run.err
    error = run.error
    assert f"{node.address}:8443's certificate {said} " in error, error
    assert "this PC's clock reads " in error and "UTC" in error, error
    assert error.endswith("nothing was sent"), error
    assert csrs == []  # no certificate signed
    # No password exchange was started: the bootstrap service saw no guess.
    assert "bootstrap.exchange_started" not in [e["event"] for e in run.logs]
    assert not (tmp_path / "settings").exists() or not any((tmp_path / "settings").iterdir())


def signing_ahead(
    ca: pki.CertificateAuthority, csrs: list[bytes], ahead: dt.timedelta
) -> Callable[[bytes], Any]:
    """The leader's signing, its clock ``ahead`` of this PC's (the CSRs kept)."""

    async def sign(csr_pem: bytes) -> bytes:
        csrs.append(csr_pem)
        csr = x509.load_pem_x509_csr(csr_pem)
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        now = dt.datetime.now(dt.UTC) + ahead
        cert = ca.issue(key, pki.names_of(csr), server=False, client=True, now=now)
        return pki.cert_to_pem(cert)

    return sign


async def test_a_pair_not_valid_yet_by_this_pcs_clock_still_names_and_proves_this_pc(
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Review s67 wsrev M2: the leader's clock 3 hours ahead of this PC's (the server's
    certificate old enough to pass), so the certificate a run enrolled starts, by this PC's
    clock, in 2 hours. The next run took that pair for none: not its name (the host name's
    asked for instead), no proof (the leader refuses a name held without one, "another PC",
    --replace), and another name's pair so set aside was dropped unkept. It counts as this
    PC's until it has ended."""
    csrs: list[bytes] = []
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    sign = signing_ahead(test_ca, csrs, dt.timedelta(hours=3))
    async with (
        server_with(test_ca, tmp_path / "node", now=NOW - dt.timedelta(days=2), days=90) as node,
        bootstrap_on(node, test_ca, sign=sign),
    ):
        first = await run_cli(node.url, "--password-file", pw, "--yes", "--name", "empfang")
        assert first.code == 0, first.err
        enrolled = pki.read_cert(d / "client.pem")
        assert enrolled.not_valid_before_utc > dt.datetime.now(dt.UTC)  # (as the PC sees it)
        again = await run_cli(node.url, "--password-file", pw, "--yes")
        assert again.code == 0, again.err
        claim = claim_of(csrs[-1])
        assert pki.names_of(x509.load_pem_x509_csr(csrs[-1])).common_name == "ws-empfang"
        assert claim.previous == pki.fingerprint(enrolled)
        # Another name now: the ws-empfang pair, valid at the leader, is kept aside.
        before = pki.read_cert(d / "client.pem")
        other = await run_cli(node.url, "--password-file", pw, "--yes", "--name", "labor")
        assert other.code == 0, other.err
    assert pki.names_of(pki.read_cert(d / "client.pem")).common_name == "ws-labor"
    assert pki.read_cert(d / REPLACED / "client.pem") == before, other.out
