"""tlsroll's nodeagent: see README.md for what lives here."""

import os

# gRPC's C core writes its own lines straight to stderr (the journal), past structlog: at
# INFO every failed TLS handshake, and even at ERROR "No match found for server name: <SNI>"
# with the SNI a peer chose, raw. Anyone who could open a TLS connection to a gRPC port (the
# join port needs no certificate) wrote lines of their choosing into the log: a newline and
# "<3>{json}" in the SNI made a journald line at error priority from this daemon's PID (review
# s66 logs H1). So none of gRPC core's lines by default: no byte a peer chooses reaches the log
# raw. Wrapping them instead (fd 2 a pipe that a thread reads and escapes) was not taken: gRPC
# writes from its own threads, and a reader that dies or falls behind would block them on a
# full pipe, the daemon with them. What is lost is gRPC core's own account of a failure (a
# handshake refused, a port it cannot bind); every failure the daemon acts on is logged by it,
# as JSON. An explicit GRPC_VERBOSITY (the unit's Environment=, to debug gRPC itself) still
# wins, and lets a peer's bytes through again (README, "When it fails"). It must be set
# before grpc is imported, and every nodeagent module is imported through this package first.
OWN_GRPC_VERBOSITY = "GRPC_VERBOSITY" not in os.environ  # (not the admin's: ``command_env``)
os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def command_env() -> dict[str, str]:
    """The environment the admin's commands run in (the exec driver's, the clients source's):
    the agent's, without the ``GRPC_VERBOSITY`` the agent set for itself above, which a
    restart's server (``nohup server &``) inherited, losing its own gRPC core's lines (review
    s66 closing L5). One the admin set (the unit's Environment=) is passed on, as ever."""
    env = dict(os.environ)
    if OWN_GRPC_VERBOSITY:
        env.pop("GRPC_VERBOSITY", None)
    return env
