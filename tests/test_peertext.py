"""``tlsroll.peertext.clean``: what the leader keeps of text a peer sent. Its rules are tested
with the bootstrap failures (tests/test_bootstrap_failures.py); here: printable ASCII skips
the walk character by character, and the short cut gives what the walk gives for any text."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsroll import peertext
from tlsroll.enums import NEEDS_ADMIN


def walked(text: object, limit: int = 200) -> str:
    """``clean`` as it was before its short cut: every character looked at."""
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in str(text)[: limit * 4]
        if ch.isspace() or not unicodedata.category(ch).startswith("C")
    )
    line = " ".join(kept.split())
    return line if len(line) <= limit else line[: limit - 1] + peertext.ELLIPSIS


def test_printable_ascii_is_not_walked_character_by_character(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What an agent's heartbeat carries (addresses, workstation names, its version, its
    server's source) asks ``unicodedata`` nothing: a heartbeat cleaned half a dozen such
    strings one character at a time (issue 15)."""
    asked: list[str] = []

    class Counting:
        def category(self, ch: str) -> str:
            asked.append(ch)
            return unicodedata.category(ch)

    monkeypatch.setattr(peertext, "unicodedata", Counting())
    for text in ("10.0.3.7", "ws-003", "0.31.0", "refserver", "down: no  answer ", "x" * 300):
        assert peertext.clean(text, 64) == walked(text, 64)
    assert asked == []
    assert peertext.clean("a\x1bb\tc", 64) == "ab c"  # anything else still is
    assert asked


TEXT: Any = st.text(
    st.characters(max_codepoint=0x2FFF)
    | st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u202e"),
    max_size=60,
)


@given(TEXT, st.integers(1, 30))
def test_the_short_cut_gives_what_the_walk_gives(text: str, limit: int) -> None:
    assert peertext.clean(text, limit) == walked(text, limit)


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
def test_printable_ascii_keeps_what_the_walk_keeps(text: str) -> None:
    assert peertext.clean(text, 40) == walked(text, 40)


def test_a_node_views_detail_reaches_the_planner_cleaned() -> None:
    """Review s41rev3 L4: ``observation`` passed an unhealthy view's detail raw into the
    node's needs-admin text and its unreachable reason, which the CLI prints (``refused``) and
    the viewer shows: control characters and any length from the agent reached the terminal.
    Now cleaned and cut at 200 characters, as the heartbeat's detail is."""
    from leader.observe import observation
    from tlsroll import pki
    from tlsroll.v1 import agent_pb2

    ca = pki.CertificateAuthority.create().cert
    detail = f"{NEEDS_ADMIN}journal put back\x1b[2J\x1b]0;owned\x07 mid-switch " + "x" * 500
    seen = observation(agent_pb2.ServerView(healthy=False, detail=detail), ca)
    assert not seen.reachable
    assert seen.needs_admin.startswith(f"{NEEDS_ADMIN}journal put back"), seen.needs_admin
    assert seen.needs_admin.isprintable() and "\x1b" not in seen.needs_admin
    assert len(seen.needs_admin) <= 200
    assert seen.error == f"the managed server: {seen.needs_admin}"
