"""Write man pages (roff, section 1) for tlsroll's commands, from the commands themselves.

    python tools/manpages.py [--out dist/man]

Pages: ``tlsroll.1`` (the global options and every command with its one-line help),
``tlsroll-COMMAND.1`` for each top-level command (each subcommand of a group in its own
section, every option), and ``tlsroll-leader.1``, ``tlsroll-agent.1``, ``tlsroll-refserver.1``
from the daemons' ``--help``. click's own introspection is used (``Command.get_params``,
``Option.get_help_record``) rather than click-man, whose last release predates click 8.2. The
pages carry no date, so the same commands give the same files. An installer puts them in
``/usr/share/man/man1/`` (``man tlsroll-rollout``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from tlsroll import __version__  # noqa: E402
from tlsroll.cli import cli  # noqa: E402

PROG = "tlsroll"
DAEMONS = {
    "tlsroll-leader": ("leader.daemon", "the leader daemon"),
    "tlsroll-agent": ("nodeagent.daemon", "the node agent"),
    "tlsroll-refserver": ("refserver.server", "the reference application server"),
}


def esc(text: str) -> str:
    """Text for roff: backslashes and hyphens escaped, no line starting with a control
    character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def header(name: str, summary: str) -> list[str]:
    return [
        f'.TH "{esc(name.upper())}" "1" "" "{PROG} {__version__}" "tlsroll manual"',
        ".SH NAME",
        f"{esc(name)} \\- {esc(summary)}",
    ]


def _ctx(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    return click.Context(command, info_name=name, parent=parent, **command.context_settings)


def subcommands(
    group: click.Command, ctx: click.Context
) -> Iterator[tuple[str, click.Command, click.Context]]:
    """Every subcommand under ``group``, depth first, with its context."""
    if not isinstance(group, click.Group):
        return
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = _ctx(sub, name, ctx)
        yield name, sub, sub_ctx
        yield from subcommands(sub, sub_ctx)


def options(command: click.Command, ctx: click.Context, *, with_help: bool = False) -> list[str]:
    """The command's options as a tagged list; ``--help`` only where asked (the main page)."""
    lines: list[str] = []
    for param in command.get_params(ctx):
        if param.name == "help" and not with_help:
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        opts, text = record
        lines += [".TP", f"\\fB{esc(opts)}\\fR", esc(" ".join(text.split())) or "\\&"]
    return lines


def usage(command: click.Command, ctx: click.Context) -> str:
    pieces = command.collect_usage_pieces(ctx)
    return f"{ctx.command_path} {' '.join(pieces)}".strip()


def describe(command: click.Command) -> list[str]:
    text = (command.help or "").split("\f", 1)[0]
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    out: list[str] = []
    for p in paragraphs:
        out += [".PP", esc(p)]
    return out


CLIENT_CODES = (
    "These are the admin commands' codes. tlsroll client test-connection, run on a "
    "workstation, has codes of its own, 3 to 11 (see its --help): there 5 means the "
    "connection was refused and 6 a TLS failure."
)

# The exit codes as README "Exit codes" documents them (review s45rt2 L5: the page named only
# 2 and 1).
EXIT_CODES = (
    ("0", "Success (rollout status: the rollout runs, is paused or completed)."),
    ("1", "A failure (the one line on stderr says which)."),
    (
        "2",
        "A usage error: a bad option or value, also one the leader refuses as INVALID_ARGUMENT.",
    ),
    (
        "3",
        "rollout status, and --wait: the rollout halted or was aborted; every node that did "
        "not finish is back where it was.",
    ),
    (
        "4",
        "rollout status, and --wait: a node needs attention, neither switched nor back (see "
        "its reason).",
    ),
    (
        "5",
        "The running tlsroll-leader is other code than this tlsroll (upgraded and not "
        "restarted): nothing was changed or shown; systemctl restart tlsroll-leader.",
    ),
    (
        "6",
        "A command that changes something lost the leader's reply after its request was "
        "sent: it may have been done; look (the line names the command) before repeating it.",
    ),
    (
        "130",
        "Ctrl-C while such a request awaited its reply (the leader may have done it), or "
        "while --wait waited (the rollout goes on).",
    ),
)


def main_page(names: list[tuple[str, click.Command, click.Context]], root: click.Context) -> str:
    lines = header(PROG, "switch a multiserver from http to https, safely, node by node")
    lines += [".SH SYNOPSIS", f"\\fB{PROG}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]..."]
    lines += [".SH DESCRIPTION", *describe(cli)]
    lines += [
        ".PP",
        esc(
            "Every command but client talks to the leader over its Unix admin socket. Every "
            "error is one line on stderr; the exit codes are under EXIT STATUS."
        ),
    ]
    lines += [".SH OPTIONS", *options(cli, root, with_help=True)]
    lines += [".SH COMMANDS"]
    for _name, command, ctx in names:
        lines += [".TP", f"\\fB{esc(ctx.command_path)}\\fR", esc(command.get_short_help_str(90))]
    tops = sorted({ctx.command_path.split()[1] for _, _, ctx in names})
    lines += [".SH EXIT STATUS"]
    for code, meaning in EXIT_CODES:
        lines += [".TP", f"\\fB{code}\\fR", esc(meaning)]
    # Review s45rev2 M1: the workstation's command has codes of its own (3-11), which mean
    # other things than the admin commands' 3-6.
    lines += [".PP", esc(CLIENT_CODES)]
    lines += [".SH ENVIRONMENT"]
    lines += [
        ".TP",
        "\\fBTLSROLL_DATA_DIR\\fR, \\fBTLSROLL_SOCKET\\fR",
        esc("The defaults of --data-dir and --socket."),
        ".TP",
        "\\fB_TLSROLL_COMPLETE\\fR",
        esc(
            "Set to bash_source, zsh_source or fish_source, tlsroll prints its shell "
            "completion script instead of running."
        ),
    ]
    see = [f"{PROG}-{t}" for t in tops] + list(DAEMONS)
    lines += [".SH SEE ALSO", esc(", ".join(f"{s}(1)" for s in see))]
    return "\n".join(lines) + "\n"


def command_page(name: str, command: click.Command, ctx: click.Context) -> str:
    lines = header(f"{PROG}-{name}", command.get_short_help_str(90).rstrip("."))
    lines += [".SH SYNOPSIS", f"\\fB{esc(usage(command, ctx))}\\fR"]
    lines += [".SH DESCRIPTION", *describe(command)]
    own = options(command, ctx)
    if own:
        lines += [".SH OPTIONS", *own]
    for _sub_name, sub, sub_ctx in subcommands(command, ctx):
        title = esc(sub_ctx.command_path.upper())
        lines += [f'.SH "{title}"', f"\\fB{esc(usage(sub, sub_ctx))}\\fR"]
        lines += describe(sub)
        lines += options(sub, sub_ctx)
    lines += [".SH SEE ALSO", f"{PROG}(1)"]
    return "\n".join(lines) + "\n"


def daemon_page(script: str, module: str, summary: str) -> str:
    entry: Callable[[list[str]], int] = importlib.import_module(module).main
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        entry(["--help"])
    lines = header(script, summary)
    lines += [".SH SYNOPSIS", f"\\fB{esc(script)}\\fR \\-\\-config \\fIFILE\\fR"]
    lines += [".SH DESCRIPTION", ".nf", esc(buffer.getvalue().rstrip()), ".fi"]
    lines += [".SH SEE ALSO", f"{PROG}(1)"]
    return "\n".join(lines) + "\n"


def generate(out: Path) -> list[Path]:
    """Write every page into ``out``; return their paths, sorted."""
    out.mkdir(parents=True, exist_ok=True)
    root = _ctx(cli, PROG, None)
    everything = list(subcommands(cli, root))
    pages = {f"{PROG}.1": main_page(everything, root)}
    for name, command, ctx in everything:
        if ctx.parent is root:
            pages[f"{PROG}-{name}.1"] = command_page(name, command, ctx)
    for script, (module, summary) in DAEMONS.items():
        pages[f"{script}.1"] = daemon_page(script, module, summary)
    written = []
    for filename, text in sorted(pages.items()):
        path = out / filename
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "man")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
