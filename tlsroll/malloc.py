"""Keep a long-running daemon's C heap compact: at most two glibc malloc arenas.

glibc gives each thread that allocates while another holds an arena's lock an arena of its own
(up to 8 per core), and memory freed into one arena is never used by a thread of another. In
the leader, asyncio's worker threads (the store, the CA) and gRPC's own threads allocate: after
a rollout of 200 simulated nodes it held 56 MiB in six thread arenas beside 23 MiB in the main
heap (issue 15; ``make bench-agents``). ``MALLOC_ARENA_MAX=2`` is the usual cure; the systemd
units set it, and ``limit_arenas`` sets the same from inside the process (``mallopt``) for a
daemon started any other way (a shell, a test, a container). An explicit ``MALLOC_ARENA_MAX``
in the environment wins. Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # glibc's malloc.h
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc's arenas at ``arenas`` unless the environment says otherwise; True if set.
    Call it first thing in a daemon's ``main``, before it starts threads."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas))
