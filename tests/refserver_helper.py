"""Run a real tlsroll-refserver process in tests and talk HTTP(S) and admin-socket HTTP to it.

    server = RefServer(tmp_path / "node1", loopback(), listen=["http"])
    try:
        server.start()                               # waits until every listener is up
        r = server.request("POST", "entries", {"x": 1})
        assert r.status == 201 and r.json()["seq"] == 1
        server.freeze(drain_timeout=5)               # admin API over the Unix socket
        server.stop()                                # SIGTERM, returns the exit code
    finally:
        server.close()                               # SIGKILL if still running, remove temp dirs

Everything is synchronous (http.client), every wait is bounded, and ``close()`` is safe to call
twice, so a fixture can always call it in its teardown. ``RefServer`` also works as a context
manager (``close()`` on exit).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tlsroll import httpcheck, tls
from tlsroll.config import dump_toml

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0  # above the server's own 10 s graceful-stop bound
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _exchange(
    conn: http.client.HTTPConnection, method: str, path: str, body: object | bytes | None
) -> Response:
    resp: http.client.HTTPResponse | None = None
    try:
        headers = {"Connection": "close"}
        data: bytes | None = None
        if isinstance(body, bytes):
            data = body
            headers["Content-Type"] = "application/json"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
    finally:
        # The response first: a read cut short (a server restarting) leaves it holding the
        # socket, which conn.close() alone then leaves open until the garbage collector finds
        # it (a ResourceWarning, an error under pytest, seen once in CI).
        if resp is not None:
            resp.close()
        conn.close()


def http_request(
    method: str,
    url: str,
    body: object | bytes | None = None,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Response:
    """One request to ``http://host:port/path`` or ``https://…`` (``body``: JSON-able or bytes)."""
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    conn: http.client.HTTPConnection
    if scheme == "https" and context is not None:  # a peer's reset closes it (tls.connect)
        conn = httpcheck.HTTPSConnection(host, int(port), timeout=timeout, context=context)
    elif scheme == "https":
        conn = http.client.HTTPSConnection(host, int(port), timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    return _exchange(conn, method, "/" + path, body)


def unix_request(
    socket_path: Path, method: str, path: str, body: object | None = None, *, timeout: float = 30.0
) -> Response:
    """One HTTP request over a Unix socket (the refserver's admin endpoint)."""
    return _exchange(_UnixHTTPConnection(socket_path, timeout), method, path, body)


def peer_certificate(
    address: str, port: int, context: ssl.SSLContext, timeout: float = REQUEST_TIMEOUT
) -> bytes:
    """The DER certificate the server at ``address:port`` presents (handshake with ``context``)."""
    with tls.connect(context, address, port, timeout=timeout, server_hostname=address) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def write_toml(path: Path, tables: Mapping[str, Mapping[str, object]]) -> Path:
    """Write ``{"table": {key: value}}`` as TOML, 0600 (an agent's may hold its join token
    inline); a ``None`` value leaves the key out."""
    path.write_text(dump_toml(tables))
    path.chmod(0o600)
    return path


class RefServer:
    """One reference server process: its config, data dir, admin socket and stderr log.

    ``settings`` are the ``[server]`` keys of the config (see ``refserver.config``);
    pass any key as a keyword, ``None`` leaves it out. ``env`` adds environment variables for
    the process (e.g. ``TLSROLL_REFSERVER_TEST_WRITE_DELAY``).
    """

    def __init__(
        self,
        root: Path,
        address: str,
        *,
        app_path: str = "/praxis_live/",
        listen: Iterable[str] = ("http",),
        http_port: int = 8080,
        https_port: int = 8443,
        env: Mapping[str, str] | None = None,
        **settings: object,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.address = address
        self.config_path = self.root / "refserver.toml"
        self.data_dir = self.root / "data"
        self.log_path = self.root / "refserver.log"
        # sun_path holds at most 107 bytes: pytest's tmp_path can be longer, /tmp/xyz is not.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="trs-"))
        # Gone with the object too (or at the worker's exit): many tests never call close(),
        # and their empty directories piled up in /tmp (969 after a day's runs, session 71).
        self._remove_sock_dir = weakref.finalize(self, shutil.rmtree, self._sock_dir, True)
        self.admin_socket = self._sock_dir / "admin.sock"
        self.settings: dict[str, object] = {
            "address": address,
            "app_path": app_path,
            "listen": list(listen),
            "http_port": http_port,
            "https_port": https_port,
            "data_dir": self.data_dir,
            "admin_socket": self.admin_socket,
            **settings,
        }
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.write_config()

    # --- config and process -------------------------------------------------------------------

    @property
    def app_path(self) -> str:
        return str(self.settings["app_path"])

    def write_config(self, **changes: object) -> Path:
        """Apply ``changes`` to the settings (``None`` removes a key) and rewrite the file."""
        self.settings.update(changes)
        return write_toml(self.config_path, {"server": self.settings})

    def command(self) -> list[str]:
        return [sys.executable, "-m", "refserver", "--config", str(self.config_path)]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting; stderr (the JSON log) is appended to log_path."""
        if self.running:
            raise RuntimeError("refserver already running")
        self._close_log()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, **self.env},
        )
        return self.proc

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the server and wait until its listeners and admin socket accept requests."""
        self.spawn()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Poll the admin status until it answers (the server opens it last); return it."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"refserver exited with {code} during start-up:\n{self.log()}")
            with contextlib.suppress(OSError):
                resp = unix_request(self.admin_socket, "GET", "/admin/status", timeout=2.0)
                if resp.status == 200:
                    status: dict[str, Any] = resp.json()
                    if status.get("pid") == self.proc.pid:
                        return status
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"refserver not ready within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def run_to_exit(self, timeout: float = READY_TIMEOUT) -> tuple[int, str]:
        """Run a server expected to exit on its own (e.g. bad config): ``(code, new stderr)``."""
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc = self.spawn()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close_log()
        return code, self.log_path.read_bytes()[start:].decode(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (graceful stop) and wait; return the exit code (SIGKILL after ``timeout``)."""
        assert self.proc is not None, "not started"
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL (a crash) and reap the process."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def restart(self, timeout: float = READY_TIMEOUT) -> None:
        """Graceful stop (must exit 0), then start again with the current config file."""
        code = self.stop()
        if code != 0:
            raise RuntimeError(f"refserver stopped with {code}:\n{self.log()}")
        self.start(timeout)

    def close(self) -> None:
        """Kill the process if it still runs and remove the socket directory; idempotent."""
        self.kill()
        self._remove_sock_dir()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        """Everything the server wrote to stderr so far (all runs)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines (structlog events) written so far."""
        events = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    # --- talking to it --------------------------------------------------------------------------

    def port(self, scheme: str) -> int:
        return int(str(self.settings["https_port" if scheme == "https" else "http_port"]))

    def url(self, path: str = "", scheme: str = "http") -> str:
        """``scheme://address:port/APP/path``; ``path`` is relative to the app path."""
        return f"{scheme}://{self.address}:{self.port(scheme)}{self.app_path}{path}"

    def request(
        self,
        method: str,
        path: str = "",
        body: object | bytes | None = None,
        *,
        scheme: str = "http",
        context: ssl.SSLContext | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Response:
        """A request to the app (``path`` relative to the app path, e.g. ``"entries"``)."""
        return http_request(method, self.url(path, scheme), body, context=context, timeout=timeout)

    def admin(
        self, method: str, path: str, body: object | None = None, *, timeout: float = 30.0
    ) -> Response:
        """A request to the admin endpoint (``path`` like ``"/admin/status"``)."""
        return unix_request(self.admin_socket, method, path, body, timeout=timeout)

    def _admin_json(self, method: str, path: str, body: object | None = None) -> dict[str, Any]:
        resp = self.admin(method, path, body)
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {resp.body!r}")
        data: dict[str, Any] = resp.json()
        return data

    def status(self) -> dict[str, Any]:
        return self._admin_json("GET", "/admin/status")

    def freeze(self, drain_timeout: float = 10.0) -> dict[str, Any]:
        return self._admin_json("POST", "/admin/freeze", {"drain_timeout": drain_timeout})

    def unfreeze(self) -> dict[str, Any]:
        return self._admin_json("POST", "/admin/unfreeze")
