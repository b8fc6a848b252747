"""``tlsroll client test-connection``: the seed's "Test connection" button, run on a workstation.

It needs no access to the leader, only the node's new address and the auth password (or the
CA pin). The steps, in the seed's order:

  (a) the address: https, a port and the app path; an http address or port 8080 is the old
      unencrypted one and gets the new one suggested;
  (b) TLS handshake and the app path answering; the certificate's fingerprint is shown (not
      trusted yet: the CA is not known);
  (c) the port check: the bootstrap port (9443, "Bootstrap port (Enter = 9443; …):" to confirm
      or change; ``--bootstrap-port`` or ``--yes`` for scripts) must answer with the node's
      hello (name, the password's salt and scrypt parameters, its CA; with ``--ca-pin`` the
      CA must match the pin here already): a port another program holds is found here;
  (d) the password (no echo, or ``--password-file``), asked before anything secret is sent
      and held to the password file's rule;
  (e) a key and CSR (``ws-<name>``: ``--name``, else the name this PC enrolled under before,
      by a certificate of a CA the hello names, else its host name's first label; the key
      never leaves the workstation) and the
      password exchange (``tlsroll.bootstrap_protocol``: SPAKE2, key confirmation both ways;
      the CSR goes sealed, the CA bundle and the client certificate come back sealed). The
      certificate of (b) must come from that CA (or the pinned one), a verified handshake
      (chain and IP/name) must succeed; then the settings dir: ``settings.json``, ``ca.pem``,
      ``client.pem``, ``client.key`` (0600), replaced as one set (``settings_files``: a run
      cut short leaves the old set or a new one the next run completes) once a request with
      the new set, staged beside the old one, has succeeded (a set that fails it is not
      written); then "restart the client to finish". The settings dir is checked (ours,
      writable) before the password is asked for: after the exchange a run has enrolled.

The name is this PC's. The CSR carries, signed by the key of this PC's newest certificate of
that name in its settings dir (of those from a CA the node's hello names, if any: a pair a fake
node handed over is not the proof), proof that it holds that certificate
(``bootstrap_csr.Reenrolment``): the leader then signs the name again and supersedes the
certificate. Another PC of the same name has no such proof and is refused (exit 11, audit
s39ws M2: it took the name over and the first PC's certificate was revoked) unless its admin
says ``--replace`` (a new PC for an old one). A new enrolment whose final check fails leaves
the settings before in place and keeps its new key and certificate in
``.enrolment-kept`` (``settings_files``), with which the next run proves the name: the leader
has superseded the certificate in place by then, and without them only ``--replace`` could
enrol this PC again. The PC is never left without a working set (s39wsfix): settings before
whose certificate the leader has just revoked stay only while a request with them still
succeeds; otherwise the new set goes in place all the same (the one certificate the leader
holds valid), and the error says what failed (``after_failed_check``). A client key and
certificate in place that a new set replaces and that may still be valid (another name's, or
another CA's: this enrolment did not supersede them) are kept with their set in
``.settings-replaced`` (one set at most, the key 0600), and that is said (s43rev3 Low 4); a
client.pem link to a certificate of the key is kept with it as a file (s47rev3 L1). A
client.key whose client.pem is another link or a FIFO is kept there alone (s47ws: it was
overwritten), unless that would lose a set kept there that may still be valid: then nothing is
replaced (exit 1) and the error says which folder to move out, or that the key may be removed
(s46rev2 M1, s47rev3 M1). A client.key with no client.pem at all is replaced, and that is said:
its certificate gone, it can neither be used nor prove the PC's name (s47rev3 M1: keeping it
stopped the everyday "delete client.pem, enrol again"). A settings file that
is not a regular file (a FIFO: the run waited on it for ever) is never opened, and a note says
so (nor one swapped in after the check: ssl loads the files checked, held open, s47rev3 L4); a
link is followed to tell the set in place (its name, whether it still works), never
copied (s46rev2 M2, s47ws).

Each password attempt costs one exchange with the node, which counts the failures (backoff,
429 with Retry-After). The client never falls back to protocol 1: a node that speaks only that
is "too old: upgrade the agent".

``--ca-pin PIN --no-enrol`` trusts the CA by the pin and writes the settings without a client
certificate, with no password involved at all. The client key and certificate in place are
taken out of place (``.enrolment-kept``, the newer of them and a pair kept there before); the
older of the two, if it may still be valid (another name's or another CA's), is kept in
``.settings-replaced``, said, as a set an enrolment replaced (s45ws: it was removed), unless
the set there may still be valid too: then nothing is moved, and that is said (s45rev1 M1).

Exit codes (every error is one line on stderr; the password is never printed):

    0   done: settings written, restart the client
    1   other failure (unexpected answer, settings dir not writable or, run as root, in a
        directory another user owns (``sudo`` keeping HOME), check with the new
        settings failed: nothing written and a new enrolment kept aside, or the new set
        written all the same when the leader revoked the one in place and it fails too;
        aborted at a prompt)
    2   usage: bad URL, option, CA pin syntax, no name to enrol under (host name
        "localhost": --name), a --name that would become another name (``check_name``: a
        dot, no letter a name can hold, nothing after its ws-, a hyphen at an end or two in
        a row, more than 60 after the ws-), a password file that is empty/unreadable or
        that group or others may access (chmod 600 it), or a password (typed or in the file)
        no password may be (white space around it, a control character): refused before
        anything is sent
    3   http instead of https: an http address, or a node still on http (not switched yet, or
        switched back)
    4   host unreachable (no route, no answer, name not resolved), or the server took the
        connection but gave no complete answer within --timeout (hung, or trickling it)
    5   connection refused on the server port (wrong port, or the server is not running)
    6   TLS failure (handshake failed, not TLS on that port)
    7   the app path does not answer (wrong APP path); on a server that wants client
        certificates, asked with this PC's pair in place (or kept aside) if it has one,
        before the port and the password: nothing enrolled
    8   bootstrap port closed (9443 or the one given: the node's agent down, a firewall, the
        wrong port; the message says what to check), no complete answer from it in time (the
        exchange's wait, at least ``proto.MIN_EXCHANGE_WAIT``, in the exchange), the hello's
        connection ended after the TLS handshake with no answer and the next one refused
        (the node's agent stopping or restarting: try again), or another program answers on
        it (one that ends each connection after the TLS handshake, as a server's port that
        wants client certificates does, too)
    9   wrong password: the node did not accept it
    10  not the cluster's node: certificate not from the expected CA, the CA does not match
        --ca-pin, or the node could not prove that it knows the password
    11  enrolment refused, rate-limited or busy at the node; a name another PC holds
        (choose another with --name, or --replace if this PC replaces that one), or one an
        earlier run of this PC left held when it was cut short after sending its CSR
        (``settings_files.PENDING``: --replace)
    130 interrupted (Ctrl-C) outside a prompt: the line says what state it left: nothing
        done; the CSR's connection still being made, nothing sent (cancelled at once: review
        s64); the new certificate kept aside; the settings written; the node's answer to the
        CSR not arrived (it may have signed); or that answer arrived and not kept (the name
        is held). Ctrl-C while the CSR goes and the node's answer is on its way is held
        back until the new pair is kept (one line says so; a second Ctrl-C gives up, and the
        name may stay held at that node)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import http.client
import io
import ipaddress
import json
import os
import pwd
import re
import signal
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import click
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from tlsroll import bootstrap_base, bootstrap_csr, pki
from tlsroll import bootstrap_protocol as proto
from tlsroll.clients import WORKSTATION_HEADER
from tlsroll.defaults import BOOTSTRAP_PORT, HTTP_PORT, HTTPS_PORT
from tlsroll.echo import secret_inside, shown
from tlsroll.errors import PKIError, TerminalError, TransientError
from tlsroll.fsutil import (
    PRIVATE,
    PUBLIC,
    look_up,
    make_private_dir,
    private_dir_problem,
    user_label,
)
from tlsroll.httpcheck import (  # (as the agent's verify, the leader's confirm)
    PROBE_HEADERS,
    probe_target,
)
from tlsroll.password import folded, password_problem
from tlsroll.tls import client_context, unverified_client_context
from tlsroll.tls import connect as tls_connect
from workstation import settings_files

DEFAULT_TIMEOUT = proto.CLIENT_WAIT  # (the node's answers are timed to come within it)
START_ATTEMPTS = 2  # exchanges started when the first is near its expiry before finishing
ENDED_PAUSE = 1.0  # seconds before the hello is asked again after no answer (``fetch_hello``)
EXPIRY_MARGIN = 5.0  # seconds: less than this left, start again instead of confirming
# Of a node's refusal message: the leader's refusal of a name says what to do in ~260
# characters (audit s39ws L4: cut at 160, the remedy was lost); the whole line stays < 600.
NODE_MESSAGE_CHARS = 400
# Host names that name no PC in particular: no default name is made of them.
_NO_NAMES = frozenset({"ws-localhost", "ws-workstation"})
SETTINGS_VERSION = 1
# What OpenSSL says when the other side answers a ClientHello with plain http.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})


class Exit(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    OLD_HTTP = 3
    UNREACHABLE = 4
    REFUSED = 5
    TLS = 6
    APP = 7
    BOOTSTRAP_PORT = 8
    WRONG_PASSWORD = 9
    UNTRUSTED = 10
    ENROL_REFUSED = 11
    INTERRUPTED = 130  # 128 + SIGINT, as a shell says it (and the admin commands: README)


class ClientError(click.ClickException, TerminalError):
    """One line for the workstation admin, with its own exit code (see the table above)."""

    def __init__(self, code: Exit, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.code = code
        # The request went out and its answer did not come (``_call``: no complete answer
        # within its wait): the node may have acted on it, as on a finish it signed.
        self.sent = sent

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return int(self.code)


class NotReplaced(ClientError):
    """The set in place could not be kept in ``settings_files.REPLACED`` (a full disk):
    nothing was replaced. Where the new pair is kept is said in a note line of its own
    (``_said_kept``), the error line being long enough."""


class KeyAloneHeld(NotReplaced):
    """``NotReplaced`` as the client.key in place, alone (its client.pem a link or a FIFO),
    could not be kept aside without losing the set ``settings_files.REPLACED`` holds, which
    may still be valid (s46rev2 M1). Said even where the run then keeps the settings before
    (``after_failed_check``: s47rev3 L2, it was swallowed)."""


class NotFinished(ClientError):
    """The new set was committed and a later step failed (``settings_files.Unfinished``):
    the new pair is in place, and the next run completes the set; nothing is added about
    where it is kept (``_said_kept``; s45rev1 M4: a 630-character line, and wrong)."""


class CheckFailed(ClientError):
    """The request with the new settings failed (``problem`` says how): nothing was written."""

    def __init__(self, problem: str) -> None:
        super().__init__(
            Exit.FAILURE,
            "a request with the new settings failed (nothing written, the settings before are "
            f"kept): {problem}",
        )
        self.problem = problem


def _newer_staging(settings_dir: Path) -> str:
    return (
        f"{settings_dir} holds an interrupted change of a newer tlsroll: "
        "finish it with that version"
    )


def default_settings_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tlsroll" / "client"


# --- (a) the address ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerURL:
    host: str
    port: int
    app_path: str

    @property
    def netloc(self) -> str:
        return _netloc(self.host, self.port)

    @property
    def url(self) -> str:
        return f"https://{self.netloc}{self.app_path}"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class OldAddress(ClientError):
    """An http address (or port 8080) where the https one is wanted: ``https`` is where the
    new one would be. The message calls it the old address; ``TestConnection`` says so only
    if https answers there (audit s39ws M7: after a rollback it was "the old address")."""

    def __init__(self, given: str, https: ServerURL) -> None:
        super().__init__(
            Exit.OLD_HTTP, f"{given} is the old unencrypted address; the new one is {https.url}"
        )
        self.given = given
        self.https = https


def check_url(text: str) -> ServerURL:
    """Check the new server address; ClientError(OLD_HTTP) or click.BadParameter if wrong."""
    example = "https://HOST:8443/APP/, e.g. https://192.168.1.5:8443/praxis_live/"
    # Before urlsplit, which drops a tab or a line end without a word; http.client refuses a
    # space or control character (InvalidURL, once taken for "client certificate required")
    # and cannot send a non-ASCII path (audit s39ws M6).
    for position, char in enumerate(text.strip(), 1):
        if char.isspace() or not char.isprintable():
            what = "a space" if char == " " else f"a space or control character (U+{ord(char):04X})"
            raise click.BadParameter(
                f"the address has {what} at position {position}; an address has none (a space "
                f"in the app path is written %20); use {example}",
                param_hint="URL",
            )
    try:
        parts = urlsplit(text.strip())
        hostname = parts.hostname  # a bracketed host that is no IPv6 address raises here
    except ValueError:
        raise click.BadParameter(
            f"{shown(text)} is not a server address; use {example}", param_hint="URL"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not hostname:
        raise click.BadParameter(
            f"{shown(text)} is not a server address; use {example}", param_hint="URL"
        )
    if (kind := secret_inside(parts.path)) is not None:
        # A viewer login link (https://LEADER:9444/login/SECRET) given for the server's: its
        # secret was printed in every line that names the address (review s48rev3), and an
        # address that answered is written to the settings. Said as what it looks like.
        raise click.BadParameter(
            f"the address holds what looks like {kind}: no server address does (a viewer "
            f"login link is opened in a browser); use {example}",
            param_hint="URL",
        )
    if parts.username is not None or parts.password is not None:
        raise click.BadParameter("the address must not contain a user name", param_hint="URL")
    if parts.query or parts.fragment:
        raise click.BadParameter(
            f"no ?query or #fragment in the address; use {example}", param_hint="URL"
        )
    try:
        port = parts.port
    except ValueError:
        raise click.BadParameter(
            f"{shown(text)} has an invalid port; use {example}", param_hint="URL"
        ) from None
    path = parts.path or "/"
    if not path.isascii():
        char = next(c for c in path if not c.isascii())
        raise click.BadParameter(
            f"the app path has a character an address cannot carry as it is (U+{ord(char):04X}); "
            f"write it percent-encoded, as the address in your notice; use {example}",
            param_hint="URL",
        )
    if not path.endswith("/"):
        path += "/"
    host = _check_numeric_host(hostname, example)
    try:
        # As the resolver will (``socket.getaddrinfo`` encodes a host name so): an empty label
        # (``a..b``, ``.``) or one over 63 characters raised UnicodeError there, "internal
        # error" (review s63 ops M3).
        host.encode("idna")
    except UnicodeError:
        raise click.BadParameter(
            f"{shown(text)} is not a server address: {shown(host)} is no host name (an empty"
            f" part between dots, or one longer than 63 characters); use {example}",
            param_hint="URL",
        ) from None
    if scheme == "http" or port == HTTP_PORT:
        raise OldAddress(text.strip(), ServerURL(host, HTTPS_PORT, path))
    if port is None:
        raise click.BadParameter(f"the address needs the port; use {example}", param_hint="URL")
    if path == "/":
        raise click.BadParameter(f"the address needs the app path; use {example}", param_hint="URL")
    return ServerURL(host, port, path)


_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def _check_numeric_host(host: str, example: str) -> str:
    """A host of numbers only must be an IPv4 address written plainly: the resolver reads
    ``127.000.000.010`` as octal (127.0.0.8), ``127.1`` as 127.0.0.1 and ``0x7f.0.0.1`` as hex
    (audit s39ws L5: a zero-padded address reached another host than the one written), with a
    final dot too (``127.000.000.010.``, audit s40ws L4). Returns the host to use: such an
    address without its final dot (the address the certificate names), else ``host``."""
    numeric = host.rstrip(".")
    labels = numeric.lower().split(".")
    if not all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        return host
    try:
        return str(ipaddress.IPv4Address(numeric))
    except ValueError:
        plain = ".".join(str(int(label)) for label in labels if label.isdigit())
        how = (
            f"a number with a leading zero may be read as octal (010 as 8); write {plain}"
            if len(labels) == 4 and all(label.isdigit() for label in labels)
            else "write it as four decimal numbers"
        )
        raise click.BadParameter(
            f"{host} is not an IPv4 address as written: {how}; use {example}", param_hint="URL"
        ) from None


_NAME_EXAMPLE = "empfang-1"


def check_name(name: str) -> str:
    """The certificate name (``ws-…``) of a ``--name``; click.BadParameter (exit 2, nothing
    sent) where ``workstation_cn`` would make of it another name than the one given, with the
    exact one to use instead. One rule (review s64: ``ws-`` became ws-ws, ``-x-`` ws-x, and
    ``ws-`` with 58 letters was refused as too long): the name, spelt as a name holds it
    (``bootstrap_base.workstation_spelling``: case, umlauts and spaces, as ever: ``Empfang 1``
    is ws-empfang-1), with ``ws-`` before it unless it starts so, is the certificate name, or
    it is refused. Refused: a name with a dot (only its first part was taken: review s63 L3),
    one that gives a name of no PC in particular (``_NO_NAMES``: no letter or digit a name
    can hold, or "localhost"), one that makes a certificate name longer than
    ``bootstrap_base.CN_CHARS`` (counted as that name, whether or not the ``ws-`` was typed),
    one with nothing after its ``ws-``, and one with a hyphen at an end or two in a row (which
    were dropped). The name suggested passes this check as it is. A host name's name is made
    as before (its first label, ``_refuse_no_name``)."""
    spelt = bootstrap_base.workstation_spelling(name)
    typed_prefix = spelt.startswith("ws-")
    as_given = spelt if typed_prefix else f"ws-{spelt}"  # the name it stands for, uncut

    def refuse(why: str, instead: str) -> click.BadParameter:
        body = bootstrap_base.workstation_label(instead).removeprefix("ws-")
        body = body[: bootstrap_base.NAME_CHARS].rstrip("-")
        prefix = "ws-" if typed_prefix else ""
        if not body or f"ws-{body}" in _NO_NAMES:
            body, prefix = _NAME_EXAMPLE, ""
        return click.BadParameter(
            f"{shown(name)} {why}: use --name {prefix}{body}, or another name of letters, "
            "digits and hyphens; nothing was sent",
            param_hint="--name",
        )

    cn = proto.workstation_cn(name)
    if not bootstrap_base.workstation_label(name.replace(".", "-")):
        raise refuse(
            "holds no letter or digit a certificate name can have (a-z, 0-9 and hyphens)",
            _NAME_EXAMPLE,
        )
    if "." in name:
        raise refuse(
            f"has a dot: a name is one word, and only what comes before the dot would be "
            f"taken ({cn})",
            name.replace(".", "-"),
        )
    if cn in _NO_NAMES:
        raise refuse(f"names no PC in particular ({cn})", _NAME_EXAMPLE)
    if as_given == "ws-" or (typed_prefix and not spelt.removeprefix("ws-").strip("-")):
        raise refuse("has no name after its ws-", _NAME_EXAMPLE)
    if len(as_given) > bootstrap_base.CN_CHARS:
        raise refuse(
            f"makes a certificate name of {len(as_given)} characters (ws- and the name), more "
            f"than the {bootstrap_base.CN_CHARS} one may have",
            spelt,
        )
    if as_given != cn:
        raise refuse(
            f"has a hyphen at its start or end, or two in a row, which a certificate name "
            f"cannot hold (it would be {cn})",
            spelt,
        )
    return cn


# --- network helpers ----------------------------------------------------------------------------


class NetError(TransientError):
    """A network failure, sorted by what the admin can do about it."""

    def __init__(
        self, kind: str, detail: str, reason: str | None = None, peer_der: bytes | None = None
    ) -> None:
        super().__init__(detail)
        # unreachable | refused: TCP; tls: the handshake failed; verify: the certificate did
        # not verify; dropped: the handshake succeeded, then no http answer came (a server that
        # wants a client certificate closes the connection, or alerts, at that point);
        # timeout: the handshake succeeded, then no complete answer came within the wait (a
        # server hung, or one that trickles its answer: review s63 M3, L1)
        self.kind = kind
        self.detail = detail
        self.reason = reason  # the OpenSSL reason, if any
        self.peer_der = peer_der  # the server's certificate, for kind "dropped"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]
    peer_der: bytes | None


def _set_context(d: Path) -> ssl.SSLContext:
    """A client context of the settings set in ``d``: trusting its ``ca.pem``, presenting its
    client key and certificate. Each file read as the practice software reads it, a link
    followed, a regular file only (a FIFO never opened: s47ws), and held open as checked and
    handed to ssl so (by name, a FIFO swapped in after the check was opened: s47rev3 L4)."""
    ca_pem = settings_files.read_file(d / "ca.pem")
    with settings_files.held_files(d / "client.pem", d / "client.key") as (cert, key):
        return client_context(ca_pem, cert_file=cert, key_file=key)


def _connect_error(exc: OSError, host: str, timeout: float) -> NetError:
    """What a failed TCP connect to ``host`` means to the admin."""
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return NetError("refused", "connection refused")
    if isinstance(exc, socket.gaierror):
        return NetError("unreachable", f"cannot resolve {host}: {exc.strerror}")
    if isinstance(exc, TimeoutError):
        return NetError("unreachable", f"no answer within {timeout:g} s")
    return NetError("unreachable", exc.strerror or str(exc))


def _tls_error(exc: ssl.SSLError) -> NetError:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return NetError("verify", exc.verify_message or str(exc.reason), reason)
    return NetError("tls", f"{reason or exc}".replace("_", " ").lower(), reason)


class _Deadline(io.RawIOBase):
    """What http.client reads an answer from: the socket, each read waiting no longer than
    what is left until ``deadline`` (``time.monotonic``), TimeoutError past it. The socket's
    own timeout bounds one read only: a server that sends a byte a second held a run for
    ever, whatever ``--timeout`` (review s63 M3). Checked before each read rather than a timer
    closing the socket from another thread: nothing can act on a descriptor the run has closed
    and the system handed to another connection."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the answer's deadline has passed")
        return left

    def readinto(self, buffer: Any) -> int:
        self.sock.settimeout(self.left())  # (ssl's read keeps to it as a whole, not per record)
        return self.sock.recv_into(buffer)


class _Bounded:
    """A socket for ``http.client`` whose request and answer, together, keep to one deadline
    (``_Deadline``); the socket itself is closed by its owner."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.reader = _Deadline(sock, deadline)
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.reader.left())
        self.sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        assert mode == "rb"
        return io.BufferedReader(self.reader)

    def close(self) -> None:
        pass


def request(
    host: str,
    port: int,
    method: str,
    path: str,
    context: ssl.SSLContext,
    *,
    body: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    workstation: str | None = None,
    probe: bool = False,
    connect_timeout: float | None = None,
    sending: Callable[[], None] | None = None,
) -> Reply:
    """One https request; every failure becomes a NetError with its kind. ``workstation``:
    the ws-… name sent in the X-Tlsroll-Workstation header, so that the application server
    can tell which workstation is on which scheme (``tlsroll.clients``). ``probe``: a check
    of this tool's before the PC's new settings work (``PROBE_HEADERS``, no name, and the
    request line marked, ``probe_target``: an access log in the common log format has no
    User-Agent, session 75 probemark): the server records no client for it, so that a run
    that fails (a wrong password) does not make the PC look moved to https, which would let a
    finalize cut it off. ``timeout``: the
    wait for the whole answer, from the end of the handshake (one deadline, not one per read:
    review s63 M3), NetError "timeout" past it; ``connect_timeout`` (default ``timeout``): for
    the connection and the TLS handshake (a host that does not answer fails within it,
    whatever the wait for an answer: s44rev1 L6). ``sending``: called once the handshake is
    made, as the request is about to go (before that, a failure or a Ctrl-C left the server
    nothing to act on; from then on it may have: ``TestConnection.exchange``)."""
    connecting = timeout if connect_timeout is None else connect_timeout
    with _handshaken(host, port, context, connecting) as tls:
        peer = tls.getpeercert(binary_form=True)
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        conn.sock = _Bounded(tls, time.monotonic() + timeout)
        headers = {"Accept": "application/json", "Connection": "close"}
        if probe:
            headers |= PROBE_HEADERS
            path = probe_target(path)
        elif workstation:
            headers[WORKSTATION_HEADER] = workstation
        if body is not None:
            headers["Content-Type"] = "application/json"
        if sending is not None:
            sending()
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(proto.MAX_ANSWER_BYTES + 1)
        except ssl.SSLError as exc:
            err = _tls_error(exc)
            raise NetError("dropped", err.detail, err.reason, peer) from None
        except TimeoutError:  # (not "closed": the server may still be sending, s63 L1)
            raise NetError("timeout", _no_answer(timeout), None, peer) from None
        except (http.client.HTTPException, OSError) as exc:
            detail = f"the server closed the connection ({type(exc).__name__})"
            raise NetError("dropped", detail, None, peer) from None
        finally:
            conn.close()
        if len(data) > proto.MAX_ANSWER_BYTES:
            raise NetError("dropped", _TOO_LARGE, None, peer)
        return Reply(resp.status, data, {k.lower(): v for k, v in resp.getheaders()}, peer)


_TOO_LARGE = "answer too large"


def _handshaken(host: str, port: int, context: ssl.SSLContext, connecting: float) -> ssl.SSLSocket:
    """A TLS connection to ``host:port``, its handshake made within ``connecting`` seconds;
    every failure a NetError with its kind (the caller owns the socket once returned)."""
    try:  # wrapped before its connect: see tlsroll.tls.connect
        tls = tls_connect(
            context, host, port, timeout=connecting, server_hostname=host, handshake=False
        )
    except OSError as exc:
        raise _connect_error(exc, host, connecting) from None
    with contextlib.ExitStack() as closing:
        closing.callback(tls.close)
        try:
            tls.do_handshake()
        except ssl.SSLError as exc:
            raise _tls_error(exc) from None
        except TimeoutError:
            raise NetError("tls", f"no TLS handshake within {connecting:g} s") from None
        except OSError as exc:
            raise NetError("tls", f"connection closed during the handshake ({exc})") from None
        closing.pop_all()
    return tls


def handshake(host: str, port: int, context: ssl.SSLContext, *, timeout: float) -> None:
    """A TLS handshake with ``host:port`` and nothing after it (NetError as ``request``'s):
    for a check about TLS alone (does https answer, does the certificate verify). No HTTP
    request goes, so no access log counts this PC as a client by it, whatever the log's
    format (session 75 probemark: the common log format has no User-Agent to tell a probe
    by)."""
    with _handshaken(host, port, context, timeout):
        pass


def _no_answer(timeout: float) -> str:
    return f"no complete answer within {timeout:g} s"


def answers_plain_http(host: str, port: int, path: str, timeout: float) -> bool:
    """True if ``host:port`` answers an unencrypted http request (a node still on http),
    within ``timeout`` (at most 5 s) as a whole (``_Bounded``)."""
    wait = min(timeout, 5.0)
    try:
        sock = socket.create_connection((host, port), timeout=wait)
    except OSError:
        return False
    conn = http.client.HTTPConnection(host, port, timeout=wait)
    conn.sock = _Bounded(sock, time.monotonic() + wait)
    try:
        # (a probe: ``request``'s rule; its request line marked for logs without User-Agent)
        conn.request("GET", probe_target(path), headers={"Connection": "close", **PROBE_HEADERS})
        conn.getresponse().read(1024)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
        sock.close()
    return True


def one_line(text: object, limit: int = 200) -> str:
    """Server-supplied text made safe to print: one line, printable, bounded."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    clean = " ".join(clean.split())
    return clean[:limit] + ("…" if len(clean) > limit else "")


# --- the steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    url: str
    settings_dir: Path
    bootstrap_port: int | None = None
    password: str | None = field(default=None, repr=False)
    ca_pin: str | None = None
    assume_yes: bool = False
    enrol: bool = True
    name: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    replace: bool = False


@dataclass
class UI:
    """How the steps talk to the person at the workstation (click in the CLI, stubs in tests)."""

    say: Callable[[str], None]
    ask_port: Callable[[int], int]
    ask_password: Callable[[], str]


@dataclass
class Result:
    server: ServerURL
    bootstrap_port: int
    node: str
    ca_pin: str
    server_fingerprint: str
    client_fingerprint: str | None
    settings_dir: Path


class HeldInterrupt:
    """Ctrl-C (SIGINT) held back from ``hold()`` to ``release()``: from the finishing request
    (the CSR) going out until the new pair the node answers with is kept aside
    (``TestConnection.keep_new_pair``). Given up in between, the run would leave the leader a
    certificate for this PC's name that nobody holds, and its next run would find the name
    taken (s63 M1). The first Ctrl-C says so in one line and is acted on once the pair is kept
    (``release`` raises KeyboardInterrupt then); a second gives up at once. The wait is bounded
    by the exchange's own (``exchange_wait``): the request's answer comes, or it fails, within
    it. Only where Python lets a handler be set (the main thread): a run in another thread
    (the tests' in-process runs) is interrupted as before."""

    LINE = "note      finishing the enrolment; Ctrl-C again to give up (the name may stay held)"

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.came = False  # a Ctrl-C came while held: acted on at ``release``
        self._before: Any = None
        self._held = False
        # The request's connection being made (``connecting`` to ``going``): nothing of it
        # sent, a Ctrl-C cancels at once; before ``going``, nothing is said of finishing.
        self._cancel = False
        self._going = False

    def hold(self) -> None:
        """Held from now; not where SIGINT is ignored (``nohup``, a shell's background job):
        it stays so."""
        if self._held or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return
        try:
            self._before = signal.signal(signal.SIGINT, self._interrupt)
        except ValueError:  # (not the main interpreter)
            return
        self._held = True

    def connecting(self) -> None:
        """From now until ``going``, the request's connection is being made and nothing of
        it has gone: a Ctrl-C cancels the run at once (KeyboardInterrupt; review s64: the
        first one was held, and the request went all the same), as does one that came since
        ``hold`` (while the note was written: ``TestConnection.exchange``)."""
        self._cancel = True
        if self.came:
            self.came = False
            raise KeyboardInterrupt

    def going(self) -> None:
        """The request goes now (``request``'s ``sending``): a Ctrl-C is held from here."""
        self._cancel = False
        self._going = True

    def _interrupt(self, _signum: int, _frame: FrameType | None) -> None:
        if self._cancel or self.came:
            self._cancel = False
            self._restore()
            raise KeyboardInterrupt
        self.came = True
        if self._going:
            self.say(self.LINE)

    def _restore(self) -> None:
        if self._held:
            self._held = False
            # (None: the handler before was not set from Python; the default then)
            before = signal.SIG_DFL if self._before is None else self._before
            signal.signal(signal.SIGINT, before)

    def release(self, *, act: bool = True) -> None:
        """The handler before back in place; then, with ``act``, a Ctrl-C that came while
        held is acted on (KeyboardInterrupt). Without it (the run failed meanwhile), its
        error goes on as it is."""
        self._restore()
        self._cancel = self._going = False
        came, self.came = self.came, False  # (never acted on later: review of s63-w2 L6)
        if act and came:
            raise KeyboardInterrupt


class TestConnection:
    """The steps (a) to (e); ``run()`` returns a Result or raises ClientError."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, options: Options, ui: UI) -> None:
        self.o = options
        self.ui = ui
        self.pin = proto_pin(options.ca_pin)
        # The name of its certificate, also sent with each request to the app path: --name,
        # else the name this PC enrolled under before, else its host name's (``choose_name``,
        # then, once the node's hello is read, ``choose_proof``).
        self.host = socket.gethostname()
        self.workstation = (
            proto.workstation_cn(self.host) if options.name is None else check_name(options.name)
        )
        if not options.enrol and self.pin is None:
            raise click.UsageError(
                "--no-enrol needs --ca-pin: without the password only a pin can verify the CA"
            )
        if options.replace and not options.enrol:
            raise click.UsageError("--replace is for an enrolment; drop --no-enrol")
        self.context = unverified_client_context()
        # With the pin: the bootstrap port's certificate as the hello's connection showed it
        # (``fetch_hello``), and the context that verifies it by the pinned CA for the
        # exchange's requests (``check_bootstrap_cert``).
        self.hello_peer: bytes | None = None
        self.exchange_context: ssl.SSLContext | None = None
        self.server: ServerURL | None = None  # (the address checked: ``check_arguments``)
        # This PC's newest client certificate and key in its settings dir, if of the name it
        # enrols under: they prove that it is the PC that holds the name (``exchange``).
        self.previous: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        # The certificate in place whose name this PC asks for with no proof: of a CA the
        # node's hello no longer names (``choose_proof``).
        self.unproven: x509.Certificate | None = None
        # How far the run got, for what a Ctrl-C says (``interrupted``): the finishing
        # request sent, the new pair kept aside (where), the settings written.
        self.finishing = False  # (the finishing request about to be made: ``exchange``)
        self.finish_sent = False
        self.kept_at: Path | None = None
        self.new_cert_pem: bytes | None = None  # (the new client certificate, once here)
        self.written = False
        self.held = HeldInterrupt(ui.say)
        # What ``settings_files.PENDING`` said before this run wrote its own (``exchange``),
        # whether the settings dir was made for it, whether the node answered the request.
        self.earlier: settings_files.Pending | None = None
        self.made_dirs: list[Path] = []
        self.marked = False  # (this run's note written, and not taken back)
        self.answered = False

    def run(self) -> Result:
        """The steps; a Ctrl-C outside a prompt (where click says "aborted", exit 1) is exit
        130 with the state it leaves said (s63 L2: "tlsroll: aborted", whatever it left)."""
        try:
            return self._run()
        except KeyboardInterrupt:
            self.held.release(act=False)
            if self.marked and not self.finish_sent:  # (given up before the request went)
                self._unmark_pending()
            raise ClientError(Exit.INTERRUPTED, self.interrupted()) from None

    def interrupted(self) -> str:
        """What a Ctrl-C left: the settings written, the new pair kept aside, the node's answer
        arrived but not kept (the name held: the next run says so), a finishing request whose
        answer did not arrive (the name may be held: the next run says so), or nothing done."""
        d, name = self.o.settings_dir, self.workstation
        if self.written or self._new_set_in_place():
            enrolled = f"enrolled as {name}; " if self.kept_at or self.finish_sent else ""
            return (
                f"interrupted: {enrolled}the settings were written to {d}: restart the client "
                "to finish"
            )
        if self.kept_at is not None:
            return (
                f"interrupted: enrolled as {name}, the new certificate is kept in "
                f"{self.kept_at}, the settings are not written yet: run this again to finish "
                "(it proves this PC's name with it: no --replace needed)"
            )
        if self.answered or self.new_cert_pem is not None:
            # (A second Ctrl-C while the pair was being kept, or one held while keeping it
            # failed: review of s63-w2 L1, it said the answer had not arrived.)
            return (
                "interrupted: the node's answer arrived but could not be kept: the name "
                f"{name} is held at that node by a certificate this PC does not have; run "
                "this again (with --replace if the name is refused as taken)"
            )
        if self.finishing and not self.finish_sent:
            return (
                "interrupted before the enrolment's last request was sent: nothing was "
                f"enrolled, the settings in {d} are as they were"
            )
        if self.finish_sent:
            return (
                "interrupted before the node's answer to the enrolment arrived: it may have "
                f"signed a certificate for {name} all the same, which this PC does not have and "
                "which holds the name at that node; run this again (if the name is refused as "
                "taken, it says what to do)"
            )
        return f"interrupted: nothing was enrolled, the settings in {d} are as they were"

    def _new_set_in_place(self) -> bool:
        """Whether the new client certificate is in place: its set written (a Ctrl-C right
        after ``settings_files.replace`` returned, before ``written`` was set)."""
        if self.new_cert_pem is None:
            return False
        try:
            return settings_files.read_file(self.o.settings_dir / "client.pem") == self.new_cert_pem
        except OSError:
            return False

    def check_arguments(self) -> bool:
        """The address on its own (``check_url``), before anything is asked or read, the
        settings dir included (review s64: a bad URL was found only after --password-file
        was read, or the port was asked for): click.BadParameter (exit 2; bad input changes
        nothing). True for an http address: such a run asks nothing and reads no password
        (``run`` says it, once an interrupted change of the settings is finished, as every
        run does)."""
        try:
            self.server = check_url(self.o.url)
        except OldAddress:
            return True
        return False

    def check_address(self) -> ServerURL:
        """The address checked (``check_arguments``), an http address said as the old one
        only where https answers there (audit s39ws M7): ClientError (exit 3)."""
        if self.server is not None:
            return self.server
        try:
            return check_url(self.o.url)
        except OldAddress as exc:
            if self._answers_https(exc.https):
                raise
            raise ClientError(
                Exit.OLD_HTTP,
                f"{exc.given} is an unencrypted address, and {exc.https.url} does not answer: "
                "the node is not switched to https yet, or switched back; nothing to set up now",
            ) from None

    def given_password(self, secret: str | None) -> None:
        """The password from --password-file, read once the arguments are checked
        (``check_arguments``: the CLI reads the file after them)."""
        self.o = replace(self.o, password=secret)

    def _run(self) -> Result:
        o = self.o
        self.check_arguments()
        self.check_not_root_in_a_users_dir()
        self.finish_settings()
        self.say_not_files()
        self.choose_name()
        server = self.check_address()
        self.ui.say(f"address   {server.url}")
        server_cert = self.check_server(server)
        self.check_dates(server, server_cert)
        port, hello = self.check_bootstrap_port(server)
        # Its CA bundle's size before anything else, the password above all (rev57d M1: a
        # bundle refused after the exchange lost the PC the certificate in place, superseded).
        # Counted, not parsed: a hello altered on the way is the exchange's to find (its
        # transcript), and said so.
        _bundle_size(hello.ca_bundle_pem.count(b"-----BEGIN CERTIFICATE-----"))
        where = _netloc(server.host, port)
        # A wrong CA is reported as such, before the password is asked for.
        pinned = self._pinned(hello.ca_bundle_pem) if self.pin is not None else None
        if pinned is not None:
            self.check_bootstrap_cert(where, hello, pinned)
        self.choose_proof(hello.ca_bundle_pem)
        self.check_settings_dir()
        secret = None
        if o.enrol:
            secret = o.password if o.password is not None else self.ui.ask_password()
            if not secret:
                raise ClientError(Exit.USAGE, "no password given")
            # The file's rule for a typed or pasted one too: sent, it would count as a wrong
            # guess, and no password may be so (audit s39ws M4).
            if (why := password_problem(secret)) is not None:
                raise ClientError(Exit.USAGE, f"the password entered {why}; nothing was sent")
            # A generated password typed in capitals, or with spaces or nothing between its
            # groups, in its form (review s69 revpass L2); `password set` takes none of that
            # shape in another form, so this never makes a right password wrong.
            secret = folded(secret)
            if o.password is None:  # typed: the node may have switched meanwhile
                hello = self.hello_again(server.host, port, hello)
        node, node_url = hello.node, hello.server_url
        cert = key = None
        kept: Path | None = None  # where the new pair is kept aside (``keep_new_pair``)
        # The whole bundle: intermediates to build the server's chain with (a practice's own
        # certificates, ``--cert-dir``, may come through one), and the CA of the client
        # certificate (the cluster's, which may not be the one pinned).
        if secret is not None:
            key = pki.generate_key()
            try:  # (Ctrl-C held back from the finishing request on: ``HeldInterrupt``)
                payload = self.exchange(server.host, port, hello, secret, key)
                node, node_url = payload.node, payload.server_url
                bundle = self._cas(payload.ca_bundle_pem)  # sealed: confirmed by the password
                if pinned is not None:
                    trusted = self._pinned(payload.ca_bundle_pem)
                    how = f"pinned {self.pin} (and the password exchange confirmed)"
                else:
                    trusted = bundle
                    how = "verified with the password (key exchange confirmed both ways)"
                cert = self._client_cert(payload, key, bundle, where)
                self.new_cert_pem = pki.cert_to_pem(cert)
                kept = self.keep_new_pair(cert, key)
            except BaseException as exc:
                self.held.release(act=False)
                if isinstance(exc, ClientError) and self.answered:
                    # An answer refused as not the cluster node's (or not for this key and
                    # name): nothing is held for this PC (nothing was kept or written).
                    self._unmark_pending()
                raise
            self.held.release()  # a Ctrl-C that came meanwhile: now (the pair is kept)
        else:
            assert pinned is not None  # without a password there is always a pin
            trusted, how = pinned, f"pinned {self.pin}"
            bundle = self._cas(hello.ca_bundle_pem)  # parsed already: ``pinned`` is of it
        self.ui.say(f"ca        {how}")
        try:
            ca = self.check_chain(server, server_cert, trusted, bundle)
        except ClientError as exc:
            raise self._said_kept(exc, kept) from None
        if self.pin is None and cert is not None:
            self.say_pin_to_compare(server_cert, cert, bundle)
        if node_url != server.url:
            self.ui.say(f"note      the node gives its address as {one_line(node_url)}")
        trusted_pem = b"".join(pki.cert_to_pem(c) for c in trusted)
        client_pem = key_pem = None
        if cert is not None and key is not None:
            client_pem, key_pem = pki.cert_to_pem(cert), pki.key_to_pem(key)
            self.ui.say(
                f"enrol     client certificate {pki.names_of(cert).common_name} "
                f"({pki.fingerprint(cert)}), valid until {cert.not_valid_after_utc:%Y-%m-%d}"
            )
        result = Result(
            server=server,
            bootstrap_port=port,
            node=one_line(node, 63),
            ca_pin=pki.spki_pin(ca),
            server_fingerprint=pki.fingerprint(server_cert),
            client_fingerprint=None if cert is None else pki.fingerprint(cert),
            settings_dir=o.settings_dir,
        )

        def check(staged: Path) -> None:
            self.check_settings(server, result, staged)

        try:
            self.write_settings(
                result, trusted_pem, client_pem, key_pem, check=check, bundle=bundle
            )
        except CheckFailed as exc:
            # (Not when the writing failed: a full disk fails the keeping too, and a set
            # committed before it failed is completed by the next run.)
            if client_pem is None or key_pem is None:
                raise
            error = self.after_failed_check(
                exc, result, trusted_pem, client_pem, key_pem, bundle, check
            )
            if error is not None:
                raise error from None
        except ClientError as exc:  # not written (a full disk): the new pair may be kept
            raise self._said_kept(exc, kept) from None
        return result

    def _said_kept(self, error: ClientError, kept: Path | None) -> ClientError:
        """``error``, raised after the exchange and before a set was written, saying where the
        new pair is kept (``kept``, from ``keep_new_pair``) and what the next run does with it
        (s43rev3 Low 3: a server certificate not from the cluster CA kept it unsaid); as it was
        if the pair could not be kept (said then already)."""
        if kept is None or isinstance(error, NotFinished):
            return error
        if isinstance(error, NotReplaced):
            self.ui.say(
                f"note      the new certificate for this PC ({self.workstation}) is kept in "
                f"{kept}: the next run proves this PC's name with it (no --replace needed)"
            )
            return error
        return ClientError(
            error.code,
            f"{error.message}; the new certificate the node handed over for this PC "
            f"({self.workstation}) is kept in {kept}: the next run, with the password, proves "
            "this PC's name with it at a node whose CA signed it (no --replace needed)",
        )

    def keep_new_pair(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path | None:
        """Keep the new key and certificate aside (``settings_files.KEPT``) as soon as the
        exchange returns them, before anything else is checked or asked: the leader has signed
        the certificate and revoked every other of this name, so a run cut short after this
        (Ctrl-C or a kill during a check that hangs) must still leave it for the next run to
        prove the PC's name with (audit s43rev1 M1: it was kept only once the final check and
        the probe of the set before had failed). A set with a client certificate written in
        place later removes it (``settings_files.replace``). Where it cannot be kept (a full
        disk), that is said, and the run goes on: the set is written, or the keeping tried
        again, when the final check fails. Returns where it is kept, None if it is not."""
        d = self.o.settings_dir
        try:
            make_private_dir(d, parents_mode=0o700)
            self.kept_at = settings_files.keep(d, pki.key_to_pem(key), pki.cert_to_pem(cert))
        except OSError as exc:
            self.ui.say(
                f"note      the new certificate could not be kept aside in {d} yet "
                f"({exc.strerror or exc})"
            )
            return None
        self._drop_pending()  # (the name is this PC's now: it holds the pair)
        return self.kept_at

    def say_pin_to_compare(
        self, server_cert: x509.Certificate, cert: x509.Certificate, bundle: list[x509.Certificate]
    ) -> None:
        """The password proves only a node that knows it, and every workstation does: the
        pin of the CA the server's certificate comes from is what tells the cluster's server
        from someone else, for the admin to compare with the notice, which gives that CA's pin
        for the server (audit s39ws L2; the --ca-pin path compares it itself): the cluster CA,
        or a practice's own CA for a certificate from ``--cert-dir`` (since session 57; before,
        the notice gave the cluster CA's, which does not check such a server, and this line
        said the client certificate's issuer, which someone in between who knows the password
        gets signed by the real cluster: rev57a M3). Every CA the server's certificate chains
        up to is said (``pki.cas_above``: an intermediate and its root, a cross-signed CA's
        roots): the notice's is one of them. Where the server's certificate is not from the CA
        that signed this PC's certificate, what that may mean is said, and no more (this PC
        cannot tell a practice's own CA from someone else's)."""
        # Each pin once (a cross-signed CA's twins share theirs), nearest first; no name
        # beside them: the node gives the names, and one could read like the notice's pin
        # (rev57c M1, L3).
        pins = list(dict.fromkeys(pki.spki_pin(c) for c in pki.cas_above(server_cert, bundle)))
        if not pins:  # (check_chain found a path through the bundle: not reached)
            return
        pins = pins[:_PINS_SHOWN]
        which = pins[0] if len(pins) == 1 else "one of " + ", ".join(pins)
        self.ui.say(
            f"pin       compare {which} with the CA pin in your notice: if none matches, this "
            "is not your cluster's server (whoever knows the password could pose as it); then "
            "run again with --ca-pin and the notice's pin"
        )
        cluster = next((c for c in bundle if pki.issued_by(cert, c)), None)
        if cluster is not None and pki.spki_pin(cluster) not in pins:
            self.ui.say(
                "note      the server's certificate is not from the CA that signed this PC's "
                "certificate: right only if your practice gave its servers their own "
                "certificates (--cert-dir) and your notice gives that CA's pin; if not, this is "
                "not your server: stop"
            )

    def say_not_files(self) -> None:
        """A note line for each of the set's files in place that is not a regular file (a
        FIFO, a device, a directory, or a link to one): it is never opened (s47ws: a FIFO
        there hung the run for ever, unsaid). One that is no directory counts as missing; a
        directory is said as one, no more (s47rev3 L5: "a FIFO?, taken as missing", then an
        error that it could not be read)."""
        d = self.o.settings_dir
        for name in settings_files.NAMES:
            try:
                mode = os.stat(d / name).st_mode  # (a FIFO is not opened by it)
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                self.ui.say(f"note      {d / name} is a directory, not a regular file: not read")
            elif not stat.S_ISREG(mode):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
                self.ui.say(f"note      {d / name} is {kind}: not read, taken as missing")

    def choose_name(self) -> None:
        """The name to go by until the node's hello is read (``choose_proof`` decides then):
        --name, else the newest client certificate's in the settings dir, else the host
        name's first label. A host name that names no PC in particular ("localhost") is
        refused here, before anything is sent, when nothing else could name the PC (no
        --name, no client certificate in the settings dir)."""
        newest = _newest(self._enrolments())
        if self.o.name is None and newest is not None:
            self.workstation = pki.names_of(newest[0]).common_name
        if self.o.name is None and newest is None:
            self._refuse_no_name()

    def _refuse_no_name(self) -> None:
        if self.workstation in _NO_NAMES and self.o.enrol:
            raise ClientError(
                Exit.USAGE,
                f"this PC's host name ({one_line(self.host, 63)!r}) names no PC in particular: "
                "give it a name with --name, e.g. --name empfang-1",
            )

    def choose_proof(self, bundle_pem: bytes) -> None:
        """The name to enrol under and this PC's proof of it, once the node's hello (its CAs,
        ``bundle_pem``) is read. The name: --name, else the name of the newest client
        certificate in the settings dir from a CA the hello names (a PC keeps its name when
        its host name changes, or when it was given one with --name), else the name of the
        pair in place (client.pem) with no proof, else the host name's first label. The proof
        (``bootstrap_csr.Reenrolment``): of that name's pairs, the newest from a CA the hello
        names, else the newest. A pair kept aside of another CA (a fake node that knew the
        password handed it over, an older tlsroll kept it aside: s44rev1 M1) neither names
        this PC nor stands for its proof: the leader would refuse the name as another PC's.
        The pair in place of a CA the hello no longer names (CA1 dropped while this PC was
        off) still names it, as it did before s44wsfix, but proves nothing: the leader
        refuses the name held, loudly (exit 11, --replace), where the host name would have
        enrolled the PC quietly as a new one (review s44rev5 M1). The name in client.pem is
        the one this PC asked for (``_client_cert`` refuses a certificate of another)."""
        try:
            cas = proto.ca_certificates(bundle_pem)
        except proto.BootstrapError:
            cas = []  # (said when the bundle is used)
        pairs = self._enrolments()

        def by_node(pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> bool:
            return any(pki.issued_by(pair[0], ca) for ca in cas)

        if self.o.name is None:
            named = _newest([pair for pair in pairs if by_node(pair)])
            if named is not None:
                self.workstation = pki.names_of(named[0]).common_name
            elif (in_place := self._in_place()) is not None:
                self.workstation = pki.names_of(in_place[0]).common_name
                self.previous = None  # of a CA the node does not name: it proves nothing
                self.unproven = in_place[0]  # (said if the leader refuses the name: exchange)
                return
            else:
                self.workstation = proto.workstation_cn(self.host)
                self._refuse_no_name()
        ours = [pair for pair in pairs if pki.names_of(pair[0]).common_name == self.workstation]
        self.previous = _newest([pair for pair in ours if by_node(pair)]) or _newest(ours)

    def _enrolments(self) -> list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]:
        """The valid pairs of client key and certificate in the settings dir: kept aside
        (``settings_files.KEPT``: an enrolment whose check failed, or one --no-enrol took out
        of use) and in place. One that cannot be read or does not hold together counts as none."""
        d = self.o.settings_dir
        pairs: list[tuple[bytes, bytes]] = []
        if (kept := settings_files.kept_pair(d)) is not None:
            pairs.append(kept)
        if (pair := _pair_in_place(d)) is not None:
            pairs.append(pair)
        return _valid_pairs(pairs)

    def _in_place(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
        """The valid pair of client key and certificate in place in the settings dir (not
        one kept aside), if any (``_enrolments``)."""
        pair = _pair_in_place(self.o.settings_dir)
        return None if pair is None else _newest(_valid_pairs([pair]))

    def after_failed_check(
        self,
        failed: CheckFailed,
        result: Result,
        ca_pem: bytes,
        client_pem: bytes,
        key_pem: bytes,
        bundle: Sequence[x509.Certificate],
        check: Callable[[Path], None],
    ) -> ClientError | None:
        """The check of a new enrolment's settings failed, after the leader signed the new
        certificate and revoked every other one of that name (s39wsfix: the PC was left with
        none that works). Never leave it so; one rule (audit s43rev1 M2: an expired
        certificate in place, or another CA's, was kept untried and the new one set aside):

        - the set in place has no client certificate: it stays (the signing did not touch
          it), the new pair kept aside (``keep_enrolment``; it is already, ``keep_new_pair``);
        - it has one: a request with it is tried. It stays only if that succeeds; then the
          new set is checked once more (the cause was likely passing) and goes in place if it
          passes now, else the new pair stays aside and the error says until when the set in
          place works (its certificate revoked, which the managed server does not learn: until
          it expires). If that request fails too, the new set goes in place all the
          same, unchecked: the only one the leader holds valid (what failed is said, and what
          to do).

        Returns the error to raise (exit 1: the new settings did not check out), None if the
        new set passed its second check and is in place."""
        d = self.o.settings_dir
        if not os.path.lexists(d / "client.pem"):
            return self.keep_enrolment(failed, client_pem, key_pem)
        revoked = self._in_place_superseded(bundle)
        self.ui.say(
            "check     the new settings failed their check: a request with the settings in "
            f"place, to tell whether they still work (up to {self.o.timeout:g} s)"
        )
        if (old_problem := self._set_in_place_problem()) is None:
            self.ui.say(
                "check     the settings in place still work: the new ones checked once more"
            )
            try:
                self.write_settings(result, ca_pem, client_pem, key_pem, check=check, bundle=bundle)
            except CheckFailed as again:
                return self.keep_enrolment(
                    again, client_pem, key_pem, still_works=True, revoked=revoked
                )
            except ClientError:  # (a full disk: the keeping then fails too, and says why)
                return self.keep_enrolment(
                    failed, client_pem, key_pem, still_works=True, revoked=revoked
                )
            return None
        try:
            self.write_settings(result, ca_pem, client_pem, key_pem, bundle=bundle)
        except KeyAloneHeld as held:  # (s47rev3 L2: it was swallowed, the folder unnamed)
            self.ui.say(f"note      the new settings are not in place either: {held.message}")
            return self.keep_enrolment(failed, client_pem, key_pem)
        except ClientError:
            return self.keep_enrolment(failed, client_pem, key_pem)
        before = (
            "the leader revoked the certificate of the settings before when it signed the new "
            f"one, and a request with those fails too ({old_problem})"
            if revoked
            else f"a request with the settings before fails too ({old_problem})"
        )
        return ClientError(
            failed.code,
            f"a request with the new settings failed: {failed.problem}; they are in place all "
            f"the same: {before}; fix the cause (is the server at {result.server.url} "
            "running?), then run this again (it enrols again with the password) and restart "
            "the client",
        )

    def _in_place_superseded(self, bundle: Sequence[x509.Certificate]) -> bool:
        """Whether the leader has revoked the client certificate of the set in place, in
        signing this run's (or before): it revokes every other of the name, so one of this
        name, from a CA of the cluster's bundle and not expired. False if the set in place has
        none of that kind (or none that can be read): the signing did not touch it (whether
        it stays is up to a request with it all the same, ``after_failed_check``)."""
        d = self.o.settings_dir
        try:
            cert = pki.load_cert_pem(settings_files.read_file(d / "client.pem"))
            _check_not_ended(cert)
            if pki.names_of(cert).common_name != self.workstation:
                return False
        except (OSError, PKIError, ValueError, TypeError, x509.DuplicateExtension):
            return False
        return any(pki.issued_by(cert, ca) for ca in bundle)

    def _in_place_expiry(self) -> str:
        """`` (on YYYY-MM-DD)``: when the client certificate of the set in place expires; ""
        if it cannot be read."""
        try:
            cert = pki.load_cert_pem(settings_files.read_file(self.o.settings_dir / "client.pem"))
        except (OSError, PKIError, ValueError, TypeError):
            return ""
        return f" (on {cert.not_valid_after_utc:%Y-%m-%d})"

    def _set_in_place_problem(self) -> str | None:
        """Why a request with the set in place (its own address, CA, client key and
        certificate) fails; None if it succeeds. Its files are read as the practice software
        reads them, a link followed (s46rev2 M2: a client.pem link counted as a set that
        fails), but one that is not a regular file (a FIFO) is never opened (s47ws: the run
        waited on it for ever): such a set cannot be read whole."""
        d = self.o.settings_dir
        try:
            settings = json.loads(settings_files.read_file(d / "settings.json"))
            server = check_url(str(settings["server_url"]))
            context = _set_context(d)
        except (OSError, ValueError, TypeError, KeyError, PKIError, ssl.SSLError):
            return "they cannot be read whole"
        except click.ClickException:
            return "their server address is not one"
        try:
            reply = request(
                server.host,
                server.port,
                "GET",
                server.app_path,
                context,
                timeout=self.o.timeout,
                probe=True,
            )
        except NetError as exc:
            return exc.detail
        return None if reply.status == 200 else f"{server.url} answered HTTP {reply.status}"

    def keep_enrolment(
        self,
        failed: CheckFailed,
        client_pem: bytes,
        key_pem: bytes,
        *,
        still_works: bool = False,
        revoked: bool = False,
    ) -> ClientError:
        """The check of a new enrolment's settings failed: nothing was written, but the leader
        has signed the new certificate, and superseded the one of that name it signed before
        (this PC's earlier one, if it had one). The new key and certificate are kept
        (``settings_files.KEPT``; ``keep_new_pair`` did already, this makes sure) so that the
        next run proves with them that it is this PC: it never needs --replace for it, and
        nothing it held is lost for good. ``still_works``: a request with the set in place
        still succeeds; ``revoked``: its certificate is one the leader revoked, which a
        managed server does not learn (it reads no revocation list): it works until it
        expires (said, with the date). Returns the error to raise, which says so."""
        d = self.o.settings_dir
        superseded = self.previous is not None or revoked
        urgent = still_works and revoked
        what = f"a request with the new settings failed: {failed.problem}; " + (
            "the settings before are kept (a request with them still succeeds), but the leader "
            "revoked their certificate when it signed the new one; a managed server reads no "
            "revocation list, so they keep working with it until that certificate expires"
            f"{self._in_place_expiry()}"
            if urgent
            else "the settings before are kept (a request with them still succeeds)"
            + (
                ", but the leader superseded this PC's earlier certificate when it signed the "
                "new one"
                if superseded
                else ""
            )
            if still_works
            else "the settings before are kept, but the leader superseded this PC's earlier "
            "certificate when it signed the new one"
            if superseded
            else "the settings before are kept"
        )
        again = "run this again soon" if urgent else "run this again"
        try:
            kept = settings_files.keep(d, key_pem, client_pem)
        except OSError as exc:
            why = exc.strerror or exc
            return ClientError(
                failed.code,
                f"{what}; the new certificate could not be kept either ({why}): fix the cause "
                f"and {again} (it enrols again with the password"
                f"{', with --replace' if superseded else ''})",
            )
        return ClientError(
            failed.code,
            f"{what}; this PC's new certificate ({self.workstation}) is kept in {kept}: fix the "
            f"cause and {again} (it enrols again with the password, as this PC: no --replace "
            "needed)",
        )

    def _answers_https(self, server: ServerURL) -> bool:
        """True if ``server`` answers https: a TLS handshake, and no request after it (never
        counted as a client, in any access log: a run that set up nothing moves no PC)."""
        try:
            handshake(server.host, server.port, self.context, timeout=self.o.timeout)
        except NetError:
            return False
        return True

    # (b)
    def check_server(self, server: ServerURL) -> x509.Certificate:
        o = self.o
        try:
            reply = request(
                server.host,
                server.port,
                "GET",
                server.app_path,
                self.context,
                timeout=o.timeout,
                probe=True,
            )
        except NetError as exc:
            if exc.kind == "refused":
                old = f"http://{_netloc(server.host, HTTP_PORT)}{server.app_path}"
                if answers_plain_http(server.host, HTTP_PORT, server.app_path, o.timeout):
                    raise ClientError(
                        Exit.OLD_HTTP,
                        f"{server.netloc} refuses https, but the unencrypted address {old} "
                        "answers: this node is still on http (not switched yet, or switched "
                        "back)",
                    ) from None
                raise ClientError(
                    Exit.REFUSED,
                    f"{server.netloc} refuses connections: wrong port, or the server is not "
                    f"running (the usual https port is {HTTPS_PORT})",
                ) from None
            if exc.kind == "unreachable":
                raise ClientError(
                    Exit.UNREACHABLE,
                    f"cannot reach {server.host}: {exc.detail}; check the address and the network",
                ) from None
            if exc.kind == "timeout":
                # (Review s63 L1: it was "no answer without a client certificate ... closed the
                # connection (TimeoutError)", and the run went on to the password.)
                raise ClientError(
                    Exit.UNREACHABLE,
                    f"{server.netloc} took the connection, but gave {exc.detail}: the server "
                    "may be hung or overloaded; check it, or run this again with a longer "
                    "--timeout; nothing was sent",
                ) from None
            if (
                exc.kind == "tls"
                and exc.reason in _NOT_TLS
                and answers_plain_http(server.host, server.port, server.app_path, o.timeout)
            ):
                raise ClientError(
                    Exit.OLD_HTTP,
                    f"{server.netloc} answers unencrypted http, not https: not the encrypted "
                    "address (see your notice), or the node is not switched yet, or switched "
                    "back",
                ) from None
            if exc.kind == "dropped" and exc.peer_der is not None:
                return self._server_cert_without_answer(server, exc)
            raise ClientError(
                Exit.TLS,
                f"TLS with {server.netloc} failed: {exc.detail}; is this the server's https port?",
            ) from None
        cert = self._peer_cert(reply, server)
        self.ui.say(f"tls       ok, certificate {pki.fingerprint(cert)} (checked below)")
        if reply.status in (401, 403):
            self.ui.say(f"app       {server.app_path} answers (HTTP {reply.status}: login needed)")
        elif reply.status != 200:
            raise ClientError(
                Exit.APP,
                f"{server.netloc} has no app at {server.app_path} (HTTP {reply.status}): "
                "check the app path",
            )
        else:
            self.ui.say(f"app       {server.app_path} answers (HTTP 200)")
        return cert

    @staticmethod
    def check_dates(server: ServerURL, cert: x509.Certificate) -> None:
        """The server's certificate within its dates by this PC's clock, before the password
        is asked or anything sent (review s67 wsrev M1: found only after the exchange, the
        password spent and a new certificate signed, said as "valid DATE to DATE", exit 10,
        with no word of the PC's clock, which on switch day is the likely cause): ClientError
        (exit 6) naming the PC's time. Its trust is checked later (``check_chain``)."""
        now = pki.utcnow()
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        clock = f"this PC's clock reads {now:%Y-%m-%d %H:%M} UTC"
        if now < start:
            raise ClientError(
                Exit.TLS,
                f"{server.netloc}'s certificate is valid only from {start:%Y-%m-%d %H:%M} UTC, "
                f"and {clock}: set this PC's date and time right (automatic time), then run "
                "this again; nothing was sent",
            )
        if now > end:
            raise ClientError(
                Exit.TLS,
                f"{server.netloc}'s certificate ended on {end:%Y-%m-%d %H:%M} UTC, and {clock}: "
                "if this PC's date and time are wrong, set them right and run this again; if "
                "not, the server needs a new certificate (on the leader: tlsroll rollout start "
                "--change rotate-cert); nothing was sent",
            )

    def _server_cert_without_answer(self, server: ServerURL, exc: NetError) -> x509.Certificate:
        # The handshake succeeded, then the server closed or alerted without an http answer:
        # what a server that requires a client certificate does before enrolment. Asked
        # again with this PC's pair, if it has one (``_app_with_pair``); else the app is
        # checked again with the new settings at the end.
        assert exc.peer_der is not None
        cert = x509.load_der_x509_certificate(exc.peer_der)
        self.ui.say(f"tls       ok, certificate {pki.fingerprint(cert)} (checked below)")
        if (asked := self._app_with_pair(server)) is not None:
            reply, where = asked
            if reply.status not in (200, 401, 403):
                raise ClientError(
                    Exit.APP,
                    f"{server.netloc} has no app at {server.app_path} (HTTP {reply.status}, "
                    f"asked with this PC's client certificate in {where}): check the app path; "
                    "nothing was enrolled, the settings are as they were",
                )
            self.ui.say(
                f"app       {server.app_path} answers (HTTP {reply.status}, with this PC's "
                "client certificate)"
            )
            return cert
        self.ui.say(
            f"app       no answer without a client certificate ({exc.detail}); "
            "checked again after enrolment"
        )
        return cert

    def _app_with_pair(self, server: ServerURL) -> tuple[Reply, Path] | None:
        """The app path asked with this PC's client key and certificate, where the server
        answered nothing without one: the pair in place, else the one kept aside
        (``settings_files.KEPT``), if valid. A mistyped app path was found only after the
        enrolment, which had the leader revoke this very pair (review s64); with it, before
        the port or the password. The answer and the dir of the pair; None where there is
        no such pair or the server does not take it either (another CA's, revoked: only the
        enrolment's check tells then, as before).

        The pair is shown only to a server that proves itself with the CA this pair's
        settings trust (its ``ca.pem``), over TLS 1.3, where a client certificate travels
        encrypted: not to whatever the typed address reaches, nor in clear under TLS 1.2
        (review b2 of s64, L1); a server that cannot is None here (the old way)."""
        d = self.o.settings_dir
        kept = d / settings_files.KEPT
        for where, pair in ((d, _pair_in_place(d)), (kept, settings_files.kept_pair(d))):
            if pair is None or not _valid_pairs([pair]):
                continue
            try:
                context = _set_context(where)
            except (OSError, ValueError):  # (ssl.SSLError is an OSError)
                continue
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            try:
                reply = request(
                    server.host,
                    server.port,
                    "GET",
                    server.app_path,
                    context,
                    timeout=self.o.timeout,
                    probe=True,
                )
            except NetError:
                return None
            return reply, where
        return None

    @staticmethod
    def _peer_cert(reply: Reply, server: ServerURL) -> x509.Certificate:
        if reply.peer_der is None:
            raise ClientError(Exit.TLS, f"{server.netloc} presented no certificate")
        return x509.load_der_x509_certificate(reply.peer_der)

    # (c)
    def check_bootstrap_port(self, server: ServerURL) -> tuple[int, proto.Hello]:
        """The bootstrap port, and the node's hello from it: a port that only accepts
        connections may be another program's, found out before the password is asked for
        (audit s39ws M3: then came a TLS "wrong version number")."""
        o = self.o
        if o.bootstrap_port is not None:
            port = o.bootstrap_port
        elif o.assume_yes:
            port = BOOTSTRAP_PORT
        else:
            port = self.ui.ask_port(BOOTSTRAP_PORT)
        hello = self.fetch_hello(server.host, port)
        self.ui.say(f"port      bootstrap port {port} reachable, the bootstrap service answers")
        return port, hello

    @staticmethod
    def _port_closed(host: str, port: int, error: NetError) -> ClientError:
        """The bootstrap port refuses connections or does not answer, where the server's
        port of the same host answered: what to check, not only another port (audit s39ws
        M8: a node's bootstrap service down said only that)."""
        other_port = "the port: the one your notice names (at the port prompt, or --bootstrap-port)"
        if error.kind == "timeout":  # (review s63 M3: it was "TLS ... failed", exit 6)
            return ClientError(
                Exit.BOOTSTRAP_PORT,
                f"bootstrap port {port} on {host} took the connection, but gave {error.detail}: "
                "the node's tlsroll agent may be hung or overloaded, or another program holds "
                "the port; check that the agent is running (systemctl status tlsroll-agent, on "
                f"the node), and {other_port}",
            )
        if error.kind == "refused":
            return ClientError(
                Exit.BOOTSTRAP_PORT,
                f"bootstrap port {port} on {host} is closed (connection refused): no bootstrap "
                "service runs there; check that the node's tlsroll agent is running "
                "(systemctl status tlsroll-agent, on the node), that `tlsroll schema show` on "
                "the leader shows the node online and switched (its bootstrap port: `tlsroll "
                f"schema show --json`, bootstrap_port), and {other_port}",
            )
        return ClientError(
            Exit.BOOTSTRAP_PORT,
            f"bootstrap port {port} on {host} does not answer ({error.detail}), though the "
            "server's port does: a firewall (on the node or on the way) may block it; check "
            f"that port {port} is open to this PC, that the node's tlsroll agent is running, "
            f"and {other_port}",
        )

    # (d)
    def _call(
        self,
        host: str,
        port: int,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        sending: Callable[[], None] | None = None,
    ) -> Reply:
        """One request to the bootstrap port over unverified TLS (the PAKE authenticates),
        waiting ``timeout`` (default: ``--timeout``) for the answer; connecting, ``--timeout``
        whatever ``timeout`` (s44rev1 L6: a node that stopped answering cost the exchange's
        longer wait on each call). ``sending``: as ``request``'s."""
        where = _netloc(host, port)
        data = None if body is None else json.dumps(body).encode()
        wait = self.o.timeout if timeout is None else timeout
        went = False  # ``request`` began to send it (its handshake made): ``ClientError.sent``

        def going() -> None:
            nonlocal went
            went = True
            if sending is not None:
                sending()

        try:
            return request(
                host,
                port,
                method,
                path,
                self.exchange_context or self.context,
                body=data,
                timeout=wait,
                connect_timeout=self.o.timeout,
                sending=going,
            )
        except NetError as exc:
            # ``sent``: the request went (the answer did not come whole): the node may have
            # acted on it. A refused, unreachable or failed handshake sent nothing.
            if exc.kind == "verify" and self.exchange_context is not None:  # (the pin's)
                raise ClientError(
                    Exit.UNTRUSTED,
                    f"the bootstrap port {where} presented a certificate that does not verify "
                    f"with the pinned CA ({self.pin}): {exc.detail}; someone may be in "
                    "between; do not continue (nothing was sent)",
                ) from None
            if exc.kind == "timeout":
                # The hello answered on this port a moment ago: not the port's advice
                # (``_port_closed``), the node's (review of s63-w1 L2).
                raise ClientError(
                    Exit.BOOTSTRAP_PORT,
                    f"the bootstrap service at {where} took the request, but gave "
                    f"{exc.detail}: the node may be overloaded; try again",
                    sent=went,
                ) from None
            if exc.kind in ("refused", "unreachable"):
                raise self._port_closed(host, port, exc) from None
            if exc.kind == "dropped" and exc.detail != _TOO_LARGE:
                # Ended after its handshake with no answer (closed, or reset): what the node's
                # agent stopping or restarting does, as for the hello (``fetch_hello``), the
                # hello having been answered on this port a moment ago; passing: exit 8, try
                # again (review s64: it was "TLS ... failed", exit 6).
                raise ClientError(
                    Exit.BOOTSTRAP_PORT,
                    f"the bootstrap service at {where} ended the connection with no answer "
                    f"({exc.detail}): the node's tlsroll agent may be restarting; try again in "
                    "a minute (if it goes on, check that the agent is running: systemctl "
                    "status tlsroll-agent, on the node)",
                    sent=went,
                ) from None
            raise ClientError(
                Exit.TLS,
                f"TLS with the bootstrap port {where} failed: {exc.detail}",
                sent=went,
            ) from None

    def fetch_hello(self, host: str, port: int) -> proto.Hello:
        """The node's public hello: its name, the password's salt and parameters, its CA.

        A connection ended after its TLS handshake with no answer (closed, or reset: this
        client cannot tell the two apart, ssl reads both as the end) is asked once more after
        ``ENDED_PAUSE`` (review s64: a reset was "not as the bootstrap service", another
        program): a node's agent that stops or restarts ends the connections it holds, and
        then refuses connections for a while (try again) or answers; a port that wants a
        client certificate (the managed server's, tlsroll's gRPC ports) ends every one so,
        and is another program's."""
        try:
            reply = self._get_hello(host, port)
        except NetError as exc:
            if exc.kind != "dropped" or exc.detail == _TOO_LARGE:
                raise self._hello_failed(host, port, exc) from None
            time.sleep(ENDED_PAUSE)
            try:
                reply = self._get_hello(host, port)
            except NetError as again:
                if again.kind in ("refused", "unreachable", "timeout"):
                    raise self._ended(host, port, again.detail) from None
                raise self._hello_failed(host, port, again) from None
            self.ui.say(
                f"note      bootstrap port {port} ended the first connection with no answer "
                "(its agent restarting?); the next one was answered"
            )
        if reply.status == 404:
            raise self._too_old(host, port)
        if reply.status != 200:
            raise self._not_bootstrap(host, port, f"HTTP {reply.status}")
        self.hello_peer = reply.peer_der
        try:
            return proto.parse_hello(reply.body)
        except proto.BootstrapError as exc:
            if exc.reason is proto.BootstrapReason.VERSION or _versioned(reply.body):
                raise ClientError(Exit.FAILURE, f"{_netloc(host, port)}: {exc}") from None
            raise self._not_bootstrap(host, port, "no bootstrap hello") from None

    def hello_again(self, host: str, port: int, hello: proto.Hello) -> proto.Hello:
        """The node's hello asked again once the password was typed (review s69 revpass3 L2):
        the first one came before the prompt, and a node whose change-password switch came
        while it was typed serves the new password's salt since; the exchange made with the
        old one failed as a wrong password (counted toward the node's limits) for the new
        password typed right. Only the password's parameters may differ: another node name,
        address, CA bundle or bootstrap certificate is refused, nothing sent."""
        peer = self.hello_peer
        fresh = self.fetch_hello(host, port)
        if (fresh.node, fresh.server_url, fresh.ca_bundle_pem, self.hello_peer) != (
            hello.node,
            hello.server_url,
            hello.ca_bundle_pem,
            peer,
        ):
            raise ClientError(
                Exit.FAILURE,
                f"{_netloc(host, port)}: the bootstrap service answered otherwise while the "
                "password was typed (another node name, address, CA or certificate): run this "
                "again; nothing was sent",
            )
        if fresh.kdf != hello.kdf:
            self.ui.say(
                "note      the node's password changed while it was typed (its server "
                "restarted with a new one): the exchange is made with the new one's parameters"
            )
        return fresh

    def _get_hello(self, host: str, port: int) -> Reply:
        return request(host, port, "GET", proto.HELLO_PATH, self.context, timeout=self.o.timeout)

    def _hello_failed(self, host: str, port: int, exc: NetError) -> ClientError:
        """The error for the hello's request that failed so (``fetch_hello``)."""
        if exc.kind in ("refused", "unreachable", "timeout"):
            return self._port_closed(host, port, exc)
        if exc.kind == "tls" and exc.reason in _NOT_TLS:
            return self._not_bootstrap(host, port, "not TLS")
        if exc.kind == "dropped":
            # A TLS service that closed the connection (or alerted) after a completed
            # handshake, with no http answer, twice (``fetch_hello``): one that wants a
            # client certificate, as the managed server's own port may, or tlsroll's gRPC
            # ports 9440-9442; the bootstrap service wants none (review s63 M2: "TLS ...
            # failed", exit 6).
            what = (
                "an answer too large"
                if exc.detail == _TOO_LARGE
                else "it closed the connection without an http answer"
            )
            return self._not_bootstrap(host, port, what)
        return ClientError(
            Exit.TLS, f"TLS with the bootstrap port {_netloc(host, port)} failed: {exc.detail}"
        )

    @staticmethod
    def _ended(host: str, port: int, then: str) -> ClientError:
        """The bootstrap port took the hello's connection and its TLS handshake, then ended
        it with no answer, and the next connection failed ``then`` (``fetch_hello``): what
        the node's agent does as it stops or restarts, and passing: try again (review s64:
        it was "not as the bootstrap service", another program; exit 8 all the same, the
        port's code, as for an answer that does not come in time)."""
        return ClientError(
            Exit.BOOTSTRAP_PORT,
            f"bootstrap port {port} on {host} took the connection, then ended it before any "
            f"answer, and the next one failed ({then}): the node's tlsroll agent may be "
            "restarting; try again in a minute (if it goes on, check that the agent is "
            "running: systemctl status tlsroll-agent, on the node)",
        )

    @staticmethod
    def _not_bootstrap(host: str, port: int, detail: str) -> ClientError:
        return ClientError(
            Exit.BOOTSTRAP_PORT,
            f"port {port} on {host} answers, but not as the bootstrap service ({detail}; another "
            "program?); enter the port from your notice (at the port prompt, or --bootstrap-port)",
        )

    def _too_old(self, host: str, port: int) -> ClientError:
        """No /v2 there: an agent that speaks only protocol 1 (never used: it would let a fake
        node test passwords offline), or not a tlsroll bootstrap port at all."""
        where = _netloc(host, port)
        reply = self._call(host, port, "GET", proto.V1_BOOTSTRAP_PATH)
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            data = proto.loads_strict(reply.body)
            if reply.status == 200 and isinstance(data, dict) and data.get("version") == 1:
                return ClientError(
                    Exit.FAILURE,
                    f"the node at {where} is too old: its tlsroll agent speaks bootstrap protocol "
                    "1, which this client does not use; upgrade the agent (tlsroll) on the node",
                )
        return self._not_bootstrap(host, port, "HTTP 404")

    def _pinned(self, bundle_pem: bytes) -> list[x509.Certificate]:
        certs = self._cas(bundle_pem)
        pinned = [c for c in certs if pki.spki_pin(c) == self.pin]
        if not pinned:
            raise ClientError(
                Exit.UNTRUSTED,
                f"the CA the server offers does not match the pin {self.pin}: this is not your "
                "cluster's CA (or the pin is mistyped); do not continue",
            )
        return pinned

    def check_bootstrap_cert(
        self, where: str, hello: proto.Hello, pinned: list[x509.Certificate]
    ) -> None:
        """With the pin, before the password is asked for: the bootstrap port's certificate
        must be of the pinned CA (the node's service shows its server's certificate, which
        the end of the run checks so too: ``check_chain``). One that is not is no node of the
        cluster, and the exchange's confirmation would tell it whether the one password it
        bet on was right (a fake node's one guess a tricked run, which the pin can spare).
        The exchange's requests then verify it in their handshakes (chain and address,
        ``exchange_context``): a man in the middle cannot let the hello through to the node
        and take the exchange itself."""
        cert = None
        with contextlib.suppress(ValueError):
            cert = x509.load_der_x509_certificate(self.hello_peer or b"")
        if cert is None or pki.chain_to(cert, self._cas(hello.ca_bundle_pem), pinned) is None:
            shown = f" ({pki.fingerprint(cert)})" if cert is not None else ""
            raise ClientError(
                Exit.UNTRUSTED,
                f"the certificate the bootstrap port {where} presented{shown} is not from the "
                f"pinned CA ({self.pin}): this is not your cluster's node, or someone is in "
                "between; do not continue (nothing was sent)",
            )
        self.exchange_context = client_context(b"".join(pki.cert_to_pem(c) for c in pinned))

    @staticmethod
    def _cas(bundle_pem: bytes) -> list[x509.Certificate]:
        try:
            cas = proto.ca_certificates(bundle_pem)
        except proto.BootstrapError as exc:
            raise ClientError(Exit.FAILURE, f"bootstrap answer: {exc}") from None
        _bundle_size(len(cas))  # each path through them costs checks (rev57c L2)
        return cas

    def check_chain(
        self,
        server: ServerURL,
        cert: x509.Certificate,
        trusted: list[x509.Certificate],
        bundle: Sequence[x509.Certificate] = (),
    ) -> x509.Certificate:
        """The certificate of (b) must come from a trusted CA (directly, or through an
        intermediate CA of the bundle); then a verified handshake. Returns that CA."""
        path = pki.chain_to(cert, bundle, trusted)
        issuer = path[-1] if path is not None else None
        if issuer is None:
            whose = f"the pinned CA ({self.pin})" if self.pin else "a CA the node handed over"
            since = (
                " (or the practice gave its servers their own certificates, --cert-dir, after "
                "your notice was printed: ask for a new one)"
                if self.pin
                else ""
            )
            raise ClientError(
                Exit.UNTRUSTED,
                f"the certificate {server.netloc} presented ({pki.fingerprint(cert)}) is not "
                f"from {whose}: someone may be in between; do not continue{since}",
            )
        try:
            pki.check_valid_now(cert)
        except PKIError as exc:
            raise ClientError(Exit.UNTRUSTED, f"{server.netloc}'s certificate: {exc}") from None
        context = client_context(b"".join(pki.cert_to_pem(c) for c in trusted))
        try:  # (a handshake alone: what comes after it is the new settings' check to ask)
            handshake(server.host, server.port, context, timeout=self.o.timeout)
        except NetError as exc:
            if exc.kind == "verify":
                raise ClientError(
                    Exit.UNTRUSTED, f"{server.netloc}'s certificate does not verify: {exc.detail}"
                ) from None
            raise ClientError(Exit.TLS, f"TLS with {server.netloc} failed: {exc.detail}") from None
        self.ui.say(
            f"server    certificate from the CA {pki.spki_pin(issuer)}, "
            f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"
        )
        return issuer

    # (e)
    def exchange(
        self, host: str, port: int, hello: proto.Hello, secret: str, key: pki.PrivateKey
    ) -> proto.Payload:
        """The password exchange (SPAKE2, key confirmation both ways); the CSR goes to the node
        and the CA bundle and the client certificate come back, sealed under the key."""
        where = _netloc(host, port)
        cn = self.workstation
        public = key.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        claim = bootstrap_csr.reenrolment_extension(
            public, cn, previous=self.previous, replace=self.o.replace
        )
        csr = pki.make_csr(key, proto.workstation_names(cn), [claim] if claim else [])
        csr_pem = pki.csr_to_pem(csr)
        wait = self.exchange_wait()
        # One confirmation per run, whatever the node answers to it: each one a (fake) node
        # sees tests one password guess. Only an exchange about to expire *before* the
        # confirmation goes out is started again.
        for _attempt in range(START_ATTEMPTS):
            pake = proto.WorkstationPAKE(secret, hello.kdf)
            start_body = proto.StartRequest(cn, pake.msg_a).to_json()
            started = time.monotonic()
            reply = self._call(host, port, "POST", proto.START_PATH, start_body, timeout=wait)
            if reply.status != 200:
                raise self._refused(reply, where)
            try:
                start = proto.parse_start_answer(reply.body)
                shared = pake.finish(start.msg_b)
            except proto.BootstrapError as exc:
                raise ClientError(Exit.FAILURE, f"{where}: {exc}") from None
            keys = proto.SessionKeys.derive(
                shared, proto.transcript(hello, start.exchange, cn, pake.msg_a, start.msg_b)
            )
            finish = proto.FinishRequest(
                exchange=start.exchange,
                confirm=keys.confirmation(proto.Side.WORKSTATION),
                csr=keys.seal(proto.Side.NODE, csr_pem),
            )
            if time.monotonic() - started < start.expires_in - EXPIRY_MARGIN:
                break
        else:
            raise ClientError(Exit.FAILURE, f"{where}: the exchange expired too soon; try again")
        # Held before the note is written: a Ctrl-C between the two left it (and maybe a
        # settings dir made for it) while the run said "nothing was enrolled" (review of
        # s63-w2 L5). ``finish_sent`` once the request goes, not while connecting: a Ctrl-C
        # while connecting cancels at once, nothing sent (``HeldInterrupt.connecting``; review
        # s64: it was held, and the request went), and ``run`` takes the note back.
        self.held.hold()  # until the pair it answers with is kept (``run``)
        self.finishing = True
        self._mark_pending(hello.node)

        def sending() -> None:
            self.held.going()
            self.finish_sent = True

        self.held.connecting()
        try:
            reply = self._call(
                host,
                port,
                "POST",
                proto.FINISH_PATH,
                finish.to_json(),
                timeout=wait,
                sending=sending,
            )
        except ClientError as exc:  # (no answer: it may have been signed all the same)
            if not exc.sent:  # (no connection, or no handshake: nothing was sent)
                self._unmark_pending()
                raise
            raise ClientError(
                exc.code,
                f"{exc.message}; the node may have had a certificate for {cn} signed all the "
                "same: run this again (if the name is refused as taken, it says what to do)",
            ) from None
        self.answered = reply.status == 200  # (a 5xx: it may have signed, and withdrawn or not)
        error, _ = _error_of(reply)
        if 400 <= reply.status < 500:  # refused: the node had nothing signed for this run
            self._unmark_pending()
        if reply.status == 410 and error == proto.ErrorCode.EXCHANGE_EXPIRED:
            raise ClientError(
                Exit.FAILURE,
                f"{where}: the exchange expired before the node took it; try again",
            )
        if reply.status != 200:
            if (held := self._held_by_earlier_run(reply, hello.node)) is not None:
                raise held
            self._say_unproven(reply)
            raise self._refused(reply, where, self._name_hint(reply))
        return self._payload(reply, keys, where)

    def _mark_pending(self, node: str) -> None:
        """``settings_files.PENDING`` written before the finishing request goes out, what it
        said before kept for this run's refusal (``_held_by_earlier_run``). Where it cannot
        be written (a full disk: keeping the pair fails too, and says so), the run goes on."""
        d = self.o.settings_dir
        self.earlier = settings_files.read_pending(d)
        self.made_dirs = []  # (the settings dir and its parents that were not there)
        at = d
        while not os.path.lexists(at) and at != at.parent:
            self.made_dirs.append(at)
            at = at.parent
        self.marked = True  # (taken back where it cannot be written too: dirs made for it)
        try:
            make_private_dir(d, parents_mode=0o700)
            settings_files.mark_pending(d, self.workstation, node)
        except OSError:
            pass

    def _unmark_pending(self) -> None:
        """The node refused this run's request: it had nothing signed for it, and
        ``settings_files.PENDING`` says again what it said before (an earlier run cut short
        still may have left the name held), or goes."""
        d = self.o.settings_dir
        with contextlib.suppress(OSError):
            if self.earlier is None:
                settings_files.drop_pending(d)
            else:
                settings_files.put_pending(d, self.earlier)
            for made in self.made_dirs:  # (made for it, empty again: a refusal writes nothing)
                os.rmdir(made)
        # Only now: a Ctrl-C in the lines above finds the note still marked, and the run's
        # end takes it back again (review b2 of s64, L3: it found it unmarked, left it)
        self.marked = False

    def _drop_pending(self) -> None:
        with contextlib.suppress(OSError):
            settings_files.drop_pending(self.o.settings_dir)

    def _held_by_earlier_run(self, reply: Reply, node: str) -> ClientError | None:
        """For the leader's refusal of the name as taken at this node (409), where an
        earlier run of this PC sent its CSR for that name to this node and was cut short
        before it kept the answer (``settings_files.PENDING``): the node may have had the
        certificate signed, which then holds the name, with nobody holding it. The leader's
        words ("by this PC if its tlsroll is too old ..., else by another PC") are wrong for
        this PC then (s63 M1); the error says what happened and what to do. None otherwise."""
        error, message = _error_of(reply)
        earlier, name = self.earlier, self.workstation
        if (
            reply.status != 409
            or error != proto.ErrorCode.SIGN_FAILED
            or earlier is None
            or earlier.name != name
            or earlier.node != node
            or bootstrap_base.taken_here(name) not in message
        ):
            return None
        return ClientError(
            Exit.ENROL_REFUSED,
            f"workstation name {name} is taken at node {one_line(node, 63)}: an earlier run of "
            f"this PC ({one_line(earlier.at, 30)}) was cut short after the node may have "
            "signed: run again with --replace (it revokes that certificate, which nobody "
            f"holds; unless another PC goes by {name}: then choose another name with --name)",
        )

    def _say_unproven(self, reply: Reply) -> None:
        """For a name the leader refused as held (409) that this PC asked for with no proof,
        its certificate in place being of a CA the node no longer names (``choose_proof``):
        one line of what happened and what to do, before the leader's refusal (s45ws: that
        was the only message, and said nothing of the CA). By the leader's words
        (``leader.store``, ``NameTaken``): "is taken at this node" (--replace takes it), or
        "is taken (at node X)", which --replace does not take (s45rev1 M3: it was offered)."""
        error, message = _error_of(reply)
        if self.unproven is None or reply.status != 409 or error != proto.ErrorCode.SIGN_FAILED:
            return
        name = self.workstation
        taken = f"workstation name {name} is taken"
        elsewhere = re.search(re.escape(taken) + r" \(at node ([^)]+)\)", message)
        if elsewhere is not None:
            self.ui.say(
                f"note      the certificate in place ({name}) is of a CA the node does not name, "
                f"so it cannot prove this PC's name, held at node {one_line(elsewhere[1], 63)}: "
                "run again with --name (--replace cannot take it)"
            )
        elif bootstrap_base.taken_here(name) in message:  # (not too many an hour, say)
            self.ui.say(
                f"note      the certificate in place ({name}) is of a CA the node does not name, "
                f"so it cannot prove this PC's name: run again with --replace if this PC is "
                f"{name}, else with --name"
            )

    def exchange_wait(self) -> float:
        """How long the exchange waits for each answer: ``--timeout``, but never less than
        ``proto.MIN_EXCHANGE_WAIT`` (one note line says so): the node delivers the certificate
        up to ``proto.FINISH_DEADLINE`` after the request, and a client that gave up before
        left the name held until the node withdrew it. Raised rather than refused: the
        timeout is for not waiting long on a host that does not answer, which it still does
        everywhere else, and for connecting in the exchange too (``_call``: the floor is for the
        answer only); a run without an exchange (``--no-enrol``) is not affected."""
        if self.o.timeout >= proto.MIN_EXCHANGE_WAIT:
            return self.o.timeout
        self.ui.say(
            f"note      the password exchange waits {proto.MIN_EXCHANGE_WAIT:g} s for each answer, "
            f"not --timeout {self.o.timeout:g}: the node may take {proto.FINISH_DEADLINE:g} s "
            "to deliver the certificate"
        )
        return proto.MIN_EXCHANGE_WAIT

    def _name_hint(self, reply: Reply) -> str:
        """For a name the leader refused (409): a longer one from this PC's full host name,
        when the name is its host name's first label and the rest could tell it apart."""
        error, message = _error_of(reply)
        if reply.status != 409 or error != proto.ErrorCode.SIGN_FAILED or self.o.name:
            return ""
        if " is taken" not in message:  # (the leader's words for it) not too many an hour, say
            return ""
        if self.workstation != proto.workstation_cn(self.host) or "." not in self.host.strip("."):
            return ""  # the name of an earlier enrolment, or a host name of one label
        labels = [label for label in self.host.lower().split(".") if label][:2]
        longer = proto.workstation_cn("-".join(labels))
        if longer == self.workstation:
            return ""
        return f" (from this PC's full host name, e.g. --name {longer.removeprefix('ws-')})"

    @staticmethod
    def _payload(reply: Reply, keys: proto.SessionKeys, where: str) -> proto.Payload:
        not_node = (
            f"{where} did not prove that it knows the password: this is not your cluster's "
            "node, or its answer was altered on the way; do not continue"
        )
        try:
            answer = proto.parse_finish_answer(reply.body)
        except proto.BootstrapError:
            raise ClientError(Exit.UNTRUSTED, not_node) from None
        if not keys.check_confirmation(proto.Side.NODE, answer.confirm):
            raise ClientError(Exit.UNTRUSTED, not_node)
        try:
            return proto.Payload.from_bytes(keys.open(proto.Side.WORKSTATION, answer.payload))
        except proto.BootstrapError:
            raise ClientError(Exit.UNTRUSTED, not_node) from None

    @staticmethod
    def _refused(reply: Reply, where: str, hint: str = "") -> ClientError:
        error, message = _error_of(reply)
        retry = one_line(reply.headers.get("retry-after", "?"), 10)
        if error == proto.ErrorCode.WRONG_PASSWORD:
            return ClientError(
                Exit.WRONG_PASSWORD,
                f"wrong password: {where} did not accept it (or the exchange was altered on "
                "the way; a changed password takes effect only with the change-password "
                "rollout, which restarts the server); "
                "check the password and try again",
            )
        if error == proto.ErrorCode.RATE_LIMITED:
            return ClientError(
                Exit.ENROL_REFUSED,
                f"{where} refuses passwords for now: too many failed attempts; "
                f"try again in {retry} s",
            )
        if error == proto.ErrorCode.BUSY:
            return ClientError(
                Exit.ENROL_REFUSED,
                f"{where} is busy ({one_line(message, NODE_MESSAGE_CHARS)}); "
                f"try again in {retry} s",
            )
        if reply.status == 429 and error == proto.ErrorCode.SIGN_FAILED:
            # The node's hour's cap of PCs (switch day at a large practice): when, by this
            # PC's clock, is the one thing to know (review s64 M3).
            after = "later"
            # (ASCII digits, at most a day's: "²" is a digit to isdigit, and a huge number
            # overflowed the date; either was "internal error": review b2 of s64, L2)
            if re.fullmatch(r"[0-9]{1,5}", retry) and int(retry) <= 86400:
                at = dt.datetime.now().astimezone() + dt.timedelta(seconds=int(retry) + 59)
                after = f"after {at:%H:%M}"
            return ClientError(
                Exit.ENROL_REFUSED,
                f"{where} has no certificate signed for this PC now "
                f"({one_line(message, NODE_MESSAGE_CHARS)}); try again {after}",
            )
        return ClientError(
            Exit.ENROL_REFUSED,
            f"{where} refused enrolment (HTTP {reply.status} {one_line(error, 40)}): "
            f"{one_line(message, NODE_MESSAGE_CHARS)}{hint}",
        )

    def _client_cert(
        self,
        payload: proto.Payload,
        key: pki.PrivateKey,
        trusted: list[x509.Certificate],
        where: str,
    ) -> x509.Certificate:
        """The client certificate the node handed over: for this key, from a CA of its
        bundle, and of the name asked for (the leader signs exactly the CSR's name: one of
        another name is not the cluster's doing, s44rev1 M1); refused (and not kept) if not."""
        try:
            cert = pki.load_cert_pem(payload.certificate_pem)
        except PKIError:
            raise ClientError(Exit.FAILURE, f"{where} sent no valid certificate") from None
        if not pki.key_matches(cert, key) or not any(pki.issued_by(cert, ca) for ca in trusted):
            raise ClientError(
                Exit.UNTRUSTED, f"{where} sent a certificate not for this key or not from the CA"
            )
        try:
            name = pki.names_of(cert).common_name
        except (PKIError, ValueError, TypeError, x509.DuplicateExtension):
            name = ""
        if name != self.workstation:
            raise ClientError(
                Exit.UNTRUSTED,
                f"{where} sent a certificate for {one_line(name or 'no name', 64)!r}, not for "
                f"{self.workstation}, the name this PC asked for: the cluster's leader signs "
                "the name asked for only; this is not your cluster's node; do not continue "
                "(nothing was kept or written)",
            )
        return cert

    def write_settings(
        self,
        result: Result,
        ca_pem: bytes,
        client_pem: bytes | None,
        key_pem: bytes | None,
        check: Callable[[Path], None] | None = None,
        bundle: Sequence[x509.Certificate] = (),
    ) -> None:
        """The settings dir's files, replaced as one set (``settings_files``): a run cut short
        leaves the old set or a new one the next run completes, never a mix. ``check`` (the
        request with them) runs on the new set staged, before it is committed: a set that
        fails it is not written (audit s39ws M5: it replaced a working one). A client key and
        certificate in place that this enrolment did not make worthless (``_worth_keeping``,
        ``bundle`` the cluster's CAs) are kept with their set in ``settings_files.REPLACED``,
        and that is said (s43rev3 Low 4: another name's, or another CA's, was overwritten
        unsaid)."""
        d = result.settings_dir
        settings = {
            "version": SETTINGS_VERSION,
            "server_url": result.server.url,
            "bootstrap_port": result.bootstrap_port,
            "node": result.node,
            "ca_pin": result.ca_pin,
            "ca_file": "ca.pem",
            "client_cert_file": "client.pem" if client_pem else None,
            "client_key_file": "client.key" if client_pem else None,
            "server_fingerprint": result.server_fingerprint,
            "client_fingerprint": result.client_fingerprint,
            "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
        files = {"ca.pem": (ca_pem, PUBLIC), "settings.json": (text.encode(), PUBLIC)}
        if client_pem is not None and key_pem is not None:
            files |= {"client.key": (key_pem, PRIVATE), "client.pem": (client_pem, PUBLIC)}
        replaced: list[tuple[str, str]] = []  # its name, and why it is worth keeping, if it is

        def worth_keeping(key_pem: bytes, cert_pem: bytes) -> bool:
            if (worth := self._worth_keeping(key_pem, cert_pem, bundle)) is not None:
                replaced.append(worth)
            return worth is not None

        # The set before, for the pair in place to keep with it (s45rev1 L3).
        before = settings_files.read_set(d) if client_pem is None else {}
        gone = client_pem is not None and settings_files.cert_gone(d)  # (s47rev3 M1)
        try:
            make_private_dir(d, parents_mode=0o700)
            kept = settings_files.replace(
                d, files, check, worth_keeping if client_pem is not None else None
            )
        except settings_files.Unfinished as exc:
            raise NotFinished(
                Exit.FAILURE,
                f"the new settings are committed in {d}, but not finished: "
                f"{_at_fault(d, exc.error)}",
            ) from None
        except OSError as exc:
            raise ClientError(
                Exit.FAILURE, f"cannot write the settings to {d}: {exc.strerror or exc}"
            ) from None
        except settings_files.NewerStaging:
            raise ClientError(Exit.FAILURE, _newer_staging(d)) from None
        except settings_files.ReplacedNotKept as exc:
            if exc.reading:
                raise ClientError(Exit.FAILURE, _replaced_not_kept(d, exc, replaced)) from None
            if exc.held is not None:  # (a key alone: s46rev2 M1, held as --no-enrol holds)
                raise KeyAloneHeld(Exit.FAILURE, _key_alone_held(d, exc.held, replaced)) from None
            # (Short lines, s45ws: the other course in a note, then the error; it was one
            # line of ~600 characters.)
            name = replaced[-1][0] if replaced else "that certificate"
            self.ui.say(
                "note      if the set in place cannot be kept aside: move client.key and "
                f"client.pem out of {d} yourself (keep them while {name} is needed), then run "
                "this again"
            )
            raise NotReplaced(Exit.FAILURE, _replaced_not_kept(d, exc, replaced)) from None
        self.written = True
        if client_pem is not None:
            self._drop_pending()  # (the name is this PC's now: its pair is in place)
        self.ui.say(f"settings  written to {d}")
        if gone:
            self.ui.say(f"note      the client.key in place is replaced, not kept: {_CERT_GONE}")
        if kept is not None and not os.path.lexists(kept / "client.pem"):  # (s47ws)
            self.ui.say(
                f"note      the settings before are kept in {kept}, their client.key alone: "
                + _LONE_KEY
            )
            self.ui.say(f"note      {_LONE_KEY_KEPT}")
        elif kept is not None and replaced:
            name, why = replaced[-1]
            self.ui.say(
                f"note      the settings before are kept in {kept}, as their key is nowhere "
                f"else: client certificate {name} {why}; remove that folder once {name} is "
                f"no longer needed (tlsroll workstations revoke {name}, on its cluster's "
                "leader, frees the name); it goes by itself once that certificate has expired"
            )
        if client_pem is None:
            self._set_aside(d, bundle, before)

    def _worth_keeping(
        self,
        key_pem: bytes,
        cert_pem: bytes,
        bundle: Sequence[x509.Certificate],
        superseding: str | None = "",
    ) -> tuple[str, str] | None:
        """Why a client key and certificate about to be replaced are worth keeping: a pair
        that holds together, is valid now, and that this enrolment did not supersede (the
        leader revokes every other certificate of the name it signs: one of this name from a
        CA of the cluster's ``bundle``), i.e. another name's or another CA's. None if not
        worth keeping (expired, unreadable, or superseded); else its name, and why.
        ``superseding``: the name whose signing superseded it (default: this run's name;
        None: none did, as the newer pair is not of the cluster's CA)."""
        try:
            cert = pki.load_cert_pem(cert_pem)
            _check_not_ended(cert)
            if not pki.key_matches(cert, pki.load_key_pem(key_pem)):
                return None
            name = one_line(pki.names_of(cert).common_name, 64)
        except (PKIError, ValueError, TypeError, x509.DuplicateExtension, UnsupportedAlgorithm):
            return None
        valid = f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"
        if not any(pki.issued_by(cert, ca) for ca in bundle):
            return name, f"of another CA than this cluster's, {valid}"
        if superseding is None:
            return name, f"not superseded by the newer one, {valid}"
        if name != (superseding or self.workstation):
            than = "this one" if not superseding else one_line(superseding, 64)
            return name, f"of another name than {than}, {valid} (the leader still holds it)"
        return None

    def _superseding(self, cert_pem: bytes, bundle: Sequence[x509.Certificate]) -> str | None:
        """The name of a client certificate (PEM) if its signing superseded the older
        certificates of that name: one of a CA of the cluster's ``bundle``; else None."""
        try:
            cert = pki.load_cert_pem(cert_pem)
            name = pki.names_of(cert).common_name
        except (PKIError, ValueError, TypeError, x509.DuplicateExtension):
            return None
        return name if any(pki.issued_by(cert, ca) for ca in bundle) else None

    def _set_aside(
        self, d: Path, bundle: Sequence[x509.Certificate], before: Mapping[str, bytes]
    ) -> None:
        """Settings without a client certificate are in place: an earlier enrolment's
        client.key and client.pem are taken out of place (software that reads those names
        would use what these settings do not), kept to prove this PC's name at its next
        enrolment (audit s39ws L3: they stayed, unmentioned). Of them and a pair kept aside
        before, the older is kept in ``settings_files.REPLACED`` when it may still be valid
        (``_worth_keeping``: another name's or another CA's), with the set it worked with
        (``before``, read before these settings were written: s45rev1 L3), and that is said
        (s45ws: it was removed, its key nowhere else). Where that would lose a set kept there
        that may still be valid, nothing is moved, and that is said (s45rev1 M1)."""
        whys: dict[bytes, tuple[str, str]] = {}  # by certificate (PEM): its name, and why

        def worth(key_pem: bytes, cert_pem: bytes, newer_pem: bytes) -> bool:
            why = self._worth_keeping(
                key_pem, cert_pem, bundle, self._superseding(newer_pem, bundle)
            )
            if why is not None:
                whys[cert_pem] = why
            return why is not None

        try:
            done = settings_files.set_aside(d, worth, before)
        except OSError as exc:  # (s45rev1 L1: the path at fault, and what to do)
            self.ui.say(f"note      client.key and client.pem stay in {d}: {_at_fault(d, exc)}")
            return
        if done is None:
            return
        name, why = whys.get(done.older or b"", ("", ""))
        if done.lone:  # (s47ws: a key whose client.pem is a link or a FIFO: kept)
            if done.held is not None:
                held = whys[done.held][0] + "'s" if done.held in whys else _held_what(d)
                self.ui.say(
                    f"note      client.key and client.pem stay in {d}: keeping client.key aside "
                    "alone (its client.pem is a link or a FIFO) would lose "
                    f"{held} in {settings_files.REPLACED}"
                )
                self.ui.say(
                    f"note      remove {d / 'client.key'} if its certificate is no longer needed, "
                    f"or move {d / settings_files.REPLACED} out of {d} as its owner or root (keep "
                    "it while its certificate is needed), then run this again"
                )
                return
            if done.replaced is None:  # (no client.pem at all: s47rev3 M1)
                self.ui.say(f"note      client.key removed: {_CERT_GONE}")
                return
            self.ui.say(f"note      client.key moved to {done.replaced}, alone: {_LONE_KEY}")
            self.ui.say(f"note      {_LONE_KEY_KEPT}")
            return
        if done.held is not None:
            # (s45rev7 L3: where each pair is, and who can move that folder out; two
            # lines, each short)
            at = "in place" if done.older_at in (None, d) else f"in {settings_files.KEPT}"
            held = whys[done.held][0] + "'s" if done.held in whys else _held_what(d)
            self.ui.say(
                f"note      client.key and client.pem stay in {d}: keeping the older pair, "
                f"{name}'s ({at}), aside would lose {held} in {settings_files.REPLACED}"
            )
            self.ui.say(
                f"note      move {d / settings_files.REPLACED} out of {d} as its owner or root "
                "(keep it while its certificate is needed), then run this again"
            )
            return
        kept_older = f"client certificate {name} {why}"
        if done.moved:
            self.ui.say(
                f"note      the earlier enrolment's client.key and client.pem moved to "
                f"{done.kept}: these settings use no client certificate (enrolling again uses "
                "them)"
            )
            if done.replaced is not None:
                self.ui.say(
                    f"note      the pair kept there before ({kept_older}) moved to "
                    f"{done.replaced}; remove that folder once {name} is no longer needed"
                )
        elif done.replaced is not None:
            self.ui.say(
                f"note      the earlier enrolment's client.key and client.pem ({kept_older}) "
                f"moved to {done.replaced}; remove that folder once {name} is no longer "
                f"needed (these settings use no client certificate; enrolling again uses the "
                f"newer pair in {done.kept})"
            )
        else:
            newer = (
                f": enrolling again uses the newer pair in {done.kept}"
                if settings_files.kept_pair(d) is not None
                else ""
            )
            self.ui.say(
                "note      the earlier enrolment's client.key and client.pem removed (expired, "
                f"unreadable, superseded or not a pair){newer}"
            )

    def check_not_root_in_a_users_dir(self) -> None:
        """Run as root (``sudo`` keeping the user's HOME, ``su`` without ``-``), with a
        settings dir in or below a directory another user owns: refused before anything is
        read, sent or written (audit s39ws L6: it made a root-owned ~/.config/tlsroll in the
        user's home, which the user's client could not read, and a ~/.config the user's
        desktop could not write). Refused rather than written with the user's owner: root
        creating and chown-ing files in a tree another user controls is what a planted link
        turns against root (s39key2 H2), and the settings are that user's to write. For the
        same reason a settings dir to be made in a directory others can write (a sticky one
        as /tmp included), or in one others can write under a directory on the way that is
        not sticky, is refused (s43rev3 Low 5), and so is a path that cannot be looked at."""
        if os.geteuid() != 0:
            return
        # Each entry the kernel looks up on the way, in its order: the links themselves and
        # their targets' entries (audit s43rev1: a link of the user's to a directory root owns
        # passed, all of the path resolved being root's, and the user can swap it between this
        # check and the writes), and a ``..`` after a link from the link's target, as the
        # kernel takes it (s43rev3 Low 5: ``abspath`` drops ``link/..`` as text). Only "not
        # there" is passed over (made by root, in what holds it); any other error refuses.
        d = Path(self.o.settings_dir)  # (said as given: a ``..`` kept)
        if not d.is_absolute():
            d = Path(os.getcwd(), d)  # (the kernel's own name of the cwd: no link in it)
        try:
            found = look_up(d)
        except OSError as exc:
            raise ClientError(
                Exit.FAILURE,
                f"this runs as root, and the settings dir {d} cannot be looked at: "
                f"{exc.strerror or exc}; nothing was changed",
            ) from None
        last = found.entries[-1][0]
        for part, st in found.entries:
            owner = st.st_uid
            if owner != 0:
                try:
                    entry: pwd.struct_passwd | None = pwd.getpwuid(owner)
                except KeyError:
                    entry = None
                user = entry.pw_name if entry is not None else f"the user of uid {owner}"
                link = stat.S_ISLNK(st.st_mode)
                where = (
                    f"is {'a symbolic link ' if link else ''}owned by {user_label(owner)}"
                    if found.whole and part in (d, last)
                    else f"is in {part}, a symbolic link {user_label(owner)} owns"
                    if link
                    else f"is in {part}, which {user_label(owner)} owns"
                )
                # (Two lines, each short, s45ws: root's own settings in a note line first,
                # then the error, whose one course is to run it as the user.)
                self.ui.say(f"note      for root's own settings instead, {self._for_root()}")
                raise ClientError(
                    Exit.FAILURE,
                    f"this runs as root, but the settings dir {d} {where}: "
                    f"{self._as_the_user(entry, user)}; nothing was changed",
                )
        # Modes too (s43rev3 Low 5): where root makes the dir, or writes in it, nobody else
        # may write (they could put a link there first: a settings dir not yet made in /tmp
        # passed); a directory on the way, only if sticky (else they could rename what is in
        # it away): ``fsutil.config_dir_problem``'s rule.
        for part, st in found.entries:
            if not stat.S_ISDIR(st.st_mode) or not st.st_mode & 0o022:
                continue
            mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
            if part == found.reached and found.whole:
                real = "" if part == d else f" (it is {part})"
                why = f"is writable by group or others{real} ({mode})"
            elif part == found.reached:
                why = f"would be made in {part}, which group or others can write ({mode})"
            elif not st.st_mode & stat.S_ISVTX:
                why = f"is in {part}, which group or others can write and is not sticky ({mode})"
            else:
                continue
            raise ClientError(
                Exit.FAILURE,
                f"this runs as root, but the settings dir {d} {why}: another user could "
                "put a link in root's way there; give a --settings-dir in a directory only root "
                "can write (or sudo -H for root's own settings); nothing was changed",
            )

    @staticmethod
    def _as_the_user(entry: pwd.struct_passwd | None, user: str) -> str:
        """What to run instead, for root's refusal of a settings dir in ``user``'s tree
        (``entry``: their passwd entry, if any): as that user; "without sudo" for the user
        who ran sudo and can log in, else ``sudo -u USER -H`` (a service user's shell lets no
        one log in: su does not work) naming the dir with ``--settings-dir``, as sudo drops
        the environment it may have come from (s44rev1 L5). Short (s45ws: the line was ~500
        characters; ``d`` is named once, before)."""
        if entry is None:
            return f"run it as {user}"
        if _login_shell(entry.pw_shell) and os.environ.get("SUDO_USER") == user:
            return f"run it as {user}, without sudo"
        return f"use sudo -u {user} -H, with this dir as --settings-dir"

    def _for_root(self) -> str:
        """The other course for root's refusal: root's own settings, ``sudo -H`` where the
        settings dir came from the environment sudo kept (``-E``, or a sudo that keeps HOME;
        the variable named), else a ``--settings-dir`` of root's."""
        given = os.environ.get("TLSROLL_CLIENT_DIR")
        if given and Path(given) == self.o.settings_dir:
            variable: str | None = "TLSROLL_CLIENT_DIR"
        elif self.o.settings_dir == default_settings_dir():
            variable = "XDG_CONFIG_HOME" if os.environ.get("XDG_CONFIG_HOME") else "HOME"
        else:
            variable = None  # --settings-dir
        if variable is None:
            return "give a --settings-dir of root's"
        keeps = (
            "sudo -E and some sudo set-ups keep"
            if variable == "HOME"
            else "sudo -E and su without - keep"
        )
        return f"run sudo -H without -E: this settings dir comes from {variable}, which {keeps}"

    def check_settings_dir(self) -> None:
        """The settings dir can be made (or is ours) and written, checked before the password
        is asked for and without creating anything: a run that failed to write its settings
        after the exchange had enrolled already, and the leader revokes the working certificate
        of the same name when it signs a new one (audit s39ws M1)."""
        d = self.o.settings_dir
        if problem := private_dir_problem(d):
            raise ClientError(
                Exit.FAILURE, f"cannot write the settings to {d}: {problem}; nothing was sent"
            )

    def finish_settings(self) -> None:
        """What an interrupted run left in the settings dir, completed or discarded before
        anything reads or writes it (``settings_files.finish``)."""
        d = self.o.settings_dir
        try:
            done = settings_files.finish(d)
        except OSError as exc:
            raise ClientError(
                Exit.FAILURE,
                f"cannot finish the settings an interrupted run left in {d}: {_at_fault(d, exc)}",
            ) from None
        except settings_files.NewerStaging:
            raise ClientError(Exit.FAILURE, _newer_staging(d)) from None
        if done is not None:
            self.ui.say(f"settings  an interrupted run's new settings {done.value} in {d}")

    def check_settings(self, server: ServerURL, result: Result, d: Path) -> None:
        """A request with the settings in ``d`` (the new set, staged) must succeed; CheckFailed
        if not."""
        enrolled = result.client_fingerprint is not None
        # (read as the set in place is: what ssl loads is what was checked, s47rev3 L4)
        ca_pem = settings_files.read_file(d / "ca.pem")
        client = (d / "client.pem", d / "client.key") if enrolled else ()
        with settings_files.held_files(*client) as held:
            cert, key = held if held else (None, None)
            context = client_context(ca_pem, cert_file=cert, key_file=key)
        try:
            reply = request(
                server.host,
                server.port,
                "GET",
                server.app_path,
                context,
                timeout=self.o.timeout,
                workstation=self.workstation,
            )
        except NetError as exc:
            hint = (
                "; the server wants a client certificate: run again without --no-enrol"
                if not enrolled and exc.kind == "dropped"
                else ""
            )
            raise CheckFailed(f"{exc.detail}{hint}") from None
        if reply.status != 200 and not (not enrolled and reply.status in (401, 403)):
            raise CheckFailed(f"{server.url} answered HTTP {reply.status}")
        self.ui.say(f"check     https request with the new settings: HTTP {reply.status}")


# A client.key in place whose client.pem is a link (to no certificate of it) or a FIFO
# (s47ws): kept alone, as it may be the only copy of a valid pair's key; what to do with it.
# (Two short notes.)
_LONE_KEY = "its client.pem was a link or a FIFO (not copied)"
_LONE_KEY_KEPT = (
    "whether that key is still needed cannot be told: put its certificate beside it, or "
    "remove that folder once it is no longer needed"
)
# A client.key with no client.pem at all (s47rev3 M1): not kept.
_CERT_GONE = (
    "its client.pem is gone, and a key without its certificate can neither be used nor prove "
    "this PC's name"
)


def _held_what(d: Path) -> str:
    """What ``settings_files.REPLACED`` in ``d`` holds, when it is said to hold a set that
    may still be valid and its certificate could not be read: a key without its certificate
    (s47rev3 L5: called "one that cannot be read"), or a set that cannot be read."""
    where = d / settings_files.REPLACED
    if os.path.lexists(where / "client.key") and not os.path.lexists(where / "client.pem"):
        return "a key without its certificate"
    return "a set that cannot be read"


def _key_alone_held(d: Path, held: bytes, replaced: Sequence[tuple[str, str]]) -> str:
    """The one line for a client.key in place, alone (its client.pem a link or a FIFO),
    that a new enrolment's set would replace, not kept as keeping it would lose the set
    ``REPLACED`` holds, which may still be valid (``held``, its certificate; s46rev2 M1).
    The two ways out: the key removed (s47rev3 M1: only moving a valid set out was
    offered), or that folder moved out."""
    where = d / settings_files.REPLACED
    what = f"{replaced[-1][0]}'s set" if held and replaced else _held_what(d)
    return (
        f"client.key in place (its client.pem a link or a FIFO) cannot be kept aside without "
        f"losing {what} in {where}: nothing was replaced; remove {d / 'client.key'} if its "
        f"certificate is no longer needed, or move {where} out of {d} as its owner or root "
        "(keep it while its certificate is needed), then run this again"
    )


def _at_fault(d: Path, exc: OSError) -> str:
    """What failed in finishing a committed set in the settings dir ``d``, or in setting its
    client files aside (``exc``, its ``filename``, or a rename's ``filename2``, the path at
    fault), and what to do, for the one line (s45ws: "Permission denied", each later run
    stopped by it without a path or a way out). A directory in ``settings_files.REPLACED``
    is removed before its files (``settings_files._remove``): when it cannot be, the key
    kept there is still there to keep."""
    why = exc.strerror or str(exc)
    named = exc.filename2 or exc.filename  # (a rename's: where it was to go, s45rev1 L2)
    path = Path(named) if named else d
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # (s45rev1 L2: not "fix that")
        # (s45rev7 L5: no path of its own, as write() gives none: not "D: D: No space")
        return f"{f'{path}: ' if named else ''}{why}; free some space, then run this again"
    replaced = d / settings_files.REPLACED
    if path == replaced or replaced in path.parents:
        return (
            f"{path} cannot be removed ({why}); move {replaced} out of {d} as its owner or "
            "root (keep it if its certificate is still needed), then run this again"
        )
    who = " as its owner or root" if exc.errno in (errno.EACCES, errno.EPERM) else ""
    return f"{f'{path}: ' if named else ''}{why}; fix that{who}, then run this again"


def _replaced_not_kept(
    d: Path, exc: settings_files.ReplacedNotKept, replaced: Sequence[tuple[str, str]]
) -> str:
    """The one line for a set in place that could not be kept in ``REPLACED`` before a new
    enrolment's set replaced it (s44rev1 L2: it said "cannot write the settings", and that
    the next run would do, which failed the same way)."""
    where = d / settings_files.REPLACED
    mine = (
        f"move client.key and client.pem out of {d} yourself (keep them if that certificate "
        "is still needed), then run this again"
    )
    if exc.reading:
        return (
            f"the client key and certificate in place could not be read to tell whether to "
            f"keep them in {where} ({exc.path}: {exc.reason}): nothing was replaced; let this "
            f"user read them, or {mine}"
        )
    what = f"{replaced[-1][0]}'s" if replaced else "its pair"
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (
        f"the settings in place ({what}) could not be kept in {where} ({exc.reason}): nothing "
        f"was replaced; {'free some space' if full else 'fix that'}, then run this again"
    )


def _pair_in_place(d: Path) -> tuple[bytes, bytes] | None:
    """The client key and certificate (PEM) in place in the settings dir ``d``, if both can
    be read (``settings_files.read_file``: a link followed, as the practice software follows
    it, s46rev2 M2; a FIFO never opened, s47ws: the run waited on it for ever)."""
    try:
        key = settings_files.read_file(d / "client.key")
        return key, settings_files.read_file(d / "client.pem")
    except OSError:
        return None


def _check_not_ended(cert: x509.Certificate) -> None:
    """PKIError if this PC's client certificate ``cert`` has ended by this PC's clock. One
    that starts later by it is this PC's all the same: the leader signed it a moment ago,
    its clock ahead of this PC's by more than the hour a certificate is backdated (review
    s67 wsrev M2: such a pair was taken for none, neither naming this PC nor proving its
    name, and dropped unkept when another name's set replaced it). Its use by the servers
    goes by their clocks."""
    pki.check_valid_now(cert, max(pki.utcnow(), cert.not_valid_before_utc))


def _valid_pairs(
    pairs: Sequence[tuple[bytes, bytes]],
) -> list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]:
    """Of pairs of client key and certificate (PEM), those not ended (``_check_not_ended``)
    that hold together: an EC key, its certificate, a workstation name. One that cannot be
    read counts as none."""
    found: list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = []
    for key_pem, cert_pem in pairs:
        # (Its names and key are read when asked for: a malformed SAN, an extension twice
        # or a key ``cryptography`` cannot load raise then; audit s40ws L2.)
        try:
            key = pki.load_key_pem(key_pem)
            cert = pki.load_cert_pem(cert_pem)
            _check_not_ended(cert)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                continue
            holds = pki.key_matches(cert, key) and proto.WORKSTATION_CN.fullmatch(
                pki.names_of(cert).common_name
            )
        except (PKIError, ValueError, TypeError, x509.DuplicateExtension, UnsupportedAlgorithm):
            continue
        if holds:
            found.append((cert, key))
    return found


def _newest(
    pairs: Sequence[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Of client certificates and keys, the pair issued last; None if none."""
    return max(pairs, key=lambda pair: pair[0].not_valid_before_utc, default=None)


def _login_shell(shell: str) -> bool:
    """Whether ``shell`` (a passwd entry's) lets its user log in: not ``nologin`` or
    ``false``, and listed in /etc/shells where that can be read (an empty one is /bin/sh)."""
    if not shell:
        return True
    if os.path.basename(shell) in ("nologin", "false"):
        return False
    try:
        listed = Path("/etc/shells").read_text(errors="replace").split()
    except OSError:
        return True
    return shell in listed


_PINS_SHOWN = 4  # the CAs above a server's certificate that the compare line names, at most


def _bundle_size(count: int) -> None:
    """A node's CA bundle of ``count`` certificates, more than ``pki.MAX_BUNDLE``: refused."""
    if count > pki.MAX_BUNDLE:
        raise ClientError(
            Exit.UNTRUSTED,
            f"bootstrap answer: the node's CA bundle holds {count} certificates, more than the "
            f"{pki.MAX_BUNDLE} a cluster's may; nothing was set up: ask the practice IT",
        )


def proto_pin(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return pki.parse_pin(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ca-pin") from None


def _versioned(body: bytes) -> bool:
    """True if ``body`` is a JSON object with a version: a bootstrap service's answer, if a
    malformed one (not another program's)."""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        data = proto.loads_strict(body)
        return isinstance(data, dict) and "version" in data
    return False


def _error_of(reply: Reply) -> tuple[str, str]:
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
        data: Any = proto.loads_strict(reply.body)
        return str(data.get("error", "")), str(data.get("message", ""))
    return "", ""
