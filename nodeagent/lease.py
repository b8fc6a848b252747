"""The scope freeze's lease in elapsed time (clock audit s35 A, review 2 F4 of s34).

The leader counts a lease as ``lease_seconds`` of real time from when it sent the Freeze
(``leader.engine``: ``_confirmed_until``, ``_lease_ran_out``). The agent used to keep it only as
a wall-clock deadline in the journal, so a step of the node's clock moved it: back, and the
practice stayed frozen for the lease plus the step after the leader was gone; forward, and the
lease watch lifted the freeze at once while the leader still counted the node frozen (the
invariant of audit s32 H4).

Now each lease this process grants or takes over has a deadline on the monotonic clock, kept in
memory (``Leases``), and that deadline decides when it has run out. The journal still holds the
lease (whether one holds, for the runner and across a restart) with its wall-clock end and its
length: after a restart, a journalled lease runs for what its wall-clock end says is left, but
never longer than its own length from the restart (a deadline further away than that means
the clock went back). A lease journalled by a release before this (no length) is bounded by
the longest lease an agent grants, ``MAX_FREEZE_LEASE``.

The readings of both clocks are the caller's (the servicer's and the runner's ``clock`` and
``monotonic``), so that tests can step one without the other.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import OrderedDict
from typing import NamedTuple

from tlsroll.defaults import MAX_FREEZE_LEASE

# Deadlines remembered: the lease in the journal and the few before it that a read which
# crossed a Freeze may still return (``NodeAgentService._lift_lapsed_freeze`` reads it twice).
KEPT = 8


class Lease(NamedTuple):
    """A scope freeze's lease as the journal holds it."""

    rollout_id: str
    until: dt.datetime  # its end on the wall clock when it was granted
    seconds: float | None = None  # its length; None: journalled by a release before this


class Leases:
    """The monotonic deadlines of the leases this agent process granted or took over from the
    journal. The servicer (Freeze, the lease watch) and the runner (a scope switch's end)
    share one, as they share the freeze lock (the event loop's thread only: it is never handed
    to a worker thread)."""

    def __init__(self) -> None:
        self._deadlines: OrderedDict[tuple[str, dt.datetime], float] = OrderedDict()
        self._latest = -math.inf  # the latest of those deadlines
        self._read = False  # this process has read (or written) the journal's lease

    def grant(self, rollout_id: str, seconds: float, wall: dt.datetime, mono: float) -> Lease:
        """A Freeze's lease of ``seconds`` from now (``wall``, ``mono``), for the journal. Known
        here before it is written: whatever lease the journal may hold is known."""
        lease = Lease(rollout_id, wall + dt.timedelta(seconds=seconds), seconds)
        self._keep(lease, mono + seconds)
        return lease

    def seen(self, lease: Lease | None, wall: dt.datetime, mono: float) -> None:
        """The journal's lease as just read. One this process did not grant (an earlier
        process's, found after a restart) is taken over: it runs out when its wall-clock end
        says, but no later than its own length from now."""
        self._read = True
        if lease is None or (lease.rollout_id, lease.until) in self._deadlines:
            return
        longest = lease.seconds if lease.seconds is not None else MAX_FREEZE_LEASE
        left = min(max((lease.until - wall).total_seconds(), 0.0), longest)
        self._keep(lease, mono + left)

    def lapsed(self, lease: Lease, wall: dt.datetime, mono: float) -> bool:
        """True if the journal's ``lease`` has run out, in elapsed time."""
        self.seen(lease, wall, mono)
        return mono >= self._deadlines[lease.rollout_id, lease.until]

    def known_end(self) -> float | None:
        """The monotonic time by which every lease the journal can hold has run out, for a lift
        that cannot read it: the latest deadline of the leases this process granted or took
        over (``-inf``: none), or None if this process has never read the journal's lease (one
        an earlier process granted is unknown)."""
        return self._latest if self._read else None

    def _keep(self, lease: Lease, deadline: float) -> None:
        self._read = True
        key = (lease.rollout_id, lease.until)
        self._deadlines[key] = deadline
        self._deadlines.move_to_end(key)
        while len(self._deadlines) > KEPT:
            self._deadlines.popitem(last=False)
        self._latest = max(self._latest, deadline)
