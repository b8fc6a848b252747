"""An agent certificate that has ended comes back with a new token and the node's own key, with
no ``tlsroll nodes remove`` (review s46rt1 H1), also while a transitional phase 1 waits for
its finalize (often for weeks).

Real leader, agents and reference servers over real mutual TLS; the agents' certificates live
20 s (``AGENT_CERT``: ``agent_cert_lifetime`` is a minute, the least it takes, and the
leader's test hook ``TLSROLL_TEST_AGENT_CERT_SECONDS`` shorter), so that one ends while the
test waits. Before: the agent exited 5 with one line saying ``nodes remove`` first (which the
waiting rollout refuses, saying ``rollout abort``, which it refuses too), and a token given to
it was not looked at. Now its line gives the ``token create`` to run; started with the
token, the agent enrols its key again and keeps the ended certificate aside; nothing is revoked,
its server goes on serving the same certificate, and the rollout finalizes over every node.
The advice texts themselves, where they are pure, are checked at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import io
import itertools
import json
import os
import re
import shlex
import signal
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509

from leader.config import TEST_AGENT_CERT_ENV
from leader.engine import TEST_REPORT_LAG_ENV
from leader.expiry import ADVICE, Expiry
from leader.rollout_core import cut_off_reason, left_cut_off, left_out_reason
from leader.store import in_rollout_text
from nodeagent import runtime as agent_runtime
from nodeagent.config import AgentConfig
from nodeagent.identity import ended_path, expired_message, keep_ended, pending_paths
from nodeagent.identity import enrol as enrol_in_process
from nodeagent.renewal import issued_at
from refserver.server import START_DELAY_ENV
from tests.cluster import AdminTokenCluster, Cluster, csr_pem, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.nodeside import cluster_of
from tests.refserver_helper import write_toml
from tests.test_level_based import live, password_file
from tests.test_transitional import (
    LONG,
    WAITED,
    Workstation,
    look,
    newest,
    on_http_named,
    rollout,
    start_transitional,
    wait_state,
    wait_states,
    when,
)
from tlsroll import fsutil, keywrap, pki
from tlsroll.enums import Change
from tlsroll.rpc import MAX_DETAILS
from tlsroll.v1 import admin_pb2, leader_pb2, leader_pb2_grpc

UTC = dt.UTC
LIFETIME = 60  # seconds: agent_cert_lifetime (the least leader.toml takes)
# Seconds the agents' certificates live (``leader.config.TEST_AGENT_CERT_ENV``): an agent that
# runs renews at 6-8 s, as far from a check of what it holds (seconds after its enrolment) as a
# busy machine needs; each of the three tests that waits one out waits up to that long (30 s
# before session 73: 90 s of a CI run).
AGENT_CERT = 20
SHORT = {TEST_AGENT_CERT_ENV: str(AGENT_CERT)}  # the leader's environment
DAY = dt.timedelta(days=1)


def _sleep_until(when: dt.datetime) -> None:
    delay = (when - dt.datetime.now(UTC)).total_seconds()
    if delay > 0:
        time.sleep(delay)


def _revoked(rows: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(r["kind"], r["subject"], r["revoke_reason"]) for r in rows if r.get("revoked_at")]


def _reported(cluster: Cluster, node: str, since: dt.datetime) -> bool:
    """Whether ``node``'s agent has reported its clients to the leader since ``since``."""
    for view in look(cluster).get("node_clients", []):
        if view["node"] == node and not view.get("awaiting_report") and view.get("reported_at"):
            return when(view["reported_at"]) >= since
    return False


@pytest.mark.timeout(600)
def test_an_ended_agent_certificate_comes_back_by_token_while_phase_1_awaits_finalize(
    tmp_path: Path,
) -> None:
    with cluster_of(tmp_path, 2, env=SHORT, agent_cert_lifetime=LIFETIME) as (cluster, nodes):
        node2 = nodes[1]
        agent = node2.agent
        assert agent is not None
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        served = node2.served_fingerprint()

        # node2 is off past its certificate's end (the agent stopped; its server runs on).
        agent.stop()
        ended = agent.cert()
        assert ended.not_valid_after_utc - issued_at(
            ended.not_valid_before_utc, ended.not_valid_after_utc
        ) == dt.timedelta(seconds=AGENT_CERT)  # the test hook's, not the setting's minute
        key = agent.key_file.read_bytes()
        _sleep_until(ended.not_valid_after_utc + dt.timedelta(seconds=1))

        # `nodes remove` stays refused while the rollout holds the node; its refusal names the
        # ways on for a waiting rollout (not `abort`, which that refuses) and the token.
        token_command = f"tlsroll token create --node node2 --address {node2.address}"
        removal = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removal.returncode != 0
        refusal = " ".join(removal.stderr.split())
        assert f"tlsroll rollout finalize {phase1}" in refusal, refusal
        assert f"tlsroll rollout rollback {phase1}" in refusal
        assert "rollout abort" not in refusal
        assert token_command in refusal and "needs no removal" in refusal
        # ... as does check-expiration's advice for it.
        check = cluster.cli("certs", "check-expiration", "--json")
        assert check.returncode == 1
        (row,) = [
            c
            for c in json.loads(check.stdout)["certificates"]
            if c["kind"] == "agent" and c.get("subject") == "node2"
        ]
        assert int(row["residual_seconds"]) < 0
        # the node's own names, and a restart (a running agent does not read a new token:
        # review s47rev1 M2, L4)
        assert (
            f"`(umask 077; {token_command} --print-join-command > join-node2.sh)`"
            in (
                row["advice"]  # the join script, as README teaches (review s71 walkthrough L8)
            )
        )
        assert "`systemctl restart tlsroll-agent` there" in row["advice"]
        assert "no removal needed" in row["advice"]

        # Started with the token it enrolled with (used up by that enrolment): refused, and
        # one line, exit 5, that gives the command for a new token; nothing changed.
        code, output = agent.run_to_exit()
        assert code == agent_runtime.EXIT_CERT_EXPIRED
        line = one_line_error(output, "tlsroll-agent")
        assert "check that clock first" in line and "join token already used up" in line, line
        assert "no `tlsroll nodes remove` needed" in line
        assert agent.key_file.read_bytes() == key
        assert agent.cert().serial_number == ended.serial_number
        (given,) = re.findall(r"`(tlsroll token create [^`]*)`", line)
        assert given == token_command

        # The way back: the command the line gave, the token to the agent, the agent started.
        made = cluster.cli(*shlex.split(given)[1:])
        assert made.returncode == 0, made.stderr
        agent.write_config({"leader": {"join_token": made.stdout.strip()}})
        back = dt.datetime.now(UTC)
        node2.start_agent_heard()
        cluster.wait_for_nodes_online([n.name for n in nodes])
        fresh = agent.cert()
        assert agent.key_file.read_bytes() == key  # its own key, enrolled again
        assert pki.spki_pin(fresh) == pki.spki_pin(ended)
        assert fresh.not_valid_after_utc > dt.datetime.now(UTC)
        assert ended_path(agent.data_dir).read_bytes() == pki.cert_to_pem(ended)
        (record,) = [r for r in cluster.store_table("nodes") if r["name"] == "node2"]
        assert record["removed_at"] is None
        assert record["cert_serial"] == f"{fresh.serial_number:x}"
        assert record["key_pin"] == pki.spki_pin(ended)
        assert _revoked(cluster.store_table("certificates")) == []
        assert node2.served_fingerprint() == served
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"

        # The rollout finalizes over every node, node2 among them, once node2's agent has
        # reported its clients again (seconds: a finalize waits for that report).
        wait_until(lambda: _reported(cluster, "node2", back), 60, "node2's client report")
        done = cluster.cli("rollout", "finalize", phase1, "--yes", "--wait", timeout=LONG)
        assert done.returncode == 0, done.stderr
        final = newest(cluster)
        assert final["finalizes"] == phase1 and final["state"] == "completed", final
        assert {n["name"]: n["state"] for n in final["nodes"]} == {
            "node1": "done",
            "node2": "done",
        }
        wait_state(cluster, phase1, ("completed",), "phase 1 finalized")
        for node in nodes:
            assert list(live(node).schemes) == ["https"]
        assert node2.served_fingerprint() == served
        assert _revoked(cluster.store_table("certificates")) == []
        wait_until(
            lambda: cluster.cli("certs", "check-expiration").returncode == 0,
            30,
            "no certificate left to warn about",
        )
        assert cluster.find_secrets(cluster.logs_text()) == []


class Killed(Exception):
    """Stands for the agent killed at one step of its enrolment (nothing after it runs)."""


def _kill_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the enrolment's ``step``-th file write (0: the CA, 1: the ended certificate kept,
    2: the new certificate beside the renewal's key, 3: that key moved into place, 4: the
    certificate moved into place) raise ``Killed`` instead of running."""
    from nodeagent import identity, nodefiles

    done = itertools.count()

    def at(original: Callable[..., object]) -> Callable[..., object]:
        def write(*args: object, **kwargs: object) -> object:
            if next(done) == step:
                raise Killed(step)
            return original(*args, **kwargs)

        return write

    monkeypatch.setattr(pki, "write_cert", at(pki.write_cert))
    monkeypatch.setattr(identity, "write_atomic", at(fsutil.write_atomic))
    monkeypatch.setattr(nodefiles, "os", types.SimpleNamespace(replace=at(os.replace)))


@pytest.mark.timeout(400)
def test_an_ended_certificate_whose_renewal_answer_was_lost_enrols_the_renewal_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s47rev1 L1: a renewal the leader signed (it has the new key on record) whose
    answer never reached the node (``DATA/node.key.new`` kept, ``node.pem`` the old one), then
    the node off past the old certificate's end. Before: the enrolment again offered
    ``node.key`` and the leader refused it ("already enrolled with another key; remove the old
    node first: tlsroll nodes remove"), exit 5. Now the agent offers the renewal's key next and
    moves it into place once enrolled; the refused offer spends no use of the token; and a kill
    at any step after the leader's answer leaves a node that comes back at its next start
    (with the same token: the leader replays its enrolment)."""
    with AdminTokenCluster(tmp_path / "cluster", next_loopback(), heartbeat_interval=1) as cluster:
        cluster.init()
        cluster.write_leader_config({"agent_cert_lifetime": LIFETIME})
        cluster.start_leader(SHORT)
        address = next_loopback()
        agent = cluster.add_agent("node5", address)
        cluster.wait_for_nodes_online(["node5"])

        # The leader signs a renewal whose answer never reaches the agent (it stops first).
        agent.stop()
        old = agent.cert()
        pending = pending_paths(agent.data_dir)[0]
        renewal_key = pki.generate_key()
        pki.write_key(pending, renewal_key)
        with cluster.control_channel(
            agent.cert_file.read_bytes(), agent.key_file.read_bytes()
        ) as channel:
            leader_pb2_grpc.LeaderStub(channel).RenewNodeCertificate(
                leader_pb2.RenewNodeCertificateRequest(
                    csr_pem=csr_pem(renewal_key, "node5", [address])
                ),
                timeout=10,
            )
        renewal_pin = pki.spki_pin(renewal_key.public_key())
        assert _node_row(cluster, "node5")["key_pin"] == renewal_pin != pki.spki_pin(old)
        lost = {p: p.read_bytes() for p in (agent.key_file, agent.cert_file, pending)}
        _sleep_until(old.not_valid_after_utc + dt.timedelta(seconds=1))

        def back(token: str) -> None:
            """The node enrolled with the renewal's key by ``token``'s one use."""
            assert agent.key_file.read_bytes() == lost[pending]
            assert not pending.exists()
            assert not pending_paths(agent.data_dir)[1].exists()
            fresh = agent.cert()
            assert pki.spki_pin(fresh) == renewal_pin
            assert fresh.not_valid_after_utc > dt.datetime.now(UTC)
            assert ended_path(agent.data_dir).read_bytes() == pki.cert_to_pem(old)
            row = _node_row(cluster, "node5")
            assert row["removed_at"] is None and row["key_pin"] == renewal_pin
            assert row["cert_serial"] == f"{fresh.serial_number:x}"
            (used,) = [
                t for t in cluster.store_table("tokens") if t["id"] == token.partition(".")[0]
            ]
            assert used["uses_left"] == 0 and used["revoked_at"] is None

        # The agent started with a new token (one use): it comes back with the renewal's key.
        token = cluster.create_token("node5", address)
        agent.write_config({"leader": {"join_token": token}})
        agent.start()
        cluster.wait_for_nodes_online(["node5"])
        back(token)
        events = agent.event_names()
        since = events[events.index("agent.enrolling_again") :]
        assert "agent.enrolling_with_renewal_key" in since and "agent.enrolled" in since, events
        agent.stop()
        assert _revoked(cluster.store_table("certificates")) == []

        # A kill at each step after the leader's answer; the next start comes back, with the
        # same token (one use, spent once).
        cfg = AgentConfig.load(agent.config_path)
        for step in range(5):
            for path in (*pending_paths(agent.data_dir), ended_path(agent.data_dir)):
                path.unlink(missing_ok=True)
            for path, data in lost.items():
                path.write_bytes(data)
                path.chmod(0o600)
            token = cluster.create_token("node5", address)
            agent.write_config({"leader": {"join_token": token}})
            cfg = AgentConfig.load(agent.config_path)
            with monkeypatch.context() as faults:
                _kill_at(faults, step)
                with pytest.raises(Killed):
                    enrol_in_process(cfg)
            identity = asyncio.run(agent_runtime.obtain_identity(cfg))
            assert pki.spki_pin(identity.cert) == renewal_pin, step
            back(token)

        agent.start()  # and the agent serves with it
        cluster.wait_for_nodes_online(["node5"])
        assert _revoked(cluster.store_table("certificates")) == []
        assert cluster.find_secrets(cluster.logs_text()) == []


@pytest.mark.timeout(400)
def test_an_ended_certificate_without_a_token_or_with_a_revoked_key_says_what_to_do(
    tmp_path: Path,
) -> None:
    """Review s47rev1 L4. The join script's token file deleted (its example says "needed on
    the first start only"): the line said the agent had tried to enrol with "the join token it
    has: cannot read FILE: No such file or directory"; now "no token in FILE", and no attempt.
    A key whose certificate was revoked (`tlsroll ca revoke`): the line said "enrol with a new
    key, or remove the node first" (a new key alone is refused while the node is on record)
    and not how to get a new key; now it gives the commands, and following them enrols the
    node with a new key (a stale renewal's key is dropped, not renewed in its name)."""
    with AdminTokenCluster(tmp_path / "cluster", next_loopback(), heartbeat_interval=1) as cluster:
        cluster.init()
        cluster.write_leader_config({"agent_cert_lifetime": LIFETIME})
        cluster.start_leader(SHORT)
        address = next_loopback()
        agent = cluster.add_agent("node6", address, token_file=True)
        cluster.wait_for_nodes_online(["node6"])
        token_file = Path(str(agent.config["leader"]["join_token_file"]))
        agent.stop()
        old = agent.cert()
        old_key = agent.key_file.read_bytes()
        pending = pending_paths(agent.data_dir)[0]
        pki.write_key(pending, pki.generate_key())  # a renewal's key the leader never signed
        _sleep_until(old.not_valid_after_utc + dt.timedelta(seconds=1))

        # No token in the file (deleted, then empty): said so, and nothing is tried.
        token_file.unlink()
        for _ in range(2):
            code, output = agent.run_to_exit()
            assert code == agent_runtime.EXIT_CERT_EXPIRED
            line = one_line_error(output, "tlsroll-agent")
            assert line.endswith(f"(no token in {token_file}: no enrolment tried)"), line
            assert "tried to enrol again" not in line and "cannot read" not in line
            assert f"write it to {token_file}" in line
            assert "agent.enrolling_again" not in output
            token_file.write_text("\n")
            token_file.chmod(0o600)
        assert "enrol.refused" not in cluster.leader.log_text()

        # The token file a FIFO (only root can put one there): its look for a token read it
        # and waited for a writer for ever (review rev50a L2); now it is said, never read.
        token_file.unlink()
        os.mkfifo(token_file, 0o600)
        code, output = agent.run_to_exit(timeout=30)
        assert code == agent_runtime.EXIT_CERT_EXPIRED, output
        line = one_line_error(output, "tlsroll-agent")
        assert f"{token_file} is not a regular file (a FIFO)" in line, line
        token_file.unlink()
        token_file.write_text("\n")
        token_file.chmod(0o600)

        # The key's certificate revoked, and a new token: the line says how to get a new key.
        assert cluster.cli("ca", "revoke", f"{old.serial_number:x}").returncode == 0
        token_file.write_text(cluster.create_token("node6", address) + "\n")
        code, output = agent.run_to_exit()
        assert code == agent_runtime.EXIT_CERT_EXPIRED
        line = one_line_error(output, "tlsroll-agent")
        assert "certificate was revoked" in line, line
        steps = re.findall(r"`([^`]*)`", line[line.index("the leader refuses this key for good") :])
        assert steps == [  # the key moved aside first (review s48rev4 L3)
            f"mv {agent.key_file} {agent.key_file}.removed",
            "tlsroll nodes remove node6",
            f"tlsroll token create --node node6 --address {address}",
        ], line
        assert f"the token to {token_file}" in line
        assert agent.key_file.read_bytes() == old_key and agent.cert() == old

        # Following them enrols the node with a new key.
        src, dst = shlex.split(steps[0])[1:]
        os.rename(src, dst)
        removal = cluster.cli(*shlex.split(steps[1])[1:], "--yes")
        assert removal.returncode == 0, removal.stderr
        made = cluster.cli(*shlex.split(steps[2])[1:])
        assert made.returncode == 0, made.stderr
        token_file.write_text(made.stdout.strip() + "\n")
        agent.start()
        cluster.wait_for_nodes_online(["node6"])
        fresh = agent.cert()
        assert pki.spki_pin(fresh) != pki.spki_pin(old)
        assert pki.spki_pin(fresh) == _node_row(cluster, "node6")["key_pin"]
        assert not pending.exists()  # the earlier identity's renewal key: dropped
        assert Path(dst).read_bytes() == old_key
        assert ended_path(agent.data_dir).read_bytes() == pki.cert_to_pem(old)
        assert cluster.find_secrets(cluster.logs_text()) == []


class _Terminal(io.StringIO):
    """Standard input on a terminal, holding what the admin types."""

    def isatty(self) -> bool:
        return True


def _asked(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cluster: Cluster,
    *args: str,
    answer: str = "n\n",
) -> tuple[int, str, str]:
    """``tlsroll ARGS`` in this process, on a terminal where the admin types ``answer``: its
    exit code, stdout and stderr."""
    from tlsroll.cli import main

    monkeypatch.setattr(sys, "stdin", _Terminal(answer))
    capsys.readouterr()
    code = main(["--socket", str(cluster.admin_socket), *args])
    said = capsys.readouterr()
    monkeypatch.undo()
    return code, said.out, said.err


@pytest.mark.timeout(600)
def test_a_machine_lost_while_phase_1_awaits_finalize_is_cut_off_and_finalize_leaves_it_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review s47rev1 L5, then s48 (a machine lost or stolen while a transitional phase 1
    waits). A node merely offline still holds finalize, however forced: its refusal gives the
    `tlsroll ca revoke` of its agent's serial for a machine that is lost. Once revoked (its
    agent cut off), finalize leaves it out: the other nodes close http, the lost node is
    recorded as left out (still dual), phase 1 completes, and `nodes remove` then works.
    Before: finalize stayed refused ("offline: node2 (bring the agent up or leave it out)",
    with no way to leave it out), and the only way on, a rollback, took every node back to
    http."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node1, node2 = nodes
        agent = node2.agent
        assert agent is not None
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        serial = f"{agent.cert().serial_number:x}"

        removal = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removal.returncode != 0
        refusal = " ".join(removal.stderr.split())
        assert "lost or stolen" in refusal, refusal
        (revoke,) = re.findall(r"`(tlsroll ca revoke [^`]*)`", refusal)
        assert revoke == f"tlsroll ca revoke {serial}", refusal
        assert "finalize then leaves it out (it stays on http and https)" in refusal, refusal
        assert "`tlsroll nodes remove` it, which revokes its server's certificate" in refusal
        # where the serial is found, as the text says: check-expiration's agent row of node2
        assert "tlsroll certs check-expiration" in refusal
        check = cluster.cli("certs", "check-expiration", "--json")
        listed = {
            c["serial"]
            for c in json.loads(check.stdout)["certificates"]
            if c["kind"] == "agent" and c.get("subject") == "node2"
        }
        assert listed == {serial}

        # The machine is gone (its agent silent), nothing revoked yet: finalize, plain or
        # forced, is refused (plain: by node2's client report, fresh or stale by then),
        # naming the way to cut it off; nothing starts.
        agent.send_signal(signal.SIGSTOP)
        wait_until(lambda: not cluster.list_nodes()["node2"].online, 30, "node2 offline")
        plain = cluster.cli("rollout", "finalize", phase1, "--yes", timeout=LONG)
        assert plain.returncode != 0 and "node2" in plain.stderr, plain.stderr
        for how in (("--force",), ("--when-quiet", "30m")):
            held = cluster.cli("rollout", "finalize", phase1, "--yes", *how, timeout=LONG)
            said = " ".join(held.stderr.split())
            assert held.returncode != 0, how
            assert "offline: node2 (bring the agent up, or if the machine is lost" in said, said
            assert f"`tlsroll ca revoke {serial}`, then finalize leaves it out" in said, said
            assert "leave it out)" not in said  # (the old words: no way to)
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        assert newest(cluster)["id"] == phase1

        done = cluster.cli(*shlex.split(revoke)[1:])
        assert done.returncode == 0, done.stderr
        # The leader refuses the agent from then on, while the rollout waits.
        with (
            cluster.control_channel(
                agent.cert_file.read_bytes(), agent.key_file.read_bytes()
            ) as ch,
            pytest.raises(grpc.RpcError) as refused,
        ):
            leader_pb2_grpc.LeaderStub(ch).Heartbeat(
                leader_pb2.HeartbeatRequest(agent_version="t"), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (refused.value.details() or "")
        assert cluster.list_nodes()["node1"].online
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        again = " ".join(cluster.cli("nodes", "remove", "node2", "--yes").stderr.split())
        assert "its agent's certificate is revoked already" in again, again
        assert "ca revoke" not in again

        # Asked first (no --yes, on a terminal), the question names the nodes it closes http
        # on and the one it leaves out, with why (s48lost: it named none); "no" starts nothing.
        code, asked, err = _asked(monkeypatch, capsys, cluster, "rollout", "finalize", phase1)
        assert code == 1 and "not started" in err, (code, asked, err)
        assert f"Finalize {phase1}: close http (8080) on node1, node by node now" in asked, asked
        assert "  Left out: node2: left out: its agent is cut off" in asked, asked
        assert "Close http now?" in asked, asked
        assert newest(cluster)["id"] == phase1

        # Finalize (plain: node1's clients are known) closes http on node1 and leaves node2
        # out; phase 1 completes, noting it.
        final = cluster.cli("rollout", "finalize", phase1, "--yes", "--wait", timeout=LONG)
        assert final.returncode == 7, final.stderr  # completed without node2 (session 75: 0)
        assert "started on node1;" in final.stdout, final.stdout
        assert "node2: left out: its agent is cut off" in final.stdout, final.stdout
        phase2 = newest(cluster)
        assert phase2["finalizes"] == phase1 and phase2["state"] == "completed"
        states = {n["name"]: (n["state"], n.get("reason", "")) for n in phase2["nodes"]}
        assert states["node1"][0] == "done"
        assert states["node2"][0] == "skipped" and states["node2"][1].startswith("left out: ")
        assert list(live(node1).schemes) == ["https"]
        first = wait_state(cluster, phase1, ("completed",), "phase 1 finalized")
        assert f"finalized by rollout {phase2['id']}" in first["reason"]
        assert "node2 left dual: left out, its agent cut off" in first["reason"], first["reason"]
        status = cluster.cli("rollout", "status", phase1)
        assert status.returncode == 7, status.stderr
        assert f"rollout {phase1} completed without node2: left out" in " ".join(
            status.stderr.split()
        )

        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, removed.stderr
        served = [
            r
            for r in cluster.store_table("certificates")
            if r["node"] == "node2" and r["kind"] == "server"
        ]
        assert served and all(r["revoked_at"] for r in served), served
        assert cluster.find_secrets(cluster.logs_text()) == []


@pytest.mark.timeout(600)
def test_a_node_revoked_while_finalize_when_quiet_holds_it_is_left_out(tmp_path: Path) -> None:
    """Review s48rev5 M3: node2 revoked (its machine lost) while a running `finalize
    --when-quiet` held it (a workstation on http there) stayed pending with no reason, its
    client report stale for good, and the finalize ran for ever. Now the engine's next pass
    leaves it out, as a finalize started after the revocation does: skipped with the
    left-out reason; node1 is finalized, the finalize completes and phase 1 with it, naming
    node2 left dual; `nodes remove node2` then works. The leader takes a client report to be
    3 s old, not 15 (its test hook ``TEST_REPORT_LAG_ENV``): node1 is quiet 12 s sooner."""
    hooked = {TEST_REPORT_LAG_ENV: "3"}
    with cluster_of(tmp_path, 2, env=hooked) as (cluster, nodes):
        said = [e for e in cluster.leader.log_events() if e["event"] == "leader.test_hook"]
        said = [e for e in said if e["hook"] != keywrap.TEST_KDF_N_ENV]  # (conftest's)
        assert [(e["hook"], e["value"]) for e in said] == [(TEST_REPORT_LAG_ENV, 3)], said
        node1, node2 = nodes
        agent = node2.agent
        assert agent is not None
        stayer = Workstation("node2-stayer", node2, next_loopback(), cluster.ca_pem).start()
        try:
            phase1 = start_transitional(cluster, tmp_path, "--wait")
            assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
            wait_until(
                lambda: on_http_named(cluster, "node2") == [stayer.source],
                60,
                "node2's workstation reported on http",
                interval=0.5,
            )
            started = cluster.cli("rollout", "finalize", phase1, "--when-quiet", "1s", "--yes")
            assert started.returncode == 0, started.stderr
            final_id = newest(cluster)["id"]
            assert rollout(cluster, final_id)["finalizes"] == phase1
            # node1 is quiet and finalized; node2 waits for its workstation to leave http.
            wait_states(
                cluster, final_id, {"node1": "done", "node2": "pending"}, 120, "node1 finalized"
            )
            serial = f"{agent.cert().serial_number:x}"
            done = cluster.cli("ca", "revoke", serial)
            assert done.returncode == 0, done.stderr
            wait_until(
                lambda: rollout(cluster, final_id)["state"] in WAITED,
                60,
                "the finalize to end without node2",
                interval=0.5,
            )
            final = rollout(cluster, final_id)
        finally:
            stayer.close()
        assert final["state"] == "completed", final
        states = {n["name"]: (n["state"], n.get("reason", "")) for n in final["nodes"]}
        assert states["node1"][0] == "done"
        assert states["node2"] == ("skipped", left_out_reason("node2")), states
        assert list(live(node1).schemes) == ["https"]
        assert sorted(live(node2).schemes) == ["http", "https"]  # left as it was: dual
        first = wait_state(cluster, phase1, ("completed",), "phase 1 finalized")
        assert f"finalized by rollout {final_id}" in first["reason"]
        assert "node2 left dual: left out, its agent cut off" in first["reason"], first["reason"]
        skipped = [
            e.get("reason")
            for e in cluster.leader.log_events()
            if e.get("event") == "node.event"
            and (e.get("rollout_id"), e.get("node"), e.get("node_event"))
            == (final_id, "node2", "skip")
        ]
        assert skipped == [left_out_reason("node2")], skipped
        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, removed.stderr
        assert cluster.find_secrets(cluster.logs_text()) == []


@pytest.mark.timeout(600)
def test_a_rollback_leaves_a_cut_off_node_as_is_saying_to_remove_it(tmp_path: Path) -> None:
    """s48lost: the way back from a phase 1 with node2's agent cut off (revoked: a machine
    lost) left node2 as is saying "run tlsroll rollout rollback again once its agent is back",
    which it never is. Now its reason, the outcome's line and phase 1's note say it never
    comes back, and `tlsroll nodes remove node2` (which then works)."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node1, node2 = nodes
        agent = node2.agent
        assert agent is not None
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        done = cluster.cli("ca", "revoke", f"{agent.cert().serial_number:x}")
        assert done.returncode == 0, done.stderr
        back = cluster.cli("rollout", "rollback", "--yes", timeout=LONG)
        assert back.returncode == 0, back.stderr
        said = left_cut_off("node2")
        assert f"  node2: {said}" in back.stdout.splitlines(), back.stdout
        assert "once its agent is back" not in back.stdout
        way_back = newest(cluster)
        way_back = wait_state(cluster, way_back["id"], WAITED, "the way back")
        assert way_back["state"] == "completed", way_back
        states = {n["name"]: (n["state"], n.get("reason", "")) for n in way_back["nodes"]}
        assert states == {"node1": ("done", ""), "node2": ("skipped", said)}, states
        assert way_back["left_as_is"] == ["node2"]
        assert list(live(node1).schemes) == ["http"]
        status = cluster.cli("rollout", "status", way_back["id"])
        assert status.returncode == 7, status.stderr  # completed without node2 (session 75: 0)
        line = " ".join(status.stderr.split())
        assert "once its agent is back" not in line, line
        assert "it never comes back; `tlsroll nodes remove node2`" in line, line
        first = wait_state(cluster, phase1, ("aborted",), "phase 1 taken back")
        assert "node2 left dual: its agent's certificate is revoked" in first["reason"], first
        assert "`tlsroll nodes remove node2`" in first["reason"], first
        assert "once its agent is back" not in first["reason"]
        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, removed.stderr


@pytest.mark.timeout(600)
def test_an_enable_tls_halts_on_a_node_cut_off_before_its_switch(tmp_path: Path) -> None:
    """s50: node3's agent cut off (revoked: a machine lost) while an enable-tls ran, before
    node3's switch: the rollout went on and switched node3 against the revoked agent (the
    leader dialled it as before). Now node3 is never switched: it is skipped with a reason
    naming `tlsroll nodes remove node3`, the rollout halts (a forward change is never left
    half-way silently: its start refuses such a node), node2's switch, if under way, ends as
    it would, node3 still serves plain http, and `nodes remove node3` then works. Each switch is
    slowed (the restarted server's start delay) and the rollout paused at once, so node3
    is not at its switch when it is revoked (checked)."""
    slow = {START_DELAY_ENV: "3"}
    with cluster_of(tmp_path, 3, env=slow) as (cluster, nodes):
        _node1, _node2, node3 = nodes  # (the leader's own node, node1, goes last)
        agent = node3.agent
        assert agent is not None
        first = start_transitional(cluster, tmp_path, "--max-parallel", "1")
        paused = cluster.cli("rollout", "pause", first)
        assert paused.returncode == 0, paused.stderr
        before = {n["name"]: n["state"] for n in rollout(cluster, first)["nodes"]}
        assert before["node3"] in ("pending", "preflight", "staging", "staged"), before
        done = cluster.cli("ca", "revoke", f"{agent.cert().serial_number:x}")
        assert done.returncode == 0, done.stderr
        ended = wait_state(cluster, first, WAITED, "the rollout to halt")
        assert ended["state"] == "halted", ended
        states = {n["name"]: (n["state"], n.get("reason", "")) for n in ended["nodes"]}
        assert states["node3"] == ("skipped", cut_off_reason(Change.ENABLE_TLS, "node3"))
        assert "`tlsroll nodes remove node3`" in states["node3"][1]
        assert "`tlsroll nodes remove node3`" in ended["reason"], ended["reason"]
        # node2: its switch, if under way at the pause, ended as it would; else the halt
        # skipped it, as node1 (never started)
        assert states["node2"] in {("dual", ""), ("skipped", "rollout halted")}, states
        assert states["node1"] == ("skipped", "rollout halted"), states
        assert list(live(node3).schemes) == ["http"]  # never switched
        switched = [
            e
            for e in cluster.leader.log_events()
            if e.get("node") == "node3" and e.get("step") == "switch"
        ]
        assert switched == [], switched
        removed = cluster.cli("nodes", "remove", "node3", "--yes")
        assert removed.returncode == 0, removed.stderr


@pytest.mark.timeout(600)
def test_a_retry_after_a_cut_off_halt_leaves_out_the_node_once_removed(tmp_path: Path) -> None:
    """s50retry: an enable-tls (transitional phase 1) halted as node3's agent was cut off
    before its switch. `rollout retry` took node3 again: refused "offline" while it is
    enrolled, "not enrolled" once removed as the halt advised, so the admin had to start the
    change again with --nodes. Now the halt says remove, then retry; the retry before the
    removal is refused in one line saying `tlsroll nodes remove node3` first (nothing
    started), and after it the retry runs on node1 and node2 only, its output naming node3
    left out, and phase 1 ends awaiting its finalize, node3 never switched."""
    slow = {START_DELAY_ENV: "3"}
    with cluster_of(tmp_path, 3, env=slow) as (cluster, nodes):
        _node1, _node2, node3 = nodes
        agent = node3.agent
        assert agent is not None
        first = start_transitional(cluster, tmp_path, "--max-parallel", "1")
        paused = cluster.cli("rollout", "pause", first)
        assert paused.returncode == 0, paused.stderr
        before = {n["name"]: n["state"] for n in rollout(cluster, first)["nodes"]}
        assert before["node3"] in ("pending", "preflight", "staging", "staged"), before
        done = cluster.cli("ca", "revoke", f"{agent.cert().serial_number:x}")
        assert done.returncode == 0, done.stderr
        ended = wait_state(cluster, first, WAITED, "the rollout to halt")
        assert ended["state"] == "halted", ended
        assert f"then tlsroll rollout retry {first}" in ended["reason"], ended["reason"]
        refused = cluster.cli("rollout", "retry", first)
        line = one_line_error(refused.stderr, "tlsroll")
        assert refused.returncode == 1, line
        assert "run `tlsroll nodes remove node3` first" in line, line
        assert "offline" not in line, line
        assert newest(cluster)["id"] == first  # nothing started
        removed = cluster.cli("nodes", "remove", "node3", "--yes")
        assert removed.returncode == 0, removed.stderr
        retried = cluster.cli("rollout", "retry", timeout=LONG)  # (the newest: first)
        assert retried.returncode == 0, retried.stderr
        assert "  node3 left out: removed since (tlsroll nodes remove)" in retried.stdout, (
            retried.stdout
        )
        second = newest(cluster)["id"]
        assert second != first
        left_out_stored(cluster, second, "node3")
        phase1 = wait_state(cluster, second, WAITED, "the retry to end phase 1")
        assert phase1["state"] == "awaiting_finalize", phase1
        assert sorted(n["name"] for n in phase1["nodes"]) == ["node1", "node2"], phase1
        assert {n["state"] for n in phase1["nodes"]} == {"dual"}, phase1
        assert list(live(node3).schemes) == ["http"]  # never switched


def left_out_stored(cluster: Cluster, rollout_id: str, name: str) -> None:
    """Review rev50f L4: the node a retry or a way back left out, removed since, is stored
    with the new rollout: `schema show --json` names it (``removed_since``), `schema show`
    says so under the rollout's heading, and the audit row of its creation names it (before,
    only a log line and the CLI's output did)."""
    shown = json.loads(cluster.cli("schema", "show", "--rollout", rollout_id, "--json").stdout)
    (view,) = shown["rollouts"]
    assert view["removed_since"] == [name], view
    assert name not in [n["name"] for n in view["nodes"]], view
    text = cluster.cli("schema", "show", "--rollout", rollout_id)
    assert text.returncode == 0, text.stderr
    assert f"left out, removed since (tlsroll nodes remove): {name}" in text.stdout, text.stdout
    (created,) = [
        json.loads(r["detail"])
        for r in cluster.store_table("audit")
        if r["kind"] == "rollout.created" and r["subject"] == rollout_id
    ]
    assert created["removed_since"] == [name], created
    (row,) = [r for r in cluster.store_table("rollouts") if r["id"] == rollout_id]
    assert json.loads(row["removed_since"]) == [name], row


@pytest.mark.timeout(600)
def test_the_way_back_of_a_named_rollout_leaves_out_a_node_removed_since(tmp_path: Path) -> None:
    """s50retry: `rollout rollback R` takes R's nodes back; one removed since (`nodes
    remove`, as a cut-off node's reason advises) refused it, "not enrolled: node2", so no way
    back of R could start. Now node2 is left out, the output naming it, and node1 goes back."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        node1, _node2 = nodes
        secret = password_file(tmp_path, "pw", "way-back-password-for-the-practice")
        started = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--password-file", str(secret)),
            *("--yes", "--wait"),
            timeout=LONG,
        )
        assert started.returncode == 0, (started.stdout, started.stderr)
        enabled = newest(cluster)["id"]
        removed = cluster.cli("nodes", "remove", "node2", "--yes")
        assert removed.returncode == 0, removed.stderr
        back = cluster.cli("rollout", "rollback", enabled, "--yes", "--max-parallel", "1")
        assert back.returncode == 0, back.stderr
        assert "  node2 left out: removed since (tlsroll nodes remove)" in back.stdout, back.stdout
        way_back = newest(cluster)
        assert way_back["id"] != enabled and way_back["undoes"] == enabled, way_back
        assert [n["name"] for n in way_back["nodes"]] == ["node1"], way_back
        left_out_stored(cluster, way_back["id"], "node2")
        ended = wait_state(cluster, way_back["id"], WAITED, "the way back to end")
        assert ended["state"] == "completed", ended
        assert list(live(node1).schemes) == ["http"]


@pytest.mark.timeout(600)
def test_finalize_check_only_over_the_admin_socket_starts_nothing(tmp_path: Path) -> None:
    """s50 (check_only was only tested by calling ``Commands.finalize_check``): over the real
    admin socket, a real leader answers ``FinalizeRolloutRequest.check_only`` with what the
    finalize would do, node2 (its agent cut off) left out with its reason, node1 pending;
    nothing starts (phase 1 still awaits its finalize, no newer rollout). A rollout that
    awaits no finalize is refused as the finalize is, a one-line status and nothing started."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        _node1, node2 = nodes
        agent = node2.agent
        assert agent is not None
        phase1 = start_transitional(cluster, tmp_path, "--wait")
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"
        done = cluster.cli("ca", "revoke", f"{agent.cert().serial_number:x}")
        assert done.returncode == 0, done.stderr
        with cluster.admin() as admin:
            for how in ({"force": True}, {"when_quiet_seconds": 60}):
                request = admin_pb2.FinalizeRolloutRequest(
                    rollout_id=phase1,
                    check_only=True,
                    **how,
                )
                plan = admin.FinalizeRollout(request, timeout=30)
                got = {n.name: (n.state, n.reason) for n in plan.nodes}
                assert plan.finalizes == phase1 and list(plan.left_out) == ["node2"], plan
                assert got["node2"][1] == left_out_reason("node2"), got
                assert got["node1"][1] == "" and got["node2"][0] != got["node1"][0], got
                assert plan.id == "", plan  # nothing made
            with pytest.raises(grpc.RpcError) as refused:
                admin.FinalizeRollout(
                    admin_pb2.FinalizeRolloutRequest(rollout_id="nope", check_only=True),
                    timeout=30,
                )
        assert refused.value.code() != grpc.StatusCode.UNKNOWN, refused.value
        assert "\n" not in (refused.value.details() or ""), refused.value.details()
        assert newest(cluster)["id"] == phase1
        assert rollout(cluster, phase1)["state"] == "awaiting_finalize"


def _node_row(cluster: Cluster, name: str) -> dict[str, Any]:
    (row,) = [r for r in cluster.store_table("nodes") if r["name"] == name]
    return row


# --- the advice, where it is pure ----------------------------------------------------------------


def _config(tmp_path: Path, **leader: object) -> AgentConfig:
    path = tmp_path / "agent.toml"
    write_toml(
        path,
        {
            "node": {"name": "pc9", "addresses": ["10.1.1.9"], "dns_names": ["pc9.example"]},
            "leader": {"address": "10.1.1.2", "ca_pin": "sha256:" + "a" * 64, **leader},
            "agent": {"data_dir": tmp_path / "data"},
        },
    )
    return AgentConfig.load(path)


def test_the_agents_line_gives_the_token_for_its_names_and_where_the_token_goes(
    tmp_path: Path,
) -> None:
    end = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    cfg = _config(tmp_path, join_token_file=str(tmp_path / "join-token"))
    line = expired_message(cfg, end, end + dt.timedelta(days=2))
    assert line.index("check that clock first") < line.index("tlsroll token create")
    assert "`tlsroll token create --node pc9 --address 10.1.1.9 --dns pc9.example`" in line
    # Session 73: where the token goes says the mode the agent takes (0600: a token file
    # others can read is refused, and `echo TOKEN > FILE` makes it 0644).
    assert (
        f"write it to {tmp_path / 'join-token'} (mode 600: the agent refuses a token file "
        "others can read) and start the agent again"
    ) in line
    assert f"keeps the ended certificate as {tmp_path / 'data' / 'node.pem.ended'}" in line
    assert "no `tlsroll nodes remove` needed" in line and "\n" not in line
    running = expired_message(_config(tmp_path), end, end, running=True)
    assert "the agent goes on by itself" in running and "restart the agent" in running
    assert f"[leader].join_token_file in {tmp_path / 'agent.toml'}" in running


def test_the_refusal_of_a_removal_names_finalize_or_rollback_for_a_waiting_rollout() -> None:
    waiting = in_rollout_text("b", "r7", "awaiting_finalize", ["10.0.0.2"], ["b.example"])
    assert "`tlsroll rollout finalize r7`" in waiting
    assert "`tlsroll rollout rollback r7`" in waiting and "abort" not in waiting
    assert (
        "`(umask 077; tlsroll token create --node b --address 10.0.0.2 --dns b.example"
        " --print-join-command > join-b.sh)`, `sh join-b.sh` on b as root, `systemctl restart"
        " tlsroll-agent` there: it enrols its own key again"
    ) in waiting  # the join script, as README teaches (review s71 walkthrough L8)
    running = in_rollout_text("b", "r7", "running")
    assert "let it end (or `tlsroll rollout abort`) first" in running
    assert "`(umask 077; tlsroll token create --node b --address IP --print-join" in running
    # a machine lost or stolen (review s47rev1 L5): cut off by serial, the rollout held or not
    assert "`tlsroll ca revoke SERIAL`" in running and "check-expiration" in running
    both = in_rollout_text("b", "r7", "running", serials=["1a", "2b"])
    assert "`tlsroll ca revoke 1a` and `tlsroll ca revoke 2b`" in both
    assert "while the rollout goes on" in both
    done = in_rollout_text("b", "r7", "awaiting_finalize", serials=[])
    assert "revoked already" in done and "ca revoke" not in done
    # Within a status's details (cut at MAX_DETAILS with "…") with the join script's steps:
    # two serials, a long rollout id, two addresses (review s71 walkthrough L8).
    long = in_rollout_text(
        "praxis-b",
        "r20261206-105354-bf7a",
        "awaiting_finalize",
        ["192.168.100.200", "fd00::1234:5678"],
        serials=[f"{k}a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d" for k in (1, 2)],
    )
    assert len(long) <= MAX_DETAILS and long.endswith("certificate (8443) too"), len(long)
    # The longest there can be (a 63-character name, three addresses, two DNS names, two
    # serials) still ends with its last step: the serials' place says where to find them, then
    # the token's names are left to the admin (it was cut with "…": review s71 uxsmalls).
    name = "praxis-" + "b" * 56
    longest = in_rollout_text(
        name,
        "r20261206-105354-bf7a",
        "awaiting_finalize",
        ["192.168.100.200", "fd00::1234:5678:9abc:def0", "10.200.200.200"],
        ["server-b.praxis-kardiologie.example", "b.praxis-kardiologie-ost.example"],
        serials=[f"{k}a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d" for k in (1, 2)],
    )
    assert len(longest) <= MAX_DETAILS, len(longest)
    assert longest.endswith("certificate (8443) too") and name in longest, longest
    assert "`tlsroll ca revoke" in longest and "rollout rollback r20261206" in longest
    assert "finalize then leaves it out" in done and "rollback goes back without it" in done
    assert "finalize then leaves it out" not in running  # (a running rollout is let end)
    # the served certificate (8443) stays valid until the node is removed: said (review s48)
    assert "`tlsroll nodes remove` it, which revokes its server's certificate (8443)" in done


def test_the_serials_to_revoke_for_a_lost_machine_include_the_one_a_renewal_left_accepted(
    tmp_path: Path,
) -> None:
    """Right after a renewal, until the agent uses the new certificate, the leader still
    accepts the one before it, which can renew again: revoking the one on record alone would
    leave a stolen machine a way back. The refusal names the one on record, whose revocation
    takes the one before too (review s48rev5 L1: naming both, the second `ca revoke` failed
    after the first took both); the one before only where it is all that is left. Revoking
    the one before takes the one renewed from it (session 65)."""
    from leader.store import NodeCert, Store

    t0 = dt.datetime(2026, 11, 1, tzinfo=UTC)
    serials = itertools.count(0x100)

    def cert(pin: str) -> NodeCert:
        n = next(serials)
        return NodeCert(pin, f"sha256:fp{n:x}", f"{n:x}", t0 + dt.timedelta(days=30))

    store = Store(tmp_path / "leader.sqlite3")
    store.add_token(
        "t1", "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description="", now=t0,
        actor="admin", node_name="b", addresses=("10.1.1.2",),
    )  # fmt: skip
    first = store.enrol(
        token_id="t1", secret="s" * 26, name="b", addresses=("10.1.1.2",), dns_names=(),
        agent_version="t", agent_port=9442, key_pin="sha256:A", issue=lambda: cert("sha256:A"),
        now=t0,
    )  # fmt: skip
    assert store.agent_serials("b") == [first.serial]
    row = store.get_node("b")
    renewed = store.renew_node_certificate(
        "b", presented=row.cert_fingerprint, presented_serial=row.cert_serial,
        key_pin="sha256:B", issue=lambda _apart: cert("sha256:B"), now=t0 + dt.timedelta(days=10),
    )  # fmt: skip
    assert store.agent_serials("b") == [renewed.serial]
    # Revoking the one before takes the one on record with it: renewed from it, maybe by
    # whoever held the revoked key (session 65, review s64 b4 H: ``lineage_in``). Before, it
    # was left (the machine may hold it), and a copy that renewed first stayed the node.
    assert store.revoke(first.serial, reason="old", now=t0, actor="admin") == [
        first.serial,
        renewed.serial,
    ]
    assert store.agent_serials("b") == []
    assert store.cut_off_nodes() == {"b"}


def test_revoking_the_agent_certificate_on_record_revokes_the_one_before_it_too(
    tmp_path: Path,
) -> None:
    """Review s48 (a machine lost while phase 1 awaits finalize), item 2: `ca revoke` of the
    serial on record right after a renewal left the one before it (still accepted until the
    agent uses the new one) able to renew the node back into a fresh certificate. Now both
    are revoked at once; and in a store written before (the one before left unrevoked), the
    one before of a node whose certificate on record is revoked renews nothing either."""
    from leader.store import NodeCert, Store, Superseded

    t0 = dt.datetime(2026, 11, 1, tzinfo=UTC)
    serials = itertools.count(0x100)

    def cert(pin: str) -> NodeCert:
        n = next(serials)
        return NodeCert(pin, f"sha256:fp{n:x}", f"{n:x}", t0 + dt.timedelta(days=30))

    store = Store(tmp_path / "leader.sqlite3")
    store.add_token(
        "t1", "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description="", now=t0,
        actor="admin", node_name="b", addresses=("10.1.1.2",),
    )  # fmt: skip
    first = store.enrol(
        token_id="t1", secret="s" * 26, name="b", addresses=("10.1.1.2",), dns_names=(),
        agent_version="t", agent_port=9442, key_pin="sha256:A", issue=lambda: cert("sha256:A"),
        now=t0,
    )  # fmt: skip
    row = store.get_node("b")
    renewed = store.renew_node_certificate(
        "b", presented=row.cert_fingerprint, presented_serial=row.cert_serial,
        key_pin="sha256:B", issue=lambda _apart: cert("sha256:B"), now=t0 + dt.timedelta(days=10),
    )  # fmt: skip
    revoked = store.revoke(renewed.serial, reason="stolen", now=t0, actor="admin")
    assert revoked == [renewed.serial, first.serial]
    assert store.agent_serials("b") == [] == store.agent_serials("nobody")
    assert store.is_revoked(first.serial) and store.get_node("b").cert_revoked

    # A store of the release before: the one on record revoked, the one before not.
    with store._db.tx() as db:
        db.execute("UPDATE certificates SET revoked_at = NULL WHERE serial = ?", (first.serial,))
    with pytest.raises(Superseded, match="revoked"):
        store.renew_node_certificate(
            "b", presented=first.fingerprint, presented_serial=first.serial,
            key_pin="sha256:C", issue=lambda _apart: cert("sha256:C"),
            now=t0 + dt.timedelta(days=11),
        )  # fmt: skip
    assert store.get_node("b").cert_serial == renewed.serial


async def test_the_one_before_a_revoked_certificate_on_record_heartbeats_no_more(
    tmp_path: Path,
) -> None:
    """Review s48rev5 L2: in a store written before `ca revoke` revoked both (the certificate
    on record revoked, the one before it not), that one before renewed nothing any more but
    its heartbeats still passed the snapshot's check (``Snapshot.refusal``): the cut-off node
    looked online. Now the snapshot refuses every certificate of a node whose certificate on
    record is revoked, as the renewal's check does; over real gRPC too."""
    from leader.service import Caller
    from leader.store import NodeCert
    from tests.leader_rig import leader_with_a_node

    rig = leader_with_a_node(tmp_path, next_loopback(), next_loopback())
    store, clock, svc = rig.store, rig.clock, rig.service
    await rig.server.start()
    try:
        before = x509.load_pem_x509_certificate(rig.node_files[1])
        caller = Caller(
            "hb1", pki.fingerprint(before), f"{before.serial_number:x}", pki.spki_pin(before)
        )
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            await stub.Heartbeat(leader_pb2.HeartbeatRequest(agent_version="t"), timeout=10)
            # Renewed (the agent has not used the new one yet: the one before is accepted),
            # then the one on record revoked alone, as a store of the release before left it.
            renewed = store.renew_node_certificate(
                "hb1", presented=caller.fingerprint, presented_serial=caller.serial,
                key_pin="sha256:B",
                issue=lambda _apart: NodeCert("sha256:B", "sha256:fp-new", "5eed", clock[0] + DAY),
                now=clock[0],
            )  # fmt: skip
            assert svc._read_snapshot().refusal(caller) is None  # still accepted, as it was
            assert store.revoke(renewed.serial, reason="stolen", now=clock[0], actor="test")
            with store.db.tx() as db:
                db.execute(
                    "UPDATE certificates SET revoked_at = NULL WHERE serial = ?", (caller.serial,)
                )
            assert not store.is_revoked(caller.serial) and store.get_node("hb1").cert_revoked
            said = svc._read_snapshot().refusal(caller)
            assert said is not None and "revoked" in said, said
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Heartbeat(leader_pb2.HeartbeatRequest(agent_version="t"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (refused.value.details() or "")
        assert store.cut_off_nodes() == {"hb1"}
    finally:
        await rig.close()


def test_check_expiration_advises_enrolling_an_agent_again_without_removing_it() -> None:
    when = dt.datetime(2026, 1, 1, tzinfo=UTC)
    entry = Expiry("agent", "pc9", "1f", "sha256:x", when, dt.timedelta(days=3))
    assert "tlsroll token create --node pc9 --address IP" in entry.advice
    named = Expiry("agent", "pc9", "1f", "sha256:x", when, dt.timedelta(days=3), token="T-CMD")
    assert "`(umask 077; T-CMD --print-join-command > join-pc9.sh)`" in named.advice
    assert "--address IP" not in named.advice
    # The join script, as README teaches (review s71 walkthrough L8): run on the node as root.
    assert "`sh join-pc9.sh` on pc9 as root (it keeps agent.toml's [server] table)" in (
        entry.advice
    )
    assert "`systemctl restart tlsroll-agent` there" in entry.advice
    assert "no removal needed" in entry.advice
    assert entry.advice.index("token create") < entry.advice.index("nodes remove pc9")
    assert "lost or stolen" in entry.advice
    assert "NAME" not in entry.advice and "NAME" in ADVICE["agent"]


def test_only_an_ended_certificate_is_kept_aside(
    tmp_path: Path, test_ca: pki.CertificateAuthority
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    key = pki.generate_key()
    cert = test_ca.issue(key.public_key(), pki.Names.of("pc9", ["10.1.1.9"]), client=True)
    assert keep_ended(data) is None  # no certificate: nothing to keep
    pki.write_cert(data / "node.pem", cert)
    assert keep_ended(data, cert.not_valid_before_utc) is None  # not ended: written over
    assert not ended_path(data).exists()
    assert keep_ended(data, cert.not_valid_after_utc) == ended_path(data)
    assert ended_path(data).read_bytes() == (data / "node.pem").read_bytes()


def test_a_certificate_made_a_fifo_is_passed_over_not_waited_on(tmp_path: Path) -> None:
    """Session 52 (review of 1ff7d01): ``keep_ended`` reads the node's certificate before an
    enrolment again writes over it. Made a FIFO, a plain read waited for a writer for ever
    (the enrolment never ended). Now it is passed over as an unreadable certificate is:
    nothing kept, the enrolment goes on. In a thread: a writer opened in the end lets a read
    blocked on the FIFO go."""
    data = tmp_path / "data"
    data.mkdir()
    cert_file = data / "node.pem"
    os.mkfifo(cert_file, 0o600)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        kept = pool.submit(keep_ended, data)
        try:
            assert kept.result(timeout=30) is None  # before: no result (a FIFO's read)
        finally:
            with contextlib.suppress(OSError):  # a reader blocked on it (before) let go
                os.close(os.open(cert_file, os.O_WRONLY | os.O_NONBLOCK))
    assert not os.path.lexists(ended_path(data))


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        ("unreachable", 1),
        ("refused", agent_runtime.EXIT_CERT_EXPIRED),
        ("INTERNAL", 1),
        ("UNKNOWN", 1),
        ("ABORTED", 1),
        ("CANCELLED", 1),
        ("DATA_LOSS", 1),
    ],
)
def test_an_ended_certificate_whose_enrolment_finds_no_leader_is_restarted_by_its_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str, code: int
) -> None:
    """Review s47rev1 L2: the leader host off as long as the node (the usual reason a node's
    certificate ends): the enrolment again with the token found no leader within its patience
    and the agent exited 5, which its unit does not restart on: the node never came back by
    itself once the leader did. Now exit 1 (restarted, as a first enrolment is); a token the
    leader refuses still exits 5 with the certificate's line. Review s66 rva M1: a leader that
    failed to answer (``identity.LEADER_FAILED``: its own error, a call cut off) is no refusal
    either, and exited 5 all the same; it exits 1 too. (The certificate check and the
    enrolment stand in for the child process and the leader: which exit the agent makes of
    their outcome is what is tested, the leader's failure as ``identity._enrol_error`` makes it
    of the gRPC status and as it comes back over the child's pipe; the real daemon path is in
    the test above.)"""
    from nodeagent import certwork, identity
    from nodeagent.identity import CertificateExpired
    from nodeagent.workerrors import answer_for
    from tlsroll.errors import TerminalError, TlsrollError, TransientError

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode[failure]

        def details(self) -> str:
            return "Exception calling application: boom"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    cfg = _config(tmp_path, join_token_file=str(tmp_path / "join-token"))
    (tmp_path / "join-token").write_text("a token\n")  # (one there: it is tried)

    def ended(_cfg: AgentConfig) -> None:
        raise CertificateExpired("the node's certificate ended on 2026-01-02")

    def enrol(_cfg: AgentConfig) -> None:
        if failure == "unreachable":
            raise TransientError("the leader at 10.1.1.1:9444 did not answer")
        if failure == "refused":
            raise TerminalError("the join token was refused: already used")
        # as the child answers it and the agent raises it again (certwork._error)
        raise certwork._error(answer_for(identity._enrol_error(cfg, "10.1.1.1:9444", Failed())))

    monkeypatch.setattr(certwork, "load_identity", ended)
    monkeypatch.setattr(certwork, "enrol", enrol)
    monkeypatch.setattr(agent_runtime, "next_enrol_wait", lambda *_a: None)
    import asyncio

    with pytest.raises(TlsrollError) as raised:
        asyncio.run(agent_runtime.obtain_identity(cfg))
    said = str(raised.value)
    assert said.startswith("the node's certificate ended on 2026-01-02")
    # (runtime.main's exits: CertificateExpired 5, EnrolmentRefused 6, any other 1)
    exit_code = (
        agent_runtime.EXIT_CERT_EXPIRED
        if isinstance(raised.value, CertificateExpired)
        else agent_runtime.EXIT_ENROLMENT_REFUSED
        if isinstance(raised.value, identity.EnrolmentRefused)
        else 1
    )
    assert exit_code == code, said
    if failure not in ("unreachable", "refused"):
        assert "failed to answer the enrolment: " in said and f"({failure})" in said, said
        assert said.endswith("it tries again at its next start"), said


def test_a_finalize_that_leaves_every_node_out_says_it_only_ends_phase_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review rev49fin: with every node left out (their agents cut off) the confirmation said
    "close http (8080) on no node, node by node now (each: freeze writes…)" and warned of
    workstations still on http, which lose nothing. It says the finalize closes http on no
    node and ends phase 1 leaving them dual, without that warning."""
    from leader.cli import rollout as cli_rollout
    from leader.cli.base import CLIError
    from leader.plan_texts import FINALIZE_WARNINGS
    from leader.schema_view import finalize_preview

    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    plan = finalize_preview("t1", ("node1", "node2"), {"node1", "node2"})
    with pytest.raises(CLIError):
        cli_rollout._confirm_finalize(plan, "")
    said = " ".join(capsys.readouterr().out.split())
    assert "Finalize t1: closes http on no node; it ends phase 1 leaving 2 nodes dual" in said
    assert "node by node" not in said and "freeze writes" not in said, said
    assert FINALIZE_WARNINGS[-1] not in said, said
    assert "Left out: node1: left out: its agent is cut off" in said, said


def test_a_finalize_started_with_every_node_left_out_says_what_happened() -> None:
    """s50: after "yes" with every node left out (their agents cut off) the finalize said
    "started on no node; follow it with: tlsroll schema show --watch". It says it closes
    http on no node and only ends phase 1, leaving the nodes on http and https; a finalize
    that closes http somewhere says where, as before."""
    from leader.cli.rollout import finalize_started
    from leader.schema_view import finalize_preview

    every = finalize_preview("t1", ("node1", "node2"), {"node1", "node2"})
    every.id = "f1"
    said = finalize_started(every, "")
    assert "no node" in said and "started on" not in said and "--watch" not in said, said
    assert said.startswith("rollout f1 (finalize of t1) closes http on no node: every node is")
    assert "only ends phase 1, leaving 2 nodes on http and https" in said, said
    some = finalize_preview("t1", ("node1", "node2"), {"node2"})
    some.id = "f2"
    assert finalize_started(some, "30m") == (
        "rollout f2 (finalize of t1) started on node1; each node waits until quiet for 30m;"
        " follow it with: tlsroll schema show --watch"
    )
