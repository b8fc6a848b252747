"""The agent's certificate checks in a child process (``nodeagent.certwork``): the same answers
and the same errors as the in-process functions they run (``identity.load_identity``,
``pki.load_crl``), as plain values; a real child (``python -m nodeagent.certwork``) each time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import json
import os
import resource
import subprocess
from pathlib import Path
from typing import Any

import pytest
import structlog

import tlsroll
from nodeagent import certwork, workerrors
from nodeagent.config import AgentConfig
from nodeagent.cryptoworker import CryptoWorker
from nodeagent.identity import (
    IDENTITY_CHECKS,
    CertificateExpired,
    EnrolmentDeferred,
    PinNotShown,
    load_identity,
    paths,
)
from nodeagent.trust import LeaderTrust
from tests.test_renewal import _agent_config, _enrolled, _issue
from tlsroll import fsutil, pki, spiffe
from tlsroll.errors import (
    ConfigError,
    LocalResourceError,
    PKIError,
    PKIReason,
    TerminalError,
    TransientError,
)


def test_an_identity_checked_in_a_child_is_the_one_checked_here(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    cfg = _agent_config(tmp_path, test_ca)
    assert certwork.load_identity(cfg) is None  # not enrolled yet
    _enrolled(cfg, test_ca)
    child, here = certwork.load_identity(cfg), load_identity(cfg)
    assert child is not None and here is not None
    assert (child.not_before, child.not_after) == (here.not_before, here.not_after)
    assert child.trust_domain == here.trust_domain == spiffe.trust_domain(test_ca.cert)
    assert child.trust_domain == spiffe.trust_domain_of_pin(cfg.ca_pin)
    assert child.cert == here.cert  # what renewal work parses later
    assert (child.key_file, child.cert_file, child.ca_file) == paths(cfg.data_dir)


@pytest.mark.open_keys  # (a key others can read, on purpose)
def test_a_failed_check_is_the_same_error_with_the_same_message(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    cfg = _agent_config(tmp_path, test_ca)
    key_file, _ = _enrolled(cfg, test_ca)
    other = pki.CertificateAuthority.create("another CA")
    pki.write_cert(paths(cfg.data_dir)[2], other.cert)  # not the pinned CA
    # A config error (exit 2: a wrong pin or a replaced file, a person's to look into; s50agent)
    with pytest.raises(ConfigError) as here:
        load_identity(cfg)
    with pytest.raises(ConfigError) as child:
        certwork.load_identity(cfg)
    assert child.value.key == here.value.key == "[leader].ca_pin"
    assert f"pin is {pki.spki_pin(other.cert)}, not this pin" in str(child.value)
    assert str(child.value) == str(here.value)
    pki.write_cert(paths(cfg.data_dir)[2], test_ca.cert)
    os.chmod(key_file, 0o644)
    with pytest.raises(ConfigError) as unsafe:  # exit 2: the admin's to fix (s49agentexit)
        certwork.load_identity(cfg)
    assert f"node key: {key_file} is accessible by others" in str(unsafe.value)
    assert f"chmod 600 {key_file}" in str(unsafe.value)


def test_a_revocation_list_is_read_and_checked_in_a_child(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    now = dt.datetime.now(dt.UTC)
    revoked = [(f"{12345:x}", now), (f"{1 << 150:x}", now)]
    crl = pki.crl_to_pem(pki.build_crl(test_ca, 7, revoked, now=now))
    ca_file = tmp_path / "ca.pem"
    pki.write_cert(ca_file, test_ca.cert)
    assert certwork.load_crl(crl, ca_file) == pki.load_crl(crl, test_ca.cert)
    assert certwork.load_crl(crl, ca_file) == (7, frozenset({12345, 1 << 150}))
    other = pki.CertificateAuthority.create("another CA")
    pki.write_cert(ca_file, other.cert)
    with pytest.raises(PKIError) as refused:
        certwork.load_crl(crl, ca_file)
    assert refused.value.reason is PKIReason.UNTRUSTED


async def test_the_agents_crypto_worker_checks_a_revocation_list_as_a_child_does(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """A strace of a rotate-cert rollout: every switched agent started a child for each
    revocation list, 0.2-0.7 s of CPU each, some while its own server restarted (later it
    checked them in-process once a switch had loaded ``cryptography``, which it then kept).
    The agent's crypto worker checks them all in one child (``certwork.load_crl`` with the
    worker, from a worker thread, as ``LeaderTrust.take_crl`` runs), as strictly: the same
    answer, the same refusal, the same error."""
    worker = CryptoWorker()
    try:
        now = dt.datetime.now(dt.UTC)
        crl = pki.crl_to_pem(pki.build_crl(test_ca, 9, [(f"{777:x}", now)], now=now))
        ca_file = tmp_path / "ca.pem"
        pki.write_cert(ca_file, test_ca.cert)
        worker.warm()
        checked = await asyncio.to_thread(certwork.load_crl, crl, ca_file, worker)
        assert checked == (9, frozenset({777})) == pki.load_crl(crl, test_ca.cert)
        pid = worker.pid
        pki.write_cert(ca_file, pki.CertificateAuthority.create("another CA").cert)
        with pytest.raises(PKIError) as refused:
            await asyncio.to_thread(certwork.load_crl, crl, ca_file, worker)
        assert refused.value.reason is PKIReason.UNTRUSTED
        not_ascii = "ü".encode()
        with pytest.raises(TerminalError) as by_worker:
            await asyncio.to_thread(certwork.load_crl, not_ascii, ca_file, worker)
        with pytest.raises(TerminalError) as child:
            await asyncio.to_thread(certwork.load_crl, not_ascii, ca_file)
        assert type(by_worker.value) is type(child.value)
        assert str(by_worker.value) == str(child.value)
        assert worker.pid == pid and worker.started == 1  # one child checked them all
    finally:
        await worker.close()


def test_a_restart_with_the_files_a_child_checked_needs_no_child(
    tmp_path: Path, test_ca: pki.CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memo (``certwork.MEMO``) spares the child only while every byte the checks read is
    the same; the end date and the key file's permissions are checked without it."""
    cfg = _agent_config(tmp_path, test_ca)
    key_file, cert_file = _enrolled(cfg, test_ca)
    checked = certwork.load_identity(cfg)  # a child, which leaves the memo
    assert checked is not None and (cfg.data_dir / certwork.MEMO).exists()
    real_run = subprocess.run

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a child was started")

    monkeypatch.setattr(subprocess, "run", no_child)
    again = certwork.load_identity(cfg)
    assert again == checked and again is not None and again.cert == checked.cert
    with pytest.raises(CertificateExpired):
        certwork.load_identity(cfg, now=checked.not_after + dt.timedelta(seconds=1))
    os.chmod(key_file, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        certwork.load_identity(cfg)
    os.chmod(key_file, 0o600)
    # Another certificate (for another key): the memo no longer matches, a child checks.
    pki.write_cert(cert_file, _issue(test_ca, pki.generate_key(), cfg))
    with pytest.raises(AssertionError, match="a child was started"):
        certwork.load_identity(cfg)
    monkeypatch.setattr(subprocess, "run", real_run)
    with pytest.raises(ConfigError) as mismatch:  # exit 2 (s50agent)
        certwork.load_identity(cfg)
    assert f"{cert_file} is not the certificate of {key_file}" in str(mismatch.value)


@pytest.mark.parametrize("upgrade", ["version", "checks"])
def test_a_memo_written_by_other_code_is_checked_again(
    tmp_path: Path,
    test_ca: pki.CertificateAuthority,
    monkeypatch: pytest.MonkeyPatch,
    upgrade: str,
) -> None:
    """From the upgrade audit (F7): the memo is keyed to the code that checked, not only to the
    files. After an upgrade (another tlsroll version, or a revision of the identity checks) a
    child checks again with the new code although no file changed."""
    cfg = _agent_config(tmp_path, test_ca)
    _enrolled(cfg, test_ca)
    assert certwork.load_identity(cfg) is not None  # a child, which leaves the memo
    if upgrade == "version":
        monkeypatch.setattr(tlsroll, "__version__", tlsroll.__version__ + ".later")
    else:
        monkeypatch.setattr(certwork, "IDENTITY_CHECKS", IDENTITY_CHECKS + 1)
    started: list[object] = []
    real_run = subprocess.run

    def run(*args: Any, **kwargs: Any) -> Any:
        started.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    again = certwork.load_identity(cfg)
    assert again is not None
    assert started, "the memo of the earlier code was trusted: the new checks never ran"
    started.clear()
    assert certwork.load_identity(cfg) == again  # the new memo, written by this code
    assert not started


def test_a_child_that_cannot_start_is_a_shortage_not_a_verdict(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """From the review: ``subprocess.run`` raising OSError before any child ran (here a real
    EMFILE: this process's soft limit lowered to its lowest free descriptor) left the agent as
    a bare OSError: a heartbeat's revocation list killed the stream's reader, an epoch refresh
    answered the leader INTERNAL. It is the agent's own shortage (``LocalResourceError``, a
    transient error: tried again), and says nothing about the list or the identity."""
    cfg = _agent_config(tmp_path, test_ca)
    _enrolled(cfg, test_ca)
    crl = pki.crl_to_pem(pki.build_crl(test_ca, 1, [], now=dt.datetime.now(dt.UTC)))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = os.dup(0)
    os.close(fd)  # dup took the lowest free descriptor: a limit of it leaves none
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd, limits[1]))
    try:
        with pytest.raises(LocalResourceError, match="Too many open files"):
            certwork.load_crl(crl, paths(cfg.data_dir)[2])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert certwork.load_crl(crl, paths(cfg.data_dir)[2])[0] == 1


def test_a_childs_config_error_is_the_same_config_error(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """From the review: a ConfigError in the child was rebuilt as ``ConfigError(message)``,
    which takes three arguments: a TypeError (a traceback at the agent's start) instead of the
    one-line config error. Now the same class, path, key and message."""
    cfg = _agent_config(tmp_path, test_ca)
    cfg.path.write_text(cfg.path.read_text() + "\n[agent]\nport = 'not a port'\n")
    with pytest.raises(ConfigError) as here:
        AgentConfig.load(cfg.path)
    with pytest.raises(ConfigError) as child:
        certwork.enrol(cfg)
    assert str(child.value) == str(here.value)
    assert (child.value.key, child.value.problem) == (here.value.key, here.value.problem)


def test_a_childs_transient_error_stays_transient() -> None:
    """Every error class the child may raise comes back as the nearest class the agent knows:
    a LocalResourceError as one, another transient error as transient (before: terminal, which
    ended the enrolment's retries), anything else terminal."""

    class Flaky(TransientError):
        pass

    def round_trip(exc: Exception) -> Exception:
        return certwork._error(json.loads(json.dumps(workerrors.answer_for(exc))))

    assert type(round_trip(LocalResourceError("short"))) is LocalResourceError
    assert type(round_trip(Flaky("later"))) is TransientError
    assert type(round_trip(ValueError("bad"))) is TerminalError
    assert str(round_trip(Flaky("later"))) == "later"


def test_the_join_ports_wait_crosses_the_childs_boundary() -> None:
    """The enrolment child's ``EnrolmentDeferred`` (the join port's ``retry-after``) comes back
    as one with the same wait: the agent waits as told (the whole path, with a real leader, is
    in test_enrolment). A wait out of bounds is bounded again; one lost on the way is not taken
    as "retry now"."""

    def round_trip(exc: Exception) -> Exception:
        return certwork._error(json.loads(json.dumps(workerrors.answer_for(exc))))

    back = round_trip(EnrolmentDeferred("enrolment at x: retry in 8 s", 8))
    assert isinstance(back, EnrolmentDeferred)
    assert (back.retry_after, str(back)) == (8, "enrolment at x: retry in 8 s")
    far = round_trip(EnrolmentDeferred("far", 10**6))
    assert isinstance(far, EnrolmentDeferred) and far.retry_after == 300
    lost = certwork._error({"type": "EnrolmentDeferred", "message": "m"})
    assert type(lost) is TerminalError


def test_a_pin_not_shown_crosses_the_childs_boundary() -> None:
    """The enrolment child's ``PinNotShown`` (the join port's chain without a certificate of
    the pinned key: retried) comes back as one, with the pins it saw, its hint and the
    refusal it becomes past the patience (exit 2), word for word."""
    refusal = ConfigError(
        Path("/etc/tlsroll/agent.toml"), "[leader].ca_pin", "found x; configured: y"
    )
    back = certwork._error(
        json.loads(json.dumps(workerrors.answer_for(PinNotShown(refusal, ("sha256:aa",)))))
    )
    assert isinstance(back, PinNotShown) and isinstance(back, TransientError)
    assert (back.pins, back.hint) == (("sha256:aa",), "")
    hinted = PinNotShown(refusal, ("sha256:aa",), "the port sends a certificate issued by CN=x")
    back = certwork._error(json.loads(json.dumps(workerrors.answer_for(hinted))))
    assert isinstance(back, PinNotShown) and back.hint == hinted.hint  # review rev51e L4
    assert str(back.refusal) == str(refusal)
    assert (back.refusal.key, back.refusal.problem) == (refusal.key, refusal.problem)


def test_a_revocation_list_the_agent_cannot_check_now_is_raised_not_refused(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """From the second review: a list the agent could not check for want of descriptors was
    logged as refused and dropped, and the leader, which had counted it as delivered, did not
    send it again before the renewal bound (a revoked leader certificate was accepted that
    long). It is raised (the heartbeat stream ends; the next one brings the list again), and
    taken once the agent can check it."""
    cfg = _agent_config(tmp_path, test_ca)
    _enrolled(cfg, test_ca)
    trust = LeaderTrust.load(paths(cfg.data_dir)[2], spiffe.trust_domain(test_ca.cert), tmp_path)
    now = dt.datetime.now(dt.UTC)
    crl = pki.crl_to_pem(pki.build_crl(test_ca, 9, [(f"{4242:x}", now)], now=now))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = os.dup(0)
    os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd, limits[1]))
    try:
        with pytest.raises(LocalResourceError):
            trust.take_crl(crl)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert trust.crl_number != 9
    trust.take_crl(crl)
    assert trust.crl_number == 9 and 4242 in trust.revoked


def test_a_revocation_list_that_comes_as_the_agent_stops_is_raised_with_no_warning(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    """Review s69 revlogs L1: a list the leader sent as the agent stopped (its crypto worker
    closed) was logged ``crl.not_checked`` (warning), and the heartbeat's reader then
    ``heartbeat.reply_not_taken`` (warning): two warnings in a plain stop (14 of the last CI's
    agent logs, between ``agent.stopping`` and ``agent.stopped``). Raised still (the list is
    not taken; the next start's stream brings it), but no warning: nothing is wrong."""
    cfg = _agent_config(tmp_path, test_ca)
    _enrolled(cfg, test_ca)
    now = dt.datetime.now(dt.UTC)
    crl = pki.crl_to_pem(pki.build_crl(test_ca, 9, [(f"{4242:x}", now)], now=now))

    async def run() -> tuple[BaseException, list[Any]]:
        worker = CryptoWorker()
        worker.warm()  # (the agent's loop, as at its start)
        await worker.close()  # the agent stopping
        trust = LeaderTrust.load(
            paths(cfg.data_dir)[2], spiffe.trust_domain(test_ca.cert), tmp_path, worker
        )
        with structlog.testing.capture_logs() as events:
            try:
                await asyncio.to_thread(trust.take_crl, crl)
            except TransientError as exc:
                return exc, events
        raise AssertionError("taken by a closed worker")

    raised, events = asyncio.run(run())
    assert "the agent is stopping" in str(raised), raised
    assert events == [], events


def test_a_revocation_list_whose_check_gave_no_answer_is_raised_not_refused(
    tmp_path: Path, test_ca: pki.CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 32: a list whose check in a child gave no answer (the child crashed, or the
    kernel's OOM killer took it) was logged as refused and dropped, and the leader, which
    counts a list as held once it has sent it, does not send the same list again on that
    stream: the agent was behind (a revoked leader certificate accepted) until the next list
    or stream. It is raised (the stream ends; the next brings the list again), as a check the
    agent could not make now; a list the check refuses (not the CA's) is still refused."""
    cfg = _agent_config(tmp_path, test_ca)
    _enrolled(cfg, test_ca)
    trust = LeaderTrust.load(paths(cfg.data_dir)[2], spiffe.trust_domain(test_ca.cert), tmp_path)
    now = dt.datetime.now(dt.UTC)
    crl = pki.crl_to_pem(pki.build_crl(test_ca, 9, [(f"{4242:x}", now)], now=now))
    real = certwork.CHILD
    monkeypatch.setattr(
        certwork, "CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    with pytest.raises(TransientError):
        trust.take_crl(crl)
    assert trust.crl_number != 9
    monkeypatch.setattr(certwork, "CHILD", real)
    trust.take_crl(crl)
    assert trust.crl_number == 9 and 4242 in trust.revoked
    other = pki.CertificateAuthority.create()
    stranger = pki.crl_to_pem(pki.build_crl(other, 10, [(f"{4343:x}", now)], now=now))
    trust.take_crl(stranger)  # refused: a verdict
    assert trust.crl_number == 9 and 4343 not in trust.revoked


def test_two_revocation_lists_taken_at_once_leave_the_newer(
    tmp_path: Path, test_ca: pki.CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 32's audit, M5: ``take_crl`` runs in a worker thread; two lists taken at once
    (an old stream's reader and a new stream's) both compared their number with the one kept
    before either was written, and the older one, written last, replaced the newer (a leader
    certificate the newer revoked was accepted again). List 9's write is held until list 10
    is taken, or for a second: the newer is what is kept either way."""
    import threading

    from tlsroll.fsutil import write_atomic as write

    cfg = _agent_config(tmp_path, test_ca)
    _enrolled(cfg, test_ca)
    trust = LeaderTrust.load(paths(cfg.data_dir)[2], spiffe.trust_domain(test_ca.cert), tmp_path)
    now = dt.datetime.now(dt.UTC)
    older = pki.crl_to_pem(pki.build_crl(test_ca, 9, [], now=now))
    newer = pki.crl_to_pem(pki.build_crl(test_ca, 10, [(f"{4242:x}", now)], now=now))
    older_writing, newer_taken = threading.Event(), threading.Event()

    def slow_for_the_older(path: Path, data: bytes, mode: int) -> None:
        if data == older:
            older_writing.set()
            newer_taken.wait(1.0)  # (with the lock the newer waits for this write: a bound)
        write(path, data, mode)

    monkeypatch.setattr("nodeagent.trust.write_atomic", slow_for_the_older)

    def take_newer() -> None:
        trust.take_crl(newer)
        newer_taken.set()

    first = threading.Thread(target=trust.take_crl, args=(older,))
    first.start()
    assert older_writing.wait(30)  # the older list is checked and being written
    second = threading.Thread(target=take_newer)
    second.start()
    first.join(5)
    second.join(5)
    assert trust.crl_number == 10 and 4242 in trust.revoked
    assert (tmp_path / "crl.pem").read_bytes() == newer


def test_a_memo_that_is_a_directory_is_moved_aside_once_or_said_once_per_run(
    tmp_path: Path, test_ca: pki.CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 51's review: a directory in the memo's place was warned of at every start
    (twice: passed over, then not written). It is moved aside (kept, said with where it went)
    and the memo written; the next check says nothing. One that cannot be moved is said once
    in a run, with the ``rm -r`` that ends it, and no write is tried."""
    cfg = _agent_config(tmp_path, test_ca)
    _enrolled(cfg, test_ca)
    memo = cfg.data_dir / certwork.MEMO
    memo.unlink(missing_ok=True)
    memo.mkdir()
    (memo / "left").write_text("an admin's")
    monkeypatch.setattr(certwork, "_MEMOS_SAID", set())
    with structlog.testing.capture_logs() as logs:
        assert certwork.load_identity(cfg) is not None
        assert certwork.load_identity(cfg) is not None  # the next start: from the memo
    [said] = [e for e in logs if e["event"].startswith("identity.memo")]
    assert said["event"] == "identity.memo_not_a_file", logs
    kept = Path(said["kept_as"])
    assert kept.parent == cfg.data_dir and kept.name.startswith(f"{certwork.MEMO}.not-a-file-")
    assert (kept / "left").read_text() == "an admin's"
    assert json.loads(memo.read_bytes())["digest"]

    memo.unlink()
    memo.mkdir()

    def refused(path: Path, tag: str, stamp: str) -> Path:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(certwork, "set_aside", refused)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):  # a start, and the renewals' checks of the same run
            assert certwork.load_identity(cfg) is not None
    [said] = [e for e in logs if e["event"].startswith("identity.memo")]
    assert said["event"] == "identity.memo_not_a_file", logs
    assert f"run: rm -r {memo}" in said["detail"], said
    assert "Operation not permitted" in said["detail"] and "kept_as" not in said
    assert memo.is_dir()
    monkeypatch.setattr(certwork, "_MEMOS_SAID", set())  # another run: said again, once
    with structlog.testing.capture_logs() as logs:
        certwork.load_identity(cfg)
        certwork.load_identity(cfg)
    assert [e["event"] for e in logs if e["event"].startswith("identity.memo")] == [
        "identity.memo_not_a_file"
    ]


def test_a_set_aside_whose_fsync_fails_is_a_move_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fsutil.set_aside``: the rename made, a failing fsync of the directory after it is no
    failure to move the thing aside (review rev52c L4: the agent said "could not be moved
    aside, rm -r PATH" of a path already gone); the names taken are never written over."""

    def fails(_path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsutil, "fsync_dir", fails)
    memo = tmp_path / "identity.checked.json"
    memo.mkdir()
    (tmp_path / "identity.checked.json.not-a-file-T").mkdir()
    kept = fsutil.set_aside(memo, "not-a-file", "T")
    assert kept == tmp_path / "identity.checked.json.not-a-file-T.2"
    assert kept.is_dir() and not memo.exists()
