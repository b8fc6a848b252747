"""``tlsroll notify`` through the real CLI against a real leader, two agents and their reference
servers on loopback: an announced switch before any rollout, the schema's times after it, the
password block only for the staged password (a superseded one is refused), wording per change,
the practice's time zone, HTML, and bad input as one line with exit code 2."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader.cli.notify import day_text
from tests.cluster import LEADER_POLL, Cluster, child_env, command, one_line_error, wait_until
from tests.conftest import next_loopback
from tests.test_interactive import Terminal
from tests.test_password_rollout import PW1, PW2, World, secret_file
from tlsroll.v1 import admin_pb2

pytestmark = pytest.mark.slow

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
GENERATED = "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"  # (the shape of tlsroll.password.generate_password)


@pytest.fixture
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("notify"), nodes=2)
    try:
        yield w.start()
    finally:
        w.close()


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "adapt it to the practice" in result.stderr  # the reminder goes to the admin only
    return result.stdout


def usage_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    return one_line_error(result.stderr, "tlsroll")


def ahead(days: int = 5) -> dt.datetime:
    """A time in the future, on the minute, in Berlin."""
    when = (dt.datetime.now(BERLIN) + dt.timedelta(days=days)).replace(
        hour=18, minute=0, second=0, microsecond=0
    )
    return when


def next_last_sunday(month: int) -> dt.date:
    """The last Sunday of ``month`` (Europe/Berlin changes its clocks that night), the next
    one more than a day from now."""
    year = dt.date.today().year
    while True:
        last = dt.date(year, month + 1, 1) - dt.timedelta(days=1)
        sunday = last - dt.timedelta(days=(last.weekday() - 6) % 7)
        if sunday > dt.date.today() + dt.timedelta(days=1):
            return sunday
        year += 1


DST_CASES = [
    (10, "2h", "von 01:30 Uhr (MESZ) bis 02:30 Uhr (MEZ)"),  # the clocks go back at 03:00
    (3, "1h", "von 01:30 Uhr (MEZ) bis 03:30 Uhr (MESZ)"),  # 02:00 becomes 03:00
]


def an_announced_end_is_its_duration_after_the_start_across_a_dst_change(
    world: World, month: int, duration: str, says: str
) -> None:
    """Session 35's clock audit, E: the end was the start plus the duration in wall-clock
    terms, so across a change of daylight saving time the practice read an end an hour late
    (3 real hours for --duration 2h) or in the hour that does not exist (02:30 MEZ). Runs
    before the rollout of the test below: an announced enable-tls needs nodes on http."""
    when = f"{next_last_sunday(month):%Y-%m-%d} 01:30"
    args = ["notify", "--when", when, "--scope", "cluster", "--duration", duration]
    args += ["--timezone", "Europe/Berlin"]
    assert says in ok(world.cli(*args))


def test_notify_before_during_and_after(world: World, tmp_path: Path) -> None:
    """The notices before, during and after a rollout and its way back; first the announced
    ends across a change of daylight saving time, last the bad input (both were tests of their
    own on this module's cluster before: pytest-xdist handed them to either worker, and each
    worker that got one started a cluster of its own)."""
    for month, duration, says in DST_CASES:
        an_announced_end_is_its_duration_after_the_start_across_a_dst_change(
            world, month, duration, says
        )
    # --- before any rollout: the old command pointed to `plan`, which stores nothing
    line = usage_error(world.cli("notify"), 1)
    assert "--when" in line and "plan" not in line

    when = ahead()
    text = ok(
        world.cli(
            "notify",
            "--when",
            f"{when:%Y-%m-%d %H:%M}",
            "--scope",
            "cluster",
            "--duration",
            "30m",
            "--timezone",
            "Europe/Berlin",
        )
    )
    zone = "MESZ" if when.dst() else "MEZ"
    assert (
        f"Die Umstellung ist für {day_text(when, 'de')}, von 18:00 bis 18:30 Uhr ({zone})" in text
    )
    assert "geplant" in text and "keine neuen Einträge" in text
    # no node runs a password yet: the rollout's start sets it (said before it is asked for)
    early = secret_file(tmp_path / "pw-early", PW1)  # (off a terminal: the file, s49cli L3)
    first = world.cli(
        "notify", "--when", f"{when:%Y-%m-%d %H:%M}", "--scope", "cluster", "--include-password",
        "--password-file",
        str(early),
    )  # fmt: skip
    assert "enable-tls sets its password when it starts" in usage_error(first)
    for node in world.nodes:  # as its agent answered the plan (session 64's review M2)
        assert f"{node.name}: neu https://{node.address}:8443/praxis_live/ (bisher http" in text
    assert "Nur der Anfang der Adresse ändert sich" not in text
    assert world.schema()["rollouts"] == []  # announcing stored nothing

    # the leader on UTC, a German notice: Europe/Berlin; an English one keeps the leader's zone
    utc = world.cluster.cli(
        "notify", "--when", f"{when:%Y-%m-%d %H:%M}", "--scope", "cluster", env={"TZ": "UTC"}
    )
    assert f"um 18:00 Uhr ({zone})" in ok(utc)
    # ... and says so on stderr, with what makes a German and an English notice agree (the
    # two of one switch named times an hour apart with nothing saying so: s71 walkthrough M3)
    said = " ".join(utc.stderr.split())
    assert "--when is read in Europe/Berlin" in said and "would read it in UTC" in said, said
    assert "--timezone ZONE" in said and "maintenance_timezone" in said, said
    ny = world.cluster.cli(
        "notify",
        "--lang",
        "en",
        "--when",
        f"{when:%Y-%m-%d %H:%M}",
        "--scope",
        "cluster",
        env={"TZ": "America/New_York"},
    )
    assert "(EST)" in ok(ny) or "(EDT)" in ny.stdout
    assert "--when is read in" not in ny.stderr  # the leader's own zone: no language's choice

    with world.cluster.admin() as admin, pytest.raises(grpc.RpcError) as none_yet:
        admin.CheckPassword(admin_pb2.CheckPasswordRequest(), timeout=10)
    assert none_yet.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no password staged" in (none_yet.value.details() or "")

    # --- the switch, then the schema's real times
    pw1 = secret_file(tmp_path / "pw1", PW1)
    rollout = world.run_rollout("--password-file", str(pw1))
    assert rollout["state"] == "completed", rollout
    text = ok(world.cli("notify", "--timezone", "Europe/Berlin"))
    started = dt.datetime.fromisoformat(rollout["started_at"].replace("Z", "+00:00"))
    local = started.astimezone(BERLIN)
    assert f"Die Umstellung fand am {day_text(local, 'de')}, " in text
    assert "(MEZ)" in text or "(MESZ)" in text
    assert "(UTC)" not in text and "Von " not in text and "Während der Umstellung" not in text
    for node in world.nodes:
        assert f"https://{node.address}:8443/praxis_live/" in text
        assert f"http://{node.address}:8080/praxis_live/" in text
    assert PW1 not in text

    # the password: only the one the nodes run
    with_pw = ok(world.cli("notify", "--include-password", "--password-file", str(pw1)))
    assert with_pw.splitlines()[0].startswith("WARNUNG") and with_pw.count(PW1) == 1
    notice_into_a_private_file(world, pw1, tmp_path)
    typed_password_rule(world)
    piped_password_is_not_read(world)
    pw2 = secret_file(tmp_path / "pw2", PW2)
    wrong = world.cli("notify", "--include-password", "--password-file", str(pw2))
    assert "not the password the notice's nodes run (version 1)" in usage_error(wrong, 1)
    assert PW2 not in wrong.stderr

    check_password_rpc(world)

    # html for e-mail programs, escaped
    page = ok(world.cli("notify", "--lang", "en", "--format", "html", "--practice", "<b>Dr. & Co"))
    assert page.startswith("<!DOCTYPE html>") and "&lt;b&gt;Dr. &amp; Co" in page
    assert "<b>Dr." not in page

    # --- a new password staged: announce the change; the superseded password is refused now
    assert world.cli("password", "set", "--password-file", str(pw2)).returncode == 0
    args = ["notify", "--when", f"{when:%Y-%m-%d %H:%M}", "--change", "change-password"]
    args += ["--scope", "cluster"]
    text = ok(world.cli(*args))
    assert text.startswith("Neues Authentifizierungspasswort")
    assert "Der Passwortwechsel beginnt am" in text and "Die Serveradresse bleibt gleich." in text
    for node in world.nodes:  # the addresses the schema recorded, path and all
        assert f"{node.name}: https://{node.address}:8443/praxis_live/" in text
    stale = world.cli(*args, "--include-password", "--password-file", str(pw1))
    assert "not the staged password" in usage_error(stale, 1)
    assert PW1 not in stale.stderr
    fresh = ok(world.cli(*args, "--include-password", "--password-file", str(pw2)))
    assert fresh.count(PW2) == 1 and PW1 not in fresh

    back = ok(world.cli("notify", "--when", f"{when:%Y-%m-%d %H:%M}", "--change", "disable-tls"))
    assert back.startswith("Rückkehr zur unverschlüsselten Verbindung (http)")
    for node in world.nodes:
        assert f"neu http://{node.address}:8080/praxis_live/" in back
    assert "Authentifizierungspasswort eingeben" not in back

    # --- the way back (audit s39ws H1): the notice about it sends the staff to http, as the
    # announcement did, not to the https port the rollback closed
    undo = world.cli("rollout", "rollback", "--yes")
    assert undo.returncode == 0, undo.stderr
    wait_until(
        lambda: world.poll()["rollouts"][0]["state"] in ("completed", "halted", "aborted"),
        90,
        "the way back",
        interval=LEADER_POLL,
    )
    undone = world.schema()["rollouts"][0]
    assert (undone["change"], undone["state"]) == ("disable-tls", "completed"), undone
    done = ok(world.cli("notify", "--timezone", "Europe/Berlin"))
    assert done.startswith("Rückkehr zur unverschlüsselten Verbindung (http)")
    for node in world.nodes:
        assert f"neu http://{node.address}:8080/praxis_live/" in done, done
        assert f"(vorher https://{node.address}:8443/praxis_live/)" in done, done
    assert "neu https" not in done, done
    for out in world.outputs:  # no password anywhere but in the notices that asked for it
        if "WARNUNG" not in out and "WARNING" not in out:
            assert PW1 not in out and PW2 not in out

    for args, says in BAD_INPUT:
        bad_input_is_one_line_and_exit_2(world, args, says)


@pytest.fixture
def stepwise(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Two nodes switched one rollout at a time: the leader node (scope local), then the
    rest (scope cluster)."""
    w = World(tmp_path_factory.mktemp("notify-stepwise"), nodes=2)
    try:
        yield w.start()
    finally:
        w.close()


def rollout(world: World, *args: str) -> dict[str, Any]:
    """``rollout start ARGS --yes``, then the rollout as it ended."""
    result = world.cli("rollout", "start", *args, "--yes")
    assert result.returncode == 0, result.stderr

    def ended() -> bool:
        return world.poll()["rollouts"][0]["state"] in ("completed", "halted", "aborted")

    wait_until(ended, 90, "the rollout to end", interval=LEADER_POLL)
    latest: dict[str, Any] = world.schema()["rollouts"][0]
    assert latest["state"] == "completed", latest
    return latest


def test_the_notice_gives_the_password_its_nodes_run_and_lists_nodes_switched_before(
    stepwise: World, tmp_path: Path
) -> None:
    """Audit s38 H1: with a password staged and no change-password rollout yet, the notice
    gave the staged one (which no workstation could use: every node still ran the old one)
    and refused the one in effect. M4: a cluster rollout after a local one left out the
    leader node, which the local one had switched."""
    world = stepwise
    node1, node2 = world.nodes
    pw1 = secret_file(tmp_path / "pw1", PW1)
    pw2 = secret_file(tmp_path / "pw2", PW2)
    https1 = f"https://{node1.address}:8443/praxis_live/"
    rollout(world, "--scope", "local", "--password-file", str(pw1))

    # Announced, the cluster's switch: node1 already switched; node2 gets node1's password
    when = f"{ahead():%Y-%m-%d %H:%M}"
    text = ok(
        world.cli(
            "notify",
            "--when",
            when,
            "--scope",
            "cluster",
            "--include-password",
            "--password-file",
            str(pw1),
        )
    )
    assert f"node1: {https1} (bereits umgestellt)" in text
    assert f"node2: neu https://{node2.address}:8443/" in text
    assert text.count(PW1) == 1

    cluster = rollout(world, "--scope", "cluster")
    states = {n["name"]: n["state"] for n in cluster["nodes"]}
    assert states == {"node1": "skipped", "node2": "done"}, cluster
    text = ok(world.cli("notify"))
    assert "Betroffen ist der gesamte Multiserver-Verbund." in text
    assert f"node1: {https1} (bereits umgestellt), Port für die Einrichtung: 9443" in text
    assert f"node2: neu https://{node2.address}:8443/praxis_live/ (vorher http://" in text
    english = ok(world.cli("notify", "--lang", "en"))
    assert f"node1: {https1} (already switched)" in english

    # A new password staged, pending on both nodes: the notice still gives the one they run
    staging = world.cli("password", "set", "--password-file", str(pw2))
    assert staging.returncode == 0, staging.stderr
    # (M3) what applies it, not "at next restart": a rotate-cert restarts and keeps the old one
    assert "`tlsroll rollout start --change change-password --scope cluster`" in staging.stdout
    assert "only when the server restarts" not in staging.stdout
    assert "another restart keeps the live password" in staging.stdout
    text = ok(world.cli("notify", "--include-password", "--password-file", str(pw1)))
    assert text.count(PW1) == 1 and PW2 not in text
    staged = world.cli("notify", "--include-password", "--password-file", str(pw2))
    line = usage_error(staged, 1)
    assert "(version 2) is staged, not in effect on any node yet" in line, line
    assert "--change change-password" in line and PW2 not in staged.stderr
    # ... and it is the one a workstation sets up with
    joined = world.test_connection(node2.https_url(), pw1, tmp_path / "ws1")
    assert joined.returncode == 0, joined.stderr
    # A change-password notice gives the staged one
    args = ["notify", "--when", when, "--scope", "cluster", "--change", "change-password"]
    args += ["--include-password"]
    assert ok(world.cli(*args, "--password-file", str(pw2))).count(PW2) == 1
    assert "not the staged password" in usage_error(
        world.cli(*args, "--password-file", str(pw1)), 1
    )

    # node2 on the new password, node1 on the old: the enable-tls notice has none to give
    rollout(world, "--change", "change-password", "--scope", "nodes", "--nodes", "node2")
    mixed = world.cli(
        "notify", "--rollout", cluster["id"], "--include-password", "--password-file", str(pw1)
    )
    line = usage_error(mixed, 1)
    assert f"the password changed since rollout {cluster['id']}" in line, line
    assert "now node2 version 2" in line, line
    for out in world.outputs:  # no password anywhere but in the notices that asked for it
        if "WARNUNG" not in out and "WARNING" not in out:
            assert PW1 not in out and PW2 not in out


def test_a_notice_about_some_servers_of_several_names_the_others_and_the_agents_addresses(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Session 64's review M1: after a local rollout (and announcing one of named nodes) the
    notice told every workstation to move to the one server switched; now only those that use
    its old address act, and the others' servers are named as keeping theirs. M2: a node
    never switched was announced with the seed's bootstrap port and "…" for its app path,
    though its agent (``[agent] bootstrap_port = 9543``) answered the plan with both."""
    world = World(tmp_path_factory.mktemp("notify-part"), nodes=3)
    try:
        world.cluster.init("--node-name", "node1")
        world.cluster.start_leader()
        node1, node2, node3 = world.nodes
        node1.start()
        node2.start()
        node3.start(extra_config={"agent": {"bootstrap_port": 9543}})
        world.cluster.wait_for_nodes_online([n.name for n in world.nodes])
        when = f"{ahead():%Y-%m-%d %H:%M}"
        http3 = f"http://{node3.address}:8080/praxis_live/"
        https3 = f"https://{node3.address}:8443/praxis_live/"

        # announced, before any rollout: node3 as its agent answered the plan
        text = ok(world.cli("notify", "--when", when, "--nodes", "node3"))
        assert f"node3: neu {https3} (bisher {http3}), Port für die Einrichtung: 9543" in text, text
        assert "Port 9543 einfach bestätigen" in text and "Port 9443" not in text
        assert "Jeder Arbeitsplatz" not in text
        assert f"Nur Arbeitsplätze, die {http3} nutzen, müssen danach" in text
        assert "Die Server node1 und node2 behalten ihre Adressen" in text
        assert "An den übrigen Arbeitsplätzen kann normal weitergearbeitet werden." in text
        english = ok(world.cli("notify", "--lang", "en", "--when", when, "--nodes", "node3"))
        assert f"node3: new {https3} (currently {http3}), port for the set-up: 9543" in english
        assert "Every workstation" not in english
        assert "The servers node1 and node2 keep their addresses" in english
        assert world.schema()["rollouts"] == []  # announcing stored nothing

        # the leader node alone: only the workstations that use its old address switch
        pw = secret_file(tmp_path / "pw", PW1)
        rollout(world, "--scope", "local", "--password-file", str(pw))
        http1 = f"http://{node1.address}:8080/praxis_live/"
        https1 = f"https://{node1.address}:8443/praxis_live/"
        text = ok(world.cli("notify"))
        assert "Jeder Arbeitsplatz" not in text, text
        assert f"Nur Arbeitsplätze, die {http1} nutzen, müssen jetzt einmal" in text
        assert "Betroffen ist ein einzelner Server." in text
        assert "Die Server node2 und node3 behalten ihre Adressen" in text
        assert f"node2: http://{node2.address}:8080/" in text and "(bleibt unverändert)" in text
        assert "Was ist jetzt an den betroffenen Arbeitsplätzen zu tun?" in text
        assert (
            f"Steht dort {http1}, diese Adresse durch {https1} ersetzen; sonst ist an diesem "
            "Arbeitsplatz nichts zu tun." in text
        )
        english = ok(world.cli("notify", "--lang", "en"))
        assert "Every workstation" not in english, english
        assert f"Only workstations that use {http1} now have to be switched" in english
        assert "The servers node2 and node3 keep their addresses" in english
        assert f"If it shows {http1}, replace it with {https1}; if not" in english

        # node3 announced after it: node1 is on https now, node2 still on http
        text = ok(world.cli("notify", "--lang", "en", "--when", when, "--nodes", "node3"))
        assert f"node1: {https1} (unchanged)" in text
        assert "port for the set-up: 9543" in text and "port 9443" not in text
        # ... also with node1 not heard (offline, and the leader restarted since): its https
        # address from the records, not its old http one (review b3 of s64, L5)
        assert node1.agent is not None
        node1.agent.stop()
        world.cluster.stop_leader()
        world.cluster.start_leader()
        world.cluster.wait_for_nodes_online(["node2", "node3"])
        text = ok(world.cli("notify", "--lang", "en", "--when", when, "--nodes", "node3"))
        assert f"node1: {https1} (unchanged)" in text, text
    finally:
        world.close()


PW3 = "third-password-8vn2-r5jt"


def test_a_notice_about_a_rollout_gives_the_password_it_applied(tmp_path: Path) -> None:
    """Review s38ntf2 M2: the notice at once after `rollout start --password-file` (no node
    done yet) gives the password the start set. H1: a change-password notice about a rollout
    that ran gives the password it applied, not one staged since (no workstation could use
    that one: the node runs the applied one); a done node whose password changed since is
    said to be so."""
    world = World(tmp_path / "w", nodes=2)
    try:
        world.start()
        pw1 = secret_file(tmp_path / "pw1", PW1)
        pw2 = secret_file(tmp_path / "pw2", PW2)
        pw3 = secret_file(tmp_path / "pw3", PW3)
        started = world.cli(
            "rollout", "start", "--scope", "cluster", "--max-parallel", "1",
            "--password-file", str(pw1), "--yes",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        assert world.cli("rollout", "pause").returncode == 0
        running = ok(world.cli("notify", "--include-password", "--password-file", str(pw1)))
        assert running.count(PW1) == 1
        assert "not the password the notice's nodes run (version 1)" in usage_error(
            world.cli("notify", "--include-password", "--password-file", str(pw2)), 1
        )
        assert world.cli("rollout", "resume").returncode == 0
        wait_until(
            lambda: world.poll()["rollouts"][0]["state"] == "completed",
            90,
            "the switch",
            interval=LEADER_POLL,
        )
        enable = world.schema()["rollouts"][0]
        assert enable["auth_version"] == 1

        assert world.cli("password", "set", "--password-file", str(pw2)).returncode == 0
        changed = rollout(world, "--change", "change-password", "--scope", "cluster")
        assert changed["auth_version"] == 2
        assert world.cli("password", "set", "--password-file", str(pw3)).returncode == 0
        staged = world.cli("notify", "--include-password", "--password-file", str(pw3))
        line = usage_error(staged, 1)
        assert "(version 3) is staged, not in effect on any node yet" in line, line
        assert PW3 not in staged.stderr
        text = ok(world.cli("notify", "--include-password", "--password-file", str(pw2)))
        assert "Neues Authentifizierungspasswort" in text and text.count(PW2) == 1
        # ... the one a workstation sets up with
        node = world.nodes[1]
        joined = world.test_connection(node.https_url(), pw2, tmp_path / "ws2")
        assert joined.returncode == 0, joined.stderr
        # the enable-tls rollout's password is no longer the nodes' one
        old = world.cli(
            "notify", "--rollout", enable["id"], "--include-password", "--password-file", str(pw1)
        )
        line = usage_error(old, 1)
        assert f"the password changed since rollout {enable['id']}" in line, line
        check_password_about(world)
        for out in world.outputs:
            if "WARNUNG" not in out and "WARNING" not in out:
                assert PW1 not in out and PW2 not in out and PW3 not in out
    finally:
        world.close()


def check_password_about(world: World) -> None:
    """Admin.CheckPassword ``about`` (review s38ntf2 L4), with versions 1 to 3 staged and both
    nodes on 2: that version's parameters, the nodes' versions, a version not staged and a
    hash made under another version refused, each said as what it is."""
    rows = world.cluster.store_rows(("auth_versions",), ignore=("created_at", "actor"))
    stored = {v: json.loads(text) for v, text in rows["auth_versions"]}
    assert sorted(stored) == [1, 2, 3]
    with world.cluster.admin() as admin:
        two = admin.CheckPassword(admin_pb2.CheckPasswordRequest(about=2), timeout=10)
        assert (two.version, two.newest, two.salt) == (2, 3, stored[2]["salt"])
        assert {n.node: n.version for n in two.live} == {"node1": 2, "node2": 2}
        digest = base64.b64decode(stored[2]["hash"])
        right = admin.CheckPassword(
            admin_pb2.CheckPasswordRequest(candidate_hash=digest, version=2, about=2), timeout=10
        )
        assert right.matches and right.version == 2
        with pytest.raises(grpc.RpcError) as ahead_of:
            admin.CheckPassword(admin_pb2.CheckPasswordRequest(about=4), timeout=10)
        assert ahead_of.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no password version 4 (the newest is 3)" in (ahead_of.value.details() or "")
        with pytest.raises(grpc.RpcError) as other:
            admin.CheckPassword(
                admin_pb2.CheckPasswordRequest(candidate_hash=digest, version=2, about=1),
                timeout=10,
            )
        assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = other.value.details() or ""
        assert "made under password version 2, not the version asked about (1)" in details
        assert "staged meanwhile" not in details


def check_password_rpc(world: World) -> None:
    """Admin.CheckPassword hands out the salt and parameters, never the verifier's hash, and
    answers a hash made under another version with FAILED_PRECONDITION."""
    rows = world.cluster.store_rows(("auth_versions",), ignore=("created_at", "actor"))
    _version, verifier_json = rows["auth_versions"][-1]  # ordered by version: the newest
    stored = json.loads(verifier_json)
    digest = base64.b64decode(stored["hash"])
    with world.cluster.admin() as admin:
        params = admin.CheckPassword(admin_pb2.CheckPasswordRequest(), timeout=10)
        assert (params.salt, params.n, params.r, params.p, params.dklen) == (
            stored["salt"],
            stored["n"],
            stored["r"],
            stored["p"],
            len(digest),
        )
        wire = params.SerializeToString()
        assert digest not in wire and stored["hash"].encode() not in wire and not params.matches
        right = admin.CheckPassword(
            admin_pb2.CheckPasswordRequest(candidate_hash=digest, version=params.version),
            timeout=10,
        )
        wrong = admin.CheckPassword(
            admin_pb2.CheckPasswordRequest(
                candidate_hash=b"x" * len(digest), version=params.version
            ),
            timeout=10,
        )
        assert right.matches and not wrong.matches
        with pytest.raises(grpc.RpcError) as stale:
            admin.CheckPassword(
                admin_pb2.CheckPasswordRequest(candidate_hash=digest, version=params.version + 1),
                timeout=10,
            )
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def typed_password_rule(world: World) -> None:
    """The password typed at notify's prompt (a terminal) is held to the rule a password file,
    `password set` and the workstation's prompt apply (s39wsfix leftover: it was not): one
    with white space around it, or an invisible character, is refused in one line, exit 2,
    and no notice is printed; the password itself is never shown."""
    cases: list[tuple[str | bytes, str]] = [
        (f" {PW1}", "the password entered starts or ends with white space"),
        (f"{PW1}\u200b", "the password entered has an invisible or control character (U+200B)"),
        # review s66 pw L1: a terminal set to Latin-1 ("ä" is 0xE4) was "internal error"
        (
            PW1.encode() + b"\xe4",
            "the password entered is not UTF-8 text (a terminal set to another encoding, such as"
            " Latin-1?)",
        ),
    ]
    for typed, says in cases:
        term = Terminal(world.cluster, "notify", "--include-password")
        try:
            term.read_until("Password to include")
            os.write(term.master, (typed if isinstance(typed, bytes) else typed.encode()) + b"\n")
            code = term.finish()
        finally:
            term.close()
        errors = [line for line in term.screen.splitlines() if line.startswith("tlsroll: ")]
        assert code == 2, term.screen
        assert len(errors) == 1 and says in errors[0], term.screen
        assert "; no notice printed" in errors[0], errors[0]
        assert "WARNUNG" not in term.screen and PW1 not in term.screen, term.screen
        assert "Traceback" not in term.screen


def notice_into(path: Path, mode: int, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``tlsroll ARGS > path`` (``path`` made with ``mode`` first): the exit code and stderr."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)  # whatever the umask
    try:
        result = subprocess.run(
            [*command("tlsroll", "tlsroll"), *args],
            stdout=fd,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=child_env(env),
            check=False,
        )
    finally:
        os.close(fd)
    return result.returncode, result.stderr


def notice_into_a_private_file(world: World, pw1: Path, tmp_path: Path) -> None:
    """Review s66 pw M2: the notice with the password goes into a file only one of mode 0600
    (``> notice.txt`` under umask 022 made it 0644, the password readable by all)."""
    env = {"TLSROLL_DATA_DIR": str(world.cluster.data_dir)}
    args = ["notify", "--include-password", "--password-file", str(pw1)]
    code, err = notice_into(tmp_path / "shared.txt", 0o644, args, env)
    assert code == 2 and "is readable by others (mode 0644)" in one_line_error(err, "tlsroll")
    assert (tmp_path / "shared.txt").read_bytes() == b"", "the password went into a 0644 file"
    code, err = notice_into(tmp_path / "private.txt", 0o600, args, env)
    assert code == 0, err
    assert (tmp_path / "private.txt").read_text().count(PW1) == 1


def test_a_notice_with_the_password_goes_into_no_file_others_may_read(tmp_path: Path) -> None:
    """Review s66 pw M2: ``notify --include-password > notice.txt`` wrote the password into a
    file of mode 0644 (umask 022), while the file it was read from must be 0600. Refused
    before the password file is read or the leader asked (here: none, and no such file): exit
    2, one line naming the file and its mode, nothing written."""
    data_dir, sock = tmp_path / "data", tmp_path / "none.sock"
    out = tmp_path / "notice.txt"
    code, err = notice_into(
        out,
        0o644,
        [
            "--socket",
            str(sock),
            "notify",
            "--include-password",
            "--password-file",
            str(tmp_path / "missing"),
        ],
        {"TLSROLL_DATA_DIR": str(data_dir)},
    )
    assert code == 2, err
    line = one_line_error(err, "tlsroll")
    assert line.startswith(
        f"tlsroll: error: stdout {out} is readable by others (mode 0644); the notice holds the"
        " password: chmod 600 it and run the command again (umask 077 makes a new file 0600; one"
        " that is there keeps its mode)"
    ), line
    assert out.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notice.txt"]


def piped_password_is_not_read(world: World) -> None:
    """Review s48rev3: off a terminal the password prompt read the password from the pipe
    (with no terminal to turn the echo off, getpass reads stdin), or waited for it on one
    held open. Asked on a terminal only (``tlsroll.cli.terminal_only``): exit 2 at once, one
    line naming --password-file, nothing read, no notice printed."""
    result = subprocess.run(
        [*command("tlsroll", "tlsroll"), "notify", "--include-password"],
        input=PW1 + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env({"TLSROLL_DATA_DIR": str(world.cluster.data_dir)}),
        start_new_session=True,  # no controlling terminal to fall back on
        check=False,
    )
    world.outputs += [result.stdout, result.stderr]
    line = usage_error(result)
    assert line.startswith(
        "tlsroll: error: not a terminal: add --password-file FILE (the password to include, "
        "mode 0600)"
    ), line
    assert "Password to include" not in result.stderr and PW1 not in result.stderr


BAD_INPUT = [
    (["--when", "next friday"], "--when"),
    (["--when", "2020-01-01 10:00", "--scope", "cluster"], "past"),
    (["--when", "2099-01-01 10:00", "--duration", "soon"], "--duration"),
    (
        ["--when", "2099-01-01 10:00", "--scope", "cluster", "--timezone", "Mars/Olympus"],
        "--timezone",
    ),
    (["--duration", "30m"], "--when"),
    (["--when", "2099-01-01 10:00", "--rollout", "r1"], "--rollout"),
    (
        [
            "--when",
            "2099-01-01 10:00",
            "--scope",
            "cluster",
            "--change",
            "rotate-cert",
            "--include-password",
        ],
        "no",
    ),
    (["--format", "pdf"], "pdf"),
    # html is for e-mail programs; the seed: the password is not to go by e-mail
    (["--format", "html", "--include-password"], "--format html is for e-mail"),
]


def bad_input_is_one_line_and_exit_2(world: World, args: list[str], says: str) -> None:
    result = world.cli("notify", *args)
    line = usage_error(result)
    assert says in line, line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--when", "garbage"], "--when"),
        (["--when", "2099-01-01 10:00", "--duration", "99x"], "--duration"),
        (
            [
                "--when",
                "2099-01-01 10:00",
                "--scope",
                "cluster",
                "--change",
                "rotate-cert",
                "--include-password",
            ],
            "no",
        ),
        (["--format", "html", "--include-password"], "--format html is for e-mail"),
        # Session 69 left it: markdown (a mail, a chat, a wiki renders it) is as much for
        # sending as html; the password goes into the text notice only.
        (
            ["--format", "markdown", "--include-password"],
            "--format markdown is for sending (a mail, a chat, a wiki), and the password must "
            "not go by e-mail",
        ),
        (["--until", "garbage"], "--until"),
        # Review s69 revpass M1: words the notice repeats, with a control or invisible
        # character (an ESC sequence, a direction mark), went into the message as given.
        (["--practice", "Praxis \x1b[2J"], "--practice has a control or invisible character"),
        (["--contact", "Frau \u202eX"], "--contact has a control or invisible character"),
        # Review s69 revpass M2: a password in the free text bypassed --include-password's
        # warning and its refusal of HTML for e-mail.
        (
            ["--format", "html", "--password-source", f"bei Frau X: {GENERATED}"],
            "--password-source holds what looks like a generated auth password",
        ),
    ],
)
def test_bad_input_is_a_usage_error_with_the_leader_down(
    tmp_path: Path, args: list[str], says: str
) -> None:
    """Input that needs no time zone is checked before the leader is asked for its
    maintenance_timezone (review s36 M1): with no leader it is still the one-line usage error,
    exit 2, not "no admin socket" (exit 1), and nothing is created."""
    data_dir, sock = tmp_path / "data", tmp_path / "none.sock"
    result = subprocess.run(
        [*command("tlsroll", "tlsroll"), "--socket", str(sock), "notify", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env({"TLSROLL_DATA_DIR": str(data_dir)}),
        check=False,
    )
    line = usage_error(result)
    assert says in line and "admin socket" not in line, line
    assert list(tmp_path.iterdir()) == []
    assert GENERATED not in result.stderr and "\x1b" not in result.stderr


def test_include_password_off_a_terminal_is_refused_before_the_leader_is_asked(
    tmp_path: Path,
) -> None:
    """Review s49cli L3: `notify --include-password </dev/null` with the leader down said "no
    admin socket" (exit 1): the prompt's refusal came only after the leader's answers. The
    question it would ask is refused first: exit 2 naming --password-file, nothing created."""
    data_dir, sock = tmp_path / "data", tmp_path / "none.sock"
    for args in (["--include-password"], ["--include-password", "--rollout", "r1"]):
        result = subprocess.run(
            [*command("tlsroll", "tlsroll"), "--socket", str(sock), "notify", *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=child_env({"TLSROLL_DATA_DIR": str(data_dir)}),
            check=False,
        )
        line = usage_error(result)
        assert line.startswith("tlsroll: error: not a terminal: add --password-file FILE"), line
        assert list(tmp_path.iterdir()) == []


def test_remaining_with_no_report_yet_says_so_in_words(tmp_path: Path) -> None:
    """Review s45rt2 L6: with no agent's report yet, `notify --remaining` named a node "*"
    ("*: nicht feststellbar"). Now it says in words that no node can tell yet."""
    with Cluster(tmp_path, next_loopback()) as c:
        c.init()
        c.start_leader()
        for lang, says in (
            ("de", "Für keinen Knoten feststellbar: noch kein Agent hat etwas gemeldet"),
            ("en", "Cannot tell for any node: no agent has reported yet"),
        ):
            shown = c.cli("notify", "--remaining", "--lang", lang)
            assert shown.returncode == 0, shown.stderr
            assert shown.stdout.splitlines()[1:] == [f"  {says}"], shown.stdout
            assert "*" not in shown.stdout, shown.stdout


def test_check_password_is_audited_and_backs_off(tmp_path: Path) -> None:
    """Audit s45rt3 L3: Admin.CheckPassword compares a hash made anywhere with the staged
    verifier's, so each check is in the audit trail (who, which version, whether it
    matched), and after 5 wrong hashes a caller waits (1 s, doubling), even with the right
    one; a right one clears it."""
    w = World(tmp_path, nodes=1)
    try:
        w.start()
        pw = secret_file(tmp_path / "pw", PW1)
        assert w.cli("password", "set", "--password-file", str(pw)).returncode == 0
        rows = w.cluster.store_rows(("auth_versions",), ignore=("created_at", "actor"))
        stored = json.loads(rows["auth_versions"][-1][1])
        digest = base64.b64decode(stored["hash"])
        with w.cluster.admin() as admin:
            version = admin.CheckPassword(admin_pb2.CheckPasswordRequest(), timeout=10).version

            def check(candidate: bytes) -> admin_pb2.CheckPasswordResponse:
                request = admin_pb2.CheckPasswordRequest(candidate_hash=candidate, version=version)
                reply: admin_pb2.CheckPasswordResponse = admin.CheckPassword(request, timeout=10)
                return reply

            assert check(digest).matches
            # Wrong hashes until the leader makes the caller wait: not before the 6th (5 are
            # free), and at the latest a few later (each wait doubles; a loaded machine may let
            # one run out between two calls: review s45rev8 L2, no timing assumed).
            answered = 0
            for _ in range(12):
                try:
                    assert not check(b"x" * len(digest)).matches
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    assert "too many wrong passwords checked" in (exc.details() or "")
                    break
                answered += 1
            else:
                pytest.fail("12 wrong hashes checked and no wait")
            assert answered >= 5, answered
        audit = w.cluster.store_rows(("audit",))["audit"]
        checked = [json.loads(r[-1]) for r in audit if "password.checked" in r]
        assert [c["matches"] for c in checked] == [True] + [False] * answered, audit
        assert PW1 not in w.cluster.logs_text()
    finally:
        w.close()
