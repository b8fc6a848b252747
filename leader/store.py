"""The leader's durable state in SQLite: enrolled nodes, join tokens, the certificates the CA
issued (and which of them are revoked), and the audit trail.

One connection, used from one thread at a time (callers in async code go through
``asyncio.to_thread``; a lock serialises them). WAL journal with ``synchronous=FULL``: a
committed transaction survives a power cut. Every change writes an audit event in the same
transaction. Clocks are passed in (``now``), never read here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import functools
import hashlib
import hmac
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Self, TypeVar

from leader.db import RELEARN_WINDOW, LeaderStore
from leader.rollout_core import TERMINAL_ROLLOUT_STATES, RolloutState
from leader.store_rules import (
    WORKSTATION_CERTS_PER_HOUR,
    join_again,
    serial_fits,
    token_command,
)
from tlsroll import bootstrap_base, clocks, logs, rpc
from tlsroll.echo import hide_inside, shown
from tlsroll.errors import TerminalError
from tlsroll.sqlite import Database, from_text, to_text

if TYPE_CHECKING:  # the certificate type only (``IssuedCert.of``)
    from cryptography import x509

T = TypeVar("T")
log = logs.get_logger(__name__)

_TERMINAL = tuple(sorted(s.value for s in TERMINAL_ROLLOUT_STATES))  # a rollout ended
# The newest rollout not yet ended that holds node ? (``remove_node``).
_HELD = (
    "SELECT r.id, r.state FROM rollouts r JOIN rollout_nodes n ON n.rollout_id = r.id"  # noqa: S608
    f" AND n.name = ? WHERE r.state NOT IN ({', '.join('?' * len(_TERMINAL))})"
    " ORDER BY r.epoch DESC LIMIT 1"
)
# The newest rollout not yet ended (``advance_epoch``).
_LIVE = (
    "SELECT id, state FROM rollouts"  # noqa: S608
    f" WHERE state NOT IN ({', '.join('?' * len(_TERMINAL))}) ORDER BY epoch DESC LIMIT 1"
)


class TokenRejected(TerminalError):
    """The join token cannot be used; the message is safe to send to the caller."""


WAY_TO_JOIN_AGAIN = (
    "create a new token on the leader, `(umask 077; tlsroll token create --node NAME --address IP"
    " --print-join-command > join-NAME.sh)`, run it on the node again as root, then"
    " `systemctl restart tlsroll-agent`"
)
"""The way on after a refusal of the join token itself (not valid, expired, used up,
revoked): the agent ends on it (exit 6, not restarted) and its line said only what was
refused (review s66 walk L6). After the refusal's own words, which stay: a person or a script
may look for them. Generic (NAME, IP): a wrong secret must not learn the token's node."""


class WrongSecret(TokenRejected):
    """The join token's id is unknown or its secret wrong: a guess (``leader.join_guard``
    counts it against the caller's source). Every other refusal of an enrolment in the store
    comes after a right secret."""


class KeyRefused(TerminalError):
    """A key the leader takes under no name (``_key_refused``) asked for by a node that is on
    record: a renewal onto it (the CSR proves its caller holds it), or a re-learning of a
    certificate of it. The message is safe to send to the caller (one line: the node whose key
    it is, and the way on, with a new key)."""


class NameTaken(TerminalError):
    pass


class NotFound(TerminalError):
    pass


class Malformed(TerminalError):
    """An id or serial of a shape nothing can have (INVALID_ARGUMENT, the CLI's usage error;
    review s47rtin L6): not "not found", which says the shape was right."""


class CAsOwn(TerminalError):
    """A serial of the cluster CA's own certificate (the one in use, or one a ``tlsroll ca
    renew`` replaced) given to ``Store.revoke``: INVALID_ARGUMENT, the CLI's usage error.
    Agents and workstations trust it directly, and the revocation list it signs cannot revoke
    it: "revoked" would have said done for what changes nothing (review s63 ops)."""


class NotWorkstation(TerminalError):
    """A serial of another certificate than a workstation's given to ``Store.revoke`` with
    ``workstations_only`` (`tlsroll workstations revoke`): INVALID_ARGUMENT, the CLI's usage
    error. Before, that command revoked any serial, the leader's own included (which the
    leader then issued again for a new key), and its help and README said workstations
    (review of s63-o1 L4)."""


# What a certificate on record of each kind is, for ``NotWorkstation``'s line.
KIND_WORDS = {
    "node": "a node's agent certificate",
    "server": "a node's server certificate",
    "leader": "a certificate of the leader's own",
    "viewer": "the viewer's certificate",
    "other": "a certificate revoked with --unknown",
}


@dataclass(frozen=True)
class OwnCert:
    """One of the leader's own certificates (``kind`` leader or viewer), as the leader serves
    it: ``Store.revoke`` finds it by its serial, and records it as it revokes it if it is not
    on record (the viewer's never are before; the leader's are as they are issued,
    ``record_leader_certificate``, but not one of a store restored from an older backup)."""

    kind: str
    serial: str  # hex, as ``Store.revoke`` keeps serials (no leading zeros)
    fingerprint: str
    not_before: dt.datetime
    not_after: dt.datetime


class TooMany(TerminalError):
    """A node asked for more than it may (workstation certificates per hour). ``retry``: how
    long until it may again (the hour of the issue that then leaves the count ends), None if
    not known."""

    def __init__(self, message: str, retry: dt.timedelta | None = None) -> None:
        super().__init__(message)
        self.retry = retry


class InRollout(TerminalError):
    """A node that a rollout not yet ended holds cannot be removed (``in_rollout_text``)."""

    def __init__(
        self,
        name: str,
        rollout_id: str,
        state: str,
        addresses: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        serials: Sequence[str] | None = None,
    ) -> None:
        super().__init__(in_rollout_text(name, rollout_id, state, addresses, dns_names, serials))


def in_rollout_text(
    name: str,
    rollout_id: str,
    state: str,
    addresses: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    serials: Sequence[str] | None = None,
) -> str:
    """``_in_rollout_text``, within a status's details (``tlsroll.rpc.MAX_DETAILS``: cut there
    with "…", losing its end, the step after the rollout): with the serials named, else with
    where to find them, else with the join script and the node not named again, else with the
    token's names left to the admin (a 63-character name, three addresses and two DNS names
    with two serials ran over: review s71 uxsmalls)."""
    cut = None if serials else serials  # (the serials' place says where to find them)
    for text in (
        _in_rollout_text(name, rollout_id, state, addresses, dns_names, serials),
        _in_rollout_text(name, rollout_id, state, addresses, dns_names, cut),
        _in_rollout_text(name, rollout_id, state, addresses, dns_names, cut, short=True),
    ):
        if len(text) <= rpc.MAX_DETAILS:
            return text
    return _in_rollout_text(name, rollout_id, state, (), (), cut, short=True)


def _in_rollout_text(
    name: str,
    rollout_id: str,
    state: str,
    addresses: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    serials: Sequence[str] | None = None,
    short: bool = False,
) -> str:
    """Why node ``name`` is not removed while rollout ``rollout_id`` (in ``state``) holds it,
    and the ways on: a rollout awaiting finalize (a transitional phase 1, often for weeks) is
    finalized or rolled back, not aborted (``rollout abort`` refuses it); any other, let it end
    or abort it. Then the way back for an agent whose certificate has ended, which needs no
    removal (review s46rt1 H1): a token for the node (its names: ``addresses``, ``dns_names``),
    given to its agent, which enrols its own key again. Last, a machine lost or stolen meanwhile
    (review s47rev1 L5): ``tlsroll ca revoke`` of its agent's certificates cuts it off at once,
    the rollout held or not (``serials``: those the leader accepts from the node's agent, not
    revoked (``Store.agent_serials``); None: not known here, so the text says where to find
    them); then a finalize leaves it out (``rollout_core.LEFT_OUT``); ``nodes remove`` once the
    rollout has ended, which revokes its served certificate (revoking the agent's leaves that
    one valid: the agent's is what calls the leader)."""
    waiting = state == RolloutState.AWAITING_FINALIZE.value
    if waiting:
        first = (
            f": `tlsroll rollout finalize {rollout_id}` (close http) or `tlsroll rollout "
            f"rollback {rollout_id}` first"
        )
    else:
        first = "; let it end (or `tlsroll rollout abort`) first"
    if serials is None:
        cut = (
            "cut its agent off now with `tlsroll ca revoke SERIAL`, its agent's serial (its "
            "agent row in `tlsroll certs check-expiration`)"
        )
    elif serials:
        cut = "cut its agent off now with " + " and ".join(
            f"`tlsroll ca revoke {serial}`" for serial in serials
        )
        cut += " (as `tlsroll certs check-expiration` lists it)"
    else:
        cut = "its agent's certificate is revoked already: its agent is cut off"
    # Measured against a status's details (``tlsroll.rpc.MAX_DETAILS``, 1000 characters): with
    # two serials, a long rollout id, a long name and two addresses it stays within
    # (tests/test_reenrol_ended.py).
    then = (
        "; finalize then leaves it out (it stays on http and https), rollback goes back without it"
        if waiting
        else ""
    )
    return (
        f"node {name!r} is in rollout {rollout_id}, which is {state}{first}. If its agent's "
        "certificate has ended, it needs no removal: "
        + join_again(
            name,
            token_command(name, addresses, dns_names),
            "systemctl restart tlsroll-agent",
            why=False,  # (the line's room: ``tlsroll.rpc.MAX_DETAILS``)
            short=short,
        )
        + f": it enrols its own key again. If the machine is lost or stolen, {cut}, while "
        f"the rollout {'waits' if waiting else 'goes on'}{then}; once the rollout has ended, "
        "`tlsroll nodes remove` it, which revokes its server's certificate (8443) too"
    )


class RolloutHoldsCA(TerminalError):
    """The CA certificate is not renewed while a rollout runs: its stages carry the CA
    certificate (``tlsroll ca renew``)."""

    def __init__(self, rollout_id: str, state: str) -> None:
        super().__init__(
            f"rollout {rollout_id} is {state}: its stages carry the CA certificate; renew the "
            "CA once it has ended (tlsroll rollout status)"
        )


class CARenewal(Protocol):
    """A CA renewal prepared in ``Store.renew_ca``'s transaction (``leader.ca_renewal.
    Renewal``)."""

    detail: dict[str, Any]

    def put_in_place(self) -> None: ...

    def discard(self) -> None: ...


@dataclass(frozen=True)
class CARenewed:
    """One ``tlsroll ca renew``: when, the certificate it made (its serial and fingerprint),
    and the certificate it replaced (its serial, fingerprint and end)."""

    at: dt.datetime
    serial: str
    previous_serial: str
    previous_fingerprint: str
    previous_not_after: dt.datetime
    fingerprint: str = ""


class CARenewalNotInPlace(TerminalError):
    """The renewal was audited, and its certificate could not be put in place (the rename
    failed): the CA certificate in use is the one it was."""

    def __init__(self, cause: str) -> None:
        super().__init__(
            f"the CA renewal was audited, but the renewed certificate could not be put in place "
            f"({cause}): the CA certificate in use is unchanged; run tlsroll ca renew again"
        )


class EpochFixed(TerminalError):
    """The epoch floor is not raised while a rollout runs: its epoch is fixed."""

    def __init__(self, rollout_id: str, state: str) -> None:
        super().__init__(f"rollout {rollout_id} is {state}; advance the epoch once it has ended")


class TooLate(TerminalError):
    """A workstation certificate too old for its node to withdraw
    (``Store.withdraw_workstation``)."""


class RenewedTooSoon(TooMany):
    """A workstation's forced renewal before its certificate is ``FORCED_RENEWAL_EVERY`` old
    (``_check_renewal_budget``): the name's own budget, not its node's hourly cap (nothing is
    kept with the node's failed passwords); ``retry``: when it may."""


class NotRenewable(TerminalError):
    """A workstation's renewal without the password (``Store.issue_workstation`` with
    ``renewal``): the certificate it proves it holds is not on record for its name, revoked, or
    ended. The PC enrols again with the password (``tlsroll client test-connection``)."""


class Superseded(TerminalError):
    """A node's certificate is neither the one on record nor the one before it, or it is
    revoked, or the node is removed: it may not call (``LeaderService._check_on_record``)."""


@dataclass(frozen=True)
class RenewalReport:
    """What an agent says about renewing its certificate, with its heartbeat."""

    due_at: dt.datetime | None = None
    failing_since: dt.datetime | None = None
    error: str = ""


# Certificates of its own a node may renew, per hour: an agent renews once in weeks (tests: every
# minute or two); one that asks more often is broken or not ours any more.
NODE_CERTS_PER_HOUR = 30
# How long after its issue a node may withdraw a workstation certificate it could not deliver
# (``Store.withdraw_workstation``): an exchange's finish signs, then the crypto worker's work is
# tried twice (up to a minute each op, ``nodeagent.cryptoworker``) before the withdrawal; a
# certificate older than this may have been delivered and in use, and is the admin's to revoke.
WITHDRAW_WINDOW = dt.timedelta(minutes=10)
# A workstation's renewals (``tlsroll client renew``: ``Store.issue_workstation`` with
# ``renewal``) are not counted by its node's hourly cap (``workstation_certs_per_hour``, a
# brake on minting certificates: a renewal needs a live certificate of the name, which it
# revokes, so it mints nothing), but by a budget of their own, per name (session 73: one PC's
# ``client renew --force`` in a loop used up its node's cap, and a fleet renewing at one
# minute could meet it; both got other PCs' enrolments 429 for the hour). A renewal of a
# certificate within the last 30 % of its life (``bootstrap_base.RENEWAL_DUE_FRACTION``) is
# never held back: its successor is fresh, so a name renews so once in months. One before
# (``--force``) waits until its certificate is ``FORCED_RENEWAL_EVERY`` old (on the leader's
# clock; RenewedTooSoon, with when); each renewal revokes a certificate, so a loop would grow
# the revocation list every agent is sent. A renewal whose answer was lost is asked again at
# most ``RENEWAL_TRIES`` times in all (the first one counted): after that the password.
FORCED_RENEWAL_EVERY = dt.timedelta(days=1)
RENEWAL_TRIES = 3
_HOUR = dt.timedelta(hours=1)


def hash_secret(secret: str) -> str:
    # The secret has >= 128 bits of entropy, so a fast hash is enough (no dictionary to try).
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Token:
    id: str
    description: str
    created_at: dt.datetime
    expires_at: dt.datetime
    uses_allowed: int
    uses_left: int
    revoked_at: dt.datetime | None
    node_name: str | None  # None: a token of 0.1.0, bound to no node; refused
    addresses: tuple[str, ...]
    dns_names: tuple[str, ...]
    # When an enrolment of its node made it unusable (``supersede_tokens``): every token of a
    # node with a use left is superseded by the node's enrolment (its own included), so a
    # token made before it (a lost or leaked join script) never enrols that node again.
    superseded_at: dt.datetime | None = None
    # What superseded it: "enrolment", or "re-learning" (``Store.relearn``: a restored or
    # reinitialised store learned the node from its agent); "" while not superseded, and in
    # the checks of an enrolment, which do not read the audit for it (``superseded_how``).
    superseded_by: str = ""


@dataclass(frozen=True)
class Node:
    name: str
    addresses: tuple[str, ...]
    dns_names: tuple[str, ...]
    agent_version: str
    agent_port: int
    key_pin: str
    cert_fingerprint: str
    cert_serial: str
    cert_not_after: dt.datetime
    enrolled_at: dt.datetime
    last_heartbeat: dt.datetime | None
    token_id: str = ""
    removed_at: dt.datetime | None = None
    highest_epoch: int = 0
    # The certificate before ``cert_fingerprint``, accepted until the agent uses the new one.
    prev_cert_fingerprint: str = ""
    cert_renewed_at: dt.datetime | None = None
    renewal_due_at: dt.datetime | None = None
    renewal_failing_since: dt.datetime | None = None
    renewal_error: str = ""
    # The certificate on record (``cert_serial``) is revoked (``tlsroll ca revoke``): the
    # leader refuses its agent from that moment, so the node is offline at once, whatever its
    # last heartbeat says (``LeaderState.node_online``).
    cert_revoked: bool = False
    # What its agent implements of the behaviour the leader's requests carry, as its last
    # heartbeat said (``tlsroll.features``; sorted): () from an agent of an earlier release.
    agent_features: tuple[str, ...] = ()


# The revocation reason of the certificates `tlsroll nodes remove` revokes (``remove_node``): a
# served certificate revoked so is the removed machine's, not that of a node enrolled again
# under its name (``leader.expiry.ExpiryWatch.served``).
NODE_REMOVED = "node removed"
# ``Database.cache``'s key of the password live on each node (``SchemaStore.node_auth``): a
# removal and an enrolment forget the node's (``_forget_node_auth``).
NODE_AUTH_CACHE = ("node_auth",)


@dataclass(frozen=True)
class IssuedCert:
    """A certificate the CA issued, as the store records it."""

    serial: str
    kind: str  # node | server | workstation | leader | other
    subject: str
    node: str
    fingerprint: str
    issued_at: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None = None
    revoke_reason: str = ""

    @classmethod
    def of(
        cls, cert: x509.Certificate, kind: str, subject: str, node: str, now: dt.datetime
    ) -> IssuedCert:
        """The record of ``cert``, issued ``now`` (`certs check-expiration` lists its serial,
        `nodes remove` revokes a node's)."""
        from tlsroll import pki  # noqa: PLC0415 - the store itself does not load cryptography

        return cls(
            serial=f"{cert.serial_number:x}",
            kind=kind,
            subject=subject,
            node=node,
            fingerprint=pki.fingerprint(cert),
            issued_at=now,
            not_after=cert.not_valid_after_utc,
        )


EXPIRED_KEPT = dt.timedelta(days=1)
RESTORE_SLACK = dt.timedelta(seconds=5)
"""How much before a backup's time a certificate a restored store re-learns may have been
issued (``Store._renewed_since_backup``)."""
"""How long a revoked certificate stays on the revocation list after it expired: a server
whose clock is behind the leader's still takes it as unexpired that long (review s28 L2)."""
RESTORED_LEADER = "the leader's key is in the backup the store was restored from"
"""The reason a restore records for every leader certificate it revokes (``Store.restore_began``):
the backup holds the key it was issued for, and a backup is a copy of that key."""
UNKNOWN_KEPT = dt.timedelta(days=3650)
"""How long a certificate the store has no record of is taken to live, recorded as it is
revoked (``Store.revoke`` with ``unknown``, ``Store.learn_revoked``): its end is not known."""


@dataclass(frozen=True)
class Restored:
    """What a leader's first start on a store restored from a backup did
    (``Store.restore_began``)."""

    made: dt.datetime  # when the backup was made
    relearn_until: dt.datetime  # the end of the re-learning window
    # The leader certificates it revoked (every one on record not ended: the key served, a
    # backup's, is taken for copied).
    leader_serials: tuple[str, ...] = ()


class Reserved(NamedTuple):
    """The leader's own addresses and DNS names, which no other node may hold, and the name of
    its node (the node on the leader's address), which holds them."""

    ips: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    leader_node: str | None = None


class Revocations(NamedTuple):
    """The revocation list as the store keeps it (``Store.revocations``)."""

    number: int  # moved on by every revocation, and daily (``Store.renew_crl``)
    urgent: int  # the number as of the last revocation the agents must have at once
    entries: list[tuple[str, dt.datetime]]  # (serial, revoked at)
    # When the list got its number (its thisUpdate, ``LeaderState.crl_of``); None: not
    # recorded (a store older than session 33, or no list yet).
    issued: dt.datetime | None = None


@dataclass(frozen=True)
class NodeCert:
    """What the store records of a certificate issued to a node."""

    key_pin: str
    fingerprint: str
    serial: str
    not_after: dt.datetime


HEARTBEAT_PERSIST = dt.timedelta(seconds=30)
"""How stale a node's stored ``last_heartbeat`` may get while its heartbeats say nothing new:
every heartbeat used to be an fsync'd write. The newest one is kept in memory (``_seen``) and
every node this store returns carries it; after a leader restart a node is online again with
its next heartbeat."""


def elapsed() -> float:
    """Seconds on the clock the leader measures how long ago a node was heard by
    (``Store.monotonic``, ``LeaderState.monotonic``): no step of the wall clock moves it, and
    it counts the time the host was suspended (or its VM paused): CLOCK_BOOTTIME where there
    is one (Linux), else ``time.monotonic``. ``time.monotonic`` stands still meanwhile: after
    a two-hour pause a node heard before it was taken for heard seconds ago (the two hours
    looked like a step of the wall clock), online, and its client report fresh, for up to
    the offline bound and ``report_stale_after`` (review 2 of s35, L2)."""
    return clocks.elapsed()


STEP_TOLERANCE = dt.timedelta(seconds=1)
"""How far the leader's clock may move against its monotonic clock before a time kept in
memory counts as measured on a clock since stepped (``Store._then_on_clock_now``): reading both
clocks takes microseconds; a step an NTP client makes is larger."""


@dataclass
class _Seen:
    """A node's newest heartbeat and what its last stored (or queued) one said. ``seen`` is
    when the leader heard it by its clock (what is stored and shown), ``heard`` the same
    moment by ``Store.monotonic``: liveness goes by the time since then, which no step of
    the leader's clock moves (clock audit s35, D)."""

    stored_at: dt.datetime
    said: tuple[object, ...]
    seen: dt.datetime
    heard: float


@dataclass(frozen=True)
class _Record:
    """A heartbeat record queued for the next group commit (``Store.queue_heartbeat``)."""

    agent_version: str
    now: dt.datetime
    highest_epoch: int
    cert_fingerprint: str
    renewal: RenewalReport | None
    features: tuple[str, ...] = ()


_Memory = tuple[tuple[dt.datetime, float] | None, "_Record | None", bool]
"""What memory holds of a node (``Store._memory_locked``): when it was last heard (the time
by the clock then, and by the monotonic clock), its heartbeat record queued or being written,
and whether an open stream vouches for it."""


class Queued(enum.IntEnum):
    """What ``Store.queue_heartbeat`` did with a heartbeat (false: nothing to write)."""

    KEPT = 0  # in memory only (``note_heartbeat``)
    # Queued, saying nothing new: only the stored record's age (``HEARTBEAT_PERSIST``) has it
    # written, which may wait for a later commit (``leader.service.REFRESH_SECONDS``).
    REFRESH = 1
    NEW = 2  # queued, saying something new (or the leader's clock stepped back): soon


MAX_QUEUED_WRITES = 4096  # client reports waiting for the group commit (``queue_write``)
# Reports a node's newest client report is known to repeat (``Store.note_report``), newest
# first kept. The one stored is normally the one just before the newest (while that waits for
# its commit); older ones only while commits fail (a full disk), and a stored report older
# than these is then judged by its own time.
REPEATS_KEPT = 16

QueuedWrite = Callable[[sqlite3.Connection], None]
"""A write of a node's soft state (its client report) queued for the next group commit: run
inside that transaction (``Store.queue_write``)."""


class QueuedCount(Protocol):
    """A count of a node's for the group commit (``Store.queue_count``): those of one node and
    ``key`` are added up in memory (``merged``) until one commit writes their sum."""

    @property
    def key(self) -> str: ...

    def merged(self, later: Self) -> Self:
        """This count and ``later``, one of the same node and key counted after it, as one."""
        ...

    def write(self, db: sqlite3.Connection) -> None:
        """Add it to the store (inside the group commit's transaction)."""
        ...


class _NodesWrite:
    """``Store._nodes_write``: moves ``Store.nodes_generation`` on as the block ends."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        self.store.nodes_generation += 1


class Store(LeaderStore):
    """Enrolled nodes and join tokens (``leader.db.LeaderStore`` has the shared part)."""

    def __init__(
        self, db: Database | Path, *, created: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        """``created``: a new file's first rows, in its first transaction (``relearning``)."""
        super().__init__(db, created=created)
        self._seen: dict[str, _Seen] = {}
        self._seen_lock = threading.Lock()
        # node -> how many of its open heartbeat streams vouch that it is alive now
        # (``vouch``); its last heartbeat is then "now", by ``clock`` (the leader's, set by the
        # service), without a timer moving it on every second.
        self._vouched: dict[str, int] = {}
        # node -> the time its newest client report is stored (or queued) as (``reported_at``),
        # when that was by ``monotonic``, and the times of the reports before it back to the
        # last that said something else (the newest says what each of them said; at most
        # ``REPEATS_KEPT``): ``note_report``, under ``_seen_lock``.
        self._reported: dict[str, tuple[dt.datetime, float, tuple[dt.datetime, ...]]] = {}
        # The nodes whose client report has been committed since this store opened
        # (``report_since_start``), under ``_seen_lock``.
        self._reports_stored: set[str] = set()
        # How many times each name was forgotten (``_forget_seen``: removed, enrolled anew),
        # under ``_seen_lock``: a batch taken before a name was forgotten marks it not.
        self._forgets: dict[str, int] = {}
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
        # The clock no step moves, for the time since a node was heard (``_Seen.heard``; the
        # leader's, set by ``LeaderState``).
        self.monotonic: Callable[[], float] = elapsed
        # When this store opened, by ``monotonic`` (``bind_clocks`` keeps its age): nothing
        # stored before can have come later (``_stored_on_clock_now``).
        self._opened = self.monotonic()
        # ``cap_now`` at ``_cap_mono`` (by ``monotonic``): set as the store opens and as its
        # clocks are bound (``_count_from``).
        self._cap_base, self._cap_mono = self._count_from()
        # The group commit (``write_queued``): heartbeat records and other soft-state writes
        # waiting for it, under ``_seen_lock``.
        self._queued: dict[str, _Record] = {}
        self._queued_writes: list[tuple[str, QueuedWrite]] = []
        # ... and counts added up until then (``queue_count``), by (node, key).
        self._queued_counts: dict[tuple[str, str], QueuedCount] = {}
        # The heartbeat records a group commit (or a direct write) has taken from ``_queued``
        # and not yet committed (a copy): what they say is in neither ``_queued`` nor what a
        # read sees until the commit, and ``_last_heard`` shows them meanwhile. They leave it
        # as their transaction commits, under the database's lock (``Database.after_commit``),
        # and a reader looks at memory inside its read (``get_node``, ``list_nodes``): it sees
        # either the row before the commit and the record here, or the row after it. CI of
        # session 55: the agent pool read a node in that window, without the features its
        # agent's first heartbeat said, at the ``nodes_generation`` that heartbeat had moved
        # on, and refused a transitional rollout's Stage as "too old" until the next nodes
        # write (review rev55d M1, M2; a reader that read the row before a write ended and
        # looked at memory after it read again, at most three times: rev55e L1).
        self._being_written: dict[str, _Record] = {}
        # Held across a batch's take and commit (``write_queued``) and across a direct
        # heartbeat write (``heartbeat``): a batch taken before a direct write must not commit
        # after it, which stored the older record over the newer one, and ``_seen`` then kept
        # the newer one from being written again (review of session 22, L2). Taken before
        # ``_seen_lock``, never inside it.
        self._commit_lock = threading.Lock()
        # Moved on after every write that can change what a node is dialled by or named
        # (enrolment, renewal, removal, re-learning): the agent pool reads a node again only
        # then (``leader.agent_client.AgentPool.get``). ``Database.generation`` moves with
        # every store write (a certificate issued in a stage, one revoked at a node's end),
        # and the pool read the node in a worker thread at almost every step.
        self.nodes_generation = 0
        self._unfit_logged: set[str] = set()  # serials ``_fitting`` left out and logged
        # ``cut_off_nodes``: the revocation list's number and ``nodes_generation`` it was read
        # at, what it was, and ``Database.generation`` then (``cut_off_kept``).
        self._cut_off_kept: tuple[int, int, frozenset[str], int] | None = None
        # What ``revocations_of`` last read: (``Database.generation``, fingerprints, found).
        self._revocations_kept: tuple[int, frozenset[str], dict[str, str]] | None = None

    def _nodes_write(self) -> _NodesWrite:
        """Around a write to the nodes' addresses, names or keys: ``nodes_generation`` moves
        on after it commits (or fails: then a read too many, never one too few)."""
        return _NodesWrite(self)

    def bind_clocks(self, clock: Callable[[], dt.datetime], monotonic: Callable[[], float]) -> None:
        """Judge times by ``clock`` (the leader's) and ``monotonic`` from now on; the time
        since this store opened stays what it was; ``cap_now`` starts again from ``clock``
        (``_count_from``)."""
        age = self.monotonic() - self._opened
        self.clock, self.monotonic = clock, monotonic
        self._opened = monotonic() - age
        self._cap_base, self._cap_mono = self._count_from()

    def cap_now(self) -> dt.datetime:
        """Now on the clock the hourly certificate caps count by (``_check_hourly_certs``;
        a certificate's ``counted_at``): the leader's clock as this store opened (as its
        clocks were bound), moved on by ``monotonic`` since (``_count_from``). No step of the
        wall clock moves it, and it never goes back behind a certificate it counted, not
        across a restart either (one counted later than the clock is moved back then).

        The caps counted by ``issued_at`` on the wall clock: a step forward lifted them (what
        was issued before counted no more), a step back of a day locked a node that had just
        renewed out of renewing, replaying its enrolment and signing workstation
        certificates for that day (clock audit s35, J). Now a certificate counts for an hour
        of elapsed time, and one counted "later" than a restarted leader's clock (stepped
        back while it was down) for at most an hour after the start. A leader restarted
        after a step forward counts what was issued before by the clock, as it did."""
        return self._cap_base + dt.timedelta(seconds=self.monotonic() - self._cap_mono)

    def _count_from(self) -> tuple[dt.datetime, float]:
        """Where ``cap_now`` starts, by ``clock`` and ``monotonic`` now (as the store opens,
        and as its clocks are bound: the leader's service binds them before it records
        anything): the clock. If the latest ``counted_at`` on record is later than the clock
        (a leader that started with its clock ahead counted by it; its clock was corrected,
        or stepped back while it was down), every ``counted_at`` later than an hour before the
        clock is moved back by that lead first: the certificates of the hour before the latest
        one count for the hour after the start as they did, those before it count no more,
        and no lead outlives that hour (review s36 F5: taking the latest ``counted_at`` as
        ``cap_now`` kept the lead for good, and every restart counted the last hour again,
        whatever the downtime)."""
        now = self.clock()
        with self._db.read() as conn:
            (counted,) = conn.execute("SELECT MAX(counted_at) FROM certificates").fetchone()
        latest = from_text(counted)
        if latest is not None and latest > now:
            self._rebase_counted(now)
        return now, self.monotonic()

    def _rebase_counted(self, now: dt.datetime) -> None:
        """Move every ``counted_at`` later than an hour before ``now`` back by the lead of the
        latest one over ``now`` (``_count_from``), keeping their order and spacing."""
        since = to_text(now - dt.timedelta(hours=1))
        with self._db.tx() as db:
            (counted,) = db.execute("SELECT MAX(counted_at) FROM certificates").fetchone()
            latest = from_text(counted)
            if latest is None or latest <= now:
                return
            lead = latest - now
            rows = db.execute(
                "SELECT seq, counted_at FROM certificates WHERE counted_at > ?", (since,)
            ).fetchall()
            db.executemany(
                "UPDATE certificates SET counted_at = ? WHERE seq = ?",
                [(to_text(dt.datetime.fromisoformat(c) - lead), seq) for seq, c in rows],
            )
        log.warning(
            "certs.cap_clock_rebased",
            ahead_seconds=round(lead.total_seconds()),
            certificates=len(rows),
            hint="the leader's clock went back: the certificates counted for the hourly "
            "workstation cap were moved back with it; check the leader's clock "
            "(timedatectl)",
        )

    def _forget_seen(self, name: str) -> None:
        with self._seen_lock:
            self._seen.pop(name, None)
            self._reported.pop(name, None)
            self._reports_stored.discard(name)
            self._forgets[name] = self._forgets.get(name, 0) + 1
            self._queued.pop(name, None)
            self._being_written.pop(name, None)
            self._queued_writes = [(n, w) for n, w in self._queued_writes if n != name]
            self._queued_counts = {k: c for k, c in self._queued_counts.items() if k[0] != name}

    def _heard(self, at: dt.datetime) -> float:
        """``at``, a time by ``clock`` (now, or a moment ago), by ``monotonic``: converted by
        its age."""
        return self.monotonic() - (self.clock() - at).total_seconds()

    def _then_on_clock_now(self, then: dt.datetime, heard: float) -> dt.datetime:
        """When ``seen``'s heartbeat came, by the leader's clock as it runs now: the time
        recorded then, unless the clock stepped since (by more than ``STEP_TOLERANCE``): then
        now less the time since, by the monotonic clock. Before, a node heard just before
        the clock stepped back by an hour, and then silent, showed online for that hour (in
        the schema, the viewer, ``tlsroll_node_online`` and a rollout's plan), and a step
        forward made a live node offline until its next message (clock audit s35, D)."""
        now = self.clock()
        since = dt.timedelta(seconds=self.monotonic() - heard)
        if abs(now - then - since) <= STEP_TOLERANCE:
            return then
        return now - since

    def _stored_on_clock_now(self, stored: dt.datetime) -> dt.datetime:
        """A time stored before this store opened (a node's last heartbeat, a client report
        this store did not note), on the leader's clock as it runs now: as stored, unless it
        is later than now (the clock stepped back since the node was heard; or the leader
        started with its clock behind, before NTP set it). It was heard before this store
        opened: it is then when the store opened, on the clock as it runs now, and ages from
        there by the monotonic clock. Before, a restart judged it by the clock again: a node
        that died just before the clock stepped back an hour showed online again for that
        hour, and its client report was fresh (review 2 of s35, M1)."""
        now = self.clock()
        if stored <= now:
            return stored
        return now - dt.timedelta(seconds=max(0.0, self.monotonic() - self._opened))

    def _memory_locked(self, name: str) -> _Memory:
        """(Under ``_seen_lock``.) What memory holds of node ``name`` for ``_last_heard``: a
        copy, so that it can be looked at once the lock is let go."""
        seen = self._seen.get(name)
        return (
            (seen.seen, seen.heard) if seen is not None else None,
            self._queued.get(name) or self._being_written.get(name),
            self._vouched.get(name, 0) > 0,
        )

    def _memory(self, names: Iterable[str]) -> list[_Memory]:
        """``_memory_locked`` of each of ``names``, under one hold of ``_seen_lock``: taken by
        a reader inside its database read (``get_node``, ``list_nodes``), its rows parsed
        and the nodes made after the read (holding the database's lock for those, at 500
        nodes, made every writer wait about 5 ms more: review rev56a L1)."""
        with self._seen_lock:
            return [self._memory_locked(name) for name in names]

    def _with_seen(self, node: Node, memory: _Memory | None = None) -> Node:
        """``node`` with its newest heartbeat, stored or not, and what a heartbeat record
        still queued for the group commit says (as if it were written). A node heard since
        this store opened has it from memory (``_then_on_clock_now``): on the leader's clock as it
        runs now, so that everyone who judges it by that clock (``LeaderState.online``, the
        viewer, a plan's offline grace) judges the time since it was heard. Otherwise the
        stored time (after a restart), no later than when this store opened
        (``_stored_on_clock_now``). ``memory``: what ``_memory`` took of it (else looked at
        now)."""
        last, record = self._last_heard(node, memory)
        if record is not None:
            renewal = record.renewal
            node = replace(
                node,
                agent_version=record.agent_version,
                agent_features=record.features,
                highest_epoch=max(node.highest_epoch, record.highest_epoch),
                renewal_due_at=renewal.due_at if renewal else node.renewal_due_at,
                renewal_failing_since=renewal.failing_since
                if renewal
                else node.renewal_failing_since,
                renewal_error=renewal.error if renewal else node.renewal_error,
            )
        if node.last_heartbeat == last:
            return node
        return replace(node, last_heartbeat=last)

    def _last_heard(
        self, node: Node, memory: _Memory | None = None
    ) -> tuple[dt.datetime | None, _Record | None]:
        """When ``node`` was last heard as ``_with_seen`` gives it, and the heartbeat record
        still queued for it (None: none, or the node is removed)."""
        if memory is None:
            with self._seen_lock:
                memory = self._memory_locked(node.name)
        seen, record, vouched = memory
        if node.removed_at is not None:
            return node.last_heartbeat, None
        if seen is None:
            if node.last_heartbeat is None:
                return None, None
            return self._stored_on_clock_now(node.last_heartbeat), None
        # What is known in memory is the newest: every message sets it (a message still
        # queued too), ``heard_until`` only moves it on. (A stream that ended after another
        # one's newer message, still queued, once took it back below that message: the node
        # showed offline until the group commit; a rollout started then was refused.) An open
        # stream that vouches for the node: alive now.
        return (self.clock() if vouched else self._then_on_clock_now(*seen)), record

    def last_heard(self, name: str) -> tuple[bool, dt.datetime | None]:
        """When node ``name`` was last heard as ``get_node`` gives it, from memory alone (no
        read of the database): (True, when) for a node heard since this store opened, else
        (False, None), and the caller reads the node. A removed node is forgotten in memory
        (``_forget_seen``): (False, None). The engine looks at a waiting step's agent every
        1-2.5 s (``leader.engine._Silence``) for this one value (review of s60, L3)."""
        with self._seen_lock:
            seen, _record, vouched = self._memory_locked(name)
        if seen is None:
            return False, None
        return True, (self.clock() if vouched else self._then_on_clock_now(*seen))

    def features_heard(self, name: str) -> tuple[str, ...] | None:
        """What node ``name``'s agent said it implements (``Node.agent_features``) in its
        newest heartbeat since this store opened, from memory alone; None if it has not been
        heard since. What the store holds of an agent not heard since is a former leader
        process's, and may be older than the agent: the group commit that held its first
        heartbeat's features (``write_queued``: up to a batch period) is lost with a killed
        leader, and the row still says none (review s63 faults, M1). The agent pool sends by
        this (``leader.agent_client.AgentClient._sendable``)."""
        with self._seen_lock:
            record = self._queued.get(name) or self._being_written.get(name)
            if record is not None:
                return record.features
            seen = self._seen.get(name)
        if seen is None:
            return None
        said = seen.said[-1]  # (``heartbeat``'s ``said``: the features last)
        assert isinstance(said, tuple)
        return tuple(str(f) for f in said)

    # --- tokens -------------------------------------------------------------------------------

    def add_token(
        self,
        token_id: str,
        secret: str,
        *,
        ttl: dt.timedelta,
        uses: int,
        description: str,
        now: dt.datetime,
        actor: str,
        node_name: str,
        addresses: tuple[str, ...],
        dns_names: tuple[str, ...] = (),
        reserved: Callable[[], Reserved] = Reserved,
    ) -> Token:
        """Record a token that can enrol node ``node_name`` with exactly these addresses and
        DNS names. ``reserved`` gives the leader's own addresses and DNS names; NameTaken if
        the leader or another node holds one of them."""
        with self._db.tx() as db:
            _check_free(db, node_name, addresses, dns_names, reserved())
            db.execute(
                "INSERT INTO tokens (id, secret_hash, description, created_at, expires_at,"
                " uses_allowed, uses_left, node_name, addresses, dns_names)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    token_id,
                    hash_secret(secret),
                    description,
                    to_text(now),
                    to_text(now + ttl),
                    uses,
                    uses,
                    node_name,
                    json.dumps(list(addresses)),
                    json.dumps(list(dns_names)),
                ),
            )
            self._audit(
                db,
                now,
                actor,
                "token.created",
                token_id,
                uses=uses,
                expires_at=to_text(now + ttl),
                node=node_name,
                addresses=list(addresses),
                dns_names=list(dns_names),
            )
        return self.get_token(token_id)

    def get_token(self, token_id: str) -> Token:
        with self._db.read() as db:
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"no join token with id {shown(token_id)}")
            return superseded_how(db, [_token(row)])[0]

    def list_tokens(self) -> list[Token]:
        """Every token, with what superseded each (one read of the audit for all of them,
        ``superseded_how``)."""
        with self._db.read() as db:
            rows = db.execute("SELECT * FROM tokens ORDER BY created_at, id").fetchall()
            return superseded_how(db, [_token(r) for r in rows])

    def revoke_token(self, token_id: str, *, now: dt.datetime, actor: str) -> Token:
        with self._db.tx() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (to_text(now), token_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no join token with id {shown(token_id)}")
            self._audit(db, now, actor, "token.revoked", token_id)
        return self.get_token(token_id)

    # --- enrolment ----------------------------------------------------------------------------

    def enrol(
        self,
        *,
        token_id: str,
        secret: str,
        name: str,
        addresses: tuple[str, ...],
        dns_names: tuple[str, ...],
        agent_version: str,
        agent_port: int,
        key_pin: str,
        issue: Callable[[], NodeCert],
        now: dt.datetime,
        reserved: Callable[[], Reserved] = Reserved,
    ) -> NodeCert:
        """Spend one use of a join token and record the node, all in one transaction.

        The token must name this node and exactly these addresses and DNS names, and none of
        them may be held by the leader (``reserved``) or another node. ``issue`` is called (to
        sign the certificate) only once all of that checks out; if anything fails, nothing is
        written (nor forgotten: a queued heartbeat of the node stays).

        A replay spends no use (``_replay``): the same key enrolling again by the token that
        enrolled it, for a node not removed that has not been heard from since (the answer to
        the first call was lost: the agent was killed before it wrote the certificate, or its
        deadline passed while this transaction committed). It gets a new certificate of the
        same key and names, within the node's certificates per hour; nothing else changes.

        The key of a node whose certificate the admin revoked (``tlsroll ca revoke``) is
        refused by any token: ``nodes remove`` and a new key is the way back (a new key alone
        is NameTaken while the node is on record). So is, under any name, a key any revoked
        node certificate carries, the key of a removed node, and the key of another node on
        record (``_key_refused``, review rev-enrol H1: a copied key got back in by a new
        token after ``nodes remove``, or at once by a token for another name).

        An enrolment supersedes every token of the node with a use left, its own included
        (``supersede_tokens``): a token made before it never enrols the node again, whatever
        the key (a fresh one is not taken for the node's, the node's own is not certified
        again behind its agent's back). Re-enrolling takes a token made after it.
        """
        # A wrong secret, or a token refused as it stands (revoked, expired, used up,
        # superseded), never takes the write lock: the same checks in a read first.
        with self._db.read() as db:
            self._usable_token(db, token_id, secret, name, key_pin, now)
        with self._nodes_write(), self._db.tx() as db:
            # Again under the write lock: an enrolment or a revocation may have committed since.
            token, existing, replay = self._usable_token(db, token_id, secret, name, key_pin, now)
            if token.node_name is None:
                raise TokenRejected(
                    "join token names no node (made by an older tlsroll); create a new one "
                    "with `tlsroll token create --node NAME --address IP`"
                )
            bound = (token.node_name, token.addresses, token.dns_names)
            if bound != (name, tuple(addresses), tuple(dns_names)):
                raise TokenRejected(
                    f"join token is for node {token.node_name!r} with "
                    f"{', '.join(token.addresses + token.dns_names)}; this node asked for "
                    f"{name!r} with {', '.join(addresses + dns_names) or 'no names'}"
                )
            if existing is not None and existing["key_pin"] != key_pin:
                raise NameTaken(
                    f"node name {name!r} is already enrolled with another key; "
                    f"remove the old node first: tlsroll nodes remove {name}"
                )
            if existing is not None and _revoked(db, existing["cert_serial"]):
                # Same key (not NameTaken): whoever holds a copied key and a token with a use
                # left must not undo `ca revoke` (review 1 of s34, M2).
                raise TokenRejected(
                    f"this key's certificate was revoked (tlsroll ca revoke): {NEW_KEY}, "
                    f"once it is removed: tlsroll nodes remove {name}"
                )
            if refused := _key_refused(db, name, key_pin):
                raise TokenRejected(refused)
            _check_free(db, name, addresses, dns_names, reserved())
            if replay and existing is not None:
                return self._enrol_again(db, existing, agent_version, agent_port, issue, now)
            # Enrolled anew: no heartbeat yet. Once committed (under the lock, before any reader
            # sees the row): an enrolment that fails (the CA refuses, a full disk) forgets
            # nothing of a node enrolled (review rev56a, pre-existing).
            self._db.after_commit(lambda: self._forget_seen(name))
            cert = issue()
            # A removed row's key goes on record with its certificate before the row takes the
            # new one: it stays refused (``_key_refused``) once the row no longer holds it.
            _stamp_row_keys(db, name)
            # No password runs on a node enrolled anew (one a removal before session 69 left
            # recorded for the name: ``remove_node``).
            self._forget_node_auth(db, name)
            db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?", (token_id,))
            db.execute(
                "INSERT INTO nodes (name, addresses, dns_names, agent_version, agent_port,"
                " key_pin, cert_fingerprint, cert_serial, cert_not_after, enrolled_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET addresses=excluded.addresses,"
                " dns_names=excluded.dns_names, agent_version=excluded.agent_version,"
                " agent_port=excluded.agent_port, cert_fingerprint=excluded.cert_fingerprint,"
                " cert_serial=excluded.cert_serial, cert_not_after=excluded.cert_not_after,"
                " key_pin=excluded.key_pin, enrolled_at=excluded.enrolled_at,"
                " removed_at=NULL, last_heartbeat=NULL, highest_epoch=0,"
                " cert_renewed_at=NULL, prev_cert_fingerprint=''",
                (
                    name,
                    json.dumps(list(addresses)),
                    json.dumps(list(dns_names)),
                    agent_version,
                    agent_port,
                    key_pin,
                    cert.fingerprint,
                    cert.serial,
                    to_text(cert.not_after),
                    to_text(now),
                ),
            )
            db.execute("UPDATE nodes SET token_id = ? WHERE name = ?", (token_id, name))
            # A node enrolled again with its key on record (its certificate ended): the new
            # certificate is of that key, so a revocation of the one before (the key copied)
            # takes it too (``lineage_in``).
            _record_node_cert(
                db,
                name,
                cert,
                now,
                self.cap_now(),
                issued_from=None if existing is None else existing["cert_serial"],
            )
            superseded = supersede_tokens(db, name, now)
            self._audit(
                db,
                now,
                f"node:{name}",
                "node.enrolled",
                name,
                token_id=token_id,
                addresses=list(addresses),
                cert_fingerprint=cert.fingerprint,
                reenrolment=existing is not None,
                superseded_tokens=superseded,
            )
        return cert

    def _replay(
        self, db: sqlite3.Connection, node: sqlite3.Row | None, token_id: str, key_pin: str
    ) -> bool:
        """Whether an enrolment is a replay of the one that recorded ``node`` (the row of its
        name, not removed): the same key by the same token, and the node not heard from
        since (no heartbeat stored or in memory, no renewal), so its agent cannot have had
        the certificate. Anyone else is refused as before: another key is NameTaken, another
        token (or this one for a node re-learned or enrolled by another) spends a use.

        Never when the admin revoked the node's certificate on record (``tlsroll ca revoke``)
        or it is not on record at all: a revocation is undone by a new enrolment only, by a
        token the admin gives (review s34 M1: whoever held a copied key and token got a new,
        unrevoked certificate). A re-enrolment (``enrol``'s UPSERT) clears the renewal of the
        node's earlier life, so its own lost answer can be replayed (review s34 L4)."""
        if node is None or node["key_pin"] != key_pin or node["token_id"] != token_id:
            return False
        if node["last_heartbeat"] is not None or node["cert_renewed_at"] is not None:
            return False
        cert = db.execute(
            "SELECT revoked_at FROM certificates WHERE serial = ?", (node["cert_serial"],)
        ).fetchone()
        if cert is None or cert["revoked_at"] is not None:
            return False
        with self._seen_lock:
            return node["name"] not in self._seen and node["name"] not in self._queued

    def _enrol_again(
        self,
        db: sqlite3.Connection,
        node: sqlite3.Row,
        agent_version: str,
        agent_port: int,
        issue: Callable[[], NodeCert],
        now: dt.datetime,
    ) -> NodeCert:
        """A replayed enrolment (``_replay``), inside its transaction: a new certificate of the
        same key and names, counted in ``NODE_CERTS_PER_HOUR``, and no use of the token spent.
        The one the first call issued stays accepted as the one before it until the agent
        has used the new one (as a renewal's); the agent's version and port are its own."""
        name = node["name"]
        counted_at = self.cap_now()
        _check_hourly_certs(db, name, counted_at)
        cert = issue()
        db.execute(
            "UPDATE nodes SET cert_fingerprint = ?, cert_serial = ?, cert_not_after = ?,"
            " prev_cert_fingerprint = ?, agent_version = ?, agent_port = ? WHERE name = ?",
            (
                cert.fingerprint,
                cert.serial,
                to_text(cert.not_after),
                node["cert_fingerprint"],
                agent_version,
                agent_port,
                name,
            ),
        )
        # (Of the same key as the first: a revocation of that one takes it too, ``lineage_in``.)
        _record_node_cert(db, name, cert, now, counted_at, issued_from=node["cert_serial"])
        self._audit(
            db,
            now,
            f"node:{name}",
            "node.enrolment_replayed",
            name,
            token_id=node["token_id"],
            serial=cert.serial,
            cert_fingerprint=cert.fingerprint,
            previous=node["cert_serial"],
        )
        return cert

    # --- nodes --------------------------------------------------------------------------------

    def _usable_token(
        self,
        db: sqlite3.Connection,
        token_id: str,
        secret: str,
        name: str,
        key_pin: str,
        now: dt.datetime,
    ) -> tuple[Token, sqlite3.Row | None, bool]:
        """``enrol``'s checks of the token itself, each refusal a TokenRejected: the secret,
        then revoked, expired, used up, superseded (but a replay, ``_replay``, of the
        enrolment that used it up or superseded it is let through). Run in a read first, so
        that a stream of guesses or of stale tokens at the join port never queues behind (or
        holds) the store's write lock, then again inside the write transaction, with the same
        words. Returns the token, the node's row of that name (not removed) and whether
        this is a replay."""
        row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        # Compare even when the id is unknown, so both cases take the same time.
        expected = row["secret_hash"] if row else hash_secret("x" * 26)
        if not hmac.compare_digest(expected, hash_secret(secret)) or row is None:
            raise WrongSecret(f"join token not valid; {WAY_TO_JOIN_AGAIN}")
        token = _token(row)
        if token.revoked_at is not None:
            raise TokenRejected(_revoked_text(db, token))
        if now >= token.expires_at:
            raise TokenRejected(f"join token expired; {WAY_TO_JOIN_AGAIN}")
        existing = db.execute(
            "SELECT * FROM nodes WHERE name = ? AND removed_at IS NULL", (name,)
        ).fetchone()
        replay = self._replay(db, existing, token_id, key_pin)
        if token.uses_left <= 0 and not replay:
            raise TokenRejected(f"join token already used up; {WAY_TO_JOIN_AGAIN}")
        if token.superseded_at is not None and not replay:
            # (A replay is the enrolment that superseded it, answered again.) What superseded
            # it is read from the audit only here: refusing a token whose secret was right.
            raise TokenRejected(superseded_text(superseded_how(db, [token])[0]))
        return token, existing, replay

    def list_nodes(self, *, include_removed: bool = False) -> list[Node]:
        with self._db.read() as db:  # memory looked at inside the read (``_being_written``)
            rows = self.node_rows(db, include_removed=include_removed)
            memory = self._memory(r["name"] for r in rows)
        return self.nodes_of(rows, memory)

    @staticmethod
    def node_rows(db: sqlite3.Connection, *, include_removed: bool = False) -> list[sqlite3.Row]:
        """``list_nodes``' read, inside a read already held (``SchemaStore.shown``)."""
        where = "" if include_removed else " WHERE removed_at IS NULL"
        return db.execute(f"{_NODES}{where} ORDER BY name").fetchall()

    def nodes_of(self, rows: Sequence[sqlite3.Row], memory: Sequence[_Memory]) -> list[Node]:
        """The nodes of ``node_rows``' rows, with their heartbeats as ``list_nodes`` gives them,
        by ``memory`` (``_memory`` of the rows' names, taken inside the read that read them: a
        heartbeat write that commits after it is then still shown, ``_being_written``)."""
        return [self._with_seen(_node(r), m) for r, m in zip(rows, memory, strict=True)]

    def heard_of(
        self, rows: Sequence[sqlite3.Row], made: tuple[NodesMade, NodesMade]
    ) -> list[tuple[Node, dt.datetime | None]]:
        """For a caller that needs of each node its record and when it was last heard only
        (the viewer's live page): each node of ``node_rows``' rows as its row has it (not
        what a queued heartbeat record says), with its last heartbeat as ``nodes_of`` gives
        it. ``made``: (the nodes the last call made, where this call puts its own), by their
        rows' values: a row read again unchanged is not parsed again, and no node is made
        anew for its heartbeat (an open heartbeat stream vouches for its node: heard "now" at
        every read). The viewer reads every enrolled node after each write of a rollout: at
        500 nodes that parsing and making was two thirds of its read (issue 15). Nodes are
        frozen: sharing one is safe."""
        before, now = made
        heard = []
        for r in rows:
            key = tuple(r)
            node = before.get(key)
            if node is None:
                node = _node(r)
            now[key] = node
            heard.append((node, self._last_heard(node)[0]))
        return heard

    def get_node(self, name: str) -> Node:
        with self._db.read() as db:  # memory looked at inside the read (``_being_written``)
            row = db.execute(f"{_NODES} WHERE name = ? AND removed_at IS NULL", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no enrolled node named {shown(name)}")
            memory = self._memory([name])[0]
        return self._with_seen(_node(row), memory)

    def heartbeat(
        self,
        name: str,
        agent_version: str,
        *,
        now: dt.datetime,
        highest_epoch: int = 0,
        cert_fingerprint: str = "",
        renewal: RenewalReport | None = None,
        features: tuple[str, ...] = (),
    ) -> None:
        """Record a heartbeat. A heartbeat with the certificate on record (``cert_fingerprint``)
        shows the agent has switched to it: the one before it is accepted no more. Written
        only when it says something new or the stored one is ``HEARTBEAT_PERSIST`` old;
        otherwise kept in memory (see ``HEARTBEAT_PERSIST``)."""
        if self.note_heartbeat(
            name,
            agent_version,
            now=now,
            highest_epoch=highest_epoch,
            cert_fingerprint=cert_fingerprint,
            renewal=renewal,
            features=features,
        ):
            return
        said = (agent_version, highest_epoch, cert_fingerprint, renewal, features)
        record = _Record(agent_version, now, highest_epoch, cert_fingerprint, renewal, features)
        with self._commit_lock:  # after any batch already taken, before the next
            with self._seen_lock:
                popped = self._queued.pop(name, None)  # this write is newer and whole
                forgets = self._forgets.get(name, 0)
                self._being_written = {name: record}  # (shown until written: rev55d M2)

            committed: list[bool] = []

            def written(wrote: bool) -> None:
                # Committed, under the database's lock: no reader sees the row without this.
                committed.append(True)
                with self._seen_lock:
                    self._being_written = {}
                    if wrote and self._forgets.get(name, 0) == forgets:
                        self._features_seen(name, features)
                        heard = self._heard(now)
                        self._seen[name] = _Seen(stored_at=now, said=said, seen=now, heard=heard)

            try:
                self._write_heartbeat(name, record, written)
            except BaseException:
                with self._seen_lock:
                    # What was queued is queued again (as a batch's records are): lost, the
                    # node showed what its row held until the next write said something new
                    # (review rev55e M2). Not once this write has committed (something after
                    # its commit failed): the older record would go over it (rev56a L4).
                    if (
                        popped is not None
                        and not committed
                        and self._forgets.get(name, 0) == forgets
                    ):
                        self._queued.setdefault(name, popped)
                    self._being_written = {}
                raise

    def queue_heartbeat(
        self,
        name: str,
        agent_version: str,
        *,
        now: dt.datetime,
        highest_epoch: int = 0,
        cert_fingerprint: str = "",
        renewal: RenewalReport | None = None,
        features: tuple[str, ...] = (),
    ) -> Queued:
        """``heartbeat`` for the group commit: kept in memory if that is all it takes
        (``Queued.KEPT``, false), else queued for ``write_queued``, and every node this store
        returns shows it at once: ``Queued.REFRESH`` if it says what the stored one said (only
        that one's age has it written), else ``Queued.NEW``. In memory only, so the event loop
        may call it without a worker thread.

        Not for a heartbeat that uses a renewed certificate for the first time
        (``prev_cert_fingerprint`` set): that one must be written at once (``heartbeat``), as
        the certificate before is accepted until it is; a queued one would leave it accepted
        for up to a batch period more."""
        if self.note_heartbeat(
            name,
            agent_version,
            now=now,
            highest_epoch=highest_epoch,
            cert_fingerprint=cert_fingerprint,
            renewal=renewal,
            features=features,
        ):
            return Queued.KEPT
        said = (agent_version, highest_epoch, cert_fingerprint, renewal, features)
        record = _Record(agent_version, now, highest_epoch, cert_fingerprint, renewal, features)
        with self._seen_lock:
            seen = self._seen.get(name)
            # (One queued before that said something new keeps its commit soon: the group
            # commit's time only ever comes sooner, ``LeaderService._start_writer``.)
            refresh = seen is not None and seen.said == said and now >= seen.stored_at
            self._queued[name] = record  # the newest is whole: it replaces one still queued
            self._features_seen(name, features)
            self._seen[name] = _Seen(stored_at=now, said=said, seen=now, heard=self._heard(now))
        return Queued.REFRESH if refresh else Queued.NEW

    def _features_seen(self, name: str, features: tuple[str, ...]) -> None:
        """(Under ``_seen_lock``, before ``_seen`` has the new heartbeat.) Node ``name``'s
        agent reports ``features``: if that is not what this store last heard from it (its
        agent was upgraded or replaced; or the first heartbeat since the store opened),
        ``nodes_generation`` moves on, so that the agent pool reads the node again and sends
        by what the agent implements now (``leader.agent_client``), not by what it read
        before the upgrade."""
        seen = self._seen.get(name)
        if seen is None or seen.said[-1] != features:
            self.nodes_generation += 1

    def queue_write(self, name: str, write: QueuedWrite) -> None:
        """Queue ``write`` (node ``name``'s client report) for the next group commit; writes
        are made in the order they were queued. While commits fail (a full disk), at most
        ``MAX_QUEUED_WRITES`` wait: the oldest go first (each is a report the next one of
        its node mostly repeats)."""
        with self._seen_lock:
            self._queued_writes.append((name, write))
            if len(self._queued_writes) > MAX_QUEUED_WRITES:
                del self._queued_writes[: len(self._queued_writes) - MAX_QUEUED_WRITES]

    def queue_count(self, name: str, count: QueuedCount) -> None:
        """Add ``count`` (node ``name``'s: PCs refused a certificate over its hour's cap,
        ``schema_store.CapRefusals``) to what the next group commit writes: added up in memory
        with those of the node and its key counted since the last commit, so that a flood of
        them (an agent key stolen, asking on) costs the store no write each, and a commit that
        fails (a full disk: the group commit tells the store's health) keeps them added up for
        the next one. Bounded: one per node and key."""
        with self._seen_lock:
            key = (name, count.key)
            before = self._queued_counts.get(key)
            self._queued_counts[key] = count if before is None else before.merged(count)

    def queued(self) -> int:
        """How many writes wait for the group commit."""
        with self._seen_lock:
            return len(self._queued) + len(self._queued_writes) + len(self._queued_counts)

    def write_queued(self) -> int:
        """The group commit (worker thread): every queued heartbeat record and client report,
        of all nodes, in one transaction, one fsync (each was one fsync'd transaction of its
        own before: ~30 % of the leader's heartbeat time). Returns how many writes it made.

        What a crash can lose: the last batch period (``leader.service.BATCH_SECONDS``, a
        second) of this soft state, and of writes that say nothing new (``Queued.REFRESH``, a
        client report whose times and counts alone moved) the last
        ``leader.service.REFRESH_SECONDS``, never more: nodes' last-seen times, agent versions
        and renewal reports, and client reports (a restarted leader trusts none stored before
        it started: ``report_since_start``). That is safe because none of it is a decision:
        online/offline derives from it (kept in memory anyway, and lost at any restart), and
        after a restart each agent reconnects and its first message is recorded again (the
        leader remembers nothing of what it said: ``_seen`` is empty). A client report lost
        makes the stored one older, which the planner reads as less known, never as quieter
        (``planner.report_stale_after``). Nothing of a rollout (steps, outcomes, plans,
        "persist before send") and nothing of security (a certificate switch, revocation,
        the wrong passwords the agents report) is ever queued here. The counts of PCs the
        leader refused over a node's hourly cap are (``queue_count``): the refusals stand
        whatever is stored, the log has each, and a crash loses at most that last second of
        the count shown. If the transaction fails, what it held is queued again (a newer
        record of the same node wins; counts are added up) and the next call retries."""
        with self._commit_lock:  # a direct heartbeat write waits for this batch, whole
            return self._write_batch()

    def _write_batch(self) -> int:
        """``write_queued``'s take and commit, under ``_commit_lock``."""
        with self._seen_lock:
            records, self._queued = self._queued, {}
            writes, self._queued_writes = self._queued_writes, []
            counts, self._queued_counts = self._queued_counts, {}
            forgets = dict(self._forgets)
            self._being_written = dict(records)
        if not records and not writes and not counts:
            return 0

        def still(name: str) -> bool:
            """Node ``name`` is not forgotten (removed, enrolled again) since the take."""
            return self._forgets.get(name, 0) == forgets.get(name, 0)

        def removed(db: sqlite3.Connection, name: str) -> bool:
            """Node ``name`` is removed, as this transaction reads it."""
            found = db.execute(
                "SELECT 1 FROM nodes WHERE name = ? AND removed_at IS NOT NULL", (name,)
            ).fetchone()
            return found is not None

        done: list[bool] = []

        def committed() -> None:
            done.append(True)
            # Under the database's lock, as the commit is visible (a read that begins now sees
            # them): no reader sees the rows without the records or the records' end without
            # the rows. From now on these nodes' stored reports are this leader's (not a name
            # forgotten since the batch was taken), in the same section, so that no reader sees
            # the report and not that it is this leader's (review rev55d L1).
            with self._seen_lock:
                self._being_written = {}
                self._reports_stored.update(name for name, _write in writes if still(name))

        switched = False
        try:
            with self._db.tx(routine=True) as db:
                for name, r in records.items():
                    if still(name):  # else removed (or enrolled again) since: not its life
                        # (Not written, ``_heartbeat_sql``'s first answer, if its certificate
                        # is no longer the row's: renewed twice since it came; that one is
                        # refused from then on, and the agent's next message says otherwise.)
                        switched |= self._heartbeat_sql(db, name, r)[1]
                for name, write in writes:
                    # Not for a node removed since it was queued (``remove_node`` forgets its
                    # queued writes only after its own transaction: a batch taken before then
                    # put the removed node's client rows back, and a node enrolled again under
                    # the name inherited its workstations: review rev55e L2), nor for one
                    # removed and enrolled again since (its forget count moved: the new
                    # enrolment's rows are not the old agent's report).
                    if still(name) and not removed(db, name):
                        write(db)
                for (name, _key), count in counts.items():
                    if still(name) and not removed(db, name):  # (as a queued write)
                        count.write(db)
                self._db.after_commit(committed)
        except BaseException:
            with self._seen_lock:
                if not done:  # (committed, and something after it failed: they are stored)
                    for name, r in records.items():
                        if still(name):
                            self._queued.setdefault(name, r)
                    self._queued_writes[:0] = writes
                    for key, count in counts.items():  # counted before those counted since
                        if still(key[0]):
                            since = self._queued_counts.get(key)
                            self._queued_counts[key] = (
                                count if since is None else count.merged(since)
                            )
                self._being_written = {}
            raise
        if switched:  # the certificate before is accepted no more: not routine
            self._db.touch()
        return len(records) + len(writes) + len(counts)

    def note_heartbeat(
        self,
        name: str,
        agent_version: str,
        *,
        now: dt.datetime,
        highest_epoch: int = 0,
        cert_fingerprint: str = "",
        renewal: RenewalReport | None = None,
        features: tuple[str, ...] = (),
    ) -> bool:
        """Record a heartbeat in memory if that is all it takes (it says nothing new and the
        stored one is recent): True. False: ``heartbeat`` has to write it. In memory only, so
        the event loop may call it without a worker thread."""
        said = (agent_version, highest_epoch, cert_fingerprint, renewal, features)
        heard = self._heard(now)
        with self._seen_lock:
            seen = self._seen.get(name)
            # A stored time later than now (the leader's clock stepped back since) is written
            # again at once, as ``LeaderService._record_clients`` does: the first look after
            # a restart then goes by this one. Before, nothing was written for the length of
            # the step (clock audit s35, D).
            if (
                seen is not None
                and seen.said == said
                and dt.timedelta(0) <= now - seen.stored_at < HEARTBEAT_PERSIST
            ):
                if heard >= seen.heard:
                    seen.seen, seen.heard = now, heard
                return True
        return False

    def note_report(self, name: str, at: dt.datetime, *, repeats: bool = False) -> None:
        """Node ``name``'s client report is stored (or queued) as of ``at`` (its
        ``reported_at``), by the leader's clock now (``report_on_clock_now``). ``repeats``: it
        says what the report noted before it said (who was seen on which scheme, the window,
        source and problem: ``service.clients_said``; only its times and counts moved)."""
        heard = self._heard(at)
        with self._seen_lock:
            before = self._reported.get(name)
            kept = (*before[2], before[0])[-REPEATS_KEPT:] if repeats and before else ()
            self._reported[name] = (at, heard, kept)

    def report_on_clock_now(self, name: str, reported_at: dt.datetime) -> dt.datetime:
        """When node ``name``'s client report stored as of ``reported_at`` came, by the
        leader's clock as it runs now (as a last heartbeat: ``_then_on_clock_now``): how fresh a
        report is (``planner.stale_reports``, a finalize's refusal) goes by the time since,
        which no step of the clock moves. Before, a report from just before the clock stepped
        back an hour spoke for its node for that hour (clock audit s35, D). A report this
        store did not note (one stored before it opened): ``reported_at``, no later than
        when this store opened (``_stored_on_clock_now``).

        A report that the newest one noted repeats (``note_report``), still stored while that
        one waits for the group commit (``leader.service.REFRESH_SECONDS``): when the newest
        came. It says the same clients, and its agent reports: before, such a report aged
        until the commit, which came a batch period before it was stale, and a commit any
        slower (a write lock, a slow fsync) had a finalize refused "no recent report" and
        ``--when-quiet`` hold the node while its agent reported normally (review s43rev2, M2).
        What the stored report shows (its sightings, its own ``reported_at`` as the as-of of
        ``--when-quiet``) is not moved on: only how recent its agent's word on it is. A report
        queued that says something new does not speak for the stored one (it is committed
        within a batch period anyway)."""
        with self._seen_lock:
            noted = self._reported.get(name)
        if noted is None or (noted[0] != reported_at and reported_at not in noted[2]):
            return self._stored_on_clock_now(reported_at)
        return self._then_on_clock_now(noted[0], noted[1])

    def report_since_start(self, name: str) -> bool:
        """Whether node ``name``'s stored client report came to this leader: one of its
        agent's reports was committed since this store opened (``write_queued``). Until
        then the stored one is what a leader before it stored, up to nearly
        ``planner.report_stale_after`` old at a crash (``leader.service.REFRESH_SECONDS``),
        and nobody can tell what the node's workstations did while no leader listened: it
        speaks for the node no more (a finalize refuses, ``--when-quiet`` holds it) until
        the agent's first report to this leader is stored, a batch period after its first
        message with its server's status (``leader.schema_view.report_problems``).
        Before, a report stored just before a crash spoke for the node at once, and one a
        little older made it "stale" though its agent was about to report."""
        with self._seen_lock:
            return name in self._reports_stored

    def vouch(self, name: str) -> None:
        """An open heartbeat stream vouches that node ``name`` is alive now (its agent sends
        only on change, and the connection's keepalive would end the stream if the agent
        vanished: ``service.LeaderService``): while any does, the node's last heartbeat is
        ``clock()``. In memory only, and only for a node that has had a heartbeat since this
        store opened. Before, a timer moved every such node's time on each second (a visit
        to every stream a second, issue 15)."""
        with self._seen_lock:
            self._vouched[name] = self._vouched.get(name, 0) + 1

    def heard_until(self, name: str, at: dt.datetime) -> None:
        """One stream of node ``name`` vouches no more (``vouch``; it ended, or its renewal
        bound passed): it proved the agent alive up to ``at``, and the node goes offline as
        if its heartbeats had stopped then, unless another stream still vouches or a later
        heartbeat came. A heartbeat stored or queued after ``at`` still counts (``_with_seen``
        takes the latest). ``at`` is converted by its age (``_Seen.heard``)."""
        heard = self._heard(at)
        with self._seen_lock:
            count = self._vouched.get(name, 0) - 1
            if count > 0:
                self._vouched[name] = count
            else:
                self._vouched.pop(name, None)
            seen = self._seen.get(name)
            if seen is not None and seen.heard < heard:
                seen.seen, seen.heard = at, heard

    def _write_heartbeat(
        self, name: str, record: _Record, then: Callable[[bool], None] = lambda _wrote: None
    ) -> None:
        """``heartbeat``'s transaction: ``record`` written, ``then(wrote)`` once it has
        committed, still under the database's lock (``wrote``: the row was the enrolment's
        that sent it, ``_heartbeat_sql``)."""
        with self._db.tx(routine=True) as db:
            wrote, switched = self._heartbeat_sql(db, name, record)
            self._db.after_commit(lambda: then(wrote))
        if switched:  # the certificate before is accepted no more: not routine
            self._db.touch()

    def _heartbeat_sql(
        self, db: sqlite3.Connection, name: str, record: _Record
    ) -> tuple[bool, bool]:
        """A heartbeat record's statements (in the caller's transaction): whether it was
        written, and whether it switched the node to its renewed certificate (the caller moves
        ``generation`` on). Written only into the row of the enrolment whose certificate sent
        it (``cert_fingerprint``: the one on record or the one before it; a record made
        without one, a test's, into the enrolled row of that name): one taken before the node
        was removed, or removed and enrolled again, and committed after is not its life
        (review rev55e L3: a direct write waiting for the lock wrote the old agent's version
        and features into the new enrolment's row)."""
        now, cert_fingerprint, renewal = record.now, record.cert_fingerprint, record.renewal
        switched = False
        cur = db.execute(
            "UPDATE nodes SET last_heartbeat = ?, agent_version = ?, agent_features = ?,"
            " highest_epoch = MAX(highest_epoch, ?) WHERE name = ? AND removed_at IS NULL"
            " AND (? = '' OR ? IN (cert_fingerprint, prev_cert_fingerprint))",
            (
                to_text(now),
                record.agent_version,
                json.dumps(list(record.features)),
                record.highest_epoch,
                name,
                cert_fingerprint,
                cert_fingerprint,
            ),
        )
        if not cur.rowcount:
            return False, False
        if renewal is not None:
            db.execute(
                "UPDATE nodes SET renewal_due_at = ?, renewal_failing_since = ?,"
                " renewal_error = ? WHERE name = ? AND removed_at IS NULL",
                (
                    to_text(renewal.due_at) if renewal.due_at else None,
                    to_text(renewal.failing_since) if renewal.failing_since else None,
                    renewal.error,
                    name,
                ),
            )
        if cert_fingerprint:
            cur = db.execute(
                "UPDATE nodes SET prev_cert_fingerprint = '' WHERE name = ?"
                " AND removed_at IS NULL AND cert_fingerprint = ?"
                " AND prev_cert_fingerprint != ''",
                (name, cert_fingerprint),
            )
            if cur.rowcount:
                switched = True
                self._audit(
                    db,
                    now,
                    f"node:{name}",
                    "node.certificate_switched",
                    name,
                    cert_fingerprint=cert_fingerprint,
                )
        return True, switched

    def accepted_certificates(self) -> dict[str, frozenset[str]]:
        """Each enrolled node's certificates (fingerprints) that may call the leader: the one
        on record and, until the agent has used it, the one before it (``heartbeat``)."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT name, cert_fingerprint, prev_cert_fingerprint FROM nodes"
                " WHERE removed_at IS NULL"
            ).fetchall()
        return {
            r["name"]: frozenset({r["cert_fingerprint"], r["prev_cert_fingerprint"]} - {""})
            for r in rows
        }

    def earlier_certificate(self, name: str, fingerprint: str) -> str | None:
        """The serial of ``fingerprint`` if it is an earlier certificate of enrolled node
        ``name`` in its current enrolment: issued to the node by this CA (kind ``node``) since
        it was enrolled, recorded before the one on record; else None. A refused caller
        presenting one holds a key the node had, which a renewal replaced
        (``LeaderService._refused``). Revoked or not (review rev58c H1: a `ca revoke` of the
        serial the problem named, the node's own agent's where a copy renewed itself, ended the
        problem and left the copy the node); one of an enrolment before (the node removed,
        which revokes every certificate of it, and enrolled again) is none: the removal is
        what ends the problem. Nor is a certificate this store never recorded (one issued
        after a backup it was restored from)."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT c.serial FROM certificates c JOIN nodes n ON n.name = c.subject"
                " JOIN certificates cur ON cur.kind = 'node' AND cur.subject = n.name"
                " AND cur.fingerprint = n.cert_fingerprint"
                " WHERE c.kind = 'node' AND c.subject = ? AND c.fingerprint = ?"
                " AND n.removed_at IS NULL AND c.issued_at >= n.enrolled_at AND c.seq < cur.seq",
                (name, fingerprint),
            ).fetchone()
        return str(row["serial"]) if row is not None else None

    def renew_node_certificate(
        self,
        name: str,
        *,
        presented: str,
        presented_serial: str,
        key_pin: str,
        issue: Callable[[bool], NodeCert],
        now: dt.datetime,
        names_apart: bool = False,
    ) -> NodeCert:
        """Record a renewed certificate for node ``name``, which called with the certificate
        whose fingerprint is ``presented`` (serial ``presented_serial``, hex): the one on
        record (which becomes the one before it) or the one before it (a renewal asked again:
        that stays the one before), not revoked, of a node not removed; anything else is
        Superseded, checked in this transaction (``check_caller_in``: a revocation or removal
        that committed after the handler's own check is seen). ``issue`` signs, inside the
        transaction. The old certificate is not revoked: the leader accepts it no more once
        the agent has used the new one, and it dials the agent by the new key (see
        ``leader.agent_client``). The new one is recorded as issued from the one presented
        (``issued_from``): a revocation of that one, or of one it was issued from, takes it
        too (``lineage_in``), whenever it comes (a list learned after a restore, say).
        ``issue`` is told whether to keep the node's names apart from the SAN
        (``pki.NAMES_OID``): if ``names_apart`` (the caller asks, or presents such a
        certificate) or if a renewal of the node did so before (``leader.db._V15``: never
        back; a node enrolled since has no certificate of the other kind to present).
        KeyRefused if the new key is one no enrolment takes (``_key_refused``), nothing
        signed."""
        with self._nodes_write(), self._db.tx() as db:
            row = check_caller_in(db, name, presented, presented_serial)
            # A key no enrolment takes, no renewal takes either: a node holding the private half
            # of a revoked key, a removed node's or another node's on record, would be that key
            # again under its own name (the CSR proves it holds it, nothing more).
            if refused := _key_refused(db, name, key_pin, how=_RENEW_KEY_HOW):
                raise KeyRefused(refused)
            current, prev = row["cert_fingerprint"], row["prev_cert_fingerprint"]
            keep = current if presented == current else prev
            counted_at = self.cap_now()
            _check_hourly_certs(db, name, counted_at)
            apart = names_apart or bool(row["names_apart"])
            cert = issue(apart)
            # The key the renewal replaces, on record with its certificate: a `ca revoke` of
            # that one later keeps it from enrolling (review s65 whole, M2).
            _stamp_row_keys(db, name)
            db.execute(
                "UPDATE nodes SET key_pin = ?, cert_fingerprint = ?, cert_serial = ?,"
                " cert_not_after = ?, cert_renewed_at = ?, prev_cert_fingerprint = ?,"
                " renewal_failing_since = NULL, renewal_error = '', names_apart = ?"
                " WHERE name = ?",
                (
                    key_pin,
                    cert.fingerprint,
                    cert.serial,
                    to_text(cert.not_after),
                    to_text(now),
                    keep,
                    int(apart),
                    name,
                ),
            )
            _record_node_cert(db, name, cert, now, counted_at, issued_from=presented_serial)
            self._audit(
                db,
                now,
                f"node:{name}",
                "node.certificate_renewed",
                name,
                serial=cert.serial,
                cert_fingerprint=cert.fingerprint,
                previous=row["cert_serial"],
                key_pin=key_pin,
            )
        return cert

    def cut_off_nodes(self) -> frozenset[str]:
        """The enrolled nodes whose agent is cut off: its certificate on record is revoked
        (``Node.cert_revoked``; `tlsroll ca revoke`, a machine lost or stolen). The leader
        refuses every certificate of such a node, the one before too (``check_caller_in``);
        a finalize leaves it out (``rollout_core.LEFT_OUT``).

        Read at every engine pass of a finalize and in every heartbeat snapshot: kept, and
        looked for again only once the set may have changed. A certificate revoked and a node
        removed both move the revocation list's number on (``_bump_crl``); an enrolment,
        renewal or re-learning moves ``nodes_generation``. Otherwise one point read of the
        number, not a scan of every node (review rev49fin)."""
        nodes_generation = self.nodes_generation  # before reading: a write meanwhile, again
        with self._db.read() as db:
            generation = self._db.generation  # under the lock: no commit moves it meanwhile
            number = _meta(db, "crl_number", 0)
            kept = self._cut_off_kept
            if kept is not None and kept[:2] == (number, nodes_generation):
                self._cut_off_kept = (*kept[:3], generation)
                return kept[2]
            rows = db.execute(_CUT_OFF).fetchall()
        names = frozenset(r["name"] for r in rows)
        self._cut_off_kept = (number, nodes_generation, names, generation)
        return names

    def cut_off_kept(self) -> frozenset[str] | None:
        """What ``cut_off_nodes`` last read, if nothing that could change it was committed
        since, else None (then read it: ``cut_off_nodes``, in the store's thread). For the
        event loop (the engine, at every pass of every live rollout since s50): no lock, no
        query. A revocation (``revoke``) and a removal (``remove_node``) are writes that move
        ``Database.generation`` (not ``routine``: a rollout's progress and a heartbeat's
        record are, and leave it); an enrolment or renewal moves ``nodes_generation``. Either
        moves after its commit: read before, what was kept is what a read just before that
        commit would have found. Writes by another process to the leader's store while it
        runs are not watched (there are none: the CLI goes through the admin socket)."""
        kept = self._cut_off_kept
        if kept is None or kept[1] != self.nodes_generation or kept[3] != self._db.generation:
            return None
        return kept[2]

    def agent_serials(self, name: str) -> list[str]:
        """The serials to revoke (``tlsroll ca revoke``) to cut node ``name``'s agent off
        (``_serials_to_revoke``); none for a node not enrolled, or one cut off already."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT * FROM nodes WHERE name = ? AND removed_at IS NULL", (name,)
            ).fetchone()
            return [] if row is None else _serials_to_revoke(db, row)

    def remove_node(self, name: str, *, now: dt.datetime, actor: str) -> tuple[Node, list[str]]:
        """Remove node ``name``: revoke every certificate issued to or for it, free its names
        (a token can name them again) and spend its unused tokens. Returns the node as it was
        and the serials revoked now. InRollout if a rollout not yet ended holds the node,
        checked in this transaction (the admin's early check reads before it: a rollout
        created between them, by an admin or auto-rotate, is seen here); a refused removal
        forgets nothing either (the heartbeat and client report queued for the group commit).
        Its stored client report goes (``node_clients``, ``node_clients_info``)."""
        with self._nodes_write(), self._db.tx() as db:
            row = db.execute(
                "SELECT * FROM nodes WHERE name = ? AND removed_at IS NULL", (name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no enrolled node named {shown(name)}")
            busy = db.execute(_HELD, (name, *_TERMINAL)).fetchone()
            if busy is not None:
                names = (json.loads(row["addresses"]), json.loads(row["dns_names"]))
                raise InRollout(
                    name, busy["id"], busy["state"], *names, _serials_to_revoke(db, row)
                )
            serials = [
                r["serial"]
                for r in db.execute(
                    "SELECT serial FROM certificates WHERE node = ? AND revoked_at IS NULL",
                    (name,),
                )
            ]
            # The node's own certificate, if it predates the certificates table.
            if row["cert_serial"] not in serials:
                _record_cert(
                    db,
                    row["cert_serial"],
                    "node",
                    name,
                    name,
                    row["cert_fingerprint"],
                    from_text(row["enrolled_at"]) or now,
                    dt.datetime.fromisoformat(row["cert_not_after"]),
                    key_pin=row["key_pin"],
                )
                serials.append(row["cert_serial"])
            # Its key on record with its certificate (one recorded before schema 18 had none),
            # not only in the row, which a new enrolment under the name overwrites (review s65
            # whole, M1: the removed key then enrolled under another name).
            _stamp_row_keys(db, name)
            # (What was issued from them is the node's too, recorded for it: ``lineage_in``
            # finds nothing more today; the rule is the same for every revocation that ends a
            # key's trust.)
            serials += lineage_in(db, serials)
            db.executemany(
                "UPDATE certificates SET revoked_at = ?, revoke_reason = ? WHERE serial = ?",
                [(to_text(now), NODE_REMOVED, s) for s in serials],
            )
            db.execute("UPDATE nodes SET removed_at = ? WHERE name = ?", (to_text(now), name))
            db.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?)"
                " WHERE node_name = ? AND uses_left > 0",
                (to_text(now), name),
            )
            # What its server saw goes with it (review s45rev5 M2): no agent reports for it
            # again, so its stored report spoke for nobody, yet ``notify --remaining`` said
            # "cannot tell" for it for good and the schema waited for its report; and a node
            # enrolled again under its name (another machine, maybe) inherited its
            # workstations. Soft state, never audited: the audit keeps the removal.
            db.execute("DELETE FROM node_clients WHERE node = ?", (name,))
            db.execute("DELETE FROM node_clients_info WHERE node = ?", (name,))
            # ... and so does the password it ran (review 2 of s69): the machine enrolled
            # again under its name, on http, was named behind the newest staged password and
            # counted as running the old one.
            self._forget_node_auth(db, name)
            _bump_crl(db, now)
            # The newest rollout's epoch as it is removed: every rollout up to it (each ended:
            # ``InRollout`` above) switched the machine removed, and what they recorded it
            # serves is no one's from now on (``leader.schema_store.removals``; the removal is
            # kept in the audit only: a new enrolment under the name overwrites the row).
            (epoch,) = db.execute("SELECT COALESCE(MAX(epoch), 0) FROM rollouts").fetchone()
            self._audit(db, now, actor, "node.removed", name, revoked=serials, epoch=int(epoch))
        self._forget_seen(name)  # after: a heartbeat queued meanwhile is dropped too
        with self._db.read() as db:
            removed = _node(db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone())
        return removed, serials

    def _forget_node_auth(self, db: sqlite3.Connection, name: str) -> None:
        """Inside a write transaction: no auth password is recorded live on ``name``."""
        if db.execute("DELETE FROM node_auth WHERE name = ?", (name,)).rowcount:
            self._db.cache.pop(NODE_AUTH_CACHE, None)

    # --- certificates -------------------------------------------------------------------------

    def record_certificate(
        self, cert: IssuedCert, *, actor: str, now: dt.datetime, rollout_id: str = ""
    ) -> None:
        """Record a certificate just issued (a stage's, for each node of a rollout: the
        rollout's ``rollout_id``, ``revoke_undelivered_in``). Routine
        for the heartbeat path (``tx(routine=True)``): a new, unrevoked certificate changes
        nothing its snapshot keeps (which certificates nodes call with, the revoked serials,
        the epoch, the revocation list), so the heartbeats after a stage do not read the store
        again (issue 15: a worker-thread hop and four queries per node of a rollout)."""
        with self._db.tx(routine=True) as db:
            record_certificate_in(
                db, cert, actor=actor, now=now, rollout_id=rollout_id, counted_at=self.cap_now()
            )

    def issue_workstation(
        self,
        node: str,
        workstation: str,
        issue: Callable[[], IssuedCert],
        *,
        now: dt.datetime,
        presented: str,
        presented_serial: str,
        previous: str | None = None,
        replace: bool = False,
        per_hour: int | None = None,
        renewal: bool = False,
        key_pin: str = "",
    ) -> IssuedCert:
        """Record a workstation certificate that node ``node`` asks for, calling with the
        certificate whose fingerprint is ``presented`` (serial ``presented_serial``), all in
        one transaction: the caller may still call (``check_caller_in``: a node removed or a
        certificate revoked after the handler's own check is Superseded), at most
        ``per_hour`` (default ``WORKSTATION_CERTS_PER_HOUR``) per node (TooMany); a renewal
        is not counted so, but by its name's own budget (``FORCED_RENEWAL_EVERY``,
        ``RENEWAL_TRIES``: RenewedTooSoon, NotRenewable).

        A name that a certificate on record holds (unrevoked, unexpired) is signed again, and
        that certificate revoked ("superseded"), only for the PC that holds it or for one that
        replaces it on purpose (``bootstrap_csr.Reenrolment``): ``previous``, the fingerprint
        of the certificate whose key signed the new one, is that certificate (the same PC
        enrolling again, at any node); or ``replace`` and the name is this node's (a new PC for
        an old one). Anything else is refused (NameTaken): two PCs of the same host name no
        longer take the name from each other in turn (audit s39ws M2). A ``previous`` that a
        renewal revoked ("renewed") counts as the certificate held while the name's live
        certificate is the one that renewal issued (``_lost_renewal``: its answer lost, the PC
        enrols again with the password and the certificate it still holds).

        It is recorded as issued from the node's certificate presented (``issued_from``), on
        whose strength it was signed: a revocation of that one takes it too (``lineage_in``).
        Not from the certificate it supersedes: that one's revocation is the re-enrolment's
        own, and must not take the new one.

        ``renewal`` (``tlsroll client renew``: no password was checked): signed only if
        ``previous`` is a certificate on record for ``workstation``, unrevoked and unexpired
        (NotRenewable otherwise), or one a renewal revoked less than ``WITHDRAW_WINDOW`` ago
        (its answer lost: the PC asks again with the certificate it still holds). That one is
        revoked as "renewed" (not urgently: its key is not lost), the new certificate linked to
        it in the audit trail (``workstation.renewed``, ``renews``). A renewal for a key
        ``key_pin`` (the CSR's, ``pki.spki_pin``) certified for the name already is refused (a
        copy of a renewal's request: ``client renew`` makes a new key each run); the key of
        each workstation certificate is recorded for that (``key_pin``, '' if not known)."""
        with self._db.tx() as db:
            check_caller_in(db, node, presented, presented_serial)
            renews, counted_at = None, None
            if renewal:
                renews = _renewable(db, workstation, previous, now, key_pin)
                _check_renewal_budget(db, workstation, renews, now)
                counted_at = None  # (no hourly cap counts it: FORCED_RENEWAL_EVERY)
            else:
                counted_at = self.cap_now()
                _check_hourly_certs(db, node, counted_at, "workstation", per_hour)
            held = db.execute(
                "SELECT serial, node, fingerprint, issued_at FROM certificates"
                " WHERE kind = 'workstation' AND subject = ? AND revoked_at IS NULL"
                " AND not_after > ?",
                (workstation, to_text(now)),
            ).fetchall()
            proven = previous is not None and any(r["fingerprint"] == previous for r in held)
            lost = not proven and renews is None and _lost_renewal(db, workstation, previous, held)
            proven = proven or lost
            if not proven and renews is None:
                other = next((r["node"] for r in held if r["node"] != node), None)
                if other is not None:
                    raise NameTaken(
                        f"workstation name {workstation} is taken (at node {other}): choose "
                        f"another (--name), or the admin frees it (tlsroll workstations revoke "
                        f"{workstation})"
                    )
                if held and not replace:
                    # An older client (no proof) cuts this at 160 characters, after the
                    # node's "the leader did not sign: ", and knows no --replace: what it can
                    # do comes first (audit s40ws M2).
                    raise NameTaken(
                        f"{bootstrap_base.taken_here(workstation)}: by this PC if "
                        "its tlsroll is too old to prove it (upgrade it), else by another PC; "
                        "if this PC replaces that one, run again with --replace; else choose "
                        f"another (--name), or the admin frees it (tlsroll workstations revoke "
                        f"{workstation})"
                    )
            cert = issue()
            db.executemany(
                "UPDATE certificates SET revoked_at = ?, revoke_reason = ? WHERE serial = ?",
                [
                    (
                        to_text(now),
                        "renewed" if r["serial"] == renews else "superseded",
                        r["serial"],
                    )
                    for r in held
                ],
            )
            if held:
                # Urgent all the same: a workstation enrolled again may be a new PC for a lost
                # one, whose certificate the practice's servers should refuse at once. A
                # renewal's not (its key is not lost), but the list's number moves on all the
                # same: a list of the same number without them was out already (review s71
                # revrenew L1).
                _bump_crl(db, now, urgent=renews is None)
            _record_cert(
                db,
                cert.serial,
                "workstation",
                workstation,
                node,
                cert.fingerprint,
                cert.issued_at,
                cert.not_after,
                counted_at=counted_at,
                issued_from=presented_serial,
                key_pin=key_pin,
            )
            self._audit(
                db,
                now,
                f"node:{node}",
                "workstation.renewed" if renews is not None else "workstation.enrolled",
                workstation,
                serial=cert.serial,
                fingerprint=cert.fingerprint,
                superseded=[r["serial"] for r in held],
                **({"renews": renews} if renews is not None else {}),
                **({"replaced": True} if held and not proven and renews is None else {}),
                **({"lost_renewal": True} if lost else {}),
            )
        return cert

    def revoke_reason(self, node: str, fingerprint: str) -> str:
        """Why the workstation certificate ``fingerprint`` of node ``node``'s asking was
        revoked ("" if it is not, or not found): for a withdrawal refused as revoked already
        (``withdraw_workstation``), whose node then tells its workstation what to do."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT revoke_reason FROM certificates"
                " WHERE kind = 'workstation' AND node = ? AND fingerprint = ?",
                (node, fingerprint),
            ).fetchone()
        return hide_inside(str(row["revoke_reason"] or "")) if row is not None else ""

    def withdraw_workstation(
        self,
        node: str,
        fingerprint: str,
        *,
        now: dt.datetime,
        presented: str,
        presented_serial: str,
    ) -> str | None:
        """Revoke ("never delivered", not urgently: no one holds it) the workstation
        certificate ``fingerprint`` that node ``node`` asked for (``issue_workstation``) and
        could not deliver, calling with the certificate ``presented`` (serial
        ``presented_serial``, ``check_caller_in``), so that it no longer holds its name; the
        serial revoked now, or None if it was revoked already (idempotent: by an earlier call,
        by the admin, superseded). NotFound unless it is a workstation certificate of this
        node's asking (another node's is not found either: nothing is said about it);
        TooLate if it was counted more than ``WITHDRAW_WINDOW`` ago (``cap_now``'s clock,
        which no step of the wall clock moves; a renewal's, which no cap counts, issued so
        long ago by the leader's clock ``now``). What it superseded stays revoked: a
        revocation list with it may be out already, and a revocation is for good."""
        with self._db.tx() as db:
            check_caller_in(db, node, presented, presented_serial)
            row = db.execute(
                "SELECT serial, subject, revoked_at, counted_at, issued_at FROM certificates"
                " WHERE kind = 'workstation' AND node = ? AND fingerprint = ?",
                (node, fingerprint),
            ).fetchone()
            if row is None:
                raise NotFound("no workstation certificate of this node has that fingerprint")
            if row["revoked_at"] is not None:
                return None
            counted = from_text(row["counted_at"])
            if counted is not None:
                late = counted < self.cap_now() - WITHDRAW_WINDOW
            else:  # a renewal's (no cap counts it): the leader's clock, as its retries' window
                issued = from_text(row["issued_at"])
                late = issued is None or now - issued > WITHDRAW_WINDOW
            if late:
                raise TooLate(
                    f"the certificate of {row['subject']} was issued too long ago to withdraw;"
                    f" the admin revokes it (tlsroll workstations revoke {row['subject']})"
                )
            serial = str(row["serial"])
            _revoke_in(db, [serial], "never delivered", now, urgent=False)
            self._audit(
                db,
                now,
                f"node:{node}",
                "workstation.withdrawn",
                row["subject"],
                serial=serial,
                fingerprint=fingerprint,
            )
        return serial

    def revoke_superseded(
        self, node: str, live_fingerprint: str, *, before: dt.datetime, now: dt.datetime
    ) -> list[str]:
        """Revoke (reason "superseded") the server certificates of ``node`` that the one it
        now serves, ``live_fingerprint``, replaced: every unrevoked ``server`` certificate of
        the node recorded before that one (issued before ``before``, the rollout's start, if
        the live one is not on record, e.g. brought by the admin). A certificate recorded
        later (a newer rollout's) is left alone. Idempotent; returns the serials revoked now."""
        with self._db.tx() as db:
            return revoke_superseded_in(db, node, live_fingerprint, before=before, now=now)

    def list_certificates(self, kind: str | None = None) -> list[IssuedCert]:
        with self._db.read() as db:
            if kind is None:
                rows = db.execute("SELECT * FROM certificates ORDER BY issued_at").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM certificates WHERE kind = ? ORDER BY subject, issued_at",
                    (kind,),
                ).fetchall()
        return [_cert(r) for r in rows]

    def revocations_of(self, fingerprints: Collection[str]) -> dict[str, str]:
        """Of the server certificates with ``fingerprints``, those revoked: fingerprint ->
        the reason (``leader.expiry.served_now``: what the nodes serve, read by the viewer
        after each write, and by a plan). Kept, and read again only for other fingerprints or
        after a write that is not ``routine`` (a revocation, a removal: ``Database.
        generation``): the query reads every server certificate ever issued (some 3 ms at
        500 nodes rotated ten times), and a rollout's progress, after each step of which an
        open page reads, is routine."""
        wanted = frozenset(fingerprints)
        if not wanted:
            return {}
        with self._db.read() as db:
            generation = self._db.generation  # under the lock: no commit moves it meanwhile
            kept = self._revocations_kept
            if kept is not None and kept[:2] == (generation, wanted):
                return dict(kept[2])
            rows = db.execute(
                "SELECT fingerprint, revoke_reason FROM certificates"
                " WHERE kind = 'server' AND revoked_at IS NOT NULL"
                " AND fingerprint IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(wanted)),),
            ).fetchall()
        found = {str(r["fingerprint"]): str(r["revoke_reason"] or "") for r in rows}
        self._revocations_kept = (generation, wanted, found)
        return dict(found)

    def server_certificates_of(self, fingerprints: Collection[str]) -> dict[str, IssuedCert]:
        """The server certificates on record with ``fingerprints``, by fingerprint: those the
        nodes' heartbeats say they serve apart from what the rollouts recorded
        (``leader.expiry.served_now``; rare: a node enrolled again under a removed name still
        serving its certificate, a rotation under way)."""
        wanted = sorted(set(fingerprints))
        if not wanted:
            return {}
        with self._db.read() as db:
            rows = db.execute(
                "SELECT * FROM certificates WHERE kind = 'server'"
                " AND fingerprint IN (SELECT value FROM json_each(?)) ORDER BY issued_at",
                (json.dumps(wanted),),
            ).fetchall()
        return {str(r["fingerprint"]): _cert(r) for r in rows}

    def workstation_certificates(self, ending_after: dt.datetime) -> list[IssuedCert]:
        """The workstation certificates not revoked that end after ``ending_after``: what the
        expiry watch's rule (``leader.expiry.watched_workstations``) may list, for the viewer,
        which reads them at each read (the others, revoked or long ended, pile up)."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT * FROM certificates WHERE kind = 'workstation' AND revoked_at IS NULL"
                " AND not_after > ? ORDER BY subject, issued_at",
                (to_text(ending_after),),
            ).fetchall()
        return [_cert(r) for r in rows]

    def revoke(
        self,
        name_or_serial: str,
        *,
        reason: str,
        now: dt.datetime,
        actor: str,
        unknown: bool = False,
        own: Sequence[OwnCert] = (),
        ca_serials: Iterable[str] = (),
        workstations_only: bool = False,
    ) -> list[str]:
        """Revoke the workstation certificates of a name (ws-…), or one certificate by its
        serial (hex). Returns the serials revoked now; NotFound if nothing matched.

        ``own``: the leader's own certificates as it serves them (leader, viewer): one of
        them is found by its serial and recorded (its kind, its dates) as it is revoked; the
        leader then issues it again (``leader.own_tls``). ``ca_serials``: the CA's own
        certificates' serials, refused (``CAsOwn``): before, both needed ``--unknown``, the
        CA's was "revoked" for nothing, and the leader went on serving its revoked certificate
        until it ended, every rollout halting (review s63 ops). Revoking the leader's served
        one revokes every other leader certificate on record not ended as well
        (``record_leader_certificate``; review of s63-o1 M1). ``workstations_only`` (`tlsroll
        workstations revoke`): a serial on record of another kind, or an own one, is refused
        (``NotWorkstation``).

        A serial the store has no record of is refused (a mistyped or cut-short serial would
        otherwise be "revoked" while the real certificate stays valid: audit s34 H3) unless
        ``unknown``: then it is recorded as an "other" certificate and revoked, for a
        certificate this CA issued that the store does not know (a store rebuilt by
        ``--reinitialise``). A serial no certificate of this CA can have (0, or 2**159 and
        above: ``store_rules.SERIAL_LIMIT``) is always refused: it could not go into the
        revocation list (audit s34 H1).

        Every certificate issued on the strength of one revoked here is revoked with it, and so
        on down (``lineage_in``: a node certificate's renewals and the workstation certificates
        its node asked for with it; the one before a node's certificate on record), each named
        in the answer; their reason says which one they were issued from."""
        key = name_or_serial.strip().lower()
        with self._db.tx() as db:
            if key.startswith("ws-"):
                rows = db.execute(
                    "SELECT serial FROM certificates WHERE kind = 'workstation' AND subject = ?"
                    " AND revoked_at IS NULL",
                    (key,),
                ).fetchall()
                serials = [r["serial"] for r in rows]
            elif re.fullmatch(r"[0-9a-f]{1,40}", key):
                serial = key.lstrip("0") or "0"
                if not serial_fits(serial):
                    raise Malformed(
                        f"{shown(name_or_serial)} is not a serial this CA can have issued "
                        "(1 to 2^159-1)"
                    )
                cas = {c.lower().lstrip("0") or "0" for c in ca_serials}
                if workstations_only:
                    _refuse_not_workstation(db, serial, own, cas)
                if serial in cas:
                    raise CAsOwn(
                        f"{serial} is the cluster CA's own certificate: it cannot be revoked"
                        " (agents and workstations trust it directly); to replace it, `tlsroll"
                        " ca renew` (README 'Certificates', The CA); for a CA key that is lost"
                        " or stolen, see /usr/share/doc/tlsroll/docs/ca-renewal.md"
                    )
                mine = next((c for c in own if c.serial == serial), None)
                if mine is not None:  # (recorded once: the next revocation finds it)
                    _record_cert(
                        db,
                        serial,
                        mine.kind,
                        mine.kind,
                        "",
                        mine.fingerprint,
                        mine.not_before,
                        mine.not_after,
                    )
                known = db.execute(
                    "SELECT revoked_at FROM certificates WHERE serial = ?", (serial,)
                ).fetchone()
                if known is None and not unknown:
                    raise NotFound(
                        f"no certificate with serial {serial} is on record: `tlsroll certs"
                        " check-expiration` lists every serial in full (for a certificate this"
                        " CA issued that the store does not know, after --reinitialise: `tlsroll"
                        " ca revoke --unknown SERIAL`)"
                    )
                if known is None:
                    _record_cert(db, serial, "other", "", "", "", now, now + UNKNOWN_KEPT)
                serials = [] if known is not None and known["revoked_at"] else [serial]
                if mine is not None and mine.kind == "leader":
                    # The leader's served one: every other one on record not ended goes with
                    # it (issued before, or at its start: ``record_leader_certificate``), as
                    # the agent's certificate before its renewal does with the agent's.
                    serials += [
                        r["serial"]
                        for r in db.execute(
                            "SELECT serial FROM certificates WHERE kind = 'leader'"
                            " AND revoked_at IS NULL AND not_after > ? AND serial != ?"
                            " ORDER BY issued_at",
                            (to_text(now), serial),
                        )
                    ]
            else:
                raise Malformed(
                    f"{shown(name_or_serial)} is neither a workstation name (ws-…) nor a serial"
                )
            if not serials:
                raise NotFound(f"no unrevoked certificate matches {shown(name_or_serial)}")
            # What was issued on the strength of them goes with them (``lineage_in``): a
            # node's agent certificate's renewals and the workstation certificates its node
            # asked for with it, and, of one on record, the one before it, which the leader
            # still accepts right after a renewal (else it renewed the node back into a fresh,
            # unrevoked certificate: review s48 lost machine).
            lineage = lineage_in(db, serials)
            serials += lineage
            # A node's certificate on record revoked: its key with it (``_key_refused`` finds
            # it there after the node's row takes another; the rows' only, ``_stamp_row_keys``).
            _stamp_row_keys(db)
            _revoke_in(db, serials, reason or "revoked by the admin", now, lineage=lineage)
            self._audit(db, now, actor, "certificate.revoked", key, serials=serials)
        # A node's agent certificate revoked cuts its agent off: the agent pool reads its
        # nodes again (``nodes_generation``), and dials that agent no more (s50; rare: a
        # revocation by the admin).
        self.nodes_generation += 1
        return serials

    def stamp_row_keys(self) -> int:
        """At the leader's start: the key of every node's row onto its certificate on record
        where that has none (``_stamp_row_keys``): one recorded before schema 18, or by an older
        leader since (it ran on the migrated file: ``leader.db.IGNORABLE``). Not in migration
        18: a migration an older leader may ignore writes no row, and an older leader's
        certificates are filled only here. Idempotent; a write only if one lacks it. Returns
        how many were filled."""
        lacking = (
            "SELECT 1 FROM certificates c JOIN nodes n ON n.cert_serial = c.serial"
            " WHERE c.kind = 'node' AND c.key_pin = '' AND n.key_pin != '' LIMIT 1"
        )
        with self._db.read() as db:
            if db.execute(lacking).fetchone() is None:
                return 0
        with self._db.tx() as db:
            before = db.total_changes
            _stamp_row_keys(db)
            return db.total_changes - before

    def record_leader_certificate(self, cert: x509.Certificate) -> bool:
        """Record a certificate of the leader's own (kind ``leader``), as it is issued (before
        it is written: ``leader.layout.write_leader_cert``), or the one the leader finds at its
        start (init's, made before the store, or an earlier release's); once: True if it was
        not on record. `tlsroll ca revoke` of the one served then revokes every one on record
        not ended (``revoke``): one the leader served before, with a key a backup may still
        hold, commands every agent until its end as well as the one served (review of s63-o1
        M1). The leader issues them outside the store: no cap counts them."""
        from tlsroll import pki  # noqa: PLC0415 - the store itself does not load cryptography

        serial = f"{cert.serial_number:x}"
        known = "SELECT 1 FROM certificates WHERE serial = ?"
        with self._db.read() as db:  # (every start asks: a write only for one not on record)
            if db.execute(known, (serial,)).fetchone() is not None:
                return False
        with self._db.tx() as db:
            if db.execute(known, (serial,)).fetchone() is not None:
                return False
            _record_cert(
                db,
                serial,
                "leader",
                "leader",
                "",
                pki.fingerprint(cert),
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
            )
        return True

    def is_revoked(self, serial: str) -> bool:
        """Whether the certificate with ``serial`` (hex) is revoked."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT 1 FROM certificates WHERE serial = ? AND revoked_at IS NOT NULL",
                (serial.lstrip("0") or "0",),
            ).fetchone()
        return row is not None

    def revoked(self, now: dt.datetime | None = None) -> tuple[int, list[tuple[str, dt.datetime]]]:
        """The revocation list's number and its entries: (serial, revoked at); with ``now``,
        those not expired for longer than ``EXPIRED_KEPT`` (an expired certificate is refused
        anyway, and the list would otherwise grow with every rollout that supersedes
        certificates, for good)."""
        revocations = self.revocations(now)
        return revocations.number, revocations.entries

    def revocations(self, now: dt.datetime | None = None) -> Revocations:
        """``revoked``, and the number of the list as of its last urgent revocation
        (``_bump_crl``)."""
        with self._db.read() as db:
            number = _meta(db, "crl_number", 0)
            urgent = _meta(db, "crl_urgent", 0)
            issued = _meta(db, "crl_issued", -1)
            rows = db.execute(
                "SELECT serial, revoked_at, not_after FROM certificates"
                " WHERE revoked_at IS NOT NULL ORDER BY serial"
            ).fetchall()
        entries = [
            (r["serial"], dt.datetime.fromisoformat(r["revoked_at"]))
            for r in rows
            if now is None or dt.datetime.fromisoformat(r["not_after"]) + EXPIRED_KEPT > now
        ]
        if not all(serial_fits(serial) for serial, _ in entries):
            entries = self._fitting(entries)
        when = dt.datetime.fromtimestamp(issued, dt.UTC) if issued >= 0 else None
        return Revocations(number, urgent, entries, when)

    def _fitting(self, entries: list[tuple[str, dt.datetime]]) -> list[tuple[str, dt.datetime]]:
        """``entries`` without the serials no revocation list can hold (``serial_fits``): a
        store that took one before they were refused (``revoke``; audit s34 H1) would otherwise
        fail every list it builds, and with it every heartbeat. Each is logged once."""
        for serial, _ in entries:
            if not serial_fits(serial) and serial not in self._unfit_logged:
                self._unfit_logged.add(serial)
                log.warning(
                    "crl.serial_skipped",
                    serial=serial[:48],
                    why="out of range",
                    detail="that serial cannot go on a revocation list; the rest of the list "
                    "stands",
                )
        return [(serial, when) for serial, when in entries if serial_fits(serial)]

    def renew_crl(
        self,
        now: dt.datetime,
        issued_before: dt.datetime,
        issued_after: dt.datetime | None = None,
    ) -> bool:
        """Give the revocation list a new number, not urgent (``_bump_crl``), if its number was
        issued at ``issued_before`` or before, after ``issued_after`` (ahead of the clock:
        ``leader.service.CRL_AHEAD_LIMIT``), or when is not recorded; False if it was not
        (another caller renewed it meanwhile). A list keeps its number's thisUpdate and
        nextUpdate (``LeaderState.crl_of``), and an agent holds a list by number: only a new
        number brings the agents a list within its validity
        (``leader.service.CRL_RENEW_AFTER``)."""
        with self._db.tx() as db:
            issued = _meta(db, "crl_issued", -1)
            when = dt.datetime.fromtimestamp(issued, dt.UTC)
            ahead = issued_after is not None and when > issued_after
            if issued >= 0 and when > issued_before and not ahead:
                return False
            _bump_crl(db, now, urgent=False)
        return True

    def raise_crl_floor(self, held: int, *, now: dt.datetime, node: str) -> int | None:
        """An agent (of ``node``) says it holds revocation list number ``held``, higher than
        this store's: the store was lost or restored from a backup, and the agents would
        ignore its lists until its count passed theirs (audit s33 H1). The number moves past
        it now, urgently (the agents take the new list at once), to at most ``held + 1`` and
        at least ``crl_time(now)`` (``_bump_crl``): a node that lies cannot push it beyond
        where the clock takes it anyway. Returns the new number, or None if the store's is
        not below ``held`` (read first: no write then)."""
        with self._db.read() as db:
            if held <= _meta(db, "crl_number", 0):
                return None
        with self._db.tx() as db:
            number = _meta(db, "crl_number", 0)
            if held > number:  # (else another raised it meanwhile: the commit changes nothing)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('crl_number', ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    # Never lower: a clock once ahead may have numbered past it (review 2 L1).
                    (str(max(number, min(held, crl_time(now)))),),
                )
                _bump_crl(db, now)
                raised = _meta(db, "crl_number", 0)
                self._audit(
                    db, now, f"node:{node}", "crl.floor_raised", "leader", held=held, was=number,
                    number=raised,
                )  # fmt: skip
                return raised
        return None

    # --- the CA the store belongs to -----------------------------------------------------------

    def own_ca_pin(self, pin: str) -> str | None:
        """The CA the store belongs to, by the SPKI pin of its key (``pki.spki_pin``, as agents
        pin it), kept in ``meta`` as ``ca_pin``: returns the pin on record, or None when there
        was none (a store of a release before, or one ``--reinitialise`` began; a new one's
        first transaction records it: ``ca_pinned``), after recording ``pin`` (the CA
        the leader starts with). One on record that is not ``pin`` is left as it is: the store
        is another CA's (a restore that put back one backup's store and another cluster's
        ``ca/``), and the leader does not start on it (``leader.runtime``). A CA renewed with
        its key (``tlsroll ca renew``) keeps its pin; no command gives the cluster a CA of
        another key (docs/ca-renewal.md)."""
        with self._db.tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'ca_pin'").fetchone()
            if row is not None:
                return str(row["value"])
            db.execute("INSERT INTO meta (key, value) VALUES ('ca_pin', ?)", (pin,))
        return None

    def replace_ca_pin(self, recorded: str, pin: str, now: dt.datetime, actor: str) -> bool:
        """``tlsroll-leader --repin-ca RECORDED PIN`` (``leader.runtime.repin_ca``): the store
        is of the CA of ``pin`` from now on, in place of ``recorded``, the one on record (a
        store of a release before session 67 pinned whatever ``ca/`` its first start found,
        a wrong one restored included, and nothing else corrects it). Only if ``recorded`` is
        still the one on record (False: nothing written); audited (``store.ca_pin_replaced``,
        both pins) in the same transaction."""
        with self._db.tx() as db:
            done = db.execute(
                "UPDATE meta SET value = ? WHERE key = 'ca_pin' AND value = ?", (pin, recorded)
            ).rowcount
            if not done:
                return False
            self._audit(db, now, actor, "store.ca_pin_replaced", "leader", was=recorded, ca_pin=pin)
        return True

    # --- re-learning nodes after a lost store --------------------------------------------------

    def relearn_until(self) -> dt.datetime | None:
        """Until when nodes may be re-learned (``relearning``), or None: never."""
        with self._db.read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'relearn_until'").fetchone()
        return None if row is None else dt.datetime.fromisoformat(row["value"])

    def restored_from(self) -> dt.datetime | None:
        """When the backup this store was restored from was made (``restore_began``), or
        None: not restored."""
        with self._db.read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'restored_backup_at'").fetchone()
        return None if row is None else dt.datetime.fromisoformat(row["value"])

    def restore_began(self, now: dt.datetime) -> Restored | None:
        """A store that is a backup's copy (``leader.backup`` wrote ``backup_made_at`` into
        the copy, never into the live store), opened by a leader for the first time: what
        happened since the backup is not in it, and a node whose agent renewed its
        certificate since would be refused for good (its certificate is not the one on
        record). So a restore opens a re-learning window of ``RELEARN_WINDOW`` in which such
        a node's newer certificate is taken (``relearn``). Once: the mark becomes
        ``restored_backup_at``. Returns what it did (``Restored``), or None: no backup's copy.

        Every leader certificate on record that has not ended is revoked (``RESTORED_LEADER``):
        the backup holds the key the leader serves, and a backup is a copy of it, kept where
        the leader's own files are not; the leader then issues its certificate again for a new
        key (``leader.runtime._new_key_if_revoked``). One revoked after the backup (its key
        thought stolen) is revoked again so, whatever the agents hold. Before, the restored
        leader served the backup's key and certificate, revoked since or not, and its next
        list (numbered past the agents') made every agent take that key's commands again
        (review s64 H).

        The numbers of the lists the CA issued after the backup and before this restore are
        kept (``restored_crl_range``): an agent that holds one of them holds revocations this
        store lacks, and the leader learns them from it before it sends it a list of its own
        (``learn_revoked``, ``leader.service``). The store's number moves past the clock's now
        (``_bump_crl``): the lists it issues from here on are numbered above that range.

        Every join token with a use left is revoked: any of them may have enrolled its node
        since the backup (it is unused again in the copy), and one used so would take the name
        of a node not re-learned yet from whoever held the token (race audit of session 39,
        L2); the store cannot tell which. A token made after the restore enrols. So is every
        viewer grant still open (``leader.viewer.grants``): one revoked after the backup is
        open again in the copy, and nobody knows which after a lost disk (rev57b H1: the
        revoked link's session got in again); the admin grants anew."""
        with self._db.tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'backup_made_at'").fetchone()
            if row is None:
                return None
            made = dt.datetime.fromisoformat(row["value"])
            until = now + RELEARN_WINDOW
            for key, value in (
                ("restored_backup_at", made),
                ("restored_at", now),
                ("relearn_until", until),
            ):
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, to_text(value)),
                )
            # (And the mark of a copy opened: ``leader.db.claim_copy``.)
            db.execute("DELETE FROM meta WHERE key IN ('backup_made_at', 'copy_opened_at')")
            leader_serials = [
                r["serial"]
                for r in db.execute(
                    "SELECT serial FROM certificates WHERE kind = 'leader' AND revoked_at IS NULL"
                    " AND not_after > ? ORDER BY issued_at",
                    (to_text(now),),
                )
            ]
            above = _meta(db, "crl_number", 0)
            if leader_serials:
                _revoke_in(db, leader_serials, RESTORED_LEADER, now)
            else:
                _bump_crl(db, now)  # (the range's end: every list from here on is above it)
            below = _meta(db, "crl_number", 0)
            for key, number in (("crl_restored_above", above), ("crl_restored_below", below)):
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, str(number)),
                )
            revoked = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM tokens WHERE uses_left > 0 AND revoked_at IS NULL"
                    " AND superseded_at IS NULL ORDER BY created_at, id"
                )
            ]
            db.executemany(
                "UPDATE tokens SET revoked_at = ? WHERE id = ?",
                [(to_text(now), i) for i in revoked],
            )
            grants = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM viewer_grants WHERE revoked_at IS NULL AND expires_at > ?"
                    " ORDER BY created_at, id",
                    (to_text(now),),
                )
            ]
            db.executemany(
                "UPDATE viewer_grants SET revoked_at = ? WHERE id = ?",
                [(to_text(now), i) for i in grants],
            )
            self._audit(
                db,
                now,
                "admin:restore",
                "store.restored",
                "leader",
                backup_made_at=made,
                relearn_until=until,
                revoked_tokens=revoked,
                revoked_viewer_grants=grants,
                revoked_leader_certificates=leader_serials,
                crl_restored_between=[above, below],
            )
        # In the file itself, not only in its -wal: from here on the file alone is no backup's
        # copy not started yet (``leader.db.foreign_wal``), so that a -wal a start killed
        # later leaves beside it is taken for its own.
        with self._db.read() as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        # (A leader certificate revoked: the agent pool reads its nodes again, as ``revoke``.)
        self.nodes_generation += 1
        return Restored(made, until, tuple(leader_serials))

    def restored_crl_range(self) -> tuple[int, int] | None:
        """The numbers of the revocation lists the CA issued after the backup this store was
        restored from and before the restore (``restore_began``), or before a store begun
        again (``relearning``: every list before), both bounds excluded; None: neither (or
        by a release before this one). An agent that holds a list numbered within holds
        revocations this store may lack (``learn_revoked``)."""
        with self._db.read() as db:
            above = db.execute("SELECT value FROM meta WHERE key = 'crl_restored_above'").fetchone()
            below = db.execute("SELECT value FROM meta WHERE key = 'crl_restored_below'").fetchone()
        if above is None or below is None:
            return None
        return int(above["value"]), int(below["value"])

    def learn_revoked(
        self,
        serials: Iterable[str],
        *,
        number: int,
        node: str,
        now: dt.datetime,
        reason: str,
        ca_serials: Iterable[str] = (),
    ) -> list[str]:
        """Record as revoked (``reason``) the serials (hex) of a revocation list the CA signed,
        numbered ``number``, that the agent of ``node`` held and this store does not hold
        (it was restored from a backup made before, or lost: ``leader.service`` checked the
        list's signature). A serial the store has no record of is recorded as an "other"
        certificate (as ``revoke`` with ``unknown``): one issued after the backup. With them,
        what was issued on their strength (``lineage_in``): a certificate renewed from one of
        them at this leader before the list was learned (a copy of a key revoked after the
        backup, quicker than the agents: review s64 b4 H), the workstation certificates its
        node asked for with it, and the one the leader accepts from before a node's renewal
        (``_accepted_before``). Then the list's number moves on, urgently, as for any
        revocation: the leader's next list holds them, and goes to every agent. Returns the
        serials revoked now (none: no write). A list is what the CA revoked: nothing in it is
        ever taken back, so an old list sent again adds nothing that was not revoked once.

        A serial of the CA's own certificates (``ca_serials``: ``LeaderState.ca_serials``) is
        skipped, logged (``crl.serial_skipped``) each time a list naming it is learned (once
        per list and leader process: ``leader.service`` learns a number once): the list
        cannot revoke its own issuer, and ``revoke`` refuses it (``CAsOwn``); only a release
        before s63, which "revoked" it for nothing, put it in a list. Recorded, it was an
        "other" certificate revoked under the CA's serial, named again in every list after.
        The leader's and the viewer's own certificates are learned as any other: the CA did
        revoke them (``ca revoke`` takes them), and the leader issues itself a new one
        (``leader.own_tls``)."""
        listed = {k for k in (s.lower().lstrip("0") for s in serials) if serial_fits(k)}
        cas = {c.lower().lstrip("0") or "0" for c in ca_serials}
        for serial in sorted(listed & cas):
            log.warning(
                "crl.serial_skipped",
                serial=serial,
                why="the cluster CA's own certificate: no revocation list can revoke it",
                node=node,
                number=number,
                detail="that serial cannot go on a revocation list; the rest of the list stands",
            )
        wanted = sorted(listed - cas)
        if not wanted:
            return []
        query = "SELECT 1 FROM certificates WHERE serial = ? AND revoked_at IS NOT NULL"
        with self._db.read() as db:  # (every agent that holds the list sends it: read first)
            if all(db.execute(query, (serial,)).fetchone() is not None for serial in wanted):
                return []
        with self._db.tx() as db:
            fresh: list[str] = []
            for serial in wanted:
                row = db.execute(
                    "SELECT revoked_at FROM certificates WHERE serial = ?", (serial,)
                ).fetchone()
                if row is None:
                    _record_cert(db, serial, "other", "", "", "", now, now + UNKNOWN_KEPT)
                elif row["revoked_at"]:
                    continue
                fresh.append(serial)
            if not fresh:
                return []
            lineage = lineage_in(db, fresh)
            fresh += lineage
            _revoke_in(db, fresh, reason, now, lineage=lineage)
            self._audit(
                db,
                now,
                f"node:{node}",
                "crl.learned",
                "leader",
                number=number,
                serials=fresh,
                issued_from={s: p for s, p in lineage.items() if p},
            )
        self.nodes_generation += 1
        return fresh

    def relearn(
        self,
        *,
        name: str,
        names: tuple[tuple[str, ...], tuple[str, ...]],
        agent_port: int,
        key_pin: str,
        cert: NodeCert,
        highest_epoch: int,
        now: dt.datetime,
        issued_at: dt.datetime | None = None,
        names_apart: bool = False,
    ) -> bool:
        """Record a node the leader no longer knows from the certificate its agent presents
        (the CA issued it: the TLS handshake checked that), while the re-learning window of a
        reinitialised or restored store is open, unless the name was removed since; its epoch
        raises the floor. In a store restored from a backup (``restore_began``), a node it
        knows is taken with a newer certificate than the one on record when that one was
        issued (``issued_at``) after the backup was made, for the same names, and is not
        revoked: its agent renewed it since. False if refused (the caller refuses the agent);
        KeyRefused, saying why, if it would be taken but its key is one no enrolment takes
        (``_key_refused``: a certificate the CA issued before the key was revoked, removed or
        found another node's), nothing written."""
        addresses, dns_names = names

        def refused(db: sqlite3.Connection) -> bool | sqlite3.Row:
            verdict = refused_as_caller(db)
            # The CA issued the certificate, but the store may refuse its key (what the backup
            # knew: a key revoked, removed, another node's): a key no enrolment takes is not
            # learned either (KeyRefused, its one line to the agent). Only a certificate it
            # would learn: any other keeps the refusal it had (a revoked node's words, which
            # its agent matches: ``rpc.node_removed``).
            how = _RELEARN_HOW if verdict is False else _relearn_known_how(name)
            if verdict is not True and (why := _key_refused(db, name, key_pin, how=how)):
                raise KeyRefused(why)
            return verdict

        def refused_as_caller(db: sqlite3.Connection) -> bool | sqlite3.Row:
            row = db.execute("SELECT value FROM meta WHERE key = 'relearn_until'").fetchone()
            if row is None or now > dt.datetime.fromisoformat(row["value"]):
                return True
            known = db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
            if known is None:
                # Unknown: re-learned, unless a live node holds one of its addresses (which
                # enrolment refuses too: review of s38, M2).
                for held in db.execute("SELECT addresses FROM nodes WHERE removed_at IS NULL"):
                    if set(json.loads(held["addresses"])) & set(addresses):
                        return True
                return False
            return (
                known
                if self._renewed_since_backup(db, known, name, names, cert, issued_at)
                else True
            )

        # Read first: a refusal writes nothing, and forgets nothing of the node (audit s33 M1:
        # a refused certificate of a known node wiped its liveness and queued writes, and its
        # empty write transaction moved the store's generation on for every agent).
        with self._db.read() as db:
            if refused(db) is True:
                return False
        with self._nodes_write(), self._db.tx() as db:
            verdict = refused(db)
            if verdict is True:  # (another call re-learned it meanwhile)
                return False
            # (Forgotten only now, for a caller taken: review of s38, L6.)
            self._forget_seen(name)
            if isinstance(verdict, sqlite3.Row):
                _stamp_row_keys(db, name)  # (the key it replaces: as a renewal, ``renew_…``)
                db.execute(
                    "UPDATE nodes SET key_pin = ?, cert_fingerprint = ?, cert_serial = ?,"
                    " cert_not_after = ?, cert_renewed_at = ?, prev_cert_fingerprint = '',"
                    " agent_port = ? WHERE name = ?",
                    (
                        key_pin,
                        cert.fingerprint,
                        cert.serial,
                        to_text(cert.not_after),
                        to_text(now),
                        agent_port,
                        name,
                    ),
                )
                self._relearned(
                    db,
                    name,
                    cert,
                    highest_epoch,
                    now,
                    reason="renewed after the backup the store was restored from",
                    previous=verdict["cert_serial"],
                )
                _apart(db, name, names_apart)
                return True
            db.execute(
                "INSERT INTO nodes (name, addresses, dns_names, agent_version, agent_port,"
                " key_pin, cert_fingerprint, cert_serial, cert_not_after, enrolled_at,"
                " token_id) VALUES (?, ?, ?, '', ?, ?, ?, ?, ?, ?, 'relearned')",
                (
                    name,
                    json.dumps(list(addresses)),
                    json.dumps(list(dns_names)),
                    agent_port,
                    key_pin,
                    cert.fingerprint,
                    cert.serial,
                    to_text(cert.not_after),
                    to_text(now),
                ),
            )
            self._relearned(db, name, cert, highest_epoch, now, addresses=list(addresses))
            _apart(db, name, names_apart)
        return True

    def _relearned(
        self,
        db: sqlite3.Connection,
        name: str,
        cert: NodeCert,
        highest_epoch: int,
        now: dt.datetime,
        **detail: Any,
    ) -> None:
        """A node re-learned (``relearn``): its certificate recorded, the epoch floor raised to
        what it has seen, its tokens superseded (``supersede_tokens``: every token the store
        holds predates the backup or the loss, and the certificate its agent holds may be from
        an enrolment by any of them since, or by one the store never saw), audited as
        ``node.relearned``."""
        _record_node_cert(db, name, cert, now, self.cap_now())
        detail["superseded_tokens"] = supersede_tokens(db, name, now)
        floor = max(_meta(db, "epoch_floor", 0), highest_epoch)
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch_floor', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(floor),),
        )
        self._audit(
            db,
            now,
            f"node:{name}",
            "node.relearned",
            name,
            **detail,
            cert_fingerprint=cert.fingerprint,
            epoch_floor=floor,
        )

    def _renewed_since_backup(
        self,
        db: sqlite3.Connection,
        known: sqlite3.Row,
        name: str,
        names: tuple[tuple[str, ...], tuple[str, ...]],
        cert: NodeCert,
        issued_at: dt.datetime | None,
    ) -> bool:
        """Whether a known node's caller, refused by the certificate on record, is its agent
        with a certificate renewed after the backup this store was restored from
        (``restore_began``). Review of s38 (M1): only while the certificate on record is the
        backup's own (issued before it: at most once a node, so two certificates issued since
        cannot take turns), and that certificate has not been heard since the restore (an
        agent still beating with it is the node: a certificate issued since, of a node
        removed and enrolled again after the backup, say, does not displace it); for the
        node's names; not revoked. The backup's time less ``RESTORE_SLACK``: NotBefore has
        whole seconds, and a renewal signed in a transaction the backup did not see may be
        stamped a moment before it (L1)."""
        made = db.execute("SELECT value FROM meta WHERE key = 'restored_backup_at'").fetchone()
        if made is None or issued_at is None or known["removed_at"] is not None:
            return False
        since = dt.datetime.fromisoformat(made["value"]).replace(microsecond=0) - RESTORE_SLACK
        addresses, dns_names = names
        if (
            issued_at < since
            or json.loads(known["addresses"]) != list(addresses)
            or json.loads(known["dns_names"]) != list(dns_names)
            or cert.fingerprint in (known["cert_fingerprint"], known["prev_cert_fingerprint"])
        ):
            return False
        on_record = db.execute(
            "SELECT issued_at FROM certificates WHERE serial = ?", (known["cert_serial"],)
        ).fetchone()
        backup_at = dt.datetime.fromisoformat(made["value"])
        if on_record is not None and dt.datetime.fromisoformat(on_record["issued_at"]) >= backup_at:
            # Already re-learned (or renewed) since the backup. Against the backup's own time,
            # without the slack: the backup's certificate was recorded before it was made (a
            # node enrolled seconds before the backup is no exception).
            return False
        restored = db.execute("SELECT value FROM meta WHERE key = 'restored_at'").fetchone()
        heard = known["last_heartbeat"]
        with self._seen_lock:
            live = name in self._seen
        if live or (
            restored is not None
            and heard is not None
            and dt.datetime.fromisoformat(heard) >= dt.datetime.fromisoformat(restored["value"])
        ):
            return False
        revoked = db.execute(
            "SELECT 1 FROM certificates WHERE serial = ? AND revoked_at IS NOT NULL",
            (cert.serial.lstrip("0") or "0",),
        ).fetchone()
        return revoked is None

    # --- epochs -------------------------------------------------------------------------------

    def epoch_floor(self) -> int:
        with self._db.read() as db:
            return _meta(db, "epoch_floor", 0)

    def advance_epoch(self, to: int, *, now: dt.datetime, actor: str) -> int:
        """Raise the epoch floor to ``to`` (never lower it); the next rollout's epoch is above
        it. Returns the floor. EpochFixed while a rollout has not ended, checked in this
        transaction (``AdvanceEpoch``'s early check reads before it)."""
        with self._db.tx() as db:
            live = db.execute(_LIVE, _TERMINAL).fetchone()
            if live is not None:
                raise EpochFixed(live["id"], live["state"])
            floor = max(_meta(db, "epoch_floor", 0), to)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch_floor', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(floor),),
            )
            self._audit(db, now, actor, "epoch.advanced", "leader", floor=floor)
        return floor

    def renew_ca(
        self, prepare: Callable[[], CARenewal], *, now: dt.datetime, actor: str
    ) -> dict[str, Any]:
        """Renew the CA's certificate (``tlsroll ca renew``, ``leader.ca_renewal``) in one
        transaction that first checks that no rollout has begun and not ended
        (``RolloutHoldsCA``: a rollout that begins waits for this transaction, and stages the
        renewed CA certificate), then ``prepare()``s the renewal (its files written aside)
        and audits it (``ca.renewed``: ``detail``, what it returns). Only once that has
        committed, still under the write lock, is it put in place (``put_in_place``: the
        certificate renamed into place and adopted); a transaction that fails (the audit
        refused, a full disk at the COMMIT) ``discard``s it: nothing is changed, and nothing
        audited (review s48rev1 L1)."""
        renewal: CARenewal | None = None
        failed: list[Exception] = []

        def put() -> None:
            assert renewal is not None
            try:
                renewal.put_in_place()
            except Exception as exc:  # (said below, to the caller)
                failed.append(exc)

        try:
            with self._db.tx() as db:
                live = db.execute(_LIVE, _TERMINAL).fetchone()
                if live is not None:
                    raise RolloutHoldsCA(live["id"], live["state"])
                renewal = prepare()
                self._audit(db, now, actor, "ca.renewed", "ca", **renewal.detail)
                # When, and of what: who was handed a certificate before it since is
                # still to get the renewed one (``leader.expiry``: ``ca_renewals``). Every
                # renewal is kept (review s48rev5 M2: the last one alone forgot who still
                # held the certificate before an earlier one), and the last one also as
                # ``ca_renewed``, the row of the releases before, which they read.
                entry = {"at": to_text(now), **renewal.detail}
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('ca_renewals', ?)",
                    (json.dumps([*_ca_renewal_rows(db), entry]),),
                )
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('ca_renewed', ?)",
                    (json.dumps(entry),),
                )
                self._db.after_commit(put)
        except BaseException:
            if renewal is not None:
                renewal.discard()
            raise
        if failed:
            renewal.discard()
            raise CARenewalNotInPlace(str(failed[0]))
        return renewal.detail

    def ca_renewals(self) -> list[CARenewed]:
        """Every ``tlsroll ca renew`` (``renew_ca``), in the order they were made (``[]``: none).
        A store of a release that kept the last one alone (``ca_renewed``) has that one; one
        made there by such a release after this one's (a downgrade) comes last."""
        with self._db.read() as db:
            rows = _ca_renewal_rows(db)
        found = []
        for detail in rows:
            try:
                at = dt.datetime.fromisoformat(detail["at"])
                previous_end = dt.datetime.fromisoformat(detail["previous_not_after"])
            except (KeyError, TypeError, ValueError):  # (not one this code wrote)
                _skipped_ca_renewal("ca_renewals row", detail)
                continue
            if at.tzinfo is None or previous_end.tzinfo is None:
                _skipped_ca_renewal("ca_renewals row", detail)
                continue
            found.append(
                CARenewed(
                    at=at,
                    serial=str(detail.get("serial", "")),
                    previous_serial=str(detail.get("previous_serial", "")),
                    previous_fingerprint=str(detail.get("previous_fingerprint", "")),
                    previous_not_after=previous_end,
                    fingerprint=str(detail.get("fingerprint", "")),
                )
            )
        return found

    # --- audit --------------------------------------------------------------------------------

    def record_event(
        self, kind: str, actor: str, subject: str, now: dt.datetime, **detail: Any
    ) -> None:
        with self._db.tx() as db:
            self._audit(db, now, actor, kind, subject, **detail)


def ca_pinned(pin: str) -> Callable[[sqlite3.Connection], None]:
    """A new store of the CA of ``pin``: recorded by the file's first transaction
    (``Store(path, created=ca_pinned(…))``), as ``Store.own_ca_pin`` records it in one of an
    earlier release."""

    def write(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO meta (key, value) VALUES ('ca_pin', ?)", (pin,))

    return write


def relearning(
    until: dt.datetime, *, now: dt.datetime, actor: str
) -> Callable[[sqlite3.Connection], None]:
    """A store begun by ``--reinitialise``: nodes may be re-learned until ``until``. Written by
    the new file's first transaction (``Store(path, created=relearning(…))``), so that no
    store exists without it: a leader killed between two transactions started again on an
    empty store that re-learned nothing, and a second ``--reinitialise`` refused it as
    intact (audit of session 33, M2)."""

    def write(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('relearn_until', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (to_text(until),),
        )
        # Every list the CA issued before is one this store has not seen (its revocations
        # are learned from the agents that hold one: ``Store.learn_revoked``); those it issues
        # are numbered from the clock's now on (``_bump_crl``).
        for key, number in (("crl_restored_above", 0), ("crl_restored_below", crl_time(now))):
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, str(number)),
            )
        LeaderStore._audit(db, now, actor, "store.reinitialised", "leader", relearn_until=until)

    return write


_CUT_OFF = (
    "SELECT n.name FROM nodes n JOIN certificates c ON c.serial = n.cert_serial"
    " WHERE n.removed_at IS NULL AND c.revoked_at IS NOT NULL"
)
"""The enrolled nodes whose agent is cut off (``Store.cut_off_nodes``, ``cut_off_in``)."""


def cut_off_in(db: sqlite3.Connection, name: str) -> bool:
    """Inside the caller's transaction: whether node ``name``'s agent is cut off, by
    ``Store.cut_off_nodes``' rule (enrolled, its certificate on record revoked), as the
    store has it now: a revocation committed before this transaction began is seen. One point
    read (the node's row by its name, its certificate by its serial), not a scan: for a
    write that decides by it (``SchemaStore.save_states``' ``if_cut_off``)."""
    row = db.execute(f"{_CUT_OFF} AND n.name = ?", (name,)).fetchone()
    return row is not None


def check_caller_in(
    db: sqlite3.Connection, name: str, fingerprint: str, serial: str
) -> sqlite3.Row:
    """Inside a write transaction: the row of node ``name`` if the certificate it calls with
    (``fingerprint``, ``serial`` hex) may call, ``LeaderService._check_on_record``'s rules
    and messages (its early check, read before the write: a removal or revocation may commit
    between them); else Superseded, which the caller gets as UNAUTHENTICATED."""
    row: sqlite3.Row | None = db.execute(
        "SELECT * FROM nodes WHERE name = ? AND removed_at IS NULL", (name,)
    ).fetchone()
    if row is None:
        raise Superseded(rpc.not_enrolled(name))
    if fingerprint not in {row["cert_fingerprint"], row["prev_cert_fingerprint"]} - {""}:
        raise Superseded(rpc.not_on_record(name))
    if _revoked(db, serial.lstrip("0") or "0"):
        raise Superseded(rpc.revoked_node(name))
    # The one before a revoked certificate on record (a store written before ``Store.revoke``
    # revoked both): the node is cut off, so the one before may not renew it back either.
    if fingerprint != row["cert_fingerprint"] and _revoked(db, row["cert_serial"]):
        raise Superseded(rpc.revoked_node(name))
    return row


def _ca_renewal_rows(db: sqlite3.Connection) -> list[dict[str, Any]]:
    """The renewals of the CA certificate as ``renew_ca`` recorded them, oldest first: the
    list (``ca_renewals``), and the last one (``ca_renewed``: all a release before it kept,
    and what such a release writes) after it unless it is in it already. The list is written
    from this at the next renewal, so a store of an earlier release keeps its renewal."""
    values = {
        r["key"]: r["value"]
        for r in db.execute(
            "SELECT key, value FROM meta WHERE key IN ('ca_renewals', 'ca_renewed')"
        )
    }
    listed = _meta_json(values, "ca_renewals")
    if not isinstance(listed, list):
        _skipped_ca_renewal("ca_renewals", listed)
        listed = []
    rows = []
    for row in listed:
        if isinstance(row, dict):
            rows.append(row)
        else:
            _skipped_ca_renewal("ca_renewals", row)
    last_row = _meta_json(values, "ca_renewed")
    if isinstance(last_row, dict):
        if all(r.get("serial") != last_row.get("serial") for r in rows):
            rows.append(last_row)
    else:
        _skipped_ca_renewal("ca_renewed", last_row)
    return rows


_MISSING = object()  # a meta key not there (``_meta_json``)
_CA_RENEWALS_SKIPPED: set[str] = set()  # said once per process (``_skipped_ca_renewal``)


def _meta_json(values: dict[str, Any], key: str) -> Any:
    """A meta value written as JSON (``_MISSING``: none; a value that is not JSON comes back
    as itself, for the caller to skip as one of the wrong shape)."""
    if key not in values:
        return _MISSING
    value = values[key]
    try:
        return json.loads(value) if isinstance(value, str | bytes) else value
    except ValueError:
        return value


def _skipped_ca_renewal(key: str, value: Any) -> None:
    """A ``ca_renewals`` / ``ca_renewed`` value or row of the wrong shape (not one this code
    wrote: a hand edit, a damaged store): skipped, never raised (the leader's start and
    ``certs check-expiration`` read them), and said once per process and key."""
    if value is _MISSING or key in _CA_RENEWALS_SKIPPED:
        return
    _CA_RENEWALS_SKIPPED.add(key)
    log.warning(
        "store.ca_renewal_skipped",
        key=key,
        value_type=type(value).__name__,
        detail="a CA renewal record of the wrong shape is skipped: who still holds the "
        "certificate it replaced is not warned about",
    )


def _meta(db: sqlite3.Connection, key: str, default: int) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row["value"]) if row else default


def revoke_superseded_in(
    db: sqlite3.Connection,
    node: str,
    live_fingerprint: str,
    *,
    before: dt.datetime,
    now: dt.datetime,
) -> list[str]:
    """``Store.revoke_superseded`` inside the caller's write transaction (the engine's write
    of the node's end: one transaction, not two). A caller whose transaction is routine
    moves ``Database.generation`` on after it if this revoked anything (``Database.touch``):
    the heartbeat path keeps the revocation list."""
    # "Before" is the order the certificates were recorded in (``seq``, an INTEGER PRIMARY
    # KEY: a copy of the file keeps it, migration 10), not their ``issued_at``: the leader's
    # clock, ahead when the live one's predecessor was issued and corrected since, left that
    # one unrevoked, valid for up to 397 days and not on the revocation list (clock audit
    # s35, F).
    live = db.execute(
        "SELECT seq FROM certificates WHERE kind = 'server' AND node = ?"
        " AND fingerprint = ? ORDER BY seq DESC LIMIT 1",
        (node, live_fingerprint),
    ).fetchone()
    older = "seq < ?" if live is not None else "issued_at < ?"
    serials = [
        r["serial"]
        for r in db.execute(
            "SELECT serial FROM certificates WHERE kind = 'server' AND node = ?"  # noqa: S608
            f" AND revoked_at IS NULL AND fingerprint != ? AND {older}",
            (node, live_fingerprint, live["seq"] if live is not None else to_text(before)),
        )
    ]
    if not serials:
        return []
    _revoke_in(db, serials, "superseded", now, urgent=False)
    LeaderStore._audit(
        db,
        now,
        "leader",
        "certificate.superseded",
        node,
        serials=serials,
        live_fingerprint=live_fingerprint,
    )
    return serials


def revoke_undelivered_in(
    db: sqlite3.Connection,
    node: str,
    staged_fingerprint: str,
    *,
    rollout_id: str,
    now: dt.datetime,
) -> list[str]:
    """Inside the caller's write transaction (``SchemaStore.save_states``): revoke (reason
    "never delivered") the server certificates of ``node`` that rollout ``rollout_id``
    recorded (``record_certificate_in``) other than the one the node staged in it
    (``staged_fingerprint``; "" if none). Certificates the leader recorded and no node holds:
    a preflight's, whose stage never sent it (a leader stopped in between, an abort) or sent
    another. (One a stage in flight at an abort records after the write that skipped its
    node is not revoked here: ``SchemaStore.record_stage_certificate`` revokes it in the
    write that records it, and the stage never sends it.) Not urgent (``_bump_crl``):
    nothing presents them. A routine caller moves ``Database.generation`` on if this revoked
    anything. Returns the serials revoked now.

    They were picked by their ``issued_at`` within the rollout's span, by the leader's clock:
    a step of it during the rollout left one out (valid and on record until it expired), or
    took in another rollout's issued while the clock was ahead, maybe the one the node
    serves, revoked as "never delivered": its clients' next check of the revocation list
    failed (session 36)."""
    serials = [
        r["serial"]
        for r in db.execute(
            "SELECT serial FROM certificates WHERE kind = 'server' AND node = ?"
            " AND revoked_at IS NULL AND fingerprint != ? AND rollout_id = ? ORDER BY seq",
            (node, staged_fingerprint, rollout_id),
        )
    ]
    return revoke_never_delivered_in(db, node, serials, now=now)


def revoke_never_delivered_in(
    db: sqlite3.Connection, node: str, serials: list[str], *, now: dt.datetime
) -> list[str]:
    """Inside the caller's write: ``serials`` (server certificates of ``node`` no node was
    given) revoked as "never delivered", not urgently, with their audit event."""
    if not serials:
        return []
    _revoke_in(db, serials, "never delivered", now, urgent=False)
    LeaderStore._audit(db, now, "leader", "certificate.undelivered", node, serials=serials)
    return serials


def _revoke_in(
    db: sqlite3.Connection,
    serials: list[str],
    reason: str,
    now: dt.datetime,
    *,
    urgent: bool = True,
    lineage: Mapping[str, str] | None = None,
) -> None:
    """Inside the caller's write: ``serials`` revoked ``now`` for ``reason``, and the
    revocation list's number moved on (``_bump_crl``). ``lineage`` (``lineage_in``): those
    among them issued from another one revoked (serial -> that one's), whose reason names it."""
    taken = lineage or {}
    db.executemany(
        "UPDATE certificates SET revoked_at = ?, revoke_reason = ? WHERE serial = ?",
        [
            (to_text(now), f"issued from {taken[s]}: {reason}" if taken.get(s) else reason, s)
            for s in serials
        ],
    )
    _bump_crl(db, now, urgent=urgent)


def _check_hourly_certs(
    db: sqlite3.Connection,
    name: str,
    at: dt.datetime,
    kind: str = "node",
    per_hour: int | None = None,
) -> None:
    """Raise TooMany if node ``name`` had its hour's cap of certificates of ``kind`` issued in
    the hour before ``at`` (``Store.cap_now``: counted by elapsed time, not by the wall
    clock): ``NODE_CERTS_PER_HOUR`` of its own (a renewal, an enrolment's replay),
    ``per_hour`` (default ``WORKSTATION_CERTS_PER_HOUR``) for its workstations (its bootstrap
    service), with when the next may be: once the oldest issue that keeps the count at the
    cap is an hour old (a PC refused on switch day is told when to try again; so is an agent
    whose enrolment's replay is refused, review rev-enrol L3)."""
    since = to_text(at - dt.timedelta(hours=1))
    (recent,) = db.execute(
        "SELECT COUNT(*) FROM certificates WHERE kind = ? AND node = ? AND counted_at > ?",
        (kind, name, since),
    ).fetchone()
    if kind == "node":
        cap = NODE_CERTS_PER_HOUR
    elif kind == "workstation":
        cap = WORKSTATION_CERTS_PER_HOUR if per_hour is None else per_hour
    else:
        return
    if recent < cap:
        return
    # (A cap lowered since may leave more than it in the hour: the next is free once the
    # count is below it again.)
    row = db.execute(
        "SELECT counted_at FROM certificates WHERE kind = ? AND node = ? AND counted_at > ?"
        " ORDER BY counted_at LIMIT 1 OFFSET ?",
        (kind, name, since, recent - cap),
    ).fetchone()
    retry = None
    if row is not None:
        free_at = dt.datetime.fromisoformat(row[0]) + dt.timedelta(hours=1)
        retry = max(free_at - at, dt.timedelta(seconds=1))
    if kind == "node":
        raise TooMany(
            f"node {name!r} had {recent} certificates issued in the last hour "
            f"(at most {NODE_CERTS_PER_HOUR})",
            retry,
        )
    raise TooMany(
        f"node {name!r} asked for {recent} workstation certificates in the last hour "
        f"(at most {cap}: workstation_certs_per_hour in leader.toml)",
        retry,
    )


def crl_time(now: dt.datetime) -> int:
    """The lowest number a revocation list made at ``now`` gets: the time in milliseconds
    since 1970 (``_bump_crl``)."""
    return int(now.timestamp() * 1000)


def _bump_crl(db: sqlite3.Connection, now: dt.datetime, *, urgent: bool = True) -> None:
    """A certificate was revoked: the next revocation list gets a higher number, and one at
    least ``crl_time(now)``. Agents keep a list only if its number is not lower than the one
    they hold (``nodeagent.trust``), so the number must keep rising across a lost store
    (``--reinitialise``) or one restored from a backup, whose own count is behind what the
    agents hold: counted from 1 again, every list was ignored until the count passed theirs,
    and a leader certificate revoked meanwhile was still obeyed (audit s33 H1). A number from
    the clock is above any the CA gave before as long as the leader's clock has not gone
    back; ``Store.raise_crl_floor`` also raises it to what an agent says it holds. Up to 2**63
    (a SQLite integer, the protobuf's uint64, 20 octets of RFC 5280) for 290 million years.
    ``urgent``: a revocation the agents act on (a certificate revoked by the admin, a removed
    node's): the list's number is also recorded as ``crl_urgent``, and the leader sends that
    list to the agents at once. A server certificate superseded by the node's new one (a
    rollout's) or never delivered is not urgent: nothing presents it, and the list goes out
    with the watch's next round (``leader.service.CRL_NEWS_SECONDS``). ``now``: when the new
    number is issued (``Revocations.issued``; ``Store.renew_crl`` gives the list a new number
    a day after)."""
    floor = crl_time(now)
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('crl_number', ?) ON CONFLICT(key)"
        " DO UPDATE SET value = MAX(CAST(value AS INTEGER) + 1, CAST(excluded.value AS INTEGER))",
        (str(max(floor, 1)),),
    )
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('crl_issued', ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (str(int(now.timestamp())),),
    )
    if urgent:
        db.execute(
            "INSERT INTO meta (key, value) SELECT 'crl_urgent', value FROM meta"
            " WHERE key = 'crl_number' ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        )


def record_certificate_in(
    db: sqlite3.Connection,
    cert: IssuedCert,
    *,
    actor: str,
    now: dt.datetime,
    rollout_id: str = "",
    counted_at: dt.datetime | None = None,
) -> None:
    """``Store.record_certificate`` inside a write transaction (the engine records a
    preflight's certificate with its outcome: ``SchemaStore.save_states``). ``rollout_id``:
    the rollout that issued it (``revoke_undelivered_in``); ``counted_at``: see
    ``_record_cert``."""
    _record_cert(
        db,
        cert.serial,
        cert.kind,
        cert.subject,
        cert.node,
        cert.fingerprint,
        cert.issued_at,
        cert.not_after,
        counted_at=counted_at,
        rollout_id=rollout_id,
    )
    LeaderStore._audit(
        db, now, actor, f"certificate.issued.{cert.kind}", cert.subject, serial=cert.serial
    )


def _agent_serials(db: sqlite3.Connection, row: sqlite3.Row) -> list[str]:
    """The serials, not revoked, of the certificates the leader accepts from the agent of node
    ``row`` (the service's ``_check_on_record``): the one on record and, right after a renewal
    until the agent has used the new one, the one before it, which can renew again (so
    revoking only the one on record would leave a stolen machine a way back)."""
    serials = [row["cert_serial"]]
    if row["prev_cert_fingerprint"]:
        serials += [
            r["serial"]
            for r in db.execute(
                "SELECT serial FROM certificates WHERE node = ? AND kind = 'node'"
                " AND fingerprint = ?",
                (row["name"], row["prev_cert_fingerprint"]),
            )
        ]
    return [s for s in dict.fromkeys(serials) if not _revoked(db, s)]


def _serials_to_revoke(db: sqlite3.Connection, row: sqlite3.Row) -> list[str]:
    """Of ``_agent_serials``, what `tlsroll ca revoke` needs to cut node ``row``'s agent off:
    the one on record, whose revocation takes the one before it too (``_accepted_before``), or,
    that one revoked already (a store written before that), what is left. Naming both had the
    second command fail after the first took both, which reads as a failed revocation in an
    emergency (review s48rev5 L1)."""
    serials = _agent_serials(db, row)
    return serials[:1] if serials and serials[0] == row["cert_serial"] else serials


def _accepted_before(db: sqlite3.Connection, serials: Sequence[str]) -> list[str]:
    """Of the nodes whose agent's certificate on record is among ``serials`` (being revoked),
    the certificate the leader still accepts from before its renewal (``_agent_serials``), not
    revoked: revoking the one on record must cut the agent off, and the one before could
    renew it back into a fresh certificate (until the agent has used the new one, or for good
    on a machine that never got the renewal's answer: a stolen one kept off)."""
    found: list[str] = []
    for serial in serials:
        for row in db.execute(
            "SELECT * FROM nodes WHERE cert_serial = ? AND removed_at IS NULL"
            " AND prev_cert_fingerprint != ''",
            (serial,),
        ).fetchall():
            found += [s for s in _agent_serials(db, row) if s not in serials and s not in found]
    return found


def _renewable(
    db: sqlite3.Connection,
    workstation: str,
    previous: str | None,
    now: dt.datetime,
    key_pin: str = "",
) -> str:
    """The serial of the certificate a workstation's renewal renews (``Store.
    issue_workstation``): ``previous`` (its fingerprint, proven by the CSR) on record for
    ``workstation``, unrevoked and unexpired, or revoked as "renewed" less than
    ``WITHDRAW_WINDOW`` ago (a renewal whose answer was lost, asked again); NotRenewable
    naming why not, and what the PC does instead. Also NotRenewable for a new key
    ``key_pin`` that a certificate of ``workstation`` holds already: the request is a copy
    of one signed before (review s71: within the window, it revoked the PC's fresh
    certificate as "superseded" and certified its key again, and the PC's next renewal was
    refused); ``client renew`` makes a new key each run, its retry of a lost answer too."""
    again = "; enrol this PC again with the password: tlsroll client test-connection URL"
    if previous is None:
        raise NotRenewable(f"no proof of the certificate to renew{again}")
    if key_pin:
        certified = db.execute(
            "SELECT 1 FROM certificates WHERE kind = 'workstation' AND subject = ? AND key_pin = ?",
            (workstation, key_pin),
        ).fetchone()
        if certified:
            raise NotRenewable(
                f"the new key of {workstation} is certified already (a copy of an earlier "
                "renewal's request): tlsroll client renew asks with a new key each run"
            )
    row = db.execute(
        "SELECT serial, not_after, revoked_at, revoke_reason FROM certificates"
        " WHERE kind = 'workstation' AND subject = ? AND fingerprint = ?",
        (workstation, previous),
    ).fetchone()
    if row is None:
        raise NotRenewable(
            f"the certificate of {workstation} is not one this cluster's leader issued{again}"
        )
    revoked = from_text(row["revoked_at"])
    if revoked is not None and not (
        row["revoke_reason"] == "renewed"
        and now - revoked < WITHDRAW_WINDOW
        and not _revoked_since(db, workstation, revoked)
    ):
        if row["revoke_reason"] == "renewed" and not _revoked_since(db, workstation, revoked):
            # Its renewal's answer lost, asked again too late: the password's enrolment
            # proves the name with it (``_lost_renewal``), no --replace needed.
            raise NotRenewable(
                f"the certificate of {workstation} is revoked: renewed {revoked:%Y-%m-%d %H:%M}"
                f" UTC, more than {WITHDRAW_WINDOW.seconds // 60} minutes ago (if this PC never"
                f" got the new one, its answer was lost){again}"
            )
        raise NotRenewable(f"the certificate of {workstation} is revoked{again}")
    ends = from_text(row["not_after"])
    if ends is None or ends <= now:
        raise NotRenewable(f"the certificate of {workstation} has ended{again}")
    return str(row["serial"])


def _check_renewal_budget(
    db: sqlite3.Connection, workstation: str, serial: str, now: dt.datetime
) -> None:
    """The renewal of ``workstation``'s certificate ``serial`` (``_renewable``'s) within the
    name's own budget (``FORCED_RENEWAL_EVERY``), or RenewedTooSoon with when it may be;
    NotRenewable for a retry of a lost answer past ``RENEWAL_TRIES``. By the leader's clock
    ``now``, as the retries' window is (a step of it moves when a forced one may)."""
    row = db.execute(
        "SELECT issued_at, not_after, revoked_at FROM certificates WHERE serial = ?", (serial,)
    ).fetchone()
    revoked = from_text(row["revoked_at"])
    if revoked is not None:  # a retry of a renewal whose answer was lost (``_renewable``)
        since = db.execute(
            "SELECT issued_at FROM certificates WHERE kind = 'workstation' AND subject = ?",
            (workstation,),
        ).fetchall()
        tries = sum(1 for r in since if (at := from_text(r[0])) is not None and at >= revoked)
        if tries >= RENEWAL_TRIES:
            raise NotRenewable(
                f"the certificate of {workstation} was renewed {tries} times since "
                f"{revoked:%Y-%m-%d %H:%M} UTC and none of them reached this PC (its answers "
                "lost): enrol this PC again with the password: tlsroll client test-connection URL"
            )
        return
    issued, ends = from_text(row["issued_at"]), from_text(row["not_after"])
    assert issued is not None and ends is not None
    due = issued + (ends - issued) * bootstrap_base.RENEWAL_DUE_FRACTION
    free_at = issued + FORCED_RENEWAL_EVERY
    if now >= due or now >= free_at:
        return
    retry = min(max(free_at - now, dt.timedelta(seconds=1)), FORCED_RENEWAL_EVERY)
    raise RenewedTooSoon(
        f"the certificate of {workstation} was issued {issued:%Y-%m-%d %H:%M} UTC: one not "
        f"due yet is renewed (--force) once it is {FORCED_RENEWAL_EVERY / _HOUR:g} hours old, from "
        f"{free_at:%Y-%m-%d %H:%M} UTC",
        retry,
    )


def _lost_renewal(
    db: sqlite3.Connection,
    workstation: str,
    previous: str | None,
    held: Sequence[sqlite3.Row],
) -> bool:
    """Whether an enrolment with the password (``Store.issue_workstation``, no renewal) that
    proves ``previous`` is the PC whose renewal's answer was lost: ``previous`` is a
    certificate of ``workstation`` revoked as "renewed" (that reason only: not by the admin,
    not superseded), and the name's live certificates ``held`` are the one that renewal
    issued (recorded in its transaction: issued when ``previous`` was revoked), which the PC
    never got. Then it counts as proven, as the live certificate would (review s71: the PC,
    told to enrol again with the password, was refused the name as "taken" by the renewal
    nobody got: ``--replace`` at that node, `workstations revoke` at another). Once that
    certificate is renewed, superseded or revoked, or the name enrolled since, it does not:
    that one's holder keeps the name. So too where the live one is a retry's of that renewal
    (within the window, with ``previous`` again: ``_renewable``) whose answer was lost too:
    the audit's ``workstation.renewed`` names what each renewal renews, and only retries of
    ``previous`` count (session 73: ``--replace`` was needed at that node). Read only here,
    once a proof of a renewed certificate meets a later live one (the audit has no index for
    these rows: a scan, rare)."""
    if previous is None or not held:
        return False
    row = db.execute(
        "SELECT serial, revoked_at, revoke_reason FROM certificates WHERE kind = 'workstation'"
        " AND subject = ? AND fingerprint = ?",
        (workstation, previous),
    ).fetchone()
    if row is None or row["revoke_reason"] != "renewed":
        return False
    revoked = from_text(row["revoked_at"])
    if revoked is None:
        return False
    if all(from_text(r["issued_at"]) == revoked for r in held):
        return True
    if _revoked_since(db, workstation, revoked):
        return False
    renewals = db.execute(
        "SELECT detail FROM audit WHERE kind = 'workstation.renewed' AND subject = ?",
        (workstation,),
    ).fetchall()
    retries = set()
    for (detail,) in renewals:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            said = json.loads(detail)
            if said.get("renews") == row["serial"]:
                retries.add(said.get("serial"))
    return all(r["serial"] in retries for r in held)


# The reasons a workstation certificate is revoked by a renewal or an enrolment of its name, or
# withdrawn undelivered: none of them is a revocation of the name by the admin (``_revoked_since``).
_REPLACED = frozenset({"renewed", "superseded", "never delivered"})


def _revoked_since(db: sqlite3.Connection, workstation: str, since: dt.datetime) -> bool:
    """Whether a certificate of ``workstation`` was revoked at or after ``since`` for a reason
    of its own (the admin's ``workstations revoke``, a node's removal, a revocation of the node
    certificate it was issued from): then a renewal's retry with the certificate it renewed is
    refused (``_renewable``), or the retry would undo that revocation (review s71 revrenew H1)."""
    rows = db.execute(
        "SELECT revoked_at, revoke_reason FROM certificates WHERE kind = 'workstation'"
        " AND subject = ? AND revoked_at IS NOT NULL",
        (workstation,),
    ).fetchall()
    for r in rows:
        at = from_text(r["revoked_at"])
        if at is not None and at >= since and r["revoke_reason"] not in _REPLACED:
            return True
    return False


def lineage_in(db: sqlite3.Connection, serials: Sequence[str]) -> dict[str, str]:
    """What a revocation of ``serials`` that ends their keys' trust takes with it, not revoked
    yet: each one's key is taken for lost, so what was issued on its strength is the holder's
    of that key, who may not be its owner. Returns each such serial with the one it was issued
    from ("" for the one before a node's certificate on record: below).

    The rule (review s64 b4 H). The ways a key brings a certificate to life: a renewal with it
    (``Store.renew_node_certificate``: the new certificate, for a new key), a workstation
    certificate its node's bootstrap service asks for with it (``Store.issue_workstation``),
    and a certificate of the same key (an enrolment's replay, a node enrolled again with its
    key on record: ``Store.enrol``); each is recorded with the certificate it was issued from
    (``issued_from``, ``leader.db._V17``). So, to a fixed point: every certificate issued
    from one taken, revoked or not (a renewal of a renewal: a chain; one revoked before is
    passed through, not revoked again), and the one before a node's certificate on record
    that is taken (``_accepted_before``: the leader still accepts it, and it would renew the
    node back).

    For the revocations that end a key's trust: `tlsroll ca revoke` (``Store.revoke``; the
    admin's reason is not parsed: a key revoked is a key not trusted), `tlsroll nodes remove`
    (``Store.remove_node``: everything of the node anyway) and a list learned after a restore
    or a lost store (``Store.learn_revoked``: the CA revoked the serial, whatever the reason,
    and a certificate renewed from it at the restored leader before the list was learned was
    issued to whoever held a revoked key). Not for those that record a replacement: a server
    certificate "superseded" by the node's next one or "never delivered", a workstation's
    "superseded" by its PC's re-enrolment or withdrawn (nothing is issued from those kinds; a
    re-enrolment's new certificate is recorded as issued from the node's certificate, not the
    one it supersedes), nor the leader's own (a restore's: nothing is issued from them). A
    node's renewal revokes nothing (the old certificate ends on its own), so a node certificate
    on a list was revoked by one of the three above, never by a normal renewal: its renewed
    successor is taken rightly, and an honest node's renewal whose predecessor nobody revoked
    is left alone. A certificate with no recorded parent (issued before schema 17, by an older
    leader, by an enrolment of a new key, or re-learned after a restore) is taken by nothing
    but its own revocation or its node's removal. The pairs map to "" (revoked for the same
    reason, as before: the one before is the same node's, of the same key's life)."""
    seen = set(serials)
    found: dict[str, str] = {}
    todo = list(dict.fromkeys(serials))
    while todo:  # (one level of the tree a round: a query each, not one per certificate)
        listed = json.dumps(todo)
        step: dict[str, str] = {
            row["serial"]: row["issued_from"]
            for row in db.execute(
                "SELECT serial, issued_from FROM certificates"
                " WHERE issued_from IN (SELECT value FROM json_each(?)) ORDER BY seq",
                (listed,),
            )
        }
        on_record = [
            row["cert_serial"]
            for row in db.execute(
                "SELECT cert_serial FROM nodes WHERE removed_at IS NULL"
                " AND prev_cert_fingerprint != ''"
                " AND cert_serial IN (SELECT value FROM json_each(?))",
                (listed,),
            )
        ]
        for pair in _accepted_before(db, on_record):
            step.setdefault(pair, "")
        todo = [serial for serial in step if serial not in seen]
        seen.update(todo)
        found.update((serial, step[serial]) for serial in todo if not _revoked(db, serial))
    return found


def _apart(db: sqlite3.Connection, name: str, names_apart: bool) -> None:
    """Node ``name``'s certificate (re-learned) keeps its names apart: its renewals will too
    (``leader.db._V15``; never unset here)."""
    if names_apart:
        db.execute("UPDATE nodes SET names_apart = 1 WHERE name = ?", (name,))


def _record_node_cert(
    db: sqlite3.Connection,
    name: str,
    cert: NodeCert,
    now: dt.datetime,
    counted_at: dt.datetime | None,
    *,
    issued_from: str | None = None,
) -> None:
    """Record node ``name``'s own certificate (an enrolment, its replay, a renewal, a relearn),
    issued ``now`` and counted by the hourly caps at ``counted_at`` (``_record_cert``), with its
    key's pin: once the certificate is revoked, no enrolment takes that key again
    (``_key_refused``); ``issued_from``: a renewal's certificate presented, or the one before of
    the same key (a replay, an enrolment of the key on record), ``leader.db._V17``."""
    _record_cert(
        db,
        cert.serial,
        "node",
        name,
        name,
        cert.fingerprint,
        now,
        cert.not_after,
        counted_at=counted_at,
        issued_from=issued_from,
        key_pin=cert.key_pin,
    )


def _record_cert(
    db: sqlite3.Connection,
    serial: str,
    kind: str,
    subject: str,
    node: str,
    fingerprint: str,
    issued_at: dt.datetime,
    not_after: dt.datetime,
    *,
    counted_at: dt.datetime | None = None,
    rollout_id: str = "",
    issued_from: str | None = None,
    key_pin: str = "",
) -> None:
    """Record a certificate (once: one on record already stays as it is), next in record
    order (``seq``). ``counted_at``: when the hourly caps count it issued (``Store.cap_now``;
    None: they never do: a kind no cap counts, or one recorded after the fact).
    ``issued_from``: the serial (hex) of the certificate it was issued on the strength of
    (``leader.db._V17``, ``lineage_in``); None: none, or not known. ``key_pin``: a node
    certificate's key (``_record_node_cert``, ``leader.db._V18``), a workstation
    certificate's (``Store.issue_workstation``, from session 71: a renewal's key is never one
    certified before); '' for the other kinds, and where not known."""
    recorded = db.execute(
        "INSERT OR IGNORE INTO certificates (serial, kind, subject, node, fingerprint,"
        " issued_at, not_after, counted_at, rollout_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            serial,
            kind,
            subject,
            node,
            fingerprint,
            to_text(issued_at),
            to_text(not_after),
            to_text(counted_at),
            rollout_id,
        ),
    ).rowcount
    if recorded and issued_from is not None:
        _record_issued_from(db, serial, issued_from)
    if key_pin:
        _record_key_pin(db, serial, key_pin)


def _record_issued_from(db: sqlite3.Connection, serial: str, issued_from: str) -> None:
    """The parent of the certificate ``serial`` just recorded (schema 17), in the serials' one
    form (lower-case hex, no leading zeros). A statement of its own, as ``_record_key_pin``:
    the certificates' insert stays the one a leader of the schemas before writes (the tests'
    older leaders run it on a file without the column)."""
    db.execute(
        "UPDATE certificates SET issued_from = ? WHERE serial = ?",
        (issued_from.lower().lstrip("0") or "0", serial),
    )


def _stamp_row_keys(db: sqlite3.Connection, name: str | None = None) -> None:
    """The key of node ``name``'s row (None: of every node's row, removed ones too) onto the
    certificate the row names, where that has none on record (``_record_key_pin``: one
    recorded before schema 18, or by an older leader on the migrated store). Called wherever
    a row's key is about to be replaced (a renewal, a re-learning, an enrolment of a removed
    name) or its trust ends (``remove_node``, ``revoke``), and at the leader's start
    (``Store.stamp_row_keys``): the row was the only place that key was, and once it held
    another, a removed or revoked key enrolled again under another name (review s65 whole,
    M1, M2). A certificate is of one key: what the row says of its own is a fact, never
    changed."""
    db.execute(
        "UPDATE certificates SET key_pin = (SELECT n.key_pin FROM nodes n"
        " WHERE n.cert_serial = certificates.serial)"
        " WHERE kind = 'node' AND key_pin = '' AND serial IN (SELECT n.cert_serial FROM nodes n"
        " WHERE n.key_pin != '' AND (?1 IS NULL OR n.name = ?1))",
        (name,),
    )


def _record_key_pin(db: sqlite3.Connection, serial: str, key_pin: str) -> None:
    """The key of the node or workstation certificate ``serial`` just recorded (schema 18),
    unless one is on record already (a certificate is recorded once)."""
    db.execute(
        "UPDATE certificates SET key_pin = ? WHERE serial = ? AND key_pin = ''", (key_pin, serial)
    )


def _refuse_not_workstation(
    db: sqlite3.Connection, serial: str, own: Sequence[OwnCert], cas: set[str]
) -> None:
    """``NotWorkstation`` unless ``serial`` is a workstation certificate on record, or one
    not on record at all (``Store.revoke`` says "not on record" of it, as before)."""
    only = "`tlsroll workstations revoke` revokes workstation certificates only"
    if serial in cas:
        raise NotWorkstation(
            f"{serial} is the cluster CA's own certificate, not a workstation's: {only}, and"
            " `tlsroll ca revoke` refuses the CA's own (`tlsroll ca renew` replaces it: README"
            " 'Certificates')"
        )
    mine = next((c for c in own if c.serial == serial), None)
    row = db.execute("SELECT kind FROM certificates WHERE serial = ?", (serial,)).fetchone()
    if mine is not None:
        what = f"the {mine.kind}'s own certificate"
    elif row is not None and row["kind"] != "workstation":
        what = KIND_WORDS.get(row["kind"], f"a certificate of kind {row['kind']}")
    else:
        return
    raise NotWorkstation(
        f"{serial} is {what}, not a workstation's: {only}; revoke it with"
        f" `tlsroll ca revoke {serial}`"
    )


def _revoked(db: sqlite3.Connection, serial: str) -> bool:
    """Whether the certificate ``serial`` on record was revoked (one not on record was not)."""
    row = db.execute("SELECT revoked_at FROM certificates WHERE serial = ?", (serial,)).fetchone()
    return row is not None and row["revoked_at"] is not None


NEW_KEY = "enrol the node with a new key"
"""What every refusal of a key (``_key_refused``, and the key of a node whose certificate was
revoked) says; the agent adds the file to move aside (``nodeagent.identity.refused_key_advice``).
"""

_NEW_KEY_HOW = (
    f"{NEW_KEY}: on the node move DATA/node.key aside and start its agent again (this refusal "
    "did not use the join token)"
)
_RENEW_KEY_HOW = (
    "renew with a new key: on the node move DATA/node.key.new aside (the agent's next renewal "
    "makes a new one)"
)  # (the key a renewal asks for waits there: ``nodeagent.renewal``)
_RELEARN_HOW = (
    f"{NEW_KEY}: on the node move DATA/node.key and DATA/node.pem aside and start its agent "
    "again with a new join token"
)  # (a re-learned node's key is its only one: no certificate of another to renew with)


def _relearn_known_how(name: str) -> str:
    """``_RELEARN_HOW`` for a node the restored store still has on record (its agent renewed
    since the backup): a new key under its name is refused (``NameTaken``) until the node is
    removed, so that comes first (review s66 rva L2)."""
    return (
        f"{NEW_KEY}: on the leader run `tlsroll nodes remove {name}` first (this store has the "
        "node on record: an enrolment of a new key under its name is refused until then), then "
        "on the node move DATA/node.key and DATA/node.pem aside and start its agent again with "
        "a new join token"
    )


def _key_refused(
    db: sqlite3.Connection, name: str, key_pin: str, *, how: str = _NEW_KEY_HOW
) -> str | None:
    """Why node ``name``'s enrolment with the key of pin ``key_pin`` is refused, one line safe to
    send to the caller (it holds a join token: the names are no secret to it), or None; ``how``:
    the way on that ends it (an enrolment's; a renewal's and a re-learning's say theirs). The
    same rule for every way a key gets onto a node's row: an enrolment, a renewal
    (``renew_node_certificate``: the node's caller holds the key's private half, a copy) and a
    re-learning (``relearn``).

    Refused (review rev-enrol H1: after ``nodes remove`` a new token enrolled the node's old key
    again, and the copy of it called as the node again; a token for another name enrolled a
    revoked key at once): the key of a removed node (``nodes remove`` revoked its certificates:
    the key is taken for copied), any key a revoked node certificate carries (``ca revoke``: a
    key thought stolen; a renewal revokes nothing, so the key a renewal replaced is not refused
    for that), and the key of another node on record (a copy of its key enrolled as a second
    node). A certificate's key is in its row from schema 18 on (``leader.db._V18``); one
    recorded before (or by an older leader since) gets its node row's key at the leader's
    start and before that key leaves the row (``_stamp_row_keys``). The
    key of ``name``'s own row on record is ``enrol``'s to judge (the same key again: a replay,
    or a certificate that ended; its own certificate revoked: refused there)."""
    row = db.execute(
        "SELECT name, removed_at FROM nodes WHERE key_pin = ?"
        " AND (name != ? OR removed_at IS NOT NULL)"
        " ORDER BY removed_at IS NOT NULL DESC, name LIMIT 1",
        (key_pin, name),
    ).fetchone()
    if row is not None and row["removed_at"] is not None:
        when = dt.datetime.fromisoformat(row["removed_at"]).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (
            f"this key was node {row['name']!r}'s, removed {when} (its certificates revoked): {how}"
        )
    # (``kind = 'node'`` as a literal: SQLite uses the partial index of schema 18 only so.)
    revoked = db.execute(
        "SELECT serial, node FROM certificates WHERE kind = 'node' AND key_pin = ?"
        " AND revoked_at IS NOT NULL ORDER BY seq LIMIT 1",
        (key_pin,),
    ).fetchone()
    if revoked is None and row is not None:
        # Another node's certificate on record, revoked, recorded before schema 18.
        revoked = db.execute(
            "SELECT c.serial, c.node FROM nodes n JOIN certificates c ON c.serial = n.cert_serial"
            " WHERE n.name = ? AND c.revoked_at IS NOT NULL",
            (row["name"],),
        ).fetchone()
    if revoked is not None:
        return (
            f"a certificate of this key (node {revoked['node']!r}, serial {revoked['serial']}) "
            f"was revoked: {how}"
        )
    if row is not None:
        return f"this key is node {row['name']!r}'s, enrolled (a copy of its key?): {how}"
    return None


def _check_free(
    db: sqlite3.Connection,
    name: str,
    addresses: tuple[str, ...],
    dns_names: tuple[str, ...],
    reserved: Reserved,
) -> None:
    """NameTaken if the leader or another (not removed) node holds one of these names. One of
    the leader's, asked for under another node name, names the leader's node: most likely the
    admin meant it (``token create --node`` for the leader's own agent under another name,
    review s66 walk L7), which said only "address … is the leader's"."""
    own = reserved.leader_node
    way = f"; the leader's node is {own}: use --node {own}" if own else ""
    for held in set(addresses) & set(reserved.ips):
        raise NameTaken(f"address {held} is the leader's{way}")
    for held in set(dns_names) & set(reserved.dns):
        raise NameTaken(f"DNS name {held} is the leader's{way}")
    rows = db.execute(
        "SELECT name, addresses, dns_names FROM nodes WHERE removed_at IS NULL AND name != ?",
        (name,),
    ).fetchall()
    for row in rows:
        for held in set(addresses) & set(json.loads(row["addresses"])):
            raise NameTaken(
                f"address {held} belongs to node {row['name']!r}; "
                f"remove it first: tlsroll nodes remove {row['name']}"
            )
        for held in set(dns_names) & set(json.loads(row["dns_names"])):
            raise NameTaken(
                f"DNS name {held} belongs to node {row['name']!r}; "
                f"remove it first: tlsroll nodes remove {row['name']}"
            )


def _cert(row: sqlite3.Row) -> IssuedCert:
    return IssuedCert(
        serial=row["serial"],
        kind=row["kind"],
        subject=row["subject"],
        node=row["node"],
        fingerprint=row["fingerprint"],
        issued_at=dt.datetime.fromisoformat(row["issued_at"]),
        not_after=dt.datetime.fromisoformat(row["not_after"]),
        revoked_at=from_text(row["revoked_at"]),
        revoke_reason=hide_inside(row["revoke_reason"]),
    )


def _token(row: sqlite3.Row) -> Token:
    return Token(
        id=row["id"],
        description=hide_inside(row["description"]),
        created_at=dt.datetime.fromisoformat(row["created_at"]),
        expires_at=dt.datetime.fromisoformat(row["expires_at"]),
        uses_allowed=row["uses_allowed"],
        uses_left=row["uses_left"],
        revoked_at=from_text(row["revoked_at"]),
        node_name=row["node_name"],
        addresses=tuple(json.loads(row["addresses"])),
        dns_names=tuple(json.loads(row["dns_names"])),
        superseded_at=from_text(row["superseded_at"]),
    )


def superseded_how(db: sqlite3.Connection, tokens: list[Token]) -> list[Token]:
    """``tokens`` with what superseded each (``Token.superseded_by``), by one read of the audit
    whatever their number, and none when none is superseded: a re-learning of a token's node
    supersedes it in the transaction that audits the re-learning as ``node.relearned``, at the
    same time; anything else that supersedes is an enrolment (``supersede_tokens``, migration
    12). The audit is never pruned (review s44rev3 M1: a scan of it for every lookup of a
    superseded token, before its secret was checked): read only for a caller that says why a
    token was superseded (a refusal of a token whose secret was right, ``token list``), never
    for the checks of an enrolment, and by its partial index of the re-learnings
    (``audit_relearned``, migration 13), which SQLite uses only while ``kind =
    'node.relearned'`` is written in the query as it is in the index (not a parameter)."""
    superseded = {t.node_name for t in tokens if t.superseded_at is not None and t.node_name}
    if not superseded:
        return tokens
    relearned = {
        (r["subject"], from_text(r["at"]))
        for r in db.execute(
            "SELECT subject, at FROM audit WHERE kind = 'node.relearned'"
            " AND subject IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(superseded)),),
        )
    }
    return [
        t
        if t.superseded_at is None
        else replace(
            t,
            superseded_by="re-learning"
            if (t.node_name, t.superseded_at) in relearned
            else "enrolment",
        )
        for t in tokens
    ]


def supersede_tokens(db: sqlite3.Connection, name: str, now: dt.datetime) -> list[str]:
    """Inside an enrolment's (or a re-learning's) write transaction: every token of node
    ``name`` that could still enrol it (a use left, not revoked, not superseded yet) is
    superseded now; their ids. A token made after this moment is not: the way to enrol the
    node again is a new token (race audit of session 39, L2: a lost script's token, made
    before the node enrolled by another one, stayed valid and enrolled the node's key again,
    its agent's certificate then no longer on record)."""
    ids = [
        r["id"]
        for r in db.execute(
            "SELECT id FROM tokens WHERE node_name = ? AND uses_left > 0 AND revoked_at IS NULL"
            " AND superseded_at IS NULL ORDER BY created_at, id",
            (name,),
        )
    ]
    db.executemany(
        "UPDATE tokens SET superseded_at = ? WHERE id = ?", [(to_text(now), i) for i in ids]
    )
    return ids


def _revoked_text(db: sqlite3.Connection, token: Token) -> str:
    """Why a revoked token is refused: by the admin (``token revoke``, ``nodes remove``), or
    by the restore of the store from a backup (``Store.restore_began``)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'restored_at'").fetchone()
    if row is not None and from_text(row["value"]) == token.revoked_at:
        return (
            f"join token {token.id} revoked: the leader's store was restored from a backup, and"
            " it may have enrolled its node since; create a new token"
        )
    return f"join token revoked; {WAY_TO_JOIN_AGAIN}"


def superseded_text(token: Token) -> str:
    """Why a superseded token is refused, one line (safe to send: the id is public)."""
    when = token.superseded_at.strftime("%Y-%m-%d %H:%M:%S UTC") if token.superseded_at else "?"
    if token.superseded_by == "re-learning":
        return (
            f"join token {token.id} is superseded by {token.node_name}'s re-learning at {when}"
            " (the leader's restored or reinitialised store learned the node from its agent);"
            " create a new token"
        )
    return (
        f"join token {token.id} is superseded by {token.node_name}'s enrolment at {when};"
        " create a new token"
    )


NodesMade = dict[tuple[Any, ...], Node]
"""Nodes made from rows, by the rows' values (``Store.heard_of``)."""

_NODES = (
    "SELECT *, EXISTS (SELECT 1 FROM certificates c WHERE c.serial = nodes.cert_serial"
    " AND c.revoked_at IS NOT NULL) AS cert_revoked FROM nodes"
)
"""Nodes with whether the certificate on record is revoked (``Node.cert_revoked``)."""


def _node(row: sqlite3.Row) -> Node:
    return Node(
        name=row["name"],
        addresses=tuple(json.loads(row["addresses"])),
        dns_names=tuple(json.loads(row["dns_names"])),
        agent_version=row["agent_version"],
        agent_port=row["agent_port"],
        key_pin=row["key_pin"],
        cert_fingerprint=row["cert_fingerprint"],
        cert_serial=row["cert_serial"],
        cert_not_after=dt.datetime.fromisoformat(row["cert_not_after"]),
        enrolled_at=dt.datetime.fromisoformat(row["enrolled_at"]),
        last_heartbeat=from_text(row["last_heartbeat"]),
        token_id=row["token_id"],
        removed_at=from_text(row["removed_at"]),
        highest_epoch=row["highest_epoch"],
        prev_cert_fingerprint=row["prev_cert_fingerprint"],
        cert_renewed_at=from_text(row["cert_renewed_at"]),
        renewal_due_at=from_text(row["renewal_due_at"]),
        renewal_failing_since=from_text(row["renewal_failing_since"]),
        renewal_error=row["renewal_error"],
        cert_revoked=bool(row["cert_revoked"]) if "cert_revoked" in row.keys() else False,  # noqa: SIM118
        agent_features=_features(row["agent_features"]),
    )


@functools.lru_cache(maxsize=64)
def _features(text: str) -> tuple[str, ...]:
    """A node's stored ``agent_features`` (a JSON list; the nodes mostly share a few)."""
    try:
        names = json.loads(text)
    except ValueError:
        return ()
    return tuple(str(n) for n in names) if isinstance(names, list) else ()
