"""Shared fixtures: loopback addresses (one per node, the seed's ports on each) and a test CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import (
    grpc_env,  # noqa: F401 - first of all that imports gRPC: the leader's setting
    procs,
)
from tests.private_files import open_keys_under
from tlsroll import keywrap, pki

# Every CA key a test writes (``tlsroll init``, a leader's start that encrypts one again) is
# under scrypt N=2^8, not 2^14 (``keywrap.TEST_KDF_N_ENV``: 0.2 s of CPU less at each init and
# each leader start, this process's and its children's); so is every password verifier made
# without an N of its own (``password.default_n``: 2^15 otherwise), and every process takes
# such a verifier. Set empty, the whole suite runs at full strength; the tests of the key's
# strength (tests/test_ops.py) and of the verifier's (tests/test_password.py) clear it.
os.environ.setdefault(keywrap.TEST_KDF_N_ENV, "256")

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
# A worker that replaces a crashed one (xdist names it gw6, gw7, ... with -n 6) shares the
# second octet of one still running: its addresses take a third octet of their own.
_THIRD = _WORKER // 6 % 4 * 64  # (a fifth generation of replacements shares the first's)
_counter = itertools.count(1)


def none_fresh(_infos: Mapping[str, Any], _now: dt.datetime) -> frozenset[str]:
    """A reader's or ``SchemaViewService``'s fresh reports for a test with no leader state
    (``leader.schema_view.FreshReports``, a required argument since review s44rev6 L3): no
    node's stored report speaks for now, each is judged by its window against now."""
    return frozenset()


def next_loopback() -> str:
    n = next(_counter)
    assert n < 64 * 250, "a worker's loopback addresses ran into the next worker's"
    return f"127.{_BASE}.{_THIRD + n // 250}.{n % 250 + 1}"


@pytest.fixture
def loopback() -> Callable[[], str]:
    """Call it to get a fresh loopback address no other test uses."""
    return next_loopback


@pytest.fixture(autouse=True)
def keys_private_at_the_end(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that has its ``tmp_path`` fails (at its teardown, once its other fixtures are
    torn down: this one is set up first) if a PEM private key there is left that group or
    others can access: a key is 0600 from its first byte, in the product and in its tests
    (``tests.private_files.write_private``; session 69, artefacts: 127 keys of a CI run's
    tmp_path were 0644). A test that makes one on purpose says so:
    ``@pytest.mark.open_keys``. Cheap: a file only its owner can access is never opened."""
    if "tmp_path" not in request.fixturenames or request.node.get_closest_marker("open_keys"):
        yield
        return
    root = request.getfixturevalue("tmp_path")
    yield
    found = open_keys_under(root)
    if found:
        pytest.fail(
            "a private key group or others can access left in tmp_path (write it with "
            "tests.private_files.write_private, or mark the test open_keys if on purpose): "
            + "; ".join(f"{p.relative_to(root)} (mode {m:04o})" for p, m in found),
            pytrace=False,
        )


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
# (``pytest_configure``): some three dozen modules share a cluster or another costly thing for
# the module (a module-scoped fixture), which every worker that runs one of the module's tests
# sets up again.
# Handed out one test at a time (session 61), such setups cost the workers about 330 s of a
# run against 90 s once each: about a minute of the run's wall time on 4 workers (session 62,
# simulated from CI runs' --durations=0 reports). The longest module (about 275 s) is still
# short of one worker's share (about 1000 s). What the file does not name counts 0 and keeps
# its collection order: the tool records a module's shorter tests together, or a module of many
# quick ones (tests/test_runner.py: 286 tests, 14 s) would be handed out last, whole, and end
# the run on one worker. A worker that crashes mid-module ends as one failed test
# (``_whole_modules``).
DURATIONS = Path(__file__).with_name("durations.json")


_WHOLE_MODULES = pytest.StashKey[bool]()
"""Set by ``pytest_configure`` when this conftest chose the schedule (``-n N``, no ``--dist``)."""


def pytest_configure(config: pytest.Config) -> None:
    """With workers (``-n N``) and no ``--dist`` (or ``-d``) on the command line, pytest-xdist
    hands each worker a whole module (``--dist loadscope``; ``pytest_xdist_make_scheduler``
    makes the scheduler) in the order ``pytest_collection_modifyitems`` sorts them
    (``--no-loadscope-reorder``: xdist would sort the modules by their number of tests), the
    next one when two tests of its own are left. Set here, not in pyproject's addopts:
    ``pytest -p no:xdist`` (a debugger's run) would not know the options. ``--dist load``
    spreads a module's tests over the workers again: ``pytest -n 4 tests/test_x.py`` runs on
    one worker otherwise."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    # -n N (or -d) makes it "load" (xdist's pytest_cmdline_main); the first parse holds the
    # command line's own: -d is --dist load too, but sets distload, not dist
    given = config.known_args_namespace
    if config.option.dist == "load" and given.dist == "no" and not given.distload:
        config.option.dist = "loadscope"
        config.option.loadscopereorder = False
        config.stash[_WHOLE_MODULES] = True


@pytest.hookimpl(optionalhook=True)  # optional: not a hook at all under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's loadscope scheduler, made to survive a worker's crash (``_whole_modules``), when
    ``pytest_configure`` chose it; otherwise xdist's own, as the command line says."""
    if not config.stash.get(_WHOLE_MODULES, False):
        return None
    return _whole_modules(config, log)


def _whole_modules(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist 3.8's ``LoadScopeScheduling`` with three things changed.

    A worker that crashed (a test that killed its process, a segfault) hung the run: xdist's
    ``remove_node`` puts the worker's whole workload back on the queue, the modules it had
    finished too; one of those handed to the replacement worker is an empty list of tests, which
    that worker waits on forever, and the test that crashed is still pending, so it runs again
    on each replacement (pytest-xdist issues #1323 and #1327, PR #1371; 3.8.0 is the newest).
    Here only the modules with tests left go back, first in the queue (they were handed out
    earlier: longer), and the test that crashed counts as done: xdist reports it failed, once,
    as ``--dist load`` does. A worker added in a crashed one's place is looked at twice, as
    xdist's first hand-out does (its #277): a worker runs a test only once it holds the next one
    or is told to stop, so a module of one test left it waiting until the queue ran out. The
    third: a module is the part of a test's id before its first ``::``; xdist's split at the
    last made ``test_x.py::test_y[https://[::1]:8443/]`` a unit of its own, its module's
    cluster set up again on another worker.

    It leans on xdist's internals (``workqueue``, ``assigned_work``, ``_reschedule``...): if
    an xdist to come has not what 3.8 has, the workers take one test at a time as before session
    62 (``--dist load``, ``--maxschedchunk=1``), each module's cluster set up on every worker
    that runs one of its tests, rather than a failed or hung run; the run says so."""
    from xdist.scheduler import LoadScheduling, LoadScopeScheduling  # type: ignore[import-untyped]

    needed = ("_split_scope", "_reschedule", "_pending_of", "remove_node", "schedule", "nodes")
    if all(hasattr(LoadScopeScheduling, name) for name in needed):

        class WholeModules(LoadScopeScheduling):  # type: ignore[misc]  # xdist has no types
            def _split_scope(self, nodeid: str) -> str:
                return _module(nodeid)

            def remove_node(self, node: Any) -> str | None:
                workload: dict[str, dict[str, bool]] = self.assigned_work.pop(node)
                left = {unit: tests for unit, tests in workload.items() if not all(tests.values())}
                if not left:
                    return None  # a worker that ended as told
                # it ran its tests in the order they were sent: the first not done killed it
                first = next(iter(left.values()))
                crashed = next(nodeid for nodeid, done in first.items() if not done)
                first[crashed] = True  # reported failed by xdist, not run again
                for unit, tests in reversed(left.items()):
                    if not all(tests.values()):
                        self.workqueue[unit] = tests
                        self.workqueue.move_to_end(unit, last=False)
                for other in self.nodes:
                    self._reschedule(other)
                return crashed

            def _reschedule(self, node: Any) -> None:
                # A worker added in a crashed one's place is in ``assigned_work`` from its
                # start, but can run nothing until its collection is in: handed a module
                # before that (another worker crashed meanwhile), xdist failed to look its
                # tests up, kept the module as that worker's, unsent, and the run hung (review
                # s62 M1). Its own ``schedule()`` hands it work once it has collected.
                if node in self.registered_collections:
                    super()._reschedule(node)

            def schedule(self) -> None:
                late = self.collection is not None
                super().schedule()
                if late:  # as xdist's first hand-out does (its #277): two modules, or the end
                    for node in self.nodes:
                        self._reschedule(node)

        scheduler = WholeModules(config, log)
        if (
            isinstance(getattr(scheduler, "workqueue", None), OrderedDict)
            and type(getattr(scheduler, "assigned_work", None)) is dict
            and type(getattr(scheduler, "registered_collections", None)) is dict
            and getattr(scheduler, "collection", False) is None  # read by schedule(): none yet
        ):
            return scheduler
    config.option.dist = "load"
    if config.option.maxschedchunk is None:
        config.option.maxschedchunk = 1
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            "tests/conftest.py: pytest-xdist's LoadScopeScheduling is not 3.8's: the workers"
            " take one test at a time (--dist load)"
        )
    return LoadScheduling(config, log)


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
