"""Who a certificate belongs to: the cluster's identities, in SPIFFE's X.509-SVID layout.

Every certificate the cluster CA issues to a party of the cluster carries exactly one URI SAN
naming its role, separate from the names that TLS hostname checks use (a managed server's IP
and DNS names; an agent's and the leader's keep theirs apart, ``pki.NAMES_OID``, and are
dialed by their names under ``.invalid`` below):

    spiffe://tlsroll-<16 hex>/leader              the leader
    spiffe://tlsroll-<16 hex>/node/<name>         a node's agent
    spiffe://tlsroll-<16 hex>/workstation/<name>  a practice PC (client certificates only)
    spiffe://tlsroll-<16 hex>/server/<name>       a node's managed server (its https port;
                                                  server certificates only)

A managed server's certificate names its holder too, but as a role no peer of the cluster
accepts: every check below compares with the leader's identity or asks for ``Role.NODE``, so a
key copied from the practice server's configuration (readable by the server's own user) is
never an agent's or the leader's identity, even to a check that looked only at the URI.

The trust domain is derived from the CA's key (``trust_domain``), so every party that has
pinned the CA knows it without being told. Peers decide by the URI, never by the CN.

A node's certificate also carries one DNS name that no one can resolve and that names the
node's key (``key_host``: ``k<32 hex>.node.<trust domain>.invalid``). The leader dials an
agent with that name as the TLS target name (gRPC cannot run a check of its own on the
server's certificate), so the TLS handshake itself proves that the server holds the key the
leader enrolled, not merely a certificate of the cluster for that IP address. The leader's
certificate carries ``leader.<trust domain>.invalid`` the same way, and beside it
``s<its serial, hex>.leader.<trust domain>.invalid`` (``leader_serial_host``): an agent that
knows the serial dials that name, so a revoked leader certificate fails the handshake. The
CA never signs a
``.invalid`` name that a node asks for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

SCHEME = "spiffe://"
INTERNAL_TLD = "invalid"  # RFC 6761: never resolves


class Role(StrEnum):
    LEADER = "leader"
    NODE = "node"
    WORKSTATION = "workstation"
    SERVER = "server"


@dataclass(frozen=True)
class Identity:
    """A parsed identity: its trust domain, role and (for nodes and workstations) name."""

    trust_domain: str
    role: Role
    name: str = ""

    @property
    def uri(self) -> str:
        path = self.role.value if self.role is Role.LEADER else f"{self.role.value}/{self.name}"
        return f"{SCHEME}{self.trust_domain}/{path}"

    def __str__(self) -> str:
        return self.uri


def trust_domain(ca: x509.Certificate) -> str:
    """``tlsroll-<16 hex>``: the first 64 bits of the SHA-256 of the CA's key."""
    # cryptography only here and in ``of``: an agent knows its trust domain from its pin.
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        Encoding,
        PublicFormat,
    )

    der = ca.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "tlsroll-" + hashlib.sha256(der).hexdigest()[:16]


def trust_domain_of_pin(ca_pin: str) -> str:
    """The trust domain of the CA whose pin (``sha256:<hex>`` of its key, ``pki.spki_pin``) is
    ``ca_pin``: the same as ``trust_domain`` of that CA, without reading the certificate."""
    return "tlsroll-" + ca_pin.removeprefix("sha256:")[:16]


def leader(td: str) -> Identity:
    return Identity(td, Role.LEADER)


def node(td: str, name: str) -> Identity:
    return Identity(td, Role.NODE, name)


def workstation(td: str, name: str) -> Identity:
    return Identity(td, Role.WORKSTATION, name)


def server(td: str, name: str) -> Identity:
    return Identity(td, Role.SERVER, name)


def parse(uri: str) -> Identity | None:
    """The identity a URI names, or None if it is not one of ours."""
    if not uri.startswith(SCHEME):
        return None
    td, _, path = uri.removeprefix(SCHEME).partition("/")
    if not td.startswith("tlsroll-"):
        return None
    if path == Role.LEADER.value:
        return Identity(td, Role.LEADER)
    role, _, name = path.partition("/")
    named = (Role.NODE.value, Role.WORKSTATION.value, Role.SERVER.value)
    if role in named and name and "/" not in name:
        return Identity(td, Role(role), name)
    return None


def of(cert: x509.Certificate) -> Identity | None:
    """The one cluster identity ``cert`` carries; None if it has none, or more than one."""
    from cryptography import x509  # noqa: PLC0415 - see trust_domain

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    return parse(uris[0])


def of_uris(uris: Sequence[str]) -> Identity | None:
    """The one cluster identity among a certificate's URI names (as gRPC's auth context lists
    them, ``peer_uri``): the same answer as ``of`` on that certificate."""
    return parse(uris[0]) if len(uris) == 1 else None


def key_host(td: str, key_pin: str) -> str:
    """The unresolvable DNS name that names a node's key (see the module's docstring)."""
    return f"k{key_pin.removeprefix('sha256:')[:32]}.node.{td}.{INTERNAL_TLD}"


def leader_host(td: str) -> str:
    return f"leader.{td}.{INTERNAL_TLD}"


def leader_serial_host(td: str, serial: int) -> str:
    """The unresolvable DNS name that names one leader certificate by its serial (hex), beside
    ``leader_host`` in it: an agent that learned the serial of the certificate the leader serves
    (``HeartbeatResponse.leader_serial``) dials it by this name, and a revoked leader
    certificate (another serial) fails the handshake (review s67 M2)."""
    return f"s{serial:x}.{leader_host(td)}"
