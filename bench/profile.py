"""Where a process's CPU goes while a ``with`` block runs: py-spy samples it (Python frames and,
with ``native``, C frames such as gRPC's core inside ``grpc._cython``), and ``summary`` groups
the samples by what they were doing. A benchmark that profiles has CPU figures that compare
with no other run (py-spy pauses the process at each sample).

    with Profile(pid, root / "leader.spy") as prof:
        ...
    print(prof.summary(nodes=200))

py-spy is not a dependency of tlsroll (``pip install py-spy``); without it, or if it cannot
attach (it needs ptrace rights), ``samples`` stays empty and ``summary`` says so.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

# What a sample was doing: the first of these found in its stack, innermost first (a frame
# "func (path:line)"; the key is matched against the whole frame text).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("sqlite3", "sqlite / store"),
    ("schema_store.py", "sqlite / store"),
    ("leader/store.py", "sqlite / store"),
    ("tlsroll/sqlite.py", "sqlite / store"),
    ("planner.py", "planner"),
    ("rollout_core.py", "planner"),
    ("tlsroll/probe.py", "confirm: outside check"),
    ("outside_check", "confirm: outside check"),
    ("dual_check", "confirm: outside check"),
    ("sign_csr", "stage: signing"),
    ("pki.py", "pki (other)"),
    ("structlog", "logging"),
    ("tlsroll/logs.py", "logging"),
    ("logging/", "logging"),
    ("heartbeat", "heartbeats"),
    ("Heartbeat", "heartbeats"),
    ("leader/service.py", "leader service (heartbeats)"),
    ("observe.py", "observe (start)"),
    ("admin_service.py", "admin service"),
    ("schema_view.py", "schema view"),
    ("viewer", "viewer"),
    ("agent_client.py", "agent calls (python)"),
    ("changes.py", "steps (python)"),
    ("engine.py", "engine"),
    ("grpc/aio", "grpc aio (python)"),
    ("grpc/_", "grpc (python)"),
    ("_cython", "grpc core (C)"),
    ("cygrpc", "grpc core (C)"),
    ("libssl", "TLS (C)"),
    ("libcrypto", "TLS (C)"),
    ("_ssl", "TLS (C)"),
    ("asyncio", "asyncio"),
    ("threading.py", "threads"),
    ("concurrent/futures", "threads"),
)


# A sample whose innermost named frame is one of these was waiting, not running (py-spy with
# native frames counts blocked threads too): a lock or the GIL, a queue, a poller, a sleep, or
# a disk flush.
WAITS = (
    "pthread_cond_timedwait",
    "pthread_cond_wait",
    "PyThread_acquire_lock_timed",
    "epoll_wait",
    "epoll_pwait",
    "poll (libc",
    "select (libc",
    "sem_clockwait",
    "sem_timedwait",
    "sem_wait",
    "nanosleep",
    "fdatasync",
    "fsync",
    "accept",
)


def waiting(stack: str) -> bool:
    for frame in reversed(stack.split(";")):
        if frame.startswith("0x"):  # an unnamed libc frame (the futex call): look further out
            continue
        return any(w in frame for w in WAITS)
    return False


class Profile:
    """py-spy on ``pid`` for the ``with`` block; raw (collapsed) stacks in ``out``."""

    def __init__(
        self, pid: int, out: Path, *, rate: int = 200, native: bool = False, gil: bool = False
    ) -> None:
        self.pid = pid
        self.gil = gil
        self.out = out
        self.rate = rate
        self.native = native
        self.samples: Counter[str] = Counter()  # collapsed stack -> samples
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            return self
        command = [spy, "record", "--pid", str(self.pid), "--format", "raw", "-o", str(self.out)]
        command += ["--rate", str(self.rate), "--threads"]
        if self.native:
            command.append("--native")
        else:  # Python frames only: no need to stop the process for each sample
            command.append("--nonblocking")
        if self.gil:
            command.append("--gil")
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # stop and write the stacks
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self.samples = read_raw(self.out)

    def summary(self, nodes: int, top: int = 25) -> str:
        return summarize(self.samples, nodes, self.rate, top)


class Perf:
    """``perf record`` on ``pid`` for the ``with`` block (every thread, on-CPU samples only,
    C and kernel frames: no Python names); ``by_dso`` says which library the CPU went to
    (libpython, gRPC's core in cygrpc, OpenSSL, SQLite, the kernel)."""

    def __init__(self, pid: int, out: Path, *, rate: int = 499) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Perf:
        if shutil.which("perf") is None:
            return self
        command = ["perf", "record", "-F", str(self.rate), "-p", str(self.pid), "-o", str(self.out)]
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)

    def by_dso(self, top: int = 15) -> str:
        if self._proc is None or not self.out.exists():
            return "perf: no samples (perf missing or could not attach)"
        report = subprocess.run(
            ["perf", "report", "-i", str(self.out), "--stdio", "--sort", "dso", "-q"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        lines = [line for line in report.splitlines() if line.strip()][:top]
        return "perf, CPU by library:\n" + "\n".join(lines)


SITE = Path(__file__).parent / "yappi_site"


def yappi_env(out: Path) -> dict[str, str]:
    """What a leader's environment needs for ``Yappi``: the site hook first on its path."""
    path = os.environ.get("PYTHONPATH", "")
    return {"TLSROLL_YAPPI": str(out), "PYTHONPATH": f"{SITE}:{path}" if path else str(SITE)}


class Yappi:
    """yappi in a leader started with ``yappi_env``: started (cleared) as the ``with`` block
    begins, stopped and saved as it ends (``bench/yappi_site``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> Yappi:
        os.kill(self.pid, signal.SIGUSR1)
        return self

    def __exit__(self, *_exc: object) -> None:
        os.kill(self.pid, signal.SIGUSR2)
        time.sleep(3)  # saving takes a moment


def read_raw(path: Path) -> Counter[str]:
    samples: Counter[str] = Counter()
    if not path.exists():
        return samples
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[stack] += int(count)
    return samples


def category(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for key, name in CATEGORIES:
            if key in frame:
                return name
    return "other"


def summarize(samples: Counter[str], nodes: int, rate: int, top: int = 25) -> str:
    """ms per node by category, then the functions with the most samples (self and inclusive)."""
    idle = sum(n for stack, n in samples.items() if waiting(stack))
    samples = Counter({s: n for s, n in samples.items() if not waiting(s)})
    total = sum(samples.values())
    if not total:
        return "profile: no samples (py-spy missing or could not attach)"
    per_node = 1000 / rate / max(nodes, 1)  # ms of CPU per node for one sample
    by_cat: Counter[str] = Counter()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for stack, n in samples.items():
        by_cat[category(stack)] += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames[1:]):  # the thread's name is the first "frame"
            incl[frame] += n
    lines = [
        f"profile: {total} samples running at {rate}/s = {total * per_node:.1f} ms per node "
        f"({idle} more waiting, left out)"
    ]
    lines += ["  by what the sample was doing (innermost known frame):"]
    for name, n in by_cat.most_common():
        lines.append(f"    {n * per_node:7.2f} ms/node {100 * n / total:5.1f} %  {name}")
    lines += ["  self (innermost frame):"]
    for frame, n in own.most_common(top):
        lines.append(f"    {n * per_node:7.2f} ms/node {100 * n / total:5.1f} %  {frame[:150]}")
    lines += ["  inclusive:"]
    for frame, n in incl.most_common(top):
        lines.append(f"    {n * per_node:7.2f} ms/node {100 * n / total:5.1f} %  {frame[:150]}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.profile RAW NODES [RATE]: summarize a saved run
    args = sys.argv[1:]
    print(summarize(read_raw(Path(args[0])), int(args[1]), int(args[2]) if len(args) > 2 else 200))
