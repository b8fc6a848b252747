"""One SQLite file, shared by threads: the durability settings, transactions and schema
migrations all stores use.

WAL journal with ``synchronous=FULL`` (a committed transaction survives a power cut), one
connection guarded by a lock (async callers go through ``asyncio.to_thread``), and writes in
``BEGIN IMMEDIATE`` transactions so that a read-check-write is atomic against every other
writer, in this process or another. A store file and its ``-wal``/``-shm`` are 0600: they hold
secrets (the password verifier).

Schema migrations: each store has one list ``MIGRATIONS``; ``PRAGMA user_version`` is how many
of them the file has had. ``migrate`` applies the missing ones in order, in one transaction
(all or nothing), and refuses a file from a newer tlsroll (``SchemaTooNew``, naming the copy
it may go back to), unless that file says this one may read it (``readable_by``: the newer
migrations are ones an older tlsroll may ignore, the store's ``IGNORABLE``). Before it
migrates an existing file it keeps a copy as it was (``keep_copy``: ``NAME.before-v<N>``),
marked as one where its store says how (the leader's copy put back is taken as a restored
backup), so that a tlsroll rolled back has its store to go back to; unless every migration
pending is one an older tlsroll may ignore and the file's schema is one only builds that read
``readable_by`` wrote (``reads_floor_from``, per store: ``copy_needed``), as that build reads
the migrated file as it is. A file that cannot be written whose pending migrations are all
ignorable is opened as it is where its store copes without them (``read_only_as_is``: the
reference server). Migration 1 is
the tables of tlsroll 0.1.0 with ``CREATE … IF NOT EXISTS``, so that a file 0.1.0 wrote is
taken over as it is.

To change a schema, append one migration to the store's list: an SQL script (statements with
``;``) or a function of the connection. Never edit, reorder or remove a migration that was
released: files in the field have had it (their user_version counts it) and will not have it
again. A migration that only adds a table (with no foreign key into an older one), columns
that are NULL or have a default (``ALTER TABLE ADD COLUMN``, with no CHECK, REFERENCES,
COLLATE, UNIQUE or generation), or an index that is not unique, on plain columns (no COLLATE,
no expression or function: an older tlsroll must be able to maintain it; partial on a literal
only; ``_check_ignorable`` does not read an index's SQL, so this is the author's to keep;
SQLite keeps it up to date as an older tlsroll writes), writes no row, and whose rows the code
copes without (an older tlsroll writes them so), goes into the store's
``IGNORABLE`` as well: an older tlsroll then runs on the file without going back to the copy
(what was written since is kept). A migration must not commit or call ``executescript``
(which commits); it runs with foreign keys off (SQLite cannot switch them inside a
transaction), and ``PRAGMA foreign_key_check`` must pass before the commit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import glob
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

from tlsroll import dbthread, logs
from tlsroll.errors import TerminalError, TransientError, UnsafePermissions, os_error_text
from tlsroll.fsutil import fsync_dir

Migration: TypeAlias = str | Callable[[sqlite3.Connection], None]
"""One step of a store's schema: an SQL script, or a function that changes the schema."""

log = logs.get_logger(__name__)

PRIVATE = 0o600


def to_text(t: dt.datetime | None) -> str | None:
    """How every store keeps a time: ISO 8601 in UTC."""
    return t.astimezone(dt.UTC).isoformat() if t else None


def from_text(s: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(s) if s else None


class SchemaTooNew(TerminalError):
    """The file was written by a newer tlsroll: its schema has migrations this one lacks, and
    does not say that this one may read it (``readable_by``).

    ``what``: the file's kind, the message's word for it ("store", "journal"). ``copy``: a
    copy kept before an upgrade that this tlsroll can read (``usable_copy``), named with its
    schema and time and what putting it back loses (``losing``); None if there is none."""

    def __init__(
        self,
        path: Path,
        found: int,
        known: int,
        *,
        what: str = "store",
        copy: tuple[Path, int, dt.datetime] | None = None,
        losing: str = "",
    ) -> None:
        text = (
            f"{path}: {what} schema version {found} is newer than this tlsroll knows ({known}):"
            f" this tlsroll is older than the one that wrote {path.name}; run the newer"
            ' version, or see README "Downgrading tlsroll"'
        )
        if copy is not None:
            kept, version, when = copy
            text += (
                f"; {kept.name} is {path.name} as it was before that upgrade (schema {version},"
                f" kept {when.isoformat(timespec='seconds')}): putting it back loses what was"
                f" written since{f' ({losing})' if losing else ''}"
            )
        super().__init__(text)
        self.path = path
        self.found = found
        self.known = known
        self.copy = copy[0] if copy is not None else None


class StoreCopyFailed(TerminalError):
    """The copy of a store as it was before its migration (``keep_copy``) could not be made."""


def make_private(path: Path) -> None:
    """Create the store file 0600 before SQLite opens it, or make an existing one 0600.

    SQLite creates ``-wal``, ``-shm`` (and ``-journal``) with the mode of the database file, so
    they are 0600 too; ones left by an older tlsroll are made 0600 here.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE)
    try:
        if (found := stat.S_IMODE(os.fstat(fd).st_mode)) != PRIVATE:
            try:
                os.fchmod(fd, PRIVATE)
            except PermissionError:
                raise UnsafePermissions(
                    f"{path} has mode {found:04o} and is not ours to change; run: chmod 600 {path}"
                ) from None
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", PRIVATE)


def statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one at a time (``;`` in a string or trigger is kept)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending  # an unfinished statement: SQLite reports it


Mark: TypeAlias = Callable[[sqlite3.Connection, dt.datetime], None]
"""What a store writes into the copy ``keep_copy`` made (a connection to the copy, in a
transaction; the copy's time): so that the tlsroll started on the copy, put back, knows it runs
on a file older than its last state (the leader's ``backup_made_at``: ``leader.db.mark_copy``)."""

FLOOR_TABLE = "schema_floor"
"""The table holding a file's ``readable_by``, when it is below its version (see ``migrate``)."""

STALE_TMP = dt.timedelta(days=1)
"""A copy's temporary file older than this is removed even if its pid is alive (reused)."""


def copy_name(path: Path, known: int) -> Path:
    """Where ``keep_copy`` keeps ``path`` as it was before its migration to version ``known``."""
    return path.with_name(f"{path.name}.before-v{known}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def remove_stale_copies(path: Path) -> list[Path]:
    """Remove what an interrupted ``keep_copy`` left: ``NAME.before-v<N>.tmp-<PID>`` (and its
    ``-journal``, ``-wal``, ``-shm``: review s40 L-c) of a pid
    that is not alive (or this one's), or older than ``STALE_TMP``. A full copy of the store,
    secrets and all, that no one would ever remove otherwise (audit s40, L2). Returns what was
    removed."""
    removed = []
    now = time.time()
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.before-v*.tmp-*"):
        pid_text = tmp.name.rpartition(".tmp-")[2]
        for companion in ("-journal", "-wal", "-shm"):  # SQLite's, beside a copy half made
            pid_text = pid_text.removesuffix(companion)
        try:
            pid = int(pid_text)
            old = now - tmp.lstat().st_mtime > STALE_TMP.total_seconds()
        except (ValueError, OSError):
            continue
        if pid == os.getpid() or not _alive(pid) or old:
            try:
                tmp.unlink()
            except OSError:
                continue
            removed.append(tmp)
    if removed:
        log.info("store.copy_tmp_removed", path=str(path), removed=[str(r) for r in removed])
    return removed


def usable_copy(path: Path, known: int) -> tuple[Path, int, dt.datetime] | None:
    """The newest copy ``keep_copy`` kept of ``path`` that a tlsroll knowing schema ``known``
    can open (its schema at most ``known``): (the copy, its schema, when it was made), or None.
    Only reads."""
    best: tuple[int, float, Path] | None = None
    for copy in path.parent.glob(f"{glob.escape(path.name)}.before-v*"):
        if not copy.name.rpartition(".before-v")[2].isdigit():
            continue  # a temporary file
        try:
            conn = sqlite3.connect(f"{copy.as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            finally:
                conn.close()
            mtime = copy.stat().st_mtime
        except (sqlite3.Error, OSError):
            continue
        if version <= known and (best is None or (version, mtime) > best[:2]):
            best = (version, mtime, copy)
    if best is None:
        return None
    version, mtime, copy = best
    return copy, version, dt.datetime.fromtimestamp(int(mtime), dt.UTC)


def keep_copy(
    conn: sqlite3.Connection, path: Path, known: int, *, mark: Mark | None = None
) -> Path | None:
    """Before ``migrate`` changes an existing file to version ``known``: copy it, as it is, to
    ``NAME.before-v<known>`` (0600, like the store: it holds the same secrets) and log one line
    naming it; return the copy's path, None if there is nothing to keep.

    Nothing to keep: a new file (no schema yet), one at ``known`` already, or a newer one
    (``migrate`` refuses it, unchanged, or reads it as it is: ``readable_by``). The way back
    after a rollback of tlsroll: stop the daemon, move the copy over the file (removing
    ``NAME-wal`` and ``NAME-shm``); what was written since the upgrade is lost.

    ``mark`` writes into the copy what says it is one (the leader's ``backup_made_at``: a
    leader started on the copy put back knows that what happened since is not in it, and
    re-learns its nodes as after a restore from a backup; audit s40, H1).

    A copy of that name already there is replaced, with a warning naming its time (audit s40,
    L3): the file about to be migrated is at an older version than ``known``, so it is the
    state an older tlsroll left, never older than that copy (a copy put back with ``cp`` and
    run on for weeks, then upgraded again: the copy kept would lose those weeks); a first
    attempt of this migration that failed left the file as it was, and a new copy of it
    loses nothing. Unless that copy is of a newer schema than the file, or was written after
    it (a backup of an older state restored over the store): it may hold what the file lacks,
    and is kept aside as ``NAME.before-v<N>.replaced-TIME`` (review s40, L-b).

    The copy is SQLite's ``VACUUM INTO`` (a consistent snapshot through ``conn``, outside any
    transaction of the migration) into a new private file, marked, synced, checked to be at the
    version found (never a file another process migrated meanwhile), then renamed in place.
    A file another process migrated to ``known`` meanwhile (two starts at once) needs no copy:
    that process kept one; None (review s40, L-a: the second start failed).
    A copy that cannot be made (a full disk) is a ``StoreCopyFailed``: the file is not
    migrated without its way back."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found >= known:
        return None
    if found == 0 and conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        return None  # new: nothing in it to go back to
    copy = copy_name(path, known)
    try:
        before: dt.datetime | None = dt.datetime.fromtimestamp(int(copy.stat().st_mtime), dt.UTC)
    except OSError:
        before = None
    newer = before is not None and _newer_copy(copy, path, found)
    kept: Path | None = None
    tmp = copy.with_name(f"{copy.name}.tmp-{os.getpid()}")
    made_at = _now()
    try:
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE))
        conn.execute("VACUUM INTO ?", (str(tmp),))
        os.chmod(tmp, PRIVATE)
        copied = sqlite3.connect(tmp, isolation_level=None)
        try:
            # The copy stands alone: no -wal beside it to put back with it.
            copied.execute("PRAGMA journal_mode=DELETE")
            version = int(copied.execute("PRAGMA user_version").fetchone()[0])
            if found < version == known:
                # Another process (a second start at once) migrated the file since ``found``
                # was read, after keeping its copy: nothing left to keep (review s40 L-a).
                log.info("store.copy_not_needed", path=str(path), version=version)
                return None
            if version != found:
                raise sqlite3.OperationalError(
                    f"the file changed to schema version {version} while it was copied"
                )
            if mark is not None:
                copied.execute("BEGIN IMMEDIATE")
                try:
                    mark(copied, made_at)
                except BaseException:
                    copied.execute("ROLLBACK")
                    raise
                copied.execute("COMMIT")
        finally:
            copied.close()
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if newer:
            kept = copy.with_name(f"{copy.name}.replaced-{made_at.strftime('%Y%m%dT%H%M%SZ')}")
            _move_exclusive(copy, kept)
        os.replace(tmp, copy)
        fsync_dir(path.parent)
    except (OSError, sqlite3.Error) as exc:
        raise StoreCopyFailed(
            f"{path}: cannot keep a copy before migrating it from schema version {found} to "
            f"{known} ({copy}: {exc}); not migrated"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    if kept is not None:
        log.warning(
            "store.copy_replaced",
            path=str(path),
            copy=str(copy),
            version=found,
            to=known,
            kept_as=str(kept),
            detail=f"a copy of that name was there, of a newer schema or newer than {path.name}"
            f" (a backup restored over it?): it is kept as {kept.name}, and {copy.name} is now"
            f" {path.name} as it is",
        )
    elif before is not None:
        log.warning(
            "store.copy_replaced",
            path=str(path),
            copy=str(copy),
            version=found,
            to=known,
            replaced_copy_of=before.isoformat(timespec="seconds"),
            detail=f"a copy of that name was there; it is replaced by {path.name} as it is now,"
            " the state the older tlsroll left (the copy there was of that state or an older"
            " one)",
        )
    else:
        log.info("store.copy_kept", path=str(path), copy=str(copy), version=found, to=known)
    return copy


def set_aside_old_copy(path: Path, known: int) -> Path | None:
    """A migration to ``known`` that keeps no copy (``copy_needed``) finds one of that name,
    ``NAME.before-v<known>``: an earlier upgrade to ``known``, gone back from since. Left there,
    it would be taken for this upgrade's way back ("Downgrading tlsroll": move it over the
    store) and lose all since that earlier upgrade; so it is kept aside as
    ``NAME.before-v<known>.replaced-TIME``, with a warning (review rev51a L3), as ``keep_copy``
    keeps a copy it must not replace. Return where it went, or None (none there). One that
    cannot be moved is warned of and left (the migration goes on: it needs no copy)."""
    copy = copy_name(path, known)
    if not copy.exists():
        return None
    kept = copy.with_name(f"{copy.name}.replaced-{_now().strftime('%Y%m%dT%H%M%SZ')}")
    try:
        _move_exclusive(copy, kept)
        fsync_dir(path.parent)
    except OSError as exc:
        log.warning(
            "store.old_copy_left",
            path=str(path),
            copy=str(copy),
            error=f"{exc.strerror or exc} (errno {exc.errno})",
            detail=f"{copy.name} is of an earlier upgrade, not of this one (which needs no"
            f" copy), and could not be moved aside: do not go back with it",
        )
        return None
    log.warning(
        "store.old_copy_set_aside",
        path=str(path),
        copy=str(copy),
        kept_as=str(kept),
        detail=f"{copy.name} is of an earlier upgrade, gone back from since; this one needs no"
        f" copy: it is kept as {kept.name}, not to be taken for this upgrade's way back",
    )
    return kept


def _newer_copy(copy: Path, path: Path, found: int) -> bool:
    """Whether the copy already at ``copy`` may hold more than ``path`` at ``found`` (its
    schema is higher, or it was written after ``path``: a backup of an older state restored
    over the store): then ``keep_copy`` keeps it aside rather than replacing it (review s40
    L-b). One that cannot be read is taken as not newer."""
    try:
        conn = sqlite3.connect(f"{copy.as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
        written = max(
            (p.stat().st_mtime for p in (path, Path(f"{path}-wal")) if p.exists()), default=0.0
        )
        return version > found or copy.stat().st_mtime > written
    except (sqlite3.Error, OSError):
        return False


def floor_of(version: int, ignorable: Collection[int]) -> int:
    """The lowest schema a tlsroll must know to read and write a file at ``version``: the
    highest migration up to it that an older tlsroll may not ignore."""
    while version > 0 and version in ignorable:
        version -= 1
    return version


def _only_ignorable(found: int, known: int, ignorable: Collection[int]) -> bool:
    """Whether a file at ``found`` has migrations pending, all of them ``ignorable``."""
    return 0 < found < known and all(n in ignorable for n in range(found + 1, known + 1))


def copy_needed(
    found: int, known: int, ignorable: Collection[int], reads_floor_from: int | None
) -> bool:
    """Whether ``migrate`` keeps a copy of a file at ``found`` before migrating it to
    ``known`` (``keep_copy``, which keeps none of a new, current or newer file). Not if every
    pending migration is ``ignorable`` and ``found`` is at least ``reads_floor_from`` (only
    builds that read ``readable_by`` wrote it, so the one that did runs on the migrated file
    as it is)."""
    return not (
        _only_ignorable(found, known, ignorable)
        and reads_floor_from is not None
        and found >= reads_floor_from
    )


def _writable(conn: sqlite3.Connection, found: int) -> bool:
    """Whether the file of ``conn`` (autocommit, outside a transaction) can be written: a
    write of its ``user_version`` as it is, rolled back. False only for SQLITE_READONLY (a
    read-only file system, a file SQLite opened read-only); any other error is raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"PRAGMA user_version={int(found)}")
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_READONLY:
            raise
        return False
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    return True


def readable_by(conn: sqlite3.Connection, version: int) -> int | None:
    """The file's ``readable_by`` (``migrate``), or None: not recorded, or not one this code
    trusts (the file's ``version`` is then what a tlsroll must know). Only exactly one row
    holding an integer from 1 to ``version`` is one; anything else (text, a blob, a real, 0 or
    below, above ``version``, no row or several, a table without the column, an error reading
    it) is None, and a newer file is refused as unreadable (``SchemaTooNew``, exit 3). Review
    s40 M1: ``int()`` of 'abc' was a traceback (exit 1, restarted for ever), -7 and 0.5 read
    the file as it is. ``deploy/install.sh`` (``store_schema``) reads it by the same rules."""
    try:
        if not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (FLOOR_TABLE,)
        ).fetchone():
            return None
        rows = conn.execute(
            f"SELECT readable_by, typeof(readable_by) FROM {FLOOR_TABLE} LIMIT 2"  # noqa: S608
        ).fetchall()
    except sqlite3.Error:
        return None
    if len(rows) != 1 or rows[0][1] != "integer":
        return None
    floor = int(rows[0][0])
    return floor if 1 <= floor <= version else None


# Words an added column's definition may not hold to be ignorable: each makes an older
# tlsroll's writes fail or differ (a CHECK, a foreign key, a collation of a key, a uniqueness,
# a generated column, a key).
_UNIGNORABLE_WORDS = re.compile(
    r"\b(CHECK|REFERENCES|COLLATE|UNIQUE|GENERATED|AS|PRIMARY|CONSTRAINT)\b", re.IGNORECASE
)


def _shape(conn: sqlite3.Connection) -> dict[str, Any]:
    """Each table's definition (its SQL), columns (position, name, type, not null, default,
    key) and foreign keys, and each index's (SQLite's own for a UNIQUE or key included) and
    trigger's definition and uniqueness: what ``_check_ignorable`` compares."""
    tables: dict[str, Any] = {}
    others: dict[str, Any] = {}
    for kind, name, table, sql in conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master"
        " WHERE type IN ('table', 'index', 'trigger')"
        " AND (name NOT LIKE 'sqlite_%' OR name LIKE 'sqlite_autoindex_%')"
    ).fetchall():
        if kind == "table":
            tables[name] = {
                "sql": sql,
                "columns": [
                    tuple(r) for r in conn.execute(f'PRAGMA table_info("{name}")').fetchall()
                ],
                "keys": sorted(
                    tuple(r)[2:]
                    for r in conn.execute(f'PRAGMA foreign_key_list("{name}")').fetchall()
                ),
            }
        else:
            unique = kind == "index" and bool(
                conn.execute(
                    'SELECT 1 FROM pragma_index_list(?) WHERE name = ? AND "unique"',
                    (table, name),
                ).fetchone()
            )
            others[name] = (kind, table, sql, unique)
    return {"tables": tables, "others": others}


def _common(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` begin with alike."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _added_text(before: str, after: str) -> str | None:
    """What ``after`` (a table's SQL) inserted into ``before`` at one place (SQLite's ALTER
    TABLE ADD COLUMN: after the last column's definition), or None if it is not that."""
    if len(after) <= len(before):
        return None
    prefix = _common(before, after)
    suffix = _common(before[::-1], after[::-1])
    if prefix + suffix < len(before):
        return None
    # Every place the insertion may be (a run of equal characters makes it ambiguous).
    return after[len(before) - min(suffix, len(before)) : prefix + len(after) - len(before)]


def _check_ignorable(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """What makes a migration unfit to be ignored by an older tlsroll that writes the file,
    or None. It may only add tables without foreign keys into the tables there were, and
    columns (ALTER TABLE ADD COLUMN: each table's SQL the old one plus column definitions)
    that are NULL or have a default, with no CHECK, REFERENCES, COLLATE, UNIQUE, key or
    generation; never change, rebuild or drop a table, column or index, or add a unique index
    or trigger on a table it had (the older one's writes would fail, skip it or differ). Review
    s40 M2: a CHECK or REFERENCES added with a column, a rebuild adding a CHECK or a table's
    UNIQUE, reordered columns, or a new table's foreign key into an old one passed. A migration
    that writes rows is refused by ``migrate``."""
    for table, old in before["tables"].items():
        now = after["tables"].get(table)
        if now is None:
            return f"it drops or renames table {table}"
        if now["keys"] != old["keys"]:
            return f"it changes the foreign keys of table {table}"
        columns = {c[1]: c for c in old["columns"]}
        for name in columns.keys() - {c[1] for c in now["columns"]}:
            return f"it changes or drops column {table}.{name}"
        for column in now["columns"]:
            if column[1] in columns and column != columns[column[1]]:
                return f"it changes or moves column {table}.{column[1]}"
        if now["sql"] == old["sql"]:
            continue
        added = _added_text(old["sql"] or "", now["sql"] or "")
        if added is None:
            return f"it rebuilds table {table} (its definition is not the old one plus columns)"
        if word := _UNIGNORABLE_WORDS.search(added):
            return f"it adds to table {table} a column with {word[1].upper()}"
        for _, column, _, notnull, default, _ in now["columns"]:
            if column in columns or not notnull:
                continue
            if default is None or default.strip("() \t\n").upper() == "NULL":
                return f"it adds column {table}.{column} NOT NULL without a default"
    for name, shape in before["others"].items():
        if shape[1] in before["tables"] and after["others"].get(name) != shape:
            return f"it changes or drops {shape[0]} {name} on table {shape[1]}"
    for name, (kind, table, _, unique) in after["others"].items():
        if name in before["others"] or table not in before["tables"]:
            continue
        if kind == "trigger" or unique:
            return f"it adds {kind} {name} on table {table}"
    for table, now in after["tables"].items():
        if table in before["tables"]:
            continue
        for key in now["keys"]:
            if key[0] in before["tables"]:
                return f"it adds table {table} with a foreign key into table {key[0]}"
    return None


def migrate(
    conn: sqlite3.Connection,
    path: Path,
    migrations: Sequence[Migration],
    *,
    adopt: Callable[[sqlite3.Connection, int], None] | None = None,
    created: Callable[[sqlite3.Connection], None] | None = None,
    ignorable: Collection[int] = (),
    mark: Mark | None = None,
    what: str = "store",
    losing: str = "",
    reads_floor_from: int | None = None,
    read_only_as_is: str | None = None,
) -> int:
    """Bring the file's schema to ``len(migrations)``, all or nothing; return the file's
    version (that, or a newer one read as it is).

    ``conn`` is in autocommit mode (``isolation_level=None``) and in no transaction. In one
    ``BEGIN IMMEDIATE`` transaction: read ``user_version``, refuse a newer one (unless it may
    be read: below), call ``adopt`` with it (to bring a file written before migrations existed
    to what its version means), apply ``migrations[user_version:]``, call ``created`` if the
    file was new (version 0: the first rows a new store must never be without), check foreign
    keys and set ``user_version``. Before that transaction, a file with a schema older than
    this tlsroll's is copied as it is (``keep_copy``, with ``mark``): the way back if this
    tlsroll is rolled back; a copy an interrupted run left half made is removed
    (``remove_stale_copies``).

    Going back without the copy (audit s40, H2): ``ignorable`` numbers (from 1) the migrations
    that a tlsroll without them may ignore, as it reads and writes the file: they only add
    tables, columns that are NULL or have a default, and indexes that are not unique
    (``_check_ignorable`` checks that as each runs), and the tlsroll that has them copes with
    what an older one writes without them (a row without its new columns' values, rows missing
    from its new tables). A migrated file records the lowest schema that may read it,
    ``readable_by`` (``floor_of``: the last migration it has that is not ignorable) in
    ``FLOOR_TABLE`` when that is below its version. A tlsroll that finds a newer file whose
    ``readable_by`` it knows opens it as it is (a warning, ``store.newer_schema_read``; its
    version is left as it is, so the newer tlsroll finds it as it left it, plus rows this one
    wrote); any other newer file is refused, unchanged (``SchemaTooNew``, naming the copy it may
    go back to: ``usable_copy``; ``what`` and ``losing`` are its words). Only a tlsroll with
    this code reads ``readable_by``: an older one refuses every newer file.

    ``reads_floor_from``: the lowest schema of the file that only builds reading
    ``readable_by`` wrote (the first schema of the store added after that code; each store
    says its own from git history: ``leader.db.READS_FLOOR_FROM``, …). A file at that schema
    or above whose pending migrations are all ``ignorable`` is migrated without a copy
    (``copy_needed``): the build that wrote it reads the migrated file as it is, and the copy
    (a ``VACUUM INTO`` of the whole file) cost its time where it hurts most (the reference
    server's start is inside a switch's freeze window). None: always copied.

    ``read_only_as_is``: what this code does without the pending migrations (its words for
    the warning, e.g. "login failures are counted in memory only"). Given, a file whose
    pending migrations are all ``ignorable`` and that cannot be written (a read-only file
    system: SQLITE_READONLY) is opened as it is, its version returned (below
    ``len(migrations)``: the caller copes with what they add missing), with a warning
    (``store.not_migrated``), no copy made: what the older release that wrote it did. None
    (and any other file that cannot be written): refused as before.
    """
    if conn.isolation_level is not None or conn.in_transaction:
        raise ValueError("migrate needs an autocommit connection outside a transaction")
    known = len(migrations)
    remove_stale_copies(path)
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if (
        read_only_as_is is not None
        and _only_ignorable(found, known, ignorable)
        and not _writable(conn, found)
    ):
        log.warning(
            "store.not_migrated",
            path=str(path),
            version=found,
            to=known,
            detail=f"{path.name} cannot be written (read-only): it is used as it is, at schema"
            f" {found}, as the older tlsroll that wrote it did; {read_only_as_is} until a start"
            " that can write it migrates it",
        )
        return found
    if copy_needed(found, known, ignorable, reads_floor_from):
        keep_copy(conn, path, known, mark=mark)
    else:
        log.info(
            "store.copy_skipped",
            path=str(path),
            version=found,
            to=known,
            detail=f"no copy kept before this migration: it is one a tlsroll of schema {found}"
            f" may ignore, and the tlsroll that wrote schema {found} reads the file as it is"
            " (readable_by)",
        )
        set_aside_old_copy(path, known)
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > known:
            floor = readable_by(conn, found)
            if floor is None or floor > known:
                raise SchemaTooNew(
                    path, found, known, what=what, copy=usable_copy(path, known), losing=losing
                )
            conn.execute("ROLLBACK")
            log.warning(
                "store.newer_schema_read",
                path=str(path),
                version=found,
                knows=known,
                readable_by=floor,
                detail=f"{path.name} was written by a newer tlsroll; what its migrations since"
                f" schema {floor} added, this one leaves as it is",
            )
            return found
        if adopt is not None:
            adopt(conn, found)
        for number, step in enumerate(migrations[found:], start=found + 1):
            shape = _shape(conn) if number in ignorable else None
            changes = conn.total_changes
            if isinstance(step, str):
                for statement in statements(step):
                    conn.execute(statement)
            else:
                step(conn)
            if not conn.in_transaction:
                raise RuntimeError(f"{path}: migration {number} ended the transaction")
            if shape is not None and conn.total_changes != changes:
                problem: str | None = "it writes rows (an older tlsroll's writes lack them)"
            elif shape is not None:
                problem = _check_ignorable(shape, _shape(conn))
            else:
                problem = None
            if problem:
                raise RuntimeError(
                    f"{path}: migration {number} is one an older tlsroll may ignore, but {problem}"
                )
        if found == 0 and created is not None:
            created(conn)
        if found < known:
            if broken := conn.execute("PRAGMA foreign_key_check").fetchall():
                raise sqlite3.IntegrityError(
                    f"{path}: foreign keys broken by a migration: {broken[:3]}"
                )
            if (floor := floor_of(known, ignorable)) < known:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} (readable_by INTEGER NOT NULL)"
                )
                conn.execute(f"DELETE FROM {FLOOR_TABLE}")  # noqa: S608
                conn.execute(f"INSERT INTO {FLOOR_TABLE} VALUES (?)", (floor,))  # noqa: S608
            else:
                conn.execute(f"DROP TABLE IF EXISTS {FLOOR_TABLE}")
            conn.execute(f"PRAGMA user_version={known}")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return known


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def move_aside(path: Path, suffixes: Sequence[str]) -> list[Path]:
    """Rename the store file ``path`` and its companions (``path`` + each of ``suffixes``,
    those that exist) to ``NAME.lost-TIME`` + suffix, kept for a post-mortem; returns the new
    names. A set kept before in the same second (two ``--reinitialise`` within it, or the
    clock stepped back) is never replaced: this one is ``NAME.lost-TIME.2`` (3, …). A
    rename used to replace it silently (clock audit s35, J). Each file is linked to its new
    name, which fails if that exists, then unlinked (a rename where links are not
    supported)."""
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        tag = f".lost-{stamp}" if n == 1 else f".lost-{stamp}.{n}"
        moves = [
            (path.with_name(path.name + suffix), path.with_name(path.name + tag + suffix))
            for suffix in suffixes
        ]
        if any(t.exists() or t.is_symlink() for _, t in moves):
            continue
        kept = []
        for source, target in moves:
            if source.exists():
                _move_exclusive(source, target)
                kept.append(target)
        return kept
    raise FileExistsError(f"{path}: too many copies kept as {path.name}.lost-{stamp}*")


def _move_exclusive(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, never over an existing ``target`` (FileExistsError)."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or target.exists() or target.is_symlink():
            raise FileExistsError(f"{target} exists") from exc
        source.rename(target)  # no hard links on this file system
    else:
        source.unlink()


# What SQLite says of a file whose contents are broken: the only errors that make a store
# "damaged" (with a failed ``quick_check``). Any other error of an open or a read says
# nothing about the file (a full disk: SQLITE_IOERR_SHMSIZE, as the WAL's -shm cannot grow;
# a read-only file system: SQLITE_CANTOPEN; SQLITE_FULL, READONLY, BUSY, PERM, …): the file
# may well be intact, and moving it aside (``--reinitialise``) would lose what it holds.
DAMAGED_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def is_damage(exc: sqlite3.Error) -> bool:
    """True if ``exc`` says the file's contents are broken (SQLITE_CORRUPT*, SQLITE_NOTADB)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in DAMAGED_CODES


class StoreUnavailable(TransientError):
    """A store file that cannot be opened or read now for a reason outside it (a full or
    read-only file system, a lock another process holds, a permission): it is not damaged,
    and the daemon that stops on it starts once that is fixed (exit 1: systemd starts it
    again). The message names the file and the error's code, and what to do: free space,
    with the bytes free on its file system, only when that is low (``LOW_SPACE``) or the
    error says the disk is full; never ``--reinitialise``, which is refused for it
    (``NotDamaged``). (The leader looks at its store's and its data dir's permissions before:
    one it may not read or write is its config error, exit 2, ``fsutil.open_problem``.)"""

    def __init__(self, what: str, path: Path, cause: sqlite3.Error | OSError) -> None:
        reason = error_text(cause)
        free = free_bytes(path.parent)
        if is_full(cause) or (free is not None and free < LOW_SPACE):
            room = f"; {free} bytes free on its file system" if free is not None else ""
            advice = f"{room}; free space on it and start again"
        else:
            advice = (
                "; make it readable and writable by this daemon (a read-only file system, its"
                " permissions, a lock another process holds) and start again"
            )
        super().__init__(
            f"{what} {path}: cannot be opened now ({reason}){advice}: it is not damaged"
        )
        self.path = path


class StoreDamaged(TerminalError):
    """A store file only a person can mend: lost (missing though it existed, or empty),
    damaged or unreadable. The message names the file and the two ways on (restore it from a
    backup, or ``--reinitialise``). Its daemon exits 4 (``EXIT_STORE_DAMAGED`` of
    ``leader.runtime`` and ``nodeagent.runtime``), which its unit does not restart: a restart
    finds the same file (before, exit 1 logged the same line every few seconds for ever). A
    file that only cannot be opened now is not one (``StoreUnavailable``: exit 1, restarted)."""


def needs_a_person(exc: BaseException) -> bool:
    """True if ``exc``, which stopped a daemon, says its store file is lost, damaged or
    unreadable (``StoreDamaged``, an SQLite error that ``is_damage``): the daemon's exit
    code is then 4 (``EXIT_STORE_DAMAGED``), not 1."""
    if isinstance(exc, StoreDamaged):
        return True
    return isinstance(exc, sqlite3.Error) and is_damage(exc)


class StoreUnreadable(StoreDamaged):
    """A store file that SQLite or the file system could not read (``unreadable``): the disk
    under it fails; it counts as damaged (``damage``: restore it from a backup, or
    ``--reinitialise``). Raised by ``Database`` when that shows only once the file is open."""


class NotDamaged(TerminalError):
    """``--reinitialise`` on a store that is not damaged (intact, or ``StoreUnavailable``):
    refused, nothing moved aside; a usage error (exit 2: the command line is for a person to
    change)."""


def free_bytes(directory: Path) -> int | None:
    """The bytes this process may still write on the file system of ``directory`` (root may
    use the blocks reserved for it), or None if it cannot be told."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


# Errors of opening a store that say nothing about its contents, only about where it lies now:
# SQLite's primary result codes, its extended I/O error codes of a write, a lock, the WAL's
# -shm (SQLITE_IOERR_SHMSIZE: a full disk), memory or a temporary file, and the errnos of the
# file system. Any other I/O error (a read: SQLITE_IOERR_READ, SHORT_READ, CORRUPTFS, EIO…)
# says the disk could not give the file back: ``unreadable``. Review s38, M3: every
# SQLITE_IOERR was "cannot be opened now … it is not damaged", and --reinitialise refused.
UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_PERM,
    }
)
UNAVAILABLE_IOERRS = frozenset(
    {
        sqlite3.SQLITE_IOERR_SHMOPEN,
        sqlite3.SQLITE_IOERR_SHMSIZE,
        sqlite3.SQLITE_IOERR_SHMMAP,
        sqlite3.SQLITE_IOERR_SHMLOCK,
        sqlite3.SQLITE_IOERR_WRITE,
        sqlite3.SQLITE_IOERR_FSYNC,
        sqlite3.SQLITE_IOERR_DIR_FSYNC,
        sqlite3.SQLITE_IOERR_TRUNCATE,
        sqlite3.SQLITE_IOERR_LOCK,
        sqlite3.SQLITE_IOERR_RDLOCK,
        sqlite3.SQLITE_IOERR_UNLOCK,
        sqlite3.SQLITE_IOERR_CHECKRESERVEDLOCK,
        sqlite3.SQLITE_IOERR_NOMEM,
        sqlite3.SQLITE_IOERR_ACCESS,
        sqlite3.SQLITE_IOERR_GETTEMPPATH,
        sqlite3.SQLITE_IOERR_DELETE,
        sqlite3.SQLITE_IOERR_DELETE_NOENT,
    }
)
UNAVAILABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY}
)
# The free space under which ``StoreUnavailable`` says how much is left and to free some.
LOW_SPACE = 64 * 1024 * 1024


def error_text(exc: sqlite3.Error | OSError) -> str:
    """``exc`` as its code and words: ``SQLITE_IOERR_READ: disk I/O error``, or an OSError's
    ``os_error_text``."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        return f"{name}: {exc}"
    return os_error_text(exc)


def is_full(exc: BaseException) -> bool:
    """True if ``exc`` says the disk (or the user's quota on it) is full."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def unreadable(exc: BaseException) -> str | None:
    """What is wrong with a store file whose open or read failed with ``exc``, if that says
    the disk could not read it back (an SQLITE_IOERR that is not one of
    ``UNAVAILABLE_IOERRS``, EIO): ``unreadable (CODE: …): check the disk (dmesg)``, a kind of
    damage; None for any other error."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None or code & 0xFF != sqlite3.SQLITE_IOERR or code in UNAVAILABLE_IOERRS:
            return None
    elif not (isinstance(exc, OSError) and exc.errno == errno.EIO):
        return None
    return f"unreadable ({error_text(exc)}): check the disk (dmesg)"


def unavailable(what: str, path: Path, exc: BaseException) -> StoreUnavailable | None:
    """``exc``, from opening the store at ``path``, as a ``StoreUnavailable`` if it is one of
    those errors (``UNAVAILABLE_CODES``, ``UNAVAILABLE_IOERRS``, ``UNAVAILABLE_ERRNOS``); None
    for any other (a damaged or unreadable file, a failed migration)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and (code & 0xFF in UNAVAILABLE_CODES or code in UNAVAILABLE_IOERRS):
            return StoreUnavailable(what, path, exc)
    elif isinstance(exc, OSError) and exc.errno in UNAVAILABLE_ERRNOS:
        return StoreUnavailable(what, path, exc)
    return None


def damage(path: Path, *, expected: bool, what: str = "store") -> str | None:
    """What makes the store file at ``path`` unfit to open as it is, or None if it is fine
    (or missing and not ``expected``). Only reads the file.

    A daemon calls this before ``Database`` so that lost state is never taken for a new store:
    ``expected`` says its data dir shows the file was created before (then a missing file is
    lost, not new); a file of 0 bytes is lost then (SQLite would take it for a new, empty
    database), and new if not ``expected`` and without a ``-wal`` (what a first start killed
    before its first commit leaves: ``Database`` creates the file before it migrates it); one
    SQLite finds broken (``is_damage``), or whose ``quick_check`` fails, is damaged.

    A file that cannot be read now for a reason outside it (a full disk, a read-only file
    system, …) is neither fine nor damaged: ``StoreUnavailable`` (``what``: "store",
    "journal", the first word of its message). Audit s38, H2: a full disk was "damaged (disk
    I/O error)", with advice to ``--reinitialise``, which threw the intact file away. One the
    disk fails to read (``unreadable``: SQLITE_IOERR_READ, EIO, …) is damaged: "unreadable".
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing" if expected else None
    except OSError as exc:  # EACCES on the directory: the file is not known lost
        if (problem := unreadable(exc)) is not None:
            return problem
        raise StoreUnavailable(what, path, exc) from None
    if size == 0:
        if not expected and not Path(f"{path}-wal").exists():
            return None
        return "empty (0 bytes)"
    try:
        conn = sqlite3.connect(path, timeout=10)
        try:
            found = conn.execute("PRAGMA quick_check(3)").fetchall()
            # A row may hold several lines ("*** in database main ***\nPage 13: …"): the
            # problem is said on the daemon's one line.
            rows = [line for r in found for line in str(r[0]).splitlines() if line.strip()]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if (problem := unreadable(exc)) is not None:
            return problem
        if not is_damage(exc):  # whatever it is, it does not say the file is broken
            raise StoreUnavailable(what, path, exc) from None
        return f"damaged ({exc})"
    if rows != ["ok"]:
        return f"damaged (quick_check: {'; '.join(rows)})"
    return None


CHECKPOINT_EVERY = 100
"""Commits after which a ``Database`` in a process with a store thread (``tlsroll.dbthread``)
checkpoints there, once the calls queued behind the commit have run (``_checkpoint_idle``):
before SQLite's own automatic checkpoint (at 1000 pages of ``-wal``; a leader's commit writes
3–7 pages, an agent's journal record 2–4), which runs inside the commit that crosses it, on
the path of whatever waits for that commit (a switch's outcome, a journal record inside the
freeze window: a checkpoint writes the pages to the file and syncs both, 4–5 ms here)."""

IDLE_WAITS = 50
"""How many times the checkpoint lets calls queued behind it go first, at most (a store thread
that never idles then checkpoints all the same; SQLite's own bounds the ``-wal`` meanwhile)."""

TEST_CHECKPOINT_ENV = "TLSROLL_TEST_CHECKPOINT_EVERY"
"""Tests only: a daemon's ``CHECKPOINT_EVERY`` (1 to ``CHECKPOINT_EVERY``; see
``checkpoint_every``), so that a test sees a checkpoint after a few commits."""

RETRY_FIRST = 1.0
RETRY_MOST = 60.0
"""A checkpoint that failed is tried again after ``RETRY_FIRST`` seconds,
then twice as long each time up to ``RETRY_MOST``, whether or not anything is committed
meanwhile (review s72 revlate: every commit queued another try while it kept failing)."""

# What a checkpoint's error says of the disk: it cannot take the pages now (a full disk, an
# I/O error, a file system gone read-only). The commits may go on in the ``-wal`` for a while
# (SQLite reuses its pages once one checkpoint copied them all), until it must grow.
_CANNOT_WRITE = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}
)


def checkpoint_every(environ: Mapping[str, str]) -> int:
    """``CHECKPOINT_EVERY``, or the test hook's (``TEST_CHECKPOINT_ENV``) if it holds a whole
    number from 1 to ``CHECKPOINT_EVERY`` (anything else is as none)."""
    try:
        value = int(environ.get(TEST_CHECKPOINT_ENV, ""))
    except ValueError:
        return CHECKPOINT_EVERY
    return value if 1 <= value <= CHECKPOINT_EVERY else CHECKPOINT_EVERY


def cannot_write(exc: BaseException) -> bool:
    """True if ``exc``, from a checkpoint, says the disk does not take the store's pages now
    (``_CANNOT_WRITE``: SQLITE_FULL, SQLITE_IOERR*, …), not that another connection was in the
    way (SQLITE_BUSY, LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _CANNOT_WRITE


class Database:
    """One connection to the file, shared by threads, with a cache of what its stores read.

    ``cache``: what a store read (or wrote) and keeps to save reading it again, keyed by the
    store (the leader keeps its active rollout here, so that a step does not re-read every
    node). It is valid for this connection's own writes only if the store that writes also
    updates it, inside the same transaction (``tx``), and it is dropped whole when another
    connection (a test, another process) has committed to the file since this one last looked
    (SQLite's ``data_version``), and when a transaction that wrote fails. Read and write it
    only inside ``read`` or ``tx``, under the lock; a store changes it only after its writes.

    ``transactions``, ``commits``: how many write transactions ran, and how many of them
    changed a row (each such commit is an fsync of the WAL with ``synchronous=FULL``).
    """

    def __init__(
        self,
        path: Path,
        migrations: Sequence[Migration],
        *,
        adopt: Callable[[sqlite3.Connection, int], None] | None = None,
        created: Callable[[sqlite3.Connection], None] | None = None,
        cache_kib: int | None = None,
        what: str = "store",
        ignorable: Collection[int] = (),
        mark: Mark | None = None,
        losing: str = "",
        reads_floor_from: int | None = None,
        cached: bool = True,
    ) -> None:
        """Open (or create, 0600) the file and apply its missing migrations (see ``migrate``;
        ``created`` writes a new file's first rows in the same transaction). ``cache_kib``:
        the most SQLite's page cache of the connection holds (``PRAGMA cache_size``), if not
        SQLite's default (2000 KiB). A file that cannot be opened now (a full disk, a
        read-only file system: ``unavailable``) is a ``StoreUnavailable`` whose message begins
        with ``what`` and the path. ``ignorable``, ``mark``, ``losing``, ``reads_floor_from``: see
        ``migrate``. ``cached=False``: a store that keeps nothing in ``cache`` (nor ``peek``s):
        no look at ``data_version`` in each read and write (``_others_wrote``; the agent's
        journal, session 73)."""
        self.path = Path(path)
        self._cached = cached
        self._lock = threading.Lock()
        # Bumped by every committed write except a routine one (``tx(routine=True)``): a
        # reader that keeps what it read in memory (the leader's heartbeat path:
        # ``leader.service.Snapshot``) reads again once this moved, and never misses a write.
        self.generation = 0
        # Called (in the writer's thread) after each write that moved ``generation`` on: a
        # reader that waits for a change (the leader's renewal watch) need not look each second.
        self.on_change: list[Callable[[], None]] = []
        # Called (in the writer's thread) after each committed write that changed a row,
        # routine or not (``commits`` moved on): what shows the store as it is (the viewer's
        # live pages) shows each write.
        self.on_commit: list[Callable[[], None]] = []
        self.cache: dict[Hashable, Any] = {}
        # What the transaction under way runs once it has committed (``after_commit``).
        self._committed: list[Callable[[], None]] = []
        # What it runs if it fails from then on (``if_failed``).
        self._failing: list[Callable[[BaseException], None]] = []
        # The thread inside ``tx`` (None outside): ``after_commit`` is refused elsewhere.
        self._writer: int | None = None
        # ``cache`` as it was when the lock was last released (replaced whole, never changed
        # in place): what ``peek(settled=True)`` gives while a writer holds the lock.
        self._settled: dict[Hashable, Any] = {}
        self._data_version: int | None = None
        self.transactions = 0
        self.commits = 0
        # Commits since the last checkpoint this class ran, whether one is queued, how many
        # ran (``_checkpoint_idle``); closed: the connection is (a checkpoint queued then
        # does nothing).
        self._since_checkpoint = 0
        self._checkpoint_queued = False
        self.checkpoints = 0
        # Commits after which a checkpoint is due (a daemon's test hook may lower it:
        # ``checkpoint_every``).
        self.checkpoint_every = CHECKPOINT_EVERY
        # Called (on the store's thread) after each checkpoint this class ran: None once it
        # copied every page, the error of one the disk did not take (``cannot_write``). What
        # shows the store's health (the leader's ``StoreHealth``) keeps the failure until a
        # checkpoint succeeds: the commits meanwhile go to the ``-wal`` and say nothing of it.
        self.on_checkpoint: list[Callable[[sqlite3.Error | None], None]] = []
        # Why the last checkpoint failed (``error_text``), until one succeeds; how many failed.
        self.checkpoint_trouble: str | None = None
        self.checkpoint_failures = 0
        # True while no checkpoint may run now (the agent's journal: a switch between its
        # freeze and its unfreeze, ``nodeagent.journal``); one due then waits for the next
        # commit (the unfreeze's record), SQLite's own staying the bound. How many so waited.
        self.hold_checkpoint: Callable[[], bool] | None = None
        self.checkpoints_held = 0
        # After a checkpoint that failed or left pages behind: the next try's wait (doubling
        # from ``RETRY_FIRST`` to ``RETRY_MOST``) and its timer; no commit queues one meanwhile.
        self._retry_delay = 0.0
        self._retry: threading.Timer | None = None
        self._closed = False
        try:
            make_private(self.path)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
        except (sqlite3.Error, OSError) as exc:
            self._refuse(what, exc)
            raise
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA synchronous=FULL")
            # Before WAL: a file that is refused stays exactly as it was.
            self.version = migrate(
                self._db,
                self.path,
                migrations,
                adopt=adopt,
                created=created,
                ignorable=ignorable,
                mark=mark,
                what=what,
                losing=losing,
                reads_floor_from=reads_floor_from,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            if cache_kib is not None:
                self._db.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        except BaseException as exc:
            self._db.close()
            self._refuse(what, exc)
            raise

    def _refuse(self, what: str, exc: BaseException) -> None:
        """Raise what ``exc``, from opening the file, means for it, if it says more than itself:
        ``StoreUnavailable``, or ``StoreUnreadable`` (the disk failed to read it)."""
        if (not_now := unavailable(what, self.path, exc)) is not None:
            raise not_now from exc
        if (problem := unreadable(exc)) is not None:
            raise StoreUnreadable(
                f"{what} {self.path}: {problem}; restore it from a backup, or run the daemon"
                " once with --reinitialise (it only replaces the file and exits), then start it"
                " as before"
            ) from exc

    def _others_wrote(self) -> None:
        """Under the lock: drop ``cache`` if another connection committed since the last look
        (``data_version`` changes only for other connections' commits, never for ours)."""
        if not self._cached:  # nothing kept: nothing to drop
            return
        version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        if version != self._data_version:
            self._data_version = version
            self.cache.clear()
            self._settled = {}

    def peek(self, key: Hashable, *, settled: bool = False) -> Any:
        """What ``cache`` keeps under ``key``, if the lock is free right now (None if it is
        not, if nothing is kept, or if another connection wrote since: then read the usual
        way, in a worker thread). Never waits for a writer, so the event loop may call it
        instead of handing a read of what is kept to a thread (issue 15: a rollout step did
        that about ten times per node).

        ``settled``: while a writer holds the lock, what was kept when it last released the
        lock (this connection's last commit, and another connection's commit once a look
        under the lock saw it), not None. For a caller that a write under way may overtake:
        one whose write checks what it read (``SchemaStore.save_states`` raises
        ``StaleRecords``), or that only looks at what the write under way does not change.
        During a rollout the store's thread holds the lock much of the time: without it,
        about five reads per node at 50 simulated nodes went to that thread, each a hand-off
        and two context switches, for what was kept in memory."""
        if not self._lock.acquire(blocking=False):
            return self._settled.get(key) if settled else None
        try:
            self._others_wrote()
            return self.cache.get(key)
        finally:
            self._lock.release()

    def _settle(self) -> None:
        """Under the lock, as it is released: what ``peek(settled=True)`` gives until the next
        release (a copy: the stores change ``cache`` in place under the lock)."""
        self._settled = dict(self.cache)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._others_wrote()
                yield self._db
            finally:
                self._settle()

    def after_commit(self, then: Callable[[], None]) -> None:
        """Inside ``tx``: run ``then`` in the writer's thread once this transaction has
        committed, still under the lock: before any reader, ``peek(settled=True)`` included,
        can see what it wrote (never if it fails). For what must be in place no later than
        the write is visible, and not before it is durable (the leader's certificate for a
        node's stage). An exception ``then`` raises is logged with its name and goes no
        further: the write has committed, and its caller, the callbacks after ``then`` and
        the readers' notifications see it so (``_run_committed``). Outside a transaction
        (``then`` would never run): RuntimeError."""
        if self._writer != threading.get_ident():
            raise RuntimeError("Database.after_commit is only for inside a transaction (tx)")
        self._committed.append(then)

    def if_failed(self, then: Callable[[BaseException], None]) -> None:
        """Inside ``tx``: run ``then(exc)`` in the writer's thread if this transaction fails
        from here on (its COMMIT, if called last in the body), still under the lock: before
        any reader can look at the store after the failure. One that raises is logged
        (``_run_failed``), never raised.
        Outside a transaction: RuntimeError."""
        if self._writer != threading.get_ident():
            raise RuntimeError("Database.if_failed is only for inside a transaction (tx)")
        self._failing.append(then)

    def _run_committed(self) -> None:
        """Under the lock, after COMMIT: each callback of ``after_commit``, in order, each on
        its own (one that raises is logged, never raised: review s28 L4)."""
        committed, self._committed = self._committed, []
        for then in committed:
            try:
                then()
            except Exception as exc:
                log.error(
                    "db.after_commit_failed",
                    path=str(self.path),
                    callback=getattr(then, "__qualname__", repr(then)),
                    error=f"{type(exc).__name__}: {exc}",
                    hint="the write itself stands; a bug in tlsroll: report it with the lines "
                    "before this one",
                )

    def _run_failed(self, exc: BaseException) -> None:
        """Under the lock, after a failure: each callback of ``if_failed``, in order, each on
        its own; one that raises is logged, never raised (as ``_run_committed``): it skipped
        the others and the ROLLBACK, and the store's writes all failed after it (review s75
        revjournal)."""
        failing, self._failing = self._failing, []
        for then in failing:
            try:
                then(exc)
            except Exception as failed:
                log.error(
                    "db.if_failed_failed",
                    path=str(self.path),
                    callback=getattr(then, "__qualname__", repr(then)),
                    error=f"{type(failed).__name__}: {failed}",
                    hint="the write failed and was rolled back as it would be; a bug in"
                    " tlsroll: report it with the lines before this one",
                )

    @contextmanager
    def tx(
        self, *, routine: bool = False, busy: float | None = None
    ) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all or nothing, serialised with every other writer.
        ``routine``: a write that changes nothing the heartbeat path keeps in memory (a
        heartbeat's own record, a rollout step's progress); any other moves ``generation`` on
        (see ``__init__``). ``busy``: the longest its BEGIN waits for another connection's
        write lock (SQLite's busy timeout, the connection's 10 s otherwise), then fails
        SQLITE_BUSY: a write that had better fail at once than hold the caller (the agent's
        journal's probe in doubt, session 75)."""
        with self._lock:
            if busy is None:
                self._db.execute("BEGIN IMMEDIATE")
            else:
                held = self._db.execute("PRAGMA busy_timeout").fetchone()[0]
                self._db.execute(f"PRAGMA busy_timeout = {max(0, round(busy * 1000))}")
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                finally:
                    self._db.execute(f"PRAGMA busy_timeout = {int(held)}")
            changes = self._db.total_changes  # before anything that can fail (see except)
            self._committed = []
            self._failing = []
            self._writer = threading.get_ident()
            try:
                self._others_wrote()  # under the write lock: nobody else commits meanwhile
                yield self._db
                self._db.execute("COMMIT")
                self._writer = None
                if not routine:
                    self.generation += 1
                self._run_committed()
            except BaseException as exc:
                self._writer = None
                self._committed = []
                self._run_failed(exc)
                # What a store put in the cache after its writes is not what the file holds
                # now. A transaction that wrote nothing (a store's refusal, such as a write on
                # stale records) leaves the file, and so the cache, as they were.
                if self._db.total_changes != changes:
                    self.cache.clear()
                # SQLite may have rolled back already (a full disk, an I/O error): a ROLLBACK
                # then fails and would hide the error that matters. A failed COMMIT may leave
                # the transaction open: without this, every later BEGIN would fail.
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error as failed:  # the error that matters is the first
                        log.warning(
                            "db.rollback_failed",
                            path=str(self.path),
                            error=f"{type(failed).__name__}: {failed}",
                            detail="a failed write could not be undone cleanly; the error before"
                            " it is the one that matters",
                        )
                raise
            finally:
                self._settle()
            self.transactions += 1
            wrote = self._db.total_changes != changes
            self.commits += wrote
            if wrote:
                self._since_checkpoint += 1
                if (
                    self._since_checkpoint >= self.checkpoint_every
                    and not self._checkpoint_queued
                    and self._retry is None
                ):
                    self._queue_checkpoint(0)
        if not routine:
            self._tell()
        if wrote:
            for listener in list(self.on_commit):
                listener()

    def _queue_checkpoint(self, waited: int) -> None:
        """Hand ``_checkpoint_idle`` to the store's thread, behind what is queued there; not in
        a process without one (SQLite's own checkpoint then, as before)."""
        worker = dbthread.started()
        if worker is None:
            return
        # Marked before it is handed over: the thread may run it (and clear the mark) before
        # this one has its next line, when this is the retry's timer (no lock held: review
        # s73 revdisk; marked after, it stayed marked, and no checkpoint was queued again).
        self._checkpoint_queued = True
        try:
            worker.submit_uncounted(self._checkpoint_idle, waited)
        except RuntimeError:  # the thread was shut down (the process ends)
            self._checkpoint_queued = False

    def _checkpoint_idle(self, waited: int) -> None:
        """(On the store's thread.) Checkpoint the ``-wal`` into the file, off the path of any
        commit (``CHECKPOINT_EVERY``): after the calls queued behind the commit that made it
        due (up to ``IDLE_WAITS`` times). PASSIVE: it waits for no reader and never blocks a
        writer (a reader's snapshot left pages behind: the next one takes them). What is
        durable is the commits' (their fdatasync); a checkpoint cut short by a crash is
        SQLite's to redo from the ``-wal`` at the next open, as for its own.

        Not while ``hold_checkpoint`` says so: the next commit queues it again. One the disk
        does not take (``cannot_write``: a file that must grow on a full disk) is kept as
        ``checkpoint_trouble`` and told (a warning, ``on_checkpoint``) until one succeeds: the
        commits go on into the ``-wal`` meanwhile, SQLite reusing its pages, and would say
        nothing until the ``-wal`` must grow (review s72 leaderwrite). A failed try is tried
        again after a wait (``RETRY_FIRST``, doubling), not at the next commit; so is one that
        left pages behind (a reader's) while a failure is kept: only one that copied every
        page says it is over."""
        if waited < IDLE_WAITS and dbthread.pending() > 0:
            self._queue_checkpoint(waited + 1)
            return
        failed: sqlite3.Error | None = None
        with self._lock:
            self._checkpoint_queued = False
            if self._closed:
                return
            if self.hold_checkpoint is not None and self.hold_checkpoint():
                self.checkpoints_held += 1
                return
            left = False
            try:
                row = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                failed = exc
            else:  # (busy, the -wal's frames, those copied): -1 when not in WAL mode
                left = row is not None and int(row[2]) < int(row[1])
            if failed is None:  # (pages a reader holds: the next one takes them, as before)
                self._since_checkpoint = 0
                self.checkpoints += 1
            if failed is None and not (left and self.checkpoint_trouble is not None):
                self._retry_delay = 0.0
            else:  # a failure, or one not shown over: again after a wait
                self._retry_delay = min(max(self._retry_delay * 2, RETRY_FIRST), RETRY_MOST)
                self._retry = threading.Timer(self._retry_delay, self._try_again)
                self._retry.daemon = True
                self._retry.start()
            told = self._told(failed, left)
        if told:
            for listener in list(self.on_checkpoint):
                listener(failed)

    def _told(self, failed: sqlite3.Error | None, left: bool) -> bool:
        """Under the lock, after a checkpoint: keep and log what it says of the disk; True if
        ``on_checkpoint`` is to hear it (a success, or a failure the disk caused)."""
        if failed is not None and cannot_write(failed):
            why = error_text(failed)
            first = self.checkpoint_trouble is None
            self.checkpoint_trouble = why
            self.checkpoint_failures += 1
            if first:
                log.warning(
                    "db.checkpoint_failed",
                    path=str(self.path),
                    error=why,
                    retry_seconds=self._retry_delay,
                    hint="free space on its file system (df -h): the -wal cannot be copied into"
                    " the file; writes go on in the -wal until it must grow, then fail",
                )
            return True
        if failed is not None or left:  # another connection in the way: not the disk's
            log.debug(
                "db.checkpoint_held_back",
                path=str(self.path),
                error=error_text(failed) if failed is not None else None,
            )
            return False
        if self.checkpoint_trouble is not None:
            log.warning(
                "db.checkpoint_recovered",
                path=str(self.path),
                error=self.checkpoint_trouble,
                detail="the -wal was copied into the file: the failure said before is over",
            )
            self.checkpoint_trouble = None
        return True

    def _try_again(self) -> None:
        """(The retry's timer.) Queue the checkpoint again, due or not (one failed)."""
        with self._lock:
            self._retry = None
            if self._closed or self._checkpoint_queued:
                return
            self._checkpoint_queued = True  # (no commit queues another meanwhile)
        self._queue_checkpoint(0)

    def touch(self) -> None:
        """Move ``generation`` on after a routine write that turned out to matter."""
        with self._lock:
            self.generation += 1
        self._tell()

    def _tell(self) -> None:
        for listener in list(self.on_change):
            listener()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            self._db.close()
