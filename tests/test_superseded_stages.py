"""Stage files of superseded certificates (review rev58a L11): a node keeps in
``tlsroll-tls/<rollout>/`` what each rollout staged (key, certificate, CA, the password's
verifier file). The agent removed only directories its journal knew nothing of, and the
journal knows every rollout ever run: after ten rollouts five directories were left per node,
each with the private key of a certificate superseded (and as a rule revoked) since.

Now a node keeps only what is needed: what is live, what a stage or transaction not finished
needs, and what the rollback of the newest switch restores until its rollout ends (the leader
rolls a switch back when its confirm's outside check fails). The rest goes when a transaction
ends on the node, and when the leader says (``ended_stages``) that the rollout whose way back
the agent kept has ended. Real leader, agents and reference servers (``cluster_of``)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, cast

import pytest
import structlog.testing

from nodeagent import service
from nodeagent.drivers import Driver
from nodeagent.journal import Journal
from nodeagent.service import NodeAgentService
from tests.cluster import LEADER_POLL, wait_until
from tests.nodeside import Node, cluster_of, read_only
from tests.test_bad_config import NO_DAC, needs_root
from tests.test_rollback_reach import password_file, phase_1_awaiting
from tests.test_switch import ConfigOnly, a_stage, journal_switches
from tests.test_way_back_edit_detection import an_agent
from tlsroll import dbthread, pki

LONG = 240  # seconds a CLI call with --wait may take
CERT = ("server.key", "server.pem", "ca.pem")
REMOVALS = ("stage.removed", "stage.files_removed")


def stage_files(node: Node) -> set[str]:
    """Every file in the node's stage directories, as ``<rollout>/<name>``."""
    root = node.config_dir / "tlsroll-tls"
    if not root.exists():
        return set()
    return {f"{d.name}/{f.name}" for d in root.iterdir() for f in d.iterdir()}


def holding(node: Node, files: set[str]) -> Callable[[], bool]:
    """Whether the node's stage files are ``files`` now (a wait's condition)."""
    return lambda: stage_files(node) == files


def live_files(node: Node) -> list[str]:
    """The files the node's journal holds live (``live_tls``)."""
    with sqlite3.connect(node.journal_path) as db:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'live_tls'").fetchone()
    live: dict[str, str] = json.loads(value)
    return [v for k, v in live.items() if k.endswith("_file") and v]


def test_superseded_stage_files_go_and_the_way_back_still_works(tmp_path: Path) -> None:
    """A transitional enable-tls (its password's verifier file staged beside its key),
    finalized, then two rotations: once the last has ended, each node keeps exactly the
    files its server reads (the last rotation's key, certificate and CA, and the verifier
    file the first switch put beside its own key); no key of a superseded certificate is
    left. Each removal is logged, with no secret. The way back to http (``rollout
    rollback``) still works after the sweep, and leaves no stage file behind."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        phase1 = phase_1_awaiting(cluster, tmp_path)
        for node in nodes:  # the transitional switch's way back is still open: all kept
            assert stage_files(node) == {
                *(f"{phase1}/{f}" for f in CERT),
                f"{phase1}/auth-verifier.json",
            }
        done = cluster.cli(
            "rollout", "finalize", phase1, "--force", "--yes", "--wait", timeout=LONG
        )
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(
            lambda: cluster.schema_json(phase1)["rollouts"][0]["state"] == "completed",
            LONG,
            "phase 1 finalized",
            LEADER_POLL,
        )
        rotations = []
        for _ in range(2):
            rotate = cluster.cli(
                *("rollout", "start", "--change", "rotate-cert", "--scope", "cluster"),
                *("--yes", "--wait"),
                timeout=LONG,
            )
            assert rotate.returncode == 0, rotate.stdout + rotate.stderr
            rollout = cluster.newest_rollout()
            assert rollout["change"] == "rotate-cert" and rollout["state"] == "completed"
            rotations.append(str(rollout["id"]))
        last = rotations[-1]
        wanted = {
            f"{phase1}/auth-verifier.json",
            f"{phase1}/ca.pem",  # (the way back to http checks a return to https with it)
            *(f"{last}/{f}" for f in CERT),
        }
        for node in nodes:
            wait_until(holding(node, wanted), 30, f"{node.name} keeping what is live", LEADER_POLL)
            root = node.config_dir / "tlsroll-tls"
            live = {Path(f).relative_to(root).as_posix() for f in live_files(node)}
            assert live == wanted - {f"{phase1}/ca.pem"}
            served = pki.load_cert_pem((node.stage_dir(last) / "server.pem").read_bytes())
            assert node.served_fingerprint() == pki.fingerprint(served)
            assert node.agent is not None
            removed = {
                (e["event"], e.get("rollout_id"))
                for e in node.agent.log_events()
                if e["event"] in REMOVALS
            }
            assert removed == {
                ("stage.files_removed", phase1),
                ("stage.removed", rotations[0]),
            }, removed
            text = node.agent.log_text()
            assert "PRIVATE KEY" not in text
            assert password_file(tmp_path).read_text().strip() not in text

        # The way back to http still works after the sweep, and leaves nothing staged.
        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stdout + back.stderr
        wait_until(
            lambda: cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted"),
            LONG,
            "the way back",
            LEADER_POLL,
        )
        way_back = cluster.newest_rollout()
        assert way_back["change"] == "disable-tls" and way_back["undoes"] == phase1
        assert way_back["state"] == "completed", way_back
        for node in nodes:
            assert node.server.status()["listen"] == ["http"]
            assert node.get("http").status == 200
            wait_until(holding(node, set()), 30, f"{node.name} keeping no file", LEADER_POLL)


def test_a_sweep_that_failed_after_the_rollout_ended_is_tried_again(tmp_path: Path) -> None:
    """Review of s59 L5: when the leader says the rollout of the newest switch has ended, the
    journal closes that way back once (``Journal.end_way_back``) and the heartbeat names it
    no more, so the leader never says it again; a sweep that failed then was tried again only
    at the next transaction's end or the agent's next start, the superseded key left on the
    node meanwhile. The agent now tries again by itself, after a backoff. The failure is a
    real one: the first switch's stage directory is a read-only bind mount of itself (root),
    so that removing its key and certificate fails (EROFS); once the mount is gone, the
    retry removes them, with no transaction and no restart in between."""
    with cluster_of(tmp_path, 1) as (cluster, nodes):
        [node] = nodes
        agent = node.agent
        assert agent is not None
        first = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--yes", "--wait"),
            *("--password-file", str(password_file(tmp_path))),
            timeout=LONG,
        )
        assert first.returncode == 0, first.stdout + first.stderr
        switch = str(cluster.newest_rollout()["id"])
        directory = node.stage_dir(switch)
        assert (directory / "server.key").exists()
        with read_only(directory):
            rotate = cluster.cli(
                *("rollout", "start", "--change", "rotate-cert", "--scope", "cluster"),
                *("--yes", "--wait"),
                timeout=LONG,
            )
            assert rotate.returncode == 0, rotate.stdout + rotate.stderr
            rotation = cluster.newest_rollout()
            assert rotation["change"] == "rotate-cert" and rotation["state"] == "completed"
            # The rotation's end: its way back restores the first switch's files, kept. Once
            # the leader says the rotation ended, they go: refused by the read-only mount.
            wait_until(
                lambda: "stage.remove_failed" in agent.event_names(),
                30,
                "the sweep after the rollout's end to fail",
                LEADER_POLL,
            )
            assert (directory / "server.key").exists()
        begun, pid = agent.event_names().count("txn.started"), agent.pid
        wait_until(lambda: not (directory / "server.key").exists(), 30, "the retry", LEADER_POLL)
        assert not (directory / "server.pem").exists()
        assert (directory / "ca.pem").exists()  # (the way back to http checks with it)
        events = agent.log_events()
        names = [e["event"] for e in events]
        assert "stage.sweep_again" in names
        failed = names.index("stage.remove_failed")
        assert "stage.files_removed" in names[failed:], names[failed:]
        removed = [e for e in events if e["event"] == "stage.files_removed"]
        assert removed[-1]["rollout_id"] == switch, removed
        assert sorted(removed[-1]["files"]) == ["server.key", "server.pem"], removed
        assert agent.event_names().count("txn.started") == begun  # no transaction did it
        assert agent.pid == pid  # nor a start
        assert "PRIVATE KEY" not in agent.log_text()


# --- the agent's own retries of a sweep, in process (review of s60a) ---------------------------
# A real ``NodeAgentService`` with a real journal (SQLite) and real stage directories; the
# failures are real ones (a read-only bind mount of a stage directory: EROFS), and the retries
# come sooner (``SWEEP_RETRY_FIRST``).


def in_process(tmp_path: Path) -> tuple[NodeAgentService, Journal, Path]:
    """An agent whose journal ran two switches (``r1``, then ``r2``, live) whose rollout has
    ended: ``r1``'s key and certificate are superseded (a sweep removes them; its CA stays,
    the first switch's). Returned with the journal and that directory."""
    conf = tmp_path / "conf"
    root = conf / "tlsroll-tls"
    journal = Journal(tmp_path / "journal.sqlite3")
    for rid in ("r1", "r2"):
        a_stage(root, rid)
    before = journal_switches(
        journal,
        root,
        lambda rid: {k: str(root / rid / f) for k, f in zip(TLS_KEYS, CERT, strict=True)},
        "r1",
        "r2",
    )
    assert journal.end_way_back(["r2"]) == "r2"
    assert before is not None
    config = conf / "server.toml"
    config.write_text("".join(f'{k} = "{v}"\n' for k, v in before.items()))
    return an_agent(tmp_path, journal, cast(Driver, ConfigOnly(config))), journal, root / "r1"


TLS_KEYS = ("key_file", "cert_file", "ca_file")


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait (on the loop) until ``check()``; an AssertionError naming ``what`` if it never
    comes (a bound, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.01)


def said(logs: list[MutableMapping[str, Any]], event: str) -> int:
    return sum(e["event"] == event for e in logs)


async def test_the_agents_stop_ends_its_sweeps_and_their_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s60a M1: a sweep that failed is tried again after a while (a timer), and
    nothing cancelled that timer, nor a sweep's task, when the agent stopped: a retry could
    run while it stopped, or after its journal closed (and fail there, and be tried again).
    ``NodeAgentService.close`` (the agent's stop, before the journal closes) cancels the
    retry waiting and the sweep under way, and no sweep begins after it: nothing of theirs
    runs or logs once it returned, though the failure is gone by then."""
    monkeypatch.setattr(service, "SWEEP_RETRY_FIRST", 0.5)
    agent, journal, r1 = in_process(tmp_path)
    try:
        with structlog.testing.capture_logs() as logs:
            with read_only(r1):
                agent.sweep_stages()
                await until(lambda: said(logs, "stage.sweep_again") > 0, "retry owed")
                assert said(logs, "stage.remove_failed") >= 1
                async with agent._lock:  # a sweep under way: it waits for the command lock
                    agent.sweep_stages()
                    waiting = [t for t in agent._sweeps if not t.done()]
                    retry = agent._sweep_retry
                    assert waiting and retry is not None
                    at_close = len(logs)
                    await agent.close()
                assert retry.cancelled() and agent._sweep_retry is None
                assert all(t.cancelled() for t in waiting)
                agent.sweep_stages()  # (a transaction's end, say, after the stop: none)
                assert not [t for t in agent._sweeps if not t.done()]
            journal.close()
            # Longer than the retry the timer held (0.5 s): none comes.
            await asyncio.sleep(1.0)
        assert logs[at_close:] == [], logs[at_close:]
        assert (r1 / "server.key").exists()  # left for the next start
    finally:
        journal.close()


async def test_a_sweep_the_store_thread_runs_keeps_the_command_lock_through_the_stop(
    tmp_path: Path,
) -> None:
    """Review of s60 L1: the agent's stop cancels a sweep's task (``close``), but a sweep the
    store's thread has begun runs to its end there; the task let go of the command lock at the
    cancel, and another command's removals (a forget of ended stages, a CreateCSR) could run
    beside it. The task now holds the lock until the thread's call ended; and a forget of
    ended stages that comes once the agent stops does nothing (the next start sweeps)."""
    agent, journal, r1 = in_process(tmp_path)
    gate = threading.Event()
    try:
        # The store's thread busy with something else: the sweep's call waits behind it.
        ahead = asyncio.ensure_future(dbthread.run(gate.wait, 30))
        agent.sweep_stages()
        await until(agent._lock.locked, "the sweep holding the command lock")
        (task,) = agent._sweeps
        closing = asyncio.ensure_future(agent.close())
        await until(lambda: agent._closing, "the stop begun")
        for _ in range(20):  # the cancel delivered to the sweep's task
            await asyncio.sleep(0)
        assert agent._lock.locked() and not task.done()  # until the thread's call ended
        gate.set()
        await closing
        await ahead
        assert task.cancelled() and not agent._lock.locked()
        with structlog.testing.capture_logs() as logs:
            await agent.forget_ended(["r1", "r2"])
        assert logs == [] and (r1 / "server.key").exists()  # left for the next start
        assert journal.staged("r1") is not None
    finally:
        gate.set()
        journal.close()


async def test_a_sweep_that_keeps_failing_is_given_up_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s60a L3: the retries' schedule ends. A sweep that fails for good (here a
    read-only bind mount over the stage directory, for as long as the test) is tried again
    ``SWEEP_RETRIES`` times, then given up once (``stage.sweep_given_up``) with nothing
    scheduled after: the next transaction's end, or the agent's next start, tries again."""
    monkeypatch.setattr(service, "SWEEP_RETRY_FIRST", 0.001)
    agent, journal, r1 = in_process(tmp_path)
    try:
        with structlog.testing.capture_logs() as logs, read_only(r1):
            agent.sweep_stages()
            await until(lambda: said(logs, "stage.sweep_given_up") > 0, "giving up")
            await until(lambda: all(t.done() for t in agent._sweeps), "the last sweep's end")
            assert agent._sweep_retry is None
            await asyncio.sleep(0.3)  # (the last retry waited 0.128 s: none comes after)
            assert agent._sweep_retry is None
        assert said(logs, "stage.sweep_given_up") == 1
        assert said(logs, "stage.sweep_again") == service.SWEEP_RETRIES
        # Each sweep: the key and the certificate (the first switch's CA stays: the way back
        # to http checks with it).
        assert said(logs, "stage.remove_failed") == 2 * (service.SWEEP_RETRIES + 1)
        assert [e["retry"] for e in logs if e["event"] == "stage.sweep_again"] == list(
            range(1, service.SWEEP_RETRIES + 1)
        )
        assert logs[-1]["event"] == "stage.sweep_given_up", logs[-1]
        assert (r1 / "server.key").exists()
        # Given up, the count starts again: a later failure gets its retries again.
        with structlog.testing.capture_logs() as later:
            with read_only(r1):
                agent.sweep_stages()
                await until(lambda: said(later, "stage.sweep_again") > 0, "a retry again")
            await until(lambda: not (r1 / "server.key").exists(), "the retry's removal")
        assert next(e["retry"] for e in later if e["event"] == "stage.sweep_again") == 1
        await agent.close()
    finally:
        journal.close()


async def test_a_forgotten_stage_whose_removal_failed_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s60a M2: the leader says a rollout ended (``forget_ended``): the journal
    forgets its stages and their directories go (``plans.remove_stages``). One whose removal
    failed was never tried again while the agent ran, though README says it is: the journal
    knows it no more, so the sweeps skip it. The agent keeps it and tries again with the
    sweep's retries. A rollout whose stage is made again meanwhile (the journal knows it again)
    keeps its directory."""
    monkeypatch.setattr(service, "SWEEP_RETRY_FIRST", 0.05)
    agent, journal, _ = in_process(tmp_path)
    root = tmp_path / "conf" / "tlsroll-tls"
    gone, again = a_stage(root, "r3"), a_stage(root, "r4")
    try:
        with structlog.testing.capture_logs() as logs:
            with read_only(gone), read_only(again):
                for rid in ("r3", "r4"):  # (a CreateCSR forgets every other unswitched stage)
                    journal.record_csr(rid, root / rid / "server.key", b"csr")
                    await agent.forget_ended([rid])
                failed = {e["path"] for e in logs if e["event"] == "stage.remove_failed"}
                assert failed == {str(gone), str(again)}, failed
                assert said(logs, "stage.sweep_again") >= 1
                # The leader stages r4 again (a key made again: the journal knows it).
                journal.record_csr("r4", again / "server.key", b"csr again")
            await until(lambda: not gone.exists(), "the retry's removal")
            await until(lambda: agent._sweep_retry is None and not agent._unremoved, "the end")
        removed = [e for e in logs if e["event"] == "stage.removed"]
        assert [(e["rollout_id"], e["why"]) for e in removed] == [("r3", "its rollout ended")]
        assert (again / "server.key").exists()
        await agent.close()
    finally:
        journal.close()


@needs_root
async def test_a_stage_a_create_csr_ended_whose_removal_failed_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s60 L2: a CreateCSR forgets every other unswitched stage and removes its
    directory (``_record_csr``); one whose removal failed is kept (``_unremoved``) and must be
    tried again (``_retry_removals``), as ``forget_ended``'s are: no transaction ends and no
    sweep comes on its own while the next rollout only stages. The key itself is not made here
    (the crypto worker's part: ``_new_key`` journals the CSR as after the worker's answer);
    the command's path from there is the agent's own, under its lock."""
    monkeypatch.setattr(service, "SWEEP_RETRY_FIRST", 0.05)
    agent, journal, _ = in_process(tmp_path)
    root = tmp_path / "conf" / "tlsroll-tls"
    older = a_stage(root, "r3")
    journal.record_csr("r3", older / "server.key", b"csr")

    async def new_key(_: Driver, rollout_id: str) -> tuple[bytes, set[str]]:
        key_file = a_stage(root, rollout_id) / "server.key"
        return await asyncio.to_thread(agent._record_csr, rollout_id, key_file, b"csr r4")

    monkeypatch.setattr(agent, "_new_key", new_key)
    try:
        with structlog.testing.capture_logs() as logs:
            with read_only(older):
                assert await agent._csr(cast(Driver, None), "r4") == b"csr r4"
                failed = [e["path"] for e in logs if e["event"] == "stage.remove_failed"]
                assert failed == [str(older)], failed
            await until(lambda: not older.exists(), "the retry's removal of r3's stage")
            await until(lambda: agent._sweep_retry is None and not agent._unremoved, "the end")
        removed = [(e["rollout_id"], e["why"]) for e in logs if e["event"] == "stage.removed"]
        assert removed == [("r3", "a later rollout staged")], removed
        assert (root / "r4" / "server.key").exists()  # the stage the CreateCSR made stays
        await agent.close()
    finally:
        journal.close()


# A stage directory's parent that the agent's user cannot search: root without the
# capabilities that let it read any file (``NO_DAC``, as the agent under its unit), in a child.
UNSEARCHABLE = """
import json, sys
import structlog.testing
from pathlib import Path
from typing import cast
from nodeagent import plans
from nodeagent.drivers import Driver
from nodeagent.journal import Journal


class ConfigOnly:  # (tests.test_switch's: importing it would start the tests' gRPC setup)
    def __init__(self, config_file: Path) -> None:
        self.config_file = config_file

    def read_config(self) -> bytes:
        return self.config_file.read_bytes()


tmp = Path(sys.argv[1])
conf = tmp / "conf"
journal = Journal(tmp / "journal.sqlite3")
driver = cast(Driver, ConfigOnly(conf / "server.toml"))
r1 = journal.staged("r1")
assert r1 is not None
journal.forget_stages(["r1"])
conf.chmod(0o600)  # no search permission: lstat of conf/tlsroll-tls fails with EACCES
try:
    with structlog.testing.capture_logs() as logs:
        swept = plans.sweep_stage_dirs(journal, driver, at_start=False)
        failed = [s.rollout_id for s in plans.remove_stages([r1], "its rollout ended")]
finally:
    conf.chmod(0o700)
    journal.close()
print(json.dumps({"swept": swept, "failed": failed, "logs": logs}))
"""


@needs_root
def test_a_stage_root_the_agent_cannot_look_at_is_a_failed_removal(
    tmp_path: Path,
) -> None:
    """Review of s60 L: a ``tlsroll-tls`` whose lstat failed for any reason was taken as
    "none of tlsroll's": the sweep said it did all it meant to and the forgotten stages'
    removal succeeded, so nothing tried again while the agent ran, the superseded key left on
    the node. Only a missing one is none now; one the agent cannot look at (EACCES here: its
    config's directory not searchable by the agent's user) is a failed removal, which the agent
    tries again (the tests above)."""
    _agent, journal, r1 = in_process(tmp_path)
    journal.close()
    ran = subprocess.run(
        [*NO_DAC, sys.executable, "-c", UNSEARCHABLE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout.splitlines()[-1])
    assert (result["swept"], result["failed"]) == (False, ["r1"]), result
    said = [e for e in result["logs"] if e["event"] == "stage.remove_failed"]
    assert [e.get("rollout_id") for e in said] == [None, "r1"], said  # the sweep's, r1's
    assert all("ermission denied" in e["error"] for e in said), said
    assert (r1 / "server.key").exists()  # left for the retry
