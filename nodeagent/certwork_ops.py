"""The agent's X.509 work, as ops of its crypto worker (``nodeagent.cryptoworker``: "cert.NAME").

Each op takes and gives plain JSON values, keeps nothing between calls, and does exactly what
the agent did in-process before (the same checks in the same order, the same errors with the
same messages). A check the agent answers the leader with as INVALID_ARGUMENT (``invalid``:
"the certificate was not issued by the cluster CA", …) comes back as ``{"refused": MESSAGE}``
for the agent to raise; a ``PKIError`` (not PEM, not valid now) comes back as itself.

Keys: ``new_key`` and ``renew_csr`` make a key and write it (0600, or as the live config is
shared: ``sharing.Sharing``) and answer with the CSR only; ``own`` answers with the practice's
key (it came from the leader in the agent's request, and the agent writes it as before).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeagent import nodefiles, sharing
from tlsroll import pki, spiffe
from tlsroll.errors import PKIError, PKIReason
from tlsroll.fsutil import read_regular
from tlsroll.names import Names


def names_of(request: dict[str, Any]) -> Names:
    """The node's names as the agent sent them (``certwork.names_request``)."""
    value = request["names"]
    return Names(value["common_name"], tuple(value["ips"]), tuple(value["dns"]))


def _pem(request: dict[str, Any], key: str) -> bytes:
    """The bytes the agent got (``service._pem_text``: any that are not ASCII carried as
    lone surrogates), for ``pki`` to judge as it judged them in the agent."""
    return str(request[key]).encode("ascii", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("ascii")


def _reader(value: Any) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


def crl(request: dict[str, Any]) -> dict[str, Any]:
    """A revocation list checked against the CA file: its number and revoked serials, and its
    thisUpdate and nextUpdate (ISO 8601; ``next_update`` None: it has none), which the agent
    warns by (``trust.LeaderTrust.stale_check``; an agent of before session 67 ignores them)."""
    ca = pki.read_cert(Path(request["ca_file"]))
    try:
        pem = request["pem"].encode("ascii")
    except UnicodeEncodeError:  # a verdict on the list, as ``pki.load_crl``'s own
        raise PKIError(PKIReason.BAD_PEM, "revocation list (not ASCII)") from None
    number, revoked = pki.load_crl(pem, ca)
    this_update, next_update = pki.crl_dates(pem)
    return {
        "number": number,
        "revoked": sorted(revoked),
        "this_update": this_update.isoformat(),
        "next_update": None if next_update is None else next_update.isoformat(),
    }


def new_key(request: dict[str, Any]) -> str:
    """A rollout's new key, written to ``key_file`` as the live config is shared
    (``share``: ``sharing.Sharing``'s fields), and its CSR (PEM) for the node's names."""
    share = sharing.Sharing(
        (int(request["share"]["owner"][0]), int(request["share"]["owner"][1])),
        int(request["share"]["mode"]),
        int(request["share"]["public_mode"]),
        request["share"]["group"],
        int(request["share"]["dir_mode"]),
    )
    key = pki.generate_key()
    sharing.write_staged(Path(request["key_file"]), pki.key_to_pem(key), share)
    return _text(pki.csr_to_pem(pki.make_csr(key, names_of(request))))


def stage_issuer(request: dict[str, Any]) -> dict[str, Any]:
    """Stage's checks that need no key read, made before the agent gives the staged key the
    live config's access, so that a certificate refused changes nothing (review s41 rev2,
    Low 1; review s42 of the lean child, Low 1): both certificates PEM, the CA the pinned one,
    it issued the certificate, the certificate is for the staged key (its public key the
    journalled CSR's, ``csr_pem``), its names are the node's, it is valid at ``now``: ``stage``'s
    checks in its order. ``{"ca_pem": …}`` (the CA as the agent writes it, for its TLS check,
    made before the share too), or ``{"refused": …}``; ``PKIError`` for a PEM that is none or
    a certificate not valid at ``now``.

    ``csr_pem``, ``names`` or ``now`` missing (an agent of 900742f, which sent the first
    three fields alone), or ``csr_pem`` empty or no CSR: that check is left to ``stage``."""
    cert = pki.load_cert_pem(_pem(request, "certificate_pem"))
    ca = pki.load_cert_pem(_pem(request, "ca_certificate_pem"))
    refused = _issuer_refused(cert, ca, request["ca_pin"]) or _cert_refused(
        cert, request, _csr_key(request.get("csr_pem"))
    )
    return {"ca_pem": _text(pki.cert_to_pem(ca))} if refused is None else {"refused": refused}


def _csr_key(csr_pem: Any) -> Any:
    """The public key of the CSR the agent journalled for the staged key, None if none."""
    if not csr_pem:
        return None
    try:
        return pki.load_csr_pem(str(csr_pem).encode("ascii")).public_key()
    except (PKIError, UnicodeEncodeError):
        return None


def _issuer_refused(cert: Any, ca: Any, ca_pin: str) -> str | None:
    if pki.spki_pin(ca) != ca_pin:
        return "the CA is not this cluster's CA (pin mismatch)"
    if not pki.issued_by(cert, ca):
        return "the certificate was not issued by the cluster CA"
    return None


def _cert_refused(cert: Any, request: dict[str, Any], key: Any) -> str | None:
    """After the issuer's, Stage's checks in the order they always had (b97a856, in the
    agent): the certificate is for ``key`` (the staged key's public key, or its CSR's; None:
    not checked), its names are the node's, it is valid at ``now`` (``PKIError``). ``names``
    or ``now`` missing: not checked (``stage_issuer`` for an older agent)."""
    if key is not None and pki.spki_pin(cert) != pki.spki_pin(key):
        return "the certificate does not match the staged key"
    if not pki.serves_names(cert):  # an agent's: ``names_of`` reads them apart (review s59)
        return "the certificate serves none of this node's names (an agent's, not a server's)"
    if "names" in request and pki.names_of(cert) != names_of(request):
        return "the certificate's names differ from this node's names"
    if "now" in request:
        pki.check_valid_now(cert, dt.datetime.fromisoformat(request["now"]))
    return None


def stage(request: dict[str, Any]) -> dict[str, Any]:
    """The leader's certificate for the staged key checked, as Stage did: the CA is the
    pinned one, it issued the certificate, the staged key (``key_file``, read as shared with
    ``reader``) matches, the names are the node's, valid at ``now``. The certificate and CA as
    the agent writes them, the fingerprint and the end.

    The agent calls it after ``stage_issuer`` and the key's share, so that only the key's read
    and its match can refuse here; the other checks are made again all the same (about a
    millisecond): an agent started before ``stage_issuer`` had them all (an upgrade starts
    the new child for the old agent) calls this op alone."""
    cert = pki.load_cert_pem(_pem(request, "certificate_pem"))
    ca = pki.load_cert_pem(_pem(request, "ca_certificate_pem"))
    refused = _issuer_refused(cert, ca, request["ca_pin"])
    if refused is None:
        key = pki.read_key(Path(request["key_file"]), shared=_reader(request.get("reader")))
        refused = _cert_refused(cert, request, key.public_key())
    return _stored(cert, [cert], [ca]) if refused is None else {"refused": refused}


def own(request: dict[str, Any]) -> dict[str, Any]:
    """``--cert-dir``: the practice's certificate, intermediates, CA(s) and key checked as
    Stage did (a certificate and CA certificates, the chain to one of those, the key present
    and matching, the SAN covering the node's names, valid at ``now``): what the agent
    writes (the key, the chain, the CA bundle), the fingerprint and the end."""
    certs = pki.load_certs_pem(_pem(request, "certificate_pem"))
    cas = pki.load_certs_pem(_pem(request, "ca_certificate_pem"))
    if not certs or not cas or not all(pki.is_ca(c) for c in cas):
        return {"refused": "own certificate: a certificate and CA certificates are needed"}
    cert, intermediates = certs[0], certs[1:]
    if pki.chain_to(cert, intermediates, cas) is None:
        return {"refused": "own certificate: it does not chain to the CA sent with it"}
    if not request.get("private_key_pem"):
        return {"refused": "own certificate: its private key is missing"}
    key = pki.load_key_pem(_pem(request, "private_key_pem"))
    if not pki.key_matches(cert, key):
        return {"refused": "own certificate: the private key does not match it"}
    lacks = pki.san_lacks(cert, names_of(request))
    if lacks is None or lacks:
        return {
            "refused": f"own certificate: its SAN lacks {', '.join(lacks or ['everything'])}, "
            "which this node serves on"
        }
    pki.check_valid_now(cert, dt.datetime.fromisoformat(request["now"]))
    # The intermediates in the CA file too: workstations build the server's chain with the
    # bundle the bootstrap service hands them.
    bundle = [*cas, *(c for c in intermediates if c not in cas)]
    return {**_stored(cert, [cert, *intermediates], bundle), "key_pem": _text(pki.key_to_pem(key))}


def _stored(cert: Any, chain: list[Any], cas: list[Any]) -> dict[str, Any]:
    return {
        "chain_pem": _text(b"".join(pki.cert_to_pem(c) for c in chain)),
        "ca_pem": _text(b"".join(pki.cert_to_pem(c) for c in cas)),
        "fingerprint": pki.fingerprint(cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def renew_csr(request: dict[str, Any]) -> str:
    """A renewal's CSR: for the key a renewal cut short left at ``key_file`` (used again: the
    leader may have signed it), else a new one written there 0600 before the CSR leaves."""
    path = Path(request["key_file"])
    key = None
    if path.exists():
        with contextlib.suppress(PKIError):
            key = pki.read_key(path)
    if key is None:
        key = pki.generate_key()
        pki.write_key(path, key)
    return _text(pki.csr_to_pem(pki.make_csr(key, names_of(request))))


def renew_install(request: dict[str, Any]) -> dict[str, Any]:
    """The leader's renewed certificate checked (issued by the node's CA for the pending key
    with exactly the node's names, carrying this node's identity) and moved into place with
    that key (``nodefiles.install_renewed``): the new identity's facts (``identity.Identity``'s,
    as ``Identity.of`` takes them).

    The CA certificate the leader sent with it (``ca_certificate_pem``, after ``tlsroll ca
    renew``), if it is not the one held: written as ``DATA/ca.pem`` (one rename) before the
    certificate is moved into place when ``pki.renewed_ca_problem`` (the check every side
    makes of a renewal with the same key) finds nothing against it
    (``ca_not_after``: its end), else left (``ca_refused``: why; the renewal goes on, under
    the CA certificate held). Missing or empty (an older leader, an older agent): neither."""
    data_dir = Path(request["data_dir"])
    new_key = nodefiles.pending_paths(data_dir)[0]
    ca_file = nodefiles.paths(data_dir)[2]
    cert = pki.load_cert_pem(_pem(request, "certificate_pem"))
    ca = pki.load_cert_pem(read_regular(ca_file))  # never a FIFO's endless wait (rev50a L2)
    nodefiles.check_issued(cert, pki.read_key(new_key), ca, names_of(request))
    td = spiffe.trust_domain(ca)
    if spiffe.of(cert) != spiffe.node(td, request["node_name"]):
        return {"refused": "the renewed certificate carries another identity"}
    about_ca: dict[str, str] = {}
    if request.get("ca_certificate_pem"):
        try:
            offered = pki.load_cert_pem(_pem(request, "ca_certificate_pem"))
        except PKIError as exc:
            about_ca["ca_refused"] = f"the CA certificate sent with it: {exc}"
        else:
            if offered != ca:
                refused = pki.renewed_ca_problem(offered, ca, str(request.get("ca_pin", "")))
                if refused is None:
                    pki.write_cert(ca_file, offered)
                    about_ca["ca_not_after"] = offered.not_valid_after_utc.isoformat()
                else:
                    about_ca["ca_refused"] = f"the CA certificate sent with it: {refused}"
    nodefiles.install_renewed(data_dir, cert)
    return {
        **about_ca,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "trust_domain": td,
        "certificate": _text(pki.cert_to_pem(cert)),
        "serial": f"{cert.serial_number:x}",
        "key_pin": pki.spki_pin(cert),
    }


OPS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "crl": crl,
    "new_key": new_key,
    "stage_issuer": stage_issuer,
    "stage": stage,
    "own": own,
    "renew_csr": renew_csr,
    "renew_install": renew_install,
}
