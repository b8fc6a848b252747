"""``tlsroll notify``: the "Notify practice" message, before a switch and after it.

Before: ``--when "2026-12-05 18:00" [--duration 30m]`` announces a change for a scope; the
leader plans it (nothing is stored) and the nodes' addresses come from what the schema last
recorded for them, else from their enrolled address with the seed's ports. After (or while it
runs): the newest rollout, or ``--rollout ID``, with the schema's real times and the nodes it
switched. Times are shown in the practice's zone: ``--timezone``, else the leader's
``maintenance_timezone`` (the schema carries it), else the leader's own (``TZ``,
``/etc/timezone``, ``/etc/localtime``); a leader on UTC gives a German notice Europe/Berlin.

``--include-password`` puts a password into the message only if it is the one the notice is
about (``Admin.CheckPassword``: the leader compares a hash derived here; the password never
leaves this process). Announced: for change-password the newest staged one (its start applies
it), for enable-tls the version the nodes that switched before run, which the planned rollout
gives the others (``password_version``). About a rollout that exists (running, from its start
on, or ended): the version it applies (``RolloutView.auth_version``), if its nodes done still
run it (``applied_version``); never one staged since and in effect on no node yet. Only in the
text notice (to print and hand over): HTML is for e-mail, markdown for a mail, chat or wiki.

The CA pin a notice gives for a node, and its ``test-connection --ca-pin`` command, are those
of the CA the node's https certificate comes from: the cluster CA, or a practice's own CA for
a certificate a ``--cert-dir`` rollout gave it (``NodeView.ca_pin``; ``--when … --cert-dir
DIR`` announces such a rollout). A rotate-cert to another CA than the one a node served
before says that workstations must be set up again (``served_pins``, ``ca_change``).

Nodes of an enable-tls rollout that an earlier one had switched already (a cluster rollout
after a local one: the plan skips them) are listed too, with their https address, marked
"already switched": the scope's sentence says the whole multiserver.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
import unicodedata
import zoneinfo
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import click

from leader.cli.base import (
    CLIError,
    Leader,
    fetch_schema,
    pass_leader,
    private_stdout,
    rollout_id_param,
)
from leader.cli.notify import CHANGES, NoticeInfo, NoticeNode, Timing, render_notice, zone_text
from leader.cli.password import read_password_file
from leader.rollout_core import CHANGES as SPECS
from leader.rollout_core import (
    Change,
    FreezeMode,
    NodeState,
    RolloutState,
    ScopeKind,
    Strategy,
    before_after,
)
from leader.wire import CHANGE, FREEZE, NODE_STATE, ROLLOUT_STATE, SCOPE_KIND, STRATEGY
from leader.zones import UTC_NAMES, load_zone, local_zone_name
from tlsroll import password
from tlsroll.cli import PathParam, terminal_only
from tlsroll.defaults import BOOTSTRAP_PORT
from tlsroll.echo import secret_inside, shown
from tlsroll.v1 import admin_pb2, schema_pb2

if TYPE_CHECKING:
    from tlsroll.v1 import admin_pb2_grpc

GERMAN_DEFAULT_ZONE = "Europe/Berlin"
DEFAULT_SOURCE = {"de": "persönlich bei Ihrer Praxis-IT", "en": "in person from your practice IT"}
DEFAULT_PRACTICE = {"de": "Praxis", "en": "Practice"}
DEFAULT_CONTACT = {"de": "Ihre Praxis-IT", "en": "your practice IT"}
HTTP_PORT, HTTPS_PORT = 8080, 8443  # the seed's, for nodes no agent has reported yet
MAX_DURATION = dt.timedelta(days=2)
_WHEN_FORMATS = ("%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%d.%m.%Y %H:%M")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?")
_ACTIVE = {RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTING, RolloutState.HALTING}
_NOT_SWITCHED = {
    NodeState.FAILED,
    NodeState.ROLLED_BACK,
    NodeState.NEEDS_ATTENTION,
    NodeState.PENDING,
    NodeState.PREFLIGHT,
    NodeState.STAGING,
    NodeState.STAGED,
    NodeState.SWITCHING,
    NodeState.CONFIRMING,
}


# --- parsing the options --------------------------------------------------------------------


def practice_zone(option: str | None, lang: str, configured: str = "") -> zoneinfo.ZoneInfo:
    """``--timezone``, else ``configured`` (the leader's ``maintenance_timezone``: the admin
    has said where the practice is, and the maintenance window and the notice then agree),
    else the leader's zone; a German notice on a UTC (or unknown) leader uses Europe/Berlin.
    A bad name is a usage error."""
    name = option
    if name is None and configured:
        try:
            return load_zone(configured)
        except ValueError:  # the leader knows it; this machine's zone database does not
            raise click.UsageError(
                f"the leader's maintenance_timezone {shown(configured)} is unknown here; give "
                "--timezone, e.g. Europe/Berlin"
            ) from None
    if name is None:
        name = local_zone_name()
        if lang == "de" and (name is None or name in UTC_NAMES):
            name = GERMAN_DEFAULT_ZONE
        name = name or "UTC"
    try:
        return load_zone(name)
    except ValueError:
        if option is None:  # the machine's own setting is odd: say so, not "bad option"
            raise click.UsageError(
                f"this machine's time zone {shown(name)} is unknown; give --timezone, "
                "e.g. Europe/Berlin"
            ) from None
        raise click.BadParameter(
            f"unknown time zone {shown(option)}; use a name like Europe/Berlin",
            param_hint="--timezone",
        ) from None


def zone_by_language(option: str | None, lang: str, configured: str = "") -> str | None:
    """The note for stderr when ``practice_zone`` chose the zone by the notice's language (no
    ``--timezone``, no ``maintenance_timezone``, a leader on UTC or an unknown zone): a German
    notice reads ``--when`` in Europe/Berlin and an English one in UTC, so the two notices of
    one switch announced times an hour or two apart with nothing saying so (session 71's
    walkthrough, M3). None when the zone did not depend on the language."""
    if option is not None or configured:
        return None
    own = local_zone_name()
    if own is not None and own not in UTC_NAMES:
        return None
    used, other, other_lang = (
        (GERMAN_DEFAULT_ZONE, "UTC", "en") if lang == "de" else ("UTC", GERMAN_DEFAULT_ZONE, "de")
    )
    return (
        f"tlsroll: note: --when is read in {used} (this leader runs on UTC; a notice with "
        f"--lang {other_lang} would read it in {other}): give --timezone ZONE, or set "
        "maintenance_timezone in leader.toml, so that every notice names the same time"
    )


_ROOM_AFTER = dt.timedelta(days=7)


def parse_when(
    text: str, zone: zoneinfo.ZoneInfo, now: dt.datetime, hint: str = "--when"
) -> dt.datetime:
    """``--when`` (or ``hint``) in ``zone``: a time that exists once there and lies ahead."""
    return when_in_zone(when_syntax(text, hint, now), text, zone, now, hint)


def when_syntax(text: str, hint: str = "--when", now: dt.datetime | None = None) -> dt.datetime:
    """The wall-clock time ``--when`` (or ``hint``) writes, without a zone: checked before
    anything asks the leader (which may be down) for its zone. Its error's example is
    tomorrow at 18:00 (``now``: this machine's clock), a time the command takes (a fixed date
    became one in the past that it refuses: session 75, adminwalk)."""
    for pattern in _WHEN_FORMATS:
        try:
            return dt.datetime.strptime(text.strip(), pattern)
        except ValueError:
            continue
    tomorrow = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(days=1)
    raise click.BadParameter(
        f"{shown(text)}: give date and time as YYYY-MM-DD HH:MM, e.g. {tomorrow:%Y-%m-%d} 18:00",
        param_hint=hint,
    )


def when_in_zone(
    naive: dt.datetime, text: str, zone: zoneinfo.ZoneInfo, now: dt.datetime, hint: str = "--when"
) -> dt.datetime:
    """``naive`` (``when_syntax`` of ``text``) in ``zone``: a time that exists once there and
    lies ahead."""
    when = naive.replace(tzinfo=zone)
    try:
        back = when.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None)
        _ = when + _ROOM_AFTER  # a notice's end (``--duration``, at most two days) must exist too
    except OverflowError:  # the first hours of year 1, the last days of 9999 (audit s34 M2)
        raise click.BadParameter(
            f"{text} ({zone.key}) is out of range; give a time in the days ahead",
            param_hint=hint,
        ) from None
    if back != naive:
        raise click.BadParameter(
            f"{text} does not exist in {zone.key} (the clocks skip it); pick another time",
            param_hint=hint,
        )
    if when.utcoffset() != naive.replace(tzinfo=zone, fold=1).utcoffset():
        raise click.BadParameter(
            f"{text} occurs twice in {zone.key} (the clocks go back); pick another time",
            param_hint=hint,
        )
    if when <= now:
        raise click.BadParameter(f"{text} ({zone.key}) lies in the past", param_hint=hint)
    return when


def parse_duration(text: str) -> dt.timedelta:
    """``30m``, ``2h``, ``1h30m``: more than nothing, at most two days."""
    m = _DURATION.fullmatch(text.strip())
    if not m or not any(m.groups()):
        raise click.BadParameter(
            f"{shown(text)}: use e.g. 30m, 2h or 1h30m", param_hint="--duration"
        )
    span = dt.timedelta(hours=int(m.group(1) or 0), minutes=int(m.group(2) or 0))
    if not dt.timedelta(0) < span <= MAX_DURATION:
        raise click.BadParameter(
            f"{shown(text)}: give more than 0 minutes and at most 48 hours", param_hint="--duration"
        )
    return span


def typed_text_problem(text: str, option: str) -> str | None:
    """Why ``text``, given as ``option`` (``--practice``, ``--contact``, ``--password-source``:
    words the notice repeats to the staff), is refused, or None. Not text a person typed: one
    that is no UTF-8 (a byte a terminal of another encoding sent) or holds a control or
    invisible character (an ESC sequence a terminal acts on when the notice is printed, a NUL,
    a direction mark that shows the words around it reversed: review s69 revpass M1, they went
    into every format as given). Nor a password's shape (a generated one): the notice gives
    the password only with --include-password, which warns on top and goes into the text
    notice only, never into one meant for sending (review s69 revpass M2). The message never
    repeats the text."""
    if not password.is_utf8(text):
        return f"{option} is not UTF-8 text (a terminal set to another encoding, such as Latin-1?)"
    for position, char in enumerate(text, 1):
        # (white space, a line end or tab among it, is shown as one space: ``_Doc``)
        if unicodedata.category(char) in password.INVISIBLE and not char.isspace():
            return (
                f"{option} has a control or invisible character (U+{ord(char):04X}) at position "
                f"{position}, which the notice must not pass on: remove it"
            )
    if (kind := secret_inside(text)) is not None:
        return (
            f"{option} holds what looks like {kind}; the notice gives the password only with "
            "--include-password (with its warning, only in the text notice): leave it out"
        )
    return None


def typed_words(
    lang: str, practice: str | None, contact: str, password_source: str
) -> dict[str, str]:
    """The notice's ``practice``, ``contact`` and ``password_source``: as given, or where left
    out or blank, the words of ``lang`` (review s69 revpass L1: an English notice was titled
    "– Praxis", and a blank --contact said "please contact ." with nobody named)."""
    return {
        "practice": (practice or "").strip() or DEFAULT_PRACTICE[lang],
        "contact": contact.strip() or DEFAULT_CONTACT[lang],
        "password_source": password_source.strip() or DEFAULT_SOURCE[lang],
    }


# --- what the notice is about -----------------------------------------------------------------


def _dt(msg: object, name: str) -> dt.datetime | None:
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    value: dt.datetime = getattr(msg, name).ToDatetime(tzinfo=dt.UTC)
    return value


def _split(url: str) -> tuple[str, str]:
    """(scheme, url) of a recorded address."""
    return urlsplit(url).scheme, url


def known_urls(schema: schema_pb2.Schema) -> dict[str, dict[str, tuple[str, int]]]:
    """Per node, its http and https URL (with the bootstrap port) as last recorded."""
    found: dict[str, dict[str, tuple[str, int]]] = {}
    for r in schema.rollouts:  # newest first: the first record wins
        for n in r.nodes:
            urls = found.setdefault(n.name, {})
            for url in (n.old_url, n.new_url):
                if url:
                    scheme, _ = _split(url)
                    urls.setdefault(scheme, (url, n.bootstrap_port or BOOTSTRAP_PORT))
    return found


def notice_node(
    name: str,
    change: Change,
    known: dict[str, tuple[str, int]],
    address: str,
    ca_pin: str = "",
    ca_change: Literal["", "own", "cluster"] = "",
) -> NoticeNode:
    """The node's addresses before and after ``change`` (``rollout_core.before_after``, as the
    rollout's rows show them: review s45rev6 L2)."""
    http, https = known.get("http"), known.get("https")
    port = (https or (None, BOOTSTRAP_PORT))[1]
    if http and https:
        path_known = True
        http_url, https_url = http[0], https[0]
    else:
        path_known = False
        host = f"[{address}]" if ":" in address else address
        http_url = http[0] if http else f"http://{host}:{HTTP_PORT}/…"
        https_url = https[0] if https else f"https://{host}:{HTTPS_PORT}/…"
    old_url, new_url = before_after(change, http_url, https_url)  # as the rollout's rows
    return NoticeNode(name, old_url, new_url, port, path_known, ca_pin, ca_change)


def _gives_certificate(change: Change) -> bool:
    """Does ``change`` give its nodes a certificate (enable-tls, rotate-cert)?"""
    return SPECS[change].stages_certificate


def served_pins(schema: schema_pb2.Schema, start: int = 0) -> dict[str, str | None]:
    """Per node, the CA of the certificate it serves as the rollouts from ``start`` on
    (``schema.rollouts``, newest first) left it: the pin of a practice's own CA
    (``NodeView.ca_pin``), "" the cluster CA's, None none (a way back took https away); a node
    none of them gave a certificate is not in it."""
    found: dict[str, str | None] = {}
    for r in schema.rollouts[start:]:
        change = CHANGE.read(r.change, "change")
        for n in r.nodes:
            if n.name in found:
                continue
            state = NODE_STATE.read(n.state, "state")
            if _gives_certificate(change) and state in (NodeState.DONE, NodeState.DUAL):
                found[n.name] = n.ca_pin
            elif change is Change.DISABLE_TLS and state is NodeState.DONE:
                found[n.name] = None
    return found


def ca_change(before: str | None, after: str) -> Literal["", "own", "cluster"]:
    """What a rotate-cert that gives a node a certificate of CA ``after`` (a practice's own
    CA's pin, "" the cluster CA) means for the workstations set up while it served one of CA
    ``before`` (``served_pins``): "own" a CA they were not handed (each must be set up again),
    "cluster" back to the cluster CA (one that pinned the practice CA must), "" neither."""
    if after and after != before:
        return "own"
    if not after and before:
        return "cluster"
    return ""


def node_addresses(leader: Leader) -> dict[str, str]:
    return {name: address for name, (address, _) in enrolled(leader).items()}


def enrolled(leader: Leader) -> dict[str, tuple[str, str]]:
    """Per enrolled node, its first address and its server as its last heartbeat said
    (``NodeInfo.server``: "http", "https", "http+https", …)."""
    with leader.admin() as admin:
        reply = leader.call(admin.ListNodes, admin_pb2.ListNodesRequest())
    return {n.name: (n.addresses[0] if n.addresses else n.name, n.server) for n in reply.nodes}


def outside(
    leader: Leader,
    kind: ScopeKind | None,
    inside: Sequence[str],
    known: dict[str, dict[str, tuple[str, int]]],
    closed: Collection[str] = (),
) -> list[NoticeNode]:
    """An enable-tls of scope local or nodes: the enrolled nodes not in it, each with its
    address now (``NoticeInfo.others``): the one of the scheme it serves (https only: its
    https address, else its http one) as last recorded, else its enrolled address with the
    seed's port (the path unknown, "…"). Which it serves: its last heartbeat's word, else
    (not heard: offline, or the leader restarted since) the records' (``closed``: the nodes
    whose http the rollouts last closed); an https-only node offline was shown with its old
    http address as unchanged (review b3 of s64, L5)."""
    if kind not in (ScopeKind.LOCAL, ScopeKind.NODES):
        return []
    found = []
    for name, (address, server) in sorted(enrolled(leader).items()):
        if name in inside:
            continue
        schemes = set(server.split("+")) if server in ("http", "https", "http+https") else set()
        https_only = schemes == {"https"} or (not schemes and name in closed)
        scheme = "https" if https_only else "http"
        url = known.get(name, {}).get(scheme)
        if url is None:
            host = f"[{address}]" if ":" in address else address
            port = HTTPS_PORT if scheme == "https" else HTTP_PORT
            found.append(NoticeNode(name, f"{scheme}://{host}:{port}/…", "", path_known=False))
        else:
            found.append(NoticeNode(name, url[0], url[0], url[1]))
    return found


def plan_request(
    change: Change, scope: str | None, nodes: str | None, cert_dir: Path | None = None
) -> admin_pb2.RolloutRequest:
    names = [n.strip() for n in (nodes or "").split(",") if n.strip()]
    if cert_dir is not None and not _gives_certificate(change):
        raise click.UsageError("--cert-dir goes with --change enable-tls or rotate-cert")
    if change is Change.DISABLE_TLS:
        if scope or names:
            raise click.UsageError(
                "disable-tls takes its nodes from the rollout it takes back; drop --scope/--nodes"
            )
        return admin_pb2.RolloutRequest(
            change=CHANGE.wire(change), freeze=FREEZE.wire(FreezeMode.NODE)
        )
    if scope is None:
        if not names:
            # As `plan` and `rollout start` (the seed's dialog asks which): an announcement to
            # the whole practice is said, not assumed (session 64's review L1).
            raise click.UsageError("give --scope local|cluster or --nodes a,b")
        scope = "nodes"
    if (scope == "nodes") != bool(names):
        raise click.UsageError("--nodes a,b goes with --scope nodes (or without --scope)")
    request = admin_pb2.RolloutRequest(
        change=CHANGE.wire(change),
        scope=SCOPE_KIND.wire(ScopeKind(scope)),
        nodes=names,
        freeze=FREEZE.wire(FreezeMode.NODE),
    )
    if cert_dir is not None:
        from leader.cli.rollout import cert_dir_message  # noqa: PLC0415 - only for --cert-dir

        request.cert_dir.CopyFrom(cert_dir_message(cert_dir))
    return request


def _finalized_by(schema: schema_pb2.Schema, rollout_id: str) -> str:
    """The finalize of transitional rollout ``rollout_id`` that completed (its http is closed
    on every node), "" none."""
    completed = ROLLOUT_STATE.wire(RolloutState.COMPLETED)
    return next(
        (r.id for r in schema.rollouts if r.finalizes == rollout_id and r.state == completed), ""
    )


def _closed_by_finalize(
    schema: schema_pb2.Schema, rollout_id: str
) -> tuple[dict[str, dt.datetime], bool]:
    """Transitional rollout ``rollout_id`` awaiting finalize: its nodes whose http a finalize
    of it has closed (done in it: running, paused, or ended part way), each with when (its
    last step's end, else the finalize's start), and whether one is closing http now
    (running: each server restarts in its turn; a paused one closes nothing, maybe for days,
    and was told as closing: review b3 of s64, L3)."""
    closed: dict[str, dt.datetime] = {}
    closing = False
    for r in schema.rollouts:
        if r.finalizes != rollout_id or CHANGE.read(r.change, "change") is not Change.FINALIZE:
            continue
        state = ROLLOUT_STATE.read(r.state, "state")
        closing = closing or state is RolloutState.RUNNING
        for n in r.nodes:
            if NODE_STATE.read(n.state, "state") is not NodeState.DONE or n.name in closed:
                continue
            ends = [s.ended_at.ToDatetime(tzinfo=dt.UTC) for s in n.steps if s.HasField("ended_at")]
            when = max(ends, default=None) or _dt(r, "started_at") or _dt(r, "created_at")
            if when is not None:
                closed[n.name] = when
    return closed, closing


def pick_rollout(schema: schema_pb2.Schema, rollout_id: str | None) -> schema_pb2.RolloutView:
    rollouts = list(schema.rollouts)
    if rollout_id:
        rollouts = [r for r in rollouts if r.id == rollout_id]
        if not rollouts:
            raise CLIError(f"no rollout {shown(rollout_id)}: see `tlsroll schema show`")
    if not rollouts:
        raise CLIError(
            "no rollout yet: announce one with "
            '`tlsroll notify --when "YYYY-MM-DD HH:MM" [--duration 30m]`'
        )
    return rollouts[0]


# --- the password -----------------------------------------------------------------------------

_ENABLE_FIRST = (
    "enable-tls sets its password when it starts (rollout start --password-file): "
    "include it in the notice after the start, or leave out --include-password"
)
_OLDER = (
    "the leader runs older code: restart it (systemctl restart tlsroll-leader), then include "
    "the password"
)


@dataclass(frozen=True)
class Applied:
    """A notice about a rollout that exists (started, perhaps ended): the password version it
    applies (``RolloutView.auth_version``), its nodes done (``switched``: they run it, unless
    something changed it since; ``active``: the rollout still runs, and a node just done may
    not be recorded as running it yet) and, for enable-tls, the nodes an earlier rollout
    switched (``before``: they must run it too, or the notice has no one password)."""

    rollout: str
    version: int
    switched: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    active: bool = False


def applied_version(applied: Applied, live: dict[str, int]) -> int:
    """The password version a notice about the rollout ``applied`` gives: the one it applies,
    if its nodes done still run it (``live``: per node); a CLIError (one line) if not."""
    version = applied.version
    if not version:
        raise CLIError(
            f"rollout {applied.rollout} applies no password the notice could give (or {_OLDER})"
        )
    changed = {
        n: live.get(n)
        for n in applied.switched
        if live.get(n) != version and (n in live or not applied.active)
    }
    if changed:
        listed = ", ".join(
            f"{n} version {v}" if v else f"{n} none (on http)" for n, v in sorted(changed.items())
        )
        raise CLIError(
            f"the password changed since rollout {applied.rollout} (it applied version "
            f"{version}; now {listed}): make the notice about the rollout that changed it "
            "(--rollout ID, see `tlsroll schema show`), or leave out --include-password"
        )
    others = {n: live.get(n) for n in applied.before if live.get(n) != version}
    if others:
        listed = ", ".join(f"{n} version {v or 'none'}" for n, v in sorted(others.items()))
        raise CLIError(
            f"the notice's nodes run different passwords ({listed}; rollout {applied.rollout} "
            f"gives version {version}): give them one with "
            "`tlsroll rollout start --change change-password`, then include it"
        )
    return version


def password_version(
    change: Change, newest: int, live: dict[str, int], nodes: Sequence[str], planned: int
) -> int:
    """The password version an announced notice (``--when``) of ``change`` about ``nodes``
    gives: change-password the newest staged one (the one its start applies); enable-tls
    (``planned``: the plan's version in use, 0 for none) the version the nodes switched before
    run (``live``: per node) and the rollout gives the others. A notice about a rollout that
    exists: ``applied_version``. A UsageError or CLIError (one line) when there is none to
    give."""
    if change is Change.CHANGE_PASSWORD:
        return newest
    if not planned:
        raise click.UsageError(_ENABLE_FIRST)
    running = {n: live[n] for n in nodes if n in live}
    versions = set(running.values()) | {planned}
    if len(versions) > 1:
        listed = ", ".join(f"{n} version {v}" for n, v in sorted(running.items()))
        raise CLIError(
            f"the notice's nodes run different passwords ({listed}; the rollout gives the "
            f"others version {planned}): give them one with "
            "`tlsroll rollout start --change change-password`, then include it"
        )
    return planned


def _matches(
    leader: Leader,
    admin: admin_pb2_grpc.AdminStub,
    params: admin_pb2.CheckPasswordResponse,
    secret: str,
) -> bool:
    """Is ``secret`` the version ``params`` describes (its salt and scrypt parameters)?"""
    try:
        digest = password.derive_hash(
            secret, salt=params.salt, n=params.n, r=params.r, p=params.p, dklen=params.dklen
        )
    except ValueError as exc:
        raise CLIError(f"the leader's password parameters are unusable: {exc}") from None
    reply = leader.call(
        admin.CheckPassword,
        admin_pb2.CheckPasswordRequest(
            candidate_hash=digest,
            version=params.version,
            # the newest: refused if another was staged since; an older one: that one
            about=0 if params.version == params.newest else params.version,
        ),
    )
    return bool(reply.matches)


def check_password(
    leader: Leader,
    secret: str,
    change: Change,
    nodes: Sequence[str],
    planned: int | None,
    applied: Applied | None = None,
) -> None:
    """CLIError (UsageError) unless ``secret`` is the password the notice is about, checked
    by Admin.CheckPassword: announced (``planned``), ``password_version``; about a rollout
    that exists (``applied``), ``applied_version``. A password staged and in effect on no node
    yet is named as such, unless the notice announces it. A leader of older code (it sends no
    ``newest``, or answers another version than the one asked about: it drops ``about``) is
    refused: it would check the newest staged password, whatever the notice is about."""
    with leader.admin() as admin:
        first = leader.call(admin.CheckPassword, admin_pb2.CheckPasswordRequest())
        if not first.newest or first.version != first.newest:
            raise CLIError(_OLDER)
        newest = first.newest
        live = {n.node: n.version for n in first.live}
        announced = applied is None
        if applied is not None:
            target = applied_version(applied, live)
        else:
            target = password_version(change, newest, live, nodes, planned or 0)
        params = (
            first
            if target == first.version
            else leader.call(admin.CheckPassword, admin_pb2.CheckPasswordRequest(about=target))
        )
        if params.version != target:
            raise CLIError(_OLDER)
        if _matches(leader, admin, params, secret):
            return
        if announced and change is Change.CHANGE_PASSWORD:
            raise CLIError(
                f"that is not the staged password (version {target}); the notice would give "
                "the practice a wrong one. Check the file, or stage it with "
                "`tlsroll password set`"
            )
        if (
            newest != target
            and newest not in live.values()
            and _matches(leader, admin, first, secret)
        ):
            raise CLIError(
                f"that password (version {newest}) is staged, not in effect on any node yet: "
                'announce it with `tlsroll notify --when "YYYY-MM-DD HH:MM" --change '
                "change-password`"
            )
    raise CLIError(
        f"that is not the password the notice's nodes run (version {target}); the notice "
        "would give the practice a wrong one. Check the file"
    )


# --- the command ------------------------------------------------------------------------------


@click.command()
@click.option("--lang", type=click.Choice(["de", "en"]), default="de", show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "html"]),
    default="text",
    show_default=True,
    help="html: for e-mail programs (one page, inline styles, everything escaped).",
)
@click.option(
    "--when",
    help="Announce a switch that has not started: its start in the practice's time zone, e.g. "
    '"2027-03-05 18:00". Without it the notice is about the newest (or --rollout) rollout.',
)
@click.option("--duration", help="With --when: how long it is planned to take, e.g. 30m, 1h30m.")
@click.option(
    "--change",
    type=click.Choice(CHANGES),
    help="With --when: what is announced [default: enable-tls].",
)
@click.option(
    "--scope",
    type=click.Choice(["local", "cluster", "nodes"]),
    help="With --when: which nodes (or --nodes; one of them is needed, but for disable-tls).",
)
@click.option("--nodes", help="With --when: comma-separated node names (scope 'nodes').")
@click.option(
    "--cert-dir",
    type=PathParam(path_type=Path, file_okay=False, exists=True),
    help="With --when, for enable-tls or rotate-cert: the switch will bring the practice's own "
    "certificates from DIR (as rollout start --cert-dir; checked the same way): the notice "
    "gives the practice CA's pin.",
)
@click.option(
    "--rollout",
    "rollout_id",
    callback=rollout_id_param,
    help="Without --when: this rollout, not the newest.",
)
@click.option(
    "--timezone",
    "tz_name",
    help="Time zone of the times shown, e.g. Europe/Berlin [default: maintenance_timezone in "
    "leader.toml, else the leader's; a German notice on a UTC leader: Europe/Berlin].",
)
@click.option("--practice", help='Name for the title [default: "Praxis", in English "Practice"].')
@click.option("--contact", default="", help="Whom to ask (name, phone).")
@click.option(
    "--password-source",
    default="",
    help='Where staff get the password, e.g. "persönlich bei Frau Beispiel".',
)
@click.option(
    "--include-password",
    is_flag=True,
    help="Put the password into the message (only the one the notice is about: announced, "
    "for change-password the staged one, for enable-tls the one its nodes will run; about a "
    "rollout, the one it applied; with a warning not to e-mail it; --format text only: html "
    "and markdown are for sending).",
)
@click.option(
    "--password-file",
    type=PathParam(path_type=Path, dir_okay=False),
    help="With --include-password: read it from this file (the file's only line, mode 0600) "
    "instead of asking.",
)
@click.option(
    "--until",
    help="A transitional rollout: when http is planned to close (tlsroll rollout finalize), in "
    'the practice\'s time zone, e.g. "2026-12-12 18:00": the notice says "you can switch any '
    'time until …".',
)
@click.option(
    "--remaining",
    is_flag=True,
    help="Only list the workstations still on http (transitional strategy): each still needs "
    "the client steps before `tlsroll rollout finalize` closes http.",
)
@pass_leader
def notify(
    leader: Leader,
    lang: str,
    fmt: str,
    when: str | None,
    duration: str | None,
    change: str | None,
    scope: str | None,
    nodes: str | None,
    cert_dir: Path | None,
    rollout_id: str | None,
    tz_name: str | None,
    practice: str | None,
    contact: str,
    password_source: str,
    include_password: bool,
    password_file: Path | None,
    until: str | None,
    remaining: bool,
) -> None:
    """Print the "Notify practice" message for the staff.

    Before or after a switch; with --remaining only the workstations that still need the
    client steps."""
    if remaining:
        for name, value in (("--when", when), ("--rollout", rollout_id), ("--cert-dir", cert_dir)):
            if value is not None:
                raise click.UsageError(f"--remaining lists who is still on http; leave out {name}")
        if include_password:
            raise click.UsageError("--remaining lists who is still on http; no password in it")
        schema = fetch_schema(leader)
        zone = practice_zone(tz_name, lang, schema.auto_rotate.timezone)
        click.echo(remaining_text(schema, lang, zone), nl=False)
        return
    if when is None:
        for name, value in (
            ("--duration", duration),
            ("--change", change),
            ("--scope", scope),
            ("--nodes", nodes),
            ("--cert-dir", cert_dir),
        ):
            if value is not None:
                raise click.UsageError(f"{name} goes with --when (an announced switch)")
    elif rollout_id is not None:
        raise click.UsageError("--rollout names a rollout that exists; --when announces one")
    if when is not None and until is not None:
        raise click.UsageError("--until goes with a transitional rollout, not with --when")
    if cert_dir is not None and not _gives_certificate(Change(change or "enable-tls")):
        raise click.UsageError("--cert-dir goes with --change enable-tls or rotate-cert")
    if password_file is not None and not include_password:
        raise click.UsageError("--password-file goes with --include-password")
    if include_password and fmt != "text":
        # Only the plain text, to print and hand over: html is for e-mail programs, markdown
        # for what renders it (a mail, a chat, a wiki, a ticket), each a way of sending it
        # (the seed: not by e-mail; session 69 left markdown allowed).
        raise click.UsageError(
            f"--format {fmt} is {_SENT_BY[fmt]}, and the password must not go by e-mail: "
            "leave out --include-password (the notice then says where staff get it), or print "
            "the text notice (--format text) and hand it over"
        )
    # Everything that needs no zone before the leader is asked for one: bad input is a usage
    # error (exit 2) whether the leader is up or not.
    for option, text in (
        ("--practice", practice or ""),
        ("--contact", contact),
        ("--password-source", password_source),
    ):
        if (why := typed_text_problem(text, option)) is not None:
            raise click.UsageError(why)
    naive_when = when_syntax(when) if when is not None else None
    naive_until = when_syntax(until, "--until") if until is not None else None
    span = parse_duration(duration) if duration is not None else None
    # The announced switch's scope, nodes and --cert-dir too, before any file is read or the
    # leader asked (a missing --scope was said after the password file was read and the leader
    # asked: the closing review of session 64, M1).
    announced = (
        plan_request(Change(change or "enable-tls"), scope, nodes, cert_dir)
        if when is not None
        else None
    )
    if include_password:  # where the notice goes, before the password is read or asked for
        private_stdout("the notice holds the password")
    # The file too (its rules, its mode), before the leader: the password is asked for later.
    from_file = read_password_file(password_file) if password_file is not None else None
    if include_password and change in ("rotate-cert", "disable-tls"):
        raise click.UsageError(f"a {change} notice has no password to give")
    if include_password and from_file is None:  # off a terminal: before the leader (s49cli L3)
        terminal_only(_ASK_PASSWORD)
    # The schema first when the zone may be the leader's maintenance_timezone.
    first = fetch_schema(leader) if tz_name is None else None
    configured = first.auto_rotate.timezone if first else ""
    zone = practice_zone(tz_name, lang, configured)
    note = zone_by_language(tz_name, lang, configured) if when is not None else None
    now = dt.datetime.now(dt.UTC)
    start = when_in_zone(naive_when, when, zone, now) if naive_when and when else None

    schema = first if first is not None else fetch_schema(leader)
    known = known_urls(schema)
    unchanged: list[str] = []
    transitional = False
    closing = False  # a finalize of the transitional rollout is closing http now
    planned_password: int | None = None  # an announced switch: the password its plan gives
    applied: Applied | None = None  # a rollout that exists: the password it applies
    now_pins = served_pins(schema)  # the CA each node's certificate comes from now
    if start is not None:
        the_change = Change(change or "enable-tls")
        assert announced is not None  # (made with the arguments' checks above)
        with leader.admin() as admin:
            planned = leader.call(admin.PlanRollout, announced)
        plan = planned.rollout
        planned_password = planned.password_version_in_use
        addresses = node_addresses(leader)
        stepped = [
            n for n in plan.nodes if NODE_STATE.read(n.state, "state") is not NodeState.SKIPPED
        ]
        if not stepped:
            raise CLIError(f"{the_change.value} would change no node: nothing to announce")
        notice_nodes = []
        for n in stepped:
            # enable-tls and rotate-cert give the node the plan's certificate (a practice's
            # own: its CA's pin); change-password leaves it the one it serves.
            pin = n.ca_pin if _gives_certificate(the_change) else now_pins.get(n.name) or ""
            # The plan's row carries the addresses and bootstrap port the node's agent
            # answered its check with (session 64's review M2: a node never switched was
            # announced with the seed's port and "…" though its agent knew both); those of an
            # agent that did not answer come from the records, else the seed's.
            notice_nodes.append(
                _recorded_node(
                    n,
                    the_change,
                    known.get(n.name, {}),
                    addresses.get(n.name, n.name),
                    pin,
                    ca_change(now_pins.get(n.name), pin)
                    if the_change is Change.ROTATE_CERT
                    else "",
                )
            )
        before = switched_before(the_change, plan)
        already = _already(before, the_change, known, addresses, now_pins)
        # Elapsed time: adding to a time in a zone adds wall-clock time, an hour off (or in the
        # hour that does not exist) across a change of daylight saving time.
        end = (start.astimezone(dt.UTC) + span).astimezone(zone) if span else None
        timing = Timing("announced", start, end)
        kind = SCOPE_KIND.read_optional(plan.scope, "scope")
        in_plan = [n.name for n in plan.nodes]
    else:
        r = pick_rollout(schema, rollout_id)
        if (
            CHANGE.read(r.change, "change") is Change.FINALIZE
            and ROLLOUT_STATE.read(r.state, "state") is not RolloutState.COMPLETED
        ):
            # A finalize running, paused (a --when-quiet one may wait days for quiet on a
            # node), or ended part way: its phase 1 is what the staff live with, http closed
            # on the nodes it is done with and open on the others (session 64's review M2':
            # "make no new entries until it is complete", and --until refused).
            r = next((x for x in schema.rollouts if x.id == r.finalizes), r)
        the_change = CHANGE.read(r.change, "change")
        state = ROLLOUT_STATE.read(r.state, "state")
        started = _dt(r, "started_at") or _dt(r, "created_at")
        assert started is not None
        running = state in _ACTIVE
        records = [
            (n, NODE_STATE.read(n.state, "state"))
            for n in r.nodes
            if NODE_STATE.read(n.state, "state") is not NodeState.SKIPPED
        ]
        transitional = STRATEGY.read_optional(r.strategy, "strategy") is Strategy.TRANSITIONAL
        about = r  # the rollout whose scope the notice tells (its nodes and those outside it)
        if the_change is Change.FINALIZE:
            # Phase 2 closed http on its nodes: for the staff, the switch to https has ended
            # (it was an internal error: session 56's second README walk, H1). That switch is
            # phase 1's, of phase 1's scope: the finalize's own is the nodes phase 1 left dual,
            # and a cluster-wide switch whose finalize left out a node cut off (a machine lost)
            # was told as one of "the servers listed below" (review b3 of s64, L4).
            the_change, transitional = Change.ENABLE_TLS, False
            about = next((x for x in schema.rollouts if x.id == r.finalizes), r)
        elif transitional and (done_by := _finalized_by(schema, r.id)):
            if until is not None:
                raise click.UsageError(
                    f"--until goes with a transitional rollout awaiting finalize; {r.id}'s http "
                    f"was closed by finalize {done_by}"
                )
            transitional = False  # its http is closed since: "still works" is no longer true
        if until is not None and not transitional:
            raise click.UsageError(f"--until goes with a transitional rollout; {r.id} is not")
        closed, closing = _closed_by_finalize(schema, r.id) if transitional else ({}, False)
        switched = (NodeState.DONE, NodeState.DUAL)
        shown = [n for n, s in records if running or s in switched]
        unchanged = [] if running else [n.name for n, s in records if s in _NOT_SWITCHED]
        if not shown:
            raise CLIError(
                f"rollout {r.id} ({state.value}) changed no node: nothing to tell the practice"
            )
        before = switched_before(the_change, about)
        addresses = node_addresses(leader) if before or any(not n.new_url for n in shown) else {}
        # The CA each node served before this rollout, and its certificate's CA: the one this
        # rollout gives it while it runs (a node not done yet), else the one it serves now; a
        # rotate-cert's notice is about its change of CA, so its own (rev57a L4: the pin of now
        # beside the change of then).
        index = next(i for i, x in enumerate(schema.rollouts) if x.id == r.id)
        before_pins = served_pins(schema, index + 1)
        gives = _gives_certificate(CHANGE.read(r.change, "change"))
        notice_nodes = []
        for n in shown:
            own = (running and gives) or the_change is Change.ROTATE_CERT
            pin = n.ca_pin if own else now_pins.get(n.name) or ""
            node = _recorded_node(
                n,
                the_change,
                known.get(n.name, {}),
                addresses.get(n.name, n.name),
                pin,
                ca_change(before_pins.get(n.name), n.ca_pin)
                if the_change is Change.ROTATE_CERT
                else "",
            )
            if n.name in closed:
                node = replace(node, closed=closed[n.name].astimezone(zone))
            notice_nodes.append(node)
        already = _already(before, the_change, known, addresses, now_pins)
        end = None if running else _dt(r, "ended_at")
        timing = Timing(
            "running" if running else "done",
            started.astimezone(zone),
            end.astimezone(zone) if end else None,
        )
        kind = SCOPE_KIND.read_optional(about.scope, "scope")
        in_plan = [n.name for n in about.nodes]
        applied = Applied(
            r.id,
            r.auth_version,
            switched=tuple(n.name for n, s in records if s in switched),
            before=tuple(n.name for n in before),
            active=running,
        )

    secret = None
    if include_password:
        if the_change not in (Change.ENABLE_TLS, Change.CHANGE_PASSWORD):
            raise click.UsageError(f"a {the_change.value} notice has no password to give")
        if start is not None and the_change is Change.ENABLE_TLS and not planned_password:
            raise click.UsageError(_ENABLE_FIRST)  # (before the password is asked for)
        secret = from_file if from_file is not None else _typed_password()
        check_password(
            leader,
            secret,
            the_change,
            [n.name for n in (*notice_nodes, *already)],
            planned_password if start is not None else None,
            applied,
        )

    with leader.admin() as admin:
        ca = leader.call(admin.GetCA, admin_pb2.GetCARequest())
    info = NoticeInfo(
        **typed_words(lang, practice, contact, password_source),
        nodes=notice_nodes,
        ca_pin=ca.spki_pin,
        timing=timing,
        change=the_change.value,
        scope=kind.value if kind is not None else "cluster",
        unchanged=unchanged,
        already=already,
        others=outside(leader, kind, in_plan, known, _http_closed(schema))
        if the_change is Change.ENABLE_TLS
        else (),
        transitional=transitional,
        until=when_in_zone(naive_until, until, zone, now, "--until")
        if naive_until and until
        else None,
        closing=closing,
    )
    if note is not None:  # (with the notice only: a refusal stays its one line)
        click.echo(note, err=True)
    click.echo(render_notice(info, lang=lang, fmt=fmt, password=secret), nl=False)
    _remind(include_password)


_SENT_BY = {"html": "for e-mail", "markdown": "for sending (a mail, a chat, a wiki)"}
"""What each format but text is for: a way of sending the notice, never one with the password."""

_ASK_PASSWORD = "add --password-file FILE (the password to include, mode 0600)"  # noqa: S105


def _typed_password() -> str:
    """The password typed at the prompt, held to the rule a password file and a workstation's
    prompt are held to (``password.password_problem``): one that nobody could type at a
    workstation is refused here (exit 2, nothing printed), not written into the notice. On a
    terminal only (``terminal_only``): off one, exit 2 naming --password-file, nothing read."""
    terminal_only(_ASK_PASSWORD)
    try:
        secret: str = click.prompt("Password to include", hide_input=True, err=True)
    except UnicodeDecodeError:  # a terminal of another encoding, read strictly (s66 pw L1)
        raise click.UsageError(
            f"the password entered {password.NOT_UTF8}; no notice printed"
        ) from None
    if (why := password.password_problem(secret)) is not None:
        raise click.UsageError(f"the password entered {why}; no notice printed")
    return secret


_REMAINING = {
    "de": {
        "head": "Arbeitsplätze, die noch http nutzen (sie brauchen die Schritte, bevor http "
        "geschlossen wird):",
        "head.none_waiting": "Arbeitsplätze, die zuletzt über http gesehen wurden (kein "
        "Übergangs-Rollout wartet auf finalize):",
        "cut": "{row} – ohne Verbindung: http ist seit {when} geschlossen",
        "none": "Kein Arbeitsplatz wurde zuletzt über http gesehen.",
        "row": "  {node}: {address}{ws}, zuletzt {last}",
        "unknown": "  {node}: nicht feststellbar ({why})",
        "never": "der Agent hat noch nichts gemeldet",
        "no_source": "sein Treiber meldet nicht, wer sich verbindet: systemd braucht "
        "die access_log-Einstellungen in [server], exec [server.commands] clients (README, „The "
        "managed server (drivers)“)",
        "awaiting": "noch kein Bericht des Agenten seit dem Start des Leaders",
        "nobody": "  Für keinen Knoten feststellbar: noch kein Agent hat etwas gemeldet",
    },
    "en": {
        "head": "Workstations still on http (each needs the client steps before http closes):",
        "head.none_waiting": "Workstations seen on http lately (no transitional rollout awaits "
        "finalize):",
        "cut": "{row} – cut off: http closed at {when}",
        "none": "No workstation was seen on http lately.",
        "row": "  {node}: {address}{ws}, last seen {last}",
        "unknown": "  {node}: cannot tell ({why})",
        "never": "its agent has not reported yet",
        "no_source": "its driver does not report who connects: systemd needs the access_log "
        'settings in [server], exec [server.commands] clients (README, "The managed server '
        '(drivers)")',
        "awaiting": "no report from its agent since the leader started yet",
        "nobody": "  Cannot tell for any node: no agent has reported yet",
    },
}


def remaining_text(schema: schema_pb2.Schema, lang: str, zone: zoneinfo.ZoneInfo) -> str:
    """Who still needs the client steps, per node, from what the agents last reported (the
    leader's ``still_on_http``), in the practice's time zone; nodes that cannot tell, named."""
    t = _REMAINING[lang]
    closed = _http_closed(schema)
    rows = []
    for view in schema.node_clients:
        for c in view.still_on_http:
            last = c.last_seen.ToDatetime(tzinfo=dt.UTC).astimezone(zone)
            row = t["row"].format(
                node=view.node,
                address=c.address,
                ws=f" ({c.workstation})" if c.workstation else "",
                last=_stamp(last, lang),  # (the notice's zone names: MEZ in German, L2')
            )
            if view.node in closed:
                # Its http is closed (finalize, a direct switch): that workstation has lost the
                # server, not "needs the steps before http closes" (session 64's review L1').
                row = t["cut"].format(
                    row=row, when=_stamp(closed[view.node].astimezone(zone), lang)
                )
            rows.append(row)
        if view.clients.problem or not view.clients.source:
            # An agent that reported without a source: its driver cannot tell (session 71
            # walkthrough: "has not reported yet" of an agent online for hours).
            said = t["no_source"] if view.HasField("reported_at") else t["never"]
            why = view.clients.problem or said
            rows.append(t["unknown"].format(node=view.node, why=why))
        elif view.awaiting_report:  # (the stored report speaks for the node no more)
            rows.append(t["unknown"].format(node=view.node, why=t["awaiting"]))
    if not schema.node_clients:
        rows.append(t["nobody"])  # said in words, not as a node named "*" (s45rt2 L6)
    if not rows:
        return t["none"] + "\n"
    awaiting = ROLLOUT_STATE.wire(RolloutState.AWAITING_FINALIZE)
    waiting = any(r.state == awaiting for r in schema.rollouts)
    return "\n".join([t["head" if waiting else "head.none_waiting"], *rows]) + "\n"


def _stamp(when: dt.datetime, lang: str) -> str:
    """``2026-12-07 03:12:00 MEZ``: the zone's abbreviation as the notice writes it."""
    return f"{when:%Y-%m-%d %H:%M:%S} {zone_text(when, lang)}"


def _http_closed(schema: schema_pb2.Schema) -> dict[str, dt.datetime]:
    """The nodes whose http the rollouts (newest first) last closed (an enable-tls or a
    finalize done there, not since taken back to dual or http), with when: a workstation still
    seen on http there has lost the server."""
    found: dict[str, dt.datetime | None] = {}
    for r in schema.rollouts:
        change = CHANGE.read(r.change, "change")
        for n in r.nodes:
            if n.name in found:
                continue
            state = NODE_STATE.read(n.state, "state")
            if state is NodeState.DUAL or (
                change is Change.DISABLE_TLS and state is NodeState.DONE
            ):
                found[n.name] = None  # http open (again)
            elif change in (Change.ENABLE_TLS, Change.FINALIZE) and state is NodeState.DONE:
                ends = [
                    s.ended_at.ToDatetime(tzinfo=dt.UTC) for s in n.steps if s.HasField("ended_at")
                ]
                found[n.name] = (
                    max(ends, default=None) or _dt(r, "ended_at") or _dt(r, "started_at")
                )
    return {name: when for name, when in found.items() if when is not None}


def switched_before(change: Change, rollout: schema_pb2.RolloutView) -> list[schema_pb2.NodeView]:
    """The nodes an enable-tls rollout skipped because an earlier one had switched them (the
    planner's "already done"): the notice lists them as already switched."""
    if change is not Change.ENABLE_TLS:
        return []
    return [
        n
        for n in rollout.nodes
        if NODE_STATE.read(n.state, "state") is NodeState.SKIPPED
        and n.reason.startswith("already done")
    ]


def _already(
    nodes: Sequence[schema_pb2.NodeView],
    change: Change,
    known: dict[str, dict[str, tuple[str, int]]],
    addresses: dict[str, str],
    pins: dict[str, str | None],
) -> list[NoticeNode]:
    """The notice's nodes an earlier rollout switched (``switched_before``), each with the pin
    of the CA it serves a certificate of now (``served_pins``)."""
    return [
        notice_node(
            n.name,
            change,
            known.get(n.name, {}),
            addresses.get(n.name, n.name),
            pins.get(n.name) or "",
        )
        for n in nodes
    ]


def _recorded_node(
    n: schema_pb2.NodeView,
    change: Change,
    known: dict[str, tuple[str, int]],
    address: str,
    ca_pin: str = "",
    ca_change: Literal["", "own", "cluster"] = "",
) -> NoticeNode:
    """The node as the rollout recorded it, before and after ``change`` as ``notice_node``
    decides. The view's ``old_url``/``new_url`` are the node's address before and after the
    rollout's change (``rollout_core.before_after``), not this notice's: each is taken by its
    scheme (audit s39ws H1: a disable-tls notice sent the staff to the https port it had
    closed)."""
    port = n.bootstrap_port or BOOTSTRAP_PORT
    recorded = {_split(url)[0]: (url, port) for url in (n.old_url, n.new_url) if url}
    return notice_node(n.name, change, {**known, **recorded}, address, ca_pin, ca_change)


def _remind(with_password: bool) -> None:
    notes: Sequence[str] = [
        "the notice is a template (seed): adapt it to the practice before sending it"
    ]
    if with_password:
        notes = [*notes, "it contains the password: do not send it by e-mail"]
    for note in notes:
        click.echo(f"tlsroll: note: {note}", err=True)
    sys.stderr.flush()
