"""The agent's plans of a node whose server serves https from files the journal does not hold
(its agent's data dir begun again, a config changed by hand): the corners a review of session
70's change found (review s70 L1, L3, L4, L6). In process: the reference driver reads a real
config file; the restore check's server is a real TLS listener on a loopback address of the
test's own, serving a certificate no CA of tlsroll's issued; no daemon."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import select
import socket
import ssl
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
import structlog

from nodeagent import plans, service
from nodeagent.drivers import DriverError, ReferenceDriver, make_driver
from nodeagent.journal import Journal, Txn
from nodeagent.transaction import Phase, Plan, Runner, _started_before
from nodeagent.trust import LeaderTrust
from tests import byo_certs
from tests.conftest import next_loopback
from tests.private_files import write_private
from tlsroll import dbthread, password, pki, tls
from tlsroll.clients import ClientsView
from tlsroll.config import ConfigFile, dump_toml
from tlsroll.enums import JOURNAL_PUT_BACK, NEEDS_ADMIN, Change, TxnKind, TxnOutcome
from tlsroll.errors import UnsafePermissions
from tlsroll.v1 import agent_pb2
from tlsroll.wire import CHANGE, TXN_OUTCOME

APP = "/praxis"
HTTPS_PORT = 8443


class QuietReference(ReferenceDriver):
    """The reference driver with its config and files as they are, and the server's process
    stood in for: a restart changes nothing (the test's TLS listener stays what it serves),
    the freeze is granted at watermark 0."""

    async def restart(self) -> None:
        return None

    async def status(self) -> dict[str, Any]:
        return {"frozen": False, "watermark": 0}

    async def freeze(self, drain_timeout: float) -> int:
        return 0

    async def unfreeze(self) -> None:
        return None

    async def health(self) -> str | None:
        return None

    async def watermark(self) -> int:
        return 0


@dataclass
class Served:
    """A node's config dir with a certificate of the admin's own CA (``cert``), its key, and a
    client CA of another issuer (as tlsroll's CA is to a hand-made certificate)."""

    address: str
    etc: Path
    cert: Path
    key: Path
    client_ca: Path
    fingerprint: str
    journal: Journal
    txn_dir: Path
    own_ca: Path  # the CA that issued ``cert``

    def driver(self, **server: Any) -> QuietReference:
        settings: dict[str, Any] = {
            "address": self.address,
            "app_path": APP,
            "https_port": HTTPS_PORT,
            "listen": ["https"],
            "data_dir": str(self.etc.parent / "data"),
            "cert_file": self.cert.name,  # relative: to the config's directory
            "key_file": self.key.name,
            "client_ca_file": str(self.client_ca),
        }
        settings.update(server)
        for key in [k for k, v in settings.items() if v is None]:
            del settings[key]
        config = self.etc / "server.toml"
        config.write_text(dump_toml({"server": settings}))
        return QuietReference(config, self.etc.parent / "refserver.log")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    address = next_loopback()
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o700)
    own = byo_certs.make_ca("Praxis own")
    cert, key = byo_certs.leaf(own, [address])
    (etc / "own.pem").write_bytes(byo_certs.pem(cert))
    write_private(etc / "own.key", byo_certs.key_pem(key))
    (etc / "client-ca.pem").write_bytes(byo_certs.make_ca("tlsroll CA").pem)
    (etc / "own-ca.pem").write_bytes(own.pem)
    journal = Journal(tmp_path / "journal.sqlite3")
    yield Served(
        address,
        etc,
        etc / "own.pem",
        etc / "own.key",
        etc / "client-ca.pem",
        pki.fingerprint(cert),
        journal,
        tmp_path / "txn",
        etc / "own-ca.pem",
    )
    journal.close()


@pytest.fixture
async def https_listener(served: Served) -> AsyncIterator[None]:
    """The node's https as the server serves it: ``own.pem``, 200 on any GET."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(served.cert, served.key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, served.address, HTTPS_PORT, ssl=context)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def run(
    served: Served,
    driver: QuietReference,
    built: plans.Built,
    rollout: str,
    kind: TxnKind = TxnKind.ROLLBACK,
) -> Txn:
    """``built`` journalled as rollout ``rollout``'s way back (or ``kind``) and run to its end
    (the runner's waits between verify attempts cut short)."""

    async def no_wait(_seconds: float) -> None:
        await asyncio.sleep(0)

    def clock() -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    runner = Runner(served.journal, driver, clock, sleep=no_wait)
    txn = served.journal.create(
        Txn(
            rollout,
            kind,
            1,
            Phase.STARTED,
            built.plan.to_json(),
            clock() + dt.timedelta(minutes=1),
            target_config=built.config,
            source_config=driver.read_config(),
        )
    )
    return await runner.run(txn)


@pytest.mark.parametrize("client_ca", ["another issuer's", "none"])
async def test_the_restore_check_of_a_way_back_no_switch_made_pins_the_certificate_served(
    served: Served, https_listener: None, client_ca: str
) -> None:
    """Review s70 L1: the way back to http of a server on https whose switch the journal does
    not hold (``plans.unjournalled_way_back``) took the config's client CA as the issuer of
    the server's certificate, or without one the certificate itself as a CA: should the way
    back fail (here: http does not answer), the config from before is put back and checked,
    and that check failed against a server that served https as before ("certificate verify
    failed": the node failed, needing the admin). Now the check pins the certificate the
    config names, whoever issued it: the way back is rolled back, the server as it was."""
    driver = served.driver(client_ca_file=None if client_ca == "none" else str(served.client_ca))
    https_config = driver.read_config()
    built = await asyncio.to_thread(
        plans.rollback_plan, served.journal, driver, served.txn_dir, "b1", undoes=""
    )
    assert built.plan.source_fingerprint == served.fingerprint
    assert Plan.from_json(built.plan.to_json()) == built.plan

    done = await run(served, driver, built, "b1")

    assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason
    assert done.reason.startswith("verify: "), done.reason  # (http never answered)
    assert driver.read_config() == https_config


async def test_a_restore_check_by_pin_fails_on_another_certificate(
    served: Served, https_listener: None
) -> None:
    """The pin is a check, not a pass: a server that serves another certificate than the one
    its config names fails the restore check (the node needs the admin, as before)."""
    driver = served.driver()
    built = await asyncio.to_thread(
        plans.rollback_plan, served.journal, driver, served.txn_dir, "b1", undoes=""
    )
    other = byo_certs.leaf(byo_certs.make_ca("Praxis own"), [served.address])[0]
    pinned = replace(built.plan, source_fingerprint=pki.fingerprint(other))

    done = await run(served, driver, built._replace(plan=pinned), "b2")

    assert done.outcome is TxnOutcome.FAILED, done.reason
    assert f"not the certificate it served before {pki.fingerprint(other)}" in done.reason


@pytest.mark.parametrize("broken", ["no key named", "the key file gone", "an empty key setting"])
def test_a_broken_https_config_does_not_block_the_way_back_to_http(
    served: Served, broken: str
) -> None:
    """Review s70 L6: a config on https that cannot serve (it names no key, or a key that is
    not there, or a setting the agent cannot read) refused the way back of a node whose
    journal holds no switch ("fix it, or set it back to http, then run enable-tls"): the way
    back is how the admin sets it back to http, and it writes nothing of the https files. It
    goes on, the problem said."""
    if broken == "no key named":
        driver = served.driver(key_file=None)
        problem = "serves https but names no certificate and key"
    elif broken == "an empty key setting":
        driver = served.driver(key_file="")
        problem = "[server].key_file: must not be empty"
    else:
        driver = served.driver(key_file="gone.key")
        problem = f"names {served.etc / 'gone.key'}, which is not there"
    with structlog.testing.capture_logs() as logs:
        built = plans.rollback_plan(served.journal, driver, served.txn_dir, "b1", undoes="")
    server = tomllib.loads(built.config.decode())["server"]
    assert server["listen"] == ["http"] and "cert_file" not in server and "key_file" not in server
    assert built.plan.target_schemes == ("http",)
    said = [e for e in logs if e["event"] == "rollback.https_config_broken"]
    assert len(said) == 1 and problem in said[0]["problem"], logs
    assert said[0]["log_level"] == "warning" and said[0]["detail"]


def stage(journal: Journal, directory: Path, rollout_id: str, fingerprint: str) -> None:
    journal.record_csr(rollout_id, directory / "server.key", b"csr")
    journal.record_stage(
        rollout_id,
        directory / "server.pem",
        directory / "ca.pem",
        fingerprint,
        dt.datetime(2027, 1, 1, tzinfo=dt.UTC),
    )


def test_files_the_config_names_through_a_link_stay_the_link(served: Served) -> None:
    """Review s70 L4: a file the reference server's config names by a relative path was
    resolved (``Section.path``): a verifier named ``verifier.json``, a link the admin repoints
    to ``pw/v3.json``, became ``pw/v1.json`` in the plans, the journal and the config a
    rotation wrote (the link gone from it: the admin's next repoint changed nothing, and the
    agent's bootstrap service served the old verifier). Now the link is named, as a link
    named by an absolute path always was; so is a certificate named through one."""
    (served.etc / "pw").mkdir()
    (served.etc / "pw" / "v1.json").write_text("{}")
    os.symlink("pw/v1.json", served.etc / "verifier.json")
    os.symlink(served.cert.name, served.etc / "current.pem")
    driver = served.driver(auth_verifier_file="verifier.json", cert_file="current.pem")
    named = driver.named_files()
    assert named["verifier_file"] == str(served.etc / "verifier.json")
    assert named["cert_file"] == str(served.etc / "current.pem")

    stage(served.journal, plans.stage_dir(driver, "r2"), "r2", "sha256:" + "1" * 64)
    built = plans.rotate_plan(served.journal, driver, served.txn_dir, "r2", None)
    server = tomllib.loads(built.config.decode())["server"]
    assert server["auth_verifier_file"] == str(served.etc / "verifier.json")
    assert built.plan.live_tls is not None and built.plan.live_before is not None
    assert built.plan.live_tls["verifier_file"] == str(served.etc / "verifier.json")
    assert built.plan.live_before["cert_file"] == str(served.etc / "current.pem")
    assert built.plan.source_fingerprint == served.fingerprint  # (read through the link)


@pytest.mark.parametrize("journal_holds", ["nothing", "other files"])
def test_finalize_plans_from_the_files_the_config_names(served: Served, journal_holds: str) -> None:
    """Review s70 L3: finalize (the transitional strategy's second phase) planned from the
    journal alone, unlike the switch and the way back since session 70: a dual node whose
    agent's journal was begun again was refused ("not dual"), and one whose config was
    changed since its phase-1 switch (another certificate named by hand) was finalized with
    the journal's files, the ones the server no longer serves. Now the files the config
    names are the ones kept, and verify wants that certificate."""
    driver = served.driver(listen=["http", "https"])
    if journal_holds == "other files":
        stale = plans.stage_dir(driver, "r1")
        live = {
            "cert_file": str(stale / "server.pem"),
            "key_file": str(stale / "server.key"),
            "ca_file": str(stale / "ca.pem"),
            "verifier_file": "",
            "server_url": f"https://{served.address}:{HTTPS_PORT}{APP}",
        }
        plan = Plan(
            driver.facts(),
            ("http",),
            ("http", "https"),
            served.txn_dir / "r1-switch.new",
            served.txn_dir / "r1-switch.old",
            stale / "ca.pem",
            "sha256:" + "2" * 64,
            live,
        )
        txn = served.journal.create(
            Txn("r1", TxnKind.SWITCH, 1, Phase.VERIFIED, plan.to_json(), dt.datetime.now(dt.UTC))
        )
        served.journal.complete(txn, live, phase=Phase.COMPLETED, outcome=TxnOutcome.COMPLETED)

    built = plans.finalize_plan(served.journal, driver, served.txn_dir, "r1f", None)

    server = tomllib.loads(built.config.decode())["server"]
    assert server["listen"] == ["https"]
    assert server["cert_file"] == str(served.cert) and server["key_file"] == str(served.key)
    assert built.fingerprint == served.fingerprint == built.plan.target_fingerprint
    assert built.plan.live_tls is not None
    assert built.plan.live_tls["cert_file"] == str(served.cert)
    assert built.plan.source_fingerprint == served.fingerprint


@pytest.mark.parametrize("named", ["relative", "absolute"])
def test_a_server_config_that_is_a_link_is_refused_however_the_agent_names_it(
    served: Served, named: str
) -> None:
    """Review s70 L4 (the same resolve): the agent's ``[server] config_file`` named by a
    relative path was resolved, so a symbolic link there was followed and its target replaced
    (in a directory the agent was never told of), while the same link named by its absolute
    path is refused, saying which path to name (review s64 M2). Both are refused now."""
    real = served.driver().config_file
    srv = served.etc.parent / "srv"
    srv.mkdir()
    real.rename(srv / "server.toml")
    real.symlink_to(srv / "server.toml")
    agent_toml = served.etc.parent / "agent.toml"
    value = "etc/server.toml" if named == "relative" else str(real)
    agent_toml.write_text(dump_toml({"server": {"driver": "reference", "config_file": value}}))
    section = ConfigFile.load(agent_toml).section("server")

    driver = make_driver(section, served.address, served.etc.parent / "agent-data")

    assert driver.config_file == real and driver.config_file.is_symlink()
    with pytest.raises(UnsafePermissions, match=f"set config_file = {srv / 'server.toml'}"):
        plans.rollback_plan(served.journal, driver, served.txn_dir, "b1", undoes="")
    assert (srv / "server.toml").read_bytes() == real.read_bytes()  # (untouched)


def test_an_agent_config_named_by_a_relative_path_names_the_server_files_absolutely(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s71 revplans (of s70 L4's fix): the agent started with ``--config agent.toml``
    (a relative path) and ``[server] config_file = "etc/server.toml"`` took the server's config
    as ``etc/server.toml``, relative to the agent's working directory: the stage directory,
    so the certificate a switch writes into the server's config, was ``etc/tlsroll-tls/...``,
    which the server reads from its own config's directory (``etc/etc/tlsroll-tls/...``: its
    restart fails), and the files the config names went into the journal relative to a
    directory an agent started elsewhere does not share. Made absolute, never resolved (a link
    named stays the link)."""
    served.driver()
    root = served.etc.parent
    (root / "agent.toml").write_text(
        dump_toml({"server": {"driver": "reference", "config_file": "etc/server.toml"}})
    )
    monkeypatch.chdir(root)
    section = ConfigFile.load(Path("agent.toml")).section("server")

    driver = make_driver(section, served.address, root / "agent-data")

    assert driver.config_file == served.etc / "server.toml", driver.config_file
    assert plans.stage_dir(driver, "r1") == served.etc / "tlsroll-tls" / "r1"
    named = driver.named_files()
    assert named is not None and named["cert_file"] == str(served.cert), named


def test_a_broken_https_setting_does_not_block_the_way_back_of_a_journalled_switch(
    served: Served,
) -> None:
    """Review s71 revplans (of s71 wayback's pin): the way back of a switch the journal holds
    read the files the server's config names, to pin its certificate, and a setting there the
    agent cannot read (an empty key_file: the server cannot start) refused it with a config
    error: the admin's way back to http, which puts back the journal's http config, blocked by
    the https setting it drops (the agent's checks said nothing: `tlsroll plan` showed it
    ready). It goes on, the pin from the journal's files."""
    driver = served.driver(key_file="")
    http = dump_toml({"server": {"listen": ["http"], "address": served.address}}).encode()
    journal_switch(
        served,
        driver,
        served.client_ca,
        source_config=http,
        target_config=driver.read_config(),
    )

    built = plans.rollback_plan(served.journal, driver, served.txn_dir, "b1", undoes="")

    assert built.config == http
    assert built.plan.target_schemes == ("http",)
    assert built.plan.source_fingerprint == served.fingerprint  # (the journal's certificate)


# --- the changes that keep https (session 72, httpsplans) ----------------------------------


def journal_switch(
    served: Served, driver: QuietReference, ca_file: Path, **configs: bytes
) -> dict[str, str]:
    """A completed switch s1 in the journal, its live files the config's certificate and key
    with ``ca_file``: the https this agent installed (its live settings returned); ``configs``:
    its ``source_config``/``target_config``, if any."""
    live = {
        "cert_file": str(served.cert),
        "key_file": str(served.key),
        "ca_file": str(ca_file),
        "verifier_file": "",
        "server_url": f"https://{served.address}:{HTTPS_PORT}{APP}",
    }
    plan = Plan(
        driver.facts(),
        ("http",),
        ("https",),
        served.txn_dir / "s1-switch.new",
        served.txn_dir / "s1-switch.old",
        ca_file,
        served.fingerprint,
        live,
    )
    txn = served.journal.create(
        Txn(
            "s1",
            TxnKind.SWITCH,
            1,
            Phase.VERIFIED,
            plan.to_json(),
            dt.datetime.now(dt.UTC),
            **configs,  # type: ignore[arg-type]
        )
    )
    served.journal.complete(txn, live, phase=Phase.COMPLETED, outcome=TxnOutcome.COMPLETED)
    return live


def keep_https_plan(served: Served, driver: QuietReference, change: Change) -> plans.Built:
    if change is Change.CHANGE_PASSWORD:
        verifier = dict(password.make_verifier("pw", **password.TEST_PARAMS))
        return plans.password_plan(served.journal, driver, served.txn_dir, "p1", verifier)
    return plans.finalize_plan(served.journal, driver, served.txn_dir, "p1", None)


KEEPS_CERTIFICATE = [Change.CHANGE_PASSWORD, Change.FINALIZE]


def listens(change: Change) -> list[str]:
    return ["http", "https"] if change is Change.FINALIZE else ["https"]


@pytest.mark.parametrize("change", KEEPS_CERTIFICATE)
async def test_a_config_naming_no_client_ca_keeps_naming_none(
    served: Served, https_listener: None, change: Change
) -> None:
    """Review s71 (L): a reference server's config on https that names no client CA (the
    setting is optional) got ``client_ca_file = "."`` from change-password and finalize (an
    empty name joined to the config's directory), which the server refuses: the switch rolled
    back. The config they render names none still; their verify trusts the CA this agent
    installed (the journal's), and the switch completes."""
    driver = served.driver(client_ca_file=None, listen=listens(change))
    journal_switch(served, driver, served.own_ca)

    built = await asyncio.to_thread(keep_https_plan, served, driver, change)

    server = tomllib.loads(built.config.decode())["server"]
    assert "client_ca_file" not in server, server
    assert built.plan.ca_file == served.own_ca
    assert built.plan.live_tls is not None and built.plan.live_tls["ca_file"] == str(served.own_ca)
    done = await run(served, driver, built, "p1", TxnKind.SWITCH)
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert served.journal.live_tls()["ca_file"] == str(served.own_ca)  # type: ignore[index]
    # ``--journal-checked`` agrees: the live settings name the CA, the config none (s72).
    assert plans.live_contradiction(served.journal, driver) is None
    # The next change finds that CA still (the journal's live settings name it).
    again = await asyncio.to_thread(keep_https_plan, served, driver, Change.CHANGE_PASSWORD)
    assert again.plan.ca_file == served.own_ca


@pytest.mark.parametrize("change", KEEPS_CERTIFICATE)
def test_a_config_naming_no_client_ca_with_no_ca_installed_is_refused_saying_what_to_do(
    served: Served, change: Change
) -> None:
    """The same config, and no CA this agent installed (its journal holds no https): nothing
    could check the certificate the change keeps. Refused up front, in its plan and in the
    checks' (`tlsroll plan`, a start), saying what to do; nothing written."""
    driver = served.driver(client_ca_file=None, listen=listens(change))
    config = driver.read_config()

    with pytest.raises(plans.PlanRefused, match="names no client_ca_file") as refused:
        keep_https_plan(served, driver, change)
    said = str(refused.value)
    assert "run rotate-cert first" in said and "\n" not in said, said
    assert plans.plan_problem(served.journal, driver, driver.facts(), change, way_back=False) == (
        said
    )
    assert driver.read_config() == config
    assert not served.txn_dir.exists()


@pytest.mark.parametrize("change", KEEPS_CERTIFICATE)
async def test_a_change_keeping_a_certificate_its_ca_did_not_issue_is_blocked_up_front(
    served: Served, https_listener: None, change: Change
) -> None:
    """Review s71 (M): change-password and finalize keep the certificate the server serves,
    and their verify checks it by the config's client CA (as the leader's confirm does by the
    cluster's CA): on a node serving a certificate of the admin's own CA they froze the
    server, restarted it and always rolled back. The checks (`tlsroll plan`, a start's Check)
    now say so up front, with what to do; a certificate that CA issued is not blocked."""
    facts = served.driver(listen=listens(change)).facts()
    driver = served.driver(listen=listens(change))

    problem = await asyncio.to_thread(
        plans.plan_problem, served.journal, driver, facts, change, way_back=False
    )

    assert problem is not None, "not blocked"
    assert f"not one its CA {served.client_ca} issued for {served.address}" in problem, problem
    assert "run rotate-cert first" in problem and "\n" not in problem, problem
    trusted = served.driver(listen=listens(change), client_ca_file=str(served.own_ca))
    assert (
        await asyncio.to_thread(
            plans.plan_problem, served.journal, trusted, facts, change, way_back=False
        )
        is None
    )
    for other in (Change.ROTATE_CERT, Change.ENABLE_TLS):  # (they install another certificate)
        assert plans.plan_problem(served.journal, driver, facts, other, way_back=False) is None


class FrozenReference(QuietReference):
    """As ``QuietReference``, the server frozen (as ``Runner._die`` finds it)."""

    async def status(self) -> dict[str, Any]:
        return {"frozen": True, "watermark": 0}


@pytest.mark.parametrize("pin", ["the one served", "another", "another, and the one served"])
async def test_a_dead_way_back_lifts_the_freeze_once_the_source_proves_its_pin(
    served: Served, https_listener: None, pin: str
) -> None:
    """Review s71 (L): before the agent exits on a dead task, ``Runner._unproved`` decides
    whether the freeze is kept: the way back past its restore checked the source trusting the
    plan's CA file, not the certificate the restore check pins (``Plan.source_fingerprint``),
    so a server back on a certificate of another issuer, fine, was kept frozen. It is lifted
    now; a server on another certificate than the pinned one still keeps it. Review s72
    revhttps: the certificate served at plan time (the pin's second) passes only where
    nothing restarted the server since: here the way back did, and the server must serve the
    certificate its file held (the first)."""
    driver = FrozenReference(served.driver().config_file, served.etc.parent / "refserver.log")
    built = await asyncio.to_thread(
        plans.rollback_plan, served.journal, driver, served.txn_dir, "b1", undoes=""
    )
    assert built.plan.source_fingerprint == served.fingerprint
    if pin != "the one served":
        other = byo_certs.leaf(byo_certs.make_ca("Praxis own"), [served.address])[0]
        pins = pki.fingerprint(other) + ("" if pin == "another" else f",{served.fingerprint}")
        built = built._replace(plan=replace(built.plan, source_fingerprint=pins))
    txn = Txn(
        "b1",
        TxnKind.ROLLBACK,
        1,
        Phase.RB_RESTARTED,
        built.plan.to_json(),
        dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1),
        failed_phase=Phase.RESTARTED,
        restart_needed=True,
        target_config=built.config,
        source_config=driver.read_config(),
    )

    async def no_wait(_seconds: float) -> None:
        await asyncio.sleep(0)

    runner = Runner(served.journal, driver, lambda: dt.datetime.now(dt.UTC), sleep=no_wait)
    kept = await runner._unproved(txn)

    if pin != "the one served":
        assert "does not prove it runs the source" in kept and "presents" in kept, kept
    else:
        assert kept == "", kept


class FreezeRefused(QuietReference):
    """As ``QuietReference``, the server refusing the freeze (it answers): a change that
    fails there, before its config is written; its way back restarts nothing."""

    async def freeze(self, drain_timeout: float) -> int:
        raise DriverError("writes still in flight")


@pytest.mark.parametrize("restart", ["none", "one that changed nothing"])
async def test_the_restore_check_pins_the_certificate_served_as_well_as_the_one_on_disk(
    served: Served, https_listener: None, restart: str
) -> None:
    """Review s71 (L): the restore pin was the certificate the config's file held at plan
    time, not the one the server served: a certificate renewed on disk without a reload made
    a change that failed before its restart say "restore failed" (the node needing the
    admin) of a server that served https as before. Both are pinned now: the served one
    passes where nothing restarted the server since the plan (the change failed at its
    freeze here). Review s72 revhttps (M): not where the way back restarted it (a restart
    loads the file's: a server still serving the certificate it served before did not; this
    test's stand-in never reloads): the file's alone passes then, as before."""
    driver = served.driver()
    renewed, renewed_key = byo_certs.leaf(byo_certs.make_ca("Praxis own"), [served.address])
    served.cert.write_bytes(byo_certs.pem(renewed))  # (on disk only: the listener keeps its own)
    write_private(served.key, byo_certs.key_pem(renewed_key))
    https_config = driver.read_config()
    if restart == "none":
        driver = FreezeRefused(driver.config_file, served.etc.parent / "refserver.log")

    built = await asyncio.to_thread(
        plans.rollback_plan, served.journal, driver, served.txn_dir, "b1", undoes=""
    )

    assert built.plan.source_fingerprint == f"{pki.fingerprint(renewed)},{served.fingerprint}"
    done = await run(served, driver, built, "b1")
    assert driver.read_config() == https_config
    assert done.restart_needed is (restart != "none")
    if restart == "none":
        assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason
    else:
        assert done.outcome is TxnOutcome.FAILED, done.reason
        said = f"presents {served.fingerprint}, not the certificate it served before"
        assert done.reason.endswith(f"{said} {pki.fingerprint(renewed)}"), done.reason


class Aborted(Exception):
    pass


class FakeContext:
    """The servicer's context, as far as ``map_errors`` uses it: ``abort`` raises."""

    async def abort(self, code: object, details: str) -> None:
        raise Aborted(code, details)


def an_agent(
    served: Served, driver: QuietReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[service.NodeAgentService, Runner]:
    """The agent's servicer in this process, over ``driver``, taking any caller as the leader
    (epoch 1 announced), and its runner."""
    monkeypatch.setattr(service, "require_leader", lambda _context, _trust: None)

    async def no_wait(_seconds: float) -> None:
        await asyncio.sleep(0)

    def clock() -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    runner = Runner(served.journal, driver, clock, sleep=no_wait)
    trust = LeaderTrust(tmp_path / "ca.pem", "example.test", tmp_path / "crl.pem")
    trust.announce(1)
    cfg = type("C", (), {"data_dir": tmp_path / "data"})()
    agent = service.NodeAgentService(
        cast(Any, cfg), cast(Any, None), served.journal, driver, runner, clock, trust=trust
    )
    return agent, runner


async def test_the_served_pin_of_a_way_back_is_taken_off_the_store_thread(
    served: Served, https_listener: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s72 revhttps (M): the restore pin's handshake (``plans.served_pin``) ran where
    the plan is built, on the agent's store thread (``tlsroll.dbthread``), whose calls must
    never wait on the network: a server that accepts and never answers held every journal
    call queued there for a second, on a way back, when the server may well be the broken
    thing. The Rollback takes it first, in a worker thread (``plans.take_served_pin``); the
    plan pins the same certificate, and the way back ends as before."""
    driver = served.driver()
    seen: list[str] = []
    connect = tls.connect

    def spy(*args: Any, **kwargs: Any) -> ssl.SSLSocket:
        seen.append(threading.current_thread().name)
        return connect(*args, **kwargs)

    monkeypatch.setattr(tls, "connect", spy)
    agent, runner = an_agent(served, driver, tmp_path, monkeypatch)
    request = agent_pb2.RollbackRequest(
        command=agent_pb2.Command(rollout_id="b1", epoch=1), undoes=""
    )
    await agent.Rollback(request, cast(Any, FakeContext()))
    done = await runner.tasks[("b1", TxnKind.ROLLBACK.value)]

    assert seen and not [name for name in seen if name.startswith(dbthread.THREAD_NAME)], seen
    assert Plan.from_json(done.plan).source_fingerprint == served.fingerprint
    assert done.outcome is TxnOutcome.ROLLED_BACK, done.reason


class Trickler:
    """A TCP server that answers one TLS client's ClientHello a byte at a time: a record
    header saying 16 KiB follow, then one byte every ``EVERY`` seconds, each well within a
    socket operation's timeout, up to ``MOST`` bytes, or until the client closes. ``sent``:
    how many it sent before it stopped."""

    EVERY = 0.05
    MOST = 100

    def __init__(self, address: str, port: int) -> None:
        self.listener = socket.create_server((address, port))
        self.sent = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(5.0)
            conn.recv(1 << 16)  # (the ClientHello)
            record = b"\x16\x03\x03\x40\x00" + b"\x02" * (self.MOST - 5)
            for byte in record:
                readable, _, _ = select.select([conn], [], [], self.EVERY)
                try:
                    if readable and not conn.recv(1 << 16):
                        return  # the client closed: it gave up
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                self.sent += 1

    def close(self) -> None:
        self.thread.join(timeout=30)
        self.listener.close()
        assert not self.thread.is_alive()


def test_a_plan_handshake_gives_up_on_a_trickling_server(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s72 (L) feared that ``plans.served_pin``'s timeout bounded each socket operation,
    so that a server trickling its handshake a byte at a time held the call for as long as
    it trickled. ``ssl``'s handshake timeout is for the whole handshake (since Python 3.5):
    the client gives up (and closes) long before the server has sent all it would (a
    timeout of 1 s here, a byte every 0.05 s, 100 bytes: 5 s). A guard: a handshake of
    ``tls.connect``'s own that reset its timeout at each byte would fail it. (1 s, not less:
    the trickler's thread must have sent its first byte by then on a loaded machine too.)"""
    monkeypatch.setattr(plans, "SERVED_PIN_TIMEOUT", 1.0)
    facts = served.driver().facts()
    trickler = Trickler(served.address, HTTPS_PORT)
    try:
        assert plans.served_pin(facts) == ""
    finally:
        trickler.close()
    assert 0 < trickler.sent < Trickler.MOST, trickler.sent


@pytest.mark.parametrize("call", ["served_pin", "untrusted_certificate", "served_certificate"])
async def test_a_plan_handshake_is_bounded_as_a_whole_connect_and_handshake_together(
    served: Served, https_listener: None, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Review s72 (L): ``plans.served_pin`` (1 s) and ``plans.untrusted_certificate`` (2 s)
    gave their timeout to the TCP connect and again to the handshake: the call, on a Switch's
    or a Rollback's path and the preflight's, could take twice as long (a connect whose SYN
    was answered late, then a slow handshake). Each is one deadline for the whole call now
    (``tls.connect``'s ``within``): a connect that used all of it (here one that takes the
    timeout and 0.05 s more) leaves no handshake, however promptly the server would answer;
    the call says what it says of a server that did not answer. (The connect's time is
    ``tls``'s clock moved on, not waited for: with a timeout of 0.3 s, the handshake of the
    call that must pass needed to end within it, on a loaded machine too: review s73
    revhttps.) Session 73: the heartbeat's own (``service.served_certificate``, 2 s) too."""
    facts = served.driver().facts()
    connect = ssl.SSLSocket.connect
    taken = 0.0  # seconds the connects "took", on ``tls``'s clock only
    monkeypatch.setattr(tls, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + taken))

    def slow(sock: ssl.SSLSocket, address: Any) -> None:
        nonlocal taken
        taken += max(plans.SERVED_PIN_TIMEOUT, plans.UNTRUSTED_TIMEOUT, service.SERVED_TIMEOUT)
        taken += 0.05
        connect(sock, address)

    if call == "served_pin":
        assert await asyncio.to_thread(plans.served_pin, facts) == served.fingerprint
        monkeypatch.setattr(ssl.SSLSocket, "connect", slow)
        assert await asyncio.to_thread(plans.served_pin, facts) == ""
    elif call == "served_certificate":
        heartbeat = service.served_certificate
        address, port = facts.address, facts.https_port
        pem = await asyncio.to_thread(heartbeat, address, port)
        assert pki.fingerprint(pki.load_cert_pem(pem)) == served.fingerprint
        monkeypatch.setattr(ssl.SSLSocket, "connect", slow)
        assert await asyncio.to_thread(heartbeat, address, port) == b""
    else:
        blocked = plans.untrusted_certificate
        assert await asyncio.to_thread(blocked, facts, served.client_ca, Change.FINALIZE)
        monkeypatch.setattr(ssl.SSLSocket, "connect", slow)
        assert await asyncio.to_thread(blocked, facts, served.client_ca, Change.FINALIZE) is None


class StartedAt(QuietReference):
    """As ``QuietReference``, its status saying when the server started (``server_started``)."""

    server_started: dt.datetime
    timespec = "auto"  # (an exec command's status may say whole seconds)

    async def status(self) -> dict[str, Any]:
        started_at = self.server_started.isoformat(timespec=self.timespec)
        return {"frozen": False, "watermark": 0, "started_at": started_at}


@pytest.mark.parametrize("started", ["after", "before", "in its second, said in seconds"])
async def test_a_way_back_settled_from_a_journal_put_back_takes_the_served_pin_only_unrestarted(
    served: Served, https_listener: None, started: str
) -> None:
    """Review s72 (L): ``Runner._settle_restored`` (a transaction unfinished in a journal put
    back from a copy, settled by what the server runs) took either pin of the source
    (``Plan.source_fingerprint``: the certificate its file held, and the one it served when
    planned), where the way back's own check (``restore_pin``) takes the served one only
    where nothing restarted the server since. The copy's phase cannot say whether anything
    did: a server that started after the transaction began now counts restarted, and one
    serving the certificate of before, not its file's, is not "rolled_back" but the
    admin's; one that started before it passes on the certificate it served then. Review s73
    revhttps: a status that says when in whole seconds (an exec command's) says a start
    within the second the transaction began as before it: restarted, as far as it can tell."""
    renewed, renewed_key = byo_certs.leaf(byo_certs.make_ca("Praxis own"), [served.address])
    served.cert.write_bytes(byo_certs.pem(renewed))  # (on disk only: the listener keeps its own)
    write_private(served.key, byo_certs.key_pem(renewed_key))
    driver = StartedAt(served.driver().config_file, served.etc.parent / "refserver.log")
    built = await asyncio.to_thread(
        plans.rollback_plan, served.journal, driver, served.txn_dir, "b1", undoes=""
    )
    assert built.plan.source_fingerprint == f"{pki.fingerprint(renewed)},{served.fingerprint}"
    began = dt.datetime.now(dt.UTC)
    restarted = started != "before"
    driver.server_started = began + dt.timedelta(minutes={"after": 1, "before": -1}.get(started, 0))
    if started.endswith("in seconds"):
        driver.timespec = "seconds"  # (began's second: before it as said, maybe not as it was)
    txn = served.journal.create(
        Txn(
            "b1",
            TxnKind.ROLLBACK,
            1,
            Phase.RB_RESTARTED,  # (as the copy had it)
            built.plan.to_json(),
            began,
            failed_phase=Phase.RESTARTED,
            restart_needed=True,
            target_config=built.config,
            source_config=driver.read_config(),  # (live: the source)
        )
    )

    async def no_wait(_seconds: float) -> None:
        await asyncio.sleep(0)

    runner = Runner(served.journal, driver, lambda: dt.datetime.now(dt.UTC), sleep=no_wait)
    settled = await runner._settle_restored(txn)

    if restarted:
        assert settled.outcome is TxnOutcome.FAILED, settled.reason
        said = f"presents {served.fingerprint}, not the certificate it served before"
        assert f"{said} {pki.fingerprint(renewed)}:" in settled.reason, settled.reason
    else:
        assert settled.outcome is TxnOutcome.ROLLED_BACK, settled.reason


@pytest.mark.parametrize(
    ("started_at", "before"),
    [
        ("2026-12-03T13:39:59+00:00", True),  # a whole second before 13:40:00.300
        ("2026-12-03T13:40:00+00:00", False),  # in seconds: may be 13:40:00.9, after
        ("2026-12-03T13:40:00.299+00:00", True),
        ("2026-12-03T13:40:00.300+00:00", False),  # (the very millisecond: not before)
        ("2026-12-03T13:40:00.2+00:00", True),  # a stamp in tenths: 13:40:00.2..0.3
        ("2026-12-03T13:40:00.25+00:00", True),
        ("2026-12-03T13:40:00.299999+00:00", True),
        ("2026-12-03T13:39:00+00:00", True),  # a stamp in minutes (by its digits): 13:39:xx
        ("2026-12-03T13:40:00.100", False),  # no zone
        ("", False),
    ],
)
def test_a_start_is_before_a_transaction_only_by_a_grain_of_its_stamp(
    started_at: str, before: bool
) -> None:
    """Review s73 revhttps: ``_started_before`` (which decides whether a put-back settle takes
    the certificate served at plan time) compared the stamp as if exact; a ``started_at`` is
    cut down to its grain (whole seconds in README's example of a status), so a server the
    transaction restarted within the second it began read as started before it."""
    began = dt.datetime(2026, 12, 3, 13, 40, 0, 300000, tzinfo=dt.UTC)
    assert _started_before({"started_at": started_at}, began) is before
    assert _started_before(None, began) is False


def switch_request(change: Change, rollout_id: str = "p1") -> agent_pb2.SwitchRequest:
    verifier = ""
    if change is Change.CHANGE_PASSWORD:
        verifier = password.verifier_to_json(password.make_verifier("pw", **password.TEST_PARAMS))
    return agent_pb2.SwitchRequest(
        command=agent_pb2.Command(rollout_id=rollout_id, epoch=1),
        change=CHANGE.wire(change),
        auth_verifier_json=verifier,
    )


class Counted(QuietReference):
    """As ``QuietReference``, its freezes counted."""

    freezes = 0

    async def freeze(self, drain_timeout: float) -> int:
        self.freezes += 1
        return 0


@pytest.mark.parametrize("change", KEEPS_CERTIFICATE)
async def test_a_switch_keeping_a_certificate_its_ca_no_longer_issued_is_refused_unfrozen(
    served: Served,
    https_listener: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Change,
) -> None:
    """Review s72 (L): the start's check of a change that keeps the server's certificate
    (``plans.plan_problem``: its CA did not issue it) was not made again at the switch: a
    server whose certificate changed between the start's check and its switch still froze,
    restarted and rolled back. The Switch asks again before anything is frozen or written,
    and refuses it with the check's own words (FAILED_PRECONDITION: the leader's "switch
    refused: …; nothing on the node was changed")."""
    driver = Counted(served.driver(listen=listens(change)).config_file, served.etc / "log")
    config = driver.read_config()
    agent, runner = an_agent(served, driver, tmp_path, monkeypatch)

    with pytest.raises(Aborted) as refused:
        await agent.Switch(switch_request(change), cast(Any, FakeContext()))

    code, details = refused.value.args
    assert code == grpc.StatusCode.FAILED_PRECONDITION, refused.value.args
    assert f"not one its CA {served.client_ca} issued" in details, details
    assert "run rotate-cert first" in details and "\n" not in details, details
    assert served.journal.get("p1", TxnKind.SWITCH) is None
    assert (driver.freezes, runner.tasks, driver.read_config()) == (0, {}, config)


async def test_a_switch_on_a_node_that_needs_the_admin_is_refused_so_before_the_certificate(
    served: Served, https_listener: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s73 revhttps: the switch's second untrusted-certificate check came before the
    refusal of a node whose journal, put back from a copy, needs the admin (``_begin``'s):
    such a node answered with the certificate's words, which the leader takes for a refusal
    of a node nothing began on ("nothing on the node was changed"), where the put-back words
    make it ask the admin (``rollout_core.after_refusal``: the copy may be older than a try
    that began the switch). The needs-admin refusal comes first, no handshake made."""
    driver = Counted(served.driver().config_file, served.etc / "log")
    why = f"{JOURNAL_PUT_BACK}switch of rollout p0: not settled by what the server runs"
    monkeypatch.setattr(served.journal, "needs_admin", lambda: why)
    agent, runner = an_agent(served, driver, tmp_path, monkeypatch)
    handshakes: list[str] = []

    def untrusted(*_args: Any) -> str:  # (a certificate its CA no longer issued)
        handshakes.append("untrusted_certificate")
        return "the server's certificate is not one its CA issued …; run rotate-cert first"

    monkeypatch.setattr(plans, "untrusted_certificate", untrusted)

    with pytest.raises(Aborted) as refused:
        await agent.Switch(switch_request(Change.CHANGE_PASSWORD), cast(Any, FakeContext()))

    code, details = refused.value.args
    assert code == grpc.StatusCode.FAILED_PRECONDITION, refused.value.args
    assert details.startswith(f"{NEEDS_ADMIN}{why}"), details
    assert handshakes == [] and driver.freezes == 0 and runner.tasks == {}


@pytest.mark.parametrize(
    ("change", "quiet"),
    [*((change, 0) for change in sorted(KEEPS_CERTIFICATE)), (Change.FINALIZE, 600)],
)
async def test_a_switch_on_a_busy_node_is_refused_as_busy_before_the_certificate(
    served: Served,
    https_listener: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Change,
    quiet: int,
) -> None:
    """Session 73's L (httpsl): a node busy with another transaction (not ended) answered a
    Switch that keeps the certificate with the untrusted certificate's words, its check made
    (a handshake with a server that other transaction may be restarting) before ``_begin``'s
    "busy". The refusal is now in ``_begin``'s order: the node's state (needs the admin,
    busy) before the plan's checks; no handshake is made. So is a ``finalize --when-quiet``'s
    (session 74's L4): it asked the server for its clients first, and a busy node answered
    with the quiet check's words ("cannot tell"), the server read under that other
    transaction's restart."""
    driver = Counted(served.driver(listen=listens(change)).config_file, served.etc / "log")
    asked: list[str] = []

    async def clients_now() -> ClientsView:
        asked.append("clients_now")
        return ClientsView(problem="its restart under way")  # (the quiet check refuses)

    monkeypatch.setattr(driver, "clients_now", clients_now)
    other = Txn("p0", TxnKind.ROLLBACK, 1, Phase.STARTED, {}, dt.datetime.now(dt.UTC))
    await dbthread.run(served.journal.create, other)
    agent, runner = an_agent(served, driver, tmp_path, monkeypatch)
    handshakes: list[str] = []

    def untrusted(*_args: Any) -> str:  # (a certificate its CA no longer issued)
        handshakes.append("untrusted_certificate")
        return "the server's certificate is not one its CA issued …; run rotate-cert first"

    monkeypatch.setattr(plans, "untrusted_certificate", untrusted)

    request = switch_request(change)
    request.quiet_seconds = quiet
    with pytest.raises(Aborted) as refused:
        await agent.Switch(request, cast(Any, FakeContext()))

    code, details = refused.value.args
    assert code == grpc.StatusCode.FAILED_PRECONDITION, refused.value.args
    assert details == "this node is busy with rollback of rollout p0", details
    assert handshakes == asked == [] and driver.freezes == 0 and runner.tasks == {}
    assert served.journal.get("p1", TxnKind.SWITCH) is None


async def test_a_switch_sent_again_finds_its_transaction_before_any_handshake(
    served: Served,
    https_listener: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review s72 (L): a Switch repeated (the leader's watch reopened with ``switch`` set)
    made its plan's handshake (``plans.take_served_pin``) before it found the transaction
    it reports. It finds the transaction first now: no handshake, once the runner holds the
    switch, or (an agent restarted since) the journal does."""
    driver = served.driver(listen=listens(Change.FINALIZE), client_ca_file=str(served.own_ca))
    handshakes: list[str] = []
    connect = tls.connect

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLSocket:
        handshakes.append(str(args[1:3]))
        return connect(*args, **kwargs)

    monkeypatch.setattr(tls, "connect", counted)
    agent, runner = an_agent(served, driver, tmp_path, monkeypatch)
    request = switch_request(Change.FINALIZE)
    await agent.Switch(request, cast(Any, FakeContext()))
    done = await runner.tasks[("p1", TxnKind.SWITCH.value)]
    assert done.outcome is TxnOutcome.COMPLETED, done.reason
    assert handshakes, "the first Switch made its plan's handshakes"
    handshakes.clear()

    again = await agent.Switch(request, cast(Any, FakeContext()))
    restarted, _ = an_agent(served, driver, tmp_path, monkeypatch)  # (its runner knows none)
    after_a_restart = await restarted.Switch(request, cast(Any, FakeContext()))

    assert handshakes == []
    for reply in (again, after_a_restart):
        assert (reply.rollout_id, reply.outcome) == ("p1", TXN_OUTCOME.wire(TxnOutcome.COMPLETED))
