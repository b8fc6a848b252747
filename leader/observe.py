"""What each node runs now, asked of its agent: what rollouts are planned from.

    seen = await observe(agents, ["node1", "node2"], ca_cert)
    seen["node1"].schemes          # ("https",)
    seen["node2"].problems         # ("port 8443 (https) on … is taken by …",)

``Check`` runs preflight's checks read-only (no epoch, nothing recorded on the node), so
``tlsroll plan`` can say "blocked" and why, and its answer's ``ServerView`` says what the
managed server runs (schemes, the served certificate, the live verifier's digest), as
``GetStatus`` would: one call per node.

The question goes over the agent's own ``Leader.Heartbeats`` stream when it can take it (``ask``:
``leader.service.LeaderService.ask_check``; an agent that says it answers, on a live stream in
renewal mode): the leader then opens no channel to the node for planning (each is a TLS
handshake, ~2.2-2.6 ms of the leader's CPU, and the agent pool keeps only 16 open, so a node
planned but not kept had a second one opened for its steps: issue 15). The answer is what
``Check`` gives, or the status it would have ended with and the ``ServerView`` ``GetStatus``
would give. Every other agent (older, on unary heartbeats, without a stream now, or whose stream
ended before it answered) is asked over the channel, as before, in the time the deadline has
left.

An answer on the stream says nothing of the leader's way in to the agent (a firewall on the
agent port, an address on record that is no longer the node's, a NodeAgent port not
listening), which the channel's Check proved: so, while the question is out (``reach``,
``leader.agent_client.AgentPool.reach``), the leader proves it too, without a handshake it
would not make anyway. ``tlsroll plan``: a plain TCP connection to the address and port the
pool dials, closed at once (something listens there). A rollout's start: the same for every
node but the first it steps (``FirstSteps``: the first max_parallel + prepare_ahead in its
order that its plan does not skip, known from their answers and those of the nodes before
them), whose channels it opens (each a TLS handshake, with the key pin) and keeps, as their
steps need them moments later. Only the first max_parallel + prepare_ahead in order wait for
their answers before they are dialled or opened (a node further on that turns out to be among
the first it steps has its channel opened then, instead of the TCP connection); whatever is
proved after an answer has ``PROVED_AFTER_ANSWER`` at least, so an answer late in the window
does not fail a start that ``tlsroll plan`` passes (review 1b of session 31). A node that
fails either is unreachable with the reason, as over the channel: a start with it is refused
before anything switches. (A TCP connection does not prove the listener is this node's agent:
another node's agent on a stale address passes it, and that node's preflight refuses it at its
TLS check, a halt, as for any node that fails mid-rollout.)

Questions on the streams all go out at once; the channel fallbacks and a start's first channels
go ``OBSERVE_AT_ONCE`` at a time (each opens a TLS connection). Each has a short deadline and no
retries: a plan is shown to an admin who waits for it, and an agent that does not answer within
``OBSERVE_TIMEOUT`` is reported as unreachable (with the reason), never waited for. The way in's
deadline covers all of its wait (the address read, a slot among ``AgentPool.reach``'s dials, the
connect): a node not dialled by then is reported so, not waited for in turn. An error of one
node's way in (the node removed meanwhile, the leader out of descriptors) is that node's reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace

import grpc
from cryptography import x509

from leader.agent_client import (
    STATUS_CODES,
    Agents,
    NodeDiskFull,
    NodeStoreUnavailable,
    StepFailed,
    call_failed,
)
from leader.rollout_core import CONFIG_READING_DRIVERS, SERVER_DOWN, NodeObservation
from tlsroll import peertext, pki
from tlsroll.enums import NEEDS_ADMIN, Change, of_server, problem_of_server
from tlsroll.errors import PKIError, TlsrollError, TransientError
from tlsroll.v1 import agent_pb2, leader_pb2
from tlsroll.wire import CHANGE

OBSERVE_TIMEOUT = 5.0
# Agents asked over the channel at once (those that cannot answer on their heartbeat stream):
# each first call opens a TLS connection, and 500 handshakes at once on a small leader machine
# timed out by the hundred ("no SETTINGS frame").
OBSERVE_AT_ONCE = 16
# A start's node proved once its answer is in (its channel, or a TCP connection for a node it
# did not dial while the question was out) has at least this long for it, whenever in the
# window the answer came.
PROVED_AFTER_ANSWER = 1.0
MAX_CLOCK_OFFSET = 120  # as the preflight step (leader.changes)

Ask = Callable[[str, agent_pb2.CheckRequest, float], Awaitable[leader_pb2.CheckAnswer | None]]
"""Ask a node's agent the question on its heartbeat stream, waiting at most that long: its
answer; None if there is no stream to ask it on; ``StreamEnded`` if the stream ended before
the answer came; TimeoutError if none came in time; ``NodeProblem`` if the node is not to be
planned now (``LeaderService.ask_check``)."""


Reach = Callable[..., Awaitable[str | None]]
"""Can the leader reach the node's agent where it dials it, by that deadline (the event loop's
clock; ``channel``: by opening its channel)? None, or why not (``"channel"``: ask over it for
the reason); a ``TlsrollError`` is this node's (``AgentPool.reach``)."""


@dataclass(frozen=True)
class FirstSteps:
    """A rollout's start: the nodes whose channels its planning opens are the first ``count``
    of ``order`` (its online nodes in the order it steps them) that it steps (``steps``: not
    skipped as already done, from what the node's answer says), not the first ``count`` in
    ``order`` (a start after partial work skips those: review 2 of session 30, L3).
    ``reserve``: the start's rollout id, under which the pool keeps their channels
    (``AgentPool.reach``)."""

    order: Sequence[str]
    count: int
    steps: Callable[[NodeObservation], bool]
    reserve: str = ""


class NodeProblem(TransientError):
    """The node is not planned now, for the reason given (``LeaderState.node_problem``: two
    agents use its identity): it is unreachable with that reason, and not asked at all."""


class StreamEnded(TransientError):
    """The heartbeat stream a question was asked on ended before its answer came (the agent
    may well answer over the channel)."""


def observation(view: agent_pb2.ServerView, ca: x509.Certificate) -> NodeObservation:
    """A ``ServerView`` as the planner sees it."""
    from_ca, fingerprint = False, ""
    if view.cert_pem:
        try:
            served = pki.load_cert_pem(view.cert_pem)
            from_ca, fingerprint = pki.issued_by(served, ca), pki.fingerprint(served)
        except PKIError:
            from_ca = False
    if not view.healthy:
        # The agent's words, printed by the CLI and shown in the viewer: no control characters,
        # bounded (review s41rev3 L4; the heartbeat's own detail is cleaned the same way).
        detail = peertext.clean(view.detail, 200)
        needs_admin = detail if detail.startswith(NEEDS_ADMIN) else ""
        return NodeObservation(
            False,
            f"{SERVER_DOWN}{of_server(detail) or 'not healthy'}",
            needs_admin=needs_admin,
            configured=tuple(sorted(view.configured_schemes)),
            config_read=view.driver in CONFIG_READING_DRIVERS,
        )
    return NodeObservation(
        reachable=True,
        schemes=tuple(sorted(view.schemes)),
        cert_from_ca=from_ca,
        verifier_digest=view.verifier_digest,
        cert_fingerprint=fingerprint,
    )


async def observe(
    agents: Agents,
    names: Sequence[str],
    ca: x509.Certificate,
    *,
    warm: Collection[str] = frozenset(),
    edits: bool = False,
    way_back: bool = False,
    change: Change | None = None,
    ask: Ask | None = None,
    reach: Reach | None = None,
    first: FirstSteps | None = None,
) -> dict[str, NodeObservation]:
    """Ask every named node's agent what it runs; unreachable ones say why. The agents of the
    nodes in ``warm`` are told to load their certificate code ahead of their preflight
    (``CheckRequest.warm_certificates``). ``edits``: a plan of the way back to http, which
    asks each agent whether the server's config was edited since tlsroll wrote it
    (``CheckRequest.want_edited_config``; ``NodeObservation.edited_config``). ``way_back``:
    a plan or start of the way back, which renders no template (``CheckRequest.way_back``:
    the agents leave that check out). ``change``: the change planned, for which each agent
    says why its plan would be refused on its node (``CheckRequest.change``). ``ask``: the
    question goes on the node's heartbeat stream where it can (the module's docstring), else
    over the agent pool's channel; then ``reach`` proves the leader's way in: a TCP
    connection, made while the question is out, but for a starting rollout's (``first``)
    first ``first.count`` nodes in order, dialled once their answers are in; the first nodes
    it steps (known once their answers and those of the nodes before them are in) have their
    channels opened instead (the module's docstring)."""
    late = NodeObservation(False, f"no answer within {OBSERVE_TIMEOUT:.0f} s")

    gate = asyncio.Semaphore(OBSERVE_AT_ONCE)
    # ``first``: each of its nodes, in order: does the plan step it (set once its answer is in,
    # or False once it has none)?
    loop = asyncio.get_running_loop()
    stepped = {n: loop.create_future() for n in first.order} if first is not None else {}
    position = {n: at for at, n in enumerate(first.order)} if first is not None else {}

    def decided(name: str, seen: NodeObservation | None) -> None:
        will = stepped.get(name)
        if will is not None and not will.done():
            assert first is not None
            will.set_result(seen is not None and seen.reachable and first.steps(seen))

    async def among_first(name: str, deadline: float) -> bool:
        """Is ``name`` (stepped) one of the first ``first.count`` nodes the start steps? It
        waits for the answers of the nodes before it, until they make the count (half the
        deadline at most: not known by then, it is no first node, and is dialled, or its early
        dial kept)."""
        if first is None or name not in position or not stepped[name].result():
            return False
        ahead = 0
        try:
            async with asyncio.timeout_at(deadline - OBSERVE_TIMEOUT / 2):
                for other in first.order[: position[name]]:
                    will = stepped[other]
                    if will.result() if will.done() else await asyncio.shield(will):
                        ahead += 1
                        if ahead >= first.count:
                            return False
        except TimeoutError:
            return False
        return ahead < first.count

    def question(name: str) -> agent_pb2.CheckRequest:
        request = agent_pb2.CheckRequest(
            max_clock_offset_seconds=MAX_CLOCK_OFFSET,
            warm_certificates=name in warm,
            want_edited_config=edits,
            way_back=way_back,
        )
        if change is not None:
            request.change = CHANGE.wire(change)
        request.leader_time.FromDatetime(dt.datetime.now(dt.UTC))
        return request

    async def one(name: str) -> NodeObservation:
        seen: NodeObservation | None = None
        try:
            seen = await asked(name)
            return seen
        finally:
            decided(name, seen)

    async def asked(name: str) -> NodeObservation:
        """On the stream (all nodes at once: no channel, no handshake) with the way in proved
        (``reach``): dialled meanwhile, but a start's first ``first.count`` nodes in order,
        which wait for the answers (theirs and those before them) to know whether theirs is a
        channel to open, and are then dialled or opened with ``PROVED_AFTER_ANSWER`` at
        least; a node further on found among the first it steps has its channel opened
        then, its early dial dropped. Else over the channel, ``OBSERVE_AT_ONCE`` nodes at a
        time."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + OBSERVE_TIMEOUT  # the way in's, all of it (``AgentPool.reach``)
        spent = 0.0  # of the deadline, by a stream that ended before its answer
        if ask is not None:
            # Every node is dialled (TCP) while the question is out, but a start's first
            # ``first.count`` in order: one of those may be among the first it steps, whose
            # channel is opened once the answers say so (``among_first``); a node further on
            # that turns out to be among them has its channel opened then instead.
            maybe_first = first is not None and position.get(name, first.count) < first.count
            way_in = (
                asyncio.ensure_future(reach(name, deadline, channel=False))
                if reach is not None and not maybe_first
                else None
            )
            bound = deadline
            timed_out = False
            try:
                answer = await ask(name, question(name), OBSERVE_TIMEOUT)
            except TimeoutError:
                answer, timed_out = None, True
            except NodeProblem as exc:  # neither its stream nor the channel: its reason
                if way_in is not None:
                    way_in.cancel()
                    await asyncio.gather(way_in, return_exceptions=True)
                return NodeObservation(False, str(exc))
            except StreamEnded:  # (the agent restarted, renewed, the leader cut the stream)
                answer, spent = None, loop.time() - began  # the channel gets the time left
            except BaseException:
                if way_in is not None:
                    way_in.cancel()
                raise
            seen = answered(name, answer) if answer is not None else None
            if seen is not None and name in position:
                decided(name, seen)  # (the nodes after it wait for that)
                if seen.reachable and reach is not None:
                    # Proved after its answer: a bound of its own, not what the question left
                    # of the deadline (an answer late in the window left the dial ~50 ms, and
                    # a start refused a node ``tlsroll plan`` accepts: review 1b, finding 1).
                    bound = max(deadline, loop.time() + PROVED_AFTER_ANSWER)
                    way_in = asyncio.ensure_future(proved(name, deadline, bound, way_in))
            if seen is None or not seen.reachable or way_in is None:
                if way_in is not None:  # the channel (if any) proves it, or it is unreachable
                    way_in.cancel()
                    await asyncio.gather(way_in, return_exceptions=True)
                if seen is not None:
                    return seen
                if timed_out:
                    return late
            else:
                try:
                    # ``reach`` keeps to the deadline and says why not; a second more, so that
                    # its reason, not this bound, is what the admin reads.
                    async with asyncio.timeout_at(bound + 1):
                        failed = await way_in
                except TimeoutError:
                    return late
                except TlsrollError as exc:  # (the node removed meanwhile, no socket left)
                    return NodeObservation(False, str(exc))
                if failed is None:
                    return seen
                if failed != "channel":
                    return NodeObservation(False, failed)
                # gRPC's reason: the channel's Check says it, in what is left of the 5 s or,
                # for a proof made after a late answer, of its own bound (review 2 of session
                # 31, finding 1: a node that answered was reported "no answer within 5 s").
                now = loop.time()
                if now >= bound > deadline:
                    return NodeObservation(
                        False,
                        f"agent {name}: its channel was not ready within "
                        f"{PROVED_AFTER_ANSWER:g} s of its answer",
                    )
                spent = min(now - began, OBSERVE_TIMEOUT - (bound - now))
        async with gate:
            return await over_channel(name, OBSERVE_TIMEOUT - spent)

    async def proved(
        name: str, deadline: float, bound: float, early: asyncio.Future[str | None] | None
    ) -> str | None:
        """A start's node, once its answer is in: for the first it steps (``among_first``)
        its channel (a TLS handshake, kept for its steps) through the same gate as the channel
        fallbacks, instead of its ``early`` TCP connection if it had one; for the others that
        connection, or one made now; no later than ``bound``."""
        assert reach is not None and first is not None
        try:
            if not await among_first(name, deadline):
                if early is not None:
                    return await early
                return await reach(name, bound, channel=False)
            if early is not None:
                early.cancel()
                await asyncio.gather(early, return_exceptions=True)
            async with asyncio.timeout_at(bound):
                await gate.acquire()
            try:
                return await reach(name, bound, channel=True, reserve=first.reserve)
            finally:
                gate.release()
        finally:
            if early is not None:
                early.cancel()  # (cancelled itself: its dial too; done: nothing)

    async def over_channel(name: str, left: float) -> NodeObservation:
        if left <= 0:
            return late
        request = question(name)
        try:
            agent = await agents.get(name)
            checked = await asyncio.wait_for(agent.check(request, timeout=left), left + 1)
        except TimeoutError:
            return late
        # It answered, but not its checks (a refusal, its disk full, its journal failing for a
        # moment: review s74 L1): what does it run?
        except (StepFailed, NodeDiskFull, NodeStoreUnavailable) as exc:
            try:
                status = await asyncio.wait_for(
                    agent.get_status(agent_pb2.GetStatusRequest(), timeout=OBSERVE_TIMEOUT),
                    OBSERVE_TIMEOUT + 1,
                )
            except TimeoutError:
                return late
            except TlsrollError as failed:
                return NodeObservation(False, str(failed))
            return refused(status.server, exc)
        except TlsrollError as exc:
            return NodeObservation(False, str(exc))
        return seen_checked(checked)

    def seen_checked(checked: agent_pb2.PreflightResponse) -> NodeObservation:
        # Check's answer carries the same ServerView as GetStatus (taken as it checks, in
        # every release that has Check): one call per node, not two.
        seen = replace(
            observation(checked.server, ca),
            http_url=peertext.clean(checked.old_url, 300),
            https_url=peertext.clean(checked.new_url, 300),
            bootstrap_port=checked.bootstrap_port,
        )
        if checked.edited_config:  # (a down server too: the way back takes it back all the same)
            seen = replace(seen, edited_config=peertext.clean(checked.edited_config, 300))
        if not seen.reachable:
            return seen
        return replace(seen, problems=tuple(problem_of_server(p) for p in checked.problems))

    def refused(
        view: agent_pb2.ServerView, refusal: StepFailed | NodeDiskFull | NodeStoreUnavailable
    ) -> NodeObservation:
        """An agent that refused its checks, or could not make them as its node's disk is full:
        what it runs (GetStatus), and the refusal as its problem (the plan shows the node
        blocked with it; an agent without a managed server is not reachable for a rollout)."""
        seen = observation(view, ca)
        return replace(seen, problems=(f"its checks: {refusal}",)) if seen.reachable else seen

    def answered(name: str, answer: leader_pb2.CheckAnswer) -> NodeObservation:
        """The answer on the stream, read as the channel's Check (and GetStatus) would be."""
        if not answer.refused_code:
            return seen_checked(answer.checked)
        code = STATUS_CODES.get(answer.refused_code, grpc.StatusCode.UNKNOWN)
        failed = call_failed(name, code, answer.refused)
        if isinstance(failed, StepFailed | NodeDiskFull | NodeStoreUnavailable):
            return refused(answer.server, failed)
        return NodeObservation(False, str(failed))

    # Asked last to first, for the channel fallbacks (an agent that cannot answer on a stream):
    # a rollout goes through its nodes in name order (``order_nodes``), and the agent pool keeps
    # the channels used last open (``MAX_OPEN_CHANNELS``), so those left open are of the nodes
    # the rollout asks first, not of those it reaches last (each channel opened again is a TLS
    # handshake). Questions on the streams all go out at once, whatever the order.
    backwards = list(reversed(names))
    results = await asyncio.gather(*(one(n) for n in backwards))
    return dict(zip(names, reversed(results), strict=True))
