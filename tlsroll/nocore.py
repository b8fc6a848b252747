"""No core file of this process, nor of the children it starts (imports ``resource`` alone, so
that the ``tlsroll`` command can call it first, before its command's modules)."""

from __future__ import annotations

import contextlib
import resource


def no_core_dumps() -> None:
    """Soft and hard ``RLIMIT_CORE`` 0 (never raised again); a failure is ignored. A daemon's
    memory holds what must not end up on disk or in a support bundle (the agent's password
    verifier and SPAKE2 blinding points, as good as the password; a node's key; the leader's
    decrypted CA key), and so does a command's: ``tlsroll init`` makes the CA key, ``password
    set`` reads the auth password, ``token create`` and ``viewer grant`` hold secrets they
    print once, ``client test-connection`` the password and a workstation's key. The units'
    ``LimitCORE=0`` covers only a daemon started by systemd; a shell may allow core files."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
