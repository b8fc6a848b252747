"""Run the web viewer inside the leader daemon: https on ``[leader].viewer_port`` (9444).

    viewer = Viewer.build(cfg, state, schema)   # the certificate is issued here if needed
    await viewer.start()                        # TerminalError if the port is taken
    ...
    await viewer.stop()                         # open /events streams end, then the listener

``start`` binds the port and listens, but aiohttp and the app (``leader.viewer.app``, ~10 MiB
of the leader's memory) are loaded only when the first connection arrives: until then the
kernel queues it, as it would any connection the app had not yet accepted, and the leader
only watches the listening socket. A leader whose viewer nobody opens never holds them
(issue 15: the leader's memory with 500 agents). The load runs on the event loop, once
(a few hundred ms): imports in a worker thread can deadlock on 3.11's import locks.

Every host of the practice's network reaches the port, signed in or not, and the viewer
shares the leader's process with the agents' gRPC and the admin socket: the connections are
counted and capped from their accept, in all and per source, and bounded in time (TLS
handshake, request head, idle, TLS close) by ``leader.viewer.listener`` before aiohttp gets
them (audit s38 M1).

The listener serves on the leader's address only, with the viewer's own certificate from the
cluster CA (``leader.viewer.certificate``) and the TLS settings every tlsroll listener uses.
``renew_if_due`` (the daemon calls it with every check of the expiry watch, and right after a
`tlsroll ca revoke` of the viewer's serial) issues a new certificate when the old one is due or
revoked and loads it into the listener's context: new connections get it, open ones keep
theirs, no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from leader.config import LeaderConfig
from leader.expiry import AGENT_HORIZON_FRACTION
from leader.schema_store import SchemaStore
from leader.service import LeaderState
from leader.viewer import certificate
from leader.viewer.grants import Grants
from leader.viewer.listener import GatedListener, Limits
from leader.viewer.snapshot import Reader
from tlsroll import httplog, logs, pki, tls
from tlsroll.backoff import source_key
from tlsroll.errors import ConfigError, NotRegularFile, TerminalError, UnsafePermissions
from tlsroll.fsutil import check_private_file, read_regular
from tlsroll.logsample import SampledLog
from tlsroll.rpc import hostport

if TYPE_CHECKING:
    from aiohttp import web

    from leader.viewer.app import ViewerApp

SHUTDOWN_SECONDS = 5.0
BACKLOG = 128  # aiohttp's own default for its sites
# How long a connection may go without a whole request head: from its TLS handshake (the
# listener's head_timeout), and from each answer (aiohttp's keepalive_timeout; its default is an
# hour). A browser whose idle
# connection was closed opens a new one for its next request (audit s38 M1;
# ``leader.viewer.listener``).
HEAD_SECONDS = 15.0
log = logs.get_logger(__name__)


class _HttpLog(httplog.ServerLog):
    """aiohttp's server log for the viewer: a request it cannot parse is one line with the
    error's type. Its message would hold the start of the line, and an overlong Cookie or
    Authorization header starts with the session id or the scrape token (audit s34 H2).
    Anybody who reaches the port can send such requests as fast as the leader answers: the
    lines are sampled per source (a source's first, naming it, then
    ``viewer.bad_requests_summary`` at most once a minute: session 67)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.sampled = SampledLog(clock=clock)

    def bad_request(self, error_type: str, remote: str | None) -> None:
        if self.sampled.first(source_key(remote), error_type):
            log.warning(
                "viewer.bad_request",
                remote=remote,
                error_type=error_type,
                detail="a browser or scanner sent a request the viewer does not take; sampled "
                "per source",
            )
        if (summary := self.sampled.summary()) is not None:
            log.warning(
                "viewer.bad_requests_summary",
                **summary.fields(),
                detail="bad requests to the viewer in that time, not logged one by one",
            )

    def failed(self, error_type: str, where: str) -> None:
        log.error(
            "viewer.request_failed",
            error_type=error_type,
            where=where,
            hint="the page got an error; a bug in tlsroll: report it with the lines before this "
            "one",
        )


def base_url(address: str, port: int) -> str:
    """``https://ADDRESS:PORT`` (an IPv6 address in brackets)."""
    return f"https://{hostport(address, port)}"


def read_scrape_token(cfg: LeaderConfig) -> str | None:
    """The bearer token for /metrics from ``metrics_token_file`` (0600), if one is set."""
    path = cfg.metrics_token_file
    if path is None:
        return None
    try:
        check_private_file(path)
        # (``read_regular``: a FIFO swapped in after the check is not waited on either)
        token = read_regular(path).decode().strip()
    except FileNotFoundError:  # the config's to fix: exit 2 (review s47rtin L4)
        raise ConfigError(
            cfg.path, "[leader].metrics_token_file", f"{path}: no such file"
        ) from None
    except (NotRegularFile, UnsafePermissions) as exc:
        # A directory was told "chmod 600", a FIFO was read for ever; a file others may read
        # or another user's is the admin's to fix as well: exit 2, which the unit does not
        # restart (rev57b M3: exit 1, restarted every 5 s for ever).
        raise ConfigError(cfg.path, "[leader].metrics_token_file", str(exc)) from None
    except UnicodeDecodeError:  # (a key or a binary file named by mistake: no traceback)
        raise ConfigError(
            cfg.path, "[leader].metrics_token_file", f"{path}: not UTF-8 text"
        ) from None
    if len(token) < 16:
        raise ConfigError(cfg.path, "[leader].metrics_token_file", f"{path}: under 16 characters")
    return token


class Viewer:
    def __init__(
        self,
        make_app: Callable[[asyncio.Event], ViewerApp],
        reader: Reader,
        address: str,
        port: int,
        tls_files: tuple[Path, Path],
        ensure: Callable[[], x509.Certificate] | None = None,
    ) -> None:
        """``make_app`` builds the aiohttp app when the first connection arrives (see the
        module's docstring), given the event that ends its /events streams; ``reader`` is
        what the app's pages read (kept here so that the daemon can wire it up before then).
        ``ensure`` gives the certificate to serve, issuing a new one when it is due
        (``leader.viewer.certificate.ensure`` with the leader's CA and names)."""
        self.make_app = make_app
        self.reader = reader
        self.address = address
        self.port = port
        self.tls_files = tls_files
        self.ensure = ensure
        self.closing = asyncio.Event()
        self.app: ViewerApp | None = None  # once loaded
        self._sock: socket.socket | None = None  # listening, until the app is loaded
        self._loading: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._listener: GatedListener | None = None
        self._context: ssl.SSLContext | None = None
        self.serving: x509.Certificate | None = None

    @property
    def url(self) -> str:
        return base_url(self.address, self.port)

    @property
    def loaded(self) -> bool:
        """Whether aiohttp and the app serve (a connection has arrived since ``start``)."""
        return self._runner is not None

    @classmethod
    def build(cls, cfg: LeaderConfig, state: LeaderState, schema: SchemaStore) -> Viewer:
        layout = cfg.layout

        def ensure() -> x509.Certificate:
            return certificate.ensure(
                layout,
                state.ca,
                cfg.address,
                cfg.dns_names,
                state.clock(),
                dt.timedelta(days=cfg.expiry_warning_days),
                state.store.is_revoked,
            )

        cert = ensure()
        reader = Reader(
            state.store,
            schema,
            state.clock,
            state.online,
            [
                ("ca", state.ca.cert),
                ("leader", pki.load_certs_pem(layout.tls_cert.read_bytes())[0]),
                ("viewer", cert),
            ],
            agent_near=state.agent_cert_lifetime * AGENT_HORIZON_FRACTION,
            fresh=state.fresh_reports,
            warning=dt.timedelta(days=cfg.expiry_warning_days),
        )
        scrape_token = read_scrape_token(cfg)  # a bad token file stops the leader at start

        def make_app(closing: asyncio.Event) -> ViewerApp:
            from leader.viewer.app import ViewerApp  # noqa: PLC0415 - aiohttp: see the top

            return ViewerApp(
                reader=reader,
                grants=Grants(state.store.db),
                clock=state.clock,
                address=cfg.address,
                scrape_token=scrape_token,
                closing=closing,
            )

        files = (layout.viewer_cert, layout.viewer_key)
        viewer = cls(make_app, reader, cfg.address, cfg.viewer_port, files, ensure)
        viewer.serving = cert
        return viewer

    def show_own(self, kind: str, cert: x509.Certificate) -> None:
        """Show ``cert`` as the leader's own certificate ``kind`` (``ca``, ``leader``) from
        now on: the CA's after ``tlsroll ca renew``, the leader's issued again then."""
        self.reader.own_renewed(kind, cert)

    def renew_if_due(self) -> bool:
        """Issue and serve a new certificate if the one served is due or revoked (see the
        module's docstring); True if it did. On the event loop: the context is the listener's."""
        if self.ensure is None or self._context is None:
            return False
        cert = self.ensure()
        if self.serving is not None and cert == self.serving:
            return False
        self._context.load_cert_chain(*self.tls_files)
        self.serving = cert
        self.reader.own_renewed("viewer", cert)
        log.info(
            "viewer.certificate_reloaded",
            fingerprint=pki.fingerprint(cert),
            not_after=cert.not_valid_after_utc.isoformat(),
        )
        return True

    async def start(self) -> None:
        """Listen on the viewer's port (a taken port stops the leader here, with one line);
        the app is loaded when the first connection arrives."""
        context = tls.server_context(*self.tls_files)
        v6 = ipaddress.ip_address(self.address).version == 6
        try:
            sock = socket.create_server(
                (self.address, self.port),
                family=socket.AF_INET6 if v6 else socket.AF_INET,
                backlog=BACKLOG,
            )
        except OSError as exc:
            raise TerminalError(
                f"cannot listen on {hostport(self.address, self.port)} (the viewer): "
                f"{exc.strerror or exc}; choose another viewer_port in leader.toml (0: off)"
            ) from None
        sock.setblocking(False)
        self._context = context
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._arrived)
        log.info("viewer.started", url=self.url)

    def _arrived(self) -> None:
        """A connection waits on the listening socket: load the app once, which accepts it."""
        if self._sock is None or self._loading is not None:
            return
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._loading = asyncio.create_task(self._load(), name="viewer-load")

    async def _load(self) -> None:
        sock, context = self._sock, self._context
        assert sock is not None and context is not None
        try:
            from aiohttp import web  # noqa: PLC0415 - when first asked for (see the top)

            from leader.viewer.app import handler_factory  # noqa: PLC0415 - as aiohttp

            app = self.make_app(self.closing)
            runner = web.AppRunner(
                app.make(),
                access_log=None,
                logger=_HttpLog(),
                shutdown_timeout=SHUTDOWN_SECONDS,
                keepalive_timeout=HEAD_SECONDS,
            )
            await runner.setup()
            assert runner.server is not None
            # No aiohttp site: the gate counts and bounds each connection from its accept on
            # and hands it to aiohttp once its TLS is up. It owns the listening socket from
            # here on and closes it when it stops.
            listener = GatedListener(
                handler_factory(runner.server),
                context,
                Limits(head_timeout=HEAD_SECONDS),
                backlog=BACKLOG,
            )
            try:
                await listener.start(sock)
            except BaseException:
                await runner.cleanup()
                raise
        except Exception as exc:  # the leader runs on; the viewer's port refuses from now on
            log.error(
                "viewer.load_failed",
                error=f"{type(exc).__name__}: {exc}"[:200],
                hint="restart the leader; if it happens again, set viewer_port = 0",
            )
            sock.close()
            self._sock = None
            return
        self.app, self._runner, self._listener, self._sock = app, runner, listener, None
        log.info("viewer.loaded", url=self.url)

    async def stop(self) -> None:
        self.closing.set()
        if self.app is not None:
            self.app.close()  # the /events streams wake and end
        if self._loading is not None:
            self._loading.cancel()  # nothing if it has ended
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        if self._sock is not None:  # never loaded (or stopped while loading)
            if self._loading is None:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._listener is not None:
            await self._listener.stop()  # no new connections; handshakes end
        if self._runner is not None:
            await self._runner.cleanup()  # the connections aiohttp serves
            self._runner = None
            log.info("viewer.stopped")
        if self._listener is not None:
            await self._listener.abort_all()
            self._listener = None
