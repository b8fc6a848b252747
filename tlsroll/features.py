"""What an agent implements of the behaviour the leader's requests carry: named features, as
Kubernetes nodes report what they can and the control plane checks before it asks.

A request field that carries behaviour is dropped unread by an agent that does not know it
(proto3 keeps no unknown field's meaning): ``SwitchRequest.keep_http`` to such an agent would
turn transitional phase 1 into a direct switch, closing http under every workstation, without
a word. So the agent names what it honours (``AGENT_FEATURES``) in every heartbeat and in
``NodeStatus`` (``features``), beside its version; the leader keeps it with the node, blocks a
plan on a node whose agent lacks a feature the change needs (``leader.agent_features``), and
never sends a request carrying it to such an agent (``leader.agent_client``). An agent that
names none is of an earlier release: it lacks every feature.

A feature is named after the request field whose meaning it stands for (``message.field``,
the message's name without ``Request``, in lower case). A new field that carries behaviour
gets a name here, in ``AGENT_FEATURES`` once the agent honours it, and its need in the
leader's table (``leader.agent_features``). Names are never reused for another meaning.

The leader and the agent share this module (role packages never import each other).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping

KEEP_HTTP = "switch.keep_http"
"""``SwitchRequest.keep_http`` (and ``SwitchToCome.keep_http`` in a Stage): transitional phase
1, the target serves https and keeps http (the node ends dual)."""
ROLLBACK_UNDOES = "rollback.undoes"
"""``RollbackRequest.undoes``: the switch to undo is another rollout's, or (empty) the one that
took the node from http to https (``disable-tls``, the way back)."""
SWITCH_KEEP_FROZEN = "switch.keep_frozen"
"""``SwitchRequest.keep_frozen``: ``--freeze scope``, the node stays frozen after its switch."""
ROLLBACK_KEEP_FROZEN = "rollback.keep_frozen"
"""``RollbackRequest.keep_frozen``: ``--freeze scope``, the node stays frozen after a
rollback."""
FREEZE_LEASE = "freeze.lease_seconds"
"""``FreezeRequest.lease_seconds``: the scope freeze holds that long without renewal (the
leader renews it at a third of it; an agent that held its own default could lift it early)."""
OWN_CERTIFICATE = "stage.own_certificate"
"""``StageRequest.own_certificate`` and ``private_key_pem``: the practice's own certificate
and key (``--cert-dir``), not one signed from the agent's CSR."""

SWITCH_QUIET = "switch.quiet_seconds"
"""``SwitchRequest.quiet_seconds``: a ``finalize --when-quiet`` switch, refused by the agent if
its server saw http within that long by its own look, afresh (an agent that dropped it unread
switched on the leader's view alone, up to its cache's age late: review b3 of s64, M2)."""

HELD_CRL = "heartbeat.wants_crl"
"""``HeartbeatResponse.wants_crl``: the agent sends the revocation list it holds
(``HeartbeatRequest.held_crl_pem``) when the leader asks, and the leader sends it no list of its
own until it has recorded that one's revocations (a leader restored from a backup), or its
patience ran out (``crl.not_learned``). An agent that does not name it is never asked: its
list is replaced by the leader's, as before."""

EDITED_CONFIG = "check.want_edited_config"
"""``CheckRequest.want_edited_config``: the agent says in its answer to the plan of a way back
to http whether its server's config was edited since tlsroll wrote it
(``PreflightResponse.edited_config``), and that way back keeps such a file beside the config
(``NAME.before-rollback-ID``) before it puts back the one from before the switch (session 59).
An agent of an earlier release says nothing of an edit and keeps no copy; it still goes back,
so the leader does not block it: the plan of a way back says so for its node (review s70
compat). Named only from session 70 on: an agent of sessions 59 to 69 does all this without
naming it, and one from session 64 on names a later feature (``IMPLIED_BY``)."""

IMPLIED_BY: Mapping[str, frozenset[str]] = {
    EDITED_CONFIG: frozenset({HELD_CRL, SWITCH_QUIET}),
}
"""A feature named after the release that brought its behaviour -> the features of a later
release whose names imply it (features are never taken away): a peer's list that names one of
those is read as naming it too (``reported``)."""

AGENT_FEATURES: tuple[str, ...] = tuple(
    sorted(
        (
            KEEP_HTTP,
            ROLLBACK_UNDOES,
            SWITCH_KEEP_FROZEN,
            ROLLBACK_KEEP_FROZEN,
            FREEZE_LEASE,
            OWN_CERTIFICATE,
            HELD_CRL,
            SWITCH_QUIET,
            EDITED_CONFIG,
        )
    )
)
"""Every feature this build's agent implements: what it reports (sorted)."""

MAX_FEATURES = 32
MAX_NAME = 64
READ = 4 * MAX_FEATURES  # names of a peer's list ``reported`` reads at most
_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")

TEST_ENV = "TLSROLL_AGENT_TEST_FEATURES"
"""TESTS ONLY: the features a test's agent reports instead of ``AGENT_FEATURES`` (comma
separated; empty: none, as an agent of an earlier release), so that a real leader meets an
agent too old for a change (``tests/test_agent_features.py``). An installed agent never has
it set (an installed one refuses to start with it: ``testhooks.refused``); what it reports
changes nothing of what it does, and it names no feature this build lacks."""


def reported(names: Iterable[str]) -> tuple[str, ...]:
    """What a peer's list of feature names is taken as (it wrote it): the names well formed
    (lower-case words joined by dots, at most ``MAX_NAME`` characters), sorted, without
    repeats, at most ``MAX_FEATURES`` of them; anything else is left out."""
    kept: set[str] = set()
    for i, name in enumerate(names):
        if i >= READ:
            break
        if len(name) <= MAX_NAME and _NAME.fullmatch(name):
            kept.add(name)
    kept |= {implied for implied, later in IMPLIED_BY.items() if kept & later}
    return tuple(sorted(kept)[:MAX_FEATURES])


def agent_features(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """What this agent reports: ``AGENT_FEATURES``, unless a test set ``TEST_ENV``: then
    those of its names that this build implements, never one it does not (a later leader
    would send such an agent a request whose meaning it drops unread: audit s75 knobaudit)."""
    env = os.environ if environ is None else environ
    if TEST_ENV not in env:
        return AGENT_FEATURES
    named = reported(n.strip() for n in env[TEST_ENV].split(",") if n.strip())
    return tuple(n for n in named if n in AGENT_FEATURES)


@functools.cache
def this_agent() -> tuple[str, ...]:
    """``agent_features`` of this process, read once (the agent's heartbeats and GetStatus)."""
    return agent_features()
