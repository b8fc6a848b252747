"""What the leader keeps in memory (issue 15: leader RSS ≤ 120 MiB after 500 nodes), without
measuring any figure: what it must not keep once it no longer needs it, and what an idle leader
must not have imported. The figures come from ``python -m bench.simagents`` (``--memory`` shows
where the leader's memory is).
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import grpc

from tests.leader_rig import leader_with_a_node
from tlsroll.defaults import AGENT_PORT
from tlsroll.v1 import leader_pb2, leader_pb2_grpc


async def test_an_open_heartbeat_stream_keeps_no_snapshot_of_the_store_between_messages(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Found by the 500-node benchmark: each ``Heartbeats`` stream, waiting for its next
    message, held the store snapshot its last message was checked against. Every write makes a
    new snapshot (all nodes' certificates, the revoked serials, the revocation list), so with
    500 streams up to 500 of them stayed alive: 12 MiB of the leader's memory after a 500-node
    rollout. A snapshot the service has replaced must be freed while the stream stays open."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]
            await stream.write(
                leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
            )
            assert isinstance(await stream.read(), leader_pb2.HeartbeatResponse)
            used = rig.service._snapshot
            assert used is not None  # the one the message was checked against
            gone = weakref.ref(used)
            del used
            rig.store.advance_epoch(3, now=rig.clock[0], actor="test")  # a write: a new one
            newer = await rig.service.snapshot()
            assert newer.epoch == 3 and rig.service._snapshot is newer
            await asyncio.sleep(0.1)  # the stream waits for its next message
            gc.collect()
            assert gone() is None, "the open stream still holds the replaced snapshot"
            await stream.done_writing()
    finally:
        await rig.close()
