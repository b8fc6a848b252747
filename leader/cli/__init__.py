"""The administrator's command line (``tlsroll init|ca|token|nodes|rollout|schema|viewer|…``).

It runs on the leader node, as root or a member of the leader's group. Everything except
``init`` talks to the running leader over its Unix admin socket. The ``tlsroll`` entry point
(``tlsroll.cli``) loads this package for every command but ``client``; it also turns errors
into one line and an exit code.
"""

from __future__ import annotations

import importlib

import click

from tlsroll.cli import Lazy, Summarized, folds_at_spaces

# --- commands ---------------------------------------------------------------------------------

LAZY = {
    "init": Lazy(
        "leader.cli.cluster_cmd:init",
        "Create a new multiserver: CA, leader certificate and config.",
    ),
    "ca": Lazy("leader.cli.cluster_cmd:ca", "The cluster CA."),
    "token": Lazy("leader.cli.cluster_cmd:token", "Join tokens for enrolling agents."),
    "plan": Lazy(
        "leader.cli.rollout:plan",
        "Dry run: the update schema a rollout would make.",
    ),
    "nodes": Lazy(
        "leader.cli.identity:nodes",
        "List enrolled nodes; check them; or remove one.",
    ),
    "workstations": Lazy(
        "leader.cli.identity:workstations",
        "Workstations' certificates: list or revoke them.",
    ),
    "epoch": Lazy(
        "leader.cli.identity:epoch",
        "Rollout epochs: the leader's and each node's.",
    ),
    "rollout": Lazy("leader.cli.rollout:rollout", "Start and steer the switch to https."),
    "schema": Lazy("leader.cli.schema_cmd:schema", "The update schema (read-only)."),
    "password": Lazy(
        "leader.cli.password:password_group",
        "The authentication password workstations need.",
    ),
    "notify": Lazy(
        "leader.cli.notify_cmd:notify",
        'Print the "Notify practice" message for the staff.',
    ),
    "viewer": Lazy(
        "leader.cli.viewer:viewer",
        "Read-only access to the web viewer (the leader's port 9444).",
    ),
    "certs": Lazy("leader.cli.certs:certs", "The certificates of the cluster."),
}
"""Every command's module, imported only when that command runs: one ``tlsroll schema show``
loaded every command's module, the notice templates (jinja2) and the password policy (zxcvbn)
among them, for 260 ms of imports. ``tlsroll --help`` lists them by their summaries
(``tlsroll.cli.Summarized``: the first sentence of each one's help; a test keeps them so).
This module holds only the group, so that what it imports is what every command needs
anyway."""


class LazyAdmin(Summarized):
    def summary(self, ctx: click.Context, cmd_name: str) -> str | None:
        entry = LAZY.get(cmd_name)
        return entry.summary if entry is not None else None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY:
            module, _, attr = LAZY[cmd_name].spec.partition(":")
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return folds_at_spaces(command)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyAdmin)
def admin() -> None:
    """The administrator's commands; ``tlsroll.cli`` serves them as top-level commands."""
