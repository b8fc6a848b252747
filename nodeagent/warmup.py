"""Imports made ahead of need, one after another in one worker thread.

The agent loads what a rollout's work needs before that work asks for it, off its event loop:
the certificate code at a rollout's preflight (``NodeAgentService``), the bootstrap service when
a node is staged or a switch begins (``BootstrapHost.warm``). Run in two threads at once, two
such imports could meet in Python 3.11's per-module import locks, each holding a module of
``cryptography`` the other one needs next, which Python ends with a ``_DeadlockError`` in one
of them. Here they queue instead. (An import the work itself makes meanwhile waits for the
module being loaded here, which is no cycle: it holds no other module's lock.)
"""

from __future__ import annotations

import asyncio
import importlib
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

_WARMER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm")


def warm(name: str) -> asyncio.Future[ModuleType]:
    """Import module ``name`` in the warming thread (after any import queued before it)."""
    return asyncio.get_running_loop().run_in_executor(_WARMER, importlib.import_module, name)
