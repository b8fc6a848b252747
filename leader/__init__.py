"""tlsroll's leader: see README.md for what lives here."""

import os

# gRPC's C core logs at INFO by default (every failed TLS handshake, for one) straight to
# stderr, past structlog, which breaks the daemon's JSON lines. Keep its errors, drop the
# chatter; an explicit GRPC_VERBOSITY still wins. It must be set before grpc is imported,
# and every leader module is imported through this package first.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# gRPC's own threads: in grpcio 1.85 the connections a server accepts are EventEngine
# endpoints, whose reads run on the engine's thread pool and hand each message to the thread
# that polls the completion queue (grpc.aio's poller): a sparse heartbeat message woke gRPC's
# threads ~12 times. With the listener experiment off, accepted connections are iomgr's, read
# by the polling thread itself: ~2.5-3 context switches and ~0.16-0.33 ms less server CPU per
# message (``bench.grpc_floor --modes message``; issue 15). This goes back to gRPC's older,
# long-stable path for the leader's listening ports only (its channels to agents stay
# EventEngine clients). An explicit GRPC_EXPERIMENTS still wins. A later grpcio may drop the
# switch: gRPC then logs "Unknown experiment" at start and runs its default (nothing breaks);
# tests/test_perf_shape.py fails then, to have it looked at again.
GRPC_EXPERIMENTS = "-event_engine_listener"
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
