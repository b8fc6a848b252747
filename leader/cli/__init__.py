"""The administrator's command line (``tlsroll init|ca|token|nodes|rollout|schema|viewer|…``).

It runs on the leader node, as root or a member of the leader's group. Everything except
``init`` talks to the running leader over its Unix admin socket. The ``tlsroll`` entry point
(``tlsroll.cli``) loads this package for every command but ``client``; it also turns errors
into one line and an exit code.
"""

from __future__ import annotations

import importlib

import click

# --- commands ---------------------------------------------------------------------------------

LAZY = {
    "init": "leader.cli.cluster_cmd:init",
    "ca": "leader.cli.cluster_cmd:ca",
    "token": "leader.cli.cluster_cmd:token",
    "plan": "leader.cli.rollout:plan",
    "nodes": "leader.cli.identity:nodes",
    "workstations": "leader.cli.identity:workstations",
    "epoch": "leader.cli.identity:epoch",
    "rollout": "leader.cli.rollout:rollout",
    "schema": "leader.cli.schema_cmd:schema",
    "password": "leader.cli.password:password_group",
    "notify": "leader.cli.notify_cmd:notify",
    "viewer": "leader.cli.viewer:viewer",
    "certs": "leader.cli.certs:certs",
}
"""Every command's module, imported only when that command runs (or help lists it): one
``tlsroll schema show`` loaded every command's module, the notice templates (jinja2) and the
password policy (zxcvbn) among them, for 260 ms of imports. This module holds only the group,
so that what it imports is what every command needs anyway."""


class LazyAdmin(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY:
            module, _, attr = LAZY[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyAdmin)
def admin() -> None:
    """The administrator's commands; ``tlsroll.cli`` serves them as top-level commands."""
