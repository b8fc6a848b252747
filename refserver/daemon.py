"""``tlsroll-refserver`` and ``python -m refserver``: the reference server's entry point.

The node agent's reference driver starts the server at every restart, inside the switch's
freeze window, so what it imports is paid at every switch: first ``tlsroll.lean.keep_out()``
(structlog would import rich and pygments merely because they are installed: about 40 ms of
CPU per start, and 4 MiB), then the server itself (``refserver.server``): with no garbage
collection while it is imported (``tlsroll.lean.importing``: about 11 ms), with aiohttp's server
imported without its client (``tlsroll.lean.import_aiohttp_web``: 15-20 ms), and with the
client's default TLS contexts, should aiohttp have to be imported whole, kept from loading the
system's CA bundle, which the server never uses (``tlsroll.lean.without_system_cas``: about
0.12–0.17 s of CPU per start). Nothing else is imported here, so ``keep_out`` runs before
structlog.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from tlsroll import lean


def load() -> Callable[[], NoReturn]:
    """The server's ``run``, imported as the docstring says."""
    lean.keep_out()
    with lean.importing(), lean.without_system_cas():
        lean.import_aiohttp_web()
        from refserver.server import run  # noqa: PLC0415 - only after keep_out (see the docstring)
    return run


def main() -> NoReturn:
    load()()
