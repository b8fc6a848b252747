"""Regenerate (or check) the Python code for the gRPC contract in ``proto/``.

One command makes ``*_pb2.py``, ``*_pb2_grpc.py`` and their ``.pyi`` stubs (mypy-protobuf) in
``tlsroll/v1/``::

    python tools/protogen.py            # write the generated files
    python tools/protogen.py --check    # fail if the committed files differ from a fresh run
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = Path("tlsroll") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    found = scripts / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if which is None:
        raise SystemExit(
            f"protogen: {name} not found; install the codegen extra: pip install -e '.[codegen]'"
        )
    return which


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto file; return the generated files relative to out_root."""
    protos = sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p) for p in protos),
    ]
    subprocess.run(args, check=True, cwd=PROTO_DIR)
    return sorted(  # only our package: out_root may be the repository, .venv and all
        p.relative_to(out_root)
        for p in (out_root / OUT_PACKAGE).rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def committed_files() -> list[Path]:
    return sorted(
        p.relative_to(ROOT)
        for p in (ROOT / OUT_PACKAGE).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def check() -> list[str]:
    """Return one line per difference between the committed and a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = []
        for rel in sorted(set(fresh) | set(committed_files())):
            mine, theirs = ROOT / rel, Path(tmp) / rel
            if not mine.exists():
                problems.append(f"{rel}: missing from the tree (run `make proto`)")
            elif not theirs.exists():
                problems.append(f"{rel}: generated file with no .proto source (delete it)")
            elif not filecmp.cmp(mine, theirs, shallow=False):
                problems.append(f"{rel}: differs from a fresh generation (run `make proto`)")
        return problems


CONTRACT = ROOT / "tlsroll" / "contract.py"
REVISION_LINE = re.compile(r'^REVISION = "([0-9a-f]*)"(?=\n)', re.M)


def revision() -> str:
    """``tlsroll.contract.computed()`` of the tree's generated modules, in a fresh process
    (this one may have imported others)."""
    out = subprocess.run(
        [sys.executable, "-c", "from tlsroll import contract; print(contract.computed())"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return out.stdout.strip()


def revision_problem() -> str | None:
    """The contract revision written in ``tlsroll/contract.py`` (what the CLI speaks) if it is
    not the one computed from the generated modules (what the leader announces): a CLI and a
    leader of one tree would call each other other code (review rev51c, H1). None for a tree
    without it (the generated package alone)."""
    if not CONTRACT.exists():
        return None
    found = REVISION_LINE.search(CONTRACT.read_text())
    written = found.group(1) if found else None
    actual = revision()
    if written != actual:
        return f"tlsroll/contract.py: REVISION {written!r} is not {actual!r} (run `make proto`)"
    return None


def write_revision() -> None:
    if not CONTRACT.exists():
        return
    text = CONTRACT.read_text()
    new = REVISION_LINE.sub(f'REVISION = "{revision()}"', text, count=1)
    if new != text:
        CONTRACT.write_text(new)
        print("updated tlsroll/contract.py REVISION")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    ns = parser.parse_args()
    if ns.check:
        problems = check()
        if not problems and (wrong := revision_problem()):
            problems.append(wrong)
        for line in problems:
            print(f"proto drift: {line}", file=sys.stderr)
        return 1 if problems else 0
    for old in committed_files():
        (ROOT / old).unlink()
    for rel in generate(ROOT):
        print(f"generated {rel}")
    write_revision()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
