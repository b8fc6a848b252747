"""The agent's guard on every command (``NodeAgentService._command``): the rollout epoch.

Issue 15: each command read the journal's highest epoch and then wrote (or checked) it, two
hand-offs to worker threads before the command's own work, on every Preflight, Stage and
Switch of a rollout whose epoch the journal already holds. The agent is the journal's only
writer of the epoch, so it keeps the value it last read or wrote, and a command at exactly
that epoch is admitted without either. These run the real servicer on a real journal file;
only the caller's certificate check is left out (no gRPC call here: the guard is what is
tested, and tests/test_identity.py covers the certificate and the refusals end to end).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
import structlog
import structlog.testing

from leader.agent_client import NodeStoreUnavailable, call_failed
from nodeagent import service
from nodeagent.drivers import ReferenceDriver, ServerFacts, config_stat
from nodeagent.journal import Journal, JournalError, Txn
from nodeagent.service import NodeAgentService
from nodeagent.transaction import Phase, Plan
from nodeagent.trust import EpochNotAnnounced, LeaderTrust
from tests.conftest import IssuedCert
from tests.refserver_helper import RefServer
from tlsroll import dbthread, pki, probe, rpc
from tlsroll.clients import ClientsView
from tlsroll.enums import TxnKind
from tlsroll.logsample import SampledLog
from tlsroll.rpc import RpcStatusError
from tlsroll.v1 import agent_pb2
from tlsroll.wire import TXN_KIND


class CountingJournal(Journal):
    """The journal, counting its epoch reads and writes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.epoch_calls: list[str] = []

    def highest_epoch(self) -> int:
        self.epoch_calls.append("highest_epoch")
        return super().highest_epoch()

    def admit_epoch(self, epoch: int) -> int | None:
        self.epoch_calls.append(f"admit_epoch {epoch}")
        return super().admit_epoch(epoch)


def make_service(tmp_path: Path, journal: Journal, announced: int) -> NodeAgentService:
    trust = LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem")
    trust.announce(announced)
    return NodeAgentService(
        cast(Any, None),  # cfg: not read by the guard
        cast(Any, None),  # identity: not read by the guard
        journal,
        None,
        None,
        lambda: dt.datetime.now(dt.UTC),
        trust=trust,
    )


async def command(agent: NodeAgentService, epoch: int) -> str:
    return await agent._command(cast(Any, None), agent_pb2.Command(rollout_id="r1", epoch=epoch))


async def refused(agent: NodeAgentService, epoch: int) -> str:
    with pytest.raises(RpcStatusError) as caught:
        await command(agent, epoch)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    return str(caught.value)


@pytest.fixture(autouse=True)
def any_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "require_leader", lambda _context, _trust: None)


async def test_a_command_at_the_epoch_the_journal_holds_reads_and_writes_nothing(
    tmp_path: Path,
) -> None:
    journal = CountingJournal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    assert await command(agent, 3) == "r1"
    assert journal.epoch_calls == ["highest_epoch", "admit_epoch 3"]
    journal.epoch_calls.clear()

    for _ in range(3):  # the rest of the rollout: Preflight, Stage, Switch ...
        assert await command(agent, 3) == "r1"
    assert journal.epoch_calls == []
    assert journal.highest_epoch() == 3
    journal.close()


async def test_the_epoch_kept_in_memory_still_refuses_stale_and_unannounced_commands(
    tmp_path: Path,
) -> None:
    journal = CountingJournal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    await command(agent, 3)
    assert "stale epoch 2: this node has seen epoch 3" in await refused(agent, 2)
    await command(agent, 4)  # a newer leader state
    assert "stale epoch 3: this node has seen epoch 4" in await refused(agent, 3)
    with pytest.raises(EpochNotAnnounced):
        await command(agent, 6)
    journal.epoch_calls.clear()
    await command(agent, 4)
    assert journal.epoch_calls == []
    journal.close()

    # A new agent process on the same journal (whatever wrote it last) reads it again.
    again = CountingJournal(tmp_path / "journal.sqlite3")
    fresh = make_service(tmp_path, again, announced=5)
    assert "stale epoch 3: this node has seen epoch 4" in await refused(fresh, 3)
    assert again.epoch_calls == ["highest_epoch", "admit_epoch 3"]
    again.close()


async def test_a_command_while_another_s_epoch_is_being_checked_asks_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer epoch on its way into the journal: a command at the kept epoch that comes
    meanwhile does not take the shortcut (it would be admitted against a journal that may
    already hold the newer one), it asks the journal after it."""
    journal = CountingJournal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    await command(agent, 3)
    entered, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    admit = journal.admit_epoch

    def slow_admit(epoch: int) -> int | None:
        written = admit(epoch)
        if epoch == 4:
            loop.call_soon_threadsafe(entered.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        return written

    monkeypatch.setattr(journal, "admit_epoch", slow_admit)
    newer = asyncio.create_task(command(agent, 4))
    await entered.wait()
    stale = asyncio.create_task(command(agent, 3))
    await asyncio.sleep(0.05)
    release.set()
    assert await newer == "r1"
    with pytest.raises(RpcStatusError, match="stale epoch 3: this node has seen epoch 4"):
        await stale
    journal.close()


class StillDriver:
    """A managed server that is healthy and never changes (only what a Check reads)."""

    name = "still"

    def __init__(self, directory: Path) -> None:
        self.config_file = directory / "server.toml"
        self.config_file.write_text("")

    def facts(self) -> ServerFacts:
        return ServerFacts("127.0.0.1", "/app/", 8080, 8443, ("http", "https"))

    async def health(self) -> str | None:
        return None

    async def status_problem(self) -> str | None:  # (the preflight's: ``Driver``'s)
        return None

    def render_problem(self) -> str | None:  # (the checks' since review s66 walk M1)
        return None  # renders from no template

    def named_files(self) -> dict[str, str] | None:  # (a view's, on https: session 71)
        return None  # reads no files back from its config, as a template driver

    async def status(self) -> dict[str, Any]:
        return {"frozen": False, "watermark": 0}

    async def clients(self) -> ClientsView:
        return ClientsView()


def still_service(
    directory: Path, journal: Journal, driver: StillDriver, announced: int | None = None
) -> NodeAgentService:
    """A NodeAgentService over ``driver`` (its checks' config: node n1 on 127.0.0.1, a
    bootstrap port nobody holds), its leader's epoch ``announced`` if given."""
    names = type("N", (), {"common_name": "n1", "ips": ["127.0.0.1"], "dns": []})()
    with socket.socket() as s:  # a bootstrap port nobody holds
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = type("C", (), {"names": names, "bootstrap_port": port})()
    trust = LeaderTrust(directory / "ca.pem", "example.test", directory / "crl.pem")
    if announced is not None:
        trust.announce(announced)
    return NodeAgentService(
        cast(Any, cfg),
        cast(Any, None),
        journal,
        cast(Any, driver),
        None,
        lambda: dt.datetime.now(dt.UTC),
        trust=trust,
    )


async def test_the_checks_on_the_machine_take_one_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preflight's (and Check's) checks read the server's config, tried its ports and its
    config directory in three worker-thread hops, one after the other, before asking the
    server; now in one, while the server is asked (performance only: the same problems, in
    the same order). The server's view takes its own one (two before session 72), and its
    handshake."""
    journal = Journal(tmp_path / "journal.sqlite3")
    driver = StillDriver(tmp_path)
    agent = still_service(tmp_path, journal, driver)
    hops: list[str] = []
    real = asyncio.to_thread

    async def counted(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    def served_certificate(*_: object) -> bytes:  # (no handshake at a port of the host's)
        return b""

    monkeypatch.setattr(service, "served_certificate", served_certificate)
    monkeypatch.setattr(asyncio, "to_thread", counted)
    # (the checks' and the view's own threads, bounded: session 75, statvfsbound)
    for worker in (agent.fs_checks, agent.fs_view):

        def counting(bounded: Any) -> Any:
            async def counted_bounded(func: Any, /, *args: Any, **kwargs: Any) -> Any:
                hops.append(getattr(func, "__name__", repr(func)))
                return await bounded(func, *args, **kwargs)

            return counted_bounded

        monkeypatch.setattr(worker, "run", counting(worker.run))
    reply = await agent.Check(agent_pb2.CheckRequest(), cast(Any, None))
    assert reply.ok, reply.problems
    assert reply.new_url == "https://127.0.0.1:8443/app/"
    # The view's handshake (review s70 drift H1) is one hop more; its config stat is not
    # (in ``_live_files``' hop: it took one of its own, and this test failed on main). The
    # view's facts and files are one hop (session 72, servedcache: two before).
    assert sorted(hops) == ["_facts_and_files", "_local_checks", "served_certificate"], hops
    journal.close()


async def test_a_certificate_found_served_while_a_restart_ran_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s70 review1 L1: the agent keeps the certificate its handshake found for up to
    ``SERVED_RECHECK`` seconds while the config file, the server's pid and its own restart
    count stay the same. A handshake made while a restart of its own ran (begun, the old server
    still answering) found the old certificate; a driver whose status names no pid (an exec
    driver's) changed nothing after, and the rotated node said the old certificate for 30 s."""
    driver = type("Driver", (), {})()
    driver.restarts_begun = 1
    driver.restarting = asyncio.Event()  # a restart begun, not ended
    answers = [b"OLD", b"NEW"]
    monkeypatch.setattr(service, "served_certificate", lambda *_: answers.pop(0))
    svc = make_service(tmp_path, Journal(tmp_path / "journal.sqlite3"), 1)
    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, ("https",))

    def served() -> Any:
        return svc._served(cast(Any, driver), facts, {}, (1, 1, 1))

    assert await served() == b"OLD"  # the old server answered
    driver.restarting = None  # the restart ended: the new server serves the new certificate
    assert await served() == b"NEW"
    assert await served() == b"NEW"  # kept now (none left to answer)


async def test_the_heartbeat_after_a_switch_takes_the_certificate_its_verify_saw(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    loopback: Callable[[], str],
    issue_cert: Callable[..., IssuedCert],
) -> None:
    """Session 72, servedcache: after every switch the heartbeat made a TLS handshake of its
    own to learn the certificate served (``_served``), right after the verify's https check
    had been presented it. The verify's look now counts where the server that answered it is
    the one the driver started and still runs (its pid, the config file unchanged): no
    handshake. A restart outside tlsroll (another pid), or the config edited, still makes one.
    A real reference server; the handshakes counted."""
    address = loopback()
    cert = issue_cert(address, "node1")
    ca_pem = cert.ca_file.read_bytes()
    fingerprint = pki.fingerprint(pki.read_cert(cert.cert_file))
    served_pem = service.first_certificate(cert.cert_file.read_bytes())
    server = RefServer(
        tmp_path / "rs",
        address,
        listen=["https"],
        cert_file=cert.cert_file,
        key_file=cert.key_file,
    )
    driver = ReferenceDriver(server.config_path, tmp_path / "refserver.log")
    outside = ReferenceDriver(server.config_path, tmp_path / "refserver.log")  # (the admin's)
    handshakes: list[object] = []
    real = service.served_certificate

    def counted(*args: Any) -> bytes:
        handshakes.append(args)
        return real(*args)

    monkeypatch.setattr(service, "served_certificate", counted)
    journal = Journal(tmp_path / "journal.sqlite3")
    svc = make_service(tmp_path, journal, 1)
    facts = driver.facts()

    async def verify_then_beat() -> bytes:
        """A verify's https check, then the heartbeat's view of the certificate served."""
        assert await probe.check_https(address, 8443, server.app_path, ca_pem, fingerprint) is None
        status = await driver.status()
        return await svc._served(cast(Any, driver), facts, status, config_stat(server.config_path))

    try:
        await driver.start()  # (a switch's restart: the agent's own)
        assert await verify_then_beat() == served_pem
        assert handshakes == []  # one before
        await outside.stop()  # a restart outside tlsroll: another pid
        await outside.start()
        assert await verify_then_beat() == served_pem
        assert len(handshakes) == 1
        await driver.stop()
        await driver.start()
        assert await verify_then_beat() == served_pem
        assert len(handshakes) == 1  # the agent's own restart again: none
        server.write_config()  # the config edited (replaced) since the server started
        svc._served_seen = None  # (as after ``SERVED_RECHECK``)
        assert await verify_then_beat() == served_pem
        assert len(handshakes) == 2
    finally:
        await driver.stop()
        for child in driver._children + outside._children:
            child.kill()
            child.wait(10)
        journal.close()


async def test_get_transaction_answers_behind_the_journal_writes_handed_before_it(
    tmp_path: Path,
) -> None:
    """Review s72 refused, L6: a handler whose call was cut off (a stream reset reaches the
    leader first) has handed its transaction's begin to the store's thread, behind a write
    still running there; the leader asks GetTransaction at once. Read beside that thread
    (``asyncio.to_thread``), it answered "none" (NOT_FOUND) of a transaction journalled and
    begun a moment later. It now takes its turn on the store's thread: it answers with it."""
    journal = Journal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, ("https",))
    plan = Plan(facts, ("https",), ("http",), Path("/n"), Path("/b"), Path("/ca"), "").to_json()
    txn = Txn("r1", TxnKind.ROLLBACK, 1, Phase.STARTED, plan, dt.datetime.now(dt.UTC))
    gate = threading.Event()
    running = asyncio.ensure_future(dbthread.run(gate.wait, 30))  # a write under way
    begun = asyncio.ensure_future(dbthread.run(journal.create, txn))  # the cut-off handler's
    request = agent_pb2.GetTransactionRequest(rollout_id="r1", kind=TXN_KIND.wire(TxnKind.ROLLBACK))
    asked = asyncio.ensure_future(agent.GetTransaction(request, cast(Any, None)))
    queue = dbthread.executor()._work_queue  # what waits for the store's thread
    for _ in range(3000):  # until it answered beside the thread, or waits its turn on it
        if asked.done() or queue.qsize() >= 2:
            break
        await asyncio.sleep(0.01)
    gate.set()
    assert await running
    await begun
    found = await asked  # NOT_FOUND before (an RpcStatusError)
    assert (found.rollout_id, found.kind) == ("r1", TXN_KIND.wire(TxnKind.ROLLBACK))
    journal.close()


async def test_a_stale_leader_is_told_its_epoch_is_stale_before_a_held_transaction_s_reason(
    tmp_path: Path,
) -> None:
    """Session 71's held switch, L (session 73): a node holding a transaction on a journal it
    cannot write refuses every other begin with the hold's reason; a leader of an older epoch
    (a restored store, a second leader) was told that reason, not that its epoch is stale, and
    may take the node for one that needs the admin. The stale epoch is refused first, by a
    read (the held journal takes no write); a current leader still gets the hold's reason."""
    journal = CountingJournal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    assert await command(agent, 5) == "r1"
    hold = "needs the admin: its journal cannot be written (disk full: SQLITE_FULL)"
    agent.runner = cast(Any, type("Held", (), {"held": {("rheld", "switch"): hold[17:]}})())
    fresh = make_service(tmp_path, journal, announced=5)  # a new process: nothing kept yet
    fresh.runner = agent.runner
    for each in (agent, fresh):
        for begins in (TxnKind.SWITCH, TxnKind.ROLLBACK):
            with pytest.raises(RpcStatusError) as caught:
                await each._command(
                    cast(Any, None),
                    agent_pb2.Command(rollout_id="rother", epoch=4),
                    begins=begins,
                )
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert str(caught.value).startswith("stale epoch 4: this node has seen epoch 5")
            with pytest.raises(RpcStatusError) as caught:
                await each._command(
                    cast(Any, None),
                    agent_pb2.Command(rollout_id="rother", epoch=5),
                    begins=begins,
                )
            assert str(caught.value) == hold, str(caught.value)
    assert "admit_epoch 4" not in journal.epoch_calls  # no write was tried
    journal.close()


class UnreadableEpochJournal(Journal):
    """The journal whose epoch cannot be read (a disk that fails reads too)."""

    def highest_epoch(self) -> int:
        raise JournalError("journal j: disk I/O error (SQLITE_IOERR)")


async def test_a_held_node_whose_epoch_cannot_be_read_still_says_the_hold_s_reason(
    tmp_path: Path,
) -> None:
    """Review s73 revrefused, L: the stale epoch's read before a held transaction's reason
    (above) is a look only; one that fails (the journal held as it cannot be written may not
    read either) answered every command with the journal's error instead of the hold's reason
    ("needs the admin: …"). The hold's reason stands; a stale epoch the process has seen is
    refused still, from memory."""
    journal = UnreadableEpochJournal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    hold = "needs the admin: its journal cannot be written (disk I/O error)"
    agent.runner = cast(Any, type("Held", (), {"held": {("rheld", "switch"): hold[17:]}})())
    for begins in (TxnKind.SWITCH, TxnKind.ROLLBACK):
        with pytest.raises(RpcStatusError) as caught:
            await agent._command(
                cast(Any, None), agent_pb2.Command(rollout_id="rother", epoch=5), begins=begins
            )
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert str(caught.value) == hold, str(caught.value)
    agent._epoch = 5  # seen by this process
    with pytest.raises(RpcStatusError) as caught:
        await agent._command(
            cast(Any, None), agent_pb2.Command(rollout_id="rother", epoch=4), begins="switch"
        )
    assert str(caught.value).startswith("stale epoch 4: this node has seen epoch 5")
    journal.close()


@pytest.mark.parametrize(
    ("kind", "change", "said"),
    [
        (TxnKind.SWITCH, "finalize", "finalize"),
        (TxnKind.SWITCH, "enable-tls+http", "enable-tls+http"),
        (TxnKind.SWITCH, "", ""),  # journalled before the change was recorded
        (TxnKind.ROLLBACK, "http-written", ""),  # a way back's plan word is no switch's change
    ],
)
async def test_a_transaction_says_the_change_its_switch_journalled(
    tmp_path: Path, kind: TxnKind, change: str, said: str
) -> None:
    """Session 73 (s72 refused's L): GetTransaction's answer says a switch's change as its
    plan journalled it (``Transaction.change``), so that a leader asking after its step
    tells a switch of another change under the same rollout id from its own."""
    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, ("https",))
    plan = Plan(facts, ("http",), ("https",), Path("/n"), Path("/b"), Path("/ca"), "")
    journal = Journal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    txn = Txn("r1", kind, 1, Phase.STARTED, {**plan.to_json(), "change": change}, now())
    await dbthread.run(journal.create, txn)
    request = agent_pb2.GetTransactionRequest(rollout_id="r1", kind=TXN_KIND.wire(kind))
    found = await agent.GetTransaction(request, cast(Any, None))
    assert found.change == said
    journal.close()


@pytest.mark.parametrize(
    ("code", "words", "status"),
    [
        ("SQLITE_IOERR_SHMLOCK", "disk I/O error", grpc.StatusCode.UNAVAILABLE),
        ("SQLITE_BUSY", "database is locked", grpc.StatusCode.UNAVAILABLE),
        # a table locked by another connection of the process: said as the store's trouble
        # too, not "agent unreachable" (review s74 revdoubt L1)
        ("SQLITE_LOCKED", "database table is locked", grpc.StatusCode.UNAVAILABLE),
        # damaged: asking again does not mend it (a refusal, as before)
        ("SQLITE_CORRUPT", "database disk image is malformed", grpc.StatusCode.FAILED_PRECONDITION),
        # a disk that could not read the file back: damage too (``tlsroll.sqlite.unreadable``,
        # exit 4 at the agent's start), not asked again without end (review s74 revsmall)
        ("SQLITE_IOERR_READ", "disk I/O error", grpc.StatusCode.FAILED_PRECONDITION),
        ("SQLITE_IOERR_SHORT_READ", "disk I/O error", grpc.StatusCode.FAILED_PRECONDITION),
        ("SQLITE_FULL", "database or disk is full", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_get_transaction_whose_journal_read_fails_for_a_moment_is_asked_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: str,
    words: str,
    status: grpc.StatusCode,
) -> None:
    """Session 73's L: a journal read that failed for a moment (an I/O error, a lock) was a
    ``JournalError``, FAILED_PRECONDITION, which the leader takes for a refusal of the
    question (the node needs attention at once: ``leader.changes.ask_held``), where its
    other own failures are asked again. It is UNAVAILABLE now (asked again); a damaged
    journal stays a refusal, a full disk the node's full disk."""
    journal = Journal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)

    @contextlib.contextmanager
    def failing() -> Iterator[Any]:
        exc = sqlite3.OperationalError(words)
        exc.sqlite_errorname = code  # (as SQLite's module sets them)
        exc.sqlite_errorcode = getattr(sqlite3, code)
        raise exc
        yield  # pragma: no cover

    monkeypatch.setattr(journal._db, "read", failing)
    clock = [0.0]
    monkeypatch.setattr(
        rpc, "_STORE_TROUBLE", SampledLog(every=60, forget=60, clock=lambda: clock[0])
    )
    question = agent_pb2.GetTransactionRequest(rollout_id="r1", kind=TXN_KIND.wire(TxnKind.SWITCH))
    with structlog.testing.capture_logs() as logged:
        for clock[0] in (0.0, 5.0, 10.0, 61.0):  # asked again every few seconds, a minute on
            with pytest.raises(RpcStatusError) as caught:
                await agent.GetTransaction(question, cast(Any, Ctx()))
            assert caught.value.code == status, caught.value
            assert words in str(caught.value) and code in str(caught.value)
    # Review s74 L2: the agent answered UNAVAILABLE and logged nothing (its status map came
    # before ``error_status``'s line): a method's first such answer is logged now, with its
    # hint, then one a minute, the others summed up then.
    lines = [e for e in logged if str(e["event"]).startswith("rpc.unavailable")]
    if status is grpc.StatusCode.UNAVAILABLE:
        assert [e["event"] for e in lines] == [
            "rpc.unavailable",
            "rpc.unavailable",
            "rpc.unavailable_summary",
        ], lines
        assert lines[0]["method"] == "GetTransaction" and code in lines[0]["error"]
        assert "hint" in lines[0] and lines[2]["refused_not_logged"] == 2, lines
    elif status is grpc.StatusCode.FAILED_PRECONDITION:
        assert lines == []  # a refusal: the caller is told, as before
    # Review s74 L1: the leader said "agent unreachable" of this answer; its details begin
    # with ``STORE_UNAVAILABLE`` now, which the leader's client tells from no answer.
    failed = call_failed("node1", caught.value.code, str(caught.value))
    answered = isinstance(failed, NodeStoreUnavailable)
    assert answered is (status is grpc.StatusCode.UNAVAILABLE), failed
    if answered:
        assert str(failed) == (
            f"agent node1: the node's journal or disk failed for a moment: journal"
            f" {journal.path}: {words} ({code})"
        ), failed
    monkeypatch.undo()
    journal.close()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Ctx:
    """A servicer context as the handlers here use it: no deadline; an abort raises."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RpcStatusError(code, details)


class _StubDriver:
    """The driver as a Rollback's begin touches it here (its plan is stubbed)."""

    unfreeze_keeps_answers = False

    @contextlib.contextmanager
    def reading_once(self) -> Iterator[None]:
        yield

    def read_config(self) -> bytes:
        return b"listen https\n"


class _StubRunner:
    """The runner as a begin hands it a transaction (nothing runs)."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], str] = {}

    def start(self, txn: Txn, **_kw: Any) -> None:
        pass

    async def under_way(self, txn: Txn) -> None:
        pass

    def stage_next(self, txn: Txn) -> None:
        return None


async def test_get_transaction_waits_for_a_request_of_its_key_still_waiting_for_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 73 (s72 refused's L): a Rollback handler received, still waiting for the
    agent's command lock (another command holds it), has handed nothing to the store's
    thread; the leader, its call cut off, asks GetTransaction at once. It answered "none"
    (NOT_FOUND), and the handler then journalled and began the transaction: the leader's
    "nothing changed" was untrue but for its sending again. GetTransaction now waits for the
    request of its key being received (``Receipts``), and answers with what it journalled."""

    journal, agent = _rollback_ready(tmp_path, monkeypatch)
    rollback = agent_pb2.RollbackRequest(command=agent_pb2.Command(rollout_id="r1", epoch=5))
    question = agent_pb2.GetTransactionRequest(
        rollout_id="r1", kind=TXN_KIND.wire(TxnKind.ROLLBACK)
    )
    await agent._lock.acquire()  # another command's
    received = asyncio.ensure_future(agent.Rollback(rollback, cast(Any, Ctx())))
    for _ in range(3000):  # until it waits for the lock
        if getattr(agent._lock, "_waiters", None):
            break
        await asyncio.sleep(0.01)
    assert not received.done()
    asked = asyncio.ensure_future(agent.GetTransaction(question, cast(Any, Ctx())))
    for _ in range(3000):  # answered at once before (NOT_FOUND); now it waits for the note
        receipts = getattr(agent, "_receipts", None)
        if asked.done() or (receipts is not None and getattr(receipts._changed, "_waiters", None)):
            break
        await asyncio.sleep(0.01)
    agent._lock.release()
    begun = await received
    found = await asked  # NOT_FOUND before (an RpcStatusError)
    assert (found.rollout_id, found.kind, found.started_at) == (
        "r1",
        TXN_KIND.wire(TxnKind.ROLLBACK),
        begun.started_at,
    )
    journal.close()


async def test_get_transaction_answers_once_a_request_it_waits_for_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 74 (guard): the wait ends with the request's note, not at ``RECEIVING_WAIT``:
    a request dropped before its journal write (refused, its call cut off) lets the waiting
    question answer from the journal at once (NOT_FOUND: nothing was journalled), never
    "being received" (the wait is set far longer than this test may last)."""
    monkeypatch.setattr(service, "RECEIVING_WAIT", 3600.0)
    journal = Journal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    question = agent_pb2.GetTransactionRequest(rollout_id="r1", kind=TXN_KIND.wire(TxnKind.SWITCH))
    with agent._receipts.receiving("r1", TxnKind.SWITCH):
        asked = asyncio.ensure_future(agent.GetTransaction(question, cast(Any, Ctx())))
        for _ in range(3000):  # until it waits for the note
            if asked.done() or getattr(agent._receipts._changed, "_waiters", None):
                break
            await asyncio.sleep(0.01)
        assert not asked.done()
    with pytest.raises(RpcStatusError) as caught:
        async with asyncio.timeout(60):  # a bound for the test only: the answer is at once
            await asked
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


class _FailingConnection:
    """The journal's connection whose ``fail`` statement of a write ("COMMIT",
    "BEGIN IMMEDIATE"; a read transaction's COMMIT commits) raises ``error`` (as SQLite's
    module raises it) while set; anything else is the real connection's."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail = ""
        self.error: sqlite3.Error | None = None
        self._writing = False

    def arm(self, statement: str, code: str, words: str) -> None:
        self.fail = statement
        self.error = sqlite3.OperationalError(words)
        self.error.sqlite_errorname = code
        self.error.sqlite_errorcode = getattr(sqlite3, code)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith("BEGIN"):
            self._writing = sql == "BEGIN IMMEDIATE"
        if self.error is not None and sql == self.fail and self._writing:
            raise self.error
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


UNAVAILABLE, REFUSED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION
LOCKED, MALFORMED = "database is locked", "database disk image is malformed"


@pytest.mark.parametrize(
    ("statement", "code", "words", "status", "doubt"),
    [
        # frames written, their fsync failed: maybe kept (replayed at the next open)
        ("COMMIT", "SQLITE_IOERR_FSYNC", "disk I/O error", UNAVAILABLE, True),
        ("COMMIT", "SQLITE_IOERR_WRITE", "disk I/O error", UNAVAILABLE, True),
        # no commit frame written: nothing kept, asked again all the same
        ("BEGIN IMMEDIATE", "SQLITE_BUSY", LOCKED, UNAVAILABLE, False),
        (
            "COMMIT",
            "SQLITE_FULL",
            "database or disk is full",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            False,
        ),
        # damaged: a refusal (asking again does not mend it); the COMMIT's fate unknown all the same
        ("COMMIT", "SQLITE_CORRUPT", MALFORMED, REFUSED, True),
    ],
)
async def test_a_journal_write_that_failed_is_asked_again_and_a_failed_commit_is_in_doubt(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    statement: str,
    code: str,
    words: str,
    status: grpc.StatusCode,
    doubt: bool,
) -> None:
    """Session 74's L3: a journal write that failed with SQLITE_BUSY, _LOCKED or _IOERR was
    a ``JournalError``, FAILED_PRECONDITION: the leader took the begin for refused, asked
    GetTransaction, got NOT_FOUND and recorded "nothing changed". But a COMMIT whose frames
    reached the ``-wal`` and whose fsync failed is not in the agent's view while the next
    open's recovery replays it: the agent, restarted, would resume what the leader recorded as
    never begun. Such a write is UNAVAILABLE now (the leader asks again), and until a write is
    kept again (a probe, which takes the failed frames' place) every read first writes, so
    GetTransaction answers UNAVAILABLE, never "none held", while the journal cannot be written.
    A write that wrote no commit frame (a lock, a full disk) leaves no doubt."""
    from nodeagent.journal import JOURNAL_IN_DOUBT

    journal, agent = _rollback_ready(tmp_path, monkeypatch)
    assert await command(agent, 5) == "r1"  # (the epoch journalled: its write is not tested)
    conn = _FailingConnection(journal._db._db)
    monkeypatch.setattr(journal._db, "_db", conn)
    rollback = agent_pb2.RollbackRequest(command=agent_pb2.Command(rollout_id="r1", epoch=5))
    question = agent_pb2.GetTransactionRequest(
        rollout_id="r1", kind=TXN_KIND.wire(TxnKind.ROLLBACK)
    )

    conn.arm(statement, code, words)
    with pytest.raises(RpcStatusError) as caught:
        await agent.Rollback(rollback, cast(Any, Ctx()))
    assert caught.value.code == status, caught.value  # FAILED_PRECONDITION before
    assert words in str(caught.value) and code in str(caught.value)
    assert (JOURNAL_IN_DOUBT in str(caught.value)) is doubt
    with pytest.raises(RpcStatusError) as caught:
        await agent.GetTransaction(question, cast(Any, Ctx()))
    if doubt:  # the read writes first, which fails as the write did: not "none held"
        assert caught.value.code == status, caught.value  # NOT_FOUND before
        assert JOURNAL_IN_DOUBT in str(caught.value)
    else:  # nothing to settle: the read answers, and writes nothing
        assert caught.value.code == grpc.StatusCode.NOT_FOUND, caught.value
        with journal._read() as db:
            assert db.execute("SELECT 1 FROM meta WHERE key = 'probed_at'").fetchone() is None

    conn.error = None  # the disk works again
    with pytest.raises(RpcStatusError) as caught:
        await agent.GetTransaction(question, cast(Any, Ctx()))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND, caught.value
    with journal._read() as db:
        probed = db.execute("SELECT 1 FROM meta WHERE key = 'probed_at'").fetchone()
    assert (probed is not None) is doubt  # the probe that settled it, kept
    begun = await agent.Rollback(rollback, cast(Any, Ctx()))  # sent again: begins
    found = await agent.GetTransaction(question, cast(Any, Ctx()))
    assert (found.rollout_id, found.started_at) == ("r1", begun.started_at)
    monkeypatch.undo()
    journal.close()


@pytest.mark.parametrize("then", ["nothing", "a write that changes nothing, a read"])
def test_a_journal_in_doubt_is_settled_only_by_a_write_that_wrote(
    tmp_path: Path, then: str
) -> None:
    """Review s74 revdoubt: a COMMIT whose frames reached the ``-wal`` and whose fsync failed
    (here: the index in ``-shm`` put back as it was before it, so the frames are written and
    out of view) is replayed by the next open's recovery (``JOURNAL_IN_DOUBT``; "nothing":
    the premise, seen). A write kept settles the doubt: its frames take the failed ones'
    place. A transaction that changes no row (the heartbeat's ``end_way_back`` when no way
    back is open, ``admit_epoch`` of the epoch held) commits no frame, yet it settled the
    doubt: the read after it answered without the write that the next open replays."""
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.set_removed_from_cluster("kept")
    shm = Path(f"{journal.path}-shm")
    index = shm.read_bytes()
    journal.set_removed_from_cluster("in doubt")
    with shm.open("r+b") as f:
        f.write(index)
    journal._in_doubt = True  # (as ``Journal._tx`` sets it after such a COMMIT)
    read = None
    if then != "nothing":
        assert journal.end_way_back(["r9"]) is None  # (no write: nothing open)
        read = journal.removed_from_cluster()
    crashed = tmp_path / "crashed"  # what a crash (a power cut) leaves: no -shm
    crashed.mkdir()
    for suffix in ("", "-wal"):
        (crashed / f"journal.sqlite3{suffix}").write_bytes(
            Path(f"{journal.path}{suffix}").read_bytes()
        )
    recovered = Journal(crashed / "journal.sqlite3")
    try:
        if then == "nothing":
            assert recovered.removed_from_cluster() == "in doubt"
        else:  # the read wrote first: what it answered is what any later open finds
            assert read == recovered.removed_from_cluster() == "kept"
    finally:
        recovered.close()
        journal.close()


class _BusyAtBegin:
    """The journal's connection, recording SQLite's busy timeout (ms) in effect at each
    ``BEGIN IMMEDIATE`` (the longest that BEGIN waits for another connection's lock)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.waits: list[int] = []

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "BEGIN IMMEDIATE":
            self.waits.append(int(self._conn.execute("PRAGMA busy_timeout").fetchone()[0]))
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_read_in_doubt_probes_without_waiting_out_another_process_s_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 74's note, Open (L): while the journal is in doubt every read writes first
    (``probe``), and with another process holding the file's write lock each such write
    waited SQLite's busy timeout (10 s) on the store's thread, ahead of a switch's records.
    The probe of a read waits ``PROBE_BUSY_SECONDS`` at most (counted: the busy timeout in
    effect at its BEGIN), and the read answers UNAVAILABLE (``JournalUnavailable``, asked
    again), never from the journal; the doubt holds, and the connection's other writes
    wait as long as before. Once the lock is gone the read probes, and answers."""
    from nodeagent.journal import PROBE_BUSY_SECONDS, JournalUnavailable

    journal = Journal(tmp_path / "journal.sqlite3")
    journal.set_removed_from_cluster("kept")
    conn = _BusyAtBegin(journal._db._db)
    monkeypatch.setattr(journal._db, "_db", conn)
    journal._in_doubt = True  # (as a failed COMMIT leaves it: ``Journal._commit_failed``)
    other = sqlite3.connect(journal.path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's write, under way
        with pytest.raises(JournalUnavailable, match="SQLITE_BUSY"):
            journal.removed_from_cluster()
        assert conn.waits == [round(PROBE_BUSY_SECONDS * 1000)]  # [10000] before
        assert journal._in_doubt
        other.execute("ROLLBACK")
        assert journal.removed_from_cluster() == "kept"  # probed first, then read
        assert not journal._in_doubt
        journal.set_removed_from_cluster("later")  # any other write: the 10 s as before
        assert conn.waits[1:] == [round(PROBE_BUSY_SECONDS * 1000), 10_000]
    finally:
        other.close()
        monkeypatch.undo()
        journal.close()


class _SeenWaiting:
    """The store's lock (``Database._lock``): ``waiting`` is set when a thread other than
    ``owner`` comes to take it (before it blocks: the owner holds it)."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.owner: int | None = None
        self.waiting = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if threading.get_ident() != self.owner:
            self.waiting.set()
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_a_read_waiting_for_the_lock_while_a_commit_fails_does_not_read_past_the_doubt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 74's note, Open (L): the doubt of a failed COMMIT was set after the store's
    lock was released, and a read looked at it before taking the lock: a read that came
    while the COMMIT failed (waiting for the lock) answered from before the failed write,
    which the next open may replay. Interleaved by events: the writer's COMMIT fails only
    once the reader waits for the lock. The reader then answers UNAVAILABLE (its probe fails
    as the write did), not the journal's value; once the disk works, the read probes and
    answers."""
    from nodeagent.journal import JOURNAL_IN_DOUBT, JournalUnavailable

    journal = Journal(tmp_path / "journal.sqlite3")
    journal.set_removed_from_cluster("kept")
    conn = _FailingConnection(journal._db._db)
    monkeypatch.setattr(journal._db, "_db", conn)
    lock = _SeenWaiting(journal._db._lock)
    monkeypatch.setattr(journal._db, "_lock", lock)
    committing = threading.Event()
    conn.arm("COMMIT", "SQLITE_IOERR_FSYNC", "disk I/O error")

    def execute(sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and conn._writing and conn.error is not None:
            committing.set()
            assert lock.waiting.wait(60), "the reader never came to the lock"
        return _FailingConnection.execute(conn, sql, *args)

    monkeypatch.setattr(conn, "execute", execute)
    wrote: list[BaseException] = []

    def write() -> None:
        lock.owner = threading.get_ident()
        try:
            journal.set_removed_from_cluster("in doubt")
        except JournalError as exc:
            wrote.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert committing.wait(60), "the write never came to its COMMIT"
    read: list[object] = []

    def reader() -> None:
        try:
            read.append(journal.removed_from_cluster())
        except JournalError as exc:
            read.append(exc)

    reading = threading.Thread(target=reader, daemon=True)
    reading.start()
    writer.join(60)
    reading.join(60)
    assert not writer.is_alive() and not reading.is_alive()
    assert len(wrote) == 1 and JOURNAL_IN_DOUBT in str(wrote[0]), wrote
    # Before: ["kept"], read past the doubt (the next open may replay "in doubt").
    assert len(read) == 1 and isinstance(read[0], JournalUnavailable), read
    assert JOURNAL_IN_DOUBT in str(read[0])  # (its probe failed as the write did)
    assert journal._in_doubt
    conn.error = None  # the disk works again
    lock.owner = threading.get_ident()
    assert journal.removed_from_cluster() == "kept"  # probed, then read
    assert not journal._in_doubt
    monkeypatch.undo()
    journal.close()


def _gone(journal: Journal, how: str) -> None:
    """The journal's file or its directory moved or deleted under the open connection."""
    import shutil

    where = journal.path.parent
    if how == "file moved":
        journal.path.rename(where / "elsewhere.sqlite3")
    elif how == "file deleted":
        journal.path.unlink()
    elif how == "directory moved":
        where.rename(where.with_name("elsewhere"))
    else:
        shutil.rmtree(where)


@pytest.mark.parametrize(
    "how", ["file moved", "file deleted", "directory moved", "directory deleted"]
)
def test_a_journal_moved_or_deleted_under_the_agent_is_a_refusal_not_ask_again(
    tmp_path: Path, how: str
) -> None:
    """Session 74's note, Open (L): a journal write that SQLite refuses because its file is
    no longer at its path (SQLITE_READONLY_DBMOVED, real SQLite: it looks where it opens a
    rollback journal, so the connection is put in that mode here; in WAL, the journal's
    own, it writes on into the file it holds) was ``JournalUnavailable`` (the READONLY
    prefix): UNAVAILABLE, which the leader asks again without end. It lasts until the admin
    puts the journal back: a plain ``JournalError`` (a refusal), saying so."""
    from nodeagent.journal import JOURNAL_GONE, JournalUnavailable

    (tmp_path / "data").mkdir()
    journal = Journal(tmp_path / "data" / "journal.sqlite3")
    journal.set_removed_from_cluster("kept")
    journal._db._db.execute("PRAGMA journal_mode=DELETE")
    _gone(journal, how)
    with pytest.raises(JournalError) as caught:
        journal.set_removed_from_cluster("lost")
    assert "SQLITE_READONLY_DBMOVED" in str(caught.value), caught.value
    assert not isinstance(caught.value, JournalUnavailable), caught.value  # before: it was
    assert JOURNAL_GONE in str(caught.value)
    journal.close()


@pytest.mark.parametrize("how", ["directory deleted", "file replaced", "nothing"])
def test_a_journal_that_cannot_be_opened_is_lasting_only_once_it_is_gone(
    tmp_path: Path, how: str
) -> None:
    """Session 74's note, Open (L): SQLITE_CANTOPEN (here SQLite's own, of opening a file in
    the journal's directory) was always ``JournalUnavailable``; with the journal's directory
    gone, or another file at its path, it lasts (a refusal, ``JOURNAL_GONE``). With the
    journal where it was, it may pass (a file it could not open now): asked again, as
    before."""
    from nodeagent.journal import JOURNAL_GONE, JournalUnavailable

    (tmp_path / "data").mkdir()
    journal = Journal(tmp_path / "data" / "journal.sqlite3")
    if how == "directory deleted":
        _gone(journal, how)
    elif how == "file replaced":
        journal.path.rename(tmp_path / "data" / "old.sqlite3")
        journal.path.write_bytes(b"")
    with pytest.raises(sqlite3.OperationalError) as opening:
        sqlite3.connect(f"file:{tmp_path}/none/x.sqlite3?mode=rw", uri=True)
    assert opening.value.sqlite_errorname == "SQLITE_CANTOPEN"
    error = journal._error(opening.value)
    assert isinstance(error, JournalUnavailable) is (how == "nothing"), error
    assert (JOURNAL_GONE in str(error)) is (how != "nothing"), error
    journal.close()


async def test_get_transaction_asked_while_a_request_of_its_key_is_received_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its wait is bounded (``RECEIVING_WAIT``, within the call's deadline): a request of
    its key still not journalled then, it answers UNAVAILABLE (any leader asks again or sends
    its request again), never "none"; the note ends with the handler, then the journal
    answers (NOT_FOUND: nothing was journalled)."""
    monkeypatch.setattr(service, "RECEIVING_WAIT", 0.0)
    journal = Journal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    question = agent_pb2.GetTransactionRequest(rollout_id="r1", kind=TXN_KIND.wire(TxnKind.SWITCH))
    with agent._receipts.receiving("r1", TxnKind.SWITCH):
        with pytest.raises(RpcStatusError) as caught:
            await agent.GetTransaction(question, cast(Any, Ctx()))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "is being received; ask again" in str(caught.value)
    with pytest.raises(RpcStatusError) as caught:
        await agent.GetTransaction(question, cast(Any, Ctx()))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    journal.close()


def _rollback_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Journal, Any]:
    """An agent service on a real journal whose Rollback plans a way back to http without a
    server (a stub driver and runner, no served pin to take)."""
    from nodeagent import plans

    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, ("https",))
    plan = Plan(facts, ("https",), ("http",), Path("/n"), Path("/b"), Path("/ca"), "")
    monkeypatch.setattr(plans, "rollback_plan", lambda *_a, **_kw: plans.Built(b"h", plan, ""))

    async def no_pin(_driver: object) -> None:
        return None

    monkeypatch.setattr(plans, "take_served_pin", no_pin)
    journal = Journal(tmp_path / "journal.sqlite3")
    agent = make_service(tmp_path, journal, announced=5)
    agent.driver = cast(Any, _StubDriver())
    agent.runner = cast(Any, _StubRunner())
    agent.cfg = cast(Any, SimpleNamespace(data_dir=tmp_path))
    return journal, agent
