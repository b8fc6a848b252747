"""The daemons' C heap: at most two glibc malloc arenas (``tlsroll.malloc``), the leader's
threads' arenas having held most of its memory after a large rollout (issue 15).

Each check runs in a fresh interpreter (arenas are per process), counting the arenas glibc
reports itself (``malloc_info``'s ``<heap nr=…>``) after eight threads allocated at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import leader.daemon
from tlsroll import malloc

ARENAS_AFTER_THREADS = """
import ctypes, sys, threading
from tlsroll import malloc
if sys.argv[1] == "limit":
    assert malloc.limit_arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
start = threading.Barrier(8)
def work():
    start.wait()
    for _ in range(20000):
        libc.free(libc.malloc(4096))
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
fp = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
"""


def arenas(tmp_path: Path, mode: str) -> int:
    out = tmp_path / f"{mode}.xml"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    subprocess.run(
        [sys.executable, "-c", ARENAS_AFTER_THREADS, mode, str(out)],
        check=True,
        env=env,
        timeout=60,
    )
    return out.read_text().count("<heap nr=")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_limit_arenas_keeps_busy_threads_to_two_arenas(tmp_path: Path) -> None:
    assert arenas(tmp_path, "free") > 2  # glibc's own default: an arena per busy thread
    assert arenas(tmp_path, "limit") <= 2


def test_the_environment_decides_when_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert malloc.limit_arenas() is False


def test_the_leader_limits_its_arenas_before_anything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[int] = []

    def limit(arenas: int = malloc.ARENAS) -> bool:
        called.append(arenas)
        return True

    monkeypatch.setattr(malloc, "limit_arenas", limit)
    assert leader.daemon.main(["--config", str(tmp_path / "missing.toml")]) != 0
    assert called == [2]


def test_the_leader_unit_sets_the_same() -> None:
    unit = Path(__file__).parent.parent / "deploy" / "systemd" / "tlsroll-leader.service"
    assert "Environment=MALLOC_ARENA_MAX=2" in unit.read_text().splitlines()
