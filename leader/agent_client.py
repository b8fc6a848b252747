"""The leader's calls to the node agents (NodeAgent, mutual TLS with the leader's certificate).

    agents = AgentPool(store, credentials)
    agent = await agents.get("node1")           # one channel per node, reused
    reply = await agent.preflight(request)      # TransientError or StepFailed, never grpc's

``AgentApi`` is what the engine needs of an agent; ``AgentClient`` is the real one, and tests
drive the engine with a fake that has the same methods. Retries live here and only here: a call
that fails with UNAVAILABLE or DEADLINE_EXCEEDED, or with the node's full disk
(``NodeDiskFull``), is tried again a few times with backoff (tenacity), then raises
``TransientError`` (the engine runs the step again later; an agent's "being received" at once:
``BeingReceived``); any other status is the agent saying no, ``StepFailed`` (terminal for the
step).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from typing import Any, Protocol, TypeVar

import grpc

from leader import agent_features
from leader.store import Node, Store
from tlsroll import dbthread, features, peertext, spiffe
from tlsroll.errors import (
    LOCAL_ERRNOS,
    LocalResourceError,
    TerminalError,
    TlsrollError,
    TransientError,
)
from tlsroll.rpc import (
    BEING_RECEIVED,
    DISK_FULL,
    NO_BDP_PROBE,
    STORE_UNAVAILABLE,
    hostport,
    reconnect_options,
)
from tlsroll.v1 import agent_pb2, agent_pb2_grpc

T = TypeVar("T")
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# What an agent answers when it will not begin a switch (its checks, its epoch, its leader):
# then nothing began. Any other status before the first state says nothing of whether the
# switch began (``switch_and_watch``).
REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
CALL_TIMEOUT = 30.0
# Open agent channels the pool keeps at most besides those of the live rollout's nodes in flight
# (least recently used idle ones are closed): each costs the leader about two descriptors, so 500
# nodes would otherwise need ~1000 of them, and memory inside gRPC (its TLS connection) that the
# leader keeps while it is open. The engine names the nodes in flight at each pass
# (``AgentPool.hold``: --max-parallel, default 1, plus prepare_ahead); their channels are never
# closed by the cap, so a node's steps reuse one channel however long it waits between them (a
# retry, its turn to switch) and whatever else uses the pool meanwhile (scope freezes, plan and
# observe). The cap bounds the rest: the planning's checks of agents that cannot take them on their
# heartbeat stream (the others open no channel for planning), 16 at a time
# (observe.OBSERVE_AT_ONCE, last node first, so that the channels left open are those of the nodes
# the rollout begins with), freezes, the nodes just out of flight. A start's first nodes, whose
# steps need their channels, have them opened by its planning (``reach``): at most
# min(--max-parallel + prepare_ahead, this cap, OBSERVE_AT_ONCE), OBSERVE_AT_ONCE at a time, and
# reserved (never closed by the cap) until a hold of a live rollout follows the start, or the
# start is refused
# (``release_first``). Issue 15, ``bench.simagents`` at
# 500 agents (--max-parallel 10), 4 pairs of 16 throughout against 32: the leader's RSS at the
# rollout's end 121.1-121.7 MiB against 122.6-124.1 (1.3-2.9 lower); 3 s later, once ``give_back``
# has closed the rest, 120.5, 120.5, 122.4, 120.7 against 122.1, 123.6, 122.1, 121.8; 18 connections
# opened more over the rollout (1989 against 1971, strace), its CPU per node no different (17.9,
# 16.7, 15.0 ms against 17.2, 18.1, 15.1). Those figures are of 16 throughout, before in-flight
# nodes were held (not measured since).
MAX_OPEN_CHANNELS = 16
# TCP connections ``AgentPool.reach`` makes at once (each a descriptor while it connects; the
# leader's unit has LimitNOFILE=16384): a port that drops SYNs holds its slot until the planning's
# deadline, so with 64 slots 500 such nodes took 8 rounds of 5 s (review 2, finding 1); with 256,
# a node not dialled by the deadline is reported so ("not dialled within 5 s"), not waited for.
DIAL_AT_ONCE = 256
# A start's first channels, handed to the engine (``AgentPool.release_first``), stay reserved
# until a hold names a live rollout (its own: the engine holds the nodes it steps), or this long
# (an engine pass that began before the start's commit holds none, and must not drop them; a
# rollout aborted before any pass saw it never is held). The engine passes every second only
# while a rollout is live; idle, it waits for a wake, a store write or its idle tick
# (``leader.engine.IDLE_TICK_SECONDS``, 60 s), so this bound is checked at the next hold: a
# start aborted before any pass saw it keeps its channels out of the cap's reach until then,
# a minute at most.
HANDED_SECONDS = 10.0
FAILED_STATES = frozenset(
    {grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN}
)
# WatchTransaction: one stream lasts at most this long (a stopped agent sends nothing, and TCP
# does not tell); it is opened again at once and the agent sends the current state first.
STREAM_SECONDS = 15.0
STREAM_ATTEMPTS = 3  # streams in a row that bring nothing before it is a TransientError
POLL_SECONDS = 0.3  # only for an agent without WatchTransaction (UNIMPLEMENTED)
# WatchTransaction's ``phases``: the states the leader acts on (``leader.changes``'s
# ``wait_transaction``): the begun one, the config written (the restart begins: the next
# node's preflight may go), the verified one (the confirm's outside check begins) and every
# state of a way back. A switch's frozen and restarted states are not streamed (two of its six
# messages, the restarted one inside the freeze window): the next state sent carries what
# they said (the freeze's start, the restart's length); the first state of a stream and every
# outcome come whatever their phase. An agent of an earlier release sends every state.
WATCHED_PHASES = (
    agent_pb2.TRANSACTION_PHASE_STARTED,
    agent_pb2.TRANSACTION_PHASE_CONFIG_WRITTEN,
    agent_pb2.TRANSACTION_PHASE_VERIFIED,
    agent_pb2.TRANSACTION_PHASE_COMPLETED,
    agent_pb2.TRANSACTION_PHASE_ROLLING_BACK,
    agent_pb2.TRANSACTION_PHASE_RESTORED,
    agent_pb2.TRANSACTION_PHASE_RB_RESTARTED,
    agent_pb2.TRANSACTION_PHASE_RB_VERIFIED,
    agent_pb2.TRANSACTION_PHASE_ROLLED_BACK,
    agent_pb2.TRANSACTION_PHASE_FAILED,
)
MAX_VERSION = 64  # characters of a version an agent says (as ``leader.service`` keeps one)
Method = Callable[["agent_pb2_grpc.NodeAgentAsyncStub"], Callable[..., Awaitable[T]]]
RECONNECT_SECONDS = 2.0


def _txn_text(rollout_id: str, kind: int) -> str:
    """A transaction as an error names it: "rollout r1's switch" (cleaned: a peer may have
    written the id)."""
    what = {
        agent_pb2.TRANSACTION_KIND_SWITCH: "switch",
        agent_pb2.TRANSACTION_KIND_ROLLBACK: "rollback",
    }.get(kind, f"transaction of kind {kind}")  # type: ignore[call-overload]
    return f"rollout {peertext.clean(rollout_id, 64) or '(none)'}'s {what}"


class StepFailed(TerminalError):
    """The agent refused or failed a command; the message (with the status) goes to the schema."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


NODE_DISK_FULL = "the node's disk is full"


class NodeDiskFull(TransientError):
    """The agent answered that its node's disk is full (RESOURCE_EXHAUSTED ``disk full: CAUSE``,
    ``tlsroll.rpc.DISK_FULL``): it is there, and the call may work once space is freed, so it
    is retried as an agent that does not answer is (never a reason to fail a switch or roll a
    node back), but said as what it is: ``agent NODE: the node's disk is full: CAUSE``."""


NODE_STORE_UNAVAILABLE = "the node's journal or disk failed for a moment"


class NodeStoreUnavailable(TransientError):
    """The agent answered UNAVAILABLE ``store unavailable: CAUSE`` (``tlsroll.rpc.
    STORE_UNAVAILABLE``): its journal locked or busy, an I/O error, a read-only disk. It is
    there, and asked again as an agent that does not answer is (its answer may be a write
    whose outcome it cannot tell yet: ``nodeagent.journal.JOURNAL_IN_DOUBT``), but said as
    what it is: ``agent NODE: the node's journal or disk failed for a moment: CAUSE``, not
    "agent unreachable" (review s74 L1)."""


def call_failed(node: str, code: grpc.StatusCode, details: str) -> TransientError | StepFailed:
    """What a call to ``node``'s agent that ended with ``code`` raises: UNAVAILABLE or
    DEADLINE_EXCEEDED a TransientError (``BeingReceived`` for the agent's "being received"),
    the node's full disk a ``NodeDiskFull`` and its store's trouble a ``NodeStoreUnavailable``
    (transient too), any other status the agent saying no (StepFailed; a stale epoch with the
    way out: ``STALE_EPOCH_ADVICE``)."""
    if code is grpc.StatusCode.UNAVAILABLE and details.endswith(BEING_RECEIVED):
        return BeingReceived(f"agent {node}: {details}")
    if code is grpc.StatusCode.UNAVAILABLE and details.startswith(f"{STORE_UNAVAILABLE}: "):
        cause = details.removeprefix(f"{STORE_UNAVAILABLE}: ")
        return NodeStoreUnavailable(f"agent {node}: {NODE_STORE_UNAVAILABLE}: {cause}")
    if code in TRANSIENT_CODES:
        return TransientError(f"agent {node}: {details}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(f"{DISK_FULL}: "):
        cause = details.removeprefix(f"{DISK_FULL}: ")
        return NodeDiskFull(f"agent {node}: {NODE_DISK_FULL}: {cause}")
    if code is grpc.StatusCode.FAILED_PRECONDITION and details.startswith("stale epoch "):
        details += STALE_EPOCH_ADVICE
    return StepFailed(f"{details} ({code.name})", code)


def _ask_again(exc: BaseException) -> bool:
    """Whether ``AgentClient._call`` tries a call that raised ``exc`` again: transient, and
    not the agent's "being received" (``BeingReceived``)."""
    return isinstance(exc, TransientError) and not isinstance(exc, BeingReceived)


STALE_EPOCH_ADVICE = (
    "; the leader's store is behind this node (restored from a backup, or the copy kept before"
    " an upgrade put back): see `tlsroll epoch show`; once this rollout has ended, `tlsroll epoch"
    " advance`, then start a new rollout (a retry keeps this one's epoch)"
)
"""What the leader adds to an agent's "stale epoch" refusal it records (audit s40, H1): the way
out, which the agent's words do not name (``tlsroll epoch advance`` raises the leader's epoch
floor past every epoch a node reports; refused while a rollout has not ended)."""


class BeingReceived(TransientError):
    """The agent answered GetTransaction UNAVAILABLE "... is being received; ask again"
    (``tlsroll.rpc.BEING_RECEIVED``): a Switch or Rollback of that transaction reached it and
    is not journalled yet, though it waited for it (``nodeagent.service.RECEIVING_WAIT``, 10 s;
    it answers as soon as the request is journalled or dropped). No answer, as any
    ``TransientError``: nothing is taken from it, the step runs again. Not asked again within
    the call (``AgentClient._call``), unlike an agent the leader cannot reach or a journal
    that could not be read for a moment: each try waited the agent's wait again, four tries
    held the step about 41 s before its node's reason said anything (session 74)."""


class AgentCutOff(TransientError):
    """The node's agent is cut off: its certificate on record is revoked (``tlsroll ca
    revoke``: a machine lost or stolen), so the leader does not dial it (``AgentPool.get``),
    whatever its address and key. No answer of the agent, so no step's outcome: the engine
    tries again later, as for an agent away, and meanwhile its plan takes the node out of the
    rollout (``planner.next_actions``' ``cut_off``); never a reason to fail or roll back
    another node (s50)."""


def cut_off_error(name: str) -> AgentCutOff:
    """What ``AgentPool.get`` raises for node ``name``, whose agent is cut off."""
    return AgentCutOff(
        f"agent {name} is cut off (its certificate revoked: a machine lost or stolen): the"
        f" leader does not dial it; `tlsroll nodes remove {name}` once no rollout holds it"
    )


class SwitchRefused(StepFailed):
    """The agent refused to begin a switch (``AgentApi.switch_and_watch``): nothing began."""


class NotSent(StepFailed):
    """The leader itself refused to send a request (``AgentClient._sendable``: the node's
    agent has not reported a feature the request carries), FAILED_PRECONDITION. The agent said
    nothing: of a request that begins a transaction (a Switch, the way back's Rollback) it is
    no word that nothing began, as the step may have sent it before (its node's state is
    persisted before anything is sent, and a leader restarted since resumes the step): the
    caller asks the agent, with a request that needs no feature, whether it has the
    transaction (``AgentClient.switch_and_watch``, ``leader.changes.DisableTls``), and
    follows it if so (review s63 faults, M1: a begun switch was recorded "refused", the node
    as it was, while its agent completed it)."""


class NotHeardYet(TransientError):
    """The leader itself did not send a request (``AgentClient._sendable``): it needs a feature
    the store holds no word of for the node's agent, which the leader has not heard since it
    started (``Store.features_heard``), and the agent, asked over its channel what it
    implements (``AgentClient._may_send``), did not say. Not "too old": the store's row is a
    former leader process's, and may have lost the agent's first heartbeat with a killed
    leader (review s63 faults, M1); the step runs again, and asks again. Of a request that
    begins a transaction it is no word that nothing began either:
    ``AgentClient.switch_and_watch``, ``AgentClient.rollback`` and
    ``leader.changes.DisableTls`` ask the agent first (a plain GetTransaction, which needs no
    feature) and follow a transaction it has (review of s63-f1, L-2: a switch the agent had,
    or had completed, waited behind a heartbeat that might never come; session 64: so did a
    scope freeze's renewal, and every switch after it)."""


class AgentApi(Protocol):
    """The NodeAgent calls the engine makes (the real client, or a fake in tests)."""

    async def get_status(
        self, request: agent_pb2.GetStatusRequest, timeout: float = CALL_TIMEOUT
    ) -> agent_pb2.NodeStatus: ...

    async def check(
        self, request: agent_pb2.CheckRequest, timeout: float = CALL_TIMEOUT
    ) -> agent_pb2.PreflightResponse: ...

    async def preflight(
        self, request: agent_pb2.PreflightRequest
    ) -> agent_pb2.PreflightResponse: ...

    async def create_csr(
        self, request: agent_pb2.CreateCSRRequest
    ) -> agent_pb2.CreateCSRResponse: ...

    async def stage(self, request: agent_pb2.StageRequest) -> agent_pb2.StageResponse: ...

    async def switch(self, request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction: ...

    async def rollback(self, request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction: ...

    async def get_transaction(
        self, request: agent_pb2.GetTransactionRequest
    ) -> agent_pb2.Transaction: ...

    def watch_transaction(
        self, request: agent_pb2.GetTransactionRequest
    ) -> AsyncIterator[agent_pb2.Transaction]: ...

    def switch_and_watch(
        self, request: agent_pb2.SwitchRequest
    ) -> AsyncIterator[agent_pb2.Transaction]: ...

    async def freeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse: ...

    async def unfreeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse: ...


class Agents(Protocol):
    """Where the engine gets the agent of a node."""

    async def get(self, name: str) -> AgentApi: ...

    def hold(
        self, names: Collection[str], rollout: str | None = None, *, close_landed: bool = True
    ) -> None:
        """``names`` are the live ``rollout``'s nodes in flight (none, and no id: no rollout
        is live, or it waits); keep their channels open between their steps. ``close_landed``:
        the channels of nodes no longer in flight are done with (False: the rollout still
        calls them, e.g. a scope freeze's renewals and UNFREEZEs)."""

    async def close(self) -> None: ...


class AgentClient:
    """NodeAgent calls to one node over mutual TLS.

    The TLS target name is the node's key name (``tlsroll.spiffe.key_host``), not its address:
    the handshake succeeds only with a server certificate that the CA issued for the very key
    this node enrolled with, so a certificate of another node, a removed node or the leader
    that someone serves on this node's address is refused before a command is sent.
    """

    def __init__(
        self,
        node: Node,
        credentials: grpc.ChannelCredentials,
        trust_domain: str,
        on_change: Callable[[AgentClient], None] | None = None,
        heard: Callable[[str], tuple[str, ...] | None] | None = None,
    ) -> None:
        self.node = node
        self.credentials = credentials
        self.trust_domain = trust_domain
        # What the node's agent said it implements since this leader started (None: not heard
        # since; ``Store.features_heard``). Without it (a test's client) the node's own.
        self.heard = heard
        # The pool hears when a channel opens and when the last call on it ends (its cap).
        self.on_change = on_change
        self._in_flight = 0
        self._channel: grpc.aio.Channel | None = None
        self._stub: agent_pb2_grpc.NodeAgentAsyncStub | None = None
        # Channels dropped as failed (``renew_failed``), closing with a grace for their calls.
        self._failed: dict[grpc.aio.Channel, asyncio.Task[None]] = {}

    @property
    def in_flight(self) -> int:
        """Calls and streams on the channel now: it is not closed under them."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, n: int) -> None:
        """The pool hears when the channel gets busy and when it is idle again (its cap)."""
        was, self._in_flight = self._in_flight, n
        if bool(was) != bool(n):
            self._changed()

    @property
    def open(self) -> bool:
        return self._channel is not None

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel, opened on first use and again after the pool closed it as idle."""
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(
                hostport(self.node.addresses[0], self.node.agent_port),
                self.credentials,
                options=[
                    (
                        "grpc.ssl_target_name_override",
                        spiffe.key_host(self.trust_domain, self.node.key_pin),
                    ),
                    *reconnect_options(RECONNECT_SECONDS),  # a returning agent is reached soon
                    NO_BDP_PROBE,  # one PING round trip fewer per reply
                ],
            )
            self._stub = None
            self._changed()
        return self._channel

    @property
    def stub(self) -> agent_pb2_grpc.NodeAgentAsyncStub:
        channel = self.channel
        if self._stub is None:
            self._stub = agent_pb2_grpc.NodeAgentStub(channel)
        return self._stub

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _done(self) -> None:
        """One call or stream fewer on the channel; the pool may close it once idle."""
        self.in_flight -= 1

    def close_idle(self) -> asyncio.Task[None] | None:
        """Close the channel if no call is on it (the next call opens a new one); the closing
        task, or None if it is busy or closed already."""
        if self._channel is None or self.in_flight:
            return None
        channel, self._channel, self._stub = self._channel, None, None
        return asyncio.create_task(channel.close(None), name="close-idle-agent-channel")

    def renew_failed(self) -> bool:
        """Drop the channel if it is in TRANSIENT_FAILURE, so that its next use opens a new one
        (which connects at once); whether it did. A channel that tried the agent while it was
        down (a call, a dial) fails every call at once, without sending it, until its reconnect
        backoff (up to ``RECONNECT_SECONDS``, and a fifth more) has passed, though the agent is
        back: a start made as soon as an agent that had restarted was heard again was refused,
        the node "unreachable" with the reason of the connect that had failed while it was
        down ("Connection refused"; session 42, a real leader and agent, 5 starts of 5).

        For the planning (``AgentPool.reach``, ``check``: one try each, and a node that fails
        them keeps a start from starting; ``get_status`` follows a Check the agent answered),
        not for a step's calls: those are tried again (``_call``), and where the node's host is
        down (its packets dropped) a new channel's connect waits out the call's timeout, 30 s
        a try, where the failed one answers at once. Nothing is sent twice: the calls on the
        dropped channel were not sent, and end as they would have (it closes with
        ``CALL_TIMEOUT`` of grace)."""
        channel = self._channel
        if channel is None or channel.get_state() is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return False
        self._channel, self._stub = None, None

        async def close() -> None:
            try:
                await channel.close(CALL_TIMEOUT)
            finally:
                self._failed.pop(channel, None)

        self._failed[channel] = asyncio.create_task(close(), name="close-failed-agent-channel")
        self._changed()  # (the pool's count of open channels: one fewer until the next opens)
        return True

    def _sendable(self, request: Any, said: tuple[str, tuple[str, ...]] | None = None) -> None:
        """Refuse (``NotSent``, FAILED_PRECONDITION, nothing sent) a request that carries
        behaviour the node's agent has not reported it implements
        (``leader.agent_features.request_needs``): it would drop the field unread (proto3)
        and do something else, such as a direct switch for a transitional one. The plan
        blocks such a node and a start refuses it; this holds whatever planned the request
        (a rollout started before the agent was replaced by an older build, say). What the
        agent implements is what its heartbeats said since this leader started
        (``Store.features_heard``, read at each request), or ``said``: its version and
        features as it answered them itself just now (``_may_send``: GetStatus).

        An agent not heard since this leader started is not judged by what the store holds
        of it: that is a former leader process's, and a group commit lost with a killed
        leader left it without the features of the agent's first heartbeat (the row says
        none, as of an agent of an earlier release). Such a request is a ``NotHeardYet``
        (a ``TransientError``, nothing sent), which ``_may_send`` answers by asking the agent
        (a request that begins a transaction asks first whether the agent has it:
        ``switch_and_watch``, ``rollback``). "Too old" there halted a rollout whose resumed
        switch the agent had begun (review s63 faults, M1)."""
        node = self.node
        heard: tuple[str, ...] | None
        if said is not None:
            version, heard = said
        else:
            version = node.agent_version
            heard = self.heard(node.name) if self.heard is not None else node.agent_features
        reported = node.agent_features if heard is None else heard
        missing = agent_features.missing_for(request, reported)
        if not missing:
            return
        if heard is None:
            what = ", ".join(agent_features.too_old_for(node.agent_features, missing))
            raise NotHeardYet(
                f"agent {node.name}: not heard since the leader started, and the store holds"
                f" no word that it implements what this request needs ({what})"
            )
        why = agent_features.too_old(version, reported, missing)
        raise NotSent(
            f"{node.name}: {why}; the leader sent it nothing (FAILED_PRECONDITION)",
            grpc.StatusCode.FAILED_PRECONDITION,
        )

    async def _may_send(self, request: Any) -> None:
        """``_sendable``; for an agent not heard since this leader started, judged by what it
        says it implements when asked over this channel (GetStatus, which needs no feature:
        ``NodeStatus.features``, as in its heartbeats; an agent of an earlier release names
        none, and is too old, as it is). An agent whose heartbeats do not reach the restarted
        leader while the leader reaches it (a firewall, its leader address wrong) was waited
        for without limit: the renewal of its scope freeze needs a feature, so every further
        switch of the rollout stayed held (session 64). The answer is not kept: each such
        request asks again, so an agent replaced meanwhile by an older build is not sent what
        it would drop; once its heartbeats come, they say it. No answer (one try: the agent
        away, or refusing the question) is ``NotHeardYet``: nothing sent, the step runs
        again."""
        try:
            self._sendable(request)
            return
        except NotHeardYet as unheard:
            waiting = str(unheard)
        try:
            status = await self.get_status(agent_pb2.GetStatusRequest())
        except TlsrollError as exc:
            raise NotHeardYet(
                f"{waiting}, and asked over its channel it did not say ({exc}): the leader sent"
                " it nothing, and asks again as the step runs again"
            ) from None
        said = features.reported(status.features)
        self._sendable(request, (peertext.clean(status.agent_version, MAX_VERSION), said))

    async def _once(self, method: Method[T], request: Any, timeout: float = CALL_TIMEOUT) -> T:
        """One call: UNAVAILABLE or DEADLINE_EXCEEDED is a TransientError, any other status the
        agent saying no (StepFailed)."""
        self.in_flight += 1
        try:
            return await method(self.stub)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise call_failed(self.node.name, exc.code(), str(exc.details())) from None
        finally:
            self._done()

    async def _call(self, method: Method[T], request: Any) -> T:
        """``_once``, tried again a few times with backoff while it is transient (the channel
        counts as busy between the tries too). The first try is made without tenacity: its
        machinery (an ``AsyncRetrying``, its strategies and attempt state) cost the leader's
        CPU on every call to an agent, about six per node, for retries that are rare; a
        transient first failure is handed to it as its first attempt, so that the tries and
        the waits between them are tenacity's as before (4 tries, 0.2, 0.4, 0.8 s apart).
        An agent's "being received" (``BeingReceived``) ends the tries: it waited already.
        tenacity itself (about 0.4 MiB) is imported only then: a leader whose calls all
        answered never holds it (issue 15)."""
        self.in_flight += 1
        try:
            try:
                return await self._once(method, request)
            except BeingReceived:
                raise
            except TransientError as exc:
                first: TransientError | None = exc
            import tenacity  # noqa: PLC0415 - only once a call failed (see the docstring)

            async for attempt in tenacity.AsyncRetrying(
                retry=tenacity.retry_if_exception(_ask_again),
                wait=tenacity.wait_exponential(multiplier=0.2, max=2),
                stop=tenacity.stop_after_attempt(4),
                reraise=True,
            ):
                with attempt:
                    if first is not None:  # the try above: tenacity's first attempt
                        failed, first = first, None
                        raise failed
                    return await self._once(method, request)
        finally:
            self._done()
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    async def get_status(
        self, request: agent_pb2.GetStatusRequest, timeout: float = CALL_TIMEOUT
    ) -> agent_pb2.NodeStatus:
        """One try with ``timeout``: what the node runs now (no retries; callers decide)."""
        return await self._once(lambda s: s.GetStatus, request, timeout)

    async def check(
        self, request: agent_pb2.CheckRequest, timeout: float = CALL_TIMEOUT
    ) -> agent_pb2.PreflightResponse:
        """Preflight's checks, read-only (one try, like ``get_status``): the planning's
        question over the channel, on one that has not failed (``renew_failed``)."""
        self.renew_failed()
        return await self._once(lambda s: s.Check, request, timeout)

    async def preflight(self, request: agent_pb2.PreflightRequest) -> agent_pb2.PreflightResponse:
        """Each try carries the leader's time as it is sent: the time the step stamped, moved
        on by what has passed since (monotonic). A try sent again after one that timed out
        (30 s each) carried the first try's time, which the agent took for its clock being
        that much ahead (clock audit I of session 35)."""
        if not request.HasField("leader_time"):
            return await self._call(lambda s: s.Preflight, request)
        stamped, at = request.leader_time.ToDatetime(tzinfo=dt.UTC), time.monotonic()

        def sent_now(stub: agent_pb2_grpc.NodeAgentAsyncStub) -> Any:
            moved = dt.timedelta(seconds=time.monotonic() - at)
            request.leader_time.FromDatetime(stamped + moved)
            return stub.Preflight

        return await self._call(sent_now, request)

    async def create_csr(self, request: agent_pb2.CreateCSRRequest) -> agent_pb2.CreateCSRResponse:
        return await self._call(lambda s: s.CreateCSR, request)

    async def stage(self, request: agent_pb2.StageRequest) -> agent_pb2.StageResponse:
        await self._may_send(request)
        return await self._call(lambda s: s.Stage, request)

    async def switch(self, request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction:
        await self._may_send(request)
        return await self._call(lambda s: s.Switch, request)

    async def rollback(self, request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        """An agent not heard since this leader started (``NotHeardYet`` of ``_sendable``) is
        asked first whether it has this rollout's rollback (a plain GetTransaction), which is
        returned if so, as its Rollback would return it: a restarted agent whose heartbeats do
        not reach the leader refuses every command (it cannot ask the leader for the
        command's epoch), but answers that, and a way back begun before a leader restart is
        followed (review of s63-f1, L-2). With none, what it implements is asked
        (``_may_send``), and the Rollback sent or refused."""
        try:
            self._sendable(request)
        except NotHeardYet:
            had = await self._had(
                agent_pb2.GetTransactionRequest(
                    rollout_id=request.command.rollout_id,
                    kind=agent_pb2.TRANSACTION_KIND_ROLLBACK,
                )
            )
            if had is not None:
                return had
            await self._may_send(request)
        return await self._call(lambda s: s.Rollback, request)

    async def get_transaction(
        self, request: agent_pb2.GetTransactionRequest
    ) -> agent_pb2.Transaction:
        """The transaction ``request`` names as the agent has it; an answer about another
        one is ``StepFailed`` (``_asked_for``)."""
        txn: agent_pb2.Transaction = await self._call(lambda s: s.GetTransaction, request)
        return self._asked_for(request, txn)

    def _asked_for(
        self, request: agent_pb2.GetTransactionRequest, txn: agent_pb2.Transaction
    ) -> agent_pb2.Transaction:
        """``txn`` if it is the transaction ``request`` asked about (its rollout and kind; an
        unset kind is taken), else ``StepFailed`` (no status: neither a refusal nor "none")
        naming what the agent sent: it says nothing of the one asked about, so no outcome
        is taken from it, no switch is recorded done or failed, no confirm takes it for a
        rollback under way (engine review s67 engine3, 2: it was taken as it came)."""
        if txn.rollout_id == request.rollout_id and txn.kind in (0, request.kind):
            return txn
        raise StepFailed(
            f"agent {self.node.name} answered about {_txn_text(txn.rollout_id, txn.kind)}, "
            f"not {_txn_text(request.rollout_id, request.kind)}: its answer is ignored"
        )

    async def watch_transaction(
        self, request: agent_pb2.GetTransactionRequest
    ) -> AsyncGenerator[agent_pb2.Transaction, None]:
        """Each state of the transaction as the agent journals it, the current one first, until
        it has an outcome (``NodeAgent.WatchTransaction``: the leader hears of a step when it
        happens, no poll interval). A stream that breaks or brings nothing for
        ``STREAM_SECONDS`` is opened again with backoff; ``STREAM_ATTEMPTS`` such streams in a
        row are a ``TransientError``. Another status is ``StepFailed``. An agent without the
        stream (UNIMPLEMENTED: an older version) is asked with GetTransaction every
        ``POLL_SECONDS`` instead."""
        self._sendable(request)  # (one that begins a switch: ``switch_and_watch``)
        failures = 0
        self.in_flight += 1
        try:
            while True:
                call = self.stub.WatchTransaction(request, timeout=STREAM_SECONDS)
                try:
                    # Read, not ``async for``: a grpc.aio call keeps the iterator that
                    # ``async for`` asks it for, and that iterator the call: a cycle that kept
                    # each switch's call, its channel and connection alive until the GC's next
                    # full pass, after the pool had closed the channel (s28leak).
                    while isinstance(txn := await call.read(), agent_pb2.Transaction):  # or EOF
                        failures = 0
                        yield self._asked_for(request, txn)
                        if txn.outcome != agent_pb2.TRANSACTION_OUTCOME_PENDING:
                            return
                    error = TransientError(f"agent {self.node.name}: the stream ended early")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                        break
                    failed = call_failed(self.node.name, exc.code(), str(exc.details()))
                    if isinstance(failed, StepFailed):
                        raise failed from None
                    error = failed
                finally:
                    call.cancel()
                failures += 1
                if failures >= STREAM_ATTEMPTS:
                    raise error
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
            while True:
                txn = await self.get_transaction(request)
                yield txn
                if txn.outcome != agent_pb2.TRANSACTION_OUTCOME_PENDING:
                    return
                await asyncio.sleep(POLL_SECONDS)
        finally:
            self._done()

    async def switch_and_watch(
        self, request: agent_pb2.SwitchRequest
    ) -> AsyncGenerator[agent_pb2.Transaction, None]:
        """Begin the switch and follow its states in one call: WatchTransaction with
        ``switch`` set (the Switch call and its answer saved). A refusal before any state
        (``REFUSAL_CODES``) is ``SwitchRefused``: nothing began. Any other failure before the
        first state is a ``TransientError``: the switch may have begun (the agent journals it,
        then reads its state to send), and recording "refused" would leave the node switching
        behind the leader's back; the step runs again, and a second call begins nothing but
        reports what began. An agent of an earlier release ignores ``switch`` (NOT_FOUND: the
        switch has not begun; UNIMPLEMENTED: no stream either): it gets Switch, then the
        watch, as before.

        The leader's own refusal to send it (``NotSent``: the agent has not reported what the
        request carries; ``NotHeardYet``: not heard since the leader started, the store holds
        no word of it) is no word of the agent's: an earlier run of the step (before a leader
        restart) may have begun the switch. The agent is asked whether it has it, with a plain
        GetTransaction (no feature needed): if so its states are followed, as any switch under
        way; only if it has none is it ``SwitchRefused`` (``NotSent``), or, for an agent not
        heard since (``NotHeardYet``), Switch and the watch, Switch asking the agent first what
        it implements (``_may_send``; session 64: it waited for a first heartbeat that might
        never come). A switch the agent has is followed so without a heartbeat: one whose
        heartbeats do not reach the leader while the leader reaches it (review of s63-f1,
        L-2); asked first, as a restarted agent that cannot reach the leader refuses every
        command (it cannot ask for the command's epoch) but answers GetTransaction."""
        watch = agent_pb2.GetTransactionRequest(
            rollout_id=request.command.rollout_id,
            kind=agent_pb2.TRANSACTION_KIND_SWITCH,
            phases=WATCHED_PHASES,
        )
        begin = agent_pb2.GetTransactionRequest()
        begin.CopyFrom(watch)
        begin.switch.CopyFrom(request)
        # Each watch closed here as its caller closes this one (``aclosing``): left to the
        # garbage collector, an unfinished generator is closed in a task of its own the loop
        # is woken for (one a switch, and one for this: issue 15).
        seen = False
        try:
            async with contextlib.aclosing(self.watch_transaction(begin)) as states:
                async for txn in states:
                    seen = True
                    yield txn
            return
        except (NotSent, NotHeardYet) as exc:
            if await self._begun_before(watch, exc):
                # (sendable: it carries nothing)
                async with contextlib.aclosing(self.watch_transaction(watch)) as states:
                    async for txn in states:
                        yield txn
                return
            # Not heard since the leader started, and it has no such switch: begun as on an
            # agent of an earlier release (Switch, then the watch), Switch asking it first
            # what it implements (``_may_send``).
        except StepFailed as exc:
            if seen:
                raise
            if exc.code in REFUSAL_CODES:
                raise SwitchRefused(str(exc), exc.code) from None
            if exc.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                raise TransientError(
                    f"agent {self.node.name}: the switch may have begun, its state is unknown "
                    f"({exc})"
                ) from None
        try:
            await self.switch(request)
        except StepFailed as exc:
            raise SwitchRefused(str(exc), exc.code) from None
        async with contextlib.aclosing(self.watch_transaction(watch)) as states:
            async for txn in states:
                yield txn

    async def _begun_before(
        self, request: agent_pb2.GetTransactionRequest, unsent: NotSent | NotHeardYet
    ) -> bool:
        """A request that would begin the transaction ``request`` names was not sent
        (``unsent``): True if the agent has that transaction all the same (begun by an
        earlier run of the step), else ``SwitchRefused`` with ``unsent``'s reason (nothing
        began, nor will it), or False if it is a ``NotHeardYet`` (the caller asks the agent
        what it implements, then sends or refuses: ``_may_send``). A refusal of the question
        says nothing of it: a ``TransientError``, as no answer is."""
        if await self._had(request) is not None:
            return True
        if isinstance(unsent, NotHeardYet):
            return False
        raise SwitchRefused(str(unsent), unsent.code)

    async def _had(self, request: agent_pb2.GetTransactionRequest) -> agent_pb2.Transaction | None:
        """The transaction ``request`` names as the agent has it, or None if it has none
        (NOT_FOUND); a refusal of the question says nothing of it: a ``TransientError``, as no
        answer is."""
        try:
            return await self.get_transaction(request)
        except StepFailed as exc:
            if exc.code is grpc.StatusCode.NOT_FOUND:
                return None
            raise TransientError(
                f"agent {self.node.name}: the transaction may have begun, its state is unknown"
                f" ({exc})"
            ) from None

    async def freeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        await self._may_send(request)
        return await self._call(lambda s: s.Freeze, request)

    async def unfreeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        return await self._call(lambda s: s.Unfreeze, request)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close(None)
        for failed, task in list(self._failed.items()):  # their grace ends now
            task.cancel()
            await failed.close(None)
        self._failed.clear()


class Slots:
    """At most ``count`` holders at once (``async with``), the others let in first come, first
    served, as ``asyncio.Semaphore``'s, each release handing its slot to the next waiter in
    one step. Python 3.11's Semaphore looks at its waiters from the front at every release
    (and at an acquire that finds a slot left), past those already woken but not yet run,
    and each waiter takes itself out of the queue: quadratic when many wait and many slots
    free at once, as a start's dials of every node do (500 simulated nodes, 256 slots: some
    60,000 looks at woken waiters in one start: issue 15). A waiter cancelled in the queue
    stays there until its turn comes, and is passed over then."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():  # handed a slot, then cancelled: on
                self._release()
            raise

    async def __aexit__(self, *_exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():  # (not a waiter cancelled meanwhile)
                slot.set_result(None)  # the slot goes on to it, never free between
                return
        self._free += 1


class AgentPool:
    """One client per enrolled node, made on first use and again if its address or key
    changed (an agent that renewed its certificate is dialled by its new key at once). The
    client it replaces is closed only after ``CALL_TIMEOUT``: a call in flight on it ends as
    it would have.

    Open channels are bounded: past ``max_open``, the least recently used idle ones are closed
    (their clients open a new channel on their next call), so the leader's descriptors do not
    grow with the number of nodes. A busy channel is never closed under a call."""

    def __init__(
        self,
        store: Store,
        credentials: grpc.ChannelCredentials,
        trust_domain: str,
        max_open: int = MAX_OPEN_CHANNELS,
    ) -> None:
        self.store = store
        self.credentials = credentials
        self.trust_domain = trust_domain
        self.max_open = max_open
        self.clients: dict[str, AgentClient] = {}
        # The nodes whose client has its channel open, and of those the idle ones (no call on
        # them), least recently used first: only they may be closed.
        self._open: set[str] = set()
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._read_at: dict[str, int] = {}  # node -> Store.nodes_generation it was read at
        self._held: frozenset[str] = frozenset()  # nodes in flight: never closed by the cap
        # A start's first nodes whose channels its planning opened (``reach``), by the start
        # (its rollout's id): never closed by the cap either, until a hold of a live rollout
        # after the start was made (then the loop's time it was handed on), or the start
        # refused (``release_first``). One per start: two starts at once keep their own.
        self._reservations: dict[str, tuple[set[str], float | None]] = {}
        self._reserved: frozenset[str] = frozenset()  # all of them
        self._retiring: dict[AgentClient, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._dialling = Slots(DIAL_AT_ONCE)  # ``reach``'s TCP connections
        self._connecting = 0  # of them, those connecting now
        # ``_where``'s read of every node's address: the nodes generation it is of, and the read.
        self._listed: tuple[int | None, asyncio.Future[dict[str, tuple[str, int]]]] | None = None

    async def get(self, name: str) -> AgentClient:
        """The node's client. Its address and key are read from the store again only if the
        store has had a write to its nodes since they were read (``Store.nodes_generation``:
        enrolment, renewal, removal, an admin's revocation move it; a heartbeat, a certificate
        issued does not), so a step's calls cost no worker thread and no query (the leader is
        its store's only writer). ``AgentCutOff`` for a node whose agent is cut off (its
        certificate on record revoked): never dialled."""
        # A store without the count (a fake in tests) is read every time.
        generation = getattr(self.store, "nodes_generation", None)
        client = self.clients.get(name)
        if client is not None and generation is not None and self._read_at.get(name) == generation:
            self._use(name)
            return client
        node = await dbthread.run(self.store.get_node, name)
        if generation is not None:
            self._read_at[name] = generation
        client = self.clients.get(name)
        if node.cert_revoked:
            # Cut off (``Store.revoke`` moves ``nodes_generation`` on, so a client kept is
            # read again): it is dialled no more, its channel closed (s50: it was dialled as
            # long as its address and key were the same).
            if client is not None:
                del self.clients[name]
                self._retire(client)
                self._open.discard(name)
                self._idle.pop(name, None)
            raise cut_off_error(name)
        if client is None or (
            client.node.addresses,
            client.node.agent_port,
            client.node.key_pin,
        ) != (node.addresses, node.agent_port, node.key_pin):
            if client is not None:
                self._retire(client)
                self._open.discard(name)  # its channel closes with its grace, uncounted
                self._idle.pop(name, None)
            # (A store without ``features_heard``, a test's: the client goes by the node's own.)
            heard = getattr(self.store, "features_heard", None)
            client = AgentClient(node, self.credentials, self.trust_domain, self._trim, heard)
            self.clients[name] = client
        else:
            client.node = node  # same channel; its names as now enrolled (``StepContext``)
        self._use(name)
        return client

    async def reach(
        self, name: str, deadline: float, *, channel: bool, reserve: str = ""
    ) -> str | None:
        """Can the leader reach ``name``'s agent where it dials it (``leader.observe``, when
        the planning question went over the agent's own heartbeat stream, which says nothing of
        the leader's way in)? None if so, else why not. ``deadline`` (the event loop's clock)
        bounds all of it: the read of the node's address, the wait for a dial slot, the connect.

        ``channel``: open the node's channel (its TLS handshake, with its key pin) and wait until
        it is ready, counted as a call meanwhile and reserved afterwards for the start
        ``reserve`` (its rollout's id; the cap does not close it until the engine holds that
        start's nodes: ``release_first``): a node the start steps
        first needs it moments later, so this is no extra handshake, and it is off the first
        switch's path. Not ready (a refused connection, a failed handshake, the deadline):
        ``"channel"`` (the caller asks over it, for gRPC's reason).

        Else a plain TCP connection to the address and port the channel dials, closed at once
        (no TLS, no handshake): something listens there. It does not prove that it is this
        node's agent (another node's agent on a stale address): the preflight's TLS check
        still refuses that, as it refuses any node that fails mid-rollout.

        A ``TlsrollError`` (the node removed meanwhile, the leader out of descriptors) is the
        caller's to report for this node."""
        if not channel:
            return await self._dial(name, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                client = await self.get(name)
        except TimeoutError:
            return "channel"
        client.renew_failed()  # (a channel that tried the agent while it was down)
        client.in_flight += 1
        try:
            self._reservations.setdefault(reserve, (set(), None))[0].add(name)
            self._reserved = self._reserved | {name}
            ch = client.channel
            async with asyncio.timeout_at(deadline):
                state = ch.get_state(try_to_connect=True)
                while state is not grpc.ChannelConnectivity.READY:
                    if state in FAILED_STATES:
                        return "channel"
                    await ch.wait_for_state_change(state)
                    state = ch.get_state(try_to_connect=True)
            return None
        except TimeoutError:
            return "channel"
        finally:
            client._done()

    def release_first(self, *, started: bool, rollout: str = "") -> None:
        """The start of ``rollout`` is over (``leader.commands.Commands.start``): the channels
        its ``reach`` opened stay reserved until a hold names a live rollout, whose nodes in
        flight the engine then holds (``started``; ``HANDED_SECONDS`` at most), or are given
        back to the cap now (the start was refused). Another start's are not touched."""
        if rollout not in self._reservations:
            return
        if started:
            names, _ = self._reservations[rollout]
            self._reservations[rollout] = (names, asyncio.get_running_loop().time())
            return
        del self._reservations[rollout]
        self._reserve_again()
        self._close_excess(None)

    def _reserve_again(self) -> None:
        self._reserved = frozenset().union(*(n for n, _ in self._reservations.values()))

    def _hand_over(self, rollout: str | None) -> bool:
        """``hold``'s part: drop the reservations handed on (the start made) once a hold names
        a live rollout (at most one is live: if not that start's, it has ended) or after
        ``HANDED_SECONDS``. A hold from an engine pass that began before the start's commit
        (no live rollout in its view) leaves them. Whether any was dropped."""
        now = asyncio.get_running_loop().time()
        done = [
            key
            for key, (_, handed) in self._reservations.items()
            if handed is not None and (rollout is not None or now - handed > HANDED_SECONDS)
        ]
        for key in done:
            del self._reservations[key]
        if done:
            self._reserve_again()
        return bool(done)

    async def _where(self, name: str) -> tuple[str, int]:
        """The address and port ``name``'s channel dials: its client's, if read at the store's
        current nodes generation, else from one read of every node (shared by the calls made
        meanwhile, and kept for that generation; a read that failed is not kept): not a store
        read per node, nor a client."""
        generation = getattr(self.store, "nodes_generation", None)
        client = self.clients.get(name)
        if client is not None and generation is not None and self._read_at.get(name) == generation:
            return client.node.addresses[0], client.node.agent_port
        if generation is None or self._listed is None or self._listed[0] != generation:

            def listing() -> dict[str, tuple[str, int]]:
                return {n.name: (n.addresses[0], n.agent_port) for n in self.store.list_nodes()}

            self._listed = (generation, asyncio.ensure_future(dbthread.run(listing)))
        listed = self._listed
        try:
            found = (await asyncio.shield(listed[1])).get(name)
        except Exception:
            if self._listed is listed:  # the next call reads again
                self._listed = None
            raise
        if found is None:  # enrolled since, or removed: as a call would find it
            client = await self.get(name)
            return client.node.addresses[0], client.node.agent_port
        return found

    async def _dial(self, name: str, deadline: float) -> str | None:
        """``reach`` without its channel: a TCP connection, closed at once; None, or why not."""
        loop = asyncio.get_running_loop()
        within = f"{round(max(deadline - loop.time(), 0), 1):g} s"
        where = ""
        connecting = False
        try:
            async with asyncio.timeout_at(deadline):
                host, port = await self._where(name)
                where = hostport(host, port)
                # A bare non-blocking socket, not asyncio's streams (no transport, no reader).
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                async with self._dialling:
                    try:
                        sock = socket.socket(family, socket.SOCK_STREAM)
                    except OSError as exc:
                        why = os.strerror(exc.errno) if exc.errno else str(exc)
                        kind = LocalResourceError if exc.errno in LOCAL_ERRNOS else TransientError
                        raise kind(f"leader: cannot open a socket: {why}") from None
                    with sock:
                        sock.setblocking(False)
                        connecting = True
                        self._connecting += 1
                        try:
                            await loop.sock_connect(sock, (host, port))
                        finally:
                            self._connecting -= 1
        except TimeoutError:
            if connecting:
                return f"agent {name}: no connection to {where} within {within}"
            if where:
                pending = self._connecting
                return (
                    f"agent {name}: not dialled within {within}: {pending} connections to "
                    "other agents pending"
                )
            return f"agent {name}: not dialled within {within}: its address not read yet"
        except OSError as exc:  # (asyncio's own strerror names the address again)
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            return f"agent {name}: cannot connect to {where}: {why}"
        return None

    def hold(
        self, names: Collection[str], rollout: str | None = None, *, close_landed: bool = True
    ) -> None:
        """``names`` are the live rollout's nodes in flight (the engine says so at each pass,
        with the ``rollout``'s id; none, and no id, once no rollout is live, or while it
        waits; a start's first channels are held from then on: ``_hand_over``): their
        channels are never closed by the
        cap, busy or idle, so that a node's steps reuse its channel however long it waits
        between them (a retry, its turn to switch) and whatever else uses the pool meanwhile
        (scope freezes, plan, observe); opening it again would be a TLS handshake on its
        switch's path. The channels of nodes no longer held (their flight is over) are closed
        now if they are idle, unless ``close_landed`` is False (the rollout still calls them:
        a scope freeze renews every frozen node's lease and unfreezes it at the end); the cap
        (``max_open``) bounds the other open channels, least recently used first, closed now
        if idle and beyond it, the others as they go idle."""
        handed = bool(self._reservations) and self._hand_over(rollout)
        if not handed and names == self._held:
            return
        landed = self._held.difference(names)
        self._held = frozenset(names)
        # A node no longer in flight has had its last step (``close_landed``: the engine says
        # so for a rollout without a scope freeze; with one, a done node is still renewed and
        # unfrozen at the end, and its channel stays under the cap, as on 77bb3da: review 1b
        # of session 31, finding 4): its channel, idle, is closed now rather than kept under
        # the cap. At 500 simulated nodes (max-parallel
        # 10) the pool kept the 16 most recently done nodes' channels open besides the ~11 in
        # flight, to the rollout's end, each with its TLS connection's memory (issue 15):
        # ``bench.simagents --nodes 500``, 3 back-to-back pairs against 77bb3da, RSS at the
        # rollout's end 120.2 / 121.1 / 121.4 MiB against 123.9 / 123.7 / 124.4, settled
        # 120.1 / 120.3 / 120.0 against 121.4 / 122.1 / 122.0; channels opened per node 1.00
        # on both (no node's channel opened again).
        for name in (landed - self._reserved) if close_landed else ():
            client = self.clients.get(name)
            if client is None or client.in_flight or name not in self._idle:
                continue
            del self._idle[name]
            self._open.discard(name)
            task = client.close_idle()
            if task is not None:
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        if handed or landed:
            self._close_excess(None)

    def _use(self, name: str) -> None:
        if name in self._idle:
            self._idle.move_to_end(name)

    def open_channels(self) -> int:
        return sum(1 for c in self.clients.values() if c.open)

    def _trim(self, client: AgentClient) -> None:
        """A client opened its channel, or its channel got busy or idle: keep the books, and
        close idle channels beyond the cap, least recently used first (never this client's).
        Each call costs the same whatever the number of nodes: it once looked at every
        node's client, then at every busy channel ahead of the idle ones (a busy channel
        stays first in line while its calls last), and cost the leader CPU per step that grew
        with the number of nodes."""
        name = client.node.name
        if client.open and self.clients.get(name) is client:
            self._open.add(name)
            if client.in_flight:
                self._idle.pop(name, None)
            else:
                self._idle[name] = None
                self._idle.move_to_end(name)
        self._close_excess(client)

    def _close_excess(self, client: AgentClient | None) -> None:
        """Close idle channels while more than ``max_open`` are open besides the held and
        reserved ones, least recently used first, never one of those nor ``client``'s (the
        newest use)."""
        excess = len(self._open) - self.max_open
        if excess > 0 and self._held:
            excess -= len(self._held & self._open)
        if excess > 0 and self._reserved:
            excess -= len((self._reserved - self._held) & self._open)
        if excess <= 0:
            return
        for other_name in list(self._idle):
            if excess <= 0:
                break
            other = self.clients.get(other_name)
            if other is client:
                break  # the newest use; the others are busy
            if other_name in self._held or other_name in self._reserved:
                continue
            del self._idle[other_name]
            self._open.discard(other_name)
            excess -= 1
            task = other.close_idle() if other is not None else None
            if task is not None:
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def close_idle(self) -> int:
        """Close every idle channel now (the engine's last rollout has ended: up to
        ``max_open`` channels, about 150 KiB each inside gRPC, would otherwise stay open until
        the leader stops); a busy one stays. A client opens its channel again on its next
        call. Returns how many were closed."""
        tasks = []
        for name in list(self._idle):
            client = self.clients.get(name)
            task = client.close_idle() if client is not None else None
            if task is not None:
                tasks.append(task)
            self._open.discard(name)
        self._idle.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    def set_credentials(self, credentials: grpc.ChannelCredentials) -> None:
        """Dial with ``credentials`` from now on (the leader's certificate was renewed): every
        client is made again on its next use; the old ones close after ``CALL_TIMEOUT``."""
        self.credentials = credentials
        for client in self.clients.values():
            self._retire(client)
        self.clients.clear()
        self._open.clear()
        self._idle.clear()
        self._read_at.clear()

    def _retire(self, client: AgentClient) -> None:
        async def close_later() -> None:
            try:
                await client.channel.close(CALL_TIMEOUT) if client.open else None
            finally:
                self._retiring.pop(client, None)

        self._retiring[client] = asyncio.create_task(close_later(), name="retire-agent-client")

    async def close(self) -> None:
        for client in [*self.clients.values(), *self._retiring]:
            await client.close()  # ends the grace of a retired one too
        self.clients.clear()
        self._reservations.clear()
        self._reserved = frozenset()
        self._open.clear()
        self._idle.clear()
        for task in list(self._retiring.values()):
            task.cancel()
        self._retiring.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
