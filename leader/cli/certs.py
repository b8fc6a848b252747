"""``tlsroll certs check-expiration [--json]``: every certificate the cluster depends on, with
its residual time (kubeadm's ``certs check-expiration``).

The leader answers (``Admin.CheckExpiration``); the CLI reads no key and no certificate file.
Exit code 1 when any certificate is within its warning horizon or expired, so that a cron job
or a monitoring check can run it as it is.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Group
from rich.table import Table
from rich.text import Text

from leader.cli.base import Leader, emit_json, fail, fmt_time, out, pass_leader, to_dict
from tlsroll.v1 import schema_pb2


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


@click.group()
def certs() -> None:
    """The certificates of the cluster."""


@certs.command("check-expiration")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def check_expiration(leader: Leader, as_json: bool) -> None:
    """List every certificate (CA, leader, viewer, each agent's, each node's server
    certificate, each workstation's) with its residual time; exit 1 if any is within its
    warning horizon (`expiry_warning_days` in leader.toml; agents: a tenth of their life)."""
    # Here, not with the module: `schema show` imports this module for its certificate part.
    from tlsroll.v1 import admin_pb2  # noqa: PLC0415

    with leader.admin() as admin:
        reply = leader.call(admin.CheckExpiration, admin_pb2.CheckExpirationRequest())
    if as_json:
        data = to_dict(reply)
        data.setdefault("warning", False)
        emit_json(data)
    else:
        table = Table("kind", "subject", "expires", "residual", "warn within", "state", "serial")
        for c in reply.certificates:
            if c.residual_seconds < 0:
                state = Text("EXPIRED", style="bold red")
            elif c.warning:
                state = Text("WARNING", style="bold yellow")
            else:
                state = Text("ok", style="green")
            table.add_row(
                c.kind,
                c.subject or "-",
                fmt_time(c, "not_after"),
                residual(c.residual_seconds),
                residual(c.horizon_seconds),
                state,
                c.serial or "-",
            )
        out.print(table)
        for c in reply.certificates:
            if c.warning and c.advice:
                out.print(f"{c.kind} {c.subject or ''}".rstrip() + f": {c.advice}")
    if reply.warning:
        count = sum(c.warning for c in reply.certificates)
        fail(f"{count} certificate(s) within their warning horizon or expired")


def render_certificate_health(data: schema_pb2.Schema) -> Group | None:
    """The certificate part of ``tlsroll schema show``: what is within its warning horizon,
    which agents fail to renew their certificate, and what ``auto_rotate`` last decided; None
    if there is nothing to say. Text from agents (a renewal's reason) is printed as plain text
    (no rich markup)."""
    parts: list[Any] = []
    if data.expiring_certificates:
        table = Table("kind", "subject", "expires", "residual", "serial")
        for c in data.expiring_certificates:
            table.add_row(
                c.kind,
                Text(c.subject or "-"),
                fmt_time(c, "not_after"),
                residual(c.residual_seconds),
                c.serial or "-",
            )
        parts += [Text("certificates within their warning horizon", style="bold"), table]
    if data.renewal_failures:
        table = Table("node", "failing since", "reason", "its certificate ends")
        for f in data.renewal_failures:
            table.add_row(
                Text(f.node),
                fmt_time(f, "failing_since"),
                Text(f.reason),
                fmt_time(f, "cert_not_after"),
            )
        parts += [Text("agent certificate renewals failing", style="bold"), table]
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
        parts.append(Text(line))
    return Group(*parts) if parts else None
