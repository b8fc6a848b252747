"""The ``tlsroll`` command: one name, two audiences, each loading only its own code.

    tlsroll client …           workstation.cli   on a practice PC: nothing of the leader, no
                                                 gRPC, no rich is imported
    tlsroll <anything else> …  leader.cli        the administrator's commands on the leader node

Like Kubernetes' ``cmd/``, this entry point is tiny. It is the only module of the shared package
that names a role package, and it names them as strings (``LAZY``), imported when a command is
looked up, so the import rule (role packages never import each other, the shared package none of
them) holds.

Every error is one line on stderr: exit code 2 for usage errors, 1 for failures (a command may
define its own codes, like ``tlsroll client test-connection``), never a traceback: an error
nobody foresaw is ``internal error: TYPE`` with exit 1 (``TLSROLL_DEBUG=1`` shows its
traceback). What an error repeats of the input is escaped, cut and never a secret
(``tlsroll.echo``).

Run as the program (``main()`` reading ``sys.argv``: the console script, ``python -m tlsroll``),
two things cut what Python itself costs around a short command (``tlsroll schema show``, goal
150 ms, issue 15): the cyclic garbage collector pauses while the command's modules are imported
(every object they create lives as long as the process: some 5 % of ``schema show``'s
instructions went to collections that found nothing), and a command that leaves nothing to
finalize (``quick_exit``) ends the process once its output is flushed, without the
interpreter's teardown (freeing every module: some 9 %). In-process callers (``main(argv)``,
the tests) get neither.
"""

from __future__ import annotations

import gc
import importlib
import os
import re
import select
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import click

from tlsroll import __version__, echo, nocore
from tlsroll.defaults import DEBUG_ENV, DEFAULT_DATA_DIR
from tlsroll.errors import TlsrollError


class Lazy(NamedTuple):
    """A command imported only when it is looked up: where it is (``module:attribute``), and
    what a group's help lists for it (its help's first sentence, as click would shorten it),
    so that ``tlsroll --help`` imports none of the commands it lists (``Summarized``)."""

    spec: str
    summary: str


LAZY = {
    "client": Lazy(
        "workstation.cli:client",
        "The workstation side: connect a PC to the encrypted server.",
    )
}
"""Top-level commands that live outside the admin CLI."""
ADMIN = "leader.cli:admin"
STDOUT_CLOSED = "standard output is closed"
"""The group that holds every other top-level command."""
READER_GONE = 141
"""The exit code of a command whose stdout's reader has gone (``tlsroll plan | head``, a pager
quit): 128 + SIGPIPE, what a shell reports of ``ls | head`` or ``git log | head`` ended so,
under ``set -o pipefail`` too. Not an error: nothing is said (session 68, README walk: click
ended it with exit 1, as a plan with a blocked node does). A secret nobody saw is another
matter: ``token create`` and ``viewer grant`` revoke it and say so, exit 1 (session 67)."""


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
    columns"). A command wider than a line is cut, as click cuts any word that long. The admin
    commands' (``leader.cli``) and the client's (``workstation.cli``: `client test-connection
    --help` read "(ws-" / "NAME", session 73)."""

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


def refuse_empty_path(
    kind: click.ParamType[Any],
    value: object,
    param: click.Parameter | None,
    ctx: click.Context | None,
) -> None:
    """A usage error (exit 2, one line naming the option) for an empty path: click took ``''``
    for the current directory, and its errors then named "." (the ops review of session 63:
    ``--socket ''``, ``--password-file ''``); an empty value is a slip (a shell variable not
    set), never a way to name a directory. Any other value is the type's to judge."""
    if isinstance(value, str | bytes) and not value:
        kind.fail("must not be empty (a shell variable not set?)", param, ctx)


class PathParam(click.Path):
    """``click.Path``, for every path option of the ``tlsroll`` commands, that refuses an empty
    path (``refuse_empty_path``) before click looks at it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        refuse_empty_path(self, value, param, ctx)
        return super().convert(value, param, ctx)


@dataclass(frozen=True)
class Target:
    """The global options, for the admin commands: which leader to talk to."""

    data_dir: Path
    socket: Path | None


class _Program:
    """What ``main()`` does only as the program (see the module docstring)."""

    gc_paused = False
    quick_exit = False


def _pause_gc() -> None:
    gc.disable()
    _Program.gc_paused = True


def _resume_gc() -> None:
    """Once the command's modules are in: they go to the collector's permanent generation
    (``gc.freeze``), so that the command's own collections, if any, never walk them again."""
    if _Program.gc_paused:
        _Program.gc_paused = False
        gc.freeze()
        gc.enable()


def quick_exit() -> None:
    """Said by a command that leaves nothing for the interpreter's teardown to do: no file it
    has not closed, no thread, no ``atexit`` work of its own (``tlsroll schema show``, which
    only reads). Run as the program, the process then ends once stdout and stderr are
    flushed (``main``)."""
    _Program.quick_exit = True


def terminal_only(add: str) -> None:
    """The rule of every question a command asks (``leader.cli.base.ask_first``, the password
    and port prompts): it is asked on a terminal only. With stdin not one (a script, a pipe,
    cron) nothing is read from it, not even ``echo y |`` or a piped answer, and nothing waits
    for it: a usage error (exit 2), "not a terminal: ``add``", which names the option that
    gives the answer instead (review s48rev3: the port and notify's password prompts read a
    pipe, or hung on one)."""
    if not sys.stdin.isatty():
        raise click.UsageError(f"not a terminal: {add}")


def _exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown; back to the normal
    exit if the output cannot be flushed (a closed pipe), so that its error is as before."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # (closed when the program started: ``2>&-``)
                stream.flush()
    except (OSError, ValueError):
        return
    os._exit(code)


def _load(spec: str) -> click.Command:
    module, _, attr = spec.partition(":")
    command = getattr(importlib.import_module(module), attr)
    assert isinstance(command, click.Command)
    return command


class Summarized(click.Group):
    """A group whose help lists its lazy commands by their summaries (``Lazy.summary``) instead
    of importing each to read its help: ``tlsroll --help`` imported every command's module, the
    workstation's connection code, cryptography, jinja2, rich and the planner among them
    (about 0.25 s of CPU, session 66). The listing is click's own (``Group.format_commands``),
    a command's line shortened as click shortens its help; a test keeps each summary its
    command's. Its help is folded as its commands' are (``Help``): ``tlsroll --help`` had
    click's own formatter (session 73's note, "80 columns")."""

    context_class = HelpContext

    def summary(self, ctx: click.Context, cmd_name: str) -> str | None:
        """The summary of lazy command ``cmd_name``; None: look the command up."""
        return None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        commands: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            summary = self.summary(ctx, name)
            command: click.Command | None
            if summary is not None:  # a stand-in: click shortens its help as the command's
                command = click.Command(name, help=summary)
            else:
                command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                commands.append((name, command))
        if commands:
            limit = formatter.width - 6 - max(len(name) for name, _ in commands)
            rows = [(name, command.get_short_help_str(limit)) for name, command in commands]
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class LazyGroup(Summarized):
    """A group whose commands are imported only when they are looked up."""

    def summary(self, ctx: click.Context, cmd_name: str) -> str | None:
        if cmd_name in LAZY:
            return LAZY[cmd_name].summary
        admin = _load(ADMIN)
        assert isinstance(admin, Summarized)
        return admin.summary(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        admin = _load(ADMIN)
        assert isinstance(admin, click.Group)
        return sorted({*LAZY, *admin.list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command: click.Command | None
        if cmd_name in LAZY:
            command = _load(LAZY[cmd_name].spec)
        else:
            admin = _load(ADMIN)
            assert isinstance(admin, click.Group)
            command = admin.get_command(ctx, cmd_name)
        _resume_gc()  # the command's modules are in (what it imports later is little)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tlsroll")
@click.option(
    "--data-dir",
    # readable=False: click would refuse a data dir we may not read with a usage error; the
    # admin command says which group to join when it cannot reach the socket.
    type=PathParam(path_type=Path, readable=False),
    envvar="TLSROLL_DATA_DIR",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="The leader's data directory.",
)
@click.option(
    "--socket",
    type=PathParam(path_type=Path, readable=False),
    envvar="TLSROLL_SOCKET",
    help="The leader's admin socket [default: DATA_DIR/run/admin.sock].",
)
@click.pass_context
def cli(ctx: click.Context, data_dir: Path, socket: Path | None) -> None:
    """tlsroll: switch a multiserver from http to https, safely, node by node."""
    ctx.obj = Target(data_dir, socket)


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error is one line on stderr. Without ``argv`` it runs as the
    program, on ``sys.argv`` (see the module docstring)."""
    if argv is not None:
        return _run(argv)
    if sys.stdout is None:
        # Started with stdout closed (``>&-``): Python has no sys.stdout, and a command wrote
        # nowhere (exit 0), or its table ended as an internal error, a quick exit's flush as a
        # traceback. Refused before anything is done, as a write to it would fail.
        _error(f"{STDOUT_CLOSED}: give the command one (> /dev/null to drop what it prints)")
        return 1
    nocore.no_core_dumps()  # before any command reads a secret (``tlsroll.nocore``)
    _pause_gc()
    try:
        code = _run(None)
    finally:
        _resume_gc()  # (a command never looked up: --help, --version, a usage error)
    try:
        sys.stdout.flush()  # what is left of the output: its reader may have gone meanwhile
    except OSError:
        if not _reader_gone():
            raise
        code = READER_GONE
    if _Program.quick_exit:
        _exit_now(code)
    return code


def _reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: then it takes no output
    any more, and whatever is still in its buffer goes to /dev/null instead, so that neither
    the exit's flush nor anything else fails on it again (Python's own advice for SIGPIPE,
    ignored by the interpreter: EPIPE)."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
        if gone:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        return gone
    except (OSError, ValueError, AttributeError):  # no descriptor behind it (a test's runner)
        return False


def _run(argv: list[str] | None) -> int:
    """Run the command; every error is one line on stderr (``tlsroll.echo``: no control
    character acts on the terminal, no input is repeated at length, no secret at all), and an
    error nobody foresaw too, exit 1, unless ``TLSROLL_DEBUG=1`` asks for its traceback."""
    bad = _not_utf8(sys.argv[1:] if argv is None else argv)
    if bad:
        # Python holds such bytes as surrogates, which nothing can send or store (protobuf
        # refused them as an internal error: review s48rev3 L1). Not repeated: it is no text.
        _error(
            f"argument {bad} is not UTF-8 text (a terminal set to another encoding, such as "
            "Latin-1?); give names, paths and values in UTF-8"
        )
        return 2
    try:
        code = cli.main(args=argv, prog_name="tlsroll", standalone_mode=False)
    except (SystemExit, BrokenPipeError):
        # (click ends a command whose write found no reader with sys.exit(1), even when not
        # standalone; a write of our own outside its call raises)
        if _reader_gone():
            return READER_GONE
        raise
    except click.UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
        # A group called without a command: click's message is the whole help text.
        message = (
            "missing command"
            if isinstance(exc, click.exceptions.NoArgsIsHelpError)
            else echo.one_line(exc.format_message())  # click's own repeat argv as given
        )
        _error(f"{message}{hint}")
        return 2
    except click.Abort:
        click.echo("tlsroll: aborted", err=True)
        return 1
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except TlsrollError as exc:
        _error(str(exc))
        return 1
    except OSError as exc:
        what = exc.strerror or type(exc).__name__
        where = f": {echo.shown_path(exc.filename)}" if exc.filename is not None else ""
        _error(f"{what}{where}")
        return 1
    except Exception as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        # Its type only: its message may hold anything, a secret the command read among it.
        _error(
            f"internal error: {type(exc).__name__}; run it again with {DEBUG_ENV}=1 for the "
            "traceback, and report it"
        )
        return 1
    return code if isinstance(code, int) else 0  # a command's ctx.exit(code), else 0


def _not_utf8(args: list[str]) -> int:
    """The position (from 1) of the first argument that is not UTF-8 text, else 0."""
    for position, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return position
    return 0


def _error(message: str) -> None:
    click.echo(f"tlsroll: error: {echo.safe_lines(message)}", err=True)


if __name__ == "__main__":  # python -m tlsroll.cli: run the module itself, not a copy of it
    from tlsroll.cli import main as _main

    raise SystemExit(_main())
