"""The "Notify practice" message (leader.cli.notify) and the notify command's input rules
(leader.cli.notify_cmd): what every notice must say, the password only on request and with the
warning first, escaping in Markdown and HTML, the practice's time zone, and bad --when,
--duration and --timezone as usage errors. The whole texts are golden files
(tests/test_notify_golden.py); the command against a real leader is tests/test_notify_cli.py."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hmac
import html.parser
import re
import zoneinfo
from collections.abc import Iterator
from typing import Any, cast

import click
import pytest

from leader import rollout_core
from leader.cli import notify_cmd
from leader.cli.base import CLIError, Leader
from leader.cli.notify import NoticeInfo, NoticeNode, Timing, render_notice, when_text
from leader.rollout_core import Change
from tlsroll import password
from tlsroll.v1 import admin_pb2

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
PIN = "sha256:" + "3f" * 32
PASSWORD = "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"
NOW = dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.UTC)


def info(**changes: object) -> NoticeInfo:
    base: dict[str, object] = {
        "practice": "Praxis Dr. Muster",
        "nodes": (
            NoticeNode(
                "node-a",
                "http://192.168.1.5:8080/praxis_live/",
                "https://192.168.1.5:8443/praxis_live/",
            ),
            NoticeNode(
                "node-b",
                "http://192.168.1.6:8080/praxis_live/",
                "https://192.168.1.6:8443/praxis_live/",
            ),
        ),
        "ca_pin": PIN,
        "password_source": "persönlich bei Frau Beispiel (Praxis-IT)",
        "contact": "die Praxis-IT, Tel. 0123 456789",
        "timing": Timing(
            "announced",
            dt.datetime(2026, 7, 14, 18, 0, tzinfo=BERLIN),
            dt.datetime(2026, 7, 14, 20, 30, tzinfo=BERLIN),
        ),
    }
    base.update(changes)
    return NoticeInfo(**base)  # type: ignore[arg-type]


ALL = [(lang, fmt) for lang in ("de", "en") for fmt in ("text", "markdown", "html")]


@pytest.mark.parametrize(("lang", "fmt"), ALL)
def test_every_enable_tls_notice_has_the_essentials(lang: str, fmt: str) -> None:
    text = render_notice(info(), lang=lang, fmt=fmt)
    for node in info().nodes:
        assert node.new_url in text and node.old_url in text
    assert PIN in text
    assert "persönlich bei Frau Beispiel" in text and "0123 456789" in text
    assert "9443" in text
    assert "tlsroll client test-connection https://192.168.1.5:8443/praxis_live/ --ca-pin" in text
    assert PASSWORD not in text
    if lang == "de":
        for phrase in (
            "verschlüsselt",
            "Admin → Serveradresse ändern",
            "„Verbindung testen“",
            "Port 9443",
            "Authentifizierungspasswort eingeben",
            "Client neu starten",
            "nie per E-Mail",
            "keine neuen Einträge",
            "Dienstag, 14. Juli 2026, von 18:00 bis 20:30 Uhr (MESZ) geplant.",
        ):
            assert phrase in text, phrase
        assert "Server-Adresse" not in text  # one spelling: Serveradresse
        assert "Vorlage" not in text  # the template reminder goes to the admin, not the staff
    else:
        for phrase in (
            "Admin → Change server address",
            "“Test connection”",
            "port 9443",
            "Enter the authentication password",
            "Restart the client",
            "never by e-mail",
            "Tuesday, 14 July 2026, from 18:00 to 20:30 (CEST).",
        ):
            assert phrase in text, phrase


def test_the_email_sentence_is_said_once() -> None:
    """The old text said "(nicht per E-Mail). Es wird nicht per E-Mail verschickt"."""
    text = render_notice(info())
    assert text.count("E-Mail") == 1
    assert "Es wird nicht per E-Mail verschickt" not in text


@pytest.mark.parametrize(("lang", "fmt"), ALL)
def test_password_only_on_request_and_with_a_warning_on_top(lang: str, fmt: str) -> None:
    text = render_notice(info(), lang=lang, fmt=fmt, password=PASSWORD)
    body = text.split("<body", 1)[1] if fmt == "html" else text
    first = next(line for line in body.splitlines()[1 if fmt == "html" else 0 :] if line)
    assert ("WARNUNG" if lang == "de" else "WARNING") in first
    assert ("nicht per E-Mail" if lang == "de" else "Do not send it by e-mail") in first
    assert text.count(PASSWORD) == 1
    plain = render_notice(info(), lang=lang, fmt=fmt)
    assert "WARN" not in plain and PASSWORD not in plain


@pytest.mark.parametrize("change", ["rotate-cert", "disable-tls"])
def test_changes_without_a_password_take_none(change: str) -> None:
    with pytest.raises(ValueError, match="no password"):
        render_notice(info(change=change), password=PASSWORD)
    text = render_notice(info(change=change))
    assert PIN not in text and "Authentifizierungspasswort eingeben" not in text


def test_wording_per_change() -> None:
    titles = {
        "enable-tls": "Umstellung auf verschlüsselte Verbindung (https)",
        "change-password": "Neues Authentifizierungspasswort",
        "rotate-cert": "Neues Serverzertifikat",
        "disable-tls": "Rückkehr zur unverschlüsselten Verbindung (http)",
    }
    for change, title in titles.items():
        text = render_notice(info(change=change))
        assert text.startswith(title), change
    pw = render_notice(info(change="change-password"))
    assert "Die Serveradresse bleibt gleich." in pw and "Neue Serveradressen" not in pw
    assert "Der Passwortwechsel ist für" in pw


def test_markdown_escapes_what_the_admin_typed() -> None:
    md = render_notice(info(practice="Praxis *Dr.* [Muster](http://evil)"), fmt="markdown")
    assert "Praxis \\*Dr.\\* \\[Muster\\](http://evil)" in md
    assert "``ab`cd``" in render_notice(info(), fmt="markdown", password="ab`cd")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Praxis Dr. Muster", None),
        ("Frau Beispiel,\tTel. 0123\n456789", None),  # white space: shown as one space
        ("Praxis \x1b[31mDr.", "control or invisible character (U+001B) at position 8"),
        ("Praxis\x00", "(U+0000) at position 7"),
        ("Praxis \u202eretsuM", "(U+202E) at position 8"),
        ("Frau\u200bX", "(U+200B) at position 5"),
        ("Praxis \udce4", "is not UTF-8 text"),
        (f"Passwort: {PASSWORD}", "holds what looks like a generated auth password"),
        (f"Passwort: {PASSWORD.upper()}", "holds what looks like a generated auth password"),
    ],
)
def test_words_the_notice_repeats_are_text_a_person_typed(text: str, says: str | None) -> None:
    """Review s69 revpass M1/M2: --practice, --contact and --password-source went into every
    format as given: an ESC sequence (a terminal acts on it when the notice is printed), a NUL,
    a direction mark (the words around it shown reversed), and a password pasted into them,
    which then had no warning on top and went into HTML for e-mail. Refused in one line that
    names the option and never repeats the text."""
    why = notify_cmd.typed_text_problem(text, "--contact")
    if says is None:
        assert why is None
        return
    assert why is not None and why.startswith("--contact ") and says in why, why
    assert PASSWORD not in why and PASSWORD.upper() not in why and "\x1b" not in why


def test_words_left_out_or_blank_are_said_in_the_notice_s_language() -> None:
    """Review s69 revpass L1: the default --practice was "Praxis" in an English notice too
    ("… (https) – Praxis"), and a blank --contact or --password-source was taken as given:
    "please contact ." with nobody named."""
    en = notify_cmd.typed_words("en", None, " ", "\t")
    assert en == {
        "practice": "Practice",
        "contact": "your practice IT",
        "password_source": "in person from your practice IT",
    }
    assert notify_cmd.typed_words("de", "  ", "", "")["practice"] == "Praxis"
    given = notify_cmd.typed_words("en", " Dr. Muster ", "Frau X", "bei Frau X")
    assert given == {"practice": "Dr. Muster", "contact": "Frau X", "password_source": "bei Frau X"}
    text = render_notice(info(**en), lang="en")
    assert text.startswith("Switch to an encrypted connection (https) – Practice\n"), text
    assert "please contact your practice IT." in text


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)


def test_html_escapes_everything_the_admin_typed() -> None:
    evil = "<script>alert(1)</script><a href='x'>"
    page = render_notice(
        info(practice=evil, contact=evil, password_source=evil, extra=(evil,)),
        fmt="html",
        password="<b>&pw",
    )
    assert "<script>" not in page and "<a " not in page
    assert "&lt;script&gt;" in page and "<code>&lt;b&gt;&amp;pw</code>" in page
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= {"html", "head", "meta", "title", "body", "h1", "h2", "p", "ul", "ol"} | {
        "li",
        "code",
        "pre",
        "strong",
        "!doctype",
    }


def test_zone_abbreviations_and_times() -> None:
    winter = Timing("done", dt.datetime(2026, 12, 5, 18, 2, tzinfo=BERLIN))
    summer = Timing("done", dt.datetime(2026, 7, 5, 18, 2, tzinfo=BERLIN))
    assert "(MEZ)" in when_text(info(timing=winter), "de")
    assert "(MESZ)" in when_text(info(timing=summer), "de")
    assert "(CET)" in when_text(info(timing=winter), "en")
    assert "(CEST)" in when_text(info(timing=summer), "en")
    same = Timing("done", winter.start, winter.start + dt.timedelta(seconds=20))
    assert when_text(info(timing=same), "de") == (
        "Die Umstellung fand am Samstag, 5. Dezember 2026, um 18:02 Uhr (MEZ) statt."
    )
    with pytest.raises(ValueError, match="aware"):
        when_text(info(timing=Timing("done", dt.datetime(2026, 1, 1))), "de")


@pytest.mark.parametrize(
    "kwargs",
    [{"lang": "fr"}, {"fmt": "pdf"}, {"password": ""}],
)
def test_bad_arguments(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        render_notice(info(), **kwargs)
    with pytest.raises(ValueError, match="at least one node"):
        render_notice(info(nodes=()))


# --- the command's input ----------------------------------------------------------------------


def test_when_is_read_in_the_practice_zone() -> None:
    when = notify_cmd.parse_when("2026-12-05 18:00", BERLIN, NOW)
    assert when == dt.datetime(2026, 12, 5, 17, 0, tzinfo=dt.UTC)
    assert notify_cmd.parse_when("05.12.2026 18:00", BERLIN, NOW) == when


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tomorrow", "YYYY-MM-DD HH:MM"),
        ("2026-13-05 18:00", "YYYY-MM-DD HH:MM"),
        ("2026-11-01 18:00", "past"),
        ("2027-03-28 02:30", "does not exist"),
        ("2027-10-31 02:30", "occurs twice"),
    ],
)
def test_bad_when(text: str, message: str) -> None:
    with pytest.raises(click.BadParameter, match=message):
        notify_cmd.parse_when(text, BERLIN, NOW)


def test_the_example_of_a_bad_when_is_a_time_it_takes() -> None:
    """Session 75 adminwalk: the example was a fixed 2026-12-05 18:00, refused as past from
    the next day on: an admin who typed it as shown got a second error."""
    later = dt.datetime(2027, 6, 1, 12, 0, tzinfo=dt.UTC)
    with pytest.raises(click.BadParameter) as bad:
        notify_cmd.parse_when("tomorrow", BERLIN, later)
    example = re.search(r"e\.g\. (\S+ \S+)", bad.value.message)
    assert example is not None, bad.value.message
    assert notify_cmd.parse_when(example[1], BERLIN, later) > later


def test_duration() -> None:
    assert notify_cmd.parse_duration("30m") == dt.timedelta(minutes=30)
    assert notify_cmd.parse_duration("1h30m") == dt.timedelta(minutes=90)
    for bad in ("", "0m", "soon", "30", "49h", "-5m", "1d"):
        with pytest.raises(click.BadParameter):
            notify_cmd.parse_duration(bad)


def test_practice_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    assert notify_cmd.practice_zone(None, "de").key == "Europe/Berlin"  # German default
    assert notify_cmd.practice_zone(None, "en").key == "UTC"
    monkeypatch.setenv("TZ", "Europe/Vienna")
    assert notify_cmd.practice_zone(None, "de").key == "Europe/Vienna"  # the leader's own
    assert notify_cmd.practice_zone("America/New_York", "de").key == "America/New_York"
    with pytest.raises(click.BadParameter, match="unknown time zone"):
        notify_cmd.practice_zone("Mars/Olympus", "de")
    for bad in ("../../etc/passwd", "Europe", "x" * 300, "", "CET-1CEST"):
        with pytest.raises(click.BadParameter):
            notify_cmd.practice_zone(bad, "de")
    monkeypatch.setenv("TZ", "Europe")  # the machine's own setting is broken: said as such
    with pytest.raises(click.UsageError, match="this machine's time zone"):
        notify_cmd.practice_zone(None, "en")


def test_a_zone_chosen_by_the_language_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a UTC leader with no zone given or configured, a German notice reads --when in
    Europe/Berlin and an English one in UTC: the note names both and the way to make them
    agree; nothing is said where the zone does not depend on the language."""
    monkeypatch.setenv("TZ", "UTC")
    de = notify_cmd.zone_by_language(None, "de")
    en = notify_cmd.zone_by_language(None, "en")
    assert de is not None and "read in Europe/Berlin" in de and "in UTC" in de
    assert en is not None and "read in UTC" in en and "in Europe/Berlin" in en
    assert notify_cmd.zone_by_language("UTC", "en") is None  # --timezone given
    assert notify_cmd.zone_by_language(None, "de", "Europe/Vienna") is None  # configured
    monkeypatch.setenv("TZ", "Europe/Vienna")
    assert notify_cmd.zone_by_language(None, "de") is None  # the leader's own zone


def test_announced_addresses_come_from_the_record_else_the_seed_ports() -> None:
    known = {
        "http": ("http://10.0.0.5:8080/praxis_live/", 9443),
        "https": ("https://10.0.0.5:8443/praxis_live/", 9543),
    }
    back = notify_cmd.notice_node("a", Change.DISABLE_TLS, known, "10.0.0.5")
    assert (back.old_url, back.new_url, back.bootstrap_port, back.path_known) == (
        "https://10.0.0.5:8443/praxis_live/",
        "http://10.0.0.5:8080/praxis_live/",
        9543,
        True,
    )
    first = notify_cmd.notice_node("a", Change.ENABLE_TLS, {}, "10.0.0.5")
    assert (first.old_url, first.new_url, first.path_known) == (
        "http://10.0.0.5:8080/…",
        "https://10.0.0.5:8443/…",
        False,
    )


@pytest.mark.parametrize(
    ("lang", "says"), [("de", "bereits umgestellt"), ("en", "already switched")]
)
@pytest.mark.parametrize("fmt", ["text", "markdown", "html"])
def test_nodes_switched_before_are_listed_as_such(lang: str, fmt: str, says: str) -> None:
    """Audit s38 M4: a cluster rollout after a local one left the leader node out of a notice
    that says the whole multiserver is affected. Only enable-tls lists them."""
    before = NoticeNode("node-l", "", "https://192.168.1.4:8443/praxis_live/")
    text = render_notice(info(already=(before,)), lang=lang, fmt=fmt)
    assert "node-l" in text and "192.168.1.4:8443/praxis_live/" in text and says in text
    again = render_notice(info(change="change-password", already=(before,)), lang=lang, fmt=fmt)
    assert "node-l" not in again


@pytest.mark.parametrize(("lang", "fmt"), ALL)
@pytest.mark.parametrize("change", ["enable-tls", "change-password"])
def test_the_command_line_check_is_given_per_node(lang: str, fmt: str, change: str) -> None:
    """Audit s39ws H2: the notice's one runnable command was built from the first node, so a
    workstation of another node that copied it got that node's address and bootstrap port.
    Each node (and one an earlier rollout switched) has its own command now."""
    a = NoticeNode("node-a", "http://192.168.1.5:8080/x/", "https://192.168.1.5:8443/x/")
    b = NoticeNode("node-b", "http://192.168.1.6:8080/x/", "https://192.168.1.6:8443/x/", 9543)
    before = NoticeNode("node-l", "", "https://192.168.1.4:8443/x/", 9643)
    text = render_notice(info(change=change, nodes=(a, b), already=(before,)), lang=lang, fmt=fmt)
    command = "tlsroll client test-connection {} --ca-pin " + PIN
    assert command.format(a.new_url) + " --bootstrap-port" not in text  # not node-b's port
    for node, port in ((a, ""), (b, " --bootstrap-port 9543")):
        assert text.count(command.format(node.new_url) + port) == 1, (node, text)
    assert (command.format(before.new_url) + " --bootstrap-port 9643" in text) is (
        change == "enable-tls"
    )
    alone = render_notice(info(change=change, nodes=(b,)), lang=lang, fmt=fmt)
    assert alone.count("tlsroll client test-connection") == 1
    assert command.format(b.new_url) + " --bootstrap-port 9543" in alone


V = Change.ENABLE_TLS


@pytest.mark.parametrize(
    ("change", "live", "nodes", "planned", "version"),
    [
        # an announced change-password notice: the newest staged version (3)
        (Change.CHANGE_PASSWORD, {"a": 1, "b": 2}, ["a", "b"], 1, 3),
        # announced enable-tls: the version the plan gives, the nodes switched before run it too
        (V, {"a": 1}, ["a", "b"], 1, 1),
        (V, {}, ["b"], 2, 2),
    ],
)
def test_the_password_an_announced_notice_gives(
    change: Change, live: dict[str, int], nodes: list[str], planned: int, version: int
) -> None:
    """Audit s38 H1: the version the notice is about, not always the newest staged one."""
    assert notify_cmd.password_version(change, 3, live, nodes, planned) == version


@pytest.mark.parametrize(
    ("change", "applied", "live", "version"),
    [
        # a change-password rollout that ran (v2), v3 staged since: v2, not the staged one
        # (review s38ntf2 H1: v3 went into the notice and no workstation could use it)
        (Change.CHANGE_PASSWORD, notify_cmd.Applied("r", 2, ("a", "b")), {"a": 2, "b": 2}, 2),
        # enable-tls after its start: what it applies, not what is staged
        (V, notify_cmd.Applied("r", 1, ("a", "b")), {"a": 1, "b": 1, "x": 2}, 1),
        (V, notify_cmd.Applied("r", 2, ("a",), active=True), {"a": 2}, 2),  # b not yet
        # (M2) running, no node done yet: the version its start set
        (V, notify_cmd.Applied("r", 2, (), active=True), {}, 2),
        # running, a node just done but not recorded as running it yet
        (V, notify_cmd.Applied("r", 2, ("a",), active=True), {}, 2),
        # nodes switched before run it too
        (V, notify_cmd.Applied("r", 1, ("b",), before=("a",)), {"a": 1, "b": 1}, 1),
    ],
)
def test_the_password_a_notice_about_a_rollout_gives(
    change: Change, applied: notify_cmd.Applied, live: dict[str, int], version: int
) -> None:
    assert notify_cmd.applied_version(applied, live) == version


@pytest.mark.parametrize(
    ("applied", "live", "says"),
    [
        # a later change-password rollout changed what a done node runs
        (notify_cmd.Applied("r", 1, ("a", "b")), {"a": 1, "b": 2}, "changed since rollout r"),
        (notify_cmd.Applied("r", 1, ("a",)), {}, "a none (on http)"),  # disable-tls since
        (notify_cmd.Applied("r", 2, ("b",), before=("a",)), {"a": 1, "b": 2}, "a version 1"),
        # a leader of older code leaves auth_version unset
        (notify_cmd.Applied("r", 0, ("a",)), {"a": 1}, "the leader runs older code"),
    ],
)
def test_no_password_to_give_about_a_rollout(
    applied: notify_cmd.Applied, live: dict[str, int], says: str
) -> None:
    with pytest.raises(CLIError) as refused:
        notify_cmd.applied_version(applied, live)
    assert says in str(refused.value)


@pytest.mark.parametrize(
    ("live", "nodes", "planned", "error", "says"),
    [
        ({"a": 1}, ["a", "b"], 2, CLIError, "the rollout gives the others version 2"),
        ({}, ["a"], 0, click.UsageError, "enable-tls sets its password when it starts"),
    ],
)
def test_no_password_to_give(
    live: dict[str, int],
    nodes: list[str],
    planned: int,
    error: type[Exception],
    says: str,
) -> None:
    with pytest.raises(error) as refused:
        notify_cmd.password_version(V, 3, live, nodes, planned)
    assert says in str(refused.value)
    assert "once a node has switched" not in str(refused.value)  # (M2) one story: at the start


class _OldLeader:
    """Admin.CheckPassword as a leader from before 95aa68b answers: always the newest
    staged version, no ``newest`` nor ``live``; ``about`` is a field it does not know (its
    parser drops it). ``newest``: as a leader that knows ``newest`` but not ``about``."""

    def __init__(self, with_newest: bool = False) -> None:
        self.verifiers = {v: password.make_verifier(p) for v, p in ((1, PW_1), (2, PW_2))}
        self.with_newest = with_newest

    @contextlib.contextmanager
    def admin(self) -> Iterator[_OldLeader]:
        yield self

    def CheckPassword(
        self, request: admin_pb2.CheckPasswordRequest
    ) -> admin_pb2.CheckPasswordResponse:
        newest = max(self.verifiers)
        v = self.verifiers[newest]
        expected = base64.b64decode(v["hash"])
        reply = admin_pb2.CheckPasswordResponse(
            version=newest, salt=v["salt"], n=v["n"], r=v["r"], p=v["p"], dklen=len(expected)
        )
        if self.with_newest:
            reply.newest = newest
            reply.live.add(node="a", version=1)
        if request.candidate_hash:
            reply.matches = hmac.compare_digest(request.candidate_hash, expected)
        return reply

    def call(self, method: Any, request: Any) -> Any:
        return method(request)


PW_1, PW_2 = "first-password-kd7q-x2mf", "second-password-9wq3-p4hz"


@pytest.mark.parametrize("with_newest", [False, True])
@pytest.mark.parametrize("secret", [PW_1, PW_2])
def test_a_leader_of_older_code_is_refused(with_newest: bool, secret: str) -> None:
    """Review s38ntf2 M1: CheckPassword is read-only, so through a leader of other code the CLI
    only warns; one that drops ``about`` checked the newest staged password (v2) for an
    enable-tls notice whose rollout gives v1, and v2 went into the notice."""
    leader = cast(Leader, _OldLeader(with_newest))
    for applied in (None, notify_cmd.Applied("r", 1, ("a",))):
        with pytest.raises(CLIError, match="the leader runs older code: restart it"):
            notify_cmd.check_password(leader, secret, V, ["a", "b"], 1, applied)


def test_every_change_says_its_addresses_as_its_rows_do() -> None:
    """Review s45rev6 L2: old and new address are decided in one place, from the change's
    schemes (``rollout_core.SCHEMES``), for the rollout's rows and for a notice. The rows
    showed a node on https the whole time (change-password, rotate-cert) with its http
    address as "old"; the notice said finalize goes from https to https, its rows from http."""
    known = {
        "http": ("http://10.0.0.5:8080/praxis_live/", 9443),
        "https": ("https://10.0.0.5:8443/praxis_live/", 9443),
    }
    http, https = known["http"][0], known["https"][0]
    expected = {
        Change.ENABLE_TLS: (http, https),
        Change.FINALIZE: (http, https),
        Change.DISABLE_TLS: (https, http),
        Change.CHANGE_PASSWORD: (https, https),
        Change.ROTATE_CERT: (https, https),
    }
    assert set(expected) == set(Change)
    for change, (old, new) in expected.items():
        assert rollout_core.before_after(change, http, https) == (old, new), change
        node = notify_cmd.notice_node("a", change, known, "10.0.0.5")
        assert (node.old_url, node.new_url) == (old, new), change


def test_the_ca_each_node_serves_is_read_from_the_history() -> None:
    """``served_pins`` (rev57a): newest first, the rollout that last gave a node a certificate
    (enable-tls or rotate-cert, the node ``done`` or ``dual``) names its CA; a way back done
    on it: none (http); a node rolled back, failed or still pending falls through to the one
    before; a finalize gives nothing (phase 1's certificate stays). ``ca_change``: what a
    rotate-cert means for the workstations set up before."""
    from tlsroll.v1 import schema_pb2, types_pb2

    own, own2 = "sha256:" + "a7" * 32, "sha256:" + "5c" * 32
    done, dual = types_pb2.NODE_STATE_DONE, types_pb2.NODE_STATE_DUAL
    back, pending = types_pb2.NODE_STATE_ROLLED_BACK, types_pb2.NODE_STATE_PENDING

    def r(
        change: types_pb2.Change.ValueType,
        *nodes: tuple[str, types_pb2.NodeState.ValueType, str],
    ) -> schema_pb2.RolloutView:
        return schema_pb2.RolloutView(
            change=change,
            nodes=[schema_pb2.NodeView(name=n, state=s, ca_pin=p) for n, s, p in nodes],
        )

    enable, rotate = types_pb2.CHANGE_ENABLE_TLS, types_pb2.CHANGE_ROTATE_CERT
    history = schema_pb2.Schema(
        rollouts=[  # newest first
            r(rotate, ("a", pending, own2), ("b", back, own2)),  # running, and b rolled back
            r(types_pb2.CHANGE_DISABLE_TLS, ("c", done, "")),
            r(types_pb2.CHANGE_FINALIZE, ("d", done, "")),
            r(rotate, ("a", done, ""), ("b", done, own)),
            r(enable, ("a", done, own), ("c", done, own), ("d", dual, own), ("e", done, "")),
        ]
    )
    assert notify_cmd.served_pins(history) == {"a": "", "b": own, "c": None, "d": own, "e": ""}
    assert notify_cmd.served_pins(history, 4) == {"a": own, "c": own, "d": own, "e": ""}
    assert notify_cmd.ca_change("", own) == "own"  # the cluster CA's, then a practice's
    assert notify_cmd.ca_change(own, own2) == "own"  # another practice CA (another key)
    assert notify_cmd.ca_change(own, "") == "cluster"
    assert notify_cmd.ca_change(own, own) == ""  # renewed from the same CA
    assert notify_cmd.ca_change("", "") == ""
    assert notify_cmd.ca_change(None, "") == ""


def test_remaining_marks_nodes_whose_http_is_closed_and_says_the_zone_as_the_notice() -> None:
    """Session 64's review L1': `notify --remaining` said "before http closes" of a node whose
    http a finalize had closed, and counted its workstations as still to switch; now such a
    node's rows say the workstation is cut off since then, and with no phase 1 awaiting
    finalize the header does not speak of http closing. L2': the German list said "CET"."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from tlsroll.v1 import schema_pb2, types_pb2

    def ts(when: dt.datetime) -> Timestamp:
        stamp = Timestamp()
        stamp.FromDatetime(when)
        return stamp

    seen = dt.datetime(2026, 12, 7, 9, 30, tzinfo=dt.UTC)
    closed_at = dt.datetime(2026, 12, 7, 2, 12, tzinfo=dt.UTC)
    done, dual = types_pb2.NODE_STATE_DONE, types_pb2.NODE_STATE_DUAL
    phase1 = schema_pb2.RolloutView(
        id="p1",
        change=types_pb2.CHANGE_ENABLE_TLS,
        strategy=types_pb2.STRATEGY_TRANSITIONAL,
        state=types_pb2.ROLLOUT_STATE_AWAITING_FINALIZE,
        nodes=[
            schema_pb2.NodeView(name="node1", state=dual),
            schema_pb2.NodeView(name="node2", state=dual),
        ],
    )
    final = schema_pb2.RolloutView(
        id="f1",
        change=types_pb2.CHANGE_FINALIZE,
        finalizes="p1",
        state=types_pb2.ROLLOUT_STATE_ABORTED,
        nodes=[
            schema_pb2.NodeView(
                name="node2",
                state=done,
                steps=[schema_pb2.StepTimes(step="switch", ended_at=ts(closed_at))],
            ),
            schema_pb2.NodeView(name="node1", state=types_pb2.NODE_STATE_PENDING),
        ],
    )
    clients = [
        schema_pb2.NodeClientsView(
            node=name,
            clients=types_pb2.ClientsView(source="reference"),
            still_on_http=[types_pb2.ClientSeen(scheme="http", address=addr, last_seen=ts(seen))],
        )
        for name, addr in (("node1", "10.0.0.21"), ("node2", "10.0.0.22"))
    ]
    schema = schema_pb2.Schema(rollouts=[final, phase1], node_clients=clients)
    german = notify_cmd.remaining_text(schema, "de", BERLIN).splitlines()
    assert german == [
        "Arbeitsplätze, die noch http nutzen (sie brauchen die Schritte, bevor http geschlossen "
        "wird):",
        "  node1: 10.0.0.21, zuletzt 2026-12-07 10:30:00 MEZ",
        "  node2: 10.0.0.22, zuletzt 2026-12-07 10:30:00 MEZ – ohne Verbindung: http ist seit "
        "2026-12-07 03:12:00 MEZ geschlossen",
    ], german
    # phase 1 finalized since: nothing awaits finalize, and both are cut off
    phase1.state = types_pb2.ROLLOUT_STATE_COMPLETED
    later = schema_pb2.RolloutView(
        id="f2",
        change=types_pb2.CHANGE_FINALIZE,
        finalizes="p1",
        state=types_pb2.ROLLOUT_STATE_COMPLETED,
        nodes=[schema_pb2.NodeView(name="node1", state=done)],
        ended_at=ts(closed_at + dt.timedelta(hours=1)),
    )
    schema = schema_pb2.Schema(rollouts=[later, final, phase1], node_clients=clients)
    english = notify_cmd.remaining_text(schema, "en", BERLIN).splitlines()
    assert english[0] == (
        "Workstations seen on http lately (no transitional rollout awaits finalize):"
    )
    assert english[1:] == [
        "  node1: 10.0.0.21, last seen 2026-12-07 10:30:00 CET – cut off: http closed at "
        "2026-12-07 04:12:00 CET",
        "  node2: 10.0.0.22, last seen 2026-12-07 10:30:00 CET – cut off: http closed at "
        "2026-12-07 03:12:00 CET",
    ], english


@pytest.mark.parametrize(("state", "closing"), [("running", True), ("paused", False)])
def test_a_paused_finalize_is_not_told_as_closing_http_now(state: str, closing: bool) -> None:
    """Review b3 of session 64 (L3): the notice during a finalize said the old addresses "are
    closed one after another now" of a paused one too, which closes nothing, maybe for days.
    The node it closed before its pause stays named as closed."""
    from leader.rollout_core import NodeState, RolloutState
    from leader.wire import CHANGE, NODE_STATE, ROLLOUT_STATE
    from tlsroll.v1 import schema_pb2

    finalize = schema_pb2.RolloutView(
        id="f1",
        change=CHANGE.wire(Change.FINALIZE),
        state=ROLLOUT_STATE.wire(RolloutState(state)),
        finalizes="t1",
    )
    finalize.started_at.FromDatetime(dt.datetime(2026, 12, 7, 9, 0))
    finalize.nodes.add(name="node1", state=NODE_STATE.wire(NodeState.DONE))
    finalize.nodes.add(name="node2", state=NODE_STATE.wire(NodeState.PENDING))
    closed, now_closing = notify_cmd._closed_by_finalize(
        schema_pb2.Schema(rollouts=[finalize]), "t1"
    )
    assert list(closed) == ["node1"] and now_closing is closing


def test_a_node_whose_driver_does_not_report_clients_is_not_an_agent_not_heard() -> None:
    """Session 71 walkthrough: a node on the systemd driver without access logs (the example
    agent.toml's), its agent online for minutes: `notify --remaining` said "its agent has not
    reported yet", and `schema show` "0 still on http; window 0s, source unknown". Both now
    say that its driver does not report who connects; a node never heard keeps its words."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from leader.cli.base import to_dict
    from leader.cli.draw import render_clients
    from tlsroll.v1 import schema_pb2, types_pb2

    heard = Timestamp()
    heard.FromDatetime(dt.datetime(2026, 12, 7, 9, 0, tzinfo=dt.UTC))
    views = [
        schema_pb2.NodeClientsView(node="srv3", clients=types_pb2.ClientsView(), reported_at=heard),
        schema_pb2.NodeClientsView(node="srv4", clients=types_pb2.ClientsView()),
    ]
    schema = schema_pb2.Schema(node_clients=views)
    english = notify_cmd.remaining_text(schema, "en", zoneinfo.ZoneInfo("UTC")).splitlines()
    assert english[1:] == [
        "  srv3: cannot tell (its driver does not report who connects: systemd needs the "
        'access_log settings in [server], exec [server.commands] clients (README, "The managed '
        'server (drivers)"))',
        "  srv4: cannot tell (its agent has not reported yet)",
    ], english
    german = notify_cmd.remaining_text(schema, "de", BERLIN).splitlines()
    assert german[1].startswith("  srv3: nicht feststellbar (sein Treiber meldet nicht"), german
    assert german[2] == "  srv4: nicht feststellbar (der Agent hat noch nichts gemeldet)", german

    notes = render_clients([to_dict(v) for v in views]).lines(400, color=False)
    srv3 = [line for line in notes if line.startswith("srv3: ")]
    assert srv3 == [
        "srv3: cannot tell who is still on http: its driver does not report who connects "
        '(README, "The managed server (drivers)"); reported 2026-12-07 09:00:00 UTC'
    ], notes
    assert not any("0 still on http" in line for line in notes if line.startswith("srv3")), notes
