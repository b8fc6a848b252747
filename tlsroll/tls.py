"""TLS settings shared by every tlsroll listener and client: versions, ciphers, contexts.

TLS 1.2 and 1.3 only, with Mozilla's "intermediate" cipher list for TLS 1.2 (TLS 1.3 suites
are all acceptable and not configurable through ``ssl``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

# Mozilla server-side TLS guidelines, "intermediate" configuration (TLS 1.2 part).
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(
    cert_file: Path,
    key_file: Path,
    client_ca_file: Path | None = None,
    *,
    require_client: bool = False,
) -> ssl.SSLContext:
    """A server context; with ``client_ca_file`` it asks for (or requires) a client certificate."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=str(client_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca_pem: bytes | None = None,
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> ssl.SSLContext:
    """A client context trusting only ``ca_pem`` (no system roots), with an optional client cert."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca_pem is not None:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def unverified_client_context() -> ssl.SSLContext:
    """A context that accepts any server certificate; only for fetching a chain to check by pin."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
