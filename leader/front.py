"""The leader's start up to its config loaded and its data dir checked: what a start refused
costs little.

``tlsroll-leader`` reads its command line, its config and the first checks of its data dir
here, before it imports the daemon (``leader.runtime``: gRPC, protobuf, ``cryptography``, the
store, the engine, about two thirds of a start's CPU). ``--help`` and ``--version``, a usage
error, a config refused (missing, not parsed, a key wrong: ``ConfigError``, exit 2; missing
beside nothing, or below a disk not mounted: exit 1) and a data dir refused
(``check_data_dir``) are answered with none of that imported (session 74, leaderfront; the
agent's is ``nodeagent.front``): a leader that systemd restarts on a disk not mounted yet,
and the test suite's refused starts. The checks, their order, the line said and the exit
code are those of ``runtime.main``, which runs this first; any other failure here is handed
to ``runtime.refused`` as before, and ``--backup`` to ``runtime``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import stat
from pathlib import Path

from leader.config import LeaderConfig
from leader.layout import FIRST_START, Layout, interrupted_init
from tlsroll import __version__, daemon, fsutil, logs, testhooks
from tlsroll.errors import ConfigError, NotRegularFile, TerminalError, os_error_text

EXIT_CONFIG = 2
"""A config or usage error (``runtime``'s exit codes say all of them)."""
PROG = "tlsroll-leader"


def parser() -> argparse.ArgumentParser:
    parser = daemon.arguments(PROG, "tlsroll leader daemon")
    parser.add_argument(
        "--config", type=daemon.path_argument, required=True, help="leader.toml (see tlsroll init)"
    )
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
        help="begin an empty store in place of a lost (missing, empty or damaged) one and exit"
        " (no CA passphrase needed; run it as the leader's user), then start the leader as"
        " before: it re-learns the enrolled nodes from their agents for 24 h; refused (exit 2)"
        " if the store is intact or only cannot be opened now (a full or read-only disk)",
    )
    parser.add_argument(
        "--backup",
        type=daemon.path_argument,
        metavar="DIR",
        help="write a consistent copy of the store, the config, the CA and the leader's own "
        "certificate into DIR (new or empty; made 0700) and exit; the leader may be running",
    )
    parser.add_argument(
        "--repin-ca",
        nargs="*",
        metavar="PIN",
        help="RECORDED PIN: the store is of the CA in ca/ (PIN) from now on, in place of the"
        " one it records (RECORDED), then exit; for a store an earlier release pinned to a"
        " wrong ca/; with no pins, or others, it names both and changes nothing (exit 2);"
        " run it as the leader's user with the leader stopped",
    )
    return parser


def start(argv: list[str] | None = None) -> tuple[argparse.Namespace, LeaderConfig] | int:
    """The command line read, the config loaded and the data dir checked (``runtime.run``
    configures the logs from it); or the exit code of a start refused, its line said, or of
    ``--backup``."""
    parser_ = parser()
    ns = parser_.parse_args(argv)
    if ns.backup is not None and ns.reinitialise:  # (the backup alone ran: rev57b L4)
        parser_.error("--backup and --reinitialise are two things to do: run one, then the other")
    if ns.repin_ca is not None and (ns.backup is not None or ns.reinitialise):
        parser_.error("--repin-ca is a thing of its own: run it alone, then the other")
    if ns.repin_ca is not None and len(ns.repin_ca) not in (0, 2):
        parser_.error("--repin-ca takes two pins (the store's, then ca/'s) or none")
    daemon.no_core_dumps()  # before any key or secret is read
    if ns.backup is not None:
        from leader import runtime  # noqa: PLC0415 - only for this command

        return runtime.backup_command(ns.config, ns.backup)
    try:
        if (empty := config_not_yet_there(ns.config)) is not None:
            raise empty
        cfg = LeaderConfig.load(ns.config)
        # A test's knob (a weaker CA key, a shorter lease margin, ...) never in an installed
        # leader's start (``keywrap.hook_refused_for`` was the scrypt hook's alone).
        if (refusal := testhooks.refused((cfg.layout.data_dir, ns.config))) is not None:
            raise ConfigError("environment", None, refusal)
        check_data_dir(cfg)
    except (ConfigError, NotRegularFile) as exc:
        # NotRegularFile: a file to read (a key) is a directory or a FIFO, for a person to fix
        daemon.say(PROG, exc)
        return EXIT_CONFIG
    except OSError as exc:
        daemon.say(PROG, f"{os_error_text(exc)}")
        return 1
    except Exception as exc:
        if type(exc) is TerminalError:  # a disk not mounted yet, no leader's files: restarted
            daemon.say(PROG, exc)
            return 1
        from leader import runtime  # noqa: PLC0415 - only for a rare failure (see above)

        return runtime.refused(exc, ns, None)
    return ns, cfg


# Where ``install.sh ca-credential`` has the unit's ExecStartPre= copy the decrypted credential
# (``ca_passphrase_file`` then names it): a wrong passphrase there is the credential's.
CREDENTIAL_COPY_DIR = Path("/run/tlsroll")


def ca_file_error(what: str, problem: str) -> ConfigError:
    """A file of the leader's it cannot start with (a CA file, its certificate or key: missing,
    unreadable by its content or by its permissions, of a key type it does not take, a key
    that is not the certificate's, a certificate that is no CA, a key others can read or that
    is no regular file; a store it may not write): a person's to fix, restarting changes
    nothing, so a config error, exit 2, which systemd does not restart (review s49cli M1, M2,
    session 50: some exited 1 and were started again every 5 s for ever). One line naming
    the file."""
    return ConfigError(what, None, problem)


START_FILES = (
    ("CA key", "ca_key"),
    ("CA certificate", "ca_cert"),
    ("leader TLS key", "tls_key"),
    ("leader certificate", "tls_cert"),
)
"""The files every start reads (``Layout``'s names), as its lines call them."""


def check_data_dir(cfg: LeaderConfig) -> None:
    """``data_dir`` names a directory: a config error (exit 2) if not, before anything in it
    is looked at (a missing one was "ca/ca.key: No such file", exit 1: review s47rtin L4).
    Missing, closed, not writable or holding none of the leader's files below a mount point
    not mounted now, it is a disk not mounted yet (``not_mounted``): exit 1; exit 2 for one
    fstab marks ``noauto``, which nothing but a person mounts."""
    where = cfg.layout.data_dir
    try:
        mode = os.stat(where).st_mode
    except FileNotFoundError:
        if (unmounted := not_mounted("data dir", where)) is not None:
            raise unmounted from None
        raise ConfigError(
            cfg.path, "[leader].data_dir", f"{where}: no such directory (tlsroll init makes it)"
        ) from None
    except OSError as exc:  # a directory on its way we may not enter (session 50: exit 1)
        if (problem := fsutil.open_problem(where, own=where)) is None:
            raise
        if (unmounted := not_mounted("data dir", where)) is not None:
            raise unmounted from None
        raise ConfigError(cfg.path, "[leader].data_dir", problem) from exc
    if not stat.S_ISDIR(mode):
        raise ConfigError(
            cfg.path, "[leader].data_dir", f"{where} is not a directory ({fsutil.file_kind(mode)})"
        )
    if (problem := not_yet_there(cfg.layout)) is not None:
        # exit 1: the service manager starts it again; exit 2 if nothing will mount its disk
        raise not_mounted("data dir", where) or TerminalError(problem)
    if (cut := interrupted_init(cfg.layout)) is not None:
        raise init_cut_short(cfg, *cut)  # exit 2: (a config elsewhere: review rev50f L1)
    # The store's -wal and -shm are made beside it, the certificates written again in its
    # subdirectories: one we may not write was SQLite's "readonly database", exit 1 (s50).
    if (problem := fsutil.dir_write_problem(where)) is not None:
        if (unmounted := not_mounted("data dir", where)) is not None:
            raise unmounted  # (an empty mountpoint, root's 0700: rev50f M2)
        raise ConfigError(
            cfg.path, "[leader].data_dir", f"{problem} (the leader keeps its store in it)"
        )


# What a leader's data dir holds once ``tlsroll init`` ran there (``leader.layout``), the
# store and its mark once the leader ran: a data dir with none of them is no leader's yet.
LEADER_ENTRIES = (
    "ca",
    "tls",
    "secrets",
    "run",
    "leader.toml",
    "leader.sqlite3",
    "leader.sqlite3.created",
    FIRST_START,
)


def not_yet_there(layout: Layout) -> str | None:
    """What a data dir holding none of the leader's files (``LEADER_ENTRIES``) is: an empty
    mountpoint whose disk is not mounted yet (``data_dir`` outside the unit's
    StateDirectory=, on a disk of its own: a mountpoint of nothing is on its parent's file
    system), or a directory ``tlsroll init`` has not set up. Restarting heals the first, so it
    is no config error (exit 1, never "restore ca.key from a backup" nor a chown of the bare
    mountpoint: review of s50lead M1). None if any of them is there, or if the directory
    cannot be searched (then nothing can be told: the checks that follow say why)."""
    where = layout.data_dir
    for name in LEADER_ENTRIES:
        try:
            os.lstat(where / name)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        return None
    try:
        same_fs = os.stat(where).st_dev == os.stat(where.parent).st_dev  # a mountpoint of nothing?
    except OSError:
        same_fs = False
    on = (
        f" and is on the file system of {where.parent}" if same_fs and where != where.parent else ""
    )
    return (
        f"the data dir {where} holds none of the leader's files (ca/, tls/, leader.sqlite3){on}:"
        " is its disk not mounted yet, or tlsroll init not run there? (exit 1: its"
        " service manager starts it again)"
    )


def init_cut_short(cfg: LeaderConfig, made: list[Path], missing: list[Path]) -> ConfigError:
    """A data dir an interrupted ``tlsroll init`` left (``layout.interrupted_init``: the
    files it ``made``, the ones ``missing``), as the leader finds it with a config of its own
    elsewhere: no backup holds its files, as no leader has run there ("restore it from a
    backup" was said of them: review rev50f L1); init runs again once what it made is
    removed (it never overwrites a CA key: ``_refuse_made``). One line naming the first
    missing file, what was made and the commands, exit 2."""
    data = cfg.layout.data_dir
    labels = {getattr(cfg.layout, name): what for what, name in START_FILES}
    again = ["tlsroll", "init"]
    again += ["--data-dir", str(data), "--address", cfg.address]
    for name in cfg.dns_names:
        again += ["--dns", name]
    if cfg.node_name is not None:
        again += ["--node-name", cfg.node_name]
    given = cfg.ca_passphrase_file
    # (not systemd's copy of the credential: there only while the unit starts)
    if given != cfg.layout.default_passphrase_file and given.parent != CREDENTIAL_COPY_DIR:
        again += ["--ca-passphrase-file", str(given)]
    command = shlex.join(again)
    relative = ", ".join(str(p.relative_to(data)) for p in missing)
    if made:
        did = f"it made {', '.join(str(p.relative_to(data)) for p in made)}, not {relative}"
        fix = f"remove what it left and run it again: rm {shlex.join(map(str, made))} && "
    else:
        did, fix = f"it made none of {relative}", "run it again: "
    return ca_file_error(
        labels[missing[0]],
        f"{missing[0]} is missing: an earlier `tlsroll init` on {data} was interrupted (no"
        f" leader has run there; {did}); {fix}{command} (if you are restoring a backup"
        " there instead, finish restoring it: its files, not a new init)",
    )


def not_mounted(what: str, path: Path) -> TerminalError | None:
    """``fsutil.not_mounted`` of the leader's ``path`` (its data dir, its config: ``what``): a
    disk not mounted yet, exit 1, or a ``noauto`` one only a person mounts, exit 2."""
    return fsutil.not_mounted(what, path, "tlsroll-leader")


def config_not_yet_there(config: Path) -> TerminalError | None:
    """The shipped unit's case of ``not_yet_there``: its config (``leader.toml``, which ``tlsroll
    init`` writes into the data dir) is missing and the directory meant to hold it is empty
    (``lost+found`` aside): an empty mountpoint whose disk is not mounted yet, or init not run.
    Exit 1, started again (review rev50f M1: "no such file" was a config error, exit 2, the
    leader stopped for good once the disk came). None when the file or anything beside it is
    there, or the directory cannot be listed (the config's own error then says why), unless
    a directory on its way is a mount point not mounted now (``not_mounted``: exit 1, or 2
    for a ``noauto`` one). The error to stop with, or None."""
    if os.path.lexists(config):
        return None
    if (unmounted := not_mounted("config", config)) is not None:
        return unmounted  # (missing, or in a directory we may not enter: rev50f M2)
    try:
        beside = [e for e in os.listdir(config.parent) if e != "lost+found"]
    except OSError:
        return None
    if beside:
        return None
    return TerminalError(
        f"the config {config} is missing and {config.parent} is empty: is its disk not mounted"
        " yet, or tlsroll init not run there? (exit 1: its service manager starts it again)"
    )
