"""The maintenance window and the automatic rotation's decision (pure: data in, data out).

``maintenance_window`` in leader.toml says when the leader may restart the practice's servers by
itself (``auto_rotate = true``): one string or a list of them, each ``DAYS HH:MM-HH:MM`` in the
zone ``maintenance_timezone`` names (an IANA name), else the leader host's local time::

    maintenance_window = "Sat 02:00-05:00"
    maintenance_window = ["Mon-Fri 22:00-01:00", "Sun 03:00-04:00"]   # weekdays cross midnight
    maintenance_timezone = "Europe/Berlin"                              # default: the host's

DAYS is ``Mon``..``Sun`` (or the full English name), a range ``Mon-Fri`` (``Fri-Mon`` wraps
the week), several of these separated by commas, or ``daily``. An end before the start runs
into the next day: ``Sat 22:00-02:00`` is Saturday 22:00 to Sunday 02:00. ``24:00`` is
midnight at the end of the day.

Wall-clock time is compared, not elapsed time, because that is how an admin thinks of "Saturday
02:00 to 05:00". On the day daylight saving time starts, a window over the skipped hour is that
much shorter (in Europe/Berlin, ``Sun 02:00-04:00`` on the last Sunday of March is open 03:00 to
04:00 CEST); on the day it ends, a window over the repeated hour is open through both passes.
The time it opens next (``next_opening``) is an instant, shown with its UTC offset: the first
moment the window is open, so in that spring night ``Sun 02:00-04:00`` opens at 03:00+02:00.

``decide`` is what the expiry watch does with the server certificates inside their horizon
(``leader.auto_rotate`` runs it and does the I/O).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from tlsroll.errors import TerminalError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_ENTRY = re.compile(r"\s*(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*")
MINUTES_PER_DAY = 24 * 60


class WindowError(TerminalError, ValueError):
    """A maintenance window that cannot be read; the message says what is wrong and shows the
    form (the config loader adds the file and the key)."""


@dataclass(frozen=True)
class Span:
    """Open from ``start`` (minutes after midnight) on ``weekday`` (0 = Monday) for
    ``minutes``; it may run into the next day."""

    weekday: int
    start: int
    minutes: int


@dataclass(frozen=True)
class Window:
    text: str  # as the admin wrote it, for the schema and the log
    spans: tuple[Span, ...]


def _day(name: str, entry: str) -> int:
    key = name.strip().lower()
    if key in DAYS:
        return DAYS.index(key)
    if key in FULL_DAYS:
        return FULL_DAYS.index(key)
    raise WindowError(f"{entry!r}: unknown day {name!r} (Mon, Tue, Wed, Thu, Fri, Sat, Sun)")


def _days(text: str, entry: str) -> list[int]:
    if text.lower() in ("daily", "*"):
        return list(range(7))
    found: list[int] = []
    for part in text.split(","):
        if not part:
            raise WindowError(f"{entry!r}: an empty day in {text!r}")
        if "-" in part:
            first, _, last = part.partition("-")
            a, b = _day(first, entry), _day(last, entry)
            found += [(a + i) % 7 for i in range((b - a) % 7 + 1)]
        else:
            found.append(_day(part, entry))
    return sorted(set(found))


def _minutes(text: str, entry: str) -> int:
    hours, minutes = (int(x) for x in text.split(":"))
    if not (0 <= hours <= 24 and 0 <= minutes <= 59) or (hours == 24 and minutes):
        raise WindowError(f"{entry!r}: {text} is not a time of day (00:00 to 24:00)")
    return hours * 60 + minutes


def parse_window(value: str | Sequence[str]) -> Window:
    """The window from the config's string or list of strings; WindowError if it cannot be
    read (no entry, an unknown day, a bad time, or an empty span such as 03:00-03:00)."""
    entries = [value] if isinstance(value, str) else list(value)
    if not entries:
        raise WindowError('no window given; e.g. "Sat 02:00-05:00"')
    spans: list[Span] = []
    for entry in entries:
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise WindowError(f'{entry!r} is not DAYS HH:MM-HH:MM, e.g. "Sat 02:00-05:00"')
        start = _minutes(m["start"], entry)
        end = _minutes(m["end"], entry)
        if start == MINUTES_PER_DAY:
            raise WindowError(f"{entry!r}: a window cannot start at 24:00; write 00:00")
        if start == end:
            raise WindowError(f"{entry!r}: the window is empty (it starts where it ends)")
        length = (end - start) % MINUTES_PER_DAY or MINUTES_PER_DAY
        spans += [Span(day, start, length) for day in _days(m["days"], entry)]
    text = value if isinstance(value, str) else ", ".join(value)
    return Window(text, tuple(spans))


def in_window(window: Window, local: dt.datetime) -> bool:
    """Whether the wall-clock time ``local`` is inside the window: naive, or aware in the
    window's zone (``maintenance_timezone``, else the host's); its fields are what counts."""
    now = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60
    today = local.weekday()
    for span in window.spans:
        # Minutes since the span's start, had it started on its weekday this week or last.
        since = ((today - span.weekday) % 7) * MINUTES_PER_DAY + now - span.start
        if 0 <= since < span.minutes:
            return True
    return False


def _rules(local: dt.datetime) -> dt.tzinfo | None:
    """The zone rules of ``local``: its own if it has them (a ``ZoneInfo``), else None, the
    host's (``TZ``): ``datetime.now().astimezone()``, the host's clock, has a fixed offset
    only, and a naive time is the host's local time."""
    zone = local.tzinfo
    return None if zone is None or isinstance(zone, dt.timezone) else zone


def _utc(local: dt.datetime, rules: dt.tzinfo | None = None, fold: int = 0) -> dt.datetime:
    """``local`` as an instant in UTC; a naive one is a wall-clock time under ``rules`` (None:
    the host's), ``fold`` picking the pass of a time the clocks go back over."""
    if local.tzinfo is None:
        if rules is None:
            return local.replace(fold=fold).astimezone(dt.UTC)
        return local.replace(tzinfo=rules, fold=fold).astimezone(dt.UTC)
    return local.astimezone(dt.UTC)


def _shown(instant: dt.datetime, rules: dt.tzinfo | None) -> dt.datetime:
    """``instant`` on the wall clock of ``rules`` (None: the host's), aware, with the offset
    in force then."""
    return instant.astimezone() if rules is None else instant.astimezone(rules)


def _wall(instant: dt.datetime, rules: dt.tzinfo | None) -> dt.datetime:
    return _shown(instant, rules).replace(tzinfo=None, fold=0)


def _instants(wall: dt.datetime, rules: dt.tzinfo | None) -> list[dt.datetime]:
    """The instants (UTC) the wall clock reaches the naive ``wall``: one; two in the hour the
    clocks go back over; in the hour they skip, the moment they skip it (the first at which
    the wall clock is past ``wall``)."""
    first = _utc(wall, rules, fold=0)
    if _wall(first, rules) == wall:
        second = _utc(wall, rules, fold=1)
        return [first] if second == first else sorted({first, second})
    # Skipped: bisect (whole seconds) for the first instant whose wall clock is not before
    # ``wall``; the skip lies within a day of either reading of it.
    lo = int(first.timestamp()) - 90000
    hi = int(first.timestamp()) + 90000
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(dt.datetime.fromtimestamp(mid, dt.UTC), rules) >= wall:
            hi = mid
        else:
            lo = mid
    return [dt.datetime.fromtimestamp(hi, dt.UTC)]


def next_opening(window: Window, local: dt.datetime) -> dt.datetime | None:
    """The next instant after ``local`` at which the window opens, aware, on ``local``'s wall
    clock with the offset in force then (``2026-12-05T02:00+01:00``); None if it is never
    closed (e.g. ``daily 00:00-24:00``). The zone's rules are ``local``'s own if it has them,
    else the host's (see ``_rules``). An opening in the hour the clocks skip is the moment
    they skip it if the window is still open then (wall-clock time; one that lies wholly in
    the skipped hour does not open that night); one in the hour they go back over is its
    first pass, or its second if the window closed in between."""
    rules = _rules(local)
    now = _utc(local, rules)
    midnight = _wall(now, rules).replace(hour=0, minute=0, second=0, microsecond=0)
    found: list[dt.datetime] = []
    for span in window.spans:
        for ahead in range(8):
            day = midnight + dt.timedelta(days=ahead)
            if day.weekday() != span.weekday:
                continue
            for at in _instants(day + dt.timedelta(minutes=span.start), rules):
                before = _wall(at - dt.timedelta(minutes=1), rules)
                # Open at ``at`` too: a window that lies wholly in the skipped hour never opens
                # that night, though ``at`` (the skip) follows a closed minute.
                opens = in_window(window, _wall(at, rules))
                if at > now and opens and not in_window(window, before):
                    found.append(at)
    return _shown(min(found), rules) if found else None


def seconds_until(opening: dt.datetime, local: dt.datetime) -> float:
    """Elapsed seconds from ``local`` (now) to ``opening`` (``next_opening``'s, aware): across a
    change of daylight saving time the hour gained or lost counts (Saturday 12:00 to Sunday
    04:00 in Europe/Berlin on the night summer time ends is 17 hours). A naive ``local`` is
    the host's local time."""
    return (opening.astimezone(dt.UTC) - _utc(local)).total_seconds()


# --- the automatic rotation -------------------------------------------------------------------


class Verdict(StrEnum):
    """What one check of ``auto_rotate`` decided (the schema shows it)."""

    OFF = "off"  # auto_rotate = false
    NOTHING_DUE = "nothing-due"  # no server certificate is within its horizon
    OUTSIDE_WINDOW = "outside-window"
    BUSY = "busy"  # a rollout is active; never two at once
    HELD = "held"  # the last automatic rotation did not complete; an admin looks first
    # A transitional rollout waits for the admin's finalize; its dual nodes cannot be rotated.
    WAITS_FINALIZE = "waits-finalize"
    START = "start"
    STARTED = "started"  # (set by the caller once the rollout is created)
    BLOCKED = "blocked"  # (set by the caller: the plan was refused, with its reason)


@dataclass(frozen=True)
class LastRollout:
    """The newest rollout: its id, state, and whether ``auto_rotate`` started it."""

    id: str
    state: str
    automatic: bool


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    nodes: tuple[str, ...] = ()  # the nodes to rotate (START), or those due
    reason: str = ""


ENDED_BADLY = ("halted", "aborted")


def decide(
    *,
    enabled: bool,
    window: Window | None,
    local: dt.datetime,
    due: Sequence[str],
    active: str | None,
    latest: LastRollout | None,
    foreign: Sequence[str] = (),
    finalize_waits: bool = False,
) -> Decision:
    """Whether to start a ``rotate-cert`` rollout of the nodes ``due`` (server certificates
    within their horizon) now.

    Outside the window nothing happens, whatever is due. An active rollout (``active``: its id)
    is never joined by a second one. An automatic rotation that halted or was aborted is not
    tried again by itself: the same node would most likely fail the same way at every check,
    restarting the practice's servers each time; it waits until an admin has started a rollout
    (``tlsroll rollout retry`` or a new one).

    ``foreign``: due nodes whose live certificate the cluster CA did not issue (the practice's
    own, from ``--cert-dir``). They are never rotated automatically, which would replace the
    practice's certificate with a cluster one behind the admin's back; the reason names them
    and what to do.

    ``finalize_waits``: the active rollout is a transitional one that waits for the admin's
    finalize. Its nodes serve both schemes (``dual``) and a rotation refuses them until then,
    so nothing starts however long it waits; the reason says whose move it is, or a due
    certificate could expire behind a "busy" that looks like the leader's own business."""
    nodes = tuple(sorted(set(due) - set(foreign)))
    if not enabled or window is None:
        return Decision(Verdict.OFF, nodes)
    decision = _decide(window, local, nodes, active, latest, finalize_waits)
    own = sorted(set(foreign))
    if not own:
        return decision
    note = (
        f"left alone (they serve the practice's own certificates): {', '.join(own)}; renew "
        "those and run: tlsroll rollout start --change rotate-cert --nodes "
        f"{','.join(own)} --cert-dir DIR"
    )
    return replace(decision, reason=f"{decision.reason}; {note}" if decision.reason else note)


def _decide(
    window: Window,
    local: dt.datetime,
    nodes: tuple[str, ...],
    active: str | None,
    latest: LastRollout | None,
    finalize_waits: bool,
) -> Decision:
    if not nodes:
        return Decision(Verdict.NOTHING_DUE)
    if not in_window(window, local):
        return Decision(Verdict.OUTSIDE_WINDOW, nodes, f"outside the window {window.text}")
    if active is not None and finalize_waits:
        return Decision(
            Verdict.WAITS_FINALIZE,
            nodes,
            f"rollout {active} waits for its finalize (its nodes serve http and https); "
            f"nothing is rotated until then: tlsroll rollout finalize {active}",
        )
    if active is not None:
        return Decision(Verdict.BUSY, nodes, f"rollout {active} is active")
    if latest is not None and latest.automatic and latest.state in ENDED_BADLY:
        return Decision(
            Verdict.HELD,
            nodes,
            f"the automatic rotation {latest.id} ended {latest.state}; see `tlsroll schema "
            f"show --rollout {latest.id}`, then `tlsroll rollout retry` (or start one)",
        )
    return Decision(Verdict.START, nodes)
