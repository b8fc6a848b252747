"""Traces the leader's Python allocations (tracemalloc) for ``python -m bench.simagents
--memory DIR``: the benchmark puts this directory first on the leader's PYTHONPATH and sets
TLSROLL_TRACEMALLOC to a path prefix. Tracing starts here, before the leader imports anything;
each SIGUSR1 writes a snapshot to PREFIX.N (N = 1, 2, …), then PREFIX.N.done. Does nothing in
any other process. Tracing costs memory and CPU: the figures of such a run compare with no
other."""

import os
import signal
import sys
import tracemalloc

_out = os.environ.get("TLSROLL_TRACEMALLOC", "")
if _out and os.path.basename(sys.argv[0] if sys.argv else "") == "tlsroll-leader":
    tracemalloc.start(int(os.environ.get("TLSROLL_TRACEMALLOC_FRAMES", "1")))
    _taken = [0]

    def _snapshot(*_args: object) -> None:
        _taken[0] += 1
        path = f"{_out}.{_taken[0]}"
        tracemalloc.take_snapshot().dump(path)
        with open(path + ".done", "w") as f:
            f.write(str(tracemalloc.get_traced_memory()[0]))

    signal.signal(signal.SIGUSR1, _snapshot)
