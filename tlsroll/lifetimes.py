"""How long a leaf certificate lives, without X.509: ``tlsroll.pki`` re-exports every name here.

``leader.config`` checks its settings against these while the leader reads its config; from
here, a leader that refuses its config or shows its ``--help`` (``leader.front``) imports no
``cryptography`` (session 74, leaderfront).
"""

from __future__ import annotations

import datetime as dt
import secrets

LEAF_VALIDITY_DAYS = 397  # under Apple's 398 (public CAs) and 825 (private CAs)
# The shortest leaf: a test leader's agent certificate (``leader.config.TEST_AGENT_CERT_ENV``);
# a setting takes a minute at least (``agent_cert_lifetime``, ``server_cert_lifetime``).
MIN_LIFETIME = dt.timedelta(seconds=10)
# How much shorter than asked a certificate that no renewer of its own replaces may live
# (``spread``): a node's https certificate (``sign_csr``) and a workstation's.
SPREAD_FRACTION = 0.05
SPREAD_MAX = dt.timedelta(days=7)
SPREAD_FROM = dt.timedelta(days=2)  # a shorter life (tests' settings) is not spread


def spread(lifetime: dt.timedelta, draw: float | None = None) -> dt.timedelta:
    """``lifetime`` less a random part of ``SPREAD_FRACTION`` of it (at most ``SPREAD_MAX``),
    in whole seconds; ``draw`` in [0, 1] picks it (None: a random one). The certificates one
    rollout issues (every node's https certificate) or one morning's switch of the practice
    PCs (their workstation certificates) then end over days, not on one day: an end the
    warnings did not get replaced in time takes out a node or a PC at a time, not the whole
    practice at once. A life under ``SPREAD_FROM`` is kept as it is."""
    if lifetime < SPREAD_FROM:
        return lifetime
    room = min(lifetime * SPREAD_FRACTION, SPREAD_MAX)
    fraction = secrets.SystemRandom().random() if draw is None else min(max(draw, 0.0), 1.0)
    return dt.timedelta(seconds=int((lifetime - room * fraction).total_seconds()))
