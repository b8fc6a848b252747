"""The leader daemon's configuration (``DATA/leader.toml``, written by ``tlsroll init``).

One table, ``[leader]``; an unknown key or table is an error naming it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from leader.layout import Layout, leader_names_problem
from leader.maintenance import Window, WindowError, parse_window
from leader.store_rules import WORKSTATION_CERTS_PER_HOUR
from leader.zones import load_zone
from tlsroll import lifetimes, logs, names
from tlsroll.config import ConfigFile, Section
from tlsroll.defaults import CONTROL_PORT, JOIN_PORT, MAX_FREEZE_LEASE, VIEWER_PORT
from tlsroll.fsutil import real_path

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo  # loaded by load_zone only (leader.zones)

AGENT_CERT_LIFETIME = 30 * 86400  # seconds; see LeaderConfig.agent_cert_lifetime
TEST_AGENT_CERT_ENV = "TLSROLL_TEST_AGENT_CERT_SECONDS"
"""Tests only: seconds an agent's certificate lives in place of ``agent_cert_lifetime``
(``agent_cert_seconds``: at least ``MIN_TEST_AGENT_CERT``, never longer than the setting), so
that a test sees an agent certificate renewed, or ended while its agent is off, in seconds:
the setting's least, a minute, made each such test wait most of a minute (a CI run of 20
minutes waited some five of them). Not a setting: below a minute an agent renews every few
seconds, and a node restarted, or a leader, has seconds to be back before a certificate
ends."""
MIN_TEST_AGENT_CERT = int(lifetimes.MIN_LIFETIME.total_seconds())  # the shortest leaf pki issues
SERVER_CERT_LIFETIME = lifetimes.LEAF_VALIDITY_DAYS * 86400  # seconds; under Apple's 398 days
EXPIRY_CHECK_INTERVAL = 3600  # seconds
# Seconds: the shortest scope_freeze_lease. The engine renews a node's lease at a third of it,
# on its 1 s tick, and a renewal is a Freeze call that may be retried (0.2, 0.4, 0.8 s apart):
# a lease of 2 s, the minimum before, ran out before a late renewal landed.
MIN_FREEZE_LEASE = 10


N = TypeVar("N", int, float)


def hook_number(environ: Mapping[str, str], env: str, default: N, ok: Callable[[N], bool]) -> N:
    """A leader daemon's test-only hook (``TLSROLL_TEST_*``): the number ``env`` holds, of
    ``default``'s kind, if ``ok`` takes it, else ``default`` (unset, not a number, NaN, out of
    bounds: a hook set wrong is as none, never a reason not to start). Each hook's bounds only
    ever bring a wait or a life closer than its setting's; ``leader.runtime`` says one in
    effect (``leader.test_hook``)."""
    try:
        value = type(default)(environ.get(env, ""))
    except ValueError:
        return default
    return value if ok(value) else default


def agent_cert_seconds(setting: int, environ: Mapping[str, str]) -> int:
    """How long the leader makes an agent's certificate live: ``setting``
    (``agent_cert_lifetime``), or the test hook's (``TEST_AGENT_CERT_ENV``) if it holds a whole
    number of seconds from ``MIN_TEST_AGENT_CERT`` to ``setting``."""
    return hook_number(
        environ, TEST_AGENT_CERT_ENV, setting, lambda s: MIN_TEST_AGENT_CERT <= s <= setting
    )


# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class LeaderConfig:
    path: Path
    address: str
    dns_names: tuple[str, ...]
    control_port: int
    join_port: int
    layout: Layout
    ca_passphrase_file: Path
    heartbeat_interval: int
    admin_socket: Path
    node_name: str | None
    scope_freeze_lease: int  # seconds a --freeze scope holds on a node without renewal (>= 10)
    viewer_port: int  # the read-only web viewer (https); 0: off
    # A file (0600) with the bearer token a Prometheus server scrapes /metrics with; None: only
    # a viewer session may read /metrics.
    metrics_token_file: Path | None
    # Failed enrolments one source (an IPv4 address, an IPv6 /64) may make on the join port
    # before it has to wait, doubling from 1 s (leader.join_guard).
    join_free_failures: int = 5
    # How long an agent's own (mTLS) certificate lives, in seconds (default 30 days). Agents
    # renew it by themselves at a jittered 30-40 % of that, so a short life costs nothing and
    # bounds how long a stolen agent key is of use; a node that is switched off (a holiday, a
    # repair, the leader host off) has at least 60 % of it (18 of 30 days) to come back and
    # renew (a node offline past the end must enrol again). Tests set a minute.
    agent_cert_lifetime: int = AGENT_CERT_LIFETIME
    # Days before its end that a server, leader, viewer or workstation certificate is warned
    # about (`tlsroll certs check-expiration`, the leader's log, the schema).
    expiry_warning_days: float = 30
    # Seconds a preflight may go without an answer before the node fails with "agent
    # unreachable" (a stage: twice that); see leader.engine.
    step_deadline: int = 30
    # Pipelining: how many nodes beyond --max-parallel are preflighted and staged while others
    # switch (nothing live changes on them; they still switch one after another, in order, and
    # a pause holds them staged). 0: a node starts only once one has ended, as the seed did.
    prepare_ahead: int = 1
    # debug | info | warning | error (``tlsroll-leader --log-level`` wins over it).
    log_level: str = "info"
    # How long a node's https (8443) certificate lives, in seconds (default 397 days, under
    # the 398 Apple's clients accept). Tests set a few minutes.
    server_cert_lifetime: int = SERVER_CERT_LIFETIME
    # Start a rotate-cert rollout by itself for the nodes whose server certificate is within
    # ``expiry_warning_days``, but only inside ``maintenance_window`` (leader.maintenance).
    auto_rotate: bool = False
    maintenance_window: Window | None = None
    # The zone the window is read in, an IANA name ("Europe/Berlin"); None: the host's local
    # time. ``tlsroll notify`` uses it too (the schema carries it), unless --timezone.
    maintenance_timezone: ZoneInfo | None = None
    # Seconds between two checks of the expiry watch (at most this; agent certificates that
    # live shorter than 10 h are checked more often). Tests set a second.
    expiry_check_interval: int = EXPIRY_CHECK_INTERVAL
    # Workstation certificates one node's bootstrap service may have signed per hour (a brake
    # on a stolen agent key; ``leader.store_rules.WORKSTATION_CERTS_PER_HOUR`` says why 100). A
    # practice with more PCs at one server than that on switch day raises it for the day.
    workstation_certs_per_hour: int = WORKSTATION_CERTS_PER_HOUR

    @classmethod
    def load(cls, path: Path) -> LeaderConfig:
        cfg = ConfigFile.load(path)
        s = cfg.section("leader")
        layout = Layout(s.path("data_dir"))
        config = cls(
            path=Path(path),
            address=s.ip("address"),
            dns_names=tuple(s.str_list("dns_names", [])),
            control_port=s.port("control_port", CONTROL_PORT),
            join_port=s.port("join_port", JOIN_PORT),
            layout=layout,
            ca_passphrase_file=s.path("ca_passphrase_file", layout.default_passphrase_file),
            heartbeat_interval=s.integer("heartbeat_interval", 5, lo=1, hi=3600),
            admin_socket=s.path("admin_socket", layout.admin_socket),
            node_name=s.text("node_name", None),
            scope_freeze_lease=s.integer(
                "scope_freeze_lease", 300, lo=MIN_FREEZE_LEASE, hi=MAX_FREEZE_LEASE
            ),
            viewer_port=s.integer("viewer_port", VIEWER_PORT, lo=0, hi=65535),
            metrics_token_file=s.path("metrics_token_file", None),
            join_free_failures=s.integer("join_free_failures", 5, lo=1, hi=1_000_000),
            agent_cert_lifetime=s.integer(
                "agent_cert_lifetime", AGENT_CERT_LIFETIME, lo=60, hi=397 * 86400
            ),
            expiry_warning_days=_warning_days(s),
            step_deadline=s.integer("step_deadline", 30, lo=1, hi=3600),
            prepare_ahead=s.integer("prepare_ahead", 1, lo=0, hi=64),
            log_level=logs.config_level(s),
            server_cert_lifetime=s.integer(
                "server_cert_lifetime", SERVER_CERT_LIFETIME, lo=60, hi=SERVER_CERT_LIFETIME
            ),
            auto_rotate=s.flag("auto_rotate", False),
            maintenance_window=_window(s),
            maintenance_timezone=_zone(s),
            expiry_check_interval=s.integer(
                "expiry_check_interval", EXPIRY_CHECK_INTERVAL, lo=1, hi=86400
            ),
            workstation_certs_per_hour=s.integer(
                "workstation_certs_per_hour", WORKSTATION_CERTS_PER_HOUR, lo=1, hi=10_000
            ),
        )
        if config.auto_rotate and config.maintenance_window is None:
            raise s.error(
                "auto_rotate",
                "needs maintenance_window, when the servers may be restarted, e.g. "
                'maintenance_window = "Sat 02:00-05:00"',
            )
        if config.expiry_warning_days * 86400 >= config.server_cert_lifetime:
            raise s.error(
                "expiry_warning_days",
                f"{config.expiry_warning_days:g} days is not shorter than server_cert_lifetime "
                f"({config.server_cert_lifetime} s): every server certificate would be due "
                "from the day it is issued",
            )
        # A server certificate lives its lifetime less up to 5 % of it (at most 7 days:
        # ``lifetimes.spread``): a warning within that made a fresh one due from its issue, and
        # auto_rotate rotate it again at every window (review s67 rev2 M2).
        shortest = int(
            lifetimes.spread(dt.timedelta(seconds=config.server_cert_lifetime), 1.0).total_seconds()
        )
        if config.expiry_warning_days * 86400 >= shortest:
            raise s.error(
                "expiry_warning_days",
                f"{config.expiry_warning_days:g} days is not shorter than server_cert_lifetime "
                f"({config.server_cert_lifetime} s) less the up to 5 % (at most 7 days) each "
                f"server certificate's life is cut by, to spread their ends ({shortest} s left):"
                " a server certificate could be due from the day it is issued",
            )
        cfg.finish()  # a key or table not read above is a typo: an error, not a default
        _check_restored_elsewhere(s, config)
        _check_names(s, config)
        _check_ports(s, config)
        _check_admin_socket(s, config)
        return config


def _check_restored_elsewhere(s: Section, config: LeaderConfig) -> None:
    """A ``leader.toml`` beside a store of its own (``leader.sqlite3``) whose ``data_dir`` names
    another directory: a backup's files put into a new data directory keep the ``data_dir``
    they were made with, and the leader ran on the old store without a word (rev57b M1)."""
    here = real_path(config.path).parent
    there = config.layout.data_dir
    # (One that does not exist, or may not be looked into, is said so where the data dir is
    # opened.)
    try:
        # (the same directory by another path, a bind mount or a link, is the same: rev57c L4)
        elsewhere = (
            there.is_dir()
            and (here / config.layout.store.name).exists()
            and not here.samefile(there)
        )
    except OSError:
        return
    if elsewhere:
        raise s.error(
            "data_dir",
            f"{config.layout.data_dir} is not {here}, where this config is beside a store "
            f"({config.layout.store.name}) of its own: a restored backup keeps the data_dir it "
            f'was made with (then set data_dir = "{here}"); a data dir moved elsewhere leaves '
            f"the old store here (then use the leader.toml in {config.layout.data_dir})",
        )


def _check_ports(s: Section, config: LeaderConfig) -> None:
    """The join, control and viewer ports differ: the same port twice failed at the bind
    ("Address already in use", exit 1, started again by systemd for ever), or for join and
    control not at all (review s47rtin L4)."""
    ports = [("control_port", config.control_port), ("join_port", config.join_port)]
    if config.viewer_port:
        ports.append(("viewer_port", config.viewer_port))
    for i, (key, port) in enumerate(ports):
        for other, taken in ports[:i]:
            if port == taken:
                raise s.error(key, f"{port} is {other} too; each port must be its own")


def _check_admin_socket(s: Section, config: LeaderConfig) -> None:
    """A Unix socket's path holds at most ``MAX_SOCKET_PATH`` bytes: a longer one failed at
    the bind with "AF_UNIX path too long", naming neither the key nor the path (review
    s47rtin L4)."""
    path = config.admin_socket
    if len(str(path).encode()) <= MAX_SOCKET_PATH:
        _check_socket_dir(s, path, config.layout.admin_socket.parent)
        return
    if s.has("admin_socket"):
        raise s.error("admin_socket", f"{path}: longer than {MAX_SOCKET_PATH} bytes")
    raise s.error(
        "data_dir",
        f"the admin socket in it, {path}, is longer than {MAX_SOCKET_PATH} bytes; set "
        "admin_socket to a shorter path",
    )


def _check_socket_dir(s: Section, path: Path, run_dir: Path) -> None:
    """The leader narrows the admin socket's directory to 0750 (group = admins) only where it
    is its own (``DATA/run``, or one it makes); another that exists keeps its mode, and one
    others may write to is refused: a leader with ``admin_socket = "/tmp/tlsroll.sock"``
    made /tmp 0750, every other user locked out of it, and others could plant a socket there
    (review s48: found by CI)."""
    parent = path.parent
    if not s.has("admin_socket") or parent == run_dir:
        return
    try:
        mode = parent.stat().st_mode
    except OSError:
        return  # made at the start, 0750 (or the bind says what is wrong)
    if mode & 0o002:
        raise s.error(
            "admin_socket",
            f"{path}: its directory {parent} is writable by others: give the socket a "
            "directory of its own (the default is DATA/run/admin.sock)",
        )


def _check_names(s: Section, config: LeaderConfig) -> None:
    """The rules ``tlsroll init`` applies to the leader's names (``layout.leader_names_problem``,
    ``names.node_name_problem``), applied to the file: the leader issues its own certificate
    again with ``address`` and ``dns_names`` at its start, before it binds a port, so an edited
    file got it a certificate for a wildcard, a NUL or every host (review s47rtin H1). A config
    error here is raised before anything is written."""
    if problem := names.ip_problem(config.address):
        raise s.error("address", problem)
    if problem := leader_names_problem(config.address, config.dns_names):
        raise s.error("dns_names", problem)
    if config.node_name is not None and (problem := names.node_name_problem(config.node_name)):
        raise s.error("node_name", problem)


def _warning_days(s: Section) -> float:
    """``expiry_warning_days``: whole days (1-365); a fraction of a day (> 0) is accepted for
    tests with certificates that live minutes."""
    if s.has("expiry_warning_days") and isinstance(s.data["expiry_warning_days"], float):
        value = float(s.data["expiry_warning_days"])
        if not 0 < value <= 365:
            raise s.error("expiry_warning_days", f"must be between 0 and 365, got {value}")
        return value
    return float(s.integer("expiry_warning_days", 30, lo=1, hi=365))


def _zone(s: Section) -> ZoneInfo | None:
    name = s.text("maintenance_timezone", None)
    if name is None:
        return None
    try:
        return load_zone(name)
    except ValueError as exc:
        raise s.error("maintenance_timezone", str(exc)) from None


def _window(s: Section) -> Window | None:
    if not s.has("maintenance_window"):
        return None
    raw = s.data["maintenance_window"]
    if isinstance(raw, str):
        value: str | list[str] = raw
    else:
        value = s.str_list("maintenance_window")
    try:
        return parse_window(value)
    except WindowError as exc:
        raise s.error("maintenance_window", str(exc)) from None
