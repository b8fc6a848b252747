"""The agent's transaction runner in process, against a fake server, with a fake clock: no
sockets, no processes, deterministic (in the style of etcd raft's tests).

The fake world: ``FakeServer`` is the managed server as the driver and a workstation see it: the
config file, the config the process runs (None while it is down), the freeze and the write
watermark; ``ops`` lists every change the runner made to it. The outside checks of verify
answer from it. Each scenario states the transcript of the runner's journal writes and the
server operations it makes; the crash tests cut the agent off at every one of those writes:

- *after* write N: the write is durable and the agent dies before doing anything else (as the
  SIGKILL hook of tests/test_switch.py does), then a new Runner on the same SQLite file
  resumes: every server operation happened exactly once;
- *instead of* write N: the agent dies after acting but before the journal recorded it; the
  resumed runner repeats that one action (each is idempotent) and nothing else.

Either way the transaction ends as it does without a crash, the server unfrozen on exactly the
source or the target config, and the plan journalled at the start unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import errno
import itertools
import json
import os
import re
import sqlite3
import ssl
import stat
import threading
import tomllib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest

from nodeagent import plans, service, transaction
from nodeagent.drivers import Driver, DriverError, ServerFacts, StagedConfig, Target
from nodeagent.journal import Journal, JournalError, Txn
from nodeagent.lease import Boot, Lease, Leases
from nodeagent.transaction import Checks, Passed, Phase, Plan, Runner, Staged, next_action
from nodeagent.trust import LeaderTrust
from nodeagent.wire import CHANGE, TXN_PHASE
from tests.conftest import count_thread_hops
from tests.private_files import write_private
from tlsroll import dbthread, fsutil, httpcheck, password, peertext, pki, probe, tls
from tlsroll.config import ConfigFile
from tlsroll.enums import NEEDS_ADMIN, Change, TxnKind, TxnOutcome
from tlsroll.v1 import agent_pb2

ADDRESS = "192.0.2.10"
APP = "/praxis_live/"
STAGED_FP = "sha256:" + "5" * 64

# Configs as the fake server reads them.
SOURCE = b'listen = ["http"]\n'
TARGET = f'listen = ["https"]\ncert = "{STAGED_FP}"\n'.encode()
WRONG_CERT = f'listen = ["https"]\ncert = "sha256:{"0" * 64}"\n'.encode()
BROKEN = TARGET + b"broken = true\n"  # the server exits at start with it
NAMES = {SOURCE: "source", TARGET: "target", WRONG_CERT: "wrong-cert", BROKEN: "broken"}


# --- the fake world ----------------------------------------------------------------------------


@dataclass
class FakeServer:
    config: bytes = SOURCE  # the config file
    running: bytes | None = SOURCE  # what the process loaded at its last start; None: down
    frozen: bool = False  # persisted by the server, like the reference server's state.json
    watermark: int = 7
    failing: frozenset[str] = frozenset()  # operations and checks that always fail
    ops: list[str] = field(default_factory=list)

    def listens(self) -> list[str]:
        if self.running is None:
            return []
        listen: list[str] = tomllib.loads(self.running.decode())["listen"]
        return listen

    def cert(self) -> str:
        assert self.running is not None
        return str(tomllib.loads(self.running.decode()).get("cert", ""))

    def up(self, what: str) -> None:
        if self.running is None:
            raise DriverError(f"{what}: managed server not answering")


class FakeDriver(Driver):
    name = "fake"

    def __init__(self, server: FakeServer, config_file: Path) -> None:
        self.server = server
        self.config_file = config_file

    def facts(self) -> ServerFacts:
        return ServerFacts(ADDRESS, APP, 8080, 8443, tuple(self.server.listens()))

    def render(self, target: Target) -> bytes:
        lines = [f"listen = {json.dumps(list(target.schemes))}"]
        lines += [f'cert_file = "{target.cert_file}"'] if target.cert_file else []
        if target.auth_verifier_file:
            lines += [f'verifier_file = "{target.auth_verifier_file}"']
        return "\n".join([*lines, ""]).encode()

    def read_config(self) -> bytes:
        return self.server.config

    def write_config(self, data: bytes) -> None:
        self.server.ops.append(f"write_config {NAMES.get(data, '?')}")
        self.server.config = data

    async def restart(self) -> None:
        s = self.server
        s.ops.append("restart")
        s.running = None
        if "restart" in s.failing or b"broken" in s.config:
            raise DriverError("the server exited at start (code 1): bad config")
        s.running = s.config

    async def status(self) -> dict[str, Any]:
        self.server.up("status")
        return {"frozen": self.server.frozen, "watermark": self.server.watermark}

    async def freeze(self, drain_timeout: float) -> int:
        s = self.server
        s.ops.append("freeze")
        s.up("freeze")
        if "freeze" in s.failing:
            raise DriverError(f"writes still in flight after {drain_timeout:g}s")
        s.frozen = True
        return s.watermark

    async def unfreeze(self) -> None:
        self.server.ops.append("unfreeze")
        self.server.up("unfreeze")
        self.server.frozen = False


def fake_checks(server: FakeServer, where: str = ADDRESS) -> Checks:
    """Verify's outside view of the server on address ``where``, answered by the fake server."""
    ports = {8080: "http", 8443: "https"}

    async def port_open(address: str, port: int) -> bool:
        assert address == where
        return ports[port] in server.listens()

    async def check_http(address: str, port: int, path: str) -> str | None:
        assert address == where
        if "check_http" in server.failing or "http" not in server.listens():
            return f"http://{address}:{port}{path}: connection refused"
        return None

    async def check_https(
        address: str, port: int, path: str, ca_pem: bytes, fingerprint: str | None
    ) -> str | None:
        assert address == where and ca_pem == b"the cluster CA"
        if "https" not in server.listens():
            return f"https://{address}:{port}{path}: connection refused"
        if fingerprint and server.cert() != fingerprint:
            return f"https://{address}:{port} presents {server.cert()}"
        return None

    return Checks(port_open=port_open, check_http=check_http, check_https=check_https)


class FakeTime:
    """The runner's clocks and sleep: sleeping moves both clocks, at once; a test may step the
    wall clock (``now``) alone."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
        self.elapsed = 1000.0  # the monotonic clock
        self.slept: list[float] = []

    def clock(self) -> dt.datetime:
        return self.now

    def monotonic(self) -> float:
        return self.elapsed

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += dt.timedelta(seconds=seconds)
        self.elapsed += seconds
        await asyncio.sleep(0)


@contextlib.contextmanager
def real_timers() -> Iterator[list[float]]:
    """The delays of the running loop's timers that fired meanwhile (``call_at``, through
    which ``asyncio.sleep``, ``wait_for`` and ``asyncio.timeout`` wait): a wait that went to
    the real clock rather than to ``FakeTime``. A timer that was cancelled (a ``wait_for``
    whose awaitable ended first) never waited, and is not counted."""
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    call_at = loop.call_at

    def recording(when: float, callback: Callable[..., object], *args: Any, **kw: Any) -> Any:
        delay = when - loop.time()

        def run(*given: Any) -> None:
            fired.append(delay)
            callback(*given)

        return call_at(when, run, *args, **kw)

    loop.call_at = recording  # type: ignore[method-assign,assignment]
    try:
        yield fired
    finally:
        del loop.call_at


class Crash(BaseException):
    """The agent process dies here (nothing in the agent may catch it)."""


def begun(label: str, step: str | None) -> str:
    """A record's label, with the next step's "begin" it carries (one write)."""
    return f"{label} + {step} begin" if step else label


def fused(writes: tuple[str, ...]) -> tuple[str, ...]:
    """``writes`` as the journal makes them: a step's record carries the next step's "begin"
    in the same write (issue 15: one write per step); only the first "begin", after the
    servicer's "create", is a write of its own. A switch's ``restarted`` goes in the write of
    the verify's outcome (``Runner._defers``: one write, two records)."""
    out: list[str] = []
    for label in writes:
        if label.endswith(" begin") and out and out[-1] != "create" and " begin" not in out[-1]:
            out[-1] = f"{out[-1]} + {label}"
        else:
            out.append(label)
    deferred = [i for i, label in enumerate(out) if label == "restarted + verify begin"]
    for i in reversed(deferred):
        out[i : i + 2] = [f"{out[i]}, {out[i + 1]}"]
    return tuple(out)


def passing(changes: dict[str, Any]) -> str:
    """The label of the record a write carries before its own (``Passed``), with ", "."""
    passed: Passed | None = changes.get("passed")
    return f"{begun(str(passed.changes['phase']), passed.begin)}, " if passed else ""


class CrashingJournal(Journal):
    """The journal, with a transcript of its writes; at write ``at`` the agent dies, after the
    write is durable or, with ``lost``, before it reaches the file."""

    def __init__(self, path: Path, at: int | None = None, *, lost: bool = False) -> None:
        super().__init__(path)
        self.at = at
        self.lost = lost
        self.writes: list[str] = []
        self.after_write: Callable[[], None] = lambda: None

    def _write(self, label: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        n = len(self.writes) + 1
        if n == self.at and self.lost:
            raise Crash(label)
        result = write(*args, **kwargs)
        self.writes.append(label)
        self.after_write()
        if n == self.at:
            raise Crash(label)
        return result

    def create(self, txn: Txn, *, begin: str | None = None) -> Txn:
        created: Txn = self._write(begun("create", begin), super().create, txn, begin=begin)
        return created

    def event(self, txn: Txn, step: str, what: str, detail: dict[str, Any] | None = None) -> None:
        self._write(f"{step} {what}", super().event, txn, step, what, detail)

    def update(self, txn: Txn, **changes: Any) -> Txn:
        label = passing(changes) + begun(str(changes["phase"]), changes.get("begin"))
        updated: Txn = self._write(label, super().update, txn, **changes)
        return updated

    def fail(self, txn: Txn, step: str, error: str, **changes: Any) -> Txn:
        label = passing(changes) + begun(f"{step} error, {changes['phase']}", changes.get("begin"))
        updated: Txn = self._write(label, super().fail, txn, step, error, **changes)
        return updated

    def complete(self, txn: Txn, live_tls: dict[str, str] | None, **changes: Any) -> Txn:
        label = f"{changes['phase']} + live"
        updated: Txn = self._write(label, super().complete, txn, live_tls, **changes)
        return updated


# --- scenarios ---------------------------------------------------------------------------------

FORWARD_HEAD = (
    "create",
    "freeze begin",
    "frozen",
    "write_config begin",
    "config_written",
    "restart begin",
)
WAY_BACK = (
    "restore_config begin",
    "restored",
    "restart begin",
    "rb_restarted",
    "verify_source begin",
    "rb_verified",
    "unfreeze begin",
    "rolled_back",
)


@dataclass(frozen=True)
class Scenario:
    """One transaction in the fake world and what it must do without a crash."""

    target: bytes  # the config the plan switches to
    outcome: TxnOutcome
    ends_on: bytes  # the config the server runs, unfrozen, at the end
    writes: tuple[str, ...]  # the journal's writes, in order
    ops: tuple[str, ...]  # what the runner did to the server, in order
    failed_phase: Phase | None = None
    restart_needed: bool | None = None
    slept: tuple[float, ...] = ()
    failing: frozenset[str] = frozenset()
    kind: TxnKind = TxnKind.SWITCH
    start: bytes = SOURCE  # what the server runs before (the transaction's source)


SCENARIOS = {
    "completes": Scenario(
        TARGET,
        TxnOutcome.COMPLETED,
        TARGET,
        (
            *FORWARD_HEAD,
            "restarted",
            "verify begin",
            "verified",
            "unfreeze begin",
            "completed + live",
        ),
        ("freeze", "write_config target", "restart", "unfreeze"),
    ),
    "restart_fails": Scenario(
        BROKEN,
        TxnOutcome.ROLLED_BACK,
        SOURCE,
        (*FORWARD_HEAD, "restart error, rolling_back", *WAY_BACK),
        ("freeze", "write_config broken", "restart", "write_config source", "restart", "unfreeze"),
        failed_phase=Phase.CONFIG_WRITTEN,
        restart_needed=True,
    ),
    "verify_fails": Scenario(
        WRONG_CERT,
        TxnOutcome.ROLLED_BACK,
        SOURCE,
        (*FORWARD_HEAD, "restarted", "verify begin", "verify error, rolling_back", *WAY_BACK),
        (
            "freeze",
            "write_config wrong-cert",
            "restart",
            "write_config source",
            "restart",
            "unfreeze",
        ),
        failed_phase=Phase.RESTARTED,
        restart_needed=True,
        slept=(0.3, 0.6),  # verify tries three times
    ),
    "freeze_fails": Scenario(
        TARGET,
        TxnOutcome.ROLLED_BACK,
        SOURCE,
        ("create", "freeze begin", "freeze error, rolling_back", *WAY_BACK),
        ("freeze", "unfreeze"),  # nothing was written: no restart on the way back
        failed_phase=Phase.STARTED,
        restart_needed=False,
        failing=frozenset({"freeze"}),
    ),
    "way_back_fails": Scenario(
        BROKEN,
        TxnOutcome.FAILED,
        SOURCE,
        (
            *FORWARD_HEAD,
            "restart error, rolling_back",
            *WAY_BACK[:5],
            "verify_source error, failed",
        ),
        ("freeze", "write_config broken", "restart", "write_config source", "restart", "unfreeze"),
        failed_phase=Phase.CONFIG_WRITTEN,
        restart_needed=True,
        # three attempts of verify_source (0.5 s, 1 s apart), each checking three times
        slept=(0.3, 0.6, 0.5, 0.3, 0.6, 1.0, 0.3, 0.6),
        failing=frozenset({"check_http"}),
    ),
    "undo": Scenario(  # a rollback transaction: a completed switch back to http
        SOURCE,
        TxnOutcome.COMPLETED,
        SOURCE,
        (
            *FORWARD_HEAD,
            "restarted",
            "verify begin",
            "verified",
            "unfreeze begin",
            "completed + live",
        ),
        ("freeze", "write_config source", "restart", "unfreeze"),
        kind=TxnKind.ROLLBACK,
        start=TARGET,
    ),
}


# The scenarios above name each step's writes as they were, one record and one "begin" each.
SCENARIOS = {name: replace(sc, writes=fused(sc.writes)) for name, sc in SCENARIOS.items()}


# Where a transaction keeps its two configs: in its journal row, written with its create,
# which also carries the first step's "begin" (this release; issue 15), or in files of their
# own, the target written before the create and the backup by the config write (a transaction
# journalled by an earlier release, resumed by this one).
LAYOUTS = ("journal", "files")


def writes_of(sc: Scenario, layout: str) -> tuple[str, ...]:
    """The scenario's journal writes in ``layout``: this release's create carries the first
    step's "begin" (one write, not two)."""
    if layout == "files":
        return sc.writes
    first, second, *rest = sc.writes
    assert (first, second) == ("create", "freeze begin")
    return (f"{first} + {second}", *rest)


class World:
    """One node: the fake server, the journal file, the plan of one transaction."""

    def __init__(self, root: Path, scenario: Scenario, layout: str = "journal") -> None:
        self.root = root
        self.sc = scenario
        self.layout = layout
        self.writes = writes_of(scenario, layout)
        self.time = FakeTime()
        self.server = FakeServer(
            config=scenario.start, running=scenario.start, failing=scenario.failing
        )
        config_file = root / "server" / "server.toml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        self.driver = FakeDriver(self.server, config_file)
        self.journal_path = root / "journal.sqlite3"
        ca_file = root / "ca.pem"
        ca_file.write_bytes(b"the cluster CA")
        new_file, backup = plans.prepare(root / "txn", "r1", scenario.kind)
        if layout == "files":  # as an earlier release prepared it
            new_file.parent.mkdir(parents=True, exist_ok=True)
            new_file.write_bytes(scenario.target)
        https = scenario.target != SOURCE
        live = {"cert_file": "/x/server.pem", "server_url": f"https://{ADDRESS}:8443{APP}"}
        self.plan = Plan(
            self.driver.facts(),
            ("https",) if scenario.start != SOURCE else ("http",),
            ("https",) if https else ("http",),
            new_file,
            backup,
            ca_file,
            STAGED_FP if https else "",
            live if https else None,
            live if not https else None,
        )
        self.txn = Txn(
            rollout_id="r1",
            kind=scenario.kind,
            epoch=1,
            phase=Phase.STARTED,
            plan=self.plan.to_json(),
            started_at=self.time.clock(),
            target_config=scenario.target if layout == "journal" else None,
            source_config=scenario.start if layout == "journal" else None,
        )

    def runner(self, journal: Journal) -> Runner:
        return Runner(
            journal,
            self.driver,
            self.time.clock,
            checks=fake_checks(self.server),
            sleep=self.time.sleep,
            monotonic=self.time.monotonic,
        )

    async def run(self, journal: CrashingJournal) -> Txn:
        """Start the transaction as the servicer does and run it to its end (or a crash)."""
        if self.layout == "files":
            txn = await asyncio.to_thread(journal.create, self.txn)
            return await self.runner(journal).run(txn)
        first = next_action(Phase.STARTED)
        runner = self.runner(journal)

        def create() -> tuple[Txn, Staged | None]:  # the servicer's one hand-off
            txn = journal.create(self.txn, begin=first)
            return txn, runner.stage(txn)

        txn, staged = await asyncio.to_thread(create)
        return await runner.run(txn, begun=first, staged=staged)

    async def resume(self) -> tuple[list[Txn], CrashingJournal]:
        """The agent starts again: a new journal on the same file, a new runner."""
        journal = CrashingJournal(self.journal_path)
        runner = self.runner(journal)
        pending = await runner.resume_all()
        await asyncio.gather(*runner.tasks.values())
        return pending, journal

    def row(self) -> dict[str, Any]:
        with contextlib.closing(sqlite3.connect(self.journal_path)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM txns").fetchall()
        assert len(rows) == 1
        return dict(rows[0])

    def assert_ended_well(self, journal: Journal) -> Txn:
        """The outcome, the server unfrozen on exactly the expected config, the plan as it was
        journalled at the start, the source never overwritten in its backup."""
        txn = journal.get("r1", self.sc.kind)
        assert txn is not None
        assert txn.outcome is self.sc.outcome, txn.reason
        assert txn.finished and txn.phase.value == self.sc.outcome.value
        s = self.server
        assert (s.running, s.config, s.frozen) == (self.sc.ends_on, self.sc.ends_on, False)
        assert json.loads(self.row()["plan"]) == self.plan.to_json()
        if self.layout == "journal":  # no file of its own: the row holds both configs
            assert not self.plan.backup_file.exists() and not self.plan.new_config_file.exists()
            assert (txn.source_config, txn.target_config) == (self.sc.start, self.sc.target)
        elif self.plan.backup_file.exists():
            assert self.plan.backup_file.read_bytes() == self.sc.start
        assert (txn.failed_phase, txn.restart_needed) == (
            self.sc.failed_phase,
            self.sc.restart_needed,
        )
        expected_live = self.plan.live_tls if self.sc.outcome is TxnOutcome.COMPLETED else None
        assert journal.live_tls() == expected_live
        return txn


@pytest.fixture
def world(tmp_path: Path) -> Callable[..., World]:
    """Makes worlds, each in a directory of its own."""
    made = itertools.count(1)
    return lambda scenario, layout="journal": World(tmp_path / f"w{next(made)}", scenario, layout)


async def crash_after(w: World, phase: str) -> None:
    """Run ``w``'s switch until the agent dies right after journalling its first write of
    ``phase`` (durable), the journal then closed: what a restarted agent finds."""
    at = next(n for n, label in enumerate(w.writes, 1) if label.startswith(phase))
    first = CrashingJournal(w.journal_path, at)
    with pytest.raises(Crash):
        await w.run(first)
    first.close()


# --- without a crash: each scenario's transcript ----------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_scenario_transcript(name: str, layout: str, world: Callable[..., World]) -> None:
    sc = SCENARIOS[name]
    w = world(sc, layout)
    journal = CrashingJournal(w.journal_path)
    with real_timers() as waited:
        done = await w.run(journal)

    # Every wait went to the fake clock: no timer of the loop ran out (this timed the run
    # before, under 5 s: a clock a loaded machine could break).
    assert waited == [], waited
    assert tuple(journal.writes) == w.writes
    assert tuple(w.server.ops) == sc.ops
    assert tuple(w.time.slept) == sc.slept
    assert w.assert_ended_well(journal) == done
    assert done.watermark == (None if name == "freeze_fails" else 7)
    if sc.outcome is not TxnOutcome.COMPLETED:
        first_error = next(e for e in journal.events("r1") if e["what"] == "error")
        assert done.reason.startswith(f"{first_error['step']}: ")


async def test_a_journalled_plan_cannot_be_rewritten(world: Callable[[Scenario], World]) -> None:
    w = world(SCENARIOS["completes"])
    journal = Journal(w.journal_path)
    txn = journal.create(w.txn)
    with pytest.raises(ValueError, match="plan is fixed"):
        journal.update(txn, plan={**txn.plan, "failed_phase": "frozen"})
    with pytest.raises(ValueError, match="plan is fixed"):
        journal.fail(txn, "freeze", "no", phase=Phase.ROLLING_BACK, plan={})
    assert journal.get("r1", TxnKind.SWITCH) == txn
    assert journal.events("r1")[-1]["step"] == "create"  # the refused writes left nothing


# --- a crash at every write --------------------------------------------------------------------


def _slug(label: str) -> str:
    return re.sub(r"[^a-z_]+", "-", label).strip("-")


CRASH_POINTS = [
    pytest.param(
        name,
        layout,
        n,
        lost,
        id=f"{layout}-{name}-{'instead-of' if lost else 'after'}-{n}-{_slug(label)}",
    )
    for layout in LAYOUTS
    for name, sc in sorted(SCENARIOS.items())
    for n, label in enumerate(writes_of(sc, layout), start=1)
    for lost in (False, True)
]


@pytest.mark.parametrize(("name", "layout", "at", "lost"), CRASH_POINTS)
async def test_a_crash_at_any_write_resumes_and_acts_once(
    name: str, layout: str, at: int, lost: bool, world: Callable[..., World]
) -> None:
    """Killed at any journal write (after it or instead of it), the agent resumes from the
    journal and every action runs once; in both layouts of a transaction's configs."""
    sc = SCENARIOS[name]
    ops_at = await ops_at_each_write(name, layout, world)
    w = world(sc, layout)
    writes = w.writes
    first = CrashingJournal(w.journal_path, at, lost=lost)
    with pytest.raises(Crash, match=f"^{re.escape(writes[at - 1])}$"):
        await w.run(first)
    first.close()
    pending, journal = await w.resume()

    label = writes[at - 1]
    if lost and at == 1:  # the transaction was never created: nothing happened, nothing resumes
        assert pending == [] and journal.get("r1", sc.kind) is None
        assert w.server.ops == [] and w.server.running == sc.start
        return
    finished = at == len(writes) and not lost
    assert [t.rollout_id for t in pending] == ([] if finished else ["r1"])
    w.assert_ended_well(journal)
    ops = tuple(w.server.ops)
    if not lost:
        # Every operation ran exactly once, and every write was made once: a "begin" the crash
        # followed is not journalled again (``Journal.last_begun``).
        assert ops == sc.ops
        assert (*first.writes, *journal.writes) == writes, label
    else:
        # The action whose record was lost ran again, nothing else did (it may also find its
        # work done: the source already back in place).
        before, after = ops_at[at - 2], ops_at[at - 1]
        assert ops in (sc.ops, sc.ops[:after] + sc.ops[before:]), (ops, sc.ops)
    journal.close()


@pytest.mark.parametrize(
    ("name", "at", "lost"),
    [("completes", 1, False), ("completes", 2, True), ("completes", 2, False)],
    ids=["after-freeze-begin", "instead-of-frozen", "after-frozen"],
)
async def test_a_switch_resumed_in_its_freeze_window_holds_the_checkpoint_while_frozen(
    name: str, at: int, lost: bool, world: Callable[..., World]
) -> None:
    """Review s73 revjournal: the journal's freeze window (``in_freeze_window``: no idle
    checkpoint while the server is frozen) is opened by the ``freeze begin`` event's write and
    read from the row at the agent's start (``freeze_started_at`` set, not ended). An agent
    killed after that event and before the ``frozen`` record (or with that record lost) finds
    a row with no ``freeze_started_at``: the resumed freeze, whose ``begin`` is not journalled
    again (``Journal.last_begun``), then ran its whole window with the checkpoint free. After
    each write of the resumed switch: the server frozen means the window is open."""
    sc = SCENARIOS[name]
    w = world(sc)
    first = CrashingJournal(w.journal_path, at, lost=lost)
    with pytest.raises(Crash):
        await w.run(first)
    first.close()
    seen: list[tuple[str, bool, bool]] = []  # (write, server frozen, window open) after each
    journal = CrashingJournal(w.journal_path)  # (the agent started again: ``World.resume``)
    journal.after_write = lambda: seen.append(
        (journal.writes[-1], w.server.frozen, journal.in_freeze_window())
    )
    runner = w.runner(journal)
    await runner.resume_all()
    await asyncio.gather(*runner.tasks.values())
    w.assert_ended_well(journal)
    assert [label for label, frozen, _ in seen if frozen], seen
    assert [(label, True) for label, frozen, _ in seen if frozen] == [
        (label, held) for label, frozen, held in seen if frozen
    ]
    assert not journal.in_freeze_window()
    journal.close()


@pytest.mark.parametrize("refused", [False, True], ids=["freezes-again", "refused"])
async def test_a_switch_resumed_after_its_freeze_was_lifted_freezes_again(
    refused: bool, world: Callable[..., World]
) -> None:
    """Killed after ``frozen``, the agent finds the server unfrozen at its start (its exit
    lifted the freeze, or someone restarted a server whose freeze does not outlive it) and a
    write taken: it freezes again and journals the new watermark before the config write, which
    the verify then compares (s33 audit L2). A server that refuses that freeze rolls back."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await crash_after(w, "frozen")
    w.server.frozen = False
    w.server.watermark += 1  # a write while the agent was away
    if refused:
        w.server.failing = frozenset({"freeze"})
    pending, journal = await w.resume()
    txn = journal.get("r1", sc.kind)
    assert txn is not None and [t.phase for t in pending] == [Phase.FROZEN]
    if refused:
        assert txn.outcome is TxnOutcome.ROLLED_BACK
        assert "the freeze was lifted and could not be made again" in txn.reason
        assert w.server.running == SOURCE and not w.server.frozen
    else:
        assert txn.outcome is TxnOutcome.COMPLETED, txn.reason
        assert txn.watermark == w.server.watermark == 8
        assert w.server.ops == ["freeze", "freeze", *sc.ops[1:]]
        # that it freezes again first, then the watermark, then the action (s34 review M2)
        assert journal.writes[:3] == ["freeze again", "frozen", "config_written + restart begin"]
    journal.close()


async def crashed_after_frozen(w: World) -> None:
    """Run ``w``'s transaction until the agent is killed right after journalling ``frozen``;
    then its exit lifted the freeze (``_die``), or someone restarted a server whose freeze does
    not outlive it."""
    await crash_after(w, "frozen")
    w.server.frozen = False


def disk_full(text: str, code: str = "SQLITE_FULL") -> JournalError:
    """The journal's error for a write that failed as SQLite's ``code`` (its cause, as
    ``Journal._error`` raises it)."""
    cause = sqlite3.OperationalError("database or disk is full")
    cause.sqlite_errorname = code
    error = JournalError(text)
    error.__cause__ = cause
    return error


class FullJournal(CrashingJournal):
    """A journal whose every write fails (a full disk under the agent's data dir)."""

    def _write(self, label: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise disk_full(f"journal: database or disk is full ({label})")

    def probe(self, *, busy: float | None = None) -> None:  # (not in a journal's transcript)
        self._write("probe", super().probe, busy=busy)


def said(runner: Runner) -> str:
    """What a runner whose task died for good said: the daemon's line as it exits (``fatal``),
    or, held on a journal that cannot be written, the hold's (``held_said``)."""
    return runner.fatal or runner.held_said


async def settled(runner: Runner) -> bool:
    """Wait until every task of ``runner`` has ended or one is held on its journal
    (``Runner._hold``); a held one is then stopped, as the agent's stop would. True if held."""
    held = asyncio.Event()
    runner.on_held = held.set
    if runner.held:  # (held already)
        held.set()
    ended: asyncio.Future[list[Any]] = asyncio.ensure_future(
        asyncio.gather(*runner.tasks.values(), return_exceptions=True)
    )
    waiting: asyncio.Future[Any] = asyncio.ensure_future(held.wait())
    await asyncio.wait([ended, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if held.is_set():
        await runner.close(0)
    await ended
    return held.is_set()


async def test_a_journal_that_cannot_be_written_makes_no_freeze_at_each_start(
    world: Callable[..., World],
) -> None:
    """s34 review M2 (i): a switch resumed past its freeze, on a journal that fails every write.
    The refreeze froze the server and then failed to journal it; the task died four times and
    ``_die`` lifted the freeze, and each start of the agent (systemd, every ten seconds or so)
    did it again: the server refused writes most of the time, for as long as the disk was full.
    Now that it freezes again is journalled first: the write fails, and nothing is frozen."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await crashed_after_frozen(w)
    for _start in range(3):
        w.server.ops.clear()
        journal = FullJournal(w.journal_path)
        runner = w.runner(journal)
        await runner.resume_all()
        assert await settled(runner)  # (held, session 70: it used to exit)
        assert "freeze" not in w.server.ops and not w.server.frozen, w.server.ops
        journal.close()


class FullFrom(CrashingJournal):
    """A journal whose disk fills once the write labelled ``full_from`` is reached: that write
    and every later one fail, as ``FullJournal``'s."""

    def __init__(self, path: Path, full_from: str) -> None:
        super().__init__(path)
        self.full_from = full_from
        self.full = False

    def _write(self, label: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.full = self.full or label.startswith(self.full_from) or f", {self.full_from}" in label
        if self.full:
            raise disk_full(f"journal: database or disk is full ({label})")
        return super()._write(label, write, *args, **kwargs)

    def probe(self, *, busy: float | None = None) -> None:  # fails once full; not before
        if self.full:
            self._write("probe", super().probe, busy=busy)
        else:
            super().probe(busy=busy)


async def died_on_full(w: World, full_from: str) -> None:
    """The switch's first task dies as the journal's disk fills from ``full_from`` on (the
    death as ``_supervised`` sees it)."""
    journal = FullFrom(w.journal_path, full_from)
    with pytest.raises(JournalError):
        await w.run(journal)
    journal.close()


async def started_on_full(w: World, full_from: str) -> Runner:
    """The agent started again with its journal still full from ``full_from`` on: its runner,
    whose resumed task has died for good."""
    journal = FullFrom(w.journal_path, full_from)
    runner = w.runner(journal)
    await runner.resume_all()
    held = await settled(runner)
    journal.close()
    assert held and not runner.dead.is_set()  # (it exited before session 70)
    return runner


@pytest.mark.parametrize("name", ["completes", "undo"])
async def test_a_transaction_that_dies_after_its_config_write_puts_the_source_back(
    name: str, world: Callable[..., World]
) -> None:
    """Session 68 (journal review): the journal's disk fills between the record of ``frozen``
    and that of ``config_written`` (the config is written in between, on another file system).
    The task dies four times, each time writing the target again, and ``_die`` lifted the
    freeze: the server ran the source, unfrozen, its config file the target, never loaded nor
    verified, while the agent exited (and exited again at each start on the full disk). Any
    restart of the server but the agent's (a reboot, an admin's, a package upgrade) loaded the
    target, a config no verify ever passed, with no agent to take it back. Now ``_die`` puts
    the source back where the journal says ``frozen`` (the target cannot be loaded yet), and
    once there is room the switch resumed from ``frozen`` writes the target again and ends."""
    sc = SCENARIOS[name]
    w = world(sc)
    await died_on_full(w, "config_written")  # the first task's death, as ``_supervised`` sees it

    runner = await started_on_full(w, "config_written")
    s = w.server
    assert (s.running, s.config, s.frozen) == (sc.start, sc.start, False), s.ops
    assert "the source config was put back" in said(runner)
    assert w.row()["phase"] == "frozen"

    _, resumed = await w.resume()  # room again
    txn = resumed.get("r1", sc.kind)
    assert txn is not None
    assert txn.outcome is TxnOutcome.COMPLETED, txn.reason
    assert (s.running, s.config, s.frozen) == (sc.target, sc.target, False), s.ops
    resumed.close()


@pytest.mark.parametrize(
    ("name", "full_from", "kept"),
    [
        ("verify_fails", "restarted", True),  # the target restarted, never verified
        ("verify_fails", "restored", True),  # on the way back, the target still running
        ("restart_fails", "restart error", True),  # the target's restart failed: down
        ("completes", "restarted", False),  # the target runs and verifies: lifted
        ("completes", "verified", False),  # the target verified: lifted
    ],
)
async def test_a_transaction_that_dies_with_an_unverified_config_live_keeps_the_freeze(
    name: str, full_from: str, kept: bool, world: Callable[..., World]
) -> None:
    """Session 69 (journalm, M): the journal's disk fills from ``config_written`` on (the
    server's config elsewhere): the restart has happened, the record of what came of it cannot
    be written. The task died four times and ``_die`` lifted the freeze with a target running
    that no verify passed (a wrong certificate, say), or on the way back before the source was
    loaded again, and nothing took it back while the disk stayed full: the node took writes on
    a config never verified. Now the freeze is lifted only where the server proves it runs the
    config its journal's phase leads to (verified from outside, as the step would); else it is
    kept, and the agent's line says so. With room again, the switch resumed ends as it would
    have (the server unfrozen on the verified config)."""
    sc = SCENARIOS[name]
    w = world(sc)
    await died_on_full(w, full_from)  # the first task's death, as ``_supervised`` sees it

    s = w.server
    for start in range(2):  # the agent started again on the disk still full: as it was
        runner = await started_on_full(w, full_from)
        assert s.frozen is kept, (start, s.ops, said(runner))
        if kept:
            assert "the freeze is kept" in said(runner), said(runner)
            assert "unfreeze" not in s.ops, s.ops
        else:
            assert "writes are accepted again" in said(runner), said(runner)
            assert (s.running, s.config) == (sc.target, sc.target)
            s.watermark += 1  # a write taken, unfrozen: the next start does not freeze again

    _, resumed = await w.resume()  # room again
    w.assert_ended_well(resumed)
    resumed.close()


class _FsyncFailing:
    """A journal's connection whose COMMITs fail as a failing disk's fsync does
    (SQLITE_IOERR_FSYNC) while ``failing``: each write is then in doubt
    (``nodeagent.journal.JOURNAL_IN_DOUBT``), and so each read, which writes first."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.failing = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.failing and sql == "COMMIT":
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorname = "SQLITE_IOERR_FSYNC"
            raise error
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class FsyncFailingFrom(CrashingJournal):
    """A journal whose disk fails every fsync from the write labelled ``failing_from`` on."""

    def __init__(self, path: Path, failing_from: str) -> None:
        super().__init__(path)
        self.failing_from = failing_from
        self.conn = _FsyncFailing(self._db._db)
        self._db._db = cast(Any, self.conn)

    def _write(self, label: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if label.startswith(self.failing_from) or f", {self.failing_from}" in label:
            self.conn.failing = True
        return super()._write(label, write, *args, **kwargs)


@pytest.mark.parametrize(
    ("name", "failing_from", "kept"),
    [
        ("verify_fails", "restarted", True),  # the target restarted, never verified
        ("completes", "restarted", False),  # the target runs and verifies: lifted
        ("completes", "config_written", False),  # the source runs: lifted, and put back
    ],
)
async def test_a_switch_whose_record_is_in_doubt_keeps_the_freeze_as_its_phase_says(
    name: str, failing_from: str, kept: bool, world: Callable[..., World]
) -> None:
    """Review s74 revdoubt: the record of ``restarted`` failed its COMMIT (the fsync: in
    doubt, ``JOURNAL_IN_DOUBT``) and the disk fails every write after it. In doubt, each read
    of the journal writes first, which fails: ``_supervised`` could no longer read the record
    back, and ``_die`` judged the freeze by the transaction as the task began (``started``:
    "no unverified config live") and lifted it, the target restarted and never verified
    taking writes (session 69's M, back). The phase the runner last journalled (kept:
    ``config_written``) decides, as it did while a failed write left the reads working. So
    for the source put back (session 68) where the record of ``config_written`` is in doubt:
    unread, the target written and never loaded stayed on disk."""
    sc = SCENARIOS[name]
    w = world(sc)
    journal = FsyncFailingFrom(w.journal_path, failing_from)
    runner = w.runner(journal)
    first = next_action(Phase.STARTED)

    def create() -> tuple[Txn, Staged | None]:  # the servicer's one hand-off
        txn = journal.create(w.txn, begin=first)
        return txn, runner.stage(txn)

    txn, staged = await asyncio.to_thread(create)
    runner.start(txn, first, staged)
    assert await settled(runner)  # held: the journal takes no write
    s = w.server
    restarted = failing_from == "restarted"
    assert journal.conn.failing and s.running == (sc.target if restarted else sc.start), s.ops
    assert s.frozen is kept, (s.ops, said(runner))
    assert ("the freeze is kept" in said(runner)) is kept, said(runner)
    assert ("the source config was put back" in said(runner)) is not restarted, said(runner)
    assert s.config == s.running, s.ops  # (what a restart of the server would load)
    journal.close()


class Filling(CrashingJournal):
    """A journal that takes no write while ``full`` (a full disk under the agent's data dir),
    its probe included; the disk freed, it takes them again."""

    full = True

    def _write(self, label: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.full:
            raise disk_full(f"journal {self.path}: database or disk is full (SQLITE_FULL)")
        return super()._write(label, write, *args, **kwargs)

    def probe(self, *, busy: float | None = None) -> None:
        self._write("probe", super().probe, busy=busy)

    def admit_epoch(self, epoch: int) -> int | None:  # a new epoch's write (``_command``)
        if epoch > self.highest_epoch():
            self._write(f"epoch {epoch}", lambda: None)
        return super().admit_epoch(epoch)


@pytest.mark.parametrize("end", ["room again", "agent stopped"])
async def test_an_agent_started_again_on_a_full_journal_restarts_nothing_and_holds_the_switch(
    end: str, world: Callable[..., World]
) -> None:
    """Session 70 (keptfreeze, M): a switch died on a full disk under the journal with the
    target restarted and never verified: the freeze is kept and the agent exited. Started
    again (systemd, every few seconds) on the disk still full, the agent resumed it from
    ``config_written``: it restarted the server, four times at each start (the record of the
    restart could not be written), and exited again; the leader saw an unreachable node. Now
    a transaction resumed first makes a write to its journal: none takes, so nothing is done
    to the server; the agent does not exit but holds the switch, frozen, and says why (its
    view of its server: "needs the admin: its journal cannot be written ..."). Once the
    journal takes writes again, it carries the switch on by itself, to its outcome. Stopped
    while it holds it, the agent stops at once (nothing to let end: the grace is not waited
    for), and the next start carries it on."""
    sc = SCENARIOS["verify_fails"]
    w = world(sc)
    await died_on_full(w, "restarted")
    s = w.server
    assert (s.running, s.frozen) == (sc.target, True)
    s.ops.clear()

    journal = Filling(w.journal_path)
    runner = w.runner(journal)
    held = asyncio.Event()
    runner.on_held = held.set
    trust = LeaderTrust(w.root / "ca.pem", "example.test", w.root / "crl.pem")
    agent = service.NodeAgentService(
        cast(Any, None), cast(Any, None), journal, w.driver, runner, w.time.clock, trust=trust
    )
    await runner.resume_all()
    (task,) = runner.tasks.values()
    await asyncio.wait({task, asyncio.ensure_future(held.wait())}, return_when="FIRST_COMPLETED")
    assert not task.done() and not runner.dead.is_set(), (s.ops, runner.fatal)
    assert s.ops == [] and s.frozen and s.running == sc.target, s.ops  # no restart, no lift
    why = runner.needs_admin()
    assert why == (
        f"its journal cannot be written (disk full: SQLITE_FULL): free space in"
        f" {w.journal_path.parent}; the switch of rollout r1 waits mid-way, writes refused, and"
        " then goes on by itself"
    ), why
    assert "the freeze is kept" in runner.held_said, runner.held_said
    view = await agent._view()  # what the heartbeats say, hence the leader
    assert not view.healthy and view.detail == f"needs the admin: {why}", view
    # What the leader keeps of it (200 characters, ``peertext.clean``) says what to do
    # (review of session 70: the hint came last, cut off by a rollout id and a long path).
    assert f"free space in {w.journal_path.parent};" in peertext.clean(view.detail, 200)
    assert transaction.HOLD_BACKOFF.delay(1) in w.time.slept  # it asks again with backoff

    if end == "agent stopped":
        closing = asyncio.ensure_future(runner.close(3600))
        await asyncio.sleep(0)  # the stop has begun, up to its first wait
        assert task.cancelling() or task.done(), "the held switch is not stopped at once"
        await closing
        assert runner.needs_admin() is None and s.ops == [] and s.frozen
        journal.close()
        _, resumed = await w.resume()  # started again, with room
        w.assert_ended_well(resumed)
        resumed.close()
        return
    journal.full = False  # room again: the switch goes on in the same agent
    done = await task
    assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason
    assert runner.needs_admin() is None and not runner.dead.is_set()
    assert not (await agent._view()).detail.startswith("needs the admin"), await agent._view()
    w.assert_ended_well(journal)
    journal.close()


class RefusingUnfreeze(FakeDriver):
    """The fake server, whose unfreeze fails while ``refusing`` (its own state on the full
    disk too, say)."""

    refusing = True

    async def unfreeze(self) -> None:
        if self.refusing:
            self.server.ops.append("unfreeze refused")
            raise DriverError("unfreeze: the server could not save its state")
        await super().unfreeze()


async def held_told(runner: Runner, told: asyncio.Event) -> None:
    """Wait until ``runner`` tells a change of its hold (``on_held``), at most a minute."""
    await asyncio.wait_for(told.wait(), 60)
    told.clear()


async def resumed_into_hold(
    w: World,
) -> tuple[Filling, Runner, asyncio.Task[Txn], asyncio.Event]:
    """A runner on a journal that fails its writes (``Filling``), resumed: its one task, held
    (told once: ``held_told``); the event tells each later change of its hold."""
    journal = Filling(w.journal_path)
    runner = w.runner(journal)
    told = asyncio.Event()
    runner.on_held = told.set
    await runner.resume_all()
    (task,) = runner.tasks.values()
    await held_told(runner, told)
    return journal, runner, task, told


@pytest.mark.parametrize("why", ["unfreeze refused", "scope lease"])
async def test_a_held_switch_lifts_the_freeze_its_death_left_once_it_may(
    why: str, world: Callable[..., World]
) -> None:
    """Review of session 70's hold (M): a switch dead on a full journal at ``frozen`` (the
    source runs: the freeze may be lifted) whose freeze ``_die`` could not lift (the server
    refused the unfreeze) or left to the scope freeze's lease (which, unrenewable on the full
    disk, runs out) stayed frozen for as long as the disk was full: the hold never tried again
    (before the hold, each start of the agent did), and the node's view said it waited, not
    that it refused writes. Now the view says "writes refused" while it does, and the hold
    lifts the freeze as soon as ``_die`` would (the unfreeze taken, the lease run out)."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    if why == "scope lease":
        w.plan = replace(w.plan, keep_frozen=True)
        w.txn = replace(w.txn, plan=w.plan.to_json())
    await died_on_full(w, "config_written")
    s = w.server
    assert (s.running, s.frozen) == (sc.start, True)
    s.ops.clear()
    end = w.time.monotonic() + 300
    if why == "scope lease":
        with contextlib.closing(Journal(w.journal_path)) as journal:
            journal.set_freeze_lease(Lease("r1", w.time.clock() + dt.timedelta(seconds=300), 300))
    driver = w.driver = RefusingUnfreeze(s, w.driver.config_file)
    driver.refusing = why == "unfreeze refused"
    journal, runner, task, told = await resumed_into_hold(w)
    why_now = runner.needs_admin()
    assert why_now is not None and "waits mid-way, writes refused" in why_now, why_now
    assert s.frozen and not task.done()
    assert w.time.monotonic() < end  # (the lease still holds)
    driver.refusing = False  # the server takes its unfreeze again
    await held_told(runner, told)  # the hold lifted it
    assert not s.frozen and s.running == sc.start, s.ops
    if why == "scope lease":
        assert w.time.monotonic() >= end  # not before its lease ran out
    why_now = runner.needs_admin()
    assert why_now is not None and "writes refused" not in why_now, why_now
    journal.full = False  # room again: the switch goes on, frozen again for its steps
    done = await task
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert s.ops.count("freeze") == 1, s.ops  # frozen again for its steps, once
    if why == "unfreeze refused":
        assert s.ops[-1] == "unfreeze" and not s.frozen, s.ops
    journal.close()


async def test_a_held_switch_keeps_the_freeze_until_the_server_proves_its_config(
    world: Callable[..., World],
) -> None:
    """Review of session 70's hold: a switch dead on a full journal right after its restart
    (``config_written`` journalled, the target restarted) while the server did not answer:
    nothing proves what it runs, so the freeze is kept ("writes refused"). Held, the agent
    asks again as each start of it did before the hold: once the server answers as the
    target (its watermark the freeze's: no write lost), the freeze is lifted, and the switch
    carries on with room."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await died_on_full(w, "restarted")
    s = w.server
    assert (s.running, s.frozen) == (sc.target, True)
    s.running = None  # down (slow to start, say) as the task dies: nothing proved
    s.ops.clear()
    journal, runner, task, told = await resumed_into_hold(w)
    why = runner.needs_admin()
    assert why is not None and "writes refused" in why and "the freeze is kept" in said(runner)
    assert s.frozen and s.ops == [], s.ops
    s.running = sc.target  # it answers now, as the target
    await held_told(runner, told)
    assert not s.frozen and s.ops == ["unfreeze"], s.ops
    why = runner.needs_admin()
    assert why is not None and "writes refused" not in why, why
    s.watermark += 2  # writes taken, unfrozen, while held
    journal.full = False
    done = await task
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    # Resumed before its restart's record: frozen again (a new watermark, which its verify
    # compares) for the restart it makes again, and verified (s71 held2: asked of a switch too).
    assert s.ops == ["unfreeze", "freeze", "restart", "unfreeze"], s.ops
    assert done.watermark == s.watermark == 9
    w.assert_ended_well(journal)
    journal.close()


class RefusedRestart(FakeDriver):
    """The fake whose first ``refusals`` restarts fail before they stop the server (the
    service manager refused them: the server runs on as it was); ``frozen_at`` says whether
    the server was frozen at each restart tried."""

    refusals = 1

    def __init__(self, server: FakeServer, config_file: Path) -> None:
        super().__init__(server, config_file)
        self.frozen_at: list[bool] = []

    async def restart(self) -> None:
        self.frozen_at.append(self.server.frozen)
        if self.refusals:
            self.refusals -= 1
            self.server.ops.append("restart refused")
            raise DriverError("restart: the service manager refused it")
        await super().restart()


@pytest.mark.parametrize("refused", [False, True], ids=["frozen", "freeze-refused"])
async def test_a_held_way_back_freezes_again_before_its_restart(
    refused: bool, world: Callable[..., World]
) -> None:
    """Session 70's hold left it (s71 held2): a switch whose restart was refused (the server
    ran on, on its source) goes back; the journal's disk fills as the way back records
    ``restored`` (the source back on disk, the restart owed). The server proves it runs the
    source: the hold lifts the freeze, and writes are taken while the disk stays full. Once
    the journal takes writes, the way back carried on from there and restarted the server
    unfrozen, writes coming in through its restart. Now the way back resumed before its
    restart freezes the server again first (journalled before the freeze, its new watermark
    after it), restarts it once, verifies and unfreezes it. A server that refuses that freeze
    does not fail the way back: it is restarted unfrozen, as before."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    driver = w.driver = RefusedRestart(w.server, w.driver.config_file)
    await died_on_full(w, "restored")
    s = w.server
    assert (s.config, s.running, s.frozen) == (SOURCE, SOURCE, True), s.ops
    journal, runner, task, _told = await resumed_into_hold(w)
    assert not s.frozen and "writes are accepted again" in said(runner), (s.ops, said(runner))
    s.watermark += 3  # writes taken while held
    s.ops.clear()
    driver.frozen_at.clear()
    if refused:
        s.failing = frozenset({"freeze"})
    journal.full = False  # room again
    done = await task
    assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason
    assert s.ops == ["freeze", "restart", "unfreeze"], s.ops
    assert driver.frozen_at == [not refused], driver.frozen_at  # one restart, frozen
    if refused:
        assert done.watermark == 7 and "freeze again" in journal.writes, journal.writes
        assert (s.running, s.config, s.frozen) == (SOURCE, SOURCE, False)
        journal.close()
        return
    assert done.watermark == s.watermark == 10
    # that it freezes again first, then the watermark, then the restart (s34 review M2)
    writes = [w for w in journal.writes if w != "probe"]
    assert writes[:3] == ["restored + restart begin", "freeze again", "restored"], writes
    assert (s.running, s.config, s.frozen) == (SOURCE, SOURCE, False)
    journal.close()


async def test_a_way_back_resumed_after_its_freeze_was_lifted_freezes_again(
    world: Callable[..., World],
) -> None:
    """The agent's exit's side of the test above: killed right after the way back journalled
    ``restored`` (its restart owed), the agent finds the server unfrozen at its next start
    (the exit of a dying task lifts it, ``_die``) and writes taken: the way back freezes it
    again before its restart, once, and ends rolled back."""
    w = world(SCENARIOS["completes"])
    driver = w.driver = RefusedRestart(w.server, w.driver.config_file)
    first = CrashingJournal(w.journal_path)

    def killed_at_restored() -> None:
        if first.writes[-1].startswith("restored"):
            raise Crash(first.writes[-1])

    first.after_write = killed_at_restored
    with pytest.raises(Crash):
        await w.run(first)
    first.close()
    s = w.server
    assert (s.config, s.running, s.frozen) == (SOURCE, SOURCE, True), s.ops
    s.frozen, s.watermark = False, s.watermark + 1
    s.ops.clear()
    driver.frozen_at.clear()
    _, journal = await w.resume()
    txn = journal.get("r1", TxnKind.SWITCH)
    assert txn is not None and txn.outcome is TxnOutcome.ROLLED_BACK, txn
    assert s.ops == ["freeze", "restart", "unfreeze"] and driver.frozen_at == [True], s.ops
    assert journal.writes[:2] == ["freeze again", "restored"], journal.writes
    assert txn.watermark == s.watermark == 8 and not s.frozen
    journal.close()


class Aborted(Exception):
    """What ``FakeContext.abort`` raises: the gRPC status a servicer answered with."""


class FakeContext:
    """The servicer's context, as far as ``map_errors`` uses it: ``abort`` raises."""

    async def abort(self, code: object, details: str) -> None:
        raise Aborted(code, details)


async def test_a_node_holding_a_switch_refuses_other_commands_with_the_hold_s_reason(
    world: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 70's hold left it (s71 held2): a node whose switch is held on a journal it
    cannot write answered a Preflight, CreateCSR, Stage, Switch or Rollback of another
    rollout with the disk's error (the new epoch's write: RESOURCE_EXHAUSTED, which the
    leader tries again for as long as the disk stays full, a preflight or stage until its
    deadline) or "busy". Now every one of them but the held switch's own repeat is refused
    at once with the hold's reason (FAILED_PRECONDITION: nothing began), a Rollback of the
    held switch's rollout included; nothing is journalled. The repeat is
    answered with the switch as it stands (the leader follows it: it goes on by itself),
    and the switch completes once the journal takes writes."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    with contextlib.closing(Journal(w.journal_path)) as first:
        first.admit_epoch(1)  # the rollout's epoch, journalled by its first command
    await died_on_full(w, "config_written")
    journal, runner, task, _told = await resumed_into_hold(w)
    why = runner.needs_admin()
    assert why is not None and "its journal cannot be written" in why, why
    monkeypatch.setattr(service, "require_leader", lambda _context, _trust: None)
    trust = LeaderTrust(w.root / "ca.pem", "example.test", w.root / "crl.pem")
    trust.announce(2)
    agent = service.NodeAgentService(
        cast(Any, None), cast(Any, None), journal, w.driver, runner, w.time.clock, trust=trust
    )
    context: Any = FakeContext()
    tls = CHANGE.wire(Change.ENABLE_TLS)

    def command(rollout_id: str, epoch: int) -> agent_pb2.Command:
        return agent_pb2.Command(rollout_id=rollout_id, epoch=epoch)

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "switch of a new rollout": lambda: agent.Switch(
            agent_pb2.SwitchRequest(command=command("r2", 2), change=tls), context
        ),
        "switch at the epoch held": lambda: agent.Switch(
            agent_pb2.SwitchRequest(command=command("r2", 1), change=tls), context
        ),
        "preflight": lambda: agent.Preflight(
            agent_pb2.PreflightRequest(command=command("r2", 2), make_csr=True), context
        ),
        "csr": lambda: agent.CreateCSR(
            agent_pb2.CreateCSRRequest(command=command("r2", 2)), context
        ),
        "stage": lambda: agent.Stage(agent_pb2.StageRequest(command=command("r2", 2)), context),
        "way back": lambda: agent.Rollback(
            agent_pb2.RollbackRequest(command=command("r2", 2)), context
        ),
        "rollback of the held switch's rollout": lambda: agent.Rollback(
            agent_pb2.RollbackRequest(command=command("r1", 1)), context
        ),
    }
    for name, call in calls.items():
        with pytest.raises(Aborted) as caught:
            await call()
        code, details = caught.value.args
        assert code is grpc.StatusCode.FAILED_PRECONDITION, (name, code, details)
        assert details == f"{NEEDS_ADMIN}{why}", (name, details)
    # The held switch's own repeat: the switch as it stands, nothing begun or refused.
    answer = await agent.Switch(
        agent_pb2.SwitchRequest(command=command("r1", 1), change=tls), context
    )
    assert (answer.rollout_id, answer.phase) == ("r1", TXN_PHASE.wire(Phase.FROZEN)), answer
    assert journal.highest_epoch() == 1 and journal.writes == [], journal.writes
    assert [t.rollout_id for t in journal.unfinished()] == ["r1"] and not task.done()
    journal.full = False  # room again
    done = await task
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    w.assert_ended_well(journal)
    journal.close()


class BrokenJournal(CrashingJournal):
    """A journal whose every write fails with SQLite's ``code``."""

    def __init__(self, path: Path, code: str) -> None:
        super().__init__(path)
        self.code = code

    def _write(self, label: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise disk_full(f"journal {self.path}: it failed ({self.code})", self.code)

    def probe(self, *, busy: float | None = None) -> None:
        self._write("probe", super().probe, busy=busy)


@pytest.mark.parametrize(
    ("code", "held"),
    [
        ("SQLITE_CORRUPT", ""),
        ("SQLITE_NOTADB", ""),
        ("SQLITE_READONLY", "(read-only: SQLITE_READONLY): make {} writable again;"),
        ("SQLITE_IOERR_FSYNC", "(I/O error: SQLITE_IOERR_FSYNC): check the disk and the journal"),
        ("SQLITE_BUSY", "(locked: SQLITE_BUSY): end what else holds the journal in {};"),
    ],
)
async def test_a_switch_is_held_only_on_a_journal_a_new_agent_would_find_as_unwritable(
    code: str, held: str, world: Callable[..., World]
) -> None:
    """Review of session 70's hold (M): a switch whose journal took no write for any reason
    was held, the agent saying "free space in DATA_DIR": a damaged journal too (SQLite's
    SQLITE_CORRUPT, SQLITE_NOTADB), held for ever with advice that cannot help, where the
    agent used to exit and its next start refuse the journal and say how to recover (exit 4,
    ``open_journal``). Now only a disk that is full, read-only or failing, or a journal
    locked by another process, is held on (with what to do for each); any other failure
    exits as before."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await died_on_full(w, "config_written")
    journal = BrokenJournal(w.journal_path, code)
    runner = w.runner(journal)
    await runner.resume_all()
    was_held = await settled(runner)
    journal.close()
    assert was_held is bool(held) and runner.dead.is_set() is not bool(held), said(runner)
    if held:
        why = runner.held_said
        assert held.format(w.journal_path.parent) in why, why
    else:
        assert f"({code})" in runner.fatal and "exiting so that" in runner.fatal, runner.fatal


async def test_a_dying_transaction_keeps_the_freeze_where_the_config_file_is_not_the_target(
    world: Callable[..., World],
) -> None:
    """The file half of the test above (s69 mutants: dropping ``_unproved``'s look at the
    config file left every test green): the target restarted and answers as the target, but
    its verify cannot be recorded, and the server's config file is no longer the target (put
    back by hand, say): its next
    restart would load another config, so the server does not prove it runs the target and
    the freeze is kept, the line saying why."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await died_on_full(w, "verified")  # (its write carries the restart's record: ``Passed``)
    s = w.server
    assert s.running == sc.target
    s.config = sc.start
    # Started again with the disk still full, its probe refused: no action (a resumed restart
    # would load the file), the freeze decided on what runs now.
    journal = Filling(w.journal_path)
    runner = w.runner(journal)
    await runner.resume_all()
    held = await settled(runner)
    journal.close()
    assert held and not runner.dead.is_set()
    assert s.ops == ["freeze", "write_config target", "restart"], s.ops
    assert s.frozen and "unfreeze" not in s.ops, (s.ops, said(runner))
    assert "its config file is not the target" in said(runner), said(runner)


# A certificate's rotation: https before and after, the target told apart by its certificate
# only; the source by nothing from outside (a verify of the source names no certificate).
OLD_CERT = f'listen = ["https"]\ncert = "sha256:{"1" * 64}"\n'.encode()
NAMES[OLD_CERT] = "old-cert"


async def test_a_rotation_dying_on_its_way_back_keeps_the_freeze_while_the_target_runs(
    world: Callable[..., World],
) -> None:
    """Review 1 of session 69: a rotation (https to https, a new certificate) whose target
    failed its verify goes back; the disk fills as the source is written (its record,
    ``restored``, cannot be written): the server still runs the target. ``_unproved`` checked
    the source as the verify step does, naming no certificate, and the target answered as it
    (https, the cluster's CA): the freeze was lifted on the target no verify passed. The source
    is told from the target there only by the server's start after its config's write, as
    for a change-password (``_not_loaded``); this server does not say when it started: kept."""
    sc = replace(SCENARIOS["verify_fails"], start=OLD_CERT, ends_on=OLD_CERT)
    w = world(sc)
    assert w.plan.source_schemes == w.plan.target_schemes == ("https",)
    await died_on_full(w, "restored")

    s = w.server
    runner = await started_on_full(w, "restored")
    assert (s.config, s.running) == (OLD_CERT, WRONG_CERT)  # the source on disk, not loaded
    assert s.frozen and "unfreeze" not in s.ops, (s.ops, said(runner))
    assert "the freeze is kept" in said(runner), said(runner)

    _, resumed = await w.resume()  # room again: the way back ends as it would have
    w.assert_ended_well(resumed)
    resumed.close()


async def test_a_rotation_dying_on_its_way_back_before_any_restart_lifts_the_freeze(
    world: Callable[..., World],
) -> None:
    """The other side of the test above: the target's write failed (no restart was made, the
    server runs the source it ran before) and the journal fills as the way back records
    ``restored``. Nothing but the source can run: the freeze is lifted, as before, not kept
    for a start time the server does not say (the source and target answer alike only to the
    source's check)."""
    sc = replace(SCENARIOS["completes"], start=OLD_CERT)
    w = world(sc)
    w.driver = FailingWrites(w.server, w.driver.config_file, [OSError(errno.ENOSPC, "no")])
    await died_on_full(w, "restored")

    s = w.server
    runner = await started_on_full(w, "restored")
    assert (s.config, s.running) == (OLD_CERT, OLD_CERT)
    assert not s.frozen and "writes are accepted again" in said(runner), (s.ops, said(runner))


class KilledAtRefreeze(CrashingJournal):
    """Killed around the refreeze: ``before``: right after journalling ``freeze again``, before
    the freeze call; ``after``: after the freeze, before its watermark reaches the journal."""

    def __init__(self, path: Path, when: str) -> None:
        super().__init__(path)
        self.when = when

    def event(self, txn: Txn, step: str, what: str, detail: dict[str, Any] | None = None) -> None:
        super().event(txn, step, what, detail)
        if what == "again" and self.when == "before":
            raise Crash("killed before the freeze call")

    def update(self, txn: Txn, **changes: Any) -> Txn:
        again = changes.get("phase") == txn.phase and "watermark" in changes
        if again and self.when == "after":
            raise Crash("killed before the refreeze's record")
        return super().update(txn, **changes)


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_kill_around_the_refreeze_still_lets_the_switch_complete(
    when: str, world: Callable[..., World]
) -> None:
    """s34 review M2 (ii): resumed past its freeze with the server unfrozen and a write taken,
    the agent is killed again around its refreeze. ``after`` (between the freeze and its
    record): the next start found the server frozen, kept the old watermark and rolled back at
    the verify ("write watermark moved from 7 to 8 while frozen"). Now the journal says a
    refreeze was under way, so the freeze is asked again and its watermark journalled."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await crashed_after_frozen(w)
    w.server.watermark += 1  # a write while the agent was away
    killed = KilledAtRefreeze(w.journal_path, when)
    runner = w.runner(killed)
    await runner.resume_all()
    await asyncio.gather(*runner.tasks.values(), return_exceptions=True)
    killed.close()
    assert w.server.frozen is (when == "after")
    _, journal = await w.resume()
    txn = journal.get("r1", sc.kind)
    assert txn is not None
    assert txn.outcome is TxnOutcome.COMPLETED, txn.reason
    assert txn.watermark == w.server.watermark == 8
    refreezes = ["freeze", "freeze"] if when == "after" else ["freeze"]  # then its record
    assert w.server.ops == ["freeze", *refreezes, *sc.ops[1:]]
    # the step begun is not journalled again; a refreeze found made is not announced again
    again = ["freeze again"] if when == "before" else []
    assert journal.writes[: len(again) + 2] == [*again, "frozen", "config_written + restart begin"]
    journal.close()


async def test_a_refreeze_waits_out_the_agent_s_own_shortage(
    world: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """s34 review L1: the refreeze was outside the retry for the agent's own shortage of
    descriptors: one EMFILE from its status call rolled back a switch of a healthy server (and
    the agent may have just restarted because of such a shortage). Now it waits and asks
    again, as the actions do."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await crashed_after_frozen(w)
    real = FakeDriver.status
    calls = 0

    async def status(self: FakeDriver) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return await real(self)

    monkeypatch.setattr(FakeDriver, "status", status)
    _, journal = await w.resume()
    txn = journal.get("r1", sc.kind)
    assert txn is not None
    assert txn.outcome is TxnOutcome.COMPLETED, txn.reason
    assert w.server.ops == ["freeze", "freeze", *sc.ops[1:]]
    assert transaction.SHORTAGE_BACKOFF.delay(0) in w.time.slept
    assert journal.writes[0] == "write_config short"
    journal.close()


@pytest.mark.parametrize("lease", [False, True], ids=["lease-lifted", "lease-holds"])
async def test_a_resumed_scope_switch_stays_frozen_only_while_its_lease_holds(
    lease: bool, world: Callable[..., World]
) -> None:
    """s34 review M3: a switch of a scope freeze (``keep_frozen``) killed after ``frozen``;
    meanwhile the leader lifted the scope freeze (its Unfreeze: server unfrozen, lease
    cleared). Resumed, it froze the server again for its own steps and ended without an
    unfreeze: frozen with no lease, which nothing ever lifts. Now it unfreezes at its end
    unless the journal holds a lease (then the leader or the lease watch lifts it)."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    w.plan = replace(w.plan, keep_frozen=True)
    w.txn = replace(w.txn, plan=w.plan.to_json())
    await crashed_after_frozen(w)
    if lease:  # the scope freeze goes on: frozen, its lease journalled
        w.server.frozen = True
        with contextlib.closing(Journal(w.journal_path)) as journal:
            journal.set_freeze_lease(Lease("r1", w.time.clock() + dt.timedelta(minutes=5), 300))
    _, journal = await w.resume()
    txn = journal.get("r1", sc.kind)
    assert txn is not None
    assert txn.outcome is TxnOutcome.COMPLETED, txn.reason
    assert w.server.frozen is lease
    assert (journal.freeze_lease() is not None) is lease
    if lease:
        assert w.server.ops == list(sc.ops[:-1]) and txn.freeze_ended_at is None
    else:
        assert w.server.ops == ["freeze", "freeze", *sc.ops[1:]]
        assert txn.freeze_ended_at is not None
    journal.close()


class LeaseUnreadOnce(CrashingJournal):
    """A journal whose first read of the freeze lease fails (a damaged page, a locked file)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lease_reads = 0

    def freeze_lease(self) -> Lease | None:
        self.lease_reads += 1
        if self.lease_reads == 1:
            raise JournalError("journal: disk I/O error")
        return super().freeze_lease()


async def test_a_scope_switch_that_cannot_read_its_lease_stays_frozen_and_asks_again(
    world: Callable[..., World],
) -> None:
    """Whether a lease holds is unknown: the scope switch neither unfreezes (the leader may
    count the node frozen) nor fails its last step (it would roll back a verified switch); it
    waits and reads again, as after an unfreeze that failed."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    w.plan = replace(w.plan, keep_frozen=True)
    w.txn = replace(w.txn, plan=w.plan.to_json())
    journal = LeaseUnreadOnce(w.journal_path)
    journal.set_freeze_lease(Lease("r1", w.time.clock() + dt.timedelta(minutes=5), 300))
    done = await w.run(journal)
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    # (A third read: the look once the outcome is journalled, ``Runner._lift_left_freeze``.)
    assert journal.lease_reads == 3 and w.time.slept == [transaction.UNFREEZE_BACKOFF.delay(1)]
    assert w.server.ops == list(sc.ops[:-1]) and w.server.frozen
    journal.close()


class LeaseNeverRead(CrashingJournal):
    """A journal whose reads of the freeze lease all fail (a damaged page, for good)."""

    def freeze_lease(self) -> Lease | None:
        raise JournalError("journal: disk I/O error")


async def test_a_scope_switch_that_never_reads_its_lease_unfreezes_after_the_longest_lease(
    world: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 1 of s34, L3: a lease that can never be read kept the switch waiting, frozen,
    for ever (the transaction unfinished, so nothing else lifts it). It waits the longest lease
    an agent grants (any lease journalled before has run out by then), then unfreezes, logged."""
    warned: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(transaction.log, "warning", lambda event, **kw: warned.append((event, kw)))
    sc = SCENARIOS["completes"]
    w = world(sc)
    w.plan = replace(w.plan, keep_frozen=True)
    w.txn = replace(w.txn, plan=w.plan.to_json())
    journal = LeaseNeverRead(w.journal_path)
    started = w.time.clock()
    done = await asyncio.wait_for(w.run(journal), 60)
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert w.server.ops == list(sc.ops) and not w.server.frozen
    waited = w.time.clock() - started
    limit = transaction.LEASE_UNREAD_LIMIT
    assert limit <= waited < limit + dt.timedelta(seconds=transaction.UNFREEZE_BACKOFF.cap + 1)
    (unfrozen,) = [kw for event, kw in warned if event == "txn.lease_unread_unfreeze"]
    assert unfrozen["unread_seconds"] >= limit.total_seconds() and "I/O" in unfrozen["error"]
    journal.close()


class LeaseNeverReadClockBack(LeaseNeverRead):
    """As ``LeaseNeverRead``; the node's wall clock steps back an hour at the second read
    (after the wait began)."""

    def __init__(self, path: Path, time: FakeTime) -> None:
        super().__init__(path)
        self.time = time
        self.reads = 0

    def freeze_lease(self) -> Lease | None:
        self.reads += 1
        if self.reads == 2:
            self.time.now -= dt.timedelta(hours=1)
        return super().freeze_lease()


async def test_the_wait_for_an_unread_lease_is_elapsed_time(
    world: Callable[..., World],
) -> None:
    """Clock audit s35 A (step 5), review 2 F4 of s34: a restarted agent's scope switch that
    never reads its lease waits the longest lease, measured as two wall-clock readings: a step
    back of the clock in between stretched the wait (and the practice's freeze) by the step."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    w.plan = replace(w.plan, keep_frozen=True)
    w.txn = replace(w.txn, plan=w.plan.to_json())
    journal = LeaseNeverReadClockBack(w.journal_path, w.time)
    started = w.time.monotonic()
    done = await asyncio.wait_for(w.run(journal), 60)
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert not w.server.frozen
    waited = w.time.monotonic() - started
    limit = transaction.LEASE_UNREAD_LIMIT.total_seconds()
    assert limit <= waited < limit + transaction.UNFREEZE_BACKOFF.cap + 1
    journal.close()


async def test_a_scope_switch_begun_after_its_lease_was_lifted_unfreezes_at_its_end(
    world: Callable[..., World],
) -> None:
    """s34 review M3, the same end state without a crash: a switch of a scope freeze begins
    after the scope freeze was lifted (its lease cleared); it freezes for its own steps, and
    must not leave that freeze behind with no lease to bound it."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    w.plan = replace(w.plan, keep_frozen=True)
    w.txn = replace(w.txn, plan=w.plan.to_json())
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert w.server.ops == list(sc.ops) and not w.server.frozen
    journal.close()


_OPS_AT: dict[tuple[str, str], list[int]] = {}


async def ops_at_each_write(name: str, layout: str, world: Callable[..., World]) -> list[int]:
    """How many server operations the scenario had made at each of its journal writes, without
    a crash (run once per scenario and layout)."""
    if (name, layout) not in _OPS_AT:
        w = world(SCENARIOS[name], layout)
        journal = CrashingJournal(w.journal_path)
        ops_at: list[int] = []
        journal.after_write = lambda: ops_at.append(len(w.server.ops))
        await w.run(journal)
        journal.close()
        assert tuple(journal.writes) == w.writes
        _OPS_AT[name, layout] = ops_at
    return _OPS_AT[name, layout]


# --- a journal written by tlsroll 0.1.0 --------------------------------------------------------

PREVIOUS = Path(__file__).parent / "data" / "previous_layout" / "journal.sql"


async def test_a_transaction_of_0_1_0_on_its_way_back_resumes(tmp_path: Path) -> None:
    """0.1.0 kept failed_phase and restart_needed in the plan: migration 2 moves them to their
    columns. r1 (from the file) failed at verify and has its source back: it needs the restart;
    r2 (the same with restart_needed false) must not restart."""
    path = tmp_path / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(PREVIOUS.read_text())
        db.execute(
            "INSERT INTO txns SELECT 'r2', kind, epoch, phase, outcome, reason, watermark,"
            " started_at, ended_at, freeze_started_at, freeze_ended_at, restart_seconds,"
            " old_url, new_url, cert_fingerprint,"
            " json_set(plan, '$.restart_needed', json('false'))"
            " FROM txns WHERE rollout_id = 'r1'"
        )
        db.commit()

    journal = Journal(path)
    r1, r2 = (journal.get(r, TxnKind.SWITCH) for r in ("r1", "r2"))
    assert r1 is not None and r2 is not None
    assert (r1.phase, r1.failed_phase, r1.restart_needed) == (Phase.RESTORED, Phase.RESTARTED, True)
    assert (r2.phase, r2.failed_phase, r2.restart_needed) == (
        Phase.RESTORED,
        Phase.RESTARTED,
        False,
    )
    for txn in (r1, r2):
        assert "failed_phase" not in txn.plan and "restart_needed" not in txn.plan
        assert txn.plan["target_fingerprint"] == "sha256:" + "6" * 64  # the rest is kept
    r0 = journal.get("r0", TxnKind.SWITCH)
    assert r0 is not None and r0.outcome is TxnOutcome.COMPLETED
    assert (r0.failed_phase, r0.restart_needed) == (None, None)
    assert [t.rollout_id for t in journal.unfinished()] == ["r1", "r2"]

    time_ = FakeTime()
    for txn, ops in ((r1, ["restart", "unfreeze"]), (r2, ["unfreeze"])):
        # The source config is back on disk; the server still runs the target (r1) or already
        # the source (r2), frozen. The plan's CA file (/x/ca.pem) is gone: not needed for http.
        running = TARGET if txn.restart_needed else SOURCE
        server = FakeServer(config=SOURCE, running=running, frozen=True)
        runner = Runner(
            journal,
            FakeDriver(server, tmp_path / "server.toml"),
            time_.clock,
            checks=fake_checks(server, "127.0.10.2"),
            sleep=time_.sleep,
        )
        done = await runner.run(txn)
        assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason
        assert done.reason == "verify: no answer"
        assert server.ops == ops
        assert (server.running, server.frozen) == (SOURCE, False)
    journal.close()


# --- no blocking work on the event loop --------------------------------------------------------


def on_the_loop(blocking: list[str], name: str) -> None:
    """Note ``name`` if it is called on the event loop's thread (where it would block every
    other task: the gRPC server, the heartbeats, the freeze lease)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # a worker thread: fine
    blocking.append(name)


class WatchedJournal(CrashingJournal):
    def __init__(self, path: Path, blocking: list[str]) -> None:
        super().__init__(path)
        self.blocking = blocking

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name not in {"get", "unfinished", "create", "event", "update", "fail", "complete"}:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            on_the_loop(self.blocking, f"journal.{name}")
            return attr(*args, **kwargs)

        return call


class WatchedDriver(FakeDriver):
    def __init__(self, server: FakeServer, config_file: Path, blocking: list[str]) -> None:
        super().__init__(server, config_file)
        self.blocking = blocking

    def read_config(self) -> bytes:
        on_the_loop(self.blocking, "driver.read_config")
        return super().read_config()

    def write_config(self, data: bytes) -> None:
        on_the_loop(self.blocking, "driver.write_config")
        super().write_config(data)


@pytest.fixture
def watched_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Reading and writing files (the plan's config files, the CA, the backup) noted too."""
    blocking: list[str] = []
    read_bytes, write_atomic = Path.read_bytes, fsutil.write_atomic

    config_read = ConfigFile.read

    def read(path: Path) -> bytes:
        on_the_loop(blocking, f"read {path.name}")
        return read_bytes(path)

    def read_config(path: Path) -> bytes:  # (it opens the file itself, not by read_bytes)
        on_the_loop(blocking, f"read {path.name}")
        return config_read(path)

    def write(path: Path, data: bytes, mode: int = 0o644) -> None:
        on_the_loop(blocking, f"write {path.name}")
        write_atomic(path, data, mode)

    monkeypatch.setattr(Path, "read_bytes", read)
    monkeypatch.setattr(ConfigFile, "read", staticmethod(read_config))
    monkeypatch.setattr(transaction, "write_atomic", write)
    return blocking


@pytest.mark.parametrize("name", ["completes", "restart_fails", "way_back_fails"])
async def test_the_runner_never_blocks_the_event_loop(
    name: str, world: Callable[[Scenario], World], watched_files: list[str]
) -> None:
    """Journal, files and driver config all run in worker threads, under asyncio's debug mode
    (which also refuses a worker thread touching the loop). The outside checks here are the
    fakes (``fake_checks``), so this says nothing of the real ones: ``tlsroll.probe`` runs on
    the loop by design, and on a miss of its context cache (a CA it has not seen, as for a
    switch resumed after a restart) builds an ``SSLContext`` there, about a millisecond."""
    sc = SCENARIOS[name]
    w = world(sc)
    blocking = watched_files
    journal = WatchedJournal(w.journal_path, blocking)
    driver = WatchedDriver(w.server, w.driver.config_file, blocking)
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    try:
        runner = Runner(
            journal,
            driver,
            w.time.clock,
            checks=fake_checks(w.server),
            sleep=w.time.sleep,
        )
        txn = await asyncio.to_thread(journal.create, w.txn)
        runner.start(txn)
        assert await runner.resume_all() == [txn]  # already running: not started twice
        await asyncio.gather(*runner.tasks.values())
    finally:
        loop.set_debug(False)
    assert blocking == []
    assert tuple(journal.writes) == sc.writes
    w.assert_ended_well(journal)
    journal.close()


async def test_verify_reads_the_staged_ca_before_the_freeze(
    world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: verify read the CA file in a worker-thread hop of its own, then in the https
    probe's thread, inside every switch's freeze window. The probes run on the event loop now
    and the CA is read with the switch's staging, before the freeze: the verify hands nothing
    to a thread, and the probe still gets the staged CA."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    hops = count_thread_hops(monkeypatch)
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)  # the fake https probe asserts the CA it gets
    assert w.assert_ended_well(journal) == done
    assert "read_file" not in hops, hops


async def test_a_resumed_verify_reads_the_ca_in_a_thread(
    world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switch resumed after the agent stopped before its verify was not staged by this
    process: its verify reads the CA itself, in a worker thread, and still trusts it. (Stopped
    before the verify's record, which carries the restart's, it restarts again first.)"""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await crash_after(w, "config_written")
    hops = count_thread_hops(monkeypatch)
    pending, journal = await w.resume()
    assert len(pending) == 1
    w.assert_ended_well(journal)
    assert "read_file" in hops, hops
    journal.close()


async def test_a_resumed_verify_whose_ca_is_a_fifo_rolls_back_in_one_line(
    world: Callable[[Scenario], World],
) -> None:
    """Session 51's review: the CA a resumed switch's verify reads itself (``plan.ca_file``)
    made a FIFO: the read waited for a writer for ever, and the switch never ended (a driver
    whose server does not read the CA itself, a template's, restarts fine on it). Now the
    verify fails with one line naming the file and what it is, and the switch rolls back."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    await crash_after(w, "config_written")
    w.plan.ca_file.unlink()
    os.mkfifo(w.plan.ca_file, 0o600)
    try:
        pending, journal = await asyncio.wait_for(w.resume(), 30)  # before: never
    finally:
        with contextlib.suppress(OSError):  # a reader blocked on it (before) let go
            os.close(os.open(w.plan.ca_file, os.O_WRONLY | os.O_NONBLOCK))
    assert len(pending) == 1
    txn = journal.get("r1", sc.kind)
    assert txn is not None
    assert txn.outcome is TxnOutcome.ROLLED_BACK, txn.reason
    assert f"{w.plan.ca_file} is not a regular file (a FIFO)" in txn.reason, txn.reason
    assert txn.reason.startswith("verify:") and "\n" not in txn.reason, txn.reason
    assert (w.server.running, w.server.frozen) == (SOURCE, False)
    journal.close()


@pytest.mark.parametrize(
    ("ca_pem", "why"),
    [
        (b"not a CA", "no start line"),
        (b"", "Empty certificate data"),
        (b"\xffnot ascii", "bytes that are not ASCII"),
    ],
)
async def test_a_staged_ca_the_tls_library_refuses_rolls_back_naming_the_ca_file(
    world: Callable[[Scenario], World], ca_pem: bytes, why: str
) -> None:
    """Review of session 72: a CA file the TLS library takes no context from at the staging
    (changed on disk after its Stage checked it) is let pass there (``probe.prepare_https``);
    the verify's real check then raised ssl's words alone, "verify: no start line: cadata does
    not contain a certificate (_ssl.c:4020) (errno 0, ?)", naming neither the file nor that
    it is the CA. Now the switch rolls back, at once, in one line naming the CA file. Review
    s72 (L): the http check begun beside it is cancelled, and awaited, before the way back
    begins (it ran on, looking at the server while the way back changed it)."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    w.plan.ca_file.write_bytes(ca_pem)
    journal = CrashingJournal(w.journal_path)
    runner = w.runner(journal)
    beside: list[list[str] | None] = []  # per check begun beside https: the ops at its cancel

    def hung_once(real: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def check(*args: Any) -> Any:
            if beside:
                return await real(*args)
            beside.append(None)
            try:
                await asyncio.sleep(60)  # (the server slow to answer it)
            except asyncio.CancelledError:
                beside[0] = list(w.server.ops)
                raise
            return await real(*args)

        return check

    checks = runner.checks
    runner.checks = replace(
        checks,
        check_https=probe.check_https,
        check_http=hung_once(checks.check_http),
        port_open=hung_once(checks.port_open),
    )
    txn, staging = await begin_as_the_servicer(w, runner, journal)
    staged = await asyncio.wrap_future(staging)
    assert staged is not None and staged.ca_pem == ca_pem  # the staging let it pass
    done = await runner.run(txn, begun=next_action(Phase.STARTED), staged=staging)
    assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason
    # Review s72 (L): the check begun beside the https one was cancelled (and awaited) before
    # the way back touched the server, not left looking at it mid-rollback.
    assert beside == [["freeze", "write_config target", "restart"]], beside
    assert done.reason.startswith(f"verify: {w.plan.ca_file}: not a CA certificate"), done.reason
    assert why in done.reason and "\n" not in done.reason, done.reason
    assert done.failed_phase is not None and "errno 0" not in done.reason
    assert w.time.slept == []  # no attempt again: a CA does not heal
    assert (w.server.running, w.server.config, w.server.frozen) == (SOURCE, SOURCE, False)
    journal.close()


def _release_fifo(fifo: Path) -> None:
    """A reader blocked on ``fifo`` (a plain read, before) let go: a writer opened and closed
    at once gives it an end of file, so that the test (and its store thread) can end."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


_T = TypeVar("_T")


async def _ended_by_itself(run: Coroutine[Any, Any, _T], fifo: Path) -> _T:
    """``run``'s result, which must end within 30 s by itself (a plain read of ``fifo`` waited
    for a writer for ever: the FIFO is then let go, so that ``run`` ends and the test fails,
    rather than cancelled, which waits on the store's thread too)."""
    task = asyncio.ensure_future(run)
    try:
        ended, _ = await asyncio.wait({task}, timeout=30)
    finally:
        _release_fifo(fifo)
    result = await asyncio.wait_for(task, 30)
    assert ended, f"it waited on the FIFO {fifo}"
    return result


async def _store_thread_answers(journal: Journal) -> None:
    """The store's thread is free: a journal read on it ends (a FIFO's endless read on it
    held every later call of the agent)."""
    assert await asyncio.wait_for(dbthread.run(journal.get, "r1", TxnKind.SWITCH), 10)


async def test_an_earlier_releases_target_file_made_a_fifo_rolls_the_switch_back_in_one_line(
    world: Callable[..., World],
) -> None:
    """Session 52 (review of 1ff7d01): a switch of an earlier release keeps its target in its
    plan's ``new_config_file``, which the config write reads on the store's thread. Made a
    FIFO, a plain read waited for a writer for ever (the switch never ended, nor any later
    call). Now the write fails with one line naming the file and what it is, and the switch
    rolls back to its source."""
    sc = SCENARIOS["completes"]
    w = world(sc, "files")
    w.plan.new_config_file.unlink()
    os.mkfifo(w.plan.new_config_file, 0o600)
    journal = CrashingJournal(w.journal_path)
    done = await _ended_by_itself(w.run(journal), w.plan.new_config_file)  # before: never
    assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason
    assert done.reason.startswith("write_config: "), done.reason
    assert f"{w.plan.new_config_file} is not a regular file (a FIFO)" in done.reason, done.reason
    assert "\n" not in done.reason and "Traceback" not in done.reason
    assert (w.server.running, w.server.config, w.server.frozen) == (SOURCE, SOURCE, False)
    assert "write_config target" not in w.server.ops
    await _store_thread_answers(journal)
    journal.close()


async def test_an_earlier_releases_backup_file_made_a_fifo_fails_the_way_back_in_one_line(
    world: Callable[..., World],
) -> None:
    """Session 52 (review of 1ff7d01): a switch of an earlier release keeps its source in its
    plan's ``backup_file``, which the way back (``_put_source``, on the store's thread) reads.
    Made a FIFO after the config write (the agent stopped there), a plain read waited for a
    writer for ever: the rollback never ended, nor any later call. Now the restore fails with
    one line naming the file and what it is (each attempt), and the transaction ends failed
    (the node needs the admin: its source cannot be read)."""
    sc = SCENARIOS["restart_fails"]
    w = world(sc, "files")
    await crash_after(w, "config_written")
    assert w.plan.backup_file.read_bytes() == SOURCE
    w.plan.backup_file.unlink()
    os.mkfifo(w.plan.backup_file, 0o600)
    pending, journal = await _ended_by_itself(w.resume(), w.plan.backup_file)  # before: never
    assert len(pending) == 1
    txn = journal.get("r1", sc.kind)
    assert txn is not None
    assert txn.outcome is TxnOutcome.FAILED, txn.reason
    said = f"; then restore_config: {w.plan.backup_file} is not a regular file (a FIFO)"
    assert txn.reason.startswith("restart: ") and said in txn.reason, txn.reason
    assert "\n" not in txn.reason and "Traceback" not in txn.reason
    assert w.server.config == BROKEN  # nothing was written from the FIFO
    assert "write_config source" not in w.server.ops
    await _store_thread_answers(journal)
    journal.close()


@pytest.mark.parametrize("name", ["completes", "verify_fails"])
async def test_the_verify_begins_while_the_record_of_the_restart_is_written(
    name: str, world: Callable[[Scenario], World]
) -> None:
    """Issue 15: the record of ``restarted`` (which carries the verify's "begin") was written
    before the verify began, a journal write inside every freeze window. A verify only looks,
    so it begins with that write now; its outcome is journalled only after it, as before (the
    journal's writes, and the server's operations, are the scenario's)."""
    sc = SCENARIOS[name]
    w = world(sc)
    looked = threading.Event()
    waited: list[bool] = []
    checks = fake_checks(w.server)

    async def check_https(*args: Any) -> str | None:
        looked.set()
        return await checks.check_https(*args)

    async def check_http(*args: Any) -> str | None:
        looked.set()
        return await checks.check_http(*args)

    class Watching(CrashingJournal):
        def update(self, txn: Txn, **changes: Any) -> Txn:
            passed: Passed | None = changes.get("passed")
            # (the switch's restarted goes in the write of its verify's outcome: ``Passed``)
            phase = passed.changes["phase"] if passed is not None else changes["phase"]
            if phase in (Phase.RESTARTED, Phase.RB_RESTARTED):
                waited.append(looked.wait(10))  # the verify's probe, called meanwhile
                looked.clear()
            return super().update(txn, **changes)

    def runner(journal: Journal) -> Runner:
        return Runner(
            journal,
            w.driver,
            w.time.clock,
            checks=replace(checks, check_https=check_https, check_http=check_http),
            sleep=w.time.sleep,
        )

    # A method of the World replaced for this test (its runner, with the checks above).
    w.runner = runner  # type: ignore[method-assign]
    journal = Watching(w.journal_path)
    done = await w.run(journal)
    assert w.assert_ended_well(journal) == done
    assert waited and all(waited), waited
    assert tuple(journal.writes) == w.writes
    assert tuple(w.server.ops) == sc.ops


def switch_events(journal: Journal) -> list[tuple[str, str, str]]:
    """The switch's journal events: (step, what, at), in the order written."""
    return [(e["step"], e["what"], e["at"]) for e in journal.events("r1") if e["kind"] == "switch"]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_switch_journals_its_restart_with_its_verify_in_one_write_when_it_ended(
    layout: str, world: Callable[..., World]
) -> None:
    """Issue 15 (session 71): the record of ``restarted`` was a write of its own (a commit and
    its fsync inside every freeze window), which the verify's outcome waited for: on a busy
    disk it outlasted the verify (13 ms after it, in a bench run under load). It goes in the
    write of the verify's outcome now (``Runner._defers``): one write fewer, the journal's
    events as before and in the same order, the restart's end stamped when the restart
    ended (before the verify looked), not when it was written."""
    sc = SCENARIOS["completes"]
    w = world(sc, layout)
    looked: list[str] = []
    checks = fake_checks(w.server)

    async def check_https(*args: Any) -> str | None:
        looked.append(dt.datetime.now(dt.UTC).isoformat())
        return await checks.check_https(*args)

    def runner(journal: Journal) -> Runner:
        return Runner(
            journal,
            w.driver,
            w.time.clock,
            checks=replace(checks, check_https=check_https),
            sleep=w.time.sleep,
        )

    w.runner = runner  # type: ignore[method-assign]
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)
    assert w.assert_ended_well(journal) == done
    assert "restarted + verify begin, verified + unfreeze begin" in journal.writes
    assert not any(
        label.startswith("restarted") and "verified" not in label for label in journal.writes
    )
    events = switch_events(journal)
    steps = [(step, what) for step, what, _ in events]
    i = steps.index(("restart", "begin"))
    assert steps[i:] == [
        ("restart", "begin"),
        ("restarted", "end"),
        ("verify", "begin"),
        ("verified", "end"),
        ("unfreeze", "begin"),
        ("completed", "end"),
    ]
    at = {(step, what): when for step, what, when in events}
    assert at[("restarted", "end")] == at[("verify", "begin")] <= looked[0]
    assert looked[-1] <= at[("verified", "end")]
    journal.close()


async def test_killed_after_its_restart_before_the_verify_s_record_a_switch_restarts_again(
    world: Callable[..., World],
) -> None:
    """The crash between the two steps whose records now go in one write (``Runner._defers``):
    killed after the restart, before that write reached the file, the agent finds the journal
    at ``config_written`` with the restart begun (as when killed during the restart): the
    server, still frozen, runs the target no verify has passed. Resumed, it restarts the
    server again, verifies, and only then unfreezes it, journalling each step before the next
    action: no write is taken on an unverified config, none is refused for good."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    at = next(n for n, label in enumerate(w.writes, 1) if label.startswith("restarted"))
    first = CrashingJournal(w.journal_path, at, lost=True)
    with pytest.raises(Crash, match=f"^{re.escape(w.writes[at - 1])}$"):
        await w.run(first)
    first.close()
    s = w.server
    assert (s.running, s.frozen) == (sc.target, True), s.ops
    assert s.ops == ["freeze", "write_config target", "restart"]
    assert w.row()["phase"] == "config_written"
    checked: list[list[str]] = []
    checks = fake_checks(s)

    async def check_https(*args: Any) -> str | None:
        checked.append(list(s.ops))  # what the server had been through when it was looked at
        return await checks.check_https(*args)

    def runner(journal: Journal) -> Runner:
        return Runner(
            journal,
            w.driver,
            w.time.clock,
            checks=replace(checks, check_https=check_https),
            sleep=w.time.sleep,
        )

    w.runner = runner  # type: ignore[method-assign]
    pending, journal = await w.resume()
    assert [t.phase for t in pending] == [Phase.CONFIG_WRITTEN]
    w.assert_ended_well(journal)
    assert s.ops == ["freeze", "write_config target", "restart", "restart", "unfreeze"]
    assert checked == [["freeze", "write_config target", "restart", "restart"]]  # then unfrozen
    assert journal.writes == [
        "restarted + verify begin, verified + unfreeze begin",
        "completed + live",
    ]
    steps = [(step, what) for step, what, _ in switch_events(journal)]
    restarts = [n for n, step in enumerate(steps) if step == ("restart", "begin")]
    assert len(restarts) == 1, steps  # resumed with the restart begun: not journalled again
    assert steps[restarts[0] :] == [
        ("restart", "begin"),  # the first agent's, the last event it journalled
        ("restarted", "end"),
        ("verify", "begin"),
        ("verified", "end"),
        ("unfreeze", "begin"),
        ("completed", "end"),
    ], steps
    journal.close()


class FileDriver(FakeDriver):
    """The fake server with its config in its file, written the real drivers' way (the base
    class's ``write_config``: staged beside the live file, then committed); every write of the
    live config is an op, as the fake's."""

    write_config = Driver.write_config

    def __init__(self, server: FakeServer, config_file: Path) -> None:
        super().__init__(server, config_file)
        config_file.write_bytes(server.config)
        self.stagings: list[StagedConfig] = []
        self.commits: list[StagedConfig] = []

    def stage_config(self, data: bytes) -> StagedConfig:
        staged = super().stage_config(data)
        self.stagings.append(staged)
        return staged

    def commit_config(self, staged: StagedConfig) -> None:
        self.commits.append(staged)
        super().commit_config(staged)
        self.server.config = self.config_file.read_bytes()
        self.server.ops.append(f"write_config {NAMES.get(self.server.config, '?')}")


def counted_hand_offs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every hand-off to a worker thread from now on: (the thread, the function's name)."""
    hops: list[tuple[str, str]] = []
    to_thread, store = asyncio.to_thread, dbthread.run

    async def counting(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(("default", getattr(fn, "__name__", repr(fn))))
        return await to_thread(fn, *args, **kwargs)

    async def on_store(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(("store", getattr(fn, "__name__", repr(fn))))
        return await store(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    monkeypatch.setattr(dbthread, "run", on_store)
    return hops


async def test_a_switch_hands_its_journal_and_config_to_one_thread_a_hop_per_step(
    world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: every journal write and the config write of a switch was a hop of its own to
    the default executor, whose idle threads woke each other for each (about 80 context
    switches per switch). They run on the store's one thread now (``tlsroll.dbthread``), and
    the config write and its record in the same hop as the record of the freeze before it
    (after its commit): a record per step but one; nothing else (the config is staged, and the
    staged CA read, in the servicer's hand-off that creates the transaction; the verify's
    probes run on the event loop, ``tlsroll.probe``)."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    hops = counted_hand_offs(monkeypatch)
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)
    assert w.assert_ended_well(journal) == done
    hops = [(thread, name) for thread, name in hops if name != "create"]  # the servicer's
    default = [name for thread, name in hops if thread == "default"]
    store = [name for thread, name in hops if thread == "store"]
    assert default == [], hops  # the verify's probes (https, http closed) made none either
    # the records of frozen, then the config's write and the record of config_written in the
    # same hop; restarted and verified in one write; completed: 3, where there were 6 to the
    # default executor (and 4 before the restart's record went with the verify's)
    assert store == ["_write_then", "update", "complete"], hops
    assert done.outcome is TxnOutcome.COMPLETED


def _statement(sql: str) -> str:
    """A journal statement as the trace gives it, cut to what it does and to which table."""
    words = sql.split()
    if words[0] in ("INSERT", "DELETE"):  # INSERT INTO t, DELETE FROM t
        return " ".join(words[:3])
    return " ".join(words[:2]) if words[0] in ("UPDATE", "BEGIN", "PRAGMA", "SELECT") else words[0]


async def test_a_switch_s_records_inside_the_freeze_window_are_three_commits_of_few_statements(
    world: Callable[[Scenario], World],
) -> None:
    """Session 73 (journalcpu): every read and write of the journal looked at ``PRAGMA
    data_version`` (for a cache the journal never keeps); each event was an INSERT of its own;
    the record of the restart, carried in the verify's write, updated the row twice; the
    create read the row it was about to insert. Inside the freeze window now: three commits,
    each before the action it must precede (the frozen watermark before the config's write,
    ``config_written`` before the restart, ``verified`` before the unfreeze), one UPDATE of
    the row each and their events, nothing else. SQLite's trace names each row of one
    ``executemany`` as a statement."""
    w = world(SCENARIOS["completes"])
    journal = CrashingJournal(w.journal_path)
    runner = w.runner(journal)
    traced: list[tuple[str, str, int]] = []  # (window, statement, server ops done by then)

    def trace(sql: str) -> None:
        s = w.server
        window = "freeze" if s.frozen else ("after" if "unfreeze" in s.ops else "before")
        traced.append((window, _statement(sql), len(s.ops)))

    journal._db._db.set_trace_callback(trace)
    txn, staged = await begin_as_the_servicer(w, runner, journal)
    done = await runner.run(txn, begun=next_action(Phase.STARTED), staged=staged)
    journal._db._db.set_trace_callback(None)
    assert w.assert_ended_well(journal) == done
    events = ["INSERT INTO events"]
    record = ["BEGIN IMMEDIATE", "UPDATE txns", *events * 2, "COMMIT"]
    inside = [q for window, q, _ in traced if window == "freeze"]
    assert inside == [
        *record,  # frozen, write_config begin
        *record,  # config_written, restart begin
        "BEGIN IMMEDIATE",
        "UPDATE txns",  # restarted and verified: one UPDATE
        *events * 4,  # restarted, verify begin, verified, unfreeze begin
        "COMMIT",
    ], traced
    assert [q for window, q, _ in traced if window == "before"] == [
        "BEGIN IMMEDIATE",
        "INSERT INTO txns",  # no read of the row first: a replay's insert does nothing
        *events * 2,  # create, freeze begin
        "COMMIT",
    ]
    ops = ["freeze", "write_config target", "restart", "unfreeze"]
    assert w.server.ops == ops
    commits = [ran for window, q, ran in traced if window == "freeze" and q == "COMMIT"]
    # persist before act: each commit before the action after it (the server's ops then)
    assert commits == [1, 2, 3], traced
    assert [q for window, q, _ in traced if window == "after"] == [
        "BEGIN IMMEDIATE",
        "INSERT INTO meta",
        "DELETE FROM meta",
        "UPDATE txns",
        *events,
        "COMMIT",
    ]
    journal.close()


def _switch_txn(phase: Phase, epoch: int = 1) -> Txn:
    """A switch transaction of rollout r1 (enable-tls) at ``phase``, for the journal's own tests."""
    return Txn(
        rollout_id="r1",
        kind=TxnKind.SWITCH,
        epoch=epoch,
        phase=phase,
        plan={"change": "enable-tls"},
        started_at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
    )


def test_a_transaction_created_again_is_found_and_nothing_is_written(tmp_path: Path) -> None:
    """``Journal.create`` inserts without reading first (session 73): a transaction already
    journalled under the key (a replay) is returned as journalled, and the write changes
    nothing (no row, no event, no commit)."""
    journal = Journal(tmp_path / "journal.sqlite3")
    first = _switch_txn(Phase.STARTED, epoch=3)
    assert journal.create(first, begin="freeze") == first
    events, commits = journal.events("r1"), journal._db.commits
    again = replace(
        first, epoch=4, plan={"change": "rotate-cert"}, started_at=dt.datetime.now(dt.UTC)
    )
    assert journal.create(again, begin="freeze") == first
    assert journal.events("r1") == events and journal._db.commits == commits
    assert [(e["step"], e["what"]) for e in events] == [("create", "end"), ("freeze", "begin")]
    other = replace(first, kind=TxnKind.ROLLBACK)
    assert journal.create(other) == other == journal.get("r1", TxnKind.ROLLBACK)
    journal.close()


def test_an_event_made_outside_a_journal_write_is_a_loud_bug(tmp_path: Path) -> None:
    """Session 73's L: ``Journal._event`` queues its event for the write under way, which
    inserts it before its commit; one made outside a write (in this thread) was dropped
    silently by the next write's start, or went into another thread's write. It is now a
    RuntimeError, and nothing is queued; inside a write it is recorded as ever."""
    journal = Journal(tmp_path / "journal.sqlite3")
    txn = journal.create(_switch_txn(Phase.STARTED))
    with journal._read() as db, pytest.raises(RuntimeError, match="inside a write"):
        journal._event(db, txn, "restart", "begin", {})
    # another thread's write under way: not this thread's either
    with journal._tx() as db, ThreadPoolExecutor(1) as pool:
        elsewhere = pool.submit(journal._event, db, txn, "restart", "again", {})
        with pytest.raises(RuntimeError, match="inside a write"):
            elsewhere.result(timeout=30)
    journal.event(txn, "restart", "end")  # (inside its own write)
    assert [(e["step"], e["what"]) for e in journal.events("r1")] == [
        ("create", "end"),
        ("restart", "end"),
    ]
    journal.close()


class RowCheckingJournal(CrashingJournal):
    """A journal that, after each write returning a transaction, reads the row back: the
    transaction the runner goes on with must be the row the journal holds (the carried
    UPDATE of session 73 writes two steps' changes at once). It also keeps, after each write,
    whether the freeze window is open (``in_freeze_window``) and what the journal's file says
    of it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.checked: list[str] = []
        self.windows: list[tuple[str, bool, bool]] = []  # (write, in memory, from the file)

    def _write(self, label: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = super()._write(label, write, *args, **kwargs)
        txn = result if isinstance(result, Txn) else args[0]
        row = self.get(txn.rollout_id, txn.kind)
        if isinstance(result, Txn):
            assert result == row, label
            self.checked.append(label)
        assert row is not None
        freeze = [e["what"] for e in self.events(txn.rollout_id) if e["step"] == "freeze"]
        window = (
            not row.finished
            and row.freeze_ended_at is None
            and (row.freeze_started_at is not None or "begin" in freeze or "again" in freeze)
        )
        self.windows.append((label, self.in_freeze_window(), window))
        return result


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_the_transaction_each_record_returns_is_the_row_it_wrote(
    name: str, layout: str, world: Callable[..., World]
) -> None:
    """Session 73 review (revjournal): each record's write returns the transaction the runner
    goes on with, built in memory; the row must say the same after the commit, also where a
    write carries the step before it (``Passed``: the restart with the verify's outcome, one
    UPDATE of both steps' changes). And the freeze window the journal keeps in memory (its
    idle checkpoint held: ``in_freeze_window``, kept by callbacks after each commit) is the
    one the file shows after each write."""
    sc = SCENARIOS[name]
    w = world(sc, layout)
    journal = RowCheckingJournal(w.journal_path)
    done = await w.run(journal)
    assert w.assert_ended_well(journal) == done
    assert journal.checked == [label for label in journal.writes if label != "freeze begin"]
    carried = any(label.startswith("restarted + verify begin, ") for label in journal.checked)
    assert carried == (name in ("completes", "undo", "verify_fails"))  # (a ``Passed`` carried)
    assert [(label, memory) for label, memory, _ in journal.windows] == [
        (label, file) for label, _, file in journal.windows
    ]
    assert any(memory for _, memory, _ in journal.windows)
    assert not journal.in_freeze_window()
    journal.close()


def test_a_field_a_write_and_the_step_it_carries_both_change_is_the_write_s(
    tmp_path: Path,
) -> None:
    """Session 73 review (revjournal): a field both the carried step (``Passed``) and the
    write's own changes name is written as the write's, in the row and in the transaction
    returned; the carried step's other changes and its ``end`` event stay."""
    journal = Journal(tmp_path / "journal.sqlite3")
    txn = journal.create(_switch_txn(Phase.CONFIG_WRITTEN), begin="restart")
    ended = dt.datetime(2026, 1, 2, 0, 0, 5, tzinfo=dt.UTC)
    passed = Passed(
        {"phase": Phase.RESTARTED, "restart_seconds": 1.5, "reason": "carried"}, ended, "verify"
    )
    new = journal.update(txn, passed=passed, phase=Phase.VERIFIED, reason="own", begin="unfreeze")
    assert new == journal.get("r1", TxnKind.SWITCH)
    assert (new.phase, new.restart_seconds, new.reason) == (Phase.VERIFIED, 1.5, "own")
    assert [(e["step"], e["what"]) for e in journal.events("r1")][2:] == [
        ("restarted", "end"),
        ("verify", "begin"),
        ("verified", "end"),
        ("unfreeze", "begin"),
    ]
    journal.close()


def test_a_write_the_disk_refuses_leaves_no_event_no_freeze_window_and_nothing_for_the_next(
    tmp_path: Path,
) -> None:
    """Session 73 review (revjournal): a write's events are queued and inserted at its end
    (``Journal._tx``), the freeze window opened by a callback after its commit. A write the
    disk refuses at that insert (SQLITE_FULL: the file may not grow, ``max_page_count``)
    leaves the journal as it was: no event of it, the row unchanged, no freeze window (no
    checkpoint held for a freeze never made); the next write inserts its own events only."""
    journal = Journal(tmp_path / "journal.sqlite3")
    txn = journal.create(_switch_txn(Phase.STARTED))
    before = journal.events("r1")
    raw = journal._db._db
    pages = int(raw.execute("PRAGMA page_count").fetchone()[0])
    raw.execute(f"PRAGMA max_page_count = {pages}")
    passed = Passed({"phase": Phase.FROZEN, "watermark": 7}, dt.datetime.now(dt.UTC), "freeze")
    with pytest.raises(JournalError, match="full"):  # (the error's event needs new pages)
        journal.fail(txn, "write_config", "x" * 100_000, passed=passed, phase=Phase.ROLLING_BACK)
    assert not journal.in_freeze_window()
    assert journal.events("r1") == before
    assert journal.get("r1", TxnKind.SWITCH) == txn
    raw.execute(f"PRAGMA max_page_count = {pages * 1000}")
    journal.event(txn, "probe", "ok")
    assert [(e["step"], e["what"]) for e in journal.events("r1")][len(before) :] == [
        ("probe", "ok")
    ]
    assert not journal.in_freeze_window()
    journal.update(txn, phase=Phase.STARTED, begin="freeze")
    assert journal.in_freeze_window()
    journal.close()


@pytest.mark.parametrize("name", ["completes", "restart_fails", "freeze_fails", "undo"])
async def test_a_switch_stages_its_target_config_so_that_the_window_holds_only_its_rename(
    name: str, world: Callable[[Scenario], World]
) -> None:
    """Issue 15: the target config's write and fsync were inside the freeze window. It is
    staged (written and fsynced beside the live file) with the transaction's create, before
    the freeze; after the freeze only the rename and the directory's fsync are left. The
    source config is staged with it, so that the way back is a rename too (s38 audit H3: on a
    full disk the way back could not write it whole); a staged config no write took is
    removed."""
    sc = SCENARIOS[name]
    w = world(sc)
    config_file = w.driver.config_file
    w.driver = driver = FileDriver(w.server, config_file)
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)
    assert w.assert_ended_well(journal) == done
    await dbthread.barrier()  # a discarded staging is removed on the store's thread
    writes = [op for op in w.server.ops if op.startswith("write_config")]
    assert len(driver.commits) == len(writes), (driver.commits, writes)
    assert all(staged.file is not None for staged in driver.stagings)
    assert [staged.data for staged in driver.stagings] == [sc.target, sc.start]
    if name == "freeze_fails":  # staged, never committed
        assert writes == []
        assert driver.commits == []
    elif sc.outcome is TxnOutcome.COMPLETED:  # the forward write commits the target staged
        assert driver.commits == driver.stagings[:1]
    else:  # and the way back the source staged with it: no config is written whole
        assert driver.commits == driver.stagings
    assert sorted(p.name for p in config_file.parent.iterdir()) == [config_file.name]


async def begin_as_the_servicer(
    w: World, runner: Runner, journal: Journal, before: Callable[[], object] = lambda: None
) -> tuple[Txn, Future[Staged | None]]:
    """What the servicer's create does in one hand-off to the store's thread (after
    ``before``, there): the transaction journalled with its first step's "begin", and its
    staging queued right behind it (``Runner.stage_next``)."""

    def create() -> tuple[Txn, Future[Staged | None]]:
        before()
        txn = journal.create(w.txn, begin=next_action(Phase.STARTED))
        return txn, runner.stage_next(txn)

    return await dbthread.run(create)


async def test_the_verifys_https_context_is_made_with_the_staging_before_the_freeze(
    world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, session 72: an agent's first https verify made its check's TLS context (the
    CA parsed, OpenSSL's defaults) and ran OpenSSL's first handshake inside the freeze
    window. The switch's staging makes that context now, and begins a handshake with it in
    memory (``probe.prepare_https``), before the freeze call: the check inside the window
    takes the context made then (``httpcheck.trusting``: one per CA) and makes none."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    ca_pem = pki.CertificateAuthority.create().cert_pem
    w.plan.ca_file.write_bytes(ca_pem)
    httpcheck.trusting.cache_clear()
    events: list[str] = []
    client_context = tls.client_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        events.append("context")
        return client_context(*args, **kwargs)

    monkeypatch.setattr(tls, "client_context", counted)
    began = ssl.SSLContext.wrap_bio

    def hello(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        events.append("handshake")
        return began(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "wrap_bio", hello)

    class Watched(FileDriver):
        async def freeze(self, drain_timeout: float) -> int:
            events.append("freeze")
            return await super().freeze(drain_timeout)

        async def unfreeze(self) -> None:
            events.append("unfreeze")
            await super().unfreeze()

    async def check_https(
        address: str, port: int, path: str, ca: bytes, fingerprint: str | None
    ) -> str | None:
        assert ca == ca_pem  # the staging's
        httpcheck.trusting(ca)  # the context ``probe.check_https`` connects with
        events.append("check_https")
        return None

    w.driver = Watched(w.server, w.driver.config_file)
    journal = CrashingJournal(w.journal_path)
    runner = w.runner(journal)
    runner.checks = replace(runner.checks, check_https=check_https)
    txn, staged = await begin_as_the_servicer(w, runner, journal)
    done = await runner.run(txn, begun=next_action(Phase.STARTED), staged=staged)
    assert done.outcome is TxnOutcome.COMPLETED
    assert events == ["context", "handshake", "freeze", "check_https", "unfreeze"]
    httpcheck.trusting.cache_clear()


async def test_a_switch_staged_in_the_next_hand_off_freezes_only_once_its_config_is_staged(
    world: Callable[[Scenario], World],
) -> None:
    """Issue 15: the servicer's create staged the target config (a write and an fsync) in its
    own hand-off to the store's thread. It is staged in the store thread's next hand-off now
    (``Runner.stage_next``), overlapping the runner's work before its freeze call; the freeze
    call waits for it, so that a slow staging (a busy disk's fsync) never lengthens the
    window in which the server takes no writes (review of session 27, M3). A staging that
    waits for a freeze begun meanwhile gives up waiting and says so; the write of the config
    still commits that staging, and the journal's writes and the server's operations are the
    scenario's."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    froze = threading.Event()
    events: list[str] = []

    class SlowStaging(FileDriver):
        async def freeze(self, drain_timeout: float) -> int:
            events.append("freeze")
            froze.set()
            return await super().freeze(drain_timeout)

        def stage_config(self, data: bytes) -> StagedConfig:
            # A slow staging: long enough for a freeze call that did not wait to be made.
            if froze.wait(0.3):
                events.append("a freeze began while staging")
            staged = super().stage_config(data)
            events.append(f"staged {NAMES[data]}")
            return staged

    w.driver = driver = SlowStaging(w.server, w.driver.config_file)
    journal = CrashingJournal(w.journal_path)
    first = next_action(Phase.STARTED)
    runner = w.runner(journal)

    txn, staged = await begin_as_the_servicer(w, runner, journal)
    done = await runner.run(txn, begun=first, staged=staged)
    assert w.assert_ended_well(journal) == done
    assert events == ["staged target", "staged source", "freeze"]
    assert driver.commits == driver.stagings[:1]
    assert tuple(journal.writes) == w.writes
    assert tuple(w.server.ops) == sc.ops


async def test_a_switch_cancelled_before_its_staging_is_done_leaves_nothing_behind(
    world: Callable[[Scenario], World],
) -> None:
    """A switch whose task ends (cancelled, its caller gone) while its staging still waits on
    the store's thread: the staging's config is discarded once it is done, and its CA stays in
    no table of the runner's (it used to be put there, keyed by its path, after the task had
    cleaned up: review of session 27, L3). The freeze never went out."""
    w = world(SCENARIOS["completes"])
    config_file = w.driver.config_file
    release = threading.Event()

    class Blocked(FileDriver):
        def stage_config(self, data: bytes) -> StagedConfig:
            release.wait(10)
            return super().stage_config(data)

    w.driver = driver = Blocked(w.server, config_file)
    journal = CrashingJournal(w.journal_path)
    first = next_action(Phase.STARTED)
    runner = w.runner(journal)

    txn, staged = await begin_as_the_servicer(w, runner, journal)
    task = asyncio.create_task(runner.run(txn, begun=first, staged=staged))
    for _ in range(50):  # to the freeze, which waits for the staging
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    release.set()
    await dbthread.barrier()  # the staging, then its discard
    assert [staged.data for staged in driver.stagings] == [TARGET, SOURCE]
    assert runner._cas == {}
    assert "freeze" not in w.server.ops
    assert sorted(p.name for p in config_file.parent.iterdir()) == [config_file.name]


async def test_a_staging_runs_with_the_context_of_its_caller(
    world: Callable[[Scenario], World],
) -> None:
    """``stage_next`` hands the staging to the store's thread with the caller's context
    variables (the log's bound fields), as ``dbthread.run`` does (review of session 27, L5)."""
    w = world(SCENARIOS["completes"])
    bound: contextvars.ContextVar[str] = contextvars.ContextVar("bound", default="")
    seen: list[str] = []

    class Seeing(FileDriver):
        def stage_config(self, data: bytes) -> StagedConfig:
            seen.append(bound.get())
            return super().stage_config(data)

    w.driver = Seeing(w.server, w.driver.config_file)
    journal = CrashingJournal(w.journal_path)
    first = next_action(Phase.STARTED)
    runner = w.runner(journal)

    txn, staged = await begin_as_the_servicer(w, runner, journal, lambda: bound.set("the caller's"))
    done = await runner.run(txn, begun=first, staged=staged)
    assert w.assert_ended_well(journal) == done
    assert seen == ["the caller's"] * 2  # the target, then the source


def test_a_staging_not_done_yet_fails_loudly_instead_of_hanging_the_store() -> None:
    """Resolved on the store's only thread, a staging must be done already (it was queued
    before); one that is not would hang that thread, and the journal with it, for good: it
    fails at once instead (review of session 27, L4)."""
    with pytest.raises(TimeoutError):
        transaction._staged_now(Future())
    done: Future[Staged | None] = Future()
    done.set_result(None)
    assert transaction._staged_now(done) is None


async def test_an_agent_started_again_removes_the_staged_configs_an_earlier_one_left(
    world: Callable[[Scenario], World],
) -> None:
    """An agent stopped between staging a switch's config and committing it leaves the staged
    file beside the live config; the next start removes it (and nothing else there)."""
    w = world(SCENARIOS["completes"])
    config_file = w.driver.config_file
    w.driver = FileDriver(w.server, config_file)
    left = config_file.with_name(f".{config_file.name}.staged-1")
    left.write_bytes(TARGET)
    # One of an agent that ran as this process's PID before (PID 1 in a container, say).
    config_file.with_name(f".{config_file.name}.staged-{os.getpid()}").write_bytes(TARGET)
    other = config_file.with_name("other.toml")
    other.write_bytes(b"x")
    pending, _journal = await w.resume()
    assert pending == []
    assert sorted(p.name for p in config_file.parent.iterdir()) == ["other.toml", "server.toml"]


def test_two_stagings_never_share_a_file(tmp_path: Path) -> None:
    """Review of session 26: every staging of a process used one name (``.NAME.staged-PID``),
    and a staged config no write took is removed later, on the store's thread: that removal
    could take the next transaction's staged config, and its switch rolled back. Each staging
    has a file of its own now."""
    live = tmp_path / "server.toml"
    live.write_bytes(b"old")
    first = fsutil.stage_atomic(live, b"first", 0o600)
    second = fsutil.stage_atomic(live, b"second", 0o600)
    assert first != second
    first.unlink()  # the first transaction's, never committed
    fsutil.replace_staged(second, live)
    assert live.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.toml"]


class FailingWrites(FakeDriver):
    """The fake whose writes of the target config fail with ``errors``, one each, first."""

    def __init__(self, server: FakeServer, config_file: Path, errors: list[OSError]) -> None:
        super().__init__(server, config_file)
        self.errors = errors

    def write_config(self, data: bytes) -> None:
        if self.errors and data == TARGET:
            raise self.errors.pop(0)
        super().write_config(data)


@pytest.mark.parametrize("short", [False, True])
async def test_a_config_write_made_in_the_freeze_s_hop_fails_as_the_write_step(
    short: bool, world: Callable[[Scenario], World]
) -> None:
    """The config's write runs in the hand-off of the freeze's record: its failure is still the
    write step's (the way back, with ``failed_phase`` frozen), and the agent's own shortage of
    descriptors is still waited out and the write tried again, not rolled back."""
    sc = SCENARIOS["completes"]
    w = world(sc)
    error = OSError(errno.EMFILE if short else errno.ENOSPC, "no")
    w.driver = FailingWrites(w.server, w.driver.config_file, [error])
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)
    if short:
        assert done.outcome is TxnOutcome.COMPLETED, done.reason
        assert w.server.ops == ["freeze", "write_config target", "restart", "unfreeze"]
        steps = [(e["step"], e["what"]) for e in journal.events("r1")]
        assert ("write_config", "short") in steps, steps
    else:
        assert done.outcome is TxnOutcome.ROLLED_BACK
        assert done.failed_phase is Phase.FROZEN
        assert done.reason.startswith("write_config: "), done.reason
        assert w.server.ops == ["freeze", "unfreeze"]


async def test_a_switch_resumed_on_its_way_there_stages_its_source_again(
    world: Callable[[Scenario], World],
) -> None:
    """The agent dies after the target config is written: its next start removes the staged
    files the dead process left (``discard_stale_staged``), the source among them; the
    resumed switch stages the source again, and its way back is still a rename when the disk
    has filled up meanwhile (here at the restart that fails)."""
    sc = SCENARIOS["restart_fails"]
    w = world(sc)
    config_file = w.driver.config_file

    class FillsAtRestart(FileDriver):
        full = False

        def stage_config(self, data: bytes) -> StagedConfig:  # a new file: new blocks
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(config_file))
            return super().stage_config(data)

        async def restart(self) -> None:
            self.full = True
            await super().restart()

    w.driver = driver = FillsAtRestart(w.server, config_file)
    await crash_after(w, "config_written")
    assert [staged.data for staged in driver.stagings] == [BROKEN, SOURCE]
    pending, journal = await w.resume()
    assert [t.rollout_id for t in pending] == ["r1"]
    w.assert_ended_well(journal)
    await dbthread.barrier()
    assert [staged.data for staged in driver.stagings] == [BROKEN, SOURCE, SOURCE]
    assert driver.commits == [driver.stagings[0], driver.stagings[2]]  # no config written whole
    assert sorted(p.name for p in config_file.parent.iterdir()) == [config_file.name]
    journal.close()


class FullDisk(FakeDriver):
    """The fake server on a file system with no room: each write of the source config
    fails with ENOSPC while ``full`` (a count, or None: for good)."""

    def __init__(self, server: FakeServer, config_file: Path, full: int | None) -> None:
        super().__init__(server, config_file)
        self.full = full

    def write_config(self, data: bytes) -> None:
        if data == SOURCE and (self.full is None or self.full > 0):
            if self.full is not None:
                self.full -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.config_file))
        super().write_config(data)


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_the_way_back_waits_for_room_on_a_full_disk(
    layout: str, world: Callable[..., World]
) -> None:
    """s38 audit H3: the way back that could not write the source config (a full disk) tried
    three times in 1.5 s and ended ``failed``, the target config live and the server down. A
    full disk is waited for now (``SPACE_BACKOFF``), each wait journalled, the server left as
    it is meanwhile; then the way back goes on. (This driver writes its config its own way:
    nothing is staged for it, so the way back writes the source, as one of an earlier
    release's transaction does, ``files``.)"""
    sc = SCENARIOS["restart_fails"]
    w = world(sc, layout)
    w.driver = FullDisk(w.server, w.driver.config_file, 5)
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)
    assert w.assert_ended_well(journal) == done
    assert w.server.ops == list(sc.ops)  # the source written once, when there was room
    waits = [e for e in journal.events("r1") if e["what"] == "no_space"]
    assert [(e["step"], json.loads(e["detail"])["retry_in"]) for e in waits] == [
        ("restore_config", wait) for wait in (0.5, 1.0, 2.0, 4.0, 8.0)
    ]
    assert "ENOSPC" in json.loads(waits[0]["detail"])["error"]
    assert w.time.slept == [0.5, 1.0, 2.0, 4.0, 8.0]  # not tried again before each wait
    journal.close()


async def test_a_way_back_that_never_finds_room_fails_after_its_wait(
    world: Callable[[Scenario], World],
) -> None:
    """The disk stays full: the way back waits ``SPACE_WAIT`` seconds in all, not for good,
    then ends ``failed`` with the error (the leader and the admin are told)."""
    sc = SCENARIOS["restart_fails"]
    w = world(sc)
    w.driver = FullDisk(w.server, w.driver.config_file, None)
    journal = CrashingJournal(w.journal_path)
    done = await w.run(journal)
    assert done.outcome is TxnOutcome.FAILED
    assert "restore_config: " in done.reason and "ENOSPC" in done.reason, done.reason
    waited = sum(w.time.slept)
    assert transaction.SPACE_WAIT <= waited < transaction.SPACE_WAIT + transaction.SPACE_BACKOFF.cap
    assert max(w.time.slept) == transaction.SPACE_BACKOFF.cap
    journal.close()


# --- plans: made without gRPC --------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> tuple[Journal, FakeDriver, Path]:
    config_file = tmp_path / "etc" / "server.toml"
    config_file.parent.mkdir()
    journal = Journal(tmp_path / "journal.sqlite3")
    return journal, FakeDriver(FakeServer(), config_file), tmp_path / "txn"


def stage(journal: Journal, driver: FakeDriver, rollout_id: str) -> Path:
    directory = plans.stage_dir(driver, rollout_id)
    key_file = directory / "server.key"
    journal.record_csr(rollout_id, key_file, b"csr")
    journal.record_stage(
        rollout_id,
        directory / "server.pem",
        directory / "ca.pem",
        STAGED_FP,
        dt.datetime(2027, 1, 1, tzinfo=dt.UTC),
    )
    return directory


def test_a_switch_plan_names_the_staged_certificate(
    node: tuple[Journal, FakeDriver, Path],
) -> None:
    journal, driver, txn_dir = node
    with pytest.raises(plans.PlanRefused, match="nothing staged for rollout r1; run Stage"):
        plans.switch_plan(journal, driver, txn_dir, "r1", None)
    assert not txn_dir.exists()

    directory = stage(journal, driver, "r1")
    verifier = password.make_verifier("pw", **password.TEST_PARAMS)
    config, plan, fingerprint = plans.switch_plan(
        journal, driver, txn_dir, "r1", dict(verifier), keep_frozen=True
    )
    verifier_file = directory / "auth-verifier.json"
    assert (
        config
        == (
            f'listen = ["https"]\ncert_file = "{directory / "server.pem"}"\n'
            f'verifier_file = "{verifier_file}"\n'
        ).encode()
    )
    assert fingerprint == STAGED_FP == plan.target_fingerprint
    assert (plan.source_schemes, plan.target_schemes) == (("http",), ("https",))
    # The journal keeps the target config with the transaction: no file of its own (issue 15:
    # two fsyncs and a new inode per switch); the plan still names the file for older readers.
    assert plan.new_config_file == txn_dir / "r1-switch.new" and not txn_dir.exists()
    assert stat.S_IMODE(verifier_file.stat().st_mode) == 0o600
    assert password.verifier_from_json(verifier_file.read_text()) == verifier
    assert plan.backup_file == txn_dir / "r1-switch.old" and not plan.backup_file.exists()
    assert plan.ca_file == directory / "ca.pem" and plan.keep_frozen
    assert plan.live_tls is not None and plan.live_before is None
    assert plan.live_tls["server_url"] == f"https://{ADDRESS}:8443{APP}"
    assert plan.live_tls["verifier_file"] == str(verifier_file)
    assert Plan.from_json(plan.to_json()) == plan


def completed_switch(
    journal: Journal, driver: FakeDriver, txn_dir: Path, layout: str, *, keep_frozen: bool = False
) -> Plan:
    """What a completed switch of rollout r1 (from SOURCE to TARGET) leaves in the journal, with
    its configs in ``layout`` (``LAYOUTS``)."""
    config, plan, _fp = plans.switch_plan(
        journal, driver, txn_dir, "r1", None, keep_frozen=keep_frozen
    )
    assert config  # (rendered: what the fake server runs stands for it, TARGET)
    configs: dict[str, Any] = {"target_config": TARGET, "source_config": SOURCE}
    if layout == "files":  # an earlier release: the backup file, nothing in the row
        txn_dir.mkdir(parents=True, exist_ok=True)
        plan.backup_file.write_bytes(SOURCE)
        configs = {}
    txn = journal.create(
        Txn(
            "r1",
            TxnKind.SWITCH,
            1,
            Phase.VERIFIED,
            plan.to_json(),
            dt.datetime.now(dt.UTC),
            **configs,
        )
    )
    journal.complete(txn, plan.live_tls, phase=Phase.COMPLETED, outcome=TxnOutcome.COMPLETED)
    driver.server.running = driver.server.config = TARGET
    return plan


def test_a_server_on_https_its_journal_never_switched_is_refused_saying_what_to_do(
    node: tuple[Journal, FakeDriver, Path],
) -> None:
    """Review s70 drift M2: the agent's data dir begun again while its server serves https. A
    driver that cannot read the files back from its config (a template's: this fake's, as
    systemd's and exec's) refuses rotate-cert, change-password and the way back in one line
    naming the config and what to do by hand; nothing is written. (The reference server's
    plans start from its config: tests/test_level_based.py.)"""
    journal, driver, txn_dir = node
    driver.server.running = driver.server.config = TARGET
    verifier = dict(password.make_verifier("pw", **password.TEST_PARAMS))
    stage(journal, driver, "r2")
    by_hand = f"cannot read them from {driver.config_file}: set the server back to http by hand"
    with pytest.raises(plans.PlanRefused, match=by_hand):
        plans.rotate_plan(journal, driver, txn_dir, "r2", None)
    with pytest.raises(plans.PlanRefused, match=by_hand):
        plans.password_plan(journal, driver, txn_dir, "p1", verifier)
    with pytest.raises(plans.PlanRefused) as refused:
        plans.rollback_plan(journal, driver, txn_dir, "b1", undoes="")
    said = str(refused.value)
    assert said.startswith("this node was never switched from http to https"), said
    assert f"set {driver.config_file} back to http by hand and restart the server" in said
    assert "\n" not in said
    assert driver.server.config == TARGET and not driver.server.ops
    # Session 71, reenrol: the preflight's checks (`tlsroll plan`, a start) say the same line
    # up front, read-only, for the changes that would be refused; enable-tls (which renders
    # afresh) and a change not named (a leader of an earlier release) are not blocked.
    facts = driver.facts()
    for change in (Change.ROTATE_CERT, Change.CHANGE_PASSWORD):
        problem = plans.plan_problem(journal, driver, facts, change, way_back=False)
        assert problem is not None and by_hand in problem, problem
    assert plans.plan_problem(journal, driver, facts, None, way_back=True) == said
    assert plans.plan_problem(journal, driver, facts, Change.ENABLE_TLS, way_back=False) is None
    assert plans.plan_problem(journal, driver, facts, None, way_back=False) is None
    assert driver.server.config == TARGET and not driver.server.ops
    # Review s71 revplans: finalize plans from the files the config names too (s71 wayback:
    # ``served_live``), so a dual node whose agent lost its journal is refused at its switch:
    # its plan says so up front, as for rotate-cert and change-password.
    dual = b'listen = ["http", "https"]\n'
    driver.server.running = driver.server.config = dual
    with pytest.raises(plans.PlanRefused, match=by_hand):
        plans.finalize_plan(journal, driver, txn_dir, "f1", None)
    problem = plans.plan_problem(journal, driver, driver.facts(), Change.FINALIZE, way_back=False)
    assert problem is not None and by_hand in problem, problem
    assert driver.server.config == dual and not driver.server.ops


@pytest.mark.parametrize("layout", LAYOUTS)
def test_password_and_rollback_plans_need_what_they_change(
    node: tuple[Journal, FakeDriver, Path], layout: str
) -> None:
    """A rollback goes back to the switch's source, whether the journal holds it (this
    release) or the switch's backup file does (a switch of an earlier release)."""
    journal, driver, txn_dir = node
    verifier = dict(password.make_verifier("pw", **password.TEST_PARAMS))
    with pytest.raises(plans.PlanRefused, match="not on https here; run enable-tls first"):
        plans.password_plan(journal, driver, txn_dir, "p1", verifier)
    with pytest.raises(plans.PlanRefused, match="r1 did not switch this node"):
        plans.rollback_plan(journal, driver, txn_dir, "r1")

    # r1 switched this node: what a completed switch leaves in the journal.
    stage(journal, driver, "r1")
    plan = completed_switch(journal, driver, txn_dir, layout)

    config, changed, fingerprint = plans.password_plan(journal, driver, txn_dir, "p1", verifier)
    assert fingerprint == "" and changed.source_schemes == changed.target_schemes == ("https",)
    assert changed.live_before == plan.live_tls
    assert changed.live_tls == {
        **(plan.live_tls or {}),
        "verifier_file": str(plans.stage_dir(driver, "p1") / "auth-verifier.json"),
    }
    assert b"verifier_file" in config
    # Found by review: a template driver renders the whole config from the target, so the
    # live certificate must be named in it (it was "", an https config without a certificate).
    assert plan.live_tls is not None
    assert f'cert_file = "{plan.live_tls["cert_file"]}"'.encode() in config

    config, back, fingerprint = plans.rollback_plan(journal, driver, txn_dir, "r1")
    assert config == SOURCE
    assert back.new_config_file == txn_dir / "r1-rollback.new"
    assert not back.new_config_file.exists()
    assert (back.source_schemes, back.target_schemes) == (("https",), ("http",))
    assert (back.live_tls, back.live_before, fingerprint) == (None, plan.live_tls, "")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_rollback_never_reads_a_backup_file_that_is_not_a_regular_file(
    node: tuple[Journal, FakeDriver, Path], kind: str
) -> None:
    """Review rev51d L7: a switch of an earlier release keeps its source in its backup file,
    which ``source_of`` read with ``read_bytes`` (the transaction reads it with
    ``read_regular``): a FIFO there hung the Rollback for ever, a link to a device made the
    rollback's config what the device gave (``/dev/null``: an empty config). Now the plan is
    refused, naming the file and its kind; nothing is prepared."""
    journal, driver, txn_dir = node
    stage(journal, driver, "r1")
    plan = completed_switch(journal, driver, txn_dir, "files")
    plan.backup_file.unlink()
    if kind == "fifo":
        os.mkfifo(plan.backup_file, 0o600)
    else:
        plan.backup_file.symlink_to("/dev/null")
    what = "a FIFO" if kind == "fifo" else "a character device"
    with pytest.raises(
        plans.PrepareFailed, match=re.escape(f"{plan.backup_file} is not a regular file ({what})")
    ):
        plans.rollback_plan(journal, driver, txn_dir, "r1")
    assert not (txn_dir / "r1-rollback.new").exists()


async def run_rollback(
    journal: Journal,
    driver: Any,
    server: FakeServer,
    built: tuple[bytes, Plan],
    rollout_id: str,
    epoch: int,
    source: bytes,
    deadline: float = 0.0,
) -> Txn:
    """The rollback ``plans.rollback_plan`` built (its config and plan), journalled and run to
    its end by a runner on a fake clock: its transaction as it ended."""
    config, back = built
    time = FakeTime()
    runner = Runner(journal, driver, time.clock, checks=fake_checks(server), sleep=time.sleep)
    rollback = journal.create(
        Txn(
            rollout_id,
            TxnKind.ROLLBACK,
            epoch,
            Phase.STARTED,
            back.to_json(),
            time.clock() + dt.timedelta(seconds=deadline),
            target_config=config,
            source_config=source,
        )
    )
    return await runner.run(rollback)


# --- the scope freeze: a plan that keeps the node frozen ---------------------------------------


async def test_a_rollback_plan_with_keep_frozen_leaves_the_server_frozen(
    node: tuple[Journal, FakeDriver, Path],
) -> None:
    """Found by review: a rollback under ``--freeze scope`` lifted the rollout's freeze at its
    end (its plan had no keep_frozen); the leader lifts it when the rollout ends."""
    journal, driver, txn_dir = node
    stage(journal, driver, "r1")
    completed_switch(journal, driver, txn_dir, "journal", keep_frozen=True)
    server = driver.server
    server.frozen = True  # the leader's scope freeze, bounded by its lease
    journal.set_freeze_lease(Lease("r1", dt.datetime(2026, 11, 30, 12, 5, tzinfo=dt.UTC), 300))

    config, back, _fp = plans.rollback_plan(journal, driver, txn_dir, "r1", keep_frozen=True)
    assert back.keep_frozen and Plan.from_json(back.to_json()) == back
    done = await run_rollback(journal, driver, server, (config, back), "r1", 1, TARGET)

    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert (server.running, server.config, server.frozen) == (SOURCE, SOURCE, True)
    assert server.ops == ["freeze", "write_config source", "restart"]  # no unfreeze
    assert done.freeze_ended_at is None
    journal.close()


EDITED = TARGET + b"queue = 20\n"  # a setting changed by hand since the switch


@pytest.mark.parametrize("edit", ["none", "by hand", "carried over", "rolled back"])
async def test_a_way_back_keeps_the_config_edited_since_tlsroll_wrote_it(
    tmp_path: Path, edit: str
) -> None:
    """Review rev58a H2: the way back puts back the config from before the switch byte for
    byte, undoing any edit made by hand since. A live config that is no longer what tlsroll
    wrote (``plans.edited_since``: by hand since the switch; or before a later change that
    carried the edit over, as the reference server's render keeps every other setting) is kept
    beside it first, with the config's mode, and the transaction's reason says where. One as
    tlsroll left it (a later change rolled back puts back what it found) keeps nothing."""
    config_file = tmp_path / "etc" / "server.toml"
    config_file.parent.mkdir()
    journal = Journal(tmp_path / "journal.sqlite3")
    server = FakeServer()
    driver = FileDriver(server, config_file)
    # The reference server's: a later change's render carries the live config's settings, an
    # edit found with them (``plans.edited_since``; a template driver's is
    # tests/test_way_back_edit_detection.py's).
    driver.config_decides = True
    config_file.chmod(0o640)
    txn_dir = tmp_path / "txn"
    stage(journal, driver, "r1")
    switched = completed_switch(journal, driver, txn_dir, "journal")
    live = {"none": TARGET, "rolled back": TARGET}.get(edit, EDITED)
    if edit in ("carried over", "rolled back"):  # a later change (rotate-cert, say) of r2
        rotate = replace(switched, source_schemes=("https",)).to_json()
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        carried = EDITED + b"note = 2\n"
        txn = journal.create(
            Txn(
                "r2",
                TxnKind.SWITCH,
                2,
                Phase.VERIFIED,
                rotate,
                later,
                source_config=live,
                target_config=carried,
            )
        )
        if edit == "carried over":
            live = carried
            journal.complete(txn, None, phase=Phase.COMPLETED, outcome=TxnOutcome.COMPLETED)
        else:
            journal.update(txn, phase=Phase.ROLLED_BACK, outcome=TxnOutcome.ROLLED_BACK)
    server.running = server.config = live
    config_file.write_bytes(live)

    config, back, _fp = plans.rollback_plan(journal, driver, txn_dir, "b1", undoes="")
    kept = config_file.with_name("server.toml.before-rollback-b1")
    assert back.keep_edited == ("" if edit in ("none", "rolled back") else str(kept))
    assert Plan.from_json(back.to_json()) == back
    done = await run_rollback(journal, driver, server, (config, back), "b1", 3, live, 5)

    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert config_file.read_bytes() == SOURCE == server.running
    if not back.keep_edited:
        assert not kept.exists() and done.reason == ""
        return
    assert kept.read_bytes() == live
    assert kept.stat().st_mode & 0o777 == 0o640
    assert done.reason == transaction.kept_reason(kept)
    journal.close()


@pytest.mark.parametrize("outcome", [TxnOutcome.ROLLED_BACK, TxnOutcome.FAILED])
async def test_a_way_back_that_kept_the_edited_config_and_failed_still_says_where(
    tmp_path: Path, outcome: TxnOutcome
) -> None:
    """Review of s59-wayback L3: a way back that kept the edited config and then failed (its
    verify: the server does not answer http) is rolled back, the edited config live again; its
    reason said only why it failed, not where the copy it made is (tlsroll never removes it);
    nor did that of one whose own way back failed too (https not verified: no CA file).
    And the temporary file of a copy the agent was writing when it stopped is removed at its
    next start, as its staged configs are; the copy itself stays."""
    config_file = tmp_path / "etc" / "server.toml"
    config_file.parent.mkdir()
    journal = Journal(tmp_path / "journal.sqlite3")
    server = FakeServer()
    driver = FileDriver(server, config_file)
    txn_dir = tmp_path / "txn"
    stage(journal, driver, "r1")
    completed_switch(journal, driver, txn_dir, "journal")
    server.running = server.config = EDITED
    config_file.write_bytes(EDITED)
    config, back, _fp = plans.rollback_plan(journal, driver, txn_dir, "b1", undoes="")
    kept = config_file.with_name("server.toml.before-rollback-b1")
    assert back.keep_edited == str(kept)
    if outcome is TxnOutcome.ROLLED_BACK:
        ca = config_file.parent / "tlsroll-tls" / "r1" / "ca.pem"
        ca.parent.mkdir(parents=True)
        ca.write_bytes(b"the cluster CA")
    server.failing = frozenset({"check_http"})
    done = await run_rollback(journal, driver, server, (config, back), "b1", 3, EDITED, 5)
    assert done.outcome is outcome, done.reason
    assert config_file.read_bytes() == EDITED == kept.read_bytes()
    assert done.reason.startswith("verify: "), done.reason
    assert f"(the config as edited since the switch is kept as {kept})" in done.reason

    stray = config_file.with_name(f".{kept.name}.tmp-4242-{'0' * 16}")
    stray.write_bytes(EDITED[:5])  # an agent stopped mid-copy
    driver.discard_stale_staged()
    assert stray.parent == kept.parent and not stray.exists() and kept.exists()
    journal.close()


def test_the_checks_name_an_edited_config_only_on_a_switched_node_that_reads_it(
    node: tuple[Journal, FakeDriver, Path],
) -> None:
    """What the planning question's answer says of the config (``plans.edited_config``): its
    path when the node serves https and the file is no longer what tlsroll wrote; nothing for a
    node never switched, one on http, or a config that cannot be read (that is a problem of
    the checks already, ``CONFIG_UNREADABLE``; nothing more is claimed of it)."""
    journal, driver, txn_dir = node
    https = ("https",)
    driver.server.config = EDITED
    assert plans.edited_config(journal, driver, https) == ""  # never switched
    stage(journal, driver, "r1")
    completed_switch(journal, driver, txn_dir, "journal")
    assert plans.edited_config(journal, driver, https) == ""  # as the switch wrote it
    driver.server.config = EDITED
    assert plans.edited_config(journal, driver, https) == str(driver.config_file)
    assert plans.edited_config(journal, driver, ("http",)) == ""

    def unreadable() -> bytes:
        raise PermissionError(errno.EACCES, "Permission denied", str(driver.config_file))

    driver.read_config = unreadable  # type: ignore[method-assign]
    assert plans.edited_config(journal, driver, https) == ""
    journal.close()


@pytest.mark.parametrize("lease", [True, False])
async def test_a_failed_way_back_keeps_a_scope_freeze_only_while_its_lease_holds(
    world: Callable[[Scenario], World], lease: bool
) -> None:
    """A failed way back never leaves the node frozen because of tlsroll: under a scope freeze
    (keep_frozen) it stays frozen only while the leader's lease is journalled, which the agent
    lifts when it runs out; without a lease (the leader already lifted it) it unfreezes."""
    sc = SCENARIOS["way_back_fails"]
    w = world(sc)
    w.plan = replace(w.plan, keep_frozen=True)
    w.txn = replace(w.txn, plan=w.plan.to_json())
    journal = CrashingJournal(w.journal_path)
    if lease:
        journal.set_freeze_lease(Lease("r1", w.time.clock() + dt.timedelta(minutes=5), 300))
    done = await w.run(journal)

    assert done.outcome is TxnOutcome.FAILED
    assert w.server.frozen is lease
    assert (w.server.ops[-1] == "unfreeze") is not lease
    journal.close()


def test_a_command_with_the_epoch_already_recorded_writes_nothing(tmp_path: Path) -> None:
    """Every command of a rollout carries its epoch; the journal wrote it again each time (a
    commit, an fsync) although it was already the highest, one of them on the way into each
    switch. A higher epoch is written, an equal one is not, a lower one is refused."""
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        assert journal.admit_epoch(5) is None
        written = journal._db.commits
        assert journal.admit_epoch(5) is None
        assert journal._db.commits == written
        assert journal.highest_epoch() == 5
        assert journal.admit_epoch(4) == 5
        assert journal.admit_epoch(6) is None
        assert journal._db.commits == written + 1 and journal.highest_epoch() == 6
    finally:
        journal.close()


# --- the watch: each phase sent as the runner journalled it -------------------------------------


class ReadCountingJournal(CrashingJournal):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gets = 0

    def get(self, rollout_id: str, kind: str) -> Txn | None:
        self.gets += 1
        return super().get(rollout_id, kind)


@pytest.mark.parametrize("name", ["completes", "restart_fails"])
async def test_the_watch_sends_every_phase_without_reading_it_back(
    name: str, world: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: WatchTransaction read each new phase back from the journal (a worker-thread
    hop per phase, on the way from the agent's step to the leader); the runner now hands the
    record it journalled. What is sent is still exactly what the journal holds."""
    sc = SCENARIOS[name]
    w = world(sc)
    journal = ReadCountingJournal(w.journal_path)
    runner = w.runner(journal)
    trust = LeaderTrust(w.root / "ca.pem", "example.test", w.root / "crl.pem")
    agent = service.NodeAgentService(
        cast(Any, None), cast(Any, None), journal, w.driver, runner, w.time.clock, trust=trust
    )
    first = next_action(Phase.STARTED)
    txn = journal.create(w.txn, begin=first)
    sent: list[Any] = []

    async def follow() -> None:
        async for message in agent._follow("r1", sc.kind, txn, frozenset()):  # every state
            sent.append(message)

    watching = asyncio.create_task(follow())
    runner.start(txn, begun=first)
    await asyncio.gather(*runner.tasks.values())
    await asyncio.wait_for(watching, 10)

    assert journal.gets == 0
    final = journal.get("r1", sc.kind)
    assert final is not None and final.finished
    assert sent[0] == service.txn_message(txn) and sent[-1] == service.txn_message(final)
    # Each message a phase the journal recorded, in its order (two quick ones may be one).
    ended = [e["step"] for e in journal.events("r1") if e["what"] == "end"]
    phases = [TXN_PHASE.read(m.phase, "phase").value for m in sent]
    assert phases[0] == "started" and phases[1:] == [p for p in ended if p in phases[1:]]
    journal.close()


async def test_the_watch_sends_the_last_record_before_the_runner_s_work_after_it(
    world: Callable[..., World],
) -> None:
    """Session 72 (issue 15): the completed record went to the leader only once the runner,
    which went on after journalling it, handed the loop over: after its log line and the start
    of its ``on_complete`` (the bootstrap service's sync, which hands a journal read to a
    thread: on a loaded machine 0.3-5 ms between the record and its message, the leader's next
    switch waiting). The watch now sends it first; the work after it follows."""
    w = world(SCENARIOS["completes"])
    journal = CrashingJournal(w.journal_path)
    runner = w.runner(journal)
    trust = LeaderTrust(w.root / "ca.pem", "example.test", w.root / "crl.pem")
    agent = service.NodeAgentService(
        cast(Any, None), cast(Any, None), journal, w.driver, runner, w.time.clock, trust=trust
    )
    order: list[str] = []

    async def synced() -> None:
        order.append("on_complete")

    runner.on_complete = synced
    runner.on_end = lambda: order.append("on_end")
    first = next_action(Phase.STARTED)
    txn = journal.create(w.txn, begin=first)

    async def follow() -> None:
        async for message in agent._follow("r1", TxnKind.SWITCH, txn, frozenset()):
            order.append(f"sent {TXN_PHASE.read(message.phase, 'phase').value}")

    watching = asyncio.create_task(follow())
    runner.start(txn, begun=first)
    await asyncio.gather(*runner.tasks.values())
    await asyncio.wait_for(watching, 10)

    assert order[-3:] == ["sent completed", "on_complete", "on_end"], order
    journal.close()


# --- the switch made ready when its node was staged ---------------------------------------------


class PreparingDriver(FileDriver):
    """A driver whose facts and render come from its config file alone (as the reference
    driver's), counting its renders; it renders the scenario's target for https."""

    config_decides = True

    def __init__(self, server: FakeServer, config_file: Path) -> None:
        super().__init__(server, config_file)
        self.renders = 0
        self.rendered_once: list[bool] = []  # for each render: within ``reading_once``?
        self._once = False

    @contextlib.contextmanager
    def reading_once(self) -> Iterator[None]:
        self._once = True
        try:
            yield
        finally:
            self._once = False

    def render(self, target: Target) -> bytes:
        self.renders += 1
        self.rendered_once.append(self._once)
        return TARGET if "https" in target.schemes and "http" not in target.schemes else BROKEN


def staged_agent(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> tuple[service.NodeAgentService, PreparingDriver, Journal, Runner]:
    """The servicer of ``w``'s node, its certificate staged for rollout r1 (the journal's
    record; the files are the world's), commands admitted without a leader's certificate."""
    driver = PreparingDriver(w.server, w.driver.config_file)
    w.driver = driver
    journal = Journal(w.journal_path)
    stage = w.root / "server" / "tlsroll-tls" / "r1"
    stage.mkdir(parents=True)
    journal.record_csr("r1", stage / "server.key", b"csr")
    (stage / "ca.pem").write_bytes(b"the cluster CA")
    journal.record_stage(
        "r1", stage / "server.pem", stage / "ca.pem", STAGED_FP, w.time.clock() + dt.timedelta(1)
    )
    runner = w.runner(journal)
    trust = LeaderTrust(w.root / "ca.pem", "example.test", w.root / "crl.pem")
    cfg = cast(Any, type("Cfg", (), {"data_dir": w.root / "agent"}))
    agent = service.NodeAgentService(
        cfg, cast(Any, None), journal, driver, runner, w.time.clock, trust=trust
    )

    async def admitted(context: Any, command: Any, **_: Any) -> str:
        return str(command.rollout_id)

    monkeypatch.setattr(agent, "_command", admitted)
    return agent, driver, journal, runner


def switch_request(rollout_id: str = "r1", change: str = "enable-tls", **fields: Any) -> Any:
    from tlsroll.enums import Change
    from tlsroll.v1 import agent_pb2
    from tlsroll.wire import CHANGE

    return agent_pb2.SwitchRequest(
        command=agent_pb2.Command(rollout_id=rollout_id, epoch=1),
        change=CHANGE.wire(Change(change)),
        **fields,
    )


def stage_behind(w: World, journal: Journal, rollout_id: str, fingerprint: str) -> Path:
    """Another certificate recorded as staged for ``rollout_id`` (not through the servicer):
    its stage directory."""
    stage = w.root / "server" / "tlsroll-tls" / rollout_id
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "ca.pem").write_bytes(b"the cluster CA")
    if journal.staged(rollout_id) is None:
        journal.record_csr(rollout_id, stage / "server.key", b"csr")
    journal.record_stage(
        rollout_id, stage / "server.pem", stage / "ca.pem", fingerprint, w.time.clock()
    )
    return stage


async def test_a_switch_is_made_ready_and_staged_when_its_node_is_staged(
    world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the switch began by reading and parsing the live config (three times),
    rendering the target and staging it (a write and an fsync), and its freeze call waited
    for that. The stage makes it ready (``NodeAgentService._prepare``) while another node
    switches: the switch renders nothing, stages nothing, reads the live config once (to
    see that it is unchanged) and commits the file staged at the stage."""
    w = world(SCENARIOS["completes"])
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    await dbthread.run(agent._prepare, "r1")
    assert driver.renders == 1 and len(driver.stagings) == 2  # the target, and the way back
    staged_file, source_file = (staged.file for staged in driver.stagings)
    assert staged_file is not None and staged_file.read_bytes() == TARGET
    assert source_file is not None and source_file.read_bytes() == SOURCE
    reads: list[str] = []

    def read_config() -> bytes:
        reads.append("read")
        return SOURCE

    monkeypatch.setattr(driver, "read_config", read_config)

    txn = await agent._switch(switch_request(keep_frozen=True), cast(Any, None))
    await asyncio.gather(*runner.tasks.values())

    assert driver.renders == 1 and len(driver.stagings) == 2  # nothing made in the switch
    assert driver.commits == driver.stagings[:1] and not staged_file.exists()
    await dbthread.barrier()  # the way back's staging, not taken, is removed at the end
    assert not source_file.exists()
    assert reads == ["read"]
    assert txn.target_config == TARGET and txn.source_config == SOURCE
    assert Plan.from_json(txn.plan).keep_frozen  # the request's, not the stage's
    final = journal.get("r1", TxnKind.SWITCH)
    assert final is not None and final.outcome is TxnOutcome.COMPLETED
    assert w.server.config == TARGET
    journal.close()


@pytest.mark.parametrize("prepared", [True, False])
async def test_a_switchs_create_reads_the_journal_once_before_its_write(
    prepared: bool, world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: the create's hand-off, which the freeze call waits for, read the journal four
    times before its write (the transaction under its key, the unfinished ones, what is live,
    the staged certificate): one read now (``Journal.outlook``). The build of a switch not
    made ready at its stage reads what it needs itself, as before."""
    w = world(SCENARIOS["completes"])
    agent, _driver, journal, runner = staged_agent(w, monkeypatch)
    if prepared:
        await dbthread.run(agent._prepare, "r1")
    reads: list[str] = []
    at_create: list[int] = []
    real_read, real_create = journal._read, journal.create

    @contextlib.contextmanager
    def read() -> Iterator[Any]:
        reads.append("read")
        with real_read() as db:
            yield db

    def create(txn: Txn, *, begin: str | None = None) -> Txn:
        at_create.append(len(reads))
        return real_create(txn, begin=begin)

    monkeypatch.setattr(journal, "_read", read)
    monkeypatch.setattr(journal, "create", create)
    txn = await agent._switch(switch_request(), cast(Any, None))
    await asyncio.gather(*runner.tasks.values())
    assert txn.outcome is TxnOutcome.PENDING
    if prepared:
        assert at_create == [1]
    else:  # the outlook, then the plan's own reads (unchanged)
        assert at_create and at_create[0] >= 1
    final = journal.get("r1", TxnKind.SWITCH)
    assert final is not None and final.outcome is TxnOutcome.COMPLETED
    journal.close()


async def test_a_busy_node_refuses_a_switch_of_another_rollout_after_one_read(
    world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outlook says the node is busy (an unfinished transaction of another rollout), and
    a replay finds its own transaction, as the separate reads did."""
    w = world(SCENARIOS["completes"])
    agent, _driver, journal, runner = staged_agent(w, monkeypatch)
    seen = journal.outlook("r1", TxnKind.SWITCH)
    assert seen.existing is None and seen.running is None and seen.staged is not None
    with journal._tx() as db:
        Journal._set_live_tls(db, {"cert_file": "/x.pem"})
    other = Txn(
        rollout_id="r0",
        kind=TxnKind.SWITCH,
        epoch=1,
        phase=Phase.STARTED,
        plan={},
        started_at=w.time.clock(),
    )
    journal.create(other)
    seen = journal.outlook("r1", TxnKind.SWITCH)
    assert seen.existing is None and seen.running == journal.get("r0", TxnKind.SWITCH)
    assert seen.live_tls == {"cert_file": "/x.pem"}
    assert seen.staged == journal.staged("r1")
    with pytest.raises(Exception, match="busy with switch of rollout r0"):
        await agent._switch(switch_request(), cast(Any, None))
    seen = journal.outlook("r0", TxnKind.SWITCH)
    assert seen.existing == seen.running == journal.get("r0", TxnKind.SWITCH)
    assert seen.staged is None
    assert not runner.tasks
    journal.close()


@pytest.mark.parametrize(
    "change",
    [
        "config",
        "keep_http",
        "verifier",
        "restaged",
        "tampered",
        "tampered_source",
        "live_tls",
        "rollout",
        "mode",
    ],
)
async def test_a_switch_the_prepared_one_does_not_fit_is_made_as_before(
    change: str, world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the stage made ready is used only if the switch is the one it was made for and
    nothing it was made from changed: else the switch makes its own (as before) and the
    file staged at the stage is removed."""
    w = world(SCENARIOS["completes"])
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    await dbthread.run(agent._prepare, "r1")
    first = driver.stagings[0].file
    assert first is not None
    fields: dict[str, Any] = {}
    rollout_id = "r1"
    if change == "config":  # the admin edited the live config since
        w.server.config = SOURCE + b"# edited\n"
    elif change == "keep_http":
        fields["keep_http"] = True
    elif change == "verifier":
        fields["auth_verifier_json"] = password.verifier_to_json(
            password.make_verifier("s3cret", **password.TEST_PARAMS)
        )
    elif change == "restaged":  # another certificate staged since, behind the servicer's back
        journal.record_stage(
            "r1", first.parent / "x.pem", first.parent / "ca.pem", "sha256:x", w.time.clock()
        )
    elif change == "live_tls":  # what the journal says is live changed since
        with journal._tx() as db:
            Journal._set_live_tls(db, {"cert_file": "/elsewhere.pem"})
    elif change == "rollout":  # a switch of another rollout, staged behind the servicer's back
        rollout_id = "r2"
        stage_behind(w, journal, rollout_id, STAGED_FP)
    elif change == "mode":  # the admin's chmod of the live config (review of session 28, L4)
        assert stat.S_IMODE(driver.config_file.stat().st_mode) != 0o640
        driver.config_file.chmod(0o640)
    elif change == "tampered_source":  # the way back's staged file is not what was staged
        back = driver.stagings[1].file
        assert back is not None
        back.write_bytes(b"something else")
    else:  # the staged file is not what was staged
        first.write_bytes(b"something else")

    txn = await agent._switch(switch_request(rollout_id, **fields), cast(Any, None))
    await asyncio.gather(*runner.tasks.values())
    await dbthread.barrier()  # the prepared file is removed after the create's hand-off

    assert driver.renders == 2  # made in the switch, its config read once
    assert driver.rendered_once == [True, True]
    assert driver.stagings[2].data == txn.target_config  # and staged there
    assert not any(staged.file and staged.file.exists() for staged in driver.stagings)
    if change == "config":
        assert txn.source_config == SOURCE + b"# edited\n"
    if change == "mode":  # the live config as the admin left it
        assert stat.S_IMODE(driver.config_file.stat().st_mode) == 0o640
    if change in ("live_tls", "rollout", "mode"):  # nothing else is wrong with these
        final = journal.get(rollout_id, TxnKind.SWITCH)
        assert final is not None and final.outcome is TxnOutcome.COMPLETED
    journal.close()


def a_verifier(secret: str) -> dict[str, Any]:
    return dict(password.make_verifier(secret, **password.TEST_PARAMS))


@pytest.mark.parametrize("settings", ["verifier", "keep_http", "both"])
async def test_a_switch_the_stage_said_would_come_is_made_ready_with_its_settings(
    settings: str, world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of session 28, L6: a Stage did not know the switch to come, so a password
    switch or a transitional one (keep_http) had its prepared switch dropped and was made in
    the switch's hand-off, which the freeze call waits for. The Stage now says
    (``StageRequest.switch_to_come``): that switch is made ready at the stage, the
    verifier file written there, and the switch takes it."""
    w = world(SCENARIOS["completes"])
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    verifier = a_verifier("s3cret") if settings != "keep_http" else None
    keep_http = settings != "verifier"
    await dbthread.run(agent._prepare, "r1", service.Coming(verifier, keep_http))
    assert driver.renders == 1 and len(driver.stagings) == 2  # the target, and the way back
    written: list[object] = []
    real_write = plans.write_verifier

    def write_verifier(*args: Any) -> Path | None:
        written.append(args)
        return real_write(*args)

    monkeypatch.setattr(plans, "write_verifier", write_verifier)
    fields: dict[str, Any] = {"keep_http": keep_http}
    if verifier is not None:
        fields["auth_verifier_json"] = password.verifier_to_json(verifier)
    txn = await agent._switch(switch_request(**fields), cast(Any, None))
    await asyncio.gather(*runner.tasks.values())

    # Nothing made in the switch: it commits the config staged at the stage (this fake
    # server refuses a dual config, so a keep_http switch then goes back: that is not made
    # ready, it is the way back).
    assert driver.renders == 1 and not written
    assert driver.stagings[0].data == txn.target_config
    assert driver.commits[:1] == driver.stagings[:1]
    plan = Plan.from_json(txn.plan)
    assert plan.change == (plans.ENABLE_DUAL if keep_http else "enable-tls")
    name = (plan.live_tls or {}).get("verifier_file", "")
    if verifier is None:
        assert not name
    else:
        assert json.loads(Path(name).read_text()) == json.loads(password.verifier_to_json(verifier))
    journal.close()


@pytest.mark.parametrize("change", ["other_verifier", "no_verifier", "file", "keep_http"])
async def test_a_switch_other_than_the_stage_said_is_made_as_before(
    change: str, world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switch whose settings differ from those the stage was told (another verifier, none,
    http kept or not), or whose verifier file changed since, is made in the switch as before,
    and the prepared file is removed."""
    w = world(SCENARIOS["completes"])
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    verifier = a_verifier("s3cret")
    await dbthread.run(agent._prepare, "r1", service.Coming(verifier, False))
    first = driver.stagings[0].file
    assert first is not None
    fields: dict[str, Any] = {"auth_verifier_json": password.verifier_to_json(verifier)}
    if change == "other_verifier":
        fields["auth_verifier_json"] = password.verifier_to_json(a_verifier("other"))
    elif change == "no_verifier":
        del fields["auth_verifier_json"]
    elif change == "keep_http":
        fields["keep_http"] = True
    else:
        prepared = agent._prepared
        assert prepared is not None and prepared.built.plan.live_tls is not None
        Path(prepared.built.plan.live_tls["verifier_file"]).write_text("{}")
    txn = await agent._switch(switch_request(**fields), cast(Any, None))
    await asyncio.gather(*runner.tasks.values())
    await dbthread.barrier()

    assert driver.renders == 2 and driver.stagings[2].data == txn.target_config
    assert not any(staged.file and staged.file.exists() for staged in driver.stagings)
    journal.close()


def test_what_a_stage_says_of_the_switch_to_come() -> None:
    """Unset (a leader of an earlier release): no verifier, http closes, as before; a
    verifier that cannot be read: nothing is made ready (the switch carrying it is refused)."""
    from tlsroll.v1 import agent_pb2

    assert service._coming(agent_pb2.StageRequest()) == service.Coming(None, False)
    verifier = a_verifier("s3cret")
    told = agent_pb2.StageRequest(
        switch_to_come=agent_pb2.SwitchToCome(
            auth_verifier_json=password.verifier_to_json(verifier), keep_http=True
        )
    )
    assert service._coming(told) == service.Coming(verifier, True)
    empty = agent_pb2.StageRequest(switch_to_come=agent_pb2.SwitchToCome())
    assert service._coming(empty) == service.Coming(None, False)
    bad = agent_pb2.StageRequest(switch_to_come=agent_pb2.SwitchToCome(auth_verifier_json="{"))
    assert service._coming(bad) is None


@pytest.mark.parametrize("prepared", [True, False])
async def test_the_freeze_call_goes_out_before_the_servicer_logs_and_answers(
    prepared: bool, world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: when a switch began, the servicer's log line and its first WatchTransaction
    message ran on the loop before the runner's freeze call went out. The servicer now waits
    for the call to be out (``Runner.under_way``): by the time it logs and returns, the
    server has been asked to freeze. Without a prepared switch the call also waits for the
    staging, and the servicer does not wait for that: here it logs and returns while the
    staging is held (review of session 28, L7: that case could not fail)."""
    w = world(SCENARIOS["completes"])
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    release, staged = threading.Event(), threading.Event()
    if prepared:
        await dbthread.run(agent._prepare, "r1")
        release.set()
    stage_config = driver.stage_config

    def held(data: bytes) -> StagedConfig:
        release.wait(60)
        try:
            return stage_config(data)
        finally:
            staged.set()

    monkeypatch.setattr(driver, "stage_config", held)
    order: list[str] = []
    logged = service.log.info

    def log_info(event: str, **kw: Any) -> None:
        order.append(f"log {event} (ops: {' '.join(w.server.ops) or '-'})")
        logged(event, **kw)

    monkeypatch.setattr(service.log, "info", log_info)
    switching = asyncio.ensure_future(agent._switch(switch_request(), cast(Any, None)))
    try:  # bounded: a servicer that waited for the held staging would never return
        await asyncio.wait_for(asyncio.shield(switching), 30)
        order.append(f"returned (ops: {' '.join(w.server.ops) or '-'}, staged: {staged.is_set()})")
    finally:
        release.set()
    await switching
    await asyncio.gather(*runner.tasks.values())
    assert order[0].startswith("log txn.started") and order[1].startswith("returned")
    if prepared:  # the server was asked to freeze first (the switch may have gone on since:
        # its next steps run in the store's thread, which a loaded machine let through before
        # the loop logged: CI ci57d saw "freeze write_config target")
        assert order[0].startswith("log txn.started (ops: freeze"), order
    else:  # the staging still held: no freeze call yet
        assert order == ["log txn.started (ops: -)", "returned (ops: -, staged: False)"], order
    final = journal.get("r1", TxnKind.SWITCH)
    assert final is not None and final.outcome is TxnOutcome.COMPLETED
    assert not runner._under_way
    journal.close()


async def test_a_prepared_switch_not_taken_is_removed_after_the_create_and_its_staging(
    world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of session 28, L6: a prepared switch the switch could not use (a password
    verifier came, say) had its file removed inside the create's hand-off to the store's
    thread, which the freeze call waits for. It is removed after it, and after the staging of
    the switch's own config, which the freeze call waits for too."""
    w = world(SCENARIOS["completes"])
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    await dbthread.run(agent._prepare, "r1")
    first = driver.stagings[0].file
    assert first is not None
    order: list[str] = []
    create, stage_config, discard = journal.create, driver.stage_config, driver.discard_staged

    def creating(txn: Txn, **kw: Any) -> Txn:
        order.append("create")
        return create(txn, **kw)

    def staging(data: bytes) -> StagedConfig:
        order.append("stage")
        return stage_config(data)

    def discarding(staged: StagedConfig) -> None:
        order.append("discard" if staged.file == first else "discard another")
        discard(staged)

    monkeypatch.setattr(journal, "create", creating)
    monkeypatch.setattr(driver, "stage_config", staging)
    monkeypatch.setattr(driver, "discard_staged", discarding)
    verifier = password.verifier_to_json(password.make_verifier("s3cret", **password.TEST_PARAMS))
    await agent._switch(switch_request(auth_verifier_json=verifier), cast(Any, None))
    await asyncio.gather(*runner.tasks.values())
    await dbthread.barrier()
    # the switch's own target and source staged, then the prepared ones removed
    assert order[:5] == ["create", "stage", "stage", "discard", "discard another"], order
    assert not first.exists() and agent._prepared is None
    journal.close()


async def test_a_create_that_fails_after_taking_the_prepared_switch_removes_its_file(
    world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch took the prepared staging, and its journal write failed: no transaction
    owns that file, which is removed; the error is the switch's."""
    w = world(SCENARIOS["completes"])
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    await dbthread.run(agent._prepare, "r1")
    first = driver.stagings[0].file
    assert first is not None and first.exists()

    def failing(txn: Txn, **kw: Any) -> Txn:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(journal, "create", failing)
    with pytest.raises(sqlite3.OperationalError):
        await agent._switch(switch_request(), cast(Any, None))
    await dbthread.barrier()
    assert not first.exists() and agent._prepared is None
    assert runner.tasks == {} and w.server.ops == []
    assert list(driver.config_file.parent.glob(".*staged*")) == []
    journal.close()


@pytest.mark.parametrize("told", [False, True])
async def test_a_rotation_is_made_ready_at_its_stage_and_taken_with_a_password(
    told: bool, world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a node that serves https (the journal says what is live), the stage makes the
    rotate-cert switch ready; a rotation keeps the live password, so one that comes with a
    verifier takes it too, whatever verifier the stage was told of (``told``: another
    than the live file holds)."""
    w = world(SCENARIOS["completes"])
    w.server.config = w.server.running = TARGET
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    live_verifier = w.root / "live-verifier.json"
    write_private(live_verifier, password.verifier_to_json(a_verifier("live")).encode())
    live = {
        "cert_file": "/x/old.pem",
        "server_url": f"https://{ADDRESS}:8443{APP}",
        "verifier_file": str(live_verifier),
    }
    with journal._tx() as db:
        Journal._set_live_tls(db, live)
    coming = service.Coming(a_verifier("other"), False) if told else service.Coming()
    await dbthread.run(agent._prepare, "r1", coming)
    prepared = agent._prepared
    assert prepared is not None and prepared.built.plan.change == "rotate-cert"
    assert driver.renders == 1 and len(driver.stagings) == 2  # the target, and the way back
    verifier = password.verifier_to_json(password.make_verifier("s3cret", **password.TEST_PARAMS))
    request = switch_request(change="rotate-cert", auth_verifier_json=verifier)
    txn = await agent._switch(request, cast(Any, None))
    await asyncio.gather(*runner.tasks.values())
    # nothing made anew
    assert driver.renders == 1 and len(driver.stagings) == 2
    assert driver.commits == driver.stagings[:1]
    assert Plan.from_json(txn.plan).change == "rotate-cert"
    final = journal.get("r1", TxnKind.SWITCH)
    assert final is not None and final.outcome is TxnOutcome.COMPLETED, final
    rotated = journal.live_tls()
    assert rotated is not None and rotated == prepared.built.plan.live_tls
    assert rotated["cert_file"] == str(w.root / "server" / "tlsroll-tls" / "r1" / "server.pem")
    journal.close()


# --- a change-password switch that was not journalled (s32risk) --------------------------------


@pytest.mark.parametrize("fails", ["journal", "render"])
async def test_a_password_switch_not_journalled_leaves_no_verifier_file_behind(
    fails: str, world: Callable[[Scenario], World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change-password switch's plan writes its verifier file into ``tlsroll-tls/<rollout>/``
    before the transaction is journalled. When the journal's write failed (or the plan's
    render, after the file), that directory had no stage and no transaction, and stayed
    until the agent's next start swept it: a file that can fake bootstrap answers. It is
    removed at once now; the switched rollout's directory stays. Failed on 55f7cda."""
    w = world(SCENARIOS["completes"])
    agent, driver, journal, runner = staged_agent(w, monkeypatch)
    await agent._switch(switch_request(), cast(Any, None))  # enable-tls: the node on https
    await asyncio.gather(*runner.tasks.values())
    done = journal.get("r1", TxnKind.SWITCH)
    assert done is not None and done.outcome is TxnOutcome.COMPLETED
    verifier = password.verifier_to_json(a_verifier("n3w"))
    written = plans.stage_dir(driver, "p1") / "auth-verifier.json"
    failure: Exception
    if fails == "journal":
        failure = sqlite3.OperationalError("disk I/O error")

        def failing(*args: Any, **kwargs: Any) -> Any:
            assert written.exists()  # (the plan wrote it before)
            raise failure

        monkeypatch.setattr(journal, "create", failing)
    else:
        failure = DriverError("cannot render")

        def not_rendered(target: Target) -> bytes:
            assert written.exists()
            raise failure

        monkeypatch.setattr(driver, "render", not_rendered)
    with pytest.raises(type(failure)):
        await agent._switch(
            switch_request("p1", "change-password", auth_verifier_json=verifier), cast(Any, None)
        )
    assert not plans.stage_dir(driver, "p1").exists()
    assert (plans.stage_dir(driver, "r1") / "ca.pem").exists()  # the live one's: kept
    assert journal.get("p1", TxnKind.SWITCH) is None
    journal.close()


# --- the freeze's length in elapsed time (clock audit s35 J) -----------------------------------


class BootClock:
    """The agent's boot-time clock (``Leases.boot``) and its boot's id: only a test moves it."""

    def __init__(self) -> None:
        self.boot_id = "boot-1"
        self.seconds = 50_000.0

    def __call__(self) -> Boot:
        return Boot(self.boot_id, self.seconds)


def timed(w: World, boot: BootClock) -> None:
    """``w``'s runners read ``boot`` as their boot-time clock."""

    def runner(journal: Journal) -> Runner:
        return Runner(
            journal,
            w.driver,
            w.time.clock,
            checks=fake_checks(w.server),
            sleep=w.time.sleep,
            monotonic=w.time.monotonic,
            leases=Leases(boot=boot),
        )

    w.runner = runner  # type: ignore[method-assign]


def step_while_frozen(w: World, journal: CrashingJournal, boot: BootClock) -> None:
    """Once ``frozen`` is journalled: the node's wall clock steps back an hour (NTP after a
    VM restored from a snapshot) while 2.5 s pass."""

    def after_write() -> None:
        if journal.writes[-1].startswith("frozen"):
            w.time.now -= dt.timedelta(hours=1)
            boot.seconds += 2.5

    journal.after_write = after_write


async def test_a_freeze_s_length_is_elapsed_time_whatever_the_wall_clock_did(
    world: Callable[..., World],
) -> None:
    """Clock audit s35 J: the schema's freeze window was ``freeze_ended_at -
    freeze_started_at`` on the node's wall clock, so a step back during the freeze made it
    about -3600 s. The agent now measures the freeze on its boot-time clock and journals (and
    sends) that length; the two times stay as the wall clock read them."""
    boot = BootClock()
    w = world(SCENARIOS["completes"])
    timed(w, boot)
    journal = CrashingJournal(w.journal_path)
    step_while_frozen(w, journal, boot)
    txn = await w.run(journal)
    assert txn.outcome is TxnOutcome.COMPLETED, txn.reason
    assert txn.freeze_started_at is not None and txn.freeze_ended_at is not None
    assert txn.freeze_ended_at < txn.freeze_started_at  # what the wall clock says
    assert txn.freeze_seconds == 2.5
    assert journal.get("r1", txn.kind) == txn  # journalled, for a WatchTransaction later
    assert service.txn_message(txn).freeze_seconds == 2.5
    journal.close()


@pytest.mark.parametrize("same_boot", [True, False], ids=["agent-restarted", "rebooted"])
async def test_a_freeze_s_length_spans_an_agent_restart_but_not_a_reboot(
    same_boot: bool, world: Callable[..., World]
) -> None:
    """Killed after ``frozen`` and started again: in the same boot the length runs from the
    freeze's first start on the boot-time clock (the time the agent was down counts, as it
    does in the two wall-clock times); after a reboot that clock starts again, so no length
    is sent (the leader takes the times' difference, never below 0)."""
    boot = BootClock()
    w = world(SCENARIOS["completes"])
    timed(w, boot)
    await crash_after(w, "frozen")
    w.server.frozen = False  # the agent's exit lifted it
    if same_boot:
        boot.seconds += 7.0
    else:
        boot.boot_id, boot.seconds = "boot-2", 20.0
    _pending, journal = await w.resume()
    txn = journal.get("r1", TxnKind.SWITCH)
    assert txn is not None and txn.outcome is TxnOutcome.COMPLETED, txn
    assert txn.freeze_seconds == (7.0 if same_boot else None)
    assert service.txn_message(txn).HasField("freeze_seconds") is same_boot
    journal.close()


@pytest.mark.parametrize("name", ["completes", "verify_fails", "way_back_fails"])
async def test_every_transaction_s_end_is_told_whatever_its_outcome(
    world: Callable[..., World], name: str
) -> None:
    """Review rev56c L5: the agent's heartbeat right after a transaction (``Runner.on_end``,
    ``LeaderLink.beat_soon``) came only after one that completed; a switch taken back on the
    node (or whose way back failed) had restarted the server too, and the leader showed what a
    beat saw mid-switch until the next interval. Told once, at the task's end, for every
    outcome."""
    sc = SCENARIOS[name]
    w = world(sc, "files")
    journal = CrashingJournal(w.journal_path)
    await asyncio.to_thread(journal.create, w.txn)
    runner = w.runner(journal)
    told: list[TxnOutcome | None] = []

    def ended() -> None:
        txn = journal.get("r1", sc.kind)
        told.append(txn.outcome if txn is not None else None)

    runner.on_end = ended
    await runner.resume_all()
    await asyncio.gather(*runner.tasks.values())
    assert told == [sc.outcome]
    await _store_thread_answers(journal)
    journal.close()
