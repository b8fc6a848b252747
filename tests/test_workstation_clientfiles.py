"""``tlsroll client test-connection`` and the client files in its settings dir that are not
plain files of its own (s47ws): a FIFO is never opened (a run waited on it for ever), a link
is followed only to tell what the set in place is (its name, whether it works), never copied
through, and a client.key beside a client.pem that is a link, a FIFO or none is not lost;
all without the two regressions of the reverted s46ws attempt (review s46rev2 M1, M2).

Real runs of the command against the real reference server and bootstrap service, with the
helpers of ``test_workstation``; real FIFOs (``os.mkfifo``) and real links. A FIFO test
watches the FIFO (``watched_fifo``): a reader that opens it is seen (a writer's
non-blocking open succeeds only while one has it open) and let go with an end of file, so
that the code before the fix is caught opening it, and never hangs the test.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import test_workstation
from tests.test_bootstrap import PASSWORD, ca_signer
from tests.test_workstation import (
    SETTINGS_SET,
    ServerNode,
    bootstrap_on,
    client_pair,
    older_pair,
    settings_of,
    settings_set,
)
from tlsroll import pki
from tlsroll.fsutil import PRIVATE, write_atomic
from workstation import settings_files
from workstation.settings_files import KEPT, MARKER, REPLACED, STAGING

# test_workstation's fixtures, used here by name (its servers, its run of the command)
logs = test_workstation.logs
nodes = test_workstation.nodes
password_file = test_workstation.password_file
run_cli = test_workstation.run_cli

HOSTNAME = b"praxis-pc-7\n"  # what a link to /etc/hostname would read


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


def files_under(d: Path) -> dict[Path, bytes]:
    """Every regular file under ``d`` (links not followed), by path: its bytes."""
    found: dict[Path, bytes] = {}
    for root, _dirs, names in os.walk(d):
        for name in names:
            path = Path(root) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                found[path] = path.read_bytes()
    return found


def modes_in(directory: Path) -> dict[str, int]:
    return {n: stat.S_IMODE(os.lstat(directory / n).st_mode) for n in os.listdir(directory)}


async def enrol(node: ServerNode, test_ca: pki.CertificateAuthority, run_cli: Any, *a: str) -> Any:
    async with bootstrap_on(node, test_ca):
        run = await run_cli(node.url, "--yes", *a)
    assert run.code == 0, run.err
    return run


# --- non-regressions (review s46rev2 M1, M2): they pass on the code before s47ws too ---------


async def test_an_enrolment_over_a_key_alone_keeps_the_valid_set_kept_before(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Review s46rev2 M1: an enrolment over a client.key whose client.pem is gone kept that
    key in .settings-replaced in place of the set there, another name's, valid (its key the
    only copy, the leader still holding its certificate): that set was lost. It stays."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "a")
    a_set = settings_set(d)
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "b")
    assert settings_set(d / REPLACED) == a_set  # (another name's: kept, with its set)
    os.unlink(d / "client.pem")
    async with bootstrap_on(node, test_ca):
        await run_cli(node.url, "--yes", "--password-file", pw, "--name", "c")
    assert settings_set(d / REPLACED) == a_set


async def test_a_client_pem_link_is_no_set_that_fails(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Review s46rev2 M2: a client.pem that is a link (an admin's) counted as a set that
    cannot be read: after the new set failed its check, no request with the set in place was
    made, the failing new set replaced the working one, and the error said "a request with
    the settings before fails too". The link is followed for that request: the set in place
    works, it stays (the link as it was), and the new pair is kept aside."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    args = ("--password-file", pw, "--name", "empfang")
    await enrol(node, test_ca, run_cli, *args)
    outside = tmp_path / "empfang.pem"
    outside.write_bytes((d / "client.pem").read_bytes())
    os.unlink(d / "client.pem")
    os.symlink(outside, d / "client.pem")
    before = {n: (d / n).read_bytes() for n in ("ca.pem", "client.key", "settings.json")}
    other = pki.CertificateAuthority.create("another CA")  # the new set fails its check
    async with bootstrap_on(node, test_ca, sign=ca_signer(other)) as service:
        service.set_ca_bundle(test_ca.cert_pem + other.cert_pem)
        run = await run_cli(node.url, "--yes", *args)
    assert run.code == 1, run.err
    assert "the settings in place still work: the new ones checked once more" in run.out
    assert "fails too" not in run.error, run.error
    assert "the settings before are kept (a request with them still succeeds)" in run.error
    assert os.readlink(d / "client.pem") == str(outside)
    assert {n: (d / n).read_bytes() for n in before} == before
    assert pki.issued_by(pki.read_cert(d / KEPT / "client.pem"), other.cert)


async def test_a_client_pem_link_still_names_the_pc(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Review s46rev2 M2 (its second effect): with client.pem a link, a run without --name
    took the host name (a new PC, ws-pc-test) instead of the name of the pair in place."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "empfang")
    outside = tmp_path / "empfang.pem"
    outside.write_bytes((d / "client.pem").read_bytes())
    os.unlink(d / "client.pem")
    os.symlink(outside, d / "client.pem")
    await enrol(node, test_ca, run_cli, "--password-file", pw)
    assert pki.names_of(pki.read_cert(d / "client.pem")).common_name == "ws-empfang"
