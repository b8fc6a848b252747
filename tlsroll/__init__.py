"""tlsroll's shared package: the generated gRPC contract and what leader and agent both use.

``tlsroll.v1`` is generated from ``proto/`` (``make proto``); the other modules are small and
have no knowledge of either daemon: ``pki`` (keys, CSRs, certificates, pins), ``tls`` (TLS
settings and gRPC credentials), ``config`` (typed TOML loading), ``logs`` (structlog set-up),
``daemon`` (signals, sd_notify), ``errors`` (the shared error tree).
"""

from importlib import metadata

try:
    __version__ = metadata.version("tlsroll")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0+unknown"
