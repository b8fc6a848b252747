"""The failed bootstrap passwords not yet reported to the leader (``FailureLog``): the bootstrap
service (``nodeagent.bootstrap_server``) records them, the heartbeat (``nodeagent.leader_link``)
carries them.

A module of its own, without the service: the heartbeat needs the log from the agent's start,
while the service (its protocol, SPAKE2 and its HTTP listener) is imported only when the node
serves https with an auth password.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class FailureCount:
    """Failed passwords from one source since the last report."""

    source: str
    workstation: str  # the last name it claimed
    count: int
    last_at: dt.datetime


class FailureLog:
    """Failures not yet reported to the leader, per source; at most ``max_sources`` are kept
    apart, the rest are added up under ``OTHER``."""

    OTHER = "(other addresses)"

    def __init__(self, max_sources: int = 64) -> None:
        self.max_sources = max_sources
        self._pending: OrderedDict[str, FailureCount] = OrderedDict()
        # Called when ``reported`` changed what is pending (the agent keeps the log in its
        # journal: nodeagent.bootstrap_supervisor).
        self.on_reported: Callable[[], None] | None = None

    def restore(self, items: Iterable[FailureCount]) -> None:
        """Add what an earlier run of the agent had not reported (oldest first)."""
        for item in items:
            entry = self._pending.get(item.source)
            if entry is None and len(self._pending) >= self.max_sources:
                entry = self._pending.get(self.OTHER)
                if entry is None:
                    entry = self._pending[self.OTHER] = FailureCount(
                        self.OTHER, item.workstation, 0, item.last_at
                    )
            if entry is None:
                self._pending[item.source] = FailureCount(
                    item.source, item.workstation, item.count, item.last_at
                )
                continue
            entry.count += item.count
            entry.workstation = item.workstation
            entry.last_at = max(entry.last_at, item.last_at)

    def record(self, source: str, workstation: str, when: dt.datetime) -> None:
        entry = self._pending.get(source)
        if entry is None and len(self._pending) >= self.max_sources:
            source = self.OTHER
            entry = self._pending.get(source)
        if entry is None:
            entry = self._pending[source] = FailureCount(source, workstation, 0, when)
        entry.count += 1
        entry.workstation = workstation
        entry.last_at = max(entry.last_at, when)
        self._pending.move_to_end(source)

    def pending(self) -> list[FailureCount]:
        """A copy of what is to report (the agent sends it with its next heartbeat)."""
        return [
            FailureCount(e.source, e.workstation, e.count, e.last_at)
            for e in self._pending.values()
        ]

    def reported(self, sent: list[FailureCount]) -> None:
        """The leader took ``sent``: keep only what came in since."""
        changed = False
        for item in sent:
            entry = self._pending.get(item.source)
            if entry is None:
                continue
            changed = True
            entry.count -= item.count
            if entry.count <= 0:
                del self._pending[item.source]
        if changed and self.on_reported is not None:
            self.on_reported()
