"""Web viewer pages open during a benchmark's rollout (``bench.simagents --viewers K``).

A person watching the page during a rollout is the normal case: this signs in the way the tests
do (``tlsroll viewer grant``, the link's sign-in URL, the session cookie), then a separate
process (``python -m bench.viewer --watch SPEC``, so its work is not the bench's) keeps ``K``
live streams (``GET /events``) open and reads them to the end, counting what each was sent:
bytes and events by kind. ``fetch_page`` times one ``GET /`` (first byte, whole page, size).
Prints nothing itself; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster import Cluster
from tlsroll.tls import client_context

VIEWER_PORT = 9444
SESSION_COOKIE = "__Host-tlsroll-viewer"


def sign_in(cluster: Cluster, name: str = "bench") -> str:
    """A viewer session for the bench: the cookie's value."""
    result = cluster.cli("viewer", "grant", "--name", name, "--ttl", "1h")
    if result.returncode != 0:
        raise RuntimeError(f"viewer grant: {result.stderr.strip()}")
    path = "/" + result.stdout.strip().split("/", 3)[3] + "/open"
    conn = http.client.HTTPSConnection(
        cluster.address, VIEWER_PORT, timeout=30, context=client_context(cluster.ca_pem)
    )
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        reply.read()
        found = re.search(rf"{SESSION_COOKIE}=([^;]+)", reply.getheader("Set-Cookie") or "")
    finally:
        conn.close()
    if reply.status != 303 or found is None:
        raise RuntimeError(f"viewer sign-in: {reply.status}")
    return found.group(1)


@dataclass(frozen=True)
class Page:
    first_byte: float  # s from the request until the status line
    whole: float  # s until the last byte
    size: int  # bytes of the body


def fetch_page(cluster: Cluster, cookie: str, path: str = "/") -> Page:
    conn = http.client.HTTPSConnection(
        cluster.address, VIEWER_PORT, timeout=60, context=client_context(cluster.ca_pem)
    )
    try:
        conn.connect()
        t0 = time.monotonic()
        conn.request("GET", path, headers={"Cookie": f"{SESSION_COOKIE}={cookie}"})
        reply = conn.getresponse()
        t1 = time.monotonic()
        body = reply.read()
        t2 = time.monotonic()
    finally:
        conn.close()
    if reply.status != 200:
        raise RuntimeError(f"GET {path}: {reply.status}")
    return Page(t1 - t0, t2 - t0, len(body))


@dataclass
class Stream:
    """What one live page was sent: before the mark (its first view) and after."""

    first: int = 0  # bytes up to and with its first event
    bytes: int = 0  # bytes after that
    events: dict[str, int] = field(default_factory=dict)  # after the first, by kind
    largest: int = 0  # the largest event after the first (bytes)


class Watchers:
    """``k`` live pages in a child process, from ``start`` until ``stop`` (their counts)."""

    def __init__(self, cluster: Cluster, cookie: str, k: int, root: Path) -> None:
        self.spec = root / "viewers.json"
        self.spec.write_text(
            json.dumps(
                {
                    "address": cluster.address,
                    "ca": cluster.ca_pem.decode("ascii"),
                    "cookie": cookie,
                    "k": k,
                }
            )
        )
        self.log = root / "viewers.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 120.0) -> float:
        """Every page open and shown once: the seconds that took."""
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.viewer", "--watch", str(self.spec)],
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"viewers did not start: {self.log.read_text()[-2000:]}")
        return time.monotonic() - t0

    def stop(self) -> list[Stream]:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.stdout.read()
        self.proc.wait(30)
        return [Stream(**s) for s in json.loads(out)]


async def _watch(spec: dict[str, Any]) -> list[Stream]:
    import aiohttp  # noqa: PLC0415 - only the child needs it

    streams = [Stream() for _ in range(spec["k"])]
    ready = [asyncio.Event() for _ in streams]
    ctx = client_context(spec["ca"].encode("ascii"))
    url = f"https://{spec['address']}:{VIEWER_PORT}/events?lang=de"
    headers = {"Cookie": f"{SESSION_COOKIE}={spec['cookie']}"}

    async def one(s: Stream, shown: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers=headers, ssl=ctx) as reply,
        ):
            kind, size = "", 0
            async for line in reply.content:
                size += len(line)
                if line.startswith(b"event: "):
                    kind = line[7:].strip().decode()
                elif line in (b"\n", b"\r\n"):
                    if not shown.is_set():
                        s.first += size
                        if kind:
                            shown.set()
                    else:
                        s.bytes += size
                        if kind:
                            s.events[kind] = s.events.get(kind, 0) + 1
                            s.largest = max(s.largest, size)
                    kind, size = "", 0

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(one(s, e)) for s, e in zip(streams, ready, strict=True)]
    shown = asyncio.gather(*(e.wait() for e in ready))
    waiting: list[asyncio.Future[Any]] = [shown, *tasks]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED, timeout=300)
    if shown not in done:
        raise RuntimeError(f"a stream ended or none was shown in time: {done!r}")
    print("ready", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    return streams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watch", type=Path, required=True, help="the spec (Watchers writes it)")
    ns = parser.parse_args(argv)
    streams = asyncio.run(_watch(json.loads(ns.watch.read_text())))
    print(json.dumps([s.__dict__ for s in streams]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
