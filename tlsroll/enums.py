"""Closed sets of values that the leader and the agents both use (the Python side of the
contract's enums; ``tlsroll.wire`` converts between the two at the gRPC boundary).

The values are the words an administrator reads and types (``tlsroll rollout start --change
enable-tls``, ``schema show --json``).
"""

from __future__ import annotations

from enum import StrEnum


class Change(StrEnum):
    """What a rollout does on each node."""

    ENABLE_TLS = "enable-tls"
    CHANGE_PASSWORD = "change-password"  # noqa: S105 (a change name, not a secret)
    ROTATE_CERT = "rotate-cert"
    DISABLE_TLS = "disable-tls"
    FINALIZE = "finalize"  # transitional phase 2: a dual node closes http


ENABLE_DUAL = "enable-tls+http"
"""A switch's change as the agent journals it (``Transaction.change``) for transitional phase 1
(enable-tls keeping http); the other switches' are their ``Change`` values."""


class TxnKind(StrEnum):
    """A transaction on a node moves the server forward (``switch``) or undoes a completed
    switch of the same rollout id (``rollback``)."""

    SWITCH = "switch"
    ROLLBACK = "rollback"


class TxnOutcome(StrEnum):
    """How a transaction on a node ended (``pending`` while it runs)."""

    PENDING = "pending"
    COMPLETED = "completed"  # the target is live, verified, writes accepted
    ROLLED_BACK = "rolled_back"  # the source is live again, verified, writes accepted
    FAILED = "failed"  # even the way back failed: the node needs a person


SERVER_RESTARTING = "restarting: "
"""How an agent's heartbeat view of its server (``ServerView.detail``) begins while a restart
its own transaction makes (a switch, or its way back) runs longer than the beat waits for it
(``NodeAgentService.server_view``), for its first 30 s: the leader shows it as it is, not as
"down", and logs no ``node.server_down``. Past those 30 s, or once it has failed (and no other
restart of the agent's own runs, as its way back's may), the view says what the server does."""

NEEDS_ADMIN = "needs the admin: "
"""How an agent's view of its server (``ServerView.detail``), its refusals and its preflight's
problem begin while its journal, put back from a copy, says the node needs the admin
(``nodeagent.journal``, ``Journal.needs_admin``); the leader tells such a node by it (`tlsroll
nodes`, the schema's node problems, the planner's ``NeedsAdmin``)."""

JOURNAL_PUT_BACK = "journal put back mid-"
"""How the reason begins (after ``NEEDS_ADMIN``) when the node needs the admin as its journal,
put back from a copy, left a transaction that what the server runs does not settle
(``nodeagent.transaction``'s settling of a copy): the agent refuses Stage, Switch and Rollback
with it. The leader tells such a refusal by these words (``names_journal_put_back``): the
agent's "none" of a step's transaction is no proof that nothing began, as the copy may be
older than the try that began it. An agent of an earlier release said the same words (and its
journal keeps them: they are written once, when the copy is settled)."""


def names_journal_put_back(said: str) -> bool:
    """Whether a refusal (``said``: its details) is an agent's whose journal was put back from
    a copy and needs the admin (``JOURNAL_PUT_BACK``), from this release or an earlier one; not
    one that holds a transaction on a journal it cannot write (``NEEDS_ADMIN`` too, whose
    journal lost nothing)."""
    return f"{NEEDS_ADMIN}{JOURNAL_PUT_BACK}" in said


ANOTHER_SWITCH = "already names another switch"
"""What an agent's refusal of a switch says when the command's rollout id already names a
switch of another change on the node (``another_switch``: a finalize sent under the phase-1
id): the leader tells it by these words (``names_another_switch``) and does not follow that
switch, which is not its step's. One text for both roles (session 72: the leader matched a
copy of the agent's English); an agent of an earlier release says the same words."""


def another_switch(rollout_id: str, done: str, change: str) -> str:
    """The agent's refusal of a ``change`` switch whose ``rollout_id`` names its switch of
    another change (``done``) on the node."""
    return (
        f"rollout id {rollout_id} {ANOTHER_SWITCH} on this node ({done}); {change} needs a "
        "rollout id of its own"
    )


def names_another_switch(said: str) -> bool:
    """Whether a refusal (``said``: its details) is ``another_switch``'s, from this release or
    an earlier one."""
    return ANOTHER_SWITCH in said


SERVER_NOT_HEALTHY = "managed server not healthy: "
"""How an agent's preflight problem begins when its managed server is down or not answering:
the way back (disable-tls) goes on past it when the server's config is on https (the agent's
switch restores http and starts the server); every other change fails its preflight there."""


def of_server(said: str) -> str:
    """What a driver said of the managed server (a ``DriverError``: "managed server not
    answering on …"), for words that name the server before it (``SERVER_NOT_HEALTHY``, the
    leader's "the managed server: "): without its own "managed server " it reads once
    (session 68: "the managed server: managed server not answering …")."""
    for named in ("the managed server ", "managed server "):
        if said.startswith(named) and said[len(named) :].strip():
            return said[len(named) :]
    return said


def problem_of_server(problem: str) -> str:
    """An agent's preflight problem as the leader words it: one that begins with
    ``SERVER_NOT_HEALTHY`` names the server once (``of_server``). An agent of an earlier
    release sends "managed server not healthy: managed server not answering …" (session 68)."""
    if problem.startswith(SERVER_NOT_HEALTHY):
        return f"{SERVER_NOT_HEALTHY}{of_server(problem[len(SERVER_NOT_HEALTHY) :])}"
    return problem


CONFIG_UNREADABLE = "its config cannot be read"
"""How an agent's view of its server (``ServerView.detail``) begins (then ", fix the file: ",
the problem, and the file's path, which a leader may cut) when the server's config file cannot
be read (edited by hand: not valid TOML, a key of the wrong kind): the server may still run on
what it loaded before. The leader's plan then says to fix the file, not to bring the agent up
or start the server (review rev58a H1: every heartbeat failed, and the node looked offline)."""

SERVES_PREVIOUS = "serves its previous settings: "
"""How an agent's bootstrap problem (``LiveServer.bootstrap_problem``) begins when its service
runs but serves the settings it last read, its journal unread for a minute (a new password or a
rollback not in effect: ``nodeagent.bootstrap_supervisor``); the leader tells it from a service
that did not start by it, and words it so (``leader.service.LeaderState.node_problems``, the
viewer's page): the contract has one problem kind for both (``bootstrap-down``)."""

NO_SETTINGS = "no settings in the agent's journal: "
"""How an agent's bootstrap problem (``LiveServer.bootstrap_problem``) begins when its server
serves https with an auth password but its journal holds no live https settings (begun again
with ``--reinitialise``, or put back from a copy older than the node's switch), so that no
bootstrap service runs there and only a switch (a rotate-cert) brings one back
(``nodeagent.bootstrap_supervisor.BootstrapHost.lacking``). The leader words it as that node's
problem, with the rotate-cert, and its plan that finds the node done names the same
(``leader.service.bootstrap_problem``, ``leader.planner.NO_SETTINGS_SKIP``; session 75
https9443: the node looked fine, and an enable-tls said "nothing to do")."""

CAP_SOURCE = "over the hourly cap"
"""The ``source`` of a node's bootstrap failures (``schema show``, the viewer, the metrics)
that counts PCs refused a certificate there, the node's hour's cap of workstation certificates
signed (``workstation_certs_per_hour`` in leader.toml) reached, not wrong passwords from an
address: the leader records them itself (``LeaderService.SignWorkstationCertificate``); on
switch day it says why PCs could not enrol (review s64 M3). No address reads so."""

RETRY_AFTER_KEY = "x-tlsroll-retry-after"
"""The trailing-metadata key of a leader's RESOURCE_EXHAUSTED refusal to sign a workstation's
certificate (the node's hourly cap): whole seconds until it signs again. The node's bootstrap
service answers the PC 429 with them as Retry-After."""
