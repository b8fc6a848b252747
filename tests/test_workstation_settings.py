"""``workstation.settings_files``: the settings dir's files replaced as one set, on real files.

The whole run, with a fault at every change of the directory, is in test_workstation
(``test_a_re_enrolment_cut_short_anywhere_leaves_the_old_set_or_the_new``); these are the
cases a run of the product does not leave by itself.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tests.private_files import write_private
from tlsroll import pki
from tlsroll.fsutil import PRIVATE, PUBLIC, private_dir_problem, stage_atomic
from workstation import settings_files
from workstation.settings_files import KEPT, MARKER, REPLACED, REPLACED_NEW, STAGING, Finished


class Crash(BaseException):
    """A kill at this point: no handler of the product's catches it (``finally`` blocks run,
    as a kill closes the files and drops the locks)."""


@contextmanager
def watched_fifo(path: Path) -> Iterator[list[str]]:
    """A FIFO made at ``path``, watched while the block runs: whenever a reader has it open
    (its open waiting for a writer, as a plain read's does), a writer opens it without
    blocking and closes it again, which lets that reader go on (it reads an end of file).
    Yields a list that gets an entry each time that happened: empty if nothing opened it."""
    os.mkfifo(path)
    opened: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.01):
            try:
                if not stat.S_ISFIFO(os.lstat(path).st_mode):
                    continue  # (gone, or something else in its place now)
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader has it open; ENOENT: gone
                continue
            try:
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    opened.append(str(path))
            finally:
                os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield opened
    finally:
        stop.set()
        watcher.join()


@contextmanager
def fault_at(directory: Path, at: int, fault: str) -> Iterator[list[str]]:
    """Count every change under ``directory`` (a file created, an fsync, a rename, a removal,
    a directory made); the ``at``-th: ``"enospc"`` fails with ENOSPC and does nothing, ``"crash"``
    is done, then Crash, ``"kill"`` is done, then the process gets SIGKILL. Yields the changes
    seen so far (the real os calls, on real files)."""
    root = str(directory)
    seen: list[str] = []
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace
    real_rename, real_unlink, real_rmdir, real_mkdir = os.rename, os.unlink, os.rmdir, os.mkdir

    def ours(path: Any) -> bool:
        p = str(os.path.abspath(os.fspath(path)))
        return p == root or p.startswith(root + os.sep)

    def counted(what: str, do: Callable[[], Any]) -> Any:
        seen.append(what)
        if len(seen) == at and fault == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)
        result = do()
        if len(seen) == at:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise Crash(what)
        return result

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        if dir_fd is None and flags & os.O_CREAT and ours(path):
            return int(counted(f"create {path}", lambda: real_open(path, flags, mode)))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def fsync(fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        try:
            path = os.readlink(f"/proc/self/fd/{number}")
        except OSError:
            path = ""
        if path and ours(path):
            counted(f"fsync {path}", lambda: real_fsync(fd))
        else:
            real_fsync(fd)

    def two(real: Callable[..., None], name: str) -> Callable[..., None]:
        def move(src: Any, dst: Any, **kw: Any) -> None:
            if not kw and (ours(src) or ours(dst)):
                counted(f"{name} {src} {dst}", lambda: real(src, dst))
            else:
                real(src, dst, **kw)

        return move

    def one(real: Callable[..., None], name: str) -> Callable[..., None]:
        def change(path: Any, *args: Any, **kw: Any) -> None:
            made = name != "mkdir" or not os.path.lexists(path)  # EEXIST changes nothing
            if not kw and made and ours(path):
                counted(f"{name} {path}", lambda: real(path, *args))
            else:
                real(path, *args, **kw)

        return change

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", open_)
        patch.setattr(os, "fsync", fsync)
        patch.setattr(os, "replace", two(real_replace, "replace"))
        patch.setattr(os, "rename", two(real_rename, "rename"))
        patch.setattr(os, "unlink", one(real_unlink, "unlink"))
        patch.setattr(os, "rmdir", one(real_rmdir, "rmdir"))
        patch.setattr(os, "mkdir", one(real_mkdir, "mkdir"))
        yield seen


OLD = {"client.key": b"old key", "client.pem": b"old cert", "settings.json": b"{}"}
NEW = {"client.key": b"new key", "client.pem": b"new cert", "settings.json": b'{"new": 1}'}


def files(data: dict[str, bytes]) -> dict[str, tuple[bytes, int]]:
    return {
        name: (body, PRIVATE if name == "client.key" else PUBLIC) for name, body in data.items()
    }


def contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.fixture
def d(tmp_path: Path) -> Path:
    directory = tmp_path / "settings"
    directory.mkdir(mode=0o700)
    settings_files.replace(directory, files(OLD))
    return directory


def stage(d: Path, data: dict[str, bytes], marker: bytes | None) -> None:
    """What a run cut short leaves: the staging with ``data``, and ``marker`` if committed."""
    staging = d / STAGING
    staging.mkdir(mode=0o700)
    for name, body in data.items():
        put = write_private if name == "client.key" else Path.write_bytes
        put(staging / name, body)
    if marker is not None:
        (staging / MARKER).write_bytes(marker)


def test_replace_keeps_the_modes_and_leaves_only_the_set(d: Path) -> None:
    settings_files.replace(d, files(NEW))
    assert contents(d) == NEW
    assert stat.S_IMODE((d / "client.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "client.pem").stat().st_mode) == 0o644
    # A set without the client pair (--no-enrol) leaves the pair as it was.
    settings_files.replace(d, files({"settings.json": b"pinned"}))
    assert contents(d) == NEW | {"settings.json": b"pinned"}


def test_finish_with_nothing_left_writes_nothing(tmp_path: Path) -> None:
    assert settings_files.finish(tmp_path / "never made") is None
    assert not (tmp_path / "never made").exists()


def test_a_committed_staging_is_completed_and_an_uncommitted_one_discarded(d: Path) -> None:
    # Cut short after the key moved: the rest of the committed set follows it.
    marker = json.dumps({"files": ["client.key", "client.pem", "settings.json"]}).encode()
    stage(d, {"client.pem": NEW["client.pem"], "settings.json": NEW["settings.json"]}, marker)
    write_private(d / "client.key", NEW["client.key"])
    assert settings_files.finish(d) is Finished.FORWARD
    assert contents(d) == NEW

    stage(d, OLD, None)
    assert settings_files.finish(d) is Finished.BACK
    assert contents(d) == NEW


@pytest.mark.parametrize(
    "marker",
    [
        b'{"files": ["client.key", "../elsewhere"]}',
        b'{"files": ["client.key", ".."]}',
        b'{"files": ["client.key", 5]}',
        b"not json",
        b'["client.key"]',
    ],
)
def test_a_marker_not_of_ours_commits_nothing(d: Path, marker: bytes) -> None:
    stage(d, NEW, marker)
    assert settings_files.finish(d) is Finished.BACK
    assert contents(d) == OLD


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (the staging's too), by its path under ``d``."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_newer_tools_committed_run_is_left_for_it_to_finish(d: Path) -> None:
    """Upgrade audit s35 F9: a newer tlsroll, whose set has a file this version does not know,
    was cut short after its commit and after moving the key and the certificate into place.
    This version read the marker as "not committed" and discarded the rest of that set: the
    new key and certificate beside the old ca.pem and settings.json, the mix this module is
    there to prevent. Now it leaves the staging (and the directory) as it is and says so."""
    names = ["client.key", "client.pem", "ca.pem", "settings.json", "client.chain"]
    marker = json.dumps({"files": names}).encode()
    rest = {"ca.pem": b"new ca", "settings.json": NEW["settings.json"], "client.chain": b"chain"}
    stage(d, rest, marker)
    write_private(d / "client.key", NEW["client.key"])  # moved before the interruption
    (d / "client.pem").write_bytes(NEW["client.pem"])
    before = tree(d)
    with pytest.raises(settings_files.NewerStaging):
        settings_files.finish(d)
    assert tree(d) == before, "the newer run's staging was touched"
    with pytest.raises(settings_files.NewerStaging):  # nor does a new set replace it
        settings_files.replace(d, files(OLD))
    assert tree(d) == before


def test_a_staging_that_is_no_directory_is_removed_not_followed(d: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "client.key").write_bytes(b"keep")
    (d / STAGING).symlink_to(elsewhere)
    assert settings_files.finish(d) is None
    assert contents(d) == OLD and (elsewhere / "client.key").read_bytes() == b"keep"


def test_a_failed_write_leaves_the_old_set_and_no_staging(
    d: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = stage_atomic

    def full(path: Path, data: bytes, mode: int = PUBLIC, name: str = "") -> Path:
        if path.name == "ca.pem":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, mode, name)

    monkeypatch.setattr(settings_files, "stage_atomic", full)
    with pytest.raises(OSError, match="No space left"):
        settings_files.replace(d, files(NEW) | {"ca.pem": (b"ca", PUBLIC)})
    assert contents(d) == OLD


def test_a_failed_check_leaves_the_old_set_and_no_staging(d: Path) -> None:
    """Audit s39ws M5: the check runs on the new set staged (its files there, complete), and
    what it raises leaves the old set; a passing one lets the set be committed."""
    seen: list[dict[str, bytes]] = []

    def refuse(staging: Path) -> None:
        seen.append({p.name: p.read_bytes() for p in staging.iterdir()})
        raise ValueError("the request with the new set failed")

    with pytest.raises(ValueError, match="new set failed"):
        settings_files.replace(d, files(NEW), refuse)
    assert seen == [NEW] and contents(d) == OLD
    checked: list[Path] = []
    settings_files.replace(d, files(NEW), checked.append)
    assert checked == [d / STAGING] and contents(d) == NEW


def test_private_dir_problem_creates_nothing(tmp_path: Path) -> None:
    """Audit s39ws M1: what stops the settings dir, found before the password is asked for."""
    assert private_dir_problem(tmp_path / "a" / "b") is None
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_bytes(b"")
    assert private_dir_problem(tmp_path / "file" / "b") == f"{tmp_path / 'file'} is not a directory"
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o500)
    assert private_dir_problem(mine) is None  # ours: made 0700 when it is written
    if os.geteuid() == 0:
        os.chown(mine, 65534, 65534)
        assert "(uid 65534), not by" in str(private_dir_problem(mine))
    else:
        assert "is not writable" in str(private_dir_problem(mine / "sub"))


def test_the_steps_hold_the_directory_lock(d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run (another open of the directory) cannot take the lock while a set is staged:
    it would take the staging for an interrupted one."""
    real = stage_atomic
    tried: list[bool] = []

    def staged(path: Path, data: bytes, mode: int = PUBLIC, name: str = "") -> Path:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tried.append(False)
        else:
            tried.append(True)
        finally:
            os.close(fd)
        return real(path, data, mode, name)

    monkeypatch.setattr(settings_files, "stage_atomic", staged)
    settings_files.replace(d, files(NEW))
    assert tried and not any(tried)


def killed_run(d: Path, at: int) -> int:
    """``replace`` in a forked child killed (SIGKILL) right after its ``at``-th change; the
    child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no handler of ours past this point
        code = 1
        try:
            with fault_at(d, at, "kill"):
                settings_files.replace(d, files(NEW))
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def test_a_run_killed_after_any_change_leaves_the_old_set_or_the_new(d: Path) -> None:
    """A real kill (SIGKILL: no handler, no ``finally``) right after the 1st, 2nd, ... change a
    replacement makes, until one gets through: ``finish`` then leaves the old set or the new,
    whole, and no staging; before the commit the old, after it the new."""
    outcomes: list[bool] = []
    for at in range(1, 100):
        status = killed_run(d, at)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            break
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        settings_files.finish(d)
        now = contents(d)
        assert now in (OLD, NEW), (at, now)
        outcomes.append(now == NEW)
        settings_files.replace(d, files(OLD))
    assert contents(d) == NEW
    assert len(outcomes) > 15  # staged, committed, moved, cleaned
    # Killed before the commit: the old set; after it: the new one.
    first_new = outcomes.index(True)
    assert not any(outcomes[:first_new]) and all(outcomes[first_new:])


def client_pair(issued_days_ago: int) -> dict[str, bytes]:
    """A client key and a certificate of it issued ``issued_days_ago`` days ago."""
    key = pki.generate_key()
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ws-empfang")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=issued_days_ago))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return {"client.key": pki.key_to_pem(key), "client.pem": pki.cert_to_pem(cert)}


def put_in_place(d: Path, pair: dict[str, bytes]) -> None:
    for name, data in pair.items():
        put = write_private if name == "client.key" else Path.write_bytes
        put(d / name, data)


@pytest.mark.parametrize(
    ("in_place", "kept", "newest"),
    [
        (client_pair(1), client_pair(2), "in place"),  # a kept pair left over: the older
        (client_pair(2), client_pair(1), "kept"),  # a failed check's new pair: the newer
        ({"client.key": b"key", "client.pem": b"not a certificate"}, client_pair(2), "kept"),
        (client_pair(2), {"client.key": b"key", "client.pem": b"not a certificate"}, "in place"),
    ],
    ids=["in place newer", "kept newer", "in place unreadable", "kept unreadable"],
)
def test_set_aside_keeps_the_newer_pair(
    d: Path, in_place: dict[str, bytes], kept: dict[str, bytes], newest: str
) -> None:
    """Audit s40ws L1: with a pair kept aside already, the pair in place was deleted whatever
    their ages (the docstring: "unless it holds a newer pair"). The newer is kept (a
    certificate that cannot be read is the older); the client files are out of place."""
    settings_files.keep(d, kept["client.key"], kept["client.pem"])
    put_in_place(d, in_place)
    done = settings_files.set_aside(d)
    assert done == settings_files.SetAside(d / KEPT, newest == "in place", None)
    assert settings_files.kept_pair(d) == (
        (in_place if newest == "in place" else kept)["client.key"],
        (in_place if newest == "in place" else kept)["client.pem"],
    )
    assert not (d / "client.key").exists() and not (d / "client.pem").exists()
    assert stat.S_IMODE((d / KEPT / "client.key").stat().st_mode) == 0o600


def test_a_kept_dir_that_was_there_is_made_private(d: Path) -> None:
    """The kept dir holds a key: one made before (by hand, another umask) is made 0700."""
    (d / KEPT).mkdir(mode=0o755)
    os.chmod(d / KEPT, 0o755)  # noqa: S103 (what the test is about)
    pair = client_pair(1)
    settings_files.keep(d, pair["client.key"], pair["client.pem"])
    assert stat.S_IMODE((d / KEPT).stat().st_mode) == 0o700
    assert stat.S_IMODE((d / KEPT / "client.key").stat().st_mode) == 0o600
    # Every kept file is 0600 (the certificate was 0644 here, where set_aside wrote 0600).
    assert stat.S_IMODE((d / KEPT / "client.pem").stat().st_mode) == 0o600


def test_a_kept_link_is_not_followed(d: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    os.symlink(elsewhere, d / KEPT)
    pair = client_pair(1)
    with pytest.raises(NotADirectoryError):
        settings_files.keep(d, pair["client.key"], pair["client.pem"])
    assert os.listdir(elsewhere) == [] and stat.S_IMODE(elsewhere.stat().st_mode) == 0o755


def test_the_set_replaced_is_kept_when_its_pair_is_worth_it_one_at_most(d: Path) -> None:
    """s43rev3 Low 4: a new set overwrote a client key that may still be valid (another
    name's, another CA's). ``keep_replaced`` is asked about the pair in place once the check
    passed; if it says so, the whole set in place is copied to REPLACED (the key 0600) before
    the new one is committed: one set at most, a later one takes its place whole."""
    asked: list[tuple[bytes, bytes]] = []

    def no(key: bytes, cert: bytes) -> bool:
        asked.append((key, cert))
        return False

    def yes(key: bytes, cert: bytes) -> bool:
        return True

    def refuse(staging: Path) -> None:
        raise OSError(errno.EIO, "the check failed")

    assert settings_files.replace(d, files(NEW), keep_replaced=no) is None
    assert asked == [(OLD["client.key"], OLD["client.pem"])]
    assert not (d / REPLACED).exists()
    with_ca = OLD | {"ca.pem": b"ca"}
    assert settings_files.replace(d, files(with_ca), keep_replaced=yes) == d / REPLACED
    assert contents(d / REPLACED) == NEW
    assert {n: (d / n).read_bytes() for n in with_ca} == with_ca
    assert stat.S_IMODE((d / REPLACED).stat().st_mode) == 0o700
    for name in NEW:  # every file of the set kept, 0600 (the certificate was 0644)
        assert stat.S_IMODE((d / REPLACED / name).stat().st_mode) == 0o600, name
    # a failed check copies nothing; a set without a client key asks nothing
    with pytest.raises(OSError):
        settings_files.replace(d, files(NEW), refuse, keep_replaced=yes)
    assert contents(d / REPLACED) == NEW
    settings_files.replace(d, files({"settings.json": b"pinned"}), keep_replaced=no)
    assert len(asked) == 1
    # the next one takes its place whole
    settings_files.replace(d, files(NEW), keep_replaced=yes)
    assert contents(d / REPLACED) == with_ca | {"settings.json": b"pinned"}
    os.unlink(d / "ca.pem")
    settings_files.replace(d, files(OLD), keep_replaced=yes)
    assert contents(d / REPLACED) == NEW  # no ca.pem left of the one before


EARLIER = {"client.key": b"earlier key", "client.pem": b"earlier cert", "settings.json": b"{}"}


def in_place(d: Path) -> dict[str, bytes]:
    """The set's files in ``d`` (what is beside them, kept sets, left out)."""
    return {n: (d / n).read_bytes() for n in settings_files.NAMES if (d / n).exists()}


def with_an_earlier_kept_set(d: Path) -> None:
    """REPLACED holds EARLIER's set (an enrolment before replaced it), OLD is in place."""
    settings_files.replace(d, files(EARLIER))
    settings_files.replace(d, files(OLD), keep_replaced=lambda key, cert: True)
    assert contents(d / REPLACED) == EARLIER and in_place(d) == OLD


def test_a_commit_that_fails_keeps_the_earlier_kept_set(d: Path) -> None:
    """s44rev1 L3: the set in place was copied over REPLACED before the commit; a commit
    that then failed (a full disk at any later step) lost the earlier kept set while nothing
    was replaced. At every step that fails before the commit, the set in place and REPLACED
    are as they were; once committed, REPLACED holds the set it replaced."""
    with_an_earlier_kept_set(d)
    failed = 0
    for at in range(1, 100):
        try:
            with fault_at(d, at, "enospc"):
                settings_files.replace(d, files(NEW), keep_replaced=lambda key, cert: True)
        except Exception:  # OSError, or the copy's ReplacedNotKept
            failed += 1
            settings_files.finish(d)
            assert (in_place(d), contents(d / REPLACED)) in [(OLD, EARLIER), (NEW, OLD)], at
            if in_place(d) == NEW:  # failed after the commit: completed by ``finish``
                settings_files.replace(d, files(OLD))
                with_an_earlier_kept_set(d)
            continue
        break
    assert failed > 10 and in_place(d) == NEW and contents(d / REPLACED) == OLD


def test_a_run_killed_anywhere_keeps_the_earlier_kept_set_or_the_new_one(d: Path) -> None:
    """s44rev1 L3, a real kill (SIGKILL) after each change: before the commit the set in
    place and the earlier kept set as they were, after it the new set and the one it
    replaced kept (``finish`` completes it)."""
    with_an_earlier_kept_set(d)
    outcomes: list[bool] = []
    for at in range(1, 200):
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no handler of ours past this point
            code = 1
            try:
                with fault_at(d, at, "kill"):
                    settings_files.replace(d, files(NEW), keep_replaced=lambda key, cert: True)
                code = 0
            finally:
                os._exit(code)
        status = os.waitpid(pid, 0)[1]
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            break
        settings_files.finish(d)
        now = (in_place(d), contents(d / REPLACED))
        assert now in [(OLD, EARLIER), (NEW, OLD)], (at, now)
        outcomes.append(now[0] == NEW)
        if now[0] == NEW:
            settings_files.replace(d, files(OLD))
            with_an_earlier_kept_set(d)
    assert in_place(d) == NEW and contents(d / REPLACED) == OLD
    first_new = outcomes.index(True)
    assert first_new > 5 and not any(outcomes[:first_new]) and all(outcomes[first_new:])


def older_finish(d: Path) -> None:
    """What tlsroll 0.1.0's ``finish`` does with an uncommitted staging: it removes each entry
    with ``os.unlink`` (a directory there: "Is a directory", every run), then the staging. A
    committed one listing REPLACED it leaves to this version (NewerStaging): not done here."""
    staging = d / STAGING
    for name in os.listdir(staging):
        os.unlink(staging / name)
    os.rmdir(staging)


def test_an_older_tlsroll_finishes_a_run_killed_before_the_commit(d: Path) -> None:
    """Review s44rev5 L1: the copy of the set in place was staged inside the staging
    (.settings-new/.settings-replaced); a run killed after the copy and before the commit left
    a staging an older tlsroll could not remove ("Is a directory": every run of it exit 1). The
    copy is staged beside it now: killed at every step before the commit, the older version's
    finish removes the staging, the set in place and the earlier kept set are as they were,
    and the next run of this version removes the copy left beside and replaces the set."""
    with_an_earlier_kept_set(d)
    uncommitted = 0
    for at in range(1, 200):
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no handler of ours past this point
            code = 1
            try:
                with fault_at(d, at, "kill"):
                    settings_files.replace(d, files(NEW), keep_replaced=lambda key, cert: True)
                code = 0
            finally:
                os._exit(code)
        status = os.waitpid(pid, 0)[1]
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            break
        if not os.path.lexists(d / STAGING) or (d / STAGING / MARKER).exists():
            settings_files.finish(d)  # committed (or not begun): this version's part
        else:
            uncommitted += 1
            older_finish(d)
            assert (in_place(d), contents(d / REPLACED)) == (OLD, EARLIER), at
        if in_place(d) == NEW:
            settings_files.replace(d, files(OLD))
        with_an_earlier_kept_set(d)
        assert not os.path.lexists(d / (REPLACED + ".new")), at
    assert uncommitted > 5
    assert in_place(d) == NEW and contents(d / REPLACED) == OLD
    assert not os.path.lexists(d / (REPLACED + ".new"))


def test_the_copy_of_the_set_in_place_is_durable_before_the_commit(d: Path) -> None:
    """Review s44rev5 L2: the marker takes a copy that is not there for moved already; the
    settings dir, which holds the copy (REPLACED + ".new"), is fsynced after the copy's last
    change and before the marker is made."""
    with fault_at(d, 10**6, "enospc") as seen:
        settings_files.replace(d, files(NEW), keep_replaced=lambda key, cert: True)
    copy = str(d / (REPLACED + ".new"))
    marker = next(
        i for i, what in enumerate(seen) if what.endswith(f" {d / STAGING / MARKER}")
    )  # the marker moved into its name: the commit
    last_copy = max(i for i, what in enumerate(seen[:marker]) if copy in what)
    assert f"fsync {d}" in seen[last_copy + 1 : marker], seen


@pytest.mark.parametrize("what", ["file", "link to a directory", "dangling link"])
def test_what_is_in_the_way_of_the_kept_set_is_removed_not_followed(
    what: str, d: Path, tmp_path: Path
) -> None:
    """s44rev1 L2: a file or a link at REPLACED failed every replacement that kept a set
    (ENOTDIR), and the next run the same. It is removed (a link itself, never followed)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (elsewhere / "client.key").write_bytes(b"not ours")
    if what == "file":
        (d / REPLACED).write_bytes(b"a file")
    else:
        os.symlink(elsewhere if what == "link to a directory" else tmp_path / "none", d / REPLACED)
    assert settings_files.replace(d, files(NEW), keep_replaced=lambda k, c: True) == d / REPLACED
    assert in_place(d) == NEW and contents(d / REPLACED) == OLD
    assert stat.S_ISDIR(os.lstat(d / REPLACED).st_mode)
    assert contents(elsewhere) == {"client.key": b"not ours"}
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755


def test_a_pair_that_cannot_be_read_is_not_replaced_unsaid(d: Path) -> None:
    """s44rev1 L2: a client key that cannot be read (here a directory at its name) could be
    worth keeping: nothing is replaced, and the error names the file."""
    os.unlink(d / "client.key")
    os.mkdir(d / "client.key")
    with pytest.raises(settings_files.ReplacedNotKept) as caught:
        settings_files.replace(d, files(NEW), keep_replaced=lambda k, c: True)
    assert caught.value.reading and caught.value.path == d / "client.key"
    assert (d / "client.pem").read_bytes() == OLD["client.pem"]
    assert not os.path.lexists(d / STAGING) and not os.path.lexists(d / REPLACED)


def client_set(days_left: int) -> dict[str, bytes]:
    """A set whose client certificate ends ``days_left`` days from now (past if negative)."""
    key = pki.generate_key()
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ws-other")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=60))
        .not_valid_after(now + dt.timedelta(days=days_left))
        .sign(key, hashes.SHA256())
    )
    return {"client.key": pki.key_to_pem(key), "client.pem": pki.cert_to_pem(cert)}


@pytest.mark.parametrize("kept", ["expired", "valid", "unreadable"])
def test_a_kept_set_whose_certificate_expired_goes_at_the_next_write(kept: str, d: Path) -> None:
    """s44rev1 L4: REPLACED was kept for ever. A later write removes it once its
    certificate has expired; a valid one, or one that cannot be read, stays."""
    pair = (
        client_set(-1)
        if kept == "expired"
        else client_set(30)
        if kept == "valid"
        else {"client.key": b"key", "client.pem": b"not a certificate"}
    )
    settings_files.replace(d, files(pair))
    settings_files.replace(d, files(OLD), keep_replaced=lambda k, c: True)
    assert (d / REPLACED / "client.pem").read_bytes() == pair["client.pem"]
    settings_files.replace(d, files({"settings.json": b"pinned"}))
    assert os.path.lexists(d / REPLACED) == (kept != "expired")


# s45rev1: ``set_aside`` (a run without an enrolment, ``--no-enrol``) and the set kept in
# REPLACED. The pairs are real keys and certificates: X in place, Y the newer, W kept in
# REPLACED before; ``worth`` stands for the workstation's (a pair that holds together and is
# in ``valid``: of another name or CA, not superseded).


def pair_of(data: dict[str, bytes]) -> tuple[bytes, bytes]:
    return data["client.key"], data["client.pem"]


def worth_of(*valid: dict[str, bytes]) -> Callable[[bytes, bytes, bytes], bool]:
    certs = {p["client.pem"] for p in valid}

    def worth(key_pem: bytes, cert_pem: bytes, newer_pem: bytes) -> bool:
        try:
            cert = pki.load_cert_pem(cert_pem)
            return cert_pem in certs and pki.key_matches(cert, pki.load_key_pem(key_pem))
        except ValueError:
            return False

    return worth


def pairs_at(d: Path) -> dict[str, tuple[bytes, bytes] | None]:
    """The whole pair in place, in KEPT and in REPLACED (None where there is none)."""
    found: dict[str, tuple[bytes, bytes] | None] = {}
    for where, path in (("in place", d), ("kept", d / KEPT), ("replaced", d / REPLACED)):
        try:
            found[where] = ((path / "client.key").read_bytes(), (path / "client.pem").read_bytes())
        except OSError:
            found[where] = None
    return found


def old_set(pair: dict[str, bytes], ca: bytes = b"the other CA") -> dict[str, bytes]:
    """``pair`` with the ca.pem and a settings.json naming it, as an enrolment writes them."""
    cert = x509.load_pem_x509_certificate(pair["client.pem"])
    settings = {
        "ca_file": "ca.pem",
        "client_cert_file": "client.pem",
        "client_key_file": "client.key",
        "client_fingerprint": pki.fingerprint(cert),
    }
    return pair | {"ca.pem": ca, "settings.json": json.dumps(settings).encode()}


# What a run without an enrolment writes: no client certificate named.
PINNED = {"ca.pem": b"pinned CA", "settings.json": b'{"client_cert_file": null}'}


def no_enrol(d: Path, worth: Callable[[bytes, bytes, bytes], bool]) -> Any:
    """A whole ``--no-enrol`` run's steps: the set read, the new settings written, then
    ``set_aside`` with the set read before (as ``connection`` does)."""
    before = settings_files.read_set(d)
    settings_files.replace(d, files(PINNED))
    return settings_files.set_aside(d, worth, before)


def put_replaced(d: Path, pair: dict[str, bytes]) -> None:
    (d / REPLACED).mkdir(mode=0o700)
    for name, data in pair.items():
        put = write_private if name == "client.key" else Path.write_bytes
        put(d / REPLACED / name, data)


@pytest.mark.parametrize("in_place_newer", [False, True], ids=["kept newer", "in place newer"])
def test_set_aside_never_takes_the_place_of_a_kept_set_that_may_still_be_valid(
    d: Path, in_place_newer: bool
) -> None:
    """Review s45rev1 M1: W kept in REPLACED (an enrolment replaced it), X in place, Y newer
    in KEPT: ``set_aside`` put X in REPLACED's place, W lost unsaid. With W possibly valid,
    nothing is changed now and ``held`` says why; with W not worth keeping (expired,
    superseded), X takes its place as before."""
    w, x, y = client_pair(5), client_pair(3), client_pair(1)
    older, newer = x, y
    put_replaced(d, w)
    settings_files.keep(d, *pair_of(older if in_place_newer else newer))
    put_in_place(d, newer if in_place_newer else older)
    before = pairs_at(d)
    done = settings_files.set_aside(d, worth_of(w, x, y))
    assert pairs_at(d) == before
    older_at = d / KEPT if in_place_newer else d  # (s45rev7 L3: where the older pair is)
    assert done == settings_files.SetAside(
        d / KEPT, False, None, older["client.pem"], w["client.pem"], older_at
    )
    # W no longer worth keeping: the older pair takes its place.
    done = settings_files.set_aside(d, worth_of(x, y))
    assert done == settings_files.SetAside(
        d / KEPT, in_place_newer, d / REPLACED, older["client.pem"]
    )
    assert pairs_at(d) == {"in place": None, "kept": pair_of(newer), "replaced": pair_of(older)}


def test_set_aside_of_a_pair_kept_already_only_takes_it_out_of_place(d: Path) -> None:
    """Review s45rev1 M2: the pair in place the very pair KEPT holds (an enrolment cut after
    its commit, an unfinished one, a set_aside cut short) was compared with itself: another
    CA's counted as worth keeping, and its copy took the place of the set in REPLACED. It
    is one pair: the files in place go, KEPT and REPLACED stay as they are."""
    w, p = client_pair(5), client_pair(1)
    put_replaced(d, w)
    settings_files.keep(d, *pair_of(p))
    put_in_place(d, p)
    done = settings_files.set_aside(d, worth_of(w, p))
    assert pairs_at(d) == {"in place": None, "kept": pair_of(p), "replaced": pair_of(w)}
    assert done == settings_files.SetAside(d / KEPT, True, None)


def test_the_pair_set_aside_in_replaced_keeps_the_set_it_worked_with(d: Path) -> None:
    """Review s45rev1 L3: REPLACED got only client.key and client.pem from ``set_aside``, not
    the ca.pem and settings.json they worked with (the settings without a client certificate
    had overwritten them). The set as it was before (``before``, read by the caller) goes
    with the pair in place, if it is that pair's."""
    x, y = client_pair(3), client_pair(1)
    old = old_set(x)
    settings_files.replace(d, files(old))
    settings_files.keep(d, *pair_of(y))
    settings_files.replace(d, files({"ca.pem": b"pinned CA", "settings.json": b"{}"}))
    done = settings_files.set_aside(d, worth_of(x), before=old)
    assert done is not None and done.replaced == d / REPLACED
    assert contents(d / REPLACED) == old
    for name in old:  # (s45rev7 L1: copies 0600)
        assert stat.S_IMODE((d / REPLACED / name).stat().st_mode) == 0o600, name
    # A set read before that is not the pair's (another run's in between) does not go.
    os.rename(d / REPLACED, d.parent / "moved-out")
    settings_files.keep(d, *pair_of(y))
    put_in_place(d, x)
    settings_files.set_aside(d, worth_of(x), before=client_pair(2) | {"ca.pem": b"no"})
    assert contents(d / REPLACED) == x


def test_the_set_kept_with_the_pair_is_never_the_new_settings(d: Path) -> None:
    """Review s45rev7 M1: the ca.pem and settings.json that went with the pair in place to
    REPLACED were the set read before the run, if it held that pair; once a run had written
    the new settings (one held, or cut short), the next found the new ones beside the pair
    and kept them as its set. (a) The held flow: W kept in REPLACED, X in place, Y kept; the
    first run is held, the admin moves REPLACED out, the second keeps X without the new
    settings (X's own were overwritten by the first). (b) A settings.json not naming the
    pair (another fingerprint, or none) is not its set either."""
    w, x, y = client_pair(5), client_pair(3), client_pair(1)
    settings_files.replace(d, files(old_set(x)))
    settings_files.keep(d, *pair_of(y))
    put_replaced(d, w)
    done = no_enrol(d, worth_of(w, x, y))
    assert done is not None and done.held == w["client.pem"] and done.older_at == d
    os.rename(d / REPLACED, d.parent / "moved-out")
    done = no_enrol(d, worth_of(w, x, y))
    assert done is not None and done.replaced == d / REPLACED
    assert contents(d / REPLACED) == x
    # (b) A settings.json naming another certificate, or none by its fingerprint.
    other = json.loads(old_set(client_pair(2))["settings.json"])
    for settings in (other, {k: v for k, v in other.items() if k != "client_fingerprint"}):
        shutil.rmtree(d / REPLACED)
        before = x | {"ca.pem": b"some CA", "settings.json": json.dumps(settings).encode()}
        settings_files.replace(d, files(before))
        settings_files.keep(d, *pair_of(y))
        settings_files.replace(d, files(PINNED))
        settings_files.set_aside(d, worth_of(x, y), before)
        assert contents(d / REPLACED) == x, settings
    # The fingerprint as some other tool records it (upper case, colons): it names X.
    shutil.rmtree(d / REPLACED)
    named = json.loads(old_set(x)["settings.json"])
    hexed = named["client_fingerprint"].removeprefix("sha256:").upper()
    named["client_fingerprint"] = ":".join(hexed[i : i + 2] for i in range(0, len(hexed), 2))
    before = x | {"ca.pem": b"X's CA", "settings.json": json.dumps(named).encode()}
    settings_files.replace(d, files(before))
    settings_files.keep(d, *pair_of(y))
    settings_files.replace(d, files(PINNED))
    settings_files.set_aside(d, worth_of(x, y), before)
    assert contents(d / REPLACED) == before


def test_a_link_in_place_is_no_pair_and_not_followed(d: Path, tmp_path: Path) -> None:
    """Review s45rev7 L1: ``set_aside`` read the pair in place following links: client.pem a
    link to a 0600 file outside the settings dir was copied into KEPT at 0644. A link is no
    pair: it is removed, never read; KEPT holds no copy of it. s47ws: the key beside it (a
    regular file) was removed with it, its only copy: it goes to REPLACED alone (0600).
    ``kept_pair`` does not follow a link in KEPT either; the copies ``set_aside`` writes are
    0600."""
    secret = tmp_path / "outside"
    secret.write_bytes(b"SECRET OUTSIDE THE SETTINGS DIR\n")
    secret.chmod(0o600)
    x = client_pair(3)
    write_private(d / "client.key", x["client.key"])
    os.unlink(d / "client.pem")
    os.symlink(secret, d / "client.pem")
    assert settings_files.set_aside(d, worth_of(x)) == settings_files.SetAside(
        d / KEPT, False, d / REPLACED, lone=True
    )
    assert not os.path.lexists(d / "client.pem") and not os.path.lexists(d / "client.key")
    assert not os.path.lexists(d / KEPT)
    assert contents(d / REPLACED) == {"client.key": x["client.key"]}
    assert stat.S_IMODE((d / REPLACED / "client.key").stat().st_mode) == 0o600
    assert secret.read_bytes() == b"SECRET OUTSIDE THE SETTINGS DIR\n"
    shutil.rmtree(d / REPLACED)
    # A link in KEPT is no kept pair.
    y = client_pair(1)
    settings_files.keep(d, *pair_of(y))
    os.unlink(d / KEPT / "client.pem")
    os.symlink(secret, d / KEPT / "client.pem")
    assert settings_files.kept_pair(d) is None
    # A pair in place, set aside: its copies 0600.
    put_in_place(d, x)
    done = settings_files.set_aside(d)
    assert done is not None and done.moved
    assert settings_files.kept_pair(d) == pair_of(x)
    for name in settings_files.CLIENT:
        assert stat.S_IMODE((d / KEPT / name).stat().st_mode) == 0o600, name


def test_a_settings_dir_that_is_a_link_keeps_its_pair(d: Path, tmp_path: Path) -> None:
    """The settings dir itself may be a link (a --settings-dir the admin linked elsewhere):
    its pair is the PC's, set aside into KEPT as from a plain dir. Only the client files and
    KEPT are not followed (s45rev7 L1); a first version also refused to follow the dir itself
    and removed the pair in place unkept."""
    x = client_pair(3)
    put_in_place(d, x)
    link = tmp_path / "settings-link"
    os.symlink(d, link)
    done = settings_files.set_aside(link)
    assert done is not None and done.moved, done
    assert settings_files.kept_pair(d) == pair_of(x)
    assert not os.path.lexists(d / "client.pem") and not os.path.lexists(d / "client.key")


@pytest.mark.parametrize("name", ["ca.pem", "settings.json", "client.pem"])
def test_a_fifo_in_the_set_is_not_waited_on(d: Path, name: str) -> None:
    """Review s45rev7 L2: a FIFO planted as ca.pem or settings.json hung ``--no-enrol`` for
    ever in ``read_set`` (the open waits for a writer). It is not a file of the set: not read,
    not waited on. (An alarm bounds the test: a hang fails it instead of the run.)"""
    x, y = client_pair(3), client_pair(1)
    settings_files.replace(d, files(old_set(x)))
    settings_files.keep(d, *pair_of(y))
    named = {"settings.json": old_set(x)["settings.json"]}
    os.unlink(d / name)
    os.mkfifo(d / name)

    def hung(signum: int, frame: Any) -> None:  # (not an OSError: read_set suppresses those)
        pytest.fail("waited on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        found = settings_files.read_set(d)
        settings_files.replace(d, files(PINNED))
        done = settings_files.set_aside(d, worth_of(x, y), found)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert name not in found
    assert done is not None
    if name == "client.pem":  # no pair in place: the FIFO removed, the key kept (s47ws)
        assert not os.path.lexists(d / name) and settings_files.kept_pair(d) == pair_of(y)
        assert contents(d / REPLACED) == {"client.key": x["client.key"]}
        assert not os.path.lexists(d / "client.key")
    else:  # X's set as it was read: without the FIFO
        assert contents(d / REPLACED) == x | ({} if name == "settings.json" else named)


def test_a_file_larger_than_any_settings_file_is_not_read(d: Path) -> None:
    """The size cap of the reads (s45rev7 L2): a settings.json larger than ``MAX_FILE`` is
    not read whole into memory; it is left out of the set read."""
    with open(d / "settings.json", "wb") as f:
        f.truncate(settings_files.MAX_FILE + 1)
    assert "settings.json" not in settings_files.read_set(d)


SCENARIOS = {
    # name: (in place, kept, replaced, worth keeping, what is left at the end)
    "kept newer": ("X", "Y", "Z", "XY", {"in place": None, "kept": "Y", "replaced": "X"}),
    "in place newer": ("Y", "X", None, "XY", {"in place": None, "kept": "Y", "replaced": "X"}),
    "kept already": ("X", "X", "W", "WX", {"in place": None, "kept": "X", "replaced": "W"}),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_set_aside_killed_at_every_step_loses_no_pair_that_may_be_valid(
    tmp_path: Path, scenario: str
) -> None:
    """Review s45rev1 L5 (M2 was found so: the older pair lost at 12 steps of 47): a real kill
    (SIGKILL) right after each change ``set_aside`` makes, then ``set_aside`` again. After
    the kill every pair worth keeping is whole somewhere (in place, KEPT or REPLACED), and
    the next run ends as one never cut short does. W and Z: kept in REPLACED before (W may
    still be valid, Z not); X issued before Y. Review s45rev7 M1: each run is a whole
    ``--no-enrol`` run (the set read, the new settings written, ``set_aside`` given the set
    read); the set in place before is the placed pair's (its ca.pem and a settings.json
    naming it). REPLACED holds that set, or the pair alone (its own ca.pem and settings.json
    were overwritten before the kill), never the new settings; one that held it after the
    kill still does."""
    made = {"W": client_pair(7), "Z": client_pair(5), "X": client_pair(3), "Y": client_pair(1)}
    placed, kept, replaced, valid, end = SCENARIOS[scenario]
    worth = worth_of(*(made[n] for n in valid))
    named = {pair_of(p): n for n, p in made.items()}

    placed_set = old_set(made[placed], ca=b"the placed pair's CA")

    def setup(d: Path) -> dict[str, bytes]:
        """The set in place, and the set read before the run (as it reads it)."""
        d.mkdir(mode=0o700)
        settings_files.replace(d, files(placed_set))
        if replaced is not None:
            put_replaced(d, made[replaced])
        settings_files.keep(d, *pair_of(made[kept]))
        before = settings_files.read_set(d)
        settings_files.replace(d, files(PINNED))
        return before

    def state(d: Path) -> dict[str, str | None]:
        return {k: None if v is None else named.get(v, "?") for k, v in pairs_at(d).items()}

    def replaced_set(d: Path) -> dict[str, bytes]:
        return contents(d / REPLACED) if (d / REPLACED).is_dir() else {}

    # REPLACED at the end: X with its set (it was in place) or X alone (it was kept), or W.
    whole = {"kept newer": placed_set, "in place newer": made["X"], "kept already": made["W"]}

    dry = tmp_path / "dry"  # the steps of a run never cut short
    before = setup(dry)
    with fault_at(dry, 10**6, "kill") as steps:
        settings_files.set_aside(dry, worth, before)
    assert state(dry) == end
    assert replaced_set(dry) == whole[scenario]
    killed = 0
    for at in range(1, len(steps) + 1):  # (a step that fails, a removal of nothing, kills not)
        d = tmp_path / f"run-{at}"
        before = setup(d)
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no handler of ours past this point
            code = 1
            try:
                with fault_at(d, at, "kill"):
                    settings_files.set_aside(d, worth, before)
                code = 0
            finally:
                os._exit(code)
        status = os.waitpid(pid, 0)[1]
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            assert state(d) == end, at
            assert replaced_set(d) == whole[scenario], at
            continue
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        killed += 1
        now, set_then = state(d), replaced_set(d)
        assert all(n in now.values() for n in valid + placed + kept), (at, now)
        no_enrol(d, worth)  # the next run, whole
        assert state(d) == end, (at, now, state(d))
        after = replaced_set(d)
        assert after in (whole[scenario], made[end["replaced"] or "X"]), (at, sorted(after))
        assert after.get("ca.pem") != PINNED["ca.pem"], at
        if set_then == whole[scenario]:  # kept whole before the kill: still whole
            assert after == set_then, (at, sorted(after))
        assert not os.path.lexists(d / (REPLACED + ".new")), at
    assert killed >= len(steps) - 2 and killed > (1 if scenario == "kept already" else 10)


def test_a_key_kept_alone_in_replaced_is_not_lost_to_a_later_pair(d: Path) -> None:
    """s47ws: a key kept alone in REPLACED (its client.pem a link, a FIFO or none when it was
    kept) may be the only copy of a valid pair's key, which cannot be told: it holds
    REPLACED as a set that may still be valid does (``held`` empty: it cannot be read as a
    pair). Before, a REPLACED without a client.pem counted as nothing to lose: X took its
    place. A REPLACED cut short in its removal holds no key alone (the key goes first)."""
    k, x, y = client_pair(5), client_pair(3), client_pair(1)
    (d / REPLACED).mkdir(mode=0o700)
    write_private(d / REPLACED / "client.key", k["client.key"])
    settings_files.keep(d, *pair_of(y))
    put_in_place(d, x)
    before = pairs_at(d)
    done = settings_files.set_aside(d, worth_of(x, y))
    assert done == settings_files.SetAside(d / KEPT, False, None, x["client.pem"], b"", d)
    assert pairs_at(d) == before
    assert contents(d / REPLACED) == {"client.key": k["client.key"]}


@pytest.mark.parametrize("path", ["set_aside", "replace"])
def test_a_key_alone_whose_pair_replaced_holds_leaves_that_pair_whole(d: Path, path: str) -> None:
    """Review s46rev2 L1 (the reverted s46ws attempt; the code before it removed or
    overwrote the key, which did no harm here): W kept whole in REPLACED, its key in place
    again without client.pem. Keeping that key alone put it in place of W's whole set: W's
    certificate, its only copy, was lost. REPLACED holds that key already: it is left as
    it is."""
    w = client_pair(3)
    put_replaced(d, old_set(w))
    kept_before = contents(d / REPLACED)
    write_private(d / "client.key", w["client.key"])
    os.unlink(d / "client.pem")
    if path == "set_aside":
        settings_files.set_aside(d, worth_of(w))
    else:
        settings_files.replace(d, files(client_pair(1)), keep_replaced=lambda k, c: True)
    assert contents(d / REPLACED) == kept_before


@pytest.mark.parametrize("partner", ["a link", "a FIFO"])
@pytest.mark.parametrize("path", ["set_aside", "replace"])
def test_a_key_alone_killed_at_every_step_is_never_lost(
    tmp_path: Path, path: str, partner: str
) -> None:
    """Review s46rev2 L6: a real kill (SIGKILL) right after each change ``set_aside`` or an
    enrolment's ``replace`` makes over a key K alone in place (its client.pem a link or a
    FIFO; Z, not worth keeping, in REPLACED; Y in KEPT). After the kill K is in place, in
    REPLACED, or in a committed staging's copy (``REPLACED_NEW``); the next run ends with K
    in REPLACED, as one never cut short does (s47ws: K was removed, or overwritten). (With no
    client.pem at all K is not kept: ``test_a_key_whose_certificate_is_gone_is_not_kept``.)"""
    k, z, y, new = client_pair(5), client_pair(9), client_pair(1), client_pair(0)

    def worth(*_pair: bytes) -> bool:
        return False  # (Z is not worth keeping)

    def setup(d: Path) -> None:
        d.mkdir(mode=0o700)
        settings_files.replace(d, files(OLD))
        put_replaced(d, z)
        settings_files.keep(d, *pair_of(y))
        write_private(d / "client.key", k["client.key"])
        os.unlink(d / "client.pem")
        if partner == "a link":
            os.symlink(tmp_path / "outside", d / "client.pem")
        elif partner == "a FIFO":
            os.mkfifo(d / "client.pem")

    def run(d: Path) -> None:
        if path == "set_aside":
            settings_files.set_aside(d, worth)
        else:
            settings_files.replace(d, files(new), keep_replaced=worth)

    def where_k(d: Path) -> list[str]:
        found = []
        for name in ("in place", REPLACED, REPLACED_NEW):
            with suppress(OSError):
                where = d if name == "in place" else d / name
                if settings_files._read_nofollow(where / "client.key") == k["client.key"]:
                    found.append(name)
        return found

    (tmp_path / "outside").write_bytes(b"praxis-pc-7\n")  # (what /etc/hostname holds)
    dry = tmp_path / "dry"
    setup(dry)
    if partner == "a FIFO":  # (the code before waited on it for ever: let go, and seen)
        os.unlink(dry / "client.pem")
    fifo: AbstractContextManager[list[str]] = (
        watched_fifo(dry / "client.pem") if partner == "a FIFO" else nullcontext([])
    )
    with fifo as opened, fault_at(dry, 10**6, "kill") as steps:
        run(dry)
    assert opened == [], "it opened the FIFO"
    assert where_k(dry) == [REPLACED]
    killed = 0
    for at in range(1, len(steps) + 1):
        d = tmp_path / f"run-{at}"
        setup(d)
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no handler of ours past this point
            code = 1
            try:
                with fault_at(d, at, "kill"):
                    run(d)
                code = 0
            finally:
                os._exit(code)
        status = os.waitpid(pid, 0)[1]
        killed += os.WIFSIGNALED(status)
        now = where_k(d)
        committed = os.path.lexists(d / STAGING / MARKER)
        assert [w for w in now if w != REPLACED_NEW] or (committed and REPLACED_NEW in now), at
        settings_files.finish(d)  # the next run: a --no-enrol run sets aside again, and an
        if path == "set_aside" or "in place" in where_k(d):  # enrolment not committed enrols
            run(d)
        assert where_k(d) == [REPLACED], (at, now, where_k(d))
    assert killed >= len(steps) - 2


@pytest.mark.parametrize("path", ["set_aside", "replace"])
def test_a_key_whose_certificate_is_gone_is_not_kept(d: Path, path: str) -> None:
    """Review s47rev3 M1: a client.key with no client.pem at all (deleted by hand) was kept
    alone in REPLACED, or, where that would lose the valid set there (W), held every
    enrolment (exit 1). Its certificate gone, it can neither be used nor prove the PC's name:
    it is not kept (``cert_gone``), an enrolment replaces it, ``set_aside`` removes it, and
    W stays."""
    w, k = client_pair(7), client_pair(5)
    put_replaced(d, w)
    kept_before = contents(d / REPLACED)
    write_private(d / "client.key", k["client.key"])
    os.unlink(d / "client.pem")
    if path == "set_aside":
        done = settings_files.set_aside(d, lambda *_pair: True)
        assert done == settings_files.SetAside(d / KEPT, False, None, lone=True)
        assert not os.path.lexists(d / "client.key")
    else:
        new = client_pair(0)
        assert settings_files.replace(d, files(new), keep_replaced=lambda k, c: True) is None
        assert (d / "client.key").read_bytes() == new["client.key"]
    assert contents(d / REPLACED) == kept_before


@pytest.mark.parametrize("path", ["set_aside", "replace"])
def test_a_client_pem_link_to_the_keys_certificate_keeps_the_certificate_alone(
    d: Path, tmp_path: Path, path: str
) -> None:
    """Review s47rev3 L1: a client.pem link to a certificate of the key beside it made the
    key go alone. The certificate goes with it, as a regular file of ours (0600), read through
    the link, and written out as the certificate alone: whatever else the file the link names
    holds (a secret appended) is never copied (s45rev7 L1); that file is not changed."""
    k = client_pair(5)
    outside = tmp_path / "outside.pem"
    outside.write_bytes(k["client.pem"] + b"SECRET OUTSIDE THE SETTINGS DIR\n")
    outside.chmod(0o600)
    write_private(d / "client.key", k["client.key"])
    os.unlink(d / "client.pem")
    os.symlink(outside, d / "client.pem")
    if path == "set_aside":
        settings_files.set_aside(d, lambda *_pair: True)
        kept = d / KEPT
    else:
        settings_files.replace(d, files(client_pair(0)), keep_replaced=lambda k, c: True)
        kept = d / REPLACED
    assert not os.path.islink(kept / "client.pem")
    assert (kept / "client.key").read_bytes() == k["client.key"]
    cert_pem = (kept / "client.pem").read_bytes()
    assert b"SECRET" not in cert_pem
    assert x509.load_pem_x509_certificate(cert_pem) == x509.load_pem_x509_certificate(
        k["client.pem"]
    )
    assert stat.S_IMODE((kept / "client.pem").stat().st_mode) == 0o600
    assert outside.read_bytes() == k["client.pem"] + b"SECRET OUTSIDE THE SETTINGS DIR\n"


def _damaged_point(pem: bytes) -> bytes:
    """``pem`` with a byte of its public key's point changed: the certificate still loads,
    its public key no longer does (not on the curve)."""
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem)
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    point = cert.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    der[bytes(der).index(point) + 40] ^= 0x01
    return x509.load_der_x509_certificate(bytes(der)).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("way", ["enrolment", "no-enrol"])
def test_a_client_pem_link_to_a_certificate_whose_key_cannot_be_loaded_is_no_crash(
    tmp_path: Path, way: str
) -> None:
    """Review s47rev4 M1: a client.key beside a client.pem link to a certificate whose public
    key cannot be loaded (a damaged byte, an unknown curve) ended every run in a traceback:
    the comparison with the key was outside the ``try``. Such a link names no certificate of
    the key: the key is kept alone, as beside any other link."""
    pair, new = client_pair(3), client_pair(0)
    settings = tmp_path / "settings"
    settings.mkdir(mode=0o700)
    settings_files.replace(settings, files(OLD))
    write_private(settings / "client.key", pair["client.key"])
    os.unlink(settings / "client.pem")
    linked = tmp_path / "linked.pem"
    linked.write_bytes(_damaged_point(pair["client.pem"]))
    os.symlink(linked, settings / "client.pem")
    if way == "no-enrol":
        settings_files.set_aside(settings, lambda *_: True, settings_files.read_set(settings))
    else:
        settings_files.replace(settings, files(new), keep_replaced=lambda *_: True)
    kept = settings / ".settings-replaced"
    assert (kept / "client.key").read_bytes() == pair["client.key"]
    assert not (kept / "client.pem").exists()
    assert linked.read_bytes() == _damaged_point(pair["client.pem"])  # not touched
