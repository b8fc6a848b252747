"""Failed attempts counted per key with exponential backoff, and a ceiling over a time window.

Pure: time (monotonic seconds) is passed in, so tests move it by hand. Used by the node's
bootstrap service (per source address, per claimed workstation name, and for the whole node)
and by the reference server's ``/login`` (per source address, and for the whole server).

``Backoff``: a key may fail ``free`` times without waiting; after that, each failure makes it
wait ``base * 2**(failures - free)`` seconds (at most ``cap``) from its last failure before the
next attempt. A key with no failure for ``forget`` seconds starts over; ``reset`` (a success)
does too. At most ``max_keys`` keys are kept (the longest quiet is dropped first).

``Ceiling``: at most ``limit`` failures within ``window`` seconds, whoever makes them; past
that every attempt waits until the oldest failure leaves the window. Its failures are kept
across restarts by their wall-clock times (the agent's journal, the reference server's store):
``on_clock`` puts them back on the monotonic clock.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    free: int  # failures without any wait
    base: float  # the first wait, seconds
    cap: float  # the longest wait, seconds
    forget: float  # a key quiet this long starts over, seconds

    def __post_init__(self) -> None:
        if self.free < 0 or self.base <= 0 or self.cap < self.base or self.forget <= 0:
            raise ValueError("backoff needs free >= 0, 0 < base <= cap and forget > 0")

    def delay(self, failures: int) -> float:
        """How long a key with ``failures`` must wait after its last one."""
        if failures < self.free:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(failures - self.free, 64))


@dataclass
class _Count:
    failures: int
    last: float


class Backoff:
    """Failures per key (see the module docstring)."""

    def __init__(self, policy: Policy, max_keys: int = 10_000) -> None:
        self.policy = policy
        self.max_keys = max_keys
        self._counts: OrderedDict[str, _Count] = OrderedDict()

    def _current(self, key: str, now: float) -> _Count | None:
        count = self._counts.get(key)
        if count is not None and now - count.last >= self.policy.forget:
            del self._counts[key]
            return None
        return count

    def failures(self, key: str, now: float) -> int:
        count = self._current(key, now)
        return 0 if count is None else count.failures

    def wait(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        count = self._current(key, now)
        if count is None:
            return 0.0
        return max(0.0, count.last + self.policy.delay(count.failures) - now)

    def failed(self, key: str, now: float) -> int:
        """Count a failure; returns the key's failures so far."""
        count = self._current(key, now)
        if count is None:
            count = self._counts[key] = _Count(0, now)
        count.failures += 1
        count.last = now
        self._counts.move_to_end(key)
        while len(self._counts) > self.max_keys:
            self._counts.popitem(last=False)
        return count.failures

    def reset(self, key: str) -> None:
        self._counts.pop(key, None)


class Ceiling:
    """At most ``limit`` failures within ``window`` seconds (see the module docstring)."""

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a ceiling needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()

    def count(self, now: float) -> int:
        self._trim(now)
        return len(self._times)

    def wait(self, now: float) -> float:
        self._trim(now)
        if len(self._times) < self.limit:
            return 0.0
        return max(0.0, self._times[len(self._times) - self.limit] + self.window - now)

    def failed(self, now: float) -> None:
        self._trim(now)
        self._times.append(now)
        while len(self._times) > self.limit:  # older ones no longer decide anything
            self._times.popleft()

    def forgive(self, at: float) -> None:
        """Take back one failure counted ``at`` (an attempt counted before it was checked,
        which turned out right); nothing if it has left the window or was pushed out."""
        with contextlib.suppress(ValueError):
            self._times.remove(at)


# A kept failure's time more than this ahead of the wall clock cannot be right (it was counted
# while the clock was ahead): it no longer counts, or it would impose the ceiling again at every
# restart until the clock passes it (s34 review L3).
FUTURE_SLACK = 60.0


def on_clock(earlier: list[float], wall: float, mono: float) -> list[float]:
    """Failure times an earlier run kept (Unix seconds, oldest first) on a monotonic clock
    (``mono`` its now, ``wall`` the wall clock's), from their age by the wall clock: one up to
    ``FUTURE_SLACK`` ahead counts as now, one further ahead is dropped."""
    return [mono - max(0.0, wall - at) for at in earlier if at <= wall + FUTURE_SLACK]


def retry_after(seconds: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(seconds))


def source_key(remote: str | None) -> str:
    """Whom to count a request against: the IPv4 address, or the IPv6 /64 it comes from (one
    host can use a whole /64, so counting addresses would give it 2**64 fresh budgets)."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
