"""``tlsroll certs check-expiration [--json]``: every certificate the cluster depends on, with
its residual time (kubeadm's ``certs check-expiration``).

The leader answers (``Admin.CheckExpiration``); the CLI reads no key and no certificate file.
Exit code 1 when any certificate is within its warning horizon or expired, so that a cron job
or a monitoring check can run it as it is.
"""

from __future__ import annotations

import click

from leader.cli.base import (
    Leader,
    emit_json,
    fail,
    fmt_time,
    pass_leader,
    print_fitted,
    say,
    to_dict,
)
from leader.cli.draw import residual


@click.group()
def certs() -> None:
    """The certificates of the cluster."""


@certs.command(
    "check-expiration", short_help="Every certificate, its time left; exit 1 if one is due."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def check_expiration(leader: Leader, as_json: bool) -> None:
    """List every certificate (CA, leader, viewer, each agent's, each node's server
    certificate, each workstation's) with its residual time; exit 1 if any is within its
    warning horizon (`expiry_warning_days` in leader.toml; agents: half of their life), or if
    one in use is revoked: the leader's or the viewer's (the leader issues those again at
    once), or a node's server certificate it still serves (a rotate-cert replaces it)."""
    from tlsroll.v1 import admin_pb2  # noqa: PLC0415 - only when this command runs

    with leader.admin() as admin:
        reply = leader.call(admin.CheckExpiration, admin_pb2.CheckExpirationRequest())
    if as_json:
        data = to_dict(reply)
        data.setdefault("warning", False)
        emit_json(data)
    else:
        # rich's tables: some 25 ms of imports that --json does without (session 66)
        from rich.text import Text  # noqa: PLC0415

        headers = ["kind", "subject", "expires", "residual", "warn within", "state", "serial"]
        rows: list[list[Text]] = []
        for c in reply.certificates:
            if c.revoked:
                state = Text("REVOKED", style="bold red")
            elif c.residual_seconds < 0:
                state = Text("EXPIRED", style="bold red")
            elif c.warning:
                state = Text("WARNING", style="bold yellow")
            else:
                state = Text("ok", style="green")
            rows.append(
                [
                    Text(c.kind),
                    Text(c.subject or "-"),
                    Text(fmt_time(c, "not_after")),
                    Text(residual(c.residual_seconds)),
                    Text(residual(c.horizon_seconds)),
                    state,
                    Text(c.serial or "-"),
                ]
            )
        # At 80 columns rich cut the subject and the serial ("praxis-e…", "16ba13e40…"): a
        # narrow terminal goes without the horizon and the serial (whole or not at all).
        print_fitted(headers, rows, ("warn within", "serial"), whole=("subject",))
        for c in reply.certificates:
            if (c.warning or c.revoked) and c.advice:
                say(f"{c.kind} {c.subject or ''}".rstrip() + f": {c.advice}")
    if reply.warning:
        count = sum(c.warning or c.revoked for c in reply.certificates)
        fail(f"{count} certificate(s) within their warning horizon, expired or revoked")
