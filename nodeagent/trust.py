"""Whom the agent obeys: the leader's identity, the CA's revocation list, and the epoch ceiling.

    trust = LeaderTrust.load(identity.ca_file, identity.trust_domain, data_dir)
    trust.check_leader(peer)          # NotTheLeader / Revoked, else None (``rpc.peer``)
    await trust.admit_epoch(epoch)    # EpochNotAnnounced if no leader asked for it

* **Identity.** Only a certificate carrying ``spiffe://<trust domain>/leader`` may command the
  agent (``tlsroll.spiffe``); the trust domain comes from the CA this node pinned. Other nodes
  and workstations hold certificates of the same CA and are refused. The check reads what gRPC
  verified (``tlsroll.rpc.peer``: the URI names from its auth context, the serial from the
  certificate), never parses X.509 in the agent, and is as strict as ``spiffe.of``: exactly one
  URI name, and it is the leader's.
* **Revocation.** The leader sends the CA's revocation list with a heartbeat reply when it is
  newer than the agent's; the agent checks its signature (in its crypto worker,
  ``nodeagent.cryptoworker``; without one, in a child of its own: ``nodeagent.certwork``),
  keeps it in ``DATA/crl.pem`` (the managed server can use it for workstation certificates)
  and refuses a revoked leader certificate at once (a list it cannot write is held all the
  same: ``take_crl``). A list is valid for 7 days
  (``pki.CRL_VALIDITY``), and the leader gives it a new number a day after the last
  (``leader.service.CRL_RENEW_AFTER``): the kept list is within its validity while the agent
  hears from the leader. A list with a lower number than the kept one is never taken. A list
  held past its nextUpdate (the agent lost the leader, or someone on the path withholds newer
  lists) is still used, and said: ``crl.stale``, a warning naming its number and age, once
  and again at most daily while it stays so (``stale_check``; review s67 L1).
* **Epochs.** Every command carries its rollout's epoch, and the journal refuses one older than
  any it has seen. An epoch *higher* than the leader has announced (in a heartbeat reply, on the
  agent's own connection to the leader's address) is refused too: otherwise one stray command
  with a huge epoch would make the node refuse every later rollout. Before refusing, the agent
  asks the leader once more (a heartbeat now), so a new rollout never waits for the next
  scheduled heartbeat.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nodeagent import certwork, nodefiles
from tlsroll import logs, spiffe
from tlsroll.errors import PKIError, ShuttingDown, TerminalError, TransientError, os_error_text
from tlsroll.fsutil import PUBLIC, read_regular, write_atomic
from tlsroll.rpc import Peer

if TYPE_CHECKING:
    from nodeagent.cryptoworker import Worker

log = logs.get_logger(__name__)


STALE_REPEAT = dt.timedelta(days=1)
"""How often ``crl.stale`` is said again while the list held stays past its nextUpdate."""
STALE_RECHECK = 3600.0
"""Seconds between two ``stale_check``s at most (a wall clock set meanwhile is seen)."""


def _age(delta: dt.timedelta) -> str:
    """``delta`` as a person says it, to the unit below a day: "8 days", "5 hours"."""
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} s"


class NotTheLeader(TerminalError):
    """The caller's certificate does not name this cluster's leader."""


class Revoked(TerminalError):
    """The caller's certificate is on the CA's revocation list."""


class EpochNotAnnounced(TerminalError):
    """A command's epoch is higher than any the leader has announced."""


@dataclass
class LeaderTrust:
    ca_file: Path  # the CA this node pinned (``Identity.ca_file``)
    trust_domain: str
    crl_file: Path
    crl_number: int = 0
    revoked: frozenset[int] = frozenset()
    # The list's thisUpdate and nextUpdate (None: none held, or it has none): ``stale_check``.
    crl_this_update: dt.datetime | None = None
    crl_next_update: dt.datetime | None = None
    # The list held, as the leader sent it (PEM): what the agent sends a leader that asks for
    # it (``held``; a leader restored from a backup learns what was revoked since from it).
    crl_pem: bytes = b""
    announced_epoch: int = 0
    # The highest epoch a leader's answer named on a link the agent does not trust (the
    # generic name's, ``LeaderLink._trusts``) since the last trusted answer (``announce``
    # clears it): not announced; a command of it is answered UNAVAILABLE, not refused, so
    # that the leader asks again (``admit_epoch``).
    untrusted_epoch: int = 0
    refresh: Callable[[], Awaitable[None]] | None = None
    # Who checks a list (``certwork.load_crl``): the agent's crypto worker, from a worker
    # thread (``take_crl``); None: a child of its own each time.
    worker: Worker | None = None
    _refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)
    _taking: threading.Lock = field(default_factory=threading.Lock)  # ``take_crl`` (threads)
    _older: int = -1  # the last older list refused (``take_crl`` says so once per number)
    _unkept: bool = False  # a list held that could not be written (said once: ``take_crl``)
    _stale_said: tuple[int, dt.datetime] | None = None  # ``crl.stale`` last said: number, when

    @classmethod
    def load(
        cls, ca_file: Path, trust_domain: str, data_dir: Path, worker: Worker | None = None
    ) -> LeaderTrust:
        """The trust kept in ``data_dir`` (the revocation list, if one was received; checked
        by ``worker`` from a worker thread, see ``worker``). A list that cannot be used (one
        that is no regular file too: a FIFO blocked the start for ever, review rev50a L2) is
        passed over with a warning: the leader sends its list on the first heartbeat stream,
        written over it (``take_crl``). A directory there, which no rename can replace, is
        refused before (``nodefiles.crl_kind_problem``, exit 2)."""
        trust = cls(ca_file, trust_domain, nodefiles.crl_path(data_dir), worker=worker)
        if trust.crl_file.exists():
            try:
                pem = read_regular(trust.crl_file)
                trust._hold(certwork.check_crl(pem, ca_file, worker), pem)
            except (PKIError, TerminalError, TransientError) as exc:
                log.warning(
                    "crl.unreadable",
                    path=str(trust.crl_file),
                    error=str(exc),
                    detail="the saved revocation list could not be read at start; the next "
                    "heartbeat brings it again",
                )
        return trust

    def check_leader(self, peer: Peer) -> None:
        identity = spiffe.of_uris(peer.uris)
        if identity != spiffe.leader(self.trust_domain):
            who = str(identity) if identity else "a certificate without a cluster identity"
            raise NotTheLeader(f"{who} is not the leader; only the leader may call NodeAgent")
        if peer.serial in self.revoked:
            raise Revoked("the caller's certificate is revoked")

    def take_crl(self, pem: bytes) -> None:
        """A revocation list from the leader: kept if the CA signed it and it is newer. One the
        agent could not check now (``TransientError``: short of descriptors for its child, …)
        is not refused but raised: the heartbeat stream ends and the leader sends the list
        again on the next one. Swallowed, it was lost until the renewal bound (the leader had
        counted it as delivered), and a revoked leader certificate kept being accepted. So is
        a check whose child gave no answer (``certwork.NoAnswer``: it crashed, or the kernel
        killed it short of memory): that is no verdict on the list, and the leader does not
        send the same list again on a stream (it would be behind until the next list or
        stream: days, with no revocation and a node certificate renewed every few weeks).
        Only a verdict (not PEM, not signed by the CA this node pinned, or another check that
        failed for good) refuses the list: the same bytes would be refused again. A list taken
        that cannot be written to ``crl_file`` is held all the same (``crl.not_kept``, once)."""
        try:
            checked = certwork.check_crl(pem, self.ca_file, self.worker)
        except certwork.NoAnswer as exc:
            log.warning(
                "crl.not_checked",
                error=str(exc),
                detail="the agent could not check the revocation list now; the next heartbeat "
                "brings it again",
            )
            raise TransientError(f"the revocation list could not be checked: {exc}") from None
        except ShuttingDown:
            raise  # the agent stops: no warning (the next start's stream brings the list)
        except TransientError as exc:
            log.warning(
                "crl.not_checked",
                error=str(exc),
                detail="the agent could not check the revocation list now; the next heartbeat "
                "brings it again",
            )
            raise
        except (PKIError, TerminalError) as exc:
            log.warning(
                "crl.refused",
                error=str(exc),
                detail="the revocation list did not pass the agent's check against the cluster "
                "CA; the agent keeps the one it holds",
            )
            return
        # Two lists taken at once (an old stream's reader and a new stream's) each compare
        # and keep under the lock: without it the older could overwrite the newer after both
        # compared (session 32's audit, M5), and a leader certificate it revoked was accepted
        # again until the leader sent the list once more.
        number = checked.number
        with self._taking:
            if number < self.crl_number:
                # A leader whose store was lost or restored numbers its lists lower than the
                # one kept here (audit s33 H1: refused without a word before). Said once per
                # number: a leader sends it with every answer until its number passes.
                if number != self._older:
                    self._older = number
                    log.warning(
                        "crl.older",
                        number=number,
                        held=self.crl_number,
                        detail="the leader sent an older revocation list than the agent holds (a"
                        " store put back from a backup); the agent keeps its own",
                    )
                return
            # Held even where it cannot be kept on disk (a full disk, a read-only or immutable
            # data dir, a directory made in its place since the start): raised, it dropped the
            # heartbeat stream, the leader sent the list again on the next one, and so on
            # once a second for ever, no list held (review rev51d M1). Said once until a list
            # is written again (the leader sends no list the agent holds: it reports its
            # number); the next start has the last list written, and the leader sends its own.
            try:
                write_atomic(self.crl_file, pem, PUBLIC)
            except OSError as exc:
                if not self._unkept:
                    self._unkept = True
                    log.warning(
                        "crl.not_kept",
                        path=str(self.crl_file),
                        error=os_error_text(exc),
                        hint="the revocation list could not be saved: check the agent's data dir"
                        " is writable and has space (df -h)",
                    )
            else:
                if self._unkept:
                    self._unkept = False
                    log.info("crl.kept", path=str(self.crl_file))
            self._hold(checked, pem)
        log.info("crl.updated", number=number, revoked=len(checked.revoked))

    def _hold(self, checked: certwork.CheckedCrl, pem: bytes) -> None:
        self.crl_number, self.revoked, self.crl_pem = checked.number, checked.revoked, pem
        self.crl_this_update, self.crl_next_update = checked.this_update, checked.next_update

    def stale_check(self, now: dt.datetime) -> float:
        """Say (``crl.stale``, a warning) that the list held is past its nextUpdate at ``now``:
        once, again at most once a ``STALE_REPEAT`` while it stays so, and at once for another
        such list. The leader gives its list a new number daily and a week of validity, and
        sends it on every heartbeat stream: a list this old means the agent has not heard the
        leader for days, or someone on its path withholds newer lists, and a certificate the
        admin revoked since is still accepted here. The list is still used (no newer one is
        known). Returns the seconds until the next check (``watch_stale``)."""
        with self._taking:
            number, issued, due = self.crl_number, self.crl_this_update, self.crl_next_update
        if due is None:
            return STALE_RECHECK
        if now < due:
            self._stale_said = None
            return max(1.0, min(STALE_RECHECK, (due - now).total_seconds()))
        said = self._stale_said
        if said is None or said[0] != number or now - said[1] >= STALE_REPEAT:
            said = self._stale_said = (number, now)
            age = "" if issued is None else f", issued {_age(now - issued)} ago"
            log.warning(
                "crl.stale",
                number=number,
                this_update=None if issued is None else issued.isoformat(),
                next_update=due.isoformat(),
                overdue_seconds=int((now - due).total_seconds()),
                detail=f"the revocation list held (number {number}{age}) is past its"
                f" nextUpdate by {_age(now - due)}: no newer list came from the leader (it is"
                " unreachable, or someone on the way withholds its lists); a certificate"
                " revoked since is still accepted",
            )
        return max(1.0, min(STALE_RECHECK, (said[1] + STALE_REPEAT - now).total_seconds()))

    async def watch_stale(self, clock: Callable[[], dt.datetime]) -> None:
        """``stale_check`` for as long as the agent runs (a task of its own)."""
        while True:
            wait = self.stale_check(clock())
            await asyncio.sleep(wait)

    def held(self) -> tuple[int, bytes]:
        """The number of the list held and the list (PEM; empty: none), one pair: a list taken
        meanwhile (another thread) changes both together."""
        with self._taking:
            return self.crl_number, self.crl_pem

    def announce(self, epoch: int) -> None:
        """A trusted answer's epoch (``LeaderLink._take``: the leader dialed by its serial, or
        one that never named a serial). It supersedes what was heard untrusted: an epoch named
        only there is refused from now on unless a trusted answer names it or a later
        untrusted one names it again (the dial by the serial failed again). Kept, it left a
        command of it answered UNAVAILABLE for ever after the leader dialed by its serial had
        said a lower epoch, its sender asking again without end (s68's open item 1). No
        answer of the leader's own made before a rollout began comes after one it made since
        (the stream dialed by the serial is closed before the generic name is dialed), so a
        restarted leader's epoch heard by the generic name is not cleared by an older one."""
        self.announced_epoch = max(self.announced_epoch, epoch)
        self.untrusted_epoch = 0

    def heard_untrusted(self, epoch: int) -> None:
        self.untrusted_epoch = max(self.untrusted_epoch, epoch)

    async def admit_epoch(self, epoch: int) -> None:
        """Return if the leader has announced ``epoch`` (asking it again if need be)."""
        if epoch <= self.announced_epoch:
            return
        if self.refresh is not None:
            async with self._refreshing:
                if epoch > self.announced_epoch:
                    try:
                        await self.refresh()
                    except TransientError as exc:
                        raise TransientError(
                            f"epoch {epoch} is not announced yet and the leader cannot be "
                            f"asked: {exc}"
                        ) from None
        if epoch > self.announced_epoch and epoch <= self.untrusted_epoch:
            # Named only where the agent takes no epoch (the leader's generic name: a dial by
            # its serial failed this beat). Not refused: the leader asks again, and the next
            # heartbeat dials the serial. Nothing is done on it meanwhile.
            raise TransientError(
                f"epoch {epoch} was named by the leader only on a link the agent does not "
                f"trust yet (its generic name; the highest announced is {self.announced_epoch}):"
                " the next heartbeat dials the leader's serial"
            )
        if epoch > self.announced_epoch:
            log.warning(
                "epoch.refused",
                epoch=epoch,
                announced=self.announced_epoch,
                detail="the leader named a trust epoch not announced to this agent: refused "
                "(tlsroll epoch show on the leader)",
            )
            raise EpochNotAnnounced(
                f"epoch {epoch} was never announced by the leader (its highest is "
                f"{self.announced_epoch}); refusing a command no leader asked for"
            )
