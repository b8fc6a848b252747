"""Secrets a test writes (a private key, a token) are 0600 from their first byte, as the
product writes its own (``tlsroll.pki.write_key``): ``write_private``. A test that leaves a
PEM private key group or others can access in its ``tmp_path`` fails at its teardown
(``open_keys_under``, run by ``tests/conftest.py``), unless it marks itself
``@pytest.mark.open_keys``: it makes one on purpose (a refusal of a readable key, a staged key
a server's group is given to read). Session 69 (artefacts): 127 keys of the kept tmp_path of a
full CI run were 0644, written by test helpers with ``write_bytes`` under umask 022."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

PRIVATE = 0o600


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` (made or truncated; a link followed, as ``write_bytes``
    does), 0600 from its first byte whatever the umask, and 0600 if it was there with
    another mode. Returns ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE)
    try:
        os.fchmod(fd, PRIVATE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


HEAD = 8192
"""Bytes of a file ``open_keys_under`` reads: a key alone, or after a certificate or two."""

_KEY = re.compile(rb"^-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----\r?$", re.MULTILINE)
"""A PEM private key's first line (PKCS#8, encrypted or not, RSA, EC, OpenSSH), at the start
of a line: a source file that names the marker in quotes (an installed ``cryptography``) is
no key."""

SKIPPED = frozenset({"site-packages", "__pycache__", "node_modules"})
"""Directories not looked into: installed distributions (a test's venv, ``tlsroll-dist``
layers) hold no key of a test's, and are most of the files of the trees that have them."""


def open_keys_under(root: Path) -> list[tuple[Path, int]]:
    """Regular files under ``root`` (links not followed, neither to files nor directories)
    holding a PEM private key that group or others can access: (path, mode). Cheap: a file
    that nobody but its owner can access is never opened, one that is has ``HEAD`` bytes
    read; a FIFO, socket or device is never opened; what cannot be read is passed over."""
    found: list[tuple[Path, int]] = []
    pending = [str(root)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in SKIPPED:
                        pending.append(entry.path)
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                if not mode & 0o077:
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    head = os.read(fd, HEAD)
                finally:
                    os.close(fd)
            except OSError:
                continue
            if _KEY.search(head):
                found.append((Path(entry.path), mode))
    return sorted(found)
