"""``tlsroll viewer grant|list|revoke``: read-only access to the web viewer, one link at a time.

``grant`` prints a one-time login link (``https://ADDRESS:9444/login/<secret>``); the leader
keeps only a hash of its secret. Whoever opens it first gets a browser session that may only
look, until the grant expires or is revoked.
"""

from __future__ import annotations

import sys

import click

from leader.cli.base import (
    Leader,
    emit_json,
    fmt_time,
    free_text_param,
    not_a_secret,
    out,
    parse_duration,
    pass_leader,
    print_secret,
    private_stdout,
    to_dict,
)
from leader.wire import VIEWER_GRANT_STATE
from tlsroll.v1 import admin_pb2


@click.group()
def viewer() -> None:
    """Read-only access to the web viewer (the leader's port 9444)."""


@viewer.command("grant")
@click.option(
    "--name",
    default="",
    callback=free_text_param,
    help="Who it is for (shown in `viewer list`; its first 100 characters are kept; no "
    "secret: refused).",
)
@click.option(
    "--ttl",
    default="8h",
    show_default=True,
    help="How long the link and its session last, e.g. 30m, 8h, 2d (at most 7d).",
)
@pass_leader
def viewer_grant(leader: Leader, name: str, ttl: str) -> None:
    """Print a one-time login link for the web viewer (shown once)."""
    # Where the link goes, before the grant is made: whoever opens it first is let in (review
    # s66 logs M4).
    private_stdout("the login link is a secret")
    seconds = parse_duration(ttl, "--ttl")
    with leader.admin() as admin:
        reply = leader.call(
            admin.CreateViewerGrant,
            admin_pb2.CreateViewerGrantRequest(name=name, ttl_seconds=seconds),
        )
    grant_id = reply.info.id

    def revoke() -> None:
        with leader.admin() as admin:
            leader.call(admin.RevokeViewerGrant, admin_pb2.RevokeViewerGrantRequest(id=grant_id))

    print_secret(
        reply.login_url + "\n",
        f"viewer grant {grant_id}",
        revoke,
        f"tlsroll viewer revoke {grant_id}",
    )
    if sys.stderr.isatty():
        click.echo(
            f"grant {reply.info.id}: one login, read-only, until "
            f"{fmt_time(reply.info, 'expires_at')}; the browser must trust the cluster CA; "
            f"end it early with: tlsroll viewer revoke {reply.info.id}",
            err=True,
        )


@viewer.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def viewer_list(leader: Leader, as_json: bool) -> None:
    """List the viewer grants (links are never shown again)."""
    with leader.admin() as admin:
        reply = leader.call(admin.ListViewerGrants, admin_pb2.ListViewerGrantsRequest())
    if as_json:
        emit_json([to_dict(g) for g in reply.grants])
        return
    # rich's tables: some 25 ms of imports that --json, grant and revoke do without (session 66)
    from rich.table import Table  # noqa: PLC0415

    table = Table("id", "name", "state", "created by", "opened", "expires")
    for g in reply.grants:
        table.add_row(
            g.id,
            g.name,
            # (a state of a newer leader's, as signed_out was to a CLI before session 68: its
            # number, not an empty cell; --json says "" for it)
            VIEWER_GRANT_STATE.text(g.state) or f"? ({g.state})",
            g.created_by,
            fmt_time(g, "used_at"),
            fmt_time(g, "expires_at"),
        )
    out.print(table)


@viewer.command("revoke")
@click.argument("grant_id")
@pass_leader
def viewer_revoke(leader: Leader, grant_id: str) -> None:
    """Revoke a grant by its id: its browser session ends at once."""
    not_a_secret(grant_id, "the grant's id (tlsroll viewer list lists them)")
    with leader.admin() as admin:
        reply = leader.call(
            admin.RevokeViewerGrant, admin_pb2.RevokeViewerGrantRequest(id=grant_id)
        )
    if reply.info.state == admin_pb2.VIEWER_GRANT_STATE_SIGNED_OUT:  # (nothing written)
        out.print(
            f"viewer grant {reply.info.id} had already ended: its browser signed out;"
            " nothing to revoke"
        )
        return
    out.print(f"revoked viewer grant {reply.info.id}")
