"""A daemon's graceful stop stretched for a test (``tests.procs.long_grace`` puts this directory
first on the daemon's ``PYTHONPATH``, with ``TLSROLL_TEST_LONG_GRACE`` seconds): the leader's
grace periods (``leader.runtime.GRACE_SECONDS``, ``TAIL_GRACE_SECONDS``), the agent's
(``nodeagent.runtime.GRACE_SECONDS``, its bootstrap service's ``SHUTDOWN_TIMEOUT``) and the
reference server's wait for its writes (``refserver.server.SHUTDOWN_TIMEOUT``) all become that
long, far past any wait of the test's. A stop that ends within the test's bound then ended
because nothing held it, never because a grace ran out: what the tests once said by timing the
stop against the grace ("stopped in under 10 s"), which a loaded machine could break.

Only one ``sitecustomize`` is imported: the harness's own (``tests/loop_checks``) is run first
when its variable asks for it, as without this file. Only the process the command line names
is touched (not the agent's crypto worker children, which inherit the variables)."""

import itertools
import os
import sys

LOOP_CHECKS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "loop_checks", "sitecustomize.py"
)
# What each daemon's command line says (its console script, or ``-m`` and its module), and the
# constants of its stop that are stretched.
STRETCHED: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
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


def _stretch(seconds: float) -> None:
    import importlib

    for (script, module), constants in STRETCHED.items():
        if _names(script, module):
            for name, attributes in constants.items():
                loaded = importlib.import_module(name)
                for attribute in attributes:
                    setattr(loaded, attribute, seconds)


with open(LOOP_CHECKS, encoding="utf-8") as _file:
    _harness = compile(_file.read(), LOOP_CHECKS, "exec")
exec(_harness, {"__name__": "loop_checks_sitecustomize"})  # noqa: S102 (the harness's own file)
_stretch(float(os.environ["TLSROLL_TEST_LONG_GRACE"]))
