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

So the leader keeps the larger ``x`` of the agent's last two messages, the less delayed one:
a node is shown behind only when both said so, and one late message (a leader busy after its
start while every agent reconnects, a pause of its process) never makes a problem. It takes a
delay longer than ``WARN_SECONDS`` less the real offset in two messages in a row, which are
an interval (a renewal bound: 20 s at 5 s) apart. The agent stamps ``sent_at`` just before it
writes the message (after its server's status, which may take ``SERVER_VIEW_SECONDS``), so
``d`` is the write, the wire and the leader's loop: milliseconds on a practice's network,
seconds on a leader under load, against 60 s. A message that copies an earlier report (an
answer to a planning question, the ``closing`` message) carries that report's ``sent_at``,
seconds to minutes old, and is not taken.

When it is a problem. The threshold is half the preflight's limit (``WARN_SECONDS``, 60 s):
the admin hears of a drifting clock before a rollout refuses the node (a clock 50 ppm off
drifts 4 s a day: two weeks between the two). It is a problem from the message whose estimate
is beyond it, and ends at once when the estimate is within ``CLEAR_SECONDS`` (55 s); behind,
also when it was within ``WARN_SECONDS`` in ``CLEAR_AFTER`` messages in a row. A node really
55-60 s behind that two delayed messages had made a problem stayed one for as long as its
clock stayed there, since a delay only makes a node look farther behind (review of s36, F2).
Ahead, a problem is proven (``x`` never overstates it) and ends only within ``CLEAR_SECONDS``
(review of s37, M1: a few delayed messages of a node 60.1 s ahead ended it). A problem that
begins again within ``REOPEN_SECONDS`` of its end, the same way, goes on with its "since" and
logs nothing (its end was logged; the next end is not, unless a start was): a node at the
threshold, whose estimates straddle it with each message's delay, may come and go on the page
but makes one warning line and one "since" (before: hundreds over 3000 messages). Such a
problem that lasts ``REOPEN_SECONDS`` is no coming and going: it is logged then, once
(``node.clock_differs`` with ``reopened``), and its end too; the log's last word on a node
whose clock differs is not its earlier end. One the other way (behind, now ahead; or a
problem that turns round at once) is another problem, with its own "since" and line (review
of s37, R).

Whose clock. Readings are kept per agent (``agent``: ``leader.service.agent_of``, its
``agent_instance``), not per node: two agents with one node's identity (a cloned machine:
``leader.service.TwinAgents``) each have their own clock, and a clone's behind was hidden by
the other's messages in one estimate (review of s36, F4). A node differs if any of its agents'
clocks differs; its offset is the farthest of theirs.

Unknown (no estimate, never a problem): an agent whose messages carry no ``sent_at`` (one that
does not send it); until its second message; and once its streams ended (``ended``) and it did
not come back within a renewal deadline (``leader.service.renewal_deadline``, 28 s at 5 s):
what it said is of an agent that is not there. An agent that reconnects (its stream ended, the
leader's end or its own: a renewed certificate, a network blip) comes back within that, with
the same ``agent_instance``, and its estimate and its problem go on where they were: before,
its stream's end forgot them, the problem vanished for up to a renewal bound and came back
with a new "since" and a second log line (review of s36, F3). A new agent of the node (a
restart: another ``agent_instance``) while the old one has no stream drops the old one's at
once; if the old one's stream is still open (the leader has not noticed it died yet), its
estimate is shown until its stream ends and a renewal deadline more. An agent that meets the
leader with unary ``Heartbeat`` calls (no stream; ``heard``'s ``keep``) is known a renewal
deadline from its last message and then not, as a stream's after its end (review of s37, L4:
its reading was kept for ever); another agent of the node does not drop it before that.

The leader's own clock (``leader.skew.leader_step``): when most nodes differ by about the same
amount at once, the leader's clock is likelier off than theirs; the problem's text says so
(``problems``: computed as problems are read; its flag goes on the wire as
``NodeProblemView.clock_leader`` and, by ``listing``, ``NodeInfo.clock_leader``: `tlsroll
nodes` shows the leader's verdict and works out none of its own), and the leader logs
``leader.clock_differs`` when a node's state changes and makes it so (and
``leader.clock_agrees`` when it no longer is):
judged by ``check`` on the event loop at most once a ``CHECK_SECONDS`` after a change, never by
the message (a step of the leader's clock changes every node's state; reading every node's
offset took 2.8 ms at 2000 nodes: review of s37, M2). The same ``check`` drops agents whose
bound passed, and nodes left with none.

What a message costs (``LeaderService._heartbeat``): two ``HasField`` and a flag, two integer
reads, one ``datetime.timestamp()``, two dict lookups (node, then its agent: a stream's id is
worked out once, at its first message), a few comparisons and two or three attribute stores in
the agent's ``_Offset`` (made once per agent); the one float it keeps replaces the one before,
the counter is a small int. No parsing, no write, no log line but at a change; a change (a
problem that begins or ends) reads the monotonic clock and schedules a ``check`` if none is due.
About 4 us of the leader's CPU in session 36 (timeit, on a shared 2-core machine; deserialising
the message itself: 1.5 us; not measured again), against issue 15's 0.3 ms a message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Callable

from leader.observe import MAX_CLOCK_OFFSET
from leader.skew import WARN_SECONDS, leader_step, near_step, shown_seconds, signed_seconds
from tlsroll import logs
from tlsroll.clocks import elapsed

log = logs.get_logger(__name__)

CLEAR_SECONDS = WARN_SECONDS - 5
CLEAR_AFTER = 3
"""Messages in a row whose estimate is within ``WARN_SECONDS`` that end a problem behind (one
within ``CLEAR_SECONDS`` ends it at once; one ahead ends only within ``CLEAR_SECONDS``)."""
REOPEN_SECONDS = 600.0
"""A problem that begins again this soon (``NodeClocks.monotonic``) after it ended, the same
way, goes on with its ``since``, and logs nothing until it has lasted this long again (checked
at every message while it is open): a node at the threshold does not come and go."""
CHECK_SECONDS = 1.0
"""How soon after a change the leader's clock is judged and logged, and expired agents swept
(``NodeClocks.check``): at most once this, off the per-message path."""
MAX_OFFSET = 398 * 86400.0
"""How far from the leader's clock a message's ``sent_at`` may be taken (``sent_offset``). A
certificate of the cluster lives at most 397 days (``tlsroll.pki.LEAF_VALIDITY_DAYS``): an agent
whose clock is farther off than that from the leader's cannot hold the leader's certificate
valid, so no message of a real clock says so; a ``sent_at`` beyond it (years off, or no time
at all: 2**62 s showed an offset of billions of seconds; session 68) is a foreign or broken
agent's, and taken as no time: the clock is not known, as of a message without one (as a
renewal due farther than ``leader.service.RENEWAL_DUE_SPAN`` is)."""
AGENTS_KEPT = 4
"""Agents per node whose estimates the leader keeps (two agents with one identity are a
problem of their own; a fifth one drops the oldest)."""


def sent_offset(seconds: int, nanos: int, now: float) -> float | None:
    """``x`` of a message stamped ``seconds``/``nanos`` (its ``sent_at``) that the leader read at
    ``now`` (a POSIX time): the stamp less ``now``; None beyond ``MAX_OFFSET`` either way."""
    x = seconds + nanos / 1e9 - now
    return x if -MAX_OFFSET <= x <= MAX_OFFSET else None


def clock_problem(offset: float, leader: bool = False, step: float | None = None) -> str:
    """The node problem of a clock ``offset`` seconds from the leader's (+: ahead), in words
    with what to do; ``leader``: most nodes differ by about as much at once
    (``leader.skew.leader_step``: ``step``, the offset they share), and the leader's clock is
    the first thing to check."""
    way = "ahead" if offset > 0 else "behind"
    if leader:
        by = offset if step is None else step
        todo = (
            f"most nodes differ by about as much at once: likelier the LEADER's clock is off "
            f"(by {signed_seconds(-by)} s): check the leader's time synchronisation first, "
            "then the node's (NTP: chrony, systemd-timesyncd)"
        )
    else:
        todo = "check the node's time synchronisation (NTP: chrony, systemd-timesyncd)"
    return (
        f"clock differs from the leader's by {signed_seconds(offset)} s ({way}; shown from "
        f"beyond {WARN_SECONDS} s until back within it for a few messages, a rollout's "
        f"preflight refuses the node beyond {MAX_CLOCK_OFFSET} s): {todo}"
    )


class _Offset:
    """One agent's last two ``x`` (``NodeClocks``), since when it is a problem (None: it is
    not), how many messages in a row said it is within ``WARN_SECONDS`` while it is, and from
    when it is not known (its streams ended: ``NodeClocks.ended``; inf while they live). Of
    its last problem (``REOPEN_SECONDS``): its ``since`` (``was``), when it ended
    (``NodeClocks.monotonic``), which way it was (``ahead``), whether its start was logged and
    its end not yet, and when it began again without a word (``again``).
    Changed in place by each message: no allocation but the float."""

    __slots__ = (
        "again",
        "ahead",
        "before",
        "ended",
        "gone",
        "last",
        "logged",
        "since",
        "unary",
        "was",
        "within",
    )

    def __init__(self, x: float) -> None:
        self.before = math.inf  # not known until a second message
        self.last = x
        self.since: dt.datetime | None = None
        self.within = 0
        self.gone = math.inf
        self.was: dt.datetime | None = None
        self.ended = -math.inf
        self.logged = False
        self.unary = False  # heard with no stream: ``gone`` is its bound (``NodeClocks._bound``)
        self.ahead = False  # which way its problem (or its last one) is
        self.again = math.inf  # when its problem began again without a word (``_begins``)

    def best(self) -> float:
        before, last = self.before, self.last
        return before if before > last else last


class NodeClocks:
    """Each node's agents' clock offsets as their heartbeats show them (see the module
    docstring). Changed on the event loop (``heard``, ``forget``, ``ended``); read from any
    thread (``offset``, ``differs``, ``problems``): a reader sees each agent's state before or
    after a message, or between its stores (then the earlier message's ``x`` twice).
    ``monotonic``: the clock ``ended``'s bound and ``REOPEN_SECONDS`` are on
    (``LeaderState.monotonic``; the suspend-counting clock by default)."""

    def __init__(self, monotonic: Callable[[], float] = elapsed) -> None:
        self._nodes: dict[str, dict[str, _Offset]] = {}
        self.monotonic = monotonic
        self._step: float | None = None  # ``leader_step`` as last logged
        self._dirty = False  # a change since the last ``check``
        self._due = math.inf  # when the next ``check`` is due (the event loop's time)

    def heard(
        self, node: str, agent: str, x: float, now: dt.datetime, keep: float | None = None
    ) -> None:
        """A message of ``node``'s agent ``agent``, stamped ``x`` seconds later than the
        leader's clock read it (``now``). ``keep``: a message with no stream behind it (a
        unary ``Heartbeat``), whose agent is known ``keep`` seconds from now and then not,
        unless it is heard again (``_bound``)."""
        agents = self._nodes.get(node)
        o = agents.get(agent) if agents is not None else None
        if o is None or (o.gone != math.inf and self.monotonic() >= o.gone):
            o = self._new(node, agent, x)  # a new agent, or one past its bound
        else:
            if o.gone != math.inf:  # its streams had ended (or a unary bound): back within it
                o.gone, o.unary = math.inf, False
            o.before, o.last = o.last, x
            best = o.best()
            if o.since is None:
                if not -WARN_SECONDS <= best <= WARN_SECONDS:
                    self._begins(node, agent, o, best, now)
            elif -WARN_SECONDS <= best <= WARN_SECONDS:
                # Ahead, the estimate never overstates it: a problem ahead is proven, and ends
                # only within CLEAR_SECONDS. Behind, a delay overstates it: CLEAR_AFTER
                # messages end it.
                o.within += 1
                if best > 0:
                    if best <= CLEAR_SECONDS:
                        self._ends(node, agent, o, best)
                elif o.within >= CLEAR_AFTER or best >= -CLEAR_SECONDS:
                    self._ends(node, agent, o, best)
            else:
                o.within = 0
                if (best > 0) != o.ahead:  # the other way at once: another problem
                    # The first one ends (logged if its start was: each start has an end),
                    # and is not taken up again (``_begins``).
                    self._ends(node, agent, o, best, reason="turned")
                    o.was = None
                    self._begins(node, agent, o, best, now)
            # A problem begun again without a word that lasts, after any message that leaves
            # it open (one ahead within WARN_SECONDS but not CLEAR_SECONDS too: review of
            # s38, L1).
            if (
                o.since is not None
                and not o.logged
                and self.monotonic() - o.again >= REOPEN_SECONDS
            ):
                self._lasts(node, agent, o, best)
        if keep is not None:
            self._bound(o, keep)

    def _bound(self, o: _Offset, keep: float) -> None:
        """``o``'s agent, heard with no stream open (a unary ``Heartbeat``), is known for
        ``keep`` seconds from now, swept by a ``check`` after (review of s37, L4: such a
        reading was kept for ever, and its problem shown for ever). Not a stream's end: a
        new agent of the node does not drop it at once (``_new``), it lasts its bound."""
        o.gone = self.monotonic() + keep
        o.unary = True
        self._later(keep + CHECK_SECONDS)

    def _begins(self, node: str, agent: str, o: _Offset, best: float, now: dt.datetime) -> None:
        """``agent``'s problem begins: again within ``REOPEN_SECONDS`` of its end, the same
        way, it goes on with its ``since`` and logs nothing (unless it lasts: ``_lasts``); the
        other way (behind, now ahead) it is another problem, with its own since and line."""
        o.within = 0
        ahead = best > 0
        mono = self.monotonic()
        if o.was is not None and ahead == o.ahead and mono - o.ended < REOPEN_SECONDS:
            o.since, o.again = o.was, mono
        else:
            o.since = now
            o.logged = True
            log.warning(
                "node.clock_differs",
                node=node,
                agent=agent,
                offset=shown_seconds(best),
                warn=WARN_SECONDS,
                hint="set the node's clock right (timedatectl; chrony or systemd-timesyncd): "
                "certificates and leases go by it",
            )
        o.ahead = ahead
        self._changed()

    def _lasts(self, node: str, agent: str, o: _Offset, best: float) -> None:
        """``agent``'s problem, begun again without a word (``_begins``), has lasted
        ``REOPEN_SECONDS``: no coming and going at the threshold. Logged, once, so that the
        log's last word on it is not its earlier end (review of s37, R), and its end is."""
        o.logged = True
        log.warning(
            "node.clock_differs",
            node=node,
            agent=agent,
            offset=shown_seconds(best),
            warn=WARN_SECONDS,
            reopened=True,
            since=o.since.isoformat() if o.since is not None else None,
            hint="set the node's clock right (timedatectl; chrony or systemd-timesyncd): "
            "certificates and leases go by it",
        )

    def _ends(
        self, node: str, agent: str, o: _Offset, best: float, reason: str | None = None
    ) -> None:
        """``agent``'s problem ends: remembered (``_begins``); logged if its start was
        (``reason``: "turned", it ends as another begins the other way)."""
        o.was, o.since, o.ended = o.since, None, self.monotonic()
        if o.logged:
            o.logged = False
            extra = {} if reason is None else {"reason": reason}
            log.info(
                "node.clock_agrees", node=node, agent=agent, offset=shown_seconds(best), **extra
            )
        self._changed()

    def _new(self, node: str, agent: str, x: float) -> _Offset:
        """``agent``'s first message (since its streams ended and the bound passed): the
        node's agents whose streams all ended are gone (a restart: the agent's id is new);
        one heard without a stream (``_bound``) lasts its bound."""
        agents = self._nodes.setdefault(node, {})
        dropped = [
            key for key, o in agents.items() if (o.gone != math.inf and not o.unary) or key == agent
        ]
        while len(agents) - len(dropped) >= AGENTS_KEPT:
            dropped.append(next(key for key in agents if key not in dropped))
        for key in dropped:
            self._unknown(node, key, agents.pop(key))
        o = agents[agent] = _Offset(x)
        return o

    def _unknown(self, node: str, agent: str, o: _Offset) -> None:
        """``agent``'s estimate is dropped: a problem of it ends, for a reason not known."""
        if o.since is not None:
            if o.logged:
                log.info("node.clock_agrees", node=node, agent=agent, reason="unknown")
            self._changed()

    def forget(self, node: str, agent: str) -> None:
        """``agent``'s offset is not known (any more): its message carries no time."""
        agents = self._nodes.get(node)
        o = agents.pop(agent, None) if agents is not None else None
        if agents is not None and not agents:
            del self._nodes[node]
        if o is not None:
            self._unknown(node, agent, o)

    def drop(self, node: str) -> None:
        """``node`` was removed: its agents' offsets go now (a problem of them ends)."""
        for agent, o in list(self._nodes.pop(node, {}).items()):
            self._unknown(node, agent, o)

    def ended(self, node: str, agent: str, keep: float) -> None:
        """``agent`` of ``node`` has no heartbeat stream open any more: its offset is known for
        ``keep`` seconds more (a reconnect within them goes on with it), then not. The node's
        agents whose bound passed are dropped now, the others by a ``check`` after theirs."""
        agents = self._nodes.get(node)
        o = agents.get(agent) if agents is not None else None
        if agents is None or o is None:
            return
        now = self.monotonic()
        o.gone = now + keep
        self._sweep(node, agents, now)
        self._later(keep + CHECK_SECONDS)

    def _sweep(self, node: str, agents: dict[str, _Offset], now: float) -> None:
        """Drop ``node``'s agents whose bound passed, and the node if none is left."""
        for key, o in list(agents.items()):
            if o.gone <= now:
                del agents[key]
                self._unknown(node, key, o)
        if not agents and self._nodes.get(node) is agents:
            del self._nodes[node]

    def _known(self, node: str, now: float) -> list[_Offset]:
        """``node``'s agents whose offset is known at ``now`` (``monotonic``)."""
        agents = self._nodes.get(node)
        if not agents:
            return []
        return [o for o in list(agents.values()) if o.gone > now and o.before != math.inf]

    def offset(self, node: str) -> float | None:
        """``node``'s clock less the leader's, in seconds (of its agents', the farthest from
        the leader's); None if not known."""
        known = self._known(node, self.monotonic())
        return max((o.best() for o in known), key=abs) if known else None

    def differs(self, node: str) -> bool:
        """Whether ``node``'s clock is a problem now (``problems``): any of its agents'."""
        return any(o.since is not None for o in self._known(node, self.monotonic()))

    def _read(self) -> tuple[dict[str, float], list[tuple[str, float, dt.datetime]]]:
        """Every node's offset (``offset``), and (node, offset, since) of those whose clock is
        a problem now: of its agents that differ, the farthest offset and the earliest since."""
        now = self.monotonic()
        offsets: dict[str, float] = {}
        found = []
        for node in list(self._nodes):
            shown: float | None = None
            first: dt.datetime | None = None
            for o in self._known(node, now):
                best, since = o.best(), o.since
                if node not in offsets or abs(best) > abs(offsets[node]):
                    offsets[node] = best
                if since is not None:
                    if shown is None or abs(best) > abs(shown):
                        shown = best
                    if first is None or since < first:
                        first = since
            if shown is not None and first is not None:
                found.append((node, shown, first))
        return offsets, found

    def problems(self) -> list[tuple[str, float, dt.datetime, bool]]:
        """(node, offset, since, leader) of every node whose clock is a problem now, by name;
        ``leader``: most nodes differ by about as much (``leader.skew.leader_step``), this one
        among them: the leader's clock is likelier off."""
        return self.problems_and_step()[0]

    def problems_and_step(
        self,
    ) -> tuple[list[tuple[str, float, dt.datetime, bool]], float | None]:
        """``problems``, and the offset most nodes share (``leader.skew.leader_step``)."""
        offsets, found = self._read()
        step = leader_step(offsets.values())
        return sorted((node, o, since, near_step(o, step)) for node, o, since in found), step

    def listing(self) -> dict[str, tuple[float, bool, bool]]:
        """(Any thread.) Every node whose offset is known: (offset, differs, leader), read at
        once, as ``offset``, ``differs`` and ``problems`` say them: ``leader`` is the leader's
        own verdict (``problems``' flag), which ``tlsroll nodes`` shows and does not work out
        over the nodes it lists (review of s37, L7: the two could disagree)."""
        offsets, found = self._read()
        step = leader_step(offsets.values())
        blamed = {node: near_step(o, step) for node, o, _ in found}
        return {node: (o, node in blamed, blamed.get(node, False)) for node, o in offsets.items()}

    def _changed(self) -> None:
        """A node's state changed: the leader's clock is judged by a ``check`` soon, off the
        per-message path (a step of the leader's clock changes every node's state)."""
        self._dirty = True
        self._later(CHECK_SECONDS)

    def _later(self, delay: float) -> None:
        """A ``check`` in ``delay`` seconds on the running event loop, unless one is due by then
        (none without a loop: a reader's ``check`` then)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        when = loop.time() + delay
        if when >= self._due:
            return
        self._due = when
        loop.call_at(when, self._checked, when)

    def _checked(self, when: float) -> None:
        if when == self._due:
            self._due = math.inf
        self.check()

    def check(self) -> None:
        """(The event loop.) Agents whose bound passed dropped, nodes with none left too; if a
        node's state changed since the last check, the leader's clock logged as it becomes the
        likelier cause of most nodes' differing, and as it no longer is. Again later if an
        agent is still within its bound."""
        now = self.monotonic()
        pending = math.inf
        for node, agents in list(self._nodes.items()):
            self._sweep(node, agents, now)
            for o in agents.values():
                pending = min(pending, o.gone)
        if pending != math.inf:
            self._later(max(pending - now, 0.0) + CHECK_SECONDS)
        if not self._dirty:
            return
        self._dirty = False
        offsets, _ = self._read()
        step = leader_step(offsets.values())
        if step is not None and self._step is None:
            log.warning(
                "leader.clock_differs",
                offset=shown_seconds(-step),
                nodes=sum(near_step(o, step) for o in offsets.values()),
                known=len(offsets),
                detail="most nodes' clocks differ from the leader's by about as much at once: "
                "likelier the leader's clock is off; check its time synchronisation first",
            )
        elif step is None and self._step is not None:
            log.info("leader.clock_agrees", known=len(offsets))
        self._step = step
