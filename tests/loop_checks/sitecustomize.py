"""The test harness's check on every daemon and CLI a test starts (``tests.cluster.child_env``
puts this directory on their ``PYTHONPATH``): a non-thread-safe call on a running event loop
from another thread raises ``RuntimeError``, as under asyncio's debug mode.

Debug mode itself (which the tests ran every daemon with before) also records a traceback for
every callback, future and coroutine: it doubled the leader's CPU in a rollout (bench.rollout,
3 nodes: 57 → 103 ms a node) and made the daemons' share of the test suite's CPU the larger part
of a CI run. Its check that caught a real bug (an admin command that woke the engine from a
worker thread answered INTERNAL) is this one: ``call_soon``/``call_at`` (and with them
``call_later``, ``create_task`` and a future's callbacks) check the calling thread. The daemons
otherwise run as in production. ``TLSROLL_LOOP_CHECKS=1`` turns it on; asyncio is patched when
something imports it, never imported here (the CLI does not need it)."""

import os
import sys

# Nothing but ``os`` and ``sys``, which every Python process has loaded before this file runs
# (not even ``__future__``: the annotations are strings):
# ``importlib.abc`` (the finder's and loader's base classes) pulled in ``importlib.resources``,
# ``tempfile``, ``random`` and ``typing``, about 60 ms of CPU in every child the tests start
# (a CLI run, a daemon, an agent's crypto worker), most of which never needed them. The import
# system needs no base class: a finder on ``sys.meta_path`` has ``find_spec``, a loader
# ``create_module`` and ``exec_module``.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

TARGET = "asyncio.base_events"


def _patch(base_events: "ModuleType") -> None:
    cls = base_events.BaseEventLoop
    call_soon, call_at = cls.call_soon, cls.call_at

    def checked_call_soon(
        self: "Any", callback: "Any", *args: "Any", context: "Any" = None
    ) -> "Any":
        if not self._debug:  # debug mode checks by itself
            self._check_thread()
        return call_soon(self, callback, *args, context=context)

    def checked_call_at(
        self: "Any", when: float, callback: "Any", *args: "Any", context: "Any" = None
    ) -> "Any":
        if not self._debug:
            self._check_thread()
        return call_at(self, when, callback, *args, context=context)

    cls.call_soon = checked_call_soon
    cls.call_at = checked_call_at


class _Loader:
    def __init__(self, inner: "Any") -> None:
        self.inner = inner

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        module: ModuleType | None = self.inner.create_module(spec)
        return module

    def exec_module(self, module: "ModuleType") -> None:
        self.inner.exec_module(module)
        _patch(module)


class _Finder:
    def find_spec(self, name: str, path: "Any", target: "Any" = None) -> "Any":
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec: Any = (
                finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            )
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


if os.environ.get("TLSROLL_LOOP_CHECKS") == "1":
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    else:
        sys.meta_path.insert(0, _Finder())
