"""Issue 5 end to end: the auth password set at the switch, workstations joining with it over
the bootstrap service, a new password staged ("pending — takes effect at next restart") and
made effective by a change-password rollout; plus the password's bad input. Real leader,
agents and reference servers on loopback addresses, the real CLI."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.journal import Journal
from tests import byo_certs
from tests.cluster import LEADER_POLL, AdminTokenCluster, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, start_nodes
from tests.refserver_helper import http_request
from tlsroll import cli, pki, tls
from workstation.connection import TestConnection
from workstation.settings_files import KEPT

PW1 = "first-password-kd7q-x2mf"
PW2 = "second-password-9wq3-p4hz"


def secret_file(path: Path, text: str) -> Path:
    path.touch(0o600)
    path.write_text(text + "\n")
    return path


class World:
    """A three-node multiserver, node1 being the leader node."""

    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.root = root
        addresses = [next_loopback() for _ in range(nodes)]
        self.cluster = AdminTokenCluster(root / "cluster", addresses[0], heartbeat_interval=1)
        self.nodes = [
            Node(self.cluster, f"node{i + 1}", a, root / f"node{i + 1}")
            for i, a in enumerate(addresses)
        ]
        self.outputs: list[str] = []  # every CLI output, to scan for secrets

    def start(self) -> World:
        self.cluster.init("--node-name", "node1")
        self.cluster.start_leader()
        start_nodes(self.nodes)
        self.cluster.wait_for_nodes_online([n.name for n in self.nodes])
        return self

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.cluster.cli(*args)
        self.outputs += [result.stdout, result.stderr]
        return result

    def schema(self) -> dict[str, Any]:
        result = self.cli("schema", "show", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def poll(self) -> dict[str, Any]:
        """``schema`` for a wait, asked from this process (``Cluster.schema_json``); what it
        read joins ``outputs`` as the command would have printed it."""
        data = self.cluster.schema_json()
        self.outputs.append(json.dumps(data, indent=2, sort_keys=True))
        return data

    def run_rollout(self, *args: str) -> dict[str, Any]:
        result = self.cli("rollout", "start", "--scope", "cluster", *args, "--yes")
        assert result.returncode == 0, result.stderr

        def ended() -> bool:
            return self.poll()["rollouts"][0]["state"] in ("completed", "halted", "aborted")

        wait_until(ended, 90, "the rollout to end", interval=LEADER_POLL)
        latest: dict[str, Any] = self.schema()["rollouts"][0]
        return latest

    def test_connection(
        self,
        url: str,
        password_file: Path,
        settings: Path,
        name: str | None = "",
        *more: str,
    ) -> subprocess.CompletedProcess[str]:
        """``tlsroll client test-connection`` as a workstation named after its settings dir
        (``name`` else; None: no --name, the PC's own choice): one machine plays every practice
        PC, and each PC has a name of its own (a name another PC holds is refused)."""
        named = [] if name is None else ["--name", name or settings.name]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tlsroll",
                "client",
                "test-connection",
                url,
                "--password-file",
                str(password_file),
                "--yes",
                "--settings-dir",
                str(settings),
                *named,
                *more,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.outputs += [result.stdout, result.stderr]
        return result

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.cluster.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w.start()
    finally:
        w.close()


@pytest.fixture(scope="module")
def refusing_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One world for the two tests of refusals, which assert that their commands change
    nothing (the store's auth versions and rollouts the same before and after): neither needs
    a cluster of its own (a three-node world each). The unusable files' test comes first: it
    leaves the world as it found it; the other leaves an aborted rollout."""
    w = World(tmp_path_factory.mktemp("refusing"))
    try:
        yield w.start()
    finally:
        w.close()


def login(node: Node, password: str, ca_pem: bytes) -> int:
    resp = http_request(
        "POST",
        f"{node.https_url()}login",
        {"password": password},
        context=tls.client_context(ca_pem),
    )
    return resp.status


def test_workstations_join_then_a_new_password_takes_effect_at_restart(
    world: World, tmp_path: Path
) -> None:
    pw1 = secret_file(tmp_path / "pw1", PW1)
    pw2 = secret_file(tmp_path / "pw2", PW2)
    rollout = world.run_rollout("--password-file", str(pw1))
    assert rollout["state"] == "completed", rollout
    ca_pem = world.cluster.ca_pem

    # Every node: the seed's "Test connection" as a workstation would, then a request made
    # with the settings it wrote (client certificate + CA bundle).
    for node in world.nodes:
        settings = tmp_path / f"ws-{node.name}"
        result = world.test_connection(node.https_url(), pw1, settings)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "restart the client" in result.stdout
        assert (settings / "client.key").stat().st_mode & 0o777 == 0o600
        saved = json.loads((settings / "settings.json").read_text())
        assert saved["server_url"] == node.https_url()
        ctx = tls.client_context(
            (settings / "ca.pem").read_bytes(),
            cert_file=settings / "client.pem",
            key_file=settings / "client.key",
        )
        assert http_request("GET", node.https_url(), context=ctx).status == 200
        assert login(node, PW1, ca_pem) == 200

    # The same PC name at another node: refused with a reason it can act on (issue 9: names
    # are unique across the cluster), not "try later"; nothing written.
    taken = world.test_connection(
        world.nodes[1].https_url(), pw1, tmp_path / "ws-taken", name="ws-node1"
    )
    assert taken.returncode != 0
    assert "ws-node1 is taken" in taken.stderr and "choose another (--name)" in taken.stderr
    assert "try later" not in taken.stderr
    assert not (tmp_path / "ws-taken" / "client.key").exists()

    # A wrong password: the node refuses the exchange (exit 9), nothing written; the agent
    # reports the failure with its next heartbeat, and the schema shows it.
    wrong = secret_file(tmp_path / "wrong", "not-the-password")
    result = world.test_connection(world.nodes[0].https_url(), wrong, tmp_path / "ws-wrong")
    assert result.returncode == 9, result.stdout + result.stderr
    assert "wrong password" in result.stderr
    assert not (tmp_path / "ws-wrong" / "client.key").exists()
    failures: list[dict[str, Any]] = []

    def reported() -> bool:
        nonlocal failures
        failures = world.poll()["bootstrap_failures"]
        return bool(failures)

    wait_until(reported, 15, "the failed password in the schema", interval=LEADER_POLL)
    failures = world.schema()["bootstrap_failures"]
    (failure,) = failures
    assert failure["node"] == world.nodes[0].name and failure["count"] == 1
    assert failure["workstation"].startswith("ws-") and failure["source"].startswith("127.")
    assert failure["last_at"] and failure["first_at"]
    assert "failed bootstrap passwords" in world.cli("schema", "show").stdout

    # Stage a new password: pending on every switched node until its server restarts.
    result = world.cli("password", "set", "--password-file", str(pw2))
    assert result.returncode == 0, result.stderr
    assert "node1" in result.stdout and "next restart" not in result.stderr
    nodes = world.schema()["rollouts"][0]["nodes"]
    assert all(n["password_pending"] for n in nodes), nodes
    text = world.cli("schema", "show").stdout
    assert "pending" in text
    assert login(world.nodes[0], PW1, ca_pem) == 200  # the old one still works until restart

    # Review s72 (L): a node whose certificate its client CA did not issue (that CA file
    # replaced here) is refused by `rollout start` up front, with the agent's words (the
    # Check path alone was tested), nothing started; the file put back, it goes ahead below.
    client_ca = live_client_ca_file(world.nodes[1])
    installed = client_ca.read_bytes()
    client_ca.write_bytes(byo_certs.make_ca("Praxis own").pem)
    refused = world.cli(
        "rollout", "start", "--change", "change-password", "--nodes", "node2", "--yes"
    )
    client_ca.write_bytes(installed)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert f"not one its CA {client_ca} issued" in refused.stderr, refused.stderr
    assert "run rotate-cert first" in refused.stderr, refused.stderr
    assert world.schema()["rollouts"][0]["change"] == "enable-tls"  # nothing started

    # A change-password of node2 alone (review s69 revpass3 M1): the rollout's table names
    # only node2, and nothing said that node1 and node3 still run version 1 (a PC there told
    # the new password got "wrong password"). The schema says it cluster-wide: the newest
    # version, who staged it, each node behind with the version it runs, and the command.
    one = world.cli("rollout", "start", "--change", "change-password", "--nodes", "node2", "--yes")
    assert one.returncode == 0, one.stderr

    def one_ended() -> bool:
        latest = world.poll()["rollouts"][0]
        return bool(latest["change"] == "change-password" and latest["state"] == "completed")

    wait_until(one_ended, 90, "the change-password of node2", interval=LEADER_POLL)
    data = world.schema()
    assert [n["name"] for n in data["rollouts"][0]["nodes"]] == ["node2"]
    behind = data["password_behind"]
    assert behind["version"] == 2 and behind["staged_by"] and behind["staged_at"], behind
    assert behind["nodes"] == [
        {"node": "node1", "live_version": 1},
        {"node": "node3", "live_version": 1},
    ], behind
    finish = "tlsroll rollout start --change change-password --nodes node1,node3"
    assert behind["command"] == finish, behind
    text = world.cli("schema", "show").stdout
    assert "password version 2" in text and f"staged by {behind['staged_by']}" in text, text
    assert "node1 (version 1), node3 (version 1)" in text and finish in text, text
    # `tlsroll nodes` says it too, under its table (review s69 item 5: only `schema show` and
    # the viewer did), in the same words; its --json stays the list of nodes.
    listed = world.cli("nodes")
    assert listed.returncode == 0, listed.stderr
    said = " ".join(listed.stdout.split())
    assert f"password version 2 (staged by {behind['staged_by']} at " in said, listed.stdout
    then = (
        "not live on every node; still on an older one: node1 (version 1), node3 (version 1);"
        f" a workstation set up there needs the password it runs; to give them the newest: {finish}"
    )
    assert then in said, listed.stdout
    assert login(world.nodes[0], PW2, ca_pem) == 401  # what a PC there would meet
    assert login(world.nodes[1], PW2, ca_pem) == 200

    rollout = world.run_rollout("--change", "change-password")
    assert rollout["state"] == "completed", rollout
    assert rollout["change"] == "change-password"
    assert "password_behind" not in world.schema()
    assert "password version" not in world.cli("schema", "show").stdout
    assert "password version" not in world.cli("nodes").stdout
    assert not any(n["password_pending"] for n in world.schema()["rollouts"][0]["nodes"])

    for node in world.nodes:
        assert login(node, PW1, ca_pem) == 401
        assert login(node, PW2, ca_pem) == 200
    old = world.test_connection(world.nodes[1].https_url(), pw1, tmp_path / "ws-old")
    assert old.returncode == 9, old.stdout + old.stderr
    new = world.test_connection(world.nodes[1].https_url(), pw2, tmp_path / "ws-new")
    assert new.returncode == 0, new.stdout + new.stderr

    # Neither password nor any verifier appears in logs, CLI output or the schema.
    evidence = world.cluster.logs_text() + "".join(world.outputs) + json.dumps(world.schema())
    for node in world.nodes:
        evidence += node.server.log()
    for secret in (PW1, PW2):
        assert secret not in evidence
    assert '"hash"' not in evidence and "salt" not in json.dumps(world.schema())


def live_client_ca_file(node: Node) -> Path:
    """The client CA file the node's reference server's config names."""
    table = tomllib.loads(node.server.config_path.read_text())
    path = Path(table.get("server", table)["client_ca_file"])
    return path if path.is_absolute() else node.server.config_path.parent / path


def test_a_pc_of_the_same_name_does_not_take_the_name_from_another(tmp_path: Path) -> None:
    """Audit s39ws M2 end to end (real leader, agent, bootstrap service, reference server and
    the workstation tool): a second PC with the same name at the same node took the name over,
    and the leader revoked the first PC's certificate. Now it is refused (exit 11, one line,
    nothing written) and the first PC's certificate stays valid; the first PC enrols again as
    itself without more (its settings dir proves it, and keeps its name); the second takes the
    name only with --replace."""
    w = World(tmp_path, nodes=1)
    try:
        w.start()
        node = w.nodes[0]
        pw = secret_file(tmp_path / "pw", PW1)
        assert w.run_rollout("--password-file", str(pw))["state"] == "completed"
        first, second = tmp_path / "pc1", tmp_path / "pc2"

        def live() -> list[int]:
            listed = w.cli("workstations", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            rows = json.loads(listed.stdout)
            return [
                int(r["serial"], 16)
                for r in rows
                if r["name"] == "ws-empfang" and not r.get("revoked_at")
            ]

        def serial_of(settings: Path) -> int:
            return pki.read_cert(settings / "client.pem").serial_number

        def works(settings: Path) -> bool:
            ctx = tls.client_context(
                (settings / "ca.pem").read_bytes(),
                cert_file=settings / "client.pem",
                key_file=settings / "client.key",
            )
            return http_request("GET", node.https_url(), context=ctx).status == 200

        result = w.test_connection(node.https_url(), pw, first, "empfang")
        assert result.returncode == 0, result.stderr
        assert live() == [serial_of(first)] and works(first)

        taken = w.test_connection(node.https_url(), pw, second, "empfang")
        assert taken.returncode == 11, taken.stdout + taken.stderr
        line = one_line_error(taken.stderr, "tlsroll")
        assert "workstation name ws-empfang is taken at this node" in line, line
        assert "too old to prove it (upgrade it)" in line, line
        assert "run again with --replace" in line and "workstations revoke ws-empfang" in line
        assert not (second / "client.key").exists()
        assert live() == [serial_of(first)]  # the first PC's certificate not revoked

        # The first PC again, no --name: the name it holds, proven by its settings dir.
        again = w.test_connection(node.https_url(), pw, first, None)
        assert again.returncode == 0, again.stderr
        assert "client certificate ws-empfang " in again.stdout
        assert live() == [serial_of(first)] and works(first)

        # The second PC replaces it, on purpose.
        replaced = w.test_connection(node.https_url(), pw, second, "empfang", "--replace")
        assert replaced.returncode == 0, replaced.stderr
        assert live() == [serial_of(second)] and works(second)
        assert all(PW1 not in text for text in w.outputs)
    finally:
        w.close()


UNUSABLE = {
    "empty": "",
    "lf": "\n",
    "trailing-space": f"{PW2} \n",
    "two-boms": f"\ufeff\ufeff{PW2}\n",
}


def test_an_unusable_password_file_is_a_one_line_usage_error(
    refusing_world: World, tmp_path: Path
) -> None:
    """Each unusable file against one cluster (a cluster each cost the suite 30 s of CPU):
    a usage error that changes nothing, whichever came before it."""
    world = refusing_world
    before = world.cluster.store_rows(("auth_versions", "rollouts"))
    for kind, content in UNUSABLE.items():
        unusable = tmp_path / kind
        unusable.touch(0o600)  # (a file others can read is refused for that first)
        unusable.write_bytes(content.encode())
        for args in (
            ("rollout", "start", "--scope", "cluster", "--password-file", str(unusable), "--yes"),
            ("password", "set", "--password-file", str(unusable)),
        ):
            result = world.cli(*args)
            assert result.returncode == 2, (kind, args, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, (kind, result.stderr)
            assert "Traceback" not in result.stderr
    result = world.cli("password", "set", "--password-file", str(tmp_path / "missing"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    # Session 69 left it: made of the nodes' names (node1, node2), which the policy alone
    # does not know; judged again once the leader listed them, before it takes it or plans.
    by_names = secret_file(tmp_path / "by-names", "node1node2node1")
    for args in (
        ("rollout", "start", "--scope", "cluster", "--password-file", str(by_names), "--yes"),
        ("password", "set", "--password-file", str(by_names)),
    ):
        result = world.cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert "the nodes' names count as known words" in line, line
        assert "node1node2node1" not in line
    assert world.cluster.store_rows(("auth_versions", "rollouts")) == before


def test_password_set_is_refused_while_a_rollout_runs(
    refusing_world: World, tmp_path: Path
) -> None:
    world = refusing_world
    pw1 = secret_file(tmp_path / "pw1", PW1)
    result = world.cli(
        "rollout", "start", "--scope", "cluster", "--password-file", str(pw1), "--yes"
    )
    assert result.returncode == 0, result.stderr
    assert world.cli("rollout", "pause").returncode == 0
    before = world.cluster.store_rows(("auth_versions", "rollouts"))
    refused = world.cli("password", "set", "--password-file", str(pw1))
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "one rollout at a time" in refused.stderr
    assert world.cluster.store_rows(("auth_versions", "rollouts")) == before
    # `tlsroll plan` meanwhile: the plan, then exit 1 with one line, as for a blocked node (a
    # start of it is refused now); it exited 0 (brief s39pw).
    for json_out in ([], ["--json"]):
        plan = world.cli("plan", "--scope", "cluster", *json_out)
        assert plan.returncode == 1, plan.stderr
        line = one_line_error(plan.stderr, "tlsroll")
        assert line.startswith("tlsroll: error: rollout "), line
        assert "; one rollout at a time" in line, line
        assert "a start of this plan is refused until it has ended" in line, line
        if json_out:
            assert "one rollout at a time" in json.loads(plan.stdout)["busy"]
        else:  # the plan, and only stderr says that nothing was changed (s44)
            assert "Plan: change enable-tls" in plan.stdout
            assert "nothing has been changed" not in plan.stdout.lower()
        assert line.endswith(
            "a start of this plan is refused until it has ended; nothing was changed"
        )
    # ... and with nodes blocked as well (rotate-cert on the nodes still on http): every
    # reason in the one line, and "nothing ... changed" said once, there (s44: only the busy
    # one was given, and stdout said "Nothing has been changed." as well).
    plan = world.cli("plan", "--scope", "cluster", "--change", "rotate-cert")
    assert plan.returncode == 1, (plan.stdout, plan.stderr)
    line = one_line_error(plan.stderr, "tlsroll")
    assert line.startswith("tlsroll: error: rollout "), line
    assert "; one rollout at a time" in line, line
    assert "a start of this plan is refused until it has ended; rotate-cert is blocked on " in line
    assert "(not on https; run enable-tls first)" in line, line
    assert line.endswith("(--nodes); nothing was changed"), line
    said = (plan.stdout + plan.stderr).lower()
    assert said.count("nothing has been changed") + said.count("nothing was changed") == 1, said
    assert world.cluster.store_rows(("auth_versions", "rollouts")) == before
    assert world.cli("rollout", "abort").returncode == 0


def test_bootstrap_port_taken_is_found_and_another_port_is_used(tmp_path: Path) -> None:
    """9443 held by another program: the checks name it and the start is refused, the node
    untouched (it was accepted, and the node failed its preflight at once: brief s67 engine
    (a)); with [agent].bootstrap_port set, that port is used, shown in the schema and the
    notify text."""
    w = World(tmp_path, nodes=1)
    squatter = socket.socket()
    try:
        w.start()
        node = w.nodes[0]
        squatter.bind((node.address, 9443))
        squatter.listen()
        pw = secret_file(tmp_path / "pw", PW1)
        refused = w.cli("rollout", "start", "--scope", "cluster", "--password-file", str(pw))
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr.startswith(
            f"tlsroll: error: enable-tls cannot start: its first step would fail at once on "
            f"{node.name} ("
        ), refused.stderr
        assert "9443" in refused.stderr and "bootstrap" in refused.stderr, refused.stderr
        assert w.schema()["rollouts"] == []  # none was made
        assert http_request("GET", node.http_url()).status == 200  # still on http

        assert node.agent is not None
        node.agent.stop()
        node.agent.write_config({"agent": {"bootstrap_port": 9445}})
        node.agent.start()
        w.cluster.wait_for_nodes_online([node.name])
        rollout = w.run_rollout("--password-file", str(pw))
        assert rollout["state"] == "completed", rollout
        assert rollout["nodes"][0]["bootstrap_port"] == 9445
        notice = w.cli("notify", "--lang", "en")
        assert notice.returncode == 0, notice.stderr
        assert "9445" in notice.stdout
        assert PW1 not in notice.stdout
        german = w.cli("notify", "--format", "markdown")
        assert german.returncode == 0 and "Verbindung testen" in german.stdout
        assert PW1 not in german.stdout
        with_pw = w.cli("notify", "--include-password", "--password-file", str(pw))
        assert with_pw.returncode == 0, with_pw.stderr
        first_line = with_pw.stdout.strip().splitlines()[0]
        assert "E-Mail" in first_line and "WARNUNG" in first_line  # the warning comes first
        assert PW1 in with_pw.stdout
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the bootstrap service is up on the other port
            try:
                with socket.create_connection((node.address, 9445), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("bootstrap service not listening on 9445")
    finally:
        squatter.close()
        w.close()


@pytest.fixture(scope="module")
def switched_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, Path]]:
    """One node switched to https with an auth password by a real rollout, for the tests of a
    workstation's failures below, in the order written (under pytest-xdist, those a worker
    gets, in that order, on a node of its own): the second stops the agent, the third starts
    it with its bootstrap port taken, then again with it free."""
    root = tmp_path_factory.mktemp("switched")
    w = World(root, nodes=1)
    try:
        w.start()
        pw = secret_file(root / "pw", PW1)
        assert w.run_rollout("--password-file", str(pw))["state"] == "completed"
        yield w, pw
    finally:
        w.close()


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``tlsroll client test-connection ARGS`` run in this process (so that a test can put a
    fault between its steps): the exit code, stdout, stderr."""
    code = cli.main(["client", "test-connection", *args, "--yes", "--timeout", "2"])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_failed_final_check_never_leaves_the_pc_without_a_working_set(
    switched_node: tuple[World, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """s39wsfix leftover (real leader, agent, bootstrap service and reference server): a PC
    enrols again and the server stops answering right after the exchange, so the final check
    fails. The leader has revoked the PC's certificate in place when it signed the new one,
    and a request with the settings before fails too: before, they stayed in place all the
    same (the new pair kept aside), so the PC had no set the leader held valid. Now the new
    set goes in place (the one valid certificate), the error says what failed and what to do,
    and once the server answers again the settings in place work."""
    w, pw = switched_node
    node = w.nodes[0]
    pc = tmp_path / "pc"
    args = (node.https_url(), "--password-file", str(pw), "--settings-dir", str(pc))

    def live() -> list[int]:
        listed = w.cli("workstations", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        return [
            int(r["serial"], 16)
            for r in rows
            if r["name"] == "ws-empfang" and not r.get("revoked_at")
        ]

    code, out, err = in_process(capsys, *args, "--name", "empfang")
    assert code == 0, out + err
    before = pki.read_cert(pc / "client.pem").serial_number
    assert live() == [before]

    check = TestConnection.check_settings
    stopped: list[int] = []

    def server_stops_first(self: TestConnection, *a: Any) -> None:
        pid = node.server_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it accepts connections, answers nothing
        stopped.append(pid)
        check(self, *a)

    monkeypatch.setattr(TestConnection, "check_settings", server_stops_first)
    try:
        code, out, err = in_process(capsys, *args)  # the name: the PC's own
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert stopped, out + err
    assert code == 1, out + err
    now = pki.read_cert(pc / "client.pem").serial_number
    assert now != before
    assert live() == [now]  # in place: the one certificate of the name the leader holds valid
    assert not (pc / KEPT).exists()
    line = one_line_error(err, "tlsroll")
    assert line.startswith("tlsroll: error: a request with the new settings failed: "), line
    assert (
        "they are in place all the same: the leader revoked the certificate of the settings "
        "before when it signed the new one, and a request with those fails too"
    ) in line, line
    assert f"is the server at {node.https_url()} running?" in line, line
    assert line.endswith(
        "then run this again (it enrols again with the password) and restart the client"
    ), line
    ctx = tls.client_context(
        (pc / "ca.pem").read_bytes(), cert_file=pc / "client.pem", key_file=pc / "client.key"
    )
    assert http_request("GET", node.https_url(), context=ctx).status == 200


def test_a_bootstrap_service_down_is_said_with_what_to_check(
    switched_node: tuple[World, Path], tmp_path: Path
) -> None:
    """Audit s39ws M8 (real agent, leader and reference server): with the node's agent
    stopped, its bootstrap port refuses connections while the server answers https; the
    workstation's error said only "enter another port". It names what to check: the node's
    agent, ``tlsroll schema show`` on the leader, the port (exit 8, one line, nothing written).
    Stops the agent."""
    w, pw = switched_node
    node = w.nodes[0]
    assert node.agent is not None
    node.agent.stop()
    wait_until(lambda: not node.port_open(9443), 30, "the bootstrap port to close")
    assert http_request("GET", node.https_url(), context=node.ca_context()).status == 200
    pc = tmp_path / "pc"
    result = w.test_connection(node.https_url(), pw, pc, "empfang")
    assert result.returncode == 8, result.stdout + result.stderr
    line = one_line_error(result.stderr, "tlsroll")
    assert f"bootstrap port 9443 on {node.address} is closed (connection refused)" in line, line
    assert "check that the node's tlsroll agent is running" in line, line
    assert "`tlsroll schema show` on the leader" in line, line
    assert "the port: the one your notice names" in line, line
    assert not pc.exists()


def test_a_bootstrap_service_that_failed_to_start_is_a_node_problem_until_the_agent_starts_it(
    switched_node: tuple[World, Path],
) -> None:
    """Audit s39ws M8, part 2, and s43's Left 1 and 2 (real leader, agent and reference
    server): a switched node's agent starts while another program holds its bootstrap port, so
    its bootstrap service fails to start: that was only in the agent's log. The agent's
    heartbeats say why, and the schema shows it as the node's problem (what, what to do).
    The agent restarted while the port is still taken: the problem stays as it was (its since;
    one warning in the leader's log), not cleared by the new agent's first heartbeat, sent
    before it had tried (Left 2). The port freed: the same agent (no restart) starts the
    service by itself, which answers a PC, and the problem goes (Left 1: it was not tried
    again until the next switch or agent start). Runs after the test that stopped the
    agent."""
    w, _pw = switched_node
    node = w.nodes[0]
    agent = node.agent
    assert agent is not None
    if agent.running:
        agent.stop()
    leader = w.cluster.leader

    def problems() -> list[dict[str, Any]]:
        return [p for p in w.poll().get("node_problems", []) if p["node"] == node.name]

    squatter = socket.socket()
    try:
        squatter.bind((node.address, 9443))
        squatter.listen()
        warned = leader.event_names().count("node.bootstrap_down")
        node.start_agent_heard()
        wait_until(lambda: problems() != [], 30, "the schema to show the node's problem")
        [problem] = problems()
        assert problem["kind"] == "bootstrap-down", problem
        assert problem["problem"].startswith(
            f"{node.name}'s bootstrap service did not start (port 9443: "
        ), problem
        assert problem["problem"].endswith(
            "): workstations cannot enrol there; fix the cause: its agent tries again (at least "
            "once a minute)"
        ), problem
        shown = w.cli("schema", "show")
        assert shown.returncode == 0, shown.stderr
        assert "node problems" in shown.stdout and "bootstrap service did not start" in (
            " ".join(shown.stdout.split())
        ), shown.stdout

        # Left 2: the agent restarted, the port still taken. Its heartbeats before and after
        # its first try (a few, at 1 s) leave the problem as it was.
        agent.stop()
        before = len(agent.log_events())
        node.start_agent_heard()

        def said() -> list[str]:
            return [str(e.get("event")) for e in agent.log_events()[before:]]

        wait_until(lambda: "bootstrap.not_started" in said(), 30, "the agent's first try")
        (tried,) = [
            dt.datetime.fromisoformat(e["timestamp"])
            for e in agent.log_events()[before:]
            if e.get("event") == "bootstrap.not_started"
        ]

        def heard_since_the_try() -> bool:
            last = w.cluster.list_nodes()[node.name].last_heartbeat
            return last.ToDatetime(tzinfo=dt.UTC) > tried + dt.timedelta(seconds=1.5)

        wait_until(heard_since_the_try, 30, "a heartbeat after the agent's first try")
        assert problems() == [problem], (problems(), problem)
        assert leader.event_names().count("node.bootstrap_down") == warned + 1

        # Left 1: the port freed, the running agent starts the service (no restart).
        pid = agent.pid
        squatter.close()
        wait_until(lambda: bootstrap_answers(node), 90, "the bootstrap service to answer a PC")
        hello = f"https://{node.address}:9443/v2/hello"
        assert node.name in http_request("GET", hello, context=node.ca_context()).body.decode()
        wait_until(lambda: problems() == [], 30, "the node's problem to go")
        assert agent.running and agent.pid == pid
        # One line an outage, not one a try (tries at 2, 4, 8... s).
        assert said().count("bootstrap.not_started") == 1, said()
        assert said().count("bootstrap.up_again") == 1, said()
    finally:
        squatter.close()


def bootstrap_answers(node: Node) -> bool:
    """The node's bootstrap service answers a PC's hello on 9443 (200)."""
    hello = f"https://{node.address}:9443/v2/hello"
    with contextlib.suppress(OSError):
        return http_request("GET", hello, context=node.ca_context()).status == 200
    return False


def test_a_removed_node_takes_no_password_and_says_it_was_removed(tmp_path: Path) -> None:
    """Audit s45rt3 M3 end to end: once the leader refuses a removed node's heartbeat, its
    agent's bootstrap service checks no password (a wrong one was "wrong password", a guess
    oracle whose guesses reached no schema; the right one "502 ... try later", which never
    works): a 503 that says the node was removed, for either, nothing written. ``nodes remove``
    says what to do on that machine."""
    w = World(tmp_path, nodes=2)
    try:
        w.start()
        pw = secret_file(tmp_path / "pw", PW1)
        assert w.run_rollout("--password-file", str(pw))["state"] == "completed"
        gone = w.nodes[1]
        assert gone.agent is not None
        removed = w.cli("nodes", "remove", gone.name, "--yes")
        assert removed.returncode == 0, removed.stderr
        said = " ".join(removed.stdout.split())
        assert f"On {gone.name}: stop tlsroll-agent" in said, said
        assert "tlsroll password set" in said and "--change change-password" in said, said
        agent = gone.agent
        wait_until(
            lambda: "agent.removed_from_cluster" in agent.event_names(),
            30,
            "the removed node's agent to hear that the leader refuses it",
            interval=0.2,
        )
        wrong = secret_file(tmp_path / "wrong", "not-the-password")
        for password_file, settings in ((wrong, tmp_path / "pc-wrong"), (pw, tmp_path / "pc")):
            result = w.test_connection(gone.https_url(), password_file, settings)
            assert result.returncode == 11, result.stdout + result.stderr
            line = one_line_error(result.stderr, "tlsroll")
            assert "node_removed" in line and "no longer accepts this node" in line, line
            assert "wrong password" not in line and "try later" not in line, line
            assert not (settings / "client.key").exists()
        assert w.schema()["bootstrap_failures"] == []
        # The node still in the cluster enrols as before.
        kept = w.test_connection(w.nodes[0].https_url(), pw, tmp_path / "pc-kept")
        assert kept.returncode == 0, kept.stdout + kept.stderr
        # Review s45rev8 L1: the refusal is kept in the agent's journal. Started again while the
        # leader cannot be reached (no heartbeat refused yet), the agent's service still takes
        # no password: before, it checked them again (a guess oracle) until the leader refused
        # a heartbeat.
        w.cluster.stop_leader()
        agent.stop()
        agent.start()
        wait_until(
            lambda: bootstrap_answers(gone), 60, "the restarted agent's bootstrap service to answer"
        )
        assert "bootstrap.removed_earlier" in agent.event_names()
        result = w.test_connection(gone.https_url(), wrong, tmp_path / "pc-after-restart")
        assert result.returncode == 11, result.stdout + result.stderr
        line = one_line_error(result.stderr, "tlsroll")
        assert "node_removed" in line and "wrong password" not in line, line
        # And the mark goes once the leader answers (review s46rev1 M4): a node whose journal
        # holds a refusal (an earlier removal, a journal put back from a copy) but that the
        # leader accepts takes passwords again from its first answered heartbeat, and the
        # journal forgets the refusal.
        w.cluster.start_leader()
        # The restarted agent's first refused heartbeat is logged as an error in this run too
        # (review s46rev1 L8: only the start's warning said so).
        wait_until(
            lambda: agent.event_names().count("agent.removed_from_cluster") >= 2,
            30,
            "the restarted agent to log the leader's refusal again",
            interval=0.2,
        )
        stays = w.nodes[0]
        assert stays.agent is not None
        stays.agent.stop()
        journal = Journal(stays.journal_path)
        try:
            journal.set_removed_from_cluster("node node0 was removed from the cluster")
        finally:
            journal.close()
        stays.agent.start()
        wait_until(
            lambda: "agent.accepted_again" in stays.agent.event_names(),  # type: ignore[union-attr]
            30,
            "the leader to answer the marked agent",
            interval=0.2,
        )
        wait_until(lambda: bootstrap_answers(stays), 60, "its bootstrap service to answer")
        again = w.test_connection(stays.https_url(), pw, tmp_path / "pc-accepted")
        assert again.returncode == 0, again.stdout + again.stderr
        journal = Journal(stays.journal_path)
        try:
            assert journal.removed_from_cluster() is None
        finally:
            journal.close()
        assert PW1 not in w.cluster.logs_text() + "".join(w.outputs)
    finally:
        w.close()


def test_wrong_client_passwords_at_a_server_show_in_the_schema_per_node(tmp_path: Path) -> None:
    """Carried finding: the wrong passwords at a node's reference server's /login (the client
    password) were counted in its /admin/status only: the admin could not see someone guessing
    it. Now (real leader, agent and reference server) its agent carries the count and the time
    of the latest in its heartbeats, and ``schema show`` (--json and text) shows them per node,
    with what they may mean, only while there are some; a right password counts none."""
    w = World(tmp_path, nodes=1)
    try:
        w.start()
        node = w.nodes[0]
        pw = secret_file(tmp_path / "pw", PW1)
        assert w.run_rollout("--password-file", str(pw))["state"] == "completed"
        ca_pem = w.cluster.ca_pem
        assert login(node, PW1, ca_pem) == 200
        assert node.admin_status()["login_failures"] == 0
        assert w.poll()["server_login_failures"] == []
        shown = w.cli("schema", "show")
        assert shown.returncode == 0 and "wrong client password" not in shown.stdout

        started = dt.datetime.now(dt.UTC)
        for guess in ("guess-one-x7", "guess-two-x7", "guess-three-x7"):
            assert login(node, guess, ca_pem) == 401
        assert node.admin_status()["login_failures"] == 3

        def rows() -> list[dict[str, Any]]:
            return [f for f in w.poll()["server_login_failures"] if f["node"] == node.name]

        wait_until(lambda: [f["count"] for f in rows()] == [3], 30, "the schema to show them")
        (row,) = rows()
        last = dt.datetime.fromisoformat(row["last_at"])
        assert started - dt.timedelta(seconds=5) <= last <= dt.datetime.now(dt.UTC), row
        assert dt.datetime.fromisoformat(row["reported_at"]) >= last - dt.timedelta(seconds=5)
        data = w.schema()  # the command's own --json
        assert [(f["node"], f["count"]) for f in data["server_login_failures"]] == [(node.name, 3)]
        shown = w.cli("schema", "show")
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        assert "wrong client passwords at the servers" in text, shown.stdout
        assert "3 wrong client passwords so far" in text, shown.stdout
        assert "someone may be guessing it" in text, shown.stdout
        assert "node.server_login_failures" in w.cluster.leader.event_names()

        # Review of s49 (1): a change-password rollout (it restarts the server: the natural
        # answer to someone guessing) kept the count no more than any restart did. It goes on.
        before = node.admin_status()
        pw2 = secret_file(tmp_path / "pw2", PW2)
        assert w.cli("password", "set", "--password-file", str(pw2)).returncode == 0
        rollout = w.run_rollout("--change", "change-password")
        assert rollout["state"] == "completed", rollout
        status = node.admin_status()
        assert status["pid"] != before["pid"], status  # the server started again
        assert status["login_failures"] == 3, status
        assert status["last_login_failure"] == before["last_login_failure"], status
        assert login(node, PW1, ca_pem) == 401
        assert node.admin_status()["login_failures"] == 4
        wait_until(lambda: [f["count"] for f in rows()] == [4], 30, "the count going on")
        for said in w.outputs:
            assert PW1 not in said and PW2 not in said and "guess-one-x7" not in said
    finally:
        w.close()
