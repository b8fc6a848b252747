"""``tlsroll plan``, ``tlsroll rollout …`` and ``tlsroll schema show``: the seed's switch dialog.

``plan`` is the dry run (changes nothing). ``rollout start`` without ``--yes`` shows the plan
and the seed's warnings and asks. ``schema show`` only reads; ``--watch`` follows a rollout
live until it ends.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from leader import byo
from leader.cli.base import (
    CLIError,
    Leader,
    emit_json,
    fetch_schema,
    fmt_time,
    out,
    parse_duration,
    pass_leader,
    to_dict,
)
from leader.cli.certs import render_certificate_health
from leader.cli.password import obtain_password, verifier_json
from leader.rollout_core import (
    TERMINAL_ROLLOUT_STATES,
    Change,
    FreezeMode,
    NodeState,
    RolloutAction,
    RolloutState,
    ScopeKind,
    Strategy,
)
from leader.wire import (
    CHANGE,
    FREEZE,
    NODE_STATE,
    ROLLOUT_ACTION,
    ROLLOUT_STATE,
    SCOPE_KIND,
    STRATEGY,
)
from tlsroll.v1 import admin_pb2, schema_pb2

TERMINAL = {s.value for s in TERMINAL_ROLLOUT_STATES}
AWAITING = RolloutState.AWAITING_FINALIZE.value
ENDS = TERMINAL | {AWAITING}  # where --wait and --watch stop: nothing more happens by itself
NEEDS_ATTENTION = NodeState.NEEDS_ATTENTION.value
EXIT_STOPPED = 3  # rollout status: halted or aborted
EXIT_NEEDS_ATTENTION = 4  # rollout status: a node is in no known good state
PENDING = "password change pending — takes effect at next restart"
STATE_STYLE = {
    "needs_attention": "bold reverse red",
    "done": "green",
    "completed": "green",
    "failed": "red",
    "rolled_back": "red",
    "halted": "red",
    "aborted": "yellow",
    "skipped": "yellow",
    "paused": "yellow",
    "switching": "cyan",
    "confirming": "cyan",
    "running": "cyan",
    "dual": "green",
    "awaiting_finalize": "bold yellow",
}


def scope_options(f: Any) -> Any:
    f = click.option(
        "--strategy",
        type=click.Choice(["direct", "transitional"]),
        default="direct",
        show_default=True,
        help="enable-tls: direct closes http in the same restart that opens https; "
        "transitional opens https beside http (phase 1), and `tlsroll rollout finalize` "
        "closes http once the workstations have moved (phase 2).",
    )(f)
    f = click.option(
        "--change",
        type=click.Choice(["enable-tls", "change-password", "rotate-cert"]),
        default="enable-tls",
        show_default=True,
        help="enable-tls: the switch to https; change-password: apply a staged password; "
        "rotate-cert: a new server key and certificate on nodes already on https.",
    )(f)
    f = click.option(
        "--freeze",
        type=click.Choice(["node", "scope"]),
        default="node",
        show_default=True,
        help="Freeze writes per node during its switch, or on every node for the whole rollout.",
    )(f)
    f = click.option(
        "--max-parallel",
        type=click.IntRange(1, 200),
        default=1,
        show_default=True,
        help="How many nodes switch at the same time.",
    )(f)
    f = click.option(
        "--failure-budget",
        type=click.IntRange(0, 200),
        default=0,
        show_default=True,
        help="How many nodes may fail (and go back) before the rollout halts.",
    )(f)
    f = click.option(
        "--cert-dir",
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        help="enable-tls, rotate-cert: the practice's own certificates instead of the cluster "
        "CA's: DIR/ca.crt (the practice CA), DIR/<node>.crt (certificate, then intermediates) "
        "and DIR/<node>.key (0600) for every node in scope; all checked before any node is "
        "touched.",
    )(f)
    f = click.option("--nodes", help="Comma-separated node names (scope 'nodes').")(f)
    f = click.option(
        "--scope",
        type=click.Choice(["local", "cluster", "nodes"]),
        help="local = the leader node; cluster = every enrolled node.",
    )(f)
    return f


def rollout_request(
    scope: str | None,
    nodes: str | None,
    max_parallel: int,
    freeze: str,
    change: str,
    failure_budget: int = 0,
    strategy: str = "direct",
) -> admin_pb2.RolloutRequest:
    names = [n.strip() for n in (nodes or "").split(",") if n.strip()]
    if strategy == "transitional" and change != "enable-tls":
        raise click.UsageError("--strategy transitional goes with --change enable-tls")
    if scope is None:
        if not names:
            raise click.UsageError("give --scope local|cluster or --nodes a,b")
        scope = "nodes"
    if scope == "nodes" and not names:
        raise click.UsageError("scope 'nodes' needs --nodes a,b")
    if scope != "nodes" and names:
        raise click.UsageError("--nodes goes with --scope nodes (or without --scope)")
    return admin_pb2.RolloutRequest(
        change=CHANGE.wire(Change(change)),
        scope=SCOPE_KIND.wire(ScopeKind(scope)),
        nodes=names,
        max_parallel=max_parallel,
        freeze=FREEZE.wire(FreezeMode(freeze)),
        failure_budget=failure_budget,
        strategy=STRATEGY.wire(Strategy(strategy)),
    )


def cert_dir_message(directory: Path) -> admin_pb2.CertDir:
    """``--cert-dir`` for the leader (``leader.byo``: the layout). The keys go over the admin
    socket to the leader, which keeps them in memory only until each node has its own."""
    try:
        material = byo.read_cert_dir(directory)
    except OSError as exc:
        raise CLIError(f"--cert-dir {directory}: cannot read it ({exc.strerror or exc})") from None
    message = admin_pb2.CertDir(ca_pem=material.ca_pem)
    for item in material.nodes.values():
        node = message.nodes.add(
            node=item.node, chain_pem=item.chain_pem, private_key_pem=item.key_pem
        )
        if item.key_mode is not None:
            node.key_file_mode = item.key_mode
    return message


def _dt(msg: Any, field: str) -> dt.datetime | None:
    return getattr(msg, field).ToDatetime(tzinfo=dt.UTC) if msg.HasField(field) else None


def _styled(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def freeze_window(node: schema_pb2.NodeView) -> str:
    start, end = _dt(node, "freeze_started_at"), _dt(node, "freeze_ended_at")
    if start is None:
        return "-"
    if end is None:
        return f"{start:%H:%M:%S}–(frozen)"
    return f"{start:%H:%M:%S}–{end:%H:%M:%S} ({(end - start).total_seconds():.1f}s)"


def render_rollout(r: schema_pb2.RolloutView) -> Group:
    head = Text.assemble(
        ("rollout ", "bold"),
        (r.id, "bold"),
        "  ",
        _styled(ROLLOUT_STATE.text(r.state)),
        f"  change {CHANGE.text(r.change)}  scope {SCOPE_KIND.text(r.scope)}"
        + (f" ({', '.join(r.scope_nodes)})" if r.scope_nodes else "")
        + f"  strategy {STRATEGY.text(r.strategy)}  max-parallel {r.max_parallel}"
        f"  freeze {FREEZE.text(r.freeze)}"
        f"  epoch {r.epoch}"
        + (f"  finalizes {r.finalizes}" if r.finalizes else "")
        + (f"  when quiet for {r.when_quiet_seconds}s" if r.when_quiet_seconds else ""),
    )
    times = Text(
        f"created {fmt_time(r, 'created_at')} by {r.started_by or '-'}"
        f"   started {fmt_time(r, 'started_at')}   ended {fmt_time(r, 'ended_at')}"
        + (f"   note: {r.reason}" if r.reason else "")
    )
    table = Table(
        "#",
        "node",
        "state",
        "old address",
        "new address",
        "freeze window",
        "restart",
        "cert expires",
        "still on http",
        "reason",
    )
    for i, n in enumerate(r.nodes, 1):
        table.add_row(
            str(i),
            n.name + (" (leader)" if n.leader_node else ""),
            _styled(NODE_STATE.text(n.state)),
            n.old_url or "-",
            n.new_url or "-",
            freeze_window(n),
            f"{n.restart_seconds:.1f}s" if n.restart_seconds else "-",
            fmt_time(n, "cert_not_after"),
            str(n.still_on_http) if n.still_on_http else "-",
            "; ".join(filter(None, [n.reason, PENDING if n.password_pending else ""])),
        )
    return Group(head, times, table)


def render_clients(views: Sequence[schema_pb2.NodeClientsView]) -> Group:
    """Per node, who its managed server saw on which scheme lately (from the agents'
    heartbeats); peer-supplied strings are printed as plain text (no rich markup)."""
    table = Table("node", "scheme", "address", "workstation", "requests", "first", "last", "")
    notes: list[Text] = []
    for v in views:
        left = {(c.address, c.workstation) for c in v.still_on_http}
        for c in v.clients.clients:
            mark = (
                "still on http" if c.scheme == "http" and (c.address, c.workstation) in left else ""
            )
            table.add_row(
                Text(v.node),
                c.scheme,
                Text(c.address),
                Text(c.workstation or "-"),
                str(c.requests),
                fmt_time(c, "first_seen"),
                fmt_time(c, "last_seen"),
                Text(mark, style="bold yellow"),
            )
        source = v.clients.source or "unknown"
        problem = f"; problem: {v.clients.problem}" if v.clients.problem else ""
        notes.append(
            Text(
                f"{v.node}: {len(v.still_on_http)} still on http; window "
                f"{v.clients.window_seconds}s, source {source}, reported "
                f"{fmt_time(v, 'reported_at')}{problem}"
            )
        )
    head = Text("who is on which scheme (per node)", style="bold")
    return Group(head, table, *notes)


def render_revocations(data: schema_pb2.Schema) -> Group:
    """Removed nodes and revoked certificates (``tlsroll nodes remove``, ``… revoke``)."""
    parts: list[Any] = []
    if data.removed_nodes:
        removed = Table("removed node", "addresses", "removed")
        for n in data.removed_nodes:
            removed.add_row(Text(n.name), ", ".join(n.addresses), fmt_time(n, "removed_at"))
        parts.append(removed)
    if data.revoked_certificates:
        revoked = Table("revoked certificate", "kind", "of", "node", "revoked", "reason")
        for c in data.revoked_certificates:
            revoked.add_row(
                c.serial,
                c.kind,
                Text(c.subject or "-"),
                Text(c.node or "-"),
                fmt_time(c, "revoked_at"),
                Text(c.reason),
            )
        parts.append(revoked)
    return Group(Text("removed and revoked", style="bold"), *parts)


def render_failures(failures: Sequence[schema_pb2.BootstrapFailureView]) -> Group:
    """Failed passwords at the nodes' bootstrap services: a guessing attack shows up here.
    Peer-supplied strings are printed as plain text (no rich markup)."""
    table = Table("node", "source address", "workstation", "failures", "first", "last")
    for f in failures:
        table.add_row(
            Text(f.node),
            Text(f.source),
            Text(f.workstation or "-"),
            str(f.count),
            fmt_time(f, "first_at"),
            fmt_time(f, "last_at"),
        )
    head = Text("failed bootstrap passwords (port 9443)", style="bold")
    return Group(head, table)


# --- plan -------------------------------------------------------------------------------------


@click.command()
@scope_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def plan(
    leader: Leader,
    scope: str | None,
    nodes: str | None,
    failure_budget: int,
    max_parallel: int,
    freeze: str,
    change: str,
    strategy: str,
    cert_dir: Path | None,
    as_json: bool,
) -> None:
    """Dry run: the update schema a rollout would make, from what each node runs now (nodes
    already in the wanted state show "already done"), its checks, what clients must do. With
    --strategy transitional: both phases. With --cert-dir the certificates are checked too, and
    any problem refuses the plan."""
    request = rollout_request(scope, nodes, max_parallel, freeze, change, failure_budget, strategy)
    if cert_dir is not None:
        request.cert_dir.CopyFrom(cert_dir_message(cert_dir))
    with leader.admin() as admin:
        reply = leader.call(admin.PlanRollout, request)
    if as_json:
        emit_json(to_dict(reply))
        return
    show_plan(reply)


def show_plan(reply: admin_pb2.PlanResponse) -> None:
    r = reply.rollout
    transitional = STRATEGY.text(r.strategy) == Strategy.TRANSITIONAL.value
    out.print(
        f"Plan: change {CHANGE.text(r.change)} on scope {SCOPE_KIND.text(r.scope)}, "
        f"{len(r.nodes)} node(s) in this order, {r.max_parallel} at a time"
        + (", in two phases (strategy transitional):" if transitional else ":")
    )
    will = (
        " — phase 1: https beside http (dual); phase 2 (finalize): http closes"
        if transitional
        else " — will switch"
    )
    for i, n in enumerate(r.nodes, 1):
        shown = n.reason.startswith(("already done", "blocked:"))
        done = f" — {n.reason}" if shown else will
        out.print(f"  {i}. {n.name}{' (leader node)' if n.leader_node else ''}{done}")
    if reply.password_version_in_use:
        out.print(
            f"Auth password: the one the nodes already use (version "
            f"{reply.password_version_in_use}); it is not replaced."
        )
    out.print("Checks and steps on each node:")
    for c in reply.checks:
        out.print(f"  - {c}")
    if reply.certificates:
        out.print("Certificates from --cert-dir (every check passed):")
        for line in reply.certificates:
            out.print(f"  - {line}")
    out.print("Important:")
    for w in reply.warnings:
        out.print(f"  ! {w}")
    out.print(
        "At every workstation, any time before finalize:"
        if transitional
        else "Afterwards, at every workstation:"
    )
    for s in reply.client_steps:
        out.print(f"  - {s}")
    out.print("Nothing has been changed.")


# --- rollout ----------------------------------------------------------------------------------


@click.group()
def rollout() -> None:
    """Start and steer the switch to https."""


@rollout.command("start")
@scope_options
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="enable-tls: the auth password workstations will need (the file's only line); "
    "without it a new one is generated and shown once, unless nodes already use one (then "
    "the others get that one too).",
)
@click.option("--yes", is_flag=True, help="Start without showing the plan and asking.")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the rollout ends; the exit code is its outcome (as `rollout status`).",
)
@pass_leader
def rollout_start(
    leader: Leader,
    scope: str | None,
    nodes: str | None,
    failure_budget: int,
    max_parallel: int,
    freeze: str,
    change: str,
    strategy: str,
    cert_dir: Path | None,
    password_file: Path | None,
    yes: bool,
    wait: bool,
) -> None:
    """Start the switch from http to https on the local node or the whole multiserver.

    The plan comes from what each node runs now: a node already in the wanted state is left
    alone ("already done"), and a password the nodes already use is never replaced. With
    --strategy transitional the nodes keep http beside https until `tlsroll rollout finalize`."""
    request = rollout_request(scope, nodes, max_parallel, freeze, change, failure_budget, strategy)
    if cert_dir is not None:
        if change not in ("enable-tls", "rotate-cert"):
            raise click.UsageError("--cert-dir goes with --change enable-tls or rotate-cert")
        request.cert_dir.CopyFrom(cert_dir_message(cert_dir))
    if change != "enable-tls" and password_file is not None:
        raise click.UsageError("--password-file goes with enable-tls; use `tlsroll password set`")
    # A password file that is unusable or too weak fails before anything is asked or planned.
    secret = obtain_password(password_file, generate=False) if password_file else None
    with leader.admin() as admin:
        # The dry run first: a bad scope or an offline node fails before anything is asked.
        planned = leader.call(admin.PlanRollout, request)
        in_use = planned.password_version_in_use
        if in_use and secret is not None:
            raise CLIError(
                f"nodes already use auth password version {in_use}; the other nodes get the "
                "same one: leave out --password-file (to change it: tlsroll password set, "
                "then --change change-password)"
            )
        if not yes:
            show_plan(planned)
            if not sys.stdin.isatty():
                raise click.UsageError("not a terminal: review `tlsroll plan`, then add --yes")
            if not click.confirm("Start the switch now?", default=False):
                raise CLIError("not started")
        if change == "enable-tls" and not in_use:
            if secret is None:  # generated now, after the confirmation, and shown once
                secret = obtain_password(None, generate=True)
            request.auth_verifier_json = verifier_json(secret)
        view = leader.call(admin.StartRollout, request)
    started(view, in_use)
    if wait:
        wait_for_end(leader, view.id)


def started(view: schema_pb2.RolloutView, password_in_use: int = 0) -> None:
    skipped = [n for n in view.nodes if n.reason.startswith("already done")]
    out.print(
        f"rollout {view.id} started (epoch {view.epoch}); order: "
        f"{', '.join(n.name for n in view.nodes if n not in skipped)}"
    )
    for n in skipped:
        out.print(f"  {n.name}: {n.reason}")
    if password_in_use:
        out.print(f"  the nodes get the auth password already in use (version {password_in_use})")
    out.print("follow it with: tlsroll schema show --watch")


def wait_for_end(leader: Leader, rollout_id: str, interval: float = 0.5) -> None:
    """Poll until the rollout ends, then exit as `rollout status` does."""
    while True:
        schema = fetch_schema(leader, rollout_id, rollouts_only=True)
        state = ROLLOUT_STATE.text(schema.rollouts[0].state)
        if state in ENDS:
            break
        time.sleep(interval)
    click.get_current_context().invoke(rollout_status, rollout_id=rollout_id, as_json=False)


@rollout.command("retry")
@click.argument("rollout_id", required=False, default="")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the new rollout ends; the exit code is its outcome.",
)
@pass_leader
def rollout_retry(leader: Leader, rollout_id: str, wait: bool) -> None:
    """Try a halted or aborted rollout (default: the newest) again: its nodes that did not end
    `done` are planned again from what they run now and started as a new rollout, with the
    same change, options and password."""
    with leader.admin() as admin:
        view = leader.call(admin.RetryRollout, admin_pb2.RetryRolloutRequest(rollout_id=rollout_id))
    started(view)
    if wait:
        wait_for_end(leader, view.id)


@rollout.command("rollback")
@click.argument("rollout_id", required=False, default="")
@click.option(
    "--max-parallel",
    type=click.IntRange(1, 200),
    default=1,
    show_default=True,
    help="How many nodes go back at the same time.",
)
@click.option("--yes", is_flag=True, help="Start without showing the plan and asking.")
@pass_leader
def rollout_rollback(leader: Leader, rollout_id: str, max_parallel: int, yes: bool) -> None:
    """The way back: put the nodes an enable-tls rollout switched (default: the newest) back
    on http, the same safe way (a new rollout of change disable-tls). Once per rollout."""
    request = admin_pb2.RolloutRequest(
        change=CHANGE.wire(Change.DISABLE_TLS),
        undo_rollout_id=rollout_id,
        max_parallel=max_parallel,
        freeze=FREEZE.wire(FreezeMode.NODE),
    )
    with leader.admin() as admin:
        planned = leader.call(admin.PlanRollout, request)
        if not yes:
            out.print(
                f"Back to http: {', '.join(n.name for n in planned.rollout.nodes)} "
                "(each: freeze writes, restore the http config, restart, verify, unfreeze)."
            )
            out.print("  ! Every workstation must go back to the old http address afterwards.")
            if not sys.stdin.isatty():
                raise click.UsageError("not a terminal: add --yes to go back without asking")
            if not click.confirm("Go back to http now?", default=False):
                raise CLIError("not started")
        view = leader.call(admin.StartRollout, request)
    out.print(
        f"rollout {view.id} (disable-tls, undoes {view.undoes}) started; "
        "follow it with: tlsroll schema show --watch"
    )


@rollout.command("finalize")
@click.argument("rollout_id", required=False, default="")
@click.option(
    "--force",
    is_flag=True,
    help="Close http even though workstations were seen on it lately (they lose the server).",
)
@click.option(
    "--when-quiet",
    "when_quiet",
    metavar="DURATION",
    help="Let the leader finalize each node by itself once no http client was seen on it for "
    "DURATION (e.g. 30m, 2h, 1d); kept across leader restarts.",
)
@click.option("--yes", is_flag=True, help="Start without showing what happens and asking.")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the finalize rollout ends; the exit code is its outcome.",
)
@pass_leader
def rollout_finalize(
    leader: Leader, rollout_id: str, force: bool, when_quiet: str | None, yes: bool, wait: bool
) -> None:
    """Phase 2 of a transitional rollout (default: the one awaiting finalize): close http
    (8080) node by node — freeze, https-only config, restart, verify 8080 closed and https
    live, unfreeze, or back to dual. Refused while workstations were seen on http lately,
    naming them, unless --force or --when-quiet."""
    quiet = parse_duration(when_quiet) if when_quiet else 0
    if force and quiet:
        raise click.UsageError("--force and --when-quiet exclude each other")
    if not yes:
        how = (
            f"each node once no http client was seen on it for {when_quiet}"
            if quiet
            else "node by node now"
        )
        out.print(
            f"Finalize {rollout_id or 'the rollout awaiting finalize'}: close http (8080), "
            f"{how} (each: freeze writes, https-only config, restart, verify 8080 closed and "
            "https live, unfreeze; else back to http+https)."
        )
        out.print("  ! A workstation still on http loses the server until it does the steps.")
        if not sys.stdin.isatty():
            raise click.UsageError("not a terminal: add --yes to finalize without asking")
        if not click.confirm("Close http now?", default=False):
            raise CLIError("not started")
    request = admin_pb2.FinalizeRolloutRequest(
        rollout_id=rollout_id, force=force, when_quiet_seconds=quiet
    )
    with leader.admin() as admin:
        view = leader.call(admin.FinalizeRollout, request)
    out.print(
        f"rollout {view.id} (finalize of {view.finalizes}) started on "
        f"{', '.join(n.name for n in view.nodes)}"
        + (f"; each node waits until quiet for {when_quiet}" if quiet else "")
        + "; follow it with: tlsroll schema show --watch"
    )
    if wait:
        wait_for_end(leader, view.id)


def _control(leader: Leader, action: RolloutAction, rollout_id: str) -> None:
    with leader.admin() as admin:
        view = leader.call(
            admin.ControlRollout,
            admin_pb2.ControlRolloutRequest(
                rollout_id=rollout_id, action=ROLLOUT_ACTION.wire(action)
            ),
        )
    out.print(f"rollout {view.id}: {ROLLOUT_STATE.text(view.state)}")


CONTROL_HELP = {
    RolloutAction.PAUSE: "No new node starts; nodes in flight finish.",
    RolloutAction.RESUME: "Carry on after a pause.",
    RolloutAction.ABORT: "Finish the node(s) in flight safely, then stop; untouched nodes stay "
    "on http.",
}


def _control_command(action: RolloutAction) -> None:
    @rollout.command(action.value, help=CONTROL_HELP[action])
    @click.argument("rollout_id", required=False, default="")
    @pass_leader
    def command(leader: Leader, rollout_id: str) -> None:
        _control(leader, action, rollout_id)


for _action in RolloutAction:  # rollout pause | resume | abort [ID]
    _control_command(_action)


@rollout.command("status")
@click.argument("rollout_id", required=False, default="")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def rollout_status(leader: Leader, rollout_id: str, as_json: bool) -> None:
    """The newest (or named) rollout and its nodes.

    Exit codes: 0 running, paused or completed; 3 halted or aborted (every node that did not
    finish is back where it was); 4 a node needs attention (neither switched nor back: see its
    reason); 1 and 2 as for every command.
    """
    schema = fetch_schema(leader, rollout_id, limit=1, rollouts_only=True)
    if not schema.rollouts:
        raise CLIError("no rollout yet; start one with: tlsroll rollout start --scope …")
    r = schema.rollouts[0]
    if as_json:
        emit_json(to_dict(r))
    else:
        out.print(render_rollout(r))
    attention = [n.name for n in r.nodes if NODE_STATE.text(n.state) == NEEDS_ATTENTION]
    if attention:
        click.echo(
            f"tlsroll: {', '.join(attention)} need(s) attention: neither on the new settings nor "
            "back on the old ones; see the reason above, fix the server by hand",
            err=True,
        )
        click.get_current_context().exit(EXIT_NEEDS_ATTENTION)
    if ROLLOUT_STATE.text(r.state) in (RolloutState.HALTED.value, RolloutState.ABORTED.value):
        back = (
            " (or go back to http: tlsroll rollout rollback)"
            if CHANGE.text(r.change) == (Change.ENABLE_TLS.value)
            else ""
        )
        click.echo(
            f"tlsroll: rollout {r.id} {ROLLOUT_STATE.text(r.state)}; to finish the nodes it left: "
            f"tlsroll rollout retry {r.id}{back}",
            err=True,
        )
        click.get_current_context().exit(EXIT_STOPPED)
    if ROLLOUT_STATE.text(r.state) == AWAITING:
        click.echo(
            f"tlsroll: rollout {r.id} awaits finalize: its nodes serve http and https; who is "
            f"still on http: tlsroll schema show; then: tlsroll rollout finalize {r.id}",
            err=True,
        )


# --- schema -----------------------------------------------------------------------------------


@click.group()
def schema() -> None:
    """The update schema (read-only)."""


@schema.command("show")
@click.option("--rollout", "rollout_id", default="", help="Only this rollout.")
@click.option("--all", "show_all", is_flag=True, help="Every rollout stored, not only the newest.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Follow the newest rollout until it ends.")
@pass_leader
def schema_show(
    leader: Leader, rollout_id: str, show_all: bool, as_json: bool, watch: bool
) -> None:
    """Show the active rollout (else the latest; --all: every one) with its nodes, states,
    times, freeze windows, addresses and cert expiry, and failed bootstrap passwords."""
    if watch:
        try:
            watch_schema(leader, rollout_id, as_json)
        except KeyboardInterrupt:  # Ctrl-C is how one stops watching; the rollout goes on
            out.print("stopped watching; the rollout goes on (tlsroll schema show --watch)")
        return
    data = fetch_schema(leader, rollout_id, limit=0 if show_all or rollout_id else 1)
    if as_json:
        emit_json(to_dict(data))
        return
    if not data.rollouts:
        out.print("no rollouts yet")
    for r in data.rollouts:
        out.print(render_rollout(r))
    if data.node_clients:
        out.print(render_clients(data.node_clients))
    older = data.total_rollouts - len(data.rollouts)
    if older > 0 and not rollout_id:
        out.print(f"{older} older rollout(s) not shown: tlsroll schema show --all")
    if data.bootstrap_failures:
        out.print(render_failures(data.bootstrap_failures))
    if data.removed_nodes or data.revoked_certificates:
        out.print(render_revocations(data))
    if (health := render_certificate_health(data)) is not None:
        out.print(health)


def watch_schema(leader: Leader, rollout_id: str, as_json: bool, interval: float = 0.5) -> None:
    """Follow one rollout (the named one, else the newest) by asking for it alone, each time
    without the rest of the schema."""
    first = fetch_schema(leader, rollout_id, limit=1, rollouts_only=True)
    if not first.rollouts:
        raise CLIError("no rollout to watch")
    r = first.rollouts[0]
    watched = r.id

    def newest() -> schema_pb2.RolloutView | None:
        data = fetch_schema(leader, watched, rollouts_only=True)
        return data.rollouts[0] if data.rollouts else None

    if as_json:
        last = None
        while True:
            snapshot = to_dict(r)
            if snapshot != last:
                emit_json(snapshot)
                last = snapshot
            if ROLLOUT_STATE.text(r.state) in ENDS:
                return
            time.sleep(interval)
            r = newest() or r
    if not out.is_terminal:  # a log, not a screen: one line per change, the table at the end
        seen: dict[str, str] = {}

        def note(what: str, key: str, state: str, reason: str) -> None:
            if seen.get(key) != state:
                seen[key] = state
                why = f" ({reason})" if reason else ""
                out.print(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {what} {key}: {state}{why}")

        while True:
            for n in r.nodes:
                note("node", n.name, NODE_STATE.text(n.state), n.reason)
            note("rollout", r.id, ROLLOUT_STATE.text(r.state), r.reason)
            if ROLLOUT_STATE.text(r.state) in ENDS:
                out.print(render_rollout(r))
                return
            time.sleep(interval)
            r = newest() or r
    with Live(render_rollout(r), console=out, refresh_per_second=4) as live:
        while ROLLOUT_STATE.text(r.state) not in ENDS:
            time.sleep(interval)
            r = newest() or r
            live.update(render_rollout(r))
