"""Join tokens: ``<id>.<secret>``, kubeadm-style.

The id (6 characters) is public and names the token in lists and logs; the secret (26
characters of base32, 130 bits) is shown once and only its hash is stored.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from tlsroll.errors import TerminalError

ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
SECRET_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # noqa: S105 - base32, 5 bits a char
ID_LEN = 6
SECRET_LEN = 26  # 26 * 5 = 130 bits >= 128
ID_SHAPE = re.compile(f"[{ID_ALPHABET}]{{{ID_LEN}}}")
"""A join token's or viewer grant's id (``leader.viewer.grants`` makes them alike)."""
_FORMAT = re.compile(rf"({ID_SHAPE.pattern})\.([a-z2-7]{{{SECRET_LEN}}})")


class MalformedToken(TerminalError):
    pass


@dataclass(frozen=True)
class JoinToken:
    id: str
    secret: str

    def __str__(self) -> str:
        return f"{self.id}.{self.secret}"

    def __repr__(self) -> str:  # never show the secret by accident
        return f"JoinToken(id={self.id!r}, secret=<hidden>)"

    @classmethod
    def generate(cls) -> JoinToken:
        return cls(
            "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LEN)),
            "".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_LEN)),
        )

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        m = _FORMAT.fullmatch(text.strip())
        if m is None:
            raise MalformedToken(
                f"a join token looks like <{ID_LEN} characters>.<{SECRET_LEN} characters>"
            )
        return cls(m.group(1), m.group(2))
