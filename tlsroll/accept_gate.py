"""How many connections a listener open to the practice's network holds, counted from the accept.

The agent's bootstrap listener (``nodeagent.json_https``) and the leader's web viewer
(``leader.viewer.listener``) serve plain TCP servers whose connections start TLS themselves
(``loop.start_tls``), so that a connection is counted from the TCP accept: one still in its
TLS handshake, or one that never sends a ClientHello, holds a place and a descriptor too.

    gate = AcceptGate(max_connections=128, on_refused=log_refusals)
    server = await loop.create_server(lambda: Accepted(on_accept), ...)
    # in on_accept(transport):
    taken = gate.admit(transport, closing=stopping)   # None: refused and aborted already
    ...
    gate.release(taken.source)                        # once its descriptor is gone

Past ``max_per_source`` (a quarter, at least 2) from one source, a new connection is closed
at once (a reset: nothing is read or written). A source is an IPv4 address, or an IPv6 /64
(``tlsroll.backoff.source_key``): one host can use a whole /64. The share per source keeps
one address from taking every place; it does not stop one host with several addresses (four
IPv4 addresses of one PC fill a table of 128): on a LAN any host can take more addresses,
which no count by address can tell from more hosts. So when all ``max_connections`` places
are taken, a connection from a source that holds fewer than the source holding the most
(less one) takes the place of one of that source's connections that is still in its TLS
handshake or idle (``evict``: the listener knows which are); without one, it is closed at
once. A host with many addresses can then churn its own connections but not keep a
workstation that holds one or none out. Refusals are logged once per
``REFUSAL_LOG_SECONDS`` at most (a flood must not fill the log).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from tlsroll.backoff import source_key

Refused = Callable[[str, str, int], None]
"""``on_refused(remote, limit, refused)``: the listener's log line for refused connections."""

REFUSAL_LOG_SECONDS = 10.0


def per_source(max_connections: int) -> int:
    """How many of ``max_connections`` one source may hold at once."""
    return max(2, max_connections // 4)


@dataclass(frozen=True)
class Taken:
    """A connection admitted: the client's address and the source it counts against."""

    remote: str
    source: str


class AcceptGate:
    """The count of a listener's open connections, in all and per source."""

    def __init__(self, max_connections: int, *, on_refused: Refused) -> None:
        self.max_connections = max_connections
        self.max_per_source = per_source(max_connections)
        # Logs refusals (its caller's line, a literal name: tests/test_layout.py), at most once
        # every REFUSAL_LOG_SECONDS: (remote, limit, refused since the last line).
        self.on_refused = on_refused
        self.total = 0
        self.sources: collections.Counter[str] = collections.Counter()  # open, per source
        self._refused = 0  # connections refused since the last log line about it
        self._refused_logged = -REFUSAL_LOG_SECONDS

    def admit(
        self,
        transport: asyncio.Transport,
        *,
        closing: bool,
        evict: Callable[[str], bool] | None = None,
    ) -> Taken | None:
        """Count a connection just accepted, or abort it at once (None). ``evict(source)``
        ends one of ``source``'s connections still in its handshake or idle, if it has one
        (True); it is asked when every place is taken (see the module's docstring)."""
        peer = transport.get_extra_info("peername")
        remote = str(peer[0]) if peer else ""
        source = source_key(remote)
        refusal = self.refusal(closing=closing, open_from_source=self.sources[source])
        if refusal == "max_connections" and evict is not None and self.sources:
            top, held = self.sources.most_common(1)[0]
            if self.sources[source] + 1 < held and evict(top):
                refusal = None  # (the evicted one gives its place back as it ends)
        if refusal is not None:
            transport.abort()
            if refusal != "stopped":
                self._note_refusal(remote, refusal)
            return None
        self.sources[source] += 1
        self.total += 1
        return Taken(remote, source)

    def release(self, source: str) -> None:
        """A connection admitted is gone (its descriptor closed)."""
        self.total = max(0, self.total - 1)
        self.sources[source] -= 1
        if self.sources[source] <= 0:
            del self.sources[source]

    def clear(self) -> None:
        self.total = 0
        self.sources.clear()

    def refusal(self, *, closing: bool, open_from_source: int) -> str | None:
        """Why a connection just accepted is closed at once (None: it is served)."""
        if closing:
            return "stopped"
        if self.total >= self.max_connections:
            return "max_connections"
        if open_from_source >= self.max_per_source:
            return "max_per_source"
        return None

    def _note_refusal(self, remote: str, limit: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= REFUSAL_LOG_SECONDS:
            self.on_refused(remote, limit, self._refused)
            self._refused, self._refused_logged = 0, now


class Accepted(asyncio.Protocol):
    """A TCP connection between its accept and ``start_tls``, which takes it over: it reads
    nothing (the ClientHello is TLS's to read) and hands the transport to ``on_accept``."""

    def __init__(self, on_accept: Callable[[asyncio.Transport], None]) -> None:
        self.on_accept = on_accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.on_accept(transport)
