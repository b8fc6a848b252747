"""Drivers: how the agent reconfigures, restarts and freezes the managed server on its node.

One small interface (``Driver``), three implementations:

    reference  the reference server shipped with tlsroll: its TOML config is edited, it is
               restarted through its pid file, frozen through its admin socket
    systemd    any server run by systemd: the new config is rendered from a template the admin
               supplies, ``systemctl restart UNIT``; freeze through an admin socket that speaks
               the reference server's freeze protocol
    exec       admin-supplied commands for restart, health, freeze, unfreeze and watermark,
               each with a timeout; config rendered from a template as for systemd

A driver never decides anything: the transaction (``nodeagent.transaction``) does.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import fcntl
import glob
import json
import os
import signal
import socket
import string
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import h11
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

from nodeagent import clients as client_sources
from tlsroll import clients, logs
from tlsroll.clients import ClientsView
from tlsroll.config import ConfigFile, Section, dump_toml
from tlsroll.echo import shown
from tlsroll.errors import (
    LocalResourceError,
    NotRegularFile,
    TerminalError,
    UnsafePermissions,
    raise_if_local,
)
from tlsroll.fsutil import (
    config_dir_problem,
    config_link_problem,
    read_regular,
    replace_staged,
    socket_dir_problem,
    stage_atomic,
    write_atomic,
)
from tlsroll.httpcheck import port_open
from tlsroll.peertext import clean

CLIENTS_TTL = 10.0  # seconds a driver's view of the clients is reused
CLIENTS_WAIT = 1.0  # seconds a status waits for a fresh view before it takes the last one
# Seconds a when-quiet switch waits for its fresh view (``clients_now``): well below the
# leader's wait for a switch's first answer (``leader.agent_client.STREAM_SECONDS``, 15 s), so
# that "cannot tell" reaches it as the agent's refusal; 30 s never did: the leader gave up at
# 15 s, took it for an agent unreachable mid-switch and asked again for ever (review b3 of
# s64, M1). A read slower than this (a ``clients`` command near its own timeout) refuses.
CLIENTS_FRESH_WAIT = 10.0
START_TIMEOUT = 20.0
# What the systemd driver reads of its unit while the restarted server does not answer
# (``SystemdDriver.unit_down``), and the bound on that read.
UNIT_STATE = ("ActiveState", "SubState", "Result")
UNIT_STATE_TIMEOUT = 10
STOP_TIMEOUT = 15.0
KILL_WAIT = client_sources.KILL_WAIT  # after SIGKILL: the process is gone within this (a bound)
POLL_INTERVAL = 0.2  # how often a starting server is asked whether it answers
# The reference server is not polled: it says when it is ready (sd_notify's READY=1, sent to a
# socket of the driver's: ``Wakeup``) and a pidfd says when it exits, so a restart costs the
# server's own start and nothing on top. Without those (an older server, a kernel without
# pidfd) it is still asked after 5 ms, then twice as long each time up to ``READY_MAX_WAIT``.
READY_FIRST_WAIT = 0.005
READY_MAX_WAIT = 0.04
READY_FALLBACK_WAIT = 0.5  # between checks while a readiness message or an exit would wake us
# The reference server's files in its data_dir (``refserver.server``: PID_NAME, LOCK_NAME). It
# holds the lock file open, locked, for its whole run: every release has.
REFSERVER_PID = "refserver.pid"
REFSERVER_LOCK = "refserver.lock"
# The reference server's output, which the agent appends to (``refserver.log`` in its data
# dir): moved aside (to ``refserver.log.1``, over the one before) at a start beyond this size,
# so that it is bounded at about twice this; a failed start reads its last line from the last
# ``LOG_TAIL`` bytes, never the whole file (session 69, smalls).
REFSERVER_LOG_MAX = 16 * 1024 * 1024
LOG_TAIL = 64 * 1024

log = logs.get_logger(__name__)


def read_file(path: Path) -> bytes:
    """A file of the managed server's the agent reads (its live config, its template, the
    reference server's pid file): ``fsutil.read_regular`` (a FIFO there is never read: it
    blocked the reader for ever, review rev50a L2), one that is no regular file an OSError
    (EINVAL) naming it and its kind, as a directory's read was one (IsADirectoryError): each
    caller's way with a file it cannot read stays as it was."""
    try:
        return read_regular(path)
    except NotRegularFile as exc:
        raise OSError(errno.EINVAL, str(exc)) from None


class DriverError(TerminalError):
    """The managed server did not do what was asked; the message says what happened."""


@dataclass(frozen=True)
class ServerFacts:
    """Where the managed server is and what it listens on."""

    address: str
    app_path: str
    http_port: int
    https_port: int
    schemes: tuple[str, ...]

    def url(self, scheme: str) -> str:
        port = self.https_port if scheme == "https" else self.http_port
        return f"{scheme}://{self.address}:{port}{self.app_path}"


@dataclass(frozen=True)
class Target:
    """What the new config must say."""

    schemes: tuple[str, ...]
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    auth_verifier_file: Path | None = None


@dataclass(frozen=True)
class Started:
    """``Driver.started``."""

    pid: int
    at: float
    config: tuple[int, int, int]


def config_stat(path: Path) -> tuple[int, int, int]:
    """The (inode, size, mtime in ns) of ``path``, zeros if it cannot be looked at: what
    tells that a config file was replaced or edited (``NodeAgentService._served``)."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StagedConfig:
    """A config ``Driver.stage_config`` has written beside the live one (``file``, written and
    fsynced), or only holds (``file`` None) for a driver that writes its own way."""

    data: bytes
    file: Path | None = None


class Driver(abc.ABC):
    name: str
    config_file: Path
    # True if ``facts`` and ``render`` read nothing but the live config file (the same bytes
    # there give the same facts and the same render): a switch made when its node was staged
    # is still right at the switch if the file still holds those bytes. So too an edit by hand
    # of the live config is in the next config it renders (a rotate-cert's): the way back's
    # plan counts an edit a later change found only then (``plans.edited_since``); a driver
    # rendering from its template wrote that change's config without it.
    config_decides = False
    # True if the server may run as a user of its own, who reads its config as the config's
    # owner or group (systemd's ``User=``): the files a switch names get the config's owner,
    # group and mode (``plans.Sharing``). The reference driver starts its server as the
    # agent's user: its files stay the agent's.
    own_user = True
    # Set while a transaction of this agent restarts the server, and set (the event) once that
    # restart ended; how many such restarts began, and when the latest did (time.monotonic())
    # (``nodeagent.transaction.Runner._restart``): the heartbeat's view waits for it
    # (``NodeAgentService.server_view``).
    restarting: asyncio.Event | None = None
    restarts_begun = 0
    restart_began = 0.0
    # The server the driver's own latest start found answering: its pid, when that was known
    # (time.monotonic()), and the config file's ``config_stat`` taken before it was started;
    # None if not known (a start failed or under way; a driver that starts no process of its
    # own). ``NodeAgentService._served`` pairs it with what a verify's handshake was presented
    # (``probe.presented``).
    started: Started | None = None

    @abc.abstractmethod
    def facts(self) -> ServerFacts:
        """Read the live config (or the agent's settings) to say where the server is."""

    @abc.abstractmethod
    def render(self, target: Target) -> bytes:
        """The new config for ``target``; raises DriverError if it cannot be made."""

    def render_problem(self) -> str | None:
        """Why no switch's config could be rendered, or None (blocking; the preflight's and
        the plan's check). Only a driver that renders from more than the live config (which
        ``facts`` has read) can fail here: ``TemplateDriver``."""
        return None

    def named_files(self) -> dict[str, str] | None:
        """The https files the live config names, as ``Journal.live_tls`` keys them
        (``cert_file``, ``key_file``, ``ca_file``, ``verifier_file``; "" where it names none),
        or None if this driver cannot read them back (blocking; ConfigError, OSError). A
        template driver cannot: its config is the admin's format (review s70 drift M2)."""
        return None

    def http_config(self) -> bytes | None:
        """The live config set back to http alone, every other setting kept (the way back of
        a switch this agent's journal does not hold), or None if this driver cannot derive it
        (blocking; ConfigError, OSError)."""
        return None

    def says(self, target: Target) -> bool:
        """Whether the live config says what ``render(target)`` would (blocking; DriverError,
        OSError). By default byte for byte: a config this driver renders from a template."""
        return self.render(target) == self.read_config()

    def write_config(self, data: bytes) -> None:
        """Replace the live config atomically, keeping its file mode, owner and group."""
        self.commit_config(self.stage_config(data))

    def stage_config(self, data: bytes) -> StagedConfig:
        """The first half of ``write_config``: ``data`` written and fsynced beside the live
        config (with its file mode, owner and group: a config the server's own user reads,
        0640 say, must stay readable to it), which it does not replace yet; ``commit_config``
        does.
        A switch stages its target config while the server is being frozen, so that only the
        rename and the directory's fsync are left inside the freeze window (issue 15). A
        driver that writes its config its own way (overrides ``write_config``) stages
        nothing: ``commit_config`` calls its ``write_config``."""
        if type(self).write_config is not Driver.write_config:
            return StagedConfig(data)
        problem = config_dir_problem(self.config_file.parent)
        if problem:  # another user could swap the directory: nothing is written there
            raise UnsafePermissions(problem)
        self._refuse_link()
        mode, owner = 0o600, None
        if self.config_file.exists():
            st = self.config_file.stat()
            mode, owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
        staged = stage_atomic(self.config_file, data, mode, owner=owner)
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            got = staged.stat()
            if (got.st_uid, got.st_gid) != owner:  # no CAP_CHOWN (a unit of an earlier release)
                log.warning(
                    "config.owner_not_kept",
                    file=str(self.config_file),
                    owner=f"{owner[0]}:{owner[1]}",
                    written_as=f"{got.st_uid}:{got.st_gid}",
                    detail="the agent may not chown (CAP_CHOWN): the config it writes is its own",
                )
        return StagedConfig(data, staged)

    def keep_copy(self, path: Path, data: bytes) -> None:
        """``data`` (the live config) written to ``path`` beside the config, atomically and on
        disk (the file and its directory fsynced) before this returns, with the live config's
        file mode, owner and group: a copy no more readable than the config it keeps (a way
        back keeps an edited config so, ``Runner._keep_edited``)."""
        problem = config_dir_problem(self.config_file.parent)
        if problem:  # another user could swap the directory: nothing is written there
            raise UnsafePermissions(problem)
        st = self.config_file.stat()
        write_atomic(path, data, st.st_mode & 0o777, (st.st_uid, st.st_gid))

    def commit_config(self, staged: StagedConfig) -> None:
        """The second half of ``write_config``: the staged file replaces the live config."""
        if staged.file is None:
            self.write_config(staged.data)
        else:
            self._refuse_link()  # (one made since the staging: the rename would replace it)
            replace_staged(staged.file, self.config_file)

    def _refuse_link(self) -> None:
        """``UnsafePermissions`` if the live config is a symbolic link (``config_link_problem``:
        a rename would replace the link by our file)."""
        problem = config_link_problem(self.config_file)
        if problem:
            raise UnsafePermissions(problem)

    def discard_staged(self, staged: StagedConfig) -> None:
        """A staged config that will not be committed: its file removed."""
        if staged.file is not None:
            with contextlib.suppress(FileNotFoundError):
                staged.file.unlink()

    def end_stale_commands(self) -> None:
        """At the agent's start, before anything of its own acts on the server (blocking): what
        an earlier agent process left running of its driver's commands is ended (the exec
        driver's: ``ExecDriver.end_stale_commands``). Nothing by default."""
        return

    def discard_stale_staged(self) -> None:
        """Staged configs an agent process before this one left (it was stopped between a
        staging and its commit): removed (blocking; at the agent's start, before it serves a
        call, so none is this process's own: an agent that always runs as the same PID, PID 1
        in a container, removes them too), and the temporary files of a copy a way back was
        keeping when it stopped."""
        directory, name = self.config_file.parent, self.config_file.name
        with contextlib.suppress(OSError):
            for path in directory.glob(f".{glob.escape(name)}.staged-*"):
                path.unlink(missing_ok=True)
            # So too the temporary file of a copy a way back was keeping (``keep_copy``: the
            # agent stopped mid-write; the way back, resumed, writes the copy again).
            for path in directory.glob(f".{glob.escape(name)}.before-rollback-*.tmp-*"):
                path.unlink(missing_ok=True)

    def read_config(self) -> bytes:
        return read_file(self.config_file)

    @contextlib.contextmanager
    def reading_once(self) -> Iterator[None]:
        """Within it, in this thread, the live config is read at most once: ``read_config``,
        ``facts`` and ``render`` see the same bytes (the reference driver's: a switch's plan
        and its source read the file three times and parsed it twice, issue 15). By
        default nothing changes."""
        yield

    @abc.abstractmethod
    async def restart(self) -> None:
        """Restart the server and return when it answers again; DriverError if it does not."""

    @abc.abstractmethod
    async def status(self) -> dict[str, Any]:
        """The server's own view: at least ``frozen`` and ``watermark``; DriverError if down."""

    @abc.abstractmethod
    async def freeze(self, drain_timeout: float) -> int:
        """Refuse new writes, let in-flight ones finish, return the write watermark."""

    @abc.abstractmethod
    async def unfreeze(self) -> None: ...

    # Whether ``unfreeze`` changes no answer an outside check of the server gets (a flag set on
    # its admin socket): the leader's confirm may then check the server as verified, before
    # the unfreeze (``Transaction.unfreeze_keeps_answers``). Not for a command the admin wrote.
    unfreeze_keeps_answers: bool = False

    async def health(self) -> str | None:
        """None if the server is healthy (it answers its status), else why not."""
        try:
            await self.status()
        except DriverError as exc:
            return str(exc)
        return None

    async def status_problem(self) -> str | None:
        """None if the server's status is one a switch can go by (a write watermark: an
        integer), else why not; a server that does not answer is ``health``'s. The preflight
        asks (rev57b M2: exec commands written from the README passed it and failed the
        first switch, ``watermark`` raising KeyError)."""
        try:
            _watermark_of(await self.status())
        except DriverError as exc:
            return str(exc)
        return None

    async def watermark(self) -> int:
        return _watermark_of(await self.status())

    # --- who the server has seen (issue 12: who is still on http) ----------------------------

    _clients_cache: tuple[float, ClientsView] | None = None
    _clients_task: asyncio.Task[ClientsView] | None = None
    _clients_begun = 0  # reads begun, in order (``_refresh_clients``)
    _clients_cached_by = 0  # which of them the cache holds: a later one's view is never undone
    clients_ttl: float = CLIENTS_TTL  # [server].clients_refresh

    async def clients(self) -> ClientsView:
        """Who the server has seen on which scheme lately. Cached for ``clients_ttl`` seconds:
        a heartbeat every few seconds must not run a command or read a log every time. One
        read at a time, in a task of its own: a caller that gives up (the heartbeat waits 2 s
        for the whole view) neither kills it nor starts another; it gets the last view (or
        a problem saying the read is slow) after ``CLIENTS_WAIT`` seconds."""
        cached = self._clients_cache
        if cached is not None and time.monotonic() - cached[0] < self.clients_ttl:
            return cached[1]
        task = self._clients_task
        if task is None or task.done():
            task = asyncio.create_task(self._refresh_clients(), name=f"{self.name}-clients")
            self._clients_task = task
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # meets the inner result, and the cancelled caller (the agent's heartbeat task at
            # its stop) then goes on (``runtime.serve``).
            async with asyncio.timeout(CLIENTS_WAIT):
                return await asyncio.shield(task)
        except TimeoutError:
            if cached is not None:
                return cached[1]
            return ClientsView(
                problem="still reading who the server has seen (slow command or log)"
            )

    async def clients_now(self) -> ClientsView:
        """Who the server has seen, read afresh: not the view ``clients`` reuses for
        ``clients_ttl``, nor a read begun before this call (a request just made may be in
        neither). ``finalize --when-quiet`` asks just before a switch that closes http (review
        s64 M: a workstation that wrote on http in the cached view's last seconds was
        invisible, and the switch's restart wiped the reference server's memory of it). The
        view it reads is cached, so the heartbeats report what it saw. A read that does not
        end within ``CLIENTS_FRESH_WAIT`` seconds is a view with a problem (it cannot tell)."""
        # One read at a time (a slow ``clients`` command asked again at every pass piled up:
        # the closing review of session 64, M2): a read under way is waited for first, within
        # the same bound, then the fresh one begins. A task of its own, which ``clients`` waits
        # for too; an older read that ends after it never replaces its view in the cache.
        try:
            async with asyncio.timeout(CLIENTS_FRESH_WAIT):
                if (running := self._clients_task) is not None and not running.done():
                    await asyncio.shield(running)
                task = asyncio.create_task(self._refresh_clients(), name=f"{self.name}-clients-now")
                self._clients_task = task
                return await asyncio.shield(task)
        except TimeoutError:
            return ClientsView(
                problem=f"reading who the server has seen took over {CLIENTS_FRESH_WAIT:g}s"
            )

    async def _refresh_clients(self) -> ClientsView:
        self._clients_begun += 1
        mine = self._clients_begun
        try:
            view = await self.read_clients()
        except Exception as exc:  # a driver's trouble is the view's problem, never ours
            view = ClientsView(problem=client_sources.one_line(f"cannot read the clients: {exc}"))
        if mine > self._clients_cached_by:
            self._clients_cache = (time.monotonic(), view)
            self._clients_cached_by = mine
        return view

    async def read_clients(self) -> ClientsView:
        """The driver's own way to find out; by default it cannot tell."""
        return ClientsView()


# --- the reference server's admin protocol ----------------------------------------------------


ADMIN_ANSWER_MAX = 1 << 20  # bytes: an admin answer larger than this is refused


class AdminSocketClient:
    """HTTP over the managed server's local admin socket (the reference server's protocol).

    HTTP/1.1 spoken on the event loop, one connection per call (``Connection: close``; a server
    restarted meanwhile is reached afresh): the agent asks for the server's status with every
    heartbeat, for months, and aiohttp's client cost an idle agent 10 MiB of memory (it is
    imported only for the bootstrap service, while that runs). It used the standard library's
    client on a worker thread, a hand-off per call, three of them (freeze, the verify's
    watermark, unfreeze) inside every switch's freeze window (issue 15). h11 reads the answer
    (a ``Content-Length``, chunks, or the connection's end); anything else is a one-line
    ``DriverError``.

    With ``owner`` (the uid the server runs as) the socket is trusted only in a directory that
    user owns and nobody else can write (``tlsroll.fsutil.socket_dir_problem``): whoever can
    write there can put a socket of their own in its place, and the agent would freeze (and
    believe) a fake. With ``dir_owner`` (the systemd driver: the agent does not know the
    unit's user) the same is asked of the directory's owner: the directory is the server's
    user's, and nobody else may write there (review s69 revref M: a systemd driver's socket in
    /tmp, say, was trusted whoever had put it there)."""

    def __init__(
        self,
        socket_path: Path,
        timeout: float = 10.0,
        owner: int | None = None,
        *,
        dir_owner: bool = False,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.owner = owner
        self.dir_owner = dir_owner

    async def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        if self.owner is not None or self.dir_owner:
            try:
                owner = self.owner
                if owner is None:
                    owner = os.stat(self.socket_path.parent).st_uid
                problem = socket_dir_problem(self.socket_path.parent, owner)
            except FileNotFoundError as exc:
                # No directory, so no socket to distrust: the server is not running (or
                # [server] admin_socket names another path), not a security refusal.
                raise DriverError(
                    f"managed server not answering on {self.socket_path}: {exc.filename} "
                    "does not exist (the server not started yet, or [server] admin_socket "
                    "names another path)"
                ) from None
            except OSError as exc:
                problem = f"{exc.strerror}: {exc.filename}"
            if problem is not None:
                raise DriverError(f"not trusting the admin socket {self.socket_path}: {problem}")
        try:
            # asyncio.timeout, not wait_for: see ``clients``
            async with asyncio.timeout(timeout or self.timeout):
                status, raw = await self._exchange(method, path, body)
            data = json.loads(raw)
        except (OSError, ValueError) as exc:  # an answer h11 or JSON cannot read
            # The agent out of descriptors says nothing about the server: not "down", not a
            # refused freeze (the transaction waits for descriptors, tlsroll.errors).
            raise_if_local(exc, f"calling the managed server's admin socket {self.socket_path}")
            why = " ".join(str(exc).split()) or type(exc).__name__
            raise DriverError(
                f"managed server not answering on {self.socket_path}: {why}"
            ) from None
        if status != 200:
            raise DriverError(f"admin {path} answered {status}: {data}")
        if not isinstance(data, dict):
            raise DriverError(f"admin {path} answered {data!r}")
        return data

    async def _exchange(
        self, method: str, path: str, body: Mapping[str, Any] | None
    ) -> tuple[int, bytes]:
        """One request and its whole answer, on the event loop; h11 does the framing (a
        length, chunks or the connection's end), as it does for the agent's own https
        service (``nodeagent.json_https``)."""
        headers = [("Host", "localhost"), ("Connection", "close")]
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            headers.append(("Content-Type", "application/json"))
        if body is not None or method != "GET":
            headers.append(("Content-Length", str(len(payload))))
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=ADMIN_ANSWER_MAX)
        request = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
        if payload:
            request += conn.send(h11.Data(data=payload)) or b""
        request += conn.send(h11.EndOfMessage()) or b""
        reader, writer = await self._connect_and_send(request)
        try:
            status, size = 0, 0
            parts: list[bytes] = []
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise ValueError(f"not an HTTP answer this client reads: {exc}") from None
                if event is h11.NEED_DATA:
                    data = await reader.read(1 << 16)  # b"": the connection's end
                    if not data and status == 0 and not conn.trailing_data[0]:
                        raise ValueError("the connection closed without an answer")
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > ADMIN_ANSWER_MAX:
                        raise ValueError(f"an answer of more than {ADMIN_ANSWER_MAX} bytes")
                    parts.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return status, b"".join(parts)
                elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover - h11 raises
                    raise ValueError("the connection closed before the answer's end")
        finally:
            writer.close()  # and the descriptor closed before the call returns
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connect_and_send(
        self, request: bytes
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connected, and the request sent before the first wait: a local socket connects at
        once (unless its backlog is full) and takes a small request whole, so the call is out
        when its caller first yields the loop (a switch's freeze call goes out before the
        servicer's other work, ``Runner.under_way``). What the socket did not take at once is
        written as by any stream."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sent = 0
            try:
                sock.connect(str(self.socket_path))
            except BlockingIOError:  # the backlog is full: wait for it
                await loop.sock_connect(sock, str(self.socket_path))
            else:
                with contextlib.suppress(BlockingIOError):
                    sent = sock.send(request)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        if sent < len(request):
            writer.write(request[sent:])
        return reader, writer


def _digits(text: str) -> bool:
    """Whether ``text`` is a whole number in ASCII digits (``str.isdigit`` alone takes "²" and
    other scripts' digits, which ``int()`` then takes or refuses)."""
    return text.isascii() and text.isdigit()


MAX_WATERMARK = 2**63 - 1
"""The largest watermark taken: the journal keeps it in SQLite's signed 64-bit INTEGER (one
beyond made its write raise OverflowError; review s69 review4 L)."""


def _watermark_text(text: str) -> int | None:
    """``text`` as a watermark (ASCII digits, at most ``MAX_WATERMARK``), or None; never
    ``int()``'s ValueError of more than 4300 digits."""
    if not _digits(text) or len(text.lstrip("0")) > len(str(MAX_WATERMARK)):
        return None
    number = int(text)
    return number if number <= MAX_WATERMARK else None


def _watermark_of(status: Mapping[str, Any], answer: str = "status") -> int:
    """The write watermark of a server's ``status`` (or its freeze ``answer``); DriverError if
    it says none."""
    value = status.get("watermark")
    # As ``int()`` took it before (rev57c L5): 123, 123.0, "123"; never true/false.
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        if isinstance(value, str):  # (as ``ExecDriver.freeze``)
            number = _watermark_text(value.strip())
        else:
            number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is not None and not 0 <= number <= MAX_WATERMARK:
        number = None
    if number is None:
        keys = ", ".join(sorted(clean(k, 40) for k in status)[:10]) or "none"
        raise DriverError(
            f"the server's {answer} has no write watermark (an integer; its keys: {keys})"
        )
    return number


class _AdminSocketFreeze:
    admin: AdminSocketClient

    async def status(self) -> dict[str, Any]:
        return await self.admin.call("GET", "/admin/status")

    async def freeze(self, drain_timeout: float) -> int:
        data = await self.admin.call(
            "POST", "/admin/freeze", {"drain_timeout": drain_timeout}, timeout=drain_timeout + 10
        )
        if not data.get("drained", False):
            raise DriverError(f"writes still in flight after {drain_timeout:g}s: {data}")
        if data.get("frozen") is False:
            # Unfrozen while it drained (another unfreeze came meanwhile): its watermark may
            # already move (review s69 revref L). A server that does not say is taken at its
            # word ("drained"), as the README's protocol allows.
            raise DriverError("the server was unfrozen again before its freeze answered")
        # Checked as a status's is (review s64 L1): an answer without one (or with true, "7x")
        # raised KeyError or ValueError, and the step's reason was the bare key or int()'s text.
        return _watermark_of(data, "freeze answer")

    async def unfreeze(self) -> None:
        await self.admin.call("POST", "/admin/unfreeze")

    unfreeze_keeps_answers = True  # a flag on the admin socket: answers to GETs stay as they are


async def _wait_healthy(
    driver: Driver,
    timeout: float,
    why: str,
    down: Callable[[], Awaitable[str | None]] | None = None,
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll ``driver.health()`` until it is healthy; DriverError with the last problem after
    ``timeout`` seconds, or at once with what ``down`` says (asked after each failed check:
    why the server is gone for good, None if it may still come). The agent short of
    descriptors cannot tell whether the server answers: it keeps asking, and if its own
    shortage lasts to the deadline, that is what it reports (``LocalResourceError``: the
    transaction waits and tries again), never the server (a DriverError here rolls a node
    back). Before, the first shortage ended the wait, and the transaction's retry ran the
    restart again on a server that may have been fine."""
    polling = AsyncRetrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(interval),
        retry=(
            retry_if_result(lambda problem: problem is not None)
            | retry_if_exception_type(LocalResourceError)
        ),
    )

    async def check() -> str | None:
        problem = await driver.health()
        if problem is not None and down is not None and (gone := await down()) is not None:
            raise DriverError(f"{why}: {gone}")
        return problem

    try:
        await polling(check)
    except RetryError as exc:
        last = exc.last_attempt
        short = last.exception() if last.failed else None
        if isinstance(short, LocalResourceError):
            raise short from None
        raise DriverError(f"{why}: {last.result()}") from None


# --- reference --------------------------------------------------------------------------------


CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid (SCM_CREDENTIALS)


class Wakeup:
    """What wakes a driver waiting for the reference server: its readiness message (the
    sd_notify protocol: the server sends ``READY=1`` to ``$NOTIFY_SOCKET``, as it does under
    systemd) on a datagram socket of the agent's own, and the exit of a process (a pidfd turns
    readable). A message wakes us only if it comes from ``sender`` (the kernel says who sent
    it: ``SO_PASSCRED``): the socket's name is visible to every local user, and one who kept
    sending to it must not have the agent check readiness back to back during a freeze. Even
    then a wake is only a cue to look: the pid file is still read. ``ready`` says whether the
    started server itself sent ``READY=1``: it does so once its listeners and admin socket
    are up, so the admin socket is not asked again (a round trip inside the freeze window,
    issue 15; the verify's watermark check that follows asks it, or for a server that was
    down at the freeze the unfreeze). Without that message (a wake by an exit
    or the fallback wait) readiness is checked as before: pid file and admin socket.
    Anything this machine lacks (pidfd before Linux 5.3; the socket when short of descriptors)
    leaves the caller's fallback wait to find it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._fds: list[int] = []
        self._sock: socket.socket | None = None
        self.address: str | None = None  # for the child's NOTIFY_SOCKET; None: none to give
        self._sender: int | None = None  # the pid whose messages count (the started server)
        self._early: set[int] = set()  # who sent before the sender was known (at most 64)
        self._early_ready: set[int] = set()  # and which of them said READY=1
        self.ready = False  # the sender said READY=1

    @property
    def sender(self) -> int | None:
        return self._sender

    @sender.setter
    def sender(self, pid: int) -> None:
        """The started server's pid, once known: a message it sent before (a fast start while
        the spawn's thread was still returning) wakes us now."""
        self._sender = pid
        if pid in self._early:
            self.ready = self.ready or pid in self._early_ready
            self._event.set()
        self._early.clear()
        self._early_ready.clear()

    def listen(self) -> None:
        """Open the socket the server's readiness message is sent to (abstract namespace)."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            name = f"tlsroll-agent-{os.getpid()}-{os.urandom(8).hex()}"
            sock.bind("\0" + name)
        except OSError:
            return
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._drain)
        self.address = "@" + name

    def _drain(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(OSError):  # BlockingIOError: nothing more to read
            for _ in range(64):  # then the loop's other work; the reader is called again
                message, ancillary, _, _ = self._sock.recvmsg(
                    4096, socket.CMSG_SPACE(CREDENTIALS.size)
                )
                ready = b"READY=1" in message.split(b"\n")
                for level, kind, data in ancillary:
                    if (level, kind) != (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                        continue
                    pid = CREDENTIALS.unpack_from(data)[0]
                    if self._sender is None and len(self._early) < 64:
                        self._early.add(pid)
                        if ready:
                            self._early_ready.add(pid)
                    elif pid == self._sender:
                        self.ready = self.ready or ready
                        self._event.set()

    def watch_exit(self, pid: int) -> None:
        """Wake when process ``pid`` exits."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return
        self._fds.append(fd)
        self._loop.add_reader(fd, self._event.set)

    @property
    def watching(self) -> bool:
        """True if an exit wakes us (a pidfd is watched)."""
        return bool(self._fds)

    async def wait(self, seconds: float) -> None:
        """Until something woke us or ``seconds`` passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: see ``clients``
                await self._event.wait()
        self._event.clear()

    def close(self) -> None:
        for fd in self._fds:
            self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


def _pid_alive(pid: int) -> bool:
    """False once ``pid`` has exited (``LocalResourceError`` if the agent cannot tell: short of
    descriptors, it must not take a running server for one that stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise_if_local(exc, f"looking at process {pid}")
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _has_open(pid: int, path: Path) -> bool | None:
    """True if process ``pid`` has the file ``path`` open; None if the agent may not look
    (a process started with privileges the agent lacks now; ``LocalResourceError`` if it cannot
    tell for want of descriptors)."""
    try:
        want = os.stat(path)
    except OSError as exc:
        raise_if_local(exc, f"looking at {path}")
        return False
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except PermissionError:
        return None
    except OSError as exc:
        raise_if_local(exc, f"looking at process {pid}")
        return False  # gone
    for name in names:
        try:
            got = os.stat(f"{fds}/{name}")  # the file the descriptor is open on
        except PermissionError:
            return None
        except OSError as exc:
            raise_if_local(exc, f"looking at process {pid}")
            continue  # closed meanwhile
        if (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


def _locked_by_another(path: Path) -> bool:
    """True if some process holds the lock on ``path`` (or the agent cannot tell: it then
    acts as before this check). Takes the lock for a moment when free. Opened without
    blocking: a FIFO put in its place never holds the agent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise_if_local(exc, f"looking at {path}")
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as exc:
        raise_if_local(exc, f"looking at {path}")
        return True
    finally:
        os.close(fd)  # drops the lock if it was taken
    return False


class ReferenceDriver(_AdminSocketFreeze, Driver):
    """The reference server (``tlsroll-refserver``) as a process of its own."""

    name = "reference"
    config_decides = True
    own_user = False  # the server runs as the agent does (``_spawn``)

    def __init__(self, config_file: Path, log_file: Path) -> None:
        self.config_file = config_file
        self.log_file = log_file
        self._children: list[subprocess.Popen[bytes]] = []
        self._once = threading.local()  # ``reading_once``
        section = self._section()
        self.data_dir: Path = section.path("data_dir")
        # The server runs as the agent does (the driver starts it): its socket must be ours.
        self.admin = AdminSocketClient(
            section.path("admin_socket", self.data_dir / "admin.sock"), owner=os.geteuid()
        )

    @contextlib.contextmanager
    def reading_once(self) -> Iterator[None]:
        once = vars(self._once)
        once.clear()
        once["active"] = True
        try:
            yield
        finally:
            once.clear()

    def read_config(self) -> bytes:
        once = vars(self._once)
        if not once.get("active"):
            return read_file(self.config_file)
        if "raw" not in once:
            once["raw"] = read_file(self.config_file)
        raw: bytes = once["raw"]
        return raw

    def _load(self) -> ConfigFile:
        """The live config, parsed (once within ``reading_once``)."""
        once = vars(self._once)
        if not once.get("active"):
            return ConfigFile.load(self.config_file)
        if "config" not in once:
            if "raw" not in once:
                once["raw"] = ConfigFile.read(self.config_file)
            once["config"] = ConfigFile.parse(self.config_file, once["raw"])
        config: ConfigFile = once["config"]
        return config

    def _section(self) -> Section:
        return self._load().section("server")

    def facts(self) -> ServerFacts:
        s = self._section()
        return ServerFacts(
            address=s.ip("address"),
            app_path=s.text("app_path"),
            http_port=s.port("http_port", 8080),
            https_port=s.port("https_port", 8443),
            schemes=tuple(s.str_list("listen")),
        )

    def named_files(self) -> dict[str, str]:
        """As ``Driver.named_files``, each path as the config names it: a relative one joined
        to the config's directory, never resolved (``Section.path`` resolves it). A symbolic
        link there (``verifier.json`` -> ``pw/v3.json``, which the admin repoints) stays the
        link in the plans, the journal and the configs tlsroll writes from them, as for a
        file the config names by its absolute path (review s70 L4: its target was taken, and
        a rotation wrote it into the config in place of the link)."""
        s = self._section()
        return {
            live: _as_named(self.config_file, s.text(key, ""))
            for live, key in (
                ("cert_file", "cert_file"),
                ("key_file", "key_file"),
                ("ca_file", "client_ca_file"),
                ("verifier_file", "auth_verifier_file"),
            )
        }

    def http_config(self) -> bytes:
        """``listen = ["http"]`` without the https settings (the certificate, its key and the
        client CA); the password's verifier stays: the way back opens nothing."""
        return self._dump(("http",), {}, drop=HTTPS_ONLY)

    def render(self, target: Target) -> bytes:
        return self._dump(target.schemes, dict(_reference_files(target)))

    def _dump(
        self, schemes: Sequence[str], files: Mapping[str, Path | None], drop: Sequence[str] = ()
    ) -> bytes:
        """The live config with ``listen`` = ``schemes``, ``files`` set (None: kept as the
        file says) and the keys ``drop`` names removed."""
        cfg = self._load()
        tables = {name: dict(value) for name, value in cfg.data.items() if isinstance(value, dict)}
        server = tables["server"]
        server["listen"] = list(schemes)
        for key, value in files.items():
            if value is not None:
                server[key] = str(value)
        for key in drop:
            server.pop(key, None)
        return dump_toml(
            tables,
            "managed by tlsroll-agent; the previous version is kept in the agent's journal:\n"
            "`tlsroll rollout rollback` puts it back",
        ).encode()

    def says(self, target: Target) -> bool:
        """As ``Driver.says``, by the parsed TOML: a comment or a layout does not count. A
        file ``target`` leaves out (None) must be absent from the config: ``render`` keeps
        what the file says there, so a config naming a verifier the journal does not hold
        live would say the target too (review s41rev3 L1)."""
        config = self._load().data
        server = config.get("server")
        if isinstance(server, dict) and any(
            value is None and key in server for key, value in _reference_files(target)
        ):
            return False
        rendered = ConfigFile.parse(self.config_file, self.render(target)).data
        return bool(rendered == config)

    def _pid(self) -> int | None:
        """The running server's pid, from its pid file; None if there is none. Short of
        descriptors the agent cannot tell (``LocalResourceError``): a stop that took that for
        "not running" left the old server up, and the start after it met its ports in use."""
        path = self.data_dir / REFSERVER_PID
        try:
            return int(read_file(path).strip())
        except OSError as exc:
            raise_if_local(exc, f"reading {path}")
            return None
        except ValueError:
            return None

    async def stop(self) -> None:
        self.started = None
        # A server of ours that died on its own is a zombie until waited for: reap it first.
        # A pid we reaped is free for the system to reuse: never signal it, and drop the pid
        # file still naming it (a crashed server leaves it), so that no later stop can read
        # it and signal an unrelated process that got the pid (review 1 of s34, L4).
        reaped = self._reap()
        pid = self._pid()
        if pid is None:
            return
        if pid in reaped or not _pid_alive(pid):
            await self._wait_reaped(pid, reaped)
            if pid in reaped:
                self._drop_pid_file(pid)
            return
        # A pid file from before the agent's restart may name a pid the system gave to an
        # unrelated process since (its server died while the agent was down): not a child of
        # ours, so the reaped-pid guard above does not apply. Signal only the server of this
        # data_dir (review 2 of s34, F5).
        if not self._is_server(pid):
            log.warning(
                "server.pid_file_stale",
                pid=pid,
                path=str(self.data_dir / REFSERVER_PID),
                detail="the process is not this data_dir's reference server: not signalled",
            )
            self._drop_pid_file(pid)
            return
        wakeup = Wakeup()
        wakeup.watch_exit(pid)
        try:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            await self._wait_exit(pid, wakeup, STOP_TIMEOUT, reaped)
            # Checked again: a server of a previous agent's that exited meanwhile left its
            # pid free for reuse.
            if pid not in reaped and _pid_alive(pid) and self._is_server(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                # SIGKILL ends it at once, but not in the same instant: wait (bounded) for it.
                await self._wait_exit(pid, wakeup, KILL_WAIT, reaped)
        finally:
            wakeup.close()
        reaped |= self._reap()
        await self._wait_reaped(pid, reaped)
        if pid in reaped:
            self._drop_pid_file(pid)

    async def _wait_reaped(self, pid: int, reaped: set[int]) -> None:
        """Wait (bounded: ``KILL_WAIT``) until ``pid``, if a child of ours that exited, is
        reaped: the leader of a thread group shows as a zombie while its other threads still
        exit, and cannot be waited for until they have."""
        deadline = time.monotonic() + KILL_WAIT
        wait = READY_FIRST_WAIT
        while any(c.pid == pid for c in self._children) and time.monotonic() < deadline:
            if _pid_alive(pid):
                return  # not ours to wait for: it runs (a stop that gave up on it)
            await asyncio.sleep(wait)
            reaped |= self._reap()
            wait = min(wait * 2, READY_MAX_WAIT)

    async def _wait_exit(self, pid: int, wakeup: Wakeup, timeout: float, reaped: set[int]) -> None:
        deadline = time.monotonic() + timeout
        # Its exit wakes us (pidfd): the wait is a safety net. Otherwise poll.
        ceiling = READY_FALLBACK_WAIT if wakeup.watching else READY_MAX_WAIT
        wait = READY_FALLBACK_WAIT if wakeup.watching else READY_FIRST_WAIT
        while _pid_alive(pid) and time.monotonic() < deadline:
            reaped |= self._reap()
            if pid in reaped:
                return
            await wakeup.wait(wait)
            wait = min(wait * 2, ceiling)

    def _reap(self) -> set[int]:
        """Wait for the children that exited; their pids (free for reuse from now on)."""
        running = [c for c in self._children if c.poll() is None]
        reaped = {c.pid for c in self._children} - {c.pid for c in running}
        self._children = running
        return reaped

    def _is_server(self, pid: int) -> bool:
        """True if the running process ``pid`` is this data_dir's reference server: one we
        started and did not reap, or one that holds the data_dir's lock file open (a server a
        previous agent started; the pid file alone does not say so). Where the agent may not
        look into the process, a server holding the lock is taken for the one the pid file
        names (it wrote that file once it had the lock)."""
        if any(c.pid == pid for c in self._children):
            return True
        lock = self.data_dir / REFSERVER_LOCK
        held = _has_open(pid, lock)
        return _locked_by_another(lock) if held is None else held

    def _drop_pid_file(self, pid: int) -> None:
        """Remove the pid file if it still names ``pid``: a child of ours we reaped, or a
        process that is not the server (the file is stale either way)."""
        path = self.data_dir / REFSERVER_PID
        with contextlib.suppress(OSError, ValueError):
            if int(read_file(path).strip()) == pid:
                path.unlink()

    def _spawn(self, notify_socket: str | None = None) -> subprocess.Popen[bytes]:
        # The agent's own NOTIFY_SOCKET (systemd's, for the agent's unit) is never passed on:
        # the server's READY=1 and STOPPING=1 are for the driver, or for nobody.
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = notify_socket
        _bound_log(self.log_file)
        with open(self.log_file, "ab") as log:
            return subprocess.Popen(
                # -P: not imported from the agent's working directory, whatever that is.
                [sys.executable, "-P", "-m", "refserver", "--config", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # outlives an agent that is killed
            )

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until it answers; DriverError at once if it exits.

        Event-driven (``Wakeup``): the server's readiness message and the child's exit wake
        the wait at once, and only then is readiness checked (the pid file names the child,
        and its READY=1 came, or else its admin socket answers); a check every
        ``READY_FALLBACK_WAIT`` catches what sends no message. Without a readiness socket,
        readiness is asked after 5 ms, then with a doubling wait up to 40 ms."""
        wakeup = Wakeup()
        try:
            await self._start(wakeup, timeout)
        finally:
            wakeup.close()

    async def _start(self, wakeup: Wakeup, timeout: float) -> None:
        self.started = None
        config = config_stat(self.config_file)  # (before the server reads it)
        wakeup.listen()
        try:
            child = await asyncio.to_thread(self._spawn, wakeup.address)
        except OSError as exc:
            raise_if_local(exc, "starting the managed server")
            raise
        self._children.append(child)
        wakeup.sender = child.pid
        wakeup.watch_exit(child.pid)
        # Told of readiness and of an exit, the wait is only a safety net; otherwise poll.
        told = wakeup.address is not None and wakeup.watching
        ceiling = READY_FALLBACK_WAIT if told else READY_MAX_WAIT
        deadline = time.monotonic() + timeout
        wait = READY_FALLBACK_WAIT if told else READY_FIRST_WAIT
        short: LocalResourceError | None = None
        while True:
            await wakeup.wait(min(wait, max(deadline - time.monotonic(), 0.0)))
            if child.poll() is not None:
                raise DriverError(f"{ended_at_start(child.returncode)}: {self._last_log_line()}")
            try:
                # READY=1 from the started server (``Wakeup.ready``) says its admin socket
                # answers; otherwise ask it.
                if self._pid() == child.pid and (wakeup.ready or await self.health() is None):
                    self.started = Started(child.pid, time.monotonic(), config)
                    return
                short = None
            except LocalResourceError as exc:
                # The agent short of descriptors cannot tell yet: it keeps asking (until the
                # deadline) rather than restart the server again.
                short = exc
            if time.monotonic() >= deadline:
                if short is not None:
                    # Its own shortage to the end says nothing about the server: not a
                    # DriverError, which would roll back a node that may be fine.
                    raise short
                # Stopped, not left to come up later (review s69 revref M): one that had not
                # written its pid file yet escaped the next stop, and came up beside (or after)
                # the server started in its place, on the config the agent had gone back from.
                await self._end_child(child, wakeup)
                raise DriverError(f"the server did not answer within {timeout:g}s")
            wait = min(wait * 2, ceiling)

    async def _end_child(self, child: subprocess.Popen[bytes], wakeup: Wakeup) -> None:
        """Stop a server this driver started and did not reap (SIGTERM, then SIGKILL after
        ``STOP_TIMEOUT``), and drop its pid file if it wrote one."""
        reaped = self._reap()
        if child.pid not in reaped:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            await self._wait_exit(child.pid, wakeup, STOP_TIMEOUT, reaped)
            if child.pid not in reaped and child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await self._wait_exit(child.pid, wakeup, KILL_WAIT, reaped)
            reaped |= self._reap()
            await self._wait_reaped(child.pid, reaped)
        if child.pid in reaped:
            self._drop_pid_file(child.pid)

    def _last_log_line(self) -> str:
        """The server's last log line; one of the reference server's JSON lines as its message
        (``event``) and the rest as ``key=value``, without its time, level and logger (pasted
        whole it was hard to read: review rev58a L2)."""
        try:
            tail, cut = _read_tail(self.log_file, LOG_TAIL)
        except OSError:
            return "no log"
        lines = [ln for ln in tail.decode(errors="replace").splitlines() if ln]
        if cut and len(lines) > 1:
            lines = lines[1:]  # (the first one read is likely cut: not a line of its own)
        if not lines:
            return "no output"
        last = lines[-1]
        with contextlib.suppress(ValueError):
            said = json.loads(last)
            if isinstance(said, dict) and isinstance(said.get("event"), str):
                rest = ", ".join(
                    f"{key}={value}"
                    for key, value in said.items()
                    if key not in ("event", "timestamp", "level", "logger")
                )
                return (str(said["event"]) + (f" ({rest})" if rest else ""))[:300]
        return last[-300:]

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def read_clients(self) -> ClientsView:
        """The reference server records its clients itself (``GET /admin/clients``)."""
        try:
            data = await self.admin.call("GET", "/admin/clients")
            seen, window, problem = clients.from_json(data)
        except (DriverError, LocalResourceError, ValueError) as exc:
            return ClientsView(source="refserver", problem=client_sources.one_line(exc))
        window = window or clients.WINDOW_SECONDS
        return ClientsView(tuple(seen[: clients.MAX_REPORTED]), window, "refserver", problem)


def _bound_log(path: Path) -> None:
    """``path`` moved aside to ``NAME.1`` (replacing the one before) if it is larger than
    ``REFSERVER_LOG_MAX``: the agent appends the server's output at each start and never
    trimmed it. A file that cannot be looked at or moved is left as it is."""
    with contextlib.suppress(OSError):
        if path.stat().st_size > REFSERVER_LOG_MAX:
            os.replace(path, path.with_name(path.name + ".1"))


def _read_tail(path: Path, size: int) -> tuple[bytes, bool]:
    """The last ``size`` bytes of the regular file ``path``, and whether that is not all of it
    (never more in memory however large it grew; no FIFO or device is read: as
    ``read_file``, an OSError naming its kind)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        start = max(st.st_size - size, 0)
        os.lseek(fd, start, os.SEEK_SET)
        chunks = []
        left = size
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), start > 0
    finally:
        os.close(fd)


def ended_at_start(code: int) -> str:
    """How a managed server that ended while it started ended: its exit code, or the signal
    that killed it (``subprocess``'s negative code: "code -9" was the admin's to decode)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the server was killed at start ({name})"
    return f"the server exited at start (code {code})"


# --- systemd and exec: config from a template -------------------------------------------------


class TemplateDriver(Driver):
    """A server whose config the agent renders from an admin-supplied template.

    The template is ``string.Template`` text; it may use ``$address``, ``$app_path``,
    ``$http_port``, ``$https_port``, ``$listen`` (a TOML list such as ``["https"]``, or
    ``["http", "https"]`` for a dual node), ``$scheme`` (``https`` whenever https is served),
    ``$http_enabled``/``$https_enabled`` (``true``/``false``), ``$http_off``/``$https_off``
    (``""`` when that scheme is served, else ``#``: put it before a line-based config's
    listener line to comment it out), ``$cert_file``, ``$key_file``, ``$ca_file``,
    ``$auth_verifier_file``. One template thus renders http-only, https-only and dual (the
    transitional strategy's phase 1: http on 8080 and https on 8443, same certificate).

    The server's status (its admin socket's, or the exec driver's ``status`` command) should
    also carry ``started_at``, when the server process started, ISO 8601 with its zone
    (``2026-12-03T13:40:00+00:00``), as the reference server's does: after a journal is put
    back from a copy made mid-switch, a change-password, a rollback or any switch whose target
    and source answer alike is settled only if the server started after its config was last
    written, by the file time's grain and 50 ms more (``nodeagent.transaction._not_loaded``;
    a ``started_at`` in whole seconds is read as it says, a second early at worst); without
    ``started_at`` every such settle needs the admin. ``facts`` reads the schemes from the
    ports that answer (nothing else says them), so ``tlsroll-agent --journal-checked``
    never takes them from there (``plans.live_contradiction``).
    """

    def __init__(self, section: Section, address: str) -> None:
        self.section = section
        self.config_file = server_config_file(section)
        self.template_file: Path = section.path("template")
        self.address = address
        self.app_path: str = section.text("app_path")
        if not self.app_path.startswith("/"):
            # (every URL the agent checks is address:port and the path: "praxis" gave
            # http://a:8080praxis, and a check of it failed after the switch)
            raise section.error("app_path", f"{shown(self.app_path)} must start with '/'")
        self.http_port: int = section.port("http_port", 8080)
        self.https_port: int = section.port("https_port", 8443)
        self.clients_window: int = section.integer(
            "clients_window", clients.WINDOW_SECONDS, lo=60, hi=clients.MAX_WINDOW_SECONDS
        )

    def facts(self) -> ServerFacts:
        schemes = tuple(
            scheme
            for scheme, port in (("http", self.http_port), ("https", self.https_port))
            if port_open(self.address, port, timeout=1.0)
        )
        return ServerFacts(self.address, self.app_path, self.http_port, self.https_port, schemes)

    def render_problem(self) -> str | None:
        """The template read and rendered (nothing written) for an https target with made-up
        file names and for http (the way back): a template missing (install.sh's example names
        one nothing ships), unreadable or with a placeholder it does not know blocks the plan
        and the preflight, where before the first switch found it, after the node's
        certificate was issued, and the rollout halted there (review s66 walk M1). Which
        files a target names changes no placeholder's validity, so made-up ones serve."""
        made_up = Path("/nonexistent/tlsroll-check")
        targets = (
            Target(
                ("https",),
                made_up / "server.pem",
                made_up / "server.key",
                made_up / "ca.pem",
                made_up / "verifier.json",
            ),
            Target(("http",)),
        )
        try:
            for target in targets:
                self.render(target)
        except DriverError as exc:
            return f"{exc}; fix {self.section.key('template')} in {self.section.file}"
        return None

    def render(self, target: Target) -> bytes:
        try:
            template = string.Template(read_file(self.template_file).decode())
        except OSError as exc:
            raise DriverError(
                f"cannot read template {self.template_file}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            # (a ValueError the switch did not expect: not one line of why)
            raise DriverError(
                f"cannot read template {self.template_file}: not UTF-8 text"
            ) from None
        values = {
            "address": self.address,
            "app_path": self.app_path,
            "http_port": str(self.http_port),
            "https_port": str(self.https_port),
            "listen": json.dumps(list(target.schemes)),
            "scheme": "https" if "https" in target.schemes else target.schemes[0],
            **_scheme_switches(target.schemes),
            "cert_file": str(target.cert_file or ""),
            "key_file": str(target.key_file or ""),
            "ca_file": str(target.ca_file or ""),
            "auth_verifier_file": str(target.auth_verifier_file or ""),
        }
        try:
            return template.substitute(values).encode()
        except (KeyError, ValueError) as exc:
            raise DriverError(
                f"template {self.template_file}: unknown or bad placeholder {exc}"
            ) from None


def server_config_file(section: Section) -> Path:
    """``[server].config_file`` of the agent's config as it names it: a relative path joined
    to that config's directory, never resolved (``Section.path`` resolves it). A symbolic
    link named by a relative path was followed, and the agent replaced its target, in a
    directory it was never told of, while the same link named by its absolute path is refused
    (``config_link_problem``, review s64 M2): both are refused now (review s70 L4). Made
    absolute (never resolved): an agent config named by a relative path gave a path relative
    to the agent's working directory, which the staged files' paths written into the server's
    config and the journal took on (review s71 revplans)."""
    return Path(_as_named(section.file, section.text("config_file"))).absolute()


def _as_named(config_file: Path, value: str) -> str:
    """A file the config ``config_file`` names (``value``; "" for none), as a path the agent
    opens: relative to the config's directory, symbolic links left to the kernel."""
    if not value:
        return ""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else config_file.parent / path)


# The reference server's settings for https alone (its way back to http drops them).
HTTPS_ONLY = ("cert_file", "key_file", "client_ca_file", "require_client_cert")


def _reference_files(target: Target) -> tuple[tuple[str, Path | None], ...]:
    """The reference server's config keys for ``target``'s files, with their values."""
    return (
        ("cert_file", target.cert_file),
        ("key_file", target.key_file),
        ("client_ca_file", target.ca_file),
        ("auth_verifier_file", target.auth_verifier_file),
    )


def _scheme_switches(schemes: Sequence[str]) -> dict[str, str]:
    """``$http_enabled``/``$https_enabled`` and the comment prefixes ``$http_off``/``$https_off``
    for a template (see ``TemplateDriver``)."""
    values = {}
    for scheme in ("http", "https"):
        on = scheme in schemes
        values[f"{scheme}_enabled"] = "true" if on else "false"
        values[f"{scheme}_off"] = "" if on else "#"
    return values


MAX_COMMAND_OUTPUT = 1024 * 1024  # what is read of a command's stdout (a status's JSON)


async def _run(argv: Sequence[str], timeout: float, what: str, track: Path | None = None) -> str:
    """Run a command of the admin's (an exec driver's operation, ``systemctl restart``) and
    return its stdout (at most ``MAX_COMMAND_OUTPUT`` bytes); DriverError (one line) if it
    cannot run, fails or does not exit within ``timeout`` seconds; LocalResourceError for
    this machine's shortage. How it is run and bounded: ``clients.run_command``."""
    try:
        ran = await client_sources.run_command(argv, timeout, MAX_COMMAND_OUTPUT - 1, what, track)
    except client_sources.CommandFailed as exc:
        if exc.cause is not None:
            raise_if_local(exc.cause, f"{what}: running {argv[0]}")
        raise DriverError(f"{what}: {exc}") from None
    if ran.code != 0:
        raise DriverError(
            f"{what}: {argv[0]} exited {ran.code}" + (f": {ran.said}" if ran.said else "")
        )
    return ran.out.decode(errors="replace")


class SystemdDriver(_AdminSocketFreeze, TemplateDriver):
    name = "systemd"

    def __init__(self, section: Section, address: str, not_clients: Sequence[str] = ()) -> None:
        super().__init__(section, address)
        self.unit: str = section.text("unit")
        self.systemctl: str = section.text("systemctl", "systemctl")
        self.timeout: int = section.integer("timeout", 60, lo=1, hi=3600)
        self.admin = AdminSocketClient(section.path("admin_socket"), dir_owner=True)
        self.access_log = client_sources.access_log_clients(
            section, address, self.http_port, self.https_port, self.clients_window, not_clients
        )

    async def read_clients(self) -> ClientsView:
        """From the configured access log(s), read incrementally in a thread."""
        if self.access_log is None:
            return ClientsView()
        return await asyncio.to_thread(self.access_log.read)

    async def restart(self) -> None:
        """``systemctl restart UNIT``, then wait until the server answers. While it does not,
        the unit's state is read after each failed check (``unit_down``): a unit failed or
        inactive after its restart's job (a ``Type=simple`` or ``exec`` server that exits at
        once: its restart job succeeds all the same) ends the wait at once, naming the unit's
        result; before, the whole ``START_TIMEOUT`` (20 s) went by inside the freeze window,
        the server refusing new entries, before "did not come back" (session 69, smalls)."""
        await _run([self.systemctl, "restart", self.unit], self.timeout, "restart")
        await _wait_healthy(self, START_TIMEOUT, f"{self.unit} did not come back", self.unit_down)

    async def unit_down(self) -> str | None:
        """Why the unit is down for good now ("failed (failed, result exit-code)"), or None:
        it is active, activating (a ``Restart=`` pending: systemd starts it again), inactive
        after a run that succeeded (a oneshot starter: its server may come up later), or its
        state cannot be read (an old ``systemctl`` or a stand-in without ``show``: then only
        the server's answers count, as before)."""
        argv = [self.systemctl, "show", self.unit, f"--property={','.join(UNIT_STATE)}"]
        try:
            out = await _run(argv, min(self.timeout, UNIT_STATE_TIMEOUT), "unit state")
        except DriverError:
            return None
        state = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
        active = state.get("ActiveState", "")
        result = clean(state.get("Result", ""), 40) or "?"
        # Inactive after a run that ended well is no verdict: a ``Type=oneshot`` unit that
        # starts the server elsewhere (``docker compose up -d``) is so at once, its server
        # coming up a moment later (last read of session 69).
        if active != "failed" and (active != "inactive" or result == "success"):
            return None
        sub = clean(state.get("SubState", ""), 40) or "?"
        return (
            f"the unit is {active} ({sub}, result {result}) after its restart; "
            f"journalctl -u {self.unit} says why"
        )


class ExecDriver(TemplateDriver):
    """Every operation is a command from ``[server.commands]``; ``freeze`` and ``watermark``
    print the watermark, ``status`` prints a JSON object with ``frozen`` and ``watermark``
    (and ``started_at``: see ``TemplateDriver``)."""

    name = "exec"
    OPERATIONS = ("restart", "status", "freeze", "unfreeze")

    def __init__(self, section: Section, address: str, data_dir: Path | None = None) -> None:
        super().__init__(section, address)
        # Where each command is noted while it runs (``end_stale_commands``).
        self.running: Path | None = data_dir / "exec-running" if data_dir is not None else None
        commands = section.table("commands")
        self.commands = {op: commands.str_list(op) for op in self.OPERATIONS}
        for op, argv in self.commands.items():
            if not argv:
                raise commands.error(op, "must name a command")
        self.timeout: int = section.integer("timeout", 60, lo=1, hi=3600)
        # Optional: a command that prints the clients JSON (nodeagent.clients, README).
        self.clients_command: list[str] | None = commands.str_list("clients", None)
        if self.clients_command is not None and not self.clients_command:
            raise commands.error("clients", "must name a command")
        self.clients_timeout: int = section.integer(
            "clients_timeout", client_sources.DEFAULT_TIMEOUT, lo=1, hi=120
        )

    async def read_clients(self) -> ClientsView:
        if self.clients_command is None:
            return ClientsView()
        return await client_sources.exec_clients(
            self.clients_command, self.clients_timeout, self.clients_window
        )

    async def _op(self, op: str, timeout: float | None = None) -> str:
        return await _run(self.commands[op], timeout or self.timeout, op, self.running)

    def end_stale_commands(self) -> None:
        """A command an agent process before this one was running when it was killed (SIGKILL
        outside systemd: its commands, each in a session of its own, outlive it) is ended with
        its process group, so that the resumed step (a restart begun again) never overlaps it
        (session 69, journalm L). Under systemd the unit's ``KillMode=control-group`` ends them
        with the agent already."""
        if self.running is None:
            return
        for stale in client_sources.end_stale(self.running):
            log.warning(
                "exec.stale_command_killed",
                pid=stale.pid,
                detail="a command an earlier agent process left running was killed with its"
                " process group",
            )
            if stale.left:
                # The cause is named only where seen (state D): a slow end under load reads
                # the same otherwise (session 74's note, Open).
                stuck = client_sources.uninterruptible(stale.left)
                why = (
                    f"; {len(stuck)} of them in uninterruptible sleep (state D: waiting in the"
                    " kernel, on a hung disk or NFS mount, say)"
                    if stuck
                    else ""
                )
                log.warning(
                    "exec.stale_command_lingers",
                    pid=stale.pid,
                    left=list(stale.left),
                    uninterruptible=list(stuck),
                    detail=f"{len(stale.left)} process(es) of its group still ran"
                    f" {client_sources.KILL_WAIT:g} s after its SIGKILL{why}; the resumed step"
                    " runs all the same",
                    hint=f"see what holds them: ps -o pid,stat,wchan,args -g {stale.pid}",
                )

    async def restart(self) -> None:
        await self._op("restart")
        await _wait_healthy(self, START_TIMEOUT, "the server did not come back")

    async def status(self) -> dict[str, Any]:
        out = await self._op("status")
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            raise DriverError(f"status command printed no JSON: {out[:100]!r}") from None
        if not isinstance(data, dict):
            raise DriverError("status command must print a JSON object")
        return data

    async def freeze(self, drain_timeout: float) -> int:
        out = await self._op("freeze", drain_timeout + self.timeout)
        lines = out.strip().splitlines()
        # ASCII digits only: ``int()`` also took "1_000", "+5", " 7" and other scripts' digits
        # ("٣"), none of them a watermark a command prints (session 69, smalls).
        number = _watermark_text(lines[-1].strip()) if lines else None
        if number is None:
            raise DriverError(f"freeze command printed no watermark: {out[:100]!r}")
        return number

    async def unfreeze(self) -> None:
        await self._op("unfreeze")


def make_driver(
    section: Section, address: str, data_dir: Path, *, not_clients: Sequence[str] = ()
) -> Driver:
    """The driver named in the agent config's ``[server]`` table.

    A key of ``[server]`` (or ``[server.commands]``) the chosen driver does not read is a
    ConfigError, raised before the driver touches anything."""
    kind = section.text("driver", "reference")
    refresh: int = section.integer("clients_refresh", int(CLIENTS_TTL), lo=0, hi=3600)
    driver: Driver
    if kind == "reference":
        config_file = server_config_file(section)
        section.finish()
        driver = ReferenceDriver(config_file, data_dir / "refserver.log")
    elif kind == "systemd":
        driver = SystemdDriver(section, address, not_clients)
    elif kind == "exec":
        driver = ExecDriver(section, address, data_dir)
    else:
        raise section.error("driver", f"unknown driver {kind!r}: use reference, systemd or exec")
    section.finish()
    driver.clients_ttl = refresh
    return driver
