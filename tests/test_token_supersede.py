"""A join token made before a node's enrolment does not outlive it (race audit of session 39,
L2): an admin makes two tokens for node2 (the first script got lost), node2 enrols with the
second; the first, leaked, must not enrol node2 again, with a fresh key or any other, and
``token list`` must not call it valid. A token made after the enrolment (README: enrolling a
node again) still enrols.

A real leader and a real agent process; the leaked token's request is crafted here and sent over
real TLS to the join port, as whoever found the lost script would send it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import grpc
import pytest

from nodeagent.runtime import EXIT_ENROLMENT_REFUSED
from tests.cluster import AdminTokenCluster, Cluster, enrol, enrol_request, one_line_error
from tests.conftest import next_loopback
from tlsroll import pki

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("supersede"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


# What the running agents' heartbeats write to their nodes' rows (the leader's group commit,
# a second after they came): an agent of an earlier test of this module may still be on its
# first reports while a quick test compares the store before and after (review s44rev5 M2).
HEARTBEAT_WRITES = (
    "last_heartbeat",
    "agent_version",
    "highest_epoch",
    "renewal_due_at",
    "agent_features",
)


def refused(cluster: Cluster, token: str, name: str, address: str, key: pki.PrivateKey) -> str:
    """Send an enrolment by ``token`` with ``key``: it must be UNAUTHENTICATED and change no row
    of the store, and no secret may reach the answer or the logs. The status details."""
    before = cluster.store_rows()
    with pytest.raises(grpc.RpcError) as info:
        enrol(cluster, enrol_request(token, name, address, key=key))
    details = info.value.details() or ""
    assert info.value.code() == UNAUTHENTICATED, details
    assert cluster.store_rows() == before
    assert cluster.find_secrets(details + "\n" + cluster.logs_text()) == []
    return details


def listed(cluster: Cluster) -> tuple[dict[str, str], dict[str, dict[str, object]]]:
    """``tlsroll token list``: each token's state column, and its ``--json`` object, by id."""
    table = cluster.cli("token", "list")
    assert table.returncode == 0, table.stderr
    states: dict[str, str] = {}
    for line in table.stdout.splitlines():
        cells = [c.strip() for c in line.strip()[1:-1].split("│")]
        if len(cells) == 6 and len(cells[0]) == 6:  # a token's row: its id, then its cells
            states[cells[0]] = cells[4]
    as_json = cluster.cli("token", "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    return states, {t["id"]: t for t in json.loads(as_json.stdout)}


def test_a_token_made_before_the_enrolment_does_not_take_the_node_over(cluster: Cluster) -> None:
    address = next_loopback()
    lost = cluster.create_token("node2", address)  # the first script, lost
    used = cluster.create_token("node2", address)
    agent = cluster.add_agent("node2", address, token=used)
    cluster.wait_for_nodes_online(["node2"])
    on_record = pki.fingerprint(agent.cert())
    lost_id = lost.split(".", 1)[0]

    # Whoever found the lost script: a fresh key, and the node's own key (a copy of it).
    for key in (pki.generate_key(), pki.load_key_pem(agent.key_file.read_bytes())):
        details = refused(cluster, lost, "node2", address, key)
        assert lost_id in details
        assert "superseded by node2's enrolment at" in details
        assert "create a new token" in details
        assert "\n" not in details

    # The real agent is still node2: its certificate on record, online.
    (node,) = [n for n in cluster.store_table("nodes") if n["name"] == "node2"]
    assert node["cert_fingerprint"] == on_record
    assert cluster.wait_for_nodes_online(["node2"])["node2"].online

    states, objects = listed(cluster)
    assert "superseded" in states[lost_id] and "valid" not in states[lost_id]
    assert "superseded_at" in objects[lost_id]
    assert "used up" in states[used.split(".", 1)[0]]


@pytest.mark.parametrize("uses", [2, 1000, 1001])
def test_the_leader_makes_no_token_of_more_than_one_use(cluster: Cluster, uses: int) -> None:
    """A second use could never enrol (the node's enrolment supersedes the token, its own use
    included): ``token create`` refuses ``--uses 2`` since s44, and the leader refuses it too
    (review s44rev3 L2), for an older CLI (which shows INVALID_ARGUMENT as a usage error, exit
    2) or any other client of the admin socket. Nothing is made. A token stored with more
    uses by an older leader stays as it was: ``test_store_enrol``'s multi-use tests."""
    address = next_loopback()
    before = cluster.store_rows(ignore=HEARTBEAT_WRITES)
    with pytest.raises(RuntimeError) as refusal:
        cluster.create_token(f"twice{uses}", address, uses=uses)  # the CLI's request
    assert str(refusal.value) == (
        f"token create failed (StatusCode.INVALID_ARGUMENT): uses {uses}: a join token enrols"
        " its node once (the enrolment supersedes it); ask for 1, and make a new token to"
        " enrol the node again"
    )
    assert cluster.store_rows(ignore=HEARTBEAT_WRITES) == before
    token = cluster.create_token(f"twice{uses}", address, uses=0)  # 0: the default, 1
    enrol(cluster, enrol_request(token, f"twice{uses}", address))


def test_an_agent_given_a_superseded_token_exits_with_one_line(cluster: Cluster) -> None:
    address = next_loopback()
    lost = cluster.create_token("late2", address)
    enrol(cluster, enrol_request(cluster.create_token("late2", address), "late2", address))
    agent = cluster.add_agent("late2-copy", address, token=lost, start=False)
    agent.write_config({"node": {"name": "late2"}})
    before = cluster.store_rows(ignore=HEARTBEAT_WRITES)
    code, output = agent.run_to_exit()
    assert code == EXIT_ENROLMENT_REFUSED, output  # not restarted into it (s66)
    line = one_line_error(output, "tlsroll-agent")
    assert "superseded by late2's enrolment at" in line and "UNAUTHENTICATED" in line
    assert cluster.store_rows(ignore=HEARTBEAT_WRITES) == before


def test_a_token_made_after_the_enrolment_enrols_the_node_again(cluster: Cluster) -> None:
    """README: a node enrolled again (`nodes remove`, `token create`, DATA/node.key moved
    aside, the new token given): the new token enrols it, with a new key (the removed node's is
    never enrolled again, review rev-enrol H1); the tokens before stay refused."""
    address = next_loopback()
    lost = cluster.create_token("node3", address)
    agent = cluster.add_agent("node3", address, token=cluster.create_token("node3", address))
    cluster.wait_for_nodes_online(["node3"])
    agent.stop()
    removed = cluster.cli("nodes", "remove", "node3", "--yes")
    assert removed.returncode == 0, removed.stderr
    again = cluster.create_token("node3", address)
    old_pin = pki.spki_pin(agent.cert())
    shutil.move(agent.key_file, agent.key_file.with_name("node.key.removed"))
    agent.write_config({"leader": {"join_token": again}})
    agent.start()
    cluster.wait_for_nodes_online(["node3"])
    assert pki.spki_pin(agent.cert()) != old_pin
    (node,) = [n for n in cluster.store_table("nodes") if n["name"] == "node3"]
    assert node["token_id"] == again.split(".", 1)[0]
    assert node["cert_fingerprint"] == pki.fingerprint(agent.cert())
    details = refused(cluster, lost, "node3", address, pki.generate_key())
    assert "revoked" in details or "superseded" in details
    states, _ = listed(cluster)
    assert "valid" not in states[lost.split(".", 1)[0]]


def test_a_token_made_after_the_enrolment_re_enrols_the_same_key(cluster: Cluster) -> None:
    """Without `nodes remove`: a token made after the node enrolled, given to its agent with
    DATA/node.pem moved aside, enrols its key again (the token made before does not)."""
    address = next_loopback()
    lost = cluster.create_token("node4", address)
    agent = cluster.add_agent("node4", address, token=cluster.create_token("node4", address))
    cluster.wait_for_nodes_online(["node4"])
    agent.stop()
    shutil.move(agent.cert_file, agent.cert_file.with_name("node.pem.old"))
    agent.write_config({"leader": {"join_token": lost}})
    code, output = agent.run_to_exit()
    assert code == EXIT_ENROLMENT_REFUSED, output
    assert "superseded by node4's enrolment at" in one_line_error(output, "tlsroll-agent")
    again = cluster.create_token("node4", address)
    agent.write_config({"leader": {"join_token": again}})
    agent.start()
    cluster.wait_for_nodes_online(["node4"])
    (node,) = [n for n in cluster.store_table("nodes") if n["name"] == "node4"]
    assert node["token_id"] == again.split(".", 1)[0]
    assert node["cert_fingerprint"] == pki.fingerprint(agent.cert())
