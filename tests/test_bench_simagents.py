"""``bench.simagents`` marks the rows whose CPU figures a profiler or tracer inflated (review
1b of session 31, finding 8): with ``--yappi`` yappi runs inside the leader over the idle
window too, whose CPU gives the heartbeat figures, so that row is no figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import simagents


def _options(**given: object) -> argparse.Namespace:
    options: dict[str, object] = {"yappi": None, "profile": None, "memory": None, "fsyncs": False}
    options.update(given)
    return argparse.Namespace(**options)


def test_a_profiled_or_traced_run_s_row_is_marked_not_a_figure(tmp_path: Path) -> None:
    assert simagents._not_a_figure(_options()) == ""
    for flag in ("yappi", "profile", "memory"):
        mark = simagents._not_a_figure(_options(**{flag: tmp_path}))
        assert mark.strip() == "(profiled: not a figure)"
    assert simagents._not_a_figure(_options(fsyncs=True)).strip() == "(strace: CPU not a figure)"
    mark = simagents._not_a_figure(_options(yappi=tmp_path, fsyncs=True))
    assert mark.strip() == "(profiled: not a figure)"
