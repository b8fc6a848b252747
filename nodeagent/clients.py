"""Who the managed server has seen lately, for the drivers that cannot ask it directly.

    exec     ``[server.commands] clients``: a command the admin supplies that prints the JSON of
             ``tlsroll.clients`` on stdout (within ``clients_timeout`` seconds, at most 1 MiB)
    systemd  the server's access log(s): ``access_log_http`` and ``access_log_https`` (one log
             per scheme: the common log format says nothing about the scheme), or one
             ``access_log`` whose ``access_log_format`` carries the port or the scheme
             (``vhost_combined``, or a pattern with a ``port`` or ``scheme`` group)

A bad command, bad output or an unreadable log never raises: the view's ``problem`` says what
is wrong and the list is what could be read. Reading a log is incremental and bounded: the
first look reads at most the last ``TAIL_BYTES``, each later one what was appended since (at
most ``MAX_READ_BYTES``; more than that and the older part is skipped, and said so), following
a rotated or truncated log from its start. Blocking (files): call through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import re
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent import command_env
from tlsroll import clients, logs, peertext
from tlsroll.clients import ClientLog, ClientsView
from tlsroll.config import Section
from tlsroll.errors import TransientError

log = logs.get_logger(__name__)

TAIL_BYTES = 4 * 1024 * 1024  # the first look at a log
MAX_READ_BYTES = 4 * 1024 * 1024  # each later look
MAX_LINE_BYTES = 16 * 1024  # a longer line is no access log line
MAX_OUTPUT_BYTES = 1024 * 1024  # an exec command's stdout
DEFAULT_TIMEOUT = 10

_CLF = (
    r"(?P<address>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] \"(?P<request>[^\"]*)\" (?P<status>\d{3}) \S+"
    r"(?: \"[^\"]*\" \"(?P<agent>[^\"]*)\")?"
)
# The built-in formats. "common" also reads "combined" lines (nginx's and Apache's default).
# tlsroll's own probes are left out by their User-Agent where it is logged, and by their
# request line's ``?tlsroll-check=…`` in every format with a ``request`` group (the common
# log format has no User-Agent).
FORMATS = {
    "common": _CLF,
    "combined": _CLF,
    "vhost_combined": r"\S+?:(?P<port>\d+) " + _CLF,
}
CLF_TIME = "%d/%b/%Y:%H:%M:%S %z"


def one_line(text: object, limit: int = clients.MAX_PROBLEM) -> str:
    clean = " ".join("".join(ch if ch.isprintable() else " " for ch in str(text)).split())
    return clean[:limit]


# --- exec ---------------------------------------------------------------------------------------


KILL_WAIT = 5.0  # after SIGKILL: how long its end is waited for (a bound, not a pause)
ERROR_TAIL = 4096  # what is read of the end of a command's stderr, for its error's last line
ERROR_LINE = 1000  # characters of that line kept


@dataclass(frozen=True)
class Ran:
    """What a command of the admin's did (``run_command``): its exit code, its stdout up to
    the limit asked (one byte more, to tell it was over), and the last line it wrote to
    stderr (else stdout), cleaned for an error's one line."""

    code: int
    out: bytes
    said: str


class CommandFailed(TransientError):
    """A command that could not run (``cause``: the OSError, this machine's shortage maybe)
    or did not exit within its time; the message is one line without the caller's words."""

    def __init__(self, message: str, cause: OSError | None = None) -> None:
        super().__init__(message)
        self.cause = cause


async def run_command(
    argv: Sequence[str], timeout: float, limit: int, kind: str = "", track: Path | None = None
) -> Ran:
    """Run a command of the admin's (an exec driver's operation or ``clients`` command,
    ``systemctl restart``; ``kind``: which, for the log): ``Ran``, or CommandFailed if it
    cannot run or does not exit within ``timeout`` seconds. One runner for both (duplicates of
    session 64).

    Bounded by the command's own exit and nothing else (review s64 H1, H2, M1). A server a
    ``restart`` starts in the background (``nohup server &``, a vendor's ctl script) keeps the
    command's stdout and stderr: the agent must neither wait for their end (it waited for that
    server's end, not the command's: a restart that worked failed at its timeout) nor leave
    them unread (the server blocked writing its log) nor close them (SIGPIPE killed it). So
    each is a pipe the agent reads on the event loop as the command writes (``_Output``),
    keeping the first ``limit`` + 1 bytes of stdout and the last ``ERROR_TAIL`` of each; once
    the command has exited, what is left in it is read, and a pipe still held by such a server
    is read on and thrown away, on the event loop still, until the server lets go of it
    (``_Output.release``): never closed under it (review s66 rva M2: past a cap of 32 such
    pipes, which 16 ``status`` commands leaving a helper each filled, a restart's server was
    killed by SIGPIPE). They were temporary files, deleted at once: a server left writing on
    them filled the disk unseen, its file in no directory (review s66). The command runs in a
    session of its own, and all of it (a ``sh -c`` wrapper and the tool it runs) is killed when
    it times out and when the caller gives up on it: the heartbeat waits 2 s for a status, and
    a hung ``status`` left one process and two pipes behind at every beat; a wrapper's tool,
    killed only in its wrapper, froze the server after the way back had unfrozen it. What a
    command that exited left running is not ours to kill (a restart's server): README, the
    exec driver.

    ``track``: a directory where the command is noted while it runs (``note_running``: its
    pid, which is its process group's, and its start time), so that an agent killed meanwhile
    (SIGKILL, outside systemd) leaves a trace the next start ends it by (``end_stale``)."""
    what = kind or argv[0]
    if _left_held >= MAX_LEFT_HELD:  # (nothing closed: no new command, said in one line)
        raise CommandFailed(
            f"not run: processes earlier commands left running hold {_left_held} of their "
            "outputs, which the agent reads on (one descriptor each); give what they start an "
            "output of its own (a systemd unit, >/dev/null)"
        )
    loop = asyncio.get_running_loop()
    outputs: list[_Output] = []
    try:
        outputs.append(out := _Output(loop, limit + 1, "stdout"))
        outputs.append(err := _Output(loop, 0, "stderr"))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=out.write_fd,
                stderr=err.write_fd,
                start_new_session=True,
                env=command_env(),
            )
        except OSError as exc:
            raise CommandFailed(f"cannot run {argv[0]}: {exc.strerror or exc}", exc) from None
        finally:
            for output in outputs:  # the command's own now: its end (or its children's) is EOF
                output.close_write()
        noted = note_running(track, proc.pid) if track is not None else None
        try:
            async with asyncio.timeout(timeout):
                code = await proc.wait()
        except TimeoutError:
            _kill(proc)
            # (a command stuck in the kernel, on a hung NFS mount, may outlive SIGKILL: the
            # step ends all the same; the event loop's child watcher reaps it later)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_WAIT):
                    await proc.wait()
            raise CommandFailed(f"{argv[0]} did not finish within {timeout:g}s") from None
        except BaseException:  # cancelled (the agent stops): no command is left behind
            _kill(proc)
            # ... and it is reaped (bounded) before its pipes close: a process object dropped
            # while it ran warned, unreaped, at the loop's end
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(KILL_WAIT):
                    await asyncio.shield(proc.wait())
            raise
        finally:
            if noted is not None and proc.returncode is not None:
                with contextlib.suppress(OSError):
                    noted.unlink(missing_ok=True)
        # All it wrote before it exited is in the pipes: read what the loop has not yet.
        out.read_now()
        err.read_now()
        printed = bytes(out.head)
        said = (_last_line(err.tail) or _last_line(out.tail)) if code != 0 else ""
    except OSError as exc:  # the pipes: this machine short of descriptors
        raise CommandFailed(f"cannot run {argv[0]}: {exc.strerror or exc}", exc) from None
    finally:
        for output in outputs:
            output.release(what)
    return Ran(code, printed, said)


CHUNK = 64 * 1024  # one read of a command's pipe
MAX_LEFT_HELD = 1024
"""Outputs of commands that exited, still held by what they left running, read on and thrown
away on the event loop (``_Output.release``): one descriptor each, no thread. None is ever
closed under its writer (SIGPIPE would kill a restart's server); past this many at once, a
further command is not run (``CommandFailed``, one line), which keeps the agent's own
descriptors (``LimitNOFILE=4096`` in its unit) for its journal, the leader and the server.
A ``status`` that leaves a process behind at each heartbeat is the admin's to mend: said once
per kind of command (``exec.output_held``) and again as the count doubles from
``HELD_WARN_FROM`` (``exec.outputs_held``)."""
HELD_WARN_FROM = 32
_left_held = 0  # (the event loop's only: counted and read there)
_held_warn_at = HELD_WARN_FROM
_kinds_warned: set[str] = set()


def _held_one_more(what: str, output: str) -> None:
    """Count one output more left held by what a ``what`` command started, and say so: once
    per kind of command, and as the count passes each doubling from ``HELD_WARN_FROM``."""
    global _left_held, _held_warn_at  # noqa: PLW0603 - one count for the whole agent
    _left_held += 1
    if what not in _kinds_warned:
        _kinds_warned.add(what)
        log.warning(
            "exec.output_held",
            command=what,
            output=output,
            detail=f"a process the {what} command started keeps its {output}: the agent reads "
            "it on and throws it away until that process closes it (one descriptor each); "
            "give it its own output (a systemd unit, >/dev/null)",
        )
    if _left_held >= _held_warn_at:
        _held_warn_at *= 2
        log.warning(
            "exec.outputs_held",
            held=_left_held,
            most=MAX_LEFT_HELD,
            detail="outputs of commands that exited are held by processes they left running; "
            f"past {MAX_LEFT_HELD} no further command is run: give what they start an output "
            "of its own (a systemd unit, >/dev/null)",
        )


def _held_one_less() -> None:
    global _left_held, _held_warn_at  # noqa: PLW0603 - one count for the whole agent
    _left_held -= 1
    if _left_held < _held_warn_at // 4 and _held_warn_at > HELD_WARN_FROM:
        _held_warn_at //= 2  # (said again if it grows again; not at each one up and down)


class _Output:
    """One of a command's outputs (``name``: stdout, stderr): a pipe whose write end the
    command gets, its read end read on the event loop as the command writes (never full, so
    never blocking it), keeping the first ``keep`` bytes (``head``) and the last
    ``ERROR_TAIL`` (``tail``); once released while still held (``discard``), read and thrown
    away until its end, then closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keep: int, name: str) -> None:
        self.loop = loop
        self.keep = keep
        self.name = name
        self.head = bytearray()
        self.tail = bytearray()
        self.ended = False
        self.discard = False
        read_fd, self.write_fd = os.pipe()  # (close-on-exec: no other command gets them)
        self.read_fd: int | None = read_fd
        try:
            os.set_blocking(read_fd, False)
            loop.add_reader(read_fd, self._read_some)
        except BaseException:
            os.close(read_fd)
            os.close(self.write_fd)
            raise

    def close_write(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def _read_some(self, most: int = CHUNK) -> int:
        """One read of at most ``most`` bytes of what is in the pipe: how many were read, 0
        when nothing is there now or it ended (every writer let go of it: ``ended``; a
        discarded one is closed then)."""
        if self.ended or self.read_fd is None:
            return 0
        try:
            chunk = os.read(self.read_fd, most)
        except BlockingIOError:
            return 0
        except OSError:
            chunk = b""
        if not chunk:
            self.ended = True
            self.loop.remove_reader(self.read_fd)
            if self.discard:
                os.close(self.read_fd)
                self.read_fd = None
                _held_one_less()
            return 0
        if self.discard:
            return len(chunk)
        if (room := self.keep - len(self.head)) > 0:
            self.head += chunk[:room]
        self.tail += chunk
        del self.tail[:-ERROR_TAIL]
        return len(chunk)

    def read_now(self) -> None:
        """What is in the pipe now (once the command has exited, all it wrote is there), and
        whether that is its end; bounded by what is there now (``FIONREAD``), whatever a
        process the command left running goes on writing."""
        if self.ended or self.read_fd is None:
            return
        left = _in_pipe(self.read_fd)
        while left > 0 and (got := self._read_some(min(left, CHUNK))):
            left -= got
        self._read_some()  # its end, if every writer let go of it (or what came meanwhile)

    def release(self, what: str) -> None:
        """Done with it (``what``: the command's kind, for the log): closed if it ended (or
        the command never ran); else something the command left running still holds it (a
        restart's server on its stdout), and it is read on and thrown away on the event loop
        until that lets go: neither blocked nor killed by SIGPIPE, and nothing kept
        (``MAX_LEFT_HELD``)."""
        self.close_write()
        self.read_now()  # (a command killed with everything it started: its end is there)
        if self.read_fd is None or self.discard:
            return
        if self.ended:
            os.close(self.read_fd)
            self.read_fd = None
            return
        self.discard = True  # (its reader stays: from now on it throws away what it reads)
        self.head, self.tail = bytearray(), bytearray()
        _held_one_more(what, self.name)


def _in_pipe(fd: int) -> int:
    """How many bytes wait in the pipe ``fd`` (0 if that cannot be told)."""
    try:
        said = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return max(0, int(struct.unpack("i", said)[0]))


def _last_line(tail: bytes | bytearray) -> str:
    """The last line of a command's output's ``tail`` (its last ``ERROR_TAIL`` bytes), cleaned
    for an error's one line, whole as far as ``ERROR_LINE`` (systemctl's "Job for … failed:
    <the server's own config error>" says what to fix at its end)."""
    lines = bytes(tail).decode(errors="replace").strip().splitlines()
    return peertext.clean(lines[-1], ERROR_LINE) if lines else ""


def _stat_fields(stat: bytes) -> list[str]:
    """The fields of a ``/proc/PID/stat`` after the process's name (state, ppid, pgrp, ...).
    The name, in parentheses, may hold spaces and parentheses (the last ")" ends it), and any
    bytes: a name cut at 15 bytes in a character's middle is not UTF-8, so the file is read
    as bytes (read as text, any such process on the host made the agent's start fail)."""
    return stat[stat.rfind(b")") + 2 :].decode("ascii", "replace").split()


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (this boot's id and ``/proc/PID/stat``'s starttime, in
    clock ticks since boot: with the pid, it names one process, never a later one given the
    same pid), or None if it is gone, a zombie, or this system has no such file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = _stat_fields(stat)
    if len(fields) < 20 or fields[0] == "Z":
        return None
    try:  # this boot's: ticks since boot name a process only within one boot
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{boot} {fields[19]}"


def note_running(track: Path, pid: int) -> Path | None:
    """A command just started as ``pid`` (its process group's leader) noted in ``track``
    (blocking, small: a file named by the pid holding its start time; no fsync: a crash of the
    machine ends the command too). None if it cannot be noted (a full disk, no /proc): the
    command runs all the same, untracked."""
    started = _start_time(pid)
    if started is None:
        return None
    path = track / str(pid)
    try:
        track.mkdir(mode=0o700, exist_ok=True)
        path.write_text(started)
    except OSError:
        return None
    return path


@dataclass(frozen=True)
class Stale:
    """A command an earlier agent process left running, ended by ``end_stale``: its pid (its
    process group's), and the pids of that group still alive when the wait for it ended (none:
    the whole group is gone)."""

    pid: int
    left: tuple[int, ...] = ()


def group_alive(pgid: int) -> tuple[int, ...]:
    """The pids of process group ``pgid``'s members that still run (``/proc``; a zombie, which
    can no longer act, is not one): empty when the group is gone, or this system has no
    ``/proc``. ``os.killpg(pgid, 0)`` would not do: it succeeds while a member is a zombie
    its new parent has not reaped yet."""
    alive: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return ()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:  # (gone meanwhile)
            continue
        fields = _stat_fields(stat)  # state, ppid, pgrp, ...
        if len(fields) > 2 and fields[0] != "Z" and fields[2] == str(pgid):
            alive.append(int(entry))
    return tuple(sorted(alive))


def uninterruptible(pids: Iterable[int]) -> tuple[int, ...]:
    """Those of ``pids`` in uninterruptible sleep now (state ``D`` in ``/proc/PID/stat``: in
    the kernel, waiting for a disk or a mount, deaf to SIGKILL meanwhile); one gone or
    unreadable is not one."""
    found: list[int] = []
    for pid in pids:
        try:
            fields = _stat_fields(Path(f"/proc/{pid}/stat").read_bytes())
        except OSError:
            continue
        if fields and fields[0] == "D":
            found.append(pid)
    return tuple(found)


def end_stale(track: Path, wait: float = KILL_WAIT) -> list[Stale]:
    """At the agent's start (blocking; before any command of its own runs): each command an
    earlier agent process noted in ``track`` and that still runs (the same pid and start time:
    that process was killed while the command ran) is ended with SIGKILL to its whole process
    group, as a command the agent gives up on is, and the end of that whole group waited for
    (``wait`` seconds at most): a child of the command (a ``sh -c`` wrapper's tool) that its
    SIGKILL had not ended yet when the command itself was gone could overlap the resumed step
    (session 73's CI read one alive). The notes are removed. A noted command that has exited
    is not touched, nor what it left running (a restart's server). Returns those killed, each
    with what of its group was still alive when the wait ended (``Stale.left``)."""
    killed: list[Stale] = []
    try:
        notes = list(track.iterdir())
    except OSError:
        return killed
    for note in notes:
        with contextlib.suppress(OSError, ValueError):
            pid, started = int(note.name), note.read_text().strip()
            if pid > 1 and started and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                deadline = time.monotonic() + wait
                # (a session leader's group: the command is in it till its end, as is every
                # child that did not move to a group of its own)
                while (left := group_alive(pid)) and time.monotonic() < deadline:
                    time.sleep(0.02)
                killed.append(Stale(pid, left))
        with contextlib.suppress(OSError):
            note.unlink(missing_ok=True)
    return killed


def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL to a command's whole session (``start_new_session``: its process group): the
    command and whatever it started that is still in the group."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # one that moved to a group of its own
            proc.kill()


async def exec_clients(argv: Sequence[str], timeout: float, window: int) -> ClientsView:
    """Run the admin's ``clients`` command and read its JSON (``tlsroll.clients``)."""
    now = dt.datetime.now(dt.UTC)
    try:
        ran = await run_command(argv, timeout, MAX_OUTPUT_BYTES, "clients")
    except CommandFailed as exc:
        return ClientsView(
            window_seconds=window, source="exec", problem=one_line(f"clients: {exc}")
        )
    code, out = ran.code, ran.out
    if code != 0:
        why = f"clients: {argv[0]} exited {code}" + (f": {ran.said}" if ran.said else "")
        return ClientsView(window_seconds=window, source="exec", problem=one_line(why))
    if len(out) > MAX_OUTPUT_BYTES:
        why = f"clients: {argv[0]} printed more than {MAX_OUTPUT_BYTES // 1024} KiB"
        return ClientsView(window_seconds=window, source="exec", problem=why)
    try:
        seen, own_window, problem = clients.from_json(out)
    except ValueError as exc:
        why = f"clients: {argv[0]} printed no clients JSON: {exc}"
        return ClientsView(window_seconds=window, source="exec", problem=one_line(why))
    window = own_window or window
    kept = clients.recent(seen, now, dt.timedelta(seconds=window), clients.MAX_REPORTED)
    return ClientsView(tuple(kept), window, "exec", one_line(problem))


# --- access logs --------------------------------------------------------------------------------


@dataclass
class LogTail:
    """New complete lines of one log file since the last look (see the module docstring)."""

    path: Path
    where: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read so far
    offset: int = 0

    def read(self) -> tuple[list[bytes], str]:
        """(new lines, problem)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return [], f"access log {self.path}: no such file"
        except OSError as exc:
            return [], f"access log {self.path}: {exc.strerror}"
        problem = ""
        where = (st.st_dev, st.st_ino)
        if self.where is None:  # the first look: only its tail
            self.offset = max(0, st.st_size - TAIL_BYTES)
        elif where != self.where or st.st_size < self.offset:  # rotated or truncated
            self.offset = 0
        self.where = where
        if st.st_size - self.offset > MAX_READ_BYTES:
            skipped = st.st_size - MAX_READ_BYTES - self.offset
            problem = f"access log {self.path}: skipped {skipped} bytes written too fast to read"
            self.offset = st.st_size - MAX_READ_BYTES
        if st.st_size <= self.offset:
            return [], problem
        try:
            with open(self.path, "rb") as f:
                mid_line = False
                if self.offset > 0:  # inside a line unless the byte before is its end
                    f.seek(self.offset - 1)
                    mid_line = f.read(1) != b"\n"
                data = f.read(min(st.st_size - self.offset, MAX_READ_BYTES))
        except OSError as exc:
            return [], f"access log {self.path}: {exc.strerror}"
        end = data.rfind(b"\n")
        if end < 0:  # no complete line yet (or one longer than we read: skip it)
            if len(data) >= MAX_READ_BYTES:
                self.offset += len(data)
            return [], problem
        self.offset += end + 1
        lines = data[: end + 1].split(b"\n")[:-1]
        if mid_line:  # we started inside a line: its rest is no line
            lines = lines[1:]
        return [ln for ln in lines if len(ln) <= MAX_LINE_BYTES], problem


def _parse_time(text: str) -> dt.datetime:
    """A log line's time in UTC; ValueError (the line is left out) if it is none, also for a
    date at the very edge of the calendar that cannot be moved to UTC (OverflowError)."""
    try:
        try:
            return dt.datetime.strptime(text, CLF_TIME).astimezone(dt.UTC)
        except ValueError:
            at = dt.datetime.fromisoformat(text)
            if at.tzinfo is None:
                raise ValueError("no time zone") from None
            return at.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{text[:40]!r} is out of range") from None


@dataclass
class AccessLogClients:
    """The clients a server's access log(s) show (the systemd driver's ``clients``)."""

    logs: list[tuple[LogTail, str | None]]  # (the log, its scheme; None: from each line)
    pattern: re.Pattern[str]
    http_port: int
    https_port: int
    window: int = clients.WINDOW_SECONDS
    ignore: frozenset[str] = frozenset()
    seen: ClientLog = field(init=False)

    def __post_init__(self) -> None:
        self.seen = ClientLog(self.window)

    def _scheme(self, groups: dict[str, str | None], fixed: str | None) -> str | None:
        if fixed is not None:
            return fixed
        if groups.get("scheme"):
            scheme = str(groups["scheme"]).lower()
            return scheme if scheme in clients.SCHEMES else None
        port = groups.get("port")
        if port == str(self.https_port):
            return "https"
        if port == str(self.http_port):
            return "http"
        return None  # another port of the same server: not the application

    def read(self) -> ClientsView:
        """Blocking: read what the logs gained and return the view."""
        problems: list[str] = []
        for tail, fixed in self.logs:
            lines, problem = tail.read()
            if problem:
                problems.append(problem)
            bad, first_bad = 0, ""
            for raw in lines:
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                try:
                    self._record(line, fixed)
                except ValueError as exc:
                    bad += 1
                    first_bad = first_bad or f"{exc}: {line[:60]!r}"
            if bad:
                problems.append(
                    f"access log {tail.path}: {bad} lines not in access_log_format "
                    f"(first: {first_bad})"
                )
        recent = self.seen.view(dt.datetime.now(dt.UTC))
        return ClientsView(tuple(recent), self.window, "access-log", one_line("; ".join(problems)))

    def _record(self, line: str, fixed: str | None) -> None:
        if not line.strip():
            return
        m = self.pattern.match(line)
        if m is None:
            raise ValueError("no match")
        groups = m.groupdict()
        request = groups.get("request")
        if clients.is_probe(groups.get("agent")) or clients.is_probe_request(request):
            return  # tlsroll's own check (by its User-Agent, or its request line where no
            # User-Agent is logged: the common log format, session 75 probemark)
        if clients.no_request(request):
            return  # a connection that sent no request ("-": Apache's 408), no client's
        try:
            address = str(ipaddress.ip_address(groups.get("address") or ""))
        except ValueError:
            raise ValueError("the client is not an IP address") from None
        if address in self.ignore:
            return
        scheme = self._scheme(groups, fixed)
        if scheme is None:
            return
        at = _parse_time(groups.get("time") or "")
        workstation = clients.workstation_name(groups.get("workstation"))
        self.seen.record(scheme, address, workstation, at)


def access_log_clients(
    section: Section,
    address: str,
    http_port: int,
    https_port: int,
    window: int,
    not_clients: Sequence[str] = (),
) -> AccessLogClients | None:
    """The systemd driver's access-log settings (ConfigError, one line, on a bad one); None
    when no log is configured. ``clients_ignore`` defaults to the node's own ``address`` and
    ``not_clients`` (the leader's: its confirm step checks http from outside, and the common
    log format has no User-Agent to tell its probes by)."""
    single: Path | None = section.path("access_log", None)
    per_scheme = {scheme: section.path(f"access_log_{scheme}", None) for scheme in clients.SCHEMES}
    fmt: str = section.text("access_log_format", "common")
    ignore = section.str_list("clients_ignore", [address, *not_clients])
    if single is None and not any(per_scheme.values()):
        if section.has("access_log_format"):
            raise section.error("access_log_format", "needs access_log or access_log_http/https")
        return None
    if single is not None and any(per_scheme.values()):
        raise section.error("access_log", "use either access_log or access_log_http/https")
    text = FORMATS.get(fmt, fmt)
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise section.error("access_log_format", f"not a known format or regex: {exc}") from None
    names = set(pattern.groupindex)
    if not {"address", "time"} <= names:
        raise section.error(
            "access_log_format",
            "a pattern needs the groups (?P<address>…) and (?P<time>…) "
            "(or use common, combined, vhost_combined)",
        )
    if single is not None and not names & {"port", "scheme"}:
        raise section.error(
            "access_log",
            f"the format {fmt[:40]!r} does not say the scheme: use access_log_http and "
            "access_log_https, or a format with the port (vhost_combined) or a (?P<scheme>…) group",
        )
    for i, item in enumerate(ignore):
        try:
            ipaddress.ip_address(item)
        except ValueError:
            raise section.error(f"clients_ignore[{i}]", f"{item!r} is not an IP address") from None
    if single is not None:
        logs: list[tuple[LogTail, str | None]] = [(LogTail(single), None)]
    else:
        logs = [(LogTail(p), s) for s, p in per_scheme.items() if p is not None]
    return AccessLogClients(
        logs,
        pattern,
        http_port,
        https_port,
        window,
        frozenset(str(ipaddress.ip_address(a)) for a in ignore),
    )
