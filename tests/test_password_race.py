"""Two admins, one password (audit s39 H4, M1), with a real leader, agent and reference server
on loopback addresses and the real CLI: a password set over a staged one that never went live
says which one it replaces (who staged it, when); the plan and the start of a change-password
rollout name the version they apply, and an enable-tls rollout that brings its own password
says which staged one it replaces. A generated password is shown only once the leader said it
would take it: while a rollout has not ended, `password set --generate` and `rollout start`
refuse before any password is shown (a pty: a generated password is shown on a terminal
only)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from leader.cli.base import CLIError
from leader.cli.password import shown_password_fate
from tests.cluster import LEADER_POLL, AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node
from tests.test_interactive import GENERATED, Terminal
from tests.test_password_rollout import PW1, PW2, secret_file

PW3 = "third-password-7tn4-c8vb"
STAGED_BY = r"staged by \S+ at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


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


def flat(text: str) -> str:
    return " ".join(text.split())


def test_each_password_says_which_staged_one_it_replaces_and_rollouts_which_they_apply(
    one_node: tuple[Cluster, Node], tmp_path: Path
) -> None:
    cluster, _node = one_node
    pw1, pw2, pw3 = (secret_file(tmp_path / n, t) for n, t in (("1", PW1), ("2", PW2), ("3", PW3)))

    first = cluster.cli("password", "set", "--password-file", str(pw1))
    assert first.returncode == 0, first.stderr
    assert "password version 1 staged." in first.stdout
    assert "replaces" not in first.stdout  # nothing before it

    # A second admin stages another: the first one, live on no node, is named.
    second = cluster.cli("password", "set", "--password-file", str(pw2))
    assert second.returncode == 0, second.stderr
    assert "password version 2 staged." in second.stdout
    assert re.search(
        rf"It replaces password version 1 \({STAGED_BY}, live on no node now\): if it is another"
        " password, whoever was given that one must get the new one instead.",
        flat(second.stdout),
    ), second.stdout

    # enable-tls brings its own password over the staged one: the plan and the start say so.
    shown = cluster.cli("plan", "--scope", "local")
    assert shown.returncode == 0, shown.stderr
    assert re.search(
        rf"Auth password: a new one; it replaces password version 2 \({STAGED_BY}, live on no "
        "node now\\)",
        flat(shown.stdout),
    ), shown.stdout
    start = cluster.cli(
        "rollout", "start", "--scope", "local", "--password-file", str(pw3), "--yes", "--wait"
    )
    assert start.returncode == 0, start.stdout + start.stderr
    assert re.search(
        rf"its new password \(version 3\) replaces password version 2 \({STAGED_BY}, live on "
        "no node now\\)",
        flat(start.stdout),
    ), start.stdout

    # Over a password that is live, nothing is said.
    fourth = cluster.cli("password", "set", "--password-file", str(pw1))
    assert fourth.returncode == 0, fourth.stderr
    assert "password version 4 staged." in fourth.stdout
    assert "replaces" not in fourth.stdout

    # change-password: the plan and the start name the version they apply, and who staged it.
    shown = cluster.cli("plan", "--scope", "local", "--change", "change-password")
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"applies password version 4, {STAGED_BY}\.", flat(shown.stdout))
    before = cluster.store_rows(("rollouts",))
    wrong = cluster.cli(
        "rollout",
        "start",
        "--scope",
        "local",
        "--change",
        "change-password",
        "--password-version",
        "3",
        "--yes",
    )
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "password version 3 is not the one a change-password rollout applies now" in (
        wrong.stderr
    )
    assert "nothing was started" in wrong.stderr
    assert cluster.store_rows(("rollouts",)) == before
    start = cluster.cli(
        "rollout",
        "start",
        "--scope",
        "local",
        "--change",
        "change-password",
        "--password-version",
        "4",
        "--yes",
        "--wait",
    )
    assert start.returncode == 0, start.stdout + start.stderr
    assert re.search(rf"applies password version 4, {STAGED_BY}", flat(start.stdout))

    # The plan confirmed applies version 5; a second admin stages version 6 while the first
    # is asked: the start is refused, nothing started (it applied version 6, which the first
    # admin never saw: review s69 revrace M).
    fifth = cluster.cli("password", "set", "--password-file", str(pw2))
    assert fifth.returncode == 0, fifth.stderr
    term = Terminal(cluster, "rollout", "start", "--scope", "local", "--change", "change-password")
    try:
        term.read_until("Start the switch now?")
        assert re.search(rf"applies password version 5, {STAGED_BY}", flat(term.screen))
        sixth = cluster.cli("password", "set", "--password-file", str(pw3))
        assert sixth.returncode == 0, sixth.stderr
        before = cluster.store_rows(("rollouts",))
        term.type("y\n")
        assert term.finish() == 1, term.screen
    finally:
        term.close()
    assert (
        "auth password version 6 was staged while this rollout was planned (with version 5);"
        " nothing started" in flat(term.screen)
    ), term.screen
    assert cluster.store_rows(("rollouts",)) == before


def test_a_generated_password_is_not_shown_when_the_leader_would_refuse_it(
    one_node: tuple[Cluster, Node], tmp_path: Path
) -> None:
    """Another admin starts a rollout while `rollout start` waits for the answer to its plan:
    the start refuses before it makes a password. That rollout (transitional, awaiting
    finalize) has not ended: `password set --generate` is refused before a password is shown.
    (Each showed one, "write it down", then was refused.) Then, with node1's agent gone and a
    node2 that runs no password, `rollout start --nodes node2` is refused the same way (this
    was test_rollout_start_refuses_before_it_generates_a_password_while_a_rollout_is_active,
    with a cluster of its own)."""
    cluster, node = one_node
    pw1 = secret_file(tmp_path / "pw1", PW1)
    term = Terminal(cluster, "rollout", "start", "--scope", "local")
    try:
        term.read_until("Start the switch now?")
        other = cluster.cli(
            "rollout",
            "start",
            "--scope",
            "local",
            "--strategy",
            "transitional",
            "--password-file",
            str(pw1),
            "--yes",
        )
        assert other.returncode == 0, other.stdout + other.stderr
        term.type("y\n")
        assert term.finish() == 1, term.screen
    finally:
        term.close()
    assert GENERATED.search(term.screen) is None, term.screen  # no password was shown
    assert "it started while this one waited for your answer" in flat(term.screen)
    assert "nothing was started, and no password made" in flat(term.screen)
    assert "write it down" not in term.screen

    def awaiting() -> bool:  # looked at from this process
        return bool(cluster.poll_newest_rollout()["state"] == "awaiting_finalize")

    wait_until(awaiting, 90, "the transitional rollout to await finalize", interval=LEADER_POLL)
    before = cluster.store_rows(("auth_versions", "rollouts"))
    term = Terminal(cluster, "password", "set", "--generate")
    try:
        assert term.finish() == 1, term.screen
    finally:
        term.close()
    assert GENERATED.search(term.screen) is None, term.screen  # no password was shown
    assert "awaits finalize" in term.screen
    assert "write it down" not in term.screen
    assert cluster.store_rows(("auth_versions", "rollouts")) == before

    # `rollout start` refuses before it generates a password while that rollout is active:
    # node1's agent is gone (so no node the leader reaches runs a password: a start on a new
    # node2 would generate one). (It showed one, "write it down", then was refused.)
    node2 = Node(cluster, "node2", next_loopback(), tmp_path / "node2")
    try:
        node2.start()
        cluster.wait_for_nodes_online(["node2"])
        node.close()
        cluster.wait_for_nodes(["node1"], online=False, timeout=60)
        before = cluster.store_rows(("auth_versions", "rollouts"))
        term = Terminal(cluster, "rollout", "start", "--nodes", "node2", "--yes")
        try:
            assert term.finish() == 1, term.screen
        finally:
            term.close()
        assert GENERATED.search(term.screen) is None, term.screen  # no password was shown
        assert "awaits finalize" in term.screen
        assert "nothing was started" in term.screen
        assert cluster.store_rows(("auth_versions", "rollouts")) == before
    finally:
        node2.close()


@pytest.mark.parametrize(
    ("error", "fate"),
    [
        (CLIError("rollout r1 is running; one rollout at a time"), "was NOT set: discard it"),
        (
            CLIError(
                "the connection to the leader was lost after the request was sent: it may have "
                "been done; check with `tlsroll schema show`"
            ),
            "may have been set: check with `tlsroll schema show`",
        ),
        (click.UsageError("bad verifier"), "was NOT set: discard it"),
    ],
)
def test_a_failed_set_after_a_password_was_shown_says_what_became_of_it(
    error: Exception, fate: str
) -> None:
    with pytest.raises(type(error)) as raised, shown_password_fate(True):
        raise error
    text = str(raised.value)
    assert text.startswith(str(error)), text
    assert f"; the password shown above {fate}" in text
    assert "\n" not in text
    with pytest.raises(type(error)) as untouched, shown_password_fate(False):
        raise error
    assert str(untouched.value) == str(error)
