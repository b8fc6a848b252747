"""How the admin CLI draws a rollout and the rest of the schema on a terminal or into a log:
``tlsroll schema show``, ``rollout status`` and ``--wait``.

Drawn with ``leader.cli.plain`` (the standard library), not rich: see there why. Apart from
``leader.cli.schema_cmd`` so that ``schema show --json`` (monitoring scripts run it) imports none
of it. It draws the schema's JSON data (what ``schema show --json`` prints: enums as words,
times as RFC 3339 text, 64-bit numbers as text), which ``schema show`` reads without protobuf
(``leader.cli.base.fetch_schema_json``); a caller holding messages passes ``to_dict(message)``.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from leader.cli.plain import Block, Cell, Part, Styled, Table, cell_len, clean, fit, fold, wrap
from tlsroll.enums import CAP_SOURCE

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions

View = Mapping[str, Any]
"""A message of the schema as JSON data (``leader.cli.base.to_dict``)."""

PENDING = (
    "password change pending — takes effect with `tlsroll rollout start --change "
    "change-password` (which restarts the server)"
)
AWAITING = (
    "waiting for its first client report since the leader started (seconds once its agent is"
    " connected; else check: tlsroll nodes, on the node systemctl status tlsroll-agent)"
)
"""A node the leader has had no client report from since it started (``awaiting_report``):
who is on http there is not known yet; a finalize waits for it, ``--when-quiet`` holds it.
What to do if the wait lasts, as a finalize's refusal says it (``schema_view.waiting_for``;
review s45rev5 L2), and as the viewer's row says it (``leader.viewer.i18n``)."""
QUIET = "waits until no workstation was seen on http there for {seconds}s (--when-quiet)"
"""A pending node of a running ``finalize --when-quiet`` (``NodeView.waits_until_quiet``, which
the viewer's row shows too): the engine holds it while http clients were seen on it lately
(rev56f L1: it showed "pending" without a word why)."""
STATE_STYLE = {
    "needs_attention": "bold reverse red",
    "done": "green",
    "completed": "green",
    "failed": "red",
    "rolled_back": "red",
    "halted": "red",
    "aborted": "yellow",
    "skipped": "yellow",
    "paused": "yellow",
    "switching": "cyan",
    "confirming": "cyan",
    "running": "cyan",
    "dual": "green",
    "awaiting_finalize": "bold yellow",
}


def _dt(view: View, field: str) -> dt.datetime | None:
    text = view.get(field)
    return dt.datetime.fromisoformat(text).astimezone(dt.UTC) if text else None


def fmt_time(view: View, field: str) -> str:
    """``leader.cli.base.fmt_time`` of JSON data: ``-`` for a time not set."""
    when = _dt(view, field)
    return "-" if when is None else when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _styled(state: str) -> Styled:
    return Styled(state, STATE_STYLE.get(state, ""))


def residual(seconds: int) -> str:
    """``12d 3h``, ``5h 20m``, ``40s``; ``expired 2d ago`` for a negative residual."""
    if seconds < 0:
        return f"expired {residual(-seconds)} ago"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def freeze_window(node: View) -> str:
    """From, to (on the clock ``freeze_clock`` names) and how long: the length is the
    schema's (``freeze_seconds``, the agent's measure in elapsed time), which a step of that
    clock between the two times does not change. A leader that sends none (an older one): the
    times' difference, never below 0."""
    start, end = _dt(node, "freeze_started_at"), _dt(node, "freeze_ended_at")
    if start is None:
        return "-"
    if end is None:
        return f"{start:%H:%M:%S}–(frozen)"
    seconds = node.get("freeze_seconds")
    if seconds is None:
        seconds = max((end - start).total_seconds(), 0.0)
    return f"{start:%H:%M:%S}–{end:%H:%M:%S} ({_seconds(seconds)})"


def _seconds(value: object) -> str:
    """``12.3s``; a value that is not a finite number (JSON's "Infinity", "NaN") is ``?``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"
    return f"{number:.1f}s" if math.isfinite(number) else "?"


def freeze_clock(rollout: View) -> str:
    """Whose wall clock a rollout's freeze windows' times are on: each node's agent times its
    own freeze; with ``--freeze scope`` the leader times the scope freeze. Beside the step
    times (the leader's), a node's may differ by its clock's skew."""
    return "leader clock" if rollout.get("freeze") == "scope" else "node clock"


def left_as_is(names: Sequence[str]) -> str:
    """``1 node left as is: node3``: the nodes a way back (disable-tls) left as is, not known to
    be on http (the schema's ``left_as_is``); each one's reason says what to do."""
    return f"{len(names)} node{'' if len(names) == 1 else 's'} left as is: {', '.join(names)}"


def left_out(names: Sequence[str]) -> str:
    """``1 node left out: node2``: the nodes a finalize left out, their agents cut off (the
    schema's ``left_out``); each one's reason says what to do."""
    return f"{len(names)} node{'' if len(names) == 1 else 's'} left out: {', '.join(names)}"


def removed_since(names: Sequence[str]) -> str:
    """``left out, removed since (tlsroll nodes remove): node3``: the nodes of the rollout a
    retry or a way back retried or took back that it left out, no longer enrolled (the
    schema's ``removed_since``, stored with the rollout as it started)."""
    return f"left out, removed since (tlsroll nodes remove): {', '.join(names)}"


def _state_left(r: View) -> Styled:
    """The rollout's state; for a way back that left nodes as is, with them beside it
    (``completed, 1 node left as is: node3``): it did not put every node on http (review
    s45rev9 L3); for a finalize that left nodes out, likewise (``completed, 1 node left out:
    node2``): it did not close http everywhere (review s48rev5 L3)."""
    left = r.get("left_as_is") or []
    cut = r.get("left_out") or []
    if not left and not cut:
        return _styled(r["state"])
    marks = ([left_as_is(left)] if left else []) + ([left_out(cut)] if cut else [])
    return Styled(", ".join([r["state"], *marks]), "bold yellow")


def changed_text(n: View) -> str:
    """What a node's row says of a server that serves something else than the row says it
    was left serving (``NodeView.now_serves``: put back by hand since; review s70 drift L2)."""
    now = n.get("now_serves")
    return f"now serves {now} (changed since)" if now else ""


def _reasons(r: View, n: View) -> list[str]:
    """What a node's reason column says: its reason, then what it waits for."""
    return [
        said
        for said in [
            changed_text(n),
            n.get("reason"),
            PENDING if n.get("password_pending") else "",
            AWAITING if n.get("awaiting_report") else "",
            QUIET.format(seconds=r.get("when_quiet_seconds", 0))
            if n.get("waits_until_quiet")
            else "",
        ]
        if said
    ]


def _reason(r: View, n: View) -> str:
    """A node's reason column: its reason, then what it waits for."""
    return "; ".join(_reasons(r, n))


def shared_reasons(r: View, nodes: Sequence[View]) -> list[str]:
    """What the reason column of every one of two or more ``nodes`` says (a password change
    pending: at 80 columns five lines a row, the same on every row; review s71 "80
    columns"), which a terminal's table says once, under it."""
    said = [_reasons(r, n) for n in nodes]
    return [s for s in said[0] if all(s in other for other in said[1:])] if len(said) > 1 else []


def _head(r: View) -> list[Styled]:
    """The rollout's heading: its id, its state and its options, on one line."""
    scope_nodes = r.get("scope_nodes", [])
    if r["scope"] == "local":  # which node local is (review s69 revlocal2 L3)
        leader = next((n["name"] for n in r.get("nodes", []) if n.get("leader_node")), "")
        scope_nodes = [f"the leader node{', ' + leader if leader else ''}"]
    rest = Styled(
        f"  change {r['change']}  scope {r['scope']}"
        + (f" ({', '.join(scope_nodes)})" if scope_nodes else "")
        + f"  strategy {r['strategy']}  max-parallel {r['max_parallel']}"
        f"  freeze {r['freeze']}"
        f"  epoch {r['epoch']}"
        + (f"  finalizes {r['finalizes']}" if r.get("finalizes") else "")
        + (f"  when quiet for {r['when_quiet_seconds']}s" if r.get("when_quiet_seconds") else "")
    )
    head = [
        Styled(f"rollout {r['id']}", "bold"),
        Styled("  "),
        _state_left(r),
        rest,
    ]
    return head


COUNTS_ON_HTTP = ("enable-tls", "finalize")
"""The changes whose nodes' views count the workstations still on http there
(``leader.schema_view.COUNTS_ON_HTTP``, as the schema's JSON words them)."""


def counted_nodes(node_clients: Sequence[View]) -> frozenset[str]:
    """The nodes whose count of workstations still on http is known (the schema's
    ``node_clients``): their driver reports who connects (a source) and their report names no
    problem (the leader's own rule: a finalize refuses such a node, ``--when-quiet`` waits for
    it; review s75 revpipes M1), and it speaks for now (not ``awaiting_report``). Of the
    others a 0 is "cannot tell", as the lines under "who is on which scheme" say it
    (``render_clients``)."""
    return frozenset(
        v.get("node", "")
        for v in node_clients
        if (clients := v.get("clients") or {}).get("source")
        and not clients.get("problem")
        and not v.get("awaiting_report")
    )


def on_http(r: View, n: View, counted: Collection[str] | None) -> Styled:
    """A node's "still on http" cell: the count; 0 only where it is known (``counted``: of
    ``counted_nodes``; None: not known of any, as of a leader that sends no client report),
    else "-": a change that counts none, a driver that cannot tell, a report still awaited
    (session 75: "-" for every 0, where the lines under the table said "0 still on http")."""
    count = n.get("still_on_http")
    if count:
        return Styled(str(count))
    known = (
        r.get("change") in COUNTS_ON_HTTP
        and counted is not None
        and n.get("name") in counted
        and not n.get("awaiting_report")
    )
    return Styled("0" if known else "-")


def render_rollout(
    r: View, screen: int | None = None, counted: Collection[str] | None = None
) -> Block:
    """A rollout's heading and its nodes' table, every column (into a pipe or a log: scripts
    read it). On a terminal of ``screen`` columns too narrow for the table (rich's fold made an
    80-column row of eight lines, a cell a few letters wide; review s71 walkthrough L7), the
    table goes without the columns of ``LIVE_DROPS`` it has no room for, the first first, as
    the watch's live view does, and a line under it names them; its cells fold, never cut:
    what it shows stays whole (a reason says what to do). ``counted``: the nodes whose count
    of workstations still on http is known (``counted_nodes``; ``on_http``)."""
    head = _head(r)
    times = Styled(
        f"created {fmt_time(r, 'created_at')} by {r.get('started_by') or '-'}"
        f"   started {fmt_time(r, 'started_at')}   ended {fmt_time(r, 'ended_at')}"
        + (f"   note: {r['reason']}" if r.get("reason") else "")
    )
    removed = r.get("removed_since") or []
    nodes = r.get("nodes", [])
    freeze = f"freeze window ({freeze_clock(r)})"
    shared = [] if screen is None else shared_reasons(r, nodes)  # (a pipe: each row whole)
    columns: dict[str, list[Styled]] = {
        "#": [Styled(str(i)) for i, _ in enumerate(nodes, 1)],
        "node": [Styled(n["name"] + (" (leader)" if n.get("leader_node") else "")) for n in nodes],
        "state": [_styled(n["state"]) for n in nodes],
        "old address": [Styled(n.get("old_url") or "-") for n in nodes],
        "new address": [Styled(n.get("new_url") or "-") for n in nodes],
        freeze: [Styled(freeze_window(n)) for n in nodes],
        "restart": [
            Styled(_seconds(n["restart_seconds"]) if n.get("restart_seconds") else "-")
            for n in nodes
        ],
        "cert expires": [Styled(fmt_time(n, "cert_not_after")) for n in nodes],
        "still on http": [on_http(r, n, counted) for n in nodes],
        "reason": [Styled("; ".join(s for s in _reasons(r, n) if s not in shared)) for n in nodes],
    }
    _no_empty_reason(columns, shared)
    # The columns go while the new address does not fit whole and the reason 30 wide (they
    # fold: a reason may be long); what still does not fit folds, the reason first (down to
    # 30), then the widest (the address before a node's name, by which the admin reads it).
    left = _fit_columns(columns, {"freeze": freeze, "on http": "still on http"}, screen, FOLDS)
    table = Table(*columns, floors=None if screen is None else {"reason": FOLDS["reason"]})
    for k in range(len(nodes)):
        table.add_row(*(cells[k] for cells in columns.values()))
    lines: list[list[Styled]] = [head, [times]]
    if removed:
        lines.append([Styled(removed_since(removed))])
    if screen is None:
        return Block(*lines, table)
    shown = f"not shown on {screen} columns: {', '.join(left)} (all: the same command | less -S)"
    under = [f"reason of every node: {'; '.join(shared)}"] if shared else []
    under += [shown] if left else []
    return Block(
        *(folded for line in lines for folded in _fold(line, screen)),
        table,
        *(Styled(folded) for line in under for folded in fold(line, screen)),
    )


def _no_empty_reason(columns: dict[str, list[Styled]], shared: Sequence[str]) -> None:
    """Take the reason column out of ``columns`` if what every node's reason says is said
    once beside the table (``shared``) and so no cell of it is left with a word: it was an
    empty column of 9, drawn on every frame of the watch (session 73's note, "80 columns")
    and it took the place of a column an 80-column table then went without. A reason that
    only some nodes have keeps the column (its rows say it)."""
    if shared and not any(clean(cell.text).strip() for cell in columns["reason"]):
        del columns["reason"]


CONTINUED = Styled(" \\")
"""The end of a line of a command in backticks folded onto the next (``_command_lines``): the
shell's line continuation. The very object (``is``): ``_fold_within`` leaves it out when it
joins folded lines again."""


def _command_lines(token: str, width: int) -> list[str] | None:
    """A command in backticks (with what sticks to it) wider than ``width``, folded at its
    spaces onto lines that each leave room for ``CONTINUED``, never inside a word; None if
    ``token`` is no command, or has a word too wide for any line. The live view's lines must
    fit the terminal (rich's Live cuts the rest: a command wider than the terminal was cut, or
    folded by ``plain.wrap`` into lines that, copied, ran as two commands), so such a command
    folds as one types a long one in a shell: each line but the last ends with " \\", and the
    lines copied together still paste as one command (session 73's note, "80 columns")."""
    if "`" not in token or cell_len(token) <= width:
        return None
    words = token.split(" ")
    if any(cell_len(word) > width - len(CONTINUED.text) for word in words):
        return None
    lines = [words[0]]
    for word in words[1:]:
        if cell_len(f"{lines[-1]} {word}{CONTINUED.text}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if cell_len(lines[-1]) > width:  # (the last has no continuation: room for it always)
        return None
    return lines


def _fold(pieces: Sequence[Styled], width: int) -> list[list[Styled]]:
    """A line of styled pieces folded at spaces into lines of at most ``width`` columns (a
    word longer than that is cut, as ``plain.wrap`` cuts it; a command in backticks longer
    than that folds with the shell's line continuation, ``_command_lines``), each piece
    keeping its style: a terminal folds a long line anywhere, in the middle of a word."""
    out: list[list[Styled]] = [[]]
    room = width
    for piece in pieces:
        for token in re.findall(r" +|(?:[^ `]|`[^`]*`?)+", clean(piece.text)):  # (`a b`: one)
            if token.startswith(" "):
                if room < width:  # (none at a line's start)
                    out[-1].append(Styled(token[:room], piece.style))
                    room -= min(len(token), room)
                continue
            command = _command_lines(token, width)
            for k, part in enumerate(command or wrap(token, width)):
                if cell_len(part) > room:
                    out.append([])
                    room = width
                out[-1].append(Styled(part, piece.style))
                room -= cell_len(part)
                if command and k < len(command) - 1:
                    out[-1].append(CONTINUED)
                    room = 0  # (the next part on a line of its own)
    folded = []
    for line in out:
        while line and not line[-1].text.strip():  # (no spaces at a line's end)
            line.pop()
        if line:
            folded.append(line)
    return folded


def _fit_columns(
    columns: dict[str, list[Styled]],
    names: Mapping[str, str],
    width: int | None,
    cuts: Mapping[str, int],
) -> list[str]:
    """Take out of ``columns`` those of ``LIVE_DROPS`` (``names`` maps a drop's name to its
    header, where they differ) a table ``width`` wide has no room for, the first first, and
    return their headers; None: no width, every column stays. A column counts as wide as its
    widest cell, those of ``cuts`` at most as wide as it says."""
    if width is None:
        return []
    natural = {
        h: max(cell_len(clean(c.text)) for c in [Styled(h), *cells]) for h, cells in columns.items()
    }
    least = {h: min(w, cuts.get(h, w)) for h, w in natural.items()}
    drops = [names.get(d, d) for d in LIVE_DROPS]
    left: list[str] = []
    while drops and 1 + sum(least[h] + 3 for h in columns) > width:
        drop = drops.pop(0)
        if drop in columns:
            del columns[drop]
            left.append(drop)
    return left


# --- `schema show --watch` on a terminal -------------------------------------------------------

IN_FLIGHT = ("preflight", "staging", "staged", "switching", "confirming")
TROUBLE = ("needs_attention", "failed", "rolled_back")
COUNTED = (*TROUBLE, *IN_FLIGHT, "pending", "dual", "done", "skipped")
"""The order of the states in the live view's line of counts: what wants a look first."""
CUTS = {"node": 12, "reason": 30, "new address": 24}
"""How narrow the live view cuts these columns before it cuts others (``_live_table``), and how
narrow ``_fit_columns`` counts them when it decides which columns a table goes without."""
FOLDS = {"node": 12, "reason": 30}
"""How narrow ``render_rollout`` on a terminal counts these columns when it decides which
columns its table goes without: its cells fold, never cut; the new address folds only if
there is no other way."""
LIVE_DROPS = ("cert expires", "old address", "restart", "freeze", "on http")
"""The live view's columns a narrow terminal goes without, the first first: what the admin
watches is which node is where, at which address, and why it stopped."""


def _cut(text: str, width: int) -> str:
    """``text`` (``clean``) on at most ``width`` columns, ending in "…" where it was cut."""
    text = clean(text)
    if cell_len(text) <= width:
        return text
    if width < 1:
        return ""
    text = text[:width]  # a character takes one column or two: no more are needed
    while text and cell_len(text) > width - 1:
        text = text[:-1]
    return text + "…"


def _cut_line(pieces: Sequence[Styled], width: int) -> list[Styled]:
    """A line of styled pieces on at most ``width`` columns, ending in "…" where it was cut
    (a cut at a piece's end, the line full, lost its "…": the next piece had no room)."""
    out = [Styled(clean(piece.text), piece.style) for piece in pieces]
    if sum(cell_len(piece.text) for piece in out) <= width:
        return out
    room = width - 1  # (for the "…")
    for k, piece in enumerate(out):
        if cell_len(piece.text) > room:
            cut = piece.text[:room]  # a character takes one column or two
            while cut and cell_len(cut) > room:
                cut = cut[:-1]
            kept = [Styled(cut, piece.style)] if cut else []
            return [*out[:k], *kept, Styled("…", piece.style)]
        room -= cell_len(piece.text)
    return out  # (not reached: the pieces are wider than ``width``)


def _counts(nodes: Sequence[View]) -> list[Styled]:
    """``3 nodes: 1 switching, 1 pending, 1 done``: how many are in each state."""
    states = [n["state"] for n in nodes]
    order = [*COUNTED, *sorted(set(states) - set(COUNTED))]  # a state of a newer leader: last
    counts = [
        Styled(f"{states.count(s)} {s}", STATE_STYLE.get(s, "")) for s in order if s in states
    ]
    line = [Styled(f"{len(nodes)} node{'' if len(nodes) == 1 else 's'}" + (": " if counts else ""))]
    for i, count in enumerate(counts):
        line += [Styled(", ")] if i else []
        line.append(count)
    return line


def _live_table(
    r: View,
    rows: Sequence[tuple[int, View]],
    width: int,
    shared: Sequence[str] = (),
    counted: Collection[str] | None = None,
) -> Table:
    """The nodes' table of the live view, one line per node, no wider than ``width``: without
    the columns of ``LIVE_DROPS`` it has no room for, the widest cells cut ("…"); the reasons
    every node shares (``shared``: said above it, ``render_live``) left out of each row.
    ``counted``: as ``render_rollout``'s (``on_http``)."""
    freeze = f"freeze ({freeze_clock(r)})"
    columns: dict[str, list[Styled]] = {
        "#": [Styled(str(i)) for i, _ in rows],
        "node": [
            Styled(n["name"] + (" (leader)" if n.get("leader_node") else "")) for _, n in rows
        ],
        "state": [_styled(n["state"]) for _, n in rows],
        "old address": [Styled(n.get("old_url") or "-") for _, n in rows],
        "new address": [Styled(n.get("new_url") or "-") for _, n in rows],
        freeze: [Styled(freeze_window(n)) for _, n in rows],
        "restart": [
            Styled(_seconds(n["restart_seconds"]) if n.get("restart_seconds") else "-")
            for _, n in rows
        ],
        "cert expires": [Styled(fmt_time(n, "cert_not_after")) for _, n in rows],
        "on http": [on_http(r, n, counted) for _, n in rows],
        "reason": [
            Styled("; ".join(s for s in _reasons(r, n) if s not in shared)) for _, n in rows
        ],
    }
    _no_empty_reason(columns, shared)
    natural = {
        h: max(cell_len(clean(c.text)) for c in [Styled(h), *cells]) for h, cells in columns.items()
    }
    # The columns of ``LIVE_DROPS`` go before the reason is cut below 30 columns or the new
    # address below 24 (why a node stopped, and where it is, are what the admin watches; a
    # reason cut to 10 at 80 columns said "confirm f…"); the name is cut to 12 first. If that
    # is still too wide, the widest cells are cut further, down to 3 columns (``fit``).
    _fit_columns(columns, {"freeze": freeze}, width, CUTS)
    least = {h: min(w, CUTS.get(h, w)) for h, w in natural.items()}
    widths = fit(
        [natural[h] for h in columns], [least[h] for h in columns], width - 1 - 3 * len(columns)
    )
    table = Table(*(_cut(h, w) for h, w in zip(columns, widths, strict=True)))
    for k in range(len(rows)):
        table.add_row(
            *(
                Styled(_cut(cells[k].text, w), cells[k].style)
                for cells, w in zip(columns.values(), widths, strict=True)
            )
        )
    return table


def _fold_within(pieces: Sequence[Styled], width: int, most: int) -> list[list[Styled]]:
    """A line of styled pieces folded at spaces (``_fold``) onto at most ``most`` lines, the
    last cut ("…") if that is not enough."""
    folded = _fold(pieces, width)
    if len(folded) <= most:
        return folded
    rest = [
        piece
        for line in folded[most - 1 :]
        for piece in (*(p for p in line if p is not CONTINUED), Styled(" "))
    ]
    return [*folded[: most - 1], _whole_commands(_cut_line(rest, width))]


def _whole_commands(line: list[Styled]) -> list[Styled]:
    """A line cut ("…", ``_cut_line``) without the part of a command in backticks the cut
    left: a copy of that part ran something else ("with `tlsroll rollout st…")."""
    text = "".join(piece.text for piece in line)
    if not text.endswith("…") or text.count("`") % 2 == 0:
        return line
    keep = text.rfind("`")  # where the command the cut left open begins
    out: list[Styled] = []
    for piece in line:
        if keep <= 0:
            break
        out.append(Styled(piece.text[:keep], piece.style))
        keep -= len(piece.text)
    while out and not out[-1].text.strip():
        out.pop()
    if out:
        out[-1] = Styled(out[-1].text.rstrip(), out[-1].style)
    return [*out, Styled("…")]


def render_live(r: View, width: int, height: int, counted: Collection[str] | None = None) -> Block:
    """A rollout as ``schema show --watch`` shows it on a terminal of ``width`` columns and
    ``height`` lines (rich's ``Live`` cut ``render_rollout``'s table at the screen's foot:
    in 80x24 two nodes of three fitted, the node switching was not among them; review s63
    M2): the heading, how many nodes are in each state, then one line per node, those in
    flight, failed, rolled back or needing the admin first, the others while there is room,
    and how many more there are (``schema show`` shows them all). A reason every node shares
    (``shared_reasons``: a password change pending) is said once, after the counts, folded
    onto the lines the node rows leave free, cut ("…") where none are: it was on every row,
    cut to 30 columns (session 73); never in a node row's place. ``counted``: as
    ``render_rollout``'s (its "still on http" 0: review s75 revpipes)."""
    nodes = list(enumerate(r.get("nodes", []), 1))
    shared = shared_reasons(r, [n for _, n in nodes])
    counts = _counts([n for _, n in nodes])
    if shared:
        counts.append(Styled(f"; every node: {'; '.join(shared)}"))
    top: list[Part] = [_cut_line(_head(r), width), _cut_line(counts, width)]
    note = [_cut_line([Styled(f"note: {r['reason']}")], width)] if r.get("reason") else []
    room = height - len(top) - len(note) - 4  # the table's three rules and its header
    if len(nodes) > room:
        room -= 1  # for the line that says how many more
    elif shared:  # the counts and what every node shares on the lines no node row needs
        top[1:] = _fold_within(counts, width, 1 + room - len(nodes))
    top += note
    first = [(i, n) for i, n in nodes if n["state"] in (*TROUBLE, *IN_FLIGHT)]
    rest = [(i, n) for i, n in nodes if n["state"] not in (*TROUBLE, *IN_FLIGHT)]
    shown = (first + rest)[: max(room, 0)]
    parts = list(top)
    if shown:
        parts.append(_live_table(r, shown, width, shared, counted))
    if len(shown) < len(nodes):
        more = f"… {len(nodes) - len(shown)} more"
        hint = f"{more} (all: tlsroll schema show --rollout {r['id']})"
        # (a command is never cut: one cut in the rollout's id ran with another id; s75)
        parts.append(Styled(hint if cell_len(hint) <= width else _cut(more, width)))
    return Block(*parts)


class LiveRollout:
    """``render_live`` of a rollout at the size of the terminal it is drawn on, each time it
    is drawn: what ``schema show --watch`` gives rich's ``Live`` (a resized terminal gets the
    next frame at its new size)."""

    def __init__(self, r: View, counted: Collection[str] | None = None) -> None:
        self.r = r
        self.counted = counted

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Any]:
        from rich.text import Text  # noqa: PLC0415 - only a terminal watching live

        width, height = options.max_width, options.size.height
        live = render_live(self.r, width, height, self.counted)
        for line in live.lines(width, color=True)[:height]:
            yield Text.from_ansi(line, no_wrap=True, overflow="ellipsis")


def render_clients(views: Sequence[View]) -> Block:
    """Per node, who its managed server saw on which scheme lately (from the agents'
    heartbeats); peer-supplied strings are printed as plain text (``plain.clean``). The last
    column, "still on http" ("yes": an http client not seen on https since), only if a row
    has one (session 75: it had no header, and was blank when nobody was still on http)."""
    headers = ("node", "scheme", "address", "workstation", "requests", "first", "last")
    rows: list[list[Cell]] = []
    marked = False
    notes: list[Styled] = []
    for v in views:
        still = v.get("still_on_http", [])
        left = {(c.get("address", ""), c.get("workstation", "")) for c in still}
        clients = v.get("clients", {})
        for c in clients.get("clients", []):
            seen_at = (c.get("address", ""), c.get("workstation", ""))
            mark = "yes" if c.get("scheme") == "http" and seen_at in left else ""
            marked = marked or bool(mark)
            rows.append(
                [
                    v["node"],
                    c.get("scheme", ""),
                    c.get("address", ""),
                    c.get("workstation") or "-",
                    str(c.get("requests", 0)),
                    fmt_time(c, "first_seen"),
                    fmt_time(c, "last_seen"),
                    Styled(mark, "bold yellow"),
                ]
            )
        source = clients.get("source") or "unknown"
        problem = f"; problem: {clients['problem']}" if clients.get("problem") else ""
        if v.get("awaiting_report"):
            problem += f"; {AWAITING}"
        silent = not clients.get("source") and not clients.get("problem") and not still
        if silent and v.get("reported_at"):
            # (not "0 still on http": its driver does not say who connects)
            notes.append(
                Styled(
                    f"{v['node']}: cannot tell who is still on http: its driver does not report "
                    f'who connects (README, "The managed server (drivers)"); reported '
                    f"{fmt_time(v, 'reported_at')}{problem}"
                )
            )
            continue
        # A report naming a problem with no one on http in it counts as not known (a finalize
        # refuses it, naming the problem; the column says "-"): not "0 still on http".
        count = (
            "cannot tell who is still on http: its client report names a problem"
            if clients.get("problem") and not still
            else f"{len(still)} still on http"
        )
        notes.append(
            Styled(
                f"{v['node']}: {count}; window "
                f"{clients.get('window_seconds', 0)}s, source {source}, reported "
                f"{fmt_time(v, 'reported_at')}{problem}"
            )
        )
    if not rows:  # (an empty table of eight headers said nothing: review s71)
        return Block(
            Styled("who is on which scheme (per node): no client reported", "bold"), *notes
        )
    table = Table(*headers, *(["still on http"] if marked else []))
    for row in rows:
        table.add_row(*(row if marked else row[:-1]))
    head = Styled("who is on which scheme (per node)", "bold")
    return Block(head, table, *notes)


def render_revocations(data: View) -> Block:
    """Removed nodes and revoked certificates (``tlsroll nodes remove``, ``… revoke``)."""
    parts: list[Any] = []
    if data.get("removed_nodes"):
        removed = Table("removed node", "addresses", "removed")
        for n in data["removed_nodes"]:
            removed.add_row(n["name"], ", ".join(n.get("addresses", [])), fmt_time(n, "removed_at"))
        parts.append(removed)
    if data.get("revoked_certificates"):
        revoked = Table("revoked certificate", "kind", "of", "node", "revoked", "reason")
        for c in data["revoked_certificates"]:
            revoked.add_row(
                c.get("serial", ""),
                c.get("kind", ""),
                c.get("subject") or "-",
                c.get("node") or "-",
                fmt_time(c, "revoked_at"),
                c.get("reason", ""),
            )
        parts.append(revoked)
    return Block(Styled("removed and revoked", "bold"), *parts)


def render_failures(failures: Sequence[View]) -> Block:
    """Failed passwords at the nodes' bootstrap services: a guessing attack shows up here; and
    the PCs a node's hourly cap refused (``CAP_SOURCE``). Peer-supplied strings are printed as
    plain text (``plain.clean``)."""
    table = Table("node", "source address", "workstation", "failures", "first", "last")
    for f in failures:
        table.add_row(
            f.get("node", ""),
            f.get("source", ""),
            f.get("workstation") or "-",
            str(f.get("count", 0)),
            fmt_time(f, "first_at"),
            fmt_time(f, "last_at"),
        )
    head = Styled("failed bootstrap passwords (port 9443)", "bold")
    if any(f.get("source") == CAP_SOURCE for f in failures):  # (review s64 M3)
        head = Styled(
            f"failed bootstrap passwords (port 9443); {CAP_SOURCE}: PCs refused a certificate, "
            "the node's hour full (workstation_certs_per_hour in leader.toml)",
            "bold",
        )
    return Block(head, table)


LOGIN_FAILURES_HINT = (
    "wrong passwords at the server's own login (the client password), counted by the server "
    "across its restarts and new passwords: a few are typing errors; many, or more and more "
    "(see the latest), mean someone may be guessing it (the server slows guessers down, per "
    "address and in all)"
)


def login_failures_words(count: int) -> str:
    """``N wrong client password(s) so far`` (the server's count, kept across its restarts):
    what the schema and the viewer say of a node's ``ServerLoginFailuresView``."""
    return f"{count} wrong client password{'' if count == 1 else 's'} so far"


def render_login_failures(rows: Sequence[View]) -> Block:
    """The nodes whose managed server counts wrong passwords at its own login (only nodes with
    some), with what they may mean."""
    table = Table("node", "wrong client passwords", "latest", "reported")
    for f in rows:
        table.add_row(
            f.get("node", ""),
            login_failures_words(int(f.get("count", 0))),
            fmt_time(f, "last_at"),
            fmt_time(f, "reported_at"),
        )
    head = Styled("wrong client passwords at the servers", "bold yellow")
    return Block(head, table, LOGIN_FAILURES_HINT)


def password_behind_words(behind: View) -> tuple[str, str, str]:
    """What ``schema show`` and the viewer say of a ``PasswordBehindView``: (the newest
    version and who staged it, the nodes behind with the version each runs, what a
    workstation there meets and the command that finishes it)."""
    newest = f"password version {behind.get('version', 0)}"
    staged = f"staged by {behind.get('staged_by') or '-'} at {fmt_time(behind, 'staged_at')}"
    nodes = ", ".join(
        f"{n.get('node', '')} (version {n.get('live_version', 0)})" for n in behind.get("nodes", [])
    )
    return (
        f"{newest} ({staged})",
        nodes,
        "a workstation set up there needs the password it runs; to give them the newest: "
        + behind.get("command", ""),
    )


def render_password_behind(behind: View) -> Block:
    """The nodes whose live auth password is older than the newest staged one (review s69
    revpass3 M1: after a change-password that ended part way only ``plan`` said so)."""
    newest, nodes, then = password_behind_words(behind)
    head = Styled(f"{newest} not live on every node", "bold yellow")
    return Block(head, f"still on an older one: {nodes}", then)


PROBLEM_ORDER = (
    "twin-agents",
    "earlier-certificate",
    "needs-admin",
    "agent-store",
    "clock-offset",
    "bootstrap-down",
)
"""``leader.states.NODE_PROBLEM_ORDER``'s kinds, as the schema carries them: the order in which
`schema show` lists a node's problems (what holds a rollout first). Kept here, not imported:
`schema show` imports none of the leader's state code (tests/test_perf_shape.py); a test keeps
the two in step (tests/test_agent_store_problem.py)."""


def problem_rank(kind: str) -> int:
    """Where a problem of ``kind`` is listed: its place in ``PROBLEM_ORDER``; a kind this
    release does not know (a newer leader's) last."""
    return PROBLEM_ORDER.index(kind) if kind in PROBLEM_ORDER else len(PROBLEM_ORDER)


def render_node_problems(problems: Sequence[View]) -> Block:
    """The nodes the leader sees a problem with now (two agents use one node's identity: held,
    neither planned nor switched; its clock differs from the leader's), each with what to do
    (the problem's words say which holds the node): what holds a rollout first, as the leader
    lists them (``PROBLEM_ORDER``; a leader before it listed them by the
    kinds' names)."""
    table = Table("node", "since", "problem")
    ordered = sorted(
        problems,
        key=lambda p: (problem_rank(p.get("kind", "")), p.get("node", ""), p.get("kind", "")),
    )
    for p in ordered:
        table.add_row(p.get("node", ""), fmt_time(p, "since"), p.get("problem", ""))
    return Block(Styled("node problems", "bold red"), table)


def render_certificate_health(data: View) -> Block | None:
    """The certificate part of ``tlsroll schema show``: what is within its warning horizon,
    which agents fail to renew their certificate, and what ``auto_rotate`` last decided; None
    if there is nothing to say. Text from agents (a renewal's reason) is printed as plain text
    (``plain.clean``)."""
    parts: list[Any] = []
    if data.get("expiring_certificates"):
        table = Table("kind", "subject", "expires", "residual", "serial")
        for c in data["expiring_certificates"]:
            table.add_row(
                c.get("kind", ""),
                c.get("subject") or "-",
                fmt_time(c, "not_after"),
                residual(int(c.get("residual_seconds", 0)))  # int64: text in JSON
                + (", REVOKED" if c.get("revoked") else ""),
                c.get("serial") or "-",
            )
        title = "certificates within their warning horizon"
        if any(c.get("revoked") for c in data["expiring_certificates"]):
            title += " or revoked"
        parts += [Styled(title, "bold"), table]
    if data.get("renewal_failures"):
        table = Table("node", "failing since", "reason", "its certificate ends")
        for f in data["renewal_failures"]:
            table.add_row(
                f.get("node", ""),
                fmt_time(f, "failing_since"),
                f.get("reason", ""),
                fmt_time(f, "cert_not_after"),
            )
        parts += [Styled("agent certificate renewals failing", "bold"), table]
    auto = data.get("auto_rotate")
    if auto and auto.get("enabled"):
        line = f"auto_rotate: {auto.get('verdict') or 'not checked yet'}"
        if auto.get("reason"):
            line += f" ({auto['reason']})"
        opens = auto.get("next_window") or "-"
        state = "open now" if auto.get("in_window") else f"next opens {opens}"
        zone = auto.get("timezone") or "the leader host's zone"
        line += f"; window {auto.get('window', '')} ({zone}), {state}"
        if auto.get("due_nodes"):
            line += f"; due: {', '.join(auto['due_nodes'])}"
        if auto.get("rollout_id"):
            line += f"; last started: {auto['rollout_id']}"
        parts.append(line)
        if auto.get("warning"):
            parts.append(Styled(f"warning: {auto['warning']}", "bold yellow"))
    return Block(*parts) if parts else None
