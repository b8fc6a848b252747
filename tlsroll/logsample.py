"""Sampled logging of refusals anybody on the network can cause, per source.

A port that answers before anyone is authenticated (a node's bootstrap port 9443, the viewer's
login links on 9444) refuses what a stranger sends, and a line per refusal let one client
write thousands of lines a second (review s66 logs M2: 8477 requests in 5 s, 8477 lines):
journald's rate limit then dropped the daemon's own lines with them, the ones an admin needs.
The join port already logged a source's first failure and then one summary a minute; that
rule is ``SampledLog`` now, with no role's imports (``leader.join_guard`` uses it as well).
Session 67 put the other lines a stranger can cause per request under it too: the bootstrap
port's old-client paths, its refused finishes (before the password is confirmed) and its
listener's malformed or oversized requests, and the viewer's requests aiohttp cannot parse.

``first(source, reason)`` is True for a source's first refusal (again once the line logged
for it is ``forget`` seconds old): the caller logs that one on its own, naming the source. The
others are counted, and ``summary()`` hands out what was not logged at most every ``every``
seconds (how many, by reason, the busiest sources), or None. The clock is a function passed
in (monotonic seconds), so the cadence is tested without waiting. A bounded number of sources
is kept (the longest quiet dropped first), so a flood from many addresses costs bounded memory
too.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

TOP_SOURCES = 5  # how many sources a summary names


@dataclass(frozen=True)
class Summary:
    """The refusals since the last summary that were not logged one by one."""

    seconds: float  # the time the summary covers
    refused: int
    sources: int  # distinct sources among them (at most max_sources are told apart)
    top: tuple[tuple[str, int], ...]  # the busiest sources and their counts
    reasons: tuple[tuple[str, int], ...]  # the reasons and their counts, most frequent first

    def fields(self) -> dict[str, object]:
        """The summary as a log line's fields."""
        return {
            "seconds": round(self.seconds),
            "refused_not_logged": self.refused,
            "sources": self.sources,
            "top": [f"{source}: {count}" for source, count in self.top],
            "reasons": dict(self.reasons),
        }


class SampledLog:
    def __init__(
        self,
        *,
        every: float = 60.0,
        forget: float = 3600.0,
        max_sources: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = every
        self.forget = forget
        self.max_sources = max_sources
        self.clock = clock
        self._logged: OrderedDict[str, float] = OrderedDict()  # source -> when last logged
        self._unlogged: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._refused = 0
        # The start of the summary's time: the first refusal seen (read from the clock then,
        # not here: the bootstrap service's tests count its clock's calls).
        self._last_summary: float | None = None

    def first(self, source: str, reason: str) -> bool:
        """True if this refusal of ``source`` is to be logged on its own (its first, or the
        first once its last such line is ``forget`` seconds old); otherwise it is counted for
        the summary."""
        now = self.clock()
        if self._last_summary is None:
            self._last_summary = now
        logged_at = self._logged.get(source)
        if logged_at is None or now - logged_at >= self.forget:
            self._logged[source] = now
            self._logged.move_to_end(source)
            while len(self._logged) > self.max_sources:
                self._logged.popitem(last=False)
            return True
        self._count(source, reason)
        return False

    def count(self, source: str, reason: str) -> None:
        """Count a refusal of ``source`` for the summary only, never logged on its own (the
        join port's answers to wait: ``leader.join_guard``)."""
        if self._last_summary is None:
            self._last_summary = self.clock()
        self._count(source, reason)

    def _count(self, source: str, reason: str) -> None:
        self._refused += 1
        self._reasons[reason] += 1
        if source in self._unlogged or len(self._unlogged) < self.max_sources:
            self._unlogged[source] += 1

    def summary(self) -> Summary | None:
        """The summary that is due (something unlogged, the last one ``every`` seconds ago), or
        None; a returned summary is not handed out again."""
        if not self._refused or self._last_summary is None:
            return None
        now = self.clock()
        if now - self._last_summary < self.every:
            return None
        made = Summary(
            seconds=now - self._last_summary,
            refused=self._refused,
            sources=len(self._unlogged),
            top=tuple(self._unlogged.most_common(TOP_SOURCES)),
            reasons=tuple(self._reasons.most_common()),
        )
        self._last_summary = now
        self._unlogged.clear()
        self._reasons.clear()
        self._refused = 0
        return made
