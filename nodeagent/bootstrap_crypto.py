"""The bootstrap service's cryptography, run in the agent's crypto worker (``cryptoworker``).

The service itself (``nodeagent.bootstrap_server``) keeps each exchange's state, its limits and
its HMAC key confirmation (the standard library's), and never imports ``cryptography`` or
``spake2`` (issue 15: about 10 MiB a switched agent kept for months). What needs them runs
here, in the worker's child process, as stateless operations: JSON in, JSON out, bytes as base64
text (the worker calls ``OPS[NAME](request)`` for the op ``"bootstrap.NAME"``):

- ``blinds`` {pake_pw} -> {blind, unblind}: the node's SPAKE2 blinding points for the password
  (two scalar multiplications whose time depends on it: asked for when the service starts,
  never for a stranger's request; ``tlsroll.bootstrap_pake.node_blinds``);
- ``respond`` {pake_pw, blind, unblind, msg_a} -> {msg_b, key}: the node's SPAKE2;
- ``open_csr`` {key, transcript, sealed} -> {csr_pem, cn, key_pin}: the workstation's sealed
  CSR opened (AES-256-GCM, to the node) and checked (``bootstrap_csr.check_workstation_csr``);
- ``renewal_csr`` {csr_pem, bundle} -> {cn, key_pin}: a renewal's CSR (``tlsroll client
  renew``, in the clear over the node's TLS) checked: a workstation's, with a proof of the
  certificate it renews that verifies (``bootstrap_csr.reenrolment_of``), that certificate
  issued by a CA of the node's ``bundle`` (one anybody made for the name goes no further than
  this: review s71 revrenew M1; the leader checks it against its records);
- ``cert_facts`` {pem[, ca_pem, bundle, ca_pin]} -> {pem, spki_pin, fingerprint[, bundle |
  ca_refused]}: the certificate the leader signed; with the CA certificate it was issued under
  (``ca_pem``), the node's CA ``bundle`` with it added (``bundle``) if it is not in it and is a
  renewal with the same key of the ``ca_pin`` key's certificate in it (``pki.
  renewed_ca_problem``), else why not (``ca_refused``; nothing if it is in it already);
- ``seal`` {key, transcript, plaintext} -> {sealed}: the payload sealed to the workstation;
- ``check_ca_bundle`` {pem} -> {count}: the node's CA bundle holds CA certificates only.

A refusal of what a peer sent (a bad point, a CSR that breaks the rules, a seal that does not
verify; a certificate the leader returned that does not parse) is an *answer*, not an error:
``{"refused": {"reason": BootstrapReason name, "detail": …}}``, which ``refusal`` turns back
into the same ``BootstrapError`` on the agent's side. Any error the worker raises is the
worker's failure (the agent answers the workstation "try later"; nothing is counted).

Secrets (what SPAKE2 runs on, the exchange's keys) cross the worker's pipe only: no operation
logs them or puts them in an error or a refusal.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from tlsroll.bootstrap_base import BootstrapError, BootstrapReason

Op = Callable[[dict[str, Any]], Any]


def _bytes(request: dict[str, Any], name: str) -> bytes:
    """A base64 field of a request; ValueError (the agent's bug, not the peer's) if it is not."""
    value = request.get(name)
    if not isinstance(value, str):
        raise ValueError(f"request field {name} missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"request field {name} is not base64") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _refused(exc: BootstrapError) -> dict[str, Any]:
    return {"refused": {"reason": exc.reason.name, "detail": exc.detail}}


def refusal(answer: Any) -> BootstrapError | None:
    """The agent's side: the ``BootstrapError`` an op's answer carries, None if it carries none."""
    if not isinstance(answer, dict) or not isinstance(answer.get("refused"), dict):
        return None
    refused = answer["refused"]
    try:
        reason = BootstrapReason[str(refused.get("reason"))]
    except KeyError:
        reason = BootstrapReason.MALFORMED
    return BootstrapError(reason, str(refused.get("detail") or ""))


def respond(request: dict[str, Any]) -> dict[str, Any]:
    from tlsroll import bootstrap_pake  # noqa: PLC0415 - the worker's imports

    blinds = (_bytes(request, "blind"), _bytes(request, "unblind"))
    try:
        msg_b, key = bootstrap_pake.node_respond(
            _bytes(request, "pake_pw"), _bytes(request, "msg_a"), blinds
        )
    except BootstrapError as exc:
        return _refused(exc)
    return {"msg_b": _b64(msg_b), "key": _b64(key)}


def blinds(request: dict[str, Any]) -> dict[str, Any]:
    from tlsroll import bootstrap_pake  # noqa: PLC0415

    blind, unblind = bootstrap_pake.node_blinds(_bytes(request, "pake_pw"))
    return {"blind": _b64(blind), "unblind": _b64(unblind)}


def open_csr(request: dict[str, Any]) -> dict[str, Any]:
    from tlsroll import bootstrap_csr, bootstrap_pake, pki  # noqa: PLC0415
    from tlsroll.bootstrap_protocol import Side  # noqa: PLC0415

    key, transcript = _bytes(request, "key"), _bytes(request, "transcript")
    try:
        csr_pem = bootstrap_pake.open_sealed(key, transcript, Side.NODE, request.get("sealed"))
        public, cn = bootstrap_csr.check_workstation_csr(csr_pem)
    except BootstrapError as exc:
        return _refused(exc)
    return {"csr_pem": _b64(csr_pem), "cn": cn, "key_pin": pki.spki_pin(public)}


def renewal_csr(request: dict[str, Any]) -> dict[str, Any]:
    from tlsroll import bootstrap_csr, pki  # noqa: PLC0415

    try:
        public, cn = bootstrap_csr.check_workstation_csr(_bytes(request, "csr_pem"))
        claim = bootstrap_csr.reenrolment_of(_bytes(request, "csr_pem"))
    except BootstrapError as exc:
        return _refused(exc)
    if claim.previous is None or claim.certificate is None:
        return _refused(
            BootstrapError(BootstrapReason.BAD_CSR, "no proof of the certificate to renew")
        )
    cas = pki.load_certs_pem(_bytes(request, "bundle"))  # (the node's own: its bug if bad)
    if not any(pki.issued_by(claim.certificate, ca) for ca in cas):
        return _refused(
            BootstrapError(
                BootstrapReason.BAD_CSR,
                f"the certificate of {cn} is not one this cluster's CA issued; enrol this PC "
                "again with the password: tlsroll client test-connection URL",
            )
        )
    return {"cn": cn, "key_pin": pki.spki_pin(public)}


def cert_facts(request: dict[str, Any]) -> dict[str, Any]:
    from tlsroll import pki  # noqa: PLC0415
    from tlsroll.errors import PKIError  # noqa: PLC0415

    try:
        cert = pki.load_cert_pem(_bytes(request, "pem"))
    except PKIError as exc:
        return _refused(BootstrapError(BootstrapReason.MALFORMED, str(exc)))
    facts: dict[str, Any] = {
        "pem": _b64(pki.cert_to_pem(cert)),
        "spki_pin": pki.spki_pin(cert),
        "fingerprint": pki.fingerprint(cert),
    }
    if request.get("ca_pem"):
        facts |= bundle_with(
            _bytes(request, "bundle"), _bytes(request, "ca_pem"), str(request.get("ca_pin", ""))
        )
    return facts


def bundle_with(bundle_pem: bytes, ca_pem: bytes, ca_pin: str) -> dict[str, Any]:
    """``cert_facts``'s bundle: {"bundle"} (``bundle_pem`` with ``ca_pem`` added), {"ca_refused":
    why}, or {} (``ca_pem`` is in the bundle already)."""
    from tlsroll import pki  # noqa: PLC0415
    from tlsroll.errors import PKIError  # noqa: PLC0415

    try:
        offered = pki.load_cert_pem(ca_pem)
        held = pki.load_certs_pem(bundle_pem)
    except PKIError as exc:
        return {"ca_refused": f"the CA certificate the leader signed with: {exc}"}
    if offered in held:
        return {}
    pinned = [c for c in held if ca_pin and pki.spki_pin(c) == ca_pin]
    if not pinned:
        return {"ca_refused": "the node's CA bundle holds no certificate of the pinned CA key"}
    latest = max(pinned, key=lambda c: c.not_valid_after_utc)
    if (why := pki.renewed_ca_problem(offered, latest, ca_pin)) is not None:
        return {"ca_refused": f"the CA certificate the leader signed with: {why}"}
    joined = bundle_pem if bundle_pem.endswith(b"\n") else bundle_pem + b"\n"
    return {"bundle": _b64(joined + pki.cert_to_pem(offered))}


def seal(request: dict[str, Any]) -> dict[str, Any]:
    from tlsroll import bootstrap_pake  # noqa: PLC0415
    from tlsroll.bootstrap_protocol import Side  # noqa: PLC0415

    key, transcript = _bytes(request, "key"), _bytes(request, "transcript")
    plaintext = _bytes(request, "plaintext")
    return {"sealed": bootstrap_pake.seal(key, transcript, Side.WORKSTATION, plaintext)}


def check_ca_bundle(request: dict[str, Any]) -> dict[str, Any]:
    from tlsroll import bootstrap_pake  # noqa: PLC0415

    try:
        certs = bootstrap_pake.ca_certificates(_bytes(request, "pem"))
    except BootstrapError as exc:
        return _refused(exc)
    return {"count": len(certs)}


OPS: dict[str, Op] = {
    "blinds": blinds,
    "respond": respond,
    "open_csr": open_csr,
    "renewal_csr": renewal_csr,
    "cert_facts": cert_facts,
    "seal": seal,
    "check_ca_bundle": check_ca_bundle,
}
