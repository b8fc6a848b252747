"""Text a peer sent, made safe to store and print: no control characters, one line, bounded."""

from __future__ import annotations

import unicodedata

ELLIPSIS = "…"


def clean(text: object, limit: int = 200) -> str:
    """``text`` without control or format characters (C0/C1, bidi overrides, …), its white
    space collapsed to single spaces, and at most ``limit`` characters (``…`` marks a cut)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in str(text)[: limit * 4]
        if ch.isspace() or not unicodedata.category(ch).startswith("C")
    )
    line = " ".join(kept.split())
    if len(line) > limit:
        return line[: limit - 1] + ELLIPSIS
    return line
