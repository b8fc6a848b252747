"""The order the suite runs in: the longest recorded tests first (tests/conftest.py,
tools/test_durations.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests import conftest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "test_durations.py"

REPORT = """\
============================= slowest durations ==============================
12.50s call     tests/test_b.py::test_slow[one]
0.40s setup    tests/test_b.py::test_slow[one]
3.00s call     tests/test_a.py::test_middle
1.50s call     tests/test_c.py::test_blocked[loop blocked]
0.20s call     tests/test_a.py::test_quick
0.60s call     tests/test_d.py::test_one
0.30s call     tests/test_d.py::test_two
0.25s setup    tests/test_d.py::test_two
(12 durations < 0.005s hidden.  Use -vv to show these durations.)
"""


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_tool_records_each_slow_tests_whole_time_and_a_modules_short_ones_together(
    tmp_path: Path,
) -> None:
    log, out = tmp_path / "pytest.log", tmp_path / "durations.json"
    log.write_text(REPORT)
    ran = run_tool(str(log), "--out", str(out))
    assert ran.returncode == 0, ran.stderr
    recorded = json.loads(out.read_text())
    assert list(recorded.items()) == [
        ("tests/test_b.py::test_slow[one]", 12.9),
        ("tests/test_a.py::test_middle", 3.0),
        ("tests/test_c.py::test_blocked[loop blocked]", 1.5),
        ("tests/test_d.py", 1.1),  # its short tests together: a module of many is not empty
    ]


def test_the_tool_refuses_a_log_without_durations_none_at_all_or_an_unwritable_place(
    tmp_path: Path,
) -> None:
    log, out = tmp_path / "pytest.log", tmp_path / "durations.json"
    log.write_text("4 passed in 1.00s\n")
    ran = run_tool(str(log), "--out", str(out))
    assert (ran.returncode, ran.stderr) == (1, f"test_durations: no --durations=0 lines in {log}\n")
    ran = run_tool(str(tmp_path / "absent.log"), "--out", str(out))
    assert ran.returncode == 1
    assert ran.stderr.startswith("test_durations: cannot read ") and "Traceback" not in ran.stderr
    assert not out.exists()
    log.write_text(REPORT)  # a good report, a place it cannot be written
    ran = run_tool(str(log), "--out", str(tmp_path / "no-such-dir" / "durations.json"))
    assert ran.returncode == 1
    assert ran.stderr.startswith("test_durations: cannot write ") and "Traceback" not in ran.stderr
    assert ran.stderr.count("\n") == 1


class _Item:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid


def test_collection_puts_the_longest_modules_first_each_in_one_piece_in_its_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules by their recorded total (a 6 s module after a 10 s one, though its longest test
    is shorter; an entry naming a module is its shorter tests together), each in one piece and
    in its own order (one worker takes it whole: a module-scoped cluster set up once, its tests
    written in that order); what the file does not name keeps its place after."""
    recorded = tmp_path / "durations.json"
    recorded.write_text(
        json.dumps(
            {"b.py::long": 10.0, "e.py": 7.0, "a.py::x": 5.0, "a.py::y": 1.0, "gone.py::t": 99.0}
        )
    )
    monkeypatch.setattr(conftest, "DURATIONS", recorded)
    order = ["c.py::one", "a.py::y", "a.py::new", "a.py::x", "c.py::two", "b.py::long", "d.py::t"]
    items = [_Item(n) for n in (*order, "e.py::one", "e.py::two")]
    conftest.pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == [
        "b.py::long",
        "e.py::one",
        "e.py::two",
        "a.py::y",
        "a.py::new",
        "a.py::x",
        "c.py::one",
        "c.py::two",
        "d.py::t",
    ]


def test_the_recorded_file_names_tests_of_this_suite_longest_first() -> None:
    recorded: dict[str, float] = json.loads(conftest.DURATIONS.read_text())
    assert recorded, "tests/durations.json is empty: run tools/test_durations.py"
    assert list(recorded.values()) == sorted(recorded.values(), reverse=True)
    root = conftest.DURATIONS.parent.parent
    missing = {n.split("::")[0] for n in recorded} - {
        str(p.relative_to(root)) for p in root.glob("tests/test_*.py")
    }
    assert not missing, f"tests/durations.json names files that are gone: {sorted(missing)}"


# A session of its own (``-n 2``) on generated modules, each with a module-scoped fixture: the
# suite's own hooks (tests/conftest.py) with a durations file of the session's.
MODULE = """\
import os
import time
from pathlib import Path

import pytest


def note(what):
    with Path(os.environ["ORDER_LOG"]).open("a") as log:
        log.write(f"{{os.environ.get('PYTEST_XDIST_WORKER', 'main')}} {{what}}\\n")


@pytest.fixture(scope="module")
def cluster():
    note("setup {name}")
    yield


@pytest.mark.parametrize("n", {params!r})
def test_it(cluster, n):
    note(f"test {name} {{n}}")
    if f"{name} {{n}}" in os.environ.get("CRASH_AT", "").split(","):
        # held until the file is there, if the test says so (bounded by the session's own)
        held = os.environ.get("CRASH_HELD_FOR", "") if os.environ.get(
            "CRASH_HELD"
        ) == f"{name} {{n}}" else ""
        while held and not Path(held).exists():
            time.sleep(0.02)
        os._exit(1)  # the worker dies as a segfault would kill it
"""
CONFTEST = """\
from pathlib import Path

from tests import conftest
from tests.conftest import (  # noqa: F401
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_xdist_make_scheduler,
)

conftest.DURATIONS = Path(__file__).with_name("durations.json")
"""
ROOT = TOOL.parent.parent
MODULES: dict[str, list[object]] = {"long": [0, 1], "mid": [0, 1, 2], "short": [0, 1, 2, 3, 4, 5]}
"""Longest recorded first, fewest tests first: xdist's own order (by test count) is the reverse."""


# Seconds a generated session may take before it counts as hung. It takes 1-4 s, but a test
# worker of a loaded CI (five workers and their daemons on two cores) starts three interpreters
# for it (the controller and two workers, each importing pytest, xdist and the suite's
# conftest): 90 s, the bound before session 73, was once not enough. A session that passes
# costs no more for a longer bound; one that hangs is still killed and fails its test.
SESSION_BOUND = 240
pytestmark = pytest.mark.timeout(2 * SESSION_BOUND + 60)  # one test runs two sessions


def run_session(
    where: Path,
    *args: str,
    modules: dict[str, list[object]] = MODULES,
    crash_at: str = "",
    returncode: int = 0,
    conftest_extra: str = "",
    env: Mapping[str, str] | None = None,
) -> tuple[list[list[str]], str]:
    """Run the generated modules in a pytest of their own (``crash_at``: "module n", the test
    whose worker dies); what they noted, ``[worker, "setup" or "test", module, (test)]`` in the
    order it happened, and the session's output. A session that hangs is killed, workers and
    all, and fails the test."""
    where.mkdir()
    # the suite's own setting: pytest-asyncio warns without it
    (where / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    (where / "conftest.py").write_text(CONFTEST + conftest_extra)
    for name, params in modules.items():
        (where / f"test_{name}.py").write_text(MODULE.format(name=name, params=params))
    recorded = {"test_long.py::test_it[0]": 9.0, "test_mid.py": 5.0, "test_short.py::test_it[1]": 1}
    (where / "durations.json").write_text(json.dumps(recorded))
    log = where / "order.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CRASH_"))}
    with subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", *args],
        cwd=where,
        env=base
        | dict(env or {})
        | {"PYTHONPATH": str(ROOT), "ORDER_LOG": str(log), "CRASH_AT": crash_at},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its workers with it, if it hangs
    ) as ran:
        try:
            out, _ = ran.communicate(timeout=SESSION_BOUND)
        except subprocess.TimeoutExpired:
            # Each process says where it is (pytest's faulthandler dumps every thread's stack
            # on SIGABRT) before it is killed, so that a hang says where it hung.
            os.killpg(ran.pid, signal.SIGABRT)
            try:
                out, _ = ran.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(ran.pid, signal.SIGKILL)
                out, _ = ran.communicate()
            pytest.fail(f"the session hung: {log.read_text() if log.exists() else ''}{out[-6000:]}")
    assert ran.returncode == returncode, out[-3000:]
    return [line.split() for line in log.read_text().splitlines()], out


def test_each_worker_takes_whole_modules_longest_first(tmp_path: Path) -> None:
    """With workers, a module goes to one worker whole, in its order, so that its module-scoped
    fixture (a cluster, in the suite) is set up once; the longest recorded is handed out first
    (xdist would hand out the module of the most tests first). Handed out a test at a time
    (session 61), two of the three modules ran on both workers, their fixtures set up on
    each."""
    noted, out = run_session(tmp_path / "run", "-n", "2", "-vv")  # -q -vv: verbose
    assert "scheduling tests via WholeModules\n" in out, out[-3000:]  # the conftest's
    setups = [(worker, module) for worker, what, module, *_ in noted if what == "setup"]
    assert sorted(module for _, module in setups) == sorted(MODULES), noted
    worker_of = {module: worker for worker, module in setups}
    for name, params in MODULES.items():
        ran = [line for line in noted if line[1:3] == ["test", name]]
        assert [(worker, int(n)) for worker, _, _, n in ran] == [
            (worker_of[name], n) for n in params
        ], noted
    assert next(m for w, m in setups if w == worker_of["long"]) == "long", noted


def test_a_worker_that_crashes_mid_module_is_one_failed_test_and_the_run_ends(
    tmp_path: Path,
) -> None:
    """A test that kills its worker in the second module that worker took: xdist 3.8 put the
    worker's finished module back on the queue too, handed it to the replacement worker as no
    tests at all, and the run hung (the crashed test, still pending, ran again on each
    replacement). Now the crashed test is reported failed once, the module's other tests run
    once each, on another worker: its fixture set up again there, a new process (inherent)."""
    noted, out = run_session(tmp_path / "run", "-n", "2", crash_at="short 2", returncode=1)
    setups = [(worker, module) for worker, what, module, *_ in noted if what == "setup"]
    crashed = next(worker for worker, *test in noted if test == ["test", "short", "2"])
    assert [m for w, m in setups if w == crashed] == ["long", "short"], noted  # its second
    assert sorted(m for _, m in setups) == ["long", "mid", "short", "short"], noted
    tests = [(worker, module, int(n[0])) for worker, what, module, *n in noted if what == "test"]
    assert sorted((m, n) for _, m, n in tests) == [(m, n) for m in MODULES for n in MODULES[m]]
    rest = {worker for worker, module, n in tests if module == "short" and n > 2}
    assert len(rest) == 1 and crashed not in rest, noted
    assert re.search(r"\b1 failed, 10 passed\b", out), out[-3000:]
    assert out.count("crashed while running 'test_short.py::test_it[2]'") == 1, out[-3000:]


def test_a_second_crash_while_a_replacement_worker_collects_is_one_more_failed_test(
    tmp_path: Path,
) -> None:
    """Review s62 M1: a worker that crashes while the one that replaced an earlier crashed
    worker is still collecting: handed a module before its collection was in (the crash's
    ``remove_node`` looked at every worker), the replacement never got it sent, and the run
    hung. Here the first replacement (gw2) holds its collection until the second crash
    (``mid 1``, held until gw2 has begun) has been heard of; each crashed test is one failed
    test, every other test runs once."""
    release = tmp_path / "run" / "gw2-collecting"
    slow = f"""
import os
import time
from pathlib import Path

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which says the collection is in
def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER") != "gw2":
        return
    Path({str(release)!r}).touch()  # the second crash may come now
    log = Path(os.environ["ORDER_LOG"])
    deadline = time.monotonic() + 60
    while "test mid 1" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(2)  # the controller hears of that crash meanwhile
"""
    noted, out = run_session(
        tmp_path / "run",
        "-n",
        "2",
        crash_at="long 1,mid 1",
        returncode=1,
        conftest_extra=slow,
        env={"CRASH_HELD": "mid 1", "CRASH_HELD_FOR": str(release)},
    )
    assert release.exists(), out[-3000:]  # the replacement was gw2, and it collected slowly
    tests = sorted((m, int(n[0])) for _, what, m, *n in noted if what == "test")
    assert tests == [(m, n) for m in MODULES for n in MODULES[m]], noted  # each once
    assert re.search(r"\b2 failed, 9 passed\b", out), out[-3000:]
    for crashed in ("test_long.py::test_it[1]", "test_mid.py::test_it[1]"):
        assert out.count(f"crashed while running '{crashed}'") == 1, out[-3000:]


def test_a_parameter_holding_double_colons_stays_with_its_module(tmp_path: Path) -> None:
    """An id such as ``[https://[::1]:8443/]``: xdist's loadscope takes what is before the last
    ``::`` for the unit, which made that test a unit of its own, its module's fixture set up
    again on the other worker."""
    params: list[object] = ["a", "https://[::1]:8443/", "b"]
    noted, _ = run_session(tmp_path / "run", "-n", "2", modules={"v6": params})
    assert [what for _, what, *_ in noted] == ["setup", "test", "test", "test"], noted
    assert len({worker for worker, *_ in noted}) == 1, noted


@pytest.mark.parametrize(
    "dist",
    [["--dist", "load"], ["-d"]],  # -d: xdist's shortcut, which sets distload, not dist
    ids=["--dist-load", "-d"],
)
def test_a_dist_on_the_command_line_is_xdists_own(tmp_path: Path, dist: list[str]) -> None:
    _, out = run_session(tmp_path / "run", "-n", "2", *dist, "-vv")  # -q -vv: verbose
    assert "scheduling tests via LoadScheduling\n" in out, out[-3000:]


def test_an_xdist_without_what_the_scheduler_uses_hands_out_one_test_at_a_time(
    tmp_path: Path,
) -> None:
    """An xdist to come whose ``LoadScopeScheduling`` lacks a method the conftest's scheduler
    overrides or calls: xdist's ``load``, one test at a time, as before; never a failed run."""
    gone = "from xdist.scheduler import LoadScopeScheduling\ndel LoadScopeScheduling._split_scope\n"
    noted, out = run_session(tmp_path / "run", "-n", "2", "-vv", conftest_extra=gone)
    assert "scheduling tests via LoadScheduling\n" in out, out[-3000:]
    assert "LoadScopeScheduling is not 3.8's: the workers take one test at a time" in out, out
    assert len([line for line in noted if line[1] == "test"]) == sum(map(len, MODULES.values()))


def test_without_workers_the_modules_still_run_longest_first_each_fixture_once(
    tmp_path: Path,
) -> None:
    """``-n 0`` and ``-p no:xdist`` (a debugger's run): the hooks ask xdist for nothing."""
    for at, args in enumerate((["-n", "0"], ["-p", "no:xdist"])):
        noted, _ = run_session(tmp_path / f"run{at}", *args)
        assert [(w, what, m) for w, what, m, *_ in noted if what == "setup"] == [
            ("main", "setup", name) for name in MODULES
        ], args
        assert len(noted) == len(MODULES) + sum(map(len, MODULES.values())), args


def test_a_durations_file_of_another_shape_leaves_the_order_as_collected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = tmp_path / "durations.json"
    monkeypatch.setattr(conftest, "DURATIONS", recorded)
    for text in ("[1, 2]", '{"b.py::t": "long"}', "{", '"text"'):
        recorded.write_text(text)
        items = [_Item(n) for n in ("a.py::t", "b.py::t")]
        conftest.pytest_collection_modifyitems(items)  # type: ignore[arg-type]
        assert [i.nodeid for i in items] == ["a.py::t", "b.py::t"], text


def test_a_replacement_worker_gets_addresses_no_running_worker_has() -> None:
    """xdist names a worker that replaces a crashed one gw6, gw7, ... (with ``-n 6``, gw0 to
    gw5 run): the second octet is the worker's id modulo 6, so gw6 had gw0's very addresses
    while gw0 still ran its cluster."""
    code = "from tests import conftest; print(*(conftest.next_loopback() for _ in range(300)))"

    def addresses(worker: str) -> set[str]:
        env = {**os.environ, "PYTEST_XDIST_WORKER": worker, "TLSROLL_TEST_SLOT": "3"}
        out = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return set(out.stdout.split())

    first, replacement, other = addresses("gw0"), addresses("gw6"), addresses("gw1")
    assert len(first) == len(replacement) == 300
    assert not first & replacement
    assert not first & other
    assert all(a.startswith("127.") for a in first | replacement)
