"""gRPC as the leader daemon ships it, in the test process (review 2 of session 32, F6).

gRPC reads ``GRPC_EXPERIMENTS`` once, as it is imported; the daemon's ``leader`` package sets
it first (``leader.GRPC_EXPERIMENTS``: gRPC's older listener and client endpoints). The
tests run the leader's service in this process, and ran gRPC's default listener, which the
leader does not ship. ``tests/conftest.py`` imports this module before anything imports gRPC:
the leader's package sets the value (an explicit one wins, as in the daemon), gRPC reads it,
and it is taken off the environment again, so that the daemons the tests start set theirs
as in production (the agent runs gRPC's default). The leader's ``GRPC_VERBOSITY`` is taken
off too, for the daemons the tests start (each package sets its own); but this process's gRPC
read it as the leader's ``NONE``, so gRPC's own lines are not in the tests' output, as in the
leader daemon (run the tests with ``GRPC_VERBOSITY=ERROR`` to have them: an explicit value
wins, and is left in the environment). ``tests/test_perf_shape.py``
checks that gRPC runs this, and that the installed grpcio knows the name.

In one process, the agent's server that a test runs next to the leader's runs the leader's
listener too (the agent daemon ships gRPC's default; the tests with real daemons run that).
A tool outside the test session that imports the tests' helpers after gRPC (``bench.rollout``
through ``bench/ansible_baseline.py``) keeps what it has: the check is the test session's.
"""

from __future__ import annotations

import importlib
import os
import sys

SET = {k: os.environ.get(k) for k in ("GRPC_EXPERIMENTS", "GRPC_VERBOSITY")}  # explicit
if "grpc" not in sys.modules:
    leader = importlib.import_module("leader")  # its package sets both (os.environ.setdefault)
    EXPERIMENTS = os.environ["GRPC_EXPERIMENTS"]  # what gRPC runs in this process
    importlib.import_module("grpc")  # reads them now
    for key, value in SET.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
elif "PYTEST_VERSION" in os.environ:  # pytest (>= 8.2) runs: the test session's check
    raise RuntimeError("gRPC was imported before tests/grpc_env.py: it runs its defaults")
else:  # a tool that uses the tests' helpers (bench.rollout: bench/ansible_baseline.py)
    EXPERIMENTS = os.environ.get("GRPC_EXPERIMENTS", "")  # as gRPC read it at its import
