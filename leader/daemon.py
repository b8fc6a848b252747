"""``tlsroll-leader``: the leader daemon's entry point.

The leader runs for months, and whatever it imports stays in its memory: first
``tlsroll.lean.keep_out()`` (structlog would import rich and pygments merely because they are
installed: about 5 MiB), then glibc malloc's settings (``tlsroll.heap.tune``: its TLS
connections' buffers in mappings of their own, 6-10 KiB less per agent connection), then
the daemon itself (``leader.runtime``: start-up, the listeners, the engine, graceful stop).
Nothing else is imported here, so ``keep_out`` runs before structlog, and malloc is tuned
before gRPC starts a thread.
"""

from __future__ import annotations

from tlsroll import heap, lean


def main(argv: list[str] | None = None) -> int:
    lean.keep_out()
    heap.tune()
    from leader import runtime  # noqa: PLC0415 - only after keep_out (see the docstring)

    return runtime.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
