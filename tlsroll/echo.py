"""What a message may say of the input it refuses: one line, bounded, never a secret.

    shown("ab\\ncd")        "'ab\\\\ncd'"                          (escaped: still one line)
    shown("A" * 100_000)   "'AAAA…' (100000 characters)"          (at most ``LIMIT`` of it)
    shown(join_token)      "<a join token (id abc123; its secret not shown)>"

Every message that repeats what an administrator typed (an id, a name, a path, a value), the
admin CLI's and the leader's gRPC details alike, renders it with ``shown`` (review s47rtin L5):
a newline or an escape sequence in an argument can no longer split the CLI's one-line error
or move the terminal's cursor, and a 100 KB argument comes back as 80 characters.

tlsroll's own secrets have fixed shapes, recognised here (``secret_kind``) so that one pasted
where an id belongs is never repeated (review s47rtin L8): stderr of scripts often ends up in
logs. The shapes, kept in step with their makers by tests/test_cli_echo.py:

- a join token ``<id>.<secret>`` (``leader.tokens``: 6 of ``[a-z0-9]``, 26 of base32);
- a 256-bit ``secrets.token_urlsafe(32)``: a viewer login link's secret (``leader.viewer.
  grants``; the link ``https://…/login/<secret>`` holds one), and the same shape's session
  ids, CA passphrases and bootstrap exchanges;
- a generated auth password (``tlsroll.password.generate_password``: 6 groups of 4).

Free text an administrator gives for the leader to store and list again (a token's
description, a viewer grant's name, a revocation's reason) must hold none of them
(``free_text_problem``): the CLI and the leader's Admin service refuse it.

``scrub`` replaces any such shape inside a whole message: the CLI's last word on every error
(``tlsroll.cli``), whatever raised it. This module imports the standard library only: the CLI's
entry point loads it for every command.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from urllib.parse import unquote

from tlsroll.peertext import ELLIPSIS

LIMIT = 80
"""Characters of an input a message repeats (``shown``); a longer one is cut with ``…``."""

_TOKEN_ID = "[a-z0-9]{6}"  # noqa: S105 - leader.tokens: ID_ALPHABET, ID_LEN
_TOKEN_SECRET = "[a-z2-7]{26}"  # noqa: S105 - leader.tokens: SECRET_ALPHABET (base32), SECRET_LEN
_URLSAFE = "A-Za-z0-9_-"
_PASSWORD_CHAR = "[2-9a-hjkmnp-z]"  # noqa: S105 - tlsroll.password.ALPHABET

# Where a shape may start: not inside a longer run of its own characters, or right after a
# percent-encoded character (``%2Flogin%2F<secret>``, ``%3D<token>``: a link pasted as the
# ``url=`` of another, its ``F`` or ``D`` no part of the secret).
_ENCODED = "(?<=%[0-9A-Fa-f][0-9A-Fa-f])"

_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        # either case: a token typed or shown upper case is the same token (``.lower()``)
        re.compile(
            rf"(?:{_ENCODED}|(?<![a-z0-9]))({_TOKEN_ID})\.{_TOKEN_SECRET}(?![a-z0-9])",
            re.IGNORECASE,
        ),
        "a join token",
    ),
    (
        # 43 characters of base64url: 256 random bits (``secrets.token_urlsafe(32)``). Such a
        # string holds an upper-case letter but with a chance of 2**-32 or so; requiring one
        # keeps node names, DNS names and hex digests (lower case) from looking like it.
        re.compile(
            rf"(?:{_ENCODED}|(?<![{_URLSAFE}]))(?=[{_URLSAFE}]*[A-Z])[{_URLSAFE}]{{43}}"
            rf"(?![{_URLSAFE}])"
        ),
        "a viewer login link or its secret",
    ),
    (
        re.compile(
            rf"(?:{_ENCODED}|(?<![0-9a-z])){_PASSWORD_CHAR}{{4}}(?:-{_PASSWORD_CHAR}{{4}}){{5}}"
            r"(?![0-9a-z])",
            re.IGNORECASE,
        ),
        "a generated auth password",
    ),
)
"""The shapes of tlsroll's secrets wherever they stand (``scrub``, ``shown``: hiding errs on
the safe side); ``secret_inside`` takes the same matches, less those that stand as part of a
name (``_stands_alone``)."""


def secret_kind(text: str) -> str | None:
    """What ``text`` holds that looks like one of tlsroll's secrets, said without it ("a join
    token (id abc123; its secret not shown)", "a generated auth password (not shown)"), or
    None. Searched anywhere in it (a login link holds its secret after ``/login/``): for
    hiding a secret inside free text (``scrub``, ``shown``); ``whole_secret_kind`` is for
    refusing an argument."""
    for candidate in _decodings(text):
        for pattern, kind in _SHAPES:
            match = pattern.search(candidate)
            if match is not None:
                return _described(kind, match)
    return None


_WHOLE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"({_TOKEN_ID})\.{_TOKEN_SECRET}", re.IGNORECASE), "a join token"),
    (
        # the secret alone, or a login link: anything up to ``/login/``, then the secret
        re.compile(rf"(?:\S*/login/)?(?=[{_URLSAFE}]*[A-Z])[{_URLSAFE}]{{43}}/?"),
        "a viewer login link or its secret",
    ),
    (
        re.compile(rf"{_PASSWORD_CHAR}{{4}}(?:-{_PASSWORD_CHAR}{{4}}){{5}}", re.IGNORECASE),
        "a generated auth password",
    ),
)


def whole_secret_kind(text: str) -> str | None:
    """What ``text`` is, if the whole of it (around spaces) has the exact shape of one of
    tlsroll's secrets (a join token, a login link or its secret, a generated password), said
    without it; else None. For refusing an argument pasted where a name belongs: unlike
    ``secret_kind``, a DNS name or node name that merely holds a piece shaped like a token
    (``backup.hausarztpraxisdrschmidtbon.de``) is no secret (review s48rev3 M3)."""
    stripped = text.strip()
    for pattern, kind in _WHOLE:
        match = pattern.fullmatch(stripped)
        if match is not None:
            return _described(kind, match)
    return None


# A piece of free text with one of ``_SHAPES`` holds a secret (``secret_inside``) unless it
# stands as part of a name, which a note may well name (review s48rev3 M3, s49sec2 L2):
# - a join token's or a generated password's shape joined by ``.`` or ``-`` to more of a name
#   (``backup.hausarztpraxisdrschmidtbon.de``, ``praxis.haus-raum-dach-west-sued-berg.de``)
#   without a digit: the random secret holds one but with a chance of 1 in 200 (a token's 26
#   of base32) or 1 in 1000 (a password's 24), a word hardly ever; so ``join-<token>``,
#   ``<token>.neu``, ``pw-<password>`` are secrets;
# - a login link's secret's shape (43 of base64url) that neither follows ``/login/`` (or
#   ``%2Flogin%2F``) nor stands as a word of its own holding a digit, an upper-case and a
#   lower-case letter (a secret holds all three but with a chance of 1 in 1000): a path
#   segment (``/Praxisverwaltung_DrMueller_Bonn_Live_DB2026/``), a hyphenated name without
#   a digit (``Empfang-Praxis-Dr-Mueller-Bonn-Arbeitsplatz``), a base64 digest
#   (``SHA256:<43>``, ``pin-sha256="<43>="``).
# What percent-encoding hides is looked for too: the text decoded (``unquote``), a few times.
_JOINED_BEFORE = re.compile(r"[a-z0-9][.-]\Z", re.IGNORECASE)
_JOINED_AFTER = re.compile(r"[.-][a-z0-9]", re.IGNORECASE)
_DIGIT = re.compile(r"[0-9]")
_AFTER_LOGIN = re.compile(r"(?:/|%2f)login(?:/|%2f)\Z", re.IGNORECASE)
_WORD_BEFORE = re.compile(r"(?:\A|[\s\"'(<\[{=:,;])\Z")
_DIGEST_BEFORE = re.compile(r"sha256:\Z", re.IGNORECASE)
_WORD_AFTER = re.compile(r"(?:\Z|[\s\"'.,;:!?)>\]}&])")
_WORD_CASES = (re.compile(r"[0-9]"), re.compile(r"[A-Z]"), re.compile(r"[a-z]"))
_DECODINGS = 3
"""How often percent-encoded text is decoded again (``%252F``: twice) before it is taken."""


def _stands_alone(kind: str, match: re.Match[str]) -> bool:
    """Whether a match of ``_SHAPES`` in its text is a secret, not part of a name."""
    text, start, end = match.string, match.start(), match.end()
    piece = match.group(0)
    if kind == "a viewer login link or its secret":
        if _AFTER_LOGIN.search(text, max(0, start - 11), start):
            return True
        return (
            _WORD_BEFORE.search(text, max(0, start - 1), start) is not None
            and _DIGEST_BEFORE.search(text, max(0, start - 7), start) is None
            and _WORD_AFTER.match(text, end) is not None
            and all(case.search(piece) for case in _WORD_CASES)
        )
    joined = (
        _JOINED_BEFORE.search(text, max(0, start - 2), start) is not None
        or _JOINED_AFTER.match(text, end) is not None
    )
    if kind == "a join token":
        piece = piece.split(".", 1)[1]
    return not joined or _DIGIT.search(piece) is not None


def _secrets_in(text: str) -> Iterator[tuple[str, re.Match[str]]]:
    for pattern, kind in _SHAPES:
        for match in pattern.finditer(text):
            if _stands_alone(kind, match):
                yield kind, match


def _hidden(kind: str, match: re.Match[str]) -> str:
    return _placeholder(kind, match) if _stands_alone(kind, match) else match.group(0)


_SHORTEST_SECRET = 29
"""A generated password's length, the shortest of the three (a join token 33, a link's 43)."""


def _decodings(text: str) -> Iterator[str]:
    """``text``, then as percent-decoding makes it, while that changes it (bounded)."""
    yield text
    for _ in range(_DECODINGS):
        if "%" not in text:
            return
        decoded = unquote(text)
        if decoded == text:
            return
        text = decoded
        yield text


def secret_inside(text: str) -> str | None:
    """What a piece of ``text`` looks like, if one has the shape of one of tlsroll's secrets
    standing on its own (not part of a name), in ``text`` or in it percent-decoded, said
    without it; else None. For refusing free text that is stored and listed again
    (``free_text_problem``)."""
    if len(text) < _SHORTEST_SECRET:
        return None
    for candidate in _decodings(text):
        for kind, match in _secrets_in(candidate):
            return _described(kind, match)
    return None


def hide_inside(text: str) -> str:
    """``text`` with every piece ``secret_inside`` finds replaced by what it looks like: free
    text a leader of before session 49 stored (a note, a name, a reason) as it is read back
    and listed, whatever it held. A secret only percent-encoding hides is hidden in the text
    decoded."""
    if len(text) < _SHORTEST_SECRET:  # most: a reason such as "superseded", no note at all
        return text
    return _hide(text, _hidden, secret_inside)


def _hide(
    text: str,
    hidden: Callable[[str, re.Match[str]], str],
    found: Callable[[str], str | None],
) -> str:
    """``text`` with each match of ``_SHAPES`` replaced by ``hidden``; while ``found`` finds a
    secret still (one percent-encoding hid), the text decoded, a few times."""
    for _ in range(_DECODINGS + 1):
        for pattern, kind in _SHAPES:
            if pattern.search(text):
                text = pattern.sub(functools.partial(hidden, kind), text)
        if found(text) is None:
            return text
        text = unquote(text)
    return text


def free_text_problem(text: str, what: str) -> str | None:
    """Why ``text``, given as ``what`` (a note, a name, a reason the leader stores and lists
    again: "the token's description"), is refused, or None: it holds what looks like one of
    tlsroll's secrets (review s48rev3: a join token pasted into ``--description`` was listed
    by every ``token list``). The admin CLI refuses it before sending (a usage error) and the
    leader's Admin service again (INVALID_ARGUMENT, nothing stored), in these words."""
    kind = secret_inside(text)
    if kind is None:
        return None
    return (
        f"{what} holds what looks like {kind}; it is stored and listed again, and a secret "
        "must not be: leave it out"
    )


def _described(kind: str, match: re.Match[str]) -> str:
    if kind == "a join token":
        return f"a join token (id {match.group(1)}; its secret not shown)"
    return f"{kind} (not shown)"


def _placeholder(kind: str, match: re.Match[str]) -> str:
    return f"<{_described(kind, match)}>"


def scrub(message: str) -> str:
    """``message`` with every part shaped like one of tlsroll's secrets replaced by what it
    looks like (``<a join token (id abc123; its secret not shown)>``): ``hide_inside``'s
    shapes wherever they stand, percent-encoded ones too."""
    return _hide(message, _placeholder, secret_kind)


def shown(value: object, limit: int = LIMIT) -> str:
    """An input as a message repeats it: quoted and escaped like ``repr`` (a control character
    as ``\\n``, ``\\x1b``: one line, nothing a terminal acts on), cut after ``limit``
    characters with ``…`` and the whole length said, and a secret not at all (what it looks
    like instead: ``secret_kind``)."""
    text = str(value)
    kind = secret_kind(text)
    if kind is not None:
        return f"<{kind}>"
    if len(text) <= limit:
        return repr(text)
    cut = repr(text[: limit - 1])
    return f"{cut[:-1]}{ELLIPSIS}{cut[-1]} ({len(text)} characters)"


def shown_path(path: object, limit: int = 200) -> str:
    """A path a message names, unquoted as paths are in tlsroll's messages: its control
    characters escaped, at most ``limit`` characters (a real path is rarely longer; one
    typed wrong may be 100 KB), a secret not at all."""
    text = str(path)
    if secret_kind(text) is not None:
        return shown(text)
    escaped = repr(text)[1:-1]
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[: limit - 1]}{ELLIPSIS} ({len(text)} characters)"


WORD_LIMIT = 120
LINE_LIMIT = 1000


def one_line(message: str) -> str:
    """A message meant to be one line (a usage error: click's own repeat argv), made one:
    control characters escaped, any run of more than ``WORD_LIMIT`` characters without a
    space cut, the whole at most ``LINE_LIMIT``; secrets scrubbed. The CLI's safety net
    for messages that repeat input without ``shown``."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in scrub(message))
    text = re.sub(
        rf"\S{{{WORD_LIMIT + 1},}}",
        lambda m: f"{m.group(0)[: WORD_LIMIT - 1]}{ELLIPSIS}",
        text,
    )
    if len(text) > LINE_LIMIT:
        text = text[: LINE_LIMIT - 1] + ELLIPSIS
    return text


def safe_lines(message: str) -> str:
    """A message that may hold lines of its own (a refusal listing one problem a line), as the
    CLI prints it: secrets scrubbed and every control character but the line end escaped,
    so that nothing in it acts on the terminal."""
    text = scrub(message)
    if text.isascii() and text.replace("\n", "").isprintable():
        return text
    return "".join(ch if ch == "\n" or ch.isprintable() else repr(ch)[1:-1] for ch in text)
