"""The viewer's HTML, rendered on the leader with Jinja2 from the templates in this package.

``schema_page`` is the whole page; ``schema_content`` is the part a live update replaces (what
``/events`` sends); ``denied_page`` is the 401 page that says how to get access; ``login_page``
is what a login link answers (a link to sign in). Every value
is escaped (autoescape), and nothing on any page posts: there are links, and no forms.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import jinja2

from leader.viewer.i18n import LANGS, Words
from leader.viewer.snapshot import NEAR_EXPIRY, Snapshot, Transition

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("leader.viewer", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class PageContext:
    """What a page says beside the snapshot: where it is and who looks."""

    address: str  # the leader's address, as the header shows it
    grant_name: str
    grant_until: dt.datetime
    events_url: str  # /events?… for this page's selection and language


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
        "timeline": _timeline(snap, w),
        "near_days": NEAR_EXPIRY.days,
    }


def schema_page(snap: Snapshot, w: Words, page: PageContext) -> str:
    return _ENV.get_template("schema.html").render(_values(snap, w, page))


def schema_content(snap: Snapshot, w: Words, page: PageContext) -> str:
    return _ENV.get_template("content.html").render(_values(snap, w, page))


def denied_page(w: Words, reason: str) -> str:
    """The 401 page; ``reason``: none | session | unknown | used | expired | revoked."""
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
