"""Text a peer sent, made safe to store and print: no control characters, one line, bounded."""

from __future__ import annotations

import unicodedata

ELLIPSIS = "…"


READ_FACTOR = 4  # ``clean`` reads at most this many characters per character it keeps


def clean(text: object, limit: int = 200) -> str:
    """``text`` without control or format characters (C0/C1, bidi overrides, …), its white
    space collapsed to single spaces, and at most ``limit`` characters (``…`` marks a cut).

    Printable ASCII (what agents send nearly always: addresses, names, versions) has no
    character to drop and no white space but the plain space, so it skips the walk character
    by character (a heartbeat cleans half a dozen strings: issue 15)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    head = str(text)[: limit * READ_FACTOR]
    if head.isascii() and head.isprintable():
        kept = head
    else:
        kept = "".join(
            " " if ch.isspace() else ch
            for ch in head
            if ch.isspace() or not unicodedata.category(ch).startswith("C")
        )
    line = " ".join(kept.split())
    if len(line) > limit:
        return line[: limit - 1] + ELLIPSIS
    return line
