"""What a daemon keeps out of its process (imports nothing itself, so it can run first).

The daemons log JSON lines (``tlsroll.logs``) and never draw on a terminal, but structlog
imports rich whenever it is installed (for pretty tracebacks in its console renderer), and rich
brings pygments: about 6 MiB of memory and 100 ms of start-up in every agent, which runs on
every node for months. ``keep_out`` makes those imports fail (a ``None`` entry in
``sys.modules`` is Python's documented way to say "not available"), so structlog falls back to
its plain renderer and tracebacks. Call it first in a daemon's ``main``, before anything
imports structlog; a process that already imported rich (the admin CLI, a test run) keeps it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

NOT_IN_DAEMONS = ("rich", "greenlet")
"""Packages a daemon never needs; pygments comes only through rich. structlog's deprecated
``threadlocal`` (imported by its ``__init__``) imports greenlet whenever it is installed (a
browser test tool brings it) for a context the daemons never use: about 0.14 MiB each."""


def keep_out(names: tuple[str, ...] = NOT_IN_DAEMONS) -> None:
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


SYSTEM_CA_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR")


@contextlib.contextmanager
def without_system_cas() -> Iterator[None]:
    """Import aiohttp inside it in a process that only serves: ``aiohttp.connector`` makes its
    client's two default TLS contexts as it is imported, each loading the system's CA bundle
    (about 0.17 s of CPU together on the project's machine, 144 certificates, in every start
    of the reference server: inside every switch's freeze window). Such a process never makes
    a client connection with them. OpenSSL reads ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` as a
    context loads the default paths; both name nothing while inside, and are put back as they
    were on the way out, so that every context made after it loads the system's store as
    before. Only where no other thread runs (the environment is the process's): a daemon's
    start, before it serves."""
    saved = {name: os.environ.get(name) for name in SYSTEM_CA_ENV}
    for name in SYSTEM_CA_ENV:
        os.environ[name] = os.devnull  # (no certificates: a file with none, not a directory)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
