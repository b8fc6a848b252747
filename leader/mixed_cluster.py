"""A mixed cluster (some servers on http, some on https) and how to switch the rest, in one set
of words for every place that says it: `tlsroll nodes`, `tlsroll schema show`, the plan of some
nodes (``leader.plan_texts.outside_scope_warning``) and the web viewer (review s69 revlocal2
L4: each put every node on http into one ``--nodes a,b,…``, at 200 nodes one unreadable
command). Plain code with nothing imported: `schema show` imports it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

NAMED = 10
"""Nodes named at most in a line (``leader.planner.MAX_NAMED``; a test keeps them equal), and
in a ``--nodes`` list of the advice: beyond it, the advice is ``--scope cluster`` where that
leaves every node on https alone, else ten at a time (``rest_scope``)."""

CLUSTER = "--scope cluster"


def served_scheme(server: str) -> str:
    """What a node's server serves by its latest heartbeat (``NodeInfo.server``), as a mixed
    cluster is judged: "http", "https" (a dual node, http+https, serves https already), or ""
    (down, needing the admin, restarting, no server, not heard: not known)."""
    schemes = server.removesuffix(" frozen")
    if schemes == "http+https":
        return "https"
    return schemes if schemes in ("http", "https") else ""


def is_dual(server: str) -> bool:
    """A node's server serves http and https (``served_scheme`` "https"): where a
    transitional rollout's phase 1 leaves it, which a direct enable-tls refuses as a whole
    (``rollout_core.wrong_source``)."""
    return server.removesuffix(" frozen") == "http+https"


def https_only(server: str) -> bool:
    """A node's server serves https and not http, by its latest heartbeat."""
    return server.removesuffix(" frozen") == "https"


class Mixed(NamedTuple):
    """The enrolled nodes of a mixed cluster by what their servers serve, each sorted.
    ``dual`` and ``other_certificate``: those of ``on_https`` that a cluster enable-tls does
    not leave alone (``rollout_core.already_done``): serving http and https (it refuses them,
    and with them the whole rollout), or https with a certificate not known as one of this
    cluster's CA (it would replace it: an https the practice set up before tlsroll)."""

    on_http: tuple[str, ...]
    on_https: tuple[str, ...]
    unknown: tuple[str, ...]
    dual: tuple[str, ...] = ()
    other_certificate: tuple[str, ...] = ()


def mixed(servers: Mapping[str, str], other_certificate: Collection[str] = ()) -> Mixed | None:
    """``servers``: each enrolled node with its server by its latest heartbeat. The cluster by
    scheme if it is mixed (some on http only, some on https), else None.
    ``other_certificate``: the nodes whose server serves https with a certificate not known
    as one of this cluster's CA (``SchemaStore.other_certificates``); those on https only
    count."""
    by: dict[str, list[str]] = {"http": [], "https": [], "": []}
    for name, server in servers.items():
        by[served_scheme(server)].append(name)
    if not by["http"] or not by["https"]:
        return None
    dual = sorted(n for n in by["https"] if is_dual(servers[n]))
    other = sorted(n for n in other_certificate if https_only(servers.get(n, "")))
    return Mixed(
        tuple(sorted(by["http"])),
        tuple(sorted(by["https"])),
        tuple(sorted(by[""])),
        tuple(dual),
        tuple(other),
    )


def some_names(names: Sequence[str]) -> str:
    """``names`` joined, the first ``NAMED`` named and the rest counted (as the planner's)."""
    shown = ", ".join(names[:NAMED])
    more = len(names) - NAMED
    return shown if more <= 0 else f"{shown} and {more} more"


def rest_scope(on_http: Sequence[str], cluster: bool = True) -> str:
    """The scope of the rollout that switches the nodes ``on_http`` too: them by name, up to
    ``NAMED`` of them; beyond, ``--scope cluster`` if it leaves every node on https alone
    (``cluster``: none dual nor on https with a certificate not of this CA; "already done"),
    not a list no one reads; else the first ``NAMED`` by name, a batch (``NEXT``)."""
    if len(on_http) <= NAMED:
        return "--nodes " + ",".join(sorted(on_http))
    if cluster:
        return CLUSTER
    return "--nodes " + ",".join(sorted(on_http)[:NAMED])


NEXT = f"then the next {NAMED} of them the same way, and so on"
"""What follows the first batch of ``rest_scope`` (the cluster's scope refused or unsafe)."""


def takes_in(unknown: Sequence[str]) -> str:
    """What a ``--scope cluster`` advice adds for the nodes ``unknown`` (their servers not
    known now), which that rollout takes in too: the way out; "" if none."""
    if not unknown:
        return ""
    return (
        f"; it takes in {some_names(unknown)} too, whose servers are not known now: "
        "wait until their agents are heard, or leave them out with --nodes"
    )


def _serve(names: Sequence[str]) -> str:
    return f"{some_names(names)} {'serves' if len(names) == 1 else 'serve'}"


def dual_left_by(dual: Collection[str], rollouts: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Of the ``dual`` nodes, the rollout that left each on http and https: the newest (by
    epoch) transitional enable-tls rollout (a phase 1) among ``rollouts`` (as `schema show
    --json` gives them) that has the node, by node; a node in none of them is left out (the
    way then names no rollout). The leader's own reading is ``SchemaStore.left_dual``."""
    found: dict[str, tuple[int, str]] = {}
    wanted = set(dual)
    for r in rollouts:
        if r.get("change") != "enable-tls" or r.get("strategy") != "transitional":
            continue
        epoch = int(r.get("epoch", 0))
        for n in r.get("nodes", ()):
            name = n.get("name", "")
            if name in wanted and (name not in found or found[name][0] < epoch):
                found[name] = (epoch, str(r.get("id", "")))
    return {name: rid for name, (_, rid) in found.items() if rid}


def dual_way(dual: Sequence[str], left_by: Mapping[str, str] | None = None) -> str:
    """How to close http on the ``dual`` nodes: the finalize or retry of the rollout that left
    them (``left_by``, by node, ``dual_left_by``): by its id, in the commands where one left
    them all (session 69 said "the rollout that left it" and named none), else each node's."""
    one = len(dual) == 1
    them = "it" if one else "them"
    ids = {left_by[n] for n in dual if left_by and n in left_by}
    if len(ids) == 1 and all(left_by and n in left_by for n in dual):
        (rid,) = ids
        return (
            f"close http there with tlsroll rollout finalize {rid}, or tlsroll rollout retry "
            f"{rid} (the rollout that left {them} so)"
        )
    said = "close http there with tlsroll rollout finalize, or tlsroll rollout retry, of the "
    if not ids:
        return said + f"rollout that left {them}"
    named = [f"{n}: {left_by[n]}" for n in dual if left_by and n in left_by]
    return said + f"rollout that left each ({some_names(named)})"


def switch_the_rest(
    on_http: Sequence[str],
    unknown: Sequence[str] = (),
    dual: Sequence[str] = (),
    other_certificate: Sequence[str] = (),
    left_by: Mapping[str, str] | None = None,
) -> str:
    """How to switch the nodes ``on_http`` (sorted) to https: "tlsroll plan …, then tlsroll
    rollout start …". ``unknown``: the enrolled nodes whose server is not known now, which a
    ``--scope cluster`` takes in too (said, with the way out). ``dual``, ``other_certificate``
    (``Mixed``'s): nodes on https that a cluster enable-tls does not leave alone: with any,
    beyond ``NAMED`` nodes on http, ten at a time, saying why not the cluster (review of s69,
    M: "the nodes on https already are left alone" was said of them too); a dual node is
    named with its own way (the finalize or retry of the rollout that left it: ``dual_way``,
    by its id where ``left_by`` knows it)."""
    scope = rest_scope(on_http, not dual and not other_certificate)
    said = f"tlsroll plan {scope}, then tlsroll rollout start {scope}"
    if scope == CLUSTER:
        said += f" (the nodes on https already are left alone{takes_in(unknown)})"
    elif len(on_http) > NAMED:
        why = []
        if dual:
            why.append(f"it refuses {some_names(dual)}, on http and https")
        if other_certificate:
            one = len(other_certificate) == 1
            why.append(
                f"it would replace the certificate{'' if one else 's'} "
                f"{_serve(other_certificate)} https with, not of this cluster's CA"
            )
        said += f", {NEXT} (not {CLUSTER}: {'; '.join(why)})"
    if dual:
        said += (
            f"; {_serve(dual)} http and https, as a transitional rollout's phase 1 leaves a "
            f"node: {dual_way(dual, left_by)}"
        )
    return said


def mixed_line(m: Mixed, left_by: Mapping[str, str] | None = None) -> str:
    """The line that says a cluster is mixed and how to switch the rest (``left_by``: the
    rollout that left each dual node, ``dual_left_by``)."""
    return (
        f"a mixed cluster: {some_names(m.on_http)} on http, {some_names(m.on_https)} on "
        f"https; to switch the rest: "
        f"{switch_the_rest(m.on_http, m.unknown, m.dual, m.other_certificate, left_by)}"
    )


def other_certificate_line(names: Sequence[str]) -> str:
    """The line that says nodes on https serve a certificate not known as one of this
    cluster's CA while the cluster is not mixed (put in by hand after their switch: review
    s70 drift), and what gives them one of this CA. "Not known" is all the leader can tell:
    one of this CA issued after the backup its store was restored from (or before the store
    was begun again) is not on record either, and the plan, which asks the node, finds such
    a node done: the line says so, with the rotate-cert that gives it one on record (session
    75 opswalk: the plan it named said "nothing to do", and no more)."""
    scope = rest_scope(sorted(names), cluster=False)
    one = len(names) == 1
    return (
        f"{_serve(sorted(names))} https with a certificate not of this cluster's CA (put in by "
        f"hand?); to give {'it' if one else 'them'} one of this CA: tlsroll plan "
        f"{scope}, then tlsroll rollout start {scope} (a node the plan finds done serves one "
        "of this CA that the leader has no record of, issued after the backup its store was "
        f"restored from: tlsroll rollout start --change rotate-cert {scope} gives "
        f"{'it' if one else 'them'} one on record)"
    )
