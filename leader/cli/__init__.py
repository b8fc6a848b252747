"""The administrator's command line (``tlsroll init|ca|token|nodes|rollout|schema|viewer|…``).

It runs on the leader node, as root or a member of the leader's group. Everything except
``init`` talks to the running leader over its Unix admin socket. The ``tlsroll`` entry point
(``tlsroll.cli``) loads this package for every command but ``client``; it also turns errors
into one line and an exit code.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import click

from tlsroll.cli import Lazy, Summarized

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


NO_BREAK = {"-": "\u2011", " ": "\u00a0"}
"""A hyphen, and a space in a command in backticks, as characters the help's wrapping
(``textwrap``) does not fold at: in the help only (``Help``)."""


def _held(text: str) -> str:
    """``text`` with its hyphens and the spaces of its `commands` held (``NO_BREAK``)."""
    text = re.sub(r"`[^`]*`", lambda m: re.sub(r"\s+", NO_BREAK[" "], m[0]), text)
    return text.replace("-", NO_BREAK["-"])


class Help(click.HelpFormatter):
    """click's help, folded at spaces only, a command in backticks whole: it folded at hyphens
    and in commands too, and at 80 columns `rollout start --help` read "change-" / "password",
    "[default: enable-" / "tls]", words an admin types as they read them (review s71 "80
    columns"). A command wider than a line is cut, as click cuts any word that long."""

    def write_text(self, text: str) -> None:
        super().write_text(_held(text))

    def write_dl(self, rows: Any, col_max: int = 30, col_spacing: int = 2) -> None:
        rows = [(first, _held(second)) for first, second in rows]
        super().write_dl(rows, col_max, col_spacing)

    def getvalue(self) -> str:
        text = super().getvalue()
        for plain, held in NO_BREAK.items():
            text = text.replace(held, plain)
        return text


class HelpContext(click.Context):
    formatter_class = Help


def folds_at_spaces(command: click.Command) -> click.Command:
    """``command`` and its subcommands, their help folded by ``Help``."""
    command.context_class = HelpContext
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            folds_at_spaces(sub)
    return command


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
