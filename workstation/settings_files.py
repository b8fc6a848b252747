"""The workstation's settings files, replaced as one set under their documented names.

``settings.json``, ``ca.pem``, ``client.pem`` and ``client.key`` keep fixed names (practice
software may read them directly), so no single rename replaces them together. A new set is
written whole into a staging directory beside them (``.settings-new``), every file fsynced; a
commit marker, written last, makes it the set to use; then each file is renamed into place.

A run cut short anywhere (a crash, a kill, a full disk) leaves one of two things, which the next
run (``finish``, which every entry point calls before it reads the files) takes care of:

- a staging directory with no marker: the new set was never committed; it is removed and the
  old set stays as it was (no file of it was touched yet);
- a staging directory with its marker: the new set was committed; the files still in it are
  renamed into place (those already renamed are not there any more), then it is removed;
- a marker that lists a file this version does not know (a newer tlsroll's run, cut short): it
  is left alone and ``NewerStaging`` raised. Discarding it (as if uncommitted) could leave the
  part already moved beside the old rest, and completing it would move files this version does
  not know: that newer version must finish it.

Either way the next run finds the whole old set or the whole new set, never a key of one with the
certificate of the other. The steps run under an exclusive lock on the settings directory, so two
runs at once never take each other's staging for an interrupted one.

``.enrolment-kept`` (``KEPT``) holds this PC's client key and certificate when they are not in
place: a new enrolment's whose final check failed (the leader had signed it, and superseded the
certificate in place), or an enrolment a run without one (``--no-enrol``) took out of use. The
next enrolment proves with it that it is the same PC (``bootstrap_csr.Reenrolment``); once an
enrolment is in place it is removed.

``.enrolment-pending`` (``PENDING``, a file, 0600) says that a run sent the node its
finishing request (the CSR) and has not kept what came back yet: the name asked for, the node
and when (``mark_pending``). The node may have had the certificate signed, which then holds the
name at that node, while its answer never arrived (the connection dropped, the run was
killed): nobody holds that certificate, and the leader refuses the name to this PC's next run
as taken. The next run, refused so at that node, says then what happened and what to do
(s63 M1: it said "by this PC if its tlsroll is too old ..., else by another PC"). Removed once
the new pair is kept (or a refusal says the node signed nothing).

``.settings-replaced`` (``REPLACED``) holds the set a new enrolment's set replaced (or, of the
two pairs a run without one takes out of place, ``set_aside``, the older: s45ws; never over
a set there that may still be valid: s45rev1 M1), when the
caller says its client key and certificate are worth keeping (``replace``'s ``keep_replaced``:
one that may still be valid, another name's or another CA's, whose key would otherwise be gone:
s43rev3 Low 4). One set at most: a later one takes its place. It is copied beside the staging
(``.settings-replaced.new``, ``REPLACED_NEW``; not into it: an older tlsroll, finding an
interrupted run's staging, removes only files there, and a directory stuck it, review s44rev5
L1) before the new set is committed, and moved into place with the new set's files (s44rev1
L3: copied over the one before ahead of the commit, a commit that failed lost the earlier kept
set while nothing was replaced): a run cut short before the commit leaves the kept set before
as it was, one after it is completed by the next run. What
is in its way there (a file, a link: not followed) is removed as it moves in (s44rev1 L2: it
failed every enrolment). A later write removes it once its certificate has expired (s44rev1 L4).

A file that is not a regular one (a FIFO, whose open waits for a writer: a run hung on it for
ever) is never opened, wherever it is: the client files, ``ca.pem``, ``settings.json``, the
commit marker (s47ws). What is copied aside is read without following a link (``_client_in``,
``_read_nofollow``: s45rev7 L1); what tells the set in place (its name, whether it still works,
whether a pair is worth keeping) follows one, as the practice software does (``read_file``:
s46rev2 M2). A client.pem link that names a certificate of the key beside it makes a pair
with it: that certificate is kept with it (written out as a file of ours, 0600; s47rev3 L1).
A client.key (a file of ours) whose client.pem is a link or a FIFO otherwise may be the only
copy of a valid pair's key: it is kept alone in ``REPLACED`` (an enrolment's keeping,
``set_aside``), never removed or overwritten unkept, unless that would lose a set ``REPLACED``
holds that may still be valid (``_held``: then nothing is changed, and that is said; s46rev2
M1). A client.key with no client.pem at all is not kept (``cert_gone``, s47rev3 M1).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from tlsroll.errors import TerminalError
from tlsroll.fsutil import PRIVATE, PUBLIC, fsync_dir, stage_atomic, write_atomic

STAGING = ".settings-new"
KEPT = ".enrolment-kept"  # this PC's client.key and client.pem while not in place (see above)
REPLACED = ".settings-replaced"  # the set before a new enrolment, if worth keeping (see above)
REPLACED_NEW = REPLACED + ".new"  # its copy, staged beside STAGING until committed (see above)
PENDING = ".enrolment-pending"  # a finishing request sent, its answer not kept yet (see above)
CLIENT = ("client.key", "client.pem")
MARKER = "commit"  # in STAGING: the names to rename into place, written last
NAMES = ("client.key", "client.pem", "ca.pem", "settings.json")  # in the order they move
# No locks on that file system (NFS refuses an exclusive lock on a read-only descriptor: EBADF).
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF})


class NewerStaging(TerminalError):
    """The staging holds a committed set of a newer tlsroll (its marker lists files this
    version does not know): left as it is."""


class ReplacedNotKept(TerminalError):
    """The client key and certificate in place were to be kept in ``REPLACED`` (worth it,
    or they could not be read to tell) and could not be: nothing was replaced. ``path``: the
    file that failed; ``reason``: why (the OS's words); ``reading``: it failed reading the
    pair in place (else writing the copy). ``held``: not tried, as the client.key in place
    is alone (its client.pem a link or a FIFO) and keeping it would lose the set
    ``REPLACED`` holds, which may still be valid (s46rev2 M1): that set's certificate (PEM;
    empty if it cannot be read)."""

    def __init__(
        self,
        path: Path,
        reason: str,
        *,
        reading: bool,
        errno: int | None = None,
        held: bytes | None = None,
    ) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.reading = reading
        self.errno = errno  # (the OS's error number, if one)
        self.held = held


class Unfinished(TerminalError):
    """The new set was committed, and a later step failed: ``error`` (an OSError, its
    ``filename`` the whole path at fault). The next ``finish`` tries again."""

    def __init__(self, error: OSError, directory: Path) -> None:
        super().__init__(f"{directory}: {error}")
        self.error = error


class Finished(Enum):
    """What ``finish`` did with an interrupted run's staging."""

    FORWARD = "completed"  # it was committed: its files are now in place
    BACK = "discarded"  # it was not: the settings before it stay


def replace(
    directory: Path,
    files: Mapping[str, tuple[bytes, int]],
    check: Callable[[Path], None] | None = None,
    keep_replaced: Callable[[bytes, bytes], bool] | None = None,
) -> Path | None:
    """Replace the files ``files`` names (``{name: (data, mode)}``, names of ``NAMES``) in
    ``directory`` (which exists) as one set; the others stay. Raises OSError; when it does, the
    directory holds the old set, or a committed new one that the next ``finish`` completes
    (``Unfinished`` when it was committed: its files may be in place already).
    ``NewerStaging`` (nothing written) if a newer tlsroll's run is left to finish.

    ``check(staging)``, if given, is called with the new files staged (in the directory it
    gets), before they are committed: whatever it raises leaves the old set as it was.

    ``keep_replaced(key_pem, cert_pem)``, if given and the new set has a client key, is asked
    about the client key and certificate in place (if both are there) once the check passed:
    if True, the files of the set in place are copied into the staging (its key 0600) before
    the new set is committed (into ``REPLACED_NEW``), and take the place of ``REPLACED`` with
    the new set's files.
    The files in place are read as ``set_aside`` reads them: a link is not copied, a FIFO
    never opened (s47ws). A client.key in place whose client.pem is a link (to no certificate
    of it) or a FIFO is kept alone (``_keep_replaced``), unless that would lose a set
    ``REPLACED`` holds that may still be valid: ``ReplacedNotKept`` (``held``), nothing
    written (s46rev2 M1); one with no client.pem at all is not kept (``cert_gone``).
    Returns ``REPLACED`` if so, else None. ``ReplacedNotKept`` (nothing written) if they could
    not be read or copied. Once the new set is in place, a set in ``REPLACED`` whose
    certificate has expired is removed."""
    unknown = set(files) - set(NAMES)
    if unknown:
        raise ValueError(f"not a settings file: {sorted(unknown)}")
    staging = directory / STAGING
    with _locked(directory):
        _finish(directory)
        _drop(directory, REPLACED_NEW)  # (an older tlsroll's finish leaves it: see ``_discard``)
        os.mkdir(staging, 0o700)
        try:
            order = [name for name in NAMES if name in files]
            for name in order:
                data, mode = files[name]
                stage_atomic(staging / name, data, mode, name)
            fsync_dir(staging)
            if check is not None:
                check(staging)
            kept = None
            if keep_replaced is not None and "client.key" in files:
                new_pair = (files["client.key"][0], files.get("client.pem", (b"", 0))[0])
                kept = _keep_replaced(directory, keep_replaced, new_pair)
                # (``_keep`` ends with an fsync of ``directory``: the copy is there for good
                # before the marker, which takes it for moved once it is gone; s44rev5 L2)
            # (REPLACED in the list: an older tlsroll leaves such a staging to this one)
            marker = json.dumps({"files": order + [REPLACED] * bool(kept)}).encode()
            os.replace(stage_atomic(staging / MARKER, marker, PUBLIC), staging / MARKER)
            fsync_dir(staging)  # committed
        except Exception:  # (not a kill: that leaves the staging to the next run's finish)
            with contextlib.suppress(OSError):  # else the next run removes it
                _discard(directory, staging)
            raise
        try:
            _roll_forward(directory, staging, order + [REPLACED] * bool(kept))
        except OSError as exc:
            raise Unfinished(exc, directory) from None
        if "client.key" in files:  # an enrolment in place: nothing kept aside is wanted now
            with contextlib.suppress(OSError):  # committed: a pair left there is older, and the
                _drop_kept(directory)  # next run goes by the newest (``connection``)
        if kept is None:
            with contextlib.suppress(OSError):  # (tried again at the next write)
                _drop_expired_replaced(directory)
    return kept


def _keep_replaced(
    directory: Path, worth: Callable[[bytes, bytes], bool], new_pair: tuple[bytes, bytes]
) -> Path | None:
    """The set in place copied into ``REPLACED_NEW`` if ``worth`` says its client key and
    certificate are worth keeping; returns ``REPLACED`` (where it goes once committed)
    then, else None. ``ReplacedNotKept`` if the set could not be read or copied.

    The files are read as ``set_aside`` reads them (``_client_in``, ``_read_nofollow``: a
    link is not copied, s45rev7 L1; a FIFO is never opened, s47ws: a run waited on it for
    ever); one of ``ca.pem``, ``settings.json`` that is not a file of ours is not kept. A
    client.pem link that names a certificate of the key is that key's certificate
    (``_linked_cert``: kept with it if ``worth`` says so, written out as a file of ours;
    s47rev3 L1). A client.key with no client.pem at all is not kept (``cert_gone``: s47rev3
    M1). A client.key (a file of ours) whose client.pem is a link to something else, or a
    FIFO, may be the only copy of a valid pair's key (s47ws: it was overwritten unkept): it is
    kept alone, unless ``REPLACED`` holds that key already (s46rev2 L1: its certificate with
    it), or keeping it would lose the set ``REPLACED`` holds, which may still be valid
    (``_held``, as ``set_aside`` asks; s46rev2 M1): ``ReplacedNotKept`` (``held``) then."""
    try:
        key, cert = _client_in(directory, follow_dir=True)
    except OSError as exc:
        raise ReplacedNotKept(Path(exc.filename), _why(exc), reading=True) from None
    if key is None:
        return None  # no key of ours in place: nothing to keep
    if cert is None:
        cert = _linked_cert(directory, key)  # (s47rev3 L1: kept with it, as a pair)
    if cert is None and not os.path.lexists(directory / "client.pem"):
        return None  # its certificate gone: worth nothing (``cert_gone``; s47rev3 M1)
    present: dict[str, bytes] = {"client.key": key}
    if cert is not None:
        if not worth(key, cert):
            return None
        present["client.pem"] = cert
    else:
        if _key_in(directory / REPLACED) == key:
            return None  # kept there already (a run cut short), with what it has
        held = _held(directory, (key, b""), new_pair, lambda k, c, _newer: worth(k, c))
        if held is not None:
            reason = "it holds a set that may still be valid"
            raise ReplacedNotKept(directory / REPLACED, reason, reading=False, held=held)
    for name in (n for n in NAMES if n not in CLIENT):
        try:
            present[name] = _read_nofollow(directory / name)
        except OSError as exc:
            if exc.errno in _NOT_OURS:
                continue  # none, or not a file of ours: not kept
            raise ReplacedNotKept(directory / name, _why(exc), reading=True) from None
    try:
        _keep(directory, {n: (data, PRIVATE) for n, data in present.items()}, REPLACED_NEW)
    except OSError as exc:
        raise ReplacedNotKept(
            directory / REPLACED, _why(exc), reading=False, errno=exc.errno
        ) from None
    return directory / REPLACED


def _linked_cert(directory: Path, key_pem: bytes) -> bytes | None:
    """The certificate a client.pem link in ``directory`` names, if it is one of the key
    ``key_pem`` (s47rev3 L1: the key was kept without it, never to go by itself): read
    through the link (``read_file``: a FIFO never opened), written out again as the
    certificate alone (PEM), so that nothing else the file holds is ever copied (s45rev7
    L1). None if client.pem is no link, or names no certificate of that key."""
    if not os.path.islink(directory / "client.pem"):
        return None
    try:
        cert = x509.load_pem_x509_certificate(read_file(directory / "client.pem"))
        key = serialization.load_pem_private_key(key_pem, None)
        # Inside: a certificate whose public key cannot be loaded (an unknown curve, a damaged
        # byte) raises here, and every run ended in a traceback (review s47rev4 M1).
        if cert.public_key() != key.public_key():
            return None
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_gone(directory: Path) -> bool:
    """Whether ``directory`` holds a client.key (a regular file) and no client.pem at all
    (not a link, not a FIFO: none). Such a key is not kept (s47rev3 M1): its certificate is
    gone, so it can neither be used (the practice software needs both) nor prove this PC's
    name (``bootstrap_csr.Reenrolment`` signs with the pair), and the certificate the leader
    holds for it ends by itself. It is replaced by an enrolment and removed by ``set_aside``
    (as before s47ws); keeping it made an enrolment over it stop whenever ``REPLACED`` held a
    set that may still be valid (s46rev2 M1), the everyday "delete client.pem and enrol
    again" included. A key beside a link or a FIFO is kept: its certificate may still be
    where that names."""
    try:
        key_mode = os.lstat(directory / "client.key").st_mode
    except OSError:
        return False
    return stat.S_ISREG(key_mode) and not os.path.lexists(directory / "client.pem")


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _put_replaced(directory: Path) -> None:
    """The set kept in ``REPLACED_NEW`` (committed) in place of ``REPLACED``: what is there
    removed first, whatever it is (a link or a file not followed: s44rev1 L2)."""
    if not os.path.lexists(directory / REPLACED_NEW):
        return  # moved already, before an interruption
    _drop(directory, REPLACED)
    os.replace(directory / REPLACED_NEW, directory / REPLACED)


def _drop_expired_replaced(directory: Path) -> None:
    """``REPLACED`` removed if the certificate it holds has expired (s44rev1 L4: a key kept
    for ever); one that cannot be read is left as it is."""
    replaced = directory / REPLACED
    if not stat.S_ISDIR(os.lstat(replaced).st_mode):
        return  # (FileNotFoundError: none) not ours to read through; replaced when needed
    try:  # (a link or a FIFO there: not read, s47ws; a key alone: kept)
        cert = x509.load_pem_x509_certificate(_read_nofollow(replaced / "client.pem"))
    except (OSError, ValueError):
        return
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
        _drop(directory, REPLACED)


def keep(directory: Path, key_pem: bytes, cert_pem: bytes) -> Path:
    """Keep a client key and certificate that are not in place in ``KEPT`` (replacing what it
    held: the newer enrolment); returns its path. Raises OSError."""
    kept = directory / KEPT
    with _locked(directory):
        _keep(directory, {"client.key": (key_pem, PRIVATE), "client.pem": (cert_pem, PUBLIC)})
    return kept


class SetAside(NamedTuple):
    """What ``set_aside`` did: ``kept`` is ``KEPT`` (where this PC's newest pair is now);
    ``moved``: the pair in place is there now (else it was the older, or not a pair);
    ``replaced``: ``REPLACED`` if the older pair went there (worth keeping), else None;
    ``older``: the older pair's certificate (PEM) if it was worth keeping (kept in
    ``REPLACED``, or left); ``held``: if the client files were left in place, changed in
    nothing, as the older pair could not be kept without losing the set ``REPLACED`` holds
    (one that may still be valid: s45rev1 M1), that set's certificate (PEM; empty if it
    could not be read); ``older_at``: where the older pair is then (the settings dir, or
    ``KEPT``: s45rev7 L3); ``lone``: the client files in place were a key (a file of ours)
    beside a client.pem that is not (a link to no certificate of it, a FIFO): the key alone
    went to ``REPLACED`` (``replaced``), or was held in place (``held``) (s47ws: it was
    removed); or beside no client.pem at all (neither of them set): it was removed
    (``cert_gone``: s47rev3 M1)."""

    kept: Path
    moved: bool
    replaced: Path | None
    older: bytes | None = None
    held: bytes | None = None
    older_at: Path | None = None
    lone: bool = False


def set_aside(
    directory: Path,
    worth: Callable[[bytes, bytes, bytes], bool] | None = None,
    before: Mapping[str, bytes] | None = None,
) -> SetAside | None:
    """Take ``client.key`` and ``client.pem`` out of place (a set without a client certificate
    is in place): into ``KEPT`` unless it holds a pair issued later already (a certificate
    that cannot be read counts as the older), or that same pair (a run cut short after it
    kept it: only the files in place go, s45rev1 M2). Of two pairs, the older one (the one
    in place, or the one ``KEPT`` held) is not lost if ``worth(key_pem, cert_pem,
    newer_cert_pem)`` says it may still be valid (another name's or another CA's: the
    newer did not supersede it; s45ws): it takes the place of ``REPLACED``, as a set a new
    enrolment replaced does, only if the set there is not one that may still be valid
    (``worth`` asked about it too; one that cannot be read may be): else nothing is changed
    and ``held`` says so (s45rev1 M1: that set was lost). ``before``: the set's files as they
    were before the settings in place were written (``ca.pem``, ``settings.json``, read by
    the caller): they go with the pair in place to ``REPLACED`` if it is theirs (s45rev1
    L3; their settings.json names it: s45rev7 M1), and a ``REPLACED`` holding that pair
    already is left as it is. Links are not copied (a link in place is only removed), a FIFO
    is never opened, and the copies are 0600; a client.pem link that names a certificate of
    the key beside it makes a pair with it, that certificate written out (``_linked_cert``,
    s47rev3 L1). A
    key (a file of ours) beside a client.pem that is not (a link, a FIFO) goes to
    ``REPLACED`` alone (``_set_key_aside``; s47ws: it was removed with it); one with no
    client.pem at all is removed (``cert_gone``: s47rev3 M1). None if there was no client
    file in place. Raises OSError; a key is removed only once it is kept elsewhere, or its
    certificate gone."""
    with _locked(directory):
        present = [n for n in CLIENT if os.path.lexists(directory / n)]
        if not present:
            return None
        moved, replaced, older_cert = False, None, None
        # (s45rev7 L1: a link is not copied through: it was followed, a 0600 file elsewhere
        # copied into KEPT at 0644; it is only removed, as a lone file is. Only a certificate
        # of the key that a client.pem link names is read, and written out as one: s47rev3 L1.)
        key, cert = _client_in(directory, follow_dir=True)
        if key is not None and cert is None:
            cert = _linked_cert(directory, key)  # (its certificate: a pair, s47rev3 L1)
        in_place = (key, cert) if key is not None and cert is not None else None
        if key is not None and cert is None:
            if not os.path.lexists(directory / "client.pem"):  # (``cert_gone``: s47rev3 M1)
                os.unlink(directory / "client.key")
                fsync_dir(directory)
                return SetAside(directory / KEPT, False, None, lone=True)
            return _set_key_aside(directory, key, present, worth)
        if in_place is not None:
            kept = kept_pair(directory) if os.path.lexists(directory / KEPT) else None
            moved = not os.path.lexists(directory / KEPT) or _newer(in_place[1], kept)
            older, newer = (kept, in_place) if moved else (in_place, kept)
            if kept == in_place:  # kept already: one pair, not two (s45rev1 M2)
                moved, older = True, None
            elif (
                older is not None
                and newer is not None
                and worth is not None
                and worth(older[0], older[1], newer[1])
            ):
                older_cert = older[1]
                held = _held(directory, older, newer, worth)
                if held is not None:
                    older_at = directory / KEPT if moved else directory
                    return SetAside(directory / KEPT, False, None, older_cert, held, older_at)
                files = {"client.key": (older[0], PRIVATE), "client.pem": (older[1], PRIVATE)}
                if older == in_place and before is not None and _names(before, in_place):
                    files |= {n: (data, PRIVATE) for n, data in before.items() if n in NAMES}
                replaced = directory / REPLACED
                # REPLACED holding that pair already (a run cut short after it put it there)
                # is left as it is: the set read before this run is no longer the pair's, the
                # new settings being in place (s45rev7 M1).
                if _pair_in(replaced) != older:
                    # What is there goes first (it holds nothing that may still be valid):
                    # one that cannot be removed leaves no copy of the key behind (s45rev1 L1).
                    _drop(directory, REPLACED)
                    _drop(directory, REPLACED_NEW)
                    _keep(directory, files, REPLACED_NEW)
                    _put_replaced(directory)
                    fsync_dir(directory)
            if moved and kept != in_place:
                _keep(
                    directory,
                    {"client.key": (in_place[0], PRIVATE), "client.pem": (in_place[1], PRIVATE)},
                )
        for name in present:
            os.unlink(directory / name)
        fsync_dir(directory)
        return SetAside(directory / KEPT, moved, replaced, older_cert)


def _set_key_aside(
    directory: Path,
    key: bytes,
    present: list[str],
    worth: Callable[[bytes, bytes, bytes], bool] | None,
) -> SetAside:
    """``set_aside`` of a key in place (a file of ours) whose client.pem is not (a link to no
    certificate of it, a FIFO): whether it is still needed cannot be told, and it may be the
    only copy of a valid pair's key (s47ws: it was removed with its partner), so it goes to
    ``REPLACED`` alone (0600), unless what ``REPLACED`` holds may still be valid
    (``_held``): the client files then stay as they are (``held``). ``REPLACED`` holding that
    key already (a run cut short, or the whole pair kept there) is left as it is (s46rev2 L1:
    its certificate was lost). Its partner is only removed (a link read only to tell that it
    names no certificate of the key). The pair ``KEPT`` holds stays there."""
    kept = kept_pair(directory) if os.path.lexists(directory / KEPT) else None
    if (held := _held(directory, (key, b""), kept, worth)) is not None:
        return SetAside(directory / KEPT, False, None, None, held, directory, lone=True)
    if _key_in(directory / REPLACED) != key:
        _drop(directory, REPLACED)
        _drop(directory, REPLACED_NEW)
        _keep(directory, {"client.key": (key, PRIVATE)}, REPLACED_NEW)
        _put_replaced(directory)
        fsync_dir(directory)
    for name in present:
        os.unlink(directory / name)
    fsync_dir(directory)
    return SetAside(directory / KEPT, False, directory / REPLACED, lone=True)


def _held(
    directory: Path,
    older: tuple[bytes, bytes],
    newer: tuple[bytes, bytes] | None,
    worth: Callable[[bytes, bytes, bytes], bool] | None,
) -> bytes | None:
    """The certificate (PEM) of the set ``REPLACED`` holds if it may still be valid
    (``worth``, the ``newer`` pair superseding it only if issued after it), empty if it
    cannot be read (it may be), or if it holds a key alone (s47ws: whether it is still
    needed cannot be told); None if there is nothing there to lose: none, not a directory
    (in the way, not followed), no key in it, the key of ``older`` or ``newer`` itself (a
    run cut short: it is not lost), or a pair not worth keeping (``worth`` None: none is)."""
    replaced = directory / REPLACED
    try:
        if not stat.S_ISDIR(os.lstat(replaced).st_mode):
            return None
        key, cert = _client_in(replaced)
    except FileNotFoundError:
        return None
    except OSError:
        return b""
    if key is None or key == older[0] or (newer is not None and key == newer[0]):
        return None
    if cert is None:
        return b""
    if worth is None:
        return None
    newer_cert = newer[1] if newer is not None else b""
    issued, newer_issued = _issued(cert), _issued(newer_cert)
    later = issued is not None and newer_issued is not None and newer_issued > issued
    return cert if worth(key, cert, newer_cert if later else b"") else None


class Pending(NamedTuple):
    """What ``PENDING`` says: the name a run asked for, of the node it asked (its name, as its
    hello gives it), and when (ISO 8601, UTC, to the second)."""

    name: str
    node: str
    at: str


def mark_pending(directory: Path, name: str, node: str) -> None:
    """Write ``PENDING`` (replacing one there) before the finishing request is sent. Raises
    OSError."""
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    put_pending(directory, Pending(name, node, at))


def put_pending(directory: Path, pending: Pending) -> None:
    """Write ``pending`` as ``PENDING`` (0600: it names the PC and where it enrols). Raises
    OSError. Written in place, not through a temporary file: a run cut short meanwhile leaves
    no file of another name in the settings dir, and one cut short or empty reads as none
    (``read_pending``), which costs only what it would say. Not fsynced (a note for the next
    run, not the set). A link there is not followed, a FIFO not waited on (OSError)."""
    body = {"version": 1, "name": pending.name, "node": pending.node, "at": pending.at}
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(directory / PENDING, flags, PRIVATE)
    with os.fdopen(fd, "wb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(directory / PENDING))
        os.fchmod(fd, PRIVATE)
        os.ftruncate(fd, 0)
        f.write((json.dumps(body) + "\n").encode())


def read_pending(directory: Path) -> Pending | None:
    """What ``PENDING`` says; None if there is none, or it cannot be read (a link, a FIFO, not
    ours: never followed or opened) or is not of this shape."""
    try:
        body = json.loads(_read_nofollow(directory / PENDING))
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("version") != 1:
        return None
    fields = [body.get(key) for key in ("name", "node", "at")]
    if not all(isinstance(value, str) and value.isprintable() for value in fields):
        return None
    name, node, at = (str(value)[:100] for value in fields)
    return Pending(name, node, at)


def drop_pending(directory: Path) -> None:
    """Remove ``PENDING`` (the file or whatever is there: not followed), if there. Raises
    OSError."""
    if os.path.lexists(directory / PENDING):  # (most runs: none)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / PENDING)


def read_set(directory: Path) -> dict[str, bytes]:
    """The set's files in ``directory`` that can be read (a link not followed: not ours)."""
    found: dict[str, bytes] = {}
    for name in NAMES:
        with contextlib.suppress(OSError):
            found[name] = _read_nofollow(directory / name)
    return found


MAX_FILE = 1 << 20  # bytes: more than any settings file holds (a CA bundle: some kB)

# A settings file that is none of ours to read: none, a link (``_read_nofollow``), a FIFO or
# another file that is not a regular one, or one larger than any settings file.
_NOT_OURS = frozenset({errno.ENOENT, errno.ELOOP, errno.EINVAL, errno.EFBIG, errno.ENXIO})


def _read_nofollow(path: Path, dir_fd: int | None = None) -> bytes:
    """A regular file's bytes, its last component not followed (a link: ELOOP); one that is
    not a regular file (a FIFO, which hung the read: s45rev7 L2) or larger than
    ``MAX_FILE``: OSError, never opened (s47ws), nor waited on."""
    return _read_regular(path, dir_fd, follow=False)


def read_file(path: Path) -> bytes:
    """A settings file's bytes, a link followed (the practice software follows it: the
    set in place is told by it, s46rev2 M2), only if what it names is a regular file: one
    that is not (a FIFO: a run waited on it for ever, s47ws), or larger than ``MAX_FILE``,
    is OSError, never opened. For telling what the set in place is, never
    for copying (``_read_nofollow``)."""
    return _read_regular(path, None, follow=True)


def _read_regular(path: Path, dir_fd: int | None, *, follow: bool) -> bytes:
    with os.fdopen(_open_regular(path, dir_fd, follow=follow), "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:  # (it grew since)
        raise OSError(errno.EFBIG, "larger than a settings file", str(path))
    return data


def _open_regular(path: Path, dir_fd: int | None, *, follow: bool) -> int:
    """A descriptor of ``path`` if it is a regular file of at most ``MAX_FILE`` bytes, else
    OSError (``_read_regular``)."""
    # Checked before it is opened (a FIFO is never opened: its open would wait for a writer),
    # and again on the descriptor, opened without blocking (what is there may have changed).
    mode = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow).st_mode
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "a symbolic link, not followed", str(path))
    if stat.S_ISDIR(mode):  # (one that may hold anything: not "none", s44rev1 L2)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if held.st_size > MAX_FILE:
            raise OSError(errno.EFBIG, "larger than a settings file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


# Where a process's open descriptors have names (Linux: both; macOS, and FreeBSD with
# fdescfs: /dev/fd, whose open is a dup of the descriptor, sharing its offset).
_FD_DIRS = ("/dev/fd", "/proc/self/fd")


@contextlib.contextmanager
def held_files(*paths: Path) -> Iterator[tuple[Path, ...]]:
    """Settings files for a library that opens them by name (ssl's ``load_cert_chain``),
    each opened once as ``read_file`` reads it (a link followed; a regular file of at most
    ``MAX_FILE`` bytes, else OSError: a FIFO never opened) and named by a path to that very
    descriptor (``/dev/fd/N``), so that what the library loads is the file checked: one
    swapped in by name after the check (a FIFO: the run waited on it for ever) is never
    opened (s46rev2 L5, s47rev3 L4). Where no such path names the same file (a system
    without ``/dev/fd`` for every descriptor: FreeBSD without fdescfs), the file's own path,
    checked (as before). The descriptors are closed on leaving."""
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(_open_regular(path, None, follow=True))
        yield tuple(_fd_path(fd, path) for fd, path in zip(fds, paths, strict=True))
    finally:
        for fd in fds:
            os.close(fd)


def _fd_path(fd: int, path: Path) -> Path:
    """A path that names the open descriptor ``fd`` (the same file: device and inode), its
    offset at the start (a dup shares it); ``path`` if there is none."""
    held = os.fstat(fd)
    for fd_dir in _FD_DIRS:
        name = Path(fd_dir) / str(fd)
        try:
            named = os.stat(name)
        except OSError:
            continue
        if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            os.lseek(fd, 0, os.SEEK_SET)
            return name
    return path


class ClientFiles(NamedTuple):
    """``client.key`` and ``client.pem`` (PEM) in a directory, each None if it is not a file
    of ours to read (``_NOT_OURS``: none, a link, a FIFO, ...)."""

    key: bytes | None
    cert: bytes | None


def _client_in(directory: Path, *, follow_dir: bool = False) -> ClientFiles:
    """The client key and certificate in ``directory``, each read only if a regular file,
    not followed if a link (s45rev7 L1: a link in place was followed, its file copied into
    KEPT), never opened if a FIFO (s45rev7 L2, s47ws); ``directory`` itself not followed
    unless ``follow_dir``: the settings dir may be a link the admin made (its pair was
    removed unkept when it was not followed), a folder of ours in it (KEPT, REPLACED) may
    not (none then). Raises OSError (its filename the whole path) if one cannot be read for
    another reason (a permission). With no key of ours there, the certificate is not read
    (None): it is worth nothing without it, and one that could not be read (a root's 0600
    file copied in alone) stopped every enrolment and ``--no-enrol`` (review s47rev3 L3)."""
    nofollow = 0 if follow_dir else os.O_NOFOLLOW
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | nofollow | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return ClientFiles(None, None)
        raise OSError(exc.errno, exc.strerror, str(directory)) from None
    try:
        found: list[bytes | None] = []
        for name in CLIENT:  # (the key first: no key, no certificate read)
            if found and found[0] is None:
                found.append(None)
                continue
            try:
                found.append(_read_nofollow(Path(name), dir_fd))
            except OSError as exc:
                if exc.errno not in _NOT_OURS:
                    raise OSError(exc.errno, exc.strerror, str(directory / name)) from None
                found.append(None)
    finally:
        os.close(dir_fd)
    return ClientFiles(found[0], found[1])


def _key_in(directory: Path) -> bytes | None:
    """The client key in ``directory`` (``_client_in``), None if none can be read."""
    try:
        return _client_in(directory).key
    except OSError:
        return None


def _pair_in(directory: Path, *, follow_dir: bool = False) -> tuple[bytes, bytes] | None:
    """The client key and certificate (PEM) in ``directory`` if both are regular files that
    can be read (``_client_in``). Raises OSError if one cannot be read for another reason
    (a permission)."""
    key, cert = _client_in(directory, follow_dir=follow_dir)
    return (key, cert) if key is not None and cert is not None else None


def _names(before: Mapping[str, bytes], pair: tuple[bytes, bytes]) -> bool:
    """Whether the set ``before`` is the one ``pair`` (key, certificate) worked with: that
    pair, and a ``settings.json`` naming it (its ``client_cert_file`` and
    ``client_fingerprint``). The settings written since (none naming a client certificate)
    are not (s45rev7 M1: after a run cut short, or one held, they went with it)."""
    if (before.get("client.key"), before.get("client.pem")) != pair:
        return False
    try:
        settings = json.loads(before.get("settings.json", b""))
        cert = x509.load_pem_x509_certificate(pair[1])
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(settings, dict):
        return False
    recorded = settings.get("client_fingerprint")
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    return (
        settings.get("client_cert_file") == "client.pem"
        and settings.get("client_key_file", "client.key") == "client.key"
        and isinstance(recorded, str)
        and recorded.lower().removeprefix("sha256:").replace(":", "") == fingerprint
    )


def kept_pair(directory: Path) -> tuple[bytes, bytes] | None:
    """The key and certificate (PEM) ``KEPT`` holds, if both can be read (links not
    followed: s45rev7 L1)."""
    try:
        return _pair_in(directory / KEPT)
    except OSError:
        return None


def _newer(cert_pem: bytes, kept: tuple[bytes, bytes] | None) -> bool:
    """Whether ``cert_pem`` was issued after the certificate of ``kept`` (key, certificate):
    one that cannot be read is older than any that can (audit s40ws L1)."""
    issued = _issued(cert_pem)
    if issued is None:
        return False
    before = _issued(kept[1]) if kept is not None else None
    return before is None or issued > before


def _issued(cert_pem: bytes) -> dt.datetime | None:
    try:
        return x509.load_pem_x509_certificate(cert_pem).not_valid_before_utc
    except ValueError:
        return None


def _drop_kept(directory: Path) -> None:
    _drop(directory, KEPT)


def _drop(directory: Path, name: str) -> None:
    """``name`` in ``directory`` removed, whatever it is: a directory with all it holds, a
    file, or a link (the link itself: not ours to follow)."""
    path = directory / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _remove(directory, path)
    else:  # not ours to follow
        os.unlink(path)
        fsync_dir(directory)


def _keep(directory: Path, files: Mapping[str, tuple[bytes, int]], name: str = KEPT) -> None:
    """Write ``files`` into the directory ``name`` (0700) in ``directory``, every one 0600
    whatever mode ``files`` gives it (a kept set is the user's alone; ``set_aside`` writes its
    files 0600 too: review s45wsfix2); a file of ``NAMES`` there that ``files`` does not name
    is removed (it was of another set)."""
    kept = directory / name
    with contextlib.suppress(FileExistsError):
        os.mkdir(kept, 0o700)
    # One that was there already (made by hand, or under another umask) is made private: it
    # holds a key. Not followed if it is a link.
    try:
        fd = os.open(kept, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(kept)) from None
        raise
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    for file in [n for n in NAMES if n in files]:  # the key first: a pair cut short is one
        data, _mode = files[file]  # whose key does not match
        write_atomic(kept / file, data, PRIVATE)
    for file in NAMES:
        if file not in files and os.path.lexists(kept / file):
            os.unlink(kept / file)
    fsync_dir(kept)
    fsync_dir(directory)


def finish(directory: Path) -> Finished | None:
    """Complete or discard what an interrupted ``replace`` left in ``directory``; None if it
    left no set (and nothing is written or created when it left nothing at all).
    ``NewerStaging`` if a newer tlsroll left it (nothing is changed then)."""
    if not os.path.lexists(directory / STAGING):
        return None
    with _locked(directory):
        return _finish(directory)


def _finish(directory: Path) -> Finished | None:
    staging = directory / STAGING
    try:
        st = os.lstat(staging)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):  # not ours to follow; no set was ever staged in it
        os.unlink(staging)
        fsync_dir(directory)
        return None
    order = _committed(staging)
    if order is None:
        staged = any(name in NAMES for name in os.listdir(staging))
        _discard(directory, staging)
        # With none of the set's files in it, the staging was just made, or it was committed
        # and moved already (cut short while removed): nothing of a set was discarded.
        return Finished.BACK if staged else None
    _roll_forward(directory, staging, order)
    return Finished.FORWARD


def _committed(staging: Path) -> list[str] | None:
    """The names the marker lists, or None if there is no (valid) marker: not committed.
    ``NewerStaging`` if it is valid but lists a file name this version does not know."""
    try:  # (a link or a FIFO there is none of ours: not read, never waited on, s47ws)
        data = json.loads(_read_nofollow(staging / MARKER))
    except OSError as exc:
        if exc.errno in _NOT_OURS:
            return None
        raise
    except (ValueError, UnicodeDecodeError):
        return None  # written atomically, so never half there: not one of ours
    names = data.get("files") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(_file_name(n) for n in names):
        return None
    if not all(n in NAMES or n == REPLACED for n in names):
        raise NewerStaging(f"{staging} holds a committed set with files this version does not know")
    return [str(n) for n in names]


def _file_name(name: object) -> bool:
    """True if ``name`` could be a settings file's name (of this version or a later one): a
    plain name in the settings dir, no path."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", MARKER)
        and "/" not in name
        and "\0" not in name
    )


def _roll_forward(directory: Path, staging: Path, order: list[str]) -> None:
    for name in order:
        if name == REPLACED:
            _put_replaced(directory)
            continue
        with contextlib.suppress(FileNotFoundError):  # moved already, before an interruption
            os.replace(staging / name, directory / name)
    fsync_dir(directory)  # the new set in place for good before its marker goes
    _remove(directory, staging)


def _remove(directory: Path, staging: Path) -> None:
    """Remove ``staging``, its marker first: a staging cut short in its removal is never taken
    for a committed one missing files. A directory in it (one put there by hand) goes with
    all it holds, its links not followed, before the files."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging / MARKER)
        fsync_dir(staging)
    # Directories first (s45rev1 L2): one that cannot be removed (root's) fails before a file
    # (a kept key) is gone, so what the error says to keep is still there.
    names = os.listdir(staging)
    dirs = {n for n in names if stat.S_ISDIR(os.lstat(staging / n).st_mode)}
    for name in sorted(dirs):
        _rmtree(staging / name)
    # Then the key (s46ws): a REPLACED cut short in its removal holds no key alone, which
    # would be taken for one kept alone that may still be valid (``_held``), every later run
    # held by it.
    files = sorted((n for n in names if n not in dirs), key=lambda n: n != "client.key")
    for name in files:
        os.unlink(staging / name)
        if name == "client.key":
            fsync_dir(staging)
    os.rmdir(staging)
    fsync_dir(directory)


def _rmtree(path: Path) -> None:
    """``shutil.rmtree``, whose error names the file that could not be removed by its whole
    path (it gives only its last part: s45ws, "Permission denied: f")."""

    def named(_func: object, where: str, info: tuple[type, BaseException, object]) -> None:
        if isinstance(info[1], OSError):
            raise OSError(info[1].errno, info[1].strerror, where) from None
        raise info[1]

    shutil.rmtree(path, onerror=named)


def _discard(directory: Path, staging: Path) -> None:
    """An uncommitted staging removed, and the copy of the set in place staged beside it
    (``REPLACED_NEW``) first: while the staging is there, the next run's ``finish`` removes
    both. (One left by an older tlsroll, which removes only the staging, goes at the next
    ``replace``.)"""
    _drop(directory, REPLACED_NEW)
    _remove(directory, staging)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the settings directory (no lock file added to it). Where the file
    system has no locks, the steps run without."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)
