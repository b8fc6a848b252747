"""Imports made ahead of need run one after another (``nodeagent.warmup``): two at once, in
two threads, could deadlock in Python 3.11's module locks (both load parts of cryptography)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

from nodeagent import warmup


def test_warm_imports_run_one_after_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real modules whose import takes a while (each sleeps in its body): warmed at once
    from the event loop, the second starts only once the first has ended."""
    log = tmp_path / "log"
    for name in ("slow_warm_a", "slow_warm_b"):
        (tmp_path / f"{name}.py").write_text(
            "import threading, time\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            f"    f.write('start {name} ' + threading.current_thread().name + '\\n')\n"
            "time.sleep(0.2)\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            f"    f.write('end {name}\\n')\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))

    async def both() -> list[ModuleType]:
        return list(await asyncio.gather(warmup.warm("slow_warm_a"), warmup.warm("slow_warm_b")))

    try:
        modules = asyncio.run(both())
    finally:
        for name in ("slow_warm_a", "slow_warm_b"):
            sys.modules.pop(name, None)
    assert [m.__name__ for m in modules] == ["slow_warm_a", "slow_warm_b"]
    lines = log.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["start", "slow_warm_a"],
        ["end", "slow_warm_a"],
        ["start", "slow_warm_b"],
        ["end", "slow_warm_b"],
    ]
    assert all(line.split()[2].startswith("warm") for line in lines if line.startswith("start"))


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_warm_imports_run_at_a_lower_priority_than_the_agents_other_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node is prepared while another node's server restarts: the warming thread yields the
    CPU to it. A real module records, while it is imported, the nice value of the thread that
    imports it; the calling thread's own is unchanged."""
    log = tmp_path / "nice"
    (tmp_path / "nice_warm.py").write_text(
        "import os, threading\n"
        f"with open({str(log)!r}, 'w') as f:\n"
        "    f.write(str(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def one() -> ModuleType:
        return await warmup.warm("nice_warm")

    try:
        asyncio.run(one())
    finally:
        sys.modules.pop("nice_warm", None)
    assert int(log.read_text()) == min(mine + warmup.WARM_NICE, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
