"""Whether the leader can write its store: why not and since when, while it cannot.

A full disk (or a failing or read-only one) fails every write of the store: the engine's
steps, its passes, the heartbeats' batches. Each used to log its own line at every tick, and
nothing but the log said why a rollout stood still. ``StoreHealth`` keeps the cause in memory
(the store cannot hold it), for ``rollout status`` and systemd's ``STATUS=``; logs the failure
at most once every ``LOG_SECONDS`` whoever hit it (with how many lines were left out); and
clears it at the store's next commit that changed a row (``Database.on_commit``).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

from tlsroll import logs
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
        self.trouble: tuple[str, dt.datetime] | None = None
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
            first = self.trouble is None
            since = self.clock() if self.trouble is None else self.trouble[1]
            self.trouble = (why, since)
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

    def works(self) -> None:
        """A write committed (``Database.on_commit``, in the writer's thread): the trouble,
        if any, is over."""
        if self.trouble is None:
            return
        with self._lock:
            trouble, self.trouble = self.trouble, None
        if trouble is not None:
            why, since = trouble
            log.warning(
                "store.writes_recovered",
                failing_since=since.isoformat(),
                error=why,
                detail="the store takes writes again: the failure said before is over",
            )
            sd_notify("STATUS=Store writes work again")
