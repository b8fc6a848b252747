"""The agent's certificate checks in a child process (``nodeagent.certwork``): the same answers
and the same errors as the in-process functions they run (``identity.load_identity``,
``pki.load_crl``), as plain values; a real child (``python -m nodeagent.certwork``) each time.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest

from nodeagent import certwork
from nodeagent.identity import CertificateExpired, load_identity, paths
from tests.test_renewal import _agent_config, _enrolled, _issue
from tlsroll import pki, spiffe
from tlsroll.errors import PKIError, PKIReason, UnsafePermissions


def test_an_identity_checked_in_a_child_is_the_one_checked_here(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    cfg = _agent_config(tmp_path, test_ca)
    assert certwork.load_identity(cfg) is None  # not enrolled yet
    _enrolled(cfg, test_ca)
    child, here = certwork.load_identity(cfg), load_identity(cfg)
    assert child is not None and here is not None
    assert (child.not_before, child.not_after) == (here.not_before, here.not_after)
    assert child.trust_domain == here.trust_domain == spiffe.trust_domain(test_ca.cert)
    assert child.trust_domain == spiffe.trust_domain_of_pin(cfg.ca_pin)
    assert child.cert == here.cert  # what renewal work parses later
    assert (child.key_file, child.cert_file, child.ca_file) == paths(cfg.data_dir)


def test_a_failed_check_is_the_same_error_with_the_same_message(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    cfg = _agent_config(tmp_path, test_ca)
    key_file, _ = _enrolled(cfg, test_ca)
    other = pki.CertificateAuthority.create("another CA")
    pki.write_cert(paths(cfg.data_dir)[2], other.cert)  # not the pinned CA
    with pytest.raises(PKIError) as here:
        load_identity(cfg)
    with pytest.raises(PKIError) as child:
        certwork.load_identity(cfg)
    assert child.value.reason is here.value.reason is PKIReason.PIN_MISMATCH
    assert str(child.value) == str(here.value)
    pki.write_cert(paths(cfg.data_dir)[2], test_ca.cert)
    os.chmod(key_file, 0o644)
    with pytest.raises(UnsafePermissions) as unsafe:
        certwork.load_identity(cfg)
    assert "chmod 600" in str(unsafe.value)


def test_a_revocation_list_is_read_and_checked_in_a_child(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    now = dt.datetime.now(dt.UTC)
    revoked = [(f"{12345:x}", now), (f"{1 << 150:x}", now)]
    crl = pki.crl_to_pem(pki.build_crl(test_ca, 7, revoked, now=now))
    ca_file = tmp_path / "ca.pem"
    pki.write_cert(ca_file, test_ca.cert)
    assert certwork.load_crl(crl, ca_file) == pki.load_crl(crl, test_ca.cert)
    assert certwork.load_crl(crl, ca_file) == (7, frozenset({12345, 1 << 150}))
    other = pki.CertificateAuthority.create("another CA")
    pki.write_cert(ca_file, other.cert)
    with pytest.raises(PKIError) as refused:
        certwork.load_crl(crl, ca_file)
    assert refused.value.reason is PKIReason.UNTRUSTED


def test_a_restart_with_the_files_a_child_checked_needs_no_child(
    tmp_path: Path, test_ca: pki.CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memo (``certwork.MEMO``) spares the child only while every byte the checks read is
    the same; the end date and the key file's permissions are checked without it."""
    cfg = _agent_config(tmp_path, test_ca)
    key_file, cert_file = _enrolled(cfg, test_ca)
    checked = certwork.load_identity(cfg)  # a child, which leaves the memo
    assert checked is not None and (cfg.data_dir / certwork.MEMO).exists()
    real_run = subprocess.run

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a child was started")

    monkeypatch.setattr(subprocess, "run", no_child)
    again = certwork.load_identity(cfg)
    assert again == checked and again is not None and again.cert == checked.cert
    with pytest.raises(CertificateExpired):
        certwork.load_identity(cfg, now=checked.not_after + dt.timedelta(seconds=1))
    os.chmod(key_file, 0o644)
    with pytest.raises(UnsafePermissions):
        certwork.load_identity(cfg)
    os.chmod(key_file, 0o600)
    # Another certificate (for another key): the memo no longer matches, a child checks.
    pki.write_cert(cert_file, _issue(test_ca, pki.generate_key(), cfg))
    with pytest.raises(AssertionError, match="a child was started"):
        certwork.load_identity(cfg)
    monkeypatch.setattr(subprocess, "run", real_run)
    with pytest.raises(PKIError) as mismatch:
        certwork.load_identity(cfg)
    assert mismatch.value.reason is PKIReason.KEY_MISMATCH
