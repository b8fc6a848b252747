"""The daemons' test-only environment knobs (``TLSROLL_TEST_*``, ``TLSROLL_AGENT_TEST_*``,
``TLSROLL_REFSERVER_TEST_*``; README "Development"), seen alike by each daemon's start.

Each shortens a wait, a lease margin or a key's cost, kills the agent mid-switch, or changes
what it reports, so that a test sees in seconds what takes minutes. None is a setting: one left
in a unit's drop-in (``Environment=``, ``EnvironmentFile=``) or in the service manager's
``DefaultEnvironment=`` must not weaken an installed server without a word (audit s75
knobaudit). So an installed daemon, one whose data dir or config is the unit's
(``INSTALLED``), refuses to start while any is set (``refused``: a config error, exit 2, that
names them), and a daemon elsewhere (a test's, a developer's) says each it reads at its start
(``set_hooks``, logged with ``HINT``).

Small on purpose (``os`` and ``pathlib``): the daemons' fronts ask it before they import the
daemon, so a start refused imports nothing more.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

PREFIXES = ("TLSROLL_TEST_", "TLSROLL_AGENT_TEST_", "TLSROLL_REFSERVER_TEST_")
"""What a test-only knob's name begins with (``TLSROLL_TEST_SLOT`` too: the suite's, never a
daemon's; in an installed unit's environment it has no business either)."""

SET_WHEN_EMPTY = frozenset({"TLSROLL_AGENT_TEST_FEATURES"})
"""Knobs that act when empty (``features.TEST_ENV``: empty is "no features", an agent of an
earlier release); any other empty one is as unset."""

INSTALLED = (
    Path("/var/lib/tlsroll"),  # the leader's unit: its data dir (tlsroll.defaults) ...
    Path("/var/lib/tlsroll/leader.toml"),  # ... and its --config
    Path("/var/lib/tlsroll-agent"),  # the agent's unit: its StateDirectory= ...
    Path("/etc/tlsroll/agent.toml"),  # ... and its --config (a data dir moved elsewhere)
)
"""The data dirs and configs the units of deploy/systemd name."""

HINT = (
    "tests only, not a setting: remove it from the daemon's environment (a drop-in's"
    " Environment= or EnvironmentFile=, systemctl show-environment); an installed daemon"
    " refuses to start while one is set"
)


def set_hooks(
    environ: Mapping[str, str] = os.environ, names: Iterable[str] | None = None
) -> dict[str, str]:
    """The test-only knobs set in ``environ`` (only those of ``names``, if given), sorted by
    name: each with its value, cut to 40 characters (none holds a secret; a log line stays
    short)."""
    wanted = None if names is None else frozenset(names)
    return {
        name: value[:40]
        for name, value in sorted(environ.items())
        if name.startswith(PREFIXES)
        and (wanted is None or name in wanted)
        and (value or name in SET_WHEN_EMPTY)
    }


def _same(path: Path, unit: Path) -> bool:
    """``path`` is ``unit``'s file or dir (through a link too)."""
    from tlsroll.fsutil import real_path  # noqa: PLC0415 - the fronts hold it already

    try:
        return real_path(path) == real_path(unit)
    except OSError:  # (a symbolic link loop on the way)
        return path.absolute() == unit


def installed(paths: Iterable[Path], units: Iterable[Path] | None = None) -> Path | None:
    """The first of ``paths`` (a daemon's data dir, its config) that is an installed unit's
    (``units``; ``INSTALLED`` if None), or None."""
    known = INSTALLED if units is None else tuple(units)
    return next((p for p in paths if any(_same(p, u) for u in known)), None)


def refused(
    paths: Iterable[Path],
    environ: Mapping[str, str] = os.environ,
    units: Iterable[Path] | None = None,
) -> str | None:
    """Why a daemon whose data dir and config are ``paths`` may not start: a test-only knob
    set (``set_hooks``) for an installed unit's (``installed``); one line naming at most three
    of them. None: not refused."""
    hooks = list(set_hooks(environ))
    if not hooks or (where := installed(paths, units)) is None:
        return None
    more = f" and {len(hooks) - 3} more" if len(hooks) > 3 else ""
    # (an admin's own run, ``--reinitialise``, ``--journal-checked``, has the shell's: review
    # s75 revknob, the unit's drop-ins alone were named)
    return (
        f"{', '.join(hooks[:3])}{more} (tests only) set in the environment of the installed"
        f" daemon of {where}, which never runs with a test's knob: remove it from its"
        f" environment (run by hand: `unset {' '.join(hooks[:3])}`{more} in that shell; by"
        " its unit: a drop-in's Environment= or EnvironmentFile=, systemctl"
        " show-environment), then start it again"
    )
