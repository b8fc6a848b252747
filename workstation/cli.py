"""``tlsroll client …``: the commands a workstation admin runs (see ``workstation.connection``).

This module and what it imports are all that ``tlsroll client`` loads: nothing of the leader,
no gRPC, no rich.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tlsroll.bootstrap_protocol import FINISH_DEADLINE, MIN_EXCHANGE_WAIT
from tlsroll.cli import PathParam, folds_at_spaces, terminal_only
from tlsroll.defaults import BOOTSTRAP_PORT
from tlsroll.password import NOT_UTF8, PasswordFileError, read_password_file
from workstation.connection import (
    DEFAULT_TIMEOUT,
    UI,
    ClientError,
    Exit,
    Options,
    TestConnection,
    default_settings_dir,
)


@click.group("client")
def client() -> None:
    """The workstation side: connect a PC to the encrypted server."""


F = TypeVar("F", bound=Callable[..., Any])


def _settings_dir(text: str) -> Callable[[F], F]:
    """The --settings-dir option of the client's commands (``text``: its help)."""
    return click.option(
        "--settings-dir",
        type=PathParam(path_type=Path, file_okay=False),
        callback=lambda _ctx, _param, value: _plain_dir(value),
        envvar="TLSROLL_CLIENT_DIR",
        default=default_settings_dir,
        show_default="~/.config/tlsroll/client",
        help=text,
    )


@client.command(
    "test-connection", short_help="Check the new server address URL and set this PC up for it."
)
@click.argument("url")
@click.option(
    "--bootstrap-port",
    type=click.IntRange(1, 65535),
    help=f"The node's bootstrap port, if not {BOOTSTRAP_PORT} (skips the port prompt).",
)
@click.option(
    "--password-file",
    type=PathParam(path_type=Path, dir_okay=False),
    help="Read the auth password from this file (the file's only line; mode 0600) instead of "
    "asking (for scripts).",
)
@click.option(
    "--ca-pin",
    metavar="sha256:HEX",
    help="Trust the CA by this SPKI pin (from the notify message), not by the password; "
    "the password is still needed to enrol, unless --no-enrol.",
)
@_settings_dir("Where to write the workstation's settings.")
@click.option("--yes", "-y", "assume_yes", is_flag=True, help="Accept the default port.")
@click.option(
    "--name",
    help="The workstation's name in its certificate (ws-NAME, or NAME if it starts with "
    "ws-): one word of letters, digits and hyphens, at most 60 after the ws-, no hyphen at "
    "an end or two in a row (e.g. empfang-1); used as given or refused, naming the one to use "
    "[default: the name it enrolled under before, else its host name].",
)
@click.option(
    "--replace",
    is_flag=True,
    help="This PC replaces another one enrolled under the same name at this node (a new PC "
    "for an old one): that one's certificate is revoked. Not needed to enrol this PC again.",
)
@click.option(
    "--no-enrol",
    "no_enrol",
    is_flag=True,
    help="With --ca-pin: trust the CA and write the settings, no password, no client certificate.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.5, 120),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for each connection, and for each answer as a whole (the password "
    f"exchange waits at least {MIN_EXCHANGE_WAIT:g} s for its answers: the node may take "
    f"{FINISH_DEADLINE:g} s to deliver the certificate).",
)
def test_connection(
    url: str,
    bootstrap_port: int | None,
    password_file: Path | None,
    ca_pin: str | None,
    settings_dir: Path,
    assume_yes: bool,
    name: str | None,
    replace: bool,
    no_enrol: bool,
    timeout: float,
) -> None:
    """Check the new server address URL and set this workstation up for it.

    URL is the new address, e.g. https://192.168.1.5:8443/praxis_live/. Exit codes: 0 done,
    1 failure, 2 usage, 3 http instead of https, 4 host unreachable or no answer in time,
    5 connection refused, 6 TLS failure (also a server certificate out of its dates by this
    PC's clock), 7 app path not found, 8 bootstrap port closed, not
    answering in time, ending the connection with no answer (its agent restarting: try
    again) or not the bootstrap service, 9 wrong password, 10 not the cluster's
    node (CA, pin or the node's proof), 11 enrolment refused or rate-limited (a name another
    PC holds: --name, or --replace), 130 interrupted (Ctrl-C; once the CSR is sent, held back
    until the node's answer is kept).
    """
    if no_enrol and password_file is not None:
        raise click.UsageError("--no-enrol uses no password; drop --password-file")
    options = Options(
        url=url,
        settings_dir=settings_dir,
        bootstrap_port=bootstrap_port,
        ca_pin=ca_pin,
        assume_yes=assume_yes,
        enrol=not no_enrol,
        name=name,
        timeout=timeout,
        replace=replace,
    )
    ui = UI(say=click.echo, ask_port=_ask_port, ask_password=_ask_password)
    # The arguments first, the address above all (its own checks, ``TestConnection``'s of
    # --name, --ca-pin and the options together), before the password file is read or a
    # question refused off a terminal (review s64: a bad URL came after them). An http
    # address: the run asks nothing and needs no password (it says so, exit 3).
    connection = TestConnection(options, ui)
    try:
        if not connection.check_arguments():
            secret = _password_from(password_file) if password_file is not None else None
            # Off a terminal, a question the run would ask is refused before anything is done
            # or any connection made (s49cli L3: a closed port exited 5 before the port
            # prompt's exit 2).
            if bootstrap_port is None and not assume_yes:
                terminal_only(_ADD_PORT)
            if not no_enrol and secret is None:
                terminal_only(_ADD_PASSWORD)
            connection.given_password(secret)
    except KeyboardInterrupt:
        # Ctrl-C before the run (a --password-file that is a pipe or /dev/stdin, waited on):
        # exit 130 and the run's one line, as from within it (``TestConnection.run``), not
        # click's "aborted", exit 1, after an empty line (review s66).
        raise ClientError(Exit.INTERRUPTED, connection.interrupted()) from None
    connection.run()
    click.echo("restart the client to finish")


@client.command("renew", short_help="Renew this workstation's client certificate.")
@_settings_dir("The workstation's settings (as test-connection wrote them).")
@click.option("--force", is_flag=True, help="Renew now, not only within the last 30 % of its life.")
@click.option(
    "--timeout",
    type=click.FloatRange(0.5, 120),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help=f"Seconds to wait for the connection (the answer: at least {MIN_EXCHANGE_WAIT:g} s).",
)
def renew(settings_dir: Path, force: bool, timeout: float) -> None:
    """Renew this workstation's client certificate, without the password.

    Within the last 30 % of the certificate's life (or with --force), a new key and a
    certificate of the same name from the node the settings name, proving this PC holds its
    current certificate; the settings are replaced as one set. Before that it says "not due
    until DATE" (exit 0): safe to run daily, before the practice software starts (a systemd
    user timer, cron).
    Exit codes: 0 renewed or not due, 1 failure, 2 usage, 4 node unreachable or no answer in
    time, 5 connection refused, 6 TLS failure, 8 the node's agent renews nothing (too old),
    10 the node is not of this PC's cluster, 11 refused (the certificate revoked, ended, not
    the cluster's, or the leader's no: enrol again with `tlsroll client test-connection URL`
    and the password; or busy, too many tries, a --force before the certificate is 24 hours
    old (an older leader: the node's hourly cap): the line says when to try again). Restart
    the client to use the new certificate.
    """
    from workstation.renew import Renewal  # noqa: PLC0415 - only this command needs it

    done = Renewal(settings_dir, force=force, timeout=timeout, say=click.echo).run()
    if done.renewed:
        click.echo("restart the client to use it")


MAX_SETTINGS_DIR = 1024
"""Characters of a --settings-dir: every message about the settings names it (review s47rtin
L5: a 100 KB one came back whole)."""


def _plain_dir(value: Path) -> Path:
    """--settings-dir without a control character and of a length a message can name."""
    text = str(value)
    if not text.isprintable():
        raise click.BadParameter("must not hold control characters", param_hint="--settings-dir")
    if len(text) > MAX_SETTINGS_DIR:
        raise click.BadParameter(
            f"is {len(text)} characters long: at most {MAX_SETTINGS_DIR}",
            param_hint="--settings-dir",
        )
    return value


def _password_from(path: Path) -> str:
    try:
        return read_password_file(path)
    except PasswordFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--password-file") from None


_ADD_PORT = f"add --bootstrap-port PORT (the one your notice names), or --yes for {BOOTSTRAP_PORT}"
_ADD_PASSWORD = "add --password-file FILE (the password, the file's only line, mode 0600)"  # noqa: S105


def _ask_port(default: int) -> int:
    """The seed's port prompt, with its hint: it can usually just be confirmed. On a terminal
    only (``terminal_only``): off one, exit 2 naming --bootstrap-port and --yes."""
    terminal_only(_ADD_PORT)
    port: int = click.prompt(
        f"Bootstrap port (Enter = {default}; change it only if you were told to, when "
        f"{default} is taken by another program)",
        default=default,
        show_default=False,
        type=click.IntRange(1, 65535),
    )
    return port


def _ask_password() -> str:
    terminal_only(_ADD_PASSWORD)
    try:
        secret: str = click.prompt(
            "Authentication password (the one the practice IT set; not shown as you type)",
            hide_input=True,
        )
    except UnicodeDecodeError:
        # A terminal set to another encoding (Latin-1's "ä" is no UTF-8): getpass decodes the
        # terminal strictly, and it was "internal error" (review s66 pw L1). Off the terminal
        # it reads the byte as a lone surrogate: ``password_problem`` says the same of that.
        raise ClientError(
            Exit.USAGE, f"the password entered {NOT_UTF8}; nothing was sent"
        ) from None
    return secret


folds_at_spaces(client)  # (its help folded as the admin commands' are: ``tlsroll.cli.Help``)
