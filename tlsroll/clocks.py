"""The elapsed-time clock the leader and the agents measure durations by.

``elapsed()`` is a clock that no step of the wall clock moves and that counts the time the host
was suspended (or its VM paused): Linux's ``CLOCK_BOOTTIME``, else ``time.monotonic``.
``time.monotonic`` stands still during a suspend, so a lease or a liveness bound measured by it
would outlast the suspend by its whole length: the leader (node liveness, the engine's freeze
leases) and the agent (its freeze leases) must count the same time, or one side takes a freeze
for lifted while the other still holds it."""

from __future__ import annotations

import time

_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def elapsed() -> float:
    """Seconds on the suspend-counting monotonic clock (CLOCK_BOOTTIME where there is one)."""
    if _BOOTTIME is None:
        return time.monotonic()
    return time.clock_gettime(_BOOTTIME)
