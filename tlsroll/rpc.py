"""gRPC plumbing both daemons share: standard services, peer identity, error mapping, addresses.

Servicers raise the project's own errors; ``map_errors`` turns them into a gRPC status in one
place, so that no servicer builds a status by hand and no internal error leaks a traceback to a
caller (unexpected errors become INTERNAL with a generic message and are logged).
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import ipaddress
import os
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tlsroll import logs
from tlsroll.errors import TerminalError, TransientError, os_error_text
from tlsroll.logsample import SampledLog
from tlsroll.wire import WireError

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])
ErrorMap = Mapping[type[BaseException], grpc.StatusCode]

if TYPE_CHECKING:
    from cryptography import x509

log = logs.get_logger(__name__)


class RpcStatusError(TerminalError):
    """An error that already knows its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RpcStatusError:
    return RpcStatusError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unauthenticated(message: str) -> RpcStatusError:
    return RpcStatusError(grpc.StatusCode.UNAUTHENTICATED, message)


def permission_denied(message: str) -> RpcStatusError:
    return RpcStatusError(grpc.StatusCode.PERMISSION_DENIED, message)


# The leader's refusal of a node no longer in the cluster (removed, or its certificate revoked
# by serial), in these words (an older leader's too): an agent told so at its heartbeat stops
# taking workstation passwords (``node_removed``; audit s45rt3 M3).
NOT_ENROLLED = "is not an enrolled node (removed?)"
REVOKED_NODE = "is revoked; enrol it again"


def not_enrolled(name: str) -> str:
    return f"{name!r} {NOT_ENROLLED}"


def not_on_record(name: str) -> str:
    """A node's certificate that is neither the one on record nor, right after a renewal, the
    one before it (a renewal replaced it)."""
    return f"certificate is not the one on record for node {name!r}"


def revoked_node(name: str) -> str:
    """The refusal of a node whose certificate was revoked (``REVOKED_NODE``, the words agents
    match), and how it comes back: a revoked certificate's key enrols under no token (review
    rev-enrol H1), so with a new key, once the node is removed (closing review s65, L2)."""
    return (
        f"the certificate of node {name!r} {REVOKED_NODE} with a new key, once removed "
        f"(tlsroll nodes remove {name})"
    )


def node_removed(code: grpc.StatusCode | None, details: str | None) -> bool:
    """Whether the leader refused a node's call because the node is no longer in the cluster
    (not for a certificate that is merely not the one on record: a renewal under way)."""
    text = details or ""
    return code == grpc.StatusCode.UNAUTHENTICATED and (
        NOT_ENROLLED in text or REVOKED_NODE in text
    )


def failed_precondition(message: str) -> RpcStatusError:
    return RpcStatusError(grpc.StatusCode.FAILED_PRECONDITION, message)


def not_found(message: str) -> RpcStatusError:
    return RpcStatusError(grpc.StatusCode.NOT_FOUND, message)


def status_for(exc: BaseException, mapping: ErrorMap) -> grpc.StatusCode | None:
    """The status of the most specific class of ``exc`` in ``mapping`` (its MRO decides, as in
    httpx's ``map_exceptions``): a subclass mapped on its own wins over its base, whatever the
    order of the mapping. None if no class of ``exc`` is mapped."""
    for cls in type(exc).__mro__:
        if cls in mapping:
            return mapping[cls]
    return None


BASE_ERRORS: ErrorMap = {
    WireError: grpc.StatusCode.INVALID_ARGUMENT,
    TransientError: grpc.StatusCode.UNAVAILABLE,  # the caller may try again
    TerminalError: grpc.StatusCode.FAILED_PRECONDITION,  # the message says what is wrong
}
"""Errors every servicer maps the same way; a servicer's own map is added to these (its more
specific classes win). A store or disk that fails (``storage_trouble``: SQLITE_FULL, ENOSPC…)
is UNAVAILABLE with its cause; only any other error not the project's own becomes INTERNAL."""


SHOWS_PATHS = "shows_paths"
"""A servicer's class attribute: True if its callers may read the daemon's file paths in an
OSError's details (``error_status``'s ``paths``): the admin socket's (the admin's own tools),
and the agent's port, whose only caller that gets past its first check is the leader (which
shows an agent's failure to the admin). Any other servicer's callers (the join port's, who hold
a join token or nothing; the control port's, every node) read no path: absent, False."""


def map_errors(
    mapping: ErrorMap, *, full_disk: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
) -> Callable[[F], F]:
    """Decorate an async servicer method: project errors → status per ``mapping`` (plus
    ``BASE_ERRORS``), the most specific class winning. An unmapped error becomes INTERNAL with a
    generic message; it is logged, never sent, so no detail of a bug reaches a caller.
    ``full_disk``: the status of a full disk (``error_status``); an OSError's path is sent only
    by a servicer whose ``SHOWS_PATHS`` attribute is True."""
    full = {**BASE_ERRORS, **mapping}

    def decorate(method: F) -> F:
        @functools.wraps(method)
        async def wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                _tell_store_health(self, exc, method.__name__)
                paths = getattr(self, SHOWS_PATHS, False) is True
                await _abort_for(exc, full, method.__name__, context, full_disk, paths)

        return wrapper  # type: ignore[return-value]

    return decorate


def _tell_store_health(servicer: object, exc: BaseException, name: str) -> None:
    """A servicer's store that cannot be written (a full disk) kept as the leader's store
    trouble (its ``store_health``: ``leader.store_health.StoreHealth``, if it has one), as the
    engine's and the heartbeats' failures are: `rollout status` tells it with no rollout
    stored too (it said only "no rollout yet" while every admin write failed: review s64
    store L2). The servicer's own error reply is unchanged."""
    health = getattr(servicer, "store_health", None)
    failed = getattr(health, "failed", None)
    if callable(failed):
        failed(exc, f"rpc.{name}")


def map_stream_errors(
    mapping: ErrorMap, *, full_disk: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
) -> Callable[[G], G]:
    """``map_errors`` for a server-streaming method (an async generator)."""
    full = {**BASE_ERRORS, **mapping}

    def decorate(method: G) -> G:
        @functools.wraps(method)
        async def wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                paths = getattr(self, SHOWS_PATHS, False) is True
                await _abort_for(exc, full, method.__name__, context, full_disk, paths)

        return wrapper  # type: ignore[return-value]

    return decorate


_SQLITE_UNAVAILABLE = (
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
)
"""SQLite's result codes (their extended codes too) that say the store's file or disk is
failing or busy (or locked by another connection: the agent's journal takes it as passing,
``nodeagent.journal.READ_TRANSIENT``), not that a statement is wrong: the call may work later."""

_OS_UNAVAILABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
"""The errnos of a disk that is full, failing or read-only."""


def storage_trouble(exc: BaseException, *, paths: bool = True) -> str | None:
    """The one line a caller gets for a store or disk that cannot be written now (UNAVAILABLE),
    or None: SQLite's words and code (``store: database or disk is full (SQLITE_FULL)``; its
    texts for these codes hold no values), an OSError's path and errno (``os_error_text``;
    without its path unless ``paths``)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorname", None) or ""
        if code.startswith(_SQLITE_UNAVAILABLE):
            return f"store: {exc} ({code})"
        return None
    if isinstance(exc, OSError) and exc.errno in _OS_UNAVAILABLE:
        return os_error_text(exc) if paths else os_error_text(_pathless(exc))
    return None


def _pathless(exc: OSError) -> OSError:
    """``exc``'s errno and words without its paths (what a caller without ``paths`` reads)."""
    return OSError(exc.errno, exc.strerror)


DISK_FULL = "disk full"
"""How the details of a full disk's status begin when a servicer gives it a status of its own
(``error_status``'s ``full_disk``: the node agent's RESOURCE_EXHAUSTED), ``disk full: CAUSE``:
what its caller tells from any other status of that code (gRPC's own, a message too large)."""


BEING_RECEIVED = "is being received; ask again"
"""How the details of a node agent's UNAVAILABLE to GetTransaction end while a Switch or
Rollback of the transaction asked about is received and not yet journalled, after the agent
waited for it (``nodeagent.service.Receipts``, ``RECEIVING_WAIT``): the agent answers, so the
leader does not ask again at once as it does an agent it cannot reach (that asking only waits
out the same wait again, four times: session 74); the step runs again
(``leader.agent_client.BeingReceived``). An agent of session 73 ends its details so too."""


STORE_UNAVAILABLE = "store unavailable"
"""How the details of an UNAVAILABLE over the daemon's own store or disk begin when a servicer
gives a full disk a status of its own (``error_status``'s ``full_disk``: the node agent),
``store unavailable: CAUSE`` (a journal locked or busy, an I/O error, a read-only disk): its
caller tells it from an agent it cannot reach, which answers nothing (review s74 L1: the leader
said "unknown — agent unreachable" of an agent that answered that its journal was locked)."""


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` says the disk (or the user's quota on it) is full: ENOSPC, EDQUOT,
    SQLITE_FULL."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorname", None) or "").startswith("SQLITE_FULL")
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def error_status(
    exc: Exception,
    mapping: ErrorMap,
    name: str,
    full_disk: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    paths: bool = False,
) -> tuple[grpc.StatusCode, str]:
    """The status and details a method ``name`` decorated with ``map_errors(mapping)`` ends
    with when it raises ``exc``; an error not the project's own is INTERNAL, logged, no
    detail sent. A store or disk that fails (``storage_trouble``) is UNAVAILABLE with its
    cause; one that is full is ``full_disk`` if that is another code, with the details
    ``disk full: CAUSE`` (``DISK_FULL``): the node agent's RESOURCE_EXHAUSTED, which the
    leader shows as the node's disk being full, not as an agent it cannot reach. So is a
    project error whose cause is a full disk (the agent's journal that cannot grow).
    ``paths``: the caller may read the daemon's file paths (``SHOWS_PATHS``): an OSError's
    path and errno are then in the details; otherwise only in the log line (an INTERNAL's
    details are the generic text, a full disk's its errno: review s69, the join port's
    caller learnt the leader's file layout)."""
    if isinstance(exc, RpcStatusError):
        return exc.code, short_details(str(exc))
    if (
        full_disk is not grpc.StatusCode.UNAVAILABLE
        and not is_disk_full(exc)
        and exc.__cause__ is not None
        and is_disk_full(exc.__cause__)
        and status_for(exc, {**BASE_ERRORS, **mapping}) is not None
    ):
        # A project error wrapping a full disk (the agent's JournalError, a TerminalError, over
        # SQLITE_FULL) is the full disk, retried as one, not its class's refusal; its own
        # message (which journal) is fit to send.
        log.warning(
            "rpc.unavailable",
            method=name,
            error=short_details(str(exc)),
            hint="the daemon's storage refused a write (a full or read-only disk): free space "
            "under its data dir (df -h); the call is answered UNAVAILABLE, to try again",
        )
        return full_disk, short_details(f"{DISK_FULL}: {exc}")
    code = status_for(exc, {**BASE_ERRORS, **mapping})
    if code is not None:
        if (
            code is grpc.StatusCode.UNAVAILABLE
            and full_disk is not grpc.StatusCode.UNAVAILABLE  # (the agent's servicers)
            and exc.__cause__ is not None
            and storage_trouble(exc.__cause__) is not None
        ):
            _store_trouble(name, exc)
            return code, short_details(f"{STORE_UNAVAILABLE}: {exc}")
        return code, short_details(str(exc))
    if (unavailable := storage_trouble(exc)) is not None:
        log.warning(
            "rpc.unavailable",
            method=name,
            error=unavailable,
            hint="the daemon's storage refused a write (a full or read-only disk): free space "
            "under its data dir (df -h); the call is answered UNAVAILABLE, to try again",
        )
        told = unavailable if paths else storage_trouble(exc, paths=False) or unavailable
        if full_disk is not grpc.StatusCode.UNAVAILABLE:
            if is_disk_full(exc):
                return full_disk, short_details(f"{DISK_FULL}: {told}")
            return grpc.StatusCode.UNAVAILABLE, short_details(f"{STORE_UNAVAILABLE}: {told}")
        return grpc.StatusCode.UNAVAILABLE, short_details(told)
    if isinstance(exc, OSError) and exc.errno is not None:
        # A file it could not write or read (a directory where its file goes, a permission):
        # its path and the system's words, which hold no value of a request, say what to fix
        # (review s69 revlogs M2: the type and the place alone did not say which file). Sent
        # to a caller who may read paths only (``paths``): the join port's is anybody.
        text = os_error_text(exc)
        log.error(
            "rpc.internal_error",
            method=name,
            error_type=type(exc).__name__,
            where=logs.where(exc),
            error=text,
            hint="a bug in tlsroll: report it with the lines before this one",
        )
        if not paths:
            return grpc.StatusCode.INTERNAL, INTERNAL_DETAILS
        return grpc.StatusCode.INTERNAL, short_details(
            f"internal error: {text}; see the daemon's log"
        )
    # The place, not the message: an error not the project's own may hold any value.
    log.error(
        "rpc.internal_error",
        method=name,
        error_type=type(exc).__name__,
        where=logs.where(exc),
        hint="a bug in tlsroll: report it with the lines before this one",
    )
    return grpc.StatusCode.INTERNAL, INTERNAL_DETAILS


STORE_TROUBLE_EVERY = 60.0
"""How often (seconds) ``_store_trouble`` logs a method's UNAVAILABLE answers on its own, and
sums up those it did not log."""

_STORE_TROUBLE = SampledLog(every=STORE_TROUBLE_EVERY, forget=STORE_TROUBLE_EVERY)


def _store_trouble(name: str, exc: Exception) -> None:
    """Log a project error over a store that failed for a moment, answered UNAVAILABLE by
    its class (the agent's ``JournalUnavailable``: a journal locked or busy, an I/O error),
    which ``error_status``'s ``rpc.unavailable`` line did not cover: minutes of a locked
    journal left the node's own log silent (review s74 revsmall L2; the leader's store says
    its own trouble: ``store.writes_failing``). Sampled as the join
    port's refusals are (``SampledLog``): a method's first, again a minute later, the others
    counted in a summary at most once a minute (the leader asks again every few seconds)."""
    cause = exc.__cause__
    code = (getattr(cause, "sqlite_errorname", None) or "") if cause is not None else ""
    if _STORE_TROUBLE.first(name, code or type(cause).__name__):
        log.warning(
            "rpc.unavailable",
            method=name,
            error=short_details(str(exc)),
            hint="the daemon's store could not be read or written for a moment (locked by"
            " another process, an I/O error): the call is answered UNAVAILABLE, to try again;"
            " if it lasts, look at the disk (dmesg) and at what else holds the file (fuser)",
        )
    if (summary := _STORE_TROUBLE.summary()) is not None:
        log.warning(
            "rpc.unavailable_summary",
            **summary.fields(),
            detail="calls answered UNAVAILABLE over the store's trouble in that time and not"
            " logged one by one, by method (top) and SQLite code (reasons)",
        )


INTERNAL_DETAILS = "internal error; see the daemon's log"
"""The details of an INTERNAL that says nothing of its cause (``error_status``)."""


MAX_DETAILS = 1000
"""Characters of an error's text sent as a status's details. gRPC's client refuses metadata
above 16 KiB ("received metadata size exceeds hard limit"), and a refusal that echoes a long
value (a 100,000-character node name) would reach the caller as that instead of itself; 1,000
characters are at most 12,000 bytes once percent-encoded."""


def short_details(text: str) -> str:
    """``text``, cut to ``MAX_DETAILS`` characters (with "…") if longer."""
    return text if len(text) <= MAX_DETAILS else text[: MAX_DETAILS - 1] + "…"


async def _abort_for(
    exc: Exception,
    full: ErrorMap,
    name: str,
    context: grpc.aio.ServicerContext[Any, Any],
    full_disk: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    paths: bool = False,
) -> None:
    await context.abort(*error_status(exc, full, name, full_disk, paths))


def peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> x509.Certificate | None:
    """The verified client certificate of the caller (mutual TLS ports only)."""
    from tlsroll import pki  # noqa: PLC0415 - the agent's per-call check is ``peer`` (no X.509)

    pems = list(context.auth_context().get("x509_pem_cert", ()))
    if not pems:
        return None
    return pki.load_cert_pem(pems[0])


@dataclass(frozen=True)
class Peer:
    """What a call's peer certificate says that an agent checks on every leader call: its URI
    names (the cluster identity, ``spiffe.of_uris``) and its serial number (revocation)."""

    uris: tuple[str, ...]
    serial: int


def peer(context: grpc.aio.ServicerContext[Any, Any]) -> Peer | None:
    """The caller's certificate as gRPC verified it (mutual TLS ports only), read without
    ``cryptography``: the URIs from gRPC's auth context (``peer_uri``: every URI name of the
    certificate's subjectAltName), the serial from the certificate itself (``serial_of``)."""
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert", ()))
    if not pems:
        return None
    uris = tuple(u.decode("ascii", "replace") for u in auth.get("peer_uri", ()))
    return Peer(uris, serial_of(pems[0]))


@functools.lru_cache(maxsize=16)
def serial_of(pem: bytes) -> int:
    """The serial number of a PEM certificate that TLS has verified (so well-formed DER):
    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber
    INTEGER, … } … } (RFC 5280 4.1). Kept for the last few certificates: the leader's one
    comes on every call. ValueError if the DER is not laid out so."""
    der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    _, pos, _ = _der_header(der, 0, 0x30)  # Certificate
    _, pos, _ = _der_header(der, pos, 0x30)  # TBSCertificate
    tag, start, length = _der_header(der, pos, None)
    if tag == 0xA0:  # [0] EXPLICIT version: skip it
        tag, start, length = _der_header(der, start + length, None)
    if tag != 0x02 or length == 0:
        raise ValueError("certificate: no serial number where RFC 5280 puts it")
    return int.from_bytes(der[start : start + length], "big", signed=True)


def _der_header(der: bytes, pos: int, expect: int | None) -> tuple[int, int, int]:
    """(tag, where the content starts, its length) of the DER element at ``pos``."""
    if pos + 2 > len(der):
        raise ValueError("certificate: truncated")
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if expect is not None and tag != expect:
        raise ValueError(f"certificate: tag {tag:#x} where {expect:#x} belongs")
    if first & 0x80:
        count = first & 0x7F
        if not 1 <= count <= 4 or pos + count > len(der):
            raise ValueError("certificate: bad length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    else:
        length = first
    if pos + length > len(der):
        raise ValueError("certificate: truncated")
    return tag, pos, length


def peer_name(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, x509.Certificate]:
    from tlsroll import pki  # noqa: PLC0415 - see peer_certificate

    cert = peer_certificate(context)
    if cert is None:
        raise unauthenticated("no client certificate")
    return pki.names_of(cert).common_name, cert


def timestamp(t: dt.datetime | None) -> Timestamp | None:
    """A protobuf Timestamp (None stays unset)."""
    if t is None:
        return None
    out = Timestamp()
    out.FromDatetime(t)
    return out


def hostport(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


async def add_standard_services(server: grpc.aio.Server, service_names: Iterable[str]) -> Any:
    """Add the gRPC health and reflection services; every named service is reported SERVING."""
    names = list(service_names)
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in [*names, ""]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return servicer


def _tcp_target(target: str) -> tuple[str, int] | None:
    """(address, port) of an ``IP:PORT`` or ``[IPv6]:PORT`` target; None for anything else
    (``unix:…``, a name)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return str(ipaddress.ip_address(host.strip("[]"))), int(port)
    except ValueError:
        return None


def check_port_free(target: str) -> None:
    """Fail with one line if ``target`` (``IP:PORT``) cannot be listened on: in use, or not an
    address of this host. gRPC's C core would log its own line to stderr first (``E1130 …
    add_port.cc``), past our logging, before its bare RuntimeError; a plain socket finds out
    quietly. (A port taken between this check and gRPC's bind still gets gRPC's line.)"""
    tcp = _tcp_target(target)
    if tcp is None:
        return
    address, port = tcp
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC does: a port in TIME_WAIT is free, one that a process listens on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TerminalError(
                    f"cannot listen on {target}: another process listens there"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise TerminalError(
                    f"cannot listen on {target}: not an address of this host"
                ) from None
            raise TerminalError(f"cannot listen on {target}: {exc.strerror}") from None


# No bandwidth-delay probe: gRPC's core otherwise answers data that arrives on a quiet
# connection (a request, a reply, each message of a switch's watch) with a PING of its own to
# size the flow-control window: one more round trip per message that wakes the gRPC threads
# of both sides, for a window these small messages never fill (issue 15: the leader's gRPC
# threads switched about a third less per node of a rollout without it). The control port has
# none either (``leader.service.control_server_options``).
NO_BDP_PROBE = ("grpc.http2.bdp_probe", 0)


def connection_cap(connections: int) -> list[tuple[str, int]]:
    """Server options that bound what anyone who can reach a gRPC port holds of the process:
    at most ``connections`` connections at once (gRPC's core closes one more at once, as it
    accepts it: a legitimate client meanwhile is refused and tries again), and a connection
    whose TLS handshake has not ended within ``HANDSHAKE_SECONDS`` closed (gRPC's default is
    120 s). Without them 400 idle TCP connections from one host, no TLS,
    no token, filled a leader's descriptors: the admin socket stopped answering, the log
    filled with "socket.accept() out of system resource" (review rev58b H3). The cap is the
    server's own (one port's flood leaves the others alone); a flood kept up can still keep
    others from connecting to that port while it lasts, which only a firewall's per-source
    limit prevents (README "Security notes"). The handshake deadline is ``handshake_seconds``'s:
    ``HANDSHAKE_SECONDS``, or a test's shorter one."""
    return [
        ("grpc.max_allowed_incoming_connections", connections),
        ("grpc.server_handshake_timeout_ms", int(handshake_seconds() * 1000)),
    ]


HANDSHAKE_SECONDS = 10.0
TEST_HANDSHAKE_ENV = "TLSROLL_TEST_HANDSHAKE_SECONDS"
"""Tests only: a daemon's (leader's, agent's) TLS handshake deadline on its gRPC ports in place
of ``HANDSHAKE_SECONDS`` (seconds, over 0, never longer: ``handshake_seconds``), so that a test
of a flood of silent connections sees them closed in seconds, not ten. Read when a daemon makes
its servers' options (at its start; the agent's at import, ``AGENT_SERVER_OPTIONS``). Not a
setting: a shorter deadline only fails a slow peer's handshake sooner, a longer one holds a
flood's connections longer; no operator has a reason to trade either."""


def handshake_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """``HANDSHAKE_SECONDS``, or the test hook's (``TEST_HANDSHAKE_ENV``) if it holds a number in
    (0, ``HANDSHAKE_SECONDS``]: set wrong it is as unset (a hook is never a reason not to
    start)."""
    try:
        value = float(environ.get(TEST_HANDSHAKE_ENV, ""))
    except ValueError:
        return HANDSHAKE_SECONDS
    return value if 0 < value <= HANDSHAKE_SECONDS else HANDSHAKE_SECONDS


# Connections at once: the leader's join port (enrolments, a few at a time), its control port
# (each agent holds one, a renewal or the CLI's a second for a moment: issue 15's 500 nodes
# with room), an agent's NodeAgent port (the leader and `nodes --check`).
JOIN_CONNECTIONS = 256
CONTROL_CONNECTIONS = 4096
AGENT_CONNECTIONS = 64
# The agent's NodeAgent server (the leader's calls): no port sharing, no probe, a cap, and a
# PING every 5 minutes on a connection, so that one whose peer vanished (a host switched off)
# is closed within them and holds no place of the cap for hours (review rev58c L5).
AGENT_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    NO_BDP_PROBE,
    *connection_cap(AGENT_CONNECTIONS),
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


KEEPALIVE_NOTICE = 2.5
"""Intervals within which the leader notices an agent connection that went silent (the sum of
``keepalive_seconds``): under the 3 silent intervals after which a node is offline, with half
an interval to spare, so that a node whose agent stopped goes offline as promptly as when
every heartbeat was a message (``leader.service.LeaderService._uncount``)."""


def keepalive_seconds(heartbeat_interval: int) -> tuple[float, float]:
    """The leader's control port's HTTP/2 keepalive: a PING on an agent connection on which
    nothing arrived for this long (2 intervals at 2 s and more, 1.5 at 1 s), and the
    connection closed when its answer has not come within half an interval, at least a second;
    together ``KEEPALIVE_NOTICE`` intervals. gRPC's core starts a connection's keepalive time
    again whenever something arrives on it (a message, the agent's own PING:
    ``agent_ping_seconds``), so the leader PINGs only a connection that went silent. An agent
    that closes its stream (stopping, restarting, a new certificate) says so, and counts alive
    up to then; only a connection that broke without a word counts alive up to the last PING
    it could have answered (``leader.service.LeaderService._uncount``). Here, not in the
    leader, because the agent's PINGs are timed by it."""
    wait = max(1.0, heartbeat_interval / 2)
    every = max(float(heartbeat_interval), KEEPALIVE_NOTICE * heartbeat_interval - wait)
    return every, wait


AGENT_PING_SHARE = 0.8
"""The agent's PING period on its heartbeat connection, as a share of the leader's keepalive
time (``agent_ping_seconds``): a fifth of it to spare for timers that fire late."""


def agent_ping_seconds(heartbeat_interval: int) -> float:
    """How often an agent PINGs the leader on its heartbeat connection (8 s at the product's
    5 s, 1.2 s at 1 s): before the leader's own keepalive PING is due (``keepalive_seconds``),
    so that it never is while the agent lives. A PING the leader sends costs it a timer, a
    write and the answer's read on its event-engine threads, about 0.35 ms each at 50 agents
    (a bench that turned them off: 0.27 ms of leader CPU per agent and interval against 0.44;
    session 71, issue 15); one it answers, read and answered by gRPC's core on its polling
    thread, about 0.07 ms (the agents' own CPU per agent and interval 0.75 ms against 0.65).
    The leader still notices a silent connection as before: an agent that stopped or vanished
    stops PINGing, and the leader's own PING comes its keepalive time after the agent's last.
    At least a second apart: the control port takes PINGs that often
    (``leader.service.control_server_options``)."""
    return max(1.0, AGENT_PING_SHARE * keepalive_seconds(heartbeat_interval)[0])


def reconnect_options(max_seconds: float) -> list[tuple[str, int]]:
    """Channel options so that a peer that comes back is reached within ``max_seconds``
    (gRPC's own reconnect backoff grows to 120 s: a restarted leader or agent would go
    unnoticed that long)."""
    top = max(int(max_seconds * 1000), 500)
    return [
        ("grpc.initial_reconnect_backoff_ms", min(500, top)),
        ("grpc.min_reconnect_backoff_ms", min(500, top)),
        ("grpc.max_reconnect_backoff_ms", top),
    ]


def bind(server: grpc.aio.Server, target: str, credentials: grpc.ServerCredentials | None) -> None:
    """Bind a port or fail with one clear line (grpc's own error is a bare RuntimeError)."""
    check_port_free(target)
    try:
        if credentials is None:
            server.add_insecure_port(target)
        else:
            server.add_secure_port(target, credentials)
    except RuntimeError:
        raise TerminalError(
            f"cannot listen on {target}: in use or not an address of this host"
        ) from None
