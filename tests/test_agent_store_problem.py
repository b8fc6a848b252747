"""The agent-store node problem's leftovers (review of s74 agenttrouble: L1, L2, L4, L5, L6).

In process, cheap: the leader's state and the Leader service's heartbeat handling, the viewer's
reader and page, `schema show`'s drawing, the agent's servicer on a real directory (its free
space as ``tlsroll.room`` reads it, given) and its link's heartbeat facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from html import unescape
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest
from structlog.testing import capture_logs

from leader.cli.draw import render_node_problems
from leader.schema_store import SchemaStore
from leader.service import LeaderService, LeaderState, TwinAgents
from leader.states import NodeProblemKind
from leader.store import Store
from leader.viewer import pages
from leader.viewer.i18n import Words
from leader.viewer.snapshot import Reader
from nodeagent.leader_link import STORE_TROUBLE_CHARS, LeaderLink, report_key
from tests.conftest import none_fresh
from tests.test_disk_room import agent_on
from tlsroll import room
from tlsroll.enums import NEEDS_ADMIN
from tlsroll.v1 import leader_pb2

if TYPE_CHECKING:
    from tests.leader_rig import InProcessLeader

T = dt.datetime(2026, 12, 7, 9, 0, tzinfo=dt.UTC)
LOW = "too little free space for a switch: the agent's data dir /d has {} free, needs 4 MiB"
CHECKPOINT = "the journal /d/j cannot grow: its checkpoint fails (SQLITE_FULL: disk is full)"


def bare_state() -> LeaderState:
    """The leader's state with no store or CA (what node problems need: its maps)."""
    return LeaderState(cast(Any, None), cast(Any, None), lambda: T, 5, monotonic=lambda: 100.0)


def heard(state: LeaderState, node: str, *trouble: str) -> list[MutableMapping[str, Any]]:
    """The Leader service's handling of ``node``'s heartbeat saying ``trouble`` of its store
    (``LeaderService._agent_store``), and what it logged."""
    request = leader_pb2.HeartbeatRequest(agent_version="v", store_trouble=trouble)
    with capture_logs() as logs:
        LeaderService._agent_store(cast(Any, SimpleNamespace(state=state)), node, request, T)
    return logs


def test_a_node_s_problems_are_listed_what_holds_a_rollout_first(tmp_path: Path) -> None:
    """L1: by the kinds' names, information-only ``agent-store`` was listed before
    ``needs-admin`` and ``twin-agents``, which hold the node: now what holds a rollout comes
    first, in the leader's list, `schema show` (whatever order a leader sends) and the
    viewer's page, the same order at every read."""
    state = bare_state()
    state.twin_agents["b"] = TwinAgents(T, 200.0, ("p1", "p2"))
    state.needs_admin_since["b"] = T
    state.live_servers["b"] = f"{NEEDS_ADMIN}: its journal was put back"
    heard(state, "a", LOW.format("1 MiB"))
    heard(state, "b", LOW.format("1 MiB"))
    state.bootstrap_down["a"] = (T, "port 8443 in use")
    listed = [(p.kind, p.node) for p in state.node_problems()]
    assert listed == [
        (NodeProblemKind.TWIN_AGENTS, "b"),
        (NodeProblemKind.NEEDS_ADMIN, "b"),
        (NodeProblemKind.AGENT_STORE, "a"),
        (NodeProblemKind.AGENT_STORE, "b"),
        (NodeProblemKind.BOOTSTRAP_DOWN, "a"),
    ], listed
    assert [(p.kind, p.node) for p in state.node_problems()] == listed  # (stable)

    store = Store(tmp_path / "leader.sqlite3")
    try:
        snap = _snapshot(store, state)
        shown = snap.data["node_problems"]
        assert [(p["kind"], p["node"]) for p in shown] == listed
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        html = pages.schema_content(snap, Words.of("en"), page)
        assert html.index("Two agents use node b") < html.index('data-problem="needs-admin"')
        assert html.index('data-problem="needs-admin"') < html.index('data-problem="agent-store"')
        # `schema show` draws them so even from a leader that lists them by the kinds' names.
        by_name = sorted(shown, key=lambda p: (p["node"], p["kind"]))
        lines = render_node_problems(by_name).lines(400, color=False)
        # (a row's first line names its node; the lines its words wrap onto do not)
        cells = [line[2:].split(" ", 1) for line in lines if line.startswith(("│ a ", "│ b "))]
        rows = [(node, "two agents" in rest, "bootstrap service" in rest) for node, rest in cells]
        assert [node for node, _, _ in rows] == ["b", "b", "a", "b", "a"], lines
        assert rows[0][1] and rows[-1][2], lines
    finally:
        store.close()


def test_the_viewer_quotes_only_the_agent_s_own_words(tmp_path: Path) -> None:
    """L5: the viewer quoted the leader's whole sentence (its own words again, in English) as
    what the agent says: now the agent's own texts alone, as the schema carries them
    (``NodeProblemView.agent_said``)."""
    state = bare_state()
    heard(state, "hb1", LOW.format("1 MiB"), CHECKPOINT)
    (problem,) = state.node_problems()
    store = Store(tmp_path / "leader.sqlite3")
    try:
        snap = _snapshot(store, state)
        (shown,) = snap.data["node_problems"]
        assert shown["agent_said"] == [LOW.format("1 MiB"), CHECKPOINT], shown
        page = pages.PageContext("127.0.0.1", "test", T, "/events")
        for lang, says in (
            ("de", "Der Agent beschreibt es auf Englisch:"),
            ("en", "The agent says:"),
        ):
            html = unescape(pages.schema_content(snap, Words.of(lang), page))
            quoted = f'{says} <q lang="en">{LOW.format("1 MiB")}; {CHECKPOINT}</q>'
            assert quoted in html, html
            assert problem.problem not in html and "cannot write its store safely:" not in html
    finally:
        store.close()


def test_a_change_of_kind_of_an_agent_s_store_trouble_is_logged_its_free_space_moving_is_not() -> (
    None
):
    """L6: the leader logged the trouble's coming (a warning) and going, not its change from
    too little free space to a failing checkpoint: now an info line, and none while only the
    free space it names moves."""
    state = bare_state()
    logs = heard(state, "hb1", LOW.format("1.2 MiB"))
    assert [e["event"] for e in logs] == ["node.store_trouble"]
    assert heard(state, "hb1", LOW.format("900 KiB")) == []
    logs = heard(state, "hb1", LOW.format("800 KiB"), CHECKPOINT)
    assert [(e["event"], e["log_level"], e["node"]) for e in logs] == [
        ("node.store_trouble_changed", "info", "hb1")
    ], logs
    assert CHECKPOINT in logs[0]["detail"]
    assert heard(state, "hb1", LOW.format("700 KiB"), CHECKPOINT) == []
    logs = heard(state, "hb1", CHECKPOINT)
    assert [e["event"] for e in logs] == ["node.store_trouble_changed"]
    assert state.agent_store["hb1"][0] == T  # (its since stays)
    assert [e["event"] for e in heard(state, "hb1")] == ["node.store_trouble_over"]


def test_free_space_hovering_at_the_floor_is_said_until_it_is_back_above_a_margin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L2: free space hovering around the floor made every beat news (a message each beat)
    and a leader's log line per flip. Now the agent's heartbeat calls the room trouble over
    only once the free space is back above the floor and a margin (``room.said_until``), its
    words the same but for their figures meanwhile; its checks still refuse by the floor."""
    agent, journal = agent_on(tmp_path)
    try:
        free = [0]
        monkeypatch.setattr(room, "free_bytes", lambda _directory: free[0])
        need = room.JOURNAL_ROOM + room.CONFIG_ROOM  # (one file system: the sum)
        until = room.said_until(need)
        assert until > need
        free[0] = need - 1
        (short,) = agent.store_trouble()
        assert short.startswith("free space is low for a switch: "), short
        assert f"(said until {room.size_text(until)} are free)" in short, short

        def key(trouble: list[str]) -> bytes:
            return report_key(leader_pb2.HeartbeatRequest(agent_version="v", store_trouble=trouble))

        state = bare_state()
        lines = [e["event"] for e in heard(state, "hb1", *agent.store_trouble())]
        for hover in (need + 1, need - 1, need + 1, until - 1, need - 4096):
            free[0] = hover
            said = agent.store_trouble()
            assert key(said) == key([short]), (hover, said)
            lines += [e["event"] for e in heard(state, "hb1", *said)]
            # The checks' own floor is the floor: above it, a switch is not refused.
            assert (agent._room_problems(agent.driver) == []) == (hover >= need)
        free[0] = until
        assert agent.store_trouble() == []
        lines += [e["event"] for e in heard(state, "hb1", *agent.store_trouble())]
        assert lines == ["node.store_trouble", "node.store_trouble_over"], lines
        free[0] = need + 1  # over: the floor again, not the margin, says it
        assert agent.store_trouble() == []
        free[0] = need - 1
        assert len(agent.store_trouble()) == 1
    finally:
        journal.close()


def test_a_long_store_trouble_is_cut_after_its_figures_are_masked() -> None:
    """L4: the agent cut each text to its characters before ``report_key`` masked the figures,
    so a long path let a figure's length move the cut and the free space moving was news."""
    path = "/srv/" + "p" * (STORE_TROUBLE_CHARS - 80)

    def facts(free: str) -> list[str]:
        text = (
            f"too little free space for a switch: the agent's data dir {path} has {free} free,"
            " a switch needs 4.0 MiB; free space on its file system (df -h)"
        )
        assert len(text) > STORE_TROUBLE_CHARS
        link = SimpleNamespace(
            journal=SimpleNamespace(heartbeat_facts=lambda _most: (0, [])),
            store_trouble=lambda: [text],
        )
        _highest, _unswitched, trouble = LeaderLink._facts(cast(Any, link))
        return trouble

    def key(trouble: list[str]) -> bytes:
        return report_key(leader_pb2.HeartbeatRequest(agent_version="v", store_trouble=trouble))

    small, large = facts("8 KiB"), facts("1023.9 MiB")
    assert key(small) == key(large), (small, large)
    assert "has 8 KiB free" in small[0] and "has 1023.9 MiB free" in large[0]
    assert all(len(t) <= 2 * STORE_TROUBLE_CHARS for t in small + large)


def test_schema_show_lists_a_node_s_problems_in_the_leader_s_order() -> None:
    """`schema show` keeps its own copy of the leader's order (it imports none of the leader's
    state code): the same kinds in the same order."""
    from leader.cli import draw
    from leader.states import NODE_PROBLEM_ORDER

    assert tuple(kind.value for kind in NODE_PROBLEM_ORDER) == draw.PROBLEM_ORDER
    assert draw.problem_rank("a-newer-leader-s-kind") == len(NODE_PROBLEM_ORDER)


def _snapshot(store: Store, state: LeaderState) -> Any:
    """What `schema show` and the viewer read of ``state``'s node problems (a real store's
    reader, the clock at ``T``)."""
    reader = Reader(store, SchemaStore(store.db), lambda: T, lambda _: True, [], fresh=none_fresh)
    reader.node_problems = state.node_problems
    return reader.read()


# --- session 75: the s74 note's leftovers of the agent's store trouble ----------------------


def test_the_leader_logs_an_old_agent_s_flapping_store_trouble_at_most_once_in_a_while() -> None:
    """L4: an agent of the release before keeps no margin at the floor, and its free space
    hovering there made a ``node.store_trouble`` warning and an over line per flip. Now the
    same kind again within ``STORE_LOG_SECONDS`` of its last warning is not logged (its over
    neither), a new kind always, and the same kind once the bound has passed, at the first
    message after it that still says it."""
    from leader.service import STORE_LOG_SECONDS

    state = bare_state()
    clock = [100.0]
    state.monotonic = lambda: clock[0]
    lines = [e["event"] for e in heard(state, "old", LOW.format("1 MiB"))]
    lines += [e["event"] for e in heard(state, "old")]
    for flip in range(10):
        clock[0] += 1
        lines += [e["event"] for e in heard(state, "old", LOW.format(f"{flip} MiB"))]
        lines += [e["event"] for e in heard(state, "old")]
    assert lines == ["node.store_trouble", "node.store_trouble_over"], lines
    # (shown all the same, while it is said: the node problem is not rate-limited)
    assert heard(state, "old", LOW.format("1 MiB")) == []
    assert [p.node for p in state.node_problems()] == ["old"]
    # A new kind is logged at once (the log last said it over: a warning), its change and its
    # end too.
    logs = heard(state, "old", LOW.format("1 MiB"), CHECKPOINT)
    assert [(e["event"], e["log_level"]) for e in logs] == [("node.store_trouble", "warning")]
    logs = heard(state, "old", CHECKPOINT)
    assert [(e["event"], e["log_level"]) for e in logs] == [("node.store_trouble_changed", "info")]
    assert [e["event"] for e in heard(state, "old")] == ["node.store_trouble_over"]
    # The same kind again: not within the bound; after it, at the first message that says it.
    assert heard(state, "old", CHECKPOINT) == []
    assert heard(state, "old") == []
    assert heard(state, "old", CHECKPOINT) == []
    clock[0] += STORE_LOG_SECONDS
    logs = heard(state, "old", CHECKPOINT)
    assert [(e["event"], e["log_level"]) for e in logs] == [("node.store_trouble", "warning")]
    assert heard(state, "old", CHECKPOINT) == []
    assert [e["event"] for e in heard(state, "old")] == ["node.store_trouble_over"]
    # Another node is its own; a removed node is forgotten.
    assert [e["event"] for e in heard(state, "other", LOW.format("1 MiB"))] == [
        "node.store_trouble"
    ]
    state.forget_node("other")
    assert "other" not in state.store_logged and "old" in state.store_logged


def test_free_space_between_the_floor_and_the_margin_is_not_said_too_little(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L5 of the s74 note: between the floor and the margin the heartbeat's text said "too
    little free space" while the checks passed. Now its words are true on both sides of the
    floor (and the same on both: a crossing is no news); the checks' own text is unchanged."""
    agent, journal = agent_on(tmp_path)
    try:
        free = [0]
        monkeypatch.setattr(room, "free_bytes", lambda _directory: free[0])
        need = room.JOURNAL_ROOM + room.CONFIG_ROOM
        for hover in (need - 1, need + 1):
            free[0] = hover
            (said,) = agent.store_trouble()
            assert "too little" not in said, said
            assert said.startswith("free space is low for a switch: the agent's data dir"), said
            assert f"a switch is refused below {room.size_text(need)} (said until" in said, said
            assert (agent._room_problems(agent.driver) == []) == (hover >= need)
        free[0] = need - 1
        (checks,) = agent._room_problems(agent.driver)
        assert checks.startswith("too little free space for a switch: "), checks
        assert f"a switch needs {room.size_text(need)}; free space" in checks, checks
    finally:
        journal.close()


@contextlib.asynccontextmanager
async def _leader_and_link(
    tmp_path: Path, loopback: Callable[[], str]
) -> AsyncIterator[tuple[InProcessLeader, LeaderLink, list[asyncio.Task[Any]]]]:
    """An in-process leader with node hb1 enrolled and that node's agent's heartbeat link (its
    interval an hour, its clock the leader's: no clock problem); the tasks a test adds to the
    list are cancelled at the end, then the link, its journal and the leader closed."""
    from tests.leader_rig import leader_with_a_node
    from tests.test_heartbeat_stream import agent_link

    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    link, _, journal = agent_link(
        tmp_path, rig.node_files, rig.target.rsplit(":", 1)[0], loopback(), 3600
    )
    link.clock = lambda: rig.clock[0]
    tasks: list[asyncio.Task[Any]] = []
    try:
        yield rig, link, tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await link.close()
        journal.close()
        await rig.close()


async def test_a_change_of_the_agent_s_store_trouble_is_sent_at_once_but_never_as_a_storm(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """L1 of the s74 note: a change of the agent's store trouble was told at the next beat,
    an interval later. Now the store's thread (a checkpoint that starts or stops failing)
    wakes the watch, whose news wakes the heartbeat sender: the leader hears it with no
    regular beat due (the agent's interval here an hour). A store flapping twenty times
    within ``WAKE_SECONDS`` makes no extra message (its last word goes with the next wake
    after the bound); and the leader's metrics say it (L3: ``tlsroll_node_agent_store_trouble``).
    Counted: the watch's wakes, the leader's messages."""
    from leader.viewer import metrics
    from nodeagent import store_watch
    from tests.test_heartbeat_stream import until
    from tests.test_node_clocks import gauge, reader_of

    messages = [0]
    handle = LeaderService._agent_store

    def counted(self: LeaderService, name: str, request: Any, now: dt.datetime) -> None:
        # A beat's message (not the goodbye on the stream it leaves, once the leader's
        # interval is known: ``LeaderLink._redial``).
        messages[0] += not request.closing
        handle(self, name, request, now)

    monkeypatch.setattr(LeaderService, "_agent_store", counted)
    async with _leader_and_link(tmp_path, loopback) as (rig, link, tasks):
        trouble: list[list[str]] = [[]]
        clock = [0.0]
        watch = store_watch.StoreWatch(
            lambda: list(trouble[0]), 3600, link.beat_soon, monotonic=lambda: clock[0]
        )
        link.store_trouble = watch.current
        tasks += [asyncio.create_task(watch.run()), asyncio.create_task(link.run())]
        await until(lambda: messages[0] >= 1 and watch.reads >= 1, "the first beat and read")

        def store_thread(failed: BaseException | None) -> None:
            """What the journal's store thread does after a checkpoint (``on_checkpoint``)."""
            told = threading.Thread(target=watch.checkpoint, args=(failed,))
            told.start()
            told.join()

        sent = messages[0]
        trouble[0] = [CHECKPOINT]
        store_thread(sqlite3.OperationalError("database or disk is full"))
        await until(lambda: "hb1" in rig.state.agent_store, "the leader to hear the trouble")
        assert (watch.wakes, messages[0]) == (1, sent + 1)
        assert rig.state.agent_store["hb1"][1] == (CHECKPOINT,)
        reader = reader_of(rig)
        render = functools.partial(metrics.render, reader.read(times=True))
        assert gauge(render(), "tlsroll_node_agent_store_trouble") == {"hb1": 1.0}

        reads = watch.reads
        for flip in range(21):  # (ends with the trouble gone)
            trouble[0] = [CHECKPOINT] if flip % 2 else []
            store_thread(sqlite3.OperationalError("disk full") if flip % 2 else None)
            await until(lambda r=reads: watch.reads > r, "the watch to read again")  # type: ignore[misc]
            reads = watch.reads
        assert watch.current() == []
        assert (watch.wakes, messages[0]) == (1, sent + 1)
        assert "hb1" in rig.state.agent_store  # (not told yet: within the bound)

        clock[0] += store_watch.WAKE_SECONDS
        watch.poke()
        await until(lambda: "hb1" not in rig.state.agent_store, "the leader to hear its end")
        assert (watch.wakes, messages[0]) == (2, sent + 2)
        render = functools.partial(metrics.render, reader.read(times=True))
        assert gauge(render(), "tlsroll_node_agent_store_trouble") == {"hb1": 0.0}


async def test_a_hung_file_system_stalls_no_heartbeat_and_is_said_as_trouble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L2 of the s74 note: the heartbeat read the free space (statvfs) on its own thread call,
    so a hung network mount under the data or config dir stalled every beat. Now the watch
    reads it on a thread of its own, one read at a time: a statvfs that hangs (a fake: a hung
    NFS mount cannot be made here) leaves the beat's facts to be read at once, is said as
    trouble after ``STALL_SECONDS`` (a wake), and starts no second read however often poked;
    once it answers, the real statvfs of the real directory says no trouble."""
    from nodeagent import store_watch
    from tests.test_heartbeat_stream import until as until_true

    monkeypatch.setattr(store_watch, "STALL_SECONDS", 0.2)
    monkeypatch.setattr(store_watch, "WAKE_SECONDS", 0.0)
    agent, journal = agent_on(tmp_path)
    real = os.statvfs
    gate = threading.Event()
    hung = [0]

    def statvfs(path: Any) -> os.statvfs_result:
        if str(path).startswith(str(tmp_path)) and not gate.is_set():
            hung[0] += 1
            gate.wait(60)  # (bounded: a failing test ends)
        return real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    woken = [0]

    def wake() -> None:
        woken[0] += 1

    watch = store_watch.StoreWatch(agent.store_trouble, 3600, wake)
    link = SimpleNamespace(
        journal=SimpleNamespace(heartbeat_facts=lambda _most: (7, [])),
        store_trouble=watch.current,
    )
    task = asyncio.create_task(watch.run())
    try:
        await until_true(lambda: woken[0] == 1, "the stall to be said")
        stalled = store_watch.stalled_text(store_watch.STALL_SECONDS)
        # The beat's facts as its thread call reads them: at once, with the stall.
        assert LeaderLink._facts(cast(Any, link)) == (7, [], [stalled])
        for _ in range(3):
            watch.poke()
            await asyncio.sleep(0)
        assert (hung[0], watch.reads) == (1, 0)  # (one read, hung; no second one)
        gate.set()
        await until_true(lambda: watch.reads >= 1 and woken[0] == 2, "its end to be said")
        assert watch.current() == [] and LeaderLink._facts(cast(Any, link))[2] == []
        reads = watch.reads
        watch.poke()  # (the real statvfs of the real directory)
        await until_true(lambda: watch.reads > reads, "a read of the real directory")
        assert watch.current() == [] and woken[0] == 2 and hung[0] == 1
    finally:
        gate.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        journal.close()


async def test_an_agent_s_first_heartbeat_says_its_store_trouble_not_none(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of s75 storels, M1: the heartbeat took the watch's last reading, and at the
    agent's start there was none yet (its first read on its thread, the first beat at once):
    the first message said no store trouble. A leader that showed a node's trouble then took
    an agent's restart for its end (``node.store_trouble_over``, the node problem's since
    anew) while it lasted, and its new warning was held back by the rate limit. Now the beats
    begin once the first read is back (``StoreWatch.beats_once_read``: as the agent's runtime
    starts them). A read that takes a moment (a slow network mount) here; counted: what each
    message the leader handled said."""
    from nodeagent import store_watch
    from tests.test_heartbeat_stream import until

    said: list[tuple[str, ...]] = []
    handle = LeaderService._agent_store

    def counted(self: LeaderService, name: str, request: Any, now: dt.datetime) -> None:
        said.append(tuple(request.store_trouble))
        handle(self, name, request, now)

    monkeypatch.setattr(LeaderService, "_agent_store", counted)
    async with _leader_and_link(tmp_path, loopback) as (rig, link, tasks):

        def measure() -> list[str]:
            time.sleep(0.3)  # (a slow file system's statvfs: what is measured, not a wait on state)
            return [CHECKPOINT]

        watch = store_watch.StoreWatch(measure, 3600, link.beat_soon)
        link.store_trouble = watch.current
        tasks += [
            asyncio.create_task(watch.run()),
            asyncio.create_task(watch.beats_once_read(link.run)),
        ]
        await until(lambda: "hb1" in rig.state.agent_store, "the leader to hear the trouble")
        assert said[0] == (CHECKPOINT,), said
        assert () not in said, said


async def test_news_held_back_by_the_wake_bound_wakes_the_beat_once_the_bound_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review of s75 storels, L1: a change within ``WAKE_SECONDS`` of the last wake was owed,
    and told only at the watch's next read, an interval on (the agent's interval may be an
    hour): a checkpoint that failed and was over a second later showed the trouble that long.
    Now it wakes the beat once the bound has passed, with no read more. Counted: the wakes,
    the reads."""
    from nodeagent import store_watch
    from tests.test_heartbeat_stream import until

    monkeypatch.setattr(store_watch, "WAKE_SECONDS", 1.0)
    trouble: list[list[str]] = [[]]
    woken = [0]

    def wake() -> None:
        woken[0] += 1

    watch = store_watch.StoreWatch(lambda: list(trouble[0]), 3600, wake)
    task = asyncio.create_task(watch.run())
    try:
        await until(lambda: watch.reads == 1, "the first read")
        trouble[0] = [CHECKPOINT]
        watch.poke()
        await until(lambda: woken[0] == 1, "the trouble's wake")
        trouble[0] = []
        watch.poke()
        await until(lambda: watch.reads == 3, "the read of its end")
        assert watch.current() == []
        await until(lambda: woken[0] == 2, "its end's wake, after the bound")
        assert watch.reads == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_agent_stopping_during_a_stalled_read_says_not_that_it_came_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review of s75 storels, L2: the watch cancelled (the agent stops) while its read hung
    logged ``store_watch.answers`` ("the stalled read came back") and counted a read: at the
    stop of an agent on a hung mount its log said the mount answered."""
    from nodeagent import store_watch
    from tests.test_heartbeat_stream import until

    monkeypatch.setattr(store_watch, "STALL_SECONDS", 0.2)
    gate = threading.Event()

    def measure() -> list[str]:
        gate.wait(60)  # (bounded: a failing test ends)
        return []

    woken = [0]

    def wake() -> None:
        woken[0] += 1

    watch = store_watch.StoreWatch(measure, 3600, wake)
    task = asyncio.create_task(watch.run())
    try:
        await until(lambda: woken[0] == 1, "the stall to be said")
        with capture_logs() as logs:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert [e["event"] for e in logs] == [], logs
        assert watch.reads == 0
    finally:
        gate.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
