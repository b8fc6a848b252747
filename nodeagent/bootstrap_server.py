"""The bootstrap service on port 9443: workstations fetch the cluster CA and enrol here.

The protocol, its keys and its MAC are in ``tlsroll.bootstrap_protocol``; this module is the https
listener (aiohttp) the agent runs once its node is switched:

    service = BootstrapService(
        address="192.168.1.5", cert_file=..., key_file=..., ca_bundle_pem=...,
        server_url="https://192.168.1.5:8443/praxis_live/", node_name="node-a",
        verifier=verifier, sign=forward_to_leader,
    )
    await service.start()            # refuses a key file others can read
    service.set_verifier(new)        # the password changed (at the managed server's restart)
    await service.stop()

``sign(csr_pem) -> certificate_pem`` is injected: in production the agent forwards the CSR to
the leader's CA, which issues a client certificate (EKU clientAuth only) for ``ws-<name>``.

Nonces are single-use and live ``nonce_ttl`` seconds; an enrol request consumes its nonce
whatever happens next, so a proof can be tried once. Refused enrol requests are counted per
source address: ``max_failures`` within ``failure_window`` seconds and further requests get
429 with Retry-After until the oldest failure leaves the window. The clock is injected
(monotonic seconds) so tests can move time. Log events name the reason and the remote
address, never the password, verifier, keys, nonce or proof.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Self

from aiohttp import web

from tlsroll import bootstrap_protocol as proto
from tlsroll import logs, pki
from tlsroll.defaults import BOOTSTRAP_PORT
from tlsroll.errors import TerminalError
from tlsroll.fsutil import check_private_file
from tlsroll.tls import server_context

SignFn = Callable[[bytes], Awaitable[bytes]]
Clock = Callable[[], float]

MAX_NONCES = 10_000  # outstanding nonces kept; the oldest is dropped beyond this
MAX_TRACKED_SOURCES = 10_000  # source addresses with recent failures kept for rate limiting
SHUTDOWN_TIMEOUT = 5.0

log = logs.get_logger(__name__)


class RateLimiter:
    """Failures per source address in a sliding window (pure; time is passed in)."""

    def __init__(self, max_failures: int, window: float) -> None:
        if max_failures < 1 or window <= 0:
            raise ValueError("max_failures must be >= 1 and window > 0")
        self.max_failures = max_failures
        self.window = window
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, source: str, now: float) -> deque[float]:
        times = self._failures.get(source)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[source]
        return times

    def retry_after(self, source: str, now: float) -> int | None:
        """Seconds until ``source`` may try again, or None if it may now."""
        times = self._recent(source, now)
        if len(times) < self.max_failures:
            return None
        return max(1, math.ceil(times[0] + self.window - now))

    def failed(self, source: str, now: float) -> None:
        times = self._recent(source, now)
        if source not in self._failures:
            self._failures[source] = times
        times.append(now)
        self._failures.move_to_end(source)
        while len(self._failures) > MAX_TRACKED_SOURCES:
            self._failures.popitem(last=False)


class NonceStore:
    """Single-use nonces with a time to live (pure; time is passed in)."""

    def __init__(self, ttl: float, limit: int = MAX_NONCES) -> None:
        self.ttl = ttl
        self.limit = limit
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def issue(self, now: float) -> str:
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)
        while len(self._expiry) >= self.limit:
            self._expiry.popitem(last=False)
        nonce = secrets.token_urlsafe(32)
        self._expiry[nonce] = now + self.ttl
        return nonce

    def consume(self, nonce: str, now: float) -> bool:
        """True if ``nonce`` was issued, is unexpired and unused; it is used up either way."""
        expiry = self._expiry.pop(nonce, None)
        return expiry is not None and now < expiry

    def __len__(self) -> int:
        return len(self._expiry)


class Refused(TerminalError):
    """An enrol request refused: HTTP status, error code, one-line message for the client."""

    def __init__(self, status: int, code: str, message: str, *, count: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.count = count  # counts towards the rate limit


class BootstrapService:
    """The https bootstrap listener of one node (see the module docstring)."""

    def __init__(
        self,
        *,
        address: str,
        cert_file: Path,
        key_file: Path,
        ca_bundle_pem: bytes,
        server_url: str,
        node_name: str,
        verifier: Mapping[str, Any],
        sign: SignFn,
        port: int = BOOTSTRAP_PORT,
        clock: Clock = time.monotonic,
        nonce_ttl: float = proto.NONCE_TTL,
        max_failures: int = 5,
        failure_window: float = 60.0,
    ) -> None:
        if not server_url.startswith("https://") or not server_url.endswith("/"):
            raise ValueError(f"server_url must be https://HOST:PORT/APP/, got {server_url!r}")
        self.address = address
        self.port = port
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.server_url = server_url
        self.node_name = node_name
        self.sign = sign
        self.clock = clock
        self.nonces = NonceStore(nonce_ttl)
        self.limiter = RateLimiter(max_failures, failure_window)
        self.set_ca_bundle(ca_bundle_pem)
        self.set_verifier(verifier)
        self._runner: web.AppRunner | None = None
        self._ssl: ssl.SSLContext | None = None

    # --- state the agent may swap while running ---------------------------------------------

    def set_verifier(self, verifier: Mapping[str, Any]) -> None:
        """Use a new password verifier from now on (ValueError if it is malformed).

        Nonces already handed out stay valid, but proofs made with the old password fail.
        """
        keys = proto.Keys.from_verifier(verifier)
        kdf = proto.KDF.of_verifier(verifier)
        self._keys, self._kdf = keys, kdf

    def set_ca_bundle(self, ca_bundle_pem: bytes) -> None:
        certs = pki.load_certs_pem(ca_bundle_pem)
        if not certs or not all(pki.is_ca(c) for c in certs):
            raise ValueError("ca_bundle_pem must hold one or more CA certificates")
        self.ca_bundle_pem = ca_bundle_pem

    def reload_certificate(self) -> None:
        """Serve the (renewed) certificate and key files to new connections."""
        check_private_file(self.key_file)
        if self._ssl is not None:
            self._ssl.load_cert_chain(self.cert_file, self.key_file)

    # --- lifecycle ----------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        check_private_file(self.key_file)
        return server_context(self.cert_file, self.key_file)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=proto.MAX_REQUEST_BYTES)
        app.router.add_get(proto.BOOTSTRAP_PATH, self.get_bootstrap)
        app.router.add_post(proto.ENROL_PATH, self.post_enrol)
        return app

    async def start(self) -> None:
        """Listen on https://address:port; UnsafePermissions if the key file is not 0600."""
        if self._runner is not None:
            raise RuntimeError("bootstrap service already started")
        self._ssl = await asyncio.to_thread(self._tls_context)  # reads the key and certificate
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.address, self.port, ssl_context=self._ssl).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = self.bound_port
        log.info("bootstrap.started", address=self.address, port=self.port, node=self.node_name)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            log.info("bootstrap.stopped", address=self.address, port=self.port)

    @property
    def bound_port(self) -> int:
        """The port actually listened on (differs from ``port`` only if that was 0)."""
        if self._runner is None:
            return self.port
        for addr in self._runner.addresses:
            return int(addr[1])
        return self.port

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- handlers -----------------------------------------------------------------------------

    async def get_bootstrap(self, request: web.Request) -> web.Response:
        now = self.clock()
        payload = {
            "version": proto.VERSION,
            "node": self.node_name,
            "server_url": self.server_url,
            "ca_bundle_pem": self.ca_bundle_pem.decode("ascii"),
            "kdf": self._kdf.to_json(),
            "nonce": self.nonces.issue(now),
            "expires_in": math.floor(self.nonces.ttl),
        }
        log.info("bootstrap.answered", remote=request.remote)
        return web.json_response(
            proto.seal(payload, self._keys), headers={"Cache-Control": "no-store"}
        )

    async def post_enrol(self, request: web.Request) -> web.Response:
        source = request.remote or "unknown"
        now = self.clock()
        retry_after = self.limiter.retry_after(source, now)
        if retry_after is not None:
            log.warning("bootstrap.rate_limited", remote=source, retry_after=retry_after)
            return web.json_response(
                {
                    "error": "rate_limited",
                    "message": f"too many failed attempts; try again in {retry_after} s",
                },
                status=429,
                headers={"Retry-After": str(retry_after), "Cache-Control": "no-store"},
            )
        try:
            cert_pem, cn = await self._enrol(request, now)
        except Refused as exc:
            if exc.count:
                self.limiter.failed(source, self.clock())
            log.warning("bootstrap.enrol_refused", remote=source, reason=exc.code)
            return web.json_response(
                {"error": exc.code, "message": exc.message},
                status=exc.status,
                headers={"Cache-Control": "no-store"},
            )
        log.info(
            "bootstrap.enrolled",
            remote=source,
            cn=cn,
            fingerprint=pki.fingerprint(pki.load_cert_pem(cert_pem)),
        )
        return web.json_response(
            {
                "certificate_pem": cert_pem.decode("ascii"),
                "ca_bundle_pem": self.ca_bundle_pem.decode("ascii"),
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _enrol(self, request: web.Request, now: float) -> tuple[bytes, str]:
        try:
            body = proto.loads_strict(await request.read())
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, "too_large", "request body too large") from None
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "bad_request", "body is not valid JSON") from None
        if not isinstance(body, dict) or not all(
            isinstance(body.get(k), str) for k in ("nonce", "csr_pem", "proof")
        ):
            raise Refused(400, "bad_request", 'body needs strings "nonce", "csr_pem", "proof"')
        nonce, proof = body["nonce"], body["proof"]
        csr_pem = body["csr_pem"].encode("utf-8")
        # The nonce is used up here, before the proof is looked at: one try per nonce.
        if not self.nonces.consume(nonce, now):
            raise Refused(
                401, "nonce_invalid", "nonce unknown, expired or used; fetch /v1/bootstrap again"
            )
        keys = self._keys
        if not proto.check_enrol_proof(
            keys, proof, nonce=nonce, csr_pem=csr_pem, node=self.node_name
        ):
            raise Refused(401, "wrong_password", "the password proof is wrong")
        try:
            key, cn = proto.check_workstation_csr(csr_pem)
        except proto.BootstrapError as exc:
            raise Refused(422, "bad_csr", str(exc)) from None
        try:
            cert_pem = await self.sign(csr_pem)
            cert = pki.load_cert_pem(cert_pem)
        except Exception as exc:  # whatever the CA path raises, the client gets one answer
            log.error("bootstrap.sign_failed", remote=request.remote, error=type(exc).__name__)
            raise Refused(
                502, "sign_failed", "the CA did not sign; try later", count=False
            ) from None
        if pki.spki_pin(cert) != pki.spki_pin(key):
            log.error("bootstrap.sign_failed", remote=request.remote, error="key mismatch")
            raise Refused(502, "sign_failed", "the CA returned a wrong certificate", count=False)
        return pki.cert_to_pem(cert), cn
