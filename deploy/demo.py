"""``make demo``: the main job on its embedded default, on this machine, end to end.

A leader and three nodes on 127.0.10.1–3, each node with the seed's ports (a reference server
on http 8080 serving /praxis_live/, an agent). A client keeps writing entries to every node the
whole time. Then ``tlsroll rollout start --scope cluster --yes`` switches the multiserver to
https, the live schema is shown, and every node is checked from outside: https on 8443 with a
certificate from the cluster CA that meets the PKI rules, 8080 closed, every acknowledged entry
still there. Prints the new addresses and a one-line verdict, cleans up, and exits non-zero if
any check failed.

    python deploy/demo.py [--addresses A,B,C] [--workdir DIR] [--report FILE] [--keep]
                          [--strategy direct|transitional]

``--strategy transitional`` (issue 12): two workstations write to every node, each from a
loopback address of its own and naming itself (``X-Tlsroll-Workstation``). Phase 1 makes every
node serve https beside http; one workstation per node then moves to https, the other stays.
``tlsroll schema show`` and ``tlsroll notify --remaining`` show who is still on http;
``tlsroll rollout finalize`` is refused naming the ones that stayed; they move; finalize closes
http. ``make demo`` stays the direct switch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import http.client
import json
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tlsroll import httpcheck, pki, tls
from tlsroll.config import dump_toml

ADDRESSES = ("127.0.10.1", "127.0.10.2", "127.0.10.3")
APP = "/praxis_live/"
HTTP_PORT, HTTPS_PORT = 8080, 8443
WAIT = 30.0
CLI_POLL = 1.0
"""Seconds between two looks that run ``tlsroll``: each is a process that starts and imports (a
few tenths of a second of CPU), and what they wait for (enrolment, the agents' reports of their
servers' clients) takes seconds; looked at every 0.1 s they took a core from the daemons."""
DEMO_PASSWORD = "demo-only-password-7q4k"  # noqa: S105 - the demo's throwaway cluster


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait_for(
    what: str, check: Callable[[], bool], timeout: float = WAIT, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise DemoError(f"timed out waiting for {what}")


class DemoError(Exception):
    pass


def port_open(address: str, port: int) -> bool:
    return httpcheck.port_open(address, port, timeout=1)


@dataclass
class Procs:
    """Every process the demo started, so that cleanup can stop them all."""

    workdir: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    pid_files: list[Path] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        with log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        self.procs.append((name, proc))

    def stop_all(self) -> None:
        # Servers the agents restarted are not our children: find them by their pid files.
        pids = []
        for pid_file in self.pid_files:
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pid_file.read_text()))
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for name, proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                print(f"   {name} did not stop in time; killing it")
                proc.kill()
                proc.wait(5)
        deadline = time.monotonic() + 10
        for pid in pids:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


class Cli:
    def __init__(self, data_dir: Path) -> None:
        self.env = {**os.environ, "TLSROLL_DATA_DIR": str(data_dir)}

    def run(self, *args: str, show: bool = True, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "tlsroll", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if show:
            print(f"$ tlsroll {shlex.join(args)}")  # (quoted: the line can be copied)
            sys.stdout.write(result.stdout)
        if check and result.returncode != 0:
            raise DemoError(f"tlsroll {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout


# --- the client that keeps writing ------------------------------------------------------------


@dataclass
class Writer:
    """Writes entries to every node all the time, as a practice's clients would, and records
    each acknowledged id. When a node stops answering http, it moves to https (trusting only
    the cluster CA, as a reconfigured workstation does)."""

    nodes: list[str]
    ca_pem: Callable[[], bytes]
    acked: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    scheme: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            for address in self.nodes:
                n += 1
                self._write(address, {"patient": f"demo-{n}", "note": "entry from the demo"})
            time.sleep(0.02)

    def _connect(self, address: str) -> http.client.HTTPConnection:
        if self.scheme.get(address, "http") == "https":
            ctx = tls.client_context(self.ca_pem())
            return http.client.HTTPSConnection(address, HTTPS_PORT, timeout=5, context=ctx)
        return http.client.HTTPConnection(address, HTTP_PORT, timeout=5)

    def _write(self, address: str, entry: dict[str, str]) -> None:
        conn = self._connect(address)
        try:
            conn.request(
                "POST", f"{APP}entries", json.dumps(entry), {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            body = resp.read()
        except (ConnectionRefusedError, ssl.SSLError, OSError):
            # http closed (switched) or the server restarting: try the other scheme next time.
            if port_open(address, HTTPS_PORT):
                self.scheme[address] = "https"
            time.sleep(0.05)
            return
        finally:
            conn.close()
        if resp.status == 201:
            self.acked.setdefault(address, []).append(json.loads(body)["id"])
        elif resp.status == 503:
            self.refused[address] = self.refused.get(address, 0) + 1


@dataclass
class Workstations:
    """Transitional demo: per node a workstation that moves to https after phase 1 and one
    that stays on http until told, each writing from its own loopback address (``sources``)
    and naming itself; acknowledged ids per node address, as ``Writer`` keeps them."""

    nodes: list[str]
    sources: dict[str, tuple[str, str]]  # node address -> (mover's, stayer's) source address
    ca_pem: Callable[[], bytes]
    acked: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    on_https: set[tuple[str, int]] = field(default_factory=set)  # (node address, 0|1)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def name(node: int, kind: int) -> str:
        return f"ws-{'empfang' if kind == 0 else 'labor'}-{node + 1}"

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            for i, address in enumerate(self.nodes):
                for kind in (0, 1):
                    n += 1
                    self._write(i, address, kind, {"patient": f"demo-{n}"})
            time.sleep(0.1)

    def _write(self, i: int, address: str, kind: int, entry: dict[str, str]) -> None:
        source = (self.sources[address][kind], 0)
        conn: http.client.HTTPConnection
        if (address, kind) in self.on_https:
            ctx = tls.client_context(self.ca_pem())
            conn = http.client.HTTPSConnection(
                address, HTTPS_PORT, timeout=5, context=ctx, source_address=source
            )
        else:
            conn = http.client.HTTPConnection(address, HTTP_PORT, timeout=5, source_address=source)
        headers = {"Content-Type": "application/json", "X-Tlsroll-Workstation": self.name(i, kind)}
        try:
            conn.request("POST", f"{APP}entries", json.dumps(entry), headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return  # the server restarting (inside its freeze window)
        finally:
            conn.close()
        with self.lock:
            if resp.status == 201:
                self.acked.setdefault(address, []).append(json.loads(body)["id"])
            elif resp.status == 503:
                self.refused[address] = self.refused.get(address, 0) + 1


# --- checks from outside ----------------------------------------------------------------------


def check_node(address: str, ca_pem: bytes, fingerprint: str, acked: list[str]) -> dict[str, Any]:
    """What a workstation would see, and whether every acknowledged entry is still there."""
    result: dict[str, Any] = {"address": address, "problems": []}
    problems: list[str] = result["problems"]
    try:
        view = httpcheck.fetch_https(address, HTTPS_PORT, APP, ca_pem, timeout=10)
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        problems.append(f"https on {HTTPS_PORT}: {exc}")
        return result
    result["tls_version"] = view.tls_version
    if view.status != 200:
        problems.append(f"{APP} answered {view.status}")
    cert = view.certificate
    result["certificate_pem"] = pki.cert_to_pem(cert).decode()
    problems += certificate_problems(cert, address)
    if fingerprint and pki.fingerprint(cert) != fingerprint:
        problems.append("served certificate is not the one in the schema")
    if port_open(address, HTTP_PORT):
        problems.append(f"port {HTTP_PORT} (plain http) still open")
    missing = [i for i in acked if not entry_present(address, ca_pem, i)]
    result.update(acked=len(acked), missing=missing)
    if missing:
        problems.append(f"{len(missing)} acknowledged entries missing")
    return result


def certificate_problems(cert: x509.Certificate, address: str) -> list[str]:
    """SPEC's PKI rules for a server certificate (Apple's rules for TLS server certs)."""
    problems = []
    names = pki.names_of(cert)
    if address not in names.ips:
        problems.append(f"SAN lacks {address}")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        problems.append("EKU lacks serverAuth")
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    if days > 398:
        problems.append(f"valid {days} days (> 398)")
    if pki.is_ca(cert):
        problems.append("is a CA certificate")
    if cert.signature_hash_algorithm is None or cert.signature_hash_algorithm.name != "sha256":
        problems.append("not signed with SHA-256")
    if cert.not_valid_before_utc > dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5):
        problems.append("NotBefore not backdated")
    return problems


def entry_present(address: str, ca_pem: bytes, entry_id: str) -> bool:
    try:
        return (
            httpcheck.fetch_https(address, HTTPS_PORT, f"{APP}entries/{entry_id}", ca_pem).status
            == 200
        )
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False


# --- the scenario -----------------------------------------------------------------------------


def set_up(work: Path, addresses: list[str], procs: Procs, cli: Cli) -> Path:
    data = work / "leader"
    say(f"initialise the multiserver: leader on {addresses[0]}")
    cli.run("init", "--data-dir", str(data), "--address", addresses[0], "--node-name", "node1")
    config = data / "leader.toml"
    config.write_text(
        config.read_text().replace("heartbeat_interval = 5", "heartbeat_interval = 1")
    )
    procs.start("leader", [sys.executable, "-m", "leader.daemon", "--config", str(config)])
    wait_for("the leader", (data / "run" / "admin.sock").exists)
    pin = json.loads(cli.run("ca", "show", "--json", show=False))["spki_pin"]
    print(f"   cluster CA pin {pin}")

    for i, address in enumerate(addresses, 1):
        name = f"node{i}"
        node = work / name
        (node / "server").mkdir(parents=True)
        # A Unix socket path holds at most 107 bytes; a temp dir keeps it short.
        sock_dir = Path(tempfile.mkdtemp(prefix="tlsroll-sock-"))
        procs.temp_dirs.append(sock_dir)
        server_cfg = node / "server" / "server.toml"
        server_cfg.write_text(
            dump_toml(
                {
                    "server": {
                        "address": address,
                        "app_path": APP,
                        "listen": ["http"],
                        "http_port": HTTP_PORT,
                        "https_port": HTTPS_PORT,
                        "data_dir": str(node / "server" / "data"),
                        "admin_socket": str(sock_dir / "admin.sock"),
                    }
                },
                "the practice's application server (the reference server)",
            )
        )
        procs.pid_files.append(node / "server" / "data" / "refserver.pid")
        procs.start(
            f"{name}-server",
            [sys.executable, "-m", "refserver", "--config", str(server_cfg)],
        )
        wait_for(
            f"{name}'s server on http://{address}:{HTTP_PORT}",
            functools.partial(port_open, address, HTTP_PORT),
        )
        token = cli.run(
            *("token", "create", "--node", name, "--address", address),
            *("--ttl", "10m", "--uses", "1"),
            show=False,
        ).strip()
        token_file = node / "join-token"
        token_file.touch(0o600)
        token_file.write_text(token + "\n")
        agent_cfg = node / "agent.toml"
        agent_cfg.write_text(
            dump_toml(
                {
                    "node": {"name": name, "addresses": [address]},
                    "leader": {
                        "address": addresses[0],
                        "ca_pin": pin,
                        "join_token_file": str(token_file),
                    },
                    "agent": {"data_dir": str(node / "agent"), "heartbeat_interval": 1},
                    # The agent reads its server's clients afresh every second (10 s by
                    # default), as it heartbeats: who is still on http follows the
                    # workstations' moves within seconds, not the two waits of up to 10 s
                    # each that the transitional run spent on them.
                    "server": {
                        "driver": "reference",
                        "config_file": str(server_cfg),
                        "clients_refresh": 1,
                    },
                }
            )
        )
        procs.start(
            f"{name}-agent", [sys.executable, "-m", "nodeagent.daemon", "--config", str(agent_cfg)]
        )
        print(
            f"   {name}: http://{address}:{HTTP_PORT}{APP}, agent enrolling with a one-time token"
        )

    def all_online() -> bool:
        nodes = json.loads(cli.run("nodes", "--json", show=False))
        return len(nodes) == len(addresses) and all(n["online"] for n in nodes)

    wait_for("every node to enrol and report in", all_online, interval=CLI_POLL)
    say("enrolled nodes")
    cli.run("nodes")
    return data


def still_on_http(cli: Cli) -> dict[str, list[str]]:
    """Per node, the workstation names the leader lists as still on http."""
    data = json.loads(cli.run("schema", "show", "--json", show=False))
    return {
        v["node"]: sorted(c["workstation"] or c["address"] for c in v.get("still_on_http", []))
        for v in data.get("node_clients", [])
    }


def transitional(
    cli: Cli, work: Path, addresses: list[str], password_file: Path, report: dict[str, Any]
) -> Workstations:
    """Phase 1, the workstations moving at their own pace, finalize refused, then done."""
    data = work / "leader"
    base = addresses[0].rsplit(".", 1)[0]
    sources = {  # two more loopback addresses per node, next to the demo's own
        a: (f"{base}.{100 + 2 * i}", f"{base}.{101 + 2 * i}") for i, a in enumerate(addresses)
    }
    ws = Workstations(addresses, sources, (data / "ca" / "ca.pem").read_bytes)  # the leader's CA
    thread = threading.Thread(target=ws.run, name="workstations", daemon=True)
    say("two workstations per node keep writing entries over http from now on")
    for i, a in enumerate(addresses):
        print(
            f"   node{i + 1}: {ws.name(i, 0)} ({sources[a][0]}), {ws.name(i, 1)} ({sources[a][1]})"
        )
    thread.start()
    time.sleep(1.0)
    try:
        say("phase 1: https beside http on every node (strategy transitional)")
        cli.run("plan", "--scope", "cluster", "--strategy", "transitional")
        cli.run(
            *("rollout", "start", "--scope", "cluster", "--strategy", "transitional"),
            *("--password-file", str(password_file), "--yes", "--wait"),
            timeout=400,
        )
        say(
            f"the {ws.name(0, 0).rsplit('-', 1)[0]} workstations do the client steps; the "
            f"{ws.name(0, 1).rsplit('-', 1)[0]} ones do not (yet)"
        )
        for a in addresses:
            ws.on_https.add((a, 0))
        stayers = {f"node{i + 1}": [ws.name(i, 1)] for i in range(len(addresses))}
        wait_for("the agents to report who is on which scheme",
                 lambda: still_on_http(cli) == stayers, 60, CLI_POLL)  # fmt: skip
        cli.run("schema", "show")
        cli.run("notify", "--remaining", "--lang", "en")
        say("finalize is refused while workstations still use http")
        refused = subprocess.run(
            [sys.executable, "-m", "tlsroll", "rollout", "finalize", "--yes"],
            env=cli.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        print(f"$ tlsroll rollout finalize --yes\n{refused.stderr.strip()}")
        named = all(n[0] in refused.stderr for n in stayers.values())
        report["finalize_refused"] = {"exit": refused.returncode, "names_the_stayers": named}
        if refused.returncode == 0 or not named:
            raise DemoError("finalize was not refused naming the workstations still on http")
        say("they do the client steps too")
        for a in addresses:
            ws.on_https.add((a, 1))
        wait_for(
            "no workstation left on http",
            lambda: not any(still_on_http(cli).values()),
            60,
            CLI_POLL,
        )
        say("phase 2: close http node by node")
        cli.run("rollout", "finalize", "--yes", "--wait", timeout=400)
        time.sleep(1.0)  # a last round of writes over https
    finally:
        ws.stop.set()
        thread.join(10)
    return ws


def run(
    addresses: list[str], work: Path, report_file: Path | None, strategy: str = "direct"
) -> bool:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    procs = Procs(work)
    data = work / "leader"
    cli = Cli(data)
    report: dict[str, Any] = {"addresses": addresses}
    writer = Writer(addresses, (data / "ca" / "ca.pem").read_bytes)
    thread = threading.Thread(target=writer.run, name="writer", daemon=True)
    password_file = work / "auth-password"
    ok = False
    try:
        set_up(work, addresses, procs, cli)
        password_file.touch(0o600)
        password_file.write_text(DEMO_PASSWORD + "\n")
        if strategy == "transitional":
            ws = transitional(cli, work, addresses, password_file, report)
            schema = json.loads(cli.run("schema", "show", "--all", "--json", show=False))
            report["schema"] = schema
            return verify(schema, ws, data, report)
        say("a client keeps writing entries to every node from now on")
        thread.start()
        time.sleep(1.0)
        say("switch the whole multiserver to https")
        print("   the workstations' auth password is in a 0600 file (a real admin would let")
        print("   tlsroll generate one and show it once on the terminal)")
        cli.run(
            "rollout",
            "start",
            "--scope",
            "cluster",
            "--password-file",
            str(password_file),
            "--yes",
        )
        say("the update schema, live")
        subprocess.run(
            [sys.executable, "-m", "tlsroll", "schema", "show", "--watch"],
            env={**cli.env, "COLUMNS": os.environ.get("COLUMNS", "200")},
            timeout=180,
            check=False,
        )
        time.sleep(1.0)  # a last round of writes over https
        writer.stop.set()
        thread.join(10)
        schema = json.loads(cli.run("schema", "show", "--json", show=False))
        report["schema"] = schema
        ok = verify(schema, writer, data, report)
        ok = workstation(cli, schema, work, password_file, report) and ok
    except DemoError as exc:
        print(f"\nVERDICT: FAILED — {exc}")
        report["error"] = str(exc)
        print(f"   logs: {work / 'logs'}")
    finally:
        writer.stop.set()
        say("clean up")
        procs.stop_all()
        if report_file:
            report_file.write_text(json.dumps(report, indent=2, sort_keys=True))
    return ok


def verify(
    schema: dict[str, Any], writer: Writer | Workstations, data: Path, report: dict[str, Any]
) -> bool:
    rollout = schema["rollouts"][0]
    ca_pem = (data / "ca" / "ca.pem").read_bytes()
    say("check every node from outside (trusting only the cluster CA)")
    checks = []
    for node in rollout["nodes"]:
        address = node["new_url"].split("//")[1].split(":")[0] if node["new_url"] else ""
        result = check_node(
            address, ca_pem, node["cert_fingerprint"], writer.acked.get(address, [])
        )
        result.update(node=node["name"], state=node["state"], new_url=node["new_url"])
        checks.append(result)
        mark = "ok " if not result["problems"] and node["state"] == "done" else "BAD"
        print(
            f"   [{mark}] {node['name']}: {node['state']}, {result.get('acked', 0)} entries "
            f"acknowledged, {len(result.get('missing', []))} missing, "
            f"{writer.refused.get(address, 0)} refused while frozen"
            + (f" — {'; '.join(result['problems'])}" if result["problems"] else "")
        )
    report.update(
        checks=checks,
        acked=dict(writer.acked),
        refused=writer.refused,
        ca_pem=ca_pem.decode(),
    )
    say("new addresses for the workstations")
    for node in rollout["nodes"]:
        print(f"   {node['name']}: {node['old_url']}  →  {node['new_url']}")
    acked = sum(len(v) for v in writer.acked.values())
    lost = sum(len(c.get("missing", [])) for c in checks)
    good = rollout["state"] == "completed" and all(
        c["state"] == "done" and not c["problems"] for c in checks
    )
    if good:
        print(
            f"\nVERDICT: OK — {len(checks)}/{len(checks)} nodes on https with certificates "
            f"from the cluster CA, port {HTTP_PORT} closed, {acked} entries acknowledged, "
            f"{lost} lost"
        )
    else:
        bad = [c["node"] for c in checks if c["state"] != "done" or c["problems"]]
        print(
            f"\nVERDICT: FAILED — rollout {rollout['state']}; nodes with problems: "
            f"{', '.join(bad) or '-'}; {lost} acknowledged entries lost"
        )
    return good


def workstation(
    cli: Cli, schema: dict[str, Any], work: Path, password_file: Path, report: dict[str, Any]
) -> bool:
    """The seed's last part: a workstation switches over, and the practice is told how."""
    node = schema["rollouts"][0]["nodes"][-1]
    say(f"a workstation switches to {node['name']}: tlsroll client test-connection")
    settings = work / "workstation"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tlsroll",
            "client",
            "test-connection",
            node["new_url"],
            "--password-file",
            str(password_file),
            "--yes",
            "--settings-dir",
            str(settings),
            "--name",
            "empfang",  # a name of its own (the host's may be "localhost", which names no PC)
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    sys.stdout.write(result.stdout)
    sys.stdout.write(result.stderr)
    report["test_connection"] = {"exit": result.returncode, "settings_dir": str(settings)}
    say("the message for the practice staff (tlsroll notify; German by default)")
    cli.run(
        "notify", "--practice", "Praxis Dr. Beispiel", "--contact", "Praxis-IT, Tel. 0123 456789"
    )
    return result.returncode == 0


@contextlib.contextmanager
def workdir(path: Path | None, keep: bool) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()  # agent.toml's data_dir must be absolute
        return
    tmp = Path(tempfile.mkdtemp(prefix="tlsroll-demo-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"   kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--addresses",
        default=",".join(ADDRESSES),
        help="three loopback addresses (default 127.0.10.1-3)",
    )
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    parser.add_argument("--report", type=Path, help="write a JSON report of the checks here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument(
        "--strategy",
        choices=["direct", "transitional"],
        default="direct",
        help="transitional: https beside http first, finalize once the workstations moved",
    )
    ns = parser.parse_args()
    addresses = [a.strip() for a in ns.addresses.split(",") if a.strip()]
    if any(not a.startswith("127.") for a in addresses):
        parser.error("the demo runs on loopback addresses (127.0.0.0/8) only")
    busy = [f"{a}:{p}" for a in addresses for p in (HTTP_PORT, HTTPS_PORT) if port_open(a, p)]
    if busy:
        print(
            f"demo: ports already in use: {', '.join(busy)}; is another demo running?",
            file=sys.stderr,
        )
        return 1
    t0 = time.monotonic()
    with workdir(ns.workdir, ns.keep) as work:
        ok = run(addresses, work, ns.report, ns.strategy)
    print(f"   ({time.monotonic() - t0:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
