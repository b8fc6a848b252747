"""The plain parts of the workstation bootstrap protocol that every side shares: the protocol's
error, strict JSON from the network, and the workstation's names. Standard library only (no
``cryptography``, no ``spake2``): the agent imports it for its bootstrap service, which holds
no X.509 or PAKE code itself (``nodeagent.bootstrap_crypto`` runs those in the agent's crypto
worker), and the leader through ``tlsroll.bootstrap_csr``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from enum import StrEnum
from typing import Any

from tlsroll import peertext
from tlsroll.errors import TerminalError

DETAIL_CHARS = 200  # node-supplied text in an error is cleaned and cut to this
# "ws-" + a DNS label: at most 63 characters, lowercase letters, digits, inner hyphens.
WORKSTATION_CN = re.compile(r"ws-[a-z0-9]([a-z0-9-]{0,58}[a-z0-9])?")


class BootstrapReason(StrEnum):
    MALFORMED = "not a valid tlsroll bootstrap message"
    VERSION = "unsupported bootstrap protocol version"
    BAD_KDF = "unacceptable key derivation parameters"
    CONFIRMATION = "key confirmation failed (wrong password, not the real node, or altered)"
    SEAL = "sealed data does not verify under the exchanged key"
    BAD_CSR = "unacceptable workstation CSR"


class BootstrapError(TerminalError):
    """A bootstrap message that is malformed or does not verify; ``str()`` is one line."""

    def __init__(self, reason: BootstrapReason, detail: str = "") -> None:
        # ``detail`` may quote what a node or a client sent: one line, bounded.
        detail = peertext.clean(detail, DETAIL_CHARS) if detail else ""
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


def loads_strict(body: bytes) -> Any:
    """Parse JSON from the network: UTF-8, no duplicate keys, no NaN/Infinity, nested no deeper
    than the decoder can go; ValueError (UnicodeDecodeError) else."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, item in items:
            if key in obj:
                raise ValueError(f"duplicate key {key!r}")
            obj[key] = item
        return obj

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    text = body.decode("utf-8")
    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=no_constant)
    except RecursionError:  # '[' * 30000: the decoder's recursion, not the handler's bug
        raise ValueError("nested too deeply") from None


def taken_here(workstation: str) -> str:
    """The start of the leader's refusal of a name held at the node asked, with no proof
    (``leader.store``, ``NameTaken``; --replace takes it), which the workstation client reads
    to tell it from the name held at another node (``workstation.connection``): one text for
    both, so that a reworded refusal cannot leave the client's reading silently behind
    (review of s63-w2 L4)."""
    return f"workstation name {workstation} is taken at this node"


NAME_CHARS = 60  # of the text a workstation name is made of, after its ws- (``workstation_cn``)
CN_CHARS = len("ws-") + NAME_CHARS  # of a workstation name (``WORKSTATION_CN``)
# Of a workstation certificate's life: from then on it is due for renewal (``tlsroll client
# renew`` without --force, in the last 30 %), and the leader holds no renewal of it back
# (``leader.store``'s renewal budget: only one before it, a forced one, waits its turn).
RENEWAL_DUE_FRACTION = 0.7


def workstation_spelling(text: str) -> str:
    """``text`` spelt as a workstation name holds it, and nothing more: lowercase, umlauts
    spelt out, other letters without their accents, each run of anything else a hyphen. No
    hyphen dropped or merged, no dot part dropped: the client compares it with the name made
    of it (``workstation_cn``) to tell a ``--name`` used as given from one that would become
    another (review s64: ``-x-`` became ws-x, unsaid)."""
    text = text.lower()
    for umlaut, ascii_ in (("ä", "ae"), ("ö", "oe"), ("ü", "ue"), ("ß", "ss")):
        text = text.replace(umlaut, ascii_)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9-]+", "-", text)


def workstation_label(label: str) -> str:
    """The text ``workstation_cn`` makes a name of, before it is cut to ``NAME_CHARS``: the
    first dot-separated part, spelt (``workstation_spelling``), without hyphens at its ends
    or two in a row; "" if nothing is left (the client refuses a ``--name`` that would be
    cut or lose its text, review s63 L3)."""
    text = workstation_spelling(label.split(".", 1)[0]).strip("-")
    return re.sub(r"-{2,}", "-", text)


def workstation_cn(label: str) -> str:
    """``ws-<label>`` from a host name or any text: lowercase, [a-z0-9-], at most 63 chars.
    A label that starts with ``ws-`` is the name itself: ``NAME_CHARS`` counts what follows
    its ``ws-``, as for any other label (review s64: ``ws-`` and 58 letters, a name of 61
    characters, was cut to 60)."""
    body = workstation_label(label)
    body = body.removeprefix("ws-")[:NAME_CHARS].strip("-") or "workstation"
    return f"ws-{body}"
