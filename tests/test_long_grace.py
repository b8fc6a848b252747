"""The harness's stretch of a daemon's graceful stop (``tests/long_grace/sitecustomize.py``,
``tests.procs.long_grace``): it reaches the daemon its command line names, after the daemon's
own imports, and nothing that daemon starts."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cluster import child_env
from tests.procs import LONG_GRACE_SECONDS, long_grace

# What a process the stretch names says of it: whether the module it stretches was imported
# before the process's own code ran, whether the variable is still in its environment (and so
# in its children's), and the constant it stretched.
REPORT = """
import json, os, sys
early = "refserver.server" in sys.modules
import refserver.server
print(json.dumps({"early": early, "left": os.environ.get("TLSROLL_TEST_LONG_GRACE"),
                  "timeout": refserver.server.SHUTDOWN_TIMEOUT}), flush=True)
"""
# And a child it starts with its environment, whose command line names the reference server
# too: a reference server an agent under the stretch starts as its managed server.
PARENT = f"""
CHILD = {REPORT!r}
{REPORT}
import subprocess
subprocess.run([sys.executable, "-c", CHILD, "-m", "refserver"], check=True, timeout=60)
"""


def test_the_stretch_reaches_the_named_daemon_after_its_own_imports_and_not_its_children() -> None:
    """Review rvb L3: the stretch imported the daemon's modules as the interpreter started,
    ahead of the daemon's own start-up order (``lean.keep_out``, ``heap.tune``, its imports),
    and its variable stayed in the daemon's environment, so that a reference server an agent
    under it started (``-m refserver`` on its command line) was stretched too. The command
    line here names ``-m refserver`` after the code, which the stretch reads as it reads a
    reference server's."""
    done = subprocess.run(
        [sys.executable, "-c", PARENT, "-m", "refserver"],
        env=child_env(long_grace()),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    parent, child = (json.loads(line) for line in done.stdout.splitlines())
    assert parent == {"early": False, "left": None, "timeout": LONG_GRACE_SECONDS}, parent
    assert child["early"] is False and child["left"] is None, child
    assert child["timeout"] != LONG_GRACE_SECONDS, child
