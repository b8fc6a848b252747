"""Each node's clock against the leader's between rollouts (``leader.node_clocks``): a node
whose clock drifted was noticed only when a rollout's preflight refused it, or a certificate
looked expired or not yet valid (clock audit of session 35, C). Now the leader reads every
heartbeat's ``sent_at`` against its own clock, keeps the estimate in memory, and shows a node
problem "clock differs from the leader's by N s" beyond ``WARN_SECONDS`` where node problems
appear (``schema show``, the viewer's page), and the estimate in ``tlsroll nodes`` and the
metrics; the problem ends once the clock agrees again.

* the estimate itself (pure): unknown until a second message, the less delayed of the last
  two, one late message never makes a node behind, the problem ends within ``CLEAR_SECONDS``
  (behind also after ``CLEAR_AFTER`` messages within the threshold);
* the real Leader service in this process and the agent's real heartbeat code (``LeaderLink``)
  with its clock off, on real mutual-TLS gRPC; messages with no time, and copies of an earlier
  report (a planning answer), do not count;
* a real leader daemon and a real agent daemon whose clock is off (its runtime's clock moved by
  the seconds in a file), through the CLI and the viewer's ``/metrics`` and page;
* the review of s36 (F2-F6): a problem ends within the threshold after a few messages, and
  does not come and go with each message at it; an agent that reconnects keeps its clock (in
  process, and a real agent daemon stopped and let go on); each agent of a node its own clock
  (a clone behind); offsets shown never within a limit they are beyond; most nodes differing
  alike named as the leader's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import json
import random
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from html import unescape
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import structlog.testing
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

from leader import service as service_module
from leader.admin_service import AdminService
from leader.cli import identity
from leader.node_clocks import (
    CLEAR_AFTER,
    CLEAR_SECONDS,
    MAX_OFFSET,
    REOPEN_SECONDS,
    NodeClocks,
    clock_problem,
)
from leader.observe import MAX_CLOCK_OFFSET
from leader.schema_store import SchemaStore
from leader.schema_view import SchemaViewService
from leader.service import renewal_deadline
from leader.skew import (
    THRESHOLDS,
    WARN_SECONDS,
    leader_step,
    near_step,
    shown_seconds,
    signed_seconds,
)
from leader.states import LoginFailuresRow, NodeProblemKind
from leader.viewer import metrics, pages
from leader.viewer.i18n import Words
from leader.viewer.snapshot import Reader
from nodeagent.bootstrap_supervisor import UNREAD
from nodeagent.failure_log import FailureLog
from nodeagent.leader_link import LeaderLink
from tests.cluster import (
    LEADER_POLL,
    METRICS_TOKEN,
    AdminTokenCluster,
    Cluster,
    metrics_token_file,
    wait_until,
)
from tests.leader_rig import InProcessLeader, leader_with_a_node
from tests.test_heartbeat_stream import agent_link, client_report, ts, until
from tlsroll.clocks import elapsed
from tlsroll.defaults import AGENT_PORT
from tlsroll.enums import NEEDS_ADMIN, SERVES_PREVIOUS
from tlsroll.errors import TransientError
from tlsroll.tls import client_context
from tlsroll.v1 import admin_pb2, agent_pb2, leader_pb2, leader_pb2_grpc, schema_pb2
from tlsroll.wire import to_dict

T = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
CLOCK_OFFSET = NodeProblemKind.CLOCK_OFFSET
A1, A2 = "id:agent-one", "id:agent-two"  # agents' ids as ``leader.service.agent_of`` makes them


# --- the estimate -----------------------------------------------------------------------------


def test_the_estimate_is_unknown_until_a_second_message_then_the_less_delayed_of_two() -> None:
    """``x`` (sent_at less the leader's receipt) is the offset less the message's delay: the
    larger of the last two is the better. A first message alone says nothing; a node whose
    messages stop carrying a time is unknown again (one whose stream ended: below, the
    review's F3)."""
    clocks = NodeClocks()
    clocks.heard("a", A1, 3.0, T)
    assert clocks.offset("a") is None and clocks.problems() == []
    clocks.heard("a", A1, 1.5, T)  # this one took 1.5 s longer on the way
    assert clocks.offset("a") == 3.0
    clocks.heard("a", A1, 2.0, T)
    assert clocks.offset("a") == 2.0
    clocks.forget("a", A1)
    assert clocks.offset("a") is None and clocks.offset("never") is None


def test_one_late_message_never_makes_a_node_behind_and_two_that_say_so_do() -> None:
    """A node in step whose one message was read 90 s late (a leader busy after its start) is
    no problem; a node whose two messages in a row say it is 90 s behind is, since the first
    of them; a node ahead by more than the threshold is at its second message (its messages
    can only understate that)."""
    clocks = NodeClocks()
    late = -(WARN_SECONDS + 30.0)
    for x in (0.0, 0.01, late, 0.02):
        clocks.heard("a", A1, x, T)
        assert not clocks.differs("a")
    assert clocks.problems() == []
    clocks.heard("b", A1, 0.0, T)
    clocks.heard("b", A1, late, T)
    assert not clocks.differs("b")
    later = T + dt.timedelta(seconds=20)
    clocks.heard("b", A1, late - 1, later)
    assert clocks.problems() == [("b", late, later, False)]
    clocks.heard("c", A1, WARN_SECONDS + 1.0, T)
    clocks.heard("c", A1, WARN_SECONDS + 1.0, T)
    assert clocks.differs("c") and clocks.offset("c") == WARN_SECONDS + 1.0
    assert [node for node, _, _, _ in clocks.problems()] == ["b", "c"]


def test_the_problem_ends_within_the_clear_threshold_or_a_few_messages_within_the_other() -> None:
    """It ends at once within ``CLEAR_SECONDS``; behind, between that and the threshold only
    once ``CLEAR_AFTER`` messages in a row said so (one beyond it starts the count again): an
    offset that hovers around 60 s does not come and go with each message's delay. Ahead, only
    within ``CLEAR_SECONDS`` (its messages never overstate it). Its ``since`` stays while it
    lasts, and the leader logs its start and its end once each, not every message."""
    clocks = NodeClocks()
    with structlog.testing.capture_logs() as events:
        for x in (-WARN_SECONDS - 2.0, -WARN_SECONDS - 2.0, -WARN_SECONDS - 3.0):
            clocks.heard("a", A1, x, T)
        ((_, _, since, _),) = clocks.problems()
        # the first beyond counts as within: the larger of two, the one before says -59
        within, beyond = [-WARN_SECONDS + 1.0] * (CLEAR_AFTER - 2), [-WARN_SECONDS - 0.5] * 2
        for x in (*within, *beyond, *within, *beyond, *within):
            clocks.heard("a", A1, x, T + dt.timedelta(minutes=1))
            assert clocks.problems() == [("a", clocks.offset("a"), since, False)]
        for x in (-CLEAR_SECONDS + 1.0, 0.0, 0.0):
            clocks.heard("a", A1, x, T + dt.timedelta(minutes=2))
        assert clocks.problems() == [] and not clocks.differs("a")
        assert clocks.offset("a") == 0.0
        for x in (WARN_SECONDS + 2.0, WARN_SECONDS + 2.0, *[WARN_SECONDS - 1.0] * 20):
            clocks.heard("b", A1, x, T)
        assert clocks.differs("b")
        clocks.heard("b", A1, CLEAR_SECONDS - 1.0, T)
        assert clocks.differs("b")  # the message before still says 59 s
        clocks.heard("b", A1, CLEAR_SECONDS - 1.0, T)
        assert not clocks.differs("b")
    logged = [(e["event"], e["node"], e["offset"]) for e in events]
    assert logged == [
        ("node.clock_differs", "a", -WARN_SECONDS - 2),
        ("node.clock_agrees", "a", -54.0),
        ("node.clock_differs", "b", WARN_SECONDS + 2),
        ("node.clock_agrees", "b", 54.0),
    ]


def test_the_words_say_how_far_which_way_and_what_to_do() -> None:
    assert clock_problem(75.4).startswith("clock differs from the leader's by +75.4 s (ahead;")
    assert clock_problem(-300.0).startswith("clock differs from the leader's by -300.0 s (behind;")
    assert "NTP" in clock_problem(75.0) and "LEADER" not in clock_problem(75.0)
    assert "until back within it for a few messages," in clock_problem(75.0)
    assert "LEADER's clock is off (by -90.0 s)" in clock_problem(93.0, True, 90.0)


# --- the real Leader service and the agent's heartbeat code ------------------------------------


@contextlib.asynccontextmanager
async def leader_and_link(
    tmp_path: Path, loopback: Callable[[], str]
) -> AsyncIterator[tuple[InProcessLeader, LeaderLink, list[float]]]:
    """The Leader service (its clock at ``T``, still) with node hb1, and hb1's ``LeaderLink``
    whose clock is the leader's and the list's seconds more (a test changes it)."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    leader_address = rig.target.rsplit(":", 1)[0]
    # (At the leader's interval: see ``tests.test_plan_over_stream.agent``.)
    link, _, journal = agent_link(
        tmp_path, rig.node_files, leader_address, loopback(), rig.state.heartbeat_interval
    )
    skew = [0.0]
    link.clock = lambda: rig.clock[0] + dt.timedelta(seconds=skew[0])
    try:
        yield rig, link, skew
    finally:
        await link.close()
        journal.close()
        await rig.close()


def reader_of(rig: InProcessLeader) -> Reader:
    """The viewer's reader of ``rig``'s leader, hooked to its state as the daemon hooks it."""
    reader = Reader(
        rig.store,
        SchemaStore(rig.store.db),
        lambda: rig.clock[0],
        lambda _: True,
        [],
        fresh=rig.state.fresh_reports,
    )
    reader.node_problems = rig.state.node_problems
    reader.clock_offset = rig.state.clocks.offset
    return reader


def gauge(text: bytes, name: str) -> dict[str, float]:
    """A per-node gauge of the metrics ``text``: node -> value."""
    (family,) = [f for f in text_string_to_metric_families(text.decode()) if f.name == name]
    return {s.labels["node"]: s.value for s in family.samples}


async def test_a_node_that_needs_the_admin_is_a_node_problem_until_its_agent_says_otherwise(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review s41rev1 M3: a node whose agent's server view says it needs the admin (its
    journal put back from a copy made mid-switch: ``tlsroll.enums.NEEDS_ADMIN``) was shown
    only by `tlsroll nodes`. Now it is a node problem (``needs-admin``) in the schema and on
    the viewer's page, from the heartbeat that says so until the one that no longer does."""
    why = (
        "journal put back mid-switch of rollout r1: not settled by what the server runs;"
        " check it, then run the agent once with --journal-checked"
    )
    views = [agent_pb2.ServerView(driver="reference", healthy=False, detail=NEEDS_ADMIN + why)]

    async def server_view() -> agent_pb2.ServerView:
        return views[0]

    async with leader_and_link(tmp_path, loopback) as (rig, link, _offset):
        link.server_view = server_view
        await link.beat()
        (problem,) = rig.state.node_problems()
        assert (problem.node, problem.kind) == ("hb1", NodeProblemKind.NEEDS_ADMIN)
        assert problem.problem == f"hb1 {NEEDS_ADMIN}{why}" and problem.since == T
        assert rig.state.node_problem("hb1") is None  # the agent refuses: the engine not held
        view = SchemaViewService(
            SchemaStore(rig.store.db),
            lambda: rig.clock[0],
            node_problems=rig.state.node_problems,
            fresh=rig.state.fresh_reports,
            reported=rig.store.report_since_start,
        )
        (listed,) = view._answer(schema_pb2.GetSchemaRequest(), None).node_problems
        assert listed.kind == schema_pb2.NODE_PROBLEM_KIND_NEEDS_ADMIN
        snap = reader_of(rig).read(times=True)
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        for lang, words in (
            ("de", "Knoten hb1 braucht die Praxis-IT"),
            ("en", "Node hb1 needs the practice IT"),
        ):
            html = unescape(pages.schema_content(snap, Words.of(lang), page))
            assert words in html and "Two agents" not in html and "Zwei Agenten" not in html
        # Review s41rev3 L5: a kind the page does not know is not shown with the twin agents'
        # words (its ``else`` did), but with the leader's own, which are English: on the
        # German page they follow its German words, marked as English (session 41: they stood
        # unmarked in the German sentence).
        (data,) = snap.data["node_problems"]
        data["kind"] = "a-later-kind"
        for lang, words in (
            ("de", "Knoten hb1 hat ein Problem, das diese Seite nicht näher kennt."),
            ("en", "Node hb1 has a problem this page knows no more about."),
        ):
            html = pages.schema_content(snap, Words.of(lang), page)
            (alert,) = re.findall(
                r'<div class="alert"[^>]*data-problem="other"[^>]*>(.*?)</div>', html
            )
            (said,) = re.findall(r'<q lang="en">(.*?)</q>', alert)
            assert unescape(said) == data["problem"] and said.startswith("hb1 needs the admin")
            own = unescape(re.sub(r"<q lang=\"en\">.*?</q>|<[^>]+>", "", alert))
            assert words in own and "needs" not in own and "admin" not in own
            assert "Two agents" not in html and "Zwei Agenten" not in html

        views[0] = agent_pb2.ServerView(driver="reference", healthy=True, schemes=["https"])
        await link.beat()
        assert rig.state.node_problems() == []


async def test_a_bootstrap_service_that_did_not_start_is_a_node_problem_until_it_runs(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Audit s39ws M8, part 2: a bootstrap service that should run but failed to start was
    only in the agent's log. The agent's heartbeat says why (``LiveServer.bootstrap_problem``,
    cleaned by the leader: no escape reaches a terminal), and it is a node problem
    (``bootstrap-down``) in the schema and on the viewer's page, from the heartbeat that says
    so until the one that no longer does; the first such heartbeat's time is its since."""
    problem_now = ["port 9443: [Errno 98] Address already in use\x1b[2J"]

    async def server_view() -> agent_pb2.ServerView:
        return agent_pb2.ServerView(driver="reference", healthy=True, schemes=["https"])

    async with leader_and_link(tmp_path, loopback) as (rig, link, _offset):
        link.server_view = server_view
        link.bootstrap_problem = lambda: problem_now[0]
        await link.beat()
        (problem,) = rig.state.node_problems()
        assert (problem.node, problem.kind) == ("hb1", NodeProblemKind.BOOTSTRAP_DOWN)
        assert problem.problem == (
            "hb1's bootstrap service did not start (port 9443: [Errno 98] Address already in "
            "use[2J): workstations cannot enrol there; fix the cause: its agent tries again (at "
            "least once a minute)"
        ), problem.problem
        assert problem.since == T
        assert rig.state.node_problem("hb1") is None  # nothing held: plans and switches go on
        view = SchemaViewService(
            SchemaStore(rig.store.db),
            lambda: rig.clock[0],
            node_problems=rig.state.node_problems,
            fresh=rig.state.fresh_reports,
            reported=rig.store.report_since_start,
        )
        (listed,) = view._answer(schema_pb2.GetSchemaRequest(), None).node_problems
        assert listed.kind == schema_pb2.NODE_PROBLEM_KIND_BOOTSTRAP_DOWN
        snap = reader_of(rig).read(times=True)
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        for lang, words in (
            ("de", "Der Dienst zum Einrichten von Arbeitsplätzen auf Knoten hb1 ist nicht "),
            ("en", "The service that sets up workstations on node hb1 did not start"),
        ):
            html = unescape(pages.schema_content(snap, Words.of(lang), page))
            assert words in html and "knows no more" not in html and "nicht näher" not in html
        rig.clock[0] += dt.timedelta(seconds=5)
        await link.beat()  # still down: the same since
        (problem,) = rig.state.node_problems()
        assert problem.since == T

        # Audit s43rev1: a heartbeat without the server's status (it took longer than
        # SERVER_VIEW_SECONDS) says nothing of the bootstrap service: the problem stays, its
        # since too (it was cleared, and set again, logged again, by the next full one).
        async def no_view() -> agent_pb2.ServerView:
            raise TimeoutError

        link.server_view = no_view
        rig.clock[0] += dt.timedelta(seconds=5)
        await link.beat()
        (problem,) = rig.state.node_problems()
        assert (problem.kind, problem.since) == (NodeProblemKind.BOOTSTRAP_DOWN, T)
        link.server_view = server_view

        problem_now[0] = ""
        await link.beat()
        assert rig.state.node_problems() == []


async def test_a_bootstrap_service_serving_its_previous_settings_is_not_said_to_be_down(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review s45rev4 M2: an agent whose journal it cannot read for a minute while its
    bootstrap service serves says so as the node's bootstrap problem (``SERVES_PREVIOUS``:
    a new password or a rollback not in effect). The contract has one kind for it and a
    service that did not start (``bootstrap-down``); the leader words it as what it is, in the
    schema and on the viewer's page, never "did not start". Fails before: "hb1's bootstrap
    service did not start (serves its previous settings: …)", and the page said "did not
    start"."""
    said = f"{SERVES_PREVIOUS}{UNREAD.format('disk I/O error')}"

    async def server_view() -> agent_pb2.ServerView:
        return agent_pb2.ServerView(driver="reference", healthy=True, schemes=["https"])

    async with leader_and_link(tmp_path, loopback) as (rig, link, _offset):
        link.server_view = server_view
        link.bootstrap_problem = lambda: said
        await link.beat()
        (problem,) = rig.state.node_problems()
        assert (problem.node, problem.kind) == ("hb1", NodeProblemKind.BOOTSTRAP_DOWN)
        assert problem.problem == (
            "hb1's bootstrap service serves its previous settings: journal unread (disk I/O "
            "error): a new password or a rollback is not in effect; check the node's disk (its "
            "agent reads the journal again at least once a minute)"
        ), problem.problem
        snap = reader_of(rig).read(times=True)
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        for lang, words in (
            ("de", "Knoten hb1 arbeitet noch mit seinen bisherigen Einstellungen"),
            ("en", "node hb1 still serves its previous settings"),
        ):
            html = unescape(pages.schema_content(snap, Words.of(lang), page))
            assert words in html, html
            assert "did not start" not in html and "nicht gestartet" not in html
            assert 'data-problem="bootstrap-previous"' in html


async def test_an_agent_that_has_not_tried_its_bootstrap_service_yet_leaves_the_problem_as_is(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """s43's Left 2: an agent's first heartbeat after its start went before its runtime had
    tried the bootstrap service, and said "no problem": the leader cleared the node's
    ``bootstrap-down``, and the next heartbeat set it again with a new since and a new warning
    in the leader's log, at each agent restart. Such a heartbeat now says it does not know yet
    (``LiveServer.bootstrap_pending``; ``BootstrapHost.problem`` None): the problem stays, its
    since and its one log line too. An agent older than the field never sets it: its empty
    problem clears, as before."""
    down = "port 9443: [Errno 98] Address already in use"
    problem_now: list[str | None] = [down]

    async def server_view() -> agent_pb2.ServerView:
        return agent_pb2.ServerView(driver="reference", healthy=True, schemes=["https"])

    async with leader_and_link(tmp_path, loopback) as (rig, link, _offset):
        link.server_view = server_view
        link.bootstrap_problem = lambda: problem_now[0]
        with structlog.testing.capture_logs() as events:
            await link.beat()
            (problem,) = rig.state.node_problems()
            assert (problem.kind, problem.since) == (NodeProblemKind.BOOTSTRAP_DOWN, T)
            problem_now[0] = None  # the agent started again: not tried yet
            rig.clock[0] += dt.timedelta(seconds=5)
            await link.beat()
            (problem,) = rig.state.node_problems()
            assert (problem.kind, problem.since) == (NodeProblemKind.BOOTSTRAP_DOWN, T)
            problem_now[0] = down  # its first try: the port is still taken
            rig.clock[0] += dt.timedelta(seconds=5)
            await link.beat()
            (problem,) = rig.state.node_problems()
            assert (problem.kind, problem.since) == (NodeProblemKind.BOOTSTRAP_DOWN, T)
        warned = [e for e in events if e["event"] == "node.bootstrap_down"]
        assert len(warned) == 1, warned

        # An empty problem without bootstrap_pending (as an agent of the release before,
        # which never sets it, says it) is "none".
        problem_now[0] = ""
        await link.beat()
        assert rig.state.node_problems() == []


async def test_the_wrong_client_passwords_a_heartbeat_carries_are_kept_while_there_are_some(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Carried finding (refserver login failures not in the schema): the agent's heartbeat
    carries the wrong passwords at its server's own login since that server started, and when
    the latest was; the leader keeps them while there are some (``LeaderState.login_failures``,
    what the schema and the viewer show), logs them as they change, keeps them while the
    server is down (its status says nothing then), clears them when a healthy server counts
    none (it started again), and drops them with a removed node."""
    view = [agent_pb2.ServerView(driver="reference", healthy=True, schemes=["https"])]

    async def server_view() -> agent_pb2.ServerView:
        return view[0]

    def counting(count: int) -> agent_pb2.ServerView:
        said = agent_pb2.ServerView(
            driver="reference", healthy=True, schemes=["https"], login_failures=count
        )
        said.last_login_failure_at.FromDatetime(T - dt.timedelta(minutes=1))
        return said

    async with leader_and_link(tmp_path, loopback) as (rig, link, _offset):
        link.server_view = server_view
        with structlog.testing.capture_logs() as events:
            await link.beat()
            assert rig.state.login_failures() == []
            view[0] = counting(4)
            await link.beat()
            assert rig.state.login_failures() == [
                LoginFailuresRow("hb1", 4, T - dt.timedelta(minutes=1), T)
            ]
            rig.clock[0] += dt.timedelta(seconds=5)
            await link.beat()  # the same count: heard again, not logged again
            assert [r.reported_at for r in rig.state.login_failures()] == [rig.clock[0]]
            view[0] = agent_pb2.ServerView(driver="reference", healthy=False, detail="refused")
            await link.beat()
            assert [r.failures for r in rig.state.login_failures()] == [4]
            view[0] = agent_pb2.ServerView(driver="reference", healthy=True, schemes=["https"])
            await link.beat()
            assert rig.state.login_failures() == []
        warned = [e for e in events if e["event"] == "node.server_login_failures"]
        assert [(e["node"], e["count"]) for e in warned] == [("hb1", 4)], warned
        view[0] = counting(2)
        await link.beat()
        assert [r.failures for r in rig.state.login_failures()] == [2]
        rig.state.forget_node("hb1")
        assert rig.state.login_failures() == []


def guessed(count: int) -> agent_pb2.ServerView:
    """A healthy reference server's view that counts ``count`` wrong client passwords."""
    said = agent_pb2.ServerView(
        driver="reference", healthy=True, schemes=["https"], login_failures=count
    )
    if count:
        said.last_login_failure_at.FromDatetime(T - dt.timedelta(seconds=count))
    return said


async def test_a_guessing_client_makes_no_message_each_beat_and_its_last_count_still_comes(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s49 (2): each wrong password at the node's server changed the heartbeat's
    report, so every beat was a message to the leader (and a log line there): a client
    guessing the password drove the agent's traffic. That there are some is news at once; the
    count as it grows goes with the next message, at the renewal bound at the latest (here:
    the bound made to pass), so the last count is never lost."""
    monkeypatch.setattr(service_module, "renew_seconds", lambda _interval: 600)
    view = [guessed(0)]
    messages: list[leader_pb2.HeartbeatRequest] = []

    async def server_view() -> agent_pb2.ServerView:
        return view[0]

    async with leader_and_link(tmp_path, loopback) as (rig, link, _skew):
        real = rig.service._heartbeat

        async def counting(*args: Any) -> Any:
            messages.append(args[1])
            return await real(*args)

        monkeypatch.setattr(rig.service, "_heartbeat", counting)
        link.server_view = server_view
        with structlog.testing.capture_logs() as events:
            await link.beat()  # the stream opens, in renewal mode
            assert link._stream is not None and link._stream.renew == 600
            view[0] = guessed(1)
            await link.beat(quiet=True)  # the first: news
            await until(lambda: len(messages) == 2, "the first wrong password")
            assert [r.failures for r in rig.state.login_failures()] == [1]
            for count in range(2, 7):
                view[0] = guessed(count)
                await link.beat(quiet=True)
            rig.clock[0] += dt.timedelta(seconds=rig.state.heartbeat_interval)
            assert link._sent is not None
            link._sent = (link._sent[0], link._sent[1] - 600)  # the renewal bound comes
            await link.beat(quiet=True)
            # The stream keeps its order: a message a quiet beat sent came before this one.
            await until(lambda: messages[-1].server.login_failures == 6, "the message at the bound")
        assert [m.server.login_failures for m in messages] == [0, 1, 6]
        assert [r.failures for r in rig.state.login_failures()] == [6]
    warned = [e["count"] for e in events if e["event"] == "node.server_login_failures"]
    assert warned == [1, 6], warned


async def test_the_leader_logs_a_nodes_changing_count_once_an_interval_at_most(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s49 (2, 3): the leader logged each changed count, so an agent (a lying one
    too, alternating counts) made a line each message. Now a changed count is logged at most
    once per node and heartbeat interval (the leader's clock); what it shows follows every
    message; a count held back is logged with the next message after the interval."""
    view = [guessed(0)]

    async def server_view() -> agent_pb2.ServerView:
        return view[0]

    async with leader_and_link(tmp_path, loopback) as (rig, link, _skew):
        link.server_view = server_view
        interval = dt.timedelta(seconds=rig.state.heartbeat_interval)

        async def say(count: int) -> None:
            view[0] = guessed(count)
            await link.beat()
            assert [r.failures for r in rig.state.login_failures()] == ([count] if count else [])

        with structlog.testing.capture_logs() as events:
            for count in (4, 5, 4, 5, 0, 5):
                await say(count)
            rig.clock[0] += interval
            await say(5)  # held back before: logged now
            await say(4)
            rig.clock[0] += interval
            await say(4)
            await say(0)
            await say(3)
            rig.clock[0] -= 3 * interval  # the leader's clock went back: no bound then
            await say(2)
        warned = [e["count"] for e in events if e["event"] == "node.server_login_failures"]
        assert warned == [4, 5, 4, 2], warned
        rig.state.forget_node("hb1")
        assert "hb1" not in rig.state.login_failures_logged


@pytest.mark.parametrize("end", ["agent_stops", "connection_lost"])
async def test_a_count_held_back_is_logged_when_the_agents_stream_ends(
    tmp_path: Path, loopback: Callable[[], str], end: str
) -> None:
    """Review rev50a L4: a changed count held back by the once-an-interval bound waited for the
    node's next message after the interval; an agent that stopped (it closes its stream) or
    whose connection was lost (the call cancelled) before it sent one left that count never
    logged. The stream's end logs it, as that message would have (the same event and fields),
    once: a new stream's message with that count logs nothing more; a stream that ends with
    nothing held back logs nothing."""
    view = [guessed(0)]

    async def server_view() -> agent_pb2.ServerView:
        return view[0]

    def warned(events: list[Any]) -> list[tuple[str, int]]:
        return [
            (e["node"], e["count"]) for e in events if e["event"] == "node.server_login_failures"
        ]

    async def stream_ends() -> None:
        stream = link._stream
        assert stream is not None and rig.service._open
        if end == "agent_stops":
            await link._finish_stream()  # as ``LeaderLink.close`` does first
        else:
            stream.call.cancel()
            link._stream = None  # (the next beat opens a new one)
        await until(lambda: not rig.service._open, "the stream's end at the leader")

    async with leader_and_link(tmp_path, loopback) as (rig, link, _skew):
        link.server_view = server_view
        with structlog.testing.capture_logs() as events:
            view[0] = guessed(4)
            await link.beat()
            view[0] = guessed(5)
            await link.beat()  # within the interval: held back
            assert [r.failures for r in rig.state.login_failures()] == [5]
            assert warned(events) == [("hb1", 4)]
            await stream_ends()
            assert warned(events) == [("hb1", 4), ("hb1", 5)], events
            # Once: the agent back with the same count, on a new stream, logs nothing more.
            rig.clock[0] += dt.timedelta(seconds=rig.state.heartbeat_interval)
            await link.beat()
            assert warned(events) == [("hb1", 4), ("hb1", 5)]
            # Nothing held back (the count logged): the end logs nothing.
            await stream_ends()
            assert warned(events) == [("hb1", 4), ("hb1", 5)]


async def test_the_latest_wrong_client_password_is_on_the_leaders_clock_and_never_ahead(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s49carry (M): the node's ``last_login_failure_at`` was kept as sent, a
    far-future one (9999-12-31T23:59:59Z) too, which the viewer of a leader east of UTC could
    not show (500). It is on the leader's clock as the node's client sightings are
    (``clock_shift``: a node clock behind is made up) and never later than the leader's now;
    a time that is no time is unknown."""
    view = [agent_pb2.ServerView()]

    async def server_view() -> agent_pb2.ServerView:
        return view[0]

    def counting(last: Timestamp) -> agent_pb2.ServerView:
        said = agent_pb2.ServerView(
            driver="reference", healthy=True, schemes=["https"], login_failures=3
        )
        said.last_login_failure_at.CopyFrom(last)
        return said

    far = Timestamp()
    far.FromDatetime(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
    earlier = Timestamp()
    earlier.FromDatetime(T - dt.timedelta(minutes=1))
    async with leader_and_link(tmp_path, loopback) as (rig, link, skew):
        link.server_view = server_view
        view[0] = counting(far)
        await link.beat()
        assert [r.last_at for r in rig.state.login_failures()] == [T]
        skew[0] = -30.0  # the node's clock 30 s behind the leader's
        view[0] = counting(earlier)
        await link.beat()
        assert [r.last_at for r in rig.state.login_failures()] == [T - dt.timedelta(seconds=30)]
        view[0] = counting(Timestamp(seconds=2**62))
        await link.beat()
        assert [r.last_at for r in rig.state.login_failures()] == [None]


async def test_wrong_client_passwords_go_when_the_agent_manages_no_server_any_more(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s49carry (L): an agent switched from driver ``reference`` to ``none`` (its
    status: driver "none", not healthy, as ``nodeagent.service`` says it) kept the old
    server's row until the node was removed. With no managed server there is no such count:
    the row goes."""
    said = agent_pb2.ServerView(
        driver="reference", healthy=True, schemes=["https"], login_failures=3
    )
    view = [said]

    async def server_view() -> agent_pb2.ServerView:
        return view[0]

    async with leader_and_link(tmp_path, loopback) as (rig, link, _skew):
        link.server_view = server_view
        await link.beat()
        assert [r.failures for r in rig.state.login_failures()] == [3]
        view[0] = agent_pb2.ServerView(driver="none", detail="no managed server configured")
        await link.beat()
        assert rig.state.login_failures() == []
        view[0] = said
        await link.beat()
        view[0] = agent_pb2.ServerView(driver="none", healthy=True)
        await link.beat()
        assert rig.state.login_failures() == []


async def test_a_heartbeat_under_way_as_its_node_is_removed_adds_no_node_problem_back(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """s43's Left 3: ``RemoveNode`` drops the node's in-memory entries after the store's
    removal, but a heartbeat of the node checked against the store before it, and writing
    after, put them back: a removed node showed ``bootstrap-down`` (and its clock problem,
    never dropped at all) in the schema, the viewer and `tlsroll nodes`. The interleaving is
    forced here: the service's ``snapshot`` (what the heartbeat is checked against) is wrapped
    to hold the heartbeat right after it, since nothing else can stop it at that point on
    purpose; the node is removed meanwhile by the real admin service, then the heartbeat goes
    on. It is refused (the node is removed) and adds nothing back. Another node's heartbeat,
    held at the same point across the removal, is taken, with its problem (review s44rev2
    L3: a removal must not refuse the nodes it did not remove). Both carry bootstrap failures
    in a numbered report (review s45rev4 L1): the removed node's leaves nothing in the
    service's own memory of it (what a node enrolled again under its name would inherit:
    its audits, the failures said, the report's number), the other's is kept."""

    async def server_view() -> agent_pb2.ServerView:
        return agent_pb2.ServerView(driver="reference", healthy=True, schemes=["https"])

    async with leader_and_link(tmp_path, loopback) as (rig, link, offset):
        link.server_view = server_view
        link.bootstrap_problem = lambda: "port 9443: [Errno 98] Address already in use"
        offset[0] = 300.0
        await link.beat()
        await link.beat()
        link.failures = FailureLog()
        link.failures.record("10.0.0.1", "ws-a", T - dt.timedelta(minutes=1))
        kinds = {p.kind for p in rig.state.node_problems()}
        assert kinds == {NodeProblemKind.BOOTSTRAP_DOWN, CLOCK_OFFSET}, kinds

        other = grpc.aio.secure_channel(rig.target, rig.add_node("hb2", loopback()))
        hb2 = leader_pb2.HeartbeatRequest(
            agent_version="1",
            agent_port=AGENT_PORT,
            server=leader_pb2.LiveServer(
                driver="reference", healthy=True, schemes=["https"], bootstrap_problem="hb2's"
            ),
            bootstrap_failures=[
                leader_pb2.BootstrapFailure(
                    source="10.0.0.2", workstation="ws-b", count=2, last_at=ts(T)
                )
            ],
            failures_report=7,
        )
        checked, go = asyncio.Event(), asyncio.Event()
        holding = [0]
        real = rig.service.snapshot

        async def held() -> Any:
            snap = await real()
            holding[0] += 1
            if holding[0] == 2:
                checked.set()
            await go.wait()
            return snap

        rig.service.snapshot = held  # type: ignore[method-assign]
        beat = asyncio.create_task(link.beat())
        beat2 = asyncio.ensure_future(leader_pb2_grpc.LeaderStub(other).Heartbeat(hb2, timeout=15))
        await asyncio.wait_for(checked.wait(), 15)  # both heartbeats checked, and held
        rig.service.snapshot = real  # type: ignore[method-assign]
        admin = AdminService(rig.state, cast(Any, None), SchemaStore(rig.store.db))
        await admin.RemoveNode(admin_pb2.RemoveNodeRequest(name="hb1"), cast(Any, None))
        assert rig.state.node_problems() == []
        go.set()
        with pytest.raises(TransientError, match="'hb1' is not an enrolled node"):
            await asyncio.wait_for(beat, 15)
        assert isinstance(await asyncio.wait_for(beat2, 15), leader_pb2.HeartbeatResponse)
        await other.close(None)
        hb2_down = ("hb2", NodeProblemKind.BOOTSTRAP_DOWN)
        assert [(p.node, p.kind) for p in rig.state.node_problems()] == [hb2_down]
        assert "hb1" not in rig.state.live_servers and "hb1" not in rig.state.bootstrap_down
        assert "hb2" in rig.state.live_servers and "hb2" in rig.state.bootstrap_down
        kept = (
            rig.service._failure_audits,
            rig.service._failures_said,
            rig.service._failure_reports,
        )
        assert [("hb1" in c, "hb2" in c) for c in kept] == [(False, True)] * 3, kept
        assert rig.state.clocks.offset("hb1") is None
        view = SchemaViewService(
            SchemaStore(rig.store.db),
            lambda: rig.clock[0],
            node_problems=rig.state.node_problems,
            fresh=rig.state.fresh_reports,
            reported=rig.store.report_since_start,
        )
        shown = view._answer(schema_pb2.GetSchemaRequest(), None).node_problems
        assert [p.node for p in shown] == ["hb2"]
        reply = await admin.ListNodes(admin_pb2.ListNodesRequest(), cast(Any, None))
        assert [(n.name, n.server, n.clock_differs) for n in reply.nodes if n.name != "hb2"] in (
            [],
            [("hb1", "", False)],
        )


async def test_a_node_enrolled_again_under_a_removed_nodes_name_starts_afresh(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 44's Left: ``forget_node`` dropped the removed node's entries in the leader's
    state, but not the service's own memory of it: what its last client report said
    (``_clients``), the bootstrap failures its last report said (``_failures_said``), its
    agent's last numbered report (``_failure_reports``) and its failure reports audited today
    (``_failure_audits``). A node enrolled again under the name inherited them: its first
    client report, saying what the removed node's last one said, was neither stored nor
    counted as a report since the leader started (a finalize waited for it, ``schema show``
    judged the node by the removed one's report) until the report was half stale; its first
    failure report was not audited (the removed node had used the day's audits: their number
    scaled down to 1 here) nor taken at all where it repeated the removed node's last entry
    (an answer lost to the removal: the agent's journal keeps the failure). Now the removal
    clears them: the new node's first report is stored, counted and audited. The leader's real
    service on its mutual-TLS port, the real admin service's removal, the real store. The
    removal's ``node.removed`` is info (session 70: a warning for the admin's own command)."""
    monkeypatch.setattr(service_module, "FAILURE_AUDITS_A_DAY", 1)
    rig = leader_with_a_node(tmp_path, loopback(), node_address := loopback())
    rig.service.batch_seconds = 3600  # the test commits (``write_queued``)
    await rig.server.start()
    now = rig.clock[0]

    def failure(source: str) -> leader_pb2.BootstrapFailure:
        return leader_pb2.BootstrapFailure(
            source=source, workstation="ws-a", count=3, last_at=ts(now - dt.timedelta(minutes=1))
        )

    def beat(instance: str, number: int, source: str) -> leader_pb2.HeartbeatRequest:
        return leader_pb2.HeartbeatRequest(
            agent_version="1",
            agent_port=AGENT_PORT,
            agent_instance=instance,
            server=client_report(now, 5, "ws-a"),
            bootstrap_failures=[failure(source)],
            failures_report=number,
        )

    def audited() -> int:
        with rig.store.db.read() as db:
            return int(
                db.execute(
                    "SELECT count(*) FROM audit WHERE kind = 'bootstrap.failures'"
                ).fetchone()[0]
            )

    admin = AdminService(rig.state, cast(Any, None), SchemaStore(rig.store.db))
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            await stub.Heartbeat(beat("old", 1, "10.0.0.1"), timeout=15)
            await stub.Heartbeat(beat("old", 2, "10.0.0.2"), timeout=15)  # the day's audits
        rig.store.write_queued()
        assert rig.store.report_since_start("hb1")
        assert audited() == 1
        with structlog.testing.capture_logs() as removed:
            await admin.RemoveNode(admin_pb2.RemoveNodeRequest(name="hb1"), cast(Any, None))
        assert not rig.store.report_since_start("hb1")
        # The admin's own command: info, not a warning in the leader's journal (session 69's
        # log review; its audit entry and the command's output say the rest).
        (gone,) = [e for e in removed if e["event"] == "node.removed"]
        assert gone["log_level"] == "info" and gone["node"] == "hb1", gone

        again = rig.add_node("hb1", node_address)
        with structlog.testing.capture_logs() as events:
            async with grpc.aio.secure_channel(rig.target, again) as channel:
                stub = leader_pb2_grpc.LeaderStub(channel)
                await stub.Heartbeat(beat("new", 1, "10.0.0.2"), timeout=15)
        rig.store.write_queued()
        assert rig.store.report_since_start("hb1")
        said = [(e["event"], e.get("source")) for e in events if e["event"].startswith("boot")]
        assert said == [("bootstrap.failures_reported", "10.0.0.2")], said
        assert audited() == 2
    finally:
        await rig.close()


@pytest.mark.parametrize("skew", [300.0, -300.0])
async def test_a_node_whose_clock_is_off_is_a_node_problem_until_it_agrees_again(
    tmp_path: Path, loopback: Callable[[], str], skew: float
) -> None:
    """hb1's agent beats with its clock 300 s ahead (behind): after its second message the
    leader shows the node problem, with the offset, in ``schema show``'s schema and on the
    viewer's page (German and English), and the offset in the metrics; the engine is not held
    by it (the preflight judges the clock itself). Its clock put right, the problem is gone
    within two messages and the metrics say 0. Before, nothing anywhere said so."""
    async with leader_and_link(tmp_path, loopback) as (rig, link, offset):
        offset[0] = skew
        await link.beat()
        await link.beat()
        (problem,) = rig.state.node_problems()
        assert (problem.node, problem.kind, problem.clock_offset) == ("hb1", CLOCK_OFFSET, skew)
        assert problem.problem == clock_problem(skew) and problem.since == T
        assert rig.state.node_problem("hb1") is None  # a warning: it holds nothing

        view = SchemaViewService(
            SchemaStore(rig.store.db),
            lambda: rig.clock[0],
            node_problems=rig.state.node_problems,
            fresh=rig.state.fresh_reports,
            reported=rig.store.report_since_start,
        )
        shown = view._answer(schema_pb2.GetSchemaRequest(), None)
        (listed,) = shown.node_problems
        assert listed.node == "hb1" and listed.problem == clock_problem(skew)
        assert listed.kind == schema_pb2.NODE_PROBLEM_KIND_CLOCK_OFFSET
        assert listed.clock_offset_seconds == skew

        reader = reader_of(rig)
        snap = reader.read(times=True)
        (data,) = snap.data["node_problems"]
        assert data["kind"] == "clock-offset" and data["clock_offset_seconds"] == skew
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        seconds = f"{skew:+.1f} s"
        for lang, words in (
            ("de", f"Die Uhr von Knoten hb1 weicht um {seconds.replace('.', ',')} von der des"),
            ("en", f"The clock of node hb1 differs from the leader's by {seconds}"),
        ):
            html = unescape(pages.schema_content(snap, Words.of(lang), page))
            assert words in html and "Two agents" not in html and "Zwei Agenten" not in html
        assert gauge(metrics.render(snap), "tlsroll_node_clock_offset_seconds") == {"hb1": skew}

        offset[0] = 0.0
        await link.beat()
        # The larger of its last two messages' offsets: ahead, the one before still says so;
        # behind, the one just come agrees already.
        assert (rig.state.node_problems() != []) == (skew > 0)
        await link.beat()
        assert rig.state.node_problems() == []
        snap = reader.read(times=True)
        assert snap.data["node_problems"] == []
        html = pages.schema_content(snap, Words.of("en"), page)
        assert "The clock of node" not in html
        assert gauge(metrics.render(snap), "tlsroll_node_clock_offset_seconds") == {"hb1": 0.0}


async def test_the_agent_stamps_a_message_as_it_goes_not_before_its_server_s_status(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """The agent reads its server's status for each message (up to ``SERVER_VIEW_SECONDS``)
    and the journal before it sends: stamped before those, the time they took counted as the
    node being behind (here 2 s a message, on a node whose clock agrees)."""
    async with leader_and_link(tmp_path, loopback) as (rig, link, _):

        async def slow_view() -> agent_pb2.ServerView:
            rig.clock[0] += dt.timedelta(seconds=2)  # two seconds pass, on both clocks
            return agent_pb2.ServerView(driver="reference", healthy=True, schemes=["http"])

        link.server_view = slow_view
        await link.beat()
        await link.beat()
        assert rig.state.clocks.offset("hb1") == 0.0


async def test_messages_without_a_time_or_copying_an_earlier_report_do_not_count(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """On one stream: two messages 300 s ahead make the problem; a planning answer, which
    copies the last report with its ``sent_at`` (here an hour old), moves nothing (taken, it
    made the node look an hour behind); a message with no ``sent_at`` (an agent that sends
    none) makes the clock unknown: no problem, no offset. Once the stream ended, it is kept for
    a renewal deadline (the agent may reconnect), then unknown too."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()

    def message(sent: dt.datetime | None, answers: int = 0) -> leader_pb2.HeartbeatRequest:
        request = leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
        if sent is not None:
            request.sent_at.CopyFrom(ts(sent))
        if answers:
            request.check_answer.id = answers
        return request

    ahead = T + dt.timedelta(seconds=300)
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]

            async def send(request: leader_pb2.HeartbeatRequest) -> None:
                await stream.write(request)
                assert isinstance(await stream.read(), leader_pb2.HeartbeatResponse)

            clocks = rig.state.clocks
            for _ in range(2):
                await send(message(ahead))
            assert clocks.offset("hb1") == 300.0 and clocks.differs("hb1")
            copy = message(T - dt.timedelta(hours=1), answers=7)
            await send(copy)
            await send(copy)
            assert clocks.offset("hb1") == 300.0
            await send(message(None))
            assert clocks.offset("hb1") is None and rig.state.node_problems() == []
            for _ in range(2):
                await send(message(ahead))
            assert clocks.differs("hb1")
            await stream.done_writing()
            assert not isinstance(await stream.read(), leader_pb2.HeartbeatResponse)  # EOF

            async with asyncio.timeout(10):  # the handler's end runs after the call's
                while rig.service._open:
                    await asyncio.sleep(0.02)
            assert clocks.differs("hb1")  # a reconnect within the deadline would go on with it
            rig.clock[0] += dt.timedelta(seconds=renewal_deadline(rig.state.heartbeat_interval))
            assert clocks.offset("hb1") is None and rig.state.node_problems() == []
    finally:
        await rig.close()


async def test_a_unary_heartbeat_s_reading_is_known_for_a_bound_then_swept(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s37, L4: an agent that meets the leader with unary ``Heartbeat`` calls (no
    stream, whose end bounds a reading) had its reading kept for ever: gone for good, its node
    still showed its clock problem. Now it is known a renewal deadline from its last message,
    as a stream's is after the stream's end; heard again within it, it goes on (its since);
    then unknown, and a ``check`` sweeps it. The state's monotonic clock is moved, no sleep.
    Failed before: the offset was still 300 s past the bound."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    mono = [1000.0]
    rig.state.monotonic = lambda: mono[0]
    keep = renewal_deadline(rig.state.heartbeat_interval)
    request = leader_pb2.HeartbeatRequest(
        agent_version="1", agent_port=AGENT_PORT, agent_instance="unary-one"
    )
    request.sent_at.CopyFrom(ts(T + dt.timedelta(seconds=300)))
    clocks = rig.state.clocks
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            for _ in range(2):
                await stub.Heartbeat(request, timeout=10)
            ((node, _, since, *_),) = rig.state.node_problems()
            assert node == "hb1" and clocks.offset("hb1") == 300.0
            mono[0] += keep - 1
            await stub.Heartbeat(request, timeout=10)  # within its bound: goes on
            mono[0] += keep - 1
            assert [p.since for p in rig.state.node_problems()] == [since]
            assert clocks.offset("hb1") == 300.0
            mono[0] += 1  # its bound from its last message
            assert clocks.offset("hb1") is None and rig.state.node_problems() == []
            with structlog.testing.capture_logs() as events:
                clocks.check()
            assert clocks._nodes == {}
            assert [(e["event"], e.get("reason")) for e in events] == [
                ("node.clock_agrees", "unknown")
            ]
    finally:
        await rig.close()


def test_an_agent_heard_without_a_stream_is_not_dropped_by_another_s_first_message() -> None:
    """A unary reading's bound is no stream's end: another agent of the node (a clone calling
    unary too) does not drop it at once, or two such agents would each restart the other's
    estimate with every message and neither be known (a clone behind hidden)."""
    t = [0.0]
    clocks = NodeClocks(lambda: t[0])
    for _ in range(2):
        clocks.heard("n", A1, 0.0, T, keep=28.0)
        clocks.heard("n", A2, -300.0, T, keep=28.0)
    assert clocks.differs("n") and clocks.offset("n") == -300.0
    t[0] += 28.0
    assert clocks.offset("n") is None
    clocks.check()
    assert clocks._nodes == {}


# --- a real leader and a real agent whose clock is off -----------------------------------------


SKEWED_AGENT = """
import datetime as dt, sys
from pathlib import Path
from typing import Any
from tlsroll import lean
lean.keep_out()
from nodeagent import runtime
skew_file = Path(sys.argv.pop(1))
def now():
    try:
        skew = float(skew_file.read_text())
    except (OSError, ValueError):
        skew = 0.0
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=skew)
runtime.now = now  # the agent's one clock: its service, renewal and heartbeats read it
sys.exit(runtime.main(sys.argv[1:]))
"""


def scrape(cluster: Cluster) -> bytes:
    """The viewer's ``/metrics`` with the scrape token (only the cluster CA trusted)."""
    conn = http.client.HTTPSConnection(
        cluster.address, 9444, timeout=10, context=client_context(cluster.ca_pem)
    )
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        return body
    finally:
        conn.close()


def test_a_real_agent_with_its_clock_off_shows_in_nodes_schema_and_metrics_until_put_right(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """A real leader daemon (1 s interval: the agents' renewal bound is 4 s) and a real agent
    daemon whose clock is 300 s ahead: `tlsroll nodes` (table and --json) shows the offset as
    differing, `schema show` (text and --json) shows the node problem with what to do, and the
    viewer's /metrics the offset; the leader logs it once. The agent's clock put right (no
    restart), all of it ends within two of its messages."""
    skew_file = tmp_path / "skew"
    skew_file.write_text("300")
    with AdminTokenCluster(tmp_path / "c", loopback(), heartbeat_interval=1) as cluster:
        cluster.init()
        token_file = metrics_token_file(tmp_path / "metrics-token")
        cluster.write_leader_config({"metrics_token_file": str(token_file)})
        cluster.start_leader()
        agent = cluster.add_agent("n1", loopback(), start=False)
        agent.argv = [sys.executable, "-c", SKEWED_AGENT, str(skew_file), *agent.argv[-2:]]
        agent.start()
        cluster.wait_for_nodes_online(["n1"])

        def node() -> dict[str, object]:
            done = cluster.cli("nodes", "--json")
            assert done.returncode == 0, done.stderr
            (found,) = json.loads(done.stdout)
            assert isinstance(found, dict)
            return found

        def schema() -> dict[str, object]:
            done = cluster.cli("schema", "show", "--json")
            assert done.returncode == 0, done.stderr
            found = json.loads(done.stdout)
            assert isinstance(found, dict)
            return found

        wait_until(
            lambda: cluster.list_nodes()["n1"].clock_differs,
            30,
            "n1's clock differs",
            interval=LEADER_POLL,
        )
        found = node()
        offset = found["clock_offset_seconds"]
        assert isinstance(offset, float) and found["clock_leader"] is False  # one node: its own
        # Never more than the node is ahead; less by the delay of the better of two messages
        # (milliseconds; a loaded machine's seconds are allowed for).
        assert 290 < offset < 300.5
        shown_as = f"{signed_seconds(offset)} s"
        table = cluster.cli("nodes", env={"COLUMNS": "250"}).stdout
        assert f"{shown_as}: fix NTP" in table
        problems = schema()["node_problems"]
        assert isinstance(problems, list)
        (problem,) = problems
        assert problem["node"] == "n1" and problem["kind"] == "clock-offset"
        assert re.fullmatch(
            r"clock differs from the leader's by \+(29\d|300)\.\d s \(ahead;.*NTP.*",
            problem["problem"],
        )
        text = cluster.cli("schema", "show", env={"COLUMNS": "250"}).stdout
        assert "node problems" in text and "clock differs from the leader's by +" in text
        assert 290 < gauge(scrape(cluster), "tlsroll_node_clock_offset_seconds")["n1"] < 300.5
        assert "node.clock_differs" in cluster.leader.event_names()

        skew_file.write_text("0")
        wait_until(
            lambda: not cluster.list_nodes()["n1"].clock_differs,
            30,
            "n1 agrees",
            interval=LEADER_POLL,
        )
        offset = node()["clock_offset_seconds"]
        assert isinstance(offset, float)
        assert -10 < offset < 0.5
        assert schema()["node_problems"] == []
        assert -10 < gauge(scrape(cluster), "tlsroll_node_clock_offset_seconds")["n1"] < 0.5
        assert "node.clock_agrees" in cluster.leader.event_names()


async def test_a_stream_whose_first_message_failed_leaves_no_reading_behind(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review 3 of s36, F1: a stream's first message was read into the node's clock before its
    bootstrap failures were written; that write failing (a full disk) ended the stream before
    the leader counted it, so its end forgot nothing, and the node's next stream, its clock put
    right, showed a clock problem at its FIRST message (unknown until a second, by design). The
    reading is taken last now, once the message went through."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    schema: Any = rig.service.schema

    def full(*_a: object, **_k: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    def beat(sent: dt.datetime, failure: bool = False) -> leader_pb2.HeartbeatRequest:
        request = leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
        request.sent_at.CopyFrom(ts(sent))
        if failure:
            f = request.bootstrap_failures.add(source="10.0.0.9", workstation="ws-001", count=1)
            f.last_at.CopyFrom(ts(sent))
        return request

    original = schema.record_bootstrap_failures
    schema.record_bootstrap_failures = full
    await rig.server.start()
    clocks = rig.state.clocks
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            first = stub.Heartbeats()  # type: ignore[call-arg]
            await first.write(beat(T + dt.timedelta(seconds=300), failure=True))  # 300 s ahead
            with pytest.raises(grpc.aio.AioRpcError):
                await first.read()
            schema.record_bootstrap_failures = original
            second = stub.Heartbeats()  # type: ignore[call-arg]
            await second.write(beat(T))  # the node's clock in step now
            assert isinstance(await second.read(), leader_pb2.HeartbeatResponse)
            assert not clocks.differs("hb1"), rig.state.node_problems()
            assert clocks.offset("hb1") is None  # one message: not known yet
            second.cancel()
    finally:
        await rig.close()


# --- review of s36: F2-F6 ---------------------------------------------------------------------


def messages_until_it_ends(clocks: NodeClocks, node: str, x: float, most: int) -> int:
    """How many messages saying ``x`` it takes until ``node``'s clock is no problem (at most
    ``most``; ``most + 1``: it still is)."""
    for n in range(1, most + 1):
        clocks.heard(node, A1, x, T)
        if not clocks.differs(node):
            return n
    return most + 1


def test_a_node_back_within_the_threshold_is_no_problem_after_a_few_messages() -> None:
    """Review of s36, F2: a node really 57 s behind whose two messages came 4 s late read 61 s
    behind, a problem; its clock staying there, the problem never ended: it ended only within
    ``CLEAR_SECONDS`` (55 s), and a delay only makes a node look farther behind. Now
    ``CLEAR_AFTER`` messages in a row within the threshold end it. Failed before: it never
    ended. Ahead (review of s37, M1), a problem was proven (a message never overstates how far
    ahead a node is): it ends only within ``CLEAR_SECONDS``, as before s37; a few delayed
    messages of a node 61 s ahead do not end it."""
    clocks = NodeClocks()
    for x in (-57.0, -61.0, -61.0):
        clocks.heard("a", A1, x, T)
    assert clocks.differs("a")
    took = messages_until_it_ends(clocks, "a", -57.0, 100)
    assert took <= CLEAR_AFTER and clocks.offset("a") == -57.0
    for x in (61.0, 61.0):
        clocks.heard("b", A1, x, T)
    for x in (59.0, 58.0, 59.5, 57.0, 56.0, 59.0) * 10:  # 61 s ahead, its messages 1-5 s late
        clocks.heard("b", A1, x, T)
    assert clocks.differs("b")
    clocks.heard("b", A1, 54.0, T)
    clocks.heard("b", A1, 54.0, T)
    assert not clocks.differs("b")


@pytest.mark.parametrize(
    ("offset", "delays"),
    [(-60.1, 0.3), (-59.9, 0.3), (-59.5, 1.0), (59.9, 0.3), (60.1, 0.3), (60.1, 1.0)],
)
def test_a_node_at_the_threshold_does_not_come_and_go_with_each_message(
    offset: float, delays: float
) -> None:
    """A node whose estimate straddles the threshold with its messages' delays (0-``delays`` s,
    drawn; a message each 5 s) is a problem at most once over 3000 messages (4 hours): its
    start and end logged at most once each, one "since" (review of s37, M1: before, -59.9 s
    with 0-0.3 s delays made 478 starts and ends, +60.1 s 387, -59.5 s with 0-1 s 560). A
    problem that begins again within ``REOPEN_SECONDS`` of its end goes on with its since and
    logs nothing. Ahead, one beyond the threshold is one for good (ahead is proven); one
    within it ahead (59.9 s, a message at most 0.3 s late) never is. In time, without
    delays: behind within the threshold, none after a few messages."""
    draw = random.Random(37)
    mono = [0.0]
    clocks = NodeClocks(lambda: mono[0])
    flips = 0
    was = False
    sinces: set[dt.datetime] = set()
    with structlog.testing.capture_logs() as events:
        for n in range(3000):
            mono[0] = 5.0 * n
            now = T + dt.timedelta(seconds=5 * n)
            clocks.heard("a", A1, offset - draw.uniform(0.0, delays), now)
            sinces.update(since for _, _, since, _ in clocks.problems())
            if clocks.differs("a") != was:
                was = not was
                flips += 1
    logged = [e["event"] for e in events]
    assert logged in ([], ["node.clock_differs"], ["node.clock_differs", "node.clock_agrees"])
    assert len(sinces) <= 1, sorted(sinces)
    if offset > WARN_SECONDS:
        assert flips == 1 and logged == ["node.clock_differs"]
    elif offset > 0:
        assert flips == 0 and logged == []
    elif offset < -WARN_SECONDS:
        assert flips == 1
    else:
        assert flips > 10  # it does straddle the threshold, and the admin hears of it once
    if offset < 0:
        ends = messages_until_it_ends(clocks, "a", offset, CLEAR_AFTER + 1)
        assert ends <= CLEAR_AFTER + 1 if offset > -WARN_SECONDS else ends > CLEAR_AFTER + 1


def test_a_problem_begun_again_the_other_way_or_lasting_is_logged() -> None:
    """Review of s37, R: a problem that began again within ``REOPEN_SECONDS`` of its end went
    on with its since and logged nothing, whichever way: a node behind, then ahead, showed the
    first problem's since and the log said it agreed. Now the other way is another problem
    (its since, its line); and one begun again the same way that lasts ``REOPEN_SECONDS``
    is logged once (``reopened``), so that the log's last word is not its earlier end, and its
    end is logged. Failed before: no line after the first end in either case."""
    mono = [0.0]
    clocks = NodeClocks(lambda: mono[0])

    def beat(node: str, x: float, at: float) -> None:
        mono[0] = at
        clocks.heard(node, A1, x, T + dt.timedelta(seconds=at))

    def lines(events: list[Any]) -> list[tuple[str, float | None, bool | None]]:
        return [(e["event"], e.get("offset"), e.get("reopened")) for e in events]

    with structlog.testing.capture_logs() as events:
        for at in (0.0, 5.0):
            beat("a", -70.0, at)  # behind: a problem
        for at in (10.0, 15.0):
            beat("a", 0.0, at)  # ends
        for at in (20.0, 25.0):
            beat("a", 70.0, at)  # ahead, 15 s later: another problem
    ((_, _, since, _),) = clocks.problems()
    assert since == T + dt.timedelta(seconds=20)
    assert lines(events) == [
        ("node.clock_differs", -70.0, None),
        ("node.clock_agrees", 0.0, None),
        ("node.clock_differs", 70.0, None),
    ]

    with structlog.testing.capture_logs() as events:
        for at in (0.0, 5.0):
            beat("b", -70.0, at)
        for at in (10.0, 15.0):
            beat("b", 0.0, at)
        at = 20.0
        while at < 20.0 + REOPEN_SECONDS:  # begun again the same way: quiet a while
            beat("b", -70.0, at)
            at += 5.0
        assert lines(events) == [
            ("node.clock_differs", -70.0, None),
            ("node.clock_agrees", 0.0, None),
        ]
        for _ in range(3):
            beat("b", -70.0, at)  # lasted REOPEN_SECONDS: once
            at += 5.0
        for _ in range(2):
            beat("b", 0.0, at)
            at += 5.0
    assert lines(events)[2:] == [
        ("node.clock_differs", -70.0, True),
        ("node.clock_agrees", 0.0, None),
    ]
    since = T + dt.timedelta(seconds=5)  # the first problem's (at its second message)
    assert [e["since"] for e in events[2:3]] == [since.isoformat()]


def test_a_problem_that_turns_round_or_lasts_between_the_limits_is_logged() -> None:
    """Review of s38, L1-L3. A problem begun again without a word that then stays between
    CLEAR_SECONDS and WARN_SECONDS ahead (still a problem: ahead ends only within
    CLEAR_SECONDS) was never logged again: the log's last word stayed its earlier end while
    the page showed it for ever. And one that turned round at once (behind, then ahead, with
    no end between) logged a second start without an end: now its end (``reason="turned"``),
    then the new start with its own since. Both failed before (no third line; no end)."""
    mono = [0.0]
    clocks = NodeClocks(lambda: mono[0])

    def beat(node: str, x: float, at: float) -> None:
        mono[0] = at
        clocks.heard(node, A1, x, T + dt.timedelta(seconds=at))

    def lines(events: list[Any]) -> list[tuple[str, float | None, Any]]:
        return [(e["event"], e.get("offset"), e.get("reopened", e.get("reason"))) for e in events]

    with structlog.testing.capture_logs() as events:
        for at in (0.0, 5.0):
            beat("a", 70.0, at)  # ahead: a problem
        for at in (10.0, 15.0):
            beat("a", 50.0, at)  # within CLEAR_SECONDS: ends
        beat("a", 61.0, 20.0)  # begun again, the same way: quiet
        at = 25.0
        while at <= 25.0 + REOPEN_SECONDS + 10:
            beat("a", 57.0, at)  # between the limits: still a problem
            at += 5.0
    assert clocks.differs("a")
    assert lines(events) == [
        ("node.clock_differs", 70.0, None),
        ("node.clock_agrees", 50.0, None),
        ("node.clock_differs", 57.0, True),
    ]

    with structlog.testing.capture_logs() as events:
        for at in (0.0, 5.0):
            beat("b", -70.0, at)
        beat("b", 70.0, 10.0)  # the other way at once
    ((_, _, since, _),) = [p for p in clocks.problems() if p[0] == "b"]
    assert since == T + dt.timedelta(seconds=10)
    assert lines(events) == [
        ("node.clock_differs", -70.0, None),
        ("node.clock_agrees", 70.0, "turned"),
        ("node.clock_differs", 70.0, None),
    ]


def test_an_agent_whose_stream_ended_is_known_until_the_bound_and_goes_on_if_it_is_back() -> None:
    """Review of s36, F3: the node's last stream's end forgot its clock; a reconnect made it
    unknown until its second message, then a problem again with a new since and a second log
    line. Now an agent whose streams ended is known for the bound ``ended`` gives (the service:
    a renewal deadline); back within it, it goes on where it was. Not back, it is unknown (what
    it said is of an agent that may not be there); back later, it starts afresh. A new agent
    of the node (a restart: another id) drops it at once."""
    mono = [0.0]
    clocks = NodeClocks(lambda: mono[0])
    with structlog.testing.capture_logs() as events:
        clocks.heard("a", A1, 300.0, T)
        clocks.heard("a", A1, 300.0, T)
        ((_, _, since, _),) = clocks.problems()
        clocks.ended("a", A1, 28.0)
        mono[0] = 27.9
        assert clocks.differs("a") and clocks.offset("a") == 300.0
        clocks.heard("a", A1, 299.0, T + dt.timedelta(seconds=30))  # its new stream
        assert clocks.problems() == [("a", 300.0, since, False)]
        mono[0] = 1000.0  # live again: no bound
        assert clocks.differs("a")
        clocks.ended("a", A1, 28.0)
        mono[0] += 28.0
        assert clocks.offset("a") is None and clocks.problems() == []
        assert not clocks.differs("a")
        clocks.heard("a", A1, 300.0, T + dt.timedelta(minutes=5))  # back, later
        assert clocks.offset("a") is None  # its first message
        clocks.heard("a", A1, 300.0, T + dt.timedelta(minutes=6))
        assert clocks.problems() == [("a", 300.0, T + dt.timedelta(minutes=6), False)]

        clocks.ended("a", A1, 28.0)
        clocks.heard("a", A2, 0.0, T)  # a restart: the old agent is gone
        assert clocks.offset("a") is None and not clocks.differs("a")
    # each end logged, for a reason not known (review of s37, L5: before, not at all)
    assert [(e["event"], e.get("reason")) for e in events] == [
        ("node.clock_differs", None),
        ("node.clock_agrees", "unknown"),
        ("node.clock_differs", None),
        ("node.clock_agrees", "unknown"),
    ]


def test_each_agent_of_a_node_has_its_clock_and_any_that_differs_is_the_node_s_problem() -> None:
    """Review of s36, F4: two agents with one node's identity (a cloned machine) made one
    estimate of their messages mixed, the larger of the last two: a clone 300 s behind beside
    an agent in step was never shown. Now each agent's clock is its own: the node differs if
    any does, its offset the farthest of theirs. An agent that stopped sending ``sent_at``
    forgets only its own."""
    clocks = NodeClocks()
    for n in range(3):
        clocks.heard("a", A1, 0.01 * n, T)
        clocks.heard("a", A2, -300.0 - 0.01 * n, T + dt.timedelta(seconds=n))
    assert clocks.differs("a") and clocks.offset("a") == -300.01
    assert clocks.problems() == [("a", -300.01, T + dt.timedelta(seconds=1), False)]
    clocks.forget("a", A2)
    assert not clocks.differs("a") and clocks.offset("a") == 0.02


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_an_offset_is_shown_beyond_a_limit_exactly_when_it_is(threshold: int) -> None:
    """Review of s36, F5: 60.3 s ahead, a problem, was shown "+60 s". Now to the nearest tenth,
    and beyond the warning's and the preflight's limits exactly when it is beyond them."""
    assert THRESHOLDS == (WARN_SECONDS, MAX_CLOCK_OFFSET)
    draw = random.Random(5)
    near = [threshold + d for d in (0.0, 1e-9, -1e-9, 0.04, 0.05, 0.3, -0.04, -0.3, -0.96)]
    for offset in [*near, *(draw.uniform(threshold - 1, threshold + 1) for _ in range(2000))]:
        for value in (offset, -offset):
            shown = shown_seconds(value)
            assert (abs(shown) > threshold) == (abs(value) > threshold), (value, shown)
            assert abs(shown - value) <= (0.1 if abs(shown) == threshold + 0.1 else 0.05) + 1e-9
    assert [signed_seconds(v) for v in (60.3, 75.42, -60.04, 0.0, 300.0000002, 119.97)] == [
        "+60.3", "+75.4", "-60.1", "+0.0", "+300.0", "+120.0"
    ]  # fmt: skip


async def test_an_offset_just_beyond_the_threshold_is_shown_beyond_it_everywhere(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s36, F5: a node 60.3 s ahead (a problem: beyond 60 s) was shown "+60 s" in the
    problem's words, on the viewer's page and in `tlsroll nodes`. Now "+60.3 s" (German
    "+60,3 s")."""
    async with leader_and_link(tmp_path, loopback) as (rig, link, offset):
        offset[0] = 60.3
        await link.beat()
        await link.beat()
        (problem,) = rig.state.node_problems()
        assert "differs from the leader's by +60.3 s (ahead;" in problem.problem
        snap = reader_of(rig).read()
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        html = unescape(pages.schema_content(snap, Words.of("en"), page))
        assert "The clock of node hb1 differs from the leader's by +60.3 s;" in html
        html = unescape(pages.schema_content(snap, Words.of("de"), page))
        assert "Die Uhr von Knoten hb1 weicht um +60,3 s von der des Leaders ab;" in html
        info = admin_pb2.NodeInfo(name="hb1", clock_offset_seconds=60.3, clock_differs=True)
        assert identity._clock(info).plain == "+60.3 s: fix NTP"


def test_most_nodes_differing_by_about_as_much_at_once_is_likelier_the_leader_s_clock() -> None:
    """Review of s36, F6 (the rule, pure): at least 3 nodes, more than half of those known,
    beyond the threshold within ``LEADER_SPREAD`` s of each other: the offset they share (its
    median); else None."""
    assert leader_step([90.0, 91.0, 88.5, 0.0]) == 90.0
    assert leader_step([-90.0, -91.0, -88.0, -300.0, 0.1]) == -90.0
    assert leader_step([-90.0, -91.0, -88.0, -89.0, 0.1]) == -89.5
    assert leader_step([90.0, 91.0, 0.0, 0.0]) is None  # two: their own clocks
    assert leader_step([90.0, 91.0, 92.0, 0.0, 0.0, 0.0]) is None  # not more than half
    assert leader_step([70.0, 80.0, 90.0, 0.0]) is None  # not about the same
    assert leader_step([70.0, 71.0, -70.0, -71.0, 0.0]) is None  # two groups of two
    assert leader_step([59.0, 59.5, 58.0]) is None  # within the threshold
    assert leader_step([]) is None
    assert near_step(93.0, 90.0) and not near_step(96.0, 90.0) and not near_step(90.0, None)


async def test_a_step_of_the_leader_s_clock_is_said_to_be_the_leader_s_and_logged_once(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s36, F6: the leader's clock stepped 90 s back made every node "differ", each
    problem blaming the node's NTP. Now, most nodes differing by about as much at once, each
    of their problems names the leader's clock as the first thing to check (`schema show`,
    the viewer, `tlsroll nodes`), and the leader logs ``leader.clock_differs`` once as it
    becomes so, ``leader.clock_agrees`` once it no longer is; a node that differs by another
    amount is still its own NTP's. (Nodes b-e are readings only: the clocks need no enrolled
    node.)"""
    async with leader_and_link(tmp_path, loopback) as (rig, link, offset):
        clocks = rig.state.clocks
        with structlog.testing.capture_logs() as events:
            offset[0] = 90.2
            await link.beat()
            await link.beat()
            for node, x in (("b", 89.0), ("c", 91.0), ("d", -200.0), ("e", 0.0)):
                clocks.heard(node, A1, x, T)
                clocks.heard(node, A1, x, T)
            clocks.check()  # (the event loop's, a second after a change)
            problems = {p.node: p.problem for p in rig.state.node_problems()}
            assert sorted(problems) == ["b", "c", "d", "hb1"]
            for node in ("b", "c", "hb1"):
                assert "likelier the LEADER's clock is off" in problems[node], problems[node]
            assert "LEADER" not in problems["d"] and "node's time synchronisation" in problems["d"]
            # the step most nodes share (their median), not each one's (review of s37, L6)
            assert all("(by -90.2 s)" in problems[node] for node in ("b", "c", "hb1"))

            snap = reader_of(rig).read()
            page = pages.PageContext("127.0.0.1", "test", T, "/events")
            html = unescape(pages.schema_content(snap, Words.of("en"), page))
            assert "The clock of node hb1 differs from the leader's by +90.2 s, as most" in html
            assert "The clock of node d differs from the leader's by -200.0 s; cert" in html
            html = unescape(pages.schema_content(snap, Words.of("de"), page))
            assert "wie die der meisten Knoten: vermutlich geht die Uhr des Leaders falsch." in html
            blamed = {n: leader for n, (_, _, leader) in clocks.listing().items()}
            assert blamed == {"b": True, "c": True, "d": False, "e": False, "hb1": True}

            for _ in range(CLEAR_AFTER):
                clocks.heard("b", A1, 1.0, T)  # b put right: 2 of 5 left
            clocks.check()
            assert all("LEADER" not in p.problem for p in rig.state.node_problems())
        said = [(e["event"], e.get("offset")) for e in events if e["event"].startswith("leader.")]
        assert said == [("leader.clock_differs", -90.2), ("leader.clock_agrees", None)]


async def test_tlsroll_nodes_shows_the_leader_s_own_verdict_on_its_clock_and_json_has_it(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s37, L7: `tlsroll nodes` worked out "blame the leader's clock" itself, over the
    enrolled nodes it lists, while the node problems (`schema show`, the viewer) carry the
    leader's verdict over the nodes it hears, and `--json` said nothing. Here hb1, the one
    enrolled node, is 90.2 s ahead and the leader hears b and c about as far (readings only):
    the leader blames its own clock for the three, and `tlsroll nodes` said "fix NTP" (one node
    listed: no step of its own). Now the leader's verdict goes on the wire
    (``NodeInfo.clock_leader``, ``NodeProblemView.clock_leader``): the table shows it, --json
    and the schema carry it, the viewer's page reads it; the CLI works nothing out, so nodes
    listed alike that the leader does not blame (a leader before the field) are not blamed."""
    async with leader_and_link(tmp_path, loopback) as (rig, link, offset):
        offset[0] = 90.2
        await link.beat()
        await link.beat()
        for node, x in (("b", 89.0), ("c", 91.0), ("d", 0.0)):
            rig.state.clocks.heard(node, A1, x, T)
            rig.state.clocks.heard(node, A1, x, T)
        admin = AdminService(rig.state, cast(Any, None), SchemaStore(rig.store.db))
        reply = await admin.ListNodes(admin_pb2.ListNodesRequest(), cast(Any, None))
        (info,) = reply.nodes
        assert (info.name, info.clock_differs, info.clock_leader) == ("hb1", True, True)
        assert identity._clock(info).plain == "+90.2 s: most nodes too: check the leader's clock"
        assert to_dict(info)["clock_leader"] is True  # `tlsroll nodes --json`, one node

        view = SchemaViewService(
            SchemaStore(rig.store.db),
            lambda: rig.clock[0],
            node_problems=rig.state.node_problems,
            fresh=rig.state.fresh_reports,
            reported=rig.store.report_since_start,
        )
        shown = view._answer(schema_pb2.GetSchemaRequest(), None).node_problems
        blamed = {p.node: p.clock_leader for p in shown}
        assert blamed == {"b": True, "c": True, "hb1": True}
        snap = reader_of(rig).read()
        assert {p["node"]: p["clock_leader"] for p in snap.data["node_problems"]} == blamed
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        html = unescape(pages.schema_content(snap, Words.of("en"), page))
        assert "The clock of node hb1 differs from the leader's by +90.2 s, as most" in html

        alike = [
            admin_pb2.NodeInfo(name=n, clock_offset_seconds=x, clock_differs=True)
            for n, x in (("n1", 89.0), ("n2", 90.0), ("n3", 91.0))
        ]
        assert [identity._clock(i).plain for i in alike] == [
            "+89.0 s: fix NTP", "+90.0 s: fix NTP", "+91.0 s: fix NTP"
        ]  # fmt: skip
        assert to_dict(alike[0])["clock_leader"] is False


async def test_an_agent_that_reconnects_keeps_its_clock_problem_and_its_since(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s36, F3 (the real Leader service, the agent's real heartbeat code): hb1's
    agent, 300 s ahead, a problem; the leader ends its stream (as when it fell behind with the
    leader's news) and the agent opens a new one. Meanwhile and after, the problem is shown
    with its first since, and logged once. Failed before: the stream's end forgot the clock,
    the problem was gone until the new stream's second message, then back with a new since
    and a second ``node.clock_differs``."""
    async with leader_and_link(tmp_path, loopback) as (rig, link, offset):
        offset[0] = 300.0
        with structlog.testing.capture_logs() as events:
            await link.beat()
            await link.beat()
            ((_, _, since, *_),) = rig.state.node_problems()
            (beat,) = rig.service._open
            service_module._end(beat, grpc.StatusCode.UNAVAILABLE, "the agent took no news")
            await until(lambda: not rig.service._open, "the leader's end of the stream")
            rig.clock[0] += dt.timedelta(seconds=10)  # the agent away a while
            assert [p.since for p in rig.state.node_problems()] == [since]
            await until(lambda: link._stream is not None and link._stream.ended is not None, "end")
            for _ in range(3):
                await link.beat()  # on its new stream
                rig.clock[0] += dt.timedelta(seconds=5)
                assert [p.since for p in rig.state.node_problems()] == [since]
                assert rig.state.clocks.offset("hb1") == 300.0
            assert len(rig.service._open) == 1
        assert [e["event"] for e in events].count("node.clock_differs") == 1


async def test_a_clone_behind_beside_an_agent_in_step_is_the_node_s_problem(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s36, F4 (the real Leader service, two real agents' heartbeat code with hb1's
    identity): a clone 300 s behind sends between the messages of hb1's agent, whose clock is
    in step. The node's clock differs (and the agents are twins, a problem of its own). Failed
    before: their messages made one estimate, the larger of the last two (the one in step):
    no clock problem."""
    async with leader_and_link(tmp_path, loopback) as (rig, link, _):
        leader_address = rig.target.rsplit(":", 1)[0]
        (tmp_path / "clone").mkdir()
        clone, _, journal = agent_link(
            tmp_path / "clone", rig.node_files, leader_address, link.cfg.addresses[0]
        )
        clone.clock = lambda: rig.clock[0] - dt.timedelta(seconds=300)
        try:
            for _ in range(3):
                await link.beat()
                await clone.beat()
            kinds = {p.kind: p for p in rig.state.node_problems()}
            assert set(kinds) == {NodeProblemKind.TWIN_AGENTS, CLOCK_OFFSET}
            assert kinds[CLOCK_OFFSET].clock_offset == -300.0
            assert rig.state.clocks.offset("hb1") == -300.0
        finally:
            await clone.close()
            journal.close()


def test_a_real_agent_that_reconnects_keeps_its_clock_problem_through_the_gap(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review of s36, F3, with a real leader daemon and a real agent daemon 300 s ahead (1 s
    interval; 2 s before session 65, which doubled each wait): the agent's process stopped
    (SIGSTOP) until the leader ended its silent stream and showed the node offline, then let go
    on: it reconnects with a new stream (the same agent). While it was away, the node's clock
    still differs (it was forgotten at the stream's end before); once back, the node problem
    keeps its first since, and the leader logged ``node.clock_differs`` once (before: a new
    since and a second line at the new stream's second message, which its clock moved to 310 s
    ahead tells apart)."""
    skew_file = tmp_path / "skew"
    skew_file.write_text("300")
    with AdminTokenCluster(tmp_path / "c", loopback(), heartbeat_interval=1) as cluster:
        cluster.init()
        cluster.start_leader()
        agent = cluster.add_agent("n1", loopback(), start=False)
        agent.argv = [sys.executable, "-c", SKEWED_AGENT, str(skew_file), *agent.argv[-2:]]
        agent.start()
        cluster.wait_for_nodes_online(["n1"])

        def problem() -> dict[str, Any]:
            done = cluster.cli("schema", "show", "--json")
            assert done.returncode == 0, done.stderr
            (found,) = json.loads(done.stdout)["node_problems"]
            assert isinstance(found, dict) and found["kind"] == "clock-offset"
            return found

        wait_until(
            lambda: cluster.list_nodes()["n1"].clock_differs,
            30,
            "n1's clock differs",
            interval=LEADER_POLL,
        )
        since = problem()["since"]
        agent.send_signal(signal.SIGSTOP)
        try:
            wait_until(
                lambda: not cluster.list_nodes()["n1"].online,
                30,
                "n1 offline",
                interval=LEADER_POLL,
            )
            away = cluster.list_nodes()["n1"]
            assert away.clock_differs and away.clock_offset_seconds > 290
        finally:
            agent.send_signal(signal.SIGCONT)
        wait_until(
            lambda: cluster.list_nodes()["n1"].online, 30, "n1 back online", interval=LEADER_POLL
        )
        skew_file.write_text("310")
        wait_until(
            lambda: cluster.list_nodes()["n1"].clock_offset_seconds > 305,
            60,
            "a later message",
            interval=LEADER_POLL,
        )
        assert problem()["since"] == since
        assert cluster.leader.event_names().count("node.clock_differs") == 1


# --- review of s37 ----------------------------------------------------------------------------


async def test_a_message_that_changes_a_node_s_state_does_not_judge_the_leader_s_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review of s37, M2: a message that began or ended a problem read every node's offset and
    ran ``leader_step`` (0.7 ms at 500 nodes, 2.8 ms at 2000, against 0.3 ms a message), and a
    step of the leader's clock makes every node's message such a change. Now the message marks
    a change; the leader's clock is judged and logged by a ``check`` on the event loop at most
    once a second after (a shape test: calls counted). Failed before: one call a change."""
    calls: list[int] = []
    real = leader_step

    def counted(offsets: Any) -> float | None:
        calls.append(1)
        return real(offsets)

    monkeypatch.setattr("leader.node_clocks.leader_step", counted)
    monkeypatch.setattr("leader.node_clocks.CHECK_SECONDS", 0.0, raising=False)
    clocks = NodeClocks()
    with structlog.testing.capture_logs() as events:
        for n in range(20):  # the leader's clock stepped: every node beyond, at once
            for _ in range(2):
                clocks.heard(f"n{n}", A1, 90.0 + 0.1 * n, T)
        assert calls == [] and sum(clocks.differs(f"n{n}") for n in range(20)) == 20
        async with asyncio.timeout(10):
            while not calls:
                await asyncio.sleep(0.01)
    assert len(calls) == 1
    assert [e["event"] for e in events if e["event"].startswith("leader.")] == [
        "leader.clock_differs"
    ]


def test_nodes_whose_agents_are_gone_leave_nothing_behind() -> None:
    """Review of s37, L1: an agent whose stream ended and whose bound passed kept its entry, and
    a node whose agents were all forgotten an empty one, for ever. Now ``ended`` drops the
    node's agents whose bound passed and the ``check`` sweeps the others: after 1000 nodes
    heard and ended, and their bound passed, nothing is left. Failed before: 1000 left."""
    mono = [0.0]
    clocks = NodeClocks(lambda: mono[0])
    for n in range(1000):
        clocks.heard(f"n{n}", A1, 0.0, T)
        clocks.heard(f"n{n}", A1, 0.0, T)
        clocks.ended(f"n{n}", A1, 28.0)
    clocks.heard("f", A1, 0.0, T)
    clocks.forget("f", A1)
    assert "f" not in clocks._nodes and len(clocks._nodes) == 1000
    mono[0] = 28.0
    clocks.check()
    assert clocks._nodes == {}


def test_the_clocks_bound_is_on_the_state_s_monotonic_clock_as_a_test_sets_it() -> None:
    """Review of s37, L2: ``LeaderState`` gave its clocks the ``monotonic`` it had when made,
    and a test that set ``state.monotonic`` later moved the store's clock, not theirs; by
    default they were on ``time.monotonic``, which stops in a suspend. Now late-bound, and on
    the project's suspend-counting clock (``tlsroll.clocks.elapsed``). Failed before: 123 was
    not read."""
    state = service_module.LeaderState(None, None, lambda: T, 5)  # type: ignore[arg-type]
    state.monotonic = lambda: 123.0
    assert state.clocks.monotonic() == 123.0
    assert NodeClocks().monotonic is elapsed


async def test_a_change_is_judged_soon_though_an_agent_s_bound_is_due_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``check`` due at an ended agent's bound (here an hour on) does not put off the one a
    change needs (``CHECK_SECONDS``, here none): the leader's clock is logged at once."""
    monkeypatch.setattr("leader.node_clocks.CHECK_SECONDS", 0.0)
    clocks = NodeClocks()
    clocks.heard("gone", A1, 0.0, T)
    clocks.ended("gone", A1, 3600.0)
    with structlog.testing.capture_logs() as events:
        for n in range(5):
            clocks.heard(f"n{n}", A1, 90.0, T)
            clocks.heard(f"n{n}", A1, 90.0, T)
        async with asyncio.timeout(10):
            while not [e for e in events if e["event"] == "leader.clock_differs"]:
                await asyncio.sleep(0.01)


async def test_a_sent_at_farther_off_than_any_real_clock_is_taken_as_no_time(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Session 68: a heartbeat whose ``sent_at`` is years off (a time protobuf holds) or no
    time at all (2**62 s) made the node's clock differ by billions of seconds, shown and
    logged as said. Farther than ``MAX_OFFSET`` (no agent with a clock that far off holds the
    leader's 397-day certificate valid) it is as a message without a time: the clock is not
    known (a problem of it ends), nothing logged with such an offset; within it, taken."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()

    def message(seconds: int, nanos: int = 0) -> leader_pb2.HeartbeatRequest:
        request = leader_pb2.HeartbeatRequest(agent_version="1", agent_port=AGENT_PORT)
        request.sent_at.CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
        return request

    now = int(T.timestamp())
    years = 5 * 365 * 86400
    absurd = [
        (now + years, 0),
        (now - 30 * years, 0),
        (now + int(MAX_OFFSET) + 1, 0),
        (now - int(MAX_OFFSET) - 1, 0),
        (2**62, 0),
        (253402300799, 999999999),  # the last second of 9999
        (-62135596800, 0),  # the first of year 1
    ]
    try:
        with structlog.testing.capture_logs() as logs:
            async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
                stream = leader_pb2_grpc.LeaderStub(channel).Heartbeats()  # type: ignore[call-arg]

                async def send(request: leader_pb2.HeartbeatRequest) -> None:
                    await stream.write(request)
                    assert isinstance(await stream.read(), leader_pb2.HeartbeatResponse)

                clocks = rig.state.clocks
                for seconds, nanos in absurd:
                    for _ in range(2):
                        await send(message(now + 300))
                    assert clocks.offset("hb1") == 300.0 and clocks.differs("hb1")
                    for _ in range(2):
                        await send(message(seconds, nanos))
                    assert clocks.offset("hb1") is None, (seconds, clocks.offset("hb1"))
                    assert rig.state.node_problems() == [], seconds
                # Within it, however far: taken (a node 397 days ahead, as said).
                for _ in range(2):
                    await send(message(now + 397 * 86400))
                assert clocks.offset("hb1") == 397 * 86400.0 and clocks.differs("hb1")
                await stream.done_writing()
                assert not isinstance(await stream.read(), leader_pb2.HeartbeatResponse)
        offsets = [abs(e["offset"]) for e in logs if "offset" in e]
        assert offsets and max(offsets) <= MAX_OFFSET, offsets
        assert not [e for e in logs if e["log_level"] == "error"], logs
    finally:
        await rig.close()
