"""What a daemon keeps out of its process (imports nothing itself, so it can run first).

The daemons log JSON lines (``tlsroll.logs``) and never draw on a terminal, but structlog
imports rich whenever it is installed (for pretty tracebacks in its console renderer), and rich
brings pygments: about 6 MiB of memory and 100 ms of start-up in every agent, which runs on
every node for months. ``keep_out`` makes those imports fail (a ``None`` entry in
``sys.modules`` is Python's documented way to say "not available"), so structlog falls back to
its plain renderer and tracebacks. Call it first in a daemon's ``main``, before anything
imports structlog; a process that already imported rich (the admin CLI, a test run) keeps it.

A server that starts inside every switch's freeze window (the reference server) also keeps out
aiohttp's client (``import_aiohttp_web``), and the garbage collector while it imports
(``importing``).
"""

from __future__ import annotations

import contextlib
import gc
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


AIOHTTP_VERSION = r'(?m)^__version__ = "([^"\\]+)"$'
"""The version line of ``aiohttp/__init__.py`` (its first line in every 3.x release)."""


def import_aiohttp_web() -> None:
    """Import ``aiohttp.web`` in a process that only serves, without ``aiohttp/__init__.py``.

    That file imports the whole client (sessions, connector, cookie jar, tracing, digest auth,
    resolver, form data, happy eyeballs): 17 of the 59 modules aiohttp and its dependencies
    load (3.14), and 15-20 ms of CPU in every start of the reference server, inside every
    switch's freeze window (issue 15), for a client it never uses. The package is put into
    ``sys.modules`` as the import system would make it (``importlib.util.module_from_spec``:
    its ``__path__``, its spec) but without running its ``__init__``, with the one name its
    server's modules take from it (``__version__``, which ``aiohttp.http`` puts in the
    ``Server`` header), read from that file; ``aiohttp.web`` and what it needs are then
    imported as usual. Where that cannot be done (a release without that version line, or
    whose server modules take more from the package, or a file that cannot be read: a
    package in a zip) the package is imported whole, as before: never a start that fails for
    it. A process that holds aiohttp already keeps it. Imports nothing else of aiohttp's (so
    may run before structlog, ``keep_out``): the caller imports its server after it."""
    import importlib  # noqa: PLC0415 - a server's start only (the lean crypto worker imports lean)

    if "aiohttp" not in sys.modules:
        with contextlib.suppress(ImportError, AttributeError, OSError):
            _import_web_alone()
            return
        for name in [n for n in sys.modules if n == "aiohttp" or n.startswith("aiohttp.")]:
            del sys.modules[name]  # a half-made package: imported whole below, from scratch
    importlib.import_module("aiohttp.web")


def _import_web_alone() -> None:
    import importlib.util  # noqa: PLC0415 - as in import_aiohttp_web
    import re  # noqa: PLC0415 - as in import_aiohttp_web

    spec = importlib.util.find_spec("aiohttp")
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        raise ImportError("aiohttp is not a package here")
    with open(spec.origin, encoding="utf-8", errors="replace") as f:
        found = re.search(AIOHTTP_VERSION, f.read())
    if found is None:
        raise ImportError("no __version__ line in aiohttp/__init__.py")
    package = importlib.util.module_from_spec(spec)
    package.__dict__["__version__"] = found.group(1)
    sys.modules["aiohttp"] = package
    importlib.import_module("aiohttp.web")


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """Import a daemon's modules inside it: no garbage collection while inside, and what was
    made by then is left out of every later one. Importing makes objects by the hundred
    thousand (functions, classes, code) and frees almost none of them, so the collections
    that making them set off (one per 700 new objects, the older generations now and then)
    find nothing to free: some 90 collections, about 11 ms of CPU in every start of the
    reference server, inside every switch's freeze window (issue 15). ``gc.freeze`` on the
    way out moves them all to the permanent generation, where no collection looks: else the
    first collection after it would go through all of them at once, and every full one after
    it again. The few cycles that the imports left unreachable are kept (freed only when the
    process ends). A collector switched off before stays off. For a process's start only:
    never in a test run's own process."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
