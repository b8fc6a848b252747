"""The update schema, durable: rollouts and their nodes in the leader's SQLite file.

The pure records (``Rollout``, ``NodeRecord`` from ``rollout_core``) are stored beside what the
schema shows about them (times, addresses, certificates, freeze windows). Every state change
is written together with an audit event in one transaction, so the schema and its history
never disagree. Clocks are passed in.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import sqlite3
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast, overload

from leader.db import LeaderStore
from leader.mixed_cluster import https_only
from leader.planner import Census, UnknownNodes, settles
from leader.rollout_core import (
    CHANGES,
    TERMINAL_ROLLOUT_STATES,
    Change,
    Client,
    FreezeMode,
    NodeRecord,
    NodeState,
    Rollout,
    RolloutState,
    Scope,
    ScopeKind,
    Strategy,
)
from leader.store import (
    NODE_AUTH_CACHE,
    IssuedCert,
    cut_off_in,
    record_certificate_in,
    revoke_never_delivered_in,
    revoke_superseded_in,
    revoke_undelivered_in,
)
from tlsroll import logs
from tlsroll.errors import TerminalError, TransientError
from tlsroll.sqlite import from_text, to_text

log = logs.get_logger(__name__)

_TERMINAL = tuple(s.value for s in TERMINAL_ROLLOUT_STATES)
_ACTIVE = f"state NOT IN ({', '.join('?' * len(_TERMINAL))})"  # a rollout not yet ended

_REMOVED = "SELECT name FROM nodes WHERE removed_at IS NOT NULL"  # few: no list of names
_CURRENT_EPOCH = (  # ``current_epoch``
    "SELECT MAX(COALESCE((SELECT MAX(epoch) FROM rollouts), 0),"
    " COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'epoch_floor'), 0))"
)

_NODE_DETAIL_FIELDS = (
    "old_url",
    "new_url",
    "cert_fingerprint",
    "cert_not_after",
    "freeze_started_at",
    "freeze_ended_at",
    "restart_seconds",
    "bootstrap_port",
    "freeze_seconds",
)


@dataclass(frozen=True)
class RolloutMeta:
    """What the schema shows about a rollout beyond its pure record."""

    created_at: dt.datetime
    started_by: str
    leader_node: str
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    reason: str = ""
    auth_version: int = 0
    undoes: str = ""  # disable-tls: the id of the rollout whose switch it takes back
    finalizes: str = ""  # finalize: the transitional rollout whose phase 2 this is
    when_quiet: int = 0  # finalize --when-quiet: seconds without an http client per node
    # A retry, or the way back of a named rollout: the nodes of the rollout it retries or takes
    # back that it left out, removed since (`tlsroll nodes remove`; ``leader.db._V14``).
    removed_since: tuple[str, ...] = ()
    # Whether ``reason`` offers the way back to http (``tlsroll rollout rollback``:
    # ``rollout_core.way_out``), written with it; None: not known (``leader.db._V16``).
    way_back_offered: bool | None = False
    # enable-tls, rotate-cert: the practice's own certificates (``--cert-dir``: its practice CA
    # is kept under ``own_ca/<id>``), and per node it gives one, the SPKI pin of the CA that
    # certificate's chain ends at (``own_pins/<id>``; ``own_ca_pins``). Pins only in a rollout
    # read whole (``SchemaStore.get``), not in a ``RolloutHead``.
    own_certificates: bool = False
    own_ca_pins: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StagedAuth:
    """An auth password version as staged (``staged_password``): the verifier stays here."""

    version: int
    staged_by: str
    staged_at: dt.datetime | None
    live_on: tuple[str, ...] = ()  # the nodes that run it now


@dataclass(frozen=True)
class NodeDetail:
    """What the schema shows about a node beyond its pure record."""

    old_url: str = ""
    new_url: str = ""
    cert_fingerprint: str = ""
    cert_not_after: dt.datetime | None = None
    freeze_started_at: dt.datetime | None = None
    freeze_ended_at: dt.datetime | None = None
    restart_seconds: float = 0.0
    bootstrap_port: int = 0
    steps: dict[str, list[str | None]] = field(default_factory=dict)
    # The freeze window's length as the agent measured it in elapsed time; None: not sent
    # (``freeze_window``).
    freeze_seconds: float | None = None

    @property
    def freeze_window(self) -> float | None:
        """The freeze window's length in seconds (``freeze_window``), None while it is open."""
        return freeze_window(self.freeze_started_at, self.freeze_ended_at, self.freeze_seconds)


@dataclass(frozen=True)
class AuditEvent:
    """One row of the audit trail."""

    at: dt.datetime
    actor: str
    kind: str  # "rollout.state", "node.state", ...
    subject: str  # a rollout id, or "<rollout id>/<node name>"
    detail: dict[str, Any]


@dataclass(frozen=True)
class BootstrapFailureRow:
    """Failed passwords at one node's bootstrap service from one source address."""

    node: str
    source: str
    workstation: str
    count: int
    first_at: dt.datetime
    last_at: dt.datetime


# The changes after which a node that ended in one of ``SERVING_STATES`` serves the rollout's
# certificate on 8443 (``served_certificates``; the tests' oracle reads the same, so a new one
# is in both). ``dual``: a transitional phase 1 (enable-tls) serves it beside http. Finalize
# (phase 2) is not here: it keeps the certificate phase 1 recorded, so that row stays the
# node's newest. A disable-tls takes a node (done or dual) back to http: it ends ``done``.
SERVES_NEW_CERT = (Change.ENABLE_TLS, Change.ROTATE_CERT)
SERVING_STATES = (NodeState.DONE, NodeState.DUAL)
FAILURES_KEPT = dt.timedelta(days=30)  # older rows are dropped when new ones come in
FAILURES_SHOWN = 100
# Per node: the sources that failed most recently (a node's agent reports at most 64 a
# message, and a compromised one could send new ones in every message: audit s33 M4), and the
# count a source adds up to (a message adds at most ``service.MAX_FAILURE_COUNT``).
MAX_FAILURE_ROWS = 256
MAX_FAILURE_TOTAL = 1_000_000_000


def _record_failures_in(
    db: sqlite3.Connection,
    node: str,
    failures: Sequence[BootstrapFailureRow],
    now: dt.datetime,
) -> None:
    """``SchemaStore.record_bootstrap_failures``'s rows, in the caller's transaction."""
    for f in failures:
        db.execute(
            "INSERT INTO bootstrap_failures"
            " (node, source, workstation, count, first_at, last_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(node, source) DO UPDATE SET"
            " workstation = excluded.workstation,"
            " count = MIN(count + excluded.count, ?),"
            " last_at = MAX(last_at, excluded.last_at)",
            (
                node,
                f.source,
                f.workstation,
                f.count,
                to_text(f.first_at),  # (the last one's before: review rvc of s66-misc, L3)
                to_text(f.last_at),
                MAX_FAILURE_TOTAL,
            ),
        )
    if failures:
        db.execute(
            "DELETE FROM bootstrap_failures WHERE node = ? AND source NOT IN (SELECT"
            " source FROM bootstrap_failures WHERE node = ?"
            " ORDER BY last_at DESC, source LIMIT ?)",
            (node, node, MAX_FAILURE_ROWS),
        )
    db.execute(
        "DELETE FROM bootstrap_failures WHERE last_at < ?",
        (to_text(now - FAILURES_KEPT),),
    )


@dataclass(frozen=True)
class CapRefusals:
    """PCs refused a certificate at a node for its hour's cap (``row``: source ``CAP_SOURCE``,
    the last one's workstation), counted in memory until the group commit adds them to the
    node's bootstrap failures (``Store.queue_count``). Before, each refusal was a transaction
    of its own, an fsync per call a stolen agent key could make the leader do, and a failure
    to write it (a full disk) was dropped without the store's health hearing of it."""

    row: BootstrapFailureRow

    @property
    def key(self) -> str:
        return self.row.source

    def merged(self, later: CapRefusals) -> CapRefusals:
        count = min(self.row.count + later.row.count, MAX_FAILURE_TOTAL)
        return CapRefusals(
            replace(later.row, count=count, first_at=min(self.row.first_at, later.row.first_at))
        )

    def write(self, db: sqlite3.Connection) -> None:
        _record_failures_in(db, self.row.node, [self.row], self.row.last_at)


@dataclass(frozen=True)
class ClientsInfo:
    """How a node's agent last reported its clients (``ClientsView`` without the list)."""

    node: str
    window_seconds: int
    source: str
    problem: str
    first_report: dt.datetime
    reported_at: dt.datetime
    last_http_at: dt.datetime | None


MAX_CLIENTS = 256  # per node, as the agent sends at most
CLIENTS_FULL = (
    f"more clients seen than a report carries ({MAX_CLIENTS}): one on http may be left out, "
    "so who is on http cannot be told"
)
"""A node's report problem while its stored clients are at ``MAX_CLIENTS``. An agent reports
the ``MAX_CLIENTS`` most recently seen and the leader keeps as many (``write_clients``): past
that, a workstation on http can be left out, its sighting missing from the node's last http
time and from its clients, and ``--when-quiet`` took the node for quiet (a plain finalize's
refusal, the schema and the viewer missed the workstation). Below the cap nothing seen
within the window was left out: a row is dropped only while the node is at the cap, and only
when older than every row kept, so the cap is left only once what was dropped has expired.
Who is on http there cannot be told, as with a report naming a problem: the when-quiet node
waits, a plain finalize refuses it (``--force`` goes on), the schema says why."""


@dataclass(frozen=True)
class Shown:
    """What a view of the schema shows together, read at one moment (``SchemaStore.shown``)."""

    rows: list[RolloutRow | RolloutHead]
    total: int  # how many rollouts are stored (as ``newest`` counts them; 0: not counted)
    pending: set[str]  # ``pending_password_nodes``
    clients: list[Client]  # ``clients_report``
    infos: dict[str, ClientsInfo]
    nodes: list[sqlite3.Row]  # what ``shown``'s ``nodes`` read (the enrolled nodes' rows)
    behind: PasswordBehind | None = None  # ``password_behind``


@dataclass(frozen=True)
class PasswordBehind:
    """The newest staged auth password (never the verifier) and the nodes whose live one is
    older, each with the version it runs (``SchemaStore.password_behind``): what a
    change-password that ended part way left (review s69 revpass3 M1)."""

    staged: StagedAuth
    nodes: tuple[tuple[str, int], ...]  # (node, live version), by name


@dataclass(frozen=True)
class RolloutHead:
    """A rollout as a line of a list (``SchemaStore.listed``): its record and meta, not its
    nodes (their rows are not read). Not a ``RolloutRow``: it has no ``nodes``, ``node()`` or
    ``census``, so it cannot be taken for a rollout read whole."""

    rollout: Rollout
    meta: RolloutMeta


@dataclass(frozen=True)
class RolloutRow:
    """A rollout as stored. Rows are shared (``SchemaStore`` keeps the active one in memory
    and hands out the same object): never change one, not even ``NodeDetail.steps``."""

    rollout: Rollout
    meta: RolloutMeta
    nodes: tuple[tuple[NodeRecord, NodeDetail], ...]

    @functools.cached_property
    def records(self) -> tuple[NodeRecord, ...]:
        return tuple(r for r, _ in self.nodes)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {r.name: i for i, (r, _) in enumerate(self.nodes)}

    @functools.cached_property
    def census(self) -> Census:
        """Where its nodes stand (``planner.Census``): counted once per rollout read, then
        moved along with each record this store saves (``_patch``)."""
        return Census.of(self.records)

    @property
    def record_view(self) -> Sequence[NodeRecord]:
        """``records`` without building them: for ``planner.next_actions`` with the
        ``census``, which reads only the records it names."""
        return _Records(self.nodes)

    def node(self, name: str) -> tuple[NodeRecord, NodeDetail]:
        """The record and detail of node ``name`` (KeyError if not in the rollout)."""
        return self.nodes[self._index[name]]

    def position(self, name: str) -> int:
        """Where node ``name`` is in ``nodes`` (the rollout's order; KeyError if not in it)."""
        return self._index[name]


Then = Callable[["RolloutRow"], tuple[Sequence[NodeRecord], Sequence["StepTime"]]]
"""``SchemaStore.save_states``' ``then``: the records a write moves next, and their steps."""


class _Records(Sequence[NodeRecord]):
    """The records of a row's ``nodes``, read one by one (``RolloutRow.record_view``)."""

    def __init__(self, nodes: tuple[tuple[NodeRecord, NodeDetail], ...]) -> None:
        self._nodes = nodes

    def __len__(self) -> int:
        return len(self._nodes)

    @overload
    def __getitem__(self, i: int) -> NodeRecord: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[NodeRecord]: ...

    def __getitem__(self, i: int | slice) -> NodeRecord | Sequence[NodeRecord]:
        if isinstance(i, slice):
            return tuple(r for r, _ in self._nodes[i])
        return self._nodes[i][0]


@dataclass
class Revocation:
    """Revoke the server certificates ``node`` served before ``live_fingerprint`` (see
    ``leader.store.revoke_superseded_in``), with the write of its end; ``serials``: those
    revoked."""

    node: str
    live_fingerprint: str
    before: dt.datetime
    serials: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StepTime:
    """When ``step`` started (kept if one is stored: the first start counts) or ended on
    ``node``, written with the node's record (``SchemaStore.save_states``)."""

    node: str
    step: str
    started: dt.datetime | None = None
    ended: dt.datetime | None = None


@dataclass
class IfCutOff:
    """What a write (``SchemaStore.save_states``) leaves instead of the records, step times,
    passwords and revocations it is given if node ``node``'s agent is cut off, which the write
    decides in its own transaction (``leader.store.cut_off_in``): a revocation that commits
    after the caller last looked, even while the write waits for the store, is seen. A
    switch's outcome written with its confirm's (``leader.engine``): the switch's alone, for
    a node cut off mid-switch. ``taken``: set by the write, whether it left these."""

    node: str
    nodes: Sequence[NodeRecord]
    steps: Sequence[StepTime] = ()
    auth: Mapping[str, int | None] = field(default_factory=dict)
    revoke: Sequence[Revocation] = ()
    taken: bool = False


# Rollouts kept in memory (``SchemaStore.get``), the most recently used: the live one, a
# transitional phase 1 awaiting its finalize beside it, and the newest ended one (what
# `schema show` draws). A 500-node rollout's row is about 0.9 MiB of Python objects: 8 kept
# the last eight rollouts' rows, ~7 MiB at 500 nodes, for the leader's life.
ROWS_KEPT = 3


class SchemaStore(LeaderStore):
    """Rollouts, their nodes, auth password versions, failed bootstrap attempts."""

    # --- reading ------------------------------------------------------------------------------

    def next_epoch(self) -> int:
        return self.current_epoch() + 1

    def current_epoch(self) -> int:
        """The newest rollout's epoch, or the floor ``tlsroll epoch advance`` set if higher:
        what the leader tells agents in heartbeats, the highest epoch it asked for."""
        with self._db.read() as db:
            row = db.execute(_CURRENT_EPOCH).fetchone()
        return int(row[0])

    def _live(self, db: sqlite3.Connection) -> tuple[tuple[str, str], ...]:
        """Under the lock: the rollouts not yet ended, (id, state), newest first; kept in
        memory (``Database.cache``) until a rollout is created or changes state."""
        kept = self._db.cache.get(_LIVE)
        if kept is None:
            rows = db.execute(
                f"SELECT id, state FROM rollouts WHERE {_ACTIVE} ORDER BY epoch DESC",  # noqa: S608
                _TERMINAL,
            ).fetchall()
            kept = self._db.cache[_LIVE] = tuple((r["id"], r["state"]) for r in rows)
        return cast(tuple[tuple[str, str], ...], kept)

    def live_ids(self) -> frozenset[str]:
        """The ids of the rollouts not yet ended (from memory, as ``active`` reads them): a
        stage an agent keeps for one of them may still be switched (``ended_among``)."""
        with self._db.read() as db:
            return frozenset(rollout_id for rollout_id, _ in self._live(db))

    def ended_among(self, rollout_ids: Iterable[str]) -> dict[str, bool]:
        """Which of ``rollout_ids`` the store knows, and whether each has ended (a terminal
        state, which is for good: a retry is a new rollout). A rollout not stored is not in
        it (a store begun again knows nothing of it; nothing says it has ended)."""
        ids = sorted(set(rollout_ids))
        known: dict[str, bool] = {}
        with self._db.read() as db:
            for at in range(0, len(ids), 500):
                chunk = ids[at : at + 500]
                rows = db.execute(
                    f"SELECT id, state FROM rollouts WHERE id IN ({', '.join('?' * len(chunk))})",  # noqa: S608
                    chunk,
                ).fetchall()
                known.update((str(r["id"]), r["state"] in _TERMINAL) for r in rows)
        return known

    def active(self) -> RolloutRow | None:
        """The newest rollout that is not yet in a terminal state, if any (one, or a
        transitional one awaiting finalize and its finalize)."""
        with self._db.read() as db:  # one read: never a rollout that ended meanwhile
            live = self._live(db)
            return self._get(db, live[0][0]) if live else None

    def refuse_if_busy(self, follows: str = "") -> None:
        """``RolloutBusy`` if a rollout not yet ended keeps a new one from starting (``create``
        checks it again in its transaction); ``follows``: the rollout a finalize or a way back
        follows, which may await finalize beside it. A start asks it before it asks the agents:
        the refusal then names the rollout, not a node busy switching (audit s39race M4);
        ``SetPassword``'s ``check_only`` before a password is shown (what ``stage_password``
        refuses)."""
        with self._db.read() as db:
            _refuse_if_busy(db, follows)

    def refuse_if_settled(self, rollout_id: str) -> None:
        """``FollowerCompleted`` if ``rollout_id`` awaits finalize and its finalize or its way
        back has completed (``_refuse_if_busy`` says it too): asked before a finalize's other
        checks, which judged nodes the way back had put on http only."""
        with self._db.read() as db:
            row = db.execute("SELECT state FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            waiting = row is not None and row["state"] == RolloutState.AWAITING_FINALIZE.value
            if waiting and (ended := _settled_by(db, rollout_id)) is not None:
                raise FollowerCompleted(rollout_id, *ended)

    def retried_by(self, rollout_id: str) -> tuple[str, str] | None:
        """The rollout that retried ``rollout_id`` and its state, if one was created
        (``create``'s ``retry_of``); None: not retried (or retried before this was kept)."""
        with self._db.read() as db:
            return _retried_by(db, rollout_id)

    def peek_active(self) -> tuple[bool, RolloutRow | None]:
        """``active()`` from memory, without waiting (``Database.peek``): (True, what it would
        return), or (False, None) if that is not known now (then call ``active`` in a worker
        thread). The engine asks this at every pass."""
        live = self._db.peek(_LIVE)
        if live is None:
            return False, None
        if not live:
            return True, None
        rollout_id, state = live[0]
        row = self.kept(rollout_id)
        if row is None or row.rollout.state.value != state:  # a write came between the looks
            return False, None
        return True, row

    def peek_awaiting(self) -> tuple[bool, list[RolloutRow]]:
        """``awaiting()`` without waiting, if it is known now to be none (the common case):
        (True, []); else (False, []) and ``awaiting`` it is, in a worker thread."""
        # Settled: a rollout a write under way makes awaiting is seen at the engine's next
        # pass, which that write's outcome brings.
        live = self._db.peek(_LIVE, settled=True)
        if live is None or any(state == _AWAITING for _, state in live):
            return False, []
        return True, []

    def latest(self) -> RolloutRow | None:
        with self._db.read() as db:
            row = db.execute("SELECT id FROM rollouts ORDER BY epoch DESC LIMIT 1").fetchone()
            return self._get(db, row["id"]) if row else None

    def get(self, rollout_id: str) -> RolloutRow | None:
        """The rollout as stored. Kept in memory once read (``Database.cache``): every write of
        this store updates the kept row in the same transaction, and a commit by another
        connection drops it, so the leader reads a rollout's N node rows once, not per step
        (issue 15), and still sees at once whatever an admin command wrote."""
        with self._db.read() as db:
            return self._get(db, rollout_id)

    def get_in(self, db: sqlite3.Connection, rollout_id: str) -> RolloutRow | None:
        """``get`` inside a read already held (``shown``)."""
        return self._get(db, rollout_id)

    def _get(self, db: sqlite3.Connection, rollout_id: str) -> RolloutRow | None:
        """Under the lock: ``get`` (for a read that also looks at something else)."""
        kept = self._db.cache.get(_key(rollout_id))
        if kept is not None:
            return cast(RolloutRow, kept)
        row = self._read(db, rollout_id)
        if row is not None:
            self._keep(row)
        return row

    def kept(self, rollout_id: str, *, settled: bool = False) -> RolloutRow | None:
        """The rollout as ``get`` would return it, if it is kept in memory and can be had
        without waiting (``Database.peek``); None: ``get`` it in a worker thread. For the
        event loop: most of a step's reads of its rollout need no thread. ``settled``: while
        a write holds the store, the rollout as the last write left it (``Database.peek``):
        for a caller whose write checks the records it read (``save_states``), or that reads
        what a write under way does not change."""
        row = self._db.peek(_key(rollout_id), settled=settled)
        return cast(RolloutRow, row) if row is not None else None

    def _keep(self, row: RolloutRow) -> None:
        """Under the lock: keep ``row`` as what the file holds (at most ``ROWS_KEPT`` rows)."""
        cache = self._db.cache
        key = _key(row.rollout.id)
        cache.pop(key, None)
        cache[key] = row
        rows = [k for k in cache if isinstance(k, tuple) and k[0] == _ROWS]
        for old in rows[: max(len(rows) - ROWS_KEPT, 0)]:
            del cache[old]

    @staticmethod
    def _read(db: sqlite3.Connection, rollout_id: str) -> RolloutRow | None:
        r = db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if r is None:
            return None
        rows = db.execute(
            "SELECT * FROM rollout_nodes WHERE rollout_id = ?", (rollout_id,)
        ).fetchall()
        rollout, meta = _head(r)
        by_name = {row["name"]: row for row in rows}
        nodes = tuple(_node(by_name[name]) for name in rollout.order)
        own = db.execute(
            "SELECT key, value FROM meta WHERE key IN (?, ?)",
            (f"{_OWN_CA}{rollout_id}", f"{_OWN_PINS}{rollout_id}"),
        ).fetchall()
        if own:
            found = {str(k).split("/", 1)[0] + "/": str(v) for k, v in own}
            pins = _own_pins(rollout_id, found.get(_OWN_PINS), found.get(_OWN_CA), nodes)
            meta = replace(meta, own_certificates=True, own_ca_pins=pins)
        return RolloutRow(rollout, meta, nodes)

    def _rows(self, db: sqlite3.Connection, ids: Sequence[str]) -> list[RolloutRow]:
        """Under the lock: the rollouts ``ids`` (those still stored), kept ones from memory; a
        listing of the history does not push the active rollout out of memory."""
        found = (self._db.cache.get(_key(i)) or self._read(db, i) for i in ids)
        return [cast(RolloutRow, row) for row in found if row is not None]

    def all(self) -> list[RolloutRow]:
        with self._db.read() as db:
            return self.all_in(db)

    def all_in(self, db: sqlite3.Connection) -> list[RolloutRow]:
        """``all`` inside a read already held (``shown``)."""
        ids = [r["id"] for r in db.execute("SELECT id FROM rollouts ORDER BY epoch DESC")]
        return self._rows(db, ids)

    def listed(self, whole: str | None = None) -> list[RolloutRow | RolloutHead]:
        """Every stored rollout, newest first, for a list of them (the viewer's page): the
        newest and ``whole`` read whole (``RolloutRow``), the others as a ``RolloutHead``
        (their node rows are not read). ``all`` builds every rollout whole, about 0.9 MiB of
        objects per stored 500-node rollout, and an open page looked again at each write
        (issue 15)."""
        with self._db.read() as db:
            return self.listed_in(db, whole)

    def listed_in(
        self, db: sqlite3.Connection, whole: str | None = None
    ) -> list[RolloutRow | RolloutHead]:
        """``listed`` inside a read already held (``shown``)."""
        heads = db.execute("SELECT * FROM rollouts ORDER BY epoch DESC").fetchall()
        # (a range of the key, which the key's index answers; LIKE read every row)
        own = {
            str(r[0])[len(_OWN_CA) :]
            for r in db.execute(
                "SELECT key FROM meta WHERE key >= ? AND key < ?", (_OWN_CA, _OWN_CA[:-1] + "0")
            )
        }
        listed: list[RolloutRow | RolloutHead] = []
        for i, r in enumerate(heads):
            rollout_id = r["id"]
            if i == 0 or rollout_id == whole:
                row = self._db.cache.get(_key(rollout_id)) or self._read(db, rollout_id)
                if row is not None:
                    listed.append(cast(RolloutRow, row))
            else:
                rollout, meta = _head(r)
                if rollout_id in own:
                    meta = replace(meta, own_certificates=True)
                listed.append(RolloutHead(rollout, meta))
        return listed

    def switch_times(self) -> tuple[list[float], list[float]]:
        """Of every node of every stored rollout: its freeze windows (seconds, where both ends
        are recorded: ``freeze_window``) and its server's restarts (seconds, where one was
        timed); for the viewer's metrics, without reading the rollouts whole (``listed``)."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT freeze_started_at, freeze_ended_at, freeze_seconds, restart_seconds"
                " FROM rollout_nodes"
                " WHERE (freeze_started_at IS NOT NULL AND freeze_ended_at IS NOT NULL)"
                " OR restart_seconds > 0"
            ).fetchall()
        windows, restarts = [], []
        for began, ended, measured, restart in rows:
            window = freeze_window(from_text(began), from_text(ended), measured)
            if window is not None:
                windows.append(window)
            timed = measured_seconds(restart)
            if timed:
                restarts.append(timed)
        return windows, restarts

    def undo_rows(self, rollout_id: str | None) -> list[RolloutRow]:
        """What ``planner.undo_target`` reads for a disable-tls start, newest first: the
        rollout it takes back (``rollout_id``, else the newest enable-tls rollout) and the
        rollouts recorded as taking that one back (``RolloutMeta.undoes``). Not every rollout
        ever stored: each is about 0.9 MiB of objects at 500 nodes, and the history only grows
        (issue 15). None stored: []. Not named: the newest enable-tls rollout that switched a
        node (done or dual), else the newest (a newer one that switched none refused the whole
        way back, "switched no node", while an older one's nodes ran https: s67 engine2)."""
        with self._db.read() as db:
            if not rollout_id:
                row = (
                    db.execute(
                        "SELECT id FROM rollouts AS r WHERE change = ? AND EXISTS (SELECT 1 FROM"
                        " rollout_nodes AS n WHERE n.rollout_id = r.id AND n.state IN (?, ?))"
                        " ORDER BY epoch DESC LIMIT 1",
                        (Change.ENABLE_TLS.value, NodeState.DONE.value, NodeState.DUAL.value),
                    ).fetchone()
                    or db.execute(
                        "SELECT id FROM rollouts WHERE change = ? ORDER BY epoch DESC LIMIT 1",
                        (Change.ENABLE_TLS.value,),
                    ).fetchone()
                )
                if row is None:
                    return []
                rollout_id = str(row["id"])
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM rollouts WHERE id = ? OR undoes = ? ORDER BY epoch DESC",
                    (rollout_id, rollout_id),
                )
            ]
            return self._rows(db, ids)

    def newest(self, limit: int) -> tuple[list[RolloutRow], int]:
        """The newest ``limit`` rollouts (newest first) and how many are stored: ``schema
        show`` draws the active or latest one, not every rollout ever stored."""
        with self._db.read() as db:
            return self.newest_in(db, limit)

    @staticmethod
    def count_in(db: sqlite3.Connection) -> int:
        """How many rollouts are stored (inside a read already held)."""
        return int(db.execute("SELECT count(*) FROM rollouts").fetchone()[0])

    def newest_in(self, db: sqlite3.Connection, limit: int) -> tuple[list[RolloutRow], int]:
        """``newest`` inside a read already held (``shown``)."""
        total = self.count_in(db)
        ids = [
            r["id"]
            for r in db.execute(
                "SELECT id FROM rollouts ORDER BY epoch DESC LIMIT ?", (max(limit, 0),)
            )
        ]
        return self._rows(db, ids), total

    def served_certificates(self) -> dict[str, tuple[str, dt.datetime]]:
        """Per node, the certificate it serves on 8443 as the rollouts recorded it
        (fingerprint, end): that of the newest rollout of a change in ``SERVES_NEW_CERT``
        (enable-tls, rotate-cert) that ended in ``SERVING_STATES`` (``done``, or ``dual`` after
        a transitional phase 1) on the node with a certificate, unless a disable-tls that ended
        ``done`` came after it. One query that SQLite answers with a row
        per node: the expiry check behind every ``schema show`` and the viewer once drew every
        rollout ever stored for it (the tests keep that drawing as the oracle)."""
        with self._db.read() as db:
            return _served_certificates(db)

    def history(self, rollout_id: str) -> list[AuditEvent]:
        """The audit events of a rollout and of its nodes, oldest first: its timeline."""
        return self.history_after(rollout_id, 0)[1]

    def history_after(self, rollout_id: str, after: int) -> tuple[int, list[AuditEvent]]:
        """The audit events of a rollout and of its nodes written after the audit trail's
        ``seq`` ``after``, oldest first, and the trail's last ``seq`` as read (the ``after`` of
        the next call): the viewer reads a timeline again only from where it was (the trail
        is only ever appended to, one writer at a time)."""
        prefix = f"{rollout_id}/"
        with self._db.read() as db:
            last = db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0]
            rows = db.execute(
                "SELECT at, actor, kind, subject, detail FROM audit"
                " WHERE seq > ? AND seq <= ? AND (subject = ? OR substr(subject, 1, ?) = ?)"
                " ORDER BY seq",
                (after, last, rollout_id, len(prefix), prefix),
            ).fetchall()
        return last, [
            AuditEvent(
                at=dt.datetime.fromisoformat(r["at"]),
                actor=r["actor"],
                kind=r["kind"],
                subject=r["subject"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        ]

    def awaiting(self) -> list[RolloutRow]:
        """Transitional rollouts awaiting finalize (at most one, but read as a list)."""
        with self._db.read() as db:
            ids = [rollout_id for rollout_id, state in self._live(db) if state == _AWAITING]
            return self._rows(db, ids)

    def follower(self, rollout_id: str) -> RolloutRow | None:
        """The newest rollout that finalizes ``rollout_id`` or takes it back."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT id FROM rollouts WHERE finalizes = ? OR undoes = ?"
                " ORDER BY epoch DESC LIMIT 1",
                (rollout_id, rollout_id),
            ).fetchone()
            return self._get(db, row["id"]) if row else None

    # --- who each node's server has seen (from heartbeats) ------------------------------------

    def record_clients(
        self,
        node: str,
        clients: Sequence[Client],
        *,
        window_seconds: int,
        source: str,
        problem: str,
        now: dt.datetime,
    ) -> None:
        """Merge what ``node``'s agent reports into what it reported before (``write_clients``),
        in a transaction of its own (the leader's heartbeat path queues it for its group
        commit instead: ``leader.store.Store.queue_write``)."""
        with self._db.tx(routine=True) as db:
            write_clients(
                db,
                node,
                clients,
                window_seconds=window_seconds,
                source=source,
                problem=problem,
                now=now,
            )

    def clients(self, nodes: Sequence[str] | None = None) -> list[Client]:
        """What the agents last reported (of ``nodes``, or all), most recently seen first."""
        with self._db.read() as db:
            return _clients(db, nodes)

    def clients_info(self) -> dict[str, ClientsInfo]:
        with self._db.read() as db:
            return _clients_info(db)

    def clients_report(
        self, nodes: Sequence[str] | None = None
    ) -> tuple[list[Client], dict[str, ClientsInfo]]:
        """``clients(nodes)`` and ``clients_info()`` as one report: read together, so a report
        that commits meanwhile is in both or in neither. A node's summary (``reported_at``,
        ``last_http_at``) and its client rows are written together (``write_clients``); read
        apart, a newer report's sightings could meet an older summary's last http time and
        look like quiet (``finalize --when-quiet`` started a node whose workstation was still
        writing on http, session 32)."""
        with self._db.read() as db:
            return _clients(db, nodes), _clients_info(db)

    def shown(
        self,
        rollouts: Callable[[sqlite3.Connection], tuple[Sequence[RolloutRow | RolloutHead], int]],
        *,
        clients: bool = True,
        nodes: Callable[[sqlite3.Connection], list[sqlite3.Row]] | None = None,
        http_clients: bool = False,
    ) -> Shown:
        """What a view of the schema shows together (``schema show``, the viewer), in one read:
        the rollouts ``rollouts`` reads (with ``get_in``, ``newest_in``, ``all_in`` or
        ``listed_in``, and how many are stored), the nodes whose password is behind, the
        agents' client report (``clients_report``; unless not ``clients``) and the rows
        ``nodes`` reads (the enrolled nodes: ``Store.node_rows``). Read apart, a write between
        the reads showed a node ``done`` beside its old password, or a report beside rollouts
        from before it (session 32's audit, L3). One read is one moment: every writer of the
        leader's file shares this connection and its lock. The caller takes its ``now`` after
        this: a view's time is never before what it shows (a report newer than ``now`` had a
        negative age). ``http_clients`` (without ``clients``): of the report only what who is
        still on http is judged by (``_http_report``: kept between reads), the web page's."""
        with self._db.read() as db:
            rows, total = rollouts(db)
            pending = self._pending(db)
            if clients:
                seen, infos = _clients(db, None), _clients_info(db)
            elif http_clients:
                seen, infos = self._http_report(db)
            else:
                seen, infos = [], {}
            enrolled = nodes(db) if nodes is not None else []
            behind = self._behind(db, pending)
        return Shown(list(rows), total, pending, seen, infos, enrolled, behind)

    # What ``_http_report`` read last: the generation and count it was read at, its mark in
    # ``Database.cache`` (gone once another connection wrote or a transaction failed after
    # writing), the rows and the summaries. None: nothing kept (``forget_http_report``).
    _http_kept: tuple[tuple[int, int], object, list[Client], dict[str, ClientsInfo]] | None = None

    def _http_report(self, db: sqlite3.Connection) -> tuple[list[Client], dict[str, ClientsInfo]]:
        """(Inside ``shown``'s read.) ``_http_clients`` and ``_clients_info(http_only=True)``,
        read again only after a write that may have changed them: a client report written
        (``CLIENT_WRITES``: ``write_clients`` counts each, the group commit's and
        ``record_clients``'), a write that moved ``Database.generation`` on (a node removed,
        its report deleted with it; one enrolled again under its name), or one by another
        connection or a transaction that failed after writing (either empties
        ``Database.cache``, where a read leaves its mark). A rollout's steps, many a second,
        are none of these, nor is a report the leader did not store (the agents' reports that
        only move their times wait up to ``service.REFRESH_SECONDS`` for their group commit):
        a page's read after each step took the list again from SQLite, nearly every
        workstation during a transitional phase (review s63 v1 M2: 1000 workstations on http
        at 500 nodes, ~7 ms of each read). Nothing here depends on the time: who is still on
        http is judged against the reader's ``now`` (``schema_view.still_on_http_now``), so
        the kept rows stay right as time passes. Copies are handed out: a caller may not
        change what the next read is given."""
        stamp = (self._db.generation, CLIENT_WRITES.count)
        kept = self._http_kept
        if kept is None or kept[0] != stamp or self._db.cache.get(_HTTP_REPORT) is not kept[1]:
            mark = object()
            kept = (stamp, mark, _http_clients(db), _clients_info(db, http_only=True))
            self._db.cache[_HTTP_REPORT] = mark
            self._http_kept = kept
        return list(kept[2]), dict(kept[3])

    def forget_http_report(self) -> None:
        """What ``_http_report`` kept goes (the last open page closed:
        ``viewer.snapshot.Reader.forget_pages``); the next page's read reads it again."""
        self._http_kept = None

    # --- writing ------------------------------------------------------------------------------

    def create(
        self,
        rollout: Rollout,
        nodes: Sequence[NodeRecord],
        meta: RolloutMeta,
        now: dt.datetime,
        new_verifier: str | None = None,
        *,
        takes_back_once: bool = False,
        auth_latest: int | None = None,
        own_ca: bytes | None = None,
        own_chain_ends: Mapping[str, tuple[str, dt.datetime] | None] | None = None,
        retry_of: str = "",
        own_pins: Mapping[str, str] | None = None,
    ) -> RolloutRow:
        """Insert a new rollout, refusing if another one is active (checked in the same
        transaction, so two starts cannot both succeed). ``new_verifier`` adds the auth
        password the rollout applies, in the same transaction. A transitional rollout awaiting
        finalize lets only its finalize or its way back start beside it. ``takes_back_once``: a
        disable-tls rollout is refused (``AlreadyTakenBack``) if another one already takes back
        ``meta.undoes``, checked here too, so two rollbacks that crossed cannot both start.
        A node of ``nodes`` removed since the plan was made (``tlsroll nodes remove``, which
        refuses a node a rollout holds) is UnknownNodes, as a plan made after the removal.
        The epoch is made sure here: ``rollout.epoch`` (``next_epoch``, read when planning)
        if it is still above ``current_epoch``, else the next one (a floor raised by ``epoch
        advance`` or a relearn since, or another rollout created with it); the row returned
        has it.
        ``auth_latest``: the latest auth password version the rollout was planned with (a
        change-password's, which it applies); ``PasswordStagedMeanwhile`` if another has been
        staged since (None: not checked). ``own_ca``: a ``--cert-dir`` rollout's practice CA
        (``own_ca``), written with the rollout: written before, a start then refused left it
        trusted meanwhile by a running rollout's outside checks, and for good if the leader
        died between the write and its removal (session 32's audit, L2). ``own_chain_ends``:
        its certificates whose chain ends first (``byo.chain_ends``), kept with it
        (``own_chain_ends``), and per node the pin of the CA its certificate's chain ends at
        (``own_pins``: ``RolloutMeta.own_ca_pins``); the chain ends of earlier rollouts that no
        longer decide a served certificate's end are dropped here (``_prune_own_chains``).
        ``retry_of``: the rollout this one retries (``rollout retry``), retried once:
        ``AlreadyRetried`` if another retry of it was created, checked here so that two
        retries that crossed cannot both start (audit s39race H3); the link is kept
        (``retried_by``). ``meta.removed_since``: the nodes a retry or a way back left out,
        removed since, kept with the rollout and in its audit row (``leader.db._V14``)."""
        with self._db.tx() as db:
            _refuse_if_busy(db, meta.finalizes or meta.undoes)
            if retry_of:
                _refuse_if_retried(db, retry_of)
            if auth_latest is not None:
                now_latest = int(
                    db.execute("SELECT COALESCE(MAX(version), 0) FROM auth_versions").fetchone()[0]
                )
                if now_latest != auth_latest:
                    raise PasswordStagedMeanwhile(auth_latest, now_latest)
            removed = {r["name"] for r in db.execute(_REMOVED)} & {n.name for n in nodes}
            if removed:
                raise UnknownNodes(sorted(removed))
            (current,) = db.execute(_CURRENT_EPOCH).fetchone()
            if rollout.epoch <= int(current):
                rollout = replace(rollout, epoch=int(current) + 1)
            if takes_back_once and meta.undoes:
                by = db.execute(
                    "SELECT id, state FROM rollouts WHERE change = ? AND undoes = ?"
                    " ORDER BY epoch DESC LIMIT 1",
                    (Change.DISABLE_TLS.value, meta.undoes),
                ).fetchone()
                if by is not None:
                    raise AlreadyTakenBack(meta.undoes, by["id"], by["state"])
            auth_version = meta.auth_version
            if new_verifier is not None:
                auth_version = self._add_auth(db, new_verifier, now, meta.started_by)
            if own_ca is not None:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (f"own_ca/{rollout.id}", own_ca.decode("ascii")),
                )
            if own_pins:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (f"{_OWN_PINS}{rollout.id}", json.dumps(dict(sorted(own_pins.items())))),
                )
            _prune_own_chains(db)
            if own_chain_ends:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (
                        f"{_OWN_CHAIN}{rollout.id}",
                        json.dumps(
                            {
                                f: None if e is None else [e[0], e[1].isoformat()]
                                for f, e in own_chain_ends.items()
                            }
                        ),
                    ),
                )
            if retry_of:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    (f"{_RETRIED_BY}{retry_of}", rollout.id),
                )
            db.execute(
                "INSERT INTO rollouts (id, change, scope_kind, scope_names, node_order, strategy,"
                " max_parallel, failure_budget, freeze, epoch, state, created_at, started_at,"
                " started_by, leader_node, auth_version, undoes, finalizes, when_quiet,"
                " removed_since, way_back_offered)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (
                    rollout.id,
                    rollout.change.value,
                    rollout.scope.kind.value,
                    json.dumps(list(rollout.scope.names)),
                    json.dumps(list(rollout.order)),
                    rollout.strategy.value,
                    rollout.max_parallel,
                    rollout.failure_budget,
                    rollout.freeze.value,
                    rollout.epoch,
                    rollout.state.value,
                    to_text(meta.created_at),
                    to_text(meta.started_at),
                    meta.started_by,
                    meta.leader_node,
                    auth_version,
                    meta.undoes,
                    meta.finalizes,
                    meta.when_quiet,
                    json.dumps(list(meta.removed_since)) if meta.removed_since else None,
                ),
            )
            self._db.cache.pop(_LIVE, None)
            for n in nodes:
                db.execute(
                    "INSERT INTO rollout_nodes (rollout_id, name, state, reason)"
                    " VALUES (?, ?, ?, ?)",
                    (rollout.id, n.name, n.state.value, n.reason),
                )
            self._audit(
                db,
                now,
                meta.started_by,
                "rollout.created",
                rollout.id,
                change=rollout.change.value,
                scope=rollout.scope.kind.value,
                order=list(rollout.order),
                epoch=rollout.epoch,
                state=rollout.state.value,
                **({"removed_since": list(meta.removed_since)} if meta.removed_since else {}),
            )
        with self._db.read():
            self._db.cache.pop(_key(rollout.id), None)
        row = self.get(rollout.id)
        assert row is not None
        return row

    def save_states(
        self,
        before: RolloutRow,
        rollout: Rollout,
        nodes: Sequence[NodeRecord],
        now: dt.datetime,
        actor: str,
        reason: str | None = None,
        *,
        way_back: bool = False,
        steps: Sequence[StepTime] = (),
        details: Mapping[str, Mapping[str, Any]] | None = None,
        auth: Mapping[str, int | None] | None = None,
        only: Collection[str] | None = None,
        revoke: Sequence[Revocation] = (),
        then: Then | None = None,
        certs: Sequence[IssuedCert] = (),
        recorded: Callable[[], None] | None = None,
        if_cut_off: IfCutOff | None = None,
    ) -> RolloutRow:
        """Persist the records after a plan or an event, with one audit event per change, in
        one transaction that updates only the rows that changed (nothing, if nothing did):
        the rollout's state (and ``reason``, with ``way_back``: whether it offers the way back
        to http, ``RolloutMeta.way_back_offered``), the node records in ``nodes`` that differ from
        ``before``'s, step times (``steps``), what steps learnt about nodes (``details``: node
        name → fields as ``update_detail`` takes them) and the password now live on nodes
        (``auth``, as ``set_node_auth``) and the certificates a node now done no longer
        serves (``revoke``, as ``Store.revoke_superseded``; each one's ``serials`` filled in)
        and the certificates issued (``certs``, as ``Store.record_certificate``: a
        preflight's, signed from the CSR it brought back; if any are, ``recorded`` runs on
        this thread once they are durable, before the lock is released:
        ``Database.after_commit``). A step's outcome is thus one durable write.

        Optimistic: if the stored records are no longer ``before`` (an admin command and an
        engine verdict crossed), nothing is written and ``StaleRecords`` is raised; the caller
        reads again and decides again. ``only``: the caller decided from these nodes' records
        alone (one step's outcome): only they, and the rollout's state, must be as in
        ``before``; another node's step that ended meanwhile is no reason to decide again
        (with ten nodes in flight, every other outcome was refused once and written twice).
        The stored records are the ones kept in memory (``get``), read from the file only if
        none are. ``then``: given the row as this write leaves it, the node records it moves
        next and the steps they begin (the engine's plan after a step's outcome), written in
        the same transaction. ``if_cut_off``: what is written instead of ``nodes``, ``steps``,
        ``auth`` and ``revoke`` if its node's agent is cut off, decided in this transaction
        (one point read); its ``taken`` says which was.
        """
        for fields in (details or {}).values():
            _check_details(fields)
        for r in (*revoke, *(if_cut_off.revoke if if_cut_off is not None else ())):
            r.serials = []
        with self._db.tx(routine=True) as db:  # nothing a heartbeat keeps (but see revoke)
            base = self._db.cache.get(_key(before.rollout.id)) or self._read(db, before.rollout.id)
            if (
                base is None
                or base.rollout.state is not before.rollout.state
                or not (base is before or _same_records(base, before, only))
            ):
                raise StaleRecords(f"rollout {before.rollout.id} changed meanwhile")
            if if_cut_off is not None:
                if_cut_off.taken = cut_off_in(db, if_cut_off.node)
                if if_cut_off.taken:
                    nodes, steps = if_cut_off.nodes, if_cut_off.steps
                    auth, revoke = if_cut_off.auth, if_cut_off.revoke
            new_rollout, meta = base.rollout, base.meta
            base_state = base.rollout.state
            if rollout.state != base.rollout.state or reason is not None:
                ended = now if rollout.state in TERMINAL_ROLLOUT_STATES else None
                started = now if rollout.state is RolloutState.RUNNING else None
                self._db.cache.pop(_LIVE, None)
                offered = None if reason is None else int(way_back)
                db.execute(
                    "UPDATE rollouts SET state = ?, ended_at = COALESCE(ended_at, ?),"
                    " started_at = COALESCE(started_at, ?), reason = COALESCE(?, reason),"
                    " way_back_offered = COALESCE(?, way_back_offered) WHERE id = ?",
                    (
                        rollout.state.value,
                        to_text(ended),
                        to_text(started),
                        reason,
                        offered,
                        rollout.id,
                    ),
                )
                self._audit(
                    db,
                    now,
                    actor,
                    "rollout.state",
                    rollout.id,
                    old=base.rollout.state.value,
                    new=rollout.state.value,
                    reason=reason or "",
                )
                new_rollout = replace(base.rollout, state=rollout.state)
                meta = replace(
                    meta,
                    started_at=meta.started_at or _stored_time(started),
                    ended_at=meta.ended_at or _stored_time(ended),
                    reason=meta.reason if reason is None else reason,
                    way_back_offered=meta.way_back_offered if reason is None else way_back,
                )
            records = {}
            for rec in nodes:
                old = base.node(rec.name)[0]
                if rec is not old and rec != old:
                    records[rec.name] = rec
            row = _derived(base, rollout=new_rollout, meta=meta)
            row = self._patch(db, row, now, actor, records, steps, details or {})
            for name, version in (auth or {}).items():
                self._set_auth(db, name, version, now)
            for r in revoke:
                r.serials = revoke_superseded_in(
                    db, r.node, r.live_fingerprint, before=r.before, now=now
                )
            for cert in certs:  # routine as well (``Store.record_certificate``)
                record_certificate_in(
                    db, cert, actor="leader", now=now, rollout_id=before.rollout.id
                )
            if certs and recorded is not None:
                self._db.after_commit(recorded)
            touched = list(records)
            if then is not None:
                moved, begun = then(row)
                if moved or begun:
                    row = self._patch(db, row, now, actor, {r.name: r for r in moved}, begun, {})
                    touched += (r.name for r in moved)
            undelivered = _revoke_undelivered(db, base, row, touched, now)
            self._keep(row)
        if (
            undelivered
            or any(r.serials for r in revoke)
            or (
                row.rollout.state in TERMINAL_ROLLOUT_STATES and base_state is not row.rollout.state
            )
        ):
            # The heartbeat path keeps the revocation list, and which rollouts are live
            # (``SchemaStore.live_ids``: an agent's stage of one that ended goes).
            self._db.touch()
        return row

    def record_stage_certificate(
        self, rollout_id: str, cert: IssuedCert, *, now: dt.datetime
    ) -> bool:
        """Record the certificate a stage signed from CreateCSR's CSR (as
        ``Store.record_certificate``, routine) and say whether the stage may send it: False
        if the node's record in the rollout has already ended in ``UNDELIVERED_AT`` (an abort
        that skipped it while the stage was in CreateCSR or signing: the write that ended it
        revoked what was recorded for it then, ``_revoke_undelivered``, and this came after).
        Then it is revoked in the same write, "never delivered", not urgent: before, it
        stayed valid on record (``certs check-expiration``) until it expired (review s28,
        second review, L1). Only this one: a later rollout may have recorded others since."""
        with self._db.tx(routine=True) as db:
            record_certificate_in(db, cert, actor="leader", now=now, rollout_id=rollout_id)
            row = db.execute(
                "SELECT state FROM rollout_nodes WHERE rollout_id = ? AND name = ?",
                (rollout_id, cert.node),
            ).fetchone()
            if row is None or NodeState(row["state"]) not in UNDELIVERED_AT:
                return True
            revoke_never_delivered_in(db, cert.node, [cert.serial], now=now)
        self._db.touch()  # the heartbeat path keeps the revocation list
        return False

    def _patch(
        self,
        db: sqlite3.Connection,
        base: RolloutRow,
        now: dt.datetime | None,
        actor: str,
        records: Mapping[str, NodeRecord],
        steps: Sequence[StepTime],
        details: Mapping[str, Mapping[str, Any]],
    ) -> RolloutRow:
        """Inside a write transaction: one UPDATE per node whose record, step times or details
        differ from ``base``'s (an audit event per changed record); ``base`` after them."""
        nodes = None
        census = base.__dict__.get("census")  # moved along, if the row has counted it
        for name in dict.fromkeys([*records, *(t.node for t in steps), *details]):
            i = base._index[name]
            old, detail = base.nodes[i]
            rec = records.get(name, old)
            columns: dict[str, Any] = {}
            if rec != old:
                assert now is not None, "a record changes only with its time"
                columns.update(state=rec.state.value, reason=rec.reason)
                columns["scope_frozen"] = int(rec.scope_frozen)
                columns["freeze_asked"] = int(rec.freeze_asked)
                self._audit(
                    db,
                    now,
                    actor,
                    "node.state",
                    f"{base.rollout.id}/{name}",
                    old=old.state.value,
                    new=rec.state.value,
                    reason=rec.reason,
                )
            learnt: dict[str, Any] = {
                k: _stored_time(v) if isinstance(v, dt.datetime) else v
                for k, v in details.get(name, {}).items()
                if getattr(detail, k) != v
            }
            times = _with_times(detail.steps, [t for t in steps if t.node == name])
            if times != detail.steps:
                learnt["steps"] = times
            if learnt:
                detail = replace(detail, **learnt)
                columns.update({k: _column(v) for k, v in learnt.items()})
            if not columns:
                continue
            db.execute(
                f"UPDATE rollout_nodes SET {', '.join(f'{k} = ?' for k in columns)}"  # noqa: S608
                " WHERE rollout_id = ? AND name = ?",
                [*columns.values(), base.rollout.id, name],
            )
            nodes = nodes or list(base.nodes)
            nodes[i] = (rec, detail)
            if census is not None:
                census = census.moved(i, old, rec)
        if nodes is None:
            return base
        row = _derived(base, nodes=tuple(nodes))
        if census is not None:
            row.__dict__["census"] = census
        return row

    def detail_kept(self, rollout_id: str, name: str, changes: Mapping[str, Any]) -> bool:
        """True if the rollout kept in memory shows node ``name`` with ``changes`` already (as
        the last write left it): ``update_detail`` would write nothing, and the event loop
        need not hand it to the store's thread. False if not, or not known without waiting."""
        row = self.kept(rollout_id, settled=True)
        return row is not None and _unchanged(row, name, changes)

    def update_detail(self, rollout_id: str, name: str, **changes: Any) -> None:
        """Record what a step learnt about a node while it runs (a switch's freeze began): a
        no-op if the stored values are these already (the kept row says so without a write
        transaction). What a step learnt by its end goes with its outcome (``save_states``)."""
        _check_details(changes)
        with self._db.read():
            kept = self._db.cache.get(_key(rollout_id))
            if kept is not None and _unchanged(kept, name, changes):
                return
        with self._db.tx(routine=True) as db:  # nothing a heartbeat keeps
            base = self._db.cache.get(_key(rollout_id)) or self._read(db, rollout_id)
            if base is None or name not in base._index:
                return
            self._keep(self._patch(db, base, None, "engine", {}, (), {name: changes}))

    # --- the auth password (verifiers only) ---------------------------------------------------

    def _add_auth(self, db: sqlite3.Connection, verifier: str, now: dt.datetime, actor: str) -> int:
        cur = db.execute(
            "INSERT INTO auth_versions (version, verifier, created_at, actor) VALUES ("
            "(SELECT COALESCE(MAX(version), 0) + 1 FROM auth_versions), ?, ?, ?)",
            (verifier, to_text(now), actor),
        )
        version = int(
            db.execute(
                "SELECT version FROM auth_versions WHERE rowid = ?", (cur.lastrowid,)
            ).fetchone()[0]
        )
        self._audit(db, now, actor, "password.staged", f"auth/{version}")
        return version

    def stage_password(self, verifier: str, now: dt.datetime, actor: str) -> int:
        """Add a new auth password version, refused while a rollout is active."""
        with self._db.tx() as db:
            _refuse_if_busy(db)
            return self._add_auth(db, verifier, now, actor)

    # --- bring your own certificate (``--cert-dir``) ---------------------------------------
    # The practice CA a rollout's certificates chain to, kept in the ``meta`` table under
    # ``own_ca/<rollout id>`` (public; the keys are never stored). Its presence marks the
    # rollout as one with the practice's own certificates: the stage step hands the nodes
    # those, the confirm step checks https against this CA, retry is refused.

    def own_ca(self, rollout_id: str) -> bytes | None:
        """The practice CA of a ``--cert-dir`` rollout; None for the usual one."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT value FROM meta WHERE key = ?", (f"own_ca/{rollout_id}",)
            ).fetchone()
        return str(row["value"]).encode("ascii") if row else None

    def own_cas(self) -> bytes:
        """Every practice CA a ``--cert-dir`` rollout has used (PEM, each once): the nodes
        they went to hand them to their workstations with the cluster CA."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT value FROM meta WHERE key LIKE 'own\\_ca/%' ESCAPE '\\' ORDER BY key"
            ).fetchall()
        return b"".join(dict.fromkeys(str(r["value"]).encode("ascii") for r in rows))

    def own_chain_ends(self) -> dict[str, tuple[str, dt.datetime]]:
        """Of the certificates ``--cert-dir`` rollouts brought, by fingerprint, those whose
        chain ends before they do: the chain's certificate that ends first (subject, end),
        kept in ``meta`` under ``own_chain/<rollout id>`` (public) by ``create``. The newest
        rollout that brought a certificate decides: one whose chain was renewed since records
        None for it, which clears an earlier rollout's end (review s47rev5 M1: the ends of every
        rollout were merged by key, and a stale one stuck to the certificate for good)."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT m.value FROM meta m JOIN rollouts r ON m.key = 'own_chain/' || r.id"
                " ORDER BY r.epoch"
            ).fetchall()
        ends: dict[str, tuple[str, dt.datetime]] = {}
        for row in rows:
            for fingerprint, end in json.loads(row["value"]).items():
                if end is None:
                    ends.pop(str(fingerprint), None)
                else:
                    ends[str(fingerprint)] = (str(end[0]), dt.datetime.fromisoformat(end[1]))
        return ends

    def own_fingerprints(self) -> set[str]:
        """The certificates ``--cert-dir`` rollouts installed (nodes that ended ``done``, or
        ``dual``: a transitional phase 1's, which its finalize, a rollout of its own, leaves
        serving them; rev57a L1)."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT n.cert_fingerprint FROM rollout_nodes n"
                " JOIN meta m ON m.key = 'own_ca/' || n.rollout_id"
                " WHERE n.state IN ('done', 'dual') AND n.cert_fingerprint != ''"
            ).fetchall()
        return {str(r[0]) for r in rows}

    def other_certificates(
        self, servers: Mapping[str, str], reported: Mapping[str, str]
    ) -> frozenset[str]:
        """Of the nodes whose ``servers`` (``LeaderState.live_servers``) serve https only, those
        whose certificate, as their heartbeats said it (``reported``:
        ``LeaderState.served_fingerprints``), is neither a server certificate of this CA on
        record nor one a ``--cert-dir`` rollout installed (``own_fingerprints``): a cluster
        enable-tls would not find them "already done" and would replace the certificate (the
        practice's own https before tlsroll), so the way to switch the rest of a mixed cluster
        leaves them out (``leader.mixed_cluster``; review of s69, M). One whose agent names no
        certificate (an earlier release) is among them: not known to be left alone."""
        https = [n for n, s in servers.items() if https_only(s)]
        wanted = sorted({f for n in https if (f := reported.get(n, ""))})
        known: set[str] = set()
        if wanted:
            with self._db.read() as db:
                rows = db.execute(
                    "SELECT fingerprint FROM certificates WHERE kind = 'server'"
                    " AND fingerprint IN (SELECT value FROM json_each(?))"
                    " UNION SELECT n.cert_fingerprint FROM rollout_nodes n"
                    " JOIN meta m ON m.key = 'own_ca/' || n.rollout_id"
                    " WHERE n.state IN ('done', 'dual')"
                    " AND n.cert_fingerprint IN (SELECT value FROM json_each(?))",
                    (json.dumps(wanted), json.dumps(wanted)),
                ).fetchall()
            known = {str(r[0]) for r in rows}
        return frozenset(n for n in https if reported.get(n, "") not in known)

    def left_dual(self, names: Collection[str]) -> dict[str, str]:
        """Of ``names`` (nodes serving http and https), the rollout that left each so: the
        newest (by epoch) transitional enable-tls rollout (a phase 1) that has the node, by
        node; one in none is left out (``leader.mixed_cluster.dual_way`` names the id: session
        69 said "the rollout that left it"). Read only where the cluster has such nodes."""
        if not names:
            return {}
        with self._db.read() as db:
            rows = db.execute(
                "SELECT n.name, r.id, max(r.epoch) FROM rollout_nodes n"
                " JOIN rollouts r ON r.id = n.rollout_id"
                " WHERE r.change = 'enable-tls' AND r.strategy = 'transitional'"
                " AND n.name IN (SELECT value FROM json_each(?)) GROUP BY n.name",
                (json.dumps(sorted(names)),),
            ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def latest_auth_version(self) -> int:
        with self._db.read() as db:
            row = db.execute(_LATEST_AUTH).fetchone()
        return int(row[0])

    def verifier(self, version: int) -> str:
        with self._db.read() as db:
            row = db.execute(
                "SELECT verifier FROM auth_versions WHERE version = ?", (version,)
            ).fetchone()
        if row is None:
            raise TerminalError(f"no auth password version {version}")
        return str(row["verifier"])

    def node_auth(self) -> dict[str, int]:
        """The auth password version live on each node that has one (kept in memory, like
        rollouts: ``get``)."""
        with self._db.read() as db:
            return dict(self._node_auth(db))

    def _node_auth(self, db: sqlite3.Connection) -> dict[str, int]:
        """Under the lock: ``node_auth`` as kept (not a copy: not to be changed)."""
        kept = self._db.cache.get(_AUTH)
        if kept is None:
            rows = db.execute("SELECT name, version FROM node_auth").fetchall()
            kept = self._db.cache[_AUTH] = {r["name"]: r["version"] for r in rows}
        return cast(dict[str, int], kept)

    def staged_password(self, version: int = 0) -> StagedAuth | None:
        """Auth password ``version`` (0: the newest) as staged: who, when, and the nodes that
        run it now, read at once; None if there is no such version."""
        with self._db.read() as db:
            if not version:
                version = int(db.execute(_LATEST_AUTH).fetchone()[0])
            row = db.execute(
                "SELECT version, created_at, actor FROM auth_versions WHERE version = ?",
                (version,),
            ).fetchone()
            if row is None:
                return None
            live = sorted(n for n, v in self._node_auth(db).items() if v == version)
        return StagedAuth(
            int(row["version"]), str(row["actor"]), from_text(row["created_at"]), tuple(live)
        )

    def pending_password_nodes(self) -> set[str]:
        """The nodes whose live password is older than the latest version: both read at once
        (read apart, a write between them could mix two moments: session 32's audit, L3)."""
        with self._db.read() as db:
            return self._pending(db)

    def _pending(self, db: sqlite3.Connection) -> set[str]:
        """Under the lock: ``pending_password_nodes``."""
        latest = int(db.execute(_LATEST_AUTH).fetchone()[0])
        return {name for name, v in self._node_auth(db).items() if v < latest}

    def password_behind(self) -> PasswordBehind | None:
        """``PasswordBehind`` now (None: no node is behind), read at once."""
        with self._db.read() as db:
            return self._behind(db, self._pending(db))

    def _behind(self, db: sqlite3.Connection, pending: set[str]) -> PasswordBehind | None:
        """Under the lock: ``PasswordBehind`` of ``pending`` (``_pending``), the nodes removed
        left out (no workstation goes there; a removal forgets a node's record of the
        password, one removed before session 69 may still have one)."""
        if not pending:
            return None
        removed = {
            str(r[0])
            for r in db.execute("SELECT name FROM nodes WHERE removed_at IS NOT NULL").fetchall()
        }
        live = self._node_auth(db)
        nodes = tuple(sorted((n, live[n]) for n in pending if n not in removed))
        row = db.execute(
            "SELECT version, created_at, actor FROM auth_versions ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if not nodes or row is None:
            return None
        staged = StagedAuth(int(row["version"]), str(row["actor"]), from_text(row["created_at"]))
        return PasswordBehind(staged, nodes)

    def set_node_auth(self, name: str, version: int | None, now: dt.datetime) -> None:
        """Record the password live on a node (None: the node is back on http, none is)."""
        with self._db.tx() as db:
            self._set_auth(db, name, version, now, always=True)

    def _set_auth(
        self,
        db: sqlite3.Connection,
        name: str,
        version: int | None,
        now: dt.datetime,
        *,
        always: bool = False,
    ) -> None:
        """Inside a write transaction: ``set_node_auth`` (unless ``always``, only if it is not
        what is stored), and the kept ``node_auth`` with it."""
        if not always:
            stored = db.execute("SELECT version FROM node_auth WHERE name = ?", (name,)).fetchone()
            if (stored["version"] if stored else None) == version:
                return
        kept = self._db.cache.get(_AUTH)
        if version is None:
            db.execute("DELETE FROM node_auth WHERE name = ?", (name,))
            self._audit(db, now, "engine", "password.cleared", name)
            if kept is not None:
                kept.pop(name, None)
            return
        db.execute(
            "INSERT INTO node_auth (name, version, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET version = excluded.version,"
            " updated_at = excluded.updated_at",
            (name, version, to_text(now)),
        )
        self._audit(db, now, "engine", "password.applied", name, version=version)
        if kept is not None:
            kept[name] = version

    # --- failed bootstrap passwords -----------------------------------------------------------

    def record_bootstrap_failures(
        self,
        node: str,
        failures: Sequence[BootstrapFailureRow],
        now: dt.datetime,
        *,
        audit: bool = True,
    ) -> None:
        """Add what ``node``'s agent reported (already cleaned by the caller) to its counts (up
        to ``MAX_FAILURE_TOTAL``); keep the node's ``MAX_FAILURE_ROWS`` most recent sources;
        drop rows quiet for longer than ``FAILURES_KEPT``. ``audit``: with its audit event (the
        caller bounds how many a node gets: ``LeaderService._failures_audited``)."""
        with self._db.tx(routine=True) as db:
            _record_failures_in(db, node, failures, now)
            if failures and audit:
                self._audit(
                    db,
                    now,
                    f"node:{node}",
                    "bootstrap.failures",
                    node,
                    sources=len(failures),
                    count=sum(f.count for f in failures),
                )

    def bootstrap_failures(self, limit: int = FAILURES_SHOWN) -> list[BootstrapFailureRow]:
        """The most recent first."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT node, source, workstation, count, first_at, last_at"
                " FROM bootstrap_failures ORDER BY last_at DESC, node, source LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            BootstrapFailureRow(
                node=r["node"],
                source=r["source"],
                workstation=r["workstation"],
                count=r["count"],
                first_at=dt.datetime.fromisoformat(r["first_at"]),
                last_at=dt.datetime.fromisoformat(r["last_at"]),
            )
            for r in rows
        ]

    def removed_nodes(self) -> list[tuple[str, tuple[str, ...], dt.datetime]]:
        """(name, addresses, removed at) of removed nodes, the most recent first."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT name, addresses, removed_at FROM nodes WHERE removed_at IS NOT NULL"
                " ORDER BY removed_at DESC, name"
            ).fetchall()
        return [
            (
                r["name"],
                tuple(json.loads(r["addresses"])),
                dt.datetime.fromisoformat(r["removed_at"]),
            )
            for r in rows
        ]

    def revoked_certificates(
        self, now: dt.datetime, limit: int = FAILURES_SHOWN
    ) -> list[sqlite3.Row]:
        """Revoked, unexpired certificates (rows of ``certificates``), most recent first."""
        with self._db.read() as db:
            return db.execute(
                "SELECT * FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ?"
                " ORDER BY revoked_at DESC, serial LIMIT ?",
                (to_text(now), limit),
            ).fetchall()


_ROWS, _AUTH = "rollout", NODE_AUTH_CACHE  # what SchemaStore keeps in ``Database.cache``
_LATEST_AUTH = "SELECT COALESCE(MAX(version), 0) FROM auth_versions"


def _same_records(base: RolloutRow, before: RolloutRow, only: Collection[str] | None) -> bool:
    """``base`` holds the records of ``before`` (of the nodes ``only``; None: all of them)."""
    if only is None:
        return base.records == before.records
    return all(base.node(name)[0] == before.node(name)[0] for name in only)


_LIVE = ("live rollouts",)  # Database.cache: SchemaStore._live
_AWAITING = RolloutState.AWAITING_FINALIZE.value


def _key(rollout_id: str) -> tuple[str, str]:
    return (_ROWS, rollout_id)


def _derived(row: RolloutRow, **changes: Any) -> RolloutRow:
    """``row`` with ``changes``; its nodes' positions (the same order) come along, rather than
    being worked out again over every node."""
    new = replace(row, **changes)
    if "_index" in row.__dict__:
        new.__dict__["_index"] = row.__dict__["_index"]
    if "nodes" not in changes and "census" in row.__dict__:
        new.__dict__["census"] = row.__dict__["census"]
    return new


UNDELIVERED_AT = frozenset({NodeState.FAILED, NodeState.SKIPPED, NodeState.ROLLED_BACK})
"""A node that ends in one of these will not be staged again in its rollout: the server
certificates recorded for it in the rollout that it did not stage are revoked then
(``_revoke_undelivered``). A node done revokes them as superseded (``revoke_superseded_in``:
all issued before the one it serves)."""


def _revoke_undelivered(
    db: sqlite3.Connection,
    before: RolloutRow,
    after: RolloutRow,
    names: Iterable[str],
    now: dt.datetime,
) -> list[str]:
    """Inside ``save_states``' write: for each node of ``names`` that this write moves into
    ``UNDELIVERED_AT``, revoke the server certificates the rollout recorded for it other
    than the one it staged (``revoke_undelivered_in``). Review s28 L1: a preflight's
    certificate is recorded with its outcome, before its stage sends it; a leader stopped or
    restarted in between (its stage then signs another), or an abort, left it valid and on
    record (``certs check-expiration``) if the node did not end done."""
    if not CHANGES[after.rollout.change].stages_certificate:
        return []
    serials: list[str] = []
    for name in dict.fromkeys(names):
        rec, detail = after.node(name)
        if rec.state in UNDELIVERED_AT and before.node(name)[0].state is not rec.state:
            staged = detail.cert_fingerprint or ""
            serials += revoke_undelivered_in(db, name, staged, rollout_id=after.rollout.id, now=now)
    return serials


# The longest freeze window or server restart the leader takes from an agent's measure: a day.
# A switch's freeze and restart last seconds to minutes; a value outside 0..MAX_MEASURED_SECONDS,
# or not finite (inf, NaN: a buggy or foreign agent with a valid certificate), is taken as not
# sent (review s36 L2).
MAX_MEASURED_SECONDS = 86400.0


def measured_seconds(value: object) -> float | None:
    """``value`` (an agent's ``freeze_seconds`` or ``restart_seconds``) as seconds if it is a
    finite number in 0..``MAX_MEASURED_SECONDS``, else None (not sent)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and 0.0 <= seconds <= MAX_MEASURED_SECONDS else None


def freeze_window(
    started: dt.datetime | None, ended: dt.datetime | None, measured: float | None
) -> float | None:
    """A node's freeze window's length in seconds; None while it is open (or never began).

    ``measured``: its agent's measure in elapsed time (``Transaction.freeze_seconds``), which
    no step of the node's wall clock moves. Without it (an older agent, a reboot during the
    freeze, a scope freeze, whose times are the leader's), the difference of the two times,
    on one wall clock, never below 0: a clock stepped back during the freeze would make it
    negative (clock audit s35 J); 0 then says "not known to be longer". A ``measured`` that
    ``measured_seconds`` refuses (one stored before the leader checked it) counts as none."""
    if started is None or ended is None:
        return None
    sane = measured_seconds(measured)
    if sane is not None:
        return sane
    return max((ended - started).total_seconds(), 0.0)


def _check_details(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - set(_NODE_DETAIL_FIELDS)
    if unknown:
        raise ValueError(f"not node details: {sorted(unknown)}")


def _stored_time(t: dt.datetime | None) -> dt.datetime | None:
    """A time as reading it back from the file gives it (UTC)."""
    return from_text(to_text(t))


def _column(value: Any) -> Any:
    """A node detail as its column holds it."""
    if isinstance(value, dt.datetime):
        return to_text(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _with_times(
    steps: Mapping[str, list[str | None]], times: Sequence[StepTime]
) -> dict[str, list[str | None]]:
    """``steps`` (never changed: it may be a kept row's) with ``times`` set: a start only if
    none is stored (the first start counts), an end always."""
    new = dict(steps)
    for t in times:
        pair = list(new.get(t.step, [None, None]))
        if t.started is not None and pair[0] is None:
            pair[0] = to_text(t.started)
        if t.ended is not None:
            pair[1] = to_text(t.ended)
        new[t.step] = pair
    return new


def _unchanged(row: RolloutRow, name: str, details: Mapping[str, Any]) -> bool:
    """True if writing ``details`` to node ``name`` of ``row`` changes nothing."""
    if name not in row._index:
        return True
    detail = row.node(name)[1]
    return all(getattr(detail, k) == v for k, v in details.items())


def _refuse_if_busy(db: sqlite3.Connection, follows: str = "") -> None:
    """Inside a write transaction: RolloutBusy if a rollout has not ended, unless it is the
    transitional rollout ``follows`` awaiting finalize (a new rollout that finalizes it or
    takes it back may start beside it)."""
    for busy in db.execute(
        f"SELECT id, state, change FROM rollouts WHERE {_ACTIVE}",  # noqa: S608
        _TERMINAL,
    ).fetchall():
        waiting = busy["state"] == RolloutState.AWAITING_FINALIZE.value
        if waiting and (ended := _settled_by(db, busy["id"])) is not None:
            # Its finalize or its way back completed; the engine's next pass ends it
            # (``Engine._settle_awaiting``). A follower let in meanwhile decided how it ended
            # instead: a way back right after its finalize ended it "taken back" (review s69
            # confirm L2).
            raise FollowerCompleted(busy["id"], *ended)
        if not (waiting and follows and busy["id"] == follows):
            raise RolloutBusy(busy["id"], busy["state"], busy["change"])


def _settled_by(db: sqlite3.Connection, rollout_id: str) -> tuple[str, str] | None:
    """The rollout (id, change) whose end moves the transitional ``rollout_id`` on from
    awaiting finalize, if it has ended so: its newest finalize or way back, judged by
    ``planner.settles`` (the rule ``planner.awaiting_verdict`` applies, as the engine reads it)."""
    last = db.execute(
        "SELECT id, change, state FROM rollouts WHERE finalizes = ? OR undoes = ?"
        " ORDER BY epoch DESC LIMIT 1",
        (rollout_id, rollout_id),
    ).fetchone()
    if last is None or last["state"] != RolloutState.COMPLETED.value:
        return None  # the common case, without reading its nodes
    states = db.execute("SELECT state FROM rollout_nodes WHERE rollout_id = ?", (last["id"],))
    verdict = settles(
        RolloutState(last["state"]), Change(last["change"]), (NodeState(r[0]) for r in states)
    )
    return None if verdict is None else (str(last["id"]), str(last["change"]))


_RETRIED_BY = "retried_by/"  # meta key prefix: ``retried_by/<rollout id>`` = its retry's id
_OWN_CHAIN = "own_chain/"  # meta key prefix: ``own_chain/<rollout id>`` = JSON, ``own_chain_ends``
_OWN_PINS = "own_pins/"  # meta key prefix: ``own_pins/<rollout id>`` = JSON {node: CA pin}
_OWN_CA = "own_ca/"  # meta key prefix: ``own_ca/<rollout id>`` = the practice CA (PEM)


def removals(db: sqlite3.Connection) -> dict[str, tuple[dt.datetime, int | None]]:
    """Per name, its last removal (`tlsroll nodes remove`) as the audit keeps it: (when, the
    newest rollout's epoch then; None from a leader before schema 19, which did not record it).
    Read through the audit's partial index of removals (migration 19: ``kind`` as a literal;
    ordered here: an ORDER BY seq has SQLite scan the whole audit in its order instead)."""
    found: dict[str, tuple[dt.datetime, int | None]] = {}
    rows = db.execute("SELECT seq, subject, at, detail FROM audit WHERE kind = 'node.removed'")
    for r in sorted(rows, key=lambda r: int(r["seq"])):
        epoch = json.loads(r["detail"]).get("epoch")
        found[r["subject"]] = (
            dt.datetime.fromisoformat(r["at"]),
            epoch if isinstance(epoch, int) else None,
        )
    return found


def before_removal(
    removal: tuple[dt.datetime, int | None] | None, epoch: int, ended_at: str | None
) -> bool:
    """Whether a rollout (its ``epoch``, when it ended) came before the name's last
    ``removal`` (``removals``): its records are the removed machine's. By the epoch recorded
    with the removal (every rollout up to it had ended: a removal waits for them), else, for
    a removal an older leader recorded, by the times."""
    if removal is None:
        return False
    at, removed_epoch = removal
    if removed_epoch is not None:
        return epoch <= removed_epoch
    return ended_at is not None and dt.datetime.fromisoformat(ended_at) <= at


def _served_certificates(db: sqlite3.Connection) -> dict[str, tuple[str, dt.datetime]]:
    """``SchemaStore.served_certificates``, inside a read or a transaction. A record that
    came before the name's last removal (``before_removal``) is the removed machine's: a
    machine enrolled again under the name serves nothing the leader recorded until a rollout
    switches it (review rvc of s66-misc, M1: the removed machine's certificate, which the
    admin had revoked before removing it, was shown as served by the new one, on http, and
    auto_rotate tried to rotate it at every check). Every view of what nodes serve reads it
    so: the expiry watch (check-expiration, auto_rotate), the viewer and the metrics. The
    newest record is the one that counts: if it came before the removal, so did the older."""
    serving = tuple(c.value for c in SERVES_NEW_CERT)
    states = tuple(s.value for s in SERVING_STATES)
    rows = db.execute(
        "SELECT name, change, cert_fingerprint, cert_not_after, epoch, ended_at"  # noqa: S608 - placeholders
        " FROM (SELECT n.name, r.change, n.cert_fingerprint, n.cert_not_after, r.epoch, r.ended_at,"
        " row_number()"
        "  OVER (PARTITION BY n.name ORDER BY r.epoch DESC) AS newest"
        " FROM rollout_nodes n JOIN rollouts r ON r.id = n.rollout_id"
        " WHERE (n.state = ? AND r.change = ?)"
        f"  OR (n.state IN ({', '.join('?' * len(states))})"
        f"   AND r.change IN ({', '.join('?' * len(serving))})"
        "   AND n.cert_not_after IS NOT NULL)"
        ") WHERE newest = 1",
        (NodeState.DONE.value, Change.DISABLE_TLS.value, *states, *serving),
    ).fetchall()
    removed = removals(db) if rows else {}
    return {
        r["name"]: (r["cert_fingerprint"], dt.datetime.fromisoformat(r["cert_not_after"]))
        for r in rows
        if r["change"] != Change.DISABLE_TLS.value
        and not before_removal(removed.get(r["name"]), int(r["epoch"]), r["ended_at"])
    }


def _prune_own_chains(db: sqlite3.Connection) -> None:
    """(In ``create``'s transaction.) Drop the ``own_chain/<rollout id>`` rows no served
    certificate's end depends on any more (review s47rev5 Nit: one was kept for every
    ``--cert-dir`` rollout, for good). ``own_chain_ends`` takes, for each certificate, the
    newest rollout's row that names it: kept are, for each certificate a node serves now
    (``served_certificates``), that row, and the rows of rollouts not ended (their nodes may
    yet serve what they bring); the others decide nothing that is watched, and a certificate
    served again later comes with a rollout that records it again. So the table holds at
    most a row per served certificate's rollout and the rollout being created."""
    rows = db.execute(
        "SELECT m.key, m.value, r.epoch, r.state FROM meta m"
        " LEFT JOIN rollouts r ON m.key = 'own_chain/' || r.id"
        " WHERE m.key LIKE 'own\\_chain/%' ESCAPE '\\'"
    ).fetchall()
    if not rows:
        return
    served = {fingerprint for fingerprint, _ in _served_certificates(db).values()}
    keep = {r["key"] for r in rows if r["state"] is not None and r["state"] not in _TERMINAL}
    newest: dict[str, tuple[int, str]] = {}  # fingerprint -> (epoch, key) of the newest row
    for r in rows:
        if r["epoch"] is None:
            continue  # its rollout is gone: nothing reads it
        for fingerprint in json.loads(r["value"]):
            if fingerprint in served and newest.get(fingerprint, (-1, ""))[0] < r["epoch"]:
                newest[fingerprint] = (int(r["epoch"]), str(r["key"]))
    keep |= {key for _, key in newest.values()}
    stale = [(r["key"],) for r in rows if r["key"] not in keep]
    db.executemany("DELETE FROM meta WHERE key = ?", stale)


def _retried_by(db: sqlite3.Connection, rollout_id: str) -> tuple[str, str] | None:
    found = db.execute(
        "SELECT m.value AS id, COALESCE(r.state, '') AS state FROM meta m"
        " LEFT JOIN rollouts r ON r.id = m.value WHERE m.key = ?",
        (f"{_RETRIED_BY}{rollout_id}",),
    ).fetchone()
    return None if found is None else (str(found["id"]), str(found["state"]))


def _refuse_if_retried(db: sqlite3.Connection, rollout_id: str) -> None:
    by = _retried_by(db, rollout_id)
    if by is not None:
        raise AlreadyRetried(rollout_id, *by)


class AlreadyRetried(TerminalError):
    """A halted or aborted rollout is retried once: its retry carries it on, and a retry of
    that retry after it (audit s39race H3: a second retry switched the same nodes again)."""

    def __init__(self, target: str, by: str, state: str) -> None:
        again = (
            f"; to carry on where it stopped: tlsroll rollout retry {by}"
            if state in (RolloutState.HALTED.value, RolloutState.ABORTED.value)
            else ""
        )
        super().__init__(
            f"rollout {target} was already retried by {by} ({state}){again}; "
            "see: tlsroll schema show"
        )


class AlreadyTakenBack(TerminalError):
    """A rollout's switch is taken back once (``planner.AlreadyUndone``, kept in the store)."""

    def __init__(self, target: str, by: str, state: str) -> None:
        super().__init__(
            f"rollout {target} was already taken back by rollout {by} ({state}); "
            "see: tlsroll schema show"
        )


class StaleRecords(TransientError):
    """The records changed between reading and writing; read again."""


class PasswordStagedMeanwhile(TerminalError):
    """A change-password start planned with one password while another was staged."""

    def __init__(self, planned: int, latest: int) -> None:
        super().__init__(
            f"auth password version {latest} was staged while this rollout was planned (with "
            f"version {planned}); nothing started: start it again to apply version {latest}"
        )


class RolloutBusy(TerminalError):
    """Another rollout has not ended; the way on depends on where it is (review s64 trans L4:
    "wait for it" for a paused rollout, which never ends by waiting, or a finalize that may
    wait days for quiet workstations)."""

    def __init__(self, rollout_id: str, state: str, change: str = "") -> None:
        if state == RolloutState.AWAITING_FINALIZE.value:
            super().__init__(
                f"rollout {rollout_id} awaits finalize (its nodes serve http and https); close "
                f"http first (tlsroll rollout finalize {rollout_id}) or go back to http "
                f"(tlsroll rollout rollback {rollout_id})"
            )
            return
        busy = f"rollout {rollout_id} is {state}; one rollout at a time per cluster"
        if state == RolloutState.PAUSED.value:
            way = (
                f"resume it: tlsroll rollout resume {rollout_id}, or end it: "
                f"tlsroll rollout abort {rollout_id}"
            )
        elif change == Change.FINALIZE.value:
            way = (
                "a finalize may wait long for each node's workstations to leave http; "
                f"end it: tlsroll rollout abort {rollout_id}"
            )
        else:
            way = f"wait for it, or: tlsroll rollout abort {rollout_id}"
        super().__init__(f"{busy} ({way})")


class FollowerCompleted(RolloutBusy):
    """A transitional rollout awaiting finalize whose finalize or way back has completed: it
    ends at the engine's next pass, and no other rollout starts before (a way back let in
    then ended it "taken back" though it was finalized; a second finalize was refused "not on
    https"; review s69 confirm L2)."""

    def __init__(self, rollout_id: str, by: str, change: str) -> None:
        how = "finalized" if change == Change.FINALIZE.value else "taken back"
        TerminalError.__init__(
            self,
            f"rollout {rollout_id} was {how} by rollout {by}, which has just completed; the "
            "leader records that in a moment: try again then (see: tlsroll schema show)",
        )


def _head(r: sqlite3.Row) -> tuple[Rollout, RolloutMeta]:
    """A rollout and its meta from its row of ``rollouts`` (its nodes are rows of their own)."""
    rollout = Rollout(
        id=r["id"],
        change=Change(r["change"]),
        scope=Scope(ScopeKind(r["scope_kind"]), tuple(json.loads(r["scope_names"]))),
        order=tuple(json.loads(r["node_order"])),
        epoch=r["epoch"],
        strategy=Strategy(r["strategy"]),
        max_parallel=r["max_parallel"],
        failure_budget=r["failure_budget"],
        freeze=FreezeMode(r["freeze"]),
        state=RolloutState(r["state"]),
    )
    meta = RolloutMeta(
        created_at=dt.datetime.fromisoformat(r["created_at"]),
        started_by=r["started_by"],
        leader_node=r["leader_node"],
        started_at=from_text(r["started_at"]),
        ended_at=from_text(r["ended_at"]),
        reason=r["reason"],
        auth_version=r["auth_version"],
        undoes=r["undoes"],
        finalizes=r["finalizes"],
        when_quiet=r["when_quiet"],
        removed_since=_removed_since(r["id"], r["removed_since"]),
        way_back_offered=None if r["way_back_offered"] is None else bool(r["way_back_offered"]),
    )
    return rollout, meta


def _own_pins(
    rollout_id: str,
    stored: str | None,
    own_ca: str | None,
    nodes: Sequence[tuple[NodeRecord, NodeDetail]],
) -> tuple[tuple[str, str], ...]:
    """``RolloutMeta.own_ca_pins`` of a ``--cert-dir`` rollout: as stored (``own_pins/<id>``);
    a rollout stored before they were (or a value that does not read: a hand-edited store,
    with a warning) gets the pin of its practice CA's root (``own_ca/<id>``,
    ``byo.bundle_pin``) for each node it did not skip."""
    if stored is not None:
        try:
            pins = json.loads(stored)
        except ValueError:
            pins = None
        if isinstance(pins, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in pins.items()
        ):
            return tuple(sorted(pins.items()))
        log.warning(
            "store.own_pins_unreadable",
            rollout_id=rollout_id,
            detail="the rollout's own_pins is not a JSON object of node names and pins: "
            "taken from its practice CA",
        )
    first = ""
    if own_ca:
        from leader import byo  # noqa: PLC0415 - cryptography, for a rollout stored before

        first = byo.bundle_pin(own_ca.encode("ascii", "replace"))
    if not first:
        return ()
    touched = (rec.name for rec, _d in nodes if rec.state is not NodeState.SKIPPED)
    return tuple(sorted((name, first) for name in touched))


def _removed_since(rollout_id: str, stored: object) -> tuple[str, ...]:
    """The column ``rollouts.removed_since`` read (a JSON list of node names, or NULL). It only
    tells what the start left out: a value that is not such a list (a hand-edited store) reads
    as none, with a warning, never as an error of every read of the rollout (review rev51c L1:
    one damaged row broke each ``schema show`` and the live rollout's engine passes)."""
    if stored is None or stored == "":
        return ()
    try:
        names = json.loads(stored) if isinstance(stored, str | bytes) else None
    except ValueError:
        names = None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return tuple(names)
    log.warning(
        "store.removed_since_unreadable",
        rollout_id=rollout_id,
        detail="the rollout's removed_since is not a JSON list of node names: read as none",
    )
    return ()


def _node(row: sqlite3.Row) -> tuple[NodeRecord, NodeDetail]:
    rec = NodeRecord(
        name=row["name"],
        state=NodeState(row["state"]),
        reason=row["reason"],
        scope_frozen=bool(row["scope_frozen"]),
        freeze_asked=bool(row["freeze_asked"]),
    )
    detail = NodeDetail(
        old_url=row["old_url"],
        new_url=row["new_url"],
        cert_fingerprint=row["cert_fingerprint"],
        cert_not_after=from_text(row["cert_not_after"]),
        freeze_started_at=from_text(row["freeze_started_at"]),
        freeze_ended_at=from_text(row["freeze_ended_at"]),
        restart_seconds=measured_seconds(row["restart_seconds"]) or 0.0,
        bootstrap_port=row["bootstrap_port"],
        steps=json.loads(row["steps"]),
        freeze_seconds=row["freeze_seconds"],
    )
    return rec, detail


# A removed node's client report is none (``Store.remove_node`` deletes it; one stored before
# that did, or committed by a batch taken before the removal, is left out here): no agent
# reports for it again, and it was "waiting for its report" for good (review s45rev5 M2).
_NOT_REMOVED = "node NOT IN (SELECT name FROM nodes WHERE removed_at IS NOT NULL)"


def _client(r: sqlite3.Row) -> Client:
    """A stored sighting (a row of ``node_clients``)."""
    return Client(
        node=r["node"],
        scheme=r["scheme"],
        address=r["address"],
        workstation=r["workstation"],
        first_seen=dt.datetime.fromisoformat(r["first_seen"]),
        last_seen=dt.datetime.fromisoformat(r["last_seen"]),
        requests=r["requests"],
    )


def _clients(db: sqlite3.Connection, nodes: Sequence[str] | None) -> list[Client]:
    rows = db.execute(
        f"SELECT * FROM node_clients WHERE {_NOT_REMOVED}"  # noqa: S608 - a constant
        " ORDER BY last_seen DESC, node, address"
    )
    return [_client(r) for r in rows.fetchall() if nodes is None or r["node"] in nodes]


# A client's key (``Client.key``) in SQL: its workstation name where known, else its address.
_KEY = "CASE WHEN {t}.workstation != '' THEN {t}.workstation ELSE {t}.address END"


def _http_clients(db: sqlite3.Connection) -> list[Client]:
    """Of the stored report, what ``rollout_core.still_on_http`` judges who is still on http
    by: the http sightings, and the https ones of the same node and key (whether it switched
    since), and for an unnamed http sighting the https ones from its address and those of
    each name seen from it (``clients.https_matches``: the names seen there decide which
    count). The web page's (``viewer.snapshot.Reader``): every sighting, read after each write
    while a page is open, was a third of its read at 500 nodes with two workstations each
    (issue 15); once the practice is on https, the http ones age out and this reads none."""
    http = _KEY.format(t="h")
    mine = _KEY.format(t="c")
    rows = db.execute(
        f"SELECT c.* FROM node_clients c WHERE c.{_NOT_REMOVED}"  # noqa: S608 - constants
        " AND (c.scheme = 'http' OR EXISTS (SELECT 1 FROM node_clients h"
        f" WHERE h.node = c.node AND h.scheme = 'http' AND ({http} = {mine}"
        # An unnamed http sighting is judged against its address's https sightings and those
        # of the one name seen from that address (``clients.https_matches``), wherever from.
        "  OR (h.workstation = '' AND (h.address = c.address OR (c.workstation != ''"
        "   AND EXISTS (SELECT 1 FROM node_clients n WHERE n.node = c.node"
        "    AND n.address = h.address AND n.workstation = c.workstation)))))))"
        " ORDER BY c.last_seen DESC, c.node, c.address"
    )
    return [_client(r) for r in rows.fetchall()]


def _clients_info(db: sqlite3.Connection, *, http_only: bool = False) -> dict[str, ClientsInfo]:
    """Each node's report summary; one whose stored clients are at ``MAX_CLIENTS`` has
    ``CLIENTS_FULL`` for its problem, unless its agent named one (``write_clients``).
    ``http_only``: of the nodes with an http sighting only (``_http_clients``'s), their
    agent's problem as it named it (the page, which reads these, draws none: each node's
    count of its stored clients was a third of this read)."""
    if http_only:
        query = (
            "SELECT i.*, 0 AS kept FROM node_clients_info i"  # noqa: S608 - constants
            f" WHERE i.{_NOT_REMOVED}"
            " AND i.node IN (SELECT node FROM node_clients WHERE scheme = 'http')"
        )
    else:
        query = (
            "SELECT i.*, (SELECT count(*) FROM node_clients c WHERE c.node = i.node) AS kept"  # noqa: S608 - a constant
            f" FROM node_clients_info i WHERE i.{_NOT_REMOVED}"
        )
    return {
        r["node"]: ClientsInfo(
            node=r["node"],
            window_seconds=r["window_seconds"],
            source=r["source"],
            problem=r["problem"] or (CLIENTS_FULL if r["kept"] >= MAX_CLIENTS else ""),
            first_report=dt.datetime.fromisoformat(r["first_report"]),
            reported_at=dt.datetime.fromisoformat(r["reported_at"]),
            last_http_at=from_text(r["last_http_at"]),
        )
        for r in db.execute(query).fetchall()
    }


class _Writes:
    """A count of writes (``CLIENT_WRITES``)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


CLIENT_WRITES = _Writes()
"""How many client reports ``write_clients`` wrote in this process (a transaction that failed
after it included): what ``SchemaStore._http_report`` keeps is read again once this moved. In
``write_clients`` itself, so that no way of storing a report (``record_clients``, the leader's
group commit, whatever comes) can write one without it. One count for every store of the
process: the leader has one, and a write to another store only has a reader read again. (A
``sqlite3.Connection``, all ``write_clients`` is given, holds no attribute of its own.) Moved
under the lock of the ``Database`` written to, as its readers read it."""

# Where ``SchemaStore._http_report`` marks, in ``Database.cache``, that it read.
_HTTP_REPORT = ("schema", "http clients report")


def write_clients(
    db: sqlite3.Connection,
    node: str,
    clients: Sequence[Client],
    *,
    window_seconds: int,
    source: str,
    problem: str,
    now: dt.datetime,
) -> None:
    """Merge what ``node``'s agent reports into what it reported before and move its
    ``last_http_at`` on. Merged, not replaced: the server's own log may forget (the
    reference server keeps it in memory and phase 1 restarts it), and a workstation seen
    on http before that must still be named and still refuse a plain finalize. A row the
    report lists takes its times from this report (one message, one clock shift). A row the
    report does not list goes once its ``last_seen`` is older than the agent's window (one
    it lists stays while it does; a report with no window, 0, goes by the window stored
    and leaves it as it is); at most
    ``MAX_CLIENTS`` rows a node, the most recently seen (times compare as UTC ISO text): at
    the cap a client may be left out (``CLIENTS_FULL``). Counted (``CLIENT_WRITES``) before
    anything is written: a reader that kept the report reads it again."""
    CLIENT_WRITES.count += 1
    kept = sorted(clients, key=lambda c: c.last_seen, reverse=True)[:MAX_CLIENTS]
    last_http = max((c.last_seen for c in kept if c.scheme == "http"), default=None)
    # Before the report's own rows go in: a sighting it lists stays, however old its time
    # (the agent's view may be ``clients_refresh`` old, its window is the agent's to judge:
    # ``schema_view.still_on_http_now``); one it no longer lists goes once past the window.
    # A report with no window (a driver that could not read its clients: "cannot read the
    # clients", the server down; or one that cannot tell at all) says nothing of who went:
    # the rows go by the window stored, which stays (review rev55b H1: such a report emptied
    # the node's rows, and a plain finalize no longer named the workstations seen on http
    # before; review rev55c M1: kept for good, they counted as on http now for good).
    window = window_seconds
    if window <= 0:
        stored = db.execute(
            "SELECT window_seconds FROM node_clients_info WHERE node = ?", (node,)
        ).fetchone()
        window = max(int(stored[0]), 0) if stored is not None else 0
    db.execute(
        "DELETE FROM node_clients WHERE node = ? AND last_seen < ?",
        (node, to_text(now - dt.timedelta(seconds=window))),
    )
    db.executemany(
        "INSERT INTO node_clients (node, scheme, address, workstation,"
        " first_seen, last_seen, requests) VALUES (?, ?, ?, ?, ?, ?, ?)"
        # A row the report lists takes the report's own times, both of them: each message's
        # times are moved onto the leader's clock by that message's own shift (its transit,
        # a node clock ahead: ``service.client_rows``), so a first_seen kept from one message
        # and a last_seen from another could be in the wrong order by that difference, and
        # who has switched is decided by their order (``rollout_core.still_on_http``: a clean
        # switch showed on http again for the window; review s44rev6 H1). A row the report no
        # longer lists (the server forgot it) keeps what was stored, as before.
        " ON CONFLICT(node, scheme, address, workstation) DO UPDATE SET"
        " first_seen = excluded.first_seen,"
        " last_seen = excluded.last_seen,"
        " requests = max(requests, excluded.requests)",
        [
            (
                node,
                c.scheme,
                c.address,
                c.workstation,
                to_text(c.first_seen),
                to_text(c.last_seen),
                c.requests,
            )
            for c in kept
        ],
    )
    db.execute(
        "DELETE FROM node_clients WHERE node = ? AND rowid NOT IN (SELECT rowid FROM"
        " node_clients WHERE node = ? ORDER BY last_seen DESC LIMIT ?)",
        (node, node, MAX_CLIENTS),
    )
    db.execute(
        "INSERT INTO node_clients_info (node, window_seconds, source, problem,"
        " first_report, reported_at, last_http_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(node) DO UPDATE SET window_seconds = CASE"
        "  WHEN excluded.window_seconds > 0 THEN excluded.window_seconds ELSE window_seconds END,"
        " source = excluded.source, problem = excluded.problem,"
        " reported_at = excluded.reported_at,"
        " last_http_at = CASE WHEN excluded.last_http_at IS NULL THEN last_http_at"
        "  WHEN last_http_at IS NULL OR last_http_at < excluded.last_http_at"
        "  THEN excluded.last_http_at ELSE last_http_at END",
        (
            node,
            window_seconds,
            source,
            problem,
            to_text(now),
            to_text(now),
            to_text(last_http),
        ),
    )
