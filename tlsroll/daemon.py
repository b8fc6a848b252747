"""What every tlsroll daemon does the same way: signals, graceful stop, sd_notify."""

from __future__ import annotations

import asyncio
import os
import signal
import socket


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd if ``NOTIFY_SOCKET`` is set; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def stop_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT; must be called inside the running loop."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def watchdog() -> None:
    """Ping systemd's watchdog (``WatchdogSec=``) at half its interval, while the loop lives.

    A daemon whose event loop hangs stops pinging, and systemd restarts it.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return
    if usec <= 0 or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2_000_000)
