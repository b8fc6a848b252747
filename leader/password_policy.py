"""The minimum an admin-chosen auth password must meet; one line says why one falls short.

A password typed by the admin (``--password-file``) must have at least ``MIN_LENGTH``
characters, must not be one of the 30,000 most common passwords (zxcvbn's list, compared
case-insensitively), and zxcvbn must estimate at least ``MIN_GUESSES`` guesses for it, with the
practice's own words (``praxis``, ``passwort``, the seasons, …) counted as known to an attacker.
A generated password (``--generate``, 118.9 bits) always passes.

Why these numbers: each guess costs one online exchange with a node, and a node takes at most
200 wrong ones a day (``nodeagent.bootstrap_server.Limits``): 10**10 guesses are out of reach
online by far. They are asked for anyway (zxcvbn's top score) because a stolen verifier is
open to offline guessing at scrypt's cost. zxcvbn is a maintained estimator of what cracking
tools try first (dictionaries, names, keyboard patterns, dates, l33t); it knows English lists
best, hence the German words here. Pure code: no I/O.
"""

from __future__ import annotations

import unicodedata

from zxcvbn import zxcvbn
from zxcvbn.matching import RANKED_DICTIONARIES

MIN_LENGTH = 12
MIN_GUESSES = 10**10  # zxcvbn's score 4
# Words an attacker of a German practice tries first; zxcvbn treats them as dictionary words.
PRACTICE_WORDS = (
    "praxis",
    "arztpraxis",
    "zahnarztpraxis",
    "passwort",
    "kennwort",
    "geheim",
    "arzt",
    "aerztin",
    "doktor",
    "patient",
    "empfang",
    "server",
    "admin",
    "tomedo",
    "praxis_live",
    "tlsroll",
    "fruehling",
    "sommer",
    "herbst",
    "winter",
    "januar",
    "hallo",
    "willkommen",
)
MAX_CHECKED = 72  # zxcvbn takes no more (it is slow on long input); the first 72 are judged


def problem(secret: str, user_words: tuple[str, ...] = ()) -> str | None:
    """Why ``secret`` is too weak (one line), or None if it meets the policy. The way to a
    generated one is the command's to add (``leader.cli.password.obtain_password``): each
    command has its own."""
    text = unicodedata.normalize("NFC", secret)
    if len(text) < MIN_LENGTH:
        return f"the password is too short: at least {MIN_LENGTH} characters, it has {len(text)}"
    if text.lower() in RANKED_DICTIONARIES["passwords"]:
        return "the password is one of the 30,000 most common passwords; choose another"
    result = zxcvbn(text[:MAX_CHECKED], user_inputs=[*PRACTICE_WORDS, *user_words])
    guesses = float(result["guesses"])
    if guesses < MIN_GUESSES:
        hint = result["feedback"]["warning"] or "it follows a common pattern"
        return (
            f"the password is too easy to guess (about 10^{_magnitude(guesses)} guesses, at "
            f"least 10^10 needed): {hint.rstrip('.')}; make it longer"
        )
    return None


def _magnitude(guesses: float) -> int:
    digits = 0
    while guesses >= 10:
        guesses /= 10
        digits += 1
    return digits
