"""The daemons' test-only environment knobs (``tlsroll.testhooks``; audit s75 knobaudit): an
installed daemon refuses to start with any set, a daemon elsewhere says each it reads, and
the agent's feature knob names no feature this build lacks. In-process: the fronts and the
start's lines, no daemon started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from leader import engine
from leader import front as leader_front
from leader import runtime as leader_runtime
from leader.tokens import JoinToken
from nodeagent import front as agent_front
from nodeagent import runtime as agent_runtime
from nodeagent import transaction
from tests.refserver_helper import write_toml
from tlsroll import daemon, features, fsutil, keywrap, testhooks
from tlsroll.password import generate_password

PIN = "sha256:" + "ab" * 32


def test_a_test_knob_is_refused_for_an_installed_daemon_only(tmp_path: Path) -> None:
    """Refused for a unit's data dir or config (through a link too), whichever test knob is
    set; never for another dir, nor with none set (empty is as unset, but the feature knob's
    empty is "no features"). One line, naming the knob."""
    unit = tmp_path / "var-lib-tlsroll-agent"
    unit.mkdir()
    link = tmp_path / "link"
    link.symlink_to(unit)
    units = (unit,)
    crash = {transaction.CRASH_ENV: "started"}
    refused = testhooks.refused((tmp_path / "elsewhere", unit), crash, units)
    assert refused is not None and "\n" not in refused
    assert transaction.CRASH_ENV in refused and str(unit) in refused
    assert testhooks.refused((link,), crash, units) is not None
    assert testhooks.refused((tmp_path / "elsewhere",), crash, units) is None
    assert testhooks.refused((unit,), {"TLSROLL_DEBUG": "1", "PATH": "/bin"}, units) is None
    assert testhooks.refused((unit,), {engine.TEST_LEASE_MARGIN_ENV: ""}, units) is None
    assert testhooks.refused((unit,), {features.TEST_ENV: ""}, units) is not None
    many = {f"TLSROLL_TEST_X{i}": "1" for i in range(5)}
    assert "and 2 more" in (testhooks.refused((unit,), many, units) or "")
    # The units of deploy/systemd: their data dirs and configs.
    assert Path("/var/lib/tlsroll-agent") in testhooks.INSTALLED
    assert Path("/etc/tlsroll/agent.toml") in testhooks.INSTALLED
    assert Path("/var/lib/tlsroll/leader.toml") in testhooks.INSTALLED


def test_the_refusal_says_how_to_unset_it_in_a_shell_too(tmp_path: Path) -> None:
    """Review s75 revknob: an admin runs ``tlsroll-agent --journal-checked`` or
    ``--reinitialise`` (``runuser -u tlsroll -- tlsroll-leader --reinitialise``, which keeps
    the shell's environment) from a shell that exports a test knob (a developer's
    ``TLSROLL_TEST_SLOT``): the refusal sent them to the unit's drop-ins, which hold nothing.
    It names the shell's way too, with the knobs to unset."""
    unit = tmp_path / "unit"
    env = {"TLSROLL_TEST_SLOT": "3", transaction.CRASH_ENV: "started"}
    refused = testhooks.refused((unit,), env, (unit,)) or ""
    assert "\n" not in refused
    assert f"unset {transaction.CRASH_ENV} TLSROLL_TEST_SLOT" in refused, refused
    assert "Environment=" in refused  # (the unit's way still said)


def _keep_root_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's front sets fsutil's process-wide "runs as root" switch: put back after."""
    monkeypatch.setattr(fsutil, "_AS_ROOT_ONLY", fsutil._AS_ROOT_ONLY)


def _no_test_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the suite's own (conftest's scrypt hook, ``TLSROLL_TEST_SLOT``) in the way."""
    for name in list(os.environ):
        if name.startswith(testhooks.PREFIXES):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("installed", ["data_dir", "config"])
def test_an_installed_agent_refuses_to_start_with_a_test_knob(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    installed: str,
) -> None:
    """Before: an agent with ``TLSROLL_AGENT_TEST_CRASH_AFTER`` left in its unit's environment
    killed itself at that phase of every switch, without a word. Now: exit 2, one line, in the
    front (nothing of the daemon imported for it)."""
    _keep_root_switch(monkeypatch)
    _no_test_knobs(monkeypatch)
    data = tmp_path / "data"
    config = write_toml(
        tmp_path / "agent.toml",
        {
            "node": {"name": "node1", "addresses": ["127.0.0.1"]},
            "leader": {"address": "127.0.0.2", "ca_pin": PIN, "join_token": "t"},
            "agent": {"data_dir": str(data)},
        },
    )
    monkeypatch.setattr(testhooks, "INSTALLED", (data if installed == "data_dir" else config,))
    monkeypatch.setenv(transaction.CRASH_ENV, "config_written")
    assert agent_front.start(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tlsroll-agent: config error: environment: ")
    assert transaction.CRASH_ENV in err and "installed" in err
    monkeypatch.delenv(transaction.CRASH_ENV)
    assert isinstance(agent_front.start(["--config", str(config)]), tuple)  # (loaded, no start)
    monkeypatch.setattr(testhooks, "INSTALLED", ())
    monkeypatch.setenv(transaction.CRASH_ENV, "config_written")
    assert isinstance(agent_front.start(["--config", str(config)]), tuple)  # a test's: goes on


def test_an_installed_leader_refuses_to_start_with_any_test_knob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: only the scrypt hook was refused for the installed leader's data dir; a lease
    margin of a second (or any other hook) in its unit's environment was a warning at most.
    Now every test knob is refused there, before the data dir is looked at (exit 2)."""
    data = tmp_path / "d"
    config = write_toml(
        tmp_path / "leader.toml", {"leader": {"address": "127.0.6.1", "data_dir": str(data)}}
    )
    monkeypatch.setattr(testhooks, "INSTALLED", (config,))
    _no_test_knobs(monkeypatch)
    monkeypatch.setenv(engine.TEST_LEASE_MARGIN_ENV, "1")
    assert leader_front.start(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tlsroll-leader: config error: environment: ")
    assert engine.TEST_LEASE_MARGIN_ENV in err
    monkeypatch.setattr(testhooks, "INSTALLED", (data,))  # its data dir, not there yet
    assert leader_front.start(["--config", str(config)]) == 2
    assert engine.TEST_LEASE_MARGIN_ENV in capsys.readouterr().err


def test_the_agent_says_each_test_knob_it_reads_at_its_start() -> None:
    """Before: of the agent's knobs only the handshake's was said; one that kills it mid-switch,
    cancels a switch at a stop at once, or hides a disk not mounted, said nothing."""
    env = {
        transaction.TERM_ENV: "frozen",
        agent_runtime.TXN_GRACE_ENV: "0",
        fsutil.TEST_MOUNT_ROOT_ENV: "/tmp/x",
        features.TEST_ENV: "",
        keywrap.TEST_KDF_N_ENV: "256",  # (the leader's: not the agent's to say)
        "TLSROLL_TEST_SLOT": "6",  # (the suite's)
    }
    with capture_logs() as said:
        agent_runtime.say_test_hooks(env)
    assert [(e["event"], e["hook"], e["value"], e["log_level"]) for e in said] == [
        ("agent.test_hook", features.TEST_ENV, "", "warning"),
        ("agent.test_hook", transaction.TERM_ENV, "frozen", "warning"),
        ("agent.test_hook", agent_runtime.TXN_GRACE_ENV, "0", "warning"),
        ("agent.test_hook", fsutil.TEST_MOUNT_ROOT_ENV, "/tmp/x", "warning"),
    ]
    assert all("tests only" in e["hint"] for e in said)


def test_the_leader_s_test_hook_line_says_what_to_do() -> None:
    with capture_logs() as said:
        leader_runtime._test_hook(engine.TEST_LEASE_MARGIN_ENV, 1.0)
    (line,) = said
    assert "tests only" in line["hint"] and "Environment=" in line["hint"]


def test_the_feature_knob_names_no_feature_this_agent_lacks() -> None:
    """Before: ``TLSROLL_AGENT_TEST_FEATURES`` could name a later release's feature, which a
    later leader would take this agent to honour (its request's meaning dropped unread)."""
    named = features.agent_features({features.TEST_ENV: f"{features.KEEP_HTTP},switch.later"})
    assert named == (features.KEEP_HTTP,)
    assert features.agent_features({features.TEST_ENV: ""}) == ()
    assert features.agent_features({}) == features.AGENT_FEATURES


def test_a_daemon_s_debug_traceback_holds_no_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``TLSROLL_DEBUG=1`` (or ``--log-level debug``) printed an unforeseen error's
    traceback as it was, its message and those of the errors it came from: a join token read
    among it went into the journal. Now the traceback is shown with such parts hidden."""
    token = str(JoinToken.generate())
    password = generate_password()
    try:
        try:
            raise ValueError(f"cannot read {password!r}")
        except ValueError as first:
            raise RuntimeError(f"join_token = {token}") from first
    except RuntimeError as exc:
        caught = exc
    monkeypatch.setenv("TLSROLL_DEBUG", "1")
    assert daemon.internal_error("tlsroll-agent", caught) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError" in err and "ValueError" in err  # still shown
    assert token.partition(".")[2] not in err and token not in err, err
    assert password not in err, err
    assert "not shown" in err
