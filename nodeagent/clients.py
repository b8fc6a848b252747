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
import ipaddress
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlsroll import clients
from tlsroll.clients import ClientLog, ClientsView
from tlsroll.config import Section

TAIL_BYTES = 4 * 1024 * 1024  # the first look at a log
MAX_READ_BYTES = 4 * 1024 * 1024  # each later look
MAX_LINE_BYTES = 16 * 1024  # a longer line is no access log line
MAX_OUTPUT_BYTES = 1024 * 1024  # an exec command's stdout
DEFAULT_TIMEOUT = 10

_CLF = (
    r"(?P<address>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] \"(?P<request>[^\"]*)\" (?P<status>\d{3}) \S+"
    r"(?: \"[^\"]*\" \"(?P<agent>[^\"]*)\")?"
)
# The built-in formats. "common" also reads "combined" lines (nginx's and Apache's default),
# whose User-Agent lets tlsroll's own probes be left out.
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


async def run_bounded(argv: Sequence[str], timeout: float, limit: int) -> tuple[int, bytes, bytes]:
    """(exit code, stdout up to ``limit + 1`` bytes, stderr up to its last 4 KiB); RuntimeError
    (one line) if it cannot run or does not finish within ``timeout`` seconds (it is killed).

    Bounded by the command's own exit, its output in temporary files, not pipes, as the exec
    driver's operations (``drivers._run``): with pipes, a child that left the command's session
    (setsid, a daemon forking away) and kept them open held the agent's clients refresh, after
    the timeout's kill, for as long as it lived (the exec helper of session 64)."""
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as exc:
                raise RuntimeError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
            try:
                async with asyncio.timeout(timeout):
                    code = await proc.wait()
            except TimeoutError:
                _kill(proc)
                with contextlib.suppress(TimeoutError):  # (one stuck in the kernel: reaped later)
                    async with asyncio.timeout(KILL_WAIT):
                        await proc.wait()
                raise RuntimeError(f"{argv[0]} did not finish within {timeout:g}s") from None
            except BaseException:  # cancelled (the agent stops): no command is left behind
                _kill(proc)
                # ... and it is reaped (bounded) before its temporary files close: a process
                # object dropped while it ran warned, unreaped, at the loop's end
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(KILL_WAIT):
                        await asyncio.shield(proc.wait())
                raise
            printed = os.pread(out.fileno(), limit + 1, 0)
            size = os.fstat(err.fileno()).st_size
            said = os.pread(err.fileno(), ERROR_TAIL, max(0, size - ERROR_TAIL))
    except OSError as exc:  # the temporary files: this machine short of room or descriptors
        raise RuntimeError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    return code, printed, said


ERROR_TAIL = 4096  # the end of what a command wrote to stderr, for its error's last line


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # its own session: children go too
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # one that moved to a group of its own
            proc.kill()


async def exec_clients(argv: Sequence[str], timeout: float, window: int) -> ClientsView:
    """Run the admin's ``clients`` command and read its JSON (``tlsroll.clients``)."""
    now = dt.datetime.now(dt.UTC)
    try:
        code, out, err = await run_bounded(argv, timeout, MAX_OUTPUT_BYTES)
    except RuntimeError as exc:
        return ClientsView(
            window_seconds=window, source="exec", problem=one_line(f"clients: {exc}")
        )
    if code != 0:
        last = (err or out).decode(errors="replace").strip().splitlines()
        why = f"clients: {argv[0]} exited {code}" + (f": {last[-1]}" if last else "")
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
        if clients.is_probe(groups.get("agent")):
            return  # tlsroll's own check
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
