"""Whether the leader can write its store: why not and since when, while it cannot.

A full disk (or a failing or read-only one) fails every write of the store: the engine's
steps, its passes, the heartbeats' batches. Each used to log its own line at every tick, and
nothing but the log said why a rollout stood still. ``StoreHealth`` keeps the cause in memory
(the store cannot hold it), for ``rollout status`` and systemd's ``STATUS=``; logs the failure
at most once every ``LOG_SECONDS`` whoever hit it (with how many lines were left out); and
clears it at the store's next commit that changed a row (``Database.on_commit``).

A checkpoint the disk does not take (``Database.on_checkpoint``: a file that must grow on a
full disk) is kept the same way, and cleared only by a checkpoint that succeeds: the commits
meanwhile go into the ``-wal``, which SQLite reuses once a checkpoint copied it, until it must
grow; they said nothing of the full disk until then (review s72 leaderwrite).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leader.plan_texts import START_REFUSED_AFTER
from tlsroll import logs, room
from tlsroll.daemon import sd_notify
from tlsroll.rpc import storage_trouble

log = logs.get_logger(__name__)

LOG_SECONDS = 60.0
"""While the store cannot be written, its failure is logged at most this often."""


class StoreHealth:
    def __init__(
        self,
        clock: Callable[[], dt.datetime],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.monotonic = monotonic
        # (why, since when) while writes fail; None while they work.
        self.writes: tuple[str, dt.datetime] | None = None
        # (why, since when) while the store's checkpoints fail (``checkpoint``).
        self.checkpoint_trouble: tuple[str, dt.datetime] | None = None
        self._lock = threading.Lock()  # the writer's thread clears it (``works``)
        self._logged: float | None = None  # when a failure was last logged (monotonic)
        self._left_out = 0  # failures not logged since

    def failed(self, exc: BaseException, event: str, **fields: Any) -> bool:
        """If ``exc`` says the store cannot be written (``tlsroll.rpc.storage_trouble``:
        SQLITE_FULL, SQLITE_IOERR…, ENOSPC…): keep why and since when, log it
        (``store.writes_failing``, ``during`` the caller's own event, e.g. ``step.crashed``, with
        ``fields``) unless a failure was logged less than ``LOG_SECONDS`` ago, and say True.
        Else False: the caller logs ``exc`` as it did."""
        why = storage_trouble(exc)
        if why is None:
            return False
        now = self.monotonic()
        with self._lock:
            first = self.writes is None
            since = self.clock() if self.writes is None else self.writes[1]
            self.writes = (why, since)
            due = self._logged is None or now - self._logged >= LOG_SECONDS
            left_out = self._left_out
            if due:
                self._logged = now
                self._left_out = 0
            else:
                self._left_out += 1
        if first:
            sd_notify(f"STATUS=Store writes failing since {since:%Y-%m-%d %H:%M:%S}: {why}")
        if due:
            log.error(
                "store.writes_failing",
                during=event,
                **fields,
                error_type=type(exc).__name__,
                error=why,
                failing_since=since.isoformat(),
                left_out=left_out,
                hint="free space under the leader's data dir or make it writable (df -h); the "
                "leader carries on once writes succeed",
            )
        return True

    @property
    def trouble(self) -> tuple[str, dt.datetime] | None:
        """Why the store cannot be written and since when, while it cannot: its writes fail,
        or its checkpoints do (the writes then go on for a while in the ``-wal``)."""
        return self.writes or self.checkpoint_trouble

    @property
    def writes_work(self) -> bool:
        """True while ``trouble`` is the checkpoint's alone: the writes still commit (into
        the ``-wal``), and rollouts go on until it must grow (what the words say: review s73
        revdisk, they said no rollout moved)."""
        return self.writes is None and self.checkpoint_trouble is not None

    def checkpoint(self, failed: sqlite3.Error | None) -> None:
        """A checkpoint of the store ran (``Database.on_checkpoint``, on the store's thread):
        ``failed``, the error of one the disk did not take, is kept (why, since when) and told
        as a failed write is (``store.checkpoint_failing``, systemd's ``STATUS=``) until one
        succeeds (None: ``store.checkpoint_recovered``). Its own retries wait (``Database``):
        it is logged once, when it begins."""
        if failed is not None:
            why = storage_trouble(failed)
            if why is None:
                return
            why = f"{why} at its checkpoint (its writes go on in the -wal until that must grow)"
            with self._lock:
                kept = self.checkpoint_trouble
                since = self.clock() if kept is None else kept[1]
                first = kept is None
                self.checkpoint_trouble = (why, since)
            if first:
                if self.writes is None:
                    _checkpoint_status(why, since)
                log.warning(
                    "store.checkpoint_failing",
                    error_type=type(failed).__name__,
                    error=why,
                    failing_since=since.isoformat(),
                    hint="free space under the leader's data dir (df -h): its store's writes fail"
                    " once the -wal must grow; the leader carries on once the checkpoint succeeds",
                )
            return
        if self.checkpoint_trouble is None:
            return
        with self._lock:
            trouble, self.checkpoint_trouble = self.checkpoint_trouble, None
        if trouble is not None:
            why, since = trouble
            log.warning(
                "store.checkpoint_recovered",
                failing_since=since.isoformat(),
                error=why,
                detail="the store's -wal was copied into its file: the failure said before is over",
            )
            if self.writes is None:
                sd_notify("STATUS=Store writes work again")

    def works(self) -> None:
        """A write committed (``Database.on_commit``, in the writer's thread): the trouble,
        if any, is over."""
        if self.writes is None:
            return
        with self._lock:
            trouble, self.writes = self.writes, None
        if trouble is not None:
            why, since = trouble
            log.warning(
                "store.writes_recovered",
                failing_since=since.isoformat(),
                error=why,
                detail="the store takes writes again: the failure said before is over",
            )
            checkpoint = self.checkpoint_trouble
            if checkpoint is None:
                sd_notify("STATUS=Store writes work again")
            else:  # (not the failed write's words, now over: review s73 revdisk)
                _checkpoint_status(*checkpoint)


def _checkpoint_status(why: str, since: dt.datetime) -> None:
    """systemd's ``STATUS=`` while the store's checkpoint alone fails (its writes commit)."""
    sd_notify(f"STATUS=Store checkpoint failing since {since:%Y-%m-%d %H:%M:%S}: {why}")


def start_refused(health: StoreHealth | None, data_dir: Path) -> str | None:
    """Why `rollout start` of a change that switches nodes (not the way back, nor a resume,
    an abort or a retry) is refused now, one line, or None (blocking: a ``statvfs``): the
    leader's store cannot be written, or its checkpoint fails (in the words of `rollout
    status`), or its data dir has less free than ``tlsroll.room.LEADER_ROOM``. Begun anyway,
    its steps' records failed mid-rollout, a node frozen or switched while the leader could
    not record it (session 73, diskroom)."""
    after = START_REFUSED_AFTER
    trouble = health.trouble if health is not None else None
    if trouble is not None and health is not None:
        why, since = trouble
        when = f"{since:%Y-%m-%d %H:%M:%S} UTC"
        said = (
            f"the leader's store cannot grow since {when}: {why}"
            if health.writes_work
            else f"the leader cannot write its store since {when}: {why}"
        )
        return f"{said}; free space on the leader's disk (df -h){after}"
    problems = room.room_problems(
        [("the leader's data dir", data_dir, room.LEADER_ROOM)], work="a rollout"
    )
    return f"{problems[0]}{after}" if problems else None
