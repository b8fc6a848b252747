"""``tlsroll-leader``: the leader daemon's entry point.

The leader runs for months, and whatever it imports stays in its memory: first
``tlsroll.lean.keep_out()`` (structlog would import rich and pygments merely because they are
installed: about 5 MiB), then glibc malloc's settings (``tlsroll.heap.tune``: its TLS
connections' buffers in mappings of their own, 6-10 KiB less per agent connection), then its
command line, config and data dir (``leader.front``: a start refused there, or ``--help``,
imports nothing more), then the daemon itself (``leader.runtime``: start-up, the listeners,
the engine, graceful stop). Nothing else is imported here, so ``keep_out`` runs before
structlog, and malloc is tuned before gRPC starts a thread.
"""

from __future__ import annotations

from tlsroll import heap, lean


def main(argv: list[str] | None = None) -> int:
    lean.keep_out()
    heap.tune()
    from leader import front  # noqa: PLC0415 - only after keep_out (see the docstring)

    started = front.start(argv)
    if isinstance(started, int):
        return started
    from leader import runtime  # noqa: PLC0415 - only for a start its config allows

    return runtime.run(*started)


if __name__ == "__main__":
    raise SystemExit(main())
