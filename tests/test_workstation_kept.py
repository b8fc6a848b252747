"""``tlsroll client test-connection``: the client files it keeps aside (``.enrolment-kept``,
``.settings-replaced``) are read and written by one rule on every path (s46ws): the client
files in the settings dir are never followed if they are links, never opened if they are
FIFOs (nor waited on), and every kept file is 0600; a key (a regular file) beside a
client.pem that is none of ours to read, or alone, is kept, never removed or overwritten.

Real runs of the command against the real reference server and bootstrap service, with the
helpers of ``test_workstation``.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
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
)
from tlsroll import pki
from tlsroll.fsutil import PRIVATE, write_atomic
from workstation.settings_files import KEPT, REPLACED

# test_workstation's fixtures, used here by name (its servers, its run of the command)
logs = test_workstation.logs
nodes = test_workstation.nodes
password_file = test_workstation.password_file
run_cli = test_workstation.run_cli

HOSTNAME = b"praxis-pc-7\n"  # what a link to /etc/hostname would read

LONE_KEY = "alone: its client.pem was a link, a FIFO or none (not read)"
LONE_KEY_KEPT = (
    "note      whether that key is still needed cannot be told: put its certificate beside "
    "it, or remove that folder once it is no longer needed"
)


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


@asynccontextmanager
async def unblocked(fifo: Path) -> AsyncIterator[list[bool]]:
    """A guard for a run that may wait on the FIFO ``fifo`` for ever: if it is not done after
    a generous while, the FIFO is opened for writing and closed again and again (each reader
    waiting on it then gets an end of file), so that the run ends and the test fails instead
    of hanging; yields a list that holds True once that was needed."""
    hung: list[bool] = []

    async def guard() -> None:
        await asyncio.sleep(30)
        hung.append(True)
        while True:
            with suppress(OSError):  # (ENXIO: no reader now)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            await asyncio.sleep(0.2)

    task = asyncio.create_task(guard())
    try:
        yield hung
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def enrolled(
    node: ServerNode, test_ca: pki.CertificateAuthority, run_cli: Any, pw: str
) -> None:
    async with bootstrap_on(node, test_ca):
        run = await run_cli(node.url, "--password-file", pw, "--yes")
    assert run.code == 0, run.err


@pytest.mark.parametrize("target", ["another name's certificate", "a file like /etc/hostname"])
async def test_an_enrolment_does_not_follow_a_client_pem_link_and_keeps_the_key_beside_it(
    target: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """s45 review: the enrolment's keeping of the set it replaces (``_keep_replaced``) read
    client.pem following a link: a file outside the settings dir (0600) was copied into
    .settings-replaced (0644); a link to a file that is no certificate (/etc/hostname) was
    read, and the key beside it overwritten, its only copy. The link is not read now: the
    key (a regular file) is kept alone in .settings-replaced, 0600, with the set it was in,
    and two notes say so; the file the link names is neither read into the dir nor
    changed."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrolled(node, test_ca, run_cli, pw)
    key_pem, cert_pem = client_pair(test_ca, "ws-other", expired=False)
    outside = tmp_path / "outside"
    outside.write_bytes(cert_pem if target == "another name's certificate" else HOSTNAME)
    outside.chmod(0o600)
    write_atomic(d / "client.key", key_pem, PRIVATE)
    os.unlink(d / "client.pem")
    os.symlink(outside, d / "client.pem")
    before = {n: (d / n).read_bytes() for n in ("ca.pem", "settings.json")}
    async with bootstrap_on(node, test_ca):
        run = await run_cli(node.url, "--password-file", pw, "--yes", "--name", "fresh")
    assert run.code == 0, run.err
    assert sorted(os.listdir(d)) == sorted([*SETTINGS_SET, REPLACED])
    assert not os.path.islink(d / "client.pem")
    assert pki.names_of(pki.read_cert(d / "client.pem")).common_name == "ws-fresh"
    assert files_under(d / REPLACED) == {
        d / REPLACED / "client.key": key_pem,
        d / REPLACED / "ca.pem": before["ca.pem"],
        d / REPLACED / "settings.json": before["settings.json"],
    }
    assert set(modes_in(d / REPLACED).values()) == {0o600}
    assert stat.S_IMODE(os.lstat(d / REPLACED).st_mode) == 0o700
    assert outside.read_bytes() == (cert_pem if "certificate" in target else HOSTNAME)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert all(outside.read_bytes() != data for data in files_under(d).values())
    notes = [line for line in run.out.splitlines() if line.startswith("note")]
    assert notes[-2:] == [
        f"note      the settings before are kept in {d / REPLACED}, {LONE_KEY}",
        LONE_KEY_KEPT,
    ], run.out
    for line in notes[-2:]:  # short lines (s45ws), with a home's paths
        assert len(line.replace(str(d), "/home/anna/.config/tlsroll/client")) < 200, line


async def test_a_fifo_in_place_of_client_pem_does_not_block_an_enrolment(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """s45 review: a FIFO planted as client.pem hung the enrolment for ever (the pair in
    place was read to name the PC and to keep it, and the open waits for a writer). It is
    not read: the run enrols, the new set takes its place, and the key beside it (a regular
    file) is kept in .settings-replaced, 0600."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrolled(node, test_ca, run_cli, pw)
    key_pem = (d / "client.key").read_bytes()
    os.unlink(d / "client.pem")
    os.mkfifo(d / "client.pem")
    async with bootstrap_on(node, test_ca), unblocked(d / "client.pem") as hung:
        run = await run_cli(node.url, "--password-file", pw, "--yes", "--name", "fresh")
    assert not hung, "the run waited on the FIFO"
    assert run.code == 0, run.err
    assert stat.S_ISREG(os.lstat(d / "client.pem").st_mode)
    assert pki.names_of(pki.read_cert(d / "client.pem")).common_name == "ws-fresh"
    assert (d / REPLACED / "client.key").read_bytes() == key_pem
    assert not os.path.lexists(d / REPLACED / "client.pem")
    assert set(modes_in(d / REPLACED).values()) == {0o600}
    assert f"note      the settings before are kept in {d / REPLACED}, {LONE_KEY}" in run.out


@pytest.mark.parametrize("where", [KEPT, REPLACED])
async def test_every_kept_client_file_is_0600(
    where: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """s45 review: ``keep`` (the new pair of an enrolment whose check failed, in
    .enrolment-kept) and the enrolment's keeping of the set it replaced (.settings-replaced)
    wrote client.pem 0644 (ca.pem and settings.json too), where ``set_aside`` writes 0600.
    Every kept file is 0600 now, by one helper."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    if where == KEPT:  # a new pair whose final check fails: kept aside
        other = pki.CertificateAuthority.create("another CA")
        async with bootstrap_on(node, test_ca, sign=ca_signer(other)) as service:
            service.set_ca_bundle(test_ca.cert_pem + other.cert_pem)
            run = await run_cli(node.url, "--password-file", pw, "--yes")
        assert run.code == 1, run.err
        assert f"is kept in {d / KEPT}" in run.error
        assert sorted(os.listdir(d / KEPT)) == ["client.key", "client.pem"]
    else:  # another name's set, replaced by an enrolment: kept with its set
        await enrolled(node, test_ca, run_cli, pw)
        async with bootstrap_on(node, test_ca):
            run = await run_cli(node.url, "--password-file", pw, "--yes", "--name", "other")
        assert run.code == 0, run.err
        assert sorted(os.listdir(d / REPLACED)) == sorted(SETTINGS_SET)
    assert modes_in(d / where) == dict.fromkeys(os.listdir(d / where), 0o600)
    assert stat.S_IMODE(os.lstat(d / where).st_mode) == 0o700


@pytest.mark.parametrize("partner", ["a link", "a FIFO", "none", "a link, a valid set kept before"])
async def test_no_enrol_keeps_a_key_whose_client_pem_is_no_file_of_ours(
    partner: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """s45 review: ``--no-enrol`` over a settings dir whose client.pem is a link or a FIFO
    (or none) removed the client.key beside it, a regular file: the only copy of a pair's
    key that may still be valid. It goes to .settings-replaced alone (0600) now, its partner
    only removed (the file a link names unread, unchanged), and two notes say so; where
    .settings-replaced holds a set that may still be valid, the client files stay as they
    are and the notes say why and what to do (as for a pair)."""
    node = nodes["tls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrolled(node, test_ca, run_cli, pw)
    key_pem = (d / "client.key").read_bytes()
    outside = tmp_path / "outside"
    outside.write_bytes(HOSTNAME)
    outside.chmod(0o600)
    os.unlink(d / "client.pem")
    if partner.startswith("a link"):
        os.symlink(outside, d / "client.pem")
    elif partner == "a FIFO":
        os.mkfifo(d / "client.pem")
    w = older_pair(test_ca, "ws-w")
    if partner.endswith("kept before"):
        (d / REPLACED).mkdir(mode=0o700)
        write_atomic(d / REPLACED / "client.key", w[0], PRIVATE)
        write_atomic(d / REPLACED / "client.pem", w[1], PRIVATE)
    pin = pki.spki_pin(test_ca.cert)
    async with bootstrap_on(node, test_ca), unblocked(d / "client.pem") as hung:
        run = await run_cli(node.url, "--ca-pin", pin, "--no-enrol", "--yes")
    assert not hung
    assert run.code == 0, run.err
    assert settings_of(tmp_path)["client_cert_file"] is None
    assert outside.read_bytes() == HOSTNAME
    notes = [line for line in run.out.splitlines() if line.startswith("note")]
    if partner.endswith("kept before"):  # nothing moved, nothing lost
        assert (d / "client.key").read_bytes() == key_pem
        assert os.readlink(d / "client.pem") == str(outside)
        assert files_under(d / REPLACED) == {
            d / REPLACED / "client.key": w[0],
            d / REPLACED / "client.pem": w[1],
        }
        assert notes == [
            f"note      client.key and client.pem stay in {d}: keeping client.key aside alone "
            f"(its client.pem is a link, a FIFO or none) would lose ws-w's in {REPLACED}",
            f"note      move {d / REPLACED} out of {d} as its owner or root (keep it while its "
            "certificate is needed), then run this again",
        ], run.out
        for line in notes:
            assert len(line.replace(str(d), "/home/anna/.config/tlsroll/client")) < 200, line
        return
    assert sorted(os.listdir(d)) == [REPLACED, "ca.pem", "settings.json"]
    assert files_under(d / REPLACED) == {d / REPLACED / "client.key": key_pem}
    assert modes_in(d / REPLACED) == {"client.key": 0o600}
    assert notes == [f"note      client.key moved to {d / REPLACED}, {LONE_KEY}", LONE_KEY_KEPT]
    for line in notes:  # short lines (s45ws), with a home's paths
        assert len(line.replace(str(d), "/home/anna/.config/tlsroll/client")) < 200, line
