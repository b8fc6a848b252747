"""``tlsroll client renew``: a new client certificate for this PC, without the password.

A workstation's certificate lives about 397 days (less a few, spread at issue: ``pki.spread``).
Within the last 30 % of that life (``DUE_FRACTION``; any time with ``--force``) this command
asks the node the settings name (``settings.json``: its address and bootstrap port) for a new
one (the leader renews a certificate ``--force`` asks for once it is 24 hours old):

  (a) the settings dir's set is read (``settings.json``, ``ca.pem``, ``client.pem``,
      ``client.key``); a certificate that has ended is refused here (exit 11): the PC enrols
      again with the password (``tlsroll client test-connection URL``), as it does when the
      node refuses;
  (b) a new key and a CSR for the same name, carrying the proof that this PC holds its
      current certificate: that certificate, and its key's signature over the new key and the
      name (``bootstrap_csr.Reenrolment``, as an enrolment of the same PC proves its name);
  (c) the CSR goes to the node's bootstrap service (``proto.RENEW_PATH``) over TLS verified
      against the settings' ``ca.pem`` (chain and address): only the cluster's node gets it;
      the node checks the proof, and the leader signs only if the certificate proven is on its
      record for the name, unrevoked and unexpired; the old one is revoked then ("renewed");
  (d) the certificate that comes back must be for the new key, of the same name, from a CA of
      the settings' bundle (or of the bundle the node hands with it, when that holds the
      whole bundle of the settings: a renewed CA certificate added); the set is replaced as
      one (``settings_files.replace``: key, certificate, ``settings.json`` and ``ca.pem``).

Why a proof in the CSR rather than mutual TLS on the bootstrap port: the leader, which holds
the records, checks the proof itself (a node cannot renew a PC's name on its own say-so), the
signature covers the new key (a copy of the request gives nobody a usable certificate, and the
certificate it proves is revoked once used), the agent needs no new cryptography (its worker
checks the CSR) and the port's TLS stays as it is for every enrolment.

Exit codes: 0 renewed, or not due (``not due until DATE``); 1 failure (the settings cannot be
read or written, an unexpected answer, the leader not reached by the node: try later); 2 usage;
4 node unreachable or no answer in time; 5 connection refused; 6 TLS failure; 8 the node's
agent has no renewal (older: upgrade it) or another program answers there; 10 the node is not
of the settings' cluster (its certificate does not verify against ``ca.pem``); 11 refused: the
certificate revoked, ended, not the cluster's, the leader's no; or, the line saying "try
again in N s", too many tries, the node busy, a ``--force`` before the certificate is 24 hours
old (the name's renewal budget: ``leader.store.FORCED_RENEWAL_EVERY``; an older leader's hourly
cap) (as ``client test-connection``'s 11).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tlsroll import bootstrap_base, bootstrap_csr, pki
from tlsroll import bootstrap_protocol as proto
from tlsroll.errors import PKIError
from tlsroll.fsutil import PRIVATE, PUBLIC
from tlsroll.tls import client_context
from workstation import settings_files
from workstation.connection import (
    DEFAULT_TIMEOUT,
    ClientError,
    Exit,
    NetError,
    _error_of,
    check_url,
    one_line,
    request,
)

DUE_FRACTION = bootstrap_base.RENEWAL_DUE_FRACTION  # of its life: renewed within its last 30 %
AGAIN = "enrol this PC again with the password: tlsroll client test-connection URL"


@dataclass(frozen=True)
class Renewed:
    """What a run did: ``renewed`` False if the certificate was not due (``due`` then)."""

    renewed: bool
    due: dt.datetime
    not_after: dt.datetime | None = None


def due_at(cert: x509.Certificate) -> dt.datetime:
    """When ``cert`` is due for renewal: at ``DUE_FRACTION`` of its life (whole seconds)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + dt.timedelta(seconds=int((end - start).total_seconds() * DUE_FRACTION))


def _fail(message: str, code: Exit = Exit.FAILURE) -> ClientError:
    return ClientError(code, message)


class Renewal:
    """One run of ``tlsroll client renew`` on the settings dir ``settings_dir``."""

    def __init__(
        self,
        settings_dir: Path,
        *,
        force: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        say: Callable[[str], None] = print,
        now: Callable[[], dt.datetime] = pki.utcnow,
    ) -> None:
        self.d = settings_dir
        self.force = force
        self.timeout = timeout
        self.say = say
        self.now = now

    # --- (a) the set in place -----------------------------------------------------------------

    def _read(self) -> tuple[dict[str, Any], bytes, x509.Certificate, ec.EllipticCurvePrivateKey]:
        d = self.d
        try:
            done = settings_files.finish(d)
            if done is not None:  # (as ``client test-connection`` says it)
                self.say(f"settings  an interrupted run's new settings {done.value} in {d}")
            settings = json.loads(settings_files.read_file(d / "settings.json"))
            ca_pem = settings_files.read_file(d / "ca.pem")
            cert_pem = settings_files.read_file(d / "client.pem")
            key_pem = settings_files.read_file(d / "client.key")
        except FileNotFoundError:
            raise _fail(
                f"{d} holds no enrolled settings (settings.json, ca.pem, client.pem, "
                f"client.key): {AGAIN}"
            ) from None
        except settings_files.NewerStaging:
            raise _fail(f"a newer tlsroll left settings to finish in {d}: run that one") from None
        except (OSError, ValueError) as exc:
            raise _fail(f"cannot read the settings in {d}: {one_line(exc)}") from None
        try:
            cert = pki.load_cert_pem(cert_pem)
            key = pki.load_key_pem(key_pem)
            holds = isinstance(key, ec.EllipticCurvePrivateKey) and pki.key_matches(cert, key)
        except (PKIError, ValueError, TypeError):
            holds = False
        if not holds or not isinstance(settings, dict):
            raise _fail(f"the client certificate and key in {d} do not belong together: {AGAIN}")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return settings, ca_pem, cert, key

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> Renewed:
        settings, ca_pem, cert, key = self._read()
        name = pki.names_of(cert).common_name
        now = self.now()
        ends = cert.not_valid_after_utc
        if ends <= now:
            raise _fail(
                f"the client certificate of {name} ended {ends:%Y-%m-%d %H:%M} UTC; a certificate "
                f"that has ended is not renewed: {AGAIN}",
                Exit.ENROL_REFUSED,
            )
        due = due_at(cert)
        if now < due and not self.force:
            self.say(
                f"not due until {due:%Y-%m-%d %H:%M} UTC (the certificate of {name} ends "
                f"{ends:%Y-%m-%d}); --force renews it now"
            )
            return Renewed(False, due)
        try:
            server = check_url(str(settings.get("server_url", "")))
            port = int(settings["bootstrap_port"])
        except (KeyError, TypeError, ValueError, click.ClickException) as exc:
            raise _fail(
                f"{self.d}/settings.json names no node to renew at ({exc}): {AGAIN}"
            ) from None
        new_key = pki.generate_key()
        public = new_key.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        claim = bootstrap_csr.reenrolment_extension(public, name, previous=(cert, key))
        csr = pki.make_csr(new_key, proto.workstation_names(name), [claim] if claim else [])
        body = json.dumps(proto.RenewRequest(pki.csr_to_pem(csr)).to_json()).encode()
        where = f"{server.host}:{port}"
        try:
            context = client_context(ca_pem)
        except (ValueError, OSError) as exc:
            raise _fail(f"{self.d}/ca.pem cannot be used: {one_line(exc)}: {AGAIN}") from None
        try:
            reply = request(
                server.host,
                port,
                "POST",
                proto.RENEW_PATH,
                context,
                body=body,
                timeout=max(self.timeout, proto.MIN_EXCHANGE_WAIT),
                connect_timeout=self.timeout,
                workstation=name,
            )
        except NetError as exc:
            raise self._net_error(exc, where) from None
        if reply.status != 200:
            raise self._refused(reply.status, reply, where)
        try:
            answer = proto.parse_renew_answer(reply.body)
            new_cert = pki.load_cert_pem(answer.certificate_pem)
        except (proto.BootstrapError, PKIError):
            raise _fail(f"{where} sent no valid certificate; try again") from None
        bundle = self._bundle(ca_pem, answer.ca_bundle_pem)
        self._check(new_cert, new_key, name, proto.ca_certificates(bundle), where)
        self._write(settings, bundle, answer.certificate_pem, pki.key_to_pem(new_key), new_cert)
        ends = new_cert.not_valid_after_utc
        self.say(
            f"renewed   client certificate of {name}, valid until {ends:%Y-%m-%d} "
            f"(due for renewal from {due_at(new_cert):%Y-%m-%d}); settings written to {self.d}"
        )
        return Renewed(True, due_at(new_cert), ends)

    # --- (c) the node's answer ----------------------------------------------------------------

    def _net_error(self, exc: NetError, where: str) -> ClientError:
        if exc.kind == "verify":
            return _fail(
                f"the node at {where} is not of this PC's cluster (its certificate does not "
                f"verify against {self.d}/ca.pem: {one_line(exc.detail)}); nothing was sent",
                Exit.UNTRUSTED,
            )
        code = {
            "refused": Exit.REFUSED,
            "unreachable": Exit.UNREACHABLE,
            "timeout": Exit.UNREACHABLE,
            "tls": Exit.TLS,
        }.get(exc.kind, Exit.FAILURE)
        return _fail(f"{where}: {one_line(exc.detail)}; try again later", code)

    @staticmethod
    def _refused(status: int, reply: Any, where: str) -> ClientError:
        error, message = _error_of(reply)
        said = one_line(message, 400) if message else f"HTTP {status}"
        if status == 404:
            return _fail(
                f"{where} does not renew certificates (its agent is older than tlsroll client "
                f"renew, or this is no bootstrap port): upgrade the node's agent, or {AGAIN}",
                Exit.BOOTSTRAP_PORT,
            )
        if error in (proto.ErrorCode.RENEW_REFUSED.value, proto.ErrorCode.BAD_CSR.value):
            if AGAIN not in said and "test-connection" not in said:
                said = f"{said}; {AGAIN}"
            return _fail(f"renewal refused by {where}: {said}", Exit.ENROL_REFUSED)
        if status in (429, 503) or error == proto.ErrorCode.NODE_REMOVED.value:
            retry = reply.headers.get("retry-after")
            later = f" (try again in {one_line(retry, 10)} s)" if retry else ""
            return _fail(f"renewal refused by {where}: {said}{later}", Exit.ENROL_REFUSED)
        return _fail(f"{where} did not renew: {said}; try again later")

    # --- (d) the new set ----------------------------------------------------------------------

    @staticmethod
    def _bundle(ca_pem: bytes, offered: bytes) -> bytes:
        """The node's bundle if it holds every CA certificate of the settings' (a renewed CA
        certificate added), else the settings' as they are."""
        try:
            held = proto.ca_certificates(ca_pem)
            given = proto.ca_certificates(offered)
        except proto.BootstrapError:
            return ca_pem
        return offered if all(c in given for c in held) else ca_pem

    @staticmethod
    def _check(
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        name: str,
        cas: list[x509.Certificate],
        where: str,
    ) -> None:
        try:
            got = pki.names_of(cert).common_name
        except (PKIError, ValueError, TypeError, x509.DuplicateExtension):
            got = ""
        if not pki.key_matches(cert, key) or not any(pki.issued_by(cert, ca) for ca in cas):
            raise _fail(
                f"{where} sent a certificate not for this key or not from the CA (nothing written)",
                Exit.UNTRUSTED,
            )
        if got != name:
            raise _fail(
                f"{where} sent a certificate for {one_line(got or 'no name', 64)!r}, not for "
                f"{name} (nothing written)",
                Exit.UNTRUSTED,
            )

    def _write(
        self,
        settings: dict[str, Any],
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        cert: x509.Certificate,
    ) -> None:
        """The new key and certificate in place, with ``settings.json`` (its fingerprint) and
        ``ca.pem``, replaced as one set. If that fails, the new pair is kept in
        ``settings_files.KEPT`` (the leader has revoked the one in place: with it the next
        ``client test-connection`` proves the name), and the error says so."""
        settings = settings | {
            "client_fingerprint": pki.fingerprint(cert),
            "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
        files = {
            "client.key": (key_pem, PRIVATE),
            "client.pem": (cert_pem, PUBLIC),
            "ca.pem": (ca_pem, PUBLIC),
            "settings.json": (text.encode(), PUBLIC),
        }
        try:
            settings_files.replace(self.d, files)
        except settings_files.Unfinished as exc:
            raise _fail(
                f"the renewed settings are committed in {self.d}, but not finished "
                f"({one_line(exc.error)}): run this again to finish them"
            ) from None
        except (OSError, settings_files.NewerStaging) as exc:
            kept = ""
            with contextlib.suppress(OSError):
                where = settings_files.keep(self.d, key_pem, cert_pem)
                kept = f"; the renewed key and certificate are kept in {where}"
            raise _fail(
                f"cannot write the renewed settings to {self.d}: {one_line(exc)}{kept}; run "
                f"this again within minutes, or {AGAIN}"
            ) from None
