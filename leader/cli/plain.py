"""Tables and styled lines drawn with the standard library: what ``tlsroll schema show`` prints.

Why not rich here: importing rich and drawing one rollout's table with it took about 40 ms of a
command whose goal is 150 ms (issue 15), for tables that need little of it. The look is rich's
default table (heavy head, a space either side of each cell), styles on a terminal only (none
with ``NO_COLOR`` set and not empty, or ``TERM=dumb``), and a table wider than the terminal
folds its widest columns' cells onto more lines, as rich does. Into a pipe or a log a table is
drawn at its natural width, whatever ``COLUMNS`` says, and lines of text stay whole: no cell
folds (an address folded at 200 columns, ``…/praxis_liv`` over ``e/``, was not found by a grep
of a ``--wait`` log; session 75); on a terminal a line of text folds at its spaces (``fold``).

Text from peers (a node's reason, a workstation's name) is printed as it came except for control
and format characters, which are replaced: a reason must not move the cursor, recolour the
terminal or reorder what follows it (rich strips only a few of them: BEL, BS, VT, FF, CR).

Each drawing is also a rich renderable (``__rich_console__``), for the commands that print
through rich (``rollout status``, ``--watch`` on a terminal) and for tests.
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions

SGR = {
    "bold": "1",
    "reverse": "7",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "cyan": "36",
}
"""The styles the schema uses, as ANSI SGR parameters."""


def clean(text: str) -> str:
    """``text`` with each control or format character (C0, C1, DEL, bidi overrides, …:
    Unicode category C) shown as ``?``, and a tab or line break as a space (see the module
    docstring). The leader cleans what peers send as it comes in (``tlsroll.peertext``); this
    holds whatever the store has, and keeps the layout's own spacing."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        " " if ch in "\t\n\r" else "?" if unicodedata.category(ch)[0] == "C" else ch for ch in text
    )


def cell_len(text: str) -> int:
    """Terminal columns of ``text``: wide East Asian characters take two."""
    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


@dataclass(frozen=True)
class Styled:
    """One line of text in a style (``"bold red"``; ``""`` for none)."""

    text: str
    style: str = ""

    def paint(self, color: bool, text: str | None = None) -> str:
        body = clean(self.text if text is None else text)
        codes = [SGR[s] for s in self.style.split() if s in SGR]
        if not color or not codes or not body:
            return body
        return f"\x1b[{';'.join(codes)}m{body}\x1b[0m"


Cell = str | Styled


class Table:
    """Headers and rows of cells, drawn as rich's default table."""

    def __init__(self, *headers: str, floors: Mapping[str, int] | None = None) -> None:
        self.headers = list(headers)
        self.rows: list[list[Styled]] = []
        # None: the widest columns fold first, down to their longest word, as rich folds them;
        # else only the columns named fold, down to the width given, before any other does.
        self.floors = floors

    def add_row(self, *cells: Cell) -> None:
        self.rows.append([c if isinstance(c, Styled) else Styled(c) for c in cells])

    def lines(self, width: int | None, color: bool) -> list[str]:
        """The table's lines, ``width`` columns at most (its widest cells folded), or at its
        natural width (None: into a pipe or a log, where nothing folds)."""
        head = [Styled(h, "bold") for h in self.headers]
        natural = [
            max(cell_len(clean(r[i].text)) for r in [head, *self.rows]) for i in range(len(head))
        ]
        least = [max(min_width(r[i].text) for r in [head, *self.rows]) for i in range(len(head))]
        if self.floors is not None:
            floors = self.floors
            least = [min(w, floors.get(h, w)) for h, w in zip(self.headers, natural, strict=True)]
        widths = (  # (borders, a space each side)
            natural if width is None else fit(natural, least, width - 1 - 3 * len(head))
        )

        def rule(left: str, fill: str, cross: str, right: str) -> str:
            return left + cross.join(fill * (w + 2) for w in widths) + right

        def row(cells: Sequence[Styled], bar: str, bottom: bool = False) -> list[str]:
            folded = [wrap(clean(c.text), w) for c, w in zip(cells, widths, strict=True)]
            height = max(len(f) for f in folded)
            if bottom:  # headers sit on the rule below them, as rich draws them
                folded = [[""] * (height - len(f)) + f for f in folded]
            out = []
            for n in range(height):
                parts = []
                for c, f, w in zip(cells, folded, widths, strict=True):
                    text = f[n] if n < len(f) else ""
                    parts.append(f" {c.paint(color, text)}{' ' * (w - cell_len(text))} ")
                out.append(bar + bar.join(parts) + bar)
            return out

        lines = [rule("┏", "━", "┳", "┓"), *row(head, "┃", bottom=True), rule("┡", "━", "╇", "┩")]
        for r in self.rows:
            lines += row(r, "│")
        lines.append(rule("└", "─", "┴", "┘"))
        return lines


def min_width(text: str) -> int:
    """How narrow a column may fold: its longest word, at most 10 columns."""
    return min(10, max((cell_len(w) for w in clean(text).split()), default=1))


def fit(widths: list[int], minimums: list[int], room: int) -> list[int]:
    """Column widths that fit ``room`` by narrowing the widest columns first: down to their
    minimum (words stay whole), then, if that is not enough, down to 3 columns (words are cut);
    a table that still does not fit is left to the terminal to wrap."""
    widths = [max(w, 1) for w in widths]
    for floor in (minimums, [3] * len(widths)):
        while sum(widths) > room:
            candidates = [i for i, w in enumerate(widths) if w > max(floor[i], 1)]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: widths[i])
            widths[widest] -= 1
    return widths


def wrap(text: str, width: int) -> list[str]:
    """``text`` folded at spaces into lines of at most ``width`` columns (a longer word is
    cut)."""
    if cell_len(text) <= width:
        return [text]
    lines: list[str] = []
    line = ""
    for whole in text.split(" "):
        word = whole
        while cell_len(word) > width:  # cut what cannot fit on any line
            if line:
                lines.append(line)
                line = ""
            cut = width
            while cut > 1 and cell_len(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if cell_len(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    return lines


UNITS = re.compile(r"(?:[^ `]|`[^`]*`?)+")
r"""A word of a paragraph: what has no space in it (a path, a URL), or a command in backticks
with the words stuck to it (``\`systemctl restart x\`,``): ``fold`` never breaks one."""
COMMANDS = ("tlsroll", "systemctl", "journalctl", "sudo")
"""The words a command without backticks starts with (the leader's texts name them so:
"run tlsroll rollout finalize r2, or …"): ``fold`` keeps one whole (``units``)."""
COMMAND_WORDS = 10
"""At most this many words are one command (a sentence that merely names tlsroll ends it)."""


def units(text: str) -> list[str]:
    """``text``'s words (``UNITS``), a command without backticks one of them: from its first
    word (``COMMANDS``) to the word that ends in punctuation (``,;:).``), or before one that
    opens a parenthesis or is a dash, at most ``COMMAND_WORDS`` words."""
    words = UNITS.findall(text)
    out: list[str] = []
    i = 0
    while i < len(words):
        end = i + 1
        if words[i].lstrip("(") in COMMANDS:
            while (
                end < min(len(words), i + COMMAND_WORDS)
                and words[end - 1][-1] not in ",;:)."
                and not words[end].startswith(("(", "—", "`"))
            ):
                end += 1
        out.append(" ".join(words[i:end]))
        i = end
    return out


HANGING = re.compile(r" *(?:[-!*] |\d+\. )? *")
"""A paragraph's lead (``"  ! "``, ``"  1. "``): how far its folded lines are indented."""


def fold(text: str, width: int) -> list[str]:
    """A paragraph folded at its spaces into lines of at most ``width`` columns, the lines
    after the first indented as far as its lead (``HANGING``). A path, a URL or a command in
    backticks is never broken (an admin copies it): one wider than the room left gets a line
    of its own, which the terminal folds (a copy from it is still one line). A terminal folds
    a long line anywhere, in the middle of a word (review s71 "80 columns")."""
    text = clean(text)
    if cell_len(text) <= width:
        return [text]
    lead = HANGING.match(text)
    indent = " " * (lead.end() if lead and lead.end() < width // 2 else 0)
    words = units(text[len(indent) :])
    lines: list[str] = []
    line, start = text[: len(indent)], True
    for word in words:
        if not start and cell_len(line) + 1 + cell_len(word) > width:
            lines.append(line)
            line = indent + word
        else:
            line += word if start else f" {word}"
        start = False
    lines.append(line)
    return lines


Part = Styled | Table | str | list[Styled]
"""What a block holds: a line (a list of styled pieces is one line), or a table."""


class Block:
    """Styled lines and tables, one under the other (rich's ``Group``)."""

    def __init__(self, *parts: Part) -> None:
        self.parts = list(parts)

    def lines(self, width: int | None, color: bool, folds: bool = False) -> list[str]:
        """``folds``: a line of text folds at its spaces to ``width`` (``fold``: on a
        terminal; into a pipe or a log it stays one line). ``width`` None: into a pipe or a
        log, tables at their natural width (``Table.lines``)."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, Table):
                out += part.lines(width, color)
            elif isinstance(part, list):
                out.append("".join(piece.paint(color) for piece in part))
            else:
                line = part if isinstance(part, Styled) else Styled(part)
                texts = fold(line.text, width) if folds and width is not None else [line.text]
                out += [line.paint(color, text) for text in texts]
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Any]:
        from rich.text import Text  # noqa: PLC0415 - only a command that prints with rich

        for line in self.lines(options.max_width, color=True):
            yield Text.from_ansi(line)  # a line longer than the screen folds, as rich folds


def terminal() -> tuple[int | None, bool]:
    """The width to draw at (on a terminal ``COLUMNS`` if set, else the terminal's; into a
    pipe or a log None: tables at their natural width, ``COLUMNS`` or not) and whether to
    colour (on a terminal only)."""
    if not sys.stdout.isatty():
        return None, False
    columns = os.environ.get("COLUMNS", "")
    given = int(columns) if columns.isdigit() and int(columns) >= 40 else None
    color = not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"  # (set, not "")
    if given is None:
        try:
            given = os.get_terminal_size(sys.stdout.fileno()).columns or 80  # 0: unknown
        except OSError:
            given = 80
    return given, color


def screen() -> int | None:
    """The width of the terminal stdout is (``terminal``'s), None into a pipe or a log: what a
    drawing that goes without columns on a narrow screen is given (scripts read the pipe)."""
    return terminal()[0]


def emit(*parts: Block | Part) -> None:
    """Print drawings to stdout, for the terminal or the pipe it goes to."""
    width, color = terminal()
    folds = sys.stdout.isatty()
    text = "\n".join(
        line
        for part in parts
        for line in (part if isinstance(part, Block) else Block(part)).lines(width, color, folds)
    )
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
