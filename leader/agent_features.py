"""What the leader needs of a node's agent before it asks: the features (``tlsroll.features``)
each rollout and each request it sends relies on, in one table, and the words that say a node's
agent is too old. Pure: the planner, the agent pool and ``tlsroll nodes`` read it.

    needs = rollout_needs(Change.ENABLE_TLS, Strategy.TRANSITIONAL, FreezeMode.NODE, False)
    too_old(node.agent_version, node.agent_features, needs)
    # "its agent (tlsroll 0.2.0) is too old for the transitional strategy: upgrade it first"
    missing_for(request, node.agent_features)   # what a request carries that the agent lacks

A request field that carries behaviour is dropped unread by an agent that does not know it
(proto3), so sending it to such an agent would do something else without a word (a
transitional phase 1 would become a direct switch). The plan shows such a node as blocked and a
start refuses it (``leader.planner``); the agent pool refuses to send such a request at all
(``leader.agent_client``), whatever planned it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from leader.rollout_core import Change, FreezeMode, Strategy
from tlsroll import features

WHAT: Mapping[str, str] = {
    features.KEEP_HTTP: "the transitional strategy",
    features.ROLLBACK_UNDOES: "disable-tls",
    features.SWITCH_KEEP_FROZEN: "--freeze scope",
    features.ROLLBACK_KEEP_FROZEN: "--freeze scope",
    features.FREEZE_LEASE: "--freeze scope",
    features.OWN_CERTIFICATE: "--cert-dir",
    features.SWITCH_QUIET: "finalize --when-quiet",
    # Needed by no rollout: a leader restored from a backup learns what was revoked since from
    # the agents' lists, and an agent that cannot send its own has it replaced.
    features.HELD_CRL: "keeping revocations through a leader's restore",
    # Needed by no rollout either: the way back goes on without it, its plan saying that an
    # edited server config is put back with no copy kept (``leader.commands``).
    features.EDITED_CONFIG: "keeping a server config edited by hand on the way back",
}
"""What each feature is needed for, in the words of the command line (a node's "too old for
…"). Every feature the leader may need has its words here."""

# The table: what a rollout's requests need of the agent, by what they carry. A rollout needs
# the union of its change's and strategy's row and those of its options.
BY_CHANGE: Mapping[tuple[Change, Strategy | None], frozenset[str]] = {
    # Transitional phase 1: Switch and Stage's switch_to_come carry keep_http.
    (Change.ENABLE_TLS, Strategy.TRANSITIONAL): frozenset({features.KEEP_HTTP}),
    # The way back: Rollback carries undoes (empty: the switch from http).
    (Change.DISABLE_TLS, None): frozenset({features.ROLLBACK_UNDOES}),
}
"""(change, strategy; None: any) -> the features its requests need; missing: none (the seed's direct
switch, finalize, change-password, rotate-cert send nothing an agent could drop silently:
an unknown change is refused by the agent, INVALID_ARGUMENT)."""
SCOPE_FREEZE = frozenset(
    {features.SWITCH_KEEP_FROZEN, features.ROLLBACK_KEEP_FROZEN, features.FREEZE_LEASE}
)
"""``--freeze scope``: Switch and Rollback carry keep_frozen, Freeze its lease."""
OWN_CERTIFICATES = frozenset({features.OWN_CERTIFICATE})
"""``--cert-dir``: Stage carries own_certificate and the key."""

EVERYTHING = frozenset(WHAT)
"""Every feature this leader may need (``tlsroll nodes`` marks an agent lacking any)."""


def rollout_needs(
    change: Change,
    strategy: Strategy,
    freeze: FreezeMode,
    own_certificates: bool,
    when_quiet: bool = False,
) -> frozenset[str]:
    """The features a rollout of ``change`` so run needs of every agent it steps
    (``when_quiet``: a ``finalize --when-quiet``, whose Switch carries ``quiet_seconds``)."""
    needs = set(BY_CHANGE.get((change, strategy), ())) | BY_CHANGE.get((change, None), set())
    if freeze is FreezeMode.SCOPE:
        needs |= SCOPE_FREEZE
    if own_certificates:
        needs |= OWN_CERTIFICATES
    if when_quiet and change is Change.FINALIZE:
        needs.add(features.SWITCH_QUIET)
    return frozenset(needs)


def request_needs(request: Any) -> frozenset[str]:
    """The features a request to an agent (a ``tlsroll.v1.agent_pb2`` message) needs, by what
    it carries (the same table, read from the request: the agent pool's last check before it
    sends). By the message's name: the CLI imports this module (through the planner) without
    the agent's messages."""
    kind = request.DESCRIPTOR.name
    needs: set[str] = set()
    if kind == "SwitchRequest":
        if request.keep_http:
            needs.add(features.KEEP_HTTP)
        if request.keep_frozen:
            needs.add(features.SWITCH_KEEP_FROZEN)
        if request.quiet_seconds:
            needs.add(features.SWITCH_QUIET)
    elif kind == "RollbackRequest":
        if request.HasField("undoes"):
            needs.add(features.ROLLBACK_UNDOES)
        if request.keep_frozen:
            needs.add(features.ROLLBACK_KEEP_FROZEN)
    elif kind == "StageRequest":
        if request.switch_to_come.keep_http:
            needs.add(features.KEEP_HTTP)
        if request.own_certificate or request.private_key_pem:
            needs.add(features.OWN_CERTIFICATE)
    elif kind == "FreezeRequest":
        if request.lease_seconds:
            needs.add(features.FREEZE_LEASE)
    elif kind == "GetTransactionRequest" and request.HasField("switch"):
        needs |= request_needs(request.switch)
    return frozenset(needs)


def lacking(reported: Collection[str], needs: Iterable[str]) -> tuple[str, ...]:
    """Of ``needs``, the features an agent that reported ``reported`` lacks (sorted). An
    agent that reported none is of an earlier release: it lacks every one."""
    return tuple(sorted(set(needs) - set(reported)))


def too_old_for(reported: Collection[str], needs: Iterable[str] = EVERYTHING) -> tuple[str, ...]:
    """What an agent that reported ``reported`` is too old for, in words (``WHAT``; each once,
    in order), of what ``needs`` asks (default: everything this leader may ask)."""
    return tuple(dict.fromkeys(WHAT[f] for f in lacking(reported, needs)))


def too_old(version: str, reported: Collection[str], needs: Iterable[str]) -> str | None:
    """Why an agent of ``version`` that reported ``reported`` cannot be asked what needs
    ``needs`` (the node's blocked reason, without ``blocked:``), or None if it can."""
    what = too_old_for(reported, needs)
    if not what:
        return None
    shown = version or "?"
    return f"its agent (tlsroll {shown}) is too old for {', '.join(what)}: upgrade it first"


NOT_HEARD = "has not been heard since the leader started"
"""In the reason of a planned node whose agent the leader has not heard since it started and
whose stored report lacks a feature the change needs (``not_heard``)."""


def not_heard(version: str, reported: Collection[str], needs: Iterable[str]) -> str | None:
    """``too_old`` for an agent the leader has not heard since it started, whose stored report
    ``reported`` (a former leader process's) lacks what ``needs`` asks: not "upgrade it", as
    a killed leader's store may have lost what its first heartbeat said (review of s63-f1,
    L-3). Its first heartbeat since says what it implements, within an interval or so of its
    reconnecting. It begins as ``too_old``'s does, so a start refuses the plan alike
    (``rollout_core.blocked_too_old``)."""
    what = too_old_for(reported, needs)
    if not what:
        return None
    shown = version or "?"
    return (
        f"its agent (tlsroll {shown}) {NOT_HEARD}, and the store holds no word that it"
        f" implements {', '.join(what)}: wait for its first heartbeat (an interval or so),"
        " then try again"
    )


def missing_for(request: Any, reported: Collection[str]) -> tuple[str, ...]:
    """The features ``request`` needs that an agent that reported ``reported`` lacks."""
    needs = request_needs(request)
    return lacking(reported, needs) if needs else ()
