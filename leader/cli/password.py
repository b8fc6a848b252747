"""``tlsroll password set``, and how the CLI gets a password.

The password is turned into its scrypt verifier here, in the CLI: the leader daemon and the
nodes only ever see the verifier. A password the admin chose (``--password-file``) must meet
``leader.password_policy``; ``--generate`` makes one that always does. A generated password is
printed once, to a terminal, and never again; nothing stores it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from leader.cli.base import Leader, out, pass_leader
from tlsroll import password
from tlsroll.v1 import admin_pb2


def read_password_file(path: Path) -> str:
    """The password in ``path`` (``tlsroll.password.read_password_file``'s rule, the
    workstation's too: among others, a regular file group or others may read or write is
    refused); a usage error naming --password-file (exit 2) if the file is not usable."""
    try:
        return password.read_password_file(path)
    except password.PasswordFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--password-file") from None


def obtain_password(
    password_file: Path | None, generate: bool, *, leader: Leader | None = None
) -> str:
    """The password from a file, if it meets the policy (``leader.password_policy``; a usage
    error saying why, exit 2, if not), or a new one shown once on the terminal: after
    ``leader.require_same_code()`` (exit 5 through a leader of other code), so that no password
    is shown that is then not staged (review s35 L1)."""
    # Imported here: the policy's dictionaries (zxcvbn) cost every rollout and schema command
    # 20 ms otherwise (leader.cli.rollout imports this module).
    from leader import password_policy  # noqa: PLC0415

    if password_file is not None:
        secret = read_password_file(password_file)
        if (why := password_policy.problem(secret)) is not None:
            raise click.BadParameter(why, param_hint="--password-file")
        return secret
    if not generate:
        raise click.UsageError("give --password-file FILE or --generate")
    if not sys.stdout.isatty():
        raise click.UsageError(
            "a generated password is shown once on a terminal, and this is not one; "
            "use --password-file FILE"
        )
    if leader is not None:
        leader.require_same_code()
    value = password.generate_password()
    out.print("")
    out.print("  The new authentication password (shown once, never again; write it down):")
    out.print(f"      {value}")
    out.print("  Give it to the practice staff in person or by phone, not by e-mail.")
    out.print("")
    return value


def verifier_json(secret: str) -> str:
    """The salted scrypt verifier of ``secret``: all that leaves the CLI."""
    return password.verifier_to_json(password.make_verifier(secret)).strip()


@click.group("password")
def password_group() -> None:
    """The authentication password workstations need (only its verifier leaves this command)."""


@password_group.command("set")
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Read the new password from this file (the file's only line; mode 0600).",
)
@click.option("--generate", is_flag=True, help="Make a new password and show it once.")
@pass_leader
def password_set(leader: Leader, password_file: Path | None, generate: bool) -> None:
    """Stage a new password; it takes effect on the nodes with `tlsroll rollout start --change
    change-password` (which restarts the server; another restart, a rotate-cert's too, keeps
    the live one)."""
    if password_file is not None and generate:
        raise click.UsageError("--password-file and --generate exclude each other")
    secret = obtain_password(password_file, generate, leader=leader)
    with leader.admin() as admin:
        reply = leader.call(
            admin.SetPassword,
            admin_pb2.SetPasswordRequest(auth_verifier_json=verifier_json(secret)),
        )
    out.print(f"password version {reply.version} staged.")
    if reply.pending_nodes:
        out.print("pending on: " + ", ".join(reply.pending_nodes))
        out.print(
            "It takes effect with `tlsroll rollout start --change change-password --scope "
            "cluster` (which restarts the server); another restart keeps the live password."
        )
