"""Durable, permission-aware file writes: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import itertools
import os
import pwd
import re
import shlex
import socket
import stat
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tlsroll.errors import ConfigError, NotRegularFile, TerminalError, UnsafePermissions

PRIVATE = 0o600
PUBLIC = 0o644
_STAGINGS = itertools.count(1)  # ``stage_atomic``'s default names


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is (``st_mode``), for an error."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return f"file type {stat.S_IFMT(mode):o}"


def real_path(path: Path) -> Path:
    """``path.resolve()``; a symbolic link loop on the way is an ``OSError`` (ELOOP, naming
    ``path``), as Python 3.13 raises it, not 3.11's ``RuntimeError``, which every command and
    daemon took for an internal error (``tlsroll init --data-dir`` on a loop said "internal
    error: RuntimeError"): their one-line ``OSError`` answer says what is wrong. Product code
    resolves paths through here alone (``tests/test_layout.py`` checks it)."""
    try:
        return path.resolve()
    except RuntimeError as exc:  # (3.11, 3.12: "Symlink loop from ...")
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from exc


def write_atomic(
    path: Path,
    data: bytes,
    mode: int = PUBLIC,
    owner: tuple[int, int] | None = None,
    *,
    sync: bool = True,
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    The temporary file is created with ``mode`` from the start, so a private file is never
    readable by others, not even for an instant. ``owner``: the (uid, gid) the file is given
    before its first byte (a file a server running as its own user reads: created ours with
    ``mode``'s owner bits only, then chowned, then given ``mode``); where it cannot be set
    (no CAP_CHOWN) the file stays ours with ``mode``'s owner bits only: its group and others
    get nothing, so never a group other than the one meant.

    ``sync=False``: neither the file nor its directory is fsynced (the rename still replaces
    it whole, for every reader of this boot), for a file that means nothing after a crash of
    the machine: a pid file names a process of this boot only.
    """
    path = Path(path)
    name = f".{path.name}.tmp-{os.getpid()}-{os.urandom(8).hex()}"  # unguessable: never reused
    tmp = stage_atomic(path, data, mode, name, owner, owner_first=True, sync=sync)
    replace_staged(tmp, path, sync=sync)


def stage_atomic(
    path: Path,
    data: bytes,
    mode: int = PUBLIC,
    name: str = "",
    owner: tuple[int, int] | None = None,
    *,
    owner_first: bool = False,
    sync: bool = True,
) -> Path:
    """The first half of ``write_atomic``: ``data`` in a temporary file beside ``path`` (created
    with ``mode``), written and fsynced, ``path`` untouched; ``replace_staged`` is the second
    half. Apart, the write and its fsync can come before the moment the file must change (the
    agent stages a switch's config before the server is frozen, issue 15). ``name``: the
    temporary file's (default ``.NAME.staged-PID-N-RANDOM``, N counting this process's
    stagings: two stagings never share a file, so removing one that was not committed never
    removes the next; RANDOM: nobody can guess it ahead). The file is always created new
    (``O_EXCL|O_NOFOLLOW``, as ``mkstemp``): a link or file planted at the name is never
    followed, truncated or chowned (a name given that exists, a leftover: removed first, the
    entry itself, then created new; a random name that exists: another is drawn).
    ``owner``: the file's (uid, gid), as the file it replaces has them (a config the server's
    own user reads, 0640 say); set if the new file did not get them anyway, where
    that is allowed (CAP_CHOWN; else it stays ours: the caller may look). ``owner_first``
    (``write_atomic``'s): group and others get ``mode``'s access only once ``owner`` is set;
    a file whose owner could not be set keeps ``mode``'s owner bits only. ``sync=False``: not
    fsynced (``write_atomic``'s)."""
    path = Path(path)
    first = mode & 0o700 if owner_first and owner is not None else mode
    tmp, fd = _create_new(path, name, first)
    try:
        if owner is not None:  # before the chmod: a chown may clear set-id bits
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != owner:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, *owner)
                st = os.fstat(fd)
                if owner_first and (st.st_uid, st.st_gid) != owner:
                    mode = first
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(tmp)  # a write's or fsync's error names no file by itself
        raise
    os.close(fd)
    return tmp


def _create_new(path: Path, name: str, mode: int) -> tuple[Path, int]:
    """``stage_atomic``'s temporary file, created new (``O_EXCL|O_NOFOLLOW``), and its
    descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = path.with_name(
            name or f".{path.name}.staged-{os.getpid()}-{next(_STAGINGS)}-{os.urandom(8).hex()}"
        )
        try:
            return tmp, os.open(tmp, flags, mode)
        except FileExistsError:
            if name:  # a leftover of ours (or planted): the entry goes, never what it names
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def replace_staged(tmp: Path, path: Path, *, sync: bool = True) -> None:
    """The second half of ``write_atomic``: ``tmp`` (from ``stage_atomic``) becomes ``path``
    (rename, then the directory fsynced unless ``sync`` is False)."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if sync:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(
    path: Path,
    mode: int = 0o700,
    *,
    strict: bool = False,
    group: int | None = None,
    parents_mode: int | None = None,
) -> Path:
    """Create ``path`` (and its parents) or take it over: ours, with ``mode``. A directory
    another user owns is refused: whoever owns it can swap what we put there.

    A symbolic link at ``path`` that is neither ours nor root's is refused.

    ``strict`` (a directory secrets go in, inside one we share with nobody: the agent's
    stage directories in ``tlsroll-tls``): a symbolic link is refused, never followed (the
    mode is set on the directory opened with ``O_NOFOLLOW``, so a link swapped in cannot
    make us chmod its target), and so is a parent that anyone but us or root can write
    (they could swap the directory after the check); its parent is made 0700 if missing.

    ``group`` (strict only: a directory a server running as its own user must pass through,
    ``mode`` 0710 say): the directory and its parent get that group, and the parent the same
    mode (taken over as the directory is: ours, never through a link); where the group cannot
    be set (no CAP_CHOWN) a directory keeps ``mode``'s owner bits only, so that never a group
    other than the one meant passes.

    ``parents_mode`` (not strict): the mode of each missing parent this makes (one there
    already is left as it is), not the umask's (a workstation's settings dir: its
    ``~/.config/tlsroll``, and ``~/.config`` if missing, 0700 as XDG asks, review s67 L)."""
    path = Path(path)
    if not strict:
        if parents_mode is not None:
            _make_parents(path.parent, parents_mode)
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        # A link there of another user's is refused, not followed to be chmod-ed: planted
        # after a caller's check (root's in a workstation's settings dir, s43rev3 Low 5).
        link = _foreign_link(path, os.lstat(path), os.geteuid())
        if link:
            raise UnsafePermissions(f"directory {link}")
        _check_owner(path, os.stat(path), "directory")
        os.chmod(path, mode)
        return path
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_holder(
        parent,
        f"the secret directory {path.name}",
        f"run: chown {user_name(os.geteuid())} {parent}",
    )
    if group is not None and os.stat(parent).st_uid == os.geteuid():  # root's: left as it is
        _take_over(parent, mode, group)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode & 0o700)
    _take_over(path, mode, group)
    return path


def _make_parents(path: Path, mode: int) -> None:
    """``path`` and the directories above it that are missing made, each with ``mode``
    (whatever the umask); those there already are left as they are."""
    missing: list[Path] = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for made in reversed(missing):
        try:
            os.mkdir(made, mode)
        except FileExistsError:
            continue  # made meanwhile (not by us): left as it is
        os.chmod(made, mode)


def _take_over(path: Path, mode: int, group: int | None) -> None:
    """``path``, a directory of ours (opened with ``O_NOFOLLOW``: a link is refused, never
    followed), given ``group`` (if not None) and ``mode`` (its owner bits only where the
    group could not be set)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise UnsafePermissions(
            f"{path} is a symbolic link or not a directory; a directory of secrets must be a "
            f"directory of its own: run: rm {path}"
        ) from None
    try:
        st = os.fstat(fd)
        _check_owner(path, st, "directory")
        if group is not None and st.st_gid != group:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, group)
            if os.fstat(fd).st_gid != group:
                mode &= 0o700
        os.fchmod(fd, mode)
    except OSError as exc:
        if exc.filename is None:  # a descriptor's error names no file: say which (os.chmod did)
            exc.filename = str(path)
        raise
    finally:
        os.close(fd)


def give_file(path: Path, mode: int, owner: tuple[int, int]) -> None:
    """An existing regular file given ``owner`` (uid, gid) and ``mode``, as ``write_atomic``
    would have made it (its owner bits only where the owner cannot be set), through a
    descriptor opened with ``O_NOFOLLOW`` (a link is refused, never followed); fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UnsafePermissions(f"{path} is a symbolic link; run: rm {path}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePermissions(f"{path} is not a regular file; run: rm {path}")
        before = st
        if (st.st_uid, st.st_gid) != owner:
            # narrowed first: never a moment with the old access to a new owner or group
            narrow = stat.S_IMODE(st.st_mode) & mode & 0o700
            if stat.S_IMODE(st.st_mode) != narrow:
                os.fchmod(fd, narrow)
            with contextlib.suppress(PermissionError):
                os.fchown(fd, *owner)
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != owner:
                mode &= 0o700
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
        after = os.fstat(fd)
        if (after.st_mode, after.st_uid, after.st_gid) != (
            before.st_mode,
            before.st_uid,
            before.st_gid,
        ):
            os.fsync(fd)  # the change kept before the restart that needs it
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    finally:
        os.close(fd)


def private_dir_problem(path: Path) -> str | None:
    """Why ``make_private_dir(path)`` (not strict) would fail, or the directory could not be
    written, found without creating or changing anything; None if nothing is in the way. For
    a run that must not start what it cannot finish (a workstation's enrolment)."""
    path = Path(os.path.abspath(path))
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent  # make_private_dir would create the rest
    me = os.geteuid()
    try:
        lst = os.lstat(existing)
        st = os.stat(existing)
    except OSError as exc:
        return f"{existing}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{existing} is not a directory"
    if existing == path and (link := _foreign_link(path, lst, me)):
        return link
    if existing == path:  # ours (it is chmod-ed to 0700 then), on a file system we can write
        if st.st_uid != me:
            return (
                f"{path} is owned by {user_label(st.st_uid)}, not by {user_label(me)} who runs "
                f"this; {owner_fix(st.st_uid, path)}"
            )
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"{path} is on a read-only file system"
    elif not os.access(existing, os.W_OK | os.X_OK, effective_ids=True) and not _mode_allows(
        st, 0o3
    ):  # not access() alone (``dir_write_problem``: a seccomp filter's EPERM says no to all)
        return f"{existing} is not writable by {user_label(me)}"
    return None


# What ``open_problem`` says of a file a person must fix; any other error (EIO, EROFS, a full
# descriptor table) is left to the file's use, which says it as before.
_FIXABLE = (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP)


def open_problem(
    path: Path, *, write: bool = False, missing: str | None = "", own: Path | None = None
) -> str | None:
    """Why this process cannot open the regular file ``path`` to read (``write``: to read and
    write), when a person must fix it, or None: it is missing, a file on its way is no
    directory, it is no regular file, or a permission stops us (its own, said with its owner
    and mode and the ``chown`` or ``chmod`` that fixes it, or a directory on its way we may not
    enter, named). Changes nothing: a stat, then an open (never of anything but a regular
    file) that is closed at once. A daemon asks before its start changes anything, so that
    such a file is its config error (a restart would find it as it is), not an error
    somewhere later. ``missing``: what the line of a missing file adds ("; restore it …"),
    or None if a missing one is no problem here (the caller's own case). ``own``: the
    directory of the caller's own (its data dir): a directory on the way at or below it is
    given back (``chown``, or ``chmod u+rwx``); one above it (``/srv``, a home directory) is
    another's, and only needs to let us pass (``chmod o+x``, or g+x): never chowned to us.

    The open is non-blocking (a FIFO swapped in after the stat does not hang the caller) and
    what it opened is looked at again (``fstat``): never anything but a regular file. It
    follows symbolic links, as the file's use does. Never call it on a file this process
    holds open with SQLite (a store, its -wal or -shm): the close of another descriptor of
    the file drops every POSIX lock the process holds on it (SQLite's locks)."""
    path = Path(path)
    me = os.geteuid()
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None if missing is None else f"{path} is missing{missing}"
        if exc.errno == errno.ENOTDIR:
            return f"{_not_a_directory(path)} is not a directory (on the way to {path})"
        if exc.errno == errno.EACCES:
            return _not_entered(path, write, own)
        if exc.errno in _FIXABLE:
            return f"{path}: {exc.strerror or exc}"
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file ({file_kind(st.st_mode)})"
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM):
            return None
        mode = stat.S_IMODE(st.st_mode)
        said = (
            f"{path} cannot be {'read and written' if write else 'read'} by {user_label(me)}"
            f" (owner {user_label(st.st_uid)}, mode {mode:04o})"
        )
        if exc.errno == errno.EPERM:  # not its mode: an attribute (chattr +i), a policy
            return attribute_problem(path, st) or (
                f"{said}: {exc.strerror or exc} (errno {exc.errno}, EPERM)"
            )
        if st.st_uid != me:
            return f"{said}; {owner_fix(st.st_uid, path)}"
        return f"{said}; run: chmod u+{'rw' if write else 'r'} {path}"
    try:
        opened = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(opened):  # swapped in after the stat
        return f"{path} is not a regular file ({file_kind(opened)})"
    return None


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file ``path`` (a link followed, as ``read_bytes`` does), or
    ``NotRegularFile`` naming its kind: a FIFO, socket, device or directory is never read (a
    FIFO without a writer would block its reader for ever, ``/dev/zero`` never end). Judged
    by ``stat`` before anything is opened (a device or FIFO is never opened), then opened
    without blocking and judged again on the descriptor (``fstat``: one swapped in after the
    stat is never read). Any other error is the open's or the read's OSError, as
    ``read_bytes`` raised it."""
    path = Path(path)
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                with os.fdopen(fd, "rb", closefd=False) as f:
                    return f.read()
        finally:
            os.close(fd)
    raise NotRegularFile(f"{path} is not a regular file ({file_kind(mode)})")


def set_aside(path: Path, tag: str, stamp: str) -> Path:
    """``path`` (the entry itself: a directory, a link, whatever it is) renamed to
    ``NAME.TAG-STAMP`` beside it (``NAME.TAG-STAMP.2``, 3, … if that name is taken: never over
    anything), its directory fsynced where it can be (a failing fsync is no failed move); the
    new name. For something in the place of a file of
    ours that our write cannot replace (a directory), kept for whoever put it there rather
    than removed, as ``sqlite.set_aside_old_copy`` keeps a copy. An OSError if it cannot be
    renamed (or FileExistsError: no free name). Meant for a directory only we write in (a
    daemon's data dir): a name taken between the look and the rename is not guarded."""
    path = Path(path)
    for n in range(1, 100):
        kept = path.with_name(f"{path.name}.{tag}-{stamp}" + (f".{n}" if n > 1 else ""))
        if not os.path.lexists(kept):
            os.rename(path, kept)
            # Moved: an fsync that fails now (a disk error) is no failure to move it (review
            # rev52c L4: "could not be moved, rm -r" of what was gone); if the move is lost
            # in a crash, the next start moves it again.
            with contextlib.suppress(OSError):
                fsync_dir(path.parent)
            return kept
    raise FileExistsError(errno.EEXIST, f"no free name to set it aside as {tag}", str(path))


# Linux's file attributes (``chattr``, ``lsattr``; ioctl_iflags(2)): FS_IOC_GETFLAGS is
# _IOR('f', 1, long); the kernel reads and writes an int at the address all the same.
_FS_IOC_GETFLAGS = (2 << 30) | (struct.calcsize("l") << 16) | (ord("f") << 8) | 1
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20


def file_attributes(path: Path) -> int | None:
    """``path``'s Linux file attributes (``FS_*_FL``, as ``lsattr`` shows them), or None where
    they cannot be read (not Linux, a file system without them, a file we may not open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
    except OSError:
        return None
    finally:
        os.close(fd)
    return int.from_bytes(flags[:4], sys.byteorder)


def attribute_problem(path: Path, st: os.stat_result) -> str | None:
    """Why ``path`` (``st``: its stat) cannot be changed whatever its owner and mode say, when
    it is an attribute (the kernel's EPERM, for root too): it is immutable (``chattr +i``:
    nothing in a directory so marked can be made, removed or renamed, no file so marked
    written, and neither chmod-ed) or append-only (``+a``). The line says so and how to see
    and clear it (``lsattr``, ``chattr -i``, root's: CAP_LINUX_IMMUTABLE); a ``chmod`` would
    change nothing (review rev50e: "run: chmod u+rwx"). The commands name the file itself
    (``realpath``): on a symbolic link ``chattr`` fails and ``lsattr -d`` shows nothing of its
    target (review rev51d L1). None: neither attribute is set, or the attributes cannot be
    read."""
    flags = file_attributes(path)
    if flags is None or not flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
        return None
    which, letter = ("immutable", "i") if flags & FS_IMMUTABLE_FL else ("append-only", "a")
    me = os.geteuid()
    real = os.path.realpath(path)
    look = f"lsattr -d {real}" if stat.S_ISDIR(st.st_mode) else f"lsattr {real}"
    clear = f"chattr -{letter} {real}"
    return (
        f"{path} cannot be changed by {user_label(me)}: not its mode (owner "
        f"{user_label(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}) but an attribute: it "
        f"is {which} (chattr +{letter}, `{look}` shows it); "
        f"{'run' if me == 0 else 'as root, run'}: {clear}"
    )


def dir_write_problem(path: Path) -> str | None:
    """Why this process cannot make and remove files in the directory ``path`` (as SQLite
    does beside a store: its -wal and -shm), when a person must fix it, or None (also for a
    read-only file system, which is no permission). Changes nothing. access() is not taken
    alone: under a seccomp filter that answers faccessat2 with EPERM (an older systemd's
    SystemCallErrorNumber=EPERM, glibc 2.33 or later) it says no to any directory; only
    where the owner and mode say no as well is it a problem (else the use will say). An
    append-only directory (``chattr +a``) passes access(), but nothing in it can be removed
    or renamed over (EPERM, for root too): its attribute is read (one ioctl: a daemon's start
    asks this once) and reported as an immutable one is (review rev51d L2)."""
    path = Path(path)
    if os.access(path, os.W_OK | os.X_OK, effective_ids=True):
        flags = file_attributes(path)
        if flags is None or not flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
            return None
        try:
            return attribute_problem(path, os.stat(path))
        except OSError:
            return None
    try:
        st = os.stat(path)
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return None
    except OSError:
        return None
    if (attribute := attribute_problem(path, st)) is not None:  # (whatever its mode says)
        return attribute
    if _mode_allows(st, 0o3):  # (w and x) access() was kept from answering
        return None
    me = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    said = (
        f"{path} cannot be written by {user_label(me)} (owner {user_label(st.st_uid)}, "
        f"mode {mode:04o})"
    )
    if st.st_uid != me:
        return f"{said}; {owner_fix(st.st_uid, path)}"
    return f"{said}; run: chmod u+rwx {path}"


def _not_a_directory(path: Path) -> Path:
    """The first path on the way to ``path`` that is there and no directory."""
    full = Path(os.path.abspath(path))
    for place in reversed(full.parents):
        try:
            if not stat.S_ISDIR(os.stat(place).st_mode):
                return place
        except OSError:
            break
    return full.parent


def _mode_allows(st: os.stat_result, bits: int) -> bool:
    """Do the owner, group and mode in ``st`` give this process ``bits`` (0o4 read, 0o2
    write, 0o1 search), as the kernel decides without ACLs? Root with CAP_DAC_OVERRIDE may
    (search: any directory)."""
    if os.geteuid() == 0 and _has_dac_override():
        return True
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.geteuid():
        granted = mode >> 6
    elif st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        granted = mode >> 3
    else:
        granted = mode
    return granted & bits == bits


CAP_DAC_OVERRIDE = 1


def _has_dac_override() -> bool:
    """Does this process hold CAP_DAC_OVERRIDE (``/proc/self/status``'s CapEff)? Taken as
    held where that cannot be read (then root's is as it always was)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_DAC_OVERRIDE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def _within(place: Path, own: Path | None) -> bool:
    """Is ``place`` ``own`` or below it?"""
    if own is None:
        return False
    own = Path(os.path.abspath(own))
    return place == own or own in place.parents


def _search_fix(st: os.stat_result, directory: Path) -> str:
    """How to let this process pass through ``directory`` (``st``), which is not its own:
    search permission only (x), for us, our group, or everyone; never a new owner (a system
    directory, another user's home)."""
    if st.st_uid == os.geteuid():
        return f"run: chmod u+x {directory}"
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return f"run: chmod g+x {directory}"
    group = _group_name(os.getegid())
    return (
        f"run: chmod o+x {directory} (or, for group {group} alone: chgrp {group} {directory}"
        f" && chmod g+x {directory})"
    )


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _not_entered(path: Path, write: bool, own: Path | None = None) -> str:
    """``path`` cannot be looked at (EACCES): the directory on its way we may not enter, and
    how to open it (``open_problem``'s ``own``)."""
    full = Path(os.path.abspath(path))
    blocked = full.parent
    for place in reversed(full.parents):
        try:
            os.stat(place)
        except PermissionError:
            blocked = place.parent
            break
        except OSError:
            break
    me = os.geteuid()
    what = "read and written" if write else "read"
    try:
        st = os.stat(blocked)
    except OSError:
        return f"{path} cannot be {what} by {user_label(me)}: a directory on its way is closed"
    mode = stat.S_IMODE(st.st_mode)
    if not _within(blocked, own):
        fix = _search_fix(st, blocked)
    elif st.st_uid != me:
        fix = owner_fix(st.st_uid, blocked)
    else:
        fix = f"run: chmod u+rwx {blocked}"
    return (
        f"{path} cannot be {what} by {user_label(me)}: the directory {blocked} on its way may "
        f"not be entered (owner {user_label(st.st_uid)}, mode {mode:04o}); {fix}"
    )


def _foreign_link(path: Path, lst: os.stat_result, me: int) -> str | None:
    """What is wrong with ``path`` (``lst``: its ``lstat``) if it is a symbolic link neither
    ``me`` nor root owns (``make_private_dir`` refuses it, ``private_dir_problem`` says so
    first), else None."""
    if not stat.S_ISLNK(lst.st_mode) or lst.st_uid in (me, 0):
        return None
    return (
        f"{path} is a symbolic link owned by {user_label(lst.st_uid)}, not by "
        f"{user_label(me)} who runs this; run: rm {path}"
    )


MAX_LINKS = 40  # symbolic links followed on one path, as Linux's lookup does (ELOOP past it)


@dataclass(frozen=True)
class Lookup:
    """What the kernel looks up on its way to a path (``look_up``): each entry in order,
    ``lstat``-ed (directories, the links themselves, the entries of each link's target), the
    directories held: ``/`` first; ``reached``: the last directory it got to (the path
    itself, or the nearest directory above it that is there: where what is missing would be
    made); ``whole``: the path is there."""

    entries: tuple[tuple[Path, os.stat_result], ...]
    reached: Path
    whole: bool


def look_up(path: Path) -> Lookup:
    """The entries on the way to ``path`` (absolute) one by one as the kernel resolves it: a
    link's target is followed where it is met, and ``..`` is the parent of the directory
    reached so far, not of the text before it (``os.path.abspath`` drops ``a/link/..`` as
    ``a``: the kernel goes to the link's target's parent). Stops where an entry is not there
    (ENOENT) or is not a directory with more to look up (left to what makes or writes the
    path). Any other error (EACCES, ELOOP, ...) is raised: not there is not a guess."""
    given = Path(path)
    if not given.is_absolute():
        raise ValueError(f"not an absolute path: {given}")
    entries = [(Path("/"), os.lstat("/"))]
    todo = list(given.parts[1:])
    here, links = Path("/"), 0
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            here = here.parent  # ``here`` has no link in it: its parent is the kernel's
            continue
        part = here / name
        try:
            st = os.lstat(part)
        except FileNotFoundError:
            return Lookup(tuple(entries), here, False)
        entries.append((part, st))
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(given))
            target = Path(os.readlink(part))
            if target.is_absolute():
                here = Path("/")
            todo[:0] = [p for p in target.parts if p != "/"]
        elif stat.S_ISDIR(st.st_mode):
            here = part
        else:
            return Lookup(tuple(entries), here, False)  # not a directory: nothing below it
    return Lookup(tuple(entries), here, True)


def user_label(uid: int) -> str:
    """``name (uid n)``, or ``uid n`` for a uid without a passwd entry."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def this_program(default: str = "COMMAND") -> str:
    """The running tlsroll program as an admin would type it again: its console script's path
    as it was started (``/opt/tlsroll/bin/tlsroll-leader`` under its unit), else ``default``
    (``python -m …``). Never its arguments: one may name a secret."""
    prog = sys.argv[0] if sys.argv else ""
    return prog if os.path.basename(prog).startswith("tlsroll") else default


_AS_ROOT_ONLY = False
"""Set by a program whose unit runs as root (the agent: ``runs_as_root``): ``owner_fix`` never
tells it to run as another user (review s45rev6 L1)."""


def runs_as_root() -> None:
    """This program runs as root under its unit (the agent): a file of another user's is
    chowned, never run as that user."""
    global _AS_ROOT_ONLY  # noqa: PLW0603 - one switch per process, set at its start
    _AS_ROOT_ONLY = True


def owner_fix(owner: int, path: Path) -> str:
    """What to do about ``path``, owned by ``owner`` and not by whoever runs this. A command on
    the files of a service's user (the leader's tlsroll; the CLI's ``init``) is run as that
    user: a ``chown`` there would leave files the service can no longer open (review s45rt2 H1).
    That is when the directory ``path`` is, or the one holding it, is that user's (the
    service's data dir: review s45rev6 M2), whoever runs this (root, or an admin of group
    tlsroll: M3); root is told how (``runuser``), anyone else only as an aside (L3: runuser is
    root's). One file of another user's in a directory of root's is chowned, as is a file of
    an owner without a name (no passwd entry: it cannot run anything), and every file of a
    program that runs as root (``runs_as_root``: the agent, L1)."""
    me = os.geteuid()
    name = user_name(owner)
    if not _AS_ROOT_ONLY and owner not in (0, me) and name != str(owner) and _holds(path, owner):
        how = f"runuser -u {name} -- {this_program()} …"
        if me == 0:
            return f"run it as {name}, with the same arguments: {how}"
        return f"run it as {name}, with the same arguments (as root: {how})"
    return f"run: chown {user_name(me)} {path}"


def _holds(path: Path, owner: int) -> bool:
    """Is ``path`` a directory of ``owner``'s, or the directory holding it?"""
    full = Path(os.path.abspath(path))
    for place in (full, full.parent):
        try:
            st = os.stat(place)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == owner:
            return True
    return False


def _check_owner(path: Path, st: os.stat_result, what: str) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafePermissions(
            f"{what} {path} is owned by {user_label(st.st_uid)}, not by {user_label(me)} who "
            f"runs this; {owner_fix(st.st_uid, path)}"
        )


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _check_holder(directory: Path, held: str, owner_hint: str) -> None:
    """Refuse ``directory``, which holds a secret (``held``, for the message), if it is not
    ours or root's (``owner_hint``: what to do) or group or others can write it: they could
    replace what is in it (as OpenSSH does for its keys)."""
    st = os.stat(directory)
    if st.st_uid not in (os.geteuid(), 0):
        fix = owner_fix(st.st_uid, directory)  # a service's data dir: run as its user (M3)
        raise UnsafePermissions(
            f"{directory} (holding {held}) is owned by {user_label(st.st_uid)}; "
            f"{fix if os.geteuid() == 0 or fix.startswith('run it as') else owner_hint}"
        )
    if st.st_mode & 0o022:
        raise UnsafePermissions(
            f"{directory} (holding {held}) is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 700 {directory}"
        )


def check_private_file(
    path: Path, *, shared: tuple[int, int] | None = None, root_shares: bool = False
) -> None:
    """Refuse a secret file that is not a regular file (``NotRegularFile``: a directory was
    told to ``chmod 600``, a FIFO was read for ever), that is not ours, that group or others
    can read or write, or that others could replace: its directory must be ours or root's
    and writable by nobody else (as OpenSSH does for its keys).

    ``shared`` (uid, gid): the agent reading a key it staged for a managed server running as
    its own user (``nodeagent.plans.Sharing``: the key is the agent's, with the live config's
    group): the file may also be readable by that group (gid), nothing more (at most 0640);
    it must still be ours (never the server's user's: it could rewrite it), its directory
    checked as always. ``root_shares`` (a
    server reading its own key, as PostgreSQL does, not running as root): a file of root's may
    also be readable by its group (root keeps the server's key and lets the server's group
    read it); a file of ours must still be ours alone."""
    path = Path(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # not "chmod 600" a directory, nor read a FIFO (s47rtin L4)
        raise NotRegularFile(f"{path} is not a regular file ({file_kind(st.st_mode)})")
    me = os.geteuid()
    # root's key, group-readable, for a server of its own user (root itself: as before)
    roots = root_shares and st.st_uid == 0 and me != 0
    if not roots:
        _check_owner(path, st, "secret file")
    group_reads = roots or (shared is not None and st.st_gid == shared[1])
    if st.st_mode & (0o037 if group_reads else 0o077):
        raise UnsafePermissions(
            f"{path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    _check_holder(
        real_path(path).parent,
        f"the secret {path.name}",
        "keep secrets in a directory of yours or root's",
    )


def check_private_dir(path: Path) -> None:
    """Refuse a directory of secrets that is not ours or that group or others can enter
    (it must be 0700)."""
    path = Path(path)
    st = os.stat(path)
    _check_owner(path, st, "secret directory")
    if st.st_mode & 0o077:
        raise UnsafePermissions(
            f"secret directory {path} is accessible by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 700 {path}"
        )


def socket_dir_problem(directory: Path, owner: int | None = None) -> str | None:
    """Why a Unix socket may not be bound in ``directory`` (by ``owner``, default: us), or
    None. A client can ask the same before it trusts a server's socket there.

    Whoever can write to the directory can remove the socket and bind their own in its place
    (a sticky directory such as /tmp only stops that for files they do not own, and the name
    is free while the server is down). So the directory must be ours and writable by nobody
    else; each directory above it must be ours or root's and, unless sticky, writable by
    nobody else (otherwise the whole directory could be renamed away and replaced); and no
    symbolic link on the way may be someone else's.
    """
    me = os.geteuid() if owner is None else owner
    given = Path(os.path.abspath(directory))
    link, walked = _walk(given, me)
    if link:
        return link
    real, st, above_known = _resolved(given, walked)
    if not stat.S_ISDIR(st.st_mode):
        return f"{real} is not a directory"
    if st.st_uid != me:
        return (
            f"{real} is owned by {user_label(st.st_uid)}, not by {user_label(me)} who runs "
            "the server; use a directory of its own (e.g. under the data_dir)"
        )
    if st.st_mode & 0o022:
        writable = f"{real} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if _shared_dir(real, st):
            return f"{writable}; use a directory of its own (e.g. under the data_dir)"
        return f"{writable}; run: chmod 700 {real}, or use a directory of its own"
    above = _above_problem(real, me, above_known)
    return above[1] if above else None


# The system's directories below / that others share by design though they may be neither
# sticky nor setgid (where they are either, the mode says so already). Named, not "any directory
# at most two levels below /": that took /run/tlsroll or /srv/refserver, a server's own, for
# the system's and left out the chmod that fixes it (review rvb L2). Names compared with, never
# written in (hence the noqa: S108).
SHARED_SYSTEM_DIRS = frozenset(
    Path(p)
    for p in (
        "/tmp",  # noqa: S108
        "/var/tmp",  # noqa: S108
        "/dev/shm",  # noqa: S108
        "/dev/mqueue",
        "/run",
        "/var/run",
        "/run/lock",
        "/var/lock",
        "/run/shm",
        "/run/user",
        "/var/mail",
        "/var/spool/mail",
    )
)


def _shared_dir(real: Path, st: os.stat_result) -> bool:
    """Whether ``real`` (resolved) is a directory others share by design: a sticky one (such as
    /tmp), one whose group shares it (setgid, such as /var/mail), / or one directly below it
    (/home, /var), or one of ``SHARED_SYSTEM_DIRS`` (/var/tmp, /dev/shm, /run): "chmod 700"
    would break the system's use of it (review s66 L3: a server as root with its socket in
    /tmp was told to chmod 700 /tmp)."""
    if st.st_mode & (stat.S_ISVTX | stat.S_ISGID):
        return True
    return len(real.parts) <= 2 or real in SHARED_SYSTEM_DIRS


Walked = list[tuple[Path, os.stat_result]]


def _walk(given: Path, me: int) -> tuple[str | None, Walked | None]:
    """``given`` (absolute) and each directory above it, each ``lstat``-ed once: a symbolic
    link on the way that is not ``me``'s or root's (why; checked from ``given`` up), else None;
    and, where none of them is a link at all, each path with its ``lstat`` (``given`` first).
    ``given`` (``abspath``-ed: no "." or "..") is then its own real path, and each ``lstat`` is
    what a ``stat`` would say (there is no link to follow), so the checks after it need no
    other walk: its resolution (``realpath`` ``lstat``-ed every part again) and the ``stat`` of
    each directory above (``_above_problem``) took two more, 21 system calls for one check of a
    directory six deep instead of 7 (issue 15: four such checks in every switch, one before it
    and one in each of its three admin calls). With a link on the way (``me``'s or root's),
    None: the caller resolves and ``stat``-s as before. A path beginning with exactly two
    slashes ("//run") is not its own real path ("/run"): resolved too."""
    walked: Walked = []
    linked = given.root != "/"
    for part in (given, *given.parents):
        st = os.lstat(part)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (me, 0):
                return f"{part} is a symbolic link owned by {user_label(st.st_uid)}", None
            linked = True
        walked.append((part, st))
    return None, None if linked else walked


def _resolved(given: Path, walked: Walked | None) -> tuple[Path, os.stat_result, Walked | None]:
    """``given``'s real path, its ``stat`` and, known already, the ``stat`` of each directory
    above it (``_walk``'s, where it found no link), else None (``_above_problem`` asks)."""
    if walked is not None:
        return given, walked[0][1], walked[1:]
    real = real_path(given)
    return real, os.stat(real), None


def _above_problem(real: Path, me: int, known: Walked | None = None) -> tuple[Path, str] | None:
    """Why a directory above ``real`` (resolved) could be renamed away by someone other than
    ``me`` or root (it is theirs, or writable by group or others and not sticky): that
    directory and why; or None. ``known``: each directory above ``real`` with its ``stat``
    (``_walk``'s), else each is ``stat``-ed here."""
    above = known if known is not None else ((p, os.stat(p)) for p in real.parents)
    for parent, pst in above:
        if pst.st_uid not in (me, 0):
            return parent, f"{parent} (above {real}) is owned by {user_label(pst.st_uid)}"
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            return parent, (
                f"{parent} (above {real}) is writable by group or others "
                f"(mode {stat.S_IMODE(pst.st_mode):04o})"
            )
    return None


def config_dir_problem(directory: Path) -> str | None:
    """Why the agent may not stage, share or write files in ``directory`` (the live config's),
    or None. The agent (root) writes there by name, chowns and chmods what it made: whoever
    else can write to a directory on the way (the managed server's user, whose data directory
    holds its config, as PostgreSQL's does) can rename a directory between the agent's checks
    and its writes, and so make it write, chown or chmod a file of someone else's. So, as
    ``socket_dir_problem`` asks of a socket's directory, every directory from / down to
    ``directory`` must be ours or root's and writable by nobody else (above ``directory``, a
    sticky one such as /tmp may be: nobody can rename what is in it that is not theirs), and
    no symbolic link on the way may be someone else's. The answer ends with what to run."""
    me = os.geteuid()
    given = Path(os.path.abspath(directory))
    try:
        link, walked = _walk(given, me)
        if link:
            return f"{link}; the server's config must be in a directory only root can change"
        real, st, above_known = _resolved(given, walked)
        if not stat.S_ISDIR(st.st_mode):
            return f"{real} is not a directory"
        problem: str | None = None
        where = real
        if st.st_uid not in (me, 0):
            problem = f"{real} is owned by {user_label(st.st_uid)}"
        elif st.st_mode & 0o022:
            problem = f"{real} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        elif above := _above_problem(real, me, above_known):
            where, problem = above
    except OSError as exc:
        return f"config directory {directory}: {exc.strerror or exc}"
    if problem is None:
        return None  # the user's name (a passwd lookup) only for the answer: issue 15
    return (
        f"config directory: {problem}: another user could make the agent write, chown or "
        f"chmod files elsewhere; run: chown {user_name(me)} {where}; chmod go-w {where}"
    )


def config_link_problem(config_file: Path) -> str | None:
    """Why the agent may not write the server's config ``config_file``, or None: it is a
    symbolic link (a config kept under /srv and linked into /etc, as config management often
    does). A new config is renamed over the path, and a rename replaces the link itself: the
    link became a regular file, the server read what the agent wrote while the file it
    pointed to kept the old config, and the next run of the config management put the link
    back, undoing the switch (review s64 M2). Followed instead, the agent would write in a
    directory it was never told of (nor allowed, under its unit's ReadWritePaths=). The
    answer says which path to name."""
    try:
        if not os.path.islink(config_file):
            return None
        target = Path(os.path.realpath(config_file))
    except OSError:  # (islink says False for what it cannot look at; realpath never fails)
        return None
    return (
        f"config_file {config_file} is a symbolic link to {target}: set config_file = "
        f"{target} (and allow its dir: install.sh agent --server-config-dir {target.parent})"
    )


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket, as the
    kernel recorded them (``SO_PEERCRED``: at ``connect`` for a client, at ``listen`` for a
    server), so a client can check who serves a socket as well."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


# Where ``unmounted_mount_point`` reads what is to be mounted and what is: the file systems
# table, systemd's mount units (an admin's, and those its fstab generator made), and this
# process's mounts.
FSTAB = Path("/etc/fstab")
MOUNT_UNIT_DIRS = (Path("/etc/systemd/system"), Path("/run/systemd/generator"))
MOUNTINFO = Path("/proc/self/mountinfo")
TEST_MOUNT_ROOT_ENV = "TLSROLL_TEST_MOUNT_ROOT"
"""Tests only: a directory the three tables above are read under instead of ``/``
(``ROOT/etc/fstab``, ``ROOT/proc/self/mountinfo``, ...), so that a test can say which
directory is a mount point and whether it is mounted without mounting anything. Not a
setting: set wrong, it only makes a daemon take an unmounted disk for a config error or the
other way round."""


def _unescaped(field: str) -> str:
    """A path of fstab or mountinfo, whose blanks and backslashes are written in octal
    (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read_lines(path: Path) -> list[str] | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read().splitlines()
    except OSError:
        return None


def _fstab_options(field: str) -> list[str]:
    """The options of an fstab line (its 4th field): unescaped as its paths are, then split at
    the commas outside double quotes, as libmount reads them (``context="a,b",noauto`` is two
    options, the second ``noauto``)."""
    return re.findall(r'(?:"[^"]*"|[^,"])+', _unescaped(field))


def _left_to_a_person(options: list[str]) -> bool:
    """Whether an fstab line's ``options`` leave its mounting to a person: ``noauto``, the
    last of ``auto`` and ``noauto`` winning, as systemd's fstab generator reads them (review
    rev52c L1; ``mount -a`` skips a line with any ``noauto``: on a host without systemd,
    ``noauto,auto`` counts as to be mounted, exit 1), unless systemd mounts it anyway: at its
    first access (``x-systemd.automount``, or its old spelling ``comment=systemd.automount``:
    the usual ``noauto,x-systemd.automount,_netdev`` of a network share, not mounted yet when a
    daemon starts before the network: review rev52c M1, it stopped the daemon for good with
    "remove noauto") or pulled in by a unit (``x-systemd.wanted-by=``, ``required-by=``)."""
    noauto = False
    for option in options:
        if option in ("auto", "noauto"):
            noauto = option == "noauto"
        elif option in ("x-systemd.automount", "comment=systemd.automount") or option.startswith(
            ("x-systemd.wanted-by=", "x-systemd.required-by=")
        ):
            return False
    return noauto


class Unmounted(NamedTuple):
    """A mount point on a path's way that is not mounted now (``unmounted_mount_point``)."""

    point: Path
    """As it is spelled where it is named."""
    named: str
    """Where it is named: ``/etc/fstab``, or ``systemd's NAME.mount``."""
    noauto: bool
    """fstab marks it ``noauto``: nothing mounts it but a person."""


def _canonical(place: Path, mounted: Mapping[Path, str] | None = None) -> Path:
    """How mount points are compared: by their real path (``os.path.realpath``), as systemd's
    fstab generator writes the ``Where=`` of the unit it makes of an fstab line, and mountinfo
    shows a mount point; a data dir or a mount point spelled through a symbolic link was one
    mount point for one spelling and another, or none, for the other (review rev52c L2). Of
    one that does not exist (not made yet, a dangling link, or on a way we may not search)
    what exists is resolved and the rest taken as spelled, as systemd's fstab generator does
    (review rev53c L: a mount directory made at mount time was two mount points, fstab's
    noauto line and the generator's unit).

    With ``mounted`` (what mountinfo shows mounted, each with its file system's type: an fstab
    line's or a unit's mount point may be any mount of the machine), the way is resolved one
    name at a time, a mount point taken as the directory it is, and nothing at or below a
    mount of a file system that is not a local disk's (``LOCAL_FILE_SYSTEMS``: a network
    share, FUSE, an automount) is looked at: a look at a share whose server is down (a NAS off
    for the night, an NFS hard mount) waits for that server, and the daemon's start with it
    (review rev53a M1: a share spelled through a link, or a mount point below a mounted share,
    was looked at). What lies below such a mount is taken as spelled there; below a local
    disk's (/var, /srv on partitions of their own) the way is resolved on (review rev53b M:
    stopping there too made fstab's spelling and the data dir's differ again)."""
    if not mounted:
        try:
            return Path(os.path.realpath(place, strict=True))
        except (OSError, ValueError):
            return place
    top = Path("/")
    resolved, rest, links = top, list(place.parts[1:]), 0
    while rest:
        name = rest.pop(0)
        if name in ("", "."):
            continue
        kind = mounted.get(resolved)  # (a mount point's file system's type)
        if resolved != top and kind is not None and kind not in LOCAL_FILE_SYSTEMS:
            return Path(os.path.normpath(resolved.joinpath(name, *rest)))  # not looked at
        if name == "..":
            resolved = resolved.parent
            continue
        step = resolved / name
        if step in mounted:  # a mount point: a directory, not a link
            resolved = step
            continue
        try:
            if not stat.S_ISLNK(os.lstat(step).st_mode):
                resolved = step
                continue
            links += 1
            target = Path(os.readlink(step))
        except (OSError, ValueError):  # not there (yet): the rest as spelled, as systemd does
            return Path(os.path.normpath(resolved.joinpath(name, *rest)))
        if links > _MAX_LINKS:
            return place
        if target.is_absolute():
            resolved, rest = top, [*target.parts[1:], *rest]
        else:
            rest = [*target.parts, *rest]
    return resolved


_MAX_LINKS = 40  # symbolic links followed in one path, as Linux's own limit (ELOOP)

LOCAL_FILE_SYSTEMS = frozenset(
    {
        *("ext2", "ext3", "ext4", "xfs", "btrfs", "bcachefs", "zfs", "f2fs", "jfs", "nilfs2"),
        *("reiserfs", "vfat", "msdos", "exfat", "ntfs", "ntfs3", "hfsplus", "udf", "iso9660"),
        *("squashfs", "erofs", "overlay", "tmpfs", "ramfs", "devtmpfs"),
    }
)
"""The file system types (mountinfo's) of a local disk or of memory, which a look at never
waits for a server (``_canonical``); any other (nfs, cifs, FUSE, autofs, ...) is not looked
into."""


def _mount_points_to_be(root: Path, mounted: Mapping[Path, str]) -> dict[Path, Unmounted]:
    """The mount points /etc/fstab and systemd's mount units (``Where=``) name, by their
    real paths (``_canonical``), each as it is spelled there, with where it is named and
    whether nothing mounts it at boot: an fstab line with ``noauto``
    is mounted by a person only (``mount POINT``), unless an admin's unit takes its place
    (one in /etc/systemd/system overrides the unit systemd's fstab generator makes of the
    line, for the same mount point). A unit has no ``noauto``: it is taken as to be mounted."""
    points: dict[Path, Unmounted] = {}
    fstab = root / FSTAB.relative_to("/")
    for line in _read_lines(fstab) or []:
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1].startswith("/"):
            noauto = len(fields) >= 4 and _left_to_a_person(_fstab_options(fields[3]))
            spelled = Path(os.path.normpath(_unescaped(fields[1])))
            place = _canonical(spelled, mounted)
            points.setdefault(place, Unmounted(spelled, str(FSTAB), noauto))
    for directory in MOUNT_UNIT_DIRS:
        try:
            units = sorted((root / directory.relative_to("/")).glob("*.mount"))
        except OSError:
            continue
        for unit in units:
            for line in _read_lines(unit) or []:
                key, _, value = line.strip().partition("=")
                if key.strip() == "Where" and value.strip().startswith("/"):
                    spelled = Path(os.path.normpath(value.strip()))
                    place = _canonical(spelled, mounted)
                    named = Unmounted(spelled, f"systemd's {unit.name}", False)
                    if directory == MOUNT_UNIT_DIRS[0] and place in points and points[place].noauto:
                        points[place] = named  # the admin's unit, not fstab's noauto line
                    points.setdefault(place, named)
    return points


def unmounted_mount_point(path: Path, environ: Mapping[str, str] = os.environ) -> Unmounted | None:
    """The directory on ``path``'s way (``path`` itself or one above it, ``/`` aside) that
    /etc/fstab or a systemd mount unit names as a mount point and that is not mounted now
    (``/proc/self/mountinfo``), with where it is named and whether fstab marks it ``noauto``
    (``Unmounted``); or None, also when what is mounted cannot be read (nothing can be told
    then). Mount points and the directories on the way are compared by their real paths
    (``_canonical``): the same one whichever way fstab, a unit or ``path`` spells it. A
    daemon asks it (``not_mounted``) before it calls a directory it cannot use a person's to
    fix: until its disk is mounted, a mount point is a directory of the file system below,
    empty, often root's 0700 (review rev50f M2: "chown" of it, exit 2, stopped the leader for
    good before the disk came)."""
    root = Path(environ.get(TEST_MOUNT_ROOT_ENV) or "/")
    lines = _read_lines(root / MOUNTINFO.relative_to("/"))
    if lines is None:
        return None
    mounted: dict[Path, str] = {}  # mount point -> its file system's type
    for line in lines:
        fields = line.split()
        if len(fields) >= 5:
            kind = line.partition(" - ")[2].split()
            mounted[Path(os.path.normpath(_unescaped(fields[4])))] = kind[0] if kind else ""
    to_be = _mount_points_to_be(root, mounted)
    full, real = Path(os.path.abspath(path)), Path(os.path.realpath(path))  # (a link's way too)
    spelled = (full, *full.parents, real, *real.parents)
    on_way = dict.fromkeys((*spelled, *map(_canonical, spelled)))  # (as ``to_be``'s are)
    ways = [p for p in on_way if p in to_be and p != p.parent]
    for place in ways:
        # A mount point fstab spells through a symbolic link is mounted on the link's target,
        # which mountinfo shows (review rev51c L4: a mounted disk was said not mounted).
        if place not in mounted and Path(os.path.realpath(place)) not in mounted:
            return to_be[place]
    return None


def not_mounted(
    what: str, path: Path, program: str, environ: Mapping[str, str] = os.environ
) -> TerminalError | None:
    """What a daemon's ``path`` (its data dir, its config: ``what``) is when a directory on its
    way is a mount point that is not mounted now (``unmounted_mount_point``), as the error the
    daemon (``program``) stops with; None if there is none. Both daemons ask it before they
    call a directory they cannot use a person's to fix, and before they take an empty or
    missing data dir for one not set up yet (the agent: for a node not enrolled, which it
    would enrol onto the file system below the mount point).

    A disk not mounted yet: exit 1 (a ``TerminalError``), the service manager starts the
    daemon again, mounted by then; never the chown, chmod or "no such directory" of the empty
    mount point below it, exit 2, stopped for good (review rev50f M2). A mount point fstab
    marks ``noauto`` is mounted by nobody but a person: exit 1 started the daemon again for
    ever (session 51's open point), so it is the fstab's config error, exit 2, saying how to
    mount it and that the daemon is then started again by hand."""
    if (found := unmounted_mount_point(path, environ)) is None:
        return None
    point, named, noauto = found
    # (``point`` as fstab or the unit spells it, ``path`` perhaps the other way)
    itself = _canonical(Path(os.path.abspath(path))) == _canonical(point)
    way = "is" if itself or Path(os.path.abspath(path)) == point else f"is below {point},"
    if noauto:
        return ConfigError(
            named,
            None,
            f"the {what} {path} {way} a mount point marked noauto there, which is not mounted"
            f" now and is never mounted at boot: mount it (mount {shlex.quote(str(point))}) or"
            f" remove noauto from its options, then start {program} again",
        )
    return TerminalError(
        f"the {what} {path} {way} a mount point ({named}) that is not mounted now: is its"
        " disk not mounted yet? (exit 1: a service manager starts the daemon again; run by"
        " hand, start it again once the disk is mounted)"
    )
