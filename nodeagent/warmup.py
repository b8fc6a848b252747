"""Imports made ahead of need, one after another in one worker thread, at a low CPU priority.

The agent loads what a rollout's work needs before that work asks for it, off its event loop:
the bootstrap service when a node is staged or a switch begins (``BootstrapHost.warm``). (The
certificate code is no longer the agent's: its crypto worker, ``nodeagent.cryptoworker``,
imports it in a child, in a thread lowered the same way, ``priority.lower_priority``.) Run in two
threads at once, two such imports could meet in Python 3.11's per-module import locks, each
holding a module the other one needs next, which Python ends with a ``_DeadlockError`` in one
of them. Here they queue instead. (An import the work itself makes meanwhile waits for the
module being loaded here, which is no cycle: it holds no other module's lock.)

That work is made ahead of need precisely so that it can wait: a node is prepared while
another node's server restarts, and the server that shares this machine (the practice
software, or in a test another node's) matters more than getting the import done soon. So on
Linux the warming thread lowers its own scheduling priority (``WARM_NICE``; a thread's nice
value is its own there; ``nodeagent.priority``). The agent's other threads keep theirs.

The price: the warming thread holds the GIL while it imports, so while a busy process shares
its CPU the agent's event loop waits for that low-priority thread each time it wakes (review
of session 23, one CPU and one busy process: ~35 ms late per 5 ms tick against 4-6 ms at nice
0). A server start beside it still ended sooner at +10 (272-663 ms against 432-1052 ms over 9
runs each, no warming 313-382 ms), which is what the priority is for.
"""

from __future__ import annotations

import asyncio
import importlib
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

# The priority step, also the crypto worker's child's (``WARM_NICE``: this module's name too).
from nodeagent.priority import WARM_NICE as WARM_NICE  # noqa: PLC0414
from nodeagent.priority import lower_priority

_WARMER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm", initializer=lower_priority)


def warm(name: str) -> asyncio.Future[ModuleType]:
    """Import module ``name`` in the warming thread (after any import queued before it)."""
    return asyncio.get_running_loop().run_in_executor(_WARMER, importlib.import_module, name)
