"""Bring your own certificate (``--cert-dir``): the pure checks of ``leader.byo``, one test per
way a certificate is refused, with certificates made here with ``cryptography``."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from leader import byo
from tests.byo_certs import NOW, Issuer, key_pem, leaf, make_ca, pem, write_dir
from tests.cluster import AdminTokenCluster, Cluster
from tests.conftest import next_loopback
from tests.nodeside import Node, start_nodes
from tests.refserver_helper import http_request, peer_certificate
from tlsroll import bootstrap_protocol as proto
from tlsroll import pki, tls
from tlsroll.defaults import BOOTSTRAP_PORT, HTTPS_PORT
from tlsroll.v1 import agent_pb2

IP = "127.0.0.9"
DNS = "node1.praxis.lan"
NAMES = pki.Names.of("node1", [IP], [DNS])
HORIZON = dt.timedelta(days=30)


@pytest.fixture(scope="module")
def ca() -> Issuer:
    return make_ca()


def check(
    ca_pem: bytes,
    chain: bytes,
    key: object,
    *,
    names: pki.Names = NAMES,
    live: str = "",
    rotate: bool = False,
    key_mode: int | None = 0o600,
    node: str = "node1",
) -> list[str]:
    material = byo.Material(ca_pem, {node: byo.NodeMaterial(node, chain, key_pem(key), key_mode)})
    problems = byo.validate(
        material,
        {"node1": byo.Expected(names, live)},
        now=NOW,
        horizon=HORIZON,
        rotate=rotate,
    )
    return [str(p) for p in problems]


def test_a_good_certificate_passes(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS])
    assert check(ca.pem, pem(cert), key) == []


def test_an_intermediate_in_the_crt_file_is_followed(ca: Issuer) -> None:
    inter = make_ca("Praxis Issuing CA", parent=ca, path_length=0)
    cert, key = leaf(inter, [IP], [DNS])
    assert check(ca.pem, pem(cert) + inter.pem, key) == []
    # Without the intermediate the chain does not reach the CA.
    [problem] = check(ca.pem, pem(cert), key)
    assert problem.startswith("node1: node1.crt: not signed by the CA in ca.crt")


def test_wrong_chain(ca: Issuer) -> None:
    other = make_ca("Some other CA")
    cert, key = leaf(other, [IP], [DNS])
    assert check(ca.pem, pem(cert), key) == [
        "node1: node1.crt: not signed by the CA in ca.crt (issuer CN=Some other CA,"
        "O=Praxis Dr. Beispiel); use a certificate the practice CA issued, with any "
        "intermediate CA after it in the same file"
    ]


def test_key_mismatch(ca: Issuer) -> None:
    cert, _key = leaf(ca, [IP], [DNS])
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert check(ca.pem, pem(cert), other_key) == [
        "node1: node1.key: does not belong to node1.crt; give the key the certificate was made for"
    ]


def test_missing_san_entry(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP])  # the DNS name the node serves on is missing
    [problem] = check(ca.pem, pem(cert), key)
    assert "its subjectAltName lacks DNS:node1.praxis.lan, which the node serves on" in problem
    assert problem.endswith("reissue it with IP:127.0.0.9, DNS:node1.praxis.lan")


def test_no_san_at_all(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], san=False, cn=IP)  # a CN alone does not do
    problems = check(ca.pem, pem(cert), key)
    assert problems == [
        "node1: node1.crt: has no subjectAltName (clients ignore the CN); reissue it with "
        "IP:127.0.0.9, DNS:node1.praxis.lan"
    ]


def test_a_wildcard_covers_one_label(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], ["*.praxis.lan"])
    assert check(ca.pem, pem(cert), key) == []


def test_expired(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], start=dt.timedelta(days=-300), days=200)
    [problem] = check(ca.pem, pem(cert), key)
    assert problem.startswith("node1: node1.crt: it expired on 2026-08-22;")


def test_not_yet_valid(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], start=dt.timedelta(days=2))
    [problem] = check(ca.pem, pem(cert), key)
    assert "it is not valid before 2026-12-02" in problem


def test_expiring_within_the_horizon(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], start=dt.timedelta(days=-190), days=200)
    [problem] = check(ca.pem, pem(cert), key)
    assert "it expires on 2026-12-10, in 10 days (within the 30-day warning horizon" in problem


def test_wrong_eku(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    assert check(ca.pem, pem(cert), key) == [
        "node1: node1.crt: extendedKeyUsage lacks serverAuth; reissue it as a TLS server "
        "certificate (EKU)"
    ]


def test_no_eku(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], eku=None)
    [problem] = check(ca.pem, pem(cert), key)
    assert "has no extendedKeyUsage (Apple requires serverAuth)" in problem


def test_key_usage_without_digital_signature(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], digital_signature=False)
    [problem] = check(ca.pem, pem(cert), key)
    assert "keyUsage lacks digitalSignature" in problem


def test_apple_validity_at_most_398_days(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], days=399)
    [problem] = check(ca.pem, pem(cert), key)
    assert "is valid for 399 days (Apple: at most 398)" in problem


def test_apple_rsa_at_least_2048(ca: Issuer) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    cert, key = leaf(ca, [IP], [DNS], key=small)
    [problem] = check(ca.pem, pem(cert), key)
    assert "has an RSA key of 1024 bits (at least 2048)" in problem
    big = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert, key = leaf(ca, [IP], [DNS], key=big)
    assert check(ca.pem, pem(cert), key) == []


def test_apple_curves(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS], key=ec.generate_private_key(ec.SECP521R1()))
    [problem] = check(ca.pem, pem(cert), key)
    assert "an ECDSA key on secp521r1 (P-256 or P-384 only)" in problem
    cert, key = leaf(ca, [IP], [DNS], key=ec.generate_private_key(ec.SECP384R1()))
    assert check(ca.pem, pem(cert), key) == []


def test_apple_sha2_signature(ca: Issuer) -> None:
    # SHA-1 cannot even be made with this cryptography; SHA-224 is below the CA/B Forum's and
    # Apple's SHA-256 as well.
    cert, key = leaf(ca, [IP], [DNS], hash_algorithm=hashes.SHA224())
    problems = check(ca.pem, pem(cert), key)
    assert problems == [
        "node1: node1.crt: it is signed with sha224 (SHA-256, SHA-384 or SHA-512 only); "
        "reissue it with SHA-256"
    ]


def test_rotate_needs_a_new_certificate(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS])
    live = pki.fingerprint(cert)
    assert check(ca.pem, pem(cert), key, live=live, rotate=False) == []
    [problem] = check(ca.pem, pem(cert), key, live=live, rotate=True)
    assert problem == (
        "node1: node1.crt: is the certificate the node already serves; rotate-cert needs a "
        "new certificate"
    )


def test_key_readable_by_others_is_refused(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS])
    assert check(ca.pem, pem(cert), key, key_mode=0o640) == [
        "node1: node1.key: can be read by group or others (mode 0640); chmod 600 DIR/node1.key"
    ]
    assert check(ca.pem, pem(cert), key, key_mode=0o400) == []


def test_the_advice_names_the_directory_given_where_it_is_a_plain_path() -> None:
    """rev56f L2: the advice said ``chmod 600 DIR/node1.key`` whatever the directory; it names
    the one the admin gave (``CertDir.directory``), unless that is not a plain path (a space,
    a quote, a control character, which the line would not show as typed): then ``DIR``."""
    problem = byo.Problem("node1", "node1.key", "can be read by others", "chmod 600 DIR/node1.key")
    for given, said in (
        ("/root/praxis-certs/", "chmod 600 /root/praxis-certs/node1.key"),
        ("certs", "chmod 600 certs/node1.key"),
        ("/root/praxis certs", "chmod 600 DIR/node1.key"),
        ("/root/x\n; rm -rf /", "chmod 600 DIR/node1.key"),
        ("", "chmod 600 DIR/node1.key"),
    ):
        assert str(byo.Refused([problem], given)).endswith(said), given


def test_a_ca_file_or_chain_too_long_for_a_workstation_s_bundle_is_refused(ca: Issuer) -> None:
    """rev57d M1: a ca.crt of 41 CAs passed here and its nodes' bundle was then refused by
    every workstation (``pki.MAX_BUNDLE``): at most ``MAX_PRACTICE_CAS`` CA certificates in
    ca.crt and ``MAX_INTERMEDIATES`` intermediates in a node's .crt."""
    cert, key = leaf(ca, [IP], [DNS], cn="node1")
    others = b"".join(make_ca(f"Other {i}").pem for i in range(pki.MAX_PRACTICE_CAS))
    problems = check(ca.pem + others, pem(cert), key)
    assert problems == [
        f"ca: ca.crt: holds {pki.MAX_PRACTICE_CAS + 1} certificates (at most "
        f"{pki.MAX_PRACTICE_CAS}); keep the practice CA(s) the node certificates chain to"
    ], problems
    padding = b"".join(make_ca(f"Pad {i}").pem for i in range(pki.MAX_INTERMEDIATES + 1))
    problems = check(ca.pem, pem(cert) + padding, key)
    assert problems == [
        f"node1: node1.crt: holds {pki.MAX_INTERMEDIATES + 1} intermediate certificates (at "
        f"most {pki.MAX_INTERMEDIATES}); keep the node's certificate and the intermediates of "
        "its chain"
    ], problems


def test_missing_files_and_bad_ca(ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS])
    # The files are those of another node: node1's are missing.
    problems = check(ca.pem, pem(cert), key, node="node2")
    assert problems == [
        "node1: node1.crt: missing; put node1's certificate (PEM) in DIR/node1.crt",
        "node1: node1.key: missing; put node1's private key in DIR/node1.key",
    ]
    assert check(b"", pem(cert), key)[0] == (
        "ca: ca.crt: missing or empty; put the practice CA's certificate (PEM) in DIR/ca.crt"
    )
    # A leaf is not a CA: refused as the CA, and the node's chain reaches no CA.
    problems = check(pem(cert), pem(cert), key)
    assert problems[0].startswith("ca: ca.crt: CN=node is not a CA certificate")


def test_a_ca_file_with_a_problem_is_said_once_not_for_each_node(ca: Issuer) -> None:
    """Review s49cli L5: an unreadable ca.crt also gave "nX.crt: not signed by the CA in
    ca.crt" for each node. With no CA certificate to check a chain against (ca.crt unreadable,
    empty, holding none or no CA), only ca.crt's problem is said, the nodes' other checks
    kept."""
    cert, key = leaf(ca, [IP], [DNS])
    nodes = {"node1": byo.NodeMaterial("node1", pem(cert), key_pem(key), 0o600)}
    cases = [
        byo.Material(b"", nodes, {"ca.crt": "is not a regular file (a FIFO)"}),
        byo.Material(b"", nodes),
        byo.Material(b"junk", nodes),
        byo.Material(pem(cert), nodes),  # a leaf: no CA
    ]
    for material in cases:
        problems = byo.validate(
            material, {"node1": byo.Expected(NAMES, "")}, now=NOW, horizon=HORIZON
        )
        said = [str(p) for p in problems]
        assert said and all(p.startswith("ca: ca.crt: ") for p in said), said
    other, _ = leaf(make_ca("Some other CA"), [IP], [DNS])  # a CA there: still checked
    assert any("not signed by the CA" in p for p in check(ca.pem, pem(other), key))


def test_every_problem_is_reported_and_no_key_material_in_them(ca: Issuer) -> None:
    other = make_ca("Some other CA")
    cert, _key = leaf(other, [IP], days=500, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    wrong_key = ec.generate_private_key(ec.SECP256R1())
    problems = check(ca.pem, pem(cert), wrong_key, key_mode=0o644)
    joined = "\n".join(problems)
    for part in (
        "can be read by group or others",
        "not signed by the CA",
        "does not belong to node1.crt",
        "lacks DNS:node1.praxis.lan",
        "lacks serverAuth",
        "valid for 500 days",
    ):
        assert part in joined
    body = key_pem(wrong_key).decode().splitlines()[1]
    assert body not in joined
    assert body not in repr(byo.NodeMaterial("node1", pem(cert), key_pem(wrong_key)))


@pytest.mark.open_keys  # (a key others can read, on purpose)
def test_read_cert_dir(tmp_path: Path, ca: Issuer) -> None:
    cert, key = leaf(ca, [IP], [DNS])
    d = write_dir(tmp_path / "certs", ca, {"node1": (pem(cert), key)}, key_mode=0o640)
    (d / "README.txt").write_text("junk is ignored")
    (d / "Not A Node.crt").write_text("ignored too")
    (d / "node2.crt").write_bytes(pem(cert))  # a key of its own is missing
    material = byo.read_cert_dir(d)
    assert material.ca_pem == ca.pem
    assert sorted(material.nodes) == ["node1", "node2"]
    assert material.nodes["node1"].key_mode == 0o640
    assert material.nodes["node2"].key_pem == b""


# --- a real cluster -------------------------------------------------------------------------


def two_nodes(root: Path) -> tuple[Cluster, list[Node]]:
    """A leader, node1 (the leader node) and node2, each with its reference server, online."""
    addresses = [next_loopback() for _ in range(2)]
    cluster = AdminTokenCluster(root / "cluster", addresses[0], heartbeat_interval=1)
    nodes = [Node(cluster, f"node{i + 1}", a, root / f"n{i}") for i, a in enumerate(addresses)]
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        start_nodes(nodes)
        cluster.wait_for_nodes_online([n.name for n in nodes])
    except BaseException:
        close(cluster, nodes)
        raise
    return cluster, nodes


def close(cluster: Cluster, nodes: list[Node]) -> None:
    for node in nodes:
        node.close()
    cluster.close()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Cluster, list[Node]]]:
    cluster, nodes = two_nodes(tmp_path)
    try:
        yield cluster, nodes
    finally:
        close(cluster, nodes)


def real_leaf(ca: Issuer, node: Node, **kw: Any) -> tuple[x509.Certificate, Any]:
    """A good certificate for a test node (its enrolled address), valid from now."""
    now = dt.datetime.now(dt.UTC)
    return leaf(ca, [node.address], ["praxis.invalid"], now=now, cn=node.name, **kw)


def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.touch(0o600)
    path.write_text("the-practice-password-for-byo\n")
    return path


def newest(cluster: Cluster) -> dict[str, Any] | None:
    data = json.loads(cluster.cli("schema", "show", "--json").stdout)
    rollouts: list[dict[str, Any]] = data.get("rollouts", [])
    return rollouts[0] if rollouts else None


def served(address: str, port: int, ca_pem: bytes) -> x509.Certificate:
    """The certificate ``address:port`` presents to a client trusting only ``ca_pem``."""
    der = peer_certificate(address, port, tls.client_context(ca_pem))
    return x509.load_der_x509_certificate(der)


def live(node: Node) -> agent_pb2.ServerView:
    with node.stub() as stub:
        status: agent_pb2.NodeStatus = stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
    return status.server


def secret_lines(*keys: Any) -> list[str]:
    """A few lines of each key's PEM body: none may show up anywhere but the key files."""
    return [key_pem(k).decode().splitlines()[i] for k in keys for i in (1, 2)]


@pytest.mark.timeout(240)  # bringing up two nodes takes a minute on a busy machine
def test_a_refused_cert_dir_leaves_every_node_untouched(
    two: tuple[Cluster, list[Node]], tmp_path: Path
) -> None:
    """One problem on each node (node1's key is another's, node2's SAN lacks its address):
    plan and start both refuse with one line per problem, and no node has anything staged,
    nothing restarted, no rollout was recorded."""
    cluster, (node1, node2) = two
    practice = make_ca("Praxis CA")
    cert1, key1 = real_leaf(practice, node1)
    wrong_key = ec.generate_private_key(ec.SECP256R1())
    cert2, key2 = leaf(practice, ["127.0.0.1"], now=dt.datetime.now(dt.UTC), cn="node2")
    d = write_dir(
        tmp_path / "certs",
        practice,
        {"node1": (pem(cert1), wrong_key), "node2": (pem(cert2), key2)},
    )
    pids = [node1.server_pid(), node2.server_pid()]

    plan = cluster.cli("plan", "--scope", "cluster", "--cert-dir", str(d))
    start = cluster.cli(
        "rollout", "start", "--scope", "cluster", "--cert-dir", str(d),
        "--password-file", str(password_file(tmp_path)), "--yes",
    )  # fmt: skip
    for result in (plan, start):
        assert result.returncode == 1, result.stdout + result.stderr
        lines = [ln.strip() for ln in result.stderr.splitlines()]
        assert (
            "certificates from --cert-dir are refused (2 problems); no node was changed"
            in (lines[0])
        )
        assert lines[1] == (
            "node1: node1.key: does not belong to node1.crt; give the key the certificate "
            "was made for"
        )
        assert lines[2].startswith(
            f"node2: node2.crt: its subjectAltName lacks IP:{node2.address}, which the node "
            "serves on; reissue it with"
        )
    # The agent checks again (a leader is not taken at its word): a key that is not the
    # certificate's, or a certificate for another node, is refused before anything is written.
    good2, _good_key2 = real_leaf(practice, node2)
    for chain, key, why in (
        (pem(good2), wrong_key, "own certificate: the private key does not match it"),
        (pem(cert1), key1, f"own certificate: its SAN lacks IP:{node2.address}"),
    ):
        with node2.stub() as stub, pytest.raises(grpc.RpcError) as refused:
            stub.Stage(
                agent_pb2.StageRequest(
                    command=node2.command("r-direct"),
                    certificate_pem=chain,
                    ca_certificate_pem=practice.pem + cluster.ca_pem,
                    private_key_pem=key_pem(key),
                    own_certificate=True,
                ),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith(why)

    assert newest(cluster) is None  # no rollout recorded
    for node in (node1, node2):
        assert list(live(node).schemes) == ["http"]
        assert not (node.config_dir / "tlsroll-tls").exists()
        assert node.journal_query("SELECT * FROM staged") == []
    assert [node1.server_pid(), node2.server_pid()] == pids
    logs = cluster.leader.log_text() + "".join(
        n.agent.log_text() for n in (node1, node2) if n.agent
    )
    for line in secret_lines(wrong_key, key2, key1):
        assert line not in logs + plan.stdout + plan.stderr + start.stdout + start.stderr


@pytest.mark.timeout(240)  # bringing up two nodes takes a minute on a busy machine
def test_a_file_the_rollout_does_not_need_does_not_refuse_it_and_one_it_needs_does(
    two: tuple[Cluster, list[Node]], tmp_path: Path
) -> None:
    """Review s48rev3: a file that cannot be read, of a node no cluster-wide rollout touches
    (node3: no node of this cluster, its files left in the directory), refused the plan: the
    CLI, which cannot tell the nodes a rollout touches, refused every such file. The leader
    judges them with the rest: the plan passes. One of a node it touches (node2's key, a FIFO)
    refuses plan and start with why, not "missing"; outside ``--nodes node1`` it is not
    needed either. Nothing is recorded."""
    cluster, (node1, node2) = two
    practice = make_ca("Praxis CA")
    issued = {n.name: real_leaf(practice, n) for n in (node1, node2)}
    d = write_dir(
        tmp_path / "certs", practice, {name: (pem(c), k) for name, (c, k) in issued.items()}
    )
    (d / "node3.crt").mkdir()
    os.mkfifo(d / "node3.key", 0o600)
    plan = cluster.cli("plan", "--scope", "cluster", "--cert-dir", str(d))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "Certificates from --cert-dir (every check passed):" in plan.stdout
    assert "node3" not in plan.stdout + plan.stderr

    (d / "node2.key").unlink()
    os.mkfifo(d / "node2.key", 0o600)
    refusals = (
        cluster.cli("plan", "--scope", "cluster", "--cert-dir", str(d)),
        cluster.cli(
            "rollout", "start", "--scope", "cluster", "--cert-dir", str(d),
            "--password-file", str(password_file(tmp_path)), "--yes",
        ),
    )  # fmt: skip
    for result in refusals:
        assert result.returncode == 1, result.stdout + result.stderr
        lines = [ln.strip() for ln in result.stderr.splitlines()]
        assert (
            "the certificates from --cert-dir are refused (1 problem); no node was changed:"
            in lines[0]
        ), result.stderr
        assert lines[1:] == [  # the directory as given (rev56f L2: "DIR/node2.key")
            "node2: node2.key: is not a regular file (a FIFO); put node2's private key in "
            f"{d}/node2.key as a readable file"
        ], result.stderr
    only1 = cluster.cli("plan", "--scope", "nodes", "--nodes", "node1", "--cert-dir", str(d))
    assert only1.returncode == 0, only1.stdout + only1.stderr
    assert "node2" not in only1.stderr
    assert newest(cluster) is None  # no rollout recorded


@pytest.mark.timeout(360)  # two rollouts and two workstation enrolments (~80 s alone)
def test_own_certificates_are_live_and_the_bootstrap_hands_out_the_practice_ca(
    two: tuple[Cluster, list[Node]], tmp_path: Path
) -> None:
    """enable-tls --cert-dir on two real nodes: each serves exactly the given certificate
    (checked from outside trusting only the practice CA), its key is 0600 on the node, the
    bootstrap service on 9443 hands out the practice CA, and no key shows up in any log,
    output or the schema. Then rotate-cert: the same directory is refused (nothing new), a
    new one goes live."""
    cluster, nodes = two
    practice = make_ca("Praxis CA")
    inter = make_ca("Praxis Issuing CA", parent=practice, path_length=0)
    issued = {n.name: real_leaf(inter, n) for n in nodes}
    chains = {name: (pem(c) + inter.pem, k) for name, (c, k) in issued.items()}
    d = write_dir(tmp_path / "certs", practice, chains)

    plan = cluster.cli("plan", "--scope", "cluster", "--cert-dir", str(d))
    assert plan.returncode == 0, plan.stderr
    assert "Certificates from --cert-dir (every check passed):" in plan.stdout
    for name, (cert, _k) in issued.items():
        assert f"{name}: CN={name}, {pki.fingerprint(cert)}" in plan.stdout

    start = cluster.cli(
        "rollout", "start", "--scope", "cluster", "--cert-dir", str(d),
        "--password-file", str(password_file(tmp_path)), "--yes", "--wait",
        timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    rollout = newest(cluster)
    assert rollout is not None and rollout["state"] == "completed"
    for node in nodes:
        cert, _key = issued[node.name]
        assert served(node.address, HTTPS_PORT, practice.pem) == cert
        # The intermediate is served too: a client with only the root verifies the chain.
        assert list(live(node).schemes) == ["https"]
        key_files = list((node.config_dir / "tlsroll-tls").glob("*/server.key"))
        assert len(key_files) == 1 and stat.S_IMODE(key_files[0].stat().st_mode) == 0o600
        hello = hello_of(node, practice.pem)
        bundle = pki.load_certs_pem(hello.ca_bundle_pem)
        assert bundle[0] == practice.cert  # the practice CA, handed to the workstations
        # The cluster CA (it signs the workstations' client certificates), the intermediate
        # (workstations build the chain with it).
        assert bundle[1:] == [pki.load_cert_pem(cluster.ca_pem), inter.cert]

    # A later plain enable-tls leaves them alone: on https with the practice's certificate
    # is as done as with the cluster CA's.
    again = cluster.cli("plan", "--scope", "cluster")
    assert again.returncode == 1
    assert "nothing to do: every node in scope (node1, node2) already runs" in again.stderr

    # Real workstations enrol at both nodes: by the password alone, and by the practice CA's
    # pin (their client certificates still come from the cluster CA).
    pw = password_file(tmp_path)
    for node, pin in ((nodes[0], []), (nodes[1], ["--ca-pin", pki.spki_pin(practice.cert)])):
        settings = tmp_path / f"ws-{node.name}"
        enrolled = cluster.cli(
            "client", "test-connection", node.https_url(), "--password-file", str(pw),
            "--yes", "--name", f"desk-{node.name}", "--settings-dir", str(settings), *pin,
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        assert pki.load_certs_pem((settings / "ca.pem").read_bytes())[0] == practice.cert
        if not pin:  # the pin to compare with the notice's (audit s39ws L2): the CA at the
            # top of the server certificate's chain, the practice CA (the notice gives it for
            # such a server: session 56's H2); it said the cluster CA's, which checks nothing
            cluster_pin = pki.spki_pin(pki.load_cert_pem(cluster.ca_pem))
            practice_pin = pki.spki_pin(practice.cert)
            (compare,) = [x for x in enrolled.stdout.splitlines() if x.startswith("pin ")]
            assert compare.startswith("pin       compare one of "), compare
            assert practice_pin in compare and cluster_pin not in compare, compare
            assert pki.spki_pin(inter.cert) in compare  # (every CA above the server's)
            assert (
                "note      the server's certificate is not from the CA that signed this PC's "
                "certificate: right only if your practice gave its servers their own "
                "certificates (--cert-dir) and your notice gives that CA's pin" in enrolled.stdout
            ), enrolled.stdout

    # rotate-cert with the certificates already live: refused, one line per node.
    same = cluster.cli("rollout", "start", "--change", "rotate-cert", "--scope", "cluster",
                       "--cert-dir", str(d), "--yes")  # fmt: skip
    assert same.returncode == 1
    assert same.stderr.count("is the certificate the node already serves") == 2
    renewed = {n.name: real_leaf(practice, n) for n in nodes}
    d2 = write_dir(
        tmp_path / "certs2", practice, {k: (pem(c), key) for k, (c, key) in renewed.items()}
    )
    rotate = cluster.cli("rollout", "start", "--change", "rotate-cert", "--scope", "cluster",
                         "--cert-dir", str(d2), "--yes", "--wait", timeout=180)  # fmt: skip
    assert rotate.returncode == 0, rotate.stdout + rotate.stderr
    for node in nodes:
        assert served(node.address, HTTPS_PORT, practice.pem) == renewed[node.name][0]

    schema = cluster.cli("schema", "show", "--json").stdout
    everything = (
        cluster.leader.log_text()
        + "".join(n.agent.log_text() for n in nodes if n.agent)
        + schema
        + plan.stdout + start.stdout + start.stderr + rotate.stdout + rotate.stderr
    )  # fmt: skip
    keys = [k for _c, k in issued.values()] + [k for _c, k in renewed.values()]
    for line in secret_lines(*keys):
        assert line not in everything


def hello_of(node: Node, ca_pem: bytes) -> proto.Hello:
    """The bootstrap service's hello on 9443, fetched trusting only ``ca_pem``."""
    reply = http_request(
        "GET",
        f"https://{node.address}:{BOOTSTRAP_PORT}{proto.HELLO_PATH}",
        context=tls.client_context(ca_pem),
    )
    assert reply.status == 200
    return proto.parse_hello(reply.body)


# --- a leader that restarts mid-rollout (the engine harness of tests/test_engine.py) -------


async def test_a_restarted_leader_without_the_keys_fails_the_stage_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys are in the leader's memory only: a leader that restarts before a node's
    stage has none, so that node fails its stage (no agent is asked to stage anything, none
    switches) with what to do, and `rollout retry` is refused (it would have no keys)."""
    from leader.commands import NotRetriable, RolloutRequest
    from leader.rollout_core import Change, NodeState, RolloutState, Scope
    from tests.fake_agent import START
    from tests.test_engine import ADMIN, VERIFIER_1, make_world

    world = make_world(tmp_path, monkeypatch)
    practice = make_ca("Praxis CA", now=START)
    files = good_files(world, practice)
    request = RolloutRequest(
        Change.ENABLE_TLS,
        Scope.cluster(),
        auth_verifier_json=VERIFIER_1,
        own_certs=byo.Material(practice.pem, files),
    )
    first = world.boot()
    first.commands.vault = first.engine.vault  # as the daemon wires them
    row = await first.commands.start(request, ADMIN)
    assert first.engine.vault.rollout_id == row.rollout.id
    await first.crash()  # before any step ran

    second = world.boot()  # a new process: an empty vault
    row = await second.run()
    assert row.rollout.state is RolloutState.HALTED
    failed = [r for r in row.records if r.state is NodeState.FAILED]
    assert len(failed) == 1
    assert failed[0].reason.startswith(
        f"the leader holds no key from --cert-dir for {failed[0].name} (keys are kept in memory "
        "only, and the leader restarted since the rollout started); nothing changed on"
    )
    assert failed[0].reason.endswith(
        f"start again with tlsroll rollout start --change enable-tls --nodes {failed[0].name} "
        "--cert-dir DIR"
    )
    for agent in world.agents:
        assert agent.applied["stage"] == 0 and agent.applied["switch"] == 0
    with pytest.raises(NotRetriable, match="used certificates from --cert-dir"):
        await second.commands.retry(row.rollout.id, ADMIN)
    await second.stop()


async def test_the_vault_forgets_the_keys_once_the_rollout_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys of nodes the rollout never reached are dropped when it ends (here: aborted
    before any node started)."""
    from leader.commands import RolloutRequest
    from leader.rollout_core import Change, RolloutAction, Scope
    from tests.fake_agent import START
    from tests.test_engine import ADMIN, VERIFIER_1, make_world

    world = make_world(tmp_path, monkeypatch)
    practice = make_ca("Praxis CA", now=START)
    files = good_files(world, practice)
    leader_ = world.boot()
    leader_.commands.vault = leader_.engine.vault  # as the daemon wires them
    row = await leader_.commands.start(
        RolloutRequest(
            Change.ENABLE_TLS,
            Scope.cluster(),
            auth_verifier_json=VERIFIER_1,
            own_certs=byo.Material(practice.pem, files),
        ),
        ADMIN,
    )
    await leader_.commands.control(row.rollout.id, RolloutAction.ABORT, ADMIN)
    await leader_.run()
    await leader_.engine.reconcile()  # the engine loop's next pass (a tick at most)
    assert leader_.engine.vault.rollout_id == ""
    assert leader_.engine.vault.get(row.rollout.id, "alpha") is None
    await leader_.stop()


async def test_the_vault_keeps_only_the_keys_of_nodes_the_rollout_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory with every node's files, a rollout of one node: the leader holds that
    node's key only (before, every key in the directory stayed until the rollout ended)."""
    from leader.commands import RolloutRequest
    from leader.rollout_core import Change, Scope
    from tests.fake_agent import START
    from tests.test_engine import ADMIN, VERIFIER_1, make_world

    world = make_world(tmp_path, monkeypatch)
    practice = make_ca("Praxis CA", now=START)
    files = good_files(world, practice)
    one, *others = sorted(files)
    assert others
    leader_ = world.boot()
    leader_.commands.vault = leader_.engine.vault  # as the daemon wires them
    row = await leader_.commands.start(
        RolloutRequest(
            Change.ENABLE_TLS,
            Scope.of_nodes([one]),
            auth_verifier_json=VERIFIER_1,
            own_certs=byo.Material(practice.pem, files),
        ),
        ADMIN,
    )
    assert leader_.engine.vault.get(row.rollout.id, one) is not None
    assert all(leader_.engine.vault.get(row.rollout.id, n) is None for n in others)
    await leader_.stop()


async def test_the_practice_ca_is_trusted_only_with_the_rollout_that_brings_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 32's audit, L2: a ``--cert-dir`` start wrote its practice CA before the
    rollout's create, which may refuse (another rollout running, a node removed meanwhile):
    meanwhile a running rollout's outside checks trusted it, and a leader that died between
    that write and its removal kept trusting it for good. It is written in the create's own
    transaction: no one sees it before the rollout exists, and a refused create leaves none."""
    from leader.commands import RolloutRequest
    from leader.rollout_core import Change, Scope
    from tests.fake_agent import START
    from tests.test_engine import ADMIN, VERIFIER_1, make_world

    world = make_world(tmp_path, monkeypatch)
    practice = make_ca("Praxis CA", now=START)
    files = good_files(world, practice)
    leader_ = world.boot()
    leader_.commands.vault = leader_.engine.vault
    create = leader_.schema.create
    seen_before: list[bytes] = []

    def create_seeing(*args: Any, **kwargs: Any) -> Any:
        seen_before.append(leader_.schema.own_cas())  # what a running rollout would read now
        return create(*args, **kwargs)

    monkeypatch.setattr(leader_.schema, "create", create_seeing)
    row = await leader_.commands.start(
        RolloutRequest(
            Change.ENABLE_TLS,
            Scope.cluster(),
            auth_verifier_json=VERIFIER_1,
            own_certs=byo.Material(practice.pem, files),
        ),
        ADMIN,
    )
    assert seen_before == [b""]
    assert leader_.schema.own_ca(row.rollout.id) == leader_.schema.own_cas() != b""
    await leader_.stop()


def good_files(world: Any, practice: Issuer) -> dict[str, byo.NodeMaterial]:
    """A certificate of ``practice`` and its key for each of the world's nodes, as an admin's
    ``--cert-dir`` holds them."""
    from tests.fake_agent import START

    files = {}
    for agent in world.agents:
        cert, key = leaf(practice, list(agent.names.ips), list(agent.names.dns), now=START)
        files[agent.name] = byo.NodeMaterial(agent.name, pem(cert), key_pem(key), 0o600)
    return files


def _defect(kind: str, ca: Issuer, names: pki.Names) -> tuple[bytes, Any]:
    """A certificate and key for ``names`` with one defect."""
    from tests.fake_agent import START

    ips, dns = list(names.ips), list(names.dns)
    if kind == "wrong chain":
        cert, key = leaf(make_ca("Some other CA", now=START), ips, dns, now=START)
    elif kind == "key mismatch":
        cert, _ = leaf(ca, ips, dns, now=START)
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "missing SAN":
        cert, key = leaf(ca, ips, now=START)
    elif kind == "expired":
        cert, key = leaf(ca, ips, dns, now=START, start=dt.timedelta(days=-300), days=200)
    elif kind == "expiring":
        cert, key = leaf(ca, ips, dns, now=START, start=dt.timedelta(days=-190), days=200)
    elif kind == "wrong EKU":
        cert, key = leaf(ca, ips, dns, now=START, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    else:  # Apple: more than 398 days
        cert, key = leaf(ca, ips, dns, now=START, days=500)
    return pem(cert), key


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("wrong chain", "not signed by the CA in ca.crt"),
        ("key mismatch", "does not belong to bravo.crt"),
        ("missing SAN", "its subjectAltName lacks DNS:bravo.praxis.lan"),
        ("expired", "it expired on"),
        ("expiring", "within the 30-day warning horizon"),
        ("wrong EKU", "extendedKeyUsage lacks serverAuth"),
        ("apple validity", "is valid for 500 days (Apple: at most 398)"),
    ],
)
async def test_each_defect_refuses_the_rollout_before_any_node_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, words: str
) -> None:
    """One defective certificate (bravo's) among good ones: the start is refused with that
    problem only, no rollout is recorded, no agent is asked anything, nothing is kept."""
    from leader.commands import RolloutRequest
    from leader.rollout_core import Change, Scope
    from tests.fake_agent import START
    from tests.test_engine import ADMIN, VERIFIER_1, make_world

    world = make_world(tmp_path, monkeypatch)
    practice = make_ca("Praxis CA", now=START)
    files = {}
    for agent in world.agents:
        if agent.name == "bravo":
            chain, key = _defect(kind, practice, agent.names)
        else:
            cert, key = leaf(practice, list(agent.names.ips), list(agent.names.dns), now=START)
            chain = pem(cert)
        files[agent.name] = byo.NodeMaterial(agent.name, chain, key_pem(key), 0o600)
    leader_ = world.boot()
    leader_.commands.vault = leader_.engine.vault
    request = RolloutRequest(
        Change.ENABLE_TLS,
        Scope.cluster(),
        auth_verifier_json=VERIFIER_1,
        own_certs=byo.Material(practice.pem, files),
    )
    with pytest.raises(byo.Refused) as refused:
        await leader_.commands.start(request, ADMIN)
    [problem] = refused.value.problems
    assert problem.node == "bravo" and words in str(problem)
    assert leader_.schema.latest() is None
    assert leader_.schema.own_cas() == b""
    assert leader_.engine.vault.rollout_id == ""
    await leader_.engine.reconcile()
    for agent in world.agents:
        assert sum(agent.applied.values()) == 0
    await leader_.stop()


async def test_the_plan_warns_that_nodes_already_on_https_keep_their_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """enable-tls --cert-dir skips a node already on https (level-based planning): the plan
    says it keeps the certificate it serves and how to give it the practice's."""
    import types

    from leader.admin_service import AdminService
    from leader.cli.rollout import rollout_request
    from leader.commands import Planned
    from leader.rollout_core import Change, NodeRecord, NodeState, Rollout, Scope
    from leader.service import LeaderState
    from tests.fake_agent import START
    from tests.test_engine import make_world, open_store
    from tlsroll.v1 import admin_pb2

    world = make_world(tmp_path, monkeypatch)
    store = open_store(world.path)
    rollout = Rollout(
        id="r1", change=Change.ENABLE_TLS, scope=Scope.cluster(), order=("bravo", "alpha"), epoch=1
    )
    records = (
        NodeRecord("bravo", NodeState.PENDING),
        NodeRecord("alpha", NodeState.SKIPPED, reason="already done: on https"),
    )

    async def plan(_request: object) -> Planned:
        return Planned(rollout, records)

    service = AdminService(
        LeaderState(store, world.ca, lambda: START, 1),
        # (blocked_at_once: no node of this plan is blocked; review s67 rev2 M3's question)
        types.SimpleNamespace(plan=plan, blocked_at_once=lambda rollout, nodes: None),  # type: ignore[arg-type]
        types.SimpleNamespace(  # type: ignore[arg-type]
            active=lambda: None, clients_report=lambda names: ([], {})
        ),
    )
    request = rollout_request("cluster", None, 1, "node", "enable-tls")
    request.cert_dir.CopyFrom(admin_pb2.CertDir(ca_pem=b"x"))
    reply = await service.PlanRollout(request, None)  # type: ignore[arg-type]
    assert (
        "alpha already run(s) https and keep(s) the certificate served now; to give them "
        "yours: --change rotate-cert --cert-dir DIR"
    ) in reply.warnings
    request.ClearField("cert_dir")
    reply = await service.PlanRollout(request, None)  # type: ignore[arg-type]
    assert not any("keep(s) the certificate" in w for w in reply.warnings)
    store.close()


async def test_the_expiry_watch_warns_of_a_practice_ca_that_ends_before_its_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s46rt1 L4: a ``--cert-dir`` rollout's practice CA is checked once, at the start
    (beyond the horizon); the expiry watch saw only the served leaves, and a leaf its CA does
    not outlive (a CA that does not clamp) ended its chain with no warning, its row "ok". The
    CA here ends 59 days after the rollout, the leaves 199 days: 40 days on, each node's server
    row ends with the CA, within the horizon, and its advice names the CA."""
    from leader import changes
    from leader.commands import RolloutRequest
    from leader.expiry import ExpiryWatch
    from leader.rollout_core import Change, RolloutState, Scope
    from tests.fake_agent import START
    from tests.test_engine import ADMIN, VERIFIER_1, make_world

    world = make_world(tmp_path, monkeypatch)
    practice = make_ca("Praxis CA", now=START, days=60)
    files = {}
    for agent in world.agents:  # 200 days, from a day before START
        ips, dns = list(agent.names.ips), list(agent.names.dns)
        cert, key = leaf(practice, ips, dns, now=START, cn=agent.names.common_name)
        files[agent.name] = byo.NodeMaterial(agent.name, pem(cert), key_pem(key), 0o600)
    # The fake nodes judge a certificate by the cluster CA only; the outside check of a
    # --cert-dir rollout trusts the practice CA (as in test_engine's).
    check = world.agents.outside_check

    async def outside(live: str, closed: str, _ca: bytes, fingerprint: str = "") -> Any:
        return await check(live, closed, world.ca.cert_pem, fingerprint)

    monkeypatch.setattr(changes, "outside_check", outside)
    leader_ = world.boot()
    leader_.commands.vault = leader_.engine.vault  # as the daemon wires them
    await leader_.commands.start(
        RolloutRequest(
            Change.ENABLE_TLS,
            Scope.cluster(),
            auth_verifier_json=VERIFIER_1,
            own_certs=byo.Material(practice.pem, files),
        ),
        ADMIN,
    )
    row = await leader_.run()
    assert row.rollout.state is RolloutState.COMPLETED
    at = START + dt.timedelta(days=40)
    watch = ExpiryWatch(leader_.store, leader_.schema, world.ca.cert, list, lambda: at)
    servers = [e for e in watch.check() if e.kind == "server"]
    assert sorted(e.subject for e in servers) == sorted(files)
    for e in servers:
        leaf_cert = pki.load_cert_pem(files[e.subject].chain_pem)
        assert e.fingerprint == pki.fingerprint(leaf_cert)
        assert e.not_after == practice.cert.not_valid_after_utc < leaf_cert.not_valid_after_utc
        assert e.warning(at) and not e.ends_with_ca
        assert "its chain's CN=Praxis CA,O=Praxis Dr. Beispiel ends then" in e.advice
        assert f"--nodes {e.subject} --cert-dir DIR" in e.advice
    # Ten days after the rollout, the CA has 49 days left: beyond the horizon, no warning.
    assert not [e for e in watch.check() if e.warning(START + dt.timedelta(days=10))]
    await leader_.stop()


def test_the_chain_end_kept_is_that_of_its_certificate_that_ends_first() -> None:
    """``byo.chain_ends``: of each leaf, the chain's certificate that ends first (an
    intermediate from the node's file, or the practice CA), only where it ends before the
    leaf; a leaf its whole chain outlives is not listed."""
    root = make_ca("Praxis Root", days=3650)
    inter = make_ca("Praxis Issuing CA", parent=root, path_length=0, days=100)
    short, short_key = leaf(inter, ["10.0.0.1"], days=60)
    long, long_key = leaf(inter, ["10.0.0.2"], days=200)
    nodes = {
        "a": byo.NodeMaterial("a", pem(short) + inter.pem, key_pem(short_key), 0o600),
        "b": byo.NodeMaterial("b", pem(long) + inter.pem, key_pem(long_key), 0o600),
    }
    ends = byo.chain_ends(byo.Material(root.pem, nodes), ["a", "b"])
    assert ends == {
        pki.fingerprint(long): (
            inter.cert.subject.rfc4514_string(),
            inter.cert.not_valid_after_utc,
        ),
        pki.fingerprint(short): None,  # its chain outlives it: clears an earlier end
    }
    assert byo.chain_ends(byo.Material(root.pem, nodes), ["a"]) == {pki.fingerprint(short): None}


def test_a_chain_renewed_since_clears_the_end_an_earlier_rollout_recorded(tmp_path: Path) -> None:
    """Review s47rev5 M1: the chain ends of every ``--cert-dir`` rollout were merged by the
    certificate's fingerprint, and a later rollout whose chain outlives it recorded nothing: the
    same leaves brought again under a renewed practice CA kept the old CA's end for good (a
    warning no rotate-cert could clear: it refuses the certificate a node already serves). The
    newest rollout that brought a certificate decides now. (r1's nodes serve its
    certificates: the rows of certificates no node serves are dropped, s48.)"""
    from leader.schema_store import SchemaStore
    from leader.store import Store
    from tests.test_schema_store import NOW, end, new_rollout
    from tests.test_viewer_parts import drive_rollout

    store = Store(tmp_path / "leader.sqlite3")
    schema = SchemaStore(store.db)
    old_end = NOW + dt.timedelta(days=60)
    aa, bb = "sha256:r1-a", "sha256:r1-b"  # what drive_rollout records of r1's nodes

    def rollout(
        rollout_id: str, ends: dict[str, tuple[str, dt.datetime] | None], *, done: bool = False
    ) -> None:
        original = schema.create

        def create(*args: Any, **kwargs: Any) -> Any:
            return original(*args, **kwargs, own_chain_ends=ends)

        schema.create = create  # type: ignore[method-assign]
        try:
            new_rollout(schema, rollout_id)
        finally:
            schema.create = original  # type: ignore[method-assign]
        if done:
            row = schema.active()
            assert row is not None
            drive_rollout(schema, row)
        else:
            end(schema)

    rollout("r1", {aa: ("CN=Praxis CA", old_end), bb: ("CN=Praxis CA", old_end)}, done=True)
    assert {f for f, _ in schema.served_certificates().values()} == {aa, bb}
    assert schema.own_chain_ends() == {
        aa: ("CN=Praxis CA", old_end),
        bb: ("CN=Praxis CA", old_end),
    }
    rollout("r0", {aa: None})  # later (its epoch), though its id sorts first
    assert schema.own_chain_ends() == {bb: ("CN=Praxis CA", old_end)}
    store.close()


def test_the_chain_end_kept_does_not_depend_on_the_order_of_the_bundle() -> None:
    """Review s47rev5 L3: ``byo.chain_ends`` took the first CA of the bundle (or of the node's
    file) that signed a link, so a bundle with the practice CA and its renewal (same key and
    subject) recorded the old CA's end or none by their order; clients, given the whole bundle,
    take the path that still holds. Now the path whose earliest end is latest counts, in
    either order, for the practice CA and for an intermediate alike."""
    key = ec.generate_private_key(ec.SECP256R1())
    old = make_ca("Praxis CA", days=60, key=key)
    renewed = make_ca("Praxis CA", days=3650, key=key)
    cert, cert_key = leaf(old, ["10.0.0.1"], days=200)
    nodes = {"a": byo.NodeMaterial("a", pem(cert), key_pem(cert_key), 0o600)}
    for bundle in (old.pem + renewed.pem, renewed.pem + old.pem):
        assert byo.chain_ends(byo.Material(bundle, nodes), ["a"]) == {pki.fingerprint(cert): None}
    # Only the old one: its end is the chain's.
    assert byo.chain_ends(byo.Material(old.pem, nodes), ["a"]) == {
        pki.fingerprint(cert): (old.cert.subject.rfc4514_string(), old.cert.not_valid_after_utc)
    }

    root = make_ca("Praxis Root", days=3650)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter_old = make_ca("Praxis Issuing CA", parent=root, path_length=0, days=60, key=inter_key)
    inter_new = make_ca("Praxis Issuing CA", parent=root, path_length=0, days=1000, key=inter_key)
    cert, cert_key = leaf(inter_old, ["10.0.0.2"], days=200)
    for inters in (inter_old.pem + inter_new.pem, inter_new.pem + inter_old.pem):
        nodes = {"b": byo.NodeMaterial("b", pem(cert) + inters, key_pem(cert_key), 0o600)}
        assert byo.chain_ends(byo.Material(root.pem, nodes), ["b"]) == {pki.fingerprint(cert): None}


def test_validate_takes_the_path_that_holds_not_the_first_ca_listed(ca: Issuer) -> None:
    """``byo.validate`` took the first CA in the node's file (or the bundle) that signed a link
    (``pki.chain_to``): an old intermediate listed before its renewal (same key and subject)
    that ends within the warning horizon refused a directory clients accept (they take the
    path that holds). It goes by ``byo.chain_ends``' rule now (``_longest_path``: of the leaf's
    paths, the one whose earliest end is latest), in either order; with the old one alone,
    or a renewal that ends within the horizon too, it is refused as before."""
    inter_key = ec.generate_private_key(ec.SECP256R1())
    old = make_ca("Praxis Issuing CA", parent=ca, path_length=0, days=20, key=inter_key)
    new = make_ca("Praxis Issuing CA", parent=ca, path_length=0, days=1000, key=inter_key)
    short = make_ca("Praxis Issuing CA", parent=ca, path_length=0, days=25, key=inter_key)
    cert, key = leaf(old, [IP], [DNS])
    for inters in (old.pem + new.pem, new.pem + old.pem):
        assert check(ca.pem, pem(cert) + inters, key) == []
    who = old.cert.subject.rfc4514_string()
    for inters in (old.pem, old.pem + short.pem, short.pem + old.pem):
        [problem] = check(ca.pem, pem(cert) + inters, key)
        assert problem.startswith(f"node1: node1.crt: the intermediate {who} expires on "), problem
        assert "renew the intermediate CA" in problem


def test_a_ca_in_the_ca_file_beside_its_renewal_is_not_refused_for_its_end() -> None:
    """The same in DIR/ca.crt (a root and an intermediate are allowed there): an old CA
    certificate that ends within the warning horizon, beside its renewal (same subject and
    key, valid beyond it), is on no path clients take and no longer refuses the directory, in
    either order. Alone, beside a renewal that ends within the horizon too, or expired, it
    is refused as before."""
    key = ec.generate_private_key(ec.SECP256R1())
    old = make_ca("Praxis CA", days=20, key=key)
    renewed = make_ca("Praxis CA", days=3650, key=key)
    short = make_ca("Praxis CA", days=25, key=key)
    expired = make_ca("Praxis CA", now=NOW - dt.timedelta(days=30), days=10, key=key)
    cert, cert_key = leaf(old, [IP], [DNS])
    for bundle in (old.pem + renewed.pem, renewed.pem + old.pem):
        assert check(bundle, pem(cert), cert_key) == []
    who = old.cert.subject.rfc4514_string()
    for bundle in (old.pem, old.pem + short.pem, expired.pem + renewed.pem):
        problems = check(bundle, pem(cert), cert_key)
        assert problems and all(p.startswith(f"ca: ca.crt: the CA {who} ") for p in problems)


async def own_cert_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, practice: Issuer
) -> tuple[Any, Any]:
    """The engine harness of tests/test_engine.py (a real leader's commands, engine and
    store; fake agents) wired for ``--cert-dir``: (world, leader)."""
    from leader import changes
    from tests.test_engine import make_world

    world = make_world(tmp_path, monkeypatch)
    # The fake nodes judge a certificate by the cluster CA only; the outside check of a
    # --cert-dir rollout trusts the practice CA (as in test_engine's).
    check = world.agents.outside_check

    async def outside(live: str, closed: str, _ca: bytes, fingerprint: str = "") -> Any:
        return await check(live, closed, world.ca.cert_pem, fingerprint)

    monkeypatch.setattr(changes, "outside_check", outside)
    leader_ = world.boot()
    leader_.commands.vault = leader_.engine.vault  # as the daemon wires them
    return world, leader_


async def own_rollout(world: Any, leader_: Any, change: Any, practice: Issuer) -> dict[str, str]:
    """A ``--cert-dir`` rollout of ``change`` over every node with new leaves (200 days from a
    day before START) under ``practice``, run to its end: each node's leaf fingerprint."""
    from leader.commands import RolloutRequest
    from leader.rollout_core import Change, RolloutState, Scope
    from tests.fake_agent import START
    from tests.test_engine import ADMIN, VERIFIER_1

    files = {}
    for agent in world.agents:
        ips, dns = list(agent.names.ips), list(agent.names.dns)
        cert, key = leaf(practice, ips, dns, now=START, cn=agent.names.common_name)
        files[agent.name] = byo.NodeMaterial(agent.name, pem(cert), key_pem(key), 0o600)
    await leader_.commands.start(
        RolloutRequest(
            change,
            Scope.cluster(),
            auth_verifier_json=VERIFIER_1 if change is Change.ENABLE_TLS else "",
            own_certs=byo.Material(practice.pem, files),
        ),
        ADMIN,
    )
    row = await leader_.run()
    assert row.rollout.state is RolloutState.COMPLETED
    return {n: pki.fingerprint(pki.load_cert_pem(m.chain_pem)) for n, m in files.items()}


async def test_the_viewer_marks_near_what_the_expiry_watch_warns_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The viewer marked the leader's, the viewer's, the CA's and the server certificates
    "near expiry" on a fixed 30 days, whatever ``expiry_warning_days``, and a server certificate
    of the practice's own by its own end, not its chain's (which ends first here: the practice
    CA, 60 days, the leaves 200). It goes by the expiry watch's rule and horizons now: at every
    moment and warning horizon tried, it lists exactly what the watch warns of, with the same
    end (and the chain's certificate that ends first)."""
    from html import unescape

    from leader.expiry import ExpiryWatch
    from leader.rollout_core import Change
    from leader.viewer import pages
    from leader.viewer.i18n import Words
    from leader.viewer.snapshot import Reader
    from tests.conftest import none_fresh
    from tests.fake_agent import START

    practice = make_ca("Praxis CA", now=START, days=60)
    world, leader_ = await own_cert_leader(tmp_path, monkeypatch, practice)
    await own_rollout(world, leader_, Change.ENABLE_TLS, practice)
    names = pki.Names.of("leader", ["10.9.9.9"])
    own = [
        (kind, world.ca.issue(pki.generate_key().public_key(), names, now=START, lifetime=life))
        for kind, life in (("leader", dt.timedelta(days=100)), ("viewer", dt.timedelta(days=20)))
    ]
    lifetime = dt.timedelta(days=30)  # agent_cert_lifetime
    seen = set()
    for warning_days in (10, 30, 90):
        for day in (0, 10, 15, 25, 35, 45, 59, 61, 100, 150, 201, 3000, 3300):
            at = START + dt.timedelta(days=day)
            watch = ExpiryWatch(
                leader_.store,
                leader_.schema,
                world.ca.cert,
                lambda: own,
                lambda at=at: at,  # type: ignore[misc]
                warning_days=warning_days,
                agent_lifetime=lifetime,
            )
            reader = Reader(
                leader_.store,
                leader_.schema,
                lambda at=at: at,  # type: ignore[misc]
                lambda _: True,
                [("ca", world.ca.cert), *own],
                agent_near=lifetime / 2,
                fresh=none_fresh,
                warning=dt.timedelta(days=warning_days),
            )
            warned = {(e.kind, e.subject, e.not_after, e.chain) for e in watch.warnings()}
            near = {(c.kind, c.subject, c.end, c.chain) for c in reader.read().near_expiry}
            assert near == warned, (warning_days, day)
            seen |= {(warning_days, day, kind) for kind, *_ in near}
    end = practice.cert.not_valid_after_utc
    subject = practice.cert.subject.rfc4514_string()
    # What the old fixed 30 days missed, or marked the watch does not warn of:
    assert (30, 35, "server") in seen  # the chain (the practice CA) ends in 25 days
    assert (90, 0, "server") in seen and (90, 10, "leader") in seen  # 90 days: the horizon
    assert (10, 0, "viewer") not in seen and (10, 15, "viewer") in seen  # 20 days, 5 left
    assert (10, 45, "server") not in seen and (10, 59, "server") in seen
    assert (30, 3300, "ca") in seen and (30, 3000, "ca") not in seen  # a year ahead
    at = START + dt.timedelta(days=35)
    snap = Reader(
        leader_.store,
        leader_.schema,
        lambda: at,
        lambda _: True,
        [],
        fresh=none_fresh,
    ).read()
    servers = [c for c in snap.near_expiry if c.kind == "server"]
    assert sorted(c.subject for c in servers) == sorted(a.name for a in world.agents)
    assert all(c.end == end < c.not_after and c.chain == subject for c in servers)
    # The page's row: the chain's end, and which of its certificates ends then.
    words = Words.of("en")
    html = unescape(pages.schema_page(snap, words, pages.PageContext("10.0.0.1", "t", at, "/e")))
    for c in servers:
        assert (
            f'<tr data-kind="server"><th scope="row">server (https, 8443)</th><td>{c.subject} '
            f'<span class="chain">(its chain\'s {subject} ends first)</span></td>'
            f"<td>{words.when(end)}</td><td>25</td></tr>"
        ) in html
    await leader_.stop()


async def test_a_removed_node_s_server_certificate_leaves_the_viewer_as_it_leaves_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nodes remove`` takes a node's served certificate out of the expiry watch (it lists
    enrolled nodes only); the viewer's "near expiry" and ``/metrics`` kept listing it, later
    as expired, for good (review s48rev2 M1): they go by the same enrolled nodes now."""
    from leader.expiry import ExpiryWatch
    from leader.rollout_core import Change
    from leader.viewer.snapshot import Reader
    from tests.conftest import none_fresh
    from tests.fake_agent import START

    practice = make_ca("Praxis CA", now=START, days=60)
    world, leader_ = await own_cert_leader(tmp_path, monkeypatch, practice)
    await own_rollout(world, leader_, Change.ENABLE_TLS, practice)
    names = sorted(a.name for a in world.agents)
    gone = names[-1]
    leader_.store.remove_node(gone, now=START + dt.timedelta(days=1), actor="admin:test")
    lifetime = dt.timedelta(days=30)
    for day in (40, 100, 2000):  # the chain (the practice CA) near its end, then long ended
        at = START + dt.timedelta(days=day)
        watch = ExpiryWatch(
            leader_.store,
            leader_.schema,
            world.ca.cert,
            lambda: [],
            lambda at=at: at,  # type: ignore[misc]
            warning_days=30,
            agent_lifetime=lifetime,
        )
        reader = Reader(
            leader_.store,
            leader_.schema,
            lambda at=at: at,  # type: ignore[misc]
            lambda _: True,
            [("ca", world.ca.cert)],
            agent_near=lifetime / 2,
            fresh=none_fresh,
            warning=dt.timedelta(days=30),
        )
        warned = {(e.kind, e.subject) for e in watch.warnings()}
        snap = reader.read()
        near = {(c.kind, c.subject) for c in snap.near_expiry}
        assert near == warned, (day, sorted(near - warned), sorted(warned - near))
        assert ("server", gone) not in {(c.kind, c.subject) for c in snap.certificates}
    assert ("server", names[0]) in warned  # (the others' are still listed)
    await leader_.stop()


OWN_LABELS = ("kind", "subject", "fingerprint", "chain")


def gauge_samples(text: bytes, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples of the gauge ``name`` in the metrics ``text``, by their ``labels``' values
    (kind, subject, fingerprint if none are given)."""
    from prometheus_client.parser import text_string_to_metric_families

    labels = labels or ("kind", "subject", "fingerprint")
    return {
        tuple(s.labels[k] for k in labels): s.value
        for f in text_string_to_metric_families(text.decode())
        if f.name == name
        for s in f.samples
    }


async def test_the_metrics_give_the_end_the_watch_warns_by_and_the_certificate_s_own_beside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s48: ``/metrics`` gave a ``--cert-dir`` certificate its own end (the leaves here:
    200 days) where its chain (the practice CA: 60 days) ends first, so a Prometheus alert on
    ``tlsroll_certificate_expiry_timestamp_seconds`` missed the end the expiry watch warns of.
    That metric (same name and labels) gives the end clients go by now, and
    ``tlsroll_certificate_own_expiry_timestamp_seconds`` the certificate's own end, with the
    chain's certificate that ends first, for those only. An alert ``expiry - time() < 30 days``
    fires for the servers (and, a year ahead, the CA's) as the watch warns of them."""
    from leader.expiry import ExpiryWatch
    from leader.rollout_core import Change
    from leader.viewer import metrics
    from leader.viewer.snapshot import Reader
    from tests.conftest import none_fresh
    from tests.fake_agent import START

    practice = make_ca("Praxis CA", now=START, days=60)
    world, leader_ = await own_cert_leader(tmp_path, monkeypatch, practice)
    served = await own_rollout(world, leader_, Change.ENABLE_TLS, practice)
    ends = {n: end for n, (_, end) in leader_.schema.served_certificates().items()}
    end = practice.cert.not_valid_after_utc
    subject = practice.cert.subject.rfc4514_string()
    at = START + dt.timedelta(days=35)
    reader = Reader(
        leader_.store,
        leader_.schema,
        lambda: at,
        lambda _: True,
        [("ca", world.ca.cert)],
        fresh=none_fresh,
    )
    text = metrics.render(reader.read(times=True))
    expiry = gauge_samples(text, "tlsroll_certificate_expiry_timestamp_seconds")
    for name, fingerprint in served.items():
        assert ends[name] > end
        assert expiry[("server", name, fingerprint)] == end.timestamp()
    assert gauge_samples(text, "tlsroll_certificate_own_expiry_timestamp_seconds", *OWN_LABELS) == {
        ("server", name, fingerprint, subject): ends[name].timestamp()
        for name, fingerprint in served.items()
    }
    assert expiry[("ca", "", pki.fingerprint(world.ca.cert))] == (
        world.ca.cert.not_valid_after_utc.timestamp()
    )
    watch = ExpiryWatch(leader_.store, leader_.schema, world.ca.cert, list, lambda: at)
    warned = {(e.kind, e.subject, e.fingerprint) for e in watch.warnings() if e.kind == "server"}
    alert = {
        labels
        for labels, value in expiry.items()
        if labels[0] == "server" and value - at.timestamp() < 30 * 86400
    }
    assert alert == warned and len(alert) == len(served)
    await leader_.stop()


async def test_the_viewer_lists_the_workstations_the_expiry_watch_warns_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s48: the expiry watch warns of workstation certificates (and, a name's newest,
    for ``expiry_warning_days`` after its end: review s46rt1 M2), the viewer's "near expiry"
    left them out. It lists them by the watch's rule now (``watched_workstations``): at every
    moment and horizon tried, what the watch warns of; the page names them in German and
    English (an ended one "abgelaufen", "expired"), and ``/metrics`` gives their ends."""
    from html import unescape

    from leader.expiry import ExpiryWatch
    from leader.store import IssuedCert
    from leader.viewer import metrics, pages
    from leader.viewer.i18n import Words
    from leader.viewer.snapshot import Reader
    from tests.conftest import none_fresh
    from tests.fake_agent import START
    from tests.test_engine import make_world

    world = make_world(tmp_path, monkeypatch)
    leader_ = world.boot()
    store = leader_.store
    node = next(iter(world.agents)).name
    day = dt.timedelta(days=1)

    def record(serial: str, name: str, ends: dt.timedelta) -> None:
        store.record_certificate(
            IssuedCert(serial, "workstation", name, node, f"sha256:{serial}", START, START + ends),
            actor="t",
            now=START,
        )

    record("a1", "ws-far", 300 * day)
    record("b1", "ws-soon", 20 * day)
    record("c1", "ws-ended", -5 * day)  # the PC lost it five days ago: listed, expired
    record("d1", "ws-again", -5 * day)  # enrolled again since: the old one is not listed
    record("d2", "ws-again", 200 * day)
    record("e1", "ws-revoked", 10 * day)
    store.revoke("ws-revoked", reason="lost", now=START, actor="t")
    record("f1", "ws-long-gone", -40 * day)
    lifetime = dt.timedelta(days=30)
    seen = set()
    for warning_days in (10, 30, 90):
        for days in (0, 4, 10, 19, 21, 25, 40, 100, 195, 250, 301):
            at = START + days * day
            watch = ExpiryWatch(
                store,
                leader_.schema,
                world.ca.cert,
                list,
                lambda at=at: at,  # type: ignore[misc]
                warning_days=warning_days,
                agent_lifetime=lifetime,
            )
            reader = Reader(
                store,
                leader_.schema,
                lambda at=at: at,  # type: ignore[misc]
                lambda _: True,
                [("ca", world.ca.cert)],
                agent_near=lifetime / 2,
                fresh=none_fresh,
                warning=dt.timedelta(days=warning_days),
            )
            warned = {(e.kind, e.subject, e.not_after) for e in watch.warnings()}
            near = {(c.kind, c.subject, c.end) for c in reader.read().near_expiry}
            assert near == warned, (warning_days, days)
            seen |= {(warning_days, days, s) for k, s, _ in near if k == "workstation"}
    assert {s for w, d, s in seen if (w, d) == (30, 0)} == {"ws-soon", "ws-ended"}
    assert (10, 4, "ws-ended") in seen and (10, 10, "ws-ended") not in seen  # 15 days after
    assert (30, 195, "ws-again") in seen and (30, 100, "ws-again") not in seen
    assert "ws-revoked" not in {s for *_, s in seen}
    assert {(w, d) for w, d, s in seen if s == "ws-long-gone"} == {
        (90, d)
        for d in (0, 4, 10, 19, 21, 25, 40)  # 90 days after its end, not 10 or 30
    }

    snap = Reader(store, leader_.schema, lambda: START, lambda _: True, [], fresh=none_fresh).read(
        times=True
    )
    context = pages.PageContext("10.0.0.1", "t", START, "/e")
    for lang, kind, expired in (
        ("de", "Arbeitsplatz (Client-Zertifikat)", "abgelaufen"),
        ("en", "workstation (client certificate)", "expired"),
    ):
        words = Words.of(lang)
        html = unescape(pages.schema_page(snap, words, context))
        row = '<tr data-kind="workstation"><th scope="row">{}</th><td>{}</td><td>{}</td><td>{}</td>'
        soon, ended = START + 20 * day, START - 5 * day
        assert row.format(kind, "ws-soon", words.when(soon), 20) in html, lang
        assert (
            row.format(kind, "ws-ended", words.when(ended), f"<strong>{expired}</strong>") in html
        )
        assert "ws-far" not in html and "ws-revoked" not in html
    expiry = gauge_samples(metrics.render(snap), "tlsroll_certificate_expiry_timestamp_seconds")
    assert {
        (labels[1], value) for labels, value in expiry.items() if labels[0] == "workstation"
    } == {
        (name, (START + ends * day).timestamp())
        for name, ends in (("ws-far", 300), ("ws-soon", 20), ("ws-ended", -5), ("ws-again", 200))
    }
    await leader_.stop()


def own_chain_rows(leader_: Any) -> list[str]:
    with leader_.store.db.read() as db:
        rows = db.execute("SELECT key FROM meta WHERE key LIKE 'own_chain/%'").fetchall()
    return sorted(str(r[0]) for r in rows)


async def test_the_chain_ends_kept_do_not_grow_with_each_rollout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s47rev5 Nit: each ``--cert-dir`` rollout kept its chain ends
    (``own_chain/<rollout id>`` in ``meta``) for good, one row more per rollout. A rollout's
    creation drops, in its transaction, those no served certificate's end depends on: over an
    enable-tls and four rotations the table holds the rows of the rollout the nodes' current
    certificates came from and of the newest, and the expiry watch still warns of the chain's
    end of what the nodes serve."""
    from leader.expiry import ExpiryWatch
    from leader.rollout_core import Change
    from tests.fake_agent import START

    practice = make_ca("Praxis CA", now=START, days=60)
    world, leader_ = await own_cert_leader(tmp_path, monkeypatch, practice)
    counts = []
    for change in (Change.ENABLE_TLS, *[Change.ROTATE_CERT] * 4):
        served = await own_rollout(world, leader_, change, practice)
        counts.append(len(own_chain_rows(leader_)))
        assert {n: f for n, (f, _) in leader_.schema.served_certificates().items()} == served
    assert counts == [1, 2, 2, 2, 2]
    newest = leader_.schema.latest()
    assert f"own_chain/{newest.rollout.id}" in own_chain_rows(leader_)
    at = START + dt.timedelta(days=40)
    watch = ExpiryWatch(leader_.store, leader_.schema, world.ca.cert, list, lambda: at)
    servers = {e.subject: e for e in watch.warnings() if e.kind == "server"}
    assert {n: e.fingerprint for n, e in servers.items()} == served
    assert all(e.not_after == practice.cert.not_valid_after_utc for e in servers.values())
    await leader_.stop()


# --- what the notices say after --cert-dir rollouts (session 56's README walk, H2) ----------


def notice(cluster: Cluster, *args: str) -> str:
    run = cluster.cli("notify", "--lang", "en", *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def notice_commands(text: str) -> dict[str, list[str]]:
    """Per node, the test-connection command the notice gives (its arguments after
    ``tlsroll``)."""
    found = {}
    for line in text.splitlines():
        name, sep, rest = line.strip().lstrip("-* ").partition(": tlsroll client test-connection ")
        if sep:
            found[name] = ["client", "test-connection", *rest.split()]
    return found


def enrol(cluster: Cluster, args: list[str], pw: Path, settings: Path, name: str) -> Any:
    return cluster.cli(
        *args, "--password-file", str(pw), "--yes", "--name", name, "--settings-dir",
        str(settings),
    )  # fmt: skip


def trusts(settings: Path, node: Node) -> bool:
    """Does a workstation set up into ``settings`` verify what ``node`` serves on 8443 now?"""
    try:
        served(node.address, HTTPS_PORT, (settings / "ca.pem").read_bytes())
    except OSError:  # (ssl.SSLCertVerificationError is one)
        return False
    return True


@pytest.mark.timeout(300)
def test_the_notices_after_own_certificate_rollouts_give_the_ca_and_the_steps_that_hold(
    two: tuple[Cluster, list[Node]], tmp_path: Path
) -> None:
    """enable-tls with the practice's own certificates: the notice gives the practice CA's pin,
    and its command for each node sets a real workstation up (it gave the cluster CA's pin,
    whose command exits 10: the server's certificate is not from that CA). Then a plain
    rotate-cert back to the cluster CA: the plan warns, the notice says that a workstation set
    up with the practice CA's pin must be set up again (true: it no longer trusts the server),
    one set up with the password alone needs nothing (true too). A rotate-cert to another
    practice CA: every workstation must be set up again. One with a renewed certificate from
    the same practice CA: nothing to do."""
    cluster, (node1, node2) = two
    pw = password_file(tmp_path)
    cluster_pin = pki.spki_pin(pki.load_cert_pem(cluster.ca_pem))
    practice = make_ca("Praxis CA")
    inter = make_ca("Praxis Issuing CA", parent=practice, path_length=0)
    practice_pin = pki.spki_pin(practice.cert)
    issued = {n.name: real_leaf(inter, n) for n in (node1, node2)}
    chains = {k: (pem(c) + inter.pem, key) for k, (c, key) in issued.items()}
    d1 = write_dir(tmp_path / "d1", practice, chains)

    # Announced with --cert-dir: the practice CA's pin already.
    announced = notice(
        cluster, "--when", "2099-01-05 18:00", "--scope", "cluster", "--cert-dir", str(d1)
    )
    assert practice_pin in announced and cluster_pin not in announced, announced

    start = cluster.cli(
        "rollout", "start", "--scope", "cluster", "--cert-dir", str(d1), "--password-file",
        str(pw), "--yes", "--wait", timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    rollout = newest(cluster)
    assert rollout is not None and rollout["own_certificates"] is True
    assert {n["name"]: n["ca_pin"] for n in rollout["nodes"]} == {
        "node1": practice_pin,
        "node2": practice_pin,
    }

    text = notice(cluster)
    assert practice_pin in text and cluster_pin not in text, text
    commands = notice_commands(text)
    assert set(commands) == {"node1", "node2"}, text
    assert commands["node2"][-2:] == ["--ca-pin", practice_pin]
    pinned = tmp_path / "ws-pinned"
    ok = enrol(cluster, commands["node2"], pw, pinned, "desk-pinned")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"server    certificate from the CA {practice_pin}" in ok.stdout
    # What the notice gave before: the cluster CA's pin, which does not check this server.
    wrong = [*commands["node2"][:-1], cluster_pin]
    refused = enrol(cluster, wrong, pw, tmp_path / "ws-wrong", "desk-wrong")
    assert refused.returncode == 10, refused.stdout + refused.stderr
    assert f"is not from the pinned CA ({cluster_pin})" in refused.stderr
    # By the password alone: the pin to compare with the notice is the practice CA's.
    plain = tmp_path / "ws-plain"
    by_password = enrol(
        cluster, ["client", "test-connection", node2.https_url()], pw, plain, "desk-plain"
    )
    assert by_password.returncode == 0, by_password.stdout + by_password.stderr
    (compare,) = [x for x in by_password.stdout.splitlines() if x.startswith("pin ")]
    assert practice_pin in compare and cluster_pin not in compare, compare

    # A plain rotate-cert gives node2 the cluster CA's certificate again.
    plan = cluster.cli("plan", "--change", "rotate-cert", "--scope", "nodes", "--nodes", "node2")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "node2 serve(s) the practice's own certificate (from --cert-dir)" in plan.stdout
    back = cluster.cli(
        "rollout", "start", "--change", "rotate-cert", "--scope", "nodes", "--nodes", "node2",
        "--yes", "--wait", timeout=180,
    )  # fmt: skip
    assert back.returncode == 0, back.stdout + back.stderr
    text = notice(cluster)
    assert "issued by another certificate authority" in text, text
    assert "set up with the check value (CA pin) of the practice's own certificate" in text
    assert "Every workstation set up before" not in text
    assert commands_pin(text) == [cluster_pin], text
    assert not trusts(pinned, node2)  # as the notice says: set it up again
    assert trusts(plain, node2)  # ... and the one set up by the password needs nothing

    # To another practice CA (another key): every workstation must be set up again.
    other = make_ca("Praxis CA 2027")
    other_pin = pki.spki_pin(other.cert)
    rotate_to_own(cluster, node2, other, tmp_path / "d2")
    text = notice(cluster)
    assert "Every workstation set up before the change has to be set up again once after" in text
    assert commands_pin(text) == [other_pin], text
    assert not trusts(plain, node2)

    # A renewed certificate from that same CA: nothing to do at the workstations.
    rotate_to_own(cluster, node2, other, tmp_path / "d3")
    text = notice(cluster)
    assert "nothing needs to be done at the workstations" in text, text
    assert "another certificate authority" not in text


def rotate_to_own(cluster: Cluster, node: Node, ca: Issuer, directory: Path) -> None:
    """A rotate-cert of ``node`` alone to a new certificate of ``ca`` (``--cert-dir``)."""
    cert, key = real_leaf(ca, node)
    write_dir(directory, ca, {node.name: (pem(cert), key)})
    done = cluster.cli(
        "rollout", "start", "--change", "rotate-cert", "--scope", "nodes", "--nodes", node.name,
        "--cert-dir", str(directory), "--yes", "--wait", timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def commands_pin(text: str) -> list[str]:
    """The pins the notice's test-connection commands give."""
    return re.findall(r"test-connection \S+ --ca-pin (sha256:[0-9a-f]+)", text)


def test_the_ca_pins_a_rollout_keeps_and_those_of_one_stored_before_them(tmp_path: Path) -> None:
    """Each node's CA pin is stored with a ``--cert-dir`` rollout (``own_pins``) and read back
    with it, also after the store is opened again; a rollout stored before pins were (its
    practice CA only, ``own_ca``) reads the pin of that CA's first certificate for each node;
    one whose pins do not read as such (a hand-edited store) too, with a warning, never an
    error; a rollout without its own certificates has none."""
    from leader.schema_store import SchemaStore
    from leader.schema_view import rollout_view
    from tests.test_schema_store import end, new_rollout

    practice, second = make_ca("Praxis CA"), make_ca("Praxis CA 2")
    first_pin = pki.spki_pin(practice.cert)
    path = tmp_path / "leader.sqlite3"
    schema = SchemaStore(path)

    def create(rollout_id: str, **kwargs: Any) -> None:
        original = schema.create

        def with_own(*args: Any, **kw: Any) -> Any:
            return original(*args, **{**kw, **kwargs})

        schema.create = with_own  # type: ignore[method-assign]
        try:
            new_rollout(schema, rollout_id)
        finally:
            schema.create = original  # type: ignore[method-assign]
        end(schema)

    both = practice.pem + second.pem
    create("r1", own_ca=both, own_pins={"a": pki.spki_pin(second.cert), "b": first_pin})
    create("r2", own_ca=both)  # as a leader before this version stored it
    create("r3")
    with schema._db.tx() as db:  # a damaged value, as by hand
        db.execute("UPDATE meta SET value = '[1]' WHERE key = 'own_pins/r1'")
    create("r4", own_ca=practice.pem, own_pins={"a": first_pin})
    issuing = make_ca("Praxis Issuing CA", parent=practice, path_length=0)
    create("r5", own_ca=issuing.pem + practice.pem)  # before pins, the intermediate listed first
    with schema._db.tx() as db:  # r4's node a as a transitional phase 1 leaves it (rev57a L1)
        db.execute(
            "UPDATE rollout_nodes SET state = 'dual', cert_fingerprint = 'sha256:dual'"
            " WHERE rollout_id = 'r4' AND name = 'a'"
        )
    schema.close()

    schema = SchemaStore(path)
    views = {r: rollout_view(schema.get(r)) for r in ("r2", "r3", "r4", "r5")}  # type: ignore[arg-type]
    r1 = schema.get("r1")
    assert r1 is not None
    assert dict(r1.meta.own_ca_pins) == {"a": first_pin, "b": first_pin}  # (damaged: fallback)
    assert views["r4"].own_certificates
    assert {n.name: n.ca_pin for n in views["r4"].nodes} == {"a": first_pin, "b": ""}
    assert views["r2"].own_certificates
    assert {n.name: n.ca_pin for n in views["r2"].nodes} == {"a": first_pin, "b": first_pin}
    # the root's, not the intermediate's (rev57a M1: the first certificate was taken)
    assert {n.ca_pin for n in views["r5"].nodes} == {first_pin}
    assert "sha256:dual" in schema.own_fingerprints()
    assert not views["r3"].own_certificates
    assert {n.ca_pin for n in views["r3"].nodes} == {""}
    listed = {r.rollout.id: r.meta.own_certificates for r in schema.listed()}
    assert listed == {"r5": True, "r4": True, "r3": False, "r2": True, "r1": True}
    schema.close()


def test_the_pin_a_notice_gives_checks_the_server_at_a_workstation_whatever_the_chain() -> None:
    """rev57a M2, L2, M1: for each shape a practice's certificates can have, the pin the leader
    stores for a node (``Accepted.ca_pin``) is one a workstation set up by the password alone
    lists to compare (``pki.cas_above``, over the bundle the node hands out: ``ca.crt``'s CAs,
    the cluster CA, the ``.crt``'s intermediates), and a workstation given that pin
    (``--ca-pin``) finds a path to it (``pki.chain_to``, which tries every path: it took the
    first CA that signed a link, and an intermediate cross-signed by two roots failed the
    notice's own command). The pin is never a CA the practice did not put in ``ca.crt`` (a
    root's cross-certificate led to a third party's root), and a rollout stored before pins
    were (``byo.bundle_pin``, from ``ca.crt`` alone) gets the same one where ``ca.crt`` has a
    single root, in either order."""
    cluster = make_ca("tlsroll cluster CA")
    root = make_ca("Praxis CA")
    inter = make_ca("Praxis Issuing CA", parent=root, path_length=0)
    other = make_ca("Praxis CA 2")
    third = make_ca("Some Trust Services Root")
    crossed = make_ca("Praxis CA", parent=third, key=root.key)  # the root, signed by a third
    shared = ec.generate_private_key(ec.SECP256R1())
    old_root = make_ca("Old Root", days=400)
    new_root = make_ca("New Root")
    twin1 = make_ca("Twin Issuing CA", parent=old_root, key=shared, path_length=0)
    twin2 = make_ca("Twin Issuing CA", parent=new_root, key=shared, path_length=0)
    root2 = make_ca("Deep Root", path_length=None)
    deep = [make_ca("Deep 1", parent=root2, path_length=None)]
    for i in range(2, 6):
        deep.append(make_ca(f"Deep {i}", parent=deep[-1], path_length=None))

    def node_leaf(ca: Issuer) -> x509.Certificate:
        return leaf(ca, [IP], [DNS], cn="node1")[0]

    shapes: dict[str, tuple[list[Issuer], list[x509.Certificate], Issuer]] = {
        "root; intermediate in the .crt": ([root], [node_leaf(inter), inter.cert], root),
        "intermediate, then root in ca.crt": ([inter, root], [node_leaf(inter)], root),
        "root, then intermediate in ca.crt": ([root, inter], [node_leaf(inter)], root),
        "intermediate only in ca.crt": ([inter], [node_leaf(inter), inter.cert, root.cert], inter),
        "two roots, the second the node's": ([other, root], [node_leaf(root)], root),
        "a root cross-signed by a third": (
            [root],
            [node_leaf(inter), inter.cert, crossed.cert, third.cert],
            root,
        ),
        # rev57d L3: the root above was six links up, beyond what a workstation follows
        "a chain as deep as a workstation follows": (
            [deep[0], root2],
            [node_leaf(deep[4]), *(d.cert for d in deep[:0:-1])],
            deep[0],
        ),
        "an intermediate cross-signed by two roots": (
            [old_root, new_root],
            [node_leaf(twin1), twin1.cert, twin2.cert],
            new_root,  # the path that holds longest (``_longest_path``)
        ),
    }
    for shape, (in_ca_crt, chain, expected) in shapes.items():
        ca_crt = b"".join(i.pem for i in in_ca_crt)
        material = byo.Material(
            ca_crt, {"node1": byo.NodeMaterial("node1", b"".join(map(pem, chain)), b"")}
        )
        (accepted,) = byo.accepted(material, ["node1"])
        assert accepted.ca_pin == pki.spki_pin(expected.cert), shape
        bundle = [i.cert for i in in_ca_crt] + [cluster.cert] + chain[1:]
        listed = {pki.spki_pin(c) for c in pki.cas_above(chain[0], bundle)}
        assert accepted.ca_pin in listed, shape
        pinned = [c for c in bundle if pki.spki_pin(c) == accepted.ca_pin]
        assert pki.chain_to(chain[0], bundle, pinned) is not None, shape
        single_root = sum(pki.issued_by(i.cert, i.cert) for i in in_ca_crt) == 1
        if single_root and pki.issued_by(expected.cert, expected.cert):
            assert byo.bundle_pin(ca_crt) == accepted.ca_pin, shape
