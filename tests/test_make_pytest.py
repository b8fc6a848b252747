"""``make pytest`` where ``PYTHONDONTWRITEBYTECODE`` is set (the CI machine): the test modules are
rewritten for their asserts once, before the workers start, and kept where pytest reads them
back (``__pycache__/*-pytest-*.pyc``). Before session 70 none was kept: each of the run's
workers rewrote every test module again as it collected (21.6 s of CPU a worker against 4.3 s,
about 35 s of a CI run's wall time on 2 cores before its first test).

The project's own Makefile, run on a tree of two small test modules, with a stand-in for the
virtual environment (this Python) and for the tools ``make pytest`` installs when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("test_one", "test_two")


def _tree(root: Path) -> tuple[Path, Path]:
    """A checkout of two test modules with the project's Makefile; its stand-in venv."""
    tree = root / "tree"
    (tree / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", tree / "Makefile")
    for package in ("leader", "nodeagent", "workstation", "refserver", "tlsroll", "bench"):
        (tree / package).mkdir()
    (tree / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    for name in MODULES:
        (tree / "tests" / f"{name}.py").write_text(
            f"def test_{name}() -> None:\n    assert len('{name}') == {len(name)}\n"
        )
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    pytest_script = venv / "bin" / "pytest"
    pytest_script.write_text(f'#!/bin/sh\nexec {sys.executable} -m pytest "$@"\n')
    pytest_script.chmod(0o755)
    stamp = venv / ".installed"  # installed: newer than pyproject.toml
    stamp.touch()
    later = (tree / "pyproject.toml").stat().st_mtime + 5
    os.utime(stamp, (later, later))
    return tree, venv


def _rewritten(tree: Path) -> list[str]:
    cache = tree / "tests" / "__pycache__"
    return sorted(p.name.split(".")[0] for p in cache.glob("*-pytest-*.pyc"))


def test_make_pytest_keeps_the_modules_rewritten_for_the_workers_to_read(tmp_path: Path) -> None:
    tree, venv = _tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MAKE"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    tool = str(venv / "bin" / "python")  # present: nothing to install
    made = subprocess.run(
        [
            *("make", "--no-print-directory", "-C", str(tree), f"VENV={venv}"),
            *(f"CHROMIUM={tool}", f"SYSTEMD_ANALYZE={tool}", f"NSPAWN={tool}"),
            *("pytest", "PYTEST_ARGS=-p no:xdist -p no:cacheprovider -q"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, (made.stdout, made.stderr)
    assert "2 passed" in made.stdout, made.stdout
    assert _rewritten(tree) == list(MODULES), made.stdout

    # A worker's collection (the variable set) reads them back, rewriting none of them.
    env["PYTEST_DEBUG"] = "1"
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert collected.returncode == 0, (collected.stdout, collected.stderr)
    traces = collected.stdout + collected.stderr
    for name in MODULES:
        assert f"found cached rewritten pyc for {tree / 'tests' / name}.py" in traces, name
    rewrote = [line for line in traces.splitlines() if f"rewriting PosixPath('{tree}/" in line]
    assert rewrote == [], rewrote
