"""What a daemon keeps out of its process (imports nothing itself, so it can run first).

The daemons log JSON lines (``tlsroll.logs``) and never draw on a terminal, but structlog
imports rich whenever it is installed (for pretty tracebacks in its console renderer), and rich
brings pygments: about 6 MiB of memory and 100 ms of start-up in every agent, which runs on
every node for months. ``keep_out`` makes those imports fail (a ``None`` entry in
``sys.modules`` is Python's documented way to say "not available"), so structlog falls back to
its plain renderer and tracebacks. Call it first in a daemon's ``main``, before anything
imports structlog; a process that already imported rich (the admin CLI, a test run) keeps it.
"""

from __future__ import annotations

import sys

NOT_IN_DAEMONS = ("rich",)
"""Packages a daemon never needs; pygments comes only through rich."""


def keep_out(names: tuple[str, ...] = NOT_IN_DAEMONS) -> None:
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
