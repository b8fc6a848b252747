"""tlsroll's leader: see README.md for what lives here."""

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
# before grpc is imported, and every leader module is imported through this package first.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

# gRPC's own threads: in grpcio 1.85 the connections a server accepts are EventEngine
# endpoints, whose reads run on the engine's thread pool and hand each message to the thread
# that polls the completion queue (grpc.aio's poller): a sparse heartbeat message woke gRPC's
# threads ~12 times. With the listener experiment off, accepted connections are iomgr's, read
# by the polling thread itself: ~2.5-3 context switches and ~0.16-0.33 ms less server CPU per
# message (``bench.grpc_floor --modes message``; issue 15). The same for its channels to
# agents (``event_engine_client`` off, session 67): every reply and every state of a switch's
# watch that reaches the leader woke the engine's threads 5-6 times (about once now), and
# the event_engine threads' context switches per node in ``bench.rollout`` about halved.
# Both go back to gRPC's older, long-stable iomgr path, in the leader and in the `tlsroll`
# command, which imports this package before grpc too (its channel over the admin socket: the
# same path; review s67 rev2 L1); the agent runs gRPC's defaults. An explicit
# GRPC_EXPERIMENTS still wins. A later grpcio may drop a switch: gRPC then runs its default
# (nothing breaks; its "Unknown experiment" line is not written at GRPC_VERBOSITY=NONE);
# tests/test_perf_shape.py fails then, to have it looked at.
GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_client"
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
