"""The viewer's accept gate: how many connections the LAN may hold in the leader, and for how long.

The viewer shares the leader's process (and its descriptors) with the agents' gRPC and the
admin socket, and its port is open to every host of the practice's network, signed in or not.
So no host may hold connections there without bound (audit s38 M1: a thousand idle TLS
connections took the leader's descriptors; with a low limit the admin socket hung):

- at most ``max_connections`` open at once, counted from the TCP accept, and a quarter of them
  per source (``tlsroll.accept_gate``, as the agent's bootstrap listener counts); more are
  closed at once, so the rest of the leader goes on. (Unlike the bootstrap listener, nothing
  is evicted for a newcomer: a host with four addresses can fill the viewer, not the leader,
  for as long as it keeps its connections busy or renews them);
- ``handshake_timeout`` for the TLS handshake (a connection that never sends a ClientHello);
- ``head_timeout`` for the first request's head, from the hand-over to aiohttp (a client that
  sends nothing after its handshake, or its headers a line at a time): ours, since only recent
  aiohttp starts its ``keepalive_timeout`` as a connection is made (review s38 M2); from each
  answer on, aiohttp's ``keepalive_timeout`` (``Viewer``'s ``HEAD_SECONDS``) bounds the next;
- ``write_timeout`` for a write that cannot go on (a client that reads no more of an answer
  or of an /events stream: the socket's buffers are full), after which the connection is
  aborted;
- ``close_timeout`` for TLS's close (a client that never answers close_notify), after which
  the connection is aborted: its descriptor is gone and its place free.

An /events stream is a connection like any other and counts here (the app caps them too).

The listener is a plain TCP server on the viewer's socket; each connection starts TLS itself
(``loop.start_tls``) and is then handed to aiohttp's request handler (``factory``), which sees
it as ``web.SockSite`` would have given it (``tlsroll.gated_listener``, as the reference
server's public listeners are served; the limits here are the viewer's).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from tlsroll import gated_listener, logs
from tlsroll.gated_listener import Handed as _Handed

__all__ = ["GatedListener", "Limits", "_Handed"]

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class Limits(gated_listener.Limits):
    max_connections: int = 64
    handshake_timeout: float = 10.0
    write_timeout: float | None = 30.0
    close_timeout: float = 5.0
    head_timeout: float = 15.0


class GatedListener(gated_listener.GatedListener):
    """Serves aiohttp's handlers (``factory``) over TLS on a listening socket, gated."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        limits: Limits | None = None,
        *,
        backlog: int = 128,
    ) -> None:
        limits = limits or Limits()
        super().__init__(
            factory,
            limits,
            on_refused=_refused,
            on_failed=_failed,
            grace=limits.close_timeout,  # TLS's close of what aiohttp's cleanup left, first
        )
        self.context = context
        self.backlog = backlog

    async def start(self, sock: socket.socket) -> None:
        """Serve on ``sock`` (listening already); the listener owns it from here on."""
        await self.listen(self.context, backlog=self.backlog, sock=sock)


def _failed(error: str) -> None:
    log.error(
        "viewer.connection_failed",
        error=error,
        hint="that connection ended; a bug in tlsroll: report it with the lines before this one",
    )


def _refused(remote: str, limit: str, refused: int) -> None:
    log.warning(
        "viewer.too_many_connections",
        remote=remote,
        limit=limit,
        refused=refused,
        hint="too many open viewer connections: close viewer tabs not in use; if no one is using"
        " it, someone may be flooding the viewer's port",
    )
