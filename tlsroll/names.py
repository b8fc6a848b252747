"""Names and pins: what a node may be called and hold in its certificate, without X.509.

The rules the CA signs by (``tlsroll.pki``) and the agent's config checks (``nodeagent.config``)
share these; they need no ``cryptography``, so an agent that only reads its config and serves
does not load it (issue 15: it costs an agent about 10 MiB for months). ``tlsroll.pki``
re-exports every name here.

``tlsroll.echo`` (which compiles its secrets' shapes as it is imported: about 1.6 ms) is
imported by the first refusal here (``shown``), not with this module: the agent's crypto
worker's child imports this on its way to a rollout's first key (issue 15), and refuses no
name there.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tlsroll import spiffe

BACKDATE = dt.timedelta(hours=1)  # a leaf's NotBefore: tolerate clocks that lag the CA's
NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# The leader's certificate is "tlsroll-leader" and workstations' are "ws-…": no node may
# take a name that could be mistaken for either.
RESERVED_PREFIXES = ("tlsroll-", "ws-")
# What one node may hold: enough for a server with a few interfaces and names, far below what
# would make a certificate a tool (the audit got one with 60000 DNS names).
MAX_IPS = 8
MAX_DNS = 8
DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
# A last label that makes a name an IPv4 address to inet_aton and to WHATWG URL parsers: all
# digits (decimal or octal) or ``0x`` and hex digits. No top-level domain is such a label.
NUMBER_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
# Addresses that name every host, or none: a certificate for them vouches for any machine.
EVERY_HOST_IPS = frozenset({"127.0.0.1", "::1"})


def shown(value: object) -> str:
    """``tlsroll.echo.shown``: a refused input as the refusal repeats it (see the module's
    docstring)."""
    from tlsroll import echo  # noqa: PLC0415 - refusals only

    return echo.shown(value)


def node_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a node name, or None."""
    if not NODE_NAME.fullmatch(name):
        return (
            f"{shown(name)} is not a valid node name: lowercase letters, digits and '-', at most 63"
        )
    if name.startswith(RESERVED_PREFIXES):
        return (
            f"node name {shown(name)} is reserved (names starting {' or '.join(RESERVED_PREFIXES)})"
        )
    return None


def ip_problem(text: str) -> str | None:
    """Why the CA will not put address ``text`` in a certificate, or None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return f"{shown(text)} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # ``::1%lo`` passed as another address than ``::1`` (its text is not in
        # EVERY_HOST_IPS), yet its certificate holds ::1: a zone names an interface of one
        # machine, never part of a host's address.
        return (
            f"{shown(text)}: a zone (%…) is never part of a certificate's address; give it without"
        )
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return f"{ip} is not the address of one host"
    if str(ip) in EVERY_HOST_IPS or ip == ipaddress.IPv4Address("255.255.255.255"):
        return f"{ip} names every host, not this one"
    if (v4 := ipv4_inside(ip)) is not None:
        return f"{shown(text)} is the IPv4 address {v4} written as IPv6: give it as {v4}"
    return None


def ipv4_inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one only spells (IPv4-mapped ``::ffff:a.b.c.d``, or the old
    IPv4-compatible ``::a.b.c.d``), or None. Never a name of its own (review rev-enrol L1):
    as text it passed every check that compares names (an address the leader or another node
    holds, 127.0.0.1), yet a client that compares addresses as Go's ``net.IP.Equal`` does
    takes ``::ffff:10.0.0.5`` for 10.0.0.5. ``::`` and ``::1`` are IPv6's own."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0 and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip))
    return None


def dns_given(name: str) -> str:
    """A DNS name as an admin gives it (``init --dns``, leader.toml's dns_names, ``token
    create --dns``), in the form the CA signs and compares (``dns_problem``, ``Names``): DNS
    names are case-insensitive, so ASCII letters are lowered, and one final dot (the FQDN
    form) is dropped. Nothing else: ``a..`` keeps a dot and a name not ASCII is left as it is
    for ``dns_problem`` to refuse (``str.lower`` makes the Kelvin sign a ``k``; review s67)."""
    return (name.lower() if name.isascii() else name).removesuffix(".")


def dns_problem(name: str) -> str | None:
    """Why the CA will not put DNS name ``name`` in a certificate, or None."""
    if "*" in name:
        return f"{shown(name)}: wildcard names are never signed"
    if not DNS_NAME.fullmatch(name):
        return f"{shown(name)} is not a DNS host name (lowercase letters, digits, '-' and '.')"
    if NUMBER_LABEL.fullmatch(name.rpartition(".")[2]):
        # ``127.0.0.1`` or the leader's address as a DNS name passed every check addresses get
        # (every host, held by the leader or another node); no top-level domain is all digits.
        # Nor ``0x…``: ``0x7f000001`` is 127.0.0.1 to inet_aton (getaddrinfo) and to a
        # browser's URL parser (WHATWG's "ends in a number"), yet a client that checks it as
        # a host name took its DNS name (review s67 rev2 M1).
        return (
            f"{shown(name)} is not a DNS host name: its last label is a number (digits, or 0x "
            "and hex digits), as an IP address's is (an address goes among the addresses)"
        )
    if name == "localhost" or name.endswith(".localhost"):
        return f"{shown(name)} names every host, not this one"
    if name.endswith("." + spiffe.INTERNAL_TLD):
        return f"{shown(name)}: names under .{spiffe.INTERNAL_TLD} are the cluster's own"
    return None


def requested_names_problem(names: Names) -> str | None:
    """Why the CA will not sign ``names`` for a node, or None: bounded, one host each."""
    if not names.ips:
        return "a node needs at least one IP address"
    if len(names.ips) > MAX_IPS or len(names.dns) > MAX_DNS:
        return f"a node holds at most {MAX_IPS} addresses and {MAX_DNS} DNS names"
    for ip in names.ips:
        if problem := ip_problem(ip):
            return problem
    for dns in names.dns:
        if problem := dns_problem(dns):
            return problem
    return None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_pin(pin: str) -> str:
    """Normalise a pin to ``sha256:<64 lowercase hex>`` or raise ValueError."""
    value = pin.strip().lower()
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise ValueError("a CA pin looks like sha256:<64 hex digits>")
    return value


@dataclass(frozen=True)
class Names:
    """The identity a certificate carries: CN plus the SAN's IP addresses and DNS names."""

    common_name: str
    ips: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()

    def __str__(self) -> str:
        return describe(self)

    @classmethod
    def of(cls, common_name: str, ips: Iterable[str] = (), dns: Iterable[str] = ()) -> Names:
        norm_ips = tuple(sorted({str(ipaddress.ip_address(i)) for i in ips}))
        # ``dns_given``: ASCII letters lowered and one final dot dropped, nothing else. A name
        # read from a certificate or a CSR that is not ASCII stays as written (``str.lower``
        # made a Kelvin sign a ``k``: a SAN of "\u212a…" equalled the enrolled "k…"), so that
        # it differs from every name the CA signs (session 68).
        norm_dns = tuple(sorted({dns_given(d) for d in dns}))
        return cls(common_name, norm_ips, norm_dns)


def describe(names: Names) -> str:
    parts = [f"CN={names.common_name!r}"]
    parts += [f"IP={ip}" for ip in names.ips] + [f"DNS={d}" for d in names.dns]
    return " ".join(parts)
