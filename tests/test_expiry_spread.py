"""Review s67 pki: certificates that nothing renews by itself do not all end on one day.

A rotate-cert rollout signs every node's https certificate within minutes, and the practice's
PCs enrol on the morning of the switch: with one lifetime each, they all ended in the same
hour 397 days later, and an end the warnings did not get replaced in time took out every node
(or every PC) at once. Each now lives its lifetime less a random part of 5 % of it, at most 7
days (``pki.spread``): ends over days, never past the lifetime asked."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import grpc

from tests.leader_rig import leader_with_a_node
from tlsroll import bootstrap_protocol, pki
from tlsroll.v1 import leader_pb2, leader_pb2_grpc

DAY = dt.timedelta(days=1)
YEAR = dt.timedelta(days=pki.LEAF_VALIDITY_DAYS)
WEEK = dt.timedelta(days=7)  # ``pki.SPREAD_MAX``


def test_spread_takes_at_most_a_week_and_nothing_from_a_short_life() -> None:
    assert pki.spread(YEAR, 0.0) == YEAR
    assert pki.spread(YEAR, 1.0) == YEAR - pki.SPREAD_MAX  # (5 % of 397 days is more)
    assert pki.spread(30 * DAY, 1.0) == 30 * DAY - 1.5 * DAY  # 5 %
    assert pki.spread(dt.timedelta(seconds=600), 1.0) == dt.timedelta(seconds=600)  # tests'
    for _ in range(200):
        got = pki.spread(YEAR)
        assert YEAR - pki.SPREAD_MAX <= got <= YEAR
        assert got.microseconds == 0  # whole seconds


def ends_spread(ends: list[dt.datetime], now: dt.datetime) -> None:
    """Every end within the lifetime asked and at most ``SPREAD_MAX`` short of it, and the
    ends more than a day apart (16 draws all within one day of the seven: about 1e-12)."""
    assert all(now + YEAR - WEEK <= end <= now + YEAR for end in ends), ends
    assert max(ends) - min(ends) > DAY, ends


def test_a_rollouts_server_certificates_end_over_days() -> None:
    """The nodes' https certificates (``sign_csr``, what a rollout's stage signs), all issued
    at one instant with the leader's ``server_cert_lifetime`` (as ``leader.runtime`` sets it)."""
    ca = pki.CertificateAuthority.create("unit CA")
    ca.csr_lifetime = YEAR
    now = pki.utcnow()
    ends = []
    for i in range(16):
        names = pki.Names.of(f"node{i}", [f"127.0.0.{i + 1}"])
        csr = pki.make_csr(pki.generate_key(), names)
        ends.append(ca.sign_csr(csr, names, now=now).not_valid_after_utc)
    ends_spread(ends, now)


async def test_the_pcs_of_one_morning_end_over_days(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Workstation certificates signed by the real Leader service (on a real mutual-TLS port,
    asked by the node's agent certificate), its clock standing still: 16 PCs at one instant."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            ends = []
            for i in range(16):
                names = bootstrap_protocol.workstation_names(f"ws-pc{i}")
                csr = pki.make_csr(pki.generate_key(), names)
                answer = await stub.SignWorkstationCertificate(
                    leader_pb2.SignWorkstationRequest(csr_pem=pki.csr_to_pem(csr)), timeout=10
                )
                ends.append(pki.load_cert_pem(answer.certificate_pem).not_valid_after_utc)
        ends_spread(ends, rig.clock[0])
    finally:
        await rig.close()
