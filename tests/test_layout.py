"""The tree says which process runs the code: the import rule between the role packages, and
what `tlsroll client` (on a practice PC) loads.

The rule itself is an import-linter contract in pyproject.toml (`[tool.importlinter]`), checked
here on the real tree and, to show the check can fail, on a copy with one forbidden import.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("leader", "nodeagent", "workstation", "refserver")
PACKAGES = ("tlsroll", *ROLES)


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_role_packages_never_import_each_other() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("where", "line", "contract"),
    [
        ("leader/engine.py", "import nodeagent.journal", "never import each other BROKEN"),
        ("refserver/server.py", "from workstation import cli", "never import each other BROKEN"),
        ("tlsroll/pki.py", "import leader.store", "imports no role package BROKEN"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path: Path, where: str, line: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    module = tmp_path / where
    module.write_text(module.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert contract in result.stdout, result.stdout


def test_tlsroll_client_loads_nothing_of_the_leader() -> None:
    """`tlsroll client --help` on a workstation: no leader, no gRPC, no rich (the admin
    CLI's tables), only the workstation package and what it needs."""
    code = (
        "import contextlib, io, json, sys\n"
        "from tlsroll.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    code = main(['client', '--help'])\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    exit_code, modules = json.loads(result.stdout)
    assert exit_code == 0
    tops = {m.split(".")[0] for m in modules}
    assert "workstation" in tops
    assert not tops & {"leader", "nodeagent", "refserver", "grpc", "rich", "aiohttp"}, sorted(tops)


def test_every_module_says_what_it_is_for() -> None:
    """Each module of ours opens with a docstring whose first line is its purpose."""
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            text = path.read_text().lstrip()
            if not text.startswith('"""') or not text[3:].split("\n", 1)[0].strip():
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []


def test_product_code_resolves_paths_through_real_path_alone() -> None:
    """``Path.resolve`` raises RuntimeError on a symbolic link loop in Python 3.11 (OSError
    from 3.13): every command and daemon took it for an internal error. Product code resolves
    through ``tlsroll.fsutil.real_path``, which raises OSError (ELOOP), and nowhere else."""
    calls = [
        f"{path}:{line}"
        for path, line, call in _calls()
        if isinstance(call.func, ast.Attribute) and call.func.attr == "resolve" and not call.args
    ]
    fsutil = (ROOT / "tlsroll" / "fsutil.py").read_text().splitlines()
    (own,) = [n for n, line in enumerate(fsutil, 1) if line.strip() == "return path.resolve()"]
    assert calls == [f"tlsroll/fsutil.py:{own}"]


LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
EVENT_NAME = re.compile(r"[a-z]+(_[a-z]+)*\.[a-z]+(_[a-z]+)*")


@functools.cache  # (parsed once for the tests below)
def _calls() -> list[tuple[str, int, ast.Call]]:
    """Every call in our packages' code (generated protobuf code aside): path, line, call."""
    calls = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    calls.append((str(path.relative_to(ROOT)), node.lineno, node))
    return calls


def _log_calls() -> list[tuple[str, int, ast.Call]]:
    return [
        (path, line, call)
        for path, line, call in _calls()
        if isinstance(call.func, ast.Attribute)
        and call.func.attr in LOG_METHODS
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "log"
    ]


def test_log_events_follow_one_naming_scheme() -> None:
    """``subject.what_happened`` in lower snake case, a literal, in every package."""
    calls = _log_calls()
    assert len(calls) > 50  # the scan finds the daemons' logging at all
    bad = [
        f"{path}:{line}"
        for path, line, call in calls
        if not (
            call.args
            and isinstance(call.args[0], ast.Constant)
            and isinstance(call.args[0].value, str)
            and EVENT_NAME.fullmatch(call.args[0].value)
        )
    ]
    assert bad == []


# Warning and error events that say neither what to do (``hint``) nor what they mean
# (``detail``): the debt when session 70 added the test below (178 events), paid off the same
# session. The list only shrinks: it is empty now, and a new warning or error needs a hint.
_NO_HINT_YET = ""
NO_HINT_YET = frozenset(_NO_HINT_YET.split())
SAYS_WHAT_TO_DO = {"hint", "detail"}


def test_warnings_and_errors_say_what_to_do() -> None:
    """Session 69's log review: what a busy admin reads in ``journalctl -u tlsroll-*`` at
    warning or error level should say what to do about it (``hint``) or what it means
    (``detail``); ``viewer.too_many_streams``, the reference server's ``store.read_only`` and
    ``bootstrap.delivery_late`` said neither. Every such call has one, or its event is on
    ``NO_HINT_YET`` (the rest of the debt); an event on it that has one at every call, or is
    logged nowhere any more, is taken off."""
    calls = _log_calls()
    loud = [
        (path, line, call.args[0].value, {k.arg for k in call.keywords})
        for path, line, call in calls
        if call.func.attr in ("warning", "error", "exception", "critical")  # type: ignore[attr-defined]
        and call.args
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
    ]
    assert len(loud) > 100  # the scan finds them at all
    bad = [
        f"{path}:{line} {event}"
        for path, line, event, said in loud
        if not said & SAYS_WHAT_TO_DO and event not in NO_HINT_YET
    ]
    assert bad == [], "say what to do (hint=...) or what it means (detail=...)"
    still = {event for _, _, event, said in loud if not said & SAYS_WHAT_TO_DO}
    assert sorted(NO_HINT_YET - still) == [], "take these off NO_HINT_YET"


def test_every_logger_is_named_after_its_module() -> None:
    bad = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get_logger"
                    and not (
                        len(node.args) == 1
                        and isinstance(node.args[0], ast.Name)
                        and node.args[0].id == "__name__"
                    )
                    and path.name != "logs.py"
                ):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == []
