"""The web viewer's serving certificate: issued by the cluster CA for the leader's address.

A workstation that has done the bootstrap trusts the cluster CA, so it opens the viewer
without a warning. The certificate is the viewer's own (serverAuth only, its own key 0600 in
``DATA/tls/viewer.key``), not the leader's: the leader's certificate is also its client identity
towards the agents, and a browser-facing listener has no need for that. The daemon calls
``ensure`` at start (and with every check of the expiry watch): it issues a new certificate
when there is none, when it is due (within ``leader.layout.own_renew_before`` of its end, as
the leader's own: at least 30 days, and ahead of the watch's warning for a longer
``expiry_warning_days``; unless it ends with the CA, which no new one would outlive), when the
names changed, when it is not from this CA or when it is not valid yet, and (for a new key) when
the admin revoked it (``tlsroll ca revoke``: the leader calls ``Viewer.renew_if_due`` right
after; before, it served the revoked one until its end).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from cryptography import x509

from leader.layout import DEFAULT_WARNING, Layout, own_renew_before
from tlsroll import logs, pki
from tlsroll.defaults import LEADER_NAME
from tlsroll.errors import PKIError
from tlsroll.fsutil import write_atomic

log = logs.get_logger(__name__)


def _usable(
    layout: Layout,
    ca: pki.CertificateAuthority,
    names: pki.Names,
    now: dt.datetime,
    warning: dt.timedelta,
    revoked: Callable[[str], bool],
) -> x509.Certificate | None:
    """The certificate on disk, if it can be served as it is."""
    if not (layout.viewer_cert.exists() and layout.viewer_key.exists()):
        return None
    try:
        cert = pki.load_certs_pem(layout.viewer_cert.read_bytes())[0]
        key = pki.read_key(layout.viewer_key)
    except (PKIError, IndexError):
        return None
    if (
        not pki.key_matches(cert, key)
        or not pki.issued_by(cert, ca.cert)
        or pki.names_of(cert) != names
        or pki.not_valid_yet(cert, ca.cert, now)  # (a clock that ran ahead issued it)
        # Due, unless it ends with the CA: a new one would end no later (``pki.ends_with_ca``).
        or (
            cert.not_valid_after_utc - now < own_renew_before(warning)
            and not pki.ends_with_ca(cert, ca.cert)
        )
    ):
        return None
    if revoked(serial := f"{cert.serial_number:x}"):
        log.warning(
            "viewer.certificate_revoked",
            serial=serial,
            detail="the viewer's certificate was revoked: issued again for a new key",
        )
        return None
    return cert


def ensure(
    layout: Layout,
    ca: pki.CertificateAuthority,
    address: str,
    dns_names: tuple[str, ...],
    now: dt.datetime,
    warning: dt.timedelta = DEFAULT_WARNING,
    revoked: Callable[[str], bool] = lambda _serial: False,
) -> x509.Certificate:
    """The viewer's certificate for ``address`` (and ``dns_names``), issued if needed
    (``warning``: ``expiry_warning_days``; ``revoked``: whether the certificate of a serial,
    hex, is revoked: the store's ``is_revoked``). A new one always has a new key."""
    names = pki.Names.of(LEADER_NAME, [address], dns_names)
    cert = _usable(layout, ca, names, now, warning, revoked)
    if cert is not None:
        return cert
    key = pki.generate_key()
    cert = ca.issue(key.public_key(), names, server=True, client=False, now=now)
    pki.write_key(layout.viewer_key, key)
    write_atomic(layout.viewer_cert, pki.cert_to_pem(cert) + ca.cert_pem)
    log.info(
        "viewer.certificate_issued",
        address=address,
        fingerprint=pki.fingerprint(cert),
        not_after=cert.not_valid_after_utc.isoformat(),
    )
    return cert
