"""A mixed cluster (some servers on http, some on https) and how to switch the rest, in one set
of words for every place that says it: `tlsroll nodes`, `tlsroll schema show`, the plan of some
nodes (``leader.plan_texts.outside_scope_warning``) and the web viewer (review s69 revlocal2
L4: each put every node on http into one ``--nodes a,b,…``, at 200 nodes one unreadable
command). Plain code with nothing imported: `schema show` imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

NAMED = 10
"""Nodes named at most in a line (``leader.planner.MAX_NAMED``; a test keeps them equal), and
in a ``--nodes`` list of the advice: beyond it, the advice is ``--scope cluster``."""

CLUSTER = "--scope cluster"


def served_scheme(server: str) -> str:
    """What a node's server serves by its latest heartbeat (``NodeInfo.server``), as a mixed
    cluster is judged: "http", "https" (a dual node, http+https, serves https already), or ""
    (down, needing the admin, restarting, no server, not heard: not known)."""
    schemes = server.removesuffix(" frozen")
    if schemes == "http+https":
        return "https"
    return schemes if schemes in ("http", "https") else ""


class Mixed(NamedTuple):
    """The enrolled nodes of a mixed cluster by what their servers serve, each sorted."""

    on_http: tuple[str, ...]
    on_https: tuple[str, ...]
    unknown: tuple[str, ...]


def mixed(servers: Mapping[str, str]) -> Mixed | None:
    """``servers``: each enrolled node with its server by its latest heartbeat. The cluster by
    scheme if it is mixed (some on http only, some on https), else None."""
    by: dict[str, list[str]] = {"http": [], "https": [], "": []}
    for name, server in servers.items():
        by[served_scheme(server)].append(name)
    if not by["http"] or not by["https"]:
        return None
    return Mixed(*(tuple(sorted(by[k])) for k in ("http", "https", "")))


def some_names(names: Sequence[str]) -> str:
    """``names`` joined, the first ``NAMED`` named and the rest counted (as the planner's)."""
    shown = ", ".join(names[:NAMED])
    more = len(names) - NAMED
    return shown if more <= 0 else f"{shown} and {more} more"


def rest_scope(on_http: Sequence[str]) -> str:
    """The scope of the rollout that switches the nodes ``on_http`` too: them by name, up to
    ``NAMED`` of them; beyond, ``--scope cluster`` (a cluster enable-tls leaves the nodes on
    https already alone: "already done"), not a list no one reads."""
    if len(on_http) <= NAMED:
        return "--nodes " + ",".join(sorted(on_http))
    return CLUSTER


def switch_the_rest(on_http: Sequence[str], unknown: Sequence[str] = ()) -> str:
    """How to switch the nodes ``on_http`` (sorted) to https: "tlsroll plan …, then tlsroll
    rollout start …". ``unknown``: the enrolled nodes whose server is not known now, which a
    ``--scope cluster`` takes in too (said, with the way out)."""
    scope = rest_scope(on_http)
    said = f"tlsroll plan {scope}, then tlsroll rollout start {scope}"
    if scope == CLUSTER:
        said += " (the nodes on https already are left alone"
        if unknown:
            said += (
                f"; it takes in {some_names(unknown)} too, whose servers are not known now: "
                "wait until their agents are heard, or leave them out with --nodes"
            )
        said += ")"
    return said


def mixed_line(m: Mixed) -> str:
    """The line that says a cluster is mixed and how to switch the rest."""
    return (
        f"a mixed cluster: {some_names(m.on_http)} on http, {some_names(m.on_https)} on "
        f"https; to switch the rest: {switch_the_rest(m.on_http, m.unknown)}"
    )
