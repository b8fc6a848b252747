"""A practice CA and node certificates made with ``cryptography`` for the bring-your-own
tests, each one knob away from a good TLS server certificate (``leaf(..., eku=None)`` etc.)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
_DEFAULT: Any = object()


@dataclass
class Issuer:
    cert: x509.Certificate
    key: Any

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Praxis Dr. Beispiel"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(
    cn: str = "Praxis CA",
    *,
    parent: Issuer | None = None,
    now: dt.datetime = NOW,
    days: int = 3650,
    path_length: int | None = 1,
    key: Any = None,
) -> Issuer:
    key = key or ec.generate_private_key(ec.SECP256R1())
    signer = parent.key if parent else key
    issuer = parent.cert.subject if parent else _name(cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if parent is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
            critical=False,
        )
    return Issuer(builder.sign(signer, hashes.SHA256()), key)


def leaf(
    ca: Issuer,
    ips: list[str],
    dns: Sequence[str | x509.DNSName] | None = None,
    *,
    key: Any = None,
    now: dt.datetime = NOW,
    start: dt.timedelta = dt.timedelta(days=-1),
    days: int = 200,
    eku: Any = _DEFAULT,
    digital_signature: bool = True,
    san: bool = True,
    hash_algorithm: Any = None,
    cn: str = "node",
) -> tuple[x509.Certificate, Any]:
    """A server certificate for ``ips``/``dns`` signed by ``ca`` and its key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + start)
        .not_valid_after(now + start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
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
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if eku is _DEFAULT:
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        # (A GeneralName as is: a DNS name ``x509.DNSName`` refuses, tests/test_names_ascii.py.)
        names += [d if isinstance(d, x509.DNSName) else x509.DNSName(d) for d in dns or []]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hash_algorithm or hashes.SHA256()), key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def write_dir(
    directory: Path,
    ca: Issuer,
    nodes: dict[str, tuple[bytes, Any]],
    *,
    key_mode: int = 0o600,
) -> Path:
    """``DIR/ca.crt`` and per node ``DIR/<node>.crt`` (the given chain) and ``<node>.key``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(ca.pem)
    for node, (chain, key) in nodes.items():
        (directory / f"{node}.crt").write_bytes(chain)
        path = directory / f"{node}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, key_mode)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem(key))
        os.chmod(path, key_mode)
    return directory
