"""The web viewer: an aiohttp app the leader serves over https on its own port, read-only.

    GET /                  the newest rollout: nodes, states, addresses, freeze windows,
                           timeline; the enrolled nodes outside it; pending password
                           changes; nodes offline; certificates near expiry; who is still on
                           http; every rollout (newest first)
    GET /rollouts/{id}     the same with that rollout selected
    GET /events            server-sent events: the page's live part (``update``), then on a
                           change only the rows and timelines that changed (``patch``), or
                           the part whole again if more changed (each committed write to the
                           store wakes the streams: ``Pulse``)
    GET /api/v1/schema     the schema as JSON (what `tlsroll schema show --json` prints)
    GET /metrics           Prometheus text format (a session, or the scrape token)
    GET /login/{secret}    the one-time link (`tlsroll viewer grant`): a page with one link,
                           "Anmelden"/"Sign in", to the URL below; spends nothing
    GET /login/{secret}/open
                           spends the link, sets the session cookie and redirects to /
                           (either, of a used link, in the browser its use signed in:
                           redirects to /); from a link on another site: 403, nothing
                           spent or set; from the link's page in a browser that holds a
                           valid session of another grant: 409, likewise (sign out first)
    GET /static/{name}     the stylesheet and the script (no session needed)
    POST /logout           the schema pages' one button, "Abmelden"/"Sign out": ends the
                           browser's own session (its grant), clears the cookie and answers
                           a page that says how to come back

Safe by construction: only GET and HEAD are served, but for POST of /logout (every other
method, on any path, and GET or HEAD of /logout, answers 405 before anything else runs); no
handler writes anything but the sign-in URL, which spends its grant, and the sign-out, which
ends the session it is sent with (its grant's ``revoked_at`` and an audit row); the pages
have links and one form (the sign-out's, on the schema pages, whose Content-Security-Policy
allows form submissions to the viewer itself; every other answer's forbids them), and the
policy forbids inline scripts and anything from another origin. The sign-out is taken only
from the viewer's own pages: besides the SameSite=Strict cookie, the browser's
``Sec-Fetch-Site`` must say ``same-origin`` (or, without it, ``Origin`` be the viewer's); a
POST from another site is 403 and changes nothing.
Without a valid session every path but the login, the static files and the sign-out answers
401 with a page that says how to get access.

The session cookie (``__Host-tlsroll-viewer``) is HttpOnly, Secure and SameSite=Strict; its
value is 256 random bits of which the leader keeps only a hash (``leader.viewer.grants``).
Neither it nor a login link's secret is ever logged; aiohttp's access log is off for that
reason (it would log the login path).

Mail and chat programs fetch a link with GET to show a preview, and mail security scanners
fetch the links in a message; they do not click on. So the link itself spends nothing: it
answers the sign-in page (after a read-only check: an unknown, used, expired or revoked link
gets the 401 page, as the sign-in URL would, so the page tells nothing the sign-in URL does
not), and only a GET of ``/login/{secret}/open``, the page's one link, spends the grant. HEAD
spends nothing on either. The person's click on that link is a same-site navigation, so the
SameSite=Strict cookie set by the sign-in URL goes along its redirect to / (the browser test
clicks the link in a page of another site first). The sign-in URL itself, opened by a link
on another site (``Sec-Fetch-Site`` neither ``same-origin`` nor ``none``), is 403 and spends
nothing: else any site could sign a visitor into a session of its own (login CSRF). A scanner
that also follows the links on the page it fetched would still spend the grant; nothing
served GET-only can tell it from a person.

Workstation certificates are not accepted as a viewer identity: the bootstrap service gives
one to every practice PC that knows the shared password, so it says "a PC of this practice",
not "someone allowed to watch the switch"; and asking browsers for a client certificate
would show every visitor a certificate picker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import hmac
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from leader.viewer.grants import Grant, Grants, LoginRefused
from leader.viewer.i18n import LANGS, Words, pick_lang
from leader.viewer.snapshot import Reader, Snapshot
from tlsroll import logs
from tlsroll.backoff import source_key
from tlsroll.echo import shown
from tlsroll.logsample import SampledLog

if TYPE_CHECKING:
    from leader.viewer import pages

# The pages (Jinja2) and /metrics (prometheus_client) are imported when first asked for, not
# when the leader starts: ~4 MiB that a leader whose viewer nobody opens never needs.

log = logs.get_logger(__name__)

SESSION_COOKIE = "__Host-tlsroll-viewer"
LANG_COOKIE = "tlsroll-lang"
ALLOWED_METHODS = ("GET", "HEAD")
# The one path that takes another method: the sign-out (POST only, from the viewer's pages).
SIGN_OUT_PATH = "/logout"
# A page's live stream looks at the stores when a write to them committed (``Pulse``), and at
# least this often for what changes with time alone (a node's heartbeat growing old, a session
# ending, a write by another process) ...
EVENT_INTERVAL = 1.0
# ... and at most this often (or, for a page that takes longer to read and draw, twice that
# time apart): a rollout writes many times a second; a page shows the state after the writes
# of this long, not each of them (one event with the rows they changed). At 500 nodes, an
# open page that looked a tenth of a second apart (and each idle half second) drew most
# nodes' every step, and took more of the leader's CPU than the rollout (issue 15).
EVENT_GAP = 0.5
# Open pages share what they read: however many are open, the stores are read at most once per
# selection and write (``Database.commits``) and, without a write, per this long.
SHARED_SECONDS = EVENT_INTERVAL / 2
# Snapshots kept so, one per selection, the least recently used out past this many; none for a
# rollout that does not exist (a request for any id stored one, s43rev3 Low 1), and stale
# ones dropped at every look, not only at the next read.
KEPT_SHARED = 8
# Open pages of one selection and language also share what is drawn of a read, kept for this
# many (selection, language), and the event that takes a page from one drawing to the next
# (this many, and none larger than this: a page's whole part is ~0.9 MiB at 500 nodes, sent
# at its first view and when more than rows changed; kept, the last one stayed until the
# next four events, often long after the rollout). Both are emptied when the last open
# stream ends (they stayed after every page closed, s43rev3 Low 2).
KEPT_DRAWN = 8
KEPT_EVENTS = 4
KEPT_EVENT_BYTES = 64 * 1024
KEEPALIVE = 15.0  # seconds of silence after which /events sends a comment
# Open /events streams: each holds a connection (``leader.viewer.listener`` caps those) and
# reads the store; a person has a page or a few open, not dozens (audit s38 L1).
MAX_STREAMS = 32
MAX_STREAMS_PER_SESSION = 8
# A stream past them is told to come back this much later, and ends: an answer other than 200
# would end the page's EventSource for good, and viewer.js reloads the page then (every 3 s).
BUSY_RETRY_MS = 30_000
_SECRET = re.compile(r"[A-Za-z0-9_-]{20,100}")
# The reason of a sign-in URL opened by a link on another site (``_navigated_here``): 403.
CROSS_SITE = "cross_site"
# The reason of a sign-in from a link's page in a browser that holds a valid session of
# another grant: 409, nothing spent or set (``login``).
SIGNED_IN = "signed_in"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action {}; frame-ancestors 'none'"
)
# The schema pages' policy: their one form, the sign-out, posts to the viewer itself.
CSP_SIGN_OUT_FORM = _CSP.format("'self'")
# Their referrer policy (header and meta): under ``no-referrer`` a browser sends the form's
# POST with ``Origin: null``, and one without ``Sec-Fetch-Site`` (Safari before 16.4, Firefox
# before 90) was refused the sign-out; ``same-origin`` sends the viewer's origin to the viewer
# alone (review s67 rev1 M1). The other pages keep ``no-referrer`` (the login link's URL
# holds its secret).
REFERRER_SIGN_OUT_FORM = "same-origin"
SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP.format("'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Server": "tlsroll",
}
STATIC = {
    "viewer.css": "text/css",
    "viewer.js": "text/javascript",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
GRANT: web.RequestKey[Grant] = web.RequestKey("grant", Grant)
# Set by the pages that hold the sign-out form: their CSP allows it (``CSP_SIGN_OUT_FORM``).
SIGN_OUT_FORM: web.RequestKey[bool] = web.RequestKey("sign_out_form", bool)


class Pulse:
    """Wakes the live streams when a write to the store committed.

    ``tell`` is a ``Database.on_commit`` listener: it runs in the writer's thread, after each
    committed write that changed a row. It wakes the event loop once for any number of
    writes until the loop has run ``_beat`` (a rollout writes many times a second). A stream
    takes ``event`` before it reads the store and waits on it after: a write that committed
    after that read sets it (its telling found the flag clear, or ``_beat`` was still to come
    and swaps the event after the write), so no write goes unshown."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.event = asyncio.Event()
        self._told = False

    def tell(self) -> None:
        """(Any thread.)"""
        if self._told:
            return
        self._told = True
        with contextlib.suppress(RuntimeError):  # the loop closed (the leader stopped)
            self._loop.call_soon_threadsafe(self._beat)

    def _beat(self) -> None:
        self._told = False
        event, self.event = self.event, asyncio.Event()
        event.set()


SCRAPE_REFUSED = (
    "401: /metrics: the bearer token is not taken: a scrape sends `Authorization: Bearer`"
    " with the token in [leader].metrics_token_file (read when the leader starts; without that"
    " setting the leader takes no token); the leader's log (viewer.scrape_refused) says which\n"
)
"""The answer to a scrape whose ``Authorization`` is not taken, the same whether the leader has
a ``metrics_token_file`` or not (``ViewerApp._scrape_refused``)."""


class ViewerApp:
    """The handlers and what they read: the grants, the snapshot reader, the clock."""

    def __init__(
        self,
        *,
        reader: Reader,
        grants: Grants,
        clock: Callable[[], dt.datetime],
        address: str,
        scrape_token: str | None,
        closing: asyncio.Event,
        refusals_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.grants = grants
        self.clock = clock
        self.address = address
        self.scrape_token = scrape_token
        self.closing = closing
        # The refused logins' log lines: a source's first, then a summary a minute.
        self.refusals = SampledLog(clock=refusals_clock)
        # Likewise the refused scrapes of /metrics (a bearer token not taken).
        self.scrape_refusals = SampledLog(clock=refusals_clock)
        self._shared: collections.OrderedDict[str | None, tuple[float, int, Snapshot]] = (
            collections.OrderedDict()
        )
        # What the live streams drew of a shared snapshot, by (selection, language): the
        # snapshot and its content (``_content``); and the events from one content to the
        # next, by the two contents' ids (held, so their ids stay theirs: ``_event``).
        self._drawn: collections.OrderedDict[
            tuple[str | None, str], tuple[Snapshot, pages.Content]
        ] = collections.OrderedDict()
        self._events: collections.OrderedDict[
            tuple[int, int], tuple[pages.Content | None, pages.Content, bytes]
        ] = collections.OrderedDict()
        self.drawn = 0  # contents drawn for the live streams (a test counts them)
        self._streams: collections.Counter[str] = collections.Counter()  # open, per session
        self._reading = asyncio.Lock()
        # /api/v1/schema's and /metrics' reads: one at a time, and what one read is taken by
        # the requests that came before it began (``_one_at_a_time``), by endpoint: (how many
        # requests had come as the read began, the answer's body). Emptied when none waits.
        self._heavy = asyncio.Lock()
        self._drawing = asyncio.Lock()  # ``_apart``: the draws' turns, on the loop
        self._drawing_now = threading.Lock()  # ``_apart``: held by the thread that draws
        self._heavy_read: dict[str, tuple[int, bytes]] = {}
        self._heavy_waiting = 0
        self._heavy_arrivals = 0  # requests for either so far (they count on: an int)
        self._forgetting: asyncio.TimerHandle | None = None  # ``_forget_later``
        self._closed = False  # ``close``: no timer after it (streams end after it)
        # Built on the event loop (the app is made when the first connection arrives).
        self.pulse = Pulse(asyncio.get_running_loop())
        reader.store.db.on_commit.append(self.pulse.tell)
        self.static = {
            name: (kind, (resources.files("leader.viewer") / "static" / name).read_bytes())
            for name, kind in STATIC.items()
        }

    def close(self) -> None:
        """The leader stops: no more telling; the live streams wake and see ``closing``."""
        with contextlib.suppress(ValueError):
            self.reader.store.db.on_commit.remove(self.pulse.tell)
        self._closed = True  # (the live streams end after this, each asking for a timer)
        if self._forgetting is not None:
            self._forgetting.cancel()
            self._forgetting = None
        self.pulse.tell()

    def make(self) -> web.Application:
        app = web.Application(middlewares=[self._only_get, self._language, self._session])
        app.on_response_prepare.append(self._headers)
        routes = app.router
        routes.add_get("/", self.index)
        routes.add_get("/rollouts/{rollout_id}", self.rollout)
        routes.add_get("/events", self.events)
        routes.add_get("/api/v1/schema", self.api_schema)
        routes.add_get("/metrics", self.metrics)
        routes.add_get("/login/{secret}", self.login_page)
        routes.add_get("/login/{secret}/open", self.login)
        routes.add_get("/static/{name}", self.static_file)
        routes.add_post(SIGN_OUT_PATH, self.sign_out)
        return app

    # --- what every request goes through ------------------------------------------------------

    @web.middleware
    async def _only_get(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Nothing but GET and HEAD, on any path, known or not: nothing here takes input; but
        the sign-out, which takes POST only."""
        if request.path == SIGN_OUT_PATH:
            if request.method != "POST":
                return web.Response(
                    status=405,
                    text="405: sign out with the button on the viewer's page (POST only)\n",
                    headers={"Allow": "POST"},
                )
            return await handler(request)
        if request.method not in ALLOWED_METHODS:
            return web.Response(
                status=405,
                text="405: the viewer is read-only (GET and HEAD only)\n",
                headers={"Allow": ", ".join(ALLOWED_METHODS)},
            )
        return await handler(request)

    @web.middleware
    async def _session(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every path but the login, the static files and the sign-out (which ends a valid
        session, if it is sent one) needs a valid session (or, for /metrics, the scrape
        token)."""
        if request.path.startswith(("/login/", "/static/")) or request.path == SIGN_OUT_PATH:
            return await handler(request)  # (the sign-out looks at its session itself)
        if request.path == "/metrics" and self._scrape_token_ok(request):
            return await handler(request)
        session_id = request.cookies.get(SESSION_COOKIE, "")
        grant = await self._grant(session_id)
        if grant is None:
            if request.path == "/metrics" and "Authorization" in request.headers:
                return self._scrape_refused(request)
            if not session_id:
                return self._denied(request, "none")
            reason = "session"  # (a copy of a signed-out session's cookie: "signed_out")
            if _SECRET.fullmatch(session_id):
                reason = await asyncio.to_thread(self.grants.ended, session_id)
            return self._denied(request, reason)
        request[GRANT] = grant
        return await handler(request)

    async def _grant(self, session_id: str) -> Grant | None:
        if not _SECRET.fullmatch(session_id):
            return None
        return await asyncio.to_thread(self.grants.session, session_id, self.clock())

    def _scrape_token_ok(self, request: web.Request) -> bool:
        if self.scrape_token is None:
            return False
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        # (surrogateescape: a header aiohttp read as other than UTF-8 is a wrong token, not a
        # 500 and an error line that anybody could have the leader write: review s67 M2)
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("utf-8", "surrogateescape"), self.scrape_token.encode()
        )

    def _scrape_refused(self, request: web.Request) -> web.Response:
        """A scrape of /metrics whose bearer token is not taken: 401 with one line of text
        that says why, and a log line for the source's first (then a summary a minute:
        anybody may send these). It was the HTML page about login links and no line at all:
        the admin whose Prometheus showed "401" found nothing that said why (review s69
        revlogs M3). Nothing of the token is logged or echoed. The answer is the same whether
        the leader has a ``metrics_token_file`` or not (``SCRAPE_REFUSED``: a caller learnt
        which from it; review s69, left): the log line says which (its reason and hint)."""
        if self.scrape_token is None:
            reason = "no_token_file"
            why = (
                "this leader has no [leader].metrics_token_file, so it takes no bearer token:"
                " set one in leader.toml and restart the leader"
            )
        else:
            reason = "wrong_token"
            why = (
                "the Authorization header is not Bearer and the token in"
                " [leader].metrics_token_file (the leader reads that file when it starts)"
            )
        if self.scrape_refusals.first(source_key(request.remote), reason):
            log.info("viewer.scrape_refused", remote=request.remote, reason=reason, hint=why)
        if (summary := self.scrape_refusals.summary()) is not None:
            log.warning(
                "viewer.scrapes_refused_summary",
                **summary.fields(),
                detail="/metrics requests refused in that time, not logged one by one: check the"
                " scraper's token",
            )
        return web.Response(
            status=401,
            text=SCRAPE_REFUSED,
            headers={"WWW-Authenticate": 'Bearer realm="tlsroll"'},
        )

    @web.middleware
    async def _language(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """``?lang=en`` (or ``de``) is remembered in a cookie (not a secret)."""
        response = await handler(request)
        lang = request.query.get("lang")
        if lang in LANGS and lang != request.cookies.get(LANG_COOKIE) and not response.prepared:
            response.set_cookie(
                LANG_COOKIE, lang, max_age=365 * 86400, path="/", secure=True, samesite="Strict"
            )
        return response

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        if request.get(SIGN_OUT_FORM):
            response.headers["Content-Security-Policy"] = CSP_SIGN_OUT_FORM
            response.headers["Referrer-Policy"] = REFERRER_SIGN_OUT_FORM

    def _words(self, request: web.Request) -> Words:
        return Words.of(pick_lang(request.query.get("lang"), request.cookies.get(LANG_COOKIE)))

    def _denied(self, request: web.Request, reason: str) -> web.Response:
        """401 with the page that says how to get access."""
        headers = {"WWW-Authenticate": 'Bearer realm="tlsroll"'}
        if request.path.startswith("/api/"):  # a script's: JSON (rev57b L2: the HTML page)
            return web.json_response(
                {
                    "error": "no session: get a login link with `tlsroll viewer grant`",
                    "reason": reason,  # as the page's data-reason: none, session, …
                },
                status=401,
            )
        from leader.viewer import pages  # noqa: PLC0415 - when first asked for (see the top)

        return web.Response(
            status=401,
            text=pages.denied_page(self._words(request), reason),
            content_type="text/html",
            headers=headers if request.path == "/metrics" else None,
        )

    # --- pages --------------------------------------------------------------------------------

    async def _snapshot(
        self,
        rollout_id: str | None,
        *,
        every: bool = False,
        times: bool = False,
        clients: bool = True,
        page: bool = False,
    ) -> Snapshot:
        return await asyncio.to_thread(
            self.reader.read, rollout_id, every=every, times=times, clients=clients, page=page
        )

    async def _shared_snapshot(self, rollout_id: str | None) -> Snapshot:
        """A snapshot for the live streams and the pages: read after the store's last write,
        and at most ``SHARED_SECONDS`` old. Kept for the next asker: at most ``KEPT_SHARED``
        (the least recently used out), stale ones dropped at every call, and none of a rollout
        that does not exist (any id a client asks for would hold a snapshot)."""
        async with self._reading:
            now = time.monotonic()
            commits = self.reader.store.db.commits
            for key, (at, count, _) in list(self._shared.items()):
                if now - at >= SHARED_SECONDS or count != commits:
                    del self._shared[key]
            hit = self._shared.get(rollout_id)
            if hit is not None:
                self._shared.move_to_end(rollout_id)
                return hit[2]
            # (the page draws no node's client list, only who is still on http; and of each
            # node only its row)
            snap = await self._snapshot(rollout_id, clients=False, page=True)
            if rollout_id is not None and snap.selected is None:
                return snap  # 404 for it: nothing kept
            # The count read before the snapshot: a write during the read makes it stale.
            self._shared[rollout_id] = (time.monotonic(), commits, snap)
            self._shared.move_to_end(rollout_id)
            while len(self._shared) > KEPT_SHARED:
                self._shared.popitem(last=False)
            if not self._streams:  # a page's GET that may never open its stream
                self._forget_later()
            return snap

    def _page(self, request: web.Request, rollout_id: str | None) -> pages.PageContext:
        from leader.viewer import pages  # noqa: PLC0415 - when first asked for (see the top)

        grant = request[GRANT]
        query = {"lang": self._words(request).lang}
        if rollout_id is not None:
            query["rollout"] = rollout_id
        return pages.PageContext(
            address=self.address,
            grant_name=grant.name,
            grant_until=grant.expires_at,
            events_url=f"/events?{urlencode(query)}",
        )

    async def index(self, request: web.Request) -> web.Response:
        return await self._schema_page(request, None)

    async def rollout(self, request: web.Request) -> web.Response:
        return await self._schema_page(request, request.match_info["rollout_id"])

    async def _schema_page(self, request: web.Request, rollout_id: str | None) -> web.Response:
        # What the live streams read, if no write came since (a page opened while another is
        # open, or reloaded), as its stream's first read then is (issue 15).
        snap = await self._shared_snapshot(rollout_id)
        if rollout_id is not None and snap.selected is None:
            raise web.HTTPNotFound(text=f"no rollout {shown(rollout_id)}\n")
        from leader.viewer import pages  # noqa: PLC0415 - when first asked for (see the top)

        words, page = self._words(request), self._page(request, rollout_id)
        html = await self._apart(functools.partial(pages.schema_page, snap, words, page))
        request[SIGN_OUT_FORM] = True
        return web.Response(text=html, content_type="text/html")

    async def _apart(self, draw: Callable[[], T]) -> T:
        """``draw()`` (a page, or a stream's live part and its event) in a thread, one at a
        time. A cold draw (nothing kept: the first after the start, another rollout's, the
        other language, or after the last page closed) of a 500-node rollout's page takes a
        few hundred ms; drawn
        on the event loop, it held every other request (the stylesheet, a link's page) and the
        agents' heartbeats and the admin socket (session 67's closing read), and requests
        whose snapshot was shared drew one after another in one round (review s67 L1: 16
        requests, 5 s). One at a time still: the draws share what is kept of earlier ones
        (``pages.DRAWN``, ``_drawn``, ``_events``), and a page's draw is mostly Python,
        which one thread runs at a time anyway; ``_forget`` waits while one is under way."""

        def drawn() -> T:
            # (a draw whose request was cancelled goes on in its thread, the asyncio lock
            # released: the next waits for it here)
            with self._drawing_now:
                return draw()

        async with self._drawing:
            return await asyncio.to_thread(drawn)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The live part of the page as server-sent events: sent at once, then again whenever
        it changes; ``unauthorized`` (and the end) when the session expires or is revoked.
        404 for a rollout that does not exist. Past ``MAX_STREAMS`` open, or
        ``MAX_STREAMS_PER_SESSION`` for one session, the stream says ``busy`` and to come
        back in ``BUSY_RETRY_MS``, and ends (the page shows itself as not live meanwhile)."""
        rollout_id = request.query.get("rollout") or None
        if rollout_id is not None:  # as /rollouts/{id} answers: no stream for nothing
            snap = await self._shared_snapshot(rollout_id)
            if snap.selected is None:
                raise web.HTTPNotFound(text=f"no rollout {shown(rollout_id)}\n")
        session_id = request.cookies.get(SESSION_COOKIE, "")
        if request.method != "HEAD" and (
            self._streams.total() >= MAX_STREAMS
            or self._streams[session_id] >= MAX_STREAMS_PER_SESSION
        ):
            log.warning(
                "viewer.too_many_streams",
                open=self._streams.total(),
                limit=MAX_STREAMS,
                per_session=MAX_STREAMS_PER_SESSION,
                hint="each open viewer page holds a live stream; this one is shown not live and "
                "tries again in 30 s: close viewer tabs not in use (one sign-in: at most "
                f"{MAX_STREAMS_PER_SESSION}); if few are open, look for a client that opens many",
            )
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            response.force_close()  # its connection too: the browser opens one when it is back
            await response.prepare(request)
            with contextlib.suppress(ConnectionResetError):
                await response.write(f"retry: {BUSY_RETRY_MS}\n\n".encode() + sse("busy", ""))
            return response
        self._streams[session_id] += 1
        try:
            return await self._stream(request, rollout_id, session_id)
        finally:
            self._streams[session_id] -= 1
            if self._streams[session_id] <= 0:
                del self._streams[session_id]
            if not self._streams:  # the last page closed: what was read and drawn for it goes
                if not self._drawing.locked():  # (else the draw's thread puts it back after)
                    self._forget()
                self._forget_later()  # and what a read or a draw under way puts back

    def _forget_later(self) -> None:
        """``_forget`` again ``SHARED_SECONDS`` from now if no stream is open then and no read
        is under way (else later again): a read under way as the last stream ends (a new
        page's GET) puts back what it read and drew, and a GET of a page that never opens
        its stream (no JavaScript, a scripted check) keeps it too; it stayed until some later
        stream ended (review s44rev3 L7). (By then a page that opens its stream no longer
        shares that read: it is stale, ``_shared_snapshot``.)"""
        if self._forgetting is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._forgetting = loop.call_later(SHARED_SECONDS, self._forget_idle)

    def _forget_idle(self) -> None:
        self._forgetting = None
        if self._streams:  # a page is open: its stream's end forgets
            return
        if self._reading.locked() or self._drawing.locked():
            self._forget_later()
            return
        self._forget()

    def _forget(self) -> None:
        """What the open pages shared, read and drawn: none is open any more (s43rev3 Low 2;
        issue 15: at 500 nodes the rows, timelines and node records stayed, ~4 MiB of Python
        objects after the page had closed)."""
        from leader.viewer import pages  # noqa: PLC0415 - when first asked for (see the top)

        with self._drawing_now:  # (free unless a cancelled request's draw is still under way)
            self._drawn.clear()
            self._events.clear()
            pages.DRAWN.clear()
        self._shared.clear()
        self.reader.forget_pages()

    async def _stream(
        self, request: web.Request, rollout_id: str | None, session_id: str
    ) -> web.StreamResponse:
        words = self._words(request)
        page = self._page(request, rollout_id)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        last: pages.Content | None = None
        quiet = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            await response.write(b"retry: 2000\n\n")
            while not self.closing.is_set():
                if request.transport is None or request.transport.is_closing():
                    break
                if await self._grant(session_id) is None:
                    await response.write(sse("unauthorized", ""))
                    break
                changed = self.pulse.event  # before the read: see ``Pulse``
                began = time.monotonic()
                snap = await self._shared_snapshot(rollout_id)
                content, event = await self._apart(
                    functools.partial(self._content_event, last, rollout_id, snap, words, page)
                )
                # A large cluster's page takes longer to read and draw: the gap grows with it,
                # so that a page open during a rollout takes at most a third of the leader.
                gap = max(EVENT_GAP, 2 * (time.monotonic() - began))
                if event:
                    await response.write(event)
                    last, quiet = content, time.monotonic()
                elif time.monotonic() - quiet >= KEEPALIVE:
                    await response.write(b": keepalive\n\n")
                    quiet = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(EVENT_INTERVAL - gap, 0.0))
                if not self.closing.is_set():
                    await asyncio.sleep(gap)
        return response

    def _content_event(
        self,
        last: pages.Content | None,
        rollout_id: str | None,
        snap: Snapshot,
        words: Words,
        page: pages.PageContext,
    ) -> tuple[pages.Content, bytes]:
        """(In ``_apart``'s thread) the content of ``snap`` and the event that takes a page
        that shows ``last`` to it: both made off the event loop (session 68: the event, the
        part whole at 500 nodes, is ~0.9 MiB of text joined and encoded), and one at a time
        with the draws, whose ``_events`` they share."""
        content = self._content(rollout_id, snap, words, page)
        return content, self._event(last, content)

    def _content(
        self, rollout_id: str | None, snap: Snapshot, words: Words, page: pages.PageContext
    ) -> pages.Content:
        """The live part of the page drawn of ``snap`` (``pages.content_parts``), once for
        every open page of this selection and language: the streams share their snapshots
        (``_shared_snapshot``), and what a snapshot's content shows of ``page`` is the leader's
        address only, the same for all."""
        from leader.viewer import pages  # noqa: PLC0415 - when first asked for (see the top)

        key = (rollout_id, words.lang)
        hit = self._drawn.get(key)
        if hit is not None and hit[0] is snap:
            self._drawn.move_to_end(key)
            return hit[1]
        content = pages.content_parts(snap, words, page)
        self.drawn += 1
        self._drawn[key] = (snap, content)
        self._drawn.move_to_end(key)
        while len(self._drawn) > KEPT_DRAWN:
            self._drawn.popitem(last=False)
        return content

    def _event(self, last: pages.Content | None, content: pages.Content) -> bytes:
        """What takes a page that shows ``last`` (None: nothing yet) to ``content``: the part
        whole (``update``), only the parts that changed (``patch``), or nothing (b"": nothing
        changed). Made once for all the open pages that go from one to the other, unless
        larger than ``KEPT_EVENT_BYTES`` (the part whole: made for each page)."""
        key = (id(last), id(content))
        hit = self._events.get(key)
        if hit is not None and hit[0] is last and hit[1] is content:
            return hit[2]
        parts = None if last is None else content.changed(last)
        if parts is None:
            event = sse("update", content.html())
        elif parts:
            # Only what changed: a write of a rollout changes a node or two, and a 500-node
            # page is ~0.8 MiB (issue 15); viewer.js puts each part in place.
            event = sse("patch", json.dumps(parts, ensure_ascii=False, separators=(",", ":")))
        else:
            event = b""
        if len(event) <= KEPT_EVENT_BYTES:
            self._events[key] = (last, content, event)
        while len(self._events) > KEPT_EVENTS:
            self._events.popitem(last=False)
        return event

    async def _one_at_a_time(self, key: str, make: Callable[[], Awaitable[bytes]]) -> bytes:
        """The body ``make`` reads and draws, made for one request at a time (review s67 M1):
        ``/api/v1/schema`` reads every stored rollout whole under the store's one lock (about
        0.1 s at ten 500-node rollouts, and more with each), which the rollout engine and the
        agents' heartbeats write under; one session's requests, each on a connection of its
        own, held it nearly all the time. A request takes a body made for another only if
        it arrived before that body's read began (review s67 viewer L2: by the store's
        ``commits`` alone, one that came after the read took it too, though the leader's
        state in memory, who is online, the heartbeats' ages, had moved on); else it makes
        the next, which the requests that came meanwhile take. Nothing is kept once no
        request waits."""
        arrived = self._heavy_arrivals  # the requests before this one
        self._heavy_arrivals += 1
        self._heavy_waiting += 1
        try:
            async with self._heavy:
                hit = self._heavy_read.get(key)
                if hit is not None and arrived < hit[0]:
                    return hit[1]
                began = self._heavy_arrivals  # every request so far came before this read
                body = await make()
                self._heavy_read[key] = (began, body)
                return body
        finally:
            self._heavy_waiting -= 1
            if not self._heavy_waiting:
                self._heavy_read.clear()

    async def api_schema(self, request: web.Request) -> web.Response:
        async def make() -> bytes:
            snap = await self._snapshot(None, every=True)
            # (in a thread: every stored rollout's JSON, which grows with each, held the event
            # loop as it was made; session 68. One at a time still: ``_one_at_a_time``)
            return await asyncio.to_thread(_schema_json, snap.data)

        body = await self._one_at_a_time("api", make)
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST  # noqa: PLC0415 - when first asked for (see the top)

        from leader.viewer import metrics  # noqa: PLC0415 - when first asked for (see the top)

        async def make() -> bytes:
            snap = await self._snapshot(None, times=True)
            return await asyncio.to_thread(metrics.render, snap)

        body = await self._one_at_a_time("metrics", make)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def login_page(self, request: web.Request) -> web.Response:
        """The link itself: a page with one link to the sign-in URL. Spends nothing, so a
        preview or a scanner that fetches the link does not use it up; a link that cannot be
        used gets the 401 page, by a read-only check (HEAD: not even that)."""
        if request.method == "HEAD":
            return web.Response(content_type="text/html")
        secret = request.match_info["secret"]
        try:
            if not _SECRET.fullmatch(secret):
                raise LoginRefused("unknown")
            await asyncio.to_thread(self.grants.check, secret, self.clock())
        except LoginRefused as exc:
            return await self._refused(request, exc)
        from leader.viewer import pages  # noqa: PLC0415 - when first asked for (see the top)

        html = pages.login_page(self._words(request), f"/login/{secret}/open")
        return web.Response(text=html, content_type="text/html")

    async def login(self, request: web.Request) -> web.Response:
        """The sign-in URL: spend the link, set the session cookie, redirect to / (HEAD spends
        nothing). Not from a link on another site (``_navigated_here``; review s67 viewer L1:
        a page anywhere could link a visitor to its own unused link's sign-in URL, and the
        navigation, top-level, would spend it and replace the visitor's session cookie, a
        Strict one too): 403, nothing spent or set. From the link's page (``same-origin``)
        in a browser that holds a valid session of another grant: 409, nothing spent or set
        (session 67's closing read: that page cannot refuse other sites, a web mail's link
        is one, so a site could send a visitor to its own link's page, and the click on
        "Sign in" replaced the visitor's session); the person signs out first. The sign-in
        URL pasted (``none``) still replaces it: only the person can navigate so."""
        if request.method == "HEAD":
            return web.Response(content_type="text/html")
        if not _navigated_here(request):
            self._log_refusal(request, CROSS_SITE)
            response = self._denied(request, CROSS_SITE)
            response.set_status(403)
            return response
        secret = request.match_info["secret"]
        now = self.clock()
        try:
            if not _SECRET.fullmatch(secret):
                raise LoginRefused("unknown")
            if request.headers.get("Sec-Fetch-Site") == "same-origin":
                held = await self._grant(request.cookies.get(SESSION_COOKIE, ""))
                if held is not None:
                    # (its own link, used: ``_refused`` sends it to the schema)
                    await asyncio.to_thread(self.grants.check, secret, now)
                    self._log_refusal(request, SIGNED_IN)
                    response = self._denied(request, SIGNED_IN)
                    response.set_status(409)
                    return response
            grant, session_id = await asyncio.to_thread(self.grants.login, secret, now)
        except LoginRefused as exc:
            return await self._refused(request, exc)
        log.info("viewer.login_succeeded", grant_id=grant.id, name=grant.name)
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=max(1, int((grant.expires_at - now).total_seconds())),
            path="/",
            secure=True,
            httponly=True,
            samesite="Strict",
        )
        return response

    async def _refused(self, request: web.Request, refused: LoginRefused) -> web.Response:
        """A link that cannot be used: the 401 page, but for a used one opened again in the
        browser its use signed in (the cookie's session is the link's grant's, still valid):
        a redirect to the schema (review s63 L3: a bookmark of the link, the mail's link
        clicked again, showed that browser "already used" while it was signed in)."""
        if refused.reason == "used" and refused.grant_id:
            session_id = request.cookies.get(SESSION_COOKIE, "")
            held = await self._grant(session_id)
            if held is not None and held.id == refused.grant_id:
                return web.Response(status=303, headers={"Location": "/"})
        self._log_refusal(request, refused.reason)
        return self._denied(request, refused.reason)

    def _log_refusal(self, request: web.Request, reason: str) -> None:
        """A refused login's log line: sampled per source, naming it: anybody who reaches the
        port can ask for links, as fast as the leader answers (review s66 logs M2;
        ``tlsroll.logsample``)."""
        if self.refusals.first(source_key(request.remote), reason):
            log.info("viewer.login_refused", remote=request.remote, reason=reason)
        if (summary := self.refusals.summary()) is not None:
            log.warning(
                "viewer.logins_refused_summary",
                **summary.fields(),
                detail="viewer sign-ins refused in that time, not logged one by one: tlsroll "
                "viewer list shows the links in force",
            )

    async def sign_out(self, request: web.Request) -> web.Response:
        """The sign-out button (POST only, ``_only_get``): ends the session the cookie names
        (its grant, ``Grants.sign_out``: a copy of the cookie stops working, and its open
        live streams end at their next look, woken by the write as after `tlsroll viewer
        revoke`), clears the cookie and answers the page that says how to come back. Only
        from the viewer's own pages (``_same_origin``): anything else is 403 and changes
        nothing. Without a valid session (one tab signed out, then another), nothing to end:
        the same page and the cookie cleared."""
        if not _same_origin(request):  # (not logged: anybody could have the leader write)
            return web.Response(
                status=403, text="403: sign out with the button on the viewer's own page\n"
            )
        session_id = request.cookies.get(SESSION_COOKIE, "")
        if _SECRET.fullmatch(session_id):
            grant = await asyncio.to_thread(self.grants.sign_out, session_id, self.clock())
            if grant is not None:
                log.info("viewer.signed_out", grant_id=grant.id, name=grant.name)
        from leader.viewer import pages  # noqa: PLC0415 - when first asked for (see the top)

        response = web.Response(
            text=pages.signed_out_page(self._words(request)), content_type="text/html"
        )
        # As it was set (a __Host- cookie is taken only so, also to clear it), ending now.
        response.set_cookie(
            SESSION_COOKIE,
            "",
            max_age=0,
            path="/",
            secure=True,
            httponly=True,
            samesite="Strict",
        )
        return response

    async def static_file(self, request: web.Request) -> web.Response:
        found = self.static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        kind, body = found
        return web.Response(body=body, content_type=kind, charset="utf-8")


class ViewerRequestHandler(RequestHandler):
    """aiohttp's request handler, with its own refusals in the viewer's shape: a request it
    cannot parse (400, 413, 431...) or a handler that failed (500) gets a fixed one-line text
    with the security headers and ``Server: tlsroll``, not aiohttp's text (which echoes the
    bad line) and version (audit s38 L2). What it logs is ``leader.viewer.server._HttpLog``'s
    (the error's type only)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if an answer began
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        response = web.Response(
            status=status, text=f"{status}: {phrase}\n", headers=SECURITY_HEADERS
        )
        response.force_close()
        return response


def handler_factory(server: web.Server) -> Callable[[], ViewerRequestHandler]:
    """What makes the viewer's handler for each connection, as ``server()`` makes aiohttp's
    own (with the runner's settings: its logger, ``keepalive_timeout``, ...)."""
    settings = dict(server._kwargs)  # the settings server() would pass (aiohttp's own)
    loop = asyncio.get_running_loop()
    return lambda: ViewerRequestHandler(server, loop=loop, **settings)


def _navigated_here(request: web.Request) -> bool:
    """Whether a browser came to the sign-in URL by itself, not by a link on another site:
    ``Sec-Fetch-Site`` ``same-origin`` (the sign-in page's link) or ``none`` (the link typed
    or pasted, or opened from a mail or chat program: what Chromium sends for either; the
    browser test checks both). Another site's link (``cross-site``, or ``same-site``: another
    port of the same host) is refused. Without the header (a script, a browser from before
    it), allowed: nothing else tells a navigation's origin (a GET carries no ``Origin``)."""
    site = request.headers.get("Sec-Fetch-Site")
    return site is None or site in ("same-origin", "none")


def _same_origin(request: web.Request) -> bool:
    """Whether a request comes from the viewer's own pages, by what the browser says (a page
    of another site cannot set either header): ``Sec-Fetch-Site: same-origin`` (every current
    browser sends it); without it, ``Origin`` the viewer's own (the schema pages' referrer
    policy, ``same-origin``, has the form sent with it: ``REFERRER_SIGN_OUT_FORM``). ``Origin:
    null`` (a browser under a ``no-referrer`` policy) is not enough alone; an ``Origin`` of
    another site refuses all the same. A request with neither (not a browser's) is refused:
    the button is the way."""
    own = f"https://{request.host}"
    origin = request.headers.get("Origin")
    if origin is not None and origin not in ("null", own):
        return False
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    return origin == own


def _schema_json(data: object) -> bytes:
    """``/api/v1/schema``'s body."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def sse(event: str, data: str) -> bytes:
    """One server-sent event; a line of ``data`` each (the browser joins them with \\n).
    Made of the text whole, not line by line: a page's whole live part at 500 nodes is
    ~0.9 MiB in some 14,000 lines, each a string of its own twice over (issue 15)."""
    body = data.replace("\r", "").replace("\n", "\ndata: ")
    return f"event: {event}\ndata: {body}\n\n".encode()
