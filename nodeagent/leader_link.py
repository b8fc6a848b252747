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

Heartbeats go over one long-lived ``Leader.Heartbeats`` stream, a message per interval (a
unary call costs the leader several times the CPU of a message on an open stream). A stream
that breaks (the leader restarted, refused the certificate, did not answer within the
interval) is dropped and the next heartbeat opens a new one, on the usual schedule. A leader
older than that RPC answers UNIMPLEMENTED: the agent then sends unary ``Heartbeat`` calls,
and tries the stream again once that leader has been unreachable or after
``STREAM_RETRY_BEATS`` calls (it may have been upgraded).

The link also carries the agent's certificate renewal (``renew``; ``nodeagent.renewal``) and
the renewal's status in each heartbeat; ``use`` reconnects it with the renewed certificate
(between two calls: a call in flight finishes on the old channel first).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from nodeagent.config import AgentConfig
from nodeagent.failure_log import FailureCount, FailureLog
from nodeagent.identity import Identity
from nodeagent.journal import Journal
from nodeagent.trust import LeaderTrust
from tlsroll import __version__, logs, spiffe
from tlsroll.errors import TerminalError, TransientError
from tlsroll.rpc import hostport, reconnect_options
from tlsroll.v1 import agent_pb2, leader_pb2, leader_pb2_grpc

log = logs.get_logger(__name__)
SERVER_VIEW_SECONDS = 2.0  # a heartbeat does not wait longer for the server's status
# With a leader that has no heartbeat stream, the stream is tried again after this many unary
# heartbeats (and after the leader was unreachable): an upgrade may have brought it.
STREAM_RETRY_BEATS = 60


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


class RenewalState(Protocol):
    """What a heartbeat says about renewal (``nodeagent.renewal.Status``)."""

    due_at: dt.datetime | None
    failing_since: dt.datetime | None
    error: str


class RenewalRefused(TerminalError):
    """The leader did not renew the agent's certificate; the message says why."""


def _ts(when: dt.datetime | None) -> Timestamp | None:
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def live_server(view: agent_pb2.ServerView) -> leader_pb2.LiveServer:
    """What a heartbeat says about the managed server: the status view, less the certificate
    and verifier, with who the server has seen lately (the driver caches that list, so a
    heartbeat does not run a command or read a log each time)."""
    return leader_pb2.LiveServer(
        driver=view.driver,
        healthy=view.healthy,
        frozen=view.frozen,
        schemes=list(view.schemes),
        detail=view.detail[:200],
        clients=view.clients,
    )


Beats = grpc.aio.StreamStreamCall[leader_pb2.HeartbeatRequest, leader_pb2.HeartbeatResponse]


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
        self.target = hostport(cfg.leader_address, cfg.control_port)
        self.channel, self.stub = self._connect(identity)
        self.healthy: bool | None = None
        self.renewal: Callable[[], RenewalState] | None = None
        # What the managed server runs now (NodeAgentService.server_view), sent with every
        # heartbeat so the leader sees a server that went down after its rollout.
        self.server_view: Callable[[], Awaitable[agent_pb2.ServerView]] | None = None
        self._lock = asyncio.Lock()
        self._stream: Beats | None = None
        # False once the leader answered UNIMPLEMENTED to the stream (older than it).
        self.streaming = True
        self._unary_beats = 0

    def _connect(
        self, identity: Identity
    ) -> tuple[grpc.aio.Channel, leader_pb2_grpc.LeaderAsyncStub]:
        creds = grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem,
            private_key=identity.key_pem,
            certificate_chain=identity.cert_pem,
        )
        channel = grpc.aio.secure_channel(
            self.target,
            creds,
            options=[
                ("grpc.ssl_target_name_override", spiffe.leader_host(self.trust.trust_domain)),
                # A restarted leader hears from this agent within a heartbeat interval.
                *reconnect_options(self.cfg.heartbeat_interval),
            ],
        )
        return channel, leader_pb2_grpc.LeaderStub(channel)

    async def use(self, identity: Identity) -> None:
        """Call the leader with ``identity`` (a renewed certificate) from now on."""
        async with self._lock:
            old = self.channel
            self._drop_stream()  # the next heartbeat opens one with the new certificate
            self.channel, self.stub = self._connect(identity)
        await old.close(None)

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def _exchange(self, request: leader_pb2.HeartbeatRequest) -> leader_pb2.HeartbeatResponse:
        """One heartbeat's request and reply: on the stream (opened if none is), or a unary
        call to a leader without it. AioRpcError or TimeoutError when it failed."""
        timeout = self.cfg.heartbeat_interval
        if self.streaming:
            if self._stream is None:
                self._stream = self.stub.Heartbeats()  # type: ignore[call-arg]
            stream = self._stream
            try:
                await asyncio.wait_for(stream.write(request), timeout)
                reply = await asyncio.wait_for(stream.read(), timeout)
                if isinstance(reply, leader_pb2.HeartbeatResponse):
                    return reply
                ended: BaseException = TimeoutError("the leader ended the heartbeat stream")
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as exc:
                ended = exc
            # The stream is broken: the next heartbeat opens a new one.
            code = await stream.code() if stream.done() else None
            self._drop_stream()
            if code != grpc.StatusCode.UNIMPLEMENTED:
                if isinstance(ended, grpc.aio.AioRpcError):
                    raise ended
                why = f"ended: {code.name}" if code is not None else "no reply within the interval"
                raise TimeoutError(f"the heartbeat stream {why}") from None
            self.streaming = False
            self._unary_beats = 0
            log.info("heartbeat.unary", leader=self.target, reason="the leader has no stream")
        self._unary_beats += 1
        if self._unary_beats >= STREAM_RETRY_BEATS:  # the leader may have been upgraded
            self.streaming = True
        return await self.stub.Heartbeat(request, timeout=timeout)

    async def renew(self, csr_pem: bytes) -> bytes:
        """Ask the leader to renew this agent's certificate; the new certificate (PEM).
        TransientError when the leader did not answer, RenewalRefused when it said no."""
        async with self._lock:
            try:
                reply = await self.stub.RenewNodeCertificate(
                    leader_pb2.RenewNodeCertificateRequest(csr_pem=csr_pem),
                    timeout=max(self.cfg.heartbeat_interval, 15),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise TransientError(f"renewal at {self.target}: {exc.details()}") from None
                raise RenewalRefused(
                    f"the leader refused the renewal: {exc.details()} ({exc.code().name})"
                ) from None
        return bytes(reply.certificate_pem)

    async def beat(self) -> None:
        """One heartbeat; TransientError if the leader did not answer."""
        async with self._lock:
            sent = Timestamp()
            sent.FromDatetime(dt.datetime.now(dt.UTC))
            report = self.failures.pending() if self.failures is not None else []
            highest = await asyncio.to_thread(self.journal.highest_epoch)
            request = leader_pb2.HeartbeatRequest(
                agent_version=__version__,
                sent_at=sent,
                bootstrap_failures=failure_messages(report),
                highest_epoch=highest,
                crl_number=self.trust.crl_number,
                agent_port=self.cfg.port,
            )
            if self.renewal is not None:
                state = self.renewal()
                if (due := _ts(state.due_at)) is not None:
                    request.renewal_due_at.CopyFrom(due)
                if (since := _ts(state.failing_since)) is not None:
                    request.renewal_failing_since.CopyFrom(since)
                    request.renewal_error = state.error[:200]
            if self.server_view is not None:
                with contextlib.suppress(TimeoutError):
                    view = await asyncio.wait_for(self.server_view(), SERVER_VIEW_SECONDS)
                    request.server.CopyFrom(live_server(view))
            try:
                reply = await self._exchange(request)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError):
                    code, detail = exc.code().name, str(exc.details())
                    if not self.streaming and exc.code() == grpc.StatusCode.UNAVAILABLE:
                        self.streaming = True  # the leader may come back upgraded: try again
                else:
                    code, detail = "DEADLINE_EXCEEDED", str(exc)
                if self.healthy is not False:
                    log.warning("heartbeat.failed", leader=self.target, code=code, detail=detail)
                self.healthy = False
                raise TransientError(f"heartbeat to {self.target}: {detail}") from None
            if self.failures is not None:
                self.failures.reported(report)
            self.trust.announce(reply.epoch)
            if reply.crl_pem:
                await asyncio.to_thread(self.trust.take_crl, reply.crl_pem)
            if self.healthy is not True:
                log.info("heartbeat.ok", leader=self.target, stream=self.streaming)
            self.healthy = True

    async def run(self) -> None:
        """Beat until cancelled. A beat that fails in an unforeseen way is logged and the next
        one comes as usual: an agent that stopped heartbeating would look offline for good
        while still serving, and get no revocation lists."""
        while True:
            try:
                await self.beat()
            except TransientError:  # logged once per outage by beat
                pass
            except Exception as exc:
                log.error("heartbeat.failed", error=f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(self.cfg.heartbeat_interval)

    async def close(self) -> None:
        self._drop_stream()
        await self.channel.close(None)
