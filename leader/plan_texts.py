"""What each change's plan says: its checks and steps on a node, what the workstations must do,
and the warnings the seed's dialog gives first. ``PlanRollout`` (``leader.admin_service``) sends
them with the plan, adding the warnings that depend on the cluster's state; ``tlsroll rollout
retry`` prints the warnings of the retried change as ``rollout start --yes`` prints the plan's
(``leader.cli.rollout``). Plain data: the CLI imports it without the leader's servicers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from leader.mixed_cluster import (
    CLUSTER,
    NAMED,
    NEXT,
    https_only,
    is_dual,
    rest_scope,
    served_scheme,
    some_names,
    switch_the_rest,
    takes_in,
)
from leader.rollout_core import Change, FreezeMode, Strategy

# What each change's plan says (``PlanRollout``): its checks and steps on a node, what the
# workstations must do, and the warnings the seed's dialog gives "zunächst" (first). A change
# that is not the seed's switch has texts of its own: rotate-cert and change-password keep
# the address, and the way back gives the http address back.

RESTART = "The switch restarts the managed server on each node."
RECONNECT_DIRECT = (
    "All connected clients must re-initiate their server connections: http (8080) closes the "
    "moment each node switches, and every workstation on that node loses the server until "
    "someone does the client steps there (tlsroll notify prints them for the staff). To let "
    "the workstations move over first: "
    "--strategy transitional (https beside http until `tlsroll rollout finalize`)."
)
ENTRIES = (
    "Staff must make no new entries during the switch (tlsroll notify tells them): entries "
    "already acknowledged are kept, but one refused with 503 during the freeze must be made "
    "again"
)
ENTRIES_BY_FREEZE = {
    FreezeMode.NODE: "; with --freeze node the other nodes keep taking entries.",
    FreezeMode.SCOPE: "; with --freeze scope every node in scope refuses entries from the first "
    "switch until the last one has ended.",
}
START_REFUSED_AFTER = (
    "; no rollout starts until then (the way back, tlsroll rollout rollback, is not refused for it)"
)
"""How every refusal of a start for the leader's own disk ends (``store_health.start_refused``):
`tlsroll plan` tells it from a rollout not ended (``PlanResponse.busy`` says either)."""
SEED_WARNINGS = (RESTART, RECONNECT_DIRECT)
CHECKS = (
    "preflight: managed server healthy; ports 8443 and 9443 free on the node; config "
    "directory writable; room on its disk for the switch's writes; a systemd/exec template "
    "renders; clock within 120 s of the leader; certificate names known",
    "stage: node key made on the node, CSR signed by the cluster CA, stored inactive",
    "switch: freeze writes, write new config atomically, restart, verify https with the "
    "staged certificate and 8080 closed, write watermark unchanged, unfreeze; else roll back",
    "confirm: the leader checks https from outside trusting only the cluster CA",
)
TRANSITIONAL_CHECKS = (
    "phase 1, node by node: " + CHECKS[0],
    "stage: node key made on the node, CSR signed by the cluster CA, stored inactive",
    "switch: freeze writes, write the dual config atomically (https on 8443 AND http on "
    "8080), restart, verify both, write watermark unchanged, unfreeze; else roll back to http",
    "confirm: the leader checks https (cluster CA only) and http from outside; the node is "
    "dual and the rollout waits (awaiting_finalize) holding no freeze",
    "meanwhile: tlsroll schema show lists who is still on http per node; tlsroll notify "
    "--remaining prints the workstations that still need the client steps",
    "phase 2 (tlsroll rollout finalize; refused while a node had http clients lately, unless "
    "--force; --when-quiet DURATION finalizes each node once quiet): node by node freeze, "
    "https-only config, restart, verify 8080 closed and https live, unfreeze; else back to dual",
)
TRANSITIONAL_WARNINGS = (
    "Phase 1 restarts the managed server on each node; workstations keep working on http.",
    "Workstations can move to https any time until finalize; finalize cuts off any still on http.",
)
ROTATE_CHECKS = (
    "preflight: the node serves https; managed server healthy; port 9443 free (or the "
    "agent's); config directory writable; room on its disk for the switch's writes; a "
    "systemd/exec template renders; clock within 120 s of the leader; certificate names known",
    "stage: a new node key made on the node, CSR signed by the cluster CA, stored inactive",
    "switch: freeze writes, write the config with the new certificate atomically, restart, "
    "verify https with the staged certificate, write watermark unchanged, unfreeze; else roll "
    "back to the certificate served before",
    "confirm: the leader checks https from outside trusting only the cluster CA; the "
    "certificate served before is revoked (superseded)",
)
ROTATE_WARNINGS = (
    RESTART,
    "Connected clients must re-initiate their server connections after the restart; the "
    "address, the port and the password stay the same.",
)
ROTATE_CLIENT_STEPS = (
    "none: the address, the port and the password stay the same, and the new certificate is "
    "from the CA the workstations already trust",
)
OWN_ROTATE_CLIENT_STEPS = (
    "the address, the port and the password stay the same; but a workstation trusts only the "
    "CA(s) it was given when it was set up: if the --cert-dir ca.crt is not among them, it "
    "needs the client steps again (Test connection, confirm the port, the password, restart)",
)
PASSWORD_CHECKS = (
    "preflight: the node serves https; managed server healthy; port 9443 free (or the "
    "agent's); config directory writable; room on its disk for the switch's writes; a "
    "systemd/exec template renders; clock within 120 s of the leader; certificate names known",
    "stage: none (the staged password's verifier goes with the switch; no new certificate)",
    "switch: freeze writes, write the config with the staged password's verifier atomically, "
    "restart, verify https, write watermark unchanged, unfreeze; else roll back to the "
    "password live before",
    "confirm: the leader checks https from outside trusting only the cluster CA",
)
PASSWORD_WARNINGS = (
    "The switch restarts the managed server on each node: the staged password takes effect "
    "there only then (seed).",
    "Connected clients must re-initiate their server connections after the restart; the "
    "address and the port stay the same.",
)
PASSWORD_CLIENT_STEPS = (
    "workstations already set up keep their address and certificate: nothing to do",
    "a workstation set up from now on (or again) enters the new password at the prompt; hand "
    "it on in person or by phone, not by e-mail",
)
DISABLE_CHECKS = (
    "preflight: the node serves https; managed server healthy; config directory writable; "
    "clock within 120 s of the leader",
    "switch: freeze writes, restore the http config the switch replaced, restart, verify http "
    "on 8080, write watermark unchanged, unfreeze",
    "confirm: the leader checks http from outside",
)
DISABLE_WARNINGS = (
    RESTART,
    "https closes on each node as it goes back: every workstation on it loses the server "
    "until it is given the old http address again.",
)
DISABLE_CLIENT_STEPS = (
    "Admin -> change server address back to the node's http address (port 8080)",
    "restart the client",
)
# Finalize (a transitional rollout's phase 2, ``tlsroll rollout finalize``; its plan is never
# asked for: ``rollout retry`` of one shows these warnings).
FINALIZE_CHECKS = (TRANSITIONAL_CHECKS[-1],)
FINALIZE_WARNINGS = (
    "Finalize restarts the managed server on each node and closes http (8080) there.",
    "A workstation still on http loses the server until it does the steps.",
)
# ``--cert-dir``: the stage and confirm lines of ``CHECKS`` (and ``ROTATE_CHECKS``) as they
# are then.
OWN_CERT_CHECKS = {
    1: "stage: the certificate and key from --cert-dir sent to the node over mutual TLS, "
    "checked there (key matches, chain to the practice CA), stored inactive (key 0600)",
    3: "confirm: the leader checks https from outside trusting only the practice CA "
    "(ca.crt); workstations enrolling at 9443 get the practice CA",
}
CLIENT_STEPS = (
    "Admin -> change server address to the new https address of the node",
    "Test connection; confirm the port prompt for 9443 (or the port shown)",
    "enter the authentication password",
    "restart the client",
)


REPLACES_OTHER = (
    "it serves https already, with a certificate not of this cluster's CA (the practice's "
    "own?): the switch replaces that certificate with one of this CA, its https address "
    "stays; a workstation that trusted the practice's certificate there needs this CA (the "
    "client steps)"
)
"""What a plan's line of an enable-tls says of a node that serves https already with a
certificate not known as one of this CA (``NodeView.other_certificate``: review s70 drift L1,
the plan said only "will switch")."""


def replaces_other_warning(names: Sequence[str]) -> str:
    """The warning of an enable-tls plan whose nodes ``names`` (sorted) serve https already
    with a certificate not known as one of this CA (put in outside tlsroll): no http to close
    there, their certificate replaced (review s70 drift L1)."""
    one = len(names) == 1
    return (
        f"{some_names(names)} {'serves' if one else 'serve'} https already, with a certificate "
        "not of this cluster's CA (the practice's own?): the switch replaces it with one of "
        f"this CA, at the same https address; every workstation that trusted the practice's "
        f"certificate there loses the server until it does the client steps (it needs this CA)."
    )


def direct_warnings(warnings: Sequence[str], replaced: Sequence[str], every: bool) -> list[str]:
    """A direct enable-tls plan's warnings (``plan_texts``') with the nodes ``replaced``
    (sorted; ``replaces_other_warning``) said: the warning that http closes as each node
    switches is not theirs (``every``: it is no node's, and goes)."""
    if not replaced:
        return list(warnings)
    out: list[str] = []
    for w in warnings:
        if w != RECONNECT_DIRECT:
            out.append(w)
            continue
        if not every:
            out.append(
                w.replace(
                    "the moment each node switches",
                    f"the moment each node on http switches (not at {some_names(replaced)}: "
                    "https there already)",
                )
            )
        out.append(replaces_other_warning(replaced))
    return out


def edited_config_line(node: str, config: str) -> str:
    """What the plan of a way back says of a node whose server config (``config``, its path on
    the node) was edited since tlsroll wrote it (``PlanResponse.edited_configs``): the way back
    puts back the config from before the switch byte for byte (the one known to run on http),
    so those edits are undone; the agent keeps the file first (``nodeagent.plans``'s
    ``KEPT_BEFORE_ROLLBACK``), under the way back's rollout id, which the plan does not know
    yet (review rev58a H2: the edits were undone without a word). ``config`` empty: the node's
    agent names no feature that says it looks and keeps (``features.EDITED_CONFIG``, or a later
    one): one of a release before session 59 does neither (review s70 compat: the plan said
    nothing of such a node); one of sessions 59 to 63 does both without saying so."""
    if not config:
        return (
            f"{node}: its agent is of an earlier release that may not say whether its server"
            " config was edited since tlsroll wrote it: the way back puts back the config from"
            " before the switch, and such an agent keeps no copy, so an edit made there since"
            " would be lost (upgrade that agent first to have an edited config named and kept)"
        )
    return (
        f"{node}: its server config {config} was edited since tlsroll wrote it; the way back puts"
        " back the config from before the switch and undoes those edits (the file as it is now"
        f" is kept as {config}.before-rollback-ROLLOUT_ID)"
    )


def plan_texts(
    change: Change, strategy: Strategy, freeze: FreezeMode, own_certs: bool
) -> tuple[list[str], list[str], list[str]]:
    """A change's checks, client steps and warnings, as its plan shows them (the warnings
    that depend on the cluster's state, ``PlanRollout`` adds)."""
    transitional = strategy is Strategy.TRANSITIONAL
    entries = ENTRIES + ENTRIES_BY_FREEZE[freeze]
    steps: Sequence[str]
    warnings: Sequence[str]
    if change is Change.ROTATE_CERT:
        checks, steps, warnings = list(ROTATE_CHECKS), ROTATE_CLIENT_STEPS, ROTATE_WARNINGS
    elif change is Change.CHANGE_PASSWORD:
        checks, steps, warnings = list(PASSWORD_CHECKS), PASSWORD_CLIENT_STEPS, PASSWORD_WARNINGS
    elif change is Change.DISABLE_TLS:
        checks, steps, warnings = list(DISABLE_CHECKS), DISABLE_CLIENT_STEPS, DISABLE_WARNINGS
    elif change is Change.FINALIZE:
        checks, steps, warnings = list(FINALIZE_CHECKS), CLIENT_STEPS, FINALIZE_WARNINGS
        entries = entries.replace("during the switch", "while a node restarts")
    elif transitional:
        checks, steps, warnings = list(TRANSITIONAL_CHECKS), CLIENT_STEPS, TRANSITIONAL_WARNINGS
        entries = entries.replace("during the switch", "while a node restarts")
    else:
        checks, steps, warnings = list(CHECKS), CLIENT_STEPS, SEED_WARNINGS
    if own_certs and change in (Change.ENABLE_TLS, Change.ROTATE_CERT):
        for i, line in OWN_CERT_CHECKS.items():
            checks[i] = line
    if own_certs and change is Change.ROTATE_CERT:
        steps = OWN_ROTATE_CLIENT_STEPS
    return checks, list(steps), [*warnings, entries]


def outside_scope_warning(
    change: Change,
    in_scope: Sequence[str],
    outside: Mapping[str, str],
    leader_node: str = "",
    other_certificate: Collection[str] = (),
    left_by: Mapping[str, str] | None = None,
) -> str:
    """The warning of a plan whose scope leaves enrolled nodes out (``--scope local``,
    ``--nodes``), in plain words before the start (the seed: the choice between the local node
    and the whole multiserver "should be thought through before the switch"): which nodes
    stay as they are, that the cluster is mixed afterwards, whose workstations are concerned,
    and how to finish. ``outside``: each enrolled node outside the plan with its server by
    its latest heartbeat (``NodeInfo.server``); ``other_certificate``: those of them on https
    with a certificate not known as one of this CA (``SchemaStore.other_certificates``), which
    the way to switch the rest leaves out (``leader.mixed_cluster``); ``left_by``: the rollout
    that left each node on http and https (``SchemaStore.left_dual``). "" where nothing is
    left different."""

    def them(names: Sequence[str]) -> str:
        return f"{some_names(names)} {'stays' if len(names) == 1 else 'stay'}"

    one = len(in_scope) == 1
    here = some_names(list(in_scope))
    if leader_node and list(in_scope) == [leader_node]:
        here = f"{leader_node} (the leader node)"
    if change is Change.ENABLE_TLS:
        left = sorted(n for n, s in outside.items() if served_scheme(s) == "http")
        if not left:
            return ""
        unknown = sorted(n for n, s in outside.items() if not served_scheme(s))
        dual = sorted(n for n, s in outside.items() if is_dual(s))
        other = sorted(n for n in other_certificate if https_only(outside.get(n, "")))
        return (
            f"Only {here} {'switches' if one else 'switch'} to https: {them(left)} "
            "on http, so the cluster is mixed afterwards (some servers on https, some on "
            "http). Only the workstations of the servers that switch need the client steps; "
            f"those of {some_names(left)} keep their http address. To switch the rest later: "
            f"{switch_the_rest(left, unknown, dual, other, left_by)} (tlsroll notify with the same "
            "scope tells the staff which servers change)."
        )
    if change is Change.DISABLE_TLS:
        left = sorted(n for n, s in outside.items() if served_scheme(s) == "https")
        if not left:
            return ""
        return (
            f"Only {here} {'goes' if one else 'go'} back to http: {them(left)} on "
            "https, so the cluster is mixed afterwards. Only the workstations of the servers "
            f"that go back need the old http address again; those of {some_names(left)} "
            "keep theirs."
        )
    if change is Change.CHANGE_PASSWORD:
        left = sorted(n for n, s in outside.items() if served_scheme(s) == "https")
        if not left:
            return ""
        on_http = sorted(n for n, s in outside.items() if served_scheme(s) == "http")
        unknown = sorted(n for n, s in outside.items() if not served_scheme(s))
        return (
            f"Only {here} {'gets' if one else 'get'} the new password: {them(left)} "
            f"on the password in use now, so a workstation set up at {some_names(left)} "
            "still needs the old one. To give them the new one too: "
            f"{password_the_rest(left, on_http, unknown)}."
        )
    return ""


def password_the_rest(left: Sequence[str], on_http: Sequence[str], unknown: Sequence[str]) -> str:
    """How to give the nodes ``left`` (sorted, on https with the old password) the staged one,
    capped as ``leader.mixed_cluster.rest_scope`` caps the way to switch the rest (review s69
    revlocal2 L4; session 69, smalls: this one still named every node in one ``--nodes``): up
    to ``NAMED`` by name; beyond, ``--scope cluster`` (the nodes with the staged password live
    are "already done"), unless nodes on http only (``on_http``) would have it refused: then
    ten at a time. ``unknown``: the nodes whose server is not known now, which a cluster
    rollout takes in too (said, with the way out)."""
    start = "tlsroll rollout start --change change-password"
    scope = rest_scope(left, cluster=not on_http)
    if len(left) <= NAMED:
        return f"{start} {scope}"
    if on_http:
        return (
            f"{start} {scope}, {NEXT} ({start} {CLUSTER} is refused while "
            f"{some_names(on_http)} {'is' if len(on_http) == 1 else 'are'} on http only)"
        )
    done = "the nodes with the new password already are left alone"
    return f"{start} {scope} ({done}{takes_in(unknown)})"
