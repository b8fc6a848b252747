"""The agent's start up to its config loaded: what a start refused costs little.

``tlsroll-agent`` reads its command line and its config here, before it imports the daemon
(``nodeagent.runtime``: gRPC, protobuf, the journal, the drivers, the crypto worker's
client, about half of a start's CPU). ``--help`` and ``--version``, a usage error and a config
refused (missing, not parsed, a key wrong: ``ConfigError``, exit 2) are answered with none of
that imported: some 0.1 s of CPU less for each (session 74, startcpu), for an agent that
systemd restarts on a bad config and for the test suite's refused starts. The checks, their
order, the line said and the exit code are those of ``runtime.main``, which runs this first;
any other failure here is handed to ``runtime.refused`` as before.
"""

from __future__ import annotations

import argparse
import os

from nodeagent.config import AgentConfig
from tlsroll import __version__, daemon, fsutil, logs, testhooks
from tlsroll.errors import ConfigError, NotRegularFile

EXIT_CONFIG = 2
"""A config or usage error (``runtime``'s exit codes say all of them)."""
PROG = "tlsroll-agent"


def parser() -> argparse.ArgumentParser:
    parser = daemon.arguments(PROG, "tlsroll node agent")
    parser.add_argument("--config", type=daemon.path_argument, required=True, help="agent.toml")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=list(logs.LEVELS),
        help="debug, info, warning or error (default: log_level in the config, else info)",
    )
    parser.add_argument(
        "--reinitialise",
        action="store_true",
        help="begin an empty journal in place of a missing, empty or damaged one (the lost"
        " file is kept beside it) and exit, with the agent stopped; then start the agent as"
        " before; refused (exit 2) if the journal is intact or only cannot be opened now (a full"
        " or read-only disk)",
    )
    parser.add_argument(
        "--journal-checked",
        action="store_true",
        help="the admin has checked the managed server after a journal put back from a copy"
        " left a transaction whose outcome the server did not show (the node 'needs the"
        " admin'): the agent records that and exits, with the agent stopped; started as before,"
        " the node is planned and switched again",
    )
    return parser


def start(argv: list[str] | None = None) -> tuple[argparse.Namespace, AgentConfig] | int:
    """The command line read and the config loaded (``runtime.run`` configures the logs from
    it); or the exit code of a start refused, its line said."""
    ns = parser().parse_args(argv)
    daemon.no_core_dumps()  # before any key or secret is read
    fsutil.runs_as_root()  # its unit's User=root: never told to run as another user
    try:
        # A config below a mount point not mounted now: missing, or in a directory we may not
        # enter (the leader's ``config_not_yet_there``), a disk not mounted yet, never "no
        # such file", exit 2, the agent stopped for good before the disk came.
        if not os.path.lexists(ns.config) and (
            unmounted := fsutil.not_mounted("config", ns.config, PROG)
        ):
            raise unmounted
        cfg = AgentConfig.load(ns.config)
        # A test's knob (kill the agent mid-switch, ...) never in an installed agent's start.
        if (refusal := testhooks.refused((cfg.data_dir, ns.config))) is not None:
            raise ConfigError("environment", None, refusal)
    except (ConfigError, NotRegularFile) as exc:
        # NotRegularFile: a file to read (join_token_file, a key) is a directory or a FIFO,
        # for a person to fix (review s47rtin L4)
        daemon.say(PROG, exc)
        return EXIT_CONFIG
    except Exception as exc:  # as the daemon's start says any other: rare, so imported now
        from nodeagent import runtime  # noqa: PLC0415 - only for a rare failure (see above)

        return runtime.refused(exc, ns, None)
    return ns, cfg
