"""The "Notify practice" template (leader.cli.notify): German and English, text and Markdown, with
and without the password."""

from __future__ import annotations

import datetime as dt

import pytest

from leader.cli.notify import NoticeInfo, NoticeNode, render_notice

PIN = "sha256:" + "3f" * 32
PASSWORD = "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"


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
        "start": dt.datetime(2025, 7, 14, 18, 0),
        "end": dt.datetime(2025, 7, 14, 20, 30),
    }
    base.update(changes)
    return NoticeInfo(**base)  # type: ignore[arg-type]


ALL = [(lang, fmt) for lang in ("de", "en") for fmt in ("text", "markdown")]


@pytest.mark.parametrize(("lang", "fmt"), ALL)
def test_every_notice_has_the_essentials(lang: str, fmt: str) -> None:
    text = render_notice(info(), lang=lang, fmt=fmt)
    for node in info().nodes:
        assert node.new_url in text and node.old_url in text
    assert PIN in text
    assert "persönlich bei Frau Beispiel" in text and "0123 456789" in text
    assert "9443" in text
    assert "tlsroll client test-connection https://192.168.1.5:8443/praxis_live/ --ca-pin" in text
    assert PASSWORD not in text
    if lang == "de":
        assert text.startswith("# Umstellung" if fmt == "markdown" else "Umstellung")
        for phrase in (
            "verschlüsselt",
            "Admin → Server-Adresse ändern",
            "„Verbindung testen“",
            "Port 9443",
            "Authentifizierungspasswort eingeben",
            "Client neu starten",
            "nicht per E-Mail",
            "keine neuen Einträge",
            "Diese Nachricht ist eine Vorlage",
            "14.07.2025, 18:00 Uhr bis 14.07.2025, 20:30 Uhr",
        ):
            assert phrase in text, phrase
    else:
        for phrase in (
            "Admin → Change server address",
            "“Test connection”",
            "port 9443",
            "Enter the authentication password",
            "Restart the client",
            "not sent by e-mail",
            "this message is a template",
            "2025-07-14 18:00 to 2025-07-14 20:30",
        ):
            assert phrase in text, phrase


@pytest.mark.parametrize(("lang", "fmt"), ALL)
def test_password_only_on_request_and_with_a_warning_on_top(lang: str, fmt: str) -> None:
    text = render_notice(info(), lang=lang, fmt=fmt, password=PASSWORD)
    first = text.splitlines()[0]
    assert ("WARNUNG" if lang == "de" else "WARNING") in first
    assert ("nicht per E-Mail" if lang == "de" else "not send it by e-mail") in first
    assert text.count(PASSWORD) == 1
    plain = render_notice(info(), lang=lang, fmt=fmt)
    assert "WARN" not in plain and PASSWORD not in plain


def test_german_is_the_default_and_markdown_is_markdown() -> None:
    assert render_notice(info()) == render_notice(info(), lang="de", fmt="text")
    md = render_notice(info(), fmt="markdown")
    assert "## Neue Serveradressen" in md
    assert "- node-a: neu `https://192.168.1.5:8443/praxis_live/`" in md
    assert f"```\n{PIN}\n```" in md
    assert "1. Als Benutzer mit Administrationsrechten anmelden." in md
    text = render_notice(info())
    assert "Neue Serveradressen\n-------------------" in text and "`" not in text


def test_markdown_escapes_what_the_admin_typed() -> None:
    md = render_notice(info(practice="Praxis *Dr.* [Muster](http://evil)"), fmt="markdown")
    assert "Praxis \\*Dr.\\* \\[Muster\\](http://evil)" in md
    tricky = "ab`cd"
    assert "``ab`cd``" in render_notice(info(), fmt="markdown", password=tricky)


def test_one_node_a_custom_port_and_no_date() -> None:
    node = NoticeNode(
        "node-a",
        "http://192.168.1.5:8080/praxis_live/",
        "https://192.168.1.5:8443/praxis_live/",
        bootstrap_port=9543,
    )
    text = render_notice(info(nodes=(node,), start=None, end=None, scope="local"))
    assert (
        "Server-Adresse ändern öffnen und https://192.168.1.5:8443/praxis_live/ eintragen" in text
    )
    assert "Die Abfrage nach Port 9543 einfach bestätigen" in text
    assert "--bootstrap-port 9543" in text
    assert "Geplant; der genaue Termin wird noch bekannt gegeben." in text
    assert "ein einzelner Server-Knoten" in text
    en = render_notice(info(nodes=(node,), start=None), lang="en")
    assert "Just confirm the prompt for port 9543" in en and "Planned" in en


def test_mixed_ports_name_each_one() -> None:
    a, b = info().nodes
    mixed = (a, NoticeNode(b.name, b.old_url, b.new_url, bootstrap_port=9543))
    text = render_notice(info(nodes=mixed))
    assert "Port aus der Liste oben eintragen (bei Ihrem Server: 9443, 9543)" in text


def test_aware_dates_show_their_zone() -> None:
    start = dt.datetime(2025, 7, 14, 18, 0, tzinfo=dt.UTC)
    assert "14.07.2025, 18:00 Uhr (UTC)." in render_notice(info(start=start, end=None))


@pytest.mark.parametrize(
    "kwargs",
    [{"lang": "fr"}, {"fmt": "html"}, {"password": ""}],
)
def test_bad_arguments(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        render_notice(info(), **kwargs)
    with pytest.raises(ValueError, match="at least one node"):
        render_notice(info(nodes=()))


@pytest.mark.parametrize(
    ("lang", "protects", "pin_adds"),
    [
        (
            "de",
            "berechtigt einen Arbeitsplatz, sich mit dem verschlüsselten Server zu verbinden",
            "Auch wer das Passwort kennt, kann sich dann nicht als Server ausgeben.",
        ),
        (
            "en",
            "The password lets a workstation join the encrypted server",
            "even someone who knows the password cannot pose as the server.",
        ),
    ],
)
def test_the_notice_says_what_the_password_protects_and_what_the_pin_adds(
    lang: str, protects: str, pin_adds: str
) -> None:
    text = " ".join(render_notice(info(), lang=lang).split())
    assert protects in text and pin_adds in text
    assert text.index(pin_adds) > text.index(PIN)  # said where the pin is
