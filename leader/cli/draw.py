"""How the admin CLI draws a rollout and the rest of the schema on a terminal or into a log
(rich): ``tlsroll schema show``, ``rollout status`` and ``--wait``.

Apart from ``leader.cli.schema_cmd`` so that ``schema show --json`` (monitoring scripts run it)
does not import rich.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from leader.cli.base import fmt_time
from leader.schema_wire import CHANGE, FREEZE, NODE_STATE, ROLLOUT_STATE, SCOPE_KIND, STRATEGY
from tlsroll.v1 import schema_pb2

PENDING = "password change pending — takes effect at next restart"
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


def _dt(msg: Any, field: str) -> dt.datetime | None:
    return getattr(msg, field).ToDatetime(tzinfo=dt.UTC) if msg.HasField(field) else None


def _styled(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def freeze_window(node: schema_pb2.NodeView) -> str:
    start, end = _dt(node, "freeze_started_at"), _dt(node, "freeze_ended_at")
    if start is None:
        return "-"
    if end is None:
        return f"{start:%H:%M:%S}–(frozen)"
    return f"{start:%H:%M:%S}–{end:%H:%M:%S} ({(end - start).total_seconds():.1f}s)"


def render_rollout(r: schema_pb2.RolloutView) -> Group:
    head = Text.assemble(
        ("rollout ", "bold"),
        (r.id, "bold"),
        "  ",
        _styled(ROLLOUT_STATE.text(r.state)),
        f"  change {CHANGE.text(r.change)}  scope {SCOPE_KIND.text(r.scope)}"
        + (f" ({', '.join(r.scope_nodes)})" if r.scope_nodes else "")
        + f"  strategy {STRATEGY.text(r.strategy)}  max-parallel {r.max_parallel}"
        f"  freeze {FREEZE.text(r.freeze)}"
        f"  epoch {r.epoch}"
        + (f"  finalizes {r.finalizes}" if r.finalizes else "")
        + (f"  when quiet for {r.when_quiet_seconds}s" if r.when_quiet_seconds else ""),
    )
    times = Text(
        f"created {fmt_time(r, 'created_at')} by {r.started_by or '-'}"
        f"   started {fmt_time(r, 'started_at')}   ended {fmt_time(r, 'ended_at')}"
        + (f"   note: {r.reason}" if r.reason else "")
    )
    table = Table(
        "#",
        "node",
        "state",
        "old address",
        "new address",
        "freeze window",
        "restart",
        "cert expires",
        "still on http",
        "reason",
    )
    for i, n in enumerate(r.nodes, 1):
        table.add_row(
            str(i),
            n.name + (" (leader)" if n.leader_node else ""),
            _styled(NODE_STATE.text(n.state)),
            n.old_url or "-",
            n.new_url or "-",
            freeze_window(n),
            f"{n.restart_seconds:.1f}s" if n.restart_seconds else "-",
            fmt_time(n, "cert_not_after"),
            str(n.still_on_http) if n.still_on_http else "-",
            "; ".join(filter(None, [n.reason, PENDING if n.password_pending else ""])),
        )
    return Group(head, times, table)


def render_clients(views: Sequence[schema_pb2.NodeClientsView]) -> Group:
    """Per node, who its managed server saw on which scheme lately (from the agents'
    heartbeats); peer-supplied strings are printed as plain text (no rich markup)."""
    table = Table("node", "scheme", "address", "workstation", "requests", "first", "last", "")
    notes: list[Text] = []
    for v in views:
        left = {(c.address, c.workstation) for c in v.still_on_http}
        for c in v.clients.clients:
            mark = (
                "still on http" if c.scheme == "http" and (c.address, c.workstation) in left else ""
            )
            table.add_row(
                Text(v.node),
                c.scheme,
                Text(c.address),
                Text(c.workstation or "-"),
                str(c.requests),
                fmt_time(c, "first_seen"),
                fmt_time(c, "last_seen"),
                Text(mark, style="bold yellow"),
            )
        source = v.clients.source or "unknown"
        problem = f"; problem: {v.clients.problem}" if v.clients.problem else ""
        notes.append(
            Text(
                f"{v.node}: {len(v.still_on_http)} still on http; window "
                f"{v.clients.window_seconds}s, source {source}, reported "
                f"{fmt_time(v, 'reported_at')}{problem}"
            )
        )
    head = Text("who is on which scheme (per node)", style="bold")
    return Group(head, table, *notes)


def render_revocations(data: schema_pb2.Schema) -> Group:
    """Removed nodes and revoked certificates (``tlsroll nodes remove``, ``… revoke``)."""
    parts: list[Any] = []
    if data.removed_nodes:
        removed = Table("removed node", "addresses", "removed")
        for n in data.removed_nodes:
            removed.add_row(Text(n.name), ", ".join(n.addresses), fmt_time(n, "removed_at"))
        parts.append(removed)
    if data.revoked_certificates:
        revoked = Table("revoked certificate", "kind", "of", "node", "revoked", "reason")
        for c in data.revoked_certificates:
            revoked.add_row(
                c.serial,
                c.kind,
                Text(c.subject or "-"),
                Text(c.node or "-"),
                fmt_time(c, "revoked_at"),
                Text(c.reason),
            )
        parts.append(revoked)
    return Group(Text("removed and revoked", style="bold"), *parts)


def render_failures(failures: Sequence[schema_pb2.BootstrapFailureView]) -> Group:
    """Failed passwords at the nodes' bootstrap services: a guessing attack shows up here.
    Peer-supplied strings are printed as plain text (no rich markup)."""
    table = Table("node", "source address", "workstation", "failures", "first", "last")
    for f in failures:
        table.add_row(
            Text(f.node),
            Text(f.source),
            Text(f.workstation or "-"),
            str(f.count),
            fmt_time(f, "first_at"),
            fmt_time(f, "last_at"),
        )
    head = Text("failed bootstrap passwords (port 9443)", style="bold")
    return Group(head, table)
