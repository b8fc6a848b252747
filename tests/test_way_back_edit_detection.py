"""Which server configs the way back to http calls edited since tlsroll wrote them
(``plans.edited_since``; review of branch s59-wayback): the way back's plan names such a node
and its agent keeps the file beside the config before it puts back the config from before
the switch. Nothing is kept, and nothing said, for a file as tlsroll wrote it; an edit the
way back undoes is never undone silently. Real journals (SQLite) and real drivers' renders
throughout."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from nodeagent import plans
from nodeagent.drivers import Driver, ServerFacts, SystemdDriver, Target
from nodeagent.journal import Journal, Txn
from nodeagent.transaction import Phase, Plan
from tlsroll.config import Section
from tlsroll.enums import TxnKind, TxnOutcome

HTTPS = ("https",)
AT = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def plan_json(source: tuple[str, ...], target: tuple[str, ...]) -> dict[str, Any]:
    facts = ServerFacts("127.0.0.1", "/", 8080, 8443, target)
    return Plan(facts, source, target, Path("/n"), Path("/b"), Path("/ca"), "").to_json()


def journalled(
    journal: Journal,
    rollout_id: str,
    found: bytes,
    wrote: bytes,
    outcome: TxnOutcome,
    *,
    at: dt.datetime = AT,
    source: tuple[str, ...] = HTTPS,
) -> None:
    """A switch (enable-tls from ``source``, or a later rotate-cert) that found ``found`` and
    wrote ``wrote``, ended with ``outcome``."""
    txn = journal.create(
        Txn(
            rollout_id,
            TxnKind.SWITCH,
            1,
            Phase.VERIFIED,
            plan_json(source, HTTPS),
            at,
            source_config=found,
            target_config=wrote,
        )
    )
    if outcome is TxnOutcome.COMPLETED:
        journal.complete(txn, None, phase=Phase.COMPLETED, outcome=outcome)
    elif outcome is TxnOutcome.ROLLED_BACK:
        journal.update(txn, phase=Phase.ROLLED_BACK, outcome=outcome)
    else:
        journal.update(txn, phase=Phase.FAILED, outcome=outcome)


def template_driver(tmp_path: Path) -> SystemdDriver:
    """The systemd driver: its config rendered from the admin's template."""
    template = tmp_path / "server.conf.in"
    template.write_text("listen $listen;\ncert $cert_file;\n")
    settings = {
        "config_file": str(tmp_path / "server.conf"),
        "template": str(template),
        "app_path": "/",
        "unit": "x.service",
        "admin_socket": str(tmp_path / "admin.sock"),
    }
    return SystemdDriver(Section(tmp_path / "agent.toml", "server", settings), "127.0.0.1")


def edited(journal: Journal, driver: Driver, live: bytes) -> bool:
    """What the agent answers the way back's plan (the live config ``live``)."""
    driver.config_file.write_bytes(live)
    answer = plans.edited_config(journal, driver, HTTPS)
    assert answer in ("", str(driver.config_file))
    return answer != ""


@pytest.mark.parametrize("carried", [False, True])
def test_a_change_after_a_hand_edit_claims_it_only_where_its_render_carried_it(
    tmp_path: Path, carried: bool
) -> None:
    """Review M1 (a): the systemd and exec drivers render a rotate-cert's config from the
    template, so a hand edit of the live config before it is gone from what it wrote: that
    file, byte for byte as tlsroll wrote it, was still called edited (and a needless copy
    kept). A driver whose render carries the live config's settings (``config_decides``: the
    reference server's) wrote the edit over: the way back would undo it, and says so."""
    driver = template_driver(tmp_path)
    driver.config_decides = carried  # (the bytes below stand for either driver's render)
    journal = Journal(tmp_path / "journal.sqlite3")
    on_http = driver.render(Target(("http",)))
    switched = driver.render(Target(HTTPS, cert_file=tmp_path / "a.pem"))
    by_hand = switched + b"client_max_body_size 1m;\n"
    rotated = driver.render(Target(HTTPS, cert_file=tmp_path / "b.pem"))
    if carried:  # the reference server's render keeps every other setting
        rotated += b"client_max_body_size 1m;\n"
    journalled(journal, "r1", on_http, switched, TxnOutcome.COMPLETED, source=("http",))
    assert not edited(journal, driver, switched)
    assert edited(journal, driver, by_hand)
    journalled(journal, "r2", by_hand, rotated, TxnOutcome.COMPLETED, at=AT + dt.timedelta(1))
    assert edited(journal, driver, rotated) is carried  # the file as tlsroll wrote it
    assert edited(journal, driver, rotated + b"# and again\n")  # an edit since: named
    journal.close()


def test_a_hand_edit_a_change_put_back_is_still_named_for_a_template_driver(
    tmp_path: Path,
) -> None:
    """A rotate-cert that found the config edited by hand and was rolled back put that file
    back, edit and all: still named (the way back undoes it)."""
    driver = template_driver(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite3")
    switched = driver.render(Target(HTTPS, cert_file=tmp_path / "a.pem"))
    by_hand = switched + b"client_max_body_size 1m;\n"
    rotated = driver.render(Target(HTTPS, cert_file=tmp_path / "b.pem"))
    journalled(journal, "r1", b"http\n", switched, TxnOutcome.COMPLETED, source=("http",))
    journalled(journal, "r2", by_hand, rotated, TxnOutcome.ROLLED_BACK, at=AT + dt.timedelta(1))
    assert edited(journal, driver, by_hand)
    journal.close()


@pytest.mark.parametrize("carried", [False, True])
def test_a_repair_by_hand_after_a_failed_change_is_named(tmp_path: Path, carried: bool) -> None:
    """Review M2: a rotate-cert that failed asks the admin to repair the server; a repair of
    its config by hand is neither the config it found nor the one it wrote, and the way back
    undoes it: named. The file as the failed change found it or left it is not."""
    driver = template_driver(tmp_path)
    driver.config_decides = carried
    journal = Journal(tmp_path / "journal.sqlite3")
    journalled(journal, "r1", b"http\n", b"https 1\n", TxnOutcome.COMPLETED, source=("http",))
    journalled(
        journal, "r2", b"https 1\n", b"https 2\n", TxnOutcome.FAILED, at=AT + dt.timedelta(1)
    )
    assert edited(journal, driver, b"https 1\ndata_dir = /srv/new\n")  # the admin's repair
    assert not edited(journal, driver, b"https 1\n")  # as it found it
    assert not edited(journal, driver, b"https 2\n")  # as it left it
    # One that failed after it found the config edited: the file it wrote holds the edit only
    # where the driver's render carries it.
    journalled(
        journal,
        "r3",
        b"https 2\n# hand\n",
        b"https 3\n",
        TxnOutcome.FAILED,
        at=AT + dt.timedelta(2),
    )
    assert edited(journal, driver, b"https 2\n# hand\n")
    assert edited(journal, driver, b"https 3\n") is carried
    journal.close()


def test_the_changes_after_the_switch_are_those_journalled_after_it_whatever_the_clock(
    tmp_path: Path,
) -> None:
    """Review L4: the changes after the switch were read by their wall-clock start: a
    rotate-cert begun after it, stamped earlier (the clock stepped back), was not among them,
    and the config it wrote was called edited."""
    driver = template_driver(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite3")
    journalled(journal, "r1", b"http\n", b"https 1\n", TxnOutcome.COMPLETED, source=("http",))
    back = AT - dt.timedelta(minutes=5)
    journalled(journal, "r2", b"https 1\n", b"https 2\n", TxnOutcome.COMPLETED, at=back)
    assert not edited(journal, driver, b"https 2\n")
    assert edited(journal, driver, b"https 1\n")  # what r2 replaced: not what tlsroll left
    journal.close()
