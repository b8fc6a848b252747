"""The order the suite runs in: the longest recorded tests first (tests/conftest.py,
tools/test_durations.py)."""

from __future__ import annotations

import json
import subprocess
import sys
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
(12 durations < 0.005s hidden.  Use -vv to show these durations.)
"""


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_tool_records_each_slow_tests_whole_time_longest_first(tmp_path: Path) -> None:
    log, out = tmp_path / "pytest.log", tmp_path / "durations.json"
    log.write_text(REPORT)
    ran = run_tool(str(log), "--out", str(out))
    assert ran.returncode == 0, ran.stderr
    recorded = json.loads(out.read_text())
    assert list(recorded.items()) == [
        ("tests/test_b.py::test_slow[one]", 12.9),
        ("tests/test_a.py::test_middle", 3.0),
        ("tests/test_c.py::test_blocked[loop blocked]", 1.5),
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
    is shorter), each in one piece and in its own order (a module-scoped cluster is set up once
    per worker, its tests written in that order); what the file does not name keeps its place
    after."""
    recorded = tmp_path / "durations.json"
    recorded.write_text(
        json.dumps({"b.py::long": 10.0, "a.py::x": 5.0, "a.py::y": 1.0, "gone.py::t": 99.0})
    )
    monkeypatch.setattr(conftest, "DURATIONS", recorded)
    order = ["c.py::one", "a.py::y", "a.py::new", "a.py::x", "c.py::two", "b.py::long", "d.py::t"]
    items = [_Item(n) for n in order]
    conftest.pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == [
        "b.py::long",
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


def test_the_workers_take_one_test_at_a_time(request: pytest.FixtureRequest) -> None:
    """xdist's first hand-out, without it, is a contiguous chunk of the sorted tests per
    worker: the first worker would get every long one. (``make test`` always loads xdist; a
    run with ``-p no:xdist`` has no workers and no such option.)"""
    if request.config.pluginmanager.hasplugin("xdist"):
        assert request.config.getoption("maxschedchunk") == 1


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
