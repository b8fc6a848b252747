"""The ``tlsroll`` command: one name, two audiences, each loading only its own code.

    tlsroll client …           workstation.cli   on a practice PC: nothing of the leader, no
                                                 gRPC, no rich is imported
    tlsroll <anything else> …  leader.cli        the administrator's commands on the leader node

Like Kubernetes' ``cmd/``, this entry point is tiny. It is the only module of the shared package
that names a role package, and it names them as strings (``LAZY``), imported when a command is
looked up, so the import rule (role packages never import each other, the shared package none of
them) holds.

Every error is one line on stderr: exit code 2 for usage errors, 1 for failures (a command may
define its own codes, like ``tlsroll client test-connection``), never a traceback.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import click

from tlsroll import __version__
from tlsroll.defaults import DEFAULT_DATA_DIR
from tlsroll.errors import TlsrollError

LAZY = {"client": "workstation.cli:client"}
"""Top-level commands that live outside the admin CLI, as ``module:attribute``."""
ADMIN = "leader.cli:admin"
"""The group that holds every other top-level command."""


@dataclass(frozen=True)
class Target:
    """The global options, for the admin commands: which leader to talk to."""

    data_dir: Path
    socket: Path | None


def _load(spec: str) -> click.Command:
    module, _, attr = spec.partition(":")
    command = getattr(importlib.import_module(module), attr)
    assert isinstance(command, click.Command)
    return command


class LazyGroup(click.Group):
    """A group whose commands are imported only when they are looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        admin = _load(ADMIN)
        assert isinstance(admin, click.Group)
        return sorted({*LAZY, *admin.list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY:
            return _load(LAZY[cmd_name])
        admin = _load(ADMIN)
        assert isinstance(admin, click.Group)
        return admin.get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tlsroll")
@click.option(
    "--data-dir",
    # readable=False: click would refuse a data dir we may not read with a usage error; the
    # admin command says which group to join when it cannot reach the socket.
    type=click.Path(path_type=Path, readable=False),
    envvar="TLSROLL_DATA_DIR",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="The leader's data directory.",
)
@click.option(
    "--socket",
    type=click.Path(path_type=Path, readable=False),
    envvar="TLSROLL_SOCKET",
    help="The leader's admin socket [default: DATA_DIR/run/admin.sock].",
)
@click.pass_context
def cli(ctx: click.Context, data_dir: Path, socket: Path | None) -> None:
    """tlsroll: switch a multiserver from http to https, safely, node by node."""
    ctx.obj = Target(data_dir, socket)


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error is one line on stderr."""
    try:
        code = cli.main(args=argv, prog_name="tlsroll", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
        # A group called without a command: click's message is the whole help text.
        message = (
            "missing command"
            if isinstance(exc, click.exceptions.NoArgsIsHelpError)
            else exc.format_message()
        )
        click.echo(f"tlsroll: error: {message}{hint}", err=True)
        return 2
    except click.Abort:
        click.echo("tlsroll: aborted", err=True)
        return 1
    except click.ClickException as exc:
        click.echo(f"tlsroll: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except TlsrollError as exc:
        click.echo(f"tlsroll: error: {exc}", err=True)
        return 1
    except OSError as exc:
        click.echo(f"tlsroll: error: {exc.strerror}: {exc.filename}", err=True)
        return 1
    return code if isinstance(code, int) else 0  # a command's ctx.exit(code), else 0


if __name__ == "__main__":  # python -m tlsroll.cli: run the module itself, not a copy of it
    from tlsroll.cli import main as _main

    raise SystemExit(_main())
