"""``tlsroll-agent``: the node agent daemon's entry point.

The agent runs on every node for months, and whatever it imports stays in its memory: first
``tlsroll.lean.keep_out()`` (structlog would import rich and pygments merely because they are
installed), then the daemon itself (``nodeagent.runtime``: start-up, serving, heartbeats,
graceful stop). Nothing else is imported here, so ``keep_out`` runs before structlog.
"""

from __future__ import annotations

from tlsroll import lean


def main(argv: list[str] | None = None) -> int:
    lean.keep_out()
    from nodeagent import runtime  # noqa: PLC0415 - only after keep_out (see the docstring)

    return runtime.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
