"""The leader daemon (``tlsroll-leader``, entry point ``leader.daemon``).

Four listeners, each with the service for its level of trust:
    join port     TLS (leader cert), no client cert   Enrolment + health + reflection
    control port  mutual TLS (cluster CA)             Leader + health + reflection
    admin socket  Unix socket in a 0750 directory     Admin + health
    viewer port   https (viewer cert), read-only      the web viewer (``leader.viewer``), off
                                                      with ``viewer_port = 0``; aiohttp and
                                                      its app load on the first connection
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import gc
import os
import socket
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from leader import front, own_tls
from leader.admin_service import AdminService, Endpoints
from leader.admin_socket import AdminRelay
from leader.agent_client import AgentPool
from leader.auto_rotate import AutoRotator
from leader.commands import Commands
from leader.config import TEST_AGENT_CERT_ENV, LeaderConfig, agent_cert_seconds
from leader.db import (
    RELEARN_WINDOW,
    check_store,
    claim_copy,
    foreign_wal,
    mark_store,
    recorded_ca_pin,
)
from leader.engine import (
    LEASE_MARGIN,
    REPORT_LAG,
    SILENT_AFTER,
    TEST_LEASE_MARGIN_ENV,
    TEST_REPORT_LAG_ENV,
    TEST_SILENT_AFTER_ENV,
    Engine,
    lease_margin,
    report_lag,
    silent_after,
)
from leader.expiry import ExpiryWatch, own_certificates
from leader.front import (
    CREDENTIAL_COPY_DIR,
    START_FILES,
    ca_file_error,
)
from leader.join_guard import GuardPolicy, JoinGuard
from leader.layout import (
    CREDENTIAL,
    REISSUED_FOR_KEY,
    Layout,
    check_secret_dirs,
    ensure_leader_identity,
    new_leader_key,
    passphrase_source,
    read_passphrase,
    rechain_leader_cert,
    reissue_problem,
    upgrade_ca_key,
    write_leader_pair,
)
from leader.observe import observe
from leader.own_tls import OwnTls
from leader.schema_store import SchemaStore
from leader.schema_view import SchemaViewService, add_json_to_server
from leader.service import (
    BATCH_SECONDS,
    TEST_BATCH_ENV,
    TEST_EARLIER_HOLD_ENV,
    TWINS_HOLD_BOUNDS,
    EnrolmentService,
    LeaderService,
    LeaderState,
    batch_period,
    control_server_options,
    earlier_hold,
    renewal_deadline,
)
from leader.states import NodeProblemKind
from leader.store import Restored, Store, ca_pinned, relearning
from leader.store_health import StoreHealth, start_refused
from tlsroll import (
    __version__,
    daemon,
    fsutil,
    heap,
    kdfhook,
    keywrap,
    logs,
    password,
    pki,
    testhooks,
)
from tlsroll.daemon import ended_why, sd_notify, stop_event, until_stop_or_end, watchdog
from tlsroll.defaults import LEADER_NAME
from tlsroll.errors import (
    ConfigError,
    NotRegularFile,
    PKIError,
    PKIReason,
    TerminalError,
    TlsrollError,
    UnsafePermissions,
    os_error_text,
)
from tlsroll.fsutil import check_private_file
from tlsroll.rpc import (
    CONTROL_CONNECTIONS,
    HANDSHAKE_SECONDS,
    JOIN_CONNECTIONS,
    TEST_HANDSHAKE_ENV,
    add_standard_services,
    bind,
    connection_cap,
    handshake_seconds,
    hostport,
)
from tlsroll.sqlite import (
    CHECKPOINT_EVERY,
    TEST_CHECKPOINT_ENV,
    NotDamaged,
    SchemaTooNew,
    checkpoint_every,
    needs_a_person,
)
from tlsroll.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    enrolment_pb2,
    enrolment_pb2_grpc,
    leader_pb2,
    leader_pb2_grpc,
    schema_pb2,
    schema_pb2_grpc,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from cryptography import x509

    from leader.viewer.server import Viewer

# Exit codes a restart cannot change, only a person (the unit's RestartPreventExitStatus=):
# a config or usage error (argparse's, a --reinitialise refused; a data dir or config on a
# mount point fstab marks noauto, not mounted), a store written by a newer tlsroll (a package
# rolled back), and a store that is lost, damaged or unreadable (restore it from a backup, or
# --reinitialise: tlsroll.sqlite.StoreDamaged). 1: the rest, among them a data dir or config on
# a disk not mounted yet (``fsutil.not_mounted``) and a store that cannot be opened now (a full
# disk: StoreUnavailable), which systemd starts again until it can.
EXIT_CONFIG = front.EXIT_CONFIG
EXIT_STORE_TOO_NEW = 3
EXIT_STORE_DAMAGED = 4

# The stop's budget, within the unit's TimeoutStopSec=30s (deploy/systemd/tlsroll-leader.service):
# the admin calls in flight GRACE_SECONDS, then the commands carried on past it (``runs_to_end``)
# GRACE_SECONDS more at most, then the join and control servers TAIL_GRACE_SECONDS (their
# heartbeat streams are ended first: only short calls are left): 25 s at most, and the rest
# (the heartbeats' group commit of what is queued, one transaction; the stores' close) within
# the 30.
GRACE_SECONDS = 10.0
TAIL_GRACE_SECONDS = 5.0
OFFLINE_GRACE_MAX = 15.0  # seconds a command waits for a node that just went offline
# gRPC sets SO_REUSEPORT by default: a second leader would then share the ports with the first.
# Channelz (gRPC's introspection, which no listener serves) keeps a node with a trace per
# connection: off, each agent's connection costs ~1.7 KiB less (a gRPC server holding 300
# mutual-TLS connections with an open stream each, 3 runs each way: 80.9-82.2 KiB per
# connection against 82.7-83.7), ~0.8 MiB of the leader's memory at 500 agents.
SERVER_OPTIONS: list[tuple[str, int]] = [("grpc.so_reuseport", 0), ("grpc.enable_channelz", 0)]
# The join and control ports hold one TLS connection per agent for as long as it runs (its
# heartbeat stream): 500 agents, 500 connections. gRPC's TLS layer keeps a buffer of the largest
# TLS frame it writes per connection (16 KiB by default); 4 KiB frames cost nothing a heartbeat
# would notice and took ~6 KiB off each connection (3 MiB of the leader's memory at 500 agents).
# 1 KiB frames (gRPC's least) take ~2 KiB more off each: the leader's RSS at the end of a rollout
# of 500 simulated agents 119.2-119.7 MiB against 120.3-120.6 (4 interleaved runs each way,
# session 55), its CPU per node and per heartbeat message within the runs' spread (a heartbeat
# and its answer fit one frame; a longer message is a few frames more).
TLS_FRAME_OPTIONS = [("grpc.tsi.max_frame_size", 1024)]
log = logs.get_logger(__name__)


def _service(module: object, name: str) -> str:
    return str(module.DESCRIPTOR.services_by_name[name].full_name)  # type: ignore[attr-defined]


def _answers(sock: Path) -> bool:
    """True if a process accepts connections on the Unix socket ``sock``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


def refuse_if_running(cfg: LeaderConfig) -> None:
    """A leader answering on the admin socket: this one stops, having changed nothing."""
    try:
        there = cfg.admin_socket.exists()
    except OSError:  # (a directory we may not search: check_secret_dirs says it next)
        return
    if there and _answers(cfg.admin_socket):
        raise TerminalError(f"another tlsroll-leader is running on {cfg.admin_socket}")


def recovery_command(config: Path) -> str:
    """The one-shot that begins an empty store in place of a lost one, as the admin types it
    (on a server installed by install.sh: as the leader's user, whose files the store and its
    directory are, review s45rt2 H1; root, the admin's usual account there, is told how, and
    no one else is told ``runuser``, which is root's: review s45rev6 L3)."""
    me = os.geteuid()
    run = f"{fsutil.this_program('tlsroll-leader')} --config {os.path.abspath(config)}"
    if me == 0:
        return f"`{run} --reinitialise`"
    name = fsutil.user_name(me)
    return (
        f"`{run} --reinitialise` as {name} (as root: `runuser -u {name} -- {run} --reinitialise`)"
    )


def _passphrase_source(cfg: LeaderConfig) -> Path:
    """``layout.passphrase_source``; a ``ca_passphrase_file`` that is missing (with no
    credential) is the config's to fix: ConfigError, exit 2, which systemd does not restart
    (it was exit 1, started again for ever: review s47rtin L4)."""
    try:
        return passphrase_source(cfg.ca_passphrase_file)
    except TerminalError as exc:
        problem = str(exc)
        if Path(cfg.ca_passphrase_file).parent == CREDENTIAL_COPY_DIR:
            # A config restored from a server where install.sh ca-credential ran, on one
            # where it did not (restore review, session 68): what the README's restore says.
            problem += (
                " (it is where the unit of a server where install.sh ca-credential ran copies"
                " its credential: on another server, put the passphrase in a file (0600, the"
                " leader's user's), set ca_passphrase_file to it, start the leader, then run"
                " install.sh ca-credential)"
            )
        raise ConfigError(cfg.path, "[leader].ca_passphrase_file", problem) from None


def _passphrase_error(cfg: LeaderConfig, credential: bool, problem: str) -> ConfigError:
    """A CA passphrase the leader cannot start with is the admin's configuration to fix, the
    file's (``[leader].ca_passphrase_file``) or the unit's credential (``ca-passphrase``): a
    ConfigError, exit 2, which systemd does not restart (review s48rev3: a file others could
    read, or a wrong passphrase, exited 1 and was started again every 5 s for ever)."""
    if credential:
        return ConfigError(f"systemd credential {CREDENTIAL}", None, problem)
    return ConfigError(cfg.path, "[leader].ca_passphrase_file", problem)


def _read_passphrase(cfg: LeaderConfig, source: Path, *, credential: bool) -> bytes:
    """``layout.read_passphrase``; a passphrase file or credential that is not a regular file
    (a directory was told "chmod 600", a FIFO hung the start), that others can read, that is
    not ours, empty or that we may not read is a config error (``_passphrase_error``)."""
    try:
        return read_passphrase(source, credential=credential)
    except TerminalError as exc:  # UnsafePermissions, NotRegularFile, empty
        raise _passphrase_error(cfg, credential, str(exc)) from None
    except PermissionError as exc:  # (a directory on its way we may not enter)
        raise _passphrase_error(cfg, credential, os_error_text(exc)) from None


def wrong_passphrase(layout: Layout, source: Path) -> str:
    """What a passphrase that does not open the CA key says: the file it was read from, the
    key, and, for the copy of ``install.sh ca-credential``'s credential, how to make it again
    (review s49cli L4: a line that named only ``[leader].ca_passphrase_file``)."""
    problem = (
        f"the CA passphrase in {source} does not open the CA key {layout.ca_key}: a wrong "
        "passphrase, or a damaged key file"
    )
    if Path(source).parent == CREDENTIAL_COPY_DIR:
        problem += (
            f" ({source} is systemd's copy of the credential install.sh ca-credential made: "
            "to make it again, put the passphrase in a file (0600, the leader's user's), set "
            "ca_passphrase_file to it and run install.sh ca-credential)"
        )
    return problem


RESTORE = "restore it from a backup (tlsroll-leader --backup copies it: README 'Backups')"
"""What to do about a missing or damaged file of the leader's that only a backup holds."""


def _check_start_files(layout: Layout, *, viewer: bool) -> None:
    """Before the start changes anything: each file it reads is there, a regular file we may
    read (``fsutil.open_problem``), the keys ours alone (``check_private_file``), the
    viewer's certificate and key likewise if they are there (and the viewer is on), and the
    store, if there is one, a file we may read and write; else a config error
    (``ca_file_error``, exit 2) in one line naming the file and what to do. Restarting
    changes none of these: they exited 1 (the errno's line, or the store's "cannot be opened
    now") and systemd started the leader again every 5 s for ever (session 50). A data dir
    on a disk not mounted yet is no such case: it holds none of the leader's files, and
    ``check_data_dir`` said so before (exit 1, ``not_yet_there``). A directory on the way
    above the data dir is not the leader's: it is opened (``chmod o+x``), never chowned."""
    for what, name in START_FILES:
        path = getattr(layout, name)
        problem = fsutil.open_problem(path, missing=f"; {RESTORE}", own=layout.data_dir)
        if problem is not None:
            raise ca_file_error(what, problem)
        if name in ("ca_key", "tls_key"):
            try:
                check_private_file(path)
            except (UnsafePermissions, NotRegularFile) as exc:
                raise ca_file_error(what, str(exc)) from None
    # The viewer's, when it is on: issued again when missing or damaged, but one it may not
    # read, or a key others may, stopped the leader once it served (exit 1).
    for what, path in (
        ("viewer certificate", layout.viewer_cert),
        ("viewer TLS key", layout.viewer_key),
    ):
        if not viewer:
            continue
        problem = fsutil.open_problem(path, missing=None, own=layout.data_dir)
        if problem is None and path == layout.viewer_key and os.path.exists(path):
            try:
                check_private_file(path)
            except (UnsafePermissions, NotRegularFile) as exc:
                problem = str(exc)
        if problem is not None:
            raise ca_file_error(what, f"{problem} (or remove it: the leader issues a new one)")
    # A missing store is ``check_store``'s (new, or lost: exit 4); a read-only file system,
    # a lock, a full disk are not a person's alone (``StoreUnavailable``, exit 1). Its -wal
    # and -shm, when there, SQLite opens to write as well: root's 0644 (root ran sqlite3 on
    # the stopped leader's store) was "readonly database", exit 1 for ever (review of s50lead
    # L1). (None of them is open yet: ``open_problem``'s close would drop SQLite's locks.)
    for path in (layout.store, *(layout.store.with_name(layout.store.name + s) for s in WAL)):
        problem = fsutil.open_problem(path, write=True, missing=None, own=layout.data_dir)
        if problem is not None:
            raise ca_file_error("store", problem)


WAL = ("-wal", "-shm")
"""The files SQLite keeps beside the store in WAL mode."""


def _check_own_tls(layout: Layout, ca: pki.CertificateAuthority) -> None:
    """The leader's certificate and key as the listeners will take them: a chain of PEM
    certificates, a key (unencrypted) and the key of its leaf, or a key the start issues its
    certificate for again (``ensure_leader_identity``, in ``_start_on``: a leader.pem of
    another backup than leader.key's, or a leader.key replaced, stopped the leader although it
    holds the CA, session 52); else a config error naming the file (a damaged key was gRPC's
    "cannot listen on …: in use", exit 1: session 50)."""
    try:
        leaf = pki.load_certs_pem(layout.tls_cert.read_bytes())[0]
    except (PKIError, IndexError) as exc:
        why = str(exc) or "no certificate in it"
        raise ca_file_error("leader certificate", f"{layout.tls_cert}: {why}; {RESTORE}") from None
    try:
        key = pki.read_key(layout.tls_key)
    except PKIError as exc:
        raise ca_file_error("leader TLS key", f"{layout.tls_key}: {exc}; {RESTORE}") from None
    if pki.key_matches(leaf, key):
        return
    if (problem := reissue_problem(ca, key, pki.utcnow())) is not None:
        raise ca_file_error(
            "leader TLS key",
            f"{layout.tls_key} is not the key of the leader's certificate {layout.tls_cert},"
            f" and the leader cannot issue one for it: {problem} (tlsroll-leader --backup"
            " copies both: README 'Backups')",
        )


def another_ca(layout: Layout, recorded: str, pin: str) -> ConfigError:
    """A store of another CA's than the one in ``ca/`` (``Store.own_ca_pin``): a restore that
    put back the store of one backup and the ``ca/`` and ``tls/`` of another cluster's started
    without a word, with every node offline (their agents pin the store's CA) and the leader
    issuing from the other CA (review s67 deploy M1). A config error (exit 2, not restarted),
    one line naming both pins and what to do; nothing changed."""
    return ca_file_error(
        "CA certificate",
        f"{layout.ca_cert} is the CA of pin {pin}, but the store {layout.store} is of the CA"
        f" of pin {recorded} (its nodes pin that one): the store and ca/ are of two clusters;"
        " put back ca/ and tls/ from the same backup as the store (tlsroll-leader --backup"
        " copies them together: README 'Backups'); a store an earlier release pinned to a"
        " wrong ca/ is mended by tlsroll-leader --repin-ca; nothing was changed",
    )


def _load_ca(
    cfg: LeaderConfig, passphrase: bytes, *, source: Path, credential: bool
) -> pki.CertificateAuthority:
    """The CA. Every error loading it is a config error (exit 2) in one line naming the file
    (never the passphrase): a passphrase that does not open its key (a wrong one, or a key
    written without one, or damaged: it cannot be told) the passphrase's
    (``_passphrase_error``, naming the file it was read from); a certificate or key that is
    not PEM, a key of a type the CA does not take or that is not the certificate's, a
    certificate that is no CA, the file's (``ca_file_error``). Before, only a wrong passphrase
    was: an empty or garbled key exited 1 and was started again for ever (review s49cli M1)."""
    layout = cfg.layout
    try:
        cert = pki.read_cert(layout.ca_cert)
    except PKIError as exc:
        raise ca_file_error("CA certificate", f"{layout.ca_cert}: {exc}") from None
    try:
        key = pki.read_key(layout.ca_key, passphrase)
    except (UnsafePermissions, NotRegularFile) as exc:
        raise ca_file_error("CA key", str(exc)) from None
    except PKIError as exc:
        if exc.reason is not PKIReason.BAD_PASSPHRASE:
            raise ca_file_error("CA key", f"{layout.ca_key}: {exc}") from None
        why = f" ({exc.detail})" if exc.detail else ""
        raise _passphrase_error(cfg, credential, wrong_passphrase(layout, source) + why) from None
    try:
        return pki.CertificateAuthority(cert, key)
    except PKIError as exc:
        if exc.reason is PKIReason.KEY_MISMATCH:
            problem = f"{layout.ca_key} is not the key of the CA certificate {layout.ca_cert}"
            raise ca_file_error("CA key", problem) from None
        raise ca_file_error("CA certificate", f"{layout.ca_cert}: {exc}") from None


def _start_on(
    cfg: LeaderConfig, layout: Layout, ca: pki.CertificateAuthority, store: Store
) -> tuple[pki.Names, Restored | None]:
    """What the leader's start does with its CA once its store is open: a ``tlsroll ca renew``
    cut short (its ``ca.pem.new``) put in place if the store recorded it, else removed
    (``ca_renewal.leftover``); the leader's certificate chained with the CA certificate in
    use (``rechain_leader_cert``: a leader killed before its renewal's hooks served the old
    one until its certificate was issued again), and given its identity and names, or
    issued again if due (``ensure_leader_identity``). The one it finds is recorded if it is
    not on record (init's, made before the store; an earlier release's), and each it issues
    as it issues it (``Store.record_leader_certificate``). On a store restored from a backup,
    its first start (``Store.restore_began``) revokes every leader certificate on record, the
    one found included (the backup holds its key: a copy of it), so that it is issued again
    for a new key below (``_new_key_if_revoked``). Returns the leader's names, and what the
    restore did (None: no backup's copy, or not its first start)."""
    if layout.ca_cert_new.exists():  # a `tlsroll ca renew` cut short: its ca.pem.new
        from leader import ca_renewal  # noqa: PLC0415 - that rare start's only (issue 15)

        ca_renewal.leftover(layout, ca, store.ca_renewals(), dt.datetime.now(dt.UTC))
    if rechain_leader_cert(layout, ca):
        log.info("leader.certificate_rechained", ca_serial=f"{ca.cert.serial_number:x}")
    names = pki.Names.of(LEADER_NAME, [cfg.address], cfg.dns_names)
    old = pki.read_cert(layout.tls_cert)
    record = store.record_leader_certificate
    if pki.issued_by(old, ca.cert):  # (another CA's is no serial of this one's)
        record(old)
    # After the one found is recorded, before it is issued again if revoked: in one write, the
    # restore begun and the key revoked (a start killed after it issues it again the next time).
    restored = store.restore_began(dt.datetime.now(dt.UTC))
    _new_key_if_revoked(layout, ca, names, old, store)
    old = pki.read_cert(layout.tls_cert)
    _new_key_if_names_in_san(layout, ca, names, old, record)
    old = pki.read_cert(layout.tls_cert)
    done = ensure_leader_identity(
        layout, ca, names, warning=dt.timedelta(days=cfg.expiry_warning_days), record=record
    )
    if done is None:
        return names, restored
    new = done.cert
    if done.reason == REISSUED_FOR_KEY:
        log.warning(  # (public facts only: the key's pin, never the key)
            "leader.certificate_reissued_for_key",
            path=str(layout.tls_cert),
            key=str(layout.tls_key),
            serial=f"{new.serial_number:x}",
            replaced_serial=f"{old.serial_number:x}",
            key_pin=pki.spki_pin(new),
            fingerprint=pki.fingerprint(new),
            replaced_fingerprint=pki.fingerprint(old),
            detail="leader.pem was not the certificate of leader.key (a pair restored from"
            " two backups, or a key replaced): issued again for leader.key",
        )
    else:  # (for a new leader.key: ``ensure_leader_identity``)
        log.info(
            "leader.certificate_reissued",
            reason=done.reason,
            serial=f"{new.serial_number:x}",
            replaced_serial=f"{old.serial_number:x}",
            key_pin=pki.spki_pin(new),
            not_after=new.not_valid_after_utc.isoformat(timespec="seconds"),
        )
    return names, restored


def _new_key_if_revoked(
    layout: Layout,
    ca: pki.CertificateAuthority,
    names: pki.Names,
    cert: x509.Certificate,
    store: Store,
) -> None:
    """A leader.pem the admin revoked (`tlsroll ca revoke`) is issued again for a new key
    (``new_leader_key``): the running leader does so right after the revocation
    (``leader.own_tls``); a start does what one stopped before it could left undone. Before,
    no start issued it again: agents refused every command of the leader until it ended
    (review s63 ops)."""
    serial = f"{cert.serial_number:x}"
    if not store.is_revoked(serial):
        return
    if new_leader_key(layout, ca, names, pki.utcnow(), store.record_leader_certificate) is None:
        own_tls.said_not_reissued(serial)
        return
    own_tls.said_reissued(pki.read_cert(layout.tls_cert), serial, served=False)


def _new_key_if_names_in_san(
    layout: Layout,
    ca: pki.CertificateAuthority,
    names: pki.Names,
    cert: x509.Certificate,
    record: Callable[[x509.Certificate], object],
) -> None:
    """A leader.pem of an earlier release names the leader's address in its SAN: a server
    certificate for that address that every workstation would accept, served to anyone who
    connected to the join and control ports, for up to 397 days, and its key is in every
    backup. It is issued again with the names apart (``pki.NAMES_OID``) for a new key, so that
    the old certificate's key serves nothing from now on (agents check the leader's identity,
    not its key; review s59 L1). The key is written first (``write_leader_pair``)."""
    if pki.names_apart(cert) is not None:
        return
    key = pki.generate_key()
    if reissue_problem(ca, key, pki.utcnow()) is not None:
        return  # (the start's own check says why: ensure_leader_identity)
    new = write_leader_pair(layout, ca, key, names, record)
    log.warning(  # (public facts only: the key's pin, never the key)
        "leader.certificate_reissued_names_apart",
        path=str(layout.tls_cert),
        serial=f"{new.serial_number:x}",
        replaced_serial=f"{cert.serial_number:x}",
        key_pin=pki.spki_pin(new),
        fingerprint=pki.fingerprint(new),
        replaced_fingerprint=pki.fingerprint(cert),
        replaced_not_after=cert.not_valid_after_utc.isoformat(),
        detail="leader.pem named the leader's address in its SAN (an earlier release's): "
        "issued again, its names apart, for a new leader.key; backups made before hold the "
        "old key, whose certificate stays valid to the workstations until replaced_not_after",
    )


def load_state(cfg: LeaderConfig, *, config: Path | None = None) -> LeaderState:
    layout = cfg.layout
    # Before anything is touched: a second leader on the same data (started by hand while one
    # runs) made the start's changes (a renewal's ca.pem.new put in place, the key upgraded,
    # the certificate rechained) before serve's check refused it (review s49 L4).
    refuse_if_running(cfg)
    _kdf_hook(layout.data_dir)  # (set wrong: refused before anything is read)
    if mount_root := os.environ.get(fsutil.TEST_MOUNT_ROOT_ENV):  # (read with the start's checks)
        _test_hook(fsutil.TEST_MOUNT_ROOT_ENV, mount_root[:40])
    check_secret_dirs(layout)
    source = _passphrase_source(cfg)
    credential = source != cfg.ca_passphrase_file
    _check_start_files(layout, viewer=bool(cfg.viewer_port))
    passphrase = _read_passphrase(cfg, source, credential=credential)
    ca = _load_ca(cfg, passphrase, source=source, credential=credential)
    _check_own_tls(layout, ca)
    # Before anything opens the store (the lost-store check does): a backup's copy put back
    # beside the -wal of the store it replaced is not mixed with it.
    if (mixed := foreign_wal(layout.store)) is not None:
        raise ConfigError(layout.store, None, mixed)
    # Lost state stops the leader; it never starts empty instead, unless the admin says so
    # (``reinitialise``, a one-shot of its own). Before the CA pin's check: a damaged store's
    # pin is no word on its cluster, and the admin is told of the damage, not of two clusters
    # (closing review s67; session 68).
    check_store(layout.store, recover=recovery_command(config or layout.config), beside_ca=True)
    # Before anything is changed (the CA key's encryption, the store's schema): the store is
    # this CA's (review s67 deploy M1). Checked again, and recorded, once the store is open.
    pin = pki.spki_pin(ca.cert)
    if (recorded := recorded_ca_pin(layout.store)) not in (None, pin):
        raise another_ca(layout, recorded, pin)
    ca.csr_lifetime = dt.timedelta(seconds=cfg.server_cert_lifetime)  # the nodes' https
    if credential and cfg.ca_passphrase_file.exists():
        log.warning(
            "ca.passphrase_file_left",
            path=str(cfg.ca_passphrase_file),
            hint="the passphrase comes from the systemd credential; remove this copy (shred -u)",
        )
    if (weak := upgrade_ca_key(layout, ca, passphrase)) is not None:
        log.info(
            "ca.key_reencrypted",
            kdf_before=weak,
            kdf_now=str(keywrap.kdf_of(layout.ca_key.read_bytes())),
        )
    claim_copy(layout.store)  # (a backup's copy: its -wal from here on is its own)
    store = Store(layout.store, created=ca_pinned(pin))  # (a new one: recorded, unsaid)
    try:
        if (recorded := store.own_ca_pin(pin)) is None:
            log.info(
                "store.ca_pin_recorded",
                path=str(layout.store),
                ca_pin=pin,
                detail="the CA this store belongs to, recorded (a store of an earlier release,"
                " or begun by --reinitialise): a start with another CA's ca/ is refused from"
                " now on",
            )
        elif recorded != pin:
            raise another_ca(layout, recorded, pin)
    except BaseException:
        store.close()
        raise
    mark_store(layout.store)
    try:
        if stamped := store.stamp_row_keys():  # (keys of certificates recorded before 18)
            log.info(
                "store.keys_stamped",
                certificates=stamped,
                detail="node certificates recorded without their key (before store schema 18,"
                " or by an older leader since) got their node's key on record: a revoked or"
                " removed one is refused at enrolment from now on",
            )
        names, restored = _start_on(cfg, layout, ca, store)
    except BaseException:
        store.close()
        raise
    if restored is not None:
        log.warning(
            "store.restored",
            path=str(layout.store),
            backup_made_at=restored.made.isoformat(timespec="seconds"),
            relearn_until=restored.relearn_until.isoformat(timespec="seconds"),
            revoked_leader_serials=list(restored.leader_serials),
            detail="a store restored from a backup (or the copy kept before an upgrade, put"
            " back: README 'Downgrading tlsroll'): a node whose agent renewed its "
            "certificate since is taken with it until then; its join tokens with a use left"
            " and its open viewer grants are revoked (create new ones: tlsroll token create,"
            " tlsroll viewer grant); the leader's certificates are revoked (the backup holds"
            " their key) and it serves a new key; what the agents' revocation lists hold that"
            " the store lacks is learned from them (crl.learned); remove again the nodes"
            " removed since, and check `tlsroll epoch show`",
        )
    agent_cert = agent_cert_seconds(cfg.agent_cert_lifetime, os.environ)
    if agent_cert != cfg.agent_cert_lifetime:
        _test_hook(TEST_AGENT_CERT_ENV, agent_cert)
    return LeaderState(
        store=store,
        ca=ca,
        clock=lambda: dt.datetime.now(dt.UTC),
        heartbeat_interval=cfg.heartbeat_interval,
        leader_names=names,
        leader_node=cfg.node_name,
        agent_cert_lifetime=dt.timedelta(seconds=agent_cert),
    )


def _kdf_hook(data_dir: Path) -> None:
    """The tests' scrypt hook (``keywrap.TEST_KDF_N_ENV``), said at every start while it is set:
    a CA key this start writes (``upgrade_ca_key``) is under that weaker N, and one ``init``
    wrote under it is kept. Set wrong, the start is refused (exit 2), never as unset."""
    if (n := kdfhook.start_hook(data_dir)) is not None:
        log.warning(
            "leader.test_hook",
            hook=keywrap.TEST_KDF_N_ENV,
            value=n,
            detail=f"the CA key is written (and kept) under scrypt N={n}, not"
            f" N={keywrap.SCRYPT_N}: a passphrase guess costs {keywrap.SCRYPT_N // n} times less;"
            f" password verifiers down to N={n} are staged, not only from N={password.MIN_N}",
            hint=f"{keywrap.TEST_KDF_N_ENV} is for tests only: remove it from the leader's"
            " environment; the next start encrypts the key again at full strength, and a"
            " password verifier made under it is refused without it: set the password again",
        )


def _test_hook(env: str, value: float | str) -> None:
    """A test-only hook in effect, said at the start: one left in a production unit's
    environment (agent certificates of seconds renew into the hourly cap and end) is seen in
    the log, not guessed at (closing review s65, L3); an installed leader refuses to start
    with one (``testhooks.refused``, in ``front``)."""
    log.warning(
        "leader.test_hook",
        hook=env,
        value=value,
        detail=f"{env} is for tests only: remove it from the leader's environment",
        hint=testhooks.HINT,
    )


def reinitialise(cfg: LeaderConfig) -> str:
    """``tlsroll-leader --reinitialise``: an empty store in place of a lost one, then exit; the
    leader is started as before afterwards (by its unit). A one-shot that needs no CA (the
    store holds none of it): on an installed server the CA passphrase reaches only the unit's
    start, as a systemd credential, and root runs this as the leader's user (review s45rt2
    H1). The lost file is moved aside; the new store re-learns the enrolled nodes from their
    agents' heartbeats for ``RELEARN_WINDOW`` from now. Refused (``NotDamaged``) for an intact
    store, one that only cannot be opened now, and (``UnsafePermissions``) for a data dir of
    another user's, where a store of ours would stop that user's leader. Returns the line
    that says what was done and what comes next."""
    layout = cfg.layout
    if _answers(cfg.admin_socket):  # its store is no lost one: it would go on, on the old file
        raise TerminalError(  # review s45rev6 M1: nothing changed
            f"a leader is running on {cfg.admin_socket}: stop it first (systemctl stop"
            " tlsroll-leader)"
        )
    check_secret_dirs(layout)
    for secret in (layout.ca_key, layout.tls_key):
        check_private_file(secret)
    here = layout.store.parent
    if (owner := os.stat(here).st_uid) != os.geteuid():
        raise UnsafePermissions(
            f"{here} is owned by {fsutil.user_label(owner)}, not by "
            f"{fsutil.user_label(os.geteuid())} who runs this: a store made by this would stop"
            f" the leader that runs as its owner; {fsutil.owner_fix(owner, layout.store)}"
        )
    kept = check_store(layout.store, reinitialise=True)
    # Marked first: until the new store's first transaction has committed, its file is lost,
    # not new; that transaction opens the re-learning window with the schema.
    mark_store(layout.store)
    now = dt.datetime.now(dt.UTC)
    until = now + RELEARN_WINDOW
    store = Store(layout.store, created=relearning(until, now=now, actor="admin:--reinitialise"))
    try:
        if store.relearn_until() is None:  # not new: made meanwhile by another process
            raise TerminalError(  # not lost: exit 1
                f"store {layout.store}: made by another process meanwhile; try again"
            )
    finally:
        store.close()
    log.warning(
        "store.reinitialised",
        path=str(layout.store),
        kept_as=[str(k) for k in kept],
        relearn_until=until.isoformat(timespec="seconds"),
        detail="an empty store on the admin's --reinitialise; nodes are re-learned from "
        "their agents' heartbeats; check `tlsroll nodes` and remove any that do not belong",
    )
    aside = f" (the lost one kept as {', '.join(k.name for k in kept)})" if kept else ""
    return (
        f"store {layout.store}: begun again, empty{aside}; the leader re-learns the enrolled"
        f" nodes from their agents until {until.isoformat(timespec='minutes')}: start it now"
        " as before (installed: systemctl start tlsroll-leader), then check `tlsroll nodes`"
    )


def repin_ca(cfg: LeaderConfig, confirm: tuple[str, str] | None, *, config: Path) -> str:
    """``tlsroll-leader --repin-ca RECORDED PIN``: the store is of the CA in ``ca/`` from now
    on, in place of the one it records, then exit (the leader is started as before). The way
    out of a wrong pin, which nothing else corrects: a store of a release before session 67
    records whichever CA its first start finds in ``ca/`` (another cluster's, restored by
    mistake, included), and once the right ``ca/`` is back the leader refuses it
    (``another_ca``). Never silent: done only when ``confirm`` names the pin on record and
    ``ca/ca.pem``'s, in that order, and audited (``store.ca_pin_replaced``); otherwise (None:
    ``--repin-ca`` with no pins) a config error (exit 2) naming both and the command that
    confirms, nothing changed. Like ``--reinitialise``, a one-shot with the leader stopped
    that needs no CA passphrase (the pin is the CA certificate's key's, public; the start
    checks that ``ca.key`` is its key); refused for a lost store (exit 4, as a start), and a
    store that records no pin (its start records ``ca/``'s). Returns the line that says what
    was done."""
    layout = cfg.layout
    if _answers(cfg.admin_socket):
        raise TerminalError(
            f"a leader is running on {cfg.admin_socket}: stop it first (systemctl stop"
            " tlsroll-leader); nothing was changed"
        )
    check_secret_dirs(layout)
    here = layout.store.parent
    if (owner := os.stat(here).st_uid) != os.geteuid():
        raise UnsafePermissions(
            f"{here} is owned by {fsutil.user_label(owner)}, not by"
            f" {fsutil.user_label(os.geteuid())} who runs this: run it as the leader's user;"
            f" {fsutil.owner_fix(owner, layout.store)}"
        )
    if (mixed := foreign_wal(layout.store)) is not None:
        raise ConfigError(layout.store, None, mixed)
    check_store(layout.store, recover=recovery_command(config), beside_ca=True)
    try:
        pin = pki.spki_pin(pki.read_cert(layout.ca_cert))
    except PKIError as exc:
        raise ca_file_error("CA certificate", f"{layout.ca_cert}: {exc}") from None
    recorded = recorded_ca_pin(layout.store)
    if recorded is None:
        raise ConfigError(
            layout.store,
            None,
            "records no CA pin (a new store, or one of an earlier release): the leader's"
            f" start records the pin of {layout.ca_cert}; nothing was changed",
        )
    if recorded == pin:
        return (
            f"store {layout.store}: already of the CA of pin {pin} ({layout.ca_cert});"
            " nothing was changed"
        )
    if confirm != (recorded, pin):
        run = f"{fsutil.this_program('tlsroll-leader')} --config {os.path.abspath(config)}"
        said = "" if confirm is None else f"the pins given are not {recorded} then {pin}; "
        raise ConfigError(
            layout.store,
            None,
            f"{said}it is of the CA of pin {recorded}, {layout.ca_cert} is of pin {pin}:"
            f" only if {layout.ca_cert} is this cluster's CA (the pin its agents have:"
            " [leader].ca_pin in each agent.toml), and the store's pin a wrong ca/ left (an"
            " earlier release's store first started with another cluster's ca/), record it"
            f" in place of the store's: `{run} --repin-ca {recorded} {pin}`; else put back ca/"
            " and tls/ from the same backup as the store; nothing was changed",
        )
    claim_copy(layout.store)
    store = Store(layout.store)
    try:
        done = store.replace_ca_pin(recorded, pin, dt.datetime.now(dt.UTC), "admin:--repin-ca")
    finally:
        store.close()
    if not done:  # (another process changed it meanwhile)
        raise TerminalError(f"store {layout.store}: its CA pin changed meanwhile; try again")
    log.warning(
        "store.ca_pin_replaced",
        path=str(layout.store),
        was=recorded,
        ca_pin=pin,
        detail="the admin's --repin-ca: the store is of the CA in ca/ from now on",
    )
    return (
        f"store {layout.store}: now of the CA of pin {pin} ({layout.ca_cert}), in place of"
        f" {recorded}: start the leader as before (installed: systemctl start tlsroll-leader)"
    )


def settle_heap() -> None:
    """Once the leader is set up, before it serves: what its start made (its modules, its
    configuration and state, tens of thousands of objects, most of those the cyclic garbage
    collector tracks) lives as long as the leader does, so it is taken out of the collector's
    way (``gc.freeze``, after one pass that frees the start's own garbage). Every full pass
    after it, the automatic ones and the one at each rollout's end (``give_back``), walks only
    what came after the start: at the end of a 10-node rollout 1.6 thousand objects instead of
    45 thousand, the pass 3 ms instead of 19-42 ms (gc callbacks in the leader,
    ``bench.rollout``, a loaded machine: 2-4 ms of CPU per node of such a rollout)."""
    gc.collect()
    gc.freeze()


async def give_back(agents: AgentPool) -> None:
    """What a leader does once its last live rollout has ended: it closes the agent pool's
    idle channels and gives the free heap memory back to the system (``tlsroll.heap``). A
    500-node rollout leaves about 20 MiB resident that the leader no longer uses (its channels
    to agents, and memory that gRPC's threads and Python freed but malloc kept); the trim
    returns the part of it that lies in whole free pages (``bench.simagents``: issue 15)."""
    closed = await agents.close_idle()
    # A closed channel's connection and its memory inside gRPC (~100 KiB) go with the channel
    # object, and reference cycles left by the rollout's calls held some of them until the
    # cyclic GC's next full pass, which a quiet leader may not make for long
    # (``bench.simagents --rollouts`` at 50 nodes: 9-35 connections to agents still open 20 s
    # after the pool had closed them all, none after a collection): collected now, before the
    # trim, so that what they held is free for it. One full pass per rollout's end.
    collected = gc.collect()
    release = heap.releaser()
    gave = await asyncio.to_thread(release) if release is not None else 0
    log.debug(
        "leader.memory_released", channels_closed=closed, collected=collected, trimmed=bool(gave)
    )


class LoopDied(TerminalError):
    """A loop of the leader (the rollout engine, the expiry watch) ended before the stop: the
    daemon exits 1 with this line, and the service manager starts it again."""


async def start_listeners(
    servers: Sequence[grpc.aio.Server], viewer: Viewer | None, relay: AdminRelay
) -> None:
    """Start the gRPC ``servers`` (join, control, the admin one behind the relay), the
    ``viewer`` if it is on, then the admin socket (``relay``) last: a caller that waits for
    the admin socket to answer (a script, `systemctl start`'s followers, a test) finds every
    listener up (session 75, flakesweep L6: the viewer started after the relay, and a script
    that opened it once the admin socket answered could find it not listening). A start that
    fails stops what was started (the viewer's taken port: the leader exits with one line)."""
    for server in servers:
        await server.start()
    try:
        if viewer is not None:
            await viewer.start()
        await relay.start(0o660)
    except BaseException:
        if viewer is not None:
            await viewer.stop()
        await asyncio.gather(*(s.stop(None) for s in servers))
        await relay.stop()  # (a socket file it bound before it failed)
        raise


async def serve(cfg: LeaderConfig, state: LeaderState) -> None:
    stop = stop_event()
    layout = cfg.layout
    names = state.leader_names or pki.Names.of(LEADER_NAME, [cfg.address], cfg.dns_names)
    # renewed and served while running
    own = OwnTls(
        layout,
        state.ca,
        names,
        dt.timedelta(days=cfg.expiry_warning_days),
        revoked=state.store.is_revoked,
        record=state.store.record_leader_certificate,
    )

    def served(chain: bytes) -> None:
        state.leader_serial = f"{pki.load_certs_pem(chain)[0].serial_number:x}"

    served(own.chain_pem)
    own.on_renewed.append(served)
    join_creds = own.join_credentials()
    control_creds = own.control_credentials()

    join = grpc.aio.server(
        options=SERVER_OPTIONS + TLS_FRAME_OPTIONS + connection_cap(JOIN_CONNECTIONS)
    )
    enrolment = EnrolmentService(state)
    enrolment.guard = JoinGuard(GuardPolicy(free=cfg.join_free_failures))
    enrolment_pb2_grpc.add_EnrolmentServicer_to_server(enrolment, join)
    await add_standard_services(join, [_service(enrolment_pb2, "Enrolment")])
    bind(join, hostport(cfg.address, cfg.join_port), join_creds)

    # Keepalive PINGs tell a live agent from a stopped one between its heartbeat messages.
    control = grpc.aio.server(
        options=SERVER_OPTIONS
        + TLS_FRAME_OPTIONS
        + control_server_options(cfg.heartbeat_interval)
        + connection_cap(CONTROL_CONNECTIONS)
    )
    if handshake_seconds() != HANDSHAKE_SECONDS:  # (``connection_cap``'s, every gRPC port)
        _test_hook(TEST_HANDSHAKE_ENV, handshake_seconds())
    leader_service = LeaderService(state)
    leader_service.batch_seconds = batch_period(os.environ)
    if leader_service.batch_seconds != BATCH_SECONDS:
        _test_hook(TEST_BATCH_ENV, leader_service.batch_seconds)
    hold = earlier_hold(os.environ, cfg.heartbeat_interval)
    if hold != TWINS_HOLD_BOUNDS * renewal_deadline(cfg.heartbeat_interval):
        leader_service.earlier_hold = hold
        _test_hook(TEST_EARLIER_HOLD_ENV, hold)
    leader_service.workstation_certs_per_hour = cfg.workstation_certs_per_hour
    leader_pb2_grpc.add_LeaderServicer_to_server(leader_service, control)
    await add_standard_services(control, [_service(leader_pb2, "Leader")])
    bind(control, hostport(cfg.address, cfg.control_port), control_creds)

    # Why the store cannot be written, while it cannot (a full disk): the engine's and the
    # heartbeats' failures, cleared at the next commit; `rollout status` shows it.
    health = StoreHealth(state.clock)
    state.store.db.on_commit.append(health.works)
    state.store.db.on_checkpoint.append(health.checkpoint)  # (until one succeeds)
    state.store.db.checkpoint_every = checkpoint_every(os.environ)
    if state.store.db.checkpoint_every != CHECKPOINT_EVERY:
        _test_hook(TEST_CHECKPOINT_ENV, state.store.db.checkpoint_every)
    leader_service.store_health = health
    relay = AdminRelay(cfg.admin_socket)  # the caller from SO_PEERCRED (leader.admin_socket)
    admin = grpc.aio.server(interceptors=[relay.interceptor()])
    schema = SchemaStore(state.store.db)  # one Database for the file (leader.db)
    agent_credentials = own.channel_credentials()
    agents = AgentPool(state.store, agent_credentials, state.trust_domain)
    engine = Engine(
        state.store,
        schema,
        state.ca,
        agents,
        state.clock,
        cfg.scope_freeze_lease,
        # the leases' and the liveness' clock alike: elapsed time, a suspend counted
        monotonic=state.monotonic,
        step_deadline=cfg.step_deadline,
        prepare_ahead=cfg.prepare_ahead,
        heartbeat_interval=cfg.heartbeat_interval,
        after_rollouts=functools.partial(give_back, agents),
        node_problem=state.node_problem,
    )
    engine.store_health = health
    engine.live_server = lambda name: state.live_servers.get(name, "")
    engine.silent_after = silent_after(os.environ)
    if engine.silent_after != SILENT_AFTER:
        _test_hook(TEST_SILENT_AFTER_ENV, engine.silent_after)
    engine.lease_margin = lease_margin(os.environ)
    if engine.lease_margin != LEASE_MARGIN:
        _test_hook(TEST_LEASE_MARGIN_ENV, engine.lease_margin)
    engine.report_lag = report_lag(os.environ)
    if engine.report_lag != REPORT_LAG:
        _test_hook(TEST_REPORT_LAG_ENV, engine.report_lag.total_seconds())
    commands = Commands(
        state.store,
        schema,
        state.clock,
        state.online,
        cfg.node_name,
        engine.wake.set,
        # Planning asks on the agents' heartbeat streams where it can (no channel opened for
        # the question) and proves the leader's way in meanwhile (``AgentPool.reach``).
        observe=functools.partial(
            observe, agents, ca=state.ca.cert, ask=leader_service.ask_check, reach=agents.reach
        ),
        vault=engine.vault,
        cert_horizon=dt.timedelta(days=cfg.expiry_warning_days),
        # An agent whose stream ended opens a new one within a second or so, once the leader
        # is back; one of an earlier release at its next heartbeat (a command waits no longer
        # than OFFLINE_GRACE_MAX for it, whatever the interval).
        offline_grace=min(cfg.heartbeat_interval + 1.0, OFFLINE_GRACE_MAX),
        prepare_ahead=cfg.prepare_ahead,
        channels=agents,  # a start's first nodes' channels (``AgentPool.release_first``)
        heartbeat_interval=cfg.heartbeat_interval,
    )
    commands.no_settings = state.no_settings  # (a plan's skip names the rotate-cert there)
    viewer: Viewer | None = None
    if cfg.viewer_port:  # the viewer's parts only when it is on; aiohttp once it is opened
        from leader.viewer.server import Viewer  # noqa: PLC0415

        viewer = Viewer.build(cfg, state, schema)
    expiry = ExpiryWatch(
        state.store,
        schema,
        lambda: state.ca.cert,  # the one in use (`tlsroll ca renew` replaces it)
        lambda: own_certificates(
            [("leader", layout.tls_cert)] + ([("viewer", layout.viewer_cert)] if viewer else [])
        ),
        state.clock,
        warning_days=cfg.expiry_warning_days,
        agent_lifetime=state.agent_cert_lifetime,
        check_every=cfg.expiry_check_interval,
    )
    if viewer is not None:
        expiry.before_check.append(viewer.renew_if_due)  # renewed while the leader runs
    rotator = AutoRotator(
        expiry,
        schema,
        commands,
        enabled=cfg.auto_rotate,
        window=cfg.maintenance_window,
        zone=cfg.maintenance_timezone,
        needs_admin=lambda: [
            p.node for p in state.node_problems() if p.kind is NodeProblemKind.NEEDS_ADMIN
        ],
        cut_off=state.store.cut_off_nodes,
        # (refused as `rollout start` is: ``AdminService._start_refused``)
        start_refused=functools.partial(start_refused, health, state.store.db.path.parent),
    )
    rotator.announce()  # a window read in UTC only because the host runs on UTC
    expiry.reported = lambda: dict(state.served_fingerprints)  # as the heartbeats say (a copy)
    expiry.before_check.append(rotator.check)  # auto_rotate: in the maintenance window
    expiry.wake_hints.append(rotator.wake_in)  # and as it opens, however short it is
    if viewer is not None:
        viewer.reader.auto_rotate = rotator.status.view
        viewer.reader.node_problems = state.node_problems
        viewer.reader.login_failures = state.login_failures
        viewer.reader.clock_offset = state.clocks.offset
        viewer.reader.store_trouble = lambda: health.trouble
        viewer.reader.store_writes_work = lambda: health.writes_work
        viewer.reader.live_server = lambda name: state.live_servers.get(name, "")
        # (a copy, made at once: the watch and the page read it in a worker thread while
        # heartbeats change it on the event loop)
        viewer.reader.served_reported = lambda: dict(state.served_fingerprints)
    admin_service = AdminService(
        state,
        commands,
        schema,
        cfg.node_name,
        viewer_url=viewer.url if viewer else "",
        expiry=expiry,
        endpoints=Endpoints(cfg.address, cfg.join_port, cfg.control_port),
        agent_credentials=agent_credentials,
        layout=layout,
    )
    admin_service.store_health = health
    admin_pb2_grpc.add_AdminServicer_to_server(admin_service, admin)

    def redial(_chain: bytes) -> None:
        credentials = own.channel_credentials()
        agents.set_credentials(credentials)
        admin_service.agent_credentials = credentials

    own.on_renewed.append(redial)
    if viewer is not None:  # the page shows the new one, as the expiry watch has it
        reader = viewer.reader
        own.on_renewed.append(lambda _chain: reader.own_renewed("leader", own.cert))
    # `tlsroll ca renew`: served, trusted and dialled with at once, and the leader's and the
    # viewer's certificates issued again if due (one cut to the old end is, near it).
    admin_service.ca_renewed.append(own.ca_renewed)
    if viewer is not None:
        shown = viewer

        def show_renewed() -> None:
            shown.show_own("ca", state.ca.cert)
            shown.show_own("leader", own.cert)

        admin_service.ca_renewed += [viewer.renew_if_due, show_renewed]
    # `tlsroll ca revoke` of the leader's or the viewer's certificate: issued again (a new
    # key) and served at once; the one not revoked is left as it is.
    admin_service.own_revoked.append(own.renew_if_due)
    if viewer is not None:
        admin_service.own_revoked.append(viewer.renew_if_due)
    expiry.before_check.insert(0, own.renew_if_due)  # the leader's certificate, while it runs
    schema_view = SchemaViewService(
        schema,
        state.clock,
        expiry,
        rotator.status.view,
        node_problems=state.node_problems,
        store_trouble=lambda: health.trouble,
        store_writes_work=lambda: health.writes_work,
        login_failures=state.login_failures,
        fresh=state.fresh_reports,
        reported=state.store.report_since_start,
        live_server=lambda name: state.live_servers.get(name, ""),
        served=lambda: dict(state.served_fingerprints),  # (a copy: read in a worker thread)
    )
    schema_pb2_grpc.add_SchemaViewServicer_to_server(schema_view, admin)
    add_json_to_server(schema_view, admin)  # the same, for `tlsroll schema show`
    await add_standard_services(
        admin, [_service(admin_pb2, "Admin"), _service(schema_pb2, "SchemaView")]
    )
    sock = cfg.admin_socket
    # Its directory narrowed to 0750 (group = admins) where it is the leader's own: DATA/run,
    # or one it makes; another keeps its mode (leader.config refuses one others may write to:
    # /tmp was made 0750).
    made = sock.parent == cfg.layout.admin_socket.parent or not sock.parent.exists()
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if made:
        os.chmod(sock.parent, 0o750)  # noqa: S103 - group = admins
    if sock.exists():
        if _answers(sock):  # (one started since ``load_state``'s look: ``refuse_if_running``)
            raise TerminalError(f"another tlsroll-leader is running on {sock}")
        sock.unlink()  # a stale socket from a crash; the directory is ours
    bind(admin, relay.backend, None)

    servers = (join, control, admin)
    # Before any caller comes: what a caller makes must not be frozen with the start's own.
    settle_heap()
    await start_listeners(servers, viewer, relay)
    log.info(
        "leader.started",
        version=__version__,
        join=hostport(cfg.address, cfg.join_port),
        control=hostport(cfg.address, cfg.control_port),
        admin_socket=str(sock),
        viewer=viewer.url if viewer else "off",
        ca_pin=pki.spki_pin(state.ca.cert),
    )
    sd_notify("READY=1")
    pinger = asyncio.create_task(watchdog(), name="watchdog")
    # The engine resumes an unfinished rollout from the store on its first pass.
    engine_task = asyncio.create_task(engine.run(stop), name="engine")
    expiry_task = asyncio.create_task(expiry.run(stop), name="expiry-watch")
    # Both loops run until the stop; one that ends before it (an error out of its pass) would
    # leave a leader that answers and feeds the watchdog while no rollout moves: it stops.
    died = await until_stop_or_end(stop, (engine_task, expiry_task))
    if died:
        log.error("leader.loop_died", detail=died)
        sd_notify(f"STATUS={died}; stopping")
    sd_notify("STOPPING=1")
    # No new admin caller from now on: its connect is refused, so the CLI says "cannot reach"
    # (never received), not "may have been done" for a call the stopping server never read.
    relay.stop_accepting()
    pinger.cancel()
    log.info("leader.stopping", grace_seconds=GRACE_SECONDS)
    if viewer is not None:
        await viewer.stop()
    # The admin side first, while the agents are still heard: a command in flight (a rollout's
    # start, a retry) needs its nodes online and would be refused "offline" if their heartbeat
    # streams ended under it. The calls in flight get their answers, and a command whose
    # caller went away runs on (``runs_to_end``), not past the stores' close.
    await admin.stop(GRACE_SECONDS)
    await relay.stop()
    await admin_service.finish_carried_on(GRACE_SECONDS)
    leader_service.close_streams()  # else the graceful stop waits out its grace for them
    await asyncio.gather(join.stop(TAIL_GRACE_SECONDS), control.stop(TAIL_GRACE_SECONDS))
    for task in (engine_task, expiry_task):
        await asyncio.wait([task])
        if not died and (task.cancelled() or task.exception() is not None):
            died = f"the {task.get_name()} loop ended: {ended_why(task)}"
            log.error("leader.loop_died", detail=died)
    # What waits for the heartbeats' group commit (up to a batch period of news, up to
    # ``service.REFRESH_SECONDS`` of refreshes) is kept at a stop.
    try:
        await leader_service.write_queued()
    except Exception as exc:  # soft state: the agents report it again after the restart
        log.error(
            "heartbeat.batch_failed",
            error=f"{type(exc).__name__}: {exc}"[:200],
            hint="heartbeats are soft state and come again; if it repeats, check the disk under "
            "the leader's data dir (df -h)",
        )
    schema.close()
    state.store.close()
    log.info("leader.stopped")
    if died:
        raise LoopDied(f"{died}; the leader stopped so that it is started again")


def main(argv: list[str] | None = None) -> int:
    """The daemon: its command line and config read and its data dir checked first
    (``leader.front``, which ``tlsroll-leader`` runs before it imports this module), then a
    recovery or the leader."""
    started = front.start(argv)
    if isinstance(started, int):
        return started
    return run(*started)


def run(ns: argparse.Namespace, cfg: LeaderConfig) -> int:
    """The leader of ``front.start``'s command line and config, to its exit code."""
    try:
        logs.configure(level=logs.level_of(ns.log_level or cfg.log_level))
        log.debug(
            "leader.config_loaded", config=str(ns.config), log_level=ns.log_level or cfg.log_level
        )
        if ns.reinitialise:
            print(f"tlsroll-leader: {reinitialise(cfg)}")
            return 0
        if ns.repin_ca is not None:
            confirm = (ns.repin_ca[0], ns.repin_ca[1]) if ns.repin_ca else None
            print(f"tlsroll-leader: {repin_ca(cfg, confirm, config=ns.config)}")
            return 0
        state = load_state(cfg, config=ns.config)
        asyncio.run(serve(cfg, state))
    except Exception as exc:
        return refused(exc, ns, cfg)
    return 0


def refused(failure: Exception, ns: argparse.Namespace, cfg: LeaderConfig | None) -> int:
    """The exit code of a start or a run that failed with ``failure``, its line said (``cfg``:
    None while it was being loaded)."""
    try:
        raise failure
    except SchemaTooNew as exc:
        daemon.say("tlsroll-leader", exc)
        return EXIT_STORE_TOO_NEW
    except TlsrollError as exc:
        daemon.say("tlsroll-leader", exc)
        if needs_a_person(exc):
            return EXIT_STORE_DAMAGED
        # NotRegularFile: a file to read (a key) is a directory or a FIFO, for a person to fix
        return EXIT_CONFIG if isinstance(exc, ConfigError | NotDamaged | NotRegularFile) else 1
    except OSError as exc:
        daemon.say("tlsroll-leader", f"{os_error_text(exc)}")
        return 1
    except sqlite3.Error as exc:
        where = cfg.layout.store if cfg is not None else ns.config
        daemon.say("tlsroll-leader", f"store {where}: {exc}")
        return EXIT_STORE_DAMAGED if needs_a_person(exc) else 1
    except Exception as exc:  # one line, never a traceback (review s48rev3 M1)
        return daemon.internal_error("tlsroll-leader", exc, debug=ns.log_level == "debug")


def backup_command(config: Path, dest: Path) -> int:
    """``--backup DIR`` (``leader.backup``): one line on failure, nothing left half-made."""
    from leader import backup  # noqa: PLC0415 - only for this command
    from tlsroll.errors import os_error_text  # noqa: PLC0415

    try:
        cfg = LeaderConfig.load(config)
        manifest = backup.make_backup(config, cfg.layout, dest)
    except TlsrollError as exc:
        daemon.say("tlsroll-leader", exc)
        return EXIT_CONFIG if isinstance(exc, ConfigError | backup.BadDestination) else 1
    except OSError as exc:
        daemon.say("tlsroll-leader", f"backup: {os_error_text(exc)}")
        return 1
    print(backup.summary(dest, manifest, token=cfg.metrics_token_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
