"""Who a managed server has seen lately, on which scheme ("who is still on http").

The reference server records its clients in a ``ClientLog``; the agent's drivers read them
(the reference server's admin socket, an ``exec`` command, a ``systemd`` server's access log)
into a ``ClientsView`` that the agent reports with the node's status and in its heartbeats.

One JSON shape serves the reference server's ``GET /admin/clients`` and the ``exec`` driver's
``clients`` command (README, "The managed server (drivers)")::

    {"window_seconds": 86400,
     "clients": [{"scheme": "http", "address": "192.168.1.20", "workstation": "ws-empfang",
                  "first_seen": "2026-11-30T07:01:02Z", "last_seen": "2026-11-30T07:05:00Z",
                  "requests": 12}]}

``clients`` is required; ``workstation`` may be empty or left out; ``requests`` defaults to 1;
times are ISO 8601 with a zone (or Unix seconds). An entry that breaks these rules is left out
and named in the view's ``problem``; a document that is not such an object is a ``ValueError``.

tlsroll's own probes (the agent's verify, the leader's confirm: ``tlsroll.httpcheck``) send
``User-Agent: tlsroll-check/…`` and are not clients: they are never recorded. The workstation's
checks before its new settings also mark their request line (``?tlsroll-check=VERSION`` after
the path, ``is_probe_request``): the common log format (an access log's default) records no
User-Agent, but every access log records the request line (session 75 probemark).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tlsroll.errors import TerminalError

SCHEMES = ("http", "https")
WINDOW_SECONDS = 24 * 3600  # default: who was seen in the last day
MAX_WINDOW_SECONDS = 31 * 24 * 3600
MAX_ENTRIES = 1024  # what a ClientLog keeps; the least recently seen goes first
MAX_REPORTED = 256  # what a ClientsView carries (agent.proto)
MAX_ADDRESS = 64
MAX_WORKSTATION = 63
MAX_PROBLEM = 200
MAX_REQUESTS = 2**62  # a count beyond it is shown as this
PROBE_AGENT = "tlsroll-check"  # the User-Agent product of tlsroll's own probes
WORKSTATION_HEADER = "X-Tlsroll-Workstation"  # the name a workstation says it has
# The names tlsroll gives workstations: tlsroll.bootstrap_protocol.WORKSTATION_CN (a test keeps
# them equal), not imported from there: the reference server must not load SPAKE2 to start.
WORKSTATION_CN = re.compile(r"ws-[a-z0-9]([a-z0-9-]{0,58}[a-z0-9])?")


@dataclass(frozen=True)
class ClientSeen:
    scheme: str
    address: str
    workstation: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    requests: int


@dataclass(frozen=True)
class ClientsView:
    """What a driver knows; ``source`` says how ("refserver", "exec", "access-log", or "" when
    the driver cannot tell), ``problem`` why the list is unknown or incomplete."""

    clients: tuple[ClientSeen, ...] = ()
    window_seconds: int = 0
    source: str = ""
    problem: str = ""


def is_probe(user_agent: str | None) -> bool:
    """True for tlsroll's own checks (never a workstation)."""
    return bool(user_agent) and str(user_agent).startswith(PROBE_AGENT + "/")


def is_probe_request(request_line: str | None) -> bool:
    """True for an access log's request line (``GET /app/?tlsroll-check=0.9 HTTP/1.1``) whose
    target carries the query parameter ``tlsroll-check`` (``httpcheck.probe_target``): one of
    tlsroll's own checks, told apart in a log without the User-Agent."""
    parts = (request_line or "").split()
    if len(parts) < 2:
        return False
    query = parts[1].partition("?")[2]
    return any(item.partition("=")[0] == PROBE_AGENT for item in query.split("&"))


def no_request(request_line: str | None) -> bool:
    """True for an access log line's request ``-`` (or none): a connection that sent no
    request (Apache's 408 for a connection opened and left idle, a TLS handshake and nothing
    after it), no client's request."""
    return request_line is not None and request_line.strip() in ("", "-")


def workstation_name(text: str | None) -> str:
    """``text`` if it is a workstation name tlsroll gives (``ws-…``), else ""."""
    if text and WORKSTATION_CN.fullmatch(text):
        return text
    return ""


class ClientLog:
    """Clients per (scheme, address, workstation) seen within ``window`` seconds; at most
    ``cap`` entries (memory stays bounded whatever the traffic): past it the least recently
    recorded goes first. Not thread-safe; the reference server uses it from its event loop."""

    def __init__(self, window: float = WINDOW_SECONDS, cap: int = MAX_ENTRIES) -> None:
        self.window = dt.timedelta(seconds=window)
        self.cap = cap
        self.evicted = 0
        self._seen: OrderedDict[tuple[str, str, str], ClientSeen] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def record(
        self, scheme: str, address: str, workstation: str, at: dt.datetime, requests: int = 1
    ) -> None:
        key = (scheme, address[:MAX_ADDRESS], workstation[:MAX_WORKSTATION])
        old = self._seen.pop(key, None)
        if old is None:
            entry = ClientSeen(*key, first_seen=at, last_seen=at, requests=requests)
        else:
            entry = ClientSeen(
                *key,
                first_seen=min(old.first_seen, at),
                last_seen=max(old.last_seen, at),
                requests=old.requests + requests,
            )
        self._seen[key] = entry  # most recently recorded last
        while len(self._seen) > self.cap:
            self._seen.popitem(last=False)
            self.evicted += 1

    def prune(self, now: dt.datetime) -> None:
        """Forget every client not seen within the window."""
        horizon = now - self.window
        for key in [k for k, e in self._seen.items() if e.last_seen < horizon]:
            del self._seen[key]

    def view(self, now: dt.datetime, limit: int = MAX_REPORTED) -> list[ClientSeen]:
        """The clients seen within the window, most recently seen first, at most ``limit``."""
        self.prune(now)
        return recent(self._seen.values(), now, self.window, limit)


def recent(
    clients: Iterable[ClientSeen], now: dt.datetime, window: dt.timedelta, limit: int
) -> list[ClientSeen]:
    """The clients seen within ``window`` before ``now``, most recently seen first (of two
    seen at the same time, the one given later first), at most ``limit``."""
    horizon = now - window
    kept = [c for c in reversed(list(clients)) if c.last_seen >= horizon]
    kept.sort(key=lambda c: c.last_seen, reverse=True)
    return kept[:limit]


# --- JSON ---------------------------------------------------------------------------------------


def _iso(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def to_json(clients: Iterable[ClientSeen], window_seconds: int) -> dict[str, Any]:
    return {
        "window_seconds": window_seconds,
        "clients": [
            {
                "scheme": c.scheme,
                "address": c.address,
                "workstation": c.workstation,
                "first_seen": _iso(c.first_seen),
                "last_seen": _iso(c.last_seen),
                "requests": c.requests,
            }
            for c in clients
        ],
    }


class _Bad(TerminalError, ValueError):
    """One malformed entry of a client list; it is left out and counted, never raised on."""


def _time(value: object, field: str) -> dt.datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise _Bad(f"{field} {value!r} is not a time") from None
    if isinstance(value, str):
        try:
            at = dt.datetime.fromisoformat(value)
        except ValueError:
            raise _Bad(f"{field} {value[:40]!r} is not an ISO 8601 time") from None
        if at.tzinfo is None:
            raise _Bad(f"{field} {value[:40]!r} has no time zone")
        try:
            return at.astimezone(dt.UTC)
        except OverflowError:  # year 1 or 9999 with an offset
            raise _Bad(f"{field} {value[:40]!r} is out of range") from None
    raise _Bad(f"{field} must be an ISO 8601 time or Unix seconds")


def _entry(raw: object) -> ClientSeen:
    if not isinstance(raw, Mapping):
        raise _Bad("not an object")
    scheme = raw.get("scheme")
    if scheme not in SCHEMES:
        raise _Bad(f'scheme {str(scheme)[:20]!r} is not "http" or "https"')
    address = raw.get("address")
    try:
        address = str(ipaddress.ip_address(address if isinstance(address, str) else ""))
    except ValueError:
        raise _Bad(f"address {str(address)[:40]!r} is not an IP address") from None
    workstation = raw.get("workstation") or ""
    if not isinstance(workstation, str) or len(workstation) > MAX_WORKSTATION:
        raise _Bad(f"workstation must be a text of at most {MAX_WORKSTATION} characters")
    if not workstation.isprintable():
        raise _Bad("workstation has characters that are not printable")
    requests = raw.get("requests", 1)
    if not isinstance(requests, int) or isinstance(requests, bool) or requests < 0:
        raise _Bad("requests must be a whole number, 0 or more")
    requests = min(requests, MAX_REQUESTS)  # the wire's uint64 holds no more
    last = _time(raw.get("last_seen"), "last_seen")
    first = _time(raw.get("first_seen"), "first_seen") if "first_seen" in raw else last
    return ClientSeen(str(scheme), address, workstation, min(first, last), last, requests)


def from_json(data: object) -> tuple[list[ClientSeen], int | None, str]:
    """Parse the documented shape: (clients, window_seconds or None, problem). ``ValueError``
    (one line) if ``data`` is not such an object; a malformed entry is left out and the first
    one is named in the problem."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON: {' '.join(str(exc).split())[:80]}") from None
    if not isinstance(data, Mapping):
        raise ValueError('expected a JSON object with "clients"')
    raw_clients = data.get("clients")
    if not isinstance(raw_clients, list):
        raise ValueError('"clients" must be a list')
    window = data.get("window_seconds")
    if window is not None and (
        not isinstance(window, int)
        or isinstance(window, bool)
        or not 0 < window <= MAX_WINDOW_SECONDS
    ):
        raise ValueError(f'"window_seconds" must be 1 to {MAX_WINDOW_SECONDS}')
    clients, bad, first_bad = [], 0, ""
    for i, raw in enumerate(raw_clients):
        try:
            clients.append(_entry(raw))
        except _Bad as exc:
            bad += 1
            first_bad = first_bad or f"clients[{i}]: {exc}"
    problem = f"{bad} malformed entries left out (first: {first_bad})" if bad else ""
    return clients, window, problem[:MAX_PROBLEM]


NOT_QUIET = "not quiet:"
"""How an agent's refusal of a ``finalize --when-quiet`` switch begins (``quiet_refusal``): the
leader tells it from any other refusal by these words, and puts the node back to wait."""


def quiet_refusal(view: ClientsView, now: dt.datetime, quiet_seconds: int) -> str | None:
    """Why a switch that closes http must not begin now under ``--when-quiet quiet_seconds``,
    read from ``view`` (the server's clients, read afresh): a client seen on http within that
    time (the most recent), or a view that cannot tell who was (no source, or a problem): the
    gate's rule (``leader.planner.held_for_quiet``), applied where the sightings are, just
    before the freeze. None: quiet."""
    if not view.source or view.problem:
        why = view.problem or "the server's driver cannot tell who it has seen"
        return f"{NOT_QUIET} who is on http cannot be told: {why}"[:MAX_PROBLEM]
    horizon = now - dt.timedelta(seconds=quiet_seconds)
    http = [c for c in view.clients if c.scheme == "http" and c.last_seen >= horizon]
    if not http:
        return None
    last = max(http, key=lambda c: c.last_seen)
    who = f"{last.workstation} ({last.address})" if last.workstation else last.address
    ago = max(0, int((now - last.last_seen).total_seconds()))
    return (
        f"{NOT_QUIET} {who} was seen on http {ago}s ago, within --when-quiet {quiet_seconds}s;"
        " http stays open"
    )


def https_matches(seen: Sequence[tuple[str, str, str]]) -> dict[int, list[int]]:
    """Which https sightings each http one of ``seen`` (one node's sightings: scheme, address,
    workstation) is judged against by "who is still on http" (by index): a named one, those
    of its workstation name, wherever from; an unnamed one, the unnamed ones from its address
    and, where exactly one workstation name was seen from that address (on either scheme),
    those of that workstation, wherever from: a PC whose http requests carry no
    ``X-Tlsroll-Workstation`` header and whose https ones its client certificate names is one
    client, not two (it stayed "still on http" for the agent's whole window: session 68). An
    address from which two or more names were seen (a terminal server, NAT) is shared: its
    unnamed http sightings are judged against its unnamed https ones only. An unnamed https
    sighting never stands for a named workstation. README, "Transitional rollout", step 2."""
    names: dict[str, set[str]] = {}
    by_name: dict[str, list[int]] = {}
    unnamed_at: dict[str, list[int]] = {}
    for i, (scheme, address, workstation) in enumerate(seen):
        if workstation:
            names.setdefault(address, set()).add(workstation)
        if scheme == "https":
            if workstation:
                by_name.setdefault(workstation, []).append(i)
            else:
                unnamed_at.setdefault(address, []).append(i)
    matches: dict[int, list[int]] = {}
    for i, (scheme, address, workstation) in enumerate(seen):
        if scheme != "http":
            continue
        if workstation:
            matches[i] = by_name.get(workstation, [])
            continue
        named = names.get(address, set())
        (one,) = named if len(named) == 1 else ("",)
        matches[i] = unnamed_at.get(address, []) + (by_name.get(one, []) if one else [])
    return matches


def used_http_after_https(
    seen: Iterable[tuple[str, str, str, tuple[int, int], tuple[int, int]]],
) -> frozenset[str]:
    """Of ``seen`` (one node's sightings: scheme, address, workstation, first_seen, last_seen;
    times as (seconds, nanos)), the http ones (their workstation name where known, else their
    address) whose last request came after the first of the https sightings they are judged
    against (``https_matches``): not switched (the leader's ``rollout_core.still_on_http``; a
    tie counts as switched). What makes a client's going back to http news in a report (the
    agent's ``report_key``, the leader's ``clients_said``): the times alone move with every
    request and are not, so a revert that moves only the http ``last_seen`` waited for the
    stored copy to age. It changes once per revert (or switch), not per request."""
    rows = list(seen)
    back = set()
    for i, matched in https_matches([(r[0], r[1], r[2]) for r in rows]).items():
        if matched and rows[i][4] > min(rows[j][3] for j in matched):
            back.add(rows[i][2] or rows[i][1])
    return frozenset(back)
