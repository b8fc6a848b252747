"""A node's clock offset as the leader shows it, and what many nodes' offsets at once say about
the leader's own clock (``leader.node_clocks`` keeps the offsets). Pure, and it imports nothing
of the leader: ``tlsroll nodes`` and the viewer show offsets with it as the leader does. The
verdict on the leader's clock is the leader's alone (``leader_step`` over the nodes it hears),
on the wire as ``clock_leader``: the CLI works none out over the nodes it lists (review of
s37, L7).

The number shown (``shown_seconds``): to the nearest tenth of a second, and never within a
limit it is beyond (``THRESHOLDS``: the warning's 60 s, the preflight's 120 s). Whole seconds
to the nearest showed a node 60.3 s ahead, a problem beyond ``WARN_SECONDS``, as "+60 s"
(review of s36, F5); a tenth shows that, and one just beyond a limit (60.03) is shown a tenth
beyond it (60.1), not at it.

The leader's clock (``leader_step``): when the leader's clock steps (a wrong time set by hand,
an NTP server that sends one), every node's offset moves by the step at once, and every node
seemed to "differ" with a text blaming each node's time synchronisation. Most nodes differing
by about the same amount at once is likelier the leader's clock: at least ``LEADER_NODES``
nodes, more than half of those whose offset is known, beyond ``WARN_SECONDS`` within
``LEADER_SPREAD`` seconds of each other (the nodes' own clocks, each kept by NTP, differ from
each other by milliseconds; an estimate is short by a message's delay, milliseconds to
seconds on a leader under load). It is a hint, not a verdict: nothing is held on it.
"""

from __future__ import annotations

from collections.abc import Iterable

WARN_SECONDS = 60
"""A node's clock this far from the leader's (or farther) is shown as a node problem: half the
limit of a rollout's preflight (``leader.observe.MAX_CLOCK_OFFSET``, 120 s)."""

THRESHOLDS = (WARN_SECONDS, 2 * WARN_SECONDS)
"""Where an offset shown must not look within what it is beyond: the warning's and the
preflight's limits (``leader.observe.MAX_CLOCK_OFFSET``)."""

LEADER_NODES = 3
LEADER_SPREAD = 5.0


def shown_seconds(offset: float) -> float:
    """``offset`` to the nearest tenth of a second, but beyond each of ``THRESHOLDS`` if it is:
    60.04 is 60.1, 59.97 is 60.0, 75.42 is 75.4."""
    shown = round(abs(offset), 1)
    for threshold in THRESHOLDS:
        if shown <= threshold < abs(offset):
            shown = threshold + 0.1
    return -shown if offset < 0 else shown


def signed_seconds(offset: float) -> str:
    """``offset`` as shown, with its sign: "+60.3", "-0.1", "+0.0"."""
    shown = shown_seconds(offset)
    return f"{'-' if shown < 0 else '+'}{abs(shown):.1f}"


def beyond(offset: float) -> bool:
    """Whether ``offset`` is farther from the leader's clock than ``WARN_SECONDS``."""
    return not -WARN_SECONDS <= offset <= WARN_SECONDS


def leader_step(offsets: Iterable[float]) -> float | None:
    """The offset most nodes share, if what ``offsets`` (each node's whose offset is known, one
    each) say is likelier the leader's clock than theirs (see the module docstring): the
    median of the largest group of offsets beyond ``WARN_SECONDS`` within ``LEADER_SPREAD`` of
    each other, if it holds ``LEADER_NODES`` or more, and more than half of ``offsets``. The
    leader's clock is then that far the other way. None otherwise."""
    known = 0
    far: list[float] = []
    for offset in offsets:
        known += 1
        if beyond(offset):
            far.append(offset)
    need = max(LEADER_NODES, known // 2 + 1)
    if len(far) < need:
        return None
    far.sort()
    first, size, start = 0, 0, 0
    for end, offset in enumerate(far):
        while offset - far[start] > LEADER_SPREAD:
            start += 1
        if end - start + 1 > size:
            first, size = start, end - start + 1
    if size < need:
        return None
    group = far[first : first + size]
    middle = size // 2
    return group[middle] if size % 2 else (group[middle - 1] + group[middle]) / 2


def near_step(offset: float, step: float | None) -> bool:
    """Whether a node whose clock is ``offset`` off is one of those ``leader_step`` found at
    ``step`` (its difference likelier the leader's clock)."""
    return step is not None and abs(offset - step) <= LEADER_SPREAD
