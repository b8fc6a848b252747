"""tlsroll's shared package: the generated gRPC contract and what leader and agent both use.

``tlsroll.v1`` is generated from ``proto/`` (``make proto``); the other modules are small and
have no knowledge of either daemon: ``pki`` (keys, CSRs, certificates, pins), ``tls`` (TLS
settings and gRPC credentials), ``config`` (typed TOML loading), ``logs`` (structlog set-up),
``daemon`` (signals, sd_notify), ``errors`` (the shared error tree).
"""

# The one place the version is written: pyproject.toml reads it from here (hatch's dynamic
# version), every ``--version`` and the agents' reported version print it, CHANGELOG.md names it.
# A literal rather than importlib.metadata: right in a bare checkout and in an editable install
# that was not reinstalled, and readable without importing anything.
__version__ = "0.2.0.dev0"
