"""The closed sets a rollout's record and its nodes' records are made of, which the wire and
the schema views name: its scope, strategy and freeze mode, and the states of the rollout and of
each node.

Defined here, apart from the pure core (``leader.rollout_core``, which re-exports them and owns
what they mean: the transition tables and the sets of terminal states), because ``tlsroll schema
show`` names them to draw a rollout: importing the core for them built its tables and records as
well (14 ms of a command whose goal is 150 ms, issue 15).
"""

from __future__ import annotations

from enum import StrEnum


class ScopeKind(StrEnum):
    """Which nodes a rollout covers: the leader node, every enrolled node, or a named list."""

    LOCAL = "local"
    CLUSTER = "cluster"
    NODES = "nodes"


class Strategy(StrEnum):
    """How the switch is done; ``direct`` closes http in the same step that opens https."""

    DIRECT = "direct"
    TRANSITIONAL = "transitional"  # https beside http first; `rollout finalize` closes http


class FreezeMode(StrEnum):
    """``node``: each node is frozen only inside its own switch; ``scope``: all nodes in scope
    are frozen before the first switch and unfrozen after the last node ends."""

    NODE = "node"
    SCOPE = "scope"


class RolloutState(StrEnum):
    """Where a rollout is; see the module docstring."""

    PLANNED = "planned"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"
    HALTING = "halting"
    COMPLETED = "completed"
    HALTED = "halted"
    ABORTED = "aborted"
    AWAITING_FINALIZE = "awaiting_finalize"  # transitional: every node dual, nothing frozen


class NodeState(StrEnum):
    """Where one node of a rollout is; see the module docstring."""

    PENDING = "pending"
    PREFLIGHT = "preflight"
    STAGING = "staging"
    STAGED = "staged"
    SWITCHING = "switching"
    CONFIRMING = "confirming"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"
    NEEDS_ATTENTION = "needs_attention"
    DUAL = "dual"  # transitional phase 1 done: http and https
