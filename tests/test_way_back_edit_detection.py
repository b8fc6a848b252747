"""Which server configs the way back to http calls edited since tlsroll wrote them
(``plans.edited_since``; review of branch s59-wayback): the way back's plan names such a node
and its agent keeps the file beside the config before it puts back the config from before
the switch. Nothing is kept, and nothing said, for a file as tlsroll wrote it; an edit the
way back undoes is never undone silently. Real journals (SQLite) and real drivers' renders
throughout; the agent's planning question is asked of a real ``NodeAgentService``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from leader.commands import RolloutRequest
from leader.observe import FirstSteps, observe
from leader.rollout_core import Change, NodeObservation, Scope
from nodeagent import plans
from nodeagent.drivers import Driver, ServerFacts, SystemdDriver, Target
from nodeagent.journal import Journal, Txn
from nodeagent.service import NodeAgentService
from nodeagent.transaction import Phase, Plan
from nodeagent.trust import LeaderTrust
from tests.test_engine import ADMIN, make_world
from tests.test_repeated_commands import rollout, settle
from tests.test_warm_ahead import Asked
from tlsroll import pki
from tlsroll.config import Section
from tlsroll.enums import TxnKind, TxnOutcome
from tlsroll.v1 import agent_pb2

HTTPS = ("https",)
AT = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def an_agent(tmp_path: Path, journal: Journal, driver: Driver) -> NodeAgentService:
    """The agent's servicer in this process, on ``journal`` and ``driver``, for node ``n1``
    (no identity, no bootstrap service: the calls the test makes read neither)."""
    names = type("N", (), {"common_name": "n1", "ips": ["127.0.0.1"], "dns": []})()
    cfg = type("C", (), {"names": names, "bootstrap_port": 0})()
    trust = LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem")
    return NodeAgentService(
        cast(Any, cfg),
        cast(Any, None),
        journal,
        driver,
        None,
        lambda: dt.datetime.now(dt.UTC),
        trust=trust,
    )


def plan_json(source: tuple[str, ...], target: tuple[str, ...]) -> dict[str, Any]:
    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, target)
    return Plan(facts, source, target, Path("/n"), Path("/b"), Path("/ca"), "").to_json()


def journalled(
    journal: Journal,
    rollout_id: str,
    found: bytes,
    wrote: bytes,
    outcome: TxnOutcome,
    *,
    at: dt.datetime = AT,
    source: tuple[str, ...] = HTTPS,
) -> None:
    """A switch (enable-tls from ``source``, or a later rotate-cert) that found ``found`` and
    wrote ``wrote``, ended with ``outcome``."""
    txn = journal.create(
        Txn(
            rollout_id,
            TxnKind.SWITCH,
            1,
            Phase.VERIFIED,
            plan_json(source, HTTPS),
            at,
            source_config=found,
            target_config=wrote,
        )
    )
    if outcome is TxnOutcome.COMPLETED:
        journal.complete(txn, None, phase=Phase.COMPLETED, outcome=outcome)
    elif outcome is TxnOutcome.ROLLED_BACK:
        journal.update(txn, phase=Phase.ROLLED_BACK, outcome=outcome)
    else:
        journal.update(txn, phase=Phase.FAILED, outcome=outcome)


def template_driver(tmp_path: Path) -> SystemdDriver:
    """The systemd driver: its config rendered from the admin's template."""
    template = tmp_path / "server.conf.in"
    template.write_text("listen $listen;\ncert $cert_file;\n")
    settings = {
        "config_file": str(tmp_path / "server.conf"),
        "template": str(template),
        "app_path": "/",
        "unit": "x.service",
        "admin_socket": str(tmp_path / "admin.sock"),
    }
    return SystemdDriver(Section(tmp_path / "agent.toml", "server", settings), "127.0.0.1")


def edited(journal: Journal, driver: Driver, live: bytes) -> bool:
    """What the agent answers the way back's plan (the live config ``live``)."""
    driver.config_file.write_bytes(live)
    answer = plans.edited_config(journal, driver, HTTPS)
    assert answer in ("", str(driver.config_file))
    return answer != ""


@pytest.mark.parametrize("carried", [False, True])
def test_a_change_after_a_hand_edit_claims_it_only_where_its_render_carried_it(
    tmp_path: Path, carried: bool
) -> None:
    """Review M1 (a): the systemd and exec drivers render a rotate-cert's config from the
    template, so a hand edit of the live config before it is gone from what it wrote: that
    file, byte for byte as tlsroll wrote it, was still called edited (and a needless copy
    kept). A driver whose render carries the live config's settings (``config_decides``: the
    reference server's) wrote the edit over: the way back would undo it, and says so."""
    driver = template_driver(tmp_path)
    driver.config_decides = carried  # (the bytes below stand for either driver's render)
    journal = Journal(tmp_path / "journal.sqlite3")
    on_http = driver.render(Target(("http",)))
    switched = driver.render(Target(HTTPS, cert_file=tmp_path / "a.pem"))
    by_hand = switched + b"client_max_body_size 1m;\n"
    rotated = driver.render(Target(HTTPS, cert_file=tmp_path / "b.pem"))
    if carried:  # the reference server's render keeps every other setting
        rotated += b"client_max_body_size 1m;\n"
    journalled(journal, "r1", on_http, switched, TxnOutcome.COMPLETED, source=("http",))
    assert not edited(journal, driver, switched)
    assert edited(journal, driver, by_hand)
    journalled(journal, "r2", by_hand, rotated, TxnOutcome.COMPLETED, at=AT + dt.timedelta(1))
    assert edited(journal, driver, rotated) is carried  # the file as tlsroll wrote it
    assert edited(journal, driver, rotated + b"# and again\n")  # an edit since: named
    journal.close()


def test_a_hand_edit_a_change_put_back_is_still_named_for_a_template_driver(
    tmp_path: Path,
) -> None:
    """A rotate-cert that found the config edited by hand and was rolled back put that file
    back, edit and all: still named (the way back undoes it)."""
    driver = template_driver(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite3")
    switched = driver.render(Target(HTTPS, cert_file=tmp_path / "a.pem"))
    by_hand = switched + b"client_max_body_size 1m;\n"
    rotated = driver.render(Target(HTTPS, cert_file=tmp_path / "b.pem"))
    journalled(journal, "r1", b"http\n", switched, TxnOutcome.COMPLETED, source=("http",))
    journalled(journal, "r2", by_hand, rotated, TxnOutcome.ROLLED_BACK, at=AT + dt.timedelta(1))
    assert edited(journal, driver, by_hand)
    journal.close()


@pytest.mark.parametrize("carried", [False, True])
def test_a_repair_by_hand_after_a_failed_change_is_named(tmp_path: Path, carried: bool) -> None:
    """Review M2: a rotate-cert that failed asks the admin to repair the server; a repair of
    its config by hand is neither the config it found nor the one it wrote, and the way back
    undoes it: named. The file as the failed change found it or left it is not."""
    driver = template_driver(tmp_path)
    driver.config_decides = carried
    journal = Journal(tmp_path / "journal.sqlite3")
    journalled(journal, "r1", b"http\n", b"https 1\n", TxnOutcome.COMPLETED, source=("http",))
    journalled(
        journal, "r2", b"https 1\n", b"https 2\n", TxnOutcome.FAILED, at=AT + dt.timedelta(1)
    )
    assert edited(journal, driver, b"https 1\ndata_dir = /srv/new\n")  # the admin's repair
    assert not edited(journal, driver, b"https 1\n")  # as it found it
    assert not edited(journal, driver, b"https 2\n")  # as it left it
    # One that failed after it found the config edited: the file it wrote holds the edit only
    # where the driver's render carries it.
    journalled(
        journal,
        "r3",
        b"https 2\n# hand\n",
        b"https 3\n",
        TxnOutcome.FAILED,
        at=AT + dt.timedelta(2),
    )
    assert edited(journal, driver, b"https 2\n# hand\n")
    assert edited(journal, driver, b"https 3\n") is carried
    journal.close()


def test_the_changes_after_the_switch_are_those_journalled_after_it_whatever_the_clock(
    tmp_path: Path,
) -> None:
    """Review L4: the changes after the switch were read by their wall-clock start: a
    rotate-cert begun after it, stamped earlier (the clock stepped back), was not among them,
    and the config it wrote was called edited."""
    driver = template_driver(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite3")
    journalled(journal, "r1", b"http\n", b"https 1\n", TxnOutcome.COMPLETED, source=("http",))
    back = AT - dt.timedelta(minutes=5)
    journalled(journal, "r2", b"https 1\n", b"https 2\n", TxnOutcome.COMPLETED, at=back)
    assert not edited(journal, driver, b"https 2\n")
    assert edited(journal, driver, b"https 1\n")  # what r2 replaced: not what tlsroll left
    journal.close()


class Still(Driver):
    """A managed server on https that never changes (what the planning question reads)."""

    name = "still"

    def __init__(self, config_file: Path) -> None:
        self.config_file = config_file

    def facts(self) -> ServerFacts:
        return ServerFacts("127.0.0.1", "/app/", 8080, 8443, HTTPS)

    def render(self, target: Target) -> bytes:
        raise AssertionError("the planning question renders nothing")

    async def restart(self) -> None:
        raise AssertionError("the planning question restarts nothing")

    async def status(self) -> dict[str, Any]:
        return {"frozen": False, "watermark": 0}

    async def freeze(self, drain_timeout: float) -> int:
        raise AssertionError("the planning question freezes nothing")

    async def unfreeze(self) -> None:
        raise AssertionError("the planning question unfreezes nothing")


async def test_only_the_way_backs_planning_question_reads_the_journal_for_edits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review L1: every planning question (``Check``) and every preflight read the journal
    twice and the config for the way back's question, whatever the change, on a journal
    never pruned. Only a question that asks (``CheckRequest.want_edited_config``: the
    leader's plan of a way back to http) reads it now; another gets no answer to it."""
    journal = Journal(tmp_path / "journal.sqlite3")
    driver = Still(tmp_path / "server.toml")
    journalled(journal, "r1", b"http\n", b"https 1\n", TxnOutcome.COMPLETED, source=("http",))
    driver.config_file.write_bytes(b"https 1\n# by hand\n")
    agent = an_agent(tmp_path, journal, driver)
    asked: list[str] = []
    real = plans.edited_config

    def counted(*args: Any) -> str:
        asked.append("edited_config")
        return real(*args)

    monkeypatch.setattr(plans, "edited_config", counted)
    reply = await agent.check(agent_pb2.CheckRequest())
    assert reply.edited_config == "" and asked == []
    reply = await agent.check(agent_pb2.CheckRequest(want_edited_config=True))
    assert reply.edited_config == str(driver.config_file) and asked == ["edited_config"]
    journal.close()


async def test_the_leader_asks_for_edits_only_planning_a_way_back() -> None:
    """The question goes out only when asked (``observe(..., edits=True)``)."""
    ca = pki.CertificateAuthority.create()
    for edits in (False, True):
        pool = Asked()
        await observe(pool, ["s1", "s2"], ca.cert, edits=edits)  # type: ignore[arg-type]
        assert {r.want_edited_config for r in pool.requests.values()} == {edits}


class Recorder:
    """``Commands.observe``: whether each call asked for edited configs; nodes on https,
    bravo's config edited (said only when asked, as an agent does)."""

    def __init__(self) -> None:
        self.edits: list[bool] = []
        self.changes: list[Change | None] = []

    async def __call__(
        self,
        names: Sequence[str],
        *,
        warm: Collection[str],
        first: FirstSteps | None = None,
        edits: bool = False,
        way_back: bool = False,
        change: Change | None = None,
    ) -> dict[str, NodeObservation]:
        self.edits.append(edits)
        self.changes.append(change)
        return {
            n: NodeObservation(
                True,
                schemes=HTTPS,
                cert_from_ca=True,
                edited_config="/etc/praxis/server.toml" if edits and n == "bravo" else "",
            )
            for n in names
        }


async def test_only_a_plan_of_the_way_back_asks_the_agents_for_edited_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disable-tls plan (shown before the way back asks) asks, and names bravo; its start,
    which shows no plan (the agent decides what it keeps as its way back begins), and a plan
    of any other change do not ask."""
    leader_ = make_world(tmp_path, monkeypatch).boot()
    names = ["alpha", "bravo", "charlie"]
    settle(leader_.schema, rollout(leader_.schema, "e1", Change.ENABLE_TLS, names), set(names))
    recorder = Recorder()
    commands = leader_.commands
    commands.observe = recorder
    try:
        rotate = await commands.plan(RolloutRequest(Change.ROTATE_CERT, Scope.cluster()))
        assert rotate.edited_configs == ()
        back = RolloutRequest(Change.DISABLE_TLS, Scope.cluster(), undo_rollout_id="e1")
        planned = await commands.plan(back)
        assert planned.edited_configs == (("bravo", "/etc/praxis/server.toml"),)
        await commands.start(back, ADMIN)
        assert recorder.edits == [False, True, False]
        # Each question names the change planned: the agents say why their plans of it would
        # be refused (``CheckRequest.change``; session 71, reenrol).
        d = Change.DISABLE_TLS
        assert recorder.changes == [Change.ROTATE_CERT, d, d]
    finally:
        await leader_.stop()
