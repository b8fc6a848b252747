"""``workstation.settings_files``: the settings dir's files replaced as one set, on real files.

The whole run, with a fault at every change of the directory, is in test_workstation
(``test_a_re_enrolment_cut_short_anywhere_leaves_the_old_set_or_the_new``); these are the
cases a run of the product does not leave by itself.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path

import pytest

from tlsroll.fsutil import PRIVATE, PUBLIC, stage_atomic
from workstation import settings_files
from workstation.settings_files import MARKER, STAGING, Finished

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
        (staging / name).write_bytes(body)
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
    (d / "client.key").write_bytes(NEW["client.key"])
    assert settings_files.finish(d) is Finished.FORWARD
    assert contents(d) == NEW

    stage(d, OLD, None)
    assert settings_files.finish(d) is Finished.BACK
    assert contents(d) == NEW


@pytest.mark.parametrize(
    "marker",
    [b'{"files": ["client.key", "../elsewhere"]}', b"not json", b'["client.key"]'],
)
def test_a_marker_not_of_ours_commits_nothing(d: Path, marker: bytes) -> None:
    stage(d, NEW, marker)
    assert settings_files.finish(d) is Finished.BACK
    assert contents(d) == OLD


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
