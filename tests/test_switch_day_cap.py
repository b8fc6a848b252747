"""Review s64 M3 end to end: on switch day every PC of the practice enrols again at its server,
and the hourly cap of workstation certificates per node (a brake on a stolen agent key) cut
off the 31st PC at one server with "409 sign_failed" and no time to try again, and nothing in
`schema show`. The cap is leader.toml's ``workstation_certs_per_hour`` now (default 100); a PC
over it is answered 429 with Retry-After and told when to try again, and the refusal shows
with the node's bootstrap failures. Real leader, agent and reference server on loopback
addresses, the real CLI."""

from __future__ import annotations

import re
from pathlib import Path

from tests.cluster import one_line_error
from tests.test_password_rollout import PW1, World, secret_file
from tlsroll.enums import CAP_SOURCE


def test_the_pc_over_the_hourly_cap_is_told_when_to_try_again(tmp_path: Path) -> None:
    w = World(tmp_path, nodes=1)
    try:
        w.cluster.init("--node-name", "node1")
        w.cluster.write_leader_config({"workstation_certs_per_hour": 2})
        w.cluster.start_leader()
        node = w.nodes[0]
        node.start()
        w.cluster.wait_for_nodes_online([node.name])
        pw1 = secret_file(tmp_path / "pw1", PW1)
        assert w.run_rollout("--password-file", str(pw1))["state"] == "completed"
        for pc in ("pc1", "pc2"):
            ok = w.test_connection(node.https_url(), pw1, tmp_path / pc)
            assert ok.returncode == 0, ok.stdout + ok.stderr

        # The third PC within the hour: refused (exit 11), with when to try again by this
        # PC's clock, and nothing kept.
        over = w.test_connection(node.https_url(), pw1, tmp_path / "pc3")
        assert over.returncode == 11, over.stdout + over.stderr
        line = one_line_error(over.stderr, "tlsroll")
        assert "has no certificate signed for this PC now" in line, line
        assert "at most 2: workstation_certs_per_hour in leader.toml" in line, line
        assert re.search(r"; try again after \d\d:\d\d$", line), line
        assert not (tmp_path / "pc3" / "client.key").exists()

        # The node answered 429 with Retry-After (the oldest issue counted + 1 h), and said
        # so in its log; the leader kept the refusal with the node's bootstrap failures.
        assert node.agent is not None
        said = [e for e in node.agent.log_events() if e["event"] == "bootstrap.finish_refused"]
        assert [(e["reason"], e["status"]) for e in said] == [("sign_failed", 429)], said
        assert 0 < said[0]["retry_after"] <= 3600, said  # (the first PC's issue + 1 h)
        data = w.schema()
        capped = [f for f in data["bootstrap_failures"] if f["source"] == CAP_SOURCE]
        assert len(capped) == 1, data["bootstrap_failures"]
        assert capped[0]["node"] == "node1" and capped[0]["workstation"] == "ws-pc3", capped
        assert capped[0]["count"] == 1, capped
        shown = w.cli("schema", "show")
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        assert f"{CAP_SOURCE}: PCs refused a certificate" in text, text
        assert "ws-pc3" in text, text
        assert PW1 not in w.cluster.logs_text() + "".join(w.outputs)
    finally:
        w.close()
