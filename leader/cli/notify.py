"""The seed's "Notify practice" message: what the practice staff are told, German by default.

``render_notice(info, lang="de"|"en", fmt="text"|"markdown"|"html", password=None)`` returns
the message for one change (``enable-tls``, ``change-password``, ``rotate-cert``,
``disable-tls``) at one point of its life (``Timing.phase``):

* ``announced``: before the switch (``tlsroll notify --when …``): when it will be, what staff
  must not do meanwhile, what to do afterwards;
* ``running``: the rollout has started and is not over;
* ``done``: the rollout is over; the times are the schema's, and nodes it left unchanged are
  named.

``NoticeInfo.already`` (enable-tls): nodes an earlier rollout switched, listed with their https
address as "already switched" (a cluster rollout after a local one).

``NoticeInfo.transitional`` (an ``enable-tls`` rollout of the transitional strategy): the old
http address keeps working beside the new one, so the message says "you can switch any time
until …" (``until``: when `tlsroll rollout finalize` is planned; None: "until you are told").

Times are shown in the zone of the datetimes passed in (the CLI converts them to the practice's
zone) with the zone's abbreviation, MEZ/MESZ in German. The text is meant to go out as it is:
the reminder that the seed's message is a template to adapt is the CLI's business (stderr), not
part of the message. The password is in it only when passed explicitly (the CLI checks it
against the staged verifier first); then a warning not to e-mail the message is the very first
line. HTML is escaped by Jinja2's autoescape and markupsafe: nothing an admin typed can add
markup. Pure code: no I/O, no clock.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import jinja2
from markupsafe import Markup, escape

from tlsroll.defaults import BOOTSTRAP_PORT

LANGS = ("de", "en")
FORMATS = ("text", "markdown", "html")
CHANGES = ("enable-tls", "change-password", "rotate-cert", "disable-tls")
PHASES = ("announced", "running", "done")
Phase = Literal["announced", "running", "done"]


@dataclass(frozen=True)
class NoticeNode:
    """One server node as the practice sees it.

    ``old_url`` is its address now, ``new_url`` after the change (the same for changes that keep
    the address). ``path_known`` False: the app path is not known yet (a first switch announced
    before any agent reported its server), and the URLs end at the port.
    """

    name: str
    old_url: str  # e.g. http://192.168.1.5:8080/praxis_live/
    new_url: str  # e.g. https://192.168.1.5:8443/praxis_live/
    bootstrap_port: int = BOOTSTRAP_PORT
    path_known: bool = True
    # The SPKI pin of the CA its https certificate comes from after the change, where it is
    # not the cluster CA's (``NoticeInfo.ca_pin``): a practice's own CA (``--cert-dir``).
    ca_pin: str = ""
    # rotate-cert: the certificate comes from another CA than the one before, which a
    # workstation set up before may not trust: "own" (a practice's own CA it did not serve
    # before: every such workstation must be set up again), "cluster" (back from a practice's
    # CA to the cluster CA: one set up with that practice CA's pin must); "" neither.
    ca_change: Literal["", "own", "cluster"] = ""
    # A transitional rollout's node whose http a finalize (phase 2) has closed: since when
    # (aware). None: its http still works (``NoticeInfo.until``).
    closed: dt.datetime | None = None


@dataclass(frozen=True)
class Timing:
    """When: ``start`` and ``end`` are aware datetimes in the zone to show; ``end`` None means
    open (an announcement without a duration, a rollout still running)."""

    phase: Phase
    start: dt.datetime
    end: dt.datetime | None = None


@dataclass(frozen=True)
class NoticeInfo:
    """Everything the message says."""

    practice: str  # the practice or cluster label, e.g. "Praxis Dr. Muster"
    nodes: Sequence[NoticeNode]
    ca_pin: str  # sha256:<hex> of the cluster CA's key (public); a node's own: NoticeNode.ca_pin
    # Where staff get the password, completing "Das Authentifizierungspasswort erhalten Sie …"
    # / "You get the authentication password …", e.g. "persönlich bei Frau Beispiel".
    password_source: str
    contact: str  # whom to ask, completing "wenden Sie sich bitte an …" / "please contact …"
    timing: Timing
    change: str = "enable-tls"
    scope: str = "cluster"  # "local" (the leader node), "cluster" or "nodes" (named ones)
    unchanged: Sequence[str] = ()  # done: the nodes the rollout left as they were
    # enable-tls: nodes an earlier rollout switched (skipped by this one), new_url their https
    already: Sequence[NoticeNode] = ()
    extra: Sequence[str] = field(default_factory=tuple)  # further notes, one paragraph each
    transitional: bool = False  # enable-tls keeping http until finalize (strategy transitional)
    until: dt.datetime | None = None  # transitional: when http is planned to close
    # transitional: its finalize is closing http one server after another (running, paused,
    # a --when-quiet one waiting for quiet on a node): each restarts briefly in its turn.
    closing: bool = False
    # enable-tls of scope local or nodes: the enrolled nodes outside it, ``old_url`` (and
    # ``new_url``) their address now. The message then says that only the workstations using
    # the old address of a node in it switch, and that these keep theirs (session 64's review
    # M1: "every workstation" sent the whole practice to the one server switched).
    others: Sequence[NoticeNode] = ()


# --- wording ------------------------------------------------------------------------------------
# One table per language. Keys with a change in them exist for every change that uses them;
# "before" covers announced and running, "after" done.

_DE: dict[str, str] = {
    "title.enable-tls": "Umstellung auf verschlüsselte Verbindung (https) – {practice}",
    "title.change-password": (
        "Neues Authentifizierungspasswort für die Serververbindung – {practice}"
    ),
    "title.rotate-cert": "Neues Serverzertifikat – {practice}",
    "title.disable-tls": "Rückkehr zur unverschlüsselten Verbindung (http) – {practice}",
    "subject.enable-tls": "Die Umstellung",
    "subject.change-password": "Der Passwortwechsel",
    "subject.rotate-cert": "Der Zertifikatswechsel",
    "subject.disable-tls": "Die Rückumstellung",
    "warning": (
        "WARNUNG: Diese Nachricht enthält das Authentifizierungspasswort. Versenden Sie sie "
        "nicht per E-Mail, sondern geben Sie sie nur persönlich, telefonisch oder auf einem "
        "anderen sicheren Weg weiter."
    ),
    "what_h": "Was ändert sich?",
    "what.enable-tls.before": (
        "Zum Schutz der Patientendaten wird die Verbindung zwischen den Arbeitsplätzen (Clients) "
        "und dem Server verschlüsselt (https, SSL/TLS). Dadurch ändert sich die Serveradresse. "
        "Jeder Arbeitsplatz muss danach einmal auf die neue Adresse umgestellt werden."
    ),
    "what.enable-tls.after": (
        "Zum Schutz der Patientendaten ist die Verbindung zwischen den Arbeitsplätzen (Clients) "
        "und dem Server jetzt verschlüsselt (https, SSL/TLS). Dadurch hat sich die Serveradresse "
        "geändert. Jeder Arbeitsplatz muss jetzt einmal auf die neue Adresse umgestellt werden."
    ),
    "what.change-password.before": (
        "Das Authentifizierungspasswort, mit dem ein Arbeitsplatz für die verschlüsselte "
        "Verbindung eingerichtet wird, wird geändert. Das neue Passwort gilt auf jedem Server "
        "erst nach dessen Neustart. Die Serveradresse bleibt gleich."
    ),
    "what.change-password.after": (
        "Das Authentifizierungspasswort, mit dem ein Arbeitsplatz für die verschlüsselte "
        "Verbindung eingerichtet wird, wurde geändert. Die Serveradresse bleibt gleich."
    ),
    "what.rotate-cert.before": (
        "Der Server erhält ein neues Zertifikat für die verschlüsselte Verbindung. Serveradresse "
        "und Passwort bleiben gleich; an den Arbeitsplätzen ist nichts zu tun."
    ),
    "what.rotate-cert.after": (
        "Der Server hat ein neues Zertifikat für die verschlüsselte Verbindung erhalten. "
        "Serveradresse und Passwort bleiben gleich; an den Arbeitsplätzen ist nichts zu tun."
    ),
    "what.rotate-cert.newca.before": (
        "Der Server erhält ein neues Zertifikat für die verschlüsselte Verbindung, ausgestellt "
        "von einer anderen Zertifizierungsstelle. Serveradresse und Passwort bleiben gleich."
    ),
    "what.rotate-cert.newca.after": (
        "Der Server hat ein neues Zertifikat für die verschlüsselte Verbindung erhalten, "
        "ausgestellt von einer anderen Zertifizierungsstelle. Serveradresse und Passwort "
        "bleiben gleich."
    ),
    "newca.own": (
        "Jeder Arbeitsplatz, der vor dem Wechsel eingerichtet wurde, muss nach dem Wechsel "
        "einmal neu eingerichtet werden (siehe unten): Bis dahin vertraut er dem neuen "
        "Zertifikat nicht und erreicht den Server nicht."
    ),
    "newca.cluster": (
        "Ein Arbeitsplatz, der mit dem Prüfwert (CA-Pin) der praxiseigenen "
        "Zertifizierungsstelle eingerichtet wurde, muss nach dem Wechsel einmal neu "
        "eingerichtet werden (siehe unten); an den anderen ist nichts zu tun. Meldet ein "
        "Arbeitsplatz nach dem Wechsel einen Zertifikatsfehler, richten Sie ihn neu ein."
    ),
    "what.rotate-cert.newca.marked.before": (
        "Die Server erhalten neue Zertifikate für die verschlüsselte Verbindung, die unten "
        "markierten von einer anderen Zertifizierungsstelle. Serveradresse und Passwort bleiben "
        "gleich."
    ),
    "what.rotate-cert.newca.marked.after": (
        "Die Server haben neue Zertifikate für die verschlüsselte Verbindung erhalten, die unten "
        "markierten von einer anderen Zertifizierungsstelle. Serveradresse und Passwort bleiben "
        "gleich."
    ),
    "newca.own.marked": (
        "Für die mit „neu einrichten“ markierten Server muss jeder Arbeitsplatz, der vor dem "
        "Wechsel eingerichtet wurde, nach dem Wechsel einmal neu eingerichtet werden (siehe "
        "unten)."
    ),
    "newca.cluster.marked": (
        "Für die mit „neu einrichten, falls mit Prüfwert eingerichtet“ markierten Server muss "
        "ein Arbeitsplatz, der mit dem Prüfwert (CA-Pin) der praxiseigenen "
        "Zertifizierungsstelle eingerichtet wurde, nach dem Wechsel einmal neu eingerichtet "
        "werden (siehe unten); ebenso einer, der nach dem Wechsel einen Zertifikatsfehler "
        "meldet."
    ),
    "node.mark.own": "{line} – neu einrichten",
    "node.mark.cluster": "{line} – neu einrichten, falls mit Prüfwert eingerichtet",
    "what.disable-tls.before": (
        "Die Verbindung zwischen den Arbeitsplätzen (Clients) und dem Server wird wieder auf "
        "unverschlüsseltes http zurückgestellt. Dadurch gilt wieder die frühere Serveradresse. "
        "Jeder Arbeitsplatz muss danach einmal auf diese Adresse umgestellt werden."
    ),
    "what.disable-tls.after": (
        "Die Verbindung zwischen den Arbeitsplätzen (Clients) und dem Server wurde wieder auf "
        "unverschlüsseltes http zurückgestellt. Damit gilt wieder die frühere Serveradresse. "
        "Jeder Arbeitsplatz muss jetzt einmal auf diese Adresse umgestellt werden."
    ),
    "what.enable-tls.transitional.before": (
        "Zum Schutz der Patientendaten erhält die Verbindung zwischen den Arbeitsplätzen "
        "(Clients) und dem Server eine zusätzliche, verschlüsselte Adresse (https, SSL/TLS). Die "
        "bisherige Adresse funktioniert vorerst weiter: Sie können jeden Arbeitsplatz jederzeit "
        "umstellen, {until}. Danach gilt nur noch die neue Adresse."
    ),
    "what.enable-tls.transitional.after": (
        "Zum Schutz der Patientendaten ist der Server jetzt zusätzlich über eine verschlüsselte "
        "Adresse erreichbar (https, SSL/TLS). Die bisherige Adresse funktioniert vorerst weiter: "
        "Sie können jeden Arbeitsplatz jederzeit umstellen, {until}. Danach gilt nur noch die "
        "neue Adresse; ein Arbeitsplatz, der dann noch die alte nutzt, erreicht den Server nicht."
    ),
    "what.enable-tls.part.before": (
        "Zum Schutz der Patientendaten wird die Verbindung zwischen den Arbeitsplätzen (Clients) "
        "und dem Server verschlüsselt (https, SSL/TLS). Dadurch ändert sich die Serveradresse. "
        "Nur Arbeitsplätze, die {old} nutzen, müssen danach einmal auf die neue Adresse "
        "umgestellt werden."
    ),
    "what.enable-tls.part.after": (
        "Zum Schutz der Patientendaten ist die Verbindung zwischen den Arbeitsplätzen (Clients) "
        "und dem Server jetzt verschlüsselt (https, SSL/TLS). Dadurch hat sich die Serveradresse "
        "geändert. Nur Arbeitsplätze, die {old} nutzen, müssen jetzt einmal auf die neue Adresse "
        "umgestellt werden."
    ),
    "others.one": (
        "Der Server {others} behält seine Adresse; an Arbeitsplätzen, die ihn nutzen, ist "
        "nichts zu tun."
    ),
    "others.many": (
        "Die Server {others} behalten ihre Adressen; an Arbeitsplätzen, die sie nutzen, ist "
        "nichts zu tun."
    ),
    "or": "oder",
    "and": "und",
    "closed.one": (
        "Beim Server {names} ist die bisherige Adresse jedoch bereits geschlossen: "
        "Arbeitsplätze, die ihn noch darüber nutzen, erreichen ihn erst wieder, wenn sie "
        "umgestellt sind."
    ),
    "closed.many": (
        "Bei den Servern {names} sind die bisherigen Adressen jedoch bereits geschlossen: "
        "Arbeitsplätze, die sie noch darüber nutzen, erreichen sie erst wieder, wenn sie "
        "umgestellt sind."
    ),
    "closing": (
        "Die bisherigen Adressen werden jetzt nacheinander geschlossen; dabei wird jeder Server "
        "kurz neu gestartet, wenn er an der Reihe ist."
    ),
    "until.when": "spätestens bis {when}",
    "until.open": "bis die Praxis-IT die alte Adresse schließt (Sie erfahren es vorher)",
    "scope.cluster": "Betroffen ist der gesamte Multiserver-Verbund.",
    "scope.local": "Betroffen ist ein einzelner Server.",
    "scope.nodes": "Betroffen sind die unten genannten Server.",
    "when_h": "Wann?",
    "announced.range_day": "{subject} ist für {day}, von {start} bis {end} geplant.",
    "announced.range": "{subject} ist von {start_full} bis {end_full} geplant.",
    "announced.open": "{subject} beginnt am {day}, um {start}.",
    "running": "{subject} hat am {day}, um {start} begonnen und läuft noch.",
    "done.range_day": "{subject} fand am {day}, von {start} bis {end} statt.",
    "done.range": "{subject} fand von {start_full} bis {end_full} statt.",
    "done.moment": "{subject} fand am {day}, um {start} statt.",
    "restart.one": "Dabei wird der Server neu gestartet und ist kurz nicht erreichbar.",
    "restart.many": (
        "Dabei werden die Server nacheinander neu gestartet und sind jeweils kurz nicht erreichbar."
    ),
    "entries.announced": (
        "Bitte schließen Sie Ihre Eingaben vorher ab und nehmen Sie in dieser Zeit keine neuen "
        "Einträge vor."
    ),
    "entries.running": "Bitte nehmen Sie bis zum Abschluss keine neuen Einträge vor.",
    "entries.announced.part": (
        "Bitte schließen Sie an den betroffenen Arbeitsplätzen Ihre Eingaben vorher ab und "
        "nehmen Sie dort in dieser Zeit keine neuen Einträge vor."
    ),
    "entries.running.part": (
        "Bitte nehmen Sie an den betroffenen Arbeitsplätzen bis zum Abschluss keine neuen "
        "Einträge vor."
    ),
    "entries.others": "An den übrigen Arbeitsplätzen kann normal weitergearbeitet werden.",
    "unchanged.one": "Für den Server {names} gilt vorerst weiter die bisherige Adresse.",
    "unchanged.many": "Für die Server {names} gilt vorerst weiter die bisherige Adresse.",
    "nodes_h.address": "Neue Serveradressen",
    "nodes_h.same": "Betroffene Server",
    "node.new.before": "{name}: neu {new} (bisher {old})",
    "node.new.after": "{name}: neu {new} (vorher {old})",
    "node.new.transitional": "{name}: neu {new} (vorerst geht auch noch {old})",
    "node.new.closed": "{name}: neu {new} ({old} ist seit {when} geschlossen)",
    "node.port": "{line}, Port für die Einrichtung: {port}",
    "node.already": "{name}: {new} (bereits umgestellt)",
    "node.other": "{name}: {url} (bleibt unverändert)",
    "node.same": "{name}: {url}",
    "path_unknown": (
        "Nur der Anfang der Adresse ändert sich; was nach der Portnummer folgt, bleibt gleich."
    ),
    "steps_h.before": "Was ist danach an jedem Arbeitsplatz zu tun?",
    "steps_h.after": "Was ist jetzt an jedem Arbeitsplatz zu tun?",
    "steps_h.setup": "So richten Sie einen Arbeitsplatz (neu) ein",
    "steps_h.part.before": "Was ist danach an den betroffenen Arbeitsplätzen zu tun?",
    "steps_h.part.after": "Was ist jetzt an den betroffenen Arbeitsplätzen zu tun?",
    "password_steps.before": (
        "An bereits eingerichteten Arbeitsplätzen ist in der Regel nichts zu tun. Fragt ein "
        "Arbeitsplatz nach dem Neustart des Servers nach dem Passwort oder wird er neu "
        "eingerichtet, geben Sie das neue Passwort ein."
    ),
    "password_steps.after": (
        "An bereits eingerichteten Arbeitsplätzen ist in der Regel nichts zu tun. Fragt ein "
        "Arbeitsplatz nach dem Passwort oder wird er neu eingerichtet, geben Sie das neue "
        "Passwort ein."
    ),
    "step_login": "Als Benutzer mit Administrationsrechten anmelden.",
    "step_menu_one": "In der Menüleiste „Admin → Serveradresse ändern“ öffnen und {url} eintragen.",
    "step_menu_many": (
        "In der Menüleiste „Admin → Serveradresse ändern“ öffnen und die neue Adresse Ihres "
        "Servers aus der Liste oben eintragen."
    ),
    "step_menu_same": (
        "In der Menüleiste „Admin → Serveradresse ändern“ öffnen und die Adresse Ihres Servers "
        "aus der Liste oben eintragen."
    ),
    "step_menu_path": (
        "In der Menüleiste „Admin → Serveradresse ändern“ öffnen und den Anfang der Adresse "
        "wie in der Liste oben ändern."
    ),
    "step_menu_one.part": (
        "In der Menüleiste „Admin → Serveradresse ändern“ öffnen. Steht dort {old}, diese "
        "Adresse durch {url} ersetzen; sonst ist an diesem Arbeitsplatz nichts zu tun."
    ),
    "step_menu_many.part": (
        "In der Menüleiste „Admin → Serveradresse ändern“ öffnen. Steht dort eine der "
        "oben mit „bisher“ genannten Adressen, die neue Adresse dieses Servers eintragen; "
        "sonst ist an diesem Arbeitsplatz nichts zu tun."
    ),
    "step_menu_path.part": (
        "In der Menüleiste „Admin → Serveradresse ändern“ öffnen. Beginnt die Adresse dort wie "
        "eine der bisherigen in der Liste oben, ihren Anfang wie dort angegeben ändern; sonst "
        "ist an diesem Arbeitsplatz nichts zu tun."
    ),
    "step_test": "Auf „Verbindung testen“ klicken.",
    "step_port_default": (
        "Die Abfrage nach Port {port} einfach bestätigen (nur ändern, wenn Ihnen ausdrücklich "
        "ein anderer Port genannt wurde)."
    ),
    "step_port_custom": "Bei der Abfrage nach dem Port den Port Ihres Servers aus der Liste oben "
    "eintragen.",
    "step_password": "Das Authentifizierungspasswort eingeben.",
    "step_restart.enable-tls": (
        "Den Client neu starten. Damit ist die Umstellung an diesem Arbeitsplatz abgeschlossen."
    ),
    "step_restart.change-password": (
        "Den Client neu starten. Damit ist der Arbeitsplatz eingerichtet."
    ),
    "step_restart.disable-tls": (
        "Den Client neu starten. Damit ist die Rückumstellung an diesem Arbeitsplatz abgeschlossen."
    ),
    "step_restart.rotate-cert": (
        "Den Client neu starten. Damit ist der Arbeitsplatz neu eingerichtet."
    ),
    "pin_h": "Prüfwert des Zertifikats (für IT-Kundige)",
    "pin": (
        "Wer das Zertifikat zusätzlich prüfen kann, vergleicht den Schlüssel der "
        "Zertifizierungsstelle mit diesem Prüfwert (CA-Pin). Er ist öffentlich und darf "
        "weitergegeben werden:"
    ),
    "pin_many": (
        "Wer das Zertifikat zusätzlich prüfen kann, vergleicht den Schlüssel der "
        "Zertifizierungsstelle mit dem Prüfwert (CA-Pin) des Servers seines Arbeitsplatzes. Die "
        "Prüfwerte sind öffentlich und dürfen weitergegeben werden:"
    ),
    "pin_node": "{name}: {pin}",
    "pin_cli": "Mit dem Kommandozeilenwerkzeug geht das so: {cmd}",
    "pin_cli_many": (
        "Mit dem Kommandozeilenwerkzeug geht das so (mit dem Befehl für den Server Ihres "
        "Arbeitsplatzes):"
    ),
    "pin_cli_node": "{name}: {cmd}",
    "pin_adds": (
        "Mit dem Prüfwert vertraut der Arbeitsplatz dem Server allein anhand dieses Wertes: "
        "Auch wer das Passwort kennt, kann sich dann nicht als Server ausgeben."
    ),
    "password_h": "Passwort",
    "password_what": (
        "Mit dem Passwort wird ein Arbeitsplatz für die verschlüsselte Verbindung eingerichtet: "
        "Er erhält damit das Zertifikat der Zertifizierungsstelle (CA) und ein eigenes "
        "Zertifikat. "
        "Arbeitsplatz und Server prüfen das Passwort gemeinsam, ohne es zu übertragen. Jede "
        "falsche Eingabe wird gezählt und ist in der Übersicht der Praxis-IT zu sehen; nach "
        "mehreren Fehlversuchen lässt der Server Sie eine Weile warten. Wer das Passwort kennt, "
        "kann einen PC anschließen und sich im selben Netz gegenüber anderen Arbeitsplätzen "
        "als Server ausgeben; der Prüfwert oben schließt diese Lücke."
    ),
    "password_source": (
        "Das Authentifizierungspasswort erhalten Sie {source}, nie per E-Mail. Bitte geben Sie "
        "es auch selbst nur persönlich oder telefonisch weiter."
    ),
    "password_value": "Das Authentifizierungspasswort lautet: {password}",
    "password_keep": "Bitte geben Sie es nicht per E-Mail oder Chat weiter.",
    "contact_h": "Fragen?",
    "contact": "Bei Fragen oder Problemen wenden Sie sich bitte an {contact}.",
    "time": "{time} Uhr",
    "zone": "{text} ({zone})",
}

_EN: dict[str, str] = {
    "title.enable-tls": "Switch to an encrypted connection (https) – {practice}",
    "title.change-password": "New authentication password for the server connection – {practice}",
    "title.rotate-cert": "New server certificate – {practice}",
    "title.disable-tls": "Return to the unencrypted connection (http) – {practice}",
    "subject.enable-tls": "The switch",
    "subject.change-password": "The password change",
    "subject.rotate-cert": "The certificate change",
    "subject.disable-tls": "The switch back",
    "warning": (
        "WARNING: this message contains the authentication password. Do not send it by e-mail; "
        "hand it on only in person, by phone or by another secure channel."
    ),
    "what_h": "What changes?",
    "what.enable-tls.before": (
        "To protect patient data, the connection between the workstations (clients) and the "
        "server will be encrypted (https, SSL/TLS). This changes the server address. Every "
        "workstation then has to be switched to the new address once."
    ),
    "what.enable-tls.after": (
        "To protect patient data, the connection between the workstations (clients) and the "
        "server is now encrypted (https, SSL/TLS). This has changed the server address. Every "
        "workstation now has to be switched to the new address once."
    ),
    "what.change-password.before": (
        "The authentication password with which a workstation is set up for the encrypted "
        "connection will change. On each server the new password takes effect only after that "
        "server restarts. The server address stays the same."
    ),
    "what.change-password.after": (
        "The authentication password with which a workstation is set up for the encrypted "
        "connection has changed. The server address stays the same."
    ),
    "what.rotate-cert.before": (
        "The server will receive a new certificate for the encrypted connection. Server address "
        "and password stay the same; nothing needs to be done at the workstations."
    ),
    "what.rotate-cert.after": (
        "The server has received a new certificate for the encrypted connection. Server address "
        "and password stay the same; nothing needs to be done at the workstations."
    ),
    "what.rotate-cert.newca.before": (
        "The server will receive a new certificate for the encrypted connection, issued by "
        "another certificate authority. Server address and password stay the same."
    ),
    "what.rotate-cert.newca.after": (
        "The server has received a new certificate for the encrypted connection, issued by "
        "another certificate authority. Server address and password stay the same."
    ),
    "newca.own": (
        "Every workstation set up before the change has to be set up again once after it (see "
        "below): until then it does not trust the new certificate and cannot reach the server."
    ),
    "newca.cluster": (
        "A workstation that was set up with the check value (CA pin) of the practice's own "
        "certificate authority has to be set up again once after the change (see below); the "
        "others need nothing. If a workstation reports a certificate error after the change, "
        "set it up again."
    ),
    "what.rotate-cert.newca.marked.before": (
        "The servers will receive new certificates for the encrypted connection, those marked "
        "below from another certificate authority. Server address and password stay the same."
    ),
    "what.rotate-cert.newca.marked.after": (
        "The servers have received new certificates for the encrypted connection, those marked "
        "below from another certificate authority. Server address and password stay the same."
    ),
    "newca.own.marked": (
        "For the servers marked “set up again”, every workstation set up before the change has "
        "to be set up again once after it (see below)."
    ),
    "newca.cluster.marked": (
        "For the servers marked “set up again if set up with the check value”, a workstation "
        "that was set up with the check value (CA pin) of the practice's own certificate "
        "authority has to be set up again once after the change (see below); so does one that "
        "reports a certificate error then."
    ),
    "node.mark.own": "{line} – set up again",
    "node.mark.cluster": "{line} – set up again if set up with the check value",
    "what.disable-tls.before": (
        "The connection between the workstations (clients) and the server will go back to "
        "unencrypted http. The earlier server address applies again. Every workstation then has "
        "to be switched to that address once."
    ),
    "what.disable-tls.after": (
        "The connection between the workstations (clients) and the server has gone back to "
        "unencrypted http. The earlier server address applies again. Every workstation now has "
        "to be switched to that address once."
    ),
    "what.enable-tls.transitional.before": (
        "To protect patient data, the server will get an additional, encrypted address (https, "
        "SSL/TLS). The current address keeps working for now: you can switch each workstation "
        "any time {until}. After that only the new address works."
    ),
    "what.enable-tls.transitional.after": (
        "To protect patient data, the server can now also be reached at an encrypted address "
        "(https, SSL/TLS). The current address keeps working for now: you can switch each "
        "workstation any time {until}. After that only the new address works; a workstation "
        "still on the old one will not reach the server."
    ),
    "what.enable-tls.part.before": (
        "To protect patient data, the connection between the workstations (clients) and the "
        "server will be encrypted (https, SSL/TLS). This changes the server address. Only "
        "workstations that use {old} then have to be switched to the new address once."
    ),
    "what.enable-tls.part.after": (
        "To protect patient data, the connection between the workstations (clients) and the "
        "server is now encrypted (https, SSL/TLS). This has changed the server address. Only "
        "workstations that use {old} now have to be switched to the new address once."
    ),
    "others.one": (
        "The server {others} keeps its address; nothing needs to be done at workstations that "
        "use it."
    ),
    "others.many": (
        "The servers {others} keep their addresses; nothing needs to be done at workstations "
        "that use them."
    ),
    "or": "or",
    "and": "and",
    "closed.one": (
        "On the server {names}, however, the old address is closed already: workstations that "
        "still use it there reach the server again only once they are switched."
    ),
    "closed.many": (
        "On the servers {names}, however, the old addresses are closed already: workstations "
        "that still use them there reach their server again only once they are switched."
    ),
    "closing": (
        "The old addresses are now being closed one server after another; each server restarts "
        "briefly when its turn comes."
    ),
    "until.when": "until {when} at the latest",
    "until.open": "until the practice IT closes the old address (you will be told beforehand)",
    "scope.cluster": "This affects the whole multiserver.",
    "scope.local": "This affects a single server.",
    "scope.nodes": "This affects the servers listed below.",
    "when_h": "When?",
    "announced.range_day": "{subject} is planned for {day}, from {start} to {end}.",
    "announced.range": "{subject} is planned from {start_full} to {end_full}.",
    "announced.open": "{subject} starts on {day}, at {start}.",
    "running": "{subject} began on {day}, at {start}, and is still in progress.",
    "done.range_day": "{subject} took place on {day}, from {start} to {end}.",
    "done.range": "{subject} took place from {start_full} to {end_full}.",
    "done.moment": "{subject} took place on {day}, at {start}.",
    "restart.one": "The server restarts and is briefly unavailable.",
    "restart.many": "The servers restart one after another and are each briefly unavailable.",
    "entries.announced": (
        "Please finish your entries beforehand and make no new entries during this time."
    ),
    "entries.running": "Please make no new entries until it is complete.",
    "entries.announced.part": (
        "At the workstations concerned, please finish your entries beforehand and make no new "
        "entries during this time."
    ),
    "entries.running.part": (
        "At the workstations concerned, please make no new entries until it is complete."
    ),
    "entries.others": "The other workstations can go on working as usual.",
    "unchanged.one": "The server {names} keeps its current address for now.",
    "unchanged.many": "The servers {names} keep their current address for now.",
    "nodes_h.address": "New server addresses",
    "nodes_h.same": "Servers concerned",
    "node.new.before": "{name}: new {new} (currently {old})",
    "node.new.after": "{name}: new {new} (previously {old})",
    "node.new.transitional": "{name}: new {new} (for now {old} still works too)",
    "node.new.closed": "{name}: new {new} ({old} closed since {when})",
    "node.port": "{line}, port for the set-up: {port}",
    "node.already": "{name}: {new} (already switched)",
    "node.other": "{name}: {url} (unchanged)",
    "node.same": "{name}: {url}",
    "path_unknown": (
        "Only the beginning of the address changes; whatever follows the port number stays "
        "the same."
    ),
    "steps_h.before": "What to do at each workstation afterwards",
    "steps_h.after": "What to do at each workstation now",
    "steps_h.setup": "How to set up a workstation (again)",
    "steps_h.part.before": "What to do afterwards at each workstation concerned",
    "steps_h.part.after": "What to do now at each workstation concerned",
    "password_steps.before": (
        "Workstations already set up usually need nothing. If a workstation asks for the "
        "password after its server has restarted, or is set up again, enter the new password."
    ),
    "password_steps.after": (
        "Workstations already set up usually need nothing. If a workstation asks for the "
        "password, or is set up again, enter the new password."
    ),
    "step_login": "Log in as a user with administration rights.",
    "step_menu_one": "In the menu bar open “Admin → Change server address” and enter {url}.",
    "step_menu_many": (
        "In the menu bar open “Admin → Change server address” and enter your server's new "
        "address from the list above."
    ),
    "step_menu_same": (
        "In the menu bar open “Admin → Change server address” and enter your server's address "
        "from the list above."
    ),
    "step_menu_path": (
        "In the menu bar open “Admin → Change server address” and change the beginning of the "
        "address as in the list above."
    ),
    "step_menu_one.part": (
        "In the menu bar open “Admin → Change server address”. If it shows {old}, replace it "
        "with {url}; if not, this workstation needs nothing."
    ),
    "step_menu_many.part": (
        "In the menu bar open “Admin → Change server address”. If it shows one of the old "
        "addresses in the list above, enter that server's new address; if not, this "
        "workstation needs nothing."
    ),
    "step_menu_path.part": (
        "In the menu bar open “Admin → Change server address”. If the address there begins "
        "like one of the old ones in the list above, change its beginning as shown there; if "
        "not, this workstation needs nothing."
    ),
    "step_test": "Click “Test connection”.",
    "step_port_default": (
        "Just confirm the prompt for port {port} (change it only if you were told another port)."
    ),
    "step_port_custom": "At the port prompt, enter your server's port from the list above.",
    "step_password": "Enter the authentication password.",
    "step_restart.enable-tls": "Restart the client. This completes the switch at this workstation.",
    "step_restart.change-password": "Restart the client. The workstation is now set up.",
    "step_restart.disable-tls": (
        "Restart the client. This completes the switch back at this workstation."
    ),
    "step_restart.rotate-cert": "Restart the client. The workstation is now set up again.",
    "pin_h": "Certificate check value (for IT staff)",
    "pin": (
        "If you can check the certificate yourself, compare the certificate authority's key "
        "with this check value (CA pin). It is public and may be passed on freely:"
    ),
    "pin_many": (
        "If you can check the certificate yourself, compare the certificate authority's key "
        "with the check value (CA pin) of your workstation's server. They are public and may "
        "be passed on freely:"
    ),
    "pin_node": "{name}: {pin}",
    "pin_cli": "With the command-line tool: {cmd}",
    "pin_cli_many": "With the command-line tool (the command for your workstation's server):",
    "pin_cli_node": "{name}: {cmd}",
    "pin_adds": (
        "With the check value the workstation trusts the server by this value alone: then "
        "even someone who knows the password cannot pose as the server."
    ),
    "password_h": "Password",
    "password_what": (
        "The password sets up a workstation for the encrypted connection: with it the "
        "workstation receives the certificate of the certificate authority (CA) and a "
        "certificate of its own. "
        "Workstation and server check the password together without sending it. Every wrong "
        "entry is counted and shown to the practice IT; after several failed attempts the "
        "server makes you wait a while. Whoever knows the password can connect a PC and pose "
        "as the server to other workstations on the same network; the check value above closes "
        "that gap."
    ),
    "password_source": (
        "You get the authentication password {source}, never by e-mail. If you pass it on "
        "yourself, please do so only in person or by phone."
    ),
    "password_value": "The authentication password is: {password}",
    "password_keep": "Please do not pass it on by e-mail or chat.",
    "contact_h": "Questions?",
    "contact": "If you have questions or problems, please contact {contact}.",
    "time": "{time}",
    "zone": "{text} ({zone})",
}

_WORDS = {"de": _DE, "en": _EN}

_WEEKDAYS = {
    "de": ("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"),
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
}
_MONTHS = {
    "de": (
        "Januar",
        "Februar",
        "März",
        "April",
        "Mai",
        "Juni",
        "Juli",
        "August",
        "September",
        "Oktober",
        "November",
        "Dezember",
    ),
    "en": (
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ),
}
# German names of the abbreviations the tz database uses in English.
_ZONE_DE = {
    "CET": "MEZ",
    "CEST": "MESZ",
    "WET": "WEZ",
    "WEST": "WESZ",
    "EET": "OEZ",
    "EEST": "OESZ",
}

# What each change says and asks (wording above): its nodes' addresses change, workstations
# act, the password and the CA pin matter.
_ADDRESS_CHANGES = {"enable-tls", "disable-tls"}
_PASSWORD_MATTERS = {"enable-tls", "change-password"}


# --- dates ------------------------------------------------------------------------------------


def day_text(when: dt.datetime, lang: str) -> str:
    """``Samstag, 5. Dezember 2026`` / ``Saturday, 5 December 2026``."""
    weekday = _WEEKDAYS[lang][when.weekday()]
    month = _MONTHS[lang][when.month - 1]
    if lang == "de":
        return f"{weekday}, {when.day}. {month} {when.year}"
    return f"{weekday}, {when.day} {month} {when.year}"


def zone_text(when: dt.datetime, lang: str) -> str:
    """The zone's abbreviation at ``when`` (MEZ/MESZ in German, CET/CEST in English)."""
    name = when.tzname() or "UTC"
    return _ZONE_DE.get(name, name) if lang == "de" else name


def _full_time(when: dt.datetime, lang: str) -> str:
    """``Donnerstag, 10. Dezember 2026, 18:00 Uhr (MEZ)``."""
    if when.tzinfo is None:
        raise ValueError("the notice's times must be aware datetimes")
    w = _WORDS[lang]
    clock = w["time"].format(time=f"{when:%H:%M}")
    return f"{day_text(when, lang)}, " + w["zone"].format(text=clock, zone=zone_text(when, lang))


def when_text(info: NoticeInfo, lang: str) -> str:
    """The "Wann?" sentence."""
    w = _WORDS[lang]
    t = info.timing
    subject = w[f"subject.{info.change}"]
    start, end = t.start, t.end
    if start.tzinfo is None or (end is not None and end.tzinfo is None):
        raise ValueError("the notice's times must be aware datetimes")
    if end is not None and end < start:
        raise ValueError("the notice's end lies before its start")

    def clock(when: dt.datetime) -> str:
        return w["time"].format(time=f"{when:%H:%M}")

    same_zone = end is None or zone_text(start, lang) == zone_text(end, lang)

    def zoned(text: str, when: dt.datetime) -> str:
        return w["zone"].format(text=text, zone=zone_text(when, lang))

    def stamp(when: dt.datetime, with_zone: bool) -> str:
        return zoned(clock(when), when) if with_zone else clock(when)

    def bare(when: dt.datetime, with_zone: bool) -> str:
        """The start of a range within a day: "von 18:00 bis 18:30 Uhr (MEZ)", the unit and
        zone once at the end unless the zone changes in between."""
        return stamp(when, True) if with_zone else f"{when:%H:%M}"

    if t.phase == "running" or end is None:
        key = "running" if t.phase == "running" else f"{t.phase}.open"
        if t.phase == "done":  # done without an end: say when it started
            key = "done.moment"
        return w[key].format(subject=subject, day=day_text(start, lang), start=stamp(start, True))
    minute = dt.timedelta(minutes=1)
    if t.phase == "done" and end - start < minute and start.minute == end.minute:
        return w["done.moment"].format(
            subject=subject, day=day_text(start, lang), start=stamp(start, True)
        )
    if start.date() == end.date():
        return w[f"{t.phase}.range_day"].format(
            subject=subject,
            day=day_text(start, lang),
            start=bare(start, not same_zone),
            end=stamp(end, True),
        )
    return w[f"{t.phase}.range"].format(
        subject=subject,
        start_full=f"{day_text(start, lang)}, {stamp(start, not same_zone)}",
        end_full=f"{day_text(end, lang)}, {stamp(end, True)}",
    )


# --- rendering ----------------------------------------------------------------------------------


def render_notice(
    info: NoticeInfo,
    *,
    lang: str = "de",
    fmt: str = "text",
    password: str | None = None,
) -> str:
    """The message for ``info`` in ``lang`` ("de", "en") and ``fmt`` ("text", "markdown",
    "html"); ValueError for arguments it cannot render."""
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {', '.join(LANGS)}, got {lang!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if info.change not in CHANGES:
        raise ValueError(f"change must be one of {', '.join(CHANGES)}, got {info.change!r}")
    if info.timing.phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {info.timing.phase!r}")
    if password is not None and not password:
        raise ValueError("password, when given, must not be empty")
    if password is not None and info.change not in _PASSWORD_MATTERS:
        raise ValueError(f"a {info.change} notice has no password to give")
    if not info.nodes:
        raise ValueError("the notice needs at least one node")
    w = _WORDS[lang]
    doc = _Doc(fmt)
    change = info.change
    when = "after" if info.timing.phase == "done" else "before"
    moves = change in _ADDRESS_CHANGES
    # rotate-cert to another CA than a node's workstations trust: they need the steps again
    # (NoticeNode.ca_change), each server marked when not all share one kind of change.
    changes = {n.ca_change for n in info.nodes} if change == "rotate-cert" else {""}
    new_ca = changes != {""}
    marked = new_ca and len(changes) > 1
    # A switch of some servers of several (scope local or nodes): the workstations of the
    # others keep their address, and only those that use an old one of these act.
    part = change == "enable-tls" and bool(info.others)
    olds = _either([n.old_url for n in info.nodes], w["or"]) if part else ("", {})

    if password is not None:
        doc.warning(w["warning"])
    doc.title(w[f"title.{change}"], practice=_Text(info.practice))

    doc.heading(w["what_h"])
    if info.transitional and change == "enable-tls":
        until = (
            w["until.when"].format(when=_full_time(info.until, lang))
            if info.until is not None
            else w["until.open"]
        )
        what = w[f"what.enable-tls.transitional.{when}"]
        doc.para(what + " " + w[f"scope.{info.scope}"], until=_Text(until))
        closed = [n.name for n in info.nodes if n.closed is not None]
        if closed:
            many = "many" if len(closed) > 1 else "one"
            doc.para(w[f"closed.{many}"], names=_Text(_listed(closed, w["and"])))
    elif part:
        doc.para(
            w[f"what.enable-tls.part.{when}"].format(old=olds[0]) + " " + w[f"scope.{info.scope}"],
            **olds[1],
        )
    elif new_ca:
        lead = f"what.rotate-cert.newca.{'marked.' if marked else ''}{when}"
        doc.para(w[lead] + " " + w[f"scope.{info.scope}"])
        for kind in ("own", "cluster"):
            if kind in changes:
                doc.para(w[f"newca.{kind}.marked" if marked else f"newca.{kind}"])
    else:
        doc.para(w[f"what.{change}.{when}"] + " " + w[f"scope.{info.scope}"])
    if part:
        many = "many" if len(info.others) > 1 else "one"
        names = [n.name for n in info.others]
        doc.para(w[f"others.{many}"], others=_Text(_listed(names, w["and"])))

    doc.heading(w["when_h"])
    doc.para(when_text(info, lang))
    if info.closing and info.transitional:
        doc.para(w["closing"])
    if info.timing.phase != "done":
        restart = w["restart.many"] if len(info.nodes) > 1 else w["restart.one"]
        if part:
            entries = w[f"entries.{info.timing.phase}.part"] + " " + w["entries.others"]
        else:
            entries = w[f"entries.{info.timing.phase}"]
        doc.para(restart + " " + entries)
    elif info.unchanged:
        many = "many" if len(info.unchanged) > 1 else "one"
        doc.para(w[f"unchanged.{many}"], names=_Text(", ".join(info.unchanged)))

    ports = sorted({n.bootstrap_port for n in info.nodes})
    port_shown = change == "enable-tls"
    doc.heading(w["nodes_h.address" if moves else "nodes_h.same"])
    lines: list[tuple[str, dict[str, _Value]]] = []
    for n in info.nodes:
        if moves:
            both = info.transitional and change == "enable-tls"
            template = w["node.new.transitional" if both else f"node.new.{when}"]
            if both and n.closed is not None:
                template = w["node.new.closed"]
            if port_shown:
                template = w["node.port"].format(line=template, port="{port}")
            values: dict[str, _Value] = {
                "name": _Text(n.name),
                "new": _Code(n.new_url),
                "old": _Code(n.old_url),
                "port": _Text(str(n.bootstrap_port)),
            }
            if n.closed is not None:
                values["when"] = _Text(_full_time(n.closed, lang))
        else:
            template = w["node.same"]
            if marked and n.ca_change:
                template = w[f"node.mark.{n.ca_change}"].format(line=template)
            values = {"name": _Text(n.name), "url": _Code(n.new_url)}
        lines.append((template, values))
    if change == "enable-tls":
        for n in info.already:
            template = w["node.port"].format(line=w["node.already"], port="{port}")
            lines.append(
                (
                    template,
                    {
                        "name": _Text(n.name),
                        "new": _Code(n.new_url),
                        "port": _Text(str(n.bootstrap_port)),
                    },
                )
            )
    if part:
        for n in info.others:
            lines.append((w["node.other"], {"name": _Text(n.name), "url": _Code(n.old_url)}))
    doc.bullets(lines)
    if moves and not all(n.path_known for n in info.nodes):
        doc.para(w["path_unknown"])

    if change != "rotate-cert" or new_ca:
        steps: list[tuple[str, dict[str, _Value]]] = [(w["step_login"], {})]
        # (``part``: the step says which workstations go on, the others stop there.)
        suffix = ".part" if part else ""
        if not all(n.path_known for n in info.nodes):
            steps.append((w["step_menu_path" + suffix], {}))
        elif len(info.nodes) == 1:
            values = {"url": _Code(info.nodes[0].new_url), "old": _Code(info.nodes[0].old_url)}
            steps.append((w["step_menu_one" + suffix], values))
        else:
            steps.append((w["step_menu_many" + suffix if moves else "step_menu_same"], {}))
        steps.append((w["step_test"], {}))
        if change != "disable-tls":
            if len(ports) == 1:
                steps.append((w["step_port_default"], {"port": _Text(str(ports[0]))}))
            else:
                steps.append((w["step_port_custom"], {}))
            steps.append((w["step_password"], {}))
        steps.append((w[f"step_restart.{change}"], {}))
        if change == "change-password":
            doc.heading(w[f"steps_h.{when}"])
            doc.para(w[f"password_steps.{when}"])
            doc.heading(w["steps_h.setup"])
        elif new_ca and changes != {"own"}:
            # Not every workstation: those the paragraphs above name (rev57a L3).
            doc.heading(w["steps_h.setup"])
        else:
            doc.heading(w[f"steps_h.{'part.' if part else ''}{when}"])
        doc.steps(steps)

    if change in _PASSWORD_MATTERS or new_ca:
        doc.heading(w["pin_h"])
        # One command per node (audit s39ws H2: the first node's, copied at a workstation of
        # another node, gave it that node's address and bootstrap port), with the pin of the
        # CA its certificate comes from: a practice's own CA (``--cert-dir``) is not the
        # cluster's, and a workstation pinning the cluster CA refuses that server (session
        # 56's second README walk, H2).
        shown = [*info.nodes, *(info.already if change == "enable-tls" else ())]
        pins = {n.name: n.ca_pin or info.ca_pin for n in shown}
        if len(set(pins.values())) == 1:
            doc.para(w["pin"])
            doc.block(next(iter(pins.values())))
        else:
            doc.para(w["pin_many"])
            doc.bullets(
                [(w["pin_node"], {"name": _Text(n), "pin": _Code(p)}) for n, p in pins.items()]
            )
        commands = [(n.name, _check_command(n, pins[n.name])) for n in shown if n.path_known]
        if len(commands) == 1:
            doc.para(w["pin_cli"], cmd=_Code(commands[0][1]))
        elif commands:
            doc.para(w["pin_cli_many"])
            doc.bullets(
                [(w["pin_cli_node"], {"name": _Text(n), "cmd": _Code(c)}) for n, c in commands]
            )
        doc.para(w["pin_adds"])

        doc.heading(w["password_h"])
        doc.para(w["password_what"])
        if password is None:
            doc.para(w["password_source"], source=_Text(info.password_source))
        else:
            doc.para(w["password_value"], password=_Code(password))
            doc.para(w["password_keep"])

    doc.heading(w["contact_h"])
    doc.para(w["contact"], contact=_Text(info.contact))
    for note in info.extra:
        doc.para("{note}", note=_Text(note))
    return doc.render(lang)


def _listed(names: Sequence[str], word: str) -> str:
    """``names`` as "A, B und C"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"


def _either(urls: Sequence[str], word: str) -> tuple[str, dict[str, _Value]]:
    """A template naming ``urls`` as alternatives ("A, B oder C"), and its values."""
    names = [f"{{old{i}}}" for i in range(len(urls))]
    text = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"
    return text, {f"old{i}": _Code(u) for i, u in enumerate(urls)}


def _check_command(node: NoticeNode, ca_pin: str) -> str:
    """The command-line check and set-up of a workstation of ``node``."""
    port = node.bootstrap_port
    port_opt = "" if port == BOOTSTRAP_PORT else f" --bootstrap-port {port}"
    return f"tlsroll client test-connection {node.new_url} --ca-pin {ca_pin}{port_opt}"


# --- output formats -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    """A value the admin typed: plain words, escaped per format."""

    value: str


@dataclass(frozen=True)
class _Code:
    """An address, a command, a password: shown verbatim (code in Markdown and HTML)."""

    value: str


_Value = _Text | _Code

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")

_HTML = jinja2.Environment(autoescape=True, keep_trailing_newline=True).from_string(
    """<!DOCTYPE html>
<html lang="{{ lang }}">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
</head>
<body style="font-family: Arial, Helvetica, sans-serif; font-size: 15px; line-height: 1.45; \
color: #1a1a1a; max-width: 46em;">
{% for kind, content in blocks -%}
{% if kind == "warning" -%}
<p style="border: 2px solid #b00020; padding: 0.6em; color: #b00020;"><strong>{{ content }}\
</strong></p>
{% elif kind == "title" -%}
<h1 style="font-size: 1.4em;">{{ content }}</h1>
{% elif kind == "heading" -%}
<h2 style="font-size: 1.15em; margin-top: 1.4em;">{{ content }}</h2>
{% elif kind == "para" -%}
<p>{{ content }}</p>
{% elif kind == "bullets" -%}
<ul>
{% for item in content %}<li>{{ item }}</li>
{% endfor %}</ul>
{% elif kind == "steps" -%}
<ol>
{% for item in content %}<li>{{ item }}</li>
{% endfor %}</ol>
{% elif kind == "block" -%}
<pre style="font-size: 0.95em; background: #f2f2f2; padding: 0.5em;">{{ content }}</pre>
{% endif -%}
{% endfor -%}
</body>
</html>
"""
)


class _Doc:
    """Headings, paragraphs and lists, as plain text, Markdown or HTML.

    Templates are ours; values (``_Text``, ``_Code``) are escaped for the format, and in HTML
    the template's own text too (markupsafe's ``Markup.format`` escapes what it fills in)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.parts: list[tuple[str, object]] = []
        self.title_text = ""

    def _value(self, v: _Value) -> object:
        if isinstance(v, _Text):
            text = " ".join(v.value.split())
            if self.fmt == "markdown":
                return _MD_SPECIAL.sub(r"\\\1", text)
            return text  # html: escaped by Markup.format
        if self.fmt == "markdown":
            longest = max((len(m) for m in re.findall(r"`+", v.value)), default=0)
            fence = "`" * (longest + 1)
            pad = " " if v.value.startswith("`") or v.value.endswith("`") else ""
            return f"{fence}{pad}{v.value}{pad}{fence}"
        if self.fmt == "html":
            return Markup("<code>{}</code>").format(v.value)
        return v.value

    def fill(self, template: str, values: dict[str, _Value]) -> object:
        filled = {k: self._value(v) for k, v in values.items()}
        if self.fmt == "html":
            return escape(template).format(**filled)
        return template.format(**filled)

    def warning(self, line: str) -> None:
        self.parts.append(("warning", self.fill(line, {})))

    def title(self, template: str, **values: _Value) -> None:
        self.title_text = template.format(**{k: v.value for k, v in values.items()})
        self.parts.append(("title", self.fill(template, values)))

    def heading(self, line: str) -> None:
        self.parts.append(("heading", self.fill(line, {})))

    def para(self, template: str, **values: _Value) -> None:
        self.parts.append(("para", self.fill(template, values)))

    def bullets(self, items: Sequence[tuple[str, dict[str, _Value]]]) -> None:
        self.parts.append(("bullets", [self.fill(t, v) for t, v in items]))

    def steps(self, items: Sequence[tuple[str, dict[str, _Value]]]) -> None:
        self.parts.append(("steps", [self.fill(t, v) for t, v in items]))

    def block(self, value: str) -> None:
        self.parts.append(("block", value))

    def render(self, lang: str) -> str:
        if self.fmt == "html":
            return _HTML.render(lang=lang, title=self.title_text, blocks=self.parts)
        return "\n\n".join(self._plain(kind, content) for kind, content in self.parts) + "\n"

    def _plain(self, kind: str, content: object) -> str:
        md = self.fmt == "markdown"
        if kind == "warning":
            return f"**{content}**" if md else str(content)
        if kind == "title":
            line = str(content)
            return f"# {line}" if md else f"{line}\n{'=' * len(line)}"
        if kind == "heading":
            line = str(content)
            return f"## {line}" if md else f"{line}\n{'-' * len(line)}"
        if kind == "bullets":
            assert isinstance(content, list)
            return "\n".join(f"- {i}" for i in content)
        if kind == "steps":
            assert isinstance(content, list)
            return "\n".join(f"{n}. {i}" for n, i in enumerate(content, 1))
        if kind == "block":
            return f"```\n{content}\n```" if md else f"    {content}"
        return str(content)
