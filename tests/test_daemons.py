"""The daemons as an administrator runs them: a leader and three agents on their own loopback
addresses, real mutual TLS, the SQLite store; PKI rules of what gets issued; health and
reflection; graceful stop, sd_notify, JSON logs; refusing bad configs and unsafe key files."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import pty
import resource
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nodeagent import certwork, runtime
from tests.cluster import (
    STOP_TIMEOUT,
    Agent,
    Cluster,
    Daemon,
    child_env,
    command,
    health_check,
    one_line_error,
    pem_body_lines,
    secure_channel,
    wait_until,
)
from tests.conftest import next_loopback
from tests.procs import LONG_GRACE_SECONDS, long_grace
from tests.refserver_helper import RefServer, write_toml
from tlsroll import __version__, pki
from tlsroll.defaults import CONTROL_PORT, JOIN_PORT
from tlsroll.errors import PKIError
from tlsroll.httpcheck import port_open
from tlsroll.v1 import agent_pb2, agent_pb2_grpc

GRACE_SECONDS = 10.0  # both daemons' grace period for in-flight calls
NAMES = ["node1", "node2", "node3"]
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A leader and three enrolled agents (node3 reads its token from a 0600 file)."""
    with Cluster(tmp_path_factory.mktemp("three"), next_loopback()) as c:
        c.init()
        c.start_leader()
        agents = [
            c.add_agent(name, next_loopback(), token_file=name == "node3", start=False)
            for name in NAMES
        ]
        for agent in agents:
            agent.spawn()
        for agent in agents:
            agent.wait_ready()
        c.wait_for_nodes_online(NAMES)
        yield c


def get_status(
    agent: Agent, ca_pem: bytes, cert_pem: bytes | None, key_pem: bytes | None
) -> agent_pb2.NodeStatus:
    with secure_channel(agent.target, ca_pem, cert_pem, key_pem, name=agent.tls_name) as channel:
        stub = agent_pb2_grpc.NodeAgentStub(channel)
        reply: agent_pb2.NodeStatus = stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
    return reply


def node_credentials(agent: Agent) -> tuple[bytes, bytes]:
    return agent.cert_file.read_bytes(), agent.key_file.read_bytes()


# --- enrolment and the node list ----------------------------------------------------------------


def test_three_agents_enrol_with_one_time_tokens_and_are_online(three: Cluster) -> None:
    result = three.cli("nodes", "--json")
    assert result.returncode == 0, result.stderr
    nodes = {n["name"]: n for n in json.loads(result.stdout)}
    assert set(nodes) == set(NAMES)
    now = dt.datetime.now(dt.UTC)
    for name in NAMES:
        agent, node = three.agents[name], nodes[name]
        cert = agent.cert()
        assert node["online"] is True
        assert node["addresses"] == [agent.address]
        assert node["agent_version"] == __version__
        assert node["agent_port"] == agent.port
        assert node["cert_fingerprint"] == pki.fingerprint(cert)
        assert node["cert_not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        beat = dt.datetime.fromisoformat(node["last_heartbeat"])
        assert now - dt.timedelta(seconds=30) < beat <= now + dt.timedelta(seconds=5)
    table = three.cli("nodes").stdout
    for name in NAMES:
        (row,) = [line for line in table.splitlines() if f" {name} " in line]
        assert "online" in row and three.agents[name].address in row
    # The fixture made one single-use token per agent, and each has been spent.
    ids = {token.split(".")[0] for token in three.tokens[:3]}
    tokens = three.store_table("tokens")
    assert {t["id"]: t["uses_left"] for t in tokens if t["id"] in ids} == dict.fromkeys(ids, 0)
    assert three.find_secrets(three.logs_text()) == []


def _check_leaf(cert: x509.Certificate, ca: x509.Certificate, name: str, address: str) -> None:
    cert.verify_directly_issued_by(ca)
    # The node's (the leader's) names, apart from the SAN: no TLS client takes the certificate
    # as serving its address (pki.NAMES_OID), only its internal name (spiffe).
    assert pki.names_of(cert) == pki.Names.of(name, [address])
    assert pki.names_apart(cert) == ([address], [])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == []
    assert [d for d in san.get_values_for_type(x509.DNSName) if not d.endswith(".invalid")] == []
    assert pki.serves_names(cert) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=398)
    assert cert.serial_number > 0 and cert.serial_number.bit_length() > 64
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_issued_certificates_follow_the_pki_rules(three: Cluster) -> None:
    ca = pki.read_cert(three.ca_cert_path)
    nodes = three.list_nodes()
    serials = set()
    for name in NAMES:
        agent = three.agents[name]
        cert = agent.cert()
        _check_leaf(cert, ca, name, agent.address)
        enrolled = nodes[name].enrolled_at.ToDatetime(tzinfo=dt.UTC)
        # Backdated for clocks that lag the leader's, and valid now.
        assert cert.not_valid_before_utc <= enrolled - dt.timedelta(minutes=30)
        serials.add(cert.serial_number)
    assert len(serials) == 3
    leader_chain = pki.load_certs_pem(three.tls_cert_path.read_bytes())
    _check_leaf(leader_chain[0], ca, "tlsroll-leader", three.address)
    assert leader_chain[1] == ca
    # The CA itself: P-256, a CA that signs leaves only.
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_key_files_are_private_and_the_ca_key_is_encrypted(three: Cluster) -> None:
    for agent in three.agents.values():
        assert stat.S_IMODE(agent.key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(agent.data_dir.stat().st_mode) & 0o077 == 0
        assert pki.key_matches(agent.cert(), pki.read_key(agent.key_file))
    for secret in (three.ca_key_path, three.tls_key_path, three.passphrase_path):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    pem = three.ca_key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(PKIError, match="passphrase"):
        pki.load_key_pem(pem, None)
    with pytest.raises(PKIError, match="wrong passphrase"):
        pki.load_key_pem(pem, b"not the passphrase")
    key = pki.load_key_pem(pem, three.passphrase_path.read_bytes().strip())
    assert pki.key_matches(pki.read_cert(three.ca_cert_path), key)


def test_node_keys_never_reach_the_leader(three: Cluster) -> None:
    leader_files = b"".join(p.read_bytes() for p in three.data_dir.rglob("*") if p.is_file())
    for agent in three.agents.values():
        for line in pem_body_lines(agent.key_file.read_bytes()):
            assert line.encode() not in leader_files


# --- who may talk to whom ---------------------------------------------------------------------


def test_only_the_leader_may_call_node_agent(three: Cluster) -> None:
    node1, node2 = three.agents["node1"], three.agents["node2"]
    with pytest.raises(grpc.RpcError) as info:
        get_status(node1, three.ca_pem, *node_credentials(node2))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = get_status(node1, three.ca_pem, *three.leader_credentials())
    assert status.node_name == "node1"
    assert status.agent_version == __version__
    assert status.cert_not_after.ToDatetime(tzinfo=dt.UTC) == node1.cert().not_valid_after_utc


def test_agent_port_accepts_only_cluster_certificates(
    three: Cluster, test_ca: pki.CertificateAuthority
) -> None:
    node1 = three.agents["node1"]
    key = pki.generate_key()
    forged = test_ca.issue(
        key.public_key(), pki.Names.of("tlsroll-leader", [three.address]), client=True
    )
    for cert_pem, key_pem in [(pki.cert_to_pem(forged), pki.key_to_pem(key)), (None, None)]:
        with pytest.raises(grpc.RpcError) as info:
            get_status(node1, three.ca_pem, cert_pem, key_pem)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_refused_on_the_agent_port(three: Cluster) -> None:
    node1 = three.agents["node1"]
    with grpc.insecure_channel(node1.target) as channel, pytest.raises(grpc.RpcError) as info:
        agent_pb2_grpc.NodeAgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    received = b""
    with socket.create_connection((node1.address, node1.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    assert b"HTTP/" not in received


def tls_handshake(
    address: str, port: int, versions: tuple[Any, Any], ciphers: str, client: Agent
) -> str:
    """Try a TLS handshake with ``client``'s certificate (the server's is not checked: only the
    protocol matters); the version agreed, or ``"refused"``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(client.cert_file, client.key_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are, on purpose
        ctx.minimum_version, ctx.maximum_version = versions
        ctx.set_ciphers(ciphers)
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((address, port), timeout=5) as raw,
            ctx.wrap_socket(raw) as conn,
        ):
            return str(conn.version())
    except (ssl.SSLError, ConnectionResetError):
        return "refused"


def test_tls_versions_and_ciphers(three: Cluster) -> None:
    """TLS 1.2 and 1.3 only; TLS 1.2 with forward-secret AEAD ciphers only."""
    tls12 = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    node1 = three.agents["node1"]
    tls13 = (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)
    for address, port in [(three.address, 9441), (three.address, 9440), (node1.address, 9442)]:
        for versions, ciphers, expected in [
            (tls12, "ECDHE-ECDSA-AES128-GCM-SHA256", "TLSv1.2"),
            (tls13, "ECDHE-ECDSA-AES128-GCM-SHA256", "TLSv1.3"),
            (tls12, "ECDHE-ECDSA-AES128-SHA", "refused"),  # CBC
            (tls12, "AES128-GCM-SHA256", "refused"),  # no forward secrecy
            (old, "ALL:@SECLEVEL=0", "refused"),
        ]:
            got = tls_handshake(address, port, versions, ciphers, node1)
            assert got == expected, (port, ciphers)


def _channel(three: Cluster, port: str) -> tuple[grpc.Channel, set[str]]:
    """A channel to ``port`` with the credentials it needs, and the services it must offer."""
    node1 = three.agents["node1"]
    if port == "join":
        return three.join_channel(), {"tlsroll.v1.Enrolment"}
    if port == "control":
        return three.control_channel(*node_credentials(node1)), {"tlsroll.v1.Leader"}
    if port == "agent":
        chain, key = three.leader_credentials()
        channel = secure_channel(node1.target, three.ca_pem, chain, key, name=node1.tls_name)
        return channel, {"tlsroll.v1.NodeAgent"}
    return grpc.insecure_channel(f"unix:{three.admin_socket}"), {"tlsroll.v1.Admin"}


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies: Any = stub.ServerReflectionInfo(iter([request]), timeout=5)
    return {s.name for reply in replies for s in reply.list_services_response.service}


@pytest.mark.parametrize("port", ["join", "control", "agent", "admin"])
def test_health_and_reflection(three: Cluster, port: str) -> None:
    channel, services = _channel(three, port)
    mine = {"tlsroll.v1.Enrolment", "tlsroll.v1.Leader", "tlsroll.v1.NodeAgent", "tlsroll.v1.Admin"}
    with channel:
        assert health_check(channel) == SERVING
        for service in services:
            assert health_check(channel, service) == SERVING
        with pytest.raises(grpc.RpcError) as info:
            health_check(channel, "tlsroll.v1.NoSuchService")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        if port != "admin":
            listed = list_services(channel)
            assert services <= listed
            assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
            assert not (mine - services) & listed  # each port serves its own service only


# --- agent restarts ---------------------------------------------------------------------------


def test_stopped_agent_goes_offline_and_comes_back_with_its_identity(three: Cluster) -> None:
    node3 = three.agents["node3"]
    key_before, cert_before = node3.key_file.read_bytes(), node3.cert_file.read_bytes()
    tokens_before = three.store_rows(("tokens",))
    assert node3.stop() == 0
    nodes = three.wait_for_nodes(["node3"], online=False, timeout=15)
    assert nodes["node1"].online and nodes["node2"].online
    (row,) = [ln for ln in three.cli("nodes").stdout.splitlines() if " node3 " in ln]
    assert "offline" in row

    # The second start needs no token: the identity on disk is reused.
    node3.write_config({"leader": {"join_token_file": None, "join_token": None}})
    node3.start()
    nodes = three.wait_for_nodes_online(["node3"], timeout=15)
    assert node3.key_file.read_bytes() == key_before
    assert node3.cert_file.read_bytes() == cert_before
    assert nodes["node3"].cert_fingerprint == pki.fingerprint(node3.cert())
    assert three.store_rows(("tokens",)) == tokens_before
    enrolments = [e for e in three.leader.log_events() if e.get("event") == "enrol.accepted"]
    assert [e["node"] for e in enrolments].count("node3") == 1


def test_agent_refuses_a_key_file_readable_by_others(three: Cluster) -> None:
    node2 = three.agents["node2"]
    assert node2.stop() == 0
    try:
        node2.key_file.chmod(0o644)
        code, output = node2.run_to_exit()
        assert code == 2, output  # a config error, not restarted for ever (s49agentexit)
        line = one_line_error(output, "tlsroll-agent")
        assert str(node2.key_file) in line and "chmod 600" in line
        assert not port_open(node2.address, node2.port)
        assert three.find_secrets(output) == []
    finally:
        node2.key_file.chmod(0o600)
        node2.start()
    three.wait_for_nodes_online(["node2"], timeout=15)


@pytest.mark.parametrize("which", ["node.key", "node.key.new"])
def test_agent_refuses_a_readable_key_before_it_completes_a_renewal(
    three: Cluster, which: str
) -> None:
    """A renewal a crash cut short (node.pem.new waiting) and a key others can read: exit 2
    naming the key, as without the renewal (it exited 1: the renewal's completion read the
    key first and failed on it), and nothing moved or deleted before the exit."""
    node2 = three.agents["node2"]
    assert node2.stop() == 0
    new_cert = node2.data_dir / "node.pem.new"
    new_key = node2.data_dir / "node.key.new"
    key = node2.data_dir / which
    files = [node2.key_file, node2.cert_file, new_cert]
    try:
        new_cert.write_bytes(node2.cert_file.read_bytes())
        if which == "node.key.new":
            pki.write_key(new_key, pki.generate_key())
            files.append(new_key)
        before = {f: f.read_bytes() for f in files}
        key.chmod(0o644)
        code, output = node2.run_to_exit()
        assert code == 2, output
        line = one_line_error(output, "tlsroll-agent")
        assert f"node key: {key} is accessible by others" in line, line
        assert f"chmod 600 {key}" in line, line
        assert {f: f.read_bytes() for f in files} == before
        assert three.find_secrets(output) == []
    finally:
        node2.key_file.chmod(0o600)
        new_cert.unlink(missing_ok=True)
        new_key.unlink(missing_ok=True)
        node2.start()
    three.wait_for_nodes_online(["node2"], timeout=15)


def test_agent_refuses_a_key_that_is_a_fifo_without_reading_it(three: Cluster) -> None:
    """node.key made a FIFO, the memo of the last check there: exit 2 (not a regular file),
    not a start that hangs for ever reading it (the memo's digest read the key before its
    checks)."""
    node2 = three.agents["node2"]
    assert node2.stop() == 0
    assert (node2.data_dir / certwork.MEMO).exists()
    aside = node2.data_dir / "node.key.aside"
    node2.key_file.rename(aside)
    try:
        os.mkfifo(node2.key_file, 0o600)
        code, output = node2.run_to_exit(timeout=30)
        assert code == 2, output
        line = one_line_error(output, "tlsroll-agent")
        assert f"{node2.key_file} is not a regular file (a FIFO)" in line, line
    finally:
        node2.key_file.unlink(missing_ok=True)
        aside.rename(node2.key_file)
        node2.start()
    three.wait_for_nodes_online(["node2"], timeout=15)


def _fifo_in_place_of(path: Path) -> Path | None:
    """``path`` made a FIFO (only root can put one in the data dir); what was there moved
    aside (returned, None if nothing was), for ``_put_back``."""
    aside = None
    if path.exists():
        aside = path.with_name(path.name + ".aside")
        path.rename(aside)
    os.mkfifo(path, 0o600)
    return aside


def _put_back(path: Path, aside: Path | None) -> None:
    if path.is_dir():
        path.rmdir()
    elif path.exists() and not path.is_file():
        path.unlink()
    if aside is not None:
        aside.replace(path)


@pytest.mark.parametrize("name", [certwork.MEMO, "crl.pem"])
def test_agent_passes_over_a_cache_that_is_a_fifo(three: Cluster, name: str) -> None:
    """Review rev50a L2: the memo of the last identity check, or the revocation list the leader
    sent, made a FIFO: the start read it and waited for a writer for ever (never ready, never
    an exit). Both are caches the agent writes itself: now passed over with a warning naming
    the file, and the agent starts and serves. The memo is written again before the agent is
    ready (its child's check); the list is when the leader next sends one (``take_crl``: a
    revocation makes it send one, review rev51d L4)."""
    node2 = three.agents["node2"]
    assert node2.stop() == 0
    path = node2.data_dir / name
    aside = _fifo_in_place_of(path)
    try:
        node2.start(timeout=30)  # before: TimeoutError (killed by wait_ready)
        event = "identity.memo_not_a_file" if name == certwork.MEMO else "crl.unreadable"
        said = [e for e in node2.log_events() if e.get("event") == event]
        assert said, node2.log_text()[-3000:]
        assert f"{path} is not a regular file (a FIFO)" in said[-1]["error"], said
        if name != certwork.MEMO:  # the leader sends a list: written over the FIFO
            revoked = three.cli("ca", "revoke", "--unknown", "5eed51a1")
            assert revoked.returncode == 0, revoked.stderr
            wait_until(
                lambda: stat.S_ISREG(os.stat(path).st_mode), 60, "crl.pem written over the FIFO"
            )
        assert stat.S_ISREG(os.stat(path).st_mode)
        three.wait_for_nodes_online(["node2"], timeout=15)
    finally:
        if node2.running:
            node2.stop()
        _put_back(path, aside)
        node2.start()
    three.wait_for_nodes_online(["node2"], timeout=15)


def test_agent_moves_a_memo_that_is_a_directory_aside_and_says_it_once(three: Cluster) -> None:
    """Session 51's review: the memo of the last identity check made a directory was passed
    over and warned of at every start (the write of the child's answer cannot replace a
    directory). The first start moves it aside (``NAME.not-a-file-TIME``, what it holds kept,
    said with where it went) and writes the memo; the next start says nothing of it."""
    node2 = three.agents["node2"]
    assert node2.stop() == 0
    path = node2.data_dir / certwork.MEMO
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    path.mkdir()
    (path / "left").write_text("an admin's")

    def said() -> list[dict[str, Any]]:
        return [e for e in node2.log_events() if e.get("event") == "identity.memo_not_a_file"]

    def unwritten() -> list[dict[str, Any]]:
        return [e for e in node2.log_events() if e.get("event") == "identity.memo_not_written"]

    before = len(said())
    try:
        node2.start(timeout=30)
        first = said()[before:]
        assert len(first) == 1, first
        assert f"{path} is not a regular file (a directory)" in first[0]["error"], first
        kept = Path(first[0]["kept_as"])
        assert kept.parent == node2.data_dir, kept
        assert kept.name.startswith(f"{certwork.MEMO}.not-a-file-"), kept
        assert (kept / "left").read_text() == "an admin's"
        assert stat.S_ISREG(os.stat(path).st_mode)  # the memo written again
        assert node2.stop() == 0
        node2.start(timeout=30)
        assert said()[before:] == first  # the second start: not a word of it
        assert unwritten() == []
        three.wait_for_nodes_online(["node2"], timeout=15)
    finally:
        if node2.running:
            node2.stop()
        for left in [path, *node2.data_dir.glob(f"{certwork.MEMO}.not-a-file-*")]:
            if left.is_dir():
                shutil.rmtree(left)
        path.unlink(missing_ok=True)
        aside.rename(path)
        node2.start()
    three.wait_for_nodes_online(["node2"], timeout=15)


def test_agent_refuses_a_revocation_list_that_is_a_directory(three: Cluster) -> None:
    """Review rev51d M1: ``DATA/crl.pem`` made a directory was passed over at the start, and
    each list the leader sent failed to be written over it (a rename cannot replace a
    directory): the heartbeat stream was dropped and opened again once a second for ever,
    no list held. The agent writes over it; a directory there is a person's to fix: exit 2
    naming the file and the ``rm -r`` that fixes it, nothing removed, the port never opened."""
    node2 = three.agents["node2"]
    assert node2.stop() == 0
    path = node2.data_dir / "crl.pem"
    aside = None
    if path.exists():
        aside = path.with_name("crl.pem.aside")
        path.rename(aside)
    path.mkdir(0o700)
    try:
        code, output = node2.run_to_exit(timeout=30)  # before: it started (TimeoutExpired)
        assert code == 2, output
        line = one_line_error(output, "tlsroll-agent")
        assert f"{path} is not a regular file (a directory)" in line, line
        assert f"(run: rm -r {path})" in line, line
        assert path.is_dir()
        assert not port_open(node2.address, node2.port)
    finally:
        _put_back(path, aside)
        node2.start()
    three.wait_for_nodes_online(["node2"], timeout=15)


def test_a_revocation_list_that_cannot_be_written_is_held_and_the_stream_kept(
    three: Cluster,
) -> None:
    """Review rev51d M1: a list the leader sent that the agent could not write (here: a
    directory made in its place while the agent runs) raised out of the heartbeat's reader:
    the stream was dropped, the leader sent the list again on the next, and so on once a
    second for ever, no list held. Now the list is held in memory (the agent reports its
    number: the leader sends it no more), said once (``crl.not_kept``), not per list, and
    the stream is kept."""
    node2 = three.agents["node2"]
    path = node2.data_dir / "crl.pem"
    aside = None
    if path.exists():
        aside = path.with_name("crl.pem.aside")
        path.rename(aside)
    path.mkdir(0o700)
    start = len(node2.log_events())

    def since(event: str) -> list[dict[str, Any]]:
        return [e for e in node2.log_events()[start:] if e.get("event") == event]

    try:
        for held, serial in enumerate(("5eed51b1", "5eed51b2")):
            revoked = three.cli("ca", "revoke", "--unknown", serial)
            assert revoked.returncode == 0, revoked.stderr

            def taken(held: int = held) -> bool:
                return len(since("crl.updated")) > held

            wait_until(taken, 60, "the agent holds the new list")
        not_kept = since("crl.not_kept")
        assert len(not_kept) == 1, not_kept
        assert f"{path}" in not_kept[0]["error"], not_kept
        assert since("heartbeat.reply_not_taken") == [], node2.log_text()[-3000:]
        numbers = [e["number"] for e in since("crl.updated")]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers
        assert path.is_dir()
    finally:
        node2.stop()
        _put_back(path, aside)
        node2.start()
    three.wait_for_nodes_online(["node2"], timeout=15)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_agent_refuses_a_ca_refusal_record_that_is_not_a_file(three: Cluster, kind: str) -> None:
    """Review rev50a L2: ``DATA/ca.refused`` (the record of a renewed CA certificate the node
    refused, read at each start) made a FIFO hung the start for ever; a directory was passed
    over (its unlink failed), and every refusal after it went unrecorded. Not a cache: a config
    error (exit 2) naming the file and the ``rm`` that fixes it, nothing read or removed, the
    port never opened."""
    node2 = three.agents["node2"]
    assert node2.stop() == 0
    path = node2.data_dir / "ca.refused"
    assert not path.exists()
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.mkdir(0o700)
    try:
        code, output = node2.run_to_exit(timeout=30)  # before (FIFO): TimeoutExpired
        assert code == 2, output
        line = one_line_error(output, "tlsroll-agent")
        what = "a FIFO" if kind == "fifo" else "a directory"
        assert f"{path} is not a regular file ({what})" in line, line
        assert f"(run: {'rm' if kind == 'fifo' else 'rm -r'} {path})" in line, line
        assert path.exists() and not path.is_file()
        assert not port_open(node2.address, node2.port)
    finally:
        _put_back(path, None)
        node2.start()
    three.wait_for_nodes_online(["node2"], timeout=15)


def test_a_damaged_journal_stops_the_agent_with_one_line(three: Cluster) -> None:
    """Random bytes where the journal was: one line naming the file, exit 4 (needs a person:
    the unit does not restart it), no traceback (a corrupt store used to end the agent with a
    Python traceback)."""
    node3 = three.agents["node3"]
    assert node3.stop() == 0
    journal = node3.data_dir / "journal.sqlite3"
    good = journal.read_bytes()
    try:
        for suffix in ("-wal", "-shm"):
            journal.with_name(journal.name + suffix).unlink(missing_ok=True)
        journal.write_bytes(b"\x00not a database\x17" * 512)
        code, output = node3.run_to_exit()
        assert code == 4, output
        line = one_line_error(output, "tlsroll-agent")
        assert line.startswith(f"tlsroll-agent: journal {journal}: "), line
        assert "Traceback" not in output
    finally:
        journal.write_bytes(good)
        node3.start()
    three.wait_for_nodes_online(["node3"], timeout=15)


def test_agent_refuses_a_token_file_readable_by_others(three: Cluster) -> None:
    agent = three.add_agent("node4", next_loopback(), token_file=True, start=False)
    token_file = Path(str(agent.config["leader"]["join_token_file"]))
    token_file.chmod(0o640)
    # The running agents' heartbeat records aside (every column ``Store._heartbeat_sql``
    # writes): the leader stores them with its group commit, a second after they came (an
    # agent restarted by the test before says when it means to renew anew). The agents' first
    # records bring their features: run alone, this test came before those reached the file.
    soft = [
        "last_heartbeat",
        "agent_version",
        "agent_features",
        "highest_epoch",
        "renewal_due_at",
        "renewal_failing_since",
        "renewal_error",
    ]
    before = three.store_rows(ignore=soft)
    code, output = agent.run_to_exit()
    assert code == 2, output  # a config error, not restarted for ever (s49agentexit)
    line = one_line_error(output, "tlsroll-agent")
    assert str(token_file) in line and "chmod 600" in line
    after = three.store_rows(ignore=soft)
    assert after == before
    assert "node4" not in {row[0] for row in after["nodes"]}
    assert three.find_secrets(output) == []


# --- stopping, sd_notify, logs ----------------------------------------------------------------


def notify_socket(address: str) -> socket.socket:
    """A datagram socket to stand in for systemd's NOTIFY_SOCKET (``@name``: abstract)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(20)
    return sock


def stop_within_grace(daemon: Any, sig: signal.Signals = signal.SIGTERM) -> None:
    """A graceful stop that nothing held up: ``daemon`` was started with ``long_grace()`` (its
    grace periods an hour), so a stop that ends within the test's bound (``STOP_TIMEOUT``) ended
    because no call, stream or task held it, not because a grace ran out. (Timed against the
    10 s grace before, "stopped in under 10 s": a loaded machine could fail that, and a stop
    that waited out its 5 s tail grace passed it.) Nor did a task outlive its patience.

    The stretch is checked to have reached the daemon: its ``*.stopping`` event says the grace
    it stops with, an hour. Without it, a hook that stopped matching the daemon's command line
    left the 10 s grace in place and every stop still passed: this check lost its power
    unseen (review rvb L4)."""
    assert daemon.stop(sig, timeout=STOP_TIMEOUT) == 0
    events = daemon.log_events()
    names = [e.get("event") for e in events]
    assert "agent.task_would_not_stop" not in names, names
    graces = [
        e["grace_seconds"]
        for e in events
        if str(e.get("event")).endswith(".stopping") and "grace_seconds" in e
    ]
    assert graces == [LONG_GRACE_SECONDS], graces


def assert_json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        event = json.loads(line)  # every line, not just most of them
        assert isinstance(event, dict)
        assert {"event", "level", "timestamp"} <= set(event), event
        assert str(event["timestamp"]).endswith("Z")
        events.append(event)
    return events


FORGED_SNI = 'x\n<3>{"event": "forged.line", "by": "anyone"}'
"""A server name with a line of its own: a journald line at error, were it written raw."""


def sni_hello(address: str, port: int, server_name: str) -> None:
    """A TLS hello to ``address:port`` naming ``server_name`` (no certificate: what anyone who
    reaches the port can send), the handshake taken as far as the daemon lets it go."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        contextlib.suppress(OSError),
        socket.create_connection((address, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.settimeout(2)
        tls.recv(100)


def past_enrolment_waits(sock: socket.socket) -> bytes:
    """The agent's next message to its service manager, past those it sends while its
    enrolment waits (a start-timeout extension and a status line: ``nodeagent.runtime``)."""
    while True:
        message = sock.recv(4096)
        lines = message.split(b"\n")
        if not all(line.startswith((b"EXTEND_TIMEOUT_USEC=", b"STATUS=")) for line in lines):
            return message


def test_graceful_stop_sd_notify_and_json_logs_even_after_failed_handshakes(
    tmp_path: Path,
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="tlsroll-notify-"))
    leader_notify = notify_socket(str(sock_dir / "notify"))
    agent_address = f"@tlsroll-test-{os.getpid()}-{time.monotonic_ns()}"
    agent_notify = notify_socket(agent_address)
    try:
        with Cluster(tmp_path, next_loopback()) as c:
            c.init()
            c.leader.spawn({"NOTIFY_SOCKET": str(sock_dir / "notify"), **long_grace()})
            assert leader_notify.recv(4096) == b"READY=1"
            assert c.list_nodes() == {}  # READY=1 means it answers, at once
            agent = c.add_agent("node1", next_loopback(), start=False)
            agent.spawn({"NOTIFY_SOCKET": agent_address, **long_grace()})
            assert past_enrolment_waits(agent_notify) == b"READY=1"
            assert port_open(agent.address, agent.port)
            c.wait_for_nodes_online(["node1"])
            # gRPC's C core would log each failed TLS handshake on stderr, past structlog:
            # plaintext knocking on every port must leave the leader's and agent's logs pure
            # JSON lines (checked below; a test of its own before, with a cluster of its own).
            # And a TLS hello whose server name holds a line of the peer's choosing: gRPC's
            # core logged "No match found for server name: <SNI>" at ERROR, raw, a forged
            # journald line among it (review s66 logs H1).
            for address, port in (
                (c.address, JOIN_PORT),
                (c.address, CONTROL_PORT),
                (agent.address, agent.port),
            ):
                with socket.create_connection((address, port), timeout=5) as raw:
                    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    raw.settimeout(2)
                    with contextlib.suppress(OSError):
                        raw.recv(100)
                sni_hello(address, port, FORGED_SNI)
            c.wait_for_nodes_online(["node1"])  # a later, good call still works

            stop_within_grace(agent)
            assert agent_notify.recv(4096) == b"STOPPING=1"
            names = agent.event_names()
            assert names.index("agent.stopping") < names.index("agent.stopped") == len(names) - 1

            stop_within_grace(c.leader)
            assert leader_notify.recv(4096) == b"STOPPING=1"
            names = c.leader.event_names()
            assert names.index("leader.stopping") < names.index("leader.stopped")
            assert names[-1] == "leader.stopped"

            # Not a TTY: every line of both logs is a JSON event, none the peer's.
            leader_events = assert_json_lines(c.leader.log_text())
            agent_events = assert_json_lines(agent.log_text())
            forged = [e for e in leader_events + agent_events if e["event"] == "forged.line"]
            assert forged == []
            (started,) = [e for e in leader_events if e["event"] == "leader.started"]
            assert started["ca_pin"] == c.ca_pin()
            assert c.find_secrets(c.logs_text()) == []
    finally:
        leader_notify.close()
        agent_notify.close()
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


def test_watchdog_pings_while_the_loop_lives(tmp_path: Path) -> None:
    """With WatchdogSec= (WATCHDOG_USEC) the leader keeps sending WATCHDOG=1, at half the
    interval, after READY=1; without it the daemon sends none (the test above)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="tlsroll-wd-"))
    notify = notify_socket(str(sock_dir / "notify"))
    try:
        with Cluster(tmp_path, next_loopback()) as c:
            c.init()
            c.leader.spawn(
                {
                    "NOTIFY_SOCKET": str(sock_dir / "notify"),
                    "WATCHDOG_USEC": "400000",
                    **long_grace(),
                }
            )
            assert notify.recv(4096) == b"READY=1"
            pings = [notify.recv(4096) for _ in range(3)]  # 3 pings within the 20 s timeout
            assert pings == [b"WATCHDOG=1"] * 3
            stop_within_grace(c.leader)
    finally:
        notify.close()
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


def test_a_second_leader_does_not_steal_the_first_ones_ports_or_socket_and_sigint_stops_it(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, next_loopback()) as c:
        c.init()
        c.start_leader(long_grace())
        twin = Daemon("twin", c.leader.argv, tmp_path / "twin.log", lambda: False)
        code, output = twin.run_to_exit()
        assert code == 1
        # One line: the admin socket answers, checked before the start touches anything (its
        # ports are probed later, before gRPC binds them: tests/test_ops.py).
        line = one_line_error(output, "tlsroll-leader")
        assert "another tlsroll-leader is running" in line, line
        # Same data dir on another address: the ports are free, the admin socket is not.
        other = write_toml(
            tmp_path / "other.toml",
            {"leader": {**c.leader_config(), "address": next_loopback()}},
        )
        twin.argv = [*c.leader.argv[:-1], str(other)]
        code, output = twin.run_to_exit()
        assert code == 1
        line = one_line_error(output, "tlsroll-leader")
        assert "another tlsroll-leader is running" in line
        assert c.leader.running
        assert c.list_nodes() == {}  # the first leader still owns its admin socket
        assert c.cli("token", "list").returncode == 0

        # The leader stops on SIGINT (a test of its own before, with a cluster of its own).
        stop_within_grace(c.leader, signal.SIGINT)
        assert c.leader.event_names()[-1] == "leader.stopped"
        assert not port_open(c.address, 9440)


def test_logs_are_for_humans_on_a_tty(tmp_path: Path) -> None:
    with Cluster(tmp_path, next_loopback()) as c:
        c.init()
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            c.leader.argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=child_env()
        )
        os.close(slave)
        output = b""
        try:
            deadline = time.monotonic() + 20
            while b"leader.started" not in output and time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        output += os.read(master, 65536)
                    except OSError:  # EIO: the child closed the terminal
                        break
        finally:
            proc.terminate()
            proc.wait(GRACE_SECONDS + 5)
            os.close(master)
        text = output.decode(errors="replace")
        (line,) = [ln for ln in text.splitlines() if "leader.started" in ln]
        with pytest.raises(ValueError):
            json.loads(line)
        assert "\x1b[" in line  # colours for a human


_ONE_WRITE_PER_EVENT = """
import io, json, sys

class Counting(io.StringIO):
    writes = 0

    def write(self, s):
        Counting.writes += 1
        return super().write(s)

real, err = sys.stderr, Counting()
sys.stderr = err
from tlsroll import logs
logs.configure(json=True)
log = logs.get_logger("tlsroll.check")
log.info("check.one", n=1)
log.warning("check.two")
sys.stderr = real
print(json.dumps([Counting.writes, err.getvalue()]))
"""


def test_each_log_event_is_one_write_of_its_line() -> None:
    """Issue 15: every daemon's log events went out with print, two writes (two system calls
    on the unbuffered stderr) per line; the line and its newline are one write now (a
    switch logs in the agent and in the server it freezes, inside the freeze window)."""
    result = subprocess.run(
        [sys.executable, "-c", _ONE_WRITE_PER_EVENT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    writes, text = json.loads(result.stdout)
    lines = text.splitlines(keepends=True)
    assert [json.loads(line)["event"] for line in lines] == ["check.one", "check.two"]
    assert all(line.endswith("\n") for line in lines)
    assert writes == len(lines)


@pytest.mark.parametrize(
    ("script", "module"),
    [("tlsroll-leader", "leader.daemon"), ("tlsroll-agent", "nodeagent.daemon")],
)
def test_version(script: str, module: str) -> None:
    result = subprocess.run(
        [*command(script, module), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"{script} {__version__}"


# --- bad config and unsafe files ----------------------------------------------------------------

AGENT_CONFIG: dict[str, dict[str, object]] = {
    "node": {"name": "node1", "addresses": ["127.0.0.1"]},
    "leader": {"address": "127.0.0.1", "ca_pin": "sha256:" + "ab" * 32, "join_token": "x"},
    "agent": {"data_dir": "data"},
}


def leader_config(tmp_path: Path) -> dict[str, dict[str, object]]:
    return {"leader": {"address": "127.0.0.2", "data_dir": str(tmp_path / "data")}}


@pytest.mark.parametrize(
    ("table", "key", "value", "problem"),
    [
        ("node", "name", None, "missing"),
        ("node", "addresses", "127.0.0.1", "expected a list, got string"),
        ("node", "addresses", [1], "expected a string, got integer"),
        ("leader", "ca_pin", 42, "expected a string, got integer"),
        ("leader", "address", None, "missing"),
        ("agent", "heartbeat_interval", 1.5, "expected an integer, got float"),
        ("agent", "port", True, "expected an integer, got boolean"),
        ("agent", "data_dir", None, "missing"),
    ],
)
def test_agent_config_errors_name_the_file_and_key(
    tmp_path: Path, table: str, key: str, value: object, problem: str
) -> None:
    config = {t: dict(v) for t, v in AGENT_CONFIG.items()}
    config[table][key] = value
    path = write_toml(tmp_path / "agent.toml", config)
    result = subprocess.run(
        [*command("tlsroll-agent", "nodeagent.daemon"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    line = one_line_error(result.stderr, "tlsroll-agent")
    assert f"{path}: [{table}].{key}" in line and problem in line
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("address", None, "missing"),
        ("data_dir", None, "missing"),
        ("control_port", "9440", "expected an integer, got string"),
        ("heartbeat_interval", True, "expected an integer, got boolean"),
        ("dns_names", "leader.example", "expected a list, got string"),
        ("address", "not-an-ip", "is not an IP address"),
    ],
)
def test_leader_config_errors_name_the_file_and_key(
    tmp_path: Path, key: str, value: object, problem: str
) -> None:
    config = leader_config(tmp_path)
    config["leader"][key] = value
    path = write_toml(tmp_path / "leader.toml", config)
    result = subprocess.run(
        [*command("tlsroll-leader", "leader.daemon"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    line = one_line_error(result.stderr, "tlsroll-leader")
    assert f"{path}: [leader].{key}" in line and problem in line


@pytest.mark.parametrize("prog", ["tlsroll-leader", "tlsroll-agent"])
def test_config_file_that_is_not_toml_or_missing(tmp_path: Path, prog: str) -> None:
    module = "leader.daemon" if prog == "tlsroll-leader" else "nodeagent.daemon"
    bad = tmp_path / "bad.toml"
    bad.write_text("[leader\naddress = ")
    for path, problem in [(bad, "not valid TOML"), (tmp_path / "none.toml", "no such file")]:
        result = subprocess.run(
            [*command(prog, module), "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2
        line = one_line_error(result.stderr, prog)
        assert str(path) in line and problem in line


@pytest.fixture(scope="module")
def initialized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster after ``tlsroll init``, its leader stopped: the three cases below share it (an
    init is a CLI process and a new CA), each leaving its file 0600 and the leader stopped."""
    with Cluster(tmp_path_factory.mktemp("secret-modes"), next_loopback()) as c:
        c.init()
        yield c


@pytest.mark.parametrize("which", ["ca_key", "tls_key", "passphrase"])
def test_leader_refuses_secret_files_readable_by_others(initialized: Cluster, which: str) -> None:
    c = initialized
    path = {
        "ca_key": c.ca_key_path,
        "tls_key": c.tls_key_path,
        "passphrase": c.passphrase_path,
    }[which]
    try:
        path.chmod(0o640)
        code, output = c.leader.run_to_exit()
        # A person's to fix, all three (exit 2, not restarted: review s48rev3, s49cli M2;
        # the keys in the data dir exited 1, started again for ever)
        assert code == 2, output
        line = one_line_error(output, "tlsroll-leader")
        assert str(path) in line and "chmod 600" in line
        assert not c.admin_socket.exists()
        assert not port_open(c.address, 9441)
        assert c.find_secrets(output) == []
        path.chmod(0o600)  # and with the mode fixed, it starts
        c.start_leader()
        wait_until(lambda: port_open(c.address, 9441), 10, "join port open")
    finally:
        path.chmod(0o600)
        if c.leader.running:  # stopped (its admin socket removed) for the next case
            c.stop_leader()


async def test_the_agents_stop_ends_a_task_that_swallowed_its_cancellation() -> None:
    """A CI run saw an agent that logged agent.stopping and never stopped: one cancel of its
    heartbeat task and one wait on it, and Python 3.11's ``asyncio.wait_for`` can swallow a
    cancellation that meets the inner result (the task then goes on; its wait_for calls are
    now ``asyncio.timeout``). ``stop_task`` cancels again while the task goes on, and gives up
    on it after its patience rather than hang the stop."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while swallowed < 2:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                swallowed += 1  # as wait_for did
        await asyncio.sleep(60)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(30):
        await runtime.stop_task(task)
    assert task.done() and swallowed == 2

    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(60)

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    async with asyncio.timeout(30):
        await runtime.stop_task(task, patience=1.0)  # gives up: the stop goes on
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()


def core_limits(pid: int) -> tuple[str, str]:
    """The soft and hard RLIMIT_CORE of process ``pid``, as /proc/PID/limits says them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def test_no_daemon_can_leave_a_core_file(tmp_path: Path) -> None:
    """Audit s45rt3 L2: a daemon's core holds secrets (the agent's password verifier and node
    key, the leader's decrypted CA key, the reference server's verifier). Started with a limit
    that allows core files (as a shell may), each daemon sets soft and hard limit to 0 itself:
    the units' LimitCORE=0 covers only a start by systemd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    allowed = 1 << 30 if hard == resource.RLIM_INFINITY else hard
    if allowed == 0:
        pytest.skip("this machine's hard core limit is 0 already: nothing to show")
    resource.setrlimit(resource.RLIMIT_CORE, (allowed, hard))  # the daemons inherit it
    try:
        server = RefServer(tmp_path / "rs", next_loopback())
        try:
            server.start()
            with Cluster(tmp_path / "c", next_loopback()) as c:
                c.init()
                c.start_leader()
                agent = c.add_agent("node1", next_loopback())
                for proc in (c.leader.proc, agent.proc, server.proc):
                    assert proc is not None and proc.poll() is None
                    assert core_limits(proc.pid) == ("0", "0"), proc.args
        finally:
            server.close()
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def test_the_tlsroll_command_can_leave_no_core_file() -> None:
    """Review s45rt3 (left open then): the commands hold secrets as the daemons do (``tlsroll
    init`` makes the CA key, ``password set`` reads the auth password, ``client
    test-connection`` the password and a workstation's key). Started with a limit that allows
    core files, the ``tlsroll`` program (``tlsroll.cli.main()`` on ``sys.argv``, as the console
    script runs it) sets soft and hard limit to 0 before its command runs; in-process callers
    (``main(argv)``, the tests) keep theirs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    allowed = 1 << 30 if hard == resource.RLIM_INFINITY else hard
    if allowed == 0:
        pytest.skip("this machine's hard core limit is 0 already: nothing to show")
    probe = (
        "import resource, sys\n"
        "from tlsroll import cli\n"
        "print(*resource.getrlimit(resource.RLIMIT_CORE), file=sys.stderr)\n"
        "sys.argv = ['tlsroll', '--version']\n"
        "code = cli.main()\n"
        "print(code, *resource.getrlimit(resource.RLIMIT_CORE), file=sys.stderr)\n"
    )
    resource.setrlimit(resource.RLIMIT_CORE, (allowed, hard))  # the command inherits it
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
        )
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    before, after = out.stderr.splitlines()[-2:]
    assert before.split()[0] == str(allowed)  # a limit that allowed core files, inherited
    assert after.split() == ["0", "0", "0"]  # exit code 0, soft 0, hard 0
    assert out.stdout.startswith("tlsroll, version")


JOURNAL_PROBE = """
import logging, sys
from tlsroll import leanlog, logs
if sys.argv[1] == "lean":
    leanlog.configure(json_lines=True)
    log = leanlog.get_logger("tests.journal")
else:
    logs.configure(json=True)
    log = logs.get_logger("tests.journal")
log.info("probe.info")
log.warning("probe.warning")
log.error("probe.error")
if sys.argv[1] != "lean":
    logging.getLogger("a.library").warning("a library's record")
"""


@pytest.mark.parametrize("daemon", ["leader", "agent"])
def test_a_daemons_fatal_line_to_journald_is_an_error(tmp_path: Path, daemon: str) -> None:
    """Review s66 logs M3: the line a daemon stops with (a config refused: exit 2; a store,
    3/4; an agent's certificate or enrolment, 5/6) is the one README says to read, but it went
    to journald with no ``<N>`` and was stored at priority 6: `journalctl -p warning`, or an
    alert on priority, never showed why the daemon will not start. To the journal's stream it
    carries ``<3>``; the text after it is the line as before."""
    config = tmp_path / f"{daemon}.toml"
    config.write_text('[leader]\naddress = "127.0.0.1"\nunknown_key = 1\n')
    err = tmp_path / "stderr"
    err.touch()
    st = err.stat()
    module = "leader.daemon" if daemon == "leader" else "nodeagent.daemon"
    with err.open("a") as stderr:
        code = subprocess.run(
            [sys.executable, "-m", module, "--config", str(config)],
            stderr=stderr,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            timeout=60,
            check=False,
        ).returncode
    assert code == 2
    (line,) = err.read_text().splitlines()
    assert line.startswith(f"<3>tlsroll-{daemon}: "), line
    assert "config error" in line, line


STDLIB_EXCEPTION_PROBE = """
import logging, sys
from tlsroll import logs
logs.configure(json=sys.argv[1] == "json")

def handler(join_token):
    passphrase_local = "LOCAL-PASSPHRASE-VALUE"
    raise ValueError("MESSAGE-SECRET-VALUE")

try:
    handler("abcdef.LOCALTOKENVALUE")
except ValueError:
    logging.getLogger("grpc._cython.cygrpc").exception("Unexpected error in servicer")
"""


@pytest.mark.parametrize("mode", ["json", "console"])
def test_a_librarys_exception_is_logged_as_its_type_and_place_only(mode: str) -> None:
    """Review s66 logs L1: a standard-library record with an exception (grpc's "Unexpected
    error in servicer", asyncio's "Task exception was never retrieved") bypassed redaction: in
    JSON its ``exc_info`` held the exception's message and a traceback's repr, on a terminal
    structlog printed a traceback with every frame's locals. It keeps the exception's type and
    place (``logs.where``), never its message, traceback or locals."""
    out = subprocess.run(
        [sys.executable, "-c", STDLIB_EXCEPTION_PROBE, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = out.stderr
    for secret in ("LOCAL-PASSPHRASE-VALUE", "MESSAGE-SECRET-VALUE", "LOCALTOKENVALUE"):
        assert secret not in text, text
    assert "Traceback" not in text and "exc_info" not in text, text
    (line,) = text.splitlines()
    assert "Unexpected error in servicer" in line and "ValueError" in line, line
    assert "in handler" in line, line  # where: the place, a file, a line and a function
    if mode == "json":
        event = json.loads(line)
        assert event["error_type"] == "ValueError" and event["level"] == "error", event


@pytest.mark.parametrize("kind", ["structlog", "lean"])
def test_lines_to_journald_carry_their_priority(tmp_path: Path, kind: str) -> None:
    """Review s46rt2 M1: journald stored every line at priority 6 (info), so `journalctl -p
    warning` and alerts on priority never saw a warning or an error. A daemon's (``kind``:
    tlsroll.logs, and the crypto worker's lean writer) stderr that systemd connected to the
    journal (``JOURNAL_STREAM`` names its device and inode: systemd.exec(5)) gets each line's
    ``<N>`` before it, which journald reads (``SyslogLevelPrefix=``) and strips; a stderr that
    is a file or a pipe gets none. systemd is not PID 1 here: the stream is a file whose device
    and inode the test puts in ``JOURNAL_STREAM`` as systemd would."""

    def run(env_for: Callable[[Path], dict[str, str]]) -> list[str]:
        out = tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}.log"
        out.touch()
        with out.open("a") as stderr:
            subprocess.run(
                [sys.executable, "-c", JOURNAL_PROBE, kind],
                stderr=stderr,
                env={**os.environ, **env_for(out)},
                check=True,
                timeout=60,
            )
        return out.read_text().splitlines()

    def stream(path: Path) -> dict[str, str]:
        st = path.stat()
        return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}

    lines = run(stream)
    prefixes = [line.split("{", 1)[0] for line in lines]
    events = [json.loads("{" + line.split("{", 1)[1])["event"] for line in lines]
    expected = ["<6>", "<4>", "<3>"] + (["<4>"] if kind == "structlog" else [])
    assert prefixes == expected, lines
    assert events[:3] == ["probe.info", "probe.warning", "probe.error"]
    # Not the journal's stream (another file's, or none): plain JSON lines.
    other = tmp_path / "other"
    other.touch()
    for env in (lambda _out: stream(other), lambda _out: {"JOURNAL_STREAM": ""}):
        assert all(line.startswith("{") for line in run(env)), kind
