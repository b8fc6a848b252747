"""Whether a file system has room for what a switch writes, before one begins (session 73).

A node whose disk is full froze its server for a switch, then failed its journal's write
mid-way: a switch held until the admin freed space (``nodeagent.transaction.Runner``'s
hold). The agent's checks (its preflight, `tlsroll plan`, its stage again) and the leader's
`rollout start` look at the free space first (``os.statvfs``: the blocks an unprivileged
writer may use, ``f_bavail`` × ``f_frsize``) against a floor that covers what a switch writes
there:

* the agent's data dir (its journal): ``JOURNAL_ROOM``, the ``-wal`` as SQLite bounds it by
  its own automatic checkpoint (1000 pages of 4 KiB), which it may reach while the journal's
  idle checkpoint waits through a freeze window; a switch's own records (about fifteen
  commits of a few pages) are a small part of it;
* the managed server's config directory: ``CONFIG_ROOM`` and ``CONFIG_COPIES`` times the
  config's size: the staged key, certificate and CA bundle (a block each at least) and the
  files beside the live config a switch writes (the new config, the old one kept for the way
  back, a temporary one: the config's size each);
* the leader's data dir (its store): ``LEADER_ROOM``, the ``-wal``'s bound as above and the
  rows a rollout adds (a few KiB per node and step: about 4 MiB for 200 nodes).

Two of them on one file system need their sum there. A floor, not a promise: a disk that
something else fills meanwhile still fails (the switch is then held, as before).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

MIB = 1 << 20
JOURNAL_ROOM = 4 * MIB
CONFIG_ROOM = 64 * 1024
CONFIG_COPIES = 4
LEADER_ROOM = 8 * MIB


def free_bytes(directory: Path) -> int:
    """The bytes an unprivileged writer may still use on ``directory``'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def size_text(count: int) -> str:
    """``count`` bytes as df -h would say them, roughly (KiB below a MiB)."""
    if count < MIB:
        return f"{count / 1024:.0f} KiB"
    return f"{count / MIB:.1f} MiB"


def said_until(need: int) -> int:
    """The free space a file system said short of ``need`` must be back to before the agent's
    heartbeat calls it over (``room_problems``' ``held``): the floor and a margin, a quarter of
    it and a MiB at least. Free space hovering at the floor made every beat news and a
    leader's log line per flip (review of s74 agenttrouble, L2)."""
    return need + max(MIB, need // 4)


def room_problems(
    needs: Sequence[tuple[str, Path, int]],
    work: str = "a switch",
    held: set[int] | None = None,
) -> list[str]:
    """One line per file system among ``needs`` (what, directory, bytes needed) with less free
    than the sum needed there for ``work``, naming its directories; a directory that cannot be
    looked at (gone, no access) is not said here (the checks that write there say it).

    ``held`` (what the agent's heartbeat says: ``NodeAgentService.store_trouble``): the file
    systems (devices) said short at the last call, kept up to date; one of them stays said
    until its free space is back to ``said_until`` the need, and every line says that bound
    (its words change only with their figures) in words true on both sides of the floor ("free
    space is low": between the floor and the margin the checks pass; before, it said "too
    little free space" there). The checks and the Stage refuse by the floor alone (no
    ``held``)."""
    by_fs: dict[int, list[tuple[str, Path, int]]] = {}
    for what, directory, need in needs:
        try:
            device = os.stat(directory).st_dev
        except OSError:
            continue
        by_fs.setdefault(device, []).append((what, directory, need))
    problems = []
    for device, group in by_fs.items():
        try:
            free = free_bytes(group[0][1])
        except OSError:
            continue
        need = sum(n for _, _, n in group)
        if free >= (said_until(need) if held is not None and device in held else need):
            if held is not None:
                held.discard(device)
            continue
        where = " and ".join(f"{what} {directory}" for what, directory, _ in group)
        one = "its file system" if len(group) == 1 else "their file system"
        has = "has" if len(group) == 1 else "have"
        if held is None:
            problems.append(
                f"too little free space for {work}: {where} {has} {size_text(free)} free,"
                f" {work} needs {size_text(need)}; free space on {one} (df -h)"
            )
            continue
        held.add(device)
        # (One wording below the floor and between it and the margin, where the checks pass:
        # true of both, and the same words on either side are no news: ``said_until``.)
        problems.append(
            f"free space is low for {work}: {where} {has} {size_text(free)} free, {work} is"
            f" refused below {size_text(need)} (said until {size_text(said_until(need))} are"
            f" free); free space on {one} (df -h)"
        )
    return problems
