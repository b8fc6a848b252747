"""Review s67 L1: an agent used its revocation list past the list's nextUpdate without a word.
The leader gives its list a new number daily, valid a week, and sends it on every heartbeat
stream: a list past its nextUpdate means the agent lost the leader for days, or someone on its
path withholds the lists (a certificate revoked since is still accepted). Now the agent says
so (``crl.stale``, a warning naming the list's number and age): once, again at most daily
while it stays so. A real agent with a list of the cluster's CA that passes its nextUpdate
seconds after the start; the repeat by ``LeaderTrust.stale_check`` with a clock of its own.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
import structlog.testing

from leader.layout import read_passphrase
from nodeagent import nodefiles
from nodeagent.trust import STALE_REPEAT, LeaderTrust
from tests.cluster import AdminTokenCluster, wait_until
from tests.conftest import next_loopback
from tlsroll import pki

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _trust(tmp_path: Path, number: int, issued: dt.datetime, due: dt.datetime) -> LeaderTrust:
    trust = LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem")
    trust.crl_number, trust.crl_this_update, trust.crl_next_update = number, issued, due
    return trust


def test_a_list_past_its_next_update_is_said_once_and_again_daily(tmp_path: Path) -> None:
    trust = _trust(tmp_path, 41, T0 - pki.CRL_VALIDITY, T0)
    with structlog.testing.capture_logs() as events:
        before = trust.stale_check(T0 - dt.timedelta(seconds=30))
        assert before == 30.0  # woken when it passes
        trust.stale_check(T0 + dt.timedelta(hours=2))
        trust.stale_check(T0 + dt.timedelta(hours=20))  # said 18 hours ago: not again
        trust.stale_check(T0 + dt.timedelta(hours=2) + STALE_REPEAT)  # a day after: again
    said = [e for e in events if e["event"] == "crl.stale"]
    assert len(said) == 2, events
    assert all(e["log_level"] == "warning" and e["number"] == 41 for e in said), said
    assert "number 41, issued 7 days ago" in said[0]["detail"], said[0]
    assert "past its nextUpdate by 2 hours" in said[0]["detail"], said[0]
    assert "by 1 day" in said[1]["detail"], said[1]
    # Another list, past its nextUpdate too: said at once; a fresh one ends it, and one that
    # passes its nextUpdate later is said again.
    with structlog.testing.capture_logs() as events:
        trust.crl_number = 42
        trust.stale_check(T0 + dt.timedelta(hours=27))
        trust.crl_next_update = T0 + dt.timedelta(days=10)
        assert trust.stale_check(T0 + dt.timedelta(hours=28)) == 3600.0  # rechecked hourly
        trust.stale_check(T0 + dt.timedelta(days=10, seconds=1))
    assert [(e["event"], e["number"]) for e in events] == [("crl.stale", 42), ("crl.stale", 42)]


def test_no_list_or_one_without_next_update_is_never_said(tmp_path: Path) -> None:
    trust = LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem")
    with structlog.testing.capture_logs() as events:
        assert trust.stale_check(T0) == 3600.0
    assert events == []


@pytest.mark.timeout(240)
def test_a_real_agent_says_its_list_is_past_its_next_update(tmp_path: Path) -> None:
    """The leader stopped (lost), the agent started again with a list of the cluster's CA whose
    nextUpdate comes seconds later: once it passes, the agent warns once, naming the list."""
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        node1 = cluster.add_agent("node1", next_loopback())
        cluster.wait_for_nodes_online(["node1"])
        node1.stop()
        cluster.stop_leader()
        ca = pki.CertificateAuthority.load(
            cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
        )
        issued = pki.utcnow() - pki.CRL_VALIDITY + dt.timedelta(seconds=15)
        crl = pki.build_crl(ca, 7007, [("5eec", issued)], now=issued)
        assert crl.next_update_utc is not None
        nodefiles.crl_path(node1.data_dir).write_bytes(pki.crl_to_pem(crl))
        node1.start()
        if pki.utcnow() < crl.next_update_utc:  # (a start slower than 15 s under load: no check)
            assert "crl.stale" not in node1.event_names()  # (not past it at the start)
        wait_until(
            lambda: "crl.stale" in node1.event_names(), 60, "the agent says its list is stale"
        )
        (said,) = [e for e in node1.log_events() if e.get("event") == "crl.stale"]
        assert said["level"] == "warning" and said["number"] == 7007, said
        assert "number 7007, issued 7 days ago" in said["detail"], said
        assert said["next_update"] == crl.next_update_utc.isoformat(), said
        assert dt.datetime.fromisoformat(said["timestamp"]) >= crl.next_update_utc, said
        time.sleep(3)  # (the next one is due in a day: not said again meanwhile)
        assert node1.event_names().count("crl.stale") == 1
        node1.stop()
