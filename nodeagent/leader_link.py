"""The agent's calls to the leader: heartbeats, over mutual TLS to the leader's address.

    link = LeaderLink(cfg, identity, trust, journal, failures)
    await link.beat()     # one heartbeat now (the trust's refresh when an epoch is unknown)
    await link.run()      # every heartbeat_interval, until cancelled

The channel's TLS target name is the leader's internal name (``tlsroll.spiffe.leader_host``):
only a certificate that the CA issued to the leader passes, not one of a node that happens to
hold the leader's address. Each heartbeat reports the agent's version, the highest epoch its
journal has seen and the number of its revocation list, and carries the failed bootstrap
passwords since the last one; the reply announces the leader's epoch and, when newer, the
revocation list (both go to ``nodeagent.trust``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from nodeagent.bootstrap_server import FailureCount, FailureLog
from nodeagent.config import AgentConfig
from nodeagent.identity import Identity
from nodeagent.journal import Journal
from nodeagent.trust import LeaderTrust
from tlsroll import __version__, logs, spiffe
from tlsroll.errors import TransientError
from tlsroll.rpc import hostport
from tlsroll.v1 import leader_pb2, leader_pb2_grpc

log = logs.get_logger(__name__)


def failure_messages(sent: list[FailureCount]) -> list[leader_pb2.BootstrapFailure]:
    """What the heartbeat carries about failed bootstrap passwords."""
    messages = []
    for f in sent:
        last = Timestamp()
        last.FromDatetime(f.last_at)
        messages.append(
            leader_pb2.BootstrapFailure(
                source=f.source[:64], workstation=f.workstation[:63], count=f.count, last_at=last
            )
        )
    return messages


class LeaderLink:
    def __init__(
        self,
        cfg: AgentConfig,
        identity: Identity,
        trust: LeaderTrust,
        journal: Journal,
        failures: FailureLog | None = None,
    ) -> None:
        self.cfg = cfg
        self.trust = trust
        self.journal = journal
        self.failures = failures
        creds = grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem,
            private_key=identity.key_pem,
            certificate_chain=identity.cert_pem,
        )
        self.target = hostport(cfg.leader_address, cfg.control_port)
        self.channel = grpc.aio.secure_channel(
            self.target,
            creds,
            options=[("grpc.ssl_target_name_override", spiffe.leader_host(trust.trust_domain))],
        )
        self.stub = leader_pb2_grpc.LeaderStub(self.channel)
        self.healthy: bool | None = None
        self._lock = asyncio.Lock()

    async def beat(self) -> None:
        """One heartbeat; TransientError if the leader did not answer."""
        async with self._lock:
            sent = Timestamp()
            sent.FromDatetime(dt.datetime.now(dt.UTC))
            report = self.failures.pending() if self.failures is not None else []
            highest = await asyncio.to_thread(self.journal.highest_epoch)
            try:
                reply = await self.stub.Heartbeat(
                    leader_pb2.HeartbeatRequest(
                        agent_version=__version__,
                        sent_at=sent,
                        bootstrap_failures=failure_messages(report),
                        highest_epoch=highest,
                        crl_number=self.trust.crl_number,
                    ),
                    timeout=self.cfg.heartbeat_interval,
                )
            except grpc.aio.AioRpcError as exc:
                if self.healthy is not False:
                    log.warning(
                        "heartbeat.failed",
                        leader=self.target,
                        code=exc.code().name,
                        detail=exc.details(),
                    )
                self.healthy = False
                raise TransientError(f"heartbeat to {self.target}: {exc.details()}") from None
            if self.failures is not None:
                self.failures.reported(report)
            self.trust.announce(reply.epoch)
            if reply.crl_pem:
                await asyncio.to_thread(self.trust.take_crl, reply.crl_pem)
            if self.healthy is not True:
                log.info("heartbeat.ok", leader=self.target)
            self.healthy = True

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TransientError):  # logged once per outage by beat
                await self.beat()
            await asyncio.sleep(self.cfg.heartbeat_interval)

    async def close(self) -> None:
        await self.channel.close(None)
