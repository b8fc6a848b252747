"""``tlsroll password set``, and how the CLI gets a password.

The password is turned into its scrypt verifier here, in the CLI: the leader daemon and the
nodes only ever see the verifier. A password the admin chose (``--password-file``) must meet
``leader.password_policy``; ``--generate`` makes one that always does. A generated password is
printed once, to a terminal, and never again; nothing stores it. It is shown only after the
leader said it would take it now (``SetPassword``'s ``check_only``); if the call that stages it
fails all the same, the error says whether the password shown was set (``password_fate``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from leader.cli.base import CLIError, Leader, fmt_time, out, pass_leader, say
from tlsroll.cli import PathParam
from tlsroll.v1 import admin_pb2

if TYPE_CHECKING:
    from tlsroll.v1 import admin_pb2_grpc


def read_password_file(path: Path) -> str:
    """The password in ``path`` (``tlsroll.password.read_password_file``'s rule, the
    workstation's too: among others, a regular file group or others may read or write is
    refused); a usage error naming --password-file (exit 2) if the file is not usable."""
    # ``tlsroll.password`` (with hashlib's OpenSSL, secrets) is imported where a password is
    # read, made or hashed, not by every `rollout` command that imports this module (session 66).
    from tlsroll import password  # noqa: PLC0415

    try:
        return password.read_password_file(path)
    except password.PasswordFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--password-file") from None


def require_terminal() -> None:
    """A usage error unless a generated password can be shown: stdout is a terminal."""
    if not sys.stdout.isatty():
        raise click.UsageError(
            "a generated password is shown once on a terminal, and this is not one; "
            "use --password-file FILE"
        )


def obtain_password(
    password_file: Path | None,
    generate: bool,
    *,
    leader: Leader | None = None,
    ask_first: Callable[[], object] | None = None,
    or_else: str = "or use --generate",
) -> str:
    """The password from a file, if it meets the policy (``leader.password_policy``; a usage
    error saying why, exit 2, if not), or a new one shown once on the terminal: after
    ``leader.require_same_code()`` (exit 5 through a leader of other code) and ``ask_first``
    (the leader's refusal of what the password is for, e.g. a rollout is active), so that no
    password is shown that is then not staged (review s35 L1, audit s39 M1). ``or_else``: the
    command's own way to a generated password, said after a weak one's reason (`rollout start`
    has no ``--generate``: session 56's README walk)."""
    # Imported here: the policy's dictionaries (zxcvbn) cost every rollout and schema command
    # 20 ms otherwise (leader.cli.rollout imports this module).
    from leader import password_policy  # noqa: PLC0415

    if password_file is not None:
        secret = read_password_file(password_file)
        from tlsroll import password  # noqa: PLC0415 - see read_password_file

        if (why := password.unfolded_problem(secret)) is not None:
            raise click.BadParameter(f"the password {why}", param_hint="--password-file")
        # No ``user_words`` yet: the file is judged before the leader is asked (a weak one
        # fails with no leader at all); the nodes' names come from the leader, and the command
        # judges it again with them once it is asked (``judge_with_names``).
        if (why := password_policy.problem(secret)) is not None:
            raise click.BadParameter(f"{why}; {or_else}", param_hint="--password-file")
        return secret
    if not generate:
        raise click.UsageError("give --password-file FILE or --generate")
    require_terminal()
    if leader is not None:
        leader.require_same_code()
    if ask_first is not None:
        ask_first()
    from tlsroll import password  # noqa: PLC0415 - see read_password_file

    value = password.generate_password()
    out.print("")
    out.print("  The new authentication password (shown once, never again; write it down):")
    out.print(f"      {value}")
    out.print("  Give it to the practice staff in person or by phone, not by e-mail.")
    out.print("")
    return value


_WORD_SPLIT = re.compile(r"[^a-z0-9]+")


def name_words(names: Iterable[str]) -> tuple[str, ...]:
    """The words an attacker of this cluster knows from its nodes' ``names`` (a node's name
    and DNS names, e.g. ``kardiologie-ost``, ``srv7.praxis-weber.example``): each name, each
    label of a DNS name (``praxis-weber``) and each part of them (``kardiologie``, ``ost``,
    ``srv7``, ``praxis``, ``weber``) of 3 characters or more, lowered, as
    ``password_policy.problem``'s ``user_words`` (session 69 left them out: a password
    "<node name>2026!" passed where "<word>2026!" did not)."""
    words: dict[str, None] = {}
    for name in names:
        lowered = name.strip().lower()
        for word in (lowered, *lowered.split("."), *_WORD_SPLIT.split(lowered)):
            if len(word) >= 3:
                words[word] = None
    return tuple(words)


def judge_with_names(secret: str, names: Iterable[str], or_else: str) -> None:
    """A usage error naming --password-file (exit 2, the policy's one line and ``or_else``,
    never the password) if a chosen ``secret`` is too weak once the nodes' ``names``
    (``name_words``) count as known words; what the leader told the command, before it is
    asked to take the password."""
    from leader import password_policy  # noqa: PLC0415 - see obtain_password

    if (why := password_policy.problem(secret, name_words(names))) is not None:
        raise click.BadParameter(
            f"{why} (the nodes' names count as known words); {or_else}",
            param_hint="--password-file",
        )


def node_names(leader: Leader, admin: admin_pb2_grpc.AdminStub) -> list[str]:
    """The enrolled nodes' names and DNS names, as the leader lists them (``ListNodes``)."""
    reply = leader.call(admin.ListNodes, admin_pb2.ListNodesRequest())
    return [name for n in reply.nodes for name in (n.name, *n.dns_names)]


# What the transport's error says when the request may have reached the leader before the
# connection was lost (``leader.cli.base``: "it may have been done; check with …").
MAY_HAVE_BEEN_DONE = "may have been done"
NOT_SET = "the password shown above was NOT set: discard it"
STAGED_CHECK = "whether it is staged (password change pending)"


def password_fate(message: str, check: str = STAGED_CHECK) -> str:
    """What became of a password shown before the call that failed with ``message``:
    ``check`` says what `tlsroll schema show` would show if it was set."""
    if MAY_HAVE_BEEN_DONE not in message:
        return NOT_SET
    return (
        f"the password shown above may have been set: check with `tlsroll schema show` "
        f"{check} before you give it out or discard it"
    )


@contextmanager
def shown_password_fate(shown: bool, check: str = STAGED_CHECK) -> Iterator[None]:
    """Around the call that sets a password: if ``shown`` (a generated password was shown)
    and the call fails, its one-line error also says what became of that password (audit s39
    M1: shown "once, never again; write it down", then refused); ``check``: how to tell, if
    the connection was lost after the request was sent (``password_fate``)."""
    try:
        yield
    except CLIError as exc:
        if not shown:
            raise
        raise CLIError(f"{exc}; {password_fate(str(exc), check)}") from None
    except click.ClickException as exc:  # a usage error (exit 2), other code (exit 5)
        if not shown:
            raise
        message = f"{exc.message}; {password_fate(exc.message, check)}"
        if isinstance(exc, click.UsageError):
            raise click.UsageError(message, exc.ctx) from None
        raise type(exc)(message) from None  # (its exit code: other code's 5)


def staged_text(staged: admin_pb2.StagedPassword) -> str:
    """ "staged by X at T" of a staged password version."""
    return f"staged by {staged.staged_by or '?'} at {fmt_time(staged, 'staged_at')}"


def replaces_text(staged: admin_pb2.StagedPassword) -> str:
    """The line naming a staged password version a new one supersedes: live on no node now
    (never applied, or applied and taken back by a rollback: review s45rt2 M3, which was
    told "never applied"). True whether or not the new one is the same password: the CLI does
    not compare them (a comparison through ``Admin.CheckPassword`` counted as a wrong password
    checked whenever they differed, in the audit and the caller's backoff: review s45rev8 M1)."""
    return (
        f"replaces password version {staged.version} ({staged_text(staged)}, live on no node"
        " now): if it is another password, whoever was given that one must get the new one"
        " instead"
    )


def verifier_json(secret: str) -> str:
    """The salted scrypt verifier of ``secret``: all that leaves the CLI."""
    from tlsroll import password  # noqa: PLC0415 - see read_password_file

    return password.verifier_to_json(password.make_verifier(secret)).strip()


def kdf_hook() -> str | None:
    """The tests' scrypt hook (``kdfhook.TEST_KDF_N_ENV``): set wrong, a usage error (exit 2);
    set, what ``password set`` warns of once it staged a verifier made under it (scrypt N=n,
    not ``password.DEFAULT_N``; a leader without the hook refuses such a verifier); None when
    unset."""
    from tlsroll import kdfhook, password  # noqa: PLC0415 - see read_password_file

    try:
        n = kdfhook.hook_kdf_n()
    except kdfhook.KdfHookError as exc:
        raise click.UsageError(str(exc)) from None
    if n is None:
        return None
    return (
        f"{kdfhook.TEST_KDF_N_ENV}={n} is set (tests only): the password's verifier is made"
        f" under scrypt N={n}, not N={password.DEFAULT_N}; unset it for a real cluster (set the"
        " password again without it)"
    )


@click.group("password")
def password_group() -> None:
    """The authentication password workstations need.

    Only its verifier leaves this command."""


@password_group.command(
    "set", short_help="Stage a new password (a change-password rollout applies it)."
)
@click.option(
    "--password-file",
    type=PathParam(path_type=Path, dir_okay=False),
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
    weaker = kdf_hook()  # (set wrong: refused before anything is read or asked)
    # A password file that is unusable or too weak, or no terminal to show a generated one
    # on, fails before the leader is asked.
    secret = None if generate else obtain_password(password_file, generate)
    if generate:
        require_terminal()
    with leader.admin() as admin:
        if secret is not None:  # a chosen one: weak once the nodes' names are known?
            judge_with_names(secret, node_names(leader, admin), "or use --generate")

        def ask_first() -> None:  # refused now (a rollout active)? Before it is shown.
            leader.call(admin.SetPassword, admin_pb2.SetPasswordRequest(check_only=True))

        if secret is None:
            secret = obtain_password(None, generate, leader=leader, ask_first=ask_first)
        with shown_password_fate(generate):
            reply = leader.call(
                admin.SetPassword,
                admin_pb2.SetPasswordRequest(auth_verifier_json=verifier_json(secret)),
            )
    say(f"password version {reply.version} staged.")
    if weaker is not None:  # (once staged: a refused one says its one line only)
        click.echo(f"tlsroll: warning: {weaker}", err=True)
    if reply.HasField("replaces"):
        say(f"It {replaces_text(reply.replaces)}.")
    if reply.pending_nodes:
        say("pending on: " + ", ".join(reply.pending_nodes))
        say(
            "It takes effect with `tlsroll rollout start --change change-password --scope "
            "cluster` (which restarts the server); another restart keeps the live password."
        )
