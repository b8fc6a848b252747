"""Read-only grants for the web viewer: one-time login links and the browser sessions they open.

    grants = Grants(store.db)
    made = grants.create("Dr. Huber", ttl=dt.timedelta(hours=8), now=now, actor="admin:root")
    made.secret                                  # goes into the login link, shown once
    grant = grants.check(made.secret, now)       # a look: spends nothing, writes nothing
    grant, session_id = grants.login(made.secret, now)  # spends it: LoginRefused the next time
    grant = grants.session(session_id, now)      # the grant behind a browser's cookie, or None
    grants.revoke(grant.id, now=now, actor="admin:root")
    grants.sign_out(session_id, now)             # the browser's own sign-out: ends the grant

A grant is single use: its first login binds it to one browser session (the cookie), which
ends when the grant expires or is revoked, or when that browser signs out: the session is
the grant's only one and its link is spent, so signing out ends the grant (its
``revoked_at``; the audit says ``viewer_grant.signed_out``, which tells it from a revoked one:
``GrantState.SIGNED_OUT``, as `viewer list` shows it, and the viewer, to its link opened again
or a copy of its cookie, "signed out": ``LoginRefused("signed_out")``, ``ended``) and coming
back takes a new grant.
The link's secret and the session id have 256 bits from ``secrets``; the table keeps only
their sha256 (a fast hash is enough at that entropy, as for join tokens), and neither is ever
logged. Every change writes an audit event in the same transaction. Clocks are passed in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import sqlite3
from dataclasses import dataclass

from leader.db import LeaderStore
from leader.states import GrantState
from leader.store import NotFound
from leader.tokens import ID_ALPHABET, ID_LEN
from tlsroll import peertext
from tlsroll.echo import hide_inside, shown
from tlsroll.errors import TerminalError
from tlsroll.sqlite import from_text, to_text

SECRET_BYTES = 32  # 256 bits, for the link's secret and for the session id
MAX_TTL = dt.timedelta(days=7)
MAX_NAME = 100
# A grant's row and whether its browser signed it out (``Grant.signed_out``): the audit says
# so (the sign-out ends only an active grant, so it came before any `viewer revoke` of it,
# which then writes nothing: ``Grants.revoke``). Asked of the audit for a revoked grant only
# (the CASE: a valid session's look never reads it), the IN's list made once a statement,
# through the audit's index of sign-outs (store schema 20, ``leader.db._V20``: the literal
# kind is what lets SQLite use it), not a scan of the audit. Not a column of its own: a leader
# before it would write none (and an older one on the file still says revoked).
_SELECT = (
    "SELECT *, CASE WHEN revoked_at IS NULL THEN 0 ELSE id IN (SELECT subject FROM audit"
    " WHERE kind = 'viewer_grant.signed_out') END AS signed_out FROM viewer_grants"
)
# A grant's row where only whether it is active matters (a session's look at each request,
# the sign-out): no audit scan for a revoked or signed-out grant's cookie (closing review of
# s68: each request with one scanned it, and its 401's reason once more).
_ROW = "SELECT *, 0 AS signed_out FROM viewer_grants"


class LoginRefused(TerminalError):
    """A login link cannot be used; ``reason`` is a GrantState-like word the page explains."""

    def __init__(self, reason: str, grant_id: str = "") -> None:
        super().__init__(f"viewer login refused: {reason}")
        self.reason = reason
        # The link's grant, for one already used ("used"): the browser that holds its
        # session is sent to the schema (``ViewerApp``), anyone else gets the 401 page.
        self.grant_id = grant_id


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Grant:
    id: str
    name: str
    created_at: dt.datetime
    expires_at: dt.datetime
    created_by: str
    used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    signed_out: bool = False  # ended by its browser's sign-out (``revoked_at`` is its time)

    def state(self, now: dt.datetime) -> GrantState:
        if self.revoked_at is not None:
            return GrantState.SIGNED_OUT if self.signed_out else GrantState.REVOKED
        if now >= self.expires_at:
            return GrantState.EXPIRED
        return GrantState.ACTIVE if self.used_at is not None else GrantState.UNUSED


@dataclass(frozen=True)
class NewGrant:
    grant: Grant
    secret: str  # for the login link; shown once

    def __repr__(self) -> str:  # never show the secret by accident
        return f"NewGrant(grant={self.grant!r}, secret=<hidden>)"


class Grants(LeaderStore):
    """The viewer's one-time links and their sessions (only hashes are kept)."""

    def create(self, name: str, *, ttl: dt.timedelta, now: dt.datetime, actor: str) -> NewGrant:
        if not dt.timedelta(seconds=1) <= ttl <= MAX_TTL:
            raise ValueError(f"a viewer grant lives 1 s to {MAX_TTL.days} days")
        secret = secrets.token_urlsafe(SECRET_BYTES)
        name = peertext.clean(name, MAX_NAME).strip()  # shown on terminals and in logs
        with self._db.tx() as db:
            while True:
                grant_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LEN))
                if db.execute("SELECT 1 FROM viewer_grants WHERE id = ?", (grant_id,)).fetchone():
                    continue
                break
            db.execute(
                "INSERT INTO viewer_grants (id, name, secret_hash, created_at, expires_at,"
                " created_by) VALUES (?, ?, ?, ?, ?, ?)",
                (grant_id, name, digest(secret), to_text(now), to_text(now + ttl), actor),
            )
            self._audit(
                db,
                now,
                actor,
                "viewer_grant.created",
                grant_id,
                name=name,
                expires_at=to_text(now + ttl),
            )
        return NewGrant(self.get(grant_id), secret)

    def get(self, grant_id: str) -> Grant:
        with self._db.read() as db:
            row = db.execute(f"{_SELECT} WHERE id = ?", (grant_id,)).fetchone()
        if row is None:
            raise NotFound(f"no viewer grant with id {shown(grant_id)} (see: tlsroll viewer list)")
        return _grant(row)

    def all(self) -> list[Grant]:
        with self._db.read() as db:
            rows = db.execute(f"{_SELECT} ORDER BY created_at, rowid").fetchall()
        return [_grant(r) for r in rows]

    def revoke(self, grant_id: str, *, now: dt.datetime, actor: str) -> Grant:
        """Revoke the grant (again, for one revoked before: audited again, its first time
        kept). One its browser signed out had already ended: returned as it is, nothing
        written (``Grant.signed_out``: the caller says so; session 68)."""
        with self._db.tx() as db:
            row = db.execute(f"{_SELECT} WHERE id = ?", (grant_id,)).fetchone()
            if row is not None and (grant := _grant(row)).signed_out:
                return grant
            cur = db.execute(
                "UPDATE viewer_grants SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (to_text(now), grant_id),
            )
            if cur.rowcount == 0:
                raise NotFound(
                    f"no viewer grant with id {shown(grant_id)} (see: tlsroll viewer list)"
                )
            self._audit(db, now, actor, "viewer_grant.revoked", grant_id)
        return self.get(grant_id)

    def sign_out(self, session_id: str, now: dt.datetime) -> Grant | None:
        """End the session with this id, by the browser that holds it: its grant is revoked
        (a copy of the cookie stops working too; the live streams see it at their next look,
        as after ``revoke``). None, and nothing written, if the session is not valid (unknown,
        ended before). A grant binds one session and its link works once: nothing could sign
        in with it again, so there is nothing else to keep."""
        if not session_id:
            return None
        with self._db.read() as db:  # (a stale cookie takes no write lock)
            known = db.execute(
                "SELECT 1 FROM viewer_grants WHERE session_hash = ? AND revoked_at IS NULL",
                (digest(session_id),),
            ).fetchone()
        if known is None:
            return None
        with self._db.tx() as db:
            row = db.execute(f"{_ROW} WHERE session_hash = ?", (digest(session_id),)).fetchone()
            if row is None or _grant(row).state(now) is not GrantState.ACTIVE:
                return None
            grant = _grant(row)
            db.execute(
                "UPDATE viewer_grants SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (to_text(now), grant.id),
            )
            self._audit(db, now, f"viewer:{grant.id}", "viewer_grant.signed_out", grant.id)
        return self.get(grant.id)

    def check(self, secret: str, now: dt.datetime) -> Grant:
        """The unused grant behind this link, by a plain read that spends and writes nothing
        (the sign-in page a link preview also fetches). LoginRefused as ``login`` would."""
        with self._db.read() as db:
            row = db.execute(f"{_SELECT} WHERE secret_hash = ?", (digest(secret),)).fetchone()
            if row is None:
                raise LoginRefused("unknown")
            grant = _grant(row)
            _refuse_unless_unused(grant, now)
        return grant

    def login(self, secret: str, now: dt.datetime) -> tuple[Grant, str]:
        """Spend the link with this secret: the grant and a new session id (for the cookie).
        LoginRefused (unknown, used, expired, revoked, signed_out) if it cannot be used."""
        session_id = secrets.token_urlsafe(SECRET_BYTES)
        # Strangers can send any link: a plain read turns them away without taking the write
        # lock the rollout engine shares; only a link that exists opens the transaction.
        with self._db.read() as db:
            known = db.execute(
                "SELECT 1 FROM viewer_grants WHERE secret_hash = ?", (digest(secret),)
            ).fetchone()
        if known is None:
            raise LoginRefused("unknown")
        with self._db.tx() as db:
            row = db.execute(f"{_SELECT} WHERE secret_hash = ?", (digest(secret),)).fetchone()
            if row is None:
                raise LoginRefused("unknown")
            grant = _grant(row)
            _refuse_unless_unused(grant, now)
            db.execute(
                "UPDATE viewer_grants SET used_at = ?, session_hash = ? WHERE id = ?",
                (to_text(now), digest(session_id), grant.id),
            )
            self._audit(db, now, f"viewer:{grant.id}", "viewer_grant.used", grant.id)
        return self.get(grant.id), session_id

    def ended(self, session_id: str) -> str:
        """Why a session id is not valid (``session`` said None), as the 401 page's reason:
        ``signed_out`` if its browser signed it out, else ``session`` (unknown, expired,
        revoked by the admin)."""
        with self._db.read() as db:
            row = db.execute(f"{_SELECT} WHERE session_hash = ?", (digest(session_id),)).fetchone()
        if row is not None and _grant(row).signed_out:
            return "signed_out"
        return "session"

    def session(self, session_id: str, now: dt.datetime) -> Grant | None:
        """The grant a session id belongs to, if the session is still valid."""
        if not session_id:
            return None
        with self._db.read() as db:
            row = db.execute(f"{_ROW} WHERE session_hash = ?", (digest(session_id),)).fetchone()
        if row is None:
            return None
        grant = _grant(row)
        return grant if grant.state(now) is GrantState.ACTIVE else None


def _refuse_unless_unused(grant: Grant, now: dt.datetime) -> None:
    state = grant.state(now)
    if state is GrantState.ACTIVE:
        raise LoginRefused("used", grant.id)
    if state is not GrantState.UNUSED:
        raise LoginRefused(state.value)  # signed_out, not "revoked": the person signed out


def _grant(row: sqlite3.Row) -> Grant:
    return Grant(
        id=row["id"],
        name=hide_inside(row["name"]),
        created_at=dt.datetime.fromisoformat(row["created_at"]),
        expires_at=dt.datetime.fromisoformat(row["expires_at"]),
        created_by=row["created_by"],
        used_at=from_text(row["used_at"]),
        revoked_at=from_text(row["revoked_at"]),
        signed_out=bool(row["signed_out"]),
    )
