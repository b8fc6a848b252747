"""The leader's calls to the node agents (NodeAgent, mutual TLS with the leader's certificate).

    agents = AgentPool(store, credentials)
    agent = await agents.get("node1")           # one channel per node, reused
    reply = await agent.preflight(request)      # TransientError or StepFailed, never grpc's

``AgentApi`` is what the engine needs of an agent; ``AgentClient`` is the real one, and tests
drive the engine with a fake that has the same methods. Retries live here and only here: a call
that fails with UNAVAILABLE or DEADLINE_EXCEEDED is tried again a few times with backoff
(tenacity), then raises ``TransientError`` (the engine runs the step again later); any other
status is the agent saying no, ``StepFailed`` (terminal for the step).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from leader.store import Node, Store
from tlsroll import spiffe
from tlsroll.errors import TerminalError, TransientError
from tlsroll.rpc import hostport, reconnect_options
from tlsroll.v1 import agent_pb2, agent_pb2_grpc

T = TypeVar("T")
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CALL_TIMEOUT = 30.0
RECONNECT_SECONDS = 2.0


class StepFailed(TerminalError):
    """The agent refused or failed a command; the message (with the status) goes to the schema."""


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

    async def freeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse: ...

    async def unfreeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse: ...


class Agents(Protocol):
    """Where the engine gets the agent of a node."""

    async def get(self, name: str) -> AgentApi: ...

    async def close(self) -> None: ...


class AgentClient:
    """NodeAgent calls to one node over mutual TLS.

    The TLS target name is the node's key name (``tlsroll.spiffe.key_host``), not its address:
    the handshake succeeds only with a server certificate that the CA issued for the very key
    this node enrolled with, so a certificate of another node, a removed node or the leader
    that someone serves on this node's address is refused before a command is sent.
    """

    def __init__(self, node: Node, credentials: grpc.ChannelCredentials, trust_domain: str) -> None:
        self.node = node
        target = hostport(node.addresses[0], node.agent_port)
        self.channel = grpc.aio.secure_channel(
            target,
            credentials,
            options=[
                ("grpc.ssl_target_name_override", spiffe.key_host(trust_domain, node.key_pin)),
                *reconnect_options(RECONNECT_SECONDS),  # a returning agent is reached soon
            ],
        )
        self.stub = agent_pb2_grpc.NodeAgentStub(self.channel)

    async def _once(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float = CALL_TIMEOUT
    ) -> T:
        """One call: UNAVAILABLE or DEADLINE_EXCEEDED is a TransientError, any other status the
        agent saying no (StepFailed)."""
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in TRANSIENT_CODES:
                raise TransientError(f"agent {self.node.name}: {exc.details()}") from None
            raise StepFailed(f"{exc.details()} ({exc.code().name})") from None

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        """``_once``, tried again a few times with backoff while it is transient."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait_exponential(multiplier=0.2, max=2),
            stop=stop_after_attempt(4),
            reraise=True,
        ):
            with attempt:
                return await self._once(method, request)
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    async def get_status(
        self, request: agent_pb2.GetStatusRequest, timeout: float = CALL_TIMEOUT
    ) -> agent_pb2.NodeStatus:
        """One try with ``timeout``: what the node runs now (no retries; callers decide)."""
        return await self._once(self.stub.GetStatus, request, timeout)

    async def check(
        self, request: agent_pb2.CheckRequest, timeout: float = CALL_TIMEOUT
    ) -> agent_pb2.PreflightResponse:
        """Preflight's checks, read-only (one try, like ``get_status``)."""
        return await self._once(self.stub.Check, request, timeout)

    async def preflight(self, request: agent_pb2.PreflightRequest) -> agent_pb2.PreflightResponse:
        return await self._call(self.stub.Preflight, request)

    async def create_csr(self, request: agent_pb2.CreateCSRRequest) -> agent_pb2.CreateCSRResponse:
        return await self._call(self.stub.CreateCSR, request)

    async def stage(self, request: agent_pb2.StageRequest) -> agent_pb2.StageResponse:
        return await self._call(self.stub.Stage, request)

    async def switch(self, request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction:
        return await self._call(self.stub.Switch, request)

    async def rollback(self, request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        return await self._call(self.stub.Rollback, request)

    async def get_transaction(
        self, request: agent_pb2.GetTransactionRequest
    ) -> agent_pb2.Transaction:
        return await self._call(self.stub.GetTransaction, request)

    async def freeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        return await self._call(self.stub.Freeze, request)

    async def unfreeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        return await self._call(self.stub.Unfreeze, request)

    async def close(self) -> None:
        await self.channel.close(None)


class AgentPool:
    """One client per enrolled node, made on first use and again if its address or key
    changed (an agent that renewed its certificate is dialled by its new key at once). The
    client it replaces is closed only after ``CALL_TIMEOUT``: a call in flight on it ends as
    it would have."""

    def __init__(
        self, store: Store, credentials: grpc.ChannelCredentials, trust_domain: str
    ) -> None:
        self.store = store
        self.credentials = credentials
        self.trust_domain = trust_domain
        self.clients: dict[str, AgentClient] = {}
        self._retiring: dict[AgentClient, asyncio.Task[None]] = {}

    async def get(self, name: str) -> AgentClient:
        node = await asyncio.to_thread(self.store.get_node, name)
        client = self.clients.get(name)
        if client is None or (
            client.node.addresses,
            client.node.agent_port,
            client.node.key_pin,
        ) != (node.addresses, node.agent_port, node.key_pin):
            if client is not None:
                self._retire(client)
            client = AgentClient(node, self.credentials, self.trust_domain)
            self.clients[name] = client
        return client

    def set_credentials(self, credentials: grpc.ChannelCredentials) -> None:
        """Dial with ``credentials`` from now on (the leader's certificate was renewed): every
        client is made again on its next use; the old ones close after ``CALL_TIMEOUT``."""
        self.credentials = credentials
        for client in self.clients.values():
            self._retire(client)
        self.clients.clear()

    def _retire(self, client: AgentClient) -> None:
        async def close_later() -> None:
            try:
                await client.channel.close(CALL_TIMEOUT)
            finally:
                self._retiring.pop(client, None)

        self._retiring[client] = asyncio.create_task(close_later(), name="retire-agent-client")

    async def close(self) -> None:
        for client in [*self.clients.values(), *self._retiring]:
            await client.close()  # ends the grace of a retired one too
        self.clients.clear()
        for task in list(self._retiring.values()):
            task.cancel()
        self._retiring.clear()
