"""Where a process's memory is (``python -m bench.simagents --memory DIR``): its resident
memory by mapping (``/proc/PID/smaps``: the heap, anonymous mappings such as Python's arenas
and thread stacks, each shared library), and the leader's Python allocations by source line
(tracemalloc, started before the leader imports anything by ``bench/memory_site``), compared
between two moments. What tracemalloc does not see (gRPC's core, OpenSSL, SQLite's cache,
malloc's free but unreturned memory) is RSS less the traced Python memory.
"""

from __future__ import annotations

import json
import os
import signal
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

SITE = Path(__file__).parent / "memory_site"
KIB = 1024


def memory_env(prefix: Path, frames: int = 1) -> dict[str, str]:
    """What a leader's environment needs for ``Snapshots``: the site hook first on its path."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        "TLSROLL_TRACEMALLOC": str(prefix),
        "TLSROLL_TRACEMALLOC_FRAMES": str(frames),
        "PYTHONPATH": f"{SITE}:{path}" if path else str(SITE),
    }


def state_env(prefix: Path) -> dict[str, str]:
    """What a leader's environment needs for ``LeaderState``: the site hook first on its path
    (the same one as ``memory_env``'s: both may be given)."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        "TLSROLL_STATE": str(prefix),
        "PYTHONPATH": f"{SITE}:{path}" if path else str(SITE),
    }


class LeaderState:
    """Readings of what a leader started with ``state_env(prefix)`` keeps (asyncio tasks,
    threads, allocated blocks, the size of its per-rollout, per-node and per-connection maps):
    ``read`` signals it (SIGUSR2) and returns the JSON it wrote."""

    def __init__(self, pid: int, prefix: Path) -> None:
        self.pid = pid
        self.prefix = prefix
        self.taken = 0

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        self.taken += 1
        done = Path(f"{self.prefix}.{self.taken}.done")
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline:
                return {"error": "no reading"}
            time.sleep(0.05)
        found: dict[str, Any] = json.loads(Path(f"{self.prefix}.{self.taken}").read_text())
        return found


def smaps(pid: int) -> Counter[str]:
    """Resident KiB by mapping: the file's name, ``[heap]``, ``[stack]``, or ``[anon]``."""
    out: Counter[str] = Counter()
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            name = os.path.basename(parts[5]) if len(parts) > 5 else "[anon]"
        elif parts and parts[0] == "Rss:":
            out[name] += int(parts[1])
    return out


def threads(pid: int) -> Counter[str]:
    """The process's threads by name (``/proc/PID/task/*/comm``)."""
    names: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[(task / "comm").read_text().strip()] += 1
        except OSError:
            continue
    return names


class Snapshots:
    """tracemalloc snapshots of a leader started with ``memory_env(prefix)``: ``take`` signals
    it and waits for the file."""

    def __init__(self, pid: int, prefix: Path) -> None:
        self.pid = pid
        self.prefix = prefix
        self.taken: list[tuple[tracemalloc.Snapshot, Counter[str], int]] = []

    def take(self, timeout: float = 120.0) -> None:
        n = len(self.taken) + 1
        done = Path(f"{self.prefix}.{n}.done")
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the leader wrote no snapshot {done}")
            time.sleep(0.2)
        snapshot = tracemalloc.Snapshot.load(f"{self.prefix}.{n}")
        self.taken.append((snapshot, smaps(self.pid), int(done.read_text())))

    def report(self, top: int = 30) -> str:
        """Each snapshot's RSS by mapping and traced Python memory; between the first and the
        last, the source lines whose memory grew most."""
        lines = []
        for i, (snap, maps, traced) in enumerate(self.taken, 1):
            rss = sum(maps.values())
            lines.append(
                f"snapshot {i}: RSS {rss / KIB:.1f} MiB, Python (traced) {traced / KIB / KIB:.1f}"
                f" MiB; by mapping (MiB): "
                + ", ".join(f"{k} {v / KIB:.1f}" for k, v in maps.most_common(8))
            )
            by_file = snap.statistics("filename")[:top]
            lines.append("  Python memory by file (MiB):")
            lines += [
                f"    {s.size / KIB / KIB:7.2f} {s.count:>8} {s.traceback[0].filename}"
                for s in by_file
            ]
        pairs = [(1, len(self.taken))] if len(self.taken) >= 2 else []
        if len(self.taken) > 2:  # and each step between
            pairs += [(i, i + 1) for i in range(1, len(self.taken))]
        for a, b in pairs:
            first, last = self.taken[a - 1][0], self.taken[b - 1][0]
            lines.append(f"grew from snapshot {a} to {b}, by line (KiB, blocks):")
            for stat in last.compare_to(first, "lineno")[:top]:
                frame = stat.traceback[0]
                lines.append(
                    f"  {stat.size_diff / KIB:+9.1f} {stat.count_diff:+8} "
                    f"{frame.filename}:{frame.lineno}"
                )
        return "\n".join(lines)
