"""The admin at a terminal (a real pty): `rollout start` without --yes shows the plan and the
seed's warnings and asks; without --password-file the auth password is generated and shown
once, on the terminal, and nowhere else — not in the leader's store, logs or schema."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import LEADER_POLL, AdminTokenCluster, Cluster, child_env, command, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node

GENERATED = re.compile(r"\b[2-9a-z]{4}(?:-[2-9a-z]{4}){5}\b")


class Terminal:
    """``tlsroll ARGS`` on a pseudo-terminal; read its screen, type answers."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [*command("tlsroll", "tlsroll"), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir), "COLUMNS": "120"}),
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not shown; screen so far:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # EIO: the program closed the terminal
                    if text not in self.screen:
                        raise AssertionError(f"{text!r} not shown:\n{self.screen}") from None
        return self.screen

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
        return self.proc.wait(max(deadline - time.monotonic(), 1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[tuple[Cluster, Node]]:
    address = next_loopback()
    cluster = AdminTokenCluster(tmp_path / "cluster", address, heartbeat_interval=1)
    node = Node(cluster, "node1", address, tmp_path / "node1")
    try:
        cluster.init("--node-name", "node1")
        cluster.start_leader()
        node.start()
        cluster.wait_for_nodes_online(["node1"])
        yield cluster, node
    finally:
        node.close()
        cluster.close()


def test_start_asks_then_shows_a_generated_password_once(
    one_node: tuple[Cluster, Node], tmp_path: Path
) -> None:
    cluster, node = one_node
    term = Terminal(cluster, "rollout", "start", "--scope", "local")
    try:
        screen = term.read_until("Start the switch now?")
        assert "restarts the managed server" in screen
        text = " ".join(screen.split())  # (the terminal folds long lines)
        # What happens to the workstations not yet switched, and the way to spare them
        # (audit s38 M1): not only that clients re-initiate their connections.
        assert (
            "All connected clients must re-initiate their server connections: http (8080) "
            "closes the moment each node switches, and every workstation on that node loses the "
            "server until someone does the client steps there"
        ) in text
        assert "To let the workstations move over first: --strategy transitional" in text
        # The seed's data-loss warning, not "no data is lost" (audit s38 M2).
        assert (
            "Staff must make no new entries during the switch (tlsroll notify tells them): "
            "entries already acknowledged are kept, but one refused with 503 during the freeze "
            "must be made again; with --freeze node the other nodes keep taking entries."
        ) in text
        assert "no data is lost" not in text
        assert "node1 (leader node)" in screen
        assert GENERATED.search(screen) is None  # nothing generated before the admin agrees
        term.type("y\n")
        assert term.finish() == 0, term.screen
    finally:
        term.close()
    passwords = GENERATED.findall(term.screen)
    assert len(passwords) == 1, term.screen  # shown exactly once
    (secret,) = passwords
    assert "not by e-mail" in term.screen

    def completed() -> bool:  # looked at from this process: Cluster.poll_newest_rollout
        return bool(cluster.poll_newest_rollout()["state"] == "completed")

    wait_until(completed, 60, "the rollout to complete", interval=LEADER_POLL)

    # The password works at a workstation ...
    password_file = tmp_path / "pw"
    password_file.touch(0o600)
    password_file.write_text(secret + "\n")
    result = subprocess.run(
        [
            *command("tlsroll", "tlsroll"),
            "client",
            "test-connection",
            node.https_url(),
            "--password-file",
            str(password_file),
            "--yes",
            "--settings-dir",
            str(tmp_path / "ws"),
            "--name",
            "empfang",  # (not the host's name: "localhost" names no PC)
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=child_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # ... and is nowhere on the leader: not in its files, logs or any later output.
    for path in cluster.data_dir.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert secret.encode() not in path.read_bytes(), path
    later = [
        cluster.cli(*args)
        for args in (
            ("schema", "show"),
            ("schema", "show", "--json"),
            ("rollout", "status"),
            ("notify",),
        )
    ]
    evidence = cluster.logs_text() + node.server.log() + "".join(r.stdout + r.stderr for r in later)
    assert secret not in evidence


def test_answering_no_starts_nothing(one_node: tuple[Cluster, Node]) -> None:
    cluster, _node = one_node
    before = cluster.store_rows(("rollouts", "auth_versions"))
    term = Terminal(cluster, "rollout", "start", "--scope", "cluster")
    try:
        term.read_until("Start the switch now?")
        term.type("n\n")
        code = term.finish()
    finally:
        term.close()
    assert code == 1
    assert "not started" in term.screen
    assert GENERATED.search(term.screen) is None
    assert cluster.store_rows(("rollouts", "auth_versions")) == before
