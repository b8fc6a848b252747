"""The error tree shared by leader, agent and CLI.

    TlsrollError                 every error tlsroll raises on purpose; str() is one clear line
    ├── ConfigError              a config file is missing, unreadable or has a wrong key/value
    ├── PKIError                 category + reason, with fixed messages (like cfssl's errors)
    ├── UnsafePermissions        a secret file readable by others (refuse to start, like OpenSSH)
    └── TransientError           worth retrying (network); everything else is terminal

Code that crosses a boundary (CLI, gRPC servicer) maps these to an exit code or a gRPC status
in one place each; nothing below that boundary prints or exits.
"""

from __future__ import annotations

from enum import StrEnum


class TlsrollError(Exception):
    """Base class; the message is one line meant for an administrator."""


class ConfigError(TlsrollError):
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


class PKIError(TlsrollError):
    def __init__(self, reason: PKIReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class UnsafePermissions(TlsrollError):
    pass


class TransientError(TlsrollError):
    """A failure at the network boundary that may go away if retried."""
