"""A daemon's graceful stop stretched for a test (``tests.procs.long_grace`` puts this directory
first on the daemon's ``PYTHONPATH``, with ``TLSROLL_TEST_LONG_GRACE`` seconds): the leader's
grace periods (``leader.runtime.GRACE_SECONDS``, ``TAIL_GRACE_SECONDS``), the agent's
(``nodeagent.runtime.GRACE_SECONDS``, its bootstrap service's ``SHUTDOWN_TIMEOUT``) and the
reference server's wait for its writes (``refserver.server.SHUTDOWN_TIMEOUT``) all become that
long, far past any wait of the test's. A stop that ends within the test's bound then ended
because nothing held it, never because a grace ran out: what the tests once said by timing the
stop against the grace ("stopped in under 10 s"), which a loaded machine could break.

Only one ``sitecustomize`` is imported: the harness's own (``tests/loop_checks``) is run first
when its variable asks for it, as without this file.

Nothing of the daemon's is imported here: a finder on ``sys.meta_path`` sets the constants
right after the daemon imports their module itself, in its own start-up order (its
``lean.keep_out``, ``heap.tune`` and imports, which an import at the interpreter's start ran
ahead of: review rvb L3). And only the process the command line names is touched, once: the
variable is taken out of its environment as it is read, so that what it starts (the agent's
crypto workers, a reference server an agent starts as its managed server, whose ``-m
refserver`` the command line test would take) does not inherit it. No ``importlib.abc`` base
classes, as in the harness's file: the import system needs none, and they pull in modules no
daemon needs."""

import itertools
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

VARIABLE = "TLSROLL_TEST_LONG_GRACE"
LOOP_CHECKS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "loop_checks", "sitecustomize.py"
)
# What each daemon's command line says (its console script, or ``-m`` and its module), and the
# constants of its stop that are stretched.
STRETCHED: "dict[tuple[str, str], dict[str, tuple[str, ...]]]" = {
    ("tlsroll-leader", "leader.daemon"): {
        "leader.runtime": ("GRACE_SECONDS", "TAIL_GRACE_SECONDS")
    },
    ("tlsroll-agent", "nodeagent.daemon"): {
        "nodeagent.runtime": ("GRACE_SECONDS",),
        "nodeagent.bootstrap_server": ("SHUTDOWN_TIMEOUT",),
    },
    ("tlsroll-refserver", "refserver"): {"refserver.server": ("SHUTDOWN_TIMEOUT",)},
}


def _names(script: str, module: str) -> bool:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if len(argv) > 1 and os.path.basename(argv[1]) == script:
        return True
    return any(a == "-m" and b == module for a, b in itertools.pairwise(argv))


class _Loader:
    """The module's own loader, and the constants set once it has run."""

    def __init__(self, inner: "Any", attributes: "tuple[str, ...]", seconds: float) -> None:
        self.inner, self.attributes, self.seconds = inner, attributes, seconds

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        module: ModuleType | None = self.inner.create_module(spec)
        return module

    def exec_module(self, module: "ModuleType") -> None:
        self.inner.exec_module(module)
        for attribute in self.attributes:
            setattr(module, attribute, self.seconds)


class _Finder:
    """Finds nothing itself: hands the stretched modules' specs on with ``_Loader``."""

    def __init__(self, constants: "dict[str, tuple[str, ...]]", seconds: float) -> None:
        self.constants, self.seconds = constants, seconds

    def find_spec(self, name: str, path: "Any", target: "Any" = None) -> "Any":
        attributes = self.constants.get(name)
        if attributes is None:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec: Any = (
                finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            )
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, attributes, self.seconds)
                return spec
        return None


def _stretch(seconds: float) -> None:
    constants: dict[str, tuple[str, ...]] = {}
    for (script, module), stretched in STRETCHED.items():
        if _names(script, module):
            constants.update(stretched)
    if constants:
        sys.meta_path.insert(0, _Finder(constants, seconds))


with open(LOOP_CHECKS, encoding="utf-8") as _file:
    _harness = compile(_file.read(), LOOP_CHECKS, "exec")
exec(_harness, {"__name__": "loop_checks_sitecustomize"})  # noqa: S102 (the harness's own file)
_seconds = os.environ.pop(VARIABLE, None)
if _seconds is not None:
    _stretch(float(_seconds))
