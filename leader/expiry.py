"""The expiry watch: every certificate the cluster depends on, with its residual time and its
warning horizon (``tlsroll certs check-expiration``, the schema, and a log line per certificate
at most once a day).

    watch = ExpiryWatch(store, schema, ca, own_certs, clock, warning_days=30,
                        agent_lifetime=dt.timedelta(days=30))
    entries = watch.check()               # blocking (reads the store and public certificates)
    await watch.run(stop)                 # checks every hour, logs what is within its horizon

What is watched, and from where (no key is ever read):

* ``ca``: the cluster CA (the certificate in use: ``tlsroll ca renew`` replaces it while the
  leader runs); warned a year ahead, with the renewal as the advice (docs/ca-renewal.md). No
  leaf outlives it (``pki.CertificateAuthority.issue``): a certificate that ends with it is
  marked ``ends_with_ca`` and is not rotated for being near its end (a new one would end no
  later); once the CA is renewed, its leaves are no longer cut, and those that ended with
  the old certificate are renewed or rotated as any other.
* ``leader``, ``viewer``: the leader's own certificates, from ``DATA/tls`` (``own_certs``).
  The leader issues them again by itself, ahead of their warning (``leader.layout.
  own_renew_before``): their horizon is ``expiry_warning_days`` cut to come after that
  (``own_warn_before``), so that a warning of one is a renewal that failed, never a month of
  nothing to do (review s46rt1 L2). One the admin revoked (``tlsroll ca revoke``) is marked
  ``revoked``: the leader issues it again at once (``leader.own_tls``, the viewer's
  ``renew_if_due``), so a revoked one listed is one it could not issue again.
* ``agent``: each enrolled node's own mTLS certificate as on record. Agents renew it by
  themselves at 30-40 % of its life, so it is warned about once less than half is left: the
  renewal is overdue by a tenth of the life at least (the node is off, or cannot reach the
  leader), with half the life (15 days of 30) still left to bring it back.
* ``server``: each node's 8443 certificate as the rollouts recorded it (the newest
  ``enable-tls`` or ``rotate-cert`` that ended ``done`` on the node, unless a ``disable-tls``
  came after), with its serial from the certificates table. One of the practice's own
  (``--cert-dir``) whose chain (an intermediate, the practice CA) ends before it is watched by
  the chain's end, which its advice names (``SchemaStore.own_chain_ends``): the chain was
  checked only at the rollout's start (review s46rt1 L4). One the admin revoked (`tlsroll ca
  revoke` of its serial) is marked ``revoked``, whatever its end: the node goes on serving it,
  and the practice's clients, which read no revocation list, go on taking it, until a
  ``rotate-cert`` replaces it (``auto_rotate`` counts it due). Before, it was "ok" everywhere
  but in the schema's list of revoked certificates (review s64 pki M1).
* ``workstation``: every workstation certificate that is neither revoked nor expired, and the
  newest of a name that ended less than ``expiry_warning_days`` ago (the PC lost it: "expired").

``server`` and ``workstation`` certificates are warned about ``expiry_warning_days``
(leader.toml, default 30) before their end; ``leader`` and ``viewer`` as well, up to half of
their life (beyond it, at half their life less two days: ``own_warn_before``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509

from leader.layout import own_warn_before
from leader.schema_store import SchemaStore
from leader.store import CARenewed, IssuedCert, Node, Store
from leader.store_rules import join_again, token_command
from tlsroll import logs, pki
from tlsroll.errors import PKIError

log = logs.get_logger(__name__)

CA_HORIZON = dt.timedelta(days=365)
AGENT_HORIZON_FRACTION = 0.5  # agents renew by 40 % of the life; past half is overdue
CHECK_EVERY = 3600.0  # seconds
WARN_EVERY = dt.timedelta(days=1)  # per certificate

ADVICE = {
    "ca": "no certificate the CA issues lives past its end: renew it with the same key "
    "(`tlsroll ca renew`; its pin and every certificate stay), let the agents renew their "
    "certificates (within 40 % of their life; they take the renewed CA then), then "
    "`tlsroll rollout start --change rotate-cert` for the managed servers, then "
    "`tlsroll client test-connection` on every workstation "
    "(/usr/share/doc/tlsroll/docs/ca-renewal.md)",
    "leader": "the leader should have issued it again by itself (a check of the expiry watch "
    "before this warning): look for expiry_watch.hook_failed in the leader's log, or restart "
    "the leader, which issues it at its start",
    "viewer": "the leader should have issued it again by itself (a check of the expiry watch "
    "before this warning): look for expiry_watch.hook_failed in the leader's log, or restart "
    "the leader, which issues it at its start",
    "revoked": "it was revoked (`tlsroll ca revoke`), and the leader should have issued it "
    "again for a new key at once: look for leader.certificate_revoked_not_reissued, "
    "certificate.revoked_hook_failed or (the expiry watch's hourly tries) "
    "expiry_watch.hook_failed in the leader's log, or restart the leader, which issues it at "
    "its start",
    "agent": "the agent renews it by itself: see `tlsroll nodes` for a failing renewal; if it "
    "has expired (the node was offline past its end), check the node's clock, then enrol it "
    "again with its own key, no removal needed (also while a rollout holds it): JOIN (a "
    "running agent does not read a new token) (`tlsroll nodes remove NAME` is for a machine "
    "lost or stolen)",
    "server": "rotate it: tlsroll rollout start --change rotate-cert (a node serving the "
    "practice's own certificate: renew it and add --cert-dir DIR)",
    # A node's served certificate the admin revoked (``Expiry.revoked``; NODE: its node).
    "server_revoked": "it was revoked, and the node still serves it as far as the leader "
    "knows: the practice's clients read no revocation list and take it until its end; replace "
    "it now: "
    "tlsroll rollout start --change rotate-cert --nodes NODE (with auto_rotate, the leader "
    "starts that itself in the maintenance window)",
    "workstation": "run `tlsroll client renew` on that workstation (no password; best on a "
    "schedule: README, Workstations); once it has ended, `tlsroll client test-connection` "
    "with the password (or, if the PC is gone: tlsroll workstations revoke NAME)",
}
# A practice's own server certificate whose chain ends first (``Expiry.chain`` names it).
CHAIN_ENDS_FIRST = (
    "its chain's {chain} ends then, before the certificate itself, and clients refuse it "
    "from that moment: have the practice renew that CA certificate (or issue new certificates "
    "under one that outlives them), then tlsroll rollout start --change rotate-cert --nodes "
    "{node} --cert-dir DIR"
)
# A CA certificate a `tlsroll ca renew` replaced, while some still hold it alone (``holders``):
# one line for each such certificate (after a second renewal, the first one's too).
PREVIOUS_CA = (
    "the CA certificate {serial} that `tlsroll ca renew` replaced ends {end:%Y-%m-%d}, and "
    "these were handed it and not a renewed one since; each stops trusting the cluster at "
    "that end: {holders}"
)
# Holders issued before the first recorded renewal's replaced certificate was made (a gap in
# the record: a release that kept the last renewal alone made two or more): they hold an
# earlier one, not recorded, whose serial and end are unknown (``earliest_recorded``).
EARLIER_CA = (
    "a CA certificate earlier than {serial}, replaced by a `tlsroll ca renew` that the store "
    "does not record (a release that kept the last renewal alone made it), so its end is "
    "unknown (by {end:%Y-%m-%d} unless that renewal was forced), and these were handed it "
    "and not a renewed one since; each stops trusting the cluster at that end: {holders}"
)
PREVIOUS_HOLDERS = {
    "agent": "agents not renewed since (they take it with their next certificate renewal, "
    "within 40 % of their certificate's life; `tlsroll nodes`)",
    "server": "managed servers staged before it (`tlsroll rollout start --change rotate-cert`)",
    "workstation": "workstations enrolled before it (`tlsroll client test-connection` on each)",
}
# A certificate that ends with the CA: issuing it again gives one that ends no later.
ENDS_WITH_CA = "it ends with the cluster CA, and no new one would outlive the CA: see the CA's line"


@dataclass(frozen=True)
class Expiry:
    kind: str  # ca | leader | viewer | agent | server | workstation
    subject: str
    serial: str
    fingerprint: str
    not_after: dt.datetime
    horizon: dt.timedelta
    # Its end is the CA's (or later): a new one would end no later, so it is not renewed or
    # rotated for being near its end (``pki.ends_with_ca``); the CA's own entry says what to do.
    ends_with_ca: bool = False
    # An agent's: the `tlsroll token create` for its node's names (``store_rules.token_command``).
    token: str = ""
    # A server certificate of the practice's own whose chain ends first: the chain's
    # certificate that does (its subject); ``not_after`` is then its end.
    chain: str = ""
    # A CA certificate a renewal replaced (kind ``ca``, subject ``previous``): who was
    # handed it and not a renewed one since, by kind (``PREVIOUS_HOLDERS``).
    holders: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Of such holders: the certificate they hold is earlier than the first recorded renewal's
    # (``earliest_recorded``): ``serial`` is the first recorded replaced certificate's, and
    # ``not_after`` the latest its unknown end can be, unless a forced renewal replaced it.
    earlier: bool = False
    # Revoked (``ExpiryWatch.check``): the leader's or the viewer's, still the one on disk; a
    # node's server certificate, still the one it serves as the rollouts recorded it.
    revoked: bool = False

    def residual(self, now: dt.datetime) -> dt.timedelta:
        return self.not_after - now

    def warning(self, now: dt.datetime) -> bool:
        return within(self.not_after, self.horizon, now)

    @property
    def advice(self) -> str:
        if self.revoked and self.kind == "server":
            return ADVICE["server_revoked"].replace("NODE", self.subject)
        if self.revoked:
            return ADVICE["revoked"]
        if self.chain:
            return CHAIN_ENDS_FIRST.format(chain=self.chain, node=self.subject)
        if self.holders:
            return (EARLIER_CA if self.earlier else PREVIOUS_CA).format(
                serial=self.serial[:8],
                end=self.not_after,
                holders="; ".join(
                    f"{PREVIOUS_HOLDERS[kind]}: {', '.join(names)}" for kind, names in self.holders
                ),
            )
        if self.ends_with_ca and self.kind != "ca":
            return ENDS_WITH_CA
        advice = ADVICE.get(self.kind, "")
        if self.kind == "workstation":  # (its subject is the PC's name, ws-…)
            return advice.replace("NAME", self.subject)
        if self.kind != "agent":
            return advice
        # An agent's subject is its node's name: the commands name it, and its names.
        join = join_again(
            self.subject,
            self.token or token_command(self.subject),
            "systemctl restart tlsroll-agent",
        )
        return advice.replace("NAME", self.subject).replace("JOIN", join)


def within(not_after: dt.datetime, horizon: dt.timedelta, now: dt.datetime) -> bool:
    """Whether a certificate that ends at ``not_after`` is warned about at ``now``: the rule of
    the watch, and of the viewer's "near expiry" (``leader.viewer.snapshot``)."""
    return not_after - now <= horizon


def horizon_of(kind: str, warning: dt.timedelta) -> dt.timedelta:
    """How near its end a ``ca``, ``leader``, ``viewer``, ``server`` or ``workstation``
    certificate is warned about, given ``expiry_warning_days`` (``warning``); an agent's is
    its own (``agent_horizon``). The watch's and the viewer's (review s48: the viewer marked
    every one but agents' on a fixed 30 days)."""
    if kind == "ca":
        return CA_HORIZON
    if kind in ("leader", "viewer"):
        return own_warn_before(warning)
    return warning


def served_end(
    not_after: dt.datetime, chain: tuple[str, dt.datetime] | None
) -> tuple[dt.datetime, str]:
    """A served certificate's end as watched, given its chain's end if one was recorded
    (``SchemaStore.own_chain_ends``): (its end, "") or, if the chain ends first, (the chain's
    end, the subject of the chain's certificate that ends then)."""
    if chain is not None and chain[1] < not_after:
        return chain[1], chain[0]
    return not_after, ""


def watched_workstations(
    certs: Iterable[IssuedCert], now: dt.datetime, horizon: dt.timedelta
) -> list[IssuedCert]:
    """Of ``certs``, the workstation certificates the watch lists (and the viewer's "near
    expiry" with it: ``leader.viewer.snapshot``, review s48): those not revoked until they end
    and, a name's newest, for ``horizon`` after (review s46rt1 M2: it left the list the
    moment the PC lost it, and a monitoring check of `certs check-expiration` turned green
    then); one superseded by a newer one of its name (the PC enrolled again) is not. Those
    that ended ``horizon`` or longer ago may be left out of ``certs``
    (``Store.workstation_certificates``): a name's newest is then the same."""
    mine = [c for c in certs if c.kind == "workstation" and c.revoked_at is None]
    newest: dict[str, dt.datetime] = {}
    for c in mine:
        newest[c.subject] = max(newest.get(c.subject, c.not_after), c.not_after)
    return [
        c
        for c in mine
        if c.not_after > now or (c.not_after == newest[c.subject] and now - c.not_after < horizon)
    ]


def renewals_to(renewals: Sequence[CARenewed], ca: x509.Certificate) -> list[CARenewed]:
    """Of ``renewals`` (``Store.ca_renewals``), those that led to ``ca``, oldest first: the one
    that made it, the one that made the certificate that one replaced, and so on. One whose
    certificate was never put in place (``CARenewalNotInPlace``: the next renewal replaced
    the same certificate again) is not among them. ``[]``: ``ca`` is no renewal's (none was
    made, or a backup from before them was restored)."""
    made = {r.serial: r for r in renewals}
    chain: list[CARenewed] = []
    serial = f"{ca.serial_number:x}"
    while serial in made and all(r.serial != serial for r in chain):
        chain.append(made[serial])
        serial = made[serial].previous_serial
    return chain[::-1]


def held_at(chain: Sequence[CARenewed], issued_at: dt.datetime) -> int | None:
    """Which CA certificate a peer handed the one in use at ``issued_at`` holds, given the
    renewals that led to the one in use now (``renewals_to``): ``i``, the one ``chain[i]``
    replaced (the first renewal made after that time); None: the one in use now."""
    for i, renewal in enumerate(chain):
        if issued_at < renewal.at:
            return i
    return None


def earliest_recorded(chain: Sequence[CARenewed]) -> dt.datetime:
    """When the certificate the first recorded renewal replaced (``chain[0]``'s previous) was
    made: every CA certificate, the first (``tlsroll init``) and each renewal's, ends
    ``pki.CA_VALIDITY_DAYS`` after it was made (its start says nothing: a renewal keeps the
    first one's). A holder issued before it holds an earlier certificate, of a renewal not
    recorded (review s49 L3: it was taken for ``chain[0]``'s previous, which ends years
    later, and its holders were never warned)."""
    return chain[0].previous_not_after - dt.timedelta(days=pki.CA_VALIDITY_DAYS)


def agent_horizon(node: Node, lifetime: dt.timedelta) -> dt.timedelta:
    """How near its end ``node``'s agent certificate is warned about: once less than half of
    its own life is left (agents renew by 40 %), counted from when the leader signed it (its
    enrolment or last renewal). Its own life, not ``agent_cert_lifetime`` (review s47rev1 M1:
    a lifetime raised before a closure warned about every node's shorter certificate at once,
    and one lowered warned late); ``lifetime``'s half if that time is not known."""
    life = node.cert_not_after - (node.cert_renewed_at or node.enrolled_at)
    if life <= dt.timedelta(0):
        life = lifetime
    return life * AGENT_HORIZON_FRACTION


def _of(kind: str, subject: str, cert: x509.Certificate, horizon: dt.timedelta) -> Expiry:
    return Expiry(
        kind,
        subject,
        f"{cert.serial_number:x}",
        pki.fingerprint(cert),
        cert.not_valid_after_utc,
        horizon,
    )


def _marked(found: list[Expiry], ca: x509.Certificate) -> list[Expiry]:
    """``found`` with ``ends_with_ca`` set on every certificate but the CA that ends with it
    (or after it: one issued before leaves were cut to the CA's end)."""
    end = ca.not_valid_after_utc
    return [
        replace(e, ends_with_ca=True)
        if e.kind != "ca" and not e.chain and e.not_after >= end
        else e
        for e in found
    ]


def served_now(
    store: Store,
    schema: SchemaStore,
    certs: Sequence[IssuedCert] | None = None,
    reported: Mapping[str, str] | None = None,
) -> dict[str, tuple[str, dt.datetime, bool]]:
    """Per node, the certificate it serves on 8443 as the rollouts recorded it
    (``SchemaStore.served_certificates``): (fingerprint, end, revoked). None recorded before
    the name's last `tlsroll nodes remove` (``schema_store.before_removal``): such a record is
    the removed machine's, and a node enrolled again under its name serves nothing the leader
    recorded until a rollout switches it; it was shown as serving a revoked certificate, and
    auto_rotate tried to rotate a node on http at every check (the review of s64-rev, M1). By
    when the name was removed, not by the revocation's reason (review rvc of s66-misc, M1:
    one the admin revoked before the removal kept the admin's reason, and was shown as the
    new machine's). ``revoked``: revoked whatever the reason (`tlsroll ca revoke`; a removal
    after the rollout cannot be: it drops the record): a rotation revokes the certificate a
    node served before, never the one it serves now. The watch's, the viewer's and the
    metrics' (which showed neither rule: the removed machine's as served, and a revoked one
    as any other). ``certs``: the store's certificates, if read already; else only the
    revocations of the served ones are read (``Store.revocations_of``: a viewer's read after
    each write must not parse every certificate ever issued).

    ``reported``: per node, the certificate its server serves https with as its latest
    heartbeat said (``LeaderState.served_fingerprints``): where it is another than the record
    (or there is none) and the CA issued it for that node (a server certificate on record:
    its end is known), it is what the node serves, as the plan finds it when it asks the node
    (``Commands._mark_revoked``). So every view says the same of a machine enrolled again
    after `tlsroll nodes remove` that still serves its certificate the removal revoked: the
    plan said "replace it", the others nothing (review rvc of s66-misc, L2). Any other (the
    practice's own, ``--cert-dir``; one of another node) leaves the record as it is.
    Blocking."""
    served = dict(schema.served_certificates())
    heard = {
        name: fingerprint
        for name, fingerprint in (reported or {}).items()
        if fingerprint and fingerprint != served.get(name, ("", None))[0]
    }
    if heard:
        if certs is None:
            known = store.server_certificates_of(heard.values())
        else:
            known = {c.fingerprint: c for c in certs if c.kind == "server" and c.fingerprint}
        for name, fingerprint in heard.items():
            if (c := known.get(fingerprint)) is not None and c.node == name:
                served[name] = (fingerprint, c.not_after)
    if certs is None:
        why = store.revocations_of([fingerprint for fingerprint, _ in served.values()])
    else:
        why = {
            c.fingerprint: c.revoke_reason
            for c in certs
            if c.kind == "server" and c.fingerprint and c.revoked_at is not None
        }
    return {
        name: (fingerprint, end, fingerprint in why) for name, (fingerprint, end) in served.items()
    }


class ExpiryWatch:
    def __init__(
        self,
        store: Store,
        schema: SchemaStore,
        ca: x509.Certificate | Callable[[], x509.Certificate],
        own_certs: Callable[[], Sequence[tuple[str, x509.Certificate]]],
        clock: Callable[[], dt.datetime],
        *,
        warning_days: float = 30,
        agent_lifetime: dt.timedelta = dt.timedelta(days=30),
        check_every: float = CHECK_EVERY,
    ) -> None:
        """``ca``: the CA certificate, or what gives the one in use now (the leader's, which
        ``tlsroll ca renew`` replaces while it runs); ``own_certs`` gives the leader's own
        certificates (kind, certificate) as they are on disk now: ``leader``, ``viewer``."""
        self.store = store
        self.schema = schema
        self._ca = ca
        self.own_certs = own_certs
        self.clock = clock
        self.horizon = dt.timedelta(days=warning_days)
        self.agent_lifetime = agent_lifetime
        self.agent_horizon = agent_lifetime * AGENT_HORIZON_FRACTION  # the check's cadence
        self.check_every = check_every
        self._warned: dict[tuple[str, str, str], dt.datetime] = {}
        # Called on the event loop before each periodic check, one after the other; a hook
        # that returns an awaitable is awaited before the next (the viewer renews its
        # certificate there: ``leader.viewer.server.Viewer.renew_if_due``; ``auto_rotate``
        # starts its rollout there: ``leader.auto_rotate.AutoRotator.check``).
        self.before_check: list[Callable[[], object]] = []
        # Asked after each check: seconds until the next one is wanted, or None; the watch
        # waits for the soonest, at most ``every`` (``AutoRotator.wake_in``: the maintenance
        # window's opening, while a server certificate waits for it).
        self.wake_hints: list[Callable[[], float | None]] = []
        # What each node's heartbeats say its server serves (``served_now``'s ``reported``;
        # ``LeaderState.served_fingerprints``), set by the daemon; none by default.
        self.reported: Callable[[], Mapping[str, str]] = dict

    @property
    def ca(self) -> x509.Certificate:
        """The CA certificate in use now."""
        return self._ca if isinstance(self._ca, x509.Certificate) else self._ca()

    def served(
        self, certs: Sequence[IssuedCert] | None = None
    ) -> dict[str, tuple[str, dt.datetime]]:
        """Per node, the certificate it serves on 8443 (``served_now``): (fingerprint, end).
        ``certs``: the store's certificates, if read already. Blocking."""
        return {
            name: (fingerprint, end)
            for name, (fingerprint, end, _) in served_now(
                self.store, self.schema, certs, self.reported()
            ).items()
        }

    def check(self) -> list[Expiry]:
        """Every watched certificate, soonest end first (blocking)."""
        now = self.clock()
        ca = self.ca
        found = [_of("ca", "", ca, horizon_of("ca", self.horizon))]
        found += [
            replace(
                _of(kind, "", cert, horizon_of(kind, self.horizon)),
                revoked=self.store.is_revoked(f"{cert.serial_number:x}"),
            )
            for kind, cert in self.own_certs()
        ]
        for n in self.store.list_nodes():
            found.append(
                Expiry(
                    "agent",
                    n.name,
                    n.cert_serial,
                    n.cert_fingerprint,
                    n.cert_not_after,
                    agent_horizon(n, self.agent_lifetime),
                    token=token_command(n.name, n.addresses, n.dns_names),
                )
            )
        certs = self.store.list_certificates()
        serial_of = {c.fingerprint: c.serial for c in certs if c.fingerprint}
        enrolled = {n.name for n in self.store.list_nodes()}
        chains = self.schema.own_chain_ends()
        served = served_now(self.store, self.schema, certs, self.reported())
        for name, (fingerprint, not_after, revoked) in sorted(served.items()):
            if name in enrolled:
                end, chain = served_end(not_after, chains.get(fingerprint))
                found.append(
                    Expiry(
                        "server",
                        name,
                        serial_of.get(fingerprint, ""),
                        fingerprint,
                        end,
                        horizon_of("server", self.horizon),
                        chain=chain,
                        revoked=revoked,
                    )
                )
        found += [
            Expiry(c.kind, c.subject, c.serial, c.fingerprint, c.not_after, self.horizon)
            for c in watched_workstations(certs, now, self.horizon)
        ]
        found += self._previous_cas(ca, certs, now)
        return sorted(_marked(found, ca), key=lambda e: (e.not_after, e.kind, e.subject))

    def _previous_cas(
        self, ca: x509.Certificate, certs: Sequence[IssuedCert], now: dt.datetime
    ) -> list[Expiry]:
        """The CA certificates the ``tlsroll ca renew``s that led to ``ca`` replaced (review
        s48rev1 M2), each as long as some were handed it and not a renewed one since (review
        s48rev5 M2: the last renewal's alone, so after a second one nobody was warned of who
        still held the first one's). Each holder is judged by the CA certificate in use when
        it was last issued (``held_at``): agents by when their certificate was last issued (a
        renewal's answer, or the join, carries the CA certificate in use), nodes by their
        served certificate (the stage sent the CA certificate in use as the server's client
        CA) and workstations by their newest certificate, not ended (the bootstrap handed
        them the bundle of then); one issued before the first recorded renewal's replaced
        certificate was made holds an earlier one, not recorded (``earliest_recorded``,
        ``EARLIER_CA``): always warned. ``[]`` if no renewal led to ``ca``, or no one is left.
        What it cannot see: an agent that refused a renewed certificate, or of a release
        that does not take it; a node's certificate from --cert-dir (not the CA's)."""
        chain = renewals_to(self.store.ca_renewals(), ca)
        if not chain:
            return []
        nodes = self.store.list_nodes()
        held: dict[int, dict[str, list[str]]] = {}
        earliest = earliest_recorded(chain)

        def name(kind: str, who: str, issued_at: dt.datetime) -> None:
            era = -1 if issued_at < earliest else held_at(chain, issued_at)
            if era is not None:
                held.setdefault(era, {}).setdefault(kind, []).append(who)

        for n in nodes:
            name("agent", n.name, n.cert_renewed_at or n.enrolled_at)
        # Of enrolled nodes only, and not a certificate revoked since: a removed node's (its
        # served certificate revoked with it) stayed named until the old CA ended, a line no
        # rollout could clear (review s48rev5 M1).
        enrolled = {n.name for n in nodes}
        issued = {
            c.fingerprint: c.issued_at for c in certs if c.kind == "server" and c.revoked_at is None
        }
        for node, (fingerprint, _end) in self.served(certs).items():
            if node in enrolled and fingerprint in issued:
                name("server", node, issued[fingerprint])
        newest: dict[str, IssuedCert] = {}
        for c in certs:
            if c.kind != "workstation" or c.revoked_at is not None:
                continue
            if c.subject not in newest or c.issued_at > newest[c.subject].issued_at:
                newest[c.subject] = c
        for subject, c in newest.items():
            if c.not_after > now:
                name("workstation", subject, c.issued_at)
        found = []
        for era, kinds in sorted(held.items()):
            replaced = chain[max(era, 0)]
            holders = tuple(
                (kind, tuple(sorted(kinds[kind]))) for kind in PREVIOUS_HOLDERS if kind in kinds
            )
            if era < 0:  # an earlier certificate, not recorded: always warned about
                found.append(
                    Expiry(
                        "ca",
                        "previous",
                        replaced.previous_serial,
                        "",
                        earliest + CA_HORIZON,
                        dt.timedelta(days=pki.CA_VALIDITY_DAYS * 2),
                        holders=holders,
                        earlier=True,
                    )
                )
                continue
            found.append(
                Expiry(
                    "ca",
                    "previous",
                    replaced.previous_serial,
                    replaced.previous_fingerprint,
                    replaced.previous_not_after,
                    CA_HORIZON,
                    holders=holders,
                )
            )
        return found

    def warnings(self) -> list[Expiry]:
        """Those within their horizon, and those revoked and still in use: the leader's or the
        viewer's (which it could not issue again: before, only `certs check-expiration` showed
        one, and neither the hourly log nor `schema show` said anything; review of s63-o1 L2),
        a node's served certificate (review s64 pki M1)."""
        now = self.clock()
        return [e for e in self.check() if e.warning(now) or e.revoked]

    def log_warnings(self) -> list[Expiry]:
        """Log each certificate within its horizon, or revoked and served, at most once a day
        each; returns those logged now (blocking)."""
        now = self.clock()
        logged = []
        for e in self.warnings():
            key = (e.kind, e.subject, e.fingerprint)
            last = self._warned.get(key)
            if last is not None and now - last < WARN_EVERY:
                continue
            self._warned[key] = now
            logged.append(e)
            fields = {
                "kind": e.kind,
                "subject": e.subject,
                "serial": e.serial,
                "not_after": e.not_after.isoformat(timespec="seconds"),
                "residual_days": round(e.residual(now).total_seconds() / 86400, 1),
                "advice": e.advice,
            }
            if e.revoked:
                log.warning(
                    "certificate.revoked_served",
                    **fields,
                    hint="the node still serves a revoked certificate: tlsroll rollout start "
                    "--change rotate-cert --nodes NODE",
                )
            elif e.residual(now) > dt.timedelta(0):
                log.warning(
                    "certificate.expiring",
                    **fields,
                    detail="the advice says what to do before it ends (tlsroll certs "
                    "check-expiration lists them)",
                )
            else:
                log.warning(
                    "certificate.expired",
                    **fields,
                    detail="the advice says how to replace it (tlsroll certs check-expiration "
                    "lists them)",
                )
        return logged

    async def run(self, stop: asyncio.Event, every: float | None = None) -> None:
        """Check now and then every ``every`` seconds (default: ``check_every``, hourly, or
        more often when agent certificates are that short-lived), or sooner when a wake hint
        asks for it, until ``stop`` is set."""
        if every is None:
            every = min(self.check_every, max(self.agent_horizon.total_seconds(), 1.0))
        while not stop.is_set():
            for hook in self.before_check:
                try:
                    result = hook()
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:  # the check itself still runs
                    log.error(
                        "expiry_watch.hook_failed",
                        error=str(exc),
                        hint="the check itself still runs; a bug in tlsroll: report it with the "
                        "lines before this one",
                    )
            try:
                await asyncio.to_thread(self.log_warnings)
            except Exception as exc:  # a bad row must not end the watch
                log.error(
                    "expiry_watch.failed",
                    error=str(exc),
                    hint="the watch runs again at its next interval; a bug in tlsroll: report it"
                    " with the lines before this one",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._next_wait(every))

    def _next_wait(self, every: float) -> float:
        """``every``, or the soonest wake hint's seconds if that comes first."""
        wait = every
        for hint in self.wake_hints:
            try:
                wanted = hint()
            except Exception as exc:  # the interval still holds
                log.error(
                    "expiry_watch.hint_failed",
                    error=str(exc),
                    hint="the watch keeps its interval; a bug in tlsroll: report it with the "
                    "lines before this one",
                )
                continue
            if wanted is not None:
                wait = min(wait, max(wanted, 0.0))
        return wait

    def renewal_failures(self) -> list[tuple[str, dt.datetime, str, dt.datetime]]:
        """(node, failing since, reason, its certificate's end) for every node whose agent
        reports that renewing its certificate fails."""
        return [
            (n.name, n.renewal_failing_since, n.renewal_error, n.cert_not_after)
            for n in self.store.list_nodes()
            if n.renewal_failing_since is not None
        ]


def own_certificates(files: Sequence[tuple[str, Path]]) -> list[tuple[str, x509.Certificate]]:
    """The first certificate of each PEM file that exists, as (kind, certificate)."""
    found = []
    for kind, path in files:
        with contextlib.suppress(OSError, PKIError, IndexError):
            found.append((kind, pki.load_certs_pem(path.read_bytes())[0]))
    return found
