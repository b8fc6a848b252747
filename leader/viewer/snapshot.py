"""What the web viewer shows, read in one go from the leader's stores: the schema, the nodes,
their certificates, and the timeline of the selected rollout.

Nothing here writes. ``Reader.read`` runs in a worker thread (it reads SQLite); the pages,
``/api/v1/schema`` and ``/metrics`` are all made from one ``Snapshot``. The schema part is the
message ``GetSchema`` answers (``leader.schema_view.schema_message``), so ``/api/v1/schema`` is
what ``tlsroll schema show --json`` prints.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from sys import intern
from typing import Any, NamedTuple

from cryptography import x509

from leader.expiry import (
    AGENT_HORIZON_FRACTION,
    agent_horizon,
    horizon_of,
    served_end,
    served_now,
    watched_workstations,
    within,
)
from leader.layout import DEFAULT_WARNING
from leader.mixed_cluster import Mixed, mixed, rest_scope
from leader.rollout_core import NodeRecord, NodeState, cut_off
from leader.schema_store import AuditEvent, NodeDetail, RolloutHead, RolloutRow, SchemaStore
from leader.schema_view import (
    COUNTS_ON_HTTP,
    FreshReports,
    Made,
    awaits_report,
    changed_since,
    left_as_is_nodes,
    left_out_nodes,
    node_view,
    schema_message,
    still_on_http_now,
    waits_until_quiet,
)
from leader.states import LoginFailuresRow, NodeProblemRow
from leader.store import NodesMade, Store
from tlsroll import pki, wire
from tlsroll.v1 import schema_pb2

# ``Reader``'s ``agent_near`` if not given (the daemon gives it: ``agent_cert_lifetime``'s half).
NEAR_EXPIRY = dt.timedelta(days=30)
# The rollouts whose nodes' data and timelines a Reader keeps between two reads (the newest and
# whatever open pages select): a live page's read after a write converts and parses only what
# changed (issue 15: at 500 nodes, a read of everything took 30 ms after each write).
KEPT_ROLLOUTS = 4
# What a page's read keeps of each node (``Reader.read``'s ``page``): the fields its row draws
# (``templates/node_row.html``), not the steps' times, the fingerprint and the rest that
# `schema show --json` prints (at 500 nodes the whole records were ~2 MiB of a leader with a
# page open, most of it the steps' dicts of strings: issue 15). A test draws every row of
# both and compares.
ROW_FIELDS = frozenset(
    {
        "name",
        "state",
        "reason",
        "old_url",
        "new_url",
        "cert_not_after",
        "freeze_started_at",
        "freeze_ended_at",
        "freeze_seconds",
        "restart_seconds",
        "leader_node",
        "password_pending",
        "awaiting_report",
        "waits_until_quiet",
        "still_on_http",
        "now_serves",
    }
)


def mark_rows(data: dict[str, Any], marks: Mapping[tuple[str, str], str]) -> None:
    """``changed_since``'s marks set on ``data``'s node rows, each marked one a copy (a row's
    dict is shared by the snapshots that show it unchanged: read-only)."""
    if not marks:
        return
    for item in data["rollouts"]:
        nodes = item.get("nodes") or []
        for i, node in enumerate(nodes):
            if (now := marks.get((item["id"], node["name"]))) is not None:
                nodes[i] = {**node, "now_serves": now}


class _PageNode(NamedTuple):
    """A node as a page's read keeps it (``Reader._page_data``)."""

    record: NodeRecord
    detail: NodeDetail
    # it is the leader's node; its password is pending; the leader waits for its client report;
    # a --when-quiet finalize holds it; how many workstations are still on http there
    marks: tuple[bool, bool, bool, bool, int]
    fields: dict[str, Any]  # its ``ROW_FIELDS``


class NodeStatus(NamedTuple):
    """An enrolled node as the leader sees it by its heartbeat. (A tuple: a live page's read
    makes one for every enrolled node, a frozen dataclass took three times as long.)"""

    name: str
    addresses: tuple[str, ...]
    online: bool
    last_heartbeat: dt.datetime | None
    heartbeat_age: float | None  # seconds since the last heartbeat; None: never
    # Its clock less the leader's, in seconds, from its heartbeats (``leader.node_clocks``);
    # None: not known.
    clock_offset: float | None = None
    # What its managed server runs by its latest heartbeat (``Reader.live_server``: "http",
    # "https", "http+https", "down: …"); "": not known (no heartbeat since the leader started).
    server: str = ""


class OnHttp(NamedTuple):
    """A workstation still on http at a node (``leader.schema_view.still_on_http_now``): what
    the page's "still on http" section shows of it, not its counts and first sighting."""

    node: str
    address: str
    workstation: str  # "" where unknown
    last_seen: dt.datetime


@dataclass(frozen=True)
class CertStatus:
    """A certificate the cluster depends on, and when it expires."""

    # ca | leader | viewer | agent (a node's mTLS) | server (a node's 8443) | workstation (a
    # PC's client certificate, as the expiry watch lists them: ``watched_workstations``)
    kind: str
    subject: str  # the node's or workstation's name; "" for the leader's own
    fingerprint: str
    # The certificate's own end (the metrics' ``tlsroll_certificate_own_expiry_timestamp_
    # seconds`` where its chain ends first; ``end`` is what the page and the watch go by).
    not_after: dt.datetime
    # How near its end it is shown as near (an agent's: ``leader.expiry.agent_horizon``);
    # None: the kind's, as the expiry watch's (``Snapshot.horizon``).
    near: dt.timedelta | None = None
    # A server certificate of the practice's own (``--cert-dir``) whose chain ends before it:
    # the chain's certificate that does (its subject) and its end
    # (``leader.expiry.served_end``), which the page shows and the horizon counts from.
    chain: str = ""
    chain_end: dt.datetime | None = None
    # A node's served certificate the admin revoked (`tlsroll ca revoke`), still the one it
    # serves as the rollouts recorded it (``leader.expiry.served_now``): listed near its end
    # whatever its end, as the expiry watch warns of it (``Expiry.revoked``), and flagged on
    # the page and in the metrics (``tlsroll_certificate_revoked``); before, it was shown as
    # any other until its end (the practice's clients, which read no revocation list, take it).
    revoked: bool = False

    @property
    def end(self) -> dt.datetime:
        """When clients stop accepting it: its end, or its chain's if that comes first."""
        return self.chain_end if self.chain_end is not None else self.not_after


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change of a rollout or a node, from the audit trail. (Slots, and its words
    interned: a 500-node rollout's timelines keep some 3,500.)"""

    at: dt.datetime
    old: str
    new: str
    reason: str
    actor: str


@dataclass(frozen=True)
class Snapshot:
    now: dt.datetime
    schema: schema_pb2.Schema
    """Every stored rollout, newest first; only the newest and the selected one carry their
    nodes (the others' ``nodes`` are empty: not read, ``SchemaStore.listed``), unless read
    with ``every`` (``/api/v1/schema``: every rollout whole)."""
    data: dict[str, Any]  # wire.to_dict(schema): enums as words, as `schema show --json`
    """``schema`` as `schema show --json` prints it (so with the same rollouts' nodes). A
    page's read (``Reader.read``'s ``page``) has each node's ``ROW_FIELDS`` only, and its
    ``schema`` no node views."""
    nodes: tuple[NodeStatus, ...]
    pending_passwords: tuple[str, ...]
    certificates: tuple[CertStatus, ...]
    selected: dict[str, Any] | None  # the selected rollout of ``data``, if any
    timeline: dict[str, tuple[Transition, ...]] = field(default_factory=dict)
    """The selected rollout's transitions: "" its own, else by node name."""
    switch_times: tuple[list[float], list[float]] | None = None
    """For the metrics (``Reader.read``'s ``times``): of every node of every stored rollout,
    its freeze windows and its server's restarts, in seconds (``SchemaStore.switch_times``)."""
    agent_near: dt.timedelta = NEAR_EXPIRY
    """Agents renew their own certificates: one is near its end only once its renewal is
    overdue (``leader.expiry``: half its life left); this is the configured lifetime's half,
    each certificate's own life decides (``CertStatus.near``)."""
    warning: dt.timedelta = DEFAULT_WARNING
    """``expiry_warning_days``: the other certificates are near their end within the expiry
    watch's horizon of their kind (``leader.expiry.horizon_of``: a year for the CA, this for
    server certificates, this cut for the leader's and the viewer's), so the page lists what
    `tlsroll certs check-expiration` warns of, and only that."""
    on_http_now: frozenset[str] = frozenset()
    """Of ``left_as_is``, the nodes seen on http since (``Reader._on_http_now``)."""
    still_on_http: tuple[OnHttp, ...] = ()
    """Who is still on http (``leader.schema_view.still_on_http_now``), by node, each node's
    most recently seen first; as `schema show` lists them (none unless read with ``clients``
    or ``page``)."""
    last_rollouts: dict[str, str] = field(default_factory=dict)
    """Of ``other_nodes``, the last rollout each was in, by node (a page's read only)."""
    dual_left_by: dict[str, str] = field(default_factory=dict)
    """Of a mixed cluster's nodes on http and https, the rollout that left each so, by node
    (``SchemaStore.left_dual``): the way names it (session 69 named none)."""
    other_certificate: frozenset[str] = frozenset()
    """The nodes on https with a certificate not known as one of this CA
    (``SchemaStore.other_certificates``), read where the cluster is mixed: the way to switch
    the rest leaves them out (``leader.mixed_cluster``)."""

    @property
    def other_nodes(self) -> tuple[NodeStatus, ...]:
        """The enrolled nodes not in the selected rollout (enrolled after it, or left out of
        its scope): the page's "other nodes" table, so that every node's state is on it."""
        shown = {n["name"] for n in self.selected["nodes"]} if self.selected is not None else set()
        return tuple(n for n in self.nodes if n.name not in shown)

    @cached_property
    def mixed_on_http(self) -> tuple[str, ...]:
        """The enrolled nodes whose servers run http only while others run https (by their
        heartbeats: ``leader.plan_texts.served_scheme``), as `tlsroll nodes` names a mixed
        cluster (a local switch, a node enrolled after the switch, one way back); () if the
        cluster is not mixed (review s69 revlocal M1: the page listed the schemes, but said
        neither that the cluster is mixed nor how to finish)."""
        return self._mixed.on_http if self._mixed is not None else ()

    @cached_property
    def _mixed(self) -> Mixed | None:
        return mixed({n.name: n.server for n in self.nodes}, self.other_certificate)

    @cached_property
    def mixed_rest(self) -> tuple[str, bool]:
        """How to switch the rest of a mixed cluster as `tlsroll nodes` and `schema show` say
        it (``leader.mixed_cluster``): the scope of the rollout (``--nodes a,b`` for a few,
        ``--scope cluster`` beyond: review s69 revlocal2 L4, unless nodes on https would not
        be left alone: then the first ten, a batch), and whether nodes whose server is not
        known now are in that scope too."""
        m = self._mixed
        if m is None:
            return "", False
        scope = rest_scope(m.on_http, not m.dual and not m.other_certificate)
        return scope, scope.startswith("--scope") and bool(m.unknown)

    @property
    def mixed_dual(self) -> tuple[str, ...]:
        """Of a mixed cluster, the nodes serving http and https (``Mixed.dual``)."""
        return self._mixed.dual if self._mixed is not None else ()

    @property
    def mixed_dual_rollout(self) -> str:
        """The rollout that left every node of ``mixed_dual`` on http and https, if one did
        and is known ("": several, or not known): the way's commands name it."""
        ids = {self.dual_left_by.get(n, "") for n in self.mixed_dual}
        return ids.pop() if len(ids) == 1 else ""

    @property
    def mixed_dual_each(self) -> tuple[str, ...]:
        """``node: rollout`` of each node of ``mixed_dual`` whose rollout is known, where no
        one rollout left them all (``mixed_dual_rollout``)."""
        if self.mixed_dual_rollout:
            return ()
        return tuple(f"{n}: {r}" for n in self.mixed_dual if (r := self.dual_left_by.get(n)))

    @property
    def mixed_other_certificate(self) -> tuple[str, ...]:
        """Of a mixed cluster, the nodes on https with a certificate not of this CA."""
        return self._mixed.other_certificate if self._mixed is not None else ()

    @cached_property
    def _on_http_counts(self) -> Counter[str]:
        return Counter(c.node for c in self.still_on_http)

    def on_http_count(self, node: str) -> int:
        """How many workstations are still on http at ``node`` (``still_on_http``)."""
        return self._on_http_counts[node]

    @property
    def offline(self) -> tuple[NodeStatus, ...]:
        return tuple(n for n in self.nodes if not n.online)

    def horizon(self, cert: CertStatus) -> dt.timedelta:
        """How near its end ``cert`` is shown as near: the expiry watch's horizon of it."""
        if cert.near is not None:
            return cert.near
        return self.agent_near if cert.kind == "agent" else horizon_of(cert.kind, self.warning)

    @property
    def near_expiry(self) -> tuple[CertStatus, ...]:
        """The certificates the expiry watch warns of (``leader.expiry.within``), by the end
        clients go by (``CertStatus.end``), and those revoked and still served, whatever their
        end (``CertStatus.revoked``: as `certs check-expiration` lists them)."""
        return tuple(
            c for c in self.certificates if c.revoked or within(c.end, self.horizon(c), self.now)
        )

    @property
    def attention(self) -> tuple[str, ...]:
        """The selected rollout's nodes that need a person (their way back failed)."""
        if self.selected is None:
            return ()
        wanted = NodeState.NEEDS_ATTENTION.value
        return tuple(n["name"] for n in self.selected["nodes"] if n["state"] == wanted)

    @property
    def left_as_is(self) -> tuple[str, ...]:
        """The selected rollout's nodes its way back (disable-tls) left as is: not known to be
        on http, each one's reason says what to do (``RolloutView.left_as_is``)."""
        if self.selected is None:
            return ()
        return tuple(self.selected.get("left_as_is", ()))

    @property
    def removed_since(self) -> tuple[str, ...]:
        """The nodes the selected rollout (a retry, or a way back of a named rollout) left out
        as removed since (`tlsroll nodes remove`; ``RolloutView.removed_since``): not in its
        nodes' table, so said beside its state (s51)."""
        if self.selected is None:
            return ()
        return tuple(self.selected.get("removed_since", ()))

    @property
    def left_out(self) -> tuple[str, ...]:
        """The selected rollout's nodes its finalize left out, their agents cut off: they
        still serve http and https; each one's reason says what to do
        (``RolloutView.left_out``)."""
        if self.selected is None:
            return ()
        return tuple(self.selected.get("left_out", ()))

    @property
    def cut_off(self) -> tuple[str, ...]:
        """The selected rollout's nodes skipped as their agents are cut off (their
        certificates revoked: a machine lost or stolen; ``rollout_core.cut_off``): each one's
        reason names `tlsroll nodes remove`."""
        if self.selected is None:
            return ()
        kept = self.selected.get("left_cut_off")
        if kept is not None:
            return tuple(kept)
        return tuple(
            n["name"]
            for n in self.selected.get("nodes", ())
            if n.get("state") == NodeState.SKIPPED.value and cut_off(n.get("reason", ""))
        )

    @property
    def still_left(self) -> tuple[str, ...]:
        """``left_as_is`` less the nodes seen on http since and those cut off: what the
        page's alert names (the heading keeps what the way back did). A node cut off never
        comes back on http: its reason says to remove it, and the alert listed it for good
        (s50)."""
        gone = self.cut_off
        return tuple(n for n in self.left_as_is if n not in self.on_http_now and n not in gone)


# Where a Reader marks, in ``Database.cache``, that it read the enrolled nodes (``_enrolled``),
# and each node's last rollout (``_last_rollouts``).
_ROWS_READ = ("viewer", "enrolled nodes read")
_TOUCHED_READ = ("viewer", "last rollouts read")


class Reader:
    """Reads a ``Snapshot``; holds the stores and the certificates that live in files."""

    def __init__(
        self,
        store: Store,
        schema: SchemaStore,
        clock: Callable[[], dt.datetime],
        online: Callable[[dt.datetime | None], bool],
        own_certs: Sequence[tuple[str, x509.Certificate]],
        agent_near: dt.timedelta = NEAR_EXPIRY,
        *,
        fresh: FreshReports,
        warning: dt.timedelta = DEFAULT_WARNING,
    ) -> None:
        """``own_certs``: the leader's own certificates as (kind, certificate): the CA, the
        leader's, the viewer's. ``fresh``: the nodes whose client report speaks for now
        (``leader.service.LeaderState.fresh_reports``): who is still on http there goes by
        that report, as for a finalize (``leader.schema_view.still_on_http_now``). Required
        (review s44rev6 L3): set by the daemon after the fact, a reader without it said
        nobody's report was fresh. Whether a node's report came since the leader started
        is the store's (``Store.report_since_start``). ``warning``: ``expiry_warning_days``,
        whose horizons the page's "near expiry" goes by (``Snapshot.warning``)."""
        self.store = store
        self.schema = schema
        self.clock = clock
        self.online = online
        self.agent_near = agent_near
        self.warning = warning
        self.own_certs = tuple(
            CertStatus(kind, "", pki.fingerprint(cert), cert.not_valid_after_utc)
            for kind, cert in own_certs
        )
        # What ``auto_rotate`` last decided (``leader.auto_rotate.Status.view``), set by the
        # daemon once the rotator exists, so the API carries what `schema show --json` prints.
        self.auto_rotate: Callable[[], schema_pb2.AutoRotateView] | None = None
        # The nodes the leader sees a problem with now (two agents use one node's identity,
        # its clock differs: ``leader.service.LeaderState.node_problems``), and each node's
        # clock offset (``leader.node_clocks.NodeClocks.offset``), set by the daemon likewise.
        self.node_problems: Callable[[], Sequence[NodeProblemRow]] | None = None
        # The nodes whose server counts wrong client passwords (across its restarts)
        # (``leader.service.LeaderState.login_failures``), set likewise.
        self.login_failures: Callable[[], Sequence[LoginFailuresRow]] | None = None
        self.clock_offset: Callable[[str], float | None] | None = None
        # Why the store's writes fail and since when, while they do
        # (``leader.store_health.StoreHealth.trouble``): a page shows it as `rollout status`
        # does; read in memory (the store it is about may fail to answer), set likewise.
        self.store_trouble: Callable[[], tuple[str, dt.datetime] | None] | None = None
        # True while that trouble is the checkpoint's alone, the writes still committing
        # (``StoreHealth.writes_work``), set likewise.
        self.store_writes_work: Callable[[], bool] | None = None
        # What each node's managed server runs by its latest heartbeat ("http", "https",
        # "http+https", "down: …", "needs the admin: …", "restarting: …";
        # ``leader.service.server_summary``, kept in
        # ``LeaderState.live_servers``), set likewise: a node a way back left as is that is on
        # http since is no longer in the page's alert (``Snapshot.still_left``).
        self.live_server: Callable[[str], str] | None = None
        # What each node's server serves https with by its heartbeats
        # (``LeaderState.served_fingerprints``; ``leader.expiry.served_now``'s ``reported``),
        # set likewise: the certificates served as the expiry watch has them.
        self.served_reported: Callable[[], Mapping[str, str]] | None = None
        self.fresh = fresh
        # By rollout id, kept for the next read (``KEPT_ROLLOUTS`` at most, the last used
        # last): each node's data by its view (``_data``); the timeline as read up to an audit
        # ``seq``. Reads run in worker threads, several at once: each takes what is kept and
        # puts back a whole new entry under the lock (never a half-made one).
        self._lock = threading.Lock()
        self._node_data: OrderedDict[str, dict[int, tuple[schema_pb2.NodeView, dict[str, Any]]]] = (
            OrderedDict()
        )
        # A page's reads (``read``'s ``page``): each node's row fields, by rollout id, then by
        # its record and detail (held, so their ids stay theirs) and what else its row shows.
        self._page_nodes: OrderedDict[str, dict[tuple[int, int], _PageNode]] = OrderedDict()
        self._timelines: OrderedDict[str, tuple[int, dict[str, tuple[Transition, ...]]]] = (
            OrderedDict()
        )
        self._views: Made = {}  # the node views the last read made (``rollout_view``)
        self._nodes: NodesMade = {}  # the enrolled nodes the last read made (``heard_of``)
        # The enrolled nodes' rows as last read (``_enrolled``: read under the store's lock).
        self._rows: tuple[int, object, list[sqlite3.Row]] | None = None
        # The last rollout of each node (``_last_rollouts``), as read at a ``Database.generation``.
        self._touched: tuple[int, object, dict[str, str]] | None = None
        # The agents' certificates of those rows (``_rows``' list: the same rows, the same).
        self._agents: tuple[list[sqlite3.Row], tuple[CertStatus, ...]] | None = None

    def read(
        self,
        rollout_id: str | None = None,
        *,
        every: bool = False,
        times: bool = False,
        clients: bool = True,
        page: bool = False,
    ) -> Snapshot:
        """Everything at once; ``rollout_id`` selects a rollout (None: the newest). A rollout
        id that does not exist selects none. Every rollout is in the schema, with its nodes
        only the newest and the selected one, what the page and the metrics draw; ``every``:
        every rollout with its nodes (``/api/v1/schema``, what ``schema show --all --json``
        prints). Each stored 500-node rollout read whole is about 0.9 MiB of objects, and an
        open page reads again after each write (issue 15). ``times``: with ``switch_times``
        and each node's ``clock_offset`` (the metrics; the pages show neither).
        ``clients``: with the workstations each node's server saw (``node_clients``, each node's
        ``still_on_http``); the pages draw no client list, and at 500 nodes with two
        workstations each the report was a third of a read after a write (issue 15): a page's
        read (``page``) reads only who is still on http (``still_on_http``, its section and
        each row's count), kept between reads until a client report is written
        (``SchemaStore._http_report``). The rollouts, pending
        passwords, enrolled nodes and client report are of one read (``SchemaStore.shown``),
        and ``now`` is taken after it: read apart, and ``now`` first, a write between them
        showed parts of two moments, and a report newer than ``now`` (session 32's audit,
        L3). ``page``: what a page draws (``_shared_snapshot``): its nodes in ``data`` with
        ``ROW_FIELDS`` only, and ``schema`` without the node views (they are in ``data``)."""
        schema = self.schema

        def rollouts(db: sqlite3.Connection) -> tuple[list[RolloutRow | RolloutHead], int]:
            return (list(schema.all_in(db)) if every else schema.listed_in(db, rollout_id)), 0

        # (a page reads of the client report only what who is still on http is judged by)
        shown = schema.shown(
            rollouts, clients=clients, nodes=self._enrolled, http_clients=page and not clients
        )
        rows, pending, seen, infos = shown.rows, shown.pending, shown.clients, shown.infos
        with self._lock:
            parsed = self._nodes
        fresh: NodesMade = {}
        enrolled = self.store.heard_of(shown.nodes, (parsed, fresh))
        if not every:
            with self._lock:
                self._nodes = fresh
        now = self.clock()
        problems = self.node_problems() if self.node_problems is not None else ()
        guessed = self.login_failures() if self.login_failures is not None else ()
        with self._lock:
            views = self._views
        made: Made = {}
        reports = self.fresh(infos, now)
        still = still_on_http_now(seen, infos, now, reports)
        # (the API's read, as `schema show --json`; a page draws its own from its nodes)
        servers = (
            None
            if page or self.live_server is None
            else {n.name: self.live_server(n.name) for n, _ in enrolled}
        )
        message = schema_message(
            # (a page's read makes no node views: ``_page_data`` makes its nodes' fields)
            [RolloutHead(r.rollout, r.meta) for r in rows] if page else rows,
            pending,
            now,
            self.schema.bootstrap_failures(),
            # (a page's narrow read: no client lists in its data, which no page draws)
            clients=seen if clients else (),
            infos=infos if clients else None,
            auto_rotate=self.auto_rotate() if self.auto_rotate is not None else None,
            made=(views, made),
            node_problems=problems,
            login_failures=guessed,
            fresh=reports,
            reported=self.store.report_since_start,
            servers=servers,
            other_certificate=lambda: self._other_certificate(servers or {}),
            behind=shown.behind,
        )
        if every:  # (every rollout read: as `schema show --all`; a page reads only some)
            message.total_rollouts = len(rows)
        trouble = self.store_trouble() if self.store_trouble is not None else None
        if trouble is not None:
            message.store_trouble.problem, since = trouble
            message.store_trouble.since.FromDatetime(since)
            if self.store_writes_work is not None:
                message.store_trouble.writes_work = self.store_writes_work()
        if page:
            data = self._page_data(message, rows, pending, Counter(c.node for c in still))
        else:
            if not every:  # (the API's read of every rollout would push out what pages show)
                with self._lock:
                    self._views = made
            data = self._data(message, rows, made, keep=not every)
        if self.live_server is not None:  # (as the schema marks them: ``changed_since``)
            live_now = {n.name: self.live_server(n.name) for n, _ in enrolled}
            mark_rows(data, changed_since(rows, live_now))
        selected = None
        if data["rollouts"]:
            if rollout_id is None:
                selected = data["rollouts"][0]
            else:
                selected = next((r for r in data["rollouts"] if r["id"] == rollout_id), None)
        timeline = self._timeline(selected["id"]) if selected else {}
        offset = self.clock_offset if times else None  # (the pages show none)
        live = self.live_server
        nodes = tuple(
            NodeStatus(
                name=n.name,
                addresses=n.addresses,
                online=not n.cert_revoked and self.online(heard),
                last_heartbeat=heard,
                # (a node an open renewal stream vouches for was heard "now" by the store's
                # clock, another clock than ``now``'s: never a negative age)
                heartbeat_age=max(0.0, (now - heard).total_seconds()) if heard else None,
                clock_offset=offset(n.name) if offset is not None else None,
                server=live(n.name) if live is not None else "",
            )
            for n, heard in enrolled
        )
        with self._lock:
            kept = self._agents
        if kept is not None and kept[0] is shown.nodes:  # the same rows: the same nodes
            agents = kept[1]
        else:
            agents = tuple(
                CertStatus(
                    "agent",
                    n.name,
                    n.cert_fingerprint,
                    n.cert_not_after,
                    agent_horizon(n, self.agent_near / AGENT_HORIZON_FRACTION),
                )
                for n, _ in enrolled
            )
            with self._lock:
                self._agents = (shown.nodes, agents)
        shown_servers = {n.name: n.server for n in nodes}
        shown_nodes = {n["name"] for n in selected["nodes"]} if selected is not None else set()
        others = [n.name for n in nodes if n.name not in shown_nodes]
        return Snapshot(
            now=now,
            schema=message,
            data=data,
            nodes=nodes,
            # (those behind the newest staged password: the removed nodes left out)
            pending_passwords=tuple(n for n, _ in shown.behind.nodes) if shown.behind else (),
            certificates=self.own_certs
            + agents
            + self._served({n.name for n, _ in enrolled})
            + self._workstations(now),
            selected=selected,
            timeline=timeline,
            agent_near=self.agent_near,
            warning=self.warning,
            switch_times=self.schema.switch_times() if times else None,
            on_http_now=self._on_http_now(selected, nodes),
            still_on_http=tuple(
                OnHttp(c.node, c.address, c.workstation, c.last_seen)
                for c in sorted(still, key=lambda c: c.node)  # (each node's newest first)
            ),
            last_rollouts=self._last_rollouts(others) if page and others else {},
            other_certificate=self._other_certificate(shown_servers)
            if (now_mixed := mixed(shown_servers)) is not None
            else frozenset(),
            dual_left_by=self.schema.left_dual(now_mixed.dual)
            if now_mixed is not None and now_mixed.dual
            else {},
        )

    def _other_certificate(self, servers: Mapping[str, str]) -> frozenset[str]:
        """``SchemaStore.other_certificates`` of ``servers``, by the heartbeats' word."""
        reported = self.served_reported() if self.served_reported is not None else {}
        return self.schema.other_certificates(servers, reported)

    def _last_rollouts(self, names: Sequence[str]) -> dict[str, str]:
        """The last rollout each of ``names`` was in (the newest by its epoch: one per
        rollout, in the order they were made; two made within the same second had the same
        ``created_at``, and which of them a node showed was SQLite's choice: review s63 v1
        L4), for the page's other nodes: read again only after a write that moved
        ``Database.generation`` (a new rollout, an enrolment; not a rollout's steps) or one by
        another connection, as the enrolled nodes' rows (``_enrolled``). The generation and
        ``Database.cache`` are looked at, and the mark left, under the store's lock, as the
        read (review s63 v1 L2: the mark was left after the read, outside the lock, where
        ``Database.cache`` is neither to be read nor written: a writer copies it as it
        releases the lock, ``Database._settle``)."""
        with self.store.db.read() as db:
            cache, generation = self.store.db.cache, self.store.db.generation
            kept = self._touched
            if kept is None or kept[0] != generation or cache.get(_TOUCHED_READ) is not kept[1]:
                # (SQLite takes a bare column from the row of the max(): the newest epoch's)
                found = {
                    r[0]: r[1]
                    for r in db.execute(
                        "SELECT n.name, r.id, max(r.epoch) FROM rollout_nodes n"
                        " JOIN rollouts r ON r.id = n.rollout_id GROUP BY n.name"
                    )
                }
                mark = object()
                cache[_TOUCHED_READ] = mark
                kept = self._touched = (generation, mark, found)
        return {name: kept[2][name] for name in names if name in kept[2]}

    def _on_http_now(
        self, selected: dict[str, Any] | None, nodes: Sequence[NodeStatus]
    ) -> frozenset[str]:
        """Of the nodes the selected rollout's way back left as is, those online whose server
        runs http only by their latest heartbeat (``live_server``): on http since (review
        s46rev3 M1: a node left as is that was on http all along kept the page's alert for
        good, a later `rollout rollback` having nothing to do)."""
        live = self.live_server
        left = selected.get("left_as_is", ()) if selected is not None else ()
        if live is None or not left:
            return frozenset()
        online = {n.name for n in nodes if n.online}
        return frozenset(
            name for name in left if name in online and live(name).split(" ")[0] == "http"
        )

    def forget_pages(self) -> None:
        """What was kept for the pages' next reads: their nodes' fields and every timeline
        (the last open page closed: ``ViewerApp.events``; the next read makes them again).
        Who is still on http as a page's read has it goes too
        (``SchemaStore.forget_http_report``: a thousand workstations during a transitional
        phase, ~0.7 MiB). The enrolled nodes' rows stay: every read reads them, the metrics'
        too."""
        with self._lock:
            self._page_nodes.clear()
            self._timelines.clear()
        self.schema.forget_http_report()

    def _enrolled(self, db: sqlite3.Connection) -> list[sqlite3.Row]:
        """(Inside the read: ``SchemaStore.shown``.) The enrolled nodes' rows
        (``Store.node_rows``), read again only after a write that may have changed them: one
        that moved ``Database.generation`` on (every write but the routine ones, none of which
        changes what a page shows of a node: a heartbeat's own record, whose time the store
        keeps in memory too, and a rollout's steps), or one by another connection (which
        empties ``Database.cache``, where a read leaves its mark). A rollout writes many times
        a second, and each read of 500 rows was a third of a page's read (issue 15)."""
        cache, generation = self.store.db.cache, self.store.db.generation
        kept = self._rows
        if kept is not None and kept[0] == generation and cache.get(_ROWS_READ) is kept[1]:
            return kept[2]
        rows = Store.node_rows(db)
        mark = object()
        cache[_ROWS_READ] = mark
        self._rows = (generation, mark, rows)
        return rows

    def _data(
        self,
        message: schema_pb2.Schema,
        rows: Sequence[RolloutRow | RolloutHead],
        made: Made,
        *,
        keep: bool,
    ) -> dict[str, Any]:
        """``wire.to_dict(message)``, each rollout's nodes converted only when their view is
        not the one converted at the last read (``made``: the node views ``schema_message``
        made of ``rows``, by their record and detail; a view made before is the same object
        while its node is unchanged: ``rollout_view``), so a node's data is shared by the
        snapshots that show it unchanged (read-only). ``keep``: keep what this read converted
        (not for ``every``: the API's read of every stored rollout would push out what the
        open pages show)."""
        outer = schema_pb2.Schema()
        outer.CopyFrom(message)
        for view in outer.rollouts:
            del view.nodes[:]
        data = wire.to_dict(outer)
        for item, row in zip(data["rollouts"], rows, strict=True):
            if not isinstance(row, RolloutRow) or not row.nodes:
                continue
            with self._lock:
                kept = self._node_data.get(row.rollout.id, {})
            fresh: dict[int, tuple[schema_pb2.NodeView, dict[str, Any]]] = {}
            nodes = []
            for rec, d in row.nodes:
                shown = made[(id(rec), id(d))][3]
                hit = kept.get(id(shown))
                found = hit if hit is not None and hit[0] is shown else (shown, wire.to_dict(shown))
                fresh[id(shown)] = found  # (the view held: its id stays its own)
                nodes.append(found[1])
            item["nodes"] = nodes
            if keep:
                self._keep(self._node_data, row.rollout.id, fresh)
        return data

    def _page_data(
        self,
        message: schema_pb2.Schema,
        rows: Sequence[RolloutRow | RolloutHead],
        pending: set[str],
        on_http: Counter[str],
    ) -> dict[str, Any]:
        """A page's ``data``: ``wire.to_dict(message)`` (made of ``rows`` without their
        nodes), each rollout's nodes with their ``ROW_FIELDS``, made again only for a node
        whose record or detail is not the one of the last read (the store keeps a rollout's
        unchanged ones) or whose row shows another leader, password or report mark; kept for
        the next read. No node view is kept (one with its steps' times is ~3 KiB of protobuf's
        memory) and ``schema`` carries none (issue 15: the leader's memory with a page open at
        500 nodes)."""
        data = wire.to_dict(message)
        for item, row in zip(data["rollouts"], rows, strict=True):
            if not isinstance(row, RolloutRow) or not row.nodes:
                continue
            with self._lock:
                kept = self._page_nodes.get(row.rollout.id, {})
            fresh: dict[tuple[int, int], _PageNode] = {}
            nodes = []
            leader = row.meta.leader_node
            reported = self.store.report_since_start
            # (counted only where the change takes http away, as ``rollout_view`` shows it)
            counts = row.rollout.change in COUNTS_ON_HTTP
            for rec, d in row.nodes:
                key = (id(rec), id(d))
                awaiting = awaits_report(row.rollout, row.meta.when_quiet, rec, reported)
                marks = (
                    rec.name == leader,
                    rec.name in pending,
                    awaiting,
                    not awaiting and waits_until_quiet(row.rollout, row.meta.when_quiet, rec),
                    on_http[rec.name] if counts else 0,
                )
                hit = kept.get(key)
                if (
                    hit is None
                    or hit.record is not rec
                    or hit.detail is not d
                    or hit.marks != marks
                ):
                    leads, pending_password, awaiting, quiet, on_http_now = marks
                    view = node_view(
                        rec,
                        d,
                        (leads, pending_password, on_http_now, awaiting, quiet),
                        row.rollout.change,
                    )
                    fields = {k: v for k, v in wire.to_dict(view).items() if k in ROW_FIELDS}
                    hit = _PageNode(rec, d, marks, fields)
                fresh[key] = hit
                nodes.append(hit.fields)
            item["nodes"] = nodes
            # (made of a head without its nodes, the view names none: ``rollout_view``)
            item["left_as_is"] = left_as_is_nodes(row.records)
            item["left_out"] = left_out_nodes(row.records)
            item["left_cut_off"] = [
                r.name for r in row.records if r.state is NodeState.SKIPPED and cut_off(r.reason)
            ]
            self._keep(self._page_nodes, row.rollout.id, fresh)
        return data

    def _timeline(self, rollout_id: str) -> dict[str, tuple[Transition, ...]]:
        """The rollout's transitions: what was read before, and the audit events since."""
        with self._lock:
            after, kept = self._timelines.get(rollout_id, (0, {}))
        last, events = self.schema.history_after(rollout_id, after)
        if not events and last == after:
            return kept
        found = _timeline(events)
        timeline = dict(kept)
        for key, items in found.items():
            timeline[key] = kept.get(key, ()) + items
        self._keep(self._timelines, rollout_id, (last, timeline))
        return timeline

    def _keep(self, kept: OrderedDict[str, Any], rollout_id: str, value: Any) -> None:
        with self._lock:
            kept[rollout_id] = value
            kept.move_to_end(rollout_id)
            while len(kept) > KEPT_ROLLOUTS:
                kept.popitem(last=False)

    def own_renewed(self, kind: str, cert: x509.Certificate) -> None:
        """The leader's (``kind`` "leader") or the viewer's certificate was issued again:
        shown from now on (the expiry watch reads them from their files at every check; a
        reader that kept the first showed it as it neared its end, renewed long since)."""
        self.own_certs = tuple(
            replace(c, fingerprint=pki.fingerprint(cert), not_after=cert.not_valid_after_utc)
            if c.kind == kind
            else c
            for c in self.own_certs
        )

    def _served(self, enrolled: set[str]) -> tuple[CertStatus, ...]:
        """The certificate each node serves on 8443, by one query rather than from every
        stored rollout's nodes (``SchemaStore.served_certificates``), with its chain's end
        where that comes first (``SchemaStore.own_chain_ends``), as the expiry watch has it:
        of the ``enrolled`` nodes only (a removed node's stayed listed for good, later as
        expired, review s48rev2 M1), not one recorded before the name's last `tlsroll nodes
        remove` (the removed machine's, not that of a node enrolled again under its name,
        whatever it was revoked for), and each marked if it was revoked
        (``leader.expiry.served_now``: the watch's rule)."""
        served = {
            name: end
            for name, end in served_now(
                self.store,
                self.schema,
                reported=self.served_reported() if self.served_reported is not None else None,
            ).items()
            if name in enrolled
        }
        chains = self.schema.own_chain_ends() if served else {}
        found = []
        for name, (fingerprint, not_after, revoked) in sorted(served.items()):
            end, chain = served_end(not_after, chains.get(fingerprint))
            found.append(
                CertStatus(
                    "server",
                    name,
                    fingerprint,
                    not_after,
                    chain=chain,
                    chain_end=end if chain else None,
                    revoked=revoked,
                )
            )
        return tuple(found)

    def _workstations(self, now: dt.datetime) -> tuple[CertStatus, ...]:
        """The workstations' certificates the expiry watch lists (``watched_workstations``:
        not revoked, until they end, a name's newest for ``expiry_warning_days`` after), by
        name: the page's "near expiry" lists those within ``expiry_warning_days``, as the
        watch warns of them (review s48: the page left them out)."""
        certs = self.store.workstation_certificates(now - self.warning)
        return tuple(
            CertStatus("workstation", c.subject, c.fingerprint, c.not_after)
            for c in sorted(
                watched_workstations(certs, now, self.warning),
                key=lambda c: (c.subject, c.not_after),
            )
        )


def _timeline(events: Sequence[AuditEvent]) -> dict[str, tuple[Transition, ...]]:
    found: dict[str, list[Transition]] = {}
    for event in events:
        if event.kind == "rollout.created":
            key, old, new = "", "", str(event.detail.get("state", ""))
        elif event.kind in ("rollout.state", "node.state"):
            key = event.subject.partition("/")[2]
            old, new = str(event.detail.get("old", "")), str(event.detail.get("new", ""))
        else:
            continue
        reason = str(event.detail.get("reason", ""))
        found.setdefault(key, []).append(
            Transition(event.at, intern(old), intern(new), reason, intern(event.actor))
        )
    return {key: tuple(items) for key, items in found.items()}
