"""The leader's gRPC servicers for the nodes: Enrolment (join port) and Leader (mTLS port), and
the error map every leader servicer uses (``ERRORS``; ``admin_service`` has the Admin one).

Each listener serves only the service meant for its level of trust: a caller on the join port
has a token at best, a caller on the control port has a node certificate, a caller on the
admin socket is an administrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import itertools
import math
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

from leader import byo, join_guard
from leader.commands import NoRolloutYet, NoSuchRollout, NotRetriable, PlanChanged, StillOnHttp
from leader.config import hook_number
from leader.node_clocks import NodeClocks, clock_problem, sent_offset
from leader.observe import NodeProblem, StreamEnded
from leader.planner import (
    AgentsTooOld,
    AlreadyUndone,
    BlockedAtOnce,
    EmptyScope,
    NeedsAdmin,
    NodesOffline,
    NoneReachable,
    NoPasswordStaged,
    NotAwaitingFinalize,
    NothingToDo,
    NothingToUndo,
    NotOnHttps,
    PlanError,
    StagedPasswordUnusable,
    StoreBehind,
    UnknownNodes,
    UnknownRollout,
    Unreachable,
    WrongSource,
    report_stale_after,
    rotate_command,
)
from leader.rollout_core import Client, IllegalTransition
from leader.schema_store import (
    MAX_CLIENTS,
    AlreadyRetried,
    AlreadyTakenBack,
    BootstrapFailureRow,
    CapRefusals,
    ClientsInfo,
    PasswordStagedMeanwhile,
    RolloutBusy,
    SchemaStore,
    StaleRecords,
    write_clients,
)
from leader.schema_view import fresh_reports
from leader.states import LoginFailuresRow, NodeProblemKind, NodeProblemRow, problem_rank
from leader.store import (
    CAsOwn,
    EpochFixed,
    InRollout,
    IssuedCert,
    KeyRefused,
    Malformed,
    NameTaken,
    Node,
    NodeCert,
    NotFound,
    NotRenewable,
    NotWorkstation,
    Queued,
    RenewalReport,
    RenewedTooSoon,
    Reserved,
    RolloutHoldsCA,
    Store,
    Superseded,
    TokenRejected,
    TooLate,
    TooMany,
    elapsed,
)
from leader.store_health import StoreHealth
from leader.tokens import JoinToken, MalformedToken
from tlsroll import bootstrap_csr, features, logs, peertext, pki, rpc, spiffe
from tlsroll.clients import https_matches
from tlsroll.enums import (
    CAP_SOURCE,
    NEEDS_ADMIN,
    NO_SETTINGS,
    RETRY_AFTER_KEY,
    SERVER_RESTARTING,
    SERVES_PREVIOUS,
)
from tlsroll.errors import PKIError
from tlsroll.rpc import (
    NO_BDP_PROBE,
    invalid,
    map_errors,
    peer_certificate,
    permission_denied,
    timestamp,
    unauthenticated,
)
from tlsroll.v1 import (
    agent_pb2,
    enrolment_pb2,
    enrolment_pb2_grpc,
    leader_pb2,
    leader_pb2_grpc,
    types_pb2,
)

log = logs.get_logger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

ERRORS = {
    NoSuchRollout: grpc.StatusCode.NOT_FOUND,
    UnknownNodes: grpc.StatusCode.NOT_FOUND,
    UnknownRollout: grpc.StatusCode.NOT_FOUND,
    NoRolloutYet: grpc.StatusCode.FAILED_PRECONDITION,
    bootstrap_csr.BootstrapError: grpc.StatusCode.INVALID_ARGUMENT,
    PlanError: grpc.StatusCode.INVALID_ARGUMENT,
    NodesOffline: grpc.StatusCode.FAILED_PRECONDITION,
    NoneReachable: grpc.StatusCode.FAILED_PRECONDITION,
    Unreachable: grpc.StatusCode.FAILED_PRECONDITION,
    NeedsAdmin: grpc.StatusCode.FAILED_PRECONDITION,
    StoreBehind: grpc.StatusCode.FAILED_PRECONDITION,
    NothingToDo: grpc.StatusCode.FAILED_PRECONDITION,
    NotOnHttps: grpc.StatusCode.FAILED_PRECONDITION,
    AgentsTooOld: grpc.StatusCode.FAILED_PRECONDITION,
    BlockedAtOnce: grpc.StatusCode.FAILED_PRECONDITION,
    NoPasswordStaged: grpc.StatusCode.FAILED_PRECONDITION,
    StagedPasswordUnusable: grpc.StatusCode.FAILED_PRECONDITION,
    NothingToUndo: grpc.StatusCode.FAILED_PRECONDITION,
    NotRetriable: grpc.StatusCode.FAILED_PRECONDITION,
    byo.Refused: grpc.StatusCode.FAILED_PRECONDITION,
    EmptyScope: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyUndone: grpc.StatusCode.FAILED_PRECONDITION,
    NotAwaitingFinalize: grpc.StatusCode.FAILED_PRECONDITION,
    WrongSource: grpc.StatusCode.FAILED_PRECONDITION,
    StillOnHttp: grpc.StatusCode.FAILED_PRECONDITION,
    PlanChanged: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyRetried: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyTakenBack: grpc.StatusCode.FAILED_PRECONDITION,
    StaleRecords: grpc.StatusCode.ABORTED,
    RolloutBusy: grpc.StatusCode.FAILED_PRECONDITION,
    PasswordStagedMeanwhile: grpc.StatusCode.FAILED_PRECONDITION,
    IllegalTransition: grpc.StatusCode.FAILED_PRECONDITION,
    TokenRejected: grpc.StatusCode.UNAUTHENTICATED,
    KeyRefused: grpc.StatusCode.UNAUTHENTICATED,  # (as an enrolment's refusal of the key)
    MalformedToken: grpc.StatusCode.INVALID_ARGUMENT,
    PKIError: grpc.StatusCode.INVALID_ARGUMENT,
    NameTaken: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Malformed: grpc.StatusCode.INVALID_ARGUMENT,
    CAsOwn: grpc.StatusCode.INVALID_ARGUMENT,
    NotWorkstation: grpc.StatusCode.INVALID_ARGUMENT,
    TooMany: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooLate: grpc.StatusCode.FAILED_PRECONDITION,
    NotRenewable: grpc.StatusCode.FAILED_PRECONDITION,
    Superseded: grpc.StatusCode.UNAUTHENTICATED,
    InRollout: grpc.StatusCode.FAILED_PRECONDITION,
    EpochFixed: grpc.StatusCode.FAILED_PRECONDITION,
    RolloutHoldsCA: grpc.StatusCode.FAILED_PRECONDITION,
}

"""Most specific class wins (``tlsroll.rpc.status_for``): NodesOffline is a PlanError, and
FAILED_PRECONDITION, not INVALID_ARGUMENT."""

OFFLINE_AFTER_HEARTBEATS = 3
CLOCK_OFFSET = NodeProblemKind.CLOCK_OFFSET
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
MAX_AGENT_VERSION = 64  # characters of the version string an agent reports
MAX_WITHDRAWN_PEM = 16 * 1024  # a workstation certificate's PEM is some 1.5 KiB
# A served certificate's fingerprint as a heartbeat says it (``LiveServer.cert_fingerprint``):
# anything else (an agent's words) is not kept.
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class TwinAgents:
    """Two agents use one node's identity (``LeaderService._look_for_twins``): since when the
    leader sees it, until when it holds (``LeaderState.monotonic``, which counts a suspend;
    seen again, it holds longer), and the two agents' connections as gRPC names their peers."""

    since: dt.datetime
    until: float
    peers: tuple[str, str]


def _retry_after(context: Ctx, retry: dt.timedelta | None) -> None:
    """When a refused workstation signing may be asked again (``RETRY_AFTER_KEY``, whole
    seconds), for the node to hand its PC; nothing if not known."""
    if retry is not None:
        seconds = max(1, math.ceil(retry.total_seconds()))
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(seconds)),))


def twins_problem(node: str) -> str:
    """The node problem two agents with node ``node``'s identity make, with what to do."""
    return (
        f"two agents use node {node}'s identity (its key on a cloned machine, or a second "
        f"agent started by hand): the leader neither plans nor switches {node} until one of "
        f"them stops; stop the one that is not {node}'s, and if the key may have been copied "
        f"where it should not be, `tlsroll nodes remove {node}` and enrol it again with a new "
        f"key (on {node} `mv DATA/node.key DATA/node.key.removed`, then a new token)"
    )


@dataclass(frozen=True)
class EarlierCertificate:
    """An agent keeps calling with an earlier certificate of a node, one a renewal replaced
    (``LeaderService._refused``): since when the leader sees it, until when it holds
    (``LeaderState.monotonic``; seen again, it holds longer), and the certificate's serial (the
    caller's connection is in the log line that said it began)."""

    since: dt.datetime
    until: float
    serial: str


def earlier_problem(node: str, serial: str) -> str:
    """The node problem an agent refused for an earlier certificate of node ``node`` makes.
    It does not offer to revoke that serial: where a copy of the key renewed itself, the
    refused agent is the node's own, and the copy holds the certificate on record (review
    rev58c H1)."""
    return (
        f"an agent is refused for calling with an earlier certificate of node {node} (serial "
        f"{serial}), one a renewal replaced: a copy of {node}'s key renewed itself and the "
        f"refused agent may be {node}'s own, or {node} renewed and a copy of its old key calls, "
        f"or the agent runs on an old copy of its data dir; the leader cannot tell which agent "
        f"is {node}'s and neither plans nor switches it while such calls go on: `tlsroll nodes "
        f"remove {node}` (it revokes every certificate of {node}, the copy's too) and enrol it "
        f"again with a new key (on {node} `mv DATA/node.key DATA/node.key.removed`, then a new "
        "token)"
    )


def bootstrap_problem(node: str, why: str) -> str:
    """The node problem node ``node``'s agent says of its bootstrap service (``why``, cleaned):
    one that did not start, or (``SERVES_PREVIOUS``) one that serves the settings it last
    read, its journal unread (review s45rev4 M2: "did not start" would be untrue), or
    (``NO_SETTINGS``) none that runs, as its journal holds no settings for the https its
    server serves: the rotate-cert that stages them."""
    if why.startswith(SERVES_PREVIOUS):
        return (
            f"{node}'s bootstrap service {why} (its agent reads the journal again at least once "
            "a minute)"
        )
    if why.startswith(NO_SETTINGS):
        # Its server on https with a password, its agent's journal without the settings: no
        # service runs, and only a switch brings it back (session 75 https9443: nothing was
        # shown, and "did not start ... its agent tries again" would be untrue).
        return (
            f"{node} serves https but its agent's journal holds no settings for it "
            f"(reinitialised, or put back from an older copy): {why[len(NO_SETTINGS) :]}; "
            f"run: {rotate_command([node])}"
        )
    return (
        f"{node}'s bootstrap service did not start ({why}): workstations cannot enrol there; "
        "fix the cause: its agent tries again (at least once a minute)"
    )


# What the leader keeps of an agent's ``HeartbeatRequest.store_trouble``: texts, characters each.
STORE_TROUBLE_MAX = 4
STORE_TROUBLE_CHARS = 600
# The same kind of store trouble of one node comes again after its end (free space hovering at
# the floor, an agent of the release before, which keeps no margin: ``room.said_until``): its
# ``node.store_trouble`` warning is logged at most once in this many seconds; a new kind always.
STORE_LOG_SECONDS = 300.0
# The figures in an agent's store trouble (the free space it names): which trouble it is does
# not change with them (``store_trouble_kinds``).
_TROUBLE_FIGURES = re.compile(r"\d+(?:\.\d+)?(?: [KMGT]iB)?")


def store_trouble_kinds(said: Sequence[str]) -> tuple[str, ...]:
    """Which troubles an agent's store has (``said``, cleaned), its figures aside: free space
    that moves is the same trouble, a failing checkpoint another (``LeaderService._agent_store``
    logs a change of kind: s74 agenttrouble L6)."""
    return tuple(_TROUBLE_FIGURES.sub("#", t) for t in said)


def agent_store_problem(node: str, trouble: Sequence[str]) -> str:
    """The node problem node ``node``'s agent says of its own store (``trouble``, cleaned:
    ``HeartbeatRequest.store_trouble``)."""
    return (
        f"{node}'s agent cannot write its store safely: {'; '.join(trouble)}; its checks refuse"
        " a switch there while it lacks room (it says so once that changes)"
    )


def log_store_trouble(state: LeaderState, name: str, said: tuple[str, ...]) -> None:
    """Log what node ``name``'s agent says of its store now (``said``) if it differs from
    what was last logged of it: its end (info, after a logged start), a change of kind
    (info, always), a start (a warning) unless the same kind's was logged within
    ``STORE_LOG_SECONDS``: then at the first message after them that still says it. Free
    space hovering at the floor made a warning and an info line per flip from an agent of
    the release before, which keeps no margin (s74 note). Its free space moving is no
    change (``store_trouble_kinds``)."""
    kinds = store_trouble_kinds(said)
    shown, last, at = state.store_logged.get(name, ((), (), None))
    if kinds == shown:
        return
    now = state.monotonic()
    detail = "; ".join(said)
    if not kinds:
        log.info("node.store_trouble_over", node=name)
        state.store_logged[name] = ((), last, at if at is not None else now)
        return
    if shown:
        # (its free space moving is no change: its kind is, e.g. a checkpoint that fails)
        log.info("node.store_trouble_changed", node=name, detail=detail)
    elif kinds != last or at is None or now - at >= STORE_LOG_SECONDS:
        log.warning(
            "node.store_trouble",
            node=name,
            detail=detail,
            hint="free space on that node's disk (df -h): its checks refuse a switch there"
            " until then",
        )
    else:
        return  # (the same again soon after its end: said at a message after the bound)
    state.store_logged[name] = (kinds, kinds, now)


@dataclass
class LeaderState:
    """What the servicers share: the store, the CA, the clock and a few settings.

    ``leader_names`` are the leader's own addresses and DNS names: no node can have them,
    except the leader node's own agent (``leader_node``, the node the leader runs on), which
    shares its server's address. Roles never mix up for that: agents check the leader by its
    identity and the leader checks each agent by its key (``tlsroll.spiffe``), not by address.
    """

    store: Store
    ca: pki.CertificateAuthority
    clock: Callable[[], dt.datetime]
    heartbeat_interval: int
    leader_names: pki.Names | None = None
    leader_node: str | None = None
    # node -> what its managed server runs, as its last heartbeat said (``server_summary``).
    live_servers: dict[str, str] = field(default_factory=dict)
    # node -> the certificate its server serves https with, as its last heartbeat said
    # (``LiveServer.cert_fingerprint``; none kept for "" or a node whose agent does not say):
    # what the views of served certificates go by over the rollouts' records
    # (``leader.expiry.served_now``; review rvc of s66-misc, L2).
    served_fingerprints: dict[str, str] = field(default_factory=dict)
    # node -> since when its heartbeats say it needs the admin (``NEEDS_ADMIN``): a node
    # problem (``node_problems``).
    needs_admin_since: dict[str, dt.datetime] = field(default_factory=dict)
    # node -> since when, and why, its heartbeats say its bootstrap service should run but did
    # not start (``LiveServer.bootstrap_problem``, cleaned): a node problem (``node_problems``).
    bootstrap_down: dict[str, tuple[dt.datetime, str]] = field(default_factory=dict)
    # node -> since when, and what, its heartbeats say of its agent's own store (its journal's
    # checkpoint fails, a disk below a switch's floor: ``HeartbeatRequest.store_trouble``,
    # cleaned): a node problem (``node_problems``) until a heartbeat says none. Not stored: a
    # leader that starts again hears it with each agent's first message.
    agent_store: dict[str, tuple[dt.datetime, tuple[str, ...]]] = field(default_factory=dict)
    # node -> what the leader last logged of its agent's store (``LeaderService._agent_store``):
    # the kinds said then (``store_trouble_kinds``; () for over), the kinds of the last trouble
    # logged, and when (``monotonic``) that was logged. Its repeats are rate-limited by it.
    store_logged: dict[str, tuple[tuple[str, ...], tuple[str, ...], float]] = field(
        default_factory=dict
    )
    # node -> the wrong passwords at its server's own login (the server keeps the count across
    # its restarts), by its heartbeats (``LiveServer.login_failures``): only nodes with some
    # (``login_failures``).
    server_login_failures: dict[str, LoginFailuresRow] = field(default_factory=dict)
    # node -> the count last logged for it (0 once it went) and when (the leader's clock): a
    # changed count is logged at most once per node and heartbeat interval
    # (``LeaderService._login_failures``), whatever the agent sends.
    login_failures_logged: dict[str, tuple[int, dt.datetime]] = field(default_factory=dict)
    # node -> two agents seen using its identity (``LeaderService._look_for_twins``), while
    # it holds: the node is neither planned nor switched (``node_problem``).
    twin_agents: dict[str, TwinAgents] = field(default_factory=dict)
    # node -> an agent refused for an earlier certificate of it (``LeaderService._refused``),
    # while it holds: the node is neither planned nor switched (``node_problem``).
    earlier_certificates: dict[str, EarlierCertificate] = field(default_factory=dict)
    # node -> its clock against the leader's, from its heartbeats (``leader.node_clocks``).
    clocks: NodeClocks = field(default_factory=NodeClocks)
    # Nodes removed (``forget_node``): how many removals there had been, the node's included;
    # ``removals``: how many there have been. A heartbeat that was checked before a removal
    # of its node writes none of the node's entries above after it (``removed_since``).
    removed: dict[str, int] = field(default_factory=dict)
    removals: int = 0
    # Called with a removed node's name by ``forget_node``: the Leader service drops its own
    # memory of the node (``LeaderService._forget``).
    on_forget: list[Callable[[str], None]] = field(default_factory=list)
    # How long an agent's own certificate lives (``LeaderConfig.agent_cert_lifetime``).
    agent_cert_lifetime: dt.timedelta = dt.timedelta(days=30)
    # The clock no step moves, that counts a suspend: how long ago a node was heard
    # (``Store.monotonic``, ``leader.store.elapsed``).
    monotonic: Callable[[], float] = elapsed
    # The serial (hex) of the certificate the leader serves now (``OwnTls``, set by the
    # runtime and at each renewal): every heartbeat answer carries it
    # (``HeartbeatResponse.leader_serial``), and agents dial the name that carries it.
    leader_serial: str = ""
    _crl: tuple[int, bytes] = (-1, b"")

    def __post_init__(self) -> None:
        # How long an agent's clock is kept after its streams ended: by ``monotonic``,
        # late-bound (a test gives the state another clock after it is made).
        def monotonic() -> float:
            return self.monotonic()

        self.clocks.monotonic = monotonic

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    def reserved_for(self, node: str) -> Reserved:
        """The leader's names that node ``node`` may not hold (none for the leader node), and
        the leader node's name."""
        names = self.leader_names
        if names is None or node == self.leader_node:
            return Reserved()
        return Reserved(names.ips, names.dns, self.leader_node)

    def ca_serials(self) -> list[str]:
        """(Worker thread: it reads the store.) The serials of the cluster CA's own
        certificates: the one in use and every one a ``tlsroll ca renew`` replaced or made.
        No revocation list this CA signs can revoke one (agents and workstations trust it
        directly): ``ca revoke`` refuses them (``Store.revoke``), and a list learned from an
        agent names them for nothing (``Store.learn_revoked`` skips them)."""
        serials = [f"{self.ca.cert.serial_number:x}"]
        renewals = self.store.ca_renewals()
        return serials + [s for r in renewals for s in (r.serial, r.previous_serial) if s]

    def crl_of(
        self,
        number: int,
        entries: Sequence[tuple[str, dt.datetime]],
        issued: dt.datetime | None = None,
    ) -> tuple[int, bytes]:
        """The CA's revocation list (number, PEM) for the store's list as just read
        (``Store.revocations``), signed once per number. Its thisUpdate and nextUpdate are its
        number's (``issued``; now if not recorded), so a leader that starts again signs the
        list the agents hold with the same times. It was signed again daily with the same
        number before, which no agent ever took (an agent holds a list by number): the list
        is kept within its validity by a new number instead (``CRL_RENEW_AFTER``)."""
        if self._crl[0] != number:
            crl = pki.build_crl(self.ca, number, entries, now=issued or self.clock())
            self._crl = (number, pki.crl_to_pem(crl))
        return self._crl

    def online(self, last_heartbeat: dt.datetime | None) -> bool:
        """Whether a node last heard at ``last_heartbeat`` is online now. A time the store
        gives (``Store.get_node``, ``list_nodes``) is on the clock as it runs now, however it
        stepped since the node was heard (``Store._then_on_clock_now``)."""
        if last_heartbeat is None:
            return False
        silence = self.clock() - last_heartbeat
        return silence <= dt.timedelta(seconds=self.heartbeat_interval * OFFLINE_AFTER_HEARTBEATS)

    def fresh_reports(self, infos: Mapping[str, ClientsInfo], now: dt.datetime) -> frozenset[str]:
        """The nodes of ``infos`` whose stored client report speaks for now
        (``schema_view.fresh_reports``): who is still on http there is judged by that report
        (``schema_view.still_on_http_now``), for the schema and the viewer as for a finalize."""
        return fresh_reports(self.store, infos, now, report_stale_after(self.heartbeat_interval))

    def node_problem(self, node: str) -> str | None:
        """What keeps node ``node`` from being planned or switched now, in words with what to
        do (``NodeProblemView``), or None: two agents use its identity (``TwinAgents``), or
        an agent calls with an earlier certificate of it (``EarlierCertificate``)."""
        now = self.monotonic()
        twins = self.twin_agents.get(node)
        if twins is not None and now < twins.until:
            return twins_problem(node)
        earlier = self.earlier_certificates.get(node)
        if earlier is not None and now < earlier.until:
            return earlier_problem(node, earlier.serial)
        return None

    def forget_node(self, node: str) -> None:
        """Node ``node`` was removed (the store says so): its entries here go, so that no node
        problem, server or clock of it is shown, and a heartbeat of it under way (checked
        against the store before the removal, and writing after it) adds none back
        (``removed_since``: s43's Left 3)."""
        self.removals += 1
        if len(self.removed) >= MAX_CALLERS:
            self.removed.clear()  # (a removal is an admin's act: never as a rule)
        self.removed[node] = self.removals
        for entries in (
            self.live_servers,
            self.served_fingerprints,
            self.needs_admin_since,
            self.bootstrap_down,
            self.agent_store,
            self.store_logged,
            self.server_login_failures,
            self.login_failures_logged,
        ):
            entries.pop(node, None)
        self.twin_agents.pop(node, None)
        self.earlier_certificates.pop(node, None)
        self.clocks.drop(node)
        for forget in self.on_forget:
            forget(node)

    def no_settings(self) -> frozenset[str]:
        """(Any thread.) The nodes whose agents say their server serves https while their
        journal holds no settings for it (``NO_SETTINGS``): no bootstrap service runs there
        until a rotate-cert, which a plan that finds such a node done names."""
        return frozenset(
            node
            for node, (_since, why) in list(self.bootstrap_down.items())
            if why.startswith(NO_SETTINGS)
        )

    def removed_since(self, node: str, removals: int) -> bool:
        """Whether ``node`` was removed after ``removals`` (``removals`` as it was then)."""
        return self.removed.get(node, 0) > removals

    def login_failures(self) -> list[LoginFailuresRow]:
        """(Any thread.) The nodes whose server counts wrong client passwords, kept across its
        restarts (``ServerLoginFailuresView``), by name."""
        return sorted(list(self.server_login_failures.values()))

    def node_problems(self) -> list[NodeProblemRow]:
        """(Any thread.) Every node's ``node_problem`` now, every node whose clock differs
        from the leader's (``leader.node_clocks``: a warning, which holds nothing; a rollout's
        preflight refuses the node beyond its own limit), and every node whose agent says it
        needs the admin (``NEEDS_ADMIN``: its agent refuses stages, switches and rollbacks,
        and the planner refuses a plan with it): what holds a rollout first, then by name
        (``leader.states.NODE_PROBLEM_ORDER``)."""
        now = self.monotonic()
        problems = [
            NodeProblemRow(node, twins_problem(node), twins.since)
            for node, twins in list(self.twin_agents.items())
            if now < twins.until
        ]
        problems += (
            NodeProblemRow(
                node,
                earlier_problem(node, earlier.serial),
                earlier.since,
                NodeProblemKind.EARLIER_CERTIFICATE,
            )
            for node, earlier in list(self.earlier_certificates.items())
            if now < earlier.until
        )
        problems += (
            NodeProblemRow(node, f"{node} {summary}", since, NodeProblemKind.NEEDS_ADMIN)
            for node, since in list(self.needs_admin_since.items())
            if (summary := self.live_servers.get(node, "")).startswith(NEEDS_ADMIN)
        )
        problems += (
            NodeProblemRow(
                node, bootstrap_problem(node, why), since, NodeProblemKind.BOOTSTRAP_DOWN
            )
            for node, (since, why) in list(self.bootstrap_down.items())
        )
        problems += (
            NodeProblemRow(
                node,
                agent_store_problem(node, said),
                since,
                NodeProblemKind.AGENT_STORE,
                said=said,
            )
            for node, (since, said) in list(self.agent_store.items())
        )
        clocks, step = self.clocks.problems_and_step()
        problems += (
            NodeProblemRow(
                node, clock_problem(offset, leader, step), since, CLOCK_OFFSET, offset, leader
            )
            for node, offset, since, leader in clocks
        )
        # What holds a rollout first, then by node (``NODE_PROBLEM_ORDER``: by the kinds' names,
        # information-only ``agent-store`` came before ``needs-admin``; s74 agenttrouble L1).
        return sorted(problems, key=lambda p: (problem_rank(p.kind), p.node, p.kind))

    def node_online(self, node: Node) -> bool:
        """Whether ``node`` is online: enrolled, not cut off by a revocation of its certificate
        (the leader refuses its agent from that moment: ``Node.cert_revoked``), and heard from
        within ``OFFLINE_AFTER_HEARTBEATS`` intervals."""
        return (
            node.removed_at is None and not node.cert_revoked and self.online(node.last_heartbeat)
        )


def claimed_names(name: str, addresses: Sequence[str], dns_names: Sequence[str]) -> pki.Names:
    """The names a node claims (at token time or enrolment), or INVALID_ARGUMENT: a valid node
    name, at least one address, few enough names, each naming one host (``pki`` rules). A DNS
    name is taken as ``init`` and leader.toml take the leader's (``pki.dns_given``: any case,
    one final dot), as the agent's config gives it: ``token create --dns Host.Example.com.``
    was refused (review s67 L)."""
    dns_names = [pki.dns_given(dns) for dns in dns_names]
    if problem := pki.node_name_problem(name):
        raise invalid(problem)
    if len(addresses) > pki.MAX_IPS or len(dns_names) > pki.MAX_DNS:
        raise invalid(f"a node holds at most {pki.MAX_IPS} addresses and {pki.MAX_DNS} DNS names")
    for address in addresses:
        if problem := pki.ip_problem(address):
            raise invalid(problem)
    for dns in dns_names:
        if problem := pki.dns_problem(dns):
            raise invalid(problem)
    names = pki.Names.of(name, addresses, dns_names)
    if problem := pki.requested_names_problem(names):
        raise invalid(problem)
    return names


class EnrolmentService(enrolment_pb2_grpc.EnrolmentServicer):
    def __init__(self, state: LeaderState) -> None:
        self.state = state
        self.guard = join_guard.JoinGuard()  # per-source backoff, sampled logs

    @map_errors(ERRORS)
    @join_guard.guarded
    async def Enrol(
        self, request: enrolment_pb2.EnrolRequest, context: Ctx
    ) -> enrolment_pb2.EnrolResponse:
        token = JoinToken.parse(request.token)
        names = claimed_names(request.node_name, request.addresses, request.dns_names)
        if not 1 <= request.agent_port <= 65535:
            raise invalid("agent_port must be 1..65535")
        if not request.names_apart:
            # An agent of an earlier release takes only a certificate with the node's names in
            # its SAN: a server certificate for the node's address that every workstation
            # would accept (``pki.NAMES_OID``). Refused before the token is used, so not
            # counted against the source: the agent upgraded as told enrols at once.
            version = peertext.clean(request.agent_version, MAX_AGENT_VERSION)
            raise join_guard.OlderAgent(
                f"the agent{f' (tlsroll {version})' if version else ''} is older than this"
                " leader: install the leader's release on the node, then enrol it (this"
                " refusal did not use the token)"
            )
        csr = pki.load_csr_pem(request.csr_pem)
        public_key = pki.check_csr(csr, names)
        key_pin = pki.spki_pin(public_key)
        td = self.state.trust_domain
        issued: list[Any] = []

        def issue() -> NodeCert:
            cert = self.state.ca.issue(
                public_key,
                names,
                server=True,  # the agent serves NodeAgent
                client=True,  # and calls the leader
                identity=spiffe.node(td, names.common_name),
                internal_dns=[spiffe.key_host(td, key_pin)],
                now=self.state.clock(),
                lifetime=self.state.agent_cert_lifetime,
                names_apart=True,  # no server certificate for the node's names (pki.NAMES_OID)
            )
            issued.append(cert)
            return NodeCert(
                key_pin=pki.spki_pin(public_key),
                fingerprint=pki.fingerprint(cert),
                serial=f"{cert.serial_number:x}",
                not_after=cert.not_valid_after_utc,
            )

        try:
            await asyncio.to_thread(
                self.state.store.enrol,
                token_id=token.id,
                secret=token.secret,
                name=names.common_name,
                addresses=names.ips,
                dns_names=names.dns,
                agent_version=peertext.clean(request.agent_version, MAX_AGENT_VERSION),
                agent_port=request.agent_port,
                key_pin=key_pin,
                issue=issue,
                now=self.state.clock(),
                reserved=lambda: self.state.reserved_for(names.common_name),
            )
        except TooMany as exc:
            # A replay over the node's certificates per hour: the agent is told when to try
            # again, as by the join guard (``retry-after``; review rev-enrol L3: without it, the
            # agent took the RESOURCE_EXHAUSTED for gRPC's own, a request too large, and
            # stopped saying to check its join token).
            if exc.retry is not None:
                seconds = max(1, math.ceil(exc.retry.total_seconds()))
                context.set_trailing_metadata((("retry-after", str(seconds)),))
            raise
        log.info(
            "enrol.accepted", node=names.common_name, token_id=token.id, addresses=list(names.ips)
        )
        return enrolment_pb2.EnrolResponse(
            certificate_pem=pki.cert_to_pem(issued[0]),
            ca_certificate_pem=self.state.ca.cert_pem,
            # Kept by the agent: its first channel is timed by it (session 73, leftovers).
            heartbeat_interval_seconds=self.state.heartbeat_interval,
        )


def server_summary(request: leader_pb2.HeartbeatRequest) -> str:
    """One line on what a node's managed server runs, from its heartbeat (cleaned: a peer
    wrote it): "http", "https", "http+https", "down: <why>", "needs the admin: <why>" (its
    journal put back: ``NEEDS_ADMIN``), "restarting: <by whom>" (a restart its agent's own
    switch makes, longer than the beat waited: ``SERVER_RESTARTING``, not "down"), "none";
    "frozen" added."""
    if not request.HasField("server"):
        return ""
    live = request.server
    if live.driver == "none":
        return "none"
    if not live.healthy:
        detail = peertext.clean(live.detail, 200)
        if detail.startswith((NEEDS_ADMIN, SERVER_RESTARTING)):
            # "needs the admin: <why, what to do>", "restarting: by this node's agent for N s
            # ...", as the agent said it
            return detail
        return "down: " + (peertext.clean(live.detail, 120) or "no answer")
    schemes = [s for s in ("http", "https") if s in live.schemes]
    return "+".join(schemes or ["?"]) + (" frozen" if live.frozen else "")


MAX_FAILURE_REPORTS = 64  # per heartbeat; the agent sends at most that many


def agent_version_text(raw: str) -> str:
    """An agent's version string as the leader keeps and prints it (cleaned: a peer wrote
    it), remembered: every heartbeat carries it, and cleaning walks it character by
    character (a few per cent of a message's Python time at 200 agents). The cache is keyed
    by the string cut to what cleaning reads: keyed by the whole, 256 versions of a message's
    size each, sent by one node, stayed in the leader's memory (audit 2 of session 33, M3)."""
    return _agent_version_text(raw[: peertext.READ_FACTOR * MAX_AGENT_VERSION])


@functools.lru_cache(maxsize=256)
def _agent_version_text(raw: str) -> str:
    return peertext.clean(raw, MAX_AGENT_VERSION)


def agent_features_of(request: leader_pb2.HeartbeatRequest) -> tuple[str, ...]:
    """The features an agent's heartbeat names, as the leader keeps them
    (``tlsroll.features.reported``: well formed, sorted, bounded; a peer wrote them),
    remembered as ``agent_version_text`` is: every message carries them, and the nodes of a
    cluster mostly name the same few."""
    names = request.features
    if not names:
        return ()
    # Cut to what ``reported`` reads before it is a key: a peer's long names stay out of memory.
    return _agent_features(tuple(n[: features.MAX_NAME + 1] for n in names[: features.READ]))


@functools.lru_cache(maxsize=64)
def _agent_features(names: tuple[str, ...]) -> tuple[str, ...]:
    return features.reported(names)


def _when(stamp: Timestamp, otherwise: dt.datetime) -> dt.datetime:
    """``stamp`` as a UTC datetime, or ``otherwise`` if it is no time a datetime holds."""
    try:
        return stamp.ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        return otherwise


def clock_shift(request: leader_pb2.HeartbeatRequest, now: dt.datetime) -> dt.timedelta:
    """``sent_shift`` of a heartbeat: its ``sent_at``."""
    return sent_shift(request.sent_at if request.HasField("sent_at") else None, now)


def sent_shift(sent_at: Timestamp | None, now: dt.datetime) -> dt.timedelta:
    """How far the sender's clock is behind the leader's, read from the
    message: when it came (``now``) less when its agent says it sent it (``sent_at``: a
    heartbeat's; a ``NodeStatus``'s ``agent_time``, whose clients a refused ``--when-quiet``
    switch stores, ``leader.changes._store_sighting``). The
    times of the message's client report are the node's clock's; shifted by this, they are
    the leader's, which ``--when-quiet`` compares them with (clock audit H of session 35: a
    node whose clock is behind by the 100 s the preflight allows looked quiet 100 s early,
    and its http port closed under a workstation still using it). The message's time on the
    way counts as the node being behind: its sightings look more recent, never quieter.
    Never negative: a node whose clock is ahead has its sightings' times capped at the
    leader's now (``client_rows``), which makes them look recent, never quiet; shifting them
    back would make sightings made before a forward step of the node's clock look older than
    they are. Zero for a message without a time (an older agent) or with one that is no
    time."""
    if sent_at is None:
        return dt.timedelta(0)
    return max(now - _when(sent_at, now), dt.timedelta(0))


def _shifted(stamp: Timestamp, shift: dt.timedelta, otherwise: dt.datetime) -> dt.datetime:
    """``stamp`` on the leader's clock (``clock_shift``), or ``otherwise`` (``_when``)."""
    try:
        return _when(stamp, otherwise - shift) + shift
    except OverflowError:
        return otherwise


Sighting = tuple[str, str, str, tuple[int, int], tuple[int, int]]
"""A client sighting as sent: scheme, address, workstation (cleaned), first and last seen
(seconds, nanos: the node's clock)."""


@dataclass(frozen=True)
class Sightings:
    """A client report's sightings the leader takes (schemes http/https, an address), in its
    order (``seen``, and ``sent``: cleaned), and those of its http ones whose times as sent say
    they went back to http after https, each with the https sightings it is judged against
    (``back``, by index: ``clients.https_matches``). Read once a message (``sightings``), for
    both ``clients_said`` and ``client_rows``: each ran ``https_matches`` of its own (session
    72's L: twice a message that was written)."""

    seen: list[types_pb2.ClientSeen]
    sent: list[Sighting]
    back: dict[int, list[int]]


def sightings(view: types_pb2.ClientsView) -> Sightings:
    """``view``'s ``Sightings``: at most ``MAX_CLIENTS`` entries, strings bounded and cleaned."""
    seen: list[types_pb2.ClientSeen] = []
    sent: list[Sighting] = []
    for c in view.clients[:MAX_CLIENTS]:
        address = peertext.clean(c.address, 64)
        if c.scheme not in ("http", "https") or not address:
            continue
        seen.append(c)
        sent.append(
            (
                c.scheme,
                address,
                peertext.clean(c.workstation, 63),
                (c.first_seen.seconds, c.first_seen.nanos),
                (c.last_seen.seconds, c.last_seen.nanos),
            )
        )
    back = {
        i: matched
        for i, matched in https_matches([(r[0], r[1], r[2]) for r in sent]).items()
        if matched and sent[i][4] > min(sent[j][3] for j in matched)
    }
    return Sightings(seen, sent, back)


def client_rows(
    node: str,
    view: types_pb2.ClientsView,
    now: dt.datetime,
    shift: dt.timedelta = dt.timedelta(0),
    taken: Sightings | None = None,
) -> list[Client]:
    """Who ``node``'s server saw, from its heartbeat, made safe to store and print: at most
    ``MAX_CLIENTS`` entries, schemes http/https only, strings bounded and cleaned, its times
    on the leader's clock (``shift``: ``clock_shift``) and none later than ``now``, counts
    bounded. A time that is no time (seconds outside the years 1 to 9999, nanoseconds beyond
    a second) is taken as ``now``: the client counts as seen just now, never as quiet (an
    http client left out could make a node look quiet to ``--when-quiet``: review 2 of
    session 33, L3); it failed the whole message with INTERNAL before (review 1, L3).

    One message's times keep their order (one shift), but capping at ``now`` (a node clock
    ahead) can make two of them equal: a workstation whose first https request and a later
    http one both lie ahead of the leader's clock was stored with both at ``now``, a tie,
    which ``rollout_core.still_on_http`` takes for switched, and a plain finalize went ahead
    while it used http (review s44rev6 L1; up to the preflight's 100 s of skew, until a
    report came uncapped). An http sighting whose times as sent say it went back to http
    (``clients.https_matches``, on the node's own clock) keeps that order: each https
    sighting it is judged against that begins at or after its ``last_seen`` is put a
    microsecond before it. ``taken``: ``sightings(view)``, if read already."""
    taken = sightings(view) if taken is None else taken
    rows = []
    for c, (scheme, address, workstation, _, _) in zip(taken.seen, taken.sent, strict=True):
        last = min(_shifted(c.last_seen, shift, now), now) if c.HasField("last_seen") else now
        first = _shifted(c.first_seen, shift, last) if c.HasField("first_seen") else last
        rows.append(
            Client(
                node=node,
                scheme=scheme,
                address=address,
                workstation=workstation,
                first_seen=min(first, last),
                last_seen=last,
                requests=min(c.requests, 2**62),
            )
        )
    # The http sightings that went back to http after https, as sent (the node's clock), and
    # the https ones each is judged against (``clients.https_matches``): each of those that
    # begins at or after the earliest such http ``last_seen`` is put a microsecond before it.
    before: dict[int, dt.datetime] = {}
    for i, matched in taken.back.items():
        for j in matched:
            before[j] = min(before.get(j, rows[i].last_seen), rows[i].last_seen)
    tick = dt.timedelta(microseconds=1)
    return [
        replace(r, first_seen=before[j] - tick) if j in before and r.first_seen >= before[j] else r
        for j, r in enumerate(rows)
    ]


MAX_RENEWAL_ERROR = 200  # characters of the reason an agent gives for a failed renewal
RENEWAL_DUE_SPAN = dt.timedelta(days=398)
"""How far from the leader's clock an agent's ``renewal_due_at`` may be: its certificate
lives at most 397 days (``agent_cert_lifetime``), is valid while it calls, and its renewal is
due within it. One beyond is not known (a foreign or broken agent's: "due 9999-12-31" was
stored and listed; session 67, peers' times)."""


def renewal_report(request: leader_pb2.HeartbeatRequest, now: dt.datetime) -> RenewalReport:
    """What an agent says about renewing its certificate, made safe to store and print (no
    failure reported later than ``now``, no renewal due farther than ``RENEWAL_DUE_SPAN``)."""
    # A time that is no time: the renewal due now, failing since now (never an INTERNAL).
    due = _when(request.renewal_due_at, now) if request.HasField("renewal_due_at") else None
    if due is not None and not now - RENEWAL_DUE_SPAN <= due <= now + RENEWAL_DUE_SPAN:
        due = None
    since = None
    if request.HasField("renewal_failing_since"):
        since = min(_when(request.renewal_failing_since, now), now)
    error = peertext.clean(request.renewal_error, MAX_RENEWAL_ERROR) if since else ""
    return RenewalReport(
        due_at=due, failing_since=since, error=error or ("failing" if since else "")
    )


MAX_FAILURE_COUNT = 1_000_000  # per source and report
# Audit events and log lines of bootstrap failures a node's reports get a day (the leader's
# UTC day); its later reports that day still add to the counts (``MAX_FAILURE_ROWS`` sources
# each node), without them. An agent reports new failures at most once a message, and
# its bootstrap service slows down after 200 a day; a compromised node could otherwise add an
# audit row and 64 log lines with every message, for good (audit s33 M4).
FAILURE_AUDITS_A_DAY = 1440


def failure_rows(
    node: str, reports: Sequence[leader_pb2.BootstrapFailure], now: dt.datetime
) -> list[BootstrapFailureRow]:
    """What ``node``'s agent reported about failed bootstrap passwords, made safe to store and
    print: at most 64 sources, strings bounded and without control characters, counts bounded,
    no time later than ``now``."""
    rows = []
    for f in reports[:MAX_FAILURE_REPORTS]:
        source = peertext.clean(f.source, 64)
        if not source or f.count <= 0:
            continue
        last = _when(f.last_at, now) if f.HasField("last_at") else now
        rows.append(
            BootstrapFailureRow(
                node=node,
                source=source,
                workstation=peertext.clean(f.workstation, 63),
                count=min(f.count, MAX_FAILURE_COUNT),
                first_at=min(last, now),
                last_at=min(last, now),
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class Caller:
    """What the leader needs of a node's client certificate, parsed once per certificate.

    Only these strings are kept, not the parsed certificate: cryptography caches every
    extension it was asked for on the certificate object as Python objects (the SAN's
    identity, ~2 KiB each), which 500 agents' cached callers kept for the leader's lifetime
    (1.1 MiB at 500; issue 15)."""

    name: str
    fingerprint: str
    serial: str
    key_pin: str  # ``pki.spki_pin``: a renewal must bring another key


MAX_CALLERS = 4096  # parsed certificates kept (one per node, and a renewed one beside it)


def caller_key(pem: bytes) -> bytes:
    """The ``LeaderService`` callers cache's key for a client certificate's PEM: its SHA-256
    (32 bytes kept per caller instead of the ~900 of the PEM)."""
    return hashlib.sha256(pem).digest()


MAX_STREAMS_PER_NODE = 2
"""Heartbeats streams one node may hold open: its agent's, and a new one opened before the
leader noticed the old one died (a reset connection). A stream holds memory for as long as it
is open (a unary call did only while it ran), so a node's certificate must not pin more: a
stream beyond this ends the node's oldest one."""

SILENT_STREAMS_PER_NODE = 2
"""Heartbeats streams one node's certificate may hold open before their first message (an
agent sends it at once): beyond this the node's oldest silent stream ends. Counted from the
open, not from the first accepted message as ``MAX_STREAMS_PER_NODE`` is: before, one
certificate held any number of silent streams, each until ``FIRST_MESSAGE_SECONDS``, a
refused one too (audit s33 M2: 2271 in 3 s on one connection, ~124 MiB). A certificate the
snapshot refuses is refused at the open (``Heartbeats``)."""

STAGES_HEARD = 64
"""Rollouts of an agent's ``unswitched_stages`` the leader looks at (the agent sends as many at
most: ``nodeagent.leader_link.STAGES_REPORTED``); longer than a rollout id may be, ignored."""

ENDED_KEPT = 1024
"""Ended rollouts the leader remembers having found (``LeaderService._look_at_stages``)."""


def heard_stages(request: leader_pb2.HeartbeatRequest) -> frozenset[str]:
    """The rollouts of the stages an agent's message says it keeps with no transaction begun
    (``HeartbeatRequest.unswitched_stages``), as far as the leader looks at them."""
    return frozenset(r for r in request.unswitched_stages[:STAGES_HEARD] if 0 < len(r) <= 64)


QUESTIONS_PER_STREAM = 8

EARLIER_AFTER_BEATS = 3
"""Heartbeat intervals for which an earlier certificate of a node (one a renewal replaced) is
refused before the leader takes it for a copy's (``LeaderService._earlier_due``)."""

TWINS_HOLD_BOUNDS = 2
"""Renewal deadlines (``renewal_deadline``: 56 s at 5 s) for which two agents seen using one
node's identity hold the node (``LeaderState.node_problem``) after they were last seen: two
live agents each send at least every renewal bound, so their messages interleave again
within one; once one stops, the node is free this long after."""

TEST_EARLIER_HOLD_ENV = "TLSROLL_TEST_EARLIER_HOLD_SECONDS"
"""Tests only: seconds an earlier certificate's node problem holds after the last refusal of it
(``LeaderService._refused``) in place of ``TWINS_HOLD_BOUNDS`` renewal deadlines (16 s at a
1 s interval), at least 1 and never longer than those (``earlier_hold``), so that a test that
shows the problem outlasting its hold (a revocation that must not end it) waits seconds less.
Not a setting: the hold is what keeps the problem shown while a refused agent's calls come
late."""


def earlier_hold(environ: Mapping[str, str], heartbeat_interval: int) -> float:
    """Seconds an earlier certificate's node problem holds after its last refusal:
    ``TWINS_HOLD_BOUNDS`` renewal deadlines, or the test hook's (``TEST_EARLIER_HOLD_ENV``) if
    it holds a number from 1 to that."""
    default = TWINS_HOLD_BOUNDS * renewal_deadline(heartbeat_interval)
    return hook_number(environ, TEST_EARLIER_HOLD_ENV, default, lambda v: 1 <= v <= default)


EVICTED_KEPT = 4
"""Agent ids per node whose stream was ended for another agent's newer one that the leader
remembers (``LeaderService._note_evicted``): one coming back while another agent lives means
three or more agents use the node's identity."""

MAX_AGENT_INSTANCE = 32  # characters of ``HeartbeatRequest.agent_instance`` the leader keeps


def failures_report(request: leader_pb2.HeartbeatRequest) -> tuple[str, int] | None:
    """A message's numbered bootstrap failure report (``failures_report``): which agent's
    (``agent_instance``) and its number; None if it carries no numbered one. The agent sends
    a report again unchanged, with its number, until the leader answered it: one taken
    already is not added again (audit s33 L2)."""
    if not request.failures_report or not request.bootstrap_failures:
        return None
    return request.agent_instance[:MAX_AGENT_INSTANCE], request.failures_report


def agent_of(request: leader_pb2.HeartbeatRequest, context: Ctx) -> str:
    """Which agent sends on a stream: its ``agent_instance``, or, from an agent that sends
    none (an older release), the host of its connection's peer ("ipv4:10.0.0.5": the port
    differs per connection of one agent)."""
    if request.agent_instance:
        return "id:" + request.agent_instance[:MAX_AGENT_INSTANCE]
    return "peer:" + context.peer().rpartition(":")[0][:80]


"""Planning questions (``LeaderService.ask_check``) one heartbeat stream may have waiting for
their answer; more for the same node (plans asked at once) go over the agent's channel."""
NO_ROOM = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
"""``CheckAnswer.refused_code`` of an agent that has no room for the question now (its own
count: ``nodeagent.leader_link.BUSY``), without a server view: asked over the channel."""

RENEW_HEARTBEATS = 4
"""An agent on a ``Heartbeats`` stream in renewal mode (``HeartbeatRequest.renews``) sends a
message when its report changed, and at least every this many heartbeat intervals
(``renew_seconds``): the leader's CPU goes with messages, about 1 ms each in grpc-python
however little the servicer does, and a report that says nothing new need not be sent every
interval. Between messages the connection's keepalive says the agent is alive
(``keepalive_seconds``). A hung agent, whose gRPC core may still answer PINGs, is caught by
this bound: it is offline ``renew`` + 3 intervals after its last message, or when its stream
ends if that is later (``renewal_deadline``; 8 s at 1 s)."""

RENEW_MARGIN = 5  # seconds: a renewal arrives this long before a client report would be stale

RENEW_GRACE = 3.0
"""Seconds a renewal may come after the renewal bound and an interval before the leader ends
the stream (``Heartbeats``): the agent decides at each beat whether the next would be too late
(half an interval of its own margin), but that next beat first waits up to 2 s for its
server's status (``nodeagent.leader_link.SERVER_VIEW_SECONDS``), and a busy host stalls a
little more. Without it a renewal at a 1 s interval missed whenever the status took over half
a second (review of session 21, finding 3)."""


def renew_seconds(heartbeat_interval: int) -> int:
    """The renewal bound the leader gives an agent in renewal mode: ``RENEW_HEARTBEATS``
    intervals, short enough that the client report a renewal brings (``clients_persist``)
    comes before the stored one is stale (``planner.report_stale_after``) even when the
    renewal is an interval late: at 5 s, 20 s."""
    stale = int(report_stale_after(heartbeat_interval).total_seconds())
    cap = stale - heartbeat_interval - RENEW_MARGIN
    return max(heartbeat_interval, min(RENEW_HEARTBEATS * heartbeat_interval, cap))


def renewal_deadline(heartbeat_interval: int) -> float:
    """Seconds after a renewal-mode message that the leader waits for the next one: the bound,
    an interval (the agent's next beat) and ``RENEW_GRACE`` (8 s at 1 s, 28 s at 5 s). A hung
    agent is offline at the later of this and the bound + 3 intervals after its last message
    (``_expired``)."""
    return renew_seconds(heartbeat_interval) + heartbeat_interval + RENEW_GRACE


KEEPALIVE_NOTICE = rpc.KEEPALIVE_NOTICE  # (``tlsroll.rpc``: the agent's PINGs go by it)


def keepalive_seconds(heartbeat_interval: int) -> tuple[float, float]:
    """The control port's HTTP/2 keepalive: ``tlsroll.rpc.keepalive_seconds`` (shared: the
    agents time their own PINGs by it, ``tlsroll.rpc.agent_ping_seconds``)."""
    return rpc.keepalive_seconds(heartbeat_interval)


def control_server_options(heartbeat_interval: int) -> list[tuple[str, int]]:
    """The control port's gRPC server options: the keepalive (``keepalive_seconds``: a PING
    once nothing arrived for its time, a call open or not: a renewal-mode stream is quiet for
    longer; an agent's own PINGs come sooner, ``tlsroll.rpc.agent_ping_seconds``), and
    no bandwidth-delay probe: gRPC's core otherwise answers data that arrives on a quiet
    connection with a PING of its own to size the flow-control window, one more PING round
    trip for every heartbeat message (issue 15), for a window that heartbeats never fill.
    A message is at most ``MAX_AGENT_MESSAGE`` bytes (gRPC's default is 4 MiB)."""
    every, wait = keepalive_seconds(heartbeat_interval)
    return [
        ("grpc.max_receive_message_length", MAX_AGENT_MESSAGE),
        ("grpc.keepalive_time_ms", int(every * 1000)),
        ("grpc.keepalive_timeout_ms", int(wait * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Agents ping too (``tlsroll.rpc.agent_ping_seconds``), at most every second.
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        NO_BDP_PROBE,
    ]


MAX_AGENT_MESSAGE = 1024 * 1024
"""The largest message the control port takes from an agent (RESOURCE_EXHAUSTED beyond): a
heartbeat is a few KiB, one with ``MAX_CLIENTS`` clients and ``MAX_FAILURE_REPORTS`` bootstrap
failures of the longest names well under 200 KiB, a certificate request a few KiB."""

FIRST_MESSAGE_SECONDS = 10.0
"""A ``Heartbeats`` stream whose first message has not come after this long (or twice the
interval, if longer) ends with DEADLINE_EXCEEDED: an agent sends its first at once, and a
stream that never says who it is for would hold memory and outlive the leader's stop."""

BATCH_SECONDS = 1.0
"""The group commit's period: heartbeat records and client reports of all agents that need
writing are queued (``Store.queue_heartbeat``, ``Store.queue_write``) and written together
this long after the first of them that says something new came (those that do not may wait
longer: ``REFRESH_SECONDS``), in one transaction (``Store.write_queued``; what a crash can lose
is said there).
Before, each was an fsync'd transaction of its own behind a worker-thread hop, nearly one per
renewal-mode message: about a third of the leader's heartbeat time (issue 15)."""

REFRESH_SECONDS = 10.0
"""How long a queued write that says nothing new may wait for its group commit: a heartbeat
record written only because the stored one is ``HEARTBEAT_PERSIST`` old
(``store.Queued.REFRESH``), a client report only because the stored one is ``clients_persist``
old (its times and counts moved; who was seen did not), no later than a batch period before
the stored report would be stale (``LeaderService._record_clients``; until then the running
leader judges how recent the stored report is by the newest that repeats it:
``Store.report_on_clock_now``, so a slow commit does not make it stale). Anything that says
something new is committed within ``BATCH_SECONDS`` as before, and takes every queued write
along. An agent in renewal mode sends every 20 s (at 5 s) and nearly every message was such a
refresh: the leader committed about once a second however few agents it had (a worker-thread
hop, a transaction and an fsync each), a fixed cost that small clusters paid per agent
(issue 15); now about once per this period. A crash (or a stop whose last commit fails) may
lose this much of such refreshes: a node's stored last-seen time is then up to
``HEARTBEAT_PERSIST`` and this old, and a stored client report up to nearly
``planner.report_stale_after`` old. A restarted leader takes no report stored before it
started for its node's word (``Store.report_since_start``): a finalize refuses ("waiting for
NODE's first report since the leader started") and ``--when-quiet`` holds the node until
the agent's first report to it, which is new to it and committed within a batch period (at
a 1 s interval, under 2.5 s after the leader was up, measured). Before (s44), a report stored
just before the crash spoke for the node at once (nobody on http then: a finalize went
ahead), and one a little older was "stale". The running leader shows neither (its nodes'
newest heartbeats and reports are in memory)."""

TEST_BATCH_ENV = "TLSROLL_TEST_BATCH_SECONDS"
"""Tests only: a leader daemon's group-commit period instead of ``BATCH_SECONDS`` (seconds,
over 0, at most a day). A test that shows the stop writes what is queued sets it long, so that
the periodic commit cannot write it first and pass the test without the stop (review of
session 22, L9). Not a setting: an administrator has no reason to trade more loss at a crash
for fewer writes."""


def batch_period(environ: Mapping[str, str]) -> float:
    """The group-commit period: ``TEST_BATCH_ENV`` if it holds a usable number, else
    ``BATCH_SECONDS``."""
    return hook_number(environ, TEST_BATCH_ENV, BATCH_SECONDS, lambda v: 0 < v <= 86400)


CRL_ASKS_PER_NODE = 4
"""Lists one node's agent is asked for at a time, each with its own patience
(``LeaderService._crl_asked``), and numbers it is wanted for or could not send (``_crl_wanted``,
``_crl_unsent``): an honest agent holds one number until it takes a newer list."""

_T = TypeVar("_T")


def _bounded_add(numbers: dict[int, _T], number: int, value: _T) -> None:
    """``number`` into one node's ``numbers`` (``LeaderService._crl_wanted`` and its kin), at
    most ``CRL_ASKS_PER_NODE`` of them: that node's oldest dropped, never another node's."""
    if number not in numbers and len(numbers) >= CRL_ASKS_PER_NODE:
        del numbers[next(iter(numbers))]
    numbers[number] = value


def crl_patience(heartbeat_interval: int) -> float:
    """Seconds the leader waits for an agent's revocation list it asked for
    (``LeaderService._crl_held``) before it sends the agent its own list regardless: the agent
    sends it at once, with its next message; four intervals, a minute at least."""
    return max(60.0, 4.0 * heartbeat_interval)


LEARNED_SHOWN = 20
"""How many of the serials learned from an agent's revocation list ``crl.learned`` names (the
audit's ``crl.learned`` holds them all)."""

CRL_NEWS_SECONDS = 10.0
"""The renewal watch sends the agents a revocation list that only superseded certificates made
newer (a rollout's nodes given new ones: each node's revokes its old one as it is done) at
most this often: it sent the whole list to every agent whenever it changed, about once a
second through a rollout, each time longer (500 agents, a second enable-tls: ~190 MiB sent
and double the leader's CPU per node; s28leak). Nothing presents a superseded certificate any
more; a certificate the admin revoked, or a removed node's, goes out at once (``crl_urgent``).
A renewal that asks nothing is not answered with such a list either (the agents' messages
during a rollout brought it ~70 MiB at 500 agents); a message that asks for an answer gets the
newest list as ever."""

SNAPSHOT_MAX_AGE = 30.0
"""Seconds after which a ``Snapshot`` is read again even if the store did not change: the
revocation list it carries gets a new number in time (``CRL_RENEW_AFTER``), and a write to
the file that did not come through this process (there is none: the CLI goes through the
admin socket) would not go unnoticed for long."""

CRL_AHEAD_LIMIT = pki.BACKDATE
"""A revocation list whose number was issued further ahead of the leader's clock than this
(the clock was ahead at the revocation, and corrected since) gets a new one at once, as one
issued ``CRL_RENEW_AFTER`` ago: its thisUpdate (``pki.BACKDATE`` before its issue) is in the
future, which a server that checks the list's dates refuses, and it was renewed only once the
clock had passed its issue by a day (clock audit s35, J)."""

CRL_RENEW_AFTER = dt.timedelta(days=1)
"""A revocation list whose number was issued this long ago gets a new one (not urgent:
``Store.renew_crl``), read with the next ``Snapshot``; the agents get it as any newer list
(news on a renewal stream within ``CRL_NEWS_SECONDS``, else the next answer). A list is
valid for ``pki.CRL_VALIDITY`` (7 days) from its number's issue, and an agent holds a list by
number: before (session 33), the leader signed the same number again daily, which no agent
took, and with no revocation for 7 days an agent's ``DATA/crl.pem`` was past its nextUpdate
(a server that checks the list's freshness would refuse every client). A new number per
list is what RFC 5280 asks too (5.2.3). It costs a write a day and each agent one list."""


@dataclass(frozen=True)
class Snapshot:
    """What every heartbeat needs from the store, read in one worker-thread hop and kept until
    the store changes (``Database.generation``, which every write but a heartbeat's routine
    record moves on): which certificate each enrolled node may call with, which serials are
    revoked, the epoch and the revocation list. A heartbeat then asks the store nothing, and
    a message on an open ``Heartbeats`` stream is checked as strictly as a new call."""

    generation: int
    # time.monotonic(): a cache's age (``SNAPSHOT_MAX_AGE``), not the state's clock. After a
    # suspend it serves at most that much longer (a list due for a new number: 30 s late),
    # and a test that moves the state's clock does not make every heartbeat read it anew.
    made: float
    accepted: dict[str, frozenset[str]]  # node -> fingerprints (``Store.accepted_certificates``)
    revoked: frozenset[str]  # serials (hex)
    epoch: int
    crl_number: int
    crl_pem: bytes
    crl_urgent: int = 0  # the list's number as of its last urgent revocation (``_bump_crl``)
    # The rollouts not yet ended (``SchemaStore.live_ids``): an agent's stage of one of them
    # may still be switched, and is not looked up (``LeaderService._look_at_stages``).
    live: frozenset[str] = frozenset()
    # The end of the re-learning window of a store begun by ``--reinitialise`` or restored
    # from a backup, if one was; and when that backup was made.
    relearn_until: dt.datetime | None = None
    restored_from: dt.datetime | None = None
    # The nodes whose certificate on record is revoked (``Store.cut_off_nodes``): every
    # certificate of theirs is refused, the one before it too (``check_caller_in``'s rule).
    cut_off: frozenset[str] = frozenset()
    # The numbers of the lists issued after the backup the store was restored from and before
    # the restore (or before a store begun again), both excluded (``Store.restored_crl_range``):
    # an agent holding one holds revocations the store may lack (``_crl_unlearned``).
    crl_restored: tuple[int, int] | None = None

    def relearns(self, name: str, now: dt.datetime) -> bool:
        """Whether a refused caller of node ``name`` may be re-learned (``Store.relearn``):
        its re-learning window is open, and the store does not know the name or was restored
        from a backup (a node it knows may have renewed its certificate since). Else the
        refusal stands without a write (audit s33 M1)."""
        until = self.relearn_until
        if until is None or now > until:
            return False
        return name not in self.accepted or self.restored_from is not None

    def refusal(self, caller: Caller) -> str | None:
        """Why ``caller`` may not call (``LeaderService._check_on_record``'s rules), or None."""
        name = caller.name
        accepted = self.accepted.get(name)
        if accepted is None:
            return rpc.not_enrolled(name)
        if caller.fingerprint not in accepted:
            return rpc.not_on_record(name)
        # The one before a revoked certificate on record (a store written before
        # ``Store.revoke`` revoked both) renews nothing, and calls no more either: the node
        # is cut off (review s48rev5 L2: its heartbeats still passed).
        if caller.serial in self.revoked or name in self.cut_off:
            return rpc.revoked_node(name)
        return None


def clients_said(view: types_pb2.ClientsView, taken: Sightings | None = None) -> tuple[object, ...]:
    """What of a client report makes it worth a write at once: who was seen on which scheme,
    and the window, source and problem. The times and counts alone move with every request a
    workstation makes; they are written at most every ``clients_persist`` seconds. But who
    used http again after first using https (``Sightings.back``, as the agent's
    ``tlsroll.wire.back_on_http``) is news: a revert that moved only an http ``last_seen``
    left the stored rows saying it had switched until they aged. It changes once per revert,
    not per request. An agent older than this sends such a report only when its other fields
    change or at its bound (its ``report_key`` drops the times): the revert then shows as
    late as before (about 40 s at a 5 s interval). ``taken``: ``sightings(view)``, if read
    already; who went back is judged on it (the names and addresses cleaned, as stored)."""
    taken = sightings(view) if taken is None else taken
    who = frozenset((c.scheme, c.address, c.workstation) for c in view.clients[:MAX_CLIENTS])
    back = frozenset(taken.sent[i][2] or taken.sent[i][1] for i in taken.back)
    return (who, back, view.window_seconds, view.source, view.problem)


def clients_persist(heartbeat_interval: int, renewing: bool = False) -> dt.timedelta:
    """How stale a stored client report may get while its reports say nothing new: half of
    the age at which the engine no longer trusts it (``planner.report_stale_after``), so a
    report is never taken for stale while its agent reports. A report written later makes
    the leader's view *older* (``reported_at``, the ``--when-quiet`` as-of), never newer.
    ``renewing``: the agent sends only at its renewal bound (``renew_seconds``), so the next
    report may come as late as the leader waits for it (``renewal_deadline``); written early
    enough for that."""
    stale = report_stale_after(heartbeat_interval)
    if not renewing:
        return stale / 2
    late = dt.timedelta(seconds=renewal_deadline(heartbeat_interval))
    return max(dt.timedelta(0), min(stale / 2, stale - late))


def _end(beat: _Beats, code: grpc.StatusCode, why: str) -> None:
    """End another RPC's stream with ``code``: its status goes to the client, and the handler
    waiting for its next message sees the stream end. (Cancelling the handler's task would
    send no status: the client would wait until its own deadline.) The handler, if it is
    busy with a message meanwhile, sees ``beat.ending`` and leaves the stream's end to this."""
    context = beat.context

    async def abort() -> None:
        # InternalError: the call ended meanwhile (its client cancelled it as the leader ended
        # it): gRPC's core refuses the status (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), and there
        # is nothing left to end. Raised on, the handler logged it as an internal error.
        with contextlib.suppress(grpc.aio.AbortError, grpc.aio.UsageError, grpc.aio.InternalError):
            await context.abort(code, why)

    if beat.ending is not None:
        return
    _ENDING.add(task := asyncio.ensure_future(abort()))
    task.add_done_callback(_ENDING.discard)
    beat.ending = task


_ENDING: set[asyncio.Future[None]] = set()  # aborts under way (a task needs a reference)
_PUSHES: set[asyncio.Future[None]] = set()  # news being written (``LeaderService._push``)


def _pushed(push: asyncio.Future[None]) -> None:
    """A push's write ended: its outcome is taken (``_push`` reports it if it waited)."""
    _PUSHES.discard(push)
    if not push.cancelled():
        push.exception()


@dataclass(eq=False)
class _Beats:
    """One open ``Heartbeats`` stream, as the leader keeps it: whose it is once a message was
    accepted, whether its agent renews (sends only on change), when its last message came, and
    what the agent holds of the leader's news (so that news goes out to it unasked)."""

    context: Ctx
    name: str = ""  # set (and the stream counted against the node) at the first accepted message
    caller: Caller | None = None  # its certificate, checked again when the store changes
    renews: bool = False
    # When its last message was accepted, by the leader's monotonic clock
    # (``LeaderState.monotonic``; the liveness it vouched for is taken back to it).
    last: float | None = None
    crl_number: int = -1  # the revocation list the agent holds, as it said or was sent
    # The leader asked for the agent's list (``wants_crl``) and sends it none of its own until
    # it has learned that one (``LeaderService._crl_unlearned``), as of the agent's last message.
    asking: bool = False
    epoch: int = -1  # the epoch the agent was last told
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one write at a time
    cut: bool = False  # ended by the leader: its certificate is refused now (``_cut_refused``)
    pushing: asyncio.Future[None] | None = None  # the news being written (``_push``)
    vouching: bool = False  # its node is alive now for it (``Store.vouch``)
    closed: bool = False  # its agent said it closes it (``closing``): alive up to the end
    ending: asyncio.Future[None] | None = None  # the leader's end of the stream (``_end``)
    # The event loop's time by which its next message must come (``LeaderService._sweep``).
    due: float = math.inf
    answers_checks: bool = False  # its agent said it answers planning questions on it
    # Which agent sends on it: its ``agent_instance``, or (an agent that sends none) the
    # peer's host; and the leader's count of accepted messages at its last one (``heard``).
    agent: str = ""
    heard: int = 0
    # The planning questions asked on it (``LeaderService.ask_check``) by id, until answered,
    # given up (their deadline) or the stream ends: at most ``QUESTIONS_PER_STREAM``.
    questions: dict[int, asyncio.Future[leader_pb2.CheckAnswer]] = field(default_factory=dict)
    # The rollouts whose stage the agent keeps with no transaction begun
    # (``HeartbeatRequest.unswitched_stages``) as its last message said; those of them looked
    # up in the store (they were not live: ``LeaderService._look_at_stages``), those found
    # ended, and those of these the agent was sent on this stream (``ended_stages``).
    held: frozenset[str] = frozenset()
    looked: frozenset[str] = frozenset()
    over: frozenset[str] = frozenset()
    told: frozenset[str] = frozenset()

    def hold(self, held: frozenset[str]) -> None:
        """The agent's message says it keeps the stages of ``held``: what is known of others
        is dropped (forgotten, or switched)."""
        if held != self.held:
            self.held = held
            self.looked &= held
            self.over &= held
            self.told &= held

    def answered(self, answer: leader_pb2.CheckAnswer) -> None:
        """An answer on this stream, which only a question asked on this stream takes: a
        stream's messages are its node's (``Snapshot.refusal`` checks each one's certificate),
        so one node's agent cannot answer another's question."""
        waiting = self.questions.get(answer.id)
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    def unanswered(self, why: StreamEnded | None = None) -> None:
        """The stream ended: its questions are answered no more (``StreamEnded``, or
        ``why``)."""
        for waiting in self.questions.values():
            if not waiting.done():
                waiting.set_exception(why or StreamEnded("the heartbeat stream ended"))
        self.questions.clear()

    def news(self, snap: Snapshot, crl_due: bool = True) -> bool:
        """True if ``snap`` has an epoch or revocation list the agent lacks; with ``crl_due``
        False, a newer list counts only if it has an urgent revocation the agent lacks. Or if a
        rollout the agent keeps a stage of has ended and the agent was not told on this
        stream."""
        if self.epoch != snap.epoch or self.over - self.told:
            return True
        if self.asking or self.crl_number == snap.crl_number:
            return False
        return crl_due or snap.crl_urgent > self.crl_number

    async def send(self, reply: leader_pb2.HeartbeatResponse, snap: Snapshot) -> None:
        """Write ``reply`` (made from ``snap``): the agent then holds its epoch and list."""
        async with self.lock:
            await self.context.write(reply)
        self.epoch = snap.epoch
        if not reply.wants_crl:  # (else it was sent no list: it holds its own)
            self.crl_number = snap.crl_number
        if reply.ended_stages:
            self.told |= frozenset(reply.ended_stages)


class StreamReplaced(StreamEnded):
    """A newer stream of the node had a message accepted while a question waited on an older
    one: the older is one the agent no longer reads (it restarted, or reconnected, before the
    leader noticed the old connection dead), so the question is asked again on the newer
    (``LeaderService.ask_check``), or over the channel if it cannot take it."""


class LeaderService(leader_pb2_grpc.LeaderServicer):
    """Agents' calls. A heartbeat arrives from every agent every few seconds, so its path is
    kept short (issue 15: ~2 ms of leader CPU each, 90 % of a core for 500 agents at 1 s):
    agents keep one ``Heartbeats`` stream open (a unary call costs gRPC several times more);
    the caller's certificate is parsed once per certificate (``Caller``, keyed by its PEM)
    and checked against a ``Snapshot`` of the store; the store writes the heartbeat only when
    something in it changed (``Store.note_heartbeat``), the client report only when who was
    seen changed or it is getting old (``clients_said``). A heartbeat that says nothing new
    runs on the event loop alone, without a worker-thread hop."""

    def __init__(self, state: LeaderState) -> None:
        self.state = state

        # Late-bound: a test may give the state other clocks. The store judges a vouched node
        # (``Store.vouch``) alive "now" by the clock, and a node's last heartbeat by both
        # (``Store._then_on_clock_now``).
        def now() -> dt.datetime:
            return state.clock()

        def monotonic() -> float:
            return state.monotonic()

        state.store.bind_clocks(now, monotonic)
        self.schema = SchemaStore(state.store.db)
        self._callers: dict[bytes, Caller] = {}
        # (node, fingerprint) -> since when a certificate has been refused as not the node's
        # on record, and when last (``LeaderState.monotonic``; inf: it is no earlier one),
        # ``_earlier_due``.
        self._refused_since: dict[tuple[str, str], tuple[float, float]] = {}
        self._snapshot: Snapshot | None = None
        self._reading: asyncio.Future[Snapshot] | None = None
        # node -> what its last stored client report said (``clients_said``), and when.
        self._clients: dict[str, tuple[tuple[object, ...], dt.datetime]] = {}
        # node -> its open Heartbeats streams that had a message accepted, oldest first.
        self._streams: dict[str, list[_Beats]] = {}
        # node -> agent ids whose stream was ended for another agent's -> until
        # (``LeaderState.monotonic``).
        self._evicted: dict[str, dict[str, float]] = {}
        self._open: set[_Beats] = set()  # every open Heartbeats stream, counted or not
        # node -> its open streams with no message yet, oldest first (``_opened``).
        self._silent: dict[str, list[_Beats]] = {}
        self._watch: asyncio.Task[None] | None = None  # streams' cuts, news and deadlines
        # No open stream's ``due`` comes before this (a message only moves its stream's on):
        # the watch looks at the streams' deadlines only once it has passed (``_sweep``).
        self._next_due = math.inf
        # The event loop's time when the watch last sent agents a newer revocation list
        # (``CRL_NEWS_SECONDS``).
        self._crl_sent_at = -math.inf
        # Set when the store changed (``_store_changed``, from the writer's thread) or a new
        # deadline came before the others: the watch waits for it instead of ticking.
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the watch's (``_start_watch``)
        state.store.db.on_change.append(self._store_changed)
        # Set by ``close_streams`` (the leader is stopping): new streams are refused.
        self._stopping = False
        self._writer: asyncio.Task[None] | None = None  # the group commit (``_write_batches``)
        self._committing: asyncio.Future[int] | None = None  # its worker thread's last commit
        # The event loop's time by which the writes queued now are to be committed
        # (``_start_writer``; inf: none queued since the last commit), and the writer's wake
        # when a write needs it sooner than it waits for.
        self._write_due = math.inf
        self._write_sooner = asyncio.Event()
        self.batch_seconds = BATCH_SECONDS
        # Seconds an earlier certificate's problem holds after its last refusal (``_refused``;
        # None: ``TWINS_HOLD_BOUNDS`` renewal deadlines; ``earlier_hold``: a test's shorter).
        self.earlier_hold: float | None = None
        # leader.toml's ``workstation_certs_per_hour`` (set by the leader; None: the store's
        # default, ``WORKSTATION_CERTS_PER_HOUR``).
        self.workstation_certs_per_hour: int | None = None
        # A store that cannot be written (a full disk): the batch's failure is logged there,
        # once a minute (``leader.store_health``); set by the leader.
        self.store_health: StoreHealth | None = None
        self._question_ids = itertools.count(1)  # ``ask_check``
        self._heard = itertools.count(1)  # accepted stream messages (``_Beats.heard``)
        # Rollouts found ended (``_look_at_stages``): for good, so kept (up to ENDED_KEPT) and
        # not looked up again for the next agent that keeps a stage of one.
        self._ended_rollouts: set[str] = set()
        # An agent said it holds a newer revocation list than the store's (``_crl_floor``):
        # the store's number was raised past it, once for the life of this process.
        self._crl_floor_raised = False
        # Revocation lists an agent holds that the store has not seen (``_crl_unlearned``), by
        # number: those wanted of each node, and those learned (``_learn_crl``: from any node,
        # only lists the CA signed); and of each node the numbers its agent could not send
        # (too old, or a list refused), said once each. Each node's by itself, at most
        # ``CRL_ASKS_PER_NODE`` (its oldest dropped), its entries gone with it (``_forget``):
        # one global bound, cleared when full, let one node that says another number at each
        # message push an honest agent's wanted number out, and once the store's number passed
        # it, that agent's list went unlearned (the leader's replaced it, and what only it
        # revoked was lost).
        self._crl_wanted: dict[str, dict[int, None]] = {}
        self._crl_learned: set[int] = set()
        self._crl_unsent: dict[str, dict[int, None]] = {}
        # (node, certificate fingerprint) whose re-learning was refused for its key
        # (``Store.relearn``'s KeyRefused): logged once each (``_relearn``).
        self._key_refusals: set[tuple[str, str]] = set()
        # node -> number -> when the leader first asked that node's agent for that list
        # (``LeaderState.monotonic``): one that has not sent it within ``crl_patience`` gets
        # the leader's list (``_crl_held``), never none for good. Per node, at most
        # ``CRL_ASKS_PER_NODE`` numbers (its oldest dropped): a node that says another number at
        # each message bounds only its own (review b4 of s64, L4: one global bound, cleared
        # when full, let one node start every other agent's patience again, for ever); the
        # nodes are the accepted ones.
        self._crl_asked: dict[str, dict[int, float]] = {}
        # node -> (the day, its bootstrap failure reports audited that day), at most
        # ``FAILURE_AUDITS_A_DAY`` (``_failures_audited``).
        self._failure_audits: dict[str, tuple[dt.date, int]] = {}
        # node -> the bootstrap failures its last report said, as taken (``_new_failures``).
        self._failures_said: dict[str, frozenset[tuple[object, ...]]] = {}
        # node -> its agent's last numbered failure report taken (``failures_report``).
        self._failure_reports: dict[str, tuple[str, int]] = {}
        state.on_forget.append(self._forget)

    def _forget(self, node: str) -> None:
        """Node ``node`` was removed (``LeaderState.forget_node``): what this service keeps of
        it goes, so that a node enrolled again under its name starts afresh. Before, its first
        client report, saying what the removed node's last one said, was neither stored nor
        counted as heard since the leader started (``Store.report_since_start``) until it was
        half stale; its first failure report was not audited when the removed node had used
        the day's audits, nor taken where it repeated the removed node's last entries or
        report number (session 44's Left). A heartbeat of the removed node under way sets
        none of them after this (``_heartbeat`` sets them after its removal checks)."""
        for entries in (
            self._clients,
            self._failure_audits,
            self._failures_said,
            self._failure_reports,
            self._crl_wanted,
            self._crl_unsent,
            self._crl_asked,
        ):
            entries.pop(node, None)

    def _asked_on(self, name: str) -> _Beats | None:
        """The stream to ask node ``name``'s planning question on: its newest counted stream in
        renewal mode, whose agent said it answers, not ending, with room for a question."""
        for beat in reversed(self._streams.get(name, ())):
            if (
                beat.renews
                and beat.answers_checks
                and beat.ending is None
                and not beat.cut
                and len(beat.questions) < QUESTIONS_PER_STREAM
            ):
                return beat
        return None

    async def ask_check(
        self, name: str, request: agent_pb2.CheckRequest, timeout: float
    ) -> leader_pb2.CheckAnswer | None:
        """Ask node ``name``'s agent the planning question (``NodeAgent.Check``'s) on its own
        heartbeat stream (``leader.observe``): no channel of the leader's to the node, no TLS
        handshake. None: it has no stream to ask on (the caller asks over the channel);
        ``StreamEnded``: the stream ended before the answer; TimeoutError: no answer within
        ``timeout``; an agent with no room for it now (``NO_ROOM``: its
        ``nodeagent.leader_link.QUESTIONS_AT_ONCE``) is a ``StreamEnded`` too, asked over the
        channel. The question's write is never cancelled (``_push``): a deadline stops the
        wait, not the write. ``NodeProblem``: the node is not planned now (two agents use its
        identity: ``LeaderState.node_problem``); asked on neither's stream nor the channel."""
        if (problem := self.state.node_problem(name)) is not None:
            raise NodeProblem(problem)
        beat = self._asked_on(name)
        if beat is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return await self._ask_on(beat, request, deadline - loop.time())
            except StreamReplaced:
                # Audit s33 L5: the agent restarted (or reconnected) while the question waited
                # on its old stream, not yet noticed dead: it waited out its deadline and the
                # node was reported unreachable. Asked again on the newer stream.
                newer = self._asked_on(name)
                if newer is None or newer is beat or loop.time() >= deadline:
                    raise
                beat = newer

    async def _ask_on(
        self, beat: _Beats, request: agent_pb2.CheckRequest, timeout: float
    ) -> leader_pb2.CheckAnswer:
        """``ask_check`` on the stream ``beat``."""
        qid = next(self._question_ids)
        answer: asyncio.Future[leader_pb2.CheckAnswer] = asyncio.get_running_loop().create_future()
        beat.questions[qid] = answer
        question = leader_pb2.HeartbeatResponse(
            check=leader_pb2.CheckQuestion(id=qid, request=request)
        )

        async def write() -> None:
            async with beat.lock:
                if beat.ending is not None:
                    raise StreamEnded("the heartbeat stream is ending")
                await beat.context.write(question)

        written = asyncio.ensure_future(write())
        _PUSHES.add(written)
        written.add_done_callback(_pushed)
        try:
            async with asyncio.timeout(timeout):
                try:
                    await asyncio.shield(written)
                except StreamEnded:
                    raise
                except Exception as exc:  # the call ended meanwhile
                    raise StreamEnded(f"the heartbeat stream ended: {type(exc).__name__}") from None
                got = await answer
        finally:
            beat.questions.pop(qid, None)
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()  # taken (the stream ended as the deadline came)
        if got.refused_code == NO_ROOM and not got.HasField("server"):
            raise StreamEnded(f"the agent has no room for the question: {got.refused}")
        return got

    async def _look_at_stages(self, beats: Iterable[_Beats], snap: Snapshot) -> None:
        """Which of the stages the agents of ``beats`` keep with no transaction begun
        (``_Beats.held``) are for rollouts that have ended (``_Beats.over``; sent in the next
        answer or as news). Only a rollout not live in ``snap`` is looked up, once per stream
        (a store read for all of them, none for one already found ended): a message or a
        change of the store costs nothing more while the agents' lists are empty or their
        rollouts run. Ended is for good (a retry is a new rollout), so an agent told so never
        sees a command of it again, and its stage goes; one the store does not know stays."""
        wanted = {b: ids for b in beats if b.held and (ids := b.held - snap.live - b.looked)}
        if not wanted:
            return
        ended = set(self._ended_rollouts)
        asked = frozenset().union(*wanted.values()) - ended
        running: set[str] = set()  # stored and live (the snapshot is older): looked at again
        if asked:
            found = await asyncio.to_thread(self.schema.ended_among, asked)
            running = {r for r, over in found.items() if not over}
            new = {r for r, over in found.items() if over}
            ended |= new
            if len(self._ended_rollouts) + len(new) > ENDED_KEPT:
                self._ended_rollouts.clear()
            self._ended_rollouts |= new
        for beat, ids in wanted.items():
            still = ids & beat.held - running  # (a message meanwhile may have changed it)
            beat.looked |= still
            beat.over |= still & ended

    async def _caller(self, context: Ctx) -> str:
        return (await self._caller_cert(context)).name

    def _identify(self, context: Ctx) -> Caller:
        """The caller's certificate, parsed (or taken from the cache), naming a node of this
        cluster: not the leader, not a workstation. Whether it is the node's certificate on
        record is ``_check_on_record``'s question, asked every time."""
        pems = list(context.auth_context().get("x509_pem_cert", ()))
        if not pems:
            raise unauthenticated("no client certificate")
        key = caller_key(bytes(pems[0]))
        caller = self._callers.get(key)
        if caller is None:
            cert = peer_certificate(context)
            assert cert is not None
            identity = spiffe.of(cert)
            if identity is None or identity.trust_domain != self.state.trust_domain:
                raise unauthenticated("the certificate carries no identity of this cluster")
            if identity.role is not spiffe.Role.NODE:
                raise permission_denied(f"{identity} may not call Leader: only nodes may")
            caller = Caller(
                identity.name,
                pki.fingerprint(cert),
                f"{cert.serial_number:x}",
                pki.spki_pin(cert),
            )
            if len(self._callers) >= MAX_CALLERS:
                self._callers.clear()
            self._callers[key] = caller
        return caller

    def _check_on_record(self, caller: Caller, peer: str = "") -> None:
        """(Worker thread.) The very certificate on record for the node, which is not removed
        (so a revoked or superseded certificate is refused), or, right after a renewal and
        until the agent has used the new one, the one before it; and not revoked by serial.
        ``peer``: the caller's connection (``_refused``)."""
        name = caller.name
        try:
            node = self.state.store.get_node(name)
        except NotFound:
            raise unauthenticated(rpc.not_enrolled(name)) from None
        accepted = {node.cert_fingerprint, node.prev_cert_fingerprint} - {""}
        if caller.fingerprint not in accepted:
            if self._earlier_due(caller):
                self._refused(caller, peer)
            raise unauthenticated(rpc.not_on_record(name))
        # A certificate revoked by serial (`tlsroll ca revoke`) must not renew itself into a
        # fresh one, nor go on calling: the node has to enrol again.
        if self.state.store.is_revoked(caller.serial):
            raise unauthenticated(rpc.revoked_node(name))
        # The one before a revoked certificate on record: the node is cut off (``check_caller_in``).
        if caller.fingerprint != node.cert_fingerprint and node.cert_revoked:
            raise unauthenticated(rpc.revoked_node(name))

    async def _caller_cert(self, context: Ctx) -> Caller:
        """The enrolled node calling, and its certificate (``_identify``, ``_check_on_record``)."""
        caller = self._identify(context)
        await asyncio.to_thread(self._check_on_record, caller, context.peer())
        return caller

    def _earlier_due(self, caller: Caller) -> bool:
        """(Any thread.) ``caller`` is refused as not the node's certificate on record: whether
        the store is to be asked if it is an earlier one of the node (``_refused``). Not at
        its first refusal, only once such refusals of it went on for ``EARLIER_AFTER_BEATS``
        heartbeat intervals: an agent's own stream opened before its renewal may send a
        message or two more after its new certificate was used (and is cut then:
        ``_cut_refused``), which is no copy; an agent refused for good tries again at each
        heartbeat: refusals of it with a gap of more than that span begin the count again.
        Never again for a certificate found to be no earlier one."""
        key = (caller.name, caller.fingerprint)
        now = self.state.monotonic()
        span = EARLIER_AFTER_BEATS * self.state.heartbeat_interval
        first, last = self._refused_since.get(key, (now, now))
        if now - last > span:  # not refused all along: the count begins again (rev58c M1)
            first = now
        if len(self._refused_since) >= MAX_CALLERS and key not in self._refused_since:
            self._refused_since.clear()
        self._refused_since[key] = (first, now if math.isfinite(last) else last)
        return math.isfinite(last) and now - first >= span

    def _refused(self, caller: Caller, peer: str) -> None:
        """(Worker thread: a store read.) ``caller`` keeps being refused as not the node's
        certificate on record (``_earlier_due``): if it is an earlier certificate of the node
        (``Store.earlier_certificate``: one a renewal replaced), the key it was issued for is
        in use by an agent that is not the one on record. Either a copy of the node's key
        renewed itself and cut the node's own agent off, or the node's agent renewed and a
        copy of its old key calls, or the agent runs on an old copy of its data dir: the
        leader cannot tell which agent is the node's (review rev58b H1: a copy renewed itself,
        and the node's own agent was refused in silence). Logged as it begins, a node problem
        (``EarlierCertificate``: the node is neither planned nor switched) held for
        ``TWINS_HOLD_BOUNDS`` renewal deadlines from the last refusal."""
        key = (caller.name, caller.fingerprint)
        removals = self.state.removals  # a removal while the store is read: nothing is noted
        try:
            serial = self.state.store.earlier_certificate(caller.name, caller.fingerprint)
        except Exception as exc:  # the store cannot be read now: the refusal stands as it is
            log.warning(
                "node.earlier_check_failed",
                node=caller.name,
                error=f"{type(exc).__name__}: {exc}"[:200],
                detail="the leader could not read its store to check the caller's earlier "
                "certificate; the refusal stands",
            )
            return
        if serial is None:
            self._refused_since[key] = (math.inf, math.inf)  # never due: no earlier one
            return
        if self.state.removed_since(caller.name, removals):
            # (``forget_node`` ran after the read: the problem would be shown for a node that
            # is gone, for two renewal deadlines: review rev58c L2.)
            return
        earlier = self.state.earlier_certificates
        now = self.state.monotonic()
        hold = self.earlier_hold
        if hold is None:
            hold = TWINS_HOLD_BOUNDS * renewal_deadline(self.state.heartbeat_interval)
        until = now + hold
        held = earlier.get(caller.name)
        if held is None or now >= held.until:
            log.warning(
                "node.earlier_certificate_used",
                node=caller.name,
                serial=serial,
                peer=peertext.clean(peer, 80),
                hint="a copy of the node's earlier certificate is in use (a restored backup or a"
                " second machine): check the peer named (tlsroll schema show)",
            )
            if len(earlier) >= MAX_CALLERS:
                earlier.clear()
            earlier[caller.name] = EarlierCertificate(self.state.clock(), until, serial)
        else:
            earlier[caller.name] = replace(held, until=until, serial=serial)

    async def _refusing(self, caller: Caller, context: Ctx, why: str) -> None:
        """``why`` is about to refuse ``caller`` (a heartbeat, a stream's opening): noted as
        ``_check_on_record`` notes it, if it says the certificate is not the one on record."""
        if why == rpc.not_on_record(caller.name) and self._earlier_due(caller):
            await asyncio.to_thread(self._refused, caller, context.peer())

    async def _relearn(self, context: Ctx, request: leader_pb2.HeartbeatRequest) -> bool:
        """After ``--reinitialise``: record an unknown node from the certificate its agent
        presents (issued by this CA, with its node identity), within the store's window; after
        a restore from a backup, also a known node's certificate issued since the backup."""
        cert = peer_certificate(context)
        identity = spiffe.of(cert) if cert is not None else None
        if (
            cert is None
            or identity is None
            or identity.trust_domain != self.state.trust_domain
            or identity.role is not spiffe.Role.NODE
            or not 1 <= request.agent_port <= 65535
        ):
            return False
        names = pki.names_of(cert)
        if names.common_name != identity.name or not names.ips:
            return False
        try:
            learned = await asyncio.to_thread(
                self.state.store.relearn,
                name=identity.name,
                names=(names.ips, names.dns),
                agent_port=request.agent_port,
                key_pin=pki.spki_pin(cert),
                cert=NodeCert(
                    key_pin=pki.spki_pin(cert),
                    fingerprint=pki.fingerprint(cert),
                    serial=f"{cert.serial_number:x}",
                    not_after=cert.not_valid_after_utc,
                ),
                highest_epoch=min(request.highest_epoch, 2**62),
                now=self.state.clock(),
                names_apart=pki.names_apart(cert) is not None,
                # NotBefore is backdated by pki.BACKDATE: this is when the CA issued it.
                issued_at=min(cert.not_valid_before_utc + pki.BACKDATE, cert.not_valid_after_utc),
            )
        except KeyRefused as exc:
            # Its own line to the agent (UNAUTHENTICATED, as an enrolment's refusal of the key),
            # and to the admin once for each certificate: the agent tries again at every beat.
            said = (identity.name, pki.fingerprint(cert))
            if said not in self._key_refusals:
                if len(self._key_refusals) >= MAX_CALLERS:  # (a log's repeats only)
                    self._key_refusals.clear()
                self._key_refusals.add(said)
                log.warning(
                    "node.relearn_refused",
                    node=identity.name,
                    reason=str(exc),
                    detail="the agent's heartbeat named a key or addresses the leader does not "
                    "take for this node; the reason says why",
                )
            raise unauthenticated(str(exc)) from None
        if learned:
            log.info("node.relearned", node=identity.name, addresses=list(names.ips))
        return learned

    def _read_snapshot(self, renewed: bool = False) -> Snapshot:
        """(Worker thread.) The store as a heartbeat needs it (``Snapshot``); ``renewed``: read
        again after the revocation list's renewal (not renewed twice)."""
        store = self.state.store
        generation = store.db.generation  # before reading: a write meanwhile means read again
        accepted = store.accepted_certificates()
        now = self.state.clock()
        number, urgent, entries, issued = store.revocations(now)
        # (Number 0: nothing was ever revoked, and no list is sent: an agent holds "0".)
        due = issued is None or not -CRL_AHEAD_LIMIT <= now - issued < CRL_RENEW_AFTER
        if not renewed and number > 0 and due:
            try:
                renewed = store.renew_crl(now, now - CRL_RENEW_AFTER, now + CRL_AHEAD_LIMIT)
            except Exception as exc:  # (a full disk): the list as it is; the next read retries
                log.error(
                    "crl.renew_failed",
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    hint="the revocation list is served as it is and renewed at the next read; "
                    "check the disk under the leader's data dir (df -h)",
                )
            else:
                if renewed:
                    log.info("crl.renewed", was=number, issued=str(issued))
                return self._read_snapshot(renewed=True)  # ``issued`` is recent: read again
        crl_number, crl_pem = self.state.crl_of(number, entries, issued)
        return Snapshot(
            generation=generation,
            made=time.monotonic(),
            accepted=accepted,
            revoked=frozenset(serial for serial, _ in entries),
            epoch=self.schema.current_epoch(),
            crl_number=crl_number,
            crl_pem=crl_pem,
            crl_urgent=urgent,
            live=self.schema.live_ids(),
            relearn_until=store.relearn_until(),
            restored_from=store.restored_from(),
            cut_off=store.cut_off_nodes(),
            crl_restored=store.restored_crl_range(),
        )

    def _snapshot_read(self, done: asyncio.Future[Snapshot]) -> None:
        if self._reading is done:
            self._reading = None
        if not done.cancelled() and done.exception() is None:
            snap = done.result()
            if self._snapshot is None or snap.generation >= self._snapshot.generation:
                self._snapshot = snap

    async def snapshot(self) -> Snapshot:
        """The store as of now (``Snapshot``): the one in memory while the store has not
        changed since it was read, else one read anew. Heartbeats that arrive meanwhile wait
        for the same read."""
        wanted = self.state.store.db.generation
        snap = self._snapshot
        if (
            snap is not None
            and snap.generation >= wanted
            and time.monotonic() - snap.made < SNAPSHOT_MAX_AGE
        ):
            return snap
        while True:
            reading = self._reading
            # A read that has ended but whose callback has not run yet is no read to wait
            # for: awaiting it would not yield, and this loop would spin on it for ever.
            if reading is None or reading.done():
                reading = asyncio.ensure_future(asyncio.to_thread(self._read_snapshot))
                reading.add_done_callback(self._snapshot_read)
                self._reading = reading
            snap = await asyncio.shield(reading)
            if snap.generation >= wanted:  # else it began before the write we must see
                return snap

    async def _heartbeat(
        self,
        caller: Caller,
        request: leader_pb2.HeartbeatRequest,
        context: Ctx,
        renewing: bool = False,
        agent: str = "",
    ) -> tuple[Snapshot, dt.datetime, bool]:
        """One heartbeat, from a unary call or a message on a stream: the caller's certificate
        checked (``Snapshot.refusal``; re-learning the node after ``--reinitialise`` as
        ``_relearn`` allows), then recorded, written only what needs writing. The snapshot it
        was checked against, the time, and whether the leader asks for the agent's revocation
        list (``_crl_held``), for the answer (``_response``). ``agent``: which agent sends on
        the stream (``agent_of``; worked out here for a unary call)."""
        now = self.state.clock()
        # Before the store is read: a removal of the node after this is seen below.
        removals = self.state.removals
        snap = await self.snapshot()
        if (why := snap.refusal(caller)) is not None:
            if not snap.relearns(caller.name, now) or not await self._relearn(context, request):
                await self._refusing(caller, context, why)
                raise unauthenticated(why)
            snap = await self.snapshot()
            if (why := snap.refusal(caller)) is not None:
                await self._refusing(caller, context, why)
                raise unauthenticated(why)
        snap, ask = await self._crl_held(caller.name, request, now, snap)
        if not ask and request.crl_number > snap.crl_number and not self._crl_floor_raised:
            snap = await self._crl_floor(caller.name, request.crl_number, now, snap)
        name = caller.name
        store = self.state.store
        said: dict[str, Any] = {
            "now": now,
            "highest_epoch": min(request.highest_epoch, 2**62),
            "cert_fingerprint": caller.fingerprint,
            "renewal": renewal_report(request, now),
        }
        version = agent_version_text(request.agent_version)
        said["features"] = agent_features_of(request)
        if len(snap.accepted.get(name, ())) > 1:
            # Renewed, and the certificate before still accepted: a heartbeat with the new
            # one ends that at once (``Store.queue_heartbeat``), so it is not queued.
            if not store.note_heartbeat(name, version, **said):
                await asyncio.to_thread(store.heartbeat, name, version, **said)
        elif queued := store.queue_heartbeat(name, version, **said):
            self._start_writer(self._lazy() if queued is Queued.REFRESH else self.batch_seconds)
        numbered = failures_report(request)
        # A numbered report taken before: its answer was lost, and it is sent again (s33 L2).
        again = numbered is not None and self._failure_reports.get(name) == numbered
        reported, failures = self._new_failures(
            name, () if again else request.bootstrap_failures, now
        )
        if failures:
            if self.state.removed_since(name, removals):  # (its audits were forgotten)
                raise unauthenticated(rpc.not_enrolled(name))
            audit = self._failures_audited(name, now)
            await asyncio.to_thread(
                self.schema.record_bootstrap_failures, name, failures, now, audit=audit
            )
        if self.state.removed_since(name, removals):
            # Removed while this message was checked and recorded (the awaits above): what it
            # says of the node is not kept, or a removed node showed a node problem again
            # (s43's Left 3), or a node enrolled again under its name inherited what it said
            # (``_forget``). Nothing is awaited from here to the end: it cannot come later.
            raise unauthenticated(rpc.not_enrolled(name))
        if numbered is not None:
            if len(self._failure_reports) >= MAX_CALLERS:
                self._failure_reports.clear()
            self._failure_reports[name] = numbered
        if reported:
            if len(self._failures_said) >= MAX_CALLERS:
                self._failures_said.clear()
            self._failures_said[name] = reported
        if failures:
            for f in failures if audit else ():
                log.warning(
                    "bootstrap.failures_reported",
                    node=name,
                    source=f.source,
                    workstation=f.workstation,
                    count=f.count,
                    hint="wrong bootstrap passwords from that PC: check it uses the current "
                    "password (tlsroll schema show lists them)",
                )
        # The node's clock's lag, read once a message for its client report and login failures.
        shift = clock_shift(request, now) if request.HasField("server") else dt.timedelta(0)
        if request.HasField("server") and request.server.HasField("clients"):
            self._record_clients(name, request.server.clients, now, renewing, shift)
        summary = server_summary(request)
        before = self.state.live_servers.get(name, "")
        if summary.startswith("down") and not before.startswith("down"):
            log.warning("node.server_down", node=name, detail=summary)
        if summary.startswith(NEEDS_ADMIN) and not before.startswith(NEEDS_ADMIN):
            log.warning("node.needs_admin", node=name, detail=summary)
        self.state.live_servers[name] = summary
        if summary.startswith(NEEDS_ADMIN):
            self.state.needs_admin_since.setdefault(name, now)
        else:
            self.state.needs_admin_since.pop(name, None)
        if request.HasField("server"):  # (without it, nothing said: audit s43rev1)
            if FINGERPRINT.fullmatch(served := request.server.cert_fingerprint):
                self.state.served_fingerprints[name] = served
            else:  # (on http, down, an older agent, or no fingerprint: the records say)
                self.state.served_fingerprints.pop(name, None)
            self._bootstrap_problem(name, request, now)
            self._login_failures(name, request.server, now, shift)
        self._agent_store(name, request, now)
        # The node's clock against the leader's (``leader.node_clocks``), not from a message
        # that copies an earlier report: it carries that report's time.
        # Each agent's own (``agent``: a stream's ``_Beats.agent``; a unary call's, as the
        # stream's would be): two agents with one identity have a clock each.
        # A unary call's (no ``agent``) is known a renewal deadline, as a stream's after its
        # end, unless a stream of the agent is open (whose end bounds it): else it was kept
        # for ever (review of s37, L4).
        # A ``sent_at`` farther off than any real clock of the cluster (years, or no time) is
        # as none (``node_clocks.MAX_OFFSET``; it showed billions of seconds: session 68).
        if not request.HasField("sent_at"):
            self.state.clocks.forget(name, agent or agent_of(request, context))
        elif not (request.closing or request.HasField("check_answer")):
            sent = request.sent_at
            x = sent_offset(sent.seconds, sent.nanos, now.timestamp())
            if x is None:
                self.state.clocks.forget(name, agent or agent_of(request, context))
                return snap, now, ask
            keep = None
            if not agent:
                agent = agent_of(request, context)
                if not any(o.agent == agent for o in self._streams.get(name, ())):
                    keep = renewal_deadline(self.state.heartbeat_interval)
            self.state.clocks.heard(name, agent, x, now, keep)
        return snap, now, ask

    def _new_failures(
        self, node: str, reports: Sequence[leader_pb2.BootstrapFailure], now: dt.datetime
    ) -> tuple[frozenset[tuple[object, ...]], list[BootstrapFailureRow]]:
        """What ``node``'s report says (its entries, as ``_failures_said`` keeps them) and the
        rows to add (``failure_rows``): not the entries its last report taken said word for
        word. The agent forgets failures once the leader answered; a stream cut after the
        leader added them and before the agent read the answer made the agent send them
        again, and they were counted twice (audit s33 L2). A source that failed again since
        has another count and time, and is taken (with the count resent in it: an older
        agent's report carries no number to tell; the counts are shown, not acted on). An
        agent that numbers its reports sends one again unchanged (``failures_report``)."""
        said = {
            (f.source, f.workstation, f.count, f.last_at.seconds, f.last_at.nanos): f
            for f in reports[:MAX_FAILURE_REPORTS]
        }
        before = self._failures_said.get(node, frozenset())
        fresh = [f for key, f in said.items() if key not in before]
        return frozenset(said), failure_rows(node, fresh, now) if fresh else []

    def _failures_audited(self, node: str, now: dt.datetime) -> bool:
        """Whether ``node``'s bootstrap failure report now gets its audit event and log lines:
        ``FAILURE_AUDITS_A_DAY`` of them a day; the first one beyond says so."""
        day = now.date()
        seen_day, audited = self._failure_audits.get(node, (day, 0))
        if seen_day != day:
            audited = 0
        if audited > FAILURE_AUDITS_A_DAY:
            return False
        if len(self._failure_audits) >= MAX_CALLERS:
            self._failure_audits.clear()
        self._failure_audits[node] = (day, audited + 1)
        if audited == FAILURE_AUDITS_A_DAY:
            log.warning(
                "bootstrap.failures_many",
                node=node,
                reports=audited,
                day=str(day),
                detail="this node's bootstrap failure reports are not audited or logged for "
                "the rest of the day (a flood of wrong passwords); tlsroll schema show lists them",
            )
            return False
        return True

    def _crl_unlearned(self, node: str, held: int, snap: Snapshot) -> bool:
        """Whether a list numbered ``held`` (``node``'s agent's) may hold revocations the store
        lacks: one issued after the backup the store was restored from and before the restore
        or before a store begun again (``Snapshot.crl_restored``), or one above the store's own
        number (a store restored or begun again by an earlier release), not learned yet by this
        process. Once wanted of the node, until learned: another agent's list learned meanwhile
        moves the store's number past it, and the list would otherwise go out unlearned. The
        node's wanted numbers are its own (``_crl_wanted``): another node's cannot push one
        out."""
        if held <= 0 or held in self._crl_learned:
            return False
        if held in self._crl_wanted.get(node, ()):
            return True
        span = snap.crl_restored
        if held > snap.crl_number or (span is not None and span[0] < held < span[1]):
            _bounded_add(self._crl_wanted.setdefault(node, {}), held, None)
            return True
        return False

    async def _crl_held(
        self, node: str, request: leader_pb2.HeartbeatRequest, now: dt.datetime, snap: Snapshot
    ) -> tuple[Snapshot, bool]:
        """The revocation list an accepted agent of ``node`` holds, if the store may lack what
        it revokes (``_crl_unlearned``): learned if the message carries it (``_learn_crl``),
        else asked for (True: the answer asks, ``wants_crl``, and carries no list of the
        leader's: the agent would take it and drop its own, the only record left of what was
        revoked since the backup). An agent too old to send it (it does not name
        ``features.HELD_CRL``) is not asked: its list is replaced as before, and the leader
        says so, naming the node, once. The snapshot to answer with."""
        held = request.crl_number
        if request.held_crl_pem and self._crl_unlearned(node, held, snap):
            snap = await self._learn_crl(node, held, bytes(request.held_crl_pem), now, snap)
        if not self._crl_unlearned(node, held, snap) or held in self._crl_unsent.get(node, ()):
            return snap, False
        if features.HELD_CRL not in agent_features_of(request):
            why = "its agent is of an earlier release: it cannot send it"
            self._crl_not_sent(node, held, why, snap)
            return snap, False
        asks = self._crl_asked.setdefault(node, {})
        if held not in asks:
            _bounded_add(asks, held, self.state.monotonic())
        since = asks[held]
        patience = crl_patience(self.state.heartbeat_interval)
        if self.state.monotonic() - since > patience:
            # (a list too large to send, an agent that names the feature but fails: without a
            # list, the agent would miss every revocation from now on)
            self._crl_not_sent(node, held, f"it did not send it within {patience:.0f} s", snap)
            return snap, False
        return snap, True

    def _crl_not_sent(self, node: str, held: int, why: str, snap: Snapshot) -> None:
        """The list numbered ``held`` that ``node``'s agent holds cannot be learned from it
        (``why``): it gets the leader's list as before, which lacks what only its list held.
        Said once per node and number; that a restore lost revocations only where the store
        was restored (``Snapshot.restored_from``) or begun again (``crl_restored``): on any
        other, the number is the node's word alone, above the store's (its clock ahead, or a
        node that lies: review b4 of s64, L4, a leader never restored warned of a restore)."""
        _bounded_add(self._crl_unsent.setdefault(node, {}), held, None)
        if snap.restored_from is not None:
            lost = "made after the backup the store was restored from"
        elif snap.crl_restored is not None:
            lost = "made before the store was begun again (--reinitialise)"
        else:
            log.warning(
                "crl.not_learned",
                node=node,
                held=held,
                why=why,
                detail=f"node {node}'s agent says it holds revocation list {held}, above the"
                f" store's {snap.crl_number}, and this store was neither restored from a backup"
                " nor begun again: the node's clock may be ahead, or its word false; it gets the"
                " leader's list. Only if an earlier release restored the store: revoke again"
                " what was revoked after the backup (tlsroll ca revoke --unknown SERIAL)",
            )
            return
        log.warning(
            "crl.not_learned",
            node=node,
            held=held,
            why=why,
            detail=f"the leader's store may lack revocations this node's list holds ({lost}):"
            " the node gets the leader's list, without them; revoke again what was revoked"
            " since (tlsroll ca revoke --unknown SERIAL)",
        )

    async def _learn_crl(
        self, node: str, held: int, pem: bytes, now: dt.datetime, snap: Snapshot
    ) -> Snapshot:
        """``node``'s agent sent the list numbered ``held`` it holds (asked for: ``_crl_held``):
        if this CA signed it (the CA's key and name) and it is that number's, every serial it
        revokes is recorded as revoked (``Store.learn_revoked``) before any list of the leader
        goes to the agent, and the number is learned for this process. A list refused says
        so, once, and the agent gets the leader's list: the same bytes would be refused
        again. The snapshot to answer with."""
        try:
            number, serials = await asyncio.to_thread(
                pki.load_crl, pem, self.state.ca.cert, issuer=True
            )
        except PKIError as exc:
            self._crl_not_sent(node, held, f"the list it sent is refused: {exc}", snap)
            return snap
        if number != held:
            self._crl_not_sent(
                node, held, f"the list it sent is numbered {number}, not {held}", snap
            )
            return snap
        restored = snap.restored_from is not None
        reason = (
            f"revoked before the restore (on node {node}'s list {held})"
            if restored
            else f"revoked before the store was begun again (on node {node}'s list {held})"
        )
        ca_serials = await asyncio.to_thread(self.state.ca_serials)
        fresh = await asyncio.to_thread(
            self.state.store.learn_revoked,
            (f"{s:x}" for s in serials),
            number=held,
            node=node,
            now=now,
            reason=reason,
            ca_serials=ca_serials,
        )
        if len(self._crl_learned) >= MAX_CALLERS:
            self._crl_learned.clear()
        self._crl_learned.add(held)
        for numbers in (self._crl_wanted, self._crl_asked):
            if (mine := numbers.get(node)) is not None:
                mine.pop(held, None)  # (another node's are never looked at: learned)
                if not mine:
                    del numbers[node]
        (log.warning if fresh else log.info)(
            "crl.learned",
            node=node,
            number=held,
            listed=len(serials),
            revoked=len(fresh),
            serials=fresh[:LEARNED_SHOWN],
        )
        return await self.snapshot() if fresh else snap

    async def _crl_floor(self, node: str, held: int, now: dt.datetime, snap: Snapshot) -> Snapshot:
        """An accepted agent holds revocation list number ``held``, above the store's: the
        store was lost (``--reinitialise``) or restored from a backup, and the agents would
        ignore its lists (audit s33 H1). Its number is raised past it (``Store.raise_crl_floor``,
        bounded by the clock), once for this process: a store is lost or restored only while
        the leader is down, so a lying node gets one write per leader start. The snapshot to
        answer with (the new list, if raised)."""
        self._crl_floor_raised = True
        try:
            number = await asyncio.to_thread(
                self.state.store.raise_crl_floor, held, now=now, node=node
            )
        except Exception:
            self._crl_floor_raised = False  # the next message tries again
            raise
        if number is None:
            return snap
        log.warning(
            "crl.floor_raised",
            node=node,
            held=held,
            was=snap.crl_number,
            number=number,
            detail="the node held a newer revocation list than the leader's store (a store put "
            "back from a backup): the leader's next list counts on from it",
        )
        return await self.snapshot()

    def _response(
        self,
        snap: Snapshot,
        crl_number: int,
        now: dt.datetime,
        renews: bool = False,
        answers: int = 0,
        ended: Iterable[str] = (),
        ask: bool = False,
    ) -> leader_pb2.HeartbeatResponse:
        """A heartbeat's answer: the leader's clock, interval and epoch, and the revocation
        list unless the agent holds ``crl_number`` already; ``answers``: the ``seq`` of the
        message it answers on a stream (0: news sent unasked); ``ended``: the rollouts of the
        agent's stages that have ended (``_look_at_stages``); ``ask``: no list, but a request
        for the agent's own (``_crl_held``)."""
        return leader_pb2.HeartbeatResponse(
            ended_stages=sorted(ended),
            answers=answers,
            leader_time=timestamp(now),
            interval_seconds=self.state.heartbeat_interval,
            epoch=snap.epoch,
            crl_pem=snap.crl_pem if crl_number != snap.crl_number and not ask else b"",
            renew_seconds=renew_seconds(self.state.heartbeat_interval) if renews else 0,
            wants_crl=ask,
            leader_serial=self.state.leader_serial,
        )

    def _bootstrap_problem(
        self, name: str, request: leader_pb2.HeartbeatRequest, now: dt.datetime
    ) -> None:
        """What the heartbeat says of the node's bootstrap service: a service that should run
        but did not start is the node's problem (``node_problems``) until a heartbeat says no
        more (audit s39ws M8: it was only in the agent's log). Called only for a heartbeat
        with the server's status, which carries it: one without (the status took longer than
        the agent waits, SERVER_VIEW_SECONDS) says nothing of it, and cleared it (audit
        s43rev1). Nor does one with ``bootstrap_pending`` (an agent just started, which has
        not tried the service yet: its "no problem" made the problem go at each restart, and
        come back with a new since, s43). An agent older than that field never sets it: its
        empty problem clears, as before."""
        if request.server.bootstrap_pending:
            return  # the agent has not tried yet (it just started): what was shown stays
        why = peertext.clean(request.server.bootstrap_problem, 200)
        if not why:
            self.state.bootstrap_down.pop(name, None)
            return
        before = self.state.bootstrap_down.get(name)
        if before is None:
            log.warning("node.bootstrap_down", node=name, detail=why)
        self.state.bootstrap_down[name] = (before[0] if before else now, why)

    def _agent_store(
        self, name: str, request: leader_pb2.HeartbeatRequest, now: dt.datetime
    ) -> None:
        """What the heartbeat says of the agent's own store (``store_trouble``): a node problem
        from the first message that says some until one says none, its since kept while the
        words change (the free space they name moves). Every message of an agent that knows
        the field says it; one of an earlier release says nothing, which is none known."""
        texts = request.store_trouble[:STORE_TROUBLE_MAX]
        said = tuple(t for t in (peertext.clean(t, STORE_TROUBLE_CHARS) for t in texts) if t)
        before = self.state.agent_store.get(name)
        log_store_trouble(self.state, name, said)
        if not said:
            if before is not None:
                del self.state.agent_store[name]
            return
        self.state.agent_store[name] = (before[0] if before else now, said)

    def _login_failures(
        self,
        name: str,
        server: leader_pb2.LiveServer,
        now: dt.datetime,
        shift: dt.timedelta = dt.timedelta(0),
    ) -> None:
        """What the heartbeat says of the wrong passwords at the node's server's own login (the
        client password; the reference server keeps the count across its restarts: review of
        s49, 1): kept while there are some (``login_failures``), and logged as they change, so
        that the admin sees someone guessing it: at most one line per node and heartbeat
        interval (``_log_login_failures``: an agent that alternates counts, or a guess each
        message, makes no more). Only from a healthy server's status: a server that is down
        says nothing of them (what was shown stays); one that counts none (a new data dir)
        clears, as an agent that manages no server any more (driver "none": it kept the old server's
        row until the node was removed; review of s49carry, L). The latest one's time is on
        the leader's clock (``shift``: ``clock_shift``, as the node's client sightings) and
        never later than ``now`` (a far-future one was kept as sent, and the viewer east of
        UTC answered 500: review of s49carry, M); one that is no time is unknown."""
        if server.driver == "none":
            self._no_login_failures(name)
            return
        if not server.healthy:
            return
        count = server.login_failures
        if count <= 0:
            self._no_login_failures(name)
            return
        last = None
        if server.HasField("last_login_failure_at"):
            with contextlib.suppress(ValueError, OverflowError):
                sent = server.last_login_failure_at.ToDatetime(tzinfo=dt.UTC)
                last = min(sent, now - shift) + shift
        self._log_login_failures(name, count, now)
        self.state.server_login_failures[name] = LoginFailuresRow(name, count, last, now)

    def _no_login_failures(self, name: str) -> None:
        """The node's server counts none (any more): its row goes; the next count it has is
        news to log, within the bound of the line before (``_log_login_failures``)."""
        self.state.server_login_failures.pop(name, None)
        logged = self.state.login_failures_logged.get(name)
        if logged is not None and logged[0]:
            self.state.login_failures_logged[name] = (0, logged[1])

    def _log_login_failures(self, name: str, count: int, now: dt.datetime) -> None:
        """Log ``count`` if it differs from the one last logged for the node, unless that was
        less than a heartbeat interval ago (by the leader's clock; one that went back counts as
        long ago). A count held back is logged with the first message after the interval that
        still differs: an agent sends its count at its renewal bound at the latest
        (``nodeagent.leader_link.report_key``), so the last one is logged too; or as its
        stream ends before that message (``_log_held_login_failures``)."""
        logged = self.state.login_failures_logged.get(name)
        if logged is not None:
            said, at = logged
            if said == count:
                return
            if at <= now < at + dt.timedelta(seconds=self.state.heartbeat_interval):
                return
        log.warning(
            "node.server_login_failures",
            node=name,
            count=count,
            hint="someone keeps failing the server's login on that node: check who in the "
            "server's log; if the password may be known, tlsroll password set and a "
            "change-password rollout",
        )
        self.state.login_failures_logged[name] = (count, now)

    def _log_held_login_failures(self, name: str) -> None:
        """A heartbeat stream of node ``name`` ended (``_uncount``): the count it last said
        that ``_log_login_failures`` held back (the interval's bound) is logged now, as its
        next message after the interval would have logged it: the agent stopped, or its
        connection was lost, and that message may never come (review rev50a L4). Once (it is
        logged then), and not if nothing is held back."""
        row = self.state.server_login_failures.get(name)
        if row is None:
            return
        logged = self.state.login_failures_logged.get(name)
        if logged is not None and logged[0] == row.failures:
            return
        log.warning(
            "node.server_login_failures",
            node=name,
            count=row.failures,
            hint="someone keeps failing the server's login on that node: check who in the "
            "server's log; if the password may be known, tlsroll password set and a "
            "change-password rollout",
        )
        self.state.login_failures_logged[name] = (row.failures, self.state.clock())

    def _record_clients(
        self,
        name: str,
        seen: types_pb2.ClientsView,
        now: dt.datetime,
        renewing: bool = False,
        shift: dt.timedelta = dt.timedelta(0),
    ) -> None:
        """Queue a node's client report for the group commit (``BATCH_SECONDS``) when it says
        something new (``clients_said``) or the stored one is ``clients_persist`` old; else
        nothing (a write transaction each time before). Queued, it is stored at most a batch
        period after it came: as if the message had come that much later, which makes the
        leader's view older, never newer (``clients_persist``)."""
        taken = sightings(seen)  # (``https_matches`` once a message)
        said = clients_said(seen, taken)
        last = self._clients.get(name)
        interval = self.state.heartbeat_interval
        persist = clients_persist(interval, renewing)
        within = self.batch_seconds
        if last is not None and last[0] == said and dt.timedelta(0) <= now - last[1]:
            if now - last[1] < persist:
                return
            # Only its age has it written: it may wait (``REFRESH_SECONDS``), a batch period
            # short of when the stored one would be stale (``planner.report_stale_after``).
            # Meanwhile the running leader judges the stored one by this one's time: it
            # repeats it (``Store.report_on_clock_now``); the bound is for what is stored.
            stale = last[1] + report_stale_after(interval) - now
            within = self._lazy(stale.total_seconds() - self.batch_seconds)
        rows = client_rows(name, seen, now, shift, taken)
        window = min(seen.window_seconds, 366 * 86400)
        source = peertext.clean(seen.source, 20)
        problem = peertext.clean(seen.problem, 200)

        def write(db: sqlite3.Connection) -> None:
            write_clients(
                db, name, rows, window_seconds=window, source=source, problem=problem, now=now
            )

        self.state.store.queue_write(name, write)
        self.state.store.note_report(name, now, repeats=last is not None and last[0] == said)
        self._clients[name] = (said, now)
        self._start_writer(within)

    def _lazy(self, bound: float = math.inf) -> float:
        """Seconds a queued write that says nothing new may wait for its commit:
        ``REFRESH_SECONDS`` (or the batch period if longer: a test's), at most ``bound``, at
        least the batch period."""
        return max(self.batch_seconds, min(max(REFRESH_SECONDS, self.batch_seconds), bound))

    def _start_writer(self, within: float) -> None:
        """A write was queued that is to be committed within ``within`` seconds: the group
        commit comes then, or sooner if another queued write needs it sooner (it only ever
        comes sooner until it has run)."""
        due = asyncio.get_running_loop().time() + within
        if due < self._write_due:
            self._write_due = due
            self._write_sooner.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_batches())

    async def _write_batches(self) -> None:
        """The group commit: while writes are queued, all of them in one transaction in one
        worker-thread hop (``Store.write_queued``) when the first of them is due
        (``_start_writer``: a batch period after a write that says something new, up to
        ``REFRESH_SECONDS`` after one that does not); ends when nothing is queued (the next
        queued write starts it again). A failed commit is tried again a batch period later."""
        store = self.state.store
        loop = asyncio.get_running_loop()
        while True:
            self._write_sooner.clear()
            if self._write_due == math.inf:
                if not store.queued():
                    self._writer = None
                    return
                self._write_due = loop.time() + self.batch_seconds  # (queued without a time)
            if (wait := self._write_due - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._write_sooner.wait()  # a write due sooner came
                continue
            self._write_due = math.inf  # a write queued from now on sets it again
            if not store.queued():
                continue
            self._committing = asyncio.ensure_future(asyncio.to_thread(store.write_queued))
            try:
                await asyncio.shield(self._committing)
            except Exception as exc:  # queued again: the next period retries
                self._write_due = min(self._write_due, loop.time() + self.batch_seconds)
                health = self.store_health
                if health is None or not health.failed(exc, "heartbeat.batch_failed"):
                    log.error(
                        "heartbeat.batch_failed",
                        error=f"{type(exc).__name__}: {exc}"[:200],
                        hint="heartbeats are soft state and come again; if it repeats, check the"
                        " disk under the leader's data dir (df -h)",
                    )

    async def write_queued(self) -> int:
        """Write what waits for the group commit now (the leader is stopping; tests), and stop
        the periodic writer, after its commit under way if there is one (a worker thread
        cannot be cancelled: the store must not close under it). Returns how many writes
        this call made."""
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        self._write_due = math.inf
        if self._committing is not None:
            with contextlib.suppress(Exception):
                await self._committing  # its failure was logged; what it held is queued again
            self._committing = None
        return await asyncio.to_thread(self.state.store.write_queued)

    @map_errors(ERRORS)
    async def Heartbeat(
        self, request: leader_pb2.HeartbeatRequest, context: Ctx
    ) -> leader_pb2.HeartbeatResponse:
        snap, now, ask = await self._heartbeat(self._identify(context), request, context)
        return self._response(snap, request.crl_number, now, ask=ask)

    @map_errors(ERRORS)
    async def Heartbeats(  # type: ignore[override]
        self, requests: AsyncIterator[leader_pb2.HeartbeatRequest], context: Ctx
    ) -> None:
        """``Heartbeat`` on one stream: each message is checked and answered as a call would
        be, and a refusal ends the stream with its status (the agent opens a new one, with a
        new certificate if it has one, or falls silent). An agent that says it ``renews`` is
        told the renewal bound and sends only on change: the stream then keeps its node online
        (``_watch_renewals``) until it ends, or no message came within the bound; news (epoch,
        revocation list) goes out to it unasked. The first message must come within
        ``FIRST_MESSAGE_SECONDS``."""
        caller = self._identify(context)
        if self._stopping:
            # An agent whose stream ``close_streams`` ended opens a new one within a second:
            # taken, it would be open until the server's graceful stop gave up on it (review
            # of session 25). Refused, the agent tries again later (``reconnect_pause``).
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the leader is stopping")
        # A certificate the store refuses is refused now, not at its first message: a stream
        # that sends none held memory until its deadline (audit s33 M2). (One a re-learning
        # window may still take waits for its message, as before.)
        # (No local for the snapshot: the handler's frame lives as long as the stream.)
        if (why := self._refused_at_open(caller, await self.snapshot())) is not None:
            await self._refusing(caller, context, why)
            # InternalError: the call ended meanwhile (its client went, the server stops):
            # nothing is left to refuse (``_end``); raised on, it was logged as an error.
            with contextlib.suppress(grpc.aio.InternalError, grpc.aio.UsageError):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            return
        beat = _Beats(context)
        self._open.add(beat)
        self._opened(beat, caller.name)
        interval = self.state.heartbeat_interval
        lease = renewal_deadline(interval)
        loop = asyncio.get_running_loop()
        # The deadline of its next message is one time kept with the stream, which the watch
        # sweeps (``_sweep``): no timer of its own per message (a timer per read before).
        self._due(beat, loop.time() + max(FIRST_MESSAGE_SECONDS, 2 * interval))
        self._start_watch()
        try:
            while True:
                request = await context.read()
                arrived = next(self._heard)  # the order messages came in, not their ends
                if not isinstance(request, leader_pb2.HeartbeatRequest):  # EOF: ended
                    if beat.ending is not None:  # by the leader (its deadline, a cut): its status
                        await beat.ending
                    return  # (gRPC reads a cancelled call's end as EOF too: no proof of life)
                if not beat.name:
                    self._unsilence(beat, caller.name)
                if beat.ending is not None:  # the leader ended it while the message came
                    await beat.ending
                    return
                # Usually later than before (``_next_due`` still holds); not after the first
                # message at a short interval (the renewal bound, 8 s at 1 s, comes before
                # the first message's 10 s): ``_due`` then brings the watch's look forward.
                self._due(beat, loop.time() + lease)
                renewing = request.renews
                if not beat.agent:  # (its first message: its clock's reading is the agent's)
                    beat.agent = agent_of(request, context)
                # A refusal ends the stream (UNAUTHENTICATED).
                snap, now, ask = await self._heartbeat(
                    caller, request, context, renewing, beat.agent
                )
                beat.asking = ask
                beat.last = self.state.monotonic()
                beat.answers_checks = request.answers_checks
                if request.HasField("check_answer"):
                    beat.answered(request.check_answer)
                # The agent closes the stream while alive (``_uncount``), once this message was
                # accepted as any other (a refused one ended the stream above).
                beat.closed = request.closing
                first = not beat.name
                if first:
                    beat.caller = caller
                    self._count(beat, caller.name)
                if not renewing:
                    beat.renews = False  # a message every interval, each answered
                    self._unvouch(beat, beat.last)
                elif not beat.renews:
                    beat.renews = True
                    self._vouch(beat)
                    self._start_watch()
                if first:
                    self._superseded(beat)
                # Two agents with one identity (audit s33 M5): which agent sent it, and
                # whether another's stream sent since this one's last message.
                before, beat.heard = beat.heard, arrived
                if first:
                    self._came_back(beat)
                elif not request.closing:
                    self._look_for_twins(beat, before)
                # Only up while the stream lives: a message sent before a pushed list came
                # and read after it carries the older number, and the agent sends none for
                # the take (``report_key``), so the note would stay behind until the bound
                # and the list go out again (review 1b, finding 5). A take that failed is
                # either for good (resending the same list does not help) or ends the stream
                # (a new stream's first message sets the note afresh).
                beat.crl_number = max(beat.crl_number, request.crl_number)
                # The stages it keeps that no transaction began: in the store only for those
                # that are not live and were not looked up before on this stream (none as a
                # rule: the list is empty, or its rollout runs).
                if request.unswitched_stages or beat.held:
                    beat.hold(heard_stages(request))
                    if beat.held:
                        await self._look_at_stages((beat,), snap)
                        # What a test waits for, not a time (tests/test_stage_news.py).
                        log.debug(
                            "heartbeat.stages_heard",
                            node=caller.name,
                            stages=sorted(beat.held),
                            ended=sorted(beat.over),
                        )
                # Nothing to say to a renewal that asks nothing: an answer would cost as much
                # as the message. A list newer only by superseded certificates waits for the
                # watch's next round (``CRL_NEWS_SECONDS``), as it does for a quiet stream.
                crl_due = loop.time() >= self._crl_sent_at + CRL_NEWS_SECONDS
                # An agent that still says it keeps a stage of an ended rollout is told again
                # (``beat.over``): its removal failed, or the message crossed the news.
                if (
                    not renewing
                    or first
                    or request.wants_answer
                    or ask
                    or beat.over
                    or beat.news(snap, crl_due)
                ):
                    answer = self._response(
                        snap, beat.crl_number, now, renewing, request.seq, beat.over, ask
                    )
                    await beat.send(answer, snap)
                    del answer
                # The stream now waits for its next message, minutes in renewal mode: it must
                # not keep this snapshot of the whole store alive meanwhile (each write makes a
                # new one; 500 streams kept up to 500 of them, 12 MiB after a 500-node rollout),
                # nor the message it answered (what the leader keeps of it is kept apart).
                del snap, request
        except Exception:
            # The leader ended the stream (``_end``: cut, replaced, stalled, stopping) while
            # this handler refused or answered a message: the stream's status is the end's. A
            # second abort would raise UsageError, logged as an internal error with a gRPC
            # traceback (review of session 22, L4).
            if beat.ending is None:
                raise
            await beat.ending
        finally:
            self._open.discard(beat)
            self._unsilence(beat, caller.name)
            self._uncount(beat)
            beat.unanswered()

    def _refused_at_open(self, caller: Caller, snap: Snapshot) -> str | None:
        """Why a stream of ``caller`` is refused as it opens: the refusal its first message
        would get (``Snapshot.refusal``), unless a re-learning window may take it then."""
        why = snap.refusal(caller)
        if why is None or snap.relearns(caller.name, self.state.clock()):
            return None
        return why

    def _opened(self, beat: _Beats, name: str) -> None:
        """``beat`` opened with a certificate of node ``name``: it is silent until its first
        message. Beyond ``SILENT_STREAMS_PER_NODE``, the node's oldest silent one ends."""
        silent = self._silent.setdefault(name, [])
        if len(silent) >= SILENT_STREAMS_PER_NODE:
            _end(silent.pop(0), grpc.StatusCode.RESOURCE_EXHAUSTED, "a newer stream")
        silent.append(beat)

    def _unsilence(self, beat: _Beats, name: str) -> None:
        """``beat`` sent a message, or ended: it is no longer silent."""
        silent = self._silent.get(name)
        if silent is not None and beat in silent:
            silent.remove(beat)
            if not silent:
                del self._silent[name]

    def _count(self, beat: _Beats, name: str) -> None:
        """Count ``beat`` against node ``name``, only once a message was accepted: a
        certificate the leader refuses (a renewed node's old one passes TLS) must not push the
        agent's own streams out. Beyond ``MAX_STREAMS_PER_NODE``, the node's oldest ends."""
        beat.name = name
        mine = self._streams.setdefault(name, [])
        if len(mine) >= MAX_STREAMS_PER_NODE:
            oldest = mine.pop(0)
            _end(oldest, grpc.StatusCode.RESOURCE_EXHAUSTED, "a newer stream")
            log.warning(
                "heartbeat.stream_replaced",
                node=name,
                open=len(mine) + 1,
                detail="the agent opened a newer heartbeat stream and the oldest was ended; one "
                "now and then is a reconnect, many point to two agents on one node",
            )
            if oldest.agent != beat.agent and not oldest.closed:
                self._note_evicted(name, oldest.agent)
        mine.append(beat)

    def _note_evicted(self, name: str, agent: str) -> None:
        """A stream of agent ``agent`` of node ``name`` was ended for another agent's newer
        one: remembered for ``TWINS_HOLD_BOUNDS`` renewal deadlines (``_came_back``), at most
        ``EVICTED_KEPT`` ids per node and ``MAX_CALLERS`` nodes (``LeaderState.monotonic``)."""
        now = self.state.monotonic()
        until = now + TWINS_HOLD_BOUNDS * renewal_deadline(self.state.heartbeat_interval)
        if name not in self._evicted and len(self._evicted) >= MAX_CALLERS:
            self._evicted.clear()
        ids = self._evicted.setdefault(name, {})
        for old in [a for a, u in ids.items() if u <= now]:
            del ids[old]
        ids.pop(agent, None)
        if len(ids) >= EVICTED_KEPT:
            del ids[next(iter(ids))]
        ids[agent] = until

    def _came_back(self, beat: _Beats) -> None:
        """``beat``'s first message was accepted: if its agent's stream was ended for another
        agent's newer one (``_note_evicted``) a short while ago and another agent's stream of
        the node still lives, three or more agents use the node's identity (each new stream
        ends the oldest of ``MAX_STREAMS_PER_NODE`` before it sends a second message, so
        ``_look_for_twins`` never sees two interleave: review 2 of s34, F3). A restarted
        agent's old id never comes back, so a restart does not count."""
        ids = self._evicted.get(beat.name)
        until = ids.get(beat.agent) if ids else None
        if until is None or self.state.monotonic() >= until:
            return
        other = next(
            (
                o
                for o in self._streams.get(beat.name, ())
                if o is not beat and o.agent != beat.agent and not o.cut and not o.closed
            ),
            None,
        )
        if other is not None:
            self._twins(beat, other)

    def _look_for_twins(self, beat: _Beats, before: int) -> None:
        """``beat`` sent a message (not its first, not a ``closing`` one): if another stream of
        its node, of another agent (``_Beats.agent``), had a message accepted since ``beat``'s
        previous one, two agents use the node's identity, both alive: their messages
        interleave. An agent restart is no such case: the old agent's stream (not yet noticed
        dead) sends nothing more, and its ``closing`` message, if any, does not count; nor is an
        agent's own new stream (a reconnect, a renewed certificate): it has the same id. Logged
        as it begins, and held for ``TWINS_HOLD_BOUNDS`` renewal deadlines from the last time
        seen (``LeaderState.node_problem``): while both live, it is seen at least every
        renewal bound."""
        other = next(
            (
                o
                for o in self._streams.get(beat.name, ())
                if o is not beat
                and o.agent != beat.agent
                and before < o.heard < beat.heard
                and not o.cut
                and not o.closed
            ),
            None,
        )
        if other is not None:
            self._twins(beat, other)

    def _twins(self, beat: _Beats, other: _Beats) -> None:
        """``beat``'s and ``other``'s agents both use ``beat``'s node's identity: logged as it
        begins, held for ``TWINS_HOLD_BOUNDS`` renewal deadlines from now."""
        twins = self.state.twin_agents
        held = twins.get(beat.name)
        # The state's clock, which counts a suspend: on ``time.monotonic``, which stops in
        # one, a hold lasted the suspend longer after the host resumed.
        now = self.state.monotonic()
        until = now + TWINS_HOLD_BOUNDS * renewal_deadline(self.state.heartbeat_interval)
        peers = (peertext.clean(other.context.peer(), 80), peertext.clean(beat.context.peer(), 80))
        if held is None or now >= held.until:
            log.warning(
                "heartbeat.duplicate_agent",
                node=beat.name,
                peers=list(peers),
                hint="two agents use this node's identity (a cloned VM or copied data dir): stop"
                " the one that should not run (tlsroll schema show names it)",
            )
            if len(twins) >= MAX_CALLERS:
                twins.clear()
            twins[beat.name] = TwinAgents(self.state.clock(), until, peers)
        else:
            twins[beat.name] = TwinAgents(held.since, until, peers)

    def _superseded(self, beat: _Beats) -> None:
        """``beat``'s first message was accepted: the questions waiting on its node's older
        streams are asked again on it (``StreamReplaced``; ``ask_check``). An agent has one stream
        at a time, so an older one is one it left (it restarted, or reconnected) before the
        leader noticed."""
        for older in self._streams.get(beat.name, ()):
            if older is not beat and older.questions:
                older.unanswered(StreamReplaced("a newer heartbeat stream of the node opened"))

    def _uncount(self, beat: _Beats) -> None:
        """``beat`` ended: a wrong-password count it said and that was held back is logged
        (``_log_held_login_failures``). A renewal stream vouched for its node until now: the
        leader knows the agent alive up to now if it said it closes the stream (``closing``),
        else only as far as its keepalive proves (``keepalive_seconds``: a vanished agent's
        connection closes that long after its last PING), unless another of the node's
        streams still vouches for it. The agent's last stream: its clock is known a renewal
        deadline more (a reconnect goes on with it; else its agent stopped or vanished:
        ``leader.node_clocks``)."""
        if beat.name:
            self._log_held_login_failures(beat.name)
        mine = self._streams.get(beat.name)
        if mine is not None:
            if beat in mine:
                mine.remove(beat)
            if not mine:
                del self._streams[beat.name]
        if beat.name and not any(o.agent == beat.agent for o in mine or ()):
            keep = renewal_deadline(self.state.heartbeat_interval)
            self.state.clocks.ended(beat.name, beat.agent, keep)
        # (A stream a newer one replaced is no longer in its node's list, which may be gone:
        # its vouch is still released, or the node would stay online for ever.)
        if beat.vouching and beat.last is not None:
            now = self.state.monotonic()
            if beat.closed:  # the agent said it closed: alive until now
                proven = now
            else:  # it may have vanished: alive as far as its last PING could have answered
                every, wait = keepalive_seconds(self.state.heartbeat_interval)
                proven = now - (every + wait)
            self._unvouch(beat, max(beat.last, proven))

    def _vouch(self, beat: _Beats) -> None:
        """``beat`` (a renewal stream) keeps its node alive now while it is open
        (``Store.vouch``)."""
        if not beat.vouching and beat.name:
            beat.vouching = True
            self.state.store.vouch(beat.name)

    def _unvouch(self, beat: _Beats, until: float) -> None:
        """``beat`` vouches no more: its node was alive up to ``until`` (monotonic) as far as
        it knows (``Store.heard_until``, given it by the leader's clock: now less the time
        since, whatever that clock did meanwhile; another stream of the node may still
        vouch)."""
        if beat.vouching:
            beat.vouching = False
            since = dt.timedelta(seconds=self.state.monotonic() - until)
            self.state.store.heard_until(beat.name, self.state.clock() - since)

    def _expired(self, beat: _Beats) -> None:
        """``beat`` had no message within its bound: its node is known alive only until the
        message was due (a hung agent goes offline 3 intervals later, as a silent one)."""
        if beat.vouching and beat.last is not None and beat.name:
            beat.renews = False
            due = beat.last + renew_seconds(self.state.heartbeat_interval)
            self._unvouch(beat, due)  # _uncount then vouches for nothing more
            log.warning(
                "heartbeat.renewal_missed",
                node=beat.name,
                hint="the agent's heartbeat stream was not renewed in time: check the agent runs"
                " and reaches the leader (tlsroll nodes)",
            )

    def _start_watch(self) -> None:
        if self._stopping:
            return
        if self._watch is None or self._watch.done():
            self._loop = asyncio.get_running_loop()
            self._watch = asyncio.ensure_future(self._watch_renewals())

    def _store_changed(self) -> None:
        """(Any thread.) A write moved the store's generation on: the watch looks. Not told
        again while it is still to look (a rollout writes many times a second: each telling
        wakes the event loop): the watch clears the flag before it reads the store, and a
        write that found the flag set committed before that read."""
        loop = self._loop
        if loop is None or self._changed.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed (the leader stopped)
            loop.call_soon_threadsafe(self._changed.set)

    def _due(self, beat: _Beats, when: float) -> None:
        """``beat``'s next message must come by ``when`` (the event loop's time), else the
        watch ends it (``_sweep``)."""
        beat.due = when
        if when < self._next_due:
            self._next_due = when
            self._changed.set()  # the watch may be waiting for a later one

    def _sweep(self, now: float) -> None:
        """End every open stream whose next message is overdue (its first within
        ``FIRST_MESSAGE_SECONDS``, a renewal within ``renewal_deadline``) with
        DEADLINE_EXCEEDED, its node alive only up to when the message was due
        (``_expired``). Looks at the streams only once the earliest deadline known may have
        passed (``_next_due``), then learns the next one: a stream that sends in time is not
        looked at between its messages (its deadline moves on without a timer)."""
        if now < self._next_due:
            return
        earliest = math.inf
        for beat in list(self._open):
            if beat.ending is not None:
                continue
            if beat.due > now:
                earliest = min(earliest, beat.due)
                continue
            self._expired(beat)
            why = "no heartbeat within " + (
                "the renewal bound" if beat.last is not None else "the first deadline"
            )
            _end(beat, grpc.StatusCode.DEADLINE_EXCEEDED, why)
        self._next_due = earliest

    async def _watch_renewals(self) -> None:
        """While heartbeat streams are open: once the store changed (at most every second, or
        half interval), each stream whose certificate it refuses now is cut (``_cut_refused``) and
        each renewal-mode agent that lacks the new epoch or revocation list is sent them (a
        message at once, as a heartbeat reply used to bring them within an interval). A tick
        when nothing changed looks at no stream: what keeps a quiet node online is its
        stream's vouch (``Store.vouch``), not this loop (it moved every node's time on each
        second before, issue 15). It also ends the streams whose next message is overdue
        (``_sweep``), so that no stream keeps a timer of its own; it runs while any stream is
        open. Once the streams were checked it waits for the store to change, a deadline or
        the snapshot's age, not a tick each second (the event loop woke for it every second
        before, a fixed cost that small clusters paid per agent: issue 15)."""
        tick = min(1.0, self.state.heartbeat_interval / 2)
        checked: Snapshot | None = None  # the snapshot the open streams were checked against
        loop = asyncio.get_running_loop()
        settled = False  # every open stream was checked against the store as it is
        while True:
            if settled and not self._changed.is_set():
                # Nothing to do until the store changes (``_store_changed``), a stream's
                # deadline comes (``_due``), or the snapshot is to be read again
                # (``SNAPSHOT_MAX_AGE``: a revocation list signed anew): no tick meanwhile.
                wait = max(0.0, min(self._next_due - loop.time(), SNAPSHOT_MAX_AGE))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
            # A look a tick at most (a rollout writes many times a second); a deadline that
            # comes sooner is kept to the moment.
            await asyncio.sleep(max(0.0, min(tick, self._next_due - loop.time())))
            if not self._open:
                self._watch = None
                self._next_due = math.inf
                return
            try:
                self._sweep(loop.time())
            except Exception as exc:  # the watch must go on: it keeps every stream's deadline
                log.error(
                    "heartbeat.sweep_failed",
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    hint="the watch goes on; a bug in tlsroll: report it with the lines before "
                    "this one",
                )
            self._changed.clear()  # a write from now on sets it again
            settled = False
            try:
                snap = await self.snapshot()
                if snap is checked:
                    settled = True
                    continue
                now = self.state.clock()
                self._cut_refused(snap)
                renewing = [b for b in self._open if b.renews and b.name and not b.cut]
                await self._look_at_stages(renewing, snap)  # a rollout ended: its stages
                # A list newer only by superseded certificates waits for the next round due
                # (``CRL_NEWS_SECONDS``); the streams that lack it keep the watch ticking.
                crl_due = loop.time() >= self._crl_sent_at + CRL_NEWS_SECONDS
                news = [b for b in renewing if b.news(snap, crl_due)]
                if any(b.crl_number != snap.crl_number for b in news):
                    self._crl_sent_at = loop.time()
                if news:
                    await asyncio.gather(*(self._push(b, snap, now) for b in news))
                # Done with this snapshot once every stream holds its news (a push still under
                # way for an older one skipped a stream: the next tick tries it again).
                waiting = [b for b in renewing if b in self._open and not b.cut and b.news(snap)]
                if not waiting:
                    checked = snap
                    settled = True
            except Exception as exc:  # the next tick tries again
                log.error(
                    "heartbeat.watch_failed",
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    hint="the next tick tries again; a bug in tlsroll: report it with the lines "
                    "before this one",
                )

    def _cut_refused(self, snap: Snapshot) -> None:
        """The store changed: end every counted stream whose certificate ``snap`` refuses
        (revoked, its node removed, or superseded by a renewed one the agent has used) with
        UNAUTHENTICATED at once, as its next message would be refused, and take back the
        liveness it vouched for up to its last message (``Store.heard_until``). Before, a
        renewal stream kept a revoked node online until its next message, up to the renewal
        bound (review of session 21, finding 6). A node whose certificate on record is
        revoked is offline from the revocation on anyway (``LeaderState.node_online``)."""
        for beat in list(self._open):
            if beat.cut or beat.caller is None or not beat.name:
                continue
            why = snap.refusal(beat.caller)
            if why is None:
                continue
            beat.cut = True
            if beat.last is not None:
                beat.renews = False
                self._unvouch(beat, beat.last)  # _uncount then vouches for nothing more
            _end(beat, UNAUTHENTICATED, why)
            log.warning(
                "heartbeat.stream_cut",
                node=beat.name,
                reason=why,
                detail="the leader ended this agent's heartbeat stream (the reason says why); a "
                "valid agent opens a new one",
            )

    async def _push(self, beat: _Beats, snap: Snapshot, now: dt.datetime) -> None:
        """Send ``beat``'s agent the news in ``snap`` (unless its stream is ending). The write
        is never cancelled (grpc.aio leaves a call whose write was cancelled in no defined
        state): if the agent has not taken the news within an interval, its stream is ended
        with UNAVAILABLE (an agent that is alive opens a new one, whose first answer brings the
        news), and the write finishes or fails with the stream. One push per stream at a
        time."""
        if beat.pushing is not None and not beat.pushing.done():
            return
        reply = self._response(
            snap, beat.crl_number, now, renews=True, ended=beat.over, ask=beat.asking
        )
        beat.pushing = push = asyncio.ensure_future(beat.send(reply, snap))
        _PUSHES.add(push)
        push.add_done_callback(_pushed)
        done, _ = await asyncio.wait({push}, timeout=self.state.heartbeat_interval)
        if not done:
            log.warning(
                "heartbeat.push_stalled",
                node=beat.name,
                detail="the agent took no news within a heartbeat interval (a slow or stuck "
                "link): its stream is ended, and an agent that is alive opens a new one",
            )
            _end(beat, grpc.StatusCode.UNAVAILABLE, "the agent took no news in time")
        elif not push.cancelled() and (exc := push.exception()) is not None:
            # a stream that ended meanwhile: nothing to send it
            log.info("heartbeat.push_failed", node=beat.name, error=type(exc).__name__)

    def close_streams(self) -> int:
        """End every open Heartbeats stream (the leader is stopping), counted or not: a
        stream never ends by itself, and the server's graceful stop would wait its whole grace
        period for them. Each agent sees its stream end and opens a new one within a second or
        so once the leader is back (``nodeagent.leader_link.reconnect_pause``; an agent of an
        earlier release at its next heartbeat); from now on new streams are refused
        (UNAVAILABLE), so that none opened in the meantime holds up the stop."""
        self._stopping = True
        with contextlib.suppress(ValueError):  # the store outlives this service in tests
            self.state.store.db.on_change.remove(self._store_changed)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        streams = list(self._open)
        for beat in streams:
            _end(beat, grpc.StatusCode.UNAVAILABLE, "the leader is stopping")
        if streams:
            log.info("heartbeat.streams_closed", streams=len(streams))
        return len(streams)

    @map_errors(ERRORS)
    async def SignWorkstationCertificate(
        self, request: leader_pb2.SignWorkstationRequest, context: Ctx
    ) -> leader_pb2.SignWorkstationResponse:
        """A node's bootstrap service has checked the workstation's password proof and vouches
        for it with its own identity; the leader signs a client-only certificate naming nothing
        but ``ws-<name>`` and its workstation identity. At most ``workstation_certs_per_hour``
        per node (RESOURCE_EXHAUSTED, with when it signs again: ``_over_cap``); a name another
        PC holds is refused (ALREADY_EXISTS) unless the CSR proves this is that PC or replaces
        it on purpose (``bootstrap_csr.Reenrolment``, ``Store.issue_workstation``). The answer
        carries the CA certificate it was issued under."""
        return await self._sign_workstation(request, context, renewal=False)

    @map_errors(ERRORS)
    async def RenewWorkstationCertificate(
        self, request: leader_pb2.SignWorkstationRequest, context: Ctx
    ) -> leader_pb2.SignWorkstationResponse:
        """A node's bootstrap service passes on a workstation's renewal (``tlsroll client
        renew``): no password was checked, so the CSR's proof of the workstation's current
        certificate is all it rests on; signed only if that certificate is on record for the
        name, unrevoked and unexpired (``Store.issue_workstation`` with ``renewal``:
        NotRenewable, FAILED_PRECONDITION, otherwise). The rest as SignWorkstationCertificate."""
        return await self._sign_workstation(request, context, renewal=True)

    async def _sign_workstation(
        self, request: leader_pb2.SignWorkstationRequest, context: Ctx, *, renewal: bool
    ) -> leader_pb2.SignWorkstationResponse:
        caller = await self._caller_cert(context)
        node = caller.name
        key, cn = bootstrap_csr.check_workstation_csr(request.csr_pem)
        claim = bootstrap_csr.reenrolment_of(request.csr_pem)
        now = self.state.clock()
        ca_pem: list[bytes] = []

        def issue() -> IssuedCert:
            ca_pem.append(self.state.ca.cert_pem)  # the certificate the leaf is issued under
            cert = self.state.ca.issue(
                key,
                bootstrap_csr.workstation_names(cn),
                server=False,
                client=True,
                now=now,
                identity=spiffe.workstation(self.state.trust_domain, cn),
                # PCs set up the same morning end over days (``pki.spread``), not on one.
                lifetime=pki.spread(dt.timedelta(days=pki.LEAF_VALIDITY_DAYS)),
            )
            issued.append(cert)
            return IssuedCert.of(cert, "workstation", cn, node, now)

        issued: list[Any] = []
        try:
            await asyncio.to_thread(
                self.state.store.issue_workstation,
                node,
                cn,
                issue,
                now=now,
                presented=caller.fingerprint,
                presented_serial=caller.serial,
                previous=claim.previous,
                replace=claim.replace and not renewal,
                per_hour=self.workstation_certs_per_hour,
                renewal=renewal,
                key_pin=pki.spki_pin(key),
            )
        except (TooMany, NameTaken, NotRenewable) as exc:
            log.warning(
                "workstation.refused",
                node=node,
                workstation=cn,
                reason=str(exc),
                hint="the reason says why: over the hourly cap (workstation_certs_per_hour in "
                "leader.toml), a name another PC holds (tlsroll workstations list), a forced "
                "renewal of a certificate too young (it says when), or a renewal of a "
                "certificate revoked, ended or not on record (the PC enrols with the password)",
            )
            if isinstance(exc, RenewedTooSoon):  # (the name's budget, not the node's cap)
                _retry_after(context, exc.retry)
            elif isinstance(exc, TooMany):
                await self._over_cap(context, node, cn, now, exc)
            raise
        if renewal:
            log.info("workstation.renewed", node=node, workstation=cn)
        else:
            log.info("workstation.enrolled", node=node, workstation=cn)
        # With the CA certificate it was issued under: after `tlsroll ca renew`, the node's
        # bootstrap service hands the workstation the renewed one too, before a rotate-cert
        # rollout stages it (review s48rev1 H1).
        return leader_pb2.SignWorkstationResponse(
            certificate_pem=pki.cert_to_pem(issued[0]), ca_certificate_pem=ca_pem[-1]
        )

    async def _over_cap(
        self, context: Ctx, node: str, cn: str, now: dt.datetime, exc: TooMany
    ) -> None:
        """A PC refused at ``node`` for its hour's cap (``workstation_certs_per_hour``): kept
        with the node's bootstrap failures (``CAP_SOURCE``), so that ``schema show`` says why
        PCs could not enrol there on switch day (only the log said it: review s64 M3), and
        when it may sign again sent back (``RETRY_AFTER_KEY``: the PC is told when to try).
        Counted in memory and written by the group commit (``Store.queue_count``): a stolen
        agent key asking on made the leader commit once per call, and a failed write (a full
        disk) was dropped unheard; the group commit's failure is the store's health's, as the
        heartbeats' is (review b2 of s64, L4b). The refusal stands whether or not it is kept;
        no audit event each: a stolen key asking on is a row's count, and the log's."""
        refused = CapRefusals(BootstrapFailureRow(node, CAP_SOURCE, cn, 1, now, now))
        self.state.store.queue_count(node, refused)
        self._start_writer(self.batch_seconds)
        _retry_after(context, exc.retry)

    @map_errors(ERRORS)
    async def WithdrawWorkstationCertificate(
        self, request: leader_pb2.WithdrawWorkstationRequest, context: Ctx
    ) -> leader_pb2.WithdrawWorkstationResponse:
        """A node's bootstrap service could not deliver the workstation certificate it was
        just given (``SignWorkstationCertificate``: its crypto worker failed after the
        signing): that very certificate, named whole, is revoked so that it no longer holds
        the name, and the workstation's next try (with a new key) is signed. Only the node that
        asked for it, within ``WITHDRAW_WINDOW`` of its issue (``Store.withdraw_workstation``):
        a leaked password lets an enrolment withdraw nothing but the certificate its own
        exchange was given, never a working one."""
        caller = await self._caller_cert(context)
        if len(request.certificate_pem) > MAX_WITHDRAWN_PEM:
            raise invalid("not a workstation certificate (too long)")
        fingerprint = pki.fingerprint(pki.load_cert_pem(request.certificate_pem))
        serial = await asyncio.to_thread(
            self.state.store.withdraw_workstation,
            caller.name,
            fingerprint,
            now=self.state.clock(),
            presented=caller.fingerprint,
            presented_serial=caller.serial,
        )
        if serial is not None:
            log.warning(
                "workstation.withdrawn",
                node=caller.name,
                serial=serial,
                detail="the node withdrew a workstation certificate it could not deliver; the PC"
                " enrols again",
            )
            return leader_pb2.WithdrawWorkstationResponse(withdrawn=True)
        reason = await asyncio.to_thread(
            self.state.store.revoke_reason, caller.name, fingerprint
        )  # (a revocation is for good: its reason stays what it was)
        return leader_pb2.WithdrawWorkstationResponse(withdrawn=False, revoke_reason=reason)

    @map_errors(ERRORS)
    async def RenewNodeCertificate(
        self, request: leader_pb2.RenewNodeCertificateRequest, context: Ctx
    ) -> leader_pb2.RenewNodeCertificateResponse:
        """An agent renews its own certificate, proving who it is with the certificate it
        holds: a CSR for a new key naming exactly the node's names on record; the new
        certificate carries the node's identity and the new key's internal name. The leader
        then dials the agent by the new key (``leader.agent_client.AgentPool``), and accepts
        the old certificate only until the agent has used the new one."""
        caller = await self._caller_cert(context)
        name = caller.name
        try:
            node = await asyncio.to_thread(self.state.store.get_node, name)
        except NotFound:  # removed since the check: the check's refusal
            raise unauthenticated(rpc.not_enrolled(name)) from None
        csr = pki.load_csr_pem(request.csr_pem)
        names = pki.Names.of(node.name, node.addresses, node.dns_names)
        public_key = pki.check_csr(csr, names)
        key_pin = pki.spki_pin(public_key)
        if key_pin == caller.key_pin:
            raise invalid("a renewal needs a new key; this CSR has the key of the current one")
        td = self.state.trust_domain
        now = self.state.clock()
        issued: list[Any] = []
        # The node's names apart from the SAN (``pki.NAMES_OID``) if the agent takes that, or
        # if the certificate it presents has them so: never back into the SAN, where they would
        # make a server certificate for the node's address (a copy of the key asking without
        # the flag).
        presented = peer_certificate(context)
        asked_apart = request.names_apart or (
            presented is not None and pki.names_apart(presented) is not None
        )

        ca_pem: list[bytes] = []

        def issue(apart: bool) -> NodeCert:  # (apart: asked, or the node's since: the store)
            ca_pem.append(self.state.ca.cert_pem)  # the certificate the leaf is issued under
            new = self.state.ca.issue(
                public_key,
                names,
                server=True,
                client=True,
                identity=spiffe.node(td, name),
                internal_dns=[spiffe.key_host(td, key_pin)],
                now=now,
                lifetime=self.state.agent_cert_lifetime,
                names_apart=apart,
            )
            issued.append(new)
            return NodeCert(
                key_pin=key_pin,
                fingerprint=pki.fingerprint(new),
                serial=f"{new.serial_number:x}",
                not_after=new.not_valid_after_utc,
            )

        recorded = await asyncio.to_thread(
            self.state.store.renew_node_certificate,
            name,
            presented=caller.fingerprint,
            presented_serial=caller.serial,
            key_pin=key_pin,
            issue=issue,
            now=now,
            names_apart=asked_apart,
        )
        log.info(
            "node.certificate_renewed",
            node=name,
            serial=recorded.serial,
            not_after=recorded.not_after.isoformat(),
        )
        # The CA certificate it was issued with: after `tlsroll ca renew`, the agent takes
        # the renewed one (same key, a later end) as its DATA/ca.pem.
        return leader_pb2.RenewNodeCertificateResponse(
            certificate_pem=pki.cert_to_pem(issued[0]),
            not_after=timestamp(recorded.not_after),
            ca_certificate_pem=ca_pem[0],
        )
