"""The leader's one SQLite file (``leader.sqlite3``): its schema migrations, and how to open it.

The stores of the leader live in this file: ``leader.store.Store`` (nodes, tokens),
``leader.schema_store.SchemaStore`` (rollouts and their nodes, auth password versions, failed
bootstrap passwords) and
``leader.viewer.grants.Grants`` (the web viewer's read-only grants); they share the ``audit``
table. So the file has one migration list, here, and is opened once: the
daemon's ``SchemaStore`` uses the ``Database`` of its ``Store``.

To change the schema, append a migration to ``MIGRATIONS`` (see ``tlsroll.sqlite``); never edit
one that was released.

Lost state is loud: once the leader has made the file it leaves ``leader.sqlite3.created``
beside it (``mark_store``), and ``check_store`` refuses a store that is then missing, or one
that is empty (0 bytes) or damaged, with one line saying how to recover (restore it from a
backup), or run ``tlsroll-leader --reinitialise`` once, which only replaces the store and
exits (``leader.runtime.reinitialise``): the lost file is moved aside, and the new
store's first transaction opens the window in which it re-learns the nodes from their agents
(``leader.store.relearning``). A first start killed before its first commit leaves a file of 0
bytes and no mark: that one is new (``tlsroll.sqlite.damage``). A store that cannot be read
now for a reason outside it (a full disk, a read-only file system) is not lost:
``tlsroll.sqlite.StoreUnavailable``, whose line says so and never advises ``--reinitialise``,
which refuses it (``tlsroll.sqlite.NotDamaged``, exit 2) and moves nothing aside.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlsroll.fsutil import PRIVATE, write_atomic
from tlsroll.sqlite import (
    Database,
    Migration,
    NotDamaged,
    StoreDamaged,
    StoreUnavailable,
    damage,
    move_aside,
    statements,
    to_text,
)

# Migration 1: the tables of tlsroll 0.1.0, whose Store set user_version=1 (nodes, tokens,
# audit) and whose SchemaStore added its tables unversioned on every open.
_V1 = """
CREATE TABLE IF NOT EXISTS nodes (
    name             TEXT PRIMARY KEY,
    addresses        TEXT NOT NULL,      -- JSON list of IPs
    dns_names        TEXT NOT NULL,      -- JSON list
    agent_version    TEXT NOT NULL,
    agent_port       INTEGER NOT NULL,
    key_pin          TEXT NOT NULL,      -- sha256 SPKI of the node's key: its identity
    cert_fingerprint TEXT NOT NULL,
    cert_serial      TEXT NOT NULL,
    cert_not_after   TEXT NOT NULL,
    enrolled_at      TEXT NOT NULL,
    last_heartbeat   TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    id           TEXT PRIMARY KEY,
    secret_hash  TEXT NOT NULL,          -- sha256 of the secret; the secret itself is not kept
    description  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    uses_allowed INTEGER NOT NULL,
    uses_left    INTEGER NOT NULL,
    revoked_at   TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail  TEXT NOT NULL                -- JSON; never holds a secret
);
CREATE TABLE IF NOT EXISTS rollouts (
    id             TEXT PRIMARY KEY,
    change         TEXT NOT NULL,
    scope_kind     TEXT NOT NULL,
    scope_names    TEXT NOT NULL,
    node_order     TEXT NOT NULL,
    strategy       TEXT NOT NULL,
    max_parallel   INTEGER NOT NULL,
    failure_budget INTEGER NOT NULL,
    freeze         TEXT NOT NULL,
    epoch          INTEGER NOT NULL UNIQUE,
    state          TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    started_at     TEXT,
    ended_at       TEXT,
    started_by     TEXT NOT NULL,
    leader_node    TEXT NOT NULL,
    reason         TEXT NOT NULL DEFAULT '',
    auth_version   INTEGER NOT NULL DEFAULT 0,  -- the auth password this rollout applies
    undoes         TEXT NOT NULL DEFAULT ''     -- disable-tls: the rollout it takes back
);
CREATE TABLE IF NOT EXISTS auth_versions (
    version    INTEGER PRIMARY KEY,
    verifier   TEXT NOT NULL,                    -- scrypt verifier JSON, never the password
    created_at TEXT NOT NULL,
    actor      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS node_auth (
    name       TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,                 -- the auth password live on the node
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_nodes (
    rollout_id        TEXT NOT NULL REFERENCES rollouts(id),
    name              TEXT NOT NULL,
    state             TEXT NOT NULL,
    reason            TEXT NOT NULL DEFAULT '',
    scope_frozen      INTEGER NOT NULL DEFAULT 0,
    old_url           TEXT NOT NULL DEFAULT '',
    new_url           TEXT NOT NULL DEFAULT '',
    cert_fingerprint  TEXT NOT NULL DEFAULT '',
    cert_not_after    TEXT,
    freeze_started_at TEXT,
    freeze_ended_at   TEXT,
    restart_seconds   REAL NOT NULL DEFAULT 0,
    bootstrap_port    INTEGER NOT NULL DEFAULT 0,
    steps             TEXT NOT NULL DEFAULT '{}',  -- step -> [started_at, ended_at]
    PRIMARY KEY (rollout_id, name)
);
"""

# Migration 2: a node whose way back failed is in a state of its own (``needs_attention``);
# 0.1.0 recorded it as ``rolled_back`` with the words in its reason.
_V2 = """
UPDATE rollout_nodes SET state = 'needs_attention'
 WHERE state = 'rolled_back'
   AND (reason LIKE '%ROLLBACK FAILED%' OR reason LIKE 'NEEDS ATTENTION:%');
"""

# Migration 3: read-only grants for the web viewer (``leader.viewer.grants``). A grant is a
# one-time login link; opening it binds one browser session to the grant. Only hashes of the
# link's secret and of the session id are kept.
_V3 = """
CREATE TABLE viewer_grants (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL UNIQUE,   -- sha256 of the login link's secret
    session_hash TEXT UNIQUE,            -- sha256 of the session id; set once, at login
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,          -- the link and the session end then
    created_by   TEXT NOT NULL,
    used_at      TEXT,
    revoked_at   TEXT
);
"""

# Migration 4: failed passwords at the nodes' bootstrap services, per node and source address
# (``SchemaStore.record_bootstrap_failures``; the agents report them with their heartbeats).
_V4 = """
CREATE TABLE bootstrap_failures (
    node        TEXT NOT NULL,
    source      TEXT NOT NULL,           -- IPv4 address or IPv6 /64, as the agent counted it
    workstation TEXT NOT NULL,           -- the name it last claimed (cleaned, bounded)
    count       INTEGER NOT NULL,
    first_at    TEXT NOT NULL,
    last_at     TEXT NOT NULL,
    PRIMARY KEY (node, source)
);
CREATE INDEX bootstrap_failures_last ON bootstrap_failures (last_at);
"""

# Migration 5: identities (issue 9). A join token names the one node it can enrol and that
# node's addresses and DNS names (a token from before has none and is refused); every
# certificate the CA issues is recorded, so that it can be listed and revoked; a node can be
# removed (its names freed, its certificates revoked); ``meta`` keeps the revocation list's
# number and the epoch floor set by ``tlsroll epoch advance``.
_V5 = """
ALTER TABLE tokens ADD COLUMN node_name TEXT;          -- NULL: a token of 0.1.0, refused
ALTER TABLE tokens ADD COLUMN addresses TEXT NOT NULL DEFAULT '[]';
ALTER TABLE tokens ADD COLUMN dns_names TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN token_id TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN removed_at TEXT;
ALTER TABLE nodes ADD COLUMN highest_epoch INTEGER NOT NULL DEFAULT 0;
CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,      -- hex
    kind          TEXT NOT NULL,         -- node | server | workstation | leader | other
    subject       TEXT NOT NULL,         -- the node's or workstation's name
    node          TEXT NOT NULL,         -- the node it was issued to or for
    fingerprint   TEXT NOT NULL,
    issued_at     TEXT NOT NULL,
    not_after     TEXT NOT NULL,
    revoked_at    TEXT,
    revoke_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX certificates_subject ON certificates (kind, subject);
CREATE INDEX certificates_node ON certificates (node);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Migration 6: agents renew their own certificates (issue 11). The certificate before the
# current one is accepted from its agent until the agent has used the new one (a renewal whose
# answer was lost can be asked again, and the switch-over is never a moment without an
# accepted certificate); the agent reports when it means to renew and, while renewing fails,
# since when and why.
_V6 = """
ALTER TABLE nodes ADD COLUMN prev_cert_fingerprint TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN cert_renewed_at TEXT;
ALTER TABLE nodes ADD COLUMN renewal_due_at TEXT;
ALTER TABLE nodes ADD COLUMN renewal_failing_since TEXT;
ALTER TABLE nodes ADD COLUMN renewal_error TEXT NOT NULL DEFAULT '';
"""

# Migration 7: the transitional strategy (issue 12). A finalize rollout names the transitional
# rollout whose phase 2 it is, and may wait for quiet nodes; the leader keeps, per node, who
# its managed server saw on which scheme (what its agent reported, at most 256 rows a node,
# merged from each report, aged out past the agent's window) and when http was last used there.
_V7 = """
ALTER TABLE rollouts ADD COLUMN finalizes TEXT NOT NULL DEFAULT '';
ALTER TABLE rollouts ADD COLUMN when_quiet INTEGER NOT NULL DEFAULT 0;
CREATE TABLE node_clients (
    node        TEXT NOT NULL,
    scheme      TEXT NOT NULL,               -- http | https
    address     TEXT NOT NULL,
    workstation TEXT NOT NULL,
    first_seen  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    requests    INTEGER NOT NULL,
    PRIMARY KEY (node, scheme, address, workstation)
);
CREATE TABLE node_clients_info (
    node           TEXT PRIMARY KEY,
    window_seconds INTEGER NOT NULL,
    source         TEXT NOT NULL,            -- refserver | exec | access-log | ''
    problem        TEXT NOT NULL,
    first_report   TEXT NOT NULL,
    reported_at    TEXT NOT NULL,
    last_http_at   TEXT
);
"""

# Migration 8: a scope FREEZE is recorded as asked (persisted before it is sent) until its
# answer is recorded: a settled rollout unfreezes a node its leader froze and died before
# recording it (audit s33 L1).
_V8 = """
ALTER TABLE rollout_nodes ADD COLUMN freeze_asked INTEGER NOT NULL DEFAULT 0;
"""

# Migration 9: a node's freeze window's length as its agent measured it in elapsed time (clock
# audit s35 J): the window's two times are on the node's wall clock, which may step between
# them. NULL: not sent (an older agent, a reboot during the freeze, a scope freeze), or a row
# of an earlier release; the times' difference is then the length, never below 0.
_V9 = """
ALTER TABLE rollout_nodes ADD COLUMN freeze_seconds REAL;
"""

# Migration 10: the certificates' record order, the hourly caps and the rollouts, none of them
# by the wall clock (clock audit s35, F and J; session 36). ``seq``: the order the certificates
# were recorded in, an INTEGER PRIMARY KEY: the implicit rowid it replaces "is not persistent
# and might change" (SQLite, "Rowid Tables"; "The VACUUM command may change the ROWIDs of
# entries in any tables that do not have an explicit INTEGER PRIMARY KEY", lang_vacuum), and
# ``NAME.before-vN`` is a ``VACUUM INTO`` copy; the column keeps the rowid each had, so the
# order is the one the file recorded. ``counted_at``: when the hourly caps count the
# certificate as issued, on the leader's elapsed-time clock (``Store.cap_now``); those before
# counted by their issue time, as they were, but none later than the upgrade (``_v10``).
# ``rollout_id``: the rollout that recorded it (a preflight's or a stage's server
# certificate), so that "never delivered" picks a rollout's own (``revoke_undelivered_in``)
# and not what was issued in its span by the clock; those before belong to none, but a server
# certificate issued since a rollout not ended began, of a node of it, is taken for that
# rollout's (what the span picked until now). A table is rebuilt to change its key (SQLite
# cannot ALTER it); nothing refers to it.
_V10 = """
CREATE TABLE certificates_v10 (
    seq           INTEGER PRIMARY KEY,   -- the order they were recorded in
    serial        TEXT NOT NULL UNIQUE,  -- hex
    kind          TEXT NOT NULL,         -- node | server | workstation | leader | other
    subject       TEXT NOT NULL,         -- the node's or workstation's name
    node          TEXT NOT NULL,         -- the node it was issued to or for
    fingerprint   TEXT NOT NULL,
    issued_at     TEXT NOT NULL,
    not_after     TEXT NOT NULL,
    revoked_at    TEXT,
    revoke_reason TEXT NOT NULL DEFAULT '',
    counted_at    TEXT,                  -- NULL: no hourly cap counts it
    rollout_id    TEXT NOT NULL DEFAULT ''  -- '': no rollout's
);
INSERT INTO certificates_v10 (seq, serial, kind, subject, node, fingerprint, issued_at,
    not_after, revoked_at, revoke_reason, counted_at)
  SELECT rowid, serial, kind, subject, node, fingerprint, issued_at, not_after, revoked_at,
    revoke_reason, CASE WHEN kind IN ('node', 'workstation') THEN issued_at END
  FROM certificates ORDER BY rowid;
DROP TABLE certificates;
ALTER TABLE certificates_v10 RENAME TO certificates;
CREATE INDEX certificates_subject ON certificates (kind, subject);
CREATE INDEX certificates_node ON certificates (node);
UPDATE certificates SET rollout_id = COALESCE((
    SELECT r.id FROM rollouts r JOIN rollout_nodes n ON n.rollout_id = r.id
     WHERE n.name = certificates.node
       AND r.state NOT IN ('completed', 'halted', 'aborted')
       AND certificates.issued_at >= COALESCE(r.started_at, r.created_at)
     ORDER BY r.epoch DESC LIMIT 1), '')
 WHERE kind = 'server'
   AND node IN (
    SELECT n.name FROM rollouts r JOIN rollout_nodes n ON n.rollout_id = r.id
     WHERE r.state NOT IN ('completed', 'halted', 'aborted'))
   AND issued_at >= (
    SELECT MIN(COALESCE(started_at, created_at)) FROM rollouts
     WHERE state NOT IN ('completed', 'halted', 'aborted'));
"""
# (The last two conditions pick no other certificate than the subquery would, and only those
# can cost it a walk through the rollouts: without them, a file of many ended rollouts took
# the product of its server certificates and its rollouts, tens of seconds at the leader's
# start, beyond systemd's start timeout (review s36 F1). With no rollout live, none.)


def _v10(conn: sqlite3.Connection) -> None:
    """Migration 10: ``_V10``, and no ``counted_at`` later than the time it runs. A
    certificate issued while the leader's clock was ahead, still "later" than now at the
    upgrade, would otherwise be the latest one the caps counted, and ``Store._count_from``
    would move every other back by its lead: the hour's real certificates out of the caps
    (review s36 F5). It counts as issued now instead."""
    for statement in statements(_V10):
        conn.execute(statement)
    now = to_text(dt.datetime.now(dt.UTC))
    conn.execute("UPDATE certificates SET counted_at = ? WHERE counted_at > ?", (now, now))


# Migration 11: what each node's agent implements of the behaviour the leader's requests carry
# (``tlsroll.features``), as its heartbeats say, beside its version: a rollout that needs a
# feature is blocked on a node whose agent lacks it, and no request carrying it is sent there.
# '[]': none reported (an agent of an earlier release, or not heard since the upgrade), which
# the leader takes for an agent that lacks every feature.
_V11 = """
ALTER TABLE nodes ADD COLUMN agent_features TEXT NOT NULL DEFAULT '[]';  -- JSON list, sorted
"""

# Migration 12: a join token is superseded by its node's enrolment (race audit of session 39,
# L2: a token made before the node enrolled by another one stayed valid). ``superseded_at``:
# when an enrolment (or a re-learning) of its node made it unusable; NULL: not superseded. A
# token of an enrolled node that could still enrol it and was made before (or at) the node's
# enrolment is superseded at that enrolment's time; a removed node's were revoked by the
# removal. Not one an older leader may ignore (``IGNORABLE``): it writes rows, and an older
# leader would enrol by a superseded token, and supersede none by its enrolments.
_V12 = """
ALTER TABLE tokens ADD COLUMN superseded_at TEXT;
UPDATE tokens SET superseded_at = (
    SELECT n.enrolled_at FROM nodes n WHERE n.name = tokens.node_name AND n.removed_at IS NULL)
 WHERE uses_left > 0 AND revoked_at IS NULL
   AND EXISTS (
    SELECT 1 FROM nodes n WHERE n.name = tokens.node_name AND n.removed_at IS NULL
       AND n.enrolled_at >= tokens.created_at);
"""
# (Both times are ``to_text``'s ISO 8601 in UTC, which sort as text: a time without
# microseconds, "…:00+00:00", sorts before one of the same second with them, "…:00.5+00:00".)

# Migration 13: what superseded a join token (``superseded_how``) read through an index, not
# by a scan of the audit (session 45). The audit is never pruned (a year of a fleet: hundreds of
# thousands of rows) and had no index for its ``node.relearned`` rows of a node: each refusal of
# a superseded token whose secret was right, and each ``token list``, scanned all of it. A
# partial index: only the re-learnings are in it (one a node re-learned after a restore or a
# --reinitialise), so the audit's other writes cost nothing more than SQLite's test of its
# WHERE. SQLite uses it only for a query whose WHERE holds ``kind = 'node.relearned'`` as
# written here (a literal, not a bound parameter: SQLite, "Partial Indexes", 3). Not a
# ``superseded_by`` column written where a token is superseded: that migration would fill it
# from the audit (rows written, so an older leader would refuse the file, and one that
# ran on it would supersede tokens without it), two records of one fact. This one writes no
# row and SQLite keeps the index on an older leader's writes too: one an older leader may
# ignore (``IGNORABLE``).
_V13 = """
CREATE INDEX audit_relearned ON audit (subject, at) WHERE kind = 'node.relearned';
"""

# Migration 14: the nodes a retry or a way back of a named rollout left out as removed since
# (`tlsroll nodes remove`: no longer enrolled, so the new rollout cannot take them; s50retry),
# stored with the new rollout in the transaction that creates it (review rev50f L4: only the
# log and the CLI's output named them). A JSON list of names; NULL: none (every rollout before,
# and those that left none out). Not node records (``rollout_nodes``): a rollout's records are
# the nodes it holds and steps, each enrolled (``SchemaStore.create`` refuses a removed one),
# and a removed node is neither. A column that is NULL by default: an older leader may ignore
# it (``IGNORABLE``); the rollouts it creates leave none out.
_V14 = """
ALTER TABLE rollouts ADD COLUMN removed_since TEXT;  -- JSON list of names; NULL: none
"""

# Migration 15: whether a node's agent certificate has carried its names apart from the SAN
# (``tlsroll.pki.NAMES_OID``; review rev58b H2). Set when a renewal issues such a certificate
# (an upgraded agent asks for it; re-learned from one), never cleared: from then on every
# renewal of the node keeps them apart, whatever the caller asks, so that a copy of the node's
# older key (its names in the SAN, still accepted as the one before) cannot renew back into a
# server certificate for the node's address (review s59 M1). An enrolment sets nothing: its
# certificate has them apart, and a renewal presenting it keeps them so. A column with a
# default: an older leader may ignore it (``IGNORABLE``), and then issues as it did.
_V15 = """
ALTER TABLE nodes ADD COLUMN names_apart INTEGER NOT NULL DEFAULT 0;
"""

# Migration 16: whether a rollout's stored note (``reason``) offers the way back to http
# (``tlsroll rollout rollback``: ``rollout_core.way_out``), as a fact written with the note
# (session 64: the engine read it from the note's last words, ``offers_way_back``, to decide
# whether to make a halt's note again as the halt ends; a change of the words would have kept
# a note offering a way back that `rollout rollback` refuses). Every note this code writes sets
# it, 0 or 1. NULL: not known (a rollout written before it, or a note an older leader wrote,
# which does not know it): the engine then makes the note again if the halt ends with no node
# to take back, as it would for a note that offered it; made from the records, that note is
# right whatever the one before said. No row written here (an older leader may ignore it:
# ``IGNORABLE``); a note such an older leader writes later leaves the column as it was, at
# worst a note made again as its halt ends, or one not made again, as before session 63.
_V16 = """
ALTER TABLE rollouts ADD COLUMN way_back_offered INTEGER;  -- 0, 1; NULL: not known
"""

# Migration 17: each certificate's parent (``issued_from``): the serial (hex) of the certificate
# on whose strength the CA issued it: the one an agent renewed with (``Store.
# renew_node_certificate``: the one presented, on record or the one before it), or the node
# certificate a node's bootstrap service asked with for a workstation's
# (``Store.issue_workstation``), or, for a certificate of a key the node had (an enrolment's
# replay, a node enrolled again with its key on record), that key's certificate on record.
# NULL: none, or not known (an enrolment of a new key, which a join token allows; a node
# re-learned after a restore, whose renewal this store never saw; a
# rollout's server certificate, which the leader issues of its own accord; a certificate
# recorded before this migration, or by an older leader). A revocation that ends a key's trust
# then takes what was issued from it (``leader.store.lineage_in``; review s64 b4 H: a copy of
# an agent key revoked after a backup renewed at the restored leader before the agents' lists
# were learned, and the renewed certificate outlived the learning). No row written (an older
# leader may ignore it: ``IGNORABLE``): the certificates such a leader issues have none, and
# revoking theirs revokes only what it did before. The index is partial (most certificates,
# the servers', have none) and on the plain column, which an older leader's writes keep.
_V17 = """
ALTER TABLE certificates ADD COLUMN issued_from TEXT;  -- serial (hex); NULL: none, not known
CREATE INDEX certificates_issued_from ON certificates (issued_from)
 WHERE issued_from IS NOT NULL;
"""

# Migration 18: the key of each node certificate recorded from now on (its SPKI pin, as
# ``nodes.key_pin``), so that no enrolment takes again a key whose certificate was revoked
# (review rev-enrol H1, session 65: ``Store._key_refused``; the store kept only the key of each
# node's row, and after `nodes remove` a new token enrolled the removed node's key again). ''
# for the other kinds, and for a node certificate recorded before (its key is not known: a
# certificate is not kept, only its fingerprint) or by an older leader. The index is partial:
# only node certificates are looked up by their key (a query with ``kind = 'node'`` as a
# literal). No row written: an older leader may ignore it (``IGNORABLE``). The certificates on
# record get their node rows' keys at the leader's start instead (``Store.stamp_row_keys``; a
# backfill here would write rows, which an ignorable migration must not: ``tlsroll.sqlite.
# migrate`` refuses it), which also fills those an older leader records on the migrated file.
_V18 = """
ALTER TABLE certificates ADD COLUMN key_pin TEXT NOT NULL DEFAULT '';
CREATE INDEX certificates_key_pin ON certificates (key_pin) WHERE kind = 'node';
"""

# Migration 19: the audit's removals by node (`tlsroll nodes remove`), read by every view of
# the certificates nodes serve (``leader.schema_store.removals``; review rvc of s66-misc, M1):
# a rollout's record of what a node served is the removed machine's if the rollout came before
# the name's last removal, and a machine enrolled again under the name serves nothing the
# leader recorded until a rollout switches it. The removal is kept in the audit only (the
# nodes row a new enrolment overwrites), which is never pruned: a partial index, as migration
# 13's, so that the expiry watch, the viewer's read after each write and each /metrics scrape
# do not scan it all. SQLite uses it only for a query whose WHERE holds ``kind =
# 'node.removed'`` as written here (a literal). No row written, and SQLite keeps it on an older
# leader's writes too: one an older leader may ignore (``IGNORABLE``).
_V19 = """
CREATE INDEX audit_removed ON audit (subject) WHERE kind = 'node.removed';
"""

# Migration 20: the audit's sign-outs of viewer grants (``viewer_grant.signed_out``), by which
# `viewer list` and each grant's read tell a grant its browser signed out from one the admin
# revoked (``leader.viewer.grants._SELECT``; session 68): told by the audit, nothing stored in
# the grant's row. Once a grant was revoked, every `viewer list` scanned the whole audit, which
# is never pruned (~0.16 s a million rows): a partial index, as migrations 13 and 19. SQLite
# uses it only for a query whose WHERE holds ``kind = 'viewer_grant.signed_out'`` as written
# here (a literal). No row written, and SQLite keeps it on an older leader's writes too: one an
# older leader may ignore (``IGNORABLE``).
_V20 = """
CREATE INDEX audit_signed_out ON audit (subject) WHERE kind = 'viewer_grant.signed_out';
"""

MIGRATIONS: tuple[Migration, ...] = (
    _V1,  # 0.1.0
    _V2,  # needs_attention
    _V3,  # viewer grants
    _V4,  # bootstrap failures
    _V5,  # bound tokens, certificates, removal, meta
    _V6,  # agent certificate renewal
    _V7,  # transitional strategy: finalize links, clients per scheme
    _V8,  # scope freeze asked
    _V9,  # a freeze window's length in elapsed time
    _v10,  # certificates: record order, hourly caps' clock, their rollout
    _V11,  # the features each node's agent implements
    _V12,  # a token superseded by its node's enrolment
    _V13,  # the audit's re-learnings by node: what superseded a token
    _V14,  # the nodes a retry or way back left out, removed since
    _V15,  # a node's certificates keep its names apart from the SAN
    _V16,  # whether a rollout's note offers the way back to http
    _V17,  # each certificate's parent: what it was issued on the strength of
    _V18,  # the key of each node certificate: a revoked one's key never enrols again
    _V19,  # the audit's removals by node: a removed machine's served certificate is no one's
    _V20,  # the audit's sign-outs of viewer grants: `viewer list` tells them without a scan
)


def _adopt(conn: sqlite3.Connection, found: int) -> None:
    """A file at version 1 may be one of 0.1.0 that lacks SchemaStore's tables (its Store set
    user_version=1 before they were made: a leader that stopped in between, say on a port in
    use). Migration 1 only creates what is missing, so it is applied again there."""
    if found == 1:
        for statement in statements(_V1):
            conn.execute(statement)


CACHE_KIB = 1024
"""The most SQLite's page cache holds for the leader's store (SQLite's default: 2000 KiB). The
cache copies pages that the kernel's page cache holds anyway; what the leader reads again and
again (the nodes, the live rollout) it keeps itself (``Database.cache``, the heartbeat path's
snapshot). Issue 15: at 500 simulated agents the cache was full (1.98 MiB) after a rollout,
0.94 MiB idle before it."""


IGNORABLE: frozenset[int] = frozenset({13, 14, 15, 16, 17, 18, 19, 20})
"""The migrations (numbered from 1) a leader without them may ignore as it reads and writes the
file (``tlsroll.sqlite.migrate``): a new table, columns that are NULL or have a default, or an
index that is not unique on plain columns (no COLLATE, expression or function), and this code
copes with rows an older leader wrote without them. Only builds from session 40 on read the
floor this makes, so the migrations before are not listed: every one of them is needed by the
builds that read it. 13: an index of the audit, which SQLite keeps up to date as an older leader
writes the audit. 14: a column of the rollouts, NULL unless a retry or way back left out nodes
removed since; a rollout an older leader creates has none. 15: a column of the nodes with a
default, which an older leader leaves as it is (it issues certificates as it did). 16: a column
of the rollouts, NULL (not known) where an older leader wrote the rollout or left it. 17: a
column of the certificates, NULL (not known) on those an older leader records, and its index
(partial, on the plain column), which SQLite keeps as that leader writes. 18: a
column of the certificates with a default ('': the key not known, as for every certificate
recorded before it) and a partial index on it, which SQLite keeps as an older leader writes.
19: a partial index of the audit's removals, which SQLite keeps as an older leader writes (its
removals carry no epoch: ``leader.schema_store.removals`` goes by their time then). 20: a
partial index of the audit's sign-outs of viewer grants, which SQLite keeps likewise."""

READS_FLOOR_FROM = 12
"""The lowest schema of ``leader.sqlite3`` that only builds reading ``readable_by`` wrote
(``tlsroll.sqlite.migrate``'s ``reads_floor_from``): that code came in at schema 10 (commit
096a57d, session 40), builds before it wrote schema 10 too, and so did builds of a side
branch merged later (s40feat, 8a27936 and 1bb357d: schema 11 without that code; review rev51a
L2); 12 came after. A file at 12 or above whose pending migrations are all ``IGNORABLE`` is
migrated without a copy (its build reads the migrated file as it is); one below is copied
(``keep_copy``)."""

LOSING = (
    "the nodes enrolled, join tokens, revocations and rollouts since; a node whose agent renewed"
    " its certificate since is re-learned for 24 hours"
)
"""What putting back the copy kept before an upgrade loses (``SchemaTooNew``'s words)."""


def mark_copy(conn: sqlite3.Connection, made_at: dt.datetime) -> None:
    """Into the copy kept before a migration (``tlsroll.sqlite.keep_copy``): ``backup_made_at``,
    the copy's time, as ``leader.backup`` writes into a backup. A leader started on the copy
    put back (README "Downgrading tlsroll") knows that what happened since is not in it
    (``Store.restore_began``): it re-learns the nodes whose agents renewed their certificates
    since, and says so (``store.restored``). Before, it refused them for good (audit s40, H1).
    A copy of a store with no ``meta`` (schema 4 or below) is left as it is: no leader that
    reads it knows the mark. A file that is itself a backup not yet opened keeps its own
    (earlier) time."""
    if conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone():
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('backup_made_at', ?)"
            " ON CONFLICT(key) DO NOTHING",
            (made_at.isoformat(timespec="microseconds"),),
        )
        # A copy no leader has opened yet, as any backup (``claim_copy``).
        conn.execute("DELETE FROM meta WHERE key = ?", (COPY_OPENED,))


def open_db(path: Path, *, created: Callable[[sqlite3.Connection], None] | None = None) -> Database:
    """Open (or create) ``leader.sqlite3``, migrated to the current schema; ``created`` writes a
    new file's first rows in its first transaction (``tlsroll.sqlite.migrate``). A copy kept
    before a migration is marked (``mark_copy``)."""
    return Database(
        path,
        MIGRATIONS,
        adopt=_adopt,
        created=created,
        cache_kib=CACHE_KIB,
        ignorable=IGNORABLE,
        mark=mark_copy,
        losing=LOSING,
        reads_floor_from=READS_FLOOR_FROM,
    )


class StoreLost(StoreDamaged):
    """The leader's store is missing, empty or damaged: the leader does not start on it (exit
    4, not restarted: a person restores it or starts once with ``--reinitialise``)."""


def _created_mark(path: Path) -> Path:
    return path.with_name(path.name + ".created")


def _first_start_mark(path: Path) -> Path:
    """``leader.layout.Layout.first_start``: init's, until the first start made the store."""
    return path.with_name(path.name + ".first-start")


RELEARN_WINDOW = dt.timedelta(hours=24)


def check_store(
    path: Path, *, reinitialise: bool = False, recover: str = "", beside_ca: bool = False
) -> list[Path]:
    """Refuse a lost store (see the module docstring); blocking, before ``open_db``.

    ``reinitialise``: the admin's explicit choice to start an empty store in place of a lost
    one (refused for an intact store): the lost file is moved aside, and the new store
    re-learns the enrolled nodes from their agents' heartbeats for ``RELEARN_WINDOW``
    (``Store.relearn``). Returns what was moved aside. Refused (``NotDamaged``) for a store
    that is intact or only unavailable now (``StoreUnavailable``: a full disk). ``recover``:
    the ``--reinitialise`` command line, quoted, a lost store's message gives
    (``leader.runtime``). ``beside_ca``: the data dir holds a CA (a leader's start): a missing
    store is lost there too unless ``tlsroll init`` left its first start's mark
    (``_first_start_mark``), whatever the ``.created`` mark (a restore that left out the store
    and the mark: session 68)."""
    restored = beside_ca and not _first_start_mark(path).exists()
    try:
        problem = damage(path, expected=restored or _created_mark(path).exists())
    except StoreUnavailable as exc:
        if reinitialise:
            raise NotDamaged(
                f"{exc}; --reinitialise is only for a missing, empty or damaged store:"
                " nothing was moved aside"
            ) from None
        raise
    if problem is None:
        if reinitialise and path.exists():
            raise NotDamaged(
                f"store {path}: intact; --reinitialise is only for a missing, empty or damaged"
                " store: start the leader without it"
            )
        return []
    if not reinitialise:
        begin = recover or "`tlsroll-leader --config CONFIG --reinitialise`"
        if problem == "missing" and not _created_mark(path).exists():
            problem = (
                "missing beside the CA, and no `tlsroll init` left it to a first start (a"
                f" restore that left out {path.name}?)"
            )
        raise StoreLost(
            f"store {path}: {problem}; restore it from a backup with the leader stopped (it holds"
            " the enrolled nodes, join tokens and rollouts), or begin an empty store that"
            f" re-learns the nodes from their agents: run {begin} (it only replaces the"
            " store), then start the leader as before (installed: systemctl start tlsroll-leader)"
        )
    return move_aside(path, ("", "-wal", "-shm"))


def mark_store(path: Path) -> None:
    """Say beside the store that it exists, so that a missing one is known to be lost."""
    mark = _created_mark(path)
    if not mark.exists():
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_atomic(
            mark,
            f"tlsroll-leader made {path.name} here by {stamp}. While this file exists the leader"
            f" does not start without {path.name}: restore it from a backup.\n".encode(),
            PRIVATE,
        )
    _first_start_mark(path).unlink(missing_ok=True)


def foreign_wal(path: Path) -> str | None:
    """What is wrong when the store at ``path`` is a backup's copy no leader has started yet
    (``leader.backup``'s ``backup_made_at``, in the file itself) with a ``-wal`` beside it
    that holds frames: the write-ahead log of the store the copy was put in place of (a
    restore in place, after a crash left it). Whatever opens the file next (the lost-store
    check included) applies it to the copy: pages of two stores mixed, without a word, or
    damaged (session 68, restore review). None: no such thing. Read without the ``-wal``
    (``immutable``), nothing written. A copy a leader's start opened is marked so in the file
    itself first (``claim_copy``, before any ``-wal`` of its own exists): a ``-wal`` beside
    it then is its own (a start killed before its restore's checkpoint, or one a reader held
    back: session 68's closing review), never refused."""
    wal = path.with_name(path.name + "-wal")
    try:
        if not path.is_file() or wal.stat().st_size == 0:
            return None
    except OSError:
        return None
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?immutable=1", uri=True, timeout=1)
    except sqlite3.Error:
        return None
    try:
        rows = dict(
            conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('backup_made_at', ?)", (COPY_OPENED,)
            ).fetchall()
        )
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    if "backup_made_at" not in rows or COPY_OPENED in rows:  # (opened: its -wal is its own)
        return None
    row = (rows["backup_made_at"],)
    return (
        f"{path} is a backup's copy (made {row[0]}) that no leader has started yet, and"
        f" {wal.name} beside it is another store's (the one it was put in place of): SQLite"
        " would apply it to the copy and mix the two; move"
        f" {wal.name} and {path.name}-shm out of {path.parent} (keep them if the store they"
        " belong to is wanted), then start the leader again; nothing was changed"
    )


COPY_OPENED = "copy_opened_at"
"""``meta`` key: a backup's copy a leader's start has opened (``claim_copy``, ``foreign_wal``)."""


def claim_copy(path: Path) -> None:
    """Before a leader's start opens the store at ``path`` (``foreign_wal`` found nothing
    wrong): if it is a backup's copy no leader has opened yet, in rollback-journal mode as
    ``leader.backup`` leaves it, ``COPY_OPENED`` is written into the file itself (not into a
    ``-wal``: none is in use yet). From then on a ``-wal`` beside it is the copy's own, whatever
    became of the restore's checkpoint (``Store.restore_began``: a reader of the store held it
    back, and SQLite says so only in its answer; or the start was killed before it): taken for
    another store's, the leader's next start was refused, and the way out it named dropped
    everything done since the restore. Anything else (no copy, one opened, one in WAL mode,
    a file SQLite cannot read here) is left as it is: the start's own checks say what is
    wrong."""
    try:
        if not path.is_file():
            return
        conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    except (OSError, sqlite3.Error):
        return
    try:
        if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "delete":
            return
        keys = {
            str(r[0])
            for r in conn.execute(
                "SELECT key FROM meta WHERE key IN ('backup_made_at', ?)", (COPY_OPENED,)
            )
        }
        if keys != {"backup_made_at"}:
            return
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
            (COPY_OPENED, dt.datetime.now(dt.UTC).isoformat(timespec="seconds")),
        )
    except sqlite3.Error:
        return
    finally:
        conn.close()


def recorded_ca_pin(path: Path) -> str | None:
    """The pin of the CA the store at ``path`` belongs to (``Store.own_ca_pin``), read without
    opening it for writing (nothing migrated, nothing written), or None: none recorded (a new
    store, a missing one, one of a release before), or none that can be read now (the start
    opens the store and checks it again then: ``Store.own_ca_pin``)."""
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return None
    try:
        if not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone():
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'ca_pin'").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return None if row is None else str(row[0])


class LeaderStore:
    """What every store of the leader's file shares: the database (``Store(store.db)``,
    ``SchemaStore(store.db)``, ``Grants(store.db)`` share one; a path opens one of its own,
    closed by ``close``) and the audit trail, written in the same transaction as the change."""

    def __init__(
        self, db: Database | Path, *, created: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        self._db, self._owns_db = use(db, created=created)
        self.path = self._db.path

    @property
    def db(self) -> Database:
        """The leader's database, for its other stores."""
        return self._db

    def close(self) -> None:
        if self._owns_db:
            self._db.close()

    @staticmethod
    def _audit(
        db: sqlite3.Connection, now: dt.datetime, actor: str, kind: str, subject: str, **detail: Any
    ) -> None:
        db.execute(
            "INSERT INTO audit (at, actor, kind, subject, detail) VALUES (?, ?, ?, ?, ?)",
            (to_text(now), actor, kind, subject, json.dumps(detail, sort_keys=True, default=str)),
        )


def use(
    db: Database | Path, *, created: Callable[[sqlite3.Connection], None] | None = None
) -> tuple[Database, bool]:
    """What a leader store works on: ``db`` itself (shared: its owner closes it), or the file
    at the path ``db``, opened here (the store owns it; ``created`` as for ``open_db``).
    Returns the database and ownership."""
    if isinstance(db, Database):
        if created is not None:
            raise ValueError("created is for a store that opens its file")
        return db, False
    return open_db(db, created=created), True
