"""Shared fixtures: loopback addresses (one per node, the seed's ports on each) and a test CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import (
    grpc_env,  # noqa: F401 - first of all that imports gRPC: the leader's setting
    procs,
)
from tlsroll import pki

# Each test node gets its own 127.0.0.0/8 address so that it can use the seed's fixed ports
# (8080, 8443, 9443) like a real server would. The second octet is this process's own: the
# workers of one run (pytest-xdist, up to 6) each get a different one, and the run's id (or the
# pid) shifts them so that two runs on one machine rarely collide. Runs that must never collide
# (several checkouts tested at once) each set TLSROLL_TEST_SLOT to a different number 0-24.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_SLOT = os.environ.get("TLSROLL_TEST_SLOT", "")
_SEED = int(_SLOT) if _SLOT.isdigit() else int(_RUN[:8], 16) if _RUN else os.getpid()
_BASE = 100 + _SEED % 25 * 6 + _WORKER % 6
_counter = itertools.count(1)


def none_fresh(_infos: Mapping[str, Any], _now: dt.datetime) -> frozenset[str]:
    """A reader's or ``SchemaViewService``'s fresh reports for a test with no leader state
    (``leader.schema_view.FreshReports``, a required argument since review s44rev6 L3): no
    node's stored report speaks for now, each is judged by its window against now."""
    return frozenset()


def next_loopback() -> str:
    n = next(_counter)
    return f"127.{_BASE}.{n // 250}.{n % 250 + 1}"


@pytest.fixture
def loopback() -> Callable[[], str]:
    """Call it to get a fresh loopback address no other test uses."""
    return next_loopback


@pytest.fixture(autouse=True)
def no_daemon_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that has its ``tmp_path`` fails (at its teardown) if a daemon of the project it
    started there (reference server, agent, leader: its command line names a file under
    ``tmp_path``) still runs once its fixtures are torn down: one left running once held a
    port a later test on the same address needed (session 41). Such a daemon is killed, then
    named. Cheap: one look through ``/proc`` per such test; processes that started before the
    test (a run before this one with the same ``--basetemp``) are not its own."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    root = f"{request.getfixturevalue('tmp_path')}{os.sep}"
    began = procs.since_boot() - procs.STARTED_SLACK
    yield
    found = [p for p in procs.running_with(root) if p.started >= began and p.daemon]
    if not found:
        return
    # A daemon killed by the teardown just now may not have exited yet: a moment for it.
    deadline = time.monotonic() + LEFT_GRACE
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = [p for p in found if procs.alive(p)]
    if found:
        procs.stop(found)
        pytest.fail(
            "still running after the test's teardown (killed now): " + "; ".join(map(str, found)),
            pytrace=False,
        )


LEFT_GRACE = 3.0  # seconds a daemon found after a test's teardown has to exit by itself


@dataclass(frozen=True)
class IssuedCert:
    cert_file: Path
    key_file: Path
    ca_file: Path
    cert: object


@pytest.fixture(scope="session")
def test_ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create("tlsroll test CA")


@pytest.fixture
def issue_cert(test_ca: pki.CertificateAuthority, tmp_path: Path) -> Callable[..., IssuedCert]:
    """Issue a server(+client) certificate for a loopback address into tmp files (key 0600)."""

    def issue(address: str, name: str = "node", *, client: bool = True) -> IssuedCert:
        key = pki.generate_key()
        cert = test_ca.issue(
            key.public_key(), pki.Names.of(name, [address]), server=True, client=client
        )
        d = tmp_path / f"pki-{address}"
        d.mkdir(exist_ok=True)
        pki.write_key(d / "key.pem", key)
        pki.write_cert(d / "cert.pem", cert)
        (d / "ca.pem").write_bytes(test_ca.cert_pem)
        return IssuedCert(d / "cert.pem", d / "key.pem", d / "ca.pem", cert)

    return issue


def count_thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the name of every function handed to ``asyncio.to_thread`` (a hop to a
    worker thread), in order; the calls still run."""
    hops: list[str] = []
    to_thread = asyncio.to_thread

    async def counting(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    return hops


# The longest modules first (their tests' times in tests/durations.json, written by
# tools/test_durations.py from a run's --durations=0 report). pytest-xdist hands work out in
# collection order, so a long test collected late ran on alone after the others had ended:
# session 61's CI spent its last minutes on one worker finishing tests/test_reenrol_ended.py
# (three tests of about 65 s) while three idled. Longest first is the greedy schedule for
# parallel workers: the run ends on short modules. A module stays in one piece, in its own
# order (the tests sharing a cluster were written in that order), and goes to one worker whole
# (``pytest_configure``): 35 modules share a cluster or another costly thing for the module (a
# module-scoped fixture), which every worker that runs one of the module's tests sets up again.
# Handed out one test at a time (session 61), such setups cost the workers about 330 s of a
# run against 90 s once each: about a minute of the run's wall time on 4 workers (session 62,
# simulated from CI runs' --durations=0 reports). The longest module (about 275 s) is still
# short of a quarter of the run. What the file does not name counts 0 and keeps its collection
# order: the tool records a module's shorter tests together, or a module of many quick ones
# (tests/test_runner.py: 286 tests, 14 s) would be handed out last, whole, and end the run on
# one worker.
DURATIONS = Path(__file__).with_name("durations.json")


def pytest_configure(config: pytest.Config) -> None:
    """With workers (``-n N``) and no ``--dist`` on the command line, pytest-xdist hands each
    worker a whole module (``--dist loadscope``, which would hand out a test class apart: the
    suite has none) in the order ``pytest_collection_modifyitems`` sorts them
    (``--no-loadscope-reorder``: xdist would sort the modules by their number of tests), the
    next one when two tests of its own are left. Set here, not in pyproject's addopts:
    ``pytest -p no:xdist`` (a debugger's run) would not know the options. ``--dist load``
    spreads a module's tests over the workers again: ``pytest -n 4 tests/test_x.py`` runs on
    one worker otherwise."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    # -n N makes it "load" (xdist's pytest_cmdline_main); the first parse holds the command line's
    if config.option.dist == "load" and config.known_args_namespace.dist == "no":
        config.option.dist = "loadscope"
        config.option.loadscopereorder = False


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    try:
        seconds = json.loads(DURATIONS.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # only the order depends on it
    if not isinstance(seconds, dict) or not all(
        isinstance(v, int | float) for v in seconds.values()
    ):
        return
    per_module: dict[str, float] = {}
    for nodeid, secs in seconds.items():
        module = _module(nodeid)
        per_module[module] = per_module.get(module, 0.0) + secs
    first_seen: dict[str, int] = {}
    for at, item in enumerate(items):
        first_seen.setdefault(_module(item.nodeid), at)

    def key(item: pytest.Item) -> tuple[float, int]:
        module = _module(item.nodeid)
        return (-per_module.get(module, 0.0), first_seen[module])

    items.sort(key=key)  # stable: ties keep their order
