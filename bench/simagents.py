"""One real leader driven by 50–500 simulated agents (``make bench-agents NODES=50,200,500``);
prints figures, asserts nothing.

The leader is the real daemon (``tlsroll init``, ``tlsroll-leader``). The agents are not: a few
worker processes (``--worker``, about 125 agents each) each run many light agents in one event
loop, because 500 real agents (~80 MiB each) do not fit a 2-core test machine. What each
simulated agent does is what the leader sees of a real one:

* it enrols through the real join flow: a one-time token made by the leader (Admin.CreateToken
  over the admin socket), a key made here, a CSR, ``Enrolment.Enrol`` on the join port;
* it serves NodeAgent over mutual TLS on its own loopback address (port 9442) with the
  certificate it enrolled with, requiring the leader's client certificate;
* it makes a heartbeat every ``--interval`` seconds (the product default, 5 s), with the
  fields a real agent sends, staggered over the interval (``--spread renewal``: over the
  renewal bound, as agents started at independent times), on one ``Heartbeats`` stream in
  renewal mode as a real agent does: a message only when its report changed or the leader's
  renewal bound would pass, the connection's keepalive vouching for it in between (its
  channel PINGs the leader as a real agent's does)
  (``--heartbeat every``: a message every interval on the stream, as agents before renewal
  mode; ``unary``: a unary call each, as agents before the stream; a leader without the
  stream gets unary calls too); each carries a client
  report of ``--clients`` workstations whose times and counts move with every heartbeat, as
  a real server's busy workstations' do; it takes the revocation list once, as a real agent
  does;
* it answers the calls an enable-tls rollout makes: Preflight (its enrolled names; with
  ``make_csr``, a new key's CSR as a real agent does), CreateCSR (the same), Stage,
  Switch (a transaction that "restarts" for ``--restart`` seconds, then serves https on 8443
  with the staged certificate and closes http on 8080, so that the leader's outside check
  from confirm really connects), GetTransaction, WatchTransaction (with ``switch``, the
  switch begun first, as a real agent does), Rollback,
  Freeze/Unfreeze, GetStatus and Check; on its renewal stream it says it answers the
  leader's planning question there, and does (Check's answer, in a copy of its last report),
  as a real agent does, so the leader asks it there, not over a channel.

A stream the leader ended (stopping, restarting) is opened again as a real agent in renewal
mode does: after a short random pause (``nodeagent.leader_link.reconnect_pause``), as soon as
the channel is connected (the agent's reconnect backoff), all within the interval from the
beat; a late answer or a refusal waits for the next beat. ``--restart-leader`` uses it: after
the rollout the leader is stopped (SIGTERM) and started again with every agent connected, and
the bench prints how soon it has answered a new stream of every agent, its CPU for that herd of
TLS handshakes and first reports, the agents' failed heartbeats, its warnings and the nodes it
shows offline. (The bench imports the reconnect rule from the product: a tree from 92782e0 on.)

What is measured, on the leader (from /proc): its CPU over an idle window per agent and
heartbeat interval (what the heartbeats load it with; before renewal mode every interval was a
message, so this is the figure earlier runs called CPU per heartbeat), the messages that went
to it per agent and interval, and its CPU per message (all of its CPU in the window divided by
the messages: keepalive PINGs and the renewal watch included), CPU per
node over the rollout (with and without the heartbeats that fell in it), its context switches
per node over the rollout (all its threads; with and without the idle window's rate), RSS and
open files after it, and how many of those files are the agents' inbound heartbeat
connections (one per agent: the rest is the leader's own, which the AgentPool caps). On the
workers: CPU per agent and interval (the agent side of the heartbeat).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import inspect
import json
import math
import os
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp

from bench.common import (
    NO_DEBUG,
    Fsyncs,
    Reading,
    Switches,
    address,
    cpu_seconds,
    disable_tls_request,
    enable_tls_request,
    fd_kinds,
    fine_cpu_seconds,
    fsyncs_per_node,
    get_schema,
    inbound_connections,
    log_says_ended,
    open_files,
    rss_mib,
    seconds,
    sent_bytes,
    socket_ends,
    wait_for,
)
from bench.memory import LeaderState, Snapshots, memory_env, state_env, threads
from bench.profile import Perf, Profile, Yappi, yappi_env
from bench.viewer import Watchers, fetch_page, sign_in
from leader.service import renew_seconds
from nodeagent.leader_link import (
    LASTED_SECONDS,
    NOT_AT_ONCE,
    leader_channel_options,
    reconnect_pause,
    wants_answer,
)
from tests.cluster import Cluster, hostport
from tlsroll import __version__, features, pki, rpc, spiffe
from tlsroll.defaults import AGENT_PORT, CONTROL_PORT, HTTP_PORT, HTTPS_PORT, JOIN_PORT
from tlsroll.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    enrolment_pb2,
    enrolment_pb2_grpc,
    leader_pb2,
    leader_pb2_grpc,
    schema_pb2,
    types_pb2,
)

APP = "/praxis_live/"
PER_WORKER = 125
BOOTSTRAP_PORT = 9443
# The leader's RSS is read again this long after the rollout ended (and the bench fetched its
# schema): what it keeps, not only its peak.
SETTLE_SECONDS = 3.0


def now_ts() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(dt.datetime.now(dt.UTC))
    return stamp


# --- the worker: many simulated agents in one event loop ---------------------------------------


async def http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The managed server, as little of it as the outside check needs: 200 on any GET."""
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body = b'{"status": "ok"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        pass
    finally:
        writer.close()


class SimAgent(agent_pb2_grpc.NodeAgentServicer):
    """One node's agent and managed server, in memory (see the module docstring)."""

    def __init__(self, spec: dict[str, str], world: Worker) -> None:
        self.name = spec["name"]
        self.address = spec["address"]
        self.token = spec["token"]
        self.world = world
        self.key = pki.generate_key()
        self.cert_pem = b""
        self.scheme = "http"
        self.frozen = False
        self.highest_epoch = 0
        self.back = False  # the leader answered this agent since the last SIGUSR2
        self.crl_number = 0
        self.staged: dict[str, tuple[pki.PrivateKey, bytes]] = {}  # rollout id -> key, cert
        self.csr_keys: dict[str, pki.PrivateKey] = {}
        self.txns: dict[tuple[str, Any], agent_pb2.Transaction] = {}
        self.changed = asyncio.Condition()
        self.http: asyncio.Server | None = None
        self.https: asyncio.Server | None = None
        self.server: grpc.aio.Server | None = None
        self.beats = 0
        self.requests = 0
        self.first_seen = now_ts()

    # --- start-up -----------------------------------------------------------------------------

    async def enrol(self) -> None:
        """Enrol; told to wait (the join port lets one source have 4 attempts open), wait."""
        for _ in range(100):
            try:
                return await self._enrol()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name}: the join port kept refusing")

    async def _enrol(self) -> None:
        names = pki.Names.of(self.name, [self.address])
        csr = pki.csr_to_pem(pki.make_csr(self.key, names))
        creds = grpc.ssl_channel_credentials(root_certificates=self.world.ca_pem)
        options = [("grpc.ssl_target_name_override", spiffe.leader_host(self.world.td))]
        async with grpc.aio.secure_channel(
            self.world.join_target, creds, options=options
        ) as channel:
            reply = await enrolment_pb2_grpc.EnrolmentStub(channel).Enrol(
                enrolment_pb2.EnrolRequest(
                    token=self.token,
                    csr_pem=csr,
                    node_name=self.name,
                    addresses=[self.address],
                    agent_version=__version__,
                    agent_port=AGENT_PORT,
                    names_apart=True,
                ),
                timeout=60,
            )
        self.cert_pem = bytes(reply.certificate_pem)

    async def serve(self) -> None:
        self.http = await asyncio.start_server(http_handler, self.address, HTTP_PORT)
        # A real agent's server options (those of the code under test; an older tree has none).
        options = getattr(rpc, "AGENT_SERVER_OPTIONS", [("grpc.so_reuseport", 0)])
        server = grpc.aio.server(options=options)
        # Counted: the servicer's methods, each call counted (a stand-in, not a subclass)
        agent_pb2_grpc.add_NodeAgentServicer_to_server(Counted(self), server)  # type: ignore[arg-type]
        creds = grpc.ssl_server_credentials(
            [(pki.key_to_pem(self.key), self.cert_pem)],
            root_certificates=self.world.ca_pem,
            require_client_auth=True,
        )
        server.add_secure_port(hostport(self.address, AGENT_PORT), creds)
        await server.start()
        self.server = server

    async def heartbeats(self, offset: float) -> None:
        """Beat every interval as a real agent does (``nodeagent.leader_link``): on one stream
        in renewal mode, a message only when the report changed (here: its scheme, frozen,
        epoch or revocation list; not the clients' times and counts) or the leader's renewal
        bound would pass, with a reader taking the leader's answers and news; ``--heartbeat
        every``: a message every interval on the stream, as agents before renewal mode did;
        ``unary``: a call each."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.world.ca_pem,
            private_key=pki.key_to_pem(self.key),
            certificate_chain=self.cert_pem,
        )
        # The real agent's channel and its keepalive (``nodeagent.leader_link``): the leader
        # answers an agent's PINGs as it does its own (about as much CPU each).
        options = [
            ("grpc.ssl_target_name_override", spiffe.leader_host(self.world.td)),
            *leader_channel_options(int(self.world.interval)),
            *rpc.reconnect_options(self.world.interval),
        ]
        await asyncio.sleep(offset)
        stream_mode = self.world.heartbeat != "unary"
        renews = self.world.heartbeat == "stream"
        stream: Any = None
        reader: asyncio.Task[None] | None = None
        replies: asyncio.Queue[Any] = asyncio.Queue()
        renew = 0.0
        sent: tuple[tuple[object, ...], float] | None = None
        last: leader_pb2.HeartbeatRequest | None = None  # the last report sent on the stream
        writing = asyncio.Lock()  # one write at a time on the stream: reports and answers
        opened = 0.0  # when the stream was opened
        heard = 0.0  # when the leader last said anything on it (``leader_link.wants_answer``)
        ended: grpc.StatusCode | None = None  # how the leader ended it (its reader saw)
        broke = False  # the stream ended by itself (not closed here), not yet reconnected
        attempt = 0  # streams in a row that ended soon after opening (as a real agent counts)

        async def answer(call: Any, question: leader_pb2.CheckQuestion) -> None:
            """The leader's planning question on the stream, answered as a real agent does
            (``nodeagent.leader_link``): Check's answer, in a copy of the last report."""
            message = leader_pb2.HeartbeatRequest()
            if last is not None:
                message.CopyFrom(last)
            message.wants_answer = False
            message.check_answer.CopyFrom(
                leader_pb2.CheckAnswer(id=question.id, checked=self.checks())
            )
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                async with writing:
                    await call.write(message)
                self.world.messages += 1

        async def read(call: Any) -> None:
            nonlocal renew, ended, heard
            try:
                while True:
                    reply = await call.read()
                    if not isinstance(reply, leader_pb2.HeartbeatResponse):
                        ended = grpc.StatusCode.OK
                        await replies.put(TimeoutError("the leader ended the stream"))
                        return
                    heard = time.monotonic()
                    if reply.HasField("check"):  # a question: neither an answer nor news
                        self.world.spawn(answer(call, reply.check))
                        continue
                    self.back = True  # the leader answered this agent (since SIGUSR2)
                    renew = float(reply.renew_seconds)
                    self.take(reply)
                    await replies.put(reply)
            except grpc.aio.AioRpcError as exc:
                ended = exc.code()
                await replies.put(exc)

        async with grpc.aio.secure_channel(self.world.control_target, creds, options) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            while True:
                started = time.monotonic()
                request = self.heartbeat_request()
                # As a real agent's ``report_key``: not the revocation list's number.
                key = (self.scheme, self.frozen, self.highest_epoch)
                self.beats += 1
                self.world.beats += 1
                quiet = (
                    stream is not None
                    and reader is not None
                    and not reader.done()
                    and renew > 0
                    and sent is not None
                    and sent[0] == key
                    and started + self.world.interval / 2 <= sent[1] + renew
                )
                try:
                    if quiet:
                        pass
                    elif stream_mode:
                        if stream is None or reader is None or reader.done():
                            if stream is not None:
                                stream.cancel()
                            stream = stub.Heartbeats()  # type: ignore[call-arg]
                            opened, ended, broke = time.monotonic(), None, False
                            heard = opened
                            renew = 0.0
                            replies = asyncio.Queue()
                            reader = asyncio.ensure_future(read(stream))
                        request.renews = renews
                        request.answers_checks = renews  # as a real agent on a renewal stream
                        # The first message on a stream is answered (the renewal bound comes
                        # with it); later ones when the leader has news, or when it said
                        # nothing for a while (``leader_link.wants_answer``).
                        request.wants_answer = not renew or wants_answer(
                            heard, time.monotonic(), self.world.interval, renew
                        )
                        while not replies.empty():  # news taken meanwhile
                            if isinstance(error := replies.get_nowait(), BaseException):
                                raise error
                        last = request
                        async with writing:
                            await stream.write(request)
                        self.world.messages += 1
                        if request.wants_answer:
                            reply = await asyncio.wait_for(replies.get(), self.world.interval)
                            if isinstance(reply, BaseException):
                                raise reply
                        sent = (key, started)
                    else:
                        self.world.messages += 1
                        self.take(await stub.Heartbeat(request, timeout=self.world.interval))
                except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as exc:
                    if reader is not None:
                        reader.cancel()
                    if stream is not None:
                        stream.cancel()
                        stream = None
                    unimplemented = grpc.StatusCode.UNIMPLEMENTED
                    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == unimplemented:
                        stream_mode = False  # an older leader: unary, as a real agent falls back
                    else:
                        self.world.failed_beats += 1
                        # As a real agent's ``_Stream``: the stream broke when the leader ended
                        # it (the reader saw; its code kept) or a message failed on it; not
                        # when an answer was late (the next stream comes at the next beat).
                        if ended is None and isinstance(exc, grpc.aio.AioRpcError):
                            ended = exc.code()
                        broke = renews and ended is not None
                deadline = started + self.world.interval
                if not renews:
                    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                    continue
                # As a real agent in renewal mode (``nodeagent.leader_link``: ``run``,
                # ``_stream_ended``): one interval from the beat covers the wait for the
                # stream's end, a short random pause and the channel connected (gRPC's reconnect
                # backoff); the next beat goes out when it passes, connected or not (a beat
                # that fails then breaks the stream again, the pause doubling). No quick
                # reconnect after a refusal, nor once streams kept ending soon after opening.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        if not broke and reader is not None and not reader.done():
                            await asyncio.wait({reader})  # until the leader ends the stream
                            broke = ended is not None
                        if not broke:
                            await asyncio.sleep(self.world.interval)  # the deadline's
                        broke = False
                        lasted = time.monotonic() - opened >= min(
                            self.world.interval, LASTED_SECONDS
                        )
                        attempt = 0 if lasted else attempt + 1
                        pause = reconnect_pause(attempt, self.world.interval)
                        if ended in NOT_AT_ONCE or pause is None:
                            await asyncio.sleep(self.world.interval)  # the deadline's
                        await asyncio.sleep(pause or 0.0)
                        await channel.channel_ready()

    def take(self, reply: leader_pb2.HeartbeatResponse) -> None:
        """An answer or news from the leader: its epoch, and its revocation list once."""
        self.highest_epoch = max(self.highest_epoch, reply.epoch)
        if reply.crl_pem:
            crl = x509.load_pem_x509_crl(bytes(reply.crl_pem))
            ext = crl.extensions.get_extension_for_class(x509.CRLNumber)
            self.crl_number = ext.value.crl_number

    def heartbeat_request(self) -> leader_pb2.HeartbeatRequest:
        """What a real agent sends: its version, epoch, revocation list number and port, and
        its server's state with who it has seen lately (``--clients`` workstations, each with
        one more request since the last heartbeat)."""
        now = now_ts()
        self.requests += 1
        clients = [
            types_pb2.ClientSeen(
                scheme=self.scheme,
                address=f"10.{i // 250}.{i % 250}.{7}",
                workstation=f"ws-{i:03d}",
                first_seen=self.first_seen,
                last_seen=now,
                requests=self.requests,
            )
            for i in range(self.world.clients)
        ]
        return leader_pb2.HeartbeatRequest(
            agent_version=__version__,
            features=features.AGENT_FEATURES,  # (a simulated agent of this build)
            sent_at=now,
            highest_epoch=self.highest_epoch,
            crl_number=self.crl_number,
            agent_port=AGENT_PORT,
            server=leader_pb2.LiveServer(
                driver="reference",
                healthy=True,
                frozen=self.frozen,
                schemes=[self.scheme],
                clients=types_pb2.ClientsView(
                    clients=clients, window_seconds=3600, source="refserver"
                ),
            ),
        )

    # --- what the node runs -------------------------------------------------------------------

    def urls(self) -> tuple[str, str]:
        return (
            f"http://{self.address}:{HTTP_PORT}{APP}",
            f"https://{self.address}:{HTTPS_PORT}{APP}",
        )

    def view(self) -> agent_pb2.ServerView:
        http_url, https_url = self.urls()
        return agent_pb2.ServerView(
            driver="reference",
            healthy=True,
            frozen=self.frozen,
            schemes=[self.scheme],
            urls=[https_url if self.scheme == "https" else http_url],
        )

    def checks(self) -> agent_pb2.PreflightResponse:
        old_url, new_url = self.urls()
        return agent_pb2.PreflightResponse(
            ok=True,
            common_name=self.name,
            ip_addresses=[self.address],
            server=self.view(),
            new_url=new_url,
            old_url=old_url,
            bootstrap_port=BOOTSTRAP_PORT,
        )

    def seen(self, command: agent_pb2.Command) -> None:
        self.highest_epoch = max(self.highest_epoch, command.epoch)

    async def set_txn(self, txn: agent_pb2.Transaction) -> None:
        async with self.changed:
            self.txns[(txn.rollout_id, txn.kind)] = txn
            self.changed.notify_all()

    async def go(self, rollout_id: str, kind: Any, scheme: str) -> None:
        """The transaction: freeze, config written, "restart" (``--restart`` s), serve
        ``scheme``, unfreeze."""
        txn = agent_pb2.Transaction()
        txn.CopyFrom(self.txns[(rollout_id, kind)])
        txn.freeze_started_at.CopyFrom(now_ts())
        txn.phase = agent_pb2.TRANSACTION_PHASE_FROZEN
        await self.set_txn(txn)
        # As a real agent's journal: the config written, then the restart (the leader holds
        # the next nodes' preparation until then: ``Engine._prepare_later``).
        written = agent_pb2.Transaction()
        written.CopyFrom(txn)
        written.phase = agent_pb2.TRANSACTION_PHASE_CONFIG_WRITTEN
        await self.set_txn(written)
        txn = written
        t0 = time.monotonic()
        await asyncio.sleep(self.world.restart)
        if scheme == "https":
            key, cert = self.staged[rollout_id]
            ctx = self.world.server_context(self.name, key, cert)
            self.https = await asyncio.start_server(http_handler, self.address, HTTPS_PORT, ssl=ctx)
            if self.http is not None:
                self.http.close()
                await self.http.wait_closed()
                self.http = None
        else:
            self.http = await asyncio.start_server(http_handler, self.address, HTTP_PORT)
            if self.https is not None:
                self.https.close()
                await self.https.wait_closed()
                self.https = None
        self.scheme = scheme
        done = agent_pb2.Transaction()
        done.CopyFrom(txn)
        done.restart_seconds = time.monotonic() - t0
        done.freeze_ended_at.CopyFrom(now_ts())
        done.ended_at.CopyFrom(now_ts())
        done.phase = agent_pb2.TRANSACTION_PHASE_COMPLETED
        done.outcome = agent_pb2.TRANSACTION_OUTCOME_COMPLETED
        await self.set_txn(done)

    async def begin(self, command: agent_pb2.Command, kind: Any, scheme: str) -> Any:
        self.seen(command)
        key = (command.rollout_id, kind)
        if key not in self.txns:  # idempotent by rollout id, as the real agent
            old_url, new_url = self.urls()
            self.txns[key] = agent_pb2.Transaction(
                rollout_id=command.rollout_id,
                kind=kind,
                epoch=command.epoch,
                phase=agent_pb2.TRANSACTION_PHASE_STARTED,
                outcome=agent_pb2.TRANSACTION_OUTCOME_PENDING,
                started_at=now_ts(),
                old_url=old_url,
                new_url=new_url,
            )
            self.world.spawn(self.go(command.rollout_id, kind, scheme))
        return self.txns[key]

    # --- NodeAgent ----------------------------------------------------------------------------

    async def GetStatus(self, request: Any, context: Any) -> agent_pb2.NodeStatus:
        return agent_pb2.NodeStatus(
            node_name=self.name,
            agent_version=__version__,
            features=features.AGENT_FEATURES,
            agent_time=now_ts(),
            server=self.view(),
            highest_epoch=self.highest_epoch,
        )

    async def Check(self, request: Any, context: Any) -> agent_pb2.PreflightResponse:
        return self.checks()

    async def Preflight(
        self, request: agent_pb2.PreflightRequest, context: Any
    ) -> agent_pb2.PreflightResponse:
        self.seen(request.command)
        reply = self.checks()
        if request.make_csr:  # as a real agent: the rollout's key and CSR come with it
            reply.csr_pem = self.csr(request.command.rollout_id)
        return reply

    def csr(self, rollout_id: str) -> bytes:
        key = self.csr_keys.setdefault(rollout_id, pki.generate_key())
        return pki.csr_to_pem(pki.make_csr(key, pki.Names.of(self.name, [self.address])))

    async def CreateCSR(
        self, request: agent_pb2.CreateCSRRequest, context: Any
    ) -> agent_pb2.CreateCSRResponse:
        self.seen(request.command)
        return agent_pb2.CreateCSRResponse(csr_pem=self.csr(request.command.rollout_id))

    async def Stage(self, request: agent_pb2.StageRequest, context: Any) -> agent_pb2.StageResponse:
        self.seen(request.command)
        rid = request.command.rollout_id
        cert = pki.load_cert_pem(bytes(request.certificate_pem))
        self.staged[rid] = (self.csr_keys[rid], bytes(request.certificate_pem))
        reply = agent_pb2.StageResponse(fingerprint=pki.fingerprint(cert))
        reply.not_after.FromDatetime(cert.not_valid_after_utc)
        return reply

    async def Switch(self, request: agent_pb2.SwitchRequest, context: Any) -> agent_pb2.Transaction:
        txn: agent_pb2.Transaction = await self.begin(
            request.command, agent_pb2.TRANSACTION_KIND_SWITCH, "https"
        )
        return txn

    async def Rollback(
        self, request: agent_pb2.RollbackRequest, context: Any
    ) -> agent_pb2.Transaction:
        txn: agent_pb2.Transaction = await self.begin(
            request.command, agent_pb2.TRANSACTION_KIND_ROLLBACK, "http"
        )
        return txn

    async def GetTransaction(
        self, request: agent_pb2.GetTransactionRequest, context: Any
    ) -> agent_pb2.Transaction:
        txn = self.txns.get((request.rollout_id, request.kind))
        if txn is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such transaction")
        assert txn is not None
        return txn

    async def WatchTransaction(self, request: agent_pb2.GetTransactionRequest, context: Any) -> Any:
        if request.HasField("switch"):  # as a real agent: the switch begun by the same call
            await self.begin(request.switch.command, agent_pb2.TRANSACTION_KIND_SWITCH, "https")
        key = (request.rollout_id, request.kind)
        if key not in self.txns:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such transaction")
        current = self.txns[key]
        yield current
        wanted = set(request.phases)  # as a real agent: other pending states passed over
        while current.outcome == agent_pb2.TRANSACTION_OUTCOME_PENDING:
            sent = current
            async with self.changed:
                await self.changed.wait_for(lambda: self.txns[key] is not sent)  # noqa: B023
                current = self.txns[key]
            pending = current.outcome == agent_pb2.TRANSACTION_OUTCOME_PENDING
            if not wanted or not pending or current.phase in wanted:
                yield current

    async def Freeze(
        self, request: agent_pb2.FreezeRequest, context: Any
    ) -> agent_pb2.FreezeResponse:
        self.seen(request.command)
        self.frozen = True
        return agent_pb2.FreezeResponse(frozen=True)

    async def Unfreeze(
        self, request: agent_pb2.FreezeRequest, context: Any
    ) -> agent_pb2.FreezeResponse:
        self.seen(request.command)
        self.frozen = False
        return agent_pb2.FreezeResponse(frozen=False)


class Counted:
    """An agent's NodeAgent methods, each call noting the connection it came on (the leader's
    address and port as gRPC names the peer): how many channels the leader opened to the
    agents (``Worker.connections``)."""

    def __init__(self, agent: SimAgent) -> None:
        self.agent = agent

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.agent, name)
        seen = self.agent.world.connections
        agent = self.agent.name
        if inspect.isasyncgenfunction(method):

            async def stream(request: Any, context: Any) -> Any:
                seen.add((agent, context.peer()))
                async for item in method(request, context):
                    yield item

            return stream

        async def call(request: Any, context: Any) -> Any:
            seen.add((agent, context.peer()))
            return await method(request, context)

        return call


class Worker:
    """The agents of one worker process, and what they share."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.ca_pem = Path(spec["ca_file"]).read_bytes()
        self.td = spiffe.trust_domain(pki.load_cert_pem(self.ca_pem))
        self.join_target = hostport(spec["leader"], JOIN_PORT)
        self.control_target = hostport(spec["leader"], CONTROL_PORT)
        self.interval = float(spec["interval"])
        self.restart = float(spec["restart"])
        self.heartbeat = str(spec["heartbeat"])
        # Seconds the agents' first beats are spread over (``--spread``).
        self.spread = float(spec.get("spread", self.interval))
        self.clients = int(spec["clients"])
        self.work = Path(spec["work"])
        self.agents = [SimAgent(node, self) for node in spec["nodes"]]
        self.beats = 0  # heartbeat intervals, all agents
        self.messages = 0  # of which a message went to the leader
        self.failed_beats = 0
        # (agent, the leader's end of the connection) of every NodeAgent call (``Counted``).
        self.connections: set[tuple[str, str]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()

    def forget_back(self) -> None:
        """SIGUSR2: no agent counts as answered from now on (``--restart-leader``)."""
        for a in self.agents:
            a.back = False

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def server_context(self, name: str, key: pki.PrivateKey, cert_pem: bytes) -> ssl.SSLContext:
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "key.pem").write_bytes(pki.key_to_pem(key))
        (d / "cert.pem").write_bytes(cert_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
        return ctx

    async def run(self) -> None:
        limit = asyncio.Semaphore(1)

        async def enrol(a: SimAgent) -> None:
            async with limit:
                await a.enrol()
            await a.serve()

        await asyncio.gather(*(enrol(a) for a in self.agents))
        print("ready", flush=True)
        n = len(self.agents)
        for i, a in enumerate(self.agents):
            self.spawn(a.heartbeats(self.spread * i / n))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(
            signal.SIGUSR1,
            lambda: print(
                f"counts {self.beats} {self.messages} {len(self.connections)} "
                f"{sum(a.back for a in self.agents)} {self.failed_beats}",
                flush=True,
            ),
        )
        loop.add_signal_handler(signal.SIGUSR2, self.forget_back)
        await stop.wait()
        for task in list(self.tasks):
            task.cancel()
        for a in self.agents:
            if a.server is not None:
                await a.server.stop(None)


def worker_main(spec_path: Path) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spec = json.loads(spec_path.read_text())
    asyncio.run(Worker(spec).run())
    return 0


# --- the parent: the leader and the measurements ----------------------------------------------


@dataclass
class Result:
    nodes: int
    workers: int
    hb_leader_ms: float  # leader CPU per agent per heartbeat interval
    hb_leader_net_ms: float  # the same less the leader's CPU with no agent
    hb_agent_ms: float  # agents' CPU per agent per interval
    messages: float  # messages to the leader per agent per interval
    per_message_ms: float  # leader CPU in the idle window / messages in it
    idle_rss: float
    base_rss: float  # the leader's RSS before any agent connected (its own share of idle_rss)
    idle_files: int
    idle_inbound: int
    wall: float
    cpu_per_node: float
    cpu_per_node_net: float
    switches_per_node: float  # the leader's context switches over the rollout / nodes
    switches_per_node_net: float  # the same less the idle window's rate over the rollout
    loop_switches_per_node: float  # of them, its main thread's (the event loop)
    after: Reading
    state: str
    nofile: str
    fsyncs: int | None = None  # the leader's, during the rollout (--fsyncs)
    idle_fsyncs: int | None = None  # the leader's, in the idle window (--fsyncs)
    idle_messages: int = 0  # heartbeat messages the leader got in the idle window
    base_ms_per_s: float = 0.0  # the leader's CPU with no agent connected (its timers), ms/s
    settled_rss: float = 0.0  # the leader's RSS SETTLE_SECONDS after the rollout ended
    series: list[Step] = field(default_factory=list)  # each rollout's readings (--rollouts)
    idle_inside: dict[str, Any] = field(default_factory=dict)  # LeaderState before the first
    idle_kinds: dict[str, int] = field(default_factory=dict)  # idle files by kind
    # The leader's connections to agents' NodeAgent (channels it opened) up to the rollout's end.
    connections: int = 0
    herd: Herd | None = None  # the leader stopped and started again (--restart-leader)


@dataclass
class Herd:
    """The leader stopped (SIGTERM) and started again with every agent connected, after the
    rollout: how soon the agents' heartbeat streams are back, and what their reconnection
    costs it (``--restart-leader``)."""

    stop: float  # s from SIGTERM until the old process exited
    start: float  # s from the new process's start until it answered its health check
    back: float  # s from then until the leader had answered a new stream of every agent
    start_cpu: float  # s of the new process's CPU until it answered its health check
    early: int  # agents the new leader had answered by then (their reconnection in start_cpu)
    back_cpu: float  # s of its CPU from then until every agent was back
    after_rate: float  # its CPU per second over the HERD_AFTER intervals after that (s/s)
    failed: int  # the agents' heartbeats that failed from the stop until every one was back
    warnings: int  # lines at warning or error in the new process's log until then
    offline: int  # nodes ListNodes shows offline once every agent was back
    rss: float  # the new leader's RSS after the HERD_AFTER intervals (MiB)


@dataclass
class Step:
    """One rollout of a ``--rollouts`` series, and the leader after it."""

    k: int
    change: str
    state: str
    wall: float
    cpu_per_node: float
    rss: float  # as it ended
    settled_rss: float  # SETTLE_SECONDS later
    files: int  # open files as it ended
    settled_files: int  # and SETTLE_SECONDS later (the pool's idle channels closed)
    threads: int
    inside: dict[str, Any]  # LeaderState's reading, settled (empty without the hook)
    kinds: dict[str, int] = field(default_factory=dict)  # settled files by kind
    inbound: int = 0  # of them, the agents' connections to the control port
    sent: int | None = None  # bytes the leader sent on the control port during the rollout


def start_leader(cluster: Cluster, env: dict[str, str], nofile: int) -> None:
    """The leader daemon, with ``nofile`` open files at most (0: the bench's own limit) as a
    unit's LimitNOFILE would set it."""
    if not nofile:
        cluster.start_leader(env)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    try:
        cluster.start_leader(env)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def json_level(line: str) -> str:
    """A JSON log line's level ("" for anything else)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return ""
    return str(entry.get("level", "")) if isinstance(entry, dict) else ""


HERD_AFTER = 2  # intervals the leader's CPU is read after every agent came back
HERD_TIMEOUT = 120.0  # s: every agent back within this, or the bench stops with an error


def leader_restart(
    cluster: Cluster,
    procs: Sequence[subprocess.Popen[str]],
    n: int,
    env: dict[str, str],
    nofile: int,
    interval: int,
) -> Herd:
    """Stop the leader as systemd does (SIGTERM), start it again at once, and wait until it
    answered a new heartbeat stream of every agent (each agent reconnects as a real one:
    ``SimAgent.heartbeats``; counted by agent, not by answer). The herd of reconnections,
    their TLS handshakes and first reports on a leader that has just started. The control
    port opens before the admin socket answers health: the agents back by then (``early``)
    have their reconnection counted in ``start_cpu``, the others in ``back_cpu``."""
    for p in procs:
        p.send_signal(signal.SIGUSR2)  # no agent counts as answered from now on
    wait_for(lambda: worker_readings(procs)[3] == 0, 10, "the workers' reset")
    _, _, _, _, failed0 = worker_readings(procs)
    t0 = time.monotonic()
    cluster.stop_leader()
    stop = time.monotonic() - t0
    log_from = cluster.leader.log_path.stat().st_size
    t1 = time.monotonic()
    start_leader(cluster, env, nofile)
    ready = time.monotonic()
    pid = cluster.leader.pid
    start_cpu = fine_cpu_seconds(pid)
    early = worker_readings(procs)[3]
    deadline = ready + HERD_TIMEOUT
    while True:
        _, _, _, answered, failed = worker_readings(procs)
        if answered >= n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{answered} of {n} agents back after the restart")
        time.sleep(0.05)
    back = time.monotonic() - ready
    back_cpu = fine_cpu_seconds(pid) - start_cpu
    log = cluster.leader.log_path.read_bytes()[log_from:].decode(errors="replace")
    warnings = sum(json_level(line) in ("warning", "error") for line in log.splitlines())
    c0, w0 = fine_cpu_seconds(pid), time.monotonic()
    time.sleep(HERD_AFTER * interval)
    after_rate = (fine_cpu_seconds(pid) - c0) / (time.monotonic() - w0)
    rss = rss_mib(pid)
    nodes = cluster.list_nodes().values()
    return Herd(
        stop=stop,
        start=ready - t1,
        back=back,
        start_cpu=start_cpu,
        early=early,
        back_cpu=back_cpu,
        after_rate=after_rate,
        failed=failed - failed0,
        warnings=warnings,
        offline=sum(not node.online for node in nodes),
        rss=rss,
    )


def task_count(pid: int) -> int:
    """The process's threads now."""
    return len(os.listdir(f"/proc/{pid}/task"))


def next_rollout(
    cluster: Cluster,
    pid: int,
    n: int,
    k: int,
    max_parallel: int,
    inside: LeaderState | None,
    *,
    log_path: Path,
) -> Step:
    """The ``k``-th rollout of a series (k ≥ 2): disable-tls when ``k`` is even (the way back
    from the enable-tls before it), enable-tls when odd; read as the first one is."""
    disable = k % 2 == 0
    request = disable_tls_request(max_parallel) if disable else enable_tls_request(max_parallel)
    options = [("grpc.max_metadata_size", 1 << 20)]
    with grpc.insecure_channel(f"unix:{cluster.admin_socket}", options) as channel:
        before = Reading.of(pid)
        sent0 = sent_bytes(cluster.address, CONTROL_PORT)
        try:
            view = admin_pb2_grpc.AdminStub(channel).StartRollout(request, timeout=120)
        except grpc.RpcError as exc:
            raise RuntimeError(f"rollout {k} refused: {str(exc.details())[:1500]}") from None
        wait_for(
            lambda: log_says_ended(log_path, view.id), 120 + 2 * n, f"rollout {view.id}", poll=0.2
        )
        after = Reading.of(pid)
        sent1 = sent_bytes(cluster.address, CONTROL_PORT)
        view = get_schema(channel, view.id)
    change = "disable-tls" if disable else "enable-tls"
    return settled_step(k, change, view, before, after, n, pid, inside, sent0, sent1)


def settled_step(
    k: int,
    change: str,
    view: schema_pb2.RolloutView,
    before: Reading,
    after: Reading,
    n: int,
    pid: int,
    inside: LeaderState | None,
    sent0: int | None,
    sent1: int | None,
) -> Step:
    """The ``k``-th rollout's ``Step``: read as it ended (``before``, ``after``, the bytes
    sent), then ``SETTLE_SECONDS`` later (RSS, files, threads, the leader's own reading)."""
    time.sleep(SETTLE_SECONDS)  # what the leader keeps, not only its peak
    settled_rss = rss_mib(pid)
    return Step(
        k,
        change,
        types_pb2.RolloutState.Name(view.state).removeprefix("ROLLOUT_STATE_").lower(),
        seconds(view),
        (after.cpu - before.cpu) / n * 1000,
        after.rss,
        settled_rss,
        after.files,
        open_files(pid),
        task_count(pid),
        inside.read() if inside is not None else {},
        fd_kinds(pid) | socket_ends(pid),
        inbound_connections(pid, CONTROL_PORT),
        None if sent0 is None or sent1 is None else sent1 - sent0,
    )


def worker_counts(procs: Sequence[subprocess.Popen[str]]) -> tuple[int, int]:
    """Heartbeat intervals and messages sent, summed over the workers (SIGUSR1)."""
    beats, messages, _, _, _ = worker_readings(procs)
    return beats, messages


def worker_readings(procs: Sequence[subprocess.Popen[str]]) -> tuple[int, int, int, int, int]:
    """Heartbeat intervals, messages sent, the leader's connections to the agents' NodeAgent
    seen so far (``Counted``), agents the leader answered since the last SIGUSR2 and heartbeats
    that failed, summed over the workers (SIGUSR1)."""
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    sums = [0, 0, 0, 0, 0]
    for p in procs:
        assert p.stdout is not None
        counts = p.stdout.readline().split()[1:]
        sums = [total + int(c) for total, c in zip(sums, counts, strict=True)]
    beats, messages, connections, back, failed = sums
    return beats, messages, connections, back, failed


def per_message(count: int | None, messages: int) -> str:
    """fsyncs per heartbeat message in the idle window (--fsyncs)."""
    return "n/a" if count is None else f"{count / max(1, messages):.2f}"


def leader_nofile(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def make_tokens(cluster: Cluster, names: Sequence[tuple[str, str]]) -> list[str]:
    tokens = []
    with cluster.admin() as admin:
        for name, addr in names:
            reply = admin.CreateToken(
                admin_pb2.CreateTokenRequest(
                    ttl_seconds=3600, uses=1, node_name=name, addresses=[addr]
                ),
                timeout=30,
            )
            tokens.append(reply.token)
    return tokens


def one_run(
    root: Path,
    n: int,
    *,
    interval: int,
    restart: float,
    idle: float,
    max_parallel: int,
    nofile: int,
    heartbeat: str,
    clients: int,
    baseline: float,
    spread: float = 0.0,
    fsyncs: bool = False,
    profile: Path | None = None,
    yappi: Path | None = None,
    memory: Path | None = None,
    viewer: bool = True,
    rollouts: int = 1,
    plans: int = 0,
    restart_leader: bool = False,
    viewers: int = 0,
    aftermath: bool = False,
) -> Result:
    cluster = Cluster(
        root / "cluster",
        address(0),
        heartbeat_interval=interval,
        agent_heartbeat_interval=interval,
    )
    procs: list[subprocess.Popen[str]] = []
    leader_env = {
        **NO_DEBUG,
        **(yappi_env(yappi / f"leader-{n}.pstat") if yappi else {}),
        **(memory_env(memory / f"leader-{n}.tracemalloc") if memory else {}),
        **(state_env(root / "state") if (rollouts > 1 or memory) and not yappi else {}),
    }
    try:
        cluster.init()
        if not viewer:  # viewer_port = 0: the leader loads no web server (leader.runtime)
            cluster.write_leader_config({"viewer_port": 0})
        start_leader(cluster, leader_env, nofile)
        pid = cluster.leader.pid
        inside = LeaderState(pid, root / "state") if "TLSROLL_STATE" in leader_env else None
        names = [(f"s{i:03d}", address(i + 1)) for i in range(n)]
        tokens = make_tokens(cluster, names)
        # What the leader spends with no agent at all (its timers, the engine idling): the
        # heartbeats' share is what comes on top of it.
        with Switches(pid) as alone:
            b0 = fine_cpu_seconds(pid)
            time.sleep(baseline)
            base_rate = (fine_cpu_seconds(pid) - b0) / baseline
        woke = ", ".join(
            f"{name} {count / baseline:.1f}" for name, (_, count) in alone.by_name().items()
        )
        print(f"no agent yet: context switches per second by thread: {woke}")
        alone_cpu = ", ".join(
            f"{name} {cpu / baseline * 1000:.2f}" for name, cpu in alone.cpu_by_name().items()
        )
        print(f"no agent yet: CPU ms/s by thread: {alone_cpu}")
        base_rss = rss_mib(pid)
        workers = max(1, math.ceil(n / PER_WORKER))
        entries = [
            {"name": name, "address": addr, "token": token}
            for (name, addr), token in zip(names, tokens, strict=True)
        ]
        for w in range(workers):
            nodes = entries[w::workers]
            spec = {
                "ca_file": str(cluster.ca_cert_path),
                "leader": cluster.address,
                "interval": interval,
                "restart": restart,
                "heartbeat": heartbeat,
                "spread": spread or interval,
                "clients": clients,
                "work": str(root / f"w{w}"),
                "nodes": nodes,
            }
            path = root / f"worker{w}.json"
            path.write_text(json.dumps(spec))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.simagents", "--worker", str(path)],
                    stdout=subprocess.PIPE,
                    stderr=(root / f"worker{w}.log").open("w"),
                    text=True,
                    env={**os.environ, **NO_DEBUG},
                )
            )
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"worker did not start: {(root / 'worker0.log').read_text()}")
        cluster.wait_for_nodes_online([name for name, _ in names], timeout=60)
        time.sleep(2 * interval)  # every agent beating, channels up
        # The idle window: what the heartbeats cost. --fsyncs and --profile look at it too
        # (then its CPU figures compare with no other run).
        idle_counting = Fsyncs(pid, root / "strace-idle.txt")
        idle_spied = Profile(pid, profile / f"leader-{n}-idle.spy", gil=True) if profile else None
        idle_perf = Perf(pid, profile / f"leader-{n}-idle.perf") if profile else None
        with (
            idle_perf if idle_perf is not None else contextlib.nullcontext(),
            idle_counting if fsyncs else contextlib.nullcontext(),
            idle_spied if idle_spied is not None else contextlib.nullcontext(),
            Yappi(pid) if yappi else contextlib.nullcontext(),
            Switches(pid) as idle_switches,
        ):
            _, m0 = worker_counts(procs)
            l0, a0 = fine_cpu_seconds(pid), sum(cpu_seconds(p.pid) for p in procs)
            time.sleep(idle)
            l1, a1 = fine_cpu_seconds(pid), sum(cpu_seconds(p.pid) for p in procs)
            _, m1 = worker_counts(procs)
        if yappi is not None:  # the idle window's stats, apart from the rollout's
            for kept in (".pstat", ".pstat.threads"):
                (yappi / f"leader-{n}{kept}").replace(yappi / f"leader-{n}-idle{kept}")
        if idle_spied is not None and idle_perf is not None:
            print(f"idle window ({n} agents, {m1 - m0} messages):", flush=True)
            print(idle_spied.summary(n), flush=True)
            print(idle_perf.by_dso(), flush=True)
        beats = n * idle / interval  # agent-intervals in the window
        idle_reading = Reading.of(pid)
        idle_inbound = inbound_connections(pid, CONTROL_PORT)
        snapshots = Snapshots(pid, memory / f"leader-{n}.tracemalloc") if memory else None
        if snapshots is not None:
            snapshots.take()
        idle_inside = inside.read() if inside is not None else {}
        herd: Herd | None = None
        idle_kinds = fd_kinds(pid) | socket_ends(pid)
        if plans:
            plan_cpu(cluster, pid, n, plans, max_parallel, (l1 - l0) / idle)
        watchers = open_viewers(cluster, root, n, viewers) if viewers else None
        _, rollout_m0 = worker_counts(procs)
        before = Reading.of(pid)
        before_fine = fine_cpu_seconds(pid)  # (--aftermath's: against the idle rate's counter)
        sent0 = sent_bytes(cluster.address, CONTROL_PORT) if rollouts > 1 else None
        t0 = time.monotonic()
        # A refusal may name hundreds of nodes: let its message through whole.
        options = [("grpc.max_metadata_size", 1 << 20)]
        counting = Fsyncs(pid, root / "strace.txt")
        spied = Profile(pid, profile / f"leader-{n}.spy", gil=True) if profile else None
        perf = Perf(pid, profile / f"leader-{n}.perf") if profile else None
        switches = Switches(pid)
        with (
            switches,
            Yappi(pid) if yappi else contextlib.nullcontext(),
            perf if perf is not None else contextlib.nullcontext(),
            counting if fsyncs else contextlib.nullcontext(),
            spied if spied is not None else contextlib.nullcontext(),
            grpc.insecure_channel(f"unix:{cluster.admin_socket}", options) as channel,
        ):
            try:
                view = admin_pb2_grpc.AdminStub(channel).StartRollout(
                    enable_tls_request(max_parallel), timeout=120
                )
            except grpc.RpcError as exc:
                details = str(exc.details())
                why = f"start refused: {details[:1500]} ({len(details)} chars)"
                raise RuntimeError(why) from None
            wait_for(
                lambda: log_says_ended(cluster.leader.log_path, view.id),
                120 + 2 * n,
                f"rollout {view.id}",
                poll=0.2,
            )
            after = Reading.of(pid)
            during = time.monotonic() - t0
            _, rollout_m1, connections, _, _ = worker_readings(procs)
            sent1 = sent_bytes(cluster.address, CONTROL_PORT) if rollouts > 1 else None
            if not aftermath:
                view = get_schema(channel, view.id)
        if aftermath:
            # Every agent's next beat after the end (the messages the rollout caused: its new
            # epoch, its new scheme) has come: read again, the idle window's rate taken off.
            # (After the rollout's window: its profiles and context switches end with it.)
            time.sleep(interval + 1.0)
            tail_cpu = fine_cpu_seconds(pid) - before_fine  # the idle rate's counter, to the ns
            _, tail_m1, _, _, _ = worker_readings(procs)
            whole = time.monotonic() - t0
            idle_rate = (l1 - l0) / idle  # the leader's CPU per second in the idle window
            print(
                f"rollout and its aftermath ({whole:.1f} s), {n} nodes: leader CPU per node "
                f"{tail_cpu / n * 1000:.1f} ms, net of the idle window's rate "
                f"{(tail_cpu - idle_rate * whole) / n * 1000:.1f} ms; heartbeat "
                f"messages per node {(tail_m1 - rollout_m0) / n:.2f}",
                flush=True,
            )
            with grpc.insecure_channel(f"unix:{cluster.admin_socket}", options) as channel:
                view = get_schema(channel, view.id)
        if watchers is not None:
            if snapshots is not None:  # the page still open: what it holds, apart from after
                snapshots.take()
                if inside is not None:
                    print(f"leader {n}, the page open: {json.dumps(inside.read())}", flush=True)
            close_viewers(cluster, watchers, n, during)
        print(
            f"rollout, {n} nodes: agents' heartbeat messages per node "
            f"{(rollout_m1 - rollout_m0) / n:.2f} ({(rollout_m1 - rollout_m0) / during:.1f}/s)"
        )
        per_thread = ", ".join(
            f"{name} {cpu / n * 1000:.2f}" for name, cpu in switches.cpu_by_name().items()
        )
        print(f"rollout, {n} nodes: CPU ms per node by thread: {per_thread}")
        woke = ", ".join(f"{name} {c / n:.1f}" for name, (_, c) in switches.by_name().items())
        print(f"rollout, {n} nodes: context switches per node by thread: {woke}")
        first = settled_step(1, "enable-tls", view, before, after, n, pid, inside, sent0, sent1)
        series = [first]
        # --rollouts K: more rollouts against the same leader and agents, the way back and
        # enable-tls again in turn (what the simulated agents can do), each read as the first.
        for k in range(2, rollouts + 1):
            if snapshots is not None:
                snapshots.take()
            _, sent_before = worker_counts(procs)
            series.append(
                next_rollout(
                    cluster, pid, n, k, max_parallel, inside, log_path=cluster.leader.log_path
                )
            )
            _, sent_after = worker_counts(procs)
            print(
                f"rollout {k}, {n} nodes: agents' heartbeat messages per node "
                f"{(sent_after - sent_before) / n:.2f}"
            )
        if snapshots is not None:
            snapshots.take()
            if inside is not None:
                print(f"leader {n}, at the end: {json.dumps(inside.read())}", flush=True)
            print(f"leader {n}: threads {dict(threads(pid))}", flush=True)
            print(snapshots.report(), flush=True)
        if spied is not None and perf is not None:
            print(spied.summary(n), flush=True)
            print(perf.by_dso(), flush=True)
        limit = leader_nofile(pid)
        if restart_leader:  # last: the leader's pid and its readings change
            herd = leader_restart(cluster, procs, n, leader_env, nofile, interval)
        hb_leader = (l1 - l0) / beats
        hb_leader_net = (l1 - l0 - base_rate * idle) / beats
        cpu = after.cpu - before.cpu
        hb_in_rollout = hb_leader * n * during / interval
        idle_switch_rate = idle_switches.total / idle  # heartbeats, keepalives, timers
        messages = max(1, m1 - m0)
        by_thread = ", ".join(
            f"{name} {count / messages:.2f}" for name, (_, count) in idle_switches.by_name().items()
        )
        print(f"idle window, {n} agents: context switches per message by thread: {by_thread}")
        cpu_by_thread = ", ".join(
            f"{name} {cpu / idle * 1000:.2f}" for name, cpu in idle_switches.cpu_by_name().items()
        )
        print(f"idle window, {n} agents: CPU ms/s by thread: {cpu_by_thread}")
        return Result(
            nodes=n,
            workers=workers,
            hb_leader_ms=hb_leader * 1000,
            hb_leader_net_ms=hb_leader_net * 1000,
            hb_agent_ms=(a1 - a0) / beats * 1000,
            messages=(m1 - m0) / beats,
            per_message_ms=(l1 - l0) / max(1, m1 - m0) * 1000,
            idle_rss=idle_reading.rss,
            base_rss=base_rss,
            idle_files=idle_reading.files,
            idle_inbound=idle_inbound,
            wall=seconds(view),
            cpu_per_node=cpu / n * 1000,
            cpu_per_node_net=(cpu - hb_in_rollout) / n * 1000,
            switches_per_node=switches.total / n,
            switches_per_node_net=(switches.total - idle_switch_rate * during) / n,
            loop_switches_per_node=switches.main / n,
            after=after,
            state=types_pb2.RolloutState.Name(view.state).removeprefix("ROLLOUT_STATE_").lower(),
            nofile=limit,
            fsyncs=counting.count,
            idle_fsyncs=idle_counting.count,
            idle_messages=m1 - m0,
            base_ms_per_s=base_rate * 1000,
            settled_rss=first.settled_rss,
            series=series,
            idle_inside=idle_inside,
            idle_kinds=idle_kinds,
            connections=connections,
            herd=herd,
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        cluster.close()


def open_viewers(cluster: Cluster, root: Path, n: int, k: int) -> tuple[str, Watchers]:
    """``k`` live viewer pages, open before the rollout (``--viewers``)."""
    cookie = sign_in(cluster)
    watchers = Watchers(cluster, cookie, k, root)
    print(f"viewers, {n} nodes: {k} live pages open and shown in {watchers.start():.2f} s")
    return cookie, watchers


def close_viewers(cluster: Cluster, opened: tuple[str, Watchers], n: int, during: float) -> None:
    """What the live pages were sent during the rollout, and one GET / after it."""
    cookie, watchers = opened
    time.sleep(1.0)  # the rollout's last update on its way
    streams = watchers.stop()
    for i, s in enumerate(streams):
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(s.events.items()))
        print(
            f"viewer {i + 1}, {n} nodes: first view {s.first / 1024:.1f} KiB; over the rollout "
            f"{s.bytes / 1024:.0f} KiB, {s.bytes / n / 1024:.2f} KiB per node, "
            f"{s.bytes / during / 1024:.0f} KiB/s; events {kinds or 'none'}; "
            f"largest {s.largest / 1024:.1f} KiB"
        )
    page = fetch_page(cluster, cookie)
    print(
        f"viewer, {n} nodes: GET / after the rollout: first byte {page.first_byte * 1000:.0f} ms, "
        f"whole {page.whole * 1000:.0f} ms, {page.size / 1024:.1f} KiB"
    )


def plan_cpu(cluster: Cluster, pid: int, n: int, plans: int, parallel: int, rate: float) -> None:
    """``--plans K``: K ``tlsroll plan`` (Admin.PlanRollout, enable-tls) before the rollout,
    one after another; prints the leader's CPU per plan and node, as it is and less its idle
    window's rate (``rate``: CPU seconds per second, heartbeats and timers) over the plans'
    time. The planning question alone: every node asked what it runs."""
    options = [("grpc.max_metadata_size", 1 << 20)]
    with grpc.insecure_channel(f"unix:{cluster.admin_socket}", options) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        c0, t0 = fine_cpu_seconds(pid), time.monotonic()
        for _ in range(plans):
            stub.PlanRollout(enable_tls_request(parallel), timeout=120)
        cpu, wall = fine_cpu_seconds(pid) - c0, time.monotonic() - t0
    print(
        f"plans: {plans} x {n} nodes, {wall / plans * 1000:.0f} ms each; leader CPU per plan "
        f"and node {cpu / plans / n * 1000:.2f} ms, less the idle rate "
        f"{(cpu - rate * wall) / plans / n * 1000:.2f} ms",
        flush=True,
    )


def print_herd(n: int, h: Herd) -> None:
    print(
        f"  leader restarted with {n} agents connected: stopped in {h.stop:.2f} s, answering "
        f"{h.start:.2f} s after its start ({h.start_cpu * 1000:.0f} ms CPU), every agent's "
        f"stream back {h.back:.2f} s later ({h.early} of them by then; "
        f"{h.back_cpu * 1000:.0f} ms CPU for the others, "
        f"{h.back_cpu / max(1, n - h.early) * 1000:.2f} ms each); "
        f"then {h.after_rate * 1000:.1f} ms/s over "
        f"{HERD_AFTER} intervals; agents' failed heartbeats {h.failed}, leader warnings "
        f"{h.warnings}, nodes offline {h.offline}; its RSS then {h.rss:.1f} MiB",
        flush=True,
    )


def _inside(state: dict[str, Any]) -> str:
    """A ``LeaderState`` reading in a few words: tasks, allocated blocks, then every map that
    is not empty (``engine.revoked`` and ``engine.auth_known``: rollouts, then nodes in all)."""
    if not state:
        return ""
    if "error" in state:
        return str(state["error"])
    words = [f"tasks {state.get('tasks')}", f"blocks {state.get('blocks')}"]
    for part in (
        "resident",
        "malloc",
        "pymalloc",
        "sqlite",
        "engine",
        "pool",
        "service",
        "store",
        "cache",
    ):
        sizes = state.get(part) or {}
        kept = ",".join(f"{k.lstrip('_')}={v}" for k, v in sizes.items() if v)
        words.append(f"{part}[{kept}]")
    if state.get("engine_nodes"):
        words.append(f"engine nodes {state['engine_nodes']}")
    return " ".join(words)


def print_series(r: Result, mark: str = "") -> None:
    """A ``--rollouts`` series: the leader after each rollout (``mark``: the run's
    ``_not_a_figure``, on each row)."""
    print(
        f"  {r.nodes} nodes, idle before the first: RSS {r.idle_rss:.1f} MiB, "
        f"files {r.idle_files} {r.idle_kinds} (inbound {r.idle_inbound}); "
        f"{_inside(r.idle_inside)}"
    )
    print(
        f"  {'k':>3} {'change':>11} {'outcome':>9} {'wall s':>6} {'CPU/node':>8} "
        f"{'RSS end':>7} {'settled':>7} {'files':>5} {'settled':>7} {'threads':>7} "
        f"{'sent MiB':>8}  inside"
    )
    for st in r.series:
        sent = "n/a" if st.sent is None else f"{st.sent / 2**20:.1f}"
        print(
            f"  {st.k:>3} {st.change:>11} {st.state:>9} {st.wall:>6.1f} {st.cpu_per_node:>8.1f} "
            f"{st.rss:>7.1f} {st.settled_rss:>7.1f} {st.files:>5} {st.settled_files:>7} "
            f"{st.threads:>7} {sent:>8}  files {st.kinds} (inbound {st.inbound}); "
            f"{_inside(st.inside)}{mark}",
            flush=True,
        )


def _not_a_figure(ns: argparse.Namespace) -> str:
    """The mark of a row whose CPU figures a profiler or tracer inflated: yappi runs inside
    the leader over the idle window (whose CPU gives the heartbeat figures) and the rollout,
    tracemalloc from its start; py-spy/perf (--profile) and strace (--fsyncs) sample or trace
    it from outside in those windows. The no-agent baseline is read without yappi, py-spy
    and strace, so even the net figures carry their cost."""
    if ns.yappi is not None or ns.profile is not None or ns.memory is not None:
        return "  (profiled: not a figure)"
    return "  (strace: CPU not a figure)" if ns.fsyncs else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--nodes", default="50,200,500", help="comma-separated cluster sizes")
    parser.add_argument("--interval", type=int, default=5, help="heartbeat interval (s)")
    parser.add_argument("--restart", type=float, default=0.4, help="simulated restart (s)")
    parser.add_argument("--idle", type=float, default=20.0, help="idle window measured (s)")
    parser.add_argument("--max-parallel", type=int, default=10)
    parser.add_argument(
        "--nofile", type=int, default=0, help="the leader's open-file limit (0: inherit)"
    )
    parser.add_argument(
        "--heartbeat",
        choices=("stream", "every", "unary"),
        default="stream",
        help="how the agents send heartbeats: one stream each in renewal mode (as agents do), "
        "a message every interval on it (agents before renewal mode), or unary calls",
    )
    parser.add_argument(
        "--spread",
        choices=("interval", "renewal"),
        default="interval",
        help="the agents' first beats spread over one heartbeat interval (as agents that all "
        "reconnected at once, after a leader restart: their renewal-mode messages then come in "
        "one interval of every renewal bound) or over the renewal bound (as agents started at "
        "independent times: their messages evenly spread)",
    )
    parser.add_argument(
        "--clients", type=int, default=2, help="workstations in each heartbeat's client report"
    )
    parser.add_argument(
        "--baseline",
        type=float,
        default=10.0,
        help="seconds the leader's CPU is measured with no agent (its own idle work)",
    )
    parser.add_argument(
        "--memory",
        type=Path,
        help="trace the leader's Python allocations (tracemalloc, from its start) and print, "
        "idle and after the rollout, its resident memory by mapping, its Python memory by "
        "file, and the source lines that grew (snapshots kept in this directory; the RSS "
        "figures then compare with no other run)",
    )
    parser.add_argument(
        "--no-viewer",
        action="store_true",
        help="run the leader with its web viewer off (viewer_port = 0; it is on by default)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument(
        "--fsyncs",
        action="store_true",
        help="count the leader's fsyncs during the rollout and in the idle window (strace: "
        "its CPU figures then compare with no other run)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="profile the leader in the idle window (the heartbeats) and during the rollout "
        "with py-spy and perf, keep the stacks in this directory and print where its CPU went "
        "(the CPU figures then compare with no other run)",
    )
    parser.add_argument(
        "--yappi",
        type=Path,
        help="profile the leader's Python in the idle window (the heartbeats: "
        "leader-N-idle.pstat) and during the rollout (leader-N.pstat) with yappi (CPU clock, "
        "every thread; pip install yappi) and keep the stats (pstat) in this directory (the "
        "CPU figures, the heartbeats' too, then compare with no other run: each row is "
        "marked '(profiled: not a figure)')",
    )
    parser.add_argument(
        "--rollouts",
        type=int,
        default=1,
        help="rollouts run back to back against the same leader and agents (enable-tls, then "
        "disable-tls and enable-tls in turn); with more than one, the leader's RSS, open files, "
        "threads, asyncio tasks and the size of the maps it keeps per rollout, node and "
        "connection are printed after each (a hook on the leader's PYTHONPATH reads them: "
        "bench/memory_site)",
    )
    parser.add_argument(
        "--plans",
        type=int,
        default=0,
        help="before the rollout, this many `tlsroll plan` (enable-tls) one after another: "
        "the leader's CPU per plan and node (the planning question alone)",
    )
    parser.add_argument(
        "--restart-leader",
        action="store_true",
        help="after the rollout, stop the leader (SIGTERM) and start it again with every agent "
        "connected: how soon every agent's heartbeat stream is back (the agents reconnect as "
        "real ones do), the leader's CPU for the herd, the agents' failed heartbeats",
    )
    parser.add_argument(
        "--viewers",
        type=int,
        default=0,
        help="this many live web viewer pages (one session, GET /events) open through the "
        "rollout: what each was sent, and GET / after it (bench.viewer)",
    )
    parser.add_argument(
        "--aftermath",
        action="store_true",
        help="also read the leader's CPU one heartbeat interval after the rollout ended (the "
        "agents' messages it caused, their new epoch and scheme, come at their next beat: a "
        "short rollout's fall after its end), net of the idle window's rate (the settled RSS "
        "is then read that much later)",
    )
    ns = parser.parse_args(argv)
    if ns.worker is not None:
        return worker_main(ns.worker)
    if ns.restart_leader and ns.heartbeat != "stream":
        parser.error("--restart-leader needs --heartbeat stream (agents as they are now)")
    if ns.viewers and ns.no_viewer:
        parser.error("--viewers needs the leader's viewer (not --no-viewer)")
    if ns.memory is not None and ns.yappi is not None:
        parser.error("--memory and --yappi each need the leader's site hook: one at a time")
    for where in (ns.profile, ns.yappi, ns.memory):
        if where is not None:
            where.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in ns.nodes.split(",") if s.strip()]
    print(
        f"simulated agents: heartbeat every {ns.interval} s, restart {ns.restart} s, "
        f"enable-tls max-parallel {ns.max_parallel}, idle window {ns.idle:g} s, "
        f"{ns.heartbeat} heartbeats with {ns.clients} clients each, "
        f"first beats spread over the {ns.spread}, "
        f"leader's viewer {'off' if ns.no_viewer else 'on'}"
        + (f", {ns.viewers} live pages open" if ns.viewers else "")
    )
    print(
        f"{'nodes':>5} {'outcome':>9} {'wall s':>7} {'CPU/node ms':>11} {'net ms':>7} "
        f"{'ctx/node':>8} {'net':>5} {'loop':>5} "
        f"{'HB leader ms':>12} {'net':>5} {'msgs':>5} {'ms/msg':>6} {'HB agent ms':>11} "
        f"{'RSS MiB':>7} {'settled':>7} {'files':>5} "
        f"{'idle RSS':>8} {'no agent':>8} {'idle files':>10} {'inbound':>7} {'nofile':>6} "
        f"{'0 agents ms/s':>13} {'chan/node':>9}"
        + (f" {'fsync/node':>10} {'idle fsync/msg':>14}" if ns.fsyncs else "")
    )
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="tlsroll-sim-"))
        try:
            r = one_run(
                root,
                n,
                interval=ns.interval,
                restart=ns.restart,
                idle=ns.idle,
                max_parallel=ns.max_parallel,
                nofile=ns.nofile,
                heartbeat=ns.heartbeat,
                spread=renew_seconds(ns.interval) if ns.spread == "renewal" else ns.interval,
                clients=ns.clients,
                baseline=ns.baseline,
                fsyncs=ns.fsyncs,
                profile=ns.profile,
                yappi=ns.yappi,
                memory=ns.memory,
                viewer=not ns.no_viewer,
                rollouts=max(1, ns.rollouts),
                plans=ns.plans,
                restart_leader=ns.restart_leader,
                viewers=ns.viewers,
                aftermath=ns.aftermath,
            )
        finally:
            if not ns.keep:
                shutil.rmtree(root, ignore_errors=True)
        print(
            f"{r.nodes:>5} {r.state:>9} {r.wall:>7.1f} {r.cpu_per_node:>11.1f} "
            f"{r.cpu_per_node_net:>7.1f} {r.switches_per_node:>8.0f} "
            f"{r.switches_per_node_net:>5.0f} {r.loop_switches_per_node:>5.0f} "
            f"{r.hb_leader_ms:>12.2f} {r.hb_leader_net_ms:>5.2f} "
            f"{r.messages:>5.2f} {r.per_message_ms:>6.2f} {r.hb_agent_ms:>11.2f} "
            f"{r.after.rss:>7.1f} {r.settled_rss:>7.1f} {r.after.files:>5} {r.idle_rss:>8.1f} "
            f"{r.base_rss:>8.1f} "
            f"{r.idle_files:>10} "
            f"{r.idle_inbound:>7} {r.nofile:>6} {r.base_ms_per_s:>13.2f} "
            f"{r.connections / r.nodes:>9.2f}"
            + (
                f" {fsyncs_per_node(r.fsyncs, r.nodes):>10}"
                f" {per_message(r.idle_fsyncs, r.idle_messages):>14}"
                if ns.fsyncs
                else ""
            )
            + _not_a_figure(ns),
            flush=True,
        )
        if len(r.series) > 1:
            print_series(r, _not_a_figure(ns))
        if r.herd is not None:
            print_herd(r.nodes, r.herd)
    print(
        "CPU/node: leader CPU over the rollout / nodes; net: less the heartbeats in that time; "
        "ctx/node: the leader's context switches over the rollout / nodes (voluntary + "
        "involuntary, summed over its threads, sampled from /proc every 0.2 s: a thread that "
        "ends between two samples is missed; how often it woke, a count the machine's load "
        "moves little: each hand-off to a worker thread and each gRPC completion wakes a "
        "thread); net: less the idle window's rate (heartbeats, keepalives, timers) over the "
        "rollout's time; loop: of ctx/node, the main thread's (the event loop); "
        "HB leader ms: the leader's CPU over the idle window per agent per heartbeat interval "
        "(the load heartbeats put on it; net: less its CPU with no agent, measured before they "
        "start); msgs: messages the leader got per agent per interval (1.00 when every "
        "heartbeat is one); ms/msg: the leader's CPU in the window / those messages "
        "(keepalive and renewal watch included); HB agent ms: the agents' CPU per agent per "
        "interval; RSS MiB: the leader's when the rollout ended; settled: "
        f"{SETTLE_SECONDS:g} s later, after the bench fetched the rollout's schema; idle RSS: "
        "the leader's with every agent connected, before the rollout; no "
        "agent: before any connected (the rest of idle RSS is the agents' connections and "
        "heartbeat streams); inbound: of the idle files, the agents' heartbeat connections "
        "(idle files - inbound: the leader's own); 0 agents ms/s: the leader's CPU per second "
        "before any agent connected (its own timers; what 'net' takes off); chan/node: the "
        "connections the leader opened to the agents' NodeAgent up to the rollout's end "
        "(planning and steps; each an mTLS handshake), per node; a row marked "
        "'(profiled: not a figure)' (--yappi, --profile, --memory; the --rollouts rows too) or "
        "'(strace: CPU not a figure)' (--fsyncs: its fsync counts are the figures): a profiler "
        "or strace ran in its windows, the idle one too, so its CPU figures (the heartbeats' "
        "included) compare with no other run"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
