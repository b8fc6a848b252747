"""``tlsroll-leader``: the leader daemon's entry point.

The leader runs for months, and whatever it imports stays in its memory: first
``tlsroll.lean.keep_out()`` (structlog would import rich and pygments merely because they are
installed: about 5 MiB), then the daemon itself (``leader.runtime``: start-up, the listeners,
the engine, graceful stop). Nothing else is imported here, so ``keep_out`` runs before
structlog.
"""

from __future__ import annotations

from tlsroll import lean


def main(argv: list[str] | None = None) -> int:
    lean.keep_out()
    from leader import runtime  # noqa: PLC0415 - only after keep_out (see the docstring)

    return runtime.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
