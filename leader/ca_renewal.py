"""``tlsroll ca renew``: the cluster CA's certificate renewed with the same key, while the
leader runs (docs/ca-renewal.md, "renewal with the same key").

    renewal = prepare(layout, ca, now)   # blocking; in ``Store.renew_ca``'s transaction
    renewal.put_in_place()               # once that transaction has committed

The leader holds the CA key (unlocked at its start with the passphrase), so no passphrase is
asked. The new certificate (``pki.CertificateAuthority.renewed_cert``: CA1's subject, key,
key identifier and extensions, ``pathLenConstraint`` 0 included, a new serial, valid
``pki.CA_VALIDITY_DAYS`` from now) keeps the pin and the trust domain, and every certificate
CA1 issued chains to it unchanged.

Inside the transaction (``prepare``), which audits it: the previous certificate is kept beside
it (``DATA/ca/ca.pem.until-YYYY-MM-DD-SERIAL``: its end and the first 8 hex digits of its
serial, never overwritten) and the new one written as ``DATA/ca/ca.pem.new`` (0644: a
certificate). Only once the transaction has committed (``put_in_place``) is ``ca.pem.new``
renamed over ``ca.pem`` and the new certificate adopted (``ca.adopt``): a transaction that
fails (the audit refused, a full disk at the COMMIT) leaves ``ca.pem`` and the leader's CA
as they were, and ``ca.pem.new`` is removed (``discard``). One left by a kill is put in
place at the leader's next start if the store recorded its renewal (killed between the
commit and the rename), else removed (``leftover``). The key is left as it is. Adopted,
every part of the leader holds the same ``CertificateAuthority``, so its leaves are no
longer cut to the old end, the expiry watch sees the new end, a rollout stages the new
certificate, and ``RenewNodeCertificate`` and ``SignWorkstationCertificate`` hand it to the
agents.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from leader.layout import Layout
from tlsroll import logs, pki
from tlsroll.errors import TerminalError
from tlsroll.fsutil import PUBLIC, fsync_dir, write_atomic

if TYPE_CHECKING:
    from leader.store import CARenewed

log = logs.get_logger(__name__)

# ``tlsroll ca renew`` is refused while the CA has more than this left, unless ``--force``:
# a renewal is for the CA's last year (its first warning, ``expiry_warning_days``), and one at
# the start of its life only makes another certificate every peer must be handed.
RENEW_BEFORE = dt.timedelta(days=pki.CA_VALIDITY_DAYS - 365)


def kept_path(layout: Layout, old: x509.Certificate) -> Path:
    """Where the certificate a renewal replaced is kept: beside it, named by its end and its
    serial's first 8 hex digits (two renewals of certificates that end on the same day keep
    both)."""
    serial = f"{old.serial_number:x}"[:8]
    return layout.ca_cert.with_name(f"ca.pem.until-{old.not_valid_after_utc:%Y-%m-%d}-{serial}")


def refused_path(layout: Layout, renewed: x509.Certificate) -> Path:
    """Where a committed renewal's ``ca.pem.new`` that this start refused is moved aside."""
    return layout.ca_cert.with_name(f"ca.pem.refused-{renewed.serial_number:x}")


def new_path(layout: Layout) -> Path:
    """Where the renewed certificate waits for its transaction's commit."""
    return layout.ca_cert_new


class TooEarly(TerminalError):
    """The CA has more than ``RENEW_BEFORE`` left (``tlsroll ca renew --force`` renews it)."""


def too_early(ca: x509.Certificate, now: dt.datetime) -> str | None:
    """Why ``ca`` is not renewed now without ``--force`` (None: it is due)."""
    left = ca.not_valid_after_utc - now
    if left <= RENEW_BEFORE:
        return None
    due = ca.not_valid_after_utc - RENEW_BEFORE
    # Begun days: rounded down, the day before it read "3285 days left" of a CA "renewed once
    # at most 3285 days are left" (review rev56d L2).
    days = -(-left // dt.timedelta(days=1))
    return (
        f"the CA certificate has {days} days left (until "
        f"{ca.not_valid_after_utc:%Y-%m-%d}): it is renewed once at most {RENEW_BEFORE.days} "
        f"days are left (from {due:%Y-%m-%d %H:%M} UTC); --force renews it now"
    )


@dataclass
class Renewal:
    """A renewal prepared in the transaction: put in place once it has committed."""

    layout: Layout
    ca: pki.CertificateAuthority
    new: x509.Certificate
    now: dt.datetime
    detail: dict[str, Any]

    def put_in_place(self) -> None:
        """``ca.pem.new`` renamed over ``ca.pem`` (one rename), and the CA's certificate in
        memory replaced by it."""
        new_path(self.layout).replace(self.layout.ca_cert)
        self.ca.adopt(self.new, self.now)

    def discard(self) -> None:
        """The transaction failed: ``ca.pem.new`` removed (``ca.pem`` was not touched)."""
        with contextlib.suppress(FileNotFoundError):
            new_path(self.layout).unlink()


def prepare(
    layout: Layout, ca: pki.CertificateAuthority, now: dt.datetime, *, force: bool = False
) -> Renewal:
    """Renew ``ca``'s certificate up to its commit (see the module docstring): the previous
    one kept, the new one as ``ca.pem.new``; ``detail`` is what the audit trail keeps.
    TooEarly if it is not due and not ``force``d; TerminalError (nothing written) if the
    leader's CA would refuse to adopt it."""
    old = ca.cert
    if not force and (why := too_early(old, now)) is not None:
        raise TooEarly(why)
    new = ca.renewed_cert(now)
    if (why := pki.renewed_ca_problem(new, old, pki.spki_pin(old), now)) is not None:
        raise TerminalError(f"the renewed CA certificate: {why}")  # (a clock gone back)
    kept = kept_path(layout, old)
    if not kept.exists():  # (never overwritten: it holds this very certificate)
        write_atomic(kept, pki.cert_to_pem(old), PUBLIC)
    write_atomic(new_path(layout), pki.cert_to_pem(new), PUBLIC)
    detail = {
        "pin": pki.spki_pin(new),
        "serial": f"{new.serial_number:x}",
        "fingerprint": pki.fingerprint(new),
        "not_after": new.not_valid_after_utc.isoformat(timespec="seconds"),
        "previous_serial": f"{old.serial_number:x}",
        "previous_fingerprint": pki.fingerprint(old),
        "previous_not_after": old.not_valid_after_utc.isoformat(timespec="seconds"),
        "previous_kept": str(kept),
        "forced": force or None,
    }
    return Renewal(layout, ca, new, now, {k: v for k, v in detail.items() if v is not None})


def leftover(
    layout: Layout,
    ca: pki.CertificateAuthority,
    recorded: Sequence[CARenewed],
    now: dt.datetime,
) -> bool:
    """At the leader's start, a ``ca.pem.new`` that a renewal left (the leader killed between
    its write and the rename). If the store records that renewal (``recorded``,
    ``Store.ca_renewals``: its serial and fingerprint, and the certificate it replaced is
    ``ca``'s) it committed and only the rename was not made: it is made now, as the renewal
    would have (the replaced certificate kept beside it, ``kept_path``; ``ca`` adopts it),
    and True (review s48rev5 L5: it was removed, and the CA in use was not the one the store
    and the audit trail said). One it records that this clock refuses
    (``pki.renewed_ca_problem``: the clock more than a day behind the renewal's) is moved
    aside to ``refused_path`` (the only copy of a renewal the store and the audit record)
    and said, with how to put it in place once the clock is right. Else (killed before the
    commit, or a file that is not that renewal's) it is removed, and said: ``ca.pem`` is the
    certificate in use."""
    path = new_path(layout)
    try:
        left = pki.read_cert(path)
    except FileNotFoundError:
        return False
    except Exception as exc:  # (damaged: removed all the same)
        log.warning(
            "ca.renewal_leftover_removed",
            path=str(path),
            error=str(exc)[:200],
            detail="a damaged file left by a cut-short tlsroll ca renew was removed; tlsroll ca "
            "show says which CA is in use",
        )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False
    serial = f"{left.serial_number:x}"
    old = ca.cert
    committed = any(
        r.serial == serial
        and r.fingerprint == pki.fingerprint(left)
        and r.previous_serial == f"{old.serial_number:x}"
        for r in recorded
    )
    why = pki.renewed_ca_problem(left, old, pki.spki_pin(old), now) if committed else None
    if committed and why is None:
        kept = kept_path(layout, old)
        if not kept.exists():  # (the renewal wrote it before its commit)
            write_atomic(kept, pki.cert_to_pem(old), PUBLIC)
        Renewal(layout, ca, left, now, {}).put_in_place()
        log.warning(
            "ca.renewal_finished",
            path=str(layout.ca_cert),
            serial=serial,
            previous_serial=f"{old.serial_number:x}",
            previous_kept=str(kept),
            detail="a `tlsroll ca renew` that had committed was cut short before its "
            "certificate was put in place: put in place now",
        )
        return True
    if committed:
        # The store and the audit record it: it is the only copy, so it is kept, not removed
        # (its start is ahead of this clock by more than a day: the clock is behind).
        aside = refused_path(layout, left)
        os.replace(path, aside)
        fsync_dir(aside.parent)
        log.error(
            "ca.renewal_refused_at_start",
            path=str(aside),
            serial=serial,
            error=why,
            hint=f"a `tlsroll ca renew` that had committed was cut short before its certificate "
            f"was put in place, and this clock refuses it: correct the clock, then `mv {aside} "
            f"{path}` and restart the leader (it is put in place then); ca.pem stays in use "
            "meanwhile",
        )
        return False
    log.warning(
        "ca.renewal_leftover_removed",
        path=str(path),
        serial=serial,
        **({"error": why} if why else {}),
        hint="a `tlsroll ca renew` was cut short before its commit; the CA certificate in "
        "use is ca.pem (tlsroll ca show): renew again if it is not the renewed one",
    )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return False
