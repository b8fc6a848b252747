"""The agent dials the leader by the serial of the certificate it serves (review s67 M2), end
to end: a real leader, agent and reference server as processes, real mutual TLS.

The agent's outgoing link checked only the CA and the name ``leader.<td>.invalid``: someone
with a copy of a leader key whose certificate was revoked, and a place on the path, answered
the agent's heartbeats (epochs, ended stages, the refusal of a removed node). The leader's
certificate now also carries ``s<serial>.leader.<td>.invalid`` and its heartbeat answers name
the serial (``leader_serial``); the agent dials that name, and on a link dialed by the generic
name (a revoked leader certificate passes that handshake) takes only lists and the serial.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography import x509
from structlog.testing import capture_logs

from leader import service as leader_service
from leader.observe import observe
from nodeagent import leader_link, nodefiles, service
from nodeagent.failure_log import FailureLog
from nodeagent.trust import EpochNotAnnounced
from tests.cluster import Cluster, wait_until
from tests.leader_rig import InProcessLeader, leader_with_a_node
from tests.nodeside import Node, cluster_of
from tests.test_heartbeat_stream import LONG_RENEW, agent_link, until, viewing_link
from tests.test_own_revoked import agent_knows_revoked, serial_of
from tests.test_perf_shape import channels_opened
from tests.test_plan_over_stream import world
from tlsroll import pki, rpc, spiffe
from tlsroll.defaults import CONTROL_PORT
from tlsroll.errors import TransientError
from tlsroll.rpc import hostport
from tlsroll.v1 import agent_pb2, leader_pb2, leader_pb2_grpc, types_pb2


def pinned(node: Node) -> tuple[str, bool] | None:
    """The agent's DATA/leader.serial.json: the serial it dials and whether it is sticky."""
    assert node.agent is not None
    path = node.agent.data_dir / "leader.serial.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record["serial"], record["announces"]


def agent_pins(node: Node, serial: str) -> None:
    """Wait until ``node``'s agent keeps ``serial`` and dials the leader by it."""
    assert node.agent is not None
    agent = node.agent

    def dials() -> bool:
        return pinned(node) == (serial, True) and any(
            e.get("event") == "leader.dialed" and e.get("serial") == serial
            for e in agent.log_events()
        )

    wait_until(dials, 30, f"{node.name}'s agent dials the leader by {serial}")


def test_the_agent_dials_the_leaders_serial_and_follows_a_new_certificate(
    tmp_path: Path,
) -> None:
    """The leader's certificate carries its serial's name; the agent learns the serial from a
    heartbeat answer, keeps it (0600) and dials it. The leader's certificate revoked and
    issued again: the agent drops the old serial, learns the new one and dials it, and the
    node stays online."""
    with cluster_of(tmp_path, 1) as (cluster, nodes):
        (node,) = nodes
        assert node.agent is not None
        first = serial_of(cluster.tls_cert_path)
        td = spiffe.trust_domain(pki.load_cert_pem(cluster.ca_pem))
        leaf = pki.load_certs_pem(cluster.tls_cert_path.read_bytes())[0]
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(names.get_values_for_type(x509.DNSName)) == {
            spiffe.leader_host(td),
            spiffe.leader_serial_host(td, int(first, 16)),
        }
        agent_pins(node, first)
        mode = (node.agent.data_dir / "leader.serial.json").stat().st_mode & 0o777
        assert mode == 0o600

        revoked = cluster.cli("ca", "revoke", first, "--reason", "leader key copied")
        assert revoked.returncode == 0, revoked
        second = serial_of(cluster.tls_cert_path)
        assert second != first
        agent_knows_revoked(node, cluster, first)
        agent_pins(node, second)
        cluster.wait_for_nodes_online(["node1"], timeout=30)

        # A restarted agent dials the serial it kept at once, and is heard on that link.
        before = len(node.agent.log_events())
        node.agent.stop()
        node.start_agent_heard()
        later = node.agent.log_events()[before:]
        dialed = [e["serial"] for e in later if e.get("event") == "leader.dialed"]
        assert dialed == [second], later
        assert "heartbeat.failed" not in [e.get("event") for e in later], later
        assert cluster.find_secrets(cluster.logs_text()) == []


class RevokedLeader(leader_pb2_grpc.LeaderServicer):
    """A leader in the leader's place with a revoked leader certificate: it refuses the node
    as removed (what an agent obeys by closing its bootstrap service, and says)."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def _refuse(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls += 1
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"node1 {rpc.NOT_ENROLLED}")

    def Heartbeat(
        self, request: leader_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> leader_pb2.HeartbeatResponse:
        self._refuse(context)
        return leader_pb2.HeartbeatResponse()

    def Heartbeats(
        self, request_iterator: Iterator[leader_pb2.HeartbeatRequest], context: grpc.ServicerContext
    ) -> Iterator[leader_pb2.HeartbeatResponse]:
        next(request_iterator, None)
        self._refuse(context)
        yield leader_pb2.HeartbeatResponse()


def serve_revoked(cluster: Cluster, chain: bytes, key: bytes) -> tuple[grpc.Server, RevokedLeader]:
    servicer = RevokedLeader()  # type: ignore[abstract]  # only the heartbeats
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    leader_pb2_grpc.add_LeaderServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(key, chain)])
    server.add_secure_port(hostport(cluster.address, CONTROL_PORT), creds)
    server.start()
    return server, servicer


@pytest.mark.timeout(300)
def test_a_revoked_leader_certificate_in_the_leaders_place_is_not_obeyed(
    tmp_path: Path,
) -> None:
    """A copy of the leader's key and certificate, then revoked (the leader issues another):
    with the leader stopped, a server on its address with the revoked pair refuses the node
    as removed. The agent's dial by the new serial fails the handshake; by the generic name
    it passes, and the refusal is not obeyed (no ``agent.removed_from_cluster``): the agent
    says why (``leader.link_untrusted``). Before, it took the refusal."""
    with cluster_of(tmp_path, 1) as (cluster, nodes):
        (node,) = nodes
        assert node.agent is not None
        agent = node.agent
        first = serial_of(cluster.tls_cert_path)
        chain, key = cluster.leader_credentials()  # the copy
        agent_pins(node, first)
        revoked = cluster.cli("ca", "revoke", first, "--reason", "leader key copied")
        assert revoked.returncode == 0, revoked
        second = serial_of(cluster.tls_cert_path)
        agent_knows_revoked(node, cluster, first)
        agent_pins(node, second)

        cluster.stop_leader()
        server, servicer = serve_revoked(cluster, chain, key)
        try:

            def ignored() -> bool:
                return any(
                    e.get("event") == "leader.link_untrusted" and e.get("ignored") == "removed"
                    for e in agent.log_events()
                )

            wait_until(ignored, 60, "the agent ignores the revoked certificate's refusal")
            assert servicer.calls >= 1
            events = agent.event_names()
            assert "agent.removed_from_cluster" not in events, events
        finally:
            server.stop(None)
        assert cluster.find_secrets(cluster.logs_text()) == []


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"serial": 5, "announces": true}',
        '{"serial": "0x1f", "announces": true}',
        '{"serial": " 1f", "announces": true}',
        '{"serial": "1f"}',
        '{"serial": "1F", "announces": 1}',
    ],
)
def test_a_damaged_serial_record_is_taken_as_no_serial_known_but_announced(
    tmp_path: Path, text: str
) -> None:
    """A record the agent cannot read is refused by ``read_leader_pin`` (ValueError) and taken
    by the link as a leader that announced serials, none known: a generic-name link is not
    trusted until the leader names its serial again (never as an earlier leader's: a holder of
    a revoked leader key on the path would be obeyed until then). s69 (review item 4a): with a
    leader of an earlier release, which names none, that was for good, unsaid how to end it:
    the line says to remove the record (as a downgrade does)."""
    path = nodefiles.leader_pin_path(tmp_path)
    path.write_text(text)
    with pytest.raises(ValueError):
        nodefiles.read_leader_pin(tmp_path)
    with capture_logs() as logs:
        assert leader_link._read_pin(tmp_path) == (None, True)
    [line] = [e for e in logs if e["event"] == "leader.serial_unreadable"]
    assert f"remove {path} and restart the agent" in line["detail"], line


def test_the_serial_record_round_trips(tmp_path: Path) -> None:
    assert nodefiles.read_leader_pin(tmp_path) == (None, False)
    nodefiles.write_leader_pin(tmp_path, 0x1F00A, True)
    path = nodefiles.leader_pin_path(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert nodefiles.read_leader_pin(tmp_path) == (0x1F00A, True)
    nodefiles.write_leader_pin(tmp_path, None, True)
    assert nodefiles.read_leader_pin(tmp_path) == (None, True)


@pytest.mark.parametrize(
    ("kept", "taken"),
    [("5", None), (0, None), (-5, None), (5.0, None), (True, None), (None, None), ([5], None),
     (3601, None), (10**30, None), (1, 1), (3600, 3600)],
)  # fmt: skip
async def test_a_kept_interval_no_leader_could_have_said_is_none_kept(
    tmp_path: Path, loopback: Callable[[], str], kept: object, taken: int | None
) -> None:
    """Session 73 (smalls): the record keeps the leader's interval beside the serial, and a
    restarted agent's first channel PINGs by it. A value no leader's config takes (1-3600 s: a
    damaged or foreign record) is none kept: the first channel is timed by the agent's own
    interval, as before the leader is heard; the serial is read as ever (an earlier agent
    reads the serial and ``announces`` alone: the key is extra to it)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    link, trust, journal = agent_link(tmp_path, rig.node_files, loopback(), loopback(), 2)
    try:
        await link.close()
        record = {"serial": "1f00a", "announces": True, "interval": kept}
        nodefiles.leader_pin_path(link.cfg.data_dir).write_text(json.dumps(record))
        assert nodefiles.read_leader_pin(link.cfg.data_dir) == (0x1F00A, True)
        link = leader_link.LeaderLink(link.cfg, link.identity, trust, journal)  # (restarted)
        assert link.leader_interval == taken
        assert link._ping_interval() == (taken or 2)
        assert link.pin == 0x1F00A and link.announces
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_an_earlier_leader_is_obeyed_as_before_until_a_leader_named_its_serial(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A leader of an earlier release names no serial: an agent that never heard one takes its
    epoch by the generic name, as before (the upgrade). An agent that did (``announces``, kept
    in DATA/leader.serial.json) takes nothing but lists from a generic-name link: the epoch is
    not announced, and a command of it is refused (no downgrade to an older leader)."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    rig.store.advance_epoch(7, now=rig.clock[0], actor="test")
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    (tmp_path / "again").mkdir()
    link2, trust2, journal2 = agent_link(
        tmp_path / "again", rig.node_files, leader_address, node_address
    )
    link2.announces = True  # as read from its record
    try:
        await link.beat()
        assert trust.announced_epoch == 7
        assert (link.pin, link.announces) == (None, False)
        await link2.beat()  # answered: the leader is there
        assert trust2.announced_epoch == 0
        with pytest.raises(EpochNotAnnounced):
            await trust2.admit_epoch(7)
    finally:
        await link.close()
        await link2.close()
        journal.close()
        journal2.close()
        await rig.close()


async def test_a_generic_link_gets_the_held_list_and_a_known_serial_hurries_no_beat(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Closing review of session 67. M2: an agent that announced-serial leaders taught ignores a
    generic-name link's epoch and ended stages, but a request for its revocation list is
    answered there too (the CA's list obeys nothing; a leader rolled back to a revoked
    certificate learns from it that it is revoked, where ignoring the request let it hand the
    agents its own older list after its patience). L1: the serial it already holds, named again
    on that link (the dial by it failed this beat), hurries no beat: beats so hurried ran back to
    back, two dials each."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    link, _trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:
        link.pin, link.announces = 0xABC, True
        await link._take(leader_pb2.HeartbeatResponse(wants_crl=True, epoch=9), None)
        assert link._crl_wanted  # asked for: the next message carries the list
        assert link.trust.announced_epoch == 0  # (the epoch still not taken there)
        link._soon.clear()
        await link._take(leader_pb2.HeartbeatResponse(leader_serial="abc"), None)
        assert not link._soon.is_set()  # the same serial: no hurried beat
        await link._take(leader_pb2.HeartbeatResponse(leader_serial="abd"), None)
        assert link.pin == 0xABD and link._soon.is_set()  # a new one: dialed at once
    finally:
        await link.close()
        journal.close()
        await rig.close()


def slow_reconnects(_max_seconds: float) -> list[tuple[str, int]]:
    """``rpc.reconnect_options`` whose backoff is 20 s from the first failed attempt on."""
    return [
        ("grpc.initial_reconnect_backoff_ms", 20_000),
        ("grpc.min_reconnect_backoff_ms", 20_000),
        ("grpc.max_reconnect_backoff_ms", 20_000),
    ]


async def test_a_restarted_leaders_first_command_is_taken_though_the_pinned_channel_waited(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Project CI of session 67's last HEAD: the leader killed and started again, its first
    command (a finalize's preflight, epoch 2) was refused, "epoch 2 was never announced", and the
    rollout halted. The agent's channel dialed by the leader's serial was waiting out gRPC's
    reconnect backoff from the leader's absence: the agent's epoch question (a heartbeat now)
    failed on it at once (UNAVAILABLE, "Connection refused"), went to the generic name, was
    answered there by the restarted leader, and the epoch, heard on a link the agent does not
    trust, was refused. A channel waiting out its backoff says nothing of the certificate: the
    pin is dialed afresh before the generic name."""
    leader_address, node_address = loopback(), loopback()
    monkeypatch.setattr(leader_link, "reconnect_options", slow_reconnects)
    rig = leader_with_a_node(tmp_path, leader_address, node_address, serial_name=True)
    rig.store.advance_epoch(1, now=rig.clock[0], actor="test")
    await rig.server.start()
    link, trust, journal = agent_link(
        tmp_path, rig.node_files, leader_address, node_address, interval=5
    )
    trust.refresh = link.beat  # as the agent's runtime sets it
    try:
        await link.beat()  # learns the serial
        # The first answer to name a serial is trusted as those before it were (its epoch was
        # ignored, with a warning, at every agent's first beat of the release that pins).
        assert trust.announced_epoch == 1
        await link.beat()  # and dials it
        serial = int(rig.state.leader_serial, 16)
        assert (link._dialed, link.pin, trust.announced_epoch) == (serial, serial, 1)
        await rig.server.stop(None)
        # The leader away: the pinned channel fails to connect and waits out its backoff (the
        # run loop's ``_leader_reachable``), in TRANSIENT_FAILURE until its next attempt (20 s
        # here: ``slow_reconnects``; an agent's grows from 0.5 s to its interval).
        channel = link.channel
        await until(
            lambda: channel.get_state(True) == grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            "the pinned channel failed to reconnect",
        )
        rig.store.advance_epoch(2, now=rig.clock[0], actor="test")
        await rig.restart()
        await trust.admit_epoch(2)  # the restarted leader's first command
        assert trust.announced_epoch == 2
        assert link._dialed == serial  # heard on the pinned link
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_an_epoch_named_by_the_generic_name_of_a_leader_with_a_serial_is_asked_again(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """An epoch a leader that names its serial gave on the generic name's link (the dial by the
    serial failed that beat) is not taken, but a command of it is answered UNAVAILABLE (the
    leader asks again; the next heartbeat dials the serial), not refused: the refusal halted
    the rollout of a leader just restarted. One that names no serial (a leader taken back to
    an earlier release) is still refused."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:
        link.pin, link.announces = 0xABC, True
        await link._take(leader_pb2.HeartbeatResponse(epoch=4), None)
        with pytest.raises(EpochNotAnnounced):
            await trust.admit_epoch(4)
        await link._take(leader_pb2.HeartbeatResponse(epoch=5, leader_serial="abc"), None)
        assert trust.announced_epoch == 0
        with pytest.raises(TransientError, match=r"epoch 5 .* not trust yet") as caught:
            await trust.admit_epoch(5)
        # What the leader is answered (the agent service's map): it asks again.
        mapping = {**rpc.BASE_ERRORS, **service.ERRORS}
        assert rpc.status_for(caught.value, mapping) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(EpochNotAnnounced):  # never named: refused as before
            await trust.admit_epoch(6)
        await link._take(leader_pb2.HeartbeatResponse(epoch=5, leader_serial="abc"), 0xABC)
        await trust.admit_epoch(5)  # heard on the pinned link: taken
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_an_epoch_heard_untrusted_is_refused_once_the_trusted_leader_answered_lower(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Session 69 (s68's open item 1): ``untrusted_epoch`` only rose. An epoch named on the
    generic name's link (someone there, or a leader since replaced: a restore on another host
    while the old process still runs with a certificate the restore did not know of) and never
    by the leader dialed by its serial kept every command of it answered UNAVAILABLE ("the next
    heartbeat dials the leader's serial") after that very heartbeat had been answered by the
    serial with a lower epoch: its sender asked again for ever (a switch or confirm is never
    given up) where the agent knew the leader it trusts had not announced it. A trusted answer
    now supersedes what was heard untrusted; an epoch it names is still taken (s68's case)."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address, serial_name=True)
    rig.store.advance_epoch(1, now=rig.clock[0], actor="test")
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    trust.refresh = link.beat  # as the agent's runtime sets it
    try:
        await link.beat()  # learns the serial
        await link.beat()  # and dials it
        serial = rig.state.leader_serial
        assert link._dialed == int(serial, 16) and trust.announced_epoch == 1
        # Heard on the generic name (a beat whose dials by the serial failed): epoch 5.
        await link._take(leader_pb2.HeartbeatResponse(epoch=5, leader_serial=serial), None)
        assert (trust.announced_epoch, trust.untrusted_epoch) == (1, 5)
        with pytest.raises(EpochNotAnnounced):  # asked by the serial: the leader's is 1
            await trust.admit_epoch(5)
        assert link._dialed == int(serial, 16) and trust.announced_epoch == 1
        # Heard untrusted again, then the leader dialed by its serial names it: taken.
        await link._take(leader_pb2.HeartbeatResponse(epoch=6, leader_serial=serial), None)
        rig.store.advance_epoch(6, now=rig.clock[0], actor="test")
        await trust.admit_epoch(6)
        assert (trust.announced_epoch, trust.untrusted_epoch) == (6, 0)
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_generic_link_is_told_no_failed_password_and_cannot_settle_them(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 69 (s68's open item 3): a heartbeat by the generic name (the dials by the serial
    failed; a holder of a revoked leader key may be answering) carried the failed bootstrap
    passwords (sources, workstation names) and who the managed server had seen, and its answer
    took the failures as reported: the leader never heard of someone guessing the password.
    Now they are left out there and stay pending: the next message, by the serial the answer
    named, carries them, and the leader counts them once."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address, serial_name=True)
    await rig.server.start()
    link, _trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    failures = link.failures = FailureLog()
    now = dt.datetime.now(dt.UTC)
    for _ in range(3):
        failures.record("192.0.2.7", "ws-guess", now)
    seen = types_pb2.ClientSeen(scheme="http", address="192.0.2.9", workstation="ws-a")

    async def view() -> agent_pb2.ServerView:
        return agent_pb2.ServerView(
            driver="reference",
            healthy=True,
            schemes=["http"],
            clients=types_pb2.ClientsView(clients=[seen], window_seconds=3600),
        )

    link.server_view = view
    sent: list[tuple[int | None, leader_pb2.HeartbeatRequest]] = []
    real = link._exchange

    async def exchange(request: leader_pb2.HeartbeatRequest, answer: bool) -> None:
        copy = leader_pb2.HeartbeatRequest()
        copy.CopyFrom(request)
        sent.append((link._dialed, copy))
        await real(request, answer)

    monkeypatch.setattr(link, "_exchange", exchange)
    try:
        link.pin, link.announces = 0xABC, True  # a serial the leader does not serve
        await link.beat()  # by 0xabc twice (refused), then by the generic name
        assert [dialed for dialed, _ in sent] == [0xABC, 0xABC, None]
        generic = sent[-1][1]
        assert not generic.bootstrap_failures and generic.failures_report == 0
        assert not generic.server.HasField("clients") and generic.server.driver == "reference"
        assert sum(f.count for f in failures.pending()) == 3  # not settled there
        assert rig.service.schema.bootstrap_failures() == []
        serial = int(rig.state.leader_serial, 16)
        assert link.pin == serial  # named there
        await link.beat()  # by the serial: told
        dialed, pinned = sent[-1]
        assert dialed == serial and [f.count for f in pinned.bootstrap_failures] == [3]
        assert list(pinned.server.clients.clients) == [seen]
        assert failures.pending() == []
        counts = {r.source: r.count for r in rig.service.schema.bootstrap_failures()}
        assert counts == {"192.0.2.7": 3}
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_link_that_stays_untrusted_sends_only_news_as_any_link(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """s69 (review item 4b): ``_quiet`` keyed the beat in full while the message sent on a link
    the agent does not trust was keyed as it went, without what ``withhold`` leaves out (who
    the server has seen, failed passwords): on a link that stays so (a leader of an earlier
    release after one named its serial, or a damaged record), every beat was news and sent.
    Compared as it would go, a beat that says nothing new waits, and news still goes."""
    monkeypatch.setattr(leader_service, "renew_seconds", lambda _interval: LONG_RENEW)
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)  # names no serial
    rig.state.heartbeat_interval = 1
    await rig.server.start()
    link, _trust, journal, view = viewing_link(
        tmp_path, rig.node_files, leader_address, node_address
    )
    seen = types_pb2.ClientSeen(scheme="http", address="192.0.2.9", workstation="ws-a")
    view.clients.CopyFrom(types_pb2.ClientsView(clients=[seen], window_seconds=3600))
    link.announces = True  # as read from its record: the generic name's link is not trusted
    sent: list[leader_pb2.HeartbeatRequest] = []
    real = link._exchange

    async def exchange(request: leader_pb2.HeartbeatRequest, answer: bool) -> None:
        sent.append(leader_pb2.HeartbeatRequest())
        sent[-1].CopyFrom(request)
        await real(request, answer)

    monkeypatch.setattr(link, "_exchange", exchange)
    try:
        await link.beat()  # the stream opens, in renewal mode
        assert link._stream is not None and link._stream.renew == LONG_RENEW
        assert link._dialed is None and not link._trusts(None)
        assert len(sent) == 1 and not sent[0].server.HasField("clients")  # (withheld)
        for _ in range(3):
            await link.beat(quiet=True)  # nothing new: not sent
        assert len(sent) == 1
        view.healthy, view.detail = False, "connection refused"  # news: sent at once
        await link.beat(quiet=True)
        assert len(sent) == 2 and sent[1].server.detail == "connection refused"
    finally:
        await link.close()
        journal.close()
        await rig.close()


def reissue(rig: InProcessLeader) -> int:
    """The leader's certificate issued again (a restore, a revocation): a new serial, named in
    it and in the heartbeat answers; the old serial's name is in it no more. Served from the
    next ``restart``. The new serial."""
    ca, address = rig.state.ca, rig.target.rsplit(":", 1)[0]
    td = ca.trust_domain
    key, serial = pki.generate_key(), x509.random_serial_number()
    cert = ca.issue(
        key.public_key(),
        pki.Names.of(
            "tlsroll-leader",
            [address],
            [spiffe.leader_host(td), spiffe.leader_serial_host(td, serial)],
        ),
        server=True,
        client=True,
        identity=spiffe.leader(td),
        serial=serial,
    )
    rig.credentials = grpc.ssl_server_credentials(
        [(pki.key_to_pem(key), pki.cert_to_pem(cert))],
        root_certificates=ca.cert_pem,
        require_client_auth=True,
    )
    rig.leader_files = (pki.key_to_pem(key), pki.cert_to_pem(cert))
    rig.state.leader_serial = f"{serial:x}"
    return serial


class LateReader:
    """A stream's call whose reader learns of its end only once ``seen`` is set (its reader
    busy meanwhile: taking a revocation list in the crypto worker, writing the serial's
    record): the rest is the real call's."""

    def __init__(self, call: Any, seen: asyncio.Event) -> None:
        self._call, self._seen = call, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    async def read(self) -> Any:
        try:
            return await self._call.read()
        except grpc.aio.AioRpcError:
            await self._seen.wait()
            raise


async def test_a_pinned_stream_that_ended_unseen_goes_to_the_leaders_new_serial_at_once(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing review of s67, 1: the leader restarted with its certificate issued again (the
    old serial's name in it no more), and the heartbeat's write on the pinned stream saw the
    call done before the stream's reader did (a loaded machine): gRPC's InvalidStateError, a
    TimeoutError of the link's ("the heartbeat stream ended: UNAVAILABLE"), not an AioRpcError,
    and the beat failed without the at-once dials (the pin afresh, then the generic name): the
    leader heard from the node a beat later (and a command's epoch question failed). Now any
    shape of a connection that failed takes them: the beat is answered by the generic name,
    which names the new serial, dialed next."""
    seen = asyncio.Event()
    real = leader_link._Stream

    class Late(real):  # type: ignore[misc,valid-type]
        def __init__(self, call: Any, *rest: Any) -> None:
            super().__init__(LateReader(call, seen), *rest)

    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address, serial_name=True)
    rig.store.advance_epoch(1, now=rig.clock[0], actor="test")
    await rig.server.start()
    link, trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:
        await link.beat()  # learns the serial
        monkeypatch.setattr(leader_link, "_Stream", Late)
        await link.beat()  # and dials it: a new stream (``Late``)
        assert link._dialed == int(rig.state.leader_serial, 16)
        stream = link._stream
        assert stream is not None and isinstance(stream.call, LateReader)
        second = reissue(rig)
        rig.store.advance_epoch(2, now=rig.clock[0], actor="test")
        await rig.restart()
        await until(stream.call.done, "the pinned stream's call ended with the leader's restart")
        assert stream.ended is None  # (its reader has not seen it)
        request = leader_pb2.HeartbeatRequest(agent_version="test")
        async with link._lock:
            await link._exchange_by_pin(request, answer=True)
        assert link.pin == second  # answered by the generic name, which named it
        assert trust.announced_epoch == 1  # (not taken there)
        await link.beat()
        assert (link._dialed, trust.announced_epoch) == (second, 2)
    finally:
        seen.set()
        await link.close()
        journal.close()
        await rig.close()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error as gRPC's asyncio client raises it."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


@pytest.mark.parametrize(
    ("exc", "unreached"),
    [
        (rpc_error(grpc.StatusCode.UNAVAILABLE, "handshake"), True),
        (rpc_error(grpc.StatusCode.INTERNAL, leader_link.GRPC_LOST_STATUS), True),
        (rpc_error(grpc.StatusCode.INTERNAL, "the leader's"), False),
        (rpc_error(grpc.StatusCode.UNAUTHENTICATED, "refused"), False),
        (leader_link.StreamEnded("ended", grpc.StatusCode.UNAVAILABLE), True),
        (leader_link.StreamEnded("ended", leader_link.LOST_STATUS), True),
        (leader_link.StreamEnded("ended", grpc.StatusCode.PERMISSION_DENIED), False),
        (TimeoutError("no reply in time"), False),
    ],
)
def test_which_failures_of_a_pinned_dial_are_made_again_at_once(
    exc: BaseException, unreached: bool
) -> None:
    """``unreached``: what ``_exchange_by_pin`` makes again at once (the pin afresh, then the
    generic name): a connection that failed, however gRPC said it; not a refusal of the
    leader's nor a leader slow to answer (an interval each more under the link's lock)."""
    assert leader_link.unreached(exc) is unreached


async def test_a_planning_question_on_an_untrusted_link_is_asked_over_the_leaders_channel(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing review of s67, 2: the leader's planning question on the heartbeat stream was
    answered on a link dialed by the generic name too (the dial by the pinned serial failed):
    the server's view and the node's problems went to whoever answered there, a revoked leader
    certificate too. Now the agent refuses it there as having no room (``BUSY``), says so
    (``leader.link_untrusted``, once), and the leader asks over its own channel, where the
    agent's service checks the caller's certificate: the plan sees the node as before."""
    opened = channels_opened(monkeypatch)
    asked: list[int] = []
    async with world(tmp_path, loopback, pin=0xABC) as (rig, pool, node):
        assert node.link._dialed is None  # the generic name's (the leader has no 0xabc)
        answer = node.link.answer_check
        assert answer is not None

        async def counted(question: leader_pb2.CheckQuestion) -> leader_pb2.CheckAnswer:
            asked.append(question.id)
            return await answer(question)

        node.link.answer_check = counted
        node.link._drop_stream()
        await node.link.beat()  # a stream that answers with it, by the generic name again
        assert node.link._dialed is None
        with structlog.testing.capture_logs() as events:
            seen = await observe(pool, ["hb1"], rig.state.ca.cert, ask=rig.service.ask_check)
            again = await observe(pool, ["hb1"], rig.state.ca.cert, ask=rig.service.ask_check)
        assert asked == []  # never answered on the stream
        assert opened["hb1"] == 1  # asked over the leader's channel (kept for the second)
        assert seen["hb1"].reachable and seen["hb1"].problems == () and seen == again
        said = [e.get("ignored") for e in events if e["event"] == "leader.link_untrusted"]
        assert said == ["check"], events
        assert all(not b.questions for b in rig.service._open)


async def test_what_an_untrusted_link_said_is_said_ignored_once_each(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """``leader.link_untrusted`` names each thing ignored once (until a trusted answer): the
    epoch and the ended stages were said as one ("epoch,ended_stages"), and an epoch already
    said was said again with the first ended stages."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    link, _trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:
        link.pin, link.announces = 0xABC, True
        with structlog.testing.capture_logs() as events:
            await link._take(leader_pb2.HeartbeatResponse(epoch=9), None)
            await link._take(leader_pb2.HeartbeatResponse(epoch=9, ended_stages=["s1"]), None)
            await link._take(leader_pb2.HeartbeatResponse(epoch=10, ended_stages=["s2"]), None)
        said = [e.get("ignored") for e in events if e["event"] == "leader.link_untrusted"]
        assert said == ["epoch", "ended_stages"], said
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_pinned_beat_the_leader_did_not_answer_in_time_dials_the_pin_again(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 68's leaderpin L2: a pinned beat that failed other than by not reaching the
    leader (no answer in time: a leader slow for a moment) set the next beat to the generic
    name, where no epoch is taken: a command's epoch question in that beat failed. The pin is
    dialed again."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address, serial_name=True)
    await rig.server.start()
    link, _trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:
        await link.beat()  # learns the serial
        await link.beat()  # and dials it
        serial = int(rig.state.leader_serial, 16)
        assert link._dialed == serial
        real = link._exchange

        async def slow(request: leader_pb2.HeartbeatRequest, answer: bool) -> None:
            raise TimeoutError("no reply in time")

        monkeypatch.setattr(link, "_exchange", slow)
        with pytest.raises(TransientError):
            await link.beat()
        monkeypatch.setattr(link, "_exchange", real)
        assert link._want() == serial
        await link.beat()
        assert link._dialed == serial
    finally:
        await link.close()
        journal.close()
        await rig.close()


async def test_a_stream_seen_ended_by_the_write_is_logged_with_its_status(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 68 (leaderpin L3, closing review L2): a heartbeat whose write saw the stream's end
    (``StreamEnded``, UNAVAILABLE: the leader went away) was logged ``heartbeat.failed`` with
    code DEADLINE_EXCEEDED, as a leader that did not answer in time; it says the status now."""
    leader_address, node_address = loopback(), loopback()
    rig = leader_with_a_node(tmp_path, leader_address, node_address)
    link, _trust, journal = agent_link(tmp_path, rig.node_files, leader_address, node_address)
    try:

        async def ended(request: leader_pb2.HeartbeatRequest, answer: bool) -> None:
            raise leader_link.StreamEnded(
                "the heartbeat stream ended: UNAVAILABLE", grpc.StatusCode.UNAVAILABLE
            )

        monkeypatch.setattr(link, "_exchange", ended)
        with capture_logs() as logs, pytest.raises(TransientError):
            await link.beat()
        failed = [e for e in logs if e["event"] == "heartbeat.failed"]
        assert [e["code"] for e in failed] == ["UNAVAILABLE"], logs
    finally:
        await link.close()
        journal.close()
        await rig.close()
