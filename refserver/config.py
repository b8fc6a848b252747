"""The reference server's TOML config: read once at start-up, every error one line (ConfigError).

    [server]
    address = "127.0.10.1"          # IP address to listen on (required)
    app_path = "/praxis_live/"      # starts and ends with "/" (required)
    listen = ["http"]               # any of "http", "https" (required, not empty)
    http_port = 8080                # default 8080
    https_port = 8443               # default 8443
    cert_file = "cert.pem"          # required when "https" is listened on
    key_file = "key.pem"            # ditto; refused if group/other may read it (but a server
                                    # not running as root takes root's key, 0640 at most)
    client_ca_file = "ca.pem"       # optional: verify client certificates against this CA
    require_client_cert = false     # true needs client_ca_file
    data_dir = "data"               # entries.sqlite3 (also the freeze), refserver.pid (required)
    admin_socket = "admin.sock"     # admin endpoint's Unix socket (default data_dir/admin.sock);
                                    # its directory must be ours alone (not /tmp itself)
    auth_verifier_file = "auth.json"  # optional scrypt verifier; refused if others may read it
    clients_window = 86400          # seconds: who is still on http covers this long (60..31 days)
    clients_max = 1024              # clients kept at most (the least recently seen goes first)
    login_ceiling = 200             # wrong passwords a day for the whole server (any source);
                                    # past that every /login waits (1..100000)
    login_queue_seconds = 30        # a login held back only by checks still running waits
                                    # for them this long at most (1..600), then 429

Relative paths are taken relative to the config file's directory. Unknown keys are errors
(a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlsroll import clients, password
from tlsroll.config import ConfigFile, Section
from tlsroll.echo import shown
from tlsroll.errors import NotRegularFile, UnsafePermissions
from tlsroll.fsutil import check_private_file, file_kind, read_regular
from tlsroll.tls import server_context

SCHEMES = ("http", "https")
LOGIN_CEILING = 200  # wrong passwords a day for the whole server (the bootstrap service's)
LOGIN_QUEUE_SECONDS = 30  # how long a login waits at most for the checks before it
MAX_LOGIN_QUEUE_SECONDS = 600
KEYS = frozenset(
    {
        "address",
        "app_path",
        "listen",
        "http_port",
        "https_port",
        "cert_file",
        "key_file",
        "client_ca_file",
        "require_client_cert",
        "data_dir",
        "admin_socket",
        "auth_verifier_file",
        "clients_window",
        "clients_max",
        "login_ceiling",
        "login_queue_seconds",
    }
)
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
MIN_CLIENTS_WINDOW = 60  # seconds: the least clients_window (a test may go below: server.py)
_APP_PATH = re.compile(r"/(?:[A-Za-z0-9._~-]+/)*")


@dataclass(frozen=True)
class RefServerConfig:
    path: Path
    address: str
    app_path: str
    listen: tuple[str, ...]
    http_port: int
    https_port: int
    cert_file: Path | None
    key_file: Path | None
    client_ca_file: Path | None
    require_client_cert: bool
    data_dir: Path
    admin_socket: Path
    auth_verifier_file: Path | None
    clients_window: int = clients.WINDOW_SECONDS
    clients_max: int = clients.MAX_ENTRIES
    login_ceiling: int = LOGIN_CEILING
    login_queue_seconds: int = LOGIN_QUEUE_SECONDS

    @property
    def app_name(self) -> str:
        """``praxis_live`` for ``/praxis_live/``; ``""`` for ``/``."""
        return self.app_path.strip("/")

    def port(self, scheme: str) -> int:
        return self.http_port if scheme == "http" else self.https_port


@dataclass(frozen=True)
class Loaded:
    """The config plus what start-up reads from the files it names (once, never again)."""

    config: RefServerConfig
    ssl_context: ssl.SSLContext | None
    verifier: password.Verifier | None


def load(path: Path) -> Loaded:
    """Read and check the config and the files it names; raise ConfigError on any problem."""
    cfg = ConfigFile.load(Path(path))
    # Unknown tables and keys first: a typo must not surface as some other key's error.
    cfg.check_tables({"server"})
    s = cfg.section("server")
    s.check_keys(KEYS)

    address: str = s.ip("address")
    app_path: str = s.text("app_path")
    if not _APP_PATH.fullmatch(app_path):
        raise s.error(
            "app_path", f"{shown(app_path)} must start and end with '/', e.g. '/praxis_live/'"
        )
    listen = _listen(s)
    http_port: int = s.port("http_port", 8080)
    https_port: int = s.port("https_port", 8443)
    if http_port == https_port and len(listen) == 2:
        raise s.error("https_port", "must differ from http_port when both are listened on")

    cert_file: Path | None = s.path("cert_file", None)
    key_file: Path | None = s.path("key_file", None)
    client_ca_file: Path | None = s.path("client_ca_file", None)
    require_client_cert: bool = s.flag("require_client_cert", False)
    if require_client_cert and client_ca_file is None:
        raise s.error("require_client_cert", "needs client_ca_file")
    data_dir: Path = s.path("data_dir")
    admin_socket: Path = s.path("admin_socket", data_dir / "admin.sock")
    if len(str(admin_socket).encode()) > MAX_SOCKET_PATH:
        raise s.error("admin_socket", f"path longer than {MAX_SOCKET_PATH} bytes")
    verifier_file: Path | None = s.path("auth_verifier_file", None)
    clients_window: int = s.integer(
        "clients_window",
        clients.WINDOW_SECONDS,
        lo=MIN_CLIENTS_WINDOW,
        hi=clients.MAX_WINDOW_SECONDS,
    )
    clients_max: int = s.integer("clients_max", clients.MAX_ENTRIES, lo=1, hi=100_000)
    login_ceiling: int = s.integer("login_ceiling", LOGIN_CEILING, lo=1, hi=100_000)
    login_queue_seconds: int = s.integer(
        "login_queue_seconds", LOGIN_QUEUE_SECONDS, lo=1, hi=MAX_LOGIN_QUEUE_SECONDS
    )

    config = RefServerConfig(
        path=cfg.path,
        address=address,
        app_path=app_path,
        listen=listen,
        http_port=http_port,
        https_port=https_port,
        cert_file=cert_file,
        key_file=key_file,
        client_ca_file=client_ca_file,
        require_client_cert=require_client_cert,
        data_dir=data_dir,
        admin_socket=admin_socket,
        auth_verifier_file=verifier_file,
        clients_window=clients_window,
        clients_max=clients_max,
        login_ceiling=login_ceiling,
        login_queue_seconds=login_queue_seconds,
    )
    ctx = _ssl_context(s, config) if "https" in listen else None
    verifier = _verifier(s, verifier_file) if verifier_file is not None else None
    return Loaded(config, ctx, verifier)


def _listen(s: Section) -> tuple[str, ...]:
    values: list[str] = s.str_list("listen")
    if not values:
        raise s.error("listen", 'needs at least one of "http", "https"')
    for i, v in enumerate(values):
        if v not in SCHEMES:
            raise s.error(f"listen[{i}]", f'{shown(v)} is not "http" or "https"')
    if len(set(values)) != len(values):
        raise s.error("listen", "names a scheme twice")
    return tuple(sc for sc in SCHEMES if sc in values)


def _ssl_context(s: Section, c: RefServerConfig) -> ssl.SSLContext:
    if c.cert_file is None:
        raise s.error("cert_file", 'missing (required when listen has "https")')
    if c.key_file is None:
        raise s.error("key_file", 'missing (required when listen has "https")')
    _readable(s, "cert_file", c.cert_file)
    _readable(s, "key_file", c.key_file)
    _private(s, "key_file", c.key_file)
    if c.client_ca_file is not None:
        _readable(s, "client_ca_file", c.client_ca_file)
    try:
        return server_context(
            c.cert_file, c.key_file, c.client_ca_file, require_client=c.require_client_cert
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        if labelled := _pem_problem(c.cert_file, c.key_file):
            raise s.error(*labelled) from None
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":  # (review s69 revref L)
            raise s.error(
                "key_file", f"{c.key_file} is not the key of the certificate in {c.cert_file}"
            ) from None
        raise s.error("cert_file", f"cannot load certificate/key/CA: {_one_line(exc)}") from None


def _pem_problem(cert_file: Path, key_file: Path) -> tuple[str, str] | None:
    """(the key, what is wrong) when the certificate or key file that failed to load holds no
    PEM block of its kind, by their labels only (nothing of the files is quoted): the ssl
    module's own word for a certificate and a key given the wrong way round is "[SSL] PEM lib
    (_ssl.c:3905)" (review s66 L4). None when the labels are right. (Compiled here, on a
    failed start only: the start is inside every switch's freeze window.)"""
    # The labels OpenSSL takes: "CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CERTIFICATE"; and
    # "PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY", ...
    kinds = {
        "certificate": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*CERTIFICATE-----"),
        "private key": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    }
    # A key with a passphrase: PKCS#8's label (the one label that begins so), or the
    # traditional format's header.
    encrypted = re.compile(rb"-----BEGIN ENCRYPTED |Proc-Type: *4, *ENCRYPTED")
    for key, path, kind, other in (
        ("cert_file", cert_file, "certificate", "private key"),
        ("key_file", key_file, "private key", "certificate"),
    ):
        try:
            text = read_regular(path)
        except (OSError, NotRegularFile):
            continue
        if kinds[kind].search(text) is not None:
            if kind == "private key" and encrypted.search(text) is not None:
                # OpenSSL's word for it was "[SSL] PEM lib", under cert_file (review s69 L)
                return key, f"{path} is encrypted: the server takes a key without a passphrase"
            continue
        if kinds[other].search(text) is None:
            return key, f"{path} holds no PEM {kind}"
        return key, (
            f"{path} holds a {other}, not a {kind} "
            "(cert_file and key_file given the wrong way round?)"
        )
    return None


def _verifier(s: Section, path: Path) -> password.Verifier:
    _readable(s, "auth_verifier_file", path)
    _private(s, "auth_verifier_file", path)
    try:
        # (``read_regular``, as every secret of a regular file is read: a FIFO swapped in
        # after the look above is not opened to wait for a writer)
        return password.verifier_from_json(read_regular(path))
    except NotRegularFile as exc:
        raise s.error("auth_verifier_file", str(exc)) from None
    except ValueError as exc:
        raise s.error("auth_verifier_file", f"{path}: {exc}") from None


def _readable(s: Section, key: str, path: Path) -> None:
    """A regular file we may open: opened without blocking (a FIFO with no writer opened for
    ever: review s47rtin L2) and its type checked before anything reads it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise s.error(key, f"{path}: no such file") from None
    except OSError as exc:
        raise s.error(key, f"{path}: cannot read: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        raise s.error(key, f"{path} is not a regular file ({file_kind(mode)})")


def _private(s: Section, key: str, path: Path) -> None:
    """Ours alone; or, for a server running as its own user, root's and readable by its group
    at most (as PostgreSQL allows: the agent, root, gives a switch's key the owner and group
    of a config ``root:GROUP 0640``)."""
    try:
        check_private_file(path, root_shares=True)
    except (UnsafePermissions, NotRegularFile) as exc:
        raise s.error(key, str(exc)) from None


def _one_line(exc: BaseException) -> str:
    text: Any = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return " ".join(str(text).split())
