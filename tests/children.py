"""A Python child process for a test: real gRPC in a process of its own, its output kept.

done = python_child(SOURCE, "127.0.0.2", "agent", trace=True)
done.stderr   # with ``trace``: gRPC's keepalive trace (every PING sent, by whom)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_child(
    source: str,
    *args: str,
    prefix: Sequence[str] = (),
    trace: bool = False,
    timeout: float = 90,
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` with ``python -c`` and ``args`` (after ``prefix``, e.g. ``unshare
    --net``), the project on its path; ``trace``: gRPC's keepalive trace on its stderr. Fails
    the test, with the end of the child's stderr, unless it exits 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if trace:
        env |= {"GRPC_VERBOSITY": "debug", "GRPC_TRACE": "http_keepalive"}
    done = subprocess.run(
        [*prefix, sys.executable, "-c", source, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done
