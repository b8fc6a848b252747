"""``tlsroll-leader --config … --backup DIR``: a copy of the leader that can be restored.

The README's advice for a lost store is "restore it from a backup", and a copy of the data
directory taken while the leader runs is not one: the store is SQLite in WAL mode, and a copy
of ``leader.sqlite3`` made between two of its checkpoints lacks what only ``-wal`` holds (or
holds half of a transaction). This takes the store through SQLite's online backup (one read
transaction: a consistent store as of one moment, while the leader goes on writing) and checks
the copy (``quick_check``), then copies the files beside it that the leader cannot make again:

    DIR/leader.toml           the config the leader was started with
    DIR/leader.sqlite3        the store (nodes, tokens, rollouts, audit), 0600
    DIR/ca/ca.pem, ca.key     the cluster CA and its key (encrypted with the CA passphrase), 0600
    DIR/tls/leader.pem, .key  the leader's certificate and key, 0600
    DIR/MANIFEST.json         what was copied: sizes, SHA-256, the CA's pin, the store's schema

The CA passphrase is never copied (a backup holding it would undo the key's encryption): keep
it offline, as ``install.sh ca-credential`` says. The viewer's certificate is not copied either:
the leader issues a new one when it is missing. DIR must not exist, or be an empty directory;
it is made 0700, every file in it 0600. Restoring is the README's "Backups" steps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sqlite3
from pathlib import Path

from leader.layout import Layout
from tlsroll import __version__
from tlsroll.errors import TerminalError
from tlsroll.fsutil import PRIVATE, fsync_dir, make_private_dir, real_path, write_atomic

MANIFEST = "MANIFEST.json"
# What is copied as it is, beside the store (relative to the data directory).
FILES = ("ca/ca.pem", "ca/ca.key", "tls/leader.pem", "tls/leader.key")


PAIR = ("tls/leader.pem", "tls/leader.key")
"""The leader's certificate and key: a renewal writes a new key, then its certificate (since
session 63 each renewal has a new key), so copies read one after the other while it runs can
be of two pairs."""


def _same_pair(data_dir: Path, dest: Path, pair: tuple[str, str], tries: int = 5) -> None:
    """The copied certificate is the copied key's (the TLS library loads them as a pair), or
    both are copied again, up to ``tries`` times (the session's closing review, L4: a backup
    racing a renewal held the new key with the old certificate; a restore repaired it, but a
    backup should be what it says)."""
    import ssl  # noqa: PLC0415 - only here

    cert, key = (dest / rel for rel in pair)
    for _ in range(tries):
        try:
            # (a password given: an encrypted key is an error here, never a prompt)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
            return
        except ssl.SSLError:
            for rel in pair:  # (both again: a renewal under way has written them since)
                write_atomic(dest / rel, (data_dir / rel).read_bytes(), PRIVATE)
    raise BackupError(
        f"{pair[0]} is not {pair[1]}'s certificate (a renewal writing them? try again; if it"
        " stays so, restart tlsroll-leader, whose start issues the certificate for its key)"
    )


class BackupError(TerminalError):
    """A backup that could not be made (nothing is left half-made in DIR)."""


class BadDestination(BackupError):
    """DIR is no place for a backup (used, or its parent missing): the admin's input, exit 2
    as for any bad argument (``runtime.backup_command``; opswalk s75 L2: it was 1)."""


def make_backup(config: Path, layout: Layout, dest: Path) -> dict[str, object]:
    """Write the backup into ``dest`` and return its manifest. Blocking."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BadDestination(f"{dest}: exists and is not an empty directory; name a new one")
    if not dest.parent.is_dir():
        raise BadDestination(
            f"{dest.parent}: no such directory; make it first (DIR itself is made)"
        )
    if not layout.store.exists():
        raise BackupError(f"store {layout.store}: missing; there is nothing to back up")
    made: list[Path] = []
    created = not dest.exists()
    try:
        make_private_dir(dest)
        files: dict[str, dict[str, object]] = {}
        made_at = dt.datetime.now(dt.UTC)
        _copy_store(layout.store, dest / layout.store.name, made_at)
        made.append(dest / layout.store.name)
        files[layout.store.name] = _described(dest / layout.store.name)
        for rel, source in ((config.name, config), *((r, layout.data_dir / r) for r in FILES)):
            target = dest / rel
            make_private_dir(target.parent)
            write_atomic(target, source.read_bytes(), PRIVATE)
            made.append(target)
        _same_pair(layout.data_dir, dest, PAIR)
        for rel in (config.name, *FILES):
            files[rel] = _described(dest / rel)
        manifest: dict[str, object] = {
            "made_by": f"tlsroll-leader {__version__}",
            "made_at": made_at.isoformat(timespec="seconds"),
            "data_dir": str(layout.data_dir),
            "config": config.name,
            "config_path": str(real_path(config)),
            "store_schema": _schema_version(dest / layout.store.name),
            "ca_pin": _ca_pin(dest / "ca" / "ca.pem"),
            "files": files,
        }
        write_atomic(dest / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), PRIVATE)
        fsync_dir(dest)
        return manifest
    except BaseException:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.unlink()
        for sub in ("ca", "tls"):
            with contextlib.suppress(OSError):
                (dest / sub).rmdir()
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()
        raise


def _copy_store(source: Path, target: Path, made_at: dt.datetime) -> None:
    """SQLite's online backup from a read-only connection, then ``quick_check`` on the copy."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE)
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
                # The copy says it is one: the leader that opens it first knows it was
                # restored and what may have happened since (``Store.restore_began``).
                dst.execute(
                    "INSERT INTO meta (key, value) VALUES ('backup_made_at', ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (made_at.isoformat(timespec="microseconds"),),
                )
                # No leader has opened the copy (``leader.db.claim_copy``): a store that is
                # itself a copy a start opened and did not restore says so no more.
                dst.execute("DELETE FROM meta WHERE key = 'copy_opened_at'")
                dst.commit()
                # The copy stands alone: no -wal beside it to restore with it.
                dst.execute("PRAGMA journal_mode=DELETE")
                rows = [str(r[0]) for r in dst.execute("PRAGMA quick_check(3)").fetchall()]
            finally:
                dst.close()
        finally:
            src.close()
        if rows != ["ok"]:
            raise BackupError(f"store {source}: its copy fails SQLite's check: {'; '.join(rows)}")
        os.chmod(tmp, PRIVATE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except sqlite3.Error as exc:
        # Reading the store, or writing its copy into DIR (a full disk there): SQLite's error
        # says which way only in its words, so both are named.
        raise BackupError(f"copying store {source} into {target.parent}: {exc}") from None
    finally:
        # With it the copy's side files: SQLite writes the copy through a -wal (the store's
        # journal mode comes with its pages) or a -journal, and a failure on the way (a full
        # disk) left them in DIR, which was then not removed (session 67's deploy review).
        for path in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-wal", "-shm", "-journal"))):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _described(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _schema_version(store: Path) -> int:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _ca_pin(ca_pem: Path) -> str:
    from tlsroll import pki  # noqa: PLC0415 - cryptography only when a backup is made

    return pki.spki_pin(pki.load_cert_pem(ca_pem.read_bytes()))


def summary(dest: Path, manifest: dict[str, object], token: Path | None = None) -> str:
    """What the admin reads after a backup: where, what, and what is not in it (``token``:
    the config's ``metrics_token_file``, which is not: rev57b L5)."""
    files = manifest["files"]
    assert isinstance(files, dict)
    size = sum(int(f["bytes"]) for f in files.values())
    also = f", the metrics token file {token} (copy it yourself)" if token is not None else ""
    return (
        f"backup written to {dest} ({len(files)} files, {size} bytes; CA {manifest['ca_pin']}).\n"
        "Not in it: the CA passphrase (keep it offline; a restored leader needs it), the "
        f"viewer's certificate (issued again at the next start){also}.\n"
        "Keep the directory as safe as the leader itself: it holds the CA's (encrypted) key and "
        'the leader\'s key. To restore: README, "Operations", "Backups of the leader".'
    )
