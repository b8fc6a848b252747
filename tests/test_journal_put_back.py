"""A node's journal put back from the copy kept before an upgrade, a copy made mid-switch
(brief s41upg, 1 and 2; ``nodeagent.journal``'s docstring has the model).

An upgrade restarts the agent at any time, also mid-switch (install.sh: "the agent may be
restarted at any time"): the newer agent makes the copy (``NAME.before-vN``) as it opens the
journal, with the switch unfinished in it, and carries the switch on to its end. Made here as
test_going_back makes it: the journal's migrations with one more (that changes nothing), opened
in the test's process with the agent stopped, the file's schema then set back by hand so that
this checkout's agent is "the newer one". The switch is stopped mid-way by the fault tests' hook
(``TLSROLL_AGENT_TEST_CRASH_AFTER``: the agent SIGKILLs itself after journalling a phase).

Real agents and reference servers, commanded with the leader's certificate (``tests.nodeside``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nodeagent import journal
from nodeagent.drivers import ReferenceDriver
from nodeagent.transaction import CRASH_ENV, _not_loaded
from tests.cluster import AdminTokenCluster, Cluster, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node, NodeFactory
from tests.test_going_back import put_back, set_user_version
from tlsroll import password
from tlsroll.enums import Change
from tlsroll.sqlite import copy_name
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("putback"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@pytest.fixture
def make_node(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(cluster, tmp_path, "pb")
    try:
        yield factory
    finally:
        factory.close()


def copy_made_mid_switch(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, rid: str, phase: str
) -> tuple[Node, Path]:
    """A node whose switch ``rid`` stopped after ``phase``, upgraded then (the copy made with
    the switch unfinished in it), and the switch carried on to its end by the newer agent."""
    node = make_node(env={CRASH_ENV: phase})
    assert node.agent is not None and node.agent.proc is not None
    node.stage(rid)
    try:
        node.switch(rid)
    except grpc.RpcError as exc:  # the agent may die before its answer is out
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    node.agent.proc.wait(30)
    [row] = node.journal_query("SELECT phase, outcome FROM txns")
    assert (row["phase"], row["outcome"]) == (phase, "")
    known = len(journal.MIGRATIONS)
    with monkeypatch.context() as m:  # the upgrade: its agent opens the journal first
        m.setattr(journal, "MIGRATIONS", (*journal.MIGRATIONS, ""))
        journal.Journal(node.journal_path).close()
    copy = copy_name(node.journal_path, known + 1)
    assert copy.exists()
    set_user_version(node.journal_path, known)
    node.restart_agent()  # "the newer agent", without the crash hook: it resumes the switch
    assert node.wait_txn(rid).outcome == "completed"
    assert node.admin_status()["listen"] == ["https"]
    return node, copy


def copy_made_then_broken(node: Node, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The upgrade of a node whose agent stopped mid-switch, the newer agent broken (the
    usual reason to go back): it makes the copy as it opens the journal, then never carries
    the switch on. Returns the copy."""
    known = len(journal.MIGRATIONS)
    with monkeypatch.context() as m:
        m.setattr(journal, "MIGRATIONS", (*journal.MIGRATIONS, ""))
        journal.Journal(node.journal_path).close()
    set_user_version(node.journal_path, known)
    copy = copy_name(node.journal_path, known + 1)
    assert copy.exists()
    return copy


def assert_needs_admin(node: Node, rid: str, pid: int | None, config: bytes) -> None:
    """The node needs the admin and nothing takes it on (review s41rev1 M1): its preflight
    fails with why, and Stage, Switch and Rollback are refused with it; the server untouched."""
    pre = node.preflight(f"{rid}-next")
    assert not pre.server.healthy
    assert pre.server.detail.startswith("needs the admin: journal put back mid-"), pre
    assert not pre.ok
    assert pre.problems[0].startswith("needs the admin: journal put back mid-"), pre.problems
    for act in (
        lambda: node.stage(f"{rid}-next"),
        lambda: node.switch(f"{rid}-next"),
        lambda: node.rollback(rid),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            act()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
        assert str(refused.value.details()).startswith("needs the admin: "), refused.value
    assert node.server_pid() == pid
    assert node.server.config_path.read_bytes() == config
    assert node.journal_query("SELECT 1 FROM txns WHERE rollout_id = ?", f"{rid}-next") == []


def go_back(node: Node, copy: Path) -> tuple[int | None, bytes]:
    """README's way back: the agent stopped, its journal's copy put back, the agent started
    again. Returns the server's pid and config file as they were before the agent started."""
    assert node.agent is not None
    assert node.agent.stop() == 0
    put_back(node.journal_path, copy)
    pid, config = node.server_pid(), node.server.config_path.read_bytes()
    node.restart_agent()
    return pid, config


def settled(node: Node, rid: str) -> tuple[str, str, str]:
    done = node.wait_txn(rid, timeout=30)
    return done.outcome, done.phase, done.reason


def assert_untouched(node: Node, rid: str, pid: int | None, config: bytes) -> None:
    """Nothing was done to the server: same process, same config file, not frozen, and the
    journal shows no action begun for ``rid`` since its put back."""
    assert node.server_pid() == pid
    assert node.server.config_path.read_bytes() == config
    assert node.admin_status()["frozen"] is False
    events = node.journal_events(rid)
    after = events[events.index(("settle", "restored")) :]
    assert [e for e in after if e[1] == "begin"] == [], events
    assert node.agent is not None
    # Resumed once: by the newer agent, never by the agent on the copy.
    assert node.agent.event_names().count("txn.resuming") == 1


def checked_once(node: Node) -> str:
    """The admin's ``tlsroll-agent --journal-checked``, a one-shot with the agent stopped
    (review s45rt2 H1): it exits 0 and says to start the agent again; its line."""
    agent = node.agent
    assert agent is not None
    agent.argv.append("--journal-checked")
    try:
        code, said = agent.run_to_exit()
    finally:
        agent.argv.remove("--journal-checked")
    assert code == 0, said
    line = one_line_error(said, "tlsroll-agent", allow_grpc_core=True)
    assert line.endswith(
        ": start the agent now as before (installed: systemctl start tlsroll-agent)"
    ), line
    return line


def test_a_switch_rolled_back_since_the_copy_is_not_switched_again(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy was made with the switch frozen; the newer agent completed it and the cluster
    then took the node back to http. Before: the agent on the copy put back resumed the switch
    from ``frozen`` (froze the server again, wrote the https config, restarted it): the node
    went to https, which the cluster had left. Now the switch is settled from what the server
    runs (its source, http): ``rolled_back``, and nothing is done to the server."""
    node, copy = copy_made_mid_switch(make_node, monkeypatch, "pb-back", "frozen")
    node.rollback("pb-back")
    assert node.wait_txn("pb-back", "rollback").outcome == "completed"
    assert node.admin_status()["listen"] == ["http"]

    pid, config = go_back(node, copy)
    outcome, phase, reason = settled(node, "pb-back")
    assert (outcome, phase) == ("rolled_back", "rolled_back"), reason
    assert "made while this switch of rollout pb-back was at phase frozen" in reason
    assert "the server runs its source" in reason
    assert node.admin_status()["listen"] == ["http"]
    assert_untouched(node, "pb-back", pid, config)
    assert node.post("http", {"note": "after going back"}).status == 201
    assert node.agent is not None
    assert "journal.restored_settled" in node.agent.event_names()
    # Not a node that needs the admin: its server view is healthy.
    pre = node.preflight("pb-next")
    assert pre.server.healthy, pre.server.detail
    # --journal-checked when nothing needs it: said so, nothing refused, nothing changed.
    assert node.agent.stop() == 0
    checked_once(node)
    node.restart_agent()
    [checked] = [e for e in node.agent.log_events() if e.get("event") == "journal.checked"]
    assert checked["detail"] == "nothing needed the admin", checked
    assert node.preflight("pb-next").ok
    assert_untouched(node, "pb-back", pid, config)


def test_a_switch_finished_since_the_copy_is_recorded_completed_and_rolls_back(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy was made with the https config written, the server not restarted yet; the
    newer agent completed the switch. Before: resumed from ``config_written``, the server was
    frozen and restarted again. Now ``completed``, nothing done to the server; and the switch's
    way back, which the copy holds, works: `rollout rollback` takes the node to http. That
    first transaction completed on the copy also ends its mention in a refusal (brief 2)."""
    node, copy = copy_made_mid_switch(make_node, monkeypatch, "pb-done", "config_written")

    pid, config = go_back(node, copy)
    outcome, phase, reason = settled(node, "pb-done")
    assert (outcome, phase) == ("completed", "completed"), reason
    assert "the server runs its target" in reason
    assert node.admin_status()["listen"] == ["https"]
    assert_untouched(node, "pb-done", pid, config)

    node.rollback("pb-done")
    back = node.wait_txn("pb-done", "rollback")
    assert back.outcome == "completed", back.reason
    assert node.admin_status()["listen"] == ["http"]
    assert node.post("http", {"note": "back on http"}).status == 201
    [meta] = node.journal_query("SELECT count(*) AS n FROM meta WHERE key = 'restored_copy_at'")
    assert meta["n"] == 0


def test_a_server_that_runs_neither_config_needs_the_admin(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, cluster: Cluster
) -> None:
    """The server's config was changed by hand since: it is neither the switch's target nor
    its source, and proves nothing. The switch is recorded ``failed`` with what to do, nothing
    is done to the server, and the node needs the admin: its agent reports its server so (the
    leader's `tlsroll nodes`, the schema's node problems, its planning). Here the server
    serves https, which the copy (made before the switch's end) does not know live: the
    admin's ``--journal-checked`` is refused (review s41rev1 M2), and a plain restart keeps
    the node needing the admin. (The way out is in
    ``test_a_switch_the_newer_agent_never_carried_on_leaves_a_frozen_node_to_the_admin``.)

    Review s41rev1 M1, on the same node (once a test of its own, on a node made the same way):
    ``needs_admin`` only changed the agent's view; its Preflight stayed ok (with no schemes),
    and a rollout already running staged and switched the node (the server restarted on a new
    config) while it still needed the admin. Now the preflight fails with why, and Stage,
    Switch and Rollback are refused (FAILED_PRECONDITION) with it, nothing changed."""
    node, copy = copy_made_mid_switch(make_node, monkeypatch, "pb-hand", "frozen")
    with node.server.config_path.open("a") as f:
        f.write("\n# changed by hand\n")

    pid, config = go_back(node, copy)
    outcome, phase, reason = settled(node, "pb-hand")
    assert (outcome, phase) == ("failed", "failed"), reason
    assert "the server's live config is neither its target nor its source" in reason
    assert "then run the agent once with --journal-checked (it exits) and start it" in reason
    assert_untouched(node, "pb-hand", pid, config)
    assert node.admin_status()["listen"] == ["https"]
    pre = node.preflight("pb-next")
    assert not pre.server.healthy
    assert pre.server.detail.startswith("needs the admin: journal put back mid-switch"), pre
    assert_needs_admin(node, "pb-hand", pid, config)  # M1
    # The switch itself asked again (its leader's step run again: a leader restart, a stream
    # broken by the agent's restart) is a replay, answered with what the journal holds, never
    # refused as a switch not begun: the leader records a refusal "failed: nothing on the node
    # was changed" and leaves the node out of a named way back (review s71 revplans, H1).
    again = node.switch("pb-hand")
    assert (again.outcome, again.phase) == ("failed", "failed"), again
    assert node.server_pid() == pid
    assert node.server.config_path.read_bytes() == config

    def shown() -> str:
        listed = cluster.cli("nodes", "--json")
        assert listed.returncode == 0, listed.stderr
        return str(next(n for n in json.loads(listed.stdout) if n["name"] == node.name)["server"])

    wait_until(lambda: shown().startswith("needs the admin: "), 30, "tlsroll nodes to say so")
    # A node problem of the schema (review s41rev1 M3: only `tlsroll nodes` showed it).
    [problem] = [p for p in cluster.schema_json()["node_problems"] if p["node"] == node.name]
    assert problem["kind"] == "needs-admin", problem
    assert problem["problem"].startswith(f"{node.name} needs the admin: journal put back"), problem
    assert "--journal-checked" in problem["problem"], problem
    plan = cluster.cli("plan", "--scope", "nodes", "--nodes", node.name, "--change", "rotate-cert")
    assert plan.returncode != 0, plan.stdout
    said = plan.stdout + plan.stderr
    # Named with what to do, not "cannot ask the agent ...; bring the agent up" (M3).
    assert f"{node.name} needs the admin: journal put back mid-switch" in said, plan
    assert "or leave the node out (--nodes)" in said, plan
    assert "cannot ask the agent" not in said, plan

    assert node.agent is not None
    assert node.agent.stop() == 0
    node.agent.argv.append("--journal-checked")
    try:
        code, said = node.agent.run_to_exit()
    finally:
        node.agent.argv.remove("--journal-checked")
    assert code == 2, said
    [line] = [x for x in said.splitlines() if x.startswith("tlsroll-agent: ")]
    assert line.startswith("tlsroll-agent: --journal-checked refused: the server's config"), said
    assert "serves https, but the journal holds no https files live" in line, said
    assert "NAME.after-vN" in line, said
    assert "Traceback" not in said, said
    [row] = node.journal_query("SELECT value FROM meta WHERE key = 'needs_admin'")
    assert row["value"].startswith("journal put back mid-switch of rollout pb-hand"), row
    node.restart_agent()  # a plain restart: the node still needs the admin
    pre = node.preflight("pb-next")
    assert pre.server.detail.startswith("needs the admin: journal put back mid-switch"), pre
    assert node.server_pid() == pid


def refusal(node: Node, rid: str) -> str:
    """What the agent says when it is asked to roll back rollout ``rid``, which it cannot."""
    try:
        node.rollback(rid)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
        return str(exc.details())
    raise AssertionError(f"the rollback of {rid} was not refused")


def test_the_copy_is_mentioned_only_until_a_transaction_completes_on_it(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s40 L-e: a refusal to roll back on a journal put back says that the switch may
    be missing because the journal is the copy; before, every refusal said so for ever. Once
    the agent completed a transaction on the copy, the journal explains itself again."""
    node = make_node()
    assert node.agent is not None
    assert node.agent.stop() == 0
    known = len(journal.MIGRATIONS)
    with monkeypatch.context() as m:
        m.setattr(journal, "MIGRATIONS", (*journal.MIGRATIONS, ""))
        journal.Journal(node.journal_path).close()
    set_user_version(node.journal_path, known)
    go_back(node, copy_name(node.journal_path, known + 1))
    assert "which is the copy kept before an upgrade" in refusal(node, "pb-never-1")

    node.stage("pb-after")
    node.switch("pb-after")
    assert node.wait_txn("pb-after").outcome == "completed"
    said = refusal(node, "pb-never-2")
    assert "did not switch this node; nothing to roll back" in said
    assert "copy" not in said, said


def test_a_switch_the_newer_agent_never_carried_on_leaves_a_frozen_node_to_the_admin(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, cluster: Cluster
) -> None:
    """Review s41rev1 H1: the agent stopped with the server frozen; the newer agent made the
    copy and broke before it carried the switch on; the copy put back. Before: settled
    ``rolled_back`` ("the server runs its source"), the server left frozen for ever (writes
    refused) and the node shown healthy. Now: ``failed``, the server frozen by no transaction
    the journal knows of, and the node needs the admin; still nothing done to the server.
    The admin lifts the freeze by hand and starts the agent once with ``--journal-checked``
    (the server's config, http, is what the journal holds live): the node is planned and
    switched again."""
    node = make_node(env={CRASH_ENV: "frozen"})
    assert node.agent is not None and node.agent.proc is not None
    node.stage("pb-broken")
    try:
        node.switch("pb-broken")
    except grpc.RpcError as exc:  # the agent may die before its answer is out
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    node.agent.proc.wait(30)
    copy = copy_made_then_broken(node, monkeypatch)
    put_back(node.journal_path, copy)
    pid, config = node.server_pid(), node.server.config_path.read_bytes()
    node.restart_agent()

    outcome, phase, reason = settled(node, "pb-broken")
    assert (outcome, phase) == ("failed", "failed"), reason
    assert "the server is frozen, by no transaction this journal knows of" in reason
    assert node.admin_status()["frozen"] is True  # left to the admin, not lifted blindly
    assert_needs_admin(node, "pb-broken", pid, config)

    node.server.unfreeze()  # the admin's check
    assert node.agent is not None
    assert node.agent.stop() == 0
    checked_once(node)
    node.restart_agent()
    assert "journal.checked" in node.agent.event_names()
    pre = node.preflight("pb-broken-next")
    assert pre.server.healthy and pre.ok, pre

    def shown() -> str:
        listed = cluster.cli("nodes", "--json")
        assert listed.returncode == 0, listed.stderr
        return str(next(n for n in json.loads(listed.stdout) if n["name"] == node.name)["server"])

    wait_until(lambda: shown() == "http", 30, "tlsroll nodes to show the server again")
    assert [p for p in cluster.schema_json()["node_problems"] if p["node"] == node.name] == []
    plan = cluster.cli("plan", "--scope", "nodes", "--nodes", node.name, "--change", "enable-tls")
    assert plan.returncode == 0, (plan.stdout, plan.stderr)
    node.stage("pb-after")
    node.switch("pb-after")
    assert node.wait_txn("pb-after").outcome == "completed"
    assert node.admin_status()["listen"] == ["https"]


def test_a_password_written_but_not_restarted_is_not_recorded_completed(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s41rev1 H2: a change-password stopped after ``config_written`` (the server not
    restarted: it still takes the old password), the newer agent broken, the copy put back.
    Target and source answer alike from outside (https, no certificate to tell them by), and
    the live config is the target's: before, ``completed`` (the new verifier counted live,
    the node done). Now the server's start time, before the config was written, proves
    nothing: ``failed``, and the node needs the admin."""
    node = make_node()
    node.stage("pb-tls")
    node.switch("pb-tls")
    assert node.wait_txn("pb-tls").outcome == "completed"
    assert node.agent is not None
    assert node.agent.stop() == 0
    node.restart_agent(env={CRASH_ENV: "config_written"})
    assert node.agent.proc is not None
    verifier = password.make_verifier("a-new-password-long-enough-123", **password.TEST_PARAMS)
    request = agent_pb2.SwitchRequest(
        command=node.command("pb-pw"),
        change=CHANGE.wire(Change.CHANGE_PASSWORD),
        auth_verifier_json=password.verifier_to_json(verifier),
    )
    pid = node.server_pid()
    try:
        with node.stub() as stub:
            stub.Switch(request, timeout=30)
    except grpc.RpcError as exc:  # the agent may die before its answer is out
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    node.agent.proc.wait(30)
    [row] = node.journal_query("SELECT phase, outcome FROM txns WHERE rollout_id = 'pb-pw'")
    assert (row["phase"], row["outcome"]) == ("config_written", "")
    copy = copy_made_then_broken(node, monkeypatch)
    put_back(node.journal_path, copy)
    node.server.unfreeze()  # lifted by hand: only the config written is left to settle
    config = node.server.config_path.read_bytes()
    node.restart_agent()

    outcome, phase, reason = settled(node, "pb-pw")
    assert (outcome, phase) == ("failed", "failed"), reason
    assert "frozen" not in reason, reason
    assert "its target and source answer alike" in reason
    assert "before its config was last written" in reason
    assert node.server_pid() == pid  # never restarted: it still runs the old password
    assert_needs_admin(node, "pb-pw", pid, config)


def test_a_rollback_unfinished_in_the_copy_is_settled_after_a_start_that_did_not_settle_it(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s41rev1, Lows: a rollback (not a switch) unfinished in the copy, and an agent
    that read the copy put back and stopped before it settled anything (here: the journal
    opened once by the test). The rollback had written http, the server not restarted; the
    newer agent completed it. The next start settles it from what the server runs, never
    resumes it: ``completed`` (http live and answering), nothing done to the server."""
    node = make_node()
    node.stage("pb-rb")
    node.switch("pb-rb")
    assert node.wait_txn("pb-rb").outcome == "completed"
    assert node.agent is not None
    assert node.agent.stop() == 0
    node.restart_agent(env={CRASH_ENV: "config_written"})
    assert node.agent.proc is not None
    try:
        node.rollback("pb-rb")
    except grpc.RpcError as exc:  # the agent may die before its answer is out
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    node.agent.proc.wait(30)
    [row] = node.journal_query("SELECT phase, outcome FROM txns WHERE kind = 'rollback'")
    assert (row["phase"], row["outcome"]) == ("config_written", ""), row
    copy = copy_made_then_broken(node, monkeypatch)
    node.restart_agent()  # the newer agent, which carries the rollback on
    assert node.wait_txn("pb-rb", "rollback").outcome == "completed"
    assert node.admin_status()["listen"] == ["http"]

    assert node.agent.stop() == 0
    put_back(node.journal_path, copy)
    journal.Journal(node.journal_path).close()  # read as a copy put back, nothing settled
    [held] = node.journal_query("SELECT value FROM meta WHERE key = 'restored_unfinished'")
    assert json.loads(held["value"]) == [["pb-rb", "rollback", "config_written"]]
    pid, config = node.server_pid(), node.server.config_path.read_bytes()
    node.restart_agent()
    done = node.wait_txn("pb-rb", "rollback", timeout=30)
    assert (done.outcome, done.phase) == ("completed", "completed"), done.reason
    assert "made while this rollback of rollout pb-rb was at phase config_written" in done.reason
    assert "the server runs its target" in done.reason
    assert node.server_pid() == pid
    assert node.server.config_path.read_bytes() == config
    assert node.admin_status()["frozen"] is False
    assert node.agent.event_names().count("txn.resuming") == 1  # by the newer agent alone
    pre = node.preflight("pb-rb-next")
    assert pre.server.healthy and pre.ok, pre
    assert node.post("http", {"note": "after going back"}).status == 201


def test_a_password_put_back_by_rename_but_not_restarted_is_not_recorded_rolled_back(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s41rev3 N1: a change-password unfinished in the copy (at ``frozen``); the newer
    agent staged the source, wrote the target, restarted the server onto it (the new password
    live), its verify failed, and its way back renamed the staged source into place
    (``commit_config``) and stopped before the restart. The config is the source with the
    mtime of its staging, before the server started: read as loaded, ``rolled_back`` was
    recorded while the server requires the new password. The rename's ctime is after the
    start: ``failed``, the node needs the admin. (The newer agent's steps are done here by
    hand, with the driver's own restart.)"""
    node = make_node()
    node.stage("pb-tls")
    node.switch("pb-tls")
    assert node.wait_txn("pb-tls").outcome == "completed"
    assert node.admin_status()["auth_configured"] is False
    assert node.agent is not None
    assert node.agent.stop() == 0
    node.restart_agent(env={CRASH_ENV: "frozen"})
    assert node.agent.proc is not None
    verifier = password.make_verifier("a-new-password-long-enough-123", **password.TEST_PARAMS)
    request = agent_pb2.SwitchRequest(
        command=node.command("pb-pw"),
        change=CHANGE.wire(Change.CHANGE_PASSWORD),
        auth_verifier_json=password.verifier_to_json(verifier),
    )
    try:
        with node.stub() as stub:
            stub.Switch(request, timeout=30)
    except grpc.RpcError as exc:  # the agent may die before its answer is out
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    node.agent.proc.wait(30)
    copy = copy_made_then_broken(node, monkeypatch)
    [row] = node.journal_query(
        "SELECT phase, target_config, source_config FROM txns WHERE rollout_id = 'pb-pw'"
    )
    assert row["phase"] == "frozen"
    target, source = bytes(row["target_config"]), bytes(row["source_config"])
    cfg = node.server.config_path
    assert cfg.read_bytes() == source
    staged = cfg.parent / f".{cfg.name}.staged-test"
    staged.write_bytes(source)  # staged with the target, before the restart
    os.utime(staged, (1_000_000_000, 1_000_000_000))  # and long before it, to leave no doubt
    fresh = cfg.parent / f".{cfg.name}.tmp-test"
    fresh.write_bytes(target)
    os.replace(fresh, cfg)
    driver = ReferenceDriver(cfg, node.root / "test-driver.log")
    try:
        asyncio.run(driver.restart())
        node.server.unfreeze()  # H1's frozen check aside: the config's time is looked at here
        assert node.admin_status()["auth_configured"] is True  # the new password is live
        os.replace(staged, cfg)  # the way back's restore, a rename; no restart after it
        assert cfg.stat().st_mtime < 1_000_000_001
        pid = node.server_pid()
        put_back(node.journal_path, copy)
        node.restart_agent()
        outcome, phase, reason = settled(node, "pb-pw")
        assert (outcome, phase) == ("failed", "failed"), reason
        assert "its target and source answer alike" in reason
        # "before" it, or "too soon after" it to tell (the rename may come within a tick of
        # the kernel's coarse clock after the start: ``test_a_file_time_is_read_with_its_grain``)
        assert "its config was last written" in reason
        assert node.admin_status()["auth_configured"] is True  # still the new password
        assert_needs_admin(node, "pb-pw", pid, source)
    finally:
        assert node.agent.stop() == 0
        asyncio.run(driver.stop())  # the server this test's driver started, reaped


def test_a_file_time_is_read_with_its_grain(tmp_path: Path) -> None:
    """CI of session 54: the test above once found ``rolled_back``. A file's time is its
    write's rounded down to the kernel's coarse clock (up to 6 ms early, measured here), and
    its rename came a few milliseconds after the server's start: read as before it, the
    source was "loaded". The server must start ``FILE_TIME_SLACK`` after the file's time to
    have loaded it, and a second (two) more after a time in whole (even) seconds (a file
    system that keeps no fraction)."""
    cfg = tmp_path / "server.toml"
    cfg.write_bytes(b"[server]\n")
    stat = cfg.stat()
    stamp = max(stat.st_mtime_ns, stat.st_ctime_ns) / 1e9
    assert stamp % 1 != 0  # this file system keeps fractions

    def started(at: float) -> dict[str, object]:
        return {"started_at": dt.datetime.fromtimestamp(at, dt.UTC).isoformat()}

    assert "before its config was last written" in _not_loaded(cfg, started(stamp - 0.001))
    soon = _not_loaded(cfg, started(stamp + 0.005))
    assert "too soon after its config was last written" in soon and "50 ms" in soon
    assert _not_loaded(cfg, started(stamp + 0.2)) == ""
    # A time in whole seconds (set as the mtime, later than the ctime): up to a second early,
    # two where it is even (FAT's grain).
    odd = int(time.time()) // 2 * 2 + 11
    os.utime(cfg, ns=(odd * 10**9, odd * 10**9))
    assert "1050 ms" in _not_loaded(cfg, started(odd + 1.0))
    assert _not_loaded(cfg, started(odd + 1.1)) == ""
    even = odd + 1
    os.utime(cfg, ns=(even * 10**9, even * 10**9))
    assert "2050 ms" in _not_loaded(cfg, started(even + 2.0))
    assert _not_loaded(cfg, started(even + 2.1)) == ""
    assert "does not say when it started" in _not_loaded(cfg, {"started_at": "2026-12-05T10:00"})


def test_a_server_whose_status_cannot_be_read_needs_the_admin(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s41rev3 N2: the switch (http to https: its schemes tell target from source) was
    finished by the newer agent, the server since frozen by no transaction, and its status
    cannot be read when the copy is put back (its admin socket gone). Before: the status read
    as None, "not frozen", the ports alone passed the verdict: ``completed``, the frozen node
    shown healthy. Now unproven: ``failed`` (after asking again), and the node needs the admin."""
    node, copy = copy_made_mid_switch(make_node, monkeypatch, "pb-mute", "config_written")
    node.server.freeze()  # by hand: no transaction and no lease holds it
    socket = node.server.admin_socket
    aside = socket.with_name("aside.sock")
    os.replace(socket, aside)
    try:
        pid, config = go_back(node, copy)
        outcome, phase, reason = settled(node, "pb-mute")
    finally:
        os.replace(aside, socket)
    assert (outcome, phase) == ("failed", "failed"), reason
    assert "the server runs its target" in reason
    assert "the server's status cannot be read (" in reason
    assert "whether it is frozen is unknown" in reason
    assert node.admin_status()["frozen"] is True  # nothing was done to the server
    assert_needs_admin(node, "pb-mute", pid, config)
