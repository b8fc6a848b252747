"""install.sh and upgrades (audit s40upg M1, M2, M4, L5).

* M1: a store written by a newer tlsroll (the leader's store, the agent's journal: its schema,
  ``PRAGMA user_version``, above what this tlsroll knows) is refused before anything is built,
  in one line, nothing changed; the schema is read without writing anything (no ``-wal`` or
  ``-shm`` made beside a stopped daemon's store, which the leader, user tlsroll, could then not
  open), also from a ``-wal`` that holds a newer first page than the file. Every unit is
  restarted even if another one fails to be (each failure reported, exit 1), and the version
  line says "downgraded" when the version went down.
* M2: the leader may be restarted while a rollout awaits finalize, is paused with no node on
  its way, or is a finalize --when-quiet waiting for quiet nodes; every rollout not ended is
  looked at, not only the newest (a halted one newer than a paused one with a node on its way
  let it pass).
* M4: --restart-later holds back only the leader; the agent is restarted at once.
* L5: the check is made again after the build, just before the swap.

Cheap where it can be: ``install.sh --check-only`` runs the real checks and stops before the
build, against a real leader (``tests.cluster``) whose store holds the rollouts, and a stand-in
for the installed venv (/opt/tlsroll: wrappers around this checkout's code). Two tests run a
real build (the bundle, as tests/test_deploy.py does). Like test_deploy's, these need root.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import leader.db
import nodeagent.journal
from tests import test_deploy
from tests.cluster import Cluster
from tests.conftest import next_loopback
from tests.test_deploy import INSTALL_SH, SERVER_PATH, ThrowawayRoot, server_python
from tlsroll.sqlite import Database

# test_deploy's fixtures: a throwaway root, and the release bundle (built once per run).
throwaway = test_deploy.throwaway
bundle = test_deploy.bundle

ROOT = Path(__file__).resolve().parent.parent
INSTALL = shlex.quote(str(INSTALL_SH))
BUILD_TIMEOUT = 300


def test_install_sh_knows_the_schemas_of_this_tlsroll() -> None:
    """install.sh's KNOWN_SCHEMAS is what this tlsroll's migrations make: a migration
    added without raising it there would make install.sh refuse the stores its own daemons
    wrote once they migrated them."""
    found = re.search(r'^KNOWN_SCHEMAS="([^"]*)"', INSTALL_SH.read_text(), re.S | re.M)
    assert found is not None
    known = {line.split()[0]: line.split()[1] for line in found.group(1).splitlines()}
    assert known == {
        "leader.sqlite3": str(len(leader.db.MIGRATIONS)),
        "journal.sqlite3": str(len(nodeagent.journal.MIGRATIONS)),
    }


# --- stand-ins: the installed venv and systemctl ---------------------------------------------

FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl as install.sh uses it: a unit is active while /var/lib/fake-systemd/UNIT exists
# (in the state that file holds, if any: "activating"); one whose later-UNIT exists is inactive
# at the first look and active from then on (started meanwhile); try-restart or start UNIT
# fails while /var/lib/fake-systemd/fail-UNIT exists, and a blocking start of one that is
# "activating" fails too (systemd waits for all of its start, an agent that cannot reach its
# leader yet: minutes, then says it failed); every call is logged, and in calls-at with which
# /opt/tlsroll it met ("old": the one fake_venv made).
mkdir -p /var/lib/fake-systemd
echo "$*" >>/var/lib/fake-systemd/calls
if [ -e /opt/tlsroll/FAKE-OLD ]; then at=old; else at=new; fi
echo "$* $at" >>/var/lib/fake-systemd/calls-at
case "$1" in
    is-active)
        unit=$2 say=echo
        if [ "$unit" = --quiet ]; then unit=$3 say=:; fi
        if [ -e "/var/lib/fake-systemd/later-$unit" ]; then
            mv "/var/lib/fake-systemd/later-$unit" "/var/lib/fake-systemd/$unit"
            $say inactive
            exit 3
        fi
        state=$(cat "/var/lib/fake-systemd/$unit" 2>/dev/null) || state=inactive
        $say "${state:-active}"
        [ "${state:-active}" = active ] ;;
    start)
        if [ "$2" = --no-block ]; then exit 0; fi
        [ ! -e "/var/lib/fake-systemd/fail-$2" ] || exit 1
        [ "$(cat "/var/lib/fake-systemd/$2" 2>/dev/null)" != activating ] ;;
    try-restart) [ ! -e "/var/lib/fake-systemd/fail-$2" ] ;;
    *) exit 0 ;;
esac
"""


def restart_calls(throwaway: ThrowawayRoot) -> list[str]:
    """The stand-in systemctl's stop, start and try-restart calls, each with the /opt/tlsroll
    it met ("old" or "new")."""
    calls = throwaway.ok("cat /var/lib/fake-systemd/calls-at").splitlines()
    return [c for c in calls if c.split()[0] in {"stop", "start", "try-restart"}]


def fake_systemd(throwaway: ThrowawayRoot, *active: str, failing: str = "") -> None:
    """systemd "runs" (/run/systemd/system), with the stand-in systemctl; ``active`` units
    are active, ``failing`` fails to restart."""
    marks = " ".join(f"/var/lib/fake-systemd/{u}.service" for u in active)
    fail = f"/var/lib/fake-systemd/fail-{failing}.service" if failing else ""
    throwaway.ok(
        "mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/system && "
        f"cat >/usr/local/sbin/systemctl <<'EOF'\n{FAKE_SYSTEMCTL}EOF\n"
        "chmod 0755 /usr/local/sbin/systemctl && mkdir -p /var/lib/fake-systemd && "
        f"touch /var/lib/fake-systemd/calls {marks} {fail}"
    )


def fake_venv(
    throwaway: ThrowawayRoot, cluster: Cluster, tmp_path: Path, version: str = ""
) -> None:
    """/opt/tlsroll as an earlier install left it, run by this checkout's code: its tlsroll
    asks ``cluster``'s leader; ``version``: what it says it is (else this checkout's)."""
    path = str(ROOT)
    if version:
        dist = tmp_path / "olddist" / f"tlsroll-{version}.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: tlsroll\nVersion: {version}\n"
        )
        path = f"{dist.parent}:{path}"
    env = f"PYTHONPATH={shlex.quote(path)}"
    python = shlex.quote(sys.executable)
    data = shlex.quote(str(cluster.data_dir))
    throwaway.ok(
        "mkdir -p /opt/tlsroll/bin && touch /opt/tlsroll/installed-files /opt/tlsroll/FAKE-OLD && "
        f"printf '#!/bin/sh\\nexec env {env} {python} \"$@\"\\n' >/opt/tlsroll/bin/python && "
        f"printf '#!/bin/sh\\nexec env {env} TLSROLL_DATA_DIR={data} {python} -m tlsroll \"$@\"\\n'"
        " >/opt/tlsroll/bin/tlsroll && chmod 0755 /opt/tlsroll/bin/python /opt/tlsroll/bin/tlsroll"
    )


# --- rollouts in the leader's store, as the leader keeps them --------------------------------


def put_rollout(
    cluster: Cluster,
    rollout_id: str,
    epoch: int,
    state: str,
    nodes: Mapping[str, str],
    *,
    change: str = "enable-tls",
    strategy: str = "direct",
    finalizes: str = "",
    when_quiet: int = 0,
) -> None:
    """With the leader stopped: a rollout in ``state`` with ``nodes`` (name: state)."""
    db = sqlite3.connect(cluster.store_path)
    try:
        with db:
            db.execute(
                "INSERT INTO rollouts (id, change, scope_kind, scope_names, node_order, strategy,"
                " max_parallel, failure_budget, freeze, epoch, state, created_at, started_by,"
                " leader_node, finalizes, when_quiet) VALUES (?, ?, 'nodes', ?, ?, ?, 1, 0,"
                " 'node', ?, ?, '2026-12-02T11:00:00+00:00', 'test', 'srv1', ?, ?)",
                (
                    rollout_id,
                    change,
                    f"{list(nodes)}".replace("'", '"'),
                    f"{list(nodes)}".replace("'", '"'),
                    strategy,
                    epoch,
                    state,
                    finalizes,
                    when_quiet,
                ),
            )
            db.executemany(
                "INSERT INTO rollout_nodes (rollout_id, name, state) VALUES (?, ?, ?)",
                [(rollout_id, name, s) for name, s in nodes.items()],
            )
    finally:
        db.close()


def clear_rollouts(cluster: Cluster) -> None:
    db = sqlite3.connect(cluster.store_path)
    try:
        with db:
            db.execute("DELETE FROM rollout_nodes")
            db.execute("DELETE FROM rollouts")
    finally:
        db.close()


def rollouts_now(cluster: Cluster, *rollouts: dict[str, object]) -> None:
    """The leader restarted over exactly ``rollouts`` (``put_rollout``'s arguments)."""
    cluster.stop_leader()
    clear_rollouts(cluster)
    for r in rollouts:
        put_rollout(cluster, **r)  # type: ignore[arg-type]
    cluster.start_leader()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace (CI runs `make test` as root)")
    with Cluster(tmp_path / "cluster", next_loopback()) as c:
        c.init("--node-name", "srv1")
        c.start_leader()
        yield c


def check_only(throwaway: ThrowawayRoot, args: str = "") -> subprocess.CompletedProcess[str]:
    script = f"{INSTALL} leader {server_python()} --check-only {args}"
    result = throwaway.run(script, network=True)
    assert "Traceback" not in result.stderr, result.stderr
    assert not re.search(r"line \d+", result.stderr), result.stderr
    return result


PASSES = (
    "install.sh: the checks pass: a run now would install and restart tlsroll-leader, "
    "tlsroll-agent; nothing changed (--check-only)"
)
SAFE = ": the leader's restart is safe there (it goes on where it was)"
IN_ITS_COURSE = ": an upgrade now would restart tlsroll-leader in its course; nothing changed."


# --- M1: a store newer than this tlsroll ------------------------------------------------------


def test_a_store_newer_than_this_tlsroll_is_refused_before_anything_is_built(
    throwaway: ThrowawayRoot, tmp_path: Path
) -> None:
    """An older bundle's install.sh run over a newer install swapped the venv and restarted;
    the old daemons then exited 3 (schema too new) with the older version in place. Now the
    stores' schemas are read first, read-only, and a newer one refused: one line, nothing
    changed, not even a -wal or -shm beside a stopped daemon's store."""
    known_leader, known_journal = len(leader.db.MIGRATIONS), len(nodeagent.journal.MIGRATIONS)
    store = tmp_path / "leader.sqlite3"
    leader.db.open_db(store).close()
    with sqlite3.connect(store) as db:
        db.execute(f"PRAGMA user_version={known_leader + 1}")
        # A migration an older tlsroll may not ignore: the newer one records no floor.
        db.execute("DROP TABLE IF EXISTS schema_floor")
    db.close()
    agent_data = tmp_path / "agent"
    agent_data.mkdir()
    journal = agent_data / "journal.sqlite3"
    Database(journal, nodeagent.journal.MIGRATIONS, what="journal").close()
    throwaway.ok(
        f"install -d -m 0750 /var/lib/tlsroll && cp {store} /var/lib/tlsroll/leader.sqlite3 && "
        "mkdir -p /etc/tlsroll && printf '[agent]\\ndata_dir = \"%s\"\\n' "
        f"{shlex.quote(str(agent_data))} >/etc/tlsroll/agent.toml"
    )
    before = sorted(throwaway.changed())
    python = server_python()

    result = throwaway.run(f"{INSTALL} agent {python}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"install.sh: /var/lib/tlsroll/leader.sqlite3 has schema {known_leader + 1}, this "
        f"tlsroll knows {known_leader}: a newer tlsroll wrote it, and this one's daemons would "
        "refuse it; keep the newer version or see README 'Downgrading tlsroll'; nothing changed"
    ), result.stderr
    assert sorted(throwaway.changed()) == before  # no -wal, no -shm, no venv
    assert sorted(p.name for p in agent_data.iterdir()) == ["journal.sqlite3"]

    # The journal of a running agent: its newest first page is in the -wal, not the file.
    throwaway.ok(
        "python3 -c 'import sqlite3, sys; db = sqlite3.connect(sys.argv[1]);"
        f' db.execute("PRAGMA user_version={known_leader}"); db.commit()\''
        " /var/lib/tlsroll/leader.sqlite3"
    )
    before = sorted(throwaway.changed())
    running = sqlite3.connect(journal, isolation_level=None)
    try:
        running.execute("PRAGMA journal_mode=WAL")
        running.execute("PRAGMA wal_autocheckpoint=0")
        running.execute(f"PRAGMA user_version={known_journal + 1}")
        header = journal.read_bytes()[60:64]
        assert int.from_bytes(header, "big") == known_journal  # only the -wal says newer
        result = throwaway.run(f"{INSTALL} agent {python}")
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"install.sh: {journal} has schema {known_journal + 1}, this tlsroll knows "
            f"{known_journal}: a newer tlsroll wrote it, and this one's daemons would refuse "
            "it; keep the newer version or see README 'Downgrading tlsroll'; nothing changed"
        ), result.stderr

        # Both at what this tlsroll knows: the checks pass.
        running.execute(f"PRAGMA user_version={known_journal}")
        result = throwaway.run(f"{INSTALL} agent {python} --check-only")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[-1] == (
            "install.sh: the checks pass: a run now would install (no tlsroll daemon runs "
            "here); nothing changed (--check-only)"
        ), result.stdout
    finally:
        running.close()
    assert sorted(throwaway.changed()) == before

    # A newer store whose newer migrations this tlsroll may ignore (the schema_floor table
    # tlsroll/sqlite.py writes says so: readable_by): its daemons read it as it is, so it is
    # not refused; one whose readable_by is newer is, and one that is not exactly one integer
    # row (review s40 M1: the daemons refuse it, tlsroll/sqlite.py's readable_by; MAX() of two
    # rows passed here).
    for floor, refused in (
        (f"{known_leader}", False),
        (f"{known_leader + 1}", True),
        (f"1), ({known_leader}", True),
    ):
        throwaway.ok(
            "python3 -c 'import sqlite3, sys; db = sqlite3.connect(sys.argv[1]);"  # noqa: S608
            ' db.execute("CREATE TABLE IF NOT EXISTS schema_floor (readable_by INTEGER NOT NULL)");'
            ' db.execute("DELETE FROM schema_floor");'
            f' db.execute("INSERT INTO schema_floor VALUES ({floor})");'
            f' db.execute("PRAGMA user_version={known_leader + 1}"); db.commit(); db.close()\''
            " /var/lib/tlsroll/leader.sqlite3"
        )
        before = sorted(throwaway.changed())
        result = throwaway.run(f"{INSTALL} agent {python} --check-only")
        assert result.returncode == (1 if refused else 0), result.stdout + result.stderr
        if refused:
            assert f"has schema {known_leader + 1}, this tlsroll knows" in result.stderr
        assert sorted(throwaway.changed()) == before  # read as an immutable file: no -wal


# --- M2: which rollouts keep the leader from being restarted ----------------------------------


def test_the_leader_may_be_restarted_unless_a_node_of_a_rollout_is_on_its_way(
    throwaway: ThrowawayRoot, cluster: Cluster, tmp_path: Path
) -> None:
    """Only completed, halted or aborted rollouts let an upgrade restart the leader, and only
    the newest by epoch was looked at: awaiting finalize (which may last days), paused, or a
    finalize --when-quiet waiting were refused though the leader's restart is safe there (it
    goes on where it was: test_transitional restarts it between the phases), and with
    --restart-later `rollout finalize` was refused until the restart it put off. Now every
    rollout not ended is looked at, and only a node on its way keeps the leader running."""
    fake_venv(throwaway, cluster, tmp_path)
    fake_systemd(throwaway, "tlsroll-leader", "tlsroll-agent")

    result = check_only(throwaway)  # no rollout yet
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [PASSES], result.stdout

    rollouts_now(cluster, dict(rollout_id="r-paused", epoch=1, state="paused",
                               nodes={"n1": "done", "n2": "pending"}))  # fmt: skip
    result = check_only(throwaway)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"install.sh: rollout r-paused is paused with no node on its way{SAFE}",
        PASSES,
    ], result.stdout

    # Phase 1 awaits finalize; its finalize --when-quiet waits for quiet nodes.
    phase1 = dict(rollout_id="r-phase1", epoch=1, state="awaiting_finalize",
                  nodes={"n1": "dual", "n2": "dual"}, strategy="transitional")  # fmt: skip
    waiting = dict(rollout_id="r-final", epoch=2, state="running", change="finalize",
                   nodes={"n1": "pending", "n2": "pending"}, finalizes="r-phase1",
                   when_quiet=1800)  # fmt: skip
    rollouts_now(cluster, phase1, waiting)
    result = check_only(throwaway)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "install.sh: rollout r-final (finalize --when-quiet) waits for quiet nodes; "
        f"rollout r-phase1 awaits finalize{SAFE}",
        PASSES,
    ], result.stdout

    # A node on its way: refused, also when the newest rollout has ended (it was the one
    # looked at) and with the phase 1 it finalizes awaiting beside it.
    halted = dict(rollout_id="r-halted", epoch=3, state="halted", nodes={"n3": "failed"})
    on_its_way = dict(rollout_id="r-switching", epoch=2, state="paused",
                      nodes={"n1": "done", "n2": "switching"})  # fmt: skip
    rollouts_now(cluster, phase1 | {"epoch": 1}, on_its_way, halted)
    result = check_only(throwaway)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"install.sh: rollout r-switching is paused (n2 on its way){IN_ITS_COURSE} Wait until "
        "no node is on its way"
    ), result.stderr
    assert "--restart-later (the agent is restarted, the leader only once" in result.stderr

    # --restart-later: the agent restarted at once, only the leader held back (M4).
    result = check_only(throwaway, "--restart-later")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "install.sh: the checks pass: a run now would install and restart tlsroll-agent, not "
        "restarting tlsroll-leader (--restart-later); nothing changed (--check-only)"
    ], result.stdout

    # The agent alone runs here (an agent node): no leader to ask, the agent restarted.
    throwaway.ok("rm /var/lib/fake-systemd/tlsroll-leader.service")
    result = throwaway.run(f"{INSTALL} agent {server_python()} --check-only", network=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == (
        "install.sh: the checks pass: a run now would install and restart tlsroll-agent; "
        "nothing changed (--check-only)"
    ), result.stdout
    calls = throwaway.ok("cat /var/lib/fake-systemd/calls")
    assert "restart" not in calls, calls
    assert not [p for p in throwaway.changed() if p.startswith("/opt/tlsroll.")]


# --- real builds: every unit restarted (M1), and the check again before the swap (L5) ------


# As FAKE_SYSTEMCTL, and each stop notes whether /opt/tlsroll.old (the version before the
# installed one) is still there when the daemons stop.
NOTES_OLD_VENV_AT_STOP = FAKE_SYSTEMCTL.replace(
    'case "$1" in',
    'if [ "$1" = stop ] && [ -e /opt/tlsroll.old ]; then\n'
    '    echo "$2" >>/var/lib/fake-systemd/stopped-with-old-old\n'
    "fi\n"
    'case "$1" in',
)


@pytest.mark.timeout(600)
def test_every_unit_is_restarted_even_if_one_fails_and_a_downgrade_says_so(
    throwaway: ThrowawayRoot, cluster: Cluster, tmp_path: Path, bundle: Path
) -> None:
    """The restart loop stopped at the first failure: the leader node's agent was never
    restarted and ran old code over new files. And an older version said "upgraded". Review
    s46rt2 L2: restarted after the swap, the old agent finished its switch over the new files
    (its lazy imports, its children); now every daemon stops before the swap and starts after.
    Review s47rev2 L1: /opt/tlsroll.old (a whole venv) was deleted once they had stopped, in
    the outage; it goes before they stop."""
    version = (bundle / "BUNDLE").read_text().split("version=", 1)[1].split()[0]
    fake_venv(throwaway, cluster, tmp_path, version="99.0.0")
    fake_systemd(throwaway, "tlsroll-leader", "tlsroll-agent", failing="tlsroll-leader")
    throwaway.ok(
        f"cat >/usr/local/sbin/systemctl <<'EOF'\n{NOTES_OLD_VENV_AT_STOP}EOF\n"
        "mkdir /opt/tlsroll.old && touch /opt/tlsroll.old/OLD-OLD && "
        "install -d -m 0750 /var/lib/tlsroll && touch /var/lib/tlsroll/leader.toml"
    )
    install = shlex.quote(str(bundle / "install.sh"))
    result = throwaway.run(
        f"{install} leader --address 127.0.0.2 --node-name srv1 {server_python()}",
        BUILD_TIMEOUT,
        network=True,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == (
        f"install.sh: downgraded 99.0.0 -> {version}; restarted tlsroll-agent; failed to "
        "restart tlsroll-leader"
    ), result.stdout
    assert (
        "install.sh: systemctl start tlsroll-leader failed: see systemctl status "
        "tlsroll-leader" in result.stderr
    ), result.stderr
    calls = restart_calls(throwaway)
    assert calls == [
        "stop tlsroll-leader.service old",
        "stop tlsroll-agent.service old",
        "start tlsroll-leader.service new",
        "start tlsroll-agent.service new",
    ], calls
    assert throwaway.ok("/opt/tlsroll/bin/tlsroll --version").strip().endswith(version)
    stopped_with_it = throwaway.run("cat /var/lib/fake-systemd/stopped-with-old-old").stdout
    assert stopped_with_it == "", stopped_with_it  # /opt/tlsroll.old was gone at each stop
    throwaway.ok("test -e /opt/tlsroll.old/FAKE-OLD")  # now the version it replaced


# As FAKE_SYSTEMCTL, but the run is cut short (SIGHUP to install.sh: the admin's SSH session
# drops) while `systemctl stop tlsroll-agent` runs, the agent's long stop; the stop itself
# completes (PID 1 carries the job on).
HUP_ON_AGENT_STOP = FAKE_SYSTEMCTL.replace(
    'case "$1" in',
    'if [ "$1 $2" = "stop tlsroll-agent.service" ]; then\n'
    "    kill -HUP $PPID\n"
    "    exit 0\n"
    "fi\n"
    'case "$1" in',
)


@pytest.mark.timeout(600)
def test_a_run_cut_short_while_a_daemon_stops_starts_it_again(
    throwaway: ThrowawayRoot, cluster: Cluster, tmp_path: Path, bundle: Path
) -> None:
    """Review s47rev2 M2: a unit counted as stopped only once its stop had returned, so a run
    cut short during the agent's stop (up to 60 s, with nothing printed) started the leader
    again on its way out but left the agent stopped. Now each is counted before its stop, and
    the run says what it stops."""
    fake_venv(throwaway, cluster, tmp_path, version="99.0.0")
    fake_systemd(throwaway, "tlsroll-leader", "tlsroll-agent")
    throwaway.ok(f"cat >/usr/local/sbin/systemctl <<'EOF'\n{HUP_ON_AGENT_STOP}EOF\n")
    throwaway.ok("install -d -m 0750 /var/lib/tlsroll && touch /var/lib/tlsroll/leader.toml")
    install = shlex.quote(str(bundle / "install.sh"))
    result = throwaway.run(
        f"{install} leader --address 127.0.0.2 --node-name srv1 {server_python()}",
        BUILD_TIMEOUT,
        network=True,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert (
        "install.sh: stopping tlsroll-leader, tlsroll-agent for the swap (an agent lets a "
        "switch under way end first: up to 60 s)" in result.stdout
    ), result.stdout
    calls = restart_calls(throwaway)
    assert calls == [
        "stop tlsroll-leader.service old",
        "stop tlsroll-agent.service old",
        "start tlsroll-leader.service old",  # the swap never came: the old version
        "start tlsroll-agent.service old",
    ], calls


@pytest.mark.timeout(600)
def test_a_daemon_started_during_the_build_or_starting_is_stopped_for_the_swap_too(
    throwaway: ThrowawayRoot, cluster: Cluster, tmp_path: Path, bundle: Path
) -> None:
    """Review s47rev2 L2: which daemons run was read once, at the start, minutes before the
    stop: one started meanwhile (here the leader, by hand) or one starting then ("activating":
    the agent waiting to be restarted after it failed) was neither stopped nor started and ran
    the old code over the new files. Now it is read again just before the stop, and a starting
    unit counts; it is started again without waiting for it (review s48rev4 M2: a blocking
    start waited for all of an agent's start, minutes while it cannot reach its leader, then
    counted it failed and the upgrade exited 1)."""
    version = (bundle / "BUNDLE").read_text().split("version=", 1)[1].split()[0]
    fake_venv(throwaway, cluster, tmp_path, version="99.0.0")
    fake_systemd(throwaway)
    throwaway.ok(
        "touch /var/lib/fake-systemd/later-tlsroll-leader.service && "
        "echo activating >/var/lib/fake-systemd/tlsroll-agent.service && "
        "install -d -m 0750 /var/lib/tlsroll && touch /var/lib/tlsroll/leader.toml"
    )
    install = shlex.quote(str(bundle / "install.sh"))
    result = throwaway.run(
        f"{install} leader --address 127.0.0.2 --node-name srv1 {server_python()}",
        BUILD_TIMEOUT,
        network=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = restart_calls(throwaway)
    assert calls == [
        "stop tlsroll-leader.service old",
        "stop tlsroll-agent.service old",
        "start tlsroll-leader.service new",
        "start --no-block tlsroll-agent.service new",
    ], calls
    assert result.stdout.splitlines()[-1] == (
        f"install.sh: downgraded 99.0.0 -> {version}; restarted tlsroll-leader, tlsroll-agent"
    ), result.stdout


def test_a_leader_that_is_starting_is_not_stopped_unasked(
    throwaway: ThrowawayRoot, cluster: Cluster, tmp_path: Path, bundle: Path
) -> None:
    """A leader "activating" cannot be asked whether a node of a rollout is on its way, and
    stopping it unasked could stop a rollout it resumes: the run refuses, nothing changed, and
    says how on (review s48rev4 L1: it was stopped for the swap without being asked)."""
    fake_venv(throwaway, cluster, tmp_path)
    fake_systemd(throwaway)
    throwaway.ok(
        "echo activating >/var/lib/fake-systemd/tlsroll-leader.service && "
        "install -d -m 0750 /var/lib/tlsroll && touch /var/lib/tlsroll/leader.toml"
    )
    before = throwaway.ok("sha256sum /opt/tlsroll/bin/* /opt/tlsroll/installed-files")
    install = shlex.quote(str(bundle / "install.sh"))
    result = throwaway.run(
        f"{install} leader --address 127.0.0.2 --node-name srv1 {server_python()}",
        BUILD_TIMEOUT,
        network=True,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "tlsroll-leader is starting" in result.stderr, result.stderr
    assert "nothing changed" in result.stderr, result.stderr
    assert restart_calls(throwaway) == []
    assert throwaway.ok("sha256sum /opt/tlsroll/bin/* /opt/tlsroll/installed-files") == before


GATED_PYTHON = """#!/bin/sh
# The server's python; `-m venv` (the build) waits at a gate the test opens.
if [ "$1 $2" = "-m venv" ]; then
    touch /var/lib/fake-systemd/at-gate
    for i in $(seq 1200); do [ -e /var/lib/fake-systemd/gate ] && break; sleep 0.1; done
fi
exec PYTHON "$@"
"""


@pytest.mark.timeout(600)
def test_a_rollout_started_during_the_build_is_seen_before_the_swap(
    throwaway: ThrowawayRoot, cluster: Cluster, tmp_path: Path, bundle: Path
) -> None:
    """The rollout check ran before the build (tens of seconds), never again: a rollout
    auto_rotate started meanwhile saw its leader restarted in its course. Now it is asked
    again just before the swap; refused, the built venv removed, nothing changed."""
    fake_venv(throwaway, cluster, tmp_path)
    fake_systemd(throwaway, "tlsroll-leader")
    python = server_python().removeprefix("--python ").strip() or "/usr/bin/python3"
    gated = GATED_PYTHON.replace("PYTHON", shlex.quote(python))
    throwaway.ok(
        f"cat >/usr/local/sbin/gated-python <<'EOF'\n{gated}EOF\n"
        "chmod 0755 /usr/local/sbin/gated-python"
    )
    before = throwaway.ok("sha256sum /opt/tlsroll/bin/* /opt/tlsroll/installed-files")
    install = shlex.quote(str(bundle / "install.sh"))
    script = (
        f"{install} leader --address 127.0.0.2 --node-name srv1"
        " --python /usr/local/sbin/gated-python"
    )
    proc = subprocess.Popen(
        ["nsenter", f"--target={throwaway.proc.pid}", "--mount", "--", "bash", "-c", script],
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": SERVER_PATH, "LANG": "C.UTF-8", "HOME": "/root"},
    )
    try:
        deadline = time.monotonic() + 120
        while throwaway.run("test -e /var/lib/fake-systemd/at-gate").returncode != 0:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "install.sh never began its build"
            time.sleep(0.2)
        rollouts_now(cluster, dict(rollout_id="r-auto", epoch=1, state="running",
                                   change="rotate-cert", nodes={"srv1": "preflight"}))  # fmt: skip
        throwaway.ok("touch /var/lib/fake-systemd/gate")
        out, err = proc.communicate(timeout=BUILD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out + err
    assert err.splitlines()[-1].startswith(
        "install.sh: rollout r-auto is running (srv1 on its way) (it started while the new "
        f"version was built){IN_ITS_COURSE}"
    ), err
    assert throwaway.ok("sha256sum /opt/tlsroll/bin/* /opt/tlsroll/installed-files") == before
    assert throwaway.run("test -e /opt/tlsroll.new || test -e /opt/tlsroll.old").returncode == 1
    assert "try-restart" not in throwaway.ok("cat /var/lib/fake-systemd/calls")


# --- uninstall (review s46rt2 L6) ------------------------------------------------------------


def uninstall(throwaway: ThrowawayRoot, args: str = "") -> subprocess.CompletedProcess[str]:
    result = throwaway.run(f"{INSTALL} uninstall {args}", timeout=60, network=True)
    assert "Traceback" not in result.stderr, result.stderr
    assert not re.search(r"line \d+", result.stderr), result.stderr
    return result


def test_uninstall_is_refused_while_a_node_of_a_rollout_is_on_its_way(
    throwaway: ThrowawayRoot, cluster: Cluster, tmp_path: Path
) -> None:
    """It stopped the leader (and the agent) in a rollout's course without a look. Now it is
    refused as an upgrade is, nothing removed; a rollout with no node on its way is said and
    the uninstall goes on."""
    fake_venv(throwaway, cluster, tmp_path)
    fake_systemd(throwaway, "tlsroll-leader", "tlsroll-agent")
    on_its_way = dict(rollout_id="r-switching", epoch=2, state="running",
                      nodes={"n1": "done", "n2": "switching"})  # fmt: skip
    rollouts_now(cluster, on_its_way)
    throwaway.ok("touch /var/lib/fake-systemd/calls /var/lib/fake-systemd/calls-at")  # (logs)
    before = throwaway.changed()

    refused = uninstall(throwaway)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr == (
        "install.sh: rollout r-switching is running (n2 on its way): uninstalling now would "
        "stop tlsroll-leader in its course; nothing removed. Wait until no node is on its way "
        "(tlsroll rollout status)\n"
    )
    assert refused.stdout == ""
    calls = throwaway.ok("cat /var/lib/fake-systemd/calls")
    assert "disable" not in calls, calls
    assert throwaway.changed() == before

    phase1 = dict(rollout_id="r-phase1", epoch=1, state="awaiting_finalize",
                  nodes={"n1": "dual", "n2": "dual"}, strategy="transitional")  # fmt: skip
    rollouts_now(cluster, phase1)
    # Review s47rev2 L4: --purge said "it stays so" of a rollout whose store it then deleted.
    throwaway.ok("install -d -m 0750 /var/lib/tlsroll && touch /var/lib/tlsroll/leader.sqlite3")
    before = throwaway.changed()
    purge = uninstall(throwaway, "--purge")
    assert purge.returncode == 1, purge.stdout + purge.stderr
    assert purge.stdout == (
        "install.sh: rollout r-phase1 awaits finalize: --purge deletes it with the leader's "
        "store (its nodes stay as they are; no tlsroll can finalize it or take it back then)\n"
    ), purge.stdout
    assert "give --yes too" in purge.stderr, purge.stderr
    assert throwaway.changed() == before
    done = uninstall(throwaway)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == (
        "install.sh: rollout r-phase1 awaits finalize: it stays so while tlsroll is not installed"
    ), done.stdout
    assert "disable --now tlsroll-leader.service" in throwaway.ok("cat /var/lib/fake-systemd/calls")
    throwaway.ok("! test -e /opt/tlsroll")


def test_uninstall_purge_of_a_leader_data_dir_wants_yes_or_purge_typed(
    throwaway: ThrowawayRoot,
) -> None:
    """--purge deleted the cluster CA (/var/lib/tlsroll) without a question. Now it wants
    --yes, or "purge" typed on a terminal; refused, it removes nothing. A node with no
    leader's data dir (an agent node) is purged as before."""
    throwaway.ok(
        # (an empty agent data dir, whatever the machine's own holds: the overlay shows it)
        "rm -rf /var/lib/tlsroll-agent && "
        "mkdir -p /opt/tlsroll/bin /var/lib/tlsroll/ca /etc/tlsroll /var/lib/tlsroll-agent && "
        "touch /opt/tlsroll/installed-files /var/lib/tlsroll/ca/ca.key /etc/tlsroll/agent.toml"
    )
    before = throwaway.changed()
    refused = uninstall(throwaway, "--purge")
    assert refused.returncode == 1
    assert refused.stderr == (
        "install.sh: --purge deletes /var/lib/tlsroll: the cluster CA (its key) and the "
        "leader's store: give --yes too (a backup first: tlsroll-leader --backup DIR); "
        "nothing removed\n"
    )
    assert throwaway.changed() == before

    def on_a_terminal(typed: str) -> subprocess.CompletedProcess[str]:
        command = f"{INSTALL} uninstall --purge"
        return throwaway.run(
            f"printf '%s\\n' {shlex.quote(typed)} | script -qec {shlex.quote(command)} /dev/null",
            timeout=60,
        )

    typed_no = on_a_terminal("yes")
    assert typed_no.returncode == 1, typed_no.stdout + typed_no.stderr
    assert "Type purge to go on: " in typed_no.stdout  # (script: one terminal for both)
    assert "install.sh: not confirmed; nothing removed" in typed_no.stdout
    assert throwaway.changed() == before

    typed = on_a_terminal("purge")
    assert typed.returncode == 0, typed.stdout + typed.stderr
    throwaway.ok("! test -e /var/lib/tlsroll && ! test -e /opt/tlsroll && ! test -e /etc/tlsroll")

    # With --yes, no question; an agent node (no leader data dir) needs no --yes.
    throwaway.ok("mkdir -p /var/lib/tlsroll/ca /opt/tlsroll && touch /var/lib/tlsroll/ca/ca.key")
    assert uninstall(throwaway, "--purge --yes").returncode == 0
    throwaway.ok("! test -e /var/lib/tlsroll")
    throwaway.ok("mkdir -p /var/lib/tlsroll-agent /opt/tlsroll")
    assert uninstall(throwaway, "--purge").returncode == 0
    throwaway.ok("! test -e /var/lib/tlsroll-agent")


AGENT_DELETES = (
    "/var/lib/tlsroll-agent: the agent's key and its journal (the server's config before each "
    "switch: the way back of a rollout awaiting finalize or taken back)"
)


def test_uninstall_purge_of_an_agent_data_dir_wants_yes_too(throwaway: ThrowawayRoot) -> None:
    """Review s47rev2 L4: on an agent node --purge deleted /var/lib/tlsroll-agent, the journal
    that holds the way back of a rollout awaiting finalize, without a question. Now it wants
    --yes (or "purge" typed) as a leader's data dir does; refused, it removes nothing."""
    throwaway.ok(
        "mkdir -p /opt/tlsroll/bin /etc/tlsroll /var/lib/tlsroll-agent/txn && cd / && touch "
        "opt/tlsroll/installed-files etc/tlsroll/agent.toml var/lib/tlsroll-agent/journal.sqlite3"
    )
    before = throwaway.changed()
    refused = uninstall(throwaway, "--purge")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr == (
        f"install.sh: --purge deletes {AGENT_DELETES}: give --yes too; nothing removed\n"
    )
    assert throwaway.changed() == before

    # A node with both: one question for both.
    throwaway.ok("mkdir -p /var/lib/tlsroll/ca && touch /var/lib/tlsroll/ca/ca.key")
    before = throwaway.changed()
    refused = uninstall(throwaway, "--purge")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr == (
        "install.sh: --purge deletes /var/lib/tlsroll: the cluster CA (its key) and the "
        f"leader's store, and {AGENT_DELETES}: give --yes too (a backup first: tlsroll-leader "
        "--backup DIR); nothing removed\n"
    )
    assert throwaway.changed() == before

    done = uninstall(throwaway, "--purge --yes")
    assert done.returncode == 0, done.stdout + done.stderr
    throwaway.ok("! test -e /var/lib/tlsroll-agent && ! test -e /var/lib/tlsroll")
