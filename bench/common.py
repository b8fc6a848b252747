"""What the process benchmarks share: loopback addresses of their own, readings of a process
from /proc (CPU, RSS, open files), the figures' summary (median and spread) and the leader's
admin calls a benchmark makes (start a rollout, read its schema).

Addresses: the tests take 127.100–249.x.x (``tests/conftest.py``); a benchmark takes
127.250.(slot*10 + i // 250).(i % 250 + 1), the slot being ``TLSROLL_TEST_SLOT`` (0–24), so a
benchmark never collides with a test run, nor with another checkout's benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tlsroll import password
from tlsroll.v1 import admin_pb2, schema_pb2, schema_pb2_grpc, types_pb2

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
# asyncio's debug mode (which tests/cluster.py turns on for every daemon) costs CPU; a
# benchmark measures the daemons as they run in production.
NO_DEBUG = {"PYTHONASYNCIODEBUG": ""}
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


def rss_mib(pid: int) -> float:
    """Resident memory now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_files(pid: int) -> int:
    """Open file descriptors now (sockets included)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def inbound_connections(pid: int, port: int) -> int:
    """The process's open TCP connections accepted on ``port`` (established, from
    /proc/PID/net/tcp*, matched to its socket descriptors by inode)."""
    mine = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            mine.add(link[8:-1])
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
