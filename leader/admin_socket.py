"""The admin socket: who is calling, from the kernel (``SO_PEERCRED``), not from the caller.

gRPC Python does not expose a Unix-socket peer's credentials (its ``context.peer()`` is
``unix:`` and nothing more; ``local_server_credentials`` never asks the kernel either, grpc
issues 15511 and 28755), and it cannot serve a socket it did not accept itself. So the admin
socket is served by a small relay in the daemon's event loop:

* it accepts each connection on ``DATA/run/admin.sock`` and reads the peer's uid, gid and pid
  with ``SO_PEERCRED`` (what the kernel recorded at ``connect``);
* it opens its own connection to the gRPC server, which listens only on a random abstract
  socket name, from a fresh random abstract address, and remembers that address → caller;
* it copies bytes both ways, and forgets the address before it closes the connection.

The gRPC server sees that address as ``context.peer()`` (``unix-abstract:…``). ``guard()``
wraps every handler: a call whose peer is not a live relay connection (anyone who found the
abstract name in ``/proc/net/unix``) is refused with PERMISSION_DENIED before the servicer runs,
and an admitted call's ``Caller`` is in ``current_caller()`` for the servicer (the audit actor).
An admitted call's reply starts with the leader's version and contract revision in its initial
metadata (``tlsroll.contract``): the CLI checks them before it changes anything.
Nothing the client sends (e.g. the old ``x-tlsroll-user`` header) names the actor.

Admin traffic is small: each connection costs two sockets and two copy tasks, at most
``MAX_CONNECTIONS`` at once (the socket is 0660 in a 0750 directory: only the leader's user and
group reach it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import pwd
import secrets
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tlsroll import contract, logs
from tlsroll.fsutil import peer_credentials

log = logs.get_logger(__name__)

MAX_CONNECTIONS = 64
CHUNK = 65536
DRAIN_SECONDS = 1.0  # at the stop, for the relayed connections to end by themselves
PEER_PREFIX = "tlsroll-admin-peer-"


@dataclass(frozen=True)
class Caller:
    """A process on the admin socket, as the kernel saw it connect."""

    pid: int
    uid: int
    gid: int
    user: str | None  # the uid's name in the passwd database, None if it has none

    @property
    def actor(self) -> str:
        """The audit trail's name for it: ``admin:<user>``, or ``admin:uid=<n>``."""
        return f"admin:{self.user}" if self.user else f"admin:uid={self.uid}"


def user_name(uid: int) -> str | None:
    """The passwd name of ``uid``, if it has a printable one of at most 64 characters."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
    return name if name.isprintable() and 0 < len(name) <= 64 and ":" not in name else None


def this_process() -> Caller:
    """The daemon itself (an in-process call that did not come through the socket)."""
    uid = os.getuid()
    return Caller(os.getpid(), uid, os.getgid(), user_name(uid))


_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("tlsroll_admin_caller")


def current_caller() -> Caller:
    """Who made the admin call being served (set by ``guard``); the daemon's own process when
    no relay admitted the call (servicers called in-process, as in unit tests)."""
    return _CALLER.get(None) or this_process()


class AdminRelay:
    """Serve ``path`` by relaying to the gRPC server bound at ``backend`` (see module doc)."""

    def __init__(self, path: Path, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.path = Path(path)
        self.max_connections = max_connections
        self._backend_name = f"tlsroll-admin-{os.getpid()}-{secrets.token_hex(16)}"
        self._callers: dict[str, Caller] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None

    @property
    def backend(self) -> str:
        """The gRPC target to bind the admin server to."""
        return f"unix-abstract:{self._backend_name}"

    def caller(self, peer: str) -> Caller | None:
        """The caller behind a live relay connection, by its gRPC peer string."""
        return self._callers.get(peer)

    def interceptor(self) -> grpc.aio.ServerInterceptor[Any, Any]:
        """The server interceptor that admits only calls that came through this relay."""
        return _Guard(self)

    async def start(self, mode: int = 0o660) -> None:
        """Listen on ``path`` (a stale socket there must already be gone): the file has
        ``mode`` before the socket accepts anyone."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    self.path.unlink()
            listener.bind(str(self.path))
            os.chmod(self.path, mode)
            listener.listen(16)
            listener.setblocking(False)
            self._server = await asyncio.start_unix_server(self._accepted, sock=listener)
        except BaseException:
            listener.close()
            raise

    def stop_accepting(self) -> None:
        """Accept no new connection (a caller's ``connect`` is refused: it was never received)
        while the relayed ones go on: the first step of the leader's stop, before the gRPC
        server's graceful stop shuts its own listener (a connection accepted here after that
        would carry a call the server never reads). The socket file stays until ``stop``."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def stop(self) -> None:
        """Stop listening, end every relayed connection, remove the socket file."""
        self.stop_accepting()
        if self._tasks:  # the gRPC server stopped: its answers' last bytes are on their way
            await asyncio.wait(set(self._tasks), timeout=DRAIN_SECONDS)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            log.warning(
                "admin_socket.too_many_connections",
                limit=self.max_connections,
                hint="too many admin commands at once: let some end, or look for a script "
                "calling tlsroll in a loop",
            )
            writer.close()
            return
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        except (OSError, EOFError) as exc:
            log.info("admin_socket.connection_failed", error=type(exc).__name__)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
        caller = Caller(pid, uid, gid, await asyncio.to_thread(user_name, uid))
        name = f"{PEER_PREFIX}{secrets.token_hex(16)}"
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        key = f"unix-abstract:{name}"
        try:
            upstream.setblocking(False)
            upstream.bind(b"\0" + name.encode())
            self._callers[key] = caller  # the name is ours alone while this socket is open
            loop = asyncio.get_running_loop()
            await loop.sock_connect(upstream, b"\0" + self._backend_name.encode())
            up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
            try:
                await _pump_both((reader, up_writer), (up_reader, writer))
            finally:
                self._callers.pop(key, None)  # forgotten before the name can be reused
                up_writer.close()
        finally:
            self._callers.pop(key, None)
            upstream.close()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()


async def _pump_both(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Copy both ways until either side closes (HTTP/2 never half-closes), then stop both."""
    tasks = {asyncio.ensure_future(_copy(*a)), asyncio.ensure_future(_copy(*b))}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the guard: only relayed calls, and who made them ---------------------------------------


class _Guard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in stubs only
    def __init__(self, relay: AdminRelay) -> None:
        self.relay = relay
        self.announced = contract.announced()  # computed once, with the server

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _guarded(handler, self._admit)

    async def _admit(self, context: Any) -> None:
        caller = self.relay.caller(context.peer())
        if caller is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "admin calls come through the admin socket"
            )
        assert caller is not None
        _CALLER.set(caller)
        # Which code answers, on every admitted reply (health's too): the CLI refuses to change
        # anything through a leader that runs other code than itself (tlsroll.contract).
        await context.send_initial_metadata(self.announced)


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], admit: Callable[[Any], Awaitable[None]]
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with ``admit(context)`` run first, in the task that then runs the servicer
    (so ``current_caller`` sees what it set)."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_once(handler.unary_unary, admit), des, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_once(handler.stream_unary, admit), des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_many(handler.unary_stream, admit), des, ser)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(_many(handler.stream_stream, admit), des, ser)
    raise TypeError(f"unknown handler kind: {handler!r}")


def _once(inner: Any, admit: Callable[[Any], Awaitable[None]]) -> Any:
    async def behaviour(request: Any, context: Any) -> Any:
        await admit(context)
        return await inner(request, context)

    return behaviour


def _many(inner: Any, admit: Callable[[Any], Awaitable[None]]) -> Any:
    """A streaming-response behaviour: a coroutine that writes with ``context.write`` stays
    one; an async generator stays one."""
    if inspect.iscoroutinefunction(inner):
        return _once(inner, admit)

    async def behaviour(request: Any, context: Any) -> AsyncIterator[Any]:
        await admit(context)
        async for item in inner(request, context):
            yield item

    return behaviour
