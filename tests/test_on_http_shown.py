"""Where `schema show`, `rollout status` and the viewer count the workstations still on http
per node (``NodeView.still_on_http``): only in a rollout whose change takes http away
(enable-tls, a transitional rollout's finalize). Session 68's README walk: a way back
(disable-tls) showed "1" still on http for a node it had just taken back to http, a figure that
meant nothing there; a password change or a new certificate keeps the address, the same."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import sys

import pytest

from leader import planner
from leader.cli.draw import render_rollout
from leader.rollout_core import Change, Client, Scope
from leader.schema_store import ClientsInfo, NodeDetail, RolloutMeta, RolloutRow
from leader.schema_view import schema_json, schema_message

NOW = dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.UTC)
# node1's report, fresh: one workstation on http just now, never on https since.
SEEN = [Client("node1", "http", "127.0.0.9", "Empfang", NOW - dt.timedelta(hours=1), NOW)]
INFOS = {"node1": ClientsInfo("node1", 60, "reference", "", NOW, NOW, NOW)}


def row(change: Change) -> RolloutRow:
    rollout, records = planner.plan_rollout(
        rollout_id="r1",
        change=change,
        scope=Scope.cluster(),
        enrolled={"node1": True, "node2": True},
        leader="node1",
        epoch=1,
        finalizes="t1" if change is Change.FINALIZE else "",
    )
    meta = RolloutMeta(created_at=NOW, started_by="admin:test", leader_node="node1")
    return RolloutRow(rollout, meta, tuple((r, NodeDetail()) for r in records))


def shown(change: Change) -> tuple[int, str]:
    """node1's count in the view of a rollout of ``change`` (what `schema show --json` prints)
    and its cell in the "still on http" column of `schema show`'s table."""
    message = schema_message(
        [row(change)],
        set(),
        NOW,
        clients=SEEN,
        infos=INFOS,
        fresh={"node1"},
        reported=lambda _n: True,
    )
    data = json.loads(schema_json(message))
    # The node's own client list says who is on http whatever the rollout.
    (clients,) = [v for v in data["node_clients"] if v["node"] == "node1"]
    assert [c["workstation"] for c in clients["still_on_http"]] == ["Empfang"]
    view = data["rollouts"][0]
    node1 = next(n for n in view["nodes"] if n["name"] == "node1")
    lines = render_rollout(view).lines(400, color=False)
    head = next(line for line in lines if "still on http" in line)
    (line,) = [line for line in lines if "│ node1 " in line]
    cell = line[head.index("still on http") :].split("│")[0].strip()
    return node1.get("still_on_http", 0), cell


@pytest.mark.parametrize("change", [Change.ENABLE_TLS, Change.FINALIZE])
def test_a_change_that_takes_http_away_counts_who_is_still_on_http(change: Change) -> None:
    assert shown(change) == (1, "1")


@pytest.mark.parametrize("change", [Change.DISABLE_TLS, Change.CHANGE_PASSWORD, Change.ROTATE_CERT])
def test_a_change_that_keeps_or_gives_back_http_counts_no_one(change: Change) -> None:
    assert shown(change) == (0, "-")


@pytest.mark.parametrize("how", ["schema show", "rollout status"])
@pytest.mark.parametrize("change", [Change.ENABLE_TLS, Change.FINALIZE])
def test_a_node_known_to_have_no_one_on_http_shows_0_and_one_that_cannot_tell_a_dash(
    monkeypatch: pytest.MonkeyPatch, change: Change, how: str
) -> None:
    """Session 75: the column showed "-" for every 0, in the very rollouts that count, where
    the lines under `schema show`'s table said "node2: 0 still on http". A node whose driver
    reports who connects (a source) and has no one left on http shows 0; one whose driver
    does not say who connects ("cannot tell", as those lines say it) shows "-", as does one
    whose report is awaited; the count where there is one."""
    import click

    from leader.cli import rollout, schema_cmd

    def cells(source: str, awaited: str = "", problem: str = "") -> dict[str, str]:
        infos = {**INFOS, "node2": ClientsInfo("node2", 60, source, problem, NOW, NOW, None)}
        message = schema_message(
            [row(change)], set(), NOW, clients=SEEN, infos=infos, fresh={"node1", "node2"},
            reported=lambda n: n != awaited,
        )  # fmt: skip
        stdout = io.StringIO()
        monkeypatch.setattr(sys, "stdout", stdout)
        if how == "schema show":
            data = json.loads(schema_json(message))
            monkeypatch.setattr(schema_cmd, "fetch_schema_json", lambda *_a, **_k: data)
            schema_cmd.schema.main(["show"], standalone_mode=False)
        else:
            monkeypatch.setattr(rollout, "fetch_schema", lambda *_a, **_k: message)
            with contextlib.suppress(click.exceptions.Exit):
                rollout.rollout_status.main(["r1"], standalone_mode=False)
        monkeypatch.undo()
        lines = stdout.getvalue().splitlines()
        at = next(k for k, line in enumerate(lines) if "still on http" in line and line[0] == "┃")
        table = lines[at : next(k for k in range(at, len(lines)) if lines[k][0] == "└")]
        return {
            name: line[lines[at].index("still on http") :].split("│")[0].strip()
            for name in ("node1", "node2")
            for line in table
            if f"│ {name} " in line
        }

    assert cells("access-log") == {"node1": "1", "node2": "0"}
    assert cells("") == {"node1": "1", "node2": "-"}  # its driver cannot tell
    assert cells("access-log", awaited="node2") == {"node1": "1", "node2": "-"}
    # Review s75 revpipes M1: a report naming a problem (its driver's client command failed)
    # cannot tell either: the leader counts it as not known (a finalize refuses, naming the
    # problem; ``--when-quiet`` waits), so its 0 is "-" too.
    assert cells("exec", problem="clients: exit status 1") == {"node1": "1", "node2": "-"}
