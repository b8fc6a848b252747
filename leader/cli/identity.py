"""``tlsroll nodes``, ``tlsroll workstations`` and ``tlsroll epoch``: who belongs to the cluster.

tlsroll nodes [--all] [--json]          enrolled nodes (with --all, removed ones too)
tlsroll nodes --check [--json]          each node's agent asked for its gRPC health
tlsroll nodes remove NAME --yes         revoke everything issued to NAME, free its names
tlsroll workstations list [--json]      workstation certificates and the node that asked
tlsroll workstations revoke NAME|SERIAL revoke a workstation's certificates (or one serial)
tlsroll epoch show [--json]             the leader's epoch and what each node has seen
tlsroll epoch advance --yes             move the leader past every epoch a node reports
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from leader.cli.base import (
    Leader,
    ask_first,
    emit_json,
    fail,
    fetch_schema_json,
    fmt_time,
    free_text_param,
    not_a_secret,
    out,
    pass_leader,
    print_fitted,
    refuse_unfit_serial,
    say,
    say_still_taken,
    to_dict,
)
from leader.layout import Layout
from leader.skew import signed_seconds
from leader.states import Health
from leader.wire import NODE_HEALTH
from tlsroll import peertext
from tlsroll.cli import Target
from tlsroll.defaults import DEFAULT_DATA_DIR
from tlsroll.echo import shown
from tlsroll.enums import NEEDS_ADMIN
from tlsroll.v1 import admin_pb2, schema_pb2

if TYPE_CHECKING:
    from rich.text import Text

# rich's tables and texts (some 25 ms of imports) are imported where a table is drawn, and the
# words of ``leader.mixed_cluster`` where a mixed cluster is named: `nodes --json`, `nodes remove`,
# `workstations revoke` and `epoch advance` never draw one (session 66).

# What the server column shows in red: a server down, or a node that needs the admin.
_ALARMING = ("down", NEEDS_ADMIN)


@click.group(invoke_without_command=True)
@click.option("--all", "include_removed", is_flag=True, help="Also list removed nodes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--check",
    is_flag=True,
    help="Ask each node's agent for its gRPC health (the leader dials them): SERVING, "
    "NOT_SERVING or UNREACHABLE per node; exit 1 unless every node is SERVING.",
)
@click.option(
    "--timeout",
    default=5,
    show_default=True,
    type=click.IntRange(1, 60),
    help="With --check: seconds to wait for each node.",
)
@click.pass_context
def nodes(
    ctx: click.Context, include_removed: bool, as_json: bool, check: bool, timeout: int
) -> None:
    """List enrolled nodes; check them; or remove one.

    Each is online or offline by its heartbeat, with its clock against the leader's (from its
    heartbeats)."""
    if ctx.invoked_subcommand is not None:
        return
    target = ctx.find_object(Target) or Target(DEFAULT_DATA_DIR, None)
    leader = Leader(target.socket or Layout(target.data_dir).admin_socket)
    if check:
        if include_removed:
            raise click.UsageError("--check asks enrolled nodes only; leave out --all")
        _check_nodes(ctx, leader, as_json, timeout)
        return
    with leader.admin() as admin:
        reply = leader.call(
            admin.ListNodes, admin_pb2.ListNodesRequest(include_removed=include_removed)
        )
    if as_json:
        emit_json([to_dict(n) for n in reply.nodes])
        return
    if not reply.nodes:  # an empty table said nothing of the way on (session 68, README walk)
        say(
            "no nodes enrolled"
            + ("" if include_removed else " (--all lists removed ones)")
            + "; enrol one with a join script: tlsroll token create --node NAME --address IP"
            ' --print-join-command (README, "On real servers", step 7)'
        )
        return
    from rich.text import Text  # noqa: PLC0415 - see above

    headers = [
        "node",
        "addresses",
        "state",
        "clock",
        "server",
        "agent",
        "last heartbeat",
        "cert expires",
        "renewal",
    ]
    rows: list[list[Text]] = []
    for n in reply.nodes:
        if n.HasField("removed_at"):
            state = Text(f"removed {fmt_time(n, 'removed_at')}", style="dim")
        else:
            state = Text("online", style="green") if n.online else Text("offline", style="red")
        rows.append(
            [
                Text(n.name),
                Text(", ".join(n.addresses)),
                state,
                _clock(n),
                Text(n.server or "-", style="red" if n.server.startswith(_ALARMING) else ""),
                _agent(n),
                Text(fmt_time(n, "last_heartbeat")),
                Text(fmt_time(n, "cert_not_after")),
                _renewal(n),
            ]
        )
    # (at 80 columns rich cut every cell to a few letters: "praxi…", "127.1…")
    print_fitted(headers, rows, NODES_DROPS, whole=("node", "addresses"))
    for n in reply.nodes:  # (what its agent says of its own store: session 74)
        if n.store_trouble and not n.HasField("removed_at"):
            trouble = "; ".join(peertext.clean(t, 600) for t in n.store_trouble)
            say(f"{n.name}: its agent cannot write its store safely: {trouble}", style="red")
    if mixed := _mixed_schemes(reply.nodes, leader):
        say(mixed, style="yellow")
    if reply.HasField("password_behind"):  # (a change-password that ended part way: s69)
        say(_password_behind(reply.password_behind), style="yellow")


NODES_DROPS = ("last heartbeat", "cert expires", "renewal", "agent", "clock")
"""The columns of `tlsroll nodes` a narrow terminal goes without, the first first: the times
(online says the heartbeats are recent; `certs check-expiration` has each certificate's end),
then, unless a cell of theirs is in red (a renewal failing, an agent too old, a clock off),
the renewal's due time, the agent's version and the clock."""


def _password_behind(behind: schema_pb2.PasswordBehindView) -> str:
    """The line naming the nodes whose live auth password is older than the newest staged
    one, in the words of `schema show` and the viewer (``draw.password_behind_words``)."""
    from leader.cli.draw import password_behind_words  # noqa: PLC0415 - see above

    newest, nodes, then = password_behind_words(to_dict(behind))
    return f"{newest} not live on every node; still on an older one: {nodes}; {then}"


def _mixed_schemes(listed: Sequence[admin_pb2.NodeInfo], leader: Leader | None = None) -> str:
    """A line naming the enrolled nodes whose servers run http only while others run https
    (a node enrolled into a cluster already switched, or one a local switch left): nothing
    else says the cluster is mixed, and the staff at those servers' workstations were told of
    no switch (review s64 trans L5). "" if it is not; by the heartbeats' word (``server``),
    in the words `schema show` and the viewer use (``leader.mixed_cluster``). Nodes on http
    and https are named with the rollout that left them so, as the ``leader``'s rollouts say
    (asked only then)."""
    from leader.mixed_cluster import (  # noqa: PLC0415 - see above
        dual_left_by,
        mixed,
        mixed_line,
        other_certificate_line,
    )

    enrolled = [n for n in listed if not n.HasField("removed_at")]
    other = [n.name for n in enrolled if n.other_certificate]
    m = mixed({n.name: n.server for n in enrolled}, other)
    if m is None:
        return other_certificate_line(other) if other else ""
    left_by: dict[str, str] = {}
    if m.dual and leader is not None:
        rollouts = fetch_schema_json(leader, rollouts_only=True).get("rollouts", [])
        left_by = dual_left_by(m.dual, rollouts)
    return mixed_line(m, left_by)


def _clock(n: admin_pb2.NodeInfo) -> Text:
    """The node's clock less the leader's, from its heartbeats ("-": not known; to the nearest
    tenth, never within a limit it is beyond: ``leader.skew.shown_seconds``), red where the
    leader shows it as a node problem (``schema show``), and the leader's clock named first
    where the leader says it is the likelier one at fault (``clock_leader``: its own verdict,
    as on its node problem; this command works out nothing of its own, and a leader before the
    field blames no leader clock: review of s37, L7)."""
    from rich.text import Text  # noqa: PLC0415 - see above

    if not n.HasField("clock_offset_seconds"):
        return Text("-")
    offset = f"{signed_seconds(n.clock_offset_seconds)} s"
    if n.clock_differs:
        if n.clock_leader:
            return Text(f"{offset}: most nodes too: check the leader's clock", style="red")
        return Text(f"{offset}: fix NTP", style="red")
    return Text(offset)


def _agent(n: admin_pb2.NodeInfo) -> Text:
    """The agent's version, and in red what this leader can ask that it is too old for (the
    leader's own verdict, ``NodeInfo.agent_too_old_for``): a rollout of it blocks there. An
    agent the leader has not heard since it started (``agent_not_heard``) gets no verdict: the
    version is the store's, a former leader process's, and may be older than the agent."""
    from rich.text import Text  # noqa: PLC0415 - see above

    # Whatever an agent reported, printed without control characters (the leader cleans it
    # too; an older store may still hold raw text).
    version = peertext.clean(n.agent_version, 64)
    if n.agent_not_heard:
        return Text(f"{version or '?'}: not heard since the leader started", style="yellow")
    if not n.agent_too_old_for:
        return Text(version)
    return Text(f"{version}: too old for {', '.join(n.agent_too_old_for)}", style="red")


def _renewal(n: admin_pb2.NodeInfo) -> Text:
    """The agent's certificate renewal: failing (since when, why), or when it is due."""
    from rich.text import Text  # noqa: PLC0415 - see above

    if n.HasField("renewal_failing_since"):
        reason = peertext.clean(n.renewal_error, 200)
        since = fmt_time(n, "renewal_failing_since")
        return Text(f"renewal failing since {since}: {reason}", style="red")
    if n.HasField("renewal_due_at"):
        return Text(f"due {fmt_time(n, 'renewal_due_at')}")
    return Text("-")


def _check_nodes(ctx: click.Context, leader: Leader, as_json: bool, timeout: int) -> None:
    with leader.admin() as admin:
        reply = leader.call(
            admin.CheckNodes, admin_pb2.CheckNodesRequest(timeout_seconds=timeout), timeout + 30
        )
    if as_json:
        emit_json([to_dict(n) for n in reply.nodes])
    else:
        from rich.table import Table  # noqa: PLC0415 - see above
        from rich.text import Text  # noqa: PLC0415

        table = Table("node", "agent", "health", "detail")
        for n in reply.nodes:
            health = NODE_HEALTH.read(n.health, "health")
            style = "green" if health is Health.SERVING else "red"
            word = health.value.upper().replace("-", "_")
            table.add_row(n.name, n.target, Text(word, style=style), n.detail)
        if reply.nodes:
            out.print(table)
        else:
            out.print("no nodes enrolled")
    serving = NODE_HEALTH.wire(Health.SERVING)
    if any(n.health != serving for n in reply.nodes):
        ctx.exit(1)


@nodes.command("remove", short_help="Remove a node: revoke its certificates, free its name.")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do it without asking.")
@pass_leader
def nodes_remove(leader: Leader, name: str, yes: bool) -> None:
    """Remove a node: revoke its certificates (its agent's, its servers' and its workstations')
    and free its name and addresses for a new token. Its agent is refused from then on."""
    not_a_secret(name, "the node's name (tlsroll nodes lists them)")
    leader.require_same_code()  # before it is confirmed (exit 5; review s35 L1)
    if not yes:
        ask_first(
            "add --yes to remove it without asking",
            f"Remove node {shown(name)}? Its agent stops being accepted at once, and its "
            "certificates are revoked.",
            "not removed",
        )
    from leader.store_rules import join_again, token_command  # noqa: PLC0415 - this command's

    with leader.admin() as admin:
        reply = leader.call(admin.RemoveNode, admin_pb2.RemoveNodeRequest(name=name))
    node = reply.node
    # With a new key: the leader never enrols the removed node's key again, under any name
    # (review rev-enrol H1: a copy of it was the node again). With its DNS names too: a token
    # enrols only a node asking for exactly its names (review rev-enrol L2).
    command = token_command(node.name, tuple(node.addresses), tuple(node.dns_names))
    say(
        f"removed node {node.name}; revoked {len(reply.revoked_serials)} certificate(s). "
        "To enrol it again, with a new key (its old one is refused from now on): "
        + join_again(
            node.name,
            command,
            "systemctl enable --now tlsroll-agent",
            before="mv DATA/node.key DATA/node.key.removed",
        )
        + " (DATA: the agent's data_dir in agent.toml, /var/lib/tlsroll-agent by default; "
        "the agent makes a new key)"
    )
    # Its agent refuses workstation passwords once the leader refuses it (its next heartbeat),
    # but the machine still holds the password's verifier, which is as good as the password.
    say(
        f"On {reply.node.name}: stop tlsroll-agent (`systemctl disable --now tlsroll-agent`). "
        "If that machine is not trusted (lost, sold, compromised), it still holds what "
        "checks the auth password: stage a new one (`tlsroll password set`) and run "
        "`tlsroll rollout start --change change-password`."
    )


@click.group()
def workstations() -> None:
    """Workstations' certificates: list or revoke them.

    They are issued through the nodes' bootstrap services."""


@workstations.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def workstations_list(leader: Leader, as_json: bool) -> None:
    """List workstation certificates (revoked ones too)."""
    with leader.admin() as admin:
        reply = leader.call(admin.ListWorkstations, admin_pb2.ListWorkstationsRequest())
    if as_json:
        emit_json([to_dict(w) for w in reply.workstations])
        return
    from rich.text import Text  # noqa: PLC0415 - see above

    rows: list[list[Text]] = []
    for w in reply.workstations:
        # (renewed: `tlsroll client renew`; the row of the same name issued then replaces it)
        state = (
            Text(f"renewed {fmt_time(w, 'revoked_at')}", style="yellow")
            if w.HasField("revoked_at") and w.revoke_reason == "renewed"
            else Text(f"revoked {fmt_time(w, 'revoked_at')}", style="red")
            if w.HasField("revoked_at")
            else Text("valid", style="green")
        )
        rows.append(
            [
                *(Text(t) for t in (w.name, w.node, fmt_time(w, "issued_at"))),
                Text(fmt_time(w, "not_after")),
                state,
                Text(w.serial),
            ]
        )
    # (at 80 columns rich cut the names and the serial: `workstations revoke NAME` needs none)
    print_fitted(
        ["workstation", "node", "issued", "expires", "state", "serial"],
        rows,
        ("issued", "serial"),
        whole=("workstation", "node"),
    )


@workstations.command(
    "revoke", short_help="Revoke a workstation's certificates, by name or serial."
)
@click.argument("name_or_serial")
@click.option(
    "--reason",
    default="",
    callback=free_text_param,
    help="Why (kept in the audit trail; no secret: refused).",
)
@pass_leader
def workstations_revoke(leader: Leader, name_or_serial: str, reason: str) -> None:
    """Revoke every certificate of workstation NAME (ws-…), or one workstation certificate by
    SERIAL (hex, in full, as `workstations list` shows it; one the leader has no record of is
    refused, and so is another kind's: `tlsroll ca revoke SERIAL` revokes those). Agents
    learn of it with their next heartbeat; the managed servers read no revocation list, and a
    server that asks for client certificates takes it until its end (a note gives the date)."""
    refuse_unfit_serial(name_or_serial)
    with leader.admin() as admin:
        reply = leader.call(
            admin.RevokeCertificate,
            admin_pb2.RevokeCertificateRequest(
                name_or_serial=name_or_serial, reason=reason, workstations_only=True
            ),
        )
    out.print(f"revoked {', '.join(reply.revoked_serials)}")
    say_still_taken(reply)


@click.group()
def epoch() -> None:
    """Rollout epochs: the leader's and each node's.

    What the leader has given out and what each node has seen."""


def _print_epochs(info: admin_pb2.EpochInfo) -> None:
    from rich.table import Table  # noqa: PLC0415 - see above
    from rich.text import Text  # noqa: PLC0415

    out.print(f"leader epoch {info.leader_epoch}")
    table = Table("node", "highest epoch seen")
    for n in info.nodes:
        mark = Text(
            str(n.highest_epoch), style="red" if n.highest_epoch > info.leader_epoch else ""
        )
        table.add_row(n.name, mark)
    out.print(table)


@epoch.command("show", short_help="The leader's epoch and the highest each node reports.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_leader
def epoch_show(leader: Leader, as_json: bool) -> None:
    """The leader's epoch and the highest epoch each node reports; exit 1 if a node has seen
    a higher one (run `tlsroll epoch advance`)."""
    with leader.admin() as admin:
        info = leader.call(admin.GetEpoch, admin_pb2.GetEpochRequest())
    if as_json:
        emit_json(to_dict(info))
    else:
        _print_epochs(info)
    if info.behind:
        fail("a node has seen a higher epoch than the leader's: run `tlsroll epoch advance`")


@epoch.command("advance", short_help="Move the leader's epoch past every epoch a node reports.")
@click.option("--yes", is_flag=True, help="Do it without asking.")
@pass_leader
def epoch_advance(leader: Leader, yes: bool) -> None:
    """Move the leader's epoch past every epoch a node reports (after restoring the leader from
    a backup, or when a node refuses rollouts with "stale epoch"). Audited."""
    leader.require_same_code()  # before it is confirmed (exit 5; review s35 L1)
    if not yes:
        ask_first(
            "add --yes to advance it without asking",
            "Advance the leader's epoch past every node's?",
            "not advanced",
        )
    with leader.admin() as admin:
        info = leader.call(admin.AdvanceEpoch, admin_pb2.AdvanceEpochRequest())
    _print_epochs(info)
