"""Giving a long-running daemon's free heap memory back to the system.

glibc's malloc keeps what a process freed for its next allocations: after a burst of work
(the leader's rollout: channels to agents, TLS handshakes, signing, store writes, in gRPC's
threads as in Python), the freed pages stay resident. ``malloc_trim(0)`` returns the free
pages of every arena (with ``madvise``), not only the top of the main heap. It is glibc's:
elsewhere (musl, macOS) ``releaser`` finds none and nothing is done.
"""

from __future__ import annotations

from collections.abc import Callable


def releaser() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a function to call (in a worker thread: it walks every
    arena under its lock, a few milliseconds), or None where the C library has none. ctypes
    is imported here, on the caller's thread, only when asked (3.11's import locks and worker
    threads do not mix; a daemon that never releases never loads it)."""
    import ctypes  # noqa: PLC0415 - only in a process that releases memory

    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> int:
        """1 if memory was given back, 0 if there was none to give."""
        return int(trim(0))

    return release
