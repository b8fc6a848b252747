"""The read-only schema: records → protobuf views, and the SchemaView servicer.

Nothing here writes: the servicer only reads the schema store (a test compares the store
before and after a call to prove it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc

from leader.mixed_cluster import NAMED, NEXT, mixed, rest_scope
from leader.planner import stale_reports
from leader.rollout_core import (
    CHANGES,
    TERMINAL_ROLLOUT_STATES,
    Change,
    Client,
    NodeRecord,
    NodeState,
    Rollout,
    RolloutState,
    before_after,
    left_as_is,
    left_out,
    left_out_reason,
    still_on_http,
)
from leader.schema_store import (
    BootstrapFailureRow,
    ClientsInfo,
    NodeDetail,
    PasswordBehind,
    RolloutHead,
    RolloutRow,
    SchemaStore,
)
from leader.states import LoginFailuresRow, NodeProblemRow
from leader.store import Store
from leader.wire import (
    CHANGE,
    FREEZE,
    NODE_PROBLEM_KIND,
    NODE_STATE,
    ROLLOUT_STATE,
    SCOPE_KIND,
    STRATEGY,
)
from tlsroll import echo, wire
from tlsroll.rpc import invalid, map_errors, not_found, timestamp
from tlsroll.sqlite import from_text
from tlsroll.v1 import schema_pb2, schema_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from leader.expiry import ExpiryWatch

Ctx = grpc.aio.ServicerContext[Any, Any]


FreshReports = Callable[[Mapping[str, ClientsInfo], dt.datetime], frozenset[str]]
"""Which nodes' stored client reports speak for now (``fresh_reports``, bound to the leader's
store and interval: ``leader.service.LeaderState.fresh_reports``)."""

Reported = Callable[[str], bool]
"""Whether a node's client report came to this leader since it started
(``leader.store.Store.report_since_start``): until then the leader waits for it
(``waiting_for``)."""

# Node views made before, by (id(record), id(detail)): the record, the detail (held, so that
# their ids stay theirs), what else the view shows, the view (``rollout_view``'s ``made``).
Made = dict[
    tuple[int, int], tuple[Any, Any, tuple[bool, bool, int, bool, bool], schema_pb2.NodeView]
]


COUNTS_ON_HTTP = frozenset({Change.ENABLE_TLS, Change.FINALIZE})
"""The changes whose nodes' views count the workstations still on http there
(``NodeView.still_on_http``, `schema show`'s "still on http" column): those that take http
away, where each is one who still needs the client steps (lose the server at the switch, or
at the finalize of a transitional rollout). A way back (disable-tls) takes nodes back to http,
and a password change or a new certificate keeps the address: a count there meant nothing
(session 68's README walk: a way back's node showed "1" still on http)."""


def rollout_view(
    row: RolloutRow | RolloutHead,
    pending: set[str] | None = None,
    on_http: Mapping[str, int] | None = None,
    made: tuple[Made, Made] | None = None,
    reported: Reported | None = None,
) -> schema_pb2.RolloutView:
    """The view of one rollout; ``pending`` names nodes with a staged, not yet live password,
    ``on_http`` counts the workstations still on http per node (shown only in a rollout of
    ``COUNTS_ON_HTTP``), ``reported``: whether a node's
    client report came since the leader started (``awaits_report``; None: not shown, as in
    the replies of the admin commands). A ``RolloutHead`` (a line of
    ``SchemaStore.listed``) has no nodes read: its view's ``nodes`` is empty. ``made``: (the
    node views made by the last call, where this call puts its own): a node whose record and
    detail are the same objects as then (the store keeps a rollout's unchanged ones) and whose
    password and http count are the same takes its view from there (the viewer's page reads
    a 500-node rollout again after each write of it: issue 15)."""
    r, meta = row.rollout, row.meta
    pins = dict(meta.own_ca_pins)
    if r.change not in COUNTS_ON_HTTP:
        on_http = None
    nodes = []
    for rec, d in row.nodes if isinstance(row, RolloutRow) else ():
        awaiting = reported is not None and awaits_report(r, meta.when_quiet, rec, reported)
        shown = (
            rec.name == meta.leader_node,
            rec.name in (pending or set()),
            (on_http or {}).get(rec.name, 0),
            awaiting,
            reported is not None and not awaiting and waits_until_quiet(r, meta.when_quiet, rec),
        )
        if made is not None:
            key = (id(rec), id(d))
            hit = made[0].get(key)
            if hit is not None and hit[0] is rec and hit[1] is d and hit[2] == shown:
                made[1][key] = hit
                nodes.append(hit[3])
                continue
        nodes.append(node_view(rec, d, shown, r.change, pins.get(rec.name, "")))
        if made is not None:
            made[1][(id(rec), id(d))] = (rec, d, shown, nodes[-1])
    return schema_pb2.RolloutView(
        id=r.id,
        change=CHANGE.wire(r.change),
        scope=SCOPE_KIND.wire(r.scope.kind),
        scope_nodes=list(r.scope.names),
        strategy=STRATEGY.wire(r.strategy),
        max_parallel=r.max_parallel,
        failure_budget=r.failure_budget,
        freeze=FREEZE.wire(r.freeze),
        epoch=r.epoch,
        state=ROLLOUT_STATE.wire(r.state),
        created_at=timestamp(meta.created_at),
        started_at=timestamp(meta.started_at),
        ended_at=timestamp(meta.ended_at),
        started_by=meta.started_by,
        nodes=nodes,
        reason=meta.reason,
        undoes=meta.undoes,
        finalizes=meta.finalizes,
        when_quiet_seconds=meta.when_quiet,
        auth_version=meta.auth_version,
        left_as_is=left_as_is_nodes(row.records) if isinstance(row, RolloutRow) else (),
        left_out=left_out_nodes(row.records) if isinstance(row, RolloutRow) else (),
        removed_since=meta.removed_since,
        own_certificates=meta.own_certificates,
    )


def left_as_is_nodes(records: Iterable[NodeRecord]) -> list[str]:
    """The nodes of a rollout (its ``records``) that its way back (disable-tls) left as is:
    skipped, and not on http already (``rollout_core.left_as_is``). A completed way back with
    one is not back on http everywhere: ``RolloutView.left_as_is``, which `schema show` and the
    viewer show beside the state (review s45rev9 L3)."""
    return [r.name for r in records if r.state is NodeState.SKIPPED and left_as_is(r.reason)]


def left_out_nodes(records: Iterable[NodeRecord]) -> list[str]:
    """The nodes of a rollout (its ``records``) that its finalize left out: skipped, their
    agents cut off (``rollout_core.left_out``). A completed finalize with one did not close
    http everywhere: ``RolloutView.left_out``, which `schema show` and the viewer show beside
    the state, as they show a way back's ``left_as_is`` (review s48rev5 L3)."""
    return [r.name for r in records if r.state is NodeState.SKIPPED and left_out(r.reason)]


def finalize_preview(
    finalizes: str, names: Sequence[str], cut_off: Collection[str], when_quiet: int = 0
) -> schema_pb2.RolloutView:
    """A finalize of rollout ``finalizes`` as it would start over ``names`` (the nodes phase
    1 left dual), before its agents are asked: each of ``cut_off`` (agents cut off) skipped
    with the left-out reason, the others pending (``FinalizeRolloutRequest.check_only``: the
    CLI's confirmation names the nodes it leaves out)."""
    out = [n for n in names if n in cut_off]
    return schema_pb2.RolloutView(
        change=CHANGE.wire(Change.FINALIZE),
        state=ROLLOUT_STATE.wire(RolloutState.PLANNED),
        finalizes=finalizes,
        when_quiet_seconds=when_quiet,
        nodes=[
            schema_pb2.NodeView(
                name=n,
                state=NODE_STATE.wire(NodeState.SKIPPED if n in out else NodeState.PENDING),
                reason=left_out_reason(n) if n in out else "",
            )
            for n in names
        ],
        left_out=out,
    )


def node_view(
    rec: NodeRecord,
    d: NodeDetail,
    shown: tuple[bool, bool, int, bool, bool],
    change: Change,
    ca_pin: str = "",
) -> schema_pb2.NodeView:
    """One node's view: its record, its detail and (whether it is the leader's node, whether
    its password is pending, how many workstations are still on http, whether the leader
    waits for its client report: ``awaits_report``, whether it waits for quiet on http:
    ``waits_until_quiet``), in a rollout of ``change``: its old and
    new address are the ones before and after that change (``rollout_core.before_after``).
    ``ca_pin``: the practice CA of the certificate a ``--cert-dir`` rollout gives it."""
    old_url, new_url = before_after(change, d.old_url, d.new_url)
    steps = [
        schema_pb2.StepTimes(
            step=step,
            started_at=timestamp(dt.datetime.fromisoformat(a)) if a else None,
            ended_at=timestamp(dt.datetime.fromisoformat(b)) if b else None,
        )
        for step, (a, b) in d.steps.items()
    ]
    return schema_pb2.NodeView(
        name=rec.name,
        state=NODE_STATE.wire(rec.state),
        reason=rec.reason,
        old_url=old_url,
        new_url=new_url,
        cert_fingerprint=d.cert_fingerprint,
        cert_not_after=timestamp(d.cert_not_after),
        freeze_started_at=timestamp(d.freeze_started_at),
        freeze_ended_at=timestamp(d.freeze_ended_at),
        restart_seconds=d.restart_seconds,
        freeze_seconds=d.freeze_window,
        steps=steps,
        leader_node=shown[0],
        bootstrap_port=d.bootstrap_port,
        password_pending=shown[1],
        still_on_http=shown[2],
        awaiting_report=shown[3],
        waits_until_quiet=shown[4],
        ca_pin=ca_pin,
    )


def awaits_report(rollout: Rollout, when_quiet: int, rec: NodeRecord, reported: Reported) -> bool:
    """Whether node ``rec`` of ``rollout`` (``when_quiet``: its ``RolloutMeta.when_quiet``)
    shows that the leader waits for its client report (``NodeView.awaiting_report``): none
    came to this leader since it started, or none ever (``reported``:
    ``Store.report_since_start``), where that wait decides something: a node left dual by a
    transitional phase 1 awaiting its finalize (a finalize refuses with ``waiting_for``'s
    words), and a pending node of a ``finalize --when-quiet`` not ended (held until the
    report comes). Nowhere else (review s45rev5 L1): a renewal, a password change, phase 1
    while it runs or a plain finalize once started wait for no client report, and an ended
    rollout's nodes for nothing (a removed node, in old rollouts, never reports again)."""
    waits = (rollout.state is RolloutState.AWAITING_FINALIZE and rec.state is NodeState.DUAL) or (
        rollout.change is Change.FINALIZE
        and when_quiet > 0
        and rollout.state not in TERMINAL_ROLLOUT_STATES
        and rec.state is NodeState.PENDING
    )
    return waits and not reported(rec.name)


def waits_until_quiet(rollout: Rollout, when_quiet: int, rec: NodeRecord) -> bool:
    """Whether node ``rec`` of ``rollout`` (``when_quiet``: its ``RolloutMeta.when_quiet``)
    is held by ``finalize --when-quiet`` (``NodeView.waits_until_quiet``): pending in such a
    rollout that runs or is paused; the engine switches it only once no workstation was seen
    on http there for that long (rev56f L1: ``schema show`` said so, the viewer did not). The
    caller leaves it out where ``awaits_report`` holds: that wait comes first and says so."""
    return (
        rollout.change is Change.FINALIZE
        and when_quiet > 0
        and rollout.state in (RolloutState.RUNNING, RolloutState.PAUSED)
        and rec.state is NodeState.PENDING
    )


def client_view(c: Client) -> types_pb2.ClientSeen:
    return types_pb2.ClientSeen(
        scheme=c.scheme,
        address=c.address,
        workstation=c.workstation,
        first_seen=timestamp(c.first_seen),
        last_seen=timestamp(c.last_seen),
        requests=c.requests,
    )


def still_on_http_now(
    clients: Sequence[Client],
    infos: Mapping[str, ClientsInfo],
    now: dt.datetime,
    fresh: Collection[str],
) -> list[Client]:
    """Who still needs the client steps: the http clients of nodes that reported, not seen on
    https since (``rollout_core.still_on_http``), each node's judged by its own report while
    that report is fresh (``fresh``: ``fresh_reports``), by the window its agent reports
    against now once it is not. The one rule of a finalize's refusal, the start's count
    of workstations on http, ``schema show``, ``notify`` and the viewer.

    A fresh report's stored sightings all count: they are what its agent listed, each seen
    within the agent's window as of the agent's view, and those it listed before that were
    seen within the window before the report came (``write_clients`` keeps no older one). A
    sighting's stored ``last_seen`` need not be its newest: a report that only moves it is no
    news and is stored only every ``service.clients_persist`` (up to ~29 s later at a 5 s
    interval), and the agent reuses its view of its server's clients for ``clients_refresh``.
    Judged against now, a workstation the agent's latest report still listed dropped out
    up to that long before the agent itself let go of it (a finalize then went ahead while
    it used http). The agent drops a workstation its window has passed by its next message
    (news, stored within a batch period): then it is gone here too."""
    return [
        c
        for c in still_on_http(clients, now, dt.timedelta(days=366))
        if c.node in infos
        and (
            c.node in fresh
            or now - c.last_seen <= dt.timedelta(seconds=infos[c.node].window_seconds)
        )
    ]


CHECK_AGENT = "tlsroll nodes, and on the node systemctl status tlsroll-agent"
"""How to check that a node's agent runs (there is no ``tlsroll status``: review s45rt2 M1)."""


def waiting_for(node: str) -> str:
    """Why a restarted leader cannot judge ``node`` yet: its agent has not reported to it.
    Seconds once the agent is connected; an agent that stays down never reports."""
    return (
        f"waiting for {node}'s first report since the leader started (seconds once its agent is"
        f" connected; else check it runs: {CHECK_AGENT})"
    )


def report_problems(
    store: Store,
    infos: Mapping[str, ClientsInfo],
    now: dt.datetime,
    stale_after: dt.timedelta,
) -> dict[str, str]:
    """Per node of ``infos`` whose stored client report does not speak for now, why: none of
    its agent's reports has come to this leader yet (``Store.report_since_start``), or the
    last came ``stale_after`` ago (``planner.report_stale_after``; by the time since it came,
    whatever the clock did: ``Store.report_on_clock_now``). What a node's agent says is
    wrong with its report (``ClientsInfo.problem``) is not judged here."""
    heard = {n: i for n, i in infos.items() if store.report_since_start(n)}
    came = {n: store.report_on_clock_now(n, i.reported_at) for n, i in heard.items()}
    stale = stale_reports(came, now, stale_after)
    problems = {}
    for n, info in infos.items():
        if n not in heard:
            problems[n] = waiting_for(n)
        elif n in stale:
            problems[n] = (
                f"no recent report from its agent since {info.reported_at:%Y-%m-%d %H:%M:%S}"
                f" UTC; check it runs: {CHECK_AGENT}"
            )
    return problems


def fresh_reports(
    store: Store,
    infos: Mapping[str, ClientsInfo],
    now: dt.datetime,
    stale_after: dt.timedelta,
) -> frozenset[str]:
    """The nodes of ``infos`` whose stored client report speaks for now (``report_problems``
    has nothing to say of it)."""
    return frozenset(infos).difference(report_problems(store, infos, now, stale_after))


def _by_node(clients: Iterable[Client]) -> dict[str, list[Client]]:
    """``clients`` by node, each node's in their order."""
    found: dict[str, list[Client]] = {}
    for c in clients:
        found.setdefault(c.node, []).append(c)
    return found


def node_clients_views(
    clients: Sequence[Client],
    infos: Mapping[str, ClientsInfo],
    now: dt.datetime,
    fresh: Collection[str],
    reported: Reported,
) -> list[schema_pb2.NodeClientsView]:
    """Per node that reported, which clients are on which scheme, by node name; ``fresh``:
    see ``still_on_http_now``; ``reported``: ``Reported`` (a report stored before the leader
    started, not repeated to it since: ``awaiting_report``)."""
    # Each node's clients, grouped in one pass (in their order): a pass over every client for
    # each node made a view of N nodes cost N times their clients (issue 15).
    seen = _by_node(clients)
    still = _by_node(still_on_http_now(clients, infos, now, fresh))
    views = []
    for node in sorted(infos):
        info = infos[node]
        views.append(
            schema_pb2.NodeClientsView(
                node=node,
                clients=types_pb2.ClientsView(
                    clients=[client_view(c) for c in seen.get(node, ())],
                    window_seconds=info.window_seconds,
                    source=info.source,
                    problem=info.problem,
                ),
                still_on_http=[client_view(c) for c in still.get(node, ())],
                reported_at=timestamp(info.reported_at),
                last_http_at=timestamp(info.last_http_at),
                awaiting_report=not reported(node),
            )
        )
    return views


def failure_view(row: BootstrapFailureRow) -> schema_pb2.BootstrapFailureView:
    return schema_pb2.BootstrapFailureView(
        node=row.node,
        source=row.source,
        workstation=row.workstation,
        count=min(row.count, 2**32 - 1),
        first_at=timestamp(row.first_at),
        last_at=timestamp(row.last_at),
    )


def schema_message(
    rows: Sequence[RolloutRow | RolloutHead],
    pending: set[str],
    now: dt.datetime,
    failures: Sequence[BootstrapFailureRow] = (),
    removed: Sequence[tuple[str, tuple[str, ...], dt.datetime]] = (),
    revoked: Sequence[Any] = (),
    expiring: Sequence[Any] = (),
    renewal_failures: Sequence[tuple[str, dt.datetime, str, dt.datetime]] = (),
    clients: Sequence[Client] = (),
    infos: Mapping[str, ClientsInfo] | None = None,
    auto_rotate: schema_pb2.AutoRotateView | None = None,
    made: tuple[Made, Made] | None = None,
    node_problems: Sequence[NodeProblemRow] = (),
    login_failures: Sequence[LoginFailuresRow] = (),
    *,
    fresh: Collection[str],
    reported: Reported,
    servers: Mapping[str, str] | None = None,
    other_certificate: Callable[[], Collection[str]] | None = None,
    behind: PasswordBehind | None = None,
) -> schema_pb2.Schema:
    """The whole schema as ``GetSchema`` answers it (and ``schema show --json`` prints it).
    A rollout given as a ``RolloutHead`` (the viewer's page) is there without its nodes.
    ``expiring``: ``leader.expiry.Expiry`` within their horizon (or revoked);
    ``renewal_failures``: (node, failing since, reason, its certificate's end); ``made``: see
    ``rollout_view``;
    ``node_problems``: ``LeaderState.node_problems``; ``login_failures``: the nodes whose server
    counts wrong client passwords (``LeaderState.login_failures``); ``fresh``: the nodes whose
    client report speaks for now (``fresh_reports``; who is still on http:
    ``still_on_http_now``); ``reported``: ``Reported`` (each node that waits for it says so:
    ``awaits_report``); ``servers``: each enrolled node with what its server serves by its
    latest heartbeat (``LeaderState.live_servers``): ``mixed_cluster`` if it is mixed
    (``other_certificate``: ``mixed_view``'s), and each node's newest row its server no
    longer matches marked (``changed_since``);
    ``behind``: the nodes whose live password is older than the newest
    staged one (``SchemaStore.password_behind``)."""
    infos = infos or {}
    on_http = Counter(c.node for c in still_on_http_now(clients, infos, now, fresh))
    message = schema_pb2.Schema(
        node_clients=node_clients_views(clients, infos, now, fresh, reported),
        rollouts=[rollout_view(r, pending, on_http, made, reported) for r in rows],
        generated_at=timestamp(now),
        bootstrap_failures=[failure_view(f) for f in failures],
        removed_nodes=[
            schema_pb2.RemovedNodeView(name=name, addresses=addresses, removed_at=timestamp(at))
            for name, addresses, at in removed
        ],
        revoked_certificates=[
            schema_pb2.RevokedCertificateView(
                serial=r["serial"],
                kind=r["kind"],
                subject=r["subject"],
                node=r["node"],
                revoked_at=timestamp(from_text(r["revoked_at"])),
                reason=echo.hide_inside(r["revoke_reason"]),
                not_after=timestamp(from_text(r["not_after"])),
            )
            for r in revoked
        ],
        expiring_certificates=[
            schema_pb2.ExpiringCertificateView(
                kind=e.kind,
                subject=e.subject,
                serial=e.serial,
                not_after=timestamp(e.not_after),
                residual_seconds=int(e.residual(now).total_seconds()),
                revoked=e.revoked,
            )
            for e in expiring
        ],
        renewal_failures=[
            schema_pb2.RenewalFailureView(
                node=node,
                failing_since=timestamp(since),
                reason=reason,
                cert_not_after=timestamp(not_after),
            )
            for node, since, reason, not_after in renewal_failures
        ],
        auto_rotate=auto_rotate,
        node_problems=[problem_view(p) for p in node_problems],
        server_login_failures=[login_failures_view(f) for f in login_failures],
        mixed_cluster=mixed_view(servers, other_certificate) if servers else None,
        password_behind=behind_view(behind) if behind is not None else None,
    )
    if servers:  # (each node's newest row that its server no longer matches: review s70 L2)
        mark_changed(message, changed_since(rows, servers))
    return message


def finish_password_command(nodes: Iterable[str]) -> str:
    """The start that gives ``nodes`` the newest staged password (``PasswordBehindView``): at
    most ``NAMED`` of them by name, then the next ten the same way, as the advice of a mixed
    cluster names them (``mixed_cluster.rest_scope``; session 69 named every node behind in
    one ``--nodes``). Not ``--scope cluster``: it takes in every node, in a mixed cluster
    those on http too, where a change-password does not start."""
    names = sorted(nodes)
    said = f"tlsroll rollout start --change change-password {rest_scope(names, cluster=False)}"
    return f"{said}, {NEXT}" if len(names) > NAMED else said


def behind_view(behind: PasswordBehind) -> schema_pb2.PasswordBehindView:
    """``PasswordBehind`` as the schema carries it: versions, who staged, never a verifier."""
    staged = behind.staged
    return schema_pb2.PasswordBehindView(
        version=staged.version,
        staged_by=staged.staged_by,
        staged_at=timestamp(staged.staged_at),
        nodes=[schema_pb2.PasswordBehindNode(node=n, live_version=v) for n, v in behind.nodes],
        command=finish_password_command(n for n, _ in behind.nodes),
    )


def mixed_view(
    servers: Mapping[str, str], other_certificate: Callable[[], Collection[str]] | None = None
) -> schema_pb2.MixedClusterView | None:
    """The schema's ``mixed_cluster`` of the enrolled nodes' ``servers`` (each with its server
    by its latest heartbeat); None if the cluster is not mixed (review s69 revlocal2 M1:
    after a local switch, `schema show` said neither that nor how to switch the rest).
    ``other_certificate``: what gives the nodes on https with a certificate not known as one
    of this CA (``SchemaStore.other_certificates``), asked only if the cluster is mixed."""
    m = mixed(servers)
    if m is None:
        return None
    if other_certificate is not None:
        m = mixed(servers, other_certificate()) or m
    return schema_pb2.MixedClusterView(
        on_http=m.on_http,
        on_https=m.on_https,
        unknown=m.unknown,
        dual=m.dual,
        other_certificate=m.other_certificate,
    )


SERVES_NOW = frozenset({"http", "https", "http+https"})
"""What a node's server serves by its latest heartbeat where ``changed_since`` judges a row
against it (``NodeInfo.server`` less " frozen"); anything else (down, needs the admin,
restarting, not heard) is not known, and marks nothing."""


def changed_since(
    rows: Iterable[RolloutRow | RolloutHead], servers: Mapping[str, str]
) -> dict[tuple[str, str], str]:
    """(rollout id, node): what the node's server serves now (``NodeView.now_serves``), for
    each node's newest row among ``rows`` (by epoch) where that row says what the rollout left
    it serving (done: the change's target scheme; dual: http and https; skipped as already
    done: the target scheme) and its server, by its latest heartbeat (``servers``:
    ``LeaderState.live_servers``), serves something else: put back by hand since (review s70
    drift L2: `schema show` and the viewer kept showing "done, https://…" for a node on http
    again; only the mixed-cluster line said otherwise). Not in a running rollout (its nodes
    move), nor for a node whose server is not known now, nor on an older row (history)."""
    newest: dict[str, tuple[int, Rollout, NodeRecord]] = {}
    for row in rows:
        if not isinstance(row, RolloutRow):
            continue
        r = row.rollout
        for rec, _ in row.nodes:
            if rec.name not in newest or newest[rec.name][0] < r.epoch:
                newest[rec.name] = (r.epoch, r, rec)
    marks: dict[tuple[str, str], str] = {}
    for name, (_, r, rec) in newest.items():
        if r.state is RolloutState.RUNNING:
            continue
        target = CHANGES[r.change].target_scheme
        if rec.state is NodeState.DUAL:
            said = "http+https"
        elif rec.state is NodeState.DONE or (
            rec.state is NodeState.SKIPPED and rec.reason.startswith("already done")
        ):
            said = target
        else:
            continue
        now = servers.get(name, "").removesuffix(" frozen")
        if now in SERVES_NOW and now != said:
            marks[(r.id, name)] = now
    return marks


def mark_changed(message: schema_pb2.Schema, marks: Mapping[tuple[str, str], str]) -> None:
    """``changed_since``'s marks set on ``message``'s node views (its own copies)."""
    if not marks:
        return
    for view in message.rollouts:
        for node in view.nodes:
            if (now := marks.get((view.id, node.name))) is not None:
                node.now_serves = now


def login_failures_view(row: LoginFailuresRow) -> schema_pb2.ServerLoginFailuresView:
    """A node's wrong client passwords as the schema carries them."""
    return schema_pb2.ServerLoginFailuresView(
        node=row.node,
        count=min(row.failures, 2**32 - 1),
        last_at=timestamp(row.last_at),
        reported_at=timestamp(row.reported_at),
    )


def problem_view(p: NodeProblemRow) -> schema_pb2.NodeProblemView:
    """A node problem as the schema carries it (``NodeProblemView``)."""
    view = schema_pb2.NodeProblemView(
        node=p.node,
        problem=p.problem,
        since=timestamp(p.since),
        kind=NODE_PROBLEM_KIND.wire(p.kind),
    )
    if p.clock_offset is not None:
        view.clock_offset_seconds = p.clock_offset
        view.clock_leader = p.leader_clock
    view.agent_said.extend(p.said)
    return view


class SchemaViewService(schema_pb2_grpc.SchemaViewServicer):
    # Its callers (the admin socket's) read an OSError's path (``tlsroll.rpc.SHOWS_PATHS``).
    shows_paths = True

    def __init__(
        self,
        schema: SchemaStore,
        clock: Callable[[], dt.datetime],
        expiry: ExpiryWatch | None = None,
        auto_rotate: Callable[[], schema_pb2.AutoRotateView] | None = None,
        node_problems: Callable[[], Sequence[NodeProblemRow]] | None = None,
        store_trouble: Callable[[], tuple[str, dt.datetime] | None] | None = None,
        *,
        fresh: FreshReports,
        reported: Reported,
        login_failures: Callable[[], Sequence[LoginFailuresRow]] | None = None,
        live_server: Callable[[str], str] | None = None,
        served: Callable[[], Mapping[str, str]] | None = None,
        store_writes_work: Callable[[], bool] | None = None,
    ) -> None:
        """``auto_rotate``: what the automatic rotation last decided
        (``leader.auto_rotate.Status.view``); ``node_problems``: the nodes the leader sees a
        problem with now (``leader.service.LeaderState.node_problems``); ``store_trouble``:
        why the store's writes fail and since when, while they do (``Engine.store_trouble``);
        ``store_writes_work``: True while that is its checkpoint's alone, the writes still
        committing (``StoreHealth.writes_work``);
        ``login_failures``: the nodes whose server counts wrong client passwords
        (``leader.service.LeaderState.login_failures``); ``live_server``: what a node's
        server serves by its latest heartbeat (``LeaderState.live_servers``; "" not known):
        the schema's ``mixed_cluster``; ``served``: what each node's server serves https with
        by its heartbeats (``LeaderState.served_fingerprints``, a copy): which nodes of a mixed
        cluster serve a certificate not of this CA (``SchemaStore.other_certificates``; none
        given: every one on https only is taken for such, not known to be left alone);
        ``fresh``: the nodes whose client report speaks for now
        (``leader.service.LeaderState.fresh_reports``); ``reported``: ``Reported``. Both
        required (review s44rev6 L3): without them this said nobody's report was fresh and
        nobody's awaited, which no leader means."""
        self.fresh = fresh
        self.reported = reported
        self.node_problems = node_problems
        self.login_failures = login_failures
        self.live_server = live_server
        self.served = served
        self.store_trouble = store_trouble
        self.store_writes_work = store_writes_work
        self.schema = schema
        self.clock = clock
        self.expiry = expiry
        self.auto_rotate = auto_rotate

    @map_errors({})
    async def GetSchema(
        self, request: schema_pb2.GetSchemaRequest, context: Ctx
    ) -> schema_pb2.Schema:
        # the reads and the message in one worker-thread hand-off (each costs a wake-up of the
        # loop; the message of every stored rollout takes milliseconds)
        return await asyncio.to_thread(self._answer, request, self._auto_rotate(request))

    @map_errors({})
    async def get_schema_json(
        self, request: schema_pb2.GetSchemaRequest | None, context: Ctx
    ) -> bytes:
        """``GetSchema`` with the reply as JSON (``JSON_SERVICE``), all made in the worker
        thread: the JSON of every stored rollout (``--all``) takes tens of milliseconds."""
        if request is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{JSON_SERVICE}: the request is not a GetSchemaRequest in JSON",
            )
        auto = self._auto_rotate(request)
        return await asyncio.to_thread(lambda: schema_json(self._answer(request, auto)))

    def _auto_rotate(self, request: schema_pb2.GetSchemaRequest) -> Any:
        """What the automatic rotation last decided (read on the loop, where it is kept)."""
        if request.rollouts_only or self.auto_rotate is None:
            return None
        return self.auto_rotate()

    def _answer(
        self, request: schema_pb2.GetSchemaRequest, auto_rotate: schema_pb2.AutoRotateView | None
    ) -> schema_pb2.Schema:
        """``GetSchema``'s reply. In a worker thread."""
        rows, total, parts = self._read(request)
        message = schema_message(rows, **parts, auto_rotate=auto_rotate)
        trouble = self.store_trouble() if self.store_trouble is not None else None
        if trouble is not None:  # (read in memory: the store it is about may fail to answer)
            message.store_trouble.problem, since = trouble
            message.store_trouble.since.FromDatetime(since)
            if self.store_writes_work is not None:
                message.store_trouble.writes_work = self.store_writes_work()
        message.total_rollouts = total
        return message

    def _read(
        self, request: schema_pb2.GetSchemaRequest
    ) -> tuple[list[RolloutRow], int, dict[str, Any]]:
        """What ``GetSchema`` answers, read from the stores: the rollouts asked for, how many
        are stored, and the rest of ``schema_message``'s arguments. In a worker thread. The
        rollouts, pending passwords and client report in one read (``SchemaStore.shown``),
        and ``now`` after it."""
        schema = self.schema
        if request.rollout_id:
            if not ROLLOUT_ID.fullmatch(request.rollout_id):
                # Not echoed: the NOT_FOUND message would carry it, and a long one makes a
                # header block the client cannot read (INTERNAL instead of one line).
                raise invalid(
                    "rollout_id is not a rollout id (1-64 letters, digits, '.', '_' or '-'); "
                    "see: tlsroll schema show"
                )

            def rollouts(db: sqlite3.Connection) -> tuple[list[RolloutRow], int]:
                row = schema.get_in(db, request.rollout_id)
                return ([row] if row is not None else []), schema.count_in(db)

        elif request.limit:

            def rollouts(db: sqlite3.Connection) -> tuple[list[RolloutRow], int]:
                return schema.newest_in(db, request.limit)

        else:

            def rollouts(db: sqlite3.Connection) -> tuple[list[RolloutRow], int]:
                every = schema.all_in(db)
                return every, len(every)

        # (the enrolled nodes, in the same read, where the schema says if the cluster is mixed)
        live = None if request.rollouts_only else self.live_server
        shown = schema.shown(rollouts, nodes=Store.node_rows if live is not None else None)
        if request.rollout_id and not shown.rows:
            raise not_found(
                f"no rollout {echo.shown(request.rollout_id)} (see: tlsroll schema show --all)"
            )
        rows = cast(list[RolloutRow], shown.rows)
        total = shown.total
        now = self.clock()  # after the read: never before what it shows
        parts: dict[str, Any] = {
            "pending": shown.pending,
            "behind": shown.behind,
            "now": now,
            "clients": shown.clients,
            "infos": shown.infos,
            "fresh": self.fresh(shown.infos, now),
            "reported": self.reported,
        }
        if request.rollouts_only:
            return rows, total, parts
        if self.node_problems is not None:
            parts["node_problems"] = self.node_problems()
        if self.login_failures is not None:
            parts["login_failures"] = self.login_failures()
        if live is not None:
            servers = parts["servers"] = {row["name"]: live(row["name"]) for row in shown.nodes}
            served = self.served

            def other_certificate() -> frozenset[str]:
                reported = served() if served is not None else {}
                return self.schema.other_certificates(servers, reported)

            parts["other_certificate"] = other_certificate
        parts["failures"] = self.schema.bootstrap_failures()
        parts["removed"] = self.schema.removed_nodes()
        parts["revoked"] = self.schema.revoked_certificates(now)
        if self.expiry is not None:
            parts["expiring"] = self.expiry.warnings()
            parts["renewal_failures"] = self.expiry.renewal_failures()
        return rows, total, parts


JSON_SERVICE = "tlsroll.v1.SchemaViewJson"
"""``SchemaView``'s ``GetSchema`` again, with gRPC's JSON codec (``application/grpc+json``): the
request is the JSON form of ``GetSchemaRequest`` (proto field names), the reply the JSON that
``tlsroll schema show --json`` prints (``tlsroll.wire.to_dict``: enums as the CLI's words). For
``tlsroll schema show``, which so reads the schema without importing protobuf (some 15 % of
its instructions, issue 15); the reply is that of ``GetSchema``, errors and all."""

JSON_METHODS: dict[str, str] = {"GetSchema": "tlsroll.v1.SchemaView.GetSchema"}
"""``JSON_SERVICE``'s methods (what ``add_json_to_server`` serves), each with the protobuf method
(full name) whose request and reply it carries in JSON. Between builds (a CLI and a leader not
restarted since an upgrade) the JSON field names of those messages are the contract, not the
field numbers: ``tests/test_contract.py`` derives from this which messages it pins the names
of, and fails for a JSON method the code serves or names that is not here."""


MAX_REQUEST_JSON = 4096
"""Bytes of a ``SchemaViewJson`` request at most: a ``GetSchemaRequest`` in JSON (a rollout id
of 64 characters, a limit, a flag) is under 200; anything longer is not one."""
ROLLOUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A rollout id as the agents accept it (``nodeagent.service.ROLLOUT_ID``; the roles share no
module): no stored rollout has another."""


def schema_json(message: schema_pb2.Schema) -> bytes:
    return json.dumps(wire.to_dict(message), separators=(",", ":")).encode()


def request_from_json(data: bytes) -> schema_pb2.GetSchemaRequest | None:
    """A ``GetSchemaRequest`` from its JSON object; None for anything else (refused with
    INVALID_ARGUMENT by the method, rather than gRPC's UNKNOWN with the parser's words and a
    traceback in the log). Bounded before any parsing (``MAX_REQUEST_JSON``): the deserializer
    runs on the event loop. protobuf's ``Parse`` wraps what ``json.loads`` raises (deep
    nesting: RecursionError) in ParseError since 6.31 at least; RecursionError is caught here
    too, so that the answer does not hang on that."""
    from google.protobuf import json_format  # noqa: PLC0415 - only this codec's calls need it

    if len(data) > MAX_REQUEST_JSON or not data.lstrip().startswith(b"{"):
        return None  # (``Parse`` takes ``[]`` for an empty message)
    try:
        return json_format.Parse(data, schema_pb2.GetSchemaRequest())
    except (json_format.ParseError, ValueError, RecursionError):  # (ValueError: not UTF-8)
        return None


def add_json_to_server(service: SchemaViewService, server: grpc.aio.Server) -> None:
    """Serve ``JSON_SERVICE`` beside ``SchemaView`` (on the admin socket): ``JSON_METHODS``."""
    handler = grpc.unary_unary_rpc_method_handler(
        service.get_schema_json,
        request_deserializer=request_from_json,
        response_serializer=bytes,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(JSON_SERVICE, {"GetSchema": handler}),)
    )
