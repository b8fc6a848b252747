"""The agent's journal orders its transactions as it wrote them, never by their ``started_at``
(reviews s59 L8, s60, s61): ``started_at`` is the node's wall clock, which can be stepped back
(NTP at boot, a VM restored, an admin's ``date``), and a transaction begun after such a step
then has an earlier time than one begun before it. The way back to http (disable-tls without
``--undoes``: ``plans.switch_to_undo``) took "the newest switch from http" by that time, and
so did the stage sweep (``Journal.stage_needs``) to keep that way back's files: after the
step both chose the OLDER switch, so the way back put back that switch's source (a config from
before an edit made since, undone) and the sweep kept that switch's files and removed those
of the newer one. The unfinished transactions (resumed, reported busy, held from a copy put
back) are listed in the journal's order too. And the way back no longer reads every completed
switch, configs and all, to find that one: the journal is never pruned.

A real agent daemon whose clock is stepped back (its runtime's clock read from a file, as
``tests/test_node_clocks.py`` does) with a real reference server, commanded over mTLS by a
stand-in for the leader (``tests/nodeside.py``); and the journal on a real SQLite file, its
times given, for each query alone."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nodeagent import plans
from nodeagent.drivers import ServerFacts
from nodeagent.journal import Journal, Txn, mark_copy
from nodeagent.transaction import Phase, Plan
from tests.cluster import AdminTokenCluster, Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, NodeFactory
from tests.test_node_clocks import SKEWED_AGENT
from tests.test_switch import rotated, stage_files
from tlsroll.enums import TxnKind, TxnOutcome
from tlsroll.v1 import agent_pb2

CERT = ("server.key", "server.pem", "ca.pem")
HTTPS = ("https",)
AT = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
STEP = dt.timedelta(hours=1)  # how far the node's clock was ahead before it was stepped back


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("order"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def clocked_node(cluster: Cluster, factory: NodeFactory, skew_file: Path) -> Node:
    """A node (reference server on http, agent) whose agent's clock is the real one plus the
    seconds in ``skew_file`` when it reads it (``SKEWED_AGENT``: its one clock, which its
    service stamps a transaction's ``started_at`` with)."""
    node = factory.new()
    node.server.start()
    config = {"server": {"driver": "reference", "config_file": node.server.config_path}}
    agent = cluster.add_agent(node.name, node.address, extra_config=config, start=False)
    agent.argv = [sys.executable, "-c", SKEWED_AGENT, str(skew_file), *agent.argv[-2:]]
    node.agent = agent
    agent.start()
    return node


def way_back_to_http(node: Node, rollout_id: str) -> str:
    """The way back to http (a Rollback that names no switch: disable-tls): its outcome."""
    with node.stub() as stub:
        stub.Rollback(
            agent_pb2.RollbackRequest(command=node.command(rollout_id), undoes=""), timeout=60
        )
    back = node.wait_txn(rollout_id, "rollback")
    assert back.outcome in ("completed", "rolled_back", "failed"), back
    return str(back.outcome) + (f": {back.reason}" if back.reason else "")


def test_after_the_agent_s_clock_stepped_back_the_way_back_undoes_the_newest_switch(
    cluster: Cluster, tmp_path: Path
) -> None:
    """An agent whose clock runs an hour ahead switches a node to https (rollout ``old``) and
    takes it back to http; the admin then edits the http config by hand (a harmless setting of
    the reference server); the clock is stepped back the hour (NTP), and rollout ``new``
    switches the node to https again, then two rotations follow. ``new``'s switch is journalled
    with the earlier time. The sweep keeps the CA the way back to http checks a failed step's
    return to https with (``new``'s, review s59 H1), not the older switch's; the way back to
    http undoes ``new``'s switch: it puts back the config ``new`` found, the edit in it, and
    keeps nothing beside it (the config is as tlsroll wrote it since). Before, both took
    ``old`` for the newest switch from http: ``new``'s CA went, and the way back put back the
    config from before the edit (keeping the https config beside it as edited)."""
    skew = tmp_path / "skew"
    skew.write_text(str(STEP.total_seconds()))
    factory = NodeFactory(cluster, tmp_path, "ord")
    try:
        node = clocked_node(cluster, factory, skew)
        config = node.server.config_path
        on_http = config.read_bytes()

        node.stage("old")
        assert node.switch("old").rollout_id == "old"
        assert node.wait_txn("old").outcome == "completed"
        assert way_back_to_http(node, "old-back") == "completed"
        assert config.read_bytes() == on_http
        wait_until(lambda: stage_files(node) == set(), 20, "old's stage removed on http")

        # Edited by hand while on http (how long a login waits for the checks before it).
        edited = on_http.replace(b"[server]\n", b"[server]\nlogin_queue_seconds = 20\n", 1)
        assert tomllib.loads(edited.decode())["server"]["login_queue_seconds"] == 20
        config.write_bytes(edited)

        skew.write_text("0")  # the clock stepped back the hour
        node.stage("new")
        node.switch("new")
        assert node.wait_txn("new").outcome == "completed"
        rows = node.journal_query(
            "SELECT rollout_id, started_at FROM txns WHERE kind = 'switch' ORDER BY rowid"
        )
        times = {r["rollout_id"]: dt.datetime.fromisoformat(r["started_at"]) for r in rows}
        assert list(times) == ["old", "new"]
        assert times["new"] < times["old"]  # what the step did (not a measure of time)

        rotated(node, "rot")
        rotated(node, "rot2")
        # Kept: what is live (rot2's), what the rollback of the newest switch restores (rot's)
        # and the CA the way back to http checks a return to https with (new's).
        wanted = {"new/ca.pem", *(f"{r}/{f}" for r in ("rot", "rot2") for f in CERT)}
        with contextlib.suppress(TimeoutError):  # (the sweep runs once the rotation ended)
            wait_until(lambda: stage_files(node) == wanted, 20, "the sweep after rot2")
        assert stage_files(node) == wanted

        assert way_back_to_http(node, "back") == "completed"
        assert node.admin_status()["listen"] == ["http"]
        assert config.read_bytes() == edited  # what new's switch found, the edit in it
        assert sorted(p.name for p in node.config_dir.glob("*.before-rollback-*")) == []
        (back,) = node.journal_query(
            "SELECT plan FROM txns WHERE rollout_id = 'back' AND kind = 'rollback'"
        )
        assert json.loads(back["plan"])["ca_file"] == str(node.stage_dir("new") / "ca.pem")
        wait_until(lambda: stage_files(node) == set(), 20, "every stage file removed")
    finally:
        factory.close()


# --- the journal alone (a real SQLite file; the times are the caller's) ------------------------


def files(root: Path, rollout_id: str) -> dict[str, str]:
    """The https files a switch of ``rollout_id`` makes live (its stage directory's)."""
    return {
        "cert_file": str(root / rollout_id / "server.pem"),
        "key_file": str(root / rollout_id / "server.key"),
        "ca_file": str(root / rollout_id / "ca.pem"),
    }


Files = dict[str, str] | None
Moment = tuple[str, TxnKind, dt.datetime, Files, Files, bytes, bytes]
"""A transaction that completed: rollout, kind, its ``started_at`` (the node's clock then), the
https files live before and after it (None: http), the config it found and the one it wrote."""


def ended(journal: Journal, moment: Moment) -> None:
    """Journal ``moment`` (``Moment``) as the agent does: created, then completed."""
    rollout_id, kind, at, before, live, found, wrote = moment
    source, target = (("https",) if f else ("http",) for f in (before, live))
    ca_file = Path((live or before or {"ca_file": "/ca"})["ca_file"])
    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, source)
    plan = Plan(facts, source, target, Path("/n"), Path("/b"), ca_file, "", live, before)
    txn = Txn(rollout_id, kind, 1, Phase.VERIFIED, plan.to_json(), at)
    txn = journal.create(replace(txn, source_config=found, target_config=wrote))
    journal.complete(txn, live, phase=Phase.COMPLETED, outcome=TxnOutcome.COMPLETED)


def stepped_history(
    journal: Journal, root: Path, *, earlier: int = 0, ahead: dt.timedelta = STEP
) -> None:
    """``earlier`` switches to https and their ways back (the clock right), then: a switch from
    http (``old``) and its way back while the clock is ``ahead`` (an hour; negative: the clock
    was right, they were an hour before), the config edited by hand on http, the clock stepped
    back, a switch from http (``new``) and two rotations."""
    switch, back, minute = TxnKind.SWITCH, TxnKind.ROLLBACK, dt.timedelta(minutes=1)
    moments: list[Moment] = []
    for i in range(earlier):
        rid, at = f"e{i}", AT - dt.timedelta(days=1) + i * minute
        mine, https = files(root, rid), f"https {rid}".encode()
        moments += [(rid, switch, at, None, mine, b"http", https)]
        moments += [(rid, back, at, mine, None, https, b"http")]
    old, new, rot, rot2 = (files(root, rid) for rid in ("old", "new", "rot", "rot2"))
    moments += [
        ("old", switch, AT + ahead, None, old, b"http", b"https old"),
        ("old-back", back, AT + ahead, old, None, b"https old", b"http"),
        ("new", switch, AT, None, new, b"http edited", b"https new"),
        ("rot", switch, AT + minute, new, rot, b"https new", b"https rot"),
        ("rot2", switch, AT + 2 * minute, rot, rot2, b"https rot", b"https rot2"),
    ]
    for moment in moments:
        ended(journal, moment)


def test_the_newest_switch_from_http_is_the_journal_s_newest_not_the_clock_s(
    tmp_path: Path,
) -> None:
    """The journal's answers alone, after the clock stepped back between two switches from
    http (``new`` begun an hour "before" ``old``): the switch the way back to http undoes is
    ``new`` (its source, the edited http config, is what it puts back), and the sweep keeps
    ``new``'s CA (review s59 H1) and ``new``'s source, and nothing of ``old``."""
    root = tmp_path / "conf" / "tlsroll-tls"
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        stepped_history(journal, root)
        switch = plans.switch_to_undo(journal, None)
        assert (switch.rollout_id, switch.source_config) == ("new", b"http edited")
        assert switch.started_at == AT  # the whole row, as the journal holds it
        assert plans.source_of(switch) == b"http edited"
        needs = journal.stage_needs()
        assert str(root / "new" / "ca.pem") in needs.files
        assert not any("/old/" in f for f in needs.files), needs.files
        assert b"http edited" in needs.configs and b"http" not in needs.configs
        assert needs.way_back == "rot2"
        # A switch named is found as before, whatever its time.
        assert plans.switch_to_undo(journal, "old").rollout_id == "old"
    finally:
        journal.close()


def test_unfinished_transactions_are_listed_as_the_journal_wrote_them(tmp_path: Path) -> None:
    """Two transactions unfinished (a journal of an earlier release could hold them; the runner
    resumes them in this order), the second begun after the clock stepped back: ``unfinished``
    lists the first first, ``outlook`` names it as the one running (a new transaction is
    refused naming it), and a copy put back holds them in that order too (its log line and
    ``restored_unfinished``)."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    try:
        for rid, at in (("first", AT + STEP), ("second", AT)):
            facts = ServerFacts("127.0.0.1", "/", 8080, 8443, ("http",))
            plan = Plan(facts, ("http",), HTTPS, Path("/n"), Path("/b"), Path("/ca"), "").to_json()
            journal.create(Txn(rid, TxnKind.SWITCH, 1, Phase.FROZEN, plan, at))
        assert [t.rollout_id for t in journal.unfinished()] == ["first", "second"]
        seen = journal.outlook("third", TxnKind.SWITCH)
        assert seen.existing is None
        assert seen.running is not None and seen.running.rollout_id == "first"
    finally:
        journal.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        mark_copy(db, AT)  # as the copy kept before an upgrade is, then put back
    journal = Journal(path)
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            (held,) = db.execute("SELECT value FROM meta WHERE key = 'restored_unfinished'")
        assert [r[0] for r in json.loads(held[0])] == ["first", "second"]
        assert journal.restored_unfinished() == {("first", "switch"), ("second", "switch")}
    finally:
        journal.close()


def steps_to_undo(tmp_path: Path, earlier: int) -> tuple[int, Txn]:
    """SQLite's steps (its progress handler, each step counted) in finding the switch the way
    back to http undoes, after ``earlier`` switches and ways back before the history of
    ``stepped_history`` (its clock right here: the cost alone)."""
    root = tmp_path / "conf" / "tlsroll-tls"
    journal = Journal(tmp_path / "journal.sqlite3")
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        stepped_history(journal, root, earlier=earlier, ahead=-STEP)
        with journal._read() as db:  # the journal's one connection
            db.set_progress_handler(count, 1)
        try:
            switch = plans.switch_to_undo(journal, None)
        finally:
            with journal._read() as db:
                db.set_progress_handler(None, 1)
    finally:
        journal.close()
    return steps, switch


def test_the_way_back_to_http_reads_no_more_of_a_longer_history(tmp_path: Path) -> None:
    """``switch_to_undo`` read every completed switch (every column, both configs) and sorted
    them, on the way back's path, and the journal is never pruned: now it reads the switches
    newest first and stops at the first from http. A hundred switches and ways back more before
    it cost no more steps of SQLite (counted, not timed)."""
    (tmp_path / "short").mkdir()
    (tmp_path / "long").mkdir()
    short, found = steps_to_undo(tmp_path / "short", 2)
    long, found_long = steps_to_undo(tmp_path / "long", 100)
    assert found.rollout_id == found_long.rollout_id == "new"
    assert short > 0  # the counter counted (a handler that never ran would pass 0 == 0)
    assert long == short, (short, long)
