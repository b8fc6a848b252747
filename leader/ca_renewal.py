"""``tlsroll ca renew``: the cluster CA's certificate renewed with the same key, while the
leader runs (docs/ca-renewal.md, "renewal with the same key").

    detail = renew(layout, ca, now)   # blocking; in ``Store.renew_ca``'s transaction

The leader holds the CA key (unlocked at its start with the passphrase), so no passphrase is
asked. The new certificate (``pki.CertificateAuthority.renewed_cert``: CA1's subject, key,
key identifier and extensions, ``pathLenConstraint`` 0 included, a new serial, valid
``pki.CA_VALIDITY_DAYS`` from now) keeps the pin and the trust domain, and every certificate
CA1 issued chains to it unchanged. The previous certificate is kept beside it
(``DATA/ca/ca.pem.until-YYYY-MM-DD``, its end), the new one written in one rename (0644: a
certificate), the key left as it is. ``ca.adopt`` then makes the leader issue with it: every
part of the leader holds the same ``CertificateAuthority``, so its leaves are no longer cut to
the old end, the expiry watch sees the new end, a rollout stages the new certificate, and
``RenewNodeCertificate`` hands it to the agents.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509

from leader.layout import Layout
from tlsroll import pki
from tlsroll.fsutil import PUBLIC, write_atomic


def kept_path(layout: Layout, old: x509.Certificate) -> Path:
    """Where the certificate a renewal replaced is kept: beside it, named by its end."""
    return layout.ca_cert.with_name(f"ca.pem.until-{old.not_valid_after_utc:%Y-%m-%d}")


def renew(layout: Layout, ca: pki.CertificateAuthority, now: dt.datetime) -> dict[str, Any]:
    """Renew ``ca``'s certificate (see the module docstring); what the audit trail keeps."""
    old = ca.cert
    new = ca.renewed_cert(now)
    kept = kept_path(layout, old)
    write_atomic(kept, layout.ca_cert.read_bytes(), PUBLIC)
    write_atomic(layout.ca_cert, pki.cert_to_pem(new), PUBLIC)
    ca.adopt(new)
    return {
        "pin": pki.spki_pin(new),
        "serial": f"{new.serial_number:x}",
        "fingerprint": pki.fingerprint(new),
        "not_after": new.not_valid_after_utc.isoformat(timespec="seconds"),
        "previous_serial": f"{old.serial_number:x}",
        "previous_not_after": old.not_valid_after_utc.isoformat(timespec="seconds"),
        "previous_kept": str(kept),
    }
