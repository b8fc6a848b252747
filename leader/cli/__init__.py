"""The administrator's command line (``tlsroll init|ca|token|nodes|rollout|schema|viewer|…``).

It runs on the leader node, as root or a member of the leader's group. Everything except
``init`` talks to the running leader over its Unix admin socket. The ``tlsroll`` entry point
(``tlsroll.cli``) loads this package for every command but ``client``; it also turns errors
into one line and an exit code.
"""

from __future__ import annotations

import importlib

import click

from tlsroll.cli import Lazy, Summarized

# --- commands ---------------------------------------------------------------------------------

LAZY = {
    "init": Lazy(
        "leader.cli.cluster_cmd:init",
        "Create a new multiserver: the CA, the leader's certificate and config.",
    ),
    "ca": Lazy("leader.cli.cluster_cmd:ca", "The cluster CA."),
    "token": Lazy("leader.cli.cluster_cmd:token", "Join tokens for enrolling agents."),
    "plan": Lazy(
        "leader.cli.rollout:plan",
        "Dry run: the update schema a rollout would make, from what each node runs now (nodes "
        'already in the wanted state show "already done"), its checks, what clients must do.',
    ),
    "nodes": Lazy(
        "leader.cli.identity:nodes",
        "List enrolled nodes, online or offline by their heartbeat, each with its clock against "
        "the leader's (from its heartbeats); check them; or remove one.",
    ),
    "workstations": Lazy(
        "leader.cli.identity:workstations",
        "Workstation certificates issued through the nodes' bootstrap services.",
    ),
    "epoch": Lazy(
        "leader.cli.identity:epoch",
        "Rollout epochs: what the leader has given out and what each node has seen.",
    ),
    "rollout": Lazy("leader.cli.rollout:rollout", "Start and steer the switch to https."),
    "schema": Lazy("leader.cli.schema_cmd:schema", "The update schema (read-only)."),
    "password": Lazy(
        "leader.cli.password:password_group",
        "The authentication password workstations need (only its verifier leaves this command).",
    ),
    "notify": Lazy(
        "leader.cli.notify_cmd:notify",
        'Print the "Notify practice" message for the staff, before or after a switch; with '
        "--remaining only the workstations that still need the client steps.",
    ),
    "viewer": Lazy(
        "leader.cli.viewer:viewer",
        "Read-only access to the web viewer (https on the leader, port 9444).",
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
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyAdmin)
def admin() -> None:
    """The administrator's commands; ``tlsroll.cli`` serves them as top-level commands."""
