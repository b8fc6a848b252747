"""Lost state is loud (issue 16): a leader store or an agent journal that is missing (though
the data dir shows it existed), empty (0 bytes) or damaged (random bytes) stops the daemon with
one line naming the file and how to recover, exit code 4 (brief s39small: its unit does not
start it again; exit 1 logged the same line every few seconds for ever), no traceback, and
nothing new in its place; never a silent fresh start or "internal error" on every command.
The explicit ``--reinitialise`` of either daemon is a one-shot: it begins an empty store or
journal, keeps the lost file beside it and exits; the daemon is then started as before (review
s45rt2 H1: on an installed server the leader's runs as its user, without the CA passphrase).

The daemons are real processes (tests.cluster); the files are broken from outside while the
daemon is stopped, and put back afterwards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from leader import layout as layout_mod
from leader import runtime
from leader.config import LeaderConfig
from leader.db import StoreLost, check_store, mark_store
from leader.layout import Layout, init
from leader.runtime import load_state
from leader.service import LeaderState
from leader.store import Store
from nodeagent import runtime as agent_runtime
from nodeagent.journal import JournalLost, open_journal
from tests.cluster import Agent, Cluster, Daemon, child_env, command, one_line_error
from tests.conftest import next_loopback
from tests.nodeside import fill, tmpfs
from tests.refserver_helper import write_toml
from tlsroll import fsutil, pki, sqlite
from tlsroll.errors import TerminalError
from tlsroll.sqlite import damage

EXIT_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("loss"), next_loopback()) as c:
        c.init()
        c.start_leader()
        c.add_agent("lossy", next_loopback())
        c.wait_for_nodes_online(["lossy"])
        yield c


def sqlite_files(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")]


@contextlib.contextmanager
def stopped(daemon: Daemon, path: Path, start: Callable[[], object]) -> Iterator[None]:
    """The daemon stopped and its store file's copy kept; both put back at the end."""
    assert daemon.stop() == 0
    saved = path.read_bytes()
    try:
        yield
    finally:
        daemon.close()  # if a test left it running
        for f in sqlite_files(path):
            f.unlink(missing_ok=True)
        path.write_bytes(saved)
        path.chmod(0o600)
        start()


def break_file(path: Path, how: str) -> None:
    for f in sqlite_files(path)[1:]:
        f.unlink(missing_ok=True)
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(os.urandom(64 * 1024))


PROBLEM = {"missing": "missing", "empty": "empty (0 bytes)", "random": "damaged ("}


def refused(daemon: Daemon, prog: str, exit_code: int = 4) -> str:
    code, output = daemon.run_to_exit(timeout=EXIT_TIMEOUT)
    assert code == exit_code, output
    assert "Traceback" not in output
    return one_line_error(output, prog, allow_grpc_core=True)


@pytest.mark.parametrize("how", ["missing", "empty", "random"])
def test_a_lost_leader_store_stops_the_leader_with_one_line(cluster: Cluster, how: str) -> None:
    """Exit 4 (needs a person), which the unit does not restart (tests/test_deploy.py)."""
    store = cluster.store_path
    with stopped(cluster.leader, store, cluster.start_leader):
        break_file(store, how)
        before = store.read_bytes() if store.exists() else None
        line = refused(cluster.leader, "tlsroll-leader")
        assert line.startswith(f"tlsroll-leader: store {store}: {PROBLEM[how]}"), line
        assert "restore it from a backup" in line
        # The one-shot as the admin types it (root here: as it is), then the unit.
        begin = f"{cluster.leader.argv[0]} --config {cluster.config_path} --reinitialise"
        assert f"run `{begin}` (it only replaces the store), then start the leader" in line
        # nothing new in its place: no fresh, empty store was made
        assert (store.read_bytes() if store.exists() else None) == before
    cluster.wait_for_nodes_online(["lossy"])  # restored from the copy: the node is known again


def agent_of(cluster: Cluster) -> Agent:
    return cluster.agents["lossy"]


def journal_of(agent: Agent) -> Path:
    return agent.data_dir / "journal.sqlite3"


@pytest.mark.parametrize("how", ["missing", "empty", "random"])
def test_a_lost_journal_stops_the_agent_with_one_line(cluster: Cluster, how: str) -> None:
    """Exit 4 (needs a person), which the unit does not restart (tests/test_deploy.py)."""
    agent = agent_of(cluster)
    journal = journal_of(agent)
    with stopped(agent, journal, agent.start):
        break_file(journal, how)
        before = journal.read_bytes() if journal.exists() else None
        line = refused(agent, "tlsroll-agent")
        assert line.startswith(f"tlsroll-agent: journal {journal}: {PROBLEM[how]}"), line
        assert "restore it from a backup" in line, line
        # The one-shot as root types it (the agent runs as root), then the unit (s45rt2 H1).
        begin = f"{agent.argv[0]} --config {agent.config_path} --reinitialise"
        assert f"run `{begin}` (it only replaces the journal)" in line, line
        assert "then start the agent as before (installed: systemctl start" in line, line
        assert (journal.read_bytes() if journal.exists() else None) == before
    cluster.wait_for_nodes_online(["lossy"])


def set_user_version(path: Path, version: int) -> None:
    """The file as a newer tlsroll leaves it whose migrations since are not all ones an older
    tlsroll may ignore: no floor that may read it (``tlsroll.sqlite.readable_by``)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA user_version={version}")
        conn.execute("DROP TABLE IF EXISTS schema_floor")
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("which", ["leader", "agent"])
def test_a_store_of_a_newer_tlsroll_stops_the_daemon_with_its_own_exit_code(
    cluster: Cluster, which: str
) -> None:
    """From the upgrade audit (F10): a store a newer tlsroll wrote (this one rolled back) is
    for a person to fix, as a config error is: the daemon exits 3, which its unit does not
    restart on (RestartPreventExitStatus=, tests/test_deploy.py), not 1 every few seconds."""
    daemon: Daemon
    start: Callable[[], object]
    if which == "leader":
        daemon, start = cluster.leader, cluster.start_leader
        path, prog, exit_code = cluster.store_path, "tlsroll-leader", runtime.EXIT_STORE_TOO_NEW
    else:
        agent = agent_of(cluster)
        daemon, start = agent, agent.start
        path, prog, exit_code = journal_of(agent), "tlsroll-agent", agent_runtime.EXIT_STORE_TOO_NEW
    assert exit_code == 3
    with stopped(daemon, path, start):
        set_user_version(path, 99)
        code, output = daemon.run_to_exit(timeout=EXIT_TIMEOUT)
        assert code == exit_code, output
        line = one_line_error(output, prog, allow_grpc_core=True)
        what = "store" if which == "leader" else "journal"
        assert f"{what} schema version 99 is newer than this tlsroll knows" in line, line
        assert f"this tlsroll is older than the one that wrote {path.name}" in line, line
    cluster.wait_for_nodes_online(["lossy"])


def test_reinitialise_starts_an_empty_journal_and_keeps_the_lost_one(cluster: Cluster) -> None:
    agent = agent_of(cluster)
    journal = journal_of(agent)
    argv = list(agent.argv)
    with stopped(agent, journal, agent.start):
        break_file(journal, "random")
        damaged = journal.read_bytes()
        agent.argv = [*argv, "--reinitialise"]
        try:  # a one-shot: it exits, and the agent is started as before (s45rt2 H1)
            code, output = agent.run_to_exit(timeout=EXIT_TIMEOUT)
        finally:
            agent.argv = argv
        assert code == 0, output
        said = [line for line in output.splitlines() if line.startswith("tlsroll-agent: ")]
        # Session 75 opswalk: on a node on https an empty journal serves no workstation port
        # until the node's next switch, and an enable-tls finds it done: the line names the
        # rotate-cert ("run the rollout again" led to "nothing to do").
        assert said == [
            f"tlsroll-agent: journal {journal} begun again, empty: start the agent now as"
            " before (installed: systemctl start tlsroll-agent); if lossy's server runs https,"
            " run `tlsroll rollout start --change rotate-cert --nodes lossy` on the leader"
            " then: until a switch the agent serves no workstation port (9443) there, and an"
            " enable-tls finds the node done"
        ], output
        agent.start()
        cluster.wait_for_nodes_online(["lossy"])
        (event,) = [e for e in agent.log_events() if e.get("event") == "journal.reinitialised"]
        assert event["path"] == str(journal) and event["problem"].startswith("damaged (")
        (kept,) = [Path(k) for k in event["kept_as"]]
        assert kept.parent == journal.parent and kept.read_bytes() == damaged
        assert journal.exists() and journal.read_bytes() != damaged

        # Once is enough: an intact journal is never thrown away by the flag.
        assert agent.stop() == 0
        agent.argv = [*argv, "--reinitialise"]
        try:
            line = refused(agent, "tlsroll-agent", 2)  # a usage error (s38, H2)
        finally:
            agent.argv = argv
        assert line.startswith(f"tlsroll-agent: journal {journal}: intact;"), line
        kept.unlink()
    cluster.wait_for_nodes_online(["lossy"])


@pytest.mark.parametrize("which", ["leader", "agent"])
def test_a_one_shot_while_its_daemon_runs_is_refused_and_changes_nothing(
    cluster: Cluster, which: str
) -> None:
    """Review s45rev6 M1: ``--reinitialise`` run while the daemon still ran (its store deleted
    under it: the daemon keeps the file open) said "begun again" and renamed the running
    daemon's live -wal and -shm; the daemon went on with the deleted file, and the line's
    ``systemctl start`` does nothing to a unit that runs. Now it is refused, nothing changed:
    the leader is found on its admin socket, the agent by the lock it holds."""
    daemon: Daemon
    if which == "leader":
        daemon, path, prog = cluster.leader, cluster.store_path, "tlsroll-leader"
    else:
        daemon = agent_of(cluster)
        path, prog = journal_of(daemon), "tlsroll-agent"
    start = cluster.start_leader if which == "leader" else daemon.start
    assert daemon.stop() == 0
    saved = path.read_bytes()  # put back when the test is over (as ``stopped`` does)
    start()
    path.unlink()  # deleted by mistake while the daemon runs
    before = sorted(p.name for p in path.parent.iterdir())
    try:
        done = subprocess.run(
            [*daemon.argv, "--reinitialise"],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(None),
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 1, output
        line = one_line_error(output, prog, allow_grpc_core=True)
        if which == "leader":
            sock = cluster.admin_socket
            assert line == (
                f"tlsroll-leader: a leader is running on {sock}: stop it first (systemctl stop"
                " tlsroll-leader)"
            ), line
        else:
            data = agent_of(cluster).data_dir
            assert line == (
                f"tlsroll-agent: a tlsroll-agent is running on {data} (it holds"
                f" {data / agent_runtime.LOCK_NAME}): stop it first (systemctl stop"
                " tlsroll-agent)"
            ), line
        assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing renamed or made
        assert daemon.running
    finally:
        daemon.close()
        for f in sqlite_files(path):
            f.unlink(missing_ok=True)
        path.write_bytes(saved)
        path.chmod(0o600)
        start()
    cluster.wait_for_nodes_online(["lossy"])


def test_a_reinitialised_leader_relearns_its_nodes_from_their_agents(tmp_path: Path) -> None:
    """Issue 16: a lost leader store, started again with --reinitialise: the lost file is
    kept aside, the empty store re-learns each node from the certificate its agent presents
    with its heartbeats (name, addresses, key, agent port), its epoch floor rises to what the
    agents have seen, and the leader reaches the agents again. --reinitialise on an intact
    store is refused; a node removed after the re-learning stays removed."""
    with Cluster(tmp_path, next_loopback()) as c:
        c.init()
        c.start_leader()
        one = c.add_agent("one", next_loopback())
        two = c.add_agent("two", next_loopback())
        c.wait_for_nodes_online(["one", "two"])
        before = {n.name: n for n in c.list_nodes().values()}
        argv = list(c.leader.argv)
        assert c.leader.stop() == 0
        c.leader.argv = [*argv, "--reinitialise"]
        line = refused(c.leader, "tlsroll-leader", 2)  # intact: nothing to reinitialise
        assert "intact" in line

        store = c.store_path
        break_file(store, "random")
        c.leader.argv = argv
        assert "--reinitialise" in refused(c.leader, "tlsroll-leader")
        c.leader.argv = [*argv, "--reinitialise"]
        code, output = c.leader.run_to_exit(timeout=EXIT_TIMEOUT)  # a one-shot: it exits
        assert code == 0, output
        c.leader.argv = argv
        c.start_leader()
        assert list(store.parent.glob("leader.sqlite3.lost-*"))
        nodes = c.wait_for_nodes_online(["one", "two"], timeout=30)
        for name in ("one", "two"):
            assert nodes[name].addresses == before[name].addresses
            assert nodes[name].cert_fingerprint == before[name].cert_fingerprint
            assert nodes[name].token_id == "relearned"
        events = [e for e in c.leader.log_events() if e.get("event") == "node.relearned"]
        assert sorted(e["node"] for e in events) == ["one", "two"]
        # The leader reaches the agents again (by their key names), and its epochs go on.
        check = c.cli("nodes", "--check")
        assert check.returncode == 0, check.stdout + check.stderr
        shown = c.cli("epoch", "show", "--json")
        assert shown.returncode == 0, shown.stdout
        # A node removed now stays removed: its agent is refused, not re-learned.
        assert c.cli("nodes", "remove", "two", "--yes").returncode == 0
        time.sleep(3 * c.agent_heartbeat_interval)
        assert "two" not in c.list_nodes()
        assert one.running and two.running


def as_user(user: str, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` (setpriv, as tests/test_ops.py runs the CLI as another user),
    as ``runuser -u USER --`` does for the admin. It may read its way to the interpreter
    (CAP_DAC_READ_SEARCH: on some machines the interpreter lies under root's 0700 home): what
    it makes, and what its checks compare, are still its uid's."""
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    group = ["--regid=nogroup", "--clear-groups"]
    return ["setpriv", f"--reuid={user}", *group, *caps, *argv]


def chown_tree(top: Path, uid: int, gid: int) -> None:
    for path in [top, *top.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)


def test_reinitialise_on_an_installed_server_is_a_one_shot_as_the_leaders_user() -> None:
    """Review s45rt2 H1: on a server installed by install.sh the data dir is the leader's user's
    (tlsroll; nobody here) and the CA passphrase reaches only the unit's start (a systemd
    credential). ``--reinitialise`` run as root said "run: chown root …", which would leave a
    data dir the unit cannot start; run as the leader's user it failed for want of the CA
    passphrase. Now root is told to run it as that user; so run, it needs no CA passphrase,
    only replaces the store (the user's) and exits; the leader is then started as before and
    re-learns its node."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the leader as another user")
    root = Path(tempfile.mkdtemp(prefix="tlsroll-reinit-"))
    root.chmod(0o755)  # the way to the data dir is open, as /var/lib is
    try:
        _reinitialise_as_the_leaders_user(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _reinitialise_as_the_leaders_user(root: Path) -> None:
    with Cluster(root, next_loopback()) as c:
        c.init()
        c.start_leader()
        c.add_agent("one", next_loopback())
        c.wait_for_nodes_online(["one"])
        assert c.leader.stop() == 0
        store, argv = c.store_path, list(c.leader.argv)
        break_file(store, "random")
        damaged = store.read_bytes()
        passphrase = c.passphrase_path.read_bytes()
        c.passphrase_path.unlink()  # not here: only the unit's start is given it
        nobody = pwd.getpwnam("nobody")
        chown_tree(c.data_dir, nobody.pw_uid, nobody.pw_gid)

        # Root, the admin's usual account: refused, and told to run it as the owner.
        c.leader.argv = [*argv, "--reinitialise"]
        line = refused(c.leader, "tlsroll-leader", 1)
        assert f"run it as nobody, with the same arguments: runuser -u nobody -- {argv[0]} …" in (
            line
        ), line
        assert "chown" not in line, line
        assert store.read_bytes() == damaged and not list(store.parent.glob("*.lost-*"))

        # As the leader's user: no CA passphrase needed; the store replaced, the user's.
        c.leader.argv = as_user("nobody", [*argv, "--reinitialise"])
        code, output = c.leader.run_to_exit(timeout=EXIT_TIMEOUT)
        assert code == 0, output
        said = [x for x in output.splitlines() if x.startswith("tlsroll-leader: ")]
        assert len(said) == 1 and said[0].startswith(f"tlsroll-leader: store {store}: begun"), said
        assert "start it now as before (installed: systemctl start tlsroll-leader)" in said[0]
        (kept,) = store.parent.glob("leader.sqlite3.lost-*")
        assert kept.read_bytes() == damaged
        made = [p for p in store.parent.glob("leader.sqlite3*") if p != kept]
        assert made and {p.stat().st_uid for p in made} == {nobody.pw_uid}, made

        # Then the leader starts as before (here as root: its data dir given back to root)
        # and re-learns the node from its agent.
        chown_tree(c.data_dir, 0, 0)
        c.passphrase_path.write_bytes(passphrase)
        c.passphrase_path.chmod(0o600)
        c.leader.argv = argv
        c.start_leader()
        nodes = c.wait_for_nodes_online(["one"], timeout=30)
        assert nodes["one"].token_id == "relearned"


# --- a kill at the first commit (audit of session 33, M2 and M3): unit tests, no daemons ------


class Killed(BaseException):
    """A kill -9 at this point: nothing after it runs (not an Exception: nothing catches it)."""


def kill(*args: object, **kwargs: object) -> NoReturn:
    raise Killed


def killed_in_first_transaction(
    monkeypatch: pytest.MonkeyPatch, open_it: Callable[[], object]
) -> None:
    """Run ``open_it`` with ``tlsroll.sqlite.migrate`` killed: the file exists (``Database``
    made it 0600) and its first transaction never committed."""
    with monkeypatch.context() as m:
        m.setattr(sqlite, "migrate", kill)
        with pytest.raises(Killed):
            open_it()


def test_a_journal_whose_first_start_was_killed_is_new_until_the_agent_enrolled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent makes its journal before it enrols (no key yet: ``expected`` False). A kill
    before the journal's first commit left 0 bytes, refused at every start as lost state
    ("empty (0 bytes); restore it from a backup"): a backup of nothing. Now it is new; an
    enrolled agent's (``expected``) empty journal is still lost."""
    path = tmp_path / "journal.sqlite3"
    killed_in_first_transaction(monkeypatch, lambda: open_journal(path, expected=False))
    assert path.stat().st_size == 0
    with pytest.raises(JournalLost, match=r"empty \(0 bytes\)"):
        open_journal(path, expected=True)
    open_journal(path, expected=False).close()
    assert path.stat().st_size > 0
    assert damage(path, expected=True) is None


def test_a_store_whose_first_start_was_killed_is_new_until_the_leader_marked_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's store before ``mark_store``: a kill before its first commit is a new
    store at the next start, not a lost one; once marked, an empty store is lost."""
    path = tmp_path / "leader.sqlite3"
    killed_in_first_transaction(monkeypatch, lambda: Store(path))
    assert path.stat().st_size == 0
    assert check_store(path) == []
    Store(path).close()
    mark_store(path)
    for f in sqlite_files(path):
        f.unlink(missing_ok=True)
    path.write_bytes(b"")
    with pytest.raises(StoreLost, match=r"empty \(0 bytes\)"):
        check_store(path)


def leader_config(tmp_path: Path) -> LeaderConfig:
    """An initialised leader data dir (no daemon) whose store is lost: started once, then
    its file overwritten with random bytes."""
    layout = init(tmp_path / "data", next_loopback())
    cfg = LeaderConfig.load(layout.config)
    load_state(cfg).store.close()
    break_file(layout.store, "random")
    return cfg


def relearn_until(state: LeaderState) -> str | None:
    """The store's re-learning window (read here: the test ran on the code before too)."""
    with state.store.db.read() as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'relearn_until'").fetchone()
    state.store.close()
    return None if row is None else str(row["value"])


def test_reinitialise_opens_the_relearning_window_in_the_new_stores_first_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new store and its re-learning window were two transactions: a leader killed
    between them started again (without the flag) on an empty store taken as intact, which
    re-learned no node, and a second --reinitialise was refused as "intact"."""
    cfg = leader_config(tmp_path)

    def store_then_killed(*args: Any, **kwargs: Any) -> NoReturn:
        Store(*args, **kwargs).close()  # its first transaction committed
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(runtime, "Store", store_then_killed)
        with pytest.raises(Killed):
            runtime.reinitialise(cfg)
    until = relearn_until(load_state(cfg))  # systemd starts it again, without the flag
    assert until is not None and dt.datetime.fromisoformat(until) > dt.datetime.now(dt.UTC)
    assert len(list(cfg.layout.store.parent.glob("leader.sqlite3.lost-*"))) == 1


def test_reinitialise_killed_before_the_new_stores_first_commit_is_refused_and_done_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill inside the new store's first transaction leaves it lost (0 bytes, marked), not
    new: the next start is refused, and --reinitialise again opens the window."""
    cfg = leader_config(tmp_path)
    killed_in_first_transaction(monkeypatch, lambda: runtime.reinitialise(cfg))
    with pytest.raises(StoreLost, match=r"empty \(0 bytes\)"):
        load_state(cfg)
    runtime.reinitialise(cfg)
    assert relearn_until(load_state(cfg)) is not None


def test_a_data_dir_with_a_ca_and_no_store_nor_init_s_mark_is_lost_until_reinitialised(
    tmp_path: Path,
) -> None:
    """A restore that put back the config, ``ca/`` and ``tls/`` but not the store (session 68:
    the leader made a new, empty one): init's first-start mark is what tells a new cluster.
    The first start removes it; without it the start is refused (the daemon's exit 4:
    tests/test_backup.py), and ``--reinitialise`` is the way on that keeps no store."""
    layout = init(tmp_path / "data", next_loopback())
    cfg = LeaderConfig.load(layout.config)
    assert layout.first_start.exists()
    load_state(cfg).store.close()  # the first start
    assert not layout.first_start.exists() and layout.store.exists()
    for f in (*sqlite_files(layout.store), layout.store.with_name("leader.sqlite3.created")):
        f.unlink(missing_ok=True)  # (a restore without them)
    with pytest.raises(StoreLost, match=r"missing beside the CA.*--reinitialise"):
        load_state(cfg)
    assert not layout.store.exists()
    runtime.reinitialise(cfg)
    load_state(cfg).store.close()


def test_an_init_killed_before_its_config_says_what_to_remove_and_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit of session 33, L6: ``tlsroll init`` writes the config last. Cut short before it,
    a second init refused "already initialised" (ca.key existed), and the leader could not
    start (no config). Now it names what the interrupted one left (no CA key is ever
    overwritten); once those are removed, init runs. A leader that ran (its store's mark)
    still makes a missing config "already initialised"."""
    address = next_loopback()
    real = fsutil.write_atomic

    def write(path: Path, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "leader.toml":
            raise Killed
        real(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(layout_mod, "write_atomic", write)
        with pytest.raises(Killed):
            init(tmp_path / "data", address)
    layout = Layout((tmp_path / "data").resolve())
    key = layout.ca_key.read_bytes()
    with pytest.raises(TerminalError) as refused:
        init(tmp_path / "data", address)
    message = str(refused.value)
    assert "interrupted" in message and str(layout.ca_key) in message, message
    assert layout.ca_key.read_bytes() == key
    for left in message.split(" rm ", 1)[1].split():
        Path(left).unlink()
    assert init(tmp_path / "data", address).config.exists()

    layout.config.unlink()
    mark_store(layout.store)
    with pytest.raises(TerminalError, match="already initialised"):
        init(tmp_path / "data", address)


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under ``root``: its mode and (a file's) contents."""
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in [root, *sorted(root.rglob("*"))]
    }


# case -> the file init was killed writing (what it made is every file before it, in its order:
# the passphrase, ca.key, ca.pem, leader.key, leader.pem, then the config)
INIT_CUTS = ("ca.passphrase", "ca.key", "ca.pem", "leader.key", "leader.pem")


@pytest.mark.parametrize("cut", INIT_CUTS)
def test_an_interrupted_init_with_the_config_elsewhere_says_so_and_how_to_run_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    """Review rev50f L1: the leader's config outside its data dir (the admin's own), and
    `tlsroll init` killed on that data dir before it made every file: the leader said "ca.key
    (or leader.pem) is missing; restore it from a backup" (or that the CA passphrase file is
    missing) of files no backup holds, no leader having run there. Now it says init was
    interrupted, what it made and what not, and how to run it again (the `rm` init itself asks
    for); exit 2, nothing changed. Done as said, init runs."""
    address = next_loopback()
    data = (tmp_path / "data").resolve()
    real = fsutil.write_atomic

    def write(path: Path, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == cut:
            raise Killed
        real(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(layout_mod, "write_atomic", write)
        m.setattr(pki, "write_atomic", write)
        with pytest.raises(Killed):
            init(data, address)
    layout = Layout(data)
    (tmp_path / "etc").mkdir()
    config = write_toml(
        tmp_path / "etc" / "leader.toml", {"leader": {"address": address, "data_dir": data}}
    )
    order = [layout.ca_key, layout.ca_cert, layout.tls_key, layout.tls_cert]
    made = [p for p in order if p.exists()]
    missing = order[len(made) :]
    assert missing and all(not p.exists() for p in missing)
    before = _tree(data)
    result = subprocess.run(
        [*command("tlsroll-leader", "leader.daemon"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=child_env(),
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    line = one_line_error(output, "tlsroll-leader")
    assert _tree(data) == before  # nothing made, changed or removed
    label = {"ca.key": "CA key", "ca.pem": "CA certificate", "leader.key": "leader TLS key"}
    what = label.get(missing[0].name, "leader certificate")
    rel = [str(p.relative_to(data)) for p in made]
    did = f"it made {', '.join(rel)}, not" if made else "it made none of"
    again = f"tlsroll init --data-dir {data} --address {address}"
    fix = (
        f"remove what it left and run it again: rm {' '.join(map(str, made))} && {again}"
        if made
        else f"run it again: {again}"
    )
    assert line == (
        f"tlsroll-leader: config error: {what}: {missing[0]} is missing: an earlier `tlsroll"
        f" init` on {data} was interrupted (no leader has run there; {did}"
        f" {', '.join(str(p.relative_to(data)) for p in missing)}); {fix} (if you are"
        " restoring a backup there instead, finish restoring it: its files, not a new init)"
    ), line
    assert "restore it from a backup" not in line
    for path in made:  # as the line says
        path.unlink()
    assert init(data, address).config.exists()


def test_a_file_lost_after_init_is_no_interrupted_init(tmp_path: Path) -> None:
    """Told apart conservatively: what init makes, made in its order up to a file (the rest
    missing), no store nor its mark, no config in the data dir, nothing else in it. A CA key
    missing beside the leader's certificate is no init cut short: restore it."""
    data = (tmp_path / "data").resolve()
    init(data, next_loopback())
    layout = Layout(data)
    layout.config.unlink()  # (moved elsewhere by the admin)
    assert layout_mod.interrupted_init(layout) is None  # all made
    layout.ca_key.unlink()
    assert layout_mod.interrupted_init(layout) is None  # not init's order
    layout.tls_cert.unlink()
    layout.tls_key.unlink()
    layout.ca_cert.unlink()
    assert layout_mod.interrupted_init(layout) is not None  # (none made: init cut short)
    (data / "notes.txt").write_text("the admin's\n")
    assert layout_mod.interrupted_init(layout) is None  # init would refuse the directory
    (data / "notes.txt").unlink()
    mark_store(layout.store)
    assert layout_mod.interrupted_init(layout) is None  # a leader ran here


# --- a full disk is not a lost store (audit s38, H2) --------------------------------------------


def test_a_leader_restarted_on_a_full_disk_says_so_and_keeps_its_store(tmp_path: Path) -> None:
    """Audit s38, H2: a leader started on a full data dir said its store was "damaged (disk
    I/O error)" and advised --reinitialise, which moved the intact store aside and lost the
    enrolled nodes, tokens and rollouts. Now: exit 1 (the unit starts it again) with one line
    saying the store cannot be opened now and is not damaged; --reinitialise is refused
    (exit 2) and moves nothing aside; with space again the leader starts on its store as it
    was (the token made before is still there)."""
    c = Cluster(tmp_path, next_loopback())
    with tmpfs(c.data_dir, "16m"), c:
        c.init()
        c.start_leader()
        c.create_token("kept", next_loopback())
        tokens = c.store_rows(("tokens",))
        assert len(tokens["tokens"]) == 1
        assert c.stop_leader() == 0
        store = c.store_path
        saved = store.read_bytes()
        argv = list(c.leader.argv)

        def run(*extra: str) -> tuple[int, str]:
            c.leader.argv = [*argv, *extra]
            try:
                code, output = c.leader.run_to_exit(timeout=EXIT_TIMEOUT)
            finally:
                c.leader.argv = argv
            return code, one_line_error(output, "tlsroll-leader", allow_grpc_core=True)

        filler = fill(c.data_dir)
        code, line = run()
        assert code == 1, line
        assert line.startswith(f"tlsroll-leader: store {store}: cannot be opened now ("), line
        assert "SQLITE_IOERR" in line and "bytes free on its file system" in line, line
        assert line.endswith("it is not damaged"), line
        assert "damaged (" not in line and "--reinitialise" not in line, line

        code, line = run("--reinitialise")
        assert code == 2, line
        assert "it is not damaged" in line and "nothing was moved aside" in line, line
        assert store.read_bytes() == saved
        assert not list(store.parent.glob("leader.sqlite3.lost-*"))

        filler.unlink()
        c.start_leader()
        assert c.store_rows(("tokens",)) == tokens
        assert "store.reinitialised" not in c.leader.event_names()


# --- a disk that fails to read is damage, not a full disk (review s38, M3) ----------------------


def _io_error(code_name: str) -> sqlite3.OperationalError:
    """The exception SQLite's ``code_name`` raises (its code and name, as ``sqlite3`` sets)."""
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorcode = getattr(sqlite3, code_name)
    exc.sqlite_errorname = code_name
    return exc


@contextlib.contextmanager
def reads_fail(monkeypatch: pytest.MonkeyPatch, path: Path, code_name: str) -> Iterator[None]:
    """Every statement on a connection ``tlsroll.sqlite`` opens to the file now at ``path``
    fails with ``code_name`` (what a disk that cannot read it, or a full one, makes SQLite
    say); a new file made there afterwards (``--reinitialise``) is opened as usual."""
    inode = path.stat().st_ino
    real_connect = sqlite3.connect

    class Failing:
        def execute(self, *args: object) -> NoReturn:
            raise _io_error(code_name)

        def close(self) -> None:
            pass

    def connect(database: Path, *args: Any, **kwargs: Any) -> Any:
        if os.stat(database).st_ino == inode:
            return Failing()
        return real_connect(database, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(sqlite3, "connect", connect)  # what tlsroll.sqlite calls
        yield


def _a_store(tmp_path: Path) -> Path:
    path = tmp_path / "leader.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a)")
    conn.commit()
    conn.close()
    mark_store(path)
    return path


@pytest.mark.parametrize(
    "code_name", ["SQLITE_IOERR_READ", "SQLITE_IOERR_SHORT_READ", "SQLITE_IOERR_CORRUPTFS"]
)
def test_a_store_the_disk_cannot_read_is_unreadable_and_may_be_reinitialised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code_name: str
) -> None:
    """Review s38, M3: every SQLITE_IOERR was "cannot be opened now … free space on it … it
    is not damaged" (with the disk far from full), the unit started the leader again and
    again, and --reinitialise was refused. A read that fails is the disk failing: the store
    is "unreadable (CODE…): check the disk (dmesg)", with the way to recover, and
    --reinitialise moves it aside."""
    path = _a_store(tmp_path)
    saved = path.read_bytes()
    with reads_fail(monkeypatch, path, code_name):
        with pytest.raises(StoreLost) as lost:
            check_store(path)
        line = str(lost.value)
        assert line.startswith(f"store {path}: unreadable ({code_name}: disk I/O error)"), line
        assert "check the disk (dmesg)" in line and "restore it from a backup" in line, line
        assert "bytes free" not in line and "not damaged" not in line, line
        assert path.read_bytes() == saved
        kept = check_store(path, reinitialise=True)
    assert kept and not path.exists()
    assert kept[0].read_bytes() == saved


def test_a_journal_the_disk_cannot_read_is_unreadable_and_may_be_reinitialised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's journal likewise (review s38, M3)."""
    path = _a_store(tmp_path).rename(tmp_path / "journal.sqlite3")
    with reads_fail(monkeypatch, path, "SQLITE_IOERR_READ"):
        with pytest.raises(JournalLost, match=r"unreadable \(SQLITE_IOERR_READ: .*\(dmesg\)"):
            open_journal(path, expected=True)
        journal = open_journal(path, expected=True, reinitialise=True)
        journal.close()
    assert list(tmp_path.glob("journal.sqlite3.lost-*"))


def test_eio_on_the_store_file_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EIO from the file system on the store (its stat) is unreadable too, not "cannot be
    opened now" (review s38, M3)."""
    path = _a_store(tmp_path)
    real_stat = Path.stat

    def stat(self: Path, **kwargs: Any) -> os.stat_result:
        if self == path:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_stat(self, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "stat", stat)
        problem = damage(path, expected=True)
    assert problem is not None
    assert problem.startswith(f"unreadable ({path}: Input/output error (errno 5, EIO))"), problem


def test_an_unreadable_file_once_open_is_one_terminal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that fails only once ``Database`` opened the file (after ``damage`` passed) is a
    ``StoreUnreadable`` (one line, terminal), not a ``StoreUnavailable`` (review s38, M3)."""
    path = _a_store(tmp_path)
    with (
        reads_fail(monkeypatch, path, "SQLITE_IOERR_SHORT_READ"),
        pytest.raises(
            sqlite.StoreUnreadable,
            match=r"unreadable .*--reinitialise \(it only replaces the file and exits\)",
        ),
    ):
        sqlite.Database(path, [], what="journal")


def test_what_stops_a_daemon_for_a_person_is_a_lost_damaged_or_unreadable_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Brief s39small: the errors that make a daemon exit 4 (not restarted by its unit): a
    lost or damaged store or journal, one the disk cannot read (once open too), SQLite's own
    word that the file is broken; not a store that only cannot be opened now (exit 1: a full
    disk), nor a refused --reinitialise (exit 2)."""
    path = _a_store(tmp_path)
    with reads_fail(monkeypatch, path, "SQLITE_IOERR_READ"):
        with pytest.raises(sqlite.StoreUnreadable) as unreadable:
            sqlite.Database(path, [])
        with pytest.raises(StoreLost) as lost:
            check_store(path)
        with pytest.raises(JournalLost) as journal_lost:
            open_journal(path, expected=True)
    with reads_fail(monkeypatch, path, "SQLITE_IOERR_SHMSIZE"):
        with pytest.raises(sqlite.StoreUnavailable) as unavailable:
            check_store(path)
        with pytest.raises(sqlite.NotDamaged) as not_damaged:
            check_store(path, reinitialise=True)
    corrupt = sqlite3.DatabaseError("database disk image is malformed")
    corrupt.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
    for exc in (unreadable.value, lost.value, journal_lost.value, corrupt):
        assert sqlite.needs_a_person(exc), exc
    full = _io_error("SQLITE_FULL")
    for other in (unavailable.value, not_damaged.value, full, _io_error("SQLITE_BUSY")):
        assert not sqlite.needs_a_person(other), other


@pytest.mark.parametrize(
    ("code_name", "low"),
    [
        ("SQLITE_IOERR_SHMSIZE", False),
        ("SQLITE_IOERR_WRITE", False),
        ("SQLITE_IOERR_FSYNC", False),
        ("SQLITE_BUSY", False),
        ("SQLITE_FULL", True),
    ],
)
def test_a_store_unavailable_now_speaks_of_free_space_only_when_it_is_low(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code_name: str, low: bool
) -> None:
    """The errors of a full disk, a lock, the WAL's -shm stay "cannot be opened now … it is not
    damaged", refused by --reinitialise; the bytes free and "free space" only when the error
    says the disk is full or space is low (< 64 MiB), never with plenty free (review s38,
    M3)."""
    path = _a_store(tmp_path)
    free = sqlite.free_bytes(tmp_path)
    assert free is not None
    if free < sqlite.LOW_SPACE:
        pytest.skip("this test wants more than 64 MiB free under tmp_path")
    with reads_fail(monkeypatch, path, code_name):
        with pytest.raises(sqlite.StoreUnavailable) as unavailable:
            check_store(path)
        line = str(unavailable.value)
        assert line.startswith(f"store {path}: cannot be opened now ({code_name}: "), line
        assert line.endswith("it is not damaged"), line
        assert ("bytes free on its file system; free space on it" in line) is low, line
        with pytest.raises(sqlite.NotDamaged, match="nothing was moved aside"):
            check_store(path, reinitialise=True)
    assert path.exists() and not list(tmp_path.glob("*.lost-*"))


def test_a_failed_quick_check_is_said_on_one_line(tmp_path: Path) -> None:
    """SQLite's ``quick_check`` rows hold line breaks ("*** in database main ***\\nPage 13:
    …"): the "damaged (quick_check: …)" problem, which ends up on the daemon's one error line,
    had several lines. Now its lines are joined with "; "."""
    path = tmp_path / "leader.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a, b)")
    conn.execute("CREATE INDEX ti ON t (b)")
    conn.executemany(
        "INSERT INTO t VALUES (?, ?)", [(i, os.urandom(200).hex()) for i in range(3000)]
    )
    conn.commit()
    conn.close()
    with path.open("r+b") as f:  # pages 11 to 13 zeroed: a quick_check that fails
        f.seek(4096 * 10)
        f.write(b"\0" * 4096 * 3)
    problem = damage(path, expected=True)
    assert problem is not None and problem.startswith("damaged (quick_check: "), problem
    assert "\n" not in problem, problem
