"""How a child of the agent's answers an error: as a value the agent rebuilds as the same class.

The agent's certificate work runs in children (``nodeagent.certwork``'s one-shot checks, the
crypto worker's ops: ``nodeagent.cryptoworker_child``). An op's error crosses the pipe as
``answer_for`` makes it, and the agent raises it again as the class it was, with the same
message (``certwork._error``). Imports no more than the crypto worker's child needs.
"""

from __future__ import annotations

from typing import Any

from nodeagent.nodefiles import (
    CertificateExpired,
    EnrolmentDeferred,
    EnrolmentRefused,
    LeaderFailed,
    PinNotShown,
)
from tlsroll.errors import (
    ConfigError,
    LocalResourceError,
    NotRegularFile,
    PKIError,
    TerminalError,
    TlsrollError,
    TransientError,
    UnsafePermissions,
)

# The errors a child may answer with, rebuilt in the agent as the same class. Any other error
# of the child's is answered as the nearest of these it derives from (``answer_for``): a
# transient one stays transient, and the agent tries again.
ERRORS: dict[str, type[TlsrollError]] = {
    cls.__name__: cls
    for cls in (
        TransientError,
        LocalResourceError,
        TerminalError,
        UnsafePermissions,
        NotRegularFile,
        EnrolmentRefused,
        LeaderFailed,
        CertificateExpired,
    )
}


def answer_for(exc: Exception) -> dict[str, Any]:
    """``exc`` as a child answers it (``{"error": answer_for(exc)}``)."""
    if isinstance(exc, PKIError):
        return {"type": "PKIError", "reason": exc.reason.value, "detail": exc.detail}
    if isinstance(exc, OSError):
        return {
            "type": "OSError",
            "errno": exc.errno,
            "strerror": exc.strerror,
            "filename": None if exc.filename is None else str(exc.filename),
            "message": str(exc),
        }
    if isinstance(exc, ConfigError):
        return {
            "type": "ConfigError",
            "path": str(exc.path),
            "key": exc.key,
            "problem": exc.problem,
            "message": str(exc),
        }
    if isinstance(exc, PinNotShown):  # retried, and past the patience its refusal (exit 2)
        return {
            "type": "PinNotShown",
            "path": str(exc.refusal.path),
            "key": exc.refusal.key,
            "problem": exc.refusal.problem,
            "pins": list(exc.pins),
            "hint": exc.hint,
            "message": str(exc),
        }
    if isinstance(exc, EnrolmentDeferred):
        return {"type": "EnrolmentDeferred", "message": str(exc), "retry_after": exc.retry_after}
    # The nearest class the agent rebuilds (a LocalResourceError stays one, a TransientError of
    # another kind stays transient); anything else is terminal.
    kind = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in ERRORS), "TerminalError")
    return {"type": kind, "message": str(exc)}
