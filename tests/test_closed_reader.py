"""A reader that closes the pipe early (`tlsroll plan | head`, `… | grep -q`, a pager quit):
normal use, not an error. Session 68's README walk: `tlsroll plan … | head` exited 1; a
command whose stdout's reader has gone now ends quietly, as `ls | head` does: nothing on
stderr, exit 141 (128 + SIGPIPE, what a shell reports of a tool ended by its closed pipe, under
`set -o pipefail` too), whatever it printed. A secret nobody saw is not such a case:
`token create` revokes it and says so (session 67), exit 1.

Real processes: a leader, one node's agent and reference server, and the CLI as a program
whose stdout is a pipe with no reader, so that its first write finds it gone (a reader that
closes after some lines is the same to the writer: its next write fails so)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import CLI_TIMEOUT, Cluster, child_env, command
from tests.nodeside import cluster_of

BROKEN_PIPE = 141  # 128 + SIGPIPE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster_of(tmp_path_factory.mktemp("cr"), 1) as (one, _nodes):
        yield one


def no_reader(cluster: Cluster, *args: str) -> tuple[int, str]:
    """``tlsroll ARGS`` with its stdout a pipe whose reader has gone: its exit code, stderr."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [*command("tlsroll", "tlsroll"), *args],
            stdin=subprocess.DEVNULL,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=CLI_TIMEOUT,
            env=child_env(
                {
                    "TLSROLL_DATA_DIR": str(cluster.data_dir),
                }
            ),
            check=False,
        )
    finally:
        os.close(write)
    return done.returncode, done.stderr


# Every command that prints a lot (and a few that print little), with and without --json.
PLANS = [("plan", "--scope", "cluster"), ("plan", "--scope", "cluster", "--json")]
LISTINGS = [
    ("schema", "show"),
    ("schema", "show", "--all", "--json"),
    ("nodes",),
    ("nodes", "--json"),
    ("certs", "check-expiration"),
    ("certs", "check-expiration", "--json"),
    ("rollout", "status"),
    ("epoch", "show"),
    ("token", "list"),
    ("viewer", "list"),
    ("workstations", "list"),
    ("ca", "show"),
    ("notify",),
    ("--help",),
    ("schema", "show", "--help"),
]


@pytest.mark.timeout(300)
def test_a_reader_that_closed_early_ends_each_command_quietly(
    cluster: Cluster, tmp_path: Path
) -> None:
    said = {" ".join(args): no_reader(cluster, *args) for args in PLANS}
    password = tmp_path / "pw"
    password.touch(0o600)
    password.write_text("closed-reader-test-password\n")
    started = cluster.cli(
        "rollout", "start", "--scope", "cluster", "--password-file", str(password), "--yes",
        "--wait", timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    said |= {" ".join(args): no_reader(cluster, *args) for args in LISTINGS}
    wrong = {a: s for a, s in said.items() if s != (BROKEN_PIPE, "")}
    assert not wrong, "\n".join(f"{a}: {s}" for a, s in wrong.items())
