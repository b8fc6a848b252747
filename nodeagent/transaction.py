"""The switch transaction: how the agent carries one node from one config to another, safely.

Theory of operation
-------------------
A transaction moves the managed server from its *source* config (say http on 8080) to a
*target* config (https on 8443 with the staged certificate), or back. Once the leader has
handed it over, the agent alone carries it to one of three outcomes:

    completed     the target is live, verified, writes accepted again
    rolled_back   something failed; the source is live again, verified, writes accepted
    failed        even the way back failed; the reason says what the node needs

The steps are a table: each phase names the action that comes next and the phase it leads
to. The journal records the phase *after* each action, so after a crash the agent repeats at
most the one action it was in the middle of; every action is idempotent (freeze twice returns
the same watermark, the config write is atomic, a restart is a restart, unfreeze twice is
unfreeze), so repeating it is safe::

    FORWARD   started ─freeze→ frozen ─write_config→ config_written ─restart→ restarted
              ─verify→ verified ─unfreeze→ completed
    BACKWARD  rolling_back ─restore_config→ restored ─restart→ rb_restarted
              ─verify_source→ rb_verified ─unfreeze→ rolled_back

Any failure on the forward path enters ``rolling_back`` with the reason. The backward path
retries each action a few times; if it still fails the outcome is ``failed`` and the agent
still tries to lift the freeze, so that a node never stays frozen because of tlsroll.

Test hook: if the environment variable ``TLSROLL_AGENT_TEST_CRASH_AFTER`` names a phase, the
agent SIGKILLs itself right after journalling that phase (fault tests use it to kill the agent
at an exact point; it is never set in production).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from nodeagent.drivers import Driver, DriverError, ServerFacts
from nodeagent.journal import Journal, Txn
from tlsroll import httpcheck, logs
from tlsroll.errors import TerminalError
from tlsroll.fsutil import PRIVATE, write_atomic

log = logs.get_logger(__name__)

CRASH_ENV = "TLSROLL_AGENT_TEST_CRASH_AFTER"
DRAIN_TIMEOUT = 10.0
BACKWARD_ATTEMPTS = 3


class Phase(StrEnum):
    """Where a transaction is: the last step the journal recorded (see the tables below)."""

    STARTED = "started"
    FROZEN = "frozen"
    CONFIG_WRITTEN = "config_written"
    RESTARTED = "restarted"
    VERIFIED = "verified"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    RESTORED = "restored"
    RB_RESTARTED = "rb_restarted"
    RB_VERIFIED = "rb_verified"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


# phase -> (action, phase after it)
FORWARD: dict[str, tuple[str, str]] = {
    "started": ("freeze", "frozen"),
    "frozen": ("write_config", "config_written"),
    "config_written": ("restart", "restarted"),
    "restarted": ("verify", "verified"),
    "verified": ("unfreeze", "completed"),
}
BACKWARD: dict[str, tuple[str, str]] = {
    "rolling_back": ("restore_config", "restored"),
    "restored": ("restart", "rb_restarted"),
    "rb_restarted": ("verify_source", "rb_verified"),
    "rb_verified": ("unfreeze", "rolled_back"),
}
TERMINAL = {"completed", "rolled_back", "failed"}


class StepFailed(TerminalError):
    pass


def _describe(exc: Exception) -> str:
    """Our own errors say what happened; anything else (an admin's command printing JSON
    without a field, say) also names its type."""
    if isinstance(exc, StepFailed | DriverError | OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _log_crash(task: asyncio.Task[Txn]) -> None:
    """A transaction task must never die silently: the journal resumes it at the next start,
    but the log has to say why it stopped now."""
    exc = None if task.cancelled() else task.exception()
    if isinstance(exc, Exception):
        log.error("txn.crashed", task=task.get_name(), error=_describe(exc))


@dataclass(frozen=True)
class Plan:
    """Everything a transaction needs to run, fixed when it starts (journalled as JSON)."""

    facts: ServerFacts
    source_schemes: tuple[str, ...]
    target_schemes: tuple[str, ...]
    new_config_file: Path  # the target config, prepared before the transaction starts
    backup_file: Path  # the source config, saved before the first write
    ca_file: Path
    target_fingerprint: str  # the certificate https must present after the switch ("" = any)
    # What is live once the transaction completes: https files and address for the bootstrap
    # service (cert_file, key_file, ca_file, verifier_file, server_url), or None for http.
    live_tls: dict[str, str] | None = None
    live_before: dict[str, str] | None = None  # what was live when it started (for rollback)
    keep_frozen: bool = False  # scope freeze: the leader unfreezes when the rollout ends

    def to_json(self) -> dict[str, Any]:
        f = self.facts
        return {
            "facts": [f.address, f.app_path, f.http_port, f.https_port, list(f.schemes)],
            "source_schemes": list(self.source_schemes),
            "target_schemes": list(self.target_schemes),
            "new_config_file": str(self.new_config_file),
            "backup_file": str(self.backup_file),
            "ca_file": str(self.ca_file),
            "target_fingerprint": self.target_fingerprint,
            "live_tls": self.live_tls,
            "live_before": self.live_before,
            "keep_frozen": self.keep_frozen,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        a, p, hp, sp, schemes = data["facts"]
        return cls(
            facts=ServerFacts(a, p, hp, sp, tuple(schemes)),
            source_schemes=tuple(data["source_schemes"]),
            target_schemes=tuple(data["target_schemes"]),
            new_config_file=Path(data["new_config_file"]),
            backup_file=Path(data["backup_file"]),
            ca_file=Path(data["ca_file"]),
            target_fingerprint=data["target_fingerprint"],
            live_tls=data.get("live_tls"),
            live_before=data.get("live_before"),
            keep_frozen=bool(data.get("keep_frozen", False)),
        )


def prepare(txn_dir: Path, rollout_id: str, kind: str, new_config: bytes) -> tuple[Path, Path]:
    """Write the target config where the transaction will find it; return (new, backup)."""
    txn_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    new_file = txn_dir / f"{rollout_id}-{kind}.new"
    write_atomic(new_file, new_config, PRIVATE)
    return new_file, txn_dir / f"{rollout_id}-{kind}.old"


class Runner:
    """Runs transactions as asyncio tasks, one at a time per node."""

    def __init__(
        self,
        journal: Journal,
        driver: Driver,
        clock: Callable[[], dt.datetime],
        on_complete: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.journal = journal
        self.driver = driver
        self.clock = clock
        self.on_complete = on_complete  # told when what is live has changed
        self.tasks: dict[tuple[str, str], asyncio.Task[Txn]] = {}
        self.crash_after = os.environ.get(CRASH_ENV, "")

    def busy_with(self) -> Txn | None:
        running = self.journal.unfinished()
        return running[0] if running else None

    def start(self, txn: Txn) -> None:
        key = (txn.rollout_id, txn.kind)
        if key in self.tasks and not self.tasks[key].done():
            return
        task = asyncio.create_task(self.run(txn), name=f"txn-{key}")
        task.add_done_callback(_log_crash)
        self.tasks[key] = task

    def resume_all(self) -> list[Txn]:
        pending = self.journal.unfinished()
        for txn in pending:
            log.warning("txn.resuming", rollout_id=txn.rollout_id, kind=txn.kind, phase=txn.phase)
            self.start(txn)
        return pending

    async def close(self, grace: float) -> None:
        """Give running transactions ``grace`` seconds to end, then stop them (the journal lets
        the next start resume them)."""
        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=grace)
        for task in running:
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    # --- the loop -----------------------------------------------------------------------------

    async def run(self, txn: Txn) -> Txn:
        plan = Plan.from_json(txn.plan)
        while txn.phase not in TERMINAL:
            if txn.phase in FORWARD:
                action, after = FORWARD[txn.phase]
                attempts = 1
            else:
                action, after = BACKWARD[txn.phase]
                attempts = BACKWARD_ATTEMPTS
            self.journal.event(txn, action, "begin")
            try:
                changes = await self._attempt(action, txn, plan, attempts)
            except Exception as exc:  # any failure rolls back: a node must never stay frozen
                detail = _describe(exc)
                reason = detail if detail.startswith(f"{action}:") else f"{action}: {detail}"
                self.journal.event(txn, action, "error", {"reason": reason})
                if txn.phase in FORWARD:
                    log.warning(
                        "txn.rolling_back",
                        rollout_id=txn.rollout_id,
                        kind=txn.kind,
                        failed_step=action,
                        reason=reason,
                    )
                    txn = self.journal.update(
                        txn,
                        phase="rolling_back",
                        reason=reason,
                        plan={**txn.plan, "failed_phase": txn.phase},
                    )
                else:
                    txn = await self._give_up(txn, reason)
                continue
            if after in TERMINAL:
                changes |= {"outcome": after, "ended_at": self.clock()}
            if after == "completed":
                self.journal.set_live_tls(plan.live_tls)
            txn = self.journal.update(txn, phase=after, **changes)
            if after == "completed" and self.on_complete is not None:
                try:
                    await self.on_complete()
                except Exception as exc:  # the transaction is done; a listener's trouble is not
                    log.error("txn.on_complete_failed", error=_describe(exc))
            log.info("txn.step", rollout_id=txn.rollout_id, kind=txn.kind, step=action, phase=after)
            if self.crash_after == after:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook, see module docstring
        return txn

    async def _attempt(self, action: str, txn: Txn, plan: Plan, attempts: int) -> dict[str, Any]:
        for attempt in range(1, attempts + 1):
            try:
                return await self._act(action, txn, plan)
            except Exception:
                if attempt == attempts:
                    raise
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _give_up(self, txn: Txn, reason: str) -> Txn:
        """The way back failed: say so, and do not leave the server frozen."""
        log.error("txn.failed", rollout_id=txn.rollout_id, kind=txn.kind, reason=reason)
        try:
            await self.driver.unfreeze()
        except (DriverError, OSError) as exc:
            reason += f"; and could not lift the freeze: {exc}"
        return self.journal.update(
            txn,
            phase="failed",
            outcome="failed",
            reason=f"{txn.reason}; then {reason}",
            ended_at=self.clock(),
        )

    # --- the actions --------------------------------------------------------------------------

    async def _act(self, action: str, txn: Txn, plan: Plan) -> dict[str, Any]:
        acts: dict[str, Callable[[Txn, Plan], Awaitable[dict[str, Any]]]] = {
            "freeze": self._freeze,
            "write_config": self._write_config,
            "restart": self._restart,
            "verify": self._verify_target,
            "unfreeze": self._unfreeze,
            "restore_config": self._restore_config,
            "verify_source": self._verify_source,
        }
        return await acts[action](txn, plan)

    async def _freeze(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        started = txn.freeze_started_at or self.clock()
        watermark = await self.driver.freeze(DRAIN_TIMEOUT)
        return {"watermark": watermark, "freeze_started_at": started}

    async def _write_config(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        # Save the source once: on a repeat after a crash the live file may already be new.
        if not plan.backup_file.exists():
            write_atomic(plan.backup_file, self.driver.read_config(), PRIVATE)
        self.driver.write_config(plan.new_config_file.read_bytes())
        return {}

    async def _restart(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        if txn.phase == "restored" and not txn.plan.get("restart_needed", True):
            return {}
        t0 = time.monotonic()
        await self.driver.restart()
        return {"restart_seconds": round(txn.restart_seconds + time.monotonic() - t0, 3)}

    async def _verify(
        self, plan: Plan, schemes: tuple[str, ...], fingerprint: str, watermark: int | None
    ) -> None:
        f = plan.facts
        ca_pem = plan.ca_file.read_bytes()
        problems: list[str | None] = []
        for attempt in range(3):
            problems = []
            if "https" in schemes:
                problems.append(
                    await asyncio.to_thread(
                        httpcheck.check_https,
                        f.address,
                        f.https_port,
                        f.app_path,
                        ca_pem,
                        fingerprint,
                    )
                )
            elif await asyncio.to_thread(httpcheck.port_open, f.address, f.https_port):
                problems.append(f"port {f.https_port} still open")
            if "http" in schemes:
                problems.append(
                    await asyncio.to_thread(
                        httpcheck.check_http, f.address, f.http_port, f.app_path
                    )
                )
            elif await asyncio.to_thread(httpcheck.port_open, f.address, f.http_port):
                problems.append(f"port {f.http_port} still open (plain http must be closed)")
            if watermark is not None:
                now = await self.driver.watermark()
                if now != watermark:
                    problems.append(f"write watermark moved from {watermark} to {now} while frozen")
            if not any(problems):
                return
            await asyncio.sleep(0.3 * (attempt + 1))
        raise StepFailed("; ".join(p for p in problems if p))

    async def _verify_target(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        await self._verify(plan, plan.target_schemes, plan.target_fingerprint, txn.watermark)
        return {}

    async def _verify_source(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        await self._verify(plan, plan.source_schemes, "", None)
        return {}

    async def _unfreeze(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        if plan.keep_frozen:
            return {}  # the rollout's scope freeze goes on; the leader lifts it at the end
        await self.driver.unfreeze()
        return {"freeze_ended_at": self.clock()}

    async def _restore_config(self, txn: Txn, plan: Plan) -> dict[str, Any]:
        """Put the source config back if the live one is not it; say if a restart is needed."""
        failed_phase = txn.plan.get("failed_phase", "started")
        restart_needed = failed_phase in ("config_written", "restarted", "verified")
        if plan.backup_file.exists():
            source = plan.backup_file.read_bytes()
            if self.driver.read_config() != source:
                self.driver.write_config(source)
                restart_needed = True
        return {"plan": {**txn.plan, "restart_needed": restart_needed}}
