"""tlsroll's nodeagent: see README.md for what lives here."""

import os

# gRPC's C core logs at INFO by default (every failed TLS handshake, for one) straight to
# stderr, past structlog, which breaks the daemon's JSON lines. Keep its errors, drop the
# chatter; an explicit GRPC_VERBOSITY still wins. It must be set before grpc is imported,
# and every nodeagent module is imported through this package first.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
