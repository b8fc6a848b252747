"""``tlsroll-agent``: the node agent daemon's entry point.

The agent runs on every node for months, and whatever it imports stays in its memory: first
``tlsroll.lean.keep_out()`` (structlog would import rich and pygments merely because they are
installed), then its command line and config (``nodeagent.front``: a start refused there, or
``--help``, imports nothing more), then the daemon itself (``nodeagent.runtime``: start-up,
serving, heartbeats, graceful stop). Nothing else is imported here, so ``keep_out`` runs
before structlog.
"""

from __future__ import annotations

from tlsroll import lean


def main(argv: list[str] | None = None) -> int:
    lean.keep_out()
    from nodeagent import front  # noqa: PLC0415 - only after keep_out (see the docstring)

    started = front.start(argv)
    if isinstance(started, int):
        return started
    from nodeagent import runtime  # noqa: PLC0415 - only for a start its config allows

    return runtime.run(*started)


if __name__ == "__main__":
    raise SystemExit(main())
