"""``bench.rollout`` runs the daemons from the tree's modules compiled once before its runs, as
from an installed package (issue 15, session 30): with ``PYTHONDONTWRITEBYTECODE`` set, as in
the development shell, each daemon compiled tlsroll's own modules again at each start and at
each later import, the first node's certificate code and bootstrap service among them (on the
way to the rollout's first switch), which no installed agent does."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from bench import rollout


def test_the_bench_compiles_the_tree_s_packages_where_python_reads_them(tmp_path: Path) -> None:
    """``cache_bytecode`` writes each module's bytecode where the import system looks for it,
    and a child with ``PYTHONDONTWRITEBYTECODE`` set (which stops writing, not reading) loads
    it: the package's sources are not compiled again (2 of them without the cache)."""
    package = tmp_path / "benchpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "mod.py"
    module.write_text("VALUE = 1\n")
    assert rollout.cache_bytecode(tmp_path, ("benchpkg",))
    cached = Path(importlib.util.cache_from_source(str(module)))
    assert cached.is_file()
    probe = (  # counts the package's modules the import system compiles from source
        "compiled = []\n"
        "import importlib._bootstrap_external as ext\n"
        "real_code = ext.SourceLoader.source_to_code\n"
        "def source_to_code(self, data, path, *a, **k):\n"
        "    compiled.append(str(path))\n"
        "    return real_code(self, data, path, *a, **k)\n"
        "ext.SourceLoader.source_to_code = source_to_code\n"
        "import benchpkg.mod\n"
        "print(sum('benchpkg' in c for c in compiled))\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["0"]


def test_the_packages_the_bench_compiles_are_the_tree_s() -> None:
    tree = Path(rollout.__file__).resolve().parents[1]
    assert all((tree / name / "__init__.py").is_file() for name in rollout.PACKAGES)
