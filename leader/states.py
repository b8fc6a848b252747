"""Closed sets the wire names that live outside the pure core: a node's health at
``tlsroll nodes --check`` (``leader.node_check``), a viewer grant's state
(``leader.viewer.grants``) and which problem the leader sees with a node now (``NodeProblemRow``:
``leader.service.LeaderState.node_problems``), and the rows it keeps of the wrong passwords at
the nodes' servers (``LoginFailuresRow``).

They are defined here, apart from the code that decides them, because ``leader.wire`` needs
them for its codecs and every admin command imports ``leader.wire``: naming them must not
import the node check's TLS code (cryptography) nor the viewer's store.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import NamedTuple


class Health(StrEnum):
    SERVING = "serving"
    NOT_SERVING = "not-serving"  # answered, but not SERVING (or refused the call)
    UNREACHABLE = "unreachable"  # no answer in time, or the TLS handshake failed


class GrantState(StrEnum):
    UNUSED = "unused"  # the link has not been opened yet
    ACTIVE = "active"  # opened: a browser holds its session
    EXPIRED = "expired"
    REVOKED = "revoked"  # by the admin (`tlsroll viewer revoke`)
    # Ended by its browser's sign-out ("Abmelden"); like REVOKED, nothing signs in with it
    # again (its ``revoked_at`` is set; the audit's ``viewer_grant.signed_out`` tells it apart).
    SIGNED_OUT = "signed_out"


class NodeProblemKind(StrEnum):
    # Two agents use the node's identity: the leader neither plans nor switches it.
    TWIN_AGENTS = "twin-agents"
    # Its clock differs from the leader's (a warning: ``leader.node_clocks``).
    CLOCK_OFFSET = "clock-offset"
    # Its journal, put back from a copy made mid-switch, left it needing the admin (its agent
    # refuses stages, switches and rollbacks; ``nodeagent.journal``).
    NEEDS_ADMIN = "needs-admin"
    # Its bootstrap service should run (https with an auth password) but failed to start (its
    # agent says why): workstations cannot enrol there.
    BOOTSTRAP_DOWN = "bootstrap-down"
    # An agent keeps calling with an earlier certificate of the node, one a renewal replaced:
    # a copy of its key renewed itself (``LeaderService._refused``). Neither planned nor
    # switched, as with two agents.
    EARLIER_CERTIFICATE = "earlier-certificate"
    # Its agent cannot write its own store safely (its journal's checkpoint fails, a disk below
    # what a switch writes: ``HeartbeatRequest.store_trouble``): its checks refuse a switch.
    AGENT_STORE = "agent-store"


# The order node problems are listed in (``LeaderState.node_problems``, `schema show`, the
# viewer): what holds a node's rollout first (neither planned nor switched: two agents, an
# earlier certificate; its agent refuses every switch: needs the admin), then what its checks
# refuse a switch for (its agent's store, its clock beyond the preflight's limit), then what
# holds no rollout (its bootstrap service). By their names, information-only ``agent-store``
# came before ``needs-admin`` and ``twin-agents`` (review of s74 agenttrouble, L1).
NODE_PROBLEM_ORDER = (
    NodeProblemKind.TWIN_AGENTS,
    NodeProblemKind.EARLIER_CERTIFICATE,
    NodeProblemKind.NEEDS_ADMIN,
    NodeProblemKind.AGENT_STORE,
    NodeProblemKind.CLOCK_OFFSET,
    NodeProblemKind.BOOTSTRAP_DOWN,
)


def problem_rank(kind: str) -> int:
    """Where a problem of ``kind`` (a ``NodeProblemKind``'s value) is listed: its place in
    ``NODE_PROBLEM_ORDER``; one this release does not know (a newer leader's) last."""
    try:
        return NODE_PROBLEM_ORDER.index(NodeProblemKind(kind))
    except ValueError:
        return len(NODE_PROBLEM_ORDER)


class NodeProblemRow(NamedTuple):
    """A problem the leader sees with a node now (``NodeProblemView``): the node, what is
    wrong and what to do, since when, which problem, and (``CLOCK_OFFSET``) the node's clock
    less the leader's in seconds, and whether most nodes' differ by about as much at once
    (``leader_clock``: likelier the leader's clock is off; ``leader.skew.leader_step``), and
    (``AGENT_STORE``) what its agent said, cleaned (``said``: the viewer quotes the agent's own
    words, not the leader's sentence around them)."""

    node: str
    problem: str
    since: dt.datetime
    kind: NodeProblemKind = NodeProblemKind.TWIN_AGENTS
    clock_offset: float | None = None
    leader_clock: bool = False
    said: tuple[str, ...] = ()


class LoginFailuresRow(NamedTuple):
    """A node whose managed server counts wrong passwords at its own login (the client
    password; kept across its restarts), by its agent's latest heartbeat with the server's
    status (``ServerLoginFailuresView``): how many, when the latest was (the node's clock; None
    if the server does not say), and when the leader heard it."""

    node: str
    failures: int
    last_at: dt.datetime | None
    reported_at: dt.datetime
