"""Which code a tlsroll-leader runs, as its admin socket tells the ``tlsroll`` command.

After an upgrade the package on disk is new while a leader started before it still runs the old
code (``install.sh`` does not restart it). A newer CLI's request fields are then dropped by the
older leader without a word: ``rollout start --strategy transitional`` became a direct switch
(upgrade audit s35 F2). So the leader puts its version and its contract revision in the initial
metadata of every reply on its admin socket (``leader.admin_socket``), and the CLI compares them
with its own before any call that changes something (``leader.cli.base.Leader``).

The contract revision changes whenever the gRPC contract does: a short hash of the generated
modules' serialized file descriptors (``computed``): what the leader announces, and what the
CLI compares before a change. For the warning of a read-only command the CLI reads the literal
``REVISION`` instead, because importing every generated module would cost ``schema show`` some
45 ms (its goal is 150 ms); ``tests/test_cli_skew.py`` keeps the literal equal to the computed
value, and says the new value when the contract changed (a stale literal would only warn).

Nothing is imported here beyond the standard library until ``computed`` runs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from tlsroll import __version__

VERSION_KEY = "x-tlsroll-version"
REVISION_KEY = "x-tlsroll-contract"
"""The initial-metadata keys the leader's admin socket answers with (gRPC metadata keys are
lower case)."""

REVISION = "b820c581d2e7"
"""``computed()`` of this tree's contract (a test keeps it so): what this CLI speaks."""


@functools.cache
def computed() -> str:
    """The contract revision: the first 12 hex digits of a SHA-256 over every generated
    ``tlsroll.v1.*_pb2`` module's serialized file descriptor, in module name order."""
    # only the leader and the tests compute it: none of this for the CLI
    import hashlib  # noqa: PLC0415
    import importlib  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    import tlsroll.v1 as package  # noqa: PLC0415

    digest = hashlib.sha256()
    names = sorted(
        m.name for m in pkgutil.iter_modules(package.__path__) if m.name.endswith("_pb2")
    )
    for name in names:
        module = importlib.import_module(f"{package.__name__}.{name}")
        serialized: bytes = module.DESCRIPTOR.serialized_pb
        digest.update(name.encode() + b"\0" + len(serialized).to_bytes(8, "big") + serialized)
    return digest.hexdigest()[:12]


def announced() -> tuple[tuple[str, str], ...]:
    """The leader's initial metadata: its version and its contract revision."""
    return ((VERSION_KEY, __version__), (REVISION_KEY, computed()))


def mismatch(metadata: Mapping[str, str] | None, revision: str) -> str | None:
    """None if a reply's metadata names this code (this version and contract ``revision``:
    ``REVISION`` or ``computed()``); else what differs, in words, for the CLI's message."""
    metadata = metadata or {}
    theirs = (metadata.get(VERSION_KEY), metadata.get(REVISION_KEY))
    if theirs == (__version__, revision):
        return None
    ours = f"this tlsroll is {__version__}, contract {revision}"
    if theirs == (None, None):
        return f"the leader does not say which it runs, so it is older; {ours}"
    return f"the leader runs {theirs[0] or '?'}, contract {theirs[1] or '?'}; {ours}"
