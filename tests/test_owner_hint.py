"""What a command says about files of another user's (``tlsroll.fsutil.owner_fix``), review
s45rev6 M2, M3, L1 and L3: on a server installed by install.sh the data dir is the service's
user's (tlsroll: nobody here) in root's /var/lib; whoever runs a command on it is told to run it
as that user, never to ``chown`` it (the service could no longer open its files); root is told
how (``runuser``), no one else is told to ``runuser`` to themselves; the agent, whose unit runs
as root, is never told to run as another user.

Real programs as processes, as root and (setpriv) as another user; needs root."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import child_env, command
from tests.conftest import next_loopback
from tests.refserver_helper import write_toml

TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (files of another user's) and setpriv (run as another user)",
)


def as_user(user: str, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` (as tests/test_state_loss.py does): it may read its way to the
    interpreter (CAP_DAC_READ_SEARCH), what it checks is still its uid's."""
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *caps, *argv]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT, env=child_env(None), check=False
    )


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """``/var/lib/tlsroll`` as install.sh makes it: the service user's (nobody), 0750, in a
    directory of root's."""
    tmp_path.chmod(0o755)
    data = tmp_path / "tlsroll"
    data.mkdir(mode=0o750)
    nobody = pwd.getpwnam("nobody")
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    yield data


def test_root_running_init_on_the_service_users_data_dir_is_told_to_run_it_as_that_user(
    installed: Path,
) -> None:
    """M2: root's ``tlsroll init`` on install.sh's data dir was told ``chown root`` it (only
    the directory holding it was looked at: root's /var/lib)."""
    done = run([*command("tlsroll", "tlsroll"), "init", "--data-dir", str(installed),
                "--address", next_loopback()])  # fmt: skip
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert "run it as nobody, with the same arguments: runuser -u nobody -- " in done.stderr, (
        done.stderr
    )
    assert "chown" not in done.stderr, done.stderr
    assert sorted(installed.iterdir()) == []  # nothing made


def test_an_admin_of_the_service_group_is_told_to_run_it_as_the_service_user(
    installed: Path,
) -> None:
    """M3: a non-root admin (of group tlsroll, who may read the data dir) running a command on
    a directory of the service's was told to ``chown`` it to themselves. Now: run it as the
    service's user, root's way given as an aside. L3: never ``runuser -u`` to themselves."""
    ca = installed / "ca"
    ca.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(ca, nobody.pw_uid, nobody.pw_gid)
    installed.chmod(0o755)  # the admin reaches it (as group tlsroll would)
    code = (
        "import sys; from pathlib import Path; from tlsroll import fsutil\n"
        "try:\n    fsutil.make_private_dir(Path(sys.argv[1]))\n"
        "except fsutil.UnsafePermissions as exc:\n    print(exc)\n"
    )
    done = run(as_user("daemon", [sys.executable, "-c", code, str(ca)]))
    assert done.returncode == 0, done.stderr
    said = done.stdout.strip()
    assert said.startswith(f"directory {ca} is owned by nobody"), said
    assert said.endswith(
        "run it as nobody, with the same arguments (as root: runuser -u nobody -- COMMAND …)"
    ), said
    assert "chown" not in said and "runuser -u daemon" not in said, said


def test_a_non_root_leader_names_its_one_shot_without_runuser_to_itself(tmp_path: Path) -> None:
    """L3: the lost store's line, given by a leader running as alice (nobody here), told
    alice ``runuser -u alice -- …``, which only root may run."""
    config = tmp_path / "leader.toml"
    code = (
        "import sys; from pathlib import Path; from leader.runtime import recovery_command\n"
        "print(recovery_command(Path(sys.argv[1])))\n"
    )
    done = run(as_user("nobody", [sys.executable, "-c", code, str(config)]))
    assert done.returncode == 0, done.stderr
    run_it = f"tlsroll-leader --config {config} --reinitialise"
    assert done.stdout.strip() == (
        f"`{run_it}` as nobody (as root: `runuser -u nobody -- {run_it}`)"
    ), done.stdout


def test_the_agent_running_as_root_is_told_to_chown_not_to_run_as_another_user(
    installed: Path,
) -> None:
    """L1: the agent's unit runs as root: a data dir of another user's is chowned to root, not
    "run it as nobody … runuser -u nobody -- tlsroll-agent"."""
    agent_data = installed / "agent"
    agent_data.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(agent_data, nobody.pw_uid, nobody.pw_gid)
    config = installed.parent / "agent.toml"
    write_toml(
        config,
        {
            "node": {"name": "one", "addresses": [next_loopback()]},
            "leader": {"address": "127.0.0.1", "ca_pin": "sha256:" + "0" * 64, "join_token": "x"},
            "agent": {"data_dir": agent_data},
        },
    )
    done = run([*command("tlsroll-agent", "nodeagent.daemon"), "--config", str(config)])
    # a config error since s50agent2 (exit 2: a restart does not chown it)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"tlsroll-agent: config error: {config}: [agent].data_dir: directory {agent_data} is"
        " owned by nobody"
    ), line
    assert line.endswith(f"run: chown root {agent_data}"), line
    assert "runuser" not in line, line
