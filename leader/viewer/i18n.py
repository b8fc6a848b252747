"""The web viewer's words in German (the default) and English, and how it writes times.

``Words.of(lang)`` gives the page its texts (``w("title")``), the words for the states and
changes of the schema (``w.state("needs_attention")``) and the formats of times and
durations. A test checks that both languages have every key and every state.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from leader.rollout_core import NodeState, RolloutState
from leader.skew import signed_seconds
from tlsroll.enums import Change

LANGS = ("de", "en")
DEFAULT_LANG = "de"

_DE: dict[str, str] = {
    "title": "Update-Schema",
    "subtitle": "Umstellung auf https – Leader {address}",
    "signed_in": "Angemeldet als {name} (nur lesen, bis {until})",
    "nobody": "ohne Namen",
    "lang_switch": "English",
    "lang_switch_label": "Sprache",
    "live_on": "Live",
    "live_off": "Verbindung unterbrochen – versuche erneut …",
    "live_label": "Live-Aktualisierung",
    "updated": "Stand",
    "read_only": "Nur lesen: nichts auf dieser Seite ändert den Multiserver.",
    "print_title": "Aufzeichnung der Umstellung",
    "printed": "Gedruckt",
    "no_rollouts": "Noch keine Umstellung. Sobald eine beginnt, erscheint sie hier von selbst.",
    "rollout": "Umstellung",
    "rollouts": "Alle Umstellungen (neueste zuerst)",
    "selected": "ausgewählt",
    "change": "Änderung",
    "state": "Zustand",
    "scope": "Umfang",
    "scope_cluster": "gesamter Multiserver",
    "scope_local": "nur der Leader-Knoten",
    "scope_nodes": "Knoten: {nodes}",
    "freeze_mode": "Schreibsperre",
    "freeze_node": "je Knoten nur während seiner Umstellung",
    "freeze_scope": "alle Knoten während der gesamten Umstellung",
    "started_by": "Gestartet von",
    "created": "Angelegt",
    "started": "Begonnen",
    "ended": "Beendet",
    "reason": "Grund",
    "undoes": "Nimmt zurück",
    "nodes": "Knoten",
    "node": "Knoten",
    "old_url": "Adresse bisher",
    "new_url": "Adresse neu",
    "freeze": "Schreibsperre",
    "clock_node": "Uhr des Knotens",
    "clock_leader": "Uhr des Leaders",
    "restart": "Neustart",
    "cert_expiry": "Zertifikat gültig bis",
    "leader_node": "Leader",
    # needs_attention: a way back that failed, or an agent cut off during its switch (s50)
    "attention": "Braucht Aufmerksamkeit: {nodes}. Der Knoten ist in keinem bekannten Zustand "
    "(sein Rückweg ist fehlgeschlagen oder sein Agent wurde während der Umstellung gesperrt); "
    "was zu tun ist, steht bei jedem Knoten. Bitte die Praxis-IT verständigen.",
    # a way back (disable-tls) that left nodes as is (``RolloutView.left_as_is``): beside its
    # state, and above (each node's reason, in English, says what to do)
    "left_as_is_one": "{count} Knoten unverändert gelassen: {nodes}",
    "left_as_is_many": "{count} Knoten unverändert gelassen: {nodes}",
    # a finalize that left nodes out, their agents cut off (``RolloutView.left_out``): beside
    # its state (each node's reason, in English, says what to do)
    "left_out_one": "{count} Knoten ausgelassen: {nodes}",
    "left_out_many": "{count} Knoten ausgelassen: {nodes}",
    # a retry or way back that left out nodes removed since (``RolloutView.removed_since``)
    "removed_since_one": "{count} Knoten ausgelassen, seither entfernt: {nodes}",
    "removed_since_many": "{count} Knoten ausgelassen, seither entfernt: {nodes}",
    "left_as_is_alert": "Der Rückweg ist nicht vollständig. Unverändert gelassen und seither "
    "nicht auf http gesehen: {nodes}. Was zu tun ist, steht beim Knoten unter „Grund“. Bitte "
    "die Praxis-IT verständigen.",
    # (SQLite's words for the trouble follow it, in English: as for ``node_problem``)
    "store_trouble": "Der Leader kann seit {since} nicht in seinen Speicher schreiben; keine "
    "Umstellung kommt weiter, bis er es wieder kann. Bitte die Praxis-IT verständigen (Platz "
    "auf der Festplatte des Leaders schaffen). Der Leader beschreibt es auf Englisch:",
    # (its writes still commit, its checkpoint fails: ``StoreHealth.writes_work``)
    "store_checkpoint_trouble": "Der Leader kann seinen Speicher seit {since} nicht mehr "
    "wachsen lassen; Umstellungen gehen vorerst weiter, bis seine Schreibvorgänge scheitern. "
    "Bitte die Praxis-IT verständigen (Platz auf der Festplatte des Leaders schaffen). Der "
    "Leader beschreibt es auf Englisch:",
    "needs_admin": "Knoten {node} braucht die Praxis-IT: ein früherer Stand seines Journals "
    "wurde zurückgespielt, und was sein Server ausführt, zeigt nicht, wie eine Umstellung "
    "ausgegangen ist; er wird nicht umgestellt, bis die Praxis-IT ihn geprüft hat, und sein "
    "Server lässt bis dahin vielleicht nichts speichern. Bitte die Praxis-IT verständigen.",
    # (the leader's own words for a problem this page has none for follow it: in English)
    "node_problem": "Knoten {node} hat ein Problem, das diese Seite nicht näher kennt. Bitte "
    "die Praxis-IT verständigen. Der Leader beschreibt es auf Englisch:",
    "bootstrap_down": "Der Dienst zum Einrichten von Arbeitsplätzen auf Knoten {node} ist "
    "nicht gestartet: Arbeitsplätze können dort nicht eingerichtet werden. Bitte die "
    "Praxis-IT verständigen.",
    "agent_store": "Der Agent von Knoten {node} kann nicht mehr sicher in seinen Speicher "
    "schreiben; der Knoten wird nicht umgestellt, bis wieder Platz ist. Bitte die Praxis-IT "
    "verständigen (Platz auf der Festplatte des Knotens schaffen). Der Agent beschreibt es auf "
    "Englisch:",
    "bootstrap_previous": "Der Dienst zum Einrichten von Arbeitsplätzen auf Knoten {node} "
    "arbeitet noch mit seinen bisherigen Einstellungen: der Agent kann sein Journal nicht "
    "lesen, ein neues Passwort oder eine Rücknahme gilt dort noch nicht. Bitte die Praxis-IT "
    "verständigen (die Festplatte des Knotens prüfen).",
    "twin_agents": "Zwei Agenten verwenden die Identität von Knoten {node} (ein geklonter "
    "Rechner oder ein zweiter Agent): er wird nicht umgestellt, bis einer von ihnen gestoppt ist. "
    "Bitte die Praxis-IT verständigen.",
    "earlier_certificate": "Ein Agent meldet sich mit einem früheren, durch eine Erneuerung "
    "ersetzten Zertifikat von Knoten {node} und wird abgewiesen: eine Kopie seines Schlüssels "
    "ist womöglich in fremden Händen. Der Knoten wird weder geplant noch umgestellt. Bitte die "
    "Praxis-IT verständigen (Knoten entfernen und neu aufnehmen).",
    "clock_offset": "Die Uhr von Knoten {node} weicht um {seconds} s von der des Leaders ab; "
    "Zertifikate und Umstellungen hängen von ihr ab. Bitte die Praxis-IT verständigen "
    "(Zeitabgleich, NTP).",
    "clock_offset_leader": "Die Uhr von Knoten {node} weicht um {seconds} s von der des Leaders "
    "ab, wie die der meisten Knoten: vermutlich geht die Uhr des Leaders falsch. Bitte "
    "die Praxis-IT verständigen (zuerst den Zeitabgleich des Leaders prüfen, NTP).",
    "timeline": "Verlauf",
    "timeline_rollout": "Umstellung insgesamt",
    "transition": "{old} → {new}",
    "no_transitions": "noch keine Übergänge",
    "passwords": "Passwortänderungen",
    "password_behind": "Passwort-Version {version} (hinterlegt von {who}, {when}) ist nicht auf "
    "allen Knoten wirksam. Noch auf einer älteren:",
    "password_behind_node": "{node}: Version {live}",
    "password_behind_then": "Ein dort eingerichteter Arbeitsplatz braucht das Passwort, das "
    "der Knoten hat. Damit alle das neueste bekommen:",
    "password_pending": (
        "neues Passwort hinterlegt – wirksam mit `tlsroll rollout start --change "
        "change-password` (startet den Server neu)"
    ),
    "awaiting_report": (
        "wartet auf den ersten Client-Bericht seit dem Start des Leaders (Sekunden, sobald "
        "sein Agent verbunden ist; sonst prüfen: tlsroll nodes, auf dem Knoten systemctl "
        "status tlsroll-agent)"
    ),
    "waits_until_quiet": (
        "wartet, bis dort {seconds} s lang kein Arbeitsplatz mehr über http gesehen wurde "
        "(--when-quiet)"
    ),
    "now_serves": "liefert jetzt {scheme} (seitdem geändert)",
    "offline": "Knoten offline",
    "all_online": "Alle {count} Knoten melden sich regelmäßig.",
    "no_nodes": "Noch kein Knoten angemeldet.",
    "addresses": "Adressen",
    "last_heartbeat": "Letztes Lebenszeichen",
    "never": "nie",
    "failures": "Fehlgeschlagene Anmeldungen von Arbeitsplätzen",
    "failures_none": "Keine falschen Passwörter an Port 9443 in den letzten 30 Tagen.",
    "failures_hint": "Falsche Passwörter beim Einrichten eines Arbeitsplatzes (Port 9443). "
    "Viele Versuche von einer Adresse können ein Rateversuch sein. „over the hourly cap“: "
    "Arbeitsplätze, die dort kein Zertifikat bekamen, weil die Stunde voll war "
    "(workstation_certs_per_hour in leader.toml).",
    "failure_source": "Von Adresse",
    "failure_workstation": "Arbeitsplatz",
    "failure_count": "Anzahl",
    "failure_last": "Zuletzt",
    "login_failures": "Falsche Client-Passwörter an den Servern",
    "login_failures_hint": "Falsche Passwörter an der Anmeldung des Servers selbst (das "
    "Client-Passwort), vom Server gezählt, über seine Neustarts und neue Passwörter hinweg: "
    "wenige sind Tippfehler; viele, oder immer mehr (siehe die letzte), können ein Rateversuch "
    "sein (der Server bremst ihn, je Adresse und insgesamt).",
    "login_failures_count": "{count} falsche Client-Passwörter bisher",
    "login_failures_one": "1 falsches Client-Passwort bisher",
    "certs": "Zertifikate, die bald ablaufen",
    "certs_none": "Kein Zertifikat läuft bald ab (bei Server- und Arbeitsplatz-Zertifikaten "
    "warnt der Leader {days} Tage vor dem Ende, bei der CA ein Jahr).",
    "cert_chain": "zuerst endet {chain} in seiner Kette",
    "cert_kind": "Art",
    "cert_subject": "Für",
    "cert_days": "Tage übrig",
    "expired": "abgelaufen",
    # A served certificate the admin revoked: replace it now (`tlsroll ca revoke`'s warning).
    "cert_revoked": "widerrufen, noch im Einsatz: mit rotate-cert ersetzen",
    "cert_ca": "Zertifizierungsstelle (CA)",
    "cert_leader": "Leader (Steuerung)",
    "cert_viewer": "diese Webansicht",
    "cert_agent": "Agent eines Knotens",
    "cert_server": "Server (https, 8443)",
    "cert_workstation": "Arbeitsplatz (Client-Zertifikat)",
    "none": "–",
    "still_on_http": "Noch auf http",
    "still_on_http_hint": "Diese Arbeitsplätze nutzen laut den Client-Berichten der Knoten noch "
    "http: sie brauchen noch die Client-Schritte (auf https umstellen), bevor http abgeschaltet "
    "wird.",
    "still_on_http_none": "Laut den Client-Berichten der Knoten nutzt kein Arbeitsplatz mehr http.",
    "on_http_count": "{count} noch auf http",
    "client_address": "Adresse",
    "last_seen": "Zuletzt gesehen",
    "still_on_http_more": "… und {count} weitere (die zuletzt gesehenen oben); alle zeigt",
    "other_nodes": "Weitere Knoten",
    "other_nodes_hint": "Angemeldete Knoten außerhalb des gewählten Rollouts (später angemeldet "
    "oder nicht in seinem Umfang), mit dem, was ihr Server laut ihrem letzten Lebenszeichen "
    "bedient.",
    "other_nodes_none": "Jeder angemeldete Knoten ist im gewählten Rollout.",
    "mixed_cluster": "Gemischter Multiserver: {nodes} noch auf http, die anderen Knoten auf "
    "https; deren Arbeitsplätze brauchen die neue Adresse erst, wenn auch sie umgestellt sind. "
    "Den Rest umstellen (am Leader):",
    "mixed_more": "{nodes} und {count} weitere",
    "mixed_cluster_scope": "(ein Rollout des ganzen Multiservers lässt die Knoten auf https, "
    "wie sie sind)",
    "mixed_cluster_unknown": "Knoten, deren Server jetzt nicht bekannt ist, sind darin auch: "
    "warten, bis ihre Agenten sich melden, oder sie mit --nodes auslassen.",
    "mixed_cluster_next": "dann die nächsten {count} ebenso, und so weiter (kein Rollout des "
    "ganzen Multiservers: er ließe nicht jeden Knoten auf https, wie er ist).",
    "mixed_cluster_dual": "Auf http und https, wie Phase 1 eines Rollouts mit Übergang einen "
    "Knoten lässt: {nodes}. Ein Rollout des ganzen Multiservers wird ihretwegen abgelehnt; "
    "http dort schließen mit tlsroll rollout finalize oder tlsroll rollout retry des "
    "Rollouts, der sie so ließ.",
    "mixed_cluster_dual_one": "Auf http und https, wie Phase 1 eines Rollouts mit Übergang einen "
    "Knoten lässt: {nodes}. Ein Rollout des ganzen Multiservers wird ihretwegen abgelehnt; "
    "http dort schließen mit tlsroll rollout finalize {rollout} oder tlsroll rollout retry "
    "{rollout} (der Rollout, der sie so ließ).",
    "mixed_cluster_dual_each": "Die Rollouts, die sie so ließen: {rollouts}.",
    "mixed_cluster_other": "Auf https mit einem Zertifikat, das nicht von der CA dieses "
    "Multiservers ist: {nodes}. Ein Rollout des ganzen Multiservers würde es ersetzen; die "
    "Befehle oben lassen sie aus.",
    "server_now": "Server (laut Lebenszeichen)",
    "server_unknown": "unbekannt (kein Lebenszeichen seit dem Start des Leaders)",
    "last_rollout": "Letzter Rollout",
    "offline_mark": "offline",
    "seconds": "{value} s",
    "window": "{start}–{end} ({seconds})",
    "window_open": "seit {start}",
    "denied_title": "Kein Zugang",
    "denied_intro": "Diese Seite zeigt das Update-Schema nur mit einer gültigen Lesefreigabe.",
    "denied_none": "Sie sind nicht angemeldet.",
    "denied_session": "Ihre Sitzung ist abgelaufen oder wurde widerrufen.",
    "denied_unknown": "Dieser Anmelde-Link ist unbekannt.",
    "denied_used": "Dieser Anmelde-Link wurde bereits verwendet (er gilt nur einmal).",
    "denied_used_signed_in": "Hat er diesen Browser angemeldet, geht es hier weiter:",
    "to_schema": "Zum Schema",
    "denied_expired": "Dieser Anmelde-Link ist abgelaufen.",
    "denied_revoked": "Dieser Anmelde-Link wurde widerrufen.",
    "denied_signed_in": "Dieser Browser ist schon angemeldet (mit einem anderen Anmelde-Link). "
    "Melden Sie sich zuerst auf der Schema-Seite ab („Abmelden“) und öffnen Sie dann diesen "
    "Link erneut; er bleibt bis dahin unbenutzt.",
    "denied_signed_out": "Sie haben sich abgemeldet (mit „Abmelden“): Diese Sitzung ist "
    "beendet, und ihr Anmelde-Link galt nur einmal.",
    "denied_cross_site": "Eine andere Website hat hierher verlinkt; so meldet der Viewer "
    "niemanden an (der Link bleibt unbenutzt). Öffnen Sie den Anmelde-Link, den Sie bekommen "
    "haben, selbst (z. B. in die Adressleiste einfügen).",
    "denied_how": "So bekommen Sie Zugang: Bitten Sie die Praxis-IT um einen neuen Anmelde-Link. "
    "Sie erstellt ihn am Leader-Knoten mit",
    "denied_how_after": "und gibt Ihnen den Link; er gilt einmal und für eine begrenzte Zeit.",
    "login_title": "Anmelden",
    "login_intro": "Dieser Link gibt Ihnen Lesezugriff auf das Update-Schema. Er gilt nur "
    "einmal: Mit „Anmelden“ wird er für diesen Browser verbraucht.",
    "login_button": "Anmelden",
    "sign_out": "Abmelden",
    "signed_out_title": "Abgemeldet",
    "signed_out_intro": "Sie haben den Viewer verlassen: Ihre Sitzung ist beendet, in diesem "
    "Browser und für jeden, der ihr Cookie kopiert hätte.",
    "signed_out_how": "Zurück geht es nur mit einem neuen Anmelde-Link (Ihr bisheriger galt "
    "einmal und ist verbraucht): Bitten Sie die Praxis-IT darum. Sie erstellt ihn am "
    "Leader-Knoten mit",
    "date": "%d.%m.%Y %H:%M:%S %Z",
    "date_minute": "%d.%m.%Y %H:%M %Z",
    "time": "%H:%M:%S",
}

_EN: dict[str, str] = {
    "title": "Update schema",
    "subtitle": "Switch to https – leader {address}",
    "signed_in": "Signed in as {name} (read-only, until {until})",
    "nobody": "no name",
    "lang_switch": "Deutsch",
    "lang_switch_label": "Language",
    "live_on": "Live",
    "live_off": "Connection lost – retrying …",
    "live_label": "Live updates",
    "updated": "Updated",
    "read_only": "Read-only: nothing on this page changes the multiserver.",
    "print_title": "Record of the switch",
    "printed": "Printed",
    "no_rollouts": "No rollout yet. As soon as one starts, it appears here by itself.",
    "rollout": "Rollout",
    "rollouts": "All rollouts (newest first)",
    "selected": "selected",
    "change": "Change",
    "state": "State",
    "scope": "Scope",
    "scope_cluster": "the whole multiserver",
    "scope_local": "the leader node only",
    "scope_nodes": "nodes: {nodes}",
    "freeze_mode": "Write freeze",
    "freeze_node": "each node only during its own switch",
    "freeze_scope": "every node for the whole rollout",
    "started_by": "Started by",
    "created": "Created",
    "started": "Started",
    "ended": "Ended",
    "reason": "Reason",
    "undoes": "Takes back",
    "nodes": "Nodes",
    "node": "Node",
    "old_url": "Old address",
    "new_url": "New address",
    "freeze": "Write freeze",
    "clock_node": "node's clock",
    "clock_leader": "leader's clock",
    "restart": "Restart",
    "cert_expiry": "Certificate valid until",
    "leader_node": "leader",
    "attention": "Needs attention: {nodes}. The node is in no known state (its way back "
    "failed, or its agent was cut off during its switch); each node's reason says what to do. "
    "Please call the practice IT.",
    "left_as_is_one": "{count} node left as is: {nodes}",
    "left_as_is_many": "{count} nodes left as is: {nodes}",
    "left_out_one": "{count} node left out: {nodes}",
    "left_out_many": "{count} nodes left out: {nodes}",
    "removed_since_one": "{count} node left out, removed since: {nodes}",
    "removed_since_many": "{count} nodes left out, removed since: {nodes}",
    "left_as_is_alert": "The way back is not complete. Left as is and not seen on http since: "
    "{nodes}. What to do is in the node's reason below. Please call the practice IT.",
    "store_trouble": "The leader cannot write its store since {since}; no rollout moves "
    "until it can. Please call the practice IT (free space on the leader's disk). The leader "
    "says:",
    "store_checkpoint_trouble": "The leader's store cannot grow since {since}; rollouts go on "
    "for now, until its writes fail. Please call the practice IT (free space on the leader's "
    "disk). The leader says:",
    "needs_admin": "Node {node} needs the practice IT: an earlier copy of its journal was "
    "put back, and what its server runs does not show how a switch ended; it is not switched "
    "until the practice IT has checked it, and its server may refuse to save until then. "
    "Please call the practice IT.",
    "node_problem": "Node {node} has a problem this page knows no more about. Please call "
    "the practice IT. The leader describes it:",
    "bootstrap_down": "The service that sets up workstations on node {node} did not start: "
    "workstations cannot be set up there. Please call the practice IT.",
    "agent_store": "The agent of node {node} cannot write its store safely; the node is not "
    "switched until there is room. Please call the practice IT (free space on the node's "
    "disk). The agent says:",
    "bootstrap_previous": "The service that sets up workstations on node {node} still serves "
    "its previous settings: its agent cannot read its journal, and a new password or a "
    "rollback is not in effect there. Please call the practice IT (check the node's disk).",
    "twin_agents": "Two agents use node {node}'s identity (a cloned machine or a second "
    "agent): it is not switched until one of them is stopped. Please call the practice IT.",
    "earlier_certificate": "An agent calls with an earlier certificate of node {node}, one a "
    "renewal replaced, and is refused: a copy of its key may be in other hands. The node is "
    "neither planned nor switched. Please call the practice IT (remove the node and enrol it "
    "again).",
    "clock_offset": "The clock of node {node} differs from the leader's by {seconds} s; "
    "certificates and switches depend on it. Please call the practice IT (time "
    "synchronisation, NTP).",
    "clock_offset_leader": "The clock of node {node} differs from the leader's by {seconds} s, "
    "as most nodes' do: likelier the leader's clock is off. Please call the practice IT (the "
    "leader's time synchronisation first, NTP).",
    "timeline": "Timeline",
    "timeline_rollout": "The rollout as a whole",
    "transition": "{old} → {new}",
    "no_transitions": "no transitions yet",
    "passwords": "Password changes",
    "password_behind": "Password version {version} (staged by {who}, {when}) is not live on "
    "every node. Still on an older one:",
    "password_behind_node": "{node}: version {live}",
    "password_behind_then": "A workstation set up there needs the password its node runs. "
    "To give them the newest:",
    "password_pending": (
        "new password staged – takes effect with `tlsroll rollout start --change "
        "change-password` (which restarts the server)"
    ),
    "awaiting_report": (
        "waiting for its first client report since the leader started (seconds once its "
        "agent is connected; else check: tlsroll nodes, on the node systemctl status "
        "tlsroll-agent)"
    ),
    "waits_until_quiet": (
        "waits until no workstation was seen on http there for {seconds}s (--when-quiet)"
    ),
    "now_serves": "now serves {scheme} (changed since)",
    "offline": "Nodes offline",
    "all_online": "All {count} nodes report in regularly.",
    "no_nodes": "No node enrolled yet.",
    "addresses": "Addresses",
    "last_heartbeat": "Last heartbeat",
    "never": "never",
    "failures": "Failed workstation sign-ins",
    "failures_none": "No wrong passwords on port 9443 in the last 30 days.",
    "failures_hint": "Wrong passwords while setting up a workstation (port 9443). Many from "
    'one address may be someone guessing. "over the hourly cap": workstations refused a '
    "certificate there, the node's hour full (workstation_certs_per_hour in leader.toml).",
    "failure_source": "From address",
    "failure_workstation": "Workstation",
    "failure_count": "Count",
    "login_failures": "Wrong client passwords at the servers",
    "login_failures_hint": "Wrong passwords at the server's own login (the client password), "
    "counted by the server across its restarts and new passwords: a few are typing errors; "
    "many, or more and more (see the latest), may be someone guessing it (the server slows "
    "guessers down, per address and in all).",
    "login_failures_count": "{count} wrong client passwords so far",
    "login_failures_one": "1 wrong client password so far",
    "failure_last": "Last",
    "certs": "Certificates near expiry",
    "certs_none": "No certificate is near its end (the leader warns {days} days ahead of a "
    "server or workstation certificate's end, a year ahead of the CA's).",
    "cert_chain": "its chain's {chain} ends first",
    "cert_kind": "Kind",
    "cert_subject": "For",
    "cert_days": "Days left",
    "expired": "expired",
    "cert_revoked": "revoked, still served: replace it with rotate-cert",
    "cert_ca": "certificate authority (CA)",
    "cert_leader": "leader (control)",
    "cert_viewer": "this web viewer",
    "cert_agent": "a node's agent",
    "cert_server": "server (https, 8443)",
    "cert_workstation": "workstation (client certificate)",
    "none": "–",
    "still_on_http": "Still on http",
    "still_on_http_hint": "By the nodes' client reports these workstations still use http: "
    "they still need the client steps (switch them to https) before http is closed.",
    "still_on_http_none": "By the nodes' client reports no workstation uses http any more.",
    "on_http_count": "{count} still on http",
    "client_address": "Address",
    "last_seen": "Last seen",
    "still_on_http_more": "… and {count} more (the most recently seen are above); all of them:",
    "other_nodes": "Other nodes",
    "other_nodes_hint": "Enrolled nodes outside the selected rollout (enrolled later, or not "
    "in its scope), with what their server serves by their latest heartbeat.",
    "other_nodes_none": "Every enrolled node is in the selected rollout.",
    "mixed_cluster": "A mixed cluster: {nodes} on http, the other nodes on https; their "
    "workstations need the new address only once they are switched too. To switch the rest "
    "(on the leader):",
    "mixed_more": "{nodes} and {count} more",
    "mixed_cluster_scope": "(a cluster rollout leaves the nodes on https already alone)",
    "mixed_cluster_unknown": "Nodes whose server is not known now are in it too: wait until "
    "their agents are heard, or leave them out with --nodes.",
    "mixed_cluster_next": "then the next {count} of them the same way, and so on (not a "
    "cluster rollout: it would not leave every node on https alone).",
    "mixed_cluster_dual": "On http and https, as a transitional rollout's phase 1 leaves a "
    "node: {nodes}. A cluster rollout is refused for them; close http there with tlsroll "
    "rollout finalize, or tlsroll rollout retry, of the rollout that left them so.",
    "mixed_cluster_dual_one": "On http and https, as a transitional rollout's phase 1 leaves a "
    "node: {nodes}. A cluster rollout is refused for them; close http there with tlsroll "
    "rollout finalize {rollout}, or tlsroll rollout retry {rollout} (the rollout that left "
    "them so).",
    "mixed_cluster_dual_each": "The rollouts that left them so: {rollouts}.",
    "mixed_cluster_other": "On https with a certificate not of this cluster's CA: {nodes}. A "
    "cluster rollout would replace it; the commands above leave them out.",
    "server_now": "Server (by heartbeat)",
    "server_unknown": "unknown (no heartbeat since the leader started)",
    "last_rollout": "Last rollout",
    "offline_mark": "offline",
    "seconds": "{value} s",
    "window": "{start}–{end} ({seconds})",
    "window_open": "since {start}",
    "denied_title": "No access",
    "denied_intro": "This page shows the update schema only with a valid read-only grant.",
    "denied_none": "You are not signed in.",
    "denied_session": "Your session has expired or was revoked.",
    "denied_unknown": "This login link is unknown.",
    "denied_used": "This login link has already been used (it works once).",
    "denied_used_signed_in": "If it signed this browser in, go on here:",
    "to_schema": "To the schema",
    "denied_expired": "This login link has expired.",
    "denied_revoked": "This login link was revoked.",
    "denied_signed_in": "This browser is already signed in (by another login link). Sign out "
    "on the schema page first (“Sign out”), then open this link again; it stays unused until "
    "then.",
    "denied_signed_out": "You signed out (with “Sign out”): this session has ended, and its "
    "login link worked once.",
    "denied_cross_site": "Another website linked here; the viewer signs nobody in that way "
    "(the link stays unused). Open the login link you were given yourself (paste it into the "
    "address bar, for example).",
    "denied_how": "How to get access: ask the practice IT for a new login link. They make it on "
    "the leader node with",
    "denied_how_after": "and give you the link; it works once and for a limited time.",
    "login_title": "Sign in",
    "login_intro": "This link gives you read access to the update schema. It works once: "
    "“Sign in” uses it up for this browser.",
    "login_button": "Sign in",
    "sign_out": "Sign out",
    "signed_out_title": "Signed out",
    "signed_out_intro": "You have left the viewer: your session has ended, in this browser and "
    "for anyone who might have copied its cookie.",
    "signed_out_how": "To come back you need a new login link (your previous one worked once "
    "and is spent): ask the practice IT for one. They make it on the leader node with",
    "date": "%Y-%m-%d %H:%M:%S %Z",
    "date_minute": "%Y-%m-%d %H:%M %Z",
    "time": "%H:%M:%S",
}

_STATES_DE: dict[str, str] = {
    NodeState.PENDING: "wartet",
    NodeState.PREFLIGHT: "Vorprüfung",
    NodeState.STAGING: "bereitet vor",
    NodeState.STAGED: "vorbereitet",
    NodeState.SWITCHING: "stellt um",
    NodeState.CONFIRMING: "prüft von außen",
    NodeState.DONE: "fertig",
    NodeState.FAILED: "fehlgeschlagen",
    NodeState.ROLLED_BACK: "zurückgerollt",
    NodeState.SKIPPED: "übersprungen",
    NodeState.NEEDS_ATTENTION: "braucht Aufmerksamkeit",
    NodeState.DUAL: "http und https",
    RolloutState.PLANNED: "geplant",
    RolloutState.RUNNING: "läuft",
    RolloutState.PAUSED: "angehalten",
    RolloutState.ABORTING: "wird abgebrochen",
    RolloutState.HALTING: "stoppt nach Fehler",
    RolloutState.COMPLETED: "abgeschlossen",
    RolloutState.HALTED: "nach Fehler gestoppt",
    RolloutState.ABORTED: "abgebrochen",
    RolloutState.AWAITING_FINALIZE: "wartet auf Abschluss (http schließen)",
}
_STATES_EN: dict[str, str] = {
    NodeState.PENDING: "pending",
    NodeState.PREFLIGHT: "preflight",
    NodeState.STAGING: "staging",
    NodeState.STAGED: "staged",
    NodeState.SWITCHING: "switching",
    NodeState.CONFIRMING: "confirming",
    NodeState.DONE: "done",
    NodeState.FAILED: "failed",
    NodeState.ROLLED_BACK: "rolled back",
    NodeState.SKIPPED: "skipped",
    NodeState.NEEDS_ATTENTION: "needs attention",
    NodeState.DUAL: "http and https",
    RolloutState.PLANNED: "planned",
    RolloutState.RUNNING: "running",
    RolloutState.PAUSED: "paused",
    RolloutState.ABORTING: "aborting",
    RolloutState.HALTING: "halting",
    RolloutState.COMPLETED: "completed",
    RolloutState.HALTED: "halted",
    RolloutState.ABORTED: "aborted",
    RolloutState.AWAITING_FINALIZE: "awaiting finalize (close http)",
}
_CHANGES_DE: dict[str, str] = {
    Change.ENABLE_TLS: "auf https umstellen",
    Change.CHANGE_PASSWORD: "Passwort ändern",
    Change.ROTATE_CERT: "Zertifikate erneuern",
    Change.DISABLE_TLS: "zurück auf http",
    Change.FINALIZE: "http schließen",
}
_CHANGES_EN: dict[str, str] = {
    Change.ENABLE_TLS: "switch to https",
    Change.CHANGE_PASSWORD: "change password",
    Change.ROTATE_CERT: "renew certificates",
    Change.DISABLE_TLS: "back to http",
    Change.FINALIZE: "close http",
}

TEXTS = {"de": _DE, "en": _EN}
STATES = {"de": _STATES_DE, "en": _STATES_EN}
CHANGES = {"de": _CHANGES_DE, "en": _CHANGES_EN}


def pick_lang(query: str | None, cookie: str | None) -> str:
    """The language: ``?lang=`` first, then the cookie, else German."""
    for choice in (query, cookie):
        if choice in LANGS:
            return choice
    return DEFAULT_LANG


def _local(value: dt.datetime | str | None) -> dt.datetime | None:
    """``value`` (a time or its ISO text) in the leader's local zone; None for none, for text
    that is no time, and for a time the local calendar cannot hold (9999-12-31T23:59:59Z east
    of UTC, year 1 west of it: ``astimezone`` raises OverflowError; a page with a node's
    far-future report answered 500: review of s49carry, M)."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
        return when.astimezone()
    except (OverflowError, ValueError):
        return None


@dataclass(frozen=True)
class Words:
    lang: str

    @classmethod
    def of(cls, lang: str) -> Words:
        return cls(lang if lang in LANGS else DEFAULT_LANG)

    def __call__(self, key: str, **values: object) -> str:
        text = TEXTS[self.lang][key]
        return text.format(**values) if values else text

    def state(self, value: str) -> str:
        """A node's or rollout's state in words (the value itself if unknown)."""
        return STATES[self.lang].get(value, value)

    def change(self, value: str) -> str:
        return CHANGES[self.lang].get(value, value)

    def when(self, value: dt.datetime | str | None) -> str:
        """A time in the leader's local zone, as people in this language write it; "none" for
        none, and for one that has no local time (``_local``)."""
        when = _local(value)
        return when.strftime(self("date")) if when else self("none")

    def minute(self, value: dt.datetime | str | None) -> str:
        """``when`` to the minute (cut, not rounded: never a minute later than it was): who
        is still on http, whose times the page redraws at most once a minute
        (``pages._section_shows``)."""
        when = _local(value)
        return when.strftime(self("date_minute")) if when else self("none")

    def number(self, value: float | str, digits: int = 1) -> str:
        """``value`` in this language's digits; one that is not a finite number (JSON gives
        inf and NaN as the strings "Infinity" and "NaN") is "none", never an error."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            return self("none")
        if not math.isfinite(number):
            return self("none")
        text = f"{number:.{digits}f}"
        return text.replace(".", ",") if self.lang == "de" else text

    def offset(self, value: float) -> str:
        """A clock offset with its sign, to the nearest tenth
        (``leader.skew.signed_seconds``: never shown within a limit it is beyond)."""
        text = signed_seconds(value)
        return text.replace(".", ",") if self.lang == "de" else text

    def seconds(self, value: float | str) -> str:
        return self("seconds", value=self.number(value))

    def window(self, start: str | None, end: str | None, seconds: float | None = None) -> str:
        """A freeze window: from, to and how long. ``seconds``: its length as the schema says
        (``freeze_seconds``: the agent's measure in elapsed time, which a step of the clock the
        two times are on does not change); None: the times' difference, never below 0."""
        if not start:
            return self("none")
        if not end:
            return self("window_open", start=self.when(start))
        a, b = dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(end)
        local_a, local_b = _local(a), _local(b)
        same_day = local_a and local_b and local_a.date() == local_b.date()
        if seconds is None:
            seconds = max((b - a).total_seconds(), 0.0)
        return self(
            "window",
            start=self.when(a),
            end=local_b.strftime(self("time")) if local_b and same_day else self.when(b),
            seconds=self.seconds(seconds),
        )
