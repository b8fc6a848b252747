"""How a long-running daemon's heap is kept small: glibc malloc's settings at start, and its
free heap memory given back to the system after a burst of work.

glibc's malloc keeps what a process freed for its next allocations: after a burst of work
(the leader's rollout: channels to agents, TLS handshakes, signing, store writes, in gRPC's
threads as in Python), the freed pages stay resident. ``malloc_trim(0)`` returns the free
pages of every arena (with ``madvise``), not only the top of the main heap. It is glibc's:
elsewhere (musl, macOS) ``releaser`` and ``tune`` find nothing and nothing is done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

M_MMAP_THRESHOLD = -3
"""``mallopt``'s parameter number for the mmap threshold (glibc's ``malloc.h``)."""

MMAP_THRESHOLD = 16 * 1024
"""Blocks of at least this many bytes get a mapping of their own (glibc's default: 128 KiB,
raised further by itself as large blocks are freed). Every TLS connection inside gRPC holds
two 17 KiB buffers for its whole life (BoringSSL's BIO pair, ``BIO_new_bio_pair`` with gRPC's
size 0: 17 KiB each way); heartbeats and calls pass a few hundred bytes at a time, and a bio
pair starts again at its buffer's beginning whenever it is empty, so only the first pages of
such a buffer are ever written. In a mapping of its own, the pages never written are never
resident; inside an arena, the buffer mostly takes memory that earlier blocks had already
made resident, all of it. And such a buffer, freed when its connection closes, is given back
whole, not left as a hole among the arena's live blocks. Issue 15: a gRPC server holding 300
mutual-TLS connections with a stream and 200 messages each, 84 KiB per connection against 90;
``bench.simagents`` at 500 agents (3 pairs), the leader idle with its agents 113.7-114.1 MiB
against 116.9-117.6, 3 s after the rollout 131.0-134.5 against 139.6-140.5, its CPU per node
as before. Only the blocks that an arena's free memory cannot hold take a mapping (glibc
decides so when it would grow the arena): a few more mmap calls per connection, none per
message. What that costs where large transient blocks are common: ``bench.simagents`` at 200
agents with a viewer session fetching ``/api/v1/schema`` in a loop (about 120 fetches), the
leader made 7567 and 8172 mmap plus munmap calls over the rollout against 2972 and 3431 with
``MALLOC_MMAP_THRESHOLD_=131072`` (2 pairs, ``strace -c -f``), and 800 against 0 and 2 in the
20 s idle window (page faults and the calls' own time not measured apart)."""

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
"""glibc's own setting of the threshold: when the daemon's environment has it (an operator's
choice), ``tune`` leaves it as it is."""

TUNABLES_ENV = "GLIBC_TUNABLES"
MMAP_TUNABLE = "glibc.malloc.mmap_threshold"
"""glibc's newer way to set the same threshold (``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N``,
tunables separated by colons): kept as the operator set it too."""


def operator_set(environ: Mapping[str, str]) -> bool:
    """Whether the environment sets glibc malloc's mmap threshold itself (``MMAP_ENV`` or the
    ``MMAP_TUNABLE`` in ``TUNABLES_ENV``)."""
    if MMAP_ENV in environ:
        return True
    tunables = environ.get(TUNABLES_ENV, "")
    return any(t.split("=", 1)[0].strip() == MMAP_TUNABLE for t in tunables.split(":"))


def _libc_function(name: str) -> Any:
    """The C library's function ``name`` through ctypes, None where it has none (Any: ctypes'
    function objects are untyped; the caller sets ``argtypes`` and ``restype``). ctypes is
    imported here, on the caller's thread, only when asked (3.11's import locks and worker
    threads do not mix)."""
    import ctypes  # noqa: PLC0415 - only in a process that tunes or releases memory

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def tune(environ: Mapping[str, str] = os.environ) -> bool:
    """Set glibc malloc's mmap threshold to ``MMAP_THRESHOLD`` (a daemon calls this first in
    its ``main``, before gRPC starts a thread, so that every block of its life follows it).
    False if it was not set: not glibc, or the environment sets it (``operator_set``)."""
    if operator_set(environ):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    import ctypes  # noqa: PLC0415 - loaded by _libc_function already

    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def releaser() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a function to call (in a worker thread: it walks every
    arena under its lock, a few milliseconds), or None where the C library has none."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    import ctypes  # noqa: PLC0415 - loaded by _libc_function already

    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> int:
        """1 if memory was given back, 0 if there was none to give."""
        return int(trim(0))

    return release
