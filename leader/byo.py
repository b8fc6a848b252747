"""Bring your own certificate (``--cert-dir DIR``): the practice's own certificates for 8443.

The usual rollout makes each node's https key on the node and has the cluster CA sign it. A
practice that runs its own CA (the "practice CA") can hand tlsroll a certificate and key per
node instead. The directory's layout::

    DIR/ca.crt          the practice CA that signed the node certificates (PEM; more than one
                        CA certificate is allowed, e.g. a root and an intermediate)
    DIR/<node>.crt      the node's certificate first, then any intermediate CA certificates
    DIR/<node>.key      its private key (PEM, unencrypted), mode 0600 or 0400
    anything else       ignored, as are files of nodes outside the rollout's scope (even
                        ones that cannot be read: a rollout does not need them)

Everything is checked for every node the rollout would touch before any node is: a rollout
with one problem is refused whole, with one line per problem (``Problem``: node, file, what
is wrong, what to do). ``validate`` is pure (``cryptography`` only; never ``openssl``), given
what the leader knows of each node (``Expected``: its enrolled names, the certificate it
serves now) and the clock. ``read_cert_dir`` is the one function here that touches files; the
CLI runs it, and sends what it read to the leader, which alone knows which nodes the rollout
touches: a file that is there and cannot be read is sent as empty, with why
(``Material.unreadable``), and reported by ``validate`` if its node is touched.

A key file that group or others can read is refused, not merely warned about: the key is
what makes the certificate worth anything, and a node's own keys are 0600 too.

The keys are secrets. They travel CLI → leader over the admin socket, leader → agent over
mutual TLS (``StageRequest.private_key_pem``), are kept by the leader in memory only
(``Vault``) until the node has staged its key, and never appear in a log, an error, the audit
trail or the schema (``NodeMaterial`` hides the key from ``repr``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from tlsroll import pki
from tlsroll.errors import TerminalError
from tlsroll.fsutil import file_kind
from tlsroll.peertext import clean

CA_FILE = "ca.crt"
CERT_SUFFIX = ".crt"
KEY_SUFFIX = ".key"
MAX_FILE_BYTES = 64 * 1024  # a certificate chain or a key is a few KiB
# Apple: TLS server certificates valid for at most 398 days (support.apple.com/102028).
MAX_VALIDITY = dt.timedelta(days=398)
MIN_RSA_BITS = 2048
CURVES = ("secp256r1", "secp384r1")
SHA2 = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


class Refused(TerminalError):
    """The certificates from ``--cert-dir`` cannot be used; the message has one line per
    problem. Nothing was changed on any node."""

    def __init__(self, problems: Sequence[Problem], directory: str = "") -> None:
        self.problems = tuple(problems)
        where = directory.rstrip("/") if _PLAIN_PATH.fullmatch(directory) else ""
        lines = "\n".join(
            f"  {replace(p, fix=p.fix.replace('DIR/', f'{where}/')) if where else p}"
            for p in self.problems
        )
        super().__init__(
            f"the certificates from --cert-dir are refused ({len(self.problems)} "
            f"problem{'s' if len(self.problems) != 1 else ''}); no node was changed:\n{lines}"
        )


_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./-]{0,199}")  # (not "-x": an option)
"""A ``--cert-dir`` path the advice names as it is (``CertDir.directory``; rev56f L2: it said
``chmod 600 DIR/node1.key``); any other (a space, a quote, a control character) stays ``DIR``."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong: the node ("" for the CA), the file, what is wrong, what to do."""

    node: str
    file: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.node or 'ca'}: {self.file}: {self.what}; {self.fix}"


@dataclass(frozen=True)
class NodeMaterial:
    """One node's files as read from the directory (empty bytes: the file is missing)."""

    node: str
    chain_pem: bytes
    key_pem: bytes = field(repr=False)  # secret
    key_mode: int | None = None  # permission bits of the key file, None if unknown


@dataclass(frozen=True)
class Material:
    """The whole directory: the practice CA and each node's files; ``unreadable``: the files
    that are there but could not be read (file name: why), read as empty: ``validate``
    reports them, for ``ca.crt`` and the nodes the rollout touches, in place of "missing"
    (review s47rtin L3); those of other nodes it ignores, as it ignores their other files
    (review s48rev3: a cluster-wide plan was refused for a file of a node it did not touch)."""

    ca_pem: bytes
    nodes: Mapping[str, NodeMaterial]
    unreadable: Mapping[str, str] = field(default_factory=dict)
    directory: str = ""  # as the admin gave it, for the advice (``Refused``)


@dataclass(frozen=True)
class Expected:
    """What the leader knows of a node the rollout touches: the names it serves on (its
    enrolment, which preflight checks the node still claims) and the certificate it serves
    now (``sha256:…``, "" if none)."""

    names: pki.Names
    live_fingerprint: str = ""


@dataclass(frozen=True)
class Accepted:
    """A node's certificate that passed every check; ``ca_pin``: the SPKI pin of the CA of
    ``ca.crt`` its chain ends at (``_longest_path``), taken up to its root where ``ca.crt``
    holds that too (``_top_in``): the one a workstation pins for it."""

    node: str
    fingerprint: str
    not_after: dt.datetime
    subject: str
    ca_pin: str = ""


# --- reading the directory (the CLI) ------------------------------------------------------


class _Unreadable(TerminalError):
    """A file of the directory that is there but cannot be read; the message says why."""


def _read(path: Path) -> tuple[bytes, int]:
    """A regular file's bytes (at most ``MAX_FILE_BYTES``) and its permission bits. It is
    opened without blocking (a FIFO with no writer opened for ever: review s47rtin L2) and
    checked (``fstat``) before a byte is read, so what is checked is what is read.
    FileNotFoundError if it is not there (a dangling link); ``_Unreadable`` with the reason
    if it is and cannot be read (review s47rtin L3: all of these were "missing")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Unreadable(f"cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Unreadable(f"is not a regular file ({file_kind(st.st_mode)})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _Unreadable(f"cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise _Unreadable(f"is larger than {MAX_FILE_BYTES} bytes: not a certificate or key")
    return data, stat.S_IMODE(st.st_mode)


def read_cert_dir(directory: Path) -> Material:
    """The files of ``directory`` (layout: module docstring). A missing file is read as
    empty, and ``validate`` reports it if its node is in scope; one that is there and cannot
    be read (permission denied, not a regular file, too large) is read as empty too and
    named in ``Material.unreadable`` with why (``unreadable_problem``); OSError only if the
    directory itself cannot be listed."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir())
    unreadable: dict[str, str] = {}

    def read(name: str) -> tuple[bytes, int | None]:
        try:
            return _read(directory / name)
        except FileNotFoundError:
            return b"", None
        except _Unreadable as exc:
            unreadable[name] = str(exc)
            return b"", None

    ca_pem = read(CA_FILE)[0] if CA_FILE in names else b""
    stems = {n[: -len(s)] for n in names for s in (CERT_SUFFIX, KEY_SUFFIX) if n.endswith(s)} - {
        CA_FILE[: -len(CERT_SUFFIX)]
    }
    nodes: dict[str, NodeMaterial] = {}
    for stem in sorted(stems):
        if pki.node_name_problem(stem) is not None:
            continue  # not a node's file: ignored
        chain = read(f"{stem}{CERT_SUFFIX}")[0] if f"{stem}{CERT_SUFFIX}" in names else b""
        key, mode = read(f"{stem}{KEY_SUFFIX}") if f"{stem}{KEY_SUFFIX}" in names else (b"", None)
        nodes[stem] = NodeMaterial(stem, chain, key, mode)
    return Material(ca_pem, nodes, unreadable)


MAX_WHY = 200
"""Characters of a reason a file could not be read, as the leader repeats it (it comes over
the admin socket: the CLI's words, ``_read``'s, a few dozen characters)."""


def unreadable_problem(material: Material, node: str, name: str) -> Problem | None:
    """The problem of ``name`` (``ca.crt``, or ``node``'s ``.crt`` or ``.key``) if it is there
    and could not be read (``Material.unreadable``): why, and what to do; None if it was
    read, or is missing."""
    why = material.unreadable.get(name)
    if why is None:
        return None
    what = (
        "the practice CA's certificate (PEM)"
        if not node
        else f"{node}'s private key"
        if name.endswith(KEY_SUFFIX)
        else f"{node}'s certificate (PEM)"
    )
    return Problem(node, name, clean(why, MAX_WHY), f"put {what} in DIR/{name} as a readable file")


# --- checks (pure) --------------------------------------------------------------------------


def _load_certs(data: bytes) -> list[x509.Certificate] | None:
    try:
        return pki.load_certs_pem(data) if data.strip() else None
    except Exception:  # any parse failure is "not PEM certificates"
        return None


def _unusable_key(cert: x509.Certificate) -> bool:
    """Whether ``cert``'s public key is no key ``cryptography`` takes (an RSA key of an even
    exponent): every check that reads it would end in its ValueError (session 68)."""
    try:
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return True
    return False


def _cas(ca_pem: bytes) -> list[x509.Certificate]:
    """The CA certificates of ``ca.crt`` whose key reads (``ca_problems`` lists the others)."""
    return [c for c in _load_certs(ca_pem) or [] if pki.is_ca(c) and not _unusable_key(c)]


UNUSABLE_KEY = "has a public key that is not a valid key (an RSA exponent must be odd)"


def _exponent_problem(cert: x509.Certificate) -> str | None:
    """What is wrong with the RSA exponent of a CA's key (the practice CA's, an intermediate's),
    by the leaves' rule (``_key_type_problem``: 65537 only; session 68 left these unchecked),
    or None; ``cert``'s key reads (``_unusable_key``)."""
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey) and (e := public.public_numbers().e) != (
        pki.RSA_EXPONENT
    ):
        return f"has an RSA key of exponent {e} (only {pki.RSA_EXPONENT})"
    return None


def ca_problems(
    ca_pem: bytes, now: dt.datetime, horizon: dt.timedelta, unreadable: Problem | None = None
) -> list[Problem]:
    """The practice CA file: present, CA certificates, valid now and beyond the horizon;
    ``unreadable``: it is there and could not be read (``unreadable_problem``)."""
    fix = f"put the practice CA's certificate (PEM) in DIR/{CA_FILE}"
    if unreadable is not None:
        return [unreadable]
    if not ca_pem.strip():
        return [Problem("", CA_FILE, "missing or empty", fix)]
    certs = _load_certs(ca_pem)
    if not certs:
        return [Problem("", CA_FILE, "holds no PEM certificate", fix)]
    if len(certs) > pki.MAX_PRACTICE_CAS:  # (the workstations' bundle: ``pki.MAX_BUNDLE``)
        return [
            Problem(
                "",
                CA_FILE,
                f"holds {len(certs)} certificates (at most {pki.MAX_PRACTICE_CAS})",
                "keep the practice CA(s) the node certificates chain to",
            )
        ]
    problems = []
    for cert in certs:
        who = cert.subject.rfc4514_string() or "(no subject)"
        if _unusable_key(cert):
            problems.append(Problem("", CA_FILE, f"{who} {UNUSABLE_KEY}", fix))
            continue
        if why := _exponent_problem(cert):
            renew = "make the CA a new key of exponent 65537 and issue its certificates again"
            problems.append(Problem("", CA_FILE, f"{who} {why}", renew))
        if not pki.is_ca(cert):
            problems.append(
                Problem("", CA_FILE, f"{who} is not a CA certificate (basicConstraints CA)", fix)
            )
        if _renewed_beside(cert, certs, now, horizon):
            continue  # on no path that counts (``_longest_path``): its end is not the chain's
        problems += _validity(cert, now, horizon, "", CA_FILE, f"the CA {who}", "renew the CA")
    return problems


def _renewed_beside(
    cert: x509.Certificate,
    certs: Sequence[x509.Certificate],
    now: dt.datetime,
    horizon: dt.timedelta,
) -> bool:
    """Whether ``cert``, valid now but ending within ``horizon``, has its renewal in ``certs``:
    a CA certificate of the same subject and key, valid now and beyond the horizon. Whatever
    it signed the renewal signs too, and a path through the renewal ends later, so no path
    that counts goes through ``cert`` (review s48: an old CA listed beside its renewal refused
    a good directory). One that has expired is still refused: drop it from the file."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now <= end or end >= now + horizon:
        return False
    pin = pki.spki_pin(cert)
    return any(
        other is not cert
        and pki.is_ca(other)
        and other.subject == cert.subject
        and pki.spki_pin(other) == pin
        and other.not_valid_before_utc <= now
        and other.not_valid_after_utc >= now + horizon
        for other in certs
    )


def _validity(
    cert: x509.Certificate,
    now: dt.datetime,
    horizon: dt.timedelta,
    node: str,
    file: str,
    what: str,
    fix: str,
) -> list[Problem]:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return [Problem(node, file, f"{what} is not valid before {start:%Y-%m-%d %H:%M} UTC", fix)]
    if end < now:
        return [Problem(node, file, f"{what} expired on {end:%Y-%m-%d}", fix)]
    if end < now + horizon:
        days = (end - now).days
        return [
            Problem(
                node,
                file,
                f"{what} expires on {end:%Y-%m-%d}, in {days} days (within the "
                f"{horizon.days}-day warning horizon, expiry_warning_days)",
                fix,
            )
        ]
    return []


def _key_type_problem(public: object) -> str | None:
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            return f"an RSA key of {public.key_size} bits (at least {MIN_RSA_BITS})"
        if (e := public.public_numbers().e) != pki.RSA_EXPONENT:
            return f"an RSA key of exponent {e} (only {pki.RSA_EXPONENT})"
        return None
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in CURVES:
            return f"an ECDSA key on {public.curve.name} (P-256 or P-384 only)"
        return None
    return f"a {type(public).__name__} key (RSA 2048+ or ECDSA P-256/P-384 only)"


def _apple_problems(
    node: str, file: str, leaf: x509.Certificate, chain: Sequence[x509.Certificate]
) -> list[Problem]:
    """Apple's rules for TLS server certificates (support.apple.com/103769, /102028), which
    every macOS workstation enforces: serverAuth, SHA-2, key sizes, at most 398 days, not a
    CA. The SAN (CN is ignored) is checked by ``pki.san_lacks``."""
    problems = []
    reissue = "reissue it as a TLS server certificate"
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
            problems.append(
                Problem(node, file, "extendedKeyUsage lacks serverAuth", f"{reissue} (EKU)")
            )
    except x509.ExtensionNotFound:
        problems.append(
            Problem(node, file, "has no extendedKeyUsage (Apple requires serverAuth)", reissue)
        )
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            problems.append(
                Problem(
                    node,
                    file,
                    "keyUsage lacks digitalSignature (TLS 1.3 and ECDHE sign with the key)",
                    reissue,
                )
            )
    except x509.ExtensionNotFound:
        pass  # no keyUsage: every usage allowed
    if pki.is_ca(leaf):
        problems.append(Problem(node, file, "is a CA certificate, not a server's", reissue))
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    if lifetime > MAX_VALIDITY:
        problems.append(
            Problem(
                node,
                file,
                f"is valid for {lifetime.days} days (Apple: at most {MAX_VALIDITY.days})",
                "reissue it with a shorter validity",
            )
        )
    if why := _key_type_problem(leaf.public_key()):
        problems.append(Problem(node, file, f"has {why}", "reissue it with a stronger key"))
    for cert in chain[:-1]:  # the anchor's own signature is not checked by anyone
        algorithm = cert.signature_hash_algorithm
        if not isinstance(algorithm, SHA2):
            name = algorithm.name if algorithm is not None else "no hash"
            who = "it" if cert is leaf else cert.subject.rfc4514_string()
            problems.append(
                Problem(
                    node,
                    file,
                    f"{who} is signed with {name} (SHA-256, SHA-384 or SHA-512 only)",
                    "reissue it with SHA-256",
                )
            )
    return problems


def _load_key(data: bytes) -> tuple[pki.PrivateKey | None, str]:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return None, "is encrypted (tlsroll needs it unencrypted; it is stored 0600 on the node)"
    except Exception:  # never echo the key or the parser's view of it
        return None, "is not a PEM private key"
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return None, f"is a {type(key).__name__} (RSA or ECDSA only)"
    return key, ""


def node_problems(
    item: NodeMaterial | None,
    node: str,
    expected: Expected,
    anchors: Sequence[x509.Certificate],
    now: dt.datetime,
    horizon: dt.timedelta,
    *,
    rotate: bool = False,
    unreadable: Mapping[str, Problem] | None = None,
) -> list[Problem]:
    """Every problem of one node's certificate and key (see the module docstring);
    ``unreadable``: its files that are there and could not be read (file name: problem),
    said in place of "missing"."""
    crt, keyf = f"{node}{CERT_SUFFIX}", f"{node}{KEY_SUFFIX}"
    cant = unreadable or {}
    problems: list[Problem] = []
    chain_pem = item.chain_pem if item is not None else b""
    key_pem = item.key_pem if item is not None else b""
    if crt in cant:
        problems.append(cant[crt])
    elif not chain_pem.strip():
        problems.append(
            Problem(node, crt, "missing", f"put {node}'s certificate (PEM) in DIR/{crt}")
        )
    if keyf in cant:
        problems.append(cant[keyf])
    elif not key_pem.strip():
        problems.append(Problem(node, keyf, "missing", f"put {node}'s private key in DIR/{keyf}"))
    mode = item.key_mode if item is not None else None
    if key_pem.strip() and mode is not None and mode & 0o077:
        problems.append(
            Problem(
                node,
                keyf,
                f"can be read by group or others (mode {mode:04o})",
                f"chmod 600 DIR/{keyf}",
            )
        )
    key = None
    if key_pem.strip():
        key, why = _load_key(key_pem)
        if key is None:
            problems.append(Problem(node, keyf, why, "give the certificate's private key in PEM"))
    if not chain_pem.strip():
        return problems
    certs = _load_certs(chain_pem)
    if not certs:
        problems.append(
            Problem(node, crt, "holds no PEM certificate", "put the node's certificate first")
        )
        return problems
    if bad := [c for c in certs if _unusable_key(c)]:
        who = "it" if bad[0] is certs[0] else bad[0].subject.rfc4514_string() or "(no subject)"
        problems.append(Problem(node, crt, f"{who} {UNUSABLE_KEY}", "reissue it"))
        return problems
    leaf, intermediates = certs[0], certs[1:]
    if len(intermediates) > pki.MAX_INTERMEDIATES:  # (the workstations' bundle: ``MAX_BUNDLE``)
        problems.append(
            Problem(
                node,
                crt,
                f"holds {len(intermediates)} intermediate certificates (at most "
                f"{pki.MAX_INTERMEDIATES})",
                "keep the node's certificate and the intermediates of its chain",
            )
        )
        return problems
    for cert in intermediates:
        if weak := _exponent_problem(cert):
            who = cert.subject.rfc4514_string() or "(no subject)"
            renew = "make the intermediate CA a new key of exponent 65537 and reissue it"
            problems.append(Problem(node, crt, f"the intermediate {who} {weak}", renew))
    fingerprint = pki.fingerprint(leaf)
    # The path clients take, as ``chain_ends`` records it: not the first CA listed that signed
    # a link (an old intermediate before its renewal refused a good directory once it ended
    # within the horizon: review s48).
    chain = _longest_path(leaf, intermediates, anchors)
    # No CA certificate to check against (ca.crt unreadable, empty, holding none or no CA):
    # ca.crt's problem says so once, not "not signed by the CA" for each node (s49cli L5).
    if chain is None and anchors:
        problems.append(
            Problem(
                node,
                crt,
                f"not signed by the CA in {CA_FILE} (issuer {leaf.issuer.rfc4514_string()})",
                "use a certificate the practice CA issued, with any intermediate CA after it "
                "in the same file",
            )
        )
    if key is not None and not pki.key_matches(leaf, key):
        problems.append(
            Problem(
                node, keyf, f"does not belong to {crt}", "give the key the certificate was made for"
            )
        )
    missing = pki.san_lacks(leaf, expected.names)
    if missing is None:
        problems.append(
            Problem(
                node,
                crt,
                "has no subjectAltName (clients ignore the CN)",
                f"reissue it with {', '.join(_wanted(expected.names))}",
            )
        )
    elif missing:
        problems.append(
            Problem(
                node,
                crt,
                f"its subjectAltName lacks {', '.join(missing)}, which the node serves on",
                f"reissue it with {', '.join(_wanted(expected.names))}",
            )
        )
    problems += _validity(leaf, now, horizon, node, crt, "it", "use a newer certificate")
    for extra in (chain or [])[1:-1]:
        what = f"the intermediate {extra.subject.rfc4514_string()}"
        problems += _validity(extra, now, horizon, node, crt, what, "renew the intermediate CA")
    problems += _apple_problems(node, crt, leaf, chain or [leaf])
    if rotate and expected.live_fingerprint and fingerprint == expected.live_fingerprint:
        problems.append(
            Problem(
                node,
                crt,
                "is the certificate the node already serves",
                "rotate-cert needs a new certificate",
            )
        )
    if not problems and chain is not None:
        problems += _client_view(node, crt, chain, expected.names, now)
    return problems


def _wanted(names: pki.Names) -> list[str]:
    return [f"IP:{ip}" for ip in names.ips] + [f"DNS:{d}" for d in names.dns]


def _client_view(
    node: str,
    file: str,
    chain: Sequence[x509.Certificate],
    names: pki.Names,
    now: dt.datetime,
) -> list[Problem]:
    """What a TLS client's path validation (``cryptography``'s, RFC 5280 with the CA/B
    Forum's profile) says for each name: a last check beyond the ones above."""
    store = verification.Store([chain[-1]])
    verifier = verification.PolicyBuilder().store(store).time(now)
    subjects: list[verification.Subject] = [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in names.ips
    ] + [x509.DNSName(d) for d in names.dns]
    for subject in subjects:
        try:
            verifier.build_server_verifier(subject).verify(chain[0], list(chain[1:-1]))
        except verification.VerificationError as exc:
            return [
                Problem(
                    node,
                    file,
                    f"a TLS client would refuse it for {subject.value}: {exc}",
                    "reissue it as a TLS server certificate",
                )
            ]
    return []


def validate(
    material: Material,
    expected: Mapping[str, Expected],
    *,
    now: dt.datetime,
    horizon: dt.timedelta,
    rotate: bool = False,
) -> list[Problem]:
    """Every problem of the directory for the nodes in ``expected`` (those the rollout would
    touch); files of other nodes are ignored, whether or not they could be read. Empty: every
    node's certificate can be used."""
    problems = ca_problems(material.ca_pem, now, horizon, unreadable_problem(material, "", CA_FILE))
    anchors = _cas(material.ca_pem)
    for node in sorted(expected):
        cant = {
            name: p
            for suffix in (CERT_SUFFIX, KEY_SUFFIX)
            if (p := unreadable_problem(material, node, name := f"{node}{suffix}")) is not None
        }
        problems += node_problems(
            material.nodes.get(node),
            node,
            expected[node],
            anchors,
            now,
            horizon,
            rotate=rotate,
            unreadable=cant,
        )
    return problems


def ca_bundle(material: Material) -> bytes:
    """The practice CA certificates of a validated directory, as plain PEM (any text around
    them dropped)."""
    certs = _load_certs(material.ca_pem) or []
    return b"".join(pki.cert_to_pem(c) for c in certs if pki.is_ca(c))


def chain_pem(item: NodeMaterial) -> bytes:
    """A validated node's certificate and intermediates, as plain PEM."""
    return b"".join(pki.cert_to_pem(c) for c in pki.load_certs_pem(item.chain_pem))


def chain_ends(
    material: Material, nodes: Iterable[str]
) -> dict[str, tuple[str, dt.datetime] | None]:
    """Per certificate of ``nodes`` (by its fingerprint) whose chain ends before it does:
    the subject and end of the chain's certificate that ends first (an intermediate, or the
    practice CA it chains to); None for one its whole chain outlives (a later rollout with a
    chain renewed since clears what an earlier one recorded: review s47rev5 M1). Checked
    once, beyond the horizon, at the start (``validate``); recorded with the rollout
    (``SchemaStore.create``) so that the expiry watch warns of the chain's end, where the
    leaf's own row read "ok" until the chain broke (review s46rt1 L4). A validated
    directory's; a node whose files do not parse is left out.
    Of the leaf's paths to the practice CA, the one whose earliest end is latest counts
    (``_longest_path``): a bundle with the practice CA and its renewal (same key and subject)
    recorded the old one's end or none by their order (review s47rev5 L3); clients, given
    the whole bundle (``ca_bundle``), take the path that is still valid."""
    anchors = _cas(material.ca_pem)
    ends: dict[str, tuple[str, dt.datetime] | None] = {}
    for node in sorted(nodes):
        item = material.nodes.get(node)
        certs = _load_certs(item.chain_pem) if item is not None else None
        if not certs:
            continue
        leaf, extra = certs[0], certs[1:]
        path = _longest_path(leaf, extra, anchors) or [leaf, *extra, *anchors]
        first = min(path[1:], key=lambda c: c.not_valid_after_utc, default=None)
        if first is not None and first.not_valid_after_utc < leaf.not_valid_after_utc:
            who = first.subject.rfc4514_string() or "(no subject)"
            ends[pki.fingerprint(leaf)] = (who, first.not_valid_after_utc)
        else:
            ends[pki.fingerprint(leaf)] = None
    return ends


def _longest_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
) -> list[x509.Certificate] | None:
    """Of every path leaf -> intermediates -> one of ``anchors`` (each link as
    ``pki.chain_to`` checks it, at most ``pki.MAX_CHAIN`` long), the one whose certificate that
    ends first ends latest; None if there is none. ``pki.chain_to`` takes the first anchor
    (and intermediate) that signed a link, whichever ends first. The one rule of the check
    before a rollout (``node_problems``) and of the chain end it records (``chain_ends``)."""
    best: list[x509.Certificate] | None = None
    best_end: dt.datetime | None = None

    def walk(path: list[x509.Certificate]) -> None:
        nonlocal best, best_end
        current = path[-1]
        for anchor in anchors:
            if pki.issued_by(current, anchor):
                end = min(c.not_valid_after_utc for c in [*path[1:], anchor])
                if best_end is None or end > best_end:
                    best, best_end = [*path, anchor], end
        if len(path) >= pki.MAX_CHAIN:
            return
        for step in intermediates:
            if step not in path and pki.is_ca(step) and pki.issued_by(current, step):
                walk([*path, step])

    walk([leaf])
    return best


def accepted(material: Material, nodes: Iterable[str]) -> list[Accepted]:
    """What ``plan`` shows of certificates that passed ``validate``, and the CA of ``ca.crt``
    each one's chain ends at, taken up to its root where ``ca.crt`` holds that too
    (``Accepted.ca_pin``, ``_top_in``: the notice gives the workstations that CA's pin; a
    workstation set up by the password alone lists every CA its server's certificate chains
    up to, ``pki.cas_above``, to compare it with)."""
    anchors = _cas(material.ca_pem)
    out = []
    for node in sorted(nodes):
        leaf, *extra = pki.load_certs_pem(material.nodes[node].chain_pem)
        path = _longest_path(leaf, extra, anchors)
        out.append(
            Accepted(
                node,
                pki.fingerprint(leaf),
                leaf.not_valid_after_utc,
                leaf.subject.rfc4514_string(),
                pki.spki_pin(_top_in(path[-1], anchors, len(path) - 1)) if path else "",
            )
        )
    return out


def _top_in(
    ca: x509.Certificate, anchors: Sequence[x509.Certificate], depth: int = 1
) -> x509.Certificate:
    """``ca`` (one of ``anchors``, the CAs of ``ca.crt``), or the CA of ``anchors`` that issued
    it, and so on up to a self-signed one: never a CA the practice did not put in ``ca.crt``
    (rev57a L2: a root's cross-certificate in a node's ``.crt`` led to a third party's root),
    nor one more than ``pki.MAX_CHAIN`` links above the leaf (``depth``: ``ca``'s; a
    workstation's path search goes no higher, and the notice's ``--ca-pin`` command would fail:
    rev57d L3)."""
    top = ca
    for _ in range(max(pki.MAX_CHAIN - depth, 0)):
        if pki.issued_by(top, top):
            break
        up = next((c for c in anchors if c != top and pki.issued_by(top, c)), None)
        if up is None:
            break
        top = up
    return top


def bundle_pin(ca_pem: bytes) -> str:
    """The CA pin of a ``--cert-dir`` rollout stored before each node's was (its ``ca.crt``'s
    CAs only, ``SchemaStore.own_ca``): of its self-signed CAs the first, else its first CA,
    taken as ``_top_in`` takes it; "" if none reads. A node's chain is not stored, so with two
    unrelated roots in ``ca.crt`` this may be the other one's (rev57a M1: the first certificate
    was taken, an intermediate where ``ca.crt`` listed it before its root)."""
    cas = _cas(ca_pem)
    roots = [c for c in cas if pki.issued_by(c, c)]
    if roots:
        return pki.spki_pin(roots[0])
    return pki.spki_pin(_top_in(cas[0], cas, 0)) if cas else ""


# --- the leader's custody of the keys -------------------------------------------------------


class Vault:
    """The keys of the running BYO rollout, in the leader's memory only (never on disk).

    ``put`` when the rollout starts (it replaces whatever an earlier rollout left), ``get``
    in the stage step, ``drop`` once the node has staged its key (or its stage ended). A
    leader that restarts has none: a node that has staged its key goes on (the agent keeps
    it); one that has not fails its stage with what to do (start again with --cert-dir)."""

    def __init__(self) -> None:
        self._rollout = ""
        self._nodes: dict[str, NodeMaterial] = {}

    def put(self, rollout_id: str, nodes: Mapping[str, NodeMaterial]) -> None:
        self._rollout, self._nodes = rollout_id, dict(nodes)

    def get(self, rollout_id: str, node: str) -> NodeMaterial | None:
        return self._nodes.get(node) if rollout_id == self._rollout else None

    def drop(self, rollout_id: str, node: str) -> None:
        if rollout_id == self._rollout:
            self._nodes.pop(node, None)

    @property
    def rollout_id(self) -> str:
        return self._rollout

    def forget(self, rollout_id: str) -> None:
        """Forget every key of ``rollout_id`` (it has ended)."""
        if rollout_id == self._rollout:
            self._rollout, self._nodes = "", {}

    def __repr__(self) -> str:
        return f"Vault(rollout={self._rollout!r}, nodes={sorted(self._nodes)})"
