"""The agent SIGKILLed in the *middle* of an action, not between two (session 68's review of the
journal's crash safety). ``tests/test_switch.py`` kills it right after each phase is journalled
(``TLSROLL_AGENT_TEST_CRASH_AFTER``); here it dies while an action is under way, the journal
saying the phase before it: a real agent, a real reference server, killed from outside at a
point the test holds (the restarted server's start is held by the reference server's
``TLSROLL_REFSERVER_TEST_START_DELAY``, which the server the driver starts inherits from the
agent's environment). And what a power cut needs on disk first: a stage directory's entry;
and a journal whose transaction row the agent cannot read, at its start.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from nodeagent import plans
from nodeagent.drivers import Driver
from refserver.server import START_DELAY_ENV
from tests.cluster import AdminTokenCluster, Cluster, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, NodeFactory
from tests.test_switch import assert_refused_while_frozen, assert_switched

pytestmark = pytest.mark.timeout(240)
HELD = "120"  # seconds the driver's start of the target server is held: longer than any test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("midcrash"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@pytest.fixture
def make_node(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(cluster, tmp_path, "mc")
    try:
        yield factory
    finally:
        factory.close()


def held_start(node: Node, before: int | None) -> bool:
    """The server the agent's restart started (not ``before``) is held in its start: its pid
    file names it, and it said so in the driver's log."""
    assert node.agent is not None
    pid = node.server_pid()
    if pid is None or pid == before:
        return False
    log = node.agent.data_dir / "refserver.log"
    return log.exists() and "test_hook.start_delay" in log.read_text(errors="replace")


def test_an_agent_killed_while_its_restart_starts_the_target_resumes_and_completes(
    make_node: NodeFactory,
) -> None:
    """Killed while the server it restarted on the target config is still starting (its
    public port up, its admin socket not yet): the journal says ``config_written``. The
    server it left stays frozen; the agent started again restarts it (the half-started one
    stopped, never a second one beside it) and the switch completes, no write lost."""
    node = make_node(env={START_DELAY_ENV: HELD})
    assert node.agent is not None
    acked = node.post("http", {"note": "before"}).json()
    staged = node.stage("midrestart")
    before = node.server_pid()
    node.switch("midrestart")
    wait_until(lambda: held_start(node, before), 60, "the target server's start held")
    node.agent.kill()
    assert node.agent.proc is not None and node.agent.proc.returncode == -signal.SIGKILL

    [row] = node.journal_query("SELECT phase, outcome FROM txns")
    assert (row["phase"], row["outcome"]) == ("config_written", "")
    marker = uuid.uuid4().hex
    wait_until(lambda: node.port_open(8443), 30, "the held server's https port")
    assert_refused_while_frozen(node.post("https", {"marker": marker}))
    assert node.stored_with(marker) == 0

    node.restart_agent()  # without the start delay
    done = node.wait_txn("midrestart", timeout=90)
    assert done.outcome == "completed", done.reason
    assert_switched(node, staged.fingerprint)
    assert done.watermark == acked["seq"]
    assert node.get("https", f"entries/{acked['id']}").status == 200
    assert node.post("https", {"note": "after"}).status == 201


def test_a_stage_directory_made_is_on_disk_before_a_file_is_written_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files of a stage are each fsynced with their directory (``write_atomic``), and the
    switch's config, which names them, is fsynced too; ``tlsroll-tls`` and the rollout's
    directory were made with no fsync of the directory they are in: a power cut after a switch
    could keep the config and lose the directory's entry, the server's next start then meeting
    a config whose certificate and key are gone. Each directory made is fsynced into its parent;
    one there already costs no fsync."""
    config_dir = tmp_path / "server"
    config_dir.mkdir(mode=0o700)
    driver = cast(Driver, SimpleNamespace(config_file=config_dir / "server.toml"))
    synced: list[Path] = []  # what each fsync synced, by its descriptor's path
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    made = plans.make_stage_dir(driver, "r1", plans.Sharing.own())
    assert made == config_dir / plans.STAGES / "r1" and made.is_dir()
    assert synced == [config_dir, config_dir / plans.STAGES]
    synced.clear()
    plans.make_stage_dir(driver, "r2", plans.Sharing.own())
    assert synced == [config_dir / plans.STAGES]
    synced.clear()
    plans.make_stage_dir(driver, "r2", plans.Sharing.own())
    assert synced == []


def test_a_journal_row_the_agent_cannot_read_stops_it_with_one_line_and_may_be_reinitialised(
    make_node: NodeFactory,
) -> None:
    """Session 68 (journal review, L2): a transaction row whose phase the agent does not know
    (an edit by hand, a bit flipped inside a value: ``quick_check`` passes) stopped the agent
    at its start, resuming it, with "internal error: ValueError", exit 1, no file named,
    started again for ever; and --reinitialise refused the journal as intact. Now: exit 4,
    which the unit does not restart, one line naming the journal, the row and what is wrong;
    --reinitialise moves it aside and the agent starts on an empty journal."""
    node = make_node()
    agent = node.agent
    assert agent is not None
    assert agent.stop() == 0
    journal = node.journal_path
    with sqlite3.connect(journal) as conn:
        conn.execute(
            "INSERT INTO txns (rollout_id, kind, epoch, phase, started_at, plan)"
            " VALUES ('edited', 'switch', 1, 'halfway', ?, '{}')",
            (dt.datetime.now(dt.UTC).isoformat(),),
        )
    conn.close()
    code, output = agent.run_to_exit(timeout=60)
    assert code == 4, output
    line = one_line_error(output, "tlsroll-agent", allow_grpc_core=True)
    assert line.startswith(
        f"tlsroll-agent: journal {journal}: damaged (the transaction switch of rollout"
        " edited: 'halfway' is not a valid Phase); restore it from a backup"
    ), line
    edited = journal.read_bytes()
    argv = list(agent.argv)
    agent.argv = [*argv, "--reinitialise"]
    try:
        code, output = agent.run_to_exit(timeout=60)
    finally:
        agent.argv = argv
    assert code == 0, output
    (kept,) = [k for k in journal.parent.glob(f"{journal.name}.lost-*") if k.name[-4:-3] != "-"]
    assert kept.read_bytes() == edited  # (with its -wal and -shm beside it, if any)
    node.restart_agent()
    assert node.journal_query("SELECT rollout_id FROM txns") == []
