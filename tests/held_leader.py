"""A real ``tlsroll-leader`` whose admin methods named in ``HELD_METHODS`` (comma-separated
``AdminService`` method names) are held at their start: each writes the file ``HELD_MARK``
(the handler is in), then waits until the file ``HELD_RELEASE`` exists (60 s at most) before it
runs as it would. A test thus has a call in flight for as long as it needs, without a sleep:
``python tests/held_leader.py --config leader.toml``.

A held call released after the leader ended its agents' heartbeat streams (its stop) goes on
only once a node is offline to the leader (20 s at most): as a command that takes that long
would, which the stop must not leave without its nodes (review s39rev1 M2)."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

from leader import admin_service, service
from leader.daemon import main

HOLD_AT_MOST = 60.0
OFFLINE_AT_MOST = 20.0
streams_ended: list[bool] = []  # [True] once the heartbeat streams were ended


def note_streams_ended() -> None:
    close = service.LeaderService.close_streams

    def wrapper(self: service.LeaderService) -> int:
        streams_ended.append(True)
        return close(self)

    service.LeaderService.close_streams = wrapper  # type: ignore[method-assign]


def held(name: str, mark: Path, release: Path) -> None:
    inner = getattr(admin_service.AdminService, name)

    @functools.wraps(inner)
    async def wrapper(self: admin_service.AdminService, request: Any, context: Any) -> Any:
        mark.write_text(name)
        until = time.monotonic() + HOLD_AT_MOST
        while not release.exists() and time.monotonic() < until:
            await asyncio.sleep(0.05)
        until = time.monotonic() + OFFLINE_AT_MOST
        while streams_ended and time.monotonic() < until:
            nodes = await asyncio.to_thread(self.state.store.list_nodes)
            if not nodes or not all(self.state.node_online(n) for n in nodes):
                break
            await asyncio.sleep(0.1)
        return await inner(self, request, context)

    setattr(admin_service.AdminService, name, wrapper)


if __name__ == "__main__":
    note_streams_ended()
    for method in filter(None, os.environ.get("HELD_METHODS", "").split(",")):
        held(method, Path(os.environ["HELD_MARK"]), Path(os.environ["HELD_RELEASE"]))
    sys.exit(main(sys.argv[1:]))
