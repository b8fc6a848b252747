"""Run the web viewer inside the leader daemon: https on ``[leader].viewer_port`` (9444).

    viewer = Viewer.build(cfg, state, schema)   # the certificate is issued here if needed
    await viewer.start()                        # OSError if the port is taken
    ...
    await viewer.stop()                         # open /events streams end, then the listener

The listener serves on the leader's address only, with the viewer's own certificate from the
cluster CA (``leader.viewer.certificate``) and the TLS settings every tlsroll listener uses.
``renew_if_due`` (the daemon calls it with every check of the expiry watch) issues a new
certificate when the old one is due and loads it into the listener's context: new connections
get it, open ones keep theirs, no restart.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from aiohttp import web
from cryptography import x509

from leader.config import LeaderConfig
from leader.expiry import AGENT_HORIZON_FRACTION
from leader.schema_store import SchemaStore
from leader.service import LeaderState
from leader.viewer import certificate
from leader.viewer.app import ViewerApp
from leader.viewer.grants import Grants
from leader.viewer.snapshot import Reader
from tlsroll import logs, pki, tls
from tlsroll.errors import ConfigError, TerminalError
from tlsroll.fsutil import check_private_file
from tlsroll.rpc import hostport

SHUTDOWN_SECONDS = 5.0
log = logs.get_logger(__name__)


def base_url(address: str, port: int) -> str:
    """``https://ADDRESS:PORT`` (an IPv6 address in brackets)."""
    return f"https://{hostport(address, port)}"


def read_scrape_token(cfg: LeaderConfig) -> str | None:
    """The bearer token for /metrics from ``metrics_token_file`` (0600), if one is set."""
    path = cfg.metrics_token_file
    if path is None:
        return None
    check_private_file(path)
    token = path.read_text().strip()
    if len(token) < 16:
        raise ConfigError(cfg.path, "[leader].metrics_token_file", f"{path}: under 16 characters")
    return token


class Viewer:
    def __init__(
        self,
        app: ViewerApp,
        address: str,
        port: int,
        tls_files: tuple[Path, Path],
        ensure: Callable[[], x509.Certificate] | None = None,
    ) -> None:
        """``ensure`` gives the certificate to serve, issuing a new one when it is due
        (``leader.viewer.certificate.ensure`` with the leader's CA and names)."""
        self.app = app
        self.address = address
        self.port = port
        self.tls_files = tls_files
        self.ensure = ensure
        self._runner: web.AppRunner | None = None
        self._context: ssl.SSLContext | None = None
        self.serving: x509.Certificate | None = None

    @property
    def url(self) -> str:
        return base_url(self.address, self.port)

    @classmethod
    def build(cls, cfg: LeaderConfig, state: LeaderState, schema: SchemaStore) -> Viewer:
        layout = cfg.layout

        def ensure() -> x509.Certificate:
            return certificate.ensure(layout, state.ca, cfg.address, cfg.dns_names, state.clock())

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
        )
        app = ViewerApp(
            reader=reader,
            grants=Grants(state.store.db),
            clock=state.clock,
            address=cfg.address,
            scrape_token=read_scrape_token(cfg),
            closing=asyncio.Event(),
        )
        files = (layout.viewer_cert, layout.viewer_key)
        viewer = cls(app, cfg.address, cfg.viewer_port, files, ensure)
        viewer.serving = cert
        return viewer

    def renew_if_due(self) -> bool:
        """Issue and serve a new certificate if the one served is due (see the module's
        docstring); True if it did. On the event loop: the context is the listener's."""
        if self.ensure is None or self._context is None:
            return False
        cert = self.ensure()
        if self.serving is not None and cert == self.serving:
            return False
        self._context.load_cert_chain(*self.tls_files)
        self.serving = cert
        reader = self.app.reader
        reader.own_certs = tuple(
            c
            if c.kind != "viewer"
            else replace(c, fingerprint=pki.fingerprint(cert), not_after=cert.not_valid_after_utc)
            for c in reader.own_certs
        )
        log.info(
            "viewer.certificate_reloaded",
            fingerprint=pki.fingerprint(cert),
            not_after=cert.not_valid_after_utc.isoformat(),
        )
        return True

    async def start(self) -> None:
        context = tls.server_context(*self.tls_files)
        self._context = context
        runner = web.AppRunner(self.app.make(), access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.address, self.port, ssl_context=context)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise TerminalError(
                f"cannot listen on {hostport(self.address, self.port)} (the viewer): "
                f"{exc.strerror or exc}; choose another viewer_port in leader.toml (0: off)"
            ) from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("viewer.started", url=self.url)

    async def stop(self) -> None:
        self.app.closing.set()  # /events streams end within one interval
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("viewer.stopped")
