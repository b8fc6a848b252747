"""What every tlsroll daemon does the same way: signals, graceful stop, sd_notify, its last
word on stderr (``say``, ``internal_error``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from tlsroll import echo, leanlog, nocore
from tlsroll.defaults import DEBUG_ENV


def say(prog: str, message: object) -> None:
    """A daemon's error, on stderr (the journal, at every restart): every part shaped like a
    secret scrubbed (a join token pasted into ``join_token_file``, into ``log_level``: review
    s48rev3 M2), no control character that acts on a terminal. To journald (``JOURNAL_STREAM``
    names stderr: under systemd) each line is given priority 3, error: without a ``<N>``
    journald stored it at 6, and ``journalctl -p warning``, or an alert on priority, never
    showed why a daemon will not start (review s66 logs M3). The text stays as read."""
    text = f"{prog}: {echo.safe_lines(str(message))}"
    if leanlog.to_journal(sys.stderr):
        text = "\n".join(leanlog.priority_prefix("error") + line for line in text.split("\n"))
    print(text, file=sys.stderr)


def internal_error(prog: str, exc: BaseException, *, debug: bool = False) -> int:
    """A daemon's catch-all (review s48rev3 M1): one line naming the error's type only (its
    message may hold anything, a secret read among it), exit 1; its traceback first with
    ``debug`` or ``TLSROLL_DEBUG=1``, with every part shaped like one of tlsroll's secrets (a
    join token, a password, a viewer link) hidden (``echo.scrub``): the messages of the error
    and of those it came from are shown, and a switch left in a unit's environment must not
    put a secret into the journal (audit s75 knobaudit)."""
    if debug or os.environ.get(DEBUG_ENV) == "1":
        print(echo.scrub("".join(traceback.format_exception(exc))), end="", file=sys.stderr)
    say(
        prog,
        f"internal error: {type(exc).__name__}; run it again with {DEBUG_ENV}=1 (or at log "
        "level debug) for the traceback, and report it",
    )
    return 1


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd if ``NOTIFY_SOCKET`` is set; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def no_core_dumps() -> None:
    """No core file of this daemon nor of its children (``tlsroll.nocore``)."""
    nocore.no_core_dumps()


def stop_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT; must be called inside the running loop."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def watchdog() -> None:
    """Ping systemd's watchdog (``WatchdogSec=``) at half its interval, while the loop lives.

    A daemon whose event loop hangs stops pinging, and systemd restarts it.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return
    if usec <= 0 or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2_000_000)


async def until_stop_or_end(stop: asyncio.Event, loops: Iterable[asyncio.Task[Any]]) -> str:
    """Wait until ``stop`` is set or one of ``loops`` (tasks meant to run until the stop: the
    leader's rollout engine) ends first. ``""`` for the stop; else what ended and why, e.g.
    ``the engine loop ended: OSError: [Errno 28] No space left on device``, and ``stop`` is
    set so that the other loops end too. A loop that ends by itself leaves the daemon
    answering and pinging the watchdog with nothing doing its work: the daemon must stop
    instead, non-zero, so that the service manager starts it again (systemd's ``Restart=``)."""
    tasks = list(loops)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if stop.is_set():
        return ""
    ended = next(t for t in tasks if t.done())
    stop.set()
    return f"the {ended.get_name()} loop ended: {ended_why(ended)}"


def ended_why(task: asyncio.Task[Any]) -> str:
    """Why a finished task ended: its error (type and text, one line), or how."""
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    if exc is None:
        return "returned"
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` reads it (``COLUMNS``, else
    standard output's terminal, else 80), without importing shutil."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=_columns() - 2)  # argparse's own margin


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage error is one line, as the ``tlsroll`` command's: argparse
    printed its usage (two or three lines) and then the error, in the journal at every restart
    (the ops review of session 63)."""

    def error(self, message: str) -> NoReturn:
        say(self.prog, f"error: {echo.one_line(message)} (see {self.prog} --help)")
        raise SystemExit(2)


def arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """A daemon's command-line parser: a usage error is one line on stderr, exit 2
    (``_Parser``). argparse's help formatter, made for every argument added, asks ``shutil``
    for the terminal's width, and shutil imports bz2 and lzma: about 0.3 MiB a daemon kept
    for months for a help text it never prints (issue 15). This one reads the width as shutil
    would, from ``os``."""
    return _Parser(prog=prog, description=description, formatter_class=_help_formatter)


def path_argument(text: str) -> Path:
    """A daemon's path argument (``type=``): an empty one is a usage error naming the option,
    not the current directory ("." in every error after it: the ops review of session 63), as
    the ``tlsroll`` command refuses one (``tlsroll.cli.refuse_empty_path``)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (a shell variable not set?)")
    return Path(text)
