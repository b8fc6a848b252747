"""A thread's CPU priority lowered for work made ahead of need (the standard library's only).

Used by the agent's warming thread (``nodeagent.warmup``) and by its crypto worker's child
(``nodeagent.cryptoworker_child``, which imports only what its ops need): a node is prepared while
another node's server restarts on the same machine, and that server matters more than getting
the import done soon (see ``warmup``'s docstring for the measurements).
"""

from __future__ import annotations

import os
import sys
import threading

WARM_NICE = 10
"""How much the warming thread lowers its priority: at +10 it gets about a tenth of the CPU a
busy thread at the default priority gets when both want it, and all of it when nothing else
does."""


def lower_priority() -> None:
    """Lower the calling thread's priority (Linux only: elsewhere ``setpriority`` with a thread
    id is not per thread, and nothing is changed). Failing to is no error: the imports only
    compete more."""
    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WARM_NICE)
    except OSError:
        pass
