"""``/metrics``: the schema in Prometheus' text format, made from one ``Snapshot`` per scrape.

Each scrape builds a private ``CollectorRegistry`` from the stores (nothing is kept between
scrapes, and the process-wide default registry is not used). The histograms count every node
of every rollout in the schema, so their counts only grow, as Prometheus expects of them.

    tlsroll_rollouts{state}                          rollouts in each state
    tlsroll_rollout_node_state{rollout,node,state}   1 for the state a node of the newest
                                                     rollout is in, 0 for the others
    tlsroll_node_online{node}                        1 if the node's heartbeats arrive
    tlsroll_node_heartbeat_age_seconds{node}         since its last heartbeat
    tlsroll_node_clock_offset_seconds{node}          its clock less the leader's (+: ahead), from
                                                     its heartbeats; absent: not known
    tlsroll_node_agent_store_trouble{node}           1 if its agent says it cannot write its
                                                     store safely (node problem `agent-store`:
                                                     its journal's checkpoint fails, or free
                                                     space is low for a switch), 0 otherwise
    tlsroll_still_on_http{node}                      workstations still on http there, by its
                                                     client report (every enrolled node; 0:
                                                     none), as `schema show` counts them
    tlsroll_freeze_window_seconds                    how long nodes refused writes (each agent's
                                                     measure in elapsed time; from an older
                                                     agent, its wall-clock times' difference,
                                                     never below 0: ``SchemaStore.switch_times``)
    tlsroll_restart_seconds                          how long the managed server's restart took
    tlsroll_certificate_expiry_timestamp_seconds{kind,subject,fingerprint}
                                                     when clients stop accepting it: its end,
                                                     or its chain's where that comes first (a
                                                     ``--cert-dir`` one's), as the expiry
                                                     watch warns by; workstations' as the
                                                     watch lists them
    tlsroll_certificate_own_expiry_timestamp_seconds{kind,subject,fingerprint,chain}
                                                     only where the chain ends first: the
                                                     certificate's own end; ``chain``: the
                                                     subject of the chain's certificate that
                                                     ends first
    tlsroll_certificate_revoked{kind,subject,fingerprint}
                                                     each node's served (8443) certificate: 1
                                                     if the admin revoked it (`tlsroll ca
                                                     revoke`) and the node still serves it,
                                                     as its heartbeats report it where they do
                                                     (``expiry.served_now``'s ``reported``),
                                                     else as the rollouts recorded it (the
                                                     practice's clients read no revocation
                                                     list: replace it, rotate-cert), else 0
    tlsroll_password_change_pending{node}            1: a new password waits for change-password
    tlsroll_bootstrap_failures{node,source}          wrong passwords on 9443, last 30 days
    tlsroll_server_login_failures{node}              wrong client passwords at the node's
                                                     server, kept across its restarts (nodes
                                                     with some)
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from leader.rollout_core import NodeState, RolloutState
from leader.viewer.snapshot import Snapshot
from leader.wire import NODE_STATE, ROLLOUT_STATE
from tlsroll.enums import CAP_SOURCE
from tlsroll.v1 import schema_pb2

SECONDS_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# No ``_created`` samples: a histogram's is when its registry made it, a new one at every scrape
# (nothing is kept between scrapes), so each scrape said the series began anew (review s63 L2).
# Process-wide in prometheus_client; the leader uses it for this only.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


def render(snap: Snapshot) -> bytes:
    """The text exposition of ``snap``, which must have been read with its switch times
    (``Reader.read(times=True)``): a ``ValueError`` otherwise, rather than histograms that say
    no node ever switched."""
    if snap.switch_times is None:
        raise ValueError("metrics.render needs a snapshot read with times=True (switch_times)")
    registry = CollectorRegistry(auto_describe=True)
    rollouts = Gauge(
        "tlsroll_rollouts", "Rollouts in the schema by state.", ["state"], registry=registry
    )
    counts = {s.value: 0 for s in RolloutState}
    for r in snap.schema.rollouts:
        counts[ROLLOUT_STATE.text(r.state)] += 1
    for state, count in counts.items():
        rollouts.labels(state).set(count)

    node_state = Gauge(
        "tlsroll_rollout_node_state",
        "1 for the state each node of the newest rollout is in, 0 for the other states.",
        ["rollout", "node", "state"],
        registry=registry,
    )
    if snap.schema.rollouts:
        newest = snap.schema.rollouts[0]
        for n in newest.nodes:
            current = NODE_STATE.text(n.state)
            for s in NodeState:
                node_state.labels(newest.id, n.name, s.value).set(int(s.value == current))

    online = Gauge(
        "tlsroll_node_online", "1 if the node's heartbeats arrive.", ["node"], registry=registry
    )
    age = Gauge(
        "tlsroll_node_heartbeat_age_seconds",
        "Seconds since the node's last heartbeat (absent: never).",
        ["node"],
        registry=registry,
    )
    clock = Gauge(
        "tlsroll_node_clock_offset_seconds",
        "The node's clock less the leader's (+: ahead), from its heartbeats (absent: not known).",
        ["node"],
        registry=registry,
    )
    store_trouble = Gauge(
        "tlsroll_node_agent_store_trouble",
        "1 if the node's agent says it cannot write its store safely (node problem agent-store:"
        " its journal's checkpoint fails, or free space is low for a switch), else 0.",
        ["node"],
        registry=registry,
    )
    troubled = {
        p.node
        for p in snap.schema.node_problems
        if p.kind == schema_pb2.NODE_PROBLEM_KIND_AGENT_STORE
    }
    on_http = Gauge(
        "tlsroll_still_on_http",
        "Workstations still on http at the node, by its client report (as `schema show`).",
        ["node"],
        registry=registry,
    )
    for node in snap.nodes:
        on_http.labels(node.name).set(snap.on_http_count(node.name))
        online.labels(node.name).set(int(node.online))
        store_trouble.labels(node.name).set(int(node.name in troubled))
        if node.heartbeat_age is not None:
            age.labels(node.name).set(node.heartbeat_age)
        if node.clock_offset is not None:
            clock.labels(node.name).set(node.clock_offset)

    freeze = Histogram(
        "tlsroll_freeze_window_seconds",
        "How long a node refused writes during its switch (every node of every rollout).",
        buckets=SECONDS_BUCKETS,
        registry=registry,
    )
    restart = Histogram(
        "tlsroll_restart_seconds",
        "How long the managed server took to restart during a switch.",
        buckets=SECONDS_BUCKETS,
        registry=registry,
    )
    windows, restarts = snap.switch_times
    for seconds in windows:
        freeze.observe(seconds)
    for seconds in restarts:
        restart.observe(seconds)

    # The end clients go by, the expiry watch's (review s48: a --cert-dir certificate's own
    # end, and an alert on it missed its chain's, which comes first); the name and labels are
    # the same as before, for the dashboards and alerts on them.
    expiry = Gauge(
        "tlsroll_certificate_expiry_timestamp_seconds",
        "When clients stop accepting a certificate (Unix time): its end, or its chain's if that "
        "comes first (tlsroll_certificate_own_expiry_timestamp_seconds has its own then). The "
        "CA, the leader's, the viewer's, each node's agent certificate, the certificate each "
        "node serves on 8443 and the workstations' (as the expiry watch lists them).",
        ["kind", "subject", "fingerprint"],
        registry=registry,
    )
    own_expiry = Gauge(
        "tlsroll_certificate_own_expiry_timestamp_seconds",
        "A certificate's own end (Unix time), where its chain ends first: chain names the "
        "chain's certificate that does.",
        ["kind", "subject", "fingerprint", "chain"],
        registry=registry,
    )
    for cert in snap.certificates:
        expiry.labels(cert.kind, cert.subject, cert.fingerprint).set(cert.end.timestamp())
        if cert.chain_end is not None:
            own_expiry.labels(cert.kind, cert.subject, cert.fingerprint, cert.chain).set(
                cert.not_after.timestamp()
            )

    # A revoked served certificate's end is still when clients stop taking it (they read no
    # revocation list), so the expiry gauge stays as it is; this one is what an alert on "replace
    # it now" reads (before, the metrics showed no revocation at all).
    revoked = Gauge(
        "tlsroll_certificate_revoked",
        "1 if the certificate a node serves on 8443 was revoked (tlsroll ca revoke) and the node "
        "still serves it: its clients take it until its end; replace it (rotate-cert). 0: not "
        "revoked.",
        ["kind", "subject", "fingerprint"],
        registry=registry,
    )
    for cert in snap.certificates:
        if cert.kind == "server":
            revoked.labels(cert.kind, cert.subject, cert.fingerprint).set(int(cert.revoked))

    pending = Gauge(
        "tlsroll_password_change_pending",
        "1 if a newer auth password is staged than the one live on the node.",
        ["node"],
        registry=registry,
    )
    for name in snap.pending_passwords:
        pending.labels(name).set(1)

    failures = Gauge(
        "tlsroll_bootstrap_failures",
        "Wrong passwords on a node's bootstrap port (9443) from one source, last 30 days "
        f'(source "{CAP_SOURCE}": workstations refused a certificate, the node\'s hour full).',
        ["node", "source"],
        registry=registry,
    )
    for f in snap.schema.bootstrap_failures:
        failures.labels(f.node, f.source).set(f.count)

    guessed = Gauge(
        "tlsroll_server_login_failures",
        "Wrong client passwords at a node's server's own login (kept across its restarts).",
        ["node"],
        registry=registry,
    )
    for g in snap.schema.server_login_failures:
        guessed.labels(g.node).set(g.count)
    return generate_latest(registry)
