"""Each node's clock against the leader's between rollouts, from its agent's heartbeats: kept in
memory, and a node problem once it differs by more than ``WARN_SECONDS``.

Certificates, leases and renewal all read the node's clock, and a rollout's preflight refuses a
node whose clock is more than ``MAX_CLOCK_OFFSET`` (120 s) from the leader's. Between rollouts
nobody noticed a drifting node clock until a rollout refused the node or a certificate looked
expired or not yet valid (clock audit of session 35, C). Every heartbeat carries the time its
agent sent it (``HeartbeatRequest.sent_at``), which the leader now compares with its own.

The estimate, and what the time on the way does. A message stamped ``sent_at`` by the node's
clock and read by the leader at ``now`` gives ``x = sent_at - now = offset - d``: the offset
(the node's clock less the leader's; + ahead) less the message's delay ``d >= 0`` (the agent's
write, the network, the leader's event loop until the handler reads it). Times taken one way
cannot measure ``d``; they bound the offset from one side:

* ``x`` never overstates how far ahead a node is (``offset >= x``);
* a node looks behind by ``d`` more than it is.

So the leader keeps the larger ``x`` of the node's last two messages, the less delayed one:
a node is shown behind only when both said so, and one late message (a leader busy after its
start while every agent reconnects, a pause of its process) never makes a problem. It takes a
delay longer than ``WARN_SECONDS`` less the real offset in two messages in a row, which are
an interval (a renewal bound: 20 s at 5 s) apart. The agent stamps ``sent_at`` just before it
writes the message (after its server's status, which may take ``SERVER_VIEW_SECONDS``), so
``d`` is the write, the wire and the leader's loop: milliseconds on a practice's network,
seconds on a leader under load, against 60 s. A message that copies an earlier report (an
answer to a planning question, the ``closing`` message) carries that report's ``sent_at``,
seconds to minutes old, and is not taken.

The threshold is half the preflight's limit (``WARN_SECONDS``, 60 s): the admin hears of a
drifting clock before a rollout refuses the node (a clock 50 ppm off drifts 4 s a day: two
weeks between the two). The problem ends below ``CLEAR_SECONDS`` (55 s), so an offset around
the threshold does not come and go with each message's delay.

Unknown (no estimate, never a problem): a node whose messages carry no ``sent_at`` (an agent
that does not send it); until its second message; and once its last heartbeat stream ended
(``forget``: its agent stopped or vanished, and what it said is of an agent that is not there).

What a message costs (``LeaderService._heartbeat``): two ``HasField`` and a flag, two integer
reads, one ``datetime.timestamp()``, a dict lookup and two attribute stores in the node's
``_Offset`` (made once per node); the one float it keeps replaces the one before. No parsing,
no write, no log line but at a change. About 4 us of the leader's CPU (timeit, on a shared
2-core machine; deserialising the message itself: 1.5 us), against issue 15's 0.3 ms a message.
"""

from __future__ import annotations

import datetime as dt
import math

from leader.observe import MAX_CLOCK_OFFSET
from tlsroll import logs

log = logs.get_logger(__name__)

WARN_SECONDS = MAX_CLOCK_OFFSET // 2
CLEAR_SECONDS = WARN_SECONDS - 5


def clock_problem(offset: float) -> str:
    """The node problem of a clock ``offset`` seconds from the leader's (+: ahead), in words
    with what to do."""
    way = "ahead" if offset > 0 else "behind"
    return (
        f"clock differs from the leader's by {offset:+.0f} s ({way}; shown beyond "
        f"{WARN_SECONDS} s, a rollout's preflight refuses the node beyond {MAX_CLOCK_OFFSET} s): "
        "check the node's time synchronisation (NTP: chrony, systemd-timesyncd)"
    )


class _Offset:
    """One node's last two ``x`` (``NodeClocks``) and since when it is a problem (None: it
    is not). Changed in place by each message: no allocation but the float."""

    __slots__ = ("before", "last", "since")

    def __init__(self, x: float) -> None:
        self.before = math.inf  # not known until a second message
        self.last = x
        self.since: dt.datetime | None = None

    def best(self) -> float:
        before, last = self.before, self.last
        return before if before > last else last


class NodeClocks:
    """Each node's clock offset as its heartbeats show it (see the module docstring). Changed
    on the event loop (``heard``, ``forget``); read from any thread (``offset``,
    ``problems``): a reader sees each node's state before or after a message, or between its
    two stores (then the earlier message's ``x`` twice)."""

    def __init__(self) -> None:
        self._nodes: dict[str, _Offset] = {}

    def heard(self, node: str, x: float, now: dt.datetime) -> None:
        """A message of ``node``'s agent, stamped ``x`` seconds later than the leader's clock
        read it (``now``)."""
        o = self._nodes.get(node)
        if o is None:
            self._nodes[node] = _Offset(x)
            return
        o.before, o.last = o.last, x
        best = o.best()
        if o.since is None:
            if not -WARN_SECONDS <= best <= WARN_SECONDS:
                o.since = now
                log.warning("node.clock_differs", node=node, offset=round(best), warn=WARN_SECONDS)
        elif -CLEAR_SECONDS <= best <= CLEAR_SECONDS:
            o.since = None
            log.info("node.clock_agrees", node=node, offset=round(best))

    def forget(self, node: str) -> None:
        """``node``'s offset is not known (any more)."""
        self._nodes.pop(node, None)

    def offset(self, node: str) -> float | None:
        """``node``'s clock less the leader's, in seconds; None if not known."""
        o = self._nodes.get(node)
        if o is None:
            return None
        best = o.best()
        return None if best == math.inf else best

    def differs(self, node: str) -> bool:
        """Whether ``node``'s clock is a problem now (``problems``)."""
        o = self._nodes.get(node)
        return o is not None and o.since is not None

    def problems(self) -> list[tuple[str, float, dt.datetime]]:
        """(node, offset, since) of every node whose clock is a problem now, by name."""
        found = []
        for node, o in list(self._nodes.items()):
            since = o.since
            if since is not None:
                found.append((node, o.best(), since))
        return sorted(found)
