"""What the process benchmarks share: loopback addresses of their own, readings of a process
from /proc (CPU, RSS, open files), the figures' summary (median and spread) and the leader's
admin calls a benchmark makes (start a rollout, read its schema), and the context switches of
a process's threads over a window (``Switches``).

Addresses: the tests take 127.100–249.x.x (``tests/conftest.py``); a benchmark takes
127.250.(slot*10 + i // 250).(i % 250 + 1), the slot being ``TLSROLL_TEST_SLOT`` (0–24), so a
benchmark never collides with a test run, nor with another checkout's benchmark.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tlsroll import password
from tlsroll.v1 import admin_pb2, schema_pb2, schema_pb2_grpc, types_pb2

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
# asyncio's debug mode and the tests' loop thread check (tests/loop_checks) cost CPU; a
# benchmark measures the daemons as they run in production.
NO_DEBUG = {"PYTHONASYNCIODEBUG": "", "TLSROLL_LOOP_CHECKS": ""}
TERMINAL = {
    types_pb2.ROLLOUT_STATE_COMPLETED,
    types_pb2.ROLLOUT_STATE_HALTED,
    types_pb2.ROLLOUT_STATE_ABORTED,
}


def slot() -> int:
    value = os.environ.get("TLSROLL_TEST_SLOT", "0")
    return int(value) % 25 if value.isdigit() else 0


def address(i: int) -> str:
    """The ``i``-th benchmark address of this slot (i ≥ 0)."""
    return f"127.250.{slot() * 10 + i // 250}.{i % 250 + 1}"


# --- one process, from /proc ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used so far (utime + stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def fine_cpu_seconds(pid: int) -> float:
    """User + system CPU the process's live threads have used so far, to the nanosecond (the
    first field of /proc/PID/task/TID/schedstat, summed): ``cpu_seconds`` counts clock ticks
    (10 ms), too coarse for a window of a few seconds of a process that is mostly idle (a
    10 s window of an idle leader read 0, 10 or 20 ms: 0, 1 or 2 ms/s). A thread that ended
    takes its time along, so this is for windows in which the threads stay (the leader's idle
    ones: its worker and gRPC threads live on)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # the thread ended meanwhile
            continue
    return total / 1e9


def rss_mib(pid: int) -> float:
    """Resident memory now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def crypto_workers(pid: int) -> list[int]:
    """The crypto worker children (``nodeagent.cryptoworker``) agent ``pid`` runs now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            ours = int(fields[1]) == pid and fields[0] != "Z"
            if ours and b"cryptoworker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


PROCESS_KINDS = (
    ("cryptoworker_child", "crypto worker"),
    ("refserver", "reference server"),
    ("agent", "agent"),
    ("leader", "leader"),
    ("bench", "bench"),
)
"""A process's kind by its program (its command line up to its first ``--`` option, so that a
path under the benchmark's ``tlsroll-bench-…`` directory does not count): the first kind whose
marker it holds. The crypto worker's code names its module, a reference server's is ``-m
refserver``, an agent's ``tlsroll-agent`` (or ``-m nodeagent.daemon``), the leader's
``tlsroll-leader``, this benchmark's ``-m bench.…``."""


def process_kind(cmdline: bytes) -> str | None:
    """``PROCESS_KINDS``' name for a process of the benchmark's, None for any other."""
    args = cmdline.decode(errors="replace").split("\0")
    program = " ".join(itertools.takewhile(lambda a: not a.startswith("--"), args))
    return next((kind for marker, kind in PROCESS_KINDS if marker in program), None)


THIS_NODE = " (this node)"
"""``CpuByKind.in_window``'s suffix for the kinds of the one node named."""


class CpuByKind:
    """The CPU (utime + stime, clock ticks) of the benchmark's processes by kind
    (``process_kind``), sampled every ``every`` seconds by a thread while the ``with`` block
    runs, so that what each kind used inside a window of wall-clock time (``in_window``) can be
    read afterwards: what ran beside a reference server's restart. Only this process and its
    descendants count (another session's daemons on the machine do not); a process is known by
    its pid and start time (a pid used again is another process), and its kind is read again
    over its first ``SETTLE`` samples (a child caught between fork and exec shows its parent's
    command line). This process counts as "bench" without the sampler's own thread: the
    writer, and the bare restarts' poll. A process begun inside a window counts from 0 (the
    restarted server's whole start), one that ended inside it up to its last sample.
    Resolution: a sample interval at each end of a window, 10 ms clock ticks. The sampler
    itself takes about a tenth of a core at 20 ms with some 25 processes, on the cores the
    restarts use: a run with it compares with no other run."""

    SETTLE = 5

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.me = os.getpid()
        self.kinds: dict[tuple[int, int], str | None] = {}
        self.seen: dict[tuple[int, int], int] = {}  # samples so far
        self.ours: dict[tuple[int, int], bool] = {}  # this process or a descendant
        self.series: dict[tuple[int, int], list[tuple[float, int]]] = {}
        self.parents: dict[tuple[int, int], int] = {}  # each process's parent pid
        self.span: tuple[float, float] | None = None  # first and last sample times
        self._sampler_tid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _stat(pid: int) -> list[str] | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None

    def _descends(self, pid: int, ppid: int) -> bool:
        """``pid`` is this process or below it (its parents read from /proc, up to pid 1)."""
        seen: set[int] = set()
        while pid not in (0, 1) and pid not in seen:
            if pid == self.me:
                return True
            seen.add(pid)
            fields = self._stat(ppid)
            pid, ppid = ppid, int(fields[1]) if fields else 0
        return False

    def _own_ticks(self) -> int:
        """This process's threads but the sampler's (threads that ended take theirs along)."""
        total = 0
        for tid in os.listdir(f"/proc/{self.me}/task"):
            if int(tid) == self._sampler_tid:
                continue
            try:
                fields = Path(f"/proc/{self.me}/task/{tid}/stat").read_text().rsplit(")", 1)[1]
                total += int(fields.split()[11]) + int(fields.split()[12])
            except (OSError, IndexError, ValueError):
                continue
        return total

    def _sample(self) -> None:
        now = time.time()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            fields = self._stat(pid)
            if fields is None:  # gone meanwhile
                continue
            key = (pid, int(fields[19]))  # its start time: a pid used again is another key
            if key not in self.ours:
                self.ours[key] = self._descends(pid, int(fields[1]))
            if not self.ours[key]:
                continue
            count = self.seen[key] = self.seen.get(key, 0) + 1
            self.parents[key] = int(fields[1])
            if pid == self.me:
                self.kinds[key] = "bench"
                ticks = self._own_ticks()
            else:
                if count <= self.SETTLE:
                    with contextlib.suppress(OSError):
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                        self.kinds[key] = process_kind(cmdline)
                if self.kinds.get(key) is None:
                    continue
                ticks = int(fields[11]) + int(fields[12])
            self.series.setdefault(key, []).append((now, ticks))
        self.span = (self.span[0] if self.span else now, now)

    def _run(self) -> None:
        self._sampler_tid = threading.get_native_id()
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> CpuByKind:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="cpu-by-kind", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()

    def covers(self, start: float, end: float) -> bool:
        """The window lies inside the sampled span (otherwise ``in_window`` would count every
        process alive before the first sample as begun inside it)."""
        return self.span is not None and self.span[0] <= start and end <= self.span[1]

    def in_window(self, start: float, end: float, mine: Collection[int] = ()) -> dict[str, float]:
        """CPU seconds by kind between wall-clock times ``start`` and ``end``: each process's
        last sample at or before ``end`` less its last one at or before ``start`` (0 if it
        began after ``start``). ``mine``: the pids of one node's processes (its agent, the
        server the benchmark started for it); they and their children (the crypto worker, the
        server the agent starts) count apart, under their kind with " (this node)"."""
        used: dict[str, float] = {}
        for key, points in self.series.items():
            kind = self.kinds.get(key)
            if kind is None:
                continue
            if mine and (key[0] in mine or self.parents.get(key) in mine):
                kind += THIS_NODE
            before = [ticks for t, ticks in points if t <= start]
            until = [ticks for t, ticks in points if t <= end]
            if not until:
                continue
            ticks = until[-1] - (before[-1] if before else 0)
            if ticks:
                used[kind] = used.get(kind, 0.0) + ticks / CLK_TCK
        return used


def restart_windows(*logs: Path) -> list[tuple[float, float]]:
    """The restarts a reference server's JSON log lines record (``logs``: the files its
    successive processes wrote, in any order): each ``server.stopping`` to the next
    ``server.started``, as wall-clock times."""
    events: list[tuple[float, str]] = []
    for log in logs:
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(line)
                    if event["event"] in ("server.stopping", "server.started"):
                        stamp = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                        events.append((stamp.timestamp(), event["event"]))
    windows: list[tuple[float, float]] = []
    stopping: float | None = None
    for at, event in sorted(events):
        if event == "server.stopping":
            stopping = at
        elif stopping is not None:
            windows.append((stopping, at))
            stopping = None
    return windows


def open_files(pid: int) -> int:
    """Open file descriptors now (sockets included)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_links(pid: int) -> list[str]:
    """What each of the process's open file descriptors points at (those that close while
    read are left out)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return links


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the process's open sockets (as /proc/PID/net/* names them)."""
    return {link[8:-1] for link in fd_links(pid) if link.startswith("socket:[")}


def fd_kinds(pid: int) -> dict[str, int]:
    """The process's open file descriptors by kind: ``socket``, ``pipe``, ``anon_inode:…``
    (eventfd, epoll, …) or ``file``, most first."""
    found: dict[str, int] = {}
    for link in fd_links(pid):
        kind = link.split(":[", 1)[0] if ":[" in link else ("file" if link[:1] == "/" else link)
        found[kind] = found.get(kind, 0) + 1
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def socket_ends(pid: int) -> dict[str, int]:
    """The process's TCP sockets by what they are: ``in:PORT`` (accepted on its port PORT),
    ``out:PORT`` (connected to a peer's port PORT), ``listen``, or ``tcp:STATE`` (another
    state, in /proc's hex), and ``other`` (Unix sockets and the like), most first."""
    inodes = socket_inodes(pid)
    found: dict[str, int] = {}
    listening: set[int] = set()
    rows = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] == "0A":
                listening.add(local)
            rows.append((fields[9], local, remote, fields[3]))
    for inode, local, remote, state in rows:
        inodes.discard(inode)
        if state == "0A":
            kind = "listen"
        elif state != "01":
            kind = f"tcp:{state}"
        elif local in listening:
            kind = f"in:{local}"
        else:
            kind = f"out:{remote}"
        found[kind] = found.get(kind, 0) + 1
    if inodes:
        found["other"] = len(inodes)
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def sent_bytes(address: str, port: int) -> int | None:
    """Bytes sent so far on the established TCP connections whose local end is
    ``address:port`` (``ss``'s ``bytes_sent``, summed; None without ``ss``): what a server
    wrote to its clients over connections that stay open (a closed one takes its count)."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( src {address}:{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum(int(m) for m in re.findall(r"bytes_sent:(\d+)", out))


def inbound_connections(pid: int, port: int) -> int:
    """The process's open TCP connections accepted on ``port`` (established, from
    /proc/PID/net/tcp*, matched to its socket descriptors by inode)."""
    mine = socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in mine:
                count += 1
    return count


@dataclass(frozen=True)
class Reading:
    cpu: float
    rss: float
    files: int

    @classmethod
    def of(cls, pid: int) -> Reading:
        return cls(cpu_seconds(pid), rss_mib(pid), open_files(pid))


def task_cpu_ns(pid: int) -> dict[int, int]:
    """Each thread's CPU so far, in ns (the first field of /proc/PID/task/TID/schedstat, as
    ``fine_cpu_seconds``)."""
    found: dict[int, int] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # the thread ended meanwhile
            continue
    return found


def task_switches(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread's context switches so far: tid → (voluntary, involuntary), from
    /proc/PID/task/TID/status (/proc/PID/status counts the main thread's only)."""
    found: dict[int, tuple[int, int]] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        vol = invol = 0
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol = int(line.split()[1])
        found[int(tid)] = (vol, invol)
    return found


class Switches:
    """The context switches of a process's threads (voluntary + involuntary, summed over its
    threads) while the ``with`` block runs: a machine-independent figure of how often the
    process woke up (its event loop, its worker threads, gRPC's threads). Linux keeps them per
    thread only (a thread that ends takes its counts with it), so a bench thread samples them
    every ``every`` seconds: a thread that ended counts up to its last sample, and one that
    began and ended between two samples is not counted at all (``ended`` says how many were
    seen to end). Reading /proc costs the process nothing."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid = pid
        self.every = every
        self.first: dict[int, tuple[int, int]] = {}
        self.last: dict[int, tuple[int, int]] = {}
        self.ended = 0
        self.names: dict[int, str] = {}  # tid → its name (/proc/PID/task/TID/comm)
        # tid → its CPU so far (ns, schedstat), as first and last sampled (``cpu_by_name``)
        self.cpu_first: dict[int, int] = {}
        self.cpu_last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = task_switches(self.pid)
        cpu = task_cpu_ns(self.pid)
        for tid, counts in now.items():
            self.first.setdefault(tid, (0, 0))  # a thread begun inside the window: from 0
            self.last[tid] = counts
            if tid in cpu:
                self.cpu_first.setdefault(tid, 0)
                self.cpu_last[tid] = cpu[tid]
            if tid not in self.names:
                try:
                    self.names[tid] = Path(f"/proc/{self.pid}/task/{tid}/comm").read_text().strip()
                except OSError:
                    self.names[tid] = "?"
        self.ended = len(self.last.keys() - now.keys())

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> Switches:
        self.first = task_switches(self.pid)
        self.last = dict(self.first)
        self.cpu_first = task_cpu_ns(self.pid)
        self.cpu_last = dict(self.cpu_first)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def _delta(self, tids: Iterable[int]) -> tuple[int, int]:
        vol = invol = 0
        for tid in tids:
            v0, i0 = self.first.get(tid, (0, 0))
            v1, i1 = self.last[tid]
            vol, invol = vol + v1 - v0, invol + i1 - i0
        return vol, invol

    @property
    def total(self) -> int:
        """Voluntary + involuntary switches of every thread over the window."""
        return sum(self._delta(self.last))

    @property
    def voluntary(self) -> int:
        return self._delta(self.last)[0]

    def by_name(self) -> dict[str, tuple[int, int]]:
        """Switches by thread name (the main thread as "main"): name → (threads, switches),
        most switches first."""
        found: dict[str, tuple[int, int]] = {}
        for tid in self.last:
            name = "main" if tid == self.pid else self.names.get(tid, "?")
            threads, count = found.get(name, (0, 0))
            found[name] = (threads + 1, count + sum(self._delta([tid])))
        return dict(sorted(found.items(), key=lambda kv: -kv[1][1]))

    def cpu_by_name(self) -> dict[str, float]:
        """CPU seconds over the window by thread name (the main thread as "main"; as
        ``by_name``: a thread counts up to its last sample), most first. Python's threads
        other than the main one (the worker threads, grpc.aio's completion-queue poller) keep
        the process's name."""
        found: dict[str, float] = {}
        for tid, last in self.cpu_last.items():
            name = "main" if tid == self.pid else self.names.get(tid, "?")
            found[name] = found.get(name, 0.0) + (last - self.cpu_first.get(tid, 0)) / 1e9
        return dict(sorted(found.items(), key=lambda kv: -kv[1]))

    @property
    def main(self) -> int:
        """The main thread's (the event loop's, in tlsroll's daemons)."""
        return sum(self._delta([self.pid])) if self.pid in self.last else 0


class Fsyncs:
    """Counts a process's fsync and fdatasync calls (all its threads) while the ``with`` block
    runs, with ``strace -c``: the durable writes (with ``synchronous=FULL`` each SQLite commit
    is one, a WAL checkpoint a few). strace stops the process at each of its system calls, so
    a run that counts has CPU and wall figures that compare with no other. ``count`` stays
    None without strace or if it could not attach."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.count: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Fsyncs:
        if shutil.which("strace") is None:
            return self
        command = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(self.out)]
        self._proc = subprocess.Popen(
            [*command, "-p", str(self.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert self._proc.stderr is not None
        self._proc.stderr.readline()  # "Process N attached": it counts from here
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # detach and write the summary (then it dies of
        self._proc.wait(30)  # the signal, so its exit status says nothing)
        text = self.out.read_text() if self.out.exists() else ""
        counts = [
            int(line.split()[3])
            for line in text.splitlines()
            if line.split()[-1:] in (["fsync"], ["fdatasync"]) and len(line.split()) >= 5
        ]
        self.count = sum(counts) if "syscall" in text else None


def fsyncs_per_node(count: int | None, nodes: int) -> str:
    return "n/a" if count is None else f"{count / nodes:.1f}"


# --- figures ----------------------------------------------------------------------------------


def summary(values: Sequence[float], unit: str, scale: float = 1.0, digits: int = 1) -> str:
    """``median unit (min–max, n runs)`` of ``values`` times ``scale``."""
    if not values:
        return "n/a"
    v = sorted(x * scale for x in values)
    med = statistics.median(v)
    if len(v) == 1:
        return f"{med:.{digits}f} {unit} (1 run)"
    return f"{med:.{digits}f} {unit} ({v[0]:.{digits}f}–{v[-1]:.{digits}f}, {len(v)} runs)"


def median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else float("nan")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(poll)


# --- the leader -------------------------------------------------------------------------------


def enable_tls_request(max_parallel: int = 1) -> admin_pb2.RolloutRequest:
    """``rollout start --scope cluster --change enable-tls`` as the CLI sends it (a fresh auth
    password's verifier; the password itself is thrown away)."""
    secret = "bench-" + os.urandom(12).hex()
    return admin_pb2.RolloutRequest(
        change=types_pb2.CHANGE_ENABLE_TLS,
        scope=types_pb2.SCOPE_KIND_CLUSTER,
        max_parallel=max_parallel,
        freeze=types_pb2.FREEZE_MODE_NODE,
        auth_verifier_json=password.verifier_to_json(password.make_verifier(secret)).strip(),
    )


def disable_tls_request(max_parallel: int = 1) -> admin_pb2.RolloutRequest:
    """``rollout start --change disable-tls`` as the CLI sends it: the way back from the newest
    enable-tls rollout (its nodes are what the leader takes back; no scope, no password)."""
    return admin_pb2.RolloutRequest(
        change=types_pb2.CHANGE_DISABLE_TLS,
        max_parallel=max_parallel,
        freeze=types_pb2.FREEZE_MODE_NODE,
    )


def get_schema(channel: grpc.Channel, rollout_id: str) -> schema_pb2.RolloutView:
    stub = schema_pb2_grpc.SchemaViewStub(channel)
    reply: schema_pb2.Schema = stub.GetSchema(
        schema_pb2.GetSchemaRequest(rollout_id=rollout_id), timeout=30
    )
    return reply.rollouts[0]


def log_says_ended(log_path: Path, rollout_id: str) -> bool:
    """True once the leader's log has the rollout reaching a terminal state. Read from the log
    file, not asked of the leader: asking would add to the CPU being measured."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return False
    for line in reversed(text.splitlines()):
        if rollout_id not in line or "rollout.state_changed" not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("state") in ("completed", "halted", "aborted"):
            return True
    return False


def seconds(view: schema_pb2.RolloutView) -> float:
    """The rollout's wall time, started to ended, as the leader recorded it."""
    return (view.ended_at.ToDatetime() - view.started_at.ToDatetime()).total_seconds()
