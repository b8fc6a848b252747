"""``tlsroll client test-connection`` and the client files in its settings dir that are not
plain files of its own (s47ws): a FIFO is never opened (a run waited on it for ever), a link
is followed only to tell what the set in place is (its name, whether it works), never copied
through, and a client.key beside a client.pem that is a link, a FIFO or none is not lost;
all without the two regressions of the reverted s46ws attempt (review s46rev2 M1, M2).

Real runs of the command against the real reference server and bootstrap service, with the
helpers of ``test_workstation``; real FIFOs (``os.mkfifo``) and real links. A FIFO test
watches the FIFO (``test_workstation_settings.watched_fifo``): a reader that opens it is
seen (a writer's non-blocking open succeeds only while one has it open) and let go with an
end of file, so that the code before the fix is caught opening it, and never hangs the test.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import termios
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests import test_workstation
from tests.private_files import write_private
from tests.test_bootstrap import PASSWORD, ca_signer
from tests.test_workstation import (
    SETTINGS_SET,
    ServerNode,
    as_nobody,
    bootstrap_on,
    client_pair,
    older_pair,
    settings_of,
    settings_set,
)
from tests.test_workstation_settings import watched_fifo
from tlsroll import pki
from tlsroll.fsutil import PRIVATE, write_atomic
from tlsroll.tls import client_context
from workstation import connection as workstation
from workstation import settings_files
from workstation.settings_files import KEPT, MARKER, REPLACED, STAGING

# test_workstation's fixtures, used here by name (its servers, its run of the command)
logs = test_workstation.logs
nodes = test_workstation.nodes
password_file = test_workstation.password_file
run_cli = test_workstation.run_cli

HOSTNAME = b"praxis-pc-7\n"  # what a link to /etc/hostname would read


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


# --- 1. a FIFO in place of a settings file is never opened (a run waited on it for ever) ----


def test_a_fifo_as_the_commit_marker_is_not_opened(tmp_path: Path) -> None:
    """s46rev2 L4: ``finish`` (every run's first step) read ``.settings-new/commit`` by its
    name, and a FIFO there held the run for ever. It is not opened: no marker of ours, so the
    staging was never committed, and it is discarded (the settings before stay)."""
    d = tmp_path
    (d / "settings.json").write_bytes(b"{}\n")
    (d / STAGING).mkdir(mode=0o700)
    (d / STAGING / "settings.json").write_bytes(b'{"new": 1}\n')
    with watched_fifo(d / STAGING / MARKER) as opened:
        done = settings_files.finish(d)
    assert opened == []
    assert done is settings_files.Finished.BACK
    assert sorted(os.listdir(d)) == ["settings.json"]
    assert (d / "settings.json").read_bytes() == b"{}\n"


@pytest.mark.parametrize("name", ["client.pem", "client.key"])
async def test_a_fifo_in_place_of_a_client_file_is_not_opened_by_an_enrolment(
    name: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """s45rev7 L2 (left open): a FIFO as client.pem or client.key held an enrolment for ever
    (the pair in place was read by name to name the PC, and to keep it). It is never
    opened: a note says it is no file, the run enrols, and the new set takes its place; a
    key beside a FIFO client.pem is kept, alone (0600)."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw)
    key_pem = (d / "client.key").read_bytes()
    os.unlink(d / name)
    with watched_fifo(d / name) as opened:
        async with bootstrap_on(node, test_ca):
            run = await run_cli(node.url, "--password-file", pw, "--yes", "--name", "fresh")
    assert opened == [], "the run opened the FIFO"
    assert run.code == 0, run.err
    assert (
        f"note      {d / name} is a FIFO: not read, taken as missing"
    ) in run.out.splitlines(), run.out
    assert all(stat.S_ISREG(os.lstat(d / n).st_mode) for n in SETTINGS_SET)
    assert pki.names_of(pki.read_cert(d / "client.pem")).common_name == "ws-fresh"
    if name == "client.key":  # no key of ours beside the certificate: nothing to keep
        assert sorted(os.listdir(d)) == sorted(SETTINGS_SET)
        return
    assert files_under(d / REPLACED)[d / REPLACED / "client.key"] == key_pem
    assert not os.path.lexists(d / REPLACED / "client.pem")
    assert set(modes_in(d / REPLACED).values()) == {0o600}


@pytest.mark.parametrize("name", ["ca.pem", "settings.json"])
async def test_a_fifo_beside_a_pair_worth_keeping_is_not_opened(
    name: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """A FIFO as ca.pem or settings.json beside a pair worth keeping (another name's,
    valid) held the enrolment for ever when it kept that set in .settings-replaced. It is
    never opened: the pair is kept with the rest of its set, the FIFO not."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw)
    key_pem, cert_pem = client_pair(test_ca, "ws-other", expired=False)
    write_atomic(d / "client.key", key_pem, PRIVATE)
    write_atomic(d / "client.pem", cert_pem, 0o644)
    other = next(n for n in ("ca.pem", "settings.json") if n != name)
    other_data = (d / other).read_bytes()
    os.unlink(d / name)
    with watched_fifo(d / name) as opened:
        async with bootstrap_on(node, test_ca):
            run = await run_cli(node.url, "--password-file", pw, "--yes", "--name", "fresh")
    assert opened == [], "the run opened the FIFO"
    assert run.code == 0, run.err
    assert files_under(d / REPLACED) == {
        d / REPLACED / "client.key": key_pem,
        d / REPLACED / "client.pem": cert_pem,
        d / REPLACED / other: other_data,
    }
    assert all(stat.S_ISREG(os.lstat(d / n).st_mode) for n in SETTINGS_SET)


async def test_a_fifo_in_the_set_in_place_is_not_opened_after_a_failed_check(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """After the new set failed its check, the request with the set in place read its
    settings.json by name: a FIFO there held the run for ever. It is never opened: that set
    cannot be read whole (nor could the practice software read it), so the new set goes in
    place, and the error says why."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    args = ("--password-file", pw, "--name", "empfang")
    await enrol(node, test_ca, run_cli, *args)
    os.unlink(d / "settings.json")
    other = pki.CertificateAuthority.create("another CA")  # the new set fails its check
    with watched_fifo(d / "settings.json") as opened:
        async with bootstrap_on(node, test_ca, sign=ca_signer(other)) as service:
            service.set_ca_bundle(test_ca.cert_pem + other.cert_pem)
            run = await run_cli(node.url, "--yes", *args)
    assert opened == [], "the run opened the FIFO"
    assert run.code == 1, run.err
    assert "fails too (they cannot be read whole)" in run.error, run.error
    assert pki.issued_by(pki.read_cert(d / "client.pem"), other.cert)
    assert stat.S_ISREG(os.lstat(d / "settings.json").st_mode)


# --- 2. a client.pem link is not copied through; 3. the key beside it is not lost ------------


@pytest.mark.parametrize("target", ["a file like /etc/hostname", "no file (a dangling link)"])
async def test_an_enrolment_does_not_copy_a_client_pem_link_and_keeps_the_key_beside_it(
    target: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """The enrolment's keeping of the set it replaces (``_keep_replaced``) read client.pem
    through a link: the file outside the settings dir (0600) was copied into
    .settings-replaced; a link to a file that is no certificate (/etc/hostname) was read, and
    the key beside it overwritten, its only copy. Nothing is copied through the link now:
    the key (a file of ours) is kept alone in .settings-replaced, 0600, with the rest of its
    set, and two notes say so; the file the link names is not changed. (A link to the key's
    own certificate: ``test_a_client_pem_link_to_the_keys_valid_certificate_is_kept_with_it``.)"""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw)
    key_pem = client_pair(test_ca, "ws-other", expired=False)[0]
    outside = tmp_path / "outside"
    if "hostname" in target:
        outside.write_bytes(HOSTNAME)
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
    if "hostname" in target:
        assert outside.read_bytes() == HOSTNAME
        assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    notes = [line for line in run.out.splitlines() if line.startswith("note")]
    assert notes[-2:] == [
        f"note      the settings before are kept in {d / REPLACED}, their client.key alone: "
        "its client.pem was a link or a FIFO (not copied)",
        "note      whether that key is still needed cannot be told: put its certificate beside "
        "it, or remove that folder once it is no longer needed",
    ], run.out


async def test_a_client_pem_link_to_the_keys_valid_certificate_is_kept_with_it(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Review s47rev3 L1: a client.pem link to a valid certificate of the key beside it
    (another name's: worth keeping) was read to tell that, then the key kept without it, a
    note saying "whether that key is still needed cannot be told", never to go by itself.
    The certificate (public) is kept with the key, read through the link and written as a
    file of ours (0600), and the ordinary note says whose it is and that it goes by itself;
    the file the link names is not changed."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw)
    key_pem, cert_pem = client_pair(test_ca, "ws-other", expired=False)
    outside = tmp_path / "other.pem"
    outside.write_bytes(cert_pem)
    write_atomic(d / "client.key", key_pem, PRIVATE)
    os.unlink(d / "client.pem")
    os.symlink(outside, d / "client.pem")
    before = {n: (d / n).read_bytes() for n in ("ca.pem", "settings.json")}
    run = await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "fresh")
    assert pki.names_of(pki.read_cert(d / "client.pem")).common_name == "ws-fresh"
    assert not os.path.islink(d / REPLACED / "client.pem")
    assert files_under(d / REPLACED) == {
        d / REPLACED / "client.key": key_pem,
        d / REPLACED / "client.pem": cert_pem,
        d / REPLACED / "ca.pem": before["ca.pem"],
        d / REPLACED / "settings.json": before["settings.json"],
    }
    assert set(modes_in(d / REPLACED).values()) == {0o600}
    assert outside.read_bytes() == cert_pem
    notes = [line for line in run.out.splitlines() if line.startswith("note")]
    assert notes[-1].startswith(
        f"note      the settings before are kept in {d / REPLACED}, as their key is nowhere "
        "else: client certificate ws-other of another name"
    ), run.out
    assert notes[-1].endswith("it goes by itself once that certificate has expired"), run.out
    assert "cannot be told" not in run.out, run.out


async def test_a_client_pem_link_to_the_pcs_superseded_certificate_keeps_nothing(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """(Passes before s47ws too.) An admin's client.pem link to this PC's own certificate,
    which the new enrolment supersedes: the link is read to tell that (never copied), so the
    key beside it, worth nothing now, is not kept, and no note is said."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "empfang")
    outside = tmp_path / "empfang.pem"
    outside.write_bytes((d / "client.pem").read_bytes())
    os.unlink(d / "client.pem")
    os.symlink(outside, d / "client.pem")
    run = await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "empfang")
    assert sorted(os.listdir(d)) == sorted(SETTINGS_SET)
    assert "kept in" not in run.out, run.out


CERT_GONE = (
    "its client.pem is gone, and a key without its certificate can neither be used nor prove "
    "this PC's name"
)


@pytest.mark.parametrize("kept_before", ["another name's valid set", "a key alone"])
async def test_client_pem_deleted_by_hand_an_enrolment_replaces_the_key_beside_what_is_kept(
    kept_before: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Review s47rev3 M1: "delete client.pem, enrol again" (a renamed PC, a copied dir)
    stopped with exit 1 whenever .settings-replaced held a set that may still be valid (a's
    here), or a key alone (which never goes by itself: every later such enrolment stopped):
    the key in place, whose certificate is gone, was to be kept there. Such a key can neither
    be used nor prove this PC's name, so it is not kept (as before s47ws): the enrolment
    replaces it, says so, and what .settings-replaced holds stays (s46rev2 M1)."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "a")
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "b")
    if kept_before == "a key alone":  # (as s47ws kept one)
        os.unlink(d / REPLACED / "client.pem")
    kept = files_under(d / REPLACED)
    os.unlink(d / "client.pem")
    async with bootstrap_on(node, test_ca):
        run = await run_cli(node.url, "--yes", "--password-file", pw, "--name", "c")
    assert run.code == 0, run.err
    assert files_under(d / REPLACED) == kept
    assert sorted(os.listdir(d)) == sorted([*SETTINGS_SET, REPLACED])
    assert pki.names_of(pki.read_cert(d / "client.pem")).common_name == "ws-c"
    notes = [line for line in run.out.splitlines() if line.startswith("note")]
    assert notes[-1] == f"note      the client.key in place is replaced, not kept: {CERT_GONE}"
    assert "kept in" not in run.out, run.out


async def test_an_enrolment_over_a_key_beside_a_link_held_by_a_valid_set_says_both_ways_out(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """A client.key beside a client.pem link that names no certificate of it (a dangling
    one: its certificate may be on a drive not mounted) cannot go to .settings-replaced
    without losing the valid set there (a's: review s46rev2 M1), so nothing is replaced,
    as ``--no-enrol`` holds: the key stays, the new pair is kept aside. The error offered
    only moving that valid set out (review s47rev3 M1); it offers removing the key too."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "a")
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "b")
    a_set, b_key = settings_set(d / REPLACED), (d / "client.key").read_bytes()
    os.unlink(d / "client.pem")
    os.symlink(tmp_path / "unmounted" / "b.pem", d / "client.pem")
    async with bootstrap_on(node, test_ca):
        run = await run_cli(node.url, "--yes", "--password-file", pw, "--name", "c")
    assert run.code == 1, run.err
    assert settings_set(d / REPLACED) == a_set
    assert (d / "client.key").read_bytes() == b_key
    assert pki.names_of(pki.read_cert(d / KEPT / "client.pem")).common_name == "ws-c"
    assert run.error == (
        "tlsroll: error: client.key in place (its client.pem a link or a FIFO) cannot be kept "
        f"aside without losing ws-a's set in {d / REPLACED}: nothing was replaced; remove "
        f"{d / 'client.key'} if its certificate is no longer needed, or move {d / REPLACED} "
        f"out of {d} as its owner or root (keep it while its certificate is needed), then run "
        "this again"
    )


async def test_a_failed_check_over_a_held_key_alone_says_so_and_names_the_folder(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Review s47rev3 L2: the new set failed its check, the set in place could not be read
    whole (its client.pem a dangling link), and the new set could not go in place either, as
    keeping the key in place would lose the valid set in .settings-replaced: that was
    swallowed ("the settings before are kept"), the folder unnamed. A note says it now, with
    both ways out; nothing is lost."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "a")
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "b")
    a_set, b_key = settings_set(d / REPLACED), (d / "client.key").read_bytes()
    os.unlink(d / "client.pem")
    os.symlink(tmp_path / "gone.pem", d / "client.pem")
    other = pki.CertificateAuthority.create("another CA")  # the new set fails its check
    async with bootstrap_on(node, test_ca, sign=ca_signer(other)) as service:
        service.set_ca_bundle(test_ca.cert_pem + other.cert_pem)
        run = await run_cli(node.url, "--yes", "--password-file", pw, "--name", "c")
    assert run.code == 1, run.err
    assert settings_set(d / REPLACED) == a_set
    assert (d / "client.key").read_bytes() == b_key
    assert pki.issued_by(pki.read_cert(d / KEPT / "client.pem"), other.cert)
    assert (
        "note      the new settings are not in place either: client.key in place (its "
        "client.pem a link or a FIFO) cannot be kept aside without losing ws-a's set in "
        f"{d / REPLACED}: nothing was replaced; remove {d / 'client.key'} if its certificate "
        f"is no longer needed, or move {d / REPLACED} out of {d} as its owner or root (keep it "
        "while its certificate is needed), then run this again"
    ) in run.out.splitlines(), run.out


async def test_a_directory_as_client_pem_is_not_called_a_fifo_taken_as_missing(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Review s47rev3 L5: a directory at client.pem got "is not a regular file (a FIFO?):
    not read, taken as missing", then an error that it could not be read. It is said as a
    directory, no more."""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw, "--name", "a")
    os.unlink(d / "client.pem")
    os.mkdir(d / "client.pem")
    async with bootstrap_on(node, test_ca):
        run = await run_cli(node.url, "--yes", "--password-file", pw, "--name", "b")
    assert (
        f"note      {d / 'client.pem'} is a directory, not a regular file: not read"
    ) in run.out.splitlines(), run.out
    assert "taken as missing" not in run.out, run.out


@pytest.mark.parametrize(
    "partner",
    ["a link", "a FIFO", "none", "a link, a valid set kept before", "a link to its certificate"],
)
async def test_no_enrol_keeps_a_key_whose_client_pem_is_no_file_of_ours(
    partner: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """``--no-enrol`` over a settings dir whose client.pem is a link or a FIFO (or none)
    removed the client.key beside it, a file of ours: the only copy of a pair's key that may
    still be valid. It goes to .settings-replaced alone (0600) now, its partner only removed
    (the file a link names unchanged), and two notes say so; where .settings-replaced holds
    a set that may still be valid, the client files stay as they are and the notes say why
    and what to do (as for a pair, and that the key may be removed: s47rev3 M1). A link to
    the key's own certificate makes a pair with it: both go to .enrolment-kept as files
    (s47rev3 L1: the key went alone). With no client.pem at all the key is removed, and
    that is said (s47rev3 M1: its certificate gone, it is worth nothing)."""
    node = nodes["tls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    await enrol(node, test_ca, run_cli, "--password-file", pw)
    key_pem, cert_pem = (d / "client.key").read_bytes(), (d / "client.pem").read_bytes()
    outside = tmp_path / "outside"
    outside.write_bytes(cert_pem if partner.endswith("its certificate") else HOSTNAME)
    outside.chmod(0o600)
    os.unlink(d / "client.pem")
    if partner.startswith("a link"):
        os.symlink(outside, d / "client.pem")
    if partner.endswith("kept before"):
        w = older_pair(test_ca, "ws-w")
        (d / REPLACED).mkdir(mode=0o700)
        write_atomic(d / REPLACED / "client.key", w[0], PRIVATE)
        write_atomic(d / REPLACED / "client.pem", w[1], PRIVATE)
    pin = pki.spki_pin(test_ca.cert)
    fifo: AbstractContextManager[list[str]] = (
        watched_fifo(d / "client.pem") if partner == "a FIFO" else nullcontext([])
    )
    with fifo as opened:
        async with bootstrap_on(node, test_ca):
            run = await run_cli(node.url, "--ca-pin", pin, "--no-enrol", "--yes")
    assert opened == [], "the run opened the FIFO"
    assert run.code == 0, run.err
    assert settings_of(tmp_path)["client_cert_file"] is None
    notes = [line for line in run.out.splitlines() if line.startswith("note")]
    if partner.endswith("its certificate"):
        assert outside.read_bytes() == cert_pem
        assert sorted(os.listdir(d)) == [KEPT, "ca.pem", "settings.json"]
        assert files_under(d / KEPT) == {
            d / KEPT / "client.key": key_pem,
            d / KEPT / "client.pem": cert_pem,
        }
        assert modes_in(d / KEPT) == {"client.key": 0o600, "client.pem": 0o600}
        assert notes[-1].startswith(
            f"note      the earlier enrolment's client.key and client.pem moved to {d / KEPT}"
        ), run.out
        return
    assert outside.read_bytes() == HOSTNAME
    if partner == "none":
        assert sorted(os.listdir(d)) == ["ca.pem", "settings.json"]
        assert notes[-1] == f"note      client.key removed: {CERT_GONE}", run.out
        return
    if partner.endswith("kept before"):  # nothing moved, nothing lost
        assert (d / "client.key").read_bytes() == key_pem
        assert os.readlink(d / "client.pem") == str(outside)
        assert files_under(d / REPLACED) == {
            d / REPLACED / "client.key": w[0],
            d / REPLACED / "client.pem": w[1],
        }
        assert notes[-2:] == [
            f"note      client.key and client.pem stay in {d}: keeping client.key aside alone "
            f"(its client.pem is a link or a FIFO) would lose ws-w's in {REPLACED}",
            f"note      remove {d / 'client.key'} if its certificate is no longer needed, or move "
            f"{d / REPLACED} out of {d} as its owner or root (keep it while its certificate is "
            "needed), then run this again",
        ], run.out
        return
    assert sorted(os.listdir(d)) == [REPLACED, "ca.pem", "settings.json"]
    assert files_under(d / REPLACED) == {d / REPLACED / "client.key": key_pem}
    assert modes_in(d / REPLACED) == {"client.key": 0o600}
    assert notes[-2:] == [
        f"note      client.key moved to {d / REPLACED}, alone: its client.pem was a link or a "
        "FIFO (not copied)",
        "note      whether that key is still needed cannot be told: put its certificate beside "
        "it, or remove that folder once it is no longer needed",
    ], run.out


# --- review s47rev3 L3: no key of ours, a client.pem that cannot be read -------------------


@pytest.mark.parametrize("run_with", ["an enrolment", "--no-enrol"])
async def test_a_client_pem_that_cannot_be_read_beside_no_key_is_not_read(
    run_with: str,
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
) -> None:
    """Review s47rev3 L3: with no client.key in place, a client.pem the run may not read (a
    root's 0600 file copied in without its key) was read all the same, to tell whether the
    pair was worth keeping: an enrolment stopped with exit 1 ("could not be read to tell
    whether to keep them"), ``--no-enrol`` left it in place. Without a key of ours it is
    worth nothing and is not read: the enrolment replaces it, ``--no-enrol`` removes it,
    both exit 0, as before s47ws. Real permissions: the runs are nobody's (setpriv), the
    client.pem root's."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the client as another user")
    node = nodes["mtls"] if run_with == "an enrolment" else nodes["tls"]
    root = Path(tempfile.mkdtemp(prefix="tlsroll-ws-"))
    root.chmod(0o755)  # (the way to the settings dir open to nobody)
    try:
        d = root / "settings"
        pw = root / "password"
        write_atomic(pw, (PASSWORD + "\n").encode(), PRIVATE)
        args = ("--yes", "--settings-dir", str(d))
        async with bootstrap_on(node, test_ca):
            assert (await run_cli(node.url, "--password-file", str(pw), *args)).code == 0
            _, cert_pem = client_pair(test_ca, "ws-elsewhere", expired=False)
            os.unlink(d / "client.key")
            write_atomic(d / "client.pem", cert_pem, PRIVATE)  # root's, 0600
            for path in (pw, d, *d.rglob("*")):
                if path != d / "client.pem":
                    os.lchown(path, 65534, 65534)
            if run_with == "an enrolment":
                code, out, err = await as_nobody(
                    node.url, "--password-file", str(pw), *args, "--name", "fresh"
                )
            else:
                pin = pki.spki_pin(test_ca.cert)
                code, out, err = await as_nobody(node.url, "--ca-pin", pin, "--no-enrol", *args)
        assert code == 0, err
        assert "could not be read" not in out + err, out + err
        if run_with == "an enrolment":
            assert sorted(os.listdir(d)) == sorted(SETTINGS_SET)
            assert pki.names_of(pki.read_cert(d / "client.pem")).common_name == "ws-fresh"
        else:
            assert sorted(os.listdir(d)) == ["ca.pem", "settings.json"]
            assert settings_of(root)["client_cert_file"] is None
        assert "stay in" not in out, out
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- review s47rev3 L4: ssl loads the client files that were checked ------------------------


async def test_a_fifo_swapped_in_after_the_check_is_not_what_ssl_opens(
    nodes: dict[str, ServerNode],
    test_ca: pki.CertificateAuthority,
    run_cli: Any,
    password_file: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review s47rev3 L4 (s46rev2 L5): the request with the set in place (the new set having
    failed its check) checked client.pem and client.key, then ssl opened them again by name:
    a FIFO swapped in between held the run for ever. ssl loads the very files checked now
    (held open): the swap, made at that seam (just before ssl loads them), never reaches it;
    the set in place, as checked, still works, and the run ends with its one error line.
    (The FIFO is watched: an open of it is seen and let go, and run_cli bounds the run.)"""
    node = nodes["mtls"]
    d = tmp_path / "settings"
    pw = password_file(PASSWORD)
    args = ("--password-file", pw, "--name", "empfang")
    await enrol(node, test_ca, run_cli, *args)
    cls, real = workstation.TestConnection, client_context
    probe = cls._set_in_place_problem
    armed: list[bool] = []
    with ExitStack() as stack:

        def in_place_problem(self: Any) -> str | None:
            armed.append(True)
            return probe(self)

        def swapping(ca_pem: bytes | None = None, **files: Path | None) -> Any:
            if armed and files.get("cert_file") is not None and not opened:
                os.unlink(d / "client.pem")  # the swap, after the check, before ssl loads
                opened.append(stack.enter_context(watched_fifo(d / "client.pem")))
            return real(ca_pem, **files)

        opened: list[list[str]] = []
        monkeypatch.setattr(cls, "_set_in_place_problem", in_place_problem)
        monkeypatch.setattr(workstation, "client_context", swapping)
        other = pki.CertificateAuthority.create("another CA")  # the new set fails its check
        async with bootstrap_on(node, test_ca, sign=ca_signer(other)) as service:
            service.set_ca_bundle(test_ca.cert_pem + other.cert_pem)
            run = await run_cli(node.url, "--yes", *args)
    assert len(opened) == 1, "the swap was not made"
    assert opened[0] == [], "ssl opened the FIFO swapped in after the check"
    assert run.code == 1, run.err
    assert "the settings before are kept (a request with them still succeeds)" in run.error
    assert pki.issued_by(pki.read_cert(d / KEPT / "client.pem"), other.cert)


def test_held_files_names_the_file_checked_or_refuses_a_fifo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``held_files``: the path it yields names the file it checked, whatever is swapped in
    by name afterwards (a FIFO: never opened); a FIFO, a directory or a file larger than any
    settings file there from the start is an OSError, not opened; with no /dev/fd that names
    the file, the file's own path (checked) is what it yields."""
    pem = tmp_path / "client.pem"
    pem.write_bytes(b"checked")
    with settings_files.held_files(pem) as (held,):
        os.unlink(pem)
        with watched_fifo(pem) as opened:
            assert held.read_bytes() == b"checked"
            assert held.read_bytes() == b"checked"  # (Linux: each open of /dev/fd/N its own offset)
    assert opened == []
    with (
        watched_fifo(tmp_path / "fifo") as opened,
        pytest.raises(OSError),
        settings_files.held_files(tmp_path / "fifo"),
    ):
        pass
    assert opened == []
    (tmp_path / "big").write_bytes(b"x" * (settings_files.MAX_FILE + 1))
    for name in ("big", "."):
        with pytest.raises(OSError), settings_files.held_files(tmp_path / name):
            pass
    (tmp_path / "plain").write_bytes(b"plain")
    monkeypatch.setattr(settings_files, "_FD_DIRS", (str(tmp_path / "no-fd"),))
    with settings_files.held_files(tmp_path / "plain") as (held,):
        assert held == tmp_path / "plain"


def test_an_encrypted_client_key_is_refused_not_asked_for_on_the_terminal(tmp_path: Path) -> None:
    """A ``client.key`` encrypted with a pass phrase (an admin's own, copied in) makes the
    client context fail at once (ssl.SSLError: "cannot be read whole"), never OpenSSL's
    "Enter PEM pass phrase:" on the run's terminal, where an unattended run waited for ever
    (review s48rev2 L1). A real child process whose controlling terminal is a pseudo-terminal
    nobody types into, bounded by a timeout."""
    ca = pki.CertificateAuthority.create("encrypted key test CA")
    key_pem, cert_pem = client_pair(ca, "ws-enc", expired=False)
    key = serialization.load_pem_private_key(key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"not-typed"),
    )
    (tmp_path / "client.pem").write_bytes(cert_pem)
    write_private(tmp_path / "client.key", encrypted)
    code = (
        "import ssl, sys\n"
        "from pathlib import Path\n"
        "from tlsroll.tls import client_context\n"
        "d = Path(sys.argv[1])\n"
        "try:\n"
        "    client_context(None, cert_file=d / 'client.pem', key_file=d / 'client.key')\n"
        "except ssl.SSLError:\n"
        "    print('refused', flush=True)\n"
        "    sys.exit(0)\n"
        "print('loaded', flush=True)\n"
    )
    main_fd, terminal_fd = os.openpty()

    def on_the_terminal() -> None:  # (in the child: the pty its controlling terminal)
        fcntl.ioctl(terminal_fd, termios.TIOCSCTTY, 0)

    try:
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdin=terminal_fd,
            stdout=subprocess.PIPE,
            stderr=terminal_fd,
            start_new_session=True,
            preexec_fn=on_the_terminal,  # noqa: PLW1509 (a test's child, no threads of ours there)
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        try:
            out, _ = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail(f"the run waited on its terminal: {_terminal_shows(main_fd)!r}")
        shown = _terminal_shows(main_fd)  # (its stderr: what it said if it did not answer)
    finally:
        os.close(terminal_fd)
        os.close(main_fd)
    assert out.decode().strip() == "refused", (child.returncode, shown)


def _terminal_shows(main_fd: int) -> bytes:
    """What a child wrote on its pseudo-terminal so far (``main_fd``, its other end)."""
    os.set_blocking(main_fd, False)
    try:
        return os.read(main_fd, 4096)
    except OSError:  # nothing there (EAGAIN), or the terminal hung up (EIO)
        return b""
