"""Write the shell completion scripts of ``tlsroll`` (bash, zsh, fish) for an installer.

    python tools/completions.py [--out dist/completions]

click makes them (``tlsroll`` answers ``_TLSROLL_COMPLETE=bash_source`` and the like); this
only writes what it says, in the layout the shells look for::

    OUT/bash/tlsroll        -> /usr/share/bash-completion/completions/tlsroll
    OUT/zsh/_tlsroll        -> /usr/share/zsh/vendor-completions/_tlsroll
    OUT/fish/tlsroll.fish   -> /usr/share/fish/vendor_completions.d/tlsroll.fish

The scripts call ``tlsroll`` itself for the words to offer, so they stay right when commands
change; only a change of click's protocol needs them written again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from click.shell_completion import get_completion_class

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from tlsroll.cli import cli  # noqa: E402

PROG = "tlsroll"
COMPLETE_VAR = "_TLSROLL_COMPLETE"
FILES = {"bash": "bash/tlsroll", "zsh": "zsh/_tlsroll", "fish": "fish/tlsroll.fish"}


def script(shell: str) -> str:
    """The completion script click makes for ``shell``."""
    cls = get_completion_class(shell)
    if cls is None:
        raise SystemExit(f"completions: click knows no shell {shell!r}")
    return cls(cli, {}, PROG, COMPLETE_VAR).source().rstrip("\n") + "\n"


def generate(out: Path) -> list[Path]:
    written = []
    for shell, relative in FILES.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script(shell), encoding="utf-8")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "completions")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
