"""What gRPC for Python costs by itself on this machine: the floor under the leader's figures.

    python -m bench.grpc_floor                 # 50 connections, a 5 s interval, 30 s windows
    python -m bench.grpc_floor --clients 500 --seconds 20

A bare ``grpc.aio`` server (no tlsroll code: a counting stream handler and an echo call) in one
process and its clients in another, over mutual TLS with P-256 certificates as tlsroll's, on a
loopback address. Each window measures both processes' CPU from ``/proc/PID/task/*/schedstat``
(every thread, to the nanosecond) and divides it by what happened in the window:

- ``idle``: the server alone, then with the connections open, each with one quiet stream (what
  the server costs per second with nothing to do, and what each quiet connection adds);
- ``message``: each stream sends a small message every interval, spread evenly (as agents in
  renewal mode, only more often): server CPU per message, less the idle rate;
- ``ping``: no message; the server PINGs each connection every interval (the leader's
  keepalive): server CPU per PING, less the idle rate, the PINGs counted in a window of their
  own with gRPC's keepalive trace on (the trace's logging costs CPU, so not in the same window);
- ``call``: unary calls one after the other on one open channel: CPU per call on each side;
- ``channel``: a new channel, its TLS handshake and one unary call, one after the other: CPU
  per channel on each side (the leader is the client when it calls an agent).

Each window also counts the server's context switches (voluntary and not, every thread): what
wakes gRPC's threads, a count the machine's load does not move as much as CPU time.

``--env NAME=VALUE`` (the server process's environment, e.g. ``GRPC_EXPERIMENTS`` or
``GRPC_POLL_STRATEGY``), ``--client-env NAME=VALUE`` (the clients') and ``--option NAME=INT``
(a server channel argument) try gRPC's runtime settings; ``--modes message`` measures only the
idle and message windows (a quick A/B of a setting).

The issue 15 goals (a heartbeat at most 0.3 ms of leader CPU per agent and interval, 10 ms of
leader CPU per node of a rollout) are read against these: what gRPC costs a message, a PING,
a call and a channel before tlsroll does anything. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tlsroll import pki

ADDRESS = "127.0.0.77"
SERVICE = "floor.F"
NAME = "floor.test"


def make_certificates(directory: Path) -> None:
    """A CA and two leaf certificates (server, client) for ``NAME``, made as tlsroll makes
    its own (``tlsroll.pki``: P-256, the cluster CA's builder)."""
    ca = pki.CertificateAuthority.create("floor CA")
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    for who in ("server", "client"):
        key = pki.generate_key()
        cert = ca.issue(key.public_key(), pki.Names(who, dns=(NAME,)), server=True, client=True)
        (directory / f"{who}.pem").write_bytes(pki.cert_to_pem(cert))
        pki.write_key(directory / f"{who}.key", key)


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far, every thread (``schedstat``: nanoseconds)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def switches(pid: int) -> int:
    """The process's context switches so far, voluntary and not, every thread."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


# --- the two processes --------------------------------------------------------------------------


async def serve(directory: Path, ping_ms: int, extra: list[tuple[str, int]]) -> None:
    """The server: counts stream messages (``count`` file, every 0.2 s), echoes unary calls."""
    count = 0

    async def stream(requests: object, context: Any) -> object:
        nonlocal count
        async for _ in requests:  # type: ignore[attr-defined]
            count += 1
        yield b""

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    options = [("grpc.http2.bdp_probe", 0)]
    if ping_ms:
        options += [
            ("grpc.keepalive_time_ms", ping_ms),
            ("grpc.keepalive_timeout_ms", ping_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    server = grpc.aio.server(options=options + extra)
    handlers = {
        "S": grpc.stream_stream_rpc_method_handler(stream),
        "U": grpc.unary_unary_rpc_method_handler(echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    creds = grpc.ssl_server_credentials(
        [((directory / "server.key").read_bytes(), (directory / "server.pem").read_bytes())],
        root_certificates=(directory / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port(f"{ADDRESS}:0", creds)
    await server.start()
    (directory / "port").write_text(str(port))
    told = -1
    while True:  # the count, when it changed (a quiet server stays quiet)
        if count != told:
            (directory / "count.tmp").write_text(str(count))
            os.replace(directory / "count.tmp", directory / "count")
            told = count
        await asyncio.sleep(0.2)


def channel(directory: Path, port: int) -> Any:
    """A client channel to the server (typed loosely: raw bytes, no serializers)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=(directory / "ca.pem").read_bytes(),
        private_key=(directory / "client.key").read_bytes(),
        certificate_chain=(directory / "client.pem").read_bytes(),
    )
    return grpc.aio.secure_channel(
        f"{ADDRESS}:{port}",
        creds,
        options=[("grpc.ssl_target_name_override", NAME), ("grpc.http2.bdp_probe", 0)],
    )


async def clients(directory: Path, port: int, mode: str, n: int, interval: float) -> None:
    """The clients: ``n`` channels with a stream each (quiet, or a message every
    ``interval``), or one call/channel after the other; counts in the ``done`` file."""
    done = 0

    def tell() -> None:
        (directory / "done.tmp").write_text(str(done))
        os.replace(directory / "done.tmp", directory / "done")

    if mode in ("call", "channel"):
        kept = channel(directory, port)
        while True:
            ch = kept if mode == "call" else channel(directory, port)
            await ch.unary_unary(f"/{SERVICE}/U")(b"x" * 100, timeout=10)
            if mode == "channel":
                await ch.close()
            done += 1
            if done % 10 == 0:
                tell()
    if mode == "alone":  # no connection at all: the server's own timers
        tell()
        await asyncio.Event().wait()
    channels = [channel(directory, port) for _ in range(n)]
    calls: list[Any] = [c.stream_stream(f"/{SERVICE}/S")() for c in channels]
    for call in calls:
        await call.write(b"x" * 200)  # every stream open before the window

    async def beat(call: Any, offset: float) -> None:
        await asyncio.sleep(offset)
        while True:
            await call.write(b"x" * 200)
            await asyncio.sleep(interval)

    tell()
    if mode == "message":
        await asyncio.gather(*(beat(c, i * interval / n) for i, c in enumerate(calls)))
    await asyncio.Event().wait()


# --- the parent: one window per figure ----------------------------------------------------------


@dataclass
class Window:
    server_s: float
    client_s: float
    events: int
    seconds: float
    server_switches: int


def _wait_for(path: Path, what: str, seconds: float = 60.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text()):
            return text
        time.sleep(0.05)
    raise SystemExit(f"grpc_floor: no {what} within {seconds:.0f} s")


def pings_sent(trace: Path) -> int:
    """The PINGs a server traced with ``GRPC_TRACE=http_keepalive`` logged having sent."""
    text = trace.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "SERVER" in line and "Ping" in line)


def measure(
    directory: Path, mode: str, args: argparse.Namespace, *, traced: bool = False
) -> Window:
    """Start the server and the clients for ``mode``, let them settle, measure one window.
    ``traced``: the server logs its keepalive PINGs, and the window's events are those it
    logged in the window (its CPU then includes the logging: count with it, never time)."""
    for name in ("port", "count", "done"):
        (directory / name).unlink(missing_ok=True)
    me = [sys.executable, "-m", "bench.grpc_floor"]
    ping_ms = int(args.interval * 1000) if mode == "ping" else 0
    env = dict(os.environ) | dict(args.env)
    trace = directory / "server.trace"
    if traced:
        env |= {"GRPC_VERBOSITY": "debug", "GRPC_TRACE": "http_keepalive"}
    server = subprocess.Popen(
        [
            *me,
            "--role",
            "server",
            "--dir",
            str(directory),
            "--ping-ms",
            str(ping_ms),
            *(f"--option={name}={value}" for name, value in args.option),
        ],
        env=env,
        stderr=trace.open("w") if traced else None,
    )
    client: subprocess.Popen[bytes] | None = None
    try:
        port = _wait_for(directory / "port", "server port")
        client = subprocess.Popen(
            [
                *me,
                "--role",
                "clients",
                "--dir",
                str(directory),
                "--port",
                port,
                "--mode",
                mode,
                "--clients",
                str(args.clients),
                "--interval",
                str(args.interval),
            ],
            env=dict(os.environ) | dict(args.client_env),
        )
        _wait_for(directory / "done", "clients")
        time.sleep(min(args.interval, 5.0) + 1.0)  # handshakes and first messages settle

        def counted() -> int:
            if traced:
                return pings_sent(trace)
            name = "count" if mode == "message" else "done"
            return int(_wait_for(directory / name, name))

        s0, c0, e0, t0, x0 = (
            cpu_seconds(server.pid),
            cpu_seconds(client.pid),
            counted(),
            time.monotonic(),
            switches(server.pid),
        )
        time.sleep(args.seconds)
        s1, c1, e1, t1, x1 = (
            cpu_seconds(server.pid),
            cpu_seconds(client.pid),
            counted(),
            time.monotonic(),
            switches(server.pid),
        )
        return Window(s1 - s0, c1 - c0, e1 - e0, t1 - t0, x1 - x0)
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait()


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"NAME=VALUE expected, not {text!r}")
    return name, value


def _option(text: str) -> tuple[str, int]:
    name, value = _setting(text)
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer value expected: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="connections (idle/message/ping)")
    parser.add_argument("--interval", type=float, default=5.0, help="message/PING interval (s)")
    parser.add_argument("--seconds", type=float, default=30.0, help="each window (s)")
    parser.add_argument("--role", choices=["parent", "server", "clients"], default="parent")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ping-ms", type=int, default=0)
    parser.add_argument("--mode", default="idle")
    parser.add_argument(
        "--env",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="in the server's environment (e.g. GRPC_EXPERIMENTS=...); repeatable",
    )
    parser.add_argument(
        "--client-env",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="in the clients' environment; repeatable",
    )
    parser.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=INT",
        help="a server channel argument (e.g. grpc.http2.write_buffer_size=0); repeatable",
    )
    parser.add_argument(
        "--modes",
        default="message,ping,call,channel",
        help="windows after the idle one, comma-separated (default: all)",
    )
    args = parser.parse_args(argv)
    if args.role == "server":
        asyncio.run(serve(args.dir, args.ping_ms, args.option))
        return 0
    if args.role == "clients":
        asyncio.run(clients(args.dir, args.port, args.mode, args.clients, args.interval))
        return 0
    with tempfile.TemporaryDirectory(prefix="grpc-floor-") as tmp:
        directory = Path(tmp)
        make_certificates(directory)
        print(
            f"grpc {grpc.__version__}, mutual TLS (P-256), {args.clients} connections, "
            f"interval {args.interval:g} s, windows of {args.seconds:g} s, {os.cpu_count()} cores"
        )
        settings = [f"{k}={v}" for k, v in args.env] + [f"{k}={v}" for k, v in args.option]
        if args.client_env:
            settings += [f"clients: {k}={v}" for k, v in args.client_env]
        print(f"settings: {', '.join(settings) or 'none (gRPC defaults)'}")
        modes = [m for m in args.modes.split(",") if m]
        alone = measure(directory, "alone", args)
        alone_rate = alone.server_s / alone.seconds
        idle = measure(directory, "idle", args)
        idle_rate = idle.server_s / idle.seconds
        per = (idle_rate - alone_rate) / args.clients * args.interval * 1000
        idle_switching = idle.server_switches / idle.seconds
        print(
            f"idle      server {alone_rate * 1000:.2f} ms/s with no connection, "
            f"{idle_rate * 1000:.2f} with {args.clients} quiet streams "
            f"({per:.3f} ms per connection and interval); context switches "
            f"{alone.server_switches / alone.seconds:.1f}/s and {idle_switching:.1f}/s"
        )
        # PINGs: counted in a window of their own with the server's keepalive trace on (the
        # trace's logging costs CPU), as a rate for the untraced window that measures the CPU.
        ping_rate = 0.0
        if "ping" in modes:
            calibration = measure(directory, "ping", args, traced=True)
            ping_rate = calibration.events / calibration.seconds
            expected = args.clients / args.interval
            print(
                f"PINGs     {ping_rate:.1f}/s counted in a traced window "
                f"({expected:.1f}/s expected: one per connection and interval)"
            )
        for mode in modes:
            if mode == "ping" and ping_rate == 0:  # a window shorter than the interval
                print("ping      none counted: make --seconds longer than --interval")
                continue
            w = measure(directory, mode, args)
            # PINGs: at the rate the traced window counted.
            events = ping_rate * w.seconds if mode == "ping" else max(w.events, 1)
            quiet = mode in ("message", "ping")
            net = w.server_s - (idle_rate * w.seconds if quiet else 0)
            woke = w.server_switches - (idle_switching * w.seconds if quiet else 0)
            line = f"{mode:9} server {net / events * 1000:.3f} ms each"
            line += f", {woke / events:.1f} context switches each"
            if mode in ("message", "call", "channel"):
                line += f", client {w.client_s / events * 1000:.3f} ms each"
            line += f" ({events:.0f} in {w.seconds:.0f} s)"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
