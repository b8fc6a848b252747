"""The demo's scenario end to end (issue 4's "done when"): ``deploy/demo.py`` starts a leader
and three nodes as real processes on loopback addresses, keeps a client writing, rolls
enable-tls across the cluster and checks every node from outside; this test runs it on its own
addresses and checks its report independently."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import next_loopback
from tlsroll import pki

ROOT = Path(__file__).resolve().parent.parent


def run_demo(
    tmp_path: Path, *options: str, timeout: float
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``deploy/demo.py`` on three fresh loopback addresses; it must end ``VERDICT: OK``.
    Returns its output and the report it wrote."""
    report_file = tmp_path / "report.json"
    addresses = ",".join(next_loopback() for _ in range(3))
    where = ["--workdir", str(tmp_path / "work"), "--report", str(report_file)]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "deploy" / "demo.py"),
            *options,
            "--addresses",
            addresses,
            *where,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "VERDICT: OK" in result.stdout
    report: dict[str, Any] = json.loads(report_file.read_text())
    return result, report


def test_demo_switches_three_nodes_without_losing_a_write(tmp_path: Path) -> None:
    _, report = run_demo(tmp_path, timeout=240)
    ca = pki.load_cert_pem(report["ca_pem"].encode())

    rollout = report["schema"]["rollouts"][0]
    assert rollout["state"] == "completed"
    assert rollout["change"] == "enable-tls" and rollout["scope"] == "cluster"
    assert [n["name"] for n in rollout["nodes"]] == ["node2", "node3", "node1"]  # leader last
    for key in ("id", "epoch", "created_at", "started_at", "ended_at", "started_by", "strategy"):
        assert rollout[key], key

    total_acked = 0
    for node, check in zip(rollout["nodes"], report["checks"], strict=True):
        address = check["address"]
        assert node["state"] == "done"
        assert node["old_url"] == f"http://{address}:8080/praxis_live/"
        assert node["new_url"] == f"https://{address}:8443/praxis_live/"
        assert node["freeze_started_at"] < node["freeze_ended_at"]
        assert node["restart_seconds"] > 0
        assert check["problems"] == []  # https answers with the CA, 8080 closed, nothing missing

        cert = pki.load_cert_pem(check["certificate_pem"].encode())
        assert pki.issued_by(cert, ca)
        assert pki.fingerprint(cert) == node["cert_fingerprint"]
        assert address in pki.names_of(cert).ips
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in eku
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc) <= dt.timedelta(days=398)
        assert cert.not_valid_before_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
        assert cert.serial_number.bit_length() > 64
        assert not pki.is_ca(cert)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert check["tls_version"] in ("TLSv1.2", "TLSv1.3")

        acked = report["acked"].get(address, [])
        assert acked, f"no write was acknowledged on {address}"
        assert check["missing"] == []
        total_acked += len(acked)
    assert total_acked >= 30


@pytest.mark.timeout(480)
def test_demo_transitional_refuses_finalize_until_the_last_workstation_moved(
    tmp_path: Path,
) -> None:
    """``deploy/demo.py --strategy transitional`` (issue 12): two workstations per node, one
    moves after phase 1, one stays; finalize is refused naming the ones that stayed; they move;
    finalize closes http; nothing lost."""
    result, report = run_demo(tmp_path, "--strategy", "transitional", timeout=450)
    assert report["finalize_refused"] == {"exit": 1, "names_the_stayers": True}
    for name in ("ws-labor-1", "ws-labor-2", "ws-labor-3"):  # the ones that stayed, named
        assert name in result.stdout
    rollouts = report["schema"]["rollouts"]
    finalize, phase1 = rollouts[0], rollouts[1]
    assert (finalize["change"], finalize["state"]) == ("finalize", "completed")
    assert finalize["finalizes"] == phase1["id"]
    assert (phase1["strategy"], phase1["state"]) == ("transitional", "completed")
    assert {n["state"] for n in phase1["nodes"]} == {"dual"}
    for node, check in zip(finalize["nodes"], report["checks"], strict=True):
        assert node["state"] == "done"
        assert check["problems"] == []  # https with the CA's certificate, 8080 closed
        assert report["acked"][check["address"]] and check["missing"] == []
