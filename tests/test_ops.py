"""Operations and secrets (issue 14): the CA key under scrypt and its passphrase from a systemd
credential, log levels, the agents' gRPC health for any cluster identity and ``tlsroll nodes
--check``, ``token create --print-join-command``, one-line errors (a second daemon on a taken
port, the admin socket out of reach) and exit code 2 for usage errors.

Real leader and agents as processes, real mutual TLS, loopback addresses only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2

from leader.cli import join_merge
from leader.layout import read_passphrase
from nodeagent.config import AgentConfig
from tests.cluster import (
    Agent,
    Cluster,
    Daemon,
    child_env,
    command,
    health_check,
    one_line_error,
    secure_channel,
    wait_until,
)
from tests.conftest import next_loopback
from tlsroll import bootstrap_protocol, keywrap, pki, spiffe
from tlsroll.v1 import leader_pb2, leader_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
OPENSSL = shutil.which("openssl")


def asn1(path: Path) -> str:
    """``openssl asn1parse`` of a PEM file (the test's own reading of the DER; the product
    never runs openssl)."""
    assert OPENSSL is not None
    result = subprocess.run(
        [OPENSSL, "asn1parse", "-in", str(path)], capture_output=True, text=True, check=True
    )
    return result.stdout


def kdf_lines(path: Path) -> list[str]:
    """The OBJECT and INTEGER lines of the key's encryption parameters (before the encrypted
    data), e.g. ``['OBJECT :PBES2', 'OBJECT :scrypt', 'INTEGER :4000', …]``."""
    found = []
    for line in asn1(path).splitlines():
        if "OCTET STRING" in line and "l=  16" not in line and "l=  8" not in line:
            break  # the encrypted key itself: the parameters are over
        m = re.search(r"prim: (OBJECT|INTEGER)\s+(:\S+)", line)
        if m:
            found.append(f"{m.group(1)} {m.group(2)}")
    return found


SCRYPT_LINES = [
    "OBJECT :PBES2",
    "OBJECT :scrypt",
    "INTEGER :4000",  # N = 2^14
    "INTEGER :08",  # r
    "INTEGER :05",  # p
    "OBJECT :aes-256-cbc",
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "c", next_loopback()) as c:
        c.init()
        yield c


# --- the CA key --------------------------------------------------------------------------------


def init_writes_the_ca_key_under_scrypt_and_openssl_reads_it(cluster: Cluster) -> None:
    assert kdf_lines(cluster.ca_key_path) == SCRYPT_LINES
    # Any PKCS#8 reader takes it: openssl decrypts it with the passphrase (output discarded).
    result = subprocess.run(
        [
            str(OPENSSL),
            "pkcs8",
            "-in",
            str(cluster.ca_key_path),
            "-passin",
            f"file:{cluster.passphrase_path}",
            "-out",
            os.devnull,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    with pytest.raises(subprocess.CalledProcessError):  # and only with it
        subprocess.run(
            [str(OPENSSL), "pkcs8", "-in", str(cluster.ca_key_path), "-passin", "pass:wrong"],
            capture_output=True,
            check=True,
        )


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl tool to read the DER")
def test_init_writes_the_ca_key_under_scrypt_and_a_weak_one_is_encrypted_again_at_start(
    cluster: Cluster,
) -> None:
    # The fixture's init ran under the tests' scrypt hook (conftest: TLSROLL_TEST_KDF_N=256):
    # the key is under N=256, and a start with the hook keeps it and says so (session 74).
    assert os.environ[keywrap.TEST_KDF_N_ENV] == "256"
    assert (
        kdf_lines(cluster.ca_key_path)
        == [
            *SCRYPT_LINES[:2],
            "INTEGER :0100",  # N = 2^8
            *SCRYPT_LINES[3:],
        ]
    )
    hooked = cluster.ca_key_path.read_bytes()
    # Set wrong, the hook is no hook: the start is refused in one line, nothing changed.
    twin = Daemon("twin", cluster.leader.argv, cluster.root / "twin.log", lambda: False)
    code, output = twin.run_to_exit(env={keywrap.TEST_KDF_N_ENV: "16384"})
    assert code == 2
    line = one_line_error(output, "tlsroll-leader")
    assert f"{keywrap.TEST_KDF_N_ENV} (tests only) must be a power of 2" in line, line
    assert cluster.ca_key_path.read_bytes() == hooked
    cluster.start_leader()
    said = [e for e in cluster.leader.log_events() if e["event"] == "leader.test_hook"]
    assert [(e["hook"], e["value"], e["level"]) for e in said] == [
        (keywrap.TEST_KDF_N_ENV, 256, "warning")
    ], said
    assert "tests only" in said[0]["hint"] and "N=256" in said[0]["detail"]
    assert "ca.key_reencrypted" not in cluster.leader.event_names()
    assert cluster.ca_key_path.read_bytes() == hooked
    cluster.stop_leader()
    # Without the hook (empty: as unset) that key is weak: encrypted again at full strength,
    # as any production key; then openssl reads it.
    unhooked = {keywrap.TEST_KDF_N_ENV: ""}
    cluster.start_leader(unhooked)
    events = [e for e in cluster.leader.log_events() if e["event"] == "ca.key_reencrypted"]
    assert [(e["kdf_before"], e["kdf_now"]) for e in events] == [
        ("scrypt N=256 r=8 p=5", "scrypt N=16384 r=8 p=5")
    ], events
    cluster.stop_leader()
    init_writes_the_ca_key_under_scrypt_and_openssl_reads_it(cluster)
    # Then the key as an old version wrote it.
    passphrase = read_passphrase(cluster.passphrase_path)
    ca = pki.CertificateAuthority.load(cluster.ca_cert_path, cluster.ca_key_path, passphrase)
    # As tlsroll 0.1.0 wrote it: cryptography's own choice, PBKDF2 with 2048 iterations.
    old = ca.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    cluster.ca_key_path.write_bytes(old)
    assert "OBJECT :PBKDF2" in kdf_lines(cluster.ca_key_path)
    assert "INTEGER :0800" in kdf_lines(cluster.ca_key_path)  # 2048

    cluster.start_leader(unhooked)
    events = [e for e in cluster.leader.log_events() if e["event"] == "ca.key_reencrypted"]
    assert len(events) == 2, cluster.leader.log_text()
    assert events[1]["kdf_before"] == "PBKDF2 2048 iterations (hmacWithSHA256)"
    assert events[1]["kdf_now"] == "scrypt N=16384 r=8 p=5"
    assert kdf_lines(cluster.ca_key_path) == SCRYPT_LINES
    assert stat.S_IMODE(cluster.ca_key_path.stat().st_mode) == 0o600
    again = pki.CertificateAuthority.load(cluster.ca_cert_path, cluster.ca_key_path, passphrase)
    assert again.key.private_numbers() == ca.key.private_numbers()  # the same key

    # The CA still signs: an agent enrols. A second start leaves the key alone, the tests'
    # hook set again: it never lowers a key's N.
    cluster.add_agent("node1", next_loopback())
    before = cluster.ca_key_path.read_bytes()
    cluster.stop_leader()
    cluster.start_leader()
    assert cluster.ca_key_path.read_bytes() == before
    names = cluster.leader.event_names()
    assert names.count("ca.key_reencrypted") == 2
    assert cluster.find_secrets(cluster.logs_text()) == []


def move_passphrase_to_credentials(cluster: Cluster, mode: int = 0o400) -> tuple[Path, str]:
    """What ``LoadCredentialEncrypted=ca-passphrase:…`` gives the leader: the passphrase in
    ``$CREDENTIALS_DIRECTORY/ca-passphrase``; the file in the data dir is gone."""
    creds = cluster.root / "credentials"
    creds.mkdir(mode=0o700)
    secret = cluster.passphrase_path.read_text().strip()
    (creds / "ca-passphrase").write_text(secret)
    (creds / "ca-passphrase").chmod(mode)
    cluster.passphrase_path.unlink()
    return creds, secret


def test_the_leader_takes_the_passphrase_from_a_systemd_credential(cluster: Cluster) -> None:
    creds, secret = move_passphrase_to_credentials(cluster)
    assert not list((cluster.data_dir / "secrets").iterdir())  # nothing of it in the data dir

    # Without the credential: one line that says where it looked.
    twin = Daemon("twin", cluster.leader.argv, cluster.root / "twin.log", lambda: False)
    code, output = twin.run_to_exit()
    assert code == 2  # the config's to fix: not started again by systemd (s47rtin L4)
    line = one_line_error(output, "tlsroll-leader")
    assert "no CA passphrase" in line and "ca-passphrase" in line, line
    assert "[leader].ca_passphrase_file: " in line, line

    cluster.start_leader(env={"CREDENTIALS_DIRECTORY": str(creds)})
    cluster.add_agent("node1", next_loopback())  # the CA signs its certificate
    td = spiffe.trust_domain(pki.read_cert(cluster.ca_cert_path))
    assert cluster.list_nodes()["node1"].identity == str(spiffe.node(td, "node1"))
    assert "ca.passphrase_file_left" not in cluster.leader.event_names()
    assert cluster.find_secrets(cluster.logs_text(), [secret]) == []


def test_a_credential_others_can_read_is_refused_and_a_left_file_is_warned_about(
    cluster: Cluster,
) -> None:
    creds, secret = move_passphrase_to_credentials(cluster, 0o444)
    twin = Daemon("twin", cluster.leader.argv, cluster.root / "twin.log", lambda: False)
    code, output = twin.run_to_exit(env={"CREDENTIALS_DIRECTORY": str(creds)})
    # The unit's to fix, not started again by systemd (review s48rev3: it was exit 1)
    assert code == 2
    line = one_line_error(output, "tlsroll-leader")
    assert line.startswith("tlsroll-leader: config error: systemd credential ca-passphrase: ")
    assert "accessible by others" in line, line
    # A wrong passphrase in it: the same (one line, the passphrase in no output)
    (creds / "ca-passphrase").chmod(0o600)
    (creds / "ca-passphrase").write_text("not-the-ca-passphrase-7q2m")
    (creds / "ca-passphrase").chmod(0o400)
    code, output = twin.run_to_exit(env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert code == 2
    line = one_line_error(output, "tlsroll-leader")
    said = f"systemd credential ca-passphrase: the CA passphrase in {creds / 'ca-passphrase'} "
    assert said + "does not open the CA key" in line, line
    assert "not-the-ca-passphrase-7q2m" not in output and secret not in output
    (creds / "ca-passphrase").chmod(0o600)
    (creds / "ca-passphrase").write_text(secret)

    # systemd ≥ 254 leaves the file root's with an ACL for the service's user: 0440 shows.
    (creds / "ca-passphrase").chmod(0o440)
    cluster.passphrase_path.write_text(secret + "\n")  # a copy left behind in the data dir
    cluster.passphrase_path.chmod(0o600)
    cluster.start_leader(env={"CREDENTIALS_DIRECTORY": str(creds)})
    left = [e for e in cluster.leader.log_events() if e["event"] == "ca.passphrase_file_left"]
    assert left and left[0]["path"] == str(cluster.passphrase_path)
    assert cluster.find_secrets(cluster.logs_text(), [secret]) == []


# --- log levels --------------------------------------------------------------------------------


def a_bad_log_level_is_a_usage_error(cluster: Cluster) -> None:
    """A log level the daemons do not know, in the config or on the command line: a usage
    error (exit 2) in one line; the leader's config is left as it was."""
    cluster.write_leader_config({"log_level": "loud"})
    twin = Daemon("twin", cluster.leader.argv, cluster.root / "twin.log", lambda: False)
    code, output = twin.run_to_exit()
    assert code == 2
    line = one_line_error(output, "tlsroll-leader")
    assert "log_level: unknown log level 'loud'; use one of debug, info" in line, line
    cluster.write_leader_config({"log_level": None})
    twin.argv = [*cluster.leader.argv, "--log-level", "loud"]
    code, output = twin.run_to_exit()
    assert code == 2 and "Traceback" not in output
    assert "argument --log-level: invalid choice: 'loud'" in output, output

    bad = cluster.add_agent("node9", next_loopback(), token="x.y", start=False)
    bad.write_config({"agent": {"log_level": "verbose"}})
    code, output = bad.run_to_exit()
    assert code == 2
    assert "unknown log level 'verbose'" in one_line_error(output, "tlsroll-agent")


def test_log_level_in_the_config_and_on_the_command_line(cluster: Cluster) -> None:
    # A bad one first (a test of its own before, with a cluster of its own).
    a_bad_log_level_is_a_usage_error(cluster)
    cluster.write_leader_config({"log_level": "warning"})
    cluster.start_leader()
    agent = cluster.add_agent("node1", next_loopback(), start=False)
    agent.write_config({"agent": {"log_level": "WARNING"}})
    agent.start()
    cluster.wait_for_nodes_online(["node1"])
    cluster.stop_leader()
    agent.stop()
    for daemon in (cluster.leader, agent):
        levels = {e["level"] for e in daemon.log_events()}
        assert levels <= {"warning", "error"}, daemon.log_text()

    # --log-level wins over the config.
    cluster.leader.argv += ["--log-level", "debug"]
    agent.argv += ["--log-level", "debug"]
    cluster.start_leader()
    agent.start()
    assert "leader.config_loaded" in cluster.leader.event_names()
    # (said once the viewer listens: after the admin socket answers the ready check)
    wait_until(lambda: "leader.started" in cluster.leader.event_names(), 30, "leader.started")
    assert "agent.config_loaded" in agent.event_names()


# --- one line when a port is taken -------------------------------------------------------------


def test_a_second_leader_or_agent_on_a_taken_port_prints_one_line(cluster: Cluster) -> None:
    cluster.start_leader()
    # A leader of another data dir on the same address (one of the same data dir is refused
    # before, by its admin socket: test_daemons).
    with Cluster(cluster.root / "other", cluster.address) as other:
        other.init()
        twin = Daemon("twin", other.leader.argv, cluster.root / "twin.log", lambda: False)
        code, output = twin.run_to_exit()
    assert code == 1
    # Not even a line of gRPC's C core (``E1130 … add_port.cc``) before it; but for the line
    # that says the tests' scrypt hook (conftest sets it: ``leader.test_hook``) is in effect.
    hooked = f'"hook": "{keywrap.TEST_KDF_N_ENV}"'
    lines = [line for line in output.strip().splitlines() if hooked not in line]
    assert lines == [
        f"tlsroll-leader: cannot listen on {cluster.join_target}: another process listens there"
    ], output

    node = cluster.add_agent("node1", next_loopback())
    agent_twin = Daemon("agent twin", node.argv, cluster.root / "agent-twin.log", lambda: False)
    code, output = agent_twin.run_to_exit()
    assert code == 1
    # The same config is the same data dir: the running agent's lock stops the twin before it
    # opens the journal or its port (review s45rev6 M1's ``agent.lock``), in one line.
    assert one_line_error(output, "tlsroll-agent") == (
        f"tlsroll-agent: a tlsroll-agent is running on {node.data_dir} (it holds"
        f" {node.data_dir / 'agent.lock'}): stop it first (systemctl stop tlsroll-agent)"
    ), output
    assert not [line for line in output.splitlines() if "add_port" in line], output
    # Its port held by another program (the agent itself stopped): the one-line refusal names
    # the port, as before the lock.
    node.stop()
    host, port = node.target.rsplit(":", 1)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((host, int(port)))
        holder.listen()
        again = Daemon("agent again", node.argv, cluster.root / "agent-again.log", lambda: False)
        code, output = again.run_to_exit()
    assert code == 1
    assert f"tlsroll-agent: cannot listen on {node.target}" in one_line_error(
        output, "tlsroll-agent"
    )
    assert not [line for line in output.splitlines() if "add_port" in line], output


# --- health and nodes --check ------------------------------------------------------------------


def any_cluster_identity_may_ask_an_agent_for_its_health(
    cluster: Cluster, node1: Agent, node2: Agent
) -> None:
    """The leader, the node itself, another node and a workstation each get node1's health; a
    caller without a client certificate is refused at the handshake."""
    ca = pki.CertificateAuthority.load(
        cluster.ca_cert_path, cluster.ca_key_path, read_passphrase(cluster.passphrase_path)
    )
    ws_key = pki.generate_key()
    csr = pki.make_csr(ws_key, bootstrap_protocol.workstation_names("ws-monitor"))
    with cluster.control_channel(node1.cert_file.read_bytes(), node1.key_file.read_bytes()) as ch:
        ws_cert = (
            leader_pb2_grpc.LeaderStub(ch)
            .SignWorkstationCertificate(
                leader_pb2.SignWorkstationRequest(csr_pem=pki.csr_to_pem(csr)), timeout=10
            )
            .certificate_pem
        )
    callers = {
        "leader": cluster.leader_credentials(),
        "node itself": (node1.cert_file.read_bytes(), node1.key_file.read_bytes()),
        "other node": (node2.cert_file.read_bytes(), node2.key_file.read_bytes()),
        "workstation": (ws_cert, pki.key_to_pem(ws_key)),
    }
    assert ca.cert_pem == cluster.ca_pem
    for who, (cert_pem, key_pem) in callers.items():
        with secure_channel(
            node1.target, cluster.ca_pem, cert_pem, key_pem, name=node1.tls_name
        ) as channel:
            assert health_check(channel) == SERVING, who
            assert health_check(channel, "tlsroll.v1.NodeAgent") == SERVING, who
    with (
        secure_channel(node1.target, cluster.ca_pem, name=node1.tls_name) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        health_check(channel)  # no client certificate: the handshake refuses it
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_nodes_check_asks_every_agent_and_any_cluster_identity_may_ask_one(
    cluster: Cluster,
) -> None:
    cluster.start_leader()
    empty = cluster.cli("nodes", "--check")
    assert (empty.returncode, empty.stdout.strip()) == (0, "no nodes enrolled"), empty.stderr
    node1 = cluster.add_agent("node1", next_loopback())
    node2 = cluster.add_agent("node2", next_loopback())
    cluster.wait_for_nodes_online(["node1", "node2"])
    # (a test of its own before, with a cluster of its own: it changes nothing here)
    any_cluster_identity_may_ask_an_agent_for_its_health(cluster, node1, node2)

    result = cluster.cli("nodes", "--check")
    assert result.returncode == 0, result.stderr
    for node in (node1, node2):  # a rich table: one row per node, with borders
        row = re.escape(node.node_name) + r"\W+" + re.escape(node.target) + r"\W+SERVING\W"
        assert re.search(row, result.stdout), result.stdout

    node2.stop()
    result = cluster.cli("nodes", "--check", "--timeout", "2", "--json")
    assert result.returncode == 1, result.stderr
    health = {n["name"]: n for n in json.loads(result.stdout)}
    assert health["node1"]["health"] == "serving"
    assert health["node2"]["health"] == "unreachable"
    assert health["node2"]["detail"].startswith("UNAVAILABLE")

    text = cluster.cli("nodes", "--check", "--timeout", "2")
    assert text.returncode == 1
    assert re.search(r"node2\W+\S+\W+UNREACHABLE\W", text.stdout), text.stdout
    assert cluster.cli("nodes", "--check", "--all").returncode == 2
    assert cluster.cli("nodes", "--check", "--timeout", "0").returncode == 2


# --- the join command --------------------------------------------------------------------------


def test_print_join_command_writes_a_config_that_enrols_a_real_agent(cluster: Cluster) -> None:
    cluster.start_leader()
    address = next_loopback()
    etc, data = cluster.root / "node-etc", cluster.root / "node-data"
    result = cluster.cli(
        "token",
        "create",
        "--node",
        "node7",
        "--address",
        address,
        "--print-join-command",
        "--agent-config-dir",
        str(etc),
        "--agent-data-dir",
        str(data),
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    printed = re.search(r"^printf '%s\\n' '?([\w-]+\.[\w-]+)'? > ", script, re.MULTILINE)
    assert printed, script
    token = printed.group(1)
    cluster.tokens.append(token)  # find_secrets looks for it in the logs

    config, token_file = etc / "agent.toml", etc / "join-token"
    etc.mkdir()
    config.write_text("# the example, with the admin's [server] table\n")  # kept aside
    ran = subprocess.run(
        ["sh", "-s"], input=script, capture_output=True, text=True, timeout=30, check=False
    )
    assert ran.returncode == 0, ran.stderr
    (kept,) = etc.glob("agent.toml.before-join.*")  # nothing to keep in it: said so
    assert kept.read_text().startswith("# the example")
    assert ran.stdout == (
        "join: the agent.toml that was there had no [server] and no other [agent] setting to "
        f"keep; all of it is in {kept}\n"
    )
    for path in (config, token_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert token_file.read_text() == token + "\n"
    assert token not in config.read_text()
    text = config.read_text()
    assert f'address = "{cluster.address}"' in text and cluster.ca_pin() in text, text

    agent = Daemon(
        "node7",
        [*command("tlsroll-agent", "nodeagent.daemon"), "--config", str(config)],
        cluster.root / "node7.log",
        (data / "node.pem").exists,
    )
    try:
        agent.start()
        nodes = cluster.list_nodes()
        assert list(nodes["node7"].addresses) == [address]
        assert cluster.find_secrets(agent.log_text() + cluster.leader.log_text()) == []
    finally:
        agent.close()


OLD_AGENT_TOML = """\
# node7, set up before (its leader's CA made again since: tlsroll init)
[node]
name = "node7"
addresses = ["192.0.2.7"]

[leader]
address = "192.0.2.1"
ca_pin = "sha256:{pin}"
join_token_file = "/nowhere/join-token"

[agent]
data_dir = "{data}"
bootstrap_port = 9543   # 9443 is another program's here
log_level = "debug"

[server]                 # the managed server: the admin's
driver = "systemd"
unit = "praxis.service"  # not the example's name
config_file = "/etc/praxis/server.toml"
template = "/etc/tlsroll/praxis.toml.tmpl"
"""


def join_script_for(cluster: Cluster, name: str, etc: Path, data: Path | None) -> str:
    """The join script for ``name``; ``data`` None: no --agent-data-dir."""
    made = cluster.cli(
        "token", "create", "--node", name, "--address", next_loopback(),
        "--print-join-command", "--agent-config-dir", str(etc),
        *(("--agent-data-dir", str(data)) if data else ()),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = re.search(r"^printf '%s\\n' '?([\w-]+\.[\w-]+)'? > ", made.stdout, re.MULTILINE)
    assert token, made.stdout
    cluster.tokens.append(token.group(1))
    return made.stdout


def run_join(script: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-s"], input=script, capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": path, "LANG": "C.UTF-8"},
    )  # fmt: skip


def test_a_join_again_keeps_the_server_table_and_agent_settings_and_every_earlier_copy(
    cluster: Cluster,
) -> None:
    """Review s46rt2 L3: the join script, run again on a node set up before (what a CA made
    again sends the admin to do), overwrote agent.toml whole: its [server] table and
    bootstrap_port were gone without a word, and a second run overwrote agent.toml.before-join
    (then the join's own config, no [server] in it). Now they are kept, in one line, and each
    run keeps the config it found under a name of its own."""
    cluster.start_leader()
    etc, data = cluster.root / "node-etc", cluster.root / "node-data"
    etc.mkdir()
    config = etc / "agent.toml"
    old = OLD_AGENT_TOML.format(pin="0" * 64, data=data)
    config.write_text(old)
    config.chmod(0o600)
    script = join_script_for(cluster, "node7", etc, data)
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # python3: a 3.11+, as on a node

    runs = [run_join(script, path), run_join(script, path)]
    copies = sorted(etc.glob("agent.toml.before-join.*"), key=lambda p: p.stat().st_mtime_ns)
    assert len(copies) == 2, copies  # the second run did not overwrite the first's
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    for ran, kept in zip(runs, copies, strict=True):
        assert ran.stdout == (
            "join: kept [server] (driver systemd), [agent] bootstrap_port, log_level of the "
            f"agent.toml that was there; all of it is in {kept}\n"
        ), ran.stdout
    assert copies[0].read_text() == old
    assert stat.S_IMODE(copies[0].stat().st_mode) == 0o600
    assert copies[1].read_text() == config.read_text()  # a second run changes nothing more

    loaded = AgentConfig.load(config)  # as the agent reads it
    assert loaded.bootstrap_port == 9543 and loaded.log_level == "debug"
    assert loaded.data_dir == data and loaded.leader_address == cluster.address
    assert loaded.server is not None and loaded.server.text("unit") == "praxis.service"
    assert loaded.ca_pin == cluster.ca_pin() and loaded.join_token_file == etc / "join-token"
    assert 'unit = "praxis.service"  # not the example\'s name' in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert sorted(p.name for p in etc.iterdir() if "before-join" not in p.name) == [
        "agent.toml",
        "join-token",
    ]


def test_a_join_token_file_left_there_never_holds_the_new_token_readable_by_others(
    cluster: Cluster,
) -> None:
    """Review rev-enrol L4: the script wrote the token into a join-token already there and
    only then made it 0600: one left 0644 (by hand, an earlier install, a link) held the new
    secret readable by others meanwhile. Now the token goes into a file of its own, 0600 from
    its making, renamed over the one there: the old file (seen here through a second name)
    never holds it, and the new one is 0600."""
    cluster.start_leader()
    etc = cluster.root / "node-etc"
    etc.mkdir()
    token_file, watch = etc / "join-token", cluster.root / "old-join-token"
    token_file.write_text("an old token\n")
    token_file.chmod(0o644)
    os.link(token_file, watch)  # the old file, by a name the script does not know
    script = join_script_for(cluster, "node6", etc, cluster.root / "node-data")
    ran = run_join(script, "/usr/bin:/bin")
    assert ran.returncode == 0, ran.stderr
    assert watch.read_text() == "an old token\n"  # never written into
    assert token_file.read_text().strip() == cluster.tokens[-1]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert not list(etc.glob("join-token.*")), list(etc.iterdir())  # no temporary file left


def test_a_join_again_keeps_the_data_dir_unless_the_join_command_names_one(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Review s47rev2 L5: a join run again set [agent] data_dir to the default unless
    --agent-data-dir was given again: the agent started on an empty data dir, its journal left
    in the old one. Now the agent.toml's own stays (said) unless the command names one."""
    cluster.start_leader()
    etc, data = cluster.root / "node-etc", tmp_path / "custom-data"
    etc.mkdir()
    config = etc / "agent.toml"
    config.write_text(OLD_AGENT_TOML.format(pin="0" * 64, data=data))
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"

    script = join_script_for(cluster, "node7", etc, None)
    ran = run_join(script, path)
    assert ran.returncode == 0, ran.stderr
    (kept,) = etc.glob("agent.toml.before-join.*")
    assert ran.stdout == (
        "join: kept [server] (driver systemd), [agent] bootstrap_port, data_dir, log_level of "
        f"the agent.toml that was there; [agent] data_dir stays {data} (the join command named "
        f"none: --agent-data-dir); the agent's unit lets it write /var/lib/tlsroll-agent only: "
        f"add ReadWritePaths={data} with `systemctl edit tlsroll-agent` if it has none; all of it "
        f"is in {kept}\n"
    ), ran.stdout
    loaded = AgentConfig.load(config)
    assert loaded.data_dir == data and loaded.bootstrap_port == 9543
    assert loaded.leader_address == cluster.address
    assert config.read_text().count("data_dir") == 1, config.read_text()

    # Named: the join's data dir, said as before.
    other = tmp_path / "other-data"
    ran = run_join(join_script_for(cluster, "node7", etc, other), path)
    assert ran.returncode == 0, ran.stderr
    assert f"; [agent] data_dir is now {other} (it was {data}: --agent-data-dir)" in ran.stdout
    assert AgentConfig.load(config).data_dir == other

    # A relative data_dir (which the agent refuses, exit 2) is not kept: the default, said
    # (review s48rev4 L4).
    config.write_text(OLD_AGENT_TOML.format(pin="0" * 64, data="relative/data"))
    ran = run_join(join_script_for(cluster, "node7", etc, None), path)
    assert ran.returncode == 0, ran.stderr
    assert (
        "; [agent] data_dir is now /var/lib/tlsroll-agent (it was relative/data, not an "
        "absolute path); all of it is in"
    ) in ran.stdout, ran.stdout
    assert AgentConfig.load(config).data_dir == Path("/var/lib/tlsroll-agent")

    # A node with no agent.toml yet: the default.
    fresh = tmp_path / "fresh-etc"
    ran = run_join(join_script_for(cluster, "node8", fresh, None), path)
    assert ran.returncode == 0, ran.stderr
    assert AgentConfig.load(fresh / "agent.toml").data_dir == Path("/var/lib/tlsroll-agent")


def test_a_join_writes_a_symlinked_agent_toml_where_it_points(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Review s47rev2 L7: the join renamed its config over agent.toml, so a symbolic link (an
    admin keeping the config elsewhere) became a plain file, the file it named left as it
    was. Now the config is written where the link points (said), the link stays; a link to no
    file is refused, nothing changed."""
    cluster.start_leader()
    etc, elsewhere = cluster.root / "node-etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    target, config = elsewhere / "agent.toml", etc / "agent.toml"
    old = OLD_AGENT_TOML.format(pin="0" * 64, data=tmp_path / "data")
    target.write_text(old)
    config.symlink_to(target)
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"

    ran = run_join(join_script_for(cluster, "node7", etc, None), path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[-1] == (
        f"join: {config} is a symbolic link: the config is written to {target}, where it points"
    ), ran.stdout
    assert config.is_symlink() and config.readlink() == target
    loaded = AgentConfig.load(config)  # as the agent reads it, through the link
    assert loaded.leader_address == cluster.address and loaded.server is not None
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    (kept,) = etc.glob("agent.toml.before-join.*")
    assert not kept.is_symlink() and kept.read_text() == old
    assert sorted(p.name for p in elsewhere.iterdir()) == ["agent.toml"]  # no temporary file
    assert sorted(p.name for p in etc.iterdir() if "before-join" not in p.name) == [
        "agent.toml",
        "join-token",
    ]

    # A link to no file: refused before anything is written.
    dangling_etc = tmp_path / "dangling-etc"
    dangling_etc.mkdir()
    nowhere = tmp_path / "nowhere" / "agent.toml"
    (dangling_etc / "agent.toml").symlink_to(nowhere)
    ran = run_join(join_script_for(cluster, "node8", dangling_etc, None), path)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert ran.stderr == (
        f"join: {dangling_etc / 'agent.toml'} is a symbolic link to {nowhere}, which is not a "
        "file: point it at the agent's config or remove it; nothing changed\n"
    ), ran.stderr
    assert [p.name for p in dangling_etc.iterdir()] == ["agent.toml"]
    assert (dangling_etc / "agent.toml").is_symlink() and not nowhere.parent.exists()

    # A link to a file that is no TOML (another file of the system's, by mistake): refused, the
    # file left as it was, no copy of it kept (review s48rev4 L2: it was replaced by the
    # agent's config, and its content copied to agent.toml.before-join.TIME).
    other_etc, other = tmp_path / "other-etc", tmp_path / "shadow-like"
    other_etc.mkdir()
    other.write_text("root:$y$j9T$not-toml:19000:0:99999:7:::\n")
    other.chmod(0o640)
    (other_etc / "agent.toml").symlink_to(other)
    ran = run_join(join_script_for(cluster, "node9", other_etc, None), path)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert ran.stderr.splitlines()[-1].startswith(
        f"join: {other_etc / 'agent.toml'} is a symbolic link to {other}, which does not read "
        "as TOML"
    ), ran.stderr
    assert other.read_text().startswith("root:") and stat.S_IMODE(other.stat().st_mode) == 0o640
    assert [p.name for p in other_etc.iterdir()] == ["agent.toml"]


def test_a_join_with_no_python_to_keep_the_server_table_changes_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_leader()
    etc, data = cluster.root / "node-etc", cluster.root / "node-data"
    etc.mkdir()
    config = etc / "agent.toml"
    old = OLD_AGENT_TOML.format(pin="0" * 64, data=data)
    config.write_text(old)
    script = join_script_for(cluster, "node7", etc, data)
    bin_dir = tmp_path / "bin"  # the script's tools, and no python3
    bin_dir.mkdir()
    for tool in ("sh", "mkdir", "cat", "rm", "date", "cp", "chmod", "mv"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    ran = run_join(script, str(bin_dir))
    assert ran.returncode == 1
    assert ran.stderr == (
        f"join: {config} is there and no Python 3.11+ to keep its [server] table: install "
        "tlsroll first (install.sh agent), or move it away; nothing changed\n"
    )
    assert config.read_text() == old
    assert [p.name for p in etc.iterdir()] == ["agent.toml"]


def test_a_join_run_from_a_directory_others_may_write_runs_none_of_its_code(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Review s47rev2 M1: the join script's Python had the current directory first on its
    import path: run as root from /tmp (or any directory another user may write), a
    ``tomllib.py`` or ``json.py`` there ran as root. It runs isolated now (``-I``)."""
    cluster.start_leader()
    etc, data = cluster.root / "node-etc", cluster.root / "node-data"
    etc.mkdir()
    (etc / "agent.toml").write_text(OLD_AGENT_TOML.format(pin="0" * 64, data=data))
    script = join_script_for(cluster, "node7", etc, data)
    planted = tmp_path / "others-dir"
    planted.mkdir()
    marker = tmp_path / "ran-planted-code"
    for module in ("tomllib", "json", "re", "os"):
        (planted / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write('{module} ')\n")
    ran = subprocess.run(
        ["sh", "-s"], input=script, capture_output=True, text=True, timeout=30, check=False,
        cwd=planted, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert not marker.exists(), marker.read_text()
    assert "[server]" in (etc / "agent.toml").read_text()


def test_a_control_character_in_a_join_path_is_refused_before_a_token_is_made(
    cluster: Cluster,
) -> None:
    """Review s47rtin M2: a newline in --agent-config-dir landed in a comment of the join
    script and started a line of its own, run as root on the node. Refused (exit 2), and no
    token made."""
    cluster.start_leader()
    before = cluster.cli("token", "list", "--json")
    assert before.returncode == 0, before.stderr
    for option in ("--agent-config-dir", "--agent-data-dir"):
        made = cluster.cli(
            "token", "create", "--node", "node8", "--address", next_loopback(),
            "--print-join-command", option, "/etc/tlsroll\ntouch /tmp/owned",
        )  # fmt: skip
        assert made.returncode == 2, made.stdout + made.stderr
        assert "must not hold control characters" in made.stderr and made.stdout == ""
    assert cluster.cli("token", "list", "--json").stdout == before.stdout


def test_the_nodes_paths_of_a_join_script_are_checked_for_their_form_only(
    cluster: Cluster,
) -> None:
    """The ops review of session 63: --agent-config-dir (and --agent-data-dir) name the node's
    directories, but click's path type judged them on the leader's file system: a file of the
    leader's by that name refused the node's directory. Only the form is checked (absolute,
    no control character, no '..', normalised as the script names it); what is refused
    makes no token."""
    cluster.start_leader()
    leaders_file = cluster.root / "a-file-on-the-leader"
    leaders_file.write_text("not the node's\n")
    made = cluster.cli(
        "token", "create", "--node", "node8", "--address", next_loopback(),
        "--print-join-command", "--agent-config-dir", str(leaders_file),
        "--agent-data-dir", "//srv//agent/./data/",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = re.search(r"^printf '%s\\n' '?([\w-]+\.[\w-]+)'? > ", made.stdout, re.MULTILINE)
    assert token, made.stdout
    cluster.tokens.append(token.group(1))
    assert f"mkdir -p {leaders_file}\n" in made.stdout, made.stdout
    assert f'mv -f "$tok" {leaders_file}/join-token ' in made.stdout, made.stdout
    assert 'data_dir = "/srv/agent/data"' in made.stdout, made.stdout
    assert leaders_file.read_text() == "not the node's\n"

    before = cluster.cli("token", "list", "--json")
    assert before.returncode == 0, before.stderr
    for option in ("--agent-config-dir", "--agent-data-dir"):
        for given, said in (
            ("etc/tlsroll", "must be an absolute path"),
            ("/etc/tlsroll/../x", "must not hold '..'"),
        ):
            made = cluster.cli(
                "token", "create", "--node", "node9", "--address", next_loopback(),
                "--print-join-command", option, given,
            )  # fmt: skip
            assert made.returncode == 2, made.stdout + made.stderr
            line = one_line_error(made.stderr, "tlsroll")
            assert option in line and said in line and made.stdout == "", line
    assert cluster.cli("token", "list", "--json").stdout == before.stdout


def test_a_config_whose_tables_are_not_told_apart_by_line_is_kept_from_its_values() -> None:
    """A quoted table name, a "[" at the start of a line in a multi-line string, a sub-table
    after another table: the join's merge writes what it keeps from the values (and checks
    what it wrote reads as the old [server] and [agent] and the join's tables)."""
    new = '# head\n\n[node]\nname = "a"\n\n[leader]\naddress = "192.0.2.1"\n\n[agent]\n'
    new += 'data_dir = "/d"\n'
    old = '[agent]\nport = 1\n"data_dir" = "/x"\n\n["server"]\ndriver = "exec"\nenv = {A = "b"}\n'
    old += 'text = """\n[x]\n"""\n[leader]\naddress = "192.0.2.9"\n[server.sub]\nk = [1, 2]\n'
    text, expect = join_merge.merged_text(old, new)
    assert (
        tomllib.loads(text)
        == expect
        == {
            "node": {"name": "a"},
            "leader": {"address": "192.0.2.1"},
            "agent": {"port": 1, "data_dir": "/d"},
            "server": {"driver": "exec", "env": {"A": "b"}, "text": "[x]\n", "sub": {"k": [1, 2]}},
        }
    )
    assert text.startswith("# head\n")


# --- usage errors and the admin socket ---------------------------------------------------------


def test_usage_errors_exit_2(cluster: Cluster, tmp_path: Path) -> None:
    bad_name = cluster.cli(
        "init",
        "--data-dir",
        str(tmp_path / "d"),
        "--address",
        next_loopback(),
        "--node-name",
        "Bad_Name",
    )
    assert bad_name.returncode == 2, bad_name.stderr
    assert "--node-name" in bad_name.stderr and "Traceback" not in bad_name.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made
    no_file = cluster.cli(
        "init",
        "--data-dir",
        str(tmp_path / "e"),
        "--address",
        next_loopback(),
        "--ca-passphrase-file",
        str(tmp_path / "missing"),
    )
    assert no_file.returncode == 2, no_file.stderr

    cluster.start_leader()
    # The leader's INVALID_ARGUMENT is the admin's mistake too.
    for args in (
        ("token", "create", "--node", "Bad_Name", "--address", next_loopback()),
        ("token", "create", "--node", "n1", "--address", "127.0.0.1"),
    ):
        result = cluster.cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # A name or id nothing has is a failure, not usage (review s47rtin L6); one of a shape none
    # can have is usage (session 56).
    assert cluster.cli("token", "revoke", "nosuch").returncode == 1
    assert cluster.cli("token", "revoke", "nosuchid").returncode == 2
    assert cluster.cli("plan", "--scope", "nodes", "--nodes", "ghost").returncode == 1


def test_admin_socket_out_of_reach_names_the_group_to_join() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the CLI as another user")
    root = Path(tempfile.mkdtemp(prefix="tlsroll-ops-"))
    root.chmod(0o755)  # the way to the data dir is open; the data dir itself is not
    try:
        _socket_out_of_reach(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _socket_out_of_reach(root: Path) -> None:
    with Cluster(root, next_loopback()) as c:
        c.init()
        c.start_leader()
        shutil.chown(c.data_dir, group="daemon")  # the leader's group, as install.sh makes it
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                *command("tlsroll", "tlsroll"),
                "--data-dir",
                str(c.data_dir),
                "nodes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env({"HOME": "/"}),
            check=False,
        )
        assert result.returncode == 1, result
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, result.stderr
        assert "permission denied" in line and "group daemon" in line, line
        assert "usermod -aG daemon nobody" in line, line
