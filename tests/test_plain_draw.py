"""``leader.cli.plain``: the tables ``tlsroll schema show`` prints without rich. They must look
as rich drew them (compared with rich itself), fold to a narrow terminal, colour only where
asked, and never pass a peer's control characters to the terminal."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import pytest
from rich.console import Console
from rich.table import Table as RichTable

from leader import planner
from leader.cli.base import Leader, to_dict
from leader.cli.draw import PENDING, render_live, render_rollout
from leader.cli.plain import Block, Styled, Table, cell_len, clean, fit, wrap
from leader.rollout_core import (
    Change,
    NodeState,
    RolloutState,
    Scope,
    left_out_reason,
    left_unknown,
)
from leader.schema_store import NodeDetail, RolloutMeta, RolloutRow
from leader.schema_view import rollout_view, schema_json, schema_message
from tlsroll.v1 import admin_pb2, schema_pb2, types_pb2

ROWS = [
    ["1", "praxis-a (leader)", "done", "http://10.0.0.1:8080", "https://10.0.0.1:8443", "-"],
    ["2", "praxis-b", "needs_attention", "http://10.0.0.2:8080", "-", "confirm failed: timeout"],
    ["3", "Empfang-Müller", "pending", "-", "-", ""],
]
HEADERS = ["#", "node", "state", "old address", "new address", "reason"]


def cli_console(file: io.StringIO, **settings: Any) -> Console:
    """A Console with the settings ``leader.cli.base.console()`` gives the CLI's, into
    ``file`` (``settings``: its width, terminal, height, colour)."""
    return Console(
        file=file, highlight=False, soft_wrap=True, markup=False, emoji=False, **settings
    )


def rich_text(renderable: object, width: int) -> str:
    out = io.StringIO()
    console = cli_console(out, width=width)
    console.print(renderable)
    return out.getvalue()


def ours(width: int = 200) -> Table:
    table = Table(*HEADERS)
    for row in ROWS:
        table.add_row(*row)
    return table


def test_a_table_looks_as_rich_draws_it_into_a_pipe() -> None:
    theirs = RichTable(*HEADERS)
    for row in ROWS:
        theirs.add_row(*row)
    assert "\n".join(ours().lines(200, color=False)) + "\n" == rich_text(theirs, 200)


def test_a_table_wider_than_200_columns_goes_into_a_pipe_whole_as_rich_draws_it() -> None:
    """Session 75: into a pipe a table is drawn at its natural width (``lines(None)``), as
    the CLI's rich console draws its own tables there (``base.PIPE_COLUMNS``): no cell folds,
    however wide the table (a URL folded at 200 columns was not found by a grep)."""
    from leader.cli.base import PIPE_COLUMNS

    rows = [[*row[:5], f"{row[5]}; {'then run tlsroll rollout retry r1 ' * 5}"] for row in ROWS]
    table = Table(*HEADERS)
    theirs = RichTable(*HEADERS)
    for row in rows:
        table.add_row(*row)
        theirs.add_row(*row)
    lines = table.lines(None, color=False)
    assert len(lines) == 4 + len(rows) and cell_len(lines[0]) > 200, lines  # a line a row
    assert "\n".join(lines) + "\n" == rich_text(theirs, PIPE_COLUMNS)
    assert rich_text(theirs, 200) != rich_text(theirs, PIPE_COLUMNS)  # (200 folds it)


def test_a_narrow_terminal_folds_the_widest_columns() -> None:
    lines = ours().lines(60, color=False)
    assert all(cell_len(line) <= 60 for line in lines), lines
    text = " ".join(lines)
    for row in ROWS:  # folded, not lost
        for word in " ".join(row).split():
            assert word[:3] in text


def test_fit_and_wrap() -> None:
    assert fit([10, 30, 5], [2, 8, 5], 30) == [10, 15, 5]  # the widest gives way first
    assert fit([10, 30], [10, 30], 34) == [10, 24]  # below a minimum only when it must
    assert fit([10, 30], [10, 30], 2) == [3, 3]  # the terminal wraps the rest
    assert wrap("confirm failed: timeout", 10) == ["confirm", "failed:", "timeout"]
    assert wrap("https://10.0.0.1:8443", 8) == ["https://", "10.0.0.1", ":8443"]
    assert wrap("ab", 1) == ["a", "b"]


def test_peer_text_cannot_steer_the_terminal() -> None:
    """A reason or a workstation name comes from a peer: an escape sequence in it must not
    reach the terminal, and a newline must not break the table."""
    table = Table("node", "reason")
    table.add_row("n1", "\x1b[2J\x1b]0;owned\x07 rm -rf\nnext\x9b31m")
    lines = Block(Styled("\x1b[31mtitle"), table).lines(80, color=True)
    text = "\n".join(lines)
    assert "\x1b[2J" not in text and "\x07" not in text and "\x9b" not in text
    assert "\x1b[31mtitle" not in text and "?[31mtitle" in text
    assert sum("rm -rf next" in line for line in lines) == 1
    assert clean("a\tb\r\nc\x00") == "a b  c?"
    assert clean("ok \u202egnp.exe") == "ok ?gnp.exe"  # a bidi override
    assert clean("Müller  漢字") == "Müller  漢字"


def test_colours_only_when_asked() -> None:
    view = schema_pb2.RolloutView(
        id="r1",
        state=types_pb2.ROLLOUT_STATE_COMPLETED,
        nodes=[schema_pb2.NodeView(name="n1", state=types_pb2.NODE_STATE_DONE)],
    )
    plain = "\n".join(render_rollout(to_dict(view)).lines(200, color=False))
    coloured = "\n".join(render_rollout(to_dict(view)).lines(200, color=True))
    assert "\x1b[" not in plain and "completed" in plain
    assert "\x1b[1mrollout r1\x1b[0m" in coloured and "\x1b[32mcompleted\x1b[0m" in coloured
    assert "\x1b[32mdone\x1b[0m" in coloured


def test_wide_characters_take_two_columns() -> None:
    assert cell_len("漢字") == 4 and cell_len("Müller") == 6
    table = Table("node")
    table.add_row("漢字")
    lines = table.lines(80, color=False)
    assert len({cell_len(line) for line in lines}) == 1  # every line as wide as the others


@pytest.mark.parametrize("width", [200, 70])
def test_a_drawing_prints_through_rich_too(width: int) -> None:
    """``rollout status`` and ``--watch`` on a terminal print through rich's console."""
    block = Block(Styled("head", "bold"), ours())
    assert rich_text(block, width) == "\n".join(block.lines(width, color=False)) + "\n"


def test_a_freeze_window_says_its_clock_and_the_length_the_schema_gives() -> None:
    """Clock audit s35 J: the node's clock stepped back an hour during the freeze: the window
    read "10:00:01–09:00:03 (-3597.5s)". The length is the schema's (the agent's measure in
    elapsed time); the times are said to be the node's clock (with --freeze scope, the
    leader's). From a leader that sends no length: the times' difference, never below 0."""
    began = dt.datetime(2026, 11, 28, 10, 0, 1, tzinfo=dt.UTC)
    node = schema_pb2.NodeView(name="n1", state=types_pb2.NODE_STATE_DONE, freeze_seconds=2.5)
    node.freeze_started_at.FromDatetime(began)
    node.freeze_ended_at.FromDatetime(began - dt.timedelta(seconds=3597.5))
    view = schema_pb2.RolloutView(
        id="r1", state=types_pb2.ROLLOUT_STATE_COMPLETED, freeze=types_pb2.FREEZE_MODE_NODE
    )
    view.nodes.append(node)
    text = "\n".join(render_rollout(to_dict(view)).lines(200, color=False))
    assert "freeze window (node clock)" in text and "10:00:01–09:00:03 (2.5s)" in text
    node.ClearField("freeze_seconds")  # an older leader's
    view.nodes[0].CopyFrom(node)
    view.freeze = types_pb2.FREEZE_MODE_SCOPE
    text = "\n".join(render_rollout(to_dict(view)).lines(200, color=False))
    assert "freeze window (leader clock)" in text and "10:00:01–09:00:03 (0.0s)" in text
    # From an older leader that recorded an agent's measure unchecked (review s36 L2): JSON
    # gives inf as "Infinity"; the table says "?", it does not raise.
    view.nodes[0].freeze_seconds = float("inf")
    view.nodes[0].restart_seconds = float("inf")
    text = "\n".join(render_rollout(to_dict(view)).lines(200, color=False))
    assert "10:00:01–09:00:03 (?)" in text and "inf" not in text.lower()


# --- a way back that left nodes as is ------------------------------------------------------------

NOW = dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.UTC)


def left_way_back() -> RolloutRow:
    """A way back (disable-tls) that completed and left node3 (its agent off) and node4 (its
    agent could not say what it runs) as is; node5 was on http already."""
    rollout, records = planner.plan_rollout(
        rollout_id="r9",
        change=Change.DISABLE_TLS,
        scope=Scope.cluster(),
        enrolled={"node1": True, "node2": True, "node3": False, "node4": True, "node5": True},
        leader="node1",
        epoch=1,
    )
    skip = {
        "node4": left_unknown("the managed server: connection refused"),
        "node5": "already done: on http",
    }
    ended = tuple(
        replace(r, state=NodeState.SKIPPED, reason=skip[r.name])
        if r.name in skip
        else r
        if r.state is NodeState.SKIPPED
        else replace(r, state=NodeState.DONE)
        for r in records
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="node1")
    return RolloutRow(
        replace(rollout, state=RolloutState.COMPLETED),
        meta,
        tuple((r, NodeDetail()) for r in ended),
    )


def test_a_way_back_that_left_nodes_as_is_says_so_beside_completed() -> None:
    """Review s45rev9 L3: a way back that went past nodes it could not reach read as plain
    "completed" in `schema show`, its --json and the viewer. The view names the nodes it left
    as is (``left_as_is``, from the node records: not one already on http), the JSON that
    `schema show --json` prints carries them, and the rollout's heading says so beside its
    state, each such node's row its reason (what to do)."""
    row = left_way_back()
    view = rollout_view(row)
    assert list(view.left_as_is) == ["node3", "node4"]
    message = schema_message([row], set(), NOW, fresh=frozenset(), reported=lambda _n: True)
    data = json.loads(schema_json(message))["rollouts"][0]  # what `schema show --json` prints
    assert data["state"] == "completed" and data["left_as_is"] == ["node3", "node4"]
    lines = render_rollout(data).lines(400, color=False)
    assert lines[0].startswith("rollout r9  completed, 2 nodes left as is: node3, node4  change")
    (node3,) = [line for line in lines if "│ node3 " in line]
    assert "offline: left as is: run tlsroll rollout rollback again once its agent is back" in node3
    (node4,) = [line for line in lines if "│ node4 " in line]
    assert "cannot tell what it runs (the managed server: connection refused)" in node4
    # One node: "1 node"; none left (all back, or on http already): the state alone.
    one = replace(row, nodes=tuple(n for n in row.nodes if n[0].name != "node4"))
    head = render_rollout(to_dict(rollout_view(one))).lines(400, color=False)[0]
    assert head.startswith("rollout r9  completed, 1 node left as is: node3  change"), head
    back = replace(row, nodes=tuple(n for n in row.nodes if n[0].name in ("node1", "node5")))
    assert list(rollout_view(back).left_as_is) == []
    head = render_rollout(to_dict(rollout_view(back))).lines(400, color=False)[0]
    assert head.startswith("rollout r9  completed  change"), head


def left_out_finalize(out: tuple[str, ...] = ("node2",)) -> RolloutRow:
    """A finalize that completed over node1 and node3 and left ``out`` out (agents cut off)."""
    rollout, records = planner.plan_rollout(
        rollout_id="f9",
        change=Change.FINALIZE,
        scope=Scope.of_nodes(["node1", "node2", "node3"]),
        enrolled={"node1": True, "node2": "node2" not in out, "node3": True},
        leader="node1",
        epoch=1,
        finalizes="t9",
        left_out={n: left_out_reason(n) for n in out},
    )
    ended = tuple(r if r.state is NodeState.SKIPPED else replace(r, state=NodeState.DONE)
                  for r in records)  # fmt: skip
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="node1")
    return RolloutRow(
        replace(rollout, state=RolloutState.COMPLETED),
        meta,
        tuple((r, NodeDetail()) for r in ended),
    )


def test_a_finalize_that_left_nodes_out_says_so_beside_completed() -> None:
    """Review s48rev5 L3: a finalize that left out a node whose agent is cut off (still on
    http and https) read as plain "completed" in `schema show`, only the node's reason said
    it. As for a way back's nodes left as is: the view names them (``left_out``), the JSON
    of `schema show --json` carries them, and the heading says so beside the state."""
    row = left_out_finalize()
    view = rollout_view(row)
    assert list(view.left_out) == ["node2"] and list(view.left_as_is) == []
    message = schema_message([row], set(), NOW, fresh=frozenset(), reported=lambda _n: True)
    data = json.loads(schema_json(message))["rollouts"][0]  # what `schema show --json` prints
    assert data["state"] == "completed" and data["left_out"] == ["node2"]
    lines = render_rollout(data).lines(400, color=False)
    assert lines[0].startswith("rollout f9  completed, 1 node left out: node2  change"), lines
    (node2,) = [line for line in lines if "│ node2 " in line]
    assert "left out: its agent is cut off" in node2
    two = render_rollout(to_dict(rollout_view(left_out_finalize(("node2", "node3")))))
    head = two.lines(400, color=False)[0]
    assert head.startswith("rollout f9  completed, 2 nodes left out: node2, node3  change")
    none = render_rollout(to_dict(rollout_view(left_out_finalize(())))).lines(400, color=False)
    assert none[0].startswith("rollout f9  completed  change"), none[0]
    assert "left out" not in "\n".join(none)


def status_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], how: str, row: RolloutRow
) -> tuple[int, str]:
    """What `rollout status` (``how``: "status") or the end of a `--wait` ("wait") exits with
    for the rollout ``row``, in process, and what it said on stderr."""
    view = rollout_view(row)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    try:
        code = run_status(monkeypatch, how, view)
    except click.exceptions.Exit as ended:
        code = ended.exit_code
    finally:
        monkeypatch.undo()
    return code, " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("how", ["status", "wait"])
def test_a_rollout_completed_without_every_node_exits_7(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """Session 75: a way back that left a node as is (its agent stopped) ended "completed",
    said so on stderr (review s45rt1 H1) and exited 0: a script's `rollout rollback --wait &&
    …` took it for "every node back on http". It exits 7, as a rollout completed with nodes
    failed within its budget does: completed without every node. A finalize that left a node
    out (still on http and https) likewise; one that left none, or a way back that put every
    node back, exits 0."""
    code, said = status_exit(monkeypatch, capsys, how, left_way_back())
    assert code == 7, said
    assert "rollout r9 left node3, node4 as is (not known to be on http" in said, said
    code, said = status_exit(monkeypatch, capsys, how, left_out_finalize())
    assert code == 7, said
    assert "rollout f9 completed without node2: left out" in said, said
    for whole in (
        left_out_finalize(()),
        replace(
            left_way_back(),
            nodes=tuple(n for n in left_way_back().nodes if n[0].name in ("node1", "node5")),
        ),
    ):
        assert status_exit(monkeypatch, capsys, how, whole) == (0, ""), whole.rollout.id


def test_a_node_a_when_quiet_finalize_holds_says_why() -> None:
    """rev56f L1: a pending node of a running ``finalize --when-quiet`` showed "pending" and
    nothing else; it says what it waits for, where the leader marks it
    (``NodeView.waits_until_quiet``: which nodes it marks, tests/test_finalize_refusal.py), not
    elsewhere; a node that waits for its first client report says so itself."""
    from leader.cli.draw import AWAITING, QUIET

    def text(state: types_pb2.RolloutState.ValueType, *nodes: schema_pb2.NodeView) -> str:
        view = schema_pb2.RolloutView(
            id="f1", state=state, when_quiet_seconds=600, nodes=list(nodes)
        )
        return "\n".join(render_rollout(to_dict(view)).lines(400, color=False))

    held = schema_pb2.NodeView(
        name="n1", state=types_pb2.NODE_STATE_PENDING, waits_until_quiet=True
    )
    done = schema_pb2.NodeView(name="n2", state=types_pb2.NODE_STATE_DONE)
    waiting = schema_pb2.NodeView(
        name="n3", state=types_pb2.NODE_STATE_PENDING, awaiting_report=True
    )
    says = QUIET.format(seconds=600)
    running = text(types_pb2.ROLLOUT_STATE_RUNNING, held, done, waiting)
    assert running.count(says) == 1 and AWAITING in running, running
    held.waits_until_quiet = False
    assert says not in text(types_pb2.ROLLOUT_STATE_RUNNING, held)


# --- `schema show --watch` on a terminal ---------------------------------------------------------


class Tty(io.StringIO):
    """The watch's stdout, taken for a terminal's."""

    def isatty(self) -> bool:
        return True


def watched_rollout(state: types_pb2.RolloutState.ValueType, more: int = 0) -> dict[str, object]:
    """``watched_view`` as ``schema show --watch`` reads it (``to_dict`` of the view, as
    ``fetch_schema_json`` gives it)."""
    return to_dict(watched_view(state, more))


def watched_view(state: types_pb2.RolloutState.ValueType, more: int = 0) -> schema_pb2.RolloutView:
    """A rotate-cert of na, nb (done) and nc (switching; the third row), with a password
    staged since (the review's capture), and ``more`` nodes after them: one in seven failed,
    the others pending."""
    began = dt.datetime(2026, 12, 6, 10, 54, tzinfo=dt.UTC)
    view = schema_pb2.RolloutView(
        id="r20261206-105354-bf7a",
        state=state,
        change=types_pb2.CHANGE_ROTATE_CERT,
        scope=types_pb2.SCOPE_KIND_CLUSTER,
        strategy=types_pb2.STRATEGY_DIRECT,
        max_parallel=1,
        freeze=types_pb2.FREEZE_MODE_NODE,
        epoch=3,
    )
    view.created_at.FromDatetime(began)
    names = ["na", "nb", "nc", *(f"m{k}" for k in range(more))]
    for i, name in enumerate(names, 1):
        node = schema_pb2.NodeView(
            name=name,
            old_url=f"https://10.0.0.{i}:8443/praxis_live/",
            new_url=f"https://10.0.0.{i}:8443/praxis_live/",
            password_pending=True,
        )
        if name in ("na", "nb"):
            node.state = types_pb2.NODE_STATE_DONE
            node.restart_seconds = 4.0
            node.freeze_seconds = 4.1
            node.freeze_started_at.FromDatetime(began)
            node.freeze_ended_at.FromDatetime(began + dt.timedelta(seconds=4))
            node.cert_not_after.FromDatetime(began + dt.timedelta(days=365))
        elif name == "nc":
            node.state = types_pb2.NODE_STATE_SWITCHING
            node.freeze_started_at.FromDatetime(began + dt.timedelta(seconds=9))
        elif i % 7 == 0:
            node.state = types_pb2.NODE_STATE_FAILED
            node.reason = "preflight failed: the managed server: connection refused"
        else:
            node.state = types_pb2.NODE_STATE_PENDING
        view.nodes.append(node)
    return view


@pytest.mark.parametrize(("width", "height", "more"), [(80, 24, 0), (200, 50, 0), (80, 24, 60)])
def test_the_watch_fits_the_terminal_with_the_node_in_flight_on_it(
    monkeypatch: pytest.MonkeyPatch, width: int, height: int, more: int
) -> None:
    """Review s63 M2: `schema show --watch` gave rich's Live the whole table, which Live cut
    at the screen's foot ("..."): in 80x24 a row folded onto eight lines and two nodes of three
    fitted; the node switching was not on screen in 49 of the 52 frames of its rollout. The
    watch (its own code, the leader's answers given here) draws frames that fit the terminal:
    the heading, the counts per state, the nodes in flight or failed first, the others while
    they fit, and how many more. Once the rollout ends, the whole table stays."""
    from leader.cli import schema_cmd

    monkeypatch.setenv("TERM", "xterm-256color")  # (before the Console; a dumb one: below)
    out = io.StringIO()
    screen = cli_console(out, force_terminal=True, width=width, height=height)
    running = watched_rollout(types_pb2.ROLLOUT_STATE_RUNNING, more)
    ended = watched_rollout(types_pb2.ROLLOUT_STATE_COMPLETED, more)
    answers = iter([running, ended])
    shown: list[str] = []

    def fetch(*_args: object, **_kwargs: object) -> dict[str, object]:
        if out.getvalue() and not shown:  # Live has drawn its first frame, of ``running``
            shown.append(out.getvalue())
        return {"rollouts": [next(answers)]}

    monkeypatch.setattr(schema_cmd, "fetch_schema_json", fetch)
    monkeypatch.setattr(schema_cmd, "console", lambda: screen)
    stdout = Tty()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setenv("NO_COLOR", "1")
    schema_cmd.watch_schema(None, "", False, interval=0)  # type: ignore[arg-type]
    monkeypatch.undo()

    # The first frame: up to the cursor's return for the next one; without the escapes.
    frame = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown[0].split("\r")[0]).splitlines()
    nc = [line for line in frame if line.startswith("│ 3 ") and "│ nc " in line]
    assert len(nc) == 1, "\n".join(["the node switching is not on screen:", *frame])
    assert "│ switching │" in nc[0], nc
    assert len(frame) <= height and all(cell_len(line) <= width for line in frame), frame
    assert all(line.strip() != "..." for line in frame), frame  # what Live puts where it cut
    rows = [line for line in frame if line.startswith("│ ")]
    counts = (
        "63 nodes: 9 failed, 1 switching, 51 pending, 2 done"
        if more
        else "3 nodes: 1 switching, 2 done"
    )
    # Session 73: the reason every node shares (a password change pending) is said once,
    # after the counts, not on every row cut to 30 columns ("password change pending — ta…"):
    # whole on the lines the rows leave free, cut where there are none (63 nodes in 24 lines).
    assert not [row for row in rows if "password change" in row], rows
    said = " ".join(frame[1 : frame.index(next(line for line in frame if line[0] == "┏"))])
    if more:
        assert said.startswith(f"{counts}; every node: password chan") and said.endswith("…")
        assert cell_len(said) == width, said
    else:
        assert said == f"{counts}; every node: {PENDING}", frame
    if more:  # the failed ones right after the switching one, then the others while they fit
        assert [r.split("│")[3].strip() for r in rows[:10]] == ["switching"] + ["failed"] * 9
        assert frame[-1].startswith(f"… {63 - len(rows)} more (all: tlsroll schema show --rollout")
    else:
        assert len(rows) == 3
    if width >= 200:  # a wide terminal has room for every column
        head = next(line for line in frame if line.startswith("┃"))
        assert "old address" in head and "cert expires" in head and "freeze" in head
    # Once it ends, the live view goes and the whole table of the rollout stays, uncut.
    assert stdout.getvalue() == "\n".join(render_rollout(ended, width).lines(width, False)) + "\n"


def test_a_watch_stopped_by_ctrl_c_leaves_the_whole_table_as_last_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The live view goes when the watch ends (its cells and rows are cut to the screen);
    when it is stopped by Ctrl-C too, the rollout's whole table as last seen stays on the
    terminal."""
    from leader.cli import schema_cmd

    monkeypatch.setenv("TERM", "xterm-256color")  # (before the Console)
    screen = Console(file=io.StringIO(), force_terminal=True, width=80, height=24)
    running = watched_rollout(types_pb2.ROLLOUT_STATE_RUNNING)
    answers: list[dict[str, object]] = [{"rollouts": [running]}]

    def fetch(*_args: object, **_kwargs: object) -> dict[str, object]:
        if not answers:
            raise KeyboardInterrupt
        return answers.pop()

    monkeypatch.setattr(schema_cmd, "fetch_schema_json", fetch)
    monkeypatch.setattr(schema_cmd, "console", lambda: screen)
    stdout = Tty()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    with pytest.raises(KeyboardInterrupt):  # `schema show` says "stopped watching" then
        schema_cmd.watch_schema(None, "", False, interval=0)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert stdout.getvalue() == "\n".join(render_rollout(running, 80).lines(80, False)) + "\n"


@pytest.mark.parametrize("term", ["dumb", "unknown"])
def test_a_terminal_that_cannot_move_its_cursor_gets_a_line_per_change(
    monkeypatch: pytest.MonkeyPatch, term: str
) -> None:
    """Review of s63-v2, L5: on a terminal that cannot move its cursor (TERM=dumb: an editor's
    shell, a serial console) rich's Live draws nothing until it stops: the watch showed
    nothing while the rollout ran. It gets what a log gets: a line per change, the whole
    table at the end."""
    from leader.cli import schema_cmd

    running = watched_rollout(types_pb2.ROLLOUT_STATE_RUNNING)
    ended = watched_rollout(types_pb2.ROLLOUT_STATE_COMPLETED)
    answers = iter([running, ended])
    shown: list[str] = []
    stdout = Tty()

    def fetch(*_args: object, **_kwargs: object) -> dict[str, object]:
        shown.append(stdout.getvalue())
        return {"rollouts": [next(answers)]}

    monkeypatch.setattr(schema_cmd, "fetch_schema_json", fetch)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERM", term)
    monkeypatch.setenv("NO_COLOR", "1")
    schema_cmd.watch_schema(None, "", False, interval=0)  # type: ignore[arg-type]
    monkeypatch.undo()
    # While it ran (before the second answer was asked for), the switching node's line was out.
    assert re.search(r"^\d\d:\d\d:\d\d node nc: switching$", shown[-1], re.M), shown
    assert stdout.getvalue().endswith(
        "\n".join(render_rollout(ended, 80).lines(80, False)) + "\n"
    ), stdout.getvalue()


def on_http_cells(lines: list[str], header: str) -> dict[str, str]:
    """Each node's cell under ``header`` in the table of ``lines`` (a row a line)."""
    head = next(line for line in lines if line.startswith("┃") and header in line)
    at = head.index(header)
    return {
        line.split("│")[2].strip(): line[at:].split("│")[0].strip()
        for line in lines
        if re.match(r"│ \d+ ", line)
    }


@pytest.mark.parametrize("where", ["terminal", "pipe", "dumb"])
def test_the_watch_shows_0_still_on_http_as_schema_show_does(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Review s75 revpipes (pipes' follow-up): `schema show` shows 0 still on http for a node
    whose driver reports who connects and has no one left on http, "-" where it cannot tell;
    the watch kept only the rollout of each answer, not the schema's ``node_clients``: its live
    view and the table it leaves at its end showed "-" for every 0. They show the same."""
    from leader.cli import schema_cmd

    def answer(state: types_pb2.RolloutState.ValueType) -> dict[str, object]:
        view = watched_view(state)
        view.change = types_pb2.CHANGE_ENABLE_TLS
        view.nodes[2].still_on_http = 2  # nc: two workstations still on http
        reported = {"source": "access-log", "window_seconds": 600, "clients": []}
        return {  # na reports who connects: none on http; nb's driver cannot tell
            "rollouts": [to_dict(view)],
            "node_clients": [{"node": "na", "clients": reported}, {"node": "nb", "clients": {}}],
        }

    answers = iter(
        [answer(types_pb2.ROLLOUT_STATE_RUNNING)] * 2 + [answer(types_pb2.ROLLOUT_STATE_COMPLETED)]
    )
    frames: list[str] = []
    out = io.StringIO()
    stdout: io.StringIO = io.StringIO() if where == "pipe" else Tty()

    def fetch(*_args: object, **_kwargs: object) -> dict[str, object]:
        if out.getvalue() and not frames:  # Live has drawn its first frame
            frames.append(out.getvalue())
        return next(answers)

    monkeypatch.setenv("TERM", "dumb" if where == "dumb" else "xterm-256color")
    monkeypatch.setattr(schema_cmd, "fetch_schema_json", fetch)
    screen = cli_console(out, force_terminal=True, width=200, height=40)
    monkeypatch.setattr(schema_cmd, "console", lambda: screen)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    schema_cmd.watch_schema(None, "", False, interval=0)  # type: ignore[arg-type]
    monkeypatch.undo()
    shown = {"na": "0", "nb": "-", "nc": "2"}
    if where == "terminal":
        frame = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frames[0].split("\r")[0]).splitlines()
        assert on_http_cells(frame, "on http") == shown, "\n".join(frame)
    end = stdout.getvalue().splitlines()
    assert on_http_cells(end, "still on http") == shown, stdout.getvalue()


# --- the whole table on a narrow terminal: `rollout status`, `--wait`, `schema show` --------------


def narrow_screen(monkeypatch: pytest.MonkeyPatch, columns: int) -> Tty:
    """stdout a terminal of ``columns`` columns, without colours."""
    stdout = Tty()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("NO_COLOR", "1")
    return stdout


def run_status(
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    view: schema_pb2.RolloutView,
    clients: tuple[schema_pb2.NodeClientsView, ...] = (),
) -> int:
    """``tlsroll rollout status`` (``how``: "status"), or what ``rollout start --wait`` prints
    once the rollout has ended ("wait"), in process, the leader's answer given (``clients``:
    its ``node_clients``); the exit code of a status (a --wait's raises ``click`` Exit)."""
    from leader.cli import rollout

    schema = schema_pb2.Schema(rollouts=[view], node_clients=clients)
    monkeypatch.setattr(rollout, "fetch_schema", lambda *_a, **_k: schema)
    if how == "status":
        return int(rollout.rollout_status.main([view.id], standalone_mode=False) or 0)
    with click.Context(rollout.rollout_status):
        rollout.wait_for_end(Leader(Path("/nonexistent")), view.id, interval=0)
    return 0


def run_schema_show(monkeypatch: pytest.MonkeyPatch, data: dict[str, object]) -> None:
    """``tlsroll schema show`` in process, the leader's answer given."""
    from leader.cli import schema_cmd

    monkeypatch.setattr(schema_cmd, "fetch_schema_json", lambda *_a, **_k: data)
    schema_cmd.schema.main(["show"], standalone_mode=False)


def narrow_rows(text: str) -> list[list[str]]:
    """The table's rows of ``text``, each as the lines it takes."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if re.match(r"│ \d+ ", line):
            rows.append([line])
        elif line.startswith("│ ") and rows:
            rows[-1].append(line)
    return rows


@pytest.mark.parametrize("how", ["status", "wait", "schema show"])
def test_the_whole_table_fits_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Review s71 walkthrough L7: at 80 columns the end table of `rollout start --wait` and
    `rollout status` (and `schema show`) folded its ten columns into cells five letters wide,
    each row eight lines or more ("addre/ss", "passwo/rd"). On a terminal narrower than the
    table it goes without the columns the watch's live view goes without, in that order, and
    says which under it; what it shows is whole, folded, not cut: the reason at its spaces."""
    view = watched_view(types_pb2.ROLLOUT_STATE_COMPLETED)
    stdout = narrow_screen(monkeypatch, 80)
    if how == "schema show":
        run_schema_show(monkeypatch, {"rollouts": [to_dict(view)], "total_rollouts": 1})
    else:
        run_status(monkeypatch, how, view)
    monkeypatch.undo()
    text = stdout.getvalue()
    lines = text.splitlines()
    assert all(cell_len(line) <= 80 for line in lines), text
    head = next(line for line in lines if line.startswith("┃"))
    # The reason every row had (five lines a row, review s71 "80 columns") is said once, under
    # the table, folded at its spaces, the command in it on one line; the reason column, empty
    # then, goes too (session 74), and "still on http" has its place.
    assert [h.strip() for h in head.strip("┃").split("┃")] == [
        "#",
        "node",
        "state",
        "new address",
        "still on http",
    ], text
    rows = narrow_rows(text)
    assert len(rows) == 3 and all(len(row) == 1 for row in rows), text
    assert "https://10.0.0.3:8443/pra" in rows[2][0] and "│ switching │" in rows[2][0], text
    under = lines[lines.index(next(x for x in lines if x.startswith("└"))) + 1 :]
    assert " ".join(under) == (
        f"reason of every node: {PENDING} not shown on 80 columns: cert expires, old address, "
        "restart, freeze window (node clock) (all: the same command | less -S)"
    ), text
    assert any("`tlsroll rollout start --change change-password`" in line for line in under)
    # The heading folded at its spaces, not by the terminal in a word.
    assert lines[:2] == [
        "rollout r20261206-105354-bf7a  completed  change rotate-cert  scope cluster",
        "strategy direct  max-parallel 1  freeze node  epoch 3",
    ], text


@pytest.mark.parametrize("how", ["status", "wait", "schema show"])
@pytest.mark.parametrize("columns", ["80", ""])
def test_a_pipe_keeps_every_column_and_every_row_on_one_line(
    monkeypatch: pytest.MonkeyPatch, how: str, columns: str
) -> None:
    """Into a pipe or a log the table keeps every column (scripts read it), and, session 75,
    each row on one line, at its natural width, whatever COLUMNS says: drawn 200 columns wide
    (or at COLUMNS), a ten-column table of three nodes folded its addresses
    ("https://127.135.200.1:8443/praxis_liv" over "e/"; with a long reason ".../pra" over
    "xis_live/"), and a grep of a --wait log for a node's new address found nothing."""
    view = watched_view(types_pb2.ROLLOUT_STATE_COMPLETED)
    for k, node in enumerate(view.nodes, 1):
        node.old_url = f"http://127.135.200.{k}:8080/praxis_live/"
        node.new_url = f"https://127.135.200.{k}:8443/praxis_live/"
    view.nodes[2].state = types_pb2.NODE_STATE_SKIPPED
    view.nodes[2].reason = (
        "offline: left as is: its agent is not connected (run tlsroll rollout rollback again"
        " once it is back; on the node: systemctl status tlsroll-agent)"
    )
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setenv("COLUMNS", columns)
    if how == "schema show":
        run_schema_show(monkeypatch, {"rollouts": [to_dict(view)], "total_rollouts": 1})
    else:
        with contextlib.suppress(click.exceptions.Exit):  # (exit 7: node nc left as is)
            run_status(monkeypatch, how, view)
    monkeypatch.undo()
    text = stdout.getvalue()
    rows = narrow_rows(text)
    assert len(rows) == 3 and all(len(row) == 1 for row in rows), text
    for row, node in zip(rows, view.nodes, strict=True):
        assert f"│ {node.old_url} " in row[0] and f"│ {node.new_url} " in row[0], row
        assert node.reason in row[0], row
    assert max(cell_len(line) for line in text.splitlines()) > 200, text  # (not cut either)
    whole = "\n".join(render_rollout(to_dict(view)).lines(None, color=False))
    assert text == whole + "\n"
    assert "not shown" not in whole and whole.splitlines()[2].count("┳") == 9


def test_a_wide_terminal_goes_without_no_column() -> None:
    """A terminal wide enough for every column (the reason folded to 30 at least) keeps them
    all, and says no column is left out under the table."""
    data = watched_rollout(types_pb2.ROLLOUT_STATE_COMPLETED)
    lines = render_rollout(data, 240).lines(240, color=False)
    head = next(line for line in lines if line.startswith("┃"))
    assert "cert expires" in head and "old address" in head and "still on http" in head
    assert lines[-2].startswith("└"), lines
    assert lines[-1] == f"reason of every node: {PENDING}", lines  # (said once: see above)


# --- `tlsroll nodes` and `token list` on a narrow terminal (rich tables) ------------------------


class ListingLeader:
    """The admin connection of an in-process `tlsroll nodes` / `token list`: its answer given."""

    def __init__(self, reply: object) -> None:
        self.reply = reply

    def __call__(self, *_args: object) -> ListingLeader:  # (made as ``Leader(socket)``)
        return self

    def admin(self) -> Any:
        import contextlib

        return contextlib.nullcontext(type("Stub", (), {"__getattr__": lambda *_: None})())

    def call(self, *_args: object) -> object:
        return self.reply

    def close(self) -> None:
        pass


def listed_on(monkeypatch: pytest.MonkeyPatch, width: int, terminal: bool, *argv: str) -> str:
    """``tlsroll ARGV`` in process, printed by the CLI's console on a terminal (or into a pipe)
    ``width`` columns wide; what it printed, without styles."""
    from leader.cli import base
    from tlsroll.cli import cli

    screen = io.StringIO()
    console = cli_console(screen, force_terminal=terminal, width=width, no_color=True)
    monkeypatch.setattr(base, "console", lambda: console)
    cli.main(list(argv), standalone_mode=False)
    return re.sub(r"\x1b\[[0-9;]*m", "", screen.getvalue())


def two_nodes() -> admin_pb2.ListNodesResponse:
    when = dt.datetime(2026, 12, 7, 9, 46, tzinfo=dt.UTC)
    reply = admin_pb2.ListNodesResponse()
    for name, address in (("node1", "127.148.0.2"), ("praxis-empfang-02", "192.168.100.203")):
        node = reply.nodes.add(
            name=name, addresses=[address], agent_version="0.2.0", online=True, server="https"
        )
        node.clock_offset_seconds = 0.0
        node.last_heartbeat.FromDatetime(when)
        node.cert_not_after.FromDatetime(when + dt.timedelta(days=30))
        node.renewal_due_at.FromDatetime(when + dt.timedelta(days=11))
    return reply


def test_nodes_on_a_narrow_terminal_keeps_names_and_addresses_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review s71 uxsmalls: at 80 columns `tlsroll nodes` cut every cell to a few letters
    ("praxi…", "127.1…", "0.2.0…") and folded the times onto four lines. It goes without the
    times (and the columns with nothing in red) it has no room for, says which, and keeps the
    node's name and addresses whole; into a pipe every column stays."""
    from leader.cli import identity

    reply = two_nodes()
    monkeypatch.setattr(identity, "Leader", ListingLeader(reply))
    text = listed_on(monkeypatch, 80, True, "nodes")
    lines = text.splitlines()
    assert all(cell_len(line) <= 80 for line in lines), text
    (row,) = [line for line in lines if "praxis-empfang-02" in line]
    assert "192.168.100.203" in row and "online" in row and "https" in row, text
    assert len([line for line in lines if line.startswith("│")]) == 2, text  # a line a node
    assert " ".join(lines[-2:]).startswith(
        "not shown on 80 columns: last heartbeat, cert expires"
    ), text
    assert not [line for line in lines if line.endswith(" ")], text  # (rich's fold left one: s75)
    # A renewal failing is in red: that column stays, folded.
    failing = two_nodes()
    failing.nodes[1].renewal_failing_since.FromDatetime(dt.datetime(2026, 12, 6, tzinfo=dt.UTC))
    failing.nodes[1].renewal_error = "leader unreachable"
    monkeypatch.setattr(identity, "Leader", ListingLeader(failing))
    text = listed_on(monkeypatch, 80, True, "nodes")
    assert "renewal" in text.splitlines()[1] and "failing" in text, text
    # Into a pipe: every column, as before.
    monkeypatch.setattr(identity, "Leader", ListingLeader(reply))
    piped = listed_on(monkeypatch, 200, False, "nodes")
    assert "not shown" not in piped and piped.splitlines()[1].count("┃") == 10, piped


def test_nodes_into_a_pipe_draws_a_row_a_node_whatever_its_width(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 75: into a pipe the CLI's rich console drew 200 columns wide (or COLUMNS): a
    wider `tlsroll nodes` folded its cells ("down: its config cannot be read" over lines). It
    draws its tables at their natural width there (``base.PIPE_COLUMNS``), a row a node."""
    from leader.cli import base, identity
    from tlsroll.cli import cli

    reply = two_nodes()
    reply.nodes[1].server = (
        "down: its config cannot be read, fix the file /etc/praxis/praxis_live/server.toml: "
        "line 12: expected '=' after a key"
    )
    monkeypatch.setattr(identity, "Leader", ListingLeader(reply))
    monkeypatch.setenv("COLUMNS", "80")
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    base.console.cache_clear()
    try:
        cli.main(["nodes"], standalone_mode=False)
    finally:
        base.console.cache_clear()
    monkeypatch.undo()
    rows = [line for line in stdout.getvalue().splitlines() if line.startswith("│")]
    assert len(rows) == 2 and reply.nodes[1].server in rows[1], stdout.getvalue()
    assert cell_len(rows[1]) > 200, rows


def test_nodes_says_a_node_whose_agent_cannot_write_its_store_under_its_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 74: `tlsroll nodes` showed a node whose agent's journal checkpoint fails, or
    whose disk is below a switch's floor, as online and well. Its agent's words
    (``NodeInfo.store_trouble``) go in a line under the table, folded at 80 columns, whole into
    a pipe; a node without says nothing."""
    from leader.cli import identity

    reply = two_nodes()
    trouble = (
        "the journal /var/lib/tlsroll-agent/journal.sqlite3 cannot grow: its checkpoint fails"
        " (SQLITE_FULL: database or disk is full); free space on its file system (df -h)"
    )
    reply.nodes[1].store_trouble.append(trouble)
    monkeypatch.setattr(identity, "Leader", ListingLeader(reply))
    text = listed_on(monkeypatch, 80, True, "nodes")
    assert all(cell_len(line) <= 80 for line in text.splitlines()), text
    said = " ".join(text.split("praxis-empfang-02: its agent", 1)[1].split())
    assert said.startswith(f"cannot write its store safely: {trouble}"), text
    assert "node1: its agent" not in text
    piped = listed_on(monkeypatch, 200, False, "nodes")
    line = f"praxis-empfang-02: its agent cannot write its store safely: {trouble}"
    assert line in piped.splitlines(), piped


def test_token_list_on_a_narrow_terminal_keeps_the_node_s_name_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review s71 uxsmalls: at 80 columns `token list` cut the node's name ("praxis-empfan…")."""
    from leader.cli import base

    reply = admin_pb2.ListTokensResponse()
    token = reply.tokens.add(id="fcn5oc", node_name="praxis-empfang-02", uses_allowed=1)
    token.expires_at.FromDatetime(dt.datetime(2026, 12, 7, 10, 48, tzinfo=dt.UTC))
    monkeypatch.setattr(base, "Leader", ListingLeader(reply))
    text = listed_on(monkeypatch, 80, True, "token", "list")
    assert "│ praxis-empfang-02 │" in text, text


def test_check_expiration_on_a_narrow_terminal_keeps_the_subject_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review s71 uxsmalls: at 80 columns `certs check-expiration` cut the subject and the
    serial ("praxis-e…", "16ba13e40…") and folded each date onto three lines. It goes without
    the horizon and the serial, says so, and keeps the subject whole."""
    from leader.cli import base

    reply = admin_pb2.CheckExpirationResponse()
    for kind, subject in (("agent", "praxis-empfang-02"), ("ca", "")):
        cert = reply.certificates.add(
            kind=kind,
            subject=subject,
            serial="16ba13e40c7f5e7d8a4b4b6f0a0c9e1d2f3a4b5c",
            residual_seconds=29 * 86400,
            horizon_seconds=15 * 86400,
        )
        cert.not_after.FromDatetime(dt.datetime(2027, 1, 6, 9, 46, 27, tzinfo=dt.UTC))
    monkeypatch.setattr(base, "Leader", ListingLeader(reply))
    text = listed_on(monkeypatch, 80, True, "certs", "check-expiration")
    lines = text.splitlines()
    assert all(cell_len(line) <= 80 for line in lines), text
    assert any("│ praxis-empfang-02 │ 2027-01-06 09:46:27 UTC │" in line for line in lines), text
    assert (
        lines[-1]
        == "not shown on 80 columns: warn within, serial (all: the same command | less -S)"
    )
    piped = listed_on(monkeypatch, 200, False, "certs", "check-expiration")
    assert "16ba13e40c7f5e7d8a4b4b6f0a0c9e1d2f3a4b5c" in piped and "not shown" not in piped


def test_a_narrow_table_folds_the_address_before_the_node_s_name() -> None:
    """The admin reads the end table by the nodes' names: what must still fold once the columns
    are gone is the address (the widest), not "praxis-empfang-/02"."""
    view = watched_view(types_pb2.ROLLOUT_STATE_COMPLETED)
    for node in view.nodes:
        node.password_pending = False
    view.nodes[1].name = "praxis-empfang-02"
    view.nodes[1].new_url = "https://127.148.0.3:8443/praxis_live/"
    text = "\n".join(render_rollout(to_dict(view), 80).lines(80, color=False))
    assert "│ 2 │ praxis-empfang-02 │ done " in text, text
    assert all(cell_len(line) <= 80 for line in text.splitlines()), text


def test_workstations_list_on_a_narrow_terminal_keeps_the_names_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review s71 uxsmalls: at 80 columns `workstations list` cut the workstation's and the
    node's names and the serial; it goes without the issue time and the serial, says so."""
    from leader.cli import base

    reply = admin_pb2.ListWorkstationsResponse()
    pc = reply.workstations.add(
        name="ws-empfang-pc17", node="praxis-empfang-02", serial="5e28d89f2" * 4
    )
    pc.issued_at.FromDatetime(dt.datetime(2026, 12, 7, 9, 46, tzinfo=dt.UTC))
    pc.not_after.FromDatetime(dt.datetime(2027, 12, 7, 9, 46, tzinfo=dt.UTC))
    monkeypatch.setattr(base, "Leader", ListingLeader(reply))
    text = listed_on(monkeypatch, 80, True, "workstations", "list")
    assert "│ ws-empfang-pc17 │ praxis-empfang-02 │ 2027-12-07 09:46:00 UTC │ valid │" in text, text
    assert "not shown on 80 columns: issued, serial" in text, text
    assert all(cell_len(line) <= 80 for line in text.splitlines()), text


def test_an_empty_listing_on_a_narrow_terminal_is_its_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No workstation yet: the table's headers, as before (the narrow terminal's measure of
    its columns found no cell)."""
    from leader.cli import base

    monkeypatch.setattr(base, "Leader", ListingLeader(admin_pb2.ListWorkstationsResponse()))
    text = listed_on(monkeypatch, 80, True, "workstations", "list")
    assert "┃ workstation ┃ node ┃ issued ┃ expires ┃ state ┃ serial ┃" in text, text


# --- paragraphs on a narrow terminal: `plan`, `rollout start`'s warnings, `nodes remove` -------


class ScriptedLeader(ListingLeader):
    """The admin connection of an in-process command that makes several calls: each call's
    answer by its method's name."""

    def __init__(self, **replies: object) -> None:
        super().__init__(None)
        self.replies = replies

    def admin(self) -> Any:
        import contextlib

        return contextlib.nullcontext(type("Stub", (), {"__getattr__": lambda _s, n: n})())

    def call(self, *args: object) -> object:
        return self.replies[str(args[0])]  # (the method: its name, from ``admin()``)

    def require_same_code(self) -> None:
        pass


def unbroken(text: str, lines: list[str], width: int = 80) -> None:
    """``lines`` (what a command printed) fit ``width`` columns, and every command in
    backticks, path and URL of ``text`` is whole on one of them: a terminal folded a long line
    in the middle of a word ("https://10.0.0.3:84" / "43/")."""
    assert all(cell_len(line) <= width for line in lines), "\n".join(lines)
    for piece in re.findall(r"`[^`]+`|\S*(?:/|://)\S*", text):
        assert any(piece in line for line in lines), (piece, "\n".join(lines))


def said(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())


def long_plan() -> admin_pb2.PlanResponse:
    from leader.plan_texts import plan_texts
    from leader.rollout_core import Change, FreezeMode, Strategy

    checks, steps, warnings = plan_texts(Change.ENABLE_TLS, Strategy.DIRECT, FreezeMode.NODE, False)
    reply = admin_pb2.PlanResponse(
        rollout=schema_pb2.RolloutView(
            change=types_pb2.CHANGE_ENABLE_TLS,
            scope=types_pb2.SCOPE_KIND_CLUSTER,
            strategy=types_pb2.STRATEGY_DIRECT,
            max_parallel=1,
            nodes=[
                schema_pb2.NodeView(
                    name="praxis-empfang-02",
                    state=types_pb2.NODE_STATE_PENDING,
                    still_on_http=3,
                    other_certificate=True,
                )
            ],
        ),
        checks=checks,
        client_steps=steps,
        warnings=[
            *warnings,
            "node2 serves http and https: close http there with tlsroll rollout finalize "
            "r20261206-105354-bf7a, or tlsroll rollout retry r20261206-105354-bf7a (the rollout "
            "that left it so); its address https://192.168.100.203:8443/praxis_live/ stays",
        ],
    )
    return reply


def test_the_plan_folds_at_spaces_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review s71 "80 columns": `tlsroll plan`'s lines (a node's, a warning's, a check's) are
    longer than 80 columns, printed whole: the terminal folded them in the middle of a word, a
    URL or a command. On a terminal they fold at their spaces, the lines after the first under
    the text of the item ("  ! "), a command or a URL whole on one line; into a pipe each
    stays one line (as before: `less`, a ticket and grep take it whole)."""
    from leader.cli import base

    reply = long_plan()
    monkeypatch.setattr(base, "Leader", ScriptedLeader(PlanRollout=reply))
    lines = listed_on(monkeypatch, 80, True, "plan", "--scope", "cluster").splitlines()
    for text in [*reply.warnings, *reply.checks, *reply.client_steps]:
        unbroken(text, lines)
        assert " ".join(text.split()) in said(lines), text  # every word, in its order
    (item,) = [k for k, line in enumerate(lines) if line.startswith("  ! node2 serves http")]
    assert lines[item + 1].startswith("    ") and not lines[item + 1].startswith("     ")
    for command in ("tlsroll rollout finalize r20261206-105354-bf7a,", "tlsroll rollout retry"):
        assert any(command in line for line in lines), "\n".join(lines)  # not split
    piped = listed_on(monkeypatch, 80, False, "plan", "--scope", "cluster").splitlines()
    for text in reply.warnings:
        assert f"  ! {text}" in piped


def test_rollout_start_s_warnings_fold_at_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rollout start --yes` prints the plan's warnings after the start: folded at spaces on
    a terminal too."""
    from leader.cli import base

    planned = long_plan()
    planned.rollout.change = types_pb2.CHANGE_ROTATE_CERT
    planned.rollout.nodes[0].still_on_http = 0
    view = schema_pb2.RolloutView(id="r20261206-105354-bf7a", epoch=3, nodes=planned.rollout.nodes)
    monkeypatch.setattr(base, "Leader", ScriptedLeader(PlanRollout=planned, StartRollout=view))
    argv = ["rollout", "start", "--change", "rotate-cert", "--scope", "cluster", "--yes"]
    lines = listed_on(monkeypatch, 80, True, *argv).splitlines()
    assert lines[0].startswith("rollout r20261206-105354-bf7a started"), lines
    for text in planned.warnings:
        unbroken(text, lines)
        assert " ".join(text.split()) in said(lines), text


def test_nodes_remove_folds_its_paragraphs_with_the_commands_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`nodes remove`'s two paragraphs (how to enrol the node again, what to do on that
    machine) folded in a word at 80 columns; they fold at spaces, each command whole (the
    admin copies them), the long join command on a line of its own."""
    from leader.cli import base, identity

    reply = admin_pb2.RemoveNodeResponse(
        node=admin_pb2.NodeInfo(name="praxis-empfang-02", addresses=["192.168.100.203"]),
        revoked_serials=["16ba13e40c", "5e28d89f2"],
    )
    for module in (base, identity):
        monkeypatch.setattr(module, "Leader", ScriptedLeader(RemoveNode=reply))
    argv = ["nodes", "remove", "praxis-empfang-02", "--yes"]
    lines = listed_on(monkeypatch, 80, True, *argv).splitlines()
    for command in (
        "`(umask 077; tlsroll token create --node praxis-empfang-02 --address 192.168.100.203 "
        "--print-join-command > join-praxis-empfang-02.sh)`",
        "`mv DATA/node.key DATA/node.key.removed`",
        "`systemctl enable --now tlsroll-agent`",
        "`systemctl disable --now tlsroll-agent`",
        "`tlsroll password set`",
        "`tlsroll rollout start --change change-password`",
    ):
        assert any(command in line for line in lines), (command, "\n".join(lines))
    # Only the join command (wider than the terminal) is on a line wider than 80.
    assert [line for line in lines if cell_len(line) > 80] == [
        next(line for line in lines if "umask" in line)
    ]
    assert said(lines).startswith("removed node praxis-empfang-02; revoked 2 certificate(s).")


def header_of(lines: list[str]) -> list[str]:
    """The headers of the (one) table among ``lines``."""
    head = next(line for line in lines if line.startswith("┃"))
    return [h.strip() for h in head.strip("┃").split("┃")]


@pytest.mark.parametrize("live", [True, False])
def test_no_empty_reason_column_when_every_node_s_reason_is_said_once(live: bool) -> None:
    """Session 73's note, "80 columns": since the reason every node shares is said once (on the
    watch's counts line, under `schema show`'s table), the table kept a reason column with no
    word in it, 9 columns of an 80-column terminal on every frame of the watch. It goes, the
    watch's and the table `schema show` leaves at its end alike; a reason one node has of its
    own keeps it (its row says it); into a pipe every column stays (scripts read it)."""
    view = watched_view(types_pb2.ROLLOUT_STATE_RUNNING)

    def drawn() -> list[str]:
        data = to_dict(view)
        block = render_live(data, 80, 24) if live else render_rollout(data, 80)
        return block.lines(80, color=False)

    lines = drawn()
    assert "reason" not in header_of(lines), lines
    assert all(cell_len(line) <= 80 for line in lines), lines
    assert PENDING.split("`")[0].split()[-1] in " ".join(lines), lines  # (said once, beside)
    view.nodes[2].reason = "confirm failed: timeout"
    lines = drawn()
    assert header_of(lines)[-1] == "reason", lines
    assert any("│ confirm failed: timeout" in line for line in lines), lines
    piped = render_rollout(to_dict(watched_view(types_pb2.ROLLOUT_STATE_RUNNING)))
    assert header_of(piped.lines(1000, color=False))[-1] == "reason"


def test_a_command_wider_than_the_watch_folds_as_one_shell_command() -> None:
    """Session 73's note, "80 columns": a command in backticks wider than the terminal (the
    shared reason's `tlsroll rollout start --change change-password` on a 44-column pane)
    was folded into lines that, copied, ran as two commands, or cut; the live view's lines must
    fit (rich's Live cuts the rest). It folds at its spaces with the shell's line continuation:
    the lines copied together are one command to a shell, and every line fits."""
    command = "tlsroll rollout start --change change-password"
    assert f"`{command}`" in PENDING
    data = watched_rollout(types_pb2.ROLLOUT_STATE_RUNNING)
    for width in (44, 40, 36):
        lines = render_live(data, width, 24).lines(width, color=False)
        assert all(cell_len(line) <= width for line in lines), lines
        text = "\n".join(lines)
        copied = text[text.index("`") + 1 : text.index("`", text.index("`") + 1)]
        assert "\\\n" in copied, text  # folded, with the continuation
        assert all(line.endswith(" \\") for line in copied.splitlines()[:-1]), text
        # What a shell makes of the lines pasted: the command's words, each whole.
        said = subprocess.run(
            ["sh", "-c", f'set -- {copied}; printf "%s\\n" "$@"'],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        assert said.stdout.split("\n")[:-1] == command.split(), (text, said.stdout)


@pytest.mark.parametrize("width", [80, 100, 110])
def test_the_watch_s_counts_line_cut_says_so_and_leaves_no_half_command(width: int) -> None:
    """Where no line is free for what every node shares (a short terminal), the counts line is
    cut: it ends in "…" (at 80 columns the cut fell at a word's end and the "…" was lost:
    "takes effect" read as whole), and never in a command in backticks (at 100 it read
    "with `tlsroll rollout st…", which, copied, runs something else)."""
    data = watched_rollout(types_pb2.ROLLOUT_STATE_RUNNING)
    lines = render_live(data, width, 9).lines(width, color=False)
    counts = lines[1]
    assert counts.startswith("3 nodes: 1 switching, 2 done; every node: password change"), lines
    assert counts.endswith("…") and "`" not in counts, lines
    assert cell_len(counts) <= width, lines


def test_a_reason_of_some_rows_stays_in_them_and_a_pipe_keeps_each_row_whole() -> None:
    """A reason only some nodes have stays in their rows (only what every row says goes under
    the table); into a pipe every row keeps its whole reason (grep finds a node's line)."""
    view = watched_view(types_pb2.ROLLOUT_STATE_COMPLETED)
    view.nodes[2].reason = "confirm failed: timeout"
    for screen in (80, 240):
        text = "\n".join(render_rollout(to_dict(view), screen).lines(screen, color=False))
        assert text.count(PENDING[:23]) == 1 and "confirm failed: timeout" in text, text
        assert f"reason of every node: {PENDING[:23]}" in text, text
    view.nodes[1].password_pending = False
    text = "\n".join(render_rollout(to_dict(view), 80).lines(80, color=False))
    assert "reason of every node" not in text and text.count("password change") == 2, text
    piped = render_rollout(to_dict(watched_view(types_pb2.ROLLOUT_STATE_COMPLETED)))
    rows = [line for line in piped.lines(1000, color=False) if line.startswith("│ ")]
    assert len(rows) == 3 and all(line.count(PENDING) == 1 for line in rows), rows


def test_who_is_on_which_scheme_without_a_client_is_no_empty_table() -> None:
    """Review s71 "80 columns": `schema show` drew the "who is on which scheme" table's eight
    headers and no row when no node had reported a client; the heading says so instead, the
    nodes' lines under it."""
    from leader.cli.draw import render_clients

    heard = "2026-12-07T09:00:00Z"
    views = [
        {
            "node": "srv3",
            "clients": {"source": "access-log", "window_seconds": 600},
            "reported_at": heard,
        },
    ]
    lines = render_clients(views).lines(80, color=False)
    assert lines == [
        "who is on which scheme (per node): no client reported",
        "srv3: 0 still on http; window 600s, source access-log, reported 2026-12-07 09:00:00 UTC",
    ], lines
    views[0]["clients"]["clients"] = [  # type: ignore[index]
        {"scheme": "http", "address": "192.168.1.7", "requests": 3}
    ]
    lines = render_clients(views).lines(80, color=False)
    assert lines[0] == "who is on which scheme (per node)" and lines[1].startswith("┏"), lines


def test_a_report_naming_a_problem_is_no_0_still_on_http_under_the_table() -> None:
    """Review s75 revpipes L4: the table's column shows "-" for a node whose client report
    names a problem (its driver's client command failed: a finalize counts it as not known),
    while the line under the table said "node2: 0 still on http". It says it cannot tell now,
    and why; a report with its sightings and a problem keeps its count."""
    from leader.cli.draw import render_clients

    heard = "2026-12-07T09:00:00Z"
    failed = {"source": "exec", "window_seconds": 600, "problem": "clients: exit status 1"}
    views: list[dict[str, Any]] = [{"node": "node2", "clients": failed, "reported_at": heard}]
    (_, line) = render_clients(views).lines(400, color=False)
    assert line == (
        "node2: cannot tell who is still on http: its client report names a problem; window"
        " 600s, source exec, reported 2026-12-07 09:00:00 UTC; problem: clients: exit status 1"
    ), line
    old = {"scheme": "http", "address": "192.168.1.7", "requests": 3, "last_seen": heard}
    views[0]["still_on_http"] = [old]
    lines = render_clients(views).lines(400, color=False)
    assert any(x.startswith("node2: 1 still on http;") for x in lines), lines


def test_who_is_on_which_scheme_has_no_blank_column() -> None:
    """Session 75: the table's last column had no header, and was blank when nobody was
    still on http. It is "still on http" ("yes" on an http client not seen on https since),
    and only there when a row has one."""
    from leader.cli.draw import render_clients

    heard = "2026-12-07T09:00:00Z"
    http = {"scheme": "http", "address": "192.168.1.7", "workstation": "Empfang", "requests": 3}
    https = {**http, "scheme": "https", "address": "192.168.1.8", "workstation": "Labor"}
    view = {
        "node": "srv3",
        "clients": {"source": "access-log", "window_seconds": 600, "clients": [http, https]},
        "reported_at": heard,
    }

    def table(views: list[dict[str, Any]]) -> list[list[str]]:
        lines = render_clients(views).lines(None, color=False)
        return [
            [cell.strip() for cell in line[1:-1].split(line[0])]
            for line in lines
            if line[0] in "┃│"
        ]

    nobody = table([view])
    assert nobody[0] == ["node", "scheme", "address", "workstation", "requests", "first", "last"]
    still = table(
        [{**view, "still_on_http": [{"address": "192.168.1.7", "workstation": "Empfang"}]}]
    )
    assert still[0][-1] == "still on http", still
    assert [row[-1] for row in still[1:]] == ["yes", ""], still


@pytest.mark.parametrize("width", [60, 70, 75, 80, 120])
def test_the_watch_s_more_line_never_cuts_its_command(width: int) -> None:
    """Session 75: under about 75 columns the watch's "… N more (all: tlsroll schema show
    --rollout ID)" was cut inside the rollout's id ("…--rollout r20261206-10…"): a copy ran
    with another id. The command is whole, or the line goes without it."""
    data = watched_rollout(types_pb2.ROLLOUT_STATE_RUNNING, 60)
    last = render_live(data, width, 24).lines(width, color=False)[-1]
    assert cell_len(last) <= width, last
    assert re.fullmatch(
        r"… \d+ more( \(all: tlsroll schema show --rollout r20261206-105354-bf7a\))?", last
    ), last
    assert ("tlsroll" in last) is (width >= 70), last


@pytest.mark.parametrize(
    ("env", "styled"), [({"NO_COLOR": "1"}, False), ({"NO_COLOR": ""}, True), ({}, True)]
)
def test_no_color_means_no_style_in_rich_s_tables_as_in_schema_show(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], styled: bool
) -> None:
    """Review s71 "80 columns": with NO_COLOR set, `schema show` (``leader.cli.plain``) printed
    no escape at all, but the commands drawn by rich (`nodes`, `token list`, …) kept bold and
    reverse: the CLI's own console draws no style either (a NO_COLOR set to "" is not set,
    as no-color.org says). The table reads the same: its head is on the heavy rule."""
    from leader.cli import base
    from leader.cli.plain import terminal
    from tlsroll.cli import cli

    reply = admin_pb2.ListTokensResponse()
    token = reply.tokens.add(id="fcn5oc", node_name="praxis-empfang-02", uses_allowed=1)
    token.expires_at.FromDatetime(dt.datetime(2026, 12, 7, 10, 48, tzinfo=dt.UTC))
    monkeypatch.setattr(base, "Leader", ListingLeader(reply))
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "80")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stdout = Tty()
    monkeypatch.setattr(sys, "stdout", stdout)
    base.console.cache_clear()
    try:
        cli.main(["token", "list"], standalone_mode=False)
        assert terminal()[1] is styled  # `schema show`'s tables: the same rule
    finally:
        base.console.cache_clear()
    text = stdout.getvalue()
    assert ("\x1b[" in text) is styled, repr(text)
    assert "┃ id " in re.sub(r"\x1b\[[0-9;]*m", "", text), text


def test_the_help_reads_whole_at_80_columns() -> None:
    """Review s71 "80 columns", `--help` of every admin command at 80 columns: a group's list
    cut most commands' lines with "..." (9 of the 14 of `tlsroll --help`), the option help
    folded at hyphens ("change-" / "password", "[default: enable-" / "tls]": words an admin
    types) and in the commands in backticks ("`tlsroll" / "rollout finalize`"), and two helps
    told the project's history ("review s48rev3", "session 68"). Session 73: the client's
    commands too (`client test-connection --help` read "(ws-" / "NAME": its help had click's
    own formatter, not the admin commands')."""
    import click
    from click.testing import CliRunner

    from leader.cli import admin
    from tlsroll.cli import cli
    from workstation.cli import client

    runner = CliRunner()
    ctx = click.Context(admin, info_name="tlsroll")
    helps: dict[str, str] = {}

    def walk(command: click.Command, path: list[str]) -> None:
        done = runner.invoke(cli, [*path, "--help"], terminal_width=80)
        assert done.exit_code == 0, (path, done.output)
        helps[" ".join(path)] = done.output
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, [*path, name])

    walk(admin, [])
    walk(client, ["client"])
    assert len(helps) > 30 and "client test-connection" in helps, sorted(helps)
    for path, text in helps.items():
        lines = text.splitlines()
        assert all(len(line) <= 80 for line in lines), (path, text)
        listed = lines[lines.index("Commands:") + 1 :] if "Commands:" in lines else []
        cut = [line for line in listed if line.endswith("...")]
        assert cut == [], (path, text)
        assert not [line for line in lines if re.search(r"[a-z]-$", line)], (path, text)
        assert not [line for line in lines if line.count("`") % 2], (path, text)  # `a command`
        assert not re.search(r"review s\d|session \d", text), (path, text)
    start = " ".join(helps["rollout start"].split())
    assert "change-password: apply a staged password; rotate-cert: a new" in start, start


@pytest.mark.parametrize(
    "path", [[], ["rollout"], ["rollout", "start"], ["client"], ["client", "test-connection"]]
)
def test_every_help_has_the_same_formatter(
    monkeypatch: pytest.MonkeyPatch, path: list[str]
) -> None:
    """Session 73's note, "80 columns": `tlsroll --help` (the top-level group) was drawn by
    click's own formatter, which folds at hyphens and in commands in backticks, while every
    command under it had ``tlsroll.cli.Help``: it has that one too, as the admin's groups
    and the client's commands have."""
    from click.testing import CliRunner

    from tlsroll import cli as entry

    drawn: list[str] = []

    class Seen(entry.Help):
        def getvalue(self) -> str:
            drawn.append(super().getvalue())
            return drawn[-1]

    monkeypatch.setattr(entry.HelpContext, "formatter_class", Seen)
    done = CliRunner().invoke(entry.cli, [*path, "--help"], terminal_width=80)
    assert done.exit_code == 0, done.output
    assert drawn and drawn[-1] == done.output, (path, drawn, done.output)
