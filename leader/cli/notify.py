"""The seed's "Notify practice" message: a template for the practice staff, German by default.

``render_notice(info, lang="de"|"en", fmt="text"|"markdown", password=None)`` returns the text:
what changes and when, each node's new address, the steps at the workstation (the seed's
Admin → change server address, "Test connection", confirm the bootstrap port, enter the
password, restart the client), the CA pin for those who can use it and what it adds, what the
password protects and where to get it (never by e-mail), whom to ask, and a closing line that
this is a template to adapt.

The password is in it only when passed explicitly; then a warning that the message must not be
sent by e-mail is the very first line. Pure code: no I/O, no clock.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tlsroll.defaults import BOOTSTRAP_PORT

LANGS = ("de", "en")
FORMATS = ("text", "markdown")


@dataclass(frozen=True)
class NoticeNode:
    """One server node as the practice sees it."""

    name: str
    old_url: str  # e.g. http://192.168.1.5:8080/praxis_live/
    new_url: str  # e.g. https://192.168.1.5:8443/praxis_live/
    bootstrap_port: int = BOOTSTRAP_PORT


@dataclass(frozen=True)
class NoticeInfo:
    """Everything the message says; ``start``/``end`` None means "planned, date to follow"."""

    practice: str  # the practice or cluster label, e.g. "Praxis Dr. Muster"
    nodes: Sequence[NoticeNode]
    ca_pin: str  # sha256:<hex> of the cluster CA's key (public)
    # Where staff get the password, completing "Sie erhalten das Passwort …" / "You get the
    # password …" in the message's language, e.g. "persönlich bei Frau Beispiel (Praxis-IT)".
    password_source: str
    contact: str  # whom to ask, e.g. "Praxis-IT, Tel. 0123 456789"
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    scope: str = "cluster"  # "local" (one node) or "cluster" (the whole multiserver)
    extra: Sequence[str] = field(default_factory=tuple)  # further notes, one paragraph each


# --- wording ------------------------------------------------------------------------------------

_DE = {
    "title": "Umstellung auf verschlüsselte Verbindung (https) – {practice}",
    "warning": (
        "WARNUNG: Diese Nachricht enthält das Authentifizierungspasswort. Sie darf nicht per "
        "E-Mail versendet werden; geben Sie sie nur persönlich, telefonisch oder auf einem "
        "anderen sicheren Weg weiter."
    ),
    "what_h": "Was ändert sich?",
    "what": (
        "Zum Schutz der Patientendaten wird die Kommunikation zwischen den Arbeitsplätzen "
        "(Clients) und dem Server künftig verschlüsselt (https, SSL/TLS). Dadurch ändert sich "
        "die Serveradresse: aus http://…:8080/… wird https://…:8443/…. Jeder Arbeitsplatz muss "
        "danach einmal auf die neue Adresse umgestellt werden."
    ),
    "what_cluster": "Umgestellt wird der gesamte Multiserver-Verbund.",
    "what_local": "Umgestellt wird ein einzelner Server-Knoten.",
    "when_h": "Wann?",
    "when_range": "Von {start} bis {end}.",
    "when_start": "Ab {start}.",
    "when_planned": "Geplant; der genaue Termin wird noch bekannt gegeben.",
    "when_note": (
        "Während der Umstellung bitte keine neuen Einträge an den Arbeitsplätzen vornehmen, "
        "sonst können Daten verloren gehen. Der Server wird dabei neu gestartet; alle "
        "Arbeitsplätze müssen ihre Verbindung danach neu einrichten."
    ),
    "nodes_h": "Neue Serveradressen",
    "node_line": "{name}: neu {new} (bisher {old}), Port für die Einrichtung: {port}",
    "steps_h": "Was ist an jedem Arbeitsplatz zu tun (nach der Umstellung)?",
    "step_login": "Als Benutzer mit Administrationsrechten anmelden.",
    "step_menu_one": "In der Menüleiste Admin → Server-Adresse ändern öffnen und {url} eintragen.",
    "step_menu_many": (
        "In der Menüleiste Admin → Server-Adresse ändern öffnen und die neue Adresse Ihres "
        "Servers aus der Liste oben eintragen."
    ),
    "step_test": "Auf „Verbindung testen“ klicken.",
    "step_port_default": (
        "Die Abfrage nach Port {port} einfach bestätigen (nur ändern, wenn Sie ausdrücklich "
        "einen anderen Port genannt bekommen haben)."
    ),
    "step_port_custom": (
        "Bei der Port-Abfrage den Port aus der Liste oben eintragen (bei Ihrem Server: {ports})."
    ),
    "step_password": "Das Authentifizierungspasswort eingeben.",
    "step_restart": (
        "Den Client neu starten. Damit ist die Umstellung an diesem Arbeitsplatz abgeschlossen."
    ),
    "pin_h": "Prüfwert des Zertifikats (für IT-Kundige)",
    "pin": (
        "Wer das Zertifikat zusätzlich prüfen kann, vergleicht den Schlüssel der "
        "Zertifizierungsstelle mit diesem Prüfwert (CA-Pin). Er ist öffentlich und darf "
        "weitergegeben werden:"
    ),
    "pin_adds": (
        "Mit dem Prüfwert vertraut der Arbeitsplatz dem Server allein anhand dieses Werts: "
        "Auch wer das Passwort kennt, kann sich dann nicht als Server ausgeben."
    ),
    "pin_cli": "Mit dem Kommandozeilen-Werkzeug: {cmd}",
    "password_h": "Passwort",
    "password_what": (
        "Das Passwort berechtigt einen Arbeitsplatz, sich mit dem verschlüsselten Server zu "
        "verbinden: Mit ihm erhält er die Zertifizierungsstelle des Servers und ein eigenes "
        "Zertifikat. Arbeitsplatz und Server prüfen das Passwort gemeinsam, ohne es zu "
        "übertragen; jede falsche Eingabe wird gezählt und ist in der Übersicht der Praxis-IT "
        "zu sehen, nach einigen lässt der Server warten. Wer das Passwort kennt, kann einen "
        "PC anschließen und könnte sich anderen im selben Netz gegenüber als Server ausgeben; "
        "der Prüfwert oben schließt diese Lücke."
    ),
    "password_source": (
        "Das Authentifizierungspasswort erhalten Sie {source}. Es wird nicht per E-Mail "
        "verschickt; bitte geben Sie es auch selbst nicht per E-Mail oder Chat weiter."
    ),
    "password_value": "Authentifizierungspasswort: {password}",
    "contact_h": "Fragen?",
    "contact": "Bei Fragen oder Problemen wenden Sie sich bitte an {contact}.",
    "template": (
        "Hinweis: Diese Nachricht ist eine Vorlage. Bitte passen Sie Formulierungen und Hinweise "
        "in eigener Verantwortung an Ihre Praxis an, bevor Sie sie weitergeben."
    ),
    "date": "%d.%m.%Y, %H:%M Uhr",
}

_EN = {
    "title": "Switch to an encrypted connection (https) – {practice}",
    "warning": (
        "WARNING: this message contains the authentication password. Do not send it by e-mail; "
        "hand it on only in person, by phone or by another secure channel."
    ),
    "what_h": "What changes?",
    "what": (
        "To protect patient data, the traffic between the workstations (clients) and the server "
        "will be encrypted (https, SSL/TLS). The server address changes: http://…:8080/… becomes "
        "https://…:8443/…. Every workstation has to be switched to the new address once."
    ),
    "what_cluster": "The whole multiserver is switched.",
    "what_local": "A single server node is switched.",
    "when_h": "When?",
    "when_range": "From {start} to {end}.",
    "when_start": "From {start}.",
    "when_planned": "Planned; the exact date will follow.",
    "when_note": (
        "During the switch, please make no new entries at the workstations, or data could be "
        "lost. The server restarts; every workstation has to set up its connection again."
    ),
    "nodes_h": "New server addresses",
    "node_line": "{name}: new {new} (was {old}), port for the set-up: {port}",
    "steps_h": "What to do at each workstation (after the switch)",
    "step_login": "Log in as a user with administration rights.",
    "step_menu_one": "In the menu bar open Admin → Change server address and enter {url}.",
    "step_menu_many": (
        "In the menu bar open Admin → Change server address and enter your server's new address "
        "from the list above."
    ),
    "step_test": "Click “Test connection”.",
    "step_port_default": (
        "Just confirm the prompt for port {port} (change it only if you were told another port)."
    ),
    "step_port_custom": "At the port prompt, enter the port from the list above ({ports}).",
    "step_password": "Enter the authentication password.",
    "step_restart": "Restart the client. This completes the switch at this workstation.",
    "pin_h": "Certificate check value (for IT staff)",
    "pin": (
        "If you can check the certificate yourself, compare the certificate authority's key "
        "with this check value (CA pin). It is public and may be passed on freely:"
    ),
    "pin_adds": (
        "With the check value the workstation trusts the server by this value alone: then "
        "even someone who knows the password cannot pose as the server."
    ),
    "pin_cli": "With the command-line tool: {cmd}",
    "password_h": "Password",
    "password_what": (
        "The password lets a workstation join the encrypted server: with it the workstation "
        "receives the server's certificate authority and a certificate of its own. Workstation "
        "and server check the password together without sending it; every wrong entry is "
        "counted and shown to the practice IT, and after a few the server makes you wait. "
        "Whoever knows the password can connect a PC, and could pose as the server to others on "
        "the same network; the check value above closes that gap."
    ),
    "password_source": (
        "You get the authentication password {source}. It is not sent by e-mail; please do not "
        "pass it on by e-mail or chat either."
    ),
    "password_value": "Authentication password: {password}",
    "contact_h": "Questions?",
    "contact": "If you have questions or problems, please contact {contact}.",
    "template": (
        "Note: this message is a template. Adapt its wording and notes to your practice, on your "
        "own responsibility, before you pass it on."
    ),
    "date": "%Y-%m-%d %H:%M",
}

_WORDS = {"de": _DE, "en": _EN}


# --- rendering ----------------------------------------------------------------------------------


def render_notice(
    info: NoticeInfo,
    *,
    lang: str = "de",
    fmt: str = "text",
    password: str | None = None,
) -> str:
    """The message for ``info`` in ``lang`` ("de", "en") and ``fmt`` ("text", "markdown")."""
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {', '.join(LANGS)}, got {lang!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if password is not None and not password:
        raise ValueError("password, when given, must not be empty")
    if not info.nodes:
        raise ValueError("the notice needs at least one node")
    w = _WORDS[lang]
    md = fmt == "markdown"
    doc = _Doc(md)

    if password is not None:
        doc.warning(w["warning"])
    doc.title(w["title"].format(practice=doc.text(info.practice)))

    doc.heading(w["what_h"])
    scope = w["what_local"] if info.scope == "local" else w["what_cluster"]
    doc.para(f"{w['what']} {scope}")

    doc.heading(w["when_h"])
    doc.para(_when(info, w))
    doc.para(w["when_note"])

    doc.heading(w["nodes_h"])
    doc.bullets(
        [
            w["node_line"].format(
                name=doc.text(n.name),
                new=doc.code(n.new_url),
                old=doc.code(n.old_url),
                port=n.bootstrap_port,
            )
            for n in info.nodes
        ]
    )

    doc.heading(w["steps_h"])
    ports = sorted({n.bootstrap_port for n in info.nodes})
    menu = (
        w["step_menu_one"].format(url=doc.code(info.nodes[0].new_url))
        if len(info.nodes) == 1
        else w["step_menu_many"]
    )
    port_step = (
        w["step_port_default"].format(port=ports[0])
        if len(ports) == 1
        else w["step_port_custom"].format(ports=", ".join(str(p) for p in ports))
    )
    doc.steps(
        [w["step_login"], menu, w["step_test"], port_step, w["step_password"], w["step_restart"]]
    )

    doc.heading(w["pin_h"])
    doc.para(w["pin"])
    doc.block(info.ca_pin)
    first = info.nodes[0]
    port_opt = (
        ""
        if first.bootstrap_port == BOOTSTRAP_PORT
        else f" --bootstrap-port {first.bootstrap_port}"
    )
    cmd = f"tlsroll client test-connection {first.new_url} --ca-pin {info.ca_pin}{port_opt}"
    doc.para(w["pin_cli"].format(cmd=doc.code(cmd)))
    doc.para(w["pin_adds"])

    doc.heading(w["password_h"])
    doc.para(w["password_what"])
    doc.para(w["password_source"].format(source=doc.text(info.password_source)))
    if password is not None:
        doc.para(w["password_value"].format(password=doc.code(password)))

    doc.heading(w["contact_h"])
    doc.para(w["contact"].format(contact=doc.text(info.contact)))
    for note in info.extra:
        doc.para(doc.text(note))

    doc.rule()
    doc.para(w["template"])
    return doc.render()


def _when(info: NoticeInfo, w: dict[str, str]) -> str:
    if info.start is None:
        return w["when_planned"]
    start = _date(info.start, w["date"])
    if info.end is None:
        return w["when_start"].format(start=start)
    return w["when_range"].format(start=start, end=_date(info.end, w["date"]))


def _date(when: dt.datetime, pattern: str) -> str:
    text = when.strftime(pattern)
    zone = when.tzname() if when.tzinfo is not None else None
    return f"{text} ({zone})" if zone else text


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")


class _Doc:
    """Paragraphs and lists, as plain text or as Markdown."""

    def __init__(self, markdown: bool) -> None:
        self.md = markdown
        self.parts: list[str] = []

    def text(self, value: str) -> str:
        """User-supplied text: escaped in Markdown so it cannot add formatting or links."""
        value = " ".join(value.split())
        return _MD_SPECIAL.sub(r"\\\1", value) if self.md else value

    def code(self, value: str) -> str:
        if not self.md:
            return value
        longest = max((len(m) for m in re.findall(r"`+", value)), default=0)
        fence = "`" * (longest + 1)
        pad = " " if value.startswith("`") or value.endswith("`") else ""
        return f"{fence}{pad}{value}{pad}{fence}"

    def warning(self, line: str) -> None:
        self.parts.append(f"**{line}**" if self.md else line)

    def title(self, line: str) -> None:
        if self.md:
            self.parts.append(f"# {line}")
        else:
            self.parts.append(f"{line}\n{'=' * len(line)}")

    def heading(self, line: str) -> None:
        self.parts.append(f"## {line}" if self.md else f"{line}\n{'-' * len(line)}")

    def para(self, line: str) -> None:
        self.parts.append(line)

    def bullets(self, items: Sequence[str]) -> None:
        self.parts.append("\n".join(f"- {i}" for i in items))

    def steps(self, items: Sequence[str]) -> None:
        self.parts.append("\n".join(f"{n}. {i}" for n, i in enumerate(items, 1)))

    def block(self, value: str) -> None:
        self.parts.append(f"```\n{value}\n```" if self.md else f"    {value}")

    def rule(self) -> None:
        self.parts.append("---" if self.md else "-" * 40)

    def render(self) -> str:
        return "\n\n".join(self.parts) + "\n"
