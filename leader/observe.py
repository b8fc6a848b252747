"""What each node runs now, asked of its agent: what rollouts are planned from.

    seen = await observe(agents, ["node1", "node2"], ca_cert)
    seen["node1"].schemes          # ("https",)
    seen["node2"].problems         # ("port 8443 (https) on … is taken by …",)

``Check`` runs preflight's checks read-only (no epoch, nothing recorded on the node), so
``tlsroll plan`` can say "blocked" and why, and its answer's ``ServerView`` says what the
managed server runs (schemes, the served certificate, the live verifier's digest), as
``GetStatus`` would: one call per node.

Agents are asked ``OBSERVE_AT_ONCE`` at a time, each with a short deadline and no retries: a
plan is shown to an admin who waits for it, and an agent that does not answer within
``OBSERVE_TIMEOUT`` is reported as unreachable (with the reason), never waited for.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import replace

from cryptography import x509

from leader.agent_client import AgentApi, Agents, StepFailed
from leader.rollout_core import NodeObservation
from tlsroll import pki
from tlsroll.errors import PKIError, TlsrollError
from tlsroll.v1 import agent_pb2

OBSERVE_TIMEOUT = 5.0
# Agents asked at once: each first call opens a TLS connection, and 500 handshakes at once on
# a small leader machine timed out by the hundred ("no SETTINGS frame").
OBSERVE_AT_ONCE = 16
MAX_CLOCK_OFFSET = 120  # as the preflight step (leader.changes)


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
        return NodeObservation(False, f"the managed server: {view.detail or 'not healthy'}")
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
) -> dict[str, NodeObservation]:
    """Ask every named node's agent what it runs; unreachable ones say why. The agents of the
    nodes in ``warm`` are told to load their certificate code ahead of their preflight
    (``CheckRequest.warm_certificates``)."""

    async def one(name: str) -> NodeObservation:
        request = agent_pb2.CheckRequest(
            max_clock_offset_seconds=MAX_CLOCK_OFFSET, warm_certificates=name in warm
        )
        request.leader_time.FromDatetime(dt.datetime.now(dt.UTC))
        try:
            agent = await agents.get(name)
            checked = await asyncio.wait_for(
                agent.check(request, timeout=OBSERVE_TIMEOUT), OBSERVE_TIMEOUT + 1
            )
        except TimeoutError:
            return NodeObservation(False, f"no answer within {OBSERVE_TIMEOUT:.0f} s")
        except StepFailed as exc:  # it answered, but not its checks: what does it run?
            return await refused_checks(agent, exc)
        except TlsrollError as exc:
            return NodeObservation(False, str(exc))
        # Check's answer carries the same ServerView as GetStatus (taken as it checks, in
        # every release that has Check): one call per node, not two.
        seen = observation(checked.server, ca)
        if not seen.reachable:
            return seen
        return replace(seen, problems=tuple(checked.problems))

    async def refused_checks(agent: AgentApi, refusal: StepFailed) -> NodeObservation:
        """An agent that refused its checks: what it runs (GetStatus), and the refusal as its
        problem (an agent without a managed server is not reachable for a rollout)."""
        try:
            status = await asyncio.wait_for(
                agent.get_status(agent_pb2.GetStatusRequest(), timeout=OBSERVE_TIMEOUT),
                OBSERVE_TIMEOUT + 1,
            )
        except TimeoutError:
            return NodeObservation(False, f"no answer within {OBSERVE_TIMEOUT:.0f} s")
        except TlsrollError as exc:
            return NodeObservation(False, str(exc))
        seen = observation(status.server, ca)
        return replace(seen, problems=(f"its checks: {refusal}",)) if seen.reachable else seen

    gate = asyncio.Semaphore(OBSERVE_AT_ONCE)

    async def gated(name: str) -> NodeObservation:
        async with gate:
            return await one(name)

    # Asked last to first: a rollout goes through its nodes in name order (``order_nodes``),
    # and the agent pool keeps the channels used last open (``MAX_OPEN_CHANNELS``), so those
    # left open are of the nodes the rollout asks first, not of those it reaches last (each
    # channel opened again is a TLS handshake).
    backwards = list(reversed(names))
    results = await asyncio.gather(*(gated(n) for n in backwards))
    return dict(zip(names, reversed(results), strict=True))
