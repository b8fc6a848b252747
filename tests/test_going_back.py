"""README "Downgrading tlsroll" on the nodes and after a rollout: a real leader,
agents and reference servers (audit s40, H1 and H2).

The upgrade that keeps a store's copy (``NAME.before-vN``) is the store's own migration path
(its ``MIGRATIONS`` with one more, that changes nothing, here in the test's process); the
newer version's run after it is the current daemons' (the file's schema set back by hand). A
newer journal whose migrations since an older agent may ignore is made the same way, with a
migration that adds a column.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent import journal
from tests.cluster import LEADER_POLL, Cluster, one_line_error, wait_until
from tests.nodeside import Node, cluster_of
from tests.test_level_based import live, password_file
from tlsroll.defaults import BOOTSTRAP_PORT
from tlsroll.sqlite import Database, copy_name

ENDED = ("completed", "halted", "aborted")
PASSWORD = "a-password-for-the-practice-2026"


@pytest.fixture
def one(tmp_path: Path) -> Iterator[tuple[Cluster, Node]]:
    with cluster_of(tmp_path, 1) as (cluster, nodes):
        yield cluster, nodes[0]


def user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def set_user_version(path: Path, version: int) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        db.execute(f"PRAGMA user_version={version}")
        db.commit()


def put_back(path: Path, copy: Path) -> None:
    """README's way back, the daemon stopped: remove -wal and -shm, move the copy over."""
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(copy, path)


def run(cluster: Cluster, *args: str) -> dict[str, Any]:
    """A rollout command, then the rollout once it has ended."""
    started = cluster.cli("rollout", *args, "--yes", timeout=120)
    assert started.returncode in (0, 3, 4), started.stderr
    wait_until(
        lambda: cluster.poll_newest_rollout()["state"] in ENDED,
        120,
        f"rollout {args}",
        interval=LEADER_POLL,
    )
    return cluster.newest_rollout()


def enable_tls(cluster: Cluster, tmp_path: Path) -> dict[str, Any]:
    pw = password_file(tmp_path, "pw", PASSWORD)
    return run(cluster, "start", "--scope", "cluster", "--password-file", str(pw))


def start_agent(cluster: Cluster, node: Node) -> None:
    """Start the node's agent again, heard by the leader (``Node.start_agent_heard``: the
    stopped agent's last heartbeat passed ``wait_for_nodes_online``, and a rollout started then
    raced the new agent's start-up; a failed TLS handshake once under load)."""
    node.start_agent_heard()
    cluster.wait_for_nodes_online([node.name])


def problems_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    """The node problems ``schema show --json`` lists for node ``name``."""
    shown: list[dict[str, Any]] = cluster.schema_json().get("node_problems", [])
    return [p for p in shown if p.get("node") == name]


def no_settings_problem(cluster: Cluster, name: str) -> str:
    """The words of node ``name``'s problem once its agent says its journal holds no settings
    for the https its server serves (``tlsroll.enums.NO_SETTINGS``), waited for."""
    found: list[str] = []

    def shown() -> bool:
        found[:] = [
            p["problem"] for p in problems_of(cluster, name) if "holds no settings" in p["problem"]
        ]
        return bool(found)

    wait_until(shown, 30, f"{name}'s no-settings problem", interval=LEADER_POLL)
    return found[0]


def reasons(rollout: dict[str, Any]) -> str:
    return " | ".join(str(n.get("reason", "")) for n in rollout["nodes"])


def test_an_agent_gone_back_to_its_journal_copy_says_why_it_cannot_go_back_to_http(
    one: tuple[Cluster, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s40, H2: the node switched to https after the upgrade, then its journal's copy put
    back: the switch's way back to http lived only in the journal's row (migration 3), so
    `rollout rollback` is refused on that node. It said "this node was never switched from
    http to https", which is not so; now the agent says at its start that its journal is the
    copy put back (``journal.restored``), and the refusal says why the switch is missing."""
    cluster, node = one
    assert node.agent is not None
    node.agent.stop()
    known = len(journal.MIGRATIONS)
    monkeypatch.setattr(journal, "MIGRATIONS", (*journal.MIGRATIONS, ""))
    journal.Journal(node.journal_path).close()  # the upgrade
    copy = copy_name(node.journal_path, known + 1)
    assert copy.exists()
    set_user_version(node.journal_path, known)
    start_agent(cluster, node)
    assert enable_tls(cluster, tmp_path)["state"] == "completed"
    assert list(live(node).schemes) == ["https"]
    # The newer agent's journal is not a copy put back (review s40 M3).
    assert node.agent.event_names().count("journal.restored") == 0

    node.agent.stop()
    put_back(node.journal_path, copy)
    start_agent(cluster, node)
    assert node.agent.event_names().count("journal.restored") == 1
    node.agent.stop()  # said once: at the first start on the copy
    start_agent(cluster, node)
    assert node.agent.event_names().count("journal.restored") == 1

    # Session 75 https9443 (M3): the copy holds no live https settings, while the server serves
    # https with a password: no bootstrap service runs there (port 9443), and nothing said so,
    # the node looked fine and the plan said "nothing to do". The node's problem says it and
    # the rotate-cert that stages the settings again; the plan that finds the node done too.
    rotate = f"tlsroll rollout start --change rotate-cert --nodes {node.name}"
    said = no_settings_problem(cluster, node.name)
    assert said == (
        f"{node.name} serves https but its agent's journal holds no settings for it"
        " (reinitialised, or put back from an older copy): workstations cannot enrol at port"
        f" {BOOTSTRAP_PORT}; run: {rotate}"
    ), said
    plan = cluster.cli("plan", "--nodes", node.name)
    assert plan.returncode != 0 and "nothing to do" in plan.stderr, plan
    assert rotate in " ".join(plan.stderr.split()), plan.stderr
    assert "bootstrap.no_settings" in node.agent.event_names()

    back = run(cluster, "rollback")
    assert back["state"] == "halted", back
    why = reasons(back)
    assert "this node was never switched from http to https" in why, back
    assert "which is the copy kept before an upgrade" in why
    assert "its way back to http went with the newer journal (README 'Downgrading tlsroll')" in why
    assert list(live(node).schemes) == ["https"]  # nothing was done
    # ... and the node says so: failed, nothing on it changed, not "rolled_back", which says
    # something happened and was undone (session 71, reenrol); `rollout status` and `schema
    # show` show the same row, and the halt's note the same words.
    (row,) = back["nodes"]
    assert row["state"] == "failed", row
    assert row["reason"].startswith("going back to http refused: "), row
    assert row["reason"].endswith("; nothing on the node was changed"), row
    status = cluster.cli("rollout", "status", back["id"])
    assert "failed" in status.stdout and "rolled_back" not in status.stdout, status.stdout
    assert "nothing on the node was changed" in " ".join(status.stdout.split())
    note = back.get("reason", "")
    assert f"{node.name} failed: going back to http refused: " in note, back
    assert note.endswith("then tlsroll rollout rollback again"), note  # (the way back's way on)

    # M1: the agent's journal begun again (``--reinitialise``) holds none either: still said.
    agent = node.agent
    agent.stop()
    lacking = agent.event_names().count("bootstrap.no_settings")
    for suffix in ("-wal", "-shm"):
        Path(f"{node.journal_path}{suffix}").unlink(missing_ok=True)
    node.journal_path.write_bytes(os.urandom(64 * 1024))  # (damaged: tests/test_state_loss.py)
    argv = list(agent.argv)
    agent.argv = [*argv, "--reinitialise"]
    try:
        code, output = agent.run_to_exit(timeout=30)
    finally:
        agent.argv = argv
    assert code == 0, output
    start_agent(cluster, node)
    wait_until(
        lambda: agent.event_names().count("bootstrap.no_settings") > lacking,
        30,
        "the reinitialised agent's bootstrap.no_settings",
    )
    assert no_settings_problem(cluster, node.name) == said
    # The way named: the rotate-cert stages the settings, the service runs, the problem goes.
    rotated = run(cluster, "start", "--change", "rotate-cert", "--nodes", node.name)
    assert rotated["state"] == "completed", rotated
    wait_until(
        lambda: not problems_of(cluster, node.name),
        30,
        "the node's problem gone after the rotate-cert",
    )
    assert list(live(node).schemes) == ["https"]


def test_an_agent_runs_on_a_newer_journal_whose_migrations_it_may_ignore(
    one: tuple[Cluster, Node], tmp_path: Path
) -> None:
    """Audit s40, H2: going back on an agent without putting the copy back. A newer journal
    whose migrations since this agent's schema only add (here a column) says so
    (``readable_by``): this agent starts on it (before: "schema version 7 is newer", exit 3,
    and the way back was the copy, which loses every switch's way back to http), switches
    the node and takes it back to http, and leaves the file at the newer schema for the newer
    agent, which reads what this one wrote."""
    cluster, node = one
    assert node.agent is not None
    node.agent.stop()
    known = len(journal.MIGRATIONS)
    newer = [*journal.MIGRATIONS, "ALTER TABLE txns ADD COLUMN newer_detail TEXT"]
    Database(node.journal_path, newer, ignorable={known + 1}, what="journal").close()
    assert user_version(node.journal_path) == known + 1
    start_agent(cluster, node)
    assert "store.newer_schema_read" in node.agent.event_names()

    assert enable_tls(cluster, tmp_path)["state"] == "completed"
    assert list(live(node).schemes) == ["https"]
    assert run(cluster, "rollback")["state"] == "completed"
    assert list(live(node).schemes) == ["http"]

    node.agent.stop()
    assert user_version(node.journal_path) == known + 1
    db = Database(node.journal_path, newer, ignorable={known + 1}, what="journal")
    try:
        with db.read() as conn:
            kinds = [
                (r["kind"], r["outcome"], r["newer_detail"])
                for r in conn.execute("SELECT * FROM txns ORDER BY started_at")
            ]
    finally:
        db.close()
    assert [k for k in kinds if k[0] == "switch"] == [("switch", "completed", None)]
    assert ("rollback", "completed", None) in kinds


def test_an_agent_refuses_a_newer_journal_whose_readable_by_is_not_an_integer(
    one: tuple[Cluster, Node],
) -> None:
    """Review s40 M1: a ``readable_by`` this agent cannot trust ('abc') is the journal being
    newer: one line, exit 3, the file left as it is. Before: ``int('abc')``, a traceback and
    exit 1 (systemd starts it again, for ever)."""
    _, node = one
    assert node.agent is not None
    node.agent.stop()
    known = len(journal.MIGRATIONS)
    newer = [*journal.MIGRATIONS, "ALTER TABLE txns ADD COLUMN newer_detail TEXT"]
    Database(node.journal_path, newer, ignorable={known + 1}, what="journal").close()
    with contextlib.closing(sqlite3.connect(node.journal_path, isolation_level=None)) as db:
        db.execute("UPDATE schema_floor SET readable_by = 'abc'")
    before = node.journal_path.read_bytes()
    code, output = node.agent.run_to_exit()
    assert code == 3, output
    assert "Traceback" not in output, output
    assert f"journal schema version {known + 1} is newer than this tlsroll knows" in output
    assert node.journal_path.read_bytes() == before


def test_a_stale_epoch_after_going_back_on_the_leader_names_the_way_out(
    one: tuple[Cluster, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit s40, H1: the leader's copy put back after rollouts ran on the newer version: its
    epochs are behind the node's, which refuses the next rollout ("stale epoch"). The refusal
    the leader records names the way out, and that way works: `tlsroll epoch show` says the
    node is ahead (exit 1), `tlsroll epoch advance`, and a new rollout runs."""
    from leader import db as leader_db

    cluster, node = one
    cluster.stop_leader()
    known = len(leader_db.MIGRATIONS)
    monkeypatch.setattr(leader_db, "MIGRATIONS", (*leader_db.MIGRATIONS, ""))
    leader_db.open_db(cluster.store_path).close()  # the upgrade
    copy = copy_name(cluster.store_path, known + 1)
    assert copy.exists()
    set_user_version(cluster.store_path, known)
    cluster.start_leader()
    cluster.wait_for_nodes_online([node.name])
    assert enable_tls(cluster, tmp_path)["state"] == "completed"
    assert run(cluster, "rollback")["state"] == "completed"
    # The newer leader's store is not a copy put back (review s40 M3).
    assert cluster.leader.event_names().count("store.restored") == 0

    cluster.stop_leader()
    put_back(cluster.store_path, copy)
    cluster.start_leader()
    cluster.wait_for_nodes_online([node.name])
    assert cluster.leader.event_names().count("store.restored") == 1

    # The node's highest epoch reaches the store with a heartbeat's record (the group commit,
    # about a second): on a fast machine `epoch show` could come first (ci49c).
    deadline = time.monotonic() + 15
    shown = cluster.cli("epoch", "show")
    while shown.returncode != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        shown = cluster.cli("epoch", "show")
    assert shown.returncode == 1, shown.stdout + shown.stderr
    # The plan and the start read the epochs the nodes report (review s70 drift M1: the plan
    # said nothing, and the start made a rollout that halted at its first command, "stale
    # epoch", its note offering a retry, which the node refuses the same way).
    before = cluster.schema_json(limit=0)["rollouts"]
    pw = password_file(tmp_path, "pw", PASSWORD)
    for args in (("plan",), ("rollout", "start", "--password-file", str(pw), "--yes")):
        refused = cluster.cli(*args, "--scope", "cluster")
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
        line = one_line_error(refused.stderr, "tlsroll")
        assert re.fullmatch(
            r"tlsroll: error: the leader's store is behind node1 \(seen epoch \d+; this "
            r"rollout's would be \d+\): restored from a backup, or an older copy put back; run "
            r"tlsroll epoch advance \(see tlsroll epoch show\), then plan again; nothing was "
            r"changed",
            line,
        ), line
    assert cluster.schema_json(limit=0)["rollouts"] == before  # none was made
    advanced = cluster.cli("epoch", "advance", "--yes")
    assert advanced.returncode == 0, advanced.stderr
    assert enable_tls(cluster, tmp_path)["state"] == "completed"
    assert list(live(node).schemes) == ["https"]
