"""The error tree shared by every tlsroll package: one root, two kinds.

    TlsrollError                 every error tlsroll raises on purpose; str() is one clear line
    ├── TransientError           may go away by itself (the network, a busy peer): retried with
    │                            backoff at the network boundary; a step that still ends with it
    │                            is run again later, and nothing is recorded as failed
    └── TerminalError            retrying the same thing gives the same answer: a step that ends
        │                        with it fails, and the schema shows the message
        ├── ConfigError          a config file is missing, unreadable or has a wrong key/value
        ├── PKIError             category + reason, with fixed messages (like cfssl's errors)
        ├── UnsafePermissions    a secret file readable by others (refuse to start, like OpenSSH)
        ├── NotRegularFile       a file to read is a directory, a FIFO, a device or a socket
        └── …                    each package's own (a test checks that every error class in
                                 the project is one of the two kinds)

The model is controller-runtime's ``TerminalError``: the kind decides what the caller does, not
the message. Code that crosses a boundary (CLI, gRPC servicer) maps these to an exit code or a
gRPC status in one place each (``tlsroll.rpc.map_errors`` picks the most specific class);
nothing below that boundary prints or exits.
"""

from __future__ import annotations

import errno
import os
from enum import StrEnum


class TlsrollError(Exception):
    """Base class; the message is one line meant for an administrator. Raise one of the two
    kinds below, not this."""


class TransientError(TlsrollError):
    """A failure that may go away if the same thing is tried again later."""


class ShuttingDown(TransientError):
    """The daemon is stopping, so what was asked was not done (its crypto worker closed): no
    fault, and no warning; the next start does it."""


# Errors that say the machine *doing* something ran short (descriptors, kernel memory), nothing
# about the server or file it was doing it with: the leader or an agent out of file descriptors
# must not roll back a node, skip its freeze, or call its config unreadable.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class LocalResourceError(TransientError):
    """This machine ran out of a resource (e.g. "Too many open files"): what was tried says
    nothing about the server; try again later (and raise LimitNOFILE if it keeps happening)."""


def is_local_shortage(exc: BaseException) -> bool:
    """True if ``exc`` says this machine ran short (descriptors, kernel memory)."""
    return isinstance(exc, LocalResourceError) or (
        isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS
    )


# A file system with no room left (a full disk, a user's quota): what a write there needs
# may come back once something else frees it (a log rotated, a file removed).
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_out_of_space(exc: BaseException) -> bool:
    """True if ``exc`` says a file system had no room left (ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS


def raise_if_local(exc: BaseException, what: str) -> None:
    """Raise ``LocalResourceError`` if ``exc`` is this machine's shortage; ``what``: what was
    being done ("checking https://…", "reading /etc/…")."""
    if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
        raise LocalResourceError(
            f"{what} from here: {os.strerror(exc.errno)} on this machine, not the "
            "server's fault; it is tried again (raise LimitNOFILE if it persists)"
        ) from None


class TerminalError(TlsrollError):
    """A failure that trying again will not change; it is reported, not retried."""


class ConfigError(TerminalError):
    def __init__(self, path: object, key: str | None, problem: str) -> None:
        where = f"{path}: {key}" if key else f"{path}"
        super().__init__(f"config error: {where}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


class PKIReason(StrEnum):
    BAD_CSR = "malformed CSR"
    BAD_SIGNATURE = "CSR signature does not verify"
    KEY_TYPE = "unsupported key type"
    NAME_MISMATCH = "names in the CSR differ from the names claimed"
    CA_REQUESTED = "CSR asks for a CA certificate"
    KEY_MISMATCH = "private key does not match the certificate"
    EXPIRED = "certificate expired or not yet valid"
    NOT_CA = "certificate is not a CA"
    PIN_MISMATCH = "CA does not match the pinned key"
    UNTRUSTED = "certificate not issued by the expected CA"
    BAD_PEM = "not a PEM certificate or key"
    BAD_PASSPHRASE = "wrong passphrase for the encrypted key"  # noqa: S105


class PKIError(TerminalError):
    def __init__(self, reason: PKIReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class UnsafePermissions(TerminalError):
    pass


class NotRegularFile(TerminalError):
    """A path that must name a file (a secret, a token) names a directory, a FIFO, a device or
    a socket: reading it would fail, hang (a FIFO without a writer) or never end (/dev/zero)."""


def os_error_text(exc: OSError) -> str:
    """An OSError as one line that keeps its cause: the path (both of a rename), the system's
    words and the errno, e.g. ``/var/lib/x/a.tmp: No space left on device (errno 28, ENOSPC)``.
    An OSError without an errno (raised with a message only) is its message."""
    if exc.errno is None:
        return str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno, "?")
    where = ""
    if exc.filename is not None:
        where = f"{exc.filename}"
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        where += ": "
    return f"{where}{exc.strerror or 'error'} (errno {exc.errno}, {name})"
