"""Profiles the leader with yappi (CPU time per function, every thread, coroutines included)
between two signals, for ``python -m bench.simagents --yappi DIR``: the benchmark puts this
directory first on the leader's PYTHONPATH and sets TLSROLL_YAPPI to where the stats go.
SIGUSR1 clears and starts, SIGUSR2 stops and saves (pstat format). Does nothing in any other
process or without yappi installed."""

import importlib
import os
import signal
import sys
from typing import Any

_out = os.environ.get("TLSROLL_YAPPI", "")
if _out and os.path.basename(sys.argv[0] if sys.argv else "") == "tlsroll-leader":
    # Imported by name: yappi is a profiler the benchmark may use, not a dependency, so the type
    # check must not need it (or its absence) either way.
    try:
        yappi: Any = importlib.import_module("yappi")
    except ImportError:
        yappi = None
    if yappi is not None:

        def _start(*_args: object) -> None:
            yappi.stop()
            yappi.clear_stats()
            yappi.set_clock_type("cpu")
            yappi.start(builtins=True, profile_threads=True)

        def _stop(*_args: object) -> None:
            yappi.stop()
            yappi.get_func_stats().save(_out, type="pstat")
            with open(_out + ".threads", "w") as f:
                yappi.get_thread_stats().print_all(out=f)

        signal.signal(signal.SIGUSR1, _start)
        signal.signal(signal.SIGUSR2, _stop)
