"""``tlsroll init``, ``tlsroll ca show|renew|revoke`` and ``tlsroll token create|list|revoke``:
setting up the cluster (the CA, the leader's files) and letting agents join it."""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import click

from leader.cli.base import (
    Leader,
    ask_first,
    emit_json,
    fmt_time,
    free_text_param,
    not_a_secret,
    out,
    parse_duration,
    pass_leader,
    print_secret,
    private_stdout,
    refuse_unfit_serial,
    say,
    say_still_taken,
    to_dict,
)
from tlsroll.cli import PathParam, refuse_empty_path
from tlsroll.config import control_character, dump_toml, utf8
from tlsroll.defaults import CONTROL_PORT, DEFAULT_DATA_DIR, JOIN_PORT
from tlsroll.fsutil import real_path
from tlsroll.v1 import admin_pb2

# What one command of these needs is imported by it: rich's tables (some 25 ms) by `token list`,
# the join script's parts (``leader.cli.join_merge``, shlex) by `token create`'s script, shutil
# by `init`; `token create`, `ca revoke` and the rest run without them (session 66).

AGENT_DATA_DIR = PurePosixPath("/var/lib/tlsroll-agent")
"""The agent's data dir in a join script's config when ``--agent-data-dir`` names none."""


class NodePath(click.ParamType[PurePosixPath]):
    """A path on the node a join script runs on (``--agent-config-dir``, ``--agent-data-dir``),
    not on this machine: only its form is checked here, nothing on this file system (click's
    Path refused ``/etc/tlsroll`` where the leader had a file of that name, and said nothing of
    what the node has: the ops review of session 63). Not empty (``refuse_empty_path``),
    absolute, no control character (it goes into a shell script run as root, in comments and
    quoted words: a newline would start a line of its own, review s47rtin M2; NUL among
    them), no ``..`` (the node resolves it through its own links: ``/etc/x/..`` need not be
    ``/etc``), given back normalised (``//`` and ``.`` and a trailing ``/`` dropped), as the
    script names it."""

    name = "path"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> PurePosixPath:
        if isinstance(value, PurePosixPath):
            return value  # (the default)
        refuse_empty_path(self, value, param, ctx)
        text = str(value)
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            self.fail("must not hold control characters", param, ctx)
        if not text.startswith("/"):
            self.fail("must be an absolute path (the node's)", param, ctx)
        if ".." in text.split("/"):
            self.fail(
                "must not hold '..': the node resolves it through its own links; give the "
                "directory itself",
                param,
                ctx,
            )
        return PurePosixPath("/" + text.lstrip("/"))  # (PurePosixPath keeps a leading //)


@click.command()
@click.option(
    "--data-dir",
    type=PathParam(),  # a string (PathParam refuses '', which click takes for '.')
    required=True,
    help="Where the leader keeps its CA, store and config (created).",
)
@click.option("--address", required=True, help="The leader node's IP address.")
@click.option("--dns", "dns_names", multiple=True, help="A DNS name of the leader (repeatable).")
@click.option("--node-name", help="The name the leader node's own agent enrols with.")
@click.option(
    "--ca-passphrase-file",
    type=PathParam(path_type=Path, dir_okay=False, exists=True),
    help="File (0600) holding the passphrase that encrypts the CA key; "
    "default: a new random one in DATA_DIR/secrets/.",
)
def init(
    data_dir: str,
    address: str,
    dns_names: tuple[str, ...],
    node_name: str | None,
    ca_passphrase_file: Path | None,
) -> None:
    """Create a new multiserver: CA, leader certificate and config."""
    # cryptography (about 50 ms): only init needs it, not every command this module serves
    from tlsroll import pki  # noqa: PLC0415

    if not data_dir.strip():
        raise click.BadParameter("must not be empty", param_hint="--data-dir")
    # leader.toml names it, and no text value of a config holds a control character: the
    # leader made there could never start (review s48rev3). Before anything is made.
    absolute = str(Path(data_dir).absolute())
    if not utf8(absolute):
        # leader.toml (UTF-8) names it: init would make the CA, then fail writing it, and a
        # re-run call the directory interrupted (review s49sec2 L4). Before anything is made.
        raise click.BadParameter(
            "its path is no UTF-8 text (a byte of another encoding, here or in the working "
            "directory); choose a directory whose path is",
            param_hint="--data-dir",
        )
    if (bad := control_character(absolute)) is not None:
        raise click.BadParameter(
            f"holds a control character ({bad}); choose a directory without",
            param_hint="--data-dir",
        )
    if node_name is not None and (problem := pki.node_name_problem(node_name)):
        raise click.BadParameter(problem, param_hint="--node-name")
    # The rules ``token create`` applies to a node's names (audit s34 M1;
    # ``leader.layout.leader_names_problem``), each blamed on its own option (L4), before
    # anything is made.
    if problem := pki.ip_problem(address):
        raise click.BadParameter(problem, param_hint="--address")
    for name in dns_names:
        if problem := pki.dns_problem(pki.dns_given(name)):
            raise click.BadParameter(problem, param_hint="--dns")
    weaker = kdf_hook(Path(absolute))  # (set wrong: refused before anything is made)
    try:
        from leader import layout as layout_mod  # noqa: PLC0415 - only init needs it

        layout = layout_mod.init(
            Path(data_dir),
            address,
            dns_names=dns_names,
            node_name=node_name,
            passphrase_file=ca_passphrase_file,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--address") from None
    if weaker is not None:  # (once made: an init refused wrote no key, and says one line)
        click.echo(
            f"tlsroll: warning: {weaker}; unset it for a real cluster (the leader's first"
            " start without it encrypts the key again)",
            err=True,
        )
    ca = pki.read_cert(layout.ca_cert)
    out.print(f"initialised {layout.data_dir}")
    out.print(f"  config      {layout.config}")
    out.print(f"  CA pin      {pki.spki_pin(ca)}   (agents need it: [leader].ca_pin)")
    for line in start_lines(layout.data_dir, layout.config):
        out.print(line)


def kdf_hook(data_dir: Path) -> str | None:
    """The tests' scrypt hook (``keywrap.TEST_KDF_N_ENV``): set wrong, a usage error (exit 2)
    before anything is made; set, what ``init`` warns of once the CA key is written weaker
    (scrypt N=n, not ``keywrap.SCRYPT_N``); None when unset."""
    from tlsroll import keywrap  # noqa: PLC0415 - only init needs it

    try:
        n = keywrap.hook_kdf_n()
    except keywrap.KdfHookError as exc:
        raise click.UsageError(str(exc)) from None
    if (refused := keywrap.hook_refused_for(data_dir, n)) is not None:
        raise click.UsageError(refused)
    if n is None:
        return None
    return (
        f"{keywrap.TEST_KDF_N_ENV}={n} is set (tests only): the CA key is written under"
        f" scrypt N={n}, not N={keywrap.SCRYPT_N}"
    )


def start_lines(data_dir: Path, config: Path) -> list[str]:
    """How to start the leader ``init`` just set up, as commands that work as printed (review
    s45rt2 M6: on an installed server only ``tlsroll`` is on PATH). For the unit's data dir
    (``deploy/systemd/tlsroll-leader.service`` reads ``/var/lib/tlsroll/leader.toml``): the unit,
    after ``install.sh ca-credential`` if the admin takes the passphrase out of the data dir; no
    line for running it by hand, which stops working once that has run (the passphrase is then
    a systemd credential, in /run/tlsroll only while the unit starts: review s45rev2 M2).
    Elsewhere: the daemon beside this interpreter (``/opt/tlsroll/bin`` when installed), else
    the one on PATH, else its bare name (review s45rev2 L6)."""
    if real_path(data_dir) == DEFAULT_DATA_DIR:
        return [
            "start the leader:  systemctl enable --now tlsroll-leader"
            "   (its log: journalctl -u tlsroll-leader -f)",
            f"  first, to take the CA passphrase out of {data_dir}: install.sh ca-credential"
            " (as root)",
        ]
    import shlex  # noqa: PLC0415 - see the imports
    import shutil  # noqa: PLC0415

    beside = Path(sys.executable).parent / "tlsroll-leader"
    daemon = str(beside) if beside.exists() else shutil.which("tlsroll-leader") or "tlsroll-leader"
    return [f"start the leader:  {shlex.quote(daemon)} --config {shlex.quote(str(config))}"]


@click.group()
def ca() -> None:
    """The cluster CA."""


@ca.command("show", short_help="Print the CA, its pin and the trust bundle.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def ca_show(leader: Leader, as_json: bool) -> None:
    """Print the CA (subject, fingerprint, SPKI pin, expiry and residual time) and the trust
    bundle agents and workstations are given (all public; safe to share). How the 10-year CA
    is rolled: docs/ca-renewal.md."""
    from leader.cli.draw import residual  # noqa: PLC0415 - lazy, as the command groups are

    with leader.admin() as admin:
        reply = leader.call(admin.GetCA, admin_pb2.GetCARequest())
    if as_json:
        data = to_dict(reply)
        data["certificate_pem"] = reply.certificate_pem.decode()
        data["bundle_pem"] = reply.bundle_pem.decode()
        data.setdefault("residual_seconds", 0)
        emit_json(data)
        return
    out.print(f"subject      {reply.subject}")
    out.print(f"fingerprint  {reply.fingerprint}")
    out.print(f"pin          {reply.spki_pin}")
    out.print(f"expires      {fmt_time(reply, 'not_after')}")
    out.print(f"residual     {residual(reply.residual_seconds)}")
    out.print(
        f"trust bundle {len(reply.bundle)} CA certificate(s), what agents and workstations trust:"
    )
    for c in reply.bundle:
        role = "issuing" if c.issuing else "trusted"
        out.print(
            f"  {role:8} {c.subject}  {c.fingerprint}  expires {fmt_time(c, 'not_after')}"
            f" ({residual(c.residual_seconds)})"
        )


@ca.command("renew", short_help="Renew the CA certificate (same key, 10 more years).")
@click.option("--yes", is_flag=True, help="Do it without asking.")
@click.option(
    "--force",
    is_flag=True,
    help="Renew it even while more than 9 years of it remain (refused without).",
)
@pass_leader
def ca_renew(leader: Leader, yes: bool, force: bool) -> None:
    """Renew the CA certificate with the same key: its subject, key and pin kept, a new serial,
    valid 10 years from now. Every certificate it issued stays valid and chains to it; the
    leader uses it at once (no restart). Agents take it with their next certificate renewal;
    then run `tlsroll rollout start --change rotate-cert` (managed servers) and `tlsroll
    client test-connection` on every workstation. Refused while a rollout has not ended, and
    while more than 9 years of it remain (its last year is when to renew it) unless --force.
    Audited. See docs/ca-renewal.md."""
    from leader.cli.draw import residual  # noqa: PLC0415 - lazy, as the command groups are

    leader.require_same_code()  # before it is confirmed (exit 5; review s35 L1)
    if not yes:
        ask_first(
            "add --yes to renew it without asking",
            "Renew the cluster CA's certificate (same key, 10 years from now)? The previous "
            "one is kept beside it.",
            "not renewed",
        )
    with leader.admin() as admin:
        reply = leader.call(admin.RenewCA, admin_pb2.RenewCARequest(force=force))
    say(
        f"renewed the CA certificate: expires {fmt_time(reply, 'not_after')} "
        f"({residual(reply.residual_seconds)}), pin {reply.spki_pin} (unchanged)"
    )
    say(
        "next: agents take it with their next certificate renewal (`tlsroll nodes`); then "
        "`tlsroll rollout start --change rotate-cert` (managed servers), then `tlsroll client "
        "test-connection` on every workstation"
    )


SERIAL_DIGITS = 32  # fewer hex digits than a serial of this CA has (``ca revoke --unknown``)


@ca.command("revoke", short_help="Revoke one certificate the CA issued, by its serial.")
@click.argument("serial")
@click.option(
    "--reason",
    default="",
    callback=free_text_param,
    help="Why (kept in the audit trail; no secret: refused).",
)
@click.option(
    "--unknown",
    is_flag=True,
    help="Also revoke a serial the leader has no record of: a certificate this CA issued "
    "before the store was rebuilt (--reinitialise). Check the serial digit by digit first.",
)
@pass_leader
def ca_revoke(leader: Leader, serial: str, reason: str, unknown: bool) -> None:
    """Revoke one certificate the CA issued, by its SERIAL (hex, in full: `tlsroll certs
    check-expiration` lists them). Agents learn of it with their next heartbeat and refuse it
    from then on. A serial the leader has no record of is refused, unless --unknown. The
    leader's and the viewer's own certificates are found by serial too, and issued again at
    once for a new key; the CA's own is refused (`tlsroll ca renew` replaces it). A node's
    server certificate it still serves goes on being served, and taken by the practice's
    clients, until a rotate-cert replaces it: a warning says so, with the command. (`tlsroll
    nodes remove` and `tlsroll workstations revoke` revoke by name.)"""
    refuse_unfit_serial(serial, serial_only=True)
    with leader.admin() as admin:
        reply = leader.call(
            admin.RevokeCertificate,
            admin_pb2.RevokeCertificateRequest(
                name_or_serial=serial, reason=reason, unknown=unknown
            ),
        )
    out.print(f"revoked {', '.join(reply.revoked_serials)}")
    for kind in reply.not_reissued:
        click.echo(
            f"tlsroll: warning: the {kind}'s certificate is revoked and the leader could not"
            " issue it again now: it serves it revoked (agents refuse the leader's commands"
            " with it) until it can: see `tlsroll certs check-expiration` and the leader's"
            " log (leader.certificate_revoked_not_reissued, certificate.revoked_hook_failed);"
            " its next start issues it again",
            err=True,
        )
    say_still_taken(reply)
    digits = short_serial_digits(serial)
    if unknown and digits is not None:
        click.echo(
            f"tlsroll: warning: {serial.strip()} has {digits} hex digits, and the serials this"
            f" CA issues have {SERIAL_DIGITS} or more: if it was cut short, the certificate"
            " it is from is not revoked",
            err=True,
        )


def short_serial_digits(serial: str) -> int | None:
    """The hex digits of ``serial`` when fewer than this CA's serials have (it may have been
    cut short); None for a full serial or a workstation name (ws-…)."""
    key = serial.strip()
    if not re.fullmatch(r"[0-9a-fA-F]+", key):
        return None
    digits = len(key.lstrip("0"))
    return digits if digits < SERIAL_DIGITS else None  # 159 random bits: fewer once in 2^35


@click.group()
def token() -> None:
    """Join tokens for enrolling agents."""


@token.command("create", short_help="Create a join token for one node (or its join script).")
@click.option("--node", "node_name", required=True, help="The name of the node it enrols.")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    required=True,
    help="An IP address of that node (repeatable); its certificate holds exactly these.",
)
@click.option("--dns", "dns_names", multiple=True, help="A DNS name of that node (repeatable).")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime, e.g. 30m, 1h, 2d.")
@click.option(
    "--uses",
    default=1,
    show_default=True,
    type=int,
    callback=lambda _ctx, _param, value: one_use(value),
    help="Kept for scripts: 1 only. A token enrols its node once: the node's enrolment "
    "supersedes every token made for it, a second use included.",
)
@click.option(
    "--description",
    default="",
    callback=free_text_param,
    help="A note for `token list` (no secret: refused).",
)
@click.option(
    "--print-join-command",
    is_flag=True,
    help="Print a shell script for the node instead of the bare token: it writes the agent's "
    "config (node, addresses, leader address, CA pin) and the token file, both 0600.",
)
@click.option(
    "--agent-config-dir",
    type=NodePath(),
    default=PurePosixPath("/etc/tlsroll"),
    show_default=True,
    help="With --print-join-command: where the script puts agent.toml and join-token, on the "
    "node (an absolute path; checked here for its form only, nothing on this machine).",
)
@click.option(
    "--agent-data-dir",
    type=NodePath(),
    default=None,
    help="With --print-join-command: the agent's data_dir in the config it writes, on the node "
    f"[default: {AGENT_DATA_DIR}; an agent.toml already there keeps its own unless this is "
    "given].",
)
@pass_leader
def token_create(
    leader: Leader,
    node_name: str,
    addresses: tuple[str, ...],
    dns_names: tuple[str, ...],
    ttl: str,
    uses: int,
    description: str,
    print_join_command: bool,
    agent_config_dir: PurePosixPath,
    agent_data_dir: PurePosixPath | None,
) -> None:
    """Create a join token for one node and print it (shown once; only its hash is kept).

    The token enrols only node NAME with exactly the given addresses and DNS names: the CA
    signs those and nothing else, and refuses names the leader or another node holds.

    With --print-join-command it prints, instead, a shell script to run as root on that node:
    it writes the agent's config and the token file. An agent.toml already there is copied to
    agent.toml.before-join.TIME (never over an earlier copy), and its [server] table and the
    [agent] settings the script does not set are kept (its data_dir too unless
    --agent-data-dir is given), said in one line; check the [server] table (the managed
    server's driver, see the example agent.toml) and start the agent. An agent.toml that is a
    symbolic link is written where it points (a link to no file is refused)."""
    # Where the token goes, before it is made: a token printed into a file others may read
    # would be made and lost to them (review s66 logs M4).
    private_stdout(
        "the join script holds the token" if print_join_command else "the token is a secret"
    )
    # A secret pasted for a name would be signed into a certificate and shown in every list.
    for name in (node_name, *dns_names):
        not_a_secret(name, "the node's name (--node) and its DNS names (--dns)")
    seconds = parse_duration(ttl, "--ttl")
    with leader.admin() as admin:
        reply = leader.call(
            admin.CreateToken,
            admin_pb2.CreateTokenRequest(
                ttl_seconds=seconds,
                uses=uses,
                description=description,
                node_name=node_name,
                addresses=addresses,
                dns_names=dns_names,
            ),
        )
    token_id = reply.info.id

    def revoke() -> None:
        with leader.admin() as admin:
            leader.call(admin.RevokeToken, admin_pb2.RevokeTokenRequest(id=token_id))

    how = f"tlsroll token revoke {token_id}"
    if print_join_command:
        script = join_script(reply, agent_config_dir, agent_data_dir)
        print_secret(script, f"token {token_id}", revoke, how)
        return
    print_secret(reply.token + "\n", f"token {token_id}", revoke, how)
    if sys.stderr.isatty():
        click.echo(
            f"token {reply.info.id} for node {reply.info.node_name}: enrols it once, expires "
            f"{fmt_time(reply.info, 'expires_at')}; give it to the agent's config as "
            "join_token_file (0600)",
            err=True,
        )


def one_use(uses: int) -> int:
    """``--uses``, checked before anything is asked: a second use could never enrol (the
    node's enrolment supersedes every token of the node with a use left, its own included),
    so more than one is a usage error, not a token that promises what it cannot do."""
    if uses != 1:
        raise click.BadParameter(
            f"{uses}: a token enrols its node once (the enrolment supersedes it); "
            "give 1 or leave --uses out, and make a new token to enrol the node again",
            param_hint="--uses",
        )
    return uses


def join_script(
    reply: admin_pb2.CreateTokenResponse, config_dir: PurePosixPath, data_dir: PurePosixPath | None
) -> str:
    """A POSIX shell script that writes an agent's config and join token for the node the token
    names, each 0600 (the token in its own file, never in the config). ``data_dir`` None: the
    default, and an agent.toml already there keeps its own (review s47rev2 L5)."""
    info = reply.info
    config_file, token_file = config_dir / "agent.toml", config_dir / "join-token"
    leader_table: dict[str, object] = {
        "address": reply.leader_address,
        "ca_pin": reply.ca_pin,
        "join_token_file": token_file,
    }
    if reply.join_port and reply.join_port != JOIN_PORT:
        leader_table["join_port"] = reply.join_port
    if reply.control_port and reply.control_port != CONTROL_PORT:
        leader_table["control_port"] = reply.control_port
    config = dump_toml(
        {
            "node": {
                "name": info.node_name,
                "addresses": list(info.addresses),
                "dns_names": list(info.dns_names),
            },
            "leader": leader_table,
            "agent": {"data_dir": data_dir or AGENT_DATA_DIR},
        },
        f"tlsroll agent {info.node_name} (written by `tlsroll token create --print-join-command`)",
    )
    import shlex  # noqa: PLC0415 - see the imports

    from leader.cli import join_merge  # noqa: PLC0415

    marker, merge = "TLSROLL_AGENT_TOML", "TLSROLL_JOIN_MERGE"
    q = shlex.quote
    conf, new = q(str(config_file)), q(f"{config_file}.join")
    keep = "" if data_dir else f" {join_merge.KEEP_DATA_DIR}"
    dangling = (
        "join: %s is a symbolic link to %s, which is not a file: point it at the agent's "
        "config or remove it; nothing changed\\n"
    )
    lines = [
        "#!/bin/sh",
        f"# Run as root on node {info.node_name} ({', '.join(info.addresses)}). It writes",
        f"# {config_file} and {token_file} (0600). The token is secret; it enrols this",
        f"# node until {fmt_time(info, 'expires_at')}, once: the node's enrolment supersedes",
        "# it and every other token made for the node before it.",
        "set -eu",
        "umask 077",
        f"mkdir -p {q(str(config_dir))}",
        "# An agent.toml that is a symbolic link is written where it points; a link to no file",
        "# is refused.",
        f"dest={conf}",
        f"if [ -L {conf} ]; then",
        f"    dest=$(readlink -f {conf}) || dest=",
        '    if [ -z "$dest" ] || [ ! -f "$dest" ]; then',
        f'        printf {q(dangling)} {conf} "$(readlink {conf})" >&2',
        "        exit 1",
        "    fi",
        "fi",
        f"cat > {new} <<'{marker}'",
        config.rstrip("\n"),
        marker,
        "# An agent.toml already there (install.sh's example, a node joined before) is copied",
        "# whole to agent.toml.before-join.TIME, and its [server] table and the [agent] settings",
        "# this script does not set are kept (by the node's Python: tlsroll's, or python3 3.11+).",
        *(
            ["# Its [agent] data_dir too: this script names none (no --agent-data-dir)."]
            if keep
            else []
        ),
        f"if [ -e {conf} ]; then",
        "    py=",
        "    for candidate in /opt/tlsroll/bin/python python3; do",
        "        if \"$candidate\" -I -c 'import tomllib' >/dev/null 2>&1; then",
        "            py=$candidate",
        "            break",
        "        fi",
        "    done",
        '    if [ -z "$py" ]; then',
        f"        rm -f {new}",
        "        echo "
        + q(
            f"join: {config_file} is there and no Python 3.11+ to keep its [server] table: "
            "install tlsroll first (install.sh agent), or move it away; nothing changed"
        )
        + " >&2",
        "        exit 1",
        "    fi",
        f"    kept={q(f'{config_file}.before-join.')}$(date -u +%Y%m%dT%H%M%SZ)",
        "    base=$kept n=1",
        '    while [ -e "$kept" ]; do kept=$base.$n; n=$((n + 1)); done',
        f'    cp -p {conf} "$kept"',
        "    set --",
        f'    if [ "$dest" != {conf} ]; then set -- {join_merge.VIA_LINK} {conf} "$dest"; fi',
        "    # (a link to no TOML refused: the copy of what it names is not kept)",
        f'    "$py" -I - "$kept" {new}{keep} "$@" <<\'{merge}\' || {{'
        f' rm -f {new}; if [ "$#" -gt 0 ]; then rm -f "$kept"; fi; exit 1; }}',
        join_merge_source().rstrip("\n"),
        merge,
        "fi",
        "# The token into a file of its own, made new (0600 from its start: a join-token left",
        "# there, its mode or a link, is replaced whole, never written into), then renamed.",
        f"tok=$(mktemp {q(f'{token_file}.XXXXXX')}) || {{ rm -f {new}; exit 1; }}",
        f'printf \'%s\\n\' {q(reply.token)} > "$tok" && chmod 600 "$tok" &&',
        f'    mv -f "$tok" {q(str(token_file))} || {{ rm -f "$tok" {new}; exit 1; }}',
        f"chmod 600 {new}",
        f'if [ "$dest" = {conf} ]; then',
        f"    mv -f {new} {conf}",
        "else",
        "    # Beside the file the link names, created new (no link followed), then renamed.",
        f'    tmp=$(mktemp "$dest.join.XXXXXX") || {{ rm -f {new}; exit 1; }}',
        f'    cat {new} > "$tmp" && chmod 600 "$tmp" && mv -f "$tmp" "$dest" ||',
        f'        {{ rm -f "$tmp" {new}; exit 1; }}',
        f"    rm -f {new}",
        "    printf "
        + q("join: %s is a symbolic link: the config is written to %s, where it points\\n")
        + f' {conf} "$dest"',
        "fi",
        "# Next: check the [server] table for the managed server (kept from the agent.toml",
        "# that was there, else from the example agent.toml), then:",
        "# systemctl enable --now tlsroll-agent",
    ]
    return "\n".join(lines) + "\n"


def join_merge_source() -> str:
    """The text of ``leader.cli.join_merge``, which the join script runs with the node's Python."""
    from leader.cli import join_merge  # noqa: PLC0415 - see the imports

    return Path(join_merge.__file__).read_text(encoding="utf-8")


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def token_list(leader: Leader, as_json: bool) -> None:
    """List join tokens (ids and state; secrets are never shown again)."""
    with leader.admin() as admin:
        reply = leader.call(admin.ListTokens, admin_pb2.ListTokensRequest())
    if as_json:
        emit_json([to_dict(t) for t in reply.tokens])
        return
    from rich.table import Table  # noqa: PLC0415 - see the imports

    table = Table("id")
    # The node's name whole on a narrow terminal (rich cut it to "praxis-empfan…" at 80).
    width = max([4, *(len(t.node_name or "(none: not usable)") for t in reply.tokens)])
    table.add_column("node", min_width=min(width, 24))
    for header in ("uses left", "expires", "state", "description"):
        table.add_column(header)
    now = dt.datetime.now(dt.UTC)
    for t in reply.tokens:
        expired = t.expires_at.ToDatetime(tzinfo=dt.UTC) <= now
        state = (
            "revoked"
            if t.revoked
            else f"superseded ({superseded_how(t)} {fmt_time(t, 'superseded_at')})"
            if t.HasField("superseded_at")
            else "expired"
            if expired
            else "used up"
            if t.uses_left == 0
            else "valid"
        )
        table.add_row(
            t.id,
            t.node_name or "(none: not usable)",
            f"{t.uses_left}/{t.uses_allowed}",
            fmt_time(t, "expires_at"),
            state,
            t.description,
        )
    out.print(table)


def superseded_how(t: admin_pb2.TokenInfo) -> str:
    """The event that superseded a token, as ``token list`` says it: "n3 enrolled", or
    "re-learned by the leader" (its restored or reinitialised store learned the node from its
    agent: not something the node did, review s44rev3 L3). A leader before s44 does not say:
    only an enrolment superseded then, or a re-learning it did not tell apart."""
    if t.superseded_by == "re-learning":
        return "re-learned by the leader"
    return f"{t.node_name} enrolled"


@token.command("revoke")
@click.argument("token_id")
@pass_leader
def token_revoke(leader: Leader, token_id: str) -> None:
    """Revoke a join token by its id (the part before the dot)."""
    token_id = token_id.split(".", 1)[0]  # accept a whole token too, but never echo its secret
    not_a_secret(token_id, "the token's id (tlsroll token list lists them)")
    with leader.admin() as admin:
        reply = leader.call(admin.RevokeToken, admin_pb2.RevokeTokenRequest(id=token_id))
    out.print(f"revoked token {reply.info.id}")
