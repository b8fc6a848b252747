"""Making a transaction's plan, before it starts: the target config and everything the runner
needs, from the journal, the driver and what the leader asked for. No gRPC here: the servicer
checks the caller, converts the request and calls one of these.

    built = switch_plan(journal, driver, txn_dir, "r1", verifier=None)
    built.config       # the target config (the journal keeps it with the transaction)
    built.plan         # fixed from now on: the journal keeps it as the transaction's plan
    built.fingerprint  # the certificate https must present afterwards ("" = no new one)

Blocking (reads the server's config, writes files): call through ``asyncio.to_thread``. A node
that is not ready for the change gets ``PlanRefused`` and nothing on the server has changed
(a staged verifier is inactive until a transaction names it). A file
that cannot be read or written gives ``PrepareFailed`` naming the file and the errno, which the
servicer sends on to the leader (so the schema says ``No space left on device``, not "internal
error").
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import itertools
import os
import re
import shutil
import ssl
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec

from nodeagent.drivers import Driver, DriverError, ServerFacts, Target
from nodeagent.journal import Journal, Staged, StageNeeds, Txn
from nodeagent.sharing import SECRET_FILES as SECRET_FILES  # noqa: PLC0414
from nodeagent.sharing import Sharing as Sharing  # noqa: PLC0414
from nodeagent.sharing import _said_group_wide, _said_unkept, refuse_linked_config
from nodeagent.sharing import refuse_unsafe_dir as refuse_unsafe_dir  # noqa: PLC0414
from nodeagent.sharing import write_staged as write_staged  # noqa: PLC0414
from nodeagent.transaction import HTTP_WRITTEN, Plan, describe
from tlsroll import enums, logs, password, tls
from tlsroll.enums import Change, TxnKind, TxnOutcome
from tlsroll.errors import (
    ConfigError,
    NotRegularFile,
    PKIError,
    PKIReason,
    TerminalError,
    UnsafePermissions,
    os_error_text,
)
from tlsroll.fsutil import (
    PRIVATE,
    fsync_dir,
    give_file,
    make_private_dir,
    read_regular,
)

log = logs.get_logger(__name__)

STAGES = "tlsroll-tls"  # beside the live config: one directory per rollout staged here
# A rollout id as the agent accepts it (its stage directory's name).
ROLLOUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# A dual node (transitional phase 1) serves both, the same certificate on https.
DUAL = ("http", "https")
ENABLE_DUAL = enums.ENABLE_DUAL  # Plan.change of the phase-1 switch (enable-tls, keep_http)


class PlanRefused(TerminalError):
    """The node is not ready for this change (nothing staged, not on https, nothing to roll
    back); the message says what to do first."""


class PrepareFailed(TerminalError):
    """A file the transaction needs could not be read or written; nothing on the server has
    changed. The message names the file and the errno."""


P = ParamSpec("P")


def _keeps_cause(build: Callable[P, Built]) -> Callable[P, Built]:
    """An OSError while making a plan becomes ``PrepareFailed`` with its path and errno."""

    @functools.wraps(build)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Built:
        try:
            return build(*args, **kwargs)
        except OSError as exc:
            raise PrepareFailed(f"cannot prepare the transaction: {os_error_text(exc)}") from None

    return wrapper


class Built(NamedTuple):
    config: bytes
    plan: Plan
    fingerprint: str


def stage_dir(driver: Driver, rollout_id: str) -> Path:
    """Staged files live beside the live config, inactive until a switch names them."""
    return driver.config_file.parent / STAGES / rollout_id


# --- who may read what a switch names ----------------------------------------------------------


def sharing(driver: Driver) -> Sharing:
    """The access the live config gives (blocking: its stat), as ``Sharing`` says."""
    if not driver.own_user:
        return Sharing.own()
    try:
        st = os.stat(driver.config_file)
    except FileNotFoundError:
        return Sharing.own()
    if (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()):
        return Sharing.own()
    # The server reads the files by the group: if it read the config as its owner, or by the
    # group; never if the config is the agent's and its group may not read it (root:G 0600).
    reads = st.st_uid != os.geteuid() or st.st_mode & 0o040
    mode = PRIVATE | (0o040 if reads else 0)
    return Sharing((os.geteuid(), st.st_gid), mode, mode, st.st_gid, 0o710)


def make_stage_dir(driver: Driver, rollout_id: str, share: Sharing) -> Path:
    """The rollout's stage directory (and ``tlsroll-tls``), made or taken over with ``share``'s
    group and mode (``make_private_dir``, strict: never through a link, refused if another
    user could swap it). A directory made here is on disk before this returns (its parent
    fsynced, session 68): the files written in it are (``write_atomic``), and the config a
    switch then writes names them, so a power cut after the switch must not lose the
    directory's own entry, which would leave the server a config naming files that are gone."""
    refuse_unsafe_dir(driver.config_file.parent)
    directory = stage_dir(driver, rollout_id)
    made = [d for d in (directory.parent, directory) if not os.path.lexists(d)]
    make_private_dir(directory, share.dir_mode, strict=True, group=share.group)
    for new in made:
        fsync_dir(new.parent)
    return directory


def share_named(driver: Driver, files: Iterable[str | Path | None]) -> None:
    """(Blocking.) The files a new config names that lie in a stage directory of the agent's
    (a name ``STAGE_FILES`` holds, in ``tlsroll-tls/<rollout id>`` beside the live config)
    given the access the live config gives now (``sharing``), with their directories: a
    config whose owner, group or mode changed since the files were staged (or files an
    earlier release staged as the agent's alone) is caught up with at the switch's plan, not
    found out by a restart that cannot read them. Anything else is left as it is, and so is
    a file that is gone. Nothing here refuses a switch: a file that cannot be given its access
    is said (``stage.share_failed``) and the switch goes on as it did before (its restart
    says whether the server can read what its config names). A driver whose server runs as
    the agent (the reference driver) has nothing to catch up with: nothing is touched. Every
    plan asks this first: a config directory another user could swap (``refuse_unsafe_dir``)
    refuses the switch (``UnsafePermissions``), whatever the driver: the agent would write
    the config there; so does a config that is a symbolic link (``refuse_linked_config``:
    the agent would replace the link by a file)."""
    refuse_unsafe_dir(driver.config_file.parent)
    refuse_linked_config(driver.config_file)
    if not driver.own_user:
        return
    share = sharing(driver)
    root = driver.config_file.parent / STAGES
    for name in files:
        if not name:
            continue
        path = Path(name)
        directory = path.parent
        if (
            directory.parent != root
            or not ROLLOUT_ID.fullmatch(directory.name)
            or path.name not in STAGE_FILES
            or not os.path.lexists(path)
        ):
            continue
        try:
            make_private_dir(directory, share.dir_mode, strict=True, group=share.group)
            give_file(path, share.file_mode(path), share.owner)
        except (OSError, UnsafePermissions) as exc:
            error = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            log.warning(
                "stage.share_failed",
                file=str(path),
                error=error,
                hint="the managed server may not read that file: check its owner and mode "
                "against the server's user",
            )
            continue
        _said_unkept(path, share)
        _said_group_wide(path, share)


# The schemes a config may serve while the journal holds https files live (dual or https).
HTTPS_LIVE: tuple[tuple[str, ...], ...] = (("https",), DUAL)


def live_contradiction(journal: Journal, driver: Driver) -> str | None:
    """Why the server's live config is not what the journal holds live (``Journal.live_tls``:
    the https files, or none on http), or None (blocking). ``tlsroll-agent --journal-checked``
    refuses to clear ``needs_admin`` then: the files the journal holds live are what the
    agent's view, its bootstrap service and its next plans use (review s41rev1 M2: a stale
    verifier file would come back with the next rotate-cert).

    The schemes are never taken from the server's ports here (review s41rev3 N3: a template
    driver's ``facts`` probes them, and the server the admin stopped to check it answers on
    none): with https files live, the config must say them for https or for both schemes
    (``Driver.says``); with none, a driver whose config decides (the reference server's) must
    not list https, and a template driver's config must be its http-only render, or else the
    server must answer, on http alone."""
    live = journal.live_tls()
    try:
        if not (live and live.get("cert_file")):
            return _http_contradiction(driver)
        verifier = live.get("verifier_file")
        # A config naming no client CA keeps naming none through change-password and
        # finalize, whose live settings name the CA this agent installed (``keeps_certificate``,
        # ``_client_ca``): agreed (review s72 revhttps).
        cas = (Path(live["ca_file"]), None) if driver.config_decides else (Path(live["ca_file"]),)
        for schemes, ca in itertools.product(HTTPS_LIVE, cas):
            target = Target(
                schemes,
                Path(live["cert_file"]),
                Path(live["key_file"]),
                ca,
                Path(verifier) if verifier else None,
            )
            if driver.says(target):
                return None
    except (DriverError, OSError, ValueError) as exc:
        return f"the server's config cannot be compared with the journal: {describe(exc)}"
    named = ", ".join(f"{k} {v}" for k, v in sorted(live.items()) if k.endswith("_file") and v)
    return (
        f"the server's config {driver.config_file} names other files than the journal holds"
        f" live ({named})"
    )


def _http_contradiction(driver: Driver) -> str | None:
    """``live_contradiction`` with no https files live (blocking; DriverError, OSError)."""
    serves_https = (
        f"the server's config {driver.config_file} serves https, but the journal holds no"
        " https files live (http only)"
    )
    if driver.config_decides:
        return serves_https if "https" in driver.facts().schemes else None
    if driver.says(Target(("http",))):
        return None
    # Not the http-only render (a config the admin wrote): only the server can say what it
    # serves, and it must be up to say it.
    schemes = driver.facts().schemes
    if not schemes:
        return (
            f"the server does not answer, and its config {driver.config_file} is not one the"
            " agent renders for http: start it, then run --journal-checked again"
        )
    return serves_https if "https" in schemes else None


def _files_of(live: dict[str, str] | None) -> list[str]:
    """The files live settings (``Journal.live_tls``, a plan's) name."""
    keys = ("cert_file", "key_file", "ca_file", "verifier_file")
    return [live[k] for k in keys if live and live.get(k)]


def remove_stages(over: Iterable[Staged], why: str = "a later rollout staged") -> list[Staged]:
    """The directories of stages the journal has forgotten (``Journal.record_csr``,
    ``Journal.forget_stages``: ``why``, for the log) removed,
    with the key, certificate and verifier file in them (blocking). Only a stage directory
    (``_stage_dir_of``: named for its rollout under a ``tlsroll-tls`` of the agent's, holding
    only files tlsroll writes there) is touched. Returned: the stages whose directory could
    not be removed (logged), which the agent tries again while it runs
    (``NodeAgentService._remove_stages``; review of s60a M2): the journal no longer knows
    them, so only its next start's sweep would (``sweep_stage_dirs``)."""
    roots: dict[Path, os.stat_result | OSError | None] = {}
    failed: list[Staged] = []
    for staged in over:
        directory = staged.key_file.parent
        root = directory.parent
        if directory.name != staged.rollout_id or root.name != STAGES:
            continue
        if root not in roots:
            try:
                roots[root] = _stage_root(root)
            except OSError as exc:
                roots[root] = exc
        root_st = roots[root]
        if isinstance(root_st, OSError):
            _remove_failed(staged.rollout_id, directory, root_st)
            failed.append(staged)
        elif root_st is not None and not _remove_stage(directory, root_st, staged.rollout_id, why):
            failed.append(staged)
    return failed


def sweep_stage_dirs(journal: Journal, driver: Driver, *, at_start: bool = True) -> bool:
    """The stage directories and files nothing needs any more removed (blocking): keys,
    certificates and verifier files. At the agent's start, and (``at_start`` False) whenever
    a transaction ends on the node or the leader says the rollout whose way back the agent
    kept has ended (``NodeAgentService.sweep_stages``, ``forget_ended``; under its command
    lock, so that no Stage, CreateCSR or plan writes in a directory meanwhile).

    Needed (``Journal.stage_needs``, ``needed_stage_files``): a stage no transaction began yet
    (its switch may still come); the files live now; both sides of an unfinished transaction
    (what it writes, what its way back restores); what the rollback of the newest switch
    restores while that way back is open (the leader rolls a switch back when its confirm's
    outside check fails, until its rollout ends); both sides of a newest transaction that
    failed (the server may run either); and what the live config, or a config such a
    transaction or way back may write, names (a journal begun again with ``--reinitialise``
    knows nothing of the files the server serves). Nothing is removed if the live config
    cannot be read. The way back to http (``tlsroll rollout rollback``) restores the config
    from before the first switch, which names no stage file. Everything else is a superseded
    certificate's key and files (or a stage the journal never recorded: left by an agent
    stopped between writing a new key and journalling it, or by a removal cut short), which
    nothing uses again: a stage the journal does not know is refused (CreateCSR makes a new
    key), and a switch that is no longer the newest is never rolled back (``rollback_plan``
    refuses it once its files are gone). After the start, a directory the journal does not
    know is left for the next start (a command's file may be on its way into the journal).

    Only tlsroll's own stage directories are ever touched: ``tlsroll-tls`` must be a real
    directory of the agent's user (not a symbolic link to somewhere else), and a directory in
    it only loses files, or goes, if it is a stage directory (``_stage_dir_of``). Anything
    else there is logged (``stage.unknown_dir``, its path; once per directory while the agent
    runs: ``_say_unknown``) and left as it is. Each removal is logged (``stage.removed``,
    ``stage.files_removed``: rollout, path, why; never what the files hold).

    True if it did all it meant to; False if a removal failed (logged,
    ``stage.remove_failed``), or the stage directory or the live config could not be read:
    the agent tries again later (``NodeAgentService.sweep_stages``). A directory left because
    it is not tlsroll's is no failure (trying again changes nothing)."""
    root = driver.config_file.parent / STAGES
    try:
        root_st = _stage_root(root)
        names = None if root_st is None else sorted(os.listdir(root))
    except OSError as exc:
        _remove_failed(None, root, exc)
        return False
    _still_there(root, names)
    if root_st is None:
        return True  # none, or none of tlsroll's: trying again changes nothing
    if not names:
        return True
    try:
        live = driver.read_config()
    except OSError:
        return False
    needs = journal.stage_needs()
    kept = needed_stage_files(needs, root, names, live)
    done = True
    for name in names:
        if name not in needs.known and not at_start:
            continue
        why = SUPERSEDED if name in needs.known else "unknown to the journal"
        if name not in kept:
            done = _remove_stage(root / name, root_st, name, why) and done
        elif (files := kept[name]) is not None:
            done = _prune_stage(root / name, root_st, name, files, why) and done
    return done


SUPERSEDED = "superseded: not live, and no switch or way back still possible needs it"


def needed_stage_files(
    needs: StageNeeds, root: Path, names: Iterable[str], live_config: bytes
) -> dict[str, frozenset[str] | None]:
    """Which of ``names`` (directories in ``root``, ``tlsroll-tls``) are still needed
    (``sweep_stage_dirs``), each with the names of the files in it that are, or None if all
    of it is: a stage not switched yet (``StageNeeds.staged``); the file ``needs`` names; a
    file the live config or a config ``needs`` holds names (``<rollout>/<file>``, as a
    stage's path in a config always holds it), and all of a directory such a config names
    without naming a file of it (a config this agent did not render: nothing of it is
    guessed). A directory can be needed for one file alone: a rotation keeps the live
    verifier file where the switch to https put it, beside that switch's key, certificate
    and CA, which it superseded (they go, the verifier stays)."""
    whole = set(needs.staged)
    files: dict[str, set[str]] = {}
    for named in needs.files:
        path = Path(named)
        if path.parent.parent == root:
            files.setdefault(path.parent.name, set()).add(path.name)
    for config in (live_config, *needs.configs):
        for name in names:
            if os.fsencode(name) not in config:
                continue
            said = {f for f in STAGE_FILES if os.fsencode(f"{name}/{f}") in config}
            if said:
                files.setdefault(name, set()).update(said)
            else:
                whole.add(name)
    kept: dict[str, frozenset[str] | None] = {n: frozenset(f) for n, f in files.items()}
    kept.update(dict.fromkeys(whole))
    return kept


# What tlsroll writes in a stage directory: the key (CreateCSR, or --cert-dir's), the
# certificate and CA (Stage), the password's verifier file; and ``write_atomic``'s temporary
# files of these (``.NAME.tmp-PID-RANDOM``; ``.NAME.tmp-PID`` before), left by an agent
# stopped in the middle of a write.
STAGE_FILES = frozenset({"server.key", "server.pem", "ca.pem", "auth-verifier.json"})
_STAGE_TEMP = re.compile(
    r"\.(server\.key|server\.pem|ca\.pem|auth-verifier\.json)\.tmp-[0-9]+(-[0-9a-f]+)?"
)


def _stage_root(root: Path) -> os.stat_result | None:
    """``tlsroll-tls``'s lstat if it is a real directory (not a symbolic link) of the agent's
    user, else None (there is none, or nothing under it is tlsroll's to remove). OSError if it
    cannot be looked at (EACCES: the config's directory not searchable by the agent's user,
    EIO): what is under it may be tlsroll's, so the caller counts a failed removal, tried
    again later, not "none of tlsroll's" (review of s60 L)."""
    try:
        st = os.lstat(root)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
            _say_unknown(root, st)
        return None
    return st


# The directories said to be none of tlsroll's (``stage.unknown_dir``) while this agent runs,
# each as it was then (``_unknown_key``): the sweep runs at every transaction's end, and said
# the same directory again each time (review of s59 L1). One a sweep finds gone is forgotten
# (``_still_there``: the set holds no more than the last listing found), so one put in its
# place later is said again; so is one replaced by a link, another owner or another inode
# between two sweeps (one removed and made again between two sweeps may get the same inode
# back: not said; review of s60a L1). The agent's start forgets them all (``forget_said``):
# it says each once more.
_SAID_UNKNOWN: set[tuple[str, int, int, int, int]] = set()


def forget_said() -> None:
    """Every directory said to be none of tlsroll's forgotten (``_SAID_UNKNOWN``): at the
    agent's start, so that an agent started again in the same process says each again."""
    _SAID_UNKNOWN.clear()


def _still_there(root: Path, names: Iterable[str] | None) -> None:
    """The said directories that a sweep of ``root`` (``tlsroll-tls``) found gone forgotten:
    those in it that its listing (``names``) no longer holds, and ``root`` itself once it is
    tlsroll's again (listed) or gone. Not listed (``names`` None: ``root`` is none of
    tlsroll's, or not there), what is in it stays as it was said."""
    under = str(root)
    if names is None:
        if not os.path.lexists(root):
            _SAID_UNKNOWN.difference_update([k for k in _SAID_UNKNOWN if k[0] == under])
        return
    there = {str(root / name) for name in names}
    for key in [k for k in _SAID_UNKNOWN if k[0] == under or os.path.dirname(k[0]) == under]:
        if key[0] not in there:
            _SAID_UNKNOWN.discard(key)


def _unknown_key(path: Path, st: os.stat_result) -> tuple[str, int, int, int, int]:
    return (str(path), st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_uid)


def _say_unknown(path: Path, st: os.stat_result | None = None) -> None:
    """``path`` (in or as ``tlsroll-tls``; ``st``: its lstat, if read) logged as none of
    tlsroll's (``stage.unknown_dir``, its path only), unless already said of it as it is now.
    Gone meanwhile: nothing to say."""
    try:
        st = st if st is not None else os.lstat(path)
    except OSError:
        return
    key = _unknown_key(path, st)
    if key in _SAID_UNKNOWN:
        return
    _SAID_UNKNOWN.add(key)
    log.warning(
        "stage.unknown_dir",
        path=str(path),
        detail="a directory in tlsroll-tls that tlsroll did not make: it is left as it is (move "
        "it out to silence this)",
    )


def _stage_dir_of(directory: Path, root_st: os.stat_result) -> bool:
    """Whether ``directory`` (in ``tlsroll-tls``, whose lstat is ``root_st``) is one tlsroll
    made: named as a rollout id, by lstat a real directory of the agent's user on the same
    file system (not a mount point), holding only regular files of the names tlsroll writes
    there (``STAGE_FILES`` and their temporary files). Gone: not one (nothing to do). One
    that cannot be read (EACCES, EIO) raises ``OSError``: the caller cannot tell, and counts
    its sweep not done, so the agent tries again (review of s60a L2: it was taken for none of
    tlsroll's, and never tried again while the agent ran)."""
    if not ROLLOUT_ID.fullmatch(directory.name):
        return False
    try:
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_dev != root_st.st_dev:
            return False
        with os.scandir(directory) as entries:
            for entry in entries:
                if not (
                    entry.is_file(follow_symlinks=False)
                    and (entry.name in STAGE_FILES or _STAGE_TEMP.fullmatch(entry.name))
                ):
                    return False
    except (FileNotFoundError, NotADirectoryError):  # gone, or replaced meanwhile
        return False
    return True


def _not_ours(directory: Path, root_st: os.stat_result, rollout_id: str) -> bool | None:
    """None if ``directory`` is a stage directory (``_stage_dir_of``: the caller goes on);
    else what the caller returns: True if it is none of tlsroll's (said, ``_say_unknown``,
    and left: nothing to try again), False if it could not be read (logged,
    ``stage.remove_failed``: tried again)."""
    try:
        ours = _stage_dir_of(directory, root_st)
    except OSError as exc:
        _remove_failed(rollout_id, directory, exc)
        return False
    if ours:
        return None
    _say_unknown(directory)
    return True


def _remove_failed(rollout_id: str | None, path: Path, exc: OSError) -> None:
    """``stage.remove_failed``; ``rollout_id`` None for ``tlsroll-tls`` itself."""
    ids = {} if rollout_id is None else {"rollout_id": rollout_id}
    log.warning(
        "stage.remove_failed",
        **ids,
        path=str(path),
        error=os_error_text(exc),
        hint="the error says why it could not be removed: remove the path named by hand if it is"
        " still there",
    )


def _remove_stage(directory: Path, root_st: os.stat_result, rollout_id: str, why: str) -> bool:
    """``directory`` removed if it is a stage directory (``_stage_dir_of``), else said
    (``_say_unknown``) and left as it is. False if the removal failed, or the directory could
    not be read (logged)."""
    if (done := _not_ours(directory, root_st, rollout_id)) is not None:
        return done
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        return True
    except OSError as exc:
        _remove_failed(rollout_id, directory, exc)
        return False
    log.info("stage.removed", rollout_id=rollout_id, path=str(directory), why=why)
    return True


def _prune_stage(
    directory: Path, root_st: os.stat_result, rollout_id: str, keep: frozenset[str], why: str
) -> bool:
    """The files of ``directory`` that tlsroll writes there (``STAGE_FILES``) and ``keep``
    does not hold removed, if it is a stage directory (``_stage_dir_of``; else said and left
    as ``_remove_stage`` does): the live verifier file stays where it is, the key, certificate
    and CA a later switch superseded beside it go. Logged once (``stage.files_removed``: the
    directory and the files' names). False if a removal failed, or the directory could not
    be read (logged)."""
    if (done := _not_ours(directory, root_st, rollout_id)) is not None:
        return done
    try:
        present = sorted(os.listdir(directory))
    except FileNotFoundError:
        return True
    except OSError as exc:
        _remove_failed(rollout_id, directory, exc)
        return False
    removed = []
    done = True
    for name in present:
        if name not in STAGE_FILES or name in keep:
            continue
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            _remove_failed(rollout_id, directory / name, exc)
            done = False
            continue
        removed.append(name)
    if removed:
        log.info(
            "stage.files_removed",
            rollout_id=rollout_id,
            path=str(directory),
            files=removed,
            why=why,
        )
    return done


def prepare(txn_dir: Path, rollout_id: str, kind: TxnKind) -> tuple[Path, Path]:
    """The plan's (new, backup) file names, where releases before the journal held both
    configs (``Txn.target_config``, ``source_config``) wrote them. Nothing is written: they
    stay in the plan so that its JSON keeps the shape an earlier release reads."""
    return txn_dir / f"{rollout_id}-{kind.value}.new", txn_dir / f"{rollout_id}-{kind.value}.old"


def read_source(driver: Driver) -> bytes:
    """The live config a transaction about to start replaces (its ``source_config``)."""
    try:
        return driver.read_config()
    except OSError as exc:
        raise PrepareFailed(f"cannot prepare the transaction: {os_error_text(exc)}") from None


def source_of(switch: Txn) -> bytes:
    """What a completed switch replaced: from its journal row, or (a switch of an earlier
    release) from its backup file."""
    if switch.source_config is not None:
        return switch.source_config
    try:  # as the transaction reads it: never a FIFO's endless read (review rev51d L7)
        return read_regular(Plan.from_json(switch.plan).backup_file)
    except NotRegularFile as exc:
        raise PrepareFailed(f"cannot prepare the transaction: {exc}") from None


def drop_unjournalled_verifier(journal: Journal, driver: Driver, rollout_id: str) -> None:
    """(Blocking.) A switch whose plan wrote its verifier file (``write_verifier``) was not
    journalled (the journal's write failed, or the plan's making after the file): the
    rollout's directory removed at once if the file is all it holds and no stage or
    transaction of the journal is for it, nor does the live config name it, as the agent's
    next start would (``sweep_stage_dirs``). A change-password switch has no stage: its
    directory holds the verifier file only, and stayed until then (s32risk). A directory
    with a key in it is left (a stage's, or a CreateCSR's not journalled yet)."""
    root = driver.config_file.parent / STAGES
    directory = root / rollout_id
    try:
        if set(os.listdir(directory)) != {"auth-verifier.json"}:
            return
    except OSError:
        return
    try:
        root_st = _stage_root(root)
    except OSError:
        return  # (the directory was listed just now: a moment's failure; the next start sweeps)
    if root_st is None or rollout_id in journal.known_rollouts():
        return
    try:
        if os.fsencode(rollout_id) in driver.read_config():
            return
    except OSError:
        return
    _remove_stage(directory, root_st, rollout_id, "its switch was not journalled")


def write_verifier(driver: Driver, rollout_id: str, verifier: dict[str, Any] | None) -> Path | None:
    """The verifier file beside the live config (0600, or as the config if the managed server
    runs as its own user: ``Sharing``; never readable by others: it can fake bootstrap
    answers)."""
    if verifier is None:
        return None
    share = sharing(driver)
    path = make_stage_dir(driver, rollout_id, share) / "auth-verifier.json"
    write_staged(path, password.verifier_to_json(verifier).encode(), share)
    return path


@_keeps_cause
def switch_plan(
    journal: Journal,
    driver: Driver,
    txn_dir: Path,
    rollout_id: str,
    verifier: dict[str, Any] | None,
    *,
    keep_frozen: bool = False,
    keep_http: bool = False,
) -> Built:
    """enable-tls: https on the staged certificate (and the password's verifier, if given).
    ``keep_http`` (transitional phase 1): http stays open beside https, so the node ends
    *dual* and verify wants both live; without it http closes in the same restart."""
    staged = journal.staged(rollout_id)
    if staged is None or staged.cert_file is None or staged.ca_file is None:
        raise PlanRefused(f"nothing staged for rollout {rollout_id}; run Stage")
    verifier_file = write_verifier(driver, rollout_id, verifier)
    share_named(driver, (staged.cert_file, staged.key_file, staged.ca_file))
    facts = driver.facts()
    target = DUAL if keep_http else ("https",)
    new_config = driver.render(
        Target(target, staged.cert_file, staged.key_file, staged.ca_file, verifier_file)
    )
    new_file, backup = prepare(txn_dir, rollout_id, TxnKind.SWITCH)
    live = {
        "cert_file": str(staged.cert_file),
        "key_file": str(staged.key_file),
        "ca_file": str(staged.ca_file),
        "verifier_file": str(verifier_file or ""),
        "server_url": facts.url("https"),
    }
    plan = Plan(
        facts,
        facts.schemes,
        target,
        new_file,
        backup,
        staged.ca_file,
        staged.fingerprint or "",
        live,
        journal.live_tls(),
        keep_frozen=keep_frozen,
        change=ENABLE_DUAL if keep_http else Change.ENABLE_TLS.value,
    )
    return Built(new_config, plan, staged.fingerprint or "")


def dual_problem(facts_schemes: tuple[str, ...], live: dict[str, str] | None) -> str | None:
    """Why a node is not dual (finalize needs http and https served, with the https files
    tlsroll made live), else None."""
    serves = " and ".join(facts_schemes) or "nothing"
    if set(facts_schemes) != set(DUAL) or live is None or not live.get("cert_file"):
        return (
            f"this node is not dual (it serves {serves}): finalize only closes http on a node "
            "that serves http and https after the transitional switch"
        )
    return None


def pem_fingerprint(pem: bytes) -> str:
    """``pki.fingerprint`` of the first certificate of a PEM file (``sha256:<hex>`` of its
    DER), read with the ``ssl`` module's PEM helpers: the agent parses no X.509 (issue 15).
    ``PKIError`` (BAD_PEM, "certificate") as ``pki.read_cert`` if there is none, or if what
    the PEM block holds is not framed as a certificate (``_framed_as_certificate``: the ``ssl``
    helpers only decode base64; review s41 rev2, Low 7)."""
    try:
        text = pem.decode("ascii")
        start = text.index(ssl.PEM_HEADER)
        end = text.index(ssl.PEM_FOOTER, start) + len(ssl.PEM_FOOTER)
        der = ssl.PEM_cert_to_DER_cert(text[start:end])
    except ValueError:  # not ASCII, no certificate, not base64
        raise PKIError(PKIReason.BAD_PEM, "certificate") from None
    if not _framed_as_certificate(der):
        raise PKIError(PKIReason.BAD_PEM, "certificate")
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _der_item(der: bytes, at: int, end: int) -> tuple[int, int, int]:
    """The DER item at ``at`` (within ``der[:end]``): its tag, where its contents start and
    where it ends. ValueError if none is there (cut short, an indefinite or a non-minimal
    length, a high tag number: none in a certificate's frame)."""
    if at + 2 > end or der[at] & 0x1F == 0x1F:
        raise ValueError("no DER item")
    tag, first, at = der[at], der[at + 1], at + 2
    if first & 0x80:
        count = first & 0x7F
        if not 1 <= count <= 4 or at + count > end or der[at] == 0:
            raise ValueError("a DER length that is not one")
        length = int.from_bytes(der[at : at + count], "big")
        at += count
        if length < 0x80:
            raise ValueError("a DER length that is not one")
    else:
        length = first
    if at + length > end:
        raise ValueError("a DER item cut short")
    return tag, at, at + length


def _framed_as_certificate(der: bytes) -> bool:
    """True if ``der`` is framed as an X.509 certificate: one SEQUENCE, nothing after it, of a
    SEQUENCE (tbsCertificate), a SEQUENCE (the signature's algorithm) and a BIT STRING (the
    signature); tbsCertificate's items its version ([0], optional), its serial (an INTEGER),
    then five SEQUENCEs (the signature's algorithm, the issuer, the validity, the subject,
    the public key; a request's frame has two after its INTEGER). A frame only, without
    ``cryptography`` (the agent's memory, issue 15): the certificate itself was checked when
    it was staged (``certwork_ops``); this tells a file that holds something else (a key, a
    request, garbage under a certificate's PEM header) from one."""
    try:
        tag, at, end = _der_item(der, 0, len(der))
        if tag != 0x30 or end != len(der):
            return False
        parts = []
        while at < end:
            tag, contents, at = _der_item(der, at, end)
            parts.append((tag, contents, at))
        if [p[0] for p in parts] != [0x30, 0x30, 0x03]:
            return False
        tags, at, end = [], parts[0][1], parts[0][2]
        while at < end:
            tag, _, at = _der_item(der, at, end)
            tags.append(tag)
    except ValueError:
        return False
    if tags[:1] == [0xA0]:
        tags = tags[1:]
    return tags[:6] == [0x02, 0x30, 0x30, 0x30, 0x30, 0x30]


BASIC_CONSTRAINTS = bytes.fromhex("551d13")  # 2.5.29.19, the basicConstraints extension


def ca_bundle_problem(pem: bytes) -> str | None:
    """Why the CA bundle ``pem`` cannot be the bootstrap service's: a certificate of it that
    says it is no CA (``pki.is_ca``'s test: no basicConstraints, or one without cA), read with
    the ``ssl`` module's PEM helpers and ``_der_item``, without ``cryptography`` (the agent's
    memory, issue 15), so that a try of the service with such a bundle is refused before it
    asks the crypto worker, whose child it would start at every try of the outage. None when
    every certificate says it is a CA, and for one that cannot be read so (not framed as a
    certificate, an extension not laid out as RFC 5280 says, not in DER: ``_says_ca``): the
    worker's check (``bootstrap_crypto.check_ca_bundle``) judges those, as before."""
    text = pem.decode("ascii", "replace")
    end = 0
    number = 0
    while (start := text.find(ssl.PEM_HEADER, end)) >= 0:
        end = text.find(ssl.PEM_FOOTER, start)
        if end < 0:
            return None
        end += len(ssl.PEM_FOOTER)
        number += 1
        try:
            der = ssl.PEM_cert_to_DER_cert(text[start:end])
        except ValueError:
            continue
        if _says_ca(der) is False:
            return (
                f"certificate {number} of the CA bundle is not a CA certificate (a server's "
                "own?): keep only CA certificates in the bundle"
            )
    return None


def _says_ca(der: bytes) -> bool | None:
    """Whether the certificate ``der`` says it is a CA (its basicConstraints' cA is TRUE); None
    if it cannot be read so (see ``ca_bundle_problem``): not framed as a certificate, an
    extension not laid out as RFC 5280 says, or not in DER as the worker's parser wants it,
    which raises on it (review s45rev4 L2: a cA FALSE written out, a BOOLEAN other than 0x00 or
    0xFF, a path length without cA, anything after the path length, an extension twice). The
    worker's failure to judge those let the service start (``ca_bundle_unchecked``), as it
    still does."""
    if not _framed_as_certificate(der):
        return None
    try:
        _, at, end = _der_item(der, 0, len(der))  # Certificate
        _, at, end = _der_item(der, at, end)  # tbsCertificate
        while at < end:  # its items; the extensions, [3] EXPLICIT, come last
            tag, contents, at = _der_item(der, at, end)
            if tag == 0xA3:
                break
        else:
            return False  # no extensions (a version 1 certificate): no basicConstraints
        tag, at, end = _der_item(der, contents, at)  # SEQUENCE OF Extension
        if tag != 0x30:
            return None
        seen: set[bytes] = set()
        says = False  # no basicConstraints: no CA
        while at < end:
            tag, item, at = _der_item(der, at, end)  # Extension ::= SEQUENCE {
            if tag != 0x30:
                return None
            tag, oid, item = _der_item(der, item, at)  #   extnID OBJECT IDENTIFIER,
            if tag != 0x06 or der[oid:item] in seen:
                return None  # (an extension twice: the worker's parser refuses it)
            seen.add(der[oid:item])
            if der[oid:item] == BASIC_CONSTRAINTS:
                said = _basic_constraints_ca(der, item, at)
                if said is None:
                    return None
                says = said
        return says
    except ValueError:
        return None


def _basic_constraints_ca(der: bytes, at: int, end: int) -> bool | None:
    """The cA of the basicConstraints extension whose ``critical`` and ``extnValue`` are
    ``der[at:end]``; None unless laid out in DER: ``critical`` absent or 0xFF (a FALSE is the
    default, never written), then ``BasicConstraints ::= SEQUENCE { cA BOOLEAN DEFAULT FALSE,
    pathLenConstraint INTEGER OPTIONAL }`` with cA absent (FALSE) and no path length, or 0xFF
    (TRUE) and at most a path length (ValueError: an item cut short)."""
    tag, value, value_end = _der_item(der, at, end)  # critical BOOLEAN DEFAULT FALSE,
    if tag == 0x01:
        if value_end - value != 1 or der[value] != 0xFF:
            return None
        tag, value, value_end = _der_item(der, value_end, end)
    if tag != 0x04 or value_end != end:  #   extnValue OCTET STRING }
        return None
    tag, first, seq_end = _der_item(der, value, value_end)
    if tag != 0x30 or seq_end != value_end:
        return None
    if first == seq_end:
        return False  # cA absent: FALSE
    tag, flag, at = _der_item(der, first, seq_end)
    if tag != 0x01 or at - flag != 1 or der[flag] != 0xFF:
        return None  # a path length without cA, a FALSE written out, or not a DER BOOLEAN
    if at < seq_end:
        tag, _, at = _der_item(der, at, seq_end)  # pathLenConstraint
        if tag != 0x02 or at != seq_end:
            return None
    return True


@_keeps_cause
def finalize_plan(
    journal: Journal,
    driver: Driver,
    txn_dir: Path,
    rollout_id: str,
    verifier: dict[str, Any] | None,
    *,
    keep_frozen: bool = False,
) -> Built:
    """finalize (transitional phase 2): a dual node closes http. Certificate, key, CA and
    verifier stay the live ones, so https does not change at all; verify wants https live
    with that very certificate and 8080 closed. ``verifier`` is ignored (the password does
    not change here). The live files are what the server's config names (``served_live``),
    as for rotate-cert and change-password: a config changed since the journal's switch (by
    hand, or a node whose agent was enrolled again) is finalized with the files it names, not
    with the journal's (review s70 L3)."""
    facts = driver.facts()
    live = served_live(journal, driver, facts) if "https" in facts.schemes else None
    if problem := dual_problem(facts.schemes, live):
        raise PlanRefused(problem)
    assert live is not None
    cert_file = Path(live["cert_file"])
    try:  # never a FIFO's endless read (session 51's review)
        fingerprint = pem_fingerprint(read_regular(cert_file))
    except PKIError as exc:
        raise PrepareFailed(f"cannot read the live certificate {cert_file}: {exc}") from None
    except NotRegularFile as exc:
        raise PrepareFailed(f"cannot read the live certificate: {exc}") from None
    verifier_file = Path(live["verifier_file"]) if live.get("verifier_file") else None
    ca_file, kept = keeps_certificate(journal, live, Change.FINALIZE)
    share_named(driver, _files_of(live))
    new_config = driver.render(
        Target(("https",), cert_file, Path(live["key_file"]), _client_ca(live), verifier_file)
    )
    new_file, backup = prepare(txn_dir, rollout_id, TxnKind.SWITCH)
    plan = Plan(
        facts,
        facts.schemes,
        ("https",),
        new_file,
        backup,
        ca_file,
        fingerprint,
        kept,
        kept,
        keep_frozen=keep_frozen,
        change=Change.FINALIZE.value,
        source_fingerprint=source_pin(live, facts),
    )
    return Built(new_config, plan, fingerprint)


def source_pin(live: dict[str, str] | None, facts: ServerFacts) -> str:
    """The certificates a transaction's restore check pins (``Plan.source_fingerprint``,
    blocking): the one ``live``'s ``cert_file`` holds, and the one the server serves on https
    now (``served_pin``) where that is another. A certificate the server's config names may
    come from an issuer tlsroll does not know (the admin's own, or an earlier CA), so the CA
    a plan names cannot check it (review s70 L1). The file's is what the server loads at the
    way back's restart; the served one what a server the change never restarted still
    serves: a certificate renewed on disk without a reload made a change that failed before
    its restart say "restore failed" of a server that was fine (review s71). "" where the
    file holds none to read (on http, a file gone, no certificate in it): the check trusts
    the plan's CA file, as before (and a source whose certificate cannot be read fails it
    either way)."""
    name = (live or {}).get("cert_file")
    if not name:
        return ""
    try:  # never a FIFO's endless read
        pin = pem_fingerprint(read_regular(Path(name)))
    except (OSError, NotRegularFile, PKIError):
        return ""
    served = served_pin(facts)
    return pin if served in ("", pin) else f"{pin},{served}"


# seconds for ``served_pin``'s connect and handshake together (``tls.connect``'s ``within``:
# each had the whole of it before, the call twice as long; review s72 L)
SERVED_PIN_TIMEOUT = 1.0


def served_pin(facts: ServerFacts) -> str:
    """The fingerprint of the certificate the server presents on https now (a handshake,
    nothing verified: what it runs, not whom to trust), "" if none came (blocking). The one
    ``take_served_pin`` took for this address and port, where the caller's task took one:
    no handshake then."""
    ahead = _SERVED_AHEAD.get()
    if ahead is not None and ahead[:2] == (facts.address, facts.https_port):
        return ahead[2]
    try:
        context = tls.unverified_client_context()
        address, port = facts.address, facts.https_port
        with tls.connect(
            context, address, port, timeout=SERVED_PIN_TIMEOUT, within=SERVED_PIN_TIMEOUT
        ) as sock:
            der = sock.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return ""
    return "sha256:" + hashlib.sha256(der).hexdigest() if der else ""


_SERVED_AHEAD: contextvars.ContextVar[tuple[str, int, str] | None] = contextvars.ContextVar(
    "served_pin_ahead", default=None
)


async def take_served_pin(driver: Driver) -> None:
    """``served_pin`` taken now, in a worker thread (``asyncio.to_thread``), for the plans the
    calling task builds next on the store's thread (``tlsroll.dbthread.run`` carries the
    caller's context variables): a handshake waits on the network, and on the store's thread
    it held every call queued there behind it (a journal write, a Stage's), up to
    ``SERVED_PIN_TIMEOUT`` with a server that accepts and never answers, which on a way back
    may well be the broken thing (review s72 revhttps). Nothing taken where the server's
    config says no https (an enable-tls) or cannot be read (the plan says why); a plan whose
    facts then differ (the config changed meanwhile) makes its own handshake."""

    def take() -> tuple[str, int, str] | None:
        try:
            facts = driver.facts()
        except (DriverError, ConfigError, OSError):
            return None
        if "https" not in facts.schemes:
            return None
        return facts.address, facts.https_port, served_pin(facts)

    _SERVED_AHEAD.set(None)  # (never one an earlier call of this task took)
    _SERVED_AHEAD.set(await asyncio.to_thread(take))


def served_live(journal: Journal, driver: Driver, facts: ServerFacts) -> dict[str, str]:
    """The https files the server serves with now, as live settings (``Journal.live_tls``'s
    keys), for a change that keeps https (rotate-cert, change-password); ``PlanRefused`` if
    it serves no https (blocking). What the server runs decides, the journal is its history
    (review s70 drift M2): an agent whose data dir was begun again (a disk replaced, the
    agent enrolled again) holds no live files while its server still serves https, and it
    refused every change ("not on https here"; the rollout halted, the node shown rolled
    back). A driver whose config names the files (``Driver.named_files``: the reference
    server's) gives them from the config, the journal's server_url kept; a template driver
    cannot read them back: the journal's, and without them the plan is refused, saying what
    the admin does."""
    if "https" not in facts.schemes:
        raise PlanRefused("the server is not on https here; run enable-tls first")
    live = journal.live_tls()
    named = driver.named_files()
    if named is not None and named.get("cert_file") and named.get("key_file"):
        return {**(live or {}), **named, "server_url": facts.url("https")}
    if live is not None and live.get("cert_file"):
        return live
    if named is not None:
        raise PlanRefused(
            f"the server's config {driver.config_file} serves https but names no certificate"
            " and key; fix it, or set it back to http, then run enable-tls"
        )
    raise PlanRefused(
        f"the server serves https on port {facts.https_port}, but this agent holds no https"
        f" files it installed (its data dir begun again?) and the {driver.name} driver cannot"
        f" read them from {driver.config_file}: set the server back to http by hand, then run"
        " enable-tls (tlsroll rollout start)"
    )


def keeps_certificate(
    journal: Journal, live: dict[str, str], change: Change
) -> tuple[Path, dict[str, str]]:
    """The CA a change that keeps the server's certificate (change-password, finalize) checks
    it by at its verify (as the leader's confirm does by the cluster's CA), and ``live`` as the
    plan's live settings keep it (blocking). The client CA the server's config names
    (``live``'s ``ca_file``); where it names none (a reference server's ``client_ca_file`` is
    optional), the CA the journal says this agent installed, if it is still there: the plan's
    live settings name that CA (the bootstrap service hands it to workstations), the config
    it renders names none, as before (``_client_ca``; review s71: ``client_ca_file = "."``
    was written, an empty name joined to the config's directory, which the server refused,
    and the switch rolled back). ``PlanRefused`` saying what to do where there is none."""
    named = live.get("ca_file", "")
    if named:
        return Path(named), live
    held = (journal.live_tls() or {}).get("ca_file", "")
    if held and os.path.isfile(held):
        return Path(held), {**live, "ca_file": held}
    raise PlanRefused(
        "the server's certificate cannot be checked: its config names no client_ca_file and"
        f" this agent installed no CA; {change.value} keeps that certificate, which tlsroll's"
        " CA may not have issued: run rotate-cert first (it installs a certificate of the"
        " cluster's CA), or set the server back to http and run enable-tls"
    )


def _client_ca(live: dict[str, str]) -> Path | None:
    """The client CA a change's config names: the one the server's config names (``live``,
    ``served_live``'s), None where it names none (the reference driver then keeps its
    setting as it is: none)."""
    return Path(live["ca_file"]) if live.get("ca_file") else None


@_keeps_cause
def rotate_plan(
    journal: Journal,
    driver: Driver,
    txn_dir: Path,
    rollout_id: str,
    verifier: dict[str, Any] | None,
    *,
    keep_frozen: bool = False,
) -> Built:
    """rotate-cert: https on the newly staged certificate and key; the auth password stays
    the one live (its verifier file is kept), so workstations notice nothing: they trust the
    CA, not the certificate. The live files are what the server's config names
    (``served_live``), not only what the journal says this agent installed."""
    facts = driver.facts()
    live = served_live(journal, driver, facts)
    staged = journal.staged(rollout_id)
    if staged is None or staged.cert_file is None or staged.ca_file is None:
        raise PlanRefused(f"nothing staged for rollout {rollout_id}; run Stage")
    verifier_file = Path(live["verifier_file"]) if live.get("verifier_file") else None
    share_named(driver, (staged.cert_file, staged.key_file, staged.ca_file, verifier_file))
    new_config = driver.render(
        Target(facts.schemes, staged.cert_file, staged.key_file, staged.ca_file, verifier_file)
    )
    new_file, backup = prepare(txn_dir, rollout_id, TxnKind.SWITCH)
    rotated = {
        **live,
        "cert_file": str(staged.cert_file),
        "key_file": str(staged.key_file),
        "ca_file": str(staged.ca_file),
    }
    plan = Plan(
        facts,
        facts.schemes,
        facts.schemes,
        new_file,
        backup,
        staged.ca_file,
        staged.fingerprint or "",
        rotated,
        live,
        keep_frozen=keep_frozen,
        change=Change.ROTATE_CERT.value,
        source_fingerprint=source_pin(live, facts),
    )
    return Built(new_config, plan, staged.fingerprint or "")


@_keeps_cause
def password_plan(
    journal: Journal,
    driver: Driver,
    txn_dir: Path,
    rollout_id: str,
    verifier: dict[str, Any] | None,
    *,
    keep_frozen: bool = False,
) -> Built:
    """change-password: same server config, new verifier; it takes effect at the restart.
    The live files are what the server's config names (``served_live``)."""
    facts = driver.facts()
    live = served_live(journal, driver, facts)
    ca_file, kept = keeps_certificate(journal, live, Change.CHANGE_PASSWORD)
    verifier_file = write_verifier(driver, rollout_id, verifier)
    share_named(driver, _files_of({**live, "verifier_file": ""}))
    # The live certificate files go into the new config too: a template driver renders the
    # whole config from them (the reference driver keeps what its file already says).
    new_config = driver.render(
        Target(
            facts.schemes,
            Path(live["cert_file"]),
            Path(live["key_file"]),
            _client_ca(live),
            auth_verifier_file=verifier_file,
        )
    )
    new_file, backup = prepare(txn_dir, rollout_id, TxnKind.SWITCH)
    plan = Plan(
        facts,
        facts.schemes,
        facts.schemes,
        new_file,
        backup,
        ca_file,
        "",
        {**kept, "verifier_file": str(verifier_file)},
        kept,
        keep_frozen=keep_frozen,
        change=Change.CHANGE_PASSWORD.value,
        source_fingerprint=source_pin(live, facts),
    )
    return Built(new_config, plan, "")


def switch_to_undo(journal: Journal, undoes: str | None) -> Txn:
    """The completed switch to undo: that of rollout ``undoes``, or (None) the newest switch
    that took this node from http to https, whatever it runs now."""
    if undoes:
        switch = journal.get(undoes, TxnKind.SWITCH)
        if switch is None or switch.outcome is not TxnOutcome.COMPLETED:
            raise PlanRefused(
                f"rollout {undoes} did not switch this node; nothing to roll back"
                + _put_back(journal)
            )
        return switch
    switch = journal.newest_switch_from_http()
    if switch is not None:
        return switch
    raise PlanRefused(
        "this node was never switched from http to https; nothing to go back to"
        + _put_back(journal)
    )


def _put_back(journal: Journal) -> str:
    """Why a switch to undo may be missing: the journal is the copy kept before an upgrade,
    put back (audit s40, H2: the way back to http lives only in the journal since its
    migration 3). Empty for any other journal."""
    if (made := journal.restored_copy_at()) is None:
        return ""
    return (
        f" in this journal, which is the copy kept before an upgrade"
        f" ({made.isoformat(timespec='seconds')}), put back: a switch made since is not in it,"
        " and its way back to http went with the newer journal (README 'Downgrading tlsroll')"
    )


# The live config a way back replaces, kept beside it when it was edited since tlsroll wrote
# it (``edited_since``): ``<name>.before-rollback-<rollout id>`` (README "Back to http").
KEPT_BEFORE_ROLLBACK = ".before-rollback-"


def kept_config_path(driver: Driver, rollout_id: str) -> Path:
    """Where the way back of ``rollout_id`` keeps an edited live config (beside it)."""
    config = driver.config_file
    return config.with_name(f"{config.name}{KEPT_BEFORE_ROLLBACK}{rollout_id}")


def edited_since(journal: Journal, switch: Txn, live: bytes, *, carried: bool) -> bool:
    """Whether ``live`` (the server's config now) holds anything the way back of ``switch``
    would undo that tlsroll did not write: an edit made by hand since ``switch`` wrote the
    config (audit rev58a H2: the way back puts back the config from before the switch byte for
    byte, and undid a ``data_dir`` moved by hand without a word).

    The journal holds every config tlsroll wrote since (each transaction's target and the
    source it found): what each transaction after ``switch`` found is checked against the
    configs the one before it may have left (``_left``), and so is ``live`` against what the
    last one may have left. ``carried``: the driver renders from the live config
    (``Driver.config_decides``: the reference server's; a rotate-cert keeps every other
    setting), so an edit a later change found is in what it wrote, and the way back undoes it
    all the same. A driver that renders from its template (systemd, exec) wrote a later
    change's config whole, without the edit it found: that file, as tlsroll wrote it, claims
    nothing, and no copy is kept of it (review of s59-wayback M1). Where the journal cannot
    say (a row of an earlier release without its configs) nothing is claimed for that
    stretch."""
    clean = _left(TxnOutcome.COMPLETED, switch.source_config, switch.target_config, False)
    edited = False
    for outcome, found, wrote in journal.configs_after(switch):
        found_edited = clean is not None and found is not None and found not in clean
        if carried and found_edited:
            edited = True
        clean = _left(outcome, found, wrote, found_edited)
    return edited or (clean is not None and live not in clean)


def _left(
    outcome: TxnOutcome, found: bytes | None, wrote: bytes | None, found_edited: bool
) -> tuple[bytes, ...] | None:
    """The configs a transaction may have left live that hold no edit by hand: a completed
    one its target, one rolled back what it found (put back), and one that failed or is
    under way either (a failed one asks the admin to repair the server: a repair by hand is
    neither, and is an edit the way back would undo; review of s59-wayback M2). What it found
    counts only if it held no edit itself (``found_edited``). None: the journal cannot say."""
    configs: tuple[bytes | None, ...]
    if outcome is TxnOutcome.COMPLETED:
        configs = (wrote,)
    elif outcome is TxnOutcome.ROLLED_BACK:
        configs = (found,)
    else:
        configs = (found, wrote)
    if any(c is None for c in configs):
        return None
    return tuple(c for c in configs if c is not None and not (found_edited and c == found))


def edited_config(journal: Journal, driver: Driver, schemes: tuple[str, ...]) -> str:
    """The live config's path if the way back to http would undo edits made to it since
    tlsroll wrote it (``edited_since``; blocking), else "": a node that serves no https
    (``schemes``: what its config says) has no way back, and one never switched from http
    has nothing to put back. A file that cannot be read is the checks' problem already
    (``CONFIG_UNREADABLE``), not this."""
    if "https" not in schemes:
        return ""
    try:
        switch = switch_to_undo(journal, None)
        live = driver.read_config()
    except (PlanRefused, OSError):
        return ""
    edited = edited_since(journal, switch, live, carried=driver.config_decides)
    return str(driver.config_file) if edited else ""


@_keeps_cause
def rollback_plan(
    journal: Journal,
    driver: Driver,
    txn_dir: Path,
    rollout_id: str,
    *,
    keep_frozen: bool = False,
    undoes: str | None = None,
) -> Built:
    """Undo a completed switch (``switch_to_undo``: rollout ``undoes``, else the one that left
    http): back to what was live before it, through the same safe transaction, keyed by
    ``rollout_id``. ``keep_frozen``: under a scope freeze the node stays frozen after it, as
    after a switch. A live config edited since tlsroll wrote it (``edited_since``) is kept
    beside it before it is replaced (``Plan.keep_edited``: ``Runner._keep_edited``). Refused
    (``PlanRefused``) if a file it would make live again is gone. The way back to http
    (``undoes`` "") of a server on https that no switch in this journal took there:
    ``unjournalled_way_back``."""
    try:
        switch = switch_to_undo(journal, undoes if undoes is not None else rollout_id)
    except PlanRefused as refused:
        if undoes != "" or journal.restored_copy_at() is not None:
            raise  # (a copy put back: the refusal says where its way back went)
        built = unjournalled_way_back(journal, driver, txn_dir, rollout_id, refused, keep_frozen)
        if built is None:
            raise
        return built
    done = Plan.from_json(switch.plan)
    gone = [f for f in _files_of(done.live_before) if not os.path.lexists(f)]
    if gone:
        # A switch that is no longer the newest is never rolled back by the leader, and its
        # way back's files go once a later transaction ends (``sweep_stage_dirs``): a restart
        # on a config naming them would fail, and the transaction go back again.
        raise PlanRefused(
            f"the files rollout {switch.rollout_id}'s way back restores are gone ({gone[0]}:"
            " removed once a later switch superseded them, or by hand); nothing was changed"
        )
    old_config = source_of(switch)
    edited = edited_since(journal, switch, driver.read_config(), carried=driver.config_decides)
    share_named(driver, _files_of(done.live_before))  # what the config going back names
    new_file, backup = prepare(txn_dir, rollout_id, TxnKind.ROLLBACK)
    facts = driver.facts()
    live = journal.live_tls()
    plan = Plan(
        facts,
        facts.schemes,
        done.source_schemes,
        new_file,
        backup,
        done.ca_file,
        "",
        done.live_before,
        live,
        keep_frozen=keep_frozen,
        keep_edited=str(kept_config_path(driver, rollout_id)) if edited else "",
        source_fingerprint=(
            source_pin(_named_or(driver, live), facts) if "https" in facts.schemes else ""
        ),
    )
    return Built(old_config, plan, "")


def unjournalled_way_back(
    journal: Journal,
    driver: Driver,
    txn_dir: Path,
    rollout_id: str,
    refused: PlanRefused,
    keep_frozen: bool,
) -> Built | None:
    """The way back to http of a server on https whose switch this journal does not hold (its
    agent's data dir begun again, a disk replaced: review s70 drift M2), or None if it serves
    no https. What the server runs decides: a driver that can set its config back to http
    (``Driver.http_config``: the reference server's, every other setting kept) gets that
    config, the one it replaces kept beside it (``kept_config_path``); any other refuses,
    saying what the admin does (``refused``'s reason and the config to set back by hand). Not
    for a journal that is a copy put back (``Journal.restored_copy_at``): its refusal says
    where the way back went. An https config that cannot serve (``https_files_problem``) is
    logged, never in the way; should the way back fail, the check of the config put back pins
    the certificate it names (``source_pin``)."""
    facts = driver.facts()
    if "https" not in facts.schemes:
        return None
    config = driver.http_config()
    if config is None:
        raise PlanRefused(_no_way_back(refused, driver))
    # What the config names, as it names it (review s70 L6: ``served_live`` refused a config
    # naming no key, "fix it, or set it back to http": the way back is how the admin sets it
    # back to http, and writes nothing of the https files, so a broken https config is said,
    # never in its way).
    try:
        named, unread = driver.named_files() or {}, ""
    except ConfigError as exc:  # (a setting of the https files: the http config drops it)
        named, unread = {}, str(exc)
    live = {**named, "server_url": facts.url("https")}
    if problem := unread or https_files_problem(driver, live):
        log.warning(
            "rollback.https_config_broken",
            rollout_id=rollout_id,
            problem=problem,
            detail="the way back to http goes on: the http config names none of these files;"
            " should it fail, the config put back is this one, and the server stays down",
        )
    share_named(driver, ())
    new_file, backup = prepare(txn_dir, rollout_id, TxnKind.ROLLBACK)
    plan = Plan(
        facts,
        facts.schemes,
        ("http",),
        new_file,
        backup,
        # The restore check (should the way back fail) pins the certificate the config names
        # (review s70 L1: it trusted the client CA, or the certificate itself as a CA, and
        # said "restore failed" of a server that was fine); this CA file is only for a
        # certificate that cannot be read (the check fails then, as the server's start does).
        Path(live.get("ca_file") or live.get("cert_file") or driver.config_file),
        "",
        None,
        live,
        keep_frozen=keep_frozen,
        change=HTTP_WRITTEN,  # its reason says the http config was written (``kept_reason``)
        keep_edited=str(kept_config_path(driver, rollout_id)),
        source_fingerprint=source_pin(live, facts),
    )
    return Built(config, plan, "")


def https_files_problem(driver: Driver, live: dict[str, str]) -> str | None:
    """Why the https config ``live`` holds (a driver's ``named_files``) cannot serve: no
    certificate or key named, or one named that is not there (blocking); None if it names
    both and both are there. Said by the way back, which goes on (``unjournalled_way_back``)."""
    config = driver.config_file
    if not (live.get("cert_file") and live.get("key_file")):
        return f"the server's config {config} serves https but names no certificate and key"
    gone = [live[k] for k in ("cert_file", "key_file") if not os.path.exists(live[k])]
    if gone:
        return f"the server's config {config} names {gone[0]}, which is not there"
    return None


def _named_or(driver: Driver, live: dict[str, str] | None) -> dict[str, str] | None:
    """The https files the server's config names (``Driver.named_files``), where the driver
    reads them and the config names a certificate, else ``live`` (the journal's)."""
    try:
        named = driver.named_files()
    except ConfigError:  # (a setting the way back puts back as it is: the restore check says)
        return live
    return named if named and named.get("cert_file") else live


def _no_way_back(refused: PlanRefused, driver: Driver) -> str:
    """Why the way back to http of a server on https that no switch in this journal took there
    is refused by a driver that cannot set its config back to http (``unjournalled_way_back``)."""
    return (
        f"{refused}; its server serves https from files this agent did not install (its"
        f" data dir begun again?), and the {driver.name} driver cannot set it back to http:"
        f" set {driver.config_file} back to http by hand and restart the server"
    )


KEEPS_HTTPS_FILES = frozenset({Change.ROTATE_CERT, Change.CHANGE_PASSWORD, Change.FINALIZE})
"""The changes whose plans start from the https files the server serves (``served_live``;
finalize's too since session 71, wayback)."""


def plan_problem(
    journal: Journal,
    driver: Driver,
    facts: ServerFacts,
    change: Change | None,
    *,
    way_back: bool,
) -> str | None:
    """Why this agent's plan of ``change`` (``way_back``: of the way back to http) would be
    refused on this node as its server runs now, else None: read-only, for the preflight's
    checks (``Check``: `tlsroll plan` and a start; ``Preflight``), so that the leader shows
    the node blocked with the plan's own line and refuses the start up front, before a key,
    a certificate and a halted switch (session 71, reenrol; it said "will get a new
    certificate", then the switch was refused). Only what a server on https whose files this
    agent did not install decides (its data dir begun again, a disk replaced, the agent
    enrolled again): rotate-cert, change-password and finalize where the driver cannot read
    the files back (``served_live``), the way back where it cannot set the config back to
    http (``unjournalled_way_back``). A node not on https is the leader's to judge
    (``NOT_ON_HTTPS``); a journal that is a copy put back says so at the way back's switch,
    as before."""
    if "https" not in facts.schemes:
        return None
    if way_back:
        try:
            switch_to_undo(journal, None)
        except PlanRefused as refused:
            if journal.restored_copy_at() is None and driver.http_config() is None:
                return _no_way_back(refused, driver)
        return None
    if change in KEEPS_HTTPS_FILES:
        try:
            live = served_live(journal, driver, facts)
            if change in KEEPS_CERTIFICATE:
                ca_file, _ = keeps_certificate(journal, live, change)
                return untrusted_certificate(facts, ca_file, change)
        except PlanRefused as refused:
            return str(refused)
    return None


def untrusted_now(journal: Journal, driver: Driver, change: Change) -> str | None:
    """``untrusted_certificate`` asked again as a switch of ``change`` (one of
    ``KEEPS_CERTIFICATE``) begins, before anything is frozen or written (blocking: a
    handshake; a worker thread's, never the store's): the server's certificate may have
    changed since the start's check (``plan_problem``), and such a switch froze, restarted
    and rolled back (review s72 L). None where the server serves no https, or its config or
    files cannot be read: the switch's plan says those, as before."""
    try:
        facts = driver.facts()
        if "https" not in facts.schemes:
            return None
        live = served_live(journal, driver, facts)
        ca_file, _ = keeps_certificate(journal, live, change)
    except (PlanRefused, DriverError, ConfigError, OSError):
        return None
    return untrusted_certificate(facts, ca_file, change)


KEEPS_CERTIFICATE = frozenset({Change.CHANGE_PASSWORD, Change.FINALIZE})
"""The changes that keep the certificate the server serves: their verify checks it by the CA
``keeps_certificate`` says, and the leader's confirm by the cluster's."""

UNTRUSTED_TIMEOUT = 2.0  # seconds for ``untrusted_certificate``'s handshake, all of it (as above)


def untrusted_certificate(facts: ServerFacts, ca_file: Path, change: Change) -> str | None:
    """Why ``change`` (one of ``KEEPS_CERTIFICATE``) would roll back at its verify: the server
    serves a certificate ``ca_file`` (``keeps_certificate``'s) did not issue for its address,
    which the verify's check (and the leader's confirm) would refuse, after a freeze and a
    restart (review s71: a certificate of the admin's own CA). Else None, also where the
    handshake says nothing of the certificate (no answer, the CA file unreadable: the checks
    say those). Blocking: one TLS handshake, trusting ``ca_file`` only, as the verify does
    (``probe.check_https``: the address checked against the certificate)."""
    try:  # never a FIFO's endless read
        context = tls.client_context(read_regular(ca_file))
        address, port = facts.address, facts.https_port
        with tls.connect(
            context,
            address,
            port,
            timeout=UNTRUSTED_TIMEOUT,
            server_hostname=address,
            within=UNTRUSTED_TIMEOUT,
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        why = exc.verify_message or "certificate verify failed"
    except (OSError, ValueError, NotRegularFile):
        return None
    return (
        f"the server's certificate on port {facts.https_port} is not one its CA {ca_file}"
        f" issued for {facts.address} ({why}): {change.value} keeps that certificate, and its"
        " check (as the leader's) would fail and the switch roll back; run rotate-cert first"
        " (it installs a certificate of the cluster's CA)"
    )
