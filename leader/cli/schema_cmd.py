"""``tlsroll schema show``: the update schema, read-only (``--watch`` follows a rollout).

Its own module, apart from the commands that start and steer rollouts: an admin runs it often
(``--watch`` while a rollout runs), so it imports what it draws with and nothing else — not the
``--cert-dir`` checks or the password policy of ``rollout start``, nor cryptography; with
``--json`` not rich either (``leader.cli.draw``). Nor protobuf: it asks for the schema as the
JSON that ``--json`` prints (``fetch_schema_json``) and draws that. A test in
``tests/test_perf_shape.py`` keeps it so.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from typing import Any

import click

from leader.cli.base import (
    CLIError,
    Leader,
    console,
    emit_json,
    fetch_schema_json,
    pass_leader,
    rollout_id_param,
    while_away,
)
from tlsroll.cli import quick_exit

TERMINAL = {"completed", "halted", "aborted"}
"""The core's ``TERMINAL_ROLLOUT_STATES`` as the schema's JSON names them, written here so as
not to import the core nor its enums (a test keeps the two equal)."""
AWAITING = "awaiting_finalize"
ENDS = TERMINAL | {AWAITING}  # where --wait and --watch stop: nothing more happens by itself


# --- schema -----------------------------------------------------------------------------------


@click.group()
def schema() -> None:
    """The update schema (read-only)."""


@schema.command("show", short_help="Show the newest rollout, its nodes, the cluster's state.")
@click.option(
    "--rollout", "rollout_id", default="", callback=rollout_id_param, help="Only this rollout."
)
@click.option("--all", "show_all", is_flag=True, help="Every rollout stored, not only the newest.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Follow the newest rollout until it ends.")
@pass_leader
def schema_show(
    leader: Leader, rollout_id: str, show_all: bool, as_json: bool, watch: bool
) -> None:
    """Show the active rollout (else the latest; --all: every one) with its nodes, states,
    times, freeze windows, addresses and cert expiry, whether the cluster is mixed (some
    servers on http, some on https) and how to switch the rest, and failed bootstrap
    passwords."""
    quick_exit()  # it only reads and prints: nothing for the interpreter's teardown to do
    if watch:
        try:
            watch_schema(leader, rollout_id, as_json)
        except KeyboardInterrupt:  # Ctrl-C is how one stops watching; the rollout goes on
            click.echo("stopped watching; the rollout goes on (tlsroll schema show --watch)")
        return
    data = fetch_schema_json(leader, rollout_id, limit=0 if show_all or rollout_id else 1)
    if as_json:
        emit_json(data)
        return
    from leader.cli.draw import (  # noqa: PLC0415 - text only
        counted_nodes,
        render_certificate_health,
        render_clients,
        render_failures,
        render_login_failures,
        render_node_problems,
        render_password_behind,
        render_revocations,
        render_rollout,
    )
    from leader.cli.plain import Block, emit, screen  # noqa: PLC0415

    rollouts = data.get("rollouts", [])
    parts: list[Block | str] = []
    if data.get("node_problems"):  # first: some hold the nodes' plans and switches
        parts.append(render_node_problems(data["node_problems"]))
    if not rollouts:
        parts.append("no rollouts yet")
    counted = counted_nodes(data.get("node_clients", []))  # (who has a 0 still on http)
    parts += [render_rollout(r, screen(), counted) for r in rollouts]
    if mixed := data.get("mixed_cluster"):  # (the nodes the rollouts above leave out too)
        from leader.mixed_cluster import Mixed, dual_left_by, mixed_line  # noqa: PLC0415

        m = Mixed(*(tuple(mixed.get(k, ())) for k in Mixed._fields))
        # (the words of `tlsroll nodes`; a dual node's rollout by its id where one shown has it)
        parts.append(mixed_line(m, dual_left_by(m.dual, rollouts)))
    if data.get("password_behind"):  # (a change-password that ended part way: s69 M1)
        parts.append(render_password_behind(data["password_behind"]))
    if data.get("node_clients"):
        parts.append(render_clients(data["node_clients"]))
    older = data.get("total_rollouts", 0) - len(rollouts)
    if older > 0 and not rollout_id:
        parts.append(f"{older} older rollout(s) not shown: tlsroll schema show --all")
    if data.get("bootstrap_failures"):
        parts.append(render_failures(data["bootstrap_failures"]))
    if data.get("server_login_failures"):
        parts.append(render_login_failures(data["server_login_failures"]))
    if data.get("removed_nodes") or data.get("revoked_certificates"):
        parts.append(render_revocations(data))
    if (health := render_certificate_health(data)) is not None:
        parts.append(health)
    emit(*parts)


def watch_schema(leader: Leader, rollout_id: str, as_json: bool, interval: float = 0.5) -> None:
    """Follow one rollout (the named one, else the newest) by asking for it alone, each time
    without the rest of the schema; across a restart of the leader (``while_away``)."""
    first = fetch_schema_json(leader, rollout_id, limit=1, rollouts_only=True)
    if not first.get("rollouts"):
        raise CLIError("no rollout to watch")
    r: dict[str, Any] = first["rollouts"][0]
    watched = r["id"]
    # Who has a 0 still on http (``draw.counted_nodes``), from the answer ``r`` came with: the
    # watch showed "-" for every 0, where `schema show` shows 0 (review s75 revpipes).
    clients: list[Any] = first.get("node_clients", [])

    def newest() -> dict[str, Any] | None:
        nonlocal clients
        data = while_away(
            lambda: fetch_schema_json(leader, watched, rollouts_only=True), interval=interval
        )
        if not data.get("rollouts"):
            return None
        clients = data.get("node_clients", [])
        answer: dict[str, Any] = data["rollouts"][0]
        return answer

    if as_json:
        last = None
        while True:
            if r != last:
                emit_json(r)
                last = r
            if r["state"] in ENDS:
                return
            time.sleep(interval)
            r = newest() or r
    from leader.cli.draw import counted_nodes, render_rollout  # noqa: PLC0415 - text only
    from leader.cli.plain import emit, screen  # noqa: PLC0415

    # A log, not a screen: one line per change, the table at the end. A terminal that cannot
    # move its cursor (TERM=dumb or unknown: an editor's shell, a serial console) too: rich's
    # Live draws nothing on it until it stops (review of s63-v2, L5).
    term = os.environ.get("TERM", "").lower()
    if not sys.stdout.isatty() or term in ("dumb", "unknown"):
        seen: dict[str, str] = {}

        def note(what: str, key: str, state: str, reason: str) -> None:
            if seen.get(key) != state:
                seen[key] = state
                why = f" ({reason})" if reason else ""
                emit(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {what} {key}: {state}{why}")

        while True:
            for n in r.get("nodes", []):
                note("node", n["name"], n["state"], n.get("reason", ""))
            note("rollout", r["id"], r["state"], r.get("reason", ""))
            if r["state"] in ENDS:
                emit(render_rollout(r, screen(), counted_nodes(clients)))
                return
            time.sleep(interval)
            r = newest() or r
    from rich.live import Live  # noqa: PLC0415 - only a terminal watching live needs it

    from leader.cli.draw import LiveRollout  # noqa: PLC0415

    # On the screen, a view that fits it (``draw.render_live``: rich's Live cut the whole table
    # at the screen's foot, review s63 M2); once the watch ends, by itself or by Ctrl-C, that
    # view goes and the whole table of the rollout as last seen stays, its cells uncut.
    try:
        live_view = LiveRollout(r, counted_nodes(clients))
        with Live(live_view, console=console(), refresh_per_second=4, transient=True) as live:
            while r["state"] not in ENDS:
                time.sleep(interval)
                r = newest() or r
                live.update(LiveRollout(r, counted_nodes(clients)))
    finally:
        emit(render_rollout(r, screen(), counted_nodes(clients)))
