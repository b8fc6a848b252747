"""The leader's own certificate (``DATA/tls/leader.pem``), renewed and served while it runs.

    own = OwnTls(layout, ca, names, warning)
    bind(join, ..., own.join_credentials())        # TLS, no client certificate
    bind(control, ..., own.control_credentials())  # mutual TLS, the cluster CA
    await own.renew_if_due()                       # with every check of the expiry watch

``renew_if_due`` issues the certificate again, for a new key, once it ends within
``leader.layout.own_renew_before`` (``ensure_leader_identity``, the same rule as at start: ahead
of the expiry watch's warning, ``warning``; also one agents would refuse; and a leader.pem put
in place that is not the certificate of the key served, for that key) and serves the new key
and certificate from then on: gRPC asks each listener's fetcher for the certificate at every
new handshake, so new connections get the new one and open ones keep theirs, with no restart.
Agents check the leader's identity (its URI SAN), not its certificate, so they accept it at
once. The credentials the leader dials agents with (``on_renewed`` callbacks) change too. Each
certificate issued is recorded first (``record``: the store's ``record_leader_certificate``),
so that `tlsroll ca revoke` of the one served revokes those served before as well. Before,
a renewal kept the key: the certificate it replaced was one of the same key, valid until its
end, and a revocation of the new one left a key that leaked commanding the agents with it
(review of s63-o1 M1).

A certificate the admin revoked (``tlsroll ca revoke`` of its serial; ``revoked`` asks the
store) is issued again at once, for a new key (``leader.layout.new_leader_key``: it was revoked
for a key that leaked, and a new certificate of that key would give it all back): the admin
service calls ``renew_if_due`` right after the revocation, as the expiry watch does with every
check, and the key and chain served change together. Before, the leader served its revoked
certificate until it ended (a year), and agents refused every command of it: every rollout
halted (review s63 ops).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509

from leader.layout import (
    DEFAULT_WARNING,
    REISSUED_REVOKED,
    Layout,
    ensure_leader_identity,
    new_leader_key,
    rechain_leader_cert,
)
from tlsroll import logs, pki

log = logs.get_logger(__name__)


def said_not_reissued(serial: str) -> None:
    """The log line of a revoked leader certificate the CA could not issue again (the running
    leader's, ``OwnTls``, and the start's, ``leader.runtime``: one text)."""
    log.error(
        "leader.certificate_revoked_not_reissued",
        serial=serial,
        detail="the leader's certificate is revoked and the CA can issue no new one now:"
        " agents refuse the leader's commands; see `tlsroll certs check-expiration` for the CA",
    )


def said_reissued(cert: x509.Certificate, replaced: str, *, served: bool) -> None:
    """The log line of a revoked leader certificate issued again for a new key (``served``:
    by the running leader, which serves it at once; else by a start)."""
    log.warning(  # (public facts only: the key's pin, never the key)
        "leader.certificate_reissued_revoked",
        reason=REISSUED_REVOKED,
        serial=f"{cert.serial_number:x}",
        replaced_serial=replaced,
        key_pin=pki.spki_pin(cert),
        not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
        detail="the leader's certificate was revoked: issued again for a new leader.key"
        + (", and served from now on" if served else ""),
    )


class OwnTls:
    def __init__(
        self,
        layout: Layout,
        ca: pki.CertificateAuthority,
        names: pki.Names,
        warning: dt.timedelta = DEFAULT_WARNING,
        revoked: Callable[[str], bool] = lambda _serial: False,
        record: Callable[[x509.Certificate], object] | None = None,
    ) -> None:
        """``revoked``: whether the certificate of a serial (hex) is revoked (the store's
        ``is_revoked``); ``record``: what records each certificate issued, before it is
        written (the store's ``record_leader_certificate``); both called in a worker
        thread."""
        self.layout = layout
        self.warning = warning  # ``expiry_warning_days``
        self.ca = ca
        self.names = names
        self.revoked = revoked
        self.record = record
        key_pem = layout.tls_key.read_bytes()
        # What it serves with: replaced only by one it makes (``new_leader_key``,
        # ``ensure_leader_identity``), never read from a file changed by hand.
        self._key = pki.load_key_pem(key_pem)
        # The key and chain served, one pair: gRPC's threads read it at a handshake while the
        # loop may replace both (a new key), and a key read before and a chain after would be
        # no pair.
        self._pair = (key_pem, layout.tls_cert.read_bytes())
        self._version = 0
        # One change of what is served at a time (``ca_renewed``, ``renew_if_due``): each
        # reads what is served in a worker thread and serves what it made of it after.
        self._changing = asyncio.Lock()
        # Called with the new chain (PEM) after a renewal, on the event loop.
        self.on_renewed: list[Callable[[bytes], None]] = []

    @property
    def key_pem(self) -> bytes:
        return self._pair[0]

    @property
    def chain_pem(self) -> bytes:
        return self._pair[1]

    @property
    def cert(self) -> x509.Certificate:
        return pki.load_certs_pem(self.chain_pem)[0]

    def _serve(self, chain: bytes, key_pem: bytes | None = None) -> None:
        """Serve ``chain`` (with ``key_pem``, a new key, or the one served) from now on, and
        dial agents with it (``on_renewed``). The pair before the version: a fetcher that
        sees the new version reads the new pair."""
        self._pair = (key_pem or self.key_pem, chain)
        self._version += 1
        for callback in self.on_renewed:
            callback(chain)

    def _config(self, client_auth: bool) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [self._pair],
            root_certificates=self.ca.cert_pem if client_auth else None,
        )

    def _credentials(self, client_auth: bool) -> grpc.ServerCredentials:
        """Credentials for one listener, with a fetcher (and a version seen) of its own."""
        seen = self._version

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # On gRPC's threads at every handshake: no I/O, reads of two attributes.
            nonlocal seen
            if self._version == seen:
                return None  # unchanged
            seen = self._version
            return self._config(client_auth)

        # grpc's stubs say the fetcher returns a configuration; None ("unchanged") is allowed.
        return grpc.dynamic_ssl_server_credentials(
            self._config(client_auth),
            fetch,  # type: ignore[arg-type]
            require_client_authentication=client_auth,
        )

    def join_credentials(self) -> grpc.ServerCredentials:
        return self._credentials(client_auth=False)

    def control_credentials(self) -> grpc.ServerCredentials:
        return self._credentials(client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """What the leader dials agents with: its certificate as the client's."""
        key_pem, chain_pem = self._pair
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_pem,
            private_key=key_pem,
            certificate_chain=chain_pem,
        )

    async def ca_renewed(self) -> None:
        """The CA certificate was renewed with the same key (``tlsroll ca renew``): the chain
        served carries the new one (same leaf), the control listener trusts it, and the
        leader dials agents with it (``on_renewed``); then the leader's certificate is issued
        again if that is due now (one cut to the old certificate's end is, near that end), or
        if leader.pem is not the certificate of the key served (``renew_if_due``). Not beside
        another change of what is served: a renewal whose certificate was served while this
        chained the leaf it replaced was undone for good (review rev53c M: the due leaf served
        until a restart, leader.pem new, nothing warning)."""
        async with self._changing:
            chain = await asyncio.to_thread(self._rechain)
            self._serve(chain)
            log.info(
                "leader.ca_reloaded", ca_not_after=self.ca.cert.not_valid_after_utc.isoformat()
            )
            await self._renew_if_due()

    def _rechain(self) -> bytes:
        """``DATA/tls/leader.pem`` written again as its leaf and the CA certificate in use;
        returns the leaf served chained so. The leaf served, not the file's: a leader.pem
        replaced meanwhile by another key's certificate was served with the leader's key, a
        chain no peer completed a handshake with, until ``renew_if_due`` issued it again
        (review rev52b L3)."""
        rechain_leader_cert(self.layout, self.ca)
        return pki.cert_to_pem(self.cert) + self.ca.cert_pem

    async def renew_if_due(self) -> bool:
        """Issue the certificate again if it is due or revoked, and serve it; True if it did."""
        async with self._changing:
            return await self._renew_if_due()

    async def _renew_if_due(self) -> bool:
        """``renew_if_due`` under the lock (``ca_renewed`` holds it already)."""
        if await self._renew_if_revoked():
            return True
        # For the key it serves (not leader.key's file: one replaced by hand is read at the
        # next start, which issues the certificate again for it then), or a new one.
        old = self.cert
        done = await asyncio.to_thread(
            ensure_leader_identity,
            self.layout,
            self.ca,
            self.names,
            None,
            self.warning,
            self._key,
            self.record,
        )
        if done is None:  # (a file changed by hand is read at the next start, not here)
            return False
        chain = await asyncio.to_thread(Path(self.layout.tls_cert).read_bytes)
        if not pki.key_matches(pki.load_certs_pem(chain)[0], done.key):
            # replaced again since it was written
            log.warning(
                "leader.certificate_replaced",
                path=str(self.layout.tls_cert),
                detail="leader.pem was replaced by the certificate of another key as it was"
                " issued again: the leader serves the one it served, and issues it again at"
                " the next check",
            )
            return False
        self._key = done.key
        self._serve(chain, pki.key_to_pem(done.key) if done.new_key else None)
        cert = self.cert
        log.info(
            "leader.certificate_reloaded",
            reason=done.reason,
            serial=f"{cert.serial_number:x}",
            replaced_serial=f"{old.serial_number:x}",
            new_key=done.new_key,
            not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        return True

    async def _renew_if_revoked(self) -> bool:
        """If the certificate served was revoked: a new key and a certificate for it
        (``new_leader_key``), served from now on; True if it did. Under the lock."""
        old = self.cert
        serial = f"{old.serial_number:x}"
        if not await asyncio.to_thread(self.revoked, serial):
            return False
        key = await asyncio.to_thread(
            new_leader_key, self.layout, self.ca, self.names, pki.utcnow(), self.record
        )
        if key is None:  # (the CA has ended, or the clock is before its start)
            said_not_reissued(serial)
            return False
        chain = await asyncio.to_thread(Path(self.layout.tls_cert).read_bytes)
        self._key = key
        self._serve(chain, pki.key_to_pem(key))
        said_reissued(self.cert, serial, served=True)
        return True
