"""The leader's durable state in SQLite: enrolled nodes, join tokens, and the audit trail.

One connection, used from one thread at a time (callers in async code go through
``asyncio.to_thread``; a lock serialises them). WAL journal with ``synchronous=FULL``: a
committed transaction survives a power cut. Every change writes an audit event in the same
transaction. Clocks are passed in (``now``), never read here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from leader.db import LeaderStore
from tlsroll.errors import TerminalError
from tlsroll.sqlite import from_text, to_text

T = TypeVar("T")


class TokenRejected(TerminalError):
    """The join token cannot be used; the message is safe to send to the caller."""


class NameTaken(TerminalError):
    pass


class NotFound(TerminalError):
    pass


def hash_secret(secret: str) -> str:
    # The secret has >= 128 bits of entropy, so a fast hash is enough (no dictionary to try).
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Token:
    id: str
    description: str
    created_at: dt.datetime
    expires_at: dt.datetime
    uses_allowed: int
    uses_left: int
    revoked_at: dt.datetime | None


@dataclass(frozen=True)
class Node:
    name: str
    addresses: tuple[str, ...]
    dns_names: tuple[str, ...]
    agent_version: str
    agent_port: int
    key_pin: str
    cert_fingerprint: str
    cert_serial: str
    cert_not_after: dt.datetime
    enrolled_at: dt.datetime
    last_heartbeat: dt.datetime | None


@dataclass(frozen=True)
class NodeCert:
    """What the store records of a certificate issued to a node."""

    key_pin: str
    fingerprint: str
    serial: str
    not_after: dt.datetime


class Store(LeaderStore):
    """Enrolled nodes and join tokens (``leader.db.LeaderStore`` has the shared part)."""

    # --- tokens -------------------------------------------------------------------------------

    def add_token(
        self,
        token_id: str,
        secret: str,
        *,
        ttl: dt.timedelta,
        uses: int,
        description: str,
        now: dt.datetime,
        actor: str,
    ) -> Token:
        with self._db.tx() as db:
            db.execute(
                "INSERT INTO tokens (id, secret_hash, description, created_at, expires_at,"
                " uses_allowed, uses_left) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token_id,
                    hash_secret(secret),
                    description,
                    to_text(now),
                    to_text(now + ttl),
                    uses,
                    uses,
                ),
            )
            self._audit(
                db, now, actor, "token.created", token_id, uses=uses, expires_at=to_text(now + ttl)
            )
        return self.get_token(token_id)

    def get_token(self, token_id: str) -> Token:
        with self._db.read() as db:
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFound(f"no join token with id {token_id!r}")
        return _token(row)

    def list_tokens(self) -> list[Token]:
        with self._db.read() as db:
            rows = db.execute("SELECT * FROM tokens ORDER BY created_at, id").fetchall()
        return [_token(r) for r in rows]

    def revoke_token(self, token_id: str, *, now: dt.datetime, actor: str) -> Token:
        with self._db.tx() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (to_text(now), token_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no join token with id {token_id!r}")
            self._audit(db, now, actor, "token.revoked", token_id)
        return self.get_token(token_id)

    # --- enrolment ----------------------------------------------------------------------------

    def enrol(
        self,
        *,
        token_id: str,
        secret: str,
        name: str,
        addresses: tuple[str, ...],
        dns_names: tuple[str, ...],
        agent_version: str,
        agent_port: int,
        key_pin: str,
        issue: Callable[[], NodeCert],
        now: dt.datetime,
    ) -> NodeCert:
        """Spend one use of a join token and record the node, all in one transaction.

        ``issue`` is called (to sign the certificate) only once the token and the name check
        out; if anything fails, nothing is written.
        """
        with self._db.tx() as db:
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
            # Compare even when the id is unknown, so both cases take the same time.
            expected = row["secret_hash"] if row else hash_secret("x" * 26)
            if not hmac.compare_digest(expected, hash_secret(secret)) or row is None:
                raise TokenRejected("join token not valid")
            token = _token(row)
            if token.revoked_at is not None:
                raise TokenRejected("join token revoked")
            if now >= token.expires_at:
                raise TokenRejected("join token expired")
            if token.uses_left <= 0:
                raise TokenRejected("join token already used up")
            existing = db.execute("SELECT key_pin FROM nodes WHERE name = ?", (name,)).fetchone()
            if existing is not None and existing["key_pin"] != key_pin:
                raise NameTaken(
                    f"node name {name!r} is already enrolled with another key; "
                    "remove the old node first"
                )
            cert = issue()
            db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?", (token_id,))
            db.execute(
                "INSERT INTO nodes (name, addresses, dns_names, agent_version, agent_port,"
                " key_pin, cert_fingerprint, cert_serial, cert_not_after, enrolled_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET addresses=excluded.addresses,"
                " dns_names=excluded.dns_names, agent_version=excluded.agent_version,"
                " agent_port=excluded.agent_port, cert_fingerprint=excluded.cert_fingerprint,"
                " cert_serial=excluded.cert_serial, cert_not_after=excluded.cert_not_after",
                (
                    name,
                    json.dumps(list(addresses)),
                    json.dumps(list(dns_names)),
                    agent_version,
                    agent_port,
                    key_pin,
                    cert.fingerprint,
                    cert.serial,
                    to_text(cert.not_after),
                    to_text(now),
                ),
            )
            self._audit(
                db,
                now,
                f"node:{name}",
                "node.enrolled",
                name,
                token_id=token_id,
                addresses=list(addresses),
                cert_fingerprint=cert.fingerprint,
                reenrolment=existing is not None,
            )
        return cert

    # --- nodes --------------------------------------------------------------------------------

    def list_nodes(self) -> list[Node]:
        with self._db.read() as db:
            rows = db.execute("SELECT * FROM nodes ORDER BY name").fetchall()
        return [_node(r) for r in rows]

    def get_node(self, name: str) -> Node:
        with self._db.read() as db:
            row = db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no enrolled node named {name!r}")
        return _node(row)

    def heartbeat(self, name: str, agent_version: str, *, now: dt.datetime) -> None:
        with self._db.tx() as db:
            db.execute(
                "UPDATE nodes SET last_heartbeat = ?, agent_version = ? WHERE name = ?",
                (to_text(now), agent_version, name),
            )

    # --- audit --------------------------------------------------------------------------------

    def record_event(
        self, kind: str, actor: str, subject: str, now: dt.datetime, **detail: Any
    ) -> None:
        with self._db.tx() as db:
            self._audit(db, now, actor, kind, subject, **detail)


def _token(row: sqlite3.Row) -> Token:
    return Token(
        id=row["id"],
        description=row["description"],
        created_at=dt.datetime.fromisoformat(row["created_at"]),
        expires_at=dt.datetime.fromisoformat(row["expires_at"]),
        uses_allowed=row["uses_allowed"],
        uses_left=row["uses_left"],
        revoked_at=from_text(row["revoked_at"]),
    )


def _node(row: sqlite3.Row) -> Node:
    return Node(
        name=row["name"],
        addresses=tuple(json.loads(row["addresses"])),
        dns_names=tuple(json.loads(row["dns_names"])),
        agent_version=row["agent_version"],
        agent_port=row["agent_port"],
        key_pin=row["key_pin"],
        cert_fingerprint=row["cert_fingerprint"],
        cert_serial=row["cert_serial"],
        cert_not_after=dt.datetime.fromisoformat(row["cert_not_after"]),
        enrolled_at=dt.datetime.fromisoformat(row["enrolled_at"]),
        last_heartbeat=from_text(row["last_heartbeat"]),
    )
