"""``tlsroll client renew``: a PC's client certificate renewed without the password (session 71).

Nothing renewed a workstation's certificate: at its end (397 days, all PCs of switch day within
a week) the only way on was ``client test-connection`` with the password at every PC. Here the
PC proves it holds its current certificate (the CSR's re-enrolment proof), the node's bootstrap
service (real, on its TLS port) checks the CSR and passes it on with the agent's own calls
(``BootstrapHost.renew``/``sign``/``withdraw``, the agent's code) to the real Leader
service on a real mutual-TLS port with its real store (``tests.leader_rig``), and the CLI runs
in-process (a worker thread) on a settings dir as an enrolment leaves it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from leader.admin_service import AdminService
from leader.cli import base
from leader.expiry import Expiry
from leader.service import LeaderService
from leader.store import FORCED_RENEWAL_EVERY, RENEWAL_TRIES, WITHDRAW_WINDOW
from nodeagent.bootstrap_server import BootstrapService, Withdrawal
from nodeagent.bootstrap_supervisor import BootstrapHost, SignRefused
from tests.leader_rig import InProcessLeader, leader_with_a_node
from tests.test_bootstrap import VERIFIER, InProcessCrypto
from tests.test_plain_draw import ListingLeader, listed_on
from tlsroll import bootstrap_csr, cli, pki
from tlsroll import bootstrap_protocol as proto
from tlsroll.fsutil import PRIVATE, PUBLIC, write_atomic
from tlsroll.tls import client_context
from tlsroll.v1 import admin_pb2
from workstation import renew as ws_renew
from workstation.connection import Exit, request

NAME = "ws-empfang-1"


class Link(BootstrapHost):
    """The agent's calls to its leader for the bootstrap service: ``BootstrapHost``'s
    own ``sign``, ``renew`` and ``withdraw``, on the rig's leader as its enrolled node (none
    of the rest of the host: its journal, its service's life)."""

    def __init__(self, rig: InProcessLeader) -> None:  # (not the host's: no journal here)
        self.rig = rig
        self.removed: str | None = None
        self.on_signing_removed = None

    def set_removed(self, why: str | None) -> None:
        self.removed = why

    def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.rig.target, self.rig.node)


@dataclass
class World:
    rig: InProcessLeader
    service: BootstrapService
    link: Link
    settings: Path
    node_address: str
    db_file: Path

    def certs(self) -> dict[str, Any]:
        return {c.serial: c for c in self.rig.store.list_certificates("workstation")}

    def audit(self, kind: str) -> list[dict[str, Any]]:
        with sqlite3.connect(self.db_file) as db:
            rows = db.execute("SELECT detail FROM audit WHERE kind = ?", (kind,)).fetchall()
        return [json.loads(r[0]) for r in rows]


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as events:
        yield events


def write_settings(
    d: Path, node: str, port: int, ca_pem: bytes, cert_pem: bytes, key: pki.PrivateKey
) -> None:
    """A settings dir as ``client test-connection`` leaves it (``connection.write_settings``)."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings = {
        "version": 1,
        "server_url": f"https://{node}:8443/praxis_live/",
        "bootstrap_port": port,
        "node": "hb1",
        "ca_pin": "",
        "ca_file": "ca.pem",
        "client_cert_file": "client.pem",
        "client_key_file": "client.key",
        "server_fingerprint": "",
        "client_fingerprint": pki.fingerprint(pki.load_cert_pem(cert_pem)),
        "written_at": "2026-11-30T10:00:00+00:00",
    }
    write_atomic(d / "settings.json", json.dumps(settings).encode(), PUBLIC)
    write_atomic(d / "ca.pem", ca_pem, PUBLIC)
    write_atomic(d / "client.pem", cert_pem, PUBLIC)
    write_atomic(d / "client.key", pki.key_to_pem(key), PRIVATE)


@asynccontextmanager
async def world(
    tmp_path: Path, loopback: Callable[[], str], *, renews: bool = True
) -> AsyncIterator[World]:
    """The leader, node hb1's bootstrap service, and a PC enrolled through the leader's own
    signing (``SignWorkstationCertificate``, as after a password exchange). ``renews``
    False: the service of an agent older than renewals (no ``RENEW_PATH``)."""
    node_address = loopback()
    rig = leader_with_a_node(tmp_path, loopback(), node_address)
    await rig.server.start()
    ca = rig.state.ca
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    node_key = pki.generate_key()
    node_cert = ca.issue(node_key.public_key(), pki.Names.of("hb1", [node_address]), server=True)
    pki.write_key(node_dir / "key.pem", node_key)
    pki.write_cert(node_dir / "cert.pem", node_cert)
    link = Link(rig)
    service = BootstrapService(
        address=node_address,
        port=0,
        cert_file=node_dir / "cert.pem",
        key_file=node_dir / "key.pem",
        ca_bundle_pem=ca.cert_pem,
        server_url=f"https://{node_address}:8443/praxis_live/",
        node_name="hb1",
        verifier=VERIFIER,
        sign=link.sign,
        withdraw=link.withdraw,
        renew=link.renew if renews else None,
        crypto=InProcessCrypto(),
        ca_pin=pki.spki_pin(ca.cert),
    )
    await service.start()
    try:
        key = pki.generate_key()
        signed = await link.sign(pki.csr_to_pem(pki.make_csr(key, proto.workstation_names(NAME))))
        settings = tmp_path / "settings"
        write_settings(
            settings, node_address, service.bound_port, ca.cert_pem, signed.certificate_pem, key
        )
        # A day on: a renewal before the certificate is due (--force) waits that long after
        # its issue (``FORCED_RENEWAL_EVERY``); the tests below force one at once.
        rig.clock[0] += FORCED_RENEWAL_EVERY
        yield World(rig, service, link, settings, node_address, tmp_path / "leader.sqlite3")
    finally:
        await service.stop()
        await rig.close()


@dataclass
class Run:
    code: int
    out: str
    err: str


async def renew(
    w: World, capsys: pytest.CaptureFixture[str], *args: str, settings: Path | None = None
) -> Run:
    argv = ["client", "renew", "--settings-dir", str(settings or w.settings), "--timeout", "5"]
    code = await asyncio.wait_for(asyncio.to_thread(cli.main, [*argv, *args]), 60)
    out, err = capsys.readouterr()
    return Run(code, out, err)


def pair(d: Path) -> tuple[bytes, bytes]:
    return (d / "client.pem").read_bytes(), (d / "client.key").read_bytes()


def proven_csr(
    new_key: ec.EllipticCurvePrivateKey,
    previous: tuple[bytes, bytes] | None = None,
    *,
    name: str = NAME,
    replace: bool = False,
) -> bytes:
    """A CSR for ``new_key`` and ``name``, with the re-enrolment proof of ``previous`` (its
    certificate and key, PEM) as ``client renew`` and ``client test-connection`` make it."""
    held = None
    if previous is not None:
        key = pki.load_key_pem(previous[1])
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        held = (pki.load_cert_pem(previous[0]), key)
    public = new_key.public_key()
    claim = bootstrap_csr.reenrolment_extension(public, name, previous=held, replace=replace)
    csr = pki.make_csr(new_key, proto.workstation_names(name), [claim] if claim else [])
    return pki.csr_to_pem(csr)


async def post_renewal(w: World, csr_pem: bytes) -> Any:
    """The renewal request ``client renew`` sends, sent as it is (its answer read here)."""
    body = json.dumps(proto.RenewRequest(csr_pem).to_json()).encode()
    context = client_context(w.rig.state.ca.cert_pem)
    return await asyncio.to_thread(
        request, w.node_address, w.service.bound_port, "POST", proto.RENEW_PATH, context,
        body=body, timeout=10,
    )  # fmt: skip


def test_due_in_the_last_30_percent_of_its_life() -> None:
    ca = pki.CertificateAuthority.create("unit CA")
    key = pki.generate_key()
    cert = ca.issue(key.public_key(), proto.workstation_names(NAME), client=True)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    due = ws_renew.due_at(cert)
    assert abs((due - start) / (end - start) - 0.7) < 1e-6
    assert start < due < end


async def test_not_due_says_when_and_changes_nothing(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    async with world(tmp_path, loopback) as w:
        before = pair(w.settings)
        got = await renew(w, capsys)
        assert got.code == 0, got
        assert got.out.startswith("not due until 20"), got.out
        assert pair(w.settings) == before
        assert len(w.certs()) == 1  # no leader call


async def test_renewed_without_the_password_and_linked_to_the_one_it_renews(
    tmp_path: Path,
    loopback: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
    logs: list[MutableMapping[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with world(tmp_path, loopback) as w:
        old_pem, old_key = pair(w.settings)
        old = pki.load_cert_pem(old_pem)
        crl_before = w.rig.store.revocations()
        got = await renew(w, capsys, "--force")
        assert got.code == 0, got
        assert "renewed   client certificate of ws-empfang-1" in got.out
        # The revocation list with the old one has a number of its own (not urgent: its key
        # is not lost).
        crl = w.rig.store.revocations()
        assert crl.number > crl_before.number, (crl, crl_before)
        assert crl.urgent == crl_before.urgent
        assert "restart the client" in got.out
        new_pem, new_key = pair(w.settings)
        new = pki.load_cert_pem(new_pem)
        assert new_key != old_key and not pki.key_matches(new, pki.load_key_pem(old_key))
        assert pki.key_matches(new, pki.load_key_pem(new_key))
        assert pki.names_of(new).common_name == NAME
        assert (w.settings / "client.key").stat().st_mode & 0o077 == 0
        settings = json.loads((w.settings / "settings.json").read_text())
        assert settings["client_fingerprint"] == pki.fingerprint(new)
        assert settings["bootstrap_port"] == w.service.bound_port
        # The leader's records: the old one revoked as renewed, the new one asked for by the
        # node (its certificate the parent), and the audit trail links the two.
        certs = w.certs()
        old_row, new_row = certs[f"{old.serial_number:x}"], certs[f"{new.serial_number:x}"]
        assert old_row.revoked_at is not None and old_row.revoke_reason == "renewed"
        assert new_row.revoked_at is None and new_row.node == "hb1"
        # ``tlsroll workstations list`` (its admin call): the old one "renewed", the new valid.
        listed = await AdminService.ListWorkstations(
            SimpleNamespace(state=w.rig.state),  # type: ignore[arg-type]
            admin_pb2.ListWorkstationsRequest(),
            None,  # type: ignore[arg-type]
        )
        reasons = {
            i.serial: (i.HasField("revoked_at"), i.revoke_reason) for i in listed.workstations
        }
        assert reasons == {old_row.serial: (True, "renewed"), new_row.serial: (False, "")}
        # Its table (the CLI in-process on that answer): the old row "renewed WHEN", not
        # "revoked" (session 71's note: not tested).
        monkeypatch.setattr(base, "Leader", ListingLeader(listed))
        table = listed_on(monkeypatch, 200, False, "workstations", "list")
        capsys.readouterr()
        rows = {line.split("│")[-2].strip(): line for line in table.splitlines() if "│" in line}
        assert f"│ renewed {w.rig.clock[0]:%Y-%m-%d %H:%M}" in rows[old_row.serial], table
        assert "│ valid " in rows[new_row.serial] and "revoked" not in table, table
        events = w.audit("workstation.renewed")
        assert events == [
            {
                "fingerprint": pki.fingerprint(new),
                "renews": f"{old.serial_number:x}",
                "serial": f"{new.serial_number:x}",
                "superseded": [f"{old.serial_number:x}"],
            }
        ]
        # The node's log says a renewal, once, with the new certificate's fingerprint, and no
        # enrolment (review s71 L6: "bootstrap.enrolled" came first for every renewal).
        said = ("bootstrap.enrolled", "bootstrap.renewed")
        node_said = [e for e in logs if e.get("event") in said]
        assert [e["event"] for e in node_said] == ["bootstrap.renewed"], node_said
        assert node_said[0]["fingerprint"] == pki.fingerprint(new), node_said
        # No key in what was printed or logged.
        everything = got.out + got.err + json.dumps(list(logs), default=str)
        assert b"PRIVATE KEY" not in everything.encode()
        # The old certificate renews nothing more (its renewal's answer was not lost: past
        # the window the leader allows for one).
        w.rig.clock[0] += WITHDRAW_WINDOW + dt.timedelta(seconds=1)
        old_dir = tmp_path / "old-settings"
        write_settings(
            old_dir, w.node_address, w.service.bound_port, w.rig.state.ca.cert_pem, old_pem,
            pki.load_key_pem(old_key),
        )  # fmt: skip
        again = await renew(w, capsys, "--force", settings=old_dir)
        assert again.code == Exit.ENROL_REFUSED, again
        assert "revoked" in again.err and "tlsroll client test-connection" in again.err
        assert pair(old_dir) == (old_pem, old_key)
        assert len(again.err.strip().splitlines()) == 1


async def test_a_renewal_whose_answer_was_lost_is_asked_again_with_the_same_certificate(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    async with world(tmp_path, loopback) as w:
        old_pem, old_key = pair(w.settings)
        old = pki.load_cert_pem(old_pem)
        # A renewal that reaches the leader, whose answer the PC never reads.
        lost_key = pki.generate_key()
        public = lost_key.public_key()
        held = pki.load_key_pem(old_key)
        assert isinstance(held, ec.EllipticCurvePrivateKey)
        claim = bootstrap_csr.reenrolment_extension(public, NAME, previous=(old, held))
        csr = pki.make_csr(lost_key, proto.workstation_names(NAME), [claim] if claim else [])
        body = json.dumps(proto.RenewRequest(pki.csr_to_pem(csr)).to_json()).encode()
        context = client_context(w.rig.state.ca.cert_pem)
        reply = await asyncio.to_thread(
            request, w.node_address, w.service.bound_port, "POST", proto.RENEW_PATH, context,
            body=body, timeout=10,
        )  # fmt: skip
        assert reply.status == 200, reply.body
        lost = pki.load_cert_pem(proto.parse_renew_answer(reply.body).certificate_pem)
        w.rig.clock[0] += WITHDRAW_WINDOW / 2
        got = await renew(w, capsys, "--force")
        assert got.code == 0, got
        certs = w.certs()
        assert certs[f"{lost.serial_number:x}"].revoke_reason == "superseded"
        new = pki.load_cert_pem(pair(w.settings)[0])
        assert certs[f"{new.serial_number:x}"].revoked_at is None
        assert [c.serial for c in certs.values() if c.revoked_at is None] == [
            f"{new.serial_number:x}"
        ]


async def test_after_a_lost_renewal_answer_the_password_enrols_the_pc_again(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A renewal whose answer was lost, asked again too late (past ``WITHDRAW_WINDOW``), is
    refused, and the PC enrols again with the password (``client test-connection``, which
    proves the name with the certificate it holds: the one that renewal revoked). That proof
    counts while the name's live certificate is the one that renewal issued, which nobody
    got: no ``--replace``, at any node (review s71: "taken", the lost renewal held the name).
    A certificate of the name issued since by anything else is not taken so."""
    async with world(tmp_path, loopback) as w:
        held = pair(w.settings)
        reply = await post_renewal(w, proven_csr(pki.generate_key(), held))
        assert reply.status == 200, reply.body
        lost = pki.load_cert_pem(proto.parse_renew_answer(reply.body).certificate_pem)
        w.rig.clock[0] += WITHDRAW_WINDOW + dt.timedelta(seconds=1)
        got = await renew(w, capsys, "--force")
        assert got.code == Exit.ENROL_REFUSED, got
        assert "renewed" in got.err and "never got" in got.err, got.err
        assert "tlsroll client test-connection" in got.err
        assert len(got.err.strip().splitlines()) == 1
        # The password's enrolment (what the node asks the leader once the password is
        # confirmed), proving with the certificate the PC still holds.
        signed = await w.link.sign(proven_csr(pki.generate_key(), held))
        new = pki.load_cert_pem(signed.certificate_pem)
        certs = w.certs()
        assert certs[f"{lost.serial_number:x}"].revoke_reason == "superseded"
        assert [c.serial for c in certs.values() if c.revoked_at is None] == [
            f"{new.serial_number:x}"
        ]
        enrolled = w.audit("workstation.enrolled")[-1]
        assert enrolled["superseded"] == [f"{lost.serial_number:x}"], enrolled
        assert enrolled.get("lost_renewal") is True and "replaced" not in enrolled, enrolled

        # Another name: after its lost renewal, a new PC replaced it on purpose (--replace):
        # the proof of the certificate renewed takes nothing from that one.
        other = "ws-empfang-2"
        key2 = pki.generate_key()
        first = await w.link.sign(proven_csr(key2, name=other))
        held2 = (first.certificate_pem, pki.key_to_pem(key2))
        w.rig.clock[0] += FORCED_RENEWAL_EVERY
        reply = await post_renewal(w, proven_csr(pki.generate_key(), held2, name=other))
        assert reply.status == 200, reply.body
        w.rig.clock[0] += WITHDRAW_WINDOW + dt.timedelta(seconds=1)
        replacing = await w.link.sign(proven_csr(pki.generate_key(), name=other, replace=True))
        with pytest.raises(SignRefused, match="taken"):
            await w.link.sign(proven_csr(pki.generate_key(), held2, name=other))
        live = [c.serial for c in w.certs().values() if c.revoked_at is None]
        replacer = pki.load_cert_pem(replacing.certificate_pem)
        assert f"{replacer.serial_number:x}" in live, live


async def test_a_copy_of_a_renewal_request_renews_nothing(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A renewal request sent again as it was (a copy, within the window a lost answer is
    allowed): its key is certified for the name already, so the leader refuses it. It
    revoked the PC's fresh certificate ("superseded") and issued another for the same key
    (review s71: the PC's next renewal was refused). A PC asking again makes a new key."""
    async with world(tmp_path, loopback) as w:
        csr_pem = proven_csr(key := pki.generate_key(), pair(w.settings))
        reply = await post_renewal(w, csr_pem)
        assert reply.status == 200, reply.body
        cert_pem = proto.parse_renew_answer(reply.body).certificate_pem
        fresh = pki.load_cert_pem(cert_pem)
        w.rig.clock[0] += WITHDRAW_WINDOW / 2
        again = await post_renewal(w, csr_pem)
        assert again.status == 403, again.body
        assert json.loads(again.body)["error"] == "renew_refused"
        assert "certified already" in json.loads(again.body)["message"], again.body
        certs = w.certs()
        assert len(certs) == 2, certs
        assert [c.serial for c in certs.values() if c.revoked_at is None] == [
            f"{fresh.serial_number:x}"
        ]
        # The PC, which got its answer, renews on (a day later: forced).
        w.rig.clock[0] += FORCED_RENEWAL_EVERY
        write_settings(
            w.settings, w.node_address, w.service.bound_port, w.rig.state.ca.cert_pem, cert_pem,
            key,
        )  # fmt: skip
        got = await renew(w, capsys, "--force")
        assert got.code == 0, got


async def test_a_client_pem_the_practice_software_holds_is_replaced_by_the_next_run(
    tmp_path: Path,
    loopback: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a file held open cannot be renamed over (Windows, an SMB share), the new set is
    committed and its client.pem not moved in: the run says so (exit 1, "run this again"),
    and the next run, the file let go, completes the set (the leader holds the new
    certificate: no time limit, no second renewal). README "A workstation's certificate"."""
    async with world(tmp_path, loopback) as w:
        held = w.settings / "client.pem"
        rename = os.replace

        def sharing_violation(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(dst) == held:
                raise PermissionError(13, "The process cannot access the file", str(dst))
            rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", sharing_violation)
        got = await renew(w, capsys, "--force")
        monkeypatch.setattr(os, "replace", rename)
        assert got.code == 1, got
        assert "committed" in got.err and "run this again to finish them" in got.err, got.err
        assert len(got.err.strip().splitlines()) == 1
        live = [c.serial for c in w.certs().values() if c.revoked_at is None]
        assert len(live) == 1 and len(w.certs()) == 2, w.certs()
        again = await renew(w, capsys)
        assert again.code == 0, again
        assert again.out.startswith("settings  an interrupted run's new settings completed in")
        assert "\nnot due until" in again.out, again
        cert_pem, key_pem = pair(w.settings)
        cert = pki.load_cert_pem(cert_pem)
        assert pki.key_matches(cert, pki.load_key_pem(key_pem))
        assert [f"{cert.serial_number:x}"] == live


async def test_a_revoked_certificate_is_not_renewed(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    async with world(tmp_path, loopback) as w:
        before = pair(w.settings)
        w.rig.store.revoke(NAME, reason="lost", now=w.rig.clock[0], actor="test")
        got = await renew(w, capsys, "--force")
        assert got.code == Exit.ENROL_REFUSED, got
        assert "is revoked" in got.err and "tlsroll client test-connection" in got.err
        assert len(got.err.strip().splitlines()) == 1 and "Traceback" not in got.err
        assert pair(w.settings) == before
        assert len(w.certs()) == 1


async def test_the_admin_s_revocation_after_a_renewal_is_not_undone_by_the_old_certificate(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A stolen PC renewed (its thief keeps a copy of the set it renewed from); the admin
    revokes its name: the old certificate, revoked "renewed" minutes ago, must not renew it
    back (the window for a lost answer is no way around the admin's revocation: review s71
    revrenew H1; a thief renewing every few minutes kept the name for good)."""
    async with world(tmp_path, loopback) as w:
        old_pem, old_key = pair(w.settings)
        got = await renew(w, capsys, "--force")
        assert got.code == 0, got
        w.rig.store.revoke(NAME, reason="stolen", now=w.rig.clock[0], actor="test")
        w.rig.clock[0] += WITHDRAW_WINDOW / 2
        old_dir = tmp_path / "old-settings"
        write_settings(
            old_dir, w.node_address, w.service.bound_port, w.rig.state.ca.cert_pem, old_pem,
            pki.load_key_pem(old_key),
        )  # fmt: skip
        again = await renew(w, capsys, "--force", settings=old_dir)
        assert again.code == Exit.ENROL_REFUSED, again
        assert "revoked" in again.err and "tlsroll client test-connection" in again.err
        assert len(again.err.strip().splitlines()) == 1
        assert pair(old_dir) == (old_pem, old_key)
        assert [c.serial for c in w.certs().values() if c.revoked_at is None] == []


async def test_an_ended_certificate_is_refused_before_anything_is_sent(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    async with world(tmp_path, loopback) as w:
        ca = w.rig.state.ca
        key = pki.generate_key()
        ended = ca.issue(
            key.public_key(),
            proto.workstation_names(NAME),
            server=False,
            client=True,
            now=pki.utcnow() - dt.timedelta(days=40),
            lifetime=dt.timedelta(days=30),
        )
        write_settings(
            w.settings, w.node_address, w.service.bound_port, ca.cert_pem,
            pki.cert_to_pem(ended), key,
        )  # fmt: skip
        got = await renew(w, capsys)
        assert got.code == Exit.ENROL_REFUSED, got
        assert "ended" in got.err and "tlsroll client test-connection" in got.err
        assert len(w.certs()) == 1


async def test_a_certificate_the_leader_ended_is_refused_by_it(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The leader's clock past the certificate's end (the PC's clock behind): refused there."""
    async with world(tmp_path, loopback) as w:
        cert = pki.load_cert_pem(pair(w.settings)[0])
        ends = cert.not_valid_after_utc
        with sqlite3.connect(w.db_file) as db:  # (its end, as the leader sees it, past)
            db.execute(
                "UPDATE certificates SET not_after = ? WHERE serial = ?",
                ((w.rig.clock[0] - dt.timedelta(minutes=1)).isoformat(), f"{cert.serial_number:x}"),
            )
        got = await renew(w, capsys, "--force")
        assert got.code == Exit.ENROL_REFUSED, got
        assert "has ended" in got.err and "test-connection" in got.err
        assert pki.load_cert_pem(pair(w.settings)[0]).not_valid_after_utc == ends


async def test_another_clusters_certificate_is_not_renewed(
    tmp_path: Path,
    loopback: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
    logs: list[MutableMapping[str, Any]],
) -> None:
    """A certificate of another CA (or one anybody made for the name), with a proof its own
    key made: the node refuses it without asking the leader (its CA bundle did not issue it),
    so an unauthenticated caller's renewals cost the leader nothing (review s71 revrenew M1:
    each one was a leader call, a write transaction and an unsampled warning there)."""
    async with world(tmp_path, loopback) as w:
        other = pki.CertificateAuthority.create("another cluster")
        key = pki.generate_key()
        cert = other.issue(
            key.public_key(), proto.workstation_names(NAME), server=False, client=True
        )
        write_settings(
            w.settings, w.node_address, w.service.bound_port, w.rig.state.ca.cert_pem,
            pki.cert_to_pem(cert), key,
        )  # fmt: skip
        got = await renew(w, capsys, "--force")
        assert got.code == Exit.ENROL_REFUSED, got
        assert "not one this cluster's CA issued" in got.err, got.err
        assert "tlsroll client test-connection" in got.err
        assert len(got.err.strip().splitlines()) == 1
        assert len(w.certs()) == 1
        assert not [e for e in logs if e.get("event") == "workstation.refused"], logs


async def test_a_node_of_another_cluster_gets_nothing(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The settings' CA is not the node's: the TLS handshake fails, no CSR goes out."""
    async with world(tmp_path, loopback) as w:
        other = pki.CertificateAuthority.create("another cluster")
        write_atomic(w.settings / "ca.pem", other.cert_pem, PUBLIC)
        got = await renew(w, capsys, "--force")
        assert got.code == Exit.UNTRUSTED, got
        assert "not of this PC's cluster" in got.err
        assert len(w.certs()) == 1


async def test_a_csr_without_the_proof_is_refused_at_the_node(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    async with world(tmp_path, loopback) as w:
        csr = pki.make_csr(pki.generate_key(), proto.workstation_names(NAME))
        body = json.dumps(proto.RenewRequest(pki.csr_to_pem(csr)).to_json()).encode()
        context = client_context(w.rig.state.ca.cert_pem)
        reply = await asyncio.to_thread(
            request, w.node_address, w.service.bound_port, "POST", proto.RENEW_PATH, context,
            body=body, timeout=10,
        )  # fmt: skip
        assert reply.status == 422, reply.body
        assert json.loads(reply.body)["error"] == "bad_csr"
        assert len(w.certs()) == 1


async def test_revoking_the_node_s_certificate_takes_the_renewal_it_asked_for(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    async with world(tmp_path, loopback) as w:
        got = await renew(w, capsys, "--force")
        assert got.code == 0, got
        new = pki.load_cert_pem(pair(w.settings)[0])
        node_serial = next(c.serial for c in w.rig.store.list_certificates() if c.kind == "node")
        w.rig.store.revoke(node_serial, reason="stolen", now=w.rig.clock[0], actor="test")
        assert w.certs()[f"{new.serial_number:x}"].revoked_at is not None


async def test_a_forced_renewal_waits_a_day_per_name_and_never_uses_the_node_s_cap(
    tmp_path: Path,
    loopback: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 73: a PC's ``client renew --force`` in a loop used up its node's hourly cap
    (``workstation_certs_per_hour``), and every other PC's enrolment there was refused 429
    for the hour. A renewal is not counted by that cap; a forced one (the certificate not
    due) waits until its certificate is ``FORCED_RENEWAL_EVERY`` old, told when, without
    counting as a PC the cap refused."""
    async with world(tmp_path, loopback) as w:
        w.rig.service.workstation_certs_per_hour = 2
        queued: list[Any] = []
        queue_count = w.rig.store.queue_count

        def counted(*args: Any) -> Any:
            queued.append(args)
            return queue_count(*args)

        monkeypatch.setattr(w.rig.store, "queue_count", counted)
        got = await renew(w, capsys, "--force")
        assert got.code == 0, got
        renewed = pair(w.settings)
        for _ in range(2):  # the loop: held at once, told when, nothing issued
            got = await renew(w, capsys, "--force")
            assert got.code == Exit.ENROL_REFUSED, got
            assert "24 hours old" in got.err and "try again in 86400 s" in got.err, got.err
            assert len(got.err.strip().splitlines()) == 1
            assert pair(w.settings) == renewed
        assert len(w.certs()) == 2
        assert queued == []  # (not kept as a PC the node's cap refused: `schema show`)
        # The node's cap is whole for enrolments: two new PCs within the hour, not a third.
        for name in ("ws-empfang-2", "ws-empfang-3"):
            await w.link.sign(proven_csr(pki.generate_key(), name=name))
        with pytest.raises(SignRefused, match="workstation_certs_per_hour") as refused:
            await w.link.sign(proven_csr(pki.generate_key(), name="ws-empfang-4"))
        assert refused.value.retry is not None
        # A day after the renewal, the next forced one.
        w.rig.clock[0] += FORCED_RENEWAL_EVERY
        got = await renew(w, capsys, "--force")
        assert got.code == 0, got


async def test_a_fleet_due_at_one_minute_renews_whatever_the_node_s_cap(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """PCs set up together come due together (a timer at one minute): renewals of
    certificates within their last 30 % are never held back, neither by the node's hourly
    cap (they counted against it, and the PCs past it were refused 429) nor by the name's
    own budget, and they leave that cap to the enrolments."""
    async with world(tmp_path, loopback) as w:
        fleet = [(pair(w.settings), NAME)]
        for n in range(2, 5):
            key = pki.generate_key()
            name = f"ws-empfang-{n}"
            signed = await w.link.sign(proven_csr(key, name=name))
            fleet.append(((signed.certificate_pem, pki.key_to_pem(key)), name))
        w.rig.service.workstation_certs_per_hour = 1
        w.rig.clock[0] += dt.timedelta(days=300)  # all within their last 30 %
        for held, name in fleet:
            cert = pki.load_cert_pem(held[0])
            assert ws_renew.due_at(cert) <= w.rig.clock[0] < cert.not_valid_after_utc
            reply = await post_renewal(w, proven_csr(pki.generate_key(), held, name=name))
            assert reply.status == 200, reply.body
        await w.link.sign(proven_csr(pki.generate_key(), name="ws-neu"))  # the cap's one
        live = [c for c in w.certs().values() if c.revoked_at is None]
        assert len(live) == 5, live


async def test_a_lost_answer_is_asked_again_a_few_times_then_the_password(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Within the window a lost answer allows, the renewed certificate renews again, but not
    without end (each try revokes the one before: a loop grew the revocation list and, before
    session 73, used up the node's cap): ``RENEWAL_TRIES`` in all, then the password, which
    proves the name with that certificate still (no --replace)."""
    async with world(tmp_path, loopback) as w:
        held = pair(w.settings)
        for _ in range(RENEWAL_TRIES):
            reply = await post_renewal(w, proven_csr(pki.generate_key(), held))
            assert reply.status == 200, reply.body
            w.rig.clock[0] += dt.timedelta(seconds=30)
        reply = await post_renewal(w, proven_csr(pki.generate_key(), held))
        assert reply.status == 403, reply.body
        assert "none of them reached this PC" in json.loads(reply.body)["message"], reply.body
        assert "test-connection" in json.loads(reply.body)["message"], reply.body
        assert len(w.certs()) == 1 + RENEWAL_TRIES
        signed = await w.link.sign(proven_csr(pki.generate_key(), held))
        new = pki.load_cert_pem(signed.certificate_pem)
        assert [c.serial for c in w.certs().values() if c.revoked_at is None] == [
            f"{new.serial_number:x}"
        ]
        assert w.audit("workstation.enrolled")[-1].get("lost_renewal") is True


async def test_a_retry_whose_answer_was_lost_too_leaves_the_name_to_the_password(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Session 71's L: a renewal's answer lost, its retry within the window lost too; past the
    window the PC enrols with the password, proving the certificate both renewed: the live
    one is the retry's, which nobody got either, so the name is this PC's without --replace
    (it was "taken here": --replace at that node). Anything else issued since keeps it."""
    async with world(tmp_path, loopback) as w:
        held = pair(w.settings)
        for _ in range(2):  # the renewal and its retry a minute later, both answers lost
            reply = await post_renewal(w, proven_csr(pki.generate_key(), held))
            assert reply.status == 200, reply.body
            w.rig.clock[0] += dt.timedelta(minutes=1)
        retried = pki.load_cert_pem(proto.parse_renew_answer(reply.body).certificate_pem)
        w.rig.clock[0] += WITHDRAW_WINDOW + dt.timedelta(seconds=1)
        signed = await w.link.sign(proven_csr(pki.generate_key(), held))
        new = pki.load_cert_pem(signed.certificate_pem)
        certs = w.certs()
        assert certs[f"{retried.serial_number:x}"].revoke_reason == "superseded"
        assert [c.serial for c in certs.values() if c.revoked_at is None] == [
            f"{new.serial_number:x}"
        ]
        enrolled = w.audit("workstation.enrolled")[-1]
        assert enrolled.get("lost_renewal") is True and "replaced" not in enrolled, enrolled

        # The retry's certificate delivered and renewed on (a day later): the old proof takes
        # nothing from that PC.
        other = "ws-empfang-2"
        key2 = pki.generate_key()
        first = await w.link.sign(proven_csr(key2, name=other))
        held2 = (first.certificate_pem, pki.key_to_pem(key2))
        w.rig.clock[0] += FORCED_RENEWAL_EVERY
        await post_renewal(w, proven_csr(pki.generate_key(), held2, name=other))
        key3 = pki.generate_key()
        reply = await post_renewal(w, proven_csr(key3, held2, name=other))
        assert reply.status == 200, reply.body
        got = proto.parse_renew_answer(reply.body).certificate_pem
        w.rig.clock[0] += FORCED_RENEWAL_EVERY
        reply = await post_renewal(
            w, proven_csr(pki.generate_key(), (got, pki.key_to_pem(key3)), name=other)
        )
        assert reply.status == 200, reply.body
        with pytest.raises(SignRefused, match="taken"):
            await w.link.sign(proven_csr(pki.generate_key(), held2, name=other))


async def test_a_renewal_the_node_could_not_deliver_is_withdrawn_within_the_window(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A renewal is counted by no hourly cap (``counted_at`` empty): its node's withdrawal of
    it (its crypto worker failed after the signing) is judged by the leader's clock instead,
    within ``WITHDRAW_WINDOW`` as an enrolment's; the PC's retry then renews."""
    async with world(tmp_path, loopback) as w:
        held = pair(w.settings)
        reply = await post_renewal(w, proven_csr(pki.generate_key(), held))
        undelivered = proto.parse_renew_answer(reply.body).certificate_pem
        w.rig.clock[0] += WITHDRAW_WINDOW / 2
        assert await w.link.withdraw(undelivered) is Withdrawal.WITHDRAWN
        serial = f"{pki.load_cert_pem(undelivered).serial_number:x}"
        assert w.certs()[serial].revoke_reason == "never delivered"
        reply = await post_renewal(w, proven_csr(pki.generate_key(), held))
        assert reply.status == 200, reply.body
        late = proto.parse_renew_answer(reply.body).certificate_pem
        w.rig.clock[0] += WITHDRAW_WINDOW + dt.timedelta(seconds=1)
        assert await w.link.withdraw(late) is Withdrawal.HELD
        assert w.certs()[f"{pki.load_cert_pem(late).serial_number:x}"].revoked_at is None


async def test_an_older_agent_s_node_says_to_upgrade_it(
    tmp_path: Path, loopback: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A node whose agent is older than renewals answers 404: exit 8, one line naming the
    upgrade and the password's way, nothing written (session 71's note: not tested)."""
    async with world(tmp_path, loopback, renews=False) as w:
        before = pair(w.settings)
        got = await renew(w, capsys, "--force")
        assert got.code == Exit.BOOTSTRAP_PORT, got  # (8)
        assert "does not renew certificates" in got.err and "upgrade the node's agent" in got.err
        assert "tlsroll client test-connection" in got.err and len(got.err.splitlines()) == 1
        assert pair(w.settings) == before and len(w.certs()) == 1


async def test_an_older_leader_s_unimplemented_says_to_upgrade_it_or_the_password(
    tmp_path: Path,
    loopback: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A leader older than renewals answers the agent's RenewWorkstationCertificate
    UNIMPLEMENTED (the method off its servicer, as such a leader has none): the PC is refused
    in one line, exit 11, saying to upgrade the leader or enrol with the password; nothing
    written (session 71's note: read, not tested)."""
    monkeypatch.delattr(LeaderService, "RenewWorkstationCertificate")
    async with world(tmp_path, loopback) as w:
        before = pair(w.settings)
        got = await renew(w, capsys, "--force")
        assert got.code == Exit.ENROL_REFUSED, got
        assert "leader is too old to renew without the password" in got.err, got.err
        assert "tlsroll client test-connection" in got.err and len(got.err.splitlines()) == 1
        assert pair(w.settings) == before and len(w.certs()) == 1


async def test_refused_renewals_from_one_address_are_slowed_down(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Anybody may send renewals: each refused one counts against its source (never against
    the password's limits), and after a few the node answers 429 before any work."""
    async with world(tmp_path, loopback) as w:
        csr = pki.make_csr(pki.generate_key(), proto.workstation_names(NAME))
        body = json.dumps(proto.RenewRequest(pki.csr_to_pem(csr)).to_json()).encode()
        context = client_context(w.rig.state.ca.cert_pem)
        statuses = []
        for _ in range(7):
            reply = await asyncio.to_thread(
                request, w.node_address, w.service.bound_port, "POST", proto.RENEW_PATH,
                context, body=body, timeout=10,
            )  # fmt: skip
            statuses.append(reply.status)
        assert statuses[0] == 422 and statuses[-1] == 429, statuses
        assert "retry-after" in reply.headers
        assert w.service.guard.wait("127.0.0.1", NAME, w.service.clock()) == 0


def test_the_leader_s_warning_of_a_workstation_names_renew_first() -> None:
    when = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    advice = Expiry("workstation", NAME, "1f", "sha256:x", when, dt.timedelta(days=30)).advice
    assert advice.startswith("run `tlsroll client renew` on that workstation"), advice
    assert advice.index("client renew") < advice.index("client test-connection")
    assert f"tlsroll workstations revoke {NAME}" in advice
