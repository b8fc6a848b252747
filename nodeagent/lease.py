"""The scope freeze's lease in elapsed time (clock audit s35 A, review 2 F4 of s34).

The leader counts a lease as ``lease_seconds`` of real time from when it sent the Freeze
(``leader.engine``: ``_confirmed_until``, ``_lease_ran_out``). The agent used to keep it only as
a wall-clock deadline in the journal, so a step of the node's clock moved it: back, and the
practice stayed frozen for the lease plus the step after the leader was gone; forward, and the
lease watch lifted the freeze at once while the leader still counted the node frozen (the
invariant of audit s32 H4).

Now each lease this process grants or takes over has a deadline on the elapsed-time clock
(``tlsroll.clocks.elapsed``: CLOCK_BOOTTIME, which counts a suspend as the leader does), kept in
memory (``Leases``), and that deadline decides when it has run out. The journal still holds the
lease (whether one holds, for the runner and across a restart) with its wall-clock end, its
length, and its end on the boot-time clock (``CLOCK_BOOTTIME``: it goes on across a restart of
the agent, counts time suspended, and is never stepped) with the id of the boot it counts from
(``/proc/sys/kernel/random/boot_id``). After a restart, a journalled lease runs out:

* in the same boot, at its boot-time end: a step of the wall clock while the agent was down
  neither cuts it (the freeze lifted at once while the leader still counted the node frozen:
  review 1 of s35, finding 3) nor stretches it;
* after a reboot (or with no boot-time end: a lease journalled by an earlier build, a system
  without the clock), when its wall-clock end says, but never later than its own length from
  the restart (an end further away than that means the clock went back). A clock that is ahead
  after the reboot (an RTC ahead) still cuts it: nothing on the node measures the time between.

A lease journalled by a release before migration 5 (no length) is bounded by the longest lease
an agent grants, ``MAX_FREEZE_LEASE``.

The readings of the wall and elapsed-time clocks are the caller's (the servicer's and the
runner's ``clock`` and ``monotonic``, by default ``tlsroll.clocks.elapsed``), so that tests can
step one without the other; the boot-time clock is ``Leases.boot`` (``boot_clock``), read when
a lease is granted or taken over.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from tlsroll.defaults import MAX_FREEZE_LEASE

# Deadlines remembered: the lease in the journal and the few before it that a read which
# crossed a Freeze may still return (``NodeAgentService._lift_lapsed_freeze`` reads it twice).
KEPT = 8

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class Boot(NamedTuple):
    """A time on the boot-time clock (``CLOCK_BOOTTIME``: seconds since the boot, suspended
    time included), with the id of that boot."""

    boot_id: str
    seconds: float


@functools.cache
def _boot_id() -> str:
    """This boot's id, read once per process: it cannot change while the process runs (a
    reboot ends it). Every switch's freeze asked for it twice (its start and its end), the
    first time inside the freeze window (issue 15). A read that fails is not kept: OSError."""
    try:
        return BOOT_ID.read_text(encoding="ascii").strip()
    except UnicodeDecodeError as exc:
        raise OSError(f"{BOOT_ID}: {exc}") from None


def boot_clock() -> Boot | None:
    """Now on the boot-time clock, or None where there is none (not Linux, no /proc)."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return None
    try:
        boot_id = _boot_id()
        seconds = time.clock_gettime(clock)
    except OSError:
        return None
    return Boot(boot_id, seconds) if boot_id else None


class Lease(NamedTuple):
    """A scope freeze's lease as the journal holds it."""

    rollout_id: str
    until: dt.datetime  # its end on the wall clock when it was granted
    seconds: float | None = None  # its length; None: journalled by a release before this
    # Its end on the boot-time clock of the boot it was granted in; None: journalled by an
    # earlier build, or granted where there is no such clock.
    boot: Boot | None = None


class Leases:
    """The deadlines on the elapsed-time clock (``monotonic``) of the leases this agent process
    granted or took over from the journal. The servicer (Freeze, the lease watch) and the
    runner (a scope switch's end) share one, as they share the freeze lock (the event loop's
    thread only: it is never handed to a worker thread)."""

    def __init__(self, boot: Callable[[], Boot | None] = boot_clock) -> None:
        self.boot = boot
        self._deadlines: OrderedDict[tuple[str, dt.datetime], float] = OrderedDict()
        self._latest = -math.inf  # the latest of those deadlines
        self._read = False  # this process has read (or written) the journal's lease

    def grant(self, rollout_id: str, seconds: float, wall: dt.datetime, mono: float) -> Lease:
        """A Freeze's lease of ``seconds`` from now (``wall``, ``mono``), for the journal. Known
        here before it is written: whatever lease the journal may hold is known."""
        boot = self.boot()
        lease = Lease(
            rollout_id,
            wall + dt.timedelta(seconds=seconds),
            seconds,
            Boot(boot.boot_id, boot.seconds + seconds) if boot is not None else None,
        )
        self._keep(lease, mono + seconds)
        return lease

    def seen(self, lease: Lease | None, wall: dt.datetime, mono: float) -> None:
        """The journal's lease as just read. One this process did not grant (an earlier
        process's, found after a restart) is taken over: in the same boot it runs out at its
        end on the boot-time clock; otherwise when its wall-clock end says. Either way no
        later than its own length from now."""
        self._read = True
        if lease is None or (lease.rollout_id, lease.until) in self._deadlines:
            return
        longest = lease.seconds if lease.seconds is not None else MAX_FREEZE_LEASE
        boot = self.boot() if lease.boot is not None else None
        if boot is not None and lease.boot is not None and boot.boot_id == lease.boot.boot_id:
            left = lease.boot.seconds - boot.seconds  # elapsed time, whatever the wall clock did
        else:  # another boot: only the wall clock spans it
            left = (lease.until - wall).total_seconds()
        self._keep(lease, mono + min(max(left, 0.0), longest))

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
