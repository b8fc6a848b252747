"""Keys, CSRs, certificates and pins: everything tlsroll does with X.509, on ``cryptography``.

One small CA (``CertificateAuthority``) with one certificate builder for every leaf, after
trustme. Leaf certificates follow Apple's rules for TLS server certificates so that macOS
workstations accept them: every IP and DNS name in the SAN, EKU serverAuth, SHA-256, at most
397 days, a random serial, NotBefore backdated for clock skew. Keys are ECDSA P-256.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsroll import lifetimes as _lifetimes
from tlsroll import names as _names
from tlsroll import spiffe
from tlsroll.errors import PKIError, PKIReason
from tlsroll.fsutil import PRIVATE, PUBLIC, check_private_file, write_atomic

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# What ``tlsroll.names`` holds (no X.509 there), under the names callers use: ``pki.Names``, …
BACKDATE = _names.BACKDATE
DNS_NAME = _names.DNS_NAME
EVERY_HOST_IPS = _names.EVERY_HOST_IPS
MAX_DNS = _names.MAX_DNS
MAX_IPS = _names.MAX_IPS
NODE_NAME = _names.NODE_NAME
RESERVED_PREFIXES = _names.RESERVED_PREFIXES
Names = _names.Names
describe = _names.describe
dns_given = _names.dns_given
dns_problem = _names.dns_problem
ip_problem = _names.ip_problem
node_name_problem = _names.node_name_problem
parse_pin = _names.parse_pin
requested_names_problem = _names.requested_names_problem
utcnow = _names.utcnow

# What ``tlsroll.lifetimes`` holds (no X.509 there either): how long a leaf lives.
LEAF_VALIDITY_DAYS = _lifetimes.LEAF_VALIDITY_DAYS
MIN_LIFETIME = _lifetimes.MIN_LIFETIME
SPREAD_FRACTION = _lifetimes.SPREAD_FRACTION
SPREAD_MAX = _lifetimes.SPREAD_MAX
SPREAD_FROM = _lifetimes.SPREAD_FROM
spread = _lifetimes.spread
CA_VALIDITY_DAYS = 3650


# --- keys -------------------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; with ``passphrase`` encrypted under scrypt (``tlsroll.keywrap``, not
    ``cryptography``'s 2048 iterations of PBKDF2)."""
    if passphrase:
        # Imported here: only the leader encrypts keys (its CA's), and an agent imports this
        # module on its way to a rollout's first switch (issue 15; 4 modules, ~3 ms).
        from tlsroll import keywrap  # noqa: PLC0415

        return keywrap.encrypt(key, passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key_pem(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # encrypted without passphrase, or passphrase for a plain key
        raise PKIError(PKIReason.BAD_PASSPHRASE, "passphrase missing or not needed") from exc
    except ValueError as exc:
        if b"ENCRYPTED" in data:
            raise PKIError(PKIReason.BAD_PASSPHRASE) from exc
        raise PKIError(PKIReason.BAD_PEM, "private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(PKIReason.KEY_TYPE, type(key).__name__)
    return key


def write_key(path: Path, key: PrivateKey, passphrase: bytes | None = None) -> None:
    """Write a private key, 0600 from the first byte."""
    write_atomic(path, key_to_pem(key, passphrase), PRIVATE)


def read_key(
    path: Path, passphrase: bytes | None = None, *, shared: tuple[int, int] | None = None
) -> PrivateKey:
    """Read a private key, refusing one that others can read (``shared``: the (uid, gid) of a
    managed server's user a key the agent staged may belong to and its group be read by:
    ``fsutil.check_private_file``)."""
    check_private_file(path, shared=shared)
    return load_key_pem(Path(path).read_bytes(), passphrase)


# --- certificates -----------------------------------------------------------------------------


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert_pem(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PKIError(PKIReason.BAD_PEM, "certificate") from exc


def load_certs_pem(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PKIError(PKIReason.BAD_PEM, "certificate bundle") from exc


def write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert_to_pem(cert), PUBLIC)


def read_cert(path: Path) -> x509.Certificate:
    return load_cert_pem(Path(path).read_bytes())


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the DER certificate."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def spki_pin(key: x509.Certificate | PublicKey) -> str:
    """``sha256:<hex>`` of the DER SubjectPublicKeyInfo (kubeadm's discovery-token-ca-cert-hash)."""
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    return spki_pin(cert) == spki_pin(key.public_key())


def ends_with_ca(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``cert`` already lives as long as ``ca`` lets a leaf live: one issued now would
    end no later (``CertificateAuthority.issue`` cuts leaves to the CA's end), so issuing it
    again because its end is near only issues it again at every check."""
    return cert.not_valid_after_utc >= ca.not_valid_after_utc


def not_valid_yet(cert: x509.Certificate, ca: x509.Certificate, now: dt.datetime) -> bool:
    """Whether ``cert`` (one of the leader's own, issued by ``ca``) begins after ``now``, so
    that peers refuse it till then: issued by a clock that ran ahead, to be issued again. Not
    when ``now`` is before the CA's own start: no clock but a wrong one is (reset at a boot),
    what it would issue then ends before its peers' now, and the certificate it has is the
    one they take."""
    return cert.not_valid_before_utc > now >= ca.not_valid_before_utc


def is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


# How far ahead a renewed CA certificate may start (a leader's clock a little ahead), and how
# much longer than ``CA_VALIDITY_DAYS`` from now it may run (``renewed_ca_problem``).
RENEWED_CA_START_SLACK = dt.timedelta(minutes=5)
RENEWED_CA_END_SLACK = dt.timedelta(days=1)


def _extensions(cert: x509.Certificate) -> list[tuple[str, bool, bytes]]:
    """``cert``'s extensions as (OID, critical, DER value), sorted: what two certificates
    must share to be a renewal of one another."""
    return sorted((ext.oid.dotted_string, ext.critical, _der(ext)) for ext in cert.extensions)


def _der(ext: x509.Extension[x509.ExtensionType]) -> bytes:
    try:
        return ext.value.public_bytes()
    except (NotImplementedError, ValueError):  # (a type cryptography cannot encode again)
        return repr(ext.value).encode()


def renewed_ca_problem(
    offered: x509.Certificate, held: x509.Certificate, pin: str, now: dt.datetime | None = None
) -> str | None:
    """Why ``offered`` is not a renewal with the same key (``tlsroll ca renew``) of the CA
    certificate ``held``, for the key ``pin`` names (None: it is). One check for every side
    that takes it: the agent (its ``DATA/ca.pem``), the node's bootstrap service (the bundle it
    hands a workstation) and the leader (``CertificateAuthority.adopt``).

    A renewal is a self-signed CA certificate for the pinned key with ``held``'s subject,
    signature algorithm and extensions, all of them, byte for byte (``basicConstraints`` with
    its ``pathLenConstraint``, ``keyUsage``, ``nameConstraints`` if any, the key identifier;
    none that this library does not know marked critical), that starts no later than
    ``RENEWED_CA_START_SLACK`` from ``now`` (a trust anchor not yet valid cuts the node off)
    and ends after ``held`` and no later than ``CA_VALIDITY_DAYS`` (and a day) from ``now``.
    Only the holder of the CA key can make one; this keeps a leader's bug or a wrong clock
    from making a trust anchor that is weaker, or that nothing verifies."""
    now = now or utcnow()
    if not is_ca(offered):
        return "it is not a CA certificate"
    if not pin or spki_pin(offered) != pin:
        return "its key is not the CA key this node pinned ([leader].ca_pin)"
    if not issued_by(offered, offered):
        return "it is not self-signed by the pinned key"
    if offered.subject != held.subject:
        return "its subject is not the one of the CA certificate this node holds"
    if offered.signature_algorithm_oid != held.signature_algorithm_oid:
        return "its signature algorithm is not the one of the CA certificate this node holds"
    unknown = [
        ext.oid.dotted_string
        for ext in offered.extensions
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension)
    ]
    if unknown:
        return f"it has a critical extension this node does not know ({', '.join(unknown)})"
    if _extensions(offered) != _extensions(held):
        return (
            "its extensions (basic constraints, key usage, name constraints, key identifier) "
            "are not those of the CA certificate this node holds"
        )
    if offered.not_valid_before_utc > now + RENEWED_CA_START_SLACK:
        return f"it starts in the future ({offered.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)"
    if offered.not_valid_after_utc <= held.not_valid_after_utc:
        return "it ends no later than the CA certificate this node holds"
    if offered.not_valid_after_utc > now + dt.timedelta(days=CA_VALIDITY_DAYS) + (
        RENEWED_CA_END_SLACK
    ):
        return f"it ends more than {CA_VALIDITY_DAYS} days from now"
    return None


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_valid_now(cert: x509.Certificate, now: dt.datetime | None = None) -> None:
    now = now or utcnow()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PKIError(
            PKIReason.EXPIRED,
            f"valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}",
        )


MAX_CHAIN = 5
MAX_BUNDLE = 100
"""The most certificates a node's CA bundle may hold for a workstation (the cluster CA and its
renewals, a practice's CAs from ``ca.crt``, at most ``MAX_PRACTICE_CAS``, and intermediates):
every path through them costs signature checks, and a bundle from someone in between is not
trusted (rev57c L2: 400 CAs took seconds). The leader refuses a ``--cert-dir`` directory that
would come near it (``leader.byo``; rev57d M1: a bundle of 41 it took was refused here)."""
MAX_PRACTICE_CAS = 20  # CA certificates in a --cert-dir ca.crt, at most
MAX_INTERMEDIATES = 8  # intermediates in a --cert-dir node's .crt, at most


def chain_to(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
) -> list[x509.Certificate] | None:
    """A path leaf → intermediate CAs → one of ``anchors`` (each link's issuer name and
    signature checked), or None if there is none (a certificate brought by the practice,
    ``--cert-dir``, may come with intermediates). Every path is tried, depth first, at most
    ``MAX_CHAIN`` long: an intermediate cross-signed by two roots leads to each (rev57a M2: the
    first intermediate that signed a link was taken, and a path through its twin never
    tried). An intermediate is gone up from again only with more links left than when it was
    last (``tried``: it found no anchor then, and finds none with as few; rev57c L1: once
    only, one first met deep in a path was never tried from a shorter one): a bundle from a
    node is not trusted, and one of many CAs of one name must not cost a path of each of
    their orders."""
    tried: dict[int, int] = {}  # id of an intermediate: the most links it was tried with

    def walk(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        current = path[-1]
        for anchor in anchors:
            if issued_by(current, anchor):
                return [*path, anchor]
        if len(path) >= MAX_CHAIN:
            return None
        left = MAX_CHAIN - len(path)
        for step in intermediates:
            if step in path or tried.get(id(step), -1) >= left or not is_ca(step):
                continue
            if issued_by(current, step):
                tried[id(step)] = left
                found = walk([*path, step])
                if found is not None:
                    return found
        return None

    return walk([leaf])


def cas_above(cert: x509.Certificate, bundle: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Every CA of ``bundle`` that ``cert`` chains up to (each link's signature checked, at
    most ``MAX_CHAIN`` links), nearest first: a server certificate's issuer, its issuer's, up
    to a root, along every path (a cross-signed CA's both). What a workstation set up by the
    password alone says to compare with the notice's CA pin: one of them must be the CA the
    notice names (the leader's ``byo.Accepted.ca_pin``), whatever the practice put in its
    ``ca.crt``."""
    found: list[x509.Certificate] = []
    level = [cert]
    for _ in range(MAX_CHAIN):
        up = [
            c
            for c in bundle
            if c not in found
            and c not in level
            and is_ca(c)
            and any(issued_by(x, c) for x in level)
        ]
        if not up:
            break
        found += up
        level = up
    return found


def san_lacks(cert: x509.Certificate, names: Names) -> list[str] | None:
    """Which of ``names``' addresses and DNS names the certificate's SAN lacks (``IP:…``,
    ``DNS:…``; a DNS name may match a one-label wildcard); None if it has no SAN at all."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    dns = {dns_given(d) for d in san.get_values_for_type(x509.DNSName)}
    missing = [f"IP:{ip}" for ip in names.ips if str(ipaddress.ip_address(ip)) not in ips]
    for name in names.dns:
        wildcard = "*." + name.split(".", 1)[1] if "." in name else ""
        if name not in dns and wildcard not in dns:
            missing.append(f"DNS:{name}")
    return missing


def find_pinned_ca(chain: Sequence[x509.Certificate], pin: str) -> x509.Certificate:
    """Return the CA certificate in ``chain`` whose key matches ``pin``, having checked that it
    is a CA and that the first certificate (the server's) was issued by it."""
    pin = parse_pin(pin)
    for cert in chain:
        if spki_pin(cert) == pin:
            if not is_ca(cert):
                raise PKIError(PKIReason.NOT_CA, "the pinned certificate")
            if chain and not issued_by(chain[0], cert):
                raise PKIError(PKIReason.UNTRUSTED, "the server certificate")
            return cert
    raise PKIError(PKIReason.PIN_MISMATCH, "no certificate the server sent has that key")


# --- names ------------------------------------------------------------------------------------


def san_of(names: Names) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in names.ips]
    general += [x509.DNSName(d) for d in names.dns]
    return x509.SubjectAlternativeName(general)


def names_of(obj: x509.Certificate | x509.CertificateSigningRequest) -> Names:
    """The names ``obj`` is for: its CN, and its IP and DNS names, from the SAN, or for a
    certificate of a party of the cluster (``issue(..., names_apart=True)``) from
    ``NAMES_OID``, where no TLS client takes them as names the certificate serves. Never a
    CSR's extension: a CSR names what it asks for in its SAN. A well-formed extension is read
    in any certificate (a caller checks who issued it first); a malformed one (no certificate
    of the cluster CA) is not: the SAN's names are then the certificate's, and a check of a
    party's names refuses them."""
    cns = obj.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if isinstance(obj, x509.Certificate):
        with contextlib.suppress(PKIError):
            apart = names_apart(obj)
            if apart is not None:
                return Names.of(cn, apart[0], apart[1])
    try:
        san = obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Names.of(cn)
    # The cluster's own names (``tlsroll.spiffe``) are not names a client dials.
    internal = "." + spiffe.INTERNAL_TLD
    return Names.of(
        cn,
        (str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
        (d for d in san.get_values_for_type(x509.DNSName) if not d.endswith(internal)),
    )


# --- names kept apart from the SAN -----------------------------------------------------------

NAMES_OID = x509.ObjectIdentifier("2.25.212121164415218904617541206231840272307")
"""tlsroll's certificate extension (non-critical; an OID under ``2.25``, a UUID's, ITU-T
X.667) for the names a party of the cluster is enrolled for, kept out of the SAN: a DER
``GeneralNames`` of its IP addresses and DNS names, the SAN's own syntax.

Why: the workstations trust the cluster CA for the practice servers' certificates, and a TLS
client takes every IP address and DNS name in a certificate's SAN as one it may serve. A node's
agent certificate with the node's address in its SAN was a server certificate for that address
to every practice PC: a copy of an agent's key, or a join token that leaked before it was used,
let its holder pose as that node's practice server from a position on the path, and no
workstation reads the revocation list. The agents' and the leader's certificates carry the
names here instead; their peers dial them by their names under ``.invalid``
(``tlsroll.spiffe``), which no client of a practice server ever uses. The names stay in the
certificate so that an agent can check at its start that its certificate is for the node its
config describes, and so that a leader begun again can learn a node from it
(``names_of`` reads either place)."""

_MAX_NAMES_DER = 4096  # what names_apart reads; MAX_IPS + MAX_DNS of the longest names fit


def _der_length(data: bytes, at: int) -> tuple[int, int]:
    """A DER length at ``data[at]``: (length, where its content begins). ValueError if it is
    not DER's (short form, or long form of one or two bytes without a leading zero)."""
    first = data[at]
    if first < 0x80:
        return first, at + 1
    count = first & 0x7F
    if count not in (1, 2) or at + 1 + count > len(data):
        raise ValueError("length")
    length = int.from_bytes(data[at + 1 : at + 1 + count], "big")
    if length < 0x80 or (count == 2 and length < 0x100):
        raise ValueError("length not minimal")
    return length, at + 1 + count


def _names_der(names: Names) -> bytes:
    return x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(i)) for i in names.ips]
        + [x509.DNSName(d) for d in names.dns]
    ).public_bytes()


def names_apart(cert: x509.Certificate) -> tuple[list[str], list[str]] | None:
    """The IP addresses and DNS names in ``cert``'s ``NAMES_OID`` extension; None if it has
    none. PKIError if the extension is there and not one DER SEQUENCE of iPAddress (4 or 16
    bytes) and non-empty ASCII dNSName entries (the names themselves are not judged: the
    caller has checked who issued the certificate, and compares them with what it expects)."""
    try:
        ext = cert.extensions.get_extension_for_oid(NAMES_OID).value
    except x509.ExtensionNotFound:
        return None
    data = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    ips: list[str] = []
    dns: list[str] = []
    try:
        if len(data) > _MAX_NAMES_DER or len(data) < 2 or data[0] != 0x30:
            raise ValueError("not a SEQUENCE")
        length, at = _der_length(data, 1)
        if at + length != len(data):
            raise ValueError("trailing bytes")
        while at < len(data):
            tag = data[at]
            length, begin = _der_length(data, at + 1)
            end = begin + length
            if end > len(data):
                raise ValueError("truncated")
            value = data[begin:end]
            if tag == 0x87 and length in (4, 16):  # [7] iPAddress
                ips.append(str(ipaddress.ip_address(value)))
            elif tag == 0x82 and length:  # [2] dNSName (IA5String)
                dns.append(value.decode("ascii"))
            else:
                raise ValueError(f"entry tag {tag:#x}")
            at = end
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise PKIError(
            PKIReason.UNTRUSTED, f"tlsroll's names extension is malformed: {exc}"
        ) from None
    return ips, dns


def serves_names(cert: x509.Certificate) -> list[str]:
    """The IP addresses and DNS names a TLS client would take ``cert`` as serving: its SAN's,
    but for the cluster's own ``.invalid`` names (``IP:…``, ``DNS:…``)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    internal = "." + spiffe.INTERNAL_TLD
    return [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)] + [
        f"DNS:{d}" for d in san.get_values_for_type(x509.DNSName) if not d.endswith(internal)
    ]


def _san(
    names: Names | None, identity: spiffe.Identity | None, internal_dns: Sequence[str]
) -> x509.SubjectAlternativeName:
    general = list(san_of(names)) if names is not None else []
    general += [x509.DNSName(d) for d in internal_dns]
    if identity is not None:
        general.append(x509.UniformResourceIdentifier(identity.uri))
    return x509.SubjectAlternativeName(general)


# --- CSRs -------------------------------------------------------------------------------------


def make_csr(
    key: PrivateKey, names: Names, extensions: Sequence[x509.ExtensionType] = ()
) -> x509.CertificateSigningRequest:
    """A CSR for ``names``; ``extensions`` are added, non-critical."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names.common_name)]))
        .add_extension(san_of(names), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256())


def csr_to_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr_pem(data: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise PKIError(PKIReason.BAD_CSR) from exc
    try:
        valid = csr.is_signature_valid
    except ValueError:  # a key no RSA or EC key is (an even RSA exponent): not the parser's view
        raise PKIError(PKIReason.KEY_TYPE, "its public key is not a valid key") from None
    if not valid:
        raise PKIError(PKIReason.BAD_SIGNATURE)
    return csr


MAX_RSA_BITS = 4096
"""The largest RSA key the CA signs for: what the public CAs take. A larger one (OpenSSL takes
up to 16384 bits) costs every TLS peer that verifies with it, at every handshake (review s67
L4): an outside CSR's (an agent's enrolment or renewal, a rollout's staged key) is refused."""
RSA_EXPONENT = 65537
"""The one RSA public exponent taken, wherever an RSA key is (a CSR's, a brought certificate's):
what every key generator makes. A small one (3) is the one that low-exponent attacks on badly
padded RSA need; 1 or an even one is no RSA key at all (session 68)."""
ISSUED_KEYS = f"ECDSA P-256 or RSA of 2048 to {MAX_RSA_BITS} bits with exponent {RSA_EXPONENT}"
"""The keys the CA issues certificates for (``key_kind_problem``)."""


def key_kind_problem(key: PublicKey) -> str | None:
    """What kind of key ``key`` is if the CA issues no certificate for it (``ISSUED_KEYS``),
    else None: "ECDSA curve secp384r1", "RSA 1024 bits", "RSA exponent 3"."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            return f"ECDSA curve {key.curve.name}"
    elif not 2048 <= key.key_size <= MAX_RSA_BITS:
        return f"RSA {key.key_size} bits"
    elif (e := key.public_numbers().e) != RSA_EXPONENT:
        return f"RSA exponent {e}"
    return None


def check_csr(csr: x509.CertificateSigningRequest, expected: Names) -> PublicKey:
    """Check a CSR against what the node claims; return its public key.

    The key must be one the CA issues for (``ISSUED_KEYS``), the CSR must not ask for a CA, and
    its CN and SAN must be exactly ``expected``.
    """
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise PKIError(PKIReason.KEY_TYPE, type(key).__name__)
    if (kind := key_kind_problem(key)) is not None:
        raise PKIError(PKIReason.KEY_TYPE, f"{kind} (the CA signs {ISSUED_KEYS})")
    try:
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        pass
    else:
        if bc.ca:
            raise PKIError(PKIReason.CA_REQUESTED)
    got = names_of(csr)
    if got != expected:
        raise PKIError(
            PKIReason.NAME_MISMATCH,
            f"CSR has {describe(got)}, claimed {describe(expected)}",
        )
    return key


# --- the CA -----------------------------------------------------------------------------------


class CertificateAuthority:
    """A CA certificate and its key; issues leaf certificates with one shared builder."""

    def __init__(self, cert: x509.Certificate, key: PrivateKey) -> None:
        if not is_ca(cert):
            raise PKIError(PKIReason.NOT_CA)
        if not key_matches(cert, key):
            raise PKIError(PKIReason.KEY_MISMATCH, "CA")
        self.cert = cert
        self.key = key
        # The lifetime of the certificates ``sign_csr`` issues (the nodes' https certificates);
        # None: LEAF_VALIDITY_DAYS. The leader sets it from ``server_cert_lifetime``.
        self.csr_lifetime: dt.timedelta | None = None

    @classmethod
    def create(
        cls, common_name: str = "tlsroll multiserver CA", *, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        key = generate_key()
        now = now or utcnow()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsroll"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
            # A CA that may sign leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,  # signs certificates
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return cert_to_pem(self.cert)

    def renewed_cert(self, now: dt.datetime | None = None) -> x509.Certificate:
        """The CA certificate renewed with the same key (docs/ca-renewal.md, "renewal with the
        same key"): its subject (and issuer), key and extensions as they are (the key
        identifier, ``pathLenConstraint`` 0), a new serial, valid from this one's start (or
        ``now`` less ``BACKDATE`` if earlier) to ``CA_VALIDITY_DAYS`` from ``now``. Its pin
        and trust domain are this one's, and every leaf this CA issued chains to it unchanged
        (same issuer name, same key)."""
        now = now or utcnow()
        # It starts when this one did, or an hour ago if that is earlier: never after now,
        # even by a leader's clock that is ahead (an agent refuses a CA certificate that
        # starts in the future, and a trust anchor not yet valid verifies nothing).
        start = min(self.cert.not_valid_before_utc, now - BACKDATE)
        # It ends later than this one, even renewed again within the same second (X.509
        # times are whole seconds): an agent takes only a later end.
        end = max(
            now + dt.timedelta(days=CA_VALIDITY_DAYS),
            self.cert.not_valid_after_utc + dt.timedelta(seconds=1),
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(self.cert.subject)
            .issuer_name(self.cert.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )
        for extension in self.cert.extensions:
            builder = builder.add_extension(extension.value, critical=extension.critical)
        return builder.sign(self.key, hashes.SHA256())

    def adopt(self, cert: x509.Certificate, now: dt.datetime | None = None) -> None:
        """Use ``cert`` as this CA's certificate from now on (a renewal of it, as
        ``renewed_cert`` makes): refused unless it is one by the check the agents make
        (``renewed_ca_problem``: a self-signed CA certificate for this CA's key with its
        subject and extensions, a later end), so that its pin and trust domain stay what they
        were and the agents take it."""
        if not is_ca(cert):
            raise PKIError(PKIReason.NOT_CA)
        if not key_matches(cert, self.key):
            raise PKIError(PKIReason.KEY_MISMATCH, "CA")
        if (why := renewed_ca_problem(cert, self.cert, spki_pin(self.cert), now)) is not None:
            raise PKIError(PKIReason.UNTRUSTED, f"the renewed CA certificate: {why}")
        self.cert = cert

    def issue(
        self,
        public_key: PublicKey,
        names: Names,
        *,
        server: bool = True,
        client: bool = False,
        validity_days: int = LEAF_VALIDITY_DAYS,
        now: dt.datetime | None = None,
        identity: spiffe.Identity | None = None,
        internal_dns: Sequence[str] = (),
        lifetime: dt.timedelta | None = None,
        names_apart: bool = False,
        serial: int | None = None,
    ) -> x509.Certificate:
        """Issue a leaf certificate for ``public_key`` carrying exactly ``names``, and with
        ``identity`` its cluster identity (URI SAN) and ``internal_dns`` its names under
        ``.invalid`` (see ``tlsroll.spiffe``). ``lifetime`` (from now; at least ``MIN_LIFETIME``,
        for tests of renewal) replaces ``validity_days``. ``names_apart``: ``names``' addresses
        and DNS names go into ``NAMES_OID``, not the SAN, whose names are then ``internal_dns``
        alone: a certificate no client takes as serving the node's names (an agent's, the
        leader's; it needs ``internal_dns``).

        No leaf outlives the CA: one that would is cut to end with it, and a warning is logged
        (``certificate.cut_to_ca_end``); once the CA has ended, nothing is issued (PKIError).
        ``ends_with_ca`` tells a renewal check that a new certificate would end no later.
        ``serial``: the serial to give it (one drawn by ``x509.random_serial_number`` that a
        name in ``internal_dns`` carries: the leader's); a new random one if None."""
        if lifetime is None:
            if not 1 <= validity_days <= LEAF_VALIDITY_DAYS:
                raise ValueError(f"validity must be 1..{LEAF_VALIDITY_DAYS} days")
            lifetime = dt.timedelta(days=validity_days)
        if not MIN_LIFETIME <= lifetime <= dt.timedelta(days=LEAF_VALIDITY_DAYS):
            raise ValueError(f"lifetime must be {MIN_LIFETIME}..{LEAF_VALIDITY_DAYS} days")
        if not (names.ips or names.dns):
            raise ValueError("a certificate needs at least one IP address or DNS name")
        if names_apart and not internal_dns:
            # Not only for its peers to dial it by: with no DNS name in the SAN, a client that
            # still falls back to the subject's CN (Python's ssl, ``openssl verify
            # -verify_hostname``) would take the certificate as serving its CN, a node's name
            # that a practice LAN may well resolve (review s59). A DNS SAN turns that off.
            raise ValueError("a certificate with its names apart needs an internal name")
        now = now or utcnow()
        not_after = self._clamped(now, lifetime, names)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        if not usages:
            raise ValueError("a certificate needs server or client usage")
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names.common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial or x509.random_serial_number())  # 159 random bits
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,  # ECDHE handshakes sign with the key
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            # Clients match the IP they dial against the SAN; CN is ignored by modern clients.
            .add_extension(
                _san(None if names_apart else names, identity, internal_dns), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if names_apart:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(NAMES_OID, _names_der(names)), critical=False
            )
        return builder.sign(self.key, hashes.SHA256())

    def _clamped(self, now: dt.datetime, lifetime: dt.timedelta, names: Names) -> dt.datetime:
        """A leaf's end: ``now + lifetime``, or the CA's end if that comes first."""
        ca_end = self.cert.not_valid_after_utc
        if ca_end <= now:
            raise PKIError(
                PKIReason.EXPIRED,
                f"the CA ended {ca_end:%Y-%m-%d %H:%M} UTC; it issues no more certificates",
            )
        if now + lifetime <= ca_end:
            return now + lifetime
        # Imported here: rare, and the workstation's client loads this module (issue 15).
        from tlsroll import logs  # noqa: PLC0415

        log = logs.get_logger(__name__)
        log.warning(
            "certificate.cut_to_ca_end",
            subject=names.common_name,
            not_after=ca_end.isoformat(timespec="seconds"),
            asked_days=round(lifetime.total_seconds() / 86400, 1),
            residual_days=round((ca_end - now).total_seconds() / 86400, 1),
            advice="the cluster CA ends first; see `tlsroll certs check-expiration`",
            hint="the cluster CA ends first: renew it in time (tlsroll ca renew; tlsroll certs "
            "check-expiration shows both)",
        )
        return ca_end

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        expected: Names,
        *,
        server: bool = True,
        client: bool = False,
        now: dt.datetime | None = None,
        identity: spiffe.Identity | None = None,
    ) -> x509.Certificate:
        """Check ``csr`` against ``expected`` and issue a certificate for its key, living
        ``csr_lifetime`` less a random few days (``spread``): a rollout's certificates end
        over days, not on one."""
        lifetime = self.csr_lifetime or dt.timedelta(days=LEAF_VALIDITY_DAYS)
        return self.issue(
            check_csr(csr, expected),
            expected,
            server=server,
            client=client,
            now=now,
            identity=identity,
            lifetime=spread(lifetime),
        )

    @property
    def trust_domain(self) -> str:
        return spiffe.trust_domain(self.cert)

    # -- persistence -------------------------------------------------------------------------

    def save(self, cert_path: Path, key_path: Path, passphrase: bytes) -> None:
        """Write the CA: the key encrypted with ``passphrase`` and 0600."""
        if not passphrase:
            raise ValueError("the CA key is always encrypted at rest; give a passphrase")
        write_key(key_path, self.key, passphrase)
        write_cert(cert_path, self.cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, passphrase: bytes) -> CertificateAuthority:
        return cls(read_cert(cert_path), read_key(key_path, passphrase))


# --- revocation -------------------------------------------------------------------------------

CRL_VALIDITY = dt.timedelta(days=7)


def build_crl(
    ca: CertificateAuthority,
    number: int,
    revoked: Iterable[tuple[str, dt.datetime]],
    *,
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """The CA's revocation list number ``number``: ``revoked`` is (serial in hex, when)."""
    now = now or utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial, 16))
            .revocation_date(when)
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def crl_dates(data: bytes) -> tuple[dt.datetime, dt.datetime | None]:
    """A revocation list's thisUpdate and nextUpdate (None: it has none), UTC; for a list
    ``load_crl`` took (``PKIError`` for one that is no list)."""
    try:
        crl = x509.load_pem_x509_crl(data)
        return crl.last_update_utc, crl.next_update_utc
    except ValueError as exc:
        raise PKIError(PKIReason.BAD_PEM, "revocation list") from exc


def crl_to_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_crl(
    data: bytes, ca: x509.Certificate, *, issuer: bool = False
) -> tuple[int, frozenset[int]]:
    """A revocation list signed by ``ca``: its number and its revoked serials. ``issuer``: its
    issuer must be ``ca``'s subject as well (the leader, taking an agent's list: a list of
    another CA that happens to share the key is none of this one's)."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PKIError(PKIReason.BAD_PEM, "revocation list") from exc
    public = ca.public_key()
    # The signature first, then what it signed: a peer's list is parsed lazily, and a field
    # read before (its issuer) raised ValueError of a name that is no UTF-8, an internal
    # error at the leader for every message that carried it (review b4 of s64, L1).
    try:
        if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or not (
            crl.is_signature_valid(public)
        ):
            raise PKIError(PKIReason.UNTRUSTED, "revocation list")
        if issuer and crl.issuer != ca.subject:
            raise PKIError(PKIReason.UNTRUSTED, "revocation list of another issuer")
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = 0
        return number, frozenset(r.serial_number for r in crl)
    except ValueError as exc:
        raise PKIError(PKIReason.BAD_PEM, "revocation list") from exc
