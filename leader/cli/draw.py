"""How the admin CLI draws a rollout and the rest of the schema on a terminal or into a log:
``tlsroll schema show``, ``rollout status`` and ``--wait``.

Drawn with ``leader.cli.plain`` (the standard library), not rich: see there why. Apart from
``leader.cli.schema_cmd`` so that ``schema show --json`` (monitoring scripts run it) imports none
of it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from leader.cli.base import fmt_time
from leader.cli.plain import Block, Styled, Table
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


def freeze_window(node: schema_pb2.NodeView) -> str:
    start, end = _dt(node, "freeze_started_at"), _dt(node, "freeze_ended_at")
    if start is None:
        return "-"
    if end is None:
        return f"{start:%H:%M:%S}–(frozen)"
    return f"{start:%H:%M:%S}–{end:%H:%M:%S} ({(end - start).total_seconds():.1f}s)"


def render_rollout(r: schema_pb2.RolloutView) -> Block:
    rest = Styled(
        f"  change {CHANGE.text(r.change)}  scope {SCOPE_KIND.text(r.scope)}"
        + (f" ({', '.join(r.scope_nodes)})" if r.scope_nodes else "")
        + f"  strategy {STRATEGY.text(r.strategy)}  max-parallel {r.max_parallel}"
        f"  freeze {FREEZE.text(r.freeze)}"
        f"  epoch {r.epoch}"
        + (f"  finalizes {r.finalizes}" if r.finalizes else "")
        + (f"  when quiet for {r.when_quiet_seconds}s" if r.when_quiet_seconds else "")
    )
    head = [
        Styled(f"rollout {r.id}", "bold"),
        Styled("  "),
        _styled(ROLLOUT_STATE.text(r.state)),
        rest,
    ]
    times = Styled(
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
    return Block(head, times, table)


def render_clients(views: Sequence[schema_pb2.NodeClientsView]) -> Block:
    """Per node, who its managed server saw on which scheme lately (from the agents'
    heartbeats); peer-supplied strings are printed as plain text (``plain.clean``)."""
    table = Table("node", "scheme", "address", "workstation", "requests", "first", "last", "")
    notes: list[Styled] = []
    for v in views:
        left = {(c.address, c.workstation) for c in v.still_on_http}
        for c in v.clients.clients:
            mark = (
                "still on http" if c.scheme == "http" and (c.address, c.workstation) in left else ""
            )
            table.add_row(
                v.node,
                c.scheme,
                c.address,
                c.workstation or "-",
                str(c.requests),
                fmt_time(c, "first_seen"),
                fmt_time(c, "last_seen"),
                Styled(mark, "bold yellow"),
            )
        source = v.clients.source or "unknown"
        problem = f"; problem: {v.clients.problem}" if v.clients.problem else ""
        notes.append(
            Styled(
                f"{v.node}: {len(v.still_on_http)} still on http; window "
                f"{v.clients.window_seconds}s, source {source}, reported "
                f"{fmt_time(v, 'reported_at')}{problem}"
            )
        )
    head = Styled("who is on which scheme (per node)", "bold")
    return Block(head, table, *notes)


def render_revocations(data: schema_pb2.Schema) -> Block:
    """Removed nodes and revoked certificates (``tlsroll nodes remove``, ``… revoke``)."""
    parts: list[Any] = []
    if data.removed_nodes:
        removed = Table("removed node", "addresses", "removed")
        for n in data.removed_nodes:
            removed.add_row(n.name, ", ".join(n.addresses), fmt_time(n, "removed_at"))
        parts.append(removed)
    if data.revoked_certificates:
        revoked = Table("revoked certificate", "kind", "of", "node", "revoked", "reason")
        for c in data.revoked_certificates:
            revoked.add_row(
                c.serial,
                c.kind,
                c.subject or "-",
                c.node or "-",
                fmt_time(c, "revoked_at"),
                c.reason,
            )
        parts.append(revoked)
    return Block(Styled("removed and revoked", "bold"), *parts)


def render_failures(failures: Sequence[schema_pb2.BootstrapFailureView]) -> Block:
    """Failed passwords at the nodes' bootstrap services: a guessing attack shows up here.
    Peer-supplied strings are printed as plain text (``plain.clean``)."""
    table = Table("node", "source address", "workstation", "failures", "first", "last")
    for f in failures:
        table.add_row(
            f.node,
            f.source,
            f.workstation or "-",
            str(f.count),
            fmt_time(f, "first_at"),
            fmt_time(f, "last_at"),
        )
    head = Styled("failed bootstrap passwords (port 9443)", "bold")
    return Block(head, table)


def render_certificate_health(data: schema_pb2.Schema) -> Block | None:
    """The certificate part of ``tlsroll schema show``: what is within its warning horizon,
    which agents fail to renew their certificate, and what ``auto_rotate`` last decided; None
    if there is nothing to say. Text from agents (a renewal's reason) is printed as plain text
    (``plain.clean``)."""
    parts: list[Any] = []
    if data.expiring_certificates:
        table = Table("kind", "subject", "expires", "residual", "serial")
        for c in data.expiring_certificates:
            table.add_row(
                c.kind,
                c.subject or "-",
                fmt_time(c, "not_after"),
                residual(c.residual_seconds),
                c.serial or "-",
            )
        parts += [Styled("certificates within their warning horizon", "bold"), table]
    if data.renewal_failures:
        table = Table("node", "failing since", "reason", "its certificate ends")
        for f in data.renewal_failures:
            table.add_row(
                f.node,
                fmt_time(f, "failing_since"),
                f.reason,
                fmt_time(f, "cert_not_after"),
            )
        parts += [Styled("agent certificate renewals failing", "bold"), table]
    auto = data.auto_rotate
    if data.HasField("auto_rotate") and auto.enabled:
        line = f"auto_rotate: {auto.verdict or 'not checked yet'}"
        if auto.reason:
            line += f" ({auto.reason})"
        state = "open now" if auto.in_window else f"next opens {auto.next_window or '-'}"
        line += f"; window {auto.window}, {state}"
        if auto.due_nodes:
            line += f"; due: {', '.join(auto.due_nodes)}"
        if auto.rollout_id:
            line += f"; last started: {auto.rollout_id}"
        parts.append(line)
    return Block(*parts) if parts else None
