"""Review rev-enrol H1 (session 65): the leader enrolled a key whose certificate it had revoked.
After `tlsroll nodes remove` (the leader's own advice for a copied key) a new token enrolled the
node's old key again, and a token for another name enrolled a revoked key at once: the new
certificate is public (the agent serves it on its NodeAgent port), so whoever held a copy of
the key was the node again. Now a key that a revoked node certificate carries, that a removed
node held, or that another node on record holds, is refused by any token, in one line saying to
enrol with a new key (and the agent says which file to move aside); the refusal spends no use
of the token, so the same token enrols the node's new key. A real leader (and, end to end, a
real agent), real mutual TLS, a real store. And the same review's lows of enrolment: the
re-enrol command `nodes remove` prints (L2), an IPv4 address written as IPv6 (L1), a replay
over the hourly cap (L3).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from nodeagent.runtime import EXIT_ENROLMENT_REFUSED
from tests.cluster import AdminTokenCluster, Cluster, csr_pem, enrol, enrol_request
from tests.conftest import next_loopback
from tlsroll import __version__, pki
from tlsroll.v1 import enrolment_pb2, leader_pb2, leader_pb2_grpc

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def _refused(cluster: Cluster, request: enrolment_pb2.EnrolRequest) -> str:
    """The leader's one line refusing ``request`` (UNAUTHENTICATED, as a token refused)."""
    with pytest.raises(grpc.RpcError) as info:
        enrol(cluster, request)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    said = info.value.details() or ""
    assert "\n" not in said and "Traceback" not in said, said
    assert "enrol the node with a new key" in said, said
    return said


def _nodes(cluster: Cluster) -> dict[str, str]:
    """Each node row's name and whether it is removed (the store as it is)."""
    return {
        r["name"]: "removed" if r["removed_at"] else "enrolled"
        for r in cluster.store_table("nodes")
    }


def _remove(cluster: Cluster, name: str) -> subprocess.CompletedProcess[str]:
    removed = cluster.cli("nodes", "remove", name, "--yes")
    assert removed.returncode == 0, removed.stderr
    return removed


def test_a_removed_node_s_key_is_refused_by_a_new_token_and_the_token_stays_usable(
    cluster: Cluster,
) -> None:
    address = next_loopback()
    key = pki.generate_key()
    enrol(cluster, enrol_request(cluster.create_token("gone", address), "gone", address, key=key))
    _remove(cluster, "gone")
    token = cluster.create_token("gone", address)
    said = _refused(cluster, enrol_request(token, "gone", address, key=key))
    assert "node 'gone'" in said and "removed" in said, said
    # Under another name too, and with a token that names it: the key is the removed node's.
    other = next_loopback()
    said = _refused(
        cluster, enrol_request(cluster.create_token("fresh", other), "fresh", other, key=key)
    )
    assert "node 'gone'" in said, said
    assert _nodes(cluster) == {"gone": "removed"}
    # Nothing was spent: the same token enrols the node with a new key.
    reply = enrol(cluster, enrol_request(token, "gone", address))
    assert pki.spki_pin(pki.load_cert_pem(reply.certificate_pem)) != pki.spki_pin(key.public_key())
    assert _nodes(cluster) == {"gone": "enrolled"}


def test_a_revoked_key_is_refused_after_nodes_remove_and_under_another_name(
    cluster: Cluster,
) -> None:
    address = next_loopback()
    key = pki.generate_key()
    reply = enrol(
        cluster, enrol_request(cluster.create_token("stolen", address), "stolen", address, key=key)
    )
    serial = f"{pki.load_cert_pem(reply.certificate_pem).serial_number:x}"
    done = cluster.cli("ca", "revoke", serial)
    assert done.returncode == 0, done.stderr
    # While the node is on record: a token for another name refuses it too (it did not).
    other = next_loopback()
    said = _refused(
        cluster, enrol_request(cluster.create_token("fresh", other), "fresh", other, key=key)
    )
    assert f"serial {serial}" in said and "revoked" in said, said
    # Its own name: the node is removed first (the refusal says so), its key never again.
    said = _refused(
        cluster, enrol_request(cluster.create_token("stolen", address), "stolen", address, key=key)
    )
    assert "tlsroll nodes remove stolen" in said, said
    _remove(cluster, "stolen")
    _refused(
        cluster, enrol_request(cluster.create_token("stolen", address), "stolen", address, key=key)
    )
    assert _nodes(cluster) == {"stolen": "removed"}


def test_another_node_s_key_is_refused(cluster: Cluster) -> None:
    first, second = next_loopback(), next_loopback()
    key = pki.generate_key()
    enrol(cluster, enrol_request(cluster.create_token("na", first), "na", first, key=key))
    said = _refused(
        cluster, enrol_request(cluster.create_token("nb", second), "nb", second, key=key)
    )
    assert "node 'na'" in said and "enrolled" in said, said
    assert _nodes(cluster) == {"na": "enrolled"}


def test_a_key_a_renewal_replaced_is_refused_once_its_certificate_is_revoked(
    cluster: Cluster,
) -> None:
    """The node's row holds only its key now: its enrolment's key is found through the record
    of the certificates issued (each node certificate's key, ``certificates.key_pin``), and
    refused once removal revoked that one."""
    address = next_loopback()
    first = pki.generate_key()
    reply = enrol(
        cluster, enrol_request(cluster.create_token("n1", address), "n1", address, key=first)
    )
    with cluster.control_channel(reply.certificate_pem, pki.key_to_pem(first)) as channel:
        leader_pb2_grpc.LeaderStub(channel).RenewNodeCertificate(
            leader_pb2.RenewNodeCertificateRequest(
                csr_pem=csr_pem(pki.generate_key(), "n1", [address])
            ),
            timeout=10,
        )
    other = next_loopback()
    # Replaced by a renewal, not revoked: not refused for that (this token is spent on it).
    enrol(cluster, enrol_request(cluster.create_token("n2", other), "n2", other, key=first))
    _remove(cluster, "n2")
    _remove(cluster, "n1")
    said = _refused(
        cluster, enrol_request(cluster.create_token("n3", other), "n3", other, key=first)
    )
    assert "revoked" in said or "removed" in said, said


def _renewal_refused(cluster: Cluster, cert: bytes, key: pki.PrivateKey, csr: bytes) -> str:
    """The leader's one line refusing the renewal ``csr`` by the node of ``cert``."""
    with (
        cluster.control_channel(cert, pki.key_to_pem(key)) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        leader_pb2_grpc.LeaderStub(channel).RenewNodeCertificate(
            leader_pb2.RenewNodeCertificateRequest(csr_pem=csr), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    said = info.value.details() or ""
    assert "\n" not in said and "Traceback" not in said, said
    assert "renew with a new key" in said and "DATA/node.key.new" in said, said
    return said


def test_a_renewal_onto_a_key_no_enrolment_takes_is_refused(cluster: Cluster) -> None:
    """Review s65 follow-up: a renewal asked for any key its CSR proves the caller holds, and
    the leader signed it for the node: a node holding a copy of another node's key, of a
    removed node's, or of a revoked one, became that key under its own name, which no token
    enrols. Refused as an enrolment refuses it (``_key_refused``: the same reasons,
    UNAUTHENTICATED), with a renewal's way on; nothing signed, the node's row as it was, and a
    new key renews."""
    keys = {name: pki.generate_key() for name in ("live", "gone", "cut", "nb")}
    certs: dict[str, bytes] = {}
    for name, key in keys.items():
        address = next_loopback()
        certs[name] = enrol(
            cluster, enrol_request(cluster.create_token(name, address), name, address, key=key)
        ).certificate_pem
    nb_address = address
    _remove(cluster, "gone")
    serial = f"{pki.load_cert_pem(certs['cut']).serial_number:x}"
    done = cluster.cli("ca", "revoke", serial)
    assert done.returncode == 0, done.stderr
    before = (cluster.store_table("nodes"), cluster.store_table("certificates"))
    for other, words in (
        ("live", "this key is node 'live''s, enrolled"),
        ("gone", "this key was node 'gone''s, removed"),
        ("cut", f"node 'cut', serial {serial}) was revoked"),
    ):
        csr = csr_pem(keys[other], "nb", [nb_address])
        said = _renewal_refused(cluster, certs["nb"], keys["nb"], csr)
        assert words in said, said
    assert (cluster.store_table("nodes"), cluster.store_table("certificates")) == before
    with cluster.control_channel(certs["nb"], pki.key_to_pem(keys["nb"])) as channel:
        leader_pb2_grpc.LeaderStub(channel).RenewNodeCertificate(
            leader_pb2.RenewNodeCertificateRequest(
                csr_pem=csr_pem(pki.generate_key(), "nb", [nb_address])
            ),
            timeout=10,
        )


def _as_before_schema_18(cluster: Cluster, *, restart: bool) -> None:
    """Every node certificate on record without its key, as one recorded before schema 18 or
    by an older leader on the migrated store (``leader.db.IGNORABLE``). ``restart``: written
    with the leader stopped, whose start then fills in each one a node's row names
    (``Store.stamp_row_keys``); else under the running leader, so that only the writes' own
    stamps (``_stamp_row_keys``) are tested."""
    if restart:
        cluster.stop_leader()
    with sqlite3.connect(cluster.store_path, timeout=10) as db:
        db.execute("UPDATE certificates SET key_pin = '' WHERE kind = 'node'")
    db.close()
    if restart:
        cluster.start_leader()
    else:
        cluster.notice_store_written()


def test_the_leader_s_start_says_how_many_certificates_got_their_key(cluster: Cluster) -> None:
    """Session 66: the leader's start fills in the key of each node certificate recorded
    without one (``Store.stamp_row_keys``), silently: one info line says how many now
    (``store.keys_stamped``), none when there were none."""
    for name in ("n1", "n2"):
        address = next_loopback()
        enrol(cluster, enrol_request(cluster.create_token(name, address), name, address))

    def said() -> list[int]:
        return [
            e["certificates"]
            for e in cluster.leader.log_events()
            if e.get("event") == "store.keys_stamped"
        ]

    assert said() == []
    _as_before_schema_18(cluster, restart=True)
    assert said() == [2]
    cluster.stop_leader()
    cluster.start_leader()
    assert said() == [2]  # (nothing lacked its key: no line)


@pytest.mark.parametrize("restart", [True, False], ids=["started-since", "running"])
def test_a_removed_key_whose_certificate_had_no_key_stays_refused_after_its_name_enrols(
    cluster: Cluster, restart: bool
) -> None:
    """Review s65 whole, M1: the key of a node whose certificate was recorded with none, removed
    and enrolled again under its name with a new key (as `nodes remove` says), enrolled under
    another name: the enrolment overwrote the removed row's key, the only place it was."""
    address = next_loopback()
    old = pki.generate_key()
    enrol(cluster, enrol_request(cluster.create_token("gone", address), "gone", address, key=old))
    _as_before_schema_18(cluster, restart=restart)
    _remove(cluster, "gone")
    other = next_loopback()
    _refused(cluster, enrol_request(cluster.create_token("fresh", other), "fresh", other, key=old))
    enrol(cluster, enrol_request(cluster.create_token("gone", address), "gone", address))
    said = _refused(
        cluster, enrol_request(cluster.create_token("thief", other), "thief", other, key=old)
    )
    assert "revoked" in said, said
    assert _nodes(cluster) == {"gone": "enrolled"}


@pytest.mark.parametrize("restart", [True, False], ids=["started-since", "running"])
def test_a_revoked_key_a_renewal_replaced_stays_refused_though_recorded_without_it(
    cluster: Cluster, restart: bool
) -> None:
    """Review s65 whole, M2: a node enrolled before schema 18 (its certificate's key not in its
    row) renews after the upgrade; the admin revokes the earlier certificate (its key copied).
    The renewal had replaced the row's key, recorded nowhere: a token for another name enrolled
    it."""
    address = next_loopback()
    first = pki.generate_key()
    reply = enrol(
        cluster, enrol_request(cluster.create_token("n1", address), "n1", address, key=first)
    )
    serial = f"{pki.load_cert_pem(reply.certificate_pem).serial_number:x}"
    _as_before_schema_18(cluster, restart=restart)
    with cluster.control_channel(reply.certificate_pem, pki.key_to_pem(first)) as channel:
        leader_pb2_grpc.LeaderStub(channel).RenewNodeCertificate(
            leader_pb2.RenewNodeCertificateRequest(
                csr_pem=csr_pem(pki.generate_key(), "n1", [address])
            ),
            timeout=10,
        )
    done = cluster.cli("ca", "revoke", serial)
    assert done.returncode == 0, done.stderr
    other = next_loopback()
    said = _refused(
        cluster, enrol_request(cluster.create_token("n2", other), "n2", other, key=first)
    )
    assert serial in said, said
    assert _nodes(cluster) == {"n1": "enrolled"}


def _served_certificate(target: str) -> bytes:
    """The certificate an agent serves on its NodeAgent port: anyone may read it."""
    host, _, port = target.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return pki.cert_to_pem(x509.load_der_x509_certificate(der))


def _heartbeat(cluster: Cluster, cert: bytes, key: bytes) -> grpc.StatusCode:
    with cluster.control_channel(cert, key) as channel:
        try:
            leader_pb2_grpc.LeaderStub(channel).Heartbeat(leader_pb2.HeartbeatRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_node_removed_for_a_copied_key_comes_back_with_a_new_key_only(tmp_path: Path) -> None:
    """End to end, as the leader's advice for a copied key goes (`nodes remove` and enrol it
    again) and README's steps: the agent started again with its old key is refused, one line
    naming the file to move aside; moved, the same token enrols a new key, and the copy of the
    old key, with the certificate the agent serves to anyone, is not the node."""
    with AdminTokenCluster(tmp_path / "c", next_loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        address = next_loopback()
        agent = cluster.add_agent("node2", address, token_file=True)
        cluster.wait_for_nodes_online(["node2"])
        copied_key = agent.key_file.read_bytes()  # the copy (a cloned disk, a backup)
        copied_cert = agent.cert_file.read_bytes()
        assert _heartbeat(cluster, copied_cert, copied_key) == grpc.StatusCode.OK
        removed = _remove(cluster, "node2")
        assert _heartbeat(cluster, copied_cert, copied_key) == grpc.StatusCode.UNAUTHENTICATED
        agent.stop()
        # Enrolled again with the node's old key: node.pem moved aside, a new token.
        os.rename(agent.cert_file, f"{agent.cert_file}.removed")
        token_file = Path(str(agent.config["leader"]["join_token_file"]))
        token_file.write_text(cluster.create_token("node2", address) + "\n")
        code, output = agent.run_to_exit(timeout=60)
        # The key refused for good: not restarted into the same refusal (s66).
        assert code == EXIT_ENROLMENT_REFUSED, output
        lines = [
            line
            for line in output.splitlines()
            if "enrol the node with a new key" in line and "refused" in line
        ]
        assert len(lines) == 1, output[-3000:]
        assert f"mv {agent.key_file} {agent.key_file}.removed" in lines[0], lines[0]
        assert "Traceback" not in output, output[-3000:]
        assert _nodes(cluster) == {"node2": "removed"}
        # The removal's own words said so too (the leader does not know the node's paths).
        said = " ".join(removed.stdout.split())
        assert "with a new key" in said and "mv DATA/node.key DATA/node.key.removed" in said, said
        # As it says: the key moved aside, the agent started again with the same token.
        os.rename(agent.key_file, f"{agent.key_file}.removed")
        agent.start()
        cluster.wait_for_nodes_online(["node2"])
        new_cert = _served_certificate(agent.target)
        assert pki.spki_pin(pki.load_cert_pem(new_cert)) != pki.spki_pin(
            pki.load_cert_pem(copied_cert)
        )
        assert _heartbeat(cluster, new_cert, copied_key) != grpc.StatusCode.OK
        assert _heartbeat(cluster, copied_cert, copied_key) == grpc.StatusCode.UNAUTHENTICATED
        assert cluster.find_secrets(cluster.logs_text()) == []


def test_the_removal_s_token_command_names_the_node_s_dns_names(cluster: Cluster) -> None:
    """Review rev-enrol L2: `nodes remove` printed `tlsroll token create --node N --address A`
    without the node's DNS names, and a token enrols only a node asking for exactly the names it
    names: its agent, whose [node] still lists them, was refused."""
    address, dns = next_loopback(), "node7.example.org"
    enrol(
        cluster,
        enrolment_pb2.EnrolRequest(
            token=cluster.create_token("node7", address, dns=[dns]),
            csr_pem=csr_pem(pki.generate_key(), "node7", [address], [dns]),
            node_name="node7",
            addresses=[address],
            dns_names=[dns],
            agent_version=__version__,
            agent_port=9440,
            names_apart=True,
        ),
    )
    said = " ".join(_remove(cluster, "node7").stdout.split())
    # The README's way (review s71 walkthrough L8): the join script, which writes the token
    # where the agent reads it and keeps agent.toml's [server] table; the key moved aside.
    assert re.findall(r"`([^`]*)`", said)[:4] == [
        f"(umask 077; tlsroll token create --node node7 --address {address} --dns {dns}"
        " --print-join-command > join-node7.sh)",
        "sh join-node7.sh",
        "mv DATA/node.key DATA/node.key.removed",
        "systemctl enable --now tlsroll-agent",
    ], said
    assert "on node7 as root (it keeps agent.toml's [server] table)" in said, said


def test_an_ipv4_address_written_as_ipv6_is_refused_in_one_line(cluster: Cluster) -> None:
    """Review rev-enrol L1: ``::ffff:a.b.c.d`` (and the old ``::a.b.c.d``) passed the name rules
    as a name of its own: a token, and a certificate, for the mapped form of an address another
    node or the leader holds, or of 127.0.0.1. Refused wherever an address is given, saying the
    IPv4 form to give; nothing is made."""
    held = next_loopback()
    enrol(cluster, enrol_request(cluster.create_token("na", held), "na", held))
    tokens = cluster.store_table("tokens")
    for address in (f"::ffff:{held}", f"::ffff:{cluster.address}", "::ffff:127.0.0.1", f"::{held}"):
        made = cluster.cli("token", "create", "--node", "nb", "--address", address)
        assert made.returncode != 0, made.stdout
        line = " ".join(made.stderr.split())
        assert f"'{address}' is the IPv4 address" in line and "written as IPv6" in line, line
        assert "Traceback" not in made.stderr and made.stderr.count("\n") == 1, made.stderr
    # An enrolment naming one, by a token for its IPv4 form: refused before the token is used.
    fresh = next_loopback()
    token = cluster.create_token("nc", fresh)
    with pytest.raises(grpc.RpcError) as info:
        enrol(cluster, enrol_request(token, "nc", f"::ffff:{fresh}"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert f"give it as {fresh}" in (info.value.details() or "")
    assert len(cluster.store_table("tokens")) == len(tokens) + 1  # only nc's token
    enrol(cluster, enrol_request(token, "nc", fresh))  # its use was not spent


def test_a_replay_over_the_hourly_cap_says_when_to_try_again(cluster: Cluster) -> None:
    """Review rev-enrol L3: an enrolment replayed (its answer lost) past the node's certificates
    per hour was RESOURCE_EXHAUSTED with no ``retry-after``, which the agent takes for gRPC's
    own (a request too large: it stopped, saying to check its join token). Now the join port
    says when the hour's cap frees, as its guard does, and the agent waits that long."""
    from leader.store import NODE_CERTS_PER_HOUR
    from nodeagent.identity import LONGEST_TOLD_WAIT, told_wait

    address = next_loopback()
    request = enrol_request(cluster.create_token("busy", address), "busy", address)
    for _ in range(NODE_CERTS_PER_HOUR):  # the enrolment, then its replays (never heard from)
        enrol(cluster, request)
    with pytest.raises(grpc.RpcError) as info:
        enrol(cluster, request)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "certificates issued in the last hour" in (info.value.details() or "")
    trailers: Any = info.value.trailing_metadata()
    said = [v for k, v in trailers or () if k == "retry-after"]
    assert len(said) == 1 and 1 <= int(said[0]) <= 3600, said
    assert told_wait(trailers) == min(int(said[0]), LONGEST_TOLD_WAIT)
