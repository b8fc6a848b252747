"""``tlsroll plan`` and ``tlsroll rollout …``: the seed's switch dialog.

``plan`` is the dry run (changes nothing; exit 1 if the leader would refuse to start it: a
node on http only for a change that starts from https). ``rollout start`` without ``--yes``
shows the plan and the seed's warnings and asks; with ``--yes`` it prints the warnings once
started (the seed's dialog gives them first). ``tlsroll schema show`` (read-only; ``--watch``
follows a rollout live until it ends) is in ``leader.cli.schema_cmd``, which also draws a
rollout for ``rollout status``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from leader.cli.base import (
    EXIT_INTERRUPTED,
    CLIError,
    Leader,
    ask_first,
    emit_json,
    fetch_schema,
    parse_duration,
    pass_leader,
    rollout_id_param,
    say,
    to_dict,
    while_away,
)
from leader.cli.draw import render_rollout
from leader.cli.password import (
    judge_with_names,
    kdf_hook,
    node_names,
    obtain_password,
    replaces_text,
    shown_password_fate,
    staged_text,
    verifier_json,
)
from leader.cli.plain import emit, screen
from leader.cli.schema_cmd import AWAITING, ENDS, TERMINAL
from leader.plan_texts import FINALIZE_WARNINGS, REPLACES_OTHER, START_REFUSED_AFTER, plan_texts
from leader.rollout_core import (
    BLOCKED,
    BLOCKED_HTTP,
    LEFT_DUAL,
    TAKEN_BACK_FROM,
    Change,
    FreezeMode,
    NodeState,
    RolloutAction,
    RolloutState,
    ScopeKind,
    Strategy,
    blocked_too_old,
    completed_failed_note,
    cut_off,
    left_as_is,
    left_out,
    left_way_on,
    nodes_remove,
    not_on_https_refusal,
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
from tlsroll.cli import PathParam, terminal_only
from tlsroll.v1 import admin_pb2, schema_pb2

NEEDS_ATTENTION = NodeState.NEEDS_ATTENTION.value
REMOVED_SINCE = "left out: removed since (tlsroll nodes remove)"
"""After a node's name: a retry or a way back of a named rollout left it out (s50retry)."""
SKIPPED = NodeState.SKIPPED.value
PENDING = NodeState.PENDING.value
EXIT_STOPPED = 3  # rollout status: halted or aborted
EXIT_NEEDS_ATTENTION = 4  # rollout status: a node is in no known good state
EXIT_COMPLETED_FAILED = 7  # rollout status: completed without every node (see rollout_status)
# A weak --password-file's way out (``obtain_password``): `rollout start` makes one itself.
GENERATED_INSTEAD = (
    "or leave --password-file out on a terminal: a password is then generated and shown once"
)


class ChangeChoice(click.Choice):  # type: ignore[type-arg]
    """``--change`` of ``plan`` and ``rollout start``: disable-tls, which README and ``notify
    --change`` name, is not started here; the refusal says what starts it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "disable-tls":
            self.fail(
                "the way back to http (disable-tls) is `tlsroll rollout rollback`, which shows "
                "its plan and asks; it is no --change here",
                param,
                ctx,
            )
        return super().convert(value, param, ctx)


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
        type=ChangeChoice(["enable-tls", "change-password", "rotate-cert"]),
        default="enable-tls",
        show_default=True,
        help="enable-tls: the switch to https; change-password: apply a staged password; "
        "rotate-cert: a new server key and certificate on nodes already on https. (The way "
        "back to http: tlsroll rollout rollback.)",
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
        type=PathParam(path_type=Path, file_okay=False, exists=True),
        help="enable-tls, rotate-cert: the practice's own certificates instead of the cluster "
        "CA's: DIR/ca.crt (the practice CA), DIR/<node>.crt (certificate, then intermediates) "
        "and DIR/<node>.key (0600) for every node in scope; all checked before any node is "
        "touched.",
    )(f)
    f = click.option("--nodes", help="Comma-separated node names (scope 'nodes').")(f)
    f = click.option(
        "--scope",
        type=click.Choice(["local", "cluster", "nodes"]),
        help="local = the leader node (the one this command runs on: node_name in "
        "leader.toml); cluster = every enrolled node; nodes = those of --nodes.",
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
    socket to the leader, which keeps them in memory only until each node has its own. A file
    there that cannot be read goes as empty, with why (``unreadable``): the leader, which
    alone knows the nodes the rollout touches, reports it if it is needed, and ignores it if
    not (review s48rev3: the CLI refused a cluster-wide plan for a file of a node outside it;
    before, s47rtin L3, the leader said "missing").

    ``leader.byo`` reads certificates with cryptography: some 60 ms of imports that only
    ``--cert-dir`` needs, not every ``rollout`` command and ``plan`` (session 66)."""
    from leader import byo  # noqa: PLC0415

    try:
        material = byo.read_cert_dir(directory)
    except OSError as exc:
        raise CLIError(f"--cert-dir {directory}: cannot read it ({exc.strerror or exc})") from None
    message = admin_pb2.CertDir(
        ca_pem=material.ca_pem, unreadable=material.unreadable, directory=str(directory)
    )
    for item in material.nodes.values():
        node = message.nodes.add(
            node=item.node, chain_pem=item.chain_pem, private_key_pem=item.key_pem
        )
        if item.key_mode is not None:
            node.key_file_mode = item.key_mode
    return message


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
    """Dry run: the update schema a rollout would make. It comes from what each node runs now
    (nodes already in the wanted state show "already done"), with its checks and what clients
    must do. With
    --strategy transitional: both phases. With --cert-dir the certificates are checked too, and
    any problem refuses the plan. Exit 1, after showing it, if a start would be refused now (a
    rollout has not ended: one at a time; the leader's own disk short of room or its store
    failing; enable-tls while the auth password in use cannot be confirmed, where a start
    without --password-file is refused too) or a node is "blocked:
    <why>": a start would be refused (a node on http only for rotate-cert or
    change-password; one whose agent's preflight checks found problems, a port taken, …,
    among the first --max-parallel nodes it steps) or would stop at that node (further on)."""
    request = rollout_request(scope, nodes, max_parallel, freeze, change, failure_budget, strategy)
    if cert_dir is not None:
        request.cert_dir.CopyFrom(cert_dir_message(cert_dir))
    with leader.admin() as admin:
        reply = leader.call(admin.PlanRollout, request)
    # Exit 1 when a start of this plan is refused now (a rollout has not ended: brief s39pw)
    # or is refused or would stop at a node (blocked): every reason in one line on stderr,
    # which alone says that nothing was changed (s44: only the busy one was given, and both
    # streams said it).
    reasons = []
    if reply.busy.endswith(START_REFUSED_AFTER):  # the leader's disk (it says until when)
        reasons.append(reply.busy)
    elif reply.busy:
        reasons.append(f"{reply.busy}; a start of this plan is refused until it has ended")
    if refused_for_password(reply):  # (a plan brings no password: as a start without one)
        reasons.append(f"{reply.password_doubt}; a start of this plan is refused")
    if blocked := blocked_text(reply):
        reasons.append(blocked)
    if as_json:
        emit_json(to_dict(reply))
    else:
        show_plan(reply, nothing_changed=not reasons)
    if reasons:
        raise CLIError("; ".join(reasons) + "; nothing was changed")


def refused_for_password(reply: admin_pb2.PlanResponse) -> bool:
    """Whether the leader refuses any start of the plan ``reply`` because the auth password in
    use cannot be confirmed (``password_doubt``): nodes run one it does not know, or none is
    known in use (a start would make a new one). Not for nodes recorded on one that cannot be
    asked while a version is known: a start without ``--password-file`` gives them that one
    (session 64's closing notes: `plan` exited 0 whatever the doubt)."""
    return bool(reply.password_doubt) and (
        reply.password_doubt_refuses or not reply.password_version_in_use
    )


def applies_text(staged: admin_pb2.StagedPassword) -> str:
    """ "6, staged by X at T": the staged password version a change-password start applies."""
    return f"{staged.version}, {staged_text(staged)}"


def blocked_text(reply: admin_pb2.PlanResponse) -> str:
    """What ``plan`` refuses for (exit 1) naming every node of the plan that is ``blocked:
    <why>`` (``BLOCKED``), with its why: whatever it is, the change cannot get past that node
    (audit s38 M5; brief s39: a node whose port 8443 was taken gave exit 0, and the start then
    halted there). "" when none is."""
    blocked = [n for n in reply.rollout.nodes if n.reason.startswith(BLOCKED)]
    if not blocked:
        return ""
    from leader.planner import MAX_NAMED  # noqa: PLC0415 - the planner, for a refusal only

    named = [f"{n.name} ({n.reason.removeprefix(BLOCKED).strip()})" for n in blocked]
    more = len(named) - MAX_NAMED
    shown = ", ".join(named[:MAX_NAMED]) + (f" and {more} more (listed above)" if more > 0 else "")
    change = CHANGE.text(reply.rollout.change)
    them = "it" if len(blocked) == 1 else "them"
    return f"{change} is blocked on {shown}: fix that, or leave {them} out (--nodes)"


def refuse_not_on_https(reply: admin_pb2.PlanResponse) -> None:
    """CLIError (exit 1) if the plan has nodes on http only that its change starts from https
    on (``BLOCKED_HTTP``): the leader refuses to start it (audit s38 M5), so the start says so
    before anything is asked; so are nodes whose agents are too old for it (``blocked_too_old``).
    A node blocked by its preflight checks is refused by ``refuse_blocked_at_once`` if the
    start preflights it at once; further on, the start runs, and stops at that node unless its
    problems are fixed meanwhile."""
    blocked = [n.name for n in reply.rollout.nodes if n.reason == BLOCKED_HTTP]
    if blocked:
        change = CHANGE.text(reply.rollout.change)
        raise CLIError(not_on_https_refusal(change, ", ".join(blocked), len(blocked)))
    old = [n for n in reply.rollout.nodes if blocked_too_old(n.reason)]
    if old:  # the leader refuses it too (``planner.AgentsTooOld``)
        from leader.planner import MAX_NAMED  # noqa: PLC0415 - the planner, for a refusal only

        change = CHANGE.text(reply.rollout.change)
        named = [f"{n.name} ({n.reason.removeprefix(BLOCKED).strip()})" for n in old]
        more = len(named) - MAX_NAMED
        shown = ", ".join(named[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")
        them = "it" if len(old) == 1 else "them"
        raise CLIError(
            f"{change} cannot start: {shown} (or leave {them} out: --nodes); nothing was changed"
        )


def refuse_blocked_at_once(reply: admin_pb2.PlanResponse) -> None:
    """CLIError (exit 1) if the plan says the start is refused as nodes it would preflight at
    once (its first --max-parallel stepped nodes and the leader's ``prepare_ahead`` after
    them) are blocked by their agents' checks, more of them than the failure budget takes
    (``PlanResponse.blocked_at_once``, the leader's ``planner.BlockedAtOnce``): the start
    would halt there at once, and the leader refuses it (brief s67 engine (a): a template
    missing was accepted, and halted; review s67 rev2 M3: so was a blocked second node,
    preflighted while the first switches). Before the plan is shown and the admin asked. The
    leader says it: only it knows its ``prepare_ahead``."""
    if reply.blocked_at_once:
        raise CLIError(reply.blocked_at_once)


# What a node that is neither done already nor blocked will go through, per change (a direct
# rollout; a transitional one says its two phases): only enable-tls switches the node to
# another scheme; the others keep it on https and restart its server.
WILL = {
    Change.ENABLE_TLS.value: "will switch",
    Change.ROTATE_CERT.value: "will get a new certificate and restart",
    Change.CHANGE_PASSWORD.value: "will get the staged password and restart",
    Change.DISABLE_TLS.value: "will go back to http",
}


def scope_text(r: schema_pb2.RolloutView) -> str:
    """A plan's scope in its head: "local" says which node that is (the leader node, the one
    the admin CLI runs on; review s69 revlocal2 L3: "scope local" named none)."""
    scope = SCOPE_KIND.text(r.scope)
    if scope != ScopeKind.LOCAL.value:
        return scope
    leader_node = next((n.name for n in r.nodes if n.leader_node), "")
    return f"local (the leader node{', ' + leader_node if leader_node else ''})"


def show_plan(reply: admin_pb2.PlanResponse, *, nothing_changed: bool = True) -> None:
    """The plan on stdout; ``nothing_changed``: ending with "Nothing has been changed." (not
    when the caller's refusal on stderr says it)."""
    r = reply.rollout
    transitional = STRATEGY.text(r.strategy) == Strategy.TRANSITIONAL.value
    say(
        f"Plan: change {CHANGE.text(r.change)} on scope {scope_text(r)}, "
        f"{len(r.nodes)} node(s) in this order, {r.max_parallel} at a time"
        + (", in two phases (strategy transitional):" if transitional else ":")
    )
    will = (
        " — phase 1: https beside http (dual); phase 2 (finalize): http closes"
        if transitional
        else f" — {WILL.get(CHANGE.text(r.change), 'will switch')}"
    )
    for i, n in enumerate(r.nodes, 1):
        shown = n.reason.startswith(("already done", BLOCKED))
        done = f" — {n.reason}" if shown else will
        if n.other_certificate and not shown:  # (its own certificate: review s70 drift L1)
            done += f"; {REPLACES_OTHER}"
        if n.still_on_http and not shown:  # (enable-tls only: the leader counts for it)
            done += f"; {n.still_on_http} workstation(s) still on http" + (
                "" if transitional else " lose the server then"
            )
        say(f"  {i}. {n.name}{' (leader node)' if n.leader_node else ''}{done}")
    if reply.password_version_in_use:
        say(
            f"Auth password: the one the nodes already use (version "
            f"{reply.password_version_in_use}); it is not replaced."
        )
    elif reply.HasField("replaces") and not reply.password_doubt:  # a new one over a staged one
        say(f"Auth password: a new one; it {replaces_text(reply.replaces)}.")
    if reply.password_doubt:  # (a new one is refused; where none is known, any start)
        say(f"Auth password: {reply.password_doubt}.")
    if reply.HasField("applies"):
        say(f"Auth password: applies password version {applies_text(reply.applies)}.")
    say("Checks and steps on each node:")
    for c in reply.checks:
        say(f"  - {c}")
    if reply.certificates:
        say("Certificates from --cert-dir (every check passed):")
        for line in reply.certificates:
            say(f"  - {line}")
    say("Important:")
    for w in reply.warnings:
        say(f"  ! {w}")
    say(
        "At every workstation, any time before finalize:"
        if transitional
        else "Afterwards, at every workstation:"
    )
    for s in reply.client_steps:
        say(f"  - {s}")
    if nothing_changed:
        say("Nothing has been changed.")


# --- rollout ----------------------------------------------------------------------------------


@click.group()
def rollout() -> None:
    """Start and steer the switch to https."""


@rollout.command("start", short_help="Start a rollout (shows its plan and asks, unless --yes).")
@scope_options
@click.option(
    "--password-file",
    type=PathParam(path_type=Path, dir_okay=False),
    help="enable-tls: the auth password workstations will need (the file's only line); "
    "without it a new one is generated and shown once, unless nodes already use one (then "
    "the others get that one too).",
)
@click.option(
    "--password-version",
    type=click.IntRange(1),
    help="change-password: the staged version you mean to apply (see `tlsroll password set`'s "
    "output); refused unless it is the newest staged one, which the rollout applies.",
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
    password_version: int | None,
    yes: bool,
    wait: bool,
) -> None:
    """Start the switch from http to https on the leader node (--scope local: the node this
    command runs on) or the whole multiserver (--scope cluster), or on named nodes (--nodes).

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
    if password_version is not None and change != "change-password":
        raise click.UsageError("--password-version goes with --change change-password")
    # The tests' scrypt hook, for the first password's verifier (``password set``'s rule):
    # set wrong, refused before anything is read or asked; set, said once started.
    weaker = kdf_hook() if change == "enable-tls" else None
    # A password file that is unusable or too weak fails before anything is asked or planned.
    secret = (
        obtain_password(password_file, generate=False, or_else=GENERATED_INSTEAD)
        if password_file
        else None
    )
    # A leader of other code would plan and start something else (it drops the request
    # fields it does not know): refused before the plan is shown and confirmed.
    leader.require_same_code()
    with leader.admin() as admin:
        # The dry run first: a bad scope or an offline node fails before anything is asked;
        # a rollout not ended, at once, before any agent is asked (review rev58a M2).
        dry_run = admin_pb2.RolloutRequest()
        dry_run.CopyFrom(request)
        dry_run.refuse_if_busy = True
        planned = leader.call(admin.PlanRollout, dry_run)
        if planned.busy:  # a rollout has not ended: before a password is made (audit s39 M1)
            raise CLIError(f"{planned.busy}; nothing was started")
        check_echo(request, planned)
        refuse_not_on_https(planned)  # before anything is asked (the leader refuses it too)
        refuse_blocked_at_once(planned)  # (so does the leader: ``planner.BlockedAtOnce``)
        if password_version is not None and password_version != planned.applies.version:
            raise CLIError(
                f"password version {password_version} is not the one a change-password "
                f"rollout applies now: that is version {applies_text(planned.applies)} "
                "(only the newest staged version is applied); nothing was started"
            )
        if change == "change-password":
            # The version confirmed (shown, or named): the leader refuses the start if
            # another admin stages one meanwhile (it applied that one: review s69 revrace).
            request.auth_version = planned.applies.version
        in_use = planned.password_version_in_use
        # A new password (the file's, or one generated below) while the leader cannot
        # confirm that none is in use, or a start without one that the doubt refuses too (no
        # version known in use, or nodes that run one the leader does not know:
        # ``refused_for_password``, as `plan` exits 1 for it); the leader refuses the rest
        # itself (``planner.decide_auth``).
        if planned.password_doubt and (secret is not None or refused_for_password(planned)):
            raise CLIError(f"{planned.password_doubt}; nothing was started")
        if in_use and secret is not None:
            raise CLIError(
                f"nodes already use auth password version {in_use}; the other nodes get the "
                "same one: leave out --password-file (to change it: tlsroll password set, "
                "then --change change-password)"
            )
        if secret is not None:  # the file's, weak once the nodes' names are known? (s69 left)
            judge_with_names(secret, node_names(leader, admin), GENERATED_INSTEAD)
        if not yes:
            show_plan(planned)
            ask_first(
                "review `tlsroll plan`, then add --yes", "Start the switch now?", "not started"
            )
            # What was confirmed is what starts: the leader refuses the start if its plan
            # steps other nodes by then (review s69 confirm L1).
            request.confirmed_nodes.extend(stepped(planned.rollout.nodes))
        generated = False
        if change == "enable-tls" and not in_use:
            if secret is None:  # generated now, after the confirmation, and shown once
                secret = obtain_password(
                    None, generate=True, leader=leader, ask_first=lambda: refuse_if_busy(leader)
                )
                generated = True
            request.auth_verifier_json = verifier_json(secret)
        # Refused after all (another admin's start came first): the password shown is not set.
        with shown_password_fate(generated, "whether the rollout started"):
            view = leader.call(admin.StartRollout, request)
    # With --yes the plan was not shown: its warnings are, now (the seed's dialog gives them
    # first; README and the demo start with --yes).
    started(view, in_use, planned.warnings if yes else (), planned)
    if weaker is not None and request.auth_verifier_json:  # (review s75 revpwkdf)
        click.echo(f"tlsroll: warning: {weaker}", err=True)
    if wait:
        wait_for_end(leader, view.id)


def stepped(nodes: Sequence[schema_pb2.NodeView]) -> list[str]:
    """The nodes a plan steps (not those already done, or left as is), in its order: those
    the admin is shown and confirms (``RolloutRequest.confirmed_nodes``)."""
    return [n.name for n in nodes if NODE_STATE.text(n.state) == PENDING]


def refuse_if_busy(leader: Leader) -> None:
    """CLIError if a rollout has not ended (one started while the plan waited for the admin's
    answer): asked again right before a password is generated, which the start would then
    refuse after showing it (audit s39 M1). The plan's ``busy`` said so before the question."""
    # One rollout at a time: an active one is the newest, or a transitional one awaiting
    # finalize just before its finalize.
    for r in fetch_schema(leader, limit=2, rollouts_only=True).rollouts:
        state = ROLLOUT_STATE.text(r.state)
        if state not in TERMINAL:
            raise CLIError(
                f"rollout {r.id} is {state.replace('_', ' ')}: it started while this one "
                "waited for your answer; one rollout at a time per cluster: nothing was "
                "started, and no password made"
            )


def check_echo(request: admin_pb2.RolloutRequest, planned: admin_pb2.PlanResponse) -> None:
    """CLIError unless the plan is what was asked for: a leader that does not know a request
    field drops it without a word, and would start something else (upgrade audit s35 F2: a
    transitional rollout asked of an older leader became a direct switch, closing http under
    the workstations)."""
    older = "it runs an older tlsroll (restart it after an upgrade); nothing was started"
    direct = STRATEGY.wire(Strategy.DIRECT)
    echoed = planned.rollout.strategy or direct  # unset: a leader without strategies
    if echoed != (request.strategy or direct):
        raise CLIError(
            f"the leader planned strategy {STRATEGY.text(echoed)}, not the "
            f"{STRATEGY.text(request.strategy)} asked for: {older}"
        )
    touched = [n for n in planned.rollout.nodes if NODE_STATE.text(n.state) != SKIPPED]
    if request.HasField("cert_dir") and touched and not planned.certificates:
        raise CLIError(
            "the leader's plan carries none of the --cert-dir certificates (it would make "
            f"its own): {older}"
        )


def started(
    view: schema_pb2.RolloutView,
    password_in_use: int = 0,
    warnings: Sequence[str] = (),
    planned: admin_pb2.PlanResponse | None = None,
    removed: Sequence[str] = (),
) -> None:
    """What a started rollout prints; ``removed``: the nodes a retry left out, removed since
    (the start's answer: ``RolloutView.removed_since``)."""
    skipped = [n for n in view.nodes if n.reason.startswith("already done")]
    say(
        f"rollout {view.id} started (epoch {view.epoch}); order: "
        f"{', '.join(n.name for n in view.nodes if n not in skipped)}"
    )
    for n in skipped:
        say(f"  {n.name}: {n.reason}")
    for name in removed:
        say(f"  {name} {REMOVED_SINCE}")
    if password_in_use:
        say(f"  the nodes get the auth password already in use (version {password_in_use})")
    if planned is not None:
        password_lines(view, planned)
    if warnings:
        say("Important:")
        for w in warnings:
            say(f"  ! {w}")
    say("follow it with: tlsroll schema show --watch")


def password_lines(view: schema_pb2.RolloutView, planned: admin_pb2.PlanResponse) -> None:
    """After a start: the staged password version a change-password rollout applies (who
    staged it, when), and the staged one an enable-tls rollout's new password supersedes
    (audit s39 H4: two admins each staged one; neither knew which went out)."""
    applies = planned.applies
    if applies.version and view.auth_version == applies.version:
        say(f"  applies password version {applies_text(applies)}")
    elif applies.version:  # (the start refuses a version staged since the plan: not seen)
        say(f"  applies password version {view.auth_version}")
    if planned.HasField("replaces") and view.auth_version != planned.replaces.version:
        say(f"  its new password (version {view.auth_version}) {replaces_text(planned.replaces)}")


def wait_for_end(leader: Leader, rollout_id: str, interval: float = 0.5) -> None:
    """Poll until the rollout ends, then exit as `rollout status` does; across a restart of
    the leader (``while_away``). Ctrl-C stops the waiting, not the rollout: one line says so
    and how to follow or stop it, exit 130 (``EXIT_INTERRUPTED``; not 0 as `schema show
    --watch` after Ctrl-C: here the exit code is the outcome, and there is none yet)."""
    try:
        while True:
            schema = while_away(
                lambda: fetch_schema(leader, rollout_id, rollouts_only=True), interval=interval
            )
            state = ROLLOUT_STATE.text(schema.rollouts[0].state)
            if state in ENDS:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo(
            f"tlsroll: stopped waiting; rollout {rollout_id} goes on (tlsroll rollout status "
            f"{rollout_id}; to stop it: tlsroll rollout abort {rollout_id})",
            err=True,
        )
        click.get_current_context().exit(EXIT_INTERRUPTED)
    click.get_current_context().invoke(rollout_status, rollout_id=rollout_id, as_json=False)


@rollout.command("retry", short_help="Try a halted or aborted rollout again.")
@click.argument("rollout_id", required=False, default="", callback=rollout_id_param)
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the new rollout ends; the exit code is its outcome.",
)
@click.option(
    "--yes",
    "_yes",
    is_flag=True,
    help="Accepted as by `rollout start`: retry never asks (it starts again what was confirmed"
    " once, with the same change).",
)
@pass_leader
def rollout_retry(leader: Leader, rollout_id: str, wait: bool, _yes: bool) -> None:
    """Try a halted or aborted rollout (default: the newest) again: its nodes that did not end
    `done` are planned again from what they run now and started as a new rollout, with the
    same change, options and password; a node removed since (`tlsroll nodes remove`) is left
    out, and named. It does not ask (it prints the change's warnings, as
    `rollout start --yes` does); --yes is taken, so that a script may give it to every
    command that starts a rollout."""
    # (--yes taken: review s48rev3)
    with leader.admin() as admin:
        view = leader.call(admin.RetryRollout, admin_pb2.RetryRolloutRequest(rollout_id=rollout_id))
    # The nodes the retry left out as its start answered (stored with it), not read back from
    # the schema after it: another start meanwhile made that another rollout (review rev50f).
    started(view, warnings=change_warnings(view), removed=view.removed_since)  # (as --yes)
    if wait:
        wait_for_end(leader, view.id)


def change_warnings(view: schema_pb2.RolloutView) -> list[str]:
    """The warnings a plan of ``view``'s change gives (``leader.plan_texts``, which the
    leader's plan sends): what `rollout retry` prints, which shows no plan (brief s39: it
    printed none of those `rollout start` prints). Not those that depend on the cluster's
    state now (workstations seen on http), which only a plan asks the leader for."""
    change = CHANGE.text(view.change)
    if not change:  # a leader of other code: a change this CLI does not know
        return []
    strategy = Strategy(STRATEGY.text(view.strategy) or Strategy.DIRECT.value)
    freeze = FreezeMode(FREEZE.text(view.freeze) or FreezeMode.NODE.value)
    return plan_texts(Change(change), strategy, freeze, own_certs=False)[2]


@rollout.command("rollback", short_help="The way back: every node on https back to http.")
@click.argument("rollout_id", required=False, default="", callback=rollout_id_param)
@click.option(
    "--max-parallel",
    type=click.IntRange(1, 200),
    default=1,
    show_default=True,
    help="How many nodes go back at the same time.",
)
@click.option("--yes", is_flag=True, help="Start without showing the plan and asking.")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the way back ends; the exit code is its outcome (as `rollout status`).",
)
@pass_leader
def rollout_rollback(
    leader: Leader, rollout_id: str, max_parallel: int, yes: bool, wait: bool
) -> None:
    """The way back: put every node that runs https now back on http, whichever rollout
    switched it (with ROLLOUT_ID: that enable-tls rollout's nodes only), the same safe way (a
    new rollout of change disable-tls). Once per rollout. --wait as for `rollout start`: a
    script learns the outcome from the exit code."""
    # (--wait: session 68, README walk: the way back alone of the commands that start a
    # rollout had none)
    request = admin_pb2.RolloutRequest(
        change=CHANGE.wire(Change.DISABLE_TLS),
        undo_rollout_id=rollout_id,
        max_parallel=max_parallel,
        freeze=FREEZE.wire(FreezeMode.NODE),
    )
    leader.require_same_code()  # before the plan is shown and confirmed (as rollout start)
    with leader.admin() as admin:
        # A rollout not ended (but a phase 1 awaiting finalize) refuses it at once, no agent
        # asked, as `rollout start`'s dry run does: it asked every agent first, and an agent
        # of the running rollout down mid-switch made it "cannot tell what it runs" (s67
        # engine2).
        dry_run = admin_pb2.RolloutRequest()
        dry_run.CopyFrom(request)
        dry_run.refuse_if_busy = True
        planned = leader.call(admin.PlanRollout, dry_run)
        if planned.busy:
            raise CLIError(f"{planned.busy}; nothing was started")
        if not yes:  # (the named rollout's nodes removed since, left out: as the plan says)
            going_back(
                planned.rollout.nodes,
                " (each: freeze writes, restore the http config, restart, verify, unfreeze).",
                planned.rollout.removed_since,
                planned.edited_configs,
                planned.warnings,
            )
            ask_first("add --yes to go back without asking", "Go back to http now?", "not started")
            # The nodes confirmed: the start resolves its scope again, and the leader refuses
            # it if its plan takes others back by then (another admin's enable-tls since, a
            # node enrolled or switched: review s69 confirm L1).
            request.confirmed_nodes.extend(stepped(planned.rollout.nodes))
        view = leader.call(admin.StartRollout, request)
    undoes = f", undoes {view.undoes}" if view.undoes else ""
    say(
        f"rollout {view.id} (disable-tls{undoes}) started; "
        "follow it with: tlsroll schema show --watch"
    )
    # The nodes the start left out, as it answered (it resolves the scope again: a node of
    # the named rollout removed since the plan is left out too; review rev50f L3; any other
    # change of the nodes confirmed refuses the start).
    removed = list(view.removed_since)
    if yes:  # (the plan was not shown: which nodes go back, and what the workstations must do)
        going_back(view.nodes, ".", removed, warnings=planned.warnings)
    elif removed != list(planned.rollout.removed_since):
        for name in removed:
            say(f"  {name} {REMOVED_SINCE}")
    if wait:
        wait_for_end(leader, view.id)


def going_back(
    nodes: Sequence[schema_pb2.NodeView],
    how: str,
    removed: Sequence[str] = (),
    edited: Sequence[str] = (),
    warnings: Sequence[str] = (),
) -> None:
    """Which nodes the way back puts on http (only those: review s45rt1 L1), then each other
    node with why it is not among them ("already on http", "offline: left as is: …"), the
    nodes of the rollout it takes back ``removed`` since, left out (s50retry), and a line for
    each node whose server config was ``edited`` since tlsroll wrote it (the plan's
    ``edited_configs``: the way back undoes those edits; review rev58a H2), then the plan's
    ``warnings``: whose workstations need the old address, and, for a way back of some nodes
    of an https cluster, that it is mixed afterwards (review s69 revlocal L2: "Every
    workstation must go back", said of one node's way back)."""
    skipped = [n for n in nodes if NODE_STATE.text(n.state) == SKIPPED]
    going = ", ".join(n.name for n in nodes if n not in skipped)
    say(f"Back to http: {going}{how}")
    # A node going back that its agent's checks block, with why (as the plan names it): its
    # preflight would fail, and the way back halt there (brief s67 engine (b): the prompt
    # named it among those going back, no more).
    for n in nodes:
        if NODE_STATE.text(n.state) != SKIPPED and n.reason.startswith(BLOCKED):
            say(f"  {n.name}: {n.reason} (the way back halts there unless it is fixed)")
    for n in skipped:
        on_http = n.reason.startswith("already done") and not left_as_is(n.reason)
        say(f"  {n.name}: {'already on http' if on_http else n.reason}")
    for name in removed:
        say(f"  {name} {REMOVED_SINCE}")
    for line in edited:
        say(f"  ! {line}")
    say(
        "  ! Every workstation of the nodes going back must go back to the old http address "
        "afterwards."
    )
    # The way back's warnings beyond its change's own (``plan_texts``): for some nodes of an
    # https cluster, that the others stay on https and the cluster is mixed afterwards.
    own = set(plan_texts(Change.DISABLE_TLS, Strategy.DIRECT, FreezeMode.NODE, False)[2])
    for line in warnings:
        if line not in own:
            say(f"  ! {line}")


@rollout.command("finalize", short_help="Phase 2 of a transitional rollout: close http.")
@click.argument("rollout_id", required=False, default="", callback=rollout_id_param)
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
    quiet = parse_duration(when_quiet, "--when-quiet") if when_quiet else 0
    if force and quiet:
        raise click.UsageError("--force and --when-quiet exclude each other")
    leader.require_same_code()  # before what happens is shown and confirmed (review s35 L1)
    if not yes:  # (before the leader is asked what it would do)
        terminal_only(FINALIZE_ASK)
    request = admin_pb2.FinalizeRolloutRequest(
        rollout_id=rollout_id, force=force, when_quiet_seconds=quiet
    )
    with leader.admin() as admin:
        if not yes:
            # What it would start on, and which nodes it leaves out (agents cut off: s48lost),
            # as the leader has them; nothing starts.
            check = admin_pb2.FinalizeRolloutRequest()
            check.CopyFrom(request)
            check.check_only = True
            plan = leader.call(admin.FinalizeRollout, check)
            _confirm_finalize(plan, (when_quiet or "") if quiet else "")
        view = leader.call(admin.FinalizeRollout, request)
    # The nodes whose agents are cut off (a machine lost or stolen) are left out, named apart.
    out_of_it = [n for n in view.nodes if left_out(n.reason)]
    say(finalize_started(view, (when_quiet or "") if quiet else ""))
    for n in out_of_it:
        say(f"  {n.name}: {n.reason}")
    if wait:
        wait_for_end(leader, view.id)


def finalize_started(view: schema_pb2.RolloutView, when_quiet: str) -> str:
    """The line a started finalize ``view`` prints: the nodes it closes http on; with every
    node left out (their agents cut off), that it closes http on none and only ends phase 1,
    leaving them on http and https (s50: it said "started on no node; follow it with ...")."""
    going = [n.name for n in view.nodes if not left_out(n.reason)]
    if not going:
        count = len(view.nodes)
        return (
            f"rollout {view.id} (finalize of {view.finalizes}) closes http on no node: every"
            f" node is left out, its agent cut off; it only ends phase 1, leaving {count}"
            f" node{'s' if count != 1 else ''} on http and https (see: tlsroll schema show)"
        )
    return (
        f"rollout {view.id} (finalize of {view.finalizes}) started on {', '.join(going)}"
        + (f"; each node waits until quiet for {when_quiet}" if when_quiet else "")
        + "; follow it with: tlsroll schema show --watch"
    )


def _confirm_finalize(plan: schema_pb2.RolloutView, when_quiet: str) -> None:
    """Show what the finalize ``plan`` (``check_only``) does, naming the nodes it closes http
    on and those it leaves out with why (their agents cut off), and ask."""
    how = (
        f"each node once no http client was seen on it for {when_quiet}"
        if when_quiet
        else "node by node now"
    )
    cut = [n for n in plan.nodes if left_out(n.reason)]
    going = [n.name for n in plan.nodes if n not in cut]
    if not going:  # every node left out: nothing closes, no workstation loses anything
        dual = f"{len(cut)} node{'s' if len(cut) != 1 else ''}"
        say(
            f"Finalize {plan.finalizes}: closes http on no node; it ends phase 1 leaving "
            f"{dual} dual (on http and https)."
        )
    else:
        say(
            f"Finalize {plan.finalizes}: close http (8080) on {', '.join(going)}, "
            f"{how} (each: freeze writes, https-only config, restart, verify 8080 closed and "
            "https live, unfreeze; else back to http+https)."
        )
    for n in cut:
        say(f"  Left out: {n.name}: {n.reason}")
    if going:
        say(f"  ! {FINALIZE_WARNINGS[-1]}")
    ask_first(FINALIZE_ASK, "Close http now?" if going else "Finalize now?", "not started")


FINALIZE_ASK = "add --yes to finalize without asking"


def _control(leader: Leader, action: RolloutAction, rollout_id: str) -> None:
    with leader.admin() as admin:
        view = leader.call(
            admin.ControlRollout,
            admin_pb2.ControlRolloutRequest(
                rollout_id=rollout_id, action=ROLLOUT_ACTION.wire(action)
            ),
        )
    say(f"rollout {view.id}: {ROLLOUT_STATE.text(view.state)}")


CONTROL_HELP = {
    RolloutAction.PAUSE: "No new node starts; nodes in flight finish.",
    RolloutAction.RESUME: "Carry on after a pause.",
    RolloutAction.ABORT: "Finish the node(s) in flight safely, then stop. Untouched nodes stay "
    "on http.",
}


def _control_command(action: RolloutAction) -> None:
    @rollout.command(action.value, help=CONTROL_HELP[action])
    @click.argument("rollout_id", required=False, default="", callback=rollout_id_param)
    @pass_leader
    def command(leader: Leader, rollout_id: str) -> None:
        _control(leader, action, rollout_id)


for _action in RolloutAction:  # rollout pause | resume | abort [ID]
    _control_command(_action)


def attention_line(nodes: Sequence[tuple[str, str]]) -> str:
    """What `rollout status` says of the nodes (name, reason) that need attention: neither
    switched nor back, to be fixed by hand; one whose agent was cut off during its switch (a
    machine lost or stolen: ``rollout_core.cut_off_mid_switch``) is not known to be either,
    and no one fixes a machine gone: it is removed (it said "fix the server by hand" of it
    too: s51)."""
    hand = [name for name, why in nodes if not cut_off(why)]
    lost = [name for name, why in nodes if cut_off(why)]
    parts = []
    if hand:
        parts.append(
            f"{', '.join(hand)} need(s) attention: neither on the new settings nor back on the"
            " old ones; see the reason above, fix the server by hand"
        )
    if lost:
        cut = (
            "its agent was cut off during its switch (certificate revoked), what it runs"
            if len(lost) == 1
            else "their agents were cut off during their switches (certificates revoked), what"
            " they run"
        )
        parts.append(
            f"{', '.join(lost)} need(s) attention: {cut} is not known (see the reason above):"
            f" {nodes_remove(sorted(lost))} once the rollout has ended"
        )
    return "; ".join(parts)


def _say_store_trouble(schema: schema_pb2.Schema) -> None:
    """One line on stderr if the leader cannot write its store (``store_trouble``)."""
    if schema.HasField("store_trouble"):
        trouble = schema.store_trouble
        since = trouble.since.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if trouble.writes_work:  # (its checkpoint's alone: review s73 revdisk)
            click.echo(
                f"tlsroll: the leader's store cannot grow since {since}: {trouble.problem};"
                " rollouts go on for now, until its writes fail (free space on the leader's"
                " disk)",
                err=True,
            )
            return
        click.echo(
            f"tlsroll: the leader cannot write its store since {since}: {trouble.problem}; "
            "no rollout moves until it can (free space on the leader's disk)",
            err=True,
        )


@rollout.command("status")
@click.argument("rollout_id", required=False, default="", callback=rollout_id_param)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def rollout_status(leader: Leader, rollout_id: str, as_json: bool) -> None:
    """The newest (or named) rollout and its nodes.

    Exit codes: 0 running, paused or completed; 3 halted or aborted (every node that did not
    finish is back where it was); 4 a node needs attention (neither switched nor back: see its
    reason); 7 completed without every node: nodes failed within its failure budget (back
    where they were), left as is by a way back (not known to be on http) or left out by a
    finalize (still on http and https): see their reasons; 1 and 2 as for every command.
    """
    schema = fetch_schema(leader, rollout_id, limit=1, rollouts_only=True)
    if not schema.rollouts:
        # (the store's trouble first: README says `rollout status` tells it, rollout or none;
        # review s64 store L2)
        _say_store_trouble(schema)
        raise CLIError("no rollout yet; start one with: tlsroll rollout start --scope …")
    r = schema.rollouts[0]
    if as_json:
        emit_json(to_dict(r))
    else:
        counted = {  # (``draw.counted_nodes`` of the messages: no JSON made of them)
            v.node
            for v in schema.node_clients
            if v.clients.source and not v.clients.problem and not v.awaiting_report
        }
        emit(render_rollout(to_dict(r), screen(), counted))  # (a narrow terminal: fewer columns)
    _say_store_trouble(schema)
    attention = [n for n in r.nodes if NODE_STATE.text(n.state) == NEEDS_ATTENTION]
    if attention:
        others = (
            "; to take the other nodes back meanwhile: see the rollout's note above"
            if CHANGE.text(r.change) == Change.DISABLE_TLS.value
            and ROLLOUT_STATE.text(r.state) == RolloutState.HALTED.value
            else ""
        )
        click.echo(
            f"tlsroll: {attention_line([(n.name, n.reason) for n in attention])}{others}",
            err=True,
        )
        click.get_current_context().exit(EXIT_NEEDS_ATTENTION)
    if ROLLOUT_STATE.text(r.state) == RolloutState.ABORTED.value and f" {LEFT_DUAL}: " in r.reason:
        # A phase 1 taken back by a way back that left a node dual: a retry would not take
        # that node back; the note says what does (review s45rev9 M1).
        click.echo(
            f"tlsroll: rollout {r.id} aborted: taken back, but not every node is back on http: "
            f"{r.reason.split('; ', 1)[1]}",
            err=True,
        )
        click.get_current_context().exit(EXIT_STOPPED)
    if ROLLOUT_STATE.text(r.state) in (RolloutState.HALTED.value, RolloutState.ABORTED.value):
        # The way back only if it has a node to take back (``TAKEN_BACK_FROM``): else `rollout
        # rollback` refuses, "switched no node; nothing to undo" (review s63 faults, L1).
        switched = {s.value for s in TAKEN_BACK_FROM}
        back = (
            " (or go back to http: tlsroll rollout rollback)"
            if CHANGE.text(r.change) == (Change.ENABLE_TLS.value)
            and any(NODE_STATE.text(n.state) in switched for n in r.nodes)
            else ""
        )
        if CHANGE.text(r.change) == Change.DISABLE_TLS.value:
            back = " (a node that failed it would fail it again: see the note above)"
        click.echo(
            f"tlsroll: rollout {r.id} {ROLLOUT_STATE.text(r.state)}; to finish the nodes it left: "
            f"tlsroll rollout retry {r.id}{back}",
            err=True,
        )
        click.get_current_context().exit(EXIT_STOPPED)
    # The nodes the view names (``RolloutView.left_as_is``: skipped ones, the heading's rule);
    # a leader of the release before sends none: then by their reasons (review s46rev3 L3).
    left = list(r.left_as_is) or [n.name for n in r.nodes if left_as_is(n.reason)]
    completed = ROLLOUT_STATE.text(r.state) == RolloutState.COMPLETED.value
    # Completed without every node (left as is, left out, failed within the budget): exit 7,
    # for a script's `rollback --wait && …` to tell it from "all back" (session 75: exit 0).
    short = False
    if left and completed:
        # Not every node is on http: say so beside "completed" (review s45rt1 H1).
        reasons = {n.name: n.reason for n in r.nodes if n.name in left}
        if all(w.startswith("offline: ") for w in reasons.values()):
            then = (
                "run tlsroll rollout rollback again once "
                f"{'its agent is' if len(left) == 1 else 'their agents are'} back"
            )
        else:  # "once its agent is back" only of an agent that is off (review s45rev9 L1)
            then = "; ".join(f"{n}: {left_way_on(w)}" for n, w in reasons.items())
        click.echo(
            f"tlsroll: rollout {r.id} left {', '.join(left)} as is (not known to be on http: "
            f"see the reason above); {then}",
            err=True,
        )
        short = True
    cut = [n.name for n in r.nodes if left_out(n.reason)]
    if completed and (cut or f" {LEFT_DUAL}: " in r.reason):
        # A finalize that left out nodes whose agents are cut off, or the phase 1 it ended:
        # not every node is https-only (they stay dual until removed).
        dual = [p.split(f" {LEFT_DUAL}: ")[0] for p in r.reason.split("; ") if LEFT_DUAL in p]
        which = cut or dual
        click.echo(
            f"tlsroll: rollout {r.id} completed without {', '.join(which)}: left out, its agent"
            " cut off (revoked); it still serves http and https; once the rollout has ended,"
            f" tlsroll nodes remove {which[0] if len(which) == 1 else 'NAME'} revokes its"
            " server's certificate",
            err=True,
        )
        short = True
    if ROLLOUT_STATE.text(r.state) == AWAITING:
        # A finalize of it that runs, waits for quiet (--when-quiet: days, by design) or ended
        # part way has closed http on the nodes it is done with (session 64's review M2': this
        # said every node serves both).
        closed = sorted(
            {
                n.name
                for f in fetch_schema(leader, rollouts_only=True).rollouts
                if f.finalizes == r.id
                for n in f.nodes
                if NODE_STATE.text(n.state) == NodeState.DONE.value
            }
        )
        dual = [n.name for n in r.nodes if NODE_STATE.text(n.state) == NodeState.DUAL.value]
        dual = sorted(name for name in dual if name not in closed)
        if closed:
            serve = (
                f"{', '.join(closed)} serve(s) https only (http closed by its finalize), "
                f"{', '.join(dual) or 'no node'} http and https"
            )
        else:
            serve = "its nodes serve http and https"
        click.echo(
            f"tlsroll: rollout {r.id} awaits finalize: {serve}; who is still on http: tlsroll "
            f"schema show; then: tlsroll rollout finalize {r.id}",
            err=True,
        )
    if completed:
        # Completed, but with nodes failed within its failure budget (back where they were):
        # said, exit 7; before, every node failed read "completed", exit 0 (brief s67 budget).
        # From the nodes, not the note: a leader of an earlier release wrote none.
        outcomes = [(n.name, NODE_STATE.text(n.state), n.reason) for n in r.nodes]
        failed = completed_failed_note(Change(CHANGE.text(r.change)), r.failure_budget, outcomes)
        if failed:
            click.echo(f"tlsroll: rollout {r.id} {failed}", err=True)
            short = True
    if short:
        click.get_current_context().exit(EXIT_COMPLETED_FAILED)
