"""The agent's crypto worker (``nodeagent.cryptoworker``): one real child per ``CryptoWorker``,
its answers and errors as the ops' own, a child that dies or hangs mid-call, its idle exit and
the next call's new child, EOF on its stdin, and the secrets it writes and never says."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from nodeagent import (
    bootstrap_crypto,
    certwork,
    certwork_ops,
    cryptoworker,
    cryptoworker_child,
    plans,
)
from nodeagent.cryptoworker import CryptoWorker, InProcess, WorkerBug, WorkerEnded
from nodeagent.journal import Journal
from nodeagent.plans import Sharing
from nodeagent.service import ERRORS, NodeAgentService
from nodeagent.trust import LeaderTrust
from tests.cluster import child_env
from tlsroll import pki
from tlsroll.errors import PKIError, PKIReason, TerminalError, TransientError
from tlsroll.names import Names
from tlsroll.rpc import error_status

NAMES = Names.of("n1", ["127.0.0.1"])


def _numbers(answer: dict[str, Any]) -> dict[str, Any]:
    """A ``cert.crl`` answer less the list's dates (``this_update``, ``next_update``)."""
    return {k: v for k, v in answer.items() if k not in ("this_update", "next_update")}


def _crl_request(
    tmp_path: Path, ca: pki.CertificateAuthority, number: int = 7, more: int = 0
) -> dict[str, str]:
    """A ``cert.crl`` request: a list numbered ``number`` revoking 12345 (and ``more``
    serials after it: ``BIG``)."""
    now = dt.datetime.now(dt.UTC)
    revoked = [(f"{12345 + i:x}", now) for i in range(1 + more)]
    crl = pki.crl_to_pem(pki.build_crl(ca, number, revoked, now=now))
    ca_file = tmp_path / "ca.pem"
    pki.write_cert(ca_file, ca.cert)
    return {"pem": crl.decode(), "ca_file": str(ca_file)}


async def _until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait (bounded) until ``check()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "not within the bound"
        await asyncio.sleep(0.05)


async def _opened_for_writing(fifo: Path) -> int:
    """``fifo`` opened for writing, once a reader has it open (a child in the middle of an
    op that reads it)."""
    found: list[int] = []

    def opened() -> bool:
        try:
            found.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:
            assert exc.errno == errno.ENXIO  # no reader yet
            return False
        return True

    await _until(opened)
    return found[0]


BIG = 8000
"""``_crl_request``'s ``more`` for a request (a large revocation list, 230 kB) larger than the
pipe to the child holds and, beyond that, than the write buffer's high-water mark (64 KiB
each): its write waits until the child has read some."""


def _gone(pid: int) -> bool:
    """True once ``pid`` has ended (reaped, or a zombie no one waits for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # (reaped between the open and the read)
        return True


async def test_answers_and_errors_are_the_ops_own(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    worker = CryptoWorker()
    try:
        request = _crl_request(tmp_path, test_ca)
        answer = await worker.call("cert.crl", request)
        assert _numbers(answer) == {"number": 7, "revoked": [12345]}
        assert set(answer) == {"number", "revoked", "this_update", "next_update"}
        pid = worker.pid
        assert pid is not None
        # A verdict: the same class, reason and message as in-process.
        bad = {**request, "pem": "not a list"}
        with pytest.raises(PKIError) as child:
            await worker.call("cert.crl", bad)
        with pytest.raises(PKIError) as here:
            certwork_ops.crl(bad)
        assert child.value.reason is here.value.reason is PKIReason.BAD_PEM
        assert str(child.value) == str(here.value)
        # An OSError keeps its errno and file.
        missing = {**request, "ca_file": str(tmp_path / "nope.pem")}
        with pytest.raises(OSError) as gone:
            await worker.call("cert.crl", missing)
        assert gone.value.errno == errno.ENOENT and gone.value.filename == missing["ca_file"]
        # No such op or module: an error answer, not a crash.
        with pytest.raises(TerminalError, match=r"unknown crypto work 'cert\.nope'"):
            await worker.call("cert.nope", {})
        with pytest.raises(TerminalError, match=r"unknown crypto work 'nope\.crl'"):
            await worker.call("nope.crl", {})
        # A request the op cannot read: its bug (KeyError), answered as one, no crash: not a
        # project error, so INTERNAL (generic) for the leader, as before the worker.
        with pytest.raises(WorkerBug, match=r"crypto work \(cert.crl\) failed: KeyError$"):
            await worker.call("cert.crl", {})
        code, details = error_status(WorkerBug("x"), ERRORS, "CreateCSR")
        assert code is grpc.StatusCode.INTERNAL and "x" not in details
        assert worker.pid == pid and worker.started == 1  # one child served all of them
    finally:
        await worker.close()
    assert worker.pid is None and _gone(pid)


def test_a_module_that_is_not_there_is_an_error_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cryptoworker_child.OP_MODULES, "gone", "nodeagent.no_such_module")
    answer = cryptoworker_child.serve({"op": "gone.x", "request": {}})
    assert answer == {
        "error": {
            "type": "TerminalError",
            "message": "crypto work 'gone.x': nodeagent.no_such_module is not available",
        }
    }
    assert cryptoworker_child.serve("junk")["error"]["type"] == "TerminalError"


@pytest.mark.parametrize("big", [False, True], ids=["small", "over-64-KiB"])
async def test_a_child_killed_mid_call_is_transient_and_the_next_call_starts_another(
    tmp_path: Path, test_ca: pki.CertificateAuthority, big: bool
) -> None:
    """Review s41 M1: a child killed mid-call (the OOM killer, a signal) is no verdict on the
    request: transient (UNAVAILABLE for the leader, which tries the step again), as the same
    kill of the whole agent was; it was ``certwork.NoAnswer``, terminal, before. Never given
    to a new child (the op may have written a key): also a request larger than the pipe holds,
    which no FIFO count could tell from one never read."""
    worker = CryptoWorker()
    try:
        request = _crl_request(tmp_path, test_ca, more=BIG if big else 0)
        await worker.call("cert.crl", request)
        first = worker.pid
        assert first is not None
        # It takes the request and is in the middle of it: reading a CA file that is a FIFO,
        # which the test opens (the child is in the op then) and never writes. (A child
        # stopped by SIGSTOP would not do: it has not taken the request, and a new child
        # takes a request no child took.)
        fifo = tmp_path / "ca.fifo"
        os.mkfifo(fifo)
        call = asyncio.ensure_future(worker.call("cert.crl", {**request, "ca_file": str(fifo)}))
        writer = await _opened_for_writing(fifo)
        try:
            assert not call.done()
            os.kill(first, signal.SIGKILL)
            with pytest.raises(WorkerEnded, match=r"crypto work \(cert.crl\) failed.*signal 9"):
                await asyncio.wait_for(call, 60)
        finally:
            os.close(writer)
        assert worker.started == 1  # not given to a new child
        assert issubclass(WorkerEnded, TransientError)
        assert not issubclass(WorkerEnded, TerminalError)
        assert worker.pid is None and _gone(first)
        assert (await worker.call("cert.crl", request))["revoked"][:1] == [12345]
        assert worker.pid not in (None, first) and worker.started == 2
    finally:
        await worker.close()


async def test_the_child_ignores_sigterm_and_sigint(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """Review s41 M1: systemd signals the agent's whole control group when it stops or
    restarts the agent (and Ctrl-C a terminal's process group): the child must not die in the
    middle of a call for it; it ends when the agent closes its stdin."""
    worker = CryptoWorker()
    try:
        request = _crl_request(tmp_path, test_ca)
        await worker.call("cert.crl", request)
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the signals wait while it is stopped, as would a call
        call = asyncio.ensure_future(worker.call("cert.crl", request))
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGCONT)
        assert (await asyncio.wait_for(call, 60))["number"] == 7
        assert worker.pid == pid and worker.started == 1
    finally:
        await worker.close()
    assert _gone(pid)


@pytest.mark.parametrize(
    ("order", "big"),
    [
        ("seen-by-the-loop", False),
        ("unseen-by-the-loop", False),
        ("reader-not-yet-closed", False),
        ("reader-not-yet-closed", True),
    ],
    ids=["seen-by-the-loop", "unseen-by-the-loop", "reader-not-yet-closed", "over-64-KiB"],
)
async def test_a_child_killed_while_idle_is_replaced_by_the_next_call(
    tmp_path: Path, test_ca: pki.CertificateAuthority, order: str, big: bool
) -> None:
    """The OOM killer, or a person's kill, between two calls: the next call is answered by a
    new child, not failed, whatever the order in which the agent learns of the end.

    ``unseen``: the next call comes before the event loop has heard that the child ended (its
    exit is told on a later turn of the loop): the request's write finds no reader. Before
    (session 46), the write's failure reached ``drain`` only turns later, the answer's EOF came
    first, and the call failed as if the child had died in the middle of it (``WorkerEnded``:
    2 runs of 6 of the ``seen`` case under load). There the wait for the child's end blocks
    the loop, so that the order is the same on every run.

    ``reader-not-yet-closed``: the process already reads as gone, but the kernel has not yet
    closed its end of the request's pipe (seen under CI load as ``WorkerEnded``, "the worker
    ended (signal 9)", in the ``unseen`` case): the write lands in the pipe, and the answer's
    EOF comes with nothing read. Here a second reader of that pipe (the test's, opened through
    /proc) keeps it open for as long as the call takes, so that the order is the same on every
    run. No child said it took the request (``cryptoworker_child.TAKEN``): a new child takes it.
    Also for a request larger than the pipe holds (review s47rev5 L1), which is never whole in
    the pipe, and whose write fills it and waits (for good: the held reader reads nothing)."""
    worker = CryptoWorker()
    held: int | None = None
    try:
        request = _crl_request(tmp_path, test_ca, more=BIG if big else 0)
        await worker.call("cert.crl", request)
        first = worker.pid
        assert first is not None
        if order == "reader-not-yet-closed":
            held = os.open(f"/proc/{first}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
        os.kill(first, signal.SIGKILL)
        if order == "seen-by-the-loop":
            await _until(lambda: _gone(first))
        else:
            deadline = time.monotonic() + 20
            while not _gone(first) and time.monotonic() < deadline:  # (the loop: blocked)
                time.sleep(0.01)
            assert _gone(first)
        assert (await asyncio.wait_for(worker.call("cert.crl", request), 60))["number"] == 7
        assert worker.pid not in (None, first) and worker.started == 2
    finally:
        if held is not None:
            os.close(held)
        await worker.close()


@pytest.mark.parametrize("big", [False, True], ids=["small", "over-64-KiB"])
async def test_a_hung_child_is_killed_the_call_is_transient_and_the_next_starts_another(
    tmp_path: Path, test_ca: pki.CertificateAuthority, big: bool
) -> None:
    """A child that never answers is killed after the call's ``timeout``. Also one that never
    reads a request larger than the pipe holds (review s47rev5 L2): before, the write waited
    for the pipe to drain, with no bound, holding the worker's lock (the call never ended:
    here the test's own bound of 30 s, ``TimeoutError``)."""
    worker = CryptoWorker()
    try:
        request = _crl_request(tmp_path, test_ca, more=BIG if big else 0)
        await worker.call("cert.crl", request)
        first = worker.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)  # it never answers, however long it is given
        worker.timeout = 1.0
        with pytest.raises(TransientError, match=r"crypto work \(cert.crl\) took over 1 s"):
            await asyncio.wait_for(worker.call("cert.crl", request), 30)
        assert worker.pid is None and _gone(first)
        worker.timeout = 60.0
        assert (await worker.call("cert.crl", request))["number"] == 7
        assert worker.pid not in (None, first)
    finally:
        await worker.close()


async def test_a_cancelled_call_ends_its_child_so_its_answer_is_no_later_calls(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    worker = CryptoWorker()
    try:
        request = _crl_request(tmp_path, test_ca)
        await worker.call("cert.crl", request)
        first = worker.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)
        call = asyncio.ensure_future(worker.call("cert.crl", request))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert _gone(first)
        later = _crl_request(tmp_path, test_ca, number=8)
        assert (await worker.call("cert.crl", later))["number"] == 8
    finally:
        await worker.close()


async def test_an_idle_child_stops_and_the_next_call_starts_a_new_one(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    worker = CryptoWorker(idle_seconds=0.5)
    try:
        request = _crl_request(tmp_path, test_ca)
        await worker.call("cert.crl", request)
        first = worker.pid
        assert first is not None
        await _until(lambda: worker.pid is None)
        await _until(lambda: _gone(first))
        assert (await worker.call("cert.crl", request))["number"] == 7
        assert worker.pid not in (None, first) and worker.started == 2
    finally:
        await worker.close()


async def test_warm_starts_the_child_ahead_once_and_idles_it_out(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    worker = CryptoWorker(idle_seconds=1.0)
    try:
        worker.warm()
        worker.warm()  # starting already: nothing more
        await _until(lambda: worker.pid is not None)
        pid = worker.pid
        worker.warm()
        assert worker.pid == pid and worker.started == 1
        assert (await worker.call("cert.crl", _crl_request(tmp_path, test_ca)))["number"] == 7
        assert worker.pid == pid and worker.started == 1  # the warmed child answered
        await _until(lambda: worker.pid is None)
    finally:
        await worker.close()


def test_eof_on_its_stdin_ends_the_child() -> None:
    """The agent died (or closed the pipe): the child ends by itself."""
    child = subprocess.Popen(
        [sys.executable, "-P", "-c", cryptoworker.CHILD, "json", "info"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(b'{"op": "cert.nope", "request": {}}\n')
    child.stdin.flush()
    assert b"unknown crypto work" in child.stdout.readline()  # it serves
    child.stdin.close()
    assert child.wait(timeout=60) == 0
    child.stdout.close()


# An agent that starts the child (with its own pid and argv[3:] after the log's arguments, if
# any are given), has it serve once, stops it (SIGSTOP), writes it a request, prints the
# child's pid and kills itself: the request waits in the pipe of an orphan.
DYING_AGENT = """
import os, signal, subprocess, sys
from nodeagent import cryptoworker
child = subprocess.Popen(
    [sys.executable, "-P", "-c", cryptoworker.CHILD, "json", "info"]
    + ([str(os.getpid()), *sys.argv[3:]] if sys.argv[3:] else []),
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(sys.argv[1], "ab"),
)
child.stdin.write(b'{"op": "cert.nope", "request": {}}\\n')
child.stdin.flush()
assert b"unknown crypto work" in child.stdout.readline()
os.kill(child.pid, signal.SIGSTOP)
child.stdin.write(sys.argv[2].encode() + b"\\n")
child.stdin.flush()
print(child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("takes", [False, True], ids=["says-nothing-taken", "says-taken"])
def test_an_orphaned_child_serves_nothing_and_ends_quietly(tmp_path: Path, takes: bool) -> None:
    """Review s41, Low 5: the agent SIGKILLed with a request in its child's pipe: the child
    (an orphan now) neither does the work (a key written beside the agent started again) nor
    ends in a traceback (its answer's pipe is closed); it ends. Also a child that says it took
    a request (``cryptoworker_child.TAKEN``, to a pipe with no reader)."""
    key_file = tmp_path / "stage" / "server.key"
    key_file.parent.mkdir(mode=0o700)
    request = {
        "op": "cert.new_key",
        "request": {
            "key_file": str(key_file),
            "share": dataclasses.asdict(Sharing.own()),
            "names": certwork.names_request(NAMES),
        },
    }
    stderr = tmp_path / "child.log"
    agent = subprocess.run(
        [sys.executable, "-c", DYING_AGENT, str(stderr), json.dumps(request)]
        + ([cryptoworker_child.TAKES] if takes else []),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert agent.returncode == -signal.SIGKILL, agent.stderr
    pid = int(agent.stdout.split()[0])
    os.kill(pid, signal.SIGCONT)
    loop_until(lambda: _gone(pid))
    assert not key_file.exists()
    assert not list(key_file.parent.iterdir())  # nor a temporary file
    log = stderr.read_text()
    assert "Traceback" not in log and "BrokenPipe" not in log, log


def loop_until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait (bounded, blocking) until ``check()``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.05)


async def test_a_new_key_is_written_0600_by_the_child_and_no_secret_is_said(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    worker = CryptoWorker(log_level="debug")
    key_file = tmp_path / "stage" / "server.key"
    key_file.parent.mkdir(mode=0o700)
    own = Sharing.own()
    share = {
        "owner": list(own.owner),
        "mode": own.mode,
        "public_mode": own.public_mode,
        "group": own.group,
        "dir_mode": own.dir_mode,
    }
    request = {
        "key_file": str(key_file),
        "share": share,
        "names": certwork.names_request(NAMES),
    }
    try:
        csr_pem = await worker.call("cert.new_key", request)
        pid = worker.pid
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.stat().st_uid == os.geteuid()
        key = pki.read_key(key_file)
        csr = pki.load_csr_pem(csr_pem.encode())
        assert pki.spki_pin(pki.check_csr(csr, NAMES)) == pki.spki_pin(key.public_key())
        # A practice's key that does not match its certificate: refused, the key not said.
        other = pki.generate_key()
        ca = pki.CertificateAuthority.create("practice CA")
        cert = ca.issue(pki.generate_key().public_key(), NAMES)
        refused = await worker.call(
            "cert.own",
            {
                "certificate_pem": pki.cert_to_pem(cert).decode(),
                "ca_certificate_pem": pki.cert_to_pem(ca.cert).decode(),
                "private_key_pem": pki.key_to_pem(other).decode(),
                "names": certwork.names_request(NAMES),
                "now": dt.datetime.now(dt.UTC).isoformat(),
            },
        )
        assert refused == {"refused": "own certificate: the private key does not match it"}
        with pytest.raises(PKIError) as bad:  # a key that is not one: its error, no key text
            await worker.call(
                "cert.own",
                {
                    "certificate_pem": pki.cert_to_pem(cert).decode(),
                    "ca_certificate_pem": pki.cert_to_pem(ca.cert).decode(),
                    "private_key_pem": "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXRleHQ=\n",
                    "names": certwork.names_request(NAMES),
                    "now": dt.datetime.now(dt.UTC).isoformat(),
                },
            )
        assert "c2VjcmV0" not in str(bad.value)
    finally:
        await worker.close()
    said = capfd.readouterr()
    secrets = [pki.key_to_pem(key).decode(), pki.key_to_pem(other).decode(), "c2VjcmV0"]
    for secret in secrets:
        body = "".join(secret.splitlines()[1:-1])[:40] if "BEGIN" in secret else secret
        assert body not in said.err and body not in said.out
    assert pid is not None and _gone(pid)


async def test_in_process_runs_the_same_ops_with_the_same_errors(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    worker = InProcess()
    request = _crl_request(tmp_path, test_ca)
    assert _numbers(await worker.call("cert.crl", request)) == {"number": 7, "revoked": [12345]}
    with pytest.raises(PKIError):
        await worker.call("cert.crl", {**request, "pem": "not a list"})
    with pytest.raises(TerminalError, match="unknown crypto work"):
        worker.call_blocking("cert.nope", {})
    with pytest.raises(WorkerBug, match=r"crypto work \(cert.crl\) failed: KeyError$"):
        await worker.call("cert.crl", {})  # the child's error, not the op's raw KeyError


async def test_a_call_from_a_worker_thread_runs_on_the_loop(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """As ``LeaderTrust`` checks a list (``take_crl`` in a worker thread, ``load`` at the
    agent's start, before any call or warm): on the loop the worker was made in."""
    worker = CryptoWorker()
    try:
        request = _crl_request(tmp_path, test_ca)
        answer = await asyncio.to_thread(worker.call_blocking, "cert.crl", request)
        assert answer["number"] == 7
        with pytest.raises(TerminalError, match="on the event loop's thread"):
            worker.call_blocking("cert.crl", request)  # never waits for itself
    finally:
        await worker.close()
    unbound = await asyncio.to_thread(CryptoWorker)  # made outside a loop, never called
    with pytest.raises(TransientError, match="event loop"):
        unbound.call_blocking("cert.crl", {})


class SlowKey:
    """The crypto worker's ``cert.new_key`` that has written the key and not yet answered when
    its call is cancelled (the leader's deadline on CreateCSR): the answer waits for
    ``release``."""

    def __init__(self) -> None:
        self.written = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def call(self, op: str, request: dict[str, object]) -> str:
        assert op == "cert.new_key"
        self.calls += 1
        key_file = Path(str(request["key_file"]))
        key_file.touch(0o600)
        key_file.write_bytes(b"a key")
        self.written.set()
        await self.release.wait()
        return f"CSR {self.calls}"


async def test_a_cancelled_create_csr_still_journals_the_key_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s41 M4: CreateCSR cancelled while the worker makes the key (the leader's 30 s
    deadline) went without its journal record, the key the worker had written left where no
    rollout's end removes it. The work goes on to its record, as when it ran in a thread: the
    leader's next CreateCSR gets that CSR, no second key."""
    stage = tmp_path / "stage"
    stage.mkdir(mode=0o700)
    monkeypatch.setattr(plans, "sharing", lambda _driver: Sharing.own())
    monkeypatch.setattr(plans, "make_stage_dir", lambda _driver, _rid, _share: stage)
    journal = Journal(tmp_path / "journal.sqlite3")
    crypto = SlowKey()
    agent = NodeAgentService(
        cast(Any, SimpleNamespace(names=NAMES)),
        cast(Any, None),
        journal,
        None,
        None,
        lambda: dt.datetime.now(dt.UTC),
        trust=LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem"),
        crypto=cast(Any, crypto),
    )
    driver = cast(Any, None)
    try:
        call = asyncio.ensure_future(agent._csr(driver, "r1"))
        await asyncio.wait_for(crypto.written.wait(), 60)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        crypto.release.set()
        # The leader asks again: the same CSR, the key the first call made (no second one).
        assert await asyncio.wait_for(agent._csr(driver, "r1"), 60) == b"CSR 1"
        assert crypto.calls == 1
        staged = journal.staged("r1")
        assert staged is not None and staged.key_file == stage / "server.key"
        assert staged.key_file.read_bytes() == b"a key"
    finally:
        journal.close()


# What the child may import of ours from its start to its answers (``cryptoworker_child``'s
# docstring): its own module and the op modules, with what they need. A module of ours not
# listed fails ``test_the_child_imports_only_what_its_ops_need``: add it only if it, and all it
# imports, is as lean.
CHILD_MODULES = frozenset(
    {
        "nodeagent",
        "nodeagent.bootstrap_crypto",
        "nodeagent.certwork_ops",
        "nodeagent.cryptoworker_child",
        "nodeagent.nodefiles",
        "nodeagent.priority",
        "nodeagent.sharing",
        "nodeagent.workerrors",
        "tlsroll",
        "tlsroll.bootstrap_base",
        "tlsroll.bootstrap_csr",
        "tlsroll.bootstrap_pake",
        "tlsroll.bootstrap_protocol",
        "tlsroll.echo",  # (re and functools only: the one way input is shown in errors)
        "tlsroll.errors",
        "tlsroll.fsutil",
        "tlsroll.lean",
        "tlsroll.leanlog",
        "tlsroll.lifetimes",  # (datetime and secrets only: a leaf's lifetimes; pki re-exports them)
        "tlsroll.kdfhook",  # (os alone: the tests' scrypt N, which tlsroll.password reads)
        "tlsroll.names",
        "tlsroll.password",
        "tlsroll.peertext",
        "tlsroll.pki",
        "tlsroll.spiffe",
    }
)
# What the child never imports (and what brought it in before session 42): structlog (with
# asyncio, the standard library's logging, rich) through ``tlsroll.logs``; the agent's config
# (tomllib) and identity (ssl, TLS) through ``certwork``; sqlite3, concurrent.futures through
# ``plans`` and ``warmup``; gRPC.
NEVER_IN_CHILD = (
    "structlog",
    "rich",
    "asyncio",
    "logging",
    "concurrent",
    "sqlite3",
    "tomllib",
    "ssl",
    "grpc",
    "google",
)
# What the child imports of ours from its start to its first key's answer (``cert.new_key``: a
# rollout's first node waits for it): ``CHILD_MODULES`` less the bootstrap service's and
# ``tlsroll.echo`` (with ``peertext``), which a refusal of a name imports (``tlsroll.names``).
FIRST_KEY_MODULES = CHILD_MODULES - {
    "nodeagent.bootstrap_crypto",
    "tlsroll.bootstrap_base",
    "tlsroll.bootstrap_csr",
    "tlsroll.bootstrap_pake",
    "tlsroll.bootstrap_protocol",
    "tlsroll.echo",
    "tlsroll.password",
    "tlsroll.peertext",
}


def _child_imports(
    tmp_path: Path, requests: list[tuple[str, dict[str, Any]]]
) -> tuple[list[Any], set[str]]:
    """The real child (``CHILD``) asked ``requests``: its answers, and what it had imported
    (``sys.modules``) when it ended."""
    modules = tmp_path / "modules"
    # Run first in the child's own command: what ``sys.modules`` holds when it ends.
    dump = (
        "import atexit, gc, json, sys\n"
        f"atexit.register(lambda: open({str(modules)!r}, 'w').write("
        "'\\n'.join(k for k, v in sys.modules.items() if v is not None)))\n"
        f"atexit.register(lambda: open({str(tmp_path / 'gc.json')!r}, 'w').write(json.dumps("
        "{'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count(),"
        " 'collections': sum(s['collections'] for s in gc.get_stats())})))\n"
    )
    child = subprocess.run(
        [sys.executable, "-P", "-c", dump + cryptoworker.CHILD, "json", "info", str(os.getpid())],
        input=b"".join(json.dumps({"op": op, "request": r}).encode() + b"\n" for op, r in requests),
        capture_output=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    answers = [json.loads(line) for line in child.stdout.splitlines()]
    assert len(answers) == len(requests)
    return answers, set(modules.read_text().split())


def _new_key_request(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    key_file = tmp_path / "stage" / "server.key"
    key_file.parent.mkdir(mode=0o700)
    return (
        "cert.new_key",
        {
            "key_file": str(key_file),
            "share": dataclasses.asdict(Sharing.own()),
            "names": certwork.names_request(NAMES),
        },
    )


def test_the_child_imports_only_what_its_ops_need(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """Session 42: a rollout's first node waits for the child's cold start, and structlog,
    asyncio, the agent's config and identity modules cost it about 0.1 s of CPU it never
    needed. The real child (``CHILD``) does real work (a key and its CSR, a revocation list,
    the bootstrap service's blinding points and CA bundle) and is asked once for every other
    op (each module an op imports, imported); what it had imported when it ended is read."""
    pw = base64.b64encode(b"correct horse battery staple").decode()
    ca_pem = base64.b64encode(test_ca.cert_pem).decode()
    real = [
        _new_key_request(tmp_path),
        ("cert.crl", _crl_request(tmp_path, test_ca)),
        ("bootstrap.blinds", {"pake_pw": pw}),
        ("bootstrap.check_ca_bundle", {"pem": ca_pem}),
    ]
    others = [
        f"{module}.{name}"
        for module, ops in (("cert", certwork_ops.OPS), ("bootstrap", bootstrap_crypto.OPS))
        for name in ops
        if f"{module}.{name}" not in {op for op, _ in real}
    ]
    requests = [*real, *((op, {}) for op in others)]
    answers, loaded = _child_imports(tmp_path, requests)
    assert all("ok" in a for a in answers[: len(real)]), answers[: len(real)]
    assert _numbers(answers[1]["ok"]) == {"number": 7, "revoked": [12345]}
    assert answers[3]["ok"] == {"count": 1}
    assert pki.read_key(tmp_path / "stage" / "server.key") is not None  # the key was made
    ours = {m for m in loaded if m.split(".")[0] in ("nodeagent", "tlsroll")}
    assert ours <= CHILD_MODULES, sorted(ours - CHILD_MODULES)
    assert {"nodeagent.certwork_ops", "nodeagent.bootstrap_crypto", "tlsroll.pki"} <= ours
    assert "cryptography" in loaded  # the check saw the ops' imports
    never = sorted(m for m in loaded if m.split(".")[0] in NEVER_IN_CHILD)
    assert never == []


def test_a_childs_first_key_imports_no_more_than_it_needs(tmp_path: Path) -> None:
    """Issue 15 (session 53): a rollout's first node waits for the child's cold start and its
    first key (``cert.new_key``). Of ours it imports ``FIRST_KEY_MODULES`` alone: not
    ``tlsroll.echo`` (its secrets' shapes compiled as it is imported, about 1.6 ms, for a
    refusal of a name the child never makes there); a refused name still says it through
    ``echo`` (``tests/test_cli_echo.py``)."""
    answers, loaded = _child_imports(tmp_path, [_new_key_request(tmp_path)])
    assert "ok" in answers[0], answers
    assert "BEGIN CERTIFICATE REQUEST" in answers[0]["ok"]
    ours = {m for m in loaded if m.split(".")[0] in ("nodeagent", "tlsroll")}
    assert ours <= FIRST_KEY_MODULES, sorted(ours - FIRST_KEY_MODULES)
    assert {"nodeagent.certwork_ops", "nodeagent.sharing", "tlsroll.pki"} <= ours
    assert "cryptography" in loaded  # the check saw the op's imports
    never = sorted(m for m in loaded if m.split(".")[0] in NEVER_IN_CHILD)
    assert never == []


# What the child's own module must not bring in (``cryptoworker_child.PRELOAD``): it is
# imported at the normal priority, before the preload's thread begins; these come with the
# preload, at a low priority (``priority.WARM_NICE``), with the garbage collector off.
NOT_BEFORE_PRELOAD = frozenset(
    {
        "nodeagent.workerrors",
        "nodeagent.nodefiles",
        "nodeagent.certwork_ops",
        "tlsroll.fsutil",
        "tlsroll.pki",
        "cryptography",
        "pathlib",
        "dataclasses",
        "inspect",
        "socket",
    }
)


def test_the_childs_own_import_leaves_the_op_code_to_its_preload() -> None:
    """Issue 15 (session 71): the next node's crypto worker starts while this node's server
    restarts on the same cores. What the child imports before its preload's thread lowers
    its priority (its command up to ``cryptoworker_child.main()``) was about 35 ms of CPU at
    the normal priority, ``workerrors`` with ``nodefiles`` and ``tlsroll.fsutil`` (the
    standard library's ``dataclasses``, ``inspect``, ``socket``, ``pathlib``); they now come
    with the preload (``PRELOAD``). The child's own command, run up to ``main``, says what it
    holds then; the collector, off while it imported, is on again."""
    assert cryptoworker.CHILD.endswith("cryptoworker_child.main()")
    upto = cryptoworker.CHILD.removesuffix("cryptoworker_child.main()")
    said = subprocess.run(
        [sys.executable, "-P", "-c", upto + "import gc, json, sys; print(json.dumps("
         "[gc.isenabled(), sorted(k for k, v in sys.modules.items() if v is not None)]))"],
        capture_output=True, env=child_env(), timeout=60, check=True, text=True,
    )  # fmt: skip
    enabled, loaded = json.loads(said.stdout)
    assert "nodeagent.cryptoworker_child" in loaded and enabled is True
    early = {m for m in loaded if m in NOT_BEFORE_PRELOAD or m.split(".")[0] in NOT_BEFORE_PRELOAD}
    assert early == set()
    assert set(cryptoworker_child.PRELOAD) >= {"tlsroll.pki", "nodeagent.workerrors"}


def test_the_childs_imports_run_no_collection_and_stay_frozen(tmp_path: Path) -> None:
    """Issue 15 (session 71): from its start to its first key the child imports
    ``cryptography`` and ours (``FIRST_KEY_MODULES``), and its garbage collector ran about 35
    collections meanwhile that freed nothing: about 15 ms of its 90 ms of CPU, which a
    rollout's first node waits for. Its preload and op modules are imported with the collector
    off (``tlsroll.lean.importing``), and what they made is frozen out of every later
    collection; the collector is on once it serves. Read when the real child (``CHILD``)
    ends after its first key: on, the imports frozen, and no more collections than a bare
    interpreter's start makes plus a few (the child's own work)."""
    answers, loaded = _child_imports(tmp_path, [_new_key_request(tmp_path)])
    assert "ok" in answers[0], answers
    assert "tlsroll.pki" in loaded
    facts = json.loads((tmp_path / "gc.json").read_text())
    bare = subprocess.run(
        [sys.executable, "-P", "-c",
         "import gc; print(sum(s['collections'] for s in gc.get_stats()))"],
        capture_output=True, env=child_env(), timeout=60, check=True, text=True,
    )  # fmt: skip
    assert facts["enabled"] is True
    assert facts["frozen"] > 10_000, facts  # the imports' objects (about 27,000)
    assert facts["collections"] <= int(bare.stdout) + 15, (facts, bare.stdout)


def test_the_childs_log_lines_have_the_agents_shape(tmp_path: Path) -> None:
    """The child writes its few lines itself (``tlsroll.leanlog``, no structlog): the same
    JSON as the agent's (``tlsroll.logs``): the same keys in the same order, a UTC timestamp,
    a secret's value redacted; events below its level dropped. And code the agent shares with
    the child (``nodeagent.sharing``) logs through structlog in the agent."""
    script = """
import io, json, sys
from tlsroll import leanlog, logs
logs.configure(json=True, level=logs.level_of("info"))
lean = leanlog.get_logger("nodeagent.cryptoworker_child")
lean.warning("cryptoworker.orphaned", parent=7, pake_password="hunter2", path=sys.argv[1:2])
logs.get_logger("nodeagent.cryptoworker_child").warning(
    "cryptoworker.orphaned", parent=7, pake_password="hunter2", path=sys.argv[1:2]
)
leanlog.configure(json_lines=True, level=leanlog.level_of("warning"))
lean.info("cryptoworker.dropped", parent=7)
lean.warning("cryptoworker.orphaned", parent=7, pake_password="hunter2", path=sys.argv[1:2])
# A logger of tlsroll.logs made in the lean child after all: its writer's, never stdout.
logs.get_logger("nodeagent.cryptoworker_child").warning(
    "cryptoworker.orphaned", parent=7, pake_password="hunter2", path=sys.argv[1:2]
)
"""
    done = subprocess.run(
        [sys.executable, "-P", "-c", script, "a file"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert len(lines) == 4 and done.stdout == "", done.stderr
    through_structlog, agent, child, late = lines
    assert list(child) == list(agent) == list(through_structlog) == list(late)
    assert list(child) == [
        "parent",
        "pake_password",
        "path",
        "event",
        "logger",
        "level",
        "timestamp",
    ]
    for line in lines:
        assert {k: v for k, v in line.items() if k != "timestamp"} == {
            "parent": 7,
            "pake_password": "[redacted]",
            "path": ["a file"],
            "event": "cryptoworker.orphaned",
            "logger": "nodeagent.cryptoworker_child",
            "level": "warning",
        }
        assert line["timestamp"].endswith("Z")
        stamp = dt.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        assert abs(stamp - dt.datetime.now(dt.UTC)) < dt.timedelta(hours=1)
    assert "hunter2" not in done.stderr


def test_the_childs_critical_unrenderable_and_lost_lines_are_as_the_agents(tmp_path: Path) -> None:
    """Review s42 of the lean child, nits: ``critical`` is logged as structlog logs it (level
    "critical", not "error"); an event whose fields cannot be rendered is a line with its name
    (none of its fields), counted, not dropped silently; the lost-lines notice has
    ``tlsroll.logs``' key order."""
    script = """
import json
from tlsroll import leanlog, logs
logs.configure(json=True, level=logs.level_of("info"))
logs.get_logger("nodeagent.sharing").critical("stage.critical", n=1)
agent_notice = json.loads(logs.writer.notice(3))
leanlog.configure(json_lines=True, level=leanlog.level_of("warning"))
lean = leanlog.get_logger("nodeagent.sharing")
lean.critical("stage.critical", n=1)

class Unsayable:
    def __repr__(self):
        raise RuntimeError("a value that says nothing")

lean.warning("stage.unrendered", value=Unsayable(), n=2)
lean.error("stage.after", n=3)
child_notice = json.loads(leanlog._output.notice(3))
print(json.dumps([list(agent_notice), list(child_notice), leanlog._output.unrendered]))
"""
    done = subprocess.run(
        [sys.executable, "-P", "-c", script],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=True,
    )
    agent_notice, child_notice, unrendered = json.loads(done.stdout)
    assert (
        child_notice == agent_notice == ["event", "logger", "level", "lost", "detail", "timestamp"]
    )
    assert unrendered == 1
    agent, child, unsaid, after = [json.loads(line) for line in done.stderr.splitlines()]
    assert agent["level"] == child["level"] == "critical"
    assert list(child) == list(agent)
    assert {k: v for k, v in unsaid.items() if k != "timestamp"} == {
        "error_type": "RuntimeError",
        "detail": "this event's fields could not be rendered; left out",
        "event": "stage.unrendered",
        "logger": "nodeagent.sharing",
        "level": "warning",
    }
    assert after["event"] == "stage.after" and "says nothing" not in done.stderr


def test_stage_s_checks_before_the_share_and_for_an_agent_that_calls_stage_alone(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """Review s42 of the lean child, Low 1: ``cert.stage_issuer`` makes every check that
    needs no key read (the key by the journalled CSR's public key, the names, the clock) in
    Stage's order; ``cert.stage`` still makes them all, as an agent started before
    ``stage_issuer`` existed calls it alone (an upgrade starts the new child for it), and
    ``stage_issuer`` answers an agent of 900742f (CA fields alone) with the issuer's checks."""
    key_file = tmp_path / "server.key"
    key = pki.generate_key()
    pki.write_key(key_file, key)
    csr = pki.make_csr(key, NAMES)
    earlier = pki.make_csr(pki.generate_key(), NAMES)
    now = dt.datetime.now(dt.UTC)

    def cert(made: Any) -> str:
        return pki.cert_to_pem(made).decode()

    right = cert(test_ca.sign_csr(csr, NAMES))
    cases = [
        (cert(test_ca.sign_csr(earlier, NAMES)), now, "does not match the staged key"),
        (cert(test_ca.issue(key.public_key(), Names.of("n2", ["127.0.0.2"]))), now, "names"),
        (right, now + dt.timedelta(days=3653), None),  # PKIError: not valid then
    ]
    base = {
        "ca_certificate_pem": test_ca.cert_pem.decode(),
        "ca_pin": pki.spki_pin(test_ca.cert),
        "names": certwork.names_request(NAMES),
    }
    for pem, when, refusal in cases:
        request = {**base, "certificate_pem": pem, "now": when.isoformat()}
        for op, extra in (
            (certwork_ops.stage_issuer, {"csr_pem": pki.csr_to_pem(csr).decode()}),
            (certwork_ops.stage, {"key_file": str(key_file), "reader": None}),
        ):
            if refusal is None:
                with pytest.raises(PKIError, match="expired or not yet valid"):
                    op({**request, **extra})
            else:
                assert refusal in op({**request, **extra})["refused"]
    request = {**base, "certificate_pem": right, "now": now.isoformat()}
    issuer = certwork_ops.stage_issuer({**request, "csr_pem": pki.csr_to_pem(csr).decode()})
    assert issuer == {"ca_pem": test_ca.cert_pem.decode()}
    old = {k: request[k] for k in ("certificate_pem", "ca_certificate_pem", "ca_pin")}
    assert "refused" not in certwork_ops.stage_issuer(old)
    stored = certwork_ops.stage({**request, "key_file": str(key_file), "reader": None})
    assert stored["fingerprint"] == pki.fingerprint(pki.load_cert_pem(right.encode()))


OLD_CHILD = (
    "from tlsroll import lean; lean.keep_out(); from nodeagent import cryptoworker; "
    "cryptoworker.main()"
)
"""``cryptoworker.CHILD`` before 900742f, as an agent started then still says it."""


def test_a_child_started_as_an_agent_before_the_lean_child_starts_it_answers(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """Review s42 of the lean child, Low 2: an agent running while its node is upgraded starts
    its child with the code on disk but its own ``CHILD``: that child answers, as ours does."""
    request = {"op": "cert.crl", "request": _crl_request(tmp_path, test_ca)}
    child = subprocess.run(
        [sys.executable, "-P", "-c", OLD_CHILD, "json", "info", str(os.getpid())],
        input=json.dumps(request) + "\n",
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert (child.returncode, child.stderr) == (0, "")
    assert _numbers(json.loads(child.stdout)["ok"]) == {"number": 7, "revoked": [12345]}


NOISY_OPS = """
import ctypes
import os

def say(request):
    print("a print to stdout")
    os.write(1, b"a write to fd 1\\n")
    libc = ctypes.CDLL(None)
    libc.puts(b"C's puts to stdout")
    libc.fflush(None)
    return request["back"]

def warn(request):
    import warnings
    warnings.warn("a test's warning,\\n  over " + "two lines " * 40, UserWarning)
    return "warned"

OPS = {"say": say, "unsayable": lambda request: {"a set": {1, 2}}, "warn": warn}
"""
"""A test's op module (never the product's op table): writes to stdout three ways, answers
what JSON cannot encode, or warns."""

NOISY_CHILD = (
    "from nodeagent import cryptoworker_child as c; c.OP_MODULES['noisy'] = 'noisy_ops'; c.main()"
)


def _noisy_child(
    tmp_path: Path, requests: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """A real child (``NOISY_CHILD``) with the test's op module, given ``requests``, run to
    its end (EOF)."""
    (tmp_path / "noisy_ops.py").write_text(NOISY_OPS)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return subprocess.run(
        [sys.executable, "-P", "-c", NOISY_CHILD, "json", "info", str(os.getpid())],
        input="".join(json.dumps(r) + "\n" for r in requests),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_nothing_but_answers_reaches_the_answers_pipe(tmp_path: Path) -> None:
    """Review s42 of the lean child, Low 4: an op (or a library it calls) that writes to stdout
    (a print, a write to fd 1, C's stdio) does not corrupt the answers: its lines go to
    stderr, its answer and the next call's arrive as they should. And (a nit of the review)
    an op's value JSON cannot encode is an error answer, not the child's end."""
    requests = [
        {"op": "noisy.say", "request": {"back": {"first": [1, "ü"]}}},
        {"op": "noisy.say", "request": {"back": "second"}},
        {"op": "noisy.unsayable", "request": {}},
        {"op": "cert.nope", "request": {}},
    ]
    child = _noisy_child(tmp_path, requests)
    assert child.returncode == 0, child.stderr
    answers = [json.loads(line) for line in child.stdout.splitlines()]
    assert answers[:2] == [{"ok": {"first": [1, "ü"]}}, {"ok": "second"}]
    # An answer JSON cannot encode: the op's bug, answered as one (nit), and the child goes on.
    assert answers[2] == {
        "error": {"type": "WorkerBug", "message": "crypto work (noisy.unsayable) failed: TypeError"}
    }
    assert answers[3]["error"]["type"] == "TerminalError" and len(answers) == 4
    said = child.stderr.splitlines()
    for noise in ("a print to stdout", "a write to fd 1", "C's puts to stdout"):
        assert said.count(noise) == 2, child.stderr


def test_a_warning_any_op_gives_is_one_json_log_line(tmp_path: Path) -> None:
    """Review s42 of the lean child, Low 3, whatever ``cryptography`` does (the next test
    relies on its warning for a negative serial, which it says a later release will refuse):
    a warning an op gives is one ``cryptoworker.warning`` line, its message on one line and
    cut to 200 characters."""
    child = _noisy_child(tmp_path, [{"op": "noisy.warn", "request": {}}])
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == {"ok": "warned"}
    (line,) = child.stderr.splitlines()
    event = json.loads(line)
    assert event["event"] == "cryptoworker.warning" and event["category"] == "UserWarning"
    assert event["message"].startswith("a test's warning, over two lines two lines")
    assert len(event["message"]) <= 200


def _negative_serial(ca: pki.CertificateAuthority) -> bytes:
    """A certificate (PEM) whose serial is -1, which RFC 5280 forbids and ``cryptography``
    warns of when it parses one: one of ``ca``'s with serial 1, the DER's serial byte made
    0xff (its signature no longer verifies: nothing here needs it to)."""
    made = ca.issue(pki.generate_key().public_key(), NAMES)
    issued = (
        x509.CertificateBuilder()
        .subject_name(made.subject)
        .issuer_name(made.issuer)
        .public_key(made.public_key())
        .serial_number(1)
        .not_valid_before(made.not_valid_before_utc)
        .not_valid_after(made.not_valid_after_utc)
        .sign(ca.key, hashes.SHA256())
    )
    der = issued.public_bytes(serialization.Encoding.DER)
    version_and_serial = b"\xa0\x03\x02\x01\x02\x02\x01\x01"
    assert der.count(version_and_serial) == 1
    der = der.replace(version_and_serial, version_and_serial[:-1] + b"\xff")
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(
        ["-----BEGIN CERTIFICATE-----", *lines, "-----END CERTIFICATE-----", ""]
    ).encode()


def test_a_warning_in_the_child_is_one_json_log_line(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """Review s42 of the lean child, Low 3: a Python warning in the child (``cryptography``'s
    for a certificate with a negative serial) was Python's two plain-text lines on the agent's
    stderr, among its JSON lines; it is a ``cryptoworker.warning`` event now, one JSON line."""
    negative = _negative_serial(test_ca)
    request = {
        "op": "cert.stage_issuer",
        "request": {
            "certificate_pem": negative.decode(),
            "ca_certificate_pem": test_ca.cert_pem.decode(),
            "ca_pin": pki.spki_pin(test_ca.cert),
        },
    }
    child = subprocess.run(
        [sys.executable, "-P", "-c", cryptoworker.CHILD, "json", "info", str(os.getpid())],
        input=json.dumps(request) + "\n",
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == {
        "ok": {"refused": "the certificate was not issued by the cluster CA"}
    }
    lines = child.stderr.splitlines()
    assert lines, "no warning"
    for line in lines:
        event = json.loads(line)
        assert list(event) == [
            *("category", "message", "detail", "event", "logger", "level", "timestamp")
        ]
        assert event["event"] == "cryptoworker.warning" and event["level"] == "warning"
        assert event["category"] == "CryptographyDeprecationWarning"
        assert "serial number" in event["message"] and len(event["message"]) <= 200
