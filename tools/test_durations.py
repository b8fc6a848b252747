"""Record how long each slow test took, for the order pytest-xdist hands tests out in.

    make pytest PYTEST_ARGS="-n 4 --durations=0" | tee pytest.log
    .venv/bin/python tools/test_durations.py pytest.log      # rewrites tests/durations.json

``tests/conftest.py`` hands the modules with the most recorded time out first, each whole to
one worker (longest processing time first: the classic greedy schedule for parallel machines),
so that the run ends on short modules instead of one worker finishing a long one alone while
the others idle. A test of a second or more is named; a module's shorter tests are recorded
together under the module's own name (``tests/test_x.py``), so that a module of many quick
tests is not taken for an empty one, handed out last, and run on alone at the end. The file
only orders tests: a module it does not name runs after the recorded ones, in collection order;
an entry naming no test is ignored. Refresh it when the slow tests change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "durations.json"
MIN_SECONDS = 1.0
"""Shorter tests are counted only with the others of their module (and a module whose shorter
tests took less in all is left out): their own order hardly moves the run's end."""
LINE = re.compile(r"(?P<secs>\d+(?:\.\d+)?)s (?:setup|call|teardown)\s+(?P<nodeid>tests/.+)")
"""A report's line; the test's id is the rest of it (a parameter's id may hold spaces)."""


def read(log: Path) -> dict[str, float]:
    """Each test's setup + call + teardown from a ``--durations=0`` report."""
    seconds: defaultdict[str, float] = defaultdict(float)
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if match := LINE.fullmatch(line.strip()):
            seconds[match["nodeid"]] += float(match["secs"])
    return dict(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="pytest output of a run with --durations=0")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    try:
        seconds = read(args.log)
    except OSError as exc:
        print(f"test_durations: cannot read {args.log}: {exc.strerror}", file=sys.stderr)
        return 1
    if not seconds:
        print(f"test_durations: no --durations=0 lines in {args.log}", file=sys.stderr)
        return 1
    slow = {nodeid: secs for nodeid, secs in seconds.items() if secs >= MIN_SECONDS}
    short: defaultdict[str, float] = defaultdict(float)
    for nodeid, secs in seconds.items():
        if secs < MIN_SECONDS:
            short[nodeid.split("::", 1)[0]] += secs
    modules = {module: secs for module, secs in short.items() if secs >= MIN_SECONDS}
    kept = {
        name: round(secs, 1)
        for name, secs in sorted((slow | modules).items(), key=lambda kv: (-kv[1], kv[0]))
    }
    temp = args.out.with_name(f".{args.out.name}.tmp")
    try:  # whole or not at all: the suite's order reads it
        temp.write_text(json.dumps(kept, indent=1) + "\n", encoding="utf-8")
        os.replace(temp, args.out)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        print(f"test_durations: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(
        f"{len(slow)} tests of {len(seconds)} took {MIN_SECONDS:g} s or more; the shorter tests"
        f" of {len(modules)} modules did together: {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
