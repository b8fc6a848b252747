"""SIGTERM to an agent mid-switch: what ``systemctl restart tlsroll-agent`` (and an upgrade,
which restarts the agent at any time) does. SIGKILL is the fault tests' (test_switch's agent
killed after each phase); this is the graceful stop.

The agent sends itself SIGTERM right after journalling a phase (the test hook
``TLSROLL_AGENT_TEST_TERM_AFTER``). It stops as on any SIGTERM: the switch running then is
given ``TXN_GRACE_SECONDS`` to end (its next actions go on meanwhile), then cancelled; the
agent exits 0 within the unit's TimeoutStopSec (90 s), with no traceback. Then it is started
again (without the hooks), as systemd does: a switch that ended in the grace is ended, one that
was cancelled is resumed from the journal and ends as its rules say (here: completed), the
server unfrozen, taking writes, no acknowledged write lost. "No grace" (the hooks
``TLSROLL_AGENT_TEST_TXN_GRACE=0`` and ``TLSROLL_AGENT_TEST_TERM_HOLD``) stands for a switch
slower than the grace: the transaction waits, before its next action, until the stop cancels
it (without the hold, after ``restarted`` only the verify and the unfreeze were left, and they
could end the switch before the cancel came: review s41rev1 M4).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nodeagent.runtime import TXN_GRACE_ENV, TXN_GRACE_SECONDS, txn_grace
from nodeagent.transaction import TERM_ENV, TERM_HOLD_ENV
from tests.cluster import AdminTokenCluster, Cluster
from tests.conftest import next_loopback
from tests.nodeside import NodeFactory

UNIT_STOP_TIMEOUT = 90  # deploy/systemd/tlsroll-agent.service: TimeoutStopSec=90s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AdminTokenCluster(tmp_path_factory.mktemp("sigterm"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


@pytest.fixture
def make_node(cluster: Cluster, tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(cluster, tmp_path, "term")
    try:
        yield factory
    finally:
        factory.close()


@pytest.mark.parametrize("grace", ["grace", "no-grace"])
@pytest.mark.parametrize("phase", ["frozen", "config_written", "restarted"])
def test_an_agent_told_to_stop_mid_switch_stops_cleanly_and_the_switch_ends(
    make_node: NodeFactory, phase: str, grace: str
) -> None:
    env = {TERM_ENV: phase}
    if grace == "no-grace":
        env[TXN_GRACE_ENV] = "0"
        env[TERM_HOLD_ENV] = "1"
    node = make_node(env=env)
    assert node.agent is not None and node.agent.proc is not None
    rid = f"term-{phase.replace('_', '-')}-{grace}"
    acked = node.post("http", {"note": "before"}).json()
    staged = node.stage(rid)
    try:
        node.switch(rid)
    except grpc.RpcError as exc:  # the agent may stop before its answer is out
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    code = node.agent.proc.wait(UNIT_STOP_TIMEOUT)
    output = node.agent.log_text()
    assert code == 0, output
    assert "Traceback" not in output, output
    names = node.agent.event_names()
    assert names.count("agent.stopping") == 1 and names.count("agent.stopped") == 1, names
    [row] = node.journal_query("SELECT phase, outcome FROM txns WHERE rollout_id = ?", rid)
    if grace == "grace":  # the switch ended within the grace, before the agent exited
        assert (row["phase"], row["outcome"]) == ("completed", "completed"), row
    else:  # cancelled where it was: left for the next start
        assert row["outcome"] == "", row

    node.restart_agent()  # as systemd does, without the hooks
    done = node.wait_txn(rid)
    assert done.outcome == "completed", done.reason
    resumed = [e for e in node.agent.log_events() if e.get("event") == "txn.resuming"]
    assert len(resumed) == (0 if grace == "grace" else 1), resumed
    assert node.served_fingerprint() == staged.fingerprint
    status = node.admin_status()
    assert (status["listen"], status["frozen"]) == (["https"], False)
    assert node.get("https", f"entries/{acked['id']}").status == 200
    assert node.post("https", {"note": "after"}).status == 201
    assert "Traceback" not in node.agent.log_text()


@pytest.mark.parametrize(
    ("raw", "grace"),
    [
        ("0", 0.0),
        ("-5", 0.0),
        ("7.5", 7.5),
        ("1e9", TXN_GRACE_SECONDS),
        ("inf", TXN_GRACE_SECONDS),
        ("nan", TXN_GRACE_SECONDS),
        ("soon", TXN_GRACE_SECONDS),
    ],
)
def test_the_grace_hook_stays_within_the_grace(
    monkeypatch: pytest.MonkeyPatch, raw: str, grace: float
) -> None:
    """Review s41rev1, Lows: the test hook's grace was unbounded above (1e9: an agent that
    outlives the unit's stop timeout and is SIGKILLed); now within [0, TXN_GRACE_SECONDS]."""
    monkeypatch.setenv(TXN_GRACE_ENV, raw)
    assert txn_grace() == grace
