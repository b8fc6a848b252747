"""Node agents in memory, and a fake clock, for driving the leader's engine without processes.

    clock = FakeClock()
    agents = FakeAgents(clock, ca.cert, {"bravo": "10.0.0.2", ...})
    agents["bravo"].switch_outcome = TxnOutcome.FAILED   # scripting, see FakeAgent
    engine = Engine(..., agents, clock.wall, monotonic=clock.monotonic, sleep=clock.sleep)

Each ``FakeAgent`` implements ``leader.agent_client.AgentApi`` and answers as the real agent does
(``nodeagent/service.py``), only in memory:

* a command with an epoch older than the highest one seen is refused (``StepFailed``);
* CreateCSR, Switch and Rollback are idempotent by rollout id: a replay returns what was
  recorded and changes nothing (a replayed Switch is not a second switch);
* a transaction runs on the agent's own: its effect on the node (scheme, certificate, password)
  is applied when it is created, and GetTransaction reports it ``pending`` until
  ``txn_seconds`` of fake time have passed, then its outcome;
* Rollback needs a completed switch of the same rollout id and restores what was live before it;
* a Switch or Rollback transaction ends by lifting the node's freeze (as the real runner's
  unfreeze step does), applied with its effect, unless the request says ``keep_frozen``
  (``--freeze scope``: the leader lifts it when the rollout ends);
* Freeze holds for its lease (fake time) unless renewed; a lapsed lease lifts it.

What a test reads back: ``FakeAgents.calls`` (every call to any agent, in order, with the fake
time, the answer and which nodes were frozen at that moment), ``FakeAgent.applied`` (the
mutations that took effect, by kind) and the node's state (``scheme``, ``frozen``,
``verifier``, ``txns``). ``FakeAgents.outside_check`` stands in for the outside
checks of ``leader.changes``: they look at the fake node that owns the address.

Agents outlive a leader: a test that "crashes" the leader builds a new engine on the same
``FakeAgents``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace

import grpc
from cryptography import x509

from leader.agent_client import AgentApi, StepFailed, SwitchRefused, call_failed
from leader.wire import CHANGE, TXN_KIND, TXN_OUTCOME
from tlsroll import pki
from tlsroll.enums import ENABLE_DUAL, Change, TxnKind, TxnOutcome, another_switch
from tlsroll.errors import PKIError, TransientError
from tlsroll.rpc import timestamp
from tlsroll.v1 import agent_pb2

START = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
HTTP_PORT, HTTPS_PORT, BOOTSTRAP_PORT = 8080, 8443, 9443
RESTART_SECONDS = 1.5
WATCH_SECONDS = 0.3  # the fake stream's granularity in fake time


class FakeClock:
    """Wall time and monotonic time from one counter that only the test (``advance``) and
    ``sleep`` move; ``sleep`` yields to the loop once, so other tasks run meanwhile."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.start = start
        self.elapsed = 0.0

    def wall(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.elapsed

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)


@dataclass(frozen=True)
class Call:
    """One call to an agent: what, for which rollout, when, and how it was answered."""

    node: str
    method: str
    rollout_id: str
    epoch: int
    at: float  # fake monotonic time
    answer: str  # "ok", "replay", "not_found", "unreachable", "disk_full", "refused"...
    frozen: frozenset[str]  # every node frozen when the call arrived


@dataclass
class FakeTxn:
    rollout_id: str
    kind: TxnKind
    epoch: int
    started: float
    outcome: TxnOutcome  # how it ends
    reason: str
    before: tuple[str, str, str]  # (scheme, fingerprint, verifier) live before it
    # A switch's change as the real agent's plan journals it (``Transaction.change``:
    # "enable-tls+http" for the phase-1 switch, else the change's name); "" for a rollback.
    change: str = ""


DISK_FULL_CAUSE = (
    "/var/lib/tlsroll-agent/journal.sqlite3: No space left on device (errno 28, ENOSPC)"
)
STORE_CAUSE = "journal /var/lib/tlsroll-agent/journal.sqlite3: database is locked (SQLITE_BUSY)"


@dataclass
class FakeAgent:
    """One node's agent. Scripting: ``switch_outcome``/``switch_reason`` (how its switch
    transactions end), ``refuse`` (method name → message: the call fails with StepFailed),
    ``unreachable`` (the next N calls fail with TransientError), ``disk_full`` (the next N
    calls fail as a real agent's on a full disk: RESOURCE_EXHAUSTED ``disk full: …``, through
    the real client's ``call_failed``), ``store_unavailable`` (the next N calls fail as a real
    agent's whose journal is locked: UNAVAILABLE ``store unavailable: …``), ``outside_problem``
    (what the outside check of the node reports; None: it answers as it should)."""

    name: str
    address: str
    world: FakeAgents = field(repr=False)
    scheme: str = "http"
    frozen: bool = False
    lease_until: float = 0.0
    lapsed: int = 0  # freezes lifted because the lease ran out
    fingerprint: str = ""  # the certificate live on https
    verifier: str = ""  # the auth password verifier live on the node
    highest_epoch: int = 0
    keys: dict[str, pki.PrivateKey] = field(default_factory=dict)  # by rollout id
    staged: dict[str, x509.Certificate] = field(default_factory=dict)
    txns: dict[tuple[str, TxnKind], FakeTxn] = field(default_factory=dict)
    applied: Counter[str] = field(default_factory=Counter)
    # scripting
    switch_outcome: TxnOutcome = TxnOutcome.COMPLETED
    switch_reason: str = ""
    refuse: dict[str, str] = field(default_factory=dict)
    unreachable: int = 0
    disk_full: int = 0
    store_unavailable: int = 0
    outside_problem: str | None = None
    txn_seconds: float = 0.5
    # The last stretch of a transaction (fake seconds) in which its pending state says the
    # agent verified the new server (TRANSACTION_PHASE_VERIFIED); 0: no phase is sent.
    verified_for: float = 0.0
    # What its states say of its server's unfreeze (``Transaction.unfreeze_keeps_answers``):
    # the reference and systemd drivers' flag (True), or an exec driver's command (False).
    unfreeze_keeps_answers: bool = True
    # The phases a real agent's states carry while pending (None: none, as an agent of an
    # earlier release): STARTED, then CONFIG_WRITTEN this many fake seconds after the switch
    # began (its restart begins), then VERIFIED as ``verified_for`` says.
    config_written_after: float | None = None
    # An agent of the release before Preflight's ``make_csr``: it ignores the field.
    without_preflight_csr: bool = False
    # A newer agent: its transactions end with this outcome number, one this leader's
    # contract does not know (``switch_outcome`` is then its meaning for the agent).
    newer_outcome: agent_pb2.TransactionOutcome.ValueType | None = None
    # An agent of the release before session 73: its transactions say no change
    # (``Transaction.change`` empty), and the leader matches them by their key alone.
    says_no_change: bool = False
    # An agent of an earlier release, or a bug: a Switch whose rollout id names its switch of
    # another change is answered with that switch (a replay), not refused ``another_switch``.
    replays_another_change: bool = False

    @property
    def names(self) -> pki.Names:
        return pki.Names.of(self.name, [self.address], [f"{self.name}.praxis.lan"])

    def url(self, scheme: str) -> str:
        port = HTTPS_PORT if scheme == "https" else HTTP_PORT
        return f"{scheme}://{self.address}:{port}/praxis_live/"

    # --- how every call is answered -----------------------------------------------------------

    async def _arrive(self, method: str, command: agent_pb2.Command | None = None) -> None:
        """A call reaches the node (or not): one hop on the loop, then the agent's guards."""
        await asyncio.sleep(0)
        self.world.expire_leases()
        rollout_id, epoch = (command.rollout_id, command.epoch) if command else ("", 0)

        def log(answer: str) -> None:
            self.world.log(self, method, rollout_id, epoch, answer)

        if self.unreachable:
            self.unreachable -= 1
            log("unreachable")
            raise TransientError(f"agent {self.name}: unreachable")
        if self.disk_full:
            self.disk_full -= 1
            log("disk_full")
            raise call_failed(
                self.name,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"disk full: {DISK_FULL_CAUSE}",
            )
        if self.store_unavailable:
            self.store_unavailable -= 1
            log("store_unavailable")
            raise call_failed(
                self.name, grpc.StatusCode.UNAVAILABLE, f"store unavailable: {STORE_CAUSE}"
            )
        if method in self.refuse:
            log("refused")
            raise StepFailed(f"{self.refuse[method]} (FAILED_PRECONDITION)")
        if command is not None:
            if epoch < self.highest_epoch:
                log("refused")
                raise StepFailed(
                    f"stale epoch {epoch}: this node has seen epoch {self.highest_epoch} "
                    "(FAILED_PRECONDITION)"
                )
            self.highest_epoch = epoch
        log("ok")

    def _answered(self, answer: str) -> None:
        """How the call just logged was answered, if not "ok" ("replay": it changed nothing)."""
        self.world.calls[-1] = replace(self.world.calls[-1], answer=answer)

    def _refused(self, message: str) -> StepFailed:
        """The call just logged is refused (a precondition): the error to raise."""
        self._answered("refused")
        return StepFailed(message)

    # --- AgentApi -----------------------------------------------------------------------------

    async def check(
        self, request: agent_pb2.CheckRequest, timeout: float = 30.0
    ) -> agent_pb2.PreflightResponse:
        await self._arrive("check")
        view = agent_pb2.ServerView(driver="fake", healthy=True, schemes=[self.scheme])
        return agent_pb2.PreflightResponse(ok=True, server=view)  # as a real agent's

    async def get_status(
        self, request: agent_pb2.GetStatusRequest, timeout: float = 30.0
    ) -> agent_pb2.NodeStatus:
        await self._arrive("get_status")
        return agent_pb2.NodeStatus(
            node_name=self.name,
            server=agent_pb2.ServerView(driver="fake", healthy=True, schemes=[self.scheme]),
            highest_epoch=self.highest_epoch,
        )

    async def preflight(self, request: agent_pb2.PreflightRequest) -> agent_pb2.PreflightResponse:
        await self._arrive("preflight", request.command)
        names = self.names
        csr_pem = b""
        if request.make_csr and not self.without_preflight_csr:  # as CreateCSR would
            rollout_id = request.command.rollout_id
            if rollout_id not in self.keys:
                self.keys[rollout_id] = pki.generate_key()
                self.applied["create_csr"] += 1
            csr_pem = pki.csr_to_pem(pki.make_csr(self.keys[rollout_id], names))
        return agent_pb2.PreflightResponse(
            csr_pem=csr_pem,
            ok=True,
            common_name=names.common_name,
            ip_addresses=names.ips,
            dns_names=names.dns,
            server=agent_pb2.ServerView(driver="fake", healthy=True, schemes=[self.scheme]),
            old_url=self.url("http"),
            new_url=self.url("https"),
            bootstrap_port=BOOTSTRAP_PORT,
        )

    async def create_csr(self, request: agent_pb2.CreateCSRRequest) -> agent_pb2.CreateCSRResponse:
        await self._arrive("create_csr", request.command)
        rollout_id = request.command.rollout_id
        if rollout_id in self.keys:
            self._answered("replay")
        else:
            self.keys[rollout_id] = pki.generate_key()
            self.applied["create_csr"] += 1
        csr = pki.make_csr(self.keys[rollout_id], self.names)
        return agent_pb2.CreateCSRResponse(csr_pem=pki.csr_to_pem(csr))

    async def stage(self, request: agent_pb2.StageRequest) -> agent_pb2.StageResponse:
        await self._arrive("stage", request.command)
        rollout_id = request.command.rollout_id
        key = self.keys.get(rollout_id)
        if request.own_certificate:  # --cert-dir: the key comes with the certificate
            try:
                key = pki.load_key_pem(request.private_key_pem)
            except PKIError as exc:
                raise self._refused(f"{exc} (INVALID_ARGUMENT)") from None
        if key is None:
            raise self._refused(f"no CSR for rollout {rollout_id}; call CreateCSR first")
        if (rollout_id, TxnKind.SWITCH) in self.txns:
            raise self._refused(f"rollout {rollout_id} is already switching this node")
        try:
            cert = pki.load_cert_pem(request.certificate_pem)
            # --cert-dir: the practice CA first, then the cluster CA.
            ca = pki.load_cert_pem(request.ca_certificate_pem)
        except PKIError as exc:
            raise self._refused(f"{exc} (INVALID_ARGUMENT)") from None
        cluster_ca = request.own_certificate or pki.spki_pin(ca) == pki.spki_pin(self.world.ca)
        if not cluster_ca or not pki.issued_by(cert, ca):
            raise self._refused(
                "the certificate was not issued by the cluster CA (INVALID_ARGUMENT)"
            )
        # Worded as the real agent's Stage: the leader decides on "does not match the staged
        # key" whether CreateCSR helps (``leader.changes.KEY_GONE``).
        if not pki.key_matches(cert, key):
            raise self._refused("the certificate does not match the staged key (INVALID_ARGUMENT)")
        if pki.names_of(cert) != self.names:
            raise self._refused(
                "the certificate's names differ from this node's names (INVALID_ARGUMENT)"
            )
        self.staged[rollout_id] = cert
        self.applied["stage"] += 1
        return agent_pb2.StageResponse(
            fingerprint=pki.fingerprint(cert), not_after=timestamp(cert.not_valid_after_utc)
        )

    async def switch(self, request: agent_pb2.SwitchRequest) -> agent_pb2.Transaction:
        await self._arrive("switch", request.command)
        rollout_id = request.command.rollout_id
        change = CHANGE.read(request.change, "change")
        existing = self.txns.get((rollout_id, TxnKind.SWITCH))
        if existing is not None:
            # As the real agent (``NodeAgentService._switch``): a switch of another change
            # under this id is refused (``another_switch``), never answered as this one's.
            wanted = ENABLE_DUAL if request.keep_http else change.value
            if existing.change and existing.change != wanted and not self.replays_another_change:
                self._answered("refused")
                raise call_failed(
                    self.name,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    another_switch(rollout_id, existing.change, wanted),
                )
            self._answered("replay")
            return self._message(existing)
        target = (self.scheme, self.fingerprint, request.auth_verifier_json)
        if change is Change.ENABLE_TLS:
            if rollout_id not in self.staged:
                raise self._refused(f"nothing staged for rollout {rollout_id}; run Stage")
            target = ("https", pki.fingerprint(self.staged[rollout_id]), target[2])
        elif change is Change.CHANGE_PASSWORD:
            if self.scheme != "https" or not request.auth_verifier_json:
                raise self._refused("the server is not on https here; run enable-tls first")
        elif change is Change.ROTATE_CERT:  # the staged certificate; the password stays
            if self.scheme != "https":
                raise self._refused("the server is not on https here; run enable-tls first")
            if rollout_id not in self.staged:
                raise self._refused(f"nothing staged for rollout {rollout_id}; run Stage")
            target = ("https", pki.fingerprint(self.staged[rollout_id]), self.verifier)
        elif change is Change.FINALIZE:  # http closes on a dual node; https stays as it is
            if self.scheme != "https":
                raise self._refused("the server is not dual here; run phase 1 first")
            target = (self.scheme, self.fingerprint, self.verifier)
        else:
            raise self._refused(f"change {change.value} is not a switch this agent makes")
        txn = self._begin(rollout_id, TxnKind.SWITCH, request.command.epoch, self.switch_outcome)
        # as the real agent's plan journals it (``nodeagent.plans``: ``Plan.change``)
        txn.change = ENABLE_DUAL if request.keep_http else change.value
        if txn.outcome is TxnOutcome.COMPLETED:
            self.scheme, self.fingerprint, self.verifier = target
        self._txn_ends(keep_frozen=request.keep_frozen)
        return self._message(txn)

    async def rollback(self, request: agent_pb2.RollbackRequest) -> agent_pb2.Transaction:
        await self._arrive("rollback", request.command)
        rollout_id = request.command.rollout_id
        existing = self.txns.get((rollout_id, TxnKind.ROLLBACK))
        if existing is not None:
            self._answered("replay")
            return self._message(existing)
        keep_frozen = request.keep_frozen
        if request.HasField("undoes") and not request.undoes:
            # The way back to http: the newest completed switch that left http.
            switches = [
                t
                for (_, kind), t in self.txns.items()
                if kind is TxnKind.SWITCH
                and t.outcome is TxnOutcome.COMPLETED
                and t.before[0] == "http"
            ]
            switch = switches[-1] if switches else None
            undone = "a switch from http"
        else:
            undone = request.undoes if request.HasField("undoes") else rollout_id
            switch = self.txns.get((undone, TxnKind.SWITCH))
        if switch is None or switch.outcome is not TxnOutcome.COMPLETED:
            raise self._refused(
                f"rollout {undone} did not switch this node; nothing to roll back "
                "(FAILED_PRECONDITION)"
            )
        txn = self._begin(rollout_id, TxnKind.ROLLBACK, request.command.epoch)
        self.scheme, self.fingerprint, self.verifier = switch.before
        self._txn_ends(keep_frozen=keep_frozen)
        return self._message(txn)

    async def get_transaction(
        self, request: agent_pb2.GetTransactionRequest
    ) -> agent_pb2.Transaction:
        await self._arrive("get_transaction")
        kind = TXN_KIND.read(request.kind, "kind")
        txn = self.txns.get((request.rollout_id, kind))
        if txn is None:
            self._answered("not_found")
            raise StepFailed(
                f"no {kind.value} transaction for rollout {request.rollout_id!r} (NOT_FOUND)",
                grpc.StatusCode.NOT_FOUND,
            )
        return self._message(txn)

    async def watch_transaction(
        self, request: agent_pb2.GetTransactionRequest
    ) -> AsyncGenerator[agent_pb2.Transaction, None]:
        """The stream as the fake world can give it: its states read every ``WATCH_SECONDS``
        of fake time (each read is a ``get_transaction`` call in ``calls``)."""
        while True:
            txn = await self.get_transaction(request)
            yield txn
            if txn.outcome != agent_pb2.TRANSACTION_OUTCOME_PENDING:
                return
            await self.world.clock.sleep(WATCH_SECONDS)

    async def switch_and_watch(
        self, request: agent_pb2.SwitchRequest
    ) -> AsyncIterator[agent_pb2.Transaction]:
        """As the real client's one call: the switch begun (a ``switch`` in ``calls``; its
        refusal is ``SwitchRefused``), then its states as ``watch_transaction`` gives them."""
        try:
            await self.switch(request)
        except SwitchRefused:
            raise
        except StepFailed as exc:
            raise SwitchRefused(str(exc), exc.code) from None
        watch = agent_pb2.GetTransactionRequest(
            rollout_id=request.command.rollout_id, kind=agent_pb2.TRANSACTION_KIND_SWITCH
        )
        # Closed as the caller closes this one, as the real client's watch is.
        async with contextlib.aclosing(self.watch_transaction(watch)) as states:
            async for txn in states:
                yield txn

    async def freeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        await self._arrive("freeze", request.command)
        self.lease_until = self.world.clock.monotonic() + (request.lease_seconds or 300)
        self.frozen = True
        self.applied["freeze"] += 1
        return agent_pb2.FreezeResponse(frozen=True, watermark=len(self.txns))

    async def unfreeze(self, request: agent_pb2.FreezeRequest) -> agent_pb2.FreezeResponse:
        await self._arrive("unfreeze", request.command)
        self.frozen = False
        self.applied["unfreeze"] += 1
        return agent_pb2.FreezeResponse(frozen=False, watermark=len(self.txns))

    # --- transactions -------------------------------------------------------------------------

    def _begin(
        self,
        rollout_id: str,
        kind: TxnKind,
        epoch: int,
        outcome: TxnOutcome = TxnOutcome.COMPLETED,
    ) -> FakeTxn:
        reason = self.switch_reason if kind is TxnKind.SWITCH else ""
        txn = FakeTxn(
            rollout_id,
            kind,
            epoch,
            self.world.clock.monotonic(),
            outcome,
            reason,
            (self.scheme, self.fingerprint, self.verifier),
        )
        self.txns[(rollout_id, kind)] = txn
        self.applied[kind.value] += 1
        return txn

    def _txn_ends(self, *, keep_frozen: bool) -> None:
        """The transaction's last step: it lifts the freeze unless the rollout keeps it."""
        if not keep_frozen and self.frozen:
            self.frozen = False
            self.applied["txn_unfreeze"] += 1

    def _message(self, txn: FakeTxn) -> agent_pb2.Transaction:
        now = self.world.clock.monotonic()
        done = now >= txn.started + self.txn_seconds
        outcome = txn.outcome if done else TxnOutcome.PENDING
        verified = not done and now >= txn.started + self.txn_seconds - self.verified_for
        started = self.world.clock.start + dt.timedelta(seconds=txn.started)
        return agent_pb2.Transaction(
            rollout_id=txn.rollout_id,
            kind=TXN_KIND.wire(txn.kind),
            epoch=txn.epoch,
            outcome=(
                self.newer_outcome
                if done and self.newer_outcome is not None
                else TXN_OUTCOME.wire(outcome)
            ),
            reason=txn.reason if done else "",
            started_at=timestamp(started),
            freeze_started_at=timestamp(started),
            restart_seconds=RESTART_SECONDS if done else 0.0,
            unfreeze_keeps_answers=self.unfreeze_keeps_answers,
            phase=self._phase(txn, now, done=done, verified=verified),
            change="" if self.says_no_change else txn.change,
        )

    def _phase(
        self, txn: FakeTxn, now: float, *, done: bool, verified: bool
    ) -> agent_pb2.TransactionPhase.ValueType:
        if verified:
            return agent_pb2.TRANSACTION_PHASE_VERIFIED
        if done or self.config_written_after is None:
            return agent_pb2.TRANSACTION_PHASE_UNSPECIFIED
        if now >= txn.started + self.config_written_after:
            return agent_pb2.TRANSACTION_PHASE_CONFIG_WRITTEN
        return agent_pb2.TRANSACTION_PHASE_STARTED


class FakeAgents:
    """The ``Agents`` of a fake cluster: one ``FakeAgent`` per node name, a shared call log."""

    def __init__(self, clock: FakeClock, ca: x509.Certificate, nodes: Mapping[str, str]) -> None:
        self.clock = clock
        self.ca = ca
        self.calls: list[Call] = []
        self.agents = {name: FakeAgent(name, address, self) for name, address in nodes.items()}

    def __getitem__(self, name: str) -> FakeAgent:
        return self.agents[name]

    def __iter__(self) -> Iterator[FakeAgent]:
        return iter(self.agents.values())

    async def get(self, name: str) -> AgentApi:
        return self.agents[name]

    async def close(self) -> None:
        """A leader closes its clients; the agents live on."""

    def hold(
        self, names: Collection[str], rollout: str | None = None, *, close_landed: bool = True
    ) -> None:
        """No channels to keep open."""

    def expire_leases(self) -> None:
        """Every agent lifts a scope freeze whose lease ran out without renewal."""
        for agent in self.agents.values():
            if agent.frozen and self.clock.monotonic() > agent.lease_until:
                agent.frozen = False
                agent.lapsed += 1

    def log(self, agent: FakeAgent, method: str, rollout_id: str, epoch: int, answer: str) -> None:
        frozen = frozenset(a.name for a in self.agents.values() if a.frozen)
        call = Call(agent.name, method, rollout_id, epoch, self.clock.monotonic(), answer, frozen)
        self.calls.append(call)

    def calls_to(self, node: str, method: str) -> list[Call]:
        return [c for c in self.calls if c.node == node and c.method == method]

    # --- the outside check (leader.changes.outside_check) ---------------------------------------

    def _at(self, url: str) -> FakeAgent | None:
        return next((a for a in self if f"//{a.address}:" in url), None)

    async def outside_check(
        self, live_url: str, closed_url: str, ca_pem: bytes, fingerprint: str = ""
    ) -> str | None:
        """As ``leader.changes.outside_check``: ``live_url`` answers (https: with the staged
        certificate from the CA) and the other scheme's port is closed."""
        agent = self._at(live_url)
        if agent is None:
            return f"no address recorded for the node ({live_url!r})"
        self.log(agent, "outside_check", "", 0, "ok")  # not a call to the agent: confirm's mark
        if agent.outside_problem is not None:
            return agent.outside_problem
        scheme = live_url.split(":", 1)[0]
        if agent.scheme != scheme:
            return f"{closed_url} still answers" if scheme == "http" else f"{live_url}: refused"
        if scheme == "https" and (
            pki.load_cert_pem(ca_pem) != self.ca or fingerprint not in ("", agent.fingerprint)
        ):
            return f"{live_url}: not the staged certificate"
        return None
