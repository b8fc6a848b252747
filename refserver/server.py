"""tlsroll-refserver: the reference *managed server* of the demo and the tests.

A small real application server: an app path on http (8080) and/or https (8443), a durable
SQLite store of entries, a write freeze, and an auth password check. The node agent's
``reference`` driver rewrites its config, freezes it, restarts it and verifies it.

Public API, under the app path ``APP`` (e.g. ``/praxis_live/``); every answer is JSON:

    GET  APP                 {"app": "praxis_live", "server": "tlsroll-refserver", "version": ...}
    GET  APP health          {"status": "ok", "scheme": "http"|"https", "frozen": bool}
    POST APP entries         JSON object -> 201 {"id": "<uuid hex>", "seq": n}, after the commit;
                             400 bad JSON (strict JSON: no NaN, Infinity or 1e999, no
                             lone surrogate, not nested too deeply; as every body the
                             server reads); 503 + Retry-After while frozen
    GET  APP entries/{id}    200 {"id", "seq", "body", "created_at"} or 404
    POST APP login           {"password": "..."} -> 200 {"ok": true} | 401 | 409 (none configured)
                             | 403 "https_required" on http (the body is not read: the
                             password never crosses the network in clear, also in the dual
                             phase, when the http listener is up with the same verifier);
                             a generated password typed in capitals or with other
                             separators is taken in its form, as a workstation sends it
                             (``tlsroll.password.folded``)
                             | 429 + Retry-After: too many wrong passwords from this address
                             (5 free, then 2 s doubling up to 15 min; a right one clears it),
                             or from anywhere (``login_ceiling`` a day for the whole server);
                             each guess is counted before it is checked, so guesses sent
                             together cannot all pass one allowance; a login over the
                             allowance only while such checks run waits for them (16 per
                             address and 64 in all at most, each ``login_queue_seconds``,
                             30 s, at most; one more is refused at once): right passwords
                             sent together (a terminal server's users at eight) all get in

Admin API, HTTP on the Unix socket ``admin_socket`` only (mode 0600, i.e. root/the service user):

    POST /admin/freeze       {"drain_timeout": s} -> {"frozen", "watermark", "drained", "in_flight"}
    POST /admin/unfreeze     -> {"frozen": false, "watermark": n}
    GET  /admin/clients      -> {"window_seconds", "clients": [{"scheme", "address",
                                 "workstation", "first_seen", "last_seen", "requests"}, ...]}
                                 (``tlsroll.clients``: who was seen on which scheme within
                                 ``clients_window``, most recent first, at most 256; the
                                 workstation is the ws-… CN of a verified client certificate,
                                 else the ws-… name in an X-Tlsroll-Workstation header; tlsroll's
                                 own probes, User-Agent tlsroll-check/…, are not clients)
    GET  /admin/status       -> {"frozen", "frozen_since", "watermark", "in_flight", "listen",
                                 "ports" (listened schemes only), "address", "app_path", "pid",
                                 "config", "requests": {"http": n, "https": n} (every request
                                 since start, health probes included), "clients": distinct peer
                                 addresses per scheme since start, "auth_configured",
                                 "login_failures" (wrong passwords, kept in the store
                                 across restarts: ``refserver.store``), "first_login_failure"
                                 and "last_login_failure" (when the first and the latest were,
                                 ISO 8601 UTC, or null), "login_refused" (429s since start),
                                 "login_checking"
                                 and "login_waiting" (checks running, logins waiting for
                                 them, now), "cert_sha256" (the served cert, or null),
                                 "client_ca",
                                 "require_client_cert", "server", "version", "started_at"}

The freeze is persisted in the entry store (one commit; ``refserver.store``) before it is
answered, and survives restarts and crashes until unfreeze.

Exit codes: 0 after SIGTERM/SIGINT (in-flight requests finish first), 2 for a config error
(one line on stderr), 1 when start-up fails otherwise (port taken, data_dir locked, another
server answering on the admin_socket, ...).

Test-only knob: the environment variable ``TLSROLL_REFSERVER_TEST_WRITE_DELAY`` (seconds, a
float) makes every accepted write wait that long *after* it counts as in flight and *before*
it commits, so tests can freeze or stop the server with a write in flight. A second one,
``TLSROLL_REFSERVER_TEST_START_DELAY``, makes a start wait that long between its public
listeners answering and its admin socket (so before READY=1): a switch then takes at least that
long, with the restarted server frozen (503) throughout, so a test on a fast machine can watch
a switch under way. A third, ``TLSROLL_REFSERVER_TEST_CLIENTS_WINDOW`` (whole seconds, 1 to
59), takes the place of ``clients_window`` below its least (60 s), so that a test can watch a
sighting fall out of the window in seconds, not a minute. A fourth,
``TLSROLL_REFSERVER_TEST_BODY_SECONDS`` (seconds, over 0, at most ``gate.BODY_SECONDS``), takes
the place of a request body's deadline, and bounds aiohttp's lingering time after its 408
(``gate.LINGER_SECONDS``) by as much, so that a test of a body sent a byte at a time sees it cut
in seconds, not half a minute. Never set any of them in production; the server logs a warning
when one is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import ssl
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from aiohttp import web

from refserver import config as refserver_config
from refserver import gate
from refserver.gate import PublicListeners
from refserver.store import FreezeState, LoginFailures, Store, now_iso
from tlsroll import __version__, clients, daemon, httplog, kdfhook, logs, password
from tlsroll.backoff import (
    FUTURE_SLACK,
    Backoff,
    Ceiling,
    Policy,
    on_clock,
    retry_after,
    source_key,
)
from tlsroll.errors import ConfigError, TerminalError
from tlsroll.fsutil import socket_dir_problem, write_atomic
from tlsroll.logsample import SampledLog

PROG = "tlsroll-refserver"
WRITE_DELAY_ENV = "TLSROLL_REFSERVER_TEST_WRITE_DELAY"
START_DELAY_ENV = "TLSROLL_REFSERVER_TEST_START_DELAY"
CLIENTS_WINDOW_ENV = "TLSROLL_REFSERVER_TEST_CLIENTS_WINDOW"
BODY_SECONDS_ENV = "TLSROLL_REFSERVER_TEST_BODY_SECONDS"
BODY_SECONDS_KEY = web.AppKey("body_seconds", float)  # a body's deadline (``_read_body``)
PID_NAME = "refserver.pid"
LOCK_NAME = "refserver.lock"
RETRY_AFTER_SECONDS = 30
DEFAULT_DRAIN_TIMEOUT = 30.0
MAX_DRAIN_TIMEOUT = 600.0
SHUTDOWN_TIMEOUT = 10.0  # graceful stop: wait this long for in-flight writes (agent: 15 s)
# Then every connection left (idle keep-alive, half-open, a slow reader) is given this long: a
# stop is not held up by connections that carry no request (200 of them stretched a restart,
# and the freeze around it, from 0.5 s to 11 s).
CLOSE_CONNECTIONS_SECONDS = 0.5
ADMIN_SOCKET_CHECK_SECONDS = 2.0  # at start: does a server answer on the admin socket there?
LOGIN_CONCURRENCY = 4  # scrypt costs 32 MiB and ~0.1 s of CPU per check
# The same backoff per source address as the bootstrap service's (nodeagent.bootstrap_server).
LOGIN_BACKOFF = Policy(free=5, base=2.0, cap=900.0, forget=3600.0)
LOGIN_CEILING_WINDOW = 86_400.0  # [server].login_ceiling wrong passwords in this window at most
# A login that the limits refuse only because of checks still running (counted before they are
# checked: they may turn out right and be taken back) waits for them instead: a terminal server
# whose users log in together at eight o'clock, all with the right password, from one address.
# At most this many wait per source, and in all, each at most [server].login_queue_seconds (30 s
# by default: ``refserver.config``); the rest are refused (429) as before.
LOGIN_QUEUE_PER_SOURCE = 16
LOGIN_QUEUE_TOTAL = 64
LOGIN_QUEUE_LOOK = 1.0  # seconds a waiting login goes at most without looking at its client
MAX_TRACKED_CLIENTS = 10_000
# The count of wrong passwords is saved in the store (it survives restarts: every switch and
# every change-password rollout is one) at once after a quiet time, then at most once per this
# many seconds while more come, and once more as the server stops: a flood of guesses (the
# limits let up to LOGIN_CONCURRENCY checks run at once, from any number of sources) is one
# commit a second, not one per guess. A crash loses at most this long's worth of the count.
LOGIN_FAILURES_SAVE_SECONDS = 1.0
SWITCHING_MESSAGE = (
    "The server is switching between http and https; no new entries now. Retry later."
)

_ENTRY_ID = re.compile(r"[0-9a-f]{32}")
_STATUS_WORDS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    415: "unsupported_media_type",
}

log = logs.get_logger(__name__)
T = TypeVar("T")


class _HttpLog(httplog.ServerLog):
    """aiohttp's server log: a request it cannot parse is one line with the error's type, not
    the start of the line, which may be a browser's cookies for this host (the leader's viewer
    session, if the two share an address) or an Authorization header. Anybody who reaches 8080
    or 8443 can send such requests as fast as the server answers: the lines are sampled per
    source (a source's first, naming it, then ``http.bad_requests_summary`` at most once a
    minute, as the viewer's: review s67 L)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.sampled = SampledLog(clock=clock)

    def bad_request(self, error_type: str, remote: str | None) -> None:
        if self.sampled.first(source_key(remote), error_type):
            log.warning(
                "http.bad_request",
                remote=remote,
                error_type=error_type,
                detail="a client sent a request the server does not take; sampled per source",
            )
        if (summary := self.sampled.summary()) is not None:
            log.warning(
                "http.bad_requests_summary",
                **summary.fields(),
                detail="bad requests in that time, not logged one by one",
            )

    def failed(self, error_type: str, where: str) -> None:
        log.error(
            "http.request_failed",
            error_type=error_type,
            where=where,
            hint="the request got an error; a bug in tlsroll: report it with the lines before "
            "this one",
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StartupError(TerminalError):
    """Start-up failed for a reason other than the config (one line for the admin)."""


def _workstation(request: web.Request) -> str:
    """The ws-… name of the client: the CN of a client certificate the TLS handshake verified
    (the server asks for one when it has a client CA), else the name the client sent in the
    X-Tlsroll-Workstation header, else ""."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is not None:
        with contextlib.suppress(ValueError, AttributeError):
            cert = ssl_object.getpeercert() or {}
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName" and (name := clients.workstation_name(value)):
                        return name
    return clients.workstation_name(request.headers.get(clients.WORKSTATION_HEADER))


def served_fingerprint(cert_file: Path) -> str:
    """``sha256:<hex>`` of the DER of the first certificate in ``cert_file`` (the one TLS
    serves; ``pki.fingerprint``'s form), from the standard library: importing ``cryptography``
    for it cost every start of the server about 35 ms, inside every switch's freeze window
    (issue 15). The TLS context has loaded the file already, so it is PEM: the first plain
    ``CERTIFICATE`` block in it is taken (a leaf labelled otherwise, ``TRUSTED CERTIFICATE``
    say, would give the block after it: only the status's informational ``cert_sha256`` uses
    this), and a file without one is left to ``cryptography``."""
    text = cert_file.read_text("ascii", errors="replace")
    start, end = text.find(ssl.PEM_HEADER), text.find(ssl.PEM_FOOTER)
    if 0 <= start < end:
        try:
            der = ssl.PEM_cert_to_DER_cert(text[start : end + len(ssl.PEM_FOOTER)])
            return "sha256:" + hashlib.sha256(der).hexdigest()
        except ValueError:
            pass
    from tlsroll import pki  # noqa: PLC0415 - only for what the standard library cannot read

    return pki.fingerprint(pki.read_cert(cert_file))


def _gone(request: web.Request) -> bool:
    """Whether ``request``'s client closed its connection (no answer can reach it)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "message": message, **extra}, status=status)


class RefServer:
    """The running server's state and its two aiohttp applications (public and admin)."""

    def __init__(
        self,
        loaded: refserver_config.Loaded,
        store: Store,
        state: FreezeState,
        *,
        write_delay: float = 0.0,
        failures: LoginFailures | None = None,
        body_seconds: float = gate.BODY_SECONDS,
    ) -> None:
        self.config = loaded.config
        self.verifier = loaded.verifier
        self.cert_sha256 = (
            served_fingerprint(self.config.cert_file)
            if loaded.ssl_context is not None and self.config.cert_file is not None
            else None
        )
        self.store = store
        self.frozen = state.frozen
        self.frozen_since = state.since
        self.write_delay = write_delay
        self.body_seconds = body_seconds
        self.in_flight = 0
        self.requests = {scheme: 0 for scheme in refserver_config.SCHEMES}
        self.clients: dict[str, set[str]] = {scheme: set() for scheme in refserver_config.SCHEMES}
        self.seen = clients.ClientLog(self.config.clients_window, self.config.clients_max)
        self.started_at = now_iso()
        self._idle = asyncio.Event()
        self._idle.set()
        self._freeze_lock = asyncio.Lock()
        self._login_slots = asyncio.Semaphore(LOGIN_CONCURRENCY)
        self._login_failures = Backoff(LOGIN_BACKOFF)
        self._login_ceiling = Ceiling(self.config.login_ceiling, LOGIN_CEILING_WINDOW)
        # Checks running per source (counted as failures until they turn out right), logins
        # waiting for them per source, and the condition a finished check notifies.
        self._login_checking: dict[str, int] = {}
        self._login_waiting: dict[str, int] = {}
        self._login_done = asyncio.Condition()
        # Logins sent over http, refused unread: anybody can send them as fast as the server
        # answers, so a source's first is logged, then a summary a minute (review s67 L).
        self._refused_http = SampledLog()
        # Logins refused by the limits (429): once a source is told to wait, each login it
        # sends is refused unchecked, as fast as it sends them; sampled the same way (review
        # s67 L).
        self._rate_limited = SampledLog()
        # Wrong passwords since the count began (kept in the store across restarts), when the
        # first and the latest were (ISO 8601, UTC): the status's. Saved by ``_save_failures``
        # (``LOGIN_FAILURES_SAVE_SECONDS``); ``_failures_saved`` is what the store holds.
        failures = failures or LoginFailures()
        # The ceiling goes on from where the last run left it (review s66 M1: each restart, a
        # switch, a change-password rollout, a reboot, gave a guesser a fresh day's allowance):
        # the wrong passwords' wall-clock times, kept with the count, back on the clock of the
        # limits; one dated more than ``FUTURE_SLACK`` ahead (counted while the clock was ahead)
        # is dropped, as the agent's bootstrap service does, and so are those out of the day
        # (an older release ran on the file meanwhile: it keeps none) and past the ceiling.
        wall, mono = time.time(), time.monotonic()
        self._ceiling_times = [
            at for at in failures.ceiling if wall - LOGIN_CEILING_WINDOW < at <= wall + FUTURE_SLACK
        ][-self.config.login_ceiling :]
        for at in on_clock(self._ceiling_times, wall, mono):
            self._login_ceiling.failed(at)
        self.login_failures = failures.count
        self.first_login_failure = failures.first_at
        self.last_login_failure = failures.last_at
        self._failures_saved = failures
        self._failures_saving: asyncio.Task[None] | None = None
        self._failures_save_failed = False
        self.failures_save_seconds = LOGIN_FAILURES_SAVE_SECONDS
        self.login_refused = 0  # logins refused by the limits since start (429)
        self.clock: Callable[[], float] = time.monotonic
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refserver-writer")

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # --- helpers ------------------------------------------------------------------------------

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def watermark(self) -> int:
        """The last committed seq, read from the store (any writer's commits count), on the
        event loop: one indexed read on a pooled read-only connection of a WAL database, which
        no writer blocks, costs less than the hand-off to a worker thread and back; the status
        asks for it inside every switch's freeze window (the verify's watermark check, and the
        restart's readiness check of a server that sent no READY=1: issue 15) and at every
        heartbeat of the agent's."""
        return self.store.watermark()

    def _save_state(
        self, frozen: bool, since: str | None, read_watermark: bool
    ) -> tuple[FreezeState, int | None]:
        """Persist the freeze flag and, if asked, read the watermark in the same transaction
        (blocking: one worker-thread call, one commit)."""
        return self.store.save_freeze(frozen, since, read_watermark=read_watermark)

    @staticmethod
    def _scheme(request: web.Request) -> str:
        return "https" if request.secure else "http"

    @staticmethod
    async def _json_body(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
        raw = await _read_body(request)
        if allow_empty and not raw.strip():
            return {}
        return _json_object(raw)

    # --- public app ---------------------------------------------------------------------------

    async def idle(self) -> None:
        """Return once no write is in flight."""
        await self._idle.wait()

    def public_app(self) -> web.Application:
        # (an entry's body: ``gate.MAX_BODY_BYTES``, so that what a flood can make it hold is
        # bounded)
        app = web.Application(
            middlewares=[self._count, _json_errors], client_max_size=gate.MAX_BODY_BYTES
        )
        app[BODY_SECONDS_KEY] = self.body_seconds
        p = self.config.app_path
        app.router.add_get(p, self.index)
        app.router.add_get(p + "health", self.health)
        app.router.add_post(p + "entries", self.post_entry)
        app.router.add_get(p + "entries/{id}", self.get_entry)
        app.router.add_post(p + "login", self.login)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme = self._scheme(request)
        self.requests[scheme] += 1
        seen = self.clients[scheme]
        if request.remote and len(seen) < MAX_TRACKED_CLIENTS:
            seen.add(request.remote)
        if request.remote and not clients.is_probe(request.headers.get("User-Agent")):
            self.seen.record(scheme, request.remote, _workstation(request), dt.datetime.now(dt.UTC))
        return await handler(request)

    async def index(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "app": self.config.app_name,
                "app_path": self.config.app_path,
                "server": PROG,
                "version": __version__,
                "scheme": self._scheme(request),
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "scheme": self._scheme(request), "frozen": self.frozen}
        )

    def _frozen_response(self) -> web.Response:
        return web.json_response(
            {"error": "switching", "message": SWITCHING_MESSAGE},
            status=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Cache-Control": "no-store"},
        )

    async def post_entry(self, request: web.Request) -> web.Response:
        raw = await _read_body(request)
        # Checked after the body is in and before anything else awaits: from here until the
        # commit this write counts as in flight, and a freeze waits for it.
        if self.frozen:
            return self._frozen_response()
        body = _json_object(raw)
        self.in_flight += 1
        self._idle.clear()
        try:
            if self.write_delay > 0:
                await asyncio.sleep(self.write_delay)
            entry_id, seq = await self._write(self.store.insert, body)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        return web.json_response(
            {"id": entry_id, "seq": seq},
            status=201,
            headers={"Location": f"{self.config.app_path}entries/{entry_id}"},
        )

    async def get_entry(self, request: web.Request) -> web.Response:
        entry_id = request.match_info["id"]
        entry = (
            await asyncio.to_thread(self.store.get, entry_id)
            if _ENTRY_ID.fullmatch(entry_id)
            else None
        )
        if entry is None:
            return _error(404, "not_found", f"no entry {entry_id}")
        return web.json_response(entry)

    def _https_only_message(self) -> str:
        c = self.config
        where = (
            f": use https://{c.address}:{c.https_port}{c.app_path}login"
            if "https" in c.listen
            else " (this server does not listen on https yet)"
        )
        return f"The password is taken over https only, never in clear over http{where}."

    async def login(self, request: web.Request) -> web.Response:
        if self.verifier is None:
            return _error(409, "no_password", "No auth password is configured on this server.")
        if not request.secure:
            # Not even read: the password must not cross the network in clear (in the dual
            # phase the http listener is up as well, with the same verifier behind it).
            if self._refused_http.first(source_key(request.remote), "https_required"):
                log.warning(
                    "login.refused_http",
                    remote=request.remote,
                    hint="a client tried to log in over http after the switch to https: set it "
                    "up again (Test connection)",
                )
            if (summary := self._refused_http.summary()) is not None:
                log.warning(
                    "login.refused_http_summary",
                    **summary.fields(),
                    detail="http logins refused in that time, not logged one by one",
                )
            return _error(403, "https_required", self._https_only_message())
        body = await self._json_body(request)
        secret = body.get("password")
        if not isinstance(secret, str) or not secret:
            return _error(400, "bad_request", 'body needs "password": a non-empty string')
        if not password.is_utf8(secret):
            # A JSON escape of half a surrogate pair, no text: refused as the malformed request it
            # is, before it is counted (it failed in the hash: a 500 and a traceback, review s66
            # pw L1).
            return _error(400, "bad_request", '"password" is not UTF-8 text (a lone surrogate)')
        # A generated password typed in capitals, or with spaces or nothing between its
        # groups, in its form: as a workstation sends it (``password.folded``; session 69 left
        # /login without it). `password set` takes no chosen one of that shape in another form.
        secret = password.folded(secret)
        source = source_key(request.remote)
        wait, now = await self._login_allowed(source, request)
        if _gone(request):
            # Waited in the queue and left (aiohttp does not cancel the handler): no answer
            # reaches it, and no scrypt check is run for it.
            log.info("login.client_gone", remote=request.remote)
            return _error(408, "client_gone", "The client closed the connection.")
        if wait > 0:
            self.login_refused += 1
            if self._rate_limited.first(source, "rate_limited"):
                log.warning(
                    "login.rate_limited",
                    remote=request.remote,
                    retry_after=retry_after(wait),
                    detail="too many failed logins from that address: it must wait retry_after",
                )
            if (summary := self._rate_limited.summary()) is not None:
                log.warning(
                    "login.rate_limited_summary",
                    **summary.fields(),
                    detail="logins refused for waiting in that time, not logged one by one",
                )
            return web.json_response(
                {
                    "ok": False,
                    "error": "rate_limited",
                    "message": f"Too many wrong passwords; try again in {retry_after(wait)} s.",
                },
                status=429,
                headers={"Retry-After": str(retry_after(wait))},
            )
        # Counted as a failure before the check (no await between the limits above and here):
        # guesses sent together must not all pass one allowance while scrypt runs. A right
        # password takes its count back below.
        self._login_failures.failed(source, now)
        self._login_ceiling.failed(now)
        self._login_checking[source] = self._login_checking.get(source, 0) + 1
        try:
            async with self._login_slots:
                ok = await asyncio.to_thread(password.check_password, self.verifier, secret)
            if ok:
                self._login_failures.reset(source)
                self._login_ceiling.forgive(now)
        finally:
            left = self._login_checking[source] - 1
            if left:
                self._login_checking[source] = left
            else:
                del self._login_checking[source]
            async with self._login_done:
                self._login_done.notify_all()
        log.info("login.checked", accepted=ok, scheme=self._scheme(request), remote=request.remote)
        if not ok:
            self._login_failed()
            return web.json_response(
                {"ok": False, "error": "wrong_password", "message": "The password is wrong."},
                status=401,
            )
        return web.json_response({"ok": True})

    def _failures(self) -> LoginFailures:
        return LoginFailures(
            self.login_failures,
            self.first_login_failure,
            self.last_login_failure,
            tuple(self._ceiling_times),
        )

    def _login_failed(self) -> None:
        """Count a wrong password, and have the count saved (``_save_failures``), with the
        times that count against the ceiling: the ``login_ceiling`` newest of the day (older
        ones no longer decide anything), none dated ahead of the clock by more than
        ``FUTURE_SLACK``."""
        at = time.time()
        times = [
            t for t in self._ceiling_times if at - LOGIN_CEILING_WINDOW < t <= at + FUTURE_SLACK
        ]
        times.append(at)
        self._ceiling_times = times[-self.config.login_ceiling :]
        self.login_failures += 1
        self.last_login_failure = now_iso()
        if self.first_login_failure is None:
            self.first_login_failure = self.last_login_failure
        if self._failures_saving is None or self._failures_saving.done():
            self._failures_saving = asyncio.ensure_future(self._save_failures())

    async def _save_failures(self) -> None:
        """Save the count while it differs from what the store holds: at once, then at most
        once per ``failures_save_seconds`` (one commit for every failure meanwhile). A save
        that fails (a read-only or full disk) is logged once until one works again, and tried
        again at the next failure and as the server stops; the count in memory (the
        status's) goes on."""
        while (now := self._failures()) != self._failures_saved:
            await self.save_failures_now(now)
            await asyncio.sleep(self.failures_save_seconds)
            if self._failures_save_failed:
                return

    async def save_failures_now(self, failures: LoginFailures | None = None) -> None:
        """Save ``failures`` (default: the count now) unless the store holds it already; the
        last save as the server stops, and ``_save_failures``'s."""
        failures = failures or self._failures()
        if failures == self._failures_saved:
            return
        try:
            await self._write(self.store.save_login_failures, failures)
        except (OSError, sqlite3.Error) as exc:
            if not self._failures_save_failed:
                log.error(
                    "login_failures.not_saved",
                    error=_one_line(exc),
                    hint="check the server's data dir (df -h): the failure counts hold in memory"
                    " until the next save",
                )
            self._failures_save_failed = True
            return
        self._failures_saved = failures
        self._failures_save_failed = False

    async def stop_saving_failures(self) -> None:
        """As the server stops: the saving task ends, and the count now is saved."""
        task = self._failures_saving
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.save_failures_now()
        if (now := self._failures()) != self._failures_saved:
            # said even when a failing save was said before (review rev50a L3): what is lost
            log.error(
                "login_failures.lost_at_stop",
                count=now.count,
                saved=self._failures_saved.count,
                detail="login failures not saved are lost with this stop: the next start counts "
                "fewer than there were",
            )

    def _login_wait(self, source: str, now: float) -> float:
        return max(self._login_failures.wait(source, now), self._login_ceiling.wait(now))

    async def _login_allowed(self, source: str, request: web.Request) -> tuple[float, float]:
        """(seconds ``source`` must wait before a check, now). A wait that checks still running
        may take back (this source's, or any source's for the ceiling) is waited out here, up to
        ``[server].login_queue_seconds``, by at most ``LOGIN_QUEUE_PER_SOURCE`` logins of a
        source and ``LOGIN_QUEUE_TOTAL`` in all (one more is refused at once). Guesses sent
        together still get no more checks than the allowance: a waiting one goes on only once
        the checks before it are over and the limits allow it; wrong ones leave the wait in
        place and it is refused. A login whose client went away (``_gone``: aiohttp 3.14 does
        not cancel its handler) leaves the queue within ``LOGIN_QUEUE_LOOK`` seconds: it kept
        its place until the checks before it were over (review of s49carry, L)."""
        now = self.clock()
        wait = self._login_wait(source, now)
        if wait <= 0 or not self._login_pending(source, now):
            return wait, now
        waiting = self._login_waiting.get(source, 0)
        if waiting >= LOGIN_QUEUE_PER_SOURCE or sum(self._login_waiting.values()) >= (
            LOGIN_QUEUE_TOTAL
        ):
            return wait, now
        self._login_waiting[source] = waiting + 1
        deadline = now + self.config.login_queue_seconds
        try:
            async with self._login_done:
                while True:
                    now = self.clock()
                    wait = self._login_wait(source, now)
                    if wait <= 0 or not self._login_pending(source, now) or now >= deadline:
                        return wait, now
                    if _gone(request):
                        return wait, now
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._login_done.wait(), min(deadline - now, LOGIN_QUEUE_LOOK)
                        )
        finally:
            left = self._login_waiting[source] - 1
            if left:
                self._login_waiting[source] = left
            else:
                del self._login_waiting[source]

    def _login_pending(self, source: str, now: float) -> bool:
        """Whether checks still running may lift ``source``'s wait: its own (its backoff), or
        any (the whole server's ceiling)."""
        if self._login_failures.wait(source, now) > 0:
            return source in self._login_checking
        return bool(self._login_checking)

    # --- admin app ----------------------------------------------------------------------------

    def admin_app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors])
        app[BODY_SECONDS_KEY] = self.body_seconds
        app.router.add_post("/admin/freeze", self.freeze)
        app.router.add_post("/admin/unfreeze", self.unfreeze)
        app.router.add_get("/admin/status", self.status)
        app.router.add_get("/admin/clients", self.clients_seen)
        return app

    async def clients_seen(self, request: web.Request) -> web.Response:
        """Who was seen on which scheme within the window (``tlsroll.clients``)."""
        recent = self.seen.view(dt.datetime.now(dt.UTC))
        return web.json_response(clients.to_json(recent, self.config.clients_window))

    async def freeze(self, request: web.Request) -> web.Response:
        body = await self._json_body(request, allow_empty=True)
        timeout = body.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 <= timeout <= MAX_DRAIN_TIMEOUT
        ):
            return _error(
                400, "bad_request", f"drain_timeout must be seconds from 0 to {MAX_DRAIN_TIMEOUT:g}"
            )
        async with self._freeze_lock:
            # Refuse new writes at once; then make the freeze durable. With no write in
            # flight none can start any more, so the watermark is final: it is read in the
            # same worker-thread call as the flag is saved (one hand-off, not two: issue 15).
            self.frozen = True
            since = self.frozen_since
            drained = self.in_flight == 0
            try:
                saved, mark = await asyncio.to_thread(self._save_state, True, since, drained)
            except (OSError, sqlite3.Error) as exc:
                log.error(
                    "freeze.not_persisted",
                    error=_one_line(exc),
                    hint="check the server's data dir (df -h, a read-only mount): the freeze "
                    "holds in memory only and its call is answered as failed",
                )
                return _error(
                    500, "state_not_saved", f"frozen, but cannot persist it: {_one_line(exc)}"
                )
            self.frozen_since = saved.since
        if mark is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        watermark = await self.watermark() if mark is None else mark
        in_flight = self.in_flight
        log.info("writes.frozen", watermark=watermark, drained=in_flight == 0, in_flight=in_flight)
        return web.json_response(
            {
                "frozen": self.frozen,
                "watermark": watermark,
                "drained": in_flight == 0,
                "in_flight": in_flight,
            }
        )

    async def unfreeze(self, request: web.Request) -> web.Response:
        async with self._freeze_lock:
            try:
                # Still frozen while it is saved: the watermark read with it is the last one
                # of the freeze (one worker-thread hand-off, not two).
                _saved, watermark = await asyncio.to_thread(self._save_state, False, None, True)
            except (OSError, sqlite3.Error) as exc:
                log.error(
                    "unfreeze.not_persisted",
                    error=_one_line(exc),
                    hint="check the server's data dir (df -h, a read-only mount): a restart "
                    "would come up frozen",
                )
                return _error(
                    500, "state_not_saved", f"still frozen: cannot persist: {_one_line(exc)}"
                )
            self.frozen = False
            self.frozen_since = None
        log.info("writes.unfrozen", watermark=watermark)
        return web.json_response({"frozen": False, "watermark": watermark})

    async def status(self, request: web.Request) -> web.Response:
        c = self.config
        return web.json_response(
            {
                "server": PROG,
                "version": __version__,
                "pid": os.getpid(),
                "config": str(c.path),
                "started_at": self.started_at,
                "address": c.address,
                "app_path": c.app_path,
                "listen": list(c.listen),
                "ports": {scheme: c.port(scheme) for scheme in c.listen},
                "frozen": self.frozen,
                "frozen_since": self.frozen_since,
                "watermark": await self.watermark(),
                "in_flight": self.in_flight,
                "requests": dict(self.requests),
                "clients": {scheme: len(seen) for scheme, seen in self.clients.items()},
                "auth_configured": self.verifier is not None,
                "login_failures": self.login_failures,
                "first_login_failure": self.first_login_failure,
                "last_login_failure": self.last_login_failure,
                "login_refused": self.login_refused,
                "login_checking": sum(self._login_checking.values()),
                "login_waiting": sum(self._login_waiting.values()),
                "cert_sha256": self.cert_sha256,
                "client_ca": c.client_ca_file is not None,
                "require_client_cert": c.require_client_cert,
            }
        )


class _BadRequest(TerminalError):
    pass


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if abs(value) == float("inf"):  # 1e999: the grammar of a JSON number has no NaN
        raise ValueError("a number too large for a float")
    return value


def _json_object(raw: bytes) -> dict[str, Any]:
    """The body ``raw`` as a JSON object, else ``_BadRequest`` (a 400, one line): strictly
    JSON, as every answer is, with nothing the store cannot keep or give back as JSON. Before,
    an object nested too deeply (a ``RecursionError``) or a string with a lone surrogate
    (``"\\ud800"``, which SQLite cannot store as text) was a 500 with a traceback in the log,
    and ``NaN``, ``Infinity`` or ``1e999`` were stored and given back as no JSON at all (review
    s66 M1, L2)."""
    try:
        data = json.loads(raw, parse_constant=_not_a_number, parse_float=_finite)
        json.dumps(data, ensure_ascii=False).encode()
    except RecursionError:
        raise _BadRequest("body is not valid JSON: nested too deeply") from None
    except UnicodeEncodeError:
        raise _BadRequest(
            "body is not valid JSON: a string in it is not Unicode text (a lone surrogate)"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError is one
        raise _BadRequest(f"body is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise _BadRequest("body must be a JSON object")
    return data


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer is JSON: ``{"error": word, "message": text}``."""
    try:
        return await handler(request)
    except _BadRequest as exc:
        return _error(400, "bad_request", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        resp = _error(exc.status, _STATUS_WORDS.get(exc.status, "error"), exc.reason)
        resp.headers.update(headers)
        return resp
    except Exception as exc:
        log.exception(
            "request.failed",
            path=request.path,
            error=_one_line(exc),
            hint="the request got a 500; a bug in tlsroll: report it with the lines before this "
            "one",
        )
        return _error(500, "internal", "internal server error")


async def _read_body(request: web.Request) -> bytes:
    """The request's body (aiohttp's ``client_max_size`` at most), within ``gate.BODY_SECONDS``
    (``BODY_SECONDS_ENV``'s in a test): a body sent a byte at a time held its connection (and
    the memory of what it had sent) for as long as its client liked, past the gate's head
    deadline (review s69 revref H1). Else a 408; aiohttp then closes the connection (after its
    lingering time, ``gate.LINGER_SECONDS``, at most)."""
    try:
        async with asyncio.timeout(request.config_dict.get(BODY_SECONDS_KEY, gate.BODY_SECONDS)):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason="the request's body did not come in time") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _test_seconds(env: str) -> float | None:
    """A test-only knob's seconds (a float), None when unset; StartupError if not a number."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise StartupError(f"{env}={raw!r} is not a number of seconds") from None


def _test_delay(env: str) -> float:
    """Seconds of a test-only delay (``WRITE_DELAY_ENV``, ``START_DELAY_ENV``); 0 when unset."""
    if (value := _test_seconds(env)) is None:
        return 0.0
    if not 0 <= value <= 600:  # also refuses nan
        raise StartupError(f"{env} must be from 0 to 600 seconds")
    return value


def _test_body_seconds(env: str) -> float:
    """Seconds of the test-only body deadline (``BODY_SECONDS_ENV``); 0 when unset. Only below
    ``gate.BODY_SECONDS``: a test's deadline never gives a body longer."""
    if (value := _test_seconds(env)) is None:
        return 0.0
    if not 0 < value <= gate.BODY_SECONDS:  # also refuses nan
        raise StartupError(f"{env} must be over 0 and at most {gate.BODY_SECONDS:g} seconds")
    return value


def _test_clients_window(env: str) -> int:
    """Seconds of the test-only clients window (``CLIENTS_WINDOW_ENV``); 0 when unset. Only
    below the config's least: a longer window is the config's to set."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise StartupError(f"{env}={raw!r} is not a whole number of seconds") from None
    if not 1 <= value < refserver_config.MIN_CLIENTS_WINDOW:
        raise StartupError(
            f"{env} must be from 1 to {refserver_config.MIN_CLIENTS_WINDOW - 1} seconds"
        )
    return value


def _load_state(store: Store) -> tuple[FreezeState, LoginFailures]:
    """What the store keeps across restarts: the freeze flag and the count of wrong passwords
    (one worker-thread call: the start is inside every switch's freeze window)."""
    return store.load_freeze(), store.load_login_failures()


def _lock_data_dir(data_dir: Path) -> int:
    """Take an exclusive lock so that two servers never share one data_dir."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot lock data_dir {data_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = ""
        with contextlib.suppress(OSError, ValueError):
            other = f" (pid {int((data_dir / PID_NAME).read_text())})"
        raise StartupError(f"another {PROG} uses {data_dir}{other}") from None
    return fd


async def _remove_stale_socket(path: Path) -> None:
    """Remove the socket a killed predecessor left behind (never any other kind of file), and
    only if nobody listens on it: a second server given the same admin_socket (its own
    data_dir, its own address) took a live one's socket over, so that the agent froze and
    asked the wrong server, and either's stop removed the other's (review s66 M2)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"admin_socket {path} exists and is not a socket")
    try:
        async with asyncio.timeout(ADMIN_SOCKET_CHECK_SECONDS):
            _reader, writer = await asyncio.open_unix_connection(str(path))
    except ConnectionRefusedError:  # a socket file nobody listens on: stale
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:  # TimeoutError included: a listener whose backlog is full
        raise StartupError(
            f"admin_socket {path} cannot be taken: {exc.strerror or type(exc).__name__}"
        ) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise StartupError(f"another server answers on admin_socket {path}")


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket file at ``path``, or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


async def _start_public(server: RefServer, ssl_context: Any, public: PublicListeners) -> None:
    c = server.config
    for scheme in c.listen:
        try:
            await public.listen_on(
                c.address, c.port(scheme), ssl_context if scheme == "https" else None
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {scheme}://{c.address}:{c.port(scheme)}: {exc.strerror or exc}"
            ) from None


async def _start_admin(path: Path, admin: web.AppRunner) -> None:
    """Bind the admin socket, owner-only from the start (umask), then chmod to be sure."""
    old_umask = os.umask(0o177)
    try:
        await web.UnixSite(admin, str(path)).start()
    except OSError as exc:
        raise StartupError(f"cannot bind admin_socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)


async def serve(loaded: refserver_config.Loaded) -> int:
    """Run until SIGTERM/SIGINT; return the exit code."""
    stop = daemon.stop_event()
    c = loaded.config
    write_delay = _test_delay(WRITE_DELAY_ENV)
    start_delay = _test_delay(START_DELAY_ENV)
    body_seconds = _test_body_seconds(BODY_SECONDS_ENV)
    if clients_window := _test_clients_window(CLIENTS_WINDOW_ENV):
        c = dataclasses.replace(c, clients_window=clients_window)
        loaded = dataclasses.replace(loaded, config=c)
    try:
        c.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(f"cannot create data_dir {c.data_dir}: {exc.strerror}") from None
    lock_fd = _lock_data_dir(c.data_dir)
    pid_file = c.data_dir / PID_NAME
    store: Store | None = None
    server: RefServer | None = None
    runners: list[web.AppRunner] = []
    listeners: PublicListeners | None = None
    started = False
    bound: tuple[int, int] | None = None  # the admin socket file this server bound
    try:
        try:
            # Replaced whole (a reader never sees half of it), not fsynced: a pid names a
            # process of this boot only, and after a crash of the machine the file, whatever
            # it holds, names none (the driver checks the process it names, and its lock). Its
            # two fsyncs were in every restart, inside every switch's freeze window (issue 15).
            write_atomic(pid_file, f"{os.getpid()}\n".encode(), sync=False)
        except OSError as exc:
            raise StartupError(f"cannot write {pid_file}: {exc.strerror or exc}") from None
        try:
            store = await asyncio.to_thread(Store, c.data_dir)
            state, failures = await asyncio.to_thread(_load_state, store)
        except Exception as exc:
            raise StartupError(f"cannot open the entry store: {_one_line(exc)}") from None
        if state.problem:
            log.error(
                "state.unreadable",
                problem=state.problem,
                detail="the server's saved state was damaged; the problem says which part was "
                "dropped",
            )
        if store.read_only:
            log.error(
                "store.read_only",
                path=str(store.path),
                hint="its file system is mounted read-only: entries are served, every save "
                "fails; make the data dir writable (remount it read-write), then restart the "
                "server (its first start that can write the store migrates it)",
            )
        server = RefServer(
            loaded,
            store,
            state,
            write_delay=write_delay,
            failures=failures,
            body_seconds=body_seconds or gate.BODY_SECONDS,
        )
        public = web.AppRunner(
            server.public_app(),
            access_log=None,
            logger=_HttpLog(),
            handle_signals=False,
            shutdown_timeout=CLOSE_CONNECTIONS_SECONDS,
            keepalive_timeout=gate.HEAD_SECONDS,
            max_headers=gate.MAX_HEADERS,
            max_field_size=gate.MAX_FIELD_BYTES,
            lingering_time=min(gate.LINGER_SECONDS, server.body_seconds),
        )
        admin = web.AppRunner(
            server.admin_app(),
            access_log=None,
            logger=_HttpLog(),
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        for runner in (public, admin):
            await runner.setup()
            runners.append(runner)
        assert public.server is not None
        listeners = PublicListeners(public.server)
        await _start_public(server, loaded.ssl_context, listeners)
        if start_delay:
            log.warning(
                "test_hook.start_delay",
                seconds=start_delay,
                env=START_DELAY_ENV,
                detail="a test-only setting: unset it outside tests",
            )
            with contextlib.suppress(TimeoutError):  # a stop asked meanwhile ends it
                async with asyncio.timeout(start_delay):
                    await stop.wait()
        # The admin socket comes last: once it answers, every public listener is up.
        try:
            c.admin_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StartupError(f"cannot create {c.admin_socket.parent}: {exc.strerror}") from None
        # Whoever can write there can put their own socket in its place (the agent would then
        # freeze a fake): refuse a directory that is not ours alone.
        if problem := socket_dir_problem(c.admin_socket.parent):
            raise StartupError(f"admin_socket directory: {problem}")
        await _remove_stale_socket(c.admin_socket)
        await _start_admin(c.admin_socket, admin)
        bound = _identity(c.admin_socket)
        if write_delay:
            log.warning(
                "test_hook.write_delay",
                seconds=write_delay,
                env=WRITE_DELAY_ENV,
                detail="a test-only setting: unset it outside tests",
            )
        if body_seconds:
            log.warning(
                "test_hook.body_seconds",
                seconds=body_seconds,
                env=BODY_SECONDS_ENV,
                detail="a test-only setting: unset it outside tests",
            )
        if clients_window:
            log.warning(
                "test_hook.clients_window",
                seconds=clients_window,
                env=CLIENTS_WINDOW_ENV,
                detail="a test-only setting: unset it outside tests",
            )
        if server.verifier is not None and server.verifier["n"] < password.MIN_N:
            log.warning(  # (taken only while the tests' scrypt hook is set: ``password.least_n``)
                "test_hook.kdf_n",
                n=server.verifier["n"],
                env=kdfhook.TEST_KDF_N_ENV,
                detail=f"the auth verifier's scrypt N is below {password.MIN_N}, taken only"
                " under a test-only setting",
                hint=f"unset {kdfhook.TEST_KDF_N_ENV} outside tests and make the verifier again",
            )
        log.info(
            "server.started",
            pid=os.getpid(),
            address=c.address,
            app_path=c.app_path,
            listen=list(c.listen),
            ports={s: c.port(s) for s in c.listen},
            frozen=server.frozen,
            watermark=await server.watermark(),
            auth_configured=server.verifier is not None,
            client_ca=c.client_ca_file is not None,
            config=str(c.path),
        )
        started = True
        daemon.sd_notify("READY=1")
        await stop.wait()
        log.info("server.stopping", in_flight=server.in_flight)
        daemon.sd_notify("STOPPING=1")
        # In-flight writes finish first (bounded); the connections left are closed at once.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.idle(), SHUTDOWN_TIMEOUT)
        return 0
    finally:
        # Public first (waits for in-flight requests), the admin socket last.
        if listeners is not None:
            await listeners.stop()
        for runner in runners:
            await runner.cleanup()
            if listeners is not None:  # (the public runner's: a stop waits for no client)
                await listeners.abort_all()
                listeners = None
        # Only the file this server bound: never one another server put in its place.
        with contextlib.suppress(FileNotFoundError):
            if bound is not None and _identity(c.admin_socket) == bound:
                c.admin_socket.unlink()
        if server is not None:
            # The count of wrong passwords as it is now (the saving task waits between saves).
            await server.stop_saving_failures()
            server.close()
        if store is not None:
            store.close()
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) == os.getpid():
                pid_file.unlink()
        # The lock last: the agent signals only a process holding it (or its own child), so a
        # process that let go of it must hold nothing of a server's (listeners, admin socket,
        # store, pid file): ``nodeagent.drivers.ReferenceDriver._is_server``.
        os.close(lock_fd)
        if started:
            log.info("server.stopped")


def main(argv: list[str] | None = None) -> int:
    parser = daemon.arguments(PROG, "The tlsroll reference application server (demo and tests).")
    parser.add_argument(
        "--config", required=True, type=daemon.path_argument, help="TOML config file"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    args = parser.parse_args(argv)
    daemon.no_core_dumps()  # before the password's verifier and the key are read
    try:
        loaded = refserver_config.load(args.config)
    except ConfigError as exc:
        daemon.say(PROG, exc)
        return 2
    except Exception as exc:  # one line, never a traceback (review s48rev3 M1)
        return daemon.internal_error(PROG, exc)
    logs.configure()
    try:
        return asyncio.run(serve(loaded))
    except StartupError as exc:
        daemon.say(PROG, f"error: {exc}")
        return 1
    except OSError as exc:  # anything the start-up checks above did not foresee
        daemon.say(PROG, f"error: {' '.join(str(exc).split())}")
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during the graceful stop
        return 130
    except Exception as exc:  # one line, never a traceback (review s48rev3 M1)
        return daemon.internal_error(PROG, exc)


def run() -> NoReturn:
    """The process entry point: ``main``, then leave at once. Once ``serve`` has closed
    everything (listeners, admin socket, store, pid file, lock), the interpreter's own
    teardown of its modules took another 350-420 ms, and a restart waits for the old process
    to be gone: a third of the reference server's whole restart, inside every freeze."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
