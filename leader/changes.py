"""One step strategy per change: what preflight, stage, switch and confirm do on a node.

The engine decides *when* a step runs (the planner's plan); a strategy decides *how*, talking
to the node's agent and returning the step's result event for the pure core::

    steps = STRATEGIES[rollout.change]
    event, reason = await steps.switch(ctx)        # NodeEvent.SWITCH_DONE, None

What differs between changes as data (does it stage a certificate, must the node already be on
https, which password, which scheme the outside check expects) is in ``rollout_core.CHANGES``;
a strategy holds only the calls that differ:

    EnableTls       Switch(enable-tls) to https with the staged certificate; confirm over https
    DualTls         transitional phase 1: Switch(enable-tls, keep_http): https beside http;
                    confirm both from outside; the node ends dual (``strategy_for``)
    Finalize        transitional phase 2: Switch(finalize) closes http on a dual node; confirm
                    https live and 8080 closed; the agent's rollback goes back to dual
    ChangePassword  Switch(change-password): same config, the staged password; confirm as above
    DisableTls      Rollback of the enable-tls switch it undoes (from https or dual); confirm
                    over http

A strategy returns terminal outcomes as events; a ``TransientError`` (the agent unreachable)
propagates and the engine runs the step again later.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from leader import byo
from leader.agent_client import (
    REFUSAL_CODES,
    WATCHED_PHASES,
    AgentApi,
    NotHeardYet,
    NotSent,
    StepFailed,
    SwitchRefused,
)
from leader.planner import confirm_success
from leader.rollout_core import (
    CHANGES,
    NOT_ON_HTTPS,
    Change,
    FreezeMode,
    Held,
    NodeEvent,
    NodeObservation,
    Rollout,
    Strategy,
    after_refusal,
    begun_not_known,
    down_on_https,
    live_and_closed,
    refused_reason,
    unanswered,
    wrong_source,
)
from leader.schema_store import (
    NodeDetail,
    RolloutMeta,
    SchemaStore,
    measured_seconds,
    write_clients,
)
from leader.service import client_rows, sent_shift
from leader.store import IssuedCert, Node, Store
from leader.wire import CHANGE, TXN_KIND, TXN_OUTCOME
from tlsroll import dbthread, logs, peertext, pki, probe, spiffe
from tlsroll.clients import NOT_QUIET
from tlsroll.enums import (
    ENABLE_DUAL,
    SERVER_NOT_HEALTHY,
    TxnKind,
    TxnOutcome,
    another_switch,
    names_another_switch,
    problem_of_server,
)
from tlsroll.errors import PKIError, TerminalError, TransientError
from tlsroll.v1 import agent_pb2
from tlsroll.wire import WireError

if TYPE_CHECKING:  # the certificate object only; the steps load it through tlsroll.pki
    from cryptography import x509
    from google.protobuf.timestamp_pb2 import Timestamp

log = logs.get_logger(__name__)

Outcome = tuple[NodeEvent, str | None]

SEND_AGAIN = 3
"""How many times more a request that begins a transaction (the way back's Rollback, the
confirm's, an older agent's Switch) is sent within its step when its agent answered it with
no refusal (``failed_code``: INTERNAL, UNKNOWN, CANCELLED, ABORTED, RESOURCE_EXHAUSTED...)
and, asked, holds none of it; after the last, none held, the node's outcome says it failed
and did not begin. Sent again, not only asked: an answer made on the way (a stream reset
with an error code, INTERNAL or UNKNOWN by the gRPC release) may reach the leader while the
agent's handler still journals the transaction (a reset reaches the client before the
handler is cancelled, and its journal write, handed to the store's thread, runs to its end
all the same; an agent of session 72 or before read GetTransaction beside that thread, and
one that has not handed its write yet, still under its command lock, is not behind it
either (an agent of session 73 or later waits for it: ``nodeagent.service.Receipts``), while
a request sent again waits its turn on both): asked at once it holds none,
and it begins after all (review s72 revrefused: "nothing on the node was changed" while the
way back took the node to http). A request sent again begins nothing an earlier one began
(a replay answers with it, and starts it if the handler that journalled it was cancelled
before it did). Bounded for every such code: session 72's first version sent CANCELLED,
ABORTED and RESOURCE_EXHAUSTED again by running the step again, without end: an agent that
answers ABORTED every time held the rollout, and its abort, for good, the node's row saying
"agent unreachable ... it may be mid-switch". (An agent that stops answers UNAVAILABLE,
"Cancelling all calls", not CANCELLED: a ``TransientError``, the step runs again as for an
agent away.) The question itself (GetTransaction) answered so is asked again as many times
(``ChangeSteps.held``)."""

SEND_AGAIN_SECONDS = 1.0
"""The pause before a request is sent again (``SEND_AGAIN``; the engine's clock)."""


class SendAgain(TransientError):
    """(Within ``leader.changes``.) The agent answered a request that begins a transaction
    with no refusal and holds none of it: the step sends it again (``SEND_AGAIN``). Caught
    where it is raised; transient (the step runs again) should it ever get out."""


class BegunNotKnown(TerminalError):
    """(``ChangeSteps.switch_begun``.) The agent did not say whether it has the step's
    transaction: it refused the question, or failed it each time asked (``SEND_AGAIN``). Its
    message says so (``rollout_core.unanswered``); the node needs attention
    (``rollout_core.begun_not_known``)."""


async def ask_held(
    agent: AgentApi,
    request: agent_pb2.GetTransactionRequest,
    sleep: Callable[[float], Awaitable[Any]],
) -> tuple[Held, str, agent_pb2.Transaction | None]:
    """What ``agent`` holds under ``request``'s key: ``Held.NONE`` (NOT_FOUND), ``Held.THIS``
    with the transaction (its key only: the caller looks further), ``Held.UNANSWERED`` (it
    refused the question: ``REFUSAL_CODES``) or ``Held.FAILED`` (its own failure, INTERNAL,
    ABORTED..., each of ``1 + SEND_AGAIN`` times asked, ``SEND_AGAIN_SECONDS`` apart by
    ``sleep``), with its last answer. No answer (``TransientError``) raises."""
    for again in range(SEND_AGAIN, -1, -1):
        try:
            return Held.THIS, "", await agent.get_transaction(request)
        except StepFailed as exc:
            if exc.code is grpc.StatusCode.NOT_FOUND:
                return Held.NONE, "", None
            if exc.code in REFUSAL_CODES:
                return Held.UNANSWERED, str(exc), None
            if not again:
                return Held.FAILED, str(exc), None
        await sleep(SEND_AGAIN_SECONDS)
    raise AssertionError("unreachable")  # pragma: no cover - the last answer returns


def failed_code(code: grpc.StatusCode | None) -> bool:
    """Whether an agent's answer ``code`` to a request that begins a transaction is its own
    failure, not a refusal (``REFUSAL_CODES``: its checks, its epoch, its leader, before
    anything began): INTERNAL (its bug), UNKNOWN, UNIMPLEMENTED, CANCELLED, ABORTED..., which
    say nothing of whether the request began it (session 72: the way back recorded them
    "going back to http refused", the node ``rolled_back``, without asking). No code: a
    StepFailed of the leader's own (its tests' agents) is a refusal, as before."""
    return code is not None and code not in REFUSAL_CODES


MAX_CLOCK_OFFSET = 120


KEY_GONE = ("no CSR for rollout", "does not match the staged key")
"""What an agent's Stage says (``nodeagent/service.py``, ``Stage``) when it holds no key, or
another one, than the one the preflight's CSR is of: only then does CreateCSR (a new key, a
new CSR) help. Text, as the refusal carries no finer code; the roles share no module."""


def preflight_csr_unusable(exc: StepFailed) -> bool:
    """Whether a stage that sent the certificate signed from the preflight's CSR may be tried
    once more with CreateCSR: only when the agent's Stage refused it because it no longer
    holds the key that CSR is of (``KEY_GONE``). Any other refusal (a stale epoch, "already
    switching", a pin mismatch, ...) is the node's answer: another round would sign and record
    a second certificate nobody uses, and report the second error instead of the first. (On
    that path nothing is signed before the Stage, so no PKIError can arise there.)"""
    return any(text in str(exc) for text in KEY_GONE)


@dataclass(frozen=True)
class RolloutFacts:
    """What a rollout's steps look up that does not change while it runs, read once for
    all its nodes (``rollout_facts``): each step asked the store again (five queries and
    worker threads per node).

    ``own_ca``: the practice CA of a ``--cert-dir`` rollout (None for the usual one; stored
    before the rollout exists). ``trusted``: the CAs the outside check trusts. ``verifier``:
    the verifier of the password version the rollout applies ("" for none; versions never
    change once stored)."""

    own_ca: bytes | None
    trusted: bytes
    verifier: str


def rollout_facts(
    schema: SchemaStore, rollout_id: str, auth_version: int, ca_pem: bytes
) -> RolloutFacts:
    """Read a rollout's ``RolloutFacts`` (blocking: call it in a worker thread). The outside
    check of a ``--cert-dir`` rollout trusts its practice CA only; any other rollout's, the
    cluster CA and the practice CAs earlier ones installed (what the workstations were
    handed; a new one is stored only as a rollout starts, never while one runs)."""
    own = schema.own_ca(rollout_id)
    trusted = own if own is not None else ca_pem + schema.own_cas()
    verifier = schema.verifier(auth_version) if auth_version else ""
    return RolloutFacts(own, trusted, verifier)


@dataclass(frozen=True)
class Signed:
    """A node's server certificate that its preflight signed from the CSR it brought back:
    ``record`` is written with the preflight's outcome (the node's move to ``staging``, one
    durable write), and the stage sends ``cert`` (``StepContext.signed``). ``names``: the
    enrolled names it was signed for (``sign_csr`` issues exactly these), which the stage
    compares with the names enrolled then without parsing the certificate again."""

    cert: x509.Certificate
    record: IssuedCert
    names: pki.Names


@dataclass(frozen=True)
class StepContext:
    """Everything a step needs: the rollout, the node, its agent, and the leader's state."""

    rollout: Rollout
    meta: RolloutMeta
    node: str
    facts: RolloutFacts
    agent: AgentApi
    schema: SchemaStore
    store: Store
    ca: pki.CertificateAuthority
    clock: Callable[[], dt.datetime]
    monotonic: Callable[[], float] = time.monotonic  # elapsed time: a check's age
    sleep: Callable[[float], Any] = asyncio.sleep
    vault: byo.Vault | None = None  # ``--cert-dir`` keys (``leader.byo``)
    # What the step learnt about the node: the engine writes it with the step's outcome.
    learnt: dict[str, Any] = field(default_factory=dict)
    # (rollout, node) -> True: this leader process saw the node's switch transaction of the
    # rollout complete and has sent it no Rollback since (False once it has: for good). Only
    # the leader's Rollback starts a rollback transaction on an agent, so confirm need not
    # ask whether one is under way (``ChangeSteps.confirm``). The engine's, kept across
    # steps; a new process starts with none, and asks.
    switched_here: dict[tuple[str, str], bool] = field(default_factory=dict)
    # (rollout, node) -> the certificate signed from the CSR its preflight brought back
    # (``PreflightRequest.make_csr``) and recorded with the preflight's outcome, until its
    # stage sends it; the engine's, kept across steps, filled as that write commits
    # (``Engine._record``). Missing (an agent of an earlier release, a leader restarted
    # since, a preflight that ended while the rollout was paused or aborting, whose
    # certificate is not recorded): the stage asks with CreateCSR. Dropped by the stage
    # if the node's enrolled names changed since (CreateCSR then too).
    signed: dict[tuple[str, str], Signed] = field(default_factory=dict)
    # What this step signed (a preflight: ``Signed``): the engine records it with the step's
    # outcome, and hands it to the stage (``signed``) once that write is done.
    issued: list[Signed] = field(default_factory=list)
    # (rollout, node) -> the outside check begun as this process saw the node's switch
    # complete (``ChangeSteps.switch``), while the engine writes the switch's outcome: the
    # confirm takes its answer instead of checking again. The engine's, kept across steps;
    # taken (popped) by the confirm, so a confirm run again checks again.
    checks: dict[tuple[str, str], asyncio.Future[str | None]] = field(default_factory=dict)
    # The node's enrolment as the agent pool last read it (``AgentPool.get`` reads it again
    # after any store write that can change it); None: read it from the store.
    enrolled: Node | None = None
    # The confirm's event a switch reached too (``ChangeSteps.switch``: its outside check,
    # begun at the agent's verify, had found nothing wrong when the switch completed): the
    # engine writes the switch's outcome and the confirm's in one write (``Engine._record``),
    # and no confirm step runs; unless that write finds the agent cut off (its certificate
    # revoked meanwhile): the switch's alone then. Empty: the confirm step follows, as ever.
    confirmed: list[NodeEvent] = field(default_factory=list)
    # Called as the node's switch (or way back) leaves the first part of its freeze window:
    # the agent's stream says its config is written (the restart begins), or says no phase
    # (an agent of an earlier release), or the transaction ended. The engine holds the
    # preparation of nodes prepared ahead until then (``Engine._prepare_later``).
    restarting: Callable[[], None] = lambda: None

    def command(self, rollout_id: str | None = None) -> agent_pb2.Command:
        return agent_pb2.Command(rollout_id=rollout_id or self.rollout.id, epoch=self.rollout.epoch)

    async def enrolled_node(self) -> Node:
        """The node's enrolled names: from the agent pool's read when there is one (no worker
        thread, no query), else from the store."""
        if self.enrolled is not None and self.enrolled.name == self.node:
            return self.enrolled
        return await dbthread.run(self.store.get_node, self.node)

    async def detail(self, **changes: Any) -> None:
        """What the step learnt about the node (``SchemaStore.update_detail``'s fields),
        written in the same transaction as the step's outcome (one write per step)."""
        self.learnt.update(changes)

    async def progress(self, **changes: Any) -> None:
        """What the schema should show while the step still runs (a switch's freeze began):
        written now, with anything learnt before it, if it changes what is stored."""
        self.learnt.update(changes)
        # A switch's first state (begun, not yet frozen) usually changes nothing stored: no
        # hand-off to the store's thread for it (one per node).
        if not self.schema.detail_kept(self.rollout.id, self.node, self.learnt):
            await dbthread.run(self.schema.update_detail, self.rollout.id, self.node, **self.learnt)
        self.learnt.clear()


def staged_other(node: str, sent: str, said: str) -> str:
    """A stage's failure when the agent says it staged another certificate (``said``: its
    ``StageResponse.fingerprint``, the peer's text) than the one the leader sent (``sent``):
    the leader recorded the agent's word as what the node would serve (brief s67 budget 2).
    Nothing is recorded as served; the node is not switched."""
    return (
        f"stage: the agent of {node} says it staged the certificate "
        f"{peertext.clean(said, 80) or '(no fingerprint)'}, not {sent}, the one the leader "
        "signed and sent; not switched (check that agent: tlsroll nodes --check)"
    )


def server_certificate(
    ctx: StepContext, csr: x509.CertificateSigningRequest, names: pki.Names
) -> x509.Certificate:
    """A node's https certificate for ``csr``, checked against ``names`` (its enrolled ones):
    server use only, naming its holder as ``spiffe://…/server/<name>``, a role no peer of the
    cluster accepts (``tlsroll.spiffe``)."""
    return ctx.ca.sign_csr(
        csr,
        names,
        server=True,
        client=False,
        now=ctx.clock(),
        identity=spiffe.server(ctx.ca.trust_domain, names.common_name),
    )


class ChangeSteps:
    """The steps every change shares; subclasses change what differs."""

    change: Change
    keep_http = False  # the switch's target keeps http on 8080 beside https (dual)
    switch_kind = TxnKind.SWITCH  # the agent's transaction the switch step begins

    async def preflight(self, ctx: StepContext) -> Outcome:
        # The key and CSR for the stage come with the preflight: one call fewer per node.
        make_csr = CHANGES[self.change].stages_certificate and ctx.facts.own_ca is None
        request = agent_pb2.PreflightRequest(
            command=ctx.command(),
            max_clock_offset_seconds=MAX_CLOCK_OFFSET,
            make_csr=make_csr,
            # The way back renders no template: the agent leaves that check out.
            way_back=self.switch_kind is TxnKind.ROLLBACK,
            # The agent says why its plan of it would be refused (``CheckRequest.change``).
            change=CHANGE.wire(self.change),
        )
        request.leader_time.FromDatetime(ctx.clock())
        try:
            reply = await ctx.agent.preflight(request)
        except StepFailed as exc:
            return NodeEvent.PREFLIGHT_FAILED, str(exc)
        await ctx.detail(
            old_url=reply.old_url, new_url=reply.new_url, bootstrap_port=reply.bootstrap_port
        )
        # (an earlier release's agent names its server twice: ``problem_of_server``)
        problems = [problem_of_server(p) for p in reply.problems]
        schemes = reply.server.schemes
        down = NodeObservation(False, configured=tuple(reply.server.configured_schemes))
        if not reply.server.healthy and down_on_https(self.change, down):
            # The way back with the server down, its config on https: the agent's switch
            # restores http and starts it (review s45rt1 H1); judged by its config.
            problems = [p for p in problems if not p.startswith(SERVER_NOT_HEALTHY)]
            schemes = reply.server.configured_schemes
        if problems:
            return NodeEvent.PREFLIGHT_FAILED, "; ".join(problems)
        if CHANGES[self.change].requires_https and "https" not in schemes:
            return NodeEvent.PREFLIGHT_FAILED, f"the node is {NOT_ON_HTTPS}"
        serving = NodeObservation(True, schemes=tuple(sorted(schemes)))
        if why := wrong_source(self.change, serving, ctx.rollout.strategy):
            return NodeEvent.PREFLIGHT_FAILED, why  # what the plan saw may have changed
        node = await ctx.enrolled_node()
        claimed = pki.Names.of(reply.common_name, reply.ip_addresses, reply.dns_names)
        enrolled = pki.Names.of(node.name, node.addresses, node.dns_names)
        if claimed != enrolled:
            return NodeEvent.PREFLIGHT_FAILED, (
                f"the node's names {claimed} differ from its enrolment {enrolled}; re-enrol it"
            )
        if make_csr and reply.csr_pem:
            # Signed now, checked as any CSR (the names are the enrolled ones), and recorded
            # in the same write as the preflight's outcome: the stage sends it at once, with
            # no write of its own before it (one durable write and one store hand-off fewer
            # per node, on the first node's way to its switch). A CSR that cannot be signed
            # fails the preflight with the reason: the agent keeps one key per rollout and
            # answers a later CreateCSR with the same CSR, which the stage could not sign
            # either (it failed there, after an extra round trip, before review s28 L8).
            try:
                csr = pki.load_csr_pem(reply.csr_pem)
                cert = server_certificate(ctx, csr, enrolled)
            except PKIError as exc:
                return NodeEvent.PREFLIGHT_FAILED, f"its CSR cannot be signed: {exc}"
            record = IssuedCert.of(cert, "server", node.name, node.name, ctx.clock())
            ctx.issued.append(Signed(cert, record, enrolled))
        return NodeEvent.PREFLIGHT_PASSED, None

    async def stage(self, ctx: StepContext) -> Outcome:
        """A new key made on the node, its CSR signed by the CA, the certificate stored there
        (``--cert-dir``: the practice's own certificate and key instead, ``stage_own``)."""
        if ctx.facts.own_ca is not None:
            return await self.stage_own(ctx, ctx.facts.own_ca)
        key = (ctx.rollout.id, ctx.node)
        # Signed by the preflight and recorded with its outcome (``StepContext.signed``);
        # kept until the stage has an answer, so that a stage tried again after an agent that
        # did not answer (a TransientError) sends it again rather than a second certificate.
        signed = ctx.signed.get(key)
        cert = signed.cert if signed is not None else None
        node = await ctx.enrolled_node()
        expected = pki.Names.of(node.name, node.addresses, node.dns_names)
        # The names it was signed for, not its own parsed again (``Signed.names``).
        if signed is not None and signed.names != expected:
            ctx.signed.pop(key, None)
            # The node was enrolled again with other names since its preflight: that
            # certificate would fail the stage ("names differ"); CreateCSR, signed with the
            # names enrolled now, as before the merge (review s28 L3). The one not sent is
            # revoked when the node is done (superseded) or ends otherwise (never staged).
            log.info("stage.names_changed", rollout_id=ctx.rollout.id, node=ctx.node)
            cert = None
        from_preflight = cert is not None
        try:
            if cert is None:  # no CSR at the preflight, none signed, or one for other names
                csr_reply = await ctx.agent.create_csr(
                    agent_pb2.CreateCSRRequest(command=ctx.command())
                )
                # Checked and signed as any CSR: the names are the enrolled ones, whoever
                # asked.
                csr = pki.load_csr_pem(csr_reply.csr_pem)
                cert = server_certificate(ctx, csr, expected)
                # Recorded, so that `certs check-expiration` has its serial and `nodes
                # remove` revokes it; revoked instead of sent if the node has ended
                # meanwhile (an abort skipped it while this stage was in CreateCSR).
                if not await dbthread.run(
                    ctx.schema.record_stage_certificate,
                    ctx.rollout.id,
                    IssuedCert.of(cert, "server", node.name, node.name, ctx.clock()),
                    now=ctx.clock(),
                ):
                    return NodeEvent.STAGE_FAILED, (
                        "the node's stage ended meanwhile; its certificate is revoked,"
                        " never delivered"
                    )
            staged = await ctx.agent.stage(
                agent_pb2.StageRequest(
                    command=ctx.command(),
                    certificate_pem=pki.cert_to_pem(cert),
                    ca_certificate_pem=ctx.ca.cert_pem,
                    switch_to_come=self.switch_to_come(ctx),
                )
            )
        except (StepFailed, PKIError) as exc:
            ctx.signed.pop(key, None)
            if from_preflight and isinstance(exc, StepFailed) and preflight_csr_unusable(exc):
                # The key the preflight's CSR is of is gone (the agent lost its journal
                # since): once more as before the merge, CreateCSR first.
                return await self.stage(ctx)
            return NodeEvent.STAGE_FAILED, str(exc)
        ctx.signed.pop(key, None)
        sent = pki.fingerprint(cert)
        if staged.fingerprint != sent:
            return NodeEvent.STAGE_FAILED, staged_other(ctx.node, sent, staged.fingerprint)
        # The end of the certificate this leader signed and sent, not the agent's word for it
        # (``StageResponse.not_after``): one out of protobuf's range made the step crash at
        # every pass, the node held in staging for good; a far one was stored and shown
        # (session 67, peers' times). Its fingerprint too, which the agent's matched.
        await ctx.detail(cert_fingerprint=sent, cert_not_after=cert.not_valid_after_utc)
        return NodeEvent.STAGE_DONE, None

    async def stage_own(self, ctx: StepContext, own_ca: bytes) -> Outcome:
        """``--cert-dir``: the node's certificate and key from the leader's memory to the
        agent (mutual TLS), which checks them again and stores them inactive, then the key is
        forgotten here. A leader that restarted since the rollout started has no key: the
        node fails its stage, unchanged, and the reason says what to do."""
        item = ctx.vault.get(ctx.rollout.id, ctx.node) if ctx.vault is not None else None
        if item is None:
            return NodeEvent.STAGE_FAILED, (
                f"the leader holds no key from --cert-dir for {ctx.node} (keys are kept in "
                "memory only, and the leader restarted since the rollout started); nothing "
                f"changed on {ctx.node}: start again with tlsroll rollout start --change "
                f"{self.change.value} --nodes {ctx.node} --cert-dir DIR"
            )
        try:
            chain = byo.chain_pem(item)
            leaf = pki.load_cert_pem(chain)  # the node's own, first in the chain
            not_after = leaf.not_valid_after_utc  # (as ``stage``'s)
            staged = await ctx.agent.stage(
                agent_pb2.StageRequest(
                    command=ctx.command(),
                    certificate_pem=chain,
                    # The cluster CA too: it signs the workstations' client certificates.
                    ca_certificate_pem=own_ca + ctx.ca.cert_pem,
                    private_key_pem=item.key_pem,
                    own_certificate=True,
                    switch_to_come=self.switch_to_come(ctx),
                )
            )
        except (StepFailed, PKIError) as exc:
            assert ctx.vault is not None
            ctx.vault.drop(ctx.rollout.id, ctx.node)
            return NodeEvent.STAGE_FAILED, str(exc)
        assert ctx.vault is not None
        ctx.vault.drop(ctx.rollout.id, ctx.node)
        sent = pki.fingerprint(leaf)
        if staged.fingerprint != sent:
            return NodeEvent.STAGE_FAILED, staged_other(ctx.node, sent, staged.fingerprint)
        await ctx.detail(cert_fingerprint=sent, cert_not_after=not_after)
        return NodeEvent.STAGE_DONE, None

    def switch_to_come(self, ctx: StepContext) -> agent_pb2.SwitchToCome:
        """What the Stage tells the agent of the switch that follows (the SwitchRequest's
        verifier and keep_http), so that it makes that switch ready at the stage."""
        return agent_pb2.SwitchToCome(
            auth_verifier_json=ctx.facts.verifier, keep_http=self.keep_http
        )

    async def switch(self, ctx: StepContext) -> Outcome:
        """Begin the switch and follow it to its outcome, in one call to the agent
        (``AgentApi.switch_and_watch``)."""
        request = agent_pb2.SwitchRequest(
            command=ctx.command(),
            change=CHANGE.wire(self.change),
            auth_verifier_json=ctx.facts.verifier,
            keep_frozen=ctx.rollout.freeze is FreezeMode.SCOPE,
            keep_http=self.keep_http,
        )
        if self.change is Change.FINALIZE and ctx.meta.when_quiet:
            request.quiet_seconds = ctx.meta.when_quiet  # the agent's own look, afresh
        key = (ctx.rollout.id, ctx.node)
        early: asyncio.Future[str | None] | None = None
        early_at = 0.0  # when it began (``ctx.monotonic``)

        def verified() -> None:
            """The agent verified the new server, and its unfreeze changes no answer (the
            stream's ``unfreeze_keeps_answers``: an admin socket's flag, not an admin's
            command): the confirm's outside check begins now, while the agent unfreezes the
            server and journals the switch complete, and the outcome travels and is written
            here. It only looks at the node (it sends the agent nothing); the server it sees
            is the one the switch ends with, answering as it will once unfrozen (the agent's
            verify got the same answers from it). Not once a Rollback was sent for this
            switch (``switched_here`` False)."""
            nonlocal early, early_at
            if early is None and ctx.switched_here.get(key, True):
                early, early_at = self._begin_check(ctx, key), ctx.monotonic()

        try:
            for again in range(SEND_AGAIN, -1, -1):
                try:
                    outcome, reason = await wait_transaction(
                        ctx,
                        ctx.rollout.id,
                        TxnKind.SWITCH,
                        begin=request,
                        change=self.journalled_change(),
                        verified=verified,
                    )
                except SwitchRefused as exc:  # refused: began now, or by an earlier run?
                    if request.quiet_seconds and NOT_QUIET in str(exc):
                        # Not quiet by the agent's fresh look (it looks only with no switch
                        # journalled): the node goes back to wait at the gate, with the
                        # sighting stored (``_store_sighting``), which holds it there.
                        await _store_sighting(ctx)
                        why = str(exc)[str(exc).index(NOT_QUIET) :]
                        return NodeEvent.SWITCH_HELD, peertext.clean(why, REASON_LIMIT)
                    # (Its code: an agent of an earlier release's Switch may answer INTERNAL;
                    # with none held it is sent again: ``SEND_AGAIN``.)
                    try:
                        refused = await self.refused(
                            ctx, "switch", str(exc), exc.code, last=not again
                        )
                    except SendAgain:
                        await ctx.sleep(SEND_AGAIN_SECONDS)
                        continue
                    if refused is not None:
                        return refused
                    # This step's switch, begun by an earlier run of it (or by this call):
                    # followed to its outcome.
                    outcome, reason = await wait_transaction(
                        ctx, ctx.rollout.id, TxnKind.SWITCH, verified=verified
                    )
                break
        except BaseException:
            _drop_begun(ctx, key, early)  # the step runs again: its own check, if any
            raise
        if outcome is TxnOutcome.COMPLETED:
            ctx.switched_here.setdefault(key, True)
            fresh = (
                early is not None
                and ctx.checks.get(key) is early
                and ctx.monotonic() - early_at <= EARLY_CHECK_FRESH
            )
            if ctx.switched_here[key] and not fresh:
                # The confirm's outside check begins now if it did not at the verify (a stream
                # that joined after it, an agent's state that went by unsent, an unfreeze that
                # may change answers) or began too long before the switch completed (an
                # unfreeze tried again: what it saw may be gone): the switch's outcome is
                # written meanwhile.
                self._begin_check(ctx, key)
            elif early is not None and ctx.switched_here[key]:
                await self._confirm_with_switch(ctx, key, early)
        else:
            _drop_begun(ctx, key, early)
        return switch_event(outcome), (None if outcome is TxnOutcome.COMPLETED else reason)

    @staticmethod
    async def _confirm_with_switch(
        ctx: StepContext, key: tuple[str, str], early: asyncio.Future[str | None]
    ) -> None:
        """The switch completed with the confirm's outside check begun at the verify and still
        fresh: if that check ends within ``CONFIRM_WITH_SWITCH`` (it began while the agent
        unfroze the server and journalled the switch complete, and mostly ends about when the
        outcome arrives) and found nothing wrong, the confirm is done too
        (``StepContext.confirmed``): one durable write for both outcomes, and no confirm step
        (its task, its write, then the next node's switch). A check that found a problem, or
        has not ended, stays for the confirm step, which rolls the node back or waits for it,
        as ever: nothing is sent to the agent here, and the switch's outcome is written
        before the confirm's Rollback is sent.

        A check that has already ended (mostly: it began at the verify, before the agent's
        unfreeze and its completed record) is taken as it is: no wait, whose timer task,
        waiter and callbacks cost two loop passes and more on the switch's critical path,
        between its outcome's arrival and the write that plans the next switch (issue 15)."""
        if not early.done():
            waited = asyncio.ensure_future(ctx.sleep(CONFIRM_WITH_SWITCH))  # the engine's clock
            try:
                await asyncio.wait({early, waited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waited.cancel()
        if not early.done() or early.cancelled() or early.exception() is not None:
            return
        if early.result() is None and ctx.checks.get(key) is early:
            del ctx.checks[key]
            ctx.confirmed.append(confirm_success(ctx.rollout))

    def _begin_check(self, ctx: StepContext, key: tuple[str, str]) -> asyncio.Future[str | None]:
        """Begin the confirm's outside check of the node ahead of its confirm (``confirm``
        takes it from ``StepContext.checks``), in place of one begun before."""
        drop_check(ctx.checks.pop(key, None))
        check = ctx.checks[key] = asyncio.ensure_future(self.outside_problem(ctx))
        check.add_done_callback(_retrieved)  # its confirm reads it, or nobody
        return check

    async def refused(
        self,
        ctx: StepContext,
        what: str,
        said: str,
        code: grpc.StatusCode | None = None,
        kind: TxnKind | None = None,
        *,
        last: bool = True,
    ) -> Outcome | None:
        """The node's outcome after its agent refused this step's ``what`` (``said``: its
        line; ``code``: its status), or None if the agent holds this step's transaction,
        begun by an earlier run of the step (or, for an answer that is no refusal, by this
        call): the caller follows it (``after_refusal`` decides from ``held``'s answer). An
        answer that is no refusal with none held raises ``SendAgain`` unless it answered the
        ``last`` send (``SEND_AGAIN``). ``kind``: the transaction's (default
        ``switch_kind``)."""
        held, asked = await self.held(ctx, what, said, kind)
        failed = failed_code(code)
        if failed and held is Held.NONE and not last:
            raise SendAgain(said)
        return after_refusal(what, said, held, asked, refused=not failed)

    async def held(
        self, ctx: StepContext, what: str, said: str, kind: TxnKind | None = None
    ) -> tuple[Held, str]:
        """What the agent that refused this step's ``what`` (``said``) holds under the step's
        key (this rollout's id, ``kind`` or ``switch_kind``), and its refusal of the question
        if it refused it. A refusal that says the id names another switch
        (``tlsroll.enums.names_another_switch``: a finalize sent under the phase-1 id) is not
        asked about: the one it holds is not this step's, never followed. A transaction whose
        certificate is not the one this rollout staged on the node is not this step's either,
        nor one of another change (``Transaction.change``: a rollout id used again after the
        store was restored; an agent of an earlier release says none, then the key decides).
        No answer (``TransientError``) raises: the step runs again, and sends the request
        again (a replay begins nothing). An answer that is no refusal (the agent's own
        trouble: INTERNAL, ABORTED, an answer about another transaction) is asked again
        within the step, ``SEND_AGAIN`` times ``SEND_AGAIN_SECONDS`` apart; failing still, it
        is ``Held.FAILED`` with its last answer: not known, the node needs attention (review
        s72 refused, L4: it raised a ``TransientError`` saying "{what} refused" even after a
        failure, and the step ran again without end, the node's row saying "agent
        unreachable ... it may be mid-switch" of an agent that answered)."""
        if names_another_switch(said):
            return Held.OTHER, ""
        kind = kind or self.switch_kind
        request = agent_pb2.GetTransactionRequest(
            rollout_id=ctx.rollout.id, kind=TXN_KIND.wire(kind)
        )
        held, asked, txn = await ask_held(ctx.agent, request, ctx.sleep)
        if txn is None:
            return held, asked
        if kind is TxnKind.SWITCH and txn.change and txn.change != self.journalled_change():
            return Held.OTHER, ""  # another change under this id (a store restored, say)
        if (
            kind is TxnKind.SWITCH
            and CHANGES[self.change].stages_certificate
            and txn.cert_fingerprint
        ):
            staged = (await self.node_detail(ctx)).cert_fingerprint
            if staged and staged != txn.cert_fingerprint:
                return Held.OTHER, ""
        return Held.THIS, ""

    def journalled_change(self) -> str:
        """This step's switch's change as its agent journals it (``Transaction.change``)."""
        return ENABLE_DUAL if self.keep_http else self.change.value

    async def switch_begun(
        self, agent: AgentApi, rollout_id: str, sleep: Callable[[float], Awaitable[Any]]
    ) -> bool:
        """Whether ``agent`` has this rollout's switch (under way or ended): its NOT_FOUND
        says it has none. No answer (``TransientError``) raises: asked again when the step
        runs again. A refusal of the question, or its failure each time asked (INTERNAL,
        ABORTED...: ``ask_held``, ``sleep`` between), raises ``BegunNotKnown``: the node needs
        attention (session 73: any such answer went to the engine's ``_trouble`` with no
        deadline, "agent unreachable ... it may be mid-switch", tried again without end)."""
        request = agent_pb2.GetTransactionRequest(
            rollout_id=rollout_id, kind=TXN_KIND.wire(self.switch_kind)
        )
        held, asked, _ = await ask_held(agent, request, sleep)
        if held in (Held.UNANSWERED, Held.FAILED):
            raise BegunNotKnown(unanswered(held, asked, too=False))
        return held is not Held.NONE

    async def confirm(self, ctx: StepContext) -> Outcome:
        """Check the node from outside as a workstation would; if that fails, have the agent
        roll it back. A rollback already under way (the leader restarted mid-confirm) is
        followed, not second-guessed by a new check. The check and the question whether a
        rollback is under way go out at once (both only look; the next node waits for them),
        and the check's answer counts only if none is. The question is not asked when this
        process saw the node's switch complete and has sent it no Rollback since
        (``StepContext.switched_here``): nothing else starts one, so none can be under way
        (one call fewer per node)."""
        key = (ctx.rollout.id, ctx.node)
        begun = ctx.checks.pop(key, None)  # the check begun as the switch ended, if any
        if begun is not None and not ctx.switched_here.get(key):
            drop_check(begun)  # a Rollback was sent since: ask the agent, and check again
            begun = None
        asked = _none_under_way() if ctx.switched_here.get(key) else self._rollback_under_way(ctx)
        check = begun if begun is not None else self.outside_problem(ctx)
        found, checked = await asyncio.gather(asked, check, return_exceptions=True)
        if isinstance(found, BaseException):
            raise found
        existing = found
        problem = None
        if existing is None:
            if isinstance(checked, asyncio.CancelledError) and begun is not None:
                # The check begun ahead was cancelled on its own (this task was not: its
                # cancellation would have ended the gather): check now, as without it (review
                # of session 26: the confirm ended "cancelled", silently, and ran again).
                checked = await self.outside_problem(ctx)
            if isinstance(checked, BaseException):
                raise checked
            problem = checked
        if problem is None and existing is None:
            return confirm_success(ctx.rollout), None
        if existing is None:
            log.warning(
                "confirm.failed",
                rollout_id=ctx.rollout.id,
                node=ctx.node,
                problem=problem,
                detail="the leader's own check of the node from outside failed after its switch "
                "(the problem says why): the agent is asked to roll it back",
            )
            # Before it is sent: a confirm run again (its answer lost) must follow this
            # rollback, not check again.
            ctx.switched_here[key] = False
            for again in range(SEND_AGAIN, -1, -1):
                try:
                    await ctx.agent.rollback(
                        agent_pb2.RollbackRequest(
                            command=ctx.command(),
                            keep_frozen=ctx.rollout.freeze is FreezeMode.SCOPE,
                        )
                    )
                except StepFailed as exc:
                    try:
                        failed = await self._rollback_failed(
                            ctx, str(exc), exc.code, last=not again
                        )
                    except SendAgain:
                        await ctx.sleep(SEND_AGAIN_SECONDS)
                        continue
                    if failed is not None:
                        return NodeEvent.CONFIRM_FAILED, f"{problem}; {failed}"
                break
        outcome, reason = await wait_transaction(ctx, ctx.rollout.id, TxnKind.ROLLBACK)
        why = f"outside check failed: {problem or 'confirm failed before a leader restart'}"
        if outcome is TxnOutcome.COMPLETED:
            # The rollback keeps the server's config beside it if it was edited since the
            # switch wrote it (an admin's edit while the leader was down, say: the same
            # ``plans.rollback_plan`` as the way back's), and its reason says where
            # (``nodeagent.transaction.kept_reason``): the node's reason names the copy, as a
            # way back's does (``DisableTls``; review of s59 L2). A rollback that kept nothing
            # says nothing.
            return NodeEvent.CONFIRM_ROLLED_BACK, f"{why}; {reason}" if reason else why
        return NodeEvent.CONFIRM_FAILED, f"{why}; the rollback failed too: {reason}"

    async def _rollback_failed(
        self, ctx: StepContext, said: str, code: grpc.StatusCode | None, *, last: bool = True
    ) -> str | None:
        """What the confirm's Rollback that the agent answered ``said`` (``code``) leaves to
        say: "rollback refused: ..." for a refusal (nothing began: a rollback an earlier run
        sent is looked for before this one is sent); for any other answer (``failed_code``),
        which says nothing of whether it began, None if the agent, asked, holds it (it is
        followed), else what it said and that it did not begin, or that whether it did is not
        known. With none held, ``SendAgain`` unless it answered the ``last`` send
        (``SEND_AGAIN``; session 72: any answer was "rollback refused")."""
        if not failed_code(code):
            return f"rollback refused: {said}"
        held, asked = await self.held(ctx, "rollback", said, TxnKind.ROLLBACK)
        if held is Held.THIS:
            return None
        if held is Held.NONE:
            if not last:
                raise SendAgain(said)
            return f"rollback failed: {said}; it did not begin"
        return f"rollback failed: {said}; whether it began is not known: {unanswered(held, asked)}"

    @staticmethod
    async def _rollback_under_way(ctx: StepContext) -> agent_pb2.Transaction | None:
        """The agent's rollback transaction of this rollout, if it has one."""
        try:
            found: agent_pb2.Transaction = await ctx.agent.get_transaction(
                agent_pb2.GetTransactionRequest(
                    rollout_id=ctx.rollout.id, kind=TXN_KIND.wire(TxnKind.ROLLBACK)
                )
            )
        except StepFailed:
            return None
        return found

    async def outside_problem(self, ctx: StepContext) -> str | None:
        """The outside check for where this change leaves the node (``CHANGES``)."""
        detail = await self.node_detail(ctx)
        live, closed = live_and_closed(self.change, detail.old_url, detail.new_url)
        trusted = await self.trusted(ctx)
        return await outside_check(live, closed, trusted, detail.cert_fingerprint)

    @staticmethod
    async def trusted(ctx: StepContext) -> bytes:
        """The CAs the outside check trusts (``RolloutFacts.trusted``)."""
        return ctx.facts.trusted

    @staticmethod
    async def node_detail(ctx: StepContext) -> NodeDetail:
        """What the schema holds about the node (from memory when it can: no worker thread)."""
        # Settled: the node's urls and certificate were written by its earlier steps.
        row = ctx.schema.kept(ctx.rollout.id, settled=True) or await dbthread.run(
            ctx.schema.get, ctx.rollout.id
        )
        assert row is not None
        return row.node(ctx.node)[1]


EARLY_CHECK_FRESH = 1.0  # seconds, elapsed
"""How long before its switch completes an outside check begun at the verify still counts
for the confirm (``ChangeSteps.switch``): an unfreeze takes milliseconds; one tried again for
longer leaves a check that may have seen a server gone since, and the check is made again."""


CONFIRM_WITH_SWITCH = 0.25  # seconds
"""How long a completed switch waits for the confirm's outside check begun at its verify, to
write both outcomes at once (``ChangeSteps._confirm_with_switch``): the check mostly ends
within milliseconds of the outcome's arrival; one that takes longer (a slow server, a busy
machine) leaves the switch's outcome written alone, and the confirm step waits for the rest
of it, so that the schema does not show the node switching for the whole check."""


def drop_check(check: asyncio.Future[str | None] | None) -> None:
    """A check begun as a switch ended that no confirm takes: cancelled."""
    if check is not None:
        check.cancel()


def _drop_begun(
    ctx: StepContext, key: tuple[str, str], check: asyncio.Future[str | None] | None
) -> None:
    """The check a switch began at its verify, which no confirm takes (the switch did not
    complete, or its outcome was not read): cancelled, and forgotten if still kept."""
    if check is not None:
        if ctx.checks.get(key) is check:
            del ctx.checks[key]
        drop_check(check)


def _retrieved(check: asyncio.Future[str | None]) -> None:
    """Mark the check's exception as seen (asyncio logs one nobody read)."""
    if not check.cancelled():
        check.exception()


async def _none_under_way() -> None:
    """No rollback can be under way (``ChangeSteps.confirm``): nothing to ask the agent."""
    return None


class EnableTls(ChangeSteps):
    change = Change.ENABLE_TLS


class DualTls(ChangeSteps):
    """Transitional phase 1: the staged certificate on https (8443) while http (8080) stays
    open; the outside check wants both to answer, and the node ends ``dual``."""

    change = Change.ENABLE_TLS
    keep_http = True

    async def outside_problem(self, ctx: StepContext) -> str | None:
        detail = await self.node_detail(ctx)
        trusted = await self.trusted(ctx)  # --cert-dir: the practice CA, as for the direct switch
        return await dual_check(detail.new_url, detail.old_url, trusted, detail.cert_fingerprint)


class Finalize(ChangeSteps):
    """Transitional phase 2: the dual node's http (8080) closes, https stays as it is (no
    stage: the certificate and password phase 1 brought stay). The outside check wants https
    live and 8080 closed; on failure the agent's rollback of this switch returns the node to
    dual (what it was before), so ``rolled_back`` here means "still dual"."""

    change = Change.FINALIZE


class ChangePassword(ChangeSteps):
    change = Change.CHANGE_PASSWORD


class RotateCert(ChangeSteps):
    """A new key and certificate for the node's https, through the same transaction as the
    switch (freeze, atomic config, verify the *new* fingerprint from outside, back to the old
    certificate on failure); the password stays."""

    change = Change.ROTATE_CERT


class DisableTls(ChangeSteps):
    """The way back: the agent undoes the switch that took the node from http to https,
    whatever it runs now (a later password change included), in a transaction keyed by this
    rollout, so a way back that failed can be tried again; the outside check expects http."""

    change = Change.DISABLE_TLS
    switch_kind = TxnKind.ROLLBACK

    async def switch(self, ctx: StepContext) -> Outcome:
        for again in range(SEND_AGAIN, -1, -1):
            try:
                return await self._way_back(ctx, last=not again)
            except SendAgain:
                await ctx.sleep(SEND_AGAIN_SECONDS)
        raise AssertionError("unreachable")  # pragma: no cover - the last send raises none

    async def _way_back(self, ctx: StepContext, *, last: bool) -> Outcome:
        """One send of the way back's Rollback and its outcome (``SendAgain``: the agent
        answered with no refusal and holds none, and this was not the ``last`` send)."""
        try:
            await ctx.agent.rollback(
                agent_pb2.RollbackRequest(
                    command=ctx.command(),
                    keep_frozen=ctx.rollout.freeze is FreezeMode.SCOPE,
                    undoes="",  # the switch from http, not one of this rollout
                )
            )
        except NotSent as exc:
            # The leader's own refusal (its agent has not reported ``rollback.undoes``): no
            # word that nothing began, as this step may have sent it before a leader restart
            # (the node is recorded switching first). Its agent says whether it has the way
            # back (a plain GetTransaction): followed if so (review s63 faults, M1: recorded
            # "refused" while the agent took the node back to http).
            try:
                if not await self.switch_begun(ctx.agent, ctx.rollout.id, ctx.sleep):
                    return NodeEvent.SWITCH_REFUSED, refused_reason("going back to http", str(exc))
            except BegunNotKnown as unknown:
                return NodeEvent.SWITCH_FAILED, begun_not_known("way back to http", str(unknown))
        except NotHeardYet:
            # Not sent either: its agent not heard since the leader started, the store holds
            # no word of ``rollback.undoes``, and asked, it did not say what it implements.
            # The way back it has is followed all the same (the plain GetTransaction needs
            # nothing); with none the step runs again, and asks again (review of s63-f1, L-2;
            # session 64).
            try:
                begun = await self.switch_begun(ctx.agent, ctx.rollout.id, ctx.sleep)
            except BegunNotKnown as unknown:
                return NodeEvent.SWITCH_FAILED, begun_not_known("way back to http", str(unknown))
            if not begun:
                raise
        except StepFailed as exc:
            # Refused: nothing on the node changed only if it holds no way back of this
            # rollout, begun by an earlier run of the step (``ChangeSteps.refused``). Any other
            # answer (INTERNAL, UNKNOWN, CANCELLED, ...: ``failed_code``) says nothing of
            # whether this call began it: asked the same, followed if it did, sent again if
            # not (``SEND_AGAIN``; session 72: it was recorded rolled_back, "going back to
            # http refused", unasked).
            refused = await self.refused(ctx, "going back to http", str(exc), exc.code, last=last)
            if refused is not None:
                return refused
        outcome, reason = await wait_transaction(ctx, ctx.rollout.id, TxnKind.ROLLBACK)
        if outcome is TxnOutcome.ROLLED_BACK:
            return NodeEvent.SWITCH_ROLLED_BACK, f"still on https: {reason}"
        # A completed way back says something only if it kept the server's config, edited
        # since tlsroll wrote it, beside it (``nodeagent.transaction.kept_reason``): the node's
        # reason, in `rollout status`, `schema show` and its history (review rev58a H2).
        done = outcome is TxnOutcome.COMPLETED
        return switch_event(outcome), ((reason or None) if done else reason)

    async def confirm(self, ctx: StepContext) -> Outcome:
        problem = await self.outside_problem(ctx)
        if problem is None:
            return NodeEvent.CONFIRM_DONE, None
        return NodeEvent.CONFIRM_ROLLED_BACK, f"outside check after going back: {problem}"


STRATEGIES: Mapping[Change, ChangeSteps] = {
    Change.ENABLE_TLS: EnableTls(),
    Change.CHANGE_PASSWORD: ChangePassword(),
    Change.ROTATE_CERT: RotateCert(),
    Change.DISABLE_TLS: DisableTls(),
    Change.FINALIZE: Finalize(),
}
TRANSITIONAL = DualTls()


def strategy_for(rollout: Rollout) -> ChangeSteps:
    """The steps of ``rollout``: by its change, and for a transitional phase 1, ``DualTls``."""
    if rollout.change is Change.ENABLE_TLS and rollout.strategy is Strategy.TRANSITIONAL:
        return TRANSITIONAL
    return STRATEGIES[rollout.change]


def switch_event(outcome: TxnOutcome) -> NodeEvent:
    """The node event for how the agent's transaction ended."""
    return {
        TxnOutcome.COMPLETED: NodeEvent.SWITCH_DONE,
        TxnOutcome.ROLLED_BACK: NodeEvent.SWITCH_ROLLED_BACK,
        TxnOutcome.FAILED: NodeEvent.SWITCH_FAILED,
    }[outcome]


# A switch's phases before its config is written and its server restarted: the part of the
# freeze window that the leader's and the node's work on another node would lengthen.
_BEFORE_RESTART = frozenset(
    {agent_pb2.TRANSACTION_PHASE_STARTED, agent_pb2.TRANSACTION_PHASE_FROZEN}
)


# The most of an agent's transaction's reason kept in the node's reason (``wait_transaction``).
REASON_LIMIT = 500

NODE_TIME_SPAN = dt.timedelta(days=366)
"""How far from the leader's clock a time an agent sends of its transaction (its freeze's
start and end, on the node's wall clock) may be and still be recorded (``wait_transaction``):
the node's clock is within ``MAX_CLOCK_OFFSET`` at the preflight, and a transaction's states
are read while it runs, or after a leader's restart; a time beyond is a foreign or broken
agent's, and taken as not sent."""


async def _store_sighting(ctx: StepContext) -> None:
    """Store what the node's server has seen, as its agent just read it afresh to refuse a
    ``finalize --when-quiet`` switch (``SwitchRequest.quiet_seconds``): the sighting that
    refused it, stored now, not at the agent's next report of its clients, and merged into
    what is stored as a heartbeat's report is (``schema_store.write_clients``). It holds the
    node at the quiet gate, and shows on the node's clients (``still on http``, ``notify
    --remaining``). A failure to read or store it is logged: the node waits all the same (a
    refused switch changes nothing), and the agent's heartbeats send the same view. Its
    times are the node's clock's: on the leader's, shifted by how far the answer's own time
    (``agent_time``) is behind the leader's, as a heartbeat's report is (``service.
    clock_shift``); unshifted, a node whose clock was behind by the preflight's 100 s had its
    sighting stored that much older, and a ``--when-quiet`` shorter than that let the node go
    at the next pass, to be refused again, pass after pass (review s64 L1)."""
    try:
        status = await ctx.agent.get_status(agent_pb2.GetStatusRequest())
        view = status.server.clients
        now = ctx.clock()
        sent = status.agent_time if status.HasField("agent_time") else None
        rows = client_rows(ctx.node, view, now, sent_shift(sent, now))
        source = peertext.clean(view.source, 20)
        problem = peertext.clean(view.problem, 200)
        window = min(view.window_seconds, 366 * 86400)

        def write(db: sqlite3.Connection) -> None:
            write_clients(
                db, ctx.node, rows, window_seconds=window, source=source, problem=problem, now=now
            )

        ctx.store.queue_write(ctx.node, write)
        await dbthread.run(ctx.store.write_queued)
    except Exception as exc:  # the node waits anyway; the heartbeats bring the same view
        log.warning(
            "switch.sighting_not_stored",
            rollout_id=ctx.rollout.id,
            node=ctx.node,
            error=peertext.clean(str(exc), REASON_LIMIT),
            detail="the leader could not write what it saw of the switch; the heartbeats bring "
            "the same view",
        )


async def wait_transaction(
    ctx: StepContext,
    txn_rollout_id: str,
    kind: TxnKind,
    *,
    begin: agent_pb2.SwitchRequest | None = None,
    change: str = "",
    verified: Callable[[], None] | None = None,
) -> tuple[TxnOutcome, str]:
    """Follow the agent's transaction (keyed by ``txn_rollout_id``) until it ends, recording its
    timings on this rollout's node when they change; return its outcome and reason.

    The agent streams each state as it journals it (``AgentApi.watch_transaction``), so the
    outcome is known when it happens, not at the next poll. The transaction is under way: an
    error while reading it says nothing about how it ends, so it is a ``TransientError`` (the
    step runs again; the agent replays the transaction), never an outcome. ``begin``: the
    switch is begun by the same call (``AgentApi.switch_and_watch``); its refusal is
    ``SwitchRefused``. ``change``: the switch's change as its agent journals it
    (``Transaction.change``, ``ChangeSteps.journalled_change``): a state that says another
    (an agent that answered the Switch with its switch of another change under the rollout
    id, a replay, where an agent of this release refuses it: one of an earlier release, or a
    bug) is taken as that refusal (``SwitchRefused``, ``another_switch``'s words) before
    anything of it is recorded: it is not this step's switch, never followed, nor recorded
    done (session 75: the direct path followed it; only the path after a refusal compared
    it). A state that says no change (an agent of the release before session 73) is matched
    by its key alone, as before. ``verified``: called when a state says the agent verified the new
    server (``TRANSACTION_PHASE_VERIFIED``, the last before it unfreezes the server and
    completes the switch; a stream may skip it) and that the unfreeze changes no answer
    (``unfreeze_keeps_answers``). The reason is the agent's text, cleaned here once for all
    who put it in the node's reason (``peertext.clean``: no control characters, at most
    ``REASON_LIMIT``; review of s60a L4)."""
    request = agent_pb2.GetTransactionRequest(
        rollout_id=txn_rollout_id, kind=TXN_KIND.wire(kind), phases=WATCHED_PHASES
    )
    recorded: dict[str, Any] | None = None
    unreadable: WireError | None = None  # the last state's outcome, if this leader cannot read it
    states = (
        ctx.agent.watch_transaction(request) if begin is None else ctx.agent.switch_and_watch(begin)
    )
    refused: set[str] = set()  # the measures already logged as refused (once per transaction)

    def measure(name: str, value: float) -> float | None:
        """An agent's measure if it is sane (``measured_seconds``), else None: not sent."""
        sane = measured_seconds(value)
        if sane is None and name not in refused:
            refused.add(name)
            log.warning(
                "transaction.measure_refused",
                rollout_id=ctx.rollout.id,
                node=ctx.node,
                transaction=kind.value,
                field=name,
                value=str(value),
                detail="the agent reported a value the leader does not believe; it is left out "
                "of the timings, nothing else changes",
            )
        return sane

    def when(name: str, stamp: Timestamp) -> dt.datetime | None:
        """An agent's time (its node's wall clock) if it is a time within
        ``NODE_TIME_SPAN`` of the leader's, else None: not sent, with a warning as
        ``measure``'s. One out of protobuf's range crashed the step at every pass, the
        transaction's end never recorded (the node held switching); a far one (a freeze
        ending in 9999) was stored, and the window taken from it (session 67, peers' times)."""
        try:
            at: dt.datetime | None = stamp.ToDatetime(tzinfo=dt.UTC)
        except (ValueError, OverflowError):
            at = None
        now = ctx.clock()
        if at is not None and now - NODE_TIME_SPAN <= at <= now + NODE_TIME_SPAN:
            return at
        if name not in refused:
            refused.add(name)
            log.warning(
                "transaction.time_refused",
                rollout_id=ctx.rollout.id,
                node=ctx.node,
                transaction=kind.value,
                field=name,
                value=f"{stamp.seconds}s {stamp.nanos}ns",
                detail="the agent reported a time the leader does not believe; it is left out of"
                " the timings, nothing else changes",
            )
        return None

    try:
        async for txn in states:
            if change and txn.change and txn.change != change:
                said = another_switch(txn_rollout_id, peertext.clean(txn.change, 40), change)
                raise SwitchRefused(
                    f"{said} (the agent answered with that switch's state: not followed)",
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
            details: dict[str, Any] = {
                "restart_seconds": measure("restart_seconds", txn.restart_seconds) or 0.0
            }
            # With --freeze scope the node's window is the scope freeze's (the engine records
            # it), not the shorter one of the transaction inside it.
            own_window = ctx.rollout.freeze is not FreezeMode.SCOPE
            if (
                own_window
                and txn.HasField("freeze_started_at")
                and (began := when("freeze_started_at", txn.freeze_started_at)) is not None
            ):
                details["freeze_started_at"] = began
                # A freeze that begins (a rollback's, after a failed confirm, on the switch's
                # row) has no end or length yet: not the switch's (review s36 L3).
                details["freeze_ended_at"] = None
                details["freeze_seconds"] = None
            if (
                own_window
                and txn.HasField("freeze_ended_at")
                and (ended := when("freeze_ended_at", txn.freeze_ended_at)) is not None
            ):
                details["freeze_ended_at"] = ended
            # The window's length as the agent measured it in elapsed time (the two times are on
            # the node's wall clock, which may step between them: clock audit s35 J); an older
            # agent sends none, and the schema takes the times' difference.
            if own_window and txn.HasField("freeze_seconds"):
                details["freeze_seconds"] = measure("freeze_seconds", txn.freeze_seconds)
            if txn.phase not in _BEFORE_RESTART:  # (whatever its outcome says: rev54a L3)
                ctx.restarting()
            try:
                outcome = TXN_OUTCOME.read(txn.outcome, "transaction.outcome")
            except WireError as exc:
                # A newer agent's value (or none): a state between others goes by, and the
                # stream ends after the last one (upgrade audit s35 F8: this was a "bug" the
                # engine ran again every 2 s, the node SWITCHING for good).
                unreadable = exc
                continue
            unreadable = None
            if (
                verified is not None
                and txn.phase == agent_pb2.TRANSACTION_PHASE_VERIFIED
                and txn.unfreeze_keeps_answers
            ):
                verified()
            if outcome is not TxnOutcome.PENDING:
                await ctx.detail(**details)  # written with the step's outcome
                return outcome, peertext.clean(txn.reason, REASON_LIMIT)
            if details != recorded:  # nothing is written when nothing changed
                # Written now only if what a running switch shows changed (its freeze began,
                # ``progress``); the restart's duration, which a real agent's stream says a
                # verify and an unfreeze before the outcome, is written with the outcome
                # (``detail``): one durable write and store hand-off fewer per node.
                shown = details.get("freeze_started_at")
                if recorded is None or shown != recorded.get("freeze_started_at"):
                    await ctx.progress(**details)
                else:
                    await ctx.detail(**details)
                recorded = details
    except SwitchRefused:
        raise
    except StepFailed as exc:
        raise TransientError(f"reading the {kind.value} transaction: {exc}") from None
    finally:
        # Closed now, in this task, as the outcome returns (its call cancelled, the channel's
        # use counted ended): left to the garbage collector, the loop was woken to close it in
        # a task of its own (issue 15).
        if (aclose := getattr(states, "aclose", None)) is not None:
            await aclose()
    if unreadable is not None:
        return TxnOutcome.FAILED, unreadable_outcome(unreadable)
    raise TransientError(f"the {kind.value} transaction's states ended without an outcome")


def unreadable_outcome(exc: WireError) -> str:
    """The reason for a transaction whose last outcome this leader cannot read: the node is
    in no state the leader knows, so it needs a person (``TxnOutcome.FAILED``: the switch or
    the rollback ends ``needs_attention``); asking again would only read the same."""
    return f"the agent runs a newer tlsroll than this leader: {exc}; upgrade the leader"


async def dual_check(
    https_url: str, http_url: str, ca_pem: bytes, fingerprint: str = ""
) -> str | None:
    """What a workstation would see of a dual node: ``https_url`` answers with the staged
    certificate (trusted through the cluster CA only) and ``http_url`` still answers. On the
    event loop, with the agent's verify's probes (``tlsroll.probe``): the two judge a server
    alike."""
    https = _host_port(https_url, "https")
    http = _host_port(http_url, "http")
    if https is None or http is None:
        return f"no address recorded for the node ({https_url!r}, {http_url!r})"
    problem = await probe.check_https(*https, ca_pem, fingerprint or None)
    if problem is not None:
        return problem
    problem = await probe.check_http(*http)
    if problem is not None:
        return f"http must stay open until finalize: {problem}"
    return None


def _host_port(url: str, scheme: str) -> tuple[str, int, str] | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != scheme or not parts.hostname or not parts.port:
        return None
    return parts.hostname, parts.port, parts.path or "/"


async def outside_check(
    live_url: str, closed_url: str, ca_pem: bytes, fingerprint: str = ""
) -> str | None:
    """What a workstation would see: ``live_url`` answers (on https with the staged certificate,
    trusted through the cluster CA only) and the port of ``closed_url`` is closed. None if all
    is well, else what is wrong. On the event loop, with the agent's verify's probes
    (``tlsroll.probe``: no worker thread per confirm, and the two judge a server alike)."""
    scheme = urllib.parse.urlsplit(live_url).scheme
    live = _host_port(live_url, scheme)
    if live is None or scheme not in ("http", "https"):
        return f"no address recorded for the node ({live_url!r})"
    problem = await (
        probe.check_https(*live, ca_pem, fingerprint or None)
        if scheme == "https"
        else probe.check_http(*live)
    )
    if problem is not None:
        return problem
    closed = _host_port(closed_url, "http" if scheme == "https" else "https")
    if closed is not None and await probe.port_open(closed[0], closed[1], timeout=3):
        why = "; plain http must be closed" if scheme == "https" else ""
        return f"{closed_url} still answers{why}"
    return None
