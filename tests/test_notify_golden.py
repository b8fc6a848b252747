"""Golden files of the "Notify practice" message: every change (enable-tls, change-password,
rotate-cert, disable-tls) at every point (announced, running, done) in German and English, each
format (text, markdown, html), with and without the password, and the odd cases (a first switch
whose app path no agent has reported yet, a range over midnight, a range over the change to
summer time, a rollout that left nodes unchanged, one node on its own port, two nodes on different
bootstrap ports).

The files are in ``tests/data/notify/``, named ``<case>.<lang>.<ext>``. After a deliberate
change of wording, regenerate them and read the diff sentence by sentence before committing:

    TLSROLL_REGEN_GOLDEN=1 .venv/bin/pytest -p no:cacheprovider -n 0 tests/test_notify_golden.py

A run without the variable fails on any difference and on a file no case makes any more.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import zoneinfo
from dataclasses import replace
from pathlib import Path

import pytest

from leader.cli.notify import NoticeInfo, NoticeNode, Timing, render_notice

DATA = Path(__file__).parent / "data" / "notify"
REGEN = os.environ.get("TLSROLL_REGEN_GOLDEN") == "1"
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
PIN = "sha256:" + "3f" * 32
PASSWORD = "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"
EXT = {"text": "txt", "markdown": "md", "html": "html"}

HTTP = ("http://192.168.1.5:8080/praxis_live/", "http://192.168.1.6:8080/praxis_live/")
HTTPS = ("https://192.168.1.5:8443/praxis_live/", "https://192.168.1.6:8443/praxis_live/")
NAMES = ("praxis-server", "labor-server")


def nodes(change: str) -> tuple[NoticeNode, ...]:
    pairs = {
        "enable-tls": zip(HTTP, HTTPS, strict=True),
        "disable-tls": zip(HTTPS, HTTP, strict=True),
    }.get(change, zip(HTTPS, HTTPS, strict=True))
    return tuple(NoticeNode(name, old, new) for name, (old, new) in zip(NAMES, pairs, strict=True))


def at(day: int, hour: int, minute: int, month: int = 12) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, minute, tzinfo=BERLIN)


TIMINGS = {
    "announced": Timing("announced", at(5, 18, 0), at(5, 18, 30)),
    "running": Timing("running", at(5, 18, 2)),
    "done": Timing("done", at(5, 18, 2), at(5, 18, 9)),
}


def info(change: str, phase: str, **changes: object) -> NoticeInfo:
    base: dict[str, object] = {
        "practice": "Praxis Dr. Muster",
        "nodes": nodes(change),
        "ca_pin": PIN,
        "password_source": "persönlich bei Frau Beispiel",
        "contact": "Frau Beispiel (Praxis-IT), Tel. 0123 456789",
        "timing": TIMINGS[phase],
        "change": change,
    }
    base.update(changes)
    return NoticeInfo(**base)  # type: ignore[arg-type]


CHANGES = ("enable-tls", "change-password", "rotate-cert", "disable-tls")
PHASES = ("announced", "running", "done")

# case name -> (info, fmt, password)
CASES: dict[str, tuple[NoticeInfo, str, str | None]] = {}
for _change in CHANGES:
    for _phase in PHASES:
        CASES[f"{_change}.{_phase}"] = (info(_change, _phase), "text", None)
    for _fmt in ("markdown", "html"):
        CASES[f"{_change}.announced.{_fmt}"] = (info(_change, "announced"), _fmt, None)
for _change, _phase in (("enable-tls", "done"), ("change-password", "announced")):
    for _fmt in ("text", "html"):
        CASES[f"{_change}.{_phase}.password.{_fmt}"] = (info(_change, _phase), _fmt, PASSWORD)
CASES["enable-tls.announced.path-unknown"] = (
    info(
        "enable-tls",
        "announced",
        nodes=(
            NoticeNode(
                "praxis-server",
                "http://192.168.1.5:8080/…",
                "https://192.168.1.5:8443/…",
                path_known=False,
            ),
        ),
        scope="local",
        timing=Timing("announced", at(5, 18, 0)),
    ),
    "text",
    None,
)
CASES["enable-tls.announced.over-midnight"] = (
    info("enable-tls", "announced", timing=Timing("announced", at(5, 23, 30), at(6, 0, 30))),
    "text",
    None,
)
CASES["enable-tls.announced.summer-time"] = (
    info(
        "enable-tls",
        "announced",
        timing=Timing("announced", at(29, 1, 30, month=3), at(29, 3, 30, month=3)),
    ),
    "text",
    None,
)
CASES["enable-tls.done.partly"] = (
    info(
        "enable-tls",
        "done",
        nodes=nodes("enable-tls")[:1],
        unchanged=("labor-server",),
        timing=Timing("done", at(5, 18, 2), at(5, 18, 2)),
        scope="nodes",
    ),
    "text",
    None,
)
CASES["enable-tls.done.own-port.markdown"] = (
    info(
        "enable-tls",
        "done",
        nodes=(NoticeNode("praxis-server", HTTP[0], HTTPS[0], bootstrap_port=9543),),
        practice="Praxis *Dr.* [Muster](http://evil) <b>",
    ),
    "markdown",
    None,
)
# Audit s39ws H2: two nodes, the second on its own bootstrap port: a command per node.
CASES["change-password.announced.own-port"] = (
    info(
        "change-password",
        "announced",
        nodes=(
            NoticeNode(NAMES[0], HTTPS[0], HTTPS[0]),
            NoticeNode(NAMES[1], HTTPS[1], HTTPS[1], bootstrap_port=9543),
        ),
    ),
    "text",
    None,
)
CASES["enable-tls.done.escaping.html"] = (
    info(
        "enable-tls",
        "done",
        practice='Praxis <script>alert("x")</script> & Co',
        contact="<a href='http://evil'>IT</a>",
        extra=("Parkplatz: Hof <hinten>",),
    ),
    "html",
    None,
)
# The transitional strategy (issue 12): http stays beside https until finalize.
for _phase in ("running", "done"):
    CASES[f"enable-tls.transitional.{_phase}"] = (
        info("enable-tls", _phase, transitional=True, until=at(12, 18, 0)),
        "text",
        None,
    )
CASES["enable-tls.transitional.open"] = (
    info("enable-tls", "done", transitional=True),
    "text",
    None,
)

# A practice's own certificates (``--cert-dir``): session 56's second README walk, H2.
OWN = "sha256:" + "a7" * 32
OWN2 = "sha256:" + "5c" * 32
CASES["enable-tls.done.own-ca"] = (
    info("enable-tls", "done", nodes=tuple(replace(n, ca_pin=OWN) for n in nodes("enable-tls"))),
    "text",
    None,
)
CASES["change-password.announced.own-ca-on-one"] = (
    info(
        "change-password",
        "announced",
        nodes=(NoticeNode(NAMES[0], HTTPS[0], HTTPS[0], ca_pin=OWN), nodes("x")[1]),
    ),
    "text",
    None,
)
for _phase in ("announced", "done"):
    CASES[f"rotate-cert.{_phase}.to-own-ca"] = (
        info(
            "rotate-cert",
            _phase,
            nodes=tuple(replace(n, ca_pin=OWN2, ca_change="own") for n in nodes("rotate-cert")),
        ),
        "text",
        None,
    )
CASES["rotate-cert.done.back-to-cluster-ca"] = (
    info(
        "rotate-cert",
        "done",
        nodes=tuple(replace(n, ca_change="cluster") for n in nodes("rotate-cert")),
    ),
    "text",
    None,
)
CASES["rotate-cert.announced.mixed"] = (
    info(
        "rotate-cert",
        "announced",
        nodes=(
            NoticeNode(NAMES[0], HTTPS[0], HTTPS[0], ca_pin=OWN2, ca_change="own"),
            NoticeNode(NAMES[1], HTTPS[1], HTTPS[1], ca_change="cluster"),
            NoticeNode("archiv-server", HTTPS[1].replace(".6", ".7"), HTTPS[1].replace(".6", ".7")),
        ),
    ),
    "text",
    None,
)

# Some servers of several (scope local or nodes): the workstations of the others keep their
# address, and only those that use an old one switch (session 64's review M1).
OTHERS = (
    NoticeNode("labor-server", HTTP[1], HTTP[1]),
    NoticeNode("archiv-server", "http://192.168.1.7:8080/…", "", path_known=False),
)
for _phase in ("announced", "running", "done"):
    CASES[f"enable-tls.{_phase}.local"] = (
        info("enable-tls", _phase, nodes=nodes("enable-tls")[:1], others=OTHERS, scope="local"),
        "text",
        None,
    )
CASES["enable-tls.announced.nodes"] = (
    info(
        "enable-tls",
        "announced",
        nodes=(
            NoticeNode(
                "archiv-server",
                "http://192.168.1.7:8080/…",
                "https://192.168.1.7:8443/…",
                path_known=False,
            ),
        ),
        others=(NoticeNode(NAMES[0], HTTPS[0], HTTPS[0]), NoticeNode(NAMES[1], HTTP[1], HTTP[1])),
        scope="nodes",
    ),
    "text",
    None,
)
CASES["enable-tls.done.nodes"] = (
    info(
        "enable-tls",
        "done",
        others=(NoticeNode("archiv-server", "http://192.168.1.7:8080/…", "", path_known=False),),
        scope="nodes",
    ),
    "text",
    None,
)

# A transitional rollout whose finalize closed http on one node and not yet on the other:
# running (a --when-quiet one may wait days for quiet there), and aborted part way
# (session 64's review M2').
_CLOSED = (replace(nodes("enable-tls")[0], closed=at(7, 3, 12)), nodes("enable-tls")[1])
CASES["finalize.running"] = (
    info(
        "enable-tls",
        "done",
        nodes=_CLOSED,
        transitional=True,
        until=at(12, 18, 0),
        closing=True,
    ),
    "text",
    None,
)
CASES["finalize.partly"] = (
    info("enable-tls", "done", nodes=_CLOSED, transitional=True),
    "text",
    None,
)


def golden(case: str, lang: str) -> Path:
    return DATA / f"{case}.{lang}.{EXT[CASES[case][1]]}"


@pytest.mark.parametrize("lang", ["de", "en"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_notice_matches_its_golden_file(case: str, lang: str) -> None:
    notice, fmt, password = CASES[case]
    if lang == "en":  # what an English-speaking admin would have typed
        notice = dataclasses.replace(
            notice,
            password_source="in person from Ms Example",
            contact=notice.contact.replace("Frau Beispiel", "Ms Example").replace("Tel.", "phone"),
        )
    text = render_notice(notice, lang=lang, fmt=fmt, password=password)
    path = golden(case, lang)
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing: regenerate (see this module's docstring)"
    assert text == path.read_text(encoding="utf-8"), (
        f"{path.name} differs: review the text, then regenerate (see this module's docstring)"
    )


def test_no_stale_golden_files() -> None:
    expected = {golden(case, lang).name for case in CASES for lang in ("de", "en")}
    present = {p.name for p in DATA.iterdir()} if DATA.exists() else set()
    if REGEN:
        for name in present - expected:
            (DATA / name).unlink()
        present &= expected
    assert present == expected
