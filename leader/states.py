"""Two closed sets the wire names that live outside the pure core: a node's health at
``tlsroll nodes --check`` (``leader.node_check``) and a viewer grant's state
(``leader.viewer.grants``).

They are defined here, apart from the code that decides them, because ``leader.wire`` needs
them for its codecs and every admin command imports ``leader.wire``: naming them must not
import the node check's TLS code (cryptography) nor the viewer's store.
"""

from __future__ import annotations

from enum import StrEnum


class Health(StrEnum):
    SERVING = "serving"
    NOT_SERVING = "not-serving"  # answered, but not SERVING (or refused the call)
    UNREACHABLE = "unreachable"  # no answer in time, or the TLS handshake failed


class GrantState(StrEnum):
    UNUSED = "unused"  # the link has not been opened yet
    ACTIVE = "active"  # opened: a browser holds its session
    EXPIRED = "expired"
    REVOKED = "revoked"
