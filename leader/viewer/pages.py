"""The viewer's HTML, rendered on the leader with Jinja2 from the templates in this package.

``schema_page`` is the whole page; ``schema_content`` is the part a live update replaces
(``content_parts`` in parts: what ``/events`` sends, whole at first, then only the parts that
changed); ``denied_page`` is the 401 page that says how to get access; ``login_page`` is what a
login link answers (a link to sign in). Every value is escaped (autoescape), and nothing on any
page posts: there are links, and no forms.

A node's row and each timeline are drawn once per change of what they show, and kept
(``Drawn``): at 500 nodes, drawing every row and timeline again took 60 ms after each write of
a rollout, for each open page (issue 15); now a write costs the rows it changed.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
from markupsafe import Markup

from leader.mixed_cluster import NAMED
from leader.viewer.i18n import LANGS, Words
from leader.viewer.snapshot import OnHttp, Snapshot, Transition
from tlsroll.enums import SERVES_PREVIOUS

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("leader.viewer", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
# How a bootstrap problem that is no start's failure begins (``content.html``'s node problems).
_ENV.globals["SERVES_PREVIOUS"] = SERVES_PREVIOUS
# How many nodes a line names before it counts the rest (``leader.mixed_cluster``).
_ENV.globals["NAMED"] = NAMED


@dataclass(frozen=True)
class PageContext:
    """What a page says beside the snapshot: where it is and who looks."""

    address: str  # the leader's address, as the header shows it
    grant_name: str
    grant_until: dt.datetime
    events_url: str  # /events?… for this page's selection and language


# How many (language, rollout) pairs keep their drawn rows and timelines: the open pages'.
KEPT_DRAWINGS = 4
# Where the rows and the timelines go in a ``Content``'s frame (never in what a value draws:
# autoescape makes every "<" of a value "&lt;").
_ROWS = "<!--rows-->"
_DETAILS = "<!--timelines-->"
# The sections that are parts of their own (``Content.sections``), by element id: each is
# always on the page (empty, it says so), so that a change of it is a patch of it alone.
SECTIONS = ("still-on-http", "other-nodes")
# How many workstations the "still on http" section lists: the most recently seen, in its
# order; a line says how many more and where all are (`tlsroll schema show`). The count in
# each node's row, the section's ``data-count`` and the metrics' gauge count every one. At 1000
# workstations on http the section was 176 KiB a patch, drawn in 16-19 ms (review s63 v1 M1).
STILL_ON_HTTP_SHOWN = 100


def _section_mark(element_id: str) -> str:
    return f"<!--section:{element_id}-->"


@dataclass(frozen=True)
class Content:
    """The live part of the page (``content.html``) in parts: ``frame`` is the content with a
    placeholder where the rows go and one where the timelines go; ``rows`` and ``details`` the
    parts by their element id (each one element: a node's row, ``node-NAME``; a timeline,
    ``tl-rollout``, ``tl-node-NAME``), in the order of the page; ``sections`` the sections
    that are parts of their own (``SECTIONS``: who is still on http, the other nodes), each
    where its placeholder is. Two contents with the same frame and the same ids differ only in
    their parts, so a page that shows one becomes the other by replacing the parts that differ
    (``viewer.js``): a workstation seen on http, or a node's server switched, is a patch of
    its section, not the page whole."""

    frame: str
    rows: Mapping[str, str]
    details: Mapping[str, str]
    sections: Mapping[str, str] = field(default_factory=dict)

    def html(self) -> str:
        """The content whole."""
        html = self.frame.replace(_ROWS, "\n".join(self.rows.values()), 1).replace(
            _DETAILS, "\n".join(self.details.values()), 1
        )
        for key, part in self.sections.items():
            html = html.replace(_section_mark(key), part, 1)
        return html

    def changed(self, before: Content) -> list[tuple[str, str]] | None:
        """The parts that differ from ``before``'s, or None if the frame or the ids differ
        (the page must be replaced whole)."""
        if (
            self.frame != before.frame
            or list(self.rows) != list(before.rows)
            or list(self.details) != list(before.details)
            or list(self.sections) != list(before.sections)
        ):
            return None
        return [
            (key, html)
            for mine, theirs in (
                (self.rows, before.rows),
                (self.details, before.details),
                (self.sections, before.sections),
            )
            for key, html in mine.items()
            if theirs[key] != html
        ]


class Drawn:
    """Rows and timelines drawn, by (language, rollout): a node's row is drawn again only when
    its data changed (a new ``Snapshot`` shares the data of nodes that did not: ``Reader``);
    a timeline only when its transitions did."""

    def __init__(self) -> None:
        self._rows: OrderedDict[tuple[str, str], dict[str, tuple[Any, str]]] = OrderedDict()
        self._details: OrderedDict[tuple[str, str], dict[str, tuple[Any, str]]] = OrderedDict()
        # by (language, section id): what the section showed and its drawing (``sections``)
        self._sections: dict[tuple[str, str], tuple[Any, str]] = {}
        self.count = 0  # rows and timelines drawn (not taken from what was kept)

    def rows(self, snap: Snapshot, w: Words) -> dict[str, str]:
        """Each node's row of the selected rollout, by element id."""
        r = snap.selected
        if r is None:
            return {}
        kept = self._take(self._rows, (w.lang, r["id"]))
        fresh: dict[str, tuple[Any, str]] = {}
        out = {}
        for n in r["nodes"]:
            key = f"node-{n['name']}"
            hit = kept.get(key)
            if hit is None or (hit[0] is not n and hit[0] != n):
                # (the rollout's --when-quiet seconds: fixed at its start, as the cache's key)
                row = _ENV.get_template("node_row.html").render(
                    n=n, w=w, when_quiet=r.get("when_quiet_seconds", 0)
                )
                hit = (n, _narrow(row))
                self.count += 1
            fresh[key] = hit
            out[key] = hit[1]
        self._put(self._rows, (w.lang, r["id"]), fresh)
        return out

    def details(self, snap: Snapshot, w: Words) -> dict[str, str]:
        """The rollout's timeline and each node's, by element id."""
        r = snap.selected
        if r is None:
            return {}
        kept = self._take(self._details, (w.lang, r["id"]))
        fresh: dict[str, tuple[Any, str]] = {}
        out = {}
        for element_id, label, items in _timeline(snap, w):
            hit = kept.get(element_id)
            shown = (label, items)
            if hit is None or hit[0] != shown:
                html = _ENV.get_template("timeline_item.html").render(
                    element_id=element_id, label=label, items=items, w=w
                )
                hit = (shown, _narrow(html))
                self.count += 1
            fresh[element_id] = hit
            out[element_id] = hit[1]
        self._put(self._details, (w.lang, r["id"]), fresh)
        return out

    def sections(self, snap: Snapshot, w: Words) -> dict[str, str]:
        """The sections that are parts of their own (``SECTIONS``), by element id, each drawn
        again only when what it shows changed (``_section_shows``): who is still on http may
        be a thousand workstations at 500 nodes, and the page is drawn after each write."""
        out = {}
        for key in SECTIONS:
            shows = _section_shows(key, snap)
            hit = self._sections.get((w.lang, key))
            if hit is None or hit[0] != shows:
                template = _ENV.get_template(f"{key.replace('-', '_')}.html")
                listed, more = _on_http_listed(snap) if key == "still-on-http" else ((), 0)
                hit = (
                    shows,
                    _narrow(template.render(snap=snap, w=w, on_http=listed, on_http_more=more)),
                )
                self._sections[(w.lang, key)] = hit
            out[key] = hit[1]
        return out

    def clear(self) -> None:
        """Nothing kept (the last open page closed: ``ViewerApp.events``)."""
        self._rows.clear()
        self._details.clear()
        self._sections.clear()

    @staticmethod
    def _take(
        kept: OrderedDict[tuple[str, str], dict[str, tuple[Any, str]]], key: tuple[str, str]
    ) -> dict[str, tuple[Any, str]]:
        return kept.get(key, {})

    @staticmethod
    def _put(
        kept: OrderedDict[tuple[str, str], dict[str, tuple[Any, str]]],
        key: tuple[str, str],
        value: dict[str, tuple[Any, str]],
    ) -> None:
        kept[key] = value
        kept.move_to_end(key)
        while len(kept) > KEPT_DRAWINGS:
            kept.popitem(last=False)


def _narrow(html: str) -> str:
    """A part as it is kept (``Drawn``): stripped, and every character past Latin-1 (the
    words' "→" and "–", a reason's) as a character reference, which the browser shows as the
    character. Python keeps a string with one such character at two or four bytes a
    character: the timelines and most rows had one, ~1.6 MiB of the rows and timelines kept
    for a 500-node page, 0.9 MiB without (issue 15)."""
    html = html.strip()
    return html if html.isascii() else html.encode("latin-1", "xmlcharrefreplace").decode("latin-1")


# The pages are drawn one at a time (``ViewerApp._apart``): one ``Drawn`` for the process.
DRAWN = Drawn()


def _other(lang: str) -> str:
    return next(x for x in LANGS if x != lang)


def _timeline(snap: Snapshot, w: Words) -> list[tuple[str, str, tuple[Transition, ...]]]:
    """(element id, label, transitions): the rollout's own first, then each node's."""
    if snap.selected is None:
        return []
    rows = [("tl-rollout", w("timeline_rollout"), snap.timeline.get("", ()))]
    for n in snap.selected["nodes"]:
        rows.append((f"tl-node-{n['name']}", n["name"], snap.timeline.get(n["name"], ())))
    return rows


def _values(snap: Snapshot, w: Words, page: PageContext) -> dict[str, Any]:
    other = _other(w.lang)
    return {
        "snap": snap,
        "w": w,
        "page": {
            "address": page.address,
            "grant_name": page.grant_name,
            "grant_until": page.grant_until,
            "events_url": page.events_url,
            "other_lang": other,
            "other_lang_href": f"?lang={other}",
            "other_lang_words": w("lang_switch"),
        },
        # where ``Content.html`` puts the rows and timelines drawn (``Drawn``), and the
        # sections that are parts of their own (``_sections``)
        "rows": [Markup(_ROWS)],  # noqa: S704 - ours
        "details": [Markup(_DETAILS)],  # noqa: S704 - ours
        "sections": {key: Markup(_section_mark(key)) for key in SECTIONS},  # noqa: S704 - ours
        # ``expiry_warning_days``, as leader.toml has it (the server certificates' horizon)
        "near_days": f"{snap.warning / dt.timedelta(days=1):g}",
    }


def _on_http_listed(snap: Snapshot) -> tuple[tuple[OnHttp, ...], int]:
    """Who the "still on http" section lists (the ``STILL_ON_HTTP_SHOWN`` most recently seen,
    in the snapshot's order: by node, each node's most recent first), and how many it leaves
    out."""
    still = snap.still_on_http
    if len(still) <= STILL_ON_HTTP_SHOWN:
        return still, 0
    newest = set(
        heapq.nlargest(STILL_ON_HTTP_SHOWN, range(len(still)), key=lambda i: still[i].last_seen)
    )
    return tuple(c for i, c in enumerate(still) if i in newest), len(still) - STILL_ON_HTTP_SHOWN


def _section_shows(key: str, snap: Snapshot) -> Any:
    """What section ``key`` draws of ``snap`` (``Drawn.sections`` draws it again when that
    changed): not the heartbeats' ages and times, which change at every read.

    Who is still on http: who they are, and the minute of ``now``, not their last-seen times
    (drawn to the minute). Every node stores its client report at least every
    ``clients_persist`` (~30 s at a 5 s heartbeat), each moving the times of the workstations
    it lists: at 500 nodes, ~17 reports a second, so compared with its times the section was
    drawn again, and sent whole, at nearly every read, ~350 KiB/s for each open page for the
    whole transitional phase (review s63 v1 M1). Compared with each one's minute instead it
    would still change every second or so (a thousand workstations, each one's minute moving
    once a minute). So the times shown are those of the section's last drawing: redrawn at
    once when someone comes or goes, else at most once a minute, when it is a minute or less
    behind the store; the minute-of-now drawing is sent only if a time it shows moved."""
    if key == "still-on-http":
        return (
            snap.now.replace(second=0, microsecond=0),
            frozenset((c.node, c.address, c.workstation) for c in snap.still_on_http),
        )
    return (
        bool(snap.nodes),
        tuple(
            (
                n.name,
                n.addresses,
                n.server,
                n.online,
                snap.on_http_count(n.name),
                snap.last_rollouts.get(n.name),
            )
            for n in snap.other_nodes
        ),
        snap.mixed_on_http,
        snap.mixed_dual,
        tuple(sorted(snap.dual_left_by.items())),
        snap.mixed_other_certificate,
    )


def schema_page(snap: Snapshot, w: Words, page: PageContext) -> str:
    rows = DRAWN.rows(snap, w)
    details = DRAWN.details(snap, w)
    whole = _ENV.get_template("schema.html").render(_values(snap, w, page))
    return Content(whole, rows, details, DRAWN.sections(snap, w)).html()


def schema_content(snap: Snapshot, w: Words, page: PageContext) -> str:
    """The live part of the page, whole."""
    return content_parts(snap, w, page).html()


def content_parts(snap: Snapshot, w: Words, page: PageContext) -> Content:
    """The live part of the page, its rows and timelines as parts (see ``Content``)."""
    rows = DRAWN.rows(snap, w)
    details = DRAWN.details(snap, w)
    frame = _ENV.get_template("content.html").render(_values(snap, w, page))
    return Content(frame, rows, details, DRAWN.sections(snap, w))


def denied_page(w: Words, reason: str) -> str:
    """The 401 page; ``reason``: none | session | unknown | used | expired | revoked |
    signed_out (the session or its link, after its browser signed out); or, answered with
    403, cross_site (the sign-in URL from a link on another site); with 409, signed_in (a
    link's sign-in in a browser signed in by another)."""
    other = _other(w.lang)
    return _ENV.get_template("denied.html").render(
        w=w, reason=reason, other_lang=other, other_lang_words=w("lang_switch")
    )


def login_page(w: Words, open_url: str) -> str:
    """The page a login link answers: one link, to ``open_url``, which signs in."""
    other = _other(w.lang)
    return _ENV.get_template("login.html").render(
        w=w, open_url=open_url, other_lang=other, other_lang_words=w("lang_switch")
    )


def signed_out_page(w: Words) -> str:
    """The page the sign-out answers: the viewer was left, and how to come back."""
    return _ENV.get_template("signed_out.html").render(w=w)
