"""The tests' own secrets (``tests.private_files``): written 0600 whatever the umask, and a key
left for group or others found (what ``tests/conftest.py`` fails a test for)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.private_files import open_keys_under, write_private
from tlsroll import pki

KEY = pki.key_to_pem(pki.generate_key())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_private_file_is_0600_under_umask_022_and_over_a_file_others_could_read(
    tmp_path: Path,
) -> None:
    old = os.umask(0o022)
    try:
        made = write_private(tmp_path / "new.key", KEY)
        there = tmp_path / "there.key"
        there.write_bytes(b"longer than the key that replaces it" * 100)
        there.chmod(0o644)
        write_private(there, KEY)
    finally:
        os.umask(old)
    assert made.read_bytes() == there.read_bytes() == KEY
    assert mode(made) == mode(there) == 0o600


def test_keys_others_can_access_are_found_and_nothing_else(tmp_path: Path) -> None:
    cert = pki.CertificateAuthority.create("private files CA").cert_pem
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name, data, bits in [
        ("a/open.key", KEY, 0o644),
        ("a/b/group.key", KEY, 0o640),
        ("a/b/written.key", KEY, 0o620),  # group may write it: no better
        ("a/chain.pem", cert + KEY, 0o644),  # a key after a certificate
        ("a/private.key", KEY, 0o600),
        ("a/read-only.key", KEY, 0o400),
        ("a/cert.pem", cert, 0o644),
        ("a/source.py", b'MARK = b"' + KEY.splitlines()[0] + b'"\n', 0o644),
    ]:
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(bits)
    # an installed distribution is not looked into; a link is not followed; a FIFO not opened
    (tmp_path / "venv" / "site-packages").mkdir(parents=True)
    (tmp_path / "venv" / "site-packages" / "k.pem").write_bytes(KEY)
    (tmp_path / "venv" / "site-packages" / "k.pem").chmod(0o644)
    (tmp_path / "link.key").symlink_to(tmp_path / "a" / "open.key")
    (tmp_path / "linked-dir").symlink_to(tmp_path / "a", target_is_directory=True)
    os.mkfifo(tmp_path / "fifo", 0o644)
    found = open_keys_under(tmp_path)
    assert [(str(p.relative_to(tmp_path)), m) for p, m in found] == [
        ("a/b/group.key", 0o640),
        ("a/b/written.key", 0o620),
        ("a/chain.pem", 0o644),
        ("a/open.key", 0o644),
    ]
    for path, _mode in found:
        path.chmod(0o600)
    assert open_keys_under(tmp_path) == []
