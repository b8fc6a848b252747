"""The node's identity files, and the errors of its identity work: what needs no config.

``nodeagent.identity`` checks and enrols the node; these pieces of it run in the agent's crypto
worker too (``certwork_ops.renew_install``: a renewal's certificate checked and moved into
place), whose child imports only what its ops need (``nodeagent.cryptoworker_child``): not the
config, TLS or logging that ``identity`` imports. ``identity`` imports them from here (they
are its names still). ``tlsroll.pki`` is imported where certificate work runs (the agent never
does that work: ``identity.Identity``).

    DATA/node.key   0600      DATA/node.pem   the node certificate      DATA/ca.pem  the CA
    DATA/node.key.new, DATA/node.pem.new     a renewal's, until it moves them into place
    DATA/ca.refused   a renewed CA certificate this node refused: since when, why, and the
                      DATA/ca.pem it kept (``refused_ca``), until a renewal's CA is taken
    DATA/crl.pem      the CA's revocation list the leader sent (``nodeagent.trust``)
    DATA/pin.unseen.json   how long the join port has shown no certificate of the pinned key,
                      and of which pin and join port (``read_pin_unseen``), until a join port
                      shows it (``forget_pin_unseen``): the patience used, kept across the
                      agent's restarts (``nodeagent.runtime.PinUnseen``)
    DATA/leader.serial.json   0600  the serial of the leader's certificate the agent dials by
                      name, and that the leader announces serials (``read_leader_pin``;
                      ``nodeagent.leader_link``), and the leader's heartbeat interval last
                      heard (``read_leader_interval``)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from tlsroll.errors import (
    ConfigError,
    NotRegularFile,
    PKIError,
    PKIReason,
    TerminalError,
    TransientError,
)
from tlsroll.fsutil import PRIVATE, file_kind, fsync_dir, read_regular, write_atomic

if TYPE_CHECKING:
    from cryptography import x509

    from tlsroll import pki


class EnrolmentRefused(TerminalError):
    pass


class LeaderFailed(TerminalError):
    """The leader failed to answer an enrolment (``identity.LEADER_FAILED``: a bug of its, a
    call cut off): no verdict on this node, so no refusal (exit 6) and, for a certificate that
    has ended, no ``CertificateExpired`` (exit 5) either: exit 1, which the unit restarts on.
    A class of its own, not a plain TerminalError, so that ``runtime.obtain_identity`` can tell
    it from a refusal after it crossed the child's pipe (``workerrors.ERRORS``; review s66)."""


class EnrolmentDeferred(TransientError):
    """The join port said "wait and retry" (``leader.join_guard``: its source in backoff, or
    more attempts of its source at once than it takes, as when many nodes behind one address
    or IPv6 /64 enrol together) and how long: ``retry_after`` seconds. The agent waits that
    long before its next attempt (``nodeagent.runtime``), not its own few seconds: each
    attempt is a child process (``certwork``) costing the node a fraction of a second of CPU."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PinNotShown(TransientError):
    """The leader's join port sent a chain holding no certificate with the key of
    ``[leader].ca_pin`` (not the CA, nor any other): what a load balancer's default certificate
    looks like while it fails over (review rev50e), as well as a wrong pin. Tried again for a
    while (``identity.next_pin_wait``; the join token is not sent); past that patience the agent
    stops with ``refusal`` (``identity.pin_mismatch``'s line, exit 2: a wrong pin is a person's
    to fix). ``pins``: the pins of the certificates the port sent, as it sent them (public).
    ``hint``: what the chain suggests, or "" (``identity.chain_hint``: a certificate of this
    pin's cluster sent without its CA's); the refusal says it too."""

    def __init__(self, refusal: ConfigError, pins: tuple[str, ...], hint: str = "") -> None:
        super().__init__(refusal.problem)
        self.refusal = refusal
        self.pins = pins
        self.hint = hint


class CertificateExpired(TerminalError):
    """The node's certificate has ended: it cannot renew, only enrol again."""


def paths(data_dir: Path) -> tuple[Path, Path, Path]:
    return data_dir / "node.key", data_dir / "node.pem", data_dir / "ca.pem"


def pending_paths(data_dir: Path) -> tuple[Path, Path]:
    """Where a renewal keeps the new key and certificate until it moves them into place."""
    key_file, cert_file, _ = paths(data_dir)
    return key_file.with_name(key_file.name + ".new"), cert_file.with_name(cert_file.name + ".new")


def refused_ca_path(data_dir: Path) -> Path:
    return data_dir / "ca.refused"


def pin_unseen_path(data_dir: Path) -> Path:
    return data_dir / "pin.unseen.json"


LATEST_TIME = 253_402_300_799.0
"""9999-12-31T23:59:59Z in seconds since the epoch: the latest time ``datetime`` shows, so a
record's ``since`` past it (a damaged or hand-made record) is refused at its read, not met as
an exception at each try's log line (review rev52b L1: the agent then exited 1 and was started
again for ever)."""


def read_pin_unseen(data_dir: Path) -> tuple[float, float, str, str] | None:
    """``DATA/pin.unseen.json``: since when (seconds since the epoch, for the log) the join
    port has shown no certificate of the pinned key, how many seconds of the patience the
    agent's processes have waited so far (``waited``: on their own clocks, which a clock set
    forward or back does not move), which pin and which join port (``host:port``); None if
    there is none. A record that cannot be read or is damaged raises (``OSError``,
    ``NotRegularFile``, ``ValueError``): the caller starts afresh. Nothing in it is secret."""
    try:
        record = json.loads(read_regular(pin_unseen_path(data_dir)))
        since, waited = record["since"], record["waited"]
        pin, join = record["ca_pin"], record["join"]
    except FileNotFoundError:
        return None
    except (KeyError, TypeError, IndexError, RecursionError) as exc:
        raise ValueError(f"not such a record ({type(exc).__name__}: {exc})") from None
    times = []
    for name, value in (("since", since), ("waited", waited)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: {str(value)[:40]} is no number")
        try:
            number = float(value)  # an integer of 400 digits: OverflowError
        except OverflowError:
            number = math.inf
        if not 0 <= number <= LATEST_TIME:  # (NaN fails too)
            raise ValueError(f"{name}: {str(value)[:40]} is no time")
        times.append(number)
    if not isinstance(pin, str) or not isinstance(join, str):
        raise ValueError("ca_pin or join of the wrong kind")
    return times[0], times[1], pin, join


def write_pin_unseen(data_dir: Path, since: float, waited: float, pin: str, join: str) -> None:
    """Record (one rename) that the join port ``join`` shows no certificate of ``pin`` since
    ``since`` (seconds since the epoch), ``waited`` seconds of the patience used."""
    record = {"since": since, "waited": waited, "ca_pin": pin, "join": join}
    write_atomic(pin_unseen_path(data_dir), json.dumps(record).encode("utf-8") + b"\n")


def forget_pin_unseen(data_dir: Path) -> None:
    """A join port showed the pinned key: the patience's record goes (``read_pin_unseen``).
    One that cannot go (a directory there) is passed over: it cannot be read either."""
    with contextlib.suppress(OSError):
        pin_unseen_path(data_dir).unlink()


LEADER_INTERVAL_MAX = 3600  # the largest ``heartbeat_interval`` a leader's config takes


def leader_pin_path(data_dir: Path) -> Path:
    return data_dir / "leader.serial.json"


def read_leader_pin(data_dir: Path) -> tuple[int | None, bool]:
    """``DATA/leader.serial.json``: the serial of the leader's certificate the agent dials by
    its name (``spiffe.leader_serial_host``; None: none known now) and whether a leader ever
    announced its serial (sticky: from then on a link dialed by the generic name is never
    trusted, ``nodeagent.leader_link``). (None, False) if there is none. A record that cannot
    be read or is damaged raises (``OSError``, ``NotRegularFile``, ``ValueError``)."""
    try:
        record = json.loads(read_regular(leader_pin_path(data_dir)))
        serial, announces = record["serial"], record["announces"]
    except FileNotFoundError:
        return None, False
    except (KeyError, TypeError, IndexError, RecursionError) as exc:
        raise ValueError(f"not such a record ({type(exc).__name__}: {exc})") from None
    if not isinstance(announces, bool) or not isinstance(serial, str):
        raise ValueError("serial or announces of the wrong kind")
    return (parse_serial(serial) if serial else None), announces


def parse_serial(text: str) -> int:
    """A certificate serial as lowercase hex (as ``f"{serial:x}"`` writes it), at most 20 bytes
    and positive (RFC 5280); ValueError otherwise."""
    if re.fullmatch(r"[1-9a-f][0-9a-f]{0,39}", text) is None:
        raise ValueError(f"{text[:48]!r} is no serial in hex")
    return int(text, 16)


def read_leader_interval(data_dir: Path) -> int | None:
    """The leader's heartbeat interval (s) that ``DATA/leader.serial.json`` keeps, as its
    answers last said it (``HeartbeatResponse.interval_seconds``): what the agent's first
    channel times its PINGs by (``nodeagent.leader_link``), so that a restarted agent need not
    dial again once the leader has answered. None: none kept (a record of an earlier release,
    none, or one that cannot be read: ``read_leader_pin`` says so)."""
    try:
        record = json.loads(read_regular(leader_pin_path(data_dir)))
    except (OSError, NotRegularFile, ValueError, RecursionError):
        return None
    interval = record.get("interval") if isinstance(record, dict) else None
    return interval if type(interval) is int and interval > 0 else None


def write_leader_pin(
    data_dir: Path, serial: int | None, announces: bool, interval: int | None = None
) -> None:
    """Record (one rename, 0600) what ``read_leader_pin`` and ``read_leader_interval`` read
    (an agent of an earlier release reads the serial and ``announces`` alone)."""
    record: dict[str, object] = {
        "serial": "" if serial is None else f"{serial:x}",
        "announces": announces,
    }
    if interval is not None:
        record["interval"] = interval
    write_atomic(leader_pin_path(data_dir), json.dumps(record).encode() + b"\n", PRIVATE)


def keep_enrolment_interval(data_dir: Path, interval: int) -> bool:
    """The leader's heartbeat interval its enrolment answer said
    (``EnrolResponse.heartbeat_interval_seconds``), kept in ``DATA/leader.serial.json`` as a
    heartbeat answer's is, so that the agent's first channel is timed by it: before, a fresh
    agent dialed by its own interval and dialed again once the leader's first answer said
    another (session 73, leftovers). Not kept where the answer says none (0: a leader of an
    earlier release) or one no leader's config takes, where the record says a leader announced
    its serial (an answer on the leader's generic name, as the join port's, is not taken then:
    ``leader_link.LeaderLink._trusts``), or where it cannot be read (the link says so); the
    record's serial and ``announces`` stay. Whether it was written; OSError raised."""
    if not 1 <= interval <= LEADER_INTERVAL_MAX:
        return False
    try:
        serial, announces = read_leader_pin(data_dir)
    except (OSError, NotRegularFile, ValueError):
        return False
    if announces or read_leader_interval(data_dir) == interval:
        return False
    write_leader_pin(data_dir, serial, announces, interval)
    return True


def crl_path(data_dir: Path) -> Path:
    """Where the agent keeps the CA's revocation list the leader sends (``trust.LeaderTrust``)."""
    return data_dir / "crl.pem"


def crl_kind_problem(data_dir: Path) -> NotRegularFile | None:
    """``DATA/crl.pem`` a directory: the error that says so and what to do, or None. The list
    is a file the agent writes over (a rename) each time the leader sends one: one that is no
    regular file but a directory (a FIFO, socket or device is replaced by the rename) could
    never be, and the agent would hold no list after each start (review rev51d M1: its
    heartbeat stream was dropped and opened again once a second for ever). A person's to fix
    (exit 2, as ``refused_ca_kind_problem``)."""
    path = crl_path(data_dir)
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None  # missing (or not to be looked at: the list's read and write say so)
    if not stat.S_ISDIR(mode):
        return None
    return NotRegularFile(
        f"{path} is not a regular file ({file_kind(mode)}); it is where the agent keeps the "
        f"CA's revocation list the leader sends: remove it (run: rm -r {path}) and start the "
        "agent again (the leader sends its list again)"
    )


def _held_ca(data_dir: Path) -> str:
    try:
        return hashlib.sha256(read_regular(paths(data_dir)[2])).hexdigest()
    except (OSError, NotRegularFile):
        return ""


def refused_ca_kind_problem(data_dir: Path) -> NotRegularFile | None:
    """``DATA/ca.refused`` there and no regular file (a FIFO, socket, device or directory,
    only root can put one there: the data dir is root's, 0700): the error that says so and
    what to do, or None. A person's to fix (exit 2), not passed over as the memo is: the
    record is what reports the refusal after a restart (``refused_ca``), and one the agent
    could neither read nor replace (a directory) would hide it for good."""
    path = refused_ca_path(data_dir)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing (or not to be looked at: its read says so)
    if stat.S_ISREG(mode):
        return None
    return _not_a_record(path, mode)


def _not_a_record(path: Path, mode: int) -> NotRegularFile:
    rm = "rm -r" if stat.S_ISDIR(mode) else "rm"
    return NotRegularFile(
        f"{path} is not a regular file ({file_kind(mode)}); it is where the agent records a "
        f"renewed CA certificate it refused: remove it (run: {rm} {path}) and start the agent "
        "again (a refusal still holding is recorded again at the next renewal)"
    )


def refused_ca(data_dir: Path) -> tuple[dt.datetime, str] | None:
    """Since when, and why, this node refuses the renewed CA certificate its leader sends
    (``DATA/ca.refused``, ``write_refused_ca``): kept across restarts, so that the heartbeat
    reports it again (review s49 M). None: none recorded, or the record is not about the
    ``DATA/ca.pem`` held now (another was written since: an enrolment, a crash between a
    renewal's CA write and its forgetting the record), or unreadable (then forgotten).
    ``NotRegularFile`` (``refused_ca_kind_problem``'s) for one that is no regular file: never
    read (a FIFO blocked the agent's start for ever: review rev50a L2)."""
    path = refused_ca_path(data_dir)
    try:
        record = json.loads(read_regular(path))
        since = dt.datetime.fromisoformat(record["since"])
        reason = record["reason"]
        held = record["ca_sha256"]
        if since.tzinfo is None or not isinstance(reason, str) or not isinstance(held, str):
            raise ValueError(path)
    except FileNotFoundError:
        return None
    except NotRegularFile as exc:
        raise (refused_ca_kind_problem(data_dir) or exc) from None
    except (OSError, ValueError, TypeError, KeyError):
        forget_refused_ca(data_dir)
        return None
    if held != _held_ca(data_dir):
        forget_refused_ca(data_dir)
        return None
    return since, reason


def write_refused_ca(data_dir: Path, since: dt.datetime, reason: str) -> None:
    """Record (one rename) that the renewed CA certificate is refused since ``since``."""
    record = {"since": since.isoformat(), "reason": reason, "ca_sha256": _held_ca(data_dir)}
    write_atomic(refused_ca_path(data_dir), json.dumps(record).encode("utf-8") + b"\n")


def forget_refused_ca(data_dir: Path) -> None:
    """A renewal's CA certificate taken (or the one held is the leader's): no refusal."""
    try:
        os.unlink(refused_ca_path(data_dir))
    except FileNotFoundError:
        return
    except OSError:
        return  # read again at the next start: stale records are dropped there (``refused_ca``)
    with contextlib.suppress(OSError):  # (gone; a lost rename is read again, as above)
        fsync_dir(data_dir)


def check_issued(
    cert: x509.Certificate, key: pki.PrivateKey, ca: x509.Certificate, names: pki.Names
) -> None:
    from tlsroll import pki  # noqa: PLC0415 - certificate work only (see the module docstring)

    if not pki.issued_by(cert, ca):
        raise PKIError(PKIReason.UNTRUSTED, "node certificate")
    if not pki.key_matches(cert, key):
        raise PKIError(PKIReason.KEY_MISMATCH, "node certificate")
    if pki.names_of(cert) != names:
        raise PKIError(
            PKIReason.NAME_MISMATCH, "node certificate differs from [node] in the config"
        )


def install_renewed(data_dir: Path, cert: x509.Certificate) -> None:
    """Move a renewal's new key and certificate into place: the certificate written beside
    the new key, then the key moved, then the certificate (see ``identity.finish_pending``)."""
    from tlsroll import pki  # noqa: PLC0415 - certificate work only (see the module docstring)

    key_file, cert_file, _ = paths(data_dir)
    new_key, new_cert = pending_paths(data_dir)
    pki.write_cert(new_cert, cert)
    os.replace(new_key, key_file)
    os.replace(new_cert, cert_file)
    fsync_dir(data_dir)
