"""Stage files of superseded certificates (review rev58a L11): a node keeps in
``tlsroll-tls/<rollout>/`` what each rollout staged (key, certificate, CA, the password's
verifier file). The agent removed only directories its journal knew nothing of, and the
journal knows every rollout ever run: after ten rollouts five directories were left per node,
each with the private key of a certificate superseded (and as a rule revoked) since.

Now a node keeps only what is needed: what is live, what a stage or transaction not finished
needs, and what the rollback of the newest switch restores until its rollout ends (the leader
rolls a switch back when its confirm's outside check fails). The rest goes when a transaction
ends on the node, and when the leader says (``ended_stages``) that the rollout whose way back
the agent kept has ended. Real leader, agents and reference servers (``cluster_of``)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from tests.cluster import LEADER_POLL, wait_until
from tests.nodeside import Node, cluster_of, read_only
from tests.test_rollback_reach import password_file, phase_1_awaiting
from tlsroll import pki

LONG = 240  # seconds a CLI call with --wait may take
CERT = ("server.key", "server.pem", "ca.pem")
REMOVALS = ("stage.removed", "stage.files_removed")


def stage_files(node: Node) -> set[str]:
    """Every file in the node's stage directories, as ``<rollout>/<name>``."""
    root = node.config_dir / "tlsroll-tls"
    if not root.exists():
        return set()
    return {f"{d.name}/{f.name}" for d in root.iterdir() for f in d.iterdir()}


def holding(node: Node, files: set[str]) -> Callable[[], bool]:
    """Whether the node's stage files are ``files`` now (a wait's condition)."""
    return lambda: stage_files(node) == files


def live_files(node: Node) -> list[str]:
    """The files the node's journal holds live (``live_tls``)."""
    with sqlite3.connect(node.journal_path) as db:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'live_tls'").fetchone()
    live: dict[str, str] = json.loads(value)
    return [v for k, v in live.items() if k.endswith("_file") and v]


def test_superseded_stage_files_go_and_the_way_back_still_works(tmp_path: Path) -> None:
    """A transitional enable-tls (its password's verifier file staged beside its key),
    finalized, then two rotations: once the last has ended, each node keeps exactly the
    files its server reads (the last rotation's key, certificate and CA, and the verifier
    file the first switch put beside its own key); no key of a superseded certificate is
    left. Each removal is logged, with no secret. The way back to http (``rollout
    rollback``) still works after the sweep, and leaves no stage file behind."""
    with cluster_of(tmp_path, 2) as (cluster, nodes):
        phase1 = phase_1_awaiting(cluster, tmp_path)
        for node in nodes:  # the transitional switch's way back is still open: all kept
            assert stage_files(node) == {
                *(f"{phase1}/{f}" for f in CERT),
                f"{phase1}/auth-verifier.json",
            }
        done = cluster.cli(
            "rollout", "finalize", phase1, "--force", "--yes", "--wait", timeout=LONG
        )
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(
            lambda: cluster.schema_json(phase1)["rollouts"][0]["state"] == "completed",
            LONG,
            "phase 1 finalized",
            LEADER_POLL,
        )
        rotations = []
        for _ in range(2):
            rotate = cluster.cli(
                *("rollout", "start", "--change", "rotate-cert", "--scope", "cluster"),
                *("--yes", "--wait"),
                timeout=LONG,
            )
            assert rotate.returncode == 0, rotate.stdout + rotate.stderr
            rollout = cluster.newest_rollout()
            assert rollout["change"] == "rotate-cert" and rollout["state"] == "completed"
            rotations.append(str(rollout["id"]))
        last = rotations[-1]
        wanted = {
            f"{phase1}/auth-verifier.json",
            f"{phase1}/ca.pem",  # (the way back to http checks a return to https with it)
            *(f"{last}/{f}" for f in CERT),
        }
        for node in nodes:
            wait_until(holding(node, wanted), 30, f"{node.name} keeping what is live", LEADER_POLL)
            root = node.config_dir / "tlsroll-tls"
            live = {Path(f).relative_to(root).as_posix() for f in live_files(node)}
            assert live == wanted - {f"{phase1}/ca.pem"}
            served = pki.load_cert_pem((node.stage_dir(last) / "server.pem").read_bytes())
            assert node.served_fingerprint() == pki.fingerprint(served)
            assert node.agent is not None
            removed = {
                (e["event"], e.get("rollout_id"))
                for e in node.agent.log_events()
                if e["event"] in REMOVALS
            }
            assert removed == {
                ("stage.files_removed", phase1),
                ("stage.removed", rotations[0]),
            }, removed
            text = node.agent.log_text()
            assert "PRIVATE KEY" not in text
            assert password_file(tmp_path).read_text().strip() not in text

        # The way back to http still works after the sweep, and leaves nothing staged.
        back = cluster.cli("rollout", "rollback", "--yes")
        assert back.returncode == 0, back.stdout + back.stderr
        wait_until(
            lambda: cluster.poll_newest_rollout()["state"] in ("completed", "halted", "aborted"),
            LONG,
            "the way back",
            LEADER_POLL,
        )
        way_back = cluster.newest_rollout()
        assert way_back["change"] == "disable-tls" and way_back["undoes"] == phase1
        assert way_back["state"] == "completed", way_back
        for node in nodes:
            assert node.server.status()["listen"] == ["http"]
            assert node.get("http").status == 200
            wait_until(holding(node, set()), 30, f"{node.name} keeping no file", LEADER_POLL)


def test_a_sweep_that_failed_after_the_rollout_ended_is_tried_again(tmp_path: Path) -> None:
    """Review of s59 L5: when the leader says the rollout of the newest switch has ended, the
    journal closes that way back once (``Journal.end_way_back``) and the heartbeat names it
    no more, so the leader never says it again; a sweep that failed then was tried again only
    at the next transaction's end or the agent's next start, the superseded key left on the
    node meanwhile. The agent now tries again by itself, after a backoff. The failure is a
    real one: the first switch's stage directory is a read-only bind mount of itself (root),
    so that removing its key and certificate fails (EROFS); once the mount is gone, the
    retry removes them, with no transaction and no restart in between."""
    with cluster_of(tmp_path, 1) as (cluster, nodes):
        [node] = nodes
        agent = node.agent
        assert agent is not None
        first = cluster.cli(
            *("rollout", "start", "--scope", "cluster", "--yes", "--wait"),
            *("--password-file", str(password_file(tmp_path))),
            timeout=LONG,
        )
        assert first.returncode == 0, first.stdout + first.stderr
        switch = str(cluster.newest_rollout()["id"])
        directory = node.stage_dir(switch)
        assert (directory / "server.key").exists()
        with read_only(directory):
            rotate = cluster.cli(
                *("rollout", "start", "--change", "rotate-cert", "--scope", "cluster"),
                *("--yes", "--wait"),
                timeout=LONG,
            )
            assert rotate.returncode == 0, rotate.stdout + rotate.stderr
            rotation = cluster.newest_rollout()
            assert rotation["change"] == "rotate-cert" and rotation["state"] == "completed"
            # The rotation's end: its way back restores the first switch's files, kept. Once
            # the leader says the rotation ended, they go: refused by the read-only mount.
            wait_until(
                lambda: "stage.remove_failed" in agent.event_names(),
                30,
                "the sweep after the rollout's end to fail",
                LEADER_POLL,
            )
            assert (directory / "server.key").exists()
        begun, pid = agent.event_names().count("txn.started"), agent.pid
        wait_until(lambda: not (directory / "server.key").exists(), 30, "the retry", LEADER_POLL)
        assert not (directory / "server.pem").exists()
        assert (directory / "ca.pem").exists()  # (the way back to http checks with it)
        events = agent.log_events()
        names = [e["event"] for e in events]
        assert "stage.sweep_again" in names
        failed = names.index("stage.remove_failed")
        assert "stage.files_removed" in names[failed:], names[failed:]
        removed = [e for e in events if e["event"] == "stage.files_removed"]
        assert removed[-1]["rollout_id"] == switch, removed
        assert sorted(removed[-1]["files"]) == ["server.key", "server.pem"], removed
        assert agent.event_names().count("txn.started") == begun  # no transaction did it
        assert agent.pid == pid  # nor a start
        assert "PRIVATE KEY" not in agent.log_text()
