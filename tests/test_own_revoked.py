"""The leader's, the viewer's and the CA's own certificates and `tlsroll ca revoke` (review s63
ops), end to end: a real leader, agent and reference server as processes, real mutual TLS,
the real CLI.

`tlsroll certs check-expiration` lists the leader's serial, and `tlsroll ca revoke` of it said
"no certificate with serial … is on record" (exit 1) and pointed at `--unknown`; with it, the
leader went on serving its revoked certificate (no start issued it again either), the agents
refused each of its commands, and every rollout halted until that certificate ended, a year
on. The CA's own serial was "revoked" as well, for nothing. Now the leader's and the viewer's
certificates are found by serial and issued again at once for a new key, served from then on
(at the latest at the next start: a leader that could not write them shows them `revoked`),
and the CA's serial is refused (exit 2) with what to do instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent.identity import fetch_chain
from tests.cluster import (
    AdminTokenCluster,
    Cluster,
    one_line_error,
    secure_channel,
    wait_until,
)
from tests.conftest import next_loopback
from tests.nodeside import Node, cluster_of, read_only
from tests.test_level_based import password_file
from tlsroll import pki
from tlsroll.defaults import JOIN_PORT, VIEWER_PORT
from tlsroll.v1 import agent_pb2, agent_pb2_grpc

LONG = 180.0


def expiration(cluster: Cluster) -> tuple[int, dict[str, dict[str, Any]]]:
    """`tlsroll certs check-expiration --json`: its exit code and its rows by kind (/subject)."""
    check = cluster.cli("certs", "check-expiration", "--json")
    rows = json.loads(check.stdout)["certificates"]
    return check.returncode, {
        r["kind"] + ("/" + r["subject"] if r.get("subject") else ""): r for r in rows
    }


def serial_of(path: Path) -> str:
    return f"{pki.load_certs_pem(path.read_bytes())[0].serial_number:x}"


def on_https(cluster: Cluster, tmp_path: Path) -> None:
    pw = password_file(tmp_path, "pw", "own-revoked-password-for-the-practice")
    enable = cluster.cli(
        *("rollout", "start", "--scope", "cluster", "--password-file", str(pw), "--yes"),
        "--wait",
        timeout=LONG,
    )
    assert enable.returncode == 0, (enable.stdout, enable.stderr)


def agent_knows_revoked(node: Node, cluster: Cluster, serial: str) -> None:
    """Wait until ``node``'s agent holds a revocation list with ``serial`` in it: from then on
    it refuses every command of that certificate."""
    agent = node.agent
    assert agent is not None
    crl = agent.data_dir / "crl.pem"
    ca = pki.load_cert_pem(cluster.ca_pem)

    def knows() -> bool:
        return crl.exists() and int(serial, 16) in pki.load_crl(crl.read_bytes(), ca)[1]

    wait_until(knows, 30, f"{node.name}'s agent has the revocation of {serial}")


@pytest.mark.timeout(600)
def test_the_leaders_certificate_revoked_is_issued_again_and_rollouts_run(
    tmp_path: Path,
) -> None:
    """The leader's serial as check-expiration lists it is revoked without --unknown (exit 0);
    the leader issues its certificate again for a new key at once and serves it (the join
    port's handshake), logs it, and a rotate-cert rollout on the node completes once its agent
    holds the revocation (it halted on the revoked certificate for a year). The viewer's serial
    likewise."""
    with cluster_of(tmp_path, 1) as (cluster, nodes):
        (node,) = nodes
        on_https(cluster, tmp_path)
        code, rows = expiration(cluster)
        assert code == 0, rows
        leader, viewer = rows["leader"]["serial"], rows["viewer"]["serial"]
        assert leader == serial_of(cluster.tls_cert_path)
        key_before = cluster.tls_key_path.read_bytes()

        # The leader's: found by its serial, revoked, issued again for a new key and served.
        revoked = cluster.cli("ca", "revoke", leader, "--reason", "leader key copied")
        assert (revoked.returncode, revoked.stdout.strip()) == (0, f"revoked {leader}"), revoked
        (row,) = [r for r in cluster.store_table("certificates") if r["serial"] == leader]
        assert row["kind"] == "leader" and row["revoked_at"], row
        now = serial_of(cluster.tls_cert_path)
        assert now != leader
        assert cluster.tls_key_path.read_bytes() != key_before  # a new key, 0600
        assert cluster.tls_key_path.stat().st_mode & 0o777 == 0o600
        assert f"{fetch_chain(cluster.address, JOIN_PORT)[0].serial_number:x}" == now
        (event,) = [
            e
            for e in cluster.leader.log_events()
            if e.get("event") == "leader.certificate_reissued_revoked"
        ]
        assert (event["replaced_serial"], event["serial"]) == (leader, now), event
        code, rows = expiration(cluster)
        assert code == 0 and rows["leader"]["serial"] == now, rows
        assert not rows["leader"].get("revoked"), rows["leader"]

        # The agent refuses the revoked certificate from now on; the leader dials it with the
        # new one, and a rollout on the node runs to its end.
        agent_knows_revoked(node, cluster, leader)
        rotate = cluster.cli(
            *("rollout", "start", "--nodes", "node1", "--change", "rotate-cert"),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert rotate.returncode == 0, (rotate.stdout, rotate.stderr)
        assert cluster.poll_newest_rollout()["state"] == "completed"

        # The viewer's: likewise (it has a key of its own, and issues a new one).
        revoked = cluster.cli("ca", "revoke", viewer)
        assert (revoked.returncode, revoked.stdout.strip()) == (0, f"revoked {viewer}"), revoked
        viewer_pem = cluster.data_dir / "tls" / "viewer.pem"
        assert serial_of(viewer_pem) != viewer
        served = f"{fetch_chain(cluster.address, VIEWER_PORT)[0].serial_number:x}"
        assert served == serial_of(viewer_pem)
        assert serial_of(cluster.tls_cert_path) == now  # the leader's is left as it is
        code, rows = expiration(cluster)
        assert code == 0, rows
        assert cluster.find_secrets(cluster.logs_text()) == []


def test_the_cas_own_serial_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    """The CA's serial (check-expiration lists it) is refused, with and without --unknown: a
    usage error (exit 2) in one line naming `tlsroll ca renew` and docs/ca-renewal.md; nothing
    is recorded, audited or put on the revocation list. So is the serial of a CA certificate a
    `tlsroll ca renew` replaced. Before, it needed --unknown and was "revoked" (exit 0).
    `tlsroll workstations revoke` refuses it too, and the leader's and the viewer's serials
    (exit 2, one line naming `tlsroll ca revoke`): before, it revoked the leader's, which was
    then issued again for a new key (review of s63-o1 L4)."""
    with AdminTokenCluster(tmp_path / "cluster", next_loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        _code, rows = expiration(cluster)
        first = rows["ca"]["serial"]
        renewed = cluster.cli("ca", "renew", "--yes", "--force")
        assert renewed.returncode == 0, renewed
        _code, rows = expiration(cluster)
        current = rows["ca"]["serial"]
        assert current != first
        before = cluster.store_rows(("certificates", "meta", "audit"))
        ca_pem = cluster.ca_pem
        for serial in (current, first):
            for args in ((serial,), ("--unknown", serial)):
                refused = cluster.cli("ca", "revoke", *args)
                assert (refused.returncode, refused.stdout) == (2, ""), refused
                line = one_line_error(refused.stderr, "tlsroll")
                assert f"{serial} is the cluster CA's own certificate" in line, line
                assert "tlsroll ca renew" in line and "docs/ca-renewal.md" in line, line
        leader, viewer = rows["leader"]["serial"], rows["viewer"]["serial"]
        key = cluster.tls_key_path.read_bytes()
        for serial, what in (
            (current, "the cluster CA's own certificate"),
            (first, "the cluster CA's own certificate"),
            (leader, "the leader's own certificate"),
            (viewer, "the viewer's own certificate"),
        ):
            refused = cluster.cli("workstations", "revoke", serial)
            assert (refused.returncode, refused.stdout) == (2, ""), refused
            line = one_line_error(refused.stderr, "tlsroll")
            assert f"{serial} is {what}, not a workstation's" in line, line
            assert "tlsroll ca revoke" in line, line
        assert cluster.store_rows(("certificates", "meta", "audit")) == before
        assert cluster.ca_pem == ca_pem
        assert (serial_of(cluster.tls_cert_path), cluster.tls_key_path.read_bytes()) == (
            leader,
            key,
        )


@pytest.mark.timeout(300)
def test_a_revoked_certificate_not_issued_again_shows_revoked_and_the_start_issues_it(
    tmp_path: Path,
) -> None:
    """While the leader cannot write DATA/tls (a read-only mount), revoking its certificate and
    the viewer's issues nothing: `certs check-expiration` shows both `revoked` (exit 1, the
    advice saying what to look for), and so does `schema show` (its certificates within their
    horizon, review of s63-o1 L2); `ca revoke` says so on stderr (L3); the revocation stands.
    The next start issues both again, for new keys (leader.key and viewer.key written anew,
    0600: L1), and logs it."""
    with cluster_of(tmp_path, 1) as (cluster, _nodes):
        code, rows = expiration(cluster)
        assert code == 0, rows
        leader, viewer = rows["leader"]["serial"], rows["viewer"]["serial"]
        viewer_pem = cluster.data_dir / "tls" / "viewer.pem"
        viewer_key = cluster.data_dir / "tls" / "viewer.key"
        keys = (cluster.tls_key_path.read_bytes(), viewer_key.read_bytes())
        with read_only(cluster.data_dir / "tls"):
            for serial, kind in ((leader, "leader"), (viewer, "viewer")):
                revoked = cluster.cli("ca", "revoke", serial)
                assert (revoked.returncode, revoked.stdout.strip()) == (0, f"revoked {serial}")
                (said,) = revoked.stderr.splitlines()
                assert said.startswith(f"tlsroll: warning: the {kind}'s certificate is revoked")
                assert "could not issue it again" in said, said
            assert (serial_of(cluster.tls_cert_path), serial_of(viewer_pem)) == (leader, viewer)
            code, rows = expiration(cluster)
            assert code == 1, rows
            for kind in ("leader", "viewer"):
                assert rows[kind]["revoked"] is True, rows[kind]
                assert "leader.certificate_revoked_not_reissued" in rows[kind]["advice"]
            table = cluster.cli("certs", "check-expiration")
            assert table.returncode == 1 and table.stdout.count("REVOKED") == 2, table
            assert "2 certificate(s) within their warning horizon, expired or revoked" in (
                table.stderr
            )
            shown = cluster.cli("schema", "show", "--json")
            listed = json.loads(shown.stdout)["expiring_certificates"]
            assert {(c["kind"], c["serial"], c.get("revoked")) for c in listed} == {
                ("leader", leader, True),
                ("viewer", viewer, True),
            }, listed
            shown = cluster.cli("schema", "show")
            assert "certificates within their warning horizon or revoked" in shown.stdout
            assert shown.stdout.count("REVOKED") == 2, shown.stdout
            cluster.stop_leader()
        cluster.start_leader()
        assert serial_of(cluster.tls_cert_path) != leader
        assert serial_of(viewer_pem) != viewer
        for path, before in zip((cluster.tls_key_path, viewer_key), keys, strict=True):
            assert path.read_bytes() != before, path  # a new key
            assert path.stat().st_mode & 0o777 == 0o600, path
        events = {e.get("event"): e for e in cluster.leader.log_events()}
        assert events["leader.certificate_reissued_revoked"]["replaced_serial"] == leader
        # The leader's error line at the revocation said what failed (the file, the errno)
        # and what follows, as the CLI did (review s69 revlogs L4: a bare "[Errno 30] ...").
        failed = events["certificate.revoked_hook_failed"]
        assert "(errno 30, EROFS)" in failed["error"], failed
        assert "the revocation stands" in failed["detail"], failed
        assert "tlsroll certs check-expiration" in failed["detail"], failed
        assert events["viewer.certificate_revoked"]["serial"] == viewer
        code, rows = expiration(cluster)
        assert code == 0 and not rows["leader"].get("revoked"), rows


def _agent_status(node: Any, ca_pem: bytes, chain: bytes, key: bytes) -> grpc.StatusCode:
    """What ``node``'s agent answers ``GetStatus`` called with ``chain`` and ``key``."""
    with secure_channel(node.target, ca_pem, chain, key, name=node.tls_name) as channel:
        try:
            agent_pb2_grpc.NodeAgentStub(channel).GetStatus(
                agent_pb2.GetStatusRequest(), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.timeout(300)
def test_revoking_the_leaders_certificate_revokes_those_it_served_before(tmp_path: Path) -> None:
    """Review of s63-o1 M1: the leader issued its certificate again with the same key (due,
    not usable, its names changed), and `tlsroll ca revoke` of the one served revoked that one
    alone: the one before, of the same key and valid for up to a year, still commanded every
    agent (a key that leaked kept it all). Now each is issued for a new key (leader.key 0600),
    every leader certificate is recorded (init's at the first start, each one as it is
    issued), and revoking the one served revokes every one not ended: an agent refuses the
    one init issued, with its key, once it holds the revocation list; the leader's new one
    commands it. The start's issue logs its serial and the one it replaced."""
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        node1 = cluster.add_agent("node1", next_loopback())
        cluster.wait_for_nodes_online(["node1"])
        first_chain, first_key = cluster.leader_credentials()
        first = serial_of(cluster.tls_cert_path)
        assert _agent_status(node1, cluster.ca_pem, first_chain, first_key) == grpc.StatusCode.OK
        # Its names changed (a DNS name added): the start issues it again.
        cluster.stop_leader()
        cluster.write_leader_config({"dns_names": ["leader-m1.example.test"]})
        cluster.start_leader()
        served = serial_of(cluster.tls_cert_path)
        assert served != first
        assert cluster.tls_key_path.read_bytes() != first_key  # a new key, 0600
        assert cluster.tls_key_path.stat().st_mode & 0o777 == 0o600
        (said,) = [
            e
            for e in cluster.leader.log_events()
            if e.get("event") == "leader.certificate_reissued"
        ]
        assert (said["serial"], said["replaced_serial"]) == (served, first), said
        cluster.wait_for_nodes_online(["node1"])
        revoked = cluster.cli("ca", "revoke", served, "--reason", "leader key copied")
        assert revoked.returncode == 0, revoked
        assert first in revoked.stdout and served in revoked.stdout, revoked.stdout
        crl, ca = node1.data_dir / "crl.pem", pki.load_cert_pem(cluster.ca_pem)
        wait_until(
            lambda: crl.exists() and int(first, 16) in pki.load_crl(crl.read_bytes(), ca)[1],
            30,
            "node1's agent has the revocation of the first certificate",
        )
        refused = _agent_status(node1, cluster.ca_pem, first_chain, first_key)
        assert refused == grpc.StatusCode.UNAUTHENTICATED  # (the old code's: OK)
        wait_until(lambda: serial_of(cluster.tls_cert_path) not in (first, served), 30, "new")
        chain, key = cluster.leader_credentials()
        assert key != first_key
        assert _agent_status(node1, cluster.ca_pem, chain, key) == grpc.StatusCode.OK
