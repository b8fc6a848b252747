"""The shape of what makes tlsroll cheap to run (issue 15), without timing anything: which
modules a running agent holds, what the leader does per heartbeat, what ``schema show`` draws.
The figures themselves come from ``bench/`` (``make bench-rollout``, ``make bench-agents``).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from leader.observe import OBSERVE_AT_ONCE, observe
from leader.planner import NodesOffline, Unreachable
from tests.cluster import Cluster, child_env
from tests.refserver_helper import write_toml
from tlsroll import pki
from tlsroll.defaults import AGENT_PORT
from tlsroll.v1 import agent_pb2

# Never in a running agent: a terminal UI (rich, and pygments through it), the admin CLI's
# libraries, the other roles.
NOT_IN_AGENT = {"rich", "pygments", "click", "jinja2", "zxcvbn", "prometheus_client"}
OTHER_ROLES = {"leader", "workstation", "refserver"}

# Runs the real agent daemon (``nodeagent.daemon.main``, as the tlsroll-agent script does) and,
# once its NodeAgent port answers, writes the modules the process holds and stops it (SIGTERM,
# the graceful stop). Only the standard library is imported besides the daemon itself.
HARNESS = """
import os, signal, socket, sys, threading, time
address, port, out, config = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def watch():
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), 0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    time.sleep(1.0)  # a heartbeat and the bootstrap service's first sync
    loaded = sorted(name for name, module in list(sys.modules.items()) if module is not None)
    with open(out, "w") as f:
        f.write("\\n".join(loaded))
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
from nodeagent.daemon import main
sys.exit(main(["--config", config]))
"""


def test_the_running_agent_holds_no_terminal_ui_nor_cli_libraries(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        cluster.start_leader()
        address = loopback()
        token = cluster.create_token("lean1", address)
        config = write_toml(
            tmp_path / "agent.toml",
            cluster.agent_config("lean1", address, token, tmp_path / "agent"),
        )
        out = tmp_path / "modules.txt"
        done = subprocess.run(
            [sys.executable, "-c", HARNESS, address, str(AGENT_PORT), str(out), str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "agent.started" in done.stderr, done.stderr
        modules = out.read_text().split()
    tops = {m.split(".")[0] for m in modules}
    assert "nodeagent" in tops and "grpc" in tops  # it did run
    assert tops & NOT_IN_AGENT == set()
    assert tops & OTHER_ROLES == set()


# --- the leader at 500 nodes -------------------------------------------------------------------


def test_a_refusal_naming_hundreds_of_nodes_stays_short() -> None:
    """500 unreachable agents once made a message of 14 KiB, over gRPC's 16 KiB limit for a
    status with its framing: the admin saw "Stream removed", not why."""
    errors = {f"s{i:03d}": f"agent s{i:03d}: connection attempt timed out" for i in range(500)}
    text = str(Unreachable(errors))
    assert len(text) < 2000
    assert "s000" in text and "and 490 more" in text
    offline = str(NodesOffline([f"s{i:03d}" for i in range(500)]))
    assert len(offline) < 500 and "and 490 more" in offline


class CountingAgents:
    """Agents that answer GetStatus after a moment, counting how many calls are open at once."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0

    async def get(self, name: str) -> CountingAgents:
        return self

    async def close(self) -> None:
        return None

    async def get_status(self, request: object, timeout: float = 0) -> agent_pb2.NodeStatus:
        self.open += 1
        self.most = max(self.most, self.open)
        await asyncio.sleep(0.01)
        self.open -= 1
        view = agent_pb2.ServerView(driver="none", healthy=False, detail="bench")
        return agent_pb2.NodeStatus(server=view)


async def test_observe_asks_a_bounded_number_of_agents_at_once() -> None:
    """Every first call opens a TLS connection: 500 at once timed out by the hundred."""
    agents = CountingAgents()
    ca = pki.CertificateAuthority.create()
    seen = await observe(agents, [f"s{i:03d}" for i in range(200)], ca.cert)  # type: ignore[arg-type]
    assert len(seen) == 200
    assert agents.most <= OBSERVE_AT_ONCE
