"""The harness's event-loop thread check (tests/loop_checks/sitecustomize.py), which every
daemon and CLI a test starts runs under (``tests.cluster.child_env``): asyncio's debug mode,
which the daemons ran with before, made them twice as costly; its one check that caught a bug
stays."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.cluster import child_env

TOUCH_FROM_ANOTHER_THREAD = """
import asyncio, sys, threading

async def main():
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    future.add_done_callback(print)  # its result is awaited: set_result calls call_soon
    caught = []

    def other():
        for touch in (lambda: loop.call_soon(print), lambda: loop.call_later(1, print),
                      lambda: future.set_result(1)):
            try:
                touch()
            except RuntimeError as e:
                caught.append(str(e))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    loop.call_soon_threadsafe(print, "threadsafe ok")  # the way that is allowed
    await asyncio.sleep(0.01)
    print("debug", loop.get_debug(), "caught", len(caught), caught[0] if caught else "")

asyncio.run(main())
"""


def run(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", TOUCH_FROM_ANOTHER_THREAD],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_a_child_touching_its_loop_from_another_thread_raises_without_debug_mode() -> None:
    out = run(child_env())
    assert "threadsafe ok" in out
    assert "debug False caught 3 Non-thread-safe operation invoked on an event loop" in out, out


def test_without_the_harness_nothing_is_caught() -> None:
    """What the check adds: the same child with the plain environment is not stopped."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONASYNCIODEBUG",)}
    env["TLSROLL_LOOP_CHECKS"] = ""
    assert "debug False caught 0" in run(env)


def test_the_check_imports_no_asyncio_into_a_child_that_does_not() -> None:
    """The CLI never imports asyncio; the check must not make every CLI run pay for it."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys, tlsroll.cli; print('asyncio' in sys.modules)"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False", done.stdout


def test_the_check_loads_no_module_a_bare_interpreter_does_not() -> None:
    """Every CLI run, daemon and crypto worker a test starts pays for what the check imports:
    ``importlib.abc`` (its finder's base classes) brought ``importlib.resources``,
    ``tempfile``, ``random`` and ``typing``, about 60 ms of CPU per process. Now the check is
    the only module it adds."""
    show = "import sys; print(' '.join(sorted(sys.modules)))"

    def modules(env: dict[str, str]) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-c", show],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return set(done.stdout.split())

    checked = child_env()
    assert checked["TLSROLL_LOOP_CHECKS"] == "1"
    bare = {k: v for k, v in checked.items() if k != "TLSROLL_LOOP_CHECKS"}
    bare["PYTHONPATH"] = os.pathsep.join(
        p for p in checked["PYTHONPATH"].split(os.pathsep) if not p.endswith("loop_checks")
    )
    assert modules(checked) - modules(bare) == {"sitecustomize"}
