"""A node that went offline a moment ago (its heartbeat stream ended: the leader restarted or
ended a stream that fell behind; its agent opens a new one within a second or so of the leader
being back, ``tests/test_stream_reconnect.py``, or at its next heartbeat if of an earlier
release) is waited for before a command refuses it as offline; a node offline for longer is
refused as before. Seen in CI: ``rollout finalize`` refused "offline: node3" right after every
node had been seen online (test_transitional, the leader killed between the phases)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from leader.commands import Commands, RolloutRequest
from leader.planner import NodesOffline
from leader.rollout_core import Change, Scope
from leader.schema_store import SchemaStore
from tests.test_engine import ADMIN, LEADER, VERIFIER_1, make_world, open_store

BOUND = dt.timedelta(seconds=3)  # offline after 3 silent heartbeats of 1 s


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def online(last: dt.datetime | None) -> bool:
    return last is not None and now() - last <= BOUND


def request() -> RolloutRequest:
    return RolloutRequest(Change.ENABLE_TLS, Scope.cluster(), auth_verifier_json=VERIFIER_1)


async def start_with_one_node_heard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent_for: dt.timedelta, *, back: bool
) -> list[str]:
    """Every node heard now but the first, heard ``silent_for`` ago; ``back``: its agent's next
    heartbeat comes 0.3 s into the command. The nodes the command refused as offline."""
    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    names = [a.name for a in world.agents]
    for name in names[1:]:
        store.heartbeat(name, "test", now=now())
    store.heartbeat(names[0], "test", now=now() - silent_for)
    commands = Commands(
        store, SchemaStore(store.db), now, online, LEADER, lambda: None, offline_grace=2.0
    )

    async def next_heartbeat() -> None:
        await asyncio.sleep(0.3)
        store.heartbeat(names[0], "test", now=now())

    late = asyncio.ensure_future(next_heartbeat()) if back else None
    try:
        await commands.start(request(), ADMIN)
        return []
    except NodesOffline as exc:
        return [name for name in names if name in str(exc)]
    finally:
        if late is not None:
            await late
        store.close()


async def test_a_node_that_just_went_offline_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline by half a second (the bound is 3 s): its agent's next heartbeat is due.
    refused = await start_with_one_node_heard(
        tmp_path, monkeypatch, BOUND + dt.timedelta(seconds=0.5), back=True
    )
    assert refused == []


async def test_a_node_that_stays_offline_is_refused_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = await start_with_one_node_heard(
        tmp_path, monkeypatch, BOUND + dt.timedelta(seconds=0.5), back=False
    )
    assert len(refused) == 1


async def test_a_node_offline_for_longer_than_the_grace_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Silent for a minute: no wait, even though a heartbeat comes 0.3 s later.
    refused = await start_with_one_node_heard(
        tmp_path, monkeypatch, dt.timedelta(minutes=1), back=True
    )
    assert len(refused) == 1
