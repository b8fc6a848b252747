"""A secret the CLI prints goes into no file others may read (review s66 logs M4): ``tlsroll
token create`` (the bare token and ``--print-join-command``'s script) and ``tlsroll viewer
grant`` (the login link) with stdout a regular file group or others may read (``> join.sh``
under the usual umask 022 makes it 0644) are refused before anything is made: exit 2, one line
naming the file and its mode, the file left empty, no token and no grant on record. Into a
file of mode 0600 they work as before. ``notify --include-password`` refuses the same way
(``tests/test_notify_cli.py``); the rule is one, ``leader.cli.base.private_stdout``. The CLI runs
as a process against a real leader."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, child_env, command, one_line_error
from tests.conftest import next_loopback

NODE_ADDRESS = "127.190.50.2"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("secret-stdout"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def into(cluster: Cluster, path: Path, mode: int, *args: str) -> tuple[int, str]:
    """``tlsroll ARGS > path`` (``path`` made with ``mode`` first, whatever the umask): the
    exit code and stderr."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)
    try:
        result = subprocess.run(
            [*command("tlsroll", "tlsroll"), *args],
            stdout=fd,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=child_env({"TLSROLL_DATA_DIR": str(cluster.data_dir)}),
            check=False,
        )
    finally:
        os.close(fd)
    return result.returncode, result.stderr


def on_record(cluster: Cluster) -> tuple[list[str], list[str]]:
    """The ids of the tokens and of the viewer grants the leader keeps."""
    ids = []
    for what in ("token", "viewer"):
        listed = cluster.cli(what, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        ids.append(sorted(item["id"] for item in json.loads(listed.stdout)))
    return ids[0], ids[1]


TOKEN = ("token", "create", "--node", "node2", "--address", NODE_ADDRESS)
JOIN = (*TOKEN, "--print-join-command")
GRANT = ("viewer", "grant", "--name", "front desk")


@pytest.mark.parametrize(
    ("args", "holds"),
    [
        (TOKEN, "the token is a secret"),
        (JOIN, "the join script holds the token"),
        (GRANT, "the login link is a secret"),
    ],
    ids=["token", "join-command", "viewer-grant"],
)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=["0644", "0640", "0604"])
def test_a_secret_goes_into_no_file_others_may_read(
    cluster: Cluster, tmp_path: Path, args: tuple[str, ...], holds: str, mode: int
) -> None:
    before = on_record(cluster)
    shared = tmp_path / "shared.out"
    code, err = into(cluster, shared, mode, *args)
    assert code == 2, err
    line = one_line_error(err, "tlsroll")
    assert line.startswith(
        f"tlsroll: error: stdout {shared} is readable by others (mode {mode:04o}); {holds}:"
        " chmod 600 it and run the command again (umask 077 makes a new file 0600; one that is"
        " there keeps its mode)"
    ), line
    assert shared.read_bytes() == b"", "the secret went into a file others may read"
    assert on_record(cluster) == before, "a token or grant was made and lost to the file"


def test_into_a_private_file_the_secret_is_printed(cluster: Cluster, tmp_path: Path) -> None:
    tokens, grants = on_record(cluster)
    code, err = into(cluster, tmp_path / "token.txt", 0o600, *TOKEN)
    assert code == 0, err
    token = (tmp_path / "token.txt").read_text().strip()
    code, err = into(cluster, tmp_path / "join.sh", 0o600, *JOIN)
    assert code == 0, err
    script = (tmp_path / "join.sh").read_text()
    code, err = into(cluster, tmp_path / "link.txt", 0o600, *GRANT)
    assert code == 0, err
    link = (tmp_path / "link.txt").read_text().strip()
    now_tokens, now_grants = on_record(cluster)
    made = sorted(set(now_tokens) - set(tokens))
    assert len(made) == 2 and token.split(".", 1)[0] in made, (made, token)
    assert script.startswith("#!") and any(i in script for i in made if i not in token)
    assert len(set(now_grants) - set(grants)) == 1 and "/login/" in link
