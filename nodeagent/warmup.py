"""Imports made ahead of need, one after another in one worker thread, at a low CPU priority.

The agent loads what a rollout's work needs before that work asks for it, off its event loop:
the bootstrap service when a node is staged or a switch begins (``BootstrapHost.warm``). (The
certificate code is no longer the agent's: its crypto worker, ``nodeagent.cryptoworker``,
imports it in a child, in a thread lowered the same way, ``_lower_priority``.) Run in two
threads at once, two such imports could meet in Python 3.11's per-module import locks, each
holding a module the other one needs next, which Python ends with a ``_DeadlockError`` in one
of them. Here they queue instead. (An import the work itself makes meanwhile waits for the
module being loaded here, which is no cycle: it holds no other module's lock.)

That work is made ahead of need precisely so that it can wait: a node is prepared while
another node's server restarts, and the server that shares this machine (the practice
software, or in a test another node's) matters more than getting the import done soon. So on
Linux the warming thread lowers its own scheduling priority (``WARM_NICE``; a thread's nice
value is its own there). The agent's other threads keep theirs.

The price: the warming thread holds the GIL while it imports, so while a busy process shares
its CPU the agent's event loop waits for that low-priority thread each time it wakes (review
of session 23, one CPU and one busy process: ~35 ms late per 5 ms tick against 4-6 ms at nice
0). A server start beside it still ended sooner at +10 (272-663 ms against 432-1052 ms over 9
runs each, no warming 313-382 ms), which is what the priority is for.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

WARM_NICE = 10
"""How much the warming thread lowers its priority: at +10 it gets about a tenth of the CPU a
busy thread at the default priority gets when both want it, and all of it when nothing else
does."""


def _lower_priority() -> None:
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


_WARMER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm", initializer=_lower_priority)


def warm(name: str) -> asyncio.Future[ModuleType]:
    """Import module ``name`` in the warming thread (after any import queued before it)."""
    return asyncio.get_running_loop().run_in_executor(_WARMER, importlib.import_module, name)
