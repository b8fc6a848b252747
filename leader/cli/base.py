"""What every ``tlsroll`` admin command shares: the leader connection, output helpers, errors.

Imported by every admin command, ``schema show`` among them (goal: 150 ms in all), so it imports
only what they all need. No command imports grpcio (about 50 ms before any call: its core
imports asyncio, and a channel starts its threads): every call is one unary call on the admin
socket (``leader.cli.unary``), the Admin service's through ``Leader.admin``, whose methods
carry their path and reply type from the service's descriptor. The Admin service's messages
are imported by the commands that call it; ``schema show`` reads the schema without protobuf
(``fetch_schema_json``): protobuf and the schema's messages are imported by the functions that
use them."""

from __future__ import annotations

import datetime as dt
import errno
import functools
import grp
import importlib
import json
import os
import pwd
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import click

from leader.cli.unary import RpcFailed, UnaryChannel
from leader.layout import Layout
from tlsroll.cli import Target, terminal_only
from tlsroll.defaults import DEFAULT_DATA_DIR
from tlsroll.echo import free_text_problem, shown, shown_path, whole_secret_kind
from tlsroll.errors import TerminalError, TlsrollError

if TYPE_CHECKING:
    from google.protobuf.descriptor import ServiceDescriptor
    from google.protobuf.message import Message
    from rich.console import Console
    from rich.text import Text

    from tlsroll.v1 import admin_pb2_grpc, schema_pb2

T = TypeVar("T")
M = TypeVar("M", bound="Message")


PIPE_COLUMNS = 100_000
"""The width rich draws at into a pipe or a log: wider than any table, which is then drawn at
its natural width (rich draws no wider than a table needs)."""


def _pipe_width() -> int | None:
    """On a terminal rich fits its width; into a pipe or a log, tables keep whole lines at
    their natural width, ``COLUMNS`` or not (``PIPE_COLUMNS``), rather than folding addresses:
    at 200 columns a wide table folded "…/praxis_liv" over "e/" (session 75), at 80 worse."""
    return None if sys.stdout.isatty() else PIPE_COLUMNS


@functools.cache
def console() -> Console:
    """The console every command prints with, made at its first use."""
    from rich.console import Console  # noqa: PLC0415 - see _Out

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            """A write that found stdout's reader gone (``tlsroll plan | head``) raises, as a
            click.echo's does, for ``tlsroll.cli`` to end the command quietly
            (``READER_GONE``); rich's own exit 1 had put /dev/null in the pipe's place, so
            that nobody could tell (session 68)."""
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    # No markup and no emoji codes: text from agents and workstations (a reason, a name) is
    # printed as it came, never as "[bold]" or ":x:" turned into a style or a picture.
    # NO_COLOR (no-color.org; set and not empty): no styles at all, as ``leader.cli.plain``
    # draws `schema show` and as rich draws for TERM=dumb; rich's own NO_COLOR kept bold and
    # reverse, so one command's table came with escapes and the next without (review s71).
    return _Console(
        highlight=False,
        soft_wrap=True,
        markup=False,
        emoji=False,
        width=_pipe_width(),
        color_system=None if os.environ.get("NO_COLOR") else "auto",
    )


class _Out:
    """``out.print(…)`` and the rest of the console, which is made (and rich imported, some
    20 ms) only when a command prints through it: ``--json`` and one-line commands never do."""

    def __getattr__(self, name: str) -> Any:
        return getattr(console(), name)


out = cast("Console", _Out())


class CLIError(TerminalError):
    """A failure to report as one line with exit code 1."""


def fail(message: str) -> NoReturn:
    raise CLIError(message)


def ask_first(without_terminal: str, question: str, declined: str) -> None:
    """The one rule of a command that asks before it changes something, unless ``--yes``: it
    asks only on a terminal; with stdin not one, a usage error (exit 2: "not a terminal:
    add --yes …", ``without_terminal``) before anything is asked or done; "no" at the prompt
    (or Enter) ends it with exit 1 (``declined``: "not removed"), nothing changed."""
    terminal_only(without_terminal)
    if not click.confirm(question, default=False):
        raise CLIError(declined)


EXIT_OTHER_CODE = 5
"""The running leader is other code than this tlsroll: nothing was changed; restart it."""


class OtherCode(click.ClickException, TerminalError):
    """Refused before a call that changes something: the leader runs other code (exit 5)."""

    exit_code = EXIT_OTHER_CODE


EXIT_MAY_HAVE_BEEN_DONE = 6
"""A call that changes something went out whole and its reply was lost (the leader went away,
stopped or did not answer in time): it may have been done; look before repeating it."""

EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT) while a call that changes something waited for its reply, or while
``--wait`` waited for a rollout: 128 + SIGINT, as a shell reports it."""


class MayHaveBeenDone(click.ClickException, TerminalError):
    """A call that changes something was sent and its reply lost (exit 6): one line that says
    it may have been done and how to look (audit s39race H1)."""

    exit_code = EXIT_MAY_HAVE_BEEN_DONE


class Interrupted(click.ClickException, TerminalError):
    """Ctrl-C after a call that changes something was sent, before its reply (exit 130)."""

    exit_code = EXIT_INTERRUPTED


class Unreachable(CLIError):
    """No leader on the admin socket (it is down, stopping or restarting): nothing was sent,
    or only what changes nothing. ``--watch`` and ``--wait`` wait for it to be back."""


LEADER_AWAY = 300.0
"""How long ``--watch`` and ``--wait`` wait for a leader that went away (restarted, upgraded)
before they give up: a restart takes seconds."""


def while_away(ask: Callable[[], T], *, interval: float = 0.5, patience: float = LEADER_AWAY) -> T:
    """``ask()`` (a read-only call), asked again every ``interval`` while the leader cannot be
    reached (``Unreachable``: it stops, restarts), for at most ``patience`` seconds; a line on
    stderr says it waits, another that the leader is back (stdout stays the command's:
    ``--json``). What ``--watch`` and ``--wait`` poll with: a leader restart in their course
    is no reason to stop following a rollout (audit s39race H2)."""
    away_since: float | None = None
    while True:
        try:
            answer = ask()
        except Unreachable as exc:
            now = time.monotonic()
            if away_since is None:
                away_since = now
                click.echo(f"tlsroll: {exc} - waiting for it to be back", err=True)
            elif now - away_since > patience:
                raise
            time.sleep(interval)
            continue
        if away_since is not None:
            click.echo("tlsroll: the leader is back", err=True)
        return answer


CHECK_WITH = {
    "StartRollout": "tlsroll schema show",
    "RetryRollout": "tlsroll schema show",
    "ControlRollout": "tlsroll schema show",
    "FinalizeRollout": "tlsroll schema show",
    "RevokeCertificate": "tlsroll schema show",
    "CreateToken": "tlsroll token list",
    "RevokeToken": "tlsroll token list",
    "RemoveNode": "tlsroll nodes --all",
    "AdvanceEpoch": "tlsroll epoch show",
    "RenewCA": "tlsroll ca show",
    "CreateViewerGrant": "tlsroll viewer list",
    "RevokeViewerGrant": "tlsroll viewer list",
}
"""Where to see whether a changing Admin method was done, when its reply was lost (else
`tlsroll schema show`). ``SetPassword`` has no list: ``check_hint`` says what to do."""


def check_hint(method: str) -> str:
    """What to do when the reply of ``method`` (``/tlsroll.v1.Admin/StartRollout``) was lost
    after the request was sent."""
    name = method.rpartition("/")[2]
    if name == "SetPassword":
        # Its password is shown only by the reply, which is lost; the newest staged one is
        # what `rollout start --change change-password` sends to the nodes.
        return "stage one again (tlsroll password set): the newest staged one is used"
    return f"check with `{CHECK_WITH.get(name, 'tlsroll schema show')}` before repeating it"


def lost_reply(method: str, code: str, details: str) -> str:
    """The one line for a changing call whose reply was lost after it was sent."""
    if code == "DEADLINE_EXCEEDED":
        what = "the leader did not answer in time"
    elif details == "the leader is stopping":
        what = "the leader stopped"
    elif code == "UNAVAILABLE":
        what = "the connection to the leader was lost"
    else:  # an unreadable reply, a reset: nothing the leader said it did or did not do
        what = f"the leader's reply was lost ({details or code})"
    return f"{what} after the request was sent: it may have been done; {check_hint(method)}"


UNIMPLEMENTED = (
    "the leader does not know this command: it runs an older tlsroll (restart it after an upgrade)"
)

READ_ONLY = frozenset(
    {
        "ListTokens",
        "ListNodes",
        "ListWorkstations",
        "GetEpoch",
        "GetCA",
        "CheckExpiration",
        "CheckNodes",
        "PlanRollout",
        "CheckPassword",
        "ListViewerGrants",
    }
)
"""The Admin methods that change nothing: called through a leader that runs other code they
warn (one line on stderr) and go on. Every other method (a new one too) is refused there, but
for the brakes (``STOPS``)."""

STOPS = frozenset(
    {
        # `rollout pause` and `rollout abort` (``stops``: not resume). rollout_id (1) and action
        # (2, unchanged since the wire enums) are all the request has, so any leader of this
        # contract reads it as meant, and its own engine, which runs the rollout, holds or ends
        # it. Refused, the only way to stop a rollout would be a leader restart in its course,
        # which `install.sh --restart-later` exists to avoid (and after which the engine goes on
        # stepping nodes until the abort arrives).
        "ControlRollout",
        # `token revoke`: id (1), since the first contract. A leaked token is taken away.
        "RevokeToken",
        # `viewer revoke`: id (1), since viewer grants came. The browser session ends.
        "RevokeViewerGrant",
        # `workstations revoke`, `ca revoke`: name_or_serial (1) and reason (2) since the first
        # contract. unknown (3) came in session 34; a leader from before drops it, and revokes a
        # serial it has no record of anyway, which is what --unknown asks. Such a leader lacks
        # session 34's refusals instead: of a serial not on record (it says "revoked" for a
        # mistyped one, as it always did) and of a serial no certificate can have (it would
        # break every revocation list it signs from then on): the CLI refuses that one itself
        # (``refuse_unfit_serial``). workstations_only (4) came in session 63: a leader from
        # before drops it and revokes a serial of another kind as well, as it always did; a
        # workstation's serial is revoked as asked either way.
        "RevokeCertificate",
    }
)
"""The brakes: Admin methods that only stop something or take something away, each with a
request every leader of this contract reads as meant (a test pins their fields). Through a
leader that runs other code they warn and go on, as ``READ_ONLY`` do: an admin must always be
able to stop a rollout and to revoke access, also in the window an upgrade leaves until the
leader is restarted. `rollout resume` is not one: it sets a rollout going again, and a paused
rollout is the time to restart the leader (a pause is kept across the restart), so that the
rest runs on the new code."""


def stops(name: str, request: Message) -> bool:
    """Whether calling Admin method ``name`` with ``request`` is a brake (``STOPS``)."""
    if name not in STOPS:
        return False
    if name == "ControlRollout":
        from tlsroll.v1 import admin_pb2  # noqa: PLC0415 - imported already by the request

        brakes = (admin_pb2.ROLLOUT_ACTION_PAUSE, admin_pb2.ROLLOUT_ACTION_ABORT)
        return isinstance(request, admin_pb2.ControlRolloutRequest) and request.action in brakes
    return True


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
"""The cheapest call on the admin socket (an empty request), for the leader's code alone."""


# --- talking to the leader --------------------------------------------------------------------


def permission_hint(sock: Path) -> str:
    """What to do when the admin socket is out of reach: join the group of the first path on
    the way to it that we may not pass (the socket itself, ``run/`` or the data directory; all
    the leader's group), or run as root."""
    blocking = sock
    for path in [sock, *sock.parents]:
        try:
            st = os.stat(path)
        except OSError:
            continue
        blocking = path
        break
    else:
        return f"permission denied on {shown_path(sock)}: run as root or the leader's user"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return (
        f"permission denied on {shown_path(sock)} ({shown_path(blocking)} belongs to group "
        f"{group}): join that group "
        f"(usermod -aG {group} {user}, then log in again) or run as root"
    )


def socket_path_problem(sock: Path, exc: OSError) -> str:
    """Why ``sock`` cannot be looked at (``exc``, from its stat): the file on its way that is
    no directory (ENOTDIR, session 50: "Not a directory: …" said neither), else the system's
    words."""
    if exc.errno == errno.ENOTDIR:
        for place in reversed(Path(os.path.abspath(sock)).parents):
            try:
                if not stat.S_ISDIR(os.stat(place).st_mode):
                    return f"{shown_path(place)} is not a directory"
            except OSError:
                break
    return (exc.strerror or type(exc).__name__).lower()


class Leader:
    """The admin connection: one place that turns gRPC errors into one-line CLI errors."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._unary: UnaryChannel | None = None
        # The last reply's initial metadata, where the leader names its code (None: no reply)
        self._leader_code: dict[str, str] | None = None
        self._warned = False

    def close(self) -> None:
        """Close the connection ``unary`` keeps (for in-process callers; the program ends)."""
        if self._unary is not None:
            self._unary.close()
            self._unary = None

    def check_socket(self) -> None:
        """A missing or forbidden socket, as one line that says what to do."""
        sock = self.socket
        try:
            os.stat(sock)
        except FileNotFoundError:  # (also while the leader restarts: ``while_away``)
            data = sock.parent.parent  # DATA/run/admin.sock
            if sock.parent.name == "run" and not data.exists():
                # No leader's data dir at all: an agent node, say; no wait mends it.
                fail(
                    f"no admin socket at {shown_path(sock)}: {shown_path(data)} does not "
                    "exist: no leader on this machine; run tlsroll on the leader node "
                    "(see --data-dir/--socket)"
                )
            raise Unreachable(
                f"no admin socket at {shown_path(sock)}: is tlsroll-leader running? "
                "(see --data-dir/--socket)"
            ) from None
        except PermissionError:
            fail(permission_hint(sock))
        except OSError as exc:  # a file on its way, a loop of links: no waiting mends it
            fail(
                f"no admin socket at {shown_path(sock)}: {socket_path_problem(sock, exc)}"
                " (see --data-dir/--socket)"
            )
        if not os.access(sock, os.R_OK | os.W_OK):
            fail(permission_hint(sock))

    @contextmanager
    def admin(self) -> Iterator[admin_pb2_grpc.AdminStub]:
        """The Admin service's methods, for ``call`` (typed as grpcio's stub, which they
        stand for: ``admin.ListNodes`` is the method ``/tlsroll.v1.Admin/ListNodes``); the
        connection is closed at the end."""
        # The Admin service's messages are many; `schema show` talks to SchemaView only. Its
        # enums' codecs (``leader.wire``) come with ``to_dict``, which alone needs them.
        from tlsroll.v1 import admin_pb2  # noqa: PLC0415

        self.check_socket()
        try:
            yield cast(
                "admin_pb2_grpc.AdminStub",
                _Service(admin_pb2.DESCRIPTOR.services_by_name["Admin"]),
            )
        finally:  # as grpcio's channel did: a command that made its own Leader leaks nothing
            self.close()

    def refused(self, code: str, details: str, *, answered: bool = False) -> NoReturn:
        """A gRPC status (by name) as the CLI's error: INVALID_ARGUMENT is a usage error (exit
        2), any other refusal a failure (exit 1), each one line. ``answered``: the leader sent
        the status (an UNAVAILABLE of its own says why, e.g. its store's disk is full); else
        the CLI made it for a connection that failed."""
        if code == "UNAVAILABLE" and not (answered and details):
            raise Unreachable(
                f"cannot reach the leader on {shown_path(self.socket)}: is tlsroll-leader running?"
            )
        if code == "UNAVAILABLE":
            fail(f"the leader cannot do it now: {details}")
        if code == "INVALID_ARGUMENT":
            raise click.UsageError(details, click.get_current_context(silent=True))
        if code == "UNIMPLEMENTED":  # grpc's own "Method not found!" says nothing useful
            fail(UNIMPLEMENTED)
        if code == "DEADLINE_EXCEEDED" and not answered:
            # A leader that took the connection and says nothing (hung, stopped): what to look
            # at; a command that changes something and was sent says MayHaveBeenDone instead
            # (review rev58a L6).
            fail(
                f"{details} (is it hung? systemctl status tlsroll-leader, journalctl -u "
                "tlsroll-leader)"
            )
        fail(details or f"the leader answered {code}")

    # --- which code the leader runs (tlsroll.contract) -----------------------------------------

    def _saw(self, metadata: Any) -> None:
        """Note which code a reply's initial metadata names (grpcio's tuples or a dict)."""
        pairs = metadata.items() if isinstance(metadata, dict) else (metadata or ())
        self._leader_code = {str(k): str(v) for k, v in pairs}

    def _warn_if_other_code(self) -> None:
        """A read-only command goes on through a leader of other code, with one warning. Its
        own revision is ``contract.REVISION``, a literal: ``schema show`` imports no generated
        module (a test keeps the literal right)."""
        from tlsroll import contract  # noqa: PLC0415 - small: stdlib, and nothing generated

        if self._warned:
            return
        differs = contract.mismatch(self._leader_code, contract.REVISION)
        if differs:
            self._warned = True
            click.echo(
                f"tlsroll: warning: the running tlsroll-leader is other code than this tlsroll "
                f"({differs}): restart it (systemctl restart tlsroll-leader)",
                err=True,
            )

    def require_same_code(self) -> None:
        """Before a call that changes something: ``OtherCode`` (exit 5) unless the leader runs
        this code, as its last reply said (else a health Check asks). An older leader drops
        the request fields it does not know without a word (upgrade audit s35 F2). The
        revision is computed from the generated modules here (a command that changes
        something imports most of them anyway), as the leader computes its own."""
        from tlsroll import contract  # noqa: PLC0415 - as in _warn_if_other_code

        if self._leader_code is None:
            self.raw(HEALTH_CHECK, b"", 10)
        differs = contract.mismatch(self._leader_code, contract.computed())
        if differs:
            raise OtherCode(
                f"the running tlsroll-leader is other code than this tlsroll ({differs}): "
                "restart it (systemctl restart tlsroll-leader) and try again"
            )

    def call(self, method: Callable[..., T], request: Message, timeout: float = 30) -> T:
        """Call an Admin method (``admin``; ``refused`` says how a refusal ends). A method not
        in ``READ_ONLY`` first checks that the leader runs this code (``require_same_code``)
        and is sent once, on a new connection; a read-only one, or a brake (``stops``), warns
        if it does not."""
        name = str(getattr(method, "name", None) or getattr(method, "__name__", ""))
        changes = name not in READ_ONLY
        if changes and not stops(name, request):
            self.require_same_code()
        if isinstance(method, _Method):
            return cast("T", self.unary(method.path, request, method.reply, timeout, changes))
        return method(request, timeout=timeout)  # a stand-in of a test

    def unary(
        self, method: str, request: Message, reply: type[M], timeout: float = 30, once: bool = False
    ) -> M:
        """Call a method (``/tlsroll.v1.Service/Method``) without grpcio (``leader.cli.unary``),
        on one connection kept for this command's later calls. ``once``: a call that changes
        something, on a new connection, never sent again (``raw``)."""
        data = self.raw(method, request.SerializeToString(), timeout, once=once)
        try:
            return reply.FromString(data)
        except Exception:  # protobuf's DecodeError, whichever backend's
            fail(f"the leader's reply to {method} could not be read: is tlsroll up to date?")

    def unary_json(self, method: str, request: dict[str, Any], timeout: float = 30) -> Any:
        """``unary`` for a method served with gRPC's JSON codec: request and reply as JSON
        data. ``Unimplemented`` if the leader does not serve it."""
        data = self.raw(method, json.dumps(request).encode(), timeout, codec="json")
        try:
            return json.loads(data)
        except ValueError:
            fail(f"the leader's reply to {method} could not be read: is tlsroll up to date?")

    def raw(
        self, method: str, request: bytes, timeout: float, codec: str = "proto", once: bool = False
    ) -> bytes:
        """``once``: on a new connection, which ``UnaryChannel.call`` never tries again (a
        call that changes something is sent at most once; on a kept connection the leader has
        closed, or one it did not take as it stopped, a read-only call is sent again on a new
        one). A call sent at most once whose reply is lost after the request went out whole
        ends ``MayHaveBeenDone``, or ``Interrupted`` for Ctrl-C (audit s39race H1, M2); lost
        before that, the errors say what they always did."""
        self.check_socket()
        if self._unary is None:
            self._unary = UnaryChannel(str(self.socket))
        channel = self._unary
        try:
            data = channel.call(method, request, timeout, codec, once=once)
        except RpcFailed as exc:
            if exc.code == "UNIMPLEMENTED" and codec == "json":
                raise Unimplemented(method) from None
            if once and exc.sent and not exc.answered:
                raise MayHaveBeenDone(lost_reply(method, exc.code, exc.details)) from None
            self.refused(exc.code, exc.details, answered=exc.answered)
        except KeyboardInterrupt:
            channel.close()
            if once and channel.sent is not False:
                raise Interrupted(
                    f"interrupted: the leader may have done it; {check_hint(method)}"
                ) from None
            raise
        self._saw(self._unary.headers)
        if method != HEALTH_CHECK:  # (asked only before a change, which refuses instead)
            self._warn_if_other_code()
        return data


class _Service:
    """A service's methods by name (``admin.ListNodes``), each with its path and reply type
    from the service's descriptor: what ``Leader.call`` needs, and the name by which it tells
    the read-only ones from those that change something."""

    def __init__(self, service: ServiceDescriptor) -> None:
        self._service = service

    def __getattr__(self, name: str) -> _Method:
        method = self._service.methods_by_name.get(name)
        if method is None:
            raise AttributeError(name)
        reply = method.output_type
        # the reply's class, from its file's generated module (tlsroll/v1/admin.proto:
        # tlsroll.v1.admin_pb2; google/protobuf/empty.proto: google.protobuf.empty_pb2)
        module = importlib.import_module(
            reply.file.name.removesuffix(".proto").replace("/", ".") + "_pb2"
        )
        return _Method(name, f"/{self._service.full_name}/{name}", getattr(module, reply.name))


class _Method:
    __slots__ = ("name", "path", "reply")

    def __init__(self, name: str, path: str, reply: type[Message]) -> None:
        self.name = name
        self.path = path
        self.reply = reply


class Unimplemented(TerminalError):
    """The leader does not serve this method (JSON codec): one started before an upgrade."""


def private_stdout(holds: str) -> None:
    """A usage error (exit 2) if stdout is a regular file group or others may read, said
    before anything is made or asked: ``holds`` says what secret would be written there (a
    join token, a viewer's login link, the auth password). ``tlsroll token create
    --print-join-command > join-node2.sh`` under the usual umask 022 left the token in a file
    of mode 0644 for any local user to enrol the node with first (review s66 logs M4; the
    notice with the password was the same, review s66 pw M2), while every file the product
    keeps a secret in is 0600. A terminal, a pipe (a mailer, ssh to the node) or a private file
    is the admin's to pass on. The way out names chmod first: `(umask 077; … > FILE)` over a
    FILE a refused run left (0644) is refused again, and "or use umask 077" sent the admin
    round (session 68, README walk).

    Stdout that takes no write at all (``> /dev/full``, a descriptor opened for reading) is
    said here too, exit 1: the token was made and stored, then its printing failed, and
    nothing said so (session 67, bad-input sweep L2). A write that fails only once it carries
    the secret (a pipe whose reader has gone, a disk that fills) is ``print_secret``'s."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # no file behind it (io.UnsupportedOperation is a ValueError)
        return
    try:
        os.write(fd, b"")  # /dev/full refuses even this; a pipe and a file take it
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise CLIError(
            f"stdout {_fd_name(fd)} cannot be written ({exc.strerror or type(exc).__name__});"
            f" nothing was made ({holds})"
        ) from None
    if not stat.S_ISREG(mode) or not mode & 0o044:
        return
    raise click.UsageError(
        f"stdout {_fd_name(fd)} is readable by others (mode {stat.S_IMODE(mode):04o});"
        f" {holds}: chmod 600 it and run the command again (umask 077 makes a new file"
        " 0600; one that is there keeps its mode)"
    )


def _fd_name(fd: int) -> str:
    try:
        return shown_path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return "(a file)"


def print_secret(text: str, what: str, revoke: Callable[[], None], how: str) -> None:
    """Print ``text``, which holds the secret of ``what`` (``token ID``, ``viewer grant ID``),
    just made; if stdout takes it not (a pipe whose reader has gone, a full disk), ``revoke``
    it and say so in one line, exit 1: a secret nobody was shown is of use to nobody but whoever
    reads what part of it got out (session 67, bad-input sweep L2: the token stayed, and click
    ended a broken pipe with exit 1 and not a word). ``how``: the command that revokes it, said
    if revoking fails. Written straight to the descriptor, so that nothing of it stays in a
    buffer for the exit to fail on again."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # no file behind it (a test's runner): as ever
        click.echo(text, nl=False)
        return
    data = memoryview(text.encode())
    try:
        sys.stdout.flush()
        while data:
            data = data[os.write(fd, data) :]
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        try:
            revoke()
        except TlsrollError as failed:
            raise CLIError(
                f"{what} was made but could not be printed ({why}), and revoking it failed"
                f" ({failed}): revoke it with `{how}`"
            ) from None
        raise CLIError(f"{what} could not be printed ({why}): revoked it; make another") from None


def pass_leader(f: Callable[..., T]) -> Callable[..., T]:
    """Pass the admin connection the global options (``tlsroll.cli.Target``) point to."""

    @click.pass_context
    def wrapper(ctx: click.Context, /, *args: Any, **kwargs: Any) -> T:
        target = ctx.find_object(Target) or Target(DEFAULT_DATA_DIR, None)
        leader = Leader(target.socket or Layout(target.data_dir).admin_socket)
        try:
            return ctx.invoke(f, leader, *args, **kwargs)
        finally:
            leader.close()

    return functools.update_wrapper(wrapper, f)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


SCHEMA_PROTO = "tlsroll/v1/schema.proto"
"""The file of the schema's messages, whose enums ``leader.schema_wire`` has every codec of."""


def to_dict(msg: Message) -> dict[str, Any]:
    """``--json`` data: enums as the words the CLI takes: the codecs ``leader.schema_wire``
    registers for the schema's messages, and with ``leader.wire`` (which brings those too) the
    Admin service's for any other. Imported here, not with the Admin service: the commands
    that print no such data (`token create`, `ca revoke`, the rollout steering) do without
    them, some 8 ms (session 66)."""
    codecs = "leader.schema_wire" if msg.DESCRIPTOR.file.name == SCHEMA_PROTO else "leader.wire"
    importlib.import_module(codecs)
    from tlsroll import wire  # noqa: PLC0415 - see the module docstring

    return wire.to_dict(msg)


def print_fitted(
    headers: list[str], rows: list[list[Text]], drops: Sequence[str], whole: Sequence[str]
) -> None:
    """A rich table of ``headers`` and ``rows``, on a terminal narrower than it without the
    columns of ``drops`` it has no room for, the first first (a line under it names them), and
    with the columns of ``whole`` never cut (up to 32 columns): rich cut every cell of a wide
    table to a few letters on 80 columns ("praxi…", "127.1…"; review s71 uxsmalls). A column
    with a cell in red (a problem) stays. Into a pipe every column stays (scripts read it)."""
    from rich.table import Table  # noqa: PLC0415 - see _Out

    natural = [max([len(h), *(r[i].cell_len for r in rows)]) for i, h in enumerate(headers)]
    headers, rows, left = list(headers), [list(r) for r in rows], []
    for drop in drops:
        if not out.is_terminal or 1 + sum(w + 3 for w in natural) <= out.width:
            break
        k = headers.index(drop)
        if any(_red(r[k]) for r in rows):
            continue
        left.append(headers.pop(k))
        del natural[k]
        for r in rows:
            del r[k]
    table = Table()
    for h, w in zip(headers, natural, strict=True):
        table.add_column(h, min_width=min(w, 32) if h in whole else None)
    for r in rows:
        table.add_row(*r)
    out.print(table)
    if left:  # (folded at its spaces, none left at a line's end: rich's fold left one; s75)
        say(
            f"not shown on {out.width} columns: {', '.join(left)} (all: the same command | less -S)"
        )


def say(*paragraphs: str, style: str = "") -> None:
    """Print each of ``paragraphs`` (a line of text; ``"  ! …"``, ``"  1. …"`` indent their
    folded lines under their text): on a terminal folded at its spaces to its width, paths,
    URLs and commands in backticks whole (``plain.fold``), where the terminal folded them in
    the middle of a word; into a pipe or a log a paragraph stays one line, as before (what
    ``less`` or a ticket folds at its own width, and a script's grep finds whole). ``style``:
    rich's, for each line (``"yellow"``)."""
    from leader.cli.plain import fold  # noqa: PLC0415 - not for --json (schema show's imports)

    for text in paragraphs:
        for line in fold(text, out.width) if out.is_terminal else [text]:
            out.print(line, style=style or None)


def _red(text: Text) -> bool:
    """Whether ``text`` says something in red (a problem)."""
    return "red" in str(text.style) or any("red" in str(span.style) for span in text.spans)


def fmt_time(msg: Any, field: str) -> str:
    if not msg.HasField(field):
        return "-"
    when: dt.datetime = getattr(msg, field).ToDatetime(tzinfo=dt.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


MAX_DURATION_SECONDS = 2**32 - 1
"""The longest duration a request carries (a uint32 of seconds, about 136 years); each
command's leader-side limit (7 days for a token or a viewer grant) is the leader's to say."""


def parse_duration(text: str, option: str) -> int:
    """``30s``, ``15m``, ``8h``, ``2d``: seconds, more than none and at most
    ``MAX_DURATION_SECONDS`` (a usage error, not protobuf's ValueError: audit s34 M2), naming
    ``option`` (``--ttl``: it said "Invalid value: '0'" of no option, session 56's README
    walk)."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise click.BadParameter(
            f"{shown(text)}: use a number with s, m, h or d, e.g. 1h", param_hint=option
        )
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds == 0:
        raise click.BadParameter(f"{shown(text)}: give more than 0, e.g. 1h", param_hint=option)
    if seconds > MAX_DURATION_SECONDS:
        raise click.BadParameter(
            f"{shown(text)} is too long: at most {MAX_DURATION_SECONDS // 86400}d",
            param_hint=option,
        )
    return seconds


def not_a_secret(value: str, wanted: str) -> None:
    """A usage error (exit 2) if ``value``, given where ``wanted`` belongs ("the node's name"),
    looks like one of tlsroll's secrets (a join token, a login link, a generated password:
    ``tlsroll.echo``), saying what it looks like and never repeating it (review s47rtin L8).
    The whole of ``value`` must have a secret's shape: a DNS name that merely holds a piece
    shaped like one is a name (review s48rev3 M3)."""
    kind = whole_secret_kind(value)
    if kind is not None:
        raise click.UsageError(f"this looks like {kind}; give {wanted}")


def free_text_param(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A click callback for a free-text option the leader stores and lists again (``token
    create --description``, ``viewer grant --name``, ``ca revoke --reason``): a usage error
    (exit 2), before anything is sent, if it holds what looks like one of tlsroll's secrets,
    not repeated (``tlsroll.echo.free_text_problem``; the leader refuses it too)."""
    problem = free_text_problem(value or "", param.opts[0])
    if problem is not None:
        raise click.UsageError(problem)
    return value


def say_still_taken(reply: Any) -> None:
    """After a revocation (``RevokeCertificateResponse``): what still takes the certificates
    revoked, one line each on stderr. Revoking reaches the agents and the leader only: a node
    that serves one on 8443 goes on serving it, and the practice's clients take it, until a
    rotate-cert replaces it (``served_by``); a managed server that asks for client
    certificates reads no revocation list, and takes a workstation's until its end
    (``workstations_until``). Before, both said "revoked" and no more (review s64 pki M1)."""
    if reply.served_by:
        nodes = ",".join(reply.served_by)
        who = f"node {nodes} still serves" if len(reply.served_by) == 1 else f"nodes {nodes} serve"
        click.echo(
            f"tlsroll: warning: {who} the revoked certificate on 8443, and the"
            " practice's clients, which read no revocation list, take it until it is replaced:"
            f" tlsroll rollout start --change rotate-cert --nodes {nodes}",
            err=True,
        )
    if reply.HasField("workstations_until"):
        click.echo(
            "tlsroll: note: the managed servers read no revocation list: a server that asks for"
            " client certificates takes the revoked workstation certificate until its end,"
            f' {fmt_time(reply, "workstations_until")} (README "Revocation" says what else'
            " to do for a PC lost or stolen)",
            err=True,
        )


_HEX_SERIAL = re.compile(r"[0-9a-f]{1,40}")


def refuse_unfit_serial(name_or_serial: str, *, serial_only: bool = False) -> None:
    """A usage error (exit 2), before anything is sent, for what is no serial (``ca revoke``,
    ``serial_only``), neither a workstation name nor a serial (``workstations revoke``), or a
    serial no certificate of this CA can have (0, or 2^159 and above:
    ``leader.store_rules.serial_fits``). The leader refuses these too, but one from before
    session 34 (reached through other code: ``STOPS``) would record the last, and from then on
    fail to sign every revocation list: every heartbeat refused, every node offline."""
    from leader.store_rules import serial_fits  # noqa: PLC0415 - for the revoke commands alone
    from tlsroll.clients import WORKSTATION_CN  # noqa: PLC0415 - likewise

    not_a_secret(
        name_or_serial,
        "the certificate's serial (tlsroll certs check-expiration lists them)"
        if serial_only
        else "the workstation's name (ws-…) or a serial (tlsroll workstations list)",
    )
    key = name_or_serial.strip().lower()
    if _HEX_SERIAL.fullmatch(key):
        if not serial_fits(key.lstrip("0") or "0"):
            raise click.UsageError(
                f"{shown(name_or_serial)} is not a serial this CA can have issued (1 to 2^159-1)"
            )
    elif serial_only:
        raise click.UsageError(
            f"{shown(name_or_serial)} is not a serial: hex digits, in full (tlsroll certs "
            "check-expiration lists them)"
        )
    elif not key.startswith("ws-"):
        raise click.UsageError(
            f"{shown(name_or_serial)} is neither a workstation name (ws-…) nor a serial (hex)"
        )
    elif not WORKSTATION_CN.fullmatch(key):
        raise click.UsageError(
            f"{shown(name_or_serial)} is not a workstation name: ws- and then letters, digits "
            "and '-' (tlsroll workstations list)"
        )


ROLLOUT_WANTED = "a rollout's id (tlsroll schema show lists them)"
ROLLOUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""``leader.schema_view.ROLLOUT_ID``, written here so as not to import the leader's view (a
test keeps the two equal)."""


def rollout_id_param(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """A click callback for a rollout id argument or option: ``not_a_secret``, then a usage
    error (exit 2) for what has no rollout id's shape, for every command alike (review
    s48rev3 L4: the leader answered "no rollout", exit 1, for most). An empty one given is
    refused too: left out, the commands take the active or newest rollout, and
    ``tlsroll rollout rollback "$RID" --yes`` with ``RID`` unset took the whole cluster back
    (review s63 ops M4)."""
    if value == "" and param.name is not None:
        source = ctx.get_parameter_source(param.name)
        if source not in (None, click.core.ParameterSource.DEFAULT):
            raise click.BadParameter(
                "an empty rollout id: give one (tlsroll schema show lists them), or leave it"
                " out for the active or newest rollout"
            )
    if value:
        not_a_secret(value, ROLLOUT_WANTED)
        # The leader says the same, but a long one made the request too big for its JSON
        # reader, which answered that instead (audit s34 L2).
        if not ROLLOUT_ID.fullmatch(value):
            raise click.BadParameter("not a rollout id (1-64 letters, digits, '.', '_' or '-')")
    return value


def fetch_schema(
    leader: Leader, rollout_id: str = "", *, limit: int = 0, rollouts_only: bool = False
) -> schema_pb2.Schema:
    """The schema: one rollout (``rollout_id``), the newest ``limit`` (0: every one); with
    ``rollouts_only`` without the failures, revocations and expiring certificates."""
    from tlsroll.v1 import schema_pb2  # noqa: PLC0415 - see the module docstring

    request = schema_pb2.GetSchemaRequest(
        rollout_id=rollout_id, limit=limit, rollouts_only=rollouts_only
    )
    return leader.unary(GET_SCHEMA, request, schema_pb2.Schema)


def fetch_schema_json(
    leader: Leader, rollout_id: str = "", *, limit: int = 0, rollouts_only: bool = False
) -> dict[str, Any]:
    """``fetch_schema`` as the JSON data ``schema show --json`` prints (``to_dict``), from the
    leader's ``SchemaViewJson`` (``leader.schema_view.JSON_SERVICE``): no protobuf here."""
    request = {"rollout_id": rollout_id, "limit": limit, "rollouts_only": rollouts_only}
    try:
        data = leader.unary_json(GET_SCHEMA_JSON, request)
    except Unimplemented:
        # a leader from before SchemaViewJson (tlsroll upgraded, the leader not yet restarted):
        # the same data, by protobuf
        schema = fetch_schema(leader, rollout_id, limit=limit, rollouts_only=rollouts_only)
        return to_dict(schema)
    if not isinstance(data, dict):
        fail(f"the leader's reply to {GET_SCHEMA_JSON} could not be read: is tlsroll up to date?")
    return data


GET_SCHEMA = "/tlsroll.v1.SchemaView/GetSchema"
GET_SCHEMA_JSON = "/tlsroll.v1.SchemaViewJson/GetSchema"
"""The schema's method, and the same served with gRPC's JSON codec (a test keeps both in step
with the proto and the leader)."""
