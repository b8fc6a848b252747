"""The processes a test started, found by what their command lines name (``/proc``), whoever
their parent is: a reference server the agent's driver started is not the test's child, and its
pid file names it only once it has started.

    left = running_with(str(node.server.config_path))   # [Proc(pid, args, started), ...]
    stop(left)                                          # SIGKILL, and wait until they are gone
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")
# A process's start time is kept in clock ticks: one started just after ``since_boot()`` was
# read may show a tick earlier.
STARTED_SLACK = 1.0
# Daemons of the project, as their command lines name them (console script or ``-m`` module).
DAEMONS = {
    "reference server": ("tlsroll-refserver", "refserver"),
    "agent": ("tlsroll-agent", "nodeagent.daemon"),
    "leader": ("tlsroll-leader", "leader.daemon"),
}


@dataclass(frozen=True)
class Proc:
    pid: int
    args: tuple[str, ...]
    started: float  # seconds since boot

    @property
    def daemon(self) -> str | None:
        """Which of the project's daemons this is (``DAEMONS``), or None."""
        names = {os.path.basename(a) for a in self.args[:3]}
        for what, (script, module) in DAEMONS.items():
            if script in names or module in self.args[:4]:
                return what
        return None

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.daemon or 'process'}): {' '.join(self.args)}"


def since_boot() -> float:
    """Now, in the clock ``Proc.started`` is read in."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def running_with(*texts: str) -> list[Proc]:
    """The live processes (an exited one waiting for its parent left out) whose command line
    contains one of ``texts``; this process never."""
    wanted = [t.encode() for t in texts]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if not any(w in cmdline for w in wanted):
                continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] in "ZX":
            continue
        args = tuple(a.decode(errors="replace") for a in cmdline.split(b"\0") if a)
        found.append(Proc(int(entry), args, int(fields[19]) / TICKS))
    return found


def _started(pid: int) -> float | None:
    """When ``pid`` started (seconds since boot), or None if it is not running (a zombie has
    exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else int(fields[19]) / TICKS


def alive(proc: Proc | int) -> bool:
    """True while the process runs (a zombie has exited), whoever its parent is; for a
    ``Proc``, only the process it found (a pid used again since by another is not it)."""
    if isinstance(proc, int):
        return _started(proc) is not None
    return _started(proc.pid) == proc.started


def stop(procs: Iterable[Proc], timeout: float = 5.0) -> list[Proc]:
    """SIGKILL each that still is the process found, and wait (bounded) until they have
    exited; those still running after it."""
    procs = [p for p in procs if alive(p)]
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p for p in procs if alive(p)]


# A graceful stop's grace (``long_grace``): far past any bound a test waits for a stop.
LONG_GRACE_SECONDS = 3600.0
LONG_GRACE_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "long_grace")
LOOP_CHECKS_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loop_checks")


def long_grace(seconds: float = LONG_GRACE_SECONDS) -> dict[str, str]:
    """The environment that gives a daemon started with it (leader, agent, reference server)
    ``seconds`` of grace at its graceful stop (``tests/long_grace/sitecustomize.py``). Its stop
    that ends within a test's bound was not ended by a grace running out: "it stopped in time"
    said by what ended it, not by a clock held against the grace."""
    path = [LONG_GRACE_SITE, LOOP_CHECKS_SITE, os.environ.get("PYTHONPATH", "")]
    return {
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "TLSROLL_TEST_LONG_GRACE": str(seconds),
    }
