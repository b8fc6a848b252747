"""The leader's insides for ``python -m bench.simagents`` (``--memory DIR``, ``--rollouts K``):
the benchmark puts this directory first on the leader's PYTHONPATH. Does nothing in any other
process, and nothing in the leader unless asked by its environment:

* TLSROLL_TRACEMALLOC (a path prefix): traces the leader's Python allocations from here, before
  it imports anything; each SIGUSR1 writes a snapshot to PREFIX.N (N = 1, 2, …), then
  PREFIX.N.done. Tracing costs memory and CPU: the figures of such a run compare with no other.
* TLSROLL_STATE (a path prefix): each SIGUSR2 writes PREFIX.N (JSON), then PREFIX.N.done: the
  asyncio tasks alive, the Python threads, the interpreter's allocated blocks, and the size of
  each map the leader keeps per rollout, node or connection (the engine's, the agent pool's,
  the heartbeat service's, the store's caches), read from the locals of the daemon's ``serve``
  coroutine. Costs nothing until signalled; a reading takes well under a millisecond.
"""

import os
import signal
import sys

_LEADER = os.path.basename(sys.argv[0] if sys.argv else "") == "tlsroll-leader"
_out = os.environ.get("TLSROLL_TRACEMALLOC", "")
if _out and _LEADER:
    import tracemalloc

    tracemalloc.start(int(os.environ.get("TLSROLL_TRACEMALLOC_FRAMES", "1")))
    _taken = [0]

    def _snapshot(*_args: object) -> None:
        _taken[0] += 1
        path = f"{_out}.{_taken[0]}"
        tracemalloc.take_snapshot().dump(path)
        with open(path + ".done", "w") as f:
            f.write(str(tracemalloc.get_traced_memory()[0]))

    signal.signal(signal.SIGUSR1, _snapshot)

_state_out = os.environ.get("TLSROLL_STATE", "")
if _state_out and _LEADER:
    _read = [0]

    def _sizes(obj: object, names: list[str]) -> dict[str, int]:
        found = {}
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                found[name] = len(value)
        return found

    def _malloc() -> dict[str, int]:
        """glibc's ``mallinfo2`` over all arenas, in KiB: ``arena`` (obtained from the system
        by brk or arena heaps), ``used``, ``free`` (in them: kept, not given back unless a trim
        finds whole pages), ``mmapped`` (blocks with a mapping of their own); empty elsewhere."""
        import ctypes  # noqa: PLC0415 - the leader has it (tlsroll.heap)

        class Info(ctypes.Structure):
            _fields_ = [
                (name, ctypes.c_size_t)
                for name in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        try:
            call = ctypes.CDLL(None).mallinfo2
        except (OSError, AttributeError):
            return {}
        call.restype = Info
        info = call()
        return {
            "arena": info.arena // 1024,
            "used": info.uordblks // 1024,
            "free": info.fordblks // 1024,
            "mmapped": info.hblkhd // 1024,
            "mmaps": info.hblks,
        }

    def _pymalloc() -> dict[str, int]:
        """Python's small-object allocator (``sys._debugmallocstats``, written to fd 2, read
        back from a temporary file), in KiB: its arenas (given back only when wholly empty)
        and the bytes of them in live blocks."""
        import tempfile  # noqa: PLC0415

        found: dict[str, int] = {}
        with tempfile.TemporaryFile() as f:
            saved = os.dup(2)
            try:
                sys.stderr.flush()
                os.dup2(f.fileno(), 2)
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            f.seek(0)
            for line in f.read().decode(errors="replace").splitlines():
                key, _, value = line.rpartition("=")
                key = key.strip()
                if key.endswith("bytes/arena"):  # "N arenas * SIZE bytes/arena = TOTAL"
                    found["arenas"] = int(value.replace(",", "")) // 1024
                elif key.startswith("# bytes in allocated blocks"):
                    found["live"] = int(value.replace(",", "")) // 1024
        return found

    def _resident() -> dict[str, int]:
        """The leader's resident anonymous memory by kind (KiB, from /proc/self/smaps):
        ``heap`` (glibc's main arena), ``arenas`` (the heaps of the other threads' arenas,
        each aligned to its 64 MiB maximum), ``anon`` (the other anonymous mappings, which
        the kernel merges when adjacent: Python's small-object arenas, blocks glibc mapped on
        their own, thread stacks)."""
        found = {"heap": 0, "arenas": 0, "anon": 0}
        kind = ""
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5:
                    start = int(head[0].split("-")[0], 16)
                    named = head[5] if len(head) > 5 else ""
                    if named == "[heap]":
                        kind = "heap"
                    elif named:
                        kind = ""
                    elif start % (64 << 20) == 0:
                        kind = "arenas"
                    else:
                        kind = "anon"
                elif kind and head[0] == "Rss:":
                    found[kind] += int(head[1])
        return found

    def _sqlite() -> dict[str, int]:
        """SQLite's own memory in this process, in KiB (``sqlite3_status64``: ``used``, all it
        holds, its page caches included; ``pagecache``, the caches' pages that overflowed
        into ``used``, and ``highwater``, the most ``used`` was); empty without it."""
        import _sqlite3  # noqa: PLC0415 - the leader has it (its stores)
        import ctypes  # noqa: PLC0415 - the leader has it (tlsroll.heap)

        status = ctypes.CDLL(_sqlite3.__file__).sqlite3_status64
        found = {}
        for key, op in (("used", 0), ("pagecache", 2)):
            now, high = ctypes.c_int64(), ctypes.c_int64()
            if status(op, ctypes.byref(now), ctypes.byref(high), 0) == 0:
                found[key] = now.value // 1024
                if key == "used":
                    found["highwater"] = high.value // 1024
        return found

    def _state() -> dict[str, object]:
        import asyncio  # noqa: PLC0415 - the leader has it by now
        import threading  # noqa: PLC0415

        loop = asyncio.events._get_running_loop()
        tasks = asyncio.all_tasks(loop) if loop is not None else set()
        state: dict[str, object] = {
            "tasks": len(tasks),
            "threads": threading.active_count(),
            "blocks": sys.getallocatedblocks(),
            "malloc": _malloc(),
            "pymalloc": _pymalloc(),
            "resident": _resident(),
            "sqlite": _sqlite(),
        }
        serve = None
        for task in tasks:
            coro = task.get_coro()
            code = getattr(coro, "cr_code", None)
            if code is not None and code.co_name == "serve":
                serve = coro.cr_frame.f_locals  # type: ignore[union-attr]
        if serve is None:
            return state
        engine = serve.get("engine")
        if engine is not None:
            state["engine"] = _sizes(
                engine,
                [
                    "tasks",
                    "not_before",
                    "renewed",
                    "revoked",
                    "confirmed",
                    "trouble",
                    "auth_known",
                    "facts",
                    "switched_here",
                    "signed",
                    "checks",
                ],
            )
            state["engine_nodes"] = sum(
                len(v) for m in (engine.revoked, engine.auth_known) for v in m.values()
            )
        agents = serve.get("agents")
        if agents is not None:
            state["pool"] = _sizes(
                agents, ["clients", "_open", "_idle", "_read_at", "_retiring", "_closing"]
            )
            state["pool"]["channels"] = agents.open_channels()  # type: ignore[index]
        service = serve.get("leader_service")
        if service is not None:
            state["service"] = _sizes(service, ["_callers", "_clients", "_streams", "_open"])
        schema = serve.get("schema")
        if schema is not None:
            cache = schema._db.cache
            state["cache"] = {
                "keys": len(cache),
                "rollouts": sum(1 for k in cache if isinstance(k, tuple) and k[0] == "rollout"),
            }
        st = getattr(serve.get("state"), "store", None)
        if st is not None:
            state["store"] = _sizes(st, ["_seen", "_vouched", "_queued", "_queued_writes"])
        return state

    def _write_state(*_args: object) -> None:
        import json  # noqa: PLC0415

        _read[0] += 1
        path = f"{_state_out}.{_read[0]}"
        try:
            text = json.dumps(_state())
        except Exception as exc:  # a bench reading must never take the leader down
            text = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        with open(path, "w") as f:
            f.write(text)
        with open(path + ".done", "w") as f:
            f.write("1")

    signal.signal(signal.SIGUSR2, _write_state)
