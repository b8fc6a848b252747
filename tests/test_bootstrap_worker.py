"""Issue 15, session 41: the bootstrap service's cryptography runs in the agent's crypto worker
(``nodeagent.bootstrap_crypto``'s ops in ``nodeagent.cryptoworker``'s child), so that an agent
whose service enrols workstations holds neither ``cryptography`` nor ``spake2``.

- real agents: a workstation enrols through the bootstrap service of a switched node (real
  leader, agent, reference server and ``tlsroll client test-connection``); afterwards the
  agent's ``/proc/PID/maps`` holds no ``cryptography`` library, its worker (a child of the
  agent) does; nothing secret in the agent's log;
- the service with a real worker: a worker killed in the middle of an exchange is a 503
  "try later" for the workstation, nothing counted, and the next exchange works (a new child);
  a wrong password is counted once even while the worker is down (the key confirmation is the
  agent's own HMAC).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing
from cryptography.x509.oid import NameOID

from nodeagent import bootstrap_server, cryptoworker
from nodeagent.bootstrap_supervisor import SignRefused
from nodeagent.certwork import NoAnswer
from nodeagent.cryptoworker import CryptoWorker, WorkerEnded
from tests.cluster import LEADER_POLL, Cluster, wait_until
from tests.conftest import IssuedCert
from tests.nodeside import Node as ServerNode
from tests.nodeside import cluster_of
from tests.test_bootstrap import (
    OTHER_PASSWORD,
    PASSWORD,
    FakeClock,
    InProcessCrypto,
    Node,
    ca_signer,
    make_service,
    secrets_in,
)
from tlsroll import bootstrap_pake, password, pki
from tlsroll import bootstrap_protocol as proto
from workstation.connection import Exit

CRYPTOGRAPHY_LIB = "_rust.abi3.so"  # cryptography's Rust library (OpenSSL inside)
ROLLOUT_TIMEOUT = 120


def maps(pid: int) -> str:
    """``pid``'s memory map; empty if it has just ended."""
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def secret_file(path: Path, text: str) -> Path:
    path.touch(0o600)
    path.write_text(text + "\n")
    return path


def run_rollout(cluster: Cluster, *args: str) -> dict[str, Any]:
    started = cluster.cli("rollout", "start", "--scope", "cluster", *args, "--yes")
    assert started.returncode == 0, started.stderr

    def ended() -> bool:
        return cluster.schema_json()["rollouts"][0]["state"] in ("completed", "halted", "aborted")

    wait_until(ended, ROLLOUT_TIMEOUT, "the rollout to end", interval=LEADER_POLL)
    latest: dict[str, Any] = cluster.schema_json()["rollouts"][0]
    return latest


def client_test_connection(
    url: str, password_file: Path, settings: Path
) -> subprocess.CompletedProcess[str]:
    """``tlsroll client test-connection`` as a workstation (``test_password_rollout``)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tlsroll",
            "client",
            "test-connection",
            url,
            "--password-file",
            str(password_file),
            "--yes",
            "--settings-dir",
            str(settings),
            "--name",
            settings.name,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def switched(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Cluster, ServerNode, Path]]:
    """One node switched to https with an auth password by a real rollout: one for the
    module's tests of real agents, which run in the order written (under pytest-xdist, those a
    worker gets, in that order, on a node of its own): the agent that did the switch first,
    then restarted, then restarted with a worker that hangs."""
    root = tmp_path_factory.mktemp("switched")
    with cluster_of(root, 1) as (cluster, (node,)):
        pw = secret_file(root / "pw", PASSWORD)
        rollout = run_rollout(cluster, "--password-file", str(pw))
        assert rollout["state"] == "completed", rollout
        assert node.agent is not None
        SWITCHED_BY[node.name] = node.agent.pid
        yield cluster, node, pw


SWITCHED_BY: dict[str, int] = {}
"""The pid of the agent that did each ``switched`` node's switch."""


def enrol_and_check(node: ServerNode, pw: Path, settings: Path) -> None:
    """A workstation enrols through the node's bootstrap service; then the agent maps no
    ``cryptography`` library, and its crypto worker (its child) does: the work was done there.
    Nothing secret in the agent's log."""
    assert node.agent is not None
    wait_until(lambda: node.port_open(9443), 30, "the bootstrap service")
    logged = len(node.agent.log_text())  # (the log holds the runs before this one too)
    result = client_test_connection(node.https_url(), pw, settings)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (settings / "client.pem").exists()
    agent = node.agent.pid
    assert CRYPTOGRAPHY_LIB not in maps(agent), "the agent holds cryptography"
    workers = [p for p in children(agent) if CRYPTOGRAPHY_LIB in maps(p)]
    assert workers, "no crypto worker did the work"
    log = node.agent.log_text()
    assert "bootstrap.enrolled" in log[logged:]
    (verifier_file,) = (p for p in node.config_dir.rglob("*.json") if b'"hash"' in p.read_bytes())
    verifier = json.loads(verifier_file.read_text())
    digest = base64.b64decode(verifier["hash"])
    pake_pw = proto.pake_password(digest)
    for secret in (PASSWORD, verifier["hash"], digest.hex(), base64.b64encode(pake_pw).decode()):
        assert secret not in log


def test_a_switched_agent_enrols_workstations_without_cryptography(
    switched: tuple[Cluster, ServerNode, Path], tmp_path: Path
) -> None:
    """The whole path: the agent that did the switch (staging: a key, a CSR, the certificate's
    checks) then runs the bootstrap service; a workstation enrols; the agent holds no
    ``cryptography``."""
    _cluster, node, pw = switched
    assert node.agent is not None
    # (first of the module's tests: an agent a test before it restarted did no switch)
    assert node.agent.pid == SWITCHED_BY[node.name], "not the agent that did the switch"
    enrol_and_check(node, pw, tmp_path / "ws-after-switch")


def test_a_switched_agent_restarted_enrols_workstations_without_cryptography(
    switched: tuple[Cluster, ServerNode, Path], tmp_path: Path
) -> None:
    """The bootstrap service alone: the agent of an already switched node restarts (no switch
    work in this run), starts its service, and a workstation enrols through it. Fails before
    session 41: the service imported ``spake2`` and ``cryptography`` into the agent."""
    _cluster, node, pw = switched
    assert node.agent is not None
    node.agent.stop()
    node.restart_agent()
    enrol_and_check(node, pw, tmp_path / "ws-after-restart")


# A crypto worker child that never answers the bootstrap service's ops (it serves the others):
# put first on a restarted agent's PYTHONPATH (the child inherits it).
HANGING_BOOTSTRAP_OPS = """
import sys, time
if any("cryptoworker_child.main()" in a for a in getattr(sys, "orig_argv", ())):
    real = sys.stdin.buffer

    class Lines:
        def readline(self):
            line = real.readline()
            if b'"op": "bootstrap.' in line:
                time.sleep(3600)
            return line

    class In:
        buffer = Lines()

    sys.stdin = In()
"""


def test_the_agent_is_ready_before_its_bootstrap_service_asks_the_worker(
    switched: tuple[Cluster, ServerNode, Path], tmp_path: Path
) -> None:
    """Review s41, Low 3: the bootstrap service's start asks the crypto worker twice (the CA
    bundle, the password's blinding points), each up to a minute if the worker hangs: the
    agent started its gRPC server and told systemd READY only after both (systemd gives a
    start 90 s). It starts the service after READY now: a worker that never answers those
    ops does not hold the agent back (the ordering of its log lines is what is looked at)."""
    _cluster, node, _pw = switched
    agent = node.agent
    assert agent is not None
    site = tmp_path / "hanging-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HANGING_BOOTSTRAP_OPS)
    agent.stop()
    before = len(agent.log_events())

    def events() -> list[str]:
        return [str(e.get("event")) for e in agent.log_events()[before:]]

    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    agent.spawn({"PYTHONPATH": path})
    wait_until(lambda: "agent.started" in events(), 100, "the agent's start")
    seen = events()
    started = seen.index("agent.started")
    assert not [e for e in seen[:started] if e.startswith("bootstrap.")], seen[:started]


# A crypto worker child that ends (exit 70) as it reads the bootstrap service's "seal" op while
# the file named by FAIL_SEAL_WHILE exists: both tries of the work after the leader signed fail
# (the second in a new child, which ends alike). With HANG_SEAL set, it hangs instead while the
# file exists (then seals: a child the agent did not kill answers late). Put first on a
# restarted agent's PYTHONPATH (the child inherits it and the variables).
FAILING_SEAL = """
import os, sys, time
from pathlib import Path
if os.environ.get("FINISH_DEADLINE_OF_TEST"):  # the agent's, before nodeagent reads it
    import tlsroll.bootstrap_protocol
    tlsroll.bootstrap_protocol.FINISH_DEADLINE = float(os.environ["FINISH_DEADLINE_OF_TEST"])
if any("cryptoworker_child.main()" in a for a in getattr(sys, "orig_argv", ())):
    real = sys.stdin.buffer
    flag = Path(os.environ["FAIL_SEAL_WHILE"])
    hang = bool(os.environ.get("HANG_SEAL"))
    then = os.environ.get("FAIL_SEAL_AFTER_HANG_WHILE")

    class Lines:
        def readline(self):
            line = real.readline()
            failing = bool(then) and Path(then).exists()
            if b'"op": "bootstrap.seal"' in line and (flag.exists() or failing):
                if not hang:
                    os._exit(70)
                while flag.exists():
                    time.sleep(0.05)
                if failing:
                    os._exit(70)
            return line

    class In:
        buffer = Lines()

    sys.stdin = In()
"""
OLDER_LEADER = Path(__file__).with_name("older_leader.py")


def agent_failing_seal(
    node: ServerNode, tmp_path: Path, *, hang: bool = False, then_fail: float = 0.0
) -> Path:
    """Restart ``node``'s agent with a crypto worker that fails (``hang``: hangs in) the "seal"
    op (``FAILING_SEAL``) while the returned file exists (it does now). ``then_fail``: the
    seal hangs while the file exists, then fails, as it does in any child while the file
    ``then_failing(tmp_path)`` exists (it does now); the agent waits that many seconds for
    it (its FINISH_DEADLINE, set by the same sitecustomize): the test, not the deadline, says
    when the seal fails."""
    agent = node.agent
    assert agent is not None
    site = tmp_path / "failing-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAILING_SEAL)
    flag = tmp_path / "fail-seal"
    flag.write_text("while this file exists\n")
    agent.stop()
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "FAIL_SEAL_WHILE": str(flag)}
    if then_fail:
        then_failing(tmp_path).write_text("while this file exists\n")
        env |= {
            "FAIL_SEAL_AFTER_HANG_WHILE": str(then_failing(tmp_path)),
            "FINISH_DEADLINE_OF_TEST": str(then_fail),
        }
    agent.start(env | ({"HANG_SEAL": "1"} if hang or then_fail else {}))
    wait_until(lambda: node.port_open(9443), 30, "the bootstrap service")
    return flag


def then_failing(tmp_path: Path) -> Path:
    return tmp_path / "then-fail-seal"


def events_since(daemon: Any, before: int, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events()[before:] if e.get("event") == name]


def test_a_certificate_signed_but_not_delivered_does_not_hold_the_name(
    switched: tuple[Cluster, ServerNode, Path], tmp_path: Path
) -> None:
    """Session 43 (carried since s41): the leader signs, then both tries of the crypto worker's
    work fail; the workstation gets 503 "try later". Its retry (a new key, the same name) was
    refused as the name taken: the leader held the name for a certificate the workstation never
    got. Now the agent has the leader withdraw that very certificate before it answers: the
    retry enrols."""
    cluster, node, pw = switched
    assert node.agent is not None
    flag = agent_failing_seal(node, tmp_path)
    before, leader_before = len(node.agent.log_events()), len(cluster.leader.log_events())
    settings = tmp_path / "ws-undelivered"
    first = client_test_connection(node.https_url(), pw, settings)
    assert first.returncode == Exit.ENROL_REFUSED, first.stdout + first.stderr
    assert "busy" in first.stderr and "try again in 5 s" in first.stderr, first.stderr
    assert not (settings / "client.pem").exists()
    flag.unlink()  # the worker works again
    again = client_test_connection(node.https_url(), pw, settings)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (settings / "client.pem").exists()
    assert len(events_since(node.agent, before, "bootstrap.undelivered_withdrawn")) == 1
    (withdrawn,) = events_since(cluster.leader, leader_before, "workstation.withdrawn")
    reasons = revoke_reasons(cluster, "ws-undelivered")
    assert reasons[withdrawn["serial"]] == "never delivered"
    assert sorted(reasons.values()) == ["", "never delivered"]  # the retry's is valid


def test_a_certificate_signed_while_the_worker_hangs_is_withdrawn_while_the_workstation_waits(
    switched: tuple[Cluster, ServerNode, Path], tmp_path: Path
) -> None:
    """Review s43rev2 M1: the leader signs, then the crypto worker hangs in the seal. The agent
    waited for it up to the worker's 60 s, then sealed in a new child, long after the
    workstation had stopped waiting (10 s): nothing was withdrawn, and the workstation's retry
    was refused as the name taken. Now the work after the signing has FINISH_DEADLINE (half
    the workstation's wait): past it, the hung child is killed, the certificate withdrawn, and
    the workstation told to try later, while it still waits; its retry enrols. Fails before:
    the first run gets no answer (exit 6 "the server closed the connection", not 11); the
    review showed the retry then refused as the name taken once the late seal was done."""
    cluster, node, pw = switched
    assert node.agent is not None
    flag = agent_failing_seal(node, tmp_path, hang=True)
    before, leader_before = len(node.agent.log_events()), len(cluster.leader.log_events())
    settings = tmp_path / "ws-hung-seal"
    first = client_test_connection(node.https_url(), pw, settings)
    flag.unlink()  # (a child still hanging would seal now)
    assert first.returncode == Exit.ENROL_REFUSED, first.stdout + first.stderr
    assert "busy" in first.stderr and "try again in 5 s" in first.stderr, first.stderr
    assert not (settings / "client.pem").exists()
    (late,) = events_since(node.agent, before, "bootstrap.delivery_late")
    assert "restart tlsroll-agent" in late["hint"], late  # what to do (session 70)
    assert len(events_since(node.agent, before, "bootstrap.undelivered_withdrawn")) == 1
    again = client_test_connection(node.https_url(), pw, settings)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (settings / "client.pem").exists()
    (withdrawn,) = events_since(cluster.leader, leader_before, "workstation.withdrawn")
    reasons = revoke_reasons(cluster, "ws-hung-seal")
    assert reasons[withdrawn["serial"]] == "never delivered"
    assert sorted(reasons.values()) == ["", "never delivered"]  # the retry's is valid
    assert not events_since(node.agent, before, "bootstrap.worker_retry")  # no late second try


def test_a_certificate_the_admin_revoked_before_it_was_delivered_is_answered_so(
    switched: tuple[Cluster, ServerNode, Path], tmp_path: Path
) -> None:
    """The leader signs, the crypto worker hangs in the seal, and meanwhile an admin revokes
    the workstation's name (``tlsroll workstations revoke``). The withdrawal then finds the
    certificate revoked already: the PC was told "busy", the name taken until the admin frees
    it (which the admin had just done), and to use --replace (s44). Now it is told that an
    admin revoked it, and what to do; the name is free, and a run again enrols.

    The order is the test's, not the clock's (review s44rev3 L5: the revoke had to return
    within the agent's 5 s FINISH_DEADLINE, which a loaded machine may miss): the seal hangs
    until the revoke has returned, then fails; the agent's deadline (60 s) and the PC's wait
    (--timeout 90) are longer than any of it."""
    cluster, node, pw = switched
    assert node.agent is not None
    flag = agent_failing_seal(node, tmp_path, then_fail=60.0)
    before, leader_before = len(node.agent.log_events()), len(cluster.leader.log_events())
    settings = tmp_path / "ws-revoked-meanwhile"
    first = subprocess.Popen(
        [
            *(sys.executable, "-m", "tlsroll", "client", "test-connection", node.https_url()),
            *("--password-file", str(pw), "--yes", "--settings-dir", str(settings)),
            *("--name", settings.name, "--timeout", "90"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Signed (the seal hangs now, until the flag goes): the admin revokes the name.
        wait_until(
            lambda: bool(events_since(cluster.leader, leader_before, "workstation.enrolled")),
            30,
            "the leader's signing",
        )
        revoked = cluster.cli("workstations", "revoke", "ws-revoked-meanwhile")
        assert revoked.returncode == 0, revoked.stderr
        assert first.poll() is None  # the PC still waits: nothing answered yet
        flag.unlink()  # the seal fails now, in both tries: the agent withdraws, finds it revoked
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=10)
        flag.unlink(missing_ok=True)
        then_failing(tmp_path).unlink()  # the seal works again
    assert first.returncode == Exit.ENROL_REFUSED, out + err
    said = " ".join(err.split())
    assert "the CA signed a certificate for ws-revoked-meanwhile, but the node could not" in said
    assert "an admin has revoked it since (tlsroll workstations revoke, or ca revoke)" in said
    assert "ask the admin whether this PC is to be enrolled; if so, run again" in said, said
    assert "busy" not in said and "--replace" not in said and "name taken" not in said, said
    assert not (settings / "client.pem").exists()
    reasons = revoke_reasons(cluster, "ws-revoked-meanwhile")
    assert list(reasons.values()) == ["revoked by the admin"]
    assert not events_since(node.agent, before, "bootstrap.delivery_late")  # (not the deadline)
    again = client_test_connection(node.https_url(), pw, settings)  # the name is free
    assert again.returncode == 0, again.stdout + again.stderr


def revoke_reasons(cluster: Cluster, name: str) -> dict[str, str]:
    """The leader's workstation certificates of ``name``: serial -> why revoked ("": valid)."""
    db = sqlite3.connect(f"{cluster.store_path.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT serial, revoke_reason FROM certificates"
            " WHERE kind = 'workstation' AND subject = ?",
            (name,),
        ).fetchall()
    finally:
        db.close()
    return {str(serial): str(reason) for serial, reason in rows}


def test_an_older_leader_keeps_the_name_held_and_the_answers_say_what_frees_it(
    switched: tuple[Cluster, ServerNode, Path], tmp_path: Path
) -> None:
    """An agent of this release whose leader is older (UNIMPLEMENTED to the withdrawal): as
    before, the name stays held; one log line says why, the 503 says what frees the name, and
    so does the retry's refusal (the name taken)."""
    cluster, node, pw = switched
    assert node.agent is not None
    default = cluster.leader.argv
    cluster.stop_leader()
    cluster.leader.argv = [sys.executable, str(OLDER_LEADER), "--config", str(cluster.config_path)]
    try:
        cluster.start_leader()
        flag = agent_failing_seal(node, tmp_path)
        before = len(node.agent.log_events())
        settings = tmp_path / "ws-old-leader"
        first = client_test_connection(node.https_url(), pw, settings)
        assert first.returncode == Exit.ENROL_REFUSED, first.stdout + first.stderr
        assert "tlsroll workstations revoke ws-old-leader" in first.stderr, first.stderr
        assert "--replace" in first.stderr
        assert len(events_since(node.agent, before, "bootstrap.withdraw_unsupported")) == 1
        flag.unlink()
        again = client_test_connection(node.https_url(), pw, settings)
        assert again.returncode == Exit.ENROL_REFUSED, again.stdout + again.stderr
        assert "is taken" in again.stderr, again.stderr
        # This PC's first run left its note (a 503: the node may have had it signed), so the
        # refusal names that run and the way that frees the name from this PC (session 63).
        assert "an earlier run of this PC" in again.stderr, again.stderr
        assert "run again with --replace (it revokes that certificate" in again.stderr
    finally:
        cluster.leader.argv = default
        if cluster.leader.running:
            cluster.stop_leader()
        cluster.start_leader()


# --- the service with a real worker ---------------------------------------------------------------


class Killing:
    """A real ``CryptoWorker`` whose child is killed (SIGKILL) in the middle of the op
    ``kill_at``: the call meets a child that ended mid-call (``WorkerEnded``), as when the
    kernel's OOM killer ends it in the middle of an exchange. The child (``HELD_CHILD``) has
    taken the request (said ``cryptoworker_child.TAKEN``) and stopped itself before answering
    it when it is killed: a child killed before it took the request would be one that ended
    while idle, and the worker would hand the request to a new one (no failure at all)."""

    def __init__(self, worker: CryptoWorker, hold: Path) -> None:
        self.worker = worker
        self.hold = hold  # ``HELD_CHILD``'s file: the op its child stops in, once
        self.kill_at: str | None = None
        self.kills = 1  # calls of ``kill_at`` killed in a row
        self.failures: list[str] = []

    async def call(self, op: str, request: dict[str, Any]) -> Any:
        kill = op == self.kill_at
        if kill:
            self.kills -= 1
            if self.kills <= 0:
                self.kill_at, self.kills = None, 1
            self.hold.write_text(op)
        call = asyncio.ensure_future(self.worker.call(op, request))
        if kill:
            await until(lambda: call.done() or state(self.worker.pid) == "T")
            assert not call.done(), "the child did not stop in the op"
            assert not self.hold.exists()  # the child took the request, and stopped
            assert self.worker.pid is not None
            os.kill(self.worker.pid, signal.SIGKILL)
        try:
            return await call
        except Exception as exc:
            self.failures.append(type(exc).__name__)
            raise

    def warm(self) -> None:
        self.worker.warm()


HELD_CHILD = """
import os, pathlib, signal
from nodeagent import cryptoworker_child

answer_line = cryptoworker_child.answer_line


def held(message, hold=pathlib.Path(%r)):
    # The test's fault, once: the op named in ``hold`` stops the child once it has taken the
    # request (said so) and before it answers it.
    if isinstance(message, dict) and hold.exists() and message.get("op") == hold.read_text():
        hold.unlink()
        os.kill(os.getpid(), signal.SIGSTOP)
    return answer_line(message)


cryptoworker_child.answer_line = held
"""
"""``cryptoworker.CHILD`` comes after this: the real child, stopped in an op (``Killing``)."""


def state(pid: int | None) -> str:
    """``pid``'s state letter (/proc/PID/stat: "T" stopped, "Z" a zombie), "" if gone."""
    if pid is None:
        return ""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


async def until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait (bounded) until ``check()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "not within the bound"
        await asyncio.sleep(0.01)


class NamingSigner:
    """The tests' CA signer, refusing a name already signed for another key as the leader does
    (``leader.store.NameTaken``, ALREADY_EXISTS: ``SignRefused`` with ``refused``); ``withdraw``
    frees the name of a certificate it signed (``Leader.WithdrawWorkstationCertificate``), or
    answers ``withdraws`` (False: as an older leader, the name stays held)."""

    def __init__(self, ca: pki.CertificateAuthority) -> None:
        self.sign = ca_signer(ca)
        self.holders: dict[str, str] = {}
        self.signed: list[bytes] = []
        self.withdrawn: list[bytes] = []
        self.withdraws = True

    async def __call__(self, csr_pem: bytes) -> bytes:
        csr = pki.load_csr_pem(csr_pem)
        name = str(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        pin = pki.spki_pin(csr.public_key())  # type: ignore[arg-type]
        if self.holders.setdefault(name, pin) != pin:
            raise SignRefused(f"{name} is taken; run again with --replace", refused=True)
        signed = bytes(await self.sign(csr_pem))
        self.signed.append(signed)
        return signed

    async def withdraw(self, cert_pem: bytes) -> bootstrap_server.Withdrawal:
        self.withdrawn.append(cert_pem)
        if not self.withdraws:
            return bootstrap_server.Withdrawal.HELD
        cert = pki.load_cert_pem(cert_pem)
        name = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        if self.holders.get(name) == pki.spki_pin(cert):
            del self.holders[name]
        return bootstrap_server.Withdrawal.WITHDRAWN


@pytest.fixture
async def worker() -> AsyncIterator[CryptoWorker]:
    w = CryptoWorker(idle_seconds=30)
    try:
        yield w
    finally:
        await w.close()


@pytest.fixture
def signer(test_ca: pki.CertificateAuthority) -> NamingSigner:
    return NamingSigner(test_ca)


@pytest.fixture
async def killing_node(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
    worker: CryptoWorker,
    signer: NamingSigner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Node, Killing]]:
    """The bootstrap service with a real crypto worker (a child process: ``HELD_CHILD``)."""
    address = loopback()
    clock = FakeClock()
    hold = tmp_path / "hold-in-op"
    monkeypatch.setattr(cryptoworker, "CHILD", HELD_CHILD % str(hold) + cryptoworker.CHILD)
    crypto = Killing(worker, hold)
    async with make_service(
        issue_cert(address, "node-a"),
        address,
        test_ca,
        clock=clock,
        crypto=crypto,
        sign=signer,
        withdraw=signer.withdraw,
    ) as service:
        yield Node(service, clock, test_ca.cert_pem), crypto


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


@pytest.mark.parametrize("kill_at", ["bootstrap.respond", "bootstrap.open_csr"])
async def test_a_worker_killed_mid_exchange_is_try_later_and_nothing_counted(
    killing_node: tuple[Node, Killing],
    session: aiohttp.ClientSession,
    worker: CryptoWorker,
    kill_at: str,
) -> None:
    node, crypto = killing_node
    assert (await node.exchange(session, cn="ws-first")).status == 200  # the child runs
    first = worker.pid
    crypto.kill_at = kill_at
    attempt = await node.exchange(session, cn="ws-second")
    assert crypto.failures == [WorkerEnded.__name__]
    assert (attempt.status, attempt.error) == (503, "busy"), attempt.body
    assert attempt.headers["Retry-After"] == "5"
    assert "try later" in attempt.body["message"]
    assert set(attempt.body) == {"error", "message"}  # nothing keyed
    assert node.service.failures.pending() == []  # not a wrong password
    assert node.service.guard.ceiling.count(node.clock()) == 0
    assert len(node.service.exchanges) == 0  # dropped or used up: no slot held
    again = await node.exchange(session, cn="ws-second")  # a new child answers
    assert again.status == 200, again.body
    assert worker.pid is not None and worker.pid != first


@pytest.mark.parametrize("kill_at", ["bootstrap.cert_facts", "bootstrap.seal"])
async def test_a_worker_killed_after_the_leader_signed_is_tried_again(
    killing_node: tuple[Node, Killing],
    session: aiohttp.ClientSession,
    worker: CryptoWorker,
    kill_at: str,
) -> None:
    """Review s41 M2: once the leader has signed, it holds the workstation's name for that
    certificate's key; a 503 then sent the workstation back with a new key, refused as a name
    taken ("run again with --replace"). The worker's work after the signing is tried once
    more (a new child): the workstation gets its certificate."""
    node, crypto = killing_node
    assert (await node.exchange(session, cn="ws-first")).status == 200  # the child runs
    first = worker.pid
    crypto.kill_at = kill_at
    attempt = await node.exchange(session, cn="ws-second")
    assert crypto.failures == [WorkerEnded.__name__]
    assert attempt.status == 200, attempt.body
    assert attempt.payload().certificate_pem  # the payload opens: the certificate is there
    assert worker.pid is not None and worker.pid != first
    assert node.service.failures.pending() == []
    # (The signer refuses the name for another key, as the leader does.)
    taken = await node.exchange(session, cn="ws-second")
    assert (taken.status, taken.error) == (409, "sign_failed"), taken.body


@pytest.mark.parametrize("kill_at", ["bootstrap.cert_facts", "bootstrap.seal"])
async def test_a_certificate_the_worker_failed_twice_to_deliver_is_withdrawn(
    killing_node: tuple[Node, Killing],
    session: aiohttp.ClientSession,
    signer: NamingSigner,
    kill_at: str,
) -> None:
    """Session 43: both tries of the work after the signing fail (the child killed twice).
    The leader is asked to withdraw exactly the certificate it signed for this exchange before
    the 503 "try later" goes out; the workstation's next try (a new key, the same name) is
    signed. Fails before: nothing withdrawn, the next try refused (409, the name taken)."""
    node, crypto = killing_node
    crypto.kill_at, crypto.kills = kill_at, 2
    attempt = await node.exchange(session, cn="ws-second")
    assert crypto.failures == [WorkerEnded.__name__] * 2
    assert (attempt.status, attempt.error) == (503, "busy"), attempt.body
    assert "try later" in attempt.body["message"]
    assert signer.withdrawn == signer.signed and len(signer.signed) == 1
    again = await node.exchange(session, cn="ws-second")
    assert again.status == 200, again.body
    assert again.payload().certificate_pem == signer.signed[-1]


async def test_a_certificate_that_could_not_be_withdrawn_is_answered_with_what_frees_the_name(
    killing_node: tuple[Node, Killing],
    session: aiohttp.ClientSession,
    signer: NamingSigner,
) -> None:
    """The withdrawal failed too (an older leader, the leader unreachable): the name stays
    held, and the 503 says so and what frees it; the retry is refused as the name taken."""
    node, crypto = killing_node
    signer.withdraws = False
    crypto.kill_at, crypto.kills = "bootstrap.seal", 2
    attempt = await node.exchange(session, cn="ws-second")
    assert (attempt.status, attempt.error) == (503, "busy"), attempt.body
    message = attempt.body["message"]
    assert "tlsroll workstations revoke ws-second" in message and "--replace" in message
    assert len(message) <= 400  # what the client shows of it (NODE_MESSAGE_CHARS)
    assert signer.withdrawn == signer.signed
    taken = await node.exchange(session, cn="ws-second")
    assert (taken.status, taken.error) == (409, "sign_failed"), taken.body


class Stalling:
    """The in-process crypto (``InProcessCrypto``), except that the op ``stall_at`` never
    answers (a hung worker, as the agent sees it: its call cancelled when it gives up)."""

    def __init__(self) -> None:
        self.crypto = InProcessCrypto()
        self.stall_at: str | None = None
        self.stalled = asyncio.Event()
        self.cancelled = 0  # calls of ``stall_at`` given up by the service

    async def call(self, op: str, request: dict[str, Any]) -> Any:
        if op == self.stall_at:
            self.stalled.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return await self.crypto.call(op, request)

    def warm(self) -> None:
        pass


@pytest.fixture
async def stalling_node(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
    signer: NamingSigner,
) -> AsyncIterator[tuple[Node, Stalling]]:
    address = loopback()
    clock = FakeClock()
    crypto = Stalling()
    async with make_service(
        issue_cert(address, "node-a"),
        address,
        test_ca,
        clock=clock,
        crypto=crypto,
        sign=signer,
        withdraw=signer.withdraw,
    ) as service:
        yield Node(service, clock, test_ca.cert_pem), crypto


@pytest.mark.parametrize("late", ["seal hangs", "signed late"])
async def test_the_work_after_the_signing_past_its_deadline_is_withdrawn_and_try_later(
    stalling_node: tuple[Node, Stalling],
    session: aiohttp.ClientSession,
    signer: NamingSigner,
    late: str,
) -> None:
    """Review s43rev2 M1: the work after the leader signed has one deadline from the request's
    arrival (``FINISH_DEADLINE``, half the workstation's wait; shortened here): a worker that
    hangs in the seal, or a leader that signs so late that no answer would come while the
    workstation waits, ends in the certificate withdrawn and 503 "try later", not an answer
    sealed for a workstation that has gone. Fails before: the hung seal is waited for (until
    the client's own timeout), the late signing answered as if the workstation still waited;
    nothing withdrawn."""
    node, crypto = stalling_node
    node.service.finish_deadline = 1.0
    sign = signer.sign
    if late == "seal hangs":
        crypto.stall_at = "bootstrap.seal"
    else:

        async def slow(csr_pem: bytes) -> bytes:
            await asyncio.sleep(1.5)  # past the deadline, by the loop's clock
            return bytes(await sign(csr_pem))

        signer.sign = slow
    attempt = await node.exchange(session, cn="ws-late")
    assert (attempt.status, attempt.error) == (503, "busy"), attempt.body
    assert "try later" in attempt.body["message"]
    assert signer.withdrawn == signer.signed and len(signer.signed) == 1
    assert crypto.cancelled == (1 if late == "seal hangs" else 0)  # no second try
    crypto.stall_at, signer.sign = None, sign
    again = await node.exchange(session, cn="ws-late")
    assert again.status == 200, again.body
    assert again.payload().certificate_pem == signer.signed[-1]


async def test_a_certificate_signed_as_the_agent_stops_is_withdrawn_before_it_ends(
    stalling_node: tuple[Node, Stalling],
    session: aiohttp.ClientSession,
    signer: NamingSigner,
) -> None:
    """Review s43rev2 M1: the agent stops (the service's stop cancels the request after its
    grace) while the work after the signing runs: the certificate, which no one will receive,
    is withdrawn before the cancellation goes on. Fails before: the cancellation went through,
    nothing withdrawn, the name held."""
    node, crypto = stalling_node
    node.service.finish_deadline = 600.0  # (the stop comes first)
    assert node.service._listener is not None
    node.service._listener.shutdown_timeout = 0.1
    crypto.stall_at = "bootstrap.seal"
    attempt = asyncio.ensure_future(node.exchange(session, cn="ws-stopping"))
    await asyncio.wait_for(crypto.stalled.wait(), 60)
    await node.service.stop()
    assert crypto.cancelled == 1
    assert len(signer.signed) == 1 and signer.withdrawn == signer.signed
    with pytest.raises(aiohttp.ClientError):
        await attempt


async def test_a_certificate_signed_while_the_agent_stops_is_withdrawn(
    stalling_node: tuple[Node, Stalling],
    session: aiohttp.ClientSession,
    signer: NamingSigner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 43's "agent stopping during signing": the agent stops (the service's stop
    cancels the request after its grace) while the leader signs. The leader records the
    certificate, and its answer comes after the cancellation: before, the cancellation cut
    the signing call, nothing was withdrawn and the name stayed held by a certificate no one
    received (the workstation's next try refused as a name taken), nothing said. Now the
    signing's answer is awaited and what it signed withdrawn, and the service's stop waits for
    that work (review s45rev4 M1: it ran in the cancelled request's task, which the listener's
    stop left after 1 s; the stop returned, and the agent's end then cut the withdrawal). The
    leader answers 1.5 s after the cancellation here; the withdrawal is done when the stop
    returns. (The answer is held until the request was cancelled; the bound,
    ``STOP_WITHDRAW``, made long, so that the loaded machine's pace does not matter: its end
    is the next test's.) Fails before the fix: the stop returned before the leader answered."""
    monkeypatch.setattr(bootstrap_server, "STOP_WITHDRAW", 30.0)
    node, _crypto = stalling_node
    listener = node.service._listener
    assert listener is not None
    listener.shutdown_timeout = 0.1
    recorded, answer = asyncio.Event(), asyncio.Event()

    async def slow(csr_pem: bytes) -> bytes:
        signed = await signer(csr_pem)  # the leader recorded it
        recorded.set()
        await answer.wait()  # its answer on the way
        return signed

    node.service.sign = slow
    attempt = asyncio.ensure_future(node.exchange(session, cn="ws-stopping"))
    await asyncio.wait_for(recorded.wait(), 60)
    with structlog.testing.capture_logs() as events:
        stopping = asyncio.ensure_future(node.service.stop())

        def cancelled() -> bool:
            return any(e["event"] == "bootstrap.signing_stopping" for e in events)

        await until(lambda: cancelled() or stopping.done())
        await asyncio.sleep(1.5)  # past the listener's 1 s for its cancelled connections
        assert not stopping.done(), "the stop returned before the leader answered"
        answer.set()
        await asyncio.wait_for(stopping, 60)
    assert len(signer.signed) == 1 and signer.withdrawn == signer.signed
    assert "ws-stopping" not in signer.holders  # the name free for the next try
    assert not node.service._stop_work  # nothing left for the agent's end to cut
    with pytest.raises(aiohttp.ClientError):
        await attempt


@pytest.mark.parametrize("hangs", ["withdrawal", "signing"])
async def test_the_work_a_stop_leaves_is_bounded(
    stalling_node: tuple[Node, Stalling],
    session: aiohttp.ClientSession,
    signer: NamingSigner,
    monkeypatch: pytest.MonkeyPatch,
    hangs: str,
) -> None:
    """A leader that does not answer the withdrawal, or the signing, holds up the service's
    stop for ``STOP_WITHDRAW`` at most (shortened here): when the stop returns, the call was
    cancelled and the log says what it may leave held."""
    node, crypto = stalling_node
    monkeypatch.setattr(bootstrap_server, "STOP_WITHDRAW", 0.2)
    node.service.finish_deadline = 600.0
    assert node.service._listener is not None
    node.service._listener.shutdown_timeout = 0.1
    asked = asyncio.Event()
    ended: list[str] = []

    async def hanging(*_: object) -> Any:
        asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    if hangs == "withdrawal":
        crypto.stall_at = "bootstrap.seal"
        node.service.withdraw = hanging
    else:
        node.service.sign = hanging
    with structlog.testing.capture_logs() as events:
        attempt = asyncio.ensure_future(node.exchange(session, cn="ws-stopping"))
        if hangs == "withdrawal":
            await asyncio.wait_for(crypto.stalled.wait(), 60)
        else:
            await asyncio.wait_for(asked.wait(), 60)
        await asyncio.wait_for(node.service.stop(), 60)
        assert asked.is_set() and ended == ["cancelled"]
        assert not node.service._stop_work
    said = [
        e for e in events if e["event"] in ("bootstrap.withdraw_failed", "bootstrap.signing_cut")
    ]
    if hangs == "withdrawal":
        assert [(e["event"], e["error"]) for e in said] == [
            ("bootstrap.withdraw_failed", "stopping")
        ]
    else:
        (cut,) = said
        assert cut["event"] == "bootstrap.signing_cut"
        assert "tlsroll workstations revoke ws-stopping" in cut["why"], cut
    with pytest.raises(aiohttp.ClientError):
        await attempt


async def test_a_wrong_password_is_counted_once_while_the_worker_is_down(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
    session: aiohttp.ClientSession,
) -> None:
    """The key confirmation is the agent's own (HMAC): a wrong password is found and counted
    without the worker, once; a right one whose CSR the worker cannot open is a 503, not
    counted."""
    address = loopback()
    crypto = InProcessCrypto()
    async with make_service(
        issue_cert(address, "node-a"), address, test_ca, crypto=crypto
    ) as service:
        node = Node(service, FakeClock(), test_ca.cert_pem)

        def down() -> None:  # after the start, before the finish
            crypto.fail = NoAnswer("crypto work (bootstrap.open_csr) failed: the worker ended")

        wrong = await node.exchange(session, OTHER_PASSWORD, before_finish=down)
        assert (wrong.status, wrong.error) == (401, "wrong_password")
        assert sum(f.count for f in service.failures.pending()) == 1
        assert "open_csr" not in crypto.calls
        crypto.fail = None
        right = await node.exchange(session, before_finish=down)
        assert (right.status, right.error) == (503, "busy")
        assert sum(f.count for f in service.failures.pending()) == 1  # still the one
        crypto.fail = None
        assert (await node.exchange(session)).status == 200


async def test_the_exchange_through_a_real_worker_logs_no_secret(
    killing_node: tuple[Node, Killing],
    session: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The worker's child logs to the agent's stderr: neither it nor the agent logs what
    crosses the pipe (what SPAKE2 runs on, the keys)."""
    node, _crypto = killing_node
    attempt = await node.exchange(session)
    assert attempt.status == 200
    assert attempt.keys is not None
    out, err = capfd.readouterr()
    assert secrets_in(out + err) == []
    for key in (*attempt.keys.seal_to.values(), *attempt.keys.confirm.values()):
        assert base64.b64encode(key).decode() not in out + err


async def test_a_bundle_with_a_non_ca_is_refused_at_start(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
) -> None:
    """The CA bundle's check moved from the constructor to ``start`` (the worker's op)."""
    address = loopback()
    cert = issue_cert(address, "node-a")
    service = make_service(cert, address, test_ca)
    service.ca_bundle_pem = cert.cert_file.read_bytes()  # the node's own: not a CA
    with pytest.raises(ValueError, match="CA certificates"):
        await service.start()
    await service.stop()


async def test_the_password_blinding_points_are_made_at_start_not_at_a_request(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Making ``w·N`` and ``−w·M`` takes a time that depends on the password: made once, when
    the service starts (or, if the worker failed then, at the first exchange), never again for
    a stranger's request, although the worker that keeps nothing between calls (it may have
    been stopped when idle) answers each."""
    made: list[int] = []  # one entry per making of the points (a respond's too); not the pw
    make = bootstrap_pake._node_blinds

    def counted(pw: bytes) -> tuple[Any, Any]:
        made.append(len(made) + 1)
        return make(pw)

    monkeypatch.setattr(bootstrap_pake, "_node_blinds", counted)
    address = loopback()
    crypto = InProcessCrypto()
    async with make_service(
        issue_cert(address, "node-a"), address, test_ca, crypto=crypto
    ) as service:
        node = Node(service, FakeClock(), test_ca.cert_pem)
        assert crypto.calls == {"check_ca_bundle": 1, "blinds": 1}
        for _ in range(2):
            assert (await node.exchange(session)).status == 200
        assert (await node.exchange(session, OTHER_PASSWORD)).status == 401
        assert crypto.calls["blinds"] == 1 and crypto.calls["respond"] == 3
        assert len(made) == 1  # respond never made them
        service.set_verifier(password.make_verifier(OTHER_PASSWORD, **password.TEST_PARAMS))
        assert (await node.exchange(session, OTHER_PASSWORD)).status == 200
        assert crypto.calls["blinds"] == 2 and len(made) == 2

    # A worker that cannot start when the service does: the service starts (warnings), and
    # the first exchange has the points made.
    crypto = InProcessCrypto()
    crypto.fail = NoAnswer("crypto work (bootstrap.check_ca_bundle) failed: the worker ended")
    async with make_service(
        issue_cert(address, "node-a"), address, test_ca, crypto=crypto
    ) as service:
        crypto.fail = None
        assert (await Node(service, FakeClock(), test_ca.cert_pem).exchange(session)).status == 200
        assert crypto.calls["blinds"] == 2  # the failed one at start, then the exchange's


def test_a_start_that_is_no_valid_point_costs_the_worker_no_spake2_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 70 (session 68 left it): a msg_a of the right shape whose point is not on the
    curve, not in the group (a small-order or mixed point) or the neutral one was refused
    only in SPAKE2's ``finish``, after its ``start`` had cost the worker a multiplication of
    its own. The point is checked first now: ``start`` is never reached. A valid msg_a is
    answered as before, its point decoded once (``finish`` takes the checked one)."""
    from spake2 import SPAKE2_A

    pw = b"p" * 32
    blinds = bootstrap_pake.node_blinds(pw)
    group = bootstrap_pake.PARAMS.group

    def no_start(self: object) -> bytes:
        raise AssertionError("SPAKE2's start ran for a message that is no valid point")

    with monkeypatch.context() as patched:
        patched.setattr(bootstrap_pake._NodeSPAKE2, "start", no_start)
        for y in (2, 3, 1, 2**255 - 20):  # off the curve; small order; neutral; order 2
            with pytest.raises(proto.BootstrapError, match="msg_a is not a valid point"):
                bootstrap_pake.node_respond(pw, b"A" + y.to_bytes(32, "little"), blinds)
    decoded: list[bytes] = []
    decode = type(group).bytes_to_element

    def counted(self: object, data: bytes) -> Any:
        decoded.append(data)
        return decode(self, data)

    workstation = SPAKE2_A(
        pw, idA=proto.ID_WORKSTATION, idB=proto.ID_NODE, params=bootstrap_pake.PARAMS
    )
    msg_a = workstation.start()
    monkeypatch.setattr(type(group), "bytes_to_element", counted)
    msg_b, key = bootstrap_pake.node_respond(pw, msg_a, blinds)
    assert decoded.count(msg_a[1:]) == 1, len(decoded)
    assert workstation.finish(msg_b) == key


async def test_starts_that_are_no_valid_point_count_as_failures_and_the_source_backs_off(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
    session: aiohttp.ClientSession,
) -> None:
    """Session 70 (session 68 left it): a start whose msg_a is malformed or no valid point
    was refused and its exchange dropped at once, so the per-source cap of open exchanges did
    not bound it, and nothing was counted: one address could keep the crypto worker busy
    with cheap invalid starts (only ``PAKE_CONCURRENCY`` bounded it). Each is counted now as
    a wrong password is (``bootstrap.start_malformed``, with a hint; the failures the leader
    hears of: ``schema show``), and past the free ones the address waits (429) before the
    worker is asked; another address is not affected. Failed on the old code: the sixth
    invalid start was answered 400 after the worker's ``respond``, nothing counted."""
    address = loopback()
    crypto, clock = InProcessCrypto(), FakeClock()
    async with make_service(
        issue_cert(address, "node-a"), address, test_ca, crypto=crypto, clock=clock
    ) as service:
        node = Node(service, clock, test_ca.cert_pem)
        free = service.limits.per_source.free
        no_point = b"A" + (2).to_bytes(32, "little")  # the right shape, off the curve
        wrong_shape = b"B" + b"\x01" * 32  # found without the worker

        async def start(msg_a: bytes) -> tuple[int, dict[str, str], Any]:
            request = proto.StartRequest("ws-a", msg_a).to_json()
            return await node.call(session, "POST", proto.START_PATH, request)

        with structlog.testing.capture_logs() as events:
            for n in range(free):
                status, _headers, body = await start(no_point if n else wrong_shape)
                assert (status, body["error"]) == (400, "bad_request"), body
            asked = crypto.calls.get("respond", 0)
            status, headers, body = await start(no_point)
        assert asked == free - 1
        assert (status, body["error"]) == (429, "rate_limited"), body
        assert headers["Retry-After"] == "2"
        assert crypto.calls.get("respond", 0) == asked  # refused before the worker
        assert len(service.exchanges) == 0
        (pending,) = service.failures.pending()
        assert (pending.workstation, pending.count) == ("ws-a", free)
        said = [e for e in events if e["event"] == "bootstrap.start_malformed"]
        assert [e["failures"] for e in said] == list(range(1, free + 1)), said
        assert all(e["log_level"] == "warning" and "backoff" in e["hint"] for e in said)
        assert str(said[0]["remote"]).startswith("127."), said  # the client's address
        clock.advance(2)
        assert (await start(no_point))[0] == 400  # after the wait: counted again (the 6th)
        assert service.guard.sources.failures(pending.source, clock()) == free + 1


async def test_a_malformed_pake_message_is_refused_without_the_worker(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
    session: aiohttp.ClientSession,
) -> None:
    """Review s41, Low 6: a msg_a of the wrong shape (the node's side, or the wrong length) is
    a 400 found by the agent itself; the worker is not asked (a stranger's junk costs no round
    trip), and no exchange is held."""
    address = loopback()
    crypto = InProcessCrypto()
    async with make_service(
        issue_cert(address, "node-a"), address, test_ca, crypto=crypto
    ) as service:
        node = Node(service, FakeClock(), test_ca.cert_pem)
        for bad in (b"B" + b"\x01" * 32, b"A" + b"\x01" * 31):
            status, _headers, body = await node.call(
                session, "POST", proto.START_PATH, proto.StartRequest("ws-a", bad).to_json()
            )
            assert (status, body["error"]) == (400, "bad_request"), body
        assert "respond" not in crypto.calls
        assert len(service.exchanges) == 0
